//! SPIRE-compatible gRPC services (`spire.api.server.{entry,bundle,svid,agent}.v1`) and what they
//! share: the [`Context`], caller identification and authorization ([`authz`]), conversions between
//! wire messages and datastore records, and the mapping of failures to gRPC codes (InvalidArgument
//! for bad input, NotFound, AlreadyExists, FailedPrecondition for wrong state, PermissionDenied,
//! Unavailable while the CA initializes; Internal only for our own bugs and storage faults).

pub mod agent;
pub mod authz;
pub mod breakglass;
pub mod bundle;
pub mod entry;
pub mod localauthority;
pub mod logger;
pub mod svid;
pub mod trustdomain;

use crate::ca::{Ca, CaError};
use crate::datastore::{AttestedNode, DataStore, DsError, RegistrationEntry, Selector};
use kame_api::pb::types;
use kame_api::{SpiffeId, TrustDomain};
use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Code, Status};

/// Everything the services need.
#[derive(Debug)]
pub struct Context {
    pub td: TrustDomain,
    pub ca: Arc<Ca>,
    pub ds: Arc<dyn DataStore>,
    /// Every registration entry, following the datastore's entry events.
    pub entries: Arc<crate::entrycache::EntryCache>,
    /// Every attested node, following the datastore's node events.
    pub nodes: Arc<crate::entrycache::NodeCache>,
    /// The bundle as last read, served to agents while the datastore is unreachable.
    pub last_good: LastGood,
    pub default_x509_svid_ttl: Duration,
    pub default_jwt_svid_ttl: Duration,
    pub agent_ttl: Duration,
    pub join_token_enabled: bool,
    /// The node attestor plugins (besides join_token) by name.
    pub node_attestors:
        std::collections::BTreeMap<String, Arc<dyn crate::attestation::NodeAttestor>>,
    /// `spiffe://<td>/spire/server`.
    pub server_spiffe_id: SpiffeId,
    /// What each agent last reported of its SVIDs' authorities, and when it was written to
    /// the datastore (writes are throttled).
    pub reported: std::sync::Mutex<std::collections::HashMap<String, (Vec<String>, u64)>>,
    /// Per-IP rate limits (`server.ratelimit`).
    pub limits: crate::ratelimit::Limits,
    /// Node attestation checks (certificate chains, signatures, quotes) in progress: they run
    /// on the blocking pool, at most this many at once, so that attestations cannot occupy
    /// the async workers every other API needs.
    pub attest_checks: Arc<tokio::sync::Semaphore>,
    /// Wakes a federated trust domain's refresher (after its bundle is set here).
    pub federation_triggers: crate::federation::refresher::Triggers,
    /// `server.break_glass`: reserve SVIDs for agents (none when absent).
    pub break_glass: Option<breakglass::Settings>,
}

/// The trust domain's bundle as the datastore last gave it, served while the database is
/// unreachable (restarting, failing over), with the node and entry caches: agents keep
/// syncing, and nothing is written meanwhile.
#[derive(Debug, Default)]
pub struct LastGood {
    bundle: std::sync::Mutex<Option<(types::Bundle, std::time::Instant)>>,
    /// Until when the datastore counts as down: answers come from what was last read without
    /// waiting for a connection each time.
    down_until: std::sync::Mutex<Option<std::time::Instant>>,
}

/// How long a bundle read is served again to agents without asking the datastore.
pub const BUNDLE_FRESH: Duration = Duration::from_secs(1);

/// How long an agent's GetBundle waits for the datastore before it is answered with the
/// bundle as last read.
pub const BUNDLE_WAIT: Duration = Duration::from_millis(500);

/// How long the datastore counts as down after a call found it unavailable.
const DOWN_FOR: Duration = Duration::from_secs(5);

