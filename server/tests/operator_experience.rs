//! Issue 24, driven through the real binaries as an operator drives them: a second `run` on a
//! live server's socket or data_dir is refused with the reason and the first stays healthy; a
//! stopped (SIGSTOP) server makes `healthcheck` fail within its deadline instead of hanging;
//! output piped into `head -1` ends quietly; an agent given a join token the server does not
//! know exits non-zero within 30 s saying why, and the server logs the refusal with the
//! attestor and the peer. SPIRE's `run` flags override the configuration of both daemons,
//! `logger get|set|reset` changes the running server's level, `audit_log_enabled` writes one
//! event per call with the caller, `-instance` picks the socket from SPIRE's template
//! variable, and the agent's `api` commands print SPIRE's JSON with `-output json`.
//!
//! The agent binary is the workspace's `target/<profile>/kame-agent`, built by
//! `cargo test --workspace` (and `scripts/test`) before any test runs.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn server_bin() -> &'static str {
    env!("CARGO_BIN_EXE_kame-server")
}

/// The `kame-agent` binary next to `kame-server`.
fn agent_bin() -> PathBuf {
    let p = Path::new(server_bin()).with_file_name("kame-agent");
    assert!(
        p.exists(),
        "{} is missing: build it first (cargo build -p kame-agent)",
        p.display()
    );
    p
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.0.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_server(dir: &Path, conf: &Path, log: &str) -> Child {
    Child(
        Command::new(server_bin())
            .args(["run", "--config"])
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(log)).unwrap())
            .spawn()
            .unwrap(),
    )
}

fn cli(args: &[&str]) -> Output {
    Command::new(server_bin()).args(args).output().unwrap()
}

fn healthy(socket: &Path) -> bool {
    cli(&[
        "healthcheck",
        "--socket-path",
        &socket.display().to_string(),
    ])
    .status
    .success()
}

