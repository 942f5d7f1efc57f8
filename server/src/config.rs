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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyManagerConfig {
    Memory,
    Disk {
        keys_path: PathBuf,
    },
    /// `KeyManager "aws_kms"`: keys in AWS KMS (SPIRE's keys, plus `endpoint`).
    AwsKms {
        region: String,
        access_key_id: Option<String>,
        secret_access_key: Option<SecretSource>,
        endpoint: Option<String>,
        key_identifier: KeyIdentifier,
        key_policy_file: Option<PathBuf>,
        key_tags: Vec<(String, String)>,
        enable_tag_based_key_discovery: bool,
    },
    /// `KeyManager "hashicorp_vault"`: keys in a Vault/OpenBao Transit engine.
    HashicorpVault {
        vault_addr: String,
        namespace: Option<String>,
        ca_cert_path: Option<PathBuf>,
        insecure_skip_verify: bool,
        transit_engine_path: String,
        auth: VaultAuthConfig,
        key_identifier: KeyIdentifier,
    },
    /// `KeyManager "pkcs11"`: keys in an HSM token.
    Pkcs11 {
        module_path: PathBuf,
        token_label: String,
        user_pin: SecretSource,
        key_identifier: KeyIdentifier,
    },
}

/// One of SPIRE's Vault auth blocks.
#[derive(Clone, PartialEq, Eq)]
pub enum VaultAuthConfig {
    Token(String),
    AppRole {
        mount: String,
        role_id: String,
        secret_id: String,
    },
    Cert {
        mount: String,
        role_name: String,
        client_cert_path: PathBuf,
        client_key_path: PathBuf,
    },
    Kubernetes {
        mount: String,
        role: String,
        token_path: PathBuf,
    },
}

impl std::fmt::Debug for VaultAuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VaultAuthConfig::Token(_) => f.write_str("token_auth(***)"),
            VaultAuthConfig::AppRole { mount, .. } => write!(f, "approle_auth({mount})"),
            VaultAuthConfig::Cert { mount, .. } => write!(f, "cert_auth({mount})"),
            VaultAuthConfig::Kubernetes { mount, .. } => write!(f, "k8s_auth({mount})"),
        }
    }
}

/// `hashicorp_vault`'s plugin_data (SPIRE's keys; exactly one auth block).
fn vault_config(data: &mut kame_api::conf::Section) -> Result<KeyManagerConfig, ConfigError> {
    let opt = |data: &kame_api::conf::Section, k: &str| -> Result<Option<String>, ConfigError> {
        Ok(data.string(k)?.filter(|v| !v.is_empty()))
    };
    let req = |data: &kame_api::conf::Section, k: &str| -> Result<String, ConfigError> {
        opt(data, k)?.ok_or_else(|| ConfigError::Missing { key: data.key(k) })
    };
    let vault_addr = req(data, "vault_addr")?;
    let namespace = opt(data, "namespace")?;
    let ca_cert_path = opt(data, "ca_cert_path")?.map(PathBuf::from);
    let insecure_skip_verify = data.take_bool("insecure_skip_verify")?.unwrap_or(false);
    let transit_engine_path = opt(data, "transit_engine_path")?.unwrap_or_else(|| "transit".into());
    let key_identifier = key_identifier(data)?;
    let mut auths = vec![];
    if let Some(a) = data.section("token_auth")? {
        auths.push(VaultAuthConfig::Token(req(&a, "token")?));
        a.finish()?;
    }
    if let Some(a) = data.section("approle_auth")? {
        auths.push(VaultAuthConfig::AppRole {
            mount: opt(&a, "approle_auth_mount_point")?.unwrap_or_else(|| "approle".into()),
            role_id: req(&a, "approle_id")?,
            secret_id: req(&a, "approle_secret_id")?,
        });
        a.finish()?;
    }
    if let Some(a) = data.section("cert_auth")? {
        auths.push(VaultAuthConfig::Cert {
            mount: opt(&a, "cert_auth_mount_point")?.unwrap_or_else(|| "cert".into()),
            role_name: opt(&a, "cert_auth_role_name")?.unwrap_or_default(),
            client_cert_path: PathBuf::from(req(&a, "client_cert_path")?),
            client_key_path: PathBuf::from(req(&a, "client_key_path")?),
        });
        a.finish()?;
    }
    if let Some(a) = data.section("k8s_auth")? {
        auths.push(VaultAuthConfig::Kubernetes {
            mount: opt(&a, "k8s_auth_mount_point")?.unwrap_or_else(|| "kubernetes".into()),
            role: req(&a, "k8s_auth_role_name")?,
            token_path: PathBuf::from(req(&a, "token_path")?),
        });
        a.finish()?;
    }
    if auths.len() != 1 {
        return Err(invalid(
            &data.key("token_auth"),
            "configure exactly one of token_auth, approle_auth, cert_auth, k8s_auth",
        ));
    }
    Ok(KeyManagerConfig::HashicorpVault {
        vault_addr,
        namespace,
        ca_cert_path,
        insecure_skip_verify,
        transit_engine_path,
        auth: auths.remove(0),
        key_identifier,
    })
}

