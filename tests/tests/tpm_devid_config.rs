//! tpm_devid configuration, server and agent, as SPIRE's catalogue lists it (`tpm_devid.md`
//! §3.2 "Server Configure", "Agent Configure", agent challenge failures): each bad input is an
//! error that names what is wrong, and nothing starts.

mod common;

use common::devid::{ek_cas, provision};
use kame_agent::tpm_devid::{DevIdAgentError, TpmDevidConfig, answer, evidence, request};
use kame_tpm::device::Device;
use kame_tpm::testing::SwTpm;
use std::path::Path;

fn server_conf(d: &Path, node_attestor: &str) -> String {
    let d = d.display();
    format!(
        r#"server {{
    bind_address = "127.0.0.1"
    bind_port = "0"
    socket_path = "{d}/api.sock"
    trust_domain = "example.org"
    data_dir = "{d}/data"
}}
plugins {{
    DataStore "sql" {{
        plugin_data {{
            database_type = "sqlite3"
            connection_string = "{d}/data/ds.sqlite3"
        }}
    }}
    KeyManager "memory" {{}}
    {node_attestor}
}}
"#
    )
}

fn devid_block(devid_ca: &str, ek_ca: &str) -> String {
    format!(
        "NodeAttestor \"tpm_devid\" {{\n        plugin_data {{\n            {devid_ca}\n            {ek_ca}\n        }}\n    }}"
    )
}

