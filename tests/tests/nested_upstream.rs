//! Nested servers (`UpstreamAuthority "spire"`) on one machine: root → middle → leaf, each
//! level a server and an agent attested to it, each downstream server holding an SVID from the
//! level above's agent through an entry with `downstream = true`. A workload SVID from the
//! leaf verifies against the root's bundle alone (openssl); a JWT-SVID minted at the leaf
//! verifies with the root server's JWT keys; an X.509 taint at the root reaches the leaf's
//! workload as a re-issued SVID under the root's new authority, and its revocation removes it
//! from the leaf's bundle; a caller without a downstream entry is refused.

mod common;

use common::*;
use kame_api::pb;
use kame_api::pb::localauthority as la;
use la::local_authority_client::LocalAuthorityClient;
use std::time::{Duration, Instant};

fn uid_selector() -> String {
    format!("unix:uid:{}", my_uid())
}

/// `UpstreamAuthority "spire"` pointing at `parent`'s server through `parent`'s agent.
fn spire_block(parent: &Env) -> String {
    format!(
        "UpstreamAuthority \"spire\" {{\n plugin_data {{\n server_address = \"127.0.0.1\"\n server_port = {}\n workload_api_socket = \"{}\"\n }}\n }}",
        parent.tcp_port,
        parent.agent_socket.display()
    )
}

/// A level below `parent`: its server's CA comes from `parent`'s server through `parent`'s
/// agent; `name` is the SPIFFE ID path the downstream entry at `parent` gives it.
async fn downstream_of(parent: &Env, name: &str) -> Env {
    parent
        .register(name, &[&uid_selector()], |e| e.downstream = true)
        .await;
    parent.wait_for_svids(&[name]).await;
    Env::start(Opts {
        server_plugins: spire_block(parent),
        ..Default::default()
    })
    .await
}

fn roots(b: &pb::types::Bundle) -> Vec<Vec<u8>> {
    b.x509_authorities
        .iter()
        .filter(|c| !c.tainted)
        .map(|c| c.asn1.clone())
        .collect()
}

fn split(b: &[u8]) -> Vec<Vec<u8>> {
    kame_upstream::spire::split_certs(b).unwrap()
}

fn openssl_verify(dir: &std::path::Path, root: &[u8], chain: &[Vec<u8>]) -> bool {
    let ca = dir.join("root-ca.pem");
    std::fs::write(&ca, kame_api::bundle::pem_block("CERTIFICATE", root)).unwrap();
    let svid = dir.join("leaf-svid.pem");
    let pem: String = chain
        .iter()
        .map(|c| kame_api::bundle::pem_block("CERTIFICATE", c))
        .collect();
    std::fs::write(&svid, pem).unwrap();
    std::process::Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&ca)
        .arg("-untrusted")
        .arg(&svid)
        .arg(&svid)
        .output()
        .unwrap()
        .status
        .success()
}

