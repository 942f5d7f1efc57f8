//! Atomic file writes, the one helper every Kame crate uses for files that must never be seen
//! half-written or, for secrets, readable by others even briefly: the temp file (in the same
//! directory) has its final mode before any byte is written, then fsync, rename over the
//! target, and fsync of the directory. It decides nothing about what is written or where.

use std::io::Write;
use std::path::{Path, PathBuf};

/// A write that did not happen: the target keeps its old content (or stays absent).
#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}: {source}")]
pub struct WriteError {
    pub path: String,
    #[source]
    pub source: std::io::Error,
}

/// Writes `data` to `path` atomically with `mode`, creating its directory if needed. A
/// reader sees the old file or the new one, never a part.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), WriteError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| WriteError {
        path: path.display().to_string(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(err)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".kame-tmp-")
        .permissions(std::fs::Permissions::from_mode(mode))
        .tempfile_in(&dir)
        .map_err(err)?;
    tmp.write_all(data).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// [`write_atomic`] with mode 0600: keys, tokens, anything secret.
pub fn write_secret(path: &Path, data: &[u8]) -> Result<(), WriteError> {
    write_atomic(path, data, 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_write_has_its_mode_and_replaces_whole() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/secret");
        write_secret(&p, b"one").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        write_atomic(&p, b"two, longer", 0o644).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two, longer");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644
        );
        // Nothing left behind in the directory but the file itself.
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
        // A path under a regular file cannot be written, and says which path.
        std::fs::write(d.path().join("plain"), b"").unwrap();
        let e = write_secret(&d.path().join("plain/x"), b"").unwrap_err();
        assert!(e.path.ends_with("plain/x"), "{e}");
    }
}
