//! `agent.conf`: SPIRE's agent HCL layout and key names, parsed into a typed [`Config`]. Every
//! key is checked: an unknown key or a bad value is an error naming it
//! (`agent.server_port: ...`). Parsing has no side effects: nothing is created on disk here.

use kame_api::TrustDomain;
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeAttestorConfig {
    JoinToken,
    TpmDevid(Box<crate::tpm_devid::TpmDevidConfig>),
}

#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub server_address: String,
    pub server_port: u16,
    pub socket_path: PathBuf,
    pub trust_bundle_path: PathBuf,
    pub trust_domain: TrustDomain,
    pub join_token: Option<String>,
    pub log_level: String,
    pub log_format: LogFormat,
    /// How often the agent syncs with the server (ours; SPIRE's is fixed at 5 s).
    pub sync_interval: Duration,
    pub node_attestor: NodeAttestorConfig,
    pub key_manager: KeyManagerConfig,
    pub unix: UnixAttestorConfig,
}

/// SPIRE's TPM autodetection: exactly one `tpmrmN` in `dev` (the resource manager) wins;
/// else exactly one `tpmN`; several of a kind, none, or an unreadable directory is an error.
pub fn autodetect_tpm(dev: &Path) -> Result<PathBuf, String> {
    let entries = std::fs::read_dir(dev)
        .map_err(|e| format!("cannot read {} to find a TPM: {e}", dev.display()))?;
    let mut rm = vec![];
    let mut raw = vec![];
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let digits = |p: &str| {
            name.strip_prefix(p)
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        };
        if digits("tpmrm") {
            rm.push(e.path());
        } else if digits("tpm") {
            raw.push(e.path());
        }
    }
    for (kind, found) in [("tpmrm", rm), ("tpm", raw)] {
        match found.len() {
            0 => continue,
            1 => return Ok(found.into_iter().next().unwrap_or_default()),
            n => {
                return Err(format!(
                    "{n} {kind} devices found in {}: set tpm_device_path",
                    dev.display()
                ));
            }
        }
    }
    Err(format!(
        "no TPM device found in {}: set tpm_device_path or tcti",
        dev.display()
    ))
}

/// `NodeAttestor "tpm_devid"`: SPIRE's keys, plus `tcti`.
fn tpm_devid_config(data: &Section) -> Result<crate::tpm_devid::TpmDevidConfig, ConfigError> {
    tpm_devid_config_in(data, Path::new("/dev"))
}

