//! The server's plugin catalogue (SPIRE's `pkg/server/catalog`): for each plugin type, the
//! built-in plugins by name and how each is built from its `plugin_data`. Each plugin owns its
//! configuration: it reads its keys from its own [`Section`], checks them (files included)
//! and refuses unknown ones, so errors name the full path
//! (`plugins.NodeAttestor.x509pop.plugin_data.ca_bundle_pth: unknown key`). Adding a plugin is
//! one module and one line here. It holds no state and serves no requests.
//!
//! The KeyManager backends that pull in large client libraries (AWS KMS, Vault, PKCS#11) are
//! cargo features of `kame-server`, on by default; a build without one does not list it.

use crate::attestation::NodeAttestor;
use crate::datastore::sql::DataStorePlugin;
use crate::keymanager::KeyManagerPlugin;
use crate::upstream::UpstreamAuthority;
use kame_api::TrustDomain;
use kame_api::conf::{ConfigError, Section};
use std::path::PathBuf;
use std::sync::Arc;

pub mod files;

/// What a plugin may know when it is built.
#[derive(Debug, Clone)]
pub struct PluginEnv {
    pub trust_domain: TrustDomain,
    /// `server.data_dir`: created at start, so files a plugin will create may live there.
    pub data_dir: PathBuf,
    /// The trust domain's X.509 authorities as the server holds them now: set when the CA
    /// starts, read by plugins that verify against the server's own bundle.
    pub trust_bundle: TrustBundle,
    /// Vault sessions shared by the plugins that reach the same Vault the same way.
    #[cfg(feature = "hashicorp_vault")]
    pub vault_sessions: kame_keymanager::hashicorp_vault::VaultSessions,
}

impl PluginEnv {
    pub fn new(trust_domain: TrustDomain) -> Self {
        PluginEnv {
            trust_domain,
            data_dir: PathBuf::from("."),
            trust_bundle: TrustBundle::default(),
            #[cfg(feature = "hashicorp_vault")]
            vault_sessions: Default::default(),
        }
    }
}

type Roots = Arc<dyn Fn() -> Vec<Vec<u8>> + Send + Sync>;

/// A late-bound view of the server's current X.509 authorities (DER).
#[derive(Clone, Default)]
pub struct TrustBundle(Arc<std::sync::OnceLock<Roots>>);

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TrustBundle")
    }
}

impl TrustBundle {
    /// Connects the view to its source (once; later calls change nothing).
    pub fn connect(&self, roots: impl Fn() -> Vec<Vec<u8>> + Send + Sync + 'static) {
        let _ = self.0.set(Arc::new(roots));
    }

    /// The authorities now; empty before the CA has started.
    pub fn roots(&self) -> Vec<Vec<u8>> {
        self.0.get().map(|f| f()).unwrap_or_default()
    }
}

/// Builds a node attestor from its `plugin_data`.
pub type NodeAttestorBuilder =
    fn(&PluginEnv, Section) -> Result<Arc<dyn NodeAttestor>, ConfigError>;

/// The built-in node attestors besides `join_token`, which the Agent API serves itself.
pub const NODE_ATTESTORS: &[(&str, NodeAttestorBuilder)] = &[
    (
        crate::attestation::tpm_devid::TYPE,
        crate::attestation::tpm_devid::plugin,
    ),
    (
        crate::attestation::x509pop::TYPE,
        crate::attestation::x509pop::plugin,
    ),
];

/// The node attestor named `name`, built from `data`; None for an unknown name.
pub fn node_attestor(
    name: &str,
    env: &PluginEnv,
    data: Section,
) -> Option<Result<Arc<dyn NodeAttestor>, ConfigError>> {
    kame_api::conf::builtin(NODE_ATTESTORS, name).map(|build| build(env, data))
}

/// Every node attestor name a configuration may use, for error messages.
pub fn node_attestor_names() -> String {
    kame_api::conf::builtin_names(&["join_token"], NODE_ATTESTORS)
}

/// Builds a plugin of type `P` from its `plugin_data`.
pub type Builder<P> = fn(&PluginEnv, Section) -> Result<Arc<P>, ConfigError>;

/// Builds a KeyManager from its `plugin_data`.
pub type KeyManagerBuilder = Builder<dyn KeyManagerPlugin>;

/// The built-in KeyManagers.
pub const KEY_MANAGERS: &[(&str, KeyManagerBuilder)] = &[
    (
        crate::keymanager::disk::TYPE,
        crate::keymanager::disk::plugin,
    ),
    (
        crate::keymanager::memory::TYPE,
        crate::keymanager::memory::plugin,
    ),
    #[cfg(feature = "aws_kms")]
    (
        crate::keymanager::aws_kms::TYPE,
        crate::keymanager::aws_kms::plugin,
    ),
    #[cfg(feature = "hashicorp_vault")]
    (
        crate::keymanager::hashicorp_vault::TYPE,
        crate::keymanager::hashicorp_vault::plugin,
    ),
    #[cfg(feature = "pkcs11")]
    (
        crate::keymanager::pkcs11::TYPE,
        crate::keymanager::pkcs11::plugin,
    ),
];

/// Builds a DataStore from its `plugin_data`.
pub type DataStoreBuilder = Builder<dyn DataStorePlugin>;

/// The built-in DataStores.
pub const DATA_STORES: &[(&str, DataStoreBuilder)] =
    &[(crate::datastore::sql::TYPE, crate::datastore::sql::plugin)];

/// Builds an UpstreamAuthority from its `plugin_data`.
pub type UpstreamAuthorityBuilder = Builder<dyn UpstreamAuthority>;

/// The built-in UpstreamAuthorities (the seam and backends are the `kame-upstream` crate).
pub const UPSTREAM_AUTHORITIES: &[(&str, UpstreamAuthorityBuilder)] = &[
    (crate::upstream::disk::TYPE, crate::upstream::disk::plugin),
    (crate::upstream::spire::TYPE, crate::upstream::spire::plugin),
    #[cfg(feature = "aws_pca")]
    (
        crate::upstream::aws_pca::TYPE,
        crate::upstream::aws_pca::plugin,
    ),
    #[cfg(feature = "hashicorp_vault")]
    (crate::upstream::vault::TYPE, crate::upstream::vault::plugin),
];

/// At most one plugin of `kind` in `plugins` (none: `None`), built by `table`; more than one,
/// or an unknown name, is an error as for [`single`].
pub fn optional<P: ?Sized>(
    plugins: &mut Section,
    kind: &str,
    table: &[(&str, Builder<P>)],
    env: &PluginEnv,
) -> Result<Option<Arc<P>>, ConfigError> {
    if plugins.has(kind) {
        single(plugins, kind, table, env).map(Some)
    } else {
        Ok(None)
    }
}

/// The one plugin of `kind` (`KeyManager`, `DataStore`) in `plugins`, built by `table`:
/// none, more than one, or an unknown name is an error naming `plugins.<kind>` and, for an
/// unknown name, the known ones.
pub fn single<P: ?Sized>(
    plugins: &mut Section,
    kind: &str,
    table: &[(&str, Builder<P>)],
    env: &PluginEnv,
) -> Result<Arc<P>, ConfigError> {
    let (build, data) = kame_api::conf::single_builtin("kame-server", plugins, kind, table)?;
    build(env, data)
}
