//! The crash-safe key lifecycle against the real services: kame-server (the binary) is killed
//! at a failpoint between a remote key's creation and the CA journal that names it, then
//! started again. The keys in moto_server (AWS KMS) and OpenBao (Vault Transit) are counted
//! before and after: the interrupted key is reused, and when its intent is lost the reconcile
//! pass disposes of it; either way no orphan is left and no extra key stays in service.

mod common;

use kame_keymanager::KeyManager;
use kame_keymanager::testing::{Bao, Moto};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn write_conf(dir: &Path, km_block: &str) -> PathBuf {
    let text = common::config_text(dir, common::free_port(), &common::Opts::default());
    let disk = format!(
        "KeyManager \"disk\" {{\n        plugin_data {{\n            keys_path = \"{}/data/keys.json\"\n        }}\n    }}",
        dir.display()
    );
    assert!(text.contains(&disk));
    let conf = dir.join("server.conf");
    std::fs::write(&conf, text.replace(&disk, km_block)).unwrap();
    conf
}

/// Runs the kame-server binary until it aborts at `failpoint`.
fn crash_at(conf: &Path, failpoint: &str) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kame-server"))
        .args(["run", "--config"])
        .arg(conf)
        .env("KAME_TEST_FAILPOINT", failpoint)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(!status.success(), "the server stopped at the failpoint");
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            assert!(err.contains(&format!("failpoint {failpoint}")), "{err}");
            return;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server did not reach failpoint {failpoint}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts the server in this process (no failpoint here), returns its key inventory after
/// start-up (which reconciles), and stops it.
async fn restart(conf: &Path) -> kame_server::ca::KeyInventory {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cfg = kame_server::config::Config::load(conf, false).unwrap();
    let running = kame_server::run::start(cfg).await.unwrap();
    let inv = running.ctx.ca.reconcile_keys().await.unwrap();
    running.stop().await;
    inv
}

async fn forget_intents(dir: &Path) {
    use kame_server::datastore::DataStore;
    let ds = kame_server::datastore::sqlite::SqliteStore::open(
        dir.join("data/datastore.sqlite3").to_str().unwrap(),
    )
    .await
    .unwrap();
    let server_id = std::fs::read_to_string(dir.join("data/server_id")).unwrap();
    let intents = ds.list_key_intents(server_id.trim()).await.unwrap();
    assert_eq!(
        intents.len(),
        1,
        "the interrupted generation left its intent"
    );
    for i in intents {
        ds.delete_key_intent(&i.intent_id).await.unwrap();
    }
}

fn kms_config(moto: &Moto, server_id: &str) -> kame_keymanager::aws_kms::AwsKmsConfig {
    kame_keymanager::aws_kms::AwsKmsConfig {
        region: "us-east-1".into(),
        access_key_id: Some("testing".into()),
        secret_access_key: Some("testing".into()),
        endpoint: Some(moto.endpoint.clone()),
        trust_domain: common::TD.into(),
        server_id: server_id.into(),
        key_policy: None,
        key_tags: vec![],
        call_timeout: Duration::from_secs(10),
        tag_discovery: false,
    }
}

fn kms_block(moto: &Moto, server_id: &str) -> String {
    format!(
        "KeyManager \"aws_kms\" {{\n plugin_data {{\n region = \"us-east-1\"\n access_key_id = \"testing\"\n secret_access_key = \"testing\"\n endpoint = \"{}\"\n key_identifier_value = \"{server_id}\"\n }}\n }}",
        moto.endpoint
    )
}

