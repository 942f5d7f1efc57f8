//! What the agent keeps in `data_dir` (and the disk KeyManager's directory) so that a restart
//! serves cached SVIDs before the server answers: its own SVID chain and key, the last trust
//! bundle, and the workload SVID cache (entries, SVIDs and their keys). Files holding keys are
//! 0600 and every file is written atomically (temp file in the same directory, fsync, rename).
//! It never decides what to keep: the manager hands it complete snapshots.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use kame_api::pb::types;
use prost::Message;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is corrupt: {msg}")]
    Corrupt { path: String, msg: String },
}

/// Writes `data` to `path` atomically with `mode` (the shared helper: the temp file has the
/// mode before any byte is written, so a secret is never readable by others, even briefly).
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), StorageError> {
    kame_keymanager::fs::write_atomic(path, data, mode).map_err(|e| StorageError::Write {
        path: e.path,
        source: e.source,
    })
}

fn read_opt(path: &Path) -> Result<Option<Vec<u8>>, StorageError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StorageError::Read {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// The agent's own identity: its X509-SVID chain (leaf first) and PKCS#8 key.
#[derive(Clone)]
pub struct AgentIdentity {
    pub chain: Vec<Vec<u8>>,
    pub key_pkcs8: zeroize::Zeroizing<Vec<u8>>,
    pub reattestable: bool,
}

impl std::fmt::Debug for AgentIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentIdentity")
            .field("chain_len", &self.chain.len())
            .field("reattestable", &self.reattestable)
            .finish_non_exhaustive()
    }
}

/// One cached workload X509-SVID.
#[derive(Clone)]
pub struct CachedSvid {
    pub entry_id: String,
    pub entry_revision: i64,
    pub chain: Vec<Vec<u8>>,
    pub key_pkcs8: zeroize::Zeroizing<Vec<u8>>,
    pub not_before: u64,
    pub not_after: u64,
}

