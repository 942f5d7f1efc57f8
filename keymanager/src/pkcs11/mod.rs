//! `pkcs11` KeyManager: server signing keys generated inside a PKCS#11 token (an HSM; SoftHSM2
//! in tests) as sensitive, non-extractable token objects, and used to sign digests there.
//!
//! Each key is a key pair labelled `kame/<server id>/<key id>`; its CKA_ID is a random 16-byte
//! instance tag, so that a replaced key and its successor can be told apart. Replacing a key
//! generates the new pair first and destroys the old one only after, so a crash leaves at most
//! an extra instance (reported by [`Pkcs11KeyManager::instances`] for the server's reconcile
//! loop to dispose of), never no key. Messages are hashed here; the token signs the digest
//! (CKM_ECDSA, CKM_RSA_PKCS over a DigestInfo, CKM_RSA_PKCS_PSS). All token calls run on the
//! blocking pool, with sessions from a small pool; no lock is held while the token works.
//! When the token forgets its sessions (an HSM restarted, a network HSM reconnected), the
//! dead sessions are dropped, a fresh one logs in again, and an idempotent call (a signature,
//! a read) is retried once; a key whose object handle changed is found again by its label and
//! tag. So the PIN is kept, in memory only (zeroized on drop). It must not log the PIN, and
//! never asks the token for key bytes beyond the public half.

use crate::encoding::{self, OID_P256, OID_P384};
use crate::{
    Error, HashAlgorithm, KeyManager, KeyType, PublicKey, Result, SignOpts, Signature, fingerprint,
    validate_key_id,
};
use async_trait::async_trait;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use kame_api::Secret;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

mod objects;
mod session;
use objects::*;

/// `KeyManager "pkcs11"` settings.
#[derive(Debug, Clone)]
pub struct Pkcs11Config {
    /// The PKCS#11 module (`/usr/lib/softhsm/libsofthsm2.so`).
    pub module_path: PathBuf,
    /// The token to use, by label.
    pub token_label: String,
    /// The user PIN (from the configuration, a file or an environment variable).
    pub user_pin: Secret,
    /// This server's identity: key labels are `kame/<server_id>/<key id>`.
    pub server_id: String,
}

/// One key pair in the token.
#[derive(Debug, Clone)]
struct Entry {
    public: PublicKey,
    private: ObjectHandle,
    /// The CKA_ID (hex): this instance's tag.
    instance: String,
    /// The session epoch `private` was found in: after the token lost its sessions (a later
    /// epoch) the handle may name another object, so it is looked up again before use.
    epoch: u64,
}

impl crate::cache::Cached for Entry {
    fn public(&self) -> &PublicKey {
        &self.public
    }
}

/// A key instance in the token that belongs to this server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub key_id: String,
    /// CKA_ID, hex.
    pub instance: String,
    /// Whether it is the key `key_id` names now.
    pub current: bool,
}

struct Inner {
    ctx: Pkcs11,
    slot: Slot,
    /// The user PIN, to log in again when the token has forgotten the login.
    pin: Secret,
    /// Set when the token refused the PIN: no login is tried again (each would count toward
    /// the token locking the PIN) until the configuration is fixed and the server restarted.
    pin_refused: std::sync::atomic::AtomicBool,
    /// Bumped whenever the token is seen losing sessions or the login (see [`Entry::epoch`]).
    epoch: std::sync::atomic::AtomicU64,
    prefix: String,
    sessions: Mutex<Vec<Session>>,
    keys: crate::cache::KeyCache<Entry>,
}

pub struct Pkcs11KeyManager {
    inner: Arc<Inner>,
    /// Signatures in flight at most (each holds a session and a blocking thread).
    inflight: tokio::sync::Semaphore,
}

/// How long one signature may take in the token before the caller gets Unavailable.
const SIGN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl std::fmt::Debug for Pkcs11KeyManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11KeyManager")
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

