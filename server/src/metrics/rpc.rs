//! Per-call gRPC metrics for the server's APIs (both listeners): a tower layer that counts each
//! call by service, method and status code and times it to its last byte (the status of a
//! streamed or unary success arrives in the trailers, an early failure in the headers). Labels
//! are bounded: a call the server does not serve (Unimplemented) is counted under `unknown`,
//! so a peer cannot mint series by sending made-up method names.

use std::collections::BTreeMap;
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

#[derive(Default)]
struct Inner {
    calls: BTreeMap<(String, String, &'static str), u64>,
    times: BTreeMap<(String, String), Hist>,
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
        let code_name = usize::try_from(code)
            .ok()
            .and_then(|c| CODES.get(c))
            .copied()
            .unwrap_or("Unknown");
        let (service, method) = match path.trim_start_matches('/').split_once('/') {
            Some((s, m)) if code != 12 && !s.is_empty() && !m.is_empty() => {
                (s.to_string(), m.to_string())
            }
            _ => ("unknown".to_string(), "unknown".to_string()),
        };
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *g.calls
            .entry((service.clone(), method.clone(), code_name))
            .or_default() += 1;
        let h = g.times.entry((service, method)).or_default();
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
        let mut out = String::from(
            "# HELP kame_rpc_requests_total gRPC calls answered, by service, method and status code.\n\
             # TYPE kame_rpc_requests_total counter\n",
        );
        for ((s, m, c), n) in &g.calls {
            out += &format!(
                "kame_rpc_requests_total{{service=\"{s}\",method=\"{m}\",grpc_code=\"{c}\"}} {n}\n"
            );
        }
        out += "# HELP kame_rpc_duration_seconds Time from a call's arrival to its last byte, by service and method.\n\
                # TYPE kame_rpc_duration_seconds histogram\n";
        for ((s, m), h) in &g.times {
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

/// The layer over a gRPC router.
#[derive(Clone, Debug)]
pub struct RpcMetricsLayer(pub Arc<RpcMetrics>);

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
    metrics: Arc<RpcMetrics>,
}

/// What one call records when its response ends (or is dropped unfinished: Canceled).
struct Pending {
    metrics: Arc<RpcMetrics>,
    path: String,
    start: Instant,
    code: Option<i32>,
}

impl Pending {
    fn finish(self, code: Option<i32>) {
        let code = code.or(self.code).unwrap_or(1);
        self.metrics
            .record(&self.path, code, self.start.elapsed().as_secs_f64());
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
        let pending = Pending {
            metrics: self.metrics.clone(),
            path: req.uri().path().to_string(),
            start: Instant::now(),
            code: None,
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            let (parts, body) = resp.into_parts();
            let pending = Pending {
                code: grpc_status(&parts.headers),
                ..pending
            };
            Ok(http::Response::from_parts(
                parts,
                CountedBody {
                    inner: body,
                    pending: Some(pending),
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
