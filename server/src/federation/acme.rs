//! ACME (RFC 8555) for the `https_web` bundle endpoint, SPIRE's `acme { domain_name, email,
//! directory_url, tos_accepted }`: obtains a Web PKI certificate for `domain_name`, proving
//! control with tls-alpn-01 (RFC 8737) on the endpoint's own port (as SPIRE's autocert does),
//! serves it, and renews it at two thirds of its lifetime. The account and the certificate are
//! kept in `data_dir/bundle-acme` (keys 0600, written atomically), so a restart reuses them.
//!
//! A failed order is logged with the ACME server's problem, retried with a backoff of 10 s
//! doubling to an hour, and never replaces the certificate being served. Validation
//! certificates are only handed out for a handshake that offers `acme-tls/1` and names
//! `domain_name`, and only while an order waits for them. This module does not serve HTTP and
//! does not touch the CA; SPIRE keeps the ACME keys in its KeyManager, Kame keeps them on disk
//! next to the datastore.

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// SPIRE's default directory: Let's Encrypt's production service.
pub const DEFAULT_DIRECTORY_URL: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// The ALPN protocol of tls-alpn-01 validation handshakes (RFC 8737 §6.2).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// How long one attempt (account, order, validation, issuance) may take.
const ORDER_TIME: Duration = Duration::from_secs(300);
/// How long the validation and the issuance are each polled for.
const POLL_TIME: Duration = Duration::from_secs(90);
const FIRST_RETRY: Duration = Duration::from_secs(10);
const LAST_RETRY: Duration = Duration::from_secs(3600);

/// `acme { … }` of the `https_web` profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    pub domain_name: String,
    pub email: String,
    pub directory_url: String,
    pub tos_accepted: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("ACME: {0}")]
    Protocol(#[from] instant_acme::Error),
    #[error("ACME: the order took longer than {0:?}")]
    Timeout(Duration),
    #[error("ACME: the server offers no tls-alpn-01 challenge for {0}")]
    NoTlsAlpnChallenge(String),
    #[error("ACME: the authorization for {domain} is {status}")]
    Authorization { domain: String, status: String },
    #[error("ACME: the order is {0} after validation")]
    OrderNotReady(String),
    #[error("ACME: the certificate issued is not usable: {0}")]
    BadCertificate(String),
    #[error("ACME: the validation certificate: {0}")]
    ValidationCert(String),
    #[error("ACME: the stored account {path}: {reason}")]
    StoredAccount { path: String, reason: String },
    #[error(transparent)]
    Write(#[from] kame_keymanager::fs::WriteError),
}

/// What `account.json` holds: the credentials and the directory they belong to.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredAccount {
    directory_url: String,
    /// The contact it was registered with: another `email` registers a new account.
    #[serde(default)]
    email: String,
    credentials: AccountCredentials,
}

/// What `certificate.json` holds: where `cert.pem` came from.
#[derive(serde::Serialize, serde::Deserialize, PartialEq, Eq)]
struct StoredOrigin {
    directory_url: String,
    domain_name: String,
}

/// A certificate being served and when to renew it.
struct Served {
    key: Arc<CertifiedKey>,
    renew_at: u64,
    not_after: u64,
}

/// The ACME certificate of the bundle endpoint, its validation certificate while an order
/// waits, and the account that orders them.
pub struct AcmeCert {
    cfg: AcmeConfig,
    dir: PathBuf,
    provider: Arc<rustls::crypto::CryptoProvider>,
    served: RwLock<Option<Served>>,
    validation: RwLock<Option<Arc<CertifiedKey>>>,
    account: tokio::sync::Mutex<Option<Account>>,
}

impl std::fmt::Debug for AcmeCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeCert")
            .field("cfg", &self.cfg)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn now() -> u64 {
    crate::ca::now_secs()
}

impl AcmeCert {
    /// The ACME state under `data_dir/bundle-acme`, with a stored certificate loaded when it
    /// is for this domain and directory and has not expired.
    pub fn new(
        cfg: AcmeConfig,
        data_dir: &Path,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Arc<Self> {
        if !cfg.tos_accepted {
            tracing::warn!(
                directory_url = %cfg.directory_url,
                "ACME Terms of Service have not been accepted (tos_accepted); a directory that has terms will refuse the account"
            );
        }
        let me = Arc::new(AcmeCert {
            cfg,
            dir: data_dir.join("bundle-acme"),
            provider,
            served: RwLock::new(None),
            validation: RwLock::new(None),
            account: tokio::sync::Mutex::new(None),
        });
        match me.load_stored() {
            Ok(Some(s)) => {
                tracing::info!(
                    domain = %me.cfg.domain_name,
                    renew_at = s.renew_at,
                    "bundle endpoint: ACME certificate loaded from data_dir"
                );
                *me.served.write().unwrap_or_else(|p| p.into_inner()) = Some(s);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "bundle endpoint: the stored ACME certificate is not used")
            }
        }
        me
    }

