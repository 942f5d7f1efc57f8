//! The sync load generator in a small configuration, as a correctness test (speed is for
//! `cargo bench --bench sync_load`): every simulated agent is given exactly its entries by
//! whichever server it syncs with, entries made on each server reach their agents, and no
//! sync fails.

#[path = "../benches/loadgen/mod.rs"]
mod loadgen;

use std::time::Duration;

fn bin() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_kame-server"))
}

fn assert_correct(r: &loadgen::Report, cfg: &loadgen::LoadConfig) {
    r.print(cfg);
    assert!(r.syncs > 0);
    assert_eq!(r.errors - r.errors_after_kill, 0, "failed syncs");
    assert_eq!(r.wrong, 0, "answers with a foreign or missing entry");
    assert_eq!(
        r.final_wrong, 0,
        "agents without exactly their entries at the end"
    );
    assert_eq!(
        r.probes_seen, r.probes_made,
        "entries that never reached their agent"
    );
}

/// Two servers on one PostgreSQL: agents attested through either, entries made on both in
/// turn reach their agents whichever server those sync with. PostgreSQL is then stopped
/// for 5 s: no sync fails (agents are served from the servers' caches), a write is refused
/// as Unavailable, and one made once it is back reaches its agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_load_two_servers_on_postgres_every_agent_gets_exactly_its_entries_through_an_outage()
{
    let cfg = loadgen::LoadConfig {
        agents: 24,
        entries: 600,
        interval: Duration::from_secs(1),
        duration: Duration::from_secs(16),
        servers: 2,
        db: loadgen::Db::Postgres,
        probes: 6,
        attest_concurrency: 8,
        pg_outage: Some(Duration::from_secs(5)),
        kill_one: false,
        transparency: false,
    };
    let r = loadgen::run(&bin(), &cfg).await;
    assert_correct(&r, &cfg);
    assert_eq!(r.outage_write, Some(tonic::Code::Unavailable));
    assert_eq!(r.probes_made, cfg.probes + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_load_one_server_on_sqlite_every_agent_gets_exactly_its_entries() {
    let cfg = loadgen::LoadConfig {
        agents: 16,
        entries: 200,
        interval: Duration::from_secs(1),
        duration: Duration::from_secs(4),
        servers: 1,
        db: loadgen::Db::Sqlite,
        probes: 4,
        attest_concurrency: 8,
        pg_outage: None,
        kill_one: false,
        transparency: false,
    };
    assert_correct(&loadgen::run(&bin(), &cfg).await, &cfg);
}

/// `kill -9` of one of two servers under load: every agent of the killed server moves to the
/// other (losing at most the sync in flight), keeps syncing, and gets entries made after the
/// kill; at the end every agent has exactly its entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_load_kill_9_of_one_server_agents_move_and_nothing_is_lost() {
    let cfg = loadgen::LoadConfig {
        agents: 16,
        entries: 100,
        interval: Duration::from_secs(1),
        duration: Duration::from_secs(8),
        servers: 2,
        db: loadgen::Db::Postgres,
        probes: 2,
        attest_concurrency: 8,
        pg_outage: None,
        kill_one: true,
        transparency: false,
    };
    let r = loadgen::run(&bin(), &cfg).await;
    assert_correct(&r, &cfg);
    assert!(
        r.errors_after_kill <= cfg.agents as u64,
        "at most one failed sync per agent of the killed server: {}",
        r.errors_after_kill
    );
    assert_eq!(r.probes_made, cfg.probes + 2);
}

/// Two kame-server processes on one PostgreSQL, both with the transparency log, attesting
/// agents at once: one log with no gaps or duplicates, whose tree heads signed by either
/// server verify against the same entries; every attestation and agent SVID is in it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparency_two_server_processes_on_postgres_append_one_log() {
    let cfg = loadgen::LoadConfig {
        agents: 24,
        entries: 48,
        interval: Duration::from_secs(1),
        duration: Duration::from_secs(2),
        servers: 2,
        db: loadgen::Db::Postgres,
        probes: 2,
        attest_concurrency: 8,
        pg_outage: None,
        kill_one: false,
        transparency: true,
    };
    let r = loadgen::run(&bin(), &cfg).await;
    assert_correct(&r, &cfg);
    let log = r.log.as_ref().unwrap();
    assert_eq!(log.sizes.len(), 2);
    assert!(log.cross_checked);
    assert_eq!(log.attestations, cfg.agents, "{log:?}");
    assert_eq!(log.agent_svids, cfg.agents, "{log:?}");
    // Each server prepared and activated an X.509 and a JWT authority at start.
    assert!(log.authority_changes >= 8, "{log:?}");
}
