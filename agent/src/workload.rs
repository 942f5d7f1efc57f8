//! The SPIFFE Workload API on a Unix socket, from our own copy of the SPIFFE proto (no package;
//! `/SpiffeWorkloadAPI/<Method>`). Every call must carry `workload.spiffe.io: true`
//! (InvalidArgument otherwise); the caller is identified from the socket's SO_PEERCRED by the
//! unix workload attestor, and gets only what its entries entitle it to (PermissionDenied when
//! none match). Streams send the full state, the first message at once, then a message at every
//! change. The three watch streams (FetchX509SVID, FetchX509Bundles, FetchJWTBundles) are
//! served by [`WorkloadService`] itself, so that every stream sends the one encoded frame its
//! selector set shares; the other methods by the generated server. It never talks to the
//! server itself: the manager does.

use crate::attestor::{Peer, UnixAttestor};
use crate::manager::{Manager, WorkloadView, entry_spiffe_id, now_secs};
use bytes::Bytes;
use futures::Stream;
use kame_api::pb::types;
use kame_api::pb::workload as wl;
use kame_api::pb::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::server::NamedService;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};

/// A Workload API connection with what the kernel said about its peer when it was accepted.
#[derive(Debug)]
pub struct WorkloadConn {
    inner: kame_api::serving::h2fix::AuthorityFix<UnixStream>,
    info: ConnInfo,
}

#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: Option<Peer>,
}

impl WorkloadConn {
    pub fn new(inner: UnixStream) -> Self {
        let accepted_at = crate::attestor::uptime();
        let peer = inner.peer_cred().ok().and_then(|c| {
            let pid = c.pid()?;
            Some(Peer {
                pid,
                uid: c.uid(),
                gid: c.gid(),
                accepted_at,
                exe: crate::attestor::exe_id(std::path::Path::new("/proc"), pid),
            })
        });
        WorkloadConn {
            inner: kame_api::serving::h2fix::AuthorityFix::new(inner),
            info: ConnInfo { peer },
        }
    }
}

impl Connected for WorkloadConn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info
    }
}

impl AsyncRead for WorkloadConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for WorkloadConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The Workload API service.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    manager: Arc<Manager>,
    attestor: Arc<UnixAttestor>,
    /// Permits for attestations in progress ([`crate::attestor::CONCURRENT`]).
    attesting: Arc<tokio::sync::Semaphore>,
    x509: Arc<Fanout<wl::X509svidResponse>>,
    x509_bundles: Arc<Fanout<wl::X509BundlesResponse>>,
    jwt_bundles: Arc<Fanout<wl::JwtBundlesResponse>>,
}

/// How a stream's message is made from what the caller's selectors match: `Ok(None)` while
/// there is nothing to send yet, an error to end the stream.
type Make<T> = fn(&WorkloadView) -> Result<Option<T>, Status>;

/// The messages of one stream kind, made and encoded once per change of the agent's state for
/// every stream whose caller has the same selectors: streams hand HTTP/2 the shared encoded
/// frame (a reference-counted pointer), not a copy, and thousands of watchers of one identity
/// cost one message to make and encode.
pub(crate) struct Fanout<T> {
    make: Make<T>,
    /// Whether what it serves delivers X509-SVIDs (reserves served under break-glass are
    /// recorded on the way).
    delivers: bool,
    slots: std::sync::Mutex<HashMap<SelectorKey, std::sync::Weak<Slot>>>,
}

impl<T> std::fmt::Debug for Fanout<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fanout")
    }
}

/// A selector set as a map key: its (type, value) pairs, sorted.
type SelectorKey = Vec<(String, String)>;

/// What the streams of one selector set share.
struct Slot {
    selectors: Vec<types::Selector>,
    delivers: bool,
    made: std::sync::Mutex<Option<Made>>,
}

#[derive(Clone)]
struct Made {
    /// The manager's state version it was made from.
    version: u64,
    /// Made again from this second on (the earliest expiry of the SVIDs it was made from).
    until: u64,
    /// The message as one gRPC frame (flag, length, protobuf).
    msg: Result<Option<Bytes>, Status>,
    /// The message the frame encodes, to compare the next one with: equal content keeps the
    /// same frame (its encoding alone may differ, as protobuf maps have no fixed order).
    decoded: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

impl<T> Fanout<T> {
    fn new(make: Make<T>) -> Arc<Self> {
        Arc::new(Fanout {
            make,
            delivers: false,
            slots: Default::default(),
        })
    }

