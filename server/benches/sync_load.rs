//! The sync load generator (not in CI; `tests/sync_load.rs` runs a small configuration there).
//! See `loadgen/mod.rs` for what it does and reports.
//!
//! Run (release build; the flags are optional, defaults in brackets):
//!
//! ```text
//! cargo bench -p kame-server --bench sync_load -- [--agents 5000] [--entries 10000]
//!     [--interval 5] [--duration 60] [--servers 1] [--db sqlite|postgres] [--probes 50]
//!     [--pg-outage SECONDS] [--kill-one] [--baseline-entries 10000] [--transparency]
//! cargo bench -p kame-server --bench sync_load -- --transparency-ratio [--agents 2000]
//!     [--servers 2 --db postgres] [--duration 2]   # attestations/s with the log off, then on
//! cargo bench -p kame-server --bench sync_load -- --startup [--entries 100000] [--agents 10000] [--db sqlite]
//! ```

#[path = "loadgen/mod.rs"]
mod loadgen;

use std::time::Duration;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn num(args: &[String], name: &str, default: usize) -> usize {
    arg(args, name)
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_kame-server"));
    let db = match arg(&args, "--db").as_deref() {
        None | Some("sqlite") => loadgen::Db::Sqlite,
        Some("postgres") => loadgen::Db::Postgres,
        Some(other) => panic!("--db {other}: expected sqlite or postgres"),
    };
    if args.iter().any(|a| a == "--startup") {
        let entries = num(&args, "--entries", 100_000);
        let agents = num(&args, "--agents", 10_000);
        let (seeded, started) = loadgen::startup(&bin, db, entries, agents).await;
        println!(
            "startup: {entries} entries and {agents} agents on {db:?} (seeded in {:.1} s): server answering after {:.2} s",
            seeded.as_secs_f64(),
            started.as_secs_f64()
        );
        return;
    }
    let cfg = loadgen::LoadConfig {
        agents: num(&args, "--agents", 5000),
        entries: num(&args, "--entries", 10_000),
        interval: Duration::from_secs(num(&args, "--interval", 5) as u64),
        duration: Duration::from_secs(num(&args, "--duration", 60) as u64),
        servers: num(&args, "--servers", 1),
        db,
        probes: num(&args, "--probes", 50),
        attest_concurrency: num(&args, "--attest-concurrency", 32),
        pg_outage: arg(&args, "--pg-outage")
            .map(|v| Duration::from_secs(v.parse().expect("seconds"))),
        kill_one: args.iter().any(|a| a == "--kill-one"),
        transparency: args.iter().any(|a| a == "--transparency"),
    };
    // Attestation (issuance as agents use it) with the transparency log off, then on, in one
    // run: the ratio of the rates.
    if args.iter().any(|a| a == "--transparency-ratio") {
        let off = loadgen::LoadConfig {
            transparency: false,
            ..cfg.clone()
        };
        let r_off = loadgen::run(&bin, &off).await;
        r_off.print(&off);
        let on = loadgen::LoadConfig {
            transparency: true,
            ..cfg.clone()
        };
        let r_on = loadgen::run(&bin, &on).await;
        r_on.print(&on);
        println!(
            "attestations with the transparency log on / off: {:.0}/s / {:.0}/s = {:.3}",
            r_on.attest_rate,
            r_off.attest_rate,
            r_on.attest_rate / r_off.attest_rate.max(1e-9)
        );
        return;
    }
    // A baseline in the same run: the same load over another number of entries. Sync cost independent of
    // the trust domain's size shows as a ratio near 1.
    let baseline = match arg(&args, "--baseline-entries") {
        Some(n) => {
            let b = loadgen::LoadConfig {
                entries: n.parse().expect("a number"),
                ..cfg.clone()
            };
            let r = loadgen::run(&bin, &b).await;
            r.print(&b);
            Some((b.entries, r))
        }
        None => None,
    };
    let report = loadgen::run(&bin, &cfg).await;
    report.print(&cfg);
    if let Some((n, b)) = baseline {
        println!(
            "ratio to the baseline over {n} entries: CPU per sync {:.2}, p99 latency {:.2}",
            report.cpu_ms_per_sync() / b.cpu_ms_per_sync(),
            report.p99.as_secs_f64() / b.p99.as_secs_f64().max(1e-9)
        );
    }
}
