//! `hashicorp_vault` KeyManager: server signing keys in a Vault (or OpenBao) Transit engine,
//! named as SPIRE names them, `<server id>-<uuid>-<key id>`: a fresh name per generation, so a
//! key is never overwritten in place. Keys are created non-exportable with no automatic
//! rotation; signing sends the digest (`prehashed`) and pins the key version the public key was
//! read from, so a key rotated out of band keeps signing with the version Kame knows (SPIRE
//! fails closed instead); RSA-PSS uses a salt as long as the hash. A replaced key is deleted.
//!
//! Liveness: each server keeps a marker key `<server id>-liveness` whose newest version is
//! renewed by [`VaultKeyManager::refresh`]; [`VaultKeyManager::sweep`] deletes the keys of
//! servers whose marker is older than 14 days (SPIRE's Vault plugin never sweeps).
//!
//! Authentication: a token, AppRole, TLS certificate or Kubernetes service account. Tokens are
//! renewed at two thirds of their TTL and a login method logs in again when renewal fails or
//! Vault refuses the token. Only configured values are used: Kame reads no `VAULT_*`
//! environment variable (SPIRE lets them override the configuration). Every call has a
//! deadline; an unreachable or slow Vault is [`Error::Unavailable`]. The signing path takes no
//! lock across network I/O. Tokens and secret ids are never logged.

use crate::{
    Error, HashAlgorithm, KeyManager, KeyType, PublicKey, Result, SignOpts, Signature, fingerprint,
    validate_key_id,
};
use async_trait::async_trait;
use base64::Engine;
use kame_api::Secret;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};

/// Liveness markers are named `kame-liveness-<server id>`.
pub const MARKER_PREFIX: &str = "kame-liveness-";

/// Servers whose liveness marker is older than this are swept.
pub const STALE_AFTER: Duration = Duration::from_secs(14 * 24 * 3600);

/// How Kame logs in to Vault (secrets print as `***`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaultAuth {
    Token(Secret),
    AppRole {
        mount: String,
        role_id: String,
        secret_id: Secret,
    },
    Cert {
        mount: String,
        role_name: String,
        client_cert_path: PathBuf,
        client_key_path: PathBuf,
    },
    Kubernetes {
        mount: String,
        role: String,
        token_path: PathBuf,
    },
}

/// `KeyManager "hashicorp_vault"` settings.
#[derive(Debug, Clone)]
pub struct VaultConfig {
    pub vault_addr: String,
    pub namespace: Option<String>,
    pub ca_cert_path: Option<PathBuf>,
    pub insecure_skip_verify: bool,
    pub transit_engine_path: String,
    pub auth: VaultAuth,
    pub server_id: String,
    pub call_timeout: Duration,
}

#[derive(Debug, Clone)]
struct Entry {
    public: PublicKey,
    name: String,
    version: u64,
}

impl crate::cache::Cached for Entry {
    fn public(&self) -> &PublicKey {
        &self.public
    }
}

/// A transit key of this server that no key id names now (left by a crash or a failed delete).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    pub key_id: String,
    pub name: String,
}

struct Session {
    client: Arc<VaultClient>,
    /// When to renew (two thirds of the TTL), if the token expires.
    renew_at: Option<tokio::time::Instant>,
    renewable: bool,
}

pub struct VaultKeyManager {
    cfg: VaultConfig,
    session: RwLock<Arc<Session>>,
    /// Serializes logins (never taken on the signing path unless Vault refused the token).
    login: tokio::sync::Mutex<()>,
    keys: crate::cache::KeyCache<Entry>,
    leftovers: RwLock<Vec<Leftover>>,
    /// Signing requests in flight at most.
    inflight: tokio::sync::Semaphore,
}

impl std::fmt::Debug for VaultKeyManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultKeyManager")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// A Vault HTTP failure, classified.
fn vault_err(op: &str, e: vaultrs::error::ClientError) -> Error {
    use vaultrs::error::ClientError as C;
    match &e {
        C::APIError { code, errors } => {
            if *code >= 500 || *code == 429 {
                Error::Unavailable(format!("Vault {op}: HTTP {code}: {}", errors.join("; ")))
            } else {
                Error::Backend(format!("Vault {op}: HTTP {code}: {}", errors.join("; ")))
            }
        }
        C::RestClientError { .. } => Error::Unavailable(format!("Vault {op}: {e}")),
        _ => Error::Backend(format!("Vault {op}: {e}")),
    }
}

fn is_forbidden(e: &Error) -> bool {
    matches!(e, Error::Backend(m) if m.contains("HTTP 403"))
}

fn vault_type(kt: KeyType) -> &'static str {
    match kt {
        KeyType::EcP256 => "ecdsa-p256",
        KeyType::EcP384 => "ecdsa-p384",
        KeyType::Rsa2048 => "rsa-2048",
        KeyType::Rsa4096 => "rsa-4096",
    }
}

