//! Logging in to Vault and staying logged in: the client settings (TLS, namespace), each auth
//! method's login, token renewal at two thirds of its TTL, and one retry with a fresh login when
//! Vault refuses the token. Logins are serialized; the signing path never waits for one unless
//! its token was refused. Tokens and secret ids are never logged.

use super::*;

impl VaultKeyManager {
    pub(super) fn settings(cfg: &VaultConfig, token: &str) -> Result<VaultClient> {
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
    pub(super) async fn login_with(cfg: &VaultConfig) -> Result<Session> {
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
    pub(super) fn renew_due(&self) -> Duration {
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
    pub(super) async fn relogin(&self, seen: &Arc<Session>) -> Result<()> {
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
    pub(super) async fn call<T, F, Fut>(&self, f: F) -> Result<T>
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
}
