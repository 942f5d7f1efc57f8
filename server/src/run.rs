//! Wiring: builds the KeyManager, datastore, CA and services from a [`Config`], serves the
//! admin API on the Unix socket (local callers are admins; directory 0770) and the agent/admin
//! API on TCP with TLS, runs the rotation loop, and shuts down cleanly on SIGINT/SIGTERM.

use crate::ca::{Ca, CaError, CaSettings};
use crate::config::Config;
use crate::datastore::DataStore;
use crate::service::{
    Context, agent::AgentService, bundle::BundleService, entry::EntryService, svid::SvidService,
};
use crate::tls::ServerSvid;
use kame_api::pb;
use kame_keymanager::KeyManager;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_stream::wrappers::UnixListenerStream;

/// Largest gRPC message accepted (bytes).
pub const MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("key manager: {0}")]
    KeyManager(#[from] kame_keymanager::Error),
    #[error("datastore: {0}")]
    Datastore(#[from] crate::datastore::DsError),
    #[error("CA: {0}")]
    Ca(#[from] CaError),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("server id file {0} is corrupt (expected a UUID)")]
    BadServerId(String),
    #[error("federation: {0}")]
    Federation(#[from] crate::federation::endpoint::EndpointError),
    #[error(transparent)]
    InUse(#[from] kame_api::serving::UdsError),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RunError + 'a {
    move |source| RunError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// How often the KeyManager is reconciled with the keys the CA names.
const RECONCILE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// This server's id, kept in `data_dir/server_id` (created on first start, 0600, atomic).
pub fn load_server_id(data_dir: &Path) -> Result<String, RunError> {
    uuid_file(&data_dir.join("server_id"))
}

/// A UUID kept in `path`: read, or created (0600, atomic) when the file does not exist.
pub(crate) fn uuid_file(path: &Path) -> Result<String, RunError> {
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let s = s.trim().to_string();
            uuid::Uuid::parse_str(&s)
                .map_err(|_| RunError::BadServerId(path.display().to_string()))?;
            Ok(s)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = uuid::Uuid::new_v4().to_string();
            kame_keymanager::fs::write_secret(path, id.as_bytes())
                .map_err(kame_keymanager::Error::from)?;
            Ok(id)
        }
        Err(e) => Err(io("cannot read", path)(e)),
    }
}

/// A running server (for tests and `run`): its context and the tasks serving it.
pub struct Running {
    pub ctx: Arc<Context>,
    pub socket_path: PathBuf,
    pub tcp_addr: std::net::SocketAddr,
    shutdown: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Held while running: a second server on this data_dir, or on this socket, is refused.
    _lock: kame_api::serving::DataDirLock,
    _socket_lock: std::fs::File,
}

impl Running {
    /// Stops serving and waits for the listeners to close.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        let _ = std::fs::remove_file(&self.socket_path);
    }
}

fn prepare_socket(path: &Path) -> Result<kame_api::serving::ClaimedSocket, RunError> {
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        // Only a directory we create is restricted to 0770: an existing one (say /tmp) is the
        // operator's and keeps its mode.
        std::fs::create_dir_all(dir).map_err(io("cannot create socket directory", dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o770))
            .map_err(io("cannot set permissions on", dir))?;
    }
    let l = kame_api::serving::claim_socket(path, "kame-server")?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o770))
        .map_err(io("cannot set permissions on", path))?;
    Ok(l)
}

/// tonic reports a request over the size limit as OutOfRange; gRPC (and grpc-go) use
/// RESOURCE_EXHAUSTED for that, which is what clients retry-classify on.
fn oversized_is_resource_exhausted<B>(
    mut resp: tonic::codegen::http::Response<B>,
) -> tonic::codegen::http::Response<B> {
    let h = resp.headers();
    let too_large = h.get("grpc-status").is_some_and(|v| v.as_bytes() == b"11")
        && h.get("grpc-message").is_some_and(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .replace("%20", " ")
                .contains("message length too large")
        });
    if too_large {
        resp.headers_mut().insert(
            "grpc-status",
            tonic::codegen::http::HeaderValue::from_static("8"),
        );
    }
    resp
}

