//! The `disk` UpstreamAuthority (SPIRE's): the upstream CA's certificate and key in PEM files,
//! and optionally a bundle file of the roots above it. Without a bundle the certificate must be
//! a single self-signed CA, which becomes the trust domain's root; with one, the certificate
//! file holds the CA and the intermediates up to a root of the bundle, and minted chains carry
//! them. The files are read when the plugin is built (any error refuses the configuration) and
//! again before every CSR, so an operator can replace them; a bad reload keeps the last good CA
//! and logs why. It writes nothing.

use crate::mint::{check_csr, sign_ca};
use crate::{MintedX509Ca, Updates, UpstreamAuthority, UpstreamError, no_updates};
use kame_api::TrustDomain;
use kame_api::keys::KeyInfo;
use kame_api::x509svid::{self, IssuerInfo, ParsedCert};
use kame_keymanager::pem::{PemKey, PemKeyError};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const TYPE: &str = "disk";

/// SPIRE's keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub cert_file_path: PathBuf,
    pub key_file_path: PathBuf,
    pub bundle_file_path: Option<PathBuf>,
}

/// Why the upstream CA files were refused, one variant per check.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiskError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate: {source}")]
    Pem {
        path: String,
        #[source]
        source: kame_api::Error,
    },
    #[error("{path} holds no certificate")]
    NoCertificate { path: String },
    #[error("{path}: certificate {index} cannot be parsed: {source}")]
    BadCertificate {
        path: String,
        index: usize,
        #[source]
        source: kame_api::Error,
    },
    #[error("unable to load upstream CA key {path}: {source}")]
    Key {
        path: String,
        #[source]
        source: PemKeyError,
    },
    #[error(
        "with no bundle_file_path configured only self-signed CAs are supported ({path} holds {count} certificates)"
    )]
    ChainWithoutBundle { path: String, count: usize },
    #[error("unable to load upstream CA: {path} is not a CA certificate: {source}")]
    NotCa {
        path: String,
        #[source]
        source: kame_api::Error,
    },
    #[error("unable to load upstream CA: certificate and private key do not match")]
    KeyMismatch,
    #[error(
        "unable to load upstream CA: certificate cannot be validated with the provided bundle or is not self-signed: {0}"
    )]
    Unverified(#[source] kame_api::Error),
}

/// What the files held at the last good read.
#[derive(Debug)]
struct Loaded {
    key: PemKey,
    issuer: IssuerInfo,
    /// The certificate file's chain, sent after the minted CA (bundle mode); empty without a
    /// bundle, where the CA is itself the root.
    chain: Vec<Vec<u8>>,
    roots: Vec<Vec<u8>>,
}

