//! Metrics in the Prometheus text format, served on `telemetry { Prometheus { host port } }`
//! at `GET /metrics`: the KeyManager key inventory from the last reconcile pass (keys the CA
//! names, orphans kept for a pending intent or left over, orphans disposed of and dead servers'
//! keys swept since start-up), SVIDs issued, node attestations by attestor and result, build
//! information; with the rate limits' counters ([`crate::ratelimit`]), the gRPC calls
//! ([`rpc`]), the federation's and the CA's authority expiry from their owners. Plain counters,
//! gauges and histograms; it must not expose key material, identities or addresses.

pub mod rpc;

use std::sync::atomic::{AtomicU64, Ordering};

/// Which kind of SVID was issued.
#[derive(Debug, Clone, Copy)]
pub enum SvidKind {
    X509,
    Jwt,
}

#[derive(Debug, Default)]
pub struct Metrics {
    x509_svids_total: AtomicU64,
    jwt_svids_total: AtomicU64,
    /// (attestor, refused?) → count; attestors are the configured ones or `unknown`.
    attestations: std::sync::Mutex<std::collections::BTreeMap<(String, bool), u64>>,
    keys_named: AtomicU64,
    orphans_pending: AtomicU64,
    orphans_remaining: AtomicU64,
    orphans_disposed_total: AtomicU64,
    keys_swept_total: AtomicU64,
    reconcile_passes_total: AtomicU64,
}

impl Metrics {
    /// Counts one SVID signed.
    pub fn svid_issued(&self, kind: SvidKind) {
        match kind {
            SvidKind::X509 => &self.x509_svids_total,
            SvidKind::Jwt => &self.jwt_svids_total,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one node attestation, done or refused. `attestor` must be a configured one (or
    /// `unknown`): peers choose what they send.
    pub fn attestation(&self, attestor: &str, refused: bool) {
        *self
            .attestations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((attestor.to_string(), refused))
            .or_default() += 1;
    }

    /// The number of keys the KeyManager holds for this server, after a key was made or
    /// disposed of.
    pub fn set_named_keys(&self, n: usize) {
        self.keys_named.store(n as u64, Ordering::Relaxed);
    }

    /// Records one reconcile pass.
    pub fn record(&self, inv: &crate::ca::KeyInventory) {
        self.keys_named.store(inv.named as u64, Ordering::Relaxed);
        self.orphans_pending
            .store(inv.pending as u64, Ordering::Relaxed);
        self.orphans_remaining
            .store(inv.remaining as u64, Ordering::Relaxed);
        self.orphans_disposed_total
            .fetch_add(inv.disposed as u64, Ordering::Relaxed);
        self.keys_swept_total
            .fetch_add(inv.swept as u64, Ordering::Relaxed);
        self.reconcile_passes_total.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self, backend: &str) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "# HELP kame_keymanager_keys Keys of this server in the KeyManager, by state.\n\
             # TYPE kame_keymanager_keys gauge\n\
             kame_keymanager_keys{{backend=\"{backend}\",state=\"named\"}} {}\n\
             kame_keymanager_keys{{backend=\"{backend}\",state=\"orphan_pending_intent\"}} {}\n\
             kame_keymanager_keys{{backend=\"{backend}\",state=\"orphan_remaining\"}} {}\n\
             # HELP kame_keymanager_orphans_disposed_total Orphaned keys disposed of.\n\
             # TYPE kame_keymanager_orphans_disposed_total counter\n\
             kame_keymanager_orphans_disposed_total{{backend=\"{backend}\"}} {}\n\
             # HELP kame_keymanager_swept_total Keys of dead servers disposed of.\n\
             # TYPE kame_keymanager_swept_total counter\n\
             kame_keymanager_swept_total{{backend=\"{backend}\"}} {}\n\
             # HELP kame_keymanager_reconcile_passes_total Reconcile passes run.\n\
             # TYPE kame_keymanager_reconcile_passes_total counter\n\
             kame_keymanager_reconcile_passes_total{{backend=\"{backend}\"}} {}\n",
            g(&self.keys_named),
            g(&self.orphans_pending),
            g(&self.orphans_remaining),
            g(&self.orphans_disposed_total),
            g(&self.keys_swept_total),
            g(&self.reconcile_passes_total),
        ) + &format!(
            "# HELP kame_svids_issued_total SVIDs signed by this server, by type.\n\
             # TYPE kame_svids_issued_total counter\n\
             kame_svids_issued_total{{type=\"x509\"}} {}\n\
             kame_svids_issued_total{{type=\"jwt\"}} {}\n",
            g(&self.x509_svids_total),
            g(&self.jwt_svids_total),
        ) + &self.render_attestations()
    }

    fn render_attestations(&self) -> String {
        let mut out = String::from(
            "# HELP kame_node_attestations_total Node attestations, by attestor and result.\n\
             # TYPE kame_node_attestations_total counter\n",
        );
        for ((attestor, refused), n) in self
            .attestations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let result = if *refused { "refused" } else { "ok" };
            out += &format!(
                "kame_node_attestations_total{{attestor=\"{attestor}\",result=\"{result}\"}} {n}\n"
            );
        }
        out
    }
}

/// `kame_build_info`: the version, as Prometheus users expect it.
pub fn build_info() -> String {
    format!(
        "# HELP kame_build_info Kame's version.\n\
         # TYPE kame_build_info gauge\n\
         kame_build_info{{version=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION")
    )
}
