//! `agent.conf`: SPIRE's agent HCL layout and key names, parsed into a typed [`Config`]. Every
//! key is checked: an unknown key or a bad value is an error naming it
//! (`agent.server_port: ...`). Parsing has no side effects: nothing is created on disk here.

use kame_api::TrustDomain;
pub use kame_api::conf::Overrides;
use kame_api::conf::{ConfigError, LogFormat, Section, invalid, single_plugin};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_SOCKET_PATH: &str = "/tmp/kame-agent/public/api.sock";

/// Where the agent keeps its private keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyManagerConfig {
    /// Keys only in memory: a restart must attest again; nothing secret touches the disk.
    Memory,
    /// Keys (the agent's and the cached workload SVIDs') in `directory`, 0600, atomic writes.
    Disk { directory: PathBuf },
}

/// The `unix` workload attestor's settings (SPIRE's names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixAttestorConfig {
    /// Emit `unix:path` and `unix:sha256` selectors.
    pub discover_workload_path: bool,
    /// Largest binary to hash for `unix:sha256`, in bytes; 0 means no limit.
    pub workload_size_limit: u64,
}

#[derive(Debug, Clone)]
pub enum NodeAttestorConfig {
    JoinToken,
    /// A plugin of the [`crate::catalog`], built from its `plugin_data`.
    Plugin(std::sync::Arc<dyn crate::attestation::AgentAttestor>),
}

#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub server_address: String,
    pub server_port: u16,
    /// Every server to try, in order: `server_address:server_port` first, then the entries
    /// of `server_addresses` (ours), each `host:port` or a host on `server_port`.
    pub servers: Vec<(String, u16)>,
    pub socket_path: PathBuf,
    pub trust_bundle_path: PathBuf,
    /// `transparency_log_keys` (ours): PEM files of transparency log public keys; with any,
    /// the server's X509-SVID must carry a valid SCT from one of those logs.
    pub transparency_log_keys: Vec<Vec<u8>>,
    pub trust_domain: TrustDomain,
    pub join_token: Option<kame_api::Secret>,
    pub log_level: kame_api::conf::Level,
    pub log_format: LogFormat,
    /// `log_file`: logs appended to this file instead of stderr.
    pub log_file: Option<std::path::PathBuf>,
    /// `log_source_location`: each event's file and line.
    pub log_source_location: bool,
    /// SPIRE's `health_checks` listener, when enabled.
    pub health: Option<kame_api::serving::health::HealthConfig>,
    /// `telemetry { Prometheus { host port } }`: where to serve `/metrics`.
    pub prometheus: Option<(String, u16)>,
    /// How often the agent syncs with the server (ours; SPIRE's is fixed at 5 s).
    pub sync_interval: Duration,
    pub node_attestor: NodeAttestorConfig,
    pub key_manager: KeyManagerConfig,
    pub unix: UnixAttestorConfig,
    /// `agent.sds` (Envoy SDS on the Workload API socket).
    pub sds: crate::sds::SdsConfig,
    /// `admin_socket_path` (SPIRE's name): the admin socket (0600), where `kame-agent
    /// break-glass` talks to the agent.
    pub admin_socket_path: Option<PathBuf>,
    /// `agent.break_glass { outage, max_duration, require_token }` (ours).
    pub break_glass: Option<crate::breakglass::BreakGlassConfig>,
}