/// Maps a PKCS#11 failure: a token or session that is gone or broken is Unavailable (the HSM
/// may come back), anything else is the backend refusing.
fn p11(op: &'static str) -> impl FnOnce(cryptoki::error::Error) -> Error {
    move |e| {
        use cryptoki::error::{Error as E, RvError as R};
        match &e {
            E::Pkcs11(
                R::DeviceError
                | R::DeviceRemoved
                | R::DeviceMemory
                | R::SessionHandleInvalid
                | R::SessionClosed
                | R::SessionCount
                | R::TokenNotPresent
                | R::TokenNotRecognized
                | R::UserNotLoggedIn
                | R::CryptokiNotInitialized,
                _,
            ) => Error::Unavailable(format!("PKCS#11 {op}: {e}")),
            _ => Error::Backend(format!("PKCS#11 {op}: {e}")),
        }
    }
}

/// One initialized context per module per process: PKCS#11 allows a single C_Initialize, and
/// finalizing one context would pull the module from under another (a server restarted in the
/// same process, several backends on one module).
fn context(module: &std::path::Path) -> Result<Pkcs11> {
    static CONTEXTS: std::sync::OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> =
        std::sync::OnceLock::new();
    let mut map = CONTEXTS
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| Error::Backend("PKCS#11 context registry poisoned".into()))?;
    if let Some(c) = map.get(module) {
        return Ok(c.clone());
    }
    let ctx = Pkcs11::new(module).map_err(|e| {
        Error::Config(format!(
            "pkcs11: cannot load module_path {}: {e}",
            module.display()
        ))
    })?;
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(p11("C_Initialize"))?;
    map.insert(module.to_path_buf(), ctx.clone());
    Ok(ctx)
}

impl Pkcs11KeyManager {
    /// Loads the module, finds the token, logs in and reads this server's keys. When a crash
    /// left two instances under one key id, the one the caller's journal names wins later
    /// (see [`Pkcs11KeyManager::instances`]); until then the first found is current.
    pub async fn open(cfg: Pkcs11Config) -> Result<Self> {
        // Labels are `kame/<server id>/<key id>`: a '/' in the id would let one server's
        // prefix match another's keys.
        if cfg.server_id.is_empty() || cfg.server_id.contains('/') {
            return Err(Error::Config(
                "pkcs11: the key identifier must be non-empty and must not contain '/'".into(),
            ));
        }
        tokio::task::spawn_blocking(move || Self::open_blocking(cfg))
            .await
            .map_err(|_| Error::Backend("PKCS#11 open task failed".into()))?
    }

    fn open_blocking(cfg: Pkcs11Config) -> Result<Self> {
        let ctx = context(&cfg.module_path)?;
        let mut slot = None;
        for s in ctx.get_slots_with_token().map_err(p11("C_GetSlotList"))? {
            let info = ctx.get_token_info(s).map_err(p11("C_GetTokenInfo"))?;
            if info.label().trim_end() == cfg.token_label {
                slot = Some(s);
                break;
            }
        }
        let slot = slot.ok_or_else(|| {
            Error::Config(format!("pkcs11: no token labelled {:?}", cfg.token_label))
        })?;
        let session = ctx.open_rw_session(slot).map_err(p11("C_OpenSession"))?;
        let pin = AuthPin::new(cfg.user_pin.expose().into());
        match session.login(UserType::User, Some(&pin)) {
            // Another backend in this process logged in to the token already.
            Ok(())
            | Err(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::UserAlreadyLoggedIn,
                _,
            )) => {}
            Err(e) => {
                return Err(Error::Config(format!(
                    "pkcs11: login to {:?} failed: {e}",
                    cfg.token_label
                )));
            }
        }
        let inner = Inner {
            ctx,
            slot,
            pin: cfg.user_pin.clone(),
            pin_refused: std::sync::atomic::AtomicBool::new(false),
            epoch: std::sync::atomic::AtomicU64::new(0),
            prefix: format!("kame/{}/", cfg.server_id),
            sessions: Mutex::new(vec![]),
            keys: crate::cache::KeyCache::new(),
        };
        let mut keys = HashMap::new();
        for (id, private, tag) in inner.scan(&session)? {
            if keys.contains_key(&id) {
                continue;
            }
            let (kt, spki_der) = inner.read_public(&session, &id, private)?;
            keys.insert(
                id.clone(),
                Entry {
                    public: PublicKey {
                        id,
                        key_type: kt,
                        fingerprint: fingerprint(&spki_der),
                        spki_der,
                    },
                    private,
                    instance: hex::encode(tag),
                    epoch: inner.epoch(),
                },
            );
        }
        if let Ok(mut pool) = inner.sessions.lock() {
            pool.push(session);
        }
        inner.keys.replace(keys);
        Ok(Pkcs11KeyManager {
            inner: Arc::new(inner),
            inflight: tokio::sync::Semaphore::new(crate::MAX_INFLIGHT_SIGNS.min(16)),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|_| Error::Backend("PKCS#11 task failed".into()))?
    }

