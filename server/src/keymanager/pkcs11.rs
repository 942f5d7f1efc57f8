//! `KeyManager "pkcs11"`: keys in an HSM token (Kame's; SPIRE has no built-in). The module
//! must be a readable file when the configuration loads; the user PIN comes from the
//! configuration, a file or an environment variable and is never printed.

use super::{KeyIdentifier, KeyManagerPlugin, OpenContext, SecretSource};
use crate::catalog::PluginEnv;
use crate::run::RunError;
use kame_api::conf::{ConfigError, Section};
use kame_keymanager::KeyManager;
use std::path::PathBuf;
use std::sync::Arc;

/// The plugin's name in configuration.
pub const TYPE: &str = "pkcs11";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11 {
    pub module_path: PathBuf,
    pub token_label: String,
    pub user_pin: SecretSource,
    pub key_identifier: KeyIdentifier,
}

/// Builds `KeyManager "pkcs11"` from its `plugin_data`.
pub fn plugin(env: &PluginEnv, data: Section) -> Result<Arc<dyn KeyManagerPlugin>, ConfigError> {
    let module_path = PathBuf::from(data.required("module_path")?);
    crate::catalog::files::readable(&data.key("module_path"), &module_path)?;
    let token_label = data.required("token_label")?;
    let user_pin = SecretSource::parse(&data, "user_pin")?;
    let key_identifier = KeyIdentifier::parse(&data, &env.data_dir)?;
    data.finish()?;
    Ok(Arc::new(Pkcs11 {
        module_path,
        token_label,
        user_pin,
        key_identifier,
    }))
}

#[async_trait::async_trait]
impl KeyManagerPlugin for Pkcs11 {
    async fn open(&self, ctx: OpenContext<'_>) -> Result<Arc<dyn KeyManager>, RunError> {
        let user_pin = self.user_pin.read().map_err(|m| {
            RunError::KeyManager(kame_keymanager::Error::Config(format!(
                "plugins.KeyManager.pkcs11.plugin_data.user_pin: {m}"
            )))
        })?;
        Ok(Arc::new(
            kame_keymanager::pkcs11::Pkcs11KeyManager::open(
                kame_keymanager::pkcs11::Pkcs11Config {
                    module_path: self.module_path.clone(),
                    token_label: self.token_label.clone(),
                    user_pin,
                    server_id: self.key_identifier.resolve(ctx.server_id)?,
                },
            )
            .await?,
        ))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