/// `host:port`, `[v6]:port` or a bare host on `default_port`.
fn host_port(s: &str, default_port: u16) -> Result<(String, u16), String> {
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{p:?} is not a port number"))
    };
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| "unclosed \"[\"".to_string())?;
        return match after.strip_prefix(':') {
            Some(p) => Ok((host.to_string(), port(p)?)),
            None if after.is_empty() => Ok((host.to_string(), default_port)),
            None => Err("expected \":port\" after \"]\"".into()),
        };
    }
    let (host, p) = match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, Some(p)),
        Some(_) => return Err("an IPv6 address needs brackets: [addr]:port".into()),
        None => (s, None),
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err("not a host name or address".into());
    }
    Ok((
        host.to_string(),
        p.map(port).transpose()?.unwrap_or(default_port),
    ))
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

    /// As [`Config::parse`], with `flags` in place of the `agent` section's keys they name.
    pub fn parse_with(text: &str, expand: bool, flags: &Overrides) -> Result<Self, ConfigError> {
        let mut root = {
            let env = |k: &str| std::env::var(k).ok();
            kame_api::conf::parse_root(text, expand.then_some(&env as kame_api::conf::Env<'_>))?
        };
        let mut agent = root.section("agent")?.ok_or(ConfigError::Missing {
            key: "agent".into(),
        })?;
        agent.apply(flags);
        let mut plugins = root.section("plugins")?.ok_or(ConfigError::Missing {
            key: "plugins".into(),
        })?;
        let health = kame_api::serving::health::parse(&mut root)?;
        let prometheus = kame_api::serving::prometheus::parse(&mut root)?;
        root.finish()?;

        let td_s = agent.required("trust_domain")?;
        if td_s.contains(':') {
            return Err(invalid(
                "agent.trust_domain",
                "expected a trust domain name, not a SPIFFE ID",
            ));
        }
        let trust_domain =
            TrustDomain::parse(&td_s).map_err(|e| invalid("agent.trust_domain", e.to_string()))?;
        let more = agent.strings("server_addresses")?.unwrap_or_default();
        let server_address = match agent.nonempty("server_address")? {
            Some(a) => a,
            None if !more.is_empty() => String::new(),
            None => agent.required("server_address")?,
        };
        let server_port = match agent.int("server_port")? {
            None => 8081,
            Some(p) => u16::try_from(p)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| invalid("agent.server_port", format!("{p} is not a port number")))?,
        };
        let mut servers = vec![];
        if !server_address.is_empty() {
            servers.push((server_address.clone(), server_port));
        }
        for a in &more {
            let t = host_port(a, server_port)
                .map_err(|m| invalid("agent.server_addresses", format!("{a:?}: {m}")))?;
            if !servers.contains(&t) {
                servers.push(t);
            }
        }
        let socket_path = agent
            .string("socket_path")?
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET_PATH));
        if !socket_path.is_absolute() {
            return Err(invalid("agent.socket_path", "must be an absolute path"));
        }
        let data_dir = PathBuf::from(agent.string("data_dir")?.unwrap_or_else(|| ".".into()));
        let trust_bundle_path = PathBuf::from(agent.required("trust_bundle_path")?);
        let transparency_log_keys = agent
            .strings("transparency_log_keys")?
            .unwrap_or_default()
            .iter()
            .map(|p| log_key(std::path::Path::new(p)))
            .collect::<Result<Vec<_>, _>>()?;
        let join_token = agent.string("join_token")?.filter(|t| !t.is_empty());
        // SPIRE's `join_token_file`: the token read from a file (kept out of the command line
        // and the configuration); one of the two at most.
        let join_token = match (join_token, agent.nonempty("join_token_file")?) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "agent.join_token_file",
                    "only one of join_token or join_token_file can be specified, not both",
                ));
            }
            (t, None) => t,
            (None, Some(f)) => {
                let t = std::fs::read_to_string(&f).map_err(|e| {
                    invalid(
                        "agent.join_token_file",
                        format!("unable to read join token file {f:?}: {e}"),
                    )
                })?;
                let t = t.trim().to_string();
                if t.is_empty() {
                    return Err(invalid(
                        "agent.join_token_file",
                        format!("{f:?} holds no token"),
                    ));
                }
                Some(t)
            }
        }
        .map(kame_api::Secret::new);
        let log_level = kame_api::conf::log_level(&agent)?;
        let log_format = kame_api::conf::log_format(&agent)?;
        let log_file = agent.nonempty("log_file")?.map(std::path::PathBuf::from);
        let log_source_location = agent.take_bool("log_source_location")?.unwrap_or(false);
        let sync_interval = match agent.duration("sync_interval")? {
            None => Duration::from_secs(5),
            Some(d) if d < Duration::from_millis(100) => {
                return Err(invalid("agent.sync_interval", "must be at least 100ms"));
            }
            Some(d) => d,
        };
        let sds = match agent.section("sds")? {
            None => crate::sds::SdsConfig::default(),
            Some(x) => {
                let d = crate::sds::SdsConfig::default();
                let name = |k: &str, default: String| -> Result<String, ConfigError> {
                    Ok(x.nonempty(k)?.unwrap_or(default))
                };
                let c = crate::sds::SdsConfig {
                    default_svid_name: name("default_svid_name", d.default_svid_name)?,
                    default_bundle_name: name("default_bundle_name", d.default_bundle_name)?,
                    default_all_bundles_name: name(
                        "default_all_bundles_name",
                        d.default_all_bundles_name,
                    )?,
                    disable_spiffe_cert_validation: x
                        .take_bool("disable_spiffe_cert_validation")?
                        .unwrap_or(false),
                };
                x.finish()?;
                c
            }
        };
        let admin_socket_path = agent.nonempty("admin_socket_path")?.map(PathBuf::from);
        if let Some(p) = &admin_socket_path {
            if !p.is_absolute() {
                return Err(invalid(
                    "agent.admin_socket_path",
                    "must be an absolute path",
                ));
            }
            if *p == socket_path {
                return Err(invalid(
                    "agent.admin_socket_path",
                    "must not be the Workload API socket_path",
                ));
            }
        }
        let break_glass = match agent.section("break_glass")? {
            None => None,
            Some(b) => {
                let d = crate::breakglass::BreakGlassConfig::default();
                let outage = b.duration("outage")?.unwrap_or(d.outage);
                if outage < Duration::from_secs(1) {
                    return Err(invalid("agent.break_glass.outage", "must be at least 1s"));
                }
                let max_duration = b.duration("max_duration")?.unwrap_or(d.max_duration);
                if max_duration.is_zero() || max_duration > Duration::from_secs(7 * 86400) {
                    return Err(invalid(
                        "agent.break_glass.max_duration",
                        "must be from 1s to 168h",
                    ));
                }
                if outage <= sync_interval {
                    return Err(invalid(
                        "agent.break_glass.outage",
                        "must be longer than agent.sync_interval (a sync must have failed)",
                    ));
                }
                let c = crate::breakglass::BreakGlassConfig {
                    outage,
                    max_duration,
                    require_token: b.take_bool("require_token")?.unwrap_or(d.require_token),
                };
                b.finish()?;
                if admin_socket_path.is_none() {
                    return Err(invalid(
                        "agent.break_glass",
                        "needs agent.admin_socket_path (where kame-agent break-glass talks to the agent)",
                    ));
                }
                Some(c)
            }
        };
        // SPIRE keys that have no meaning here are refused as unknown by `finish`.
        agent.finish()?;

        let (name, data) = single_plugin(&mut plugins, "NodeAttestor")?;
        let node_attestor = match name.as_str() {
            // A join_token agent without a token is allowed here: restarting with a cached
            // SVID needs none. Whether it can attest is checked at start.
            "join_token" => {
                data.finish()?;
                NodeAttestorConfig::JoinToken
            }
            other => NodeAttestorConfig::Plugin(
                crate::catalog::node_attestor(other, data).ok_or_else(|| {
                    invalid(
                        "plugins.NodeAttestor",
                        format!(
                            "unknown NodeAttestor {other:?} (expected one of {})",
                            crate::catalog::node_attestor_names()
                        ),
                    )
                })??,
            ),
        };

        let key_manager = crate::catalog::single(
            &mut plugins,
            "KeyManager",
            crate::catalog::KEY_MANAGERS,
            &data_dir,
        )?;
        let unix = crate::catalog::single(
            &mut plugins,
            "WorkloadAttestor",
            crate::catalog::WORKLOAD_ATTESTORS,
            &data_dir,
        )?;
        plugins.finish()?;

        Ok(Config {
            sds,
            admin_socket_path,
            break_glass,
            data_dir,
            server_address,
            server_port,
            servers,
            socket_path,
            trust_bundle_path,
            transparency_log_keys,
            trust_domain,
            join_token,
            log_level,
            log_format,
            log_file,
            log_source_location,
            health,
            prometheus,
            sync_interval,
            node_attestor,
            key_manager,
            unix,
        })
    }
}

