//! Issue 19 item 5: an HPACK decompression bomb on the Workload API socket. One 4 KiB entry in
//! the HPACK dynamic table referenced a quarter of a million times is a 256 KiB header block
//! that decodes to about 1 GiB. The real `kame-agent` binary must refuse it while its peak
//! resident memory stays under 64 MiB, and keep serving.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(ty: u8, flags: u8, sid: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], ty, flags];
    f.extend_from_slice(&sid.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer with an `n`-bit prefix and the given first-byte flags (RFC 7541 §5.1).
fn hpack_int(flags: u8, n: u32, mut v: usize) -> Vec<u8> {
    let max = (1usize << n) - 1;
    if v < max {
        return vec![flags | v as u8];
    }
    let mut out = vec![flags | max as u8];
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
    out
}

/// HEADERS (+ CONTINUATION) frames of one header block on stream 1: a 4,000-byte header
/// literal added to the dynamic table, then `refs` references to it (one byte each: index 62).
fn bomb(refs: usize) -> Vec<u8> {
    let mut block = vec![];
    // Literal with incremental indexing, new name.
    block.push(0x40);
    block.extend(hpack_int(0, 7, 1));
    block.push(b'x');
    block.extend(hpack_int(0, 7, 4000));
    block.extend(std::iter::repeat_n(b'a', 4000));
    block.extend(std::iter::repeat_n(0x80 | 62, refs));
    let mut out = vec![];
    let mut chunks = block.chunks(16_384).peekable();
    let mut first = true;
    while let Some(c) = chunks.next() {
        let last = chunks.peek().is_none();
        let flags = if last { 0x4 } else { 0 };
        out.extend(frame(if first { 0x1 } else { 0x9 }, flags, 1, c));
        first = false;
    }
    out
}

fn kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn openssl_self_signed(dir: &Path) {
    let o = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-subj", "/CN=unused root", "-days", "1"])
        .arg("-keyout")
        .arg(dir.join("root.key"))
        .arg("-out")
        .arg(dir.join("bundle.pem"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn workload_api_hpack_bomb_is_refused_and_agent_rss_stays_under_64mib() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl_self_signed(d);
    let socket = d.join("public/api.sock");
    // No server: the agent keeps trying to attest, and serves the Workload API meanwhile.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        d.join("agent.conf"),
        format!(
            r#"agent {{
    data_dir = "{d}/data"
    server_address = "127.0.0.1"
    server_port = "{port}"
    socket_path = "{sock}"
    trust_bundle_path = "{d}/bundle.pem"
    trust_domain = "example.org"
    join_token = "unused"
    log_level = "ERROR"
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
"#,
            d = d.display(),
            sock = socket.display(),
        ),
    )
    .unwrap();
    let agent = Agent(
        std::process::Command::new(env!("CARGO_BIN_EXE_kame-agent"))
            .arg("run")
            .arg("--config")
            .arg(d.join("agent.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = agent.0.id();
    let start = Instant::now();
    while !socket.exists() {
        assert!(start.elapsed() < Duration::from_secs(20), "no socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));

    let mut s = UnixStream::connect(&socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut input = PREFACE.to_vec();
    input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    input.extend(bomb(250_000));
    // The agent may close the connection before it has read everything.
    let _ = s.write_all(&input);
    let mut sink = vec![];
    let _ = s.read_to_end(&mut sink);
    std::thread::sleep(Duration::from_millis(300));
    let peak = kib(pid, "VmHWM:");
    eprintln!("kame-agent peak resident memory after the bomb: {peak} KiB");
    assert!(
        peak < 64 * 1024,
        "kame-agent's peak resident memory reached {peak} KiB"
    );
    // The agent still serves: a fresh connection gets the server's SETTINGS.
    let mut s = UnixStream::connect(&socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(PREFACE).unwrap();
    s.write_all(&frame(0x4, 0, 0, &[])).unwrap();
    let mut head = [0u8; 9];
    s.read_exact(&mut head).unwrap();
    assert_eq!(head[3], 0x4, "a SETTINGS frame");
    drop(agent);
}
