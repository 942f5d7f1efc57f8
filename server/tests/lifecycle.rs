//! Server lifecycle through the real listeners: restart keeps the CA, entries and tokens;
//! automatic A/B rotation publishes the prepared root before activation; join_token attestation
//! over TLS, agent authorization, renewal and banning.

mod common;

use common::*;
use kame_api::pb;
use kame_api::x509svid::{ParsedCert, verify_chain};
use std::time::Duration;
use tonic::Code;

fn roots(b: &pb::types::Bundle) -> Vec<Vec<u8>> {
    b.x509_authorities.iter().map(|c| c.asn1.clone()).collect()
}

async fn mint(s: &TestServer, id: &str) -> Vec<Vec<u8>> {
    pb::svid::svid_client::SvidClient::new(s.admin().await)
        .mint_x509svid(pb::svid::MintX509svidRequest {
            csr: TestKey::new().csr(&[id], &[]),
            ttl: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap()
        .cert_chain
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_ca_bundle_entries_and_tokens() {
    let mut s = TestServer::start(Opts::default()).await;
    let o = s
        .cli(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/w",
            "--parent-id",
            "spiffe://example.org/spire/agent/x",
            "--selector",
            "unix:uid:0",
            "--output",
            "json",
        ])
        .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let created: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let o = s
        .cli(&["token", "generate", "--ttl", "600", "--output", "json"])
        .await;
    let token: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let token = token["value"].as_str().unwrap().to_string();
    let before = s.bundle().await;
    let ca_before = s
        .running()
        .ctx
        .ca
        .current_x509()
        .unwrap()
        .authority_id
        .clone();
    let kid_before = s.running().ctx.ca.current_jwt().unwrap().kid.clone();

    s.restart().await;

    let after = s.bundle().await;
    assert_eq!(roots(&after), roots(&before), "same X.509 authorities");
    assert_eq!(
        after.jwt_authorities, before.jwt_authorities,
        "same JWT authorities"
    );
    assert_eq!(
        after.sequence_number, before.sequence_number,
        "no change, no new sequence"
    );
    assert_eq!(
        s.running().ctx.ca.current_x509().unwrap().authority_id,
        ca_before
    );
    assert_eq!(s.running().ctx.ca.current_jwt().unwrap().kid, kid_before);
    let chain = mint(&s, "spiffe://example.org/after").await;
    verify_chain(&chain, &roots(&before), kame_server::ca::now_secs()).unwrap();
    let o = s
        .cli(&[
            "entry",
            "show",
            "--entry-id",
            created["id"].as_str().unwrap(),
            "--output",
            "json",
        ])
        .await;
    assert!(o.status.success());
    assert!(s.running().ctx.ds.join_token_exists(&token).await.unwrap());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_key_manager_restart_starts_a_new_ca_and_keeps_old_root_trusted() {
    let mut s = TestServer::start(Opts {
        key_manager: "memory",
        ..Default::default()
    })
    .await;
    let before = s.bundle().await;
    let a = s
        .running()
        .ctx
        .ca
        .current_x509()
        .unwrap()
        .authority_id
        .clone();
    s.restart().await;
    let after = s.bundle().await;
    assert_ne!(
        s.running().ctx.ca.current_x509().unwrap().authority_id,
        a,
        "keys were lost with the process"
    );
    assert_eq!(
        after.x509_authorities.len(),
        2,
        "old root stays until it expires"
    );
    assert!(after.sequence_number > before.sequence_number);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_rotation_publishes_prepared_root_before_activation() {
    let s = TestServer::start(Opts {
        ca_ttl: "12s",
        x509_ttl: "2s",
        ..Default::default()
    })
    .await;
    let ca = s.running().ctx.ca.clone();
    let first = ca.current_x509().unwrap();
    let first_kid = ca.current_jwt().unwrap().kid.clone();
    let b0 = s.bundle().await;
    assert_eq!(b0.x509_authorities.len(), 1);
    let root_a = vec![first.cert_der.clone()];
    let now = kame_server::ca::now_secs;
    verify_chain(&mint(&s, "spiffe://example.org/w").await, &root_a, now()).unwrap();

    // Prepared at half-life: published in the bundle while A is still the active authority.
    wait_for(
        "prepared root in bundle",
        Duration::from_secs(12),
        || async { s.bundle().await.x509_authorities.len() == 2 },
    )
    .await;
    assert_eq!(
        ca.current_x509().unwrap().authority_id,
        first.authority_id,
        "B is published before it is used"
    );
    let b1 = s.bundle().await;
    assert!(b1.sequence_number > b0.sequence_number);
    wait_for(
        "prepared JWT key in bundle",
        Duration::from_secs(3),
        || async { s.bundle().await.jwt_authorities.len() == 2 },
    )
    .await;
    assert_eq!(
        ca.current_jwt().unwrap().kid,
        first_kid,
        "next JWT key published before use too"
    );
    let prepared = ca.next_x509().unwrap();
    verify_chain(&mint(&s, "spiffe://example.org/w").await, &root_a, now()).unwrap();

    // Activated with 1/6 of A's life left: new SVIDs chain to B; A stays trusted.
    wait_for("activation", Duration::from_secs(12), || async {
        ca.current_x509().unwrap().authority_id != first.authority_id
    })
    .await;
    assert_eq!(
        ca.current_x509().unwrap().authority_id,
        prepared.authority_id
    );
    let root_b = vec![prepared.cert_der.clone()];
    let chain = mint(&s, "spiffe://example.org/w").await;
    verify_chain(&chain, &root_b, now()).unwrap();
    assert!(verify_chain(&chain, &root_a, now()).is_err());
    let b2 = s.bundle().await;
    assert!(
        roots(&b2).contains(&first.cert_der),
        "old root stays in the bundle until it expires"
    );
    // SVIDs never outlive the CA that signed them.
    let leaf = ParsedCert::parse(&chain[0]).unwrap();
    assert!(leaf.not_after() <= prepared.not_after);
    wait_for("JWT activation", Duration::from_secs(6), || async {
        ca.current_jwt().unwrap().kid != first_kid
    })
    .await;
    s.stop().await;
}

async fn attest(
    ch: tonic::transport::Channel,
    token: &str,
    key: &TestKey,
) -> Result<pb::types::X509svid, tonic::Status> {
    let req = pb::agent::AttestAgentRequest {
        step: Some(pb::agent::attest_agent_request::Step::Params(
            pb::agent::attest_agent_request::Params {
                data: Some(pb::types::AttestationData {
                    r#type: "join_token".into(),
                    payload: token.as_bytes().to_vec(),
                }),
                params: Some(pb::agent::AgentX509svidParams {
                    csr: key.csr(&[], &[]),
                }),
            },
        )),
    };
    let mut stream = pb::agent::agent_client::AgentClient::new(ch)
        .attest_agent(tokio_stream::iter(vec![req]))
        .await?
        .into_inner();
    let msg = stream.message().await?.expect("a response");
    match msg.step {
        Some(pb::agent::attest_agent_response::Step::Result(r)) => Ok(r.svid.unwrap()),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_token_attestation_authorization_renewal_and_ban() {
    let s = TestServer::start(Opts::default()).await;
    let admin = s.admin().await;
    let token = pb::agent::agent_client::AgentClient::new(admin.clone())
        .create_join_token(pb::agent::CreateJoinTokenRequest {
            ttl: 600,
            token: String::new(),
            agent_id: Some(spiffe_id(TD, "/node/alias")),
        })
        .await
        .unwrap()
        .into_inner()
        .value;
    let mut entries = pb::entry::entry_client::EntryClient::new(admin.clone());
    let mk = |spiffe: &str, parent: &str| pb::types::Entry {
        spiffe_id: Some(spiffe_id(TD, spiffe)),
        parent_id: Some(spiffe_id(TD, parent)),
        selectors: vec![pb::types::Selector {
            r#type: "unix".into(),
            value: "uid:1000".into(),
        }],
        ..Default::default()
    };
    let res = entries
        .batch_create_entry(pb::entry::BatchCreateEntryRequest {
            entries: vec![
                mk("/workload", "/node/alias"),
                mk("/elsewhere", "/spire/agent/join_token/other"),
            ],
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let workload_id = res[0].entry.as_ref().unwrap().id.clone();
    let other_id = res[1].entry.as_ref().unwrap().id.clone();

    let bundle_roots = roots(&s.bundle().await);
    let anon = tls_channel(s.tcp_port, bundle_roots.clone(), None)
        .await
        .unwrap();
    let agent_key = TestKey::new();
    let svid = attest(anon.clone(), &token, &agent_key).await.unwrap();
    let agent_id = format!("spiffe://example.org/spire/agent/join_token/{token}");
    let v = verify_chain(&svid.cert_chain, &bundle_roots, kame_server::ca::now_secs()).unwrap();
    assert_eq!(v.id.to_string(), agent_id);

    // single use
    let e = attest(anon.clone(), &token, &TestKey::new())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let e = attest(anon.clone(), "no-such-token", &TestKey::new())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // The agent authenticates with its SVID.
    let agent = tls_channel(
        s.tcp_port,
        bundle_roots.clone(),
        Some((svid.cert_chain.clone(), agent_key.pkcs8())),
    )
    .await
    .unwrap();
    let authorized = pb::entry::entry_client::EntryClient::new(agent.clone())
        .get_authorized_entries(pb::entry::GetAuthorizedEntriesRequest { output_mask: None })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let ids: Vec<&str> = authorized.iter().map(|e| e.id.as_str()).collect();
    assert!(
        ids.contains(&workload_id.as_str()),
        "workload under the alias is authorized"
    );
    assert!(
        !ids.contains(&other_id.as_str()),
        "another agent's entry is not"
    );
    assert_eq!(authorized.len(), 2, "alias entry + workload entry");

    // SyncAuthorizedEntries returns the same set.
    let mut sync = pb::entry::entry_client::EntryClient::new(agent.clone())
        .sync_authorized_entries(tokio_stream::iter(vec![
            pb::entry::SyncAuthorizedEntriesRequest {
                output_mask: None,
                ids: vec![],
            },
        ]))
        .await
        .unwrap()
        .into_inner();
    let first = sync.message().await.unwrap().unwrap();
    assert_eq!(first.entries.len(), 2);
    assert!(!first.more);
    // SPIRE's checks on the first request.
    for (req, want) in [
        (
            pb::entry::SyncAuthorizedEntriesRequest {
                output_mask: None,
                ids: vec![workload_id.clone()],
            },
            "specifying IDs on initial request is not supported",
        ),
        (
            pb::entry::SyncAuthorizedEntriesRequest {
                output_mask: Some(pb::types::EntryMask::default()),
                ids: vec![],
            },
            "revision number cannot be masked",
        ),
    ] {
        let mut s = pb::entry::entry_client::EntryClient::new(agent.clone())
            .sync_authorized_entries(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let e = s.message().await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        assert_eq!(e.message(), want);
    }
    // Exactly one page (500 entries) comes whole, as SPIRE sends it; one more switches to
    // revisions.
    let sync_first = |agent: tonic::transport::Channel| async move {
        pb::entry::entry_client::EntryClient::new(agent)
            .sync_authorized_entries(tokio_stream::iter(vec![
                pb::entry::SyncAuthorizedEntriesRequest {
                    output_mask: None,
                    ids: vec![],
                },
            ]))
            .await
            .unwrap()
            .into_inner()
            .message()
            .await
            .unwrap()
            .unwrap()
    };
    let more: Vec<_> = (0..498)
        .map(|i| mk(&format!("/page/{i}"), "/node/alias"))
        .collect();
    let res = entries
        .batch_create_entry(pb::entry::BatchCreateEntryRequest {
            entries: more,
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(res.iter().all(|r| r.status.as_ref().unwrap().code == 0));
    let whole = sync_first(agent.clone()).await;
    assert_eq!(
        (whole.entries.len(), whole.entry_revisions.len(), whole.more),
        (500, 0, false)
    );
    let res = entries
        .batch_create_entry(pb::entry::BatchCreateEntryRequest {
            entries: vec![mk("/page/498", "/node/alias")],
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(res[0].status.as_ref().unwrap().code, 0);
    let paged = sync_first(agent.clone()).await;
    assert_eq!(
        (paged.entries.len(), paged.entry_revisions.len(), paged.more),
        (0, 500, true)
    );

    // The SVID's ID comes from the entry, never from the CSR.
    let wkey = TestKey::new();
    let results = pb::svid::svid_client::SvidClient::new(agent.clone())
        .batch_new_x509svid(pb::svid::BatchNewX509svidRequest {
            params: vec![
                pb::svid::NewX509svidParams {
                    entry_id: workload_id.clone(),
                    csr: wkey.csr(&["spiffe://example.org/evil"], &[]),
                },
                pb::svid::NewX509svidParams {
                    entry_id: other_id.clone(),
                    csr: wkey.csr(&[], &[]),
                },
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results[0].status.as_ref().unwrap().code, 0);
    let chain = &results[0].svid.as_ref().unwrap().cert_chain;
    assert_eq!(
        verify_chain(chain, &bundle_roots, kame_server::ca::now_secs())
            .unwrap()
            .id
            .to_string(),
        "spiffe://example.org/workload"
    );
    assert_eq!(
        results[1].status.as_ref().unwrap().code,
        Code::NotFound as i32
    );
    let jwt = pb::svid::svid_client::SvidClient::new(agent.clone())
        .new_jwtsvid(pb::svid::NewJwtsvidRequest {
            entry_id: workload_id.clone(),
            audience: vec!["x".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    assert_eq!(jwt.id.unwrap().path, "/workload");

    // An agent cannot use admin APIs.
    let e = pb::entry::entry_client::EntryClient::new(agent.clone())
        .count_entries(pb::entry::CountEntriesRequest { filter: None })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // Renewal: the new SVID works and, once used, retires the old one.
    let new_key = TestKey::new();
    let renewed = pb::agent::agent_client::AgentClient::new(agent.clone())
        .renew_agent(pb::agent::RenewAgentRequest {
            params: Some(pb::agent::AgentX509svidParams {
                csr: new_key.csr(&[], &[]),
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    let agent2 = tls_channel(
        s.tcp_port,
        bundle_roots.clone(),
        Some((renewed.cert_chain.clone(), new_key.pkcs8())),
    )
    .await
    .unwrap();
    pb::entry::entry_client::EntryClient::new(agent2.clone())
        .get_authorized_entries(pb::entry::GetAuthorizedEntriesRequest { output_mask: None })
        .await
        .unwrap();
    let old = tls_channel(
        s.tcp_port,
        bundle_roots.clone(),
        Some((svid.cert_chain.clone(), agent_key.pkcs8())),
    )
    .await
    .unwrap();
    let e = pb::entry::entry_client::EntryClient::new(old)
        .get_authorized_entries(pb::entry::GetAuthorizedEntriesRequest { output_mask: None })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // agent list / ban through the CLI
    let o = s.cli(&["agent", "list"]).await;
    assert!(String::from_utf8_lossy(&o.stdout).contains(&agent_id));
    let o = s.cli(&["agent", "ban", "--spiffe-id", &agent_id]).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e = pb::entry::entry_client::EntryClient::new(agent2)
        .get_authorized_entries(pb::entry::GetAuthorizedEntriesRequest { output_mask: None })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let o = s
        .cli(&[
            "agent",
            "show",
            "--spiffe-id",
            &agent_id,
            "--output",
            "json",
        ])
        .await;
    let shown: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(shown["banned"], true);
    let o = s.cli(&["agent", "evict", "--spiffe-id", &agent_id]).await;
    assert!(o.status.success());
    let o = s.cli(&["agent", "count", "--output", "json"]).await;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["count"],
        0
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_authority_is_activated_after_downtime_past_expiry() {
    let mut s = TestServer::start(Opts {
        ca_ttl: "12s",
        x509_ttl: "2s",
        ..Default::default()
    })
    .await;
    let ca = s.running().ctx.ca.clone();
    let first = ca.current_x509().unwrap();
    wait_for("prepared authority", Duration::from_secs(12), || async {
        ca.next_x509()
            .is_some_and(|n| n.status == kame_server::ca::SlotStatus::Prepared)
    })
    .await;
    let prepared = ca.next_x509().unwrap();
    // Stop before activation and stay down until the active authority has expired.
    if let Some(r) = s.running.take() {
        r.stop().await;
    }
    let wait = (first.not_after * 1000 + 500).saturating_sub(kame_server::ca::now_ms());
    tokio::time::sleep(Duration::from_millis(wait)).await;
    s.restart().await;
    let cur = s.running().ctx.ca.current_x509().unwrap();
    assert_eq!(
        cur.authority_id, prepared.authority_id,
        "the published, prepared authority takes over"
    );
    let chain = mint(&s, "spiffe://example.org/w").await;
    verify_chain(
        &chain,
        std::slice::from_ref(&prepared.cert_der),
        kame_server::ca::now_secs(),
    )
    .unwrap();
    s.stop().await;
}
