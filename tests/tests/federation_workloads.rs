//! Federation end to end, seen by workloads: two trust domains on one machine, `example.org`
//! and `other.org`, each a server with an https_spiffe bundle endpoint and an agent, each
//! server federating with the other after a one-time bundle set. A workload of each side
//! (py-spiffe) whose entry federates with the other receives the other's X.509 bundle, and a
//! workload in `example.org` validates a JWT-SVID minted in `other.org` through its agent.

mod common;

use common::*;
use kame_api::pb;
use std::time::{Duration, Instant};

const OTHER: &str = "other.org";

fn federation(port: u16, peer: &str, peer_port: u16) -> &'static str {
    Box::leak(
        format!(
            r#"federation {{
        bundle_endpoint {{
            address = "127.0.0.1"
            port = {port}
            refresh_hint = "1m"
            profile "https_spiffe" {{}}
        }}
        federates_with "{peer}" {{
            bundle_endpoint_url = "https://127.0.0.1:{peer_port}/"
            bundle_endpoint_profile "https_spiffe" {{
                endpoint_spiffe_id = "spiffe://{peer}/spire/server"
            }}
        }}
    }}"#
        )
        .into_boxed_str(),
    )
}

async fn set_federated(env: &Env, mut b: pb::types::Bundle, td: &str) {
    b.trust_domain = td.into();
    let r = pb::bundle::bundle_client::BundleClient::new(env.admin().await)
        .batch_set_federated_bundle(pb::bundle::BatchSetFederatedBundleRequest {
            bundle: vec![b],
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results[0].status.as_ref().unwrap().code, 0, "{r:?}");
}

/// The trust domains whose X.509 bundles the Workload API gives this process.
async fn bundle_tds(env: &Env) -> Vec<String> {
    let Ok(r) = env
        .workload_client()
        .await
        .fetch_x509_bundles(kame_agent::cli::with_header(
            pb::workload::X509BundlesRequest {},
        ))
        .await
    else {
        return vec![];
    };
    let mut s = r.into_inner();
    match tokio::time::timeout(Duration::from_secs(2), s.message()).await {
        Ok(Ok(Some(m))) => {
            let mut tds: Vec<String> = m
                .bundles
                .keys()
                .map(|k| k.trim_start_matches("spiffe://").to_string())
                .collect();
            tds.sort();
            tds
        }
        _ => vec![],
    }
}

async fn py(script: &str, args: &[String]) -> String {
    let python = kame_keymanager::testing::venv_tool("python");
    let out = tokio::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "py-spiffe failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_workloads_of_each_side_get_the_others_bundle_and_validate_its_jwt() {
    let (pa, pb_) = (free_port(), free_port());
    let a = Env::start(Opts {
        extra_server: federation(pa, OTHER, pb_),
        ..Default::default()
    })
    .await;
    let b = Env::start(Opts {
        trust_domain: OTHER,
        extra_server: federation(pb_, TD, pa),
        ..Default::default()
    })
    .await;
    set_federated(&a, b.bundle().await, OTHER).await;
    set_federated(&b, a.bundle().await, TD).await;
    let uid = format!("unix:uid:{}", my_uid());
    a.register("/front", &[&uid], |e| e.federates_with = vec![OTHER.into()])
        .await;
    b.register("/payments", &[&uid], |e| e.federates_with = vec![TD.into()])
        .await;
    a.wait_for_svids(&["/front"]).await;
    b.wait_for_svids(&["/payments"]).await;
    let both = vec![TD.to_string(), OTHER.to_string()];
    let t = Instant::now();
    while bundle_tds(&a).await != both || bundle_tds(&b).await != both {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the federated bundles did not reach both workloads: {:?} {:?}",
            bundle_tds(&a).await,
            bundle_tds(&b).await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // py-spiffe on each side: the other trust domain's X.509 authorities are there.
    let script = r#"
import sys
from spiffe import WorkloadApiClient, TrustDomain
c = WorkloadApiClient(socket_path=sys.argv[1])
b = c.fetch_x509_bundles().get_bundle_for_trust_domain(TrustDomain(sys.argv[2]))
print("authorities", len(b.x509_authorities))
c.close()
"#;
    let out = py(script, &[a.socket_url(), OTHER.into()]).await;
    assert_eq!(out.trim(), "authorities 1", "{out}");
    let out = py(script, &[b.socket_url(), TD.into()]).await;
    assert_eq!(out.trim(), "authorities 1", "{out}");

    // A JWT-SVID of other.org's workload, validated by example.org's workload.
    let fetch = r#"
import sys
from spiffe import WorkloadApiClient
c = WorkloadApiClient(socket_path=sys.argv[1])
print(c.fetch_jwt_svid(audience={"front"}).token)
c.close()
"#;
    let token = py(fetch, &[b.socket_url()]).await.trim().to_string();
    let validate = r#"
import sys
from spiffe import WorkloadApiClient
c = WorkloadApiClient(socket_path=sys.argv[1])
print("validated", c.validate_jwt_svid(sys.argv[2], "front").spiffe_id)
c.close()
"#;
    let out = py(validate, &[a.socket_url(), token]).await;
    assert_eq!(
        out.trim(),
        format!("validated spiffe://{OTHER}/payments"),
        "{out}"
    );
    b.stop().await;
    a.stop().await;
}
