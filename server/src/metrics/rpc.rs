//! Per-call observation of the server's gRPC APIs (both listeners): a tower layer that counts
//! each call by service, method and status code and times it to its last byte (the status of a
//! streamed or unary success arrives in the trailers, an early failure in the headers; a call
//! dropped before its end, the caller gone, is Canceled), and with `audit_log_enabled` writes
//! one `kame_audit` event per call (caller, method, status), as SPIRE's audit log does. Labels
//! are bounded: a call the server does not serve (Unimplemented) is counted under `unknown`,
//! so a peer cannot mint series by sending made-up method names. It decides nothing about the
//! calls it sees.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

/// Histogram bounds in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// gRPC status codes by number, as Prometheus users know them (`grpc_code`).
const CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

#[derive(Default)]
struct Hist {
    buckets: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

/// One method's counts by status code and its time histogram.
struct PathStats {
    codes: [u64; CODES.len()],
    hist: Hist,
}

/// Calls by request path (`/package.Service/Method`, or `unknown`); looked up without
/// allocating once a path has been seen.
#[derive(Default)]
struct Inner {
    paths: std::collections::HashMap<String, PathStats>,
}

/// The counters and histograms the layer fills.
#[derive(Default)]
pub struct RpcMetrics {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for RpcMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RpcMetrics")
    }
}

impl RpcMetrics {
    fn record(&self, path: &str, code: i32, secs: f64) {
        let code = usize::try_from(code)
            .ok()
            .filter(|c| *c < CODES.len())
            .unwrap_or(2);
        // A path the server does not serve is not a label of its own.
        let well_formed = path
            .trim_start_matches('/')
            .split_once('/')
            .is_some_and(|(s, m)| !s.is_empty() && !m.is_empty() && !m.contains('/'));
        let key = if code == 12 || !well_formed {
            "unknown"
        } else {
            path
        };
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if !g.paths.contains_key(key) {
            g.paths.insert(
                key.to_string(),
                PathStats {
                    codes: [0; CODES.len()],
                    hist: Hist::default(),
                },
            );
        }
        let Some(st) = g.paths.get_mut(key) else {
            return;
        };
        st.codes[code] += 1;
        let h = &mut st.hist;
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                h.buckets[i] += 1;
            }
        }
        h.sum += secs;
        h.count += 1;
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut paths: Vec<(&String, &PathStats)> = g.paths.iter().collect();
        paths.sort_by(|a, b| a.0.cmp(b.0));
        let labels = |path: &str| -> (String, String) {
            match path.trim_start_matches('/').split_once('/') {
                Some((s, m)) => (s.to_string(), m.to_string()),
                None => ("unknown".into(), "unknown".into()),
            }
        };
        let mut out = String::from(
            "# HELP kame_rpc_requests_total gRPC calls answered, by service, method and status code.\n\
             # TYPE kame_rpc_requests_total counter\n",
        );
        for (path, st) in &paths {
            let (s, m) = labels(path);
            for (c, n) in st.codes.iter().enumerate().filter(|(_, n)| **n > 0) {
                out += &format!(
                    "kame_rpc_requests_total{{service=\"{s}\",method=\"{m}\",grpc_code=\"{}\"}} {n}\n",
                    CODES[c]
                );
            }
        }
        out += "# HELP kame_rpc_duration_seconds Time from a call's arrival to its last byte, by service and method.\n\
                # TYPE kame_rpc_duration_seconds histogram\n";
        for (path, st) in &paths {
            let (s, m) = labels(path);
            let h = &st.hist;
            for (i, b) in BUCKETS.iter().enumerate() {
                out += &format!(
                    "kame_rpc_duration_seconds_bucket{{service=\"{s}\",method=\"{m}\",le=\"{b}\"}} {}\n",
                    h.buckets[i]
                );
            }
            out += &format!(
                "kame_rpc_duration_seconds_bucket{{service=\"{s}\",method=\"{m}\",le=\"+Inf\"}} {c}\n\
                 kame_rpc_duration_seconds_sum{{service=\"{s}\",method=\"{m}\"}} {sum}\n\
                 kame_rpc_duration_seconds_count{{service=\"{s}\",method=\"{m}\"}} {c}\n",
                c = h.count,
                sum = h.sum
            );
        }
        out
    }
}