    fn cert_path(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }
    fn key_path(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
    fn origin_path(&self) -> PathBuf {
        self.dir.join("certificate.json")
    }
    fn account_path(&self) -> PathBuf {
        self.dir.join("account.json")
    }

    fn origin(&self) -> StoredOrigin {
        StoredOrigin {
            directory_url: self.cfg.directory_url.clone(),
            domain_name: self.cfg.domain_name.clone(),
        }
    }

    fn load_stored(&self) -> Result<Option<Served>, AcmeError> {
        let Ok(origin) = std::fs::read(self.origin_path()) else {
            return Ok(None);
        };
        if serde_json::from_slice::<StoredOrigin>(&origin).ok() != Some(self.origin()) {
            return Ok(None);
        }
        let bad = |e: String| AcmeError::BadCertificate(e);
        let chain = std::fs::read(self.cert_path()).map_err(|e| bad(e.to_string()))?;
        let key = std::fs::read(self.key_path()).map_err(|e| bad(e.to_string()))?;
        self.check(&chain, &key).map(Some)
    }

    /// The chain and key as a served certificate, if the leaf names the domain, is in its
    /// validity period and matches the key.
    fn check(&self, chain_pem: &[u8], key_pem: &[u8]) -> Result<Served, AcmeError> {
        let bad = |e: String| AcmeError::BadCertificate(e);
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| bad(e.to_string()))?;
        let leaf = chain.first().ok_or_else(|| bad("no certificate".into()))?;
        let parsed = kame_api::x509svid::ParsedCert::parse(leaf).map_err(|e| bad(e.to_string()))?;
        let names = parsed
            .sans()
            .map_err(|e| bad(e.to_string()))?
            .map(|(_, _, dns)| dns)
            .unwrap_or_default();
        if !names
            .iter()
            .any(|n| n.eq_ignore_ascii_case(&self.cfg.domain_name))
        {
            return Err(bad(format!(
                "it names {names:?}, not {}",
                self.cfg.domain_name
            )));
        }
        let (nb, na) = (parsed.not_before(), parsed.not_after());
        if na <= now() || na <= nb {
            return Err(bad(format!("it expired at {na}")));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| bad(e.to_string()))?;
        let signing = self
            .provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| bad(e.to_string()))?;
        let ck = CertifiedKey::new(chain, signing);
        ck.keys_match().map_err(|e| bad(e.to_string()))?;
        Ok(Served {
            key: Arc::new(ck),
            renew_at: nb + (na - nb) * 2 / 3,
            not_after: na,
        })
    }

    /// When the served certificate is due for renewal (`None`: there is none).
    pub fn renew_at(&self) -> Option<u64> {
        self.served
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|s| s.renew_at)
    }

    /// The resolver and configuration for `acme-tls/1` handshakes.
    pub fn validation_config(self: &Arc<Self>) -> Result<rustls::ServerConfig, rustls::Error> {
        let mut c = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Validation(self.clone())));
        c.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
        Ok(c)
    }

    async fn account(&self) -> Result<Account, AcmeError> {
        let mut slot = self.account.lock().await;
        if let Some(a) = slot.as_ref() {
            return Ok(a.clone());
        }
        let path = self.account_path();
        let stored = match std::fs::read(&path) {
            Ok(b) => Some(serde_json::from_slice::<StoredAccount>(&b).map_err(|e| {
                AcmeError::StoredAccount {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                }
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(AcmeError::StoredAccount {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                });
            }
        };
        let account = match stored {
            Some(s) if s.directory_url == self.cfg.directory_url && s.email == self.cfg.email => {
                Account::builder()?.from_credentials(s.credentials).await?
            }
            _ => {
                let contact = format!("mailto:{}", self.cfg.email);
                let (account, credentials) = Account::builder()?
                    .create(
                        &NewAccount {
                            contact: &[&contact],
                            terms_of_service_agreed: self.cfg.tos_accepted,
                            only_return_existing: false,
                        },
                        self.cfg.directory_url.clone(),
                        None,
                    )
                    .await?;
                let doc = StoredAccount {
                    directory_url: self.cfg.directory_url.clone(),
                    email: self.cfg.email.clone(),
                    credentials,
                };
                let bytes = serde_json::to_vec(&doc).map_err(|e| AcmeError::StoredAccount {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
                kame_keymanager::fs::write_secret(&path, &bytes)?;
                tracing::info!(directory_url = %self.cfg.directory_url, id = account.id(), "ACME account registered");
                account
            }
        };
        *slot = Some(account.clone());
        Ok(account)
    }

    /// One order: validation, issuance, the files written, the certificate served.
    async fn obtain(&self) -> Result<(), AcmeError> {
        let account = self.account().await?;
        let ids = [Identifier::Dns(self.cfg.domain_name.clone())];
        let mut order = account.new_order(&NewOrder::new(&ids)).await?;
        let _clear = ClearOnDrop(&self.validation);
        let mut authzs = order.authorizations();
        while let Some(a) = authzs.next().await {
            let mut a = a?;
            match a.status {
                AuthorizationStatus::Valid => continue,
                AuthorizationStatus::Pending => {}
                other => {
                    return Err(AcmeError::Authorization {
                        domain: self.cfg.domain_name.clone(),
                        status: format!("{other:?}").to_lowercase(),
                    });
                }
            }
            let mut ch = a
                .challenge(ChallengeType::TlsAlpn01)
                .ok_or_else(|| AcmeError::NoTlsAlpnChallenge(self.cfg.domain_name.clone()))?;
            let vc = self.validation_cert(ch.key_authorization().digest().as_ref())?;
            *self.validation.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(vc));
            ch.set_ready().await?;
        }
        let polls = RetryPolicy::new()
            .initial_delay(Duration::from_millis(500))
            .backoff(1.5)
            .timeout(POLL_TIME);
        let status = order.poll_ready(&polls).await?;
        if status != OrderStatus::Ready {
            return Err(AcmeError::OrderNotReady(
                format!("{status:?}").to_lowercase(),
            ));
        }
        let key_pem = zeroize::Zeroizing::new(order.finalize().await?);
        let chain_pem = order.poll_certificate(&polls).await?;
        let served = self.check(chain_pem.as_bytes(), key_pem.as_bytes())?;
        kame_keymanager::fs::write_secret(&self.key_path(), key_pem.as_bytes())?;
        kame_keymanager::fs::write_atomic(&self.cert_path(), chain_pem.as_bytes(), 0o644)?;
        let origin = serde_json::to_vec(&self.origin()).unwrap_or_default();
        kame_keymanager::fs::write_atomic(&self.origin_path(), &origin, 0o644)?;
        tracing::info!(
            domain = %self.cfg.domain_name,
            not_after = served.not_after,
            renew_at = served.renew_at,
            "bundle endpoint: ACME certificate obtained"
        );
        *self.served.write().unwrap_or_else(|p| p.into_inner()) = Some(served);
        Ok(())
    }

    /// A self-signed certificate for the domain carrying the `acmeIdentifier` extension
    /// (critical, the SHA-256 of the key authorization).
    fn validation_cert(&self, digest: &[u8]) -> Result<CertifiedKey, AcmeError> {
        let bad = |e: String| AcmeError::ValidationCert(e);
        let mut params = rcgen::CertificateParams::new(vec![self.cfg.domain_name.clone()])
            .map_err(|e| bad(e.to_string()))?;
        params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
        let key = rcgen::KeyPair::generate().map_err(|e| bad(e.to_string()))?;
        let cert = params.self_signed(&key).map_err(|e| bad(e.to_string()))?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = self
            .provider
            .key_provider
            .load_private_key(der)
            .map_err(|e| bad(e.to_string()))?;
        Ok(CertifiedKey::new(vec![cert.der().clone()], signing))
    }

    /// Obtains the certificate when there is none or it is due, until `shutdown`.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut retry = FIRST_RETRY;
        loop {
            let due = self.renew_at().is_none_or(|t| t <= now());
            let wait = if due {
                let r = tokio::select! {
                    _ = crate::run::stopped(&mut shutdown) => return,
                    r = tokio::time::timeout(ORDER_TIME, self.obtain()) => r,
                };
                match r.unwrap_or(Err(AcmeError::Timeout(ORDER_TIME))) {
                    Ok(()) => {
                        retry = FIRST_RETRY;
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(
                            error = %e,
                            domain = %self.cfg.domain_name,
                            directory_url = %self.cfg.directory_url,
                            retry_in = ?retry,
                            "bundle endpoint: ACME certificate not obtained; serving the last good one, if any"
                        );
                        let w = retry;
                        retry = (retry * 2).min(LAST_RETRY);
                        w
                    }
                }
            } else {
                Duration::from_secs(self.renew_at().unwrap_or(0).saturating_sub(now()))
            };
            tokio::select! {
                _ = crate::run::stopped(&mut shutdown) => return,
                _ = tokio::time::sleep(wait.max(Duration::from_secs(1))) => {}
            }
        }
    }
}

/// Clears the validation certificate when the order is done, whichever way.
struct ClearOnDrop<'a>(&'a RwLock<Option<Arc<CertifiedKey>>>);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl ResolvesServerCert for AcmeCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.served
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|s| s.not_after > now())
            .map(|s| s.key.clone())
    }
}

/// The validation certificate, for the domain only.
struct Validation(Arc<AcmeCert>);

impl std::fmt::Debug for Validation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Validation")
    }
}

impl ResolvesServerCert for Validation {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if !hello
            .server_name()
            .is_some_and(|n| n.eq_ignore_ascii_case(&self.0.cfg.domain_name))
        {
            return None;
        }
        self.0
            .validation
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
