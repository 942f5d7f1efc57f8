//! The LocalAuthority API on a running server: every precondition violation with its code and
//! message (table-driven), nothing persisted by a refusal (bundle sequence unchanged), OLD
//! authorities remembered beyond the next slot, revoke destroying the key in the KeyManager,
//! and the CLI printing the whole prepare → activate → taint → revoke sequence.

mod common;

use common::*;
use kame_api::pb;
use kame_api::pb::localauthority as la;
use la::local_authority_client::LocalAuthorityClient;
use tonic::Code;
use tonic::transport::Channel;

#[derive(Clone, Copy, Debug)]
enum K {
    X509,
    Jwt,
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Prepare { force: bool },
    Activate,
    Taint,
    Revoke { force: bool },
}

async fn call(ch: Channel, k: K, op: Op, id: &str) -> Result<la::AuthorityState, tonic::Status> {
    let mut c = LocalAuthorityClient::new(ch);
    let id = id.to_string();
    Ok(match (k, op) {
        (K::X509, Op::Prepare { force }) => {
            c.prepare_x509_authority(la::PrepareX509AuthorityRequest { force })
                .await?
                .into_inner()
                .prepared_authority
        }
        (K::X509, Op::Activate) => {
            c.activate_x509_authority(la::ActivateX509AuthorityRequest { authority_id: id })
                .await?
                .into_inner()
                .activated_authority
        }
        (K::X509, Op::Taint) => {
            c.taint_x509_authority(la::TaintX509AuthorityRequest { authority_id: id })
                .await?
                .into_inner()
                .tainted_authority
        }
        (K::X509, Op::Revoke { force }) => {
            c.revoke_x509_authority(la::RevokeX509AuthorityRequest {
                authority_id: id,
                force,
            })
            .await?
            .into_inner()
            .revoked_authority
        }
        (K::Jwt, Op::Prepare { force }) => {
            c.prepare_jwt_authority(la::PrepareJwtAuthorityRequest { force })
                .await?
                .into_inner()
                .prepared_authority
        }
        (K::Jwt, Op::Activate) => {
            c.activate_jwt_authority(la::ActivateJwtAuthorityRequest { authority_id: id })
                .await?
                .into_inner()
                .activated_authority
        }
        (K::Jwt, Op::Taint) => {
            c.taint_jwt_authority(la::TaintJwtAuthorityRequest { authority_id: id })
                .await?
                .into_inner()
                .tainted_authority
        }
        (K::Jwt, Op::Revoke { force }) => {
            c.revoke_jwt_authority(la::RevokeJwtAuthorityRequest {
                authority_id: id,
                force,
            })
            .await?
            .into_inner()
            .revoked_authority
        }
    }
    .expect("a state in every successful response"))
}

/// (active, prepared, old + older) authority IDs.
async fn ids(ch: Channel, k: K) -> (String, Option<String>, Vec<String>) {
    let mut c = LocalAuthorityClient::new(ch);
    let (a, p, o, older) = match k {
        K::X509 => {
            let r = c
                .get_x509_authority_state(la::GetX509AuthorityStateRequest {})
                .await
                .unwrap()
                .into_inner();
            (r.active, r.prepared, r.old, r.older)
        }
        K::Jwt => {
            let r = c
                .get_jwt_authority_state(la::GetJwtAuthorityStateRequest {})
                .await
                .unwrap()
                .into_inner();
            (r.active, r.prepared, r.old, r.older)
        }
    };
    let mut old: Vec<String> = o.into_iter().map(|s| s.authority_id).collect();
    old.extend(older.into_iter().map(|s| s.authority_id));
    (a.unwrap().authority_id, p.map(|s| s.authority_id), old)
}

