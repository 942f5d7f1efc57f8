//! The Workload API load scenario, shared by the `workload_api` benchmark (release build, the
//! full size, figures printed) and a CI test (debug build, a small size, correctness only).
//! It starts a kame-server in-process and the `kame-agent` binary as its own process,
//! registers `entries` entries under the agent (the first for this process's uid), waits
//! until the agent caches every SVID, and measures what issue 25 asks for: the agent's
//! resident memory idle; FetchX509SVID and FetchJWTSVID first-response latency; `streams`
//! concurrent FetchX509SVID streams over `connections` connections (all served, the time to
//! serve them, peak, open and settled resident memory); and how long an entry change takes
//! to reach every open stream.

use kame_api::pb;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const TD: &str = "example.org";

/// What to run.
#[derive(Debug, Clone)]
pub struct Params {
    pub agent_bin: PathBuf,
    /// Entries under the agent (the agent mints and caches an SVID for each).
    pub entries: usize,
    /// Concurrent FetchX509SVID streams, and the connections they share.
    pub streams: usize,
    pub connections: usize,
    /// First-response samples, each on a new connection.
    pub samples: usize,
}

/// What was measured (memory in KiB, from /proc).
#[derive(Debug, Default)]
pub struct Report {
    pub idle_rss_kib: u64,
    /// Of it: anonymous memory, and file pages (the binary's code).
    pub idle_anon_kib: u64,
    pub idle_file_kib: u64,
    /// Resident KiB of each mapped file (the binary, shared libraries), largest first.
    pub idle_mappings: Vec<(String, u64)>,
    pub x509_first: Vec<Duration>,
    pub jwt_first: Vec<Duration>,
    /// A new connection whose call is refused before attestation: the round trip alone.
    pub baseline: Vec<Duration>,
    pub streams_served: usize,
    pub time_to_serve: Duration,
    /// The highest resident memory while the streams opened and were updated.
    pub peak_rss_kib: u64,
    pub open_rss_kib: u64,
    /// Streams that received the update after the entry change.
    pub updated: usize,
    /// From the first stream's update to the last one's.
    pub fan_out: Duration,
    /// From the entry change (the server's answer) to the last stream's update; includes the
    /// agent's sync interval.
    pub change_to_all: Duration,
    /// Resident memory 5 s after every stream closed.
    pub settled_rss_kib: u64,
    pub threads: u64,
}

fn status_field(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The agent's resident memory now (KiB).
pub fn rss_kib(pid: u32) -> u64 {
    status_field(pid, "VmRSS:")
}

/// Its highest resident memory since the last reset (KiB).
fn peak_kib(pid: u32) -> u64 {
    status_field(pid, "VmHWM:")
}

/// Resets the high-water mark (`/proc/<pid>/clear_refs`, "5"), so a phase's peak is its own.
fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// Resident KiB per mapped file, from /proc/<pid>/smaps.
fn mapped_files(pid: u32) -> Vec<(String, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut by_file = std::collections::BTreeMap::<String, u64>::new();
    let mut current = String::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if first.contains('-') && first.chars().next().is_some_and(|c| c.is_ascii_hexdigit()) {
            // A mapping's header: address range, perms, offset, dev, inode, path.
            current = words.nth(4).unwrap_or_default().to_string();
        } else if first == "Rss:" && current.starts_with('/') {
            let kib: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            *by_file.entry(current.clone()).or_default() += kib;
        }
    }
    let mut v: Vec<(String, u64)> = by_file.into_iter().filter(|(_, k)| *k > 0).collect();
    v.sort_by_key(|(_, k)| std::cmp::Reverse(*k));
    v
}

pub fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn id(path: &str) -> pb::types::Spiffeid {
    pb::types::Spiffeid {
        trust_domain: TD.into(),
        path: path.into(),
    }
}

async fn x509_stream(
    ch: tonic::transport::Channel,
) -> (Duration, tonic::Streaming<pb::workload::X509svidResponse>) {
    let t = Instant::now();
    let mut s = pb::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(ch)
        .fetch_x509svid(kame_agent::cli::with_header(
            pb::workload::X509svidRequest {},
        ))
        .await
        .expect("FetchX509SVID")
        .into_inner();
    let m = s
        .message()
        .await
        .expect("first X509-SVID response")
        .expect("a message");
    assert_eq!(m.svids.len(), 1);
    (t.elapsed(), s)
}

