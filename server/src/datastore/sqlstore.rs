//! The [`DataStore`](super::DataStore) implementation both SQL backends share, as a macro over
//! the sqlx driver: the queries are written once, with `$N` placeholders (SQLite and PostgreSQL
//! both accept them) and the row lock each backend needs for read-modify-write (`FOR UPDATE` on
//! PostgreSQL; SQLite's `BEGIN IMMEDIATE` already serializes writers). It opens no connection
//! itself: each backend supplies `pool`, `read_pool()` and `write_tx()`.
//!
//! Every write of a registration entry appends an entry event in its own transaction, numbered
//! from a one-row counter updated last before commit. The counter's row stays locked until the
//! commit, so event ids follow commit order with no gaps, and a reader that has seen event N
//! has seen every event before it: the entry caches can follow `id > cursor` and lose nothing.

use super::{AttestedNode, DsError, DsResult, Selector};
use kame_api::pb::types::Bundle;
use prost::Message;
use serde::{Deserialize, Serialize};
use sha2::Digest;

pub(super) fn unique_key(e: &super::RegistrationEntry) -> String {
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

pub(super) fn corrupt(e: impl std::fmt::Display) -> DsError {
    DsError::Corrupt(e.to_string())
}

/// A break-glass record row from `seq, time, kind, line`.
pub(super) fn break_glass_row<R: sqlx::Row>(r: &R) -> DsResult<crate::datastore::BreakGlassRow>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let seq: i64 = r.try_get("seq")?;
    let time: i64 = r.try_get("time")?;
    Ok(crate::datastore::BreakGlassRow {
        seq: u64::try_from(seq).map_err(|_| DsError::Corrupt("break-glass seq".into()))?,
        time: u64::try_from(time).map_err(|_| DsError::Corrupt("break-glass time".into()))?,
        kind: r.try_get("kind")?,
        line: r.try_get("line")?,
    })
}

pub(super) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

