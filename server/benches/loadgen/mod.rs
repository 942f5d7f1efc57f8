//! The sync load generator: N simulated agents, each attested through a join token and
//! holding its own mTLS SVID, sync as a Kame agent does (GetBundle, then
//! SyncAuthorizedEntries) every S seconds against E entries, on one or several kame-server
//! processes sharing SQLite or a PostgreSQL cluster of their own. Each agent is authorized for
//! two entries (the rest are parented to agents that do not exist). While they sync, new
//! entries are made on the servers in turn and the time until their agent sees them is
//! measured. It reports sync latency, the servers' CPU per sync and resident memory (from
//! `/proc`), database connections, and propagation; and it checks every answer: an agent
//! that is sent an entry it was not given, or misses one it was, counts as wrong.
//!
//! Shared by `benches/sync_load.rs` (the figures) and `tests/sync_load.rs` (a small run in CI
//! that checks correctness, not speed).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use kame_api::pb;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

pub const TD: &str = "example.org";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub agents: usize,
    pub entries: usize,
    pub interval: Duration,
    /// How long syncs are measured.
    pub duration: Duration,
    pub servers: usize,
    pub db: Db,
    /// New entries made while agents sync (propagation probes).
    pub probes: usize,
    /// Attestations in flight at once.
    pub attest_concurrency: usize,
    /// PostgreSQL stopped this long in the middle of the window: syncs must go on, a write
    /// must be refused as Unavailable, and one made after it comes back must propagate.
    pub pg_outage: Option<Duration>,
    /// `kill -9` of the first server in the middle of the window: its agents must move to
    /// another server (each lists every server, as `server_addresses`), and entries made
    /// afterwards must reach them.
    pub kill_one: bool,
    /// Every server runs the issuance transparency log (its read API on a port of its own):
    /// after the attestations the log is checked through each server ([`LogCheck`]).
    pub transparency: bool,
}

/// The transparency log as checked through every server once the agents are attested: each
/// server's latest signed tree head verifies with its key and is the root of the entries
/// re-hashed (a `log monitor` pass from the empty tree), so all of them sign prefixes of one
/// log (and each pair is checked with a consistency proof); what the pass through the last
/// server found under `spiffe://example.org/spire/agent`.
#[derive(Debug, Default)]
pub struct LogCheck {
    /// The tree size each server's latest tree head covers.
    pub sizes: Vec<u64>,
    pub attestations: usize,
    pub agent_svids: usize,
    pub authority_changes: usize,
    /// The servers' tree heads were checked against each other (consistency proofs).
    pub cross_checked: bool,
}

#[derive(Debug, Default)]
pub struct Report {
    pub syncs: u64,
    pub errors: u64,
    pub wrong: u64,
    pub final_wrong: u64,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub server_cpu: Duration,
    pub server_rss_kib: Vec<u64>,
    pub db_connections: Option<u64>,
    pub propagation_p50: Duration,
    pub propagation_p99: Duration,
    pub propagation_max: Duration,
    pub probes_seen: usize,
    /// Probes made (one more after an outage).
    pub probes_made: usize,
    /// Failed syncs after the kill (each agent of the killed server may lose one).
    pub errors_after_kill: u64,
    /// The gRPC code of the write tried during the outage.
    pub outage_write: Option<tonic::Code>,
    pub setup: Duration,
    /// The measured window (syncs counted and CPU read over it).
    pub window: Duration,
    /// Attestations per second (join token, SVID, mTLS channel), over the attestation phase.
    pub attest_rate: f64,
    /// With `transparency`: the log as checked.
    pub log: Option<LogCheck>,
}

impl Report {
    pub fn cpu_ms_per_sync(&self) -> f64 {
        self.server_cpu.as_secs_f64() * 1000.0 / self.syncs.max(1) as f64
    }