impl LastGood {
    /// Whether a call found the datastore unavailable within the last [`DOWN_FOR`].
    pub fn datastore_down(&self) -> bool {
        self.down_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| std::time::Instant::now() < t)
    }

    /// Notes the outcome of a datastore call.
    pub fn saw<T>(&self, r: &Result<T, DsError>) {
        let mut d = self.down_until.lock().unwrap_or_else(|p| p.into_inner());
        match r {
            Err(e) if e.is_unavailable() => {
                if d.is_none() {
                    tracing::warn!(error = %e, "datastore unavailable: agents are served from what was last read");
                }
                *d = Some(std::time::Instant::now() + DOWN_FOR);
            }
            Ok(_) if d.is_some() => {
                tracing::info!("datastore available again");
                *d = None;
            }
            _ => {}
        }
    }

    /// The bundle of `trust_domain` for agents, who fetch it on every sync. A read made
    /// within the last [`BUNDLE_FRESH`] is answered again unless this server's CA already
    /// holds a newer one (its own rotation or taint is seen at once; other servers' within
    /// that time). While the datastore is down, or slower than [`BUNDLE_WAIT`], agents get
    /// the bundle as last read instead of waiting.
    pub async fn bundle(
        &self,
        ds: &dyn DataStore,
        trust_domain: &str,
        newer_than: u64,
    ) -> Result<Option<types::Bundle>, DsError> {
        let cached = self
            .bundle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|(b, _)| b.trust_domain == trust_domain)
            .map(|(b, at)| {
                let fresh = at.elapsed() < BUNDLE_FRESH && b.sequence_number >= newer_than;
                (b.clone(), fresh)
            });
        let Some((b, fresh)) = cached else {
            return self.read_bundle(ds, trust_domain).await;
        };
        if fresh || self.datastore_down() {
            return Ok(Some(b));
        }
        match tokio::time::timeout(BUNDLE_WAIT, self.read_bundle(ds, trust_domain)).await {
            Ok(Err(e)) if e.is_unavailable() => Ok(Some(b)),
            Ok(r) => r,
            Err(_) => {
                self.slow();
                Ok(Some(b))
            }
        }
    }

    /// The datastore did not answer in time: count it as down for a while.
    fn slow(&self) {
        tracing::warn!("datastore slow to answer: agents are served from what was last read");
        *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(std::time::Instant::now() + DOWN_FOR);
    }

    async fn read_bundle(
        &self,
        ds: &dyn DataStore,
        trust_domain: &str,
    ) -> Result<Option<types::Bundle>, DsError> {
        let fetched = ds.fetch_bundle(trust_domain).await;
        self.saw(&fetched);
        let mut b = self.bundle.lock().unwrap_or_else(|p| p.into_inner());
        match fetched {
            Ok(Some(x)) => {
                *b = Some((x.clone(), std::time::Instant::now()));
                Ok(Some(x))
            }
            other => other,
        }
    }
}

/// Node attestation checks that may run at once: one per core, at least two.
pub fn attest_check_permits() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(2)
}

/// Runs `f` (a node attestor's pure check) on the blocking pool once one of
/// `ctx.attest_checks` is free.
pub async fn attest_check<T: Send + 'static>(
    ctx: &Context,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Status> {
    on_blocking_pool(&ctx.attest_checks, f).await
}

/// Runs `f` on the blocking pool holding one of `permits` from before it starts to after it
/// ends, even when the caller stops waiting.
async fn on_blocking_pool<T: Send + 'static>(
    permits: &Arc<tokio::sync::Semaphore>,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Status> {
    let permit = permits
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| Status::unavailable("the server is shutting down"))?;
    // The permit goes with the work: a caller that goes away (a reset stream, a lapsed
    // deadline) drops this future, but the check runs on, and holds its place, to its end.
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        f()
    })
    .await
    .map_err(|e| Status::internal(format!("attestation check failed: {e}")))
}

/// The request header in which a Kame agent reports, on each SyncAuthorizedEntries call, the
/// authorities its SVIDs chain to: comma-separated root SKIDs (lower-case hex) and JWT kids.
/// SPIRE servers ignore it; a SPIRE agent does not send it (and counts as holding nothing).
pub const SVID_AUTHORITIES_HEADER: &str = "kame-svid-authorities";

/// At most this many authorities are taken from one report.
const MAX_REPORTED: usize = 256;

