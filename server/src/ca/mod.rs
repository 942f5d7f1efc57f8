//! The trust domain's signing authority: two slots (A/B) per kind (X.509 CA, JWT key) with
//! automatic rotation, a CA journal in the datastore keyed by this server's id, and minting of
//! X509-SVIDs and JWT-SVIDs. Every signature goes through the KeyManager trait; this module never
//! holds a private key.
//!
//! Timing is SPIRE's (`keys_rotation.md` §2.2): with lifetime `L = notAfter - issuedAt`, the next
//! authority is prepared (and published in the bundle) when `now > notAfter - min(L/2, 30d)` and
//! activated when `now > notAfter - min(L/6, 7d)`. The old authority stays in the bundle until
//! it expires. Locks are never held across KeyManager or datastore calls; the rotation lock only
//! serializes rotations with each other.
//!
//! This module holds the CA's state and its accessors; `keys`, `journal`, `rotation` and `mint`
//! hold what their names say, and [`authority`] the operator's prepare/activate/taint/revoke.

use crate::datastore::{DataStore, DsError};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use kame_api::keys::KeyInfo;
use kame_api::pb::types::{Bundle, JwtKey, X509Certificate};
use kame_api::x509svid::{self, IssuerInfo};
use kame_api::{SpiffeId, TrustDomain, jwtsvid};
use kame_keymanager::{KeyManager, KeyType, PublicKey, SignOpts, sign_checked};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::{info, warn};

mod authority;
mod journal;
mod keys;
mod mint;
mod rotation;
mod upstream;
use keys::*;
use rotation::*;
pub use upstream::{MAX_JWT_KEYS, UpstreamDiff};

pub use authority::{AuthorityError, AuthorityView, Kind, KindState, READINESS_WINDOW};