/// As [`tpm_devid_config`], autodetecting the TPM in `dev` when no path or TCTI is given.
fn tpm_devid_config_in(
    data: &Section,
    dev: &Path,
) -> Result<crate::tpm_devid::TpmDevidConfig, ConfigError> {
    let path = |k: &str| -> Result<PathBuf, ConfigError> {
        data.string(k)?
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .ok_or(ConfigError::Missing { key: data.key(k) })
    };
    let devid_cert_path = path("devid_cert_path")?;
    let devid_priv_path = path("devid_priv_path")?;
    let devid_pub_path = path("devid_pub_path")?;
    let secret = |k: &str| -> Result<crate::tpm_devid::Secret, ConfigError> {
        Ok(crate::tpm_devid::Secret(
            data.string(k)?.unwrap_or_default(),
        ))
    };
    let devid_password = secret("devid_password")?;
    let owner_hierarchy_password = secret("owner_hierarchy_password")?;
    let endorsement_hierarchy_password = secret("endorsement_hierarchy_password")?;
    let device = data.string("tpm_device_path")?.filter(|v| !v.is_empty());
    let tcti = data.string("tcti")?.filter(|v| !v.is_empty());
    let tcti = match (device, tcti) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                &data.key("tcti"),
                "give tpm_device_path or tcti, not both",
            ));
        }
        (Some(d), None) => format!("device:{d}"),
        (None, Some(t)) => t,
        (None, None) => format!(
            "device:{}",
            autodetect_tpm(dev)
                .map_err(|m| invalid(&data.key("tpm_device_path"), m))?
                .display()
        ),
    };
    use kame_tpm::device::EkAlg;
    let ek_algorithm = match data.string("ek_algorithm")?.as_deref() {
        None | Some("") | Some("rsa-2048") => EkAlg::Rsa2048,
        Some("ecc-p256") => EkAlg::EccP256,
        Some("ecc-p384") => EkAlg::EccP384,
        Some("rsa-3072") => EkAlg::Rsa3072,
        Some(other) => {
            return Err(invalid(
                &data.key("ek_algorithm"),
                format!("{other:?} is not rsa-2048, rsa-3072, ecc-p256 or ecc-p384"),
            ));
        }
    };
    let ak_handle = data
        .string("attestation_key_handle")?
        .filter(|v| !v.is_empty());
    let ak_cert = data
        .string("attestation_key_cert_path")?
        .filter(|v| !v.is_empty());
    let persistent_handle = |name: &str, h: &str| {
        let hex = h.trim_start_matches("0x").trim_start_matches("0X");
        u32::from_str_radix(hex, 16)
            .ok()
            .filter(|v| (0x8100_0000..=0x81ff_ffff).contains(v))
            .ok_or_else(|| {
                invalid(
                    &data.key(name),
                    format!("{h:?} is not a persistent handle (0x81000000-0x81ffffff)"),
                )
            })
    };
    let ak_pub = data
        .string("attestation_key_pub_path")?
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let attestation_key = match (ak_handle, ak_cert) {
        (None, None) => None,
        (Some(h), Some(cert)) => Some(crate::tpm_devid::CertifiedAk {
            handle: persistent_handle("attestation_key_handle", &h)?,
            cert_path: PathBuf::from(cert),
            pub_path: ak_pub.clone(),
        }),
        (Some(_), None) => {
            return Err(ConfigError::Missing {
                key: data.key("attestation_key_cert_path"),
            });
        }
        (None, Some(_)) => {
            return Err(ConfigError::Missing {
                key: data.key("attestation_key_handle"),
            });
        }
    };
    if ak_pub.is_some() && attestation_key.is_none() {
        return Err(ConfigError::Missing {
            key: data.key("attestation_key_handle"),
        });
    }
    // A persistent DevID key proves itself with a certify by a persistent AK only: the
    // EK flow (SPIRE's) loads the DevID from its blobs.
    let devid_handle = match data.string("devid_handle")?.filter(|v| !v.is_empty()) {
        None => None,
        Some(_) if attestation_key.is_none() => {
            return Err(ConfigError::Missing {
                key: data.key("attestation_key_handle"),
            });
        }
        Some(h) => Some(persistent_handle("devid_handle", &h)?),
    };
    Ok(crate::tpm_devid::TpmDevidConfig {
        attestation_key,
        devid_handle,
        devid_cert_path,
        devid_priv_path,
        devid_pub_path,
        tcti,
        ek_algorithm,
        devid_password,
        owner_hierarchy_password,
        endorsement_hierarchy_password,
    })
}

