//! Configuration files in SPIRE's HCL layout, shared by server and agent: a [`Section`] reader
//! that records every key it reads so that an unknown key is an error naming it, Go-style
//! duration parsing, and `$VAR` expansion as SPIRE's `-expandEnv`. It parses text only: reading
//! files and acting on the values is the caller's job.

use hcl::expr::{Expression, ObjectKey};
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("configuration is not valid HCL: {0}")]
    Syntax(String),
    #[error("{key}: unknown key")]
    UnknownKey { key: String },
    /// A key SPIRE reads that Kame does not implement: not a typo, a missing feature.
    #[error("{key}: a SPIRE setting Kame does not support")]
    SpireOnly { key: String },
    /// An unknown key next to a required one it is a misspelling of.
    #[error("{key}: unknown key (did you mean {expected}?)")]
    Misspelt { key: String, expected: String },
    #[error("{key}: missing required value")]
    Missing { key: String },
    #[error("{key}: {msg}")]
    Invalid { key: String, msg: String },
}

pub fn invalid(key: &str, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        msg: msg.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// SPIRE's (logrus's) levels, as its Logger API names them. `panic` and `fatal` log what
/// `error` logs: this process has no messages above errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Panic,
    Fatal,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl Level {
    pub const ALL: [Level; 7] = [
        Level::Panic,
        Level::Fatal,
        Level::Error,
        Level::Warn,
        Level::Info,
        Level::Debug,
        Level::Trace,
    ];

    /// A level by its name in any case (`warning` too, as logrus reads it).
    pub fn parse(s: &str) -> Option<Level> {
        let l = s.to_ascii_lowercase();
        if l == "warning" {
            return Some(Level::Warn);
        }
        Level::ALL.into_iter().find(|v| v.name() == l)
    }

    /// The lower-case name SPIRE prints.
    pub fn name(self) -> &'static str {
        match self {
            Level::Panic => "panic",
            Level::Fatal => "fatal",
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        }
    }

    /// The number of `spire.api.types.LogLevel` (UNSPECIFIED is 0).
    pub fn api(self) -> i32 {
        match self {
            Level::Panic => 1,
            Level::Fatal => 2,
            Level::Error => 3,
            Level::Warn => 4,
            Level::Info => 5,
            Level::Debug => 6,
            Level::Trace => 7,
        }
    }

    /// The level of a `spire.api.types.LogLevel` number; `None` for UNSPECIFIED and unknown.
    pub fn from_api(n: i32) -> Option<Level> {
        Level::ALL.into_iter().find(|v| v.api() == n)
    }

    /// The `tracing` filter directive that logs what this level logs.
    pub fn directive(self) -> &'static str {
        match self {
            Level::Panic | Level::Fatal | Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        }
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Expands `$VAR` and `${VAR}` like Go's `os.ExpandEnv` (unset variables become empty).
pub fn expand_env(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let b = input.as_bytes();
    let mut out = String::with_capacity(input.len());
    let mut i = 0;
    let mut last = 0;
    while i < b.len() {
        if b[i] == b'$' && i + 1 < b.len() {
            let (name, end) = if b[i + 1] == b'{' {
                match input[i + 2..].find('}') {
                    Some(close) => (&input[i + 2..i + 2 + close], i + 3 + close),
                    None => {
                        i += 1;
                        continue;
                    }
                }
            } else {
                let len = input[i + 1..]
                    .bytes()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == b'_')
                    .count();
                if len == 0 {
                    i += 1;
                    continue;
                }
                (&input[i + 1..i + 1 + len], i + 1 + len)
            };
            out.push_str(&input[last..i]);
            out.push_str(&lookup(name).unwrap_or_default());
            i = end;
            last = end;
        } else {
            i += 1;
        }
    }
    out.push_str(&input[last..]);
    out
}