/// Records the authorities `node` reported in `req` (revocation readiness). A malformed
/// report is logged and ignored: it must not fail the agent's sync.
pub async fn record_svid_authorities<T>(
    ctx: &Context,
    node: &AttestedNode,
    req: &tonic::Request<T>,
) {
    let Some(v) = req.metadata().get(SVID_AUTHORITIES_HEADER) else {
        return;
    };
    if ctx.last_good.datastore_down() {
        return;
    }
    let Ok(v) = v.to_str() else {
        tracing::warn!(agent = %node.spiffe_id, "unreadable SVID authority report ignored");
        return;
    };
    let mut ids: Vec<String> = v
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if ids.len() > MAX_REPORTED
        || ids
            .iter()
            .any(|s| s.len() > 64 || !s.chars().all(|c| c.is_ascii_alphanumeric()))
    {
        tracing::warn!(agent = %node.spiffe_id, "malformed SVID authority report ignored");
        return;
    }
    ids.sort();
    ids.dedup();
    let now = crate::ca::now_secs();
    let refresh = crate::ca::READINESS_WINDOW.as_secs() / 4;
    {
        let m = ctx.reported.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((prev, at)) = m.get(&node.spiffe_id)
            && *prev == ids
            && now < at + refresh
        {
            return;
        }
    }
    match ctx
        .ds
        .record_agent_authorities(&node.spiffe_id, &ids, now as i64)
        .await
    {
        Ok(()) => {
            ctx.reported
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(node.spiffe_id.clone(), (ids, now));
        }
        Err(e) => {
            tracing::warn!(agent = %node.spiffe_id, error = %e, "cannot record SVID authorities")
        }
    }
}

/// Maps datastore failures to gRPC statuses.
pub fn ds_status(e: DsError) -> Status {
    match e {
        DsError::AlreadyExists(m) => Status::already_exists(format!("{m} already exists")),
        DsError::NotFound(m) => Status::not_found(format!("{m} not found")),
        DsError::FailedPrecondition(m) => Status::failed_precondition(m),
        DsError::Banned => Status::permission_denied("agent is banned"),
        other if other.is_unavailable() => {
            tracing::warn!(error = %other, "datastore unavailable");
            Status::unavailable("datastore unavailable; try again later")
        }
        other => {
            tracing::error!(error = %other, "datastore failure");
            Status::internal(format!("datastore failure: {other}"))
        }
    }
}

/// Maps CA failures to gRPC statuses.
pub fn ca_status(e: CaError) -> Status {
    match e {
        CaError::NotReady(_) => Status::unavailable(e.to_string()),
        CaError::InvalidTtl(m) => Status::invalid_argument(m),
        CaError::Profile(p) => Status::invalid_argument(p.to_string()),
        CaError::Datastore(d) => ds_status(d),
        // The key backend is down, slow or throttling: the caller may retry; the server stays.
        // The details (ARNs, paths, key names) go to the log, not to callers.
        CaError::KeyManager(kame_keymanager::Error::Unavailable(m)) => {
            tracing::warn!(error = %m, "key backend unavailable");
            Status::unavailable("key backend unavailable; try again later")
        }
        CaError::TooManyJwtKeys(_) => Status::failed_precondition(e.to_string()),
        // The log key is not usable: the operator must act.
        CaError::Transparency(
            crate::transparency::LogError::KeyChanged(_)
            | crate::transparency::LogError::KeyType(_),
        ) => {
            tracing::error!(error = %e, "transparency log key; SVID not issued");
            Status::failed_precondition(e.to_string())
        }
        // The log cannot record: nothing was issued; the caller may retry.
        CaError::Transparency(ref t) => {
            tracing::warn!(error = %t, "transparency log cannot record; SVID not issued");
            Status::unavailable("the transparency log cannot record the SVID; try again later")
        }
        // A nested server's upstream: its state passes through to the caller.
        CaError::Upstream(kame_upstream::UpstreamError::Unavailable(_)) => {
            Status::unavailable(e.to_string())
        }
        CaError::Upstream(kame_upstream::UpstreamError::Refused(_)) => {
            Status::failed_precondition(e.to_string())
        }
        other => {
            tracing::error!(error = %other, "CA failure");
            Status::internal(other.to_string())
        }
    }
}

/// A per-item status for batch responses.
pub fn item_status(code: Code, message: impl Into<String>) -> types::Status {
    types::Status {
        code: code as i32,
        message: message.into(),
    }
}

pub fn ok_status() -> types::Status {
    item_status(Code::Ok, "OK")
}

pub fn status_of(s: &Status) -> types::Status {
    item_status(s.code(), s.message())
}

pub fn id_to_proto(id: &str) -> Option<types::Spiffeid> {
    let id = SpiffeId::parse(id).ok()?;
    Some(types::Spiffeid {
        trust_domain: id.trust_domain().as_str().to_string(),
        path: id.path().to_string(),
    })
}