fn hash_name(h: HashAlgorithm) -> &'static str {
    match h {
        HashAlgorithm::Sha256 => "sha2-256",
        HashAlgorithm::Sha384 => "sha2-384",
        HashAlgorithm::Sha512 => "sha2-512",
    }
}

/// Seconds since the epoch of an RFC 3339 time (`2026-11-23T08:17:32.198Z`,
/// `2026-11-23T03:17:32-05:00`); None when it is not one.
pub fn rfc3339_secs(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') {
        return None;
    }
    let n = |r: std::ops::Range<usize>| {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse::<u64>().ok())?
    };
    let (y, mo, d, h, mi, sec) = (
        n(0..4)?,
        n(5..7)?,
        n(8..10)?,
        n(11..13)?,
        n(14..16)?,
        n(17..19)?,
    );
    if b[13] != b':' || b[16] != b':' || !(1..=12).contains(&mo) || d == 0 || d > 31 {
        return None;
    }
    if h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    // Fractional seconds, then Z or an offset.
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        rest = &frac[digits..];
    }
    let offset: i64 = match rest {
        "Z" | "z" => 0,
        o if o.len() == 6 && matches!(&o[..1], "+" | "-") && &o[3..4] == ":" => {
            let oh: i64 = o[1..3].parse().ok()?;
            let om: i64 = o[4..6].parse().ok()?;
            let v = oh * 3600 + om * 60;
            if &o[..1] == "+" { v } else { -v }
        }
        _ => return None,
    };
    // Days from civil (H. Hinnant's algorithm).
    let (y, m) = if mo <= 2 {
        (y.checked_sub(1)?, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe;
    let days = days.checked_sub(719_468)?;
    let local = (days * 86400 + h * 3600 + mi * 60 + sec) as i64;
    u64::try_from(local - offset).ok()
}

#[cfg(test)]
fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl VaultKeyManager {
    /// Logs in, loads this server's keys, and starts token renewal.
    pub async fn open(cfg: VaultConfig) -> Result<Arc<Self>> {
        if cfg.server_id.is_empty() || cfg.server_id.contains(char::is_whitespace) {
            return Err(Error::Config(
                "hashicorp_vault: a server id is required".into(),
            ));
        }
        let session = Self::login_with(&cfg).await?;
        let km = Arc::new(VaultKeyManager {
            cfg,
            session: RwLock::new(Arc::new(session)),
            login: tokio::sync::Mutex::new(()),
            keys: crate::cache::KeyCache::new(),
            leftovers: RwLock::new(vec![]),
            inflight: tokio::sync::Semaphore::new(crate::MAX_INFLIGHT_SIGNS),
        });
        km.load().await?;
        let weak = Arc::downgrade(&km);
        tokio::spawn(async move {
            // After a failure, wait with a growing pause (5 s up to 5 min) before trying again.
            let mut backoff = Duration::from_secs(5);
            loop {
                let wait = match weak.upgrade() {
                    None => return,
                    Some(km) => km.renew_due(),
                };
                tokio::time::sleep(wait).await;
                let Some(km) = weak.upgrade() else { return };
                if !km.renew_due().is_zero() {
                    continue;
                }
                match km.renew().await {
                    Ok(()) => backoff = Duration::from_secs(5),
                    Err(e) => {
                        if matches!(km.cfg.auth, VaultAuth::Token(_))
                            && !km.current().map(|s| s.renewable).unwrap_or(false)
                        {
                            tracing::warn!(
                                error = %e,
                                "the Vault token cannot be renewed and token_auth cannot log in again; it will expire"
                            );
                            return;
                        }
                        tracing::warn!(error = %e, retry_in = ?backoff, "Vault token renewal failed");
                        drop(km);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(300));
                    }
                }
            }
        });
        Ok(km)
    }

    fn settings(cfg: &VaultConfig, token: &str) -> Result<VaultClient> {
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
    async fn login_with(cfg: &VaultConfig) -> Result<Session> {
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

    fn current(&self) -> Result<Arc<Session>> {
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
    async fn call<T, F, Fut>(&self, f: F) -> Result<T>
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

    fn mount(&self) -> &str {
        self.cfg.transit_engine_path.trim_matches('/')
    }

    fn prefix(&self) -> String {
        format!("{}-", self.cfg.server_id)
    }

    fn marker(&self) -> String {
        format!("{MARKER_PREFIX}{}", self.cfg.server_id)
    }

    /// `<server id>-<uuid>-<key id>` → key id.
    fn key_id_of(&self, name: &str) -> Option<String> {
        let rest = name.strip_prefix(&self.prefix())?;
        let (uuid, id) = (rest.get(..36)?, rest.get(37..)?);
        uuid::Uuid::parse_str(uuid).ok()?;
        (rest.as_bytes().get(36) == Some(&b'-') && !id.is_empty()).then(|| id.to_string())
    }

    async fn list(&self) -> Result<Vec<String>> {
        let mount = self.mount().to_string();
        self.call(|c| {
            let mount = mount.clone();
            async move {
                match vaultrs::transit::key::list(c.as_ref(), &mount).await {
                    Ok(r) => Ok(r.keys),
                    Err(vaultrs::error::ClientError::APIError { code: 404, .. }) => Ok(vec![]),
                    Err(e) => Err(vault_err("list transit keys", e)),
                }
            }
        })
        .await
    }

    /// The key's type, newest version, its public key and creation time (None when Vault's
    /// time cannot be read).
    async fn read(&self, name: &str) -> Result<(KeyType, u64, Vec<u8>, Option<u64>)> {
        let (version, der, created) = self
            .versions(name)
            .await?
            .into_iter()
            .max_by_key(|(v, _, _)| *v)
            .ok_or_else(|| Error::Backend(format!("transit key {name} has no version")))?;
        let kt = crate::encoding::key_type_of_spki(&der)
            .ok_or_else(|| Error::Backend(format!("transit key {name}: unsupported key type")))?;
        Ok((kt, version, der, created))
    }

    /// Every version of an asymmetric transit key: its public key (SPKI DER) and creation time.
    async fn versions(&self, name: &str) -> Result<Vec<(u64, Vec<u8>, Option<u64>)>> {
        let (mount, n) = (self.mount().to_string(), name.to_string());
        let r = self
            .call(|c| {
                let (mount, n) = (mount.clone(), n.clone());
                async move {
                    vaultrs::transit::key::read(c.as_ref(), &mount, &n)
                        .await
                        .map_err(|e| vault_err("read transit key", e))
                }
            })
            .await?;
        let vaultrs::api::transit::responses::ReadKeyData::Asymmetric(versions) = r.keys else {
            return Err(Error::Backend(format!(
                "transit key {name} is not asymmetric"
            )));
        };
        versions
            .iter()
            .map(|(v, e)| {
                let version = v
                    .parse()
                    .map_err(|_| Error::Backend(format!("transit key {name}: version {v:?}")))?;
                let der = kame_pem_public(&e.public_key)
                    .ok_or_else(|| Error::Backend(format!("transit key {name}: bad public key")))?;
                Ok((version, der, rfc3339_secs(&e.creation_time)))
            })
            .collect()
    }

    /// Finds this server's keys; when several names carry one key id, the newest is current
    /// and the others are leftovers.
    async fn load(&self) -> Result<()> {
        let mut newest: HashMap<String, (Option<u64>, Entry)> = HashMap::new();
        let mut leftovers = vec![];
        for name in self.list().await? {
            let Some(id) = self.key_id_of(&name) else {
                continue;
            };
            let (kt, version, spki_der, created) = self.read(&name).await?;
            let entry = Entry {
                public: PublicKey {
                    id: id.clone(),
                    key_type: kt,
                    fingerprint: fingerprint(&spki_der),
                    spki_der,
                },
                name: name.clone(),
                version,
            };
            match newest.get(&id) {
                Some((t, old)) if *t >= created => leftovers.push(Leftover {
                    key_id: id,
                    name: entry.name,
                }),
                Some((_, old)) => {
                    leftovers.push(Leftover {
                        key_id: id.clone(),
                        name: old.name.clone(),
                    });
                    newest.insert(id, (created, entry));
                }
                None => {
                    newest.insert(id, (created, entry));
                }
            }
        }
        self.keys
            .replace(newest.into_iter().map(|(k, (_, e))| (k, e)).collect());
        *self.leftovers.write().unwrap_or_else(|p| p.into_inner()) = leftovers;
        Ok(())
    }

    /// Keys of this server no key id names (see [`VaultKeyManager::delete_key`]).
    pub fn leftovers(&self) -> Vec<Leftover> {
        self.leftovers.read().map(|l| l.clone()).unwrap_or_default()
    }

    fn entry(&self, id: &str) -> Result<Entry> {
        self.keys.get(id)
    }

    /// The transit name behind `id`.
    pub fn key_name(&self, id: &str) -> Result<String> {
        Ok(self.entry(id)?.name)
    }

    async fn post(&self, path: String, body: serde_json::Value) -> Result<serde_json::Value> {
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
                        v.get("errors").map(|e| e.to_string()).unwrap_or_default()
                    )));
                }
                Ok(v)
            }
        })
        .await
    }

    /// Deletes a transit key of this server (deletion must be allowed first).
    pub async fn delete_transit_key(&self, name: &str) -> Result<()> {
        if !name.starts_with(&self.prefix()) {
            return Err(Error::Backend(format!("{name} is not this server's key")));
        }
        self.delete_any(name).await
    }

    async fn delete_any(&self, name: &str) -> Result<()> {
        let (mount, n) = (self.mount().to_string(), name.to_string());
        self.post(
            format!("{mount}/keys/{n}/config"),
            serde_json::json!({"deletion_allowed": true}),
        )
        .await?;
        self.call(|c| {
            let (mount, n) = (mount.clone(), n.clone());
            async move {
                match vaultrs::transit::key::delete(c.as_ref(), &mount, &n).await {
                    Ok(()) | Err(vaultrs::error::ClientError::APIError { code: 404, .. }) => Ok(()),
                    Err(e) => Err(vault_err("delete transit key", e)),
                }
            }
        })
        .await?;
        if let Ok(mut l) = self.leftovers.write() {
            l.retain(|x| x.name != name);
        }
        Ok(())
    }

    /// Liveness: this server's marker key made anew (its creation time is the stamp; making
    /// it anew, not rotating it, keeps it one version long).
    pub async fn refresh(&self) -> Result<()> {
        let mount = self.mount().to_string();
        let marker = self.marker();
        if self.list().await?.contains(&marker) {
            self.delete_any(&marker).await?;
        }
        self.post(
            format!("{mount}/keys/{marker}"),
            serde_json::json!({"type": "ecdsa-p256", "exportable": false}),
        )
        .await?;
        Ok(())
    }

    /// Deletes the keys of servers whose liveness marker is older than [`STALE_AFTER`] at
    /// `now`, then the marker. Only names of Kame's shape for that server are touched
    /// (`<server>-<uuid>-<key id>`); servers without a marker, and markers whose time cannot
    /// be read, are left alone. A failure on one key is logged and the sweep goes on.
    /// Returns the names deleted.
    pub async fn sweep(&self, now: u64) -> Result<Vec<String>> {
        let names = self.list().await?;
        let mut swept = vec![];
        for marker in names.iter().filter(|n| n.starts_with(MARKER_PREFIX)) {
            let server = &marker[MARKER_PREFIX.len()..];
            if server == self.cfg.server_id || server.is_empty() {
                continue;
            }
            let stamp = match self.read(marker).await {
                Ok((_, _, _, Some(t))) => t,
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, %marker, "sweep: cannot read a liveness marker");
                    continue;
                }
            };
            if now.saturating_sub(stamp) < STALE_AFTER.as_secs() {
                continue;
            }
            let prefix = format!("{server}-");
            let theirs = names.iter().filter(|n| {
                n.strip_prefix(&prefix).is_some_and(|rest| {
                    rest.get(..36)
                        .is_some_and(|u| uuid::Uuid::parse_str(u).is_ok())
                        && rest.as_bytes().get(36) == Some(&b'-')
                        && rest.len() > 37
                })
            });
            for n in theirs.chain(std::iter::once(marker)) {
                match self.delete_any(n).await {
                    Ok(()) => swept.push(n.clone()),
                    Err(e) => tracing::warn!(error = %e, key = %n, "sweep: delete failed"),
                }
            }
        }
        Ok(swept)
    }
}

