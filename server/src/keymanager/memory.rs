//! `KeyManager "memory"`: keys in process memory, lost at exit (SPIRE's; tests and demos).
//! It takes no settings.

use super::{KeyManagerPlugin, OpenContext};
use crate::catalog::PluginEnv;
use crate::run::RunError;
use kame_api::conf::{ConfigError, Section};
use kame_keymanager::KeyManager;
use std::sync::Arc;

/// The plugin's name in configuration.
pub const TYPE: &str = "memory";

#[derive(Debug)]
pub struct Memory;

/// Builds `KeyManager "memory"`: its `plugin_data` must be empty.
pub fn plugin(_env: &PluginEnv, data: Section) -> Result<Arc<dyn KeyManagerPlugin>, ConfigError> {
    data.finish()?;
    Ok(Arc::new(Memory))
}

#[async_trait::async_trait]
impl KeyManagerPlugin for Memory {
    async fn open(&self, _ctx: OpenContext<'_>) -> Result<Arc<dyn KeyManager>, RunError> {
        Ok(Arc::new(kame_keymanager::memory::MemoryKeyManager::new()))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
