//! The one Vault client of a server: logging in to Vault and staying logged in, shared by every
//! Kame component that talks to the same Vault with the same credentials (the Transit
//! KeyManager and the PKI UpstreamAuthority). It holds the client settings (TLS, namespace),
//! each auth method's login, token renewal at two thirds of its TTL, and one retry with a fresh
//! login when Vault refuses the token. Logins are serialized; a call never waits for one unless
//! its token was refused. It knows nothing of Transit or PKI paths. Tokens and secret ids are
//! never logged.

use super::*;

/// Where and how to reach Vault: what two components must share to share one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultConnection {
    pub vault_addr: String,
    pub namespace: Option<String>,
    pub ca_cert_path: Option<PathBuf>,
    pub insecure_skip_verify: bool,
    pub auth: VaultAuth,
    /// Each HTTP call's deadline.
    pub call_timeout: Duration,
}

pub(super) struct Session {
    pub(super) client: Arc<VaultClient>,
    /// When to renew (two thirds of the TTL), if the token expires.
    renew_at: Option<tokio::time::Instant>,
    pub(super) renewable: bool,
}

/// A logged-in Vault client whose token is kept alive by a background task (which ends when
/// the last holder drops it).
pub struct VaultSession {
    cfg: VaultConnection,
    session: RwLock<Arc<Session>>,
    /// Serializes logins (never taken on a call's path unless Vault refused the token).
    login: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for VaultSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultSession")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// The Vault sessions of one server: components configured with the same connection get the
/// same session (one login, one renewal), as SPIRE's plugins share one client library.
#[derive(Debug, Clone, Default)]
pub struct VaultSessions(Arc<tokio::sync::Mutex<Vec<std::sync::Weak<VaultSession>>>>);

/// Two registries are equal when they are the same one.
impl PartialEq for VaultSessions {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for VaultSessions {}

impl VaultSessions {
    /// The live session for `conn`, or a new one (logged in now).
    pub async fn get_or_open(&self, conn: &VaultConnection) -> Result<Arc<VaultSession>> {
        let mut all = self.0.lock().await;
        all.retain(|w| w.strong_count() > 0);
        if let Some(s) = all
            .iter()
            .filter_map(|w| w.upgrade())
            .find(|s| s.cfg == *conn)
        {
            return Ok(s);
        }
        let s = VaultSession::open(conn.clone()).await?;
        all.push(Arc::downgrade(&s));
        Ok(s)
    }
}

impl VaultSession {
    /// Logs in and starts token renewal.
    pub async fn open(cfg: VaultConnection) -> Result<Arc<Self>> {
        let session = Self::login_with(&cfg).await?;
        let s = Arc::new(VaultSession {
            cfg,
            session: RwLock::new(Arc::new(session)),
            login: tokio::sync::Mutex::new(()),
        });
        let weak = Arc::downgrade(&s);
        tokio::spawn(async move {
            // After a failure, wait with a growing pause (5 s up to 5 min) before trying again.
            let mut backoff = Duration::from_secs(5);
            loop {
                let wait = match weak.upgrade() {
                    None => return,
                    Some(s) => s.renew_due(),
                };
                tokio::time::sleep(wait).await;
                let Some(s) = weak.upgrade() else { return };
                if !s.renew_due().is_zero() {
                    continue;
                }
                match s.renew().await {
                    Ok(()) => backoff = Duration::from_secs(5),
                    Err(e) => {
                        if matches!(s.cfg.auth, VaultAuth::Token(_))
                            && !s.current().map(|s| s.renewable).unwrap_or(false)
                        {
                            tracing::warn!(
                                error = %e,
                                "the Vault token cannot be renewed and token_auth cannot log in again; it will expire"
                            );
                            return;
                        }
                        tracing::warn!(error = %e, retry_in = ?backoff, "Vault token renewal failed");
                        drop(s);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(300));
                    }
                }
            }
        });
        Ok(s)
    }

    pub fn connection(&self) -> &VaultConnection {
        &self.cfg
    }

