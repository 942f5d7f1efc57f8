//! SPIRE's `health_checks` listener: `GET <live_path>` and `GET <ready_path>` over plain HTTP
//! answer 200 with the daemon's JSON details when it is live (ready) and 500 when it is not;
//! other paths are 404, other methods 405. Bounded as every unauthenticated endpoint is: at
//! most [`MAX_CONNECTIONS`] at once, the request head within [`REQUEST_TIME`]. It reports what
//! the daemon's checks say and decides nothing itself.

use super::httpmini::{request_line, respond};
use crate::conf::{ConfigError, Section, invalid};
use std::sync::Arc;
use std::time::Duration;

/// Connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a peer has to send its request head.
pub const REQUEST_TIME: Duration = Duration::from_secs(5);

/// `health_checks { listener_enabled, bind_address, bind_port, live_path, ready_path }`
/// (SPIRE's keys and defaults: localhost, 80, /live, /ready), when the listener is enabled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    pub bind_address: String,
    pub bind_port: u16,
    pub live_path: String,
    pub ready_path: String,
}

/// Reads `health_checks` from the root section: `None` when absent or not enabled.
pub fn parse(root: &mut Section) -> Result<Option<HealthConfig>, ConfigError> {
    let Some(h) = root.section("health_checks")? else {
        return Ok(None);
    };
    let enabled = h.take_bool("listener_enabled")?.unwrap_or(false);
    let bind_address = h
        .nonempty("bind_address")?
        .map(|a| a.trim_matches(['[', ']']).to_string())
        .unwrap_or_else(|| "localhost".into());
    let bind_port = match h.int("bind_port")? {
        None => 80,
        Some(p) => u16::try_from(p)
            .map_err(|_| invalid(&h.key("bind_port"), format!("{p} is not a port number")))?,
    };
    let path = |k: &str, default: &str| -> Result<String, ConfigError> {
        let p = h.nonempty(k)?.unwrap_or_else(|| default.into());
        if !p.starts_with('/') {
            return Err(invalid(&h.key(k), format!("{p:?} must start with /")));
        }
        Ok(p)
    };
    let live_path = path("live_path", "/live")?;
    let ready_path = path("ready_path", "/ready")?;
    if live_path == ready_path {
        return Err(invalid(
            &h.key("ready_path"),
            "live_path and ready_path must differ",
        ));
    }
    h.finish()?;
    Ok(enabled.then_some(HealthConfig {
        bind_address,
        bind_port,
        live_path,
        ready_path,
    }))
}

/// A state check: whether the daemon is live (or ready), with details for the response body.
pub type Check = Arc<dyn Fn() -> (bool, serde_json::Value) + Send + Sync>;

/// Serves the health checks on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cfg: HealthConfig,
    live: Check,
    ready: Check,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let cfg = Arc::new(cfg);
    loop {
        let conn = tokio::select! {
            _ = shutdown.wait_for(|v| *v) => return,
            c = listener.accept() => c,
        };
        let Ok((mut s, _)) = conn else { continue };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (cfg, live, ready) = (cfg.clone(), live.clone(), ready.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let Some((method, path)) = request_line(&mut s, REQUEST_TIME).await else {
                return;
            };
            let check = if path == cfg.live_path {
                live
            } else if path == cfg.ready_path {
                ready
            } else {
                return respond(&mut s, "404 Not Found", "text/plain", b"not found\n", "").await;
            };
            if method != "GET" {
                return super::httpmini::get_only(&mut s).await;
            }
            let (ok, details) = check();
            let status = if ok {
                "200 OK"
            } else {
                "500 Internal Server Error"
            };
            let mut body = details.to_string().into_bytes();
            body.push(b'\n');
            respond(&mut s, status, "application/json", &body, "").await
        });
    }
}