    fn entry(&self, id: &str) -> Result<Entry> {
        self.inner.keys.get(id)
    }

    async fn generate_with(
        &self,
        id: &str,
        key_type: KeyType,
        intent: Option<String>,
    ) -> Result<PublicKey> {
        validate_key_id(id)?;
        let id2 = id.to_string();
        let entry = self
            .blocking(move |inner| inner.generate(&id2, key_type, intent.as_deref()))
            .await?;
        crate::failpoint("after_remote_create");
        let public = entry.public.clone();
        self.install(id, entry).await?;
        Ok(public)
    }

    /// Makes `entry` the key under `id`, then destroys the instance it replaces (a failure
    /// leaves that one for reconcile).
    async fn install(&self, id: &str, entry: Entry) -> Result<()> {
        let old = self.inner.keys.insert(id, entry);
        if let Some(old) = old {
            let (id2, inst) = (id.to_string(), old.instance);
            if let Err(e) = self.blocking(move |inner| inner.destroy(&id2, &inst)).await {
                tracing::warn!(error = %e, key_id = id, "could not destroy a replaced key");
            }
        }
        Ok(())
    }

    /// Every key instance of this server in the token, current or left over.
    pub async fn instances(&self) -> Result<Vec<Instance>> {
        let current: HashMap<String, String> = self
            .inner
            .keys
            .map(|e| (e.public.id.clone(), e.instance.clone()))
            .into_iter()
            .collect();
        let found = self
            .blocking(|inner| inner.with_session(|s| inner.scan(s)))
            .await?;
        Ok(found
            .into_iter()
            .map(|(key_id, _, tag)| {
                let instance = hex::encode(tag);
                Instance {
                    current: current.get(&key_id) == Some(&instance),
                    key_id,
                    instance,
                }
            })
            .collect())
    }

    /// Destroys a key instance that is not current.
    pub async fn destroy_instance(&self, key_id: &str, instance: &str) -> Result<()> {
        if self.entry(key_id).is_ok_and(|e| e.instance == instance) {
            return Err(Error::Backend(format!(
                "instance {instance} is the current key {key_id:?}"
            )));
        }
        let (id, inst) = (key_id.to_string(), instance.to_string());
        self.blocking(move |inner| inner.destroy(&id, &inst)).await
    }
}

