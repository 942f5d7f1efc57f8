//! `aws_kms` KeyManager: server signing keys are AWS KMS asymmetric keys (or keys of a
//! KMS-compatible endpoint), named as SPIRE's `aws_kms` plugin names them, so operators find
//! them where they expect:
//! alias `alias/SPIRE_SERVER/<td, '.'→'_'>/<server id>/<key id, '.'→'_2e', '+'→'_2b'>`,
//! description `SPIRE_SERVER_KEY/<td>/<key id>`, and the tags `spire-server-td`,
//! `spire-server-id`, `spire-active`, `spire-key-id`, `spire-last-update` (every key is tagged, in
//! both modes, so the sweep works in both).
//!
//! Signing sends the message (MessageType RAW) when it is at most 4,096 bytes and a digest
//! (MessageType DIGEST) above. Public keys are cached: no KMS call but Sign on the signing path.
//! A replaced key is scheduled for deletion (7 days). Liveness: [`AwsKmsKeyManager::refresh`]
//! stamps `spire-last-update` on this server's keys; [`AwsKmsKeyManager::sweep`] schedules the
//! deletion of other servers' keys in this trust domain that were not refreshed for 14 days,
//! found through the tagging API (never a scan of every key in the account).
//! Every call has a deadline; an unreachable, slow or throttling KMS is
//! [`Error::Unavailable`]. No lock is held across a network call. It must not log secrets.

use crate::{
    Error, HashAlgorithm, KeyManager, KeyType, PublicKey, Result, SignOpts, Signature, fingerprint,
    validate_key_id,
};
use async_trait::async_trait;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{KeySpec, KeyState, KeyUsageType, MessageType, SigningAlgorithmSpec, Tag};
use kame_api::Secret;
use std::collections::HashMap;
use std::time::Duration;

mod create;
mod naming;
mod sweep;
pub use create::*;
use naming::*;

/// KMS accepts RAW messages up to this size.
pub const MAX_RAW_MESSAGE: usize = 4096;
/// Keys of servers that stopped refreshing them are swept after this long (SPIRE's 14 days).
pub const STALE_AFTER: Duration = Duration::from_secs(14 * 24 * 3600);
/// How long a replaced or swept key waits in KMS before it is deleted.
pub const PENDING_WINDOW_DAYS: i32 = 7;

/// `KeyManager "aws_kms"` settings.
#[derive(Debug, Clone)]
pub struct AwsKmsConfig {
    pub region: String,
    /// Static credentials; without them the default AWS credential chain.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    /// A KMS-compatible endpoint (Kame's addition; tests use moto).
    pub endpoint: Option<String>,
    /// The trust domain, for names only.
    pub trust_domain: String,
    /// This server's key identifier.
    pub server_id: String,
    /// A key policy (JSON) for new keys; none: KMS's default key policy.
    pub key_policy: Option<String>,
    /// User tags for new keys.
    pub key_tags: Vec<(String, String)>,
    /// Deadline of one KMS call.
    pub call_timeout: Duration,
    /// Find this server's keys through the tagging API (filtered by trust domain and server
    /// id on the service side) instead of the account's alias list.
    pub tag_discovery: bool,
}

#[derive(Debug, Clone)]
struct Entry {
    public: PublicKey,
    arn: String,
}

impl crate::cache::Cached for Entry {
    fn public(&self) -> &PublicKey {
        &self.public
    }
}

/// A KMS key of this trust domain as the tagging API reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsKey {
    pub arn: String,
    pub server_id: Option<String>,
    pub key_id: Option<String>,
    /// The `kame-intent` tag: the CA's intent the key was created under.
    pub intent: Option<String>,
    pub last_update: Option<u64>,
    pub active: bool,
}

pub struct AwsKmsKeyManager {
    kms: aws_sdk_kms::Client,
    tagging: aws_sdk_resourcegroupstagging::Client,
    cfg: AwsKmsConfig,
    keys: crate::cache::KeyCache<Entry>,
    /// Signing requests in flight at most (the SDK retries throttled calls with backoff).
    inflight: tokio::sync::Semaphore,
}

