use super::*;
use crate::testing::Bao;

fn config(bao: &Bao, server_id: &str, auth: VaultAuth) -> VaultConfig {
    VaultConfig {
        vault_addr: bao.addr.clone(),
        namespace: None,
        ca_cert_path: None,
        insecure_skip_verify: false,
        transit_engine_path: "transit".into(),
        auth,
        server_id: server_id.into(),
        call_timeout: Duration::from_secs(5),
    }
}

fn root(bao: &Bao) -> VaultAuth {
    VaultAuth::Token(bao.root_token.as_str().into())
}

#[test]
fn vault_rfc3339_times() {
    assert_eq!(rfc3339_secs("1970-01-01T00:00:00Z"), Some(0));
    assert_eq!(
        rfc3339_secs("2026-11-23T08:17:32.198285786Z"),
        Some(1_795_421_852)
    );
    assert_eq!(rfc3339_secs("2000-02-29T12:00:00Z"), Some(951_825_600));
    assert_eq!(rfc3339_secs("garbage"), None);
    assert_eq!(
        rfc3339_secs("2026-11-23T03:17:32.5-05:00"),
        rfc3339_secs("2026-11-23T08:17:32Z")
    );
    assert_eq!(
        rfc3339_secs("2026-11-23T09:17:32+01:00"),
        Some(1_795_421_852)
    );
    assert_eq!(rfc3339_secs("2026-11-23T08:17:32"), None, "no zone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_passes_keymanager_conformance_on_openbao() {
    let bao = Bao::start();
    let km = VaultKeyManager::open(config(&bao, "server-a", root(&bao)))
        .await
        .unwrap();
    crate::conformance::run_all(km.as_ref()).await;
    crate::conformance::lifecycle(km.as_ref()).await;
    // Reopened: the same keys; another server: none.
    let again = VaultKeyManager::open(config(&bao, "server-a", root(&bao)))
        .await
        .unwrap();
    let mut a = km.public_keys().await.unwrap();
    let mut b = again.public_keys().await.unwrap();
    a.sort_by(|x, y| x.id.cmp(&y.id));
    b.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(a, b);
    assert!(again.leftovers().is_empty(), "{:?}", again.leftovers());
    let other = VaultKeyManager::open(config(&bao, "server-b", root(&bao)))
        .await
        .unwrap();
    assert!(other.public_keys().await.unwrap().is_empty());
}

/// SPIRE's names, non-exportable keys, the replaced key deleted, and a key rotated out of
/// band still signing with the version Kame pinned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_names_keys_as_spire_deletes_replaced_and_pins_the_version() {
    let bao = Bao::start();
    let km = VaultKeyManager::open(config(&bao, "srv-1", root(&bao)))
        .await
        .unwrap();
    let first = km.generate_key("x509-CA-A", KeyType::EcP256).await.unwrap();
    let name = km.key_name("x509-CA-A").unwrap();
    assert_eq!(km.key_id_of(&name).as_deref(), Some("x509-CA-A"));
    assert!(
        name.starts_with("srv-1-") && name.ends_with("-x509-CA-A"),
        "{name}"
    );
    let k = bao.json(&["read", &format!("transit/keys/{name}")]);
    assert_eq!(k["data"]["exportable"], false);
    assert_eq!(k["data"]["type"], "ecdsa-p256");
    km.generate_key("x509-CA-A", KeyType::EcP256).await.unwrap();
    let second = km.key_name("x509-CA-A").unwrap();
    assert_ne!(name, second);
    let list = bao.json(&["list", "transit/keys"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        !names.contains(&name.as_str()),
        "the replaced key is deleted"
    );
    assert!(names.contains(&second.as_str()));
    let _ = first;
    // Rotated out of band: Kame keeps signing with the version whose public key it has.
    bao.cli(&["write", "-f", &format!("transit/keys/{second}/rotate")]);
    let pk = km.public_key("x509-CA-A").await.unwrap();
    let sig = km
        .sign("x509-CA-A", b"m", SignOpts::for_key(KeyType::EcP256))
        .await
        .unwrap();
    aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
        &pk.spki_der,
    )
    .verify(b"m", &sig.bytes)
    .expect("signed with the pinned version");
    // After a restart the newest version is current, until the CA selects the key its
    // journal names: version 1 again, pinned.
    let again = VaultKeyManager::open(config(&bao, "srv-1", root(&bao)))
        .await
        .unwrap();
    assert_ne!(again.public_key("x509-CA-A").await.unwrap(), pk);
    let sel = again
        .select("x509-CA-A", &pk.fingerprint)
        .await
        .unwrap()
        .expect("version 1 is found");
    assert_eq!(sel, pk);
    let sig = again
        .sign("x509-CA-A", b"m2", SignOpts::for_key(KeyType::EcP256))
        .await
        .unwrap();
    aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
        &pk.spki_der,
    )
    .verify(b"m2", &sig.bytes)
    .expect("signed with the selected version");
}

