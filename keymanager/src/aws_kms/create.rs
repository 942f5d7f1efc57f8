//! Creating keys: the key spec and SPIRE's tags for a new key (plus the operator's, within
//! SPIRE's limits), the key, and its alias (created, or moved when a key made before a crash
//! holds it), then the key in the cache. A new key that cannot be read back or named is
//! retired at once, and the key an alias named before is retired: none is left unnamed.

use super::*;

pub(super) fn key_spec(kt: KeyType) -> KeySpec {
    match kt {
        KeyType::EcP256 => KeySpec::EccNistP256,
        KeyType::EcP384 => KeySpec::EccNistP384,
        KeyType::Rsa2048 => KeySpec::Rsa2048,
        KeyType::Rsa4096 => KeySpec::Rsa4096,
    }
}

pub(super) fn tag(k: &str, v: &str) -> Result<Tag> {
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
    pub(super) async fn generate(
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
    pub(super) async fn install(&self, id: &str, arn: &str, public: &PublicKey) -> Result<()> {
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
    pub(super) async fn create(
        &self,
        id: &str,
        kt: KeyType,
        intent: Option<&str>,
    ) -> Result<String> {
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
