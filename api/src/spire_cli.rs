//! SPIRE's command-line spelling, accepted as it is: Go's flag package takes `-spiffeID x`,
//! `--spiffeID x`, `-spiffeID=x` and `-admin=true`; Kame's commands take `--spiffe-id x`.
//! [`rewrite`] turns the first into the second before the argument parser sees them, so
//! scripts written for `spire-server` and `spire-agent` run unchanged. It only rewrites flag
//! names (and `=true`/`=false` on switches); values and everything it does not recognise pass
//! through untouched, for the parser to accept or refuse.

/// SPIRE flag names whose Kame spelling is not their plain kebab-case.
const RENAMED: &[(&str, &str)] = &[
    ("x509SVIDTTL", "x509-svid-ttl"),
    ("jwtSVIDTTL", "jwt-svid-ttl"),
    ("disableX509SVIDPrefetch", "disable-x509-svid-prefetch"),
    ("jwtSVIDIncludeJTI", "jwt-svid-include-jti"),
    ("dns", "dns-name"),
    ("storeSVID", "store-svid"),
    ("bundleEndpointURL", "bundle-endpoint-url"),
    ("endpointSpiffeID", "endpoint-spiffe-id"),
    ("trustBundleUrl", "trust-bundle-url"),
];

/// SPIRE's switches (boolean flags): `-admin=false` drops the flag, `-admin=true` keeps it.
const SWITCHES: &[&str] = &[
    "node",
    "admin",
    "downstream",
    "storeSVID",
    "disableX509SVIDPrefetch",
    "jwtSVIDIncludeJTI",
    "verbose",
    "shallow",
    "silent",
    "dryRun",
    "expandEnv",
    "force",
];

/// `camelCase` (with runs of capitals as one word: `parentID`, `bundleEndpointURL`) as
/// `kebab-case`.
pub fn kebab(name: &str) -> String {
    if let Some((_, k)) = RENAMED.iter().find(|(s, _)| *s == name) {
        return (*k).to_string();
    }
    let chars: Vec<char> = name.chars().collect();
    let mut out = String::with_capacity(name.len() + 4);
    for (i, &c) in chars.iter().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            let prev = chars[i - 1];
            let next_lower = chars.get(i + 1).is_some_and(|n| n.is_ascii_lowercase());
            if prev.is_ascii_lowercase()
                || prev.is_ascii_digit()
                || (prev.is_ascii_uppercase() && next_lower)
            {
                out.push('-');
            }
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// Whether `token` is a flag in Go's spelling: one or two dashes, then a name of two or more
/// letters and digits (starting with a letter) that is not already kebab-case, then maybe
/// `=value`.
fn go_flag(token: &str) -> Option<(&str, Option<&str>)> {
    let rest = token
        .strip_prefix("--")
        .or_else(|| token.strip_prefix('-'))?;
    let (name, value) = match rest.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (rest, None),
    };
    let single_dash = !token.starts_with("--");
    let ok = name.len() >= 2
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric());
    // `--word` is already ours unless it has capitals (`--spiffeID`) or is renamed (`--dns`).
    let ours = !single_dash
        && !name.chars().any(|c| c.is_ascii_uppercase())
        && !RENAMED.iter().any(|(s, _)| *s == name);
    (ok && !ours).then_some((name, value))
}

/// The arguments (program name first) with SPIRE's flag spellings in Kame's. `subcommand_default`
/// inserts a subcommand where SPIRE has a default one: given `(["api", "fetch"], "x509")`,
/// `api fetch -socketPath s` becomes `api fetch x509 --socket-path s`.
pub fn rewrite(args: Vec<String>, subcommand_defaults: &[(&[&str], &str)]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(args.len() + 1);
    let mut words: Vec<String> = vec![];
    let mut in_flags = false;
    for (i, a) in args.into_iter().enumerate() {
        if i == 0 {
            out.push(a);
            continue;
        }
        if a == "--" {
            in_flags = true;
            out.push(a);
            continue;
        }
        if !in_flags && !a.starts_with('-') {
            words.push(a.clone());
            out.push(a);
            continue;
        }
        if !in_flags {
            // The first flag: the command path is complete; add a default subcommand.
            in_flags = true;
            for (path, sub) in subcommand_defaults {
                if words.iter().map(String::as_str).eq(path.iter().copied()) {
                    out.push((*sub).to_string());
                }
            }
        }
        match go_flag(&a) {
            Some((name, value)) => {
                let long = format!("--{}", kebab(name));
                match value {
                    Some("true") if SWITCHES.contains(&name) => out.push(long),
                    Some("false") if SWITCHES.contains(&name) => {}
                    Some(v) => out.push(format!("{long}={v}")),
                    None => out.push(long),
                }
            }
            None => out.push(a),
        }
    }
    if !in_flags {
        for (path, sub) in subcommand_defaults {
            if words.iter().map(String::as_str).eq(path.iter().copied()) {
                out.push((*sub).to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(s: &str) -> String {
        rewrite(
            s.split(' ').map(String::from).collect(),
            &[(&["api", "fetch"], "x509")],
        )
        .join(" ")
    }

    #[test]
    fn spire_cli_flags_become_kame_flags() {
        assert_eq!(kebab("spiffeID"), "spiffe-id");
        assert_eq!(kebab("parentID"), "parent-id");
        assert_eq!(kebab("federatesWith"), "federates-with");
        assert_eq!(kebab("trustDomainBundlePath"), "trust-domain-bundle-path");
        assert_eq!(kebab("bundleEndpointURL"), "bundle-endpoint-url");
        assert_eq!(kebab("x509SVIDTTL"), "x509-svid-ttl");
        assert_eq!(kebab("subjectKeyID"), "subject-key-id");
        assert_eq!(kebab("matchSelectorsOn"), "match-selectors-on");
        assert_eq!(
            rw(
                "kame-server entry create -spiffeID spiffe://x/y -parentID=spiffe://x/a -selector unix:uid:0 -x509SVIDTTL 60 -dns a.b -admin=true -downstream=false -node"
            ),
            "kame-server entry create --spiffe-id spiffe://x/y --parent-id=spiffe://x/a --selector unix:uid:0 --x509-svid-ttl 60 --dns-name a.b --admin --node"
        );
        // Values that look like flags stay values only after a flag that takes one: Go's
        // `-data -` (stdin) keeps its `-`.
        assert_eq!(rw("k entry create -data -"), "k entry create --data -");
        // Kame's own spelling and short flags are left alone.
        assert_eq!(
            rw("k entry show --spiffe-id spiffe://x/y -h"),
            "k entry show --spiffe-id spiffe://x/y -h"
        );
        assert_eq!(rw("k --spiffeID x"), "k --spiffe-id x");
        // SPIRE's default subcommand.
        assert_eq!(
            rw("a api fetch -socketPath /s"),
            "a api fetch x509 --socket-path /s"
        );
        assert_eq!(rw("a api fetch"), "a api fetch x509");
        assert_eq!(
            rw("a api fetch jwt -audience x"),
            "a api fetch jwt --audience x"
        );
    }
}
