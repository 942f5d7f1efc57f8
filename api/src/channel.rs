//! gRPC channels to a server over TLS, for agents and for downstream servers: the server must
//! present an X509-SVID for `spiffe://<td>/spire/server` that chains to the caller's current
//! bundle (read at every handshake, so rotations apply at once); the caller presents its own
//! SVID once it has one. Also a channel to a Workload API socket. It holds no state beyond
//! what the caller passes in.

use crate::SpiffeId;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::sync::{Arc, RwLock};
use tonic::transport::Channel;

/// The X.509 authorities the agent trusts for its server, shared with the sync loop.
pub type SharedRoots = Arc<RwLock<Vec<Vec<u8>>>>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("TLS configuration: {0}")]
    Tls(#[source] rustls::Error),
    #[error("cannot connect to the server at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("cannot connect to {path}: {source}")]
    Unix {
        path: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// A channel to a gRPC server on the Unix socket `path`: a Workload API (its requests need
/// the `workload.spiffe.io: true` header: [`with_workload_header`]) or a server's admin API.
pub async fn unix(path: &std::path::Path) -> Result<Channel, ClientError> {
    let p2 = path.to_path_buf();
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = p2.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .map_err(|source| ClientError::Unix {
            path: path.display().to_string(),
            source,
        })
}

/// `msg` with the Workload API's security header.
pub fn with_workload_header<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    r
}

/// A channel to `address:port`, verifying the server against `roots` and presenting
/// `client` = (chain DER, PKCS#8 key) when given.
pub async fn connect(
    address: &str,
    port: u16,
    server_id: &SpiffeId,
    roots: SharedRoots,
    client: Option<(Vec<Vec<u8>>, Vec<u8>)>,
) -> Result<Channel, ClientError> {
    connect_any(&[(address.to_string(), port)], server_id, roots, client).await
}

/// How long one address may take to accept a TCP connection before the next is tried.
const ADDRESS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// A channel to the first of `targets` (each a host and port; a host may resolve to several
/// addresses) that accepts a connection and completes the TLS handshake, starting with the
/// one that answered last. Every reconnection of the channel goes through the list again, so
/// when a server dies the next connection goes to another.
pub async fn connect_any(
    targets: &[(String, u16)],
    server_id: &SpiffeId,
    roots: SharedRoots,
    client: Option<(Vec<Vec<u8>>, Vec<u8>)>,
) -> Result<Channel, ClientError> {
    connect_any_requiring_sct(targets, server_id, roots, client, vec![]).await
}

/// As [`connect_any`]; with `log_keys` (transparency log public keys, SubjectPublicKeyInfo
/// DER) not empty, the server's X509-SVID must also carry a valid SCT from one of them.
pub async fn connect_any_requiring_sct(
    targets: &[(String, u16)],
    server_id: &SpiffeId,
    roots: SharedRoots,
    client: Option<(Vec<Vec<u8>>, Vec<u8>)>,
    log_keys: Vec<Vec<u8>>,
) -> Result<Channel, ClientError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut verifier = crate::tls::SpiffeServerVerifier::new(
        Arc::new(move || roots.read().map(|r| r.clone()).unwrap_or_default()),
        server_id.clone(),
        provider.clone(),
    );
    if !log_keys.is_empty() {
        verifier = verifier.requiring_sct(Arc::new(move || log_keys.clone()));
    }
    let verifier = Arc::new(verifier);
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(ClientError::Tls)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match client {
        None => b.with_no_client_auth(),
        Some((chain, key)) => b
            .with_client_auth_cert(
                chain.into_iter().map(CertificateDer::from).collect(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
            )
            .map_err(ClientError::Tls)?,
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let targets: Arc<Vec<(String, u16)>> = Arc::new(targets.to_vec());
    let shown = targets
        .iter()
        .map(|(h, p)| format!("{h}:{p}"))
        .collect::<Vec<_>>()
        .join(", ");
    let last_good = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let endpoint = tonic::transport::Endpoint::from_shared(format!(
        "http://{}",
        targets
            .first()
            .map(|(h, p)| format!("{h}:{p}"))
            .unwrap_or_else(|| "kame-server".into())
    ))
    .map_err(|source| ClientError::Connect {
        addr: shown.clone(),
        source,
    })?
    .connect_timeout(std::time::Duration::from_secs(5))
    .timeout(std::time::Duration::from_secs(30));
    endpoint
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            let targets = targets.clone();
            let last_good = last_good.clone();
            async move { dial(&targets, &last_good, &connector).await }
        }))
        .await
        .map_err(|source| ClientError::Connect {
            addr: shown,
            source,
        })
}

/// One connection: each target in turn from the last good one, each address it resolves to.
async fn dial(
    targets: &[(String, u16)],
    last_good: &std::sync::atomic::AtomicUsize,
    connector: &tokio_rustls::TlsConnector,
) -> std::io::Result<hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>
{
    use std::sync::atomic::Ordering;
    let n = targets.len();
    let start = last_good.load(Ordering::Relaxed);
    let mut last_err = std::io::Error::other("no server address configured");
    for i in 0..n {
        let at = (start + i) % n;
        let (host, port) = &targets[at];
        let addrs = match tokio::net::lookup_host((host.as_str(), *port)).await {
            Ok(a) => a.collect::<Vec<_>>(),
            Err(e) => {
                last_err = std::io::Error::new(e.kind(), format!("{host}: {e}"));
                continue;
            }
        };
        for addr in addrs {
            let tcp =
                match tokio::time::timeout(ADDRESS_TIMEOUT, tokio::net::TcpStream::connect(addr))
                    .await
                {
                    Ok(Ok(t)) => {
                        // Small gRPC frames must not wait for delayed ACKs (Nagle).
                        let _ = t.set_nodelay(true);
                        t
                    }
                    Ok(Err(e)) => {
                        last_err = std::io::Error::new(e.kind(), format!("{addr}: {e}"));
                        continue;
                    }
                    Err(_) => {
                        last_err = std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("{addr}: no answer within {ADDRESS_TIMEOUT:?}"),
                        );
                        continue;
                    }
                };
            // The server is authenticated by its SPIFFE ID, not its DNS name.
            let name = rustls::pki_types::ServerName::try_from("kame-server")
                .map_err(std::io::Error::other)?;
            match connector.connect(name, tcp).await {
                Ok(tls) => {
                    if at != start && n > 1 {
                        tracing::info!(server = %format!("{host}:{port}"), "connected to another server");
                    }
                    last_good.store(at, Ordering::Relaxed);
                    return Ok(hyper_util::rt::TokioIo::new(tls));
                }
                Err(e) => last_err = std::io::Error::new(e.kind(), format!("{addr}: {e}")),
            }
        }
    }
    Err(last_err)
}
