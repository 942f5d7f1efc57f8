//! Admin workloads over mTLS, and federated bundle management through the CLI.

mod common;

use common::*;
use kame_api::pb;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_entry_svid_authenticates_admin_apis_over_tls() {
    let s = TestServer::start(Opts::default()).await;
    let o = s
        .cli(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/ops",
            "--parent-id",
            "spiffe://example.org/spire/agent/x",
            "--selector",
            "unix:uid:0",
            "--admin",
        ])
        .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let key = TestKey::new();
    let mut svid_client = pb::svid::svid_client::SvidClient::new(s.admin().await);
    let admin_svid = svid_client
        .mint_x509svid(pb::svid::MintX509svidRequest {
            csr: key.csr(&["spiffe://example.org/ops"], &[]),
            ttl: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    let plain_key = TestKey::new();
    let plain = svid_client
        .mint_x509svid(pb::svid::MintX509svidRequest {
            csr: plain_key.csr(&["spiffe://example.org/not-admin"], &[]),
            ttl: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    let roots: Vec<Vec<u8>> = s
        .bundle()
        .await
        .x509_authorities
        .iter()
        .map(|c| c.asn1.clone())
        .collect();
    let ch = tls_channel(
        s.tcp_port,
        roots.clone(),
        Some((admin_svid.cert_chain, key.pkcs8())),
    )
    .await
    .unwrap();
    let n = pb::entry::entry_client::EntryClient::new(ch)
        .count_entries(pb::entry::CountEntriesRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .count;
    assert_eq!(n, 1);
    let ch = tls_channel(
        s.tcp_port,
        roots,
        Some((plain.cert_chain, plain_key.pkcs8())),
    )
    .await
    .unwrap();
    let e = pb::entry::entry_client::EntryClient::new(ch)
        .count_entries(pb::entry::CountEntriesRequest { filter: None })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_bundle_set_list_restrict_and_dissociate() {
    let s = TestServer::start(Opts::default()).await;
    // Another trust domain's bundle: take this server's own roots as PEM content.
    let pem = String::from_utf8(s.cli(&["bundle", "show"]).await.stdout).unwrap();
    let path = s.dir.path().join("other.pem");
    std::fs::write(&path, &pem).unwrap();
    let o = s
        .cli(&[
            "bundle",
            "set",
            "--id",
            "spiffe://other.org",
            "--path",
            path.to_str().unwrap(),
        ])
        .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The own trust domain is not a federated bundle.
    let o = s
        .cli(&[
            "bundle",
            "set",
            "--id",
            "example.org",
            "--path",
            path.to_str().unwrap(),
        ])
        .await;
    assert!(!o.status.success());
    // Garbage is refused before anything is stored.
    let bad = s.dir.path().join("bad.pem");
    std::fs::write(&bad, "not pem").unwrap();
    let o = s
        .cli(&[
            "bundle",
            "set",
            "--id",
            "third.org",
            "--path",
            bad.to_str().unwrap(),
        ])
        .await;
    assert!(!o.status.success());

    let o = s.cli(&["bundle", "list", "--output", "json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["bundles"].as_array().unwrap().len(), 1);
    assert_eq!(v["bundles"][0]["trust_domain"], "other.org");

    let o = s
        .cli(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/fed",
            "--parent-id",
            "spiffe://example.org/spire/agent/x",
            "--selector",
            "unix:uid:0",
            "--federates-with",
            "spiffe://other.org",
            "--output",
            "json",
        ])
        .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(e["federates_with"][0], "spiffe://other.org");

    // restrict (default) refuses while an entry federates with it
    let o = s.cli(&["bundle", "delete", "--id", "other.org"]).await;
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("FailedPrecondition"));
    let o = s
        .cli(&[
            "bundle",
            "delete",
            "--id",
            "other.org",
            "--mode",
            "dissociate",
        ])
        .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = s
        .cli(&[
            "entry",
            "show",
            "--entry-id",
            e["id"].as_str().unwrap(),
            "--output",
            "json",
        ])
        .await;
    let shown: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        shown["entries"][0]["federates_with"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let o = s.cli(&["bundle", "list", "--output", "json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["bundles"].as_array().unwrap().is_empty());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_update_show_filters_and_node_entries() {
    let s = TestServer::start(Opts::default()).await;
    let o = s
        .cli(&[
            "entry",
            "create",
            "--node",
            "--spiffe-id",
            "spiffe://example.org/nodes/rack1",
            "--selector",
            "join_token:rack1",
            "--output",
            "json",
        ])
        .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let node: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(node["parent_id"], "spiffe://example.org/spire/server");
    let o = s
        .cli(&[
            "entry",
            "update",
            "--entry-id",
            node["id"].as_str().unwrap(),
            "--spiffe-id",
            "spiffe://example.org/nodes/rack1",
            "--parent-id",
            "spiffe://example.org/spire/server",
            "--selector",
            "join_token:rack1",
            "--hint",
            "racks",
            "--output",
            "json",
        ])
        .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let upd: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(upd["revision_number"], 1);
    assert_eq!(upd["hint"], "racks");
    let o = s
        .cli(&[
            "entry",
            "show",
            "--selector",
            "join_token:rack1",
            "--output",
            "json",
        ])
        .await;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["entries"].as_array().unwrap().len(), 1);
    let o = s
        .cli(&[
            "entry",
            "show",
            "--spiffe-id",
            "spiffe://example.org/none",
            "--output",
            "json",
        ])
        .await;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["entries"].as_array().unwrap().is_empty());
    let o = s
        .cli(&[
            "entry",
            "delete",
            "--entry-id",
            node["id"].as_str().unwrap(),
        ])
        .await;
    assert!(o.status.success());
    let o = s
        .cli(&[
            "entry",
            "delete",
            "--entry-id",
            node["id"].as_str().unwrap(),
        ])
        .await;
    assert!(String::from_utf8_lossy(&o.stderr).contains("NotFound"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_entries_alias_agents_whose_selectors_match() {
    use kame_server::datastore::{AttestedNode, Selector};
    let s = TestServer::start(Opts::default()).await;
    let ctx = s.running().ctx.clone();
    let o = s
        .cli(&[
            "entry",
            "create",
            "--node",
            "--spiffe-id",
            "spiffe://example.org/nodes/rack1",
            "--selector",
            "rack:1",
            "--selector",
            "zone:a",
        ])
        .await;
    assert!(o.status.success());
    let o = s
        .cli(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/app",
            "--parent-id",
            "spiffe://example.org/nodes/rack1",
            "--selector",
            "unix:uid:1",
        ])
        .await;
    assert!(o.status.success());
    let node = |sels: &[(&str, &str)]| AttestedNode {
        spiffe_id: "spiffe://example.org/spire/agent/test/n".into(),
        attestation_type: "test".into(),
        serial_number: "01".into(),
        selectors: sels.iter().map(|(k, v)| Selector::new(*k, *v)).collect(),
        ..Default::default()
    };
    let all = kame_server::service::authorized_entries(
        &ctx,
        &node(&[("rack", "1"), ("zone", "a"), ("extra", "x")]),
    );
    let ids: Vec<&str> = all.iter().map(|e| e.spiffe_id.as_str()).collect();
    assert_eq!(
        ids,
        vec!["spiffe://example.org/app"],
        "superset of the node entry's selectors"
    );
    let none = kame_server::service::authorized_entries(&ctx, &node(&[("rack", "1")]));
    assert!(
        none.is_empty(),
        "a subset of the node entry's selectors is not enough"
    );
    s.stop().await;
}
