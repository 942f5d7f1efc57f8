//! The `unix` workload attestor: turns the kernel's facts about a caller (SO_PEERCRED pid and
//! ids, then `/proc/<pid>`) into SPIRE's `unix:` selectors. A pid that exits or is reused
//! while it is being examined yields no identity, never someone else's: the process must have
//! started before the connection was accepted, keep the same start time throughout, and have
//! the ids the kernel reported for the socket. Nor does a process that execs another binary
//! after it connected (handing the connection to a child first) get that binary's identity:
//! the executable (device and inode of `/proc/<pid>/exe`) is recorded when the connection is
//! accepted, and attestation is refused when the process runs another one, or when the binary
//! hashed is not that one. What remains (as in SPIRE): a process that execs between its
//! connect() and the agent's accept() is seen as the new binary. It reads `/proc` and
//! `/etc/{passwd,group}` only.

use crate::config::UnixAttestorConfig;
use kame_api::pb::types::Selector;
use sha2::Digest;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Linux reports /proc times in USER_HZ, which is 100 on every architecture.
const USER_HZ: f64 = 100.0;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AttestorError {
    #[error("the caller's credentials are not available on this socket")]
    NoPeerCredentials,
    #[error("process {0} exited during attestation")]
    ProcessExited(i32),
    #[error("process {0} started after the connection was accepted (pid reused)")]
    PidReused(i32),
    #[error("process {0} changed credentials since it connected")]
    CredentialsChanged(i32),
    #[error("process {0} runs another executable than when it connected (exec after connect)")]
    ExecutableChanged(i32),
    #[error("the executable of process {0} could not be read when it connected")]
    ExecutableNotRecorded(i32),
    #[error("cannot read {what} of process {pid}: {msg}")]
    Proc {
        pid: i32,
        what: &'static str,
        msg: String,
    },
    #[error("workload binary of process {pid} is {size} bytes, over workload_size_limit {limit}")]
    TooLarge { pid: i32, size: u64, limit: u64 },
}

/// What the Workload API's socket knows about a caller.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since boot when the connection was accepted (from /proc/uptime).
    pub accepted_at: Option<f64>,
    /// The executable the process ran when the connection was accepted.
    pub exe: Option<ExeId>,
}

/// What identifies an executable: the device and inode of the binary `/proc/<pid>/exe` names
/// (the file the process runs, even if its path has since been replaced or deleted).
pub type ExeId = (u64, u64);

/// The executable process `pid` runs now, under `root` (`/proc`).
pub fn exe_id(root: &Path, pid: i32) -> Option<ExeId> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(root.join(pid.to_string()).join("exe")).ok()?;
    Some((m.dev(), m.ino()))
}

/// Seconds since boot, from /proc/uptime.
pub fn uptime() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/uptime").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// The process start time in USER_HZ ticks since boot (field 22 of /proc/<pid>/stat).
fn start_time(root: &Path, pid: i32) -> Result<u64, AttestorError> {
    let stat = std::fs::read_to_string(root.join(pid.to_string()).join("stat"))
        .map_err(|_| AttestorError::ProcessExited(pid))?;
    // comm (field 2) is in parentheses and may hold anything: fields resume after the last ')'.
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or_else(|| proc_err(pid, "stat", "malformed"))?;
    rest.split_whitespace()
        .nth(19)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| proc_err(pid, "stat", "no start time"))
}

fn proc_err(pid: i32, what: &'static str, msg: impl Into<String>) -> AttestorError {
    AttestorError::Proc {
        pid,
        what,
        msg: msg.into(),
    }
}

struct Status {
    euid: u32,
    egid: u32,
    groups: Vec<u32>,
}

