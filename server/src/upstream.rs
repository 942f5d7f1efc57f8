//! The server's UpstreamAuthority plugins (SPIRE's `UpstreamAuthority "<name>" { plugin_data
//! { … } }`): each reads its keys and builds its backend from the `kame-upstream` crate, which
//! holds the seam and the backends. This module reads configuration only; what an upstream
//! answers is checked by the CA (`ca::rotation`).

pub use kame_upstream::{LocalBundle, MintedX509Ca, Updates, UpstreamAuthority, UpstreamError};

use crate::catalog::PluginEnv;
use crate::catalog::files::{optional_path, required_path};
use kame_api::conf::{ConfigError, Section};
use std::sync::Arc;

/// `UpstreamAuthority "disk"`: `cert_file_path`, `key_file_path`, `bundle_file_path`.
pub mod disk {
    use super::*;
    pub use kame_upstream::disk::TYPE;
    use kame_upstream::disk::{DiskConfig, DiskUpstream};

    /// Builds the plugin; the files are read and checked now, so a bad one refuses the
    /// configuration with the reason.
    pub fn plugin(
        env: &PluginEnv,
        data: Section,
    ) -> Result<Arc<dyn UpstreamAuthority>, ConfigError> {
        let cfg = DiskConfig {
            cert_file_path: required_path(&data, "cert_file_path")?,
            key_file_path: required_path(&data, "key_file_path")?,
            bundle_file_path: optional_path(&data, "bundle_file_path")?,
        };
        let key = data.key("cert_file_path");
        data.finish()?;
        let up = DiskUpstream::open(cfg, env.trust_domain.clone())
            .map_err(|e| kame_api::conf::invalid(&key, e.to_string()))?;
        Ok(Arc::new(up))
    }
}

/// `UpstreamAuthority "vault"`: `pki_mount_point` and the connection and auth keys of `KeyManager
/// "hashicorp_vault"`. Files it names must be readable now; Vault is first contacted at the
/// first CSR.
#[cfg(feature = "hashicorp_vault")]
pub mod vault {
    use super::*;
    pub use kame_upstream::vault::TYPE;
    use kame_upstream::vault::{VaultPkiConfig, VaultUpstream};

    pub fn plugin(
        env: &PluginEnv,
        mut data: Section,
    ) -> Result<Arc<dyn UpstreamAuthority>, ConfigError> {
        let pki_mount_point = data
            .nonempty("pki_mount_point")?
            .unwrap_or_else(|| "pki".into());
        let connection = crate::keymanager::hashicorp_vault::connection(&mut data)?;
        data.finish()?;
        Ok(Arc::new(VaultUpstream::new(
            VaultPkiConfig {
                connection,
                pki_mount_point,
            },
            env.trust_domain.clone(),
            env.vault_sessions.clone(),
        )))
    }
}