    /// A fanout whose messages deliver X509-SVIDs.
    fn delivering(make: Make<T>) -> Arc<Self> {
        Arc::new(Fanout {
            make,
            delivers: true,
            slots: Default::default(),
        })
    }

    /// The slot of `selectors`, shared with every live stream that has the same ones.
    fn slot(&self, selectors: Vec<types::Selector>) -> Arc<Slot> {
        let mut key = selectors
            .iter()
            .map(|s| (s.r#type.clone(), s.value.clone()))
            .collect::<Vec<_>>();
        key.sort();
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slots.get(&key).and_then(std::sync::Weak::upgrade) {
            return s;
        }
        // Slots nobody watches any more go when a new one comes.
        slots.retain(|_, w| w.strong_count() > 0);
        let s = Arc::new(Slot {
            selectors,
            delivers: self.delivers,
            made: std::sync::Mutex::new(None),
        });
        slots.insert(key, Arc::downgrade(&s));
        s
    }
}

/// `m` as one uncompressed gRPC message frame: a zero flag byte, its length (4 bytes, big
/// endian), then its protobuf encoding.
fn grpc_frame<T: prost::Message>(m: &T) -> Result<Bytes, Status> {
    let len = m.encoded_len();
    let prefix = u32::try_from(len)
        .map_err(|_| Status::internal(format!("a {len}-byte message does not fit a gRPC frame")))?;
    let mut buf = Vec::with_capacity(5 + len);
    buf.push(0);
    buf.extend_from_slice(&prefix.to_be_bytes());
    m.encode(&mut buf)
        .map_err(|e| Status::internal(format!("cannot encode the message: {e}")))?;
    Ok(Bytes::from(buf))
}

impl Slot {
    /// The frame for the manager's state `version`, made by the first stream to ask.
    fn current<T>(&self, manager: &Manager, version: u64, make: Make<T>) -> Made
    where
        T: prost::Message + PartialEq + Send + Sync + 'static,
    {
        let now = now_secs();
        let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = made.as_ref()
            && m.version == version
            && now < m.until
        {
            return m.clone();
        }
        let view = if self.delivers {
            manager.view_delivering(&self.selectors)
        } else {
            manager.view(&self.selectors)
        };
        // The next SVID to expire changes the message; one already expired does not again.
        let until = view
            .identities
            .iter()
            .map(|i| i.svid.not_after)
            .filter(|t| *t > now)
            .min()
            .unwrap_or(u64::MAX);
        let (msg, decoded) = match make(&view) {
            Ok(Some(m)) => {
                // The same content keeps the same frame: streams compare pointers only.
                let same = made.as_ref().and_then(|p| match (&p.msg, &p.decoded) {
                    (Ok(Some(frame)), Some(d)) if d.downcast_ref::<T>() == Some(&m) => {
                        Some((frame.clone(), d.clone()))
                    }
                    _ => None,
                });
                match same {
                    Some((frame, d)) => (Ok(Some(frame)), Some(d)),
                    None => match grpc_frame(&m) {
                        Ok(frame) => {
                            let d: Arc<dyn std::any::Any + Send + Sync> = Arc::new(m);
                            (Ok(Some(frame)), Some(d))
                        }
                        Err(e) => (Err(e), None),
                    },
                }
            }
            Ok(None) => (Ok(None), None),
            Err(e) => (Err(e), None),
        };
        let m = Made {
            version,
            until,
            msg,
            decoded,
        };
        *made = Some(m.clone());
        m
    }
}

/// One stream's state: its slot, the manager's change signal, and the frame it sent last
/// (held, so that its address cannot be reused by a later frame).
struct Watcher<T> {
    slot: Arc<Slot>,
    manager: Arc<Manager>,
    make: Make<T>,
    changes: tokio::sync::watch::Receiver<u64>,
    last: Option<Bytes>,
    ended: bool,
}

/// A watch stream's frames; an error ends it.
type FrameStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send + 'static>>;

/// A gRPC response body of a stream's frames, ended by the status trailers: what tonic's
/// encoder would send, without a per-stream encode buffer (each frame is the shared one).
struct FrameBody {
    frames: Option<FrameStream>,
}

impl http_body::Body for FrameBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let Some(frames) = self.frames.as_mut() else {
            return Poll::Ready(None);
        };
        let end = match frames.as_mut().poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                return Poll::Ready(Some(Ok(http_body::Frame::data(frame))));
            }
            Poll::Ready(Some(Err(status))) => status,
            Poll::Ready(None) => Status::ok(""),
        };
        self.frames = None;
        let mut trailers = http::HeaderMap::new();
        Poll::Ready(Some(
            end.add_header(&mut trailers)
                .map(|()| http_body::Frame::trailers(trailers)),
        ))
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_none()
    }
}

