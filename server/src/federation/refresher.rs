//! Keeps the bundles of federated trust domains (SPIFFE Federation §5, SPIRE's bundle client):
//! for each relationship (`federates_with` in the configuration, or made through the
//! TrustDomain API: [`manage`]), fetch the endpoint's SPIFFE bundle, check it, and store it
//! when it changed; then wait as the publisher's refresh hint says (SPIRE's bounds), or until
//! woken ([`Triggers`]: a bundle set by an operator, `RefreshBundle`).
//!
//! An `https_spiffe` endpoint must present an X509-SVID for exactly `endpoint_spiffe_id` that
//! chains to the bundle already held for that ID's trust domain (the previous fetch, or a
//! one-time `bundle set`); an `https_web` endpoint a certificate for the URL's host under the
//! system's roots. What is refused, and the last good bundle kept: a TLS failure, a status
//! other than 200, a body over [`MAX_BUNDLE`], a document that is not a SPIFFE bundle, an
//! authority of another trust domain, a sequence number lower than the last accepted in this
//! run, or the same sequence number with other content. Each outcome is logged and counted
//! ([`FederationMetrics`]). It writes only the federated trust domains' bundles.

use super::{Relationship, RelationshipProfile};
use crate::datastore::DataStore;
use kame_api::SpiffeId;
use kame_api::pb::types::Bundle;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The largest bundle document accepted.
pub const MAX_BUNDLE: usize = 1024 * 1024;

/// SPIRE's `MinimumRefreshHint`: shorter hints count as this.
pub const MIN_REFRESH_HINT: Duration = Duration::from_secs(60);

/// SPIRE's `attemptsPerRefreshHint`.
pub const ATTEMPTS_PER_HINT: u32 = 4;

/// Without a hint: every five minutes (SPIRE's `defaultRefreshInterval`).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(300);

/// After a failure with no copy held: every minute.
pub const RETRY_WITHOUT_COPY: Duration = Duration::from_secs(60);

/// Each fetch's deadline.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// When to fetch again after holding a bundle with `hint` seconds (SPIRE's schedule).
pub fn next_refresh(hint_secs: i64) -> Duration {
    if hint_secs <= 0 {
        return DEFAULT_INTERVAL;
    }
    Duration::from_secs(hint_secs as u64).max(MIN_REFRESH_HINT) / ATTEMPTS_PER_HINT
}

/// Why a fetch was refused, one variant per check.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error("local copy of bundle for {0} not found: set it once with `bundle set`")]
    NoLocalCopy(String),
    #[error("datastore: {0}")]
    Datastore(String),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("fetching {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: the bundle is larger than {MAX_BUNDLE} bytes")]
    TooLarge { url: String },
    #[error("{url}: not a SPIFFE bundle: {reason}")]
    NotABundle { url: String, reason: String },
    #[error("{url}: authority {index} belongs to trust domain {found}, not {want}")]
    ForeignAuthority {
        url: String,
        index: usize,
        found: String,
        want: String,
    },
    #[error("{url}: sequence number {got} is lower than {seen}, accepted before")]
    SequenceBackwards { url: String, got: u64, seen: u64 },
    #[error("{url}: sequence number {seq} again, with other authorities")]
    SequenceReused { url: String, seq: u64 },
}

/// Per federated trust domain: fetches that succeeded and failed, and when one last succeeded.
#[derive(Debug, Default)]
pub struct FederationMetrics {
    by_td: Mutex<BTreeMap<String, (u64, u64, u64)>>,
}

impl FederationMetrics {
    fn record(&self, td: &str, ok: bool, now: u64) {
        let mut m = self.by_td.lock().unwrap_or_else(|p| p.into_inner());
        let e = m.entry(td.to_string()).or_default();
        if ok {
            e.0 += 1;
            e.2 = now;
        } else {
            e.1 += 1;
        }
    }

    /// (successes, failures, last success unix seconds) for `td`.
    pub fn get(&self, td: &str) -> (u64, u64, u64) {
        self.by_td
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(td)
            .copied()
            .unwrap_or_default()
    }

