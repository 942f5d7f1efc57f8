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

mod client;
mod naming;
mod sweep;
pub use client::{VaultConnection, VaultSession, VaultSessions};
pub use naming::*;

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

pub struct VaultKeyManager {
    cfg: VaultConfig,
    session: Arc<VaultSession>,
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

#[cfg(test)]
fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl VaultConfig {
    /// The part of the settings that says how to reach and log in to Vault.
    pub fn connection(&self) -> VaultConnection {
        VaultConnection {
            vault_addr: self.vault_addr.clone(),
            namespace: self.namespace.clone(),
            ca_cert_path: self.ca_cert_path.clone(),
            insecure_skip_verify: self.insecure_skip_verify,
            auth: self.auth.clone(),
            call_timeout: self.call_timeout,
        }
    }
}

impl VaultKeyManager {
    /// Logs in (a session of its own), loads this server's keys.
    pub async fn open(cfg: VaultConfig) -> Result<Arc<Self>> {
        let session = VaultSession::open(cfg.connection()).await?;
        Self::open_with(cfg, session).await
    }

    /// Loads this server's keys through `session` (shared with other users of the same Vault,
    /// e.g. [`VaultSessions::get_or_open`]); the connection settings of `cfg` are not used.
    pub async fn open_with(cfg: VaultConfig, session: Arc<VaultSession>) -> Result<Arc<Self>> {
        if cfg.server_id.is_empty() || cfg.server_id.contains(char::is_whitespace) {
            return Err(Error::Config(
                "hashicorp_vault: a server id is required".into(),
            ));
        }
        let km = Arc::new(VaultKeyManager {
            cfg,
            session,
            keys: crate::cache::KeyCache::new(),
            leftovers: RwLock::new(vec![]),
            inflight: tokio::sync::Semaphore::new(crate::MAX_INFLIGHT_SIGNS),
        });
        km.load().await?;
        Ok(km)
    }

    /// Runs a Vault call through the session (see [`VaultSession::call`]).
    pub(super) async fn call<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: Fn(Arc<VaultClient>) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        self.session.call(f).await
    }

    pub(super) async fn post(
        &self,
        path: String,
        body: serde_json::Value,
    ) -> Result<serde_json::Value> {
        self.session.post(path, body).await
    }

    /// The session this key manager uses.
    pub fn session(&self) -> &Arc<VaultSession> {
        &self.session
    }
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
mod tests;
