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

/// `UpstreamAuthority "spire"` (nested): `server_address`, `server_port`, `workload_api_socket`
/// and SPIRE's `experimental { }` block (`require_pq_kem = true` and Windows named pipes are
/// refused: not supported). Nothing is contacted until the CA is signed at start.
pub mod spire {
    use super::*;
    pub use kame_upstream::spire::TYPE;
    use kame_upstream::spire::{SpireConfig, SpireUpstream};

    pub fn plugin(
        env: &PluginEnv,
        mut data: Section,
    ) -> Result<Arc<dyn UpstreamAuthority>, ConfigError> {
        let server_address = data.required("server_address")?;
        let port_key = data.key("server_port");
        let server_port = match data.int("server_port")? {
            None => return Err(data.missing("server_port")),
            Some(p) => u16::try_from(p)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| kame_api::conf::invalid(&port_key, format!("{p} is not a port")))?,
        };
        let workload_api_socket = std::path::PathBuf::from(data.required("workload_api_socket")?);
        if !workload_api_socket.is_absolute() {
            return Err(kame_api::conf::invalid(
                &data.key("workload_api_socket"),
                "must be an absolute path",
            ));
        }
        if let Some(x) = data.section("experimental")? {
            if x.nonempty("workload_api_named_pipe_name")?.is_some() {
                return Err(kame_api::conf::invalid(
                    &x.key("workload_api_named_pipe_name"),
                    "named pipes are Windows only; use workload_api_socket",
                ));
            }
            if x.take_bool("require_pq_kem")?.unwrap_or(false) {
                return Err(kame_api::conf::invalid(
                    &x.key("require_pq_kem"),
                    "post-quantum key exchange is not supported",
                ));
            }
            x.finish()?;
        }
        data.finish()?;
        let up = SpireUpstream::new(
            SpireConfig {
                server_address,
                server_port,
                workload_api_socket,
            },
            &env.trust_domain,
        )
        .map_err(|e| kame_api::conf::invalid(&port_key, e.to_string()))?;
        Ok(Arc::new(up))
    }
}

/// `UpstreamAuthority "aws_pca"`: `region`, `certificate_authority_arn`,
/// `ca_signing_template_arn`, `signing_algorithm`, `assume_role_arn`, `endpoint`,
/// `supplemental_bundle_path` (read now), and (Kame's addition, as for the aws_kms KeyManager)
/// `access_key_id` with `secret_access_key`. AWS is first contacted when the CA is signed.
#[cfg(feature = "aws_pca")]
pub mod aws_pca {
    use super::*;
    pub use kame_upstream::aws_pca::TYPE;
    use kame_upstream::aws_pca::{AwsPcaConfig, AwsPcaUpstream};

    pub fn plugin(
        _env: &PluginEnv,
        data: Section,
    ) -> Result<Arc<dyn UpstreamAuthority>, ConfigError> {
        let region = data.required("region")?;
        let certificate_authority_arn = data.required("certificate_authority_arn")?;
        let access_key_id = data.nonempty("access_key_id")?;
        let secret_access_key = data
            .nonempty("secret_access_key")?
            .map(kame_api::Secret::new);
        if access_key_id.is_some() != secret_access_key.is_some() {
            return Err(kame_api::conf::invalid(
                &data.key("secret_access_key"),
                "give both access_key_id and secret_access_key, or neither (the default AWS credential chain)",
            ));
        }
        let supplemental_bundle_path = optional_path(&data, "supplemental_bundle_path")?;
        let supplemental_roots = match &supplemental_bundle_path {
            None => vec![],
            Some(p) => {
                let key = data.key("supplemental_bundle_path");
                let text = crate::catalog::files::read_text(&key, p)?;
                let certs = kame_api::bundle::certs_from_pem(&text)
                    .map_err(|e| kame_api::conf::invalid(&key, format!("{}: {e}", p.display())))?;
                if certs.is_empty() {
                    return Err(kame_api::conf::invalid(
                        &key,
                        format!("{}: no certificate", p.display()),
                    ));
                }
                certs
            }
        };
        let cfg = AwsPcaConfig {
            region,
            certificate_authority_arn,
            ca_signing_template_arn: data.nonempty("ca_signing_template_arn")?,
            signing_algorithm: data.nonempty("signing_algorithm")?,
            assume_role_arn: data.nonempty("assume_role_arn")?,
            endpoint: data.nonempty("endpoint")?,
            supplemental_roots,
            supplemental_bundle_path,
            access_key_id,
            secret_access_key,
            call_timeout: crate::keymanager::CALL_TIMEOUT,
        };
        data.finish()?;
        Ok(Arc::new(AwsPcaUpstream::new(cfg)))
    }
}
