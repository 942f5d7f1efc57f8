//! The Go side of interoperability tests: standard-library Go programs under `tests/go/`,
//! built once per test process, offline (no module proxy, no toolchain download). `go` comes
//! from `scripts/bootstrap`; without it the tests fail, never skip.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

/// The binary of `tests/go/<name>/main.go`.
pub fn program(name: &str) -> PathBuf {
    static BUILT: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    let built = built.get_or_insert_with(HashMap::new);
    if let Some(p) = built.get(name) {
        return p.clone();
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kame-go");
    let out = dir.join(name);
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("go/{name}/main.go"));
    let o = std::process::Command::new("go")
        .args(["build", "-o"])
        .arg(&out)
        .arg(&src)
        .env("GOCACHE", dir.join("cache"))
        .env("GOPATH", dir.join("path"))
        .env("GO111MODULE", "off")
        .env("GOTOOLCHAIN", "local")
        .env("GOPROXY", "off")
        .output()
        .expect("`go` (Debian golang-go, installed by scripts/bootstrap)");
    assert!(
        o.status.success(),
        "go build {name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    built.insert(name.to_string(), out.clone());
    out
}