/// Parses a `SPIFFEID` message, which must be present and valid.
pub fn id_from_proto(field: &str, id: Option<&types::Spiffeid>) -> Result<SpiffeId, Status> {
    let id = id.ok_or_else(|| Status::invalid_argument(format!("{field}: missing SPIFFE ID")))?;
    SpiffeId::from_parts(&id.trust_domain, &id.path)
        .map_err(|e| Status::invalid_argument(format!("{field}: invalid SPIFFE ID: {e}")))
}

/// Parses a `SPIFFEID` that must be in the server's trust domain.
pub fn local_id_from_proto(
    ctx: &Context,
    field: &str,
    id: Option<&types::Spiffeid>,
) -> Result<SpiffeId, Status> {
    let id = id_from_proto(field, id)?;
    if !id.is_member_of(&ctx.td) {
        return Err(Status::invalid_argument(format!(
            "{field}: {id} is not a member of trust domain {}",
            ctx.td
        )));
    }
    Ok(id)
}

pub fn selector_to_proto(s: &Selector) -> types::Selector {
    types::Selector {
        r#type: s.kind.clone(),
        value: s.value.clone(),
    }
}

pub fn selector_from_proto(s: &types::Selector) -> Result<Selector, Status> {
    if s.r#type.is_empty() {
        return Err(Status::invalid_argument("selector type is empty"));
    }
    if s.r#type.contains(':') {
        return Err(Status::invalid_argument(format!(
            "selector type {:?} contains ':'",
            s.r#type
        )));
    }
    if s.value.is_empty() {
        return Err(Status::invalid_argument(format!(
            "selector {:?} has an empty value",
            s.r#type
        )));
    }
    Ok(Selector::new(&s.r#type, &s.value))
}

pub fn entry_to_proto(e: &RegistrationEntry, mask: Option<&types::EntryMask>) -> types::Entry {
    let all = types::EntryMask {
        spiffe_id: true,
        parent_id: true,
        selectors: true,
        x509_svid_ttl: true,
        federates_with: true,
        admin: true,
        downstream: true,
        expires_at: true,
        dns_names: true,
        revision_number: true,
        store_svid: true,
        jwt_svid_ttl: true,
        hint: true,
        created_at: true,
        additional_attributes: true,
    };
    let m = mask.unwrap_or(&all);
    types::Entry {
        id: e.id.clone(),
        spiffe_id: if m.spiffe_id {
            id_to_proto(&e.spiffe_id)
        } else {
            None
        },
        parent_id: if m.parent_id {
            id_to_proto(&e.parent_id)
        } else {
            None
        },
        selectors: if m.selectors {
            e.selectors.iter().map(selector_to_proto).collect()
        } else {
            vec![]
        },
        x509_svid_ttl: if m.x509_svid_ttl { e.x509_svid_ttl } else { 0 },
        federates_with: if m.federates_with {
            e.federates_with.clone()
        } else {
            vec![]
        },
        admin: m.admin && e.admin,
        downstream: m.downstream && e.downstream,
        expires_at: if m.expires_at { e.expires_at } else { 0 },
        dns_names: if m.dns_names {
            e.dns_names.clone()
        } else {
            vec![]
        },
        revision_number: if m.revision_number {
            e.revision_number
        } else {
            0
        },
        store_svid: m.store_svid && e.store_svid,
        jwt_svid_ttl: if m.jwt_svid_ttl { e.jwt_svid_ttl } else { 0 },
        hint: if m.hint {
            e.hint.clone()
        } else {
            String::new()
        },
        created_at: if m.created_at { e.created_at } else { 0 },
        additional_attributes: None,
    }
}

const MAX_HINT_LEN: usize = 1024;

/// Validates a DNS name for an SVID (RFC 1123 labels, optional leading `*.`).
pub fn validate_dns_name(d: &str) -> Result<(), String> {
    let name = d.strip_prefix("*.").unwrap_or(d);
    if name.is_empty() || name.len() > 253 {
        return Err(format!("DNS name {d:?} is empty or too long"));
    }
    for label in name.split('.') {
        if label.is_empty()
            || label.len() > 63
            || label.starts_with('-')
            || label.ends_with('-')
            || !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(format!("DNS name {d:?} is not valid"));
        }
    }
    Ok(())
}

