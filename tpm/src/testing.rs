//! Test support: a freshly manufactured software TPM (swtpm with EK and platform certificates)
//! started on a free 127.0.0.1 port for one test and stopped when dropped. It drives the
//! `swtpm/manufacture`, `swtpm/start` and `swtpm/stop` scripts of this repository.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A running swtpm in its own temporary directory.
pub struct SwTpm {
    dir: tempfile::TempDir,
    /// TCTI string, e.g. `swtpm:host=127.0.0.1,port=12345`.
    pub tcti: String,
}

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../swtpm")
}

fn run(cmd: &mut Command, what: &str) -> std::io::Result<Output> {
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(out)
}

impl SwTpm {
    /// Manufactures (EK certificates, platform certificate, sha256+sha384 banks) and starts a TPM.
    pub fn start() -> std::io::Result<SwTpm> {
        let dir = tempfile::Builder::new().prefix("kame-swtpm-").tempdir()?;
        run(
            Command::new(scripts().join("manufacture")).arg(dir.path()),
            "swtpm/manufacture",
        )?;
        let out = run(
            Command::new(scripts().join("start")).arg(dir.path()),
            "swtpm/start",
        )?;
        let tcti = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok(SwTpm { dir, tcti })
    }

    /// Power-cycles the TPM (stop, start on the same state: a TPM Reset, so resetCount grows
    /// and PCRs are cleared); the TCTI changes with the new port.
    pub fn restart(&mut self) -> std::io::Result<()> {
        run(
            Command::new(scripts().join("stop")).arg(self.dir.path()),
            "swtpm/stop",
        )?;
        let out = run(
            Command::new(scripts().join("start")).arg(self.dir.path()),
            "swtpm/start",
        )?;
        self.tcti = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok(())
    }

    /// The directory with the TPM state and the EK CA certificates
    /// (`ek-root-ca.pem`, `ek-intermediate-ca.pem`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs a tpm2-tools command against this TPM (working directory: the TPM's directory),
    /// then flushes transient objects: swtpm has no resource manager and only three transient
    /// slots, and tpm2-tools keeps objects in files as saved contexts.
    pub fn tpm2(&self, tool: &str, args: &[&str]) -> std::io::Result<Output> {
        let out = self.raw_tpm2(tool, args);
        if tool != "tpm2_flushcontext" {
            let _ = self.raw_tpm2("tpm2_flushcontext", &["-t"]);
        }
        out
    }

    /// Runs a tpm2-tools command without flushing transient objects afterwards.
    pub fn raw(&self, tool: &str, args: &[&str]) -> std::io::Result<Output> {
        self.raw_tpm2(tool, args)
    }

    fn raw_tpm2(&self, tool: &str, args: &[&str]) -> std::io::Result<Output> {
        run(
            Command::new(tool)
                .args(args)
                .current_dir(self.dir.path())
                .env("TPM2TOOLS_TCTI", &self.tcti)
                .env("TSS2_LOG", "all+NONE"),
            tool,
        )
    }

    /// Reads a file from the TPM's directory.
    pub fn read(&self, name: &str) -> std::io::Result<Vec<u8>> {
        std::fs::read(self.dir.path().join(name))
    }

    pub fn write(&self, name: &str, data: &[u8]) -> std::io::Result<()> {
        std::fs::write(self.dir.path().join(name), data)
    }
}

impl Drop for SwTpm {
    fn drop(&mut self) {
        let _ = Command::new(scripts().join("stop"))
            .arg(self.dir.path())
            .output();
    }
}

/// A TCP proxy in front of a [`SwTpm`] that records the code of every TPM command sent
/// through it: how a test measures what a flow costs in TPM commands. Clients use its
/// [`CommandCounter::tcti`]; the data port is parsed as raw TPM command frames (what the
/// `swtpm` TCTI sends: a 10-byte header whose bytes 2..6 are the size and 6..10 the command
/// code), the control port next to it is passed through. Stopped when dropped.
pub struct CommandCounter {
    /// TCTI string of the proxy, e.g. `swtpm:host=127.0.0.1,port=23456`.
    pub tcti: String,
    codes: std::sync::Arc<std::sync::Mutex<Vec<u32>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ports: [u16; 2],
}

