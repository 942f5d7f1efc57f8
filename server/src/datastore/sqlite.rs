//! SQLite implementation of [`DataStore`](super::DataStore) with sqlx and embedded migrations.
//! Writes run in `BEGIN IMMEDIATE` transactions so read-modify-write (bundle appends, entry
//! updates) is serialized; WAL mode lets readers proceed meanwhile.

use super::*;
use kame_api::pb::types::Bundle;
use prost::Message;
use sha2::Digest;
use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

fn unique_key(e: &RegistrationEntry) -> String {
    let mut sels: Vec<String> = e.selectors.iter().map(|s| s.to_string()).collect();
    sels.sort();
    sels.dedup();
    let mut h = sha2::Sha256::new();
    h.update(e.spiffe_id.as_bytes());
    h.update([0]);
    h.update(e.parent_id.as_bytes());
    for s in sels {
        h.update([0]);
        h.update(s.as_bytes());
    }
    hex::encode(h.finalize())
}

fn corrupt(e: impl std::fmt::Display) -> DsError {
    DsError::Corrupt(e.to_string())
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

#[derive(Serialize, Deserialize)]
struct NodeRow {
    attestation_type: String,
    serial_number: String,
    expires_at: i64,
    new_serial_number: String,
    new_expires_at: i64,
    can_reattest: bool,
    selectors: Vec<Selector>,
    agent_version: String,
    #[serde(default)]
    tpm_boot: Option<(u32, u32)>,
    #[serde(default)]
    tpm_reboots: u64,
}

impl SqliteStore {
    /// Opens (creating if missing) the database named by `connection_string` (a file path or a
    /// `sqlite:` URL) and applies migrations.
    pub async fn open(connection_string: &str) -> DsResult<Self> {
        let opts = if connection_string.starts_with("sqlite:") {
            SqliteConnectOptions::from_str(connection_string)?
        } else {
            if let Some(dir) = std::path::Path::new(connection_string).parent()
                && !dir.as_os_str().is_empty()
            {
                std::fs::create_dir_all(dir).map_err(|e| DsError::Db(sqlx::Error::Io(e)))?;
            }
            SqliteConnectOptions::new().filename(connection_string)
        }
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(opts)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(SqliteStore { pool })
    }

    async fn write_tx(&self) -> DsResult<sqlx::Transaction<'static, sqlx::Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }
}

fn entry_from_row(row: &sqlx::sqlite::SqliteRow) -> DsResult<RegistrationEntry> {
    let data: String = row.try_get("data")?;
    serde_json::from_str(&data).map_err(corrupt)
}

fn node_from_row(spiffe_id: String, data: &str) -> DsResult<AttestedNode> {
    let r: NodeRow = serde_json::from_str(data).map_err(corrupt)?;
    Ok(AttestedNode {
        spiffe_id,
        attestation_type: r.attestation_type,
        serial_number: r.serial_number,
        expires_at: r.expires_at,
        new_serial_number: r.new_serial_number,
        new_expires_at: r.new_expires_at,
        can_reattest: r.can_reattest,
        selectors: r.selectors,
        agent_version: r.agent_version,
        tpm_boot: r.tpm_boot,
        tpm_reboots: r.tpm_reboots,
    })
}

fn node_json(n: &AttestedNode) -> DsResult<String> {
    serde_json::to_string(&NodeRow {
        attestation_type: n.attestation_type.clone(),
        serial_number: n.serial_number.clone(),
        expires_at: n.expires_at,
        new_serial_number: n.new_serial_number.clone(),
        new_expires_at: n.new_expires_at,
        can_reattest: n.can_reattest,
        selectors: n.selectors.clone(),
        agent_version: n.agent_version.clone(),
        tpm_boot: n.tpm_boot,
        tpm_reboots: n.tpm_reboots,
    })
    .map_err(corrupt)
}

fn decode_bundle(data: &[u8]) -> DsResult<Bundle> {
    Bundle::decode(data).map_err(corrupt)
}

#[async_trait]
impl DataStore for SqliteStore {
    async fn create_entry(&self, entry: &RegistrationEntry) -> DsResult<RegistrationEntry> {
        let mut e = entry.clone();
        e.revision_number = 0;
        let data = serde_json::to_string(&e).map_err(corrupt)?;
        let res = sqlx::query(
            "INSERT INTO registered_entries (id, unique_key, spiffe_id, parent_id, hint, downstream, revision_number, created_at, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&e.id)
        .bind(unique_key(&e))
        .bind(&e.spiffe_id)
        .bind(&e.parent_id)
        .bind(&e.hint)
        .bind(e.downstream)
        .bind(e.revision_number)
        .bind(e.created_at)
        .bind(data)
        .execute(&self.pool)
        .await;
        match res {
            Ok(_) => Ok(e),
            Err(err) if is_unique_violation(&err) => Err(DsError::AlreadyExists(
                "a similar registration entry".into(),
            )),
            Err(err) => Err(err.into()),
        }
    }

    async fn fetch_entry(&self, id: &str) -> DsResult<Option<RegistrationEntry>> {
        let row = sqlx::query("SELECT data FROM registered_entries WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| entry_from_row(&r)).transpose()
    }

    async fn list_entries(&self, f: &EntryFilter) -> DsResult<Vec<RegistrationEntry>> {
        let rows = sqlx::query(
            "SELECT data FROM registered_entries
             WHERE (?1 IS NULL OR spiffe_id = ?1) AND (?2 IS NULL OR parent_id = ?2)
               AND (?3 IS NULL OR hint = ?3) AND (?4 IS NULL OR downstream = ?4)
             ORDER BY created_at, id",
        )
        .bind(&f.spiffe_id)
        .bind(&f.parent_id)
        .bind(&f.hint)
        .bind(f.downstream)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(entry_from_row).collect()
    }

    async fn update_entry(&self, entry: &RegistrationEntry) -> DsResult<RegistrationEntry> {
        let mut tx = self.write_tx().await?;
        let row =
            sqlx::query("SELECT revision_number, created_at FROM registered_entries WHERE id = ?")
                .bind(&entry.id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| DsError::NotFound("registration entry".into()))?;
        let mut e = entry.clone();
        e.revision_number = row.try_get::<i64, _>("revision_number")? + 1;
        e.created_at = row.try_get("created_at")?;
        let data = serde_json::to_string(&e).map_err(corrupt)?;
        let res = sqlx::query(
            "UPDATE registered_entries SET unique_key = ?, spiffe_id = ?, parent_id = ?, hint = ?, downstream = ?, revision_number = ?, data = ? WHERE id = ?",
        )
        .bind(unique_key(&e))
        .bind(&e.spiffe_id)
        .bind(&e.parent_id)
        .bind(&e.hint)
        .bind(e.downstream)
        .bind(e.revision_number)
        .bind(data)
        .bind(&e.id)
        .execute(&mut *tx)
        .await;
        match res {
            Ok(_) => {}
            Err(err) if is_unique_violation(&err) => {
                return Err(DsError::AlreadyExists(
                    "a similar registration entry".into(),
                ));
            }
            Err(err) => return Err(err.into()),
        }
        tx.commit().await?;
        Ok(e)
    }

    async fn delete_entry(&self, id: &str) -> DsResult<RegistrationEntry> {
        let row = sqlx::query("DELETE FROM registered_entries WHERE id = ? RETURNING data")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| DsError::NotFound("registration entry".into()))?;
        entry_from_row(&row)
    }

    async fn count_entries(&self) -> DsResult<i64> {
        Ok(sqlx::query("SELECT COUNT(*) AS n FROM registered_entries")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?)
    }

    async fn create_node(&self, node: &AttestedNode) -> DsResult<()> {
        let res = sqlx::query("INSERT INTO attested_nodes (spiffe_id, data) VALUES (?, ?)")
            .bind(&node.spiffe_id)
            .bind(node_json(node)?)
            .execute(&self.pool)
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(DsError::AlreadyExists("agent".into())),
            Err(e) => Err(e.into()),
        }
    }

    async fn fetch_node(&self, spiffe_id: &str) -> DsResult<Option<AttestedNode>> {
        let row = sqlx::query("SELECT data FROM attested_nodes WHERE spiffe_id = ?")
            .bind(spiffe_id)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            None => Ok(None),
            Some(r) => Ok(Some(node_from_row(
                spiffe_id.to_string(),
                &r.try_get::<String, _>("data")?,
            )?)),
        }
    }

    async fn list_nodes(&self) -> DsResult<Vec<AttestedNode>> {
        let rows = sqlx::query("SELECT spiffe_id, data FROM attested_nodes ORDER BY spiffe_id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| node_from_row(r.try_get("spiffe_id")?, &r.try_get::<String, _>("data")?))
            .collect()
    }

    async fn modify_node(
        &self,
        spiffe_id: &str,
        f: &(dyn for<'n> Fn(&'n mut AttestedNode) -> DsResult<()> + Send + Sync),
    ) -> DsResult<AttestedNode> {
        let mut tx = self.write_tx().await?;
        let row = sqlx::query("SELECT data, banned FROM attested_nodes WHERE spiffe_id = ?")
            .bind(spiffe_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| DsError::NotFound("agent".into()))?;
        if row.try_get::<i64, _>("banned")? != 0 {
            return Err(DsError::Banned);
        }
        let mut node = node_from_row(spiffe_id.to_string(), &row.try_get::<String, _>("data")?)?;
        f(&mut node)?;
        node.spiffe_id = spiffe_id.to_string();
        sqlx::query("UPDATE attested_nodes SET data = ? WHERE spiffe_id = ? AND banned = 0")
            .bind(node_json(&node)?)
            .bind(spiffe_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(node)
    }

    async fn ban_node(&self, spiffe_id: &str) -> DsResult<()> {
        let mut tx = self.write_tx().await?;
        let row = sqlx::query("SELECT data FROM attested_nodes WHERE spiffe_id = ?")
            .bind(spiffe_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| DsError::NotFound("agent".into()))?;
        let mut node = node_from_row(spiffe_id.to_string(), &row.try_get::<String, _>("data")?)?;
        node.serial_number.clear();
        node.new_serial_number.clear();
        sqlx::query("UPDATE attested_nodes SET data = ?, banned = 1 WHERE spiffe_id = ?")
            .bind(node_json(&node)?)
            .bind(spiffe_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn delete_node(&self, spiffe_id: &str) -> DsResult<AttestedNode> {
        let row = sqlx::query("DELETE FROM attested_nodes WHERE spiffe_id = ? RETURNING data")
            .bind(spiffe_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| DsError::NotFound("agent".into()))?;
        node_from_row(spiffe_id.to_string(), &row.try_get::<String, _>("data")?)
    }

    async fn create_join_token(&self, token: &str, expires_at: i64) -> DsResult<()> {
        let res = sqlx::query("INSERT INTO join_tokens (token, expires_at) VALUES (?, ?)")
            .bind(token)
            .bind(expires_at)
            .execute(&self.pool)
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(DsError::AlreadyExists("join token".into())),
            Err(e) => Err(e.into()),
        }
    }

    async fn take_join_token(&self, token: &str) -> DsResult<Option<i64>> {
        let row = sqlx::query("DELETE FROM join_tokens WHERE token = ? RETURNING expires_at")
            .bind(token)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| r.try_get("expires_at").map_err(DsError::from))
            .transpose()
    }

    async fn join_token_exists(&self, token: &str) -> DsResult<bool> {
        Ok(sqlx::query("SELECT 1 FROM join_tokens WHERE token = ?")
            .bind(token)
            .fetch_optional(&self.pool)
            .await?
            .is_some())
    }

    async fn fetch_bundle(&self, trust_domain: &str) -> DsResult<Option<Bundle>> {
        let row = sqlx::query("SELECT data FROM bundles WHERE trust_domain = ?")
            .bind(trust_domain)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| decode_bundle(&r.try_get::<Vec<u8>, _>("data")?))
            .transpose()
    }

    async fn list_bundles(&self) -> DsResult<Vec<Bundle>> {
        let rows = sqlx::query("SELECT data FROM bundles ORDER BY trust_domain")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| decode_bundle(&r.try_get::<Vec<u8>, _>("data")?))
            .collect()
    }

    async fn create_bundle(&self, bundle: &Bundle) -> DsResult<Bundle> {
        let mut b = bundle.clone();
        b.sequence_number = b.sequence_number.max(1);
        let res = sqlx::query("INSERT INTO bundles (trust_domain, data) VALUES (?, ?)")
            .bind(&b.trust_domain)
            .bind(b.encode_to_vec())
            .execute(&self.pool)
            .await;
        match res {
            Ok(_) => Ok(b),
            Err(e) if is_unique_violation(&e) => Err(DsError::AlreadyExists("bundle".into())),
            Err(e) => Err(e.into()),
        }
    }

    async fn update_bundle(&self, bundle: &Bundle) -> DsResult<Bundle> {
        let mut tx = self.write_tx().await?;
        let old = sqlx::query("SELECT data FROM bundles WHERE trust_domain = ?")
            .bind(&bundle.trust_domain)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| DsError::NotFound("bundle".into()))?;
        let old = decode_bundle(&old.try_get::<Vec<u8>, _>("data")?)?;
        let mut b = bundle.clone();
        b.sequence_number = old.sequence_number + 1;
        sqlx::query("UPDATE bundles SET data = ? WHERE trust_domain = ?")
            .bind(b.encode_to_vec())
            .bind(&b.trust_domain)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(b)
    }

    async fn append_bundle(&self, bundle: &Bundle) -> DsResult<Bundle> {
        let mut tx = self.write_tx().await?;
        let old = sqlx::query("SELECT data FROM bundles WHERE trust_domain = ?")
            .bind(&bundle.trust_domain)
            .fetch_optional(&mut *tx)
            .await?;
        let result = match old {
            None => {
                let mut b = bundle.clone();
                b.sequence_number = 1;
                sqlx::query("INSERT INTO bundles (trust_domain, data) VALUES (?, ?)")
                    .bind(&b.trust_domain)
                    .bind(b.encode_to_vec())
                    .execute(&mut *tx)
                    .await?;
                b
            }
            Some(row) => {
                let mut b = decode_bundle(&row.try_get::<Vec<u8>, _>("data")?)?;
                if merge_bundle(&mut b, bundle) {
                    b.sequence_number += 1;
                    sqlx::query("UPDATE bundles SET data = ? WHERE trust_domain = ?")
                        .bind(b.encode_to_vec())
                        .bind(&b.trust_domain)
                        .execute(&mut *tx)
                        .await?;
                }
                b
            }
        };
        tx.commit().await?;
        Ok(result)
    }

    async fn delete_bundle(&self, trust_domain: &str) -> DsResult<()> {
        let res = sqlx::query("DELETE FROM bundles WHERE trust_domain = ?")
            .bind(trust_domain)
            .execute(&self.pool)
            .await?;
        if res.rows_affected() == 0 {
            return Err(DsError::NotFound("bundle".into()));
        }
        Ok(())
    }

    async fn fetch_ca_journal(&self, server_id: &str) -> DsResult<Option<Vec<u8>>> {
        let row = sqlx::query("SELECT data FROM ca_journals WHERE server_id = ?")
            .bind(server_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| r.try_get("data").map_err(DsError::from))
            .transpose()
    }

    async fn set_ca_journal(&self, server_id: &str, data: &[u8]) -> DsResult<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        sqlx::query(
            "INSERT INTO ca_journals (server_id, data, updated_at) VALUES (?, ?, ?)
             ON CONFLICT(server_id) DO UPDATE SET data = excluded.data, updated_at = excluded.updated_at",
        )
        .bind(server_id)
        .bind(data)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn modify_bundle(
        &self,
        trust_domain: &str,
        f: &(dyn for<'b> Fn(&'b mut Bundle) -> DsResult<bool> + Send + Sync),
    ) -> DsResult<Bundle> {
        let mut tx = self.write_tx().await?;
        let row = sqlx::query("SELECT data FROM bundles WHERE trust_domain = ?")
            .bind(trust_domain)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| DsError::NotFound("bundle".into()))?;
        let mut b = decode_bundle(&row.try_get::<Vec<u8>, _>("data")?)?;
        if f(&mut b)? {
            b.sequence_number += 1;
            sqlx::query("UPDATE bundles SET data = ? WHERE trust_domain = ?")
                .bind(b.encode_to_vec())
                .bind(trust_domain)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
        Ok(b)
    }

    async fn list_ca_journals(&self) -> DsResult<Vec<(String, Vec<u8>)>> {
        sqlx::query("SELECT server_id, data FROM ca_journals ORDER BY server_id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| Ok((r.try_get("server_id")?, r.try_get("data")?)))
            .collect()
    }

    async fn record_agent_authorities(
        &self,
        spiffe_id: &str,
        authorities: &[String],
        seen_at: i64,
    ) -> DsResult<()> {
        sqlx::query(
            "INSERT INTO agent_svid_authorities (spiffe_id, authorities, seen_at) VALUES (?, ?, ?)
             ON CONFLICT(spiffe_id) DO UPDATE SET authorities = excluded.authorities, seen_at = excluded.seen_at",
        )
        .bind(spiffe_id)
        .bind(authorities.join(","))
        .bind(seen_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_agent_authorities(&self, since: i64) -> DsResult<Vec<super::AgentAuthorities>> {
        sqlx::query(
            "SELECT a.spiffe_id, a.authorities, a.seen_at FROM agent_svid_authorities a
             JOIN attested_nodes n ON n.spiffe_id = a.spiffe_id
             WHERE a.seen_at >= ? ORDER BY a.spiffe_id",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            let list: String = r.try_get("authorities")?;
            Ok(super::AgentAuthorities {
                spiffe_id: r.try_get("spiffe_id")?,
                authorities: list
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect(),
                seen_at: r.try_get("seen_at")?,
            })
        })
        .collect()
    }

    async fn put_key_intent(&self, i: &super::KeyIntent) -> DsResult<()> {
        sqlx::query(
            "INSERT INTO key_intents (intent_id, server_id, key_id, key_type, created_at)
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&i.intent_id)
        .bind(&i.server_id)
        .bind(&i.key_id)
        .bind(&i.key_type)
        .bind(i.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_key_intents(&self, server_id: &str) -> DsResult<Vec<super::KeyIntent>> {
        let rows = sqlx::query(
            "SELECT intent_id, server_id, key_id, key_type, created_at FROM key_intents
             WHERE server_id = ? ORDER BY created_at",
        )
        .bind(server_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(super::KeyIntent {
                    intent_id: r.try_get("intent_id")?,
                    server_id: r.try_get("server_id")?,
                    key_id: r.try_get("key_id")?,
                    key_type: r.try_get("key_type")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    async fn delete_key_intent(&self, intent_id: &str) -> DsResult<()> {
        sqlx::query("DELETE FROM key_intents WHERE intent_id = ?")
            .bind(intent_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kame_api::pb::types::{JwtKey, X509Certificate};

    async fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path().join("ds.sqlite3").to_str().unwrap())
            .await
            .unwrap();
        (dir, s)
    }

    fn entry(id: &str, spiffe: &str) -> RegistrationEntry {
        RegistrationEntry {
            id: id.into(),
            spiffe_id: spiffe.into(),
            parent_id: "spiffe://td/spire/agent/x".into(),
            selectors: vec![Selector::new("unix", "uid:0")],
            created_at: 1,
            ..Default::default()
        }
    }

    /// Issue 19 item 4 at the datastore: a write computed before a ban cannot clear it;
    /// eviction (deleting the node) lifts it.
    #[tokio::test]
    async fn node_ban_holds_against_every_later_write_until_eviction() {
        let (_d, s) = store().await;
        let id = "spiffe://td/spire/agent/x";
        let node = AttestedNode {
            spiffe_id: id.into(),
            serial_number: "01".into(),
            ..Default::default()
        };
        s.create_node(&node).await.unwrap();
        let renewed = s
            .modify_node(id, &|n: &mut AttestedNode| {
                n.new_serial_number = "02".into();
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(
            (
                renewed.serial_number.as_str(),
                renewed.new_serial_number.as_str()
            ),
            ("01", "02")
        );
        s.ban_node(id).await.unwrap();
        assert!(s.fetch_node(id).await.unwrap().unwrap().banned());
        // A write that would restore the serials (a renewal or re-attestation read before).
        let e = s
            .modify_node(id, &|n: &mut AttestedNode| {
                *n = node.clone();
                Ok(())
            })
            .await
            .unwrap_err();
        assert!(matches!(e, DsError::Banned));
        assert!(s.fetch_node(id).await.unwrap().unwrap().banned());
        // An error from the closure persists nothing; a missing node is NotFound.
        assert!(matches!(
            s.modify_node("spiffe://td/spire/agent/none", &|_: &mut AttestedNode| Ok(
                ()
            ))
            .await,
            Err(DsError::NotFound(_))
        ));
        assert!(matches!(
            s.ban_node("spiffe://td/spire/agent/none").await,
            Err(DsError::NotFound(_))
        ));
        s.delete_node(id).await.unwrap();
        s.create_node(&node).await.unwrap();
        assert!(!s.fetch_node(id).await.unwrap().unwrap().banned());
        s.modify_node(id, &|_: &mut AttestedNode| Ok(()))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn entries_crud_and_duplicate_detection() {
        let (_d, s) = store().await;
        s.create_entry(&entry("a", "spiffe://td/w")).await.unwrap();
        let dup = s
            .create_entry(&entry("b", "spiffe://td/w"))
            .await
            .unwrap_err();
        assert!(matches!(dup, DsError::AlreadyExists(_)));
        let mut other = entry("c", "spiffe://td/w");
        other.selectors.push(Selector::new("unix", "gid:0"));
        s.create_entry(&other).await.unwrap();
        assert_eq!(s.count_entries().await.unwrap(), 2);
        let mut upd = s.fetch_entry("a").await.unwrap().unwrap();
        upd.hint = "h".into();
        let upd = s.update_entry(&upd).await.unwrap();
        assert_eq!(upd.revision_number, 1);
        let filtered = s
            .list_entries(&EntryFilter {
                hint: Some("h".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(filtered.len(), 1);
        s.delete_entry("a").await.unwrap();
        assert!(matches!(
            s.delete_entry("a").await,
            Err(DsError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn join_token_is_single_use() {
        let (_d, s) = store().await;
        s.create_join_token("t", 10).await.unwrap();
        assert!(matches!(
            s.create_join_token("t", 10).await,
            Err(DsError::AlreadyExists(_))
        ));
        assert_eq!(s.take_join_token("t").await.unwrap(), Some(10));
        assert_eq!(s.take_join_token("t").await.unwrap(), None);
    }

    #[tokio::test]
    async fn bundle_sequence_bumps_on_every_change_only() {
        let (_d, s) = store().await;
        let mut b = Bundle {
            trust_domain: "td".into(),
            ..Default::default()
        };
        b.x509_authorities.push(X509Certificate {
            asn1: vec![1],
            tainted: false,
        });
        assert_eq!(s.append_bundle(&b).await.unwrap().sequence_number, 1);
        assert_eq!(
            s.append_bundle(&b).await.unwrap().sequence_number,
            1,
            "no change, no bump"
        );
        b.jwt_authorities.push(JwtKey {
            public_key: vec![2],
            key_id: "k".into(),
            expires_at: 5,
            tainted: false,
        });
        let b2 = s.append_bundle(&b).await.unwrap();
        assert_eq!(b2.sequence_number, 2);
        assert_eq!(b2.jwt_authorities.len(), 1);
        assert_eq!(s.update_bundle(&b2).await.unwrap().sequence_number, 3);
    }
}
