//! Starts an agent from its [`Config`]: storage, the manager and its sync loop, and the
//! Workload API on its Unix socket; [`Running::stop`] ends them and removes the socket. It makes
//! the socket's directory if missing, refuses a socket another process answers on and anything
//! at the socket path that is not a socket, and holds the `data_dir` lock while it runs.

use crate::attestation::NodeAttestor;
use crate::attestor::UnixAttestor;
use crate::config::{Config, KeyManagerConfig, NodeAttestorConfig};
use crate::manager::{Manager, ManagerConfig, ManagerError};
use crate::storage::Storage;
use crate::workload::{WorkloadApi, WorkloadConn};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    #[error(transparent)]
    Manager(#[from] ManagerError),
    #[error("no join token is configured and data_dir holds no usable agent SVID")]
    NoWayToAttest,
    #[error("cannot create {path}: {source}")]
    Dir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("socket_path: {0}")]
    Socket(#[from] kame_api::serving::UdsError),
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub struct Running {
    pub manager: Arc<Manager>,
    pub socket_path: PathBuf,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// Held while running: a second agent on this data_dir, or on this socket, is refused.
    _lock: kame_api::serving::DataDirLock,
    _socket_lock: std::fs::File,
    /// The admin socket's lock and path (removed at stop).
    admin_lock: Option<(std::fs::File, PathBuf)>,
    /// Why the agent cannot continue, once it cannot.
    fatal: watch::Receiver<Option<String>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("socket_path", &self.socket_path)
            .finish_non_exhaustive()
    }
}

fn bind_socket(path: &std::path::Path) -> Result<kame_api::serving::ClaimedSocket, RunError> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| RunError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let l = kame_api::serving::claim_socket(path, "kame-agent")?;
    // Any local process may ask who it is: the answer depends on who it is.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).map_err(|source| {
        RunError::Listen {
            path: path.display().to_string(),
            source,
        }
    })?;
    Ok(l)
}

