//! Helpers of the kame-devid CLI tests: running the binary, a CA serving enrollment, TLS
//! endpoint certificates and a manufactured swtpm device. They start processes and write temp
//! files only.

use super::*;

pub(super) fn devid(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_kame-devid"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "kame-devid {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

pub(super) fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Starts `kame-devid ca serve` with `args` (after `ca serve`); returns the process (killed
/// when dropped) and the address it listens on.
pub(super) async fn serve_ca(args: &[&str]) -> (tokio::process::Child, String) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kame-devid"))
        .args(["ca", "serve"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let addr = first.trim_start_matches("listening on ").to_string();
    (child, addr)
}

/// The first certificate of a PEM file.
pub(super) fn der_of(p: &Path) -> Vec<u8> {
    kame_api::bundle::certs_from_pem(&std::fs::read_to_string(p).unwrap())
        .unwrap()
        .remove(0)
}

pub(super) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A TLS root and a server certificate for IP 127.0.0.1 under it (openssl), for the
/// enrollment endpoint: (root, chain, key).
pub(super) fn tls_endpoint_certs(
    d: &Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let (root, root_key) = (d.join("tls-root.pem"), d.join("tls-root.key"));
    let (cert, key, csr) = (d.join("tls.pem"), d.join("tls.key"), d.join("tls.csr"));
    let ext = d.join("tls.ext");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=critical,CA:FALSE\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        let o = Command::new("openssl").args(args).output().unwrap();
        assert!(
            o.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-subj",
            "/CN=Owner TLS Root",
            "-days",
            "2",
            "-keyout",
            &s(&root_key),
            "-out",
            &s(&root),
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            &s(&key),
            "-out",
            &s(&csr),
        ],
    ]
    .concat());
    run(&[
        "x509",
        "-req",
        "-in",
        &s(&csr),
        "-CA",
        &s(&root),
        "-CAkey",
        &s(&root_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &s(&ext),
        "-out",
        &s(&cert),
    ]);
    (root, cert, key)
}

pub(super) fn devid_fails(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_kame-devid"))
        .args(args)
        .output()
        .unwrap();
    assert!(!o.status.success(), "kame-devid {args:?} succeeded");
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// A TPM with the TCG IAK and IDevID and its TCG-CSR-IDEVID at `req`.
pub(super) fn manufactured(d: &Path, serial: &str) -> (SwTpm, std::path::PathBuf) {
    let tpm = SwTpm::start().unwrap();
    devid(&["tpm", "create-iak", "--tcti", &tpm.tcti]);
    devid(&["tpm", "create-idevid", "--tcti", &tpm.tcti]);
    let req = d.join(format!("{serial}.req"));
    devid(&[
        "csr",
        "--tcti",
        &tpm.tcti,
        "--model",
        "kame-edge",
        "--serial",
        serial,
        "--out",
        &s(&req),
    ]);
    (tpm, req)
}