#[async_trait]
impl KeyManager for Pkcs11KeyManager {
    fn name(&self) -> &'static str {
        "pkcs11"
    }

    async fn generate_key(&self, id: &str, key_type: KeyType) -> Result<PublicKey> {
        self.generate_with(id, key_type, None).await
    }

    /// The intent (a UUID) is the key pair's CKA_ID.
    async fn generate_key_with_intent(
        &self,
        id: &str,
        key_type: KeyType,
        intent: &str,
    ) -> Result<PublicKey> {
        self.generate_with(id, key_type, Some(intent.to_string()))
            .await
    }

    async fn adopt(&self, id: &str, intent: &str) -> Result<Option<PublicKey>> {
        let want = hex::encode(*uuid_bytes(intent)?);
        if let Ok(e) = self.entry(id)
            && e.instance == want
        {
            return Ok(Some(e.public));
        }
        let id2 = id.to_string();
        let want2 = want.clone();
        let found = self
            .blocking(move |inner| {
                inner.with_session(|s| {
                    for (key_id, private, tag) in inner.scan(s)? {
                        if key_id == id2 && hex::encode(&tag) == want2 {
                            let (kt, spki_der) = inner.read_public(s, &id2, private)?;
                            return Ok(Some(Entry {
                                public: PublicKey {
                                    id: id2.clone(),
                                    key_type: kt,
                                    fingerprint: fingerprint(&spki_der),
                                    spki_der,
                                },
                                private,
                                instance: want2.clone(),
                                epoch: inner.epoch(),
                            }));
                        }
                    }
                    Ok(None)
                })
            })
            .await?;
        let Some(entry) = found else { return Ok(None) };
        let public = entry.public.clone();
        self.install(id, entry).await?;
        Ok(Some(public))
    }

    async fn select(&self, id: &str, fp: &str) -> Result<Option<PublicKey>> {
        if let Ok(e) = self.entry(id)
            && e.public.fingerprint == fp
        {
            return Ok(Some(e.public));
        }
        let (id2, fp2) = (id.to_string(), fp.to_string());
        let found = self
            .blocking(move |inner| {
                inner.with_session(|s| {
                    for (key_id, private, tag) in inner.scan(s)? {
                        if key_id != id2 {
                            continue;
                        }
                        let (kt, spki_der) = inner.read_public(s, &id2, private)?;
                        if fingerprint(&spki_der) == fp2 {
                            return Ok(Some(Entry {
                                public: PublicKey {
                                    id: id2.clone(),
                                    key_type: kt,
                                    fingerprint: fp2.clone(),
                                    spki_der,
                                },
                                private,
                                instance: hex::encode(tag),
                                epoch: inner.epoch(),
                            }));
                        }
                    }
                    Ok(None)
                })
            })
            .await?;
        let Some(entry) = found else { return Ok(None) };
        let public = entry.public.clone();
        // The other instance stays for reconcile to judge; it is not destroyed here.
        self.inner.keys.insert(id, entry);
        Ok(Some(public))
    }

    async fn orphans(&self) -> Result<Vec<crate::Orphan>> {
        Ok(self
            .instances()
            .await?
            .into_iter()
            .filter(|i| !i.current)
            .map(|i| crate::Orphan {
                intent: hex::decode(&i.instance).ok().and_then(|b| uuid_text(&b)),
                instance: i.instance,
                key_id: Some(i.key_id),
            })
            .collect())
    }

    async fn dispose(&self, orphan: &crate::Orphan) -> Result<()> {
        let key_id = orphan
            .key_id
            .as_deref()
            .ok_or_else(|| Error::Backend("orphan without a key id".into()))?;
        self.destroy_instance(key_id, &orphan.instance).await
    }

    async fn delete_key(&self, id: &str, fingerprint: &str) -> Result<bool> {
        let Some(e) = self.inner.keys.remove_if_fingerprint(id, fingerprint) else {
            return Ok(false);
        };
        let (key_id, inst) = (id.to_string(), e.instance.clone());
        if let Err(err) = self
            .blocking(move |inner| inner.destroy(&key_id, &inst))
            .await
        {
            self.inner.keys.insert(id, e);
            return Err(err);
        }
        Ok(true)
    }

    async fn public_key(&self, id: &str) -> Result<PublicKey> {
        Ok(self.entry(id)?.public)
    }

    async fn public_keys(&self) -> Result<Vec<PublicKey>> {
        Ok(self.inner.keys.publics())
    }

    async fn sign(&self, id: &str, message: &[u8], opts: SignOpts) -> Result<Signature> {
        let e = self.entry(id)?;
        let fingerprint = e.public.fingerprint.clone();
        let msg = message.to_vec();
        let _permit = crate::sign_permit(&self.inflight, SIGN_TIMEOUT).await?;
        let bytes = tokio::time::timeout(
            SIGN_TIMEOUT,
            self.blocking(move |inner| inner.sign(&e, &msg, opts)),
        )
        .await
        .map_err(|_| Error::Unavailable("PKCS#11 signing timed out".into()))??;
        Ok(Signature { bytes, fingerprint })
    }
}

#[cfg(test)]
mod tests;