const MAX_PREPARE_LEAD: Duration = Duration::from_secs(30 * 86400);
const MAX_ACTIVATE_LEAD: Duration = Duration::from_secs(7 * 86400);
const JOURNAL_MAX_PER_KIND: usize = 10;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    #[error("no active {0} authority yet (server is initializing)")]
    NotReady(&'static str),
    #[error("key manager: {0}")]
    KeyManager(#[from] kame_keymanager::Error),
    #[error("datastore: {0}")]
    Datastore(#[from] DsError),
    #[error("{0}")]
    Profile(#[from] kame_api::Error),
    #[error("invalid TTL: {0}")]
    InvalidTtl(String),
    #[error("CA journal: {0}")]
    Journal(#[source] serde_json::Error),
    /// The server's own SVID key could not be made or loaded (step named).
    #[error("server SVID key: {0}")]
    ServerSvidKey(String),
    #[error("server SVID key: rustls refused it: {0}")]
    ServerSvidKeyLoad(#[source] rustls::Error),
    #[error("the system random number generator failed")]
    Random,
    #[error("upstream authority: {0}")]
    Upstream(#[from] kame_upstream::UpstreamError),
    #[error("X509 CA minted by upstream authority is invalid: {0}")]
    BadUpstreamCa(String),
    #[error("the bundle already holds {0} JWT keys")]
    TooManyJwtKeys(usize),
    #[error("rotation: {0}")]
    Rotation(String),
    /// The transparency log could not record an SVID while `required` is set.
    #[error("transparency log: {0}")]
    Transparency(#[from] crate::transparency::LogError),
    /// A step on the server's own data failed: a bug (Internal).
    #[error("internal error: {0}")]
    Internal(String),
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn now_secs() -> u64 {
    now_ms() / 1000
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum SlotStatus {
    Prepared,
    Active,
    Old,
}

/// An X.509 signing authority in a slot.
#[derive(Debug, Clone)]
pub struct X509Authority {
    pub slot: String,
    pub status: SlotStatus,
    pub key: PublicKey,
    pub cert_der: Vec<u8>,
    pub issuer: IssuerInfo,
    /// Lower-case hex SKI, the authority ID.
    pub authority_id: String,
    pub issued_at_ms: u64,
    pub not_after: u64,
    /// With an upstream authority: the certificates that issued `cert_der`, as the upstream
    /// returned them (empty when `cert_der` is self-signed).
    pub upstream_chain: Vec<Vec<u8>>,
    /// With an upstream authority: the SKID (lower-case hex) of the upstream CA that signed
    /// `cert_der`; empty when self-signed.
    pub upstream_authority_id: String,
    /// An upstream signed `cert_der` (it is not in the bundle; its chain ends at a root there).
    pub upstream_signed: bool,
}

impl X509Authority {
    /// Whether an upstream authority signed this CA (it is then not in the bundle).
    pub fn is_upstream_signed(&self) -> bool {
        self.upstream_signed
    }

    /// What follows a certificate this authority signs in a chain: nothing when it is a
    /// root of the bundle; itself and the upstream's chain when an upstream signed it.
    pub fn chain_tail(&self) -> Vec<Vec<u8>> {
        if !self.is_upstream_signed() {
            return vec![];
        }
        let mut out = Vec::with_capacity(1 + self.upstream_chain.len());
        out.push(self.cert_der.clone());
        out.extend(self.upstream_chain.iter().cloned());
        out
    }
}

/// A JWT signing key in a slot.
#[derive(Debug, Clone)]
pub struct JwtAuthority {
    pub slot: String,
    pub status: SlotStatus,
    pub key: PublicKey,
    pub key_info: KeyInfo,
    pub kid: String,
    pub issued_at_ms: u64,
    pub not_after: u64,
}

trait Lifetime {
    fn issued_at_ms(&self) -> u64;
    fn not_after(&self) -> u64;
    fn slot(&self) -> &str;
    fn should(&self, lead_cap: Duration, div: u64, now_ms: u64) -> bool {
        let end = self.not_after() * 1000;
        let life = end.saturating_sub(self.issued_at_ms());
        let lead = (life / div).min(lead_cap.as_millis() as u64);
        now_ms > end.saturating_sub(lead)
    }
    fn should_prepare_next(&self, now_ms: u64) -> bool {
        self.should(MAX_PREPARE_LEAD, 2, now_ms)
    }
    fn should_activate_next(&self, now_ms: u64) -> bool {
        self.should(MAX_ACTIVATE_LEAD, 6, now_ms)
    }
}

impl Lifetime for X509Authority {
    fn issued_at_ms(&self) -> u64 {
        self.issued_at_ms
    }
    fn not_after(&self) -> u64 {
        self.not_after
    }
    fn slot(&self) -> &str {
        &self.slot
    }
}
impl Lifetime for JwtAuthority {
    fn issued_at_ms(&self) -> u64 {
        self.issued_at_ms
    }
    fn not_after(&self) -> u64 {
        self.not_after
    }
    fn slot(&self) -> &str {
        &self.slot
    }
}

#[derive(Debug)]
struct Slots<T> {
    current: Option<Arc<T>>,
    next: Option<Arc<T>>,
    /// OLD authorities that left the next slot (newest first), still in the bundle: they can
    /// still be tainted and revoked. Their keys were disposed of when their slot was prepared
    /// again.
    older: Vec<Arc<T>>,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Slots {
            current: None,
            next: None,
            older: vec![],
        }
    }
}

/// At most this many OLD authorities per kind are remembered besides the two slots.
const MAX_OLDER: usize = JOURNAL_MAX_PER_KIND - 2;

#[derive(Debug, Default)]
struct State {
    x509: Slots<X509Authority>,
    jwt: Slots<JwtAuthority>,
}

/// Static CA settings.
#[derive(Debug, Clone)]
pub struct CaSettings {
    pub trust_domain: TrustDomain,
    pub server_id: String,
    pub ca_ttl: Duration,
    pub ca_key_type: KeyType,
    pub jwt_key_type: KeyType,
    pub ca_subject_dn: String,
    pub jwt_issuer: Option<String>,
    pub signing_mode: SigningMode,
    /// `UpstreamAuthority`: signs the X.509 CA from a CSR; its roots are the bundle's.
    pub upstream: Option<Arc<dyn kame_upstream::UpstreamAuthority>>,
    /// The issuance transparency log: X509-SVIDs are recorded there and carry its SCT.
    pub transparency: Option<Arc<crate::transparency::TransparencyLog>>,
}

/// How X509-SVIDs are signed.
///
/// `Direct` (the default, as SPIRE): every SVID is one signature by the authority key, so
/// with a remote KeyManager every SVID is a KMS/Vault/HSM round trip, and the key never signs
/// anything the backend did not see. `KmsRooted`: at each rotation, and whenever the current
/// one has less than half its lifetime left, the authority key certifies a short-lived
/// intermediate CA whose P-256 key lives only in this process's memory; that intermediate
/// signs the SVIDs, and SVID chains carry it. The backend then signs about once per
/// `intermediate_ttl / 2` instead of once per SVID. The trade-off: a key that can mint SVIDs
/// for the whole trust domain sits in server memory for up to `intermediate_ttl` (a
/// compromise of the server process yields it until it expires), and SVIDs are cut short at
/// the intermediate's notAfter. JWT-SVIDs are signed by the backend key in both modes: a JWT
/// verifier needs the signing key itself in the bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigningMode {
    Direct,
    KmsRooted { intermediate_ttl: Duration },
}

/// The in-memory intermediate of `kms_rooted` signing; its private key lives in its own
/// in-memory KeyManager and goes with it.
#[derive(Debug)]
struct Intermediate {
    parent: String,
    km: kame_keymanager::memory::MemoryKeyManager,
    key: PublicKey,
    cert_der: Vec<u8>,
    issuer: IssuerInfo,
    issued_at: u64,
    not_after: u64,
}

#[derive(Debug)]
pub struct Ca {
    settings: CaSettings,
    km: Arc<dyn KeyManager>,
    ds: Arc<dyn DataStore>,
    state: RwLock<State>,
    rotation: tokio::sync::Mutex<()>,
    /// The trust domain's bundle as last read or written (used by TLS verification).
    bundle: RwLock<Arc<Bundle>>,
    /// Intents of keys created since the journal was last saved.
    unsaved_intents: std::sync::Mutex<Vec<String>>,
    /// `kms_rooted`: the intermediate (its key is never written anywhere).
    intermediate: RwLock<Option<Arc<Intermediate>>>,
    /// One intermediate minted at a time (not a KeyManager lock: it only keeps concurrent
    /// requests from each asking the backend for a signature).
    minting: tokio::sync::Mutex<()>,
    metrics: crate::metrics::Metrics,
    /// Signalled when an authority is tainted here, so the rotation loop re-issues the
    /// server's own SVID at once instead of at its next tick.
    taint_notify: tokio::sync::Notify,
    /// The upstream does not take JWT keys, and the operator has been told.
    jwt_unpublished_warned: std::sync::atomic::AtomicBool,
}

/// What a reconcile pass found and did (logged as the key inventory).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyInventory {
    /// Keys the KeyManager names (current slots and their predecessors in the journal).
    pub named: usize,
    /// Orphans kept because a pending intent may still reuse them.
    pub pending: usize,
    /// Orphans disposed of in this pass.
    pub disposed: usize,
    /// Orphans left for the next pass (over the per-pass cap, or disposal failed).
    pub remaining: usize,
    /// Keys of other servers of the trust domain that stopped refreshing their liveness,
    /// disposed of in this pass (KMS and Vault).
    pub swept: usize,
}

/// At most this many orphans are disposed of per reconcile pass.
pub const RECONCILE_CAP: usize = 50;

#[derive(Serialize, Deserialize, Default)]
struct Journal {
    x509: Vec<JournalX509>,
    jwt: Vec<JournalJwt>,
}

#[derive(Serialize, Deserialize, Clone)]
struct JournalX509 {
    slot: String,
    status: SlotStatus,
    cert: String,
    key_fingerprint: String,
    issued_at_ms: u64,
    not_after: u64,
    /// Base64 DER of the certificates an upstream returned after `cert` (absent: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    upstream_chain: Vec<String>,
    /// The upstream CA's SKID (hex) when an upstream signed `cert`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    upstream_authority_id: String,
    /// An upstream signed `cert` (absent: self-signed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    upstream_signed: bool,
}

#[derive(Serialize, Deserialize, Clone)]
struct JournalJwt {
    slot: String,
    status: SlotStatus,
    kid: String,
    public_key: String,
    key_fingerprint: String,
    issued_at_ms: u64,
    not_after: u64,
}

fn x509_key_id(slot: &str) -> String {
    format!("x509-CA-{slot}")
}

fn jwt_key_id(slot: &str) -> String {
    format!("JWT-Signer-{slot}")
}

fn other_slot(slot: &str) -> &'static str {
    if slot == "A" { "B" } else { "A" }
}

fn random_bytes(n: usize) -> Result<Vec<u8>, CaError> {
    let mut b = vec![0u8; n];
    // Serial numbers and key IDs must be unpredictable: no fallback if the OS RNG fails.
    aws_lc_rs::rand::fill(&mut b).map_err(|_| CaError::Random)?;
    Ok(b)
}

/// A positive, non-zero 128-bit certificate serial number.
pub fn random_serial() -> Result<Vec<u8>, CaError> {
    let mut s = random_bytes(16)?;
    s[0] &= 0x7f;
    if s[0] == 0 {
        s[0] = 1;
    }
    Ok(s)
}

/// A JWT key ID: 32 characters of `[a-zA-Z0-9]`, unbiased.
pub fn random_kid() -> Result<String, CaError> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(32);
    while out.len() < 32 {
        for b in random_bytes(64)? {
            // 248 = 4 * 62: reject the tail to avoid modulo bias.
            if b < 248 && out.len() < 32 {
                out.push(ALPHABET[(b % 62) as usize] as char);
            }
        }
    }
    Ok(out)
}

impl Ca {
    /// Loads the journal (keeping only authorities that are unexpired, in the bundle and whose
    /// key the KeyManager still holds) and runs one rotation so that an authority is active.
    pub async fn start(
        settings: CaSettings,
        km: Arc<dyn KeyManager>,
        ds: Arc<dyn DataStore>,
    ) -> Result<Arc<Self>, CaError> {
        let bundle = ds
            .fetch_bundle(settings.trust_domain.as_str())
            .await?
            .unwrap_or_else(|| Bundle {
                trust_domain: settings.trust_domain.as_str().to_string(),
                ..Default::default()
            });
        let ca = Arc::new(Ca {
            settings,
            km,
            ds,
            state: RwLock::new(State::default()),
            rotation: tokio::sync::Mutex::new(()),
            bundle: RwLock::new(Arc::new(bundle)),
            unsaved_intents: Default::default(),
            intermediate: RwLock::new(None),
            minting: tokio::sync::Mutex::new(()),
            metrics: Default::default(),
            taint_notify: tokio::sync::Notify::new(),
            jwt_unpublished_warned: Default::default(),
        });
        ca.load_journal().await?;
        ca.rotate().await?;
        if let Err(e) = ca.reconcile_keys().await {
            warn!(error = %e, "key reconcile failed; it runs again later");
        }
        Ok(ca)
    }

    /// Resolves when an authority was tainted through this server since the last call.
    pub async fn tainted(&self) {
        self.taint_notify.notified().await
    }

    /// The Prometheus text of this CA's key inventory.
    /// The counters the API services add to (attestations).
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// The CA's metrics: the key inventory, SVIDs issued, and when the authorities expire.
    pub fn render_metrics(&self) -> String {
        let expiry = |slot: &str, kind: &str, at: Option<u64>| {
            at.map(|t| {
                format!("kame_ca_authority_expiry_timestamp_seconds{{kind=\"{kind}\",slot=\"{slot}\"}} {t}\n")
            })
            .unwrap_or_default()
        };
        let (x_cur, x_next, j_cur, j_next) = {
            let st = self.read();
            (
                st.x509.current.as_ref().map(|a| a.not_after),
                st.x509.next.as_ref().map(|a| a.not_after),
                st.jwt.current.as_ref().map(|a| a.not_after),
                st.jwt.next.as_ref().map(|a| a.not_after),
            )
        };
        self.metrics.render(self.km.name())
            + "# HELP kame_ca_authority_expiry_timestamp_seconds When each X.509 and JWT authority of this server expires (unix seconds), by slot.\n\
               # TYPE kame_ca_authority_expiry_timestamp_seconds gauge\n"
            + &expiry("current", "x509", x_cur)
            + &expiry("next", "x509", x_next)
            + &expiry("current", "jwt", j_cur)
            + &expiry("next", "jwt", j_next)
    }

    pub fn settings(&self) -> &CaSettings {
        &self.settings
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.settings.trust_domain
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn current_x509(&self) -> Option<Arc<X509Authority>> {
        self.read().x509.current.clone()
    }

    pub fn next_x509(&self) -> Option<Arc<X509Authority>> {
        self.read().x509.next.clone()
    }

    pub fn current_jwt(&self) -> Option<Arc<JwtAuthority>> {
        self.read().jwt.current.clone()
    }

    /// The cached bundle of this trust domain.
    pub fn bundle(&self) -> Arc<Bundle> {
        self.bundle
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads the bundle from the datastore into the cache.
    pub async fn refresh_bundle(&self) -> Result<Arc<Bundle>, CaError> {
        if let Some(b) = self
            .ds
            .fetch_bundle(self.settings.trust_domain.as_str())
            .await?
        {
            let b = Arc::new(b);
            *self.bundle.write().unwrap_or_else(|p| p.into_inner()) = b.clone();
            return Ok(b);
        }
        Ok(self.bundle())
    }
}

/// What the rotation state machine needs of an authority of either kind.
trait Authority: Lifetime + Clone {
    const KIND: &'static str;
    fn status(&self) -> SlotStatus;
    fn authority_id(&self) -> &str;
    fn with_status(&self, status: SlotStatus) -> Self {
        let mut a = self.clone();
        a.set_status(status);
        a
    }
    fn set_status(&mut self, status: SlotStatus);
}

impl Authority for X509Authority {
    const KIND: &'static str = "X.509";
    fn status(&self) -> SlotStatus {
        self.status
    }
    fn authority_id(&self) -> &str {
        &self.authority_id
    }
    fn set_status(&mut self, status: SlotStatus) {
        self.status = status;
    }
}

impl Authority for JwtAuthority {
    const KIND: &'static str = "JWT";
    fn status(&self) -> SlotStatus {
        self.status
    }
    fn authority_id(&self) -> &str {
        &self.kid
    }
    fn set_status(&mut self, status: SlotStatus) {
        self.status = status;
    }
}

impl<T: Authority> Slots<T> {
    /// Every authority held, current first, then next, then the older ones.
    fn all(&self) -> impl Iterator<Item = &Arc<T>> {
        self.current
            .iter()
            .chain(self.next.iter())
            .chain(self.older.iter())
    }

    /// Remembers an OLD authority that leaves the next slot (newest first, capped).
    fn remember(&mut self, a: Arc<T>) {
        self.older.retain(|o| o.authority_id() != a.authority_id());
        self.older.insert(0, a);
        self.older.truncate(MAX_OLDER);
    }

    /// Puts a newly prepared authority in the next slot; an OLD one there is remembered, a
    /// PREPARED one replaced (with `force`) is remembered as OLD: it was published, so it can
    /// still be tainted and revoked.
    fn install_next(&mut self, a: Arc<T>) {
        if let Some(n) = self.next.take() {
            self.remember(match n.status() {
                SlotStatus::Old => n,
                _ => Arc::new(n.with_status(SlotStatus::Old)),
            });
        }
        self.next = Some(a);
    }
}
