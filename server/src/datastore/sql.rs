//! `DataStore "sql"` (SPIRE's name): its `plugin_data`, checked when the configuration loads,
//! and how the store is opened at start. `database_type = "sqlite3"` (the embedded default),
//! whose file must sit in a directory that exists or is `data_dir`, so a typo does not start
//! the server on a fresh, empty datastore; or `"postgres"` with SPIRE's keys
//! (`connection_string`, `ro_connection_string`, `max_open_conns`, `max_idle_conns`,
//! `conn_max_lifetime`, `disable_migration`), whose connection strings are parsed here so a
//! mistake is a configuration error. It reads and writes no state itself.

use super::DataStore;
use crate::catalog::PluginEnv;
use crate::run::RunError;
use kame_api::conf::{ConfigError, Section, invalid};
use std::sync::Arc;

/// The plugin's name in configuration.
pub const TYPE: &str = "sql";

/// A configured datastore, ready to open.
#[async_trait::async_trait]
pub trait DataStorePlugin: Send + Sync + std::fmt::Debug {
    /// Opens the store and brings its schema up to date.
    async fn open(&self) -> Result<Arc<dyn DataStore>, RunError>;

    /// The concrete configuration (for tests that check what was parsed).
    fn as_any(&self) -> &dyn std::any::Any;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sql {
    /// A SQLite file (or `sqlite:` URL).
    Sqlite { connection_string: String },
    /// A PostgreSQL database, shared by every server of the trust domain.
    Postgres(super::postgres::PgSettings),
}

/// Builds `DataStore "sql"` from its `plugin_data`.
pub fn plugin(env: &PluginEnv, data: Section) -> Result<Arc<dyn DataStorePlugin>, ConfigError> {
    let key = |k: &str| data.key(k);
    let database_type = data
        .string("database_type")?
        .ok_or_else(|| data.missing("database_type"))?;
    if database_type != "sqlite3" && database_type != "postgres" {
        return Err(invalid(
            &key("database_type"),
            format!("{database_type:?} is not supported (expected \"sqlite3\" or \"postgres\")"),
        ));
    }
    let connection_string = data
        .string("connection_string")?
        .ok_or_else(|| data.missing("connection_string"))?;
    if connection_string.is_empty() {
        return Err(invalid(&key("connection_string"), "must not be empty"));
    }
    let sql = if database_type == "postgres" {
        Sql::Postgres(postgres(&data, connection_string)?)
    } else {
        if let Some(path) = sqlite_path(&connection_string) {
            crate::catalog::files::creatable(
                &key("connection_string"),
                std::path::Path::new(path),
                &env.data_dir,
            )?;
        }
        // SPIRE accepts its pool keys for SQLite too; they are checked and do not apply.
        let _ = postgres_pool_keys(&data)?;
        Sql::Sqlite { connection_string }
    };
    data.finish()?;
    Ok(Arc::new(sql))
}

/// The PostgreSQL keys, each checked.
fn postgres(
    data: &Section,
    connection_string: String,
) -> Result<super::postgres::PgSettings, ConfigError> {
    let key = |k: &str| data.key(k);
    let check = |k: &str, s: &str| {
        super::postgres::connect_options(s)
            .map(|_| ())
            .map_err(|m| invalid(&key(k), m))
    };
    check("connection_string", &connection_string)?;
    let ro_connection_string = data.nonempty("ro_connection_string")?;
    if let Some(ro) = &ro_connection_string {
        check("ro_connection_string", ro)?;
    }
    let (max_open_conns, max_idle_conns, conn_max_lifetime, disable_migration) =
        postgres_pool_keys(data)?;
    Ok(super::postgres::PgSettings {
        connection_string: connection_string.into(),
        ro_connection_string: ro_connection_string.map(Into::into),
        max_open_conns,
        max_idle_conns,
        conn_max_lifetime,
        disable_migration,
    })
}

type PoolKeys = (Option<u32>, Option<u32>, Option<std::time::Duration>, bool);

fn postgres_pool_keys(data: &Section) -> Result<PoolKeys, ConfigError> {
    let key = |k: &str| data.key(k);
    let count = |k: &str| -> Result<Option<u32>, ConfigError> {
        data.int(k)?
            .map(|n| {
                u32::try_from(n)
                    .ok()
                    .filter(|n| *n >= 1 || k == "max_idle_conns")
                    .ok_or_else(|| invalid(&key(k), format!("{n} is not a valid count")))
            })
            .transpose()
    };
    Ok((
        count("max_open_conns")?,
        count("max_idle_conns")?,
        data.duration("conn_max_lifetime")?,
        data.take_bool("disable_migration")?.unwrap_or(false),
    ))
}

/// The database file a SQLite connection string names (None: in memory).
fn sqlite_path(connection_string: &str) -> Option<&str> {
    let path = connection_string
        .strip_prefix("sqlite://")
        .or_else(|| connection_string.strip_prefix("sqlite:"))
        .map(|p| p.split('?').next().unwrap_or(p))
        .unwrap_or(connection_string);
    (!path.is_empty() && path != ":memory:").then_some(path)
}

#[async_trait::async_trait]
impl DataStorePlugin for Sql {
    async fn open(&self) -> Result<Arc<dyn DataStore>, RunError> {
        Ok(match self {
            Sql::Sqlite { connection_string } => {
                Arc::new(super::sqlite::SqliteStore::open(connection_string).await?)
            }
            Sql::Postgres(pg) => Arc::new(super::postgres::PgStore::open(pg).await?),
        })
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(data_dir: &std::path::Path, conn: &str) -> Result<(), ConfigError> {
        let text = format!(
            "DataStore \"sql\" {{\n plugin_data {{\n database_type = \"sqlite3\"\n connection_string = {conn:?}\n }}\n }}"
        );
        let mut root = kame_api::conf::parse_root(&text, None)?;
        let (_, data) = kame_api::conf::single_plugin(&mut root, "DataStore")?;
        let mut env = PluginEnv::new(kame_api::TrustDomain::parse("example.org").unwrap());
        env.data_dir = data_dir.to_path_buf();
        plugin(&env, data).map(|_| ())
    }

    /// A typo in the datastore path is refused, not a fresh empty datastore: its directory
    /// must exist or be data_dir.
    #[test]
    fn datastore_directory_must_exist_or_be_data_dir() {
        let d = tempfile::tempdir().unwrap();
        let dd = d.path().join("data");
        parse(&dd, &dd.join("ds.sqlite3").display().to_string()).unwrap();
        parse(std::path::Path::new("data"), "./data/ds.sqlite3").unwrap();
        parse(&dd, &d.path().join("ds.sqlite3").display().to_string()).unwrap();
        parse(&dd, "ds.sqlite3").unwrap();
        parse(&dd, "sqlite::memory:").unwrap();
        let typo = d.path().join("dtaa").join("ds.sqlite3");
        let e = parse(&dd, &typo.display().to_string())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("DataStore.sql.plugin_data.connection_string")
                && e.contains("does not exist"),
            "{e}"
        );
        let e = parse(&dd, &format!("sqlite://{}?mode=rwc", typo.display()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
    }
}

#[cfg(test)]
mod postgres_config_tests {
    use super::*;

    fn parse(body: &str) -> Result<Arc<dyn DataStorePlugin>, ConfigError> {
        let text = format!("DataStore \"sql\" {{\n plugin_data {{\n {body}\n }}\n }}");
        let mut root = kame_api::conf::parse_root(&text, None)?;
        let (_, data) = kame_api::conf::single_plugin(&mut root, "DataStore")?;
        plugin(
            &PluginEnv::new(kame_api::TrustDomain::parse("example.org").unwrap()),
            data,
        )
    }

    /// SPIRE's PostgreSQL keys, each read and checked; a bad value names its key and never
    /// echoes a password.
    #[test]
    fn postgres_config_reads_spire_keys_and_names_the_bad_one() {
        let p = parse(
            r#"database_type = "postgres"
            connection_string = "dbname=kame user=kame password='s3cret pw' host=db port=5433 sslmode=verify-full sslrootcert=/etc/ca.pem"
            ro_connection_string = "postgres://kame@replica/kame"
            max_open_conns = 20
            max_idle_conns = 4
            conn_max_lifetime = "30m"
            disable_migration = true"#,
        )
        .unwrap();
        let Some(Sql::Postgres(pg)) = p.as_any().downcast_ref::<Sql>() else {
            panic!("not postgres: {p:?}");
        };
        assert_eq!(pg.max_open_conns, Some(20));
        assert_eq!(pg.max_idle_conns, Some(4));
        assert_eq!(
            pg.conn_max_lifetime,
            Some(std::time::Duration::from_secs(1800))
        );
        assert!(pg.disable_migration);
        assert!(pg.ro_connection_string.is_some());
        assert!(
            !format!("{p:?}").contains("s3cret"),
            "passwords never printed"
        );
        for (body, key) in [
            (
                r#"database_type = "postgres"
                connection_string = "dbname=kame password=s3cret sslmode=sometimes""#,
                "connection_string",
            ),
            (
                r#"database_type = "postgres"
                connection_string = "dbname=kame"
                ro_connection_string = "dbname=kame bogus=1""#,
                "ro_connection_string",
            ),
            (
                r#"database_type = "postgres"
                connection_string = "dbname=kame"
                max_open_conns = 0"#,
                "max_open_conns",
            ),
            (
                r#"database_type = "postgres"
                connection_string = "dbname=kame"
                conn_max_lifetime = "soon""#,
                "conn_max_lifetime",
            ),
            (
                r#"database_type = "mysql"
                connection_string = "x""#,
                "database_type",
            ),
        ] {
            let e = parse(body).unwrap_err().to_string();
            assert!(
                e.contains(&format!("DataStore.sql.plugin_data.{key}")),
                "{key}: {e}"
            );
            assert!(!e.contains("s3cret"), "{e}");
        }
    }
}
