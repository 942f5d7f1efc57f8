//! What the server and the agent share to serve: claiming a Unix socket path without taking
//! it from a live process, the lock that keeps two daemons off one `data_dir`, the HTTP/2
//! `:authority` adapter that lets gRPC C-core clients in (`h2fix`), the smallest HTTP/1.1 for
//! read-only endpoints (`httpmini`), SPIRE's health-check listener (`health`) and its Prometheus
//! endpoint (`prometheus`), and the logger (`logging`). It decides
//! no permissions (the callers set them) and knows nothing of what it serves.

pub mod h2fix;
pub mod health;
pub mod httpmini;
pub mod logging;
pub mod prometheus;

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum UdsError {
    #[error(
        "{path} is in use: a process answers on it (is another {what} running?); stop it or set another socket_path"
    )]
    InUse { path: String, what: String },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: String },
    #[error("cannot remove the stale socket {path}: {source}")]
    Stale {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("data_dir {path} is in use by another process (is another {what} running with it?)")]
    DataDirInUse { path: String, what: String },
    #[error("cannot lock data_dir {path}: {source}")]
    Lock {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A bound socket and the lock on `<path>.lock` that keeps another daemon from claiming the
/// same path while this one runs (held until dropped).
#[derive(Debug)]
pub struct ClaimedSocket {
    pub listener: tokio::net::UnixListener,
    pub lock: std::fs::File,
}

/// Binds a listener at `path`. First the lock on `<path>.lock` (another daemon holding it:
/// [`UdsError::InUse`]); then a socket file no process answers on (connection refused: left
/// by a crash) is replaced, one a process answers on is refused, naming `what` (the daemon)
/// as the likely owner, and one that cannot be tried (permissions) is refused with why;
/// anything that is not a socket is refused. Must run inside a Tokio runtime.
pub fn claim_socket(path: &Path, what: &str) -> Result<ClaimedSocket, UdsError> {
    use std::os::unix::fs::FileTypeExt;
    let shown = path.display().to_string();
    let in_use = || UdsError::InUse {
        path: shown.clone(),
        what: what.to_string(),
    };
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| UdsError::Bind {
            path: std::path::PathBuf::from(&lock_path).display().to_string(),
            source,
        })?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(in_use()),
        Err(std::fs::TryLockError::Error(source)) => {
            return Err(UdsError::Bind {
                path: shown,
                source,
            });
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            // A listening socket accepts the connection even when its process is stopped.
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(in_use()),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(source) => {
                    return Err(UdsError::Bind {
                        path: shown,
                        source,
                    });
                }
            }
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(UdsError::Stale {
                        path: shown,
                        source,
                    });
                }
            }
        }
        Ok(_) => return Err(UdsError::NotASocket { path: shown }),
        Err(_) => {}
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(|source| UdsError::Bind {
        path: shown,
        source,
    })?;
    Ok(ClaimedSocket { listener, lock })
}

/// An exclusive lock on `data_dir/.lock`, held until dropped (or the process ends, however
/// it ends).
#[derive(Debug)]
pub struct DataDirLock {
    _file: std::fs::File,
}

/// Takes the `data_dir` lock; another process holding it is [`UdsError::DataDirInUse`].
pub fn lock_data_dir(data_dir: &Path, what: &str) -> Result<DataDirLock, UdsError> {
    let shown = data_dir.display().to_string();
    let err = |source| UdsError::Lock {
        path: shown.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(data_dir.join(".lock"))
        .map_err(err)?;
    match file.try_lock() {
        Ok(()) => Ok(DataDirLock { _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => Err(UdsError::DataDirInUse {
            path: shown,
            what: what.to_string(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn uds_live_socket_refused_stale_replaced_file_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("api.sock");
        let live = claim_socket(&p, "test daemon").unwrap();
        let e = claim_socket(&p, "test daemon").unwrap_err();
        assert!(matches!(e, UdsError::InUse { .. }), "{e}");
        assert!(e.to_string().contains("another test daemon"), "{e}");
        // Without the lock (a daemon that predates it), a live socket is still refused.
        let ClaimedSocket { listener, lock } = live;
        drop(lock);
        let e = claim_socket(&p, "test daemon").unwrap_err();
        assert!(matches!(e, UdsError::InUse { .. }), "{e}");
        drop(listener);
        // The file stays behind, nobody answers: replaced.
        assert!(p.exists());
        let again = claim_socket(&p, "test daemon").unwrap();
        drop(again);
        let f = d.path().join("plain");
        std::fs::write(&f, b"x").unwrap();
        assert!(matches!(
            claim_socket(&f, "test daemon").unwrap_err(),
            UdsError::NotASocket { .. }
        ));
        assert_eq!(std::fs::read(&f).unwrap(), b"x");
    }

    #[test]
    fn uds_data_dir_lock_is_exclusive_until_dropped() {
        let d = tempfile::tempdir().unwrap();
        let first = lock_data_dir(d.path(), "kame-server").unwrap();
        let e = lock_data_dir(d.path(), "kame-server").unwrap_err();
        assert!(matches!(e, UdsError::DataDirInUse { .. }), "{e}");
        drop(first);
        lock_data_dir(d.path(), "kame-server").unwrap();
    }
}