fn status(root: &Path, pid: i32) -> Result<Status, AttestorError> {
    let text = std::fs::read_to_string(root.join(pid.to_string()).join("status"))
        .map_err(|_| AttestorError::ProcessExited(pid))?;
    let field = |name: &str| -> Option<Vec<u32>> {
        text.lines().find_map(|l| l.strip_prefix(name)).map(|v| {
            v.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
    };
    let uids = field("Uid:").ok_or_else(|| proc_err(pid, "status", "no Uid"))?;
    let gids = field("Gid:").ok_or_else(|| proc_err(pid, "status", "no Gid"))?;
    Ok(Status {
        euid: *uids
            .get(1)
            .ok_or_else(|| proc_err(pid, "status", "bad Uid"))?,
        egid: *gids
            .get(1)
            .ok_or_else(|| proc_err(pid, "status", "bad Gid"))?,
        groups: field("Groups:").unwrap_or_default(),
    })
}

/// The name for `id` in an /etc/passwd- or /etc/group-style file.
fn name_for(file: &Path, id: u32) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let _pw = f.next()?;
        (f.next()?.parse::<u32>().ok()? == id).then(|| name.to_string())
    })
}

/// Workload attestations run at once, at most (each reads /proc and may hash the caller's
/// binary on a blocking thread): more callers wait their turn.
pub const CONCURRENT: usize = 8;

/// Where the attestor looks: `/proc` and `/etc` normally; tests point it elsewhere.
#[derive(Debug)]
pub struct UnixAttestor {
    pub config: UnixAttestorConfig,
    pub proc_root: PathBuf,
    pub etc_root: PathBuf,
    /// sha256 of binaries by file identity (device, inode, size, mtime, ctime): the kernel
    /// changes ctime on every write, so a modified binary is hashed again.
    hashes: std::sync::Mutex<std::collections::HashMap<FileIdentity, String>>,
}

/// (device, inode, size, mtime s, mtime ns, ctime s, ctime ns) of a binary.
type FileIdentity = (u64, u64, u64, i64, i64, i64, i64);

/// How many binary hashes are remembered.
const HASH_CACHE: usize = 1024;

fn sel(value: String) -> Selector {
    Selector {
        r#type: "unix".into(),
        value,
    }
}

impl UnixAttestor {
    pub fn new(config: UnixAttestorConfig) -> Self {
        UnixAttestor {
            config,
            proc_root: "/proc".into(),
            etc_root: "/etc".into(),
            hashes: Default::default(),
        }
    }