fn wait_healthy(socket: &Path) {
    let t = Instant::now();
    while !healthy(socket) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "server never healthy"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits for `child` to exit within `limit`; its status.
fn exits_within(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            return s;
        }
        assert!(t.elapsed() < limit, "still running after {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn server_dir() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("server.conf");
    std::fs::write(
        &conf,
        config_text(dir.path(), free_port(), &Opts::default())
            .replace("log_level = \"WARN\"", "log_level = \"INFO\""),
    )
    .unwrap();
    let socket = dir.path().join("sock/api.sock");
    (dir, conf, socket)
}

/// The `bind_port` of a server configuration written by `server_dir`.
fn port_of(conf: &Path) -> String {
    std::fs::read_to_string(conf)
        .unwrap()
        .lines()
        .find_map(|l| l.trim().strip_prefix("bind_port = "))
        .unwrap()
        .trim_matches('"')
        .to_string()
}

/// `<dir>/agent` with the server's bundle and an `agent.conf` (join_token attestor, memory
/// keys, unix workload attestor) whose `agent` block holds `lines` (`{d}` stands for the
/// agent's directory) besides the server address, bundle and trust domain, followed by
/// `root` (more top-level blocks).
fn agent_dir(dir: &Path, bundle: &[u8], lines: &str, root: &str) -> PathBuf {
    let a = dir.join("agent");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::write(a.join("bundle.pem"), bundle).unwrap();
    let d = a.display().to_string();
    std::fs::write(
        a.join("agent.conf"),
        format!(
            r#"agent {{
    server_address = "127.0.0.1"
    trust_bundle_path = "{d}/bundle.pem"
    trust_domain = "{TD}"
{lines}
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
{root}"#,
            lines = lines.replace("{d}", &d)
        ),
    )
    .unwrap();
    a
}

#[test]
fn operator_second_run_refused_on_live_data_dir_or_socket_first_stays_healthy() {
    let (dir, conf, socket) = server_dir();
    let _first = spawn_server(dir.path(), &conf, "first.log");
    wait_healthy(&socket);

    // The same configuration: its data_dir is held.
    let mut second = spawn_server(dir.path(), &conf, "second.log");
    assert!(!exits_within(&mut second, Duration::from_secs(20)).success());
    let err = std::fs::read_to_string(dir.path().join("second.log")).unwrap();
    assert!(
        err.contains("data_dir") && err.contains("in use by another process"),
        "{err}"
    );
    assert!(healthy(&socket), "the first server still answers");

    // Another data_dir, the same socket: the live socket is not taken.
    let other = tempfile::tempdir().unwrap();
    let text = config_text(other.path(), free_port(), &Opts::default()).replace(
        &format!("{}/sock/api.sock", other.path().display()),
        &socket.display().to_string(),
    );
    let conf2 = other.path().join("server.conf");
    std::fs::write(&conf2, text).unwrap();
    let mut third = spawn_server(other.path(), &conf2, "third.log");
    assert!(!exits_within(&mut third, Duration::from_secs(20)).success());
    let err = std::fs::read_to_string(other.path().join("third.log")).unwrap();
    assert!(
        err.contains(&socket.display().to_string()) && err.contains("another kame-server"),
        "{err}"
    );
    assert!(healthy(&socket), "the first server still answers");
}

#[test]
fn operator_healthcheck_of_a_stopped_server_fails_within_15s() {
    let (dir, conf, socket) = server_dir();
    let server = spawn_server(dir.path(), &conf, "server.log");
    wait_healthy(&socket);
    let pid = server.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let t = Instant::now();
    let o = cli(&[
        "healthcheck",
        "--socket-path",
        &socket.display().to_string(),
    ]);
    let took = t.elapsed();
    assert!(!o.status.success());
    assert!(took < Duration::from_secs(15), "took {took:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no answer from the server within 5s"), "{err}");
    // --timeout sets the deadline for any admin command.
    let t = Instant::now();
    let o = cli(&[
        "entry",
        "show",
        "--timeout",
        "1s",
        "--socket-path",
        &socket.display().to_string(),
    ]);
    assert!(!o.status.success());
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(String::from_utf8_lossy(&o.stderr).contains("within 1s"));
    assert!(
        Command::new("kill")
            .args(["-CONT", &pid])
            .status()
            .unwrap()
            .success()
    );
    wait_healthy(&socket);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_output_piped_into_head_ends_quietly() {
    let (dir, conf, socket) = server_dir();
    let _server = spawn_server(dir.path(), &conf, "server.log");
    wait_healthy(&socket);
    // Enough entries that the output outgrows the pipe once `head` has gone.
    let mut c = kame_api::pb::entry::entry_client::EntryClient::new(
        kame_server::cli::connect(&socket).await.unwrap(),
    );
    for batch in 0..8 {
        let entries = (0..100)
            .map(|i| kame_api::pb::types::Entry {
                spiffe_id: Some(spiffe_id(TD, &format!("/w/{batch}/{i}"))),
                parent_id: Some(spiffe_id(TD, "/spire/agent/x")),
                selectors: vec![kame_api::pb::types::Selector {
                    r#type: "unix".into(),
                    value: format!("uid:{i}"),
                }],
                ..Default::default()
            })
            .collect();
        c.batch_create_entry(kame_api::pb::entry::BatchCreateEntryRequest {
            entries,
            output_mask: None,
        })
        .await
        .unwrap();
    }
    let err = dir.path().join("cli.err");
    let o = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "\"$0\" entry show --socket-path {s} 2>{e} | head -1; echo \"status=${{PIPESTATUS[0]}}\"",
            s = socket.display(),
            e = err.display()
        ))
        .arg(server_bin())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let status = out
        .lines()
        .find_map(|l| l.strip_prefix("status="))
        .unwrap_or_default()
        .to_string();
    assert!(status == "0" || status == "141", "{out}");
    let e = std::fs::read_to_string(&err).unwrap();
    assert!(!e.contains("panicked"), "{e}");
    assert!(e.is_empty(), "nothing on stderr: {e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_agent_with_an_unknown_join_token_exits_nonzero_with_the_reason() {
    let (dir, conf, socket) = server_dir();
    let _server = spawn_server(dir.path(), &conf, "server.log");
    wait_healthy(&socket);
    let bundle = cli(&[
        "bundle",
        "show",
        "--socket-path",
        &socket.display().to_string(),
    ]);
    assert!(bundle.status.success());
    let a = agent_dir(
        dir.path(),
        &bundle.stdout,
        &format!(
            "    data_dir = \"{{d}}/data\"\n    server_port = \"{}\"\n    socket_path = \"{{d}}/api.sock\"\n    join_token = \"00000000-0000-4000-8000-000000000000\"\n    log_level = \"INFO\"",
            port_of(&conf)
        ),
        "",
    );
    let mut agent = Child(
        Command::new(agent_bin())
            .args(["run", "--config"])
            .arg(a.join("agent.conf"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(a.join("agent.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let status = exits_within(&mut agent, Duration::from_secs(30));
    assert_eq!(status.code(), Some(1));
    let log = std::fs::read_to_string(a.join("agent.log")).unwrap();
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("Error: ")
            && last.contains("join token does not exist or has already been used"),
        "{log}"
    );
    assert!(!log.contains("\u{1b}["), "no colour in a file: {log}");
    // The server says who was refused, with what, and why.
    let slog = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(
        slog.lines().any(|l| l.contains("attestation refused")
            && l.contains("attestor=join_token")
            && l.contains("peer=127.0.0.1:")
            && l.contains("has already been used")),
        "{slog}"
    );
}

async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// SPIRE's `health_checks` listener and `log_file`, from a config SPIRE would take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_health_checks_listener_and_log_file_as_spire_configures_them() {
    let dir = tempfile::tempdir().unwrap();
    let hp = free_port();
    let log = dir.path().join("kame.log");
    let conf = dir.path().join("server.conf");
    std::fs::write(
        &conf,
        config_text(dir.path(), free_port(), &Opts::default()).replace(
            "log_level = \"WARN\"",
            &format!("log_level = \"INFO\"\n    log_file = \"{}\"", log.display()),
        ) + &format!(
            "health_checks {{\n    listener_enabled = true\n    bind_address = \"127.0.0.1\"\n    bind_port = \"{hp}\"\n    live_path = \"/live\"\n    ready_path = \"/ready\"\n}}\n"
        ),
    )
    .unwrap();
    let socket = dir.path().join("sock/api.sock");
    let _server = spawn_server(dir.path(), &conf, "stderr.log");
    wait_healthy(&socket);
    let live = http_get(hp, "/live").await;
    assert!(live.starts_with("HTTP/1.1 200"), "{live}");
    let ready = http_get(hp, "/ready").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    assert!(ready.contains("\"x509_authority_expires_at\":"), "{ready}");
    assert!(http_get(hp, "/other").await.starts_with("HTTP/1.1 404"));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("kame-server started"), "{text}");
    assert!(text.contains("serving health checks"), "{text}");
    assert!(!text.contains('\u{1b}'), "no colour in a log file");
}

fn run_cli(args: &[&str]) -> (bool, String, String) {
    let o = cli(args);
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A SPIRE user's commands and files, unchanged: single-dash camelCase flags, `-flag=value`,
/// switches given `=true`/`=false`, durations for mint TTLs, `entry create -data` and
/// `entry delete -file` in SPIRE's JSON, a duplicate answered with the entry that exists, and
/// an HCL1-style configuration (nested blocks on one line) that validates.
#[test]
fn operator_spire_flags_files_and_hcl1_config_work_unchanged() {
    let (dir, conf, socket) = server_dir();
    let _server = spawn_server(dir.path(), &conf, "server.log");
    wait_healthy(&socket);
    let sock = socket.display().to_string();
    let create = [
        "entry",
        "create",
        "-socketPath",
        &sock,
        "-spiffeID",
        "spiffe://example.org/spire-script/web",
        "-parentID=spiffe://example.org/spire/agent/x",
        "-selector",
        "unix:uid:1000",
        "-x509SVIDTTL",
        "3600",
        "-dns",
        "web.example.org",
        "-admin=true",
        "-downstream=false",
    ];
    let (ok, out, err) = run_cli(&create);
    assert!(ok, "{err}");
    assert!(out.contains("X509-SVID TTL           : 3600"), "{out}");
    assert!(
        out.contains("DNS name                : web.example.org"),
        "{out}"
    );
    assert!(out.contains("Admin                   : true"), "{out}");
    assert!(!out.contains("Downstream"), "{out}");
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("Entry ID                : "))
        .unwrap()
        .to_string();
    // The same again: refused, naming the entry that exists.
    let (ok, _, err) = run_cli(&create);
    assert!(!ok);
    assert!(
        err.contains("Failed to create the following entry (code: AlreadyExists")
            && err.contains(&id),
        "{err}"
    );

    // SPIRE's -data file: two entries in one batch.
    let data = dir.path().join("entries.json");
    std::fs::write(
        &data,
        r#"{"entries": [
            {"spiffe_id": "spiffe://example.org/spire-script/a", "parent_id": "spiffe://example.org/spire/agent/x",
             "selectors": [{"type": "unix", "value": "uid:1"}], "x509_svid_ttl": 600, "federates_with": [],
             "entryExpiry": 4102444800, "hint": "a"},
            {"spiffe_id": "spiffe://example.org/spire-script/b", "parent_id": "spiffe://example.org/spire/agent/x",
             "selectors": [{"type": "unix", "value": "uid:2"}], "dns_names": ["b.example.org"]}
        ]}"#,
    )
    .unwrap();
    let (ok, out, err) = run_cli(&[
        "entry",
        "create",
        "-data",
        &data.display().to_string(),
        "-socketPath",
        &sock,
    ]);
    assert!(ok, "{err}");
    assert_eq!(out.matches("Entry ID").count(), 2, "{out}");
    assert!(
        out.contains("Expiration time         : 2100-01-01 00:00:00 +0000 UTC"),
        "{out}"
    );
    let ids: Vec<String> = out
        .lines()
        .filter_map(|l| l.strip_prefix("Entry ID                : "))
        .map(String::from)
        .collect();
    let (ok, out, _) = run_cli(&["entry", "count", "-socketPath", &sock]);
    assert!(ok);
    assert_eq!(out.trim(), "3 registration entries");
    // SPIRE's filters on show and count.
    let (ok, out, _) = run_cli(&[
        "entry",
        "count",
        "-socketPath",
        &sock,
        "-selector",
        "unix:uid:1",
        "-selector",
        "unix:uid:2",
        "-matchSelectorsOn",
        "any",
    ]);
    assert!(ok);
    assert_eq!(out.trim(), "2 registration entries");
    let (ok, out, _) = run_cli(&["entry", "show", "-socketPath", &sock, "-hint", "a"]);
    assert!(ok);
    assert_eq!(out.matches("Entry ID").count(), 1, "{out}");
    let (ok, _, err) = run_cli(&[
        "entry",
        "show",
        "-socketPath",
        &sock,
        "-entryID",
        &ids[0],
        "-hint",
        "a",
    ]);
    assert!(!ok && err.contains("cannot be combined"), "{err}");
    let (ok, out, _) = run_cli(&["entry", "show", "-socketPath", &sock, "-output", "json"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v.is_object() || v.is_array(), "{out}");

    // SPIRE's -file for delete.
    let file = dir.path().join("ids.json");
    std::fs::write(&file, serde_json::json!({"ids": ids}).to_string()).unwrap();
    let (ok, out, err) = run_cli(&[
        "entry",
        "delete",
        "-file",
        &file.display().to_string(),
        "-socketPath",
        &sock,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("Deleted 2 entries successfully"), "{out}");
    let (_, out, _) = run_cli(&["entry", "count", "-socketPath", &sock]);
    assert_eq!(out.trim(), "1 registration entry");

    // Mint with a duration TTL, as SPIRE's `x509 mint -ttl 1h`.
    let (ok, _, err) = run_cli(&[
        "x509",
        "mint",
        "-spiffeID",
        "spiffe://example.org/minted",
        "-ttl",
        "1h",
        "-socketPath",
        &sock,
    ]);
    assert!(ok, "{err}");

    // SPIRE's agent filters, purge and bundle count.
    let (ok, out, err) = run_cli(&[
        "agent",
        "list",
        "-socketPath",
        &sock,
        "-attestationType",
        "join_token",
        "-banned",
        "false",
        "-expiresBefore",
        "2100-01-01 00:00:00 +0000 UTC",
        "-selector",
        "join_token:x",
        "-matchSelectorsOn",
        "any",
    ]);
    assert!(ok, "{err}");
    assert_eq!(out, "No attested agents found\n");
    let (ok, _, err) = run_cli(&[
        "agent",
        "list",
        "-socketPath",
        &sock,
        "-expiresBefore",
        "tomorrow",
    ]);
    assert!(!ok);
    assert!(err.contains("2006-01-02 15:04:05 -0700 -07"), "{err}");
    let (ok, out, err) = run_cli(&[
        "agent",
        "purge",
        "-socketPath",
        &sock,
        "-expiredFor",
        "1h",
        "-dryRun",
    ]);
    assert!(ok, "{err}");
    assert_eq!(out, "No agents to purge.\n");
    let (ok, out, _) = run_cli(&["bundle", "count", "-socketPath", &sock]);
    assert!(ok);
    assert_eq!(out, "1 bundle\n");

    // Completions from the CLI library; SPIRE's help layout with examples per group.
    let (ok, out, _) = run_cli(&["completion", "bash"]);
    assert!(
        ok && out.contains("complete -F") && out.contains("kame-server"),
        "{out}"
    );
    let (ok, out, _) = run_cli(&["entry", "--help"]);
    assert!(ok && out.contains("Examples:"), "{out}");

    // HCL1: nested blocks on one line, commas between a block's attributes.
    let d = dir.path().display();
    let hcl1 = dir.path().join("hcl1.conf");
    std::fs::write(
        &hcl1,
        format!(
            r#"server {{ bind_address = "127.0.0.1", bind_port = "8081", trust_domain = "example.org", data_dir = "{d}/hcl1", socket_path = "{d}/hcl1.sock" }}
plugins {{
    DataStore "sql" {{ plugin_data {{ database_type = "sqlite3", connection_string = "{d}/hcl1/ds.sqlite3" }} }}
    KeyManager "disk" {{ plugin_data {{ keys_path = "{d}/hcl1/keys.json" }} }}
    NodeAttestor "join_token" {{ plugin_data {{}} }}
}}
"#
        ),
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("hcl1")).unwrap();
    let (ok, out, err) = run_cli(&["validate", "-config", &hcl1.display().to_string()]);
    assert!(ok, "{err}");
    assert!(out.contains("valid"), "{out}");
    // A SPIRE setting Kame lacks is named as such.
    let spire_only = dir.path().join("spire-only.conf");
    std::fs::write(
        &spire_only,
        std::fs::read_to_string(&hcl1).unwrap().replace(
            "trust_domain = \"example.org\"",
            "trust_domain = \"example.org\", admin_ids = [\"spiffe://example.org/admin\"]",
        ),
    )
    .unwrap();
    let (ok, _, err) = run_cli(&["validate", "-config", &spire_only.display().to_string()]);
    assert!(!ok);
    assert!(
        err.contains("server.admin_ids: a SPIRE setting Kame does not support"),
        "{err}"
    );
}

/// `/metrics` as Prometheus reads it (its Python client's parser): after an agent attests
/// (the real binary, a join token) and SVIDs are minted, the series users expect are there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_metrics_parse_as_prometheus_and_carry_the_expected_series() {
    let (dir, conf, socket) = server_dir();
    let mp = free_port();
    std::fs::write(
        &conf,
        std::fs::read_to_string(&conf).unwrap()
            + &format!("telemetry {{\n    Prometheus {{\n        host = \"127.0.0.1\"\n        port = {mp}\n    }}\n}}\n"),
    )
    .unwrap();
    let _server = spawn_server(dir.path(), &conf, "server.log");
    wait_healthy(&socket);
    let sock = socket.display().to_string();
    let (ok, out, err) = run_cli(&["token", "generate", "-socketPath", &sock]);
    assert!(ok, "{err}");
    let token = out.trim().strip_prefix("Token: ").unwrap().to_string();
    let bundle = cli(&["bundle", "show", "--socket-path", &sock]);
    let amp = free_port();
    let a = agent_dir(
        dir.path(),
        &bundle.stdout,
        &format!(
            "    data_dir = \"{{d}}/data\"\n    server_port = \"{}\"\n    socket_path = \"{{d}}/api.sock\"\n    join_token = \"{token}\"",
            port_of(&conf)
        ),
        &format!(
            "telemetry {{\n    Prometheus {{\n        host = \"127.0.0.1\"\n        port = {amp}\n    }}\n}}\n"
        ),
    );
    let _agent = Child(
        Command::new(agent_bin())
            .args(["run", "--config"])
            .arg(a.join("agent.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    while !run_cli(&["agent", "count", "-socketPath", &sock])
        .1
        .starts_with("1 ")
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the agent never attested"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        run_cli(&[
            "x509",
            "mint",
            "-spiffeID",
            "spiffe://example.org/m",
            "-socketPath",
            &sock
        ])
        .0
    );
    assert!(
        run_cli(&[
            "jwt",
            "mint",
            "-spiffeID",
            "spiffe://example.org/m",
            "-audience",
            "a",
            "-socketPath",
            &sock
        ])
        .0
    );

    let scrape_at = |port: u16| {
        let o = Command::new(kame_keymanager::testing::venv_tool("python"))
        .arg("-c")
        .arg(
            "import json, sys, urllib.request\n\
             from prometheus_client.parser import text_string_to_metric_families\n\
             text = urllib.request.urlopen(sys.argv[1]).read().decode()\n\
             out = {}\n\
             for fam in text_string_to_metric_families(text):\n\
             \x20   out[fam.name] = {'type': fam.type, 'samples': [[s.name, s.labels, s.value] for s in fam.samples]}\n\
             print(json.dumps(out))",
        )
        .arg(format!("http://127.0.0.1:{port}/metrics"))
        .output()
        .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let scrape = || scrape_at(mp);
    let fams = scrape();
    let value = |fams: &serde_json::Value, fam: &str, name: &str, labels: &[(&str, &str)]| -> f64 {
        fams[fam]["samples"]
            .as_array()
            .unwrap_or_else(|| panic!("no family {fam}: {fams}"))
            .iter()
            .find(|s| s[0] == name && labels.iter().all(|(k, v)| s[1][*k] == *v))
            .and_then(|s| s[2].as_f64())
            .unwrap_or_else(|| panic!("no {name}{labels:?} in {}", fams[fam]))
    };
    let sample = |fam: &str, name: &str, labels: &[(&str, &str)]| value(&fams, fam, name, labels);
    // Prometheus' parser strips `_total` from counter family names.
    assert_eq!(fams["kame_rpc_requests"]["type"], "counter");
    assert!(
        sample(
            "kame_rpc_requests",
            "kame_rpc_requests_total",
            &[("method", "AttestAgent"), ("grpc_code", "OK")]
        ) >= 1.0
    );
    assert!(
        sample(
            "kame_rpc_requests",
            "kame_rpc_requests_total",
            &[("method", "MintX509SVID"), ("grpc_code", "OK")]
        ) >= 1.0
    );
    assert_eq!(fams["kame_rpc_duration_seconds"]["type"], "histogram");
    assert!(
        sample(
            "kame_rpc_duration_seconds",
            "kame_rpc_duration_seconds_count",
            &[("method", "SyncAuthorizedEntries")]
        ) >= 1.0,
        "the agent's sync is timed"
    );
    assert!(
        sample(
            "kame_svids_issued",
            "kame_svids_issued_total",
            &[("type", "x509")]
        ) >= 2.0
    );
    assert!(
        sample(
            "kame_svids_issued",
            "kame_svids_issued_total",
            &[("type", "jwt")]
        ) >= 1.0
    );
    assert_eq!(
        sample(
            "kame_node_attestations",
            "kame_node_attestations_total",
            &[("attestor", "join_token"), ("result", "ok")]
        ),
        1.0
    );
    assert_eq!(
        sample("kame_entry_cache_agents", "kame_entry_cache_agents", &[]),
        1.0
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        sample(
            "kame_ca_authority_expiry_timestamp_seconds",
            "kame_ca_authority_expiry_timestamp_seconds",
            &[("kind", "x509"), ("slot", "current")]
        ) > now
    );
    assert_eq!(sample("kame_build_info", "kame_build_info", &[]), 1.0);
    assert!(fams.get("kame_keymanager_keys").is_some());
    assert!(fams.get("kame_ratelimit_refused").is_some(), "{fams}");
    // The key gauge follows a new key at once, not at the next hourly reconcile.
    let named = |f: &serde_json::Value| {
        value(
            f,
            "kame_keymanager_keys",
            "kame_keymanager_keys",
            &[("state", "named")],
        )
    };
    let before = named(&fams);
    assert!(run_cli(&["localauthority", "x509", "prepare", "-socketPath", &sock]).0);
    assert_eq!(named(&scrape()), before + 1.0);

    // The agent's own /metrics (SPIRE's agent telemetry block).
    let agent = scrape_at(amp);
    assert_eq!(
        value(&agent, "kame_agent_attested", "kame_agent_attested", &[]),
        1.0
    );
    assert!(
        value(
            &agent,
            "kame_agent_syncs",
            "kame_agent_syncs_total",
            &[("result", "ok")]
        ) >= 1.0
    );
    assert!(
        value(
            &agent,
            "kame_agent_svid_expiry_timestamp_seconds",
            "kame_agent_svid_expiry_timestamp_seconds",
            &[]
        ) > now
    );
}

/// SPIRE's `run` flags over the configuration file (`-logLevel`, `-logFile`, `-socketPath`,
/// `-serverPort`, `-dataDir`), `logger get|set|reset` on the running server (SPIRE's output,
/// bad levels refused), `audit_log_enabled` writing one event per call with the caller, and
/// `-instance` choosing the socket from SPIRE's template variable.
#[test]
fn operator_run_flags_logger_commands_audit_log_and_instance_socket() {
    use std::os::unix::fs::MetadataExt as _;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let conf = d.join("server.conf");
    // The file says WARN, another socket, port and data_dir: the flags win.
    std::fs::write(
        &conf,
        config_text(d, 1, &Opts::default()).replace(
            "log_level = \"WARN\"",
            "log_level = \"WARN\"\n    audit_log_enabled = true",
        ),
    )
    .unwrap();
    // The datastore and keys stay where the file puts them.
    std::fs::create_dir_all(d.join("data")).unwrap();
    let log = d.join("flags.log");
    let socket = d.join("inst-a/api.sock");
    let port = free_port().to_string();
    let _server = Child(
        Command::new(server_bin())
            .args(["run", "-config"])
            .arg(&conf)
            .args(["-logLevel", "INFO", "-logFile"])
            .arg(&log)
            .arg("-socketPath")
            .arg(&socket)
            .args(["-serverPort", &port, "-dataDir"])
            .arg(d.join("data2"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("stderr.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_healthy(&socket);
    assert!(d.join("data2").is_dir(), "-dataDir used");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).is_ok(),
        "-serverPort used"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("kame-server started"),
        "-logLevel INFO: {text}"
    );

    let s = socket.display().to_string();
    let (ok, out, err) = run_cli(&["logger", "get", "-socketPath", &s]);
    assert!(ok, "{err}");
    assert_eq!(out, "Logger Level : info\nLaunch Level : info\n\n");
    let (ok, out, err) = run_cli(&["logger", "set", "-level", "debug", "-socketPath", &s]);
    assert!(ok, "{err}");
    assert_eq!(out, "Logger Level : debug\nLaunch Level : info\n\n");
    let (ok, out, _) = run_cli(&["logger", "get", "-output", "json", "-socketPath", &s]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"current_level": "DEBUG", "launch_level": "INFO"})
    );
    let (ok, _, err) = run_cli(&["logger", "set", "-level", "LOUD", "-socketPath", &s]);
    assert!(
        !ok && err.contains("\"LOUD\" is not a valid setting"),
        "{err}"
    );
    let (ok, out, _) = run_cli(&["logger", "reset", "-socketPath", &s]);
    assert!(ok);
    assert_eq!(out, "Logger Level : info\nLaunch Level : info\n\n");

    // Audit events: who called what, and how it ended.
    let (ok, _, _) = run_cli(&["entry", "show", "-socketPath", &s]);
    assert!(ok);
    let (ok, _, err) = run_cli(&["entry", "show", "-entryID", "nope", "-socketPath", &s]);
    assert!(!ok && err.contains("NotFound"), "{err}");
    let uid = std::fs::metadata(d).unwrap().uid().to_string();
    let text = std::fs::read_to_string(&log).unwrap();
    let audit: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("kame_audit") && l.contains("API accessed"))
        .collect();
    assert!(
        audit.iter().any(|l| l.contains("method=\"ListEntries\"")
            && l.contains("status=\"success\"")
            && l.contains(&format!("caller_uid={uid}"))
            && l.contains("caller_path=")
            && l.contains("kame-server")
            && l.contains("request_id=")),
        "{text}"
    );
    assert!(
        audit.iter().any(|l| l.contains("method=\"GetEntry\"")
            && l.contains("status=\"error\"")
            && l.contains("status_code=\"NotFound\"")),
        "{text}"
    );
    assert!(
        audit.iter().any(|l| l.contains("method=\"SetLogLevel\"")),
        "{text}"
    );

    // -instance: the socket from SPIRE's template variable; without it, the variable named.
    healthcheck_finds_socket_as_spire_does(
        Path::new(server_bin()),
        "SPIRE_SERVER_PRIVATE_SOCKET",
        &d.join("inst-%i/api.sock"),
        "a",
        &socket,
    );
    let o = Command::new(server_bin())
        .args(["healthcheck", "-instance", "a"])
        .env_remove("SPIRE_SERVER_PRIVATE_SOCKET_TEMPLATE")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("SPIRE_SERVER_PRIVATE_SOCKET_TEMPLATE must be set"),
        "{e}"
    );
    // A flag SPIRE has and a bad value: refused before anything starts, naming the key.
    let (ok, _, err) = run_cli(&[
        "validate",
        "-config",
        &conf.display().to_string(),
        "-logLevel",
        "LOUD",
    ]);
    assert!(!ok && err.contains("server.log_level"), "{err}");
}