#[derive(Debug)]
pub struct DiskUpstream {
    cfg: DiskConfig,
    trust_domain: TrustDomain,
    last_good: Mutex<Arc<Loaded>>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn read(path: &Path) -> Result<Vec<u8>, DiskError> {
    std::fs::read(path).map_err(|source| DiskError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn certs(path: &Path) -> Result<Vec<Vec<u8>>, DiskError> {
    let p = || path.display().to_string();
    let text = String::from_utf8(read(path)?).map_err(|_| DiskError::Pem {
        path: p(),
        source: kame_api::Error::BadBundle("not PEM text".into()),
    })?;
    let certs = kame_api::bundle::certs_from_pem(&text)
        .map_err(|source| DiskError::Pem { path: p(), source })?;
    if certs.is_empty() {
        return Err(DiskError::NoCertificate { path: p() });
    }
    for (index, c) in certs.iter().enumerate() {
        ParsedCert::parse(c).map_err(|source| DiskError::BadCertificate {
            path: p(),
            index,
            source,
        })?;
    }
    Ok(certs)
}

impl DiskConfig {
    /// Reads and checks the files at `now`: the key is the certificate's, the certificate is
    /// a CA, and it is valid at `now` up to a root (itself without a bundle).
    fn load(&self, now: u64) -> Result<Loaded, DiskError> {
        let cert_path = self.cert_file_path.display().to_string();
        let file_certs = certs(&self.cert_file_path)?;
        let key = PemKey::parse(&read(&self.key_file_path)?).map_err(|source| DiskError::Key {
            path: self.key_file_path.display().to_string(),
            source,
        })?;
        let ca = &file_certs[0];
        let parsed = ParsedCert::parse(ca).map_err(|source| DiskError::BadCertificate {
            path: cert_path.clone(),
            index: 0,
            source,
        })?;
        x509svid::check_ca_lenient(&parsed).map_err(|source| DiskError::NotCa {
            path: cert_path.clone(),
            source,
        })?;
        let cert_key = parsed
            .spki_der()
            .and_then(|s| KeyInfo::from_spki_der(&s))
            .map_err(|_| DiskError::KeyMismatch)?;
        let own_key =
            KeyInfo::from_spki_der(&key.public().spki_der).map_err(|_| DiskError::KeyMismatch)?;
        if cert_key != own_key {
            return Err(DiskError::KeyMismatch);
        }
        let (chain, roots) = match &self.bundle_file_path {
            None => {
                if file_certs.len() != 1 {
                    return Err(DiskError::ChainWithoutBundle {
                        path: cert_path,
                        count: file_certs.len(),
                    });
                }
                // The CA is the root: it must be self-signed and valid now.
                parsed
                    .check_signed_by(&key.public().spki_der)
                    .map_err(DiskError::Unverified)?;
                let roots = vec![ca.clone()];
                x509svid::verify_ca_chain(&file_certs, &roots, now, 1)
                    .map_err(DiskError::Unverified)?;
                (vec![], roots)
            }
            Some(bundle) => {
                let roots = certs(bundle)?;
                x509svid::verify_ca_chain(&file_certs, &roots, now, 1)
                    .map_err(DiskError::Unverified)?;
                (file_certs.clone(), roots)
            }
        };
        let issuer = IssuerInfo::from_cert_der(ca).map_err(|source| DiskError::NotCa {
            path: self.cert_file_path.display().to_string(),
            source,
        })?;
        Ok(Loaded {
            key,
            issuer,
            chain,
            roots,
        })
    }
}

impl DiskUpstream {
    /// Reads the files; any error refuses the configuration.
    pub fn open(cfg: DiskConfig, trust_domain: TrustDomain) -> Result<Self, DiskError> {
        let loaded = cfg.load(now_secs())?;
        Ok(DiskUpstream {
            cfg,
            trust_domain,
            last_good: Mutex::new(Arc::new(loaded)),
        })
    }

    /// The files as they are now, or the last good read if they no longer pass.
    fn reload(&self) -> Arc<Loaded> {
        let mut last = self.last_good.lock().unwrap_or_else(|p| p.into_inner());
        match self.cfg.load(now_secs()) {
            Ok(l) => *last = Arc::new(l),
            Err(e) => tracing::warn!(
                error = %e,
                "upstream CA files no longer load; signing with the last good CA"
            ),
        }
        last.clone()
    }
}

#[async_trait::async_trait]
impl UpstreamAuthority for DiskUpstream {
    async fn mint_x509_ca(
        &self,
        csr: &[u8],
        preferred_ttl: Duration,
    ) -> Result<(MintedX509Ca, Updates<Vec<Vec<u8>>>), UpstreamError> {
        let csr = check_csr(csr, &self.trust_domain)?;
        let loaded = self.reload();
        let minted = sign_ca(
            &csr,
            &self.trust_domain,
            preferred_ttl,
            &loaded.issuer,
            &loaded.key,
            now_secs(),
        )?;
        let mut chain = vec![minted];
        chain.extend(loaded.chain.iter().cloned());
        Ok((
            MintedX509Ca {
                chain,
                upstream_roots: loaded.roots.clone(),
            },
            no_updates(),
        ))
    }
}
