//! Workload API benchmark (not in CI; a small configuration of the same scenario runs there
//! as a correctness test, `tests/tests/workload_load.rs`). Starts a kame-server in-process
//! and the optimised `kame-agent` binary as its own process, registers 100 entries under the
//! agent (one for this process's uid), waits until the agent caches all 100 SVIDs, and
//! prints:
//! - the agent's resident memory idle with 100 SVIDs cached (goal ≤ 10 MiB);
//! - FetchX509SVID and FetchJWTSVID first-response latency, each call on a new connection,
//!   against the same round trip refused before attestation (goal p99 < 2 ms);
//! - 10,000 FetchX509SVID streams over 100 connections opened at once: all served, the time
//!   to serve them, peak and open resident memory, memory per stream (goal peak ≤ 64 MiB);
//! - an entry change reaching every stream (goal: all within 1 s of the first);
//! - resident memory 5 s after the streams close (goal ≤ 20 MiB).
//!
//! Run: `cargo build --profile edge --bin kame-agent && cargo bench -p kame-tests --bench workload_api`
//! (`KAME_AGENT_BIN=target/release/kame-agent` measures the release build instead;
//! `KAME_STREAMS` and `KAME_CONNECTIONS` change the stream count and connections).

use std::path::PathBuf;
use std::time::Duration;

#[path = "../tests/common/workload_load.rs"]
mod workload_load;
use workload_load::{Params, pct};

fn report(name: &str, v: &[Duration]) {
    println!(
        "{name}: n={} p50={:.3} ms p99={:.3} ms max={:.3} ms",
        v.len(),
        pct(v, 0.50).as_secs_f64() * 1e3,
        pct(v, 0.99).as_secs_f64() * 1e3,
        v.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
}

fn env_usize(k: &str, default: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // The node build (`[profile.edge]`), or another binary named by KAME_AGENT_BIN.
    let agent_bin = std::env::var_os("KAME_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/edge/kame-agent")
        });
    assert!(
        agent_bin.exists(),
        "build it first: cargo build --profile edge --bin kame-agent"
    );
    let size = std::fs::metadata(&agent_bin).map(|m| m.len()).unwrap_or(0);
    println!(
        "agent binary: {} ({:.1} MiB)",
        agent_bin.display(),
        size as f64 / (1024.0 * 1024.0)
    );
    let p = Params {
        agent_bin,
        entries: 100,
        streams: env_usize("KAME_STREAMS", 10_000),
        connections: env_usize("KAME_CONNECTIONS", 100),
        samples: 1000,
    };
    let r = workload_load::run(p.clone()).await;
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "agent RSS idle with {} SVIDs cached: {:.1} MiB (goal <= 10 MiB): anonymous {:.1} MiB, file (code) {:.1} MiB",
        p.entries,
        mib(r.idle_rss_kib),
        mib(r.idle_anon_kib),
        mib(r.idle_file_kib)
    );
    for (f, k) in r.idle_mappings.iter().take(6) {
        println!("  resident from {f}: {:.1} MiB", mib(*k));
    }
    report(
        "FetchX509SVID first response, new connection",
        &r.x509_first,
    );
    report("FetchJWTSVID first response, new connection", &r.jwt_first);
    report(
        "baseline: new connection, call refused for the missing header",
        &r.baseline,
    );
    println!(
        "FetchX509SVID p50 / baseline p50 = {:.2}",
        pct(&r.x509_first, 0.5).as_secs_f64() / pct(&r.baseline, 0.5).as_secs_f64()
    );
    println!(
        "{} streams over {} connections: {} served in {:.2} s; RSS open {:.1} MiB, peak {:.1} MiB (goal <= 64), {:.1} KiB per stream over idle; {} threads",
        p.streams,
        p.connections,
        r.streams_served,
        r.time_to_serve.as_secs_f64(),
        mib(r.open_rss_kib),
        mib(r.peak_rss_kib),
        (r.open_rss_kib.saturating_sub(r.idle_rss_kib)) as f64 / p.streams.max(1) as f64,
        r.threads
    );
    println!(
        "entry change: {} of {} streams updated; fan-out {:.3} s (goal <= 1 s), change to last update {:.3} s (includes the 500 ms sync interval)",
        r.updated,
        r.streams_served,
        r.fan_out.as_secs_f64(),
        r.change_to_all.as_secs_f64()
    );
    println!(
        "agent RSS 5 s after the streams closed: {:.1} MiB (goal <= 20 MiB)",
        mib(r.settled_rss_kib)
    );
}