/// The layer over a gRPC router. With no metrics (no Prometheus configured) and no audit it
/// records nothing and costs nothing per call.
#[derive(Clone, Debug)]
pub struct RpcMetricsLayer {
    pub metrics: Option<Arc<RpcMetrics>>,
    /// One `kame_audit` event per call (`audit_log_enabled`).
    pub audit: bool,
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
            audit: self.audit,
        }
    }
}

#[derive(Clone, Debug)]
pub struct RpcMetricsService<S> {
    inner: S,
    metrics: Option<Arc<RpcMetrics>>,
    audit: bool,
}

/// Who made a call, as the audit log names them (SPIRE's fields).
enum AuditCaller {
    /// On the admin socket: the peer process's credentials and executable.
    Local {
        uid: String,
        gid: String,
        path: String,
    },
    /// Over TLS: the client SVID's SPIFFE ID (empty without one) and the peer address.
    Remote { id: String, addr: String },
}

struct Audit {
    request_id: String,
    caller: AuditCaller,
}

impl Audit {
    fn of<B>(req: &http::Request<B>) -> Audit {
        use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo, UdsConnectInfo};
        let ext = req.extensions();
        let caller = if let Some(u) = ext.get::<UdsConnectInfo>() {
            let cred = u.peer_cred;
            let path = cred
                .and_then(|c| c.pid())
                .and_then(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).ok())
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            AuditCaller::Local {
                uid: cred.map(|c| c.uid().to_string()).unwrap_or_default(),
                gid: cred.map(|c| c.gid().to_string()).unwrap_or_default(),
                path,
            }
        } else if let Some(t) = ext.get::<TlsConnectInfo<TcpConnectInfo>>() {
            let id = t
                .peer_certs()
                .and_then(|c| c.first().cloned())
                .and_then(|leaf| kame_api::x509svid::ParsedCert::parse(leaf.as_ref()).ok())
                .and_then(|p| kame_api::x509svid::check_leaf(&p).ok())
                .map(|id| id.to_string())
                .unwrap_or_default();
            AuditCaller::Remote {
                id,
                addr: t
                    .get_ref()
                    .remote_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
            }
        } else {
            AuditCaller::Remote {
                id: String::new(),
                addr: String::new(),
            }
        };
        Audit {
            request_id: uuid::Uuid::new_v4().to_string(),
            caller,
        }
    }

    fn log(&self, path: &str, code: usize, message: &str) {
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("", path));
        let status = if code == 0 { "success" } else { "error" };
        let status_code = CODES.get(code).copied().unwrap_or("Unknown");
        match &self.caller {
            AuditCaller::Local { uid, gid, path } => tracing::info!(
                target: "kame_audit",
                r#type = "audit",
                request_id = %self.request_id,
                service,
                method,
                status,
                status_code,
                status_message = message,
                caller_uid = %uid,
                caller_gid = %gid,
                caller_path = %path,
                "API accessed"
            ),
            AuditCaller::Remote { id, addr } => tracing::info!(
                target: "kame_audit",
                r#type = "audit",
                request_id = %self.request_id,
                service,
                method,
                status,
                status_code,
                status_message = message,
                caller_id = %id,
                caller_addr = %addr,
                "API accessed"
            ),
        }
    }
}

/// What one call records when its response ends, or when it is dropped unfinished (the
/// caller went away: Canceled unless a status was already sent).
struct Pending {
    metrics: Option<Arc<RpcMetrics>>,
    audit: Option<Box<Audit>>,
    /// Shares the request's bytes: no copy per call.
    path: Option<http::uri::PathAndQuery>,
    start: Instant,
    code: Option<i32>,
    message: Option<String>,
    done: bool,
}

impl Pending {
    fn finish(&mut self, code: Option<i32>, message: Option<String>) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let code = code.or(self.code).unwrap_or(1);
        let path = self.path.as_ref().map(|p| p.path()).unwrap_or("");
        if let Some(m) = &self.metrics {
            m.record(path, code, self.start.elapsed().as_secs_f64());
        }
        if let Some(a) = &self.audit {
            let c = usize::try_from(code).unwrap_or(2);
            let message = message.or_else(|| self.message.take()).unwrap_or_default();
            a.log(path, c, &message);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.finish(None, None);
    }
}