/// AppRole: a revoked token is replaced by a new login; a short-lived token is renewed
/// before it expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_approle_renews_its_token_and_logs_in_again_when_refused() {
    let bao = Bao::start();
    bao.cli(&["auth", "enable", "approle"]);
    let policy = bao.dir.path().join("kame.hcl");
    std::fs::write(
            &policy,
            "path \"transit/*\" { capabilities = [\"create\", \"read\", \"update\", \"delete\", \"list\"] }\n",
        )
        .unwrap();
    bao.cli(&["policy", "write", "kame", &policy.display().to_string()]);
    bao.cli(&[
        "write",
        "auth/approle/role/kame",
        "token_policies=kame",
        "token_ttl=3s",
        "token_max_ttl=10m",
    ]);
    let role_id = bao.json(&["read", "auth/approle/role/kame/role-id"])["data"]["role_id"]
        .as_str()
        .unwrap()
        .to_string();
    let secret_id =
        bao.json(&["write", "-f", "auth/approle/role/kame/secret-id"])["data"]["secret_id"]
            .as_str()
            .unwrap()
            .to_string();
    let auth = VaultAuth::AppRole {
        mount: "approle".into(),
        role_id,
        secret_id: secret_id.clone().into(),
    };
    assert!(!format!("{auth:?}").contains(&secret_id), "never printed");
    let km = VaultKeyManager::open(config(&bao, "approle-srv", auth))
        .await
        .unwrap();
    km.generate_key("k", KeyType::EcP256).await.unwrap();
    let token = km
        .session()
        .current()
        .unwrap()
        .client
        .settings
        .token
        .clone();
    // Past the 3 s TTL: renewed, same token.
    tokio::time::sleep(Duration::from_secs(5)).await;
    km.sign("k", b"m", SignOpts::for_key(KeyType::EcP256))
        .await
        .expect("the token was renewed");
    assert_eq!(
        km.session().current().unwrap().client.settings.token,
        token,
        "renewed, not replaced"
    );
    // Revoked: the next call is refused, Kame logs in again and the call succeeds.
    bao.cli(&["token", "revoke", &token]);
    km.sign("k", b"m", SignOpts::for_key(KeyType::EcP256))
        .await
        .expect("logged in again");
    assert_ne!(km.session().current().unwrap().client.settings.token, token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_sweeps_only_servers_with_a_stale_liveness_marker() {
    let bao = Bao::start();
    let open = |id: &'static str| VaultKeyManager::open(config(&bao, id, root(&bao)));
    let me = open("alive").await.unwrap();
    let dead = open("dead").await.unwrap();
    let unmarked = open("unmarked").await.unwrap();
    // A live server whose id starts with the dead one's, and another application's key
    // whose name starts with the dead server's prefix.
    let dead2 = open("dead-2").await.unwrap();
    for km in [&me, &dead, &unmarked, &dead2] {
        km.generate_key("k", KeyType::EcP256).await.unwrap();
    }
    bao.cli(&[
        "write",
        "-f",
        "transit/keys/dead-payments",
        "type=ecdsa-p256",
    ]);
    me.refresh().await.unwrap();
    dead.refresh().await.unwrap();
    dead.refresh().await.unwrap();
    let one_version = bao.json(&["read", "transit/keys/kame-liveness-dead"]);
    assert_eq!(
        one_version["data"]["latest_version"], 1,
        "the marker stays one version"
    );
    let later = now_secs() + 15 * 86400;
    // Nothing is stale now.
    assert!(me.sweep(now_secs()).await.unwrap().is_empty());
    let swept = me.sweep(later).await.unwrap();
    assert_eq!(
        swept,
        vec![
            dead.key_name("k").unwrap(),
            "kame-liveness-dead".to_string()
        ]
    );
    let names = me.list().await.unwrap();
    assert!(
        names.contains(&"dead-payments".to_string()),
        "not Kame's shape: kept"
    );
    assert!(
        names.contains(&dead2.key_name("k").unwrap()),
        "server dead-2 (no marker) is not taken for server dead"
    );
    let names = me.list().await.unwrap();
    assert!(
        names.contains(&me.key_name("k").unwrap()),
        "own keys are never swept"
    );
    assert!(names.contains(&"kame-liveness-alive".to_string()));
    assert!(
        names.contains(&unmarked.key_name("k").unwrap()),
        "a server without a marker is left alone"
    );
}

/// TLS certificate auth over a TLS listener whose CA comes from `ca_cert_path`: a client
/// certificate from a CA the cert auth method trusts logs in; one from another CA does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_cert_auth_over_tls_with_ca_cert_path() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let bao = Bao::start_tls();
    let d = bao.dir.path();
    let p = |n: &str| d.join(n).display().to_string();
    let openssl = |args: &[&str]| {
        let o = std::process::Command::new("openssl")
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for ca in ["trusted", "other"] {
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &p(&format!("{ca}-ca.key")),
            "-out",
            &p(&format!("{ca}-ca.pem")),
            "-subj",
            &format!("/CN={ca} client CA"),
            "-days",
            "1",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ]);
        openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &p(&format!("{ca}-client.key")),
            "-out",
            &p(&format!("{ca}-client.csr")),
            "-subj",
            "/CN=kame-server",
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &p(&format!("{ca}-client.csr")),
            "-CA",
            &p(&format!("{ca}-ca.pem")),
            "-CAkey",
            &p(&format!("{ca}-ca.key")),
            "-days",
            "1",
            "-extfile",
            &p("client.ext"),
            "-out",
            &p(&format!("{ca}-client.pem")),
        ]);
    }
    let policy = d.join("kame.hcl");
    std::fs::write(
            &policy,
            "path \"transit/*\" { capabilities = [\"create\", \"read\", \"update\", \"delete\", \"list\"] }\n",
        )
        .unwrap();
    bao.cli(&["policy", "write", "kame", &policy.display().to_string()]);
    bao.cli(&["auth", "enable", "cert"]);
    bao.cli(&[
        "write",
        "auth/cert/certs/kame",
        "token_policies=kame",
        &format!("certificate=@{}", p("trusted-ca.pem")),
    ]);
    let cfg = |who: &str| VaultConfig {
        vault_addr: bao.addr.clone(),
        namespace: None,
        ca_cert_path: Some(bao.tls_ca()),
        insecure_skip_verify: false,
        transit_engine_path: "transit".into(),
        auth: VaultAuth::Cert {
            mount: "cert".into(),
            role_name: "kame".into(),
            client_cert_path: d.join(format!("{who}-client.pem")),
            client_key_path: d.join(format!("{who}-client.key")),
        },
        server_id: "cert-srv".into(),
        call_timeout: Duration::from_secs(5),
    };
    let km = VaultKeyManager::open(cfg("trusted")).await.unwrap();
    let pk = km.generate_key("k", KeyType::EcP256).await.unwrap();
    let sig = km
        .sign("k", b"m", SignOpts::for_key(KeyType::EcP256))
        .await
        .unwrap();
    aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
        &pk.spki_der,
    )
    .verify(b"m", &sig.bytes)
    .unwrap();
    let e = VaultKeyManager::open(cfg("other"))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("cert login"), "{e}");
    // Without the CA, Vault's certificate is not trusted.
    let mut c = cfg("trusted");
    c.ca_cert_path = None;
    assert!(VaultKeyManager::open(c).await.is_err());
}