/// An entry write refused by the unique key (SPIFFE ID, parent ID and selectors) is
/// AlreadyExists.
pub(super) fn similar_entry<T>(res: Result<T, sqlx::Error>) -> DsResult<()> {
    match res {
        Ok(_) => Ok(()),
        Err(err) if is_unique_violation(&err) => Err(DsError::AlreadyExists(
            "a similar registration entry".into(),
        )),
        Err(err) => Err(err.into()),
    }
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

pub(super) fn entry_from_row<R: sqlx::Row>(row: &R) -> DsResult<super::RegistrationEntry>
where
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
{
    let data: String = row.try_get("data")?;
    serde_json::from_str(&data).map_err(corrupt)
}

pub(super) fn node_from_row(spiffe_id: String, data: &str) -> DsResult<AttestedNode> {
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

pub(super) fn node_json(n: &AttestedNode) -> DsResult<String> {
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

pub(super) fn decode_bundle(data: &[u8]) -> DsResult<Bundle> {
    Bundle::decode(data).map_err(corrupt)
}

/// Appends an event of `$kind` (`entry` or `node`) for `$key` to the open transaction `tx`:
/// the counter last, so its row lock is held only from here to the commit.
macro_rules! record_event {
    ($tx:ident, $kind:ident, $key:expr) => {{
        let ev: i64 = sqlx::query(concat!(
            "UPDATE ",
            stringify!($kind),
            "_event_counter SET last_id = last_id + 1 WHERE only_row = 1 RETURNING last_id"
        ))
        .fetch_one(&mut *$tx)
        .await?
        .try_get("last_id")?;
        sqlx::query(concat!(
            "INSERT INTO ",
            stringify!($kind),
            "_events (id, ",
            event_key!($kind),
            ", created_at) VALUES ($1, $2, $3)"
        ))
        .bind(ev)
        .bind($key)
        .bind($crate::ca::now_secs() as i64)
        .execute(&mut *$tx)
        .await?;
    }};
}
pub(super) use record_event;

/// The column naming what an event of each kind changed.
macro_rules! event_key {
    (entry) => {
        "entry_id"
    };
    (node) => {
        "spiffe_id"
    };
}
pub(super) use event_key;

/// One SQL text per event kind: `by_kind!(kind, "… ", "_events …")` puts `entry` or `node`
/// between the two parts (and `entry_id` / `spiffe_id` for `{key}` uses through `event_key!`).
macro_rules! by_kind {
    ($kind:expr, $a:literal, $b:literal) => {
        match $kind {
            $crate::datastore::EventKind::Entry => concat!($a, "entry", $b),
            $crate::datastore::EventKind::Node => concat!($a, "node", $b),
        }
    };
}
pub(super) use by_kind;

/// `impl DataStore` for `$store`, whose `pool`, `read_pool()` and `write_tx()` reach the
/// database; `$lock` is appended to the SELECT of every read-modify-write.
macro_rules! sql_datastore {
    ($store:ty, lock = $lock:literal) => {
#[async_trait::async_trait]
impl $crate::datastore::DataStore for $store {
    async fn create_entry(&self, entry: &RegistrationEntry) -> DsResult<RegistrationEntry> {
        let mut e = entry.clone();
        e.revision_number = 0;
        let data = serde_json::to_string(&e).map_err(corrupt)?;
        let mut tx = self.write_tx().await?;
        let res = sqlx::query(
            "INSERT INTO registered_entries (id, unique_key, spiffe_id, parent_id, hint, downstream, revision_number, created_at, data) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
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
        .execute(&mut *tx)
        .await;
        similar_entry(res)?;
        record_event!(tx, entry, &e.id);
        tx.commit().await?;
        Ok(e)
    }

    async fn fetch_entry(&self, id: &str) -> DsResult<Option<RegistrationEntry>> {
        let row = sqlx::query("SELECT data FROM registered_entries WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| entry_from_row(&r)).transpose()
    }

    async fn list_entries(&self, f: &EntryFilter) -> DsResult<Vec<RegistrationEntry>> {
        let rows = sqlx::query(
            "SELECT data FROM registered_entries
             WHERE ($1 IS NULL OR spiffe_id = $1) AND ($2 IS NULL OR parent_id = $2)
               AND ($3 IS NULL OR hint = $3) AND ($4 IS NULL OR downstream = $4)
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
            sqlx::query(concat!("SELECT revision_number, created_at FROM registered_entries WHERE id = $1", $lock))
                .bind(&entry.id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| DsError::NotFound("registration entry".into()))?;
        let mut e = entry.clone();
        e.revision_number = row.try_get::<i64, _>("revision_number")? + 1;
        e.created_at = row.try_get("created_at")?;
        let data = serde_json::to_string(&e).map_err(corrupt)?;
        let res = sqlx::query(
            "UPDATE registered_entries SET unique_key = $1, spiffe_id = $2, parent_id = $3, hint = $4, downstream = $5, revision_number = $6, data = $7 WHERE id = $8",
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
        similar_entry(res)?;
        record_event!(tx, entry, &e.id);
        tx.commit().await?;
        Ok(e)
    }

    async fn delete_entry(&self, id: &str) -> DsResult<RegistrationEntry> {
        let mut tx = self.write_tx().await?;
        let row = sqlx::query("DELETE FROM registered_entries WHERE id = $1 RETURNING data")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| DsError::NotFound("registration entry".into()))?;
        let e = entry_from_row(&row)?;
        record_event!(tx, entry, id);
        tx.commit().await?;
        Ok(e)
    }

    async fn count_entries(&self) -> DsResult<i64> {
        Ok(sqlx::query("SELECT COUNT(*) AS n FROM registered_entries")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?)
    }

    async fn create_node(&self, node: &AttestedNode) -> DsResult<()> {
        let mut tx = self.write_tx().await?;
        let res = sqlx::query("INSERT INTO attested_nodes (spiffe_id, data) VALUES ($1, $2)")
            .bind(&node.spiffe_id)
            .bind(node_json(node)?)
            .execute(&mut *tx)
            .await;
        match res {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => {
                return Err(DsError::AlreadyExists("agent".into()));
            }
            Err(e) => return Err(e.into()),
        }
        record_event!(tx, node, &node.spiffe_id);
        tx.commit().await?;
        Ok(())
    }

    async fn fetch_node(&self, spiffe_id: &str) -> DsResult<Option<AttestedNode>> {
        let row = sqlx::query("SELECT data FROM attested_nodes WHERE spiffe_id = $1")
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
        let row = sqlx::query(concat!("SELECT data, banned FROM attested_nodes WHERE spiffe_id = $1", $lock))
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
        sqlx::query("UPDATE attested_nodes SET data = $1 WHERE spiffe_id = $2 AND banned = 0")
            .bind(node_json(&node)?)
            .bind(spiffe_id)
            .execute(&mut *tx)
            .await?;
        record_event!(tx, node, spiffe_id);
        tx.commit().await?;
        Ok(node)
    }

    async fn ban_node(&self, spiffe_id: &str) -> DsResult<()> {
        let mut tx = self.write_tx().await?;
        let row = sqlx::query(concat!("SELECT data FROM attested_nodes WHERE spiffe_id = $1", $lock))
            .bind(spiffe_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| DsError::NotFound("agent".into()))?;
        let mut node = node_from_row(spiffe_id.to_string(), &row.try_get::<String, _>("data")?)?;
        node.serial_number.clear();
        node.new_serial_number.clear();
        sqlx::query("UPDATE attested_nodes SET data = $1, banned = 1 WHERE spiffe_id = $2")
            .bind(node_json(&node)?)
            .bind(spiffe_id)
            .execute(&mut *tx)
            .await?;
        record_event!(tx, node, spiffe_id);
        tx.commit().await?;
        Ok(())
    }

    async fn delete_node(&self, spiffe_id: &str) -> DsResult<AttestedNode> {
        let mut tx = self.write_tx().await?;
        let row = sqlx::query("DELETE FROM attested_nodes WHERE spiffe_id = $1 RETURNING data")
            .bind(spiffe_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| DsError::NotFound("agent".into()))?;
        let n = node_from_row(spiffe_id.to_string(), &row.try_get::<String, _>("data")?)?;
        record_event!(tx, node, spiffe_id);
        tx.commit().await?;
        Ok(n)
    }

    async fn create_join_token(&self, token: &str, expires_at: i64) -> DsResult<()> {
        let res = sqlx::query("INSERT INTO join_tokens (token, expires_at) VALUES ($1, $2)")
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
        let row = sqlx::query("DELETE FROM join_tokens WHERE token = $1 RETURNING expires_at")
            .bind(token)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| r.try_get("expires_at").map_err(DsError::from))
            .transpose()
    }

    async fn join_token_exists(&self, token: &str) -> DsResult<bool> {
        Ok(sqlx::query("SELECT 1 FROM join_tokens WHERE token = $1")
            .bind(token)
            .fetch_optional(&self.pool)
            .await?
            .is_some())
    }

    async fn fetch_bundle(&self, trust_domain: &str) -> DsResult<Option<Bundle>> {
        let row = sqlx::query("SELECT data FROM bundles WHERE trust_domain = $1")
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
        let res = sqlx::query("INSERT INTO bundles (trust_domain, data) VALUES ($1, $2)")
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
        let old = sqlx::query(concat!("SELECT data FROM bundles WHERE trust_domain = $1", $lock))
            .bind(&bundle.trust_domain)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| DsError::NotFound("bundle".into()))?;
        let old = decode_bundle(&old.try_get::<Vec<u8>, _>("data")?)?;
        let mut b = bundle.clone();
        b.sequence_number = old.sequence_number + 1;
        sqlx::query("UPDATE bundles SET data = $1 WHERE trust_domain = $2")
            .bind(b.encode_to_vec())
            .bind(&b.trust_domain)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(b)
    }

    async fn append_bundle(&self, bundle: &Bundle) -> DsResult<Bundle> {
        let mut tx = self.write_tx().await?;
        // Created when absent; two servers appending the first bundle at once both succeed
        // (the second finds the row and merges into it).
        let mut first = bundle.clone();
        first.sequence_number = 1;
        let created = sqlx::query(
            "INSERT INTO bundles (trust_domain, data) VALUES ($1, $2) ON CONFLICT (trust_domain) DO NOTHING",
        )
        .bind(&first.trust_domain)
        .bind(first.encode_to_vec())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if created {
            tx.commit().await?;
            return Ok(first);
        }
        let row = sqlx::query(concat!("SELECT data FROM bundles WHERE trust_domain = $1", $lock))
            .bind(&bundle.trust_domain)
            .fetch_one(&mut *tx)
            .await?;
        let mut b = decode_bundle(&row.try_get::<Vec<u8>, _>("data")?)?;
        if merge_bundle(&mut b, bundle) {
            b.sequence_number += 1;
            sqlx::query("UPDATE bundles SET data = $1 WHERE trust_domain = $2")
                .bind(b.encode_to_vec())
                .bind(&b.trust_domain)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(b)
    }

    async fn delete_bundle(&self, trust_domain: &str) -> DsResult<()> {
        let res = sqlx::query("DELETE FROM bundles WHERE trust_domain = $1")
            .bind(trust_domain)
            .execute(&self.pool)
            .await?;
        if res.rows_affected() == 0 {
            return Err(DsError::NotFound("bundle".into()));
        }
        Ok(())
    }

    async fn fetch_ca_journal(&self, server_id: &str) -> DsResult<Option<Vec<u8>>> {
        let row = sqlx::query("SELECT data FROM ca_journals WHERE server_id = $1")
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
            "INSERT INTO ca_journals (server_id, data, updated_at) VALUES ($1, $2, $3)
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
        let row = sqlx::query(concat!("SELECT data FROM bundles WHERE trust_domain = $1", $lock))
            .bind(trust_domain)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| DsError::NotFound("bundle".into()))?;
        let mut b = decode_bundle(&row.try_get::<Vec<u8>, _>("data")?)?;
        if f(&mut b)? {
            b.sequence_number += 1;
            sqlx::query("UPDATE bundles SET data = $1 WHERE trust_domain = $2")
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
            "INSERT INTO agent_svid_authorities (spiffe_id, authorities, seen_at) VALUES ($1, $2, $3)
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
             WHERE a.seen_at >= $1 ORDER BY a.spiffe_id",
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

    async fn create_federation_relationship(
        &self,
        r: &kame_api::pb::types::FederationRelationship,
    ) -> DsResult<()> {
        let mut stored = r.clone();
        stored.trust_domain_bundle = None;
        let now = crate::ca::now_secs() as i64;
        let res = sqlx::query(
            "INSERT INTO federation_relationships (trust_domain, data, created_at, updated_at)
             VALUES ($1, $2, $3, $3)",
        )
        .bind(&r.trust_domain)
        .bind(stored.encode_to_vec())
        .bind(now)
        .execute(&self.pool)
        .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(DsError::AlreadyExists(format!(
                "federation relationship with {}",
                r.trust_domain
            ))),
            Err(e) => Err(e.into()),
        }
    }

    async fn fetch_federation_relationship(
        &self,
        trust_domain: &str,
    ) -> DsResult<Option<kame_api::pb::types::FederationRelationship>> {
        sqlx::query("SELECT data FROM federation_relationships WHERE trust_domain = $1")
            .bind(trust_domain)
            .fetch_optional(self.read_pool())
            .await?
            .map(|r| {
                let data: Vec<u8> = r.try_get("data")?;
                kame_api::pb::types::FederationRelationship::decode(data.as_slice())
                    .map_err(corrupt)
            })
            .transpose()
    }

    async fn list_federation_relationships(
        &self,
    ) -> DsResult<Vec<kame_api::pb::types::FederationRelationship>> {
        sqlx::query("SELECT data FROM federation_relationships ORDER BY trust_domain")
            .fetch_all(self.read_pool())
            .await?
            .iter()
            .map(|r| {
                let data: Vec<u8> = r.try_get("data")?;
                kame_api::pb::types::FederationRelationship::decode(data.as_slice())
                    .map_err(corrupt)
            })
            .collect()
    }

    async fn update_federation_relationship(
        &self,
        r: &kame_api::pb::types::FederationRelationship,
    ) -> DsResult<()> {
        let mut stored = r.clone();
        stored.trust_domain_bundle = None;
        let done = sqlx::query(
            "UPDATE federation_relationships SET data = $1, updated_at = $2 WHERE trust_domain = $3",
        )
        .bind(stored.encode_to_vec())
        .bind(crate::ca::now_secs() as i64)
        .bind(&r.trust_domain)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(DsError::NotFound(format!(
                "federation relationship with {}",
                r.trust_domain
            )));
        }
        Ok(())
    }

    async fn delete_federation_relationship(&self, trust_domain: &str) -> DsResult<()> {
        let done = sqlx::query("DELETE FROM federation_relationships WHERE trust_domain = $1")
            .bind(trust_domain)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(DsError::NotFound(format!(
                "federation relationship with {trust_domain}"
            )));
        }
        Ok(())
    }

    async fn put_key_intent(&self, i: &super::KeyIntent) -> DsResult<()> {
        sqlx::query(
            "INSERT INTO key_intents (intent_id, server_id, key_id, key_type, created_at)
             VALUES ($1, $2, $3, $4, $5)",
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
             WHERE server_id = $1 ORDER BY created_at",
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
        sqlx::query("DELETE FROM key_intents WHERE intent_id = $1")
            .bind(intent_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn last_event(&self, kind: EventKind) -> DsResult<i64> {
        Ok(sqlx::query(by_kind!(
            kind,
            "SELECT last_id FROM ",
            "_event_counter WHERE only_row = 1"
        ))
        .fetch_one(self.read_pool())
        .await?
        .try_get("last_id")?)
    }

    async fn list_events(&self, kind: EventKind, after: i64, limit: i64) -> DsResult<Vec<Event>> {
        let q = match kind {
            EventKind::Entry => "SELECT id, entry_id AS k FROM entry_events WHERE id > $1 ORDER BY id LIMIT $2",
            EventKind::Node => "SELECT id, spiffe_id AS k FROM node_events WHERE id > $1 ORDER BY id LIMIT $2",
        };
        sqlx::query(q)
            .bind(after)
            .bind(limit)
            .fetch_all(self.read_pool())
            .await?
            .iter()
            .map(|r| {
                Ok(Event {
                    id: r.try_get("id")?,
                    key: r.try_get("k")?,
                })
            })
            .collect()
    }

    async fn prune_events(&self, kind: EventKind, before: i64) -> DsResult<u64> {
        Ok(sqlx::query(by_kind!(kind, "DELETE FROM ", "_events WHERE created_at < $1"))
            .bind(before)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    async fn fetch_changed_nodes(&self, after: i64, upto: i64) -> DsResult<Vec<AttestedNode>> {
        sqlx::query(
            "SELECT spiffe_id, data FROM attested_nodes WHERE spiffe_id IN
                (SELECT spiffe_id FROM node_events WHERE id > $1 AND id <= $2)",
        )
        .bind(after)
        .bind(upto)
        .fetch_all(self.read_pool())
        .await?
        .iter()
        .map(|r| node_from_row(r.try_get("spiffe_id")?, &r.try_get::<String, _>("data")?))
        .collect()
    }

    async fn list_nodes_after(&self, after: &str, limit: i64) -> DsResult<Vec<AttestedNode>> {
        sqlx::query(
            "SELECT spiffe_id, data FROM attested_nodes WHERE spiffe_id > $1 ORDER BY spiffe_id LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(self.read_pool())
        .await?
        .iter()
        .map(|r| node_from_row(r.try_get("spiffe_id")?, &r.try_get::<String, _>("data")?))
        .collect()
    }

    async fn fetch_changed_entries(
        &self,
        after: i64,
        upto: i64,
    ) -> DsResult<Vec<RegistrationEntry>> {
        sqlx::query(
            "SELECT data FROM registered_entries WHERE id IN
                (SELECT entry_id FROM entry_events WHERE id > $1 AND id <= $2)",
        )
        .bind(after)
        .bind(upto)
        .fetch_all(self.read_pool())
        .await?
        .iter()
        .map(entry_from_row)
        .collect()
    }

    async fn list_entries_after(
        &self,
        after_id: &str,
        limit: i64,
    ) -> DsResult<Vec<RegistrationEntry>> {
        sqlx::query("SELECT data FROM registered_entries WHERE id > $1 ORDER BY id LIMIT $2")
            .bind(after_id)
            .bind(limit)
            .fetch_all(self.read_pool())
            .await?
            .iter()
            .map(entry_from_row)
            .collect()
    }

    async fn append_log_entries(&self, entries: &[$crate::datastore::LogRow]) -> DsResult<u64> {
        let n = i64::try_from(entries.len()).map_err(corrupt)?;
        let now = crate::ca::now_secs() as i64;
        let mut tx = self.write_tx().await?;
        // The counter's row stays locked until commit: appenders on other servers wait, so
        // numbers follow commit order with no gaps.
        let size: i64 = sqlx::query(
            "UPDATE ct_log_counter SET size = size + $1 WHERE only_row = 1 RETURNING size",
        )
        .bind(n)
        .fetch_one(&mut *tx)
        .await?
        .try_get("size")?;
        let first = size - n;
        // One statement per 512 rows (5 parameters each: within both databases' limits).
        for (c, chunk) in entries.chunks(512).enumerate() {
            let mut q = sqlx::QueryBuilder::new(
                "INSERT INTO ct_log_entries (seq, leaf_input, leaf_hash, extra, created_at) ",
            );
            q.push_values(chunk.iter().enumerate(), |mut b, (i, e)| {
                b.push_bind(first + (c * 512 + i) as i64)
                    .push_bind(e.leaf_input.as_slice())
                    .push_bind(&e.leaf_hash[..])
                    .push_bind(e.extra.as_slice())
                    .push_bind(now);
            });
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        u64::try_from(first).map_err(corrupt)
    }

    async fn log_size(&self) -> DsResult<u64> {
        let size: i64 = sqlx::query("SELECT size FROM ct_log_counter WHERE only_row = 1")
            .fetch_one(&self.pool)
            .await?
            .try_get("size")?;
        u64::try_from(size).map_err(corrupt)
    }

    async fn list_log_entries(
        &self,
        start: u64,
        end: u64,
    ) -> DsResult<Vec<(u64, $crate::datastore::LogRow)>> {
        sqlx::query(
            "SELECT seq, leaf_input, leaf_hash, extra FROM ct_log_entries
             WHERE seq >= $1 AND seq < $2 ORDER BY seq",
        )
        .bind(i64::try_from(start).map_err(corrupt)?)
        .bind(i64::try_from(end).map_err(corrupt)?)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            let seq: i64 = r.try_get("seq")?;
            let hash: Vec<u8> = r.try_get("leaf_hash")?;
            Ok((
                u64::try_from(seq).map_err(corrupt)?,
                $crate::datastore::LogRow {
                    leaf_input: r.try_get("leaf_input")?,
                    leaf_hash: hash.try_into().map_err(|_| corrupt("a leaf hash is not 32 bytes"))?,
                    extra: r.try_get("extra")?,
                },
            ))
        })
        .collect()
    }

    async fn log_leaf_hashes(&self, start: u64, end: u64) -> DsResult<Vec<[u8; 32]>> {
        sqlx::query(
            "SELECT leaf_hash FROM ct_log_entries WHERE seq >= $1 AND seq < $2 ORDER BY seq",
        )
        .bind(i64::try_from(start).map_err(corrupt)?)
        .bind(i64::try_from(end).map_err(corrupt)?)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            let hash: Vec<u8> = r.try_get("leaf_hash")?;
            hash.try_into().map_err(|_| corrupt("a leaf hash is not 32 bytes"))
        })
        .collect()
    }

    async fn log_leaf_times(&self, start: u64, end: u64) -> DsResult<Vec<([u8; 32], u64)>> {
        // A MerkleTreeLeaf's timestamp is its bytes 3..=10 (after version and leaf type).
        sqlx::query(
            "SELECT leaf_hash, substr(leaf_input, 3, 8) AS ts FROM ct_log_entries
             WHERE seq >= $1 AND seq < $2 ORDER BY seq",
        )
        .bind(i64::try_from(start).map_err(corrupt)?)
        .bind(i64::try_from(end).map_err(corrupt)?)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            let hash: Vec<u8> = r.try_get("leaf_hash")?;
            let ts: Vec<u8> = r.try_get("ts")?;
            let ts: [u8; 8] = ts
                .try_into()
                .map_err(|_| corrupt("a leaf input is shorter than its timestamp"))?;
            Ok((
                hash.try_into().map_err(|_| corrupt("a leaf hash is not 32 bytes"))?,
                u64::from_be_bytes(ts),
            ))
        })
        .collect()
    }

    async fn find_log_leaf(&self, leaf_hash: &[u8; 32]) -> DsResult<Option<u64>> {
        sqlx::query("SELECT MIN(seq) AS seq FROM ct_log_entries WHERE leaf_hash = $1")
            .bind(&leaf_hash[..])
            .fetch_one(&self.pool)
            .await?
            .try_get::<Option<i64>, _>("seq")?
            .map(|s| u64::try_from(s).map_err(corrupt))
            .transpose()
    }

    async fn put_tree_head(&self, h: &$crate::datastore::StoredTreeHead) -> DsResult<()> {
        sqlx::query(
            "INSERT INTO ct_tree_heads (log_id, tree_size, timestamp, root_hash, signature)
             VALUES ($5, $1, $2, $3, $4) ON CONFLICT (log_id, tree_size) DO NOTHING",
        )
        .bind(i64::try_from(h.tree_size).map_err(corrupt)?)
        .bind(i64::try_from(h.timestamp).map_err(corrupt)?)
        .bind(&h.root_hash[..])
        .bind(&h.signature)
        .bind(&h.log_id[..])
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn fetch_tree_head(
        &self,
        log_id: &[u8; 32],
        size: Option<u64>,
    ) -> DsResult<Option<$crate::datastore::StoredTreeHead>> {
        let q = match size {
            None => sqlx::query(
                "SELECT tree_size, timestamp, root_hash, signature FROM ct_tree_heads
                 WHERE log_id = $1 ORDER BY tree_size DESC LIMIT 1",
            )
            .bind(&log_id[..]),
            Some(s) => sqlx::query(
                "SELECT tree_size, timestamp, root_hash, signature FROM ct_tree_heads
                 WHERE log_id = $1 AND tree_size = $2",
            )
            .bind(&log_id[..])
            .bind(i64::try_from(s).map_err(corrupt)?),
        };
        q.fetch_optional(&self.pool)
            .await?
            .map(|r| {
                let size: i64 = r.try_get("tree_size")?;
                let ts: i64 = r.try_get("timestamp")?;
                let root: Vec<u8> = r.try_get("root_hash")?;
                Ok($crate::datastore::StoredTreeHead {
                    log_id: *log_id,
                    tree_size: u64::try_from(size).map_err(corrupt)?,
                    timestamp: u64::try_from(ts).map_err(corrupt)?,
                    root_hash: root.try_into().map_err(|_| corrupt("a root hash is not 32 bytes"))?,
                    signature: r.try_get("signature")?,
                })
            })
            .transpose()
    }

    async fn put_log_key(&self, log_id: &[u8; 32], public_key: &[u8]) -> DsResult<()> {
        sqlx::query(
            "INSERT INTO ct_log_keys (log_id, public_key, created_at) VALUES ($1, $2, $3)
             ON CONFLICT (log_id) DO NOTHING",
        )
        .bind(&log_id[..])
        .bind(public_key)
        .bind(crate::ca::now_secs() as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_log_keys(&self) -> DsResult<Vec<Vec<u8>>> {
        sqlx::query("SELECT public_key FROM ct_log_keys ORDER BY created_at, log_id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| Ok(r.try_get("public_key")?))
            .collect()
    }

    async fn append_break_glass(
        &self,
        agent_id: &str,
        rows: &[$crate::datastore::BreakGlassRow],
    ) -> DsResult<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let now = crate::ca::now_secs() as i64;
        let mut tx = self.write_tx().await?;
        // One statement per 512 rows (6 parameters each: within both databases' limits).
        for chunk in rows.chunks(512) {
            let mut q = sqlx::QueryBuilder::new(
                "INSERT INTO break_glass_records (agent_id, seq, time, kind, line, received_at) ",
            );
            let mut bad = None;
            q.push_values(chunk, |mut b, r| {
                let (seq, time) = match (i64::try_from(r.seq), i64::try_from(r.time)) {
                    (Ok(s), Ok(t)) => (s, t),
                    _ => {
                        bad = Some(r.seq);
                        (0, 0)
                    }
                };
                b.push_bind(agent_id)
                    .push_bind(seq)
                    .push_bind(time)
                    .push_bind(r.kind.as_str())
                    .push_bind(r.line.as_str())
                    .push_bind(now);
            });
            if let Some(seq) = bad {
                return Err(DsError::FailedPrecondition(format!(
                    "break-glass line {seq}: number out of range"
                )));
            }
            match q.build().execute(&mut *tx).await {
                Ok(_) => {}
                Err(e) if is_unique_violation(&e) => {
                    return Err(DsError::AlreadyExists("break-glass record line".into()));
                }
                Err(e) => return Err(e.into()),
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn last_break_glass(
        &self,
        agent_id: &str,
    ) -> DsResult<Option<$crate::datastore::BreakGlassRow>> {
        let r = sqlx::query(
            "SELECT seq, time, kind, line FROM break_glass_records WHERE agent_id = $1
             ORDER BY seq DESC LIMIT 1",
        )
        .bind(agent_id)
        .fetch_optional(&self.pool)
        .await?;
        r.map(|r| break_glass_row(&r)).transpose()
    }

    async fn list_break_glass(
        &self,
        agent_id: &str,
        limit: i64,
    ) -> DsResult<Vec<$crate::datastore::BreakGlassRow>> {
        let mut rows = sqlx::query(
            "SELECT seq, time, kind, line FROM break_glass_records WHERE agent_id = $1
             ORDER BY seq DESC LIMIT $2",
        )
        .bind(agent_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(break_glass_row)
        .collect::<DsResult<Vec<_>>>()?;
        rows.reverse();
        Ok(rows)
    }
}

    };
}
pub(super) use sql_datastore;
