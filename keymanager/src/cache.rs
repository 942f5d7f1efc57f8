//! The index a remote backend keeps of its keys: key id → entry (the public key and the
//! backend's handle), so that looking up a key never touches the network. Short critical
//! sections only; nothing here is held across an await. A poisoned lock is recovered (the map
//! holds only values written whole). It must not know any backend.

use crate::{Error, PublicKey, Result};
use std::collections::HashMap;
use std::sync::RwLock;

/// An entry with the public key it describes.
pub(crate) trait Cached: Clone {
    fn public(&self) -> &PublicKey;
}

#[derive(Debug, Default)]
pub(crate) struct KeyCache<E>(RwLock<HashMap<String, E>>);

impl<E: Cached> KeyCache<E> {
    pub fn new() -> Self {
        KeyCache(RwLock::new(HashMap::new()))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, E>> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, E>> {
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The entry under `id`; [`Error::NotFound`] if none.
    pub fn get(&self, id: &str) -> Result<E> {
        self.read()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(id.to_string()))
    }

    /// Puts `e` under `id`; returns the entry it replaces.
    pub fn insert(&self, id: &str, e: E) -> Option<E> {
        self.write().insert(id.to_string(), e)
    }

    /// Changes the entry under `id` in place with `f`, under the lock (a compare-and-swap:
    /// `f` checks the entry is still the one it means and returns whether it changed it).
    #[cfg(feature = "pkcs11")]
    pub fn update_if(&self, id: &str, f: impl FnOnce(&mut E) -> bool) -> bool {
        self.write().get_mut(id).is_some_and(f)
    }

    /// Removes and returns the entry under `id` if its key has `fingerprint`.
    pub fn remove_if_fingerprint(&self, id: &str, fingerprint: &str) -> Option<E> {
        let mut m = self.write();
        if m.get(id)?.public().fingerprint != fingerprint {
            return None;
        }
        m.remove(id)
    }

    /// Replaces the whole index.
    pub fn replace(&self, all: HashMap<String, E>) {
        *self.write() = all;
    }

    /// Every entry's public key.
    pub fn publics(&self) -> Vec<PublicKey> {
        self.read().values().map(|e| e.public().clone()).collect()
    }

    /// `f` of every entry.
    pub fn map<T>(&self, f: impl Fn(&E) -> T) -> Vec<T> {
        self.read().values().map(f).collect()
    }
}
