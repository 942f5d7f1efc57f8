//! `KeyManager "hashicorp_vault"`: keys in a Vault/OpenBao Transit engine (SPIRE's keys;
//! exactly one auth block). Files it names (the CA certificate, a client certificate and
//! key, a service account token) must be readable when the configuration loads; secrets are
//! never printed.

use super::{KeyIdentifier, KeyManagerPlugin, OpenContext};
use crate::catalog::PluginEnv;
use crate::catalog::files::readable;
use crate::run::RunError;
use kame_api::Secret;
use kame_api::conf::{ConfigError, Section, invalid};
use kame_keymanager::KeyManager;
use kame_keymanager::hashicorp_vault::{
    VaultAuth, VaultConfig, VaultConnection, VaultKeyManager, VaultSessions,
};
use std::path::PathBuf;
use std::sync::Arc;

/// The plugin's name in configuration.
pub const TYPE: &str = "hashicorp_vault";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashicorpVault {
    pub vault_addr: String,
    pub namespace: Option<String>,
    pub ca_cert_path: Option<PathBuf>,
    pub insecure_skip_verify: bool,
    pub transit_engine_path: String,
    pub auth: VaultAuth,
    pub key_identifier: KeyIdentifier,
    /// The server's Vault sessions (one login shared with an UpstreamAuthority "vault" that
    /// reaches the same Vault the same way).
    pub sessions: VaultSessions,
}

/// Builds `KeyManager "hashicorp_vault"` from its `plugin_data`.
pub fn plugin(env: &PluginEnv, data: Section) -> Result<Arc<dyn KeyManagerPlugin>, ConfigError> {
    Ok(Arc::new(config(env, data)?))
}

/// A path under `key` in `data` that must be a readable file.
fn readable_path(data: &Section, key: &str) -> Result<PathBuf, ConfigError> {
    let p = PathBuf::from(data.required(key)?);
    readable(&data.key(key), &p)?;
    Ok(p)
}

/// The auth blocks; exactly one must be configured.
fn auth(data: &mut Section) -> Result<VaultAuth, ConfigError> {
    let mut auths = vec![];
    if let Some(a) = data.section("token_auth")? {
        auths.push(VaultAuth::Token(Secret::new(a.required("token")?)));
        a.finish()?;
    }
    if let Some(a) = data.section("approle_auth")? {
        auths.push(VaultAuth::AppRole {
            mount: a
                .nonempty("approle_auth_mount_point")?
                .unwrap_or_else(|| "approle".into()),
            role_id: a.required("approle_id")?,
            secret_id: Secret::new(a.required("approle_secret_id")?),
        });
        a.finish()?;
    }
    if let Some(a) = data.section("cert_auth")? {
        auths.push(VaultAuth::Cert {
            mount: a
                .nonempty("cert_auth_mount_point")?
                .unwrap_or_else(|| "cert".into()),
            role_name: a.nonempty("cert_auth_role_name")?.unwrap_or_default(),
            client_cert_path: readable_path(&a, "client_cert_path")?,
            client_key_path: readable_path(&a, "client_key_path")?,
        });
        a.finish()?;
    }
    if let Some(a) = data.section("k8s_auth")? {
        auths.push(VaultAuth::Kubernetes {
            mount: a
                .nonempty("k8s_auth_mount_point")?
                .unwrap_or_else(|| "kubernetes".into()),
            role: a.required("k8s_auth_role_name")?,
            token_path: readable_path(&a, "token_path")?,
        });
        a.finish()?;
    }
    match auths.pop() {
        Some(a) if auths.is_empty() => Ok(a),
        _ => Err(invalid(
            &data.key("token_auth"),
            "configure exactly one of token_auth, approle_auth, cert_auth, k8s_auth",
        )),
    }
}

/// The keys that say how to reach and log in to Vault, shared by `KeyManager
/// "hashicorp_vault"` and `UpstreamAuthority "vault"`: `vault_addr`, `namespace`,
/// `ca_cert_path`, `insecure_skip_verify` and exactly one auth block.
pub(crate) fn connection(data: &mut Section) -> Result<VaultConnection, ConfigError> {
    let vault_addr = data.required("vault_addr")?;
    let namespace = data.nonempty("namespace")?;
    let ca_cert_path = match data.nonempty("ca_cert_path")? {
        None => None,
        Some(_) => Some(readable_path(data, "ca_cert_path")?),
    };
    let insecure_skip_verify = data.take_bool("insecure_skip_verify")?.unwrap_or(false);
    let auth = auth(data)?;
    Ok(VaultConnection {
        vault_addr,
        namespace,
        ca_cert_path,
        insecure_skip_verify,
        auth,
        call_timeout: super::CALL_TIMEOUT,
    })
}

fn config(env: &PluginEnv, mut data: Section) -> Result<HashicorpVault, ConfigError> {
    let transit_engine_path = data
        .nonempty("transit_engine_path")?
        .unwrap_or_else(|| "transit".into());
    let key_identifier = KeyIdentifier::parse(&data, &env.data_dir)?;
    let c = connection(&mut data)?;
    data.finish()?;
    Ok(HashicorpVault {
        vault_addr: c.vault_addr,
        namespace: c.namespace,
        ca_cert_path: c.ca_cert_path,
        insecure_skip_verify: c.insecure_skip_verify,
        transit_engine_path,
        auth: c.auth,
        key_identifier,
        sessions: env.vault_sessions.clone(),
    })
}

#[async_trait::async_trait]
impl KeyManagerPlugin for HashicorpVault {
    async fn open(&self, ctx: OpenContext<'_>) -> Result<Arc<dyn KeyManager>, RunError> {
        let cfg = VaultConfig {
            vault_addr: self.vault_addr.clone(),
            namespace: self.namespace.clone(),
            ca_cert_path: self.ca_cert_path.clone(),
            insecure_skip_verify: self.insecure_skip_verify,
            transit_engine_path: self.transit_engine_path.clone(),
            auth: self.auth.clone(),
            server_id: self.key_identifier.resolve(ctx.server_id)?,
            call_timeout: super::CALL_TIMEOUT,
        };
        let session = self.sessions.get_or_open(&cfg.connection()).await?;
        Ok(VaultKeyManager::open_with(cfg, session).await?)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
