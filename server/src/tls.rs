//! The server's own X509-SVID (`spiffe://<td>/spire/server`) for its TCP listener: a P-256 key
//! held in memory, signed by the active CA, rotated at half-life; plus the rustls configuration
//! that serves it and verifies optional client SVIDs against the live bundle.

use crate::ca::{Ca, CaError, now_secs};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
use kame_api::SpiffeId;
use kame_api::tls::{RootsFn, SpiffeClientVerifier};
use kame_api::x509svid::ParsedCert;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::sync::{Arc, RwLock};
use std::time::Duration;

#[derive(Debug)]
struct Current {
    key: Arc<CertifiedKey>,
    not_before: u64,
    not_after: u64,
    /// The authority (root SKID, lower-case hex) its chain ends under.
    authority: String,
}

/// The authority a chain (leaf first) ends under: the AKI of its last certificate, lower-case
/// hex (the root's SKID; with no AKI, empty).
pub fn chain_authority(chain: &[Vec<u8>]) -> String {
    chain
        .last()
        .and_then(|c| ParsedCert::parse(c).ok())
        .and_then(|c| c.authority_key_id().ok().flatten())
        .map(hex::encode)
        .unwrap_or_default()
}

#[derive(Debug)]
pub struct ServerSvid {
    ca: Arc<Ca>,
    id: SpiffeId,
    ttl: Duration,
    provider: Arc<rustls::crypto::CryptoProvider>,
    current: RwLock<Option<Current>>,
}

impl ServerSvid {
    pub fn new(
        ca: Arc<Ca>,
        id: SpiffeId,
        ttl: Duration,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Arc<Self> {
        Arc::new(ServerSvid {
            ca,
            id,
            ttl,
            provider,
            current: RwLock::new(None),
        })
    }

    /// Mints a new SVID if there is none, half of its life has passed, or it chains to an
    /// authority tainted in the bundle.
    pub async fn rotate_if_needed(&self) -> Result<(), CaError> {
        let now = now_secs();
        let tainted = self.ca.tainted_ids();
        let due = match &*self.current.read().unwrap_or_else(|p| p.into_inner()) {
            None => true,
            Some(c) => {
                now >= c.not_before + (c.not_after.saturating_sub(c.not_before)) / 2
                    || tainted.contains(&c.authority)
            }
        };
        if !due {
            return Ok(());
        }
        let kp = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING)
            .map_err(|_| CaError::ServerSvidKey("cannot generate it".into()))?;
        let spki = kp
            .public_key()
            .as_der()
            .map_err(|_| CaError::ServerSvidKey("cannot encode it".into()))?;
        let chain = self
            .ca
            .sign_x509_svid(spki.as_ref(), &self.id, &[], self.ttl)
            .await?;
        let leaf = ParsedCert::parse(&chain[0])?;
        let authority = chain_authority(&chain);
        let pkcs8 = kp
            .to_pkcs8v1()
            .map_err(|_| CaError::ServerSvidKey("cannot encode it".into()))?;
        let signing_key = self
            .provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                pkcs8.as_ref().to_vec(),
            )))
            .map_err(CaError::ServerSvidKeyLoad)?;
        let certs = chain.into_iter().map(CertificateDer::from).collect();
        let cur = Current {
            key: Arc::new(CertifiedKey::new(certs, signing_key)),
            not_before: leaf.not_before(),
            not_after: leaf.not_after(),
            authority,
        };
        tracing::info!(spiffe_id = %self.id, expires_at = cur.not_after, "server SVID rotated");
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(cur);
        Ok(())
    }
}

impl ResolvesServerCert for ServerSvid {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|c| c.key.clone())
    }
}

/// rustls server configuration: our SVID, optional client SVIDs of the trust domain (with
/// `transparency { require_agent_scts = true }`, only those carrying an SCT from a log of the
/// servers sharing the datastore), ALPN h2.
pub fn server_config(
    svid: Arc<ServerSvid>,
    ca: Arc<Ca>,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let log = ca
        .settings()
        .transparency
        .clone()
        .filter(|l| l.settings().require_agent_scts);
    let roots: RootsFn = Arc::new(move || {
        ca.bundle()
            .x509_authorities
            .iter()
            .map(|c| c.asn1.clone())
            .collect()
    });
    let mut verifier = SpiffeClientVerifier::new(roots, provider.clone());
    if let Some(log) = log {
        verifier = verifier.requiring_sct(Arc::new(move || log.known_keys().as_ref().clone()));
    }
    let verifier = Arc::new(verifier);
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(svid);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// A TLS connection as the gRPC server writes to it: reported as not supporting vectored
/// writes, so HTTP/2 copies payloads under 1 KiB into its buffer instead of chaining them.
/// A chained payload has to be flushed before the next frame can be encoded, which wrote every
/// small response as two TLS records and two system calls (headers and message, then the
/// trailers); copied, a whole response goes out in one. TLS copies the bytes into a record
/// anyway, so vectored writes gained nothing.
pub struct Coalesced<S>(pub S);

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Coalesced<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Coalesced<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

/// The peer's address and certificates, as tonic reads them from the TLS stream.
impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Coalesced<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.connect_info()
    }
}