/// DER of a PEM `PUBLIC KEY`.
fn kame_pem_public(pem: &str) -> Option<Vec<u8>> {
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .ok()
}

#[async_trait]
impl KeyManager for VaultKeyManager {
    fn name(&self) -> &'static str {
        "hashicorp_vault"
    }

    async fn generate_key(&self, id: &str, key_type: KeyType) -> Result<PublicKey> {
        self.generate(id, key_type, uuid::Uuid::new_v4()).await
    }

    /// The intent (a UUID) becomes the name's UUID: `<server id>-<intent>-<key id>`.
    async fn generate_key_with_intent(
        &self,
        id: &str,
        key_type: KeyType,
        intent: &str,
    ) -> Result<PublicKey> {
        let uuid = uuid::Uuid::parse_str(intent)
            .map_err(|_| Error::Backend(format!("intent {intent:?} is not a UUID")))?;
        self.generate(id, key_type, uuid).await
    }

    async fn adopt(&self, id: &str, intent: &str) -> Result<Option<PublicKey>> {
        let name = format!("{}{intent}-{id}", self.prefix());
        if let Ok(e) = self.entry(id)
            && e.name == name
        {
            return Ok(Some(e.public));
        }
        if !self.list().await?.contains(&name) {
            return Ok(None);
        }
        let (kt, version, spki_der, _) = self.read(&name).await?;
        let public = PublicKey {
            id: id.to_string(),
            key_type: kt,
            fingerprint: fingerprint(&spki_der),
            spki_der,
        };
        self.install(id, name, version, &public).await;
        Ok(Some(public))
    }

    /// Any name under `id`, any version: the one whose public key has `fp` becomes current,
    /// pinned to that version (a version added out of band does not displace it).
    async fn select(&self, id: &str, fp: &str) -> Result<Option<PublicKey>> {
        if let Ok(e) = self.entry(id)
            && e.public.fingerprint == fp
        {
            return Ok(Some(e.public));
        }
        for name in self.list().await? {
            if self.key_id_of(&name).as_deref() != Some(id) {
                continue;
            }
            for (version, spki_der, _) in self.versions(&name).await? {
                if fingerprint(&spki_der) != fp {
                    continue;
                }
                let kt = crate::encoding::key_type_of_spki(&spki_der).ok_or_else(|| {
                    Error::Backend(format!("transit key {name}: unsupported key type"))
                })?;
                let public = PublicKey {
                    id: id.to_string(),
                    key_type: kt,
                    fingerprint: fp.to_string(),
                    spki_der,
                };
                self.keys.insert(
                    id,
                    Entry {
                        public: public.clone(),
                        name,
                        version,
                    },
                );
                return Ok(Some(public));
            }
        }
        Ok(None)
    }

    async fn orphans(&self) -> Result<Vec<crate::Orphan>> {
        let current: Vec<String> = self.keys.map(|e| e.name.clone());
        Ok(self
            .list()
            .await?
            .into_iter()
            .filter(|n| !current.contains(n))
            .filter_map(|n| {
                let key_id = self.key_id_of(&n)?;
                let intent = n
                    .get(self.prefix().len()..self.prefix().len() + 36)?
                    .to_string();
                Some(crate::Orphan {
                    instance: n,
                    key_id: Some(key_id),
                    intent: Some(intent),
                })
            })
            .collect())
    }

    async fn dispose(&self, orphan: &crate::Orphan) -> Result<()> {
        self.delete_transit_key(&orphan.instance).await
    }

    async fn maintain(&self) -> Result<usize> {
        self.refresh().await?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Ok(self.sweep(now).await?.len())
    }

    async fn delete_key(&self, id: &str, fingerprint: &str) -> Result<bool> {
        let Some(e) = self.keys.remove_if_fingerprint(id, fingerprint) else {
            return Ok(false);
        };
        if let Err(err) = self.delete_transit_key(&e.name).await {
            self.keys.insert(id, e);
            return Err(err);
        }
        Ok(true)
    }

    async fn public_key(&self, id: &str) -> Result<PublicKey> {
        Ok(self.entry(id)?.public)
    }

    async fn public_keys(&self) -> Result<Vec<PublicKey>> {
        Ok(self.keys.publics())
    }

    async fn sign(&self, id: &str, message: &[u8], opts: SignOpts) -> Result<Signature> {
        self.sign_with(id, message, opts).await
    }
}

