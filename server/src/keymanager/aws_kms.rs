//! `KeyManager "aws_kms"`: keys in AWS KMS (SPIRE's keys, plus `endpoint` for a
//! KMS-compatible service). `key_policy_file` is read when the configuration loads; the
//! secret access key, when given, is never printed.

use super::{KeyIdentifier, KeyManagerPlugin, OpenContext, SecretSource};
use crate::catalog::PluginEnv;
use crate::run::RunError;
use kame_api::conf::{ConfigError, Section, invalid};
use kame_keymanager::KeyManager;
use std::path::PathBuf;
use std::sync::Arc;

/// The plugin's name in configuration.
pub const TYPE: &str = "aws_kms";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsKms {
    pub region: String,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<SecretSource>,
    pub endpoint: Option<String>,
    pub key_identifier: KeyIdentifier,
    /// The policy document for new keys, read from `key_policy_file`.
    pub key_policy: Option<String>,
    pub key_tags: Vec<(String, String)>,
    pub enable_tag_based_key_discovery: bool,
}

/// Builds `KeyManager "aws_kms"` from its `plugin_data`.
pub fn plugin(env: &PluginEnv, data: Section) -> Result<Arc<dyn KeyManagerPlugin>, ConfigError> {
    Ok(Arc::new(config(env, data)?))
}

fn config(env: &PluginEnv, mut data: Section) -> Result<AwsKms, ConfigError> {
    let region = data.required("region")?;
    let access_key_id = data.nonempty("access_key_id")?;
    let secret_access_key = data
        .nonempty("secret_access_key")?
        .map(|v| SecretSource::Value(kame_api::Secret::new(v)));
    if access_key_id.is_some() != secret_access_key.is_some() {
        return Err(invalid(
            &data.key("secret_access_key"),
            "give both access_key_id and secret_access_key, or neither (the default AWS credential chain)",
        ));
    }
    let mut key_tags = vec![];
    if let Some(tags) = data.section("key_tags")? {
        for k in tags.keys() {
            key_tags.push((k.clone(), tags.string(&k)?.unwrap_or_default()));
        }
        tags.finish()?;
    }
    kame_keymanager::aws_kms::check_user_tags(&key_tags)
        .map_err(|e| invalid(&data.key("key_tags"), e.to_string()))?;
    let endpoint = data.nonempty("endpoint")?;
    let key_policy = match data.nonempty("key_policy_file")?.map(PathBuf::from) {
        None => None,
        Some(p) => Some(crate::catalog::files::read_text(
            &data.key("key_policy_file"),
            &p,
        )?),
    };
    let enable_tag_based_key_discovery = data
        .take_bool("enable_tag_based_key_discovery")?
        .unwrap_or(false);
    let key_identifier = KeyIdentifier::parse(&data, &env.data_dir)?;
    if let KeyIdentifier::Value(v) = &key_identifier
        && v.starts_with("alias/aws/")
    {
        return Err(invalid(
            &data.key("key_identifier_value"),
            "must not start with alias/aws/",
        ));
    }
    data.finish()?;
    Ok(AwsKms {
        region,
        access_key_id,
        secret_access_key,
        endpoint,
        key_identifier,
        key_policy,
        key_tags,
        enable_tag_based_key_discovery,
    })
}

#[async_trait::async_trait]
impl KeyManagerPlugin for AwsKms {
    async fn open(&self, ctx: OpenContext<'_>) -> Result<Arc<dyn KeyManager>, RunError> {
        let secret_access_key = self
            .secret_access_key
            .as_ref()
            .map(|s| s.read())
            .transpose()
            .map_err(|m| RunError::KeyManager(kame_keymanager::Error::Config(m)))?;
        Ok(Arc::new(
            kame_keymanager::aws_kms::AwsKmsKeyManager::open(
                kame_keymanager::aws_kms::AwsKmsConfig {
                    region: self.region.clone(),
                    access_key_id: self.access_key_id.clone(),
                    secret_access_key,
                    endpoint: self.endpoint.clone(),
                    trust_domain: ctx.trust_domain.to_string(),
                    server_id: self.key_identifier.resolve(ctx.server_id)?,
                    key_policy: self.key_policy.clone(),
                    key_tags: self.key_tags.clone(),
                    call_timeout: super::CALL_TIMEOUT,
                    tag_discovery: self.enable_tag_based_key_discovery,
                },
            )
            .await?,
        ))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
