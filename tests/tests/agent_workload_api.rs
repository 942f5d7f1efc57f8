//! kame-agent end to end: a server and an agent (join_token) in one temp directory, workloads
//! served over the SPIFFE Workload API and checked with independent clients (the rust `spiffe`
//! crate, py-spiffe), another uid, SVID rotation in a stream, entry deletion, and serving from
//! cache with the server down and after an agent restart.

mod common;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{Env, Opts, TD, my_uid, sid};
use kame_api::pb;
use kame_api::x509svid::{ParsedCert, verify_chain};
use std::time::Duration;
use tonic::Code;

fn uid_selector() -> String {
    format!("unix:uid:{}", my_uid())
}

fn split(concat: &[u8]) -> Vec<Vec<u8>> {
    kame_agent::cli::certs(concat)
}

fn now() -> u64 {
    kame_agent::manager::now_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_api_rust_spiffe_crate_fetches_x509_jwt_and_bundles() {
    let env = Env::start(Opts::default()).await;
    env.register("/rust-client", &[&uid_selector()], |_| {})
        .await;
    env.wait_for_svids(&["/rust-client"]).await;

    let c = spiffe::WorkloadApiClient::connect_to(env.socket_url())
        .await
        .unwrap();
    let svid = c.fetch_x509_svid().await.unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        format!("spiffe://{TD}/rust-client")
    );
    let td = spiffe::TrustDomain::new(TD).unwrap();
    let bundles = c.fetch_x509_bundles().await.unwrap();
    let b = bundles.get(&td).expect("own trust domain bundle (WA-12)");
    assert!(!b.authorities().is_empty());
    // The chain we served verifies against the bundle we served (our verifier).
    let chain: Vec<Vec<u8>> = svid
        .cert_chain()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    let roots: Vec<Vec<u8>> = b
        .authorities()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    verify_chain(&chain, &roots, now()).unwrap();

    let jwt = c.fetch_jwt_svid(["aud-1", "aud-2"], None).await.unwrap();
    assert_eq!(
        jwt.spiffe_id().to_string(),
        format!("spiffe://{TD}/rust-client")
    );
    let jwt_bundles = c.fetch_jwt_bundles().await.unwrap();
    // Verified offline by the crate's own JWT-SVID validator against the JWKS we served.
    let v = spiffe::JwtSvid::parse_and_validate(jwt.token(), &jwt_bundles, &["aud-1"]).unwrap();
    assert_eq!(
        v.spiffe_id().to_string(),
        format!("spiffe://{TD}/rust-client")
    );
    // And by the agent.
    let v = c.validate_jwt_token("aud-2", jwt.token()).await.unwrap();
    assert_eq!(
        v.spiffe_id().to_string(),
        format!("spiffe://{TD}/rust-client")
    );
    assert!(
        c.validate_jwt_token("other-aud", jwt.token())
            .await
            .is_err()
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_api_py_spiffe_fetches_x509_jwt_and_bundles() {
    let env = Env::start(Opts::default()).await;
    env.register("/py-client", &[&uid_selector()], |_| {}).await;
    env.wait_for_svids(&["/py-client"]).await;
    let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        python.exists(),
        "py-spiffe venv missing: run ./scripts/bootstrap"
    );
    let script = r#"
import sys
from spiffe import WorkloadApiClient, TrustDomain
c = WorkloadApiClient(socket_path=sys.argv[1])
svid = c.fetch_x509_svid()
print("x509", svid.spiffe_id)
bundles = c.fetch_x509_bundles()
b = bundles.get_bundle_for_trust_domain(TrustDomain("example.org"))
print("x509-authorities", len(b.x509_authorities))
jwt = c.fetch_jwt_svid(audience={"py-aud"})
print("jwt", jwt.spiffe_id)
v = c.validate_jwt_svid(jwt.token, "py-aud")
print("validated", v.spiffe_id)
jb = c.fetch_jwt_bundles().get_bundle_for_trust_domain(TrustDomain("example.org"))
print("jwt-authorities", len(jb.jwt_authorities))
try:
    c.validate_jwt_svid(jwt.token, "not-my-aud")
    print("wrong-aud accepted")
except Exception as e:
    print("wrong-aud rejected")
c.close()
"#;
    let out = tokio::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(env.socket_url())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "py-spiffe failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = format!("spiffe://{TD}/py-client");
    assert!(stdout.contains(&format!("x509 {id}")), "{stdout}");
    assert!(stdout.contains(&format!("jwt {id}")), "{stdout}");
    assert!(stdout.contains(&format!("validated {id}")), "{stdout}");
    assert!(stdout.contains("x509-authorities 1"), "{stdout}");
    assert!(stdout.contains("jwt-authorities 1"), "{stdout}");
    assert!(stdout.contains("wrong-aud rejected"), "{stdout}");
    env.stop().await;
}

/// Runs the `workload-client` binary (copied where any uid can run it) as `uid`.
async fn client_as(env: &Env, uid: u32) -> String {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = bin_dir.path().join("workload-client");
    std::fs::copy(env!("CARGO_BIN_EXE_workload-client"), &bin).unwrap();
    for p in [bin_dir.path(), &bin] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg(env.agent_socket.display().to_string());
    if uid != my_uid() {
        cmd.uid(uid).gid(uid);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_api_other_uid_is_denied_and_two_matching_entries_give_two_svids() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::start(Opts::default()).await;
    if my_uid() != 0 {
        panic!("this test runs as root (CI does) to start a process under another uid");
    }
    // Let another uid reach the socket: the temp dir is 0700.
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    env.register("/svc-a", &[&uid_selector()], |_| {}).await;
    env.register("/svc-b", &[&uid_selector(), "unix:gid:0"], |e| {
        e.hint = "b".into();
    })
    .await;
    // Matches neither: needs a gid the workload does not have.
    env.register("/svc-c", &[&uid_selector(), "unix:gid:4242"], |_| {})
        .await;
    let m = env.wait_for_svids(&["/svc-a", "/svc-b"]).await;
    let bundle = split(&m.svids[0].bundle);
    for s in &m.svids {
        let v = verify_chain(&split(&s.x509_svid), &bundle, now()).unwrap();
        assert_eq!(v.id.to_string(), s.spiffe_id);
        // The key is the leaf's.
        let leaf = ParsedCert::parse(&split(&s.x509_svid)[0]).unwrap();
        assert!(kame_agent::keys::matches_cert(
            &s.x509_svid_key,
            &split(&s.x509_svid)[0]
        ));
        assert!(leaf.not_after() > now());
    }
    assert_eq!(
        m.svids.iter().find(|s| s.hint == "b").unwrap().spiffe_id,
        format!("spiffe://{TD}/svc-b")
    );

    // The same client binary as this uid is served; as uid 4242 it is denied.
    let mine = client_as(&env, my_uid()).await;
    assert!(mine.starts_with("ok "), "{mine}");
    assert!(mine.contains("/svc-a") && mine.contains("/svc-b"), "{mine}");
    let other = client_as(&env, 4242).await;
    assert_eq!(other, "err PermissionDenied");
    // Once an entry for uid 4242 exists, it gets that one only.
    env.register("/uid-4242", &["unix:uid:4242"], |_| {}).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let other = client_as(&env, 4242).await;
        if other.starts_with("ok ") {
            assert_eq!(other, format!("ok spiffe://{TD}/uid-4242"));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{other}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    env.stop().await;
}

fn es256_token(
    key: &aws_lc_rs::signature::EcdsaKeyPair,
    kid: &str,
    claims: serde_json::Value,
) -> String {
    let h = URL_SAFE_NO_PAD.encode(
        serde_json::to_vec(&serde_json::json!({"alg": "ES256", "kid": kid, "typ": "JWT"})).unwrap(),
    );
    let p = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
    let input = format!("{h}.{p}");
    let sig = key
        .sign(&aws_lc_rs::rand::SystemRandom::new(), input.as_bytes())
        .unwrap();
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

fn p256() -> aws_lc_rs::signature::EcdsaKeyPair {
    aws_lc_rs::signature::EcdsaKeyPair::generate(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_api_security_header_and_validate_jwt_rules() {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::KeyPair;
    let env = Env::start(Opts::default()).await;
    // A federated trust domain whose JWT key the test holds, so it can sign tokens the
    // server never would (no exp) with a key that is in the bundle.
    let fed_key = p256();
    let spki = fed_key.public_key().as_der().unwrap().as_ref().to_vec();
    let r = pb::bundle::bundle_client::BundleClient::new(env.admin().await)
        .batch_create_federated_bundle(pb::bundle::BatchCreateFederatedBundleRequest {
            bundle: vec![pb::types::Bundle {
                trust_domain: "other.org".into(),
                jwt_authorities: vec![pb::types::JwtKey {
                    public_key: spki,
                    key_id: "fed-kid".into(),
                    expires_at: (now() + 3600) as i64,
                    tainted: false,
                }],
                ..Default::default()
            }],
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.results[0].status.as_ref().unwrap().code,
        0,
        "{:?}",
        r.results[0].status
    );
    env.register("/validator", &[&uid_selector()], |e| {
        e.federates_with = vec!["other.org".into()];
    })
    .await;
    let m = env.wait_for_svids(&["/validator"]).await;
    assert!(
        m.federated_bundles.contains_key("spiffe://other.org"),
        "federated bundle is served"
    );

    let mut c = env.workload_client().await;
    // No security header: InvalidArgument on every RPC.
    let e = c
        .fetch_x509svid(pb::workload::X509svidRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .fetch_jwtsvid(pb::workload::JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .validate_jwtsvid(pb::workload::ValidateJwtsvidRequest {
            audience: "a".into(),
            svid: "x.y.z".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // A wrong header value is no header.
    let mut req = tonic::Request::new(pb::workload::X509BundlesRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "yes".parse().unwrap());
    assert_eq!(
        c.fetch_x509_bundles(req).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    use kame_agent::cli::with_header as h;
    let validate = |aud: &str, token: String| {
        let mut c = c.clone();
        let aud = aud.to_string();
        async move {
            c.validate_jwtsvid(h(pb::workload::ValidateJwtsvidRequest {
                audience: aud,
                svid: token,
            }))
            .await
        }
    };
    let claims = |aud: &str, exp: Option<u64>| {
        let mut v = serde_json::json!({"sub": "spiffe://other.org/w", "aud": [aud], "iat": now()});
        if let Some(e) = exp {
            v["exp"] = e.into();
        }
        v
    };
    // Positive control: a well-formed token from the federated key validates, with claims.
    let ok = validate(
        "aud",
        es256_token(&fed_key, "fed-kid", claims("aud", Some(now() + 300))),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(ok.spiffe_id, "spiffe://other.org/w");
    assert!(ok.claims.unwrap().fields.contains_key("exp"));
    // No exp.
    let e = validate("aud", es256_token(&fed_key, "fed-kid", claims("aud", None)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    // Wrong audience.
    let e = validate(
        "aud",
        es256_token(&fed_key, "fed-kid", claims("other", Some(now() + 300))),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    // Signed by a key outside the bundle (same kid).
    let e = validate(
        "aud",
        es256_token(&p256(), "fed-kid", claims("aud", Some(now() + 300))),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    // Expired.
    let e = validate(
        "aud",
        es256_token(&fed_key, "fed-kid", claims("aud", Some(now() - 120))),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    // Missing fields (WA-15).
    assert_eq!(
        validate("", "a.b.c".into()).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        validate("aud", String::new()).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // FetchJWTSVID without audience (WA-13) and for an ID the workload does not have.
    let mut c2 = c.clone();
    let e = c2
        .fetch_jwtsvid(h(pb::workload::JwtsvidRequest {
            audience: vec![],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c2
        .fetch_jwtsvid(h(pb::workload::JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: format!("spiffe://{TD}/not-mine"),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Our own JWT-SVID: valid for its audience; cached (same token) on the next call.
    let t1 = c2
        .fetch_jwtsvid(h(pb::workload::JwtsvidRequest {
            audience: vec!["svc".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap()
        .into_inner()
        .svids;
    let t2 = c2
        .fetch_jwtsvid(h(pb::workload::JwtsvidRequest {
            audience: vec!["svc".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap()
        .into_inner()
        .svids;
    assert_eq!(t1[0].svid, t2[0].svid, "JWT-SVID served from cache");
    validate("svc", t1[0].svid.clone()).await.unwrap();
    // JWT bundles: own trust domain and the federated one.
    let mut s = c2
        .fetch_jwt_bundles(h(pb::workload::JwtBundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let jb = s.message().await.unwrap().unwrap();
    assert!(jb.bundles.contains_key(&format!("spiffe://{TD}")));
    assert!(jb.bundles.contains_key("spiffe://other.org"));
    // WIT is not supported (WA-17).
    let e = c2
        .fetch_witsvid(h(pb::workload::WitsvidRequest {
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_rotates_10s_svids_in_the_stream_and_entry_delete_removes_the_svid() {
    let env = Env::start(Opts::default()).await;
    env.register("/short", &[&uid_selector()], |e| e.x509_svid_ttl = 10)
        .await;
    env.wait_for_svids(&["/short"]).await;
    let mut s = env
        .workload_client()
        .await
        .fetch_x509svid(kame_agent::cli::with_header(
            pb::workload::X509svidRequest {},
        ))
        .await
        .unwrap()
        .into_inner();
    let first = s.message().await.unwrap().unwrap();
    let leaf = |m: &pb::workload::X509svidResponse| {
        ParsedCert::parse(&split(&m.svids[0].x509_svid)[0]).unwrap()
    };
    let old = leaf(&first);
    assert!(
        old.not_after() - old.not_before() <= 20,
        "a short-lived SVID"
    );
    // The next message carries a new SVID, received before the old one expires.
    let next = tokio::time::timeout(Duration::from_secs(15), s.message())
        .await
        .expect("a rotated SVID within the old one's lifetime")
        .unwrap()
        .unwrap();
    let received_at = now();
    let new = leaf(&next);
    assert_ne!(new.serial_hex(), old.serial_hex());
    assert!(received_at < old.not_after(), "rotated before expiry");

    // A second entry appears in the stream, and disappears when deleted.
    let two = env.register("/second", &[&uid_selector()], |_| {}).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut saw_both = false;
    let mut saw_removed = false;
    while tokio::time::Instant::now() < deadline {
        let m = tokio::time::timeout(Duration::from_secs(30), s.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let ids: Vec<&str> = m.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
        if !saw_both && ids.iter().any(|i| i.ends_with("/second")) {
            saw_both = true;
            env.delete_entry(&two).await;
        } else if saw_both && !ids.iter().any(|i| i.ends_with("/second")) {
            assert!(ids.iter().any(|i| i.ends_with("/short")));
            saw_removed = true;
            break;
        }
    }
    assert!(
        saw_both && saw_removed,
        "both={saw_both} removed={saw_removed}"
    );
    env.stop().await;
}

/// More than a page (500) of entries: the server answers a sync with revisions, the agent asks
/// for the entries it lacks on a call it keeps open (all of them at first, then the changed
/// one), and the workload sees the change. (Which ids are asked is not observed here; the test
/// fails when the ask path is broken.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sync_revisions_mode_over_a_page_asks_for_changed_entries() {
    let env = Env::start(Opts::default()).await;
    let parent = sid(
        TD,
        env.agent_id.trim_start_matches(&format!("spiffe://{TD}")),
    );
    let others: Vec<pb::types::Entry> = (0..500)
        .map(|i| pb::types::Entry {
            spiffe_id: Some(sid(TD, &format!("/other/{i}"))),
            parent_id: Some(parent.clone()),
            selectors: vec![pb::types::Selector {
                r#type: "unix".into(),
                value: format!("uid:{}", 100_000 + i),
            }],
            ..Default::default()
        })
        .collect();
    let r = pb::entry::entry_client::EntryClient::new(env.admin().await)
        .batch_create_entry(pb::entry::BatchCreateEntryRequest {
            entries: others,
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        r.results
            .iter()
            .all(|x| x.status.as_ref().is_some_and(|s| s.code == 0))
    );
    let mine = env.register("/mine", &[&uid_selector()], |_| {}).await;
    env.wait_for_svids(&["/mine"]).await;

    // One entry changes: only it is asked for, and the workload gets its new identity.
    let r = pb::entry::entry_client::EntryClient::new(env.admin().await)
        .batch_update_entry(pb::entry::BatchUpdateEntryRequest {
            entries: vec![pb::types::Entry {
                id: mine,
                spiffe_id: Some(sid(TD, "/mine-renamed")),
                ..Default::default()
            }],
            input_mask: Some(pb::types::EntryMask {
                spiffe_id: true,
                ..Default::default()
            }),
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results[0].status.as_ref().map(|s| s.code), Some(0));
    env.wait_for_svids(&["/mine-renamed"]).await;
    env.stop().await;
}

/// The server's CA signed by an openssl-made root (`UpstreamAuthority "disk"`): the agent
/// attests and syncs over TLS with the intermediate in its chain, and the workload's SVID
/// chain (leaf, server CA) verifies with openssl against the root alone, which is the only
/// X.509 authority workloads are given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_under_disk_upstream_serves_svids_that_chain_to_the_upstream_root() {
    let up = tempfile::tempdir().unwrap();
    let o = std::process::Command::new("openssl")
        .current_dir(up.path())
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "root.key",
            "-out",
            "root.pem",
            "-subj",
            "/O=Upstream/CN=root",
            "-days",
            "1",
            "-addext",
            "basicConstraints=critical,CA:true",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let d = up.path().display();
    let env = Env::start(Opts {
        server_plugins: format!(
            "UpstreamAuthority \"disk\" {{\n        plugin_data {{\n            cert_file_path = \"{d}/root.pem\"\n            key_file_path = \"{d}/root.key\"\n        }}\n    }}"
        ),
        ..Default::default()
    })
    .await;
    env.register("/chained", &[&uid_selector()], |_| {}).await;
    let m = env.wait_for_svids(&["/chained"]).await;
    let chain = split(&m.svids[0].x509_svid);
    assert_eq!(chain.len(), 2, "leaf and the server's CA");
    let root_pem = std::fs::read_to_string(up.path().join("root.pem")).unwrap();
    let root = kame_api::bundle::certs_from_pem(&root_pem)
        .unwrap()
        .remove(0);
    assert_eq!(split(&m.svids[0].bundle), vec![root.clone()]);
    let pem: String = chain
        .iter()
        .map(|c| kame_api::bundle::pem_block("CERTIFICATE", c))
        .collect();
    let svid = up.path().join("svid.pem");
    std::fs::write(&svid, pem).unwrap();
    let v = std::process::Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(up.path().join("root.pem"))
        .arg("-untrusted")
        .arg(&svid)
        .arg(&svid)
        .output()
        .unwrap();
    assert!(
        v.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_serves_cached_svids_with_server_down_and_after_restart() {
    let mut env = Env::start(Opts::default()).await;
    env.register("/cached", &[&uid_selector()], |_| {}).await;
    let before = env.wait_for_svids(&["/cached"]).await;
    env.stop_server().await;
    // Server gone: new clients are still served from the cache.
    let during = env.wait_for_svids(&["/cached"]).await;
    assert_eq!(during.svids[0].x509_svid, before.svids[0].x509_svid);
    // Agent restarted while the server is still down: served from data_dir.
    env.stop_agent().await;
    assert!(!env.agent_socket.exists(), "socket removed on stop");
    env.start_agent().await;
    let after = env.wait_for_svids(&["/cached"]).await;
    assert_eq!(after.svids[0].x509_svid, before.svids[0].x509_svid);
    // Key files are 0600.
    use std::os::unix::fs::PermissionsExt;
    for f in ["agent_svid.json", "svid_cache.json"] {
        let p = env.dir.path().join("agent/data").join(f);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    // The server comes back: the agent syncs again and new entries are served.
    env.start_server().await;
    env.register("/later", &[&uid_selector()], |_| {}).await;
    env.wait_for_svids(&["/cached", "/later"]).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_memory_key_manager_keeps_no_secret_on_disk() {
    let env = Env::start(Opts {
        key_manager: "memory",
        ..Default::default()
    })
    .await;
    env.register("/mem", &[&uid_selector()], |_| {}).await;
    env.wait_for_svids(&["/mem"]).await;
    let data = env.dir.path().join("agent/data");
    let names: Vec<String> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        // The data_dir lock: an empty file that keeps a second agent off this directory.
        .filter(|n| n != ".lock")
        .collect();
    assert_eq!(
        names,
        vec!["bundle.pb".to_string()],
        "only the public bundle is kept"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_cli_fetch_x509_writes_spire_files_that_openssl_verifies() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::start(Opts::default()).await;
    env.register("/cli", &[&uid_selector()], |e| {
        e.dns_names = vec!["cli.example.org".into()]
    })
    .await;
    env.wait_for_svids(&["/cli"]).await;
    let out = tempfile::tempdir().unwrap();
    kame_agent::cli::fetch_x509(&env.socket_url(), Some(out.path()), false)
        .await
        .unwrap();
    let f = |n: &str| out.path().join(n);
    let key_mode = std::fs::metadata(f("svid.0.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(key_mode, 0o600);
    let verify = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(f("bundle.0.pem"))
        .arg(f("svid.0.pem"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    // The key file holds the certificate's key.
    let pubkey = |args: &[&str], file: std::path::PathBuf| {
        let o = std::process::Command::new("openssl")
            .args(args)
            .arg(file)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        o.stdout
    };
    assert_eq!(
        pubkey(&["pkey", "-pubout", "-in"], f("svid.0.key")),
        pubkey(&["x509", "-noout", "-pubkey", "-in"], f("svid.0.pem"))
    );
    kame_agent::cli::healthcheck(&env.socket_url())
        .await
        .unwrap();
    kame_agent::cli::fetch_jwt(&env.socket_url(), &["a".into()], None, false)
        .await
        .unwrap();
    match kame_agent::cli::validate_jwt(&env.socket_url(), "a", "not.a.jwt", false).await {
        Err(kame_agent::cli::CliError::InvalidSvid(_)) => {}
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        kame_agent::cli::fetch_x509("tcp://127.0.0.1:1", None, false).await,
        Err(kame_agent::cli::CliError::BadAddress(_))
    ));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_renews_its_own_svid_at_half_life_and_keeps_serving() {
    let env = Env::start(Opts {
        extra_server: "agent_ttl = \"8s\"",
        ..Default::default()
    })
    .await;
    env.register("/renewed", &[&uid_selector()], |_| {}).await;
    env.wait_for_svids(&["/renewed"]).await;
    let serial = || async {
        let id = env
            .agent_id
            .trim_start_matches(&format!("spiffe://{TD}"))
            .to_string();
        pb::agent::agent_client::AgentClient::new(env.admin().await)
            .get_agent(pb::agent::GetAgentRequest {
                id: Some(sid(TD, &id)),
                output_mask: None,
            })
            .await
            .unwrap()
            .into_inner()
            .x509svid_serial_number
    };
    let first = serial().await;
    // The agent renews at half of 8 s and switches to the new SVID (the server promotes it on
    // first use); it keeps syncing, so a new entry is still served after the first expired.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if serial().await != first {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent SVID was not renewed"
        );
    }
    tokio::time::sleep(Duration::from_secs(9)).await;
    env.register("/after-renewal", &[&uid_selector()], |_| {})
        .await;
    env.wait_for_svids(&["/after-renewal", "/renewed"]).await;
    env.stop().await;
}

/// The attacker's program for the exec-after-connect test: it connects to the Workload API,
/// forks a child that keeps the connection and relays it to `relay`, and (once the agent has
/// accepted) execs /bin/sleep, a binary an entry trusts. The child prints both pids.
const EXEC_AFTER_CONNECT: &str = r#"
import os, socket, sys, threading, time
wl, relay = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(wl)
s.set_inheritable(True)
if os.fork() > 0:
    time.sleep(0.5)
    os.execv("/bin/sleep", ["sleep", "60"])
l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
l.bind(relay)
l.listen(1)
print(os.getppid(), os.getpid(), flush=True)
c, _ = l.accept()
def pump(a, b):
    while True:
        d = a.recv(65536)
        if not d:
            break
        b.sendall(d)
t = threading.Thread(target=pump, args=(s, c), daemon=True)
t.start()
pump(c, s)
"#;

/// Issue 19 item 7: a process connects, hands the connection to a child and execs another
/// binary. The agent attests the connection's pid when a call arrives, so without a check it
/// would report the new binary (`unix:path`, `unix:sha256`) for the old connection. The
/// executable recorded when the connection was accepted must still be the one running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_api_exec_after_connect_is_refused() {
    let env = Env::start(Opts::default()).await;
    let sleep = std::fs::canonicalize("/bin/sleep").unwrap();
    env.register(
        "/trusted-sleep",
        &[&format!("unix:path:{}", sleep.display())],
        |_| {},
    )
    .await;
    // The test binary's own entry, registered after: once it is served, so is the other.
    let me = std::fs::canonicalize(std::env::current_exe().unwrap()).unwrap();
    env.register("/canary", &[&format!("unix:path:{}", me.display())], |_| {})
        .await;
    env.wait_for_svids(&["/canary"]).await;

    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("attack.py");
    std::fs::write(&script, EXEC_AFTER_CONNECT).unwrap();
    let relay = dir.path().join("relay.sock");
    let mut child = tokio::process::Command::new("python3")
        .arg(&script)
        .arg(&env.agent_socket)
        .arg(&relay)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let pids = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let (parent, relay_pid) = pids.trim().split_once(' ').unwrap();
    let parent: u32 = parent.parse().unwrap();
    // Wait until the connecting process runs /bin/sleep.
    let exe = format!("/proc/{parent}/exe");
    let t = std::time::Instant::now();
    while std::fs::read_link(&exe).ok().as_deref() != Some(sleep.as_path()) {
        assert!(t.elapsed() < Duration::from_secs(10), "no exec");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c = spiffe::WorkloadApiClient::connect_to(format!("unix://{}", relay.display()))
        .await
        .unwrap();
    let r = c.fetch_x509_svid().await;
    let e = match r {
        Ok(s) => panic!(
            "the agent gave {} to a connection made by another program",
            s.spiffe_id()
        ),
        Err(e) => format!("{e:?}"),
    };
    assert!(e.contains("exec after connect"), "{e}");
    let _ = std::process::Command::new("kill").arg(relay_pid).status();
    let _ = child.kill().await;
    env.stop().await;
}

/// The watch streams are served without tonic's per-stream encoder; the request side must still
/// behave as a gRPC server's: a request that says it is compressed is refused (Unimplemented),
/// a request message over the bound is refused (OutOfRange) before the caller is attested, a
/// request larger than an empty one but within the bound is read (unknown fields ignored), and
/// a stream whose last entry is deleted ends with PermissionDenied in its trailers. The
/// connection serves on after each refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_api_watch_streams_bound_the_request_and_end_with_status_trailers() {
    let env = Env::start(Opts::default()).await;
    let entry = env.register("/watched", &[&uid_selector()], |_| {}).await;
    env.wait_for_svids(&["/watched"]).await;
    let channel = kame_agent::cli::connect(&env.socket_url()).await.unwrap();
    // Any message type encodes as a request: its fields are unknown to X509SVIDRequest.
    async fn call(
        channel: &tonic::transport::Channel,
        method: &'static str,
        audience: String,
        encoding: Option<&'static str>,
    ) -> Result<tonic::codec::Streaming<pb::workload::X509svidResponse>, tonic::Status> {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let mut req = kame_agent::cli::with_header(pb::workload::JwtsvidRequest {
            audience: vec![audience],
            spiffe_id: String::new(),
        });
        if let Some(e) = encoding {
            req.metadata_mut()
                .insert("grpc-encoding", e.parse().unwrap());
        }
        let codec = tonic_prost::ProstCodec::<
            pb::workload::JwtsvidRequest,
            pb::workload::X509svidResponse,
        >::default();
        grpc.server_streaming(
            req,
            tonic::codegen::http::uri::PathAndQuery::from_static(method),
            codec,
        )
        .await
        .map(|r| r.into_inner())
    }
    const X509: &str = "/SpiffeWorkloadAPI/FetchX509SVID";
    let e = call(&channel, X509, "a".into(), Some("gzip"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    let e = call(&channel, X509, "a".repeat(64 * 1024), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    for method in [
        "/SpiffeWorkloadAPI/FetchX509Bundles",
        "/SpiffeWorkloadAPI/FetchJWTBundles",
    ] {
        let e = call(&channel, method, "a".repeat(64 * 1024), None)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange, "{method}: {e:?}");
    }
    let mut s = call(&channel, X509, "a".repeat(1000), None).await.unwrap();
    let first = s.message().await.unwrap().unwrap();
    assert_eq!(first.svids.len(), 1);
    assert!(first.svids[0].spiffe_id.ends_with("/watched"));
    env.delete_entry(&entry).await;
    let end = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match s.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream ends once the entry is gone");
    let e = end.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    env.stop().await;
}
