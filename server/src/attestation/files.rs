//! What node attestor plugins read at configuration time: PEM certificate bundles and hash
//! lists named in their `plugin_data`. Errors name the configuration key and the file, so
//! `kame-server validate` says which setting points where. Reading happens once, when the
//! configuration is loaded, never while attesting.

use kame_api::conf::{ConfigError, Section, invalid};
use std::path::PathBuf;

/// The non-empty path under `key`, if set.
pub fn optional_path(data: &Section, key: &str) -> Result<Option<PathBuf>, ConfigError> {
    Ok(data
        .string(key)?
        .filter(|v| !v.is_empty())
        .map(PathBuf::from))
}

/// The non-empty path under `key`.
pub fn required_path(data: &Section, key: &str) -> Result<PathBuf, ConfigError> {
    optional_path(data, key)?.ok_or(ConfigError::Missing { key: data.key(key) })
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
