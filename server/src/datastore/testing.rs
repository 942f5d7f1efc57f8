//! A throwaway PostgreSQL cluster for tests and the load generator: `initdb` (as the
//! `postgres` user when run as root) in a temporary directory, `pg_ctl` on a free port of
//! 127.0.0.1 with its socket in that directory, stopped and removed on drop. Nothing is
//! shared with a system cluster. It panics on failure: it is for tests only.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    extra: Vec<String>,
}

/// Debian's newest PostgreSQL (`/usr/lib/postgresql/<version>/bin`).
fn pg_bin() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (./scripts/bootstrap installs it)")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, b)| b)
        .expect("a PostgreSQL server under /usr/lib/postgresql")
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

impl PgCluster {
    /// A new cluster, started.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A new cluster started with extra server settings (`-c name=value` pairs).
    pub fn start_with(settings: &[(&str, &str)]) -> Self {
        let cluster = Self::init(settings);
        cluster.up();
        cluster
    }

    /// A new cluster that accepts TLS (and plain) connections, its certificate for
    /// 127.0.0.1 issued by a test CA whose certificate is [`PgCluster::tls_ca`].
    pub fn start_tls() -> Self {
        let cluster = Self::init(&[
            ("ssl", "on"),
            ("ssl_cert_file", "server.crt"),
            ("ssl_key_file", "server.key"),
        ]);
        let d = cluster.dir.path().join("data");
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&d)
                .output()
                .expect("openssl runs");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        run(&[
            &["req", "-x509"][..],
            &ec[..],
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=Kame test PostgreSQL CA",
            ][..],
        ]
        .concat());
        run(&[
            &["req"][..],
            &ec[..],
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ][..],
        ]
        .concat());
        std::fs::write(d.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").expect("ext file");
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ]);
        std::fs::copy(d.join("ca.crt"), cluster.tls_ca()).expect("CA copy");
        std::fs::set_permissions(
            d.join("server.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .expect("key mode");
        if is_root() {
            let ok = Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(&d)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "cannot give the certificates to the postgres user");
        }
        cluster.up();
        cluster
    }

    /// The test CA's certificate (PEM) of a [`PgCluster::start_tls`] cluster.
    pub fn tls_ca(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    fn init(settings: &[(&str, &str)]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kame-pg")
            .tempdir()
            .expect("temp dir");
        if is_root() {
            let ok = Command::new("chown")
                .arg("postgres:postgres")
                .arg(dir.path())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "cannot give the cluster directory to the postgres user");
        }
        let bin = pg_bin();
        let data = dir.path().join("data");
        let out = Self::as_owner(&bin.join("initdb"), dir.path())
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8"])
            .args(["--locale=C.UTF-8", "--no-sync"])
            .output()
            .expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PgCluster {
            port: kame_keymanager::testing::free_port(),
            dir,
            bin,
            extra: settings
                .iter()
                .map(|(k, v)| format!("-c {k}={v}"))
                .collect(),
        }
    }

    fn as_owner(program: &Path, cwd: &Path) -> Command {
        let mut c = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        c.current_dir(cwd);
        c
    }

    /// The cluster's directory (owned by `postgres`), for files it must read.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the (stopped) server.
    pub fn up(&self) {
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c max_connections=300 {}",
            self.port,
            self.dir.path().display(),
            self.extra.join(" ")
        );
        let out = Self::as_owner(&self.bin.join("pg_ctl"), self.dir.path())
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-l")
            .arg(self.dir.path().join("pg.log"))
            .args(["-w", "-t", "60", "-o", &opts, "start"])
            .output()
            .expect("pg_ctl runs");
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("pg.log")).unwrap_or_default()
        );
    }

    /// Stops the server (fast shutdown: sessions are disconnected).
    pub fn down(&self) {
        let _ = Self::as_owner(&self.bin.join("pg_ctl"), self.dir.path())
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "fast", "-w", "stop"])
            .output();
    }

    /// A PostgreSQL client program, connecting to this cluster as `postgres` over TCP.
    fn client(&self, program: &str) -> Command {
        let mut c = Self::as_owner(&self.bin.join(program), self.dir.path());
        c.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
        ]);
        c
    }

    /// Creates database `name` and returns a keyword-form connection string for it, over
    /// TCP without TLS.
    pub fn create_database(&self, name: &str) -> String {
        let out = self
            .client("createdb")
            .arg(name)
            .output()
            .expect("createdb runs");
        assert!(
            out.status.success(),
            "createdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.connection_string(name)
    }

    /// A keyword-form connection string for database `name` (no TLS).
    pub fn connection_string(&self, name: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={name} sslmode=disable",
            self.port
        )
    }

    /// Runs one SQL statement through psql and returns its output (unaligned, tuples only).
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = self
            .client("psql")
            .args(["-d", db, "-At", "-c", sql])
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "psql failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.down();
    }
}
