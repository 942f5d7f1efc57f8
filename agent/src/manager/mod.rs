//! The agent's manager: keeps the agent's own SVID (attesting, renewing at half life,
//! re-attesting when the attestor allows it), syncs authorized entries and bundles with the
//! server every `sync_interval`, mints workload X509-SVIDs for keys it generates (rotated at
//! half of their lifetime, or at once when the entry changed or the SVID no longer chains to
//! the bundle), mints JWT-SVIDs on demand and caches them until half their lifetime, and
//! persists the cache so a restart serves it before the server answers. Every change bumps a
//! version that Workload API streams watch. It never decides who a workload is: callers pass
//! selectors. No lock is held across network I/O.

use crate::attestation::NodeAttestor;
use crate::client::{self, SharedRoots};
use crate::keys;
use crate::storage::{AgentIdentity, CacheSnapshot, CachedSvid, Storage};
use kame_api::pb::{self, types};
use kame_api::x509svid::{ParsedCert, verify_chain};
use kame_api::{SpiffeId, TrustDomain};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::watch;
use tonic::transport::Channel;

mod identity;
mod jwt;
mod reserve;
mod sync;
pub use jwt::*;
pub use reserve::GlassStatus;

/// How many SVIDs one BatchNewX509SVID asks for.
const BATCH: usize = 50;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManagerError {
    #[error("trust bundle {path}: {msg}")]
    TrustBundle { path: String, msg: String },
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error(transparent)]
    Key(#[from] keys::KeyError),
    #[error(transparent)]
    Client(#[from] client::ClientError),
    #[error("node attestation failed: {0}")]
    Attest(#[from] crate::attestation::AttestError),
    #[error("the server answered {code:?}: {message}")]
    Server { code: tonic::Code, message: String },
    #[error("the server returned an agent SVID that is not valid: {0}")]
    BadAgentSvid(String),
    #[error("the server returned an agent SVID that is not valid: {0}")]
    AgentSvidChain(#[source] kame_api::Error),
    #[error("the trust domain gives no server SPIFFE ID: {0}")]
    ServerId(#[source] kame_api::IdError),
    #[error("the agent has no SVID yet")]
    NotAttested,
    #[error("the server broke the sync protocol: {0}")]
    SyncProtocol(&'static str),
    /// A panic while the lock was held: a bug in the agent, not a state of the node.
    #[error("internal error: the agent's {0} lock was poisoned by a panic")]
    Poisoned(&'static str),
}

impl ManagerError {
    /// Whether retrying cannot help (SPIRE ends the agent on these): the server refused the
    /// attestation evidence (PermissionDenied or InvalidArgument: an unknown or spent join
    /// token, a rejected certificate or quote), no way to attest is left, the server sent an
    /// SVID that is not an agent ID of our trust domain, or the agent is banned. Races in the
    /// server's records (AlreadyExists, NotFound, FailedPrecondition) and an SVID that does not
    /// chain to the bundle held (which may be stale) are retried. `bootstrap`: the agent has
    /// no SVID yet, so a server certificate or identity refused in the TLS handshake (another
    /// trust domain, not signed by the bundle held) is a configuration error too, unless only
    /// its validity period failed (a clock apart).
    pub fn is_fatal(&self, bootstrap: bool) -> bool {
        use crate::attestation::AttestError;
        use tonic::Code;
        match self {
            ManagerError::Attest(AttestError::NoToken) => true,
            ManagerError::Attest(AttestError::Refused { code, .. }) => {
                matches!(code, Code::PermissionDenied | Code::InvalidArgument)
            }
            ManagerError::BadAgentSvid(_) => true,
            ManagerError::Server { code, message } => {
                *code == Code::PermissionDenied && message.contains("banned")
            }
            ManagerError::Client(c) => bootstrap && kame_api::errors::certificate_refused(c),
            _ => false,
        }
    }
}

/// Whether a sync pass heard from a server: it succeeded, or a server refused it (an answer,
/// as a ban is). Transport failures and Unavailable are no answer.
fn server_answered(r: &Result<(), ManagerError>) -> bool {
    use tonic::Code;
    let quiet = |c: &Code| {
        matches!(
            c,
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
        )
    };
    match r {
        Ok(()) => true,
        Err(ManagerError::Server { code, .. }) => !quiet(code),
        Err(ManagerError::Attest(crate::attestation::AttestError::Refused { code, .. })) => {
            !quiet(code)
        }
        Err(_) => false,
    }
}

impl From<tonic::Status> for ManagerError {
    fn from(s: tonic::Status) -> Self {
        ManagerError::Server {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The SPIFFE ID string of an entry.
pub fn entry_spiffe_id(e: &types::Entry) -> String {
    e.spiffe_id
        .as_ref()
        .map(|i| format!("spiffe://{}{}", i.trust_domain, i.path))
        .unwrap_or_default()
}

/// The trust domain names an entry federates with (given as names or `spiffe://` IDs).
pub fn federated_tds(e: &types::Entry) -> impl Iterator<Item = String> + '_ {
    e.federates_with.iter().map(|f| {
        f.trim_start_matches("spiffe://")
            .trim_end_matches('/')
            .to_string()
    })
}

/// The DER certificates of a bundle's X.509 authorities.
pub fn bundle_roots(b: &types::Bundle) -> Vec<Vec<u8>> {
    b.x509_authorities.iter().map(|c| c.asn1.clone()).collect()
}

/// The request header carrying the authorities this agent's SVIDs chain to (the server's
/// revocation readiness); SPIRE servers ignore it.
pub const SVID_AUTHORITIES_HEADER: &str = "kame-svid-authorities";

/// What is tainted in the own trust domain's bundle: the roots (DER), the untainted roots,
/// and the tainted JWT key IDs.
#[derive(Debug, Default)]
struct Taint {
    roots: Vec<Vec<u8>>,
    trusted: Vec<Vec<u8>>,
    kids: BTreeSet<String>,
}

impl Taint {
    fn of(b: &types::Bundle) -> Self {
        let mut t = Taint::default();
        for c in &b.x509_authorities {
            if c.tainted {
                t.roots.push(c.asn1.clone());
            } else {
                t.trusted.push(c.asn1.clone());
            }
        }
        t.kids = b
            .jwt_authorities
            .iter()
            .filter(|k| k.tainted)
            .map(|k| k.key_id.clone())
            .collect();
        t
    }

    /// Whether `chain` chains only to a tainted root (with an untainted one to move to).
    fn taints(&self, chain: &[Vec<u8>], now: u64) -> bool {
        !self.roots.is_empty()
            && !self.trusted.is_empty()
            && verify_chain(chain, &self.trusted, now).is_err()
            && verify_chain(chain, &self.roots, now).is_ok()
    }
}

/// The authority a chain (leaf first) ends under: its last certificate's AKI, lower-case hex.
pub fn chain_authority(chain: &[Vec<u8>]) -> Option<String> {
    chain
        .last()
        .and_then(|c| ParsedCert::parse(c).ok())
        .and_then(|c| c.authority_key_id().ok().flatten())
        .map(hex::encode)
}

#[derive(Debug, Clone)]
struct JwtCached {
    token: String,
    issued_at: u64,
    expires_at: u64,
}

#[derive(Default)]
struct State {
    agent: Option<AgentIdentity>,
    bundle: Option<types::Bundle>,
    federated: BTreeMap<String, types::Bundle>,
    entries: BTreeMap<String, types::Entry>,
    svids: BTreeMap<String, CachedSvid>,
    jwt: HashMap<(String, Vec<String>), JwtCached>,
    /// Reserve SVIDs (break-glass) by entry ID, by slice.
    reserves: BTreeMap<String, Vec<CachedSvid>>,
}

/// The entries whose selectors are a subset of `selectors`, in the Workload API's order (by
/// SPIFFE ID, then entry ID; the first is the default identity).
fn matching<'a>(st: &'a State, selectors: &[types::Selector]) -> Vec<&'a types::Entry> {
    let mut v: Vec<&types::Entry> = st
        .entries
        .values()
        .filter(|e| crate::attestor::matches(&e.selectors, selectors))
        .collect();
    v.sort_by(|a, b| (entry_spiffe_id(a), &a.id).cmp(&(entry_spiffe_id(b), &b.id)));
    v
}

/// One identity as a workload sees it.
#[derive(Debug, Clone)]
pub struct Identity {
    pub entry: types::Entry,
    pub svid: CachedSvid,
    /// A reserve SVID served under break-glass.
    pub reserve: bool,
}

/// What one workload is entitled to.
#[derive(Debug, Clone, Default)]
pub struct WorkloadView {
    /// Entries whose selectors match (SVIDs may still be on their way).
    pub matched: usize,
    /// Matched identities with an SVID, in a stable order (the first is the default).
    pub identities: Vec<Identity>,
    pub bundle: Option<types::Bundle>,
    /// Federated bundles the matched entries federate with, by trust domain name.
    pub federated: BTreeMap<String, types::Bundle>,
}

/// Settings the manager needs.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub trust_domain: TrustDomain,
    /// The servers to try, in order (see `Config::servers`).
    pub servers: Vec<(String, u16)>,
    pub trust_bundle_path: std::path::PathBuf,
    pub sync_interval: Duration,
    /// Transparency log keys (SubjectPublicKeyInfo DER): when any, the server's X509-SVID
    /// must carry a valid SCT from one of them, and so must the JWT-SVIDs of this trust domain
    /// that ValidateJWTSVID accepts.
    pub transparency_log_keys: Vec<Vec<u8>>,
    /// `agent.break_glass`: reserve SVIDs are kept and the glass can be broken.
    pub break_glass: Option<crate::breakglass::BreakGlassConfig>,
}

pub struct Manager {
    cfg: ManagerConfig,
    server_id: SpiffeId,
    storage: Storage,
    roots: SharedRoots,
    state: RwLock<State>,
    attestor: Mutex<NodeAttestor>,
    channel: Mutex<Option<Channel>>,
    version: watch::Sender<u64>,
    /// Serializes sync passes and on-demand JWT minting against agent SVID changes.
    sync_lock: tokio::sync::Mutex<()>,
    /// Sync passes done and failed, and when the last one succeeded (for `/metrics`).
    syncs_ok: std::sync::atomic::AtomicU64,
    syncs_failed: std::sync::atomic::AtomicU64,
    last_sync: std::sync::atomic::AtomicU64,
    /// Break-glass state and record (with `agent.break_glass`).
    glass: Option<crate::breakglass::Glass>,
    /// The server's reserve slice length and maximum extension, once told.
    reserve_params: Mutex<Option<(u64, u64)>>,
    /// Whether the server's refusal to mint reserves was already logged.
    reserve_refused: std::sync::atomic::AtomicBool,
    /// The identity that signs the break-glass record (the last agent SVID, kept past its
    /// expiry: an outage may outlast it).
    record_signer: Mutex<Option<AgentIdentity>>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("trust_domain", &self.cfg.trust_domain.to_string())
            .finish_non_exhaustive()
    }
}

fn read_trust_bundle(
    path: &std::path::Path,
    td: &TrustDomain,
) -> Result<Vec<Vec<u8>>, ManagerError> {
    let err = |msg: String| ManagerError::TrustBundle {
        path: path.display().to_string(),
        msg,
    };
    let data = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let roots = if data.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        let b = kame_api::bundle::from_spiffe_json(td, &data).map_err(|e| err(e.to_string()))?;
        bundle_roots(&b)
    } else {
        let text = String::from_utf8(data).map_err(|_| err("not PEM text".into()))?;
        kame_api::bundle::certs_from_pem(&text).map_err(|e| err(e.to_string()))?
    };
    if roots.is_empty() {
        return Err(err("holds no certificate".into()));
    }
    for r in &roots {
        ParsedCert::parse(r).map_err(|e| err(e.to_string()))?;
    }
    Ok(roots)
}

impl Manager {
    /// Loads what `storage` holds (bundle, agent SVID, workload cache) so the Workload API can
    /// serve at once, and the bootstrap trust bundle when there is no cached bundle.
    pub fn new(
        cfg: ManagerConfig,
        storage: Storage,
        attestor: NodeAttestor,
    ) -> Result<Arc<Self>, ManagerError> {
        let server_id = SpiffeId::parse(&format!("spiffe://{}/spire/server", cfg.trust_domain))
            .map_err(ManagerError::ServerId)?;
        let now = now_secs();
        let mut st = State::default();
        let cached_bundle = storage.load_bundle()?;
        let roots = match &cached_bundle {
            Some(b) if !b.x509_authorities.is_empty() => bundle_roots(b),
            _ => read_trust_bundle(&cfg.trust_bundle_path, &cfg.trust_domain)?,
        };
        st.bundle = cached_bundle;
        if let Some(a) = storage.load_agent()? {
            let ok = a
                .chain
                .first()
                .is_some_and(|leaf| keys::matches_cert(&a.key_pkcs8, leaf))
                && verify_chain(&a.chain, &roots, now).is_ok();
            if ok {
                st.agent = Some(a);
            } else {
                tracing::warn!(
                    "cached agent SVID is expired or does not match its key; attesting again"
                );
            }
        }
        if st.agent.is_some()
            && let Some(c) = storage.load_cache()?
        {
            for e in c.entries {
                st.entries.insert(e.id.clone(), e);
            }
            for s in c.svids {
                if s.not_after > now && st.entries.contains_key(&s.entry_id) {
                    st.svids.insert(s.entry_id.clone(), s);
                }
            }
            for b in c.federated {
                st.federated.insert(b.trust_domain.clone(), b);
            }
            if cfg.break_glass.is_some() {
                for r in storage.load_reserves()? {
                    let current = st
                        .entries
                        .get(&r.entry_id)
                        .is_some_and(|e| e.revision_number == r.entry_revision);
                    if r.not_after > now && current {
                        st.reserves.entry(r.entry_id.clone()).or_default().push(r);
                    }
                }
            }
            if st.bundle.is_none() {
                st.bundle = c.bundle;
            }
            tracing::info!(svids = st.svids.len(), "serving cached SVIDs from data_dir");
        }
        let (version, _) = watch::channel(0u64);
        let glass = cfg
            .break_glass
            .clone()
            .map(|c| crate::breakglass::Glass::new(c, storage.data_dir()));
        let record_signer = if glass.is_some() {
            match &st.agent {
                Some(a) => Some(a.clone()),
                None => storage.load_record_signer()?,
            }
        } else {
            None
        };
        Ok(Arc::new(Manager {
            record_signer: Mutex::new(record_signer),
            glass,
            reserve_params: Mutex::new(None),
            reserve_refused: Default::default(),
            cfg,
            server_id,
            storage,
            roots: Arc::new(RwLock::new(roots)),
            state: RwLock::new(st),
            attestor: Mutex::new(attestor),
            channel: Mutex::new(None),
            version,
            sync_lock: tokio::sync::Mutex::new(()),
            syncs_ok: Default::default(),
            syncs_failed: Default::default(),
            last_sync: Default::default(),
        }))
    }

    /// The agent's metrics in the Prometheus text format: attested or not, the agent SVID's
    /// expiry, X509-SVIDs cached, sync passes by result and the last good one.
    pub fn render_metrics(&self) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        let (attested, expiry, svids) = match self.state.read() {
            Ok(st) => (
                st.agent.is_some(),
                st.agent
                    .as_ref()
                    .and_then(|a| a.chain.first())
                    .and_then(|c| ParsedCert::parse(c).ok())
                    .map(|c| c.not_after())
                    .unwrap_or(0),
                st.svids.len(),
            ),
            Err(_) => (false, 0, 0),
        };
        format!(
            "# HELP kame_agent_attested Whether the agent holds an agent SVID.\n\
             # TYPE kame_agent_attested gauge\n\
             kame_agent_attested {}\n\
             # HELP kame_agent_svid_expiry_timestamp_seconds When the agent's own SVID expires.\n\
             # TYPE kame_agent_svid_expiry_timestamp_seconds gauge\n\
             kame_agent_svid_expiry_timestamp_seconds {expiry}\n\
             # HELP kame_agent_workload_svids X509-SVIDs the agent holds for workloads.\n\
             # TYPE kame_agent_workload_svids gauge\n\
             kame_agent_workload_svids {svids}\n\
             # HELP kame_agent_syncs_total Sync passes with the server, by result.\n\
             # TYPE kame_agent_syncs_total counter\n\
             kame_agent_syncs_total{{result=\"ok\"}} {}\n\
             kame_agent_syncs_total{{result=\"error\"}} {}\n\
             # HELP kame_agent_last_sync_timestamp_seconds When the last sync pass succeeded.\n\
             # TYPE kame_agent_last_sync_timestamp_seconds gauge\n\
             kame_agent_last_sync_timestamp_seconds {}\n\
             # HELP kame_build_info Kame's version.\n\
             # TYPE kame_build_info gauge\n\
             kame_build_info{{version=\"{}\"}} 1\n",
            u8::from(attested),
            self.syncs_ok.load(Relaxed),
            self.syncs_failed.load(Relaxed),
            self.last_sync.load(Relaxed),
            env!("CARGO_PKG_VERSION"),
        )
    }

    /// A receiver that changes whenever entries, SVIDs or bundles change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// The agent's SPIFFE ID, once attested.
    pub fn agent_id(&self) -> Option<String> {
        let st = self.state.read().ok()?;
        let leaf = st.agent.as_ref()?.chain.first()?.clone();
        ParsedCert::parse(&leaf)
            .and_then(|c| c.spiffe_id())
            .map(|i| i.to_string())
            .ok()
    }

    /// What a workload with `selectors` is entitled to.
    pub fn view(&self, selectors: &[types::Selector]) -> WorkloadView {
        let now = now_secs();
        let open = self
            .glass
            .as_ref()
            .is_some_and(|g| g.open_at(now).is_some());
        self.view_at(selectors, now, open)
    }

    /// As [`Manager::view`], for a caller that delivers the X509-SVIDs it holds (the X.509
    /// stream, SDS): under break-glass every reserve in it is recorded first, or left out.
    pub fn view_delivering(&self, selectors: &[types::Selector]) -> WorkloadView {
        let now = now_secs();
        let open = self
            .glass
            .as_ref()
            .is_some_and(|g| g.open_at(now).is_some());
        let mut v = self.view_at(selectors, now, open);
        if open {
            // Under break-glass: every reserve served is recorded first, or not served.
            let served: Vec<(types::Entry, CachedSvid)> = v
                .identities
                .iter()
                .filter(|i| i.reserve)
                .map(|i| (i.entry.clone(), i.svid.clone()))
                .collect();
            if !served.is_empty() {
                let refused = self.record_deliveries(&served, selectors);
                v.identities
                    .retain(|i| !(i.reserve && refused.contains(&i.entry.id)));
            }
        }
        v
    }

    /// The view at `now`; with the glass `open`, an entry whose SVID has expired gets the
    /// reserve of the present slice.
    fn view_at(&self, selectors: &[types::Selector], now: u64, open: bool) -> WorkloadView {
        let Ok(st) = self.state.read() else {
            return WorkloadView::default();
        };
        let matched = matching(&st, selectors);
        let mut seen_hints = BTreeSet::new();
        let mut identities = vec![];
        let mut federated = BTreeMap::new();
        for e in &matched {
            for td in federated_tds(e) {
                if let Some(b) = st.federated.get(&td) {
                    federated.insert(td, b.clone());
                }
            }
            let normal = st.svids.get(&e.id);
            let chosen = match normal {
                Some(s) if !open || s.not_after > now => Some((s, false)),
                _ if open => Self::reserve_at(&st, e, now)
                    .map(|r| (r, true))
                    .or(normal.map(|s| (s, false))),
                _ => normal.map(|s| (s, false)),
            };
            if let Some((s, reserve)) = chosen {
                // WA-09: hints unique within a response; later duplicates are dropped.
                if !e.hint.is_empty() && !seen_hints.insert(e.hint.clone()) {
                    continue;
                }
                identities.push(Identity {
                    entry: (*e).clone(),
                    svid: s.clone(),
                    reserve,
                });
            }
        }
        WorkloadView {
            matched: matched.len(),
            identities,
            bundle: st.bundle.clone(),
            federated,
        }
    }

    /// The transparency log keys this agent requires SCTs from (none: it requires none).
    pub fn transparency_log_keys(&self) -> &[Vec<u8>] {
        &self.cfg.transparency_log_keys
    }

    /// The agent's trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.cfg.trust_domain
    }

    /// Every bundle the agent knows, own trust domain first (for JWT validation).
    pub fn all_bundles(&self) -> Vec<types::Bundle> {
        let Ok(st) = self.state.read() else {
            return vec![];
        };
        st.bundle
            .iter()
            .cloned()
            .chain(st.federated.values().cloned())
            .collect()
    }

    /// Syncs now and then every `sync_interval` until `shutdown` fires. Failures are logged
    /// with their causes and retried at the next tick, the cache serving meanwhile; a failure
    /// retrying cannot fix ([`ManagerError::is_fatal`]) ends the loop with that error.
    pub async fn run(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), ManagerError> {
        loop {
            let bootstrap = self.agent_id().is_none();
            let r = self.sync_once().await;
            self.after_sync(server_answered(&r)).await;
            let counter = if r.is_ok() {
                self.last_sync
                    .store(now_secs(), std::sync::atomic::Ordering::Relaxed);
                &self.syncs_ok
            } else {
                &self.syncs_failed
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            match r {
                Ok(()) => {}
                Err(e) if e.is_fatal(bootstrap) => {
                    tracing::error!(error = %kame_api::errors::chain(&e), "the agent cannot continue");
                    return Err(e);
                }
                Err(e) => tracing::warn!(
                    error = %kame_api::errors::chain(&e),
                    retry_in = ?self.cfg.sync_interval,
                    "sync with the server failed"
                ),
            }
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.sync_interval) => {}
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }
}
