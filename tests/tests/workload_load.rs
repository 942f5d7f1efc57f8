//! Issue 25's Workload API load scenario at a small size, as a correctness test (the
//! `workload_api` benchmark runs it at full size and prints the figures): every stream is
//! served its SVID, and an entry change reaches every open stream.
//!
//! The agent binary is the workspace's `target/<profile>/kame-agent`, built by `cargo test
//! --workspace` before any test runs.

// The benchmark's figures (percentiles) are not asserted here.
#[allow(dead_code)]
#[path = "common/workload_load.rs"]
mod workload_load;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_api_streams_all_served_and_all_updated_under_load() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let agent_bin = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("kame-agent"))
        .unwrap();
    assert!(
        agent_bin.exists(),
        "{} is missing: build it first (cargo build -p kame-agent)",
        agent_bin.display()
    );
    let p = workload_load::Params {
        agent_bin,
        entries: 10,
        streams: 300,
        connections: 6,
        samples: 20,
    };
    let r = workload_load::run(p.clone()).await;
    assert_eq!(r.streams_served, p.streams, "every stream served");
    assert_eq!(
        r.updated, p.streams,
        "the entry change reached every stream"
    );
    assert_eq!(r.x509_first.len(), p.samples);
    assert_eq!(r.jwt_first.len(), p.samples);
    assert!(r.idle_rss_kib > 0, "the agent's memory was read");
    assert!(
        r.peak_rss_kib >= r.open_rss_kib,
        "the peak is at least what was open"
    );
}