/// Where a secret comes from: the configuration itself, a file, or an environment variable.
/// Read at start-up, never by `validate`; never printed.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    Value(String),
    File(PathBuf),
    Env(String),
}

impl std::fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::Value(_) => f.write_str("Value(***)"),
            SecretSource::File(p) => write!(f, "File({p:?})"),
            SecretSource::Env(v) => write!(f, "Env({v:?})"),
        }
    }
}

impl SecretSource {
    /// The secret (a file's content without its trailing newline).
    pub fn read(&self) -> Result<String, String> {
        match self {
            SecretSource::Value(v) => Ok(v.clone()),
            SecretSource::File(p) => std::fs::read_to_string(p)
                .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
                .map_err(|e| format!("cannot read {}: {e}", p.display())),
            SecretSource::Env(v) => {
                std::env::var(v).map_err(|_| format!("environment variable {v} is not set"))
            }
        }
    }
}

/// How a remote KeyManager names this server's keys (SPIRE's `key_identifier_file` xor
/// `key_identifier_value`); without either, the server id in `data_dir/server_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyIdentifier {
    File(PathBuf),
    Value(String),
    ServerId,
}

/// SPIRE's rule for `key_identifier_value`: letters, digits, `/`, `_`, `-`; at most 256.
fn key_identifier(data: &kame_api::conf::Section) -> Result<KeyIdentifier, ConfigError> {
    let file = data
        .string("key_identifier_file")?
        .filter(|v| !v.is_empty());
    let value = data
        .string("key_identifier_value")?
        .filter(|v| !v.is_empty());
    match (file, value) {
        (Some(_), Some(_)) => Err(invalid(
            &data.key("key_identifier_value"),
            "give key_identifier_file or key_identifier_value, not both",
        )),
        (Some(f), None) => Ok(KeyIdentifier::File(PathBuf::from(f))),
        (None, Some(v)) => {
            if v.len() > 256
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/_-".contains(&b))
            {
                return Err(invalid(
                    &data.key("key_identifier_value"),
                    "only letters, digits, '/', '_' and '-', at most 256 characters",
                ));
            }
            Ok(KeyIdentifier::Value(v))
        }
        (None, None) => Ok(KeyIdentifier::ServerId),
    }
}

/// SPIRE's limits on `key_tags`, checked by the backend's rule.
fn kame_keymanager_tags(key: &str, tags: &[(String, String)]) -> Result<(), ConfigError> {
    kame_keymanager::aws_kms::check_user_tags(tags).map_err(|e| invalid(key, e.to_string()))
}

