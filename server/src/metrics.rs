//! Metrics in the Prometheus text format, served on `telemetry { Prometheus { host port } }`
//! at `GET /metrics`: the KeyManager key inventory from the last reconcile pass (keys the CA
//! names, orphans kept for a pending intent or left over, orphans disposed of and dead servers'
//! keys swept since start-up), and the rate limits' counters ([`crate::ratelimit`]). Plain
//! counters and gauges; it must not expose key material, identities or addresses.

use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
            let mut buf = vec![0u8; 4096];
            let mut got = 0;
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while got < buf.len() {
                    match s.read(&mut buf[got..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got += n,
                    }
                    if buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..got]);
            let line = head.lines().next().unwrap_or_default();
            let resp = if line.starts_with("GET /metrics ") {
                let body = render();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()
            };
            let _ = s.write_all(resp.as_bytes()).await;
        });
    }
}
