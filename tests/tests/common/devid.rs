//! DevID test material: a DevID key made in a swtpm from SPIRE's template under the SRK,
//! blobs in SPIRE's format, a test CA (openssl) certifying it, the swtpm's EK CAs, and the
//! server/agent configuration blocks for tpm_devid.

use super::{Opts, TD};
use kame_tpm::device::Device;
use kame_tpm::testing::SwTpm;
use kame_tpm::wire::{Public, public::templates};
use sha1::Digest;
use std::path::{Path, PathBuf};

pub struct DevId {
    pub dir: tempfile::TempDir,
    pub cert: PathBuf,
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    pub ca_der: Vec<u8>,
    pub leaf_der: Vec<u8>,
    pub key: kame_tpm::device::KeyBlob,
}

pub fn openssl(args: &[&str]) {
    let o = std::process::Command::new("openssl")
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

pub fn der_of_pem(p: &Path) -> Vec<u8> {
    kame_api::bundle::certs_from_pem(&std::fs::read_to_string(p).unwrap()).unwrap()[0].clone()
}

/// A DevID key in the TPM (SPIRE's DEVID_RSA template), blobs in SPIRE's format, and a
/// certificate for it from a fresh test CA with subject CN `cn`.
pub fn provision(tpm: &SwTpm, cn: &str) -> DevId {
    provision_with(tpm, &format!("/CN={cn}"), None)
}

/// As [`provision`], with a full subject and optional extensions (an openssl extension
/// section named `ext`).
pub fn provision_with(tpm: &SwTpm, subject: &str, ext: Option<&str>) -> DevId {
    provision_template(tpm, templates::DEVID_RSA, subject, ext)
}

/// As [`provision_with`], the key made from `template` (hex TPMT_PUBLIC).
pub fn provision_template(tpm: &SwTpm, template: &str, subject: &str, ext: Option<&str>) -> DevId {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let key = tpm_key(tpm, template, dir.path());
    let s = |x: &Path| x.display().to_string();
    root_ca(dir.path(), "/CN=Kame Test DevID CA");
    let mut args: Vec<String> = vec![
        "x509".into(),
        "-new".into(),
        "-subj".into(),
        subject.into(),
        "-force_pubkey".into(),
        s(&p("devid_key.pem")),
        "-CA".into(),
        s(&p("ca.pem")),
        "-CAkey".into(),
        s(&p("ca.key")),
        "-days".into(),
        "1".into(),
        "-out".into(),
        s(&p("devid.pem")),
    ];
    if let Some(e) = ext {
        std::fs::write(p("ext.cnf"), e).unwrap();
        args.extend([
            "-extfile".into(),
            s(&p("ext.cnf")),
            "-extensions".into(),
            "ext".into(),
        ]);
    }
    let args: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    openssl(&args);
    DevId {
        cert: p("devid.pem"),
        ca: p("ca.pem"),
        ca_key: p("ca.key"),
        key,
        ca_der: der_of_pem(&p("ca.pem")),
        leaf_der: der_of_pem(&p("devid.pem")),
        dir,
    }
}

/// A DevID key made in the TPM from `template`, its blobs (SPIRE's format) and public key
/// written into `dir` as `devid.pub`, `devid.priv`, `devid_key.pem`.
fn tpm_key(tpm: &SwTpm, template: &str, dir: &Path) -> kame_tpm::device::KeyBlob {
    let mut d = Device::open(&tpm.tcti).unwrap();
    let key = d.create_under_srk(&templates::bytes(template)).unwrap();
    std::fs::write(dir.join("devid.pub"), &key.public).unwrap();
    std::fs::write(dir.join("devid.priv"), &key.private).unwrap();
    let spki = Public::parse(&key.public).unwrap().spki_der().unwrap();
    std::fs::write(
        dir.join("devid_key.pem"),
        kame_api::bundle::pem_block("PUBLIC KEY", &spki),
    )
    .unwrap();
    key
}

/// A self-signed P-256 CA in `dir` (`ca.key`, `ca.pem`) with subject `subject`.
fn root_ca(dir: &Path, subject: &str) {
    let s = |n: &str| dir.join(n).display().to_string();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &s("ca.key"),
        "-out",
        &s("ca.pem"),
        "-subj",
        subject,
        "-days",
        "2",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
}

pub fn ek_cas(tpm: &SwTpm, into: &Path) -> PathBuf {
    let mut pem = std::fs::read_to_string(tpm.dir().join("ek-root-ca.pem")).unwrap();
    pem.push_str(&std::fs::read_to_string(tpm.dir().join("ek-intermediate-ca.pem")).unwrap());
    let out = into.join("endorsement-cas.pem");
    std::fs::write(&out, pem).unwrap();
    out
}

pub fn opts(tpm: &SwTpm, devid: &DevId, devid_ca: &Path, ek_ca: &Path) -> Opts {
    let fp = hex::encode(sha1::Sha1::digest(&devid.leaf_der));
    let p = |n: &str| devid.dir.path().join(n).display().to_string();
    Opts {
        server_plugins: format!(
            "NodeAttestor \"tpm_devid\" {{\n        plugin_data {{\n            devid_ca_path = \"{}\"\n            endorsement_ca_path = \"{}\"\n        }}\n    }}",
            devid_ca.display(),
            ek_ca.display()
        ),
        agent_attestor: Some((
            format!(
                "NodeAttestor \"tpm_devid\" {{\n        plugin_data {{\n            devid_cert_path = \"{}\"\n            devid_priv_path = \"{}\"\n            devid_pub_path = \"{}\"\n            tcti = \"{}\"\n        }}\n    }}",
                devid.cert.display(),
                p("devid.priv"),
                p("devid.pub"),
                tpm.tcti
            ),
            format!("spiffe://{TD}/spire/agent/tpm_devid/{fp}"),
        )),
        ..Default::default()
    }
}

/// A DevID (RSA or ECC, SPIRE's templates) whose certificate `CN=devid-leaf` is issued by an
/// intermediate CA `CN=intermediate` under a root `CN=root`: `cert` holds the leaf then the
/// intermediate (what the agent sends), `ca` the root. Returns the intermediate's DER too.
pub fn provision_chain(tpm: &SwTpm, ecc: bool) -> (DevId, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let s = |x: &Path| x.display().to_string();
    let template = if ecc {
        templates::DEVID_ECC
    } else {
        templates::DEVID_RSA
    };
    let key = tpm_key(tpm, template, dir.path());
    std::fs::write(
        p("ca.ext"),
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n",
    )
    .unwrap();
    root_ca(dir.path(), "/CN=root");
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &s(&p("int.key")),
        "-out",
        &s(&p("int.csr")),
        "-subj",
        "/CN=intermediate",
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &s(&p("int.csr")),
        "-CA",
        &s(&p("ca.pem")),
        "-CAkey",
        &s(&p("ca.key")),
        "-days",
        "2",
        "-extfile",
        &s(&p("ca.ext")),
        "-out",
        &s(&p("int.pem")),
    ]);
    openssl(&[
        "x509",
        "-new",
        "-subj",
        "/CN=devid-leaf",
        "-force_pubkey",
        &s(&p("devid_key.pem")),
        "-CA",
        &s(&p("int.pem")),
        "-CAkey",
        &s(&p("int.key")),
        "-days",
        "1",
        "-out",
        &s(&p("leaf.pem")),
    ]);
    let chain = format!(
        "{}{}",
        std::fs::read_to_string(p("leaf.pem")).unwrap(),
        std::fs::read_to_string(p("int.pem")).unwrap()
    );
    std::fs::write(p("devid.pem"), chain).unwrap();
    let int_der = der_of_pem(&p("int.pem"));
    (
        DevId {
            cert: p("devid.pem"),
            ca: p("ca.pem"),
            ca_key: p("ca.key"),
            key,
            ca_der: der_of_pem(&p("ca.pem")),
            leaf_der: der_of_pem(&p("leaf.pem")),
            dir,
        },
        int_der,
    )
}
