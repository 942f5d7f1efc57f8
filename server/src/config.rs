//! `server.conf`: SPIRE's HCL layout and key names, parsed into a typed [`Config`].
//!
//! Every key is checked: an unknown key, a block where a value belongs, or a bad value is an
//! error that names the key (`server.ca_ttl: ...`). `$VAR` / `${VAR}` are expanded from the
//! environment only when asked (`--expand-env`), before parsing, as SPIRE does. Validation has no
//! side effects: nothing is created on disk here.

use hcl::expr::{Expression, ObjectKey};
use kame_api::TrustDomain;
use kame_keymanager::KeyType;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

pub const DEFAULT_SOCKET_PATH: &str = "/tmp/kame-server/private/api.sock";

#[derive(Debug, thiserror::Error)]
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
    #[error("{key}: missing required value")]
    Missing { key: String },
    #[error("{key}: {msg}")]
    Invalid { key: String, msg: String },
}

fn invalid(key: &str, msg: impl Into<String>) -> ConfigError {
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyManagerConfig {
    Memory,
    Disk { keys_path: PathBuf },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataStoreConfig {
    pub database_type: String,
    pub connection_string: String,
}

/// `ca_subject { country = [..] organization = [..] common_name = ".." }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaSubject {
    pub country: Vec<String>,
    pub organization: Vec<String>,
    pub common_name: String,
}

impl CaSubject {
    /// The subject as `C=.., O=.., CN=..` (certificate order).
    pub fn to_dn_string(&self) -> String {
        let mut parts = vec![];
        for c in &self.country {
            parts.push(format!("C={c}"));
        }
        for o in &self.organization {
            parts.push(format!("O={o}"));
        }
        if !self.common_name.is_empty() {
            parts.push(format!("CN={}", self.common_name));
        }
        parts.join(", ")
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub bind_address: IpAddr,
    pub bind_port: u16,
    pub socket_path: PathBuf,
    pub trust_domain: TrustDomain,
    pub data_dir: PathBuf,
    pub log_level: String,
    pub log_format: LogFormat,
    pub ca_ttl: Duration,
    pub default_x509_svid_ttl: Duration,
    pub default_jwt_svid_ttl: Duration,
    pub agent_ttl: Option<Duration>,
    pub ca_key_type: KeyType,
    pub jwt_key_type: KeyType,
    pub ca_subject: CaSubject,
    pub jwt_issuer: Option<String>,
    pub datastore: DataStoreConfig,
    pub key_manager: KeyManagerConfig,
    pub join_token_attestor: bool,
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

/// One HCL body or object, with every key it holds and a record of what was read.
struct Section {
    path: String,
    attrs: BTreeMap<String, Expression>,
    blocks: Vec<(String, Vec<String>, Section)>,
    used: std::cell::RefCell<std::collections::HashSet<String>>,
}

impl Section {
    fn from_body(path: &str, body: hcl::Body) -> Result<Self, ConfigError> {
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

    fn key(&self, k: &str) -> String {
        join(&self.path, k)
    }

    fn take_attr(&self, k: &str) -> Option<&Expression> {
        self.used.borrow_mut().insert(k.to_string());
        self.attrs.get(k)
    }

    fn string(&self, k: &str) -> Result<Option<String>, ConfigError> {
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

    fn strings(&self, k: &str) -> Result<Option<Vec<String>>, ConfigError> {
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

    fn int(&self, k: &str) -> Result<Option<i64>, ConfigError> {
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

    fn duration(&self, k: &str) -> Result<Option<Duration>, ConfigError> {
        self.string(k)?
            .map(|s| parse_duration(&s).map_err(|m| invalid(&self.key(k), m)))
            .transpose()
    }

    /// A nested section given either as a block `k { }` or an attribute `k = { }`.
    fn section(&mut self, k: &str) -> Result<Option<Section>, ConfigError> {
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
    fn labeled(&mut self, k: &str) -> Result<Vec<(String, Section)>, ConfigError> {
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

    /// Fails on any key that was not read.
    fn finish(self) -> Result<(), ConfigError> {
        let used = self.used.borrow();
        if let Some(k) = self.attrs.keys().find(|k| !used.contains(*k)) {
            return Err(ConfigError::UnknownKey { key: self.key(k) });
        }
        if let Some((k, _, _)) = self.blocks.iter().find(|(k, _, _)| !used.contains(k)) {
            return Err(ConfigError::UnknownKey { key: self.key(k) });
        }
        Ok(())
    }
}

fn join(path: &str, k: &str) -> String {
    if path.is_empty() {
        k.to_string()
    } else {
        format!("{path}.{k}")
    }
}

/// A plugin block's `plugin_data` (absent means empty).
fn plugin_data(mut sec: Section) -> Result<Section, ConfigError> {
    let data = sec.section("plugin_data")?;
    let path = sec.key("plugin_data");
    // SPIRE's plugin blocks may also carry `enabled`, `plugin_cmd`, `plugin_checksum`: external
    // plugins are not supported, so those keys are refused as unknown.
    sec.finish()?;
    Ok(data.unwrap_or(Section {
        path,
        attrs: BTreeMap::new(),
        blocks: vec![],
        used: Default::default(),
    }))
}

impl Config {
    pub fn load(path: &std::path::Path, expand: bool) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, expand)
    }

    pub fn parse(text: &str, expand: bool) -> Result<Self, ConfigError> {
        let text = if expand {
            expand_env(text, |k| std::env::var(k).ok())
        } else {
            text.to_string()
        };
        let body = hcl::parse(&text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        let mut root = Section::from_body("", body)?;
        let server = root.section("server")?.ok_or(ConfigError::Missing {
            key: "server".into(),
        })?;
        let mut plugins = root.section("plugins")?.ok_or(ConfigError::Missing {
            key: "plugins".into(),
        })?;
        root.finish()?;
        let mut server = server;

        let trust_domain_s = server.string("trust_domain")?.ok_or(ConfigError::Missing {
            key: "server.trust_domain".into(),
        })?;
        let trust_domain = TrustDomain::parse(&trust_domain_s)
            .map_err(|e| invalid("server.trust_domain", e.to_string()))?;
        if trust_domain_s.contains(':') {
            return Err(invalid(
                "server.trust_domain",
                "expected a trust domain name, not a SPIFFE ID",
            ));
        }
        let bind_address = match server.string("bind_address")? {
            None => "0.0.0.0"
                .parse()
                .map_err(|_| invalid("server.bind_address", "bad default"))?,
            Some(s) => s.parse().map_err(|_| {
                invalid("server.bind_address", format!("{s:?} is not an IP address"))
            })?,
        };
        let bind_port = match server.int("bind_port")? {
            None => 8081,
            Some(p) => u16::try_from(p)
                .map_err(|_| invalid("server.bind_port", format!("{p} is not a port number")))?,
        };
        let socket_path = server
            .string("socket_path")?
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET_PATH));
        if !socket_path.is_absolute() {
            return Err(invalid("server.socket_path", "must be an absolute path"));
        }
        let data_dir = PathBuf::from(server.string("data_dir")?.unwrap_or_else(|| ".".into()));
        let log_level = server.string("log_level")?.unwrap_or_else(|| "INFO".into());
        if !["DEBUG", "INFO", "WARN", "ERROR", "TRACE"].contains(&log_level.to_uppercase().as_str())
        {
            return Err(invalid(
                "server.log_level",
                format!("{log_level:?} is not one of DEBUG, INFO, WARN, ERROR"),
            ));
        }
        let log_format = match server.string("log_format")?.as_deref() {
            None | Some("text") | Some("TEXT") => LogFormat::Text,
            Some("json") | Some("JSON") => LogFormat::Json,
            Some(other) => {
                return Err(invalid(
                    "server.log_format",
                    format!("{other:?} is not text or json"),
                ));
            }
        };
        let nonzero =
            |k: &str, d: Option<Duration>, default: Duration| -> Result<Duration, ConfigError> {
                match d {
                    None => Ok(default),
                    Some(d) if d.as_secs() < 1 => Err(invalid(k, "must be at least 1s")),
                    Some(d) => Ok(d),
                }
            };
        let ca_ttl = nonzero(
            "server.ca_ttl",
            server.duration("ca_ttl")?,
            Duration::from_secs(86400),
        )?;
        let default_x509_svid_ttl = nonzero(
            "server.default_x509_svid_ttl",
            server.duration("default_x509_svid_ttl")?,
            Duration::from_secs(3600),
        )?;
        let default_jwt_svid_ttl = nonzero(
            "server.default_jwt_svid_ttl",
            server.duration("default_jwt_svid_ttl")?,
            Duration::from_secs(300),
        )?;
        let agent_ttl = server
            .duration("agent_ttl")?
            .map(|d| nonzero("server.agent_ttl", Some(d), d))
            .transpose()?;
        let key_type = |k: &str, v: Option<String>| -> Result<Option<KeyType>, ConfigError> {
            v.map(|s| s.parse::<KeyType>().map_err(|e| invalid(k, e.to_string())))
                .transpose()
        };
        let ca_key_type = key_type("server.ca_key_type", server.string("ca_key_type")?)?
            .unwrap_or(KeyType::EcP256);
        let jwt_key_type =
            key_type("server.jwt_key_type", server.string("jwt_key_type")?)?.unwrap_or(ca_key_type);
        let ca_subject = match server.section("ca_subject")? {
            None => CaSubject {
                country: vec!["US".into()],
                organization: vec!["SPIFFE".into()],
                common_name: String::new(),
            },
            Some(s) => {
                let subj = CaSubject {
                    country: s.strings("country")?.unwrap_or_default(),
                    organization: s.strings("organization")?.unwrap_or_default(),
                    common_name: s.string("common_name")?.unwrap_or_default(),
                };
                s.finish()?;
                for v in subj
                    .country
                    .iter()
                    .chain(&subj.organization)
                    .chain([&subj.common_name])
                {
                    if v.contains([',', '=', '+', '"', '\\', '<', '>', ';']) {
                        return Err(invalid(
                            "server.ca_subject",
                            format!("{v:?} has a character that is not allowed"),
                        ));
                    }
                }
                if subj.country.iter().any(|c| c.len() != 2) {
                    return Err(invalid(
                        "server.ca_subject.country",
                        "country codes have two letters",
                    ));
                }
                subj
            }
        };
        kame_api::x509svid::parse_name(&ca_subject.to_dn_string())
            .map_err(|e| invalid("server.ca_subject", e.to_string()))?;
        let jwt_issuer = server.string("jwt_issuer")?.filter(|s| !s.is_empty());
        server.finish()?;

        // plugins
        let mut datastore = None;
        for (name, sec) in plugins.labeled("DataStore")? {
            if name != "sql" {
                return Err(invalid(
                    "plugins.DataStore",
                    format!("unknown DataStore {name:?} (expected \"sql\")"),
                ));
            }
            if datastore.is_some() {
                return Err(invalid(
                    "plugins.DataStore",
                    "only one DataStore may be configured",
                ));
            }
            let data = plugin_data(sec)?;
            let database_type =
                data.string("database_type")?
                    .ok_or_else(|| ConfigError::Missing {
                        key: data.key("database_type"),
                    })?;
            if database_type != "sqlite3" {
                return Err(invalid(
                    &data.key("database_type"),
                    format!("{database_type:?} is not supported (expected \"sqlite3\")"),
                ));
            }
            let connection_string =
                data.string("connection_string")?
                    .ok_or_else(|| ConfigError::Missing {
                        key: data.key("connection_string"),
                    })?;
            if connection_string.is_empty() {
                return Err(invalid(&data.key("connection_string"), "must not be empty"));
            }
            data.finish()?;
            datastore = Some(DataStoreConfig {
                database_type,
                connection_string,
            });
        }
        let datastore = datastore.ok_or(ConfigError::Missing {
            key: "plugins.DataStore".into(),
        })?;

        let mut key_manager = None;
        for (name, sec) in plugins.labeled("KeyManager")? {
            if key_manager.is_some() {
                return Err(invalid(
                    "plugins.KeyManager",
                    "only one KeyManager may be configured",
                ));
            }
            let data = plugin_data(sec)?;
            key_manager = Some(match name.as_str() {
                "memory" => KeyManagerConfig::Memory,
                "disk" => {
                    let p = data
                        .string("keys_path")?
                        .ok_or_else(|| ConfigError::Missing {
                            key: data.key("keys_path"),
                        })?;
                    KeyManagerConfig::Disk {
                        keys_path: PathBuf::from(p),
                    }
                }
                other => {
                    return Err(invalid(
                        "plugins.KeyManager",
                        format!("unknown KeyManager {other:?} (expected \"disk\" or \"memory\")"),
                    ));
                }
            });
            data.finish()?;
        }
        let key_manager = key_manager.ok_or(ConfigError::Missing {
            key: "plugins.KeyManager".into(),
        })?;

        let mut join_token_attestor = false;
        for (name, sec) in plugins.labeled("NodeAttestor")? {
            if name != "join_token" {
                return Err(invalid(
                    "plugins.NodeAttestor",
                    format!("unknown NodeAttestor {name:?} (expected \"join_token\")"),
                ));
            }
            if join_token_attestor {
                return Err(invalid(
                    "plugins.NodeAttestor.join_token",
                    "configured more than once",
                ));
            }
            plugin_data(sec)?.finish()?;
            join_token_attestor = true;
        }
        plugins.finish()?;

        Ok(Config {
            bind_address,
            bind_port,
            socket_path,
            trust_domain,
            data_dir,
            log_level,
            log_format,
            ca_ttl,
            default_x509_svid_ttl,
            default_jwt_svid_ttl,
            agent_ttl,
            ca_key_type,
            jwt_key_type,
            ca_subject,
            jwt_issuer,
            datastore,
            key_manager,
            join_token_attestor,
        })
    }

    /// Warnings about TTL relationships SPIRE also warns about (SVIDs outliving the guaranteed
    /// overlap of two CAs: `min(ca_ttl/6, 7d)`).
    pub fn warnings(&self) -> Vec<String> {
        let max = (self.ca_ttl / 6).min(Duration::from_secs(7 * 86400));
        let mut w = vec![];
        for (k, v) in [
            ("default_x509_svid_ttl", self.default_x509_svid_ttl),
            ("default_jwt_svid_ttl", self.default_jwt_svid_ttl),
        ] {
            if v > max {
                w.push(format!(
                    "{k} ({}s) is longer than ca_ttl/6 ({}s): SVIDs will be cut short at CA expiry",
                    v.as_secs(),
                    max.as_secs()
                ));
            }
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
server {
    bind_address = "127.0.0.1"
    bind_port = "8081"
    socket_path = "/tmp/kame-test/api.sock"
    trust_domain = "example.org"
    data_dir = "./data"
    log_level = "DEBUG"
    ca_ttl = "168h"
    default_x509_svid_ttl = "1h"
    ca_subject {
        country = ["US"]
        organization = ["SPIFFE"]
        common_name = ""
    }
}

plugins {
    DataStore "sql" {
        plugin_data {
            database_type = "sqlite3"
            connection_string = "./data/datastore.sqlite3"
        }
    }
    KeyManager "disk" {
        plugin_data {
            keys_path = "./data/keys.json"
        }
    }
    NodeAttestor "join_token" {
        plugin_data {}
    }
}
"#;

    #[test]
    fn parses_a_spire_style_server_conf() {
        let c = Config::parse(GOOD, false).unwrap();
        assert_eq!(c.trust_domain.as_str(), "example.org");
        assert_eq!(c.bind_port, 8081);
        assert_eq!(c.ca_ttl, Duration::from_secs(168 * 3600));
        assert_eq!(c.default_jwt_svid_ttl, Duration::from_secs(300));
        assert_eq!(c.ca_key_type, KeyType::EcP256);
        assert_eq!(c.jwt_key_type, KeyType::EcP256);
        assert!(c.join_token_attestor);
        assert_eq!(
            c.key_manager,
            KeyManagerConfig::Disk {
                keys_path: "./data/keys.json".into()
            }
        );
        assert_eq!(c.ca_subject.to_dn_string(), "C=US, O=SPIFFE");
    }

    #[test]
    fn config_typo_names_the_key() {
        let bad = GOOD.replace("ca_ttl =", "ca_tll =");
        let e = Config::parse(&bad, false).unwrap_err();
        assert_eq!(e.to_string(), "server.ca_tll: unknown key");
        let bad = GOOD.replace("keys_path", "key_path");
        let e = Config::parse(&bad, false).unwrap_err().to_string();
        assert!(
            e.starts_with("plugins.KeyManager.disk.plugin_data.key"),
            "{e}"
        );
        let bad = GOOD.replace("NodeAttestor \"join_token\"", "NodeAtestor \"join_token\"");
        assert_eq!(
            Config::parse(&bad, false).unwrap_err().to_string(),
            "plugins.NodeAtestor: unknown key"
        );
    }

    #[test]
    fn config_bad_values_name_the_key() {
        for (from, to, key) in [
            ("\"168h\"", "\"168x\"", "server.ca_ttl"),
            ("\"example.org\"", "\"Example.org\"", "server.trust_domain"),
            ("\"8081\"", "\"80811\"", "server.bind_port"),
            ("\"127.0.0.1\"", "\"localhost\"", "server.bind_address"),
            (
                "\"sqlite3\"",
                "\"mysql\"",
                "plugins.DataStore.sql.plugin_data.database_type",
            ),
            ("\"DEBUG\"", "\"LOUD\"", "server.log_level"),
        ] {
            let e = Config::parse(&GOOD.replace(from, to), false)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(key), "{from}->{to}: {e}");
        }
        let e = Config::parse(
            &GOOD.replace("ca_ttl = \"168h\"", "ca_key_type = \"ec-p521\""),
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("server.ca_key_type"), "{e}");
    }

    #[test]
    fn expand_env_only_when_asked() {
        let text = GOOD.replace("\"example.org\"", "\"$KAME_TEST_TD\"");
        let c = Config::parse(
            &expand_env(&text, |k| {
                (k == "KAME_TEST_TD").then(|| "env.example".to_string())
            }),
            false,
        )
        .unwrap();
        assert_eq!(c.trust_domain.as_str(), "env.example");
        assert!(Config::parse(&text, false).is_err());
        assert_eq!(
            expand_env("a${X}b$Y-$", |k| Some(k.to_lowercase())),
            "axby-$"
        );
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("99999999h").is_err());
    }
}