    fn settings(cfg: &VaultConnection, token: &str) -> Result<VaultClient> {
        let mut b = VaultClientSettingsBuilder::default();
        b.address(&cfg.vault_addr)
            .token(token)
            .timeout(Some(cfg.call_timeout))
            .verify(!cfg.insecure_skip_verify)
            .namespace(cfg.namespace.clone())
            .ca_certs(
                cfg.ca_cert_path
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect(),
            );
        b.identity(match &cfg.auth {
            VaultAuth::Cert {
                client_cert_path,
                client_key_path,
                ..
            } => {
                let mut pem = std::fs::read(client_cert_path).map_err(|e| {
                    Error::Config(format!(
                        "hashicorp_vault: cannot read {}: {e}",
                        client_cert_path.display()
                    ))
                })?;
                pem.extend(std::fs::read(client_key_path).map_err(|e| {
                    Error::Config(format!(
                        "hashicorp_vault: cannot read {}: {e}",
                        client_key_path.display()
                    ))
                })?);
                Some(vaultrs::client::Identity::from_pem(&pem).map_err(|e| {
                    Error::Config(format!("hashicorp_vault: client certificate: {e}"))
                })?)
            }
            _ => None,
        });
        let settings = b
            .build()
            .map_err(|e| Error::Config(format!("hashicorp_vault: {e}")))?;
        VaultClient::new(settings).map_err(|e| Error::Config(format!("hashicorp_vault: {e}")))
    }

    /// Logs in with the configured method; returns a client holding the token.
    async fn login_with(cfg: &VaultConnection) -> Result<Session> {
        let anon = Self::settings(cfg, "")?;
        let (token, ttl, renewable) = match &cfg.auth {
            VaultAuth::Token(t) => {
                let c = Self::settings(cfg, t.expose())?;
                let info = vaultrs::token::lookup_self(&c)
                    .await
                    .map_err(|e| vault_err("token lookup-self", e))?;
                (
                    t.expose().to_string(),
                    info.ttl,
                    info.renewable.unwrap_or(false),
                )
            }
            VaultAuth::AppRole {
                mount,
                role_id,
                secret_id,
            } => {
                let a = vaultrs::auth::approle::login(&anon, mount, role_id, secret_id.expose())
                    .await
                    .map_err(|e| vault_err("AppRole login", e))?;
                (a.client_token, a.lease_duration, a.renewable)
            }
            VaultAuth::Cert {
                mount, role_name, ..
            } => {
                let a = vaultrs::auth::cert::login(&anon, mount, role_name)
                    .await
                    .map_err(|e| vault_err("cert login", e))?;
                (a.client_token, a.lease_duration, a.renewable)
            }
            VaultAuth::Kubernetes {
                mount,
                role,
                token_path,
            } => {
                // Read at each login: the service account token rotates.
                let jwt = std::fs::read_to_string(token_path).map_err(|e| {
                    Error::Config(format!(
                        "hashicorp_vault: cannot read {}: {e}",
                        token_path.display()
                    ))
                })?;
                let a = vaultrs::auth::kubernetes::login(&anon, mount, role, jwt.trim())
                    .await
                    .map_err(|e| vault_err("Kubernetes login", e))?;
                (a.client_token, a.lease_duration, a.renewable)
            }
        };
        Ok(Session {
            client: Arc::new(Self::settings(cfg, &token)?),
            renew_at: (ttl > 0)
                .then(|| tokio::time::Instant::now() + Duration::from_secs(ttl * 2 / 3)),
            renewable,
        })
    }

    pub(super) fn current(&self) -> Result<Arc<Session>> {
        self.session
            .read()
            .map(|s| s.clone())
            .map_err(|_| Error::Backend("Vault session poisoned".into()))
    }

    /// How long until the token should be renewed (an hour when it never expires).
    fn renew_due(&self) -> Duration {
        match self.current().ok().and_then(|s| s.renew_at) {
            None => Duration::from_secs(3600),
            Some(at) => at.saturating_duration_since(tokio::time::Instant::now()),
        }
    }