    /// The Prometheus text.
    pub fn render(&self) -> String {
        let m = self.by_td.lock().unwrap_or_else(|p| p.into_inner());
        if m.is_empty() {
            return String::new();
        }
        let mut out = String::from(
            "# HELP kame_federation_refresh_total Federated bundle fetches, by trust domain and result.\n# TYPE kame_federation_refresh_total counter\n",
        );
        for (td, (ok, err, _)) in m.iter() {
            out.push_str(&format!(
                "kame_federation_refresh_total{{trust_domain=\"{td}\",result=\"ok\"}} {ok}\nkame_federation_refresh_total{{trust_domain=\"{td}\",result=\"error\"}} {err}\n"
            ));
        }
        out.push_str("# HELP kame_federation_last_success_timestamp_seconds When a federated bundle was last fetched and accepted.\n# TYPE kame_federation_last_success_timestamp_seconds gauge\n");
        for (td, (_, _, at)) in m.iter() {
            out.push_str(&format!(
                "kame_federation_last_success_timestamp_seconds{{trust_domain=\"{td}\"}} {at}\n"
            ));
        }
        out
    }
}

/// A wake-up for a refresher: fetch now, and answer the outcome when asked to.
pub type Wake = Option<tokio::sync::oneshot::Sender<Result<(), String>>>;

/// Wakes a trust domain's refresher now (its bundle was set by an operator, or a refresh
/// was asked for), and the manager when relationships changed.
#[derive(Debug, Clone, Default)]
pub struct Triggers(
    Arc<Mutex<BTreeMap<String, tokio::sync::mpsc::Sender<Wake>>>>,
    Arc<tokio::sync::Notify>,
);

impl Triggers {
    /// Relationships changed through the API: the manager reads them again now.
    pub fn reload(&self) {
        self.1.notify_one();
    }

    /// The wake-ups for `td`'s (new) refresher.
    pub fn register(&self, td: &str) -> tokio::sync::mpsc::Receiver<Wake> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(td.to_string(), tx);
        rx
    }

    /// `td` has no refresher any more.
    pub fn forget(&self, td: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(td);
    }

    fn sender(&self, td: &str) -> Option<tokio::sync::mpsc::Sender<Wake>> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(td)
            .cloned()
    }

    /// Wakes `td`'s refresher without waiting; whether there is one.
    pub fn trigger(&self, td: &str) -> bool {
        match self.sender(td) {
            // A full queue already holds a wake-up.
            Some(tx) => {
                let _ = tx.try_send(None);
                true
            }
            None => false,
        }
    }

    /// Has `td`'s refresher fetch now and waits for the outcome (at most `limit`); `None`
    /// when there is no refresher for `td`.
    pub async fn refresh_now(&self, td: &str, limit: Duration) -> Option<Result<(), String>> {
        let tx = self.sender(td)?;
        let (rtx, rrx) = tokio::sync::oneshot::channel();
        if tx.send(Some(rtx)).await.is_err() {
            return None;
        }
        Some(match tokio::time::timeout(limit, rrx).await {
            Ok(Ok(r)) => r,
            _ => Err("the refresh did not finish in time".into()),
        })
    }
}

/// The federated trust domains' bundles, kept fresh.
#[derive(Debug)]
pub struct Refresher {
    ds: Arc<dyn DataStore>,
    metrics: Arc<FederationMetrics>,
    /// The last `spiffe_sequence` accepted per trust domain since its refresher started, and
    /// the authorities it came with.
    seen: Mutex<BTreeMap<String, Accepted>>,
}

/// What a fetch was accepted with.
type Accepted = (
    u64,
    Vec<kame_api::pb::types::X509Certificate>,
    Vec<kame_api::pb::types::JwtKey>,
);

/// The trust domain a CA certificate names in a SPIFFE URI SAN, if any.
fn cert_trust_domain(der: &[u8]) -> Option<String> {
    let p = kame_api::x509svid::ParsedCert::parse(der).ok()?;
    let (_, uris, _) = p.sans().ok()??;
    uris.iter()
        .find_map(|u| SpiffeId::parse(u).ok())
        .map(|id| id.trust_domain().as_str().to_string())
}

impl Refresher {
    pub fn new(ds: Arc<dyn DataStore>, metrics: Arc<FederationMetrics>) -> Arc<Self> {
        Arc::new(Refresher {
            ds,
            metrics,
            seen: Mutex::new(BTreeMap::new()),
        })
    }

