//! The agent's `NodeAttestor "tpm_devid"` configuration: SPIRE's keys (`devid_cert_path`,
//! `devid_priv_path`, `devid_pub_path`, `tpm_device_path` or an autodetected TPM, the
//! hierarchy passwords) and Kame's (`tcti`, `ek_algorithm`, `attestation_key_handle`,
//! `attestation_key_cert_path`, `attestation_key_pub_path`, `devid_handle`), each checked and
//! named by its full path in errors. It reads `/dev` only to find the TPM.

use kame_api::conf::{ConfigError, Section, invalid};
use std::path::{Path, PathBuf};

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
pub fn tpm_devid_config(data: &Section) -> Result<super::TpmDevidConfig, ConfigError> {
    tpm_devid_config_in(data, Path::new("/dev"))
}

/// As [`tpm_devid_config`], autodetecting the TPM in `dev` when no path or TCTI is given.
pub fn tpm_devid_config_in(
    data: &Section,
    dev: &Path,
) -> Result<super::TpmDevidConfig, ConfigError> {
    let path = |k: &str| -> Result<PathBuf, ConfigError> {
        data.string(k)?
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .ok_or_else(|| data.missing(k))
    };
    let devid_cert_path = path("devid_cert_path")?;
    let devid_priv_path = path("devid_priv_path")?;
    let devid_pub_path = path("devid_pub_path")?;
    let secret = |k: &str| -> Result<super::Secret, ConfigError> {
        Ok(super::Secret::new(data.string(k)?.unwrap_or_default()))
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
        (Some(h), Some(cert)) => Some(super::CertifiedAk {
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
    Ok(super::TpmDevidConfig {
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

#[cfg(test)]
mod tests {
    use super::*;
    use kame_api::conf::single_plugin;

    /// SPIRE's agent Configure cases 5 and 8: with neither `tpm_device_path` nor `tcti`, the
    /// TPM is autodetected; when none is found the error names the key to set.
    #[test]
    fn tpm_devid_agent_configure_05_08_autodetect_succeeds_or_names_the_key() {
        let text = "plugins {\n NodeAttestor \"tpm_devid\" {\n plugin_data {\n devid_cert_path = \"c.pem\"\n devid_priv_path = \"k.priv\"\n devid_pub_path = \"k.pub\"\n }\n }\n}\n";
        let mut root = kame_api::conf::parse_root(text, None).unwrap();
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
            let mut root = kame_api::conf::parse_root(&text, None).unwrap();
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
            Some(super::super::CertifiedAk {
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
}
