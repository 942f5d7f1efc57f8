//! The manufacturer CA's record of the devices it certified: each product serial with the EK
//! (SHA-256 of its SubjectPublicKeyInfo) of the TPM it was issued to. A serial is certified
//! for one TPM only and a TPM carries one serial, across restarts and across `ca serve` and
//! `ca issue` runs sharing the file; the same device asking again is re-issued. A claim made
//! without proof that the TPM holds the EK (offline `ca issue`: EK certificates are public,
//! so anyone can name one) is kept as sealed and gives way to a proven one (`ca serve`, after
//! credential activation), so it cannot lock a real device out. The file is JSON
//! (`{"serials": {"SN-1": "<hex>"}, "sealed": ["SN-1"]}`), replaced atomically under an
//! exclusive lock on a `.lock` file beside it. It must not hold anything secret, and never
//! issues by itself.

use std::path::{Path, PathBuf};

type Map = serde_json::Map<String, serde_json::Value>;

/// Why a device may not be certified, or the record cannot be kept.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    #[error("device serial {serial:?} was already certified for another TPM (EK {ek})")]
    SerialTaken { serial: String, ek: String },
    #[error("this TPM (EK {ek}) was already certified as device serial {serial:?}")]
    EkTaken { serial: String, ek: String },
    #[error("cannot use the registry {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the registry {path} is corrupt: {msg}")]
    Corrupt { path: String, msg: String },
    #[error("the registry: {0}")]
    Write(#[from] kame_keymanager::fs::WriteError),
}

/// A registry file (created on first use).
#[derive(Debug, Clone)]
pub struct Registry {
    path: PathBuf,
}

