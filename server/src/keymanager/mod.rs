//! The server's KeyManager plugins: for each backend, its `plugin_data` (SPIRE's keys), checked
//! when the configuration loads (files included), and how it is opened at start. The backends
//! themselves live in `kame-keymanager`; this module only configures them. It holds no keys
//! and signs nothing.

use crate::run::RunError;
use kame_api::conf::{ConfigError, Section, invalid};
use kame_api::{Secret, TrustDomain};
use kame_keymanager::KeyManager;
use std::path::PathBuf;
use std::sync::Arc;

#[cfg(feature = "aws_kms")]
pub mod aws_kms;
pub mod disk;
#[cfg(feature = "hashicorp_vault")]
pub mod hashicorp_vault;
pub mod memory;
#[cfg(feature = "pkcs11")]
pub mod pkcs11;

/// What a KeyManager needs to open: known only once the server starts.
#[derive(Debug, Clone, Copy)]
pub struct OpenContext<'a> {
    pub trust_domain: &'a TrustDomain,
    /// This server's id (`data_dir/server_id`).
    pub server_id: &'a str,
}

/// A configured KeyManager backend, ready to open.
#[async_trait::async_trait]
pub trait KeyManagerPlugin: Send + Sync + std::fmt::Debug {
    /// Opens the backend: reads its key file, logs in to its service or token.
    async fn open(&self, ctx: OpenContext<'_>) -> Result<Arc<dyn KeyManager>, RunError>;

    /// The concrete configuration (for tests that check what was parsed).
    fn as_any(&self) -> &dyn std::any::Any;
}

/// How a remote KeyManager names this server's keys (SPIRE's `key_identifier_file` xor
/// `key_identifier_value`); without either, the server id in `data_dir/server_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyIdentifier {
    File(PathBuf),
    Value(String),
    ServerId,
}

impl KeyIdentifier {
    /// SPIRE's keys; `key_identifier_value` only letters, digits, `/`, `_`, `-`, at most 256;
    /// `key_identifier_file`'s directory must exist (the file is created on first start).
    pub fn parse(data: &Section, data_dir: &std::path::Path) -> Result<Self, ConfigError> {
        let file = data.nonempty("key_identifier_file")?;
        let value = data.nonempty("key_identifier_value")?;
        match (file, value) {
            (Some(_), Some(_)) => Err(invalid(
                &data.key("key_identifier_value"),
                "give key_identifier_file or key_identifier_value, not both",
            )),
            (Some(f), None) => {
                let path = PathBuf::from(f);
                crate::catalog::files::creatable(
                    &data.key("key_identifier_file"),
                    &path,
                    data_dir,
                )?;
                Ok(KeyIdentifier::File(path))
            }
            (None, Some(v)) => {
                if v.len() > 256
                    || !v
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"/_-".contains(&b))
                {
                    return Err(invalid(
                        &data.key("key_identifier_value"),
                        "only letters, digits, '/', '_' and '-', at most 256 characters",
                    ));
                }
                Ok(KeyIdentifier::Value(v))
            }
            (None, None) => Ok(KeyIdentifier::ServerId),
        }
    }

    /// The name this server's keys are filed under: the value, the UUID kept in the file
    /// (created 0600 on first start), or the server id.
    pub fn resolve(&self, server_id: &str) -> Result<String, RunError> {
        match self {
            KeyIdentifier::Value(v) => Ok(v.clone()),
            KeyIdentifier::ServerId => Ok(server_id.to_string()),
            KeyIdentifier::File(path) => crate::run::uuid_file(path),
        }
    }
}

/// Where a secret comes from: the configuration itself, a file, or an environment variable.
/// A file must be readable when the configuration loads; its content and the variable are
/// read at start-up only, never by `validate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Value(Secret),
    File(PathBuf),
    Env(String),
}

impl SecretSource {
    /// Exactly one of `<name>`, `<name>_file`, `<name>_env`.
    pub fn parse(data: &Section, name: &str) -> Result<Self, ConfigError> {
        let v = data.nonempty(name)?;
        let file_key = format!("{name}_file");
        let f = data.nonempty(&file_key)?;
        let e = data.nonempty(&format!("{name}_env"))?;
        match (v, f, e) {
            (Some(v), None, None) => Ok(SecretSource::Value(Secret::new(v))),
            (None, Some(f), None) => {
                let path = PathBuf::from(f);
                crate::catalog::files::readable(&data.key(&file_key), &path)?;
                Ok(SecretSource::File(path))
            }
            (None, None, Some(e)) => Ok(SecretSource::Env(e)),
            (None, None, None) => Err(data.missing(name)),
            _ => Err(invalid(
                &data.key(name),
                format!("give one of {name}, {name}_file, {name}_env"),
            )),
        }
    }

    /// The secret (a file's content without its trailing newline).
    pub fn read(&self) -> Result<Secret, String> {
        match self {
            SecretSource::Value(v) => Ok(v.clone()),
            SecretSource::File(p) => std::fs::read_to_string(p)
                .map(|s| Secret::new(zeroize::Zeroizing::new(s).trim_end_matches(['\n', '\r'])))
                .map_err(|e| format!("cannot read {}: {e}", p.display())),
            SecretSource::Env(v) => std::env::var(v)
                .map(Secret::new)
                .map_err(|_| format!("environment variable {v} is not set")),
        }
    }
}

/// How long one call to a remote KeyManager may take.
#[cfg(any(feature = "aws_kms", feature = "hashicorp_vault", feature = "aws_pca"))]
pub(crate) const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
