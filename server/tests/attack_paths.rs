//! Attack paths against a running server (issue 19): a ban that an in-flight write must not
//! undo, and SPIRE's per-IP rate limits on attestation and signing (on by default, waits on a
//! token bucket, refused when the caller's deadline would pass first, off by configuration).

mod common;

use common::*;
use kame_api::pb;
use kame_keymanager::{KeyManager, KeyType, PublicKey, SignOpts, Signature};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tonic::Code;

/// A memory KeyManager whose next `sign`, once armed, waits until the test releases it: a
/// slow KMS, on cue.
#[derive(Debug, Default)]
struct GatedKm {
    inner: kame_keymanager::memory::MemoryKeyManager,
    armed: AtomicBool,
    entered: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl KeyManager for GatedKm {
    fn name(&self) -> &'static str {
        "memory"
    }
    async fn generate_key(
        &self,
        id: &str,
        key_type: KeyType,
    ) -> kame_keymanager::Result<PublicKey> {
        self.inner.generate_key(id, key_type).await
    }
    async fn public_key(&self, id: &str) -> kame_keymanager::Result<PublicKey> {
        self.inner.public_key(id).await
    }
    async fn public_keys(&self) -> kame_keymanager::Result<Vec<PublicKey>> {
        self.inner.public_keys().await
    }
    async fn delete_key(&self, id: &str, fingerprint: &str) -> kame_keymanager::Result<bool> {
        self.inner.delete_key(id, fingerprint).await
    }
    async fn sign(
        &self,
        id: &str,
        message: &[u8],
        opts: SignOpts,
    ) -> kame_keymanager::Result<Signature> {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.entered.notify_one();
            self.release.notified().await;
        }
        self.inner.sign(id, message, opts).await
    }
}

async fn join_token(s: &TestServer) -> String {
    pb::agent::agent_client::AgentClient::new(s.admin().await)
        .create_join_token(pb::agent::CreateJoinTokenRequest {
            ttl: 600,
            token: String::new(),
            agent_id: None,
        })
        .await
        .unwrap()
        .into_inner()
        .value
}

/// Attests with a fresh join token over TLS; `timeout` becomes the call's gRPC deadline.
async fn attest(
    s: &TestServer,
    key: &TestKey,
    timeout: Option<Duration>,
) -> Result<pb::types::X509svid, tonic::Status> {
    let token = join_token(s).await;
    let roots = bundle_roots(s).await;
    let ch = tls_channel(s.tcp_port, roots, None).await.unwrap();
    let params = pb::agent::AttestAgentRequest {
        step: Some(pb::agent::attest_agent_request::Step::Params(
            pb::agent::attest_agent_request::Params {
                data: Some(pb::types::AttestationData {
                    r#type: "join_token".into(),
                    payload: token.into_bytes(),
                }),
                params: Some(pb::agent::AgentX509svidParams {
                    csr: key.csr(&[], &[]),
                }),
            },
        )),
    };
    let mut req = tonic::Request::new(tokio_stream::iter(vec![params]));
    if let Some(t) = timeout {
        req.set_timeout(t);
    }
    let mut stream = pb::agent::agent_client::AgentClient::new(ch)
        .attest_agent(req)
        .await?
        .into_inner();
    match stream.message().await?.and_then(|m| m.step) {
        Some(pb::agent::attest_agent_response::Step::Result(r)) => Ok(r.svid.unwrap()),
        other => panic!("unexpected {other:?}"),
    }
}

async fn bundle_roots(s: &TestServer) -> Vec<Vec<u8>> {
    s.bundle()
        .await
        .x509_authorities
        .iter()
        .map(|c| c.asn1.clone())
        .collect()
}

async fn agent_channel(
    s: &TestServer,
    svid: &pb::types::X509svid,
    key: &TestKey,
) -> tonic::transport::Channel {
    tls_channel(
        s.tcp_port,
        bundle_roots(s).await,
        Some((svid.cert_chain.clone(), key.pkcs8())),
    )
    .await
    .unwrap()
}

