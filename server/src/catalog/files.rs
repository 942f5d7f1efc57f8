//! What plugins read or check at configuration time: PEM certificate bundles and hash lists
//! named in their `plugin_data`, files that must be readable (a PKCS#11 module, a CA
//! certificate, a key policy) and files the server will create (whose directory must exist).
//! Errors name the configuration key and the file, so `kame-server validate` says which
//! setting points where. Reading happens once, when the configuration is loaded, never while
//! serving; nothing is created here.

use kame_api::conf::{ConfigError, Section, invalid};
use std::path::PathBuf;

/// The non-empty path under `key`, if set.
pub fn optional_path(data: &Section, key: &str) -> Result<Option<PathBuf>, ConfigError> {
    Ok(data.nonempty(key)?.map(PathBuf::from))
}

/// The non-empty path under `key`.
pub fn required_path(data: &Section, key: &str) -> Result<PathBuf, ConfigError> {
    optional_path(data, key)?.ok_or_else(|| data.missing(key))
}

/// The certificates (DER) of the PEM bundle at `path`, named by `key`; a bundle without a
/// certificate, or with one that does not parse, is refused.
pub fn certificates(key: &str, path: &std::path::Path) -> Result<Vec<Vec<u8>>, ConfigError> {
    let err = |msg: String| invalid(key, format!("{}: {msg}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let certs = kame_api::bundle::certs_from_pem(&text).map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("holds no certificates".into()));
    }
    for c in &certs {
        kame_api::x509svid::ParsedCert::parse(c).map_err(|e| err(e.to_string()))?;
    }
    Ok(certs)
}

/// The certificates of the bundle named under `key` in `data` (required).
pub fn required_certificates(data: &Section, key: &str) -> Result<Vec<Vec<u8>>, ConfigError> {
    certificates(&data.key(key), &required_path(data, key)?)
}

/// One SHA-256 (64 hex digits, any case) per line of the file at `path`; `#` starts a
/// comment. Returned lower-case.
pub fn sha256_list(key: &str, path: &std::path::Path) -> Result<Vec<String>, ConfigError> {
    let err = |msg: String| invalid(key, format!("{}: {msg}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        let v = line
            .split('#')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if v.is_empty() {
            continue;
        }
        if v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err(format!("line {}: not a SHA-256 in hex", i + 1)));
        }
        out.push(v);
    }
    Ok(out)
}

/// The file at `path` (named by `key`) must exist and be readable by this process.
pub fn readable(key: &str, path: &std::path::Path) -> Result<(), ConfigError> {
    let err = |msg: String| invalid(key, format!("{}: {msg}", path.display()));
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// The content of the file at `path` (named by `key`).
pub fn read_text(key: &str, path: &std::path::Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| invalid(key, format!("{}: {e}", path.display())))
}

/// A file the server creates at `path` (named by `key`): its directory must exist, or be
/// `data_dir` (which the server creates at start). A typo in such a path must not start the
/// server on fresh, empty state.
pub fn creatable(
    key: &str,
    path: &std::path::Path,
    data_dir: &std::path::Path,
) -> Result<(), ConfigError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => return Ok(()),
    };
    let same = |a: &std::path::Path, b: &std::path::Path| {
        a.components()
            .filter(|c| *c != std::path::Component::CurDir)
            .eq(b
                .components()
                .filter(|c| *c != std::path::Component::CurDir))
    };
    if dir.is_dir() || same(dir, data_dir) {
        return Ok(());
    }
    Err(invalid(
        key,
        format!(
            "{}: directory {} does not exist (only data_dir is created at start)",
            path.display(),
            dir.display()
        ),
    ))
}
