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
use std::sync::Arc;
use std::time::Duration;

pub const DEFAULT_SOCKET_PATH: &str = "/tmp/kame-server/private/api.sock";

pub use kame_api::conf::{ConfigError, LogFormat, expand_env, parse_duration};
use kame_api::conf::{invalid, plugin_data};

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
    /// How X509-SVIDs are signed (`signing_mode`, ours): by the authority key directly, or
    /// (`kms_rooted`) by an in-memory intermediate the authority key certifies.
    pub signing_mode: crate::ca::SigningMode,
    /// `telemetry { Prometheus { host port } }`: where to serve `/metrics`.
    pub prometheus: Option<(String, u16)>,
    /// `plugins.DataStore`, built from its `plugin_data` (opened at start).
    pub datastore: Arc<dyn crate::datastore::sql::DataStorePlugin>,
    /// `plugins.UpstreamAuthority`, when configured (none is built in yet).
    pub upstream_authority: Option<Arc<dyn crate::upstream::UpstreamAuthority>>,
    /// `plugins.KeyManager`, built from its `plugin_data` (opened at start).
    pub key_manager: Arc<dyn crate::keymanager::KeyManagerPlugin>,
    pub join_token_attestor: bool,
    /// The node attestor plugins (besides join_token), by name, built from their
    /// `plugin_data`.
    pub node_attestors: Vec<(String, Arc<dyn crate::attestation::NodeAttestor>)>,
    /// What the plugins were built with (the server connects its trust bundle at start).
    pub plugin_env: crate::catalog::PluginEnv,
    /// `server.ratelimit { attestation, signing }` (SPIRE's; both on by default).
    pub ratelimit: crate::ratelimit::RateLimitConfig,
}

/// `server.ca_subject` (SPIRE's default C=US, O=SPIFFE), checked as a DN.
fn ca_subject(server: &mut kame_api::conf::Section) -> Result<CaSubject, ConfigError> {
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
    Ok(ca_subject)
}

/// `server.ratelimit` (SPIRE's keys; both on by default).
fn ratelimit(
    server: &mut kame_api::conf::Section,
) -> Result<crate::ratelimit::RateLimitConfig, ConfigError> {
    let ratelimit = match server.section("ratelimit")? {
        None => crate::ratelimit::RateLimitConfig::default(),
        Some(r) => {
            let d = crate::ratelimit::RateLimitConfig::default();
            let c = crate::ratelimit::RateLimitConfig {
                attestation: r.take_bool("attestation")?.unwrap_or(d.attestation),
                signing: r.take_bool("signing")?.unwrap_or(d.signing),
            };
            r.finish()?;
            c
        }
    };
    Ok(ratelimit)
}

/// `server.signing_mode` and `signing_intermediate_ttl` (ours).
fn signing_mode(server: &kame_api::conf::Section) -> Result<crate::ca::SigningMode, ConfigError> {
    let intermediate_ttl = match server.duration("signing_intermediate_ttl")? {
        Some(d) if d < Duration::from_secs(300) => {
            return Err(invalid(
                "server.signing_intermediate_ttl",
                "must be at least 5m (each renewal is a backend signature)",
            ));
        }
        other => other,
    };
    let signing_mode = match server.string("signing_mode")?.as_deref() {
        None | Some("") | Some("direct") => {
            if intermediate_ttl.is_some() {
                return Err(invalid(
                    "server.signing_intermediate_ttl",
                    "only with signing_mode = \"kms_rooted\"",
                ));
            }
            crate::ca::SigningMode::Direct
        }
        Some("kms_rooted") => crate::ca::SigningMode::KmsRooted {
            intermediate_ttl: intermediate_ttl.unwrap_or(Duration::from_secs(3600)),
        },
        Some(other) => {
            return Err(invalid(
                "server.signing_mode",
                format!("{other:?} is not \"direct\" or \"kms_rooted\""),
            ));
        }
    };
    Ok(signing_mode)
}