impl CommandCounter {
    /// Starts a proxy for the swtpm whose TCTI is `swtpm:host=127.0.0.1,port=P`.
    pub fn start(tpm: &SwTpm) -> std::io::Result<CommandCounter> {
        use std::net::TcpListener;
        let upstream: u16 = tpm
            .tcti
            .rsplit("port=")
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("no port in {}", tpm.tcti)))?;
        // Two neighbouring free ports (the TCTI derives the control port as port + 1).
        let (data, ctrl) = (0..100)
            .find_map(|_| {
                let a = TcpListener::bind("127.0.0.1:0").ok()?;
                let p = a.local_addr().ok()?.port();
                let b = TcpListener::bind(("127.0.0.1", p.checked_add(1)?)).ok()?;
                Some((a, b))
            })
            .ok_or_else(|| std::io::Error::other("no two neighbouring free ports"))?;
        let ports = [data.local_addr()?.port(), ctrl.local_addr()?.port()];
        let codes = std::sync::Arc::new(std::sync::Mutex::new(vec![]));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        for (listener, up, parse) in [(data, upstream, true), (ctrl, upstream + 1, false)] {
            let codes = codes.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = client else { continue };
                    let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", up)) else {
                        continue;
                    };
                    proxy(client, server, parse.then(|| codes.clone()));
                }
            });
        }
        Ok(CommandCounter {
            tcti: format!("swtpm:host=127.0.0.1,port={}", ports[0]),
            codes,
            stop,
            ports,
        })
    }

    /// The command codes seen so far, in order.
    pub fn codes(&self) -> Vec<u32> {
        self.codes.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Forgets the commands seen so far.
    pub fn reset(&self) {
        if let Ok(mut c) = self.codes.lock() {
            c.clear();
        }
    }
}

impl Drop for CommandCounter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for p in self.ports {
            // Wakes the accept loop so that it sees `stop`.
            let _ = std::net::TcpStream::connect(("127.0.0.1", p));
        }
    }
}

/// Copies both ways between `client` and `server`; with `codes`, the client's bytes are read
/// as TPM command frames and each command code recorded before it is forwarded.
fn proxy(
    client: std::net::TcpStream,
    server: std::net::TcpStream,
    codes: Option<std::sync::Arc<std::sync::Mutex<Vec<u32>>>>,
) {
    use std::io::{Read, Write};
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let (Ok(mut c_read), Ok(mut s_write)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let (mut s_read, mut c_write) = (server, client);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut s_read, &mut c_write);
        let _ = c_write.shutdown(std::net::Shutdown::Both);
    });
    std::thread::spawn(move || {
        match codes {
            None => {
                let _ = std::io::copy(&mut c_read, &mut s_write);
            }
            Some(codes) => loop {
                let mut header = [0u8; 10];
                if c_read.read_exact(&mut header).is_err() {
                    break;
                }
                let size = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
                let code = u32::from_be_bytes([header[6], header[7], header[8], header[9]]);
                let mut frame = vec![0u8; (size as usize).max(10)];
                frame[..10].copy_from_slice(&header);
                if c_read.read_exact(&mut frame[10..]).is_err() {
                    break;
                }
                if let Ok(mut c) = codes.lock() {
                    c.push(code);
                }
                // In one write: swtpm takes what one read returns as the whole command.
                if s_write.write_all(&frame).is_err() {
                    break;
                }
            },
        }
        let _ = s_write.shutdown(std::net::Shutdown::Write);
    });
}

/// The name of a TPM 2.0 command code (TPM 2.0 Part 2, Table 12), for reports.
pub fn command_name(code: u32) -> String {
    let name = match code {
        0x120 => "EvictControl",
        0x131 => "CreatePrimary",
        0x147 => "ActivateCredential",
        0x148 => "Certify",
        0x14E => "NV_Read",
        0x151 => "PolicySecret",
        0x153 => "Create",
        0x157 => "Load",
        0x158 => "Quote",
        0x15D => "Sign",
        0x161 => "ContextLoad",
        0x162 => "ContextSave",
        0x165 => "FlushContext",
        0x169 => "NV_ReadPublic",
        0x16C => "PolicyCommandCode",
        0x171 => "PolicyOR",
        0x173 => "ReadPublic",
        0x176 => "StartAuthSession",
        0x17A => "GetCapability",
        0x17B => "GetRandom",
        0x17E => "PCR_Read",
        _ => return format!("{code:#x}"),
    };
    name.to_string()
}
