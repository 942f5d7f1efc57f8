//! `disk` KeyManager: keys kept in one JSON file (`keys_path`) of PKCS#8 DER, written
//! atomically (temp file in the same directory, fsync, rename) with mode 0600, so keys survive a
//! restart and a crash never leaves a half-written file. It must not log key material.

use crate::local::LocalKey;
use crate::memory::{MemoryKeyManager, generate_blocking};
use crate::{Error, KeyManager, KeyType, PublicKey, Result, SignOpts, Signature, validate_key_id};
use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use zeroize::Zeroizing;

#[derive(Serialize, Deserialize, Default)]
struct KeyFile {
    keys: BTreeMap<String, StoredKey>,
}

#[derive(Serialize, Deserialize)]
struct StoredKey {
    #[serde(rename = "type")]
    key_type: String,
    pkcs8: String,
}

#[derive(Debug)]
pub struct DiskKeyManager {
    path: PathBuf,
    keys: MemoryKeyManager,
    write_lock: tokio::sync::Mutex<()>,
}

impl DiskKeyManager {
    /// Opens (or starts) the key file at `path`. A file that exists but cannot be read or parsed
    /// is an error: it is never silently replaced.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let keys = MemoryKeyManager::new();
        let store_err = |reason: String| Error::Store {
            path: path.display().to_string(),
            reason,
        };
        match std::fs::read(&path) {
            Ok(bytes) => {
                let bytes = Zeroizing::new(bytes);
                let file: KeyFile = serde_json::from_slice(&bytes)
                    .map_err(|e| store_err(format!("not a Kame key file: {e}")))?;
                for (id, stored) in file.keys {
                    let kt: KeyType = stored.key_type.parse()?;
                    let der = Zeroizing::new(
                        STANDARD
                            .decode(stored.pkcs8.as_bytes())
                            .map_err(|_| store_err(format!("key {id:?}: bad base64")))?,
                    );
                    let key = LocalKey::from_pkcs8(&id, kt, &der).map_err(|e| match e {
                        Error::Store { reason, .. } => store_err(reason),
                        other => other,
                    })?;
                    keys.insert(Arc::new(key))?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(Error::Io {
                    path: path.display().to_string(),
                    source,
                });
            }
        }
        Ok(DiskKeyManager {
            path,
            keys,
            write_lock: tokio::sync::Mutex::new(()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn persist(&self, all: &[Arc<LocalKey>]) -> Result<()> {
        let mut file = KeyFile::default();
        for k in all {
            file.keys.insert(
                k.public.id.clone(),
                StoredKey {
                    key_type: k.key_type.as_str().to_string(),
                    pkcs8: STANDARD.encode(k.to_pkcs8()?.as_slice()),
                },
            );
        }
        let json = Zeroizing::new(serde_json::to_vec_pretty(&file).map_err(|e| Error::Store {
            path: self.path.display().to_string(),
            reason: e.to_string(),
        })?);
        crate::fs::write_secret(&self.path, &json)?;
        Ok(())
    }
}

#[async_trait]
impl KeyManager for DiskKeyManager {
    fn name(&self) -> &'static str {
        "disk"
    }

    async fn generate_key(&self, id: &str, key_type: KeyType) -> Result<PublicKey> {
        validate_key_id(id)?;
        let key = Arc::new(generate_blocking(id, key_type).await?);
        let _guard = self.write_lock.lock().await;
        let mut all: Vec<Arc<LocalKey>> = self
            .keys
            .snapshot()?
            .into_iter()
            .filter(|k| k.public.id != id)
            .collect();
        all.push(key.clone());
        // Persist first: a key that is not on disk must never be used to sign.
        self.persist(&all)?;
        let public = key.public.clone();
        self.keys.insert(key)?;
        Ok(public)
    }

    async fn public_key(&self, id: &str) -> Result<PublicKey> {
        self.keys.public_key(id).await
    }

    async fn delete_key(&self, id: &str, fingerprint: &str) -> Result<bool> {
        let _guard = self.write_lock.lock().await;
        let all = self.keys.snapshot()?;
        if !all
            .iter()
            .any(|k| k.public.id == id && k.public.fingerprint == fingerprint)
        {
            return Ok(false);
        }
        let keep: Vec<Arc<LocalKey>> = all.into_iter().filter(|k| k.public.id != id).collect();
        // Off disk first: a key the file still holds would come back at the next start.
        self.persist(&keep)?;
        self.keys.remove_if_fingerprint(id, fingerprint)
    }

    async fn public_keys(&self) -> Result<Vec<PublicKey>> {
        self.keys.public_keys().await
    }

    async fn sign(&self, id: &str, message: &[u8], opts: SignOpts) -> Result<Signature> {
        self.keys.sign(id, message, opts).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn disk_passes_keymanager_conformance() {
        let dir = tempfile::tempdir().unwrap();
        let km = DiskKeyManager::open(dir.path().join("keys.json")).unwrap();
        conformance::run_all(&km).await;
    }

    #[tokio::test]
    async fn disk_keys_survive_restart_and_file_is_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/keys.json");
        let km = DiskKeyManager::open(&path).unwrap();
        let a = km.generate_key("x509-CA-A", KeyType::EcP256).await.unwrap();
        let b = km
            .generate_key("JWT-Signer-A", KeyType::Rsa2048)
            .await
            .unwrap();
        drop(km);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let km = DiskKeyManager::open(&path).unwrap();
        assert_eq!(km.public_key("x509-CA-A").await.unwrap(), a);
        assert_eq!(km.public_key("JWT-Signer-A").await.unwrap(), b);
        let sig = km
            .sign("x509-CA-A", b"m", SignOpts::for_key(KeyType::EcP256))
            .await
            .unwrap();
        assert_eq!(sig.fingerprint, a.fingerprint);
        // no temp files left behind
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[tokio::test]
    async fn disk_refuses_corrupt_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        std::fs::write(&path, b"{not json").unwrap();
        let err = DiskKeyManager::open(&path).unwrap_err();
        assert!(matches!(err, Error::Store { .. }), "{err}");
        std::fs::write(
            &path,
            br#"{"keys":{"a":{"type":"ec-p256","pkcs8":"AAAA"}}}"#,
        )
        .unwrap();
        assert!(matches!(
            DiskKeyManager::open(&path).unwrap_err(),
            Error::Store { .. }
        ));
    }
}