/// The node attestors: `join_token` (built into the Agent API) and the catalogue's plugins,
/// each built from its `plugin_data`.
#[allow(clippy::type_complexity)]
fn node_attestor_configs(
    plugins: &mut kame_api::conf::Section,
    plugin_env: &crate::catalog::PluginEnv,
) -> Result<
    (
        bool,
        Vec<(String, Arc<dyn crate::attestation::NodeAttestor>)>,
    ),
    ConfigError,
> {
    let mut join_token_attestor = false;
    let mut node_attestors: Vec<(String, Arc<dyn crate::attestation::NodeAttestor>)> = vec![];
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
            other => {
                if node_attestors.iter().any(|(n, _)| n == other) {
                    return Err(invalid(&key, "configured more than once"));
                }
                let data = plugin_data(sec)?;
                let built =
                    crate::catalog::node_attestor(other, plugin_env, data).ok_or_else(|| {
                        invalid(
                            "plugins.NodeAttestor",
                            format!(
                                "unknown NodeAttestor {other:?} (expected one of {})",
                                crate::catalog::node_attestor_names()
                            ),
                        )
                    })??;
                node_attestors.push((other.to_string(), built));
            }
        }
    }
    Ok((join_token_attestor, node_attestors))
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
        let mut root = {
            let env = |k: &str| std::env::var(k).ok();
            kame_api::conf::parse_root(text, expand.then_some(&env as kame_api::conf::Env<'_>))?
        };
        let server = root.section("server")?.ok_or(ConfigError::Missing {
            key: "server".into(),
        })?;
        let mut plugins = root.section("plugins")?.ok_or(ConfigError::Missing {
            key: "plugins".into(),
        })?;
        // SPIRE's `telemetry { Prometheus { host, port } }`; other sinks are refused.
        let mut prometheus = None;
        if let Some(mut t) = root.section("telemetry")? {
            if let Some(p) = t.section("Prometheus")? {
                let host = p.string("host")?.unwrap_or_else(|| "localhost".into());
                let port = p
                    .int("port")?
                    .and_then(|n| u16::try_from(n).ok())
                    .ok_or_else(|| {
                        invalid("telemetry.Prometheus.port", "a TCP port is required")
                    })?;
                p.finish()?;
                prometheus = Some((host, port));
            }
            t.finish()?;
        }
        root.finish()?;
        let mut server = server;

        let trust_domain_s = server
            .string("trust_domain")?
            .ok_or_else(|| server.missing("trust_domain"))?;
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
        let ca_subject = ca_subject(&mut server)?;
        let ratelimit = ratelimit(&mut server)?;
        let jwt_issuer = server.string("jwt_issuer")?.filter(|s| !s.is_empty());
        let signing_mode = signing_mode(&server)?;
        server.finish()?;

        let mut plugin_env = crate::catalog::PluginEnv::new(trust_domain.clone());
        plugin_env.data_dir = data_dir.clone();
        use crate::catalog::{DATA_STORES, KEY_MANAGERS, single};
        let datastore = single(&mut plugins, "DataStore", DATA_STORES, &plugin_env)?;
        let key_manager = single(&mut plugins, "KeyManager", KEY_MANAGERS, &plugin_env)?;
        let upstream_authority = crate::catalog::optional(
            &mut plugins,
            "UpstreamAuthority",
            crate::catalog::UPSTREAM_AUTHORITIES,
            &plugin_env,
        )?;
        let (join_token_attestor, node_attestors) =
            node_attestor_configs(&mut plugins, &plugin_env)?;
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
            signing_mode,
            prometheus,
            datastore,
            key_manager,
            upstream_authority,
            join_token_attestor,
            node_attestors,
            plugin_env,
            ratelimit,
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

    fn with_km(block: &str) -> String {
        GOOD.replace(
            "KeyManager \"disk\" {\n        plugin_data {\n            keys_path = \"./data/keys.json\"\n        }\n    }",
            block,
        )
    }

    fn km<T: 'static + Clone>(c: &Config) -> T {
        c.key_manager
            .as_any()
            .downcast_ref::<T>()
            .cloned()
            .expect("the KeyManager configured")
    }

    fn refusals(cases: impl IntoIterator<Item = (String, &'static str)>) {
        for (block, want) in cases {
            let e = Config::parse(&with_km(&block), false)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn km_aws_kms_config_spire_keys_and_refusals() {
        use crate::keymanager::{KeyIdentifier, aws_kms::AwsKms};
        let d = tempfile::tempdir().unwrap();
        let id_file = d.path().join("kms-id");
        let policy = d.path().join("policy.json");
        std::fs::write(&policy, "{\"Version\": \"2012-10-17\"}").unwrap();
        let aws = format!(
            "KeyManager \"aws_kms\" {{\n plugin_data {{\n region = \"us-east-1\"\n key_identifier_file = {:?}\n key_policy_file = {:?}\n key_tags = {{\n team = \"kame\"\n }}\n enable_tag_based_key_discovery = true\n }}\n }}",
            id_file.display().to_string(),
            policy.display().to_string()
        );
        let c: AwsKms = km(&Config::parse(&with_km(&aws), false).unwrap());
        assert_eq!(c.region, "us-east-1");
        assert_eq!(c.access_key_id, None, "the default credential chain");
        assert_eq!(c.key_identifier, KeyIdentifier::File(id_file.clone()));
        assert_eq!(
            c.key_policy.as_deref(),
            Some("{\"Version\": \"2012-10-17\"}")
        );
        assert_eq!(c.key_tags, vec![("team".to_string(), "kame".to_string())]);
        assert!(c.enable_tag_based_key_discovery);
        let id_line = format!("key_identifier_file = {:?}", id_file.display().to_string());
        let policy_line = format!("key_policy_file = {:?}", policy.display().to_string());
        refusals([
            (aws.replace("region = \"us-east-1\"", ""), "region: missing"),
            (
                aws.replace("region", "access_key_id = \"AKIA\"\n region"),
                "secret_access_key: give both",
            ),
            (
                aws.replace(
                    &id_line,
                    "key_identifier_file = \"/x\"\n key_identifier_value = \"v\"",
                ),
                "not both",
            ),
            (
                aws.replace(&id_line, "key_identifier_value = \"bad value!\""),
                "key_identifier_value: only letters",
            ),
            (
                aws.replace(&id_line, "key_identifier_value = \"alias/aws/x\""),
                "must not start with alias/aws/",
            ),
            (
                aws.replace(
                    &id_line,
                    "key_identifier_file = \"/nonexistent-dir/kms-id\"",
                ),
                "plugins.KeyManager.aws_kms.plugin_data.key_identifier_file: /nonexistent-dir/kms-id: directory /nonexistent-dir does not exist",
            ),
            (
                aws.replace(
                    &policy_line,
                    "key_policy_file = \"/nonexistent/policy.json\"",
                ),
                "plugins.KeyManager.aws_kms.plugin_data.key_policy_file: /nonexistent/policy.json: No such file",
            ),
            (aws.replace("team =", "spire-team ="), "reserved prefix"),
            (
                aws.replace("region", "regoin = \"x\"\n region"),
                "plugins.KeyManager.aws_kms.plugin_data.regoin: unknown key",
            ),
        ]);
    }

    #[test]
    fn km_hashicorp_vault_config_spire_keys_and_refusals() {
        use crate::keymanager::hashicorp_vault::HashicorpVault;
        use kame_keymanager::hashicorp_vault::VaultAuth;
        let vault = "KeyManager \"hashicorp_vault\" {\n plugin_data {\n vault_addr = \"https://vault:8200\"\n key_identifier_value = \"s1\"\n approle_auth {\n approle_id = \"r\"\n approle_secret_id = \"secret-xyz\"\n }\n }\n }".to_string();
        let parsed = Config::parse(&with_km(&vault), false).unwrap();
        let c: HashicorpVault = km(&parsed);
        assert_eq!(c.transit_engine_path, "transit");
        assert_eq!(
            c.auth,
            VaultAuth::AppRole {
                mount: "approle".into(),
                role_id: "r".into(),
                secret_id: "secret-xyz".into()
            }
        );
        assert!(!format!("{:?}", parsed.key_manager).contains("secret-xyz"));
        refusals([
            (
                vault.replace("approle_auth {", "token_auth {\n token = \"t\"\n }\n approle_auth {"),
                "exactly one of token_auth",
            ),
            (
                vault.replace(
                    "approle_auth {\n approle_id = \"r\"\n approle_secret_id = \"secret-xyz\"\n }",
                    "",
                ),
                "exactly one of token_auth",
            ),
            (
                vault.replace("vault_addr = \"https://vault:8200\"", ""),
                "vault_addr: missing",
            ),
            (vault.replace("approle_id = \"r\"", ""), "approle_id: missing"),
            (
                vault.replace("approle_id", "approle_idd = \"x\"\n approle_id"),
                "plugins.KeyManager.hashicorp_vault.plugin_data.approle_auth.approle_idd: unknown key",
            ),
            (
                vault.replace("vault_addr", "ca_cert_path = \"/nonexistent/ca.pem\"\n vault_addr"),
                "plugins.KeyManager.hashicorp_vault.plugin_data.ca_cert_path: /nonexistent/ca.pem",
            ),
            (
                vault.replace(
                    "approle_auth {\n approle_id = \"r\"\n approle_secret_id = \"secret-xyz\"\n }",
                    "k8s_auth {\n k8s_auth_role_name = \"kame\"\n token_path = \"/nonexistent/token\"\n }",
                ),
                "plugins.KeyManager.hashicorp_vault.plugin_data.k8s_auth.token_path: /nonexistent/token",
            ),
        ]);
    }

    #[test]
    fn km_pkcs11_config_spire_keys_and_refusals() {
        use crate::keymanager::{KeyIdentifier, SecretSource, pkcs11::Pkcs11};
        let d = tempfile::tempdir().unwrap();
        let module = d.path().join("module.so");
        std::fs::write(&module, b"not really a module").unwrap();
        let p11 = format!(
            "KeyManager \"pkcs11\" {{\n plugin_data {{\n module_path = {:?}\n token_label = \"kame\"\n user_pin_env = \"HSM_PIN\"\n }}\n }}",
            module.display().to_string()
        );
        let c: Pkcs11 = km(&Config::parse(&with_km(&p11), false).unwrap());
        assert_eq!(c.user_pin, SecretSource::Env("HSM_PIN".into()));
        assert_eq!(c.key_identifier, KeyIdentifier::ServerId);
        let with_value = p11.replace("user_pin_env = \"HSM_PIN\"", "user_pin = \"1234\"");
        let parsed = Config::parse(&with_km(&with_value), false).unwrap();
        assert!(
            !format!("{:?}", parsed.key_manager).contains("1234"),
            "the PIN is never printed"
        );
        let module_line = format!("module_path = {:?}", module.display().to_string());
        refusals([
            (
                p11.replace("user_pin_env = \"HSM_PIN\"", ""),
                "user_pin: missing",
            ),
            (
                p11.replace("user_pin_env", "user_pin = \"1\"\n user_pin_env"),
                "give one of user_pin, user_pin_file, user_pin_env",
            ),
            (
                p11.replace(
                    "user_pin_env = \"HSM_PIN\"",
                    "user_pin_file = \"/nonexistent/pin\"",
                ),
                "plugins.KeyManager.pkcs11.plugin_data.user_pin_file: /nonexistent/pin",
            ),
            (
                p11.replace(
                    &module_line,
                    "module_path = \"/nonexistent/libsofthsm2.so\"",
                ),
                "plugins.KeyManager.pkcs11.plugin_data.module_path: /nonexistent/libsofthsm2.so",
            ),
            (
                p11.replace("token_label = \"kame\"", ""),
                "token_label: missing",
            ),
        ]);
    }

    /// The UpstreamAuthority seam is in the catalogue with no built-in yet: configuring one
    /// is refused with the plugin type named, not as an unknown key.
    #[test]
    fn upstream_authority_none_built_in_yet() {
        let c = Config::parse(GOOD, false).unwrap();
        assert!(c.upstream_authority.is_none());
        let with = GOOD.replace(
            "    NodeAttestor \"join_token\"",
            "    UpstreamAuthority \"disk\" {\n        plugin_data {}\n    }\n    NodeAttestor \"join_token\"",
        );
        let e = Config::parse(&with, false).unwrap_err().to_string();
        assert_eq!(
            e,
            "plugins.UpstreamAuthority: unknown UpstreamAuthority \"disk\" (this kame-server has none built in)"
        );
    }

    #[test]
    fn km_disk_and_unknown_names() {
        refusals([
            (
                "KeyManager \"disk\" {\n plugin_data {\n keys_path = \"/nonexistent/keys.json\"\n }\n }".to_string(),
                "plugins.KeyManager.disk.plugin_data.keys_path: /nonexistent/keys.json: directory /nonexistent does not exist",
            ),
            (
                "KeyManager \"memory\" {\n plugin_data {\n keys_path = \"x\"\n }\n }".to_string(),
                "plugins.KeyManager.memory.plugin_data.keys_path: unknown key",
            ),
            (
                "KeyManager \"dsik\" {\n plugin_data {}\n }".to_string(),
                "plugins.KeyManager: unknown KeyManager \"dsik\" (expected one of \"disk\", \"memory\"",
            ),
            (String::new(), "plugins.KeyManager: missing"),
        ]);
        let e = Config::parse(
            &GOOD.replace("DataStore \"sql\"", "DataStore \"sqll\""),
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("plugins.DataStore: unknown DataStore \"sqll\" (expected one of \"sql\")"),
            "{e}"
        );
    }

    #[test]
    fn km_signing_mode_direct_by_default_kms_rooted_with_its_ttl() {
        let c = Config::parse(GOOD, false).unwrap();
        assert_eq!(c.signing_mode, crate::ca::SigningMode::Direct);
        let rooted = GOOD.replace(
            "ca_ttl = \"168h\"",
            "ca_ttl = \"168h\"\n    signing_mode = \"kms_rooted\"",
        );
        assert_eq!(
            Config::parse(&rooted, false).unwrap().signing_mode,
            crate::ca::SigningMode::KmsRooted {
                intermediate_ttl: Duration::from_secs(3600)
            }
        );
        let ttl = rooted.replace(
            "signing_mode = \"kms_rooted\"",
            "signing_mode = \"kms_rooted\"\n    signing_intermediate_ttl = \"15m\"",
        );
        assert_eq!(
            Config::parse(&ttl, false).unwrap().signing_mode,
            crate::ca::SigningMode::KmsRooted {
                intermediate_ttl: Duration::from_secs(900)
            }
        );
        for (text, want) in [
            (
                rooted.replace("kms_rooted", "hsm_rooted"),
                "server.signing_mode",
            ),
            (
                GOOD.replace(
                    "ca_ttl = \"168h\"",
                    "ca_ttl = \"168h\"\n    signing_intermediate_ttl = \"1h\"",
                ),
                "only with signing_mode",
            ),
        ] {
            let e = Config::parse(&text, false).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
    }

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
        let disk: crate::keymanager::disk::Disk = km(&c);
        assert_eq!(disk.keys_path, std::path::PathBuf::from("./data/keys.json"));
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
