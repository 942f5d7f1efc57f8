//! The bundle endpoint (SPIFFE Federation §4, SPIRE's `bundle_endpoint`): `GET /` over HTTPS
//! answers this trust domain's bundle as SPIFFE bundle JSON with `spiffe_refresh_hint` (the
//! configured hint) and `spiffe_sequence` (the stored bundle's sequence number); other paths
//! are 404, other methods 405. TLS with the server's own X509-SVID (`https_spiffe`), or a Web
//! PKI certificate (`https_web`) from files re-read every `file_sync_interval` or from ACME
//! (`acme`; its tls-alpn-01 validation handshakes are answered on this port).
//!
//! It never serves what it cannot vouch for: only the local trust domain's bundle, read from
//! the datastore at most a second ago, or (while the datastore cannot be read) a read younger
//! than the refresh hint; a bundle without an unexpired X.509 authority, or older, is answered
//! 503. Unauthenticated peers get a bounded share: at most [`MAX_CONNECTIONS`] connections at
//! once (more are closed at once), [`REQUEST_TIME`] for the handshake and the request head,
//! whose size is capped, and `httpmini::WRITE_TIME` to take the response; no request body is
//! read.

use super::{EndpointConfig, EndpointProfile};
use crate::datastore::DataStore;
use kame_api::TrustDomain;
use kame_api::pb::types::Bundle;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Connections served at once; more are closed without a handshake.
pub const MAX_CONNECTIONS: usize = 256;

/// How long a peer has for the TLS handshake and then for its request head.
pub const REQUEST_TIME: Duration = Duration::from_secs(10);

/// How long a datastore read is served again.
const FRESH: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("bundle endpoint certificate {path}: {reason}")]
    ServingCert { path: String, reason: String },
    #[error("bundle endpoint TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// A Web PKI certificate and key from files, re-read on a timer; a bad re-read keeps the last
/// good pair and is logged.
#[derive(Debug)]
pub struct FileCert {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<rustls::crypto::CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl FileCert {
    pub fn load(
        cert: &Path,
        key: &Path,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<Arc<Self>, EndpointError> {
        let ck = Self::read(cert, key, &provider)?;
        Ok(Arc::new(FileCert {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            provider,
            current: RwLock::new(Arc::new(ck)),
        }))
    }

    fn read(
        cert: &Path,
        key: &Path,
        provider: &rustls::crypto::CryptoProvider,
    ) -> Result<CertifiedKey, EndpointError> {
        let bad = |p: &Path, reason: String| EndpointError::ServingCert {
            path: p.display().to_string(),
            reason,
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| bad(cert, e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| bad(cert, e.to_string()))?;
        if chain.is_empty() {
            return Err(bad(cert, "no certificate".into()));
        }
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, e.to_string()))?;
        let signing = provider
            .key_provider
            .load_private_key(key_der)
            .map_err(|e| bad(key, e.to_string()))?;
        let ck = CertifiedKey::new(chain, signing);
        ck.keys_match().map_err(|e| bad(key, e.to_string()))?;
        Ok(ck)
    }

    /// Reads the files again.
    pub fn reload(&self) {
        match Self::read(&self.cert, &self.key, &self.provider) {
            Ok(ck) => *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ck),
            Err(e) => {
                tracing::warn!(error = %e, "bundle endpoint certificate no longer loads; serving the last good one")
            }
        }
    }
}

impl ResolvesServerCert for FileCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

/// The sequence number of the bundle this server's CA holds now.
pub type LatestFn = Arc<dyn Fn() -> u64 + Send + Sync>;

/// What the endpoint serves, and from where.
pub struct BundleSource {
    td: TrustDomain,
    ds: Arc<dyn DataStore>,
    refresh_hint: Duration,
    /// A read is served again only while this server's CA holds nothing newer (its own
    /// rotation and taint are published at once).
    latest: LatestFn,
    last: Mutex<Option<(Bundle, Instant)>>,
}

impl std::fmt::Debug for BundleSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BundleSource")
            .field("td", &self.td)
            .field("refresh_hint", &self.refresh_hint)
            .finish_non_exhaustive()
    }
}

impl BundleSource {
    pub fn new(
        td: TrustDomain,
        ds: Arc<dyn DataStore>,
        refresh_hint: Duration,
        latest: LatestFn,
    ) -> Self {
        BundleSource {
            td,
            ds,
            refresh_hint,
            latest,
            last: Mutex::new(None),
        }
    }