async fn is_banned(s: &TestServer, id: &pb::types::Spiffeid) -> bool {
    pb::agent::agent_client::AgentClient::new(s.admin().await)
        .get_agent(pb::agent::GetAgentRequest {
            id: Some(id.clone()),
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner()
        .banned
}

/// Issue 19 item 4: RenewAgent reads the node, waits on the KeyManager, then writes. A ban
/// that lands while it waits holds: the renewal cannot write the agent back to life, and
/// neither the old nor a renewed SVID is accepted afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ban_during_renew_agent_holds() {
    let km = Arc::new(GatedKm::default());
    let s = TestServer::start_with(Opts::default(), Some(km.clone())).await;
    let key = TestKey::new();
    let svid = attest(&s, &key, None).await.unwrap();
    let id = svid.id.clone().unwrap();
    let agent = agent_channel(&s, &svid, &key).await;

    km.armed.store(true, Ordering::SeqCst);
    let new_key = TestKey::new();
    let csr = new_key.csr(&[], &[]);
    let renewing = tokio::spawn({
        let agent = agent.clone();
        async move {
            pb::agent::agent_client::AgentClient::new(agent)
                .renew_agent(pb::agent::RenewAgentRequest {
                    params: Some(pb::agent::AgentX509svidParams { csr }),
                })
                .await
        }
    });
    tokio::time::timeout(Duration::from_secs(10), km.entered.notified())
        .await
        .expect("RenewAgent reached the KeyManager");
    pb::agent::agent_client::AgentClient::new(s.admin().await)
        .ban_agent(pb::agent::BanAgentRequest {
            id: Some(id.clone()),
        })
        .await
        .unwrap();
    assert!(is_banned(&s, &id).await);
    km.release.notify_one();
    let renewed = renewing.await.unwrap();
    assert!(is_banned(&s, &id).await, "the renewal undid the ban");
    if let Err(e) = &renewed {
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    }
    // Neither SVID is accepted.
    let e = pb::agent::agent_client::AgentClient::new(agent)
        .post_status(pb::agent::PostStatusRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    if let Ok(r) = renewed {
        let svid = r.into_inner().svid.unwrap();
        let ch = agent_channel(&s, &svid, &new_key).await;
        let e = pb::agent::agent_client::AgentClient::new(ch)
            .post_status(pb::agent::PostStatusRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(
            is_banned(&s, &id).await,
            "switching to the renewed SVID undid the ban"
        );
    }
    s.stop().await;
}

/// SPIRE's default: one attestation per second per caller IP (a token bucket with a burst of
/// one); callers wait their turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimit_10_attestations_from_one_ip_take_at_least_9s_by_default() {
    let s = TestServer::start(Opts::default()).await;
    let t = Instant::now();
    for _ in 0..10 {
        attest(&s, &TestKey::new(), None).await.unwrap();
    }
    let took = t.elapsed();
    eprintln!("10 attestations from one address, limits on: {took:?}");
    assert!(
        took >= Duration::from_secs(9),
        "10 attestations in {took:?}"
    );
    // A caller whose deadline is shorter than its wait is refused at once, not served late.
    let t = Instant::now();
    let e = attest(&s, &TestKey::new(), Some(Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(1));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimit_disabled_by_config_attests_without_waiting() {
    let s = TestServer::start(Opts {
        extra_server: "ratelimit {\n        attestation = false\n        signing = false\n    }",
        ..Default::default()
    })
    .await;
    let t = Instant::now();
    for _ in 0..10 {
        attest(&s, &TestKey::new(), None).await.unwrap();
    }
    let took = t.elapsed();
    eprintln!("10 attestations from one address, limits off: {took:?}");
    assert!(took < Duration::from_secs(5), "10 attestations in {took:?}");
    s.stop().await;
}

/// 500 signatures per second per IP, burst 500: three batches of 400 sent at once are served
/// over at least 1.4 s (the second waits for 300 tokens, the third for 700).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimit_signing_burst_is_smoothed() {
    let s = TestServer::start(Opts {
        extra_server: "ratelimit {\n        attestation = false\n    }",
        ..Default::default()
    })
    .await;
    let key = TestKey::new();
    let svid = attest(&s, &key, None).await.unwrap();
    let agent_id = svid.id.clone().unwrap();
    let entry = pb::entry::entry_client::EntryClient::new(s.admin().await)
        .batch_create_entry(pb::entry::BatchCreateEntryRequest {
            entries: vec![pb::types::Entry {
                spiffe_id: Some(spiffe_id(TD, "/burst")),
                parent_id: Some(agent_id),
                selectors: vec![pb::types::Selector {
                    r#type: "unix".into(),
                    value: "uid:1000".into(),
                }],
                ..Default::default()
            }],
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner()
        .results[0]
        .entry
        .clone()
        .unwrap()
        .id;
    let agent = agent_channel(&s, &svid, &key).await;
    let wl = TestKey::new();
    let csr = wl.csr(&[], &[]);
    let batch = |n: usize| pb::svid::BatchNewX509svidRequest {
        params: (0..n)
            .map(|_| pb::svid::NewX509svidParams {
                entry_id: entry.clone(),
                csr: csr.clone(),
            })
            .collect(),
    };
    let t = Instant::now();
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let mut c = pb::svid::svid_client::SvidClient::new(agent.clone());
            let req = batch(400);
            tokio::spawn(async move { c.batch_new_x509svid(req).await })
        })
        .collect();
    for c in calls {
        let r = c.await.unwrap().unwrap().into_inner();
        assert_eq!(r.results.len(), 400);
        assert!(r.results.iter().all(|x| x.svid.is_some()));
    }
    let took = t.elapsed();
    eprintln!("1,200 X509-SVIDs in three concurrent batches, limits on: {took:?}");
    assert!(
        took >= Duration::from_millis(1400),
        "1,200 signatures in {took:?}"
    );
    let metrics = s.running().ctx.limits.render();
    assert!(
        metrics.contains("kame_ratelimit_waited_total{limit=\"signing\"} 2"),
        "{metrics}"
    );
    // JWT-SVIDs have their own bucket: not drained by the X.509 burst.
    let t = Instant::now();
    pb::svid::svid_client::SvidClient::new(agent.clone())
        .new_jwtsvid(pb::svid::NewJwtsvidRequest {
            entry_id: entry.clone(),
            audience: vec!["a".into()],
        })
        .await
        .unwrap();
    assert!(t.elapsed() < Duration::from_millis(500));
    s.stop().await;
}
