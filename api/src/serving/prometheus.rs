//! SPIRE's `telemetry { Prometheus { host, port } }` and the endpoint that serves it:
//! `GET /metrics` answers the daemon's text exposition, anything else 404; at most
//! [`MAX_CONNECTIONS`] connections at once, the request head within five seconds. It renders
//! nothing itself: the daemon hands it a function.

use crate::conf::{ConfigError, Section, invalid};
use std::sync::Arc;

/// Connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 64;

/// Reads `telemetry` from the root section: the Prometheus listener's host (SPIRE's default
/// `localhost`) and port, when configured. Other sinks are SPIRE settings Kame lacks.
pub fn parse(root: &mut Section) -> Result<Option<(String, u16)>, ConfigError> {
    let Some(mut t) = root.section("telemetry")? else {
        return Ok(None);
    };
    let mut out = None;
    if let Some(p) = t.section("Prometheus")? {
        let host = p.string("host")?.unwrap_or_else(|| "localhost".into());
        let port = p
            .int("port")?
            .and_then(|n| u16::try_from(n).ok())
            .ok_or_else(|| invalid("telemetry.Prometheus.port", "a TCP port is required"))?;
        p.finish()?;
        out = Some((host, port));
    }
    t.finish()?;
    Ok(out)
}

/// Answers `GET /metrics` on `listener` with `render()` until `shutdown` says stop.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    use super::httpmini::{request_line, respond};
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let conn = tokio::select! {
            _ = shutdown.changed() => return,
            c = listener.accept() => c,
        };
        let Ok((mut s, _)) = conn else { continue };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match request_line(&mut s, std::time::Duration::from_secs(5)).await {
                Some((m, p)) if m == "GET" && p == "/metrics" => {
                    let body = render();
                    respond(
                        &mut s,
                        "200 OK",
                        "text/plain; version=0.0.4",
                        body.as_bytes(),
                        "",
                    )
                    .await
                }
                Some(_) => respond(&mut s, "404 Not Found", "text/plain", b"", "").await,
                None => {}
            }
        });
    }
}