/// The server's state, from the configuration: the KeyManager (or `key_manager`), the
/// datastore, the CA, the services' [`Context`], the server's own SVID and its TLS config.
async fn build_context(
    cfg: &Config,
    key_manager: Option<Arc<dyn KeyManager>>,
) -> Result<(Arc<Context>, Arc<ServerSvid>, Arc<rustls::ServerConfig>), RunError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    std::fs::create_dir_all(&cfg.data_dir).map_err(io("cannot create data_dir", &cfg.data_dir))?;
    let server_id = load_server_id(&cfg.data_dir)?;
    let km = match key_manager {
        Some(km) => km,
        None => {
            cfg.key_manager
                .open(crate::keymanager::OpenContext {
                    trust_domain: &cfg.trust_domain,
                    server_id: &server_id,
                })
                .await?
        }
    };
    let ds: Arc<dyn DataStore> = cfg.datastore.open().await?;
    for w in cfg.warnings() {
        tracing::warn!("{w}");
    }
    let transparency = match &cfg.transparency {
        None => None,
        Some(t) => {
            let log = crate::transparency::TransparencyLog::open(ds.clone(), km.clone(), t.clone())
                .await
                .map_err(CaError::Transparency)?;
            // Verifiers are given the log's public key: it is written next to the server's data.
            let pem = kame_api::bundle::pem_block("PUBLIC KEY", log.public_key_der());
            let key_file = cfg.data_dir.join("transparency_log_key.pem");
            std::fs::write(&key_file, pem).map_err(io("cannot write", &key_file))?;
            tracing::info!(
                log_id = %base64::Engine::encode(&base64::engine::general_purpose::STANDARD, log.log_id()),
                required = t.required,
                "issuance transparency log open"
            );
            Some(log)
        }
    };
    let ca = Ca::start(
        CaSettings {
            trust_domain: cfg.trust_domain.clone(),
            server_id: server_id.clone(),
            ca_ttl: cfg.ca_ttl,
            ca_key_type: cfg.ca_key_type,
            jwt_key_type: cfg.jwt_key_type,
            ca_subject_dn: cfg.ca_subject.to_dn_string(),
            jwt_issuer: cfg.jwt_issuer.clone(),
            signing_mode: cfg.signing_mode,
            upstream: cfg.upstream_authority.clone(),
            transparency: transparency.clone(),
        },
        km,
        ds.clone(),
    )
    .await?;
    // Plugins that verify against the server's own bundle (x509pop's spiffe mode) see it as
    // the CA holds it.
    let ca_roots = ca.clone();
    cfg.plugin_env.trust_bundle.connect(move || {
        ca_roots
            .bundle()
            .x509_authorities
            .iter()
            .map(|a| a.asn1.clone())
            .collect()
    });
    let server_spiffe_id = cfg
        .trust_domain
        .id_from_segments(&["spire", "server"])
        .map_err(|e| CaError::Profile(e.into()))?;
    let started = std::time::Instant::now();
    let entries =
        crate::entrycache::EntryCache::load(ds.clone(), server_spiffe_id.to_string()).await?;
    entries.spawn_follower(crate::entrycache::POLL_INTERVAL);
    let nodes = crate::entrycache::NodeCache::load(ds.clone()).await?;
    nodes.spawn_follower(crate::entrycache::POLL_INTERVAL);
    tracing::info!(
        entries = entries.len(),
        agents = nodes.len(),
        seconds = started.elapsed().as_secs_f64(),
        "entry and node caches loaded"
    );
    let ctx = Arc::new(Context {
        td: cfg.trust_domain.clone(),
        ca: ca.clone(),
        ds: ds.clone(),
        entries,
        nodes,
        last_good: Default::default(),
        default_x509_svid_ttl: cfg.default_x509_svid_ttl,
        default_jwt_svid_ttl: cfg.default_jwt_svid_ttl,
        agent_ttl: cfg.agent_ttl.unwrap_or(cfg.default_x509_svid_ttl),
        join_token_enabled: cfg.join_token_attestor,
        node_attestors: cfg.node_attestors.iter().cloned().collect(),
        server_spiffe_id: server_spiffe_id.clone(),
        reported: Default::default(),
        limits: crate::ratelimit::Limits::new(cfg.ratelimit),
        attest_checks: Arc::new(tokio::sync::Semaphore::new(
            crate::service::attest_check_permits(),
        )),
        federation_triggers: Default::default(),
        break_glass: cfg.break_glass.clone(),
    });
    let svid = ServerSvid::new(
        ca.clone(),
        server_spiffe_id,
        cfg.default_x509_svid_ttl,
        provider.clone(),
    );
    svid.rotate_if_needed().await?;
    let tls = Arc::new(crate::tls::server_config(
        svid.clone(),
        ca.clone(),
        provider,
    )?);

    Ok((ctx, svid, tls))
}