    fn client(
        &self,
        rel: &Relationship,
        roots: Vec<Vec<u8>>,
    ) -> Result<reqwest::Client, RefreshError> {
        let b = reqwest::Client::builder()
            .https_only(true)
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(FETCH_TIMEOUT.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none());
        let b = match &rel.profile {
            RelationshipProfile::HttpsWeb => b,
            RelationshipProfile::HttpsSpiffe { endpoint_spiffe_id } => {
                let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
                let verifier = Arc::new(kame_api::tls::SpiffeServerVerifier::new(
                    Arc::new(move || roots.clone()),
                    endpoint_spiffe_id.clone(),
                    provider.clone(),
                ));
                let cfg = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| RefreshError::Tls(e.to_string()))?
                    .dangerous()
                    .with_custom_certificate_verifier(verifier)
                    .with_no_client_auth();
                b.tls_backend_preconfigured(cfg)
            }
        };
        b.build().map_err(|e| RefreshError::Tls(e.to_string()))
    }

    /// One fetch for `rel`: the bundle now held (changed or not).
    pub async fn refresh(&self, rel: &Relationship) -> Result<Bundle, RefreshError> {
        let r = self.fetch_and_store(rel).await;
        self.metrics
            .record(rel.trust_domain.as_str(), r.is_ok(), crate::ca::now_secs());
        r
    }

    async fn fetch_and_store(&self, rel: &Relationship) -> Result<Bundle, RefreshError> {
        let url = rel.bundle_endpoint_url.clone();
        let td = rel.trust_domain.as_str();
        let ds_err = |e: crate::datastore::DsError| RefreshError::Datastore(e.to_string());
        let roots = match &rel.profile {
            RelationshipProfile::HttpsWeb => vec![],
            RelationshipProfile::HttpsSpiffe { endpoint_spiffe_id } => {
                let etd = endpoint_spiffe_id.trust_domain().as_str().to_string();
                let held = self
                    .ds
                    .fetch_bundle(&etd)
                    .await
                    .map_err(ds_err)?
                    .ok_or(RefreshError::NoLocalCopy(etd))?;
                held.x509_authorities.into_iter().map(|c| c.asn1).collect()
            }
        };
        let client = self.client(rel, roots)?;
        let fetch_err = |e: reqwest::Error| RefreshError::Fetch {
            url: url.clone(),
            reason: error_chain(&e.without_url()),
        };
        let mut resp = client.get(&url).send().await.map_err(fetch_err)?;
        if resp.status().as_u16() != 200 {
            return Err(RefreshError::Status {
                url,
                status: resp.status().as_u16(),
            });
        }
        if resp.content_length().is_some_and(|n| n > MAX_BUNDLE as u64) {
            return Err(RefreshError::TooLarge { url });
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(fetch_err)? {
            if body.len() + chunk.len() > MAX_BUNDLE {
                return Err(RefreshError::TooLarge { url });
            }
            body.extend_from_slice(&chunk);
        }
        let mut got =
            kame_api::bundle::from_spiffe_json(&rel.trust_domain, &body).map_err(|e| {
                RefreshError::NotABundle {
                    url: url.clone(),
                    reason: e.to_string(),
                }
            })?;
        got.trust_domain = td.to_string();
        crate::service::bundle::validate_authorities(&got).map_err(|s| {
            RefreshError::NotABundle {
                url: url.clone(),
                reason: s.message().to_string(),
            }
        })?;
        for (index, c) in got.x509_authorities.iter().enumerate() {
            if let Some(found) = cert_trust_domain(&c.asn1)
                && found != td
            {
                return Err(RefreshError::ForeignAuthority {
                    url,
                    index,
                    found,
                    want: td.to_string(),
                });
            }
        }
        let seq = got.sequence_number;
        let seen = self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(td)
            .cloned();
        let stored = self.ds.fetch_bundle(td).await.map_err(ds_err)?;
        let same = |a: &Bundle, b: &Bundle| {
            a.x509_authorities == b.x509_authorities && a.jwt_authorities == b.jwt_authorities
        };
        if let Some((seen, x509, jwt)) = &seen
            && seq > 0
        {
            if seq < *seen {
                return Err(RefreshError::SequenceBackwards {
                    url,
                    got: seq,
                    seen: *seen,
                });
            }
            if seq == *seen && (&got.x509_authorities != x509 || &got.jwt_authorities != jwt) {
                return Err(RefreshError::SequenceReused { url, seq });
            }
        }
        let held = match stored {
            Some(s) if same(&s, &got) && s.refresh_hint == got.refresh_hint => s,
            Some(_) => {
                let b = self.ds.update_bundle(&got).await.map_err(ds_err)?;
                tracing::info!(trust_domain = %td, sequence = seq, "federated bundle updated");
                b
            }
            None => {
                let b = self.ds.create_bundle(&got).await.map_err(ds_err)?;
                tracing::info!(trust_domain = %td, sequence = seq, "federated bundle stored");
                b
            }
        };
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).insert(
            td.to_string(),
            (
                seq,
                got.x509_authorities.clone(),
                got.jwt_authorities.clone(),
            ),
        );
        Ok(held)
    }

    /// Forgets the sequence accepted for `td` (its relationship starts anew).
    pub fn reset(&self, td: &str) {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(td);
    }

    /// Refreshes `rel` on SPIRE's schedule until `shutdown`; a wake-up fetches at once (and
    /// answers the outcome when asked to).
    pub async fn run(
        self: Arc<Self>,
        rel: Relationship,
        mut wake: tokio::sync::mpsc::Receiver<Wake>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut reply: Wake = None;
        loop {
            let r = self.refresh(&rel).await;
            if let Some(tx) = reply.take() {
                let _ = tx.send(r.as_ref().map(|_| ()).map_err(|e| e.to_string()));
            }
            let wait = match r {
                Ok(b) => next_refresh(b.refresh_hint),
                Err(e) => {
                    tracing::warn!(
                        trust_domain = %rel.trust_domain,
                        error = %e,
                        "federated bundle refresh failed; the last good bundle is kept"
                    );
                    match self.ds.fetch_bundle(rel.trust_domain.as_str()).await {
                        Ok(Some(b)) => next_refresh(b.refresh_hint),
                        _ => RETRY_WITHOUT_COPY,
                    }
                }
            };
            tokio::select! {
                _ = shutdown.changed() => return,
                w = wake.recv() => match w {
                    Some(w) => reply = w,
                    // No one can wake it any more: wait out the schedule.
                    None => tokio::time::sleep(wait).await,
                },
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// How often the manager reads the relationships made through the API (SPIRE's).
pub const RELOAD_EVERY: Duration = Duration::from_secs(10);

/// Runs one refresher per federated trust domain: those of the configuration, and those
/// made through the TrustDomain API (read every [`RELOAD_EVERY`], or at once after a change),
/// the configuration's winning for a trust domain in both, as SPIRE's static relationships
/// do. A relationship that changed restarts its refresher; one that went stops it.
pub async fn manage(
    refresher: Arc<Refresher>,
    configured: Vec<Relationship>,
    own: kame_api::TrustDomain,
    triggers: Triggers,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut running: BTreeMap<String, (Relationship, tokio::task::JoinHandle<()>)> =
        BTreeMap::new();
    loop {
        let mut want: BTreeMap<String, Relationship> = BTreeMap::new();
        match refresher.ds.list_federation_relationships().await {
            Ok(list) => {
                for r in list {
                    match Relationship::from_proto(&r, &own) {
                        Ok(rel) => {
                            want.insert(rel.trust_domain.as_str().to_string(), rel);
                        }
                        Err(e) => {
                            tracing::warn!(trust_domain = %r.trust_domain, error = %e, "ignoring a stored federation relationship")
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read federation relationships; keeping the running ones");
                want = running
                    .iter()
                    .map(|(k, (r, _))| (k.clone(), r.clone()))
                    .collect();
            }
        }
        for rel in &configured {
            want.insert(rel.trust_domain.as_str().to_string(), rel.clone());
        }
        running.retain(|td, (rel, h)| {
            let keep = want.get(td) == Some(rel);
            if !keep {
                h.abort();
                triggers.forget(td);
            }
            keep
        });
        for (td, rel) in want {
            if running.contains_key(&td) {
                continue;
            }
            let wake = triggers.register(&td);
            refresher.reset(&td);
            let h = tokio::spawn(refresher.clone().run(rel.clone(), wake, shutdown.clone()));
            running.insert(td, (rel, h));
        }
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = triggers.1.notified() => {}
            _ = tokio::time::sleep(RELOAD_EVERY) => {}
        }
    }
    for (_, (_, h)) in running {
        h.abort();
    }
}

/// An error and its causes on one line, each once.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        cur = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn federation_refresh_schedule_is_spires() {
        assert_eq!(
            next_refresh(300),
            Duration::from_secs(75),
            "5 min hint: 75 s"
        );
        assert_eq!(
            next_refresh(10),
            Duration::from_secs(15),
            "floor: 1 min / 4"
        );
        assert_eq!(next_refresh(0), DEFAULT_INTERVAL, "no hint: 5 min");
        assert_eq!(next_refresh(-5), DEFAULT_INTERVAL);
        assert_eq!(next_refresh(3600), Duration::from_secs(900));
    }
}
