//! Per-call gRPC metrics for the server's APIs (both listeners): a tower layer that counts each
//! call by service, method and status code and times it to its last byte (the status of a
//! streamed or unary success arrives in the trailers, an early failure in the headers). Labels
//! are bounded: a call the server does not serve (Unimplemented) is counted under `unknown`,
//! so a peer cannot mint series by sending made-up method names.

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

/// The layer over a gRPC router; with `None` (no Prometheus configured) it records nothing
/// and costs nothing per call.
#[derive(Clone, Debug)]
pub struct RpcMetricsLayer(pub Option<Arc<RpcMetrics>>);

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct RpcMetricsService<S> {
    inner: S,
    metrics: Option<Arc<RpcMetrics>>,
}

/// What one call records when its response ends (or is dropped unfinished: Canceled).
struct Pending {
    metrics: Arc<RpcMetrics>,
    /// Shares the request's bytes: no copy per call.
    path: Option<http::uri::PathAndQuery>,
    start: Instant,
    code: Option<i32>,
}

impl Pending {
    fn finish(self, code: Option<i32>) {
        let code = code.or(self.code).unwrap_or(1);
        let path = self.path.as_ref().map(|p| p.path()).unwrap_or("");
        self.metrics
            .record(path, code, self.start.elapsed().as_secs_f64());
    }
}

fn grpc_status(h: &http::HeaderMap) -> Option<i32> {
    h.get("grpc-status")?.to_str().ok()?.parse().ok()
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
        let pending = self.metrics.clone().map(|metrics| Pending {
            metrics,
            path: req.uri().path_and_query().cloned(),
            start: Instant::now(),
            code: None,
        });
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            let (parts, body) = resp.into_parts();
            let pending = pending.map(|p| Pending {
                code: grpc_status(&parts.headers),
                ..p
            });
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
                if let Some(code) = frame.trailers_ref().and_then(grpc_status)
                    && let Some(p) = self.pending.take()
                {
                    p.finish(Some(code));
                }
            }
            Poll::Ready(None) => {
                if let Some(p) = self.pending.take() {
                    p.finish(None);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(p) = self.pending.take() {
                    p.finish(Some(13));
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

impl<B> Drop for CountedBody<B> {
    fn drop(&mut self) {
        // A response dropped before its end: the peer went away (Canceled) unless the headers
        // already carried the status.
        if let Some(p) = self.pending.take() {
            p.finish(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