impl Config {
    pub fn load(path: &Path, expand: bool) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, expand)
    }

    pub fn parse(text: &str, expand: bool) -> Result<Self, ConfigError> {
        let mut root = kame_api::conf::parse_root(text, expand)?;
        let agent = root.section("agent")?.ok_or(ConfigError::Missing {
            key: "agent".into(),
        })?;
        let mut plugins = root.section("plugins")?.ok_or(ConfigError::Missing {
            key: "plugins".into(),
        })?;
        root.finish()?;

        let required = |s: &Section, k: &str| -> Result<String, ConfigError> {
            s.string(k)?
                .filter(|v| !v.is_empty())
                .ok_or(ConfigError::Missing { key: s.key(k) })
        };
        let td_s = required(&agent, "trust_domain")?;
        if td_s.contains(':') {
            return Err(invalid(
                "agent.trust_domain",
                "expected a trust domain name, not a SPIFFE ID",
            ));
        }
        let trust_domain =
            TrustDomain::parse(&td_s).map_err(|e| invalid("agent.trust_domain", e.to_string()))?;
        let server_address = required(&agent, "server_address")?;
        let server_port = match agent.int("server_port")? {
            None => 8081,
            Some(p) => u16::try_from(p)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| invalid("agent.server_port", format!("{p} is not a port number")))?,
        };
        let socket_path = agent
            .string("socket_path")?
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET_PATH));
        if !socket_path.is_absolute() {
            return Err(invalid("agent.socket_path", "must be an absolute path"));
        }
        let data_dir = PathBuf::from(agent.string("data_dir")?.unwrap_or_else(|| ".".into()));
        let trust_bundle_path = PathBuf::from(required(&agent, "trust_bundle_path")?);
        let join_token = agent.string("join_token")?.filter(|t| !t.is_empty());
        let log_level = kame_api::conf::log_level(&agent)?;
        let log_format = kame_api::conf::log_format(&agent)?;
        let sync_interval = match agent.duration("sync_interval")? {
            None => Duration::from_secs(5),
            Some(d) if d < Duration::from_millis(100) => {
                return Err(invalid("agent.sync_interval", "must be at least 100ms"));
            }
            Some(d) => d,
        };
        // SPIRE keys that have no meaning here are refused as unknown by `finish`.
        agent.finish()?;

        let (name, data) = single_plugin(&mut plugins, "NodeAttestor")?;
        let node_attestor = match name.as_str() {
            "join_token" => NodeAttestorConfig::JoinToken,
            "tpm_devid" => NodeAttestorConfig::TpmDevid(Box::new(tpm_devid_config(&data)?)),
            other => {
                return Err(invalid(
                    "plugins.NodeAttestor",
                    format!(
                        "unknown NodeAttestor {other:?} (expected \"join_token\" or \"tpm_devid\")"
                    ),
                ));
            }
        };
        // A join_token agent without a token is allowed here: restarting with a cached SVID
        // needs none. Whether it can attest is checked at start.
        data.finish()?;

        let (name, data) = single_plugin(&mut plugins, "KeyManager")?;
        let key_manager = match name.as_str() {
            "memory" => KeyManagerConfig::Memory,
            "disk" => KeyManagerConfig::Disk {
                directory: data
                    .string("directory")?
                    .map(PathBuf::from)
                    .unwrap_or_else(|| data_dir.clone()),
            },
            other => {
                return Err(invalid(
                    "plugins.KeyManager",
                    format!("unknown KeyManager {other:?} (expected \"disk\" or \"memory\")"),
                ));
            }
        };
        data.finish()?;

        let (name, data) = single_plugin(&mut plugins, "WorkloadAttestor")?;
        if name != "unix" {
            return Err(invalid(
                "plugins.WorkloadAttestor",
                format!("unknown WorkloadAttestor {name:?} (expected \"unix\")"),
            ));
        }
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
        let unix = UnixAttestorConfig {
            discover_workload_path,
            workload_size_limit,
        };
        plugins.finish()?;

        Ok(Config {
            data_dir,
            server_address,
            server_port,
            socket_path,
            trust_bundle_path,
            trust_domain,
            join_token,
            log_level,
            log_format,
            sync_interval,
            node_attestor,
            key_manager,
            unix,
        })
    }
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

    /// SPIRE's agent Configure cases 5 and 8: with neither `tpm_device_path` nor `tcti`, the
    /// TPM is autodetected; when none is found the error names the key to set.
    #[test]
    fn tpm_devid_agent_configure_05_08_autodetect_succeeds_or_names_the_key() {
        let text = "plugins {\n NodeAttestor \"tpm_devid\" {\n plugin_data {\n devid_cert_path = \"c.pem\"\n devid_priv_path = \"k.priv\"\n devid_pub_path = \"k.pub\"\n }\n }\n}\n";
        let mut root = kame_api::conf::parse_root(text, false).unwrap();
        let mut plugins = root.section("plugins").unwrap().unwrap();
        let (_, data) = single_plugin(&mut plugins, "NodeAttestor").unwrap();
        let dev = tempfile::tempdir().unwrap();
        let e = tpm_devid_config_in(&data, dev.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tpm_device_path") && e.contains("no TPM device"),
            "{e}"
        );
        std::fs::write(dev.path().join("tpmrm0"), b"").unwrap();
        let c = tpm_devid_config_in(&data, dev.path()).unwrap();
        assert_eq!(
            c.tcti,
            format!("device:{}", dev.path().join("tpmrm0").display())
        );
    }

    /// Kame's certified attestation key: both keys or neither, a persistent handle in hex.
    #[test]
    fn tpm_devid_agent_attestation_key_needs_a_persistent_handle_and_its_certificate() {
        let conf = |extra: &str| {
            let text = format!(
                "plugins {{\n NodeAttestor \"tpm_devid\" {{\n plugin_data {{\n devid_cert_path = \"c.pem\"\n devid_priv_path = \"k.priv\"\n devid_pub_path = \"k.pub\"\n tcti = \"swtpm:port=1\"\n {extra}\n }}\n }}\n}}\n"
            );
            let mut root = kame_api::conf::parse_root(&text, false).unwrap();
            let mut plugins = root.section("plugins").unwrap().unwrap();
            let (_, data) = single_plugin(&mut plugins, "NodeAttestor").unwrap();
            tpm_devid_config_in(&data, Path::new("/nonexistent")).map_err(|e| e.to_string())
        };
        assert_eq!(conf("").unwrap().attestation_key, None);
        let c = conf(
            "attestation_key_handle = \"0x81020001\"\n attestation_key_cert_path = \"iak.pem\"",
        )
        .unwrap();
        assert_eq!(
            c.attestation_key,
            Some(crate::tpm_devid::CertifiedAk {
                handle: 0x8102_0001,
                cert_path: "iak.pem".into(),
                pub_path: None,
            })
        );
        assert_eq!(c.devid_handle, None);
        // The persistent DevID key and the AK's public area from a file (Kame).
        let c = conf(
            "attestation_key_handle = \"0x81020001\"\n attestation_key_cert_path = \"iak.pem\"\n attestation_key_pub_path = \"iak.pub\"\n devid_handle = \"0x81020002\"",
        )
        .unwrap();
        assert_eq!(c.devid_handle, Some(0x8102_0002));
        assert_eq!(
            c.attestation_key.unwrap().pub_path,
            Some(PathBuf::from("iak.pub"))
        );
        for lonely in [
            "devid_handle = \"0x81020002\"",
            "attestation_key_pub_path = \"iak.pub\"",
        ] {
            let e = conf(lonely).unwrap_err();
            assert!(e.contains("attestation_key_handle"), "{lonely}: {e}");
        }
        let e = conf(
            "attestation_key_handle = \"0x81020001\"\n attestation_key_cert_path = \"iak.pem\"\n devid_handle = \"0x01020002\"",
        )
        .unwrap_err();
        assert!(
            e.contains("devid_handle") && e.contains("persistent handle"),
            "{e}"
        );
        let e = conf("attestation_key_handle = \"0x81020001\"").unwrap_err();
        assert!(e.contains("attestation_key_cert_path"), "{e}");
        let e = conf("attestation_key_cert_path = \"iak.pem\"").unwrap_err();
        assert!(e.contains("attestation_key_handle"), "{e}");
        for bad in ["0x01020001", "zz", "0x1_0000_0000"] {
            let e = conf(&format!(
                "attestation_key_handle = \"{bad}\"\n attestation_key_cert_path = \"iak.pem\""
            ))
            .unwrap_err();
            assert!(
                e.contains("attestation_key_handle") && e.contains("persistent handle"),
                "{e}"
            );
        }
    }

    #[test]
    fn tpm_devid_autodetect_01_to_07_prefers_tpmrm_and_refuses_ambiguity_or_none() {
        let d = tempfile::tempdir().unwrap();
        let touch = |n: &str| std::fs::write(d.path().join(n), b"").unwrap();
        // 4. none found
        assert!(
            autodetect_tpm(d.path())
                .unwrap_err()
                .contains("no TPM device")
        );
        // 2. tpmN found
        touch("tpm0");
        touch("tpmx");
        assert_eq!(autodetect_tpm(d.path()).unwrap(), d.path().join("tpm0"));
        // 1, 3. tpmrmN found and preferred over tpmN
        touch("tpmrm0");
        assert_eq!(autodetect_tpm(d.path()).unwrap(), d.path().join("tpmrm0"));
        // 5. more than one tpmrm
        touch("tpmrm1");
        assert!(
            autodetect_tpm(d.path())
                .unwrap_err()
                .contains("2 tpmrm devices")
        );
        // 6. more than one tpm (and no tpmrm)
        let d2 = tempfile::tempdir().unwrap();
        std::fs::write(d2.path().join("tpm0"), b"").unwrap();
        std::fs::write(d2.path().join("tpm1"), b"").unwrap();
        assert!(
            autodetect_tpm(d2.path())
                .unwrap_err()
                .contains("2 tpm devices")
        );
        // 7. unreadable base directory
        assert!(
            autodetect_tpm(&d.path().join("missing"))
                .unwrap_err()
                .contains("cannot read")
        );
    }

    #[test]
    fn config_reads_spire_agent_keys() {
        let c = Config::parse(GOOD, false).unwrap();
        assert_eq!(c.server_port, 8081);
        assert_eq!(c.trust_domain.to_string(), "example.org");
        assert_eq!(c.join_token.as_deref(), Some("abc"));
        assert_eq!(
            c.key_manager,
            KeyManagerConfig::Disk {
                directory: "/var/lib/kame-agent/keys".into()
            }
        );
        assert!(c.unix.discover_workload_path);
        assert_eq!(c.unix.workload_size_limit, 1 << 20);
        assert_eq!(c.sync_interval, Duration::from_secs(5));
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
}