    pub fn print(&self, cfg: &LoadConfig) {
        println!(
            "sync_load: {} agents every {:?} over {} entries, {} server(s) on {:?}, measured {:?} (setup {:.1}s)",
            cfg.agents,
            cfg.interval,
            cfg.entries,
            cfg.servers,
            cfg.db,
            cfg.duration,
            self.setup.as_secs_f64()
        );
        println!(
            "  attestations {:.0}/s{}",
            self.attest_rate,
            if cfg.transparency {
                " (transparency log on)"
            } else {
                ""
            }
        );
        if let Some(l) = &self.log {
            println!(
                "  transparency log: tree sizes {:?} each verified against the entries; {} attestations, {} agent SVIDs, {} authority changes",
                l.sizes, l.attestations, l.agent_svids, l.authority_changes
            );
        }
        println!(
            "  syncs {} ({:.0}/s), errors {} ({} after the kill), wrong answers {}, wrong at the end {}",
            self.syncs,
            self.syncs as f64 / self.window.as_secs_f64().max(0.001),
            self.errors,
            self.errors_after_kill,
            self.wrong,
            self.final_wrong
        );
        println!(
            "  sync latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            ms(self.p50),
            ms(self.p99),
            ms(self.max)
        );
        println!(
            "  server CPU {:.2} s = {:.3} ms per sync ({:.1} s per 1,000 syncs); RSS {:?} KiB; database connections {:?}",
            self.server_cpu.as_secs_f64(),
            self.cpu_ms_per_sync(),
            self.cpu_ms_per_sync(),
            self.server_rss_kib,
            self.db_connections
        );
        println!(
            "  propagation ({} of {} probes seen): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            self.probes_seen,
            self.probes_made,
            ms(self.propagation_p50),
            ms(self.propagation_p99),
            ms(self.propagation_max)
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A kame-server process, killed (SIGKILL) when dropped.
pub struct ServerProc {
    pub child: Option<std::process::Child>,
    pub port: u16,
    pub socket: PathBuf,
    pub pid: u32,
    /// The transparency log's read API port, when the log is on.
    pub log_port: Option<u16>,
    /// The server's data_dir.
    pub data_dir: PathBuf,
}

impl ServerProc {
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// user+system CPU time so far, from /proc/<pid>/stat.
    pub fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
        Duration::from_secs_f64(ticks as f64 / 100.0)
    }

    /// Resident memory in KiB, from /proc/<pid>/status.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    pub async fn admin(&self) -> Channel {
        kame_server::cli::connect(&self.socket).await.unwrap()
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes a server configuration under `dir` and starts `bin` with it; returns once its admin
/// socket answers.
pub async fn start_server(bin: &Path, dir: &Path, datastore: &str) -> ServerProc {
    start_server_with(bin, dir, datastore, false).await
}

/// [`start_server`], with the transparency log on when `transparency`.
pub async fn start_server_with(
    bin: &Path,
    dir: &Path,
    datastore: &str,
    transparency: bool,
) -> ServerProc {
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let port = kame_keymanager::testing::free_port();
    let log_port = transparency.then(kame_keymanager::testing::free_port);
    let log_block = match log_port {
        None => String::new(),
        Some(p) => format!(
            "transparency {{\n        bind_address = \"127.0.0.1\"\n        bind_port = {p}\n        tree_head_interval = \"200ms\"\n    }}"
        ),
    };
    let d = dir.display();
    let conf = format!(
        r#"server {{
    bind_address = "127.0.0.1"
    bind_port = "{port}"
    socket_path = "{d}/api.sock"
    trust_domain = "{TD}"
    data_dir = "{d}/data"
    log_level = "WARN"
    default_x509_svid_ttl = "1h"
    ratelimit {{
        attestation = false
        signing = false
    }}
    {log_block}
}}
plugins {{
    DataStore "sql" {{
        plugin_data {{
            {datastore}
        }}
    }}
    KeyManager "disk" {{
        plugin_data {{
            keys_path = "{d}/data/keys.json"
        }}
    }}
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
}}
"#
    );
    std::fs::write(dir.join("server.conf"), conf).unwrap();
    let child = std::process::Command::new(bin)
        .arg("run")
        .arg("--config")
        .arg(dir.join("server.conf"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("server.log")).unwrap())
        .spawn()
        .expect("kame-server starts");
    let pid = child.id();
    let mut s = ServerProc {
        child: Some(child),
        port,
        socket: dir.join("api.sock"),
        pid,
        log_port,
        data_dir: dir.join("data"),
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Ok(ch) = kame_server::cli::connect(&s.socket).await
            && pb::bundle::bundle_client::BundleClient::new(ch)
                .get_bundle(pb::bundle::GetBundleRequest { output_mask: None })
                .await
                .is_ok()
        {
            return s;
        }
        if let Some(Ok(Some(status))) = s.child.as_mut().map(|c| c.try_wait()) {
            panic!(
                "kame-server exited: {status}: {}",
                std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "kame-server did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn sid(path: &str) -> pb::types::Spiffeid {
    pb::types::Spiffeid {
        trust_domain: TD.into(),
        path: path.into(),
    }
}

/// A new join token (valid for an hour) made through `admin`.
pub async fn join_token(admin: Channel) -> String {
    pb::agent::agent_client::AgentClient::new(admin)
        .create_join_token(pb::agent::CreateJoinTokenRequest {
            ttl: 3600,
            token: String::new(),
            agent_id: None,
        })
        .await
        .unwrap()
        .into_inner()
        .value
}

fn entry(parent: &str, path: &str) -> pb::types::Entry {
    pb::types::Entry {
        spiffe_id: Some(sid(path)),
        parent_id: Some(sid(parent)),
        selectors: vec![pb::types::Selector {
            r#type: "unix".into(),
            value: "uid:1000".into(),
        }],
        ..Default::default()
    }
}

/// Creates `entries` through `admin` in batches; returns their ids in order.
pub async fn create_entries(admin: Channel, entries: Vec<pb::types::Entry>) -> Vec<String> {
    let mut ids = vec![];
    let mut c = pb::entry::entry_client::EntryClient::new(admin)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    for chunk in entries.chunks(200) {
        let r = c
            .batch_create_entry(pb::entry::BatchCreateEntryRequest {
                entries: chunk.to_vec(),
                output_mask: None,
            })
            .await
            .unwrap()
            .into_inner();
        for res in r.results {
            let st = res.status.unwrap_or_default();
            assert_eq!(st.code, 0, "entry creation failed: {}", st.message);
            ids.push(res.entry.unwrap().id);
        }
    }
    ids
}

struct Agent {
    path: String,
    channel: Channel,
}

/// What every agent must be given, and the probes on their way.
#[derive(Default)]
struct Expect {
    base: Vec<HashSet<String>>,
    /// Probe entries per agent: id -> when it was created (None once seen).
    probes: Vec<Mutex<HashMap<String, Option<Instant>>>>,
    seen: Mutex<Vec<Duration>>,
}

async fn attest(
    port: u16,
    roots: kame_agent::client::SharedRoots,
    token: String,
) -> (Vec<Vec<u8>>, Vec<u8>) {
    let server_id = kame_api::SpiffeId::parse(&format!("spiffe://{TD}/spire/server")).unwrap();
    let key = kame_agent::keys::generate().unwrap();
    for attempt in 0.. {
        let r = async {
            let ch =
                kame_agent::client::connect("127.0.0.1", port, &server_id, roots.clone(), None)
                    .await
                    .map_err(|e| e.to_string())?;
            kame_agent::attestation::NodeAttestor::JoinToken(Some(token.clone().into()))
                .attest(ch, kame_agent::keys::csr(&key).unwrap())
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        match r {
            Ok(res) => return (res.chain, key.to_vec()),
            Err(e) if attempt < 5 => {
                eprintln!("attestation failed ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("attestation failed: {e}"),
        }
    }
    unreachable!()
}

/// One sync as a Kame agent does it (the bundle and the entries asked for together); the entry
/// ids it was given.
async fn sync(ch: Channel) -> Result<Vec<String>, tonic::Status> {
    let bundle = async {
        pb::bundle::bundle_client::BundleClient::new(ch.clone())
            .get_bundle(pb::bundle::GetBundleRequest { output_mask: None })
            .await
    };
    let entries = async {
        let req = pb::entry::SyncAuthorizedEntriesRequest {
            output_mask: None,
            ids: vec![],
        };
        let mut s = pb::entry::entry_client::EntryClient::new(ch.clone())
            .sync_authorized_entries(tokio_stream::once(req))
            .await?
            .into_inner();
        let mut ids = vec![];
        // Read to the end (the trailers carry the status), unless revisions were sent: then the
        // server waits for asks, which this generator does not send.
        while let Some(m) = s.message().await? {
            let revisions = !m.entry_revisions.is_empty();
            ids.extend(m.entries.into_iter().map(|e| e.id));
            ids.extend(m.entry_revisions.into_iter().map(|r| r.id));
            if revisions && !m.more {
                break;
            }
        }
        Ok(ids)
    };
    let (_, ids) = tokio::try_join!(bundle, entries)?;
    Ok(ids)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs the load described by `cfg` against servers started from `bin`.
pub async fn run(bin: &Path, cfg: &LoadConfig) -> Report {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let t_setup = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let pg = (cfg.db == Db::Postgres).then(kame_server::datastore::testing::PgCluster::start);
    let datastore = match &pg {
        Some(pg) => format!(
            "database_type = \"postgres\"\n            connection_string = \"{}\"",
            pg.create_database("kame")
        ),
        None => format!(
            "database_type = \"sqlite3\"\n            connection_string = \"{}/datastore.sqlite3\"",
            dir.path().display()
        ),
    };
    let mut servers = vec![];
    for i in 0..cfg.servers.max(1) {
        let d = dir.path().join(format!("server{i}"));
        servers.push(start_server_with(bin, &d, &datastore, cfg.transparency).await);
    }
    let mut admins: Vec<Channel> = vec![];
    for s in &servers {
        admins.push(s.admin().await);
    }
    // Tokens and entries.
    let mut tokens = vec![];
    for _ in 0..cfg.agents {
        tokens.push(join_token(admins[0].clone()).await);
    }
    let paths: Vec<String> = tokens
        .iter()
        .map(|t| format!("/spire/agent/join_token/{t}"))
        .collect();
    let mut wanted = vec![];
    for i in 0..cfg.entries {
        let parent = if i / 2 < cfg.agents {
            paths[i / 2].clone()
        } else {
            format!("/spire/agent/nobody/{}", i / 2)
        };
        wanted.push(entry(&parent, &format!("/workload/{i}")));
    }
    let ids = create_entries(admins[0].clone(), wanted).await;
    let t_entries = Instant::now();
    let mut expect = Expect::default();
    for a in 0..cfg.agents {
        expect.base.push(
            [2 * a, 2 * a + 1]
                .iter()
                .filter_map(|i| ids.get(*i).cloned())
                .collect(),
        );
        expect.probes.push(Mutex::new(HashMap::new()));
    }
    let expect = Arc::new(expect);
    // Attest every agent (spread over the servers) and open its mTLS channel.
    let bundle = pb::bundle::bundle_client::BundleClient::new(admins[0].clone())
        .get_bundle(pb::bundle::GetBundleRequest { output_mask: None })
        .await
        .unwrap()
        .into_inner();
    let roots: kame_agent::client::SharedRoots = Arc::new(std::sync::RwLock::new(
        bundle
            .x509_authorities
            .iter()
            .map(|c| c.asn1.clone())
            .collect(),
    ));
    let ports: Vec<u16> = servers.iter().map(|s| s.port).collect();
    let all_ports = ports.clone();
    let sem = Arc::new(tokio::sync::Semaphore::new(cfg.attest_concurrency.max(1)));
    let t_attest = Instant::now();
    let mut joins = vec![];
    for (i, token) in tokens.into_iter().enumerate() {
        let sem = sem.clone();
        let roots = roots.clone();
        let port = ports[i % ports.len()];
        let path = paths[i].clone();
        // Its own server first, then the others (as an agent's server_addresses).
        let mut targets = vec![("127.0.0.1".to_string(), port)];
        targets.extend(
            all_ports
                .iter()
                .filter(|p| **p != port)
                .map(|p| ("127.0.0.1".to_string(), *p)),
        );
        joins.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            let (chain, key) = attest(port, roots.clone(), token).await;
            let server_id =
                kame_api::SpiffeId::parse(&format!("spiffe://{TD}/spire/server")).unwrap();
            let channel =
                kame_agent::client::connect_any(&targets, &server_id, roots, Some((chain, key)))
                    .await
                    .unwrap();
            Agent { path, channel }
        }));
    }
    let mut agents = vec![];
    for j in joins {
        agents.push(j.await.unwrap());
    }
    let attest_rate = cfg.agents as f64 / t_attest.elapsed().as_secs_f64().max(1e-9);
    let log = match cfg.transparency {
        true => Some(check_log(&servers, dir.path(), cfg.agents).await),
        false => None,
    };
    // Other servers take in the entries within a poll of their caches: the answers are
    // checked against settled state (probes measure propagation).
    let settle = kame_server::entrycache::POLL_INTERVAL * 2;
    tokio::time::sleep(settle.saturating_sub(t_entries.elapsed())).await;
    let setup = t_setup.elapsed();
    // Sync.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let lat = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let wrong = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let cpu0: Duration = servers.iter().map(|s| s.cpu()).sum();
    let t0 = Instant::now();
    let mut tasks = vec![];
    for (i, a) in agents.iter().enumerate() {
        let ch = a.channel.clone();
        let stop = stop.clone();
        let lat = lat.clone();
        let errors = errors.clone();
        let wrong = wrong.clone();
        let expect = expect.clone();
        let interval = cfg.interval;
        let offset = interval.mul_f64(i as f64 / cfg.agents.max(1) as f64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                let t = Instant::now();
                match sync(ch.clone()).await {
                    Ok(got) => {
                        lat.lock().unwrap().push(t.elapsed());
                        if !check(&expect, i, &got, false)
                            && wrong.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 3
                        {
                            eprintln!(
                                "agent {i}: given {got:?}, expected {:?} and probes {:?}",
                                expect.base[i],
                                expect.probes[i].lock().unwrap().keys().collect::<Vec<_>>()
                            );
                        }
                    }
                    Err(e) => {
                        if errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 5 {
                            eprintln!("sync failed: {e}");
                        }
                    }
                }
            }
        }));
    }
    // Probes: new entries on the servers in turn, spread over the first 40 % of the window.
    let mut probes_made = 0;
    let probe = |p: usize| {
        let a = (p * 7919) % cfg.agents;
        let mut e = entry(&agents[a].path, &format!("/probe/{p}"));
        // The id is chosen here and expected before the entry exists: an agent may be given
        // it before the creation call returns.
        e.id = format!("probe-{p}-{}", std::process::id());
        (a, e)
    };
    if cfg.probes > 0 {
        let gap = cfg.duration.mul_f64(0.4) / cfg.probes as u32;
        for p in 0..cfg.probes {
            tokio::time::sleep(gap).await;
            let (a, e) = probe(p);
            expect.probes[a]
                .lock()
                .unwrap()
                .insert(e.id.clone(), Some(Instant::now()));
            create_entries(admins[p % admins.len()].clone(), vec![e]).await;
            probes_made += 1;
        }
    }
    let mut outage_write = None;
    if let (Some(outage), Some(pg)) = (cfg.pg_outage, pg.as_ref()) {
        tokio::time::sleep((cfg.duration / 2).saturating_sub(t0.elapsed())).await;
        pg.down();
        let (_, e) = probe(cfg.probes + 1);
        let r = pb::entry::entry_client::EntryClient::new(admins[0].clone())
            .batch_create_entry(pb::entry::BatchCreateEntryRequest {
                entries: vec![e],
                output_mask: None,
            })
            .await;
        outage_write = Some(match r {
            Err(s) => s.code(),
            Ok(r) => r
                .into_inner()
                .results
                .first()
                .and_then(|x| x.status.as_ref())
                .map(|s| tonic::Code::from(s.code))
                .unwrap_or(tonic::Code::Ok),
        });
        tokio::time::sleep(outage.saturating_sub(Duration::from_secs(3))).await;
        pg.up();
        // Written once the database is back (servers reconnect on their own).
        let (a, e) = probe(cfg.probes + 2);
        expect.probes[a]
            .lock()
            .unwrap()
            .insert(e.id.clone(), Some(Instant::now()));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = pb::entry::entry_client::EntryClient::new(admins[1 % admins.len()].clone())
                .batch_create_entry(pb::entry::BatchCreateEntryRequest {
                    entries: vec![e.clone()],
                    output_mask: None,
                })
                .await;
            if let Ok(r) = r
                && r.get_ref()
                    .results
                    .first()
                    .and_then(|x| x.status.as_ref())
                    .map(|s| s.code)
                    == Some(0)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "writes did not recover after the outage"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Propagation counts from the write that succeeded (unless already seen).
        if let Some(Some(t)) = expect.probes[a].lock().unwrap().get_mut(&e.id) {
            *t = Instant::now();
        }
        probes_made += 1;
    }
    let mut errors_at_kill = None;
    if cfg.kill_one && servers.len() > 1 {
        tokio::time::sleep((cfg.duration / 2).saturating_sub(t0.elapsed())).await;
        errors_at_kill = Some(errors.load(std::sync::atomic::Ordering::Relaxed));
        servers[0].kill();
        // Entries made on a surviving server reach every agent, the killed one's too.
        for k in 0..2 {
            let (a, e) = probe(cfg.probes + 10 + k);
            expect.probes[a]
                .lock()
                .unwrap()
                .insert(e.id.clone(), Some(Instant::now()));
            create_entries(admins[1].clone(), vec![e]).await;
            probes_made += 1;
        }
    }
    let left = cfg.duration.saturating_sub(t0.elapsed());
    tokio::time::sleep(left).await;
    let elapsed = t0.elapsed();
    let cpu1: Duration = servers.iter().map(|s| s.cpu()).sum();
    let errors_after_kill = errors_at_kill
        .map(|e0| errors.load(std::sync::atomic::Ordering::Relaxed) - e0)
        .unwrap_or(0);
    let in_window = lat.lock().unwrap().len();
    let rss = servers.iter().map(|s| s.rss_kib()).collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    // Every agent once more, after propagation: each must have exactly its entries.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut final_wrong = 0;
    for (i, a) in agents.iter().enumerate() {
        match sync(a.channel.clone()).await {
            Ok(got) if check(&expect, i, &got, true) => {}
            _ => final_wrong += 1,
        }
    }
    let db_connections = pg.as_ref().map(|pg| {
        pg.psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'kame'",
        )
        .parse()
        .unwrap_or(0)
    });
    let mut l = lat.lock().unwrap()[..in_window].to_vec();
    l.sort();
    let mut prop = expect.seen.lock().unwrap().clone();
    prop.sort();
    drop(agents);
    drop(servers);
    drop(pg);
    Report {
        syncs: l.len() as u64,
        errors: errors.load(std::sync::atomic::Ordering::Relaxed),
        wrong: wrong.load(std::sync::atomic::Ordering::Relaxed),
        final_wrong,
        p50: percentile(&l, 0.5),
        p99: percentile(&l, 0.99),
        max: l.last().copied().unwrap_or_default(),
        server_cpu: cpu1.saturating_sub(cpu0),
        server_rss_kib: rss,
        db_connections,
        propagation_p50: percentile(&prop, 0.5),
        propagation_p99: percentile(&prop, 0.99),
        propagation_max: prop.last().copied().unwrap_or_default(),
        probes_seen: prop.len(),
        probes_made,
        errors_after_kill,
        outage_write,
        setup,
        window: elapsed,
        attest_rate,
        log,
    }
}

/// Checks the transparency log through every server ([`LogCheck`]): a `log monitor` pass from
/// the empty tree through each, until each server's latest tree head covers all `agents`
/// attestations and their SVIDs (tree heads are signed every 200 ms), at most 30 s.
async fn check_log(servers: &[ServerProc], dir: &Path, agents: usize) -> LogCheck {
    let watch = vec![format!("spiffe://{TD}/spire/agent")];
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut check = LogCheck::default();
    for (i, s) in servers.iter().enumerate() {
        let args = kame_server::cli::LogArgs {
            url: format!("http://127.0.0.1:{}", s.log_port.unwrap()),
            log_key: s.data_dir.join("transparency_log_key.pem"),
            output: kame_server::cli::Output::Json,
        };
        let state = dir.join(format!("monitor-{i}.json"));
        loop {
            let _ = std::fs::remove_file(&state);
            let r = kame_server::cli::monitor_pass(&args, &state, &watch, 10_000_000)
                .await
                .unwrap_or_else(|e| panic!("the log through server {i}: {e}"));
            let count = |t: &str| {
                r["matches"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|m| m["type"] == t)
                    .count()
            };
            let (att, svids) = (count("Attestation"), count("Precert"));
            if (att >= agents && svids >= agents) || Instant::now() > deadline {
                check.sizes.push(r["to"].as_u64().unwrap());
                check.attestations = att;
                check.agent_svids = svids;
                check.authority_changes = count("Authority");
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Across servers: the tree heads each signed (as their monitor passes saved them) are
    // consistent, by a proof from the server that signed the larger.
    let head = |i: usize| -> (u64, Vec<u8>) {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(format!("monitor-{i}.json"))).unwrap())
                .unwrap();
        (
            v["tree_size"].as_u64().unwrap(),
            b64(v["sha256_root_hash"].as_str().unwrap()),
        )
    };
    for i in 1..servers.len() {
        let (mut a, mut b) = (head(0), head(i));
        let mut port = servers[i].log_port.unwrap();
        if a.0 > b.0 {
            std::mem::swap(&mut a, &mut b);
            port = servers[0].log_port.unwrap();
        }
        let proof: Vec<[u8; 32]> = if a.0 == b.0 || a.0 == 0 {
            vec![]
        } else {
            let body = reqwest::get(format!(
                "http://127.0.0.1:{port}/ct/v1/get-sth-consistency?first={}&second={}",
                a.0, b.0
            ))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            v["consistency"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| b64(h.as_str().unwrap()).try_into().unwrap())
                .collect()
        };
        if a.0 == b.0 {
            assert_eq!(a.1, b.1, "two roots for one tree size");
        } else if a.0 > 0 {
            kame_api::ct::verify_consistency(
                a.0,
                b.0,
                &a.1.clone().try_into().unwrap(),
                &b.1.clone().try_into().unwrap(),
                &proof,
            )
            .unwrap_or_else(|e| panic!("tree heads of servers 0 and {i}: {e}"));
        }
    }
    check.cross_checked = true;
    check
}

fn b64(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

/// Checks one answer: every base entry present, nothing that is neither base nor a probe of
/// this agent; records when probes are first seen. With `exact`, every probe must be there.
fn check(expect: &Expect, agent: usize, got: &[String], exact: bool) -> bool {
    let base = &expect.base[agent];
    let mut probes = expect.probes[agent].lock().unwrap();
    let got_set: HashSet<&String> = got.iter().collect();
    let mut ok = got_set.len() == got.len() && base.iter().all(|b| got_set.contains(b));
    for g in got {
        if base.contains(g) {
            continue;
        }
        match probes.get_mut(g) {
            // First sighting: how long it took since the entry was created.
            Some(pending @ Some(_)) => {
                if let Some(at) = pending.take() {
                    expect.seen.lock().unwrap().push(at.elapsed());
                }
            }
            Some(None) => {}
            None => ok = false,
        }
    }
    if exact && probes.keys().any(|p| !got_set.contains(p)) {
        ok = false;
    }
    ok
}

/// Server start-up time with `entries` entries and `agents` attested agents in the datastore:
/// a first start creates the CA, the datastore is then filled directly, and the time from
/// the second start to its admin API answering is measured.
pub async fn startup(bin: &Path, db: Db, entries: usize, agents: usize) -> (Duration, Duration) {
    use kame_server::datastore::{AttestedNode, DataStore, RegistrationEntry, Selector};
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let pg = (db == Db::Postgres).then(kame_server::datastore::testing::PgCluster::start);
    let (datastore, store): (String, Arc<dyn DataStore>) = match &pg {
        Some(pg) => {
            let conn = pg.create_database("kame");
            let s = kame_server::datastore::postgres::PgStore::open(
                &kame_server::datastore::postgres::PgSettings {
                    connection_string: conn.clone().into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            (
                format!("database_type = \"postgres\"\n            connection_string = \"{conn}\""),
                Arc::new(s),
            )
        }
        None => {
            let f = dir.path().join("datastore.sqlite3");
            let s = kame_server::datastore::sqlite::SqliteStore::open(f.to_str().unwrap())
                .await
                .unwrap();
            (
                format!(
                    "database_type = \"sqlite3\"\n            connection_string = \"{}\"",
                    f.display()
                ),
                Arc::new(s),
            )
        }
    };
    let sdir = dir.path().join("server");
    start_server(bin, &sdir, &datastore).await.kill();
    let t = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = vec![];
    for i in 0..entries.max(agents) {
        let store = store.clone();
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            let agent = format!("spiffe://{TD}/spire/agent/seed/{}", i % agents.max(1));
            if i < entries {
                store
                    .create_entry(&RegistrationEntry {
                        id: format!("{i:08}-seed"),
                        spiffe_id: format!("spiffe://{TD}/workload/{i}"),
                        parent_id: agent.clone(),
                        selectors: vec![Selector::new("unix", "uid:1000")],
                        created_at: 1,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
            if i < agents {
                store
                    .create_node(&AttestedNode {
                        spiffe_id: agent,
                        attestation_type: "join_token".into(),
                        serial_number: format!("{i}"),
                        expires_at: i64::MAX,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let seeded = t.elapsed();
    drop(store);
    let t = Instant::now();
    let s = start_server(bin, &sdir, &datastore).await;
    let started = t.elapsed();
    drop(s);
    drop(pg);
    (seeded, started)
}
