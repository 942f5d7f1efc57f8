//! The manufacturer CA's record of the devices it certified: each product serial with the EK
//! (SHA-256 of its SubjectPublicKeyInfo) of the TPM it was issued to. A serial is certified
//! for one TPM only and a TPM carries one serial, across restarts and across `ca serve` and
//! `ca issue` runs sharing the file; the same device asking again is re-issued. The file is
//! JSON (`{"serials": {"SN-1": "<hex>"}}`), replaced atomically under an exclusive lock on a
//! `.lock` file beside it. It must not hold anything secret, and never issues by itself.

use std::path::{Path, PathBuf};

/// Why a device may not be certified, or the record cannot be kept.
#[derive(Debug, thiserror::Error)]
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

    fn read(&self) -> Result<serde_json::Map<String, serde_json::Value>, RegistryError> {
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
        Ok(serials.clone())
    }

    /// Records that `serial` is certified for the TPM whose EK SubjectPublicKeyInfo is
    /// `ek_spki`. The same pair again is accepted (a device re-enrolling); the serial with
    /// another EK, or the EK with another serial, is refused and nothing changes.
    pub fn claim(&self, serial: &str, ek_spki: &[u8]) -> Result<(), RegistryError> {
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
        let mut serials = self.read()?;
        if let Some(have) = serials.get(serial).and_then(|v| v.as_str()) {
            if have == ek {
                return Ok(());
            }
            return Err(RegistryError::SerialTaken {
                serial: serial.to_string(),
                ek: have.to_string(),
            });
        }
        if let Some((other, _)) = serials.iter().find(|(_, v)| v.as_str() == Some(&ek)) {
            return Err(RegistryError::EkTaken {
                serial: other.clone(),
                ek,
            });
        }
        serials.insert(serial.to_string(), serde_json::Value::String(ek));
        let text = serde_json::to_vec_pretty(&serde_json::json!({ "serials": serials }))
            .map_err(|e| self.corrupt(e))?;
        kame_keymanager::disk::write_file_atomic(&self.path, &text, 0o644).map_err(|e| {
            RegistryError::Io {
                path: self.path.display().to_string(),
                source: std::io::Error::other(e.to_string()),
            }
        })?;
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
        r.claim("SN-1", b"ek-a").unwrap();
        // The same device again: re-issued.
        r.claim("SN-1", b"ek-a").unwrap();
        // Another opener of the same file sees the record.
        let r2 = Registry::open(&path).unwrap();
        assert!(matches!(
            r2.claim("SN-1", b"ek-b"),
            Err(RegistryError::SerialTaken { .. })
        ));
        assert!(matches!(
            r2.claim("SN-2", b"ek-a"),
            Err(RegistryError::EkTaken { serial, .. }) if serial == "SN-1"
        ));
        r2.claim("SN-2", b"ek-b").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("SN-1") && text.contains(&ek_id(b"ek-b")),
            "{text}"
        );
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