/// CA rotation, key reconciliation, bundle refresh and the server SVID's renewal, until
/// shutdown; a taint re-issues the server SVID at once.
async fn rotation_loop(
    ca: Arc<Ca>,
    svid: Arc<ServerSvid>,
    shutdown_rx: tokio::sync::watch::Receiver<bool>,
) {
    let interval = ca.tick_interval();
    let mut rx_rot = shutdown_rx;
    let mut t = tokio::time::interval(interval);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reconciled = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = stopped(&mut rx_rot) => break,
            // A taint here: the server's own SVID is re-issued now (SPIRE's notification).
            _ = ca.tainted() => {
                if let Err(e) = svid.rotate_if_needed().await {
                    tracing::error!(error = %e, "server SVID rotation failed");
                }
            }
            _ = t.tick() => {
                if let Err(e) = ca.rotate().await {
                    tracing::error!(error = %e, "CA rotation failed");
                }
                // Orphaned keys in the KeyManager (start-up runs the first pass).
                if reconciled.elapsed() >= RECONCILE_EVERY {
                    reconciled = tokio::time::Instant::now();
                    if let Err(e) = ca.reconcile_keys().await {
                        tracing::warn!(error = %e, "key reconcile failed");
                    }
                }
                // Taint and revocation are in the shared bundle: every server acts on them
                // (its own SVID re-issued, a revoked authority's key disposed of).
                if let Err(e) = ca.refresh_bundle().await {
                    tracing::warn!(error = %e, "bundle refresh failed");
                }
                ca.reconcile_authorities().await;
                if let Err(e) = svid.rotate_if_needed().await {
                    tracing::error!(error = %e, "server SVID rotation failed");
                }
            }
        }
    }
}

/// How long after start the upstream's view of the bundle is first asked for (SPIRE's).
const UPSTREAM_SUBSCRIBE_DELAY: Duration = Duration::from_secs(5);

/// Follows the upstream authority's view of this trust domain's bundle (SPIRE's
/// `SubscribeToLocalBundle`) into the local bundle, until shutdown. An upstream that does not
/// offer it ends this at once; a stream that fails or ends is opened again after a pause.
async fn upstream_loop(
    ca: Arc<Ca>,
    up: Arc<dyn kame_upstream::UpstreamAuthority>,
    mut shutdown_rx: tokio::sync::watch::Receiver<bool>,
) {
    use futures::StreamExt;
    tokio::select! {
        _ = stopped(&mut shutdown_rx) => return,
        _ = tokio::time::sleep(UPSTREAM_SUBSCRIBE_DELAY) => {}
    }
    let mut pause = Duration::from_secs(5);
    loop {
        let opened = tokio::select! {
            _ = stopped(&mut shutdown_rx) => return,
            r = up.subscribe_to_local_bundle() => r,
        };
        match opened {
            Err(kame_upstream::UpstreamError::Unimplemented) => return,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?pause, "cannot subscribe to the upstream's bundle")
            }
            Ok(mut updates) => loop {
                let next = tokio::select! {
                    _ = stopped(&mut shutdown_rx) => return,
                    n = updates.next() => n,
                };
                match next {
                    None => break,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "upstream bundle update failed");
                        break;
                    }
                    Some(Ok(b)) => {
                        if let Err(e) = ca.sync_upstream_bundle(&b).await {
                            // The subscription sends only changes: open it again, so this
                            // state (a taint, a revocation) is offered once more.
                            tracing::error!(error = %e, "cannot apply the upstream's bundle; subscribing again");
                            break;
                        }
                        pause = Duration::from_secs(5);
                    }
                }
            },
        }
        tokio::select! {
            _ = stopped(&mut shutdown_rx) => return,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(60));
    }
}

