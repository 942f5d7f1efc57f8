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

/// How many SVIDs one BatchNewX509SVID asks for.
const BATCH: usize = 50;

#[derive(Debug, thiserror::Error)]
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
    #[error("the agent has no SVID yet")]
    NotAttested,
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

/// The `kid` in a JWT's header.
pub fn jwt_kid(token: &str) -> Option<String> {
    use base64::Engine;
    let header = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("kid")?.as_str().map(str::to_string)
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
    pub server_address: String,
    pub server_port: u16,
    pub trust_bundle_path: std::path::PathBuf,
    pub sync_interval: Duration,
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
            .map_err(|e| ManagerError::BadAgentSvid(e.to_string()))?;
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
            if st.bundle.is_none() {
                st.bundle = c.bundle;
            }
            tracing::info!(svids = st.svids.len(), "serving cached SVIDs from data_dir");
        }
        let (version, _) = watch::channel(0u64);
        Ok(Arc::new(Manager {
            cfg,
            server_id,
            storage,
            roots: Arc::new(RwLock::new(roots)),
            state: RwLock::new(st),
            attestor: Mutex::new(attestor),
            channel: Mutex::new(None),
            version,
            sync_lock: tokio::sync::Mutex::new(()),
        }))
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
            if let Some(s) = st.svids.get(&e.id) {
                // WA-09: hints unique within a response; later duplicates are dropped.
                if !e.hint.is_empty() && !seen_hints.insert(e.hint.clone()) {
                    continue;
                }
                identities.push(Identity {
                    entry: (*e).clone(),
                    svid: s.clone(),
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

    fn current_channel(&self) -> Option<Channel> {
        self.channel.lock().ok().and_then(|c| c.clone())
    }

    fn set_channel(&self, ch: Option<Channel>) {
        if let Ok(mut c) = self.channel.lock() {
            *c = ch;
        }
    }

    async fn authenticated_channel(&self) -> Result<Channel, ManagerError> {
        if let Some(ch) = self.current_channel() {
            return Ok(ch);
        }
        let agent = self
            .state
            .read()
            .ok()
            .and_then(|s| s.agent.clone())
            .ok_or(ManagerError::NotAttested)?;
        let ch = client::connect(
            &self.cfg.server_address,
            self.cfg.server_port,
            &self.server_id,
            self.roots.clone(),
            Some((agent.chain.clone(), agent.key_pkcs8.to_vec())),
        )
        .await?;
        self.set_channel(Some(ch.clone()));
        Ok(ch)
    }

    /// Attests the node and installs the new agent SVID.
    async fn attest(&self) -> Result<(), ManagerError> {
        let attestor = self
            .attestor
            .lock()
            .map(|a| a.clone())
            .map_err(|_| ManagerError::NotAttested)?;
        let key = keys::generate()?;
        let csr = keys::csr(&key)?;
        let ch = client::connect(
            &self.cfg.server_address,
            self.cfg.server_port,
            &self.server_id,
            self.roots.clone(),
            None,
        )
        .await?;
        let res = attestor.attest(ch, csr).await?;
        if let NodeAttestor::JoinToken(_) = attestor
            && let Ok(mut a) = self.attestor.lock()
        {
            // A join token is single-use: forget it once spent.
            *a = NodeAttestor::JoinToken(None);
        }
        self.install_agent_svid(res.chain, key, res.reattestable)?;
        tracing::info!(agent_id = ?self.agent_id(), "node attested");
        Ok(())
    }

    fn install_agent_svid(
        &self,
        chain: Vec<Vec<u8>>,
        key: zeroize::Zeroizing<Vec<u8>>,
        reattestable: bool,
    ) -> Result<(), ManagerError> {
        let roots = self.roots.read().map(|r| r.clone()).unwrap_or_default();
        let v = verify_chain(&chain, &roots, now_secs())
            .map_err(|e| ManagerError::BadAgentSvid(e.to_string()))?;
        if !v.id.path().starts_with("/spire/agent/") || !v.id.is_member_of(&self.cfg.trust_domain) {
            return Err(ManagerError::BadAgentSvid(format!(
                "{} is not an agent ID of {}",
                v.id, self.cfg.trust_domain
            )));
        }
        let first = chain
            .first()
            .ok_or_else(|| ManagerError::BadAgentSvid("empty chain".into()))?;
        if !keys::matches_cert(&key, first) {
            return Err(ManagerError::BadAgentSvid(
                "certificate does not carry the agent's key".into(),
            ));
        }
        let id = AgentIdentity {
            chain,
            key_pkcs8: key,
            reattestable,
        };
        self.storage.save_agent(&id)?;
        if let Ok(mut st) = self.state.write() {
            st.agent = Some(id);
        }
        self.set_channel(None);
        Ok(())
    }

    /// Makes sure the agent has a usable SVID: attests when it has none, renews (or
    /// re-attests when allowed) past half its lifetime.
    async fn ensure_agent_svid(&self) -> Result<(), ManagerError> {
        let now = now_secs();
        let agent = self.state.read().ok().and_then(|s| s.agent.clone());
        let Some(agent) = agent else {
            return self.attest().await;
        };
        let (nb, na) = match agent.chain.first().map(|c| ParsedCert::parse(c)) {
            Some(Ok(c)) => (c.not_before(), c.not_after()),
            _ => (0, 0),
        };
        if now >= na {
            tracing::warn!("agent SVID expired");
            if let Ok(mut st) = self.state.write() {
                st.agent = None;
            }
            self.set_channel(None);
            self.storage.remove_agent();
            return self.attest().await;
        }
        let tainted = self
            .state
            .read()
            .ok()
            .and_then(|s| s.bundle.as_ref().map(Taint::of))
            .is_some_and(|t| t.taints(&agent.chain, now));
        if tainted {
            tracing::info!("agent SVID chains to a tainted authority: rotating it now");
        } else if now < nb + (na - nb) / 2 {
            return Ok(());
        }
        let can_reattest =
            agent.reattestable && self.attestor.lock().map(|a| a.available()).unwrap_or(false);
        if can_reattest {
            return self.attest().await;
        }
        let key = keys::generate()?;
        let csr = keys::csr(&key)?;
        let ch = self.authenticated_channel().await?;
        let resp = pb::agent::agent_client::AgentClient::new(ch)
            .renew_agent(pb::agent::RenewAgentRequest {
                params: Some(pb::agent::AgentX509svidParams { csr }),
            })
            .await?
            .into_inner();
        let svid = resp
            .svid
            .ok_or_else(|| ManagerError::BadAgentSvid("renewal returned no SVID".into()))?;
        self.install_agent_svid(svid.cert_chain, key, agent.reattestable)?;
        tracing::info!("agent SVID renewed");
        Ok(())
    }

    /// One sync pass with the server. Errors leave the cache as it was.
    pub async fn sync_once(&self) -> Result<(), ManagerError> {
        let _guard = self.sync_lock.lock().await;
        self.ensure_agent_svid().await?;
        let ch = self.authenticated_channel().await?;
        let r = self.sync_with(ch).await;
        if let Err(ManagerError::Server { code, .. }) = &r
            && matches!(
                code,
                tonic::Code::Unavailable
                    | tonic::Code::PermissionDenied
                    | tonic::Code::Unauthenticated
            )
        {
            // Reconnect next time (server restarted, or our SVID was replaced).
            self.set_channel(None);
        }
        r
    }

    async fn sync_with(&self, ch: Channel) -> Result<(), ManagerError> {
        let mut changed = false;
        // 1. Bundle.
        let bundle = pb::bundle::bundle_client::BundleClient::new(ch.clone())
            .get_bundle(pb::bundle::GetBundleRequest { output_mask: None })
            .await?
            .into_inner();
        {
            let mut st = self.state.write().map_err(|_| ManagerError::NotAttested)?;
            if st.bundle.as_ref() != Some(&bundle) {
                if let Ok(mut r) = self.roots.write() {
                    *r = bundle_roots(&bundle);
                }
                st.bundle = Some(bundle.clone());
                changed = true;
            }
        }
        if changed {
            self.storage.save_bundle(&bundle)?;
        }
        // 2. Entries.
        let entries = self.sync_entries(ch.clone()).await?;
        // 3. Federated bundles of the trust domains entries federate with.
        let tds: BTreeSet<String> = entries.values().flat_map(federated_tds).collect();
        let mut federated = BTreeMap::new();
        for td in tds {
            match pb::bundle::bundle_client::BundleClient::new(ch.clone())
                .get_federated_bundle(pb::bundle::GetFederatedBundleRequest {
                    trust_domain: td.clone(),
                    output_mask: None,
                })
                .await
            {
                Ok(b) => {
                    federated.insert(td, b.into_inner());
                }
                Err(s) if s.code() == tonic::Code::NotFound => {}
                Err(s) => return Err(s.into()),
            }
        }
        // 4. Which SVIDs to mint.
        let now = now_secs();
        let roots = bundle_roots(&bundle);
        let taint = Taint::of(&bundle);
        let need: Vec<types::Entry> = {
            let st = self.state.read().map_err(|_| ManagerError::NotAttested)?;
            entries
                .values()
                .filter(|e| match st.svids.get(&e.id) {
                    None => true,
                    Some(s) => {
                        s.entry_revision != e.revision_number
                            || now >= s.not_before + (s.not_after.saturating_sub(s.not_before)) / 2
                            || verify_chain(&s.chain, &roots, now).is_err()
                            || taint.taints(&s.chain, now)
                    }
                })
                .cloned()
                .collect()
        };
        if !taint.roots.is_empty() && !need.is_empty() {
            tracing::info!(
                count = need.len(),
                "re-issuing workload SVIDs (tainted authority, rotation or entry change)"
            );
        }
        let minted = self.mint_x509(ch, &need).await?;
        // 5. Install.
        {
            let mut st = self.state.write().map_err(|_| ManagerError::NotAttested)?;
            if st.entries != entries {
                changed = true;
            }
            if st.federated != federated {
                changed = true;
                st.federated = federated;
            }
            if !minted.is_empty() {
                changed = true;
            }
            for s in minted {
                st.svids.insert(s.entry_id.clone(), s);
            }
            let before = st.svids.len();
            st.svids.retain(|id, _| entries.contains_key(id));
            changed |= st.svids.len() != before;
            st.jwt.retain(|(id, _), _| entries.contains_key(id));
            // JWT-SVIDs signed by a tainted key are dropped at once and minted anew on demand.
            let before = st.jwt.len();
            st.jwt
                .retain(|_, j| jwt_kid(&j.token).is_none_or(|k| !taint.kids.contains(&k)));
            if st.jwt.len() != before {
                tracing::info!(
                    count = before - st.jwt.len(),
                    "dropped JWT-SVIDs signed by a tainted key"
                );
                changed = true;
            }
            st.entries = entries;
        }
        if changed {
            self.persist();
            self.bump();
        }
        Ok(())
    }

    fn persist(&self) {
        let snap = match self.state.read() {
            Ok(st) => CacheSnapshot {
                bundle: st.bundle.clone(),
                federated: st.federated.values().cloned().collect(),
                entries: st.entries.values().cloned().collect(),
                svids: st.svids.values().cloned().collect(),
            },
            Err(_) => return,
        };
        if let Err(e) = self.storage.save_cache(&snap) {
            tracing::warn!(error = %e, "cannot persist the SVID cache");
        }
    }

    /// SyncAuthorizedEntries as SPIRE's agent does it: a full list, or revisions first and
    /// then only the entries whose revision changed.
    async fn sync_entries(
        &self,
        ch: Channel,
    ) -> Result<BTreeMap<String, types::Entry>, ManagerError> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let _ = tx
            .send(pb::entry::SyncAuthorizedEntriesRequest {
                output_mask: None,
                ids: vec![],
            })
            .await;
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if let Ok(v) = self.held_authorities().join(",").parse() {
            req.metadata_mut().insert(SVID_AUTHORITIES_HEADER, v);
        }
        let mut stream = pb::entry::entry_client::EntryClient::new(ch)
            .sync_authorized_entries(req)
            .await?
            .into_inner();
        let mut out = BTreeMap::new();
        let mut revisions = vec![];
        loop {
            let Some(m) = stream.message().await? else {
                break;
            };
            for e in m.entries {
                out.insert(e.id.clone(), e);
            }
            revisions.extend(m.entry_revisions);
            if !m.more {
                break;
            }
        }
        if revisions.is_empty() {
            return Ok(out);
        }
        // Revisions mode: keep what is current, ask for the rest.
        let cached = self
            .state
            .read()
            .map(|s| s.entries.clone())
            .unwrap_or_default();
        let mut ask = vec![];
        for r in &revisions {
            match cached.get(&r.id) {
                Some(e) if e.revision_number == r.revision_number => {
                    out.insert(r.id.clone(), e.clone());
                }
                _ => ask.push(r.id.clone()),
            }
        }
        for chunk in ask.chunks(BATCH) {
            let _ = tx
                .send(pb::entry::SyncAuthorizedEntriesRequest {
                    output_mask: None,
                    ids: chunk.to_vec(),
                })
                .await;
            loop {
                let Some(m) = stream.message().await? else {
                    break;
                };
                for e in m.entries {
                    out.insert(e.id.clone(), e);
                }
                if !m.more {
                    break;
                }
            }
        }
        drop(tx);
        Ok(out)
    }

    /// The authorities the agent's SVIDs chain to (its own and its workloads'), and the key
    /// IDs of the JWT-SVIDs it caches: what the server counts before a revocation.
    fn held_authorities(&self) -> Vec<String> {
        let Ok(st) = self.state.read() else {
            return vec![];
        };
        let mut out: BTreeSet<String> = st
            .agent
            .iter()
            .map(|a| a.chain.as_slice())
            .chain(st.svids.values().map(|s| s.chain.as_slice()))
            .filter_map(chain_authority)
            .collect();
        out.extend(st.jwt.values().filter_map(|j| jwt_kid(&j.token)));
        out.into_iter().collect()
    }

    async fn mint_x509(
        &self,
        ch: Channel,
        entries: &[types::Entry],
    ) -> Result<Vec<CachedSvid>, ManagerError> {
        let mut out = vec![];
        for chunk in entries.chunks(BATCH) {
            let mut keys_by_entry = vec![];
            let mut params = vec![];
            for e in chunk {
                let k = keys::generate()?;
                params.push(pb::svid::NewX509svidParams {
                    entry_id: e.id.clone(),
                    csr: keys::csr(&k)?,
                });
                keys_by_entry.push((e, k));
            }
            let resp = pb::svid::svid_client::SvidClient::new(ch.clone())
                .batch_new_x509svid(pb::svid::BatchNewX509svidRequest { params })
                .await?
                .into_inner();
            for ((e, k), r) in keys_by_entry.into_iter().zip(resp.results) {
                match (r.status, r.svid) {
                    (Some(s), Some(svid)) if s.code == 0 => {
                        let leaf = svid
                            .cert_chain
                            .first()
                            .and_then(|c| ParsedCert::parse(c).ok());
                        let Some(leaf) = leaf else {
                            tracing::warn!(entry_id = %e.id, "server returned an unparsable SVID");
                            continue;
                        };
                        out.push(CachedSvid {
                            entry_id: e.id.clone(),
                            entry_revision: e.revision_number,
                            not_before: leaf.not_before(),
                            not_after: leaf.not_after(),
                            chain: svid.cert_chain,
                            key_pkcs8: k,
                        });
                    }
                    (s, _) => {
                        let (code, msg) = s.map(|s| (s.code, s.message)).unwrap_or_default();
                        tracing::warn!(entry_id = %e.id, code, msg, "server did not mint an SVID");
                    }
                }
            }
        }
        if !out.is_empty() {
            tracing::debug!(count = out.len(), "minted workload X509-SVIDs");
        }
        Ok(out)
    }

    /// JWT-SVIDs for the workload with `selectors`: for `spiffe_id` only when given, else for
    /// each of its identities; cached until half their lifetime.
    pub async fn fetch_jwt(
        &self,
        selectors: &[types::Selector],
        spiffe_id: Option<&str>,
        audience: &[String],
    ) -> Result<Vec<(types::Entry, String)>, tonic::Status> {
        let mut aud: Vec<String> = audience.to_vec();
        aud.sort();
        aud.dedup();
        let view = self.view(selectors);
        if view.matched == 0 {
            return Err(tonic::Status::permission_denied("no identity issued"));
        }
        let entries: Vec<types::Entry> = {
            let st = self
                .state
                .read()
                .map_err(|_| tonic::Status::internal("agent state lock poisoned"))?;
            let mut v: Vec<types::Entry> = matching(&st, selectors)
                .into_iter()
                .filter(|e| spiffe_id.is_none_or(|id| entry_spiffe_id(e) == id))
                .cloned()
                .collect();
            // one token per SPIFFE ID
            let mut seen = BTreeSet::new();
            v.retain(|e| seen.insert(entry_spiffe_id(e)));
            v
        };
        if entries.is_empty() {
            return Err(tonic::Status::permission_denied(format!(
                "no identity issued for {}",
                spiffe_id.unwrap_or("this workload")
            )));
        }
        let now = now_secs();
        let mut out = vec![];
        for e in entries {
            let key = (e.id.clone(), aud.clone());
            let cached = self
                .state
                .read()
                .ok()
                .and_then(|s| s.jwt.get(&key).cloned())
                .filter(|j| now < j.issued_at + (j.expires_at.saturating_sub(j.issued_at)) / 2);
            if let Some(j) = cached {
                out.push((e, j.token));
                continue;
            }
            let ch = self
                .authenticated_channel()
                .await
                .map_err(|e| tonic::Status::unavailable(format!("cannot reach the server: {e}")))?;
            let r = pb::svid::svid_client::SvidClient::new(ch)
                .new_jwtsvid(pb::svid::NewJwtsvidRequest {
                    entry_id: e.id.clone(),
                    audience: aud.clone(),
                })
                .await;
            let svid = match r {
                Ok(r) => r
                    .into_inner()
                    .svid
                    .ok_or_else(|| tonic::Status::unavailable("the server returned no JWT-SVID"))?,
                Err(s) if s.code() == tonic::Code::InvalidArgument => return Err(s),
                Err(s) => {
                    if matches!(
                        s.code(),
                        tonic::Code::Unavailable | tonic::Code::PermissionDenied
                    ) {
                        self.set_channel(None);
                    }
                    return Err(tonic::Status::unavailable(format!(
                        "the server could not mint a JWT-SVID: {}",
                        s.message()
                    )));
                }
            };
            if let Ok(mut st) = self.state.write() {
                st.jwt.insert(
                    key,
                    JwtCached {
                        token: svid.token.clone(),
                        issued_at: svid.issued_at.max(0) as u64,
                        expires_at: svid.expires_at.max(0) as u64,
                    },
                );
            }
            out.push((e, svid.token));
        }
        Ok(out)
    }

    /// Syncs now and then every `sync_interval` until `shutdown` fires. Failures are logged
    /// and retried at the next tick; the cache keeps serving meanwhile.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            match self.sync_once().await {
                Ok(()) => {}
                Err(e) => tracing::warn!(error = %e, "sync with the server failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.sync_interval) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