/// Checks and converts an entry from the wire. `id` and `created_at` are left to the caller.
pub fn entry_from_proto(ctx: &Context, e: &types::Entry) -> Result<RegistrationEntry, Status> {
    let spiffe_id = local_id_from_proto(ctx, "spiffe_id", e.spiffe_id.as_ref())?;
    if spiffe_id.is_root() {
        return Err(Status::invalid_argument(
            "spiffe_id: the trust domain's own ID cannot be registered (an SVID needs a path)",
        ));
    }
    spiffe_id
        .check_issuable()
        .map_err(|err| Status::invalid_argument(format!("spiffe_id: {err}")))?;
    let parent_id = local_id_from_proto(ctx, "parent_id", e.parent_id.as_ref())?;
    if e.selectors.is_empty() {
        return Err(Status::invalid_argument(
            "selectors: an entry needs at least one selector",
        ));
    }
    let mut selectors = BTreeSet::new();
    for s in &e.selectors {
        selectors.insert(selector_from_proto(s)?);
    }
    if e.x509_svid_ttl < 0 {
        return Err(Status::invalid_argument(
            "x509_svid_ttl: must not be negative",
        ));
    }
    if e.jwt_svid_ttl < 0 {
        return Err(Status::invalid_argument(
            "jwt_svid_ttl: must not be negative",
        ));
    }
    if e.expires_at < 0 {
        return Err(Status::invalid_argument("expires_at: must not be negative"));
    }
    for d in &e.dns_names {
        validate_dns_name(d).map_err(|m| Status::invalid_argument(format!("dns_names: {m}")))?;
    }
    let mut federates_with = vec![];
    for f in &e.federates_with {
        let td = TrustDomain::parse(f)
            .map_err(|err| Status::invalid_argument(format!("federates_with: {f:?}: {err}")))?;
        if td == ctx.td {
            return Err(Status::invalid_argument(
                "federates_with: an entry cannot federate with its own trust domain",
            ));
        }
        let s = td.id_string();
        if !federates_with.contains(&s) {
            federates_with.push(s);
        }
    }
    if e.hint.len() > MAX_HINT_LEN {
        return Err(Status::invalid_argument(format!(
            "hint: longer than {MAX_HINT_LEN} bytes"
        )));
    }
    Ok(RegistrationEntry {
        id: e.id.clone(),
        spiffe_id: spiffe_id.to_string(),
        parent_id: parent_id.to_string(),
        selectors: selectors.into_iter().collect(),
        x509_svid_ttl: e.x509_svid_ttl,
        jwt_svid_ttl: e.jwt_svid_ttl,
        federates_with,
        admin: e.admin,
        downstream: e.downstream,
        expires_at: e.expires_at,
        dns_names: e.dns_names.clone(),
        revision_number: 0,
        store_svid: e.store_svid,
        hint: e.hint.clone(),
        created_at: 0,
    })
}

/// Checks that every federated trust domain of an entry has a bundle.
pub async fn check_federated_bundles(ctx: &Context, e: &RegistrationEntry) -> Result<(), Status> {
    for f in &e.federates_with {
        let name = f.trim_start_matches("spiffe://");
        if ctx
            .ds
            .fetch_bundle(name)
            .await
            .map_err(ds_status)?
            .is_none()
        {
            return Err(Status::failed_precondition(format!(
                "federates_with: no bundle for trust domain {name:?} (create it first)"
            )));
        }
    }
    Ok(())
}

pub fn agent_to_proto(n: &AttestedNode, mask: Option<&types::AgentMask>) -> types::Agent {
    let all = types::AgentMask {
        attestation_type: true,
        x509svid_serial_number: true,
        x509svid_expires_at: true,
        selectors: true,
        banned: true,
        can_reattest: true,
        agent_version: true,
    };
    let m = mask.unwrap_or(&all);
    types::Agent {
        id: id_to_proto(&n.spiffe_id),
        attestation_type: if m.attestation_type {
            n.attestation_type.clone()
        } else {
            String::new()
        },
        x509svid_serial_number: if m.x509svid_serial_number {
            n.serial_number.clone()
        } else {
            String::new()
        },
        x509svid_expires_at: if m.x509svid_expires_at {
            n.expires_at
        } else {
            0
        },
        selectors: if m.selectors {
            n.selectors.iter().map(selector_to_proto).collect()
        } else {
            vec![]
        },
        banned: m.banned && n.banned(),
        can_reattest: m.can_reattest && n.can_reattest,
        agent_version: if m.agent_version {
            n.agent_version.clone()
        } else {
            String::new()
        },
    }
}