/// Parses a Go duration string (`24h`, `1h30m`, `90s`, `500ms`, `1.5h`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .bytes()
            .take_while(|c| c.is_ascii_digit() || *c == b'.')
            .count();
        if num_len == 0 {
            return Err(format!("invalid duration {s:?}"));
        }
        let n: f64 = rest[..num_len]
            .parse()
            .map_err(|_| format!("invalid duration {s:?}"))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .bytes()
            .take_while(|c| c.is_ascii_alphabetic() || *c == 0xc2 || *c == 0xb5)
            .count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let mult = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err(format!("missing unit in duration {s:?}")),
            u => return Err(format!("unknown unit {u:?} in duration {s:?}")),
        };
        total += n * mult;
    }
    if !total.is_finite() || total > 100.0 * 365.0 * 86400.0 {
        return Err(format!("duration {s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(total))
}

/// Values given on the command line for keys of one section (SPIRE's `run` flags such as
/// `-logLevel`, `-dataDir`): they replace the file's values before the section is read, so
/// they are checked, and refused, exactly as the file's would be.
#[derive(Debug, Default, Clone)]
pub struct Overrides(Vec<(&'static str, Expression)>);

impl Overrides {
    /// `key = "value"` when the flag was given.
    pub fn string(&mut self, key: &'static str, v: Option<&str>) -> &mut Self {
        if let Some(v) = v {
            self.0.push((key, Expression::String(v.to_string())));
        }
        self
    }

    /// `key = n` when the flag was given.
    pub fn int(&mut self, key: &'static str, v: Option<i64>) -> &mut Self {
        if let Some(v) = v {
            self.0.push((key, Expression::Number(v.into())));
        }
        self
    }

    /// `key = true` when the switch was given (an absent switch leaves the file's value).
    pub fn switch(&mut self, key: &'static str, on: bool) -> &mut Self {
        if on {
            self.0.push((key, Expression::Bool(true)));
        }
        self
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One HCL body or object, with every key it holds and a record of what was read.
pub struct Section {
    path: String,
    attrs: BTreeMap<String, Expression>,
    blocks: Vec<(String, Vec<String>, Section)>,
    used: std::cell::RefCell<std::collections::HashSet<String>>,
}

impl Section {
    pub fn from_body(path: &str, body: hcl::Body) -> Result<Self, ConfigError> {
        let mut attrs = BTreeMap::new();
        let mut blocks = vec![];
        for s in body.into_iter() {
            match s {
                hcl::Structure::Attribute(a) => {
                    let key = a.key.to_string();
                    if attrs.insert(key.clone(), a.expr).is_some() {
                        return Err(invalid(&join(path, &key), "set more than once"));
                    }
                }
                hcl::Structure::Block(b) => {
                    let name = b.identifier.to_string();
                    let labels: Vec<String> =
                        b.labels.iter().map(|l| l.as_str().to_string()).collect();
                    let mut p = join(path, &name);
                    for l in &labels {
                        p = format!("{p}.{l}");
                    }
                    let sec = Section::from_body(&p, b.body)?;
                    blocks.push((name, labels, sec));
                }
            }
        }
        Ok(Section {
            path: path.to_string(),
            attrs,
            blocks,
            used: Default::default(),
        })
    }

    fn from_object(
        path: &str,
        obj: hcl::Object<ObjectKey, Expression>,
    ) -> Result<Self, ConfigError> {
        let mut attrs = BTreeMap::new();
        for (k, v) in obj {
            let key = match k {
                ObjectKey::Identifier(i) => i.to_string(),
                ObjectKey::Expression(Expression::String(s)) => s,
                _ => return Err(invalid(path, "object keys must be names or strings")),
            };
            attrs.insert(key, v);
        }
        Ok(Section {
            path: path.to_string(),
            attrs,
            blocks: vec![],
            used: Default::default(),
        })
    }

    /// Puts the command line's values in place of the file's.
    pub fn apply(&mut self, o: &Overrides) {
        for (k, v) in &o.0 {
            self.attrs.insert((*k).to_string(), v.clone());
        }
    }

    pub fn key(&self, k: &str) -> String {
        join(&self.path, k)
    }

    fn take_attr(&self, k: &str) -> Option<&Expression> {
        self.used.borrow_mut().insert(k.to_string());
        self.attrs.get(k)
    }

    pub fn string(&self, k: &str) -> Result<Option<String>, ConfigError> {
        match self.take_attr(k) {
            None => Ok(None),
            Some(Expression::String(s)) => Ok(Some(s.clone())),
            Some(Expression::TemplateExpr(_)) => Err(invalid(
                &self.key(k),
                "interpolation is not supported (use --expand-env for $VAR)",
            )),
            Some(_) => Err(invalid(&self.key(k), "expected a string")),
        }
    }

    pub fn strings(&self, k: &str) -> Result<Option<Vec<String>>, ConfigError> {
        match self.take_attr(k) {
            None => Ok(None),
            Some(Expression::Array(a)) => a
                .iter()
                .map(|e| match e {
                    Expression::String(s) => Ok(s.clone()),
                    _ => Err(invalid(&self.key(k), "expected a list of strings")),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(Expression::String(s)) => Ok(Some(vec![s.clone()])),
            Some(_) => Err(invalid(&self.key(k), "expected a list of strings")),
        }
    }

    /// The names of this section's attributes (for maps such as PCR policies).
    pub fn keys(&self) -> Vec<String> {
        self.attrs.keys().cloned().collect()
    }

    /// Whether the section sets `k`, as a value or as one or more blocks.
    pub fn has(&self, k: &str) -> bool {
        self.attrs.contains_key(k) || self.blocks.iter().any(|(b, _, _)| b == k)
    }

    pub fn take_bool(&self, k: &str) -> Result<Option<bool>, ConfigError> {
        match self.take_attr(k) {
            None => Ok(None),
            Some(Expression::Bool(b)) => Ok(Some(*b)),
            Some(Expression::String(s)) if s == "true" || s == "false" => Ok(Some(s == "true")),
            Some(_) => Err(invalid(&self.key(k), "expected true or false")),
        }
    }

    pub fn int(&self, k: &str) -> Result<Option<i64>, ConfigError> {
        match self.take_attr(k) {
            None => Ok(None),
            Some(Expression::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| invalid(&self.key(k), "expected an integer")),
            Some(Expression::String(s)) => s
                .parse()
                .map(Some)
                .map_err(|_| invalid(&self.key(k), format!("{s:?} is not an integer"))),
            Some(_) => Err(invalid(&self.key(k), "expected an integer")),
        }
    }

    pub fn duration(&self, k: &str) -> Result<Option<Duration>, ConfigError> {
        self.string(k)?
            .map(|s| parse_duration(&s).map_err(|m| invalid(&self.key(k), m)))
            .transpose()
    }

    /// A nested section given either as a block `k { }` or an attribute `k = { }`.
    pub fn section(&mut self, k: &str) -> Result<Option<Section>, ConfigError> {
        self.used.borrow_mut().insert(k.to_string());
        let mut found: Vec<Section> = vec![];
        let mut i = 0;
        while i < self.blocks.len() {
            if self.blocks[i].0 == k {
                let (_, labels, sec) = self.blocks.remove(i);
                if !labels.is_empty() {
                    return Err(invalid(&self.key(k), "this block takes no labels"));
                }
                found.push(sec);
            } else {
                i += 1;
            }
        }
        if let Some(expr) = self.attrs.remove(k) {
            match expr {
                Expression::Object(o) => found.push(Section::from_object(&self.key(k), o)?),
                _ => return Err(invalid(&self.key(k), "expected a block")),
            }
        }
        if found.len() > 1 {
            return Err(invalid(&self.key(k), "given more than once"));
        }
        Ok(found.pop())
    }

    /// Every block `k "label" { }` (SPIRE's plugin declarations).
    pub fn labeled(&mut self, k: &str) -> Result<Vec<(String, Section)>, ConfigError> {
        self.used.borrow_mut().insert(k.to_string());
        let mut out = vec![];
        let mut i = 0;
        while i < self.blocks.len() {
            if self.blocks[i].0 == k {
                let (_, labels, sec) = self.blocks.remove(i);
                if labels.len() != 1 {
                    return Err(invalid(
                        &self.key(k),
                        "expected exactly one label (the plugin name)",
                    ));
                }
                out.push((labels[0].clone(), sec));
            } else {
                i += 1;
            }
        }
        // HCL1 style: `NodeAttestor = { join_token = { ... } }` is also accepted.
        if let Some(expr) = self.attrs.remove(k) {
            match expr {
                Expression::Object(o) => {
                    for (name, v) in o {
                        let name = match name {
                            ObjectKey::Identifier(i) => i.to_string(),
                            ObjectKey::Expression(Expression::String(s)) => s,
                            _ => return Err(invalid(&self.key(k), "bad plugin name")),
                        };
                        let sec = match v {
                            Expression::Object(inner) => {
                                Section::from_object(&format!("{}.{name}", self.key(k)), inner)?
                            }
                            _ => return Err(invalid(&self.key(k), "expected a block")),
                        };
                        out.push((name, sec));
                    }
                }
                _ => return Err(invalid(&self.key(k), "expected a block")),
            }
        }
        Ok(out)
    }

    /// The string under `k`, an empty one counting as unset (Go's zero value, as SPIRE reads
    /// its configuration).
    pub fn nonempty(&self, k: &str) -> Result<Option<String>, ConfigError> {
        Ok(self.string(k)?.filter(|v| !v.is_empty()))
    }

    /// The non-empty string under `k`; unset is [`Section::missing`].
    pub fn required(&self, k: &str) -> Result<String, ConfigError> {
        self.nonempty(k)?.ok_or_else(|| self.missing(k))
    }

    /// The error for the required key `k` not being set: when the section holds an unread
    /// key that is a near miss of `k` (a typo), that key is named as unknown instead, so the
    /// operator sees the line to fix.
    pub fn missing(&self, k: &str) -> ConfigError {
        self.misspelt(k)
            .unwrap_or_else(|| ConfigError::Missing { key: self.key(k) })
    }

    /// An unread key in this section that is a near miss of `k`, as an error naming it.
    pub fn misspelt(&self, k: &str) -> Option<ConfigError> {
        let used = self.used.borrow();
        self.attrs
            .keys()
            .chain(self.blocks.iter().map(|(k, _, _)| k))
            .find(|u| !used.contains(*u) && near_miss(u, k))
            .map(|u| ConfigError::Misspelt {
                key: self.key(u),
                expected: k.to_string(),
            })
    }

    /// Fails on any key that was not read: named as a SPIRE setting Kame lacks when SPIRE
    /// reads it in this section, as unknown otherwise.
    pub fn finish(self) -> Result<(), ConfigError> {
        let used = self.used.borrow();
        let unread = self
            .attrs
            .keys()
            .chain(self.blocks.iter().map(|(k, _, _)| k))
            .find(|k| !used.contains(*k));
        match unread {
            None => Ok(()),
            Some(k) if spire_only(&self.path, k) => {
                Err(ConfigError::SpireOnly { key: self.key(k) })
            }
            Some(k) => Err(ConfigError::UnknownKey { key: self.key(k) }),
        }
    }
}

/// SPIRE's keys (its server and agent `run` configuration, its plugin blocks and telemetry)
/// that Kame does not implement; a section reads what it supports before this is asked.
fn spire_only(path: &str, key: &str) -> bool {
    const SERVER: &[&str] = &[
        "admin_ids",
        "disable_jwt_svids",
        "experimental",
        "prune_attested_nodes_expired_for",
        "prune_attested_nodes_batch_size",
        "prune_tofu_nodes",
        "proxy_protocol_trusted_cidrs",
        "max_attested_node_info_staleness",
        "profiling_enabled",
        "profiling_port",
        "profiling_freq",
        "profiling_names",
        "cache_reload_interval",
        "allow_agentless_node_attestors",
    ];
    const AGENT: &[&str] = &[
        "admin_socket_path",
        "insecure_bootstrap",
        "rebootstrap_mode",
        "rebootstrap_delay",
        "retry_bootstrap",
        "log_selectors",
        "disable_workload_api",
        "disable_sds_api",
        "workload_x509_svid_key_type",
        "trust_bundle_format",
        "trust_bundle_spiffe_workload_api",
        "trust_bundle_unix_socket",
        "trust_bundle_url",
        "allow_unauthenticated_verifiers",
        "allowed_foreign_jwt_claims",
        "availability_target",
        "x509_svid_cache_max_size",
        "jwt_svid_cache_max_size",
        "authorized_delegates",
        "profiling_enabled",
        "profiling_port",
        "profiling_freq",
        "profiling_names",
        "experimental",
    ];
    const ROOT: &[&str] = &["health_checks", "telemetry"];
    const PLUGIN: &[&str] = &[
        "plugin_cmd",
        "plugin_args",
        "plugin_checksum",
        "plugin_data_file",
        "enabled",
    ];
    const PLUGIN_TYPES: &[&str] = &[
        "Notifier",
        "BundlePublisher",
        "CredentialComposer",
        "SVIDStore",
    ];
    const TELEMETRY: &[&str] = &[
        "DogStatsd",
        "Statsd",
        "M3",
        "InMem",
        "MetricPrefix",
        "EnableTrustDomainLabel",
        "EnableHostnameLabel",
        "AllowedPrefixes",
        "BlockedPrefixes",
        "AllowedLabels",
        "BlockedLabels",
    ];
    let list: &[&str] = match path {
        "" => ROOT,
        "server" => SERVER,
        "agent" => AGENT,
        "plugins" => PLUGIN_TYPES,
        "telemetry" => TELEMETRY,
        "telemetry.Prometheus" => &["tls"],
        p if p.starts_with("plugins.") && p.matches('.').count() == 2 => PLUGIN,
        _ => &[],
    };
    list.contains(&key)
}

/// Whether `a` is within two single-character edits of `b` (a typo of it).
fn near_miss(a: &str, b: &str) -> bool {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    if a.len().abs_diff(b.len()) > 2 || a.len() > 128 || b.len() > 128 {
        return false;
    }
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()] <= 2
}

fn join(path: &str, k: &str) -> String {
    if path.is_empty() {
        k.to_string()
    } else {
        format!("{path}.{k}")
    }
}

/// A plugin block's `plugin_data` (absent means empty).
pub fn plugin_data(mut sec: Section) -> Result<Section, ConfigError> {
    let data = sec.section("plugin_data")?;
    let path = sec.key("plugin_data");
    // SPIRE's plugin blocks may also carry `enabled`, `plugin_cmd`, `plugin_checksum`: external
    // plugins are not supported, so those keys are refused as SPIRE settings Kame lacks.
    sec.finish()?;
    Ok(data.unwrap_or(Section {
        path,
        attrs: BTreeMap::new(),
        blocks: vec![],
        used: Default::default(),
    }))
}

/// A configuration file's text (a daemon's `-config`).
pub fn read_file(path: &std::path::Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Where `--expand-env` looks `$VAR` up (the caller's environment: this crate reads none).
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Parses HCL text (after `$VAR` expansion from `env`, when given) into the root [`Section`].
pub fn parse_root(text: &str, env: Option<Env<'_>>) -> Result<Section, ConfigError> {
    let text = match env {
        Some(lookup) => expand_env(text, lookup),
        None => text.to_string(),
    };
    let body = match hcl::parse(&text) {
        Ok(b) => b,
        // HCL1 forms SPIRE's parser takes and HCL2 does not (nested blocks on one line, commas
        // between a block's attributes): read again with those laid out on lines; an error
        // still names the text as written.
        Err(first) => {
            hcl::parse(&hcl1_layout(&text)).map_err(|_| ConfigError::Syntax(first.to_string()))?
        }
    };
    Section::from_body("", body)
}

/// `text` with a line break after every `{`, before every `}`, and in place of every comma
/// directly inside braces, outside strings, comments and heredocs: HCL1's one-line blocks and
/// comma-separated attributes in HCL2's layout. Commas inside brackets and parentheses stay.
pub fn hcl1_layout(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    let mut stack: Vec<char> = vec![];
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                out.push(c);
                // A string, with escapes and `${ }` / `%{ }` templates (which may hold strings).
                let mut depth = 0usize;
                let mut prev = '\0';
                while let Some(d) = chars.next() {
                    out.push(d);
                    match d {
                        '\\' => {
                            if let Some(e) = chars.next() {
                                out.push(e);
                            }
                            prev = '\0';
                            continue;
                        }
                        '{' if prev == '$' || prev == '%' => depth += 1,
                        '}' if depth > 0 => depth -= 1,
                        '"' if depth == 0 => break,
                        _ => {}
                    }
                    prev = d;
                }
            }
            '#' => {
                out.push(c);
                for d in chars.by_ref() {
                    out.push(d);
                    if d == '\n' {
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'/') => {
                out.push(c);
                for d in chars.by_ref() {
                    out.push(d);
                    if d == '\n' {
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                out.push(c);
                let mut prev = '\0';
                for d in chars.by_ref() {
                    out.push(d);
                    if prev == '*' && d == '/' {
                        break;
                    }
                    prev = d;
                }
            }
            '<' if chars.peek() == Some(&'<') => {
                // A heredoc: copied to the line holding only its marker.
                out.push(c);
                if let Some(d) = chars.next() {
                    out.push(d);
                }
                let mut header = String::new();
                for d in chars.by_ref() {
                    out.push(d);
                    if d == '\n' {
                        break;
                    }
                    header.push(d);
                }
                let marker = header.trim().trim_start_matches('-').to_string();
                if marker.is_empty() {
                    continue;
                }
                let mut line = String::new();
                for d in chars.by_ref() {
                    out.push(d);
                    if d == '\n' {
                        if line.trim() == marker {
                            break;
                        }
                        line.clear();
                    } else {
                        line.push(d);
                    }
                }
            }
            '{' => {
                stack.push('{');
                out.push_str("{\n");
            }
            '[' | '(' => {
                stack.push(c);
                out.push(c);
            }
            '}' => {
                stack.pop();
                out.push_str("\n}");
            }
            ']' | ')' => {
                stack.pop();
                out.push(c);
            }
            ',' if stack.last() == Some(&'{') => out.push('\n'),
            _ => out.push(c),
        }
    }
    out
}

/// Parses `log_level`: SPIRE's levels (panic, fatal, error, warn, info, debug, trace) in any
/// case; `info` when absent.
pub fn log_level(sec: &Section) -> Result<Level, ConfigError> {
    match sec.string("log_level")? {
        None => Ok(Level::Info),
        Some(s) => Level::parse(&s).ok_or_else(|| {
            invalid(
                &sec.key("log_level"),
                format!("{s:?} is not one of DEBUG, INFO, WARN, ERROR (or TRACE, FATAL, PANIC)"),
            )
        }),
    }
}

/// Parses `log_format` (text | json).
pub fn log_format(sec: &Section) -> Result<LogFormat, ConfigError> {
    match sec.string("log_format")?.as_deref() {
        None | Some("text") | Some("TEXT") => Ok(LogFormat::Text),
        Some("json") | Some("JSON") => Ok(LogFormat::Json),
        Some(other) => Err(invalid(
            &sec.key("log_format"),
            format!("{other:?} is not text or json"),
        )),
    }
}

/// The one plugin of `kind` in `plugins` (`kind "name" { plugin_data { } }`): its name and
/// `plugin_data`. None configured, or more than one, is an error naming `plugins.<kind>`.
pub fn single_plugin(plugins: &mut Section, kind: &str) -> Result<(String, Section), ConfigError> {
    let mut all = plugins.labeled(kind)?;
    let key = plugins.key(kind);
    if all.len() > 1 {
        return Err(invalid(&key, format!("only one {kind} may be configured")));
    }
    let (name, sec) = all.pop().ok_or(ConfigError::Missing { key })?;
    Ok((name, plugin_data(sec)?))
}

/// The one plugin of `kind` in `plugins` with its builder from `binary`'s catalogue `table`:
/// none, more than one, or an unknown name is an error naming `plugins.<kind>` (an unknown
/// name lists the known ones).
pub fn single_builtin<B: Copy>(
    binary: &str,
    plugins: &mut Section,
    kind: &str,
    table: &[(&str, B)],
) -> Result<(B, Section), ConfigError> {
    let (name, data) = single_plugin(plugins, kind)?;
    let build = builtin(table, &name).ok_or_else(|| {
        invalid(
            &plugins.key(kind),
            if table.is_empty() {
                format!("unknown {kind} {name:?} (this {binary} has none built in)")
            } else {
                format!(
                    "unknown {kind} {name:?} (expected one of {})",
                    builtin_names(&[], table)
                )
            },
        )
    })?;
    Ok((build, data))
}

/// The built-in named `name` in a plugin catalogue's table (name, builder).
pub fn builtin<B: Copy>(table: &[(&str, B)], name: &str) -> Option<B> {
    table.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
}

/// Every name a configuration may use for one plugin type, quoted, for error messages: those
/// built into the binary itself (`always`), then the catalogue's.
pub fn builtin_names<B>(always: &[&str], table: &[(&str, B)]) -> String {
    always
        .iter()
        .copied()
        .chain(table.iter().map(|(n, _)| *n))
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn spire_keys_kame_lacks_are_named_as_such_not_as_typos() {
        let mut root = parse_root(
            "server {\n admin_ids = [\"spiffe://x/y\"]\n}\nplugins {\n KeyManager \"disk\" {\n plugin_cmd = \"/bin/x\"\n }\n}\n",
            None,
        )
        .unwrap();
        let server = root.section("server").unwrap().unwrap();
        assert_eq!(
            server.finish().unwrap_err().to_string(),
            "server.admin_ids: a SPIRE setting Kame does not support"
        );
        let mut plugins = root.section("plugins").unwrap().unwrap();
        let (_, km) = plugins.labeled("KeyManager").unwrap().pop().unwrap();
        assert_eq!(
            plugin_data(km).err().unwrap().to_string(),
            "plugins.KeyManager.disk.plugin_cmd: a SPIRE setting Kame does not support"
        );
        let other = parse_root("server {\n admin_idz = 1\n}\n", None)
            .unwrap()
            .section("server")
            .unwrap()
            .unwrap();
        assert_eq!(
            other.finish().unwrap_err().to_string(),
            "server.admin_idz: unknown key"
        );
    }

    #[test]
    fn hcl1_one_line_blocks_and_commas_parse_as_spire_reads_them() {
        let text = r#"plugins { KeyManager "disk" { plugin_data { keys_path = "/k, {x}" } } }
server { bind_port = "8081", log_level = "INFO", ca_subject = { country = ["US", "FR"], organization = ["${X}"] } }
# a comment with { braces, and commas }
"#;
        let mut root = parse_root(text, None).unwrap();
        let mut plugins = root.section("plugins").unwrap().unwrap();
        let (name, mut km) = plugins.labeled("KeyManager").unwrap().pop().unwrap();
        assert_eq!(name, "disk");
        let data = km.section("plugin_data").unwrap().unwrap();
        assert_eq!(data.string("keys_path").unwrap().unwrap(), "/k, {x}");
        let mut server = root.section("server").unwrap().unwrap();
        assert_eq!(server.int("bind_port").unwrap(), Some(8081));
        assert_eq!(server.string("log_level").unwrap().unwrap(), "INFO");
        let subject = server.section("ca_subject").unwrap().unwrap();
        assert_eq!(
            subject.strings("country").unwrap().unwrap(),
            vec!["US".to_string(), "FR".to_string()]
        );
        // Still not HCL: the error is about the text as written.
        let e = parse_root("server { a = }", None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not valid HCL"), "{e}");
    }

    use super::*;

    #[test]
    fn missing_key_names_a_near_miss_as_the_typo() {
        let root = parse_root("database_typ = \"sqlite3\"\nother = 1\n", None).unwrap();
        assert_eq!(
            root.missing("database_type").to_string(),
            "database_typ: unknown key (did you mean database_type?)"
        );
        assert_eq!(
            root.missing("connection_string").to_string(),
            "connection_string: missing required value"
        );
        // A key already read is not a typo of another.
        root.string("database_typ").unwrap();
        assert!(root.misspelt("database_type").is_none());
        assert!(near_miss("keys_pth", "keys_path"));
        assert!(near_miss("regoin", "region"));
        assert!(!near_miss("region", "endpoint"));
    }
}
