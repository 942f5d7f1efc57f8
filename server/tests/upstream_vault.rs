//! UpstreamAuthority "vault" on a running server against OpenBao's PKI engine (`bao server
//! -dev`, PKI enabled here): the server CA is signed at `<mount>/root/sign-intermediate`,
//! minted X509-SVIDs verify with openssl against the Vault root, the bundle holds exactly that
//! root; a Vault intermediate mount puts its CA in the chain; the signing key may be in AWS KMS
//! (moto_server) or in Vault Transit, where the KeyManager and the upstream share one login;
//! a refused token stops the server at start with Vault's reason.

mod common;

use common::upstream::*;
use common::*;
use kame_keymanager::testing::{Bao, Moto};
use std::path::Path;

/// Enables a PKI engine at `mount` with a long maximum lease.
fn enable_pki(bao: &Bao, mount: &str) {
    bao.cli(&["secrets", "enable", &format!("-path={mount}"), "pki"]);
    bao.cli(&["secrets", "tune", "-max-lease-ttl=87600h", mount]);
}

/// A root CA generated inside Vault at `pki`; its PEM written to `dir/vault-root.pem`.
fn vault_root(bao: &Bao, dir: &Path) -> std::path::PathBuf {
    enable_pki(bao, "pki");
    let r = bao.json(&[
        "write",
        "pki/root/generate/internal",
        "common_name=Vault Root",
        "ttl=87600h",
    ]);
    let pem = r["data"]["certificate"].as_str().unwrap().to_string();
    let path = dir.join("vault-root.pem");
    std::fs::write(&path, pem + "\n").unwrap();
    path
}

