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

/// `example.org` → `example_org`.
fn sanitize_td(td: &str) -> String {
    td.replace('.', "_")
}

/// SPIRE's alias encoding of a key id.
fn encode_key_id(id: &str) -> String {
    id.replace('.', "_2e").replace('+', "_2b")
}

fn decode_key_id(s: &str) -> String {
    s.replace("_2b", "+").replace("_2e", ".")
}

fn key_spec(kt: KeyType) -> KeySpec {
    match kt {
        KeyType::EcP256 => KeySpec::EccNistP256,
        KeyType::EcP384 => KeySpec::EccNistP384,
        KeyType::Rsa2048 => KeySpec::Rsa2048,
        KeyType::Rsa4096 => KeySpec::Rsa4096,
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

fn tag(k: &str, v: &str) -> Result<Tag> {
    Tag::builder()
        .tag_key(k)
        .tag_value(v)
        .build()
        .map_err(|e| Error::Config(format!("aws_kms tag {k:?}: {e}")))
}

/// SPIRE's limits on user tags: at most 50; keys 1–128 characters, values up to 256, of
/// letters, digits, space and `+ - = . _ : / @`; `aws:` and `spire-` are reserved.
pub fn check_user_tags(tags: &[(String, String)]) -> Result<()> {
    if tags.len() > 50 {
        return Err(Error::Config("aws_kms: at most 50 key_tags".into()));
    }
    let ok = |s: &str| {
        s.chars()
            .all(|c| c.is_alphanumeric() || " +-=._:/@".contains(c))
    };
    for (k, v) in tags {
        if k.is_empty() || k.chars().count() > 128 || !ok(k) {
            return Err(Error::Config(format!(
                "aws_kms: key_tags key {k:?} is not valid"
            )));
        }
        if v.chars().count() > 256 || !ok(v) {
            return Err(Error::Config(format!(
                "aws_kms: key_tags value of {k:?} is not valid"
            )));
        }
        let lower = k.to_ascii_lowercase();
        if lower.starts_with("aws:") || lower.starts_with("spire-") {
            return Err(Error::Config(format!(
                "aws_kms: key_tags key {k:?} uses a reserved prefix (aws:, spire-)"
            )));
        }
    }
    Ok(())
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
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(cfg.region.clone()))
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .operation_timeout(cfg.call_timeout)
                    .connect_timeout(cfg.call_timeout.min(Duration::from_secs(5)))
                    .build(),
            );
        if let (Some(id), Some(secret)) = (&cfg.access_key_id, &cfg.secret_access_key) {
            loader = loader.credentials_provider(aws_sdk_kms::config::Credentials::new(
                id.clone(),
                secret.expose().to_string(),
                None,
                None,
                "kame-config",
            ));
        }
        if let Some(e) = &cfg.endpoint {
            loader = loader.endpoint_url(e.clone());
        }
        let shared = loader.load().await;
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

    fn alias_prefix(&self) -> String {
        format!(
            "alias/SPIRE_SERVER/{}/{}/",
            sanitize_td(&self.cfg.trust_domain),
            self.cfg.server_id
        )
    }

    fn alias(&self, id: &str) -> String {
        format!("{}{}", self.alias_prefix(), encode_key_id(id))
    }

    /// Finds this server's keys by their aliases (the alias list of the account, filtered by
    /// this server's prefix; keys themselves are looked up only when they are this server's).
    async fn load(&self) -> Result<()> {
        let found = if self.cfg.tag_discovery {
            self.found_by_tags().await?
        } else {
            self.found_by_aliases().await?
        };
        self.load_found(found).await
    }

    /// This server's keys through the tagging API; the alias of each key id names the current
    /// instance (one DescribeKey per key id).
    async fn found_by_tags(&self) -> Result<Vec<(String, String)>> {
        let mut ids: Vec<String> = self
            .trust_domain_keys()
            .await?
            .into_iter()
            .filter(|k| k.server_id.as_deref() == Some(self.cfg.server_id.as_str()))
            .filter_map(|k| k.key_id)
            .collect();
        ids.sort();
        ids.dedup();
        let mut found = vec![];
        for id in ids {
            match self.kms.describe_key().key_id(self.alias(&id)).send().await {
                Ok(d) => {
                    if let Some(arn) = d.key_metadata().and_then(|m| m.arn()) {
                        found.push((id, arn.to_string()));
                    }
                }
                // No alias: a key left by a crash before its alias; see `orphans`.
                Err(SdkError::ServiceError(s)) if s.err().code() == Some("NotFoundException") => {}
                Err(e) => return Err(sdk("DescribeKey")(e)),
            }
        }
        Ok(found)
    }

    async fn found_by_aliases(&self) -> Result<Vec<(String, String)>> {
        let prefix = self.alias_prefix();
        let mut marker = None;
        let mut found = vec![];
        loop {
            let out = self
                .kms
                .list_aliases()
                .limit(100)
                .set_marker(marker.clone())
                .send()
                .await
                .map_err(sdk("ListAliases"))?;
            for a in out.aliases() {
                if let (Some(name), Some(target)) = (a.alias_name(), a.target_key_id())
                    && let Some(id) = name.strip_prefix(&prefix)
                {
                    found.push((decode_key_id(id), target.to_string()));
                }
            }
            match out.next_marker() {
                Some(m) if out.truncated() => marker = Some(m.to_string()),
                _ => break,
            }
        }
        Ok(found)
    }

    async fn load_found(&self, found: Vec<(String, String)>) -> Result<()> {
        let mut keys = HashMap::new();
        for (id, target) in found {
            let d = self
                .kms
                .describe_key()
                .key_id(&target)
                .send()
                .await
                .map_err(sdk("DescribeKey"))?;
            let Some(md) = d.key_metadata() else { continue };
            match md.key_state() {
                Some(KeyState::Enabled) => {}
                Some(KeyState::PendingDeletion) => continue,
                other => {
                    return Err(Error::Backend(format!(
                        "key {id:?} ({}) is {other:?}: enable it or remove its alias",
                        md.arn().unwrap_or(&target)
                    )));
                }
            }
            let arn = md.arn().unwrap_or(&target).to_string();
            let public = self.fetch_public(&id, &arn).await?;
            keys.insert(id, Entry { public, arn });
        }
        self.keys.replace(keys);
        Ok(())
    }

    async fn fetch_public(&self, id: &str, arn: &str) -> Result<PublicKey> {
        let p = self
            .kms
            .get_public_key()
            .key_id(arn)
            .send()
            .await
            .map_err(sdk("GetPublicKey"))?;
        let spki_der = p
            .public_key()
            .ok_or_else(|| Error::Backend(format!("GetPublicKey({arn}) returned no key")))?
            .as_ref()
            .to_vec();
        let kt = crate::encoding::key_type_of_spki(&spki_der)
            .ok_or_else(|| Error::Backend(format!("key {arn} has an unsupported key type")))?;
        Ok(PublicKey {
            id: id.to_string(),
            key_type: kt,
            fingerprint: fingerprint(&spki_der),
            spki_der,
        })
    }

    fn entry(&self, id: &str) -> Result<Entry> {
        self.keys.get(id)
    }

    /// The ARN behind `id` (for operators and tests).
    pub fn arn(&self, id: &str) -> Result<String> {
        Ok(self.entry(id)?.arn)
    }

    /// Schedules the deletion of a key (7 days); one already pending counts as done.
    pub async fn schedule_deletion(&self, arn: &str) -> Result<()> {
        // By key id, which KMS takes as well as the ARN (moto 5.2.5 fails on an ARN here).
        let key_id = arn.rsplit_once(":key/").map(|(_, id)| id).unwrap_or(arn);
        match self
            .kms
            .schedule_key_deletion()
            .key_id(key_id)
            .pending_window_in_days(PENDING_WINDOW_DAYS)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(SdkError::ServiceError(s))
                if s.err().code() == Some("KMSInvalidStateException") =>
            {
                Ok(())
            }
            Err(e) => Err(sdk("ScheduleKeyDeletion")(e)),
        }
    }

    /// The key's state in KMS (`Enabled`, `PendingDeletion`, ...), for operators and tests.
    pub async fn key_state(&self, arn: &str) -> Result<String> {
        let key_id = arn.rsplit_once(":key/").map(|(_, id)| id).unwrap_or(arn);
        let d = self
            .kms
            .describe_key()
            .key_id(key_id)
            .send()
            .await
            .map_err(sdk("DescribeKey"))?;
        Ok(d.key_metadata()
            .and_then(|m| m.key_state())
            .map(|s| s.as_str().to_string())
            .unwrap_or_default())
    }

    /// Takes a key out of service: deletion scheduled, then tagged inactive so that listings
    /// by tag no longer return it.
    pub async fn retire(&self, arn: &str) -> Result<()> {
        self.schedule_deletion(arn).await?;
        self.kms
            .tag_resource()
            .key_id(arn)
            .tags(tag("spire-active", "false")?)
            .send()
            .await
            .map_err(sdk("TagResource"))?;
        Ok(())
    }

    /// Liveness: stamps `spire-last-update` on this server's keys (SPIRE does it every 6 h).
    pub async fn refresh(&self) -> Result<()> {
        let arns: Vec<String> = self.keys.map(|e| e.arn.clone());
        let now = now_secs().to_string();
        for arn in arns {
            self.kms
                .tag_resource()
                .key_id(&arn)
                .tags(tag("spire-last-update", &now)?)
                .send()
                .await
                .map_err(sdk("TagResource"))?;
        }
        Ok(())
    }

    /// The active keys of this trust domain, through the tagging API.
    pub async fn trust_domain_keys(&self) -> Result<Vec<KmsKey>> {
        use aws_sdk_resourcegroupstagging::types::TagFilter;
        let mut token: Option<String> = None;
        let mut out = vec![];
        loop {
            let r = self
                .tagging
                .get_resources()
                .resource_type_filters("kms:key")
                .tag_filters(
                    TagFilter::builder()
                        .key("spire-server-td")
                        .values(&self.cfg.trust_domain)
                        .build(),
                )
                .tag_filters(
                    TagFilter::builder()
                        .key("spire-active")
                        .values("true")
                        .build(),
                )
                .set_pagination_token(token.clone())
                .send()
                .await
                .map_err(|e| {
                    let text = aws_sdk_kms::error::DisplayErrorContext(&e).to_string();
                    let retryable = match &e {
                        SdkError::TimeoutError(_)
                        | SdkError::DispatchFailure(_)
                        | SdkError::ResponseError(_) => true,
                        SdkError::ServiceError(s) => {
                            let code = s.err().code().unwrap_or("");
                            s.raw().status().as_u16() >= 500
                                || code.contains("Throttl")
                                || code == "InternalServiceException"
                        }
                        _ => false,
                    };
                    if retryable {
                        Error::Unavailable(format!("tagging GetResources: {text}"))
                    } else {
                        Error::Backend(format!("tagging GetResources: {text}"))
                    }
                })?;
            for m in r.resource_tag_mapping_list() {
                let tags: HashMap<&str, &str> =
                    m.tags().iter().map(|t| (t.key(), t.value())).collect();
                out.push(KmsKey {
                    arn: m.resource_arn().unwrap_or_default().to_string(),
                    server_id: tags.get("spire-server-id").map(|s| s.to_string()),
                    key_id: tags.get("spire-key-id").map(|s| s.to_string()),
                    intent: tags.get("kame-intent").map(|s| s.to_string()),
                    last_update: tags.get("spire-last-update").and_then(|s| s.parse().ok()),
                    active: tags.get("spire-active") == Some(&"true"),
                });
            }
            match r.pagination_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_string()),
                _ => break,
            }
        }
        Ok(out)
    }

    /// Disposes of other servers' keys in this trust domain not refreshed for
    /// [`STALE_AFTER`] (a missing stamp counts as never): deletion scheduled, then tagged
    /// inactive. This server's keys are never swept. Returns the ARNs swept.
    pub async fn sweep(&self, now: u64) -> Result<Vec<String>> {
        let mut swept = vec![];
        for k in self.trust_domain_keys().await? {
            if k.server_id.as_deref() == Some(self.cfg.server_id.as_str()) {
                continue;
            }
            if now.saturating_sub(k.last_update.unwrap_or(0)) < STALE_AFTER.as_secs() {
                continue;
            }
            self.retire(&k.arn).await?;
            swept.push(k.arn);
        }
        Ok(swept)
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

    async fn generate(
        &self,
        id: &str,
        key_type: KeyType,
        intent: Option<&str>,
    ) -> Result<PublicKey> {
        validate_key_id(id)?;
        // SPIRE's alias encoding maps '.' to "_2e" and '+' to "_2b": an id that already holds
        // those would read back as another id.
        if id.contains("_2e") || id.contains("_2b") {
            return Err(Error::InvalidKeyId(id.to_string()));
        }
        let arn = self.create(id, key_type, intent).await?;
        crate::failpoint("after_remote_create");
        let public = match self.fetch_public(id, &arn).await {
            Ok(p) => p,
            Err(e) => {
                // Never leave a key nobody names.
                let _ = self.retire(&arn).await;
                return Err(e);
            }
        };
        if let Err(e) = self.install(id, &arn, &public).await {
            let _ = self.retire(&arn).await;
            return Err(e);
        }
        Ok(public)
    }

    /// Points `id`'s alias at `arn`, caches it, and retires the key it named before.
    async fn install(&self, id: &str, arn: &str, public: &PublicKey) -> Result<()> {
        let previous = self.entry(id).ok();
        let alias = self.alias(id);
        let aliased = if previous.is_some() {
            self.kms
                .update_alias()
                .alias_name(&alias)
                .target_key_id(arn)
                .send()
                .await
                .map(|_| ())
                .map_err(sdk("UpdateAlias"))
        } else {
            match self
                .kms
                .create_alias()
                .alias_name(&alias)
                .target_key_id(arn)
                .send()
                .await
            {
                Ok(_) => Ok(()),
                // The alias exists (a key created before a crash, not loaded): move it.
                Err(SdkError::ServiceError(s))
                    if s.err().code() == Some("AlreadyExistsException") =>
                {
                    self.kms
                        .update_alias()
                        .alias_name(&alias)
                        .target_key_id(arn)
                        .send()
                        .await
                        .map(|_| ())
                        .map_err(sdk("UpdateAlias"))
                }
                Err(e) => Err(sdk("CreateAlias")(e)),
            }
        };
        aliased?;
        self.keys.insert(
            id,
            Entry {
                public: public.clone(),
                arn: arn.to_string(),
            },
        );
        if let Some(old) = previous {
            // A failure here leaves the old key for the orphan sweep; the new one is in place.
            let _ = self.retire(&old.arn).await;
        }
        Ok(())
    }

    /// Creates a KMS key for `id` with SPIRE's description and tags (plus the user's, and the
    /// CA's intent).
    async fn create(&self, id: &str, kt: KeyType, intent: Option<&str>) -> Result<String> {
        let mut tags = vec![
            tag("spire-server-td", &self.cfg.trust_domain)?,
            tag("spire-server-id", &self.cfg.server_id)?,
            tag("spire-active", "true")?,
            tag("spire-key-id", id)?,
            tag("spire-last-update", &now_secs().to_string())?,
        ];
        for (k, v) in &self.cfg.key_tags {
            tags.push(tag(k, v)?);
        }
        if let Some(i) = intent {
            tags.push(tag("kame-intent", i)?);
        }
        let out = self
            .kms
            .create_key()
            .key_spec(key_spec(kt))
            .key_usage(KeyUsageType::SignVerify)
            .description(format!(
                "SPIRE_SERVER_KEY/{}/{id}",
                sanitize_td(&self.cfg.trust_domain)
            ))
            .set_policy(self.cfg.key_policy.clone())
            .set_tags(Some(tags))
            .send()
            .await
            .map_err(sdk("CreateKey"))?;
        out.key_metadata()
            .and_then(|m| m.arn())
            .map(str::to_string)
            .ok_or_else(|| Error::Backend("CreateKey returned no ARN".into()))
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
mod tests {
    use super::*;
    use crate::testing::Moto;

    fn config(moto: &Moto, server_id: &str) -> AwsKmsConfig {
        AwsKmsConfig {
            region: "us-east-1".into(),
            access_key_id: Some("testing".into()),
            secret_access_key: Some("testing".into()),
            endpoint: Some(moto.endpoint.clone()),
            trust_domain: "example.org".into(),
            server_id: server_id.into(),
            key_policy: None,
            key_tags: vec![("team".into(), "kame".into())],
            call_timeout: Duration::from_secs(10),
            tag_discovery: false,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn aws_kms_passes_keymanager_conformance_on_moto() {
        let moto = Moto::start();
        let km = AwsKmsKeyManager::open(config(&moto, "server-a"))
            .await
            .unwrap();
        crate::conformance::run(
            &km,
            crate::conformance::Skip {
                large_messages: true,
                rsa_pss: true,
            },
        )
        .await;
        crate::conformance::lifecycle(&km).await;
        // Reopened, the backend finds the same keys through their aliases.
        let again = AwsKmsKeyManager::open(config(&moto, "server-a"))
            .await
            .unwrap();
        let mut a = km.public_keys().await.unwrap();
        let mut b = again.public_keys().await.unwrap();
        a.sort_by(|x, y| x.id.cmp(&y.id));
        b.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(a, b);
        // Tag-based discovery finds the same.
        let mut c = config(&moto, "server-a");
        c.tag_discovery = true;
        let by_tags = AwsKmsKeyManager::open(c).await.unwrap();
        let mut t = by_tags.public_keys().await.unwrap();
        t.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(a, t);
        // Another server sees none of them.
        let other = AwsKmsKeyManager::open(config(&moto, "server-b"))
            .await
            .unwrap();
        assert!(other.public_keys().await.unwrap().is_empty());
    }

    /// Messages over 4,096 bytes go as a digest of the requested hash (moto_server mishandles
    /// DIGEST, so the request is what is checked here), smaller ones as RAW.
    #[test]
    fn aws_kms_large_messages_are_sent_as_digests_raw_up_to_4096() {
        let small = vec![7u8; MAX_RAW_MESSAGE];
        assert_eq!(
            sign_input(&small, HashAlgorithm::Sha256),
            (MessageType::Raw, small.clone())
        );
        let big = vec![7u8; MAX_RAW_MESSAGE + 1];
        for h in [
            HashAlgorithm::Sha256,
            HashAlgorithm::Sha384,
            HashAlgorithm::Sha512,
        ] {
            let (t, d) = sign_input(&big, h);
            assert_eq!(t, MessageType::Digest);
            assert_eq!(d, crate::encoding::digest(h, &big));
        }
        assert_eq!(
            signing_algorithm(KeyType::EcP384, SignOpts::for_key(KeyType::EcP384)),
            Some(SigningAlgorithmSpec::EcdsaSha384)
        );
        assert_eq!(
            signing_algorithm(
                KeyType::Rsa2048,
                SignOpts {
                    hash: HashAlgorithm::Sha512,
                    pss: true
                }
            ),
            Some(SigningAlgorithmSpec::RsassaPssSha512)
        );
        assert_eq!(
            signing_algorithm(
                KeyType::EcP256,
                SignOpts {
                    hash: HashAlgorithm::Sha384,
                    pss: false
                }
            ),
            None
        );
    }

    /// SPIRE's names: alias, description and tags; a replaced key is pending deletion.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn aws_kms_names_keys_as_spire_and_schedules_replaced_keys_for_deletion() {
        let moto = Moto::start();
        let km = AwsKmsKeyManager::open(config(&moto, "srv-1"))
            .await
            .unwrap();
        km.generate_key("x509-CA-A", KeyType::EcP256).await.unwrap();
        let first = km.arn("x509-CA-A").unwrap();
        let aliases = km.kms.list_aliases().send().await.unwrap();
        let alias = aliases
            .aliases()
            .iter()
            .find(|a| a.alias_name() == Some("alias/SPIRE_SERVER/example_org/srv-1/x509-CA-A"))
            .expect("SPIRE's alias");
        let d = km.kms.describe_key().key_id(&first).send().await.unwrap();
        let md = d.key_metadata().unwrap();
        assert_eq!(alias.target_key_id(), Some(md.key_id()));
        assert_eq!(
            md.description(),
            Some("SPIRE_SERVER_KEY/example_org/x509-CA-A")
        );
        let tags = km
            .kms
            .list_resource_tags()
            .key_id(&first)
            .send()
            .await
            .unwrap();
        let tags: HashMap<&str, &str> = tags
            .tags()
            .iter()
            .map(|t| (t.tag_key(), t.tag_value()))
            .collect();
        assert_eq!(tags.get("spire-server-td"), Some(&"example.org"));
        assert_eq!(tags.get("spire-server-id"), Some(&"srv-1"));
        assert_eq!(tags.get("spire-active"), Some(&"true"));
        assert_eq!(tags.get("spire-key-id"), Some(&"x509-CA-A"));
        assert!(tags.contains_key("spire-last-update"));
        assert_eq!(tags.get("team"), Some(&"kame"));
        // Replaced: the alias moves, the old key is pending deletion.
        km.generate_key("x509-CA-A", KeyType::EcP256).await.unwrap();
        let second = km.arn("x509-CA-A").unwrap();
        assert_ne!(first, second);
        let d = km.kms.describe_key().key_id(&first).send().await.unwrap();
        assert_eq!(
            d.key_metadata().unwrap().key_state(),
            Some(&KeyState::PendingDeletion)
        );
        // Dotted key ids are encoded as SPIRE encodes them.
        km.generate_key("a.b+c", KeyType::EcP256).await.unwrap();
        let aliases = km.kms.list_aliases().send().await.unwrap();
        assert!(
            aliases
                .aliases()
                .iter()
                .any(|a| a.alias_name() == Some("alias/SPIRE_SERVER/example_org/srv-1/a_2eb_2bc"))
        );
        let again = AwsKmsKeyManager::open(config(&moto, "srv-1"))
            .await
            .unwrap();
        assert!(again.public_key("a.b+c").await.is_ok());
    }

    /// Liveness and the sweep: another server's keys not refreshed for 14 days are scheduled
    /// for deletion and tagged inactive; fresh ones and this server's own are kept.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn aws_kms_sweeps_only_stale_keys_of_other_servers() {
        let moto = Moto::start();
        let me = AwsKmsKeyManager::open(config(&moto, "alive"))
            .await
            .unwrap();
        let dead = AwsKmsKeyManager::open(config(&moto, "dead")).await.unwrap();
        let fresh = AwsKmsKeyManager::open(config(&moto, "fresh"))
            .await
            .unwrap();
        me.generate_key("k", KeyType::EcP256).await.unwrap();
        dead.generate_key("k", KeyType::EcP256).await.unwrap();
        fresh.generate_key("k", KeyType::EcP256).await.unwrap();
        let now = now_secs();
        // The dead server last refreshed 15 days ago.
        dead.kms
            .tag_resource()
            .key_id(dead.arn("k").unwrap())
            .tags(tag("spire-last-update", &(now - 15 * 86400).to_string()).unwrap())
            .send()
            .await
            .unwrap();
        me.kms
            .tag_resource()
            .key_id(me.arn("k").unwrap())
            .tags(tag("spire-last-update", "0").unwrap())
            .send()
            .await
            .unwrap();
        let swept = me.sweep(now).await.unwrap();
        assert_eq!(swept, vec![dead.arn("k").unwrap()]);
        let state = |arn: String| {
            let kms = me.kms.clone();
            async move {
                kms.describe_key()
                    .key_id(arn)
                    .send()
                    .await
                    .unwrap()
                    .key_metadata()
                    .unwrap()
                    .key_state()
                    .cloned()
            }
        };
        assert_eq!(
            state(dead.arn("k").unwrap()).await,
            Some(KeyState::PendingDeletion)
        );
        assert_eq!(
            state(fresh.arn("k").unwrap()).await,
            Some(KeyState::Enabled)
        );
        assert_eq!(state(me.arn("k").unwrap()).await, Some(KeyState::Enabled));
        // Refresh stamps this server's keys.
        me.refresh().await.unwrap();
        let mine = me
            .trust_domain_keys()
            .await
            .unwrap()
            .into_iter()
            .find(|k| k.server_id.as_deref() == Some("alive"))
            .unwrap();
        assert!(mine.last_update.unwrap() >= now);
        // The swept key is inactive and no longer listed.
        assert!(
            !me.trust_domain_keys()
                .await
                .unwrap()
                .iter()
                .any(|k| k.server_id.as_deref() == Some("dead"))
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn aws_kms_unreachable_endpoint_is_unavailable_fast() {
        let mut moto = Moto::start();
        let km = AwsKmsKeyManager::open(config(&moto, "s")).await.unwrap();
        km.generate_key("k", KeyType::EcP256).await.unwrap();
        moto.stop();
        let t = std::time::Instant::now();
        let e = km
            .sign("k", b"m", SignOpts::for_key(KeyType::EcP256))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Unavailable(_)), "{e}");
        assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    }

    #[test]
    fn aws_kms_user_tags_follow_spires_limits() {
        let t = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        assert!(check_user_tags(&t("team", "kame")).is_ok());
        assert!(check_user_tags(&t("spire-x", "v")).is_err());
        assert!(check_user_tags(&t("aws:x", "v")).is_err());
        assert!(check_user_tags(&t("", "v")).is_err());
        assert!(check_user_tags(&t("k", "bad#char")).is_err());
        let many: Vec<_> = (0..51)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        assert!(check_user_tags(&many).is_err());
    }
}