impl VaultKeyManager {
    async fn generate(&self, id: &str, key_type: KeyType, uuid: uuid::Uuid) -> Result<PublicKey> {
        validate_key_id(id)?;
        let name = format!("{}{uuid}-{id}", self.prefix());
        let mount = self.mount().to_string();
        self.post(
            format!("{mount}/keys/{name}"),
            serde_json::json!({
                "type": vault_type(key_type),
                "exportable": false,
                "allow_plaintext_backup": false,
                "auto_rotate_period": "0",
            }),
        )
        .await?;
        crate::failpoint("after_remote_create");
        let (kt, version, spki_der, _) = match self.read(&name).await {
            Ok(r) => r,
            Err(e) => {
                let _ = self.delete_any(&name).await;
                return Err(e);
            }
        };
        if kt != key_type {
            let _ = self.delete_any(&name).await;
            return Err(Error::Generate(id.into()));
        }
        let public = PublicKey {
            id: id.to_string(),
            key_type: kt,
            fingerprint: fingerprint(&spki_der),
            spki_der,
        };
        self.install(id, name, version, &public).await;
        Ok(public)
    }

    /// Makes `name` the key under `id`; the key it named before is deleted (or left for
    /// reconcile when that fails).
    async fn install(&self, id: &str, name: String, version: u64, public: &PublicKey) {
        let old = self.keys.insert(
            id,
            Entry {
                public: public.clone(),
                name,
                version,
            },
        );
        if let Some(old) = old
            && let Err(e) = self.delete_any(&old.name).await
        {
            tracing::warn!(error = %e, key = %old.name, "could not delete a replaced Vault key");
            if let Ok(mut l) = self.leftovers.write() {
                l.push(Leftover {
                    key_id: id.to_string(),
                    name: old.name,
                });
            }
        }
    }

