//! Federation with an `https_web` bundle endpoint (`serving_cert_file`): the endpoint serves
//! with a Web PKI certificate from files, a plain TLS client (Python's `ssl`) verifies it
//! against its CA, and the peer (a `kame-server` process whose system roots are the test CA,
//! through `SSL_CERT_FILE`) fetches it with no bootstrap. A certificate that has expired,
//! replaced on disk and picked up by the reload, is refused by the peer, which says why,
//! counts the failure and keeps its last good bundle.

mod common;

use common::web::{ChildServer, metrics, web_pki};
use common::*;
use kame_api::pb;
use std::time::{Duration, Instant};

const OTHER: &str = "other.org";

fn roots(b: &pb::types::Bundle) -> Vec<Vec<u8>> {
    b.x509_authorities.iter().map(|c| c.asn1.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_https_web_serving_cert_file_fetched_with_system_roots_and_expired_refused() {
    let pki = tempfile::tempdir().unwrap();
    web_pki(pki.path());
    let serving = pki.path().join("serving");
    std::fs::create_dir(&serving).unwrap();
    std::fs::copy(pki.path().join("good.pem"), serving.join("cert.pem")).unwrap();
    std::fs::copy(pki.path().join("good.key"), serving.join("key.pem")).unwrap();

    let pb_ = free_port();
    let b = TestServer::start(Opts {
        trust_domain: OTHER,
        extra_server: Box::leak(
            format!(
                r#"federation {{
        bundle_endpoint {{
            address = "127.0.0.1"
            port = {pb_}
            refresh_hint = "1m"
            profile "https_web" {{
                serving_cert_file {{
                    cert_file_path = "{d}/cert.pem"
                    key_file_path = "{d}/key.pem"
                    file_sync_interval = "1s"
                }}
            }}
        }}
    }}"#,
                d = serving.display()
            )
            .into_boxed_str(),
        ),
        ..Default::default()
    })
    .await;
    let url = format!("https://localhost:{pb_}/");
    // A: a separate process, its Web roots the test CA, its metrics on a port of its own.
    let adir = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    let text = config_text(
        adir.path(),
        free_port(),
        &Opts {
            extra_server: Box::leak(
                format!(
                    r#"federation {{
        federates_with "{OTHER}" {{
            bundle_endpoint_url = "{url}"
            bundle_endpoint_profile "https_web" {{}}
        }}
    }}"#
                )
                .into_boxed_str(),
            ),
            ..Default::default()
        },
    )
    .replace("log_level = \"WARN\"", "log_level = \"INFO\"")
        + &format!(
            "telemetry {{\n Prometheus {{\n host = \"127.0.0.1\"\n port = {metrics_port}\n }}\n}}\n"
        );
    let a = ChildServer::spawn(adir.path(), &text, &pki.path().join("ca.pem"));
    let log = adir.path().join("server.log");

    // No bootstrap needed with Web PKI: A fetches B's bundle at start.
    let want = roots(&b.bundle().await);
    let t = Instant::now();
    while a.federated(OTHER).await.is_none_or(|x| roots(&x) != want) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "A never got B's bundle"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A plain TLS client verifies the endpoint against the Web CA alone.
    let py = std::process::Command::new(kame_keymanager::testing::venv_tool("python"))
        .arg("-c")
        .arg(
            "import json, ssl, sys, urllib.request\n\
             ctx = ssl.create_default_context(cafile=sys.argv[2])\n\
             doc = json.load(urllib.request.urlopen(sys.argv[1], context=ctx))\n\
             print(doc['spiffe_refresh_hint'], len(doc['keys']))",
        )
        .arg(&url)
        .arg(pki.path().join("ca.pem"))
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    assert!(String::from_utf8_lossy(&py.stdout).starts_with("60 "));

    // The endpoint's certificate replaced by an expired one (picked up within a second):
    // at its next poll (every 15 s) A refuses it, says why, counts it, keeps its bundle.
    let before = a.federated(OTHER).await.unwrap();
    std::fs::copy(pki.path().join("expired.pem"), serving.join("cert.pem")).unwrap();
    std::fs::copy(pki.path().join("expired.key"), serving.join("key.pem")).unwrap();
    let t = Instant::now();
    loop {
        let m = metrics(metrics_port).await;
        if m.contains(&format!(
            "kame_federation_refresh_total{{trust_domain=\"{OTHER}\",result=\"error\"}} 1"
        )) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(40),
            "no refused refresh counted:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(a.federated(OTHER).await.unwrap(), before, "last good kept");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged
            .lines()
            .any(|l| l.contains("federated bundle refresh failed")
                && l.to_lowercase().contains("expired")),
        "{logged}"
    );
    drop(a);
    b.stop().await;
}