/// `pki_int`: an intermediate of `pki`, as Vault's PKI guide sets one up.
fn vault_intermediate(bao: &Bao) {
    enable_pki(bao, "pki_int");
    let csr = bao.json(&[
        "write",
        "pki_int/intermediate/generate/internal",
        "common_name=Vault Intermediate",
    ])["data"]["csr"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let csr_path = dir.path().join("int.csr");
    std::fs::write(&csr_path, csr).unwrap();
    let signed = bao.json(&[
        "write",
        "pki/root/sign-intermediate",
        &format!("csr=@{}", csr_path.display()),
        "format=pem_bundle",
        "ttl=43800h",
    ])["data"]["certificate"]
        .as_str()
        .unwrap()
        .to_string();
    let cert_path = dir.path().join("int.pem");
    std::fs::write(&cert_path, signed).unwrap();
    bao.cli(&[
        "write",
        "pki_int/intermediate/set-signed",
        &format!("certificate=@{}", cert_path.display()),
    ]);
}

fn vault_block(bao: &Bao, mount: &str, auth: &str) -> String {
    format!(
        "UpstreamAuthority \"vault\" {{\n plugin_data {{\n vault_addr = \"{}\"\n pki_mount_point = \"{mount}\"\n {auth}\n }}\n }}",
        bao.addr
    )
}

fn token_auth(token: &str) -> String {
    format!("token_auth {{\n token = \"{token}\"\n }}")
}

/// An AppRole whose policy allows what SPIRE's documentation lists for the upstream (and, for
/// a Transit KeyManager, Transit): its `approle_auth` block.
fn approle(bao: &Bao, mounts: &[&str]) -> String {
    bao.cli(&["auth", "enable", "approle"]);
    let mut policy = String::from(
        "path \"transit/*\" { capabilities = [\"create\", \"read\", \"update\", \"delete\", \"list\"] }\n",
    );
    for m in mounts {
        policy.push_str(&format!(
            "path \"{m}/root/sign-intermediate\" {{ capabilities = [\"update\"] }}\n"
        ));
    }
    let p = bao.dir.path().join("kame-upstream.hcl");
    std::fs::write(&p, policy).unwrap();
    bao.cli(&["policy", "write", "kame-upstream", &p.display().to_string()]);
    bao.cli(&[
        "write",
        "auth/approle/role/kame",
        "token_policies=kame-upstream",
        "token_ttl=1h",
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
    format!(
        "approle_auth {{\n approle_id = \"{role_id}\"\n approle_secret_id = \"{secret_id}\"\n }}"
    )
}

/// How many tokens Vault holds now.
fn token_count(bao: &Bao) -> usize {
    bao.json(&["list", "auth/token/accessors"])
        .as_array()
        .map(|a| a.len())
        .unwrap_or(0)
}

fn bundle_roots(b: &kame_api::pb::types::Bundle) -> Vec<Vec<u8>> {
    b.x509_authorities.iter().map(|c| c.asn1.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_vault_pki_root_signs_the_ca_and_is_the_only_bundle_root() {
    let bao = Bao::start();
    let up = tempfile::tempdir().unwrap();
    let root_pem = vault_root(&bao, up.path());
    let root_der = der_of(&root_pem);
    let s = TestServer::start(Opts {
        extra_plugins: vault_block(&bao, "pki", &token_auth(&bao.root_token)),
        ..Default::default()
    })
    .await;
    let out = s.dir.path().join("out");
    let chain = mint(&s, &out).await;
    assert_eq!(chain.len(), 2, "leaf and the server's CA, never the root");
    assert!(!chain.contains(&root_der));
    verify_with_openssl(&root_pem, &out.join("svid.pem"));
    assert_eq!(
        bundle_roots(&s.bundle().await),
        vec![root_der.clone()],
        "the bundle holds exactly the Vault root"
    );
    // The CA Vault signed is the server's: its subject and the trust domain URI SAN.
    let ca = kame_api::x509svid::ParsedCert::parse(&chain[1]).unwrap();
    let (_, uris, _) = ca.sans().unwrap().unwrap();
    assert_eq!(uris, vec!["spiffe://example.org".to_string()]);
    let st = x509_state(&s).await;
    assert_eq!(
        st.active.unwrap().upstream_authority_subject_key_id,
        skid_of(&root_pem)
    );
    s.stop().await;
}

/// The signing key in AWS KMS on one server and in Vault Transit on another, both CAs signed
/// by a Vault intermediate mount (its certificate carried in SVID chains), both at once. The
/// Transit KeyManager and the upstream log in once between them (AppRole).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_vault_intermediate_with_keys_in_aws_kms_and_in_vault_transit() {
    let bao = Bao::start();
    let moto = Moto::start();
    let up = tempfile::tempdir().unwrap();
    let root_pem = vault_root(&bao, up.path());
    vault_intermediate(&bao);
    let int_der = kame_api::bundle::certs_from_pem(
        bao.json(&["read", "pki_int/cert/ca"])["data"]["certificate"]
            .as_str()
            .unwrap(),
    )
    .unwrap()[0]
        .clone();
    let auth = approle(&bao, &["pki_int"]);

    let kms = TestServer::start(Opts {
        key_manager_block: format!(
            "KeyManager \"aws_kms\" {{\n plugin_data {{\n region = \"us-east-1\"\n access_key_id = \"testing\"\n secret_access_key = \"testing\"\n endpoint = \"{}\"\n key_identifier_value = \"kms-under-vault\"\n }}\n }}",
            moto.endpoint
        ),
        extra_plugins: vault_block(&bao, "pki_int", &auth),
        ..Default::default()
    })
    .await;

    let tokens_before = token_count(&bao);
    let transit = TestServer::start(Opts {
        key_manager_block: format!(
            "KeyManager \"hashicorp_vault\" {{\n plugin_data {{\n vault_addr = \"{}\"\n key_identifier_value = \"transit-under-vault\"\n {auth}\n }}\n }}",
            bao.addr
        ),
        extra_plugins: vault_block(&bao, "pki_int", &auth),
        ..Default::default()
    })
    .await;
    assert_eq!(
        token_count(&bao),
        tokens_before + 1,
        "the Transit KeyManager and the PKI upstream share one Vault login"
    );

    for (s, name) in [(&kms, "kms"), (&transit, "transit")] {
        let out = s.dir.path().join(format!("out-{name}"));
        let chain = mint(s, &out).await;
        assert_eq!(
            chain.len(),
            3,
            "{name}: leaf, server CA, Vault intermediate"
        );
        assert_eq!(chain[2], int_der, "{name}");
        verify_with_openssl(&root_pem, &out.join("svid.pem"));
        assert_eq!(
            bundle_roots(&s.bundle().await),
            vec![der_of(&root_pem)],
            "{name}: the bundle holds the Vault root, not the intermediate"
        );
    }
    // The Transit key signed the CA Vault certified: the CA's public key is in Transit.
    let keys = bao.json(&["list", "transit/keys"]);
    assert!(
        keys.as_array()
            .unwrap()
            .iter()
            .any(|k| k.as_str().unwrap().starts_with("transit-under-vault-")),
        "{keys}"
    );
    kms.stop().await;
    transit.stop().await;
}

/// A token Vault does not accept: the server does not start, and says what Vault said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_vault_refused_token_stops_the_server_with_vaults_reason() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let bao = Bao::start();
    let up = tempfile::tempdir().unwrap();
    vault_root(&bao, up.path());
    // A token whose policy does not allow sign-intermediate.
    let p = bao.dir.path().join("none.hcl");
    std::fs::write(&p, "path \"sys/*\" { capabilities = [\"read\"] }\n").unwrap();
    bao.cli(&["policy", "write", "none", &p.display().to_string()]);
    let weak = bao.json(&["write", "auth/token/create", "policies=none"])["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_string();
    for (token, want) in [
        (weak.as_str(), "permission denied"),
        ("not-a-token", "permission denied"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let text = config_text(
            dir.path(),
            free_port(),
            &Opts {
                extra_plugins: vault_block(&bao, "pki", &token_auth(token)),
                ..Default::default()
            },
        );
        let path = dir.path().join("server.conf");
        std::fs::write(&path, text).unwrap();
        let cfg = kame_server::config::Config::load(&path, false).unwrap();
        let e = match kame_server::run::start_with(cfg, None).await {
            Ok(r) => {
                r.stop().await;
                panic!("started with a refused token")
            }
            Err(e) => format!("{e:#}"),
        };
        assert!(e.contains(want), "{e}");
        assert!(
            !e.contains("error occurred"),
            "Vault's list reduced to its items: {e}"
        );
        assert!(!e.contains(token), "the token is never printed: {e}");
    }
}

#[test]
fn upstream_vault_configuration_needs_exactly_one_auth_and_an_address() {
    let dir = tempfile::tempdir().unwrap();
    for (plugin_data, want) in [
        ("pki_mount_point = \"pki\"", "vault_addr"),
        (
            "vault_addr = \"http://127.0.0.1:1\"",
            "configure exactly one of token_auth, approle_auth, cert_auth, k8s_auth",
        ),
        (
            "vault_addr = \"http://127.0.0.1:1\"\n token_auth { token = \"a\" }\n approle_auth {\n approle_id = \"r\"\n approle_secret_id = \"s\"\n }",
            "configure exactly one",
        ),
        (
            "vault_addr = \"http://127.0.0.1:1\"\n token_auth { token = \"a\" }\n pki_mount = \"x\"",
            "pki_mount",
        ),
    ] {
        let e = upstream_config_error(dir.path(), "vault", plugin_data);
        assert!(e.contains(want), "{plugin_data}: {e}");
    }
}
