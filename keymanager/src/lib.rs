//! The `KeyManager` seam: where a Kame server's private keys live and how they sign.
//!
//! A backend creates keys under stable ids (`x509-CA-A`, `JWT-Signer-B`, ...), reports their
//! public keys (SPKI DER) with a fingerprint (hex SHA-256 of the SPKI), and signs *messages*
//! (the TBS bytes of a certificate, the JWT signing input), not digests, so each backend can sign
//! the way its service does best. ECDSA signatures are ASN.1 DER (as in X.509); RSA signatures are
//! PKCS#1 v1.5 or PSS. `generate_key` on an existing id replaces the key (new fingerprint).
//!
//! This crate knows nothing about CAs, SVIDs or SPIFFE: it must not build certificates or tokens.
//! Backends live one per module behind a cargo feature; [`conformance`] is the test suite every
//! backend must pass.

use async_trait::async_trait;
use std::fmt;
use std::str::FromStr;

#[cfg(feature = "aws_kms")]
pub mod aws_kms;
#[cfg(feature = "aws_sdk")]
pub mod aws_sdk;
#[cfg(any(feature = "aws_kms", feature = "hashicorp_vault", feature = "pkcs11"))]
mod cache;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
#[cfg(feature = "disk")]
pub mod disk;
pub mod encoding;
pub mod fs;
#[cfg(feature = "hashicorp_vault")]
pub mod hashicorp_vault;
#[cfg(any(feature = "memory", feature = "disk"))]
mod local;
#[cfg(feature = "memory")]
pub mod memory;
#[cfg(feature = "memory")]
pub mod pem;
#[cfg(feature = "pkcs11")]
pub mod pkcs11;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

/// The key types a KeyManager can create (SPIRE's `ca_key_type` / `jwt_key_type` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyType {
    EcP256,
    EcP384,
    Rsa2048,
    Rsa4096,
}

impl KeyType {
    pub const ALL: [KeyType; 4] = [
        KeyType::EcP256,
        KeyType::EcP384,
        KeyType::Rsa2048,
        KeyType::Rsa4096,
    ];

    /// The configuration spelling: `ec-p256`, `ec-p384`, `rsa-2048`, `rsa-4096`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcP256 => "ec-p256",
            KeyType::EcP384 => "ec-p384",
            KeyType::Rsa2048 => "rsa-2048",
            KeyType::Rsa4096 => "rsa-4096",
        }
    }

    /// The hash a signature with this key type uses by default (P-256/SHA-256, P-384/SHA-384,
    /// RSA/SHA-256), matching what KMS services accept.
    pub fn default_hash(self) -> HashAlgorithm {
        match self {
            KeyType::EcP384 => HashAlgorithm::Sha384,
            _ => HashAlgorithm::Sha256,
        }
    }

    pub fn is_rsa(self) -> bool {
        matches!(self, KeyType::Rsa2048 | KeyType::Rsa4096)
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        KeyType::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| Error::UnknownKeyType(s.to_string()))
    }
}

/// Hash algorithms a signature may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HashAlgorithm {
    Sha256,
    Sha384,
    Sha512,
}

/// How to sign: which hash, and for RSA whether to use PSS (salt length = hash length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignOpts {
    pub hash: HashAlgorithm,
    pub pss: bool,
}

impl SignOpts {
    pub fn for_key(kt: KeyType) -> Self {
        SignOpts {
            hash: kt.default_hash(),
            pss: false,
        }
    }
}

/// A key's public half as the backend reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub id: String,
    pub key_type: KeyType,
    /// SubjectPublicKeyInfo, DER.
    pub spki_der: Vec<u8>,
    /// Hex SHA-256 of `spki_der`; identifies this key *instance* under `id`.
    pub fingerprint: String,
}

/// A signature and the fingerprint of the key instance that made it.
#[derive(Debug, Clone)]
pub struct Signature {
    pub bytes: Vec<u8>,
    pub fingerprint: String,
}

