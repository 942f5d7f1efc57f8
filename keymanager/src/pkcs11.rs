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

impl Inner {
    /// A new session, logged in as the user (the token may have forgotten the login with its
    /// last session; a login another session holds already is fine).
    fn open_session(&self) -> Result<Session> {
        let session = self
            .ctx
            .open_rw_session(self.slot)
            .map_err(p11("C_OpenSession"))?;
        self.login(&session)?;
        Ok(session)
    }

    /// Logs the application in as the user on `s` (a login is the application's, shared by
    /// its sessions; one held already is fine).
    fn login(&self, s: &Session) -> Result<()> {
        use cryptoki::error::{Error as E, RvError as R};
        use std::sync::atomic::Ordering;
        let refused = || {
            Error::Config(
                "pkcs11: the token refused the user PIN; no more logins are tried (they would \
                 count toward locking it) until user_pin is fixed and the server restarted"
                    .into(),
            )
        };
        if self.pin_refused.load(Ordering::SeqCst) {
            return Err(refused());
        }
        let pin = AuthPin::new(self.pin.expose().into());
        match s.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(E::Pkcs11(R::UserAlreadyLoggedIn, _)) => Ok(()),
            Err(E::Pkcs11(
                R::PinIncorrect | R::PinLocked | R::PinExpired | R::PinInvalid | R::PinLenRange,
                _,
            )) => {
                self.pin_refused.store(true, Ordering::SeqCst);
                Err(refused())
            }
            Err(e) => Err(p11("C_Login")(e)),
        }
    }

    fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Records that `e`'s private key is `private` in `epoch`, if the index still names
    /// that instance (no rotation meanwhile).
    fn refresh(&self, e: &Entry, private: ObjectHandle, epoch: u64) {
        self.keys.update_if(&e.public.id, |c| {
            if c.instance != e.instance {
                return false;
            }
            c.private = private;
            c.epoch = epoch;
            true
        });
    }

    /// Runs `f` with a pooled session (opening one when none is free). A session that saw
    /// the token fail is not reused, nor is any other pooled one: they share its fate.
    fn with_session<T>(&self, f: impl FnOnce(&Session) -> Result<T>) -> Result<T> {
        self.with_session_from(false, f).1
    }

    /// As [`Inner::with_session`], and when a pooled session turns out dead, once more on a
    /// fresh one: for calls that may safely run twice (signatures, reads).
    fn with_session_retrying<T>(&self, f: impl Fn(&Session) -> Result<T>) -> Result<T> {
        match self.with_session_from(false, &f) {
            (true, Err(Error::Unavailable(_))) => self.with_session_from(true, &f).1,
            (_, r) => r,
        }
    }

    /// Runs `f` on a pooled session, or a fresh one when `fresh` or none is pooled; returns
    /// whether the session was a pooled one, and `f`'s result.
    fn with_session_from<T>(
        &self,
        fresh: bool,
        f: impl FnOnce(&Session) -> Result<T>,
    ) -> (bool, Result<T>) {
        let pooled = if fresh {
            None
        } else {
            match self.sessions.lock() {
                Ok(mut pool) => pool.pop(),
                Err(_) => {
                    return (
                        false,
                        Err(Error::Backend("PKCS#11 session pool poisoned".into())),
                    );
                }
            }
        };
        let was_pooled = pooled.is_some();
        let session = match pooled {
            Some(s) => s,
            None => match self.open_session() {
                Ok(s) => s,
                Err(e) => return (false, Err(e)),
            },
        };
        let r = f(&session);
        match (&r, self.sessions.lock()) {
            (Err(Error::Unavailable(_)), Ok(mut pool)) => {
                pool.clear();
                self.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            (_, Ok(mut pool)) if pool.len() < 8 => pool.push(session),
            _ => {}
        }
        (was_pooled, r)
    }

    /// The private key object of `e` found again by its label and tag (after the token
    /// restarted, its handle may have changed).
    fn relocate(&self, s: &Session, e: &Entry) -> Result<ObjectHandle> {
        let tag = hex::decode(&e.instance)
            .map_err(|_| Error::Backend(format!("bad instance {:?}", e.instance)))?;
        let found = s
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Label(self.label(&e.public.id).into_bytes()),
                Attribute::Id(tag),
            ])
            .map_err(p11("C_FindObjects(private key)"))?;
        found
            .first()
            .copied()
            .ok_or_else(|| Error::NotFound(e.public.id.clone()))
    }

    fn label(&self, id: &str) -> String {
        format!("{}{id}", self.prefix)
    }

    /// Reads a key pair's public half and type from the token.
    fn read_public(
        &self,
        s: &Session,
        id: &str,
        private: ObjectHandle,
    ) -> Result<(KeyType, Vec<u8>)> {
        let cka_id = attr_bytes(s, private, AttributeType::Id)?;
        let found = s
            .find_objects(&[
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::Label(self.label(id).into_bytes()),
                Attribute::Id(cka_id),
            ])
            .map_err(p11("C_FindObjects(public key)"))?;
        let public = *found
            .first()
            .ok_or_else(|| Error::Backend(format!("key {id:?} has no public key object")))?;
        let kt = s
            .get_attributes(public, &[AttributeType::KeyType])
            .map_err(p11("C_GetAttributeValue(CKA_KEY_TYPE)"))?;
        match kt.first() {
            Some(Attribute::KeyType(k)) if *k == cryptoki::object::KeyType::EC => {
                let params = attr_bytes(s, public, AttributeType::EcParams)?;
                let kt = if params == OID_P256 {
                    KeyType::EcP256
                } else if params == OID_P384 {
                    KeyType::EcP384
                } else {
                    return Err(Error::Backend(format!(
                        "key {id:?} is on an unsupported curve"
                    )));
                };
                let point = unwrap_octet_string(&attr_bytes(s, public, AttributeType::EcPoint)?);
                Ok((kt, encoding::ec_spki(kt, &point)?))
            }
            Some(Attribute::KeyType(k)) if *k == cryptoki::object::KeyType::RSA => {
                let n = attr_bytes(s, public, AttributeType::Modulus)?;
                let e = attr_bytes(s, public, AttributeType::PublicExponent)?;
                let kt = match n.iter().skip_while(|b| **b == 0).count() {
                    256 => KeyType::Rsa2048,
                    512 => KeyType::Rsa4096,
                    other => {
                        return Err(Error::Backend(format!(
                            "key {id:?} is RSA with a {}-bit modulus",
                            other * 8
                        )));
                    }
                };
                Ok((kt, encoding::rsa_spki(&n, &e)))
            }
            _ => Err(Error::Backend(format!(
                "key {id:?} is of an unsupported type"
            ))),
        }
    }

    /// Every private key of this server in the token: (key id, handle, CKA_ID).
    fn scan(&self, s: &Session) -> Result<Vec<(String, ObjectHandle, Vec<u8>)>> {
        let handles = s
            .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
            .map_err(p11("C_FindObjects(private keys)"))?;
        let mut out = vec![];
        for h in handles {
            let label =
                String::from_utf8(attr_bytes(s, h, AttributeType::Label)?).unwrap_or_default();
            if let Some(id) = label.strip_prefix(&self.prefix) {
                out.push((id.to_string(), h, attr_bytes(s, h, AttributeType::Id)?));
            }
        }
        Ok(out)
    }

    /// Generates a key pair for `id`, its CKA_ID the intent (a UUID's 16 bytes) or random.
    fn generate(&self, id: &str, kt: KeyType, intent: Option<&str>) -> Result<Entry> {
        let mut tag = [0u8; 16];
        match intent {
            Some(i) => {
                tag = *uuid_bytes(i)?;
            }
            None => aws_lc_rs::rand::fill(&mut tag).map_err(|_| Error::Generate(id.into()))?,
        }
        let label = self.label(id).into_bytes();
        let (mech, mut pub_t) = match kt {
            KeyType::EcP256 => (
                Mechanism::EccKeyPairGen,
                vec![Attribute::EcParams(OID_P256.to_vec())],
            ),
            KeyType::EcP384 => (
                Mechanism::EccKeyPairGen,
                vec![Attribute::EcParams(OID_P384.to_vec())],
            ),
            KeyType::Rsa2048 | KeyType::Rsa4096 => (
                Mechanism::RsaPkcsKeyPairGen,
                vec![
                    Attribute::ModulusBits(
                        if kt == KeyType::Rsa2048 {
                            2048u64
                        } else {
                            4096
                        }
                        .into(),
                    ),
                    Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
                ],
            ),
        };
        pub_t.extend([
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::Label(label.clone()),
            Attribute::Id(tag.to_vec()),
        ]);
        let priv_t = vec![
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Label(label),
            Attribute::Id(tag.to_vec()),
        ];
        self.with_session(|s| {
            let (public_h, private) = s
                .generate_key_pair(&mech, &pub_t, &priv_t)
                .map_err(p11("C_GenerateKeyPair"))?;
            let read = self.read_public(s, id, private).and_then(|(got, spki)| {
                if got == kt {
                    Ok(spki)
                } else {
                    Err(Error::Generate(id.into()))
                }
            });
            let spki_der = match read {
                Ok(spki) => spki,
                Err(e) => {
                    // Nothing may stay in the token that no id names.
                    let _ = s.destroy_object(private);
                    let _ = s.destroy_object(public_h);
                    return Err(e);
                }
            };
            Ok(Entry {
                public: PublicKey {
                    id: id.to_string(),
                    key_type: kt,
                    fingerprint: fingerprint(&spki_der),
                    spki_der,
                },
                private,
                instance: hex::encode(tag),
                epoch: self.epoch(),
            })
        })
    }

    /// Destroys the key pair tagged `instance` under `id` (both halves).
    fn destroy(&self, id: &str, instance: &str) -> Result<()> {
        let tag = hex::decode(instance)
            .map_err(|_| Error::Backend(format!("bad instance {instance:?}")))?;
        self.with_session(|s| {
            let objects = s
                .find_objects(&[
                    Attribute::Label(self.label(id).into_bytes()),
                    Attribute::Id(tag.clone()),
                ])
                .map_err(p11("C_FindObjects"))?;
            for o in objects {
                s.destroy_object(o).map_err(p11("C_DestroyObject"))?;
            }
            Ok(())
        })
    }

    fn sign(&self, e: &Entry, message: &[u8], opts: SignOpts) -> Result<Vec<u8>> {
        let kt = e.public.key_type;
        let unsupported = || Error::UnsupportedSignOpts {
            id: e.public.id.clone(),
            key_type: kt,
            hash: opts.hash,
            pss: opts.pss,
        };
        let digest = encoding::digest(opts.hash, message);
        let (mech, data) = match kt {
            KeyType::EcP256 | KeyType::EcP384 => {
                if opts.pss || opts.hash != kt.default_hash() {
                    return Err(unsupported());
                }
                (Mechanism::Ecdsa, digest)
            }
            _ if opts.pss => {
                let (hash_alg, mgf) = match opts.hash {
                    HashAlgorithm::Sha256 => (
                        cryptoki::mechanism::MechanismType::SHA256,
                        PkcsMgfType::MGF1_SHA256,
                    ),
                    HashAlgorithm::Sha384 => (
                        cryptoki::mechanism::MechanismType::SHA384,
                        PkcsMgfType::MGF1_SHA384,
                    ),
                    HashAlgorithm::Sha512 => (
                        cryptoki::mechanism::MechanismType::SHA512,
                        PkcsMgfType::MGF1_SHA512,
                    ),
                };
                let params = PkcsPssParams {
                    hash_alg,
                    mgf,
                    s_len: (digest.len() as u64).into(),
                };
                (Mechanism::RsaPkcsPss(params), digest)
            }
            _ => (
                Mechanism::RsaPkcs,
                encoding::digest_info(opts.hash, &digest),
            ),
        };
        let id = &e.public.id;
        let sig = self.with_session_retrying(|s| {
            let handle_gone = |err: &cryptoki::error::Error| {
                matches!(
                    err,
                    cryptoki::error::Error::Pkcs11(
                        cryptoki::error::RvError::KeyHandleInvalid
                            | cryptoki::error::RvError::ObjectHandleInvalid
                            | cryptoki::error::RvError::UserNotLoggedIn,
                        _
                    )
                )
            };
            let with_id = |err: Error| match err {
                Error::Unavailable(m) => Error::Unavailable(format!("{m} (key {id:?})")),
                Error::Backend(m) => Error::Backend(format!("{m} (key {id:?})")),
                other => other,
            };
            // A handle found before the token lost its sessions may name another object now:
            // find the key again by its label and tag first.
            let epoch = self.epoch();
            let private = if e.epoch == epoch {
                e.private
            } else {
                self.login(s)?;
                let h = self.relocate(s, e)?;
                self.refresh(e, h, epoch);
                h
            };
            match s.sign(&mech, private, &data) {
                Ok(sig) => Ok(sig),
                Err(err) if handle_gone(&err) => {
                    // Logged out (private objects are invisible then) or the handle moved:
                    // log in again and find the key by its label and tag.
                    let epoch = self.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    self.login(s)?;
                    let private = self.relocate(s, e)?;
                    let sig = s
                        .sign(&mech, private, &data)
                        .map_err(|err| with_id(p11("C_Sign")(err)))?;
                    self.refresh(e, private, epoch);
                    Ok(sig)
                }
                Err(err) => Err(with_id(p11("C_Sign")(err))),
            }
        })?;
        match kt {
            KeyType::EcP256 | KeyType::EcP384 => encoding::ecdsa_fixed_to_der(&sig),
            _ => Ok(sig),
        }
    }
}