/// `KeyManager "memory"`: no settings.
pub fn memory_key_manager(_: &Path, data: Section) -> Result<KeyManagerConfig, ConfigError> {
    data.finish()?;
    Ok(KeyManagerConfig::Memory)
}

/// `KeyManager "disk"`: `directory`, by default `data_dir`.
pub fn disk_key_manager(data_dir: &Path, data: Section) -> Result<KeyManagerConfig, ConfigError> {
    let directory = data
        .string("directory")?
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| data_dir.to_path_buf());
    data.finish()?;
    Ok(KeyManagerConfig::Disk { directory })
}

/// `WorkloadAttestor "unix"`: SPIRE's `discover_workload_path` and `workload_size_limit`.
pub fn unix_workload_attestor(_: &Path, data: Section) -> Result<UnixAttestorConfig, ConfigError> {
    let discover_workload_path = data
        .take_bool("discover_workload_path")?
        .unwrap_or_default();
    let workload_size_limit = match data.int("workload_size_limit")? {
        None => 0,
        Some(n) if n < 0 => {
            return Err(invalid(
                &data.key("workload_size_limit"),
                "must not be negative",
            ));
        }
        Some(n) => n as u64,
    };
    data.finish()?;
    Ok(UnixAttestorConfig {
        discover_workload_path,
        workload_size_limit,
    })
}