    /// The caller's `unix:` selectors.
    pub fn attest(&self, peer: &Peer) -> Result<Vec<Selector>, AttestorError> {
        let pid = peer.pid;
        if pid <= 0 {
            return Err(AttestorError::NoPeerCredentials);
        }
        let started = start_time(&self.proc_root, pid)?;
        if let Some(acc) = peer.accepted_at {
            // One tick of slack for rounding between the two clocks' readings.
            if started as f64 > (acc * USER_HZ).ceil() + 1.0 {
                return Err(AttestorError::PidReused(pid));
            }
        }
        let st = status(&self.proc_root, pid)?;
        if st.euid != peer.uid || st.egid != peer.gid {
            return Err(AttestorError::CredentialsChanged(pid));
        }
        // path and sha256 name a binary: without the one recorded at accept there is nothing
        // to hold the binary read now to (a process can make /proc/<pid>/exe unreadable until
        // it execs, with PR_SET_DUMPABLE).
        if self.config.discover_workload_path && peer.exe.is_none() {
            return Err(AttestorError::ExecutableNotRecorded(pid));
        }
        let same_exe = |id: Option<ExeId>| match peer.exe {
            Some(at_accept) if id != Some(at_accept) => Err(AttestorError::ExecutableChanged(pid)),
            _ => Ok(()),
        };
        same_exe(exe_id(&self.proc_root, pid))?;
        let passwd = self.etc_root.join("passwd");
        let group = self.etc_root.join("group");
        let mut out = vec![sel(format!("uid:{}", st.euid))];
        if let Some(n) = name_for(&passwd, st.euid) {
            out.push(sel(format!("user:{n}")));
        }
        out.push(sel(format!("gid:{}", st.egid)));
        if let Some(n) = name_for(&group, st.egid) {
            out.push(sel(format!("group:{n}")));
        }
        for g in &st.groups {
            out.push(sel(format!("supplementary_gid:{g}")));
            if let Some(n) = name_for(&group, *g) {
                out.push(sel(format!("supplementary_group:{n}")));
            }
        }
        if self.config.discover_workload_path {
            let exe = self.proc_root.join(pid.to_string()).join("exe");
            let path = std::fs::read_link(&exe).map_err(|e| proc_err(pid, "exe", e.to_string()))?;
            out.push(sel(format!("path:{}", path.display())));
            // Hash through /proc/<pid>/exe: the binary the process runs, even if the path
            // has since been replaced.
            let f = std::fs::File::open(&exe).map_err(|e| proc_err(pid, "exe", e.to_string()))?;
            let meta = f
                .metadata()
                .map_err(|e| proc_err(pid, "exe", e.to_string()))?;
            use std::os::unix::fs::MetadataExt;
            // The binary opened is the one the connection was made with (an exec since the
            // check above would swap it).
            same_exe(Some((meta.dev(), meta.ino())))?;
            let size = meta.len();
            let limit = self.config.workload_size_limit;
            if limit > 0 && size > limit {
                return Err(AttestorError::TooLarge { pid, size, limit });
            }
            let key = (
                meta.dev(),
                meta.ino(),
                size,
                meta.mtime(),
                meta.mtime_nsec(),
                meta.ctime(),
                meta.ctime_nsec(),
            );
            let cached = self.hashes.lock().ok().and_then(|h| h.get(&key).cloned());
            let digest = match cached {
                Some(d) => d,
                None => {
                    let mut h = sha2::Sha256::new();
                    let mut r = std::io::BufReader::new(f);
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = r
                            .read(&mut buf)
                            .map_err(|e| proc_err(pid, "exe", e.to_string()))?;
                        if n == 0 {
                            break;
                        }
                        h.update(&buf[..n]);
                    }
                    let d = hex::encode(h.finalize());
                    if let Ok(mut m) = self.hashes.lock() {
                        if m.len() >= HASH_CACHE {
                            m.clear();
                        }
                        m.insert(key, d.clone());
                    }
                    d
                }
            };
            out.push(sel(format!("sha256:{digest}")));
        }
        // Still the same process, running the same binary, at the end: otherwise what was
        // read may be another's.
        match start_time(&self.proc_root, pid) {
            Ok(t) if t == started => {}
            _ => return Err(AttestorError::ProcessExited(pid)),
        }
        same_exe(exe_id(&self.proc_root, pid))?;
        Ok(out)
    }
}