#[test]
fn tpm_devid_server_configure_01_to_05_no_core_config_empty_td_bad_hcl_missing_paths() {
    use kame_server::config::Config;
    let d = tempfile::tempdir().unwrap();
    // The bundles are read when the configuration is: they must exist.
    let pem = d.path().join("ca.pem");
    common::devid::openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        "/CN=ca",
        "-days",
        "1",
        "-keyout",
        &d.path().join("ca.key").display().to_string(),
        "-out",
        &pem.display().to_string(),
    ]);
    let pem = pem.display().to_string();
    let ok = server_conf(
        d.path(),
        &devid_block(
            "devid_ca_path = \"/x/devid.pem\"",
            "endorsement_ca_path = \"/x/ek.pem\"",
        ),
    )
    .replace("/x/devid.pem", &pem)
    .replace("/x/ek.pem", &pem);
    Config::parse(&ok, false).unwrap();
    let cases = [
        ("plugins {}\n".to_string(), "server"),
        (ok.replace("trust_domain = \"example.org\"", "trust_domain = \"\""), "server.trust_domain"),
        (ok.replace("plugins {", "plugins {{"), "not valid HCL"),
        (ok.replace(&format!("devid_ca_path = \"{pem}\""), ""), "devid_ca_path"),
        (ok.replace(&format!("endorsement_ca_path = \"{pem}\""), ""), "endorsement_ca_path"),
        // A misspelt key: reported as the typo of the required one.
        (
            ok.replace("devid_ca_path", "devid_ca_pth"),
            "plugins.NodeAttestor.tpm_devid.plugin_data.devid_ca_pth: unknown key (did you mean devid_ca_path?)",
        ),
        (
            ok.replace(&format!("endorsement_ca_path = \"{pem}\""), &format!("endorsement_ca_path = \"{pem}\"\n            pcr_policy {{\n                sha256 = {{\n                    \"99\" = \"00\"\n                }}\n            }}")),
            "not a PCR index",
        ),
    ];
    for (text, want) in cases {
        let e = Config::parse(&text, false).unwrap_err().to_string();
        assert!(e.contains(want), "{want}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_devid_server_configure_06_to_08_unreadable_bundles_refuse_to_start_and_success_starts()
{
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "node");
    let ek = ek_cas(&tpm, devid.dir.path());
    let d = tempfile::tempdir().unwrap();
    let conf = |devid_ca: String, ek_ca: String| {
        let text = server_conf(
            d.path(),
            &devid_block(
                &format!("devid_ca_path = \"{devid_ca}\""),
                &format!("endorsement_ca_path = \"{ek_ca}\""),
            ),
        );
        let port = common::free_port();
        let text = text.replace("bind_port = \"0\"", &format!("bind_port = \"{port}\""));
        kame_server::config::Config::parse(&text, false)
    };
    // The configuration is refused (so `validate` and `run` both say so), naming the key
    // and the file.
    let refused = |devid_ca: String, ek_ca: String, key: &str, says: &str| {
        let e = conf(devid_ca, ek_ca).unwrap_err().to_string();
        assert!(
            e.contains(&format!("plugins.NodeAttestor.tpm_devid.plugin_data.{key}"))
                && e.contains(says),
            "{key}, {says}: {e}"
        );
    };
    let good_devid = devid.ca.display().to_string();
    let good_ek = ek.display().to_string();
    // Unreadable DevID bundle; unreadable endorsement bundle; a file with no certificate.
    refused(
        "/nonexistent/devid.pem".into(),
        good_ek.clone(),
        "devid_ca_path",
        "/nonexistent/devid.pem",
    );
    refused(
        good_devid.clone(),
        "/nonexistent/ek.pem".into(),
        "endorsement_ca_path",
        "/nonexistent/ek.pem",
    );
    let empty = d.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    refused(
        good_devid.clone(),
        empty.display().to_string(),
        "endorsement_ca_path",
        "no certificates",
    );
    // Kame's attestation_key_ca_path (certified IAK/LAK): unreadable is refused too.
    refused(
        good_devid.clone(),
        format!("{good_ek}\"\n            attestation_key_ca_path = \"/nonexistent/iak-ca.pem"),
        "attestation_key_ca_path",
        "/nonexistent/iak-ca.pem",
    );
    // Success.
    let s = kame_server::run::start(conf(good_devid, good_ek).unwrap())
        .await
        .unwrap();
    s.stop().await;
}

fn agent_conf(block: &str) -> String {
    format!(
        "agent {{\n trust_domain = \"example.org\"\n server_address = \"127.0.0.1\"\n trust_bundle_path = \"/b.pem\"\n}}\nplugins {{\n {block}\n KeyManager \"memory\" {{}}\n WorkloadAttestor \"unix\" {{}}\n}}\n"
    )
}

#[test]
fn tpm_devid_agent_configure_01_to_04_11_bad_hcl_missing_paths_explicit_device() {
    use kame_agent::config::{Config, NodeAttestorConfig};
    let full = "NodeAttestor \"tpm_devid\" {\n plugin_data {\n devid_cert_path = \"c.pem\"\n devid_priv_path = \"k.priv\"\n devid_pub_path = \"k.pub\"\n tpm_device_path = \"/dev/tpmrm7\"\n }\n }";
    let c = Config::parse(&agent_conf(full), false).unwrap();
    let NodeAttestorConfig::Plugin(p) = c.node_attestor else {
        panic!("tpm_devid expected")
    };
    let t: &TpmDevidConfig = p.as_any().downcast_ref().unwrap();
    assert_eq!(t.tcti, "device:/dev/tpmrm7", "explicit path");
    let cases = [
        (
            agent_conf(full).replace("plugins {", "plugins {{"),
            "not valid HCL",
        ),
        (
            agent_conf(&full.replace("devid_cert_path = \"c.pem\"", "")),
            "devid_cert_path",
        ),
        (
            agent_conf(&full.replace("devid_priv_path = \"k.priv\"", "")),
            "devid_priv_path",
        ),
        (
            agent_conf(&full.replace("devid_pub_path = \"k.pub\"", "")),
            "devid_pub_path",
        ),
        (
            agent_conf(&full.replace("tpm_device_path", "devid_password = 7\n tpm_device_path")),
            "devid_password: expected a string",
        ),
        (
            agent_conf(&full.replace(
                "tpm_device_path = \"/dev/tpmrm7\"",
                "tpm_device_path = \"/dev/tpmrm7\"\n tcti = \"swtpm:\"",
            )),
            "not both",
        ),
    ];
    for (text, want) in cases {
        let e = Config::parse(&text, false).unwrap_err().to_string();
        assert!(e.contains(want), "{want}: {e}");
    }
}

#[test]
fn tpm_devid_agent_configure_07_09_10_agent_04_06_07_tpmutil_03_11_missing_files_bad_blobs_and_challenges()
 {
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "node");
    let p = |n: &str| devid.dir.path().join(n);
    let cfg = TpmDevidConfig {
        devid_cert_path: devid.cert.clone(),
        devid_priv_path: p("devid.priv"),
        devid_pub_path: p("devid.pub"),
        tcti: tpm.tcti.clone(),
        ek_algorithm: kame_tpm::device::EkAlg::Rsa2048,
        devid_password: Default::default(),
        owner_hierarchy_password: Default::default(),
        endorsement_hierarchy_password: Default::default(),
        attestation_key: None,
        devid_handle: None,
    };
    let mut d = Device::open(&tpm.tcti).unwrap();
    request(&mut d, &cfg).unwrap();
    // Certificate, private and public files missing.
    for f in ["cert", "priv", "pub"] {
        let mut c = cfg.clone();
        match f {
            "cert" => c.devid_cert_path = p("missing.pem"),
            "priv" => c.devid_priv_path = p("missing.priv"),
            _ => c.devid_pub_path = p("missing.pub"),
        }
        let e = request(&mut d, &c).unwrap_err();
        assert!(matches!(e, DevIdAgentError::Read { .. }), "{f}: {e}");
    }
    // Garbage public blob.
    std::fs::write(p("garbage.pub"), b"\x00\x01garbage").unwrap();
    let mut c = cfg.clone();
    c.devid_pub_path = p("garbage.pub");
    assert!(matches!(
        request(&mut d, &c).unwrap_err(),
        DevIdAgentError::BadPublic { .. }
    ));
    // Challenges: not JSON, no credential, malformed credential.
    let (_, s) = evidence(&mut d, vec![devid.leaf_der.clone()], devid.key.clone()).unwrap();
    assert!(matches!(
        answer(&mut d, &s, b"not json").unwrap_err(),
        DevIdAgentError::BadChallenge(_)
    ));
    assert!(matches!(
        answer(&mut d, &s, br#"{"DevID":"AAAA","CredActivation":null}"#).unwrap_err(),
        DevIdAgentError::EmptyCredential
    ));
    let e = answer(
        &mut d,
        &s,
        br#"{"DevID":"AAAA","CredActivation":{"Credential":"AAAA","Secret":"AAAA"}}"#,
    )
    .unwrap_err();
    assert!(matches!(e, DevIdAgentError::Tpm(_)), "{e}");
}

/// SPIRE's agent AidAttestation cases (§3.2): a DevID blob from another TPM does not load
/// ("cannot load DevID key"), a TPM without the RSA EK certificate index, and a nonce larger
/// than TPM2_Hash takes (SPIRE fails at 1,025 bytes; Kame hashes in software and signs).
#[test]
fn tpm_devid_agent_01_02_05_tpmutil_08_blob_from_other_tpm_missing_ek_cert_and_large_nonce() {
    let tpm = SwTpm::start().unwrap();
    let other = SwTpm::start().unwrap();
    let devid = provision(&other, "elsewhere");
    let mut d = Device::open(&tpm.tcti).unwrap();
    // The blob was wrapped by another TPM's SRK.
    let e = evidence(&mut d, vec![devid.leaf_der.clone()], devid.key.clone()).unwrap_err();
    assert!(e.to_string().contains("load key"), "{e}");
    // A large nonce: signed as a message (hashed in software), verified with the key.
    let mine = provision(&tpm, "here");
    let nonce = vec![7u8; 1025];
    let sig = d.sign(&mine.key, &nonce).unwrap();
    kame_tpm::wire::Signature::parse(&sig)
        .unwrap()
        .verify(
            &kame_tpm::wire::Public::parse(&mine.key.public).unwrap(),
            &nonce,
        )
        .unwrap();
    // No EK certificate at NV 0x01c00002 (platform index removed).
    drop(d);
    let r = tpm.tpm2("tpm2_nvundefine", &["0x01c00002", "-C", "p"]);
    assert!(r.is_ok(), "{r:?}");
    let mut d = Device::open(&tpm.tcti).unwrap();
    let e = evidence(&mut d, vec![mine.leaf_der.clone()], mine.key.clone()).unwrap_err();
    assert!(matches!(e, DevIdAgentError::NoEkCertificate), "{e}");
}

/// SPIRE's password cases (§3.2 agent 8–10, tpmutil 5, 6, 9, 13): owner and endorsement
/// hierarchy passwords and a DevID key password. Right ones attest; a wrong DevID password
/// fails at the TPM once — the dictionary-attack counter grows by exactly one (never retried).
#[test]
fn tpm_devid_agent_08_to_10_tpmutil_05_06_09_13_passwords_and_no_retry_on_auth_failure() {
    use kame_agent::tpm_devid::Secret;
    let tpm = SwTpm::start().unwrap();
    let run = |args: &[&str]| {
        let o = tpm.tpm2(args[0], &args[1..]).unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    // A certificate is not needed for the TPM half: any PEM certificate stands in.
    let stand_in = provision(&tpm, "stand-in");
    run(&["tpm2_changeauth", "-c", "o", "owner-pw"]);
    run(&["tpm2_changeauth", "-c", "e", "endorse-pw"]);
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).display().to_string();
    run(&[
        "tpm2_createprimary",
        "-C",
        "o",
        "-P",
        "owner-pw",
        "-g",
        "sha256",
        "-G",
        "rsa2048:null:aes128cfb",
        "-a",
        "restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda",
        "-c",
        &p("srk.ctx"),
    ]);
    run(&[
        "tpm2_create",
        "-C",
        &p("srk.ctx"),
        "-G",
        "rsa2048:rsassa-sha256:null",
        "-a",
        "sign|fixedtpm|fixedparent|sensitivedataorigin|userwithauth",
        "-p",
        "devid-pw",
        "-u",
        &p("devid.pub"),
        "-r",
        &p("devid.priv"),
    ]);
    let cfg = TpmDevidConfig {
        devid_cert_path: stand_in.cert.clone(),
        devid_priv_path: dir.path().join("devid.priv"),
        devid_pub_path: dir.path().join("devid.pub"),
        tcti: tpm.tcti.clone(),
        ek_algorithm: kame_tpm::device::EkAlg::Rsa2048,
        devid_password: Secret::new("devid-pw"),
        owner_hierarchy_password: Secret::new("owner-pw"),
        endorsement_hierarchy_password: Secret::new("endorse-pw"),
        attestation_key: None,
        devid_handle: None,
    };
    assert!(
        !format!("{cfg:?}").contains("-pw"),
        "passwords never printed"
    );
    let mut d = Device::open(&tpm.tcti).unwrap();
    request(&mut d, &cfg).expect("right passwords");
    let lockout = || {
        let o = tpm.tpm2("tpm2_getcap", &["properties-variable"]).unwrap();
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        text.lines()
            .find_map(|l| l.trim().strip_prefix("TPM2_PT_LOCKOUT_COUNTER:"))
            .and_then(|v| u32::from_str_radix(v.trim().trim_start_matches("0x"), 16).ok())
            .unwrap_or(u32::MAX)
    };
    // Wrong owner and endorsement passwords (hierarchies are not DA-protected here).
    for (o, e, says) in [("bad", "endorse-pw", "SRK"), ("owner-pw", "bad", "EK")] {
        let mut c = cfg.clone();
        c.owner_hierarchy_password = Secret::new(o);
        c.endorsement_hierarchy_password = Secret::new(e);
        let mut d = Device::open(&tpm.tcti).unwrap();
        let err = request(&mut d, &c).unwrap_err().to_string();
        assert!(err.contains(says), "{says}: {err}");
    }
    // Wrong DevID password: one failed authorization, counted once.
    let before = lockout();
    let mut c = cfg.clone();
    c.devid_password = Secret::new("wrong");
    let mut d = Device::open(&tpm.tcti).unwrap();
    let err = request(&mut d, &c).unwrap_err().to_string();
    assert!(err.contains("certify"), "{err}");
    assert_eq!(
        lockout(),
        before.wrapping_add(1),
        "exactly one authorization failure"
    );
    // tpmutil 9: signing the nonce with a wrong DevID password fails the same way, once; the
    // right password signs.
    let mut key = kame_tpm::device::KeyBlob::from_files(
        &std::fs::read(dir.path().join("devid.pub")).unwrap(),
        &std::fs::read(dir.path().join("devid.priv")).unwrap(),
    );
    key.auth = b"wrong".to_vec();
    let mut d = Device::open(&tpm.tcti).unwrap();
    d.set_hierarchy_auth(b"owner-pw", b"endorse-pw").unwrap();
    let before = lockout();
    let e = d.sign(&key, b"nonce").unwrap_err().to_string();
    assert!(e.contains("sign"), "{e}");
    drop(d);
    assert_eq!(lockout(), before.wrapping_add(1), "one failure for Sign");
    key.auth = b"devid-pw".to_vec();
    let mut d = Device::open(&tpm.tcti).unwrap();
    d.set_hierarchy_auth(b"owner-pw", b"endorse-pw").unwrap();
    d.sign(&key, b"nonce").expect("right password signs");
}

/// SPIRE's tpmutil case 2: a device path where no TPM is fails at open, naming the TCTI.
#[test]
fn tpm_devid_tpmutil_02_wrong_device_path_fails_at_open() {
    let e = match Device::open("device:/nonexistent/tpmrm9") {
        Err(e) => e.to_string(),
        Ok(_) => panic!("no TPM there"),
    };
    assert!(
        e.contains("cannot open the TPM at \"device:/nonexistent/tpmrm9\""),
        "{e}"
    );
}

/// SPIRE's tpmutil case 4: SPIRE fails with TPM_RC_OBJECT_MEMORY (0x902) when another
/// object fills a transient slot. Kame flushes transient objects left in the TPM when it opens
/// it (swtpm and /dev/tpm0 have no resource manager; /dev/tpmrm0 isolates them anyway), so
/// with every slot taken by leftovers attestation still runs, and leaves none behind.
#[test]
fn tpm_devid_tpmutil_04_full_object_slots_are_reclaimed_at_open() {
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "node");
    let transients = || {
        let o = tpm.raw("tpm2_getcap", &["handles-transient"]).unwrap();
        String::from_utf8_lossy(&o.stdout).lines().count()
    };
    for i in 0..3 {
        let o = tpm
            .raw(
                "tpm2_createprimary",
                &["-C", "o", "-G", "ecc", "-c", &format!("filler{i}.ctx")],
            )
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(transients(), 3, "every slot (swtpm has three) is taken");
    // A fourth object cannot be loaded now: the condition SPIRE's case produces.
    let e = tpm
        .raw("tpm2_createprimary", &["-C", "o", "-c", "fourth.ctx"])
        .expect_err("a fourth object fits")
        .to_string();
    assert!(e.contains("0x902"), "{e}");
    let mut d = Device::open(&tpm.tcti).unwrap();
    evidence(&mut d, vec![devid.leaf_der.clone()], devid.key.clone()).expect("slots reclaimed");
    drop(d);
    assert_eq!(transients(), 0, "attestation leaves no object loaded");
}

/// Message 1 holds the DevID, the AK and the EK for the answer: every object slot swtpm has.
/// A second message 1 over the same connection, the first never answered, releases the
/// first's objects (else it would fail for want of a slot); the first session then no longer
/// holds them and would load its blobs again.
#[test]
fn tpm_devid_unanswered_message_1_releases_its_objects_for_the_next() {
    use kame_agent::tpm_devid::sequence;
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "node");
    let mut d = Device::open(&tpm.tcti).unwrap();
    let (_, first) = evidence(&mut d, vec![devid.leaf_der.clone()], devid.key.clone()).unwrap();
    let held = |d: &Device, s: &kame_agent::tpm_devid::Session| {
        s.loaded.as_ref().is_some_and(|l| sequence::holds(d, l))
    };
    assert!(held(&d, &first), "message 1 keeps its objects loaded");
    let (_, second) = evidence(&mut d, vec![devid.leaf_der.clone()], devid.key.clone())
        .expect("the unanswered attestation's objects were released");
    assert!(
        !held(&d, &first),
        "the first attestation's objects are gone"
    );
    assert!(held(&d, &second));
    drop(d);
    let o = tpm.raw("tpm2_getcap", &["handles-transient"]).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).lines().count(),
        0,
        "nothing is left loaded"
    );
}

