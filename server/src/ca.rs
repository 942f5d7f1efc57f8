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
pub use authority::{AuthorityError, AuthorityView, Kind, KindState, READINESS_WINDOW};

const MAX_PREPARE_LEAD: Duration = Duration::from_secs(30 * 86400);
const MAX_ACTIVATE_LEAD: Duration = Duration::from_secs(7 * 86400);
const JOURNAL_MAX_PER_KIND: usize = 10;

#[derive(Debug, thiserror::Error)]
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
    Journal(String),
    #[error("the system random number generator failed")]
    Random,
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
        });
        ca.load_journal().await?;
        ca.rotate().await?;
        if let Err(e) = ca.reconcile_keys().await {
            warn!(error = %e, "key reconcile failed; it runs again later");
        }
        Ok(ca)
    }

    /// Whether an authority in either slot holds the key with `fingerprint`.
    fn key_in_use(&self, fingerprint: &str) -> bool {
        let st = self.read();
        let x = [&st.x509.current, &st.x509.next]
            .into_iter()
            .flatten()
            .any(|a| a.key.fingerprint == fingerprint);
        let j = [&st.jwt.current, &st.jwt.next]
            .into_iter()
            .flatten()
            .any(|a| a.key.fingerprint == fingerprint);
        x || j
    }

    /// A key for `key_id`: the one a crash-interrupted generation left (its intent is still
    /// pending), else a new one made under a fresh intent journaled first.
    async fn new_key(&self, key_id: &str, kt: KeyType) -> Result<PublicKey, CaError> {
        let server_id = &self.settings.server_id;
        for i in self.ds.list_key_intents(server_id).await? {
            if i.key_id != key_id {
                continue;
            }
            // Made for another key type (the configuration changed since): not reused, and no
            // longer pending, so the reconcile pass disposes of it.
            if i.key_type != kt.to_string() {
                self.ds.delete_key_intent(&i.intent_id).await?;
                continue;
            }
            let adopted = match self.km.adopt(key_id, &i.intent_id).await {
                Ok(a) => a,
                // The backend is down: try again on the next tick, intent kept.
                Err(e @ kame_keymanager::Error::Unavailable(_)) => return Err(e.into()),
                Err(e) => {
                    warn!(key_id, intent = %i.intent_id, error = %e, "cannot reuse an interrupted generation's key; making a new one");
                    None
                }
            };
            match adopted {
                // The key an authority already holds: that generation finished and only its
                // intent was left behind (a crash after the journal was saved).
                Some(pk) if self.key_in_use(&pk.fingerprint) => {
                    self.ds.delete_key_intent(&i.intent_id).await?;
                }
                Some(pk) if pk.key_type == kt => {
                    info!(key_id, intent = %i.intent_id, "reusing the key of an interrupted generation");
                    self.unsaved_intents
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(i.intent_id);
                    return Ok(pk);
                }
                // Not there (never created, or of another type): the reconcile pass disposes
                // of whatever is left; the intent is done.
                _ => self.ds.delete_key_intent(&i.intent_id).await?,
            }
        }
        let intent = uuid::Uuid::new_v4().to_string();
        self.ds
            .put_key_intent(&crate::datastore::KeyIntent {
                intent_id: intent.clone(),
                server_id: server_id.clone(),
                key_id: key_id.to_string(),
                key_type: kt.to_string(),
                created_at: now_secs() as i64,
            })
            .await?;
        let pk = self
            .km
            .generate_key_with_intent(key_id, kt, &intent)
            .await?;
        kame_keymanager::failpoint("after_key_create");
        self.unsaved_intents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(intent);
        Ok(pk)
    }

    /// Converges the KeyManager to the keys this server names: orphans (keys of this server
    /// no id names, e.g. created before a crash) are disposed of, at most [`RECONCILE_CAP`] per
    /// pass, except those a pending intent may still reuse.
    pub async fn reconcile_keys(&self) -> Result<KeyInventory, CaError> {
        let pending: Vec<String> = self
            .ds
            .list_key_intents(&self.settings.server_id)
            .await?
            .into_iter()
            .map(|i| i.intent_id)
            .collect();
        let named = self.km.public_keys().await?.len();
        // Liveness for this server, and the sweep of dead servers' keys.
        let swept = match self.km.maintain().await {
            Ok(n) => n,
            Err(e) => {
                warn!(error = %e, "key backend upkeep (liveness, sweep) failed");
                0
            }
        };
        let mut inv = KeyInventory {
            named,
            swept,
            ..Default::default()
        };
        for o in self.km.orphans().await? {
            if o.intent.as_ref().is_some_and(|i| pending.contains(i)) {
                inv.pending += 1;
                continue;
            }
            if inv.disposed >= RECONCILE_CAP {
                inv.remaining += 1;
                continue;
            }
            match self.km.dispose(&o).await {
                Ok(()) => {
                    info!(instance = %o.instance, key_id = ?o.key_id, "disposed of an orphaned key");
                    inv.disposed += 1;
                }
                Err(e) => {
                    warn!(instance = %o.instance, error = %e, "could not dispose of an orphaned key");
                    inv.remaining += 1;
                }
            }
        }
        self.metrics.record(&inv);
        info!(
            backend = self.km.name(),
            named = inv.named,
            pending = inv.pending,
            disposed = inv.disposed,
            remaining = inv.remaining,
            swept = inv.swept,
            "key inventory"
        );
        Ok(inv)
    }

    /// Resolves when an authority was tainted through this server since the last call.
    pub async fn tainted(&self) {
        self.taint_notify.notified().await
    }

    /// The Prometheus text of this CA's key inventory.
    pub fn render_metrics(&self) -> String {
        self.metrics.render(self.km.name())
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

    async fn load_journal(&self) -> Result<(), CaError> {
        let Some(data) = self.ds.fetch_ca_journal(&self.settings.server_id).await? else {
            return Ok(());
        };
        let journal: Journal =
            serde_json::from_slice(&data).map_err(|e| CaError::Journal(e.to_string()))?;
        let bundle = self.bundle();
        let now = now_secs();
        let mut x509: Vec<Arc<X509Authority>> = vec![];
        for e in journal.x509 {
            let Ok(cert_der) = STANDARD.decode(&e.cert) else {
                continue;
            };
            if e.not_after <= now || !bundle.x509_authorities.iter().any(|c| c.asn1 == cert_der) {
                // Expired, or revoked while this server was down: its key serves nothing.
                self.dispose_unused(&x509_key_id(&e.slot), &e.key_fingerprint)
                    .await;
                continue;
            }
            let Ok(p) = x509svid::ParsedCert::parse(&cert_der) else {
                continue;
            };
            let key = match self
                .km
                .select(&x509_key_id(&e.slot), &e.key_fingerprint)
                .await
            {
                Ok(Some(key)) => key,
                // An OLD authority signs nothing: its key may be gone (its slot was prepared
                // again); it is remembered so that it can still be tainted and revoked.
                _ if e.status == SlotStatus::Old => match p.spki_der() {
                    Ok(spki_der) => {
                        released_key(&x509_key_id(&e.slot), spki_der, e.key_fingerprint.clone())
                    }
                    Err(_) => continue,
                },
                _ => continue,
            };
            if p.spki_der().ok().as_deref() != Some(key.spki_der.as_slice()) {
                continue;
            }
            let issuer = IssuerInfo::from_cert_der(&cert_der)?;
            x509.push(Arc::new(X509Authority {
                authority_id: hex::encode(&issuer.key_id),
                slot: e.slot,
                status: e.status,
                key,
                cert_der,
                issuer,
                issued_at_ms: e.issued_at_ms,
                not_after: e.not_after,
            }));
        }
        let mut jwt: Vec<Arc<JwtAuthority>> = vec![];
        for e in journal.jwt {
            if e.not_after <= now || !bundle.jwt_authorities.iter().any(|k| k.key_id == e.kid) {
                self.dispose_unused(&jwt_key_id(&e.slot), &e.key_fingerprint)
                    .await;
                continue;
            }
            let key = match self
                .km
                .select(&jwt_key_id(&e.slot), &e.key_fingerprint)
                .await
            {
                Ok(Some(key)) => key,
                _ if e.status == SlotStatus::Old => match STANDARD.decode(&e.public_key) {
                    Ok(spki_der) => {
                        released_key(&jwt_key_id(&e.slot), spki_der, e.key_fingerprint.clone())
                    }
                    Err(_) => continue,
                },
                _ => continue,
            };
            let key_info = KeyInfo::from_spki_der(&key.spki_der)?;
            jwt.push(Arc::new(JwtAuthority {
                slot: e.slot,
                status: e.status,
                key,
                key_info,
                kid: e.kid,
                issued_at_ms: e.issued_at_ms,
                not_after: e.not_after,
            }));
        }
        let mut st = self.write();
        st.x509 = pick_slots(x509);
        st.jwt = pick_slots(jwt);
        if let Some(c) = &st.x509.current {
            info!(authority_id = %c.authority_id, slot = %c.slot, "loaded X.509 authority from journal");
        }
        Ok(())
    }

    /// Disposes of the key instance an unloadable journal entry names (the fingerprint check
    /// leaves a newer key under the same id alone). Failures are logged; the slot's next
    /// preparation replaces the key anyway.
    async fn dispose_unused(&self, key_id: &str, fingerprint: &str) {
        match self.km.delete_key(key_id, fingerprint).await {
            Ok(true) => info!(
                key_id,
                "disposed of the key of an expired or revoked authority"
            ),
            Ok(false) => {}
            Err(e) => {
                warn!(key_id, error = %e, "cannot dispose of an expired or revoked authority's key")
            }
        }
    }

    async fn save_journal(&self) -> bool {
        let journal = {
            let st = self.read();
            let mut j = Journal::default();
            for a in st.x509.all() {
                j.x509.push(JournalX509 {
                    slot: a.slot.clone(),
                    status: a.status,
                    cert: STANDARD.encode(&a.cert_der),
                    key_fingerprint: a.key.fingerprint.clone(),
                    issued_at_ms: a.issued_at_ms,
                    not_after: a.not_after,
                });
            }
            for a in st.jwt.all() {
                j.jwt.push(JournalJwt {
                    slot: a.slot.clone(),
                    status: a.status,
                    kid: a.kid.clone(),
                    public_key: STANDARD.encode(&a.key.spki_der),
                    key_fingerprint: a.key.fingerprint.clone(),
                    issued_at_ms: a.issued_at_ms,
                    not_after: a.not_after,
                });
            }
            j.x509.truncate(JOURNAL_MAX_PER_KIND);
            j.jwt.truncate(JOURNAL_MAX_PER_KIND);
            j
        };
        match serde_json::to_vec(&journal) {
            Ok(data) => {
                if let Err(e) = self
                    .ds
                    .set_ca_journal(&self.settings.server_id, &data)
                    .await
                {
                    // In-memory state stays authoritative; the next save retries.
                    warn!(error = %e, "failed to save CA journal");
                    return false;
                }
                true
            }
            Err(e) => {
                warn!(error = %e, "failed to encode CA journal");
                false
            }
        }
    }

    /// One rotation step for both kinds (run at start-up and on every tick).
    pub async fn rotate(&self) -> Result<(), CaError> {
        let _g = self.rotation.lock().await;
        let now = now_ms();
        let x509 = self
            .rotate_kind(
                now,
                |st| &mut st.x509,
                |slot, status| self.prepare_x509(slot, status),
            )
            .await?;
        let jwt = self
            .rotate_kind(
                now,
                |st| &mut st.jwt,
                |slot, status| self.prepare_jwt(slot, status),
            )
            .await?;
        if (x509 || jwt) && self.save_journal().await {
            self.clear_saved_intents().await;
        }
        Ok(())
    }

    /// The journal now names the keys made since it was last saved: their intents are done.
    async fn clear_saved_intents(&self) {
        let done: Vec<String> = std::mem::take(
            &mut *self
                .unsaved_intents
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for i in done {
            if let Err(e) = self.ds.delete_key_intent(&i).await {
                warn!(intent = %i, error = %e, "could not clear a key intent");
            }
        }
    }

    /// The rotation state machine of one kind; returns whether anything changed.
    async fn rotate_kind<T, F, Fut>(
        &self,
        now: u64,
        slots: fn(&mut State) -> &mut Slots<T>,
        prepare: F,
    ) -> Result<bool, CaError>
    where
        T: Authority,
        F: Fn(&'static str, SlotStatus) -> Fut,
        Fut: std::future::Future<Output = Result<Arc<T>, CaError>>,
    {
        let (cur, next) = {
            let mut st = self.write();
            let s = slots(&mut st);
            (s.current.clone(), s.next.clone())
        };
        let live = |a: &T| a.not_after() * 1000 > now;
        let prepared = |a: &T| a.status() == SlotStatus::Prepared;
        let Some(c) = cur.filter(|c| live(c)) else {
            let replaced = next.as_ref().filter(|n| prepared(n) && live(n)).cloned();
            let a = match replaced {
                // The server was down past the activation point: the prepared authority
                // (already in the bundle) takes over.
                Some(n) => Arc::new(n.with_status(SlotStatus::Active)),
                None => {
                    let slot = next.as_ref().map(|n| other_slot(n.slot())).unwrap_or("A");
                    prepare(slot, SlotStatus::Active).await?
                }
            };
            info!(kind = T::KIND, authority_id = %a.authority_id(), slot = %a.slot(), "authority activated");
            let mut st = self.write();
            let s = slots(&mut st);
            s.current = Some(a);
            if let Some(n) = s.next.take()
                && n.status() == SlotStatus::Old
            {
                s.remember(n);
            }
            return Ok(true);
        };
        let mut changed = false;
        let mut next = next;
        if next.as_ref().is_none_or(|n| n.status() == SlotStatus::Old) && c.should_prepare_next(now)
        {
            let a = prepare(other_slot(c.slot()), SlotStatus::Prepared).await?;
            info!(kind = T::KIND, authority_id = %a.authority_id(), slot = %a.slot(), "authority prepared");
            slots(&mut self.write()).install_next(a.clone());
            next = Some(a);
            changed = true;
        }
        if let Some(n) = next.filter(|n| prepared(n))
            && c.should_activate_next(now)
        {
            let mut st = self.write();
            let s = slots(&mut st);
            s.current = Some(Arc::new(n.with_status(SlotStatus::Active)));
            s.next = Some(Arc::new(c.with_status(SlotStatus::Old)));
            info!(kind = T::KIND, authority_id = %n.authority_id(), slot = %n.slot(), "authority activated");
            changed = true;
        }
        Ok(changed)
    }

    async fn prepare_x509(
        &self,
        slot: &str,
        status: SlotStatus,
    ) -> Result<Arc<X509Authority>, CaError> {
        let key = self
            .new_key(&x509_key_id(slot), self.settings.ca_key_type)
            .await?;
        let issued_at_ms = now_ms();
        let now = issued_at_ms / 1000;
        let not_after = now + self.settings.ca_ttl.as_secs().max(1);
        // The configured ca_subject, as SPIRE names its X.509 authorities.
        let subject = x509svid::parse_name(&self.settings.ca_subject_dn)?;
        let serial = random_serial()?;
        let tbs = x509svid::ca_tbs(
            &x509svid::CaParams {
                trust_domain: &self.settings.trust_domain,
                subject: &subject,
                spki_der: &key.spki_der,
                serial: &serial,
                not_before: now.saturating_sub(x509svid::BACKDATE.as_secs()),
                not_after,
            },
            None,
        )?;
        let info = KeyInfo::from_spki_der(&key.spki_der)?;
        let sig = sign_checked(
            self.km.as_ref(),
            &key,
            &tbs,
            SignOpts::for_key(self.settings.ca_key_type),
        )
        .await?;
        let cert_der = x509svid::assemble(&tbs, &info.x509_signature_algorithm(), &sig)?;
        // Self-check: the new certificate verifies with its own key before anyone trusts it.
        x509svid::ParsedCert::parse(&cert_der)?.check_signed_by(&key.spki_der)?;
        let issuer = IssuerInfo::from_cert_der(&cert_der)?;
        let bundle = self
            .ds
            .append_bundle(&Bundle {
                trust_domain: self.settings.trust_domain.as_str().to_string(),
                x509_authorities: vec![X509Certificate {
                    asn1: cert_der.clone(),
                    tainted: false,
                }],
                ..Default::default()
            })
            .await?;
        *self.bundle.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(bundle);
        Ok(Arc::new(X509Authority {
            slot: slot.to_string(),
            status,
            authority_id: hex::encode(&issuer.key_id),
            key,
            cert_der,
            issuer,
            issued_at_ms,
            not_after,
        }))
    }

    async fn prepare_jwt(
        &self,
        slot: &str,
        status: SlotStatus,
    ) -> Result<Arc<JwtAuthority>, CaError> {
        let key = self
            .new_key(&jwt_key_id(slot), self.settings.jwt_key_type)
            .await?;
        let key_info = KeyInfo::from_spki_der(&key.spki_der)?;
        let issued_at_ms = now_ms();
        let not_after = issued_at_ms / 1000 + self.settings.ca_ttl.as_secs().max(1);
        let kid = random_kid()?;
        let bundle = self
            .ds
            .append_bundle(&Bundle {
                trust_domain: self.settings.trust_domain.as_str().to_string(),
                jwt_authorities: vec![JwtKey {
                    public_key: key.spki_der.clone(),
                    key_id: kid.clone(),
                    expires_at: not_after as i64,
                    tainted: false,
                }],
                ..Default::default()
            })
            .await?;
        *self.bundle.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(bundle);
        Ok(Arc::new(JwtAuthority {
            slot: slot.to_string(),
            status,
            key,
            key_info,
            kid,
            issued_at_ms,
            not_after,
        }))
    }

    /// How often the rotator should tick for this CA TTL (10 s, faster for short TTLs).
    pub fn tick_interval(&self) -> Duration {
        (self.settings.ca_ttl / 24).clamp(Duration::from_millis(100), Duration::from_secs(10))
    }

    /// Mints an X509-SVID for `spki_der` with the given identity. `ttl` is capped at the CA's
    /// notAfter. Returns the chain, leaf first.
    pub async fn sign_x509_svid(
        &self,
        spki_der: &[u8],
        id: &SpiffeId,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<Vec<Vec<u8>>, CaError> {
        if !id.is_member_of(&self.settings.trust_domain) {
            return Err(CaError::Profile(kame_api::Error::BadSvid(format!(
                "{id} is not in trust domain {}",
                self.settings.trust_domain
            ))));
        }
        if ttl.is_zero() {
            return Err(CaError::InvalidTtl("TTL must be positive".into()));
        }
        let ca = self.current_x509().ok_or(CaError::NotReady("X.509"))?;
        let now = now_secs();
        let serial = random_serial()?;
        let params = x509svid::LeafParams {
            id,
            dns_names,
            spki_der,
            serial: &serial,
            not_before: now.saturating_sub(x509svid::BACKDATE.as_secs()),
            not_after: now.saturating_add(ttl.as_secs().max(1)),
        };
        if let SigningMode::KmsRooted { intermediate_ttl } = self.settings.signing_mode {
            let inter = self.intermediate(&ca, intermediate_ttl).await?;
            let tbs = x509svid::leaf_tbs(&params, &inter.issuer)?;
            let sig = sign_checked(
                &inter.km,
                &inter.key,
                &tbs,
                SignOpts::for_key(inter.key.key_type),
            )
            .await?;
            return Ok(vec![
                x509svid::assemble_der(&tbs, &inter.issuer.signature_algorithm_der, &sig)?,
                inter.cert_der.clone(),
            ]);
        }
        let tbs = x509svid::leaf_tbs(&params, &ca.issuer)?;
        let sig = sign_checked(
            self.km.as_ref(),
            &ca.key,
            &tbs,
            SignOpts::for_key(ca.key.key_type),
        )
        .await?;
        Ok(vec![x509svid::assemble_der(
            &tbs,
            &ca.issuer.signature_algorithm_der,
            &sig,
        )?])
    }

    /// The `kms_rooted` intermediate under the current authority: the cached one while it has
    /// more than half of its lifetime left and the authority is the same, else a new one (a
    /// P-256 key made in memory, certified by one signature of the authority key). While one
    /// is being made, or when making one fails, the cached one serves as long as it is valid
    /// for another minute: the backend's trouble does not stop issuance before it must.
    async fn intermediate(
        &self,
        ca: &X509Authority,
        ttl: Duration,
    ) -> Result<Arc<Intermediate>, CaError> {
        let cached = || {
            self.intermediate
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .filter(|i| i.parent == ca.authority_id)
        };
        let fresh = |i: &Arc<Intermediate>| {
            let half = i.not_after.saturating_sub(i.issued_at) / 2;
            now_secs() + half < i.not_after
        };
        let usable = |i: &Arc<Intermediate>| now_secs() + 60 < i.not_after;
        if let Some(i) = cached().filter(fresh) {
            return Ok(i);
        }
        let _g = match self.minting.try_lock() {
            Ok(g) => g,
            Err(_) => {
                if let Some(i) = cached().filter(usable) {
                    return Ok(i);
                }
                self.minting.lock().await
            }
        };
        if let Some(i) = cached().filter(fresh) {
            return Ok(i);
        }
        match self.mint_intermediate(ca, ttl).await {
            Ok(i) => Ok(i),
            Err(e) => match cached().filter(usable) {
                Some(i) => {
                    warn!(error = %e, "cannot make a new kms_rooted intermediate; the current one serves");
                    Ok(i)
                }
                None => Err(e),
            },
        }
    }

    async fn mint_intermediate(
        &self,
        ca: &X509Authority,
        ttl: Duration,
    ) -> Result<Arc<Intermediate>, CaError> {
        let km = kame_keymanager::memory::MemoryKeyManager::new();
        let key = km
            .generate_key("kms-rooted-intermediate", KeyType::EcP256)
            .await?;
        let now = now_secs();
        let not_after = now.saturating_add(ttl.as_secs().max(1)).min(ca.not_after);
        // A subject of its own: an intermediate named like its issuer is self-issued to a
        // path builder.
        let subject = x509svid::parse_name(&format!(
            "{}, OU=kms_rooted intermediate",
            self.settings.ca_subject_dn
        ))?;
        let serial = random_serial()?;
        let tbs = x509svid::ca_tbs(
            &x509svid::CaParams {
                trust_domain: &self.settings.trust_domain,
                subject: &subject,
                spki_der: &key.spki_der,
                serial: &serial,
                not_before: now.saturating_sub(x509svid::BACKDATE.as_secs()),
                not_after,
            },
            Some(&ca.issuer),
        )?;
        let sig = sign_checked(
            self.km.as_ref(),
            &ca.key,
            &tbs,
            SignOpts::for_key(ca.key.key_type),
        )
        .await?;
        let cert_der = x509svid::assemble_der(&tbs, &ca.issuer.signature_algorithm_der, &sig)?;
        x509svid::ParsedCert::parse(&cert_der)?.check_signed_by(&ca.key.spki_der)?;
        let issuer = IssuerInfo::from_cert_der(&cert_der)?;
        let inter = Arc::new(Intermediate {
            parent: ca.authority_id.clone(),
            km,
            key,
            cert_der,
            issuer,
            issued_at: now,
            not_after,
        });
        info!(parent = %ca.authority_id, not_after, "new kms_rooted intermediate");
        *self.intermediate.write().unwrap_or_else(|p| p.into_inner()) = Some(inter.clone());
        Ok(inter)
    }

    /// Mints a JWT-SVID. Returns (token, issued_at, expires_at); expiry is capped at the key's.
    pub async fn sign_jwt_svid(
        &self,
        id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
    ) -> Result<(String, u64, u64), CaError> {
        if !id.is_member_of(&self.settings.trust_domain) {
            return Err(CaError::Profile(kame_api::Error::BadSvid(format!(
                "{id} is not in trust domain {}",
                self.settings.trust_domain
            ))));
        }
        if ttl.is_zero() {
            return Err(CaError::InvalidTtl("TTL must be positive".into()));
        }
        let key = self.current_jwt().ok_or(CaError::NotReady("JWT"))?;
        let iat = now_secs();
        let exp = iat.saturating_add(ttl.as_secs().max(1)).min(key.not_after);
        let input = jwtsvid::signing_input(
            &key.key_info,
            &key.kid,
            &jwtsvid::Claims {
                sub: id,
                aud: audience,
                exp,
                iat,
                iss: self.settings.jwt_issuer.as_deref(),
            },
        )?;
        let sig = sign_checked(
            self.km.as_ref(),
            &key.key,
            input.as_bytes(),
            SignOpts::for_key(key.key.key_type),
        )
        .await?;
        Ok((jwtsvid::assemble(&key.key_info, &input, &sig)?, iat, exp))
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

/// The public half of a key the KeyManager no longer holds (an OLD authority's).
fn released_key(id: &str, spki_der: Vec<u8>, fingerprint: String) -> PublicKey {
    PublicKey {
        id: id.to_string(),
        key_type: kame_keymanager::encoding::key_type_of_spki(&spki_der).unwrap_or(KeyType::EcP256),
        spki_der,
        fingerprint,
    }
}

/// Newest ACTIVE becomes current; the newest other entry in the other slot becomes next. With no
/// ACTIVE entry, a PREPARED one is kept as next for the rotator to activate; otherwise the
/// rotator prepares and activates a new authority.
fn pick_slots<T: Authority>(mut all: Vec<Arc<T>>) -> Slots<T> {
    all.sort_by_key(|a| std::cmp::Reverse(a.issued_at_ms()));
    let current = all
        .iter()
        .find(|a| a.status() == SlotStatus::Active)
        .cloned();
    match current {
        Some(c) => {
            let next = all
                .iter()
                .find(|a| a.slot() != c.slot() && a.status() != SlotStatus::Active)
                .cloned();
            let older = all
                .iter()
                .filter(|a| a.status() == SlotStatus::Old)
                .filter(|a| {
                    next.as_ref()
                        .is_none_or(|n| n.authority_id() != a.authority_id())
                })
                .take(MAX_OLDER)
                .cloned()
                .collect();
            Slots {
                current: Some(c),
                next,
                older,
            }
        }
        None => Slots {
            // The active authority expired while the server was down: a prepared one (already
            // published) is kept as next, and the rotator activates it.
            current: None,
            next: all
                .iter()
                .find(|a| a.status() == SlotStatus::Prepared)
                .cloned(),
            older: all
                .iter()
                .filter(|a| a.status() == SlotStatus::Old)
                .take(MAX_OLDER)
                .cloned()
                .collect(),
        },
    }
}
