//! The agent's plugin catalogue (SPIRE's `pkg/agent/catalog`): the built-in node attestors by
//! name and how each is built from its `plugin_data`. Each plugin owns its configuration and
//! refuses unknown keys, so errors name the full path. Adding a plugin is one module and one
//! line here. It holds no state.

use crate::attestation::AgentAttestor;
use kame_api::conf::{ConfigError, Section};
use std::sync::Arc;

/// Builds a node attestor from its `plugin_data`.
pub type NodeAttestorBuilder = fn(Section) -> Result<Arc<dyn AgentAttestor>, ConfigError>;

/// The built-in node attestors besides `join_token`, which the agent speaks itself.
pub const NODE_ATTESTORS: &[(&str, NodeAttestorBuilder)] = &[
    (crate::tpm_devid::TYPE, crate::tpm_devid::plugin),
    (crate::x509pop::TYPE, crate::x509pop::plugin),
];

/// The node attestor named `name`, built from `data`; None for an unknown name.
pub fn node_attestor(
    name: &str,
    data: Section,
) -> Option<Result<Arc<dyn AgentAttestor>, ConfigError>> {
    kame_api::conf::builtin(NODE_ATTESTORS, name).map(|build| build(data))
}

/// Every node attestor name a configuration may use, for error messages.
pub fn node_attestor_names() -> String {
    kame_api::conf::builtin_names(&["join_token"], NODE_ATTESTORS)
}
