//! Server signing keys in KeyManager backends that keep them out of the server (issue: KMS,
//! Vault, HSM): a kame-server on each backend issues SVIDs that `openssl verify` accepts, JWT
//! SVIDs that validate, its data_dir and datastore hold no private key, and the backend holds
//! the keys under this server's names.

mod common;

use common::{Env, Opts, my_uid};
use kame_keymanager::KeyManager;
use std::path::Path;

/// Private-key material in any file under `dir`: PEM private keys, PKCS#8 and SEC1 EC keys
/// and PKCS#1 RSA keys, as raw DER or inside base64 (JSON, PEM) text.
fn private_keys_under(dir: &Path) -> Vec<String> {
    use base64::Engine;
    const MARKERS: [(&str, &[u8]); 4] = [
        // PKCS#8: version 0, then the id-ecPublicKey / rsaEncryption AlgorithmIdentifier.
        (
            "PKCS#8 EC",
            &[
                0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01,
            ],
        ),
        (
            "PKCS#8 RSA",
            &[
                0x02, 0x01, 0x00, 0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01,
                0x01, 0x01,
            ],
        ),
        // SEC1 ECPrivateKey: version 1, privateKey OCTET STRING of 32 or 48 bytes.
        ("SEC1 P-256", &[0x02, 0x01, 0x01, 0x04, 0x20]),
        ("SEC1 P-384", &[0x02, 0x01, 0x01, 0x04, 0x30]),
    ];
    let mut found = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let Ok(bytes) = std::fs::read(&p) else {
                continue;
            };
            let mut blobs = vec![bytes.clone()];
            // base64 runs of 40+ characters, decoded.
            let text = String::from_utf8_lossy(&bytes);
            for run in text.split(|c: char| !(c.is_ascii_alphanumeric() || "+/=".contains(c))) {
                if run.len() >= 40
                    && let Ok(b) = base64::engine::general_purpose::STANDARD.decode(run)
                {
                    blobs.push(b);
                }
            }
            if text.contains("PRIVATE KEY-----") {
                found.push(format!("{}: PEM private key", p.display()));
            }
            for b in &blobs {
                for (what, m) in MARKERS {
                    if b.windows(m.len()).any(|w| w == m) {
                        found.push(format!("{}: {what}", p.display()));
                    }
                }
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

/// Registers a workload, fetches its X509-SVID through the agent's CLI into files, verifies
/// the chain with openssl, fetches a JWT-SVID and validates it; returns the bundle's roots.
async fn issue_and_verify(env: &Env) -> Vec<Vec<u8>> {
    env.register("/km-workload", &[&format!("unix:uid:{}", my_uid())], |_| {})
        .await;
    let resp = env.wait_for_svids(&["/km-workload"]).await;
    let out = tempfile::tempdir().unwrap();
    kame_agent::cli::fetch_x509(&env.socket_url(), Some(out.path()), false)
        .await
        .unwrap();
    // The SVID file holds the chain (leaf, then any intermediate).
    let verify = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(out.path().join("bundle.0.pem"))
        .arg("-untrusted")
        .arg(out.path().join("svid.0.pem"))
        .arg(out.path().join("svid.0.pem"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "openssl verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let mut wl = env.workload_client().await;
    let token = wl
        .fetch_jwtsvid(kame_agent::cli::with_header(
            kame_api::pb::workload::JwtsvidRequest {
                audience: vec!["km-audience".into()],
                spiffe_id: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .svids
        .remove(0)
        .svid;
    kame_agent::cli::validate_jwt(&env.socket_url(), "km-audience", &token, false)
        .await
        .expect("the JWT-SVID signed by the backend key validates");
    assert!(!resp.svids.is_empty());
    env.bundle()
        .await
        .x509_authorities
        .into_iter()
        .map(|a| a.asn1)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn km_pkcs11_server_issues_verifiable_svids_and_keeps_no_private_key() {
    let Some(hsm) = kame_keymanager::testing::SoftHsm::child(
        "km_pkcs11_server_issues_verifiable_svids_and_keeps_no_private_key",
    ) else {
        return;
    };
    let secrets = tempfile::tempdir().unwrap();
    let pin_file = secrets.path().join("pin");
    std::fs::write(&pin_file, format!("{}\n", hsm.pin)).unwrap();
    let block = format!(
        "KeyManager \"pkcs11\" {{\n plugin_data {{\n module_path = \"{}\"\n token_label = \"{}\"\n user_pin_file = \"{}\"\n key_identifier_value = \"kame-hsm-test\"\n }}\n }}",
        hsm.module.display(),
        hsm.token_label,
        pin_file.display()
    );
    let mut env = Env::start(Opts {
        server_key_manager: Some(block),
        ..Default::default()
    })
    .await;
    let roots = issue_and_verify(&env).await;
    // The token holds the server's keys under kame/<key identifier>/<key id>, and the bundle's
    // root is the CA key in the token.
    let km =
        kame_keymanager::pkcs11::Pkcs11KeyManager::open(kame_keymanager::pkcs11::Pkcs11Config {
            module_path: hsm.module.clone(),
            token_label: hsm.token_label.clone(),
            user_pin: hsm.pin.as_str().into(),
            server_id: "kame-hsm-test".into(),
        })
        .await
        .unwrap();
    let keys = km.public_keys().await.unwrap();
    let mut ids: Vec<&str> = keys.iter().map(|k| k.id.as_str()).collect();
    ids.sort();
    assert!(
        ids.contains(&"x509-CA-A") && ids.contains(&"JWT-Signer-A"),
        "{ids:?}"
    );
    let root_spki = kame_api::x509svid::ParsedCert::parse(&roots[0])
        .unwrap()
        .spki_der()
        .unwrap();
    assert!(
        keys.iter().any(|k| k.spki_der == root_spki),
        "the bundle root's key is in the token"
    );
    // The server's data_dir (its datastore included), after a clean stop.
    env.stop_server().await;
    let found = private_keys_under(&env_dir(&env));
    assert!(found.is_empty(), "private keys on disk: {found:?}");
    env.stop().await;
}

fn env_dir(env: &Env) -> std::path::PathBuf {
    env.dir.path().join("srv")
}

/// The scan in the test above finds what it looks for: a server on the `disk` KeyManager
/// keeps its keys in data_dir, and the scan reports them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn km_private_key_scan_finds_the_disk_backends_keys() {
    let env = Env::start(Opts::default()).await;
    let found = private_keys_under(&env_dir(&env));
    assert!(
        found.iter().any(|f| f.contains("keys.json")),
        "the disk backend's keys are found: {found:?}"
    );
    env.stop().await;
}

use kame_keymanager::testing::Relay;

async fn mint_jwt(env: &Env) -> Result<String, tonic::Status> {
    kame_api::pb::svid::svid_client::SvidClient::new(env.admin().await)
        .mint_jwtsvid(kame_api::pb::svid::MintJwtsvidRequest {
            id: Some(common::sid(common::TD, "/outage-probe")),
            audience: vec!["a".into()],
            ttl: 60,
        })
        .await
        .map(|r| r.into_inner().svid.map(|s| s.token).unwrap_or_default())
}

/// The key backend behind `relay` goes away: signing fails fast with Unavailable (no backend
/// detail), the server keeps serving; it comes back: issuance resumes without a restart.
async fn outage_then_resume(env: &Env, relay: &Relay) {
    mint_jwt(env).await.expect("signing works");
    relay.down();
    let t = std::time::Instant::now();
    let e = mint_jwt(env).await.expect_err("the backend is down");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("key backend unavailable"), "{e:?}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        t.elapsed()
    );
    env.bundle().await;
    relay.up();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match mint_jwt(env).await {
            Ok(_) => break,
            Err(e) if tokio::time::Instant::now() < deadline => {
                assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => panic!("issuance did not resume: {e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn km_aws_kms_server_issues_verifiable_svids_survives_an_outage_and_keeps_no_private_key() {
    let moto = kame_keymanager::testing::Moto::start();
    let relay = Relay::new(moto.port);
    relay.up();
    let block = format!(
        "KeyManager \"aws_kms\" {{\n plugin_data {{\n region = \"us-east-1\"\n access_key_id = \"testing\"\n secret_access_key = \"testing\"\n endpoint = \"http://127.0.0.1:{}\"\n key_identifier_value = \"kame-kms-test\"\n key_tags = {{\n team = \"kame\"\n }}\n }}\n }}",
        relay.port
    );
    let mut env = Env::start(Opts {
        server_key_manager: Some(block),
        ..Default::default()
    })
    .await;
    let roots = issue_and_verify(&env).await;
    // KMS holds the keys under SPIRE's aliases for this key identifier; the bundle root's key
    // is one of them.
    let km =
        kame_keymanager::aws_kms::AwsKmsKeyManager::open(kame_keymanager::aws_kms::AwsKmsConfig {
            region: "us-east-1".into(),
            access_key_id: Some("testing".into()),
            secret_access_key: Some("testing".into()),
            endpoint: Some(moto.endpoint.clone()),
            trust_domain: common::TD.into(),
            server_id: "kame-kms-test".into(),
            key_policy: None,
            key_tags: vec![],
            call_timeout: std::time::Duration::from_secs(10),
            tag_discovery: false,
        })
        .await
        .unwrap();
    let keys = km.public_keys().await.unwrap();
    let ids: Vec<&str> = keys.iter().map(|k| k.id.as_str()).collect();
    assert!(
        ids.contains(&"x509-CA-A") && ids.contains(&"JWT-Signer-A"),
        "{ids:?}"
    );
    let root_spki = kame_api::x509svid::ParsedCert::parse(&roots[0])
        .unwrap()
        .spki_der()
        .unwrap();
    assert!(keys.iter().any(|k| k.spki_der == root_spki));
    // The backend goes away and comes back.
    outage_then_resume(&env, &relay).await;
    env.stop_server().await;
    let found = private_keys_under(&env_dir(&env));
    assert!(found.is_empty(), "private keys on disk: {found:?}");
    env.stop().await;
    relay.down();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn km_vault_server_issues_verifiable_svids_survives_an_outage_and_keeps_no_private_key() {
    let bao = kame_keymanager::testing::Bao::start();
    // AppRole with a policy limited to the transit engine.
    bao.cli(&["auth", "enable", "approle"]);
    let policy = bao.dir.path().join("kame.hcl");
    std::fs::write(
        &policy,
        "path \"transit/*\" { capabilities = [\"create\", \"read\", \"update\", \"delete\", \"list\"] }\n",
    )
    .unwrap();
    bao.cli(&["policy", "write", "kame", &policy.display().to_string()]);
    bao.cli(&["write", "auth/approle/role/kame", "token_policies=kame"]);
    let role_id = bao.json(&["read", "auth/approle/role/kame/role-id"])["data"]["role_id"]
        .as_str()
        .unwrap()
        .to_string();
    let secret_id =
        bao.json(&["write", "-f", "auth/approle/role/kame/secret-id"])["data"]["secret_id"]
            .as_str()
            .unwrap()
            .to_string();
    let relay = Relay::new(bao.port);
    relay.up();
    let block = format!(
        "KeyManager \"hashicorp_vault\" {{\n plugin_data {{\n vault_addr = \"http://127.0.0.1:{}\"\n key_identifier_value = \"kame-vault-test\"\n approle_auth {{\n approle_id = \"{role_id}\"\n approle_secret_id = \"{secret_id}\"\n }}\n }}\n }}",
        relay.port
    );
    let mut env = Env::start(Opts {
        server_key_manager: Some(block),
        ..Default::default()
    })
    .await;
    let roots = issue_and_verify(&env).await;
    // OpenBao holds the keys as <key identifier>-<uuid>-<key id>, and the bundle root's key is
    // one of them.
    let list = bao.json(&["list", "transit/keys"]);
    let names: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    for id in ["x509-CA-A", "JWT-Signer-A"] {
        assert!(
            names
                .iter()
                .any(|n| n.starts_with("kame-vault-test-") && n.ends_with(&format!("-{id}"))),
            "{id} in {names:?}"
        );
    }
    let root_spki = kame_api::x509svid::ParsedCert::parse(&roots[0])
        .unwrap()
        .spki_der()
        .unwrap();
    let ca_name = names.iter().find(|n| n.ends_with("-x509-CA-A")).unwrap();
    let k = bao.json(&["read", &format!("transit/keys/{ca_name}")]);
    assert_eq!(k["data"]["exportable"], false);
    let pem = k["data"]["keys"]["1"]["public_key"].as_str().unwrap();
    let der = {
        use base64::Engine;
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap()
    };
    assert_eq!(der, root_spki, "the bundle root's key is the transit key");
    // The backend goes away and comes back.
    outage_then_resume(&env, &relay).await;
    env.stop_server().await;
    let found = private_keys_under(&env_dir(&env));
    assert!(found.is_empty(), "private keys on disk: {found:?}");
    env.stop().await;
    relay.down();
}

/// kms_rooted signing on aws_kms (moto): SVIDs chain through an in-memory intermediate the KMS
/// key certified; KMS Sign requests for 100 X509-SVIDs, counted on the wire: 100 in direct
/// mode, at most one in kms_rooted mode. End to end through an agent and openssl in both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn km_kms_rooted_one_kms_sign_per_intermediate_versus_one_per_svid_direct() {
    let moto = kame_keymanager::testing::Moto::start();
    for (mode, extra) in [
        ("direct", ""),
        (
            "kms_rooted",
            "signing_mode = \"kms_rooted\"\n    signing_intermediate_ttl = \"1h\"",
        ),
    ] {
        let relay = Relay::new(moto.port);
        relay.up();
        let block = format!(
            "KeyManager \"aws_kms\" {{\n plugin_data {{\n region = \"us-east-1\"\n access_key_id = \"testing\"\n secret_access_key = \"testing\"\n endpoint = \"http://127.0.0.1:{}\"\n key_identifier_value = \"rooted-{mode}\"\n }}\n }}",
            relay.port
        );
        let env = Env::start(Opts {
            server_key_manager: Some(block),
            extra_server: extra,
            ..Default::default()
        })
        .await;
        issue_and_verify(&env).await;
        let ca = env.server.as_ref().unwrap().ctx.ca.clone();
        let key = kame_agent::keys::generate().unwrap();
        let spki = {
            use aws_lc_rs::encoding::AsDer;
            use aws_lc_rs::signature::KeyPair;
            aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
                &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                &key,
            )
            .unwrap()
            .public_key()
            .as_der()
            .unwrap()
            .as_ref()
            .to_vec()
        };
        let roots: Vec<Vec<u8>> = env
            .bundle()
            .await
            .x509_authorities
            .into_iter()
            .map(|a| a.asn1)
            .collect();
        // The authority is named by ca_subject (SPIRE's default C=US, O=SPIFFE); only the
        // kms_rooted intermediate carries an OU of its own.
        let subject = |der: &[u8]| {
            kame_api::x509svid::ParsedCert::parse(der)
                .unwrap()
                .cert
                .tbs_certificate()
                .subject()
                .to_string()
        };
        assert_eq!(subject(&roots[0]), "O=SPIFFE,C=US");
        let before = relay.sign_requests();
        for i in 0..100 {
            let id = kame_api::SpiffeId::parse(&format!("spiffe://{}/w/{i}", common::TD)).unwrap();
            let chain = ca
                .sign_x509_svid(&spki, &id, &[], std::time::Duration::from_secs(600))
                .await
                .unwrap();
            assert_eq!(chain.len(), if mode == "direct" { 1 } else { 2 });
            let leaf = kame_api::x509svid::ParsedCert::parse(&chain[0]).unwrap();
            let issuer_spki = match chain.get(1) {
                Some(inter) => {
                    assert_eq!(subject(inter), "OU=kms_rooted intermediate,O=SPIFFE,C=US");
                    let p = kame_api::x509svid::ParsedCert::parse(inter).unwrap();
                    let root = kame_api::x509svid::ParsedCert::parse(&roots[0]).unwrap();
                    p.check_signed_by(&root.spki_der().unwrap()).unwrap();
                    p.spki_der().unwrap()
                }
                None => kame_api::x509svid::ParsedCert::parse(&roots[0])
                    .unwrap()
                    .spki_der()
                    .unwrap(),
            };
            leaf.check_signed_by(&issuer_spki).unwrap();
        }
        let calls = relay.sign_requests() - before;
        eprintln!("{mode}: {calls} KMS Sign requests for 100 X509-SVIDs");
        if mode == "direct" {
            assert_eq!(calls, 100, "one KMS Sign per SVID");
        } else {
            assert!(calls <= 1, "{calls} KMS Sign requests");
        }
        env.stop().await;
        relay.down();
    }
}
