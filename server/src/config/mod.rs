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

pub use kame_api::conf::{ConfigError, LogFormat, Overrides, expand_env, parse_duration};
use kame_api::conf::{invalid, plugin_data};
use std::path::Path;

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
    pub log_level: kame_api::conf::Level,
    pub log_format: LogFormat,
    /// `log_file`: logs appended to this file instead of stderr.
    pub log_file: Option<std::path::PathBuf>,
    /// `log_source_location`: each event's file and line.
    pub log_source_location: bool,
    /// `audit_log_enabled`: one `kame_audit` event per API call (caller, method, status).
    pub audit_log_enabled: bool,
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
    /// SPIRE's `health_checks` listener, when enabled.
    pub health: Option<kame_api::serving::health::HealthConfig>,
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
    /// `server.transparency { ... }` (ours): the issuance transparency log; off when absent.
    pub transparency: Option<crate::transparency::Settings>,
    /// `server.federation`: the bundle endpoint and the federated trust domains.
    pub federation: crate::federation::FederationConfig,
    /// `server.break_glass { ... }` (ours): reserve SVIDs for agents; off when absent.
    pub break_glass: Option<crate::service::breakglass::Settings>,
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

/// `server.transparency { required, require_agent_scts, tree_head_interval, bind_address,
/// bind_port }` (ours): the issuance transparency log, off without the block.
fn transparency(
    server: &mut kame_api::conf::Section,
) -> Result<Option<crate::transparency::Settings>, ConfigError> {
    let Some(t) = server.section("transparency")? else {
        return Ok(None);
    };
    let d = crate::transparency::Settings::default();
    let tree_head_interval = match t.duration("tree_head_interval")? {
        None => d.tree_head_interval,
        Some(i) if i < Duration::from_millis(100) || i > Duration::from_secs(3600) => {
            return Err(invalid(
                "server.transparency.tree_head_interval",
                "must be from 100ms to 1h",
            ));
        }
        Some(i) => i,
    };
    let port = match t.int("bind_port")? {
        None => None,
        Some(p) => Some(u16::try_from(p).map_err(|_| {
            invalid(
                "server.transparency.bind_port",
                format!("{p} is not a port number"),
            )
        })?),
    };
    let listen = match (t.string("bind_address")?, port) {
        (None, None) => None,
        (Some(a), Some(p)) => Some((a, p)),
        (Some(_), None) => {
            return Err(invalid(
                "server.transparency.bind_port",
                "give bind_port with bind_address",
            ));
        }
        (None, Some(p)) => Some(("127.0.0.1".to_string(), p)),
    };
    let s = crate::transparency::Settings {
        required: t.take_bool("required")?.unwrap_or(d.required),
        require_agent_scts: t
            .take_bool("require_agent_scts")?
            .unwrap_or(d.require_agent_scts),
        tree_head_interval,
        listen,
    };
    t.finish()?;
    Ok(Some(s))
}

/// `server.break_glass { max_extension, slice, node_attestors }` (ours): reserve SVIDs for
/// agents, off without the block. Reserves need the authority to sign leaves directly: with
/// `kms_rooted`, the short-lived intermediate would cap every future slice.
fn break_glass(
    server: &mut kame_api::conf::Section,
    signing_mode: &crate::ca::SigningMode,
) -> Result<Option<crate::service::breakglass::Settings>, ConfigError> {
    let Some(b) = server.section("break_glass")? else {
        return Ok(None);
    };
    let d = crate::service::breakglass::Settings::default();
    let max_extension = b.duration("max_extension")?.unwrap_or(d.max_extension);
    if max_extension < Duration::from_secs(60) || max_extension > Duration::from_secs(7 * 86400) {
        return Err(invalid(
            "server.break_glass.max_extension",
            "must be from 1m to 168h",
        ));
    }
    let slice = b.duration("slice")?.unwrap_or(d.slice.min(max_extension));
    if slice < Duration::from_secs(60) || slice > max_extension {
        return Err(invalid(
            "server.break_glass.slice",
            "must be at least 1m and at most max_extension",
        ));
    }
    if max_extension.as_secs() / slice.as_secs() > crate::service::breakglass::MAX_SLICES {
        return Err(invalid(
            "server.break_glass.slice",
            format!(
                "at most {} slices per max_extension (each is a certificate per entry)",
                crate::service::breakglass::MAX_SLICES
            ),
        ));
    }
    let node_attestors = b.strings("node_attestors")?.unwrap_or(d.node_attestors);
    if node_attestors.is_empty() {
        return Err(invalid(
            "server.break_glass.node_attestors",
            "name at least one node attestor",
        ));
    }
    b.finish()?;
    if matches!(signing_mode, crate::ca::SigningMode::KmsRooted { .. }) {
        return Err(invalid(
            "server.break_glass",
            "needs signing_mode = \"direct\": with kms_rooted, the short-lived intermediate caps every reserve",
        ));
    }
    Ok(Some(crate::service::breakglass::Settings {
        max_extension,
        slice,
        node_attestors,
    }))
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
    pub fn load(path: &Path, expand: bool) -> Result<Self, ConfigError> {
        Self::load_with(path, expand, &Overrides::default())
    }

    /// As [`Config::load`], with the command line's values (`run` flags) over the file's.
    pub fn load_with(path: &Path, expand: bool, flags: &Overrides) -> Result<Self, ConfigError> {
        Self::parse_with(&kame_api::conf::read_file(path)?, expand, flags)
    }

    pub fn parse(text: &str, expand: bool) -> Result<Self, ConfigError> {
        Self::parse_with(text, expand, &Overrides::default())
    }

    /// As [`Config::parse`], with `flags` in place of the `server` section's keys they name.
    pub fn parse_with(text: &str, expand: bool, flags: &Overrides) -> Result<Self, ConfigError> {
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
        let prometheus = kame_api::serving::prometheus::parse(&mut root)?;
        let health = kame_api::serving::health::parse(&mut root)?;
        root.finish()?;
        let mut server = server;
        server.apply(flags);

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
        let log_file = server.nonempty("log_file")?.map(std::path::PathBuf::from);
        let log_source_location = server.take_bool("log_source_location")?.unwrap_or(false);
        let audit_log_enabled = server.take_bool("audit_log_enabled")?.unwrap_or(false);
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
        let transparency = transparency(&mut server)?;
        let jwt_issuer = server.string("jwt_issuer")?.filter(|s| !s.is_empty());
        let signing_mode = signing_mode(&server)?;
        let break_glass = break_glass(&mut server, &signing_mode)?;
        let federation = crate::federation::parse(&mut server, &trust_domain)?;
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
            log_file,
            log_source_location,
            audit_log_enabled,
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
            health,
            datastore,
            key_manager,
            upstream_authority,
            join_token_attestor,
            node_attestors,
            plugin_env,
            ratelimit,
            transparency,
            federation,
            break_glass,
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
mod tests;