impl std::fmt::Debug for AwsKmsKeyManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsKmsKeyManager")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// The KMS signing algorithm for a key type and options (SPIRE's table).
pub fn signing_algorithm(kt: KeyType, opts: SignOpts) -> Option<SigningAlgorithmSpec> {
    use HashAlgorithm::*;
    use SigningAlgorithmSpec as A;
    Some(match (kt, opts.hash, opts.pss) {
        (KeyType::EcP256, Sha256, false) => A::EcdsaSha256,
        (KeyType::EcP384, Sha384, false) => A::EcdsaSha384,
        (KeyType::EcP256 | KeyType::EcP384, _, _) => return None,
        (_, Sha256, false) => A::RsassaPkcs1V15Sha256,
        (_, Sha384, false) => A::RsassaPkcs1V15Sha384,
        (_, Sha512, false) => A::RsassaPkcs1V15Sha512,
        (_, Sha256, true) => A::RsassaPssSha256,
        (_, Sha384, true) => A::RsassaPssSha384,
        (_, Sha512, true) => A::RsassaPssSha512,
    })
}

/// What a Sign request carries: the message itself up to [`MAX_RAW_MESSAGE`] bytes, else its
/// digest.
pub fn sign_input(message: &[u8], hash: HashAlgorithm) -> (MessageType, Vec<u8>) {
    if message.len() <= MAX_RAW_MESSAGE {
        (MessageType::Raw, message.to_vec())
    } else {
        (MessageType::Digest, crate::encoding::digest(hash, message))
    }
}