/// A transparency log's public key from a PEM file, as SubjectPublicKeyInfo DER.
fn log_key(path: &std::path::Path) -> Result<Vec<u8>, ConfigError> {
    kame_api::ct::log_key_from_pem(&kame_api::conf::read_file(path)?).map_err(|e| {
        invalid(
            "agent.transparency_log_keys",
            format!("{}: {e}", path.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
agent {
    data_dir = "/var/lib/kame-agent"
    server_address = "127.0.0.1"
    server_port = "8081"
    socket_path = "/tmp/kame-agent/public/api.sock"
    trust_bundle_path = "/etc/kame/bundle.pem"
    trust_domain = "example.org"
    join_token = "abc"
    log_level = "DEBUG"
}
plugins {
    NodeAttestor "join_token" {
        plugin_data {}
    }
    KeyManager "disk" {
        plugin_data {
            directory = "/var/lib/kame-agent/keys"
        }
    }
    WorkloadAttestor "unix" {
        plugin_data {
            discover_workload_path = true
            workload_size_limit = 1048576
        }
    }
}
"#;

    #[test]
    fn config_reads_spire_agent_keys() {
        let c = Config::parse(GOOD, false).unwrap();
        assert_eq!(c.server_port, 8081);
        assert_eq!(c.trust_domain.to_string(), "example.org");
        assert_eq!(c.join_token.as_ref().map(|t| t.expose()), Some("abc"));
        assert_eq!(
            c.key_manager,
            KeyManagerConfig::Disk {
                directory: "/var/lib/kame-agent/keys".into()
            }
        );
        assert!(c.unix.discover_workload_path);
        assert_eq!(c.unix.workload_size_limit, 1 << 20);
        assert_eq!(c.sync_interval, Duration::from_secs(5));
        assert_eq!(c.sds, crate::sds::SdsConfig::default());
    }

    /// `admin_socket_path` and `agent.break_glass`: off without the block; defaults; each
    /// refusal names its key.
    #[test]
    fn config_break_glass_block_needs_the_admin_socket() {
        let with = |block: &str| {
            GOOD.replace(
                "    log_level = \"DEBUG\"",
                &format!("    log_level = \"DEBUG\"\n{block}"),
            )
        };
        let c = Config::parse(GOOD, false).unwrap();
        assert_eq!((c.admin_socket_path, c.break_glass), (None, None));
        let sock = "admin_socket_path = \"/run/kame/admin.sock\"\n";
        let c = Config::parse(&with(&format!("{sock}break_glass {{}}")), false).unwrap();
        assert_eq!(
            c.break_glass,
            Some(crate::breakglass::BreakGlassConfig::default())
        );
        let c = Config::parse(
            &with(&format!(
                "{sock}break_glass {{\n outage = \"30s\"\n max_duration = \"2h\"\n require_token = true\n }}"
            )),
            false,
        )
        .unwrap();
        let b = c.break_glass.unwrap();
        assert_eq!(b.outage, Duration::from_secs(30));
        assert_eq!(b.max_duration, Duration::from_secs(7200));
        assert!(b.require_token);
        for (block, key) in [
            ("break_glass {}".to_string(), "agent.break_glass"),
            (
                format!("{sock}break_glass {{ outage = \"0s\" }}"),
                "agent.break_glass.outage",
            ),
            (
                format!("{sock}break_glass {{ outage = \"5s\" }}"),
                "longer than agent.sync_interval",
            ),
            (
                format!("{sock}break_glass {{ max_duration = \"720h\" }}"),
                "agent.break_glass.max_duration",
            ),
            (format!("{sock}break_glass {{ reason = \"x\" }}"), "reason"),
            (
                "admin_socket_path = \"relative.sock\"".to_string(),
                "agent.admin_socket_path",
            ),
            (
                "admin_socket_path = \"/tmp/kame-agent/public/api.sock\"".to_string(),
                "agent.admin_socket_path",
            ),
        ] {
            let e = Config::parse(&with(&block), false).unwrap_err().to_string();
            assert!(e.contains(key), "{block}: {e}");
        }
    }

    /// `agent.sds` takes SPIRE's four keys; others are refused by name.
    #[test]
    fn config_sds_block_spire_keys() {
        let with = |block: &str| {
            GOOD.replace(
                "    log_level = \"DEBUG\"",
                &format!("    log_level = \"DEBUG\"\n{block}"),
            )
        };
        let c = Config::parse(
            &with("    sds {\n default_svid_name = \"svid\"\n default_bundle_name = \"CA\"\n default_all_bundles_name = \"EVERY\"\n disable_spiffe_cert_validation = true\n }"),
            false,
        )
        .unwrap();
        assert_eq!(
            c.sds,
            crate::sds::SdsConfig {
                default_svid_name: "svid".into(),
                default_bundle_name: "CA".into(),
                default_all_bundles_name: "EVERY".into(),
                disable_spiffe_cert_validation: true,
            }
        );
        let e = Config::parse(&with("    sds {\n default_name = \"x\"\n }"), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("agent.sds.default_name"), "{e}");
    }

    /// `server_addresses` (ours) adds servers after `server_address`, each `host:port`,
    /// `[v6]:port` or a host on `server_port`; it may stand alone; bad entries name the key.
    #[test]
    fn config_server_addresses_for_failover() {
        let c = Config::parse(GOOD, false).unwrap();
        assert_eq!(c.servers, vec![("127.0.0.1".to_string(), 8081)]);
        let more = GOOD.replace(
            "server_port = \"8081\"",
            "server_port = \"8081\"\n    server_addresses = [\"b.example:9000\", \"c.example\", \"[::1]:7\", \"127.0.0.1:8081\"]",
        );
        let c = Config::parse(&more, false).unwrap();
        assert_eq!(
            c.servers,
            vec![
                ("127.0.0.1".to_string(), 8081),
                ("b.example".to_string(), 9000),
                ("c.example".to_string(), 8081),
                ("::1".to_string(), 7),
            ]
        );
        let alone = more.replace("server_address = \"127.0.0.1\"", "");
        assert_eq!(Config::parse(&alone, false).unwrap().servers.len(), 4);
        let none = GOOD.replace("server_address = \"127.0.0.1\"", "");
        assert!(
            Config::parse(&none, false)
                .unwrap_err()
                .to_string()
                .contains("agent.server_address")
        );
        for bad in ["b:0", "b:x", "::1:80", "[::1", "a b"] {
            let t = GOOD.replace(
                "server_port = \"8081\"",
                &format!("server_addresses = [\"{bad}\"]"),
            );
            let e = Config::parse(&t, false).unwrap_err().to_string();
            assert!(e.contains("agent.server_addresses"), "{bad}: {e}");
        }
    }

    /// SPIRE's `join_token_file` (the token trimmed), never with `join_token`; the command
    /// line's values win over the file's and are checked as the file's are.
    #[test]
    fn config_join_token_file_and_command_line_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "tok-123\n").unwrap();
        let with_file = GOOD.replace(
            "join_token = \"abc\"",
            &format!("join_token_file = \"{}\"", f.display()),
        );
        let c = Config::parse(&with_file, false).unwrap();
        assert_eq!(c.join_token.as_ref().map(|t| t.expose()), Some("tok-123"));
        let both = GOOD.replace(
            "join_token = \"abc\"",
            &format!(
                "join_token = \"abc\"\n    join_token_file = \"{}\"",
                f.display()
            ),
        );
        let e = Config::parse(&both, false).unwrap_err().to_string();
        assert!(
            e.contains("only one of join_token or join_token_file"),
            "{e}"
        );
        let missing = GOOD.replace(
            "join_token = \"abc\"",
            "join_token_file = \"/nonexistent/t\"",
        );
        let e = Config::parse(&missing, false).unwrap_err().to_string();
        assert!(
            e.contains("agent.join_token_file") && e.contains("unable to read"),
            "{e}"
        );

        let mut o = Overrides::default();
        o.string("log_level", Some("warn"))
            .int("server_port", Some(9000))
            .string("data_dir", Some("/d"))
            .switch("log_source_location", true);
        let c = Config::parse_with(GOOD, false, &o).unwrap();
        assert_eq!(c.server_port, 9000);
        assert_eq!(c.log_level, kame_api::conf::Level::Warn);
        assert_eq!(c.data_dir, PathBuf::from("/d"));
        assert!(c.log_source_location);
        let mut o = Overrides::default();
        o.int("server_port", Some(70000));
        let e = Config::parse_with(GOOD, false, &o).unwrap_err().to_string();
        assert!(e.contains("agent.server_port"), "{e}");
        let mut o = Overrides::default();
        o.switch("insecure_bootstrap", true);
        let e = Config::parse_with(GOOD, false, &o).unwrap_err().to_string();
        assert!(e.contains("agent.insecure_bootstrap"), "{e}");
    }

    #[test]
    fn config_errors_name_the_key() {
        let cases = [
            (
                GOOD.replace("server_port", "server_prot"),
                "agent.server_prot: unknown key",
            ),
            (GOOD.replace("\"8081\"", "\"99999\""), "agent.server_port"),
            (
                GOOD.replace("example.org", "Example.org"),
                "agent.trust_domain",
            ),
            (
                GOOD.replace("trust_bundle_path", "#"),
                "agent.trust_bundle_path",
            ),
            (
                GOOD.replace("\"unix\"", "\"k8s\""),
                "plugins.WorkloadAttestor",
            ),
            (GOOD.replace("\"disk\"", "\"vault\""), "plugins.KeyManager"),
            (
                GOOD.replace("workload_size_limit = 1048576", "workload_size_limit = -1"),
                "workload_size_limit",
            ),
            (
                GOOD.replace("/tmp/kame-agent/public/api.sock", "relative.sock"),
                "agent.socket_path",
            ),
        ];
        for (text, want) in cases {
            let e = Config::parse(&text, false).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: got {e}");
        }
    }

    #[test]
    fn config_memory_key_manager_and_expand_env() {
        let text = GOOD
            .replace(
                "KeyManager \"disk\" {\n        plugin_data {\n            directory = \"/var/lib/kame-agent/keys\"\n        }\n    }",
                "KeyManager \"memory\" {\n    }",
            )
            .replace("\"abc\"", "\"${KAME_TEST_TOKEN_UNSET_VAR}\"");
        let c = Config::parse(&text, true).unwrap();
        assert_eq!(c.key_manager, KeyManagerConfig::Memory);
        assert_eq!(c.join_token, None);
    }

    /// `transparency_log_keys`: PEM P-256 public keys; anything else is refused naming the key
    /// and the file.
    #[test]
    fn config_transparency_log_keys_are_p256_pem_public_keys() {
        use aws_lc_rs::encoding::AsDer;
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
        use base64::Engine;
        let dir = tempfile::tempdir().unwrap();
        let k = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
        let der = k.public_key().as_der().unwrap().as_ref().to_vec();
        let good = dir.path().join("log.pem");
        std::fs::write(
            &good,
            format!(
                "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
                base64::engine::general_purpose::STANDARD.encode(&der)
            ),
        )
        .unwrap();
        let bad = dir.path().join("bad.pem");
        std::fs::write(&bad, "not a key\n").unwrap();
        let with = |p: &std::path::Path| {
            GOOD.replace(
                "trust_bundle_path = \"/etc/kame/bundle.pem\"",
                &format!(
                    "trust_bundle_path = \"/etc/kame/bundle.pem\"\n    transparency_log_keys = [\"{}\"]",
                    p.display()
                ),
            )
        };
        let c = Config::parse(&with(&good), false).unwrap();
        assert_eq!(c.transparency_log_keys, vec![der]);
        assert!(
            Config::parse(GOOD, false)
                .unwrap()
                .transparency_log_keys
                .is_empty()
        );
        let e = Config::parse(&with(&bad), false).unwrap_err().to_string();
        assert!(
            e.contains("agent.transparency_log_keys") && e.contains("not a PEM PUBLIC KEY"),
            "{e}"
        );
        let e = Config::parse(&with(&dir.path().join("none.pem")), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("none.pem"), "{e}");
    }
}
