//! Liveness and clean-up: this server stamps `spire-last-update` on its keys, and other
//! servers' keys in the trust domain not stamped for `STALE_AFTER` are scheduled for deletion
//! (KMS's pending window, never at once) and tagged inactive. This server's keys are never
//! swept; replaced keys are retired the same way.

use super::*;

impl AwsKmsKeyManager {
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
}
