//! Liveness and clean-up: each server keeps its liveness marker key fresh, and the keys of
//! servers whose marker is older than `STALE_AFTER` are deleted. It never touches a server
//! whose marker is fresh, missing or unreadable, nor a name not of Kame's shape.

use super::*;

impl VaultKeyManager {
    pub(super) fn marker(&self) -> String {
        format!("{MARKER_PREFIX}{}", self.cfg.server_id)
    }

    /// Deletes a transit key of this server (deletion must be allowed first).
    pub async fn delete_transit_key(&self, name: &str) -> Result<()> {
        if !name.starts_with(&self.prefix()) {
            return Err(Error::Backend(format!("{name} is not this server's key")));
        }
        self.delete_any(name).await
    }

    pub(super) async fn delete_any(&self, name: &str) -> Result<()> {
        let (mount, n) = (self.mount().to_string(), name.to_string());
        self.post(
            format!("{mount}/keys/{n}/config"),
            serde_json::json!({"deletion_allowed": true}),
        )
        .await?;
        self.call(|c| {
            let (mount, n) = (mount.clone(), n.clone());
            async move {
                match vaultrs::transit::key::delete(c.as_ref(), &mount, &n).await {
                    Ok(()) | Err(vaultrs::error::ClientError::APIError { code: 404, .. }) => Ok(()),
                    Err(e) => Err(vault_err("delete transit key", e)),
                }
            }
        })
        .await?;
        if let Ok(mut l) = self.leftovers.write() {
            l.retain(|x| x.name != name);
        }
        Ok(())
    }

    /// Liveness: this server's marker key made anew (its creation time is the stamp; making
    /// it anew, not rotating it, keeps it one version long).
    pub async fn refresh(&self) -> Result<()> {
        let mount = self.mount().to_string();
        let marker = self.marker();
        if self.list().await?.contains(&marker) {
            self.delete_any(&marker).await?;
        }
        self.post(
            format!("{mount}/keys/{marker}"),
            serde_json::json!({"type": "ecdsa-p256", "exportable": false}),
        )
        .await?;
        Ok(())
    }

    /// Deletes the keys of servers whose liveness marker is older than [`STALE_AFTER`] at
    /// `now`, then the marker. Only names of Kame's shape for that server are touched
    /// (`<server>-<uuid>-<key id>`); servers without a marker, and markers whose time cannot
    /// be read, are left alone. A failure on one key is logged and the sweep goes on.
    /// Returns the names deleted.
    pub async fn sweep(&self, now: u64) -> Result<Vec<String>> {
        let names = self.list().await?;
        let mut swept = vec![];
        for marker in names.iter().filter(|n| n.starts_with(MARKER_PREFIX)) {
            let server = &marker[MARKER_PREFIX.len()..];
            if server == self.cfg.server_id || server.is_empty() {
                continue;
            }
            let stamp = match self.read(marker).await {
                Ok((_, _, _, Some(t))) => t,
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, %marker, "sweep: cannot read a liveness marker");
                    continue;
                }
            };
            if now.saturating_sub(stamp) < STALE_AFTER.as_secs() {
                continue;
            }
            let prefix = format!("{server}-");
            let theirs = names.iter().filter(|n| {
                n.strip_prefix(&prefix).is_some_and(|rest| {
                    rest.get(..36)
                        .is_some_and(|u| uuid::Uuid::parse_str(u).is_ok())
                        && rest.as_bytes().get(36) == Some(&b'-')
                        && rest.len() > 37
                })
            });
            for n in theirs.chain(std::iter::once(marker)) {
                match self.delete_any(n).await {
                    Ok(()) => swept.push(n.clone()),
                    Err(e) => tracing::warn!(error = %e, key = %n, "sweep: delete failed"),
                }
            }
        }
        Ok(swept)
    }
}