/// This server's keys in KMS that are in service (tagged active), and the orphans among them.
async fn kms_count(moto: &Moto, server_id: &str) -> (Vec<String>, Vec<String>) {
    let km = kame_keymanager::aws_kms::AwsKmsKeyManager::open(kms_config(moto, server_id))
        .await
        .unwrap();
    let active: Vec<String> = km
        .trust_domain_keys()
        .await
        .unwrap()
        .into_iter()
        .filter(|k| k.server_id.as_deref() == Some(server_id))
        .map(|k| k.arn)
        .collect();
    let orphans = km
        .orphans()
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.arn)
        .collect();
    (active, orphans)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_lifecycle_aws_kms_crash_after_create_reuses_the_key_and_leaves_no_orphan() {
    let moto = Moto::start();
    for failpoint in ["after_remote_create", "after_key_create"] {
        let dir = tempfile::tempdir().unwrap();
        let sid = format!("crash-{failpoint}").replace('_', "-");
        let conf = write_conf(dir.path(), &kms_block(&moto, &sid));
        crash_at(&conf, failpoint);
        // One key exists: the server's first (x509-CA-A), not yet in the journal.
        let (active, orphans) = kms_count(&moto, &sid).await;
        assert_eq!(active.len(), 1, "{failpoint}: {active:?}");
        if failpoint == "after_remote_create" {
            assert_eq!(orphans, active, "created, not yet aliased");
        }
        let interrupted = active[0].clone();
        let inv = restart(&conf).await;
        // Reused, not recreated: two keys in service (X.509 CA and JWT signer), no orphan.
        let (active, orphans) = kms_count(&moto, &sid).await;
        assert_eq!(active.len(), 2, "{failpoint}: {active:?}");
        assert!(orphans.is_empty(), "{failpoint}: {orphans:?}");
        assert!(
            active.contains(&interrupted),
            "{failpoint}: the interrupted key is reused"
        );
        assert_eq!(
            (inv.named, inv.disposed, inv.remaining),
            (2, 0, 0),
            "{inv:?}"
        );
        let km = kame_keymanager::aws_kms::AwsKmsKeyManager::open(kms_config(&moto, &sid))
            .await
            .unwrap();
        assert_eq!(km.arn("x509-CA-A").unwrap(), interrupted);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_lifecycle_aws_kms_lost_intent_orphan_is_disposed_by_reconcile() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let sid = "lost-intent";
    let conf = write_conf(dir.path(), &kms_block(&moto, sid));
    crash_at(&conf, "after_remote_create");
    let (_, orphans) = kms_count(&moto, sid).await;
    assert_eq!(orphans.len(), 1);
    // The datastore loses the intent (restored from an older backup, say).
    forget_intents(dir.path()).await;
    let _ = restart(&conf).await;
    let (active, left) = kms_count(&moto, sid).await;
    assert_eq!(active.len(), 2, "{active:?}");
    assert!(left.is_empty(), "{left:?}");
    assert!(
        !active.contains(&orphans[0]),
        "the orphan is out of service"
    );
}

fn vault_block(bao: &Bao, server_id: &str) -> String {
    format!(
        "KeyManager \"hashicorp_vault\" {{\n plugin_data {{\n vault_addr = \"{}\"\n key_identifier_value = \"{server_id}\"\n token_auth {{\n token = \"{}\"\n }}\n }}\n }}",
        bao.addr, bao.root_token
    )
}

fn vault_names(bao: &Bao) -> Vec<String> {
    let list = bao.json(&["list", "transit/keys"]);
    list.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// This server's signing keys in Transit (not its liveness marker).
fn vault_keys(bao: &Bao, server_id: &str) -> Vec<String> {
    vault_names(bao)
        .into_iter()
        .filter(|n| n.starts_with(&format!("{server_id}-")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_lifecycle_vault_crash_after_create_reuses_the_key_and_lost_intent_is_reconciled() {
    let bao = Bao::start();
    // Interrupted, intent kept: the key is reused.
    let dir = tempfile::tempdir().unwrap();
    let conf = write_conf(dir.path(), &vault_block(&bao, "v-crash"));
    crash_at(&conf, "after_remote_create");
    let before = vault_keys(&bao, "v-crash");
    assert_eq!(before.len(), 1, "{before:?}");
    let inv = restart(&conf).await;
    let after = vault_keys(&bao, "v-crash");
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(after.contains(&before[0]), "reused");
    assert!(
        vault_names(&bao).contains(&"kame-liveness-v-crash".to_string()),
        "the reconcile pass stamps this server's liveness"
    );
    assert_eq!(
        (inv.named, inv.disposed, inv.remaining),
        (2, 0, 0),
        "{inv:?}"
    );
    // Interrupted, intent lost: a new key, and the orphan deleted by the reconcile pass.
    let dir = tempfile::tempdir().unwrap();
    let conf = write_conf(dir.path(), &vault_block(&bao, "v-lost"));
    crash_at(&conf, "after_remote_create");
    let before = vault_keys(&bao, "v-lost");
    forget_intents(dir.path()).await;
    let _ = restart(&conf).await;
    let after = vault_keys(&bao, "v-lost");
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(!after.contains(&before[0]), "the orphan is deleted");
    let km = kame_keymanager::hashicorp_vault::VaultKeyManager::open(
        kame_keymanager::hashicorp_vault::VaultConfig {
            vault_addr: bao.addr.clone(),
            namespace: None,
            ca_cert_path: None,
            insecure_skip_verify: false,
            transit_engine_path: "transit".into(),
            auth: kame_keymanager::hashicorp_vault::VaultAuth::Token(
                bao.root_token.as_str().into(),
            ),
            server_id: "v-lost".into(),
            call_timeout: Duration::from_secs(5),
        },
    )
    .await
    .unwrap();
    assert!(km.orphans().await.unwrap().is_empty());
}

async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// The key inventory of the reconcile pass, served as Prometheus metrics
/// (`telemetry { Prometheus { host port } }`, SPIRE's block).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_lifecycle_inventory_is_served_as_prometheus_metrics() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let text = common::config_text(dir.path(), common::free_port(), &common::Opts::default());
    let with = format!(
        "{text}\ntelemetry {{\n    Prometheus {{\n        host = \"127.0.0.1\"\n        port = {port}\n    }}\n}}\n"
    );
    for (bad, want) in [
        (
            with.replace(&format!("port = {port}"), ""),
            "telemetry.Prometheus.port",
        ),
        (with.replace("Prometheus {", "Statsd {"), "telemetry.Statsd"),
    ] {
        let e = kame_server::config::Config::parse(&bad, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{want}: {e}");
    }
    let cfg = kame_server::config::Config::parse(&with, false).unwrap();
    let running = kame_server::run::start(cfg).await.unwrap();
    let body = http_get(port, "/metrics").await;
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(
        body.contains("kame_keymanager_keys{backend=\"disk\",state=\"named\"} 2"),
        "{body}"
    );
    assert!(
        body.contains("kame_keymanager_reconcile_passes_total{backend=\"disk\"} 1"),
        "{body}"
    );
    running.ctx.ca.reconcile_keys().await.unwrap();
    let body = http_get(port, "/metrics").await;
    assert!(
        body.contains("kame_keymanager_reconcile_passes_total{backend=\"disk\"} 2"),
        "{body}"
    );
    assert!(http_get(port, "/other").await.starts_with("HTTP/1.1 404"));
    running.stop().await;
}
