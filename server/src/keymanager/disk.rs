//! `KeyManager "disk"`: keys in one JSON file (SPIRE's `keys_path`), written 0600 and
//! atomically by the backend. Its directory must exist or be `data_dir`, so a typo does not
//! start the server on a fresh key file.

use super::{KeyManagerPlugin, OpenContext};
use crate::catalog::PluginEnv;
use crate::run::RunError;
use kame_api::conf::{ConfigError, Section};
use kame_keymanager::KeyManager;
use std::path::PathBuf;
use std::sync::Arc;

/// The plugin's name in configuration.
pub const TYPE: &str = "disk";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub keys_path: PathBuf,
}

/// Builds `KeyManager "disk"` from its `plugin_data`.
pub fn plugin(env: &PluginEnv, data: Section) -> Result<Arc<dyn KeyManagerPlugin>, ConfigError> {
    let keys_path = PathBuf::from(data.required("keys_path")?);
    crate::catalog::files::creatable(&data.key("keys_path"), &keys_path, &env.data_dir)?;
    data.finish()?;
    Ok(Arc::new(Disk { keys_path }))
}

#[async_trait::async_trait]
impl KeyManagerPlugin for Disk {
    async fn open(&self, _ctx: OpenContext<'_>) -> Result<Arc<dyn KeyManager>, RunError> {
        Ok(Arc::new(kame_keymanager::disk::DiskKeyManager::open(
            &self.keys_path,
        )?))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
