//! PostgreSQL implementation of [`DataStore`](super::DataStore): several servers share one
//! database with no leader. The queries are SQLite's ([`super::sqlstore`]), with row locks
//! (`SELECT … FOR UPDATE`) for read-modify-write; migrations (`migrations/postgres`) run under
//! sqlx's advisory lock, so servers starting together apply them once. Connection strings are
//! accepted in both forms lib/pq (and so SPIRE) accepts: a `postgres://` URL and the keyword
//! form `dbname=… user=… host=… port=… sslmode=…`, with lib/pq's default `sslmode=require`.
//! Passwords in connection strings stay in [`Secret`]s and are never printed.

use super::sqlstore::*;
use super::*;
use kame_api::Secret;
use kame_api::pb::types::Bundle;
use prost::Message;
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};
use std::str::FromStr;
use std::time::Duration;

/// How long a request waits for a connection before the datastore counts as unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// What `DataStore "sql"` says about a PostgreSQL database (SPIRE's keys).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PgSettings {
    pub connection_string: Secret,
    pub ro_connection_string: Option<Secret>,
    pub max_open_conns: Option<u32>,
    pub max_idle_conns: Option<u32>,
    pub conn_max_lifetime: Option<Duration>,
    pub disable_migration: bool,
}

#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    ro: Option<PgPool>,
}

/// Parses a connection string in either form. Errors name the part that is wrong, never the
/// value (it may be a password).
pub fn connect_options(conn: &str) -> Result<PgConnectOptions, String> {
    if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
        let opts = PgConnectOptions::from_str(conn)
            .map_err(|e| format!("not a valid PostgreSQL URL: {}", url_error(&e)))?;
        let query = conn.split_once('?').map(|(_, q)| q).unwrap_or("");
        let has_sslmode = query
            .split('&')
            .any(|kv| kv.split('=').next() == Some("sslmode"));
        return Ok(if has_sslmode {
            opts
        } else {
            opts.ssl_mode(PgSslMode::Require)
        });
    }
    let mut opts = PgConnectOptions::new_without_pgpass().ssl_mode(PgSslMode::Require);
    for (k, v) in keywords(conn)? {
        opts = match k.as_str() {
            "host" | "hostaddr" if v.starts_with('/') => opts.socket(&v),
            "host" | "hostaddr" => opts.host(&v),
            "port" => opts.port(
                v.parse()
                    .map_err(|_| "port: not a port number".to_string())?,
            ),
            "dbname" => opts.database(&v),
            "user" => opts.username(&v),
            "password" => opts.password(&v),
            "sslmode" => opts.ssl_mode(PgSslMode::from_str(&v).map_err(|_| {
                "sslmode: expected disable, allow, prefer, require, verify-ca or verify-full"
                    .to_string()
            })?),
            "sslrootcert" => opts.ssl_root_cert(&v),
            "sslcert" => opts.ssl_client_cert(&v),
            "sslkey" => opts.ssl_client_key(&v),
            "application_name" => opts.application_name(&v),
            other => {
                return Err(format!(
                    "unknown keyword {other:?} (known: host, hostaddr, port, dbname, user, \
                     password, sslmode, sslrootcert, sslcert, sslkey, application_name)"
                ));
            }
        };
    }
    Ok(opts)
}

/// sqlx's URL errors can quote the URL (and so a password): keep only their kind.
fn url_error(e: &sqlx::Error) -> &'static str {
    match e {
        sqlx::Error::Configuration(_) => "bad syntax or an unknown parameter",
        _ => "bad syntax",
    }
}