/// The entries an agent may obtain SVIDs for (see [`crate::entrycache::EntryCache::authorized`]),
/// from the server's entry cache.
pub fn authorized_entries(ctx: &Context, agent: &AttestedNode) -> Vec<Arc<RegistrationEntry>> {
    ctx.entries.authorized(
        &agent.spiffe_id,
        &agent.selectors,
        crate::ca::now_secs() as i64,
    )
}

/// The authorized entry `id` for signing: when the cache does not have it (it may have been
/// created on another server since the last poll), the cache catches up once and looks again.
pub async fn authorized_entry(
    ctx: &Context,
    agent: &AttestedNode,
    id: &str,
) -> Result<Arc<RegistrationEntry>, Status> {
    let find = || {
        authorized_entries(ctx, agent)
            .into_iter()
            .find(|e| e.id == id)
    };
    if let Some(e) = find() {
        return Ok(e);
    }
    ctx.entries.refresh().await.map_err(ds_status)?;
    find().ok_or_else(|| Status::not_found(format!("entry {id:?} not found or not authorized")))
}

/// One page of `all` for a List RPC: `page_size` 0 means everything; the token is the offset
/// of the next page (empty when there is none).
pub fn paginate<T>(
    all: Vec<T>,
    page_size: i32,
    page_token: &str,
) -> Result<(Vec<T>, String), Status> {
    if page_size < 0 {
        return Err(Status::invalid_argument("page_size: must not be negative"));
    }
    let start: usize = if page_token.is_empty() {
        0
    } else {
        page_token
            .parse()
            .map_err(|_| Status::invalid_argument("page_token: invalid"))?
    };
    let total = all.len();
    if page_size == 0 {
        return Ok((all.into_iter().skip(start).collect(), String::new()));
    }
    let end = start.saturating_add(page_size as usize).min(total);
    let page = all
        .into_iter()
        .skip(start)
        .take(end.saturating_sub(start))
        .collect();
    let next = if end < total {
        end.to_string()
    } else {
        String::new()
    };
    Ok((page, next))
}

/// A TTL from the wire: negative is an error, 0 means the default.
pub fn ttl_or_default(field: &str, ttl: i32, default: Duration) -> Result<Duration, Status> {
    match ttl {
        t if t < 0 => Err(Status::invalid_argument(format!(
            "{field}: must not be negative"
        ))),
        0 => Ok(default),
        t => Ok(Duration::from_secs(t as u64)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paginate_pages_and_tokens() {
        let all: Vec<u32> = (0..5).collect();
        assert_eq!(
            paginate(all.clone(), 0, "").unwrap(),
            (all.clone(), String::new())
        );
        let (p, t) = paginate(all.clone(), 2, "").unwrap();
        assert_eq!((p, t.as_str()), (vec![0, 1], "2"));
        let (p, t) = paginate(all.clone(), 2, "4").unwrap();
        assert_eq!((p, t.as_str()), (vec![4], ""));
        assert!(paginate(all.clone(), 2, "x").is_err());
        assert!(paginate(all.clone(), -1, "").is_err());
        assert_eq!(paginate(all, 2, "99").unwrap().0, Vec::<u32>::new());
    }

    #[test]
    fn dns_names_are_validated() {
        for ok in ["a.example.org", "*.example.org", "x-1.y"] {
            validate_dns_name(ok).unwrap();
        }
        for bad in ["", "a..b", "-a.b", "a b", "a.b-", &"a".repeat(64)] {
            assert!(validate_dns_name(bad).is_err(), "{bad}");
        }
    }

    /// A caller that goes away (its future dropped: a reset stream, a lapsed deadline) does
    /// not free its place while its check still runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn attest_check_permit_is_held_until_the_work_ends_even_if_the_caller_leaves() {
        let permits = Arc::new(tokio::sync::Semaphore::new(1));
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let call = on_blocking_pool(&permits, move || {
            started_tx.send(()).unwrap();
            release_rx.recv().unwrap();
        });
        let _ = tokio::time::timeout(Duration::from_millis(200), call).await;
        started_rx.recv().unwrap();
        assert_eq!(permits.available_permits(), 0, "the check still runs");
        release_tx.send(()).unwrap();
        let p = tokio::time::timeout(Duration::from_secs(5), permits.acquire())
            .await
            .expect("the permit comes back when the work ends");
        drop(p);
    }
}
