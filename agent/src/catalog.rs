//! The agent's plugin catalogue (SPIRE's `pkg/agent/catalog`): the built-in node attestors,
//! KeyManagers and workload attestors by name and how each is built from its `plugin_data`. Each plugin owns its configuration and
//! refuses unknown keys, so errors name the full path. Adding a plugin is one module and one
//! line here. It holds no state.

use crate::attestation::AgentAttestor;
use crate::config::{KeyManagerConfig, UnixAttestorConfig};
use kame_api::conf::{ConfigError, Section};
use std::path::Path;
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

/// Builds a plugin's settings `T` from its `plugin_data` (with `data_dir`).
pub type Builder<T> = fn(&Path, Section) -> Result<T, ConfigError>;

/// Builds a KeyManager's settings from its `plugin_data` (with `data_dir`).
pub type KeyManagerBuilder = Builder<KeyManagerConfig>;

/// The built-in KeyManagers.
pub const KEY_MANAGERS: &[(&str, KeyManagerBuilder)] = &[
    ("disk", crate::config::disk_key_manager),
    ("memory", crate::config::memory_key_manager),
];

/// Builds a workload attestor's settings from its `plugin_data`.
pub type WorkloadAttestorBuilder = Builder<UnixAttestorConfig>;

/// The built-in workload attestors.
pub const WORKLOAD_ATTESTORS: &[(&str, WorkloadAttestorBuilder)] =
    &[("unix", crate::config::unix_workload_attestor)];

/// The one plugin of `kind` in `plugins`, built by `table`: none, more than one, or an
/// unknown name is an error naming `plugins.<kind>` and, for an unknown name, the known ones.
pub fn single<T>(
    plugins: &mut Section,
    kind: &str,
    table: &[(&str, Builder<T>)],
    data_dir: &Path,
) -> Result<T, ConfigError> {
    let (build, data) = kame_api::conf::single_builtin("kame-agent", plugins, kind, table)?;
    build(data_dir, data)
}
