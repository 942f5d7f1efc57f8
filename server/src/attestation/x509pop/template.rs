//! `agent_path_template`: the subset of Go's `text/template` SPIRE's x509pop configurations
//! use: literal text and field actions such as `{{ .Fingerprint }}`,
//! `{{ .Subject.CommonName }}` or `{{ .URISanSelectors.datacenter }}`. Fields are checked when
//! the configuration is read (a template SPIRE could not evaluate is refused there, not at
//! attestation); functions and pipelines are not supported. Pure: no I/O.

/// The fields a template may name (after the leading dot).
const FIELDS: &[&[&str]] = &[
    &["PluginName"],
    &["Fingerprint"],
    &["TrustDomain"],
    &["SerialNumberHex"],
    &["SVIDPathTrimmed"],
    &["Subject", "CommonName"],
    &["Subject", "SerialNumber"],
    &["Issuer", "CommonName"],
    &["Issuer", "SerialNumber"],
];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    /// A field path, e.g. ["Subject", "CommonName"] or ["URISanSelectors", "<key>"].
    Field(Vec<String>),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

fn identifier(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl Template {
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = vec![];
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or_else(|| format!("{text:?}: an action is not closed with }}}}"))?;
            let action = after[..close].trim();
            let path = action
                .strip_prefix('.')
                .filter(|p| !p.is_empty())
                .ok_or_else(|| {
                    format!("{text:?}: {{{{{action}}}}} is not a field (only {{{{ .Field }}}} is supported)")
                })?;
            let segs: Vec<String> = path.split('.').map(str::to_string).collect();
            if !segs.iter().all(|s| identifier(s)) {
                return Err(format!("{text:?}: {{{{{action}}}}} is not a field"));
            }
            let known = FIELDS
                .iter()
                .any(|f| f.len() == segs.len() && f.iter().zip(&segs).all(|(a, b)| a == b))
                || (segs.len() == 2 && segs[0] == "URISanSelectors");
            if !known {
                return Err(format!(
                    "{text:?}: can't evaluate field {path} (fields: PluginName, Fingerprint, TrustDomain, SerialNumberHex, SVIDPathTrimmed, Subject.CommonName, Subject.SerialNumber, Issuer.CommonName, Issuer.SerialNumber, URISanSelectors.<key>)"
                ));
            }
            parts.push(Part::Field(segs));
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            if rest.contains("}}") {
                return Err(format!("{text:?}: unexpected }}}}"));
            }
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template { parts })
    }

    /// The text with each field's value from `value`; a field it does not know (a SAN key the
    /// certificate lacks) is an error naming it.
    pub fn render(&self, value: impl Fn(&[String]) -> Option<String>) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Field(f) => {
                    out.push_str(&value(f).ok_or_else(|| format!("no value for .{}", f.join(".")))?)
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(f: &[String]) -> Option<String> {
        match f.join(".").as_str() {
            "PluginName" => Some("x509pop".into()),
            "Fingerprint" => Some("ab12".into()),
            "Subject.CommonName" => Some("COMMONNAME".into()),
            "URISanSelectors.datacenter" => Some("us-east-1".into()),
            _ => None,
        }
    }

    #[test]
    fn x509pop_templates_spire_uses_render_and_others_are_refused() {
        let t = Template::parse("/{{ .PluginName }}/{{ .Fingerprint }}").unwrap();
        assert_eq!(t.render(values).unwrap(), "/x509pop/ab12");
        let t = Template::parse("/cn/{{.Subject.CommonName}}").unwrap();
        assert_eq!(t.render(values).unwrap(), "/cn/COMMONNAME");
        let t =
            Template::parse("/foo/{{ .URISanSelectors.datacenter }}/{{ .URISanSelectors.nope }}")
                .unwrap();
        assert_eq!(
            t.render(values).unwrap_err(),
            "no value for .URISanSelectors.nope"
        );
        for bad in [
            "/{{ .Foo }}",
            "/{{ .Subject }}",
            "/{{ printf \"%s\" .Fingerprint }}",
            "/{{ .Fingerprint ",
            "/x }}",
            "/{{ . }}",
            "/{{ .Subject.Common-Name }}",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
        let e = Template::parse("/{{ .Foo }}").unwrap_err();
        assert!(e.contains("can't evaluate field Foo"), "{e}");
    }
}
