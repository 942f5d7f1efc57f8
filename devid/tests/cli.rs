//! `kame-devid` end to end on a software TPM: create the TCG IAK and IDevID keys, build the
//! TCG-CSR-IDEVID, make the manufacturer CA (key in a 0600 key file), serve enrollment, and
//! enroll: the device answers the credential activation challenge and receives IAK and IDevID
//! certificates that `openssl x509 -text` shows with the serialNumber, the hardwareModuleName
//! and the TCG policies. A replayed challenge answer and a malformed request are refused.

use kame_api::pb::devid as pb;
use kame_tpm::device::{Device, EkAlg};
use kame_tpm::testing::SwTpm;
use std::path::Path;
use std::process::Command;
use tokio::io::AsyncBufReadExt;

mod support;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devid_cli_manufacture_enrolls_iak_and_idevid_over_grpc() {
    let tpm = SwTpm::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    devid(&["tpm", "create-iak", "--tcti", &tpm.tcti]);
    devid(&["tpm", "create-idevid", "--tcti", &tpm.tcti]);
    let req = d.join("req.bin");
    devid(&[
        "csr",
        "--tcti",
        &tpm.tcti,
        "--model",
        "kame-edge",
        "--serial",
        "SN-9",
        "--out",
        &s(&req),
    ]);
    let keys = d.join("ca-keys.json");
    let ca_pem = d.join("ca.pem");
    devid(&["ca", "init", "--keys-path", &s(&keys), "--out", &s(&ca_pem)]);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&keys).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the CA key file");
    }
    // A second TPM whose request claims the same serial, from a vendor the CA also trusts.
    let (twin, twin_req) = manufactured(d, "SN-9");
    let (mut serve, addr) = serve_ca(&[
        "--keys-path",
        &s(&keys),
        "--ca-cert",
        &s(&ca_pem),
        "--ek-root",
        &s(&tpm.dir().join("ek-root-ca.pem")),
        "--ek-intermediate",
        &s(&tpm.dir().join("ek-intermediate-ca.pem")),
        "--ek-root",
        &s(&twin.dir().join("ek-root-ca.pem")),
        "--ek-intermediate",
        &s(&twin.dir().join("ek-intermediate-ca.pem")),
        "--registry",
        &s(&d.join("registry.json")),
        "--subject",
        "O=Kame Devices, CN=kame-edge",
    ])
    .await;
    let url = format!("http://{addr}");
    let out = d.join("out");
    devid(&[
        "enroll-idevid",
        "--tcti",
        &tpm.tcti,
        "--ca",
        &url,
        "--request",
        &s(&req),
        "--trust-ca",
        &s(&ca_pem),
        "--out-dir",
        &s(&out),
    ]);
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(out.join("idevid.pem"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("serialNumber = SN-9"), "{text}");
    assert!(text.contains("othername: 1.3.6.1.5.5.7.8.4::"), "{text}");
    assert!(text.contains("Policy: 2.23.133.11.1.2"), "{text}");
    let iak = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(&ca_pem)
        .arg(out.join("iak.pem"))
        .output()
        .unwrap();
    assert!(
        iak.status.success(),
        "{}",
        String::from_utf8_lossy(&iak.stdout)
    );
    // What the device checked before writing: each certificate names its own TPM key. The
    // IDevID certificate checked against the IAK's public area is refused.
    {
        use kame_devid::issued::{IssuedError, check};
        use kame_devid::profile::DevIdKind;
        let mut dev = Device::open(&tpm.tcti).unwrap();
        let iak_pub = dev.persistent_public(0x8102_0001).unwrap();
        let idevid_pub = dev.persistent_public(0x8102_0000).unwrap();
        let ca = der_of(&ca_pem);
        let idevid = der_of(&out.join("idevid.pem"));
        let pinned = [ca.clone()];
        check(&idevid, DevIdKind::IDevId, &ca, &pinned, &idevid_pub, now()).unwrap();
        let e = check(&idevid, DevIdKind::IDevId, &ca, &pinned, &iak_pub, now()).unwrap_err();
        assert!(
            matches!(e, IssuedError::NotThisKey(DevIdKind::IDevId)),
            "{e}"
        );
        let iak = der_of(&out.join("iak.pem"));
        check(&iak, DevIdKind::Iak, &ca, &pinned, &iak_pub, now()).unwrap();
        let e = check(&iak, DevIdKind::IDevId, &ca, &pinned, &iak_pub, now()).unwrap_err();
        assert!(matches!(e, IssuedError::Profile(..)), "{e}");
    }

    // The protocol directly: a challenge is answered once; a replay is refused.
    let mut client = pb::enrollment_client::EnrollmentClient::connect(url.clone())
        .await
        .unwrap();
    let ch = client
        .begin_idevid(pb::BeginIdevidRequest {
            tcg_csr_idevid: std::fs::read(&req).unwrap(),
        })
        .await
        .unwrap()
        .into_inner();
    let secret = {
        let mut dev = Device::open(&tpm.tcti).unwrap();
        dev.activate_credential_tcg(
            EkAlg::Rsa2048,
            0x8102_0001,
            &ch.credential_blob,
            &ch.encrypted_secret,
        )
        .unwrap()
    };
    let finish = pb::FinishRequest {
        challenge_id: ch.challenge_id.clone(),
        secret: secret.clone(),
    };
    client.finish_idevid(finish.clone()).await.unwrap();
    let replay = client.finish_idevid(finish).await.unwrap_err();
    assert_eq!(
        replay.code(),
        tonic::Code::FailedPrecondition,
        "{}",
        replay.message()
    );
    let garbage = client
        .begin_idevid(pb::BeginIdevidRequest {
            tcg_csr_idevid: b"not a request".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        garbage.code(),
        tonic::Code::InvalidArgument,
        "{}",
        garbage.message()
    );
    // The twin answers its challenge (its IAK is resident with its EK), but the registry has
    // SN-9 with the first TPM: AlreadyExists, nothing written.
    let twin_out = d.join("twin-out");
    let e = devid_fails(&[
        "enroll-idevid",
        "--tcti",
        &twin.tcti,
        "--ca",
        &url,
        "--request",
        &s(&twin_req),
        "--insecure-bootstrap",
        "--out-dir",
        &s(&twin_out),
    ]);
    assert!(
        e.contains("AlreadyExists") && e.contains("already certified for another TPM"),
        "{e}"
    );
    assert!(!twin_out.exists());
    drop(twin);
    let _ = serve.kill().await;

    // LDevID enrollment with an owner CA that trusts the manufacturer CA.
    let owner_keys = d.join("owner-keys.json");
    let owner_pem = d.join("owner.pem");
    devid(&[
        "ca",
        "init",
        "--keys-path",
        &s(&owner_keys),
        "--subject",
        "O=Fleet Owner, CN=Owner CA",
        "--out",
        &s(&owner_pem),
    ]);
    // The owner's endpoint serves TLS: a server certificate for 127.0.0.1 from its own root.
    let (tls_root, tls_cert, tls_key) = tls_endpoint_certs(d);
    let (mut owner, owner_addr) = serve_ca(&[
        "--keys-path",
        &s(&owner_keys),
        "--ca-cert",
        &s(&owner_pem),
        "--ek-root",
        &s(&tpm.dir().join("ek-root-ca.pem")),
        "--idevid-ca",
        &s(&ca_pem),
        "--subject",
        "O=Fleet Owner",
        "--tls-cert",
        &s(&tls_cert),
        "--tls-key",
        &s(&tls_key),
    ])
    .await;
    let owner_url = format!("https://{owner_addr}");
    let ldevid = d.join("ldevid");
    let enroll_over = |url: &str, tls: &Path, trust: &Path| {
        [
            "enroll".to_string(),
            "--tcti".into(),
            tpm.tcti.clone(),
            "--ca".into(),
            url.to_string(),
            "--tls-ca".into(),
            s(tls),
            "--iak-cert".into(),
            s(&out.join("iak.pem")),
            "--idevid-cert".into(),
            s(&out.join("idevid.pem")),
            "--trust-ca".into(),
            s(trust),
            "--out-dir".into(),
            s(&ldevid),
        ]
    };
    let enroll = |trust: &Path| enroll_over(&owner_url, &tls_root, trust);
    // TLS: the endpoint's certificate must chain to --tls-ca; https needs --tls-ca, and
    // --tls-ca needs https.
    let e = devid_fails(
        &enroll_over(&owner_url, &ca_pem, &owner_pem)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(e.contains("connecting to"), "{e}");
    assert!(
        e.contains("UnknownIssuer") || e.contains("invalid peer certificate"),
        "the TLS certificate error: {e}"
    );
    let plain = owner_url.replacen("https://", "http://", 1);
    let e = devid_fails(
        &enroll_over(&plain, &tls_root, &owner_pem)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(e.contains("--tls-ca needs an https:// --ca"), "{e}");
    let mut no_tls_ca = enroll(&owner_pem).to_vec();
    no_tls_ca.drain(5..7);
    let e = devid_fails(&no_tls_ca.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(e.contains("name the roots of its TLS certificate"), "{e}");
    assert!(!ldevid.exists(), "nothing written");
    // A device that trusts another CA than the one answering refuses what it sends.
    let e = devid_fails(
        &enroll(&ca_pem)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(e.contains("not one this device trusts"), "{e}");
    assert!(!ldevid.exists(), "nothing written");
    // Neither --trust-ca nor --insecure-bootstrap: refused before anything is asked.
    let mut unpinned = enroll(&owner_pem).to_vec();
    let at = unpinned.iter().position(|a| a == "--trust-ca").unwrap();
    unpinned.drain(at..at + 2);
    let e = devid_fails(&unpinned.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        e.contains("--trust-ca FILE, or pass --insecure-bootstrap"),
        "{e}"
    );
    assert!(!ldevid.exists(), "nothing written");
    // --insecure-bootstrap: enrolled, with a warning; the key also persisted.
    unpinned.insert(at, "--insecure-bootstrap".into());
    unpinned.extend(["--persist-handle".into(), "0x81020002".into()]);
    devid(&unpinned.iter().map(String::as_str).collect::<Vec<_>>());
    let first_cert = std::fs::read(ldevid.join("devid.pem")).unwrap();
    // A handle holding another object (the IAK) is refused before the CA is asked.
    let mut foreign = enroll(&owner_pem).to_vec();
    foreign.extend(["--persist-handle".into(), "0x81020001".into()]);
    let e = devid_fails(&foreign.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(e.contains("is not this --out-dir's LDevID key"), "{e}");
    assert_eq!(std::fs::read(ldevid.join("devid.pem")).unwrap(), first_cert);
    // Re-enrolled with the pinned CA: a new key, replacing the persisted one, and every file
    // replaced together.
    let mut again = enroll(&owner_pem).to_vec();
    again.extend(["--persist-handle".into(), "0x81020002".into()]);
    devid(&again.iter().map(String::as_str).collect::<Vec<_>>());
    assert_ne!(std::fs::read(ldevid.join("devid.pem")).unwrap(), first_cert);
    {
        let mut dev = Device::open(&tpm.tcti).unwrap();
        let public = std::fs::read(ldevid.join("devid.pub")).unwrap();
        dev.persistent_public_matching(0x8102_0002, &public)
            .expect("the persisted key is the enrolled one");
        let iak_pub = std::fs::read(ldevid.join("iak.pub")).unwrap();
        dev.persistent_public_matching(0x8102_0001, &iak_pub)
            .expect("iak.pub is the IAK's public area");
    }
    kame_devid::issued::check(
        &der_of(&ldevid.join("devid.pem")),
        kame_devid::profile::DevIdKind::LDevId,
        &der_of(&ldevid.join("devid-ca.pem")),
        &[der_of(&owner_pem)],
        &std::fs::read(ldevid.join("devid.pub")).unwrap(),
        now(),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(ldevid.join("devid.priv"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(ldevid.join("devid.pem"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("serialNumber = SN-9"), "{text}");
    assert!(
        text.contains("Issuer: O = Fleet Owner, CN = Owner CA"),
        "{text}"
    );
    // The owner CA refuses an unknown manufacturer's devices. A refused request spends
    // nothing (a nonce is spent only by a request that passes, so failures cost the CA no
    // memory); an id whose expiry is beyond what the CA issues is unknown.
    let channel = tonic::transport::Endpoint::from_shared(owner_url)
        .unwrap()
        .tls_config(tonic::transport::ClientTlsConfig::new().ca_certificate(
            tonic::transport::Certificate::from_pem(std::fs::read(&tls_root).unwrap()),
        ))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = pb::enrollment_client::EnrollmentClient::new(channel);
    let n = c
        .begin_ldevid(pb::BeginLdevidRequest {})
        .await
        .unwrap()
        .into_inner();
    let bogus = pb::FinishLdevidRequest {
        nonce_id: n.nonce_id.clone(),
        idevid_certificate: std::fs::read(out.join("idevid.pem")).unwrap(),
        ..Default::default()
    };
    let first = c.finish_ldevid(bogus.clone()).await.unwrap_err();
    assert_eq!(
        first.code(),
        tonic::Code::PermissionDenied,
        "{}",
        first.message()
    );
    let again = c.finish_ldevid(bogus.clone()).await.unwrap_err();
    assert_eq!(
        again.code(),
        tonic::Code::PermissionDenied,
        "{}",
        again.message()
    );
    let forged = pb::FinishLdevidRequest {
        nonce_id: format!("{}{:016x}", "00".repeat(16), now() + 3600),
        ..bogus
    };
    let unknown = c.finish_ldevid(forged).await.unwrap_err();
    assert_eq!(
        unknown.code(),
        tonic::Code::FailedPrecondition,
        "{}",
        unknown.message()
    );
    let _ = owner.kill().await;
}

/// `ca issue`: offline issuance without a challenge round. The CA checks the request, issues,
/// and seals the certificates to the requesting TPM; `activate` opens them there and only
/// there. Another TPM, an altered file, and an EK from an unknown vendor are refused, and
/// nothing is written.
#[test]
fn devid_cli_ca_issue_offline_seals_certificates_only_the_requesting_tpm_opens() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (tpm, req) = manufactured(d, "SN-OFFLINE-1");
    let keys = d.join("ca-keys.json");
    let ca_pem = d.join("ca.pem");
    let said = devid(&["ca", "init", "--keys-path", &s(&keys), "--out", &s(&ca_pem)]);
    assert!(said.contains(&s(&ca_pem)), "says what it wrote: {said}");
    // An initialised CA is not replaced by accident: not its certificate, not its key.
    let before = (
        std::fs::read(&keys).unwrap(),
        std::fs::read(&ca_pem).unwrap(),
    );
    let e = devid_fails(&["ca", "init", "--keys-path", &s(&keys), "--out", &s(&ca_pem)]);
    assert!(e.contains("exists") && e.contains("--force"), "{e}");
    let other = d.join("other-ca.pem");
    let e = devid_fails(&["ca", "init", "--keys-path", &s(&keys), "--out", &s(&other)]);
    assert!(e.contains("already holds a CA key"), "{e}");
    assert!(!other.exists());
    assert_eq!(
        (
            std::fs::read(&keys).unwrap(),
            std::fs::read(&ca_pem).unwrap()
        ),
        before
    );
    let forced = d.join("forced");
    std::fs::create_dir(&forced).unwrap();
    let fk = forced.join("keys.json");
    let fc = forced.join("ca.pem");
    devid(&["ca", "init", "--keys-path", &s(&fk), "--out", &s(&fc)]);
    let first = std::fs::read(&fc).unwrap();
    devid(&[
        "ca",
        "init",
        "--force",
        "--keys-path",
        &s(&fk),
        "--out",
        &s(&fc),
    ]);
    assert_ne!(
        std::fs::read(&fc).unwrap(),
        first,
        "--force replaces the CA"
    );
    let issue = |ek_root: &Path, out: &Path| {
        vec![
            "ca".to_string(),
            "issue".into(),
            "--keys-path".into(),
            s(&keys),
            "--ca-cert".into(),
            s(&ca_pem),
            "--ek-root".into(),
            s(ek_root),
            "--ek-intermediate".into(),
            s(&tpm.dir().join("ek-intermediate-ca.pem")),
            "--subject".into(),
            "O=Kame Devices, CN=kame-edge".into(),
            "--request".into(),
            s(&req),
            "--registry".into(),
            s(&d.join("registry.json")),
            "--out".into(),
            s(out),
        ]
    };
    let activate = |tcti: &str, sealed: &str, trust: &[&str], out: &str| -> Vec<String> {
        let mut v = vec!["activate", "--tcti", tcti, "--sealed", sealed];
        v.extend(trust);
        v.extend(["--out-dir", out]);
        v.into_iter().map(String::from).collect()
    };
    fn strs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let run = |v: Vec<String>| devid(&strs(&v));
    let run_fails = |v: Vec<String>| devid_fails(&strs(&v));

    // An EK certificate from a vendor the CA does not trust: refused, nothing written.
    let refused = d.join("refused.bin");
    let e = run_fails(issue(&ca_pem, &refused));
    assert!(e.contains("trusted TPM vendor CA"), "{e}");
    assert!(!refused.exists());

    let sealed = d.join("sealed.bin");
    run(issue(&tpm.dir().join("ek-root-ca.pem"), &sealed));
    // The same device again: re-issued (the registry has it with this TPM).
    run(issue(&tpm.dir().join("ek-root-ca.pem"), &sealed));
    // Another TPM claiming the same serial: refused, nothing written.
    // (its request overwrites this device's, which is not needed again)
    let (twin, twin_req) = manufactured(d, "SN-OFFLINE-1");
    let twin_sealed = d.join("twin-sealed.bin");
    let mut twin_issue = issue(&twin.dir().join("ek-root-ca.pem"), &twin_sealed);
    let at = twin_issue.iter().position(|a| a == "--request").unwrap();
    twin_issue[at + 1] = s(&twin_req);
    let at = twin_issue
        .iter()
        .position(|a| a == "--ek-intermediate")
        .unwrap();
    twin_issue[at + 1] = s(&twin.dir().join("ek-intermediate-ca.pem"));
    let e = run_fails(twin_issue);
    assert!(e.contains("already certified for another TPM"), "{e}");
    assert!(!twin_sealed.exists());
    drop(twin);
    let bytes = std::fs::read(&sealed).unwrap();
    assert!(bytes.starts_with(b"KAMESEAL1"));
    // The certificates are not readable in the file.
    assert!(!bytes.windows(12).any(|w| w == b"SN-OFFLINE-1"));

    // Another TPM (its own EK and IAK at the same handles) cannot open them.
    let (other, _) = manufactured(d, "SN-OTHER");
    let out_other = d.join("out-other");
    let e = run_fails(activate(
        &other.tcti,
        &s(&sealed),
        &["--trust-ca", &s(&ca_pem)],
        &s(&out_other),
    ));
    assert!(e.contains("ActivateCredential"), "{e}");
    assert!(!out_other.exists());
    drop(other);
    // An altered file does not open.
    let mut altered = bytes.clone();
    let last = altered.len() - 1;
    altered[last] ^= 1;
    let altered_path = d.join("altered.bin");
    std::fs::write(&altered_path, &altered).unwrap();
    let out_altered = d.join("out-altered");
    let e = run_fails(activate(
        &tpm.tcti,
        &s(&altered_path),
        &["--insecure-bootstrap"],
        &s(&out_altered),
    ));
    assert!(e.contains("another TPM, or altered"), "{e}");
    assert!(!out_altered.exists());

    // A device that names no CA it trusts, and did not choose --insecure-bootstrap, is refused
    // before it touches the TPM.
    let out = d.join("out");
    let e = run_fails(activate(&tpm.tcti, &s(&sealed), &[], &s(&out)));
    assert!(
        e.contains("--trust-ca FILE, or pass --insecure-bootstrap"),
        "{e}"
    );
    assert!(!out.exists());
    // Both at once is a contradiction.
    let e = run_fails(activate(
        &tpm.tcti,
        &s(&sealed),
        &["--trust-ca", &s(&ca_pem), "--insecure-bootstrap"],
        &s(&out),
    ));
    assert!(e.contains("cannot be used with"), "{e}");
    assert!(!out.exists());
    // Certificates from a CA the device does not trust are refused.
    let other_ca = d.join("other-ca.pem");
    devid(&[
        "ca",
        "init",
        "--keys-path",
        &s(&d.join("other-keys.json")),
        "--out",
        &s(&other_ca),
    ]);
    let out = d.join("out");
    let e = run_fails(activate(
        &tpm.tcti,
        &s(&sealed),
        &["--trust-ca", &s(&other_ca)],
        &s(&out),
    ));
    assert!(e.contains("not one this device trusts"), "{e}");
    assert!(!out.exists());
    // The requesting TPM opens them.
    run(activate(
        &tpm.tcti,
        &s(&sealed),
        &["--trust-ca", &s(&ca_pem)],
        &s(&out),
    ));
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(out.join("idevid.pem"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("serialNumber = SN-OFFLINE-1"), "{text}");
    assert!(text.contains("othername: 1.3.6.1.5.5.7.8.4::"), "{text}");
    for cert in ["iak.pem", "idevid.pem"] {
        let v = Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(&ca_pem)
            .arg(out.join(cert))
            .output()
            .unwrap();
        assert!(
            v.status.success(),
            "{cert}: {}",
            String::from_utf8_lossy(&v.stderr)
        );
    }
}

/// Issue 19 item 8: everything before the credential activation challenge can be made in
/// software (EK certificates are public), and each unanswered challenge is held for five
/// minutes; BeginLdevid needs nothing at all. The CA keeps one challenge per EK (a replayed
/// request replaces the last), and LDevID nonces keep no state until a request passes: a flood
/// of either leaves the CA's memory where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devid_ca_holds_one_challenge_per_ek_and_nothing_for_ldevid_nonces() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (tpm, req) = manufactured(d, "SN-77");
    let keys = d.join("ca-keys.json");
    let ca_pem = d.join("ca.pem");
    devid(&["ca", "init", "--keys-path", &s(&keys), "--out", &s(&ca_pem)]);
    let (mut serve, addr) = serve_ca(&[
        "--keys-path",
        &s(&keys),
        "--ca-cert",
        &s(&ca_pem),
        "--ek-root",
        &s(&tpm.dir().join("ek-root-ca.pem")),
        "--ek-intermediate",
        &s(&tpm.dir().join("ek-intermediate-ca.pem")),
        "--idevid-ca",
        &s(&ca_pem),
    ])
    .await;
    let pid = serve.id().unwrap();
    let rss_kib = || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap()
    };
    let mut client = pb::enrollment_client::EnrollmentClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    // Warm up, then measure.
    for _ in 0..100 {
        client
            .begin_ldevid(pb::BeginLdevidRequest {})
            .await
            .unwrap();
    }
    let before = rss_kib();
    for _ in 0..10_000 {
        client
            .begin_ldevid(pb::BeginLdevidRequest {})
            .await
            .unwrap();
    }
    let grew = rss_kib().saturating_sub(before);
    eprintln!("10,000 LDevID nonces: the CA grew by {grew} KiB");
    assert!(grew < 1024, "10,000 LDevID nonces took {grew} KiB");
    // The same valid TCG-CSR-IDEVID again and again: each challenge replaces the last.
    let bytes = std::fs::read(&req).unwrap();
    let begin = |client: &mut pb::enrollment_client::EnrollmentClient<_>| {
        let bytes = bytes.clone();
        let mut client = client.clone();
        async move {
            client
                .begin_idevid(pb::BeginIdevidRequest {
                    tcg_csr_idevid: bytes,
                })
                .await
                .unwrap()
                .into_inner()
                .challenge_id
        }
    };
    let oldest = begin(&mut client).await;
    let mut last = oldest.clone();
    for _ in 0..200 {
        last = begin(&mut client).await;
    }
    let answer = |id: String| {
        let mut client = client.clone();
        async move {
            client
                .finish_idevid(pb::FinishRequest {
                    challenge_id: id,
                    secret: vec![0; 32],
                })
                .await
                .unwrap_err()
                .code()
        }
    };
    assert_eq!(
        answer(oldest).await,
        tonic::Code::FailedPrecondition,
        "replaced"
    );
    assert_eq!(
        answer(last).await,
        tonic::Code::PermissionDenied,
        "the live one, wrong answer"
    );
    drop(tpm);
    let _ = serve.kill().await;
}

/// A TPM error is reported once, decoded (the response code's meaning, not only its number),
/// on one `Error:` line.
#[test]
fn devid_tpm_error_prints_the_decoded_response_code_once() {
    let tpm = SwTpm::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // No IDevID key was made: the TPM refuses the handle.
    let o = Command::new(env!("CARGO_BIN_EXE_kame-devid"))
        .args(["csr", "--tcti", &tpm.tcti, "--model", "m", "--serial", "1"])
        .arg("--out")
        .arg(dir.path().join("req.bin"))
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    // What the TPM said, decoded, and its number: each once.
    let decoded = "the handle is not correct for the use";
    assert_eq!(err.matches(decoded).count(), 1, "{err}");
    assert_eq!(err.matches("0x18b").count(), 1, "{err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with("WARNING:esys"))
        .collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with("Error: ") && lines[0].contains("persistent handle"),
        "{err}"
    );
}
