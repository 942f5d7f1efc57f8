//! `server.conf`: SPIRE's HCL layout and key names, parsed into a typed [`Config`].
//!
//! Every key is checked: an unknown key, a block where a value belongs, or a bad value is an
//! error that names the key (`server.ca_ttl: ...`). `$VAR` / `${VAR}` are expanded from the
//! environment only when asked (`--expand-env`), before parsing, as SPIRE does. Validation has no
//! side effects: nothing is created on disk here.

use kame_api::TrustDomain;
use kame_keymanager::KeyType;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

pub const DEFAULT_SOCKET_PATH: &str = "/tmp/kame-server/private/api.sock";

pub use kame_api::conf::{ConfigError, LogFormat, expand_env, parse_duration};
use kame_api::conf::{invalid, plugin_data};

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
    pub tpm_devid: Option<TpmDevidConfig>,
}

/// `NodeAttestor "tpm_devid"` (SPIRE's keys, plus ours: `compat_mode`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmDevidConfig {
    /// PEM bundle of DevID trust anchors.
    pub devid_ca_path: PathBuf,
    /// PEM bundle of EK roots and vendor intermediates.
    pub endorsement_ca_path: PathBuf,
    /// SPIRE parity: skip the binding checks SPIRE lacks.
    pub compat_mode: bool,
    /// EKs trusted without a certificate: one SHA-256 (hex) of the EK's SPKI DER per line.
    pub ek_allow_list_path: Option<PathBuf>,
    /// Refuse agents that do not speak Kame's v2 (certify bound to the nonce, PCR quote).
    pub require_quote: bool,
    /// Expected SHA-256 PCR values by index (`pcr_policy { sha256 = { "7" = "<hex>" } }`).
    pub pcr_policy: std::collections::BTreeMap<u32, Vec<u8>>,
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
        let mut root = kame_api::conf::parse_root(text, expand)?;
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
        let log_level = kame_api::conf::log_level(&server)?;
        let log_format = kame_api::conf::log_format(&server)?;
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
        let mut tpm_devid = None;
        for (name, sec) in plugins.labeled("NodeAttestor")? {
            let key = format!("plugins.NodeAttestor.{name}");
            match name.as_str() {
                "join_token" => {
                    if join_token_attestor {
                        return Err(invalid(&key, "configured more than once"));
                    }
                    plugin_data(sec)?.finish()?;
                    join_token_attestor = true;
                }
                "tpm_devid" => {
                    if tpm_devid.is_some() {
                        return Err(invalid(&key, "configured more than once"));
                    }
                    let data = plugin_data(sec)?;
                    let path = |k: &str| -> Result<PathBuf, ConfigError> {
                        data.string(k)?
                            .filter(|v| !v.is_empty())
                            .map(PathBuf::from)
                            .ok_or(ConfigError::Missing { key: data.key(k) })
                    };
                    let devid_ca_path = path("devid_ca_path")?;
                    let endorsement_ca_path = path("endorsement_ca_path")?;
                    let compat_mode = data.take_bool("compat_mode")?.unwrap_or(false);
                    let ek_allow_list_path = data
                        .string("ek_allow_list_path")?
                        .filter(|v| !v.is_empty())
                        .map(PathBuf::from);
                    let require_quote = data.take_bool("require_quote")?.unwrap_or(false);
                    let mut pcr_policy = std::collections::BTreeMap::new();
                    let mut data = data;
                    if let Some(mut pol) = data.section("pcr_policy")? {
                        if let Some(sha) = pol.section("sha256")? {
                            for k in sha.keys() {
                                let key = sha.key(&k);
                                let i: u32 = k
                                    .parse()
                                    .ok()
                                    .filter(|i| *i < 24)
                                    .ok_or_else(|| invalid(&key, "not a PCR index (0-23)"))?;
                                let v = sha.string(&k)?.unwrap_or_default();
                                let b = hex::decode(v.trim())
                                    .ok()
                                    .filter(|b| b.len() == 32)
                                    .ok_or_else(|| {
                                        invalid(&key, "expected a SHA-256 value in hex")
                                    })?;
                                pcr_policy.insert(i, b);
                            }
                            sha.finish()?;
                        }
                        pol.finish()?;
                    }
                    data.finish()?;
                    tpm_devid = Some(TpmDevidConfig {
                        devid_ca_path,
                        endorsement_ca_path,
                        compat_mode,
                        ek_allow_list_path,
                        require_quote,
                        pcr_policy,
                    });
                }
                _ => {
                    return Err(invalid(
                        "plugins.NodeAttestor",
                        format!(
                            "unknown NodeAttestor {name:?} (expected \"join_token\" or \"tpm_devid\")"
                        ),
                    ));
                }
            }
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
            tpm_devid,
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