impl std::fmt::Debug for CachedSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedSvid")
            .field("entry_id", &self.entry_id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Everything the workload cache holds, as one snapshot.
#[derive(Debug, Clone, Default)]
pub struct CacheSnapshot {
    pub bundle: Option<types::Bundle>,
    pub federated: Vec<types::Bundle>,
    pub entries: Vec<types::Entry>,
    pub svids: Vec<CachedSvid>,
}

#[derive(Serialize, Deserialize)]
struct AgentFile {
    chain: Vec<String>,
    key: String,
    reattestable: bool,
}

#[derive(Serialize, Deserialize)]
struct SvidFile {
    entry_id: String,
    entry_revision: i64,
    chain: Vec<String>,
    key: String,
    not_before: u64,
    not_after: u64,
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    bundle: Option<String>,
    federated: Vec<String>,
    entries: Vec<String>,
    svids: Vec<SvidFile>,
}

/// Where things live on disk. `key_dir` is `None` with the memory KeyManager: then no key, and
/// so no SVID, is ever written; only the (public) bundle is kept.
#[derive(Debug, Clone)]
pub struct Storage {
    data_dir: PathBuf,
    key_dir: Option<PathBuf>,
}

fn b64(b: &[u8]) -> String {
    STANDARD.encode(b)
}

impl Storage {
    pub fn new(data_dir: PathBuf, key_dir: Option<PathBuf>) -> Self {
        Storage { data_dir, key_dir }
    }

    fn corrupt(path: &Path, msg: impl std::fmt::Display) -> StorageError {
        StorageError::Corrupt {
            path: path.display().to_string(),
            msg: msg.to_string(),
        }
    }

    fn unb64(path: &Path, s: &str) -> Result<Vec<u8>, StorageError> {
        STANDARD.decode(s).map_err(|e| Self::corrupt(path, e))
    }

    fn bundle_path(&self) -> PathBuf {
        self.data_dir.join("bundle.pb")
    }

    pub fn save_bundle(&self, b: &types::Bundle) -> Result<(), StorageError> {
        write_atomic(&self.bundle_path(), &b.encode_to_vec(), 0o644)
    }

    pub fn load_bundle(&self) -> Result<Option<types::Bundle>, StorageError> {
        let p = self.bundle_path();
        read_opt(&p)?
            .map(|b| types::Bundle::decode(b.as_slice()).map_err(|e| Self::corrupt(&p, e)))
            .transpose()
    }

    pub fn save_agent(&self, id: &AgentIdentity) -> Result<(), StorageError> {
        self.save_identity("agent_svid.json", id)
    }

    pub fn load_agent(&self) -> Result<Option<AgentIdentity>, StorageError> {
        self.load_identity("agent_svid.json")
    }

    /// The agent identity that signs the break-glass record: the last agent SVID and key,
    /// kept after they expire (an outage may outlast them).
    pub fn save_record_signer(&self, id: &AgentIdentity) -> Result<(), StorageError> {
        self.save_identity("break_glass_signer.json", id)
    }

    pub fn load_record_signer(&self) -> Result<Option<AgentIdentity>, StorageError> {
        self.load_identity("break_glass_signer.json")
    }

    fn save_identity(&self, name: &str, id: &AgentIdentity) -> Result<(), StorageError> {
        let Some(dir) = &self.key_dir else {
            return Ok(());
        };
        let f = AgentFile {
            chain: id.chain.iter().map(|c| b64(c)).collect(),
            key: b64(&id.key_pkcs8),
            reattestable: id.reattestable,
        };
        let json = zeroize::Zeroizing::new(
            serde_json::to_vec(&f)
                .map_err(|e| Self::corrupt(&dir.join(name), format!("encode: {e}")))?,
        );
        write_atomic(&dir.join(name), &json, 0o600)
    }

    fn load_identity(&self, name: &str) -> Result<Option<AgentIdentity>, StorageError> {
        let Some(dir) = &self.key_dir else {
            return Ok(None);
        };
        let p = dir.join(name);
        let Some(bytes) = read_opt(&p)? else {
            return Ok(None);
        };
        let bytes = zeroize::Zeroizing::new(bytes);
        let f: AgentFile = serde_json::from_slice(&bytes).map_err(|e| Self::corrupt(&p, e))?;
        Ok(Some(AgentIdentity {
            chain: f
                .chain
                .iter()
                .map(|c| Self::unb64(&p, c))
                .collect::<Result<_, _>>()?,
            key_pkcs8: zeroize::Zeroizing::new(Self::unb64(&p, &f.key)?),
            reattestable: f.reattestable,
        }))
    }

    pub fn remove_agent(&self) {
        if let Some(dir) = &self.key_dir {
            let _ = std::fs::remove_file(dir.join("agent_svid.json"));
            let _ = std::fs::remove_file(dir.join("svid_cache.json"));
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Reserve SVIDs (break-glass) and their keys, 0600, beside the SVID cache.
    pub fn save_reserves(&self, r: &[CachedSvid]) -> Result<(), StorageError> {
        let Some(dir) = &self.key_dir else {
            return Ok(());
        };
        let f: Vec<SvidFile> = r.iter().map(svid_file).collect();
        let p = dir.join("break_glass_reserves.json");
        let json = zeroize::Zeroizing::new(
            serde_json::to_vec(&f).map_err(|e| Self::corrupt(&p, format!("encode: {e}")))?,
        );
        write_atomic(&p, &json, 0o600)
    }

    pub fn load_reserves(&self) -> Result<Vec<CachedSvid>, StorageError> {
        let Some(dir) = &self.key_dir else {
            return Ok(vec![]);
        };
        let p = dir.join("break_glass_reserves.json");
        let Some(bytes) = read_opt(&p)? else {
            return Ok(vec![]);
        };
        let bytes = zeroize::Zeroizing::new(bytes);
        let f: Vec<SvidFile> = serde_json::from_slice(&bytes).map_err(|e| Self::corrupt(&p, e))?;
        f.iter().map(|s| Self::cached_svid(&p, s)).collect()
    }

    pub fn save_cache(&self, c: &CacheSnapshot) -> Result<(), StorageError> {
        let Some(dir) = &self.key_dir else {
            return Ok(());
        };
        let f = CacheFile {
            bundle: c.bundle.as_ref().map(|b| b64(&b.encode_to_vec())),
            federated: c
                .federated
                .iter()
                .map(|b| b64(&b.encode_to_vec()))
                .collect(),
            entries: c.entries.iter().map(|e| b64(&e.encode_to_vec())).collect(),
            svids: c.svids.iter().map(svid_file).collect(),
        };
        let p = dir.join("svid_cache.json");
        let json = zeroize::Zeroizing::new(
            serde_json::to_vec(&f).map_err(|e| Self::corrupt(&p, format!("encode: {e}")))?,
        );
        write_atomic(&p, &json, 0o600)
    }

    pub fn load_cache(&self) -> Result<Option<CacheSnapshot>, StorageError> {
        let Some(dir) = &self.key_dir else {
            return Ok(None);
        };
        let p = dir.join("svid_cache.json");
        let Some(bytes) = read_opt(&p)? else {
            return Ok(None);
        };
        let bytes = zeroize::Zeroizing::new(bytes);
        let f: CacheFile = serde_json::from_slice(&bytes).map_err(|e| Self::corrupt(&p, e))?;
        let dec_bundle = |s: &str| -> Result<types::Bundle, StorageError> {
            types::Bundle::decode(Self::unb64(&p, s)?.as_slice()).map_err(|e| Self::corrupt(&p, e))
        };
        Ok(Some(CacheSnapshot {
            bundle: f.bundle.as_deref().map(dec_bundle).transpose()?,
            federated: f
                .federated
                .iter()
                .map(|s| dec_bundle(s))
                .collect::<Result<_, _>>()?,
            entries: f
                .entries
                .iter()
                .map(|s| {
                    types::Entry::decode(Self::unb64(&p, s)?.as_slice())
                        .map_err(|e| Self::corrupt(&p, e))
                })
                .collect::<Result<_, _>>()?,
            svids: f
                .svids
                .iter()
                .map(|s| Self::cached_svid(&p, s))
                .collect::<Result<_, StorageError>>()?,
        }))
    }

    fn cached_svid(p: &Path, s: &SvidFile) -> Result<CachedSvid, StorageError> {
        Ok(CachedSvid {
            entry_id: s.entry_id.clone(),
            entry_revision: s.entry_revision,
            chain: s
                .chain
                .iter()
                .map(|c| Self::unb64(p, c))
                .collect::<Result<_, _>>()?,
            key_pkcs8: zeroize::Zeroizing::new(Self::unb64(p, &s.key)?),
            not_before: s.not_before,
            not_after: s.not_after,
        })
    }
}

fn svid_file(s: &CachedSvid) -> SvidFile {
    SvidFile {
        entry_id: s.entry_id.clone(),
        entry_revision: s.entry_revision,
        chain: s.chain.iter().map(|c| b64(c)).collect(),
        key: b64(&s.key_pkcs8),
        not_before: s.not_before,
        not_after: s.not_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn storage_keys_are_0600_and_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let s = Storage::new(d.path().join("data"), Some(d.path().join("keys")));
        let id = AgentIdentity {
            chain: vec![vec![1, 2, 3]],
            key_pkcs8: zeroize::Zeroizing::new(vec![9; 40]),
            reattestable: false,
        };
        s.save_agent(&id).unwrap();
        let p = d.path().join("keys/agent_svid.json");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let back = s.load_agent().unwrap().unwrap();
        assert_eq!(back.chain, id.chain);
        assert_eq!(*back.key_pkcs8, *id.key_pkcs8);
        s.save_cache(&CacheSnapshot {
            bundle: Some(types::Bundle {
                trust_domain: "example.org".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .unwrap();
        let p = d.path().join("keys/svid_cache.json");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            s.load_cache()
                .unwrap()
                .unwrap()
                .bundle
                .unwrap()
                .trust_domain,
            "example.org"
        );
        // no temp files left behind
        let left: Vec<_> = std::fs::read_dir(d.path().join("keys"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(".kame-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        std::fs::write(&p, b"{not json").unwrap();
        assert!(matches!(s.load_cache(), Err(StorageError::Corrupt { .. })));
    }

    #[test]
    fn storage_memory_key_manager_writes_no_secret() {
        let d = tempfile::tempdir().unwrap();
        let s = Storage::new(d.path().to_path_buf(), None);
        s.save_agent(&AgentIdentity {
            chain: vec![],
            key_pkcs8: zeroize::Zeroizing::new(vec![1]),
            reattestable: true,
        })
        .unwrap();
        assert!(s.load_agent().unwrap().is_none());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