    async fn sign_with(&self, id: &str, message: &[u8], opts: SignOpts) -> Result<Signature> {
        let e = self.entry(id)?;
        let kt = e.public.key_type;
        if !kt.is_rsa() && (opts.pss || opts.hash != kt.default_hash()) {
            return Err(Error::UnsupportedSignOpts {
                id: id.to_string(),
                key_type: kt,
                hash: opts.hash,
                pss: opts.pss,
            });
        }
        let _permit = crate::sign_permit(&self.inflight, self.cfg.call_timeout).await?;
        let digest = crate::encoding::digest(opts.hash, message);
        let mut body = serde_json::json!({
            "input": base64::engine::general_purpose::STANDARD.encode(&digest),
            "prehashed": true,
            "key_version": e.version,
            "marshaling_algorithm": "asn1",
        });
        if kt.is_rsa() {
            body["signature_algorithm"] = if opts.pss { "pss" } else { "pkcs1v15" }.into();
            if opts.pss {
                body["salt_length"] = "hash".into();
            }
        }
        let v = self
            .post(
                format!("{}/sign/{}/{}", self.mount(), e.name, hash_name(opts.hash)),
                body,
            )
            .await?;
        let sig = v
            .pointer("/data/signature")
            .and_then(|s| s.as_str())
            .ok_or_else(|| Error::Backend(format!("Vault sign {id}: no signature")))?;
        let want = format!("vault:v{}:", e.version);
        let b64 = sig.strip_prefix(&want).ok_or_else(|| {
            Error::Backend(format!(
                "Vault sign {id}: signature is not from version {}",
                e.version
            ))
        })?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| Error::Backend(format!("Vault sign {id}: bad signature encoding")))?;
        Ok(Signature {
            bytes,
            fingerprint: e.public.fingerprint,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Bao;

    fn config(bao: &Bao, server_id: &str, auth: VaultAuth) -> VaultConfig {
        VaultConfig {
            vault_addr: bao.addr.clone(),
            namespace: None,
            ca_cert_path: None,
            insecure_skip_verify: false,
            transit_engine_path: "transit".into(),
            auth,
            server_id: server_id.into(),
            call_timeout: Duration::from_secs(5),
        }
    }

    fn root(bao: &Bao) -> VaultAuth {
        VaultAuth::Token(bao.root_token.as_str().into())
    }

    #[test]
    fn vault_rfc3339_times() {
        assert_eq!(rfc3339_secs("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            rfc3339_secs("2026-11-23T08:17:32.198285786Z"),
            Some(1_795_421_852)
        );
        assert_eq!(rfc3339_secs("2000-02-29T12:00:00Z"), Some(951_825_600));
        assert_eq!(rfc3339_secs("garbage"), None);
        assert_eq!(
            rfc3339_secs("2026-11-23T03:17:32.5-05:00"),
            rfc3339_secs("2026-11-23T08:17:32Z")
        );
        assert_eq!(
            rfc3339_secs("2026-11-23T09:17:32+01:00"),
            Some(1_795_421_852)
        );
        assert_eq!(rfc3339_secs("2026-11-23T08:17:32"), None, "no zone");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn vault_passes_keymanager_conformance_on_openbao() {
        let bao = Bao::start();
        let km = VaultKeyManager::open(config(&bao, "server-a", root(&bao)))
            .await
            .unwrap();
        crate::conformance::run_all(km.as_ref()).await;
        crate::conformance::lifecycle(km.as_ref()).await;
        // Reopened: the same keys; another server: none.
        let again = VaultKeyManager::open(config(&bao, "server-a", root(&bao)))
            .await
            .unwrap();
        let mut a = km.public_keys().await.unwrap();
        let mut b = again.public_keys().await.unwrap();
        a.sort_by(|x, y| x.id.cmp(&y.id));
        b.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(a, b);
        assert!(again.leftovers().is_empty(), "{:?}", again.leftovers());
        let other = VaultKeyManager::open(config(&bao, "server-b", root(&bao)))
            .await
            .unwrap();
        assert!(other.public_keys().await.unwrap().is_empty());
    }

    /// SPIRE's names, non-exportable keys, the replaced key deleted, and a key rotated out of
    /// band still signing with the version Kame pinned.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn vault_names_keys_as_spire_deletes_replaced_and_pins_the_version() {
        let bao = Bao::start();
        let km = VaultKeyManager::open(config(&bao, "srv-1", root(&bao)))
            .await
            .unwrap();
        let first = km.generate_key("x509-CA-A", KeyType::EcP256).await.unwrap();
        let name = km.key_name("x509-CA-A").unwrap();
        assert_eq!(km.key_id_of(&name).as_deref(), Some("x509-CA-A"));
        assert!(
            name.starts_with("srv-1-") && name.ends_with("-x509-CA-A"),
            "{name}"
        );
        let k = bao.json(&["read", &format!("transit/keys/{name}")]);
        assert_eq!(k["data"]["exportable"], false);
        assert_eq!(k["data"]["type"], "ecdsa-p256");
        km.generate_key("x509-CA-A", KeyType::EcP256).await.unwrap();
        let second = km.key_name("x509-CA-A").unwrap();
        assert_ne!(name, second);
        let list = bao.json(&["list", "transit/keys"]);
        let names: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert!(
            !names.contains(&name.as_str()),
            "the replaced key is deleted"
        );
        assert!(names.contains(&second.as_str()));
        let _ = first;
        // Rotated out of band: Kame keeps signing with the version whose public key it has.
        bao.cli(&["write", "-f", &format!("transit/keys/{second}/rotate")]);
        let pk = km.public_key("x509-CA-A").await.unwrap();
        let sig = km
            .sign("x509-CA-A", b"m", SignOpts::for_key(KeyType::EcP256))
            .await
            .unwrap();
        aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
            &pk.spki_der,
        )
        .verify(b"m", &sig.bytes)
        .expect("signed with the pinned version");
        // After a restart the newest version is current, until the CA selects the key its
        // journal names: version 1 again, pinned.
        let again = VaultKeyManager::open(config(&bao, "srv-1", root(&bao)))
            .await
            .unwrap();
        assert_ne!(again.public_key("x509-CA-A").await.unwrap(), pk);
        let sel = again
            .select("x509-CA-A", &pk.fingerprint)
            .await
            .unwrap()
            .expect("version 1 is found");
        assert_eq!(sel, pk);
        let sig = again
            .sign("x509-CA-A", b"m2", SignOpts::for_key(KeyType::EcP256))
            .await
            .unwrap();
        aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
            &pk.spki_der,
        )
        .verify(b"m2", &sig.bytes)
        .expect("signed with the selected version");
    }

    /// AppRole: a revoked token is replaced by a new login; a short-lived token is renewed
    /// before it expires.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn vault_approle_renews_its_token_and_logs_in_again_when_refused() {
        let bao = Bao::start();
        bao.cli(&["auth", "enable", "approle"]);
        let policy = bao.dir.path().join("kame.hcl");
        std::fs::write(
            &policy,
            "path \"transit/*\" { capabilities = [\"create\", \"read\", \"update\", \"delete\", \"list\"] }\n",
        )
        .unwrap();
        bao.cli(&["policy", "write", "kame", &policy.display().to_string()]);
        bao.cli(&[
            "write",
            "auth/approle/role/kame",
            "token_policies=kame",
            "token_ttl=3s",
            "token_max_ttl=10m",
        ]);
        let role_id = bao.json(&["read", "auth/approle/role/kame/role-id"])["data"]["role_id"]
            .as_str()
            .unwrap()
            .to_string();
        let secret_id =
            bao.json(&["write", "-f", "auth/approle/role/kame/secret-id"])["data"]["secret_id"]
                .as_str()
                .unwrap()
                .to_string();
        let auth = VaultAuth::AppRole {
            mount: "approle".into(),
            role_id,
            secret_id: secret_id.clone().into(),
        };
        assert!(!format!("{auth:?}").contains(&secret_id), "never printed");
        let km = VaultKeyManager::open(config(&bao, "approle-srv", auth))
            .await
            .unwrap();
        km.generate_key("k", KeyType::EcP256).await.unwrap();
        let token = km.current().unwrap().client.settings.token.clone();
        // Past the 3 s TTL: renewed, same token.
        tokio::time::sleep(Duration::from_secs(5)).await;
        km.sign("k", b"m", SignOpts::for_key(KeyType::EcP256))
            .await
            .expect("the token was renewed");
        assert_eq!(
            km.current().unwrap().client.settings.token,
            token,
            "renewed, not replaced"
        );
        // Revoked: the next call is refused, Kame logs in again and the call succeeds.
        bao.cli(&["token", "revoke", &token]);
        km.sign("k", b"m", SignOpts::for_key(KeyType::EcP256))
            .await
            .expect("logged in again");
        assert_ne!(km.current().unwrap().client.settings.token, token);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn vault_sweeps_only_servers_with_a_stale_liveness_marker() {
        let bao = Bao::start();
        let open = |id: &'static str| VaultKeyManager::open(config(&bao, id, root(&bao)));
        let me = open("alive").await.unwrap();
        let dead = open("dead").await.unwrap();
        let unmarked = open("unmarked").await.unwrap();
        // A live server whose id starts with the dead one's, and another application's key
        // whose name starts with the dead server's prefix.
        let dead2 = open("dead-2").await.unwrap();
        for km in [&me, &dead, &unmarked, &dead2] {
            km.generate_key("k", KeyType::EcP256).await.unwrap();
        }
        bao.cli(&[
            "write",
            "-f",
            "transit/keys/dead-payments",
            "type=ecdsa-p256",
        ]);
        me.refresh().await.unwrap();
        dead.refresh().await.unwrap();
        dead.refresh().await.unwrap();
        let one_version = bao.json(&["read", "transit/keys/kame-liveness-dead"]);
        assert_eq!(
            one_version["data"]["latest_version"], 1,
            "the marker stays one version"
        );
        let later = now_secs() + 15 * 86400;
        // Nothing is stale now.
        assert!(me.sweep(now_secs()).await.unwrap().is_empty());
        let swept = me.sweep(later).await.unwrap();
        assert_eq!(
            swept,
            vec![
                dead.key_name("k").unwrap(),
                "kame-liveness-dead".to_string()
            ]
        );
        let names = me.list().await.unwrap();
        assert!(
            names.contains(&"dead-payments".to_string()),
            "not Kame's shape: kept"
        );
        assert!(
            names.contains(&dead2.key_name("k").unwrap()),
            "server dead-2 (no marker) is not taken for server dead"
        );
        let names = me.list().await.unwrap();
        assert!(
            names.contains(&me.key_name("k").unwrap()),
            "own keys are never swept"
        );
        assert!(names.contains(&"kame-liveness-alive".to_string()));
        assert!(
            names.contains(&unmarked.key_name("k").unwrap()),
            "a server without a marker is left alone"
        );
    }

    /// TLS certificate auth over a TLS listener whose CA comes from `ca_cert_path`: a client
    /// certificate from a CA the cert auth method trusts logs in; one from another CA does not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn vault_cert_auth_over_tls_with_ca_cert_path() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let bao = Bao::start_tls();
        let d = bao.dir.path();
        let p = |n: &str| d.join(n).display().to_string();
        let openssl = |args: &[&str]| {
            let o = std::process::Command::new("openssl")
                .args(args)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for ca in ["trusted", "other"] {
            openssl(&[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &p(&format!("{ca}-ca.key")),
                "-out",
                &p(&format!("{ca}-ca.pem")),
                "-subj",
                &format!("/CN={ca} client CA"),
                "-days",
                "1",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign",
            ]);
            openssl(&[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &p(&format!("{ca}-client.key")),
                "-out",
                &p(&format!("{ca}-client.csr")),
                "-subj",
                "/CN=kame-server",
            ]);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &p(&format!("{ca}-client.csr")),
                "-CA",
                &p(&format!("{ca}-ca.pem")),
                "-CAkey",
                &p(&format!("{ca}-ca.key")),
                "-days",
                "1",
                "-extfile",
                &p("client.ext"),
                "-out",
                &p(&format!("{ca}-client.pem")),
            ]);
        }
        let policy = d.join("kame.hcl");
        std::fs::write(
            &policy,
            "path \"transit/*\" { capabilities = [\"create\", \"read\", \"update\", \"delete\", \"list\"] }\n",
        )
        .unwrap();
        bao.cli(&["policy", "write", "kame", &policy.display().to_string()]);
        bao.cli(&["auth", "enable", "cert"]);
        bao.cli(&[
            "write",
            "auth/cert/certs/kame",
            "token_policies=kame",
            &format!("certificate=@{}", p("trusted-ca.pem")),
        ]);
        let cfg = |who: &str| VaultConfig {
            vault_addr: bao.addr.clone(),
            namespace: None,
            ca_cert_path: Some(bao.tls_ca()),
            insecure_skip_verify: false,
            transit_engine_path: "transit".into(),
            auth: VaultAuth::Cert {
                mount: "cert".into(),
                role_name: "kame".into(),
                client_cert_path: d.join(format!("{who}-client.pem")),
                client_key_path: d.join(format!("{who}-client.key")),
            },
            server_id: "cert-srv".into(),
            call_timeout: Duration::from_secs(5),
        };
        let km = VaultKeyManager::open(cfg("trusted")).await.unwrap();
        let pk = km.generate_key("k", KeyType::EcP256).await.unwrap();
        let sig = km
            .sign("k", b"m", SignOpts::for_key(KeyType::EcP256))
            .await
            .unwrap();
        aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
            &pk.spki_der,
        )
        .verify(b"m", &sig.bytes)
        .unwrap();
        let e = VaultKeyManager::open(cfg("other"))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("cert login"), "{e}");
        // Without the CA, Vault's certificate is not trusted.
        let mut c = cfg("trusted");
        c.ca_cert_path = None;
        assert!(VaultKeyManager::open(c).await.is_err());
    }

    /// Kubernetes auth cannot run here: the login request Kame sends is checked on a socket.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn vault_kubernetes_login_request_shape() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let captured = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 16384];
            let mut got = vec![];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got).to_string();
                if let Some(i) = text.find("\r\n\r\n") {
                    let len = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if got.len() >= i + 4 + len {
                        break;
                    }
                }
                if n == 0 {
                    break;
                }
            }
            let body = r#"{"errors":["test refusal"]}"#;
            let _ = s
                .write_all(
                    format!(
                        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await;
            String::from_utf8_lossy(&got).to_string()
        });
        let dir = tempfile::tempdir().unwrap();
        let token_path = dir.path().join("token");
        std::fs::write(&token_path, "sa.jwt.value\n").unwrap();
        let cfg = VaultConfig {
            vault_addr: format!("http://127.0.0.1:{port}"),
            namespace: Some("team-a".into()),
            ca_cert_path: None,
            insecure_skip_verify: false,
            transit_engine_path: "transit".into(),
            auth: VaultAuth::Kubernetes {
                mount: "kubernetes".into(),
                role: "kame-server".into(),
                token_path,
            },
            server_id: "s".into(),
            call_timeout: Duration::from_secs(5),
        };
        let e = VaultKeyManager::open(cfg).await.unwrap_err().to_string();
        assert!(
            e.contains("Kubernetes login") && e.contains("test refusal"),
            "{e}"
        );
        let req = captured.await.unwrap();
        assert!(req.starts_with("POST /v1/auth/kubernetes/login "), "{req}");
        assert!(
            req.to_ascii_lowercase()
                .contains("x-vault-namespace: team-a"),
            "{req}"
        );
        let body: serde_json::Value =
            serde_json::from_str(&req[req.find("\r\n\r\n").unwrap() + 4..]).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"role": "kame-server", "jwt": "sa.jwt.value"})
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn vault_unreachable_is_unavailable_fast() {
        let mut bao = Bao::start();
        let km = VaultKeyManager::open(config(&bao, "s", root(&bao)))
            .await
            .unwrap();
        km.generate_key("k", KeyType::EcP256).await.unwrap();
        bao.stop();
        let t = std::time::Instant::now();
        let e = km
            .sign("k", b"m", SignOpts::for_key(KeyType::EcP256))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Unavailable(_)), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    }
}