fn grpc_status(h: &http::HeaderMap) -> Option<i32> {
    h.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// `grpc-message`, percent-decoded as gRPC encodes it.
fn grpc_message(h: &http::HeaderMap) -> Option<String> {
    let raw = h.get("grpc-message")?.as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (raw[i], raw.get(i + 1).copied(), raw.get(i + 2).copied()) {
            (b'%', Some(a), Some(b)) if hex(a).is_some() && hex(b).is_some() => {
                out.push((hex(a).unwrap_or(0) * 16 + hex(b).unwrap_or(0)) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

impl<S, ReqB, ResB> tower::Service<http::Request<ReqB>> for RpcMetricsService<S>
where
    S: tower::Service<http::Request<ReqB>, Response = http::Response<ResB>>,
    S::Future: Send + 'static,
    ResB: http_body::Body + Unpin,
{
    type Response = http::Response<CountedBody<ResB>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqB>) -> Self::Future {
        let pending = (self.metrics.is_some() || self.audit).then(|| Pending {
            metrics: self.metrics.clone(),
            audit: self.audit.then(|| Box::new(Audit::of(&req))),
            path: req.uri().path_and_query().cloned(),
            start: Instant::now(),
            code: None,
            message: None,
            done: false,
        });
        let fut = self.inner.call(req);
        Box::pin(async move {
            // Dropped here (the caller gone before an answer): recorded as Canceled.
            let mut pending = pending;
            let resp = fut.await?;
            let (parts, body) = resp.into_parts();
            if let Some(p) = pending.as_mut() {
                p.code = grpc_status(&parts.headers);
                p.message = grpc_message(&parts.headers);
            }
            Ok(http::Response::from_parts(
                parts,
                CountedBody {
                    inner: body,
                    pending,
                },
            ))
        })
    }
}

/// A response body that records its call when it ends.
pub struct CountedBody<B> {
    inner: B,
    pending: Option<Pending>,
}

impl<B: http_body::Body + Unpin> http_body::Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = frame.trailers_ref()
                    && let Some(code) = grpc_status(t)
                    && let Some(p) = self.pending.as_mut()
                {
                    p.finish(Some(code), grpc_message(t));
                }
            }
            Poll::Ready(None) => {
                if let Some(p) = self.pending.as_mut() {
                    p.finish(None, None);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(p) = self.pending.as_mut() {
                    p.finish(Some(13), None);
                }
            }
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call whose caller leaves before any answer is counted, as Canceled.
    #[tokio::test]
    async fn rpc_metrics_count_a_call_dropped_before_its_headers_as_canceled() {
        use tower::{Layer as _, Service as _};
        let m = Arc::new(RpcMetrics::default());
        let never = tower::service_fn(|_req: http::Request<()>| {
            std::future::pending::<
                Result<http::Response<tonic::body::Body>, std::convert::Infallible>,
            >()
        });
        let mut svc = RpcMetricsLayer {
            metrics: Some(m.clone()),
            audit: false,
        }
        .layer(never);
        let req = http::Request::builder()
            .uri("/spire.api.server.agent.v1.Agent/AttestAgent")
            .body(())
            .unwrap();
        let fut = svc.call(req);
        let r = tokio::time::timeout(std::time::Duration::from_millis(20), fut).await;
        assert!(r.is_err(), "the call never answers");
        let text = m.render();
        assert!(
            text.contains(
                "kame_rpc_requests_total{service=\"spire.api.server.agent.v1.Agent\",method=\"AttestAgent\",grpc_code=\"Canceled\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn rpc_metrics_labels_are_bounded_by_what_the_server_serves() {
        let m = RpcMetrics::default();
        m.record("/spire.api.server.entry.v1.Entry/ListEntries", 0, 0.002);
        m.record("/spire.api.server.entry.v1.Entry/ListEntries", 3, 0.2);
        for i in 0..100 {
            m.record(&format!("/made.up.Service{i}/Method{i}"), 12, 0.0001);
        }
        let text = m.render();
        assert!(text.contains(
            "kame_rpc_requests_total{service=\"spire.api.server.entry.v1.Entry\",method=\"ListEntries\",grpc_code=\"OK\"} 1"
        ));
        assert!(text.contains("grpc_code=\"InvalidArgument\"} 1"));
        assert!(text.contains(
            "kame_rpc_requests_total{service=\"unknown\",method=\"unknown\",grpc_code=\"Unimplemented\"} 100"
        ));
        assert!(!text.contains("made.up"));
        assert!(text.contains(
            "kame_rpc_duration_seconds_bucket{service=\"spire.api.server.entry.v1.Entry\",method=\"ListEntries\",le=\"0.005\"} 1"
        ));
        assert!(text.contains(
            "kame_rpc_duration_seconds_count{service=\"spire.api.server.entry.v1.Entry\",method=\"ListEntries\"} 2"
        ));
    }
}
