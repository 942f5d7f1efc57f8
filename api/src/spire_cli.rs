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
    ("disableSDSAPI", "disable-sds-api"),
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
    "logSourceLocation",
    "disableWorkloadAPI",
    "disableSDSAPI",
    "allowUnauthenticatedVerifiers",
    "insecureBootstrap",
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

/// Kame's switches (flags that take no value); every other flag takes one.
const KAME_SWITCHES: &[&str] = &[
    "help",
    "version",
    "node",
    "admin",
    "downstream",
    "store-svid",
    "disable-x509-svid-prefetch",
    "jwt-svid-include-jti",
    "verbose",
    "shallow",
    "silent",
    "dry-run",
    "expand-env",
    "force",
    "ecc",
    "log-source-location",
    "disable-workload-api",
    "disable-sds-api",
    "allow-unauthenticated-verifiers",
    "insecure-bootstrap",
];

/// A default subcommand: after the command path `path`, when the next word is none of
/// `known`, `sub` is inserted (`api fetch` is `api fetch x509`).
pub type SubcommandDefault<'a> = (&'a [&'a str], &'a str, &'a [&'a str]);

/// The arguments (program name first) with SPIRE's flag spellings in Kame's. A flag that
/// takes a value keeps the next argument as it is (a value may start with `-`), everything
/// after `--` is left alone, and the default subcommands are inserted where SPIRE has them.
pub fn rewrite(args: Vec<String>, defaults: &[SubcommandDefault<'_>]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(args.len() + 1);
    // Words (not flags, not flag values) with their positions in `out`.
    let mut words: Vec<(usize, String)> = vec![];
    let mut args = args.into_iter();
    if let Some(program) = args.next() {
        out.push(program);
    }
    let mut value_next = false;
    while let Some(a) = args.next() {
        if value_next {
            value_next = false;
            out.push(a);
            continue;
        }
        if a == "--" {
            out.push(a);
            out.extend(args.by_ref());
            break;
        }
        if !a.starts_with('-') || a == "-" {
            words.push((out.len(), a.clone()));
            out.push(a);
            continue;
        }
        match go_flag(&a) {
            Some((name, value)) => {
                let kebab_name = kebab(name);
                let long = format!("--{kebab_name}");
                let switch =
                    SWITCHES.contains(&name) || KAME_SWITCHES.contains(&kebab_name.as_str());
                match value {
                    Some("true") if switch => out.push(long),
                    Some("false") if switch => {}
                    Some(v) => out.push(format!("{long}={v}")),
                    None => {
                        value_next = !switch;
                        out.push(long);
                    }
                }
            }
            None => {
                // Kame's own spelling (or a short flag): the next argument is its value unless
                // it is a switch or carries `=value`.
                let name = a.trim_start_matches('-');
                value_next =
                    a.starts_with("--") && !name.contains('=') && !KAME_SWITCHES.contains(&name);
                out.push(a);
            }
        }
    }
    for (path, sub, known) in defaults {
        let n = path.len();
        let matches =
            n > 0 && words.len() >= n && words.iter().zip(path.iter()).all(|((_, w), p)| w == p);
        if !matches {
            continue;
        }
        match words.get(n) {
            Some((_, next)) if known.contains(&next.as_str()) => {}
            Some((at, _)) => out.insert(*at, (*sub).to_string()),
            None => {
                let at = words[n - 1].0 + 1;
                out.insert(at, (*sub).to_string());
            }
        }
    }
    out
}

/// The process's arguments, rewritten by [`rewrite`]; arguments that are not UTF-8 are left
/// as they are (and nothing is rewritten).
pub fn args_os(defaults: &[SubcommandDefault<'_>]) -> Vec<std::ffi::OsString> {
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match raw
        .iter()
        .map(|a| a.clone().into_string())
        .collect::<Result<Vec<String>, _>>()
    {
        Ok(args) => rewrite(args, defaults)
            .into_iter()
            .map(Into::into)
            .collect(),
        Err(_) => raw,
    }
}

/// SPIRE's logging flags of `run` and `validate` (`-logFile`, `-logFormat`, `-logLevel`,
/// `-logSourceLocation`), each overriding the daemon section's key of the same meaning.
#[cfg(feature = "cli")]
#[derive(Debug, Clone, clap::Args)]
pub struct LogFlags {
    /// File to append logs to (overrides log_file).
    #[arg(long)]
    pub log_file: Option<String>,
    /// text or json (overrides log_format).
    #[arg(long)]
    pub log_format: Option<String>,
    /// debug, info, warn or error (overrides log_level).
    #[arg(long)]
    pub log_level: Option<String>,
    /// Include each event's source file and line (sets log_source_location).
    #[arg(long)]
    pub log_source_location: bool,
}

#[cfg(feature = "cli")]
impl LogFlags {
    /// Adds the flags given to `o`.
    pub fn apply(&self, o: &mut crate::conf::Overrides) {
        o.string("log_file", self.log_file.as_deref())
            .string("log_format", self.log_format.as_deref())
            .string("log_level", self.log_level.as_deref())
            .switch("log_source_location", self.log_source_location);
    }
}

/// Why SPIRE's `-instance` flag cannot name a socket.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SocketError {
    #[error("{var} must be set to use -instance (a path with %i where the instance goes)")]
    TemplateUnset { var: String },
    #[error("{var} has no %i to put the instance in: {template:?}")]
    NoPlaceholder { var: String, template: String },
}

/// The socket a client command talks to, chosen as SPIRE chooses: `-socketPath` when given;
/// else `-instance` put in place of `%i` in `$<var>_TEMPLATE`; else `$<var>`; else the first
/// of `fallbacks` that is set (environment variables); else `default`. `env` reads the
/// environment (this crate reads none itself).
pub fn resolve_socket(
    flag: Option<&str>,
    instance: Option<&str>,
    var: &str,
    fallbacks: &[&str],
    default: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<String, SocketError> {
    let template_var = format!("{var}_TEMPLATE");
    let set = |k: &str| env(k).filter(|v| !v.is_empty());
    let instance = instance.filter(|i| !i.is_empty());
    let from_template = match instance {
        None => None,
        Some(i) => {
            let template = set(&template_var).ok_or_else(|| SocketError::TemplateUnset {
                var: template_var.clone(),
            })?;
            if !template.contains("%i") {
                return Err(SocketError::NoPlaceholder {
                    var: template_var,
                    template,
                });
            }
            Some(template.replace("%i", i))
        }
    };
    Ok(flag
        .map(str::to_string)
        .or(from_template)
        .or_else(|| {
            std::iter::once(var)
                .chain(fallbacks.iter().copied())
                .find_map(set)
        })
        .unwrap_or_else(|| default.to_string()))
}

/// What a command tree lacks for its users: commands without a description, flags without
/// help, command groups without an example in their after-help. Empty when complete.
#[cfg(feature = "cli")]
pub fn missing_help(cmd: &clap::Command) -> Vec<String> {
    fn walk(c: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for a in c.get_arguments() {
            let id = a.get_id().as_str();
            if a.is_hide_set() || id == "help" || id == "version" {
                continue;
            }
            if a.get_help().is_none() && a.get_long_help().is_none() {
                missing.push(format!("{path} --{id}"));
            }
        }
        for s in c.get_subcommands() {
            let p = format!("{path} {}", s.get_name());
            if s.get_name() != "help" && s.get_about().is_none() {
                missing.push(p.clone());
            }
            if s.has_subcommands()
                && !s
                    .get_after_help()
                    .is_some_and(|h| h.to_string().contains("Example"))
            {
                missing.push(format!("{p}: no example"));
            }
            walk(s, &p, missing);
        }
    }
    let mut missing = vec![];
    walk(cmd, cmd.get_name(), &mut missing);
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(s: &str) -> String {
        rewrite(
            s.split(' ').map(String::from).collect(),
            &[(&["api", "fetch"], "x509", &["x509", "jwt", "help"])],
        )
        .join(" ")
    }

    #[test]
    fn spire_cli_instance_flag_picks_socket_from_template() {
        let env = |k: &str| match k {
            "SPIRE_SERVER_PRIVATE_SOCKET_TEMPLATE" => Some("/run/spire-%i/api.sock".to_string()),
            "SPIRE_SERVER_PRIVATE_SOCKET" => Some("/run/env.sock".to_string()),
            _ => None,
        };
        let v = "SPIRE_SERVER_PRIVATE_SOCKET";
        let r = |f: Option<&str>, i: Option<&str>| resolve_socket(f, i, v, &[], "/d.sock", env);
        assert_eq!(r(Some("/f.sock"), Some("a")).unwrap(), "/f.sock");
        assert_eq!(r(None, Some("a")).unwrap(), "/run/spire-a/api.sock");
        assert_eq!(r(None, None).unwrap(), "/run/env.sock");
        let none = |_: &str| None;
        assert_eq!(
            resolve_socket(None, None, v, &["SPIFFE_ENDPOINT_SOCKET"], "/d.sock", none).unwrap(),
            "/d.sock"
        );
        assert_eq!(
            resolve_socket(None, Some("a"), v, &[], "/d.sock", none),
            Err(SocketError::TemplateUnset {
                var: "SPIRE_SERVER_PRIVATE_SOCKET_TEMPLATE".into()
            })
        );
        let bad = |k: &str| k.ends_with("_TEMPLATE").then(|| "/run/x.sock".to_string());
        assert!(matches!(
            resolve_socket(None, Some("a"), v, &[], "/d.sock", bad),
            Err(SocketError::NoPlaceholder { .. })
        ));
        let fallback = |k: &str| (k == "SPIFFE_ENDPOINT_SOCKET").then(|| "unix:///w".to_string());
        assert_eq!(
            resolve_socket(None, None, v, &["SPIFFE_ENDPOINT_SOCKET"], "/d", fallback).unwrap(),
            "unix:///w"
        );
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
        // A value may start with a dash; `--` ends the rewriting; flags before the path.
        assert_eq!(
            rw("k entry show -hint -canary -spiffeID x"),
            "k entry show --hint -canary --spiffe-id x"
        );
        assert_eq!(
            rw("k entry show --hint -canary"),
            "k entry show --hint -canary"
        );
        assert_eq!(rw("k run -- -spiffeID"), "k run -- -spiffeID");
        assert_eq!(
            rw("a --timeout 3s api fetch -socketPath /s"),
            "a --timeout 3s api fetch x509 --socket-path /s"
        );
        assert_eq!(
            rw("a api fetch -silent -write /tmp"),
            "a api fetch x509 --silent --write /tmp"
        );
    }
}