/// The 16 bytes of a UUID.
fn uuid_bytes(s: &str) -> Result<Box<[u8; 16]>> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    let v = hex::decode(&hex)
        .ok()
        .filter(|v| v.len() == 16 && s.len() == 36)
        .ok_or_else(|| Error::Backend(format!("intent {s:?} is not a UUID")))?;
    let mut out = [0u8; 16];
    out.copy_from_slice(&v);
    Ok(Box::new(out))
}

/// A UUID's text from 16 bytes.
fn uuid_text(b: &[u8]) -> Option<String> {
    (b.len() == 16).then(|| {
        let h = hex::encode(b);
        format!(
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..]
        )
    })
}

fn attr_bytes(s: &Session, h: ObjectHandle, t: AttributeType) -> Result<Vec<u8>> {
    let attrs = s
        .get_attributes(h, &[t])
        .map_err(p11("C_GetAttributeValue"))?;
    match attrs.into_iter().next() {
        Some(Attribute::Id(b))
        | Some(Attribute::Label(b))
        | Some(Attribute::EcParams(b))
        | Some(Attribute::EcPoint(b))
        | Some(Attribute::Modulus(b))
        | Some(Attribute::PublicExponent(b)) => Ok(b),
        _ => Err(Error::Backend(format!("the token did not return {t:?}"))),
    }
}

