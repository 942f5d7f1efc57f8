//! `memory` KeyManager: keys held only in process memory, lost on restart (SPIRE's `memory`).
//! Useful for tests and throwaway servers; a restart means a new CA. It must not persist keys.

use crate::local::LocalKey;
use crate::{Error, KeyManager, KeyType, PublicKey, Result, SignOpts, Signature, validate_key_id};
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

#[derive(Debug, Default)]
pub struct MemoryKeyManager {
    keys: RwLock<HashMap<String, Arc<LocalKey>>>,
}

impl MemoryKeyManager {
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn get(&self, id: &str) -> Result<Arc<LocalKey>> {
        self.keys
            .read()
            .map_err(|_| Error::Sign(id.into()))?
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(id.to_string()))
    }

    pub(crate) fn insert(&self, key: Arc<LocalKey>) -> Result<()> {
        let id = key.public.id.clone();
        self.keys
            .write()
            .map_err(|_| Error::Generate(id.clone()))?
            .insert(id, key);
        Ok(())
    }

    /// Removes the key under `id` if it has `fingerprint`.
    pub(crate) fn remove_if_fingerprint(&self, id: &str, fingerprint: &str) -> Result<bool> {
        let mut m = self.keys.write().map_err(|_| Error::NotFound(id.into()))?;
        if m.get(id)
            .is_none_or(|k| k.public.fingerprint != fingerprint)
        {
            return Ok(false);
        }
        Ok(m.remove(id).is_some())
    }

    pub(crate) fn snapshot(&self) -> Result<Vec<Arc<LocalKey>>> {
        Ok(self
            .keys
            .read()
            .map_err(|_| Error::NotFound(String::new()))?
            .values()
            .cloned()
            .collect())
    }
}

/// Generates a key off the async runtime (RSA generation takes a while).
pub(crate) async fn generate_blocking(id: &str, kt: KeyType) -> Result<LocalKey> {
    let id2 = id.to_string();
    tokio::task::spawn_blocking(move || LocalKey::generate(&id2, kt))
        .await
        .map_err(|_| Error::Generate(id.to_string()))?
}

#[async_trait]
impl KeyManager for MemoryKeyManager {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn generate_key(&self, id: &str, key_type: KeyType) -> Result<PublicKey> {
        validate_key_id(id)?;
        let key = Arc::new(generate_blocking(id, key_type).await?);
        let public = key.public.clone();
        self.insert(key)?;
        Ok(public)
    }

    async fn public_key(&self, id: &str) -> Result<PublicKey> {
        Ok(self.get(id)?.public.clone())
    }

    async fn public_keys(&self) -> Result<Vec<PublicKey>> {
        Ok(self.snapshot()?.iter().map(|k| k.public.clone()).collect())
    }

    async fn delete_key(&self, id: &str, fingerprint: &str) -> Result<bool> {
        self.remove_if_fingerprint(id, fingerprint)
    }

    async fn sign(&self, id: &str, message: &[u8], opts: SignOpts) -> Result<Signature> {
        let key = self.get(id)?;
        let bytes = key.sign(message, opts)?;
        Ok(Signature {
            bytes,
            fingerprint: key.public.fingerprint.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance;

    #[tokio::test]
    async fn memory_passes_keymanager_conformance() {
        let km = MemoryKeyManager::new();
        conformance::run_all(&km).await;
    }
}