/// The largest request message a watch stream reads (its requests are empty).
const MAX_WATCH_REQUEST: usize = 16 * 1024;

const FETCH_X509_SVID: &str = "/SpiffeWorkloadAPI/FetchX509SVID";
const FETCH_X509_BUNDLES: &str = "/SpiffeWorkloadAPI/FetchX509Bundles";
const FETCH_JWT_BUNDLES: &str = "/SpiffeWorkloadAPI/FetchJWTBundles";

type ServiceFuture = Pin<
    Box<
        dyn std::future::Future<
                Output = Result<http::Response<tonic::body::Body>, std::convert::Infallible>,
            > + Send,
    >,
>;

/// The caller's credentials, taken by [`WorkloadConn`] when the connection was accepted.
fn peer_of(ext: &http::Extensions) -> Result<Peer, Status> {
    ext.get::<ConnInfo>()
        .and_then(|c| c.peer)
        .ok_or_else(|| Status::permission_denied("caller credentials are not available"))
}

/// What a watch call's headers decide: the security header, no request compression, and the
/// caller's credentials.
fn watch_call_checks(req: &http::Request<tonic::body::Body>) -> Result<Peer, Status> {
    match req.headers().get("workload.spiffe.io") {
        Some(v) if v.as_bytes() == b"true" => {}
        _ => {
            return Err(Status::invalid_argument(
                "security header missing from request",
            ));
        }
    }
    if let Some(enc) = req.headers().get("grpc-encoding")
        && enc.as_bytes() != b"identity"
    {
        let mut status = Status::unimplemented(format!(
            "request compression {} is not supported",
            String::from_utf8_lossy(enc.as_bytes())
        ));
        status.metadata_mut().insert(
            "grpc-accept-encoding",
            tonic::metadata::MetadataValue::from_static("identity"),
        );
        return Err(status);
    }
    peer_of(req.extensions())
}

/// Reads a server-streaming call's one request message (at most [`MAX_WATCH_REQUEST`] bytes)
/// and its end.
async fn read_request<Req>(body: tonic::body::Body) -> Result<Req, Status>
where
    Req: prost::Message + Default + Send + 'static,
{
    use tonic::codec::Codec;
    let mut messages = tonic::codec::Streaming::new_request(
        kame_api::codec::LeanCodec::<Req, Req>::default().decoder(),
        body,
        None,
        Some(MAX_WATCH_REQUEST),
    );
    let message = messages
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("the request has no message"))?;
    messages.trailers().await?;
    Ok(message)
}

/// The Workload API as served: the three watch streams ([`WorkloadApi::serve_watch`]) here,
/// every other method by the generated server.
#[derive(Debug, Clone)]
pub struct WorkloadService {
    api: WorkloadApi,
    generated: SpiffeWorkloadApiServer<WorkloadApi>,
}

impl NamedService for WorkloadService {
    const NAME: &'static str = <SpiffeWorkloadApiServer<WorkloadApi> as NamedService>::NAME;
}

