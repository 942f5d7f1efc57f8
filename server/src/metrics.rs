//! Metrics in the Prometheus text format, served on `telemetry { Prometheus { host port } }`
//! at `GET /metrics`: the KeyManager key inventory from the last reconcile pass (keys the CA
//! names, orphans kept for a pending intent or left over, orphans disposed of and dead servers'
//! keys swept since start-up), and the rate limits' counters ([`crate::ratelimit`]). Plain
//! counters and gauges; it must not expose key material, identities or addresses.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Metrics {
    keys_named: AtomicU64,
    orphans_pending: AtomicU64,
    orphans_remaining: AtomicU64,
    orphans_disposed_total: AtomicU64,
    keys_swept_total: AtomicU64,
    reconcile_passes_total: AtomicU64,
}

impl Metrics {
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
        )
    }
}

/// Answers `GET /metrics` on `listener` until `shutdown` says stop (one request per
/// connection; anything else is 404).
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: std::sync::Arc<dyn Fn() -> String + Send + Sync>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let conn = tokio::select! {
            _ = shutdown.changed() => return,
            c = listener.accept() => c,
        };
        let Ok((mut s, _)) = conn else { continue };
        let render = render.clone();
        tokio::spawn(async move {
            match kame_api::serving::httpmini::request_line(
                &mut s,
                std::time::Duration::from_secs(5),
            )
            .await
            {
                Some((m, p)) if m == "GET" && p == "/metrics" => {
                    let body = render();
                    kame_api::serving::httpmini::respond(
                        &mut s,
                        "200 OK",
                        "text/plain; version=0.0.4",
                        body.as_bytes(),
                        "",
                    )
                    .await
                }
                Some(_) => {
                    kame_api::serving::httpmini::respond(
                        &mut s,
                        "404 Not Found",
                        "text/plain",
                        b"",
                        "",
                    )
                    .await
                }
                None => {}
            }
        });
    }
}