/// Maps an SDK failure: unreachable, timed out, throttled or a server fault are Unavailable.
fn sdk<E>(
    op: &'static str,
) -> impl FnOnce(SdkError<E, aws_sdk_kms::config::http::HttpResponse>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    move |e| {
        let text = aws_sdk_kms::error::DisplayErrorContext(&e).to_string();
        match &e {
            SdkError::TimeoutError(_)
            | SdkError::DispatchFailure(_)
            | SdkError::ResponseError(_) => Error::Unavailable(format!("AWS KMS {op}: {text}")),
            SdkError::ServiceError(s) => {
                let code = s.err().code().unwrap_or("");
                let status = s.raw().status().as_u16();
                if status >= 500
                    || status == 429
                    || code.contains("Throttl")
                    || code == "KMSInternalException"
                    || code == "DependencyTimeoutException"
                    || code == "KeyUnavailableException"
                {
                    Error::Unavailable(format!("AWS KMS {op}: HTTP {status} {code}"))
                } else if code.is_empty() {
                    Error::Backend(format!("AWS KMS {op}: {text}"))
                } else {
                    Error::Backend(format!(
                        "AWS KMS {op}: {code}: {}",
                        s.err().message().unwrap_or("")
                    ))
                }
            }
            _ => Error::Backend(format!("AWS KMS {op}: {text}")),
        }
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl AwsKmsKeyManager {
    /// Connects and loads this server's keys from their aliases.
    pub async fn open(cfg: AwsKmsConfig) -> Result<Self> {
        if cfg.region.is_empty() {
            return Err(Error::Config("aws_kms: region is required".into()));
        }
        if cfg.access_key_id.is_some() != cfg.secret_access_key.is_some() {
            return Err(Error::Config(
                "aws_kms: give both access_key_id and secret_access_key, or neither".into(),
            ));
        }
        check_user_tags(&cfg.key_tags)?;
        let shared = crate::aws_sdk::sdk_config(&crate::aws_sdk::AwsSettings {
            region: &cfg.region,
            static_credentials: cfg
                .access_key_id
                .as_deref()
                .zip(cfg.secret_access_key.as_ref().map(|s| s.expose())),
            endpoint: cfg.endpoint.as_deref(),
            call_timeout: cfg.call_timeout,
        })
        .await;
        let km = AwsKmsKeyManager {
            kms: aws_sdk_kms::Client::new(&shared),
            tagging: aws_sdk_resourcegroupstagging::Client::new(&shared),
            cfg,
            keys: crate::cache::KeyCache::new(),
            inflight: tokio::sync::Semaphore::new(crate::MAX_INFLIGHT_SIGNS),
        };
        km.load().await?;
        Ok(km)
    }

    fn entry(&self, id: &str) -> Result<Entry> {
        self.keys.get(id)
    }

    /// The ARN behind `id` (for operators and tests).
    pub fn arn(&self, id: &str) -> Result<String> {
        Ok(self.entry(id)?.arn)
    }

    /// Keys of this server in KMS that no alias names: left by a crash between create and
    /// alias, or by a lost deletion. Listed by the tagging API.
    pub async fn orphans(&self) -> Result<Vec<KmsKey>> {
        let current: Vec<String> = self.keys.map(|e| e.arn.clone());
        Ok(self
            .trust_domain_keys()
            .await?
            .into_iter()
            .filter(|k| k.server_id.as_deref() == Some(self.cfg.server_id.as_str()))
            .filter(|k| !current.contains(&k.arn))
            .collect())
    }
}

#[async_trait]
impl KeyManager for AwsKmsKeyManager {
    fn name(&self) -> &'static str {
        "aws_kms"
    }

    async fn generate_key(&self, id: &str, key_type: KeyType) -> Result<PublicKey> {
        self.generate(id, key_type, None).await
    }

    async fn generate_key_with_intent(
        &self,
        id: &str,
        key_type: KeyType,
        intent: &str,
    ) -> Result<PublicKey> {
        self.generate(id, key_type, Some(intent)).await
    }

    async fn adopt(&self, id: &str, intent: &str) -> Result<Option<PublicKey>> {
        let found = self.trust_domain_keys().await?.into_iter().find(|k| {
            k.server_id.as_deref() == Some(self.cfg.server_id.as_str())
                && k.intent.as_deref() == Some(intent)
        });
        let Some(k) = found else { return Ok(None) };
        if let Ok(e) = self.entry(id)
            && e.arn == k.arn
        {
            return Ok(Some(e.public));
        }
        let public = self.fetch_public(id, &k.arn).await?;
        self.install(id, &k.arn, &public).await?;
        Ok(Some(public))
    }

    async fn orphans(&self) -> Result<Vec<crate::Orphan>> {
        Ok(AwsKmsKeyManager::orphans(self)
            .await?
            .into_iter()
            .map(|k| crate::Orphan {
                instance: k.arn,
                key_id: k.key_id,
                intent: k.intent,
            })
            .collect())
    }

    async fn dispose(&self, orphan: &crate::Orphan) -> Result<()> {
        self.retire(&orphan.instance).await
    }

    async fn maintain(&self) -> Result<usize> {
        self.refresh().await?;
        Ok(self.sweep(now_secs()).await?.len())
    }

    async fn delete_key(&self, id: &str, fingerprint: &str) -> Result<bool> {
        let Some(e) = self.keys.remove_if_fingerprint(id, fingerprint) else {
            return Ok(false);
        };
        if let Err(err) = self.retire(&e.arn).await {
            // Still ours to dispose of: back in the index for the next attempt.
            self.keys.insert(id, e);
            return Err(err);
        }
        // The alias goes too, so no restart finds the id naming a key pending deletion.
        match self
            .kms
            .delete_alias()
            .alias_name(self.alias(id))
            .send()
            .await
        {
            Ok(_) => {}
            Err(SdkError::ServiceError(s)) if s.err().code() == Some("NotFoundException") => {}
            Err(err) => {
                tracing::warn!(error = %sdk("DeleteAlias")(err), "alias of a disposed key left")
            }
        }
        Ok(true)
    }

    async fn public_key(&self, id: &str) -> Result<PublicKey> {
        Ok(self.entry(id)?.public)
    }

    async fn public_keys(&self) -> Result<Vec<PublicKey>> {
        Ok(self.keys.publics())
    }

    async fn sign(&self, id: &str, message: &[u8], opts: SignOpts) -> Result<Signature> {
        let e = self.entry(id)?;
        let alg = signing_algorithm(e.public.key_type, opts).ok_or_else(|| {
            Error::UnsupportedSignOpts {
                id: id.to_string(),
                key_type: e.public.key_type,
                hash: opts.hash,
                pss: opts.pss,
            }
        })?;
        let _permit = crate::sign_permit(&self.inflight, self.cfg.call_timeout).await?;
        let (message_type, input) = sign_input(message, opts.hash);
        let out = self
            .kms
            .sign()
            .key_id(&e.arn)
            .message(Blob::new(input))
            .message_type(message_type)
            .signing_algorithm(alg)
            .send()
            .await
            .map_err(sdk("Sign"))?;
        let bytes = out
            .signature()
            .ok_or_else(|| Error::Backend(format!("Sign({id}) returned no signature")))?
            .as_ref()
            .to_vec();
        Ok(Signature {
            bytes,
            fingerprint: e.public.fingerprint,
        })
    }
}

#[cfg(test)]
mod tests;
