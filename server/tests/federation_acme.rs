//! The `https_web` bundle endpoint with ACME, against Pebble (the ACME test server, started
//! here with its own DNS): the server registers an account, proves `localhost` with
//! tls-alpn-01 on the endpoint's port, and serves the certificate, which a plain TLS client
//! (Python's `ssl`) verifies against Pebble's root; a restart serves the stored certificate
//! with the stored account; the certificate is renewed at two thirds of its lifetime. A
//! directory that refuses the account (terms not accepted) leaves the endpoint without a
//! certificate, nothing stored, and the ACME server's reason in the log.
//!
//! The kame-server under test runs as a child process whose system roots (`SSL_CERT_FILE`)
//! are the test Web CA that signed Pebble's own HTTPS certificate.

mod common;

use common::web::{ChildServer, Pebble, web_pki};
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// A TLS client on 127.0.0.1:`port` naming `localhost`, verifying against `ca` (PEM file),
/// offering `alpn` if given, that GETs `/`: the SHA-256 of the certificate it was shown and
/// the number of keys in the bundle served, or the error.
fn probe(port: u16, ca: &Path, alpn: Option<&str>) -> Result<(String, usize), String> {
    let o = std::process::Command::new(kame_keymanager::testing::venv_tool("python"))
        .arg("-c")
        .arg(
            "import hashlib, json, socket, ssl, sys\n\
             ctx = ssl.create_default_context(cafile=sys.argv[2])\n\
             if sys.argv[3]:\n    ctx.set_alpn_protocols([sys.argv[3]])\n\
             with socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=10) as s:\n\
             \x20   with ctx.wrap_socket(s, server_hostname='localhost') as t:\n\
             \x20       der = t.getpeercert(binary_form=True)\n\
             \x20       t.sendall(b'GET / HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n')\n\
             \x20       data = b''\n\
             \x20       while True:\n\
             \x20           c = t.recv(65536)\n\
             \x20           if not c:\n\
             \x20               break\n\
             \x20           data += c\n\
             head, body = data.split(b'\\r\\n\\r\\n', 1)\n\
             assert head.startswith(b'HTTP/1.1 200'), head\n\
             print(hashlib.sha256(der).hexdigest(), len(json.loads(body)['keys']))",
        )
        .arg(port.to_string())
        .arg(ca)
        .arg(alpn.unwrap_or(""))
        .output()
        .map_err(|e| e.to_string())?;
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let mut it = out.split_whitespace();
    match (it.next(), it.next().and_then(|n| n.parse().ok())) {
        (Some(fp), Some(n)) => Ok((fp.to_string(), n)),
        _ => Err(format!("unexpected output {out:?}")),
    }
}

fn acme_server_text(dir: &Path, ep: u16, pebble: &Pebble, tos: bool) -> String {
    config_text(
        dir,
        free_port(),
        &Opts {
            extra_server: Box::leak(
                format!(
                    r#"federation {{
        bundle_endpoint {{
            address = "127.0.0.1"
            port = {ep}
            refresh_hint = "1m"
            profile "https_web" {{
                acme {{
                    domain_name = "localhost"
                    email = "ops@example.org"
                    directory_url = "{url}"
                    tos_accepted = {tos}
                }}
            }}
        }}
    }}"#,
                    url = pebble.directory_url()
                )
                .into_boxed_str(),
            ),
            ..Default::default()
        },
    )
    .replace("log_level = \"WARN\"", "log_level = \"INFO\"")
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_https_web_acme_certificate_obtained_verified_stored_and_renewed() {
    let pki = tempfile::tempdir().unwrap();
    web_pki(pki.path());
    let ep = free_port();
    // 45 s certificates: renewed 30 s after issuance.
    let pebble = Pebble::start(pki.path(), ep, 45);
    let root = pki.path().join("pebble-root.pem");
    std::fs::write(&root, pebble.root(pki.path())).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let text = acme_server_text(dir.path(), ep, &pebble, true);
    let server = ChildServer::spawn(dir.path(), &text, &pki.path().join("ca.pem"));

    // Obtained through tls-alpn-01 and served: verified against Pebble's root alone.
    let t = Instant::now();
    let (first, keys) = loop {
        match probe(ep, &root, None) {
            Ok(r) => break r,
            Err(e) => assert!(
                t.elapsed() < Duration::from_secs(60),
                "no ACME certificate served: {e}\n{}",
                std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default()
            ),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(keys >= 1, "the bundle is served");
    // Not verifiable with another root: the certificate really is Pebble's.
    assert!(probe(ep, &pki.path().join("ca.pem"), None).is_err());
    // A validation handshake outside an order gets nothing.
    let e = probe(ep, &root, Some("acme-tls/1")).unwrap_err();
    assert!(e.contains("SSL") || e.contains("ssl"), "{e}");

    let store = dir.path().join("data/bundle-acme");
    assert_eq!(mode(&store.join("key.pem")), 0o600);
    assert_eq!(mode(&store.join("account.json")), 0o600);
    let account = std::fs::read(store.join("account.json")).unwrap();

    // A restart serves the stored certificate at once, with the stored account.
    drop(server);
    let server = ChildServer::spawn(dir.path(), &text, &pki.path().join("ca.pem"));
    let t = Instant::now();
    let again = loop {
        if let Ok((fp, _)) = probe(ep, &root, None) {
            break fp;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "not serving after restart"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(again, first, "the stored certificate is served");
    assert_eq!(std::fs::read(store.join("account.json")).unwrap(), account);

    // Renewed at two thirds of its lifetime: another certificate, verified the same way.
    let t = Instant::now();
    loop {
        match probe(ep, &root, None) {
            Ok((fp, _)) if fp != first => break,
            _ => assert!(
                t.elapsed() < Duration::from_secs(60),
                "not renewed:\n{}",
                std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default()
            ),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(std::fs::read(store.join("account.json")).unwrap(), account);
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert_eq!(log.matches("ACME certificate obtained").count(), 2, "{log}");
    assert_eq!(log.matches("ACME account registered").count(), 1, "{log}");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_https_web_acme_refused_account_leaves_no_certificate_and_says_why() {
    let pki = tempfile::tempdir().unwrap();
    web_pki(pki.path());
    let ep = free_port();
    let pebble = Pebble::start(pki.path(), ep, 3600);
    let root = pki.path().join("pebble-root.pem");
    std::fs::write(&root, pebble.root(pki.path())).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let text = acme_server_text(dir.path(), ep, &pebble, false);
    let server = ChildServer::spawn(dir.path(), &text, &pki.path().join("ca.pem"));
    let log_path = dir.path().join("server.log");
    let t = Instant::now();
    let log = loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains("ACME certificate not obtained") {
            break log;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{log}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        log.contains("Terms of Service have not been accepted"),
        "{log}"
    );
    assert!(
        log.contains("did not agree to the terms of service"),
        "{log}"
    );
    // The endpoint is up and has nothing to show; nothing was stored.
    assert!(std::net::TcpStream::connect(("127.0.0.1", ep)).is_ok());
    assert!(probe(ep, &root, None).is_err());
    let store = dir.path().join("data/bundle-acme");
    assert!(!store.join("account.json").exists());
    assert!(!store.join("cert.pem").exists());
    drop(server);
}