    /// Renews the token, or logs in again when it cannot be renewed.
    pub async fn renew(&self) -> Result<()> {
        let s = self.current()?;
        if s.renewable {
            match vaultrs::token::renew_self(s.client.as_ref(), None).await {
                Ok(a) => {
                    let next = Session {
                        client: s.client.clone(),
                        renew_at: (a.lease_duration > 0).then(|| {
                            tokio::time::Instant::now()
                                + Duration::from_secs(a.lease_duration * 2 / 3)
                        }),
                        renewable: a.renewable,
                    };
                    let mut cur = self
                        .session
                        .write()
                        .map_err(|_| Error::Backend("Vault session poisoned".into()))?;
                    // Only if no login replaced the session meanwhile (it is newer).
                    if Arc::ptr_eq(&cur, &s) {
                        *cur = Arc::new(next);
                    }
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(error = %vault_err("token renew-self", e), "renewal failed; logging in again")
                }
            }
        }
        self.relogin(&s).await
    }

    /// Logs in again unless another task already did since `seen`.
    async fn relogin(&self, seen: &Arc<Session>) -> Result<()> {
        if matches!(self.cfg.auth, VaultAuth::Token(_)) {
            return Err(Error::Backend(
                "Vault refused the configured token and token_auth cannot log in again".into(),
            ));
        }
        let _g = self.login.lock().await;
        if !Arc::ptr_eq(&self.current()?, seen) {
            return Ok(());
        }
        let s = Self::login_with(&self.cfg).await?;
        *self
            .session
            .write()
            .map_err(|_| Error::Backend("Vault session poisoned".into()))? = Arc::new(s);
        Ok(())
    }

    /// Runs a Vault call with the current token; on 403 logs in again and retries once.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: Fn(Arc<VaultClient>) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let s = self.current()?;
        let deadline = self.cfg.call_timeout + Duration::from_secs(1);
        let run = |c: Arc<VaultClient>| async {
            tokio::time::timeout(deadline, f(c))
                .await
                .map_err(|_| Error::Unavailable("Vault call timed out".into()))?
        };
        match run(s.client.clone()).await {
            Err(e) if is_forbidden(&e) && !matches!(self.cfg.auth, VaultAuth::Token(_)) => {
                self.relogin(&s).await?;
                run(self.current()?.client.clone()).await
            }
            r => r,
        }
    }
    /// `POST /v1/<path>` with a JSON body; the JSON answer. 5xx and 429 are
    /// [`Error::Unavailable`]; other refusals [`Error::Backend`] with Vault's errors.
    pub async fn post(&self, path: String, body: serde_json::Value) -> Result<serde_json::Value> {
        let ns = self.cfg.namespace.clone();
        let addr = self.cfg.vault_addr.trim_end_matches('/').to_string();
        self.call(|c| {
            let (path, body, ns, addr) = (path.clone(), body.clone(), ns.clone(), addr.clone());
            async move {
                let mut req = c
                    .http
                    .http
                    .post(format!("{addr}/v1/{path}"))
                    .header("X-Vault-Token", c.settings.token.clone())
                    .header("Content-Type", "application/json")
                    .body(serde_json::to_vec(&body).unwrap_or_default());
                if let Some(ns) = ns {
                    req = req.header("X-Vault-Namespace", ns);
                }
                let resp = req
                    .send()
                    .await
                    .map_err(|e| Error::Unavailable(format!("Vault POST {path}: {e}")))?;
                let status = resp.status().as_u16();
                let bytes = resp
                    .bytes()
                    .await
                    .map_err(|e| Error::Unavailable(format!("Vault POST {path}: {e}")))?;
                let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                if status >= 500 || status == 429 {
                    return Err(Error::Unavailable(format!(
                        "Vault POST {path}: HTTP {status}"
                    )));
                }
                if status >= 400 {
                    return Err(Error::Backend(format!(
                        "Vault POST {path}: HTTP {status}: {}",
                        vault_errors(&v)
                    )));
                }
                Ok(v)
            }
        })
        .await
    }
}

/// Vault's `errors` list as one line: its multi-error texts ("1 error occurred:\n\t* …")
/// reduced to their items.
fn vault_errors(v: &serde_json::Value) -> String {
    let Some(list) = v.get("errors").and_then(|e| e.as_array()) else {
        return String::new();
    };
    list.iter()
        .filter_map(|e| e.as_str())
        .flat_map(|e| {
            let items: Vec<&str> = e
                .lines()
                .filter_map(|l| l.trim().strip_prefix("* "))
                .collect();
            if items.is_empty() {
                vec![e.trim()]
            } else {
                items
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}
