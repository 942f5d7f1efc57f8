//! How this server's keys are named and found in KMS, as SPIRE names them: an alias
//! `alias/SPIRE_SERVER/<trust domain>/<server id>/<key id>` per key, found through the alias
//! list or (with tag discovery) the tagging API, and their public keys fetched at start. It
//! creates and deletes nothing.

use super::*;

/// `example.org` → `example_org`.
pub(super) fn sanitize_td(td: &str) -> String {
    td.replace('.', "_")
}

/// SPIRE's alias encoding of a key id.
pub(super) fn encode_key_id(id: &str) -> String {
    id.replace('.', "_2e").replace('+', "_2b")
}

pub(super) fn decode_key_id(s: &str) -> String {
    s.replace("_2b", "+").replace("_2e", ".")
}
impl AwsKmsKeyManager {
    pub(super) fn alias_prefix(&self) -> String {
        format!(
            "alias/SPIRE_SERVER/{}/{}/",
            sanitize_td(&self.cfg.trust_domain),
            self.cfg.server_id
        )
    }

    pub(super) fn alias(&self, id: &str) -> String {
        format!("{}{}", self.alias_prefix(), encode_key_id(id))
    }

    /// Finds this server's keys by their aliases (the alias list of the account, filtered by
    /// this server's prefix; keys themselves are looked up only when they are this server's).
    pub(super) async fn load(&self) -> Result<()> {
        let found = if self.cfg.tag_discovery {
            self.found_by_tags().await?
        } else {
            self.found_by_aliases().await?
        };
        self.load_found(found).await
    }

    /// This server's keys through the tagging API; the alias of each key id names the current
    /// instance (one DescribeKey per key id).
    pub(super) async fn found_by_tags(&self) -> Result<Vec<(String, String)>> {
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

    pub(super) async fn found_by_aliases(&self) -> Result<Vec<(String, String)>> {
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

    pub(super) async fn load_found(&self, found: Vec<(String, String)>) -> Result<()> {
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

    pub(super) async fn fetch_public(&self, id: &str, arn: &str) -> Result<PublicKey> {
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
}
