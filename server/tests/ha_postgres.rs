//! High availability on PostgreSQL with real agents: two kame-server processes share one
//! database (a throwaway cluster); Kame agents (in this process) list both servers. An entry
//! made on one server reaches an agent attested through the other; entries written on both
//! in turn are seen by both (and, past 500, reach the agent through revision mode); after
//! `kill -9` of a server its agent keeps its SVIDs and gets
//! new entries through the other.

#[path = "../benches/loadgen/mod.rs"]
mod loadgen;

use kame_api::pb;
use loadgen::sid;
use std::path::Path;
use std::time::{Duration, Instant};

const TD: &str = loadgen::TD;

async fn create(server: &loadgen::ServerProc, parent: &str, path: &str, uid: u32) -> String {
    let e = pb::types::Entry {
        spiffe_id: Some(sid(path)),
        parent_id: Some(sid(parent)),
        selectors: vec![pb::types::Selector {
            r#type: "unix".into(),
            value: format!("uid:{uid}"),
        }],
        ..Default::default()
    };
    loadgen::create_entries(server.admin().await, vec![e])
        .await
        .remove(0)
}

async fn token(server: &loadgen::ServerProc) -> String {
    loadgen::join_token(server.admin().await).await
}

/// A Kame agent trying `servers` in order.
async fn agent(dir: &Path, servers: &[u16], token: &str) -> kame_agent::run::Running {
    std::fs::create_dir_all(dir).unwrap();
    let d = dir.display();
    let list = servers
        .iter()
        .map(|p| format!("\"127.0.0.1:{p}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let conf = format!(
        r#"agent {{
    data_dir = "{d}/data"
    server_addresses = [{list}]
    socket_path = "{d}/agent.sock"
    trust_bundle_path = "{d}/../bundle.pem"
    trust_domain = "{TD}"
    join_token = "{token}"
    log_level = "WARN"
    sync_interval = "1s"
}}
plugins {{
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    KeyManager "memory" {{}}
    WorkloadAttestor "unix" {{
        plugin_data {{}}
    }}
}}
"#
    );
    std::fs::write(dir.join("agent.conf"), conf).unwrap();
    let cfg = kame_agent::config::Config::load(&dir.join("agent.conf"), false).unwrap();
    kame_agent::run::start(&cfg).await.unwrap()
}

/// The entry ids `agent` holds an SVID for, for workloads of `uid`.
fn held(agent: &kame_agent::run::Running, uid: u32) -> Vec<String> {
    let mut v: Vec<String> = agent
        .manager
        .view(&[pb::types::Selector {
            r#type: "unix".into(),
            value: format!("uid:{uid}"),
        }])
        .identities
        .iter()
        .map(|i| i.entry.id.clone())
        .collect();
    v.sort();
    v
}

async fn wait_for(what: &str, within: Duration, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn list_ids(server: &loadgen::ServerProc) -> Vec<String> {
    let mut v: Vec<String> = pb::entry::entry_client::EntryClient::new(server.admin().await)
        .list_entries(pb::entry::ListEntriesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.id)
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_two_servers_on_postgres_share_entries_and_agents_fail_over_after_kill_9() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_kame-server"));
    let pg = kame_server::datastore::testing::PgCluster::start();
    let conn = pg.create_database("kame");
    let ds = format!("database_type = \"postgres\"\n            connection_string = \"{conn}\"");
    let dir = tempfile::tempdir().unwrap();
    let mut a = loadgen::start_server(&bin, &dir.path().join("a"), &ds).await;
    let b = loadgen::start_server(&bin, &dir.path().join("b"), &ds).await;
    // One bundle, holding both servers' CAs.
    let bundle = pb::bundle::bundle_client::BundleClient::new(a.admin().await)
        .get_bundle(pb::bundle::GetBundleRequest { output_mask: None })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        bundle.x509_authorities.len(),
        2,
        "each server's CA in the one bundle"
    );
    std::fs::write(
        dir.path().join("bundle.pem"),
        kame_api::bundle::x509_to_pem(&bundle),
    )
    .unwrap();

    // A join token made on A is spent through B, once: a second agent cannot reuse it on A.
    let t1 = token(&a).await;
    let ag1 = agent(&dir.path().join("ag1"), &[b.port, a.port], &t1).await;
    let id1 = format!("/spire/agent/join_token/{t1}");
    wait_for("agent 1 attested", Duration::from_secs(30), || {
        ag1.manager.agent_id().is_some()
    })
    .await;
    let reuse = agent(&dir.path().join("reuse"), &[a.port], &t1).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        reuse.manager.agent_id().is_none(),
        "a spent token attested again"
    );
    reuse.stop().await;

    // An entry made on A reaches the agent attested through B.
    let e1 = create(&a, &id1, "/w/one", 1001).await;
    wait_for(
        "entry made on A at the agent on B",
        Duration::from_secs(10),
        || held(&ag1, 1001) == vec![e1.clone()],
    )
    .await;

    // 200 entries written alternately on A and B: both servers list all of them.
    let mut made = vec![];
    for i in 0..200 {
        let s = if i % 2 == 0 { &a } else { &b };
        made.push(create(s, &id1, &format!("/w/many/{i}"), 1002).await);
    }
    made.push(e1.clone());
    made.sort();
    assert_eq!(list_ids(&a).await, made);
    assert_eq!(list_ids(&b).await, made);
    let mut many = made.clone();
    many.retain(|e| *e != e1);
    wait_for("200 entries at the agent", Duration::from_secs(20), || {
        held(&ag1, 1002) == many
    })
    .await;
    // Past a page (500): the agent syncs in revision mode (revisions in pages, then the
    // entries it asks for, in pages) and ends up with every one.
    let more: Vec<pb::types::Entry> = (200..620)
        .map(|i| pb::types::Entry {
            spiffe_id: Some(sid(&format!("/w/many/{i}"))),
            parent_id: Some(sid(&id1)),
            selectors: vec![pb::types::Selector {
                r#type: "unix".into(),
                value: "uid:1002".into(),
            }],
            ..Default::default()
        })
        .collect();
    many.extend(loadgen::create_entries(a.admin().await, more).await);
    many.sort();
    wait_for("620 entries at the agent", Duration::from_secs(60), || {
        held(&ag1, 1002) == many
    })
    .await;

    // An agent on A; A is killed; it keeps its SVIDs and gets new entries through B.
    let t2 = token(&b).await;
    let ag2 = agent(&dir.path().join("ag2"), &[a.port, b.port], &t2).await;
    let id2 = format!("/spire/agent/join_token/{t2}");
    let e2 = create(&a, &id2, "/w/two", 1003).await;
    wait_for("agent 2 has its entry", Duration::from_secs(30), || {
        held(&ag2, 1003) == vec![e2.clone()]
    })
    .await;
    a.kill();
    let e3 = create(&b, &id2, "/w/three", 1003).await;
    let mut want = vec![e2.clone(), e3.clone()];
    want.sort();
    wait_for(
        "agent 2 gets a new entry through B",
        Duration::from_secs(20),
        || held(&ag2, 1003) == want,
    )
    .await;
    assert_eq!(
        held(&ag1, 1001),
        vec![e1],
        "agent 1 kept its SVID throughout"
    );
    ag1.stop().await;
    ag2.stop().await;
    drop(b);
    drop(pg);
}