/// SHA-256 of `spki_der`, lowercase hex: how the registry names an EK.
pub fn ek_id(spki_der: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, spki_der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Registry {
    /// The registry at `path`; its directory must exist. A file that is there must be a
    /// registry.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        let r = Registry {
            path: path.to_path_buf(),
        };
        r.read()?;
        Ok(r)
    }

    fn io(&self, source: std::io::Error) -> RegistryError {
        RegistryError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }

    fn corrupt(&self, msg: impl std::fmt::Display) -> RegistryError {
        RegistryError::Corrupt {
            path: self.path.display().to_string(),
            msg: msg.to_string(),
        }
    }

    /// (serial → EK, the serials whose claim is sealed, not proven)
    fn read(&self) -> Result<(Map, std::collections::BTreeSet<String>), RegistryError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
            Err(e) => return Err(self.io(e)),
        };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| self.corrupt(e))?;
        let serials = v
            .get("serials")
            .and_then(|s| s.as_object())
            .ok_or_else(|| self.corrupt("no \"serials\" object"))?;
        if serials.values().any(|ek| !ek.is_string()) {
            return Err(self.corrupt("an EK is not a string"));
        }
        let mut sealed = std::collections::BTreeSet::new();
        if let Some(list) = v.get("sealed") {
            for s in list
                .as_array()
                .ok_or_else(|| self.corrupt("\"sealed\" is not a list"))?
            {
                sealed.insert(
                    s.as_str()
                        .ok_or_else(|| self.corrupt("a sealed serial is not a string"))?
                        .to_string(),
                );
            }
        }
        Ok((serials.clone(), sealed))
    }

    /// Records that `serial` is certified for the TPM whose EK SubjectPublicKeyInfo is
    /// `ek_spki`; `proven`: the TPM answered a credential activation for that EK. The same
    /// pair again is accepted (a device re-enrolling). The serial with another EK, or the EK
    /// with another serial, is refused and nothing changes, unless that other claim is sealed
    /// and this one proven: then it is dropped.
    pub fn claim(&self, serial: &str, ek_spki: &[u8], proven: bool) -> Result<(), RegistryError> {
        let ek = ek_id(ek_spki);
        let lock_path = {
            let mut p = self.path.clone().into_os_string();
            p.push(".lock");
            PathBuf::from(p)
        };
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| self.io(e))?;
        lock.lock().map_err(|e| self.io(e))?;
        let (mut serials, mut sealed) = self.read()?;
        let before = (serials.clone(), sealed.clone());
        let gives_way = |other: &str, sealed: &std::collections::BTreeSet<String>| {
            proven && sealed.contains(other)
        };
        match serials.get(serial).and_then(|v| v.as_str()) {
            Some(have) if have == ek => {}
            Some(have) if !gives_way(serial, &sealed) => {
                return Err(RegistryError::SerialTaken {
                    serial: serial.to_string(),
                    ek: have.to_string(),
                });
            }
            _ => {}
        }
        let others: Vec<String> = serials
            .iter()
            .filter(|(k, v)| k.as_str() != serial && v.as_str() == Some(&ek))
            .map(|(k, _)| k.clone())
            .collect();
        for other in others {
            if !gives_way(&other, &sealed) {
                return Err(RegistryError::EkTaken { serial: other, ek });
            }
            serials.remove(&other);
            sealed.remove(&other);
        }
        serials.insert(serial.to_string(), serde_json::Value::String(ek));
        if proven {
            sealed.remove(serial);
        } else if before.0.get(serial).is_none() || before.1.contains(serial) {
            sealed.insert(serial.to_string());
        }
        if (serials.clone(), sealed.clone()) == before {
            return Ok(());
        }
        let text = serde_json::to_vec_pretty(&serde_json::json!({
            "serials": serials,
            "sealed": sealed,
        }))
        .map_err(|e| self.corrupt(e))?;
        kame_keymanager::fs::write_atomic(&self.path, &text, 0o644)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_one_serial_per_tpm_and_one_tpm_per_serial_across_opens() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("registry.json");
        let r = Registry::open(&path).unwrap();
        r.claim("SN-1", b"ek-a", true).unwrap();
        // The same device again: re-issued.
        r.claim("SN-1", b"ek-a", true).unwrap();
        r.claim("SN-1", b"ek-a", false).unwrap();
        // Another opener of the same file sees the record.
        let r2 = Registry::open(&path).unwrap();
        for proven in [false, true] {
            assert!(matches!(
                r2.claim("SN-1", b"ek-b", proven),
                Err(RegistryError::SerialTaken { .. })
            ));
            assert!(matches!(
                r2.claim("SN-2", b"ek-a", proven),
                Err(RegistryError::EkTaken { serial, .. }) if serial == "SN-1"
            ));
        }
        r2.claim("SN-2", b"ek-b", true).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("SN-1") && text.contains(&ek_id(b"ek-b")),
            "{text}"
        );
        // A sealed claim (offline, unproven: EK certificates are public) gives way to a proven
        // one, for the serial and for the EK, and never to another sealed one.
        r.claim("SN-3", b"ek-victim", false).unwrap();
        r.claim("SN-4", b"ek-c", false).unwrap();
        assert!(matches!(
            r.claim("SN-5", b"ek-victim", false),
            Err(RegistryError::EkTaken { .. })
        ));
        r.claim("SN-5", b"ek-victim", true).unwrap();
        r.claim("SN-4", b"ek-d", true).unwrap();
        assert!(matches!(
            r.claim("SN-3", b"ek-victim", true),
            Err(RegistryError::EkTaken { serial, .. }) if serial == "SN-5"
        ));
        // A proven claim no longer gives way.
        assert!(matches!(
            r.claim("SN-4", b"ek-c", true),
            Err(RegistryError::SerialTaken { .. })
        ));
        // A file that is not a registry is refused, not overwritten.
        let bad = d.path().join("bad.json");
        std::fs::write(&bad, "[1, 2]").unwrap();
        assert!(matches!(
            Registry::open(&bad),
            Err(RegistryError::Corrupt { .. })
        ));
        assert_eq!(std::fs::read_to_string(&bad).unwrap(), "[1, 2]");
    }
}