async fn fetch_jwt(env: &Env, audience: &str) -> String {
    let r = env
        .workload_client()
        .await
        .fetch_jwtsvid(kame_agent::cli::with_header(pb::workload::JwtsvidRequest {
            audience: vec![audience.into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    r.svids[0].svid.clone()
}

async fn until<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_three_levels_chain_jwt_and_upstream_taint_reach_the_leaf_workload() {
    let root = Env::start(Opts::default()).await;
    let middle = downstream_of(&root, "/middle-server").await;
    let leaf = downstream_of(&middle, "/leaf-server").await;
    leaf.register("/workload", &[&uid_selector()], |_| {}).await;

    // X.509: leaf, the leaf's CA and the middle's CA; the root's authority alone verifies it.
    let m = leaf.wait_for_svids(&["/workload"]).await;
    let chain = split(&m.svids[0].x509_svid);
    assert_eq!(chain.len(), 3, "leaf, leaf server CA, middle server CA");
    let root_bundle = root.bundle().await;
    let root_ca = roots(&root_bundle);
    assert_eq!(root_ca.len(), 1);
    assert_eq!(
        roots(&leaf.bundle().await),
        root_ca,
        "every level's bundle is the root's"
    );
    assert_eq!(split(&m.svids[0].bundle), root_ca);
    let dir = tempfile::tempdir().unwrap();
    assert!(openssl_verify(dir.path(), &root_ca[0], &chain));
    let ca_cert = kame_api::x509svid::ParsedCert::parse(&chain[1]).unwrap();
    let (_, uris, _) = ca_cert.sans().unwrap().unwrap();
    assert_eq!(uris, vec![format!("spiffe://{TD}")]);

    // JWT: the leaf server's key went up to the root through the middle.
    let token = fetch_jwt(&leaf, "nested-test").await;
    until(
        "the leaf's JWT key in the root's bundle",
        Duration::from_secs(30),
        || async {
            let keys: Vec<kame_api::jwtsvid::JwtAuthority> = root
                .bundle()
                .await
                .jwt_authorities
                .iter()
                .map(|k| kame_api::jwtsvid::JwtAuthority {
                    kid: k.key_id.clone(),
                    spki_der: k.public_key.clone(),
                })
                .collect();
            kame_api::jwtsvid::validate(&token, "nested-test", kame_server::ca::now_secs(), |_| {
                Some(keys.clone())
            })
            .is_ok()
        },
    )
    .await;
    // The root's own key is in the leaf's bundle (keys flow down as well).
    let root_kids: Vec<String> = root_bundle
        .jwt_authorities
        .iter()
        .map(|k| k.key_id.clone())
        .collect();
    until(
        "the root's JWT key at the leaf",
        Duration::from_secs(30),
        || async {
            let leaf_kids: Vec<String> = leaf
                .bundle()
                .await
                .jwt_authorities
                .iter()
                .map(|k| k.key_id.clone())
                .collect();
            root_kids.iter().all(|k| leaf_kids.contains(k))
        },
    )
    .await;

    // PublishJWTAuthority as the middle server (its SVID from the root's agent): keys that
    // would never leave the bundle are refused; a bounded one is taken.
    let m = root.wait_for_svids(&["/middle-server"]).await;
    let s = &m.svids[0];
    let ch = kame_agent::client::connect(
        "127.0.0.1",
        root.tcp_port,
        &kame_api::SpiffeId::parse(&format!("spiffe://{TD}/spire/server")).unwrap(),
        std::sync::Arc::new(std::sync::RwLock::new(split(&s.bundle))),
        Some((split(&s.x509_svid), s.x509_svid_key.clone())),
    )
    .await
    .unwrap();
    let spki = kame_api::pb::types::JwtKey {
        public_key: root_bundle.jwt_authorities[0].public_key.clone(),
        key_id: "published-by-test".into(),
        expires_at: 0,
        tainted: false,
    };
    let now = kame_server::ca::now_secs() as i64;
    for expires_at in [0, now - 1, now + 400 * 86400] {
        let e = pb::bundle::bundle_client::BundleClient::new(ch.clone())
            .publish_jwt_authority(pb::bundle::PublishJwtAuthorityRequest {
                jwt_authority: Some(kame_api::pb::types::JwtKey {
                    expires_at,
                    ..spki.clone()
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(
            e.code(),
            tonic::Code::InvalidArgument,
            "{expires_at}: {e:?}"
        );
    }
    let keys = pb::bundle::bundle_client::BundleClient::new(ch)
        .publish_jwt_authority(pb::bundle::PublishJwtAuthorityRequest {
            jwt_authority: Some(kame_api::pb::types::JwtKey {
                expires_at: now + 3600,
                ..spki.clone()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .jwt_authorities;
    assert!(keys.iter().any(|k| k.key_id == "published-by-test"));

    // Root rotation: prepare (the new root reaches the leaf), activate, taint the old one.
    let mut c = LocalAuthorityClient::new(root.admin().await);
    let old = c
        .get_x509_authority_state(la::GetX509AuthorityStateRequest {})
        .await
        .unwrap()
        .into_inner()
        .active
        .unwrap()
        .authority_id;
    let new = c
        .prepare_x509_authority(la::PrepareX509AuthorityRequest { force: false })
        .await
        .unwrap()
        .into_inner()
        .prepared_authority
        .unwrap()
        .authority_id;
    let new_root = roots(&root.bundle().await)
        .into_iter()
        .find(|r| r != &root_ca[0])
        .unwrap();
    until(
        "the prepared root at the leaf",
        Duration::from_secs(40),
        || async { roots(&leaf.bundle().await).contains(&new_root) },
    )
    .await;
    c.activate_x509_authority(la::ActivateX509AuthorityRequest {
        authority_id: new.clone(),
    })
    .await
    .unwrap();
    let t = Instant::now();
    let old_id = old.clone();
    c.taint_x509_authority(la::TaintX509AuthorityRequest { authority_id: old })
        .await
        .unwrap();
    until(
        "the leaf workload's SVID re-issued under the root's new authority",
        Duration::from_secs(60),
        || async {
            let m = leaf.wait_for_svids(&["/workload"]).await;
            let chain = split(&m.svids[0].x509_svid);
            openssl_verify(dir.path(), &new_root, &chain)
                && !openssl_verify(dir.path(), &root_ca[0], &chain)
        },
    )
    .await;
    eprintln!("root taint → leaf workload re-issued: {:?}", t.elapsed());
    let leaf_bundle = leaf.bundle().await;
    assert!(
        leaf_bundle
            .x509_authorities
            .iter()
            .any(|c| c.asn1 == root_ca[0] && c.tainted),
        "the taint reached the leaf's bundle"
    );
    // Revoked at the root: gone from the leaf's bundle too.
    c.revoke_x509_authority(la::RevokeX509AuthorityRequest {
        authority_id: old_id,
        force: true,
    })
    .await
    .unwrap();
    until(
        "the revoked root gone at the leaf",
        Duration::from_secs(40),
        || async {
            !leaf
                .bundle()
                .await
                .x509_authorities
                .iter()
                .any(|c| c.asn1 == root_ca[0])
        },
    )
    .await;

    leaf.stop().await;
    middle.stop().await;
    root.stop().await;
}

/// Without `downstream = true` the upstream refuses a CA (the downstream server cannot start)
/// and a JWT key, with SPIRE's message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_caller_without_a_downstream_entry_is_refused() {
    let root = Env::start(Opts::default()).await;
    root.register("/not-downstream", &[&uid_selector()], |_| {})
        .await;
    let m = root.wait_for_svids(&["/not-downstream"]).await;
    let s = &m.svids[0];
    let ch = kame_agent::client::connect(
        "127.0.0.1",
        root.tcp_port,
        &kame_api::SpiffeId::parse(&format!("spiffe://{TD}/spire/server")).unwrap(),
        std::sync::Arc::new(std::sync::RwLock::new(split(&s.bundle))),
        Some((split(&s.x509_svid), s.x509_svid_key.clone())),
    )
    .await
    .unwrap();
    let e = pb::svid::svid_client::SvidClient::new(ch.clone())
        .new_downstream_x509ca(pb::svid::NewDownstreamX509caRequest {
            csr: vec![1, 2, 3],
            preferred_ttl: 60,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert_eq!(e.message(), "caller is not a downstream workload");
    let e = pb::bundle::bundle_client::BundleClient::new(ch)
        .publish_jwt_authority(pb::bundle::PublishJwtAuthorityRequest {
            jwt_authority: Some(pb::types::JwtKey {
                public_key: vec![1],
                key_id: "k".into(),
                expires_at: 0,
                tainted: false,
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    // A downstream server configured with that identity does not start, and says why.
    let bad = match Env::try_start(Opts {
        server_plugins: spire_block(&root),
        ..Default::default()
    })
    .await
    {
        Ok(_) => panic!("a server without a downstream entry started"),
        Err(e) => e,
    };
    assert!(bad.contains("caller is not a downstream workload"), "{bad}");
    root.stop().await;
}
