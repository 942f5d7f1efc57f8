//! gRPC channels from the agent to the server over TLS: the server must present an X509-SVID
//! for `spiffe://<td>/spire/server` that chains to the agent's current bundle (read at every
//! handshake, so rotations apply at once); the agent presents its own SVID once it has one.
//! It holds no state beyond what the caller passes in.

use kame_api::SpiffeId;
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
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = Arc::new(kame_api::tls::SpiffeServerVerifier::new(
        Arc::new(move || roots.read().map(|r| r.clone()).unwrap_or_default()),
        server_id.clone(),
        provider.clone(),
    ));
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
    let host = address.to_string();
    let addr = format!("{address}:{port}");
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|source| ClientError::Connect {
            addr: addr.clone(),
            source,
        })?
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(30));
    endpoint
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            let host = host.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                // The server is authenticated by its SPIFFE ID, not its DNS name.
                let name = rustls::pki_types::ServerName::try_from("kame-server")
                    .map_err(std::io::Error::other)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|source| ClientError::Connect { addr, source })
}