/// Whether an entry with `entry` selectors matches a workload with `workload` selectors (the
/// entry's selectors are a subset of the workload's).
pub fn matches(entry: &[Selector], workload: &[Selector]) -> bool {
    !entry.is_empty()
        && entry.iter().all(|e| {
            workload
                .iter()
                .any(|w| w.r#type == e.r#type && w.value == e.value)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Peer {
        let st = status(Path::new("/proc"), std::process::id() as i32).unwrap();
        let pid = std::process::id() as i32;
        Peer {
            pid,
            uid: st.euid,
            gid: st.egid,
            accepted_at: uptime(),
            exe: exe_id(Path::new("/proc"), pid),
        }
    }

    fn values(s: &[Selector]) -> Vec<String> {
        s.iter().map(|s| s.value.clone()).collect()
    }

    #[test]
    fn unix_attestor_reports_uid_gid_names_path_and_sha256_of_this_process() {
        let a = UnixAttestor::new(UnixAttestorConfig {
            discover_workload_path: true,
            workload_size_limit: 0,
        });
        let p = me();
        let s = a.attest(&p).unwrap();
        let v = values(&s);
        assert!(v.contains(&format!("uid:{}", p.uid)), "{v:?}");
        assert!(v.contains(&format!("gid:{}", p.gid)), "{v:?}");
        if p.uid == 0 {
            assert!(v.contains(&"user:root".to_string()), "{v:?}");
        }
        let exe = std::env::current_exe().unwrap();
        assert!(v.contains(&format!("path:{}", exe.display())), "{v:?}");
        let digest = hex::encode(sha2::Sha256::digest(std::fs::read(&exe).unwrap()));
        assert!(v.contains(&format!("sha256:{digest}")), "{v:?}");
        assert!(s.iter().all(|s| s.r#type == "unix"));
    }

    #[test]
    fn unix_attestor_size_limit_refuses_large_binaries() {
        let a = UnixAttestor::new(UnixAttestorConfig {
            discover_workload_path: true,
            workload_size_limit: 16,
        });
        assert!(matches!(
            a.attest(&me()),
            Err(AttestorError::TooLarge { .. })
        ));
    }

    #[test]
    fn unix_attestor_refuses_exited_reused_and_changed_processes() {
        let a = UnixAttestor::new(UnixAttestorConfig {
            discover_workload_path: false,
            workload_size_limit: 0,
        });
        // A process that has exited.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        let p = Peer { pid, ..me() };
        assert_eq!(a.attest(&p), Err(AttestorError::ProcessExited(pid)));
        // A process that started after the connection was accepted (pid reuse).
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let p = Peer {
            pid: child.id() as i32,
            accepted_at: Some(0.0),
            ..me()
        };
        assert_eq!(a.attest(&p), Err(AttestorError::PidReused(p.pid)));
        child.kill().unwrap();
        child.wait().unwrap();
        // Credentials other than those the socket reported.
        let p = Peer {
            uid: me().uid + 1,
            ..me()
        };
        assert_eq!(a.attest(&p), Err(AttestorError::CredentialsChanged(p.pid)));
        assert_eq!(
            a.attest(&Peer { pid: 0, ..me() }),
            Err(AttestorError::NoPeerCredentials)
        );
    }

    #[test]
    fn unix_attestor_refuses_a_process_that_execd_since_it_connected() {
        for discover_workload_path in [false, true] {
            let a = UnixAttestor::new(UnixAttestorConfig {
                discover_workload_path,
                workload_size_limit: 0,
            });
            // `sh` recorded at accept; it then execs `sleep`.
            let mut child = std::process::Command::new("sh")
                .args(["-c", "read x; exec sleep 5"])
                .stdin(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let pid = child.id() as i32;
            let at_accept = loop {
                let id = exe_id(Path::new("/proc"), pid);
                if id.is_some() {
                    break id;
                }
            };
            let p = Peer {
                pid,
                exe: at_accept,
                ..me()
            };
            assert!(a.attest(&p).is_ok(), "still sh");
            use std::io::Write;
            child.stdin.take().unwrap().write_all(b"go\n").unwrap();
            let sleep = std::fs::metadata("/bin/sleep").unwrap();
            use std::os::unix::fs::MetadataExt;
            while exe_id(Path::new("/proc"), pid) != Some((sleep.dev(), sleep.ino())) {
                std::thread::yield_now();
            }
            assert_eq!(a.attest(&p), Err(AttestorError::ExecutableChanged(pid)));
            child.kill().unwrap();
            child.wait().unwrap();
        }
        // Nothing recorded at accept: path and sha256 are not given.
        let a = UnixAttestor::new(UnixAttestorConfig {
            discover_workload_path: true,
            workload_size_limit: 0,
        });
        let p = Peer { exe: None, ..me() };
        assert_eq!(
            a.attest(&p),
            Err(AttestorError::ExecutableNotRecorded(p.pid))
        );
    }

    #[test]
    fn unix_attestor_names_come_from_passwd_and_group() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("passwd"),
            "alice:x:4242:4343::/home/a:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(d.path().join("group"), "staff:x:4343:\n").unwrap();
        assert_eq!(
            name_for(&d.path().join("passwd"), 4242).as_deref(),
            Some("alice")
        );
        assert_eq!(
            name_for(&d.path().join("group"), 4343).as_deref(),
            Some("staff")
        );
        assert_eq!(name_for(&d.path().join("group"), 1), None);
    }

    #[test]
    fn selectors_match_when_entry_is_a_subset() {
        let s = |v: &str| sel(v.to_string());
        let w = vec![s("uid:1000"), s("gid:1000")];
        assert!(matches(&[s("uid:1000")], &w));
        assert!(matches(&[s("uid:1000"), s("gid:1000")], &w));
        assert!(!matches(&[s("uid:1000"), s("gid:0")], &w));
        assert!(!matches(&[], &w));
    }
}