/// Starts everything and returns once the listeners accept connections.
pub async fn start(cfg: Config) -> Result<Running, RunError> {
    start_with(cfg, None).await
}

/// As [`start`], with `key_manager` in place of the configured one when given (tests: a
/// backend whose timing they control).
pub async fn start_with(
    cfg: Config,
    key_manager: Option<Arc<dyn KeyManager>>,
) -> Result<Running, RunError> {
    // One server per data_dir and per socket, checked before anything is opened.
    std::fs::create_dir_all(&cfg.data_dir).map_err(io("cannot create data_dir", &cfg.data_dir))?;
    let lock = kame_api::serving::lock_data_dir(&cfg.data_dir, "kame-server")?;
    let kame_api::serving::ClaimedSocket {
        listener: uds,
        lock: socket_lock,
    } = prepare_socket(&cfg.socket_path)?;
    let (ctx, svid, tls) = build_context(&cfg, key_manager).await?;
    let ca = ctx.ca.clone();
    let tcp_addr = std::net::SocketAddr::new(cfg.bind_address, cfg.bind_port);
    let tcp = TcpListener::bind(tcp_addr)
        .await
        .map_err(io("cannot listen on", Path::new(&tcp_addr.to_string())))?;
    let tcp_addr = tcp.local_addr().map_err(io(
        "cannot read address of",
        Path::new(&tcp_addr.to_string()),
    ))?;

    // Every listener is bound before anything starts: one that cannot be leaves nothing
    // running behind the error.
    let prometheus_listener = match &cfg.prometheus {
        None => None,
        Some((host, port)) => Some(
            tokio::net::TcpListener::bind((host.as_str(), *port))
                .await
                .map_err(|e| RunError::Io {
                    what: "cannot bind the Prometheus listener",
                    path: format!("{host}:{port}"),
                    source: e,
                })?,
        ),
    };
    // The bundle endpoint: its listener, and its TLS (serving certificate, ACME account).
    let endpoint_ready = match &cfg.federation.bundle_endpoint {
        None => None,
        Some(ep) => {
            let addr = std::net::SocketAddr::new(ep.address, ep.port);
            let listener = TcpListener::bind(addr).await.map_err(|e| RunError::Io {
                what: "cannot bind the bundle endpoint",
                path: addr.to_string(),
                source: e,
            })?;
            if let Some(d) = ep.deprecation {
                tracing::warn!("{d}");
            }
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let tls =
                crate::federation::endpoint::tls_config(ep, svid.clone(), provider, &cfg.data_dir)?;
            Some((listener, tls))
        }
    };
    let health_listener = match &cfg.health {
        None => None,
        Some(h) => Some(
            tokio::net::TcpListener::bind((h.bind_address.as_str(), h.bind_port))
                .await
                .map_err(|e| RunError::Io {
                    what: "cannot bind the health check listener",
                    path: format!("{}:{}", h.bind_address, h.bind_port),
                    source: e,
                })?,
        ),
    };

    let transparency_listener = match cfg.transparency.as_ref().and_then(|t| t.listen.as_ref()) {
        None => None,
        Some((address, port)) => Some(
            tokio::net::TcpListener::bind((address.as_str(), *port))
                .await
                .map_err(|e| RunError::Io {
                    what: "cannot bind the transparency log listener",
                    path: format!("{address}:{port}"),
                    source: e,
                })?,
        ),
    };

    let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
    let mut tasks = vec![];
    if let Some(log) = ctx.ca.settings().transparency.clone() {
        tasks.push(tokio::spawn(log.clone().run(shutdown_rx.clone())));
        if let Some(listener) = transparency_listener {
            let ca = ctx.ca.clone();
            let roots: crate::transparency::http::Roots = Arc::new(move || {
                ca.bundle()
                    .x509_authorities
                    .iter()
                    .map(|a| a.asn1.clone())
                    .collect()
            });
            tasks.push(tokio::spawn(crate::transparency::http::serve(
                listener,
                log,
                roots,
                shutdown_rx.clone(),
            )));
        }
    }

    let ctx_r = ctx.clone();
    let rpc_metrics = Arc::new(crate::metrics::rpc::RpcMetrics::default());
    // Per-call metrics only when they are served.
    let rpc_m = cfg.prometheus.is_some().then(|| rpc_metrics.clone());
    let audit = cfg.audit_log_enabled;
    let router = move || {
        let ctx = &ctx_r;
        let m = MAX_MESSAGE_SIZE;
        tonic::transport::Server::builder()
            // Outermost: it sees each call's final status.
            .layer(crate::metrics::rpc::RpcMetricsLayer {
                metrics: rpc_m.clone(),
                audit,
            })
            .layer(tower::util::MapResponseLayer::new(
                oversized_is_resource_exhausted,
            ))
            .add_service(
                pb::entry::entry_server::EntryServer::new(EntryService { ctx: ctx.clone() })
                    .max_decoding_message_size(m),
            )
            .add_service(
                pb::bundle::bundle_server::BundleServer::new(BundleService { ctx: ctx.clone() })
                    .max_decoding_message_size(m),
            )
            .add_service(
                pb::svid::svid_server::SvidServer::new(SvidService { ctx: ctx.clone() })
                    .max_decoding_message_size(m),
            )
            .add_service(
                pb::agent::agent_server::AgentServer::new(AgentService { ctx: ctx.clone() })
                    .max_decoding_message_size(m),
            )
            .add_service(
                pb::localauthority::local_authority_server::LocalAuthorityServer::new(
                    crate::service::localauthority::LocalAuthorityService { ctx: ctx.clone() },
                )
                .max_decoding_message_size(m),
            )
            .add_service(
                pb::trustdomain::trust_domain_server::TrustDomainServer::new(
                    crate::service::trustdomain::TrustDomainService { ctx: ctx.clone() },
                )
                .max_decoding_message_size(m),
            )
            .add_service(
                pb::breakglass::break_glass_server::BreakGlassServer::new(
                    crate::service::breakglass::BreakGlassService { ctx: ctx.clone() },
                )
                .max_decoding_message_size(m),
            )
            .add_service(
                pb::logger::logger_server::LoggerServer::new(
                    crate::service::logger::LoggerService { ctx: ctx.clone() },
                )
                .max_decoding_message_size(m),
            )
    };

    let stop_signal = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };

    // Admin socket.
    let uds_router = router();
    let rx = shutdown_rx.clone();
    tasks.push(tokio::spawn(async move {
        if let Err(e) = uds_router
            .serve_with_incoming_shutdown(
                tokio_stream::StreamExt::map(
                    UnixListenerStream::new(uds),
                    kame_api::serving::h2fix::AuthorityFix::wrap,
                ),
                stop_signal(rx),
            )
            .await
        {
            tracing::error!(error = %e, "admin socket server failed");
        }
    }));

    // TCP with TLS. Each connection is owned by one of a few single-threaded runtimes, one per
    // core (the worker model of Envoy and other proxies): its handshake, reads, request handlers
    // and writes all run on one thread. Under one multi-threaded runtime every request spawned a
    // task that woke another worker to steal it, which cost a quarter of the server's CPU per
    // agent sync. Connections are dealt out in turn; agents hold theirs for hours, so the
    // threads share the agents evenly.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut to_workers = vec![];
    for i in 0..workers {
        let (to_worker, mut accepted) = tokio::sync::mpsc::channel::<std::net::TcpStream>(256);
        to_workers.push(to_worker);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io(
                "cannot start a runtime for",
                Path::new("the TCP listener"),
            ))?;
        let router = router.clone();
        let acceptor = acceptor.clone();
        let stop = shutdown_rx.clone();
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("kame-tcp-{i}"))
            .spawn(move || {
                rt.block_on(async move {
                    let (conn_tx, conn_rx) = tokio::sync::mpsc::channel(64);
                    // Handshakes run in their own tasks so a slow client cannot stall others.
                    tokio::spawn(async move {
                        while let Some(std_stream) = accepted.recv().await {
                            let Ok(stream) = tokio::net::TcpStream::from_std(std_stream) else {
                                continue;
                            };
                            let peer = stream.peer_addr().ok();
                            let acceptor = acceptor.clone();
                            let tx = conn_tx.clone();
                            tokio::spawn(async move {
                                match tokio::time::timeout(
                                    std::time::Duration::from_secs(10),
                                    acceptor.accept(stream),
                                )
                                .await
                                {
                                    Ok(Ok(tls)) => {
                                        let _ = tx
                                            .send(Ok::<_, std::io::Error>(crate::tls::Coalesced(
                                                tls,
                                            )))
                                            .await;
                                    }
                                    Ok(Err(e)) => {
                                        tracing::debug!(?peer, error = %e, "TLS handshake failed")
                                    }
                                    Err(_) => tracing::debug!(?peer, "TLS handshake timed out"),
                                }
                            });
                        }
                    });
                    if let Err(e) = router()
                        .serve_with_incoming_shutdown(
                            tokio_stream::wrappers::ReceiverStream::new(conn_rx),
                            stop_signal(stop),
                        )
                        .await
                    {
                        tracing::error!(error = %e, "TCP server failed");
                    }
                });
                let _ = done.send(());
            })
            .map_err(io(
                "cannot start a thread for",
                Path::new("the TCP listener"),
            ))?;
        tasks.push(tokio::spawn(async move {
            let _ = finished.await;
        }));
    }
    let mut rx_accept = shutdown_rx.clone();
    tasks.push(tokio::spawn(async move {
        let mut next = 0usize;
        loop {
            tokio::select! {
                _ = stopped(&mut rx_accept) => break,
                r = tcp.accept() => {
                    let Ok((stream, _)) = r else { continue };
                    // Small gRPC frames must not wait for delayed ACKs (Nagle).
                    let _ = stream.set_nodelay(true);
                    // Handed over as a plain socket: the worker registers it with its own
                    // reactor, so its readiness never wakes this thread.
                    let Ok(std_stream) = stream.into_std() else { continue };
                    let i = next % to_workers.len();
                    next = next.wrapping_add(1);
                    if to_workers[i].send(std_stream).await.is_err() {
                        // Its thread ended (a bug, or shutdown under way): the connection is
                        // dropped and the peer reconnects.
                        tracing::error!(worker = i, "a TCP worker thread is gone; connection dropped");
                    }
                }
            }
        }
    }));

    // Federation: the bundle endpoint, and the federated trust domains' bundles.
    let federation_metrics = Arc::new(crate::federation::refresher::FederationMetrics::default());
    if let (Some(ep), Some((listener, tls))) = (&cfg.federation.bundle_endpoint, endpoint_ready) {
        use crate::federation::endpoint;
        let addr = std::net::SocketAddr::new(ep.address, ep.port);
        let ca_l = ca.clone();
        let source = Arc::new(endpoint::BundleSource::new(
            cfg.trust_domain.clone(),
            ctx.ds.clone(),
            ep.refresh_hint,
            Arc::new(move || ca_l.bundle().sequence_number),
        ));
        tasks.push(tokio::spawn(endpoint::serve(
            listener,
            tls.main,
            tls.validation,
            source,
            shutdown_rx.clone(),
        )));
        if let Some(a) = tls.acme {
            tasks.push(tokio::spawn(a.run(shutdown_rx.clone())));
        }
        if let (
            Some(f),
            crate::federation::EndpointProfile::HttpsWebFiles {
                file_sync_interval, ..
            },
        ) = (tls.file, &ep.profile)
        {
            let (every, mut stop) = (*file_sync_interval, shutdown_rx.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stopped(&mut stop) => return,
                        _ = tokio::time::sleep(every) => f.reload(),
                    }
                }
            }));
        }
        tracing::info!(address = %addr, "bundle endpoint serving");
    }
    // The federated trust domains: configured, and made through the TrustDomain API.
    tasks.push(tokio::spawn(crate::federation::refresher::manage(
        crate::federation::refresher::Refresher::new(ctx.ds.clone(), federation_metrics.clone()),
        cfg.federation.federates_with.clone(),
        cfg.trust_domain.clone(),
        ctx.federation_triggers.clone(),
        shutdown_rx.clone(),
    )));

    // Prometheus metrics (`telemetry { Prometheus { host port } }`).
    if let Some(listener) = prometheus_listener {
        let ca_m = ca.clone();
        let ctx_m = ctx.clone();
        let fed_m = federation_metrics.clone();
        tasks.push(tokio::spawn(kame_api::serving::prometheus::serve(
            listener,
            Arc::new(move || {
                ca_m.render_metrics()
                    + &ctx_m.limits.render()
                    + &fed_m.render()
                    + &rpc_metrics.render()
                    + &format!(
                        "# HELP kame_entry_cache_entries Registration entries held in memory.\n\
                         # TYPE kame_entry_cache_entries gauge\n\
                         kame_entry_cache_entries {}\n\
                         # HELP kame_entry_cache_agents Attested agents held in memory.\n\
                         # TYPE kame_entry_cache_agents gauge\n\
                         kame_entry_cache_agents {}\n",
                        ctx_m.entries.len(),
                        ctx_m.nodes.len()
                    )
                    + &crate::metrics::build_info()
            }),
            shutdown_rx.clone(),
        )));
    }

    // SPIRE's health checks: live while this process serves, ready while the CA's active
    // X.509 authority is unexpired.
    if let (Some(h), Some(listener)) = (&cfg.health, health_listener) {
        let addr = format!("{}:{}", h.bind_address, h.bind_port);
        let ca_h = ca.clone();
        let ready: kame_api::serving::health::Check = Arc::new(move || {
            let now = crate::ca::now_secs();
            let until = ca_h.current_x509().map(|a| a.not_after).unwrap_or(0);
            (
                until > now,
                serde_json::json!({"ca": {"x509_authority_expires_at": until}}),
            )
        });
        tasks.push(tokio::spawn(kame_api::serving::health::serve(
            listener,
            h.clone(),
            Arc::new(|| (true, serde_json::json!({}))),
            ready,
            shutdown_rx.clone(),
        )));
        tracing::info!(address = %addr, "serving health checks");
    }

    if let Some(up) = ca.settings().upstream.clone() {
        tasks.push(tokio::spawn(upstream_loop(
            ca.clone(),
            up,
            shutdown_rx.clone(),
        )));
    }
    tasks.push(tokio::spawn(rotation_loop(ca, svid, shutdown_rx.clone())));

    tracing::info!(
        trust_domain = %cfg.trust_domain,
        socket_path = %cfg.socket_path.display(),
        address = %tcp_addr,
        "kame-server started"
    );
    Ok(Running {
        ctx,
        socket_path: cfg.socket_path.clone(),
        tcp_addr,
        shutdown,
        tasks,
        _lock: lock,
        _socket_lock: socket_lock,
    })
}

pub(crate) async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// Runs until SIGINT or SIGTERM.
pub async fn run(cfg: Config) -> Result<(), RunError> {
    let running = start(cfg).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io("cannot install signal handler", Path::new("SIGTERM")))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    running.stop().await;
    Ok(())
}