    fn cached(&self, max_age: Duration) -> Option<Bundle> {
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|(_, at)| at.elapsed() < max_age)
            .map(|(b, _)| b.clone())
    }

    /// The SPIFFE bundle JSON to serve, or why not.
    pub async fn document(&self, now: u64) -> Result<Vec<u8>, String> {
        let fresh = self
            .cached(FRESH)
            .filter(|b| b.sequence_number >= (self.latest)());
        let b = match fresh {
            Some(b) => b,
            None => match self.ds.fetch_bundle(self.td.as_str()).await {
                Ok(Some(b)) => {
                    *self.last.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((b.clone(), Instant::now()));
                    b
                }
                Ok(None) => return Err("no bundle yet".into()),
                Err(e) => {
                    tracing::warn!(error = %e, "bundle endpoint: cannot read the bundle");
                    self.cached(self.refresh_hint)
                        .ok_or_else(|| "the bundle cannot be read".to_string())?
                }
            },
        };
        if b.trust_domain != self.td.as_str() {
            return Err(format!(
                "refusing to serve the bundle of {}",
                b.trust_domain
            ));
        }
        let live = b.x509_authorities.iter().any(|c| {
            kame_api::x509svid::ParsedCert::parse(&c.asn1).is_ok_and(|p| p.not_after() > now)
        });
        if !live {
            return Err("the bundle has no unexpired X.509 authority".into());
        }
        let mut out = b;
        out.refresh_hint = self.refresh_hint.as_secs() as i64;
        kame_api::bundle::to_spiffe_json(&out)
            .map(String::into_bytes)
            .map_err(|e| e.to_string())
    }
}

/// The endpoint's TLS: the configuration for HTTPS, the one for ACME validation handshakes
/// (`acme-tls/1`) when the certificate comes from ACME, and what keeps the certificate current.
pub struct EndpointTls {
    pub main: Arc<rustls::ServerConfig>,
    pub validation: Option<Arc<rustls::ServerConfig>>,
    pub file: Option<Arc<FileCert>>,
    pub acme: Option<Arc<super::acme::AcmeCert>>,
}

/// The endpoint's TLS configuration: the server SVID, the file certificate or the ACME one;
/// no client authentication, HTTP/1.1.
pub fn tls_config(
    cfg: &EndpointConfig,
    svid: Arc<crate::tls::ServerSvid>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    data_dir: &Path,
) -> Result<EndpointTls, EndpointError> {
    let b = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth();
    let (mut c, file, acme) = match &cfg.profile {
        EndpointProfile::HttpsSpiffe => (b.with_cert_resolver(svid), None, None),
        EndpointProfile::HttpsWebFiles {
            cert_file_path,
            key_file_path,
            ..
        } => {
            let f = FileCert::load(cert_file_path, key_file_path, provider)?;
            (b.with_cert_resolver(f.clone()), Some(f), None)
        }
        EndpointProfile::HttpsWebAcme(a) => {
            let a = super::acme::AcmeCert::new(a.clone(), data_dir, provider);
            (b.with_cert_resolver(a.clone()), None, Some(a))
        }
    };
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    let validation = acme
        .as_ref()
        .map(|a| a.validation_config().map(Arc::new))
        .transpose()?;
    Ok(EndpointTls {
        main: Arc::new(c),
        validation,
        file,
        acme,
    })
}

/// The TLS handshake: `acme-tls/1` handshakes get the validation configuration (or are
/// closed) and yield no stream.
async fn handshake(
    tcp: tokio::net::TcpStream,
    main: Arc<rustls::ServerConfig>,
    validation: Option<Arc<rustls::ServerConfig>>,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    let start = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
        .await
        .ok()?;
    let acme = start
        .client_hello()
        .alpn()
        .is_some_and(|mut protos| protos.any(|p| p == super::acme::ACME_TLS_ALPN));
    if acme {
        if let Some(v) = validation {
            let _ = start.into_stream(v).await;
        }
        return None;
    }
    start.into_stream(main).await.ok()
}

/// Serves `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    main: Arc<rustls::ServerConfig>,
    validation: Option<Arc<rustls::ServerConfig>>,
    source: Arc<BundleSource>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let conn = tokio::select! {
            _ = shutdown.changed() => return,
            c = listener.accept() => c,
        };
        let Ok((tcp, _)) = conn else { continue };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(tcp);
            continue;
        };
        let (main, validation, source) = (main.clone(), validation.clone(), source.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let Ok(Some(mut s)) =
                tokio::time::timeout(REQUEST_TIME, handshake(tcp, main, validation)).await
            else {
                return;
            };
            let Some((method, path)) =
                kame_api::serving::httpmini::request_line(&mut s, REQUEST_TIME).await
            else {
                return;
            };
            use kame_api::serving::httpmini::respond;
            if path != "/" {
                return respond(&mut s, "404 Not Found", "text/plain", b"not found\n", "").await;
            }
            if method != "GET" {
                return kame_api::serving::httpmini::get_only(&mut s).await;
            }
            match source.document(crate::ca::now_secs()).await {
                Ok(body) => respond(&mut s, "200 OK", "application/json", &body, "").await,
                Err(why) => {
                    tracing::warn!(reason = %why, "bundle endpoint: not serving");
                    respond(
                        &mut s,
                        "503 Service Unavailable",
                        "text/plain",
                        b"bundle unavailable\n",
                        "",
                    )
                    .await
                }
            }
        });
    }
}
