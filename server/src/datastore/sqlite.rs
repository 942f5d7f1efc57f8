//! SQLite implementation of [`DataStore`](super::DataStore) with sqlx and embedded migrations
//! (`migrations/sqlite`). Writes run in `BEGIN IMMEDIATE` transactions so read-modify-write
//! (bundle appends, entry updates) is serialized; WAL mode lets readers proceed meanwhile. The
//! queries are shared with PostgreSQL ([`super::sqlstore`]).

use super::sqlstore::*;
use super::*;
use kame_api::pb::types::Bundle;
use prost::Message;
use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
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
        if let Err(e) = sqlx::migrate!("./migrations/sqlite").run(&pool).await {
            pool.close().await;
            return Err(e.into());
        }
        Ok(SqliteStore { pool })
    }

    async fn write_tx(&self) -> DsResult<sqlx::Transaction<'static, sqlx::Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    fn read_pool(&self) -> &SqlitePool {
        &self.pool
    }
}

sql_datastore!(SqliteStore, lock = "");

#[cfg(test)]
mod tests {
    use super::super::conformance as c;
    use super::*;
    use std::sync::Arc;

    async fn store() -> (tempfile::TempDir, Arc<dyn DataStore>) {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path().join("ds.sqlite3").to_str().unwrap())
            .await
            .unwrap();
        (dir, Arc::new(s))
    }

    #[tokio::test]
    async fn sqlite_node_ban_holds_against_every_later_write_until_eviction() {
        c::node_ban_holds_against_every_later_write_until_eviction(&*store().await.1).await;
    }

    #[tokio::test]
    async fn sqlite_entries_crud_and_duplicate_detection() {
        c::entries_crud_and_duplicate_detection(&*store().await.1).await;
    }

    #[tokio::test]
    async fn sqlite_join_token_is_single_use() {
        c::join_token_is_single_use(&*store().await.1).await;
    }

    #[tokio::test]
    async fn sqlite_bundle_sequence_bumps_on_every_change_only() {
        c::bundle_sequence_bumps_on_every_change_only(&*store().await.1).await;
    }

    #[tokio::test]
    async fn sqlite_entry_events_follow_every_write_in_commit_order() {
        c::entry_events_follow_every_write_in_commit_order(&*store().await.1).await;
    }

    /// Two connections to one file writing at once: event ids stay contiguous.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_concurrent_writers_leave_no_gap_in_entry_events() {
        let (dir, a) = store().await;
        let b: Arc<dyn DataStore> = Arc::new(
            SqliteStore::open(dir.path().join("ds.sqlite3").to_str().unwrap())
                .await
                .unwrap(),
        );
        c::concurrent_writers_leave_no_gap_in_entry_events(a, b).await;
    }

    /// Two connections to one file appending to the transparency log at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_transparency_log_appends_from_two_stores_form_one_gapless_log() {
        let (dir, a) = store().await;
        let b: Arc<dyn DataStore> = Arc::new(
            SqliteStore::open(dir.path().join("ds.sqlite3").to_str().unwrap())
                .await
                .unwrap(),
        );
        c::transparency_log_appends_from_two_stores_form_one_gapless_log(a, b).await;
    }

    #[tokio::test]
    async fn sqlite_node_events_and_cache_follow_attest_renew_ban_evict() {
        let (dir, a) = store().await;
        let b: Arc<dyn DataStore> = Arc::new(
            SqliteStore::open(dir.path().join("ds.sqlite3").to_str().unwrap())
                .await
                .unwrap(),
        );
        c::node_events_and_cache_follow_attest_renew_ban_evict(a, b).await;
    }

    #[tokio::test]
    async fn sqlite_break_glass_records_append_in_order_and_refuse_duplicates() {
        c::break_glass_records_append_in_order_and_refuse_duplicates(&*store().await.1).await;
    }

    #[tokio::test]
    async fn sqlite_federation_relationships_crud() {
        c::federation_relationships_crud(&*store().await.1).await;
    }

    #[tokio::test]
    async fn sqlite_bundle_reads_see_writes_at_once() {
        c::bundle_reads_see_writes_at_once(&*store().await.1).await;
    }

    #[tokio::test]
    async fn sqlite_entry_cache_follows_writes_and_reloads_after_pruning() {
        let (dir, a) = store().await;
        let b: Arc<dyn DataStore> = Arc::new(
            SqliteStore::open(dir.path().join("ds.sqlite3").to_str().unwrap())
                .await
                .unwrap(),
        );
        c::entry_cache_follows_writes_and_reloads_after_pruning(a, b).await;
    }
}