/// Runs the scenario; panics on anything that is not served as it should be.
pub async fn run(p: Params) -> Report {
    let mut r = Report::default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let port = kame_keymanager::testing::free_port();
    let server_conf = dir.path().join("server.conf");
    std::fs::write(
        &server_conf,
        format!(
            r#"server {{
    bind_address = "127.0.0.1"
    bind_port = "{port}"
    socket_path = "{d}/srv/api.sock"
    trust_domain = "{TD}"
    data_dir = "{d}/srv"
    log_level = "WARN"
}}
plugins {{
    DataStore "sql" {{
        plugin_data {{
            database_type = "sqlite3"
            connection_string = "{d}/srv/datastore.sqlite3"
        }}
    }}
    KeyManager "memory" {{}}
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
}}
"#
        ),
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("srv")).unwrap();
    let server =
        kame_server::run::start(kame_server::config::Config::load(&server_conf, false).unwrap())
            .await
            .unwrap();
    let admin = kame_server::cli::connect(&dir.path().join("srv/api.sock"))
        .await
        .unwrap();
    let token = pb::agent::agent_client::AgentClient::new(admin.clone())
        .create_join_token(pb::agent::CreateJoinTokenRequest {
            ttl: 600,
            token: String::new(),
            agent_id: None,
        })
        .await
        .unwrap()
        .into_inner()
        .value;
    let bundle = pb::bundle::bundle_client::BundleClient::new(admin.clone())
        .get_bundle(pb::bundle::GetBundleRequest { output_mask: None })
        .await
        .unwrap()
        .into_inner();
    std::fs::write(
        dir.path().join("bundle.pem"),
        kame_api::bundle::x509_to_pem(&bundle),
    )
    .unwrap();
    let sock = format!("{d}/agent/api.sock");
    std::fs::write(
        dir.path().join("agent.conf"),
        format!(
            r#"agent {{
    data_dir = "{d}/agent"
    server_address = "127.0.0.1"
    server_port = "{port}"
    socket_path = "{sock}"
    trust_bundle_path = "{d}/bundle.pem"
    trust_domain = "{TD}"
    join_token = "{token}"
    log_level = "WARN"
    sync_interval = "500ms"
}}
plugins {{
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    KeyManager "disk" {{
        plugin_data {{}}
    }}
    WorkloadAttestor "unix" {{
        plugin_data {{}}
    }}
}}
"#
        ),
    )
    .unwrap();
    let agent_id = format!("/spire/agent/join_token/{token}");
    let uid = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").unwrap().uid()
    };
    let entries: Vec<pb::types::Entry> = (0..p.entries)
        .map(|i| pb::types::Entry {
            spiffe_id: Some(id(&format!("/bench/{i}"))),
            parent_id: Some(id(&agent_id)),
            selectors: vec![pb::types::Selector {
                r#type: "unix".into(),
                value: if i == 0 {
                    format!("uid:{uid}")
                } else {
                    format!("uid:{}", 100_000 + i)
                },
            }],
            ..Default::default()
        })
        .collect();
    let mut entry_client = pb::entry::entry_client::EntryClient::new(admin.clone());
    let created = entry_client
        .batch_create_entry(pb::entry::BatchCreateEntryRequest {
            entries,
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    let mine = created.results[0].entry.clone().expect("the first entry");
    let mut agent = std::process::Command::new(&p.agent_bin)
        .args(["run", "--config"])
        .arg(dir.path().join("agent.conf"))
        .spawn()
        .unwrap();
    let pid = agent.id();
    // Every SVID in the agent's persisted cache.
    let cache = dir.path().join("agent/svid_cache.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = std::fs::read(&cache)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["svids"].as_array().map(|a| a.len()))
            .unwrap_or(0);
        if n == p.entries {
            break;
        }
        assert!(Instant::now() < deadline, "agent cached only {n} SVIDs");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    r.idle_rss_kib = rss_kib(pid);
    r.idle_anon_kib = status_field(pid, "RssAnon:");
    r.idle_file_kib = status_field(pid, "RssFile:");
    r.idle_mappings = mapped_files(pid);

    // First responses, each on a new connection, one after another.
    for _ in 0..p.samples {
        let ch = kame_agent::cli::connect(&sock).await.unwrap();
        let (t, s) = x509_stream(ch).await;
        r.x509_first.push(t);
        drop(s);
    }
    for _ in 0..p.samples {
        let t = Instant::now();
        let ch = kame_agent::cli::connect(&sock).await.unwrap();
        let j = pb::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(ch)
            .fetch_jwtsvid(kame_agent::cli::with_header(pb::workload::JwtsvidRequest {
                audience: vec!["bench".into()],
                spiffe_id: String::new(),
            }))
            .await
            .expect("FetchJWTSVID")
            .into_inner();
        assert_eq!(j.svids.len(), 1);
        r.jwt_first.push(t.elapsed());
    }
    for _ in 0..p.samples {
        let t = Instant::now();
        let ch = kame_agent::cli::connect(&sock).await.unwrap();
        let refused = pb::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(ch)
            .fetch_x509svid(pb::workload::X509svidRequest {})
            .await;
        assert!(refused.is_err());
        r.baseline.push(t.elapsed());
    }
    for v in [&mut r.x509_first, &mut r.jwt_first, &mut r.baseline] {
        v.sort();
    }

    // K streams over C connections, opened at once.
    tokio::time::sleep(Duration::from_secs(1)).await;
    reset_peak(pid);
    let mut channels = vec![];
    for _ in 0..p.connections {
        channels.push(kame_agent::cli::connect(&sock).await.unwrap());
    }
    let (updates_tx, mut updates) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    let (served_tx, mut served) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let start = Instant::now();
    let mut readers = vec![];
    for i in 0..p.streams {
        let ch = channels[i % p.connections].clone();
        let updates_tx = updates_tx.clone();
        let served_tx = served_tx.clone();
        readers.push(tokio::spawn(async move {
            let (_, mut s) = x509_stream(ch).await;
            let _ = served_tx.send(i);
            // Every later message is an update.
            while let Ok(Some(_)) = s.message().await {
                let _ = updates_tx.send((i, Instant::now()));
            }
        }));
    }
    drop(served_tx);
    let mut n = 0;
    while n < p.streams {
        match tokio::time::timeout(Duration::from_secs(120), served.recv()).await {
            Ok(Some(_)) => n += 1,
            _ => break,
        }
    }
    r.streams_served = n;
    r.time_to_serve = start.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    r.open_rss_kib = rss_kib(pid);
    r.threads = status_field(pid, "Threads:");

    // An entry change (a new hint re-sends the SVID to its watchers).
    let mut changed = mine.clone();
    changed.hint = "updated".into();
    let t_change = {
        let res = entry_client
            .batch_update_entry(pb::entry::BatchUpdateEntryRequest {
                entries: vec![changed],
                input_mask: None,
                output_mask: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(res.results[0].status.as_ref().map(|s| s.code), Some(0));
        Instant::now()
    };
    let mut seen = std::collections::HashSet::new();
    let (mut first, mut last) = (None::<Instant>, None::<Instant>);
    while seen.len() < r.streams_served {
        match tokio::time::timeout(Duration::from_secs(30), updates.recv()).await {
            Ok(Some((i, at))) => {
                if seen.insert(i) {
                    first = Some(first.map_or(at, |f| f.min(at)));
                    last = Some(last.map_or(at, |l| l.max(at)));
                }
            }
            _ => break,
        }
    }
    r.updated = seen.len();
    if let (Some(f), Some(l)) = (first, last) {
        r.fan_out = l.duration_since(f);
        r.change_to_all = l.duration_since(t_change);
    }
    r.peak_rss_kib = peak_kib(pid);

    // Close everything; what stays resident.
    for t in &readers {
        t.abort();
    }
    for t in readers {
        let _ = t.await;
    }
    drop(channels);
    tokio::time::sleep(Duration::from_secs(5)).await;
    r.settled_rss_kib = rss_kib(pid);

    let _ = std::process::Command::new("kill")
        .arg(pid.to_string())
        .status();
    let _ = agent.wait();
    server.stop().await;
    r
}