/// lib/pq's keyword form: `key=value` pairs separated by spaces; a value may be quoted with
/// single quotes, and `\` escapes the next character.
fn keywords(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = vec![];
    let mut it = s.chars().peekable();
    loop {
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        if it.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = it.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        if it.next() != Some('=') {
            return Err(format!("{key:?} has no \"=\" after it"));
        }
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if it.next_if_eq(&'\'').is_some() {
            loop {
                match it.next() {
                    None => return Err(format!("{key}: unterminated quoted value")),
                    Some('\'') => break,
                    Some('\\') => match it.next() {
                        Some(c) => value.push(c),
                        None => return Err(format!("{key}: unterminated quoted value")),
                    },
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = it.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(n) = it.next() {
                        value.push(n);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        if key.is_empty() {
            return Err("a value with no keyword before it".into());
        }
        out.push((key, value));
    }
}

impl PgStore {
    /// Connects and brings the schema up to date (or, with `disable_migration`, checks that
    /// it is).
    pub async fn open(s: &PgSettings) -> DsResult<Self> {
        let opts = connect_options(s.connection_string.expose()).map_err(DsError::Config)?;
        let pool = pool_options(s).connect_with(opts).await?;
        let migrator = sqlx::migrate!("./migrations/postgres");
        let ready = if s.disable_migration {
            check_schema(&pool, &migrator).await
        } else {
            migrator.run(&pool).await.map_err(DsError::from)
        };
        if let Err(e) = ready {
            pool.close().await;
            return Err(e);
        }
        let ro = match &s.ro_connection_string {
            None => None,
            Some(ro) => {
                let opts = connect_options(ro.expose()).map_err(DsError::Config)?;
                Some(pool_options(s).connect_with(opts).await?)
            }
        };
        Ok(PgStore { pool, ro })
    }

    async fn write_tx(&self) -> DsResult<sqlx::Transaction<'static, sqlx::Postgres>> {
        Ok(self.pool.begin().await?)
    }

    fn read_pool(&self) -> &PgPool {
        self.ro.as_ref().unwrap_or(&self.pool)
    }

    /// Connections open in the read-write pool (for the load generator's report).
    pub fn connections(&self) -> u32 {
        self.pool.size()
    }
}

fn pool_options(s: &PgSettings) -> PgPoolOptions {
    let max = s.max_open_conns.unwrap_or(16).max(1);
    let mut o = PgPoolOptions::new()
        .max_connections(max)
        .min_connections(s.max_idle_conns.unwrap_or(0).min(max).min(2))
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .idle_timeout(Duration::from_secs(600))
        .test_before_acquire(true);
    if let Some(l) = s.conn_max_lifetime {
        o = o.max_lifetime(l);
    }
    o
}

/// With migrations disabled, the schema must already be the one this server needs.
async fn check_schema(pool: &PgPool, migrator: &sqlx::migrate::Migrator) -> DsResult<()> {
    let applied: Vec<i64> = match sqlx::query_scalar(
        "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
    )
    .fetch_all(pool)
    .await
    {
        Ok(v) => v,
        Err(sqlx::Error::Database(d)) if d.code().as_deref() == Some("42P01") => vec![],
        Err(e) => return Err(e.into()),
    };
    let missing: Vec<i64> = migrator
        .iter()
        .map(|m| m.version)
        .filter(|v| !applied.contains(v))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(DsError::Schema(format!(
        "disable_migration is set but the database lacks schema version(s) {missing:?}; \
         start one server without disable_migration to apply them"
    )))
}

sql_datastore!(PgStore, lock = " FOR UPDATE");

#[cfg(test)]
mod tests {
    use super::super::conformance as c;
    use super::super::testing::PgCluster;
    use super::*;
    use std::sync::Arc;

    fn settings(conn: String) -> PgSettings {
        PgSettings {
            connection_string: conn.into(),
            ..Default::default()
        }
    }

    async fn open(pg: &PgCluster, db: &str) -> Arc<dyn DataStore> {
        Arc::new(
            PgStore::open(&settings(pg.connection_string(db)))
                .await
                .unwrap(),
        )
    }

    /// The behaviour SQLite is tested for, on a real PostgreSQL cluster; two stores on one
    /// database stand for two servers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_datastore_conformance() {
        let pg = PgCluster::start();
        for db in [
            "ban", "crud", "tokens", "bundles", "events", "gaps", "cache", "nodes", "bcache",
            "fedrel", "ctlog", "bglass",
        ] {
            pg.create_database(db);
        }
        c::node_ban_holds_against_every_later_write_until_eviction(&*open(&pg, "ban").await).await;
        c::entries_crud_and_duplicate_detection(&*open(&pg, "crud").await).await;
        c::join_token_is_single_use(&*open(&pg, "tokens").await).await;
        c::bundle_sequence_bumps_on_every_change_only(&*open(&pg, "bundles").await).await;
        c::entry_events_follow_every_write_in_commit_order(&*open(&pg, "events").await).await;
        c::concurrent_writers_leave_no_gap_in_entry_events(
            open(&pg, "gaps").await,
            open(&pg, "gaps").await,
        )
        .await;
        c::transparency_log_appends_from_two_stores_form_one_gapless_log(
            open(&pg, "ctlog").await,
            open(&pg, "ctlog").await,
        )
        .await;
        c::entry_cache_follows_writes_and_reloads_after_pruning(
            open(&pg, "cache").await,
            open(&pg, "cache").await,
        )
        .await;
        c::node_events_and_cache_follow_attest_renew_ban_evict(
            open(&pg, "nodes").await,
            open(&pg, "nodes").await,
        )
        .await;
        c::bundle_reads_see_writes_at_once(&*open(&pg, "bcache").await).await;
        c::federation_relationships_crud(&*open(&pg, "fedrel").await).await;
        c::break_glass_records_append_in_order_and_refuse_duplicates(&*open(&pg, "bglass").await)
            .await;
    }

    /// Servers starting together on an empty database: migrations run once, every server
    /// opens; join tokens taken by several servers at once go to exactly one; the first
    /// bundle appended by several at once is one bundle holding everything.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_servers_starting_and_racing_together() {
        let pg = PgCluster::start();
        let conn = pg.create_database("kame");
        let mut opens = vec![];
        for _ in 0..6 {
            let s = settings(conn.clone());
            opens.push(tokio::spawn(async move { PgStore::open(&s).await }));
        }
        let mut stores: Vec<Arc<dyn DataStore>> = vec![];
        for o in opens {
            stores.push(Arc::new(o.await.unwrap().unwrap()));
        }
        assert_eq!(
            pg.psql("kame", "SELECT count(*) FROM _sqlx_migrations"),
            "5",
            "each migration applied once"
        );
        for t in 0..10 {
            stores[0]
                .create_join_token(&format!("t{t}"), 99)
                .await
                .unwrap();
        }
        let mut takes = vec![];
        for t in 0..10 {
            for s in &stores {
                let s = s.clone();
                takes.push(tokio::spawn(async move {
                    s.take_join_token(&format!("t{t}")).await.unwrap().is_some()
                }));
            }
        }
        let mut won = 0;
        for t in takes {
            won += t.await.unwrap() as usize;
        }
        assert_eq!(won, 10, "each token taken exactly once");
        let mut appends = vec![];
        for (i, s) in stores.iter().enumerate() {
            let s = s.clone();
            appends.push(tokio::spawn(async move {
                let b = Bundle {
                    trust_domain: "td".into(),
                    x509_authorities: vec![kame_api::pb::types::X509Certificate {
                        asn1: vec![i as u8],
                        tainted: false,
                    }],
                    ..Default::default()
                };
                s.append_bundle(&b).await.unwrap()
            }));
        }
        for a in appends {
            a.await.unwrap();
        }
        let b = stores[1].fetch_bundle("td").await.unwrap().unwrap();
        assert_eq!(b.x509_authorities.len(), 6);
        assert_eq!(b.sequence_number, 6, "one creation and five merges");
    }

    /// `disable_migration` on a database without the schema is refused with what to do; once
    /// a server has migrated it, it opens.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_disable_migration_requires_the_schema() {
        let pg = PgCluster::start();
        let conn = pg.create_database("kame");
        let mut s = settings(conn);
        s.disable_migration = true;
        let e = PgStore::open(&s).await.unwrap_err().to_string();
        assert!(
            e.contains("disable_migration") && e.contains("[1, 2, 3, 4, 5]"),
            "{e}"
        );
        assert_eq!(
            pg.psql("kame", "SELECT to_regclass('registered_entries') IS NULL"),
            "t"
        );
        s.disable_migration = false;
        PgStore::open(&s).await.unwrap();
        s.disable_migration = true;
        PgStore::open(&s).await.unwrap();
    }

    /// TLS to the database: `verify-full` against the cluster's CA connects (and the session
    /// is encrypted); against another CA it is refused; `require` encrypts without checking,
    /// as lib/pq; a cluster without TLS refuses `require` (the default).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_tls_verify_full_require_and_wrong_ca() {
        let pg = PgCluster::start_tls();
        pg.create_database("kame");
        let port = pg.port;
        let ca = pg.tls_ca();
        let full = format!(
            "host=127.0.0.1 port={port} user=postgres dbname=kame sslmode=verify-full sslrootcert={}",
            ca.display()
        );
        let s = PgStore::open(&settings(full)).await.unwrap();
        s.create_entry(&c::entry("a", "spiffe://td/a"))
            .await
            .unwrap();
        let encrypted = pg.psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE ssl AND datname = 'kame'",
        );
        assert_ne!(encrypted, "0", "the store's sessions use TLS");
        let plain = pg.psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE NOT ssl AND datname = 'kame'",
        );
        assert_eq!(plain, "0");
        drop(s);
        // Another CA: refused.
        let other = PgCluster::start_tls();
        let wrong = format!(
            "postgresql://postgres@127.0.0.1:{port}/kame?sslmode=verify-full&sslrootcert={}",
            other.tls_ca().display()
        );
        assert!(PgStore::open(&settings(wrong)).await.is_err());
        // The default (require) on the URL form: encrypted, not verified.
        PgStore::open(&settings(format!(
            "postgres://postgres@127.0.0.1:{port}/kame"
        )))
        .await
        .unwrap();
        // A cluster without TLS refuses the default.
        let plain_pg = PgCluster::start();
        plain_pg.create_database("kame");
        let e = PgStore::open(&settings(format!(
            "host=127.0.0.1 port={} user=postgres dbname=kame",
            plain_pg.port
        )))
        .await
        .unwrap_err();
        assert!(e.is_unavailable() || matches!(e, DsError::Db(_)), "{e:?}");
    }

    /// The database restarted under a running store: calls fail as Unavailable (never
    /// Internal) while it is down, and work again once it is back, with no reopening.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_restart_is_unavailable_then_recovers() {
        let pg = PgCluster::start();
        let conn = pg.create_database("kame");
        let s = PgStore::open(&settings(conn)).await.unwrap();
        s.create_entry(&c::entry("a", "spiffe://td/a"))
            .await
            .unwrap();
        pg.down();
        let e = s
            .create_entry(&c::entry("b", "spiffe://td/b"))
            .await
            .unwrap_err();
        assert!(e.is_unavailable(), "{e:?}");
        let st = crate::service::ds_status(e);
        assert_eq!(st.code(), tonic::Code::Unavailable, "{st:?}");
        assert!(s.fetch_entry("a").await.unwrap_err().is_unavailable());
        pg.up();
        s.create_entry(&c::entry("b", "spiffe://td/b"))
            .await
            .unwrap();
        assert_eq!(s.count_entries().await.unwrap(), 2);
    }

    #[test]
    fn keyword_form_as_lib_pq() {
        let kv = keywords(
            "dbname=kame user = 'ka me' password='a\\'b c' host=/run/pg port=5433 sslmode=disable",
        )
        .unwrap();
        assert_eq!(
            kv,
            vec![
                ("dbname".into(), "kame".into()),
                ("user".into(), "ka me".into()),
                ("password".into(), "a'b c".into()),
                ("host".into(), "/run/pg".into()),
                ("port".into(), "5433".into()),
                ("sslmode".into(), "disable".into()),
            ]
        );
        for bad in ["dbname", "dbname='x", "=x", "a=b c"] {
            assert!(keywords(bad).is_err(), "{bad}");
        }
        connect_options("dbname=kame host=127.0.0.1 port=5432 sslmode=verify-full").unwrap();
        let e = connect_options("dbname=kame sslmode=sometimes").unwrap_err();
        assert!(e.contains("sslmode"), "{e}");
        let e = connect_options("dbname=kame passwrd=x").unwrap_err();
        assert!(e.contains("passwrd"), "{e}");
        let e = connect_options("port=99999").unwrap_err();
        assert!(e.contains("port"), "{e}");
    }

    /// lib/pq's default sslmode is require, in both forms, unless the string says otherwise.
    #[test]
    fn sslmode_defaults_to_require() {
        let d = |s: &str| format!("{:?}", connect_options(s).unwrap().get_ssl_mode());
        assert_eq!(d("dbname=kame"), "Require");
        assert_eq!(d("postgres://u@h/kame"), "Require");
        assert_eq!(d("postgres://u@h/kame?sslmode=disable"), "Disable");
        assert_eq!(
            d("postgresql://u@h/kame?application_name=x&sslmode=verify-ca"),
            "VerifyCa"
        );
    }

    /// A password never appears in an error about its string.
    #[test]
    fn errors_do_not_quote_passwords() {
        for s in [
            "postgres://u:hunter2@h:notaport/kame",
            "password=hunter2 sslmode=bogus",
            "password=hunter2 bogus=1",
        ] {
            let e = connect_options(s).unwrap_err();
            assert!(!e.contains("hunter2"), "{e}");
        }
    }
}