/// Exactly one of `<name>`, `<name>_file`, `<name>_env`.
fn secret_source(data: &kame_api::conf::Section, name: &str) -> Result<SecretSource, ConfigError> {
    let v = data.string(name)?.filter(|v| !v.is_empty());
    let f = data
        .string(&format!("{name}_file"))?
        .filter(|v| !v.is_empty());
    let e = data
        .string(&format!("{name}_env"))?
        .filter(|v| !v.is_empty());
    match (v, f, e) {
        (Some(v), None, None) => Ok(SecretSource::Value(v)),
        (None, Some(f), None) => Ok(SecretSource::File(PathBuf::from(f))),
        (None, None, Some(e)) => Ok(SecretSource::Env(e)),
        (None, None, None) => Err(ConfigError::Missing {
            key: data.key(name),
        }),
        _ => Err(invalid(
            &data.key(name),
            format!("give one of {name}, {name}_file, {name}_env"),
        )),
    }
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
    /// How X509-SVIDs are signed (`signing_mode`, ours): by the authority key directly, or
    /// (`kms_rooted`) by an in-memory intermediate the authority key certifies.
    pub signing_mode: crate::ca::SigningMode,
    /// `telemetry { Prometheus { host port } }`: where to serve `/metrics`.
    pub prometheus: Option<(String, u16)>,
    pub datastore: DataStoreConfig,
    pub key_manager: KeyManagerConfig,
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

/// `plugins.DataStore "sql"`: SQLite only, its file in a directory that exists or is
/// `data_dir`.
fn datastore_config(
    plugins: &mut kame_api::conf::Section,
    data_dir: &std::path::Path,
) -> Result<DataStoreConfig, ConfigError> {
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
        let database_type = data
            .string("database_type")?
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
        check_datastore_dir(&data.key("connection_string"), &connection_string, data_dir)?;
        data.finish()?;
        datastore = Some(DataStoreConfig {
            database_type,
            connection_string,
        });
    }
    let datastore = datastore.ok_or(ConfigError::Missing {
        key: "plugins.DataStore".into(),
    })?;
    Ok(datastore)
}

/// `plugins.KeyManager`: exactly one of the built-in backends.
fn key_manager_config(
    plugins: &mut kame_api::conf::Section,
) -> Result<KeyManagerConfig, ConfigError> {
    let mut key_manager = None;
    for (name, sec) in plugins.labeled("KeyManager")? {
        if key_manager.is_some() {
            return Err(invalid(
                "plugins.KeyManager",
                "only one KeyManager may be configured",
            ));
        }
        let mut data = plugin_data(sec)?;
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
            "aws_kms" => {
                let region = data
                    .string("region")?
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| ConfigError::Missing {
                        key: data.key("region"),
                    })?;
                let access_key_id = data.string("access_key_id")?.filter(|v| !v.is_empty());
                let secret_access_key = data
                    .string("secret_access_key")?
                    .filter(|v| !v.is_empty())
                    .map(SecretSource::Value);
                if access_key_id.is_some() != secret_access_key.is_some() {
                    return Err(invalid(
                        &data.key("secret_access_key"),
                        "give both access_key_id and secret_access_key, or neither (the default AWS credential chain)",
                    ));
                }
                let mut key_tags = vec![];
                if let Some(tags) = data.section("key_tags")? {
                    for k in tags.keys() {
                        key_tags.push((k.clone(), tags.string(&k)?.unwrap_or_default()));
                    }
                    tags.finish()?;
                }
                kame_keymanager_tags(&data.key("key_tags"), &key_tags)?;
                let endpoint = data.string("endpoint")?.filter(|v| !v.is_empty());
                let key_policy_file = data
                    .string("key_policy_file")?
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from);
                let enable_tag_based_key_discovery = data
                    .take_bool("enable_tag_based_key_discovery")?
                    .unwrap_or(false);
                let key_identifier = key_identifier(&data)?;
                if let KeyIdentifier::Value(v) = &key_identifier
                    && v.starts_with("alias/aws/")
                {
                    return Err(invalid(
                        &data.key("key_identifier_value"),
                        "must not start with alias/aws/",
                    ));
                }
                KeyManagerConfig::AwsKms {
                    region,
                    access_key_id,
                    secret_access_key,
                    endpoint,
                    key_identifier,
                    key_policy_file,
                    key_tags,
                    enable_tag_based_key_discovery,
                }
            }
            "hashicorp_vault" => vault_config(&mut data)?,
            "pkcs11" => {
                let req = |k: &str| -> Result<String, ConfigError> {
                    data.string(k)?
                        .filter(|v| !v.is_empty())
                        .ok_or_else(|| ConfigError::Missing { key: data.key(k) })
                };
                KeyManagerConfig::Pkcs11 {
                    module_path: PathBuf::from(req("module_path")?),
                    token_label: req("token_label")?,
                    user_pin: secret_source(&data, "user_pin")?,
                    key_identifier: key_identifier(&data)?,
                }
            }
            other => {
                return Err(invalid(
                    "plugins.KeyManager",
                    format!(
                        "unknown KeyManager {other:?} (expected \"disk\", \"memory\", \"aws_kms\", \"hashicorp_vault\" or \"pkcs11\")"
                    ),
                ));
            }
        });
        data.finish()?;
    }
    let key_manager = key_manager.ok_or(ConfigError::Missing {
        key: "plugins.KeyManager".into(),
    })?;

    Ok(key_manager)
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