/// Starts the agent.
pub async fn start(cfg: &Config) -> Result<Running, RunError> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|source| RunError::Dir {
        path: cfg.data_dir.display().to_string(),
        source,
    })?;
    // One agent per data_dir and per socket, checked before anything is opened.
    let lock = kame_api::serving::lock_data_dir(&cfg.data_dir, "kame-agent")?;
    let kame_api::serving::ClaimedSocket {
        listener,
        lock: socket_lock,
    } = bind_socket(&cfg.socket_path)?;
    let key_dir = match &cfg.key_manager {
        KeyManagerConfig::Memory => None,
        KeyManagerConfig::Disk { directory } => Some(directory.clone()),
    };
    let storage = Storage::new(cfg.data_dir.clone(), key_dir);
    let attestor = match &cfg.node_attestor {
        NodeAttestorConfig::JoinToken => NodeAttestor::JoinToken(cfg.join_token.clone()),
        NodeAttestorConfig::Plugin(p) => NodeAttestor::Plugin(p.clone()),
    };
    let can_attest = attestor.available();
    let manager = Manager::new(
        ManagerConfig {
            trust_domain: cfg.trust_domain.clone(),
            servers: cfg.servers.clone(),
            trust_bundle_path: cfg.trust_bundle_path.clone(),
            sync_interval: cfg.sync_interval,
            transparency_log_keys: cfg.transparency_log_keys.clone(),
            break_glass: cfg.break_glass.clone(),
        },
        storage,
        attestor,
    )?;
    if manager.agent_id().is_none() && !can_attest {
        return Err(RunError::NoWayToAttest);
    }
    // Every listener is bound before anything starts: one that cannot be leaves nothing
    // running behind the error.
    let prometheus_listener = match &cfg.prometheus {
        None => None,
        Some((host, port)) => Some(
            tokio::net::TcpListener::bind((host.as_str(), *port))
                .await
                .map_err(|source| RunError::Listen {
                    path: format!("{host}:{port}"),
                    source,
                })?,
        ),
    };
    let health_listener = match &cfg.health {
        None => None,
        Some(h) => Some(
            tokio::net::TcpListener::bind((h.bind_address.as_str(), h.bind_port))
                .await
                .map_err(|source| RunError::Listen {
                    path: format!("{}:{}", h.bind_address, h.bind_port),
                    source,
                })?,
        ),
    };
    // The admin socket: only the agent's user (0600) and root.
    let admin = match &cfg.admin_socket_path {
        None => None,
        Some(p) => {
            use std::os::unix::fs::PermissionsExt;
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir).map_err(|source| RunError::Dir {
                    path: dir.display().to_string(),
                    source,
                })?;
            }
            let claimed = kame_api::serving::claim_socket(p, "kame-agent")?;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).map_err(
                |source| RunError::Listen {
                    path: p.display().to_string(),
                    source,
                },
            )?;
            let uid = crate::admin::own_uid().map_err(|source| RunError::Listen {
                path: "/proc/self".into(),
                source,
            })?;
            Some((claimed, uid, p.clone()))
        }
    };
    let (shutdown, rx) = watch::channel(false);
    let mut tasks = vec![];
    let mut admin_lock = None;
    if let Some((claimed, uid, path)) = admin {
        let kame_api::serving::ClaimedSocket { listener, lock } = claimed;
        admin_lock = Some((lock, path));
        let svc = crate::admin::AdminService {
            manager: manager.clone(),
            uid,
        };
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener)
            .map(|r| r.map(WorkloadConn::new));
        let mut arx = rx.clone();
        tasks.push(tokio::spawn(async move {
            let r = tonic::transport::Server::builder()
                .add_service(kame_api::pb::breakglass::admin_server::AdminServer::new(
                    svc,
                ))
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = arx.changed().await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "admin socket server failed");
            }
        }));
    }
    let api = WorkloadApi::new(manager.clone(), UnixAttestor::new(cfg.unix.clone()));
    let sds = crate::sds::Sds::new(api.clone(), cfg.sds.clone());
    let incoming =
        tokio_stream::wrappers::UnixListenerStream::new(listener).map(|r| r.map(WorkloadConn::new));
    let mut srx = rx.clone();
    tasks.push(tokio::spawn(async move {
        let r = tonic::transport::Server::builder()
            .add_service(api.into_service())
            .add_service(
                envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryServiceServer::new(sds),
            )
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = srx.changed().await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "Workload API server failed");
        }
    }));
    let (fatal_tx, fatal) = watch::channel(None);
    let (m, mrx) = (manager.clone(), rx.clone());
    tasks.push(tokio::spawn(async move {
        if let Err(e) = m.run(mrx).await {
            let _ = fatal_tx.send(Some(kame_api::errors::chain(&e)));
        }
    }));
    // Prometheus metrics (`telemetry { Prometheus { host port } }`).
    if let Some(listener) = prometheus_listener {
        let m = manager.clone();
        tasks.push(tokio::spawn(kame_api::serving::prometheus::serve(
            listener,
            Arc::new(move || m.render_metrics()),
            rx.clone(),
        )));
    }
    // SPIRE's health checks: live while this process serves, ready once attested.
    if let (Some(h), Some(listener)) = (&cfg.health, health_listener) {
        let addr = format!("{}:{}", h.bind_address, h.bind_port);
        let m = manager.clone();
        let ready: kame_api::serving::health::Check = Arc::new(move || {
            let id = m.agent_id();
            (
                id.is_some(),
                serde_json::json!({"agent": {"attested": id.is_some(), "spiffe_id": id.unwrap_or_default()}}),
            )
        });
        tasks.push(tokio::spawn(kame_api::serving::health::serve(
            listener,
            h.clone(),
            Arc::new(|| (true, serde_json::json!({}))),
            ready,
            rx.clone(),
        )));
        tracing::info!(address = %addr, "serving health checks");
    }
    tracing::info!(socket_path = %cfg.socket_path.display(), "Workload API listening");
    Ok(Running {
        manager,
        socket_path: cfg.socket_path.clone(),
        shutdown,
        tasks,
        _lock: lock,
        _socket_lock: socket_lock,
        admin_lock,
        fatal,
    })
}

impl Running {
    /// Waits until the agent meets an error retrying cannot fix, and returns it (one line,
    /// with its causes). Pending forever while the agent can go on.
    pub async fn fatal(&mut self) -> String {
        match self.fatal.wait_for(|f| f.is_some()).await {
            Ok(f) => f.clone().unwrap_or_default(),
            // The sync loop ended without a fatal error: at shutdown that is expected; else it
            // died (a bug), and an agent that no longer syncs must not go on serving.
            Err(_) if *self.shutdown.borrow() => std::future::pending().await,
            Err(_) => "the sync loop ended unexpectedly".into(),
        }
    }

    /// Stops the sync loop and the Workload API, and removes the socket.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for mut t in self.tasks {
            // Open Workload API streams would hold a graceful shutdown forever: cut them.
            if tokio::time::timeout(std::time::Duration::from_secs(2), &mut t)
                .await
                .is_err()
            {
                t.abort();
            }
        }
        let _ = std::fs::remove_file(&self.socket_path);
        if let Some((_, p)) = &self.admin_lock {
            let _ = std::fs::remove_file(p);
        }
    }
}
