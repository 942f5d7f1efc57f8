//! RFC 6962's read API for the transparency log (§4.3 to §4.7), over the minimal HTTP/1.1 of
//! `kame_api::serving::httpmini`: `get-sth`, `get-sth-consistency`, `get-proof-by-hash`,
//! `get-entries` and `get-roots`, JSON with base64 fields as RFC 6962 gives them. Anyone may
//! read: connections are capped, each request's head is bounded in size and time, and
//! `get-entries` returns at most [`MAX_ENTRIES`] entries. It must not write to the log.

use super::{LogError, TransparencyLog};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use kame_api::serving::httpmini::{request_line, respond};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 32;
/// How long a client has to send its request head.
const REQUEST_TIME: Duration = Duration::from_secs(5);
/// The most entries one `get-entries` answer holds (a client asks again for the rest).
pub const MAX_ENTRIES: u64 = 256;

/// The roots `get-roots` lists: the trust domain's X.509 authorities, DER.
pub type Roots = Arc<dyn Fn() -> Vec<Vec<u8>> + Send + Sync>;

/// Serves the read API on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    log: Arc<TransparencyLog>,
    roots: Roots,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let conn = tokio::select! {
            _ = shutdown.wait_for(|v| *v) => return,
            c = listener.accept() => c,
        };
        let Ok((mut s, _)) = conn else {
            // Out of descriptors, most likely: wait instead of spinning.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let permit = tokio::select! {
            _ = shutdown.wait_for(|v| *v) => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (log, roots) = (log.clone(), roots.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let Some((method, target)) = request_line(&mut s, REQUEST_TIME).await else {
                return;
            };
            if method != "GET" {
                return kame_api::serving::httpmini::get_only(&mut s).await;
            }
            let (status, body) = match answer(&log, &roots, &target).await {
                Ok(v) => ("200 OK", v),
                Err(Refusal::NotFound) => ("404 Not Found", json!({"error": "not found"})),
                Err(Refusal::Busy) => (
                    "503 Service Unavailable",
                    json!({"error": "too many proofs at once; try again"}),
                ),
                Err(Refusal::Bad(m)) => ("400 Bad Request", json!({ "error": m })),
                Err(Refusal::Log(e)) => {
                    tracing::warn!(error = %e, "transparency log read API");
                    (
                        "503 Service Unavailable",
                        json!({"error": "the log cannot answer now"}),
                    )
                }
            };
            let mut out = body.to_string().into_bytes();
            out.push(b'\n');
            respond(&mut s, status, "application/json", &out, "").await
        });
    }
}

enum Refusal {
    NotFound,
    Busy,
    Bad(String),
    Log(LogError),
}

impl From<LogError> for Refusal {
    fn from(e: LogError) -> Self {
        match e {
            LogError::BeyondLog { .. } | LogError::NoSuchLeaf(..) | LogError::Entry(_) => {
                Refusal::Bad(e.to_string())
            }
            LogError::Busy => Refusal::Busy,
            e => Refusal::Log(e),
        }
    }
}

/// The query's parameters, percent-decoded.
fn params(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    fn hex(c: u8) -> Option<u8> {
        (c as char).to_digit(16).map(|d| d as u8)
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn get<'a>(p: &'a [(String, String)], key: &str) -> Result<&'a str, Refusal> {
    p.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .ok_or_else(|| Refusal::Bad(format!("parameter {key} is missing")))
}

/// A non-negative number below 2^63 (what the datastore numbers entries with).
fn number(p: &[(String, String)], key: &str) -> Result<u64, Refusal> {
    get(p, key)?
        .parse::<u64>()
        .ok()
        .filter(|n| *n <= i64::MAX as u64)
        .ok_or_else(|| Refusal::Bad(format!("parameter {key} is not a number below 2^63")))
}

fn b64_hashes(h: &[kame_api::ct::Hash]) -> Vec<String> {
    h.iter().map(|h| B64.encode(h)).collect()
}

async fn answer(
    log: &TransparencyLog,
    roots: &Roots,
    target: &str,
) -> Result<serde_json::Value, Refusal> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let p = params(query);
    match path {
        "/ct/v1/get-sth" => {
            let sth = log.latest_tree_head().await?;
            Ok(json!({
                "tree_size": sth.head.tree_size,
                "timestamp": sth.head.timestamp,
                "sha256_root_hash": B64.encode(sth.head.root_hash),
                "tree_head_signature": B64.encode(sth.signature_bytes().map_err(LogError::from)?),
            }))
        }
        "/ct/v1/get-sth-consistency" => {
            let (first, second) = (number(&p, "first")?, number(&p, "second")?);
            if first > second {
                return Err(Refusal::Bad("first is larger than second".into()));
            }
            let proof = log.consistency_proof(first, second).await?;
            Ok(json!({ "consistency": b64_hashes(&proof) }))
        }
        "/ct/v1/get-proof-by-hash" => {
            let hash: kame_api::ct::Hash = B64
                .decode(get(&p, "hash")?)
                .ok()
                .and_then(|h| h.try_into().ok())
                .ok_or_else(|| Refusal::Bad("hash is not a base64 SHA-256 hash".into()))?;
            let tree_size = number(&p, "tree_size")?;
            let (index, proof) = log.inclusion_proof(&hash, tree_size).await?;
            Ok(json!({ "leaf_index": index, "audit_path": b64_hashes(&proof) }))
        }
        "/ct/v1/get-entries" => {
            let (start, end) = (number(&p, "start")?, number(&p, "end")?);
            if start > end {
                return Err(Refusal::Bad("start is larger than end".into()));
            }
            let end = end.min(start.saturating_add(MAX_ENTRIES - 1));
            let rows = log.entries(start, end.saturating_add(1)).await?;
            if rows.is_empty() {
                return Err(Refusal::Bad(format!("no entries from {start}")));
            }
            Ok(json!({
                "entries": rows.iter().map(|(_, r)| json!({
                    "leaf_input": B64.encode(&r.leaf_input),
                    "extra_data": B64.encode(&r.extra),
                })).collect::<Vec<_>>()
            }))
        }
        "/ct/v1/get-roots" => Ok(json!({
            "certificates": roots().iter().map(|c| B64.encode(c)).collect::<Vec<_>>()
        })),
        _ => Err(Refusal::NotFound),
    }
}