/// Everything that can go wrong in a KeyManager, one variant per failed check.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("unknown key type {0:?} (expected ec-p256, ec-p384, rsa-2048 or rsa-4096)")]
    UnknownKeyType(String),
    #[error("invalid key id {0:?}")]
    InvalidKeyId(String),
    #[error("no key with id {0:?}")]
    NotFound(String),
    #[error("key {id:?} is {key_type}, which cannot sign with {hash:?}{}", if *.pss { " (PSS)" } else { "" })]
    UnsupportedSignOpts {
        id: String,
        key_type: KeyType,
        hash: HashAlgorithm,
        pss: bool,
    },
    #[error("key generation failed for {0:?}")]
    Generate(String),
    #[error("signing with key {0:?} failed")]
    Sign(String),
    #[error("key {id:?} changed under us: expected fingerprint {expected}, got {got}")]
    FingerprintMismatch {
        id: String,
        expected: String,
        got: String,
    },
    #[error("key store {path}: {reason}")]
    Store { path: String, reason: String },
    #[error("key store {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("key store: {0}")]
    Write(#[from] crate::fs::WriteError),
    /// The backend answered, but not as it should (refused, malformed, inconsistent).
    #[error("key backend: {0}")]
    Backend(String),
    /// The backend cannot be reached, timed out or is throttling: try again later.
    #[error("key backend unavailable: {0}")]
    Unavailable(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Where server signing keys live. Implementations never hold a lock across network I/O.
#[async_trait]
pub trait KeyManager: Send + Sync + fmt::Debug {
    /// The backend's name as used in configuration (`memory`, `disk`, ...).
    fn name(&self) -> &'static str;

    /// Creates a new key under `id`, replacing any key already there.
    async fn generate_key(&self, id: &str, key_type: KeyType) -> Result<PublicKey>;

    /// The public key under `id`; [`Error::NotFound`] if there is none.
    async fn public_key(&self, id: &str) -> Result<PublicKey>;

    /// Every key this backend instance manages (any order).
    async fn public_keys(&self) -> Result<Vec<PublicKey>>;

    /// Signs `message` with the key under `id`.
    async fn sign(&self, id: &str, message: &[u8], opts: SignOpts) -> Result<Signature>;

    // The crash-safe lifecycle (remote backends). The CA journals an intent (a UUID) before it
    // asks for a key, and the backend marks the key it creates with it, so that after a crash
    // the key can be found again: reused instead of creating another, or disposed of. Local
    // backends lose nothing in a crash and keep the defaults.

    /// As [`KeyManager::generate_key`], marking the new key with `intent`.
    async fn generate_key_with_intent(
        &self,
        id: &str,
        key_type: KeyType,
        intent: &str,
    ) -> Result<PublicKey> {
        let _ = intent;
        self.generate_key(id, key_type).await
    }

    /// Makes the key created for `intent` the key under `id`, if the backend has it (a
    /// generation a crash cut short); the key `id` named before is disposed of.
    async fn adopt(&self, id: &str, intent: &str) -> Result<Option<PublicKey>> {
        let _ = (id, intent);
        Ok(None)
    }

    /// This server's keys in the backend that no id names: left by a crash or by a disposal
    /// that failed.
    async fn orphans(&self) -> Result<Vec<Orphan>> {
        Ok(vec![])
    }

    /// Disposes of an orphan: ScheduleKeyDeletion in KMS, delete in Vault, destroy in PKCS#11.
    async fn dispose(&self, orphan: &Orphan) -> Result<()> {
        let _ = orphan;
        Ok(())
    }

    /// The key under `id` whose fingerprint is `fingerprint`, made current if the backend holds
    /// several instances under `id` (a crash's leftover, a key version added out of band); None
    /// when none has it. The CA asks for the key its journal names, so that a leftover never
    /// displaces an authority's key.
    async fn select(&self, id: &str, fingerprint: &str) -> Result<Option<PublicKey>> {
        match self.public_key(id).await {
            Ok(k) if k.fingerprint == fingerprint => Ok(Some(k)),
            Ok(_) | Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Disposes of the key under `id` if its fingerprint is `fingerprint` (a revoked
    /// authority's key): ScheduleKeyDeletion in KMS, delete in Vault, destroy in PKCS#11,
    /// erased in memory and on disk. Afterwards `id` names no key. Returns false, touching
    /// nothing, when `id` names no key or a key with another fingerprint (the slot was
    /// prepared again since, and its old key was disposed of then).
    async fn delete_key(&self, id: &str, fingerprint: &str) -> Result<bool>;

    /// Periodic upkeep shared with other servers of the trust domain: refresh this server's
    /// liveness stamp, and dispose of the keys of servers that stopped refreshing theirs.
    /// Returns how many such keys were disposed of.
    async fn maintain(&self) -> Result<usize> {
        Ok(0)
    }
}

/// A key in a backend that belongs to this server but that no key id names now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    /// The backend's handle: a KMS key ARN, a Transit key name, a PKCS#11 CKA_ID (hex).
    pub instance: String,
    /// The key id it was made for, when the backend recorded it.
    pub key_id: Option<String>,
    /// The intent it was made under, when the backend recorded it.
    pub intent: Option<String>,
}

/// Signs and checks that the signature came from the key instance the caller expects.
pub async fn sign_checked(
    km: &dyn KeyManager,
    key: &PublicKey,
    message: &[u8],
    opts: SignOpts,
) -> Result<Vec<u8>> {
    let sig = km.sign(&key.id, message, opts).await?;
    if sig.fingerprint != key.fingerprint {
        return Err(Error::FingerprintMismatch {
            id: key.id.clone(),
            expected: key.fingerprint.clone(),
            got: sig.fingerprint,
        });
    }
    Ok(sig.bytes)
}

/// Fault injection for crash tests (feature `failpoints`, which production builds leave off:
/// without it this does nothing): when the environment variable `KAME_TEST_FAILPOINT` names
/// `point`, the process aborts here (as a crash would). Points: `after_remote_create` (a
/// remote backend created a key and has not named it yet), `after_key_create` (the CA got a
/// key and has not journaled it). Read once.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn failpoint(_point: &str) {}

/// See the version without the `failpoints` feature.
#[cfg(feature = "failpoints")]
pub fn failpoint(point: &str) {
    static SET: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if SET
        .get_or_init(|| std::env::var("KAME_TEST_FAILPOINT").ok())
        .as_deref()
        == Some(point)
    {
        eprintln!("failpoint {point}: aborting");
        std::process::abort();
    }
}

/// Remote backends send at most this many signing requests at once; more wait for a slot.
pub const MAX_INFLIGHT_SIGNS: usize = 64;

/// A slot to send a signing request; waiting longer than `deadline` is
/// [`Error::Unavailable`] (the backend is saturated: fail fast rather than queue forever).
pub async fn sign_permit(
    sem: &tokio::sync::Semaphore,
    deadline: std::time::Duration,
) -> Result<tokio::sync::SemaphorePermit<'_>> {
    match tokio::time::timeout(deadline, sem.acquire()).await {
        Ok(Ok(p)) => Ok(p),
        _ => Err(Error::Unavailable(
            "too many signing requests in flight to the key backend".into(),
        )),
    }
}

/// Hex SHA-256 of an SPKI: the fingerprint every built-in backend reports.
pub fn fingerprint(spki_der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(spki_der))
}

#[cfg_attr(
    not(any(
        feature = "memory",
        feature = "disk",
        feature = "aws_kms",
        feature = "hashicorp_vault",
        feature = "pkcs11"
    )),
    allow(dead_code)
)]
pub(crate) fn validate_key_id(id: &str) -> Result<()> {
    if id.is_empty()
        || id.len() > 256
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.+/".contains(&b))
    {
        return Err(Error::InvalidKeyId(id.to_string()));
    }
    Ok(())
}