/// Kubernetes auth cannot run here: the login request Kame sends is checked on a socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_kubernetes_login_request_shape() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let captured = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 16384];
        let mut got = vec![];
        loop {
            let n = s.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some(i) = text.find("\r\n\r\n") {
                let len = text
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                    })
                    .unwrap_or(0);
                if got.len() >= i + 4 + len {
                    break;
                }
            }
            if n == 0 {
                break;
            }
        }
        let body = r#"{"errors":["test refusal"]}"#;
        let _ = s
                .write_all(
                    format!(
                        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await;
        String::from_utf8_lossy(&got).to_string()
    });
    let dir = tempfile::tempdir().unwrap();
    let token_path = dir.path().join("token");
    std::fs::write(&token_path, "sa.jwt.value\n").unwrap();
    let cfg = VaultConfig {
        vault_addr: format!("http://127.0.0.1:{port}"),
        namespace: Some("team-a".into()),
        ca_cert_path: None,
        insecure_skip_verify: false,
        transit_engine_path: "transit".into(),
        auth: VaultAuth::Kubernetes {
            mount: "kubernetes".into(),
            role: "kame-server".into(),
            token_path,
        },
        server_id: "s".into(),
        call_timeout: Duration::from_secs(5),
    };
    let e = VaultKeyManager::open(cfg).await.unwrap_err().to_string();
    assert!(
        e.contains("Kubernetes login") && e.contains("test refusal"),
        "{e}"
    );
    let req = captured.await.unwrap();
    assert!(req.starts_with("POST /v1/auth/kubernetes/login "), "{req}");
    assert!(
        req.to_ascii_lowercase()
            .contains("x-vault-namespace: team-a"),
        "{req}"
    );
    let body: serde_json::Value =
        serde_json::from_str(&req[req.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"role": "kame-server", "jwt": "sa.jwt.value"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_unreachable_is_unavailable_fast() {
    let mut bao = Bao::start();
    let km = VaultKeyManager::open(config(&bao, "s", root(&bao)))
        .await
        .unwrap();
    km.generate_key("k", KeyType::EcP256).await.unwrap();
    bao.stop();
    let t = std::time::Instant::now();
    let e = km
        .sign("k", b"m", SignOpts::for_key(KeyType::EcP256))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}