/// The SQLite file's directory must exist, or be `data_dir` (which the server creates): a
/// typo in the path must not start the server on a fresh, empty datastore.
fn check_datastore_dir(
    key: &str,
    connection_string: &str,
    data_dir: &std::path::Path,
) -> Result<(), ConfigError> {
    let path = connection_string
        .strip_prefix("sqlite://")
        .or_else(|| connection_string.strip_prefix("sqlite:"))
        .map(|p| p.split('?').next().unwrap_or(p))
        .unwrap_or(connection_string);
    if path.is_empty() || path == ":memory:" {
        return Ok(());
    }
    let dir = match std::path::Path::new(path).parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => return Ok(()),
    };
    let same = |a: &std::path::Path, b: &std::path::Path| {
        a.components()
            .filter(|c| *c != std::path::Component::CurDir)
            .eq(b
                .components()
                .filter(|c| *c != std::path::Component::CurDir))
    };
    if dir.is_dir() || same(dir, data_dir) {
        return Ok(());
    }
    Err(invalid(
        key,
        format!(
            "directory {} does not exist (only data_dir is created at start)",
            dir.display()
        ),
    ))
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
        let ca_subject = ca_subject(&mut server)?;
        let ratelimit = ratelimit(&mut server)?;
        let jwt_issuer = server.string("jwt_issuer")?.filter(|s| !s.is_empty());
        let signing_mode = signing_mode(&server)?;
        server.finish()?;

        let datastore = datastore_config(&mut plugins, &data_dir)?;
        let key_manager = key_manager_config(&mut plugins)?;
        let plugin_env = crate::catalog::PluginEnv::new(trust_domain.clone());
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

    #[test]
    fn km_aws_kms_vault_and_pkcs11_config_spire_keys_and_refusals() {
        let aws = "KeyManager \"aws_kms\" {\n plugin_data {\n region = \"us-east-1\"\n key_identifier_file = \"/var/lib/kame/kms-id\"\n key_tags = {\n team = \"kame\"\n }\n enable_tag_based_key_discovery = true\n }\n }";
        let c = Config::parse(&with_km(aws), false).unwrap();
        match c.key_manager {
            KeyManagerConfig::AwsKms {
                region,
                access_key_id,
                key_identifier,
                key_tags,
                enable_tag_based_key_discovery,
                ..
            } => {
                assert_eq!(region, "us-east-1");
                assert_eq!(access_key_id, None, "the default credential chain");
                assert_eq!(
                    key_identifier,
                    KeyIdentifier::File("/var/lib/kame/kms-id".into())
                );
                assert_eq!(key_tags, vec![("team".to_string(), "kame".to_string())]);
                assert!(enable_tag_based_key_discovery);
            }
            other => panic!("{other:?}"),
        }
        let cases = [
            (aws.replace("region = \"us-east-1\"", ""), "region: missing"),
            (
                aws.replace("region", "access_key_id = \"AKIA\"\n region"),
                "secret_access_key: give both",
            ),
            (
                aws.replace(
                    "key_identifier_file = \"/var/lib/kame/kms-id\"",
                    "key_identifier_file = \"/x\"\n key_identifier_value = \"v\"",
                ),
                "not both",
            ),
            (
                aws.replace(
                    "key_identifier_file = \"/var/lib/kame/kms-id\"",
                    "key_identifier_value = \"bad value!\"",
                ),
                "key_identifier_value: only letters",
            ),
            (aws.replace("team =", "spire-team ="), "reserved prefix"),
            (
                aws.replace("region", "regoin = \"x\"\n region"),
                "regoin: unknown key",
            ),
        ];
        for (block, want) in cases {
            let e = Config::parse(&with_km(&block), false)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
        let vault = "KeyManager \"hashicorp_vault\" {\n plugin_data {\n vault_addr = \"https://vault:8200\"\n key_identifier_value = \"s1\"\n approle_auth {\n approle_id = \"r\"\n approle_secret_id = \"secret-xyz\"\n }\n }\n }";
        let c = Config::parse(&with_km(vault), false).unwrap();
        match &c.key_manager {
            KeyManagerConfig::HashicorpVault {
                transit_engine_path,
                auth,
                ..
            } => {
                assert_eq!(transit_engine_path, "transit");
                assert_eq!(
                    auth,
                    &VaultAuthConfig::AppRole {
                        mount: "approle".into(),
                        role_id: "r".into(),
                        secret_id: "secret-xyz".into()
                    }
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(!format!("{:?}", c.key_manager).contains("secret-xyz"));
        for (block, want) in [
            (
                vault.replace(
                    "approle_auth {",
                    "token_auth {\n token = \"t\"\n }\n approle_auth {",
                ),
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
            (
                vault.replace("approle_id = \"r\"", ""),
                "approle_id: missing",
            ),
        ] {
            let e = Config::parse(&with_km(&block), false)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
        let p11 = "KeyManager \"pkcs11\" {\n plugin_data {\n module_path = \"/usr/lib/softhsm/libsofthsm2.so\"\n token_label = \"kame\"\n user_pin_env = \"HSM_PIN\"\n }\n }";
        let c = Config::parse(&with_km(p11), false).unwrap();
        let KeyManagerConfig::Pkcs11 {
            user_pin,
            key_identifier,
            ..
        } = &c.key_manager
        else {
            panic!("{:?}", c.key_manager)
        };
        assert_eq!(user_pin, &SecretSource::Env("HSM_PIN".into()));
        assert_eq!(key_identifier, &KeyIdentifier::ServerId);
        let with_value = p11.replace("user_pin_env = \"HSM_PIN\"", "user_pin = \"1234\"");
        let c = Config::parse(&with_km(&with_value), false).unwrap();
        assert!(
            !format!("{:?}", c.key_manager).contains("1234"),
            "the PIN is never printed"
        );
        for (block, want) in [
            (
                p11.replace("user_pin_env = \"HSM_PIN\"", ""),
                "user_pin: missing",
            ),
            (
                p11.replace("user_pin_env", "user_pin = \"1\"\n user_pin_env"),
                "give one of user_pin, user_pin_file, user_pin_env",
            ),
            (
                p11.replace("token_label = \"kame\"", ""),
                "token_label: missing",
            ),
        ] {
            let e = Config::parse(&with_km(&block), false)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
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

    /// A typo in the datastore path is refused, not a fresh empty datastore: its directory
    /// must exist or be data_dir.
    #[test]
    fn datastore_directory_must_exist_or_be_data_dir() {
        let d = tempfile::tempdir().unwrap();
        let k = "plugins.DataStore.sql.plugin_data.connection_string";
        let dd = d.path().join("data");
        check_datastore_dir(k, &dd.join("ds.sqlite3").display().to_string(), &dd).unwrap();
        check_datastore_dir(k, "./data/ds.sqlite3", std::path::Path::new("data")).unwrap();
        check_datastore_dir(k, &d.path().join("ds.sqlite3").display().to_string(), &dd).unwrap();
        check_datastore_dir(k, "ds.sqlite3", &dd).unwrap();
        let e = check_datastore_dir(
            k,
            &d.path().join("dta/ds.sqlite3").display().to_string(),
            &dd,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with(k) && e.contains("dta") && e.contains("does not exist"),
            "{e}"
        );
        let e = check_datastore_dir(k, "sqlite:///nonexistent/ds.sqlite3?mode=rwc", &dd)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent"), "{e}");
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
