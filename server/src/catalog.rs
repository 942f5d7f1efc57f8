//! The server's plugin catalogue (SPIRE's `pkg/server/catalog`): for each plugin type, the
//! built-in plugins by name and how each is built from its `plugin_data`. Each plugin owns its
//! configuration: it reads its keys from its own [`Section`], checks them (files included)
//! and refuses unknown ones, so errors name the full path
//! (`plugins.NodeAttestor.x509pop.plugin_data.ca_bundle_pth: unknown key`). Adding a plugin is
//! one module and one line here. It holds no state and serves no requests.

use crate::attestation::NodeAttestor;
use kame_api::TrustDomain;
use kame_api::conf::{ConfigError, Section};
use std::sync::Arc;

/// What a plugin may know when it is built.
#[derive(Debug, Clone)]
pub struct PluginEnv {
    pub trust_domain: TrustDomain,
    /// The trust domain's X.509 authorities as the server holds them now: set when the CA
    /// starts, read by plugins that verify against the server's own bundle.
    pub trust_bundle: TrustBundle,
}

impl PluginEnv {
    pub fn new(trust_domain: TrustDomain) -> Self {
        PluginEnv {
            trust_domain,
            trust_bundle: TrustBundle::default(),
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