/// The agent as SPIRE's users run it: `run` with SPIRE's flags over its file (`-joinToken`,
/// `-serverPort`, `-socketPath`, `-dataDir`, `-logLevel`), SPIRE's flags it lacks refused by
/// name, `api fetch jwt` printing the JWT bundles too, `-output json` on `api fetch` and
/// `api validate` in SPIRE's shape, and `-instance` from SPIRE's template variable.
#[test]
fn operator_agent_run_flags_and_api_output_as_spire_prints_it() {
    use std::os::unix::fs::MetadataExt as _;
    let (dir, conf, socket) = server_dir();
    let _server = spawn_server(dir.path(), &conf, "server.log");
    wait_healthy(&socket);
    let s = socket.display().to_string();
    let bundle = cli(&["bundle", "show", "-socketPath", &s]);
    assert!(bundle.status.success());
    let (ok, out, err) = run_cli(&["token", "generate", "-socketPath", &s]);
    assert!(ok, "{err}");
    let token = out
        .split_whitespace()
        .last()
        .unwrap_or_default()
        .to_string();
    let uid = std::fs::metadata(dir.path()).unwrap().uid();
    let (ok, _, err) = run_cli(&[
        "entry",
        "create",
        "-socketPath",
        &s,
        "-parentID",
        &format!("spiffe://{TD}/spire/agent/join_token/{token}"),
        "-spiffeID",
        &format!("spiffe://{TD}/me"),
        "-selector",
        &format!("unix:uid:{uid}"),
    ]);
    assert!(ok, "{err}");
    let port = port_of(&conf);
    // The file points elsewhere; the flags say where things are.
    let a = agent_dir(
        dir.path(),
        &bundle.stdout,
        "    data_dir = \"{d}/unused\"\n    server_port = \"1\"\n    socket_path = \"{d}/unused.sock\"\n    log_level = \"ERROR\"",
        "",
    );
    let agent_conf = a.join("agent.conf").display().to_string();
    let o = Command::new(agent_bin())
        .args(["validate", "-config", &agent_conf, "-insecureBootstrap"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("agent.insecure_bootstrap") && e.contains("SPIRE"),
        "{e}"
    );
    let wl = a.join("inst-w/api.sock");
    let _agent = Child(
        Command::new(agent_bin())
            .args(["run", "-config", &agent_conf, "-joinToken", &token])
            .args(["-serverPort", &port, "-socketPath"])
            .arg(&wl)
            .arg("-dataDir")
            .arg(a.join("data"))
            .args(["-logLevel", "INFO"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(a.join("agent.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let w = wl.display().to_string();
    let agent = |args: &[&str]| {
        let o = Command::new(agent_bin()).args(args).output().unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let t = Instant::now();
    let x509 = loop {
        let (ok, out, err) = agent(&["api", "fetch", "x509", "-socketPath", &w, "-output", "json"]);
        if ok {
            break out;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{err}\n{}",
            std::fs::read_to_string(a.join("agent.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(a.join("data").is_dir(), "-dataDir used");
    let log = std::fs::read_to_string(a.join("agent.log")).unwrap();
    assert!(
        log.contains(" INFO "),
        "-logLevel INFO over the file's ERROR: {log}"
    );
    let v: serde_json::Value = serde_json::from_str(&x509).unwrap();
    assert_eq!(v["svids"][0]["spiffe_id"], format!("spiffe://{TD}/me"));
    for k in ["x509_svid", "x509_svid_key", "bundle"] {
        let b = v["svids"][0][k].as_str().unwrap();
        assert!(
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b).is_ok(),
            "{k}"
        );
    }
    assert!(
        v["federated_bundles"].is_object() && v["crl"].is_array(),
        "{v}"
    );

    let (ok, out, err) = agent(&["api", "fetch", "jwt", "-audience", "aud", "-socketPath", &w]);
    assert!(ok, "{err}");
    let token_line = out.lines().nth(1).unwrap_or_default().trim().to_string();
    assert!(
        out.starts_with(&format!("token(spiffe://{TD}/me):\n\t")),
        "{out}"
    );
    let bundle_at = out
        .find(&format!("bundle(spiffe://{TD}):\n\t"))
        .unwrap_or_else(|| panic!("no JWT bundle printed: {out}"));
    let jwks: serde_json::Value =
        serde_json::from_str(out[bundle_at..].lines().nth(1).unwrap().trim()).unwrap();
    assert!(jwks["keys"].is_array(), "{jwks}");
    let (ok, out, _) = agent(&[
        "api",
        "fetch",
        "jwt",
        "-audience",
        "aud",
        "-socketPath",
        &w,
        "-output",
        "json",
    ]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["svids"][0]["spiffe_id"], format!("spiffe://{TD}/me"));
    assert!(v[1]["bundles"][format!("spiffe://{TD}")].is_string(), "{v}");

    let (ok, out, err) = agent(&[
        "api",
        "validate",
        "jwt",
        "-audience",
        "aud",
        "-svid",
        &token_line,
        "-socketPath",
        &w,
    ]);
    assert!(ok, "{err}");
    assert!(out.starts_with("SVID is valid.\nSPIFFE ID : "), "{out}");
    let claims = out
        .lines()
        .find_map(|l| l.strip_prefix("Claims    : "))
        .unwrap();
    let claims: serde_json::Value = serde_json::from_str(claims).unwrap();
    assert_eq!(claims["sub"], format!("spiffe://{TD}/me"));
    let (ok, out, _) = agent(&[
        "api",
        "validate",
        "jwt",
        "-audience",
        "aud",
        "-svid",
        &token_line,
        "-socketPath",
        &w,
        "-output",
        "json",
    ]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["spiffe_id"], format!("spiffe://{TD}/me"));
    let (ok, _, err) = agent(&[
        "api",
        "validate",
        "jwt",
        "-audience",
        "other",
        "-svid",
        &token_line,
        "-socketPath",
        &w,
    ]);
    assert!(!ok && err.contains("SVID is not valid"), "{err}");

    // -instance, and SPIRE's socket variable.
    healthcheck_finds_socket_as_spire_does(
        &agent_bin(),
        "SPIRE_AGENT_PUBLIC_SOCKET",
        &a.join("inst-%i/api.sock"),
        "w",
        &wl,
    );
}

/// `bin healthcheck` finds `socket` through SPIRE's variables: `-instance` in `<var>_TEMPLATE`
/// (`template` holds `%i`), and `<var>` itself.
fn healthcheck_finds_socket_as_spire_does(
    bin: &Path,
    var: &str,
    template: &Path,
    instance: &str,
    socket: &Path,
) {
    let o = Command::new(bin)
        .args(["healthcheck", "-instance", instance])
        .env(format!("{var}_TEMPLATE"), template)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new(bin)
        .args(["healthcheck"])
        .env(var, socket)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
