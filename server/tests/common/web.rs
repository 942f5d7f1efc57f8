//! Helpers for the Web PKI federation tests: a test Web CA with certificates for
//! localhost/127.0.0.1 (made with openssl), a `kame-server` child process (for a process whose
//! system roots come from `SSL_CERT_FILE`), and a Prometheus scrape.

use super::upstream::openssl;
use kame_api::pb;
use std::path::Path;

/// A Web CA and two certificates for localhost/127.0.0.1 it signed: valid, and expired.
pub fn web_pki(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=Test Web CA",
            "-days",
            "2",
        ],
    );
    std::fs::write(
        dir.join("ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    for (name, days) in [("good", "1"), ("expired", "-1")] {
        openssl(
            dir,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                "/CN=localhost",
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                days,
                "-extfile",
                "ext",
            ],
        );
    }
}

/// A kame-server process, killed when dropped.
pub struct ChildServer {
    pub socket: std::path::PathBuf,
    pub child: std::process::Child,
}

impl ChildServer {
    /// Runs `kame-server run` on `text` (written to `dir/server.conf`, made by
    /// `config_text(dir, …)`), its system roots `ssl_cert_file`, its log in `dir/server.log`.
    pub fn spawn(dir: &Path, text: &str, ssl_cert_file: &Path) -> ChildServer {
        let conf = dir.join("server.conf");
        std::fs::write(&conf, text).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_kame-server"))
            .args(["run", "--config"])
            .arg(&conf)
            .env("SSL_CERT_FILE", ssl_cert_file)
            .stdout(std::process::Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("server.log"))
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        ChildServer {
            socket: dir.join("sock/api.sock"),
            child,
        }
    }

    pub async fn federated(&self, td: &str) -> Option<pb::types::Bundle> {
        let ch = kame_server::cli::connect(&self.socket).await.ok()?;
        pb::bundle::bundle_client::BundleClient::new(ch)
            .get_federated_bundle(pb::bundle::GetFederatedBundleRequest {
                trust_domain: td.into(),
                output_mask: None,
            })
            .await
            .ok()
            .map(|r| r.into_inner())
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn metrics(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return String::new();
    };
    let _ = s
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out
}

/// Pebble, the ACME test server, with `pebble-challtestsrv` as its DNS (every name is
/// 127.0.0.1): its directory served with the test Web CA's `good` certificate from `pki`,
/// tls-alpn-01 validated on `tls_port`, certificates valid `validity_secs`. Both are killed
/// when dropped.
pub struct Pebble {
    pub port: u16,
    pub management: u16,
    pebble: std::process::Child,
    dns: std::process::Child,
}

impl Pebble {
    pub fn start(pki: &Path, tls_port: u16, validity_secs: u64) -> Pebble {
        let free = kame_keymanager::testing::free_port;
        let (dns_port, dns_mgmt) = (free(), free());
        let dns = std::process::Command::new("pebble-challtestsrv")
            .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
            .args(["-management", &format!("127.0.0.1:{dns_mgmt}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("pebble-challtestsrv (Debian package pebble)");
        let (port, management, http) = (free(), free(), free());
        let conf = pki.join("pebble.json");
        std::fs::write(
            &conf,
            serde_json::json!({"pebble": {
                "listenAddress": format!("127.0.0.1:{port}"),
                "managementListenAddress": format!("127.0.0.1:{management}"),
                "certificate": pki.join("good.pem"),
                "privateKey": pki.join("good.key"),
                "httpPort": http,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
                "certificateValidityPeriod": validity_secs,
            }})
            .to_string(),
        )
        .unwrap();
        let pebble = std::process::Command::new("pebble")
            .arg("-config")
            .arg(&conf)
            .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(std::fs::File::create(pki.join("pebble.log")).unwrap())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("pebble (Debian package pebble)");
        let p = Pebble {
            port,
            management,
            pebble,
            dns,
        };
        let t = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
            || std::net::TcpStream::connect(("127.0.0.1", management)).is_err()
        {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(20),
                "pebble did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        p
    }

    pub fn directory_url(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.port)
    }

    /// The root Pebble issues under (it makes a new one at every start), as PEM.
    pub fn root(&self, pki: &Path) -> String {
        let o = std::process::Command::new(kame_keymanager::testing::venv_tool("python"))
            .arg("-c")
            .arg(
                "import ssl, sys, urllib.request\n\
                 ctx = ssl.create_default_context(cafile=sys.argv[2])\n\
                 sys.stdout.write(urllib.request.urlopen(sys.argv[1], context=ctx).read().decode())",
            )
            .arg(format!("https://127.0.0.1:{}/roots/0", self.management))
            .arg(pki.join("ca.pem"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in [&mut self.pebble, &mut self.dns] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