/// CKA_EC_POINT is a DER OCTET STRING around the point (PKCS#11 2.40 §2.3.3); some tokens
/// return the bare point.
fn unwrap_octet_string(b: &[u8]) -> Vec<u8> {
    // Only when the inner length is a P-256 or P-384 point: a bare point can look like an
    // OCTET STRING header by chance.
    match b {
        [0x04, n, rest @ ..] if *n as usize == rest.len() && matches!(rest.len(), 65 | 97) => {
            rest.to_vec()
        }
        [0x04, 0x81, n, rest @ ..] if *n as usize == rest.len() && rest.len() == 97 => {
            rest.to_vec()
        }
        _ => b.to_vec(),
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
mod tests {
    use super::*;
    use crate::conformance;

    async fn open(hsm: &crate::testing::SoftHsm, server_id: &str) -> Pkcs11KeyManager {
        Pkcs11KeyManager::open(Pkcs11Config {
            module_path: hsm.module.clone(),
            token_label: hsm.token_label.clone(),
            user_pin: hsm.pin.as_str().into(),
            server_id: server_id.into(),
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn pkcs11_passes_keymanager_conformance_on_softhsm2() {
        let Some(hsm) = crate::testing::SoftHsm::child(
            "pkcs11::tests::pkcs11_passes_keymanager_conformance_on_softhsm2",
        ) else {
            return;
        };
        let km = open(&hsm, "server-a").await;
        conformance::run_all(&km).await;
        conformance::lifecycle(&km).await;
        // Keys are non-extractable and sensitive, and another server's keys are not ours.
        let other = open(&hsm, "server-b").await;
        assert!(other.public_keys().await.unwrap().is_empty());
        // A reopened backend finds the same keys.
        let again = open(&hsm, "server-a").await;
        let mut a = km.public_keys().await.unwrap();
        let mut b = again.public_keys().await.unwrap();
        a.sort_by(|x, y| x.id.cmp(&y.id));
        b.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(a, b);
        // After replacements, exactly one instance per key id is left.
        let inst = km.instances().await.unwrap();
        let mut ids: Vec<_> = inst.iter().map(|i| i.key_id.clone()).collect();
        ids.sort();
        let n = ids.len();
        ids.dedup();
        assert_eq!(ids.len(), n, "one instance per key: {inst:?}");
        assert!(inst.iter().all(|i| i.current));
    }

    #[tokio::test]
    async fn pkcs11_keys_are_sensitive_and_not_extractable() {
        let Some(hsm) = crate::testing::SoftHsm::child(
            "pkcs11::tests::pkcs11_keys_are_sensitive_and_not_extractable",
        ) else {
            return;
        };
        let km = open(&hsm, "server-x").await;
        km.generate_key("x509-CA-A", KeyType::EcP256).await.unwrap();
        let e = km.entry("x509-CA-A").unwrap();
        let attrs = km
            .blocking(move |inner| {
                inner.with_session(|s| {
                    s.get_attributes(
                        e.private,
                        &[AttributeType::Sensitive, AttributeType::Extractable],
                    )
                    .map_err(p11("get"))
                })
            })
            .await
            .unwrap();
        assert!(attrs.contains(&Attribute::Sensitive(true)), "{attrs:?}");
        assert!(attrs.contains(&Attribute::Extractable(false)), "{attrs:?}");
    }

    /// The token forgets the login (an HSM restart logs every application out): the next
    /// signature logs in again and goes through, and so does one over a session that the
    /// token closed.
    #[tokio::test]
    async fn pkcs11_logs_in_again_after_the_token_forgets_the_login() {
        let Some(hsm) = crate::testing::SoftHsm::child(
            "pkcs11::tests::pkcs11_logs_in_again_after_the_token_forgets_the_login",
        ) else {
            return;
        };
        let km = open(&hsm, "server-r").await;
        let pk = km.generate_key("x509-CA-A", KeyType::EcP256).await.unwrap();
        let opts = SignOpts::for_key(KeyType::EcP256);
        km.sign("x509-CA-A", b"before", opts).await.unwrap();
        async fn logout(km: &Pkcs11KeyManager) {
            km.blocking(|inner| inner.with_session(|s| s.logout().map_err(p11("C_Logout"))))
                .await
                .unwrap();
        }
        logout(&km).await;
        // Logged out, the private key is out of reach of every session.
        let e = km
            .blocking(|inner| {
                inner.with_session(|s| {
                    s.find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
                        .map_err(p11("find"))
                })
            })
            .await
            .unwrap();
        assert!(e.is_empty(), "logged out: no private key is visible");
        let sig = km.sign("x509-CA-A", b"after", opts).await.unwrap();
        aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
            &pk.spki_der,
        )
        .verify(b"after", &sig.bytes)
        .unwrap();
        // Again, with the pooled sessions closed under it as well: a fresh one logs in.
        logout(&km).await;
        km.blocking(|inner| {
            if let Ok(mut pool) = inner.sessions.lock() {
                for s in pool.drain(..) {
                    let _ = s.close();
                }
            }
            Ok(())
        })
        .await
        .unwrap();
        km.sign("x509-CA-A", b"again", opts).await.unwrap();

        // The PIN changed on the token (and the HSM forgot the login): the first login with
        // the old PIN fails, and no further login is tried, so the token cannot lock the PIN.
        km.blocking(|inner| {
            inner.with_session(|s| {
                let old = AuthPin::new(inner.pin.expose().into());
                let new = AuthPin::new("rotated-pin".into());
                s.set_pin(&old, &new).map_err(p11("C_SetPIN"))?;
                s.logout().map_err(p11("C_Logout"))
            })
        })
        .await
        .unwrap();
        for _ in 0..2 {
            let e = km
                .sign("x509-CA-A", b"refused", opts)
                .await
                .unwrap_err()
                .to_string();
            assert!(e.contains("refused the user PIN"), "{e}");
            assert!(!e.contains(&hsm.pin), "{e}");
        }
        assert!(
            km.inner
                .pin_refused
                .load(std::sync::atomic::Ordering::SeqCst)
        );
    }

    #[tokio::test]
    async fn pkcs11_wrong_pin_and_unknown_token_are_config_errors() {
        let Some(hsm) = crate::testing::SoftHsm::child(
            "pkcs11::tests::pkcs11_wrong_pin_and_unknown_token_are_config_errors",
        ) else {
            return;
        };
        let cfg = |label: &str, pin: &str| Pkcs11Config {
            module_path: hsm.module.clone(),
            token_label: label.into(),
            user_pin: pin.into(),
            server_id: "s".into(),
        };
        let e = Pkcs11KeyManager::open(cfg("no-such-token", &hsm.pin))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("no token labelled"), "{e}");
        let e = Pkcs11KeyManager::open(cfg(&hsm.token_label, "0000"))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("login") && !e.contains("0000"), "{e}");
        let mut c = cfg(&hsm.token_label, &hsm.pin);
        c.module_path = "/nonexistent/libpkcs11.so".into();
        let e = Pkcs11KeyManager::open(c).await.unwrap_err().to_string();
        assert!(e.contains("module_path"), "{e}");
    }
}