impl tower::Service<http::Request<tonic::body::Body>> for WorkloadService {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = ServiceFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let api = self.api.clone();
        match req.uri().path() {
            FETCH_X509_SVID => api.serve_watch::<wl::X509svidRequest, _>(req, |a| &a.x509),
            FETCH_X509_BUNDLES => {
                api.serve_watch::<wl::X509BundlesRequest, _>(req, |a| &a.x509_bundles)
            }
            FETCH_JWT_BUNDLES => {
                api.serve_watch::<wl::JwtBundlesRequest, _>(req, |a| &a.jwt_bundles)
            }
            _ => self.generated.call(req),
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn require_header<T>(req: &Request<T>) -> Result<(), Status> {
    match req.metadata().get("workload.spiffe.io") {
        Some(v) if v.as_bytes() == b"true" => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

fn concat(ders: &[Vec<u8>]) -> Vec<u8> {
    ders.concat()
}

fn td_key(td: &str) -> String {
    format!("spiffe://{td}")
}

fn x509_response(v: &WorkloadView) -> wl::X509svidResponse {
    let bundle = v
        .bundle
        .as_ref()
        .map(|b| concat(&crate::manager::bundle_roots(b)))
        .unwrap_or_default();
    wl::X509svidResponse {
        svids: v
            .identities
            .iter()
            .map(|i| wl::X509svid {
                spiffe_id: entry_spiffe_id(&i.entry),
                x509_svid: concat(&i.svid.chain),
                x509_svid_key: i.svid.key_pkcs8.to_vec(),
                bundle: bundle.clone(),
                hint: i.entry.hint.clone(),
            })
            .collect(),
        crl: vec![],
        federated_bundles: v
            .federated
            .iter()
            .map(|(td, b)| (td_key(td), concat(&crate::manager::bundle_roots(b))))
            .collect(),
    }
}

fn x509_bundles_response(v: &WorkloadView) -> wl::X509BundlesResponse {
    let mut bundles: HashMap<String, Vec<u8>> = v
        .federated
        .iter()
        .map(|(td, b)| (td_key(td), concat(&crate::manager::bundle_roots(b))))
        .collect();
    if let Some(b) = &v.bundle {
        bundles.insert(
            td_key(&b.trust_domain),
            concat(&crate::manager::bundle_roots(b)),
        );
    }
    wl::X509BundlesResponse {
        crl: vec![],
        bundles,
    }
}

fn jwt_bundles_response(v: &WorkloadView) -> Result<wl::JwtBundlesResponse, Status> {
    let jwks = |b: &types::Bundle| {
        kame_api::bundle::jwt_jwks(b).map_err(|e| Status::internal(format!("bundle: {e}")))
    };
    let mut bundles = HashMap::new();
    for (td, b) in &v.federated {
        bundles.insert(td_key(td), jwks(b)?);
    }
    if let Some(b) = &v.bundle {
        bundles.insert(td_key(&b.trust_domain), jwks(b)?);
    }
    Ok(wl::JwtBundlesResponse { bundles })
}

fn json_to_prost(v: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_prost).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(prost_types::Struct {
            fields: o
                .iter()
                .map(|(k, v)| (k.clone(), json_to_prost(v)))
                .collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

impl WorkloadApi {
    pub fn new(manager: Arc<Manager>, attestor: UnixAttestor) -> Self {
        WorkloadApi {
            manager,
            attestor: Arc::new(attestor),
            attesting: Arc::new(tokio::sync::Semaphore::new(crate::attestor::CONCURRENT)),
            x509: Fanout::delivering(|v| {
                if v.matched == 0 {
                    return Err(no_identity());
                }
                let now = now_secs();
                let mut v = v.clone();
                v.identities.retain(|i| i.svid.not_after > now);
                if v.identities.is_empty() {
                    // Entries match but SVIDs are not minted yet (or all expired): wait.
                    return Ok(None);
                }
                Ok(Some(x509_response(&v)))
            }),
            x509_bundles: Fanout::new(|v| {
                if v.matched == 0 {
                    return Err(no_identity());
                }
                Ok(v.bundle.as_ref().map(|_| x509_bundles_response(v)))
            }),
            jwt_bundles: Fanout::new(|v| {
                if v.matched == 0 {
                    return Err(no_identity());
                }
                match &v.bundle {
                    None => Ok(None),
                    Some(_) => jwt_bundles_response(v).map(Some),
                }
            }),
        }
    }

    /// The agent's state (shared with the SDS service).
    pub(crate) fn manager(&self) -> &Arc<Manager> {
        &self.manager
    }

    /// The caller's selectors, from the kernel's facts about the connection.
    pub(crate) async fn selectors<T>(
        &self,
        req: &Request<T>,
    ) -> Result<Vec<types::Selector>, Status> {
        self.attest(peer_of(req.extensions())?).await
    }

    /// The selectors of `peer`: at most [`crate::attestor::CONCURRENT`] attestations run at
    /// once, on the blocking pool.
    async fn attest(&self, peer: Peer) -> Result<Vec<types::Selector>, Status> {
        let attestor = self.attestor.clone();
        let _turn = self
            .attesting
            .acquire()
            .await
            .map_err(|_| Status::unavailable("the agent is stopping"))?;
        let r = tokio::task::spawn_blocking(move || attestor.attest(&peer))
            .await
            .map_err(|e| Status::internal(format!("attestation task failed: {e}")))?;
        r.map_err(|e| {
            tracing::info!(error = %e, "workload attestation failed");
            Status::permission_denied(format!("workload attestation failed: {e}"))
        })
    }

    /// Everything [`WorkloadService`] serves itself. What the headers decide is checked before
    /// anything is awaited, and only the caller's credentials and the request body are kept:
    /// a burst of callers waiting for attestation holds little each. Then the request is read
    /// as tonic reads a server-streaming request (one message, bounded), the caller attested,
    /// and the stream's frames sent as the body; or a trailers-only error.
    fn serve_watch<Req, T>(
        self,
        req: http::Request<tonic::body::Body>,
        fan: fn(&WorkloadApi) -> &Fanout<T>,
    ) -> ServiceFuture
    where
        Req: prost::Message + Default + Send + 'static,
        T: prost::Message + PartialEq + Send + Sync + 'static,
    {
        let peer = match watch_call_checks(&req) {
            Ok(p) => p,
            Err(status) => return Box::pin(std::future::ready(Ok(status.into_http()))),
        };
        let body = req.into_body();
        Box::pin(async move {
            let opened = async {
                Box::pin(read_request::<Req>(body)).await?;
                let selectors = self.attest(peer).await?;
                if self.manager.view(&selectors).matched == 0 {
                    return Err(no_identity());
                }
                Ok(Self::watch(fan(&self), &self.manager, selectors))
            };
            Ok(match opened.await {
                Ok(frames) => {
                    let mut res = http::Response::new(tonic::body::Body::new(FrameBody {
                        frames: Some(frames),
                    }));
                    res.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/grpc"),
                    );
                    res
                }
                Err(status) => status.into_http(),
            })
        })
    }

    /// A stream that yields its fan-out's frame for `selectors` at once and again whenever it
    /// changes (an SVID's expiry is a change). No task and no buffer of its own: it waits on
    /// the manager's change signal and yields the shared frame.
    fn watch<T>(
        fan: &Fanout<T>,
        manager: &Arc<Manager>,
        selectors: Vec<types::Selector>,
    ) -> FrameStream
    where
        T: prost::Message + PartialEq + Send + Sync + 'static,
    {
        let w = Watcher {
            slot: fan.slot(selectors),
            manager: manager.clone(),
            make: fan.make,
            changes: manager.subscribe(),
            last: None,
            ended: false,
        };
        Box::pin(futures::stream::unfold(w, |mut w| async move {
            if w.ended {
                return None;
            }
            loop {
                let version = *w.changes.borrow_and_update();
                let made = w.slot.current(&w.manager, version, w.make);
                match made.msg {
                    Err(s) => {
                        w.ended = true;
                        return Some((Err(s), w));
                    }
                    Ok(Some(m)) => {
                        if w.last.as_ref().is_none_or(|l| l.as_ptr() != m.as_ptr()) {
                            w.last = Some(m.clone());
                            return Some((Ok(m), w));
                        }
                    }
                    Ok(None) => {}
                }
                let wait = match made.until {
                    u64::MAX => 3600,
                    t => t.saturating_sub(now_secs()).max(1),
                };
                tokio::select! {
                    r = w.changes.changed() => if r.is_err() { return None },
                    _ = tokio::time::sleep(std::time::Duration::from_secs(wait)) => {}
                }
            }
        }))
    }

    /// The Workload API service to mount.
    pub fn into_service(self) -> WorkloadService {
        WorkloadService {
            generated: SpiffeWorkloadApiServer::new(self.clone()),
            api: self,
        }
    }
}

/// What the generated server's watch methods answer: [`WorkloadService`] serves them.
fn served_by_service() -> Status {
    Status::internal("this method is served by the agent's WorkloadService")
}

fn no_identity() -> Status {
    Status::permission_denied("no identity issued")
}

#[tonic::async_trait]
impl wl::spiffe_workload_api_server::SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = BoxStream<wl::X509svidResponse>;
    type FetchX509BundlesStream = BoxStream<wl::X509BundlesResponse>;
    type FetchJWTBundlesStream = BoxStream<wl::JwtBundlesResponse>;
    type FetchWITSVIDStream = BoxStream<wl::WitsvidResponse>;
    type FetchWITBundlesStream = BoxStream<wl::WitBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        _req: Request<wl::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        Err(served_by_service())
    }

    async fn fetch_x509_bundles(
        &self,
        _req: Request<wl::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        Err(served_by_service())
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<wl::JwtsvidRequest>,
    ) -> Result<Response<wl::JwtsvidResponse>, Status> {
        require_header(&req)?;
        if req.get_ref().audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        let spiffe_id = req.get_ref().spiffe_id.clone();
        if !spiffe_id.is_empty() {
            kame_api::SpiffeId::parse(&spiffe_id)
                .map_err(|e| Status::invalid_argument(format!("spiffe_id: {e}")))?;
        }
        let selectors = self.selectors(&req).await?;
        let got = self
            .manager
            .fetch_jwt(
                &selectors,
                (!spiffe_id.is_empty()).then_some(spiffe_id.as_str()),
                &req.get_ref().audience,
            )
            .await?;
        Ok(Response::new(wl::JwtsvidResponse {
            svids: got
                .into_iter()
                .map(|(e, token)| wl::Jwtsvid {
                    spiffe_id: entry_spiffe_id(&e),
                    svid: token,
                    hint: e.hint.clone(),
                })
                .collect(),
        }))
    }

    async fn fetch_jwt_bundles(
        &self,
        _req: Request<wl::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(served_by_service())
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<wl::ValidateJwtsvidRequest>,
    ) -> Result<Response<wl::ValidateJwtsvidResponse>, Status> {
        require_header(&req)?;
        let r = req.get_ref();
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if r.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        // The caller must be attestable (as SPIRE, for the audit trail), but needs no entry.
        let _ = self.selectors(&req).await?;
        let bundles = self.manager.all_bundles();
        let v = kame_api::jwtsvid::validate(&r.svid, &r.audience, now_secs(), |td| {
            let b = bundles.iter().find(|b| b.trust_domain == td.to_string())?;
            Some(
                b.jwt_authorities
                    .iter()
                    .map(|k| kame_api::jwtsvid::JwtAuthority {
                        kid: k.key_id.clone(),
                        spki_der: k.public_key.clone(),
                    })
                    .collect(),
            )
        })
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // With transparency log keys configured, a token of this trust domain must also carry
        // a valid SCT from one of those logs (one minted outside the log is refused).
        let keys = self.manager.transparency_log_keys();
        if !keys.is_empty()
            && v.sub.trust_domain() == self.manager.trust_domain()
            && let Err(e) = kame_api::ct::check_jwt_sct(&r.svid, keys)
        {
            return Err(Status::invalid_argument(format!(
                "the JWT-SVID has no valid SCT from a trusted transparency log: {e}"
            )));
        }
        Ok(Response::new(wl::ValidateJwtsvidResponse {
            spiffe_id: v.sub.to_string(),
            claims: Some(prost_types::Struct {
                fields: v
                    .claims
                    .iter()
                    .map(|(k, v)| (k.clone(), json_to_prost(v)))
                    .collect(),
            }),
        }))
    }

    async fn fetch_witsvid(
        &self,
        _req: Request<wl::WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        Err(Status::unimplemented("WIT-SVIDs are not supported"))
    }

    async fn fetch_wit_bundles(
        &self,
        _req: Request<wl::WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        Err(Status::unimplemented("WIT-SVIDs are not supported"))
    }
}