/// SPIRE's tpmutil cases 14–17 (GetEKCert): the certificate is read from NV 0x01c00002; NV
/// padding after the DER is cut off; unparsable content and an undefined index are errors.
#[test]
fn tpm_devid_tpmutil_14_to_17_ek_cert_nv_trailing_data_garbage_and_undefined() {
    use kame_tpm::device::EkAlg;
    let tpm = SwTpm::start().unwrap();
    let mut d = Device::open(&tpm.tcti).unwrap();
    // 14. as manufactured
    let cert = d
        .ek_certificate(EkAlg::Rsa2048)
        .unwrap()
        .expect("14: EK cert");
    kame_api::x509svid::ParsedCert::parse(&cert).expect("14: a certificate");
    drop(d);
    let ok = |args: &[&str]| {
        let o = tpm.tpm2(args[0], &args[1..]).unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    // Replaces the index (the platform's at first, then the owner's) with `content`.
    let define = |content: &[u8]| {
        let gone = ["p", "o"].iter().any(|h| {
            tpm.tpm2("tpm2_nvundefine", &["0x01c00002", "-C", h])
                .is_ok_and(|o| o.status.success())
        });
        assert!(gone, "index undefined");
        tpm.write("nv.bin", content).unwrap();
        let size = content.len().to_string();
        ok(&[
            "tpm2_nvdefine",
            "0x01c00002",
            "-C",
            "o",
            "-s",
            &size,
            "-a",
            "ownerread|ownerwrite|authread|authwrite",
        ]);
        ok(&["tpm2_nvwrite", "0x01c00002", "-C", "o", "-i", "nv.bin"]);
    };
    // 15. trailing data after the DER certificate
    let mut padded = cert.clone();
    padded.extend_from_slice(&[0xff; 48]);
    define(&padded);
    let mut d = Device::open(&tpm.tcti).unwrap();
    assert_eq!(
        d.ek_certificate(EkAlg::Rsa2048).unwrap().as_deref(),
        Some(&cert[..]),
        "15: NV padding cut off"
    );
    drop(d);
    // 17. unparsable content
    define(&[0xab; 64]);
    let mut d = Device::open(&tpm.tcti).unwrap();
    let e = d.ek_certificate(EkAlg::Rsa2048).unwrap_err().to_string();
    assert!(e.contains("EK certificate"), "17: {e}");
    drop(d);
    // 16. index undefined
    ok(&["tpm2_nvundefine", "0x01c00002", "-C", "o"]);
    let mut d = Device::open(&tpm.tcti).unwrap();
    assert_eq!(d.ek_certificate(EkAlg::Rsa2048).unwrap(), None, "16");
}

/// SPIRE's agent case 1 and tpmutil cases 18–19, by the TPM operations they stand for
/// (SPIRE's simulator calls them ManufactureReset): GetEKPublic gives the key of the EK
/// certificate; after the endorsement seed changes (TPM2_ChangeEPS) the EK is another key and
/// a pending session cannot answer; after TPM2_Clear (new storage seed) the DevID blob no
/// longer loads.
#[test]
fn tpm_devid_agent_01_tpmutil_18_19_ek_public_and_seed_changes() {
    use kame_tpm::device::EkAlg;
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "node");
    let mut d = Device::open(&tpm.tcti).unwrap();
    // 18. GetEKPublic: the EK certificate's key.
    let cert = d.ek_certificate(EkAlg::Rsa2048).unwrap().unwrap();
    let cert_spki = kame_api::x509svid::ParsedCert::parse(&cert)
        .unwrap()
        .spki_der()
        .unwrap();
    let ek_spki = d.ek_public(EkAlg::Rsa2048).unwrap().spki_der().unwrap();
    assert_eq!(ek_spki, cert_spki, "18");
    let (req, s) = evidence(&mut d, vec![devid.leaf_der.clone()], devid.key.clone()).unwrap();
    drop(d);
    // 19. The endorsement seed changes: a new EK; the pending session's AK (under the old EK)
    // cannot be used to answer.
    let o = tpm.tpm2("tpm2_changeeps", &[]).unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut d = Device::open(&tpm.tcti).unwrap();
    let new_ek = d.ek_public(EkAlg::Rsa2048).unwrap().spki_der().unwrap();
    assert_ne!(new_ek, ek_spki, "19: a new EK");
    let challenge = kame_api::tpm_devid::ChallengeRequest {
        devid: Some(vec![1; 32]),
        cred_activation: Some(kame_api::tpm_devid::CredActivation {
            credential: vec![0; 68],
            secret: vec![0; 256],
        }),
        ..Default::default()
    };
    let e = answer(&mut d, &s, &challenge.encode()).unwrap_err();
    assert!(matches!(e, DevIdAgentError::Tpm(_)), "19: {e}");
    assert!(req.ek_pub.is_some());
    drop(d);
    // Agent case 1: TPM2_Clear (a new storage seed, so a new SRK): the DevID blob, wrapped by
    // the old SRK, does not load.
    let o = tpm.tpm2("tpm2_clear", &["-c", "p"]).unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut d = Device::open(&tpm.tcti).unwrap();
    let e = evidence(&mut d, vec![devid.leaf_der.clone()], devid.key.clone()).unwrap_err();
    assert!(e.to_string().contains("load key"), "agent 1: {e}");
}