/// Runs a row of the table: the call is refused with `code` and a message containing
/// `message`, and the bundle (sequence number included) is unchanged.
async fn refused(s: &TestServer, k: K, op: Op, id: &str, code: Code, message: &str) {
    let before = s.bundle().await;
    let err = call(s.admin().await, k, op, id)
        .await
        .expect_err(&format!("{k:?} {op:?} {id:?} must be refused"));
    assert_eq!(err.code(), code, "{k:?} {op:?} {id:?}: {}", err.message());
    assert!(
        err.message().contains(message),
        "{k:?} {op:?} {id:?}: {:?} lacks {message:?}",
        err.message()
    );
    assert_eq!(
        s.bundle().await,
        before,
        "{k:?} {op:?}: a refusal changed the bundle"
    );
}

async fn preconditions_for(s: &TestServer, k: K) {
    use Code::{FailedPrecondition as FP, InvalidArgument as IA};
    let (a, p, old) = ids(s.admin().await, k).await;
    assert!(p.is_none() && old.is_empty());
    let no = "no authority ID provided";
    let unknown = if matches!(k, K::X509) {
        "0123456789abcdef0123456789abcdef01234567"
    } else {
        "NoSuchKidNoSuchKidNoSuchKid12345"
    };
    // Only the active authority exists.
    for (op, id, code, msg) in [
        (Op::Activate, "", IA, no),
        (Op::Activate, unknown, IA, "unknown"),
        (Op::Activate, a.as_str(), FP, "already active"),
        (Op::Taint, "", IA, no),
        (Op::Taint, unknown, IA, "unknown"),
        (Op::Taint, a.as_str(), FP, "is the active authority"),
        (Op::Revoke { force: false }, "", IA, no),
        (Op::Revoke { force: true }, unknown, IA, "unknown"),
        (
            Op::Revoke { force: true },
            a.as_str(),
            FP,
            "is the active authority",
        ),
    ] {
        refused(s, k, op, id, code, msg).await;
    }
    // A prepared authority: not replaced without force, not taintable or revocable.
    let p1 = call(s.admin().await, k, Op::Prepare { force: false }, "")
        .await
        .unwrap()
        .authority_id;
    for (op, id, code, msg) in [
        (Op::Prepare { force: false }, "", FP, "already prepared"),
        (Op::Taint, p1.as_str(), FP, "is PREPARED"),
        (Op::Revoke { force: true }, p1.as_str(), FP, "is PREPARED"),
    ] {
        refused(s, k, op, id, code, msg).await;
    }
    // With force, p1 is replaced and remembered as OLD.
    let p2 = call(s.admin().await, k, Op::Prepare { force: true }, "")
        .await
        .unwrap()
        .authority_id;
    assert_ne!(p1, p2);
    refused(s, k, Op::Activate, &p1, FP, "only a PREPARED authority").await;
    let act = call(s.admin().await, k, Op::Activate, &p2).await.unwrap();
    assert_eq!(act.authority_id, p2);
    let (a2, p, old) = ids(s.admin().await, k).await;
    assert_eq!((a2.as_str(), p), (p2.as_str(), None));
    assert_eq!(
        old,
        vec![a.clone(), p1.clone()],
        "old first, then the older ones"
    );
    // Revoke needs a taint; a taint is done once.
    refused(s, k, Op::Revoke { force: true }, &a, FP, "not tainted").await;
    let t = call(s.admin().await, k, Op::Taint, &a).await.unwrap();
    assert!(t.tainted);
    refused(s, k, Op::Taint, &a, FP, "already tainted").await;
    refused(s, k, Op::Activate, &a, FP, "only a PREPARED authority").await;
    // The older authority (beyond the next slot) can still be tainted and revoked.
    call(s.admin().await, k, Op::Taint, &p1).await.unwrap();
    for id in [&a, &p1] {
        let r = call(s.admin().await, k, Op::Revoke { force: false }, id)
            .await
            .unwrap();
        assert_eq!(&r.authority_id, id);
        refused(s, k, Op::Revoke { force: true }, id, IA, "unknown").await;
    }
    let b = s.bundle().await;
    match k {
        K::X509 => assert_eq!(b.x509_authorities.len(), 1, "only the active root is left"),
        K::Jwt => assert_eq!(
            b.jwt_authorities
                .iter()
                .map(|j| j.key_id.clone())
                .collect::<Vec<_>>(),
            vec![p2.clone()]
        ),
    }
    let (_, _, old) = ids(s.admin().await, k).await;
    assert!(old.is_empty(), "revoked authorities are forgotten: {old:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn localauthority_every_precondition_violation_has_its_code_and_persists_nothing() {
    let s = TestServer::start(Opts::default()).await;
    preconditions_for(&s, K::X509).await;
    preconditions_for(&s, K::Jwt).await;
    // Upstream RPCs with no upstream authority configured; WIT is not implemented.
    let mut c = LocalAuthorityClient::new(s.admin().await);
    let e = c
        .taint_x509_upstream_authority(la::TaintX509UpstreamAuthorityRequest {
            subject_key_id: "ab".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert_eq!(e.message(), "upstream authority is not configured");
    let e = c
        .revoke_x509_upstream_authority(la::RevokeX509UpstreamAuthorityRequest {
            subject_key_id: "ab".into(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = c
        .prepare_wit_authority(la::PrepareWitAuthorityRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn localauthority_needs_a_local_or_admin_caller() {
    let s = TestServer::start(Opts::default()).await;
    let roots: Vec<Vec<u8>> = s
        .bundle()
        .await
        .x509_authorities
        .iter()
        .map(|c| c.asn1.clone())
        .collect();
    // Over TCP without a client certificate.
    let ch = tls_channel(s.tcp_port, roots, None).await.unwrap();
    let e = LocalAuthorityClient::new(ch)
        .prepare_x509_authority(la::PrepareX509AuthorityRequest { force: false })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    let (_, p, _) = ids(s.admin().await, K::X509).await;
    assert!(p.is_none(), "nothing was prepared");
    s.stop().await;
}

fn keys_json_fingerprints(s: &TestServer) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.dir.path().join("data/keys.json")).unwrap())
            .unwrap();
    v["keys"].as_object().unwrap().keys().cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn localauthority_cli_runs_the_whole_sequence_and_revoke_destroys_the_key() {
    let mut s = TestServer::start(Opts::default()).await;
    let json = |o: &std::process::Output| -> serde_json::Value {
        assert!(
            o.status.success(),
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let show = json(
        &s.cli(&["localauthority", "x509", "show", "--output", "json"])
            .await,
    );
    let a = show["active"]["authority_id"].as_str().unwrap().to_string();
    assert!(show["prepared"].is_null());
    let p = json(
        &s.cli(&["localauthority", "x509", "prepare", "--output", "json"])
            .await,
    );
    let p = p["authority_id"].as_str().unwrap().to_string();
    // Refused again without --force: the CLI fails and says why.
    let o = s.cli(&["localauthority", "x509", "prepare"]).await;
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("FailedPrecondition"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    json(
        &s.cli(&[
            "localauthority",
            "x509",
            "activate",
            "--authority-id",
            &p,
            "--output",
            "json",
        ])
        .await,
    );
    assert!(keys_json_fingerprints(&s).contains(&"x509-CA-A".to_string()));
    let o = s
        .cli(&["localauthority", "x509", "taint", "--authority-id", &a])
        .await;
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("Tainted X.509 authority:") && out.contains(&a),
        "{out}"
    );
    let pretty = s.cli(&["localauthority", "x509", "show"]).await;
    let pretty = String::from_utf8_lossy(&pretty.stdout).to_string();
    for want in [
        "Active X.509 authority:",
        "Prepared X.509 authority:\n  No Prepared authority found",
        "Old X.509 authority:",
        "Tainted: true",
        "Agents still holding SVIDs under it: 0",
        " +0000 UTC",
    ] {
        assert!(pretty.contains(want), "{want:?} in\n{pretty}");
    }
    let r = json(
        &s.cli(&[
            "localauthority",
            "x509",
            "revoke",
            "--authority-id",
            &a,
            "--output",
            "json",
        ])
        .await,
    );
    assert_eq!(r["authority_id"], a.as_str());
    // Gone from the bundle (bundle show) and from the KeyManager (the key file).
    let b = json(&s.cli(&["bundle", "show", "--format", "spiffe"]).await);
    assert_eq!(
        b["keys"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| k["use"] == "x509-svid")
            .count(),
        1
    );
    assert!(
        !keys_json_fingerprints(&s).contains(&"x509-CA-A".to_string()),
        "the revoked authority's key is destroyed"
    );
    // The JWT side through the CLI too.
    let show = json(
        &s.cli(&["localauthority", "jwt", "show", "--output", "json"])
            .await,
    );
    let ja = show["active"]["authority_id"].as_str().unwrap().to_string();
    let jp = json(
        &s.cli(&["localauthority", "jwt", "prepare", "--output", "json"])
            .await,
    );
    let jp = jp["authority_id"].as_str().unwrap().to_string();
    json(
        &s.cli(&[
            "localauthority",
            "jwt",
            "activate",
            "--authority-id",
            &jp,
            "--output",
            "json",
        ])
        .await,
    );
    json(
        &s.cli(&[
            "localauthority",
            "jwt",
            "taint",
            "--authority-id",
            &ja,
            "--output",
            "json",
        ])
        .await,
    );
    json(
        &s.cli(&[
            "localauthority",
            "jwt",
            "revoke",
            "--authority-id",
            &ja,
            "--output",
            "json",
        ])
        .await,
    );
    let b = s.bundle().await;
    assert!(b.jwt_authorities.iter().all(|k| k.key_id != ja));
    assert!(!keys_json_fingerprints(&s).contains(&"JWT-Signer-A".to_string()));
    // A restart keeps the new authorities and does not bring the revoked ones back.
    s.restart().await;
    let show = json(
        &s.cli(&["localauthority", "x509", "show", "--output", "json"])
            .await,
    );
    assert_eq!(show["active"]["authority_id"], p.as_str());
    assert!(show["old"].is_null(), "{show}");
    let o = s
        .cli(&["upstreamauthority", "taint", "--subject-key-id", "ab"])
        .await;
    assert!(!o.status.success());
    let _: pb::types::Bundle = s.bundle().await;
    s.stop().await;
}

/// A second server on `first`'s datastore (its own keys, server id and admin socket): two
/// servers of one trust domain sharing state, as in HA.
async fn peer_of(first: &TestServer, o: Opts) -> TestServer {
    let shared = first.dir.path().join("data/datastore.sqlite3");
    on_datastore(
        o,
        &format!(
            "database_type = \"sqlite3\"\n            connection_string = \"{}\"",
            shared.display()
        ),
    )
    .await
}

/// A server whose DataStore `plugin_data` is `datastore`.
async fn on_datastore(o: Opts, datastore: &str) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let own = dir.path().join("data/datastore.sqlite3");
    let text = config_text(dir.path(), port, &o).replace(
        &format!(
            "database_type = \"sqlite3\"\n            connection_string = \"{}\"",
            own.display()
        ),
        datastore,
    );
    assert!(text.contains(datastore));
    let config_path = dir.path().join("server.conf");
    std::fs::write(&config_path, text).unwrap();
    let mut s = TestServer {
        socket: dir.path().join("sock/api.sock"),
        dir,
        config_path,
        running: None,
        tcp_port: port,
        key_manager: None,
    };
    s.restart().await;
    s
}

fn holds_key(s: &TestServer, id: &str) -> bool {
    keys_json_fingerprints(s).contains(&id.to_string())
}

// ca_ttl 2m: the rotation tick (ca_ttl/24) is 5 s.
fn ha_opts() -> Opts {
    Opts {
        ca_ttl: "2m",
        x509_ttl: "10s",
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn localauthority_ha_taint_and_revoke_of_a_peers_authority_reach_the_peer() {
    let s1 = TestServer::start(ha_opts()).await;
    let s2 = peer_of(&s1, ha_opts()).await;
    ha_taint_and_revoke(s1, s2).await;
}

/// The same with both servers on one PostgreSQL cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn localauthority_ha_on_postgres_taint_and_revoke_of_a_peers_authority_reach_the_peer() {
    let pg = kame_server::datastore::testing::PgCluster::start();
    let ds = format!(
        "database_type = \"postgres\"\n            connection_string = \"{}\"",
        pg.create_database("kame")
    );
    let s1 = on_datastore(ha_opts(), &ds).await;
    let s2 = on_datastore(ha_opts(), &ds).await;
    assert_eq!(
        s1.bundle().await.x509_authorities.len(),
        2,
        "one bundle, both CAs"
    );
    ha_taint_and_revoke(s1, s2).await;
}

async fn ha_taint_and_revoke(s1: TestServer, s2: TestServer) {
    // The peer rotates: its first authority becomes OLD.
    let old2 = ids(s2.admin().await, K::X509).await.0;
    let p2 = call(s2.admin().await, K::X509, Op::Prepare { force: false }, "")
        .await
        .unwrap()
        .authority_id;
    call(s2.admin().await, K::X509, Op::Activate, &p2)
        .await
        .unwrap();
    assert!(holds_key(&s2, "x509-CA-A"));
    // Through the first server: the peer's active authority is refused, its OLD one is tainted
    // and revoked (the peer's journal is in the shared datastore).
    refused(
        &s1,
        K::X509,
        Op::Taint,
        &p2,
        Code::FailedPrecondition,
        "is the active authority",
    )
    .await;
    call(s1.admin().await, K::X509, Op::Taint, &old2)
        .await
        .unwrap();
    call(
        s1.admin().await,
        K::X509,
        Op::Revoke { force: false },
        &old2,
    )
    .await
    .unwrap();
    assert!(
        s1.bundle()
            .await
            .x509_authorities
            .iter()
            .all(|c| kame_api::x509svid::ParsedCert::parse(&c.asn1)
                .unwrap()
                .subject_key_id()
                .unwrap()
                .map(hex::encode)
                != Some(old2.clone())),
        "the shared bundle no longer holds the revoked root"
    );
    // The peer acts on its next tick: the revoked authority is forgotten and its key destroyed.
    wait_for(
        "the peer to dispose of the revoked key",
        std::time::Duration::from_secs(30),
        || async { !holds_key(&s2, "x509-CA-A") },
    )
    .await;
    let (_, _, old) = ids(s2.admin().await, K::X509).await;
    assert!(old.is_empty(), "{old:?}");
    s2.stop().await;
    s1.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn localauthority_ha_authority_revoked_while_its_server_is_down_is_disposed_at_start() {
    let s1 = TestServer::start(Opts::default()).await;
    let mut s2 = peer_of(&s1, Opts::default()).await;
    let old = ids(s2.admin().await, K::Jwt).await.0;
    let p = call(s2.admin().await, K::Jwt, Op::Prepare { force: false }, "")
        .await
        .unwrap()
        .authority_id;
    call(s2.admin().await, K::Jwt, Op::Activate, &p)
        .await
        .unwrap();
    // Down while the others taint and revoke its OLD key.
    if let Some(r) = s2.running.take() {
        r.stop().await;
    }
    assert!(holds_key(&s2, "JWT-Signer-A"));
    call(s1.admin().await, K::Jwt, Op::Taint, &old)
        .await
        .unwrap();
    call(s1.admin().await, K::Jwt, Op::Revoke { force: false }, &old)
        .await
        .unwrap();
    s2.restart().await;
    assert!(
        !holds_key(&s2, "JWT-Signer-A"),
        "the revoked authority's key is destroyed when the journal is loaded"
    );
    assert_eq!(ids(s2.admin().await, K::Jwt).await.0, p);
    s2.stop().await;
    s1.stop().await;
}
