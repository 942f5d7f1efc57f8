//! tpm_devid refusals, each a named case from SPIRE's catalogue and the gaps it leaves
//! (`tpm_devid.md` §3.2, §3.3, §1.8), driven message by message against a real server with
//! evidence from real swtpm TPMs, tampered where the case says. Every refusal is checked for
//! the check that failed, and nothing is attested.

#[path = "../common/mod.rs"]
mod common;

use common::devid::{ek_cas, opts, provision};
use common::driver::{Tamper, begin, finish, no_agents, refused, server, tpm_answer, tpm_evidence};
use common::{Env, TD};
use kame_agent::tpm_devid::{answer, evidence};
use kame_api::tpm_devid::ChallengeResponse;
use kame_tpm::device::Device;
use kame_tpm::testing::SwTpm;
use kame_tpm::wire::public::templates;
use tonic::Code;

mod certs;
mod pcr;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_devid_genuine_evidence_attests_positive_control() {
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "node");
    let env = server(&tpm, &devid, false).await;
    let (req, s) = tokio::task::block_in_place(|| tpm_evidence(&tpm, &devid));
    let (tx, rx, c) = begin(&env, req.encode()).await.unwrap();
    let resp = tokio::task::block_in_place(|| tpm_answer(&tpm, &s, &c));
    let id = finish(tx, rx, resp.encode()).await.unwrap();
    assert!(id.starts_with(&format!("spiffe://{TD}/spire/agent/tpm_devid/")));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_devid_rejects_wrong_credential_secret_and_nonce_signed_by_another_key() {
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "node");
    let env = server(&tpm, &devid, false).await;
    // Wrong credential secret.
    let (req, s) = tokio::task::block_in_place(|| tpm_evidence(&tpm, &devid));
    let (tx, rx, c) = begin(&env, req.encode()).await.unwrap();
    let mut resp = tokio::task::block_in_place(|| tpm_answer(&tpm, &s, &c));
    if let Some(sec) = resp.cred_activation.as_mut() {
        sec[0] ^= 1;
    }
    refused(
        finish(tx, rx, resp.encode()).await,
        Code::PermissionDenied,
        "credential activation failed",
    );
    // Nonce signed by another TPM key (a second DevID key, no certificate).
    let other = tokio::task::block_in_place(|| {
        Device::open(&tpm.tcti)
            .unwrap()
            .create_under_srk(&templates::bytes(templates::DEVID_RSA))
            .unwrap()
    });
    let (tx, rx, c) = begin(&env, req.encode()).await.unwrap();
    let mut resp = tokio::task::block_in_place(|| tpm_answer(&tpm, &s, &c));
    let nonce = kame_api::tpm_devid::ChallengeRequest::decode(&c)
        .unwrap()
        .devid
        .unwrap();
    let sig = tokio::task::block_in_place(|| {
        let t = Device::open(&tpm.tcti)
            .unwrap()
            .sign(&other, &nonce)
            .unwrap();
        kame_agent::tpm_devid::signature_for_server(&t).unwrap()
    });
    resp.devid = Some(sig);
    refused(
        finish(tx, rx, resp.encode()).await,
        Code::PermissionDenied,
        "nonce signature does not verify",
    );
    no_agents(&env).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_devid_spire_gap_08_rejects_replayed_challenge_response() {
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "node");
    let env = server(&tpm, &devid, false).await;
    let (req, s) = tokio::task::block_in_place(|| tpm_evidence(&tpm, &devid));
    let (tx, rx, c) = begin(&env, req.encode()).await.unwrap();
    let resp = tokio::task::block_in_place(|| tpm_answer(&tpm, &s, &c)).encode();
    finish(tx, rx, resp.clone()).await.unwrap();
    // The same message 1 again gets a fresh challenge; the old answer does not fit it.
    let (tx, rx, c2) = begin(&env, req.encode()).await.unwrap();
    assert_ne!(c, c2, "every challenge is fresh");
    refused(
        finish(tx, rx, resp).await,
        Code::PermissionDenied,
        "does not verify",
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_devid_attest_15_rejects_devid_from_another_tpm() {
    // The DevID (and its certify) come from TPM B, the EK from TPM A: the credential is made
    // for A's EK and B's AK, which no single TPM can recover.
    let tpm_a = SwTpm::start().unwrap();
    let tpm_b = SwTpm::start().unwrap();
    let devid = provision(&tpm_b, "node-b");
    let env = server(&tpm_a, &devid, false).await;
    let (mut req, s) = tokio::task::block_in_place(|| tpm_evidence(&tpm_b, &devid));
    let (a_req, _) = tokio::task::block_in_place(|| {
        let other = provision(&tpm_a, "node-a");
        tpm_evidence(&tpm_a, &other)
    });
    req.ek_cert = a_req.ek_cert;
    req.ek_pub = a_req.ek_pub;
    let (tx, rx, c) = begin(&env, req.encode()).await.unwrap();
    // TPM B cannot activate a credential made for TPM A's EK.
    let activated = tokio::task::block_in_place(|| {
        let mut d = Device::open(&tpm_b.tcti).unwrap();
        answer(&mut d, &s, &c)
    });
    assert!(
        activated.is_err(),
        "TPM B recovered a credential for TPM A's EK"
    );
    // Whatever it sends instead is refused.
    let resp = ChallengeResponse {
        devid: None,
        cred_activation: Some(vec![0; 32]),
        ..Default::default()
    };
    refused(
        finish(tx, rx, resp.encode()).await,
        Code::InvalidArgument,
        "no DevID signature",
    );
    no_agents(&env).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_devid_spire_gap_01_rejects_swapped_devid_pub_and_software_devid_key_with_genuine_ek() {
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "node");
    // Another TPM key, genuinely certified by the AK, stands in for the DevID's.
    let other = provision(&tpm, "other");
    let (mut req, s) = tokio::task::block_in_place(|| tpm_evidence(&tpm, &other));
    req.devid_cert = vec![devid.leaf_der.clone()];
    // Refused by default (SPIRE gap §1.8 #1: DevIDPub is not the certificate's key) ...
    let env = server(&tpm, &devid, false).await;
    refused(
        begin(&env, req.encode()).await.map(|_| ()),
        Code::PermissionDenied,
        "DevIDPub is not the DevID certificate's key",
    );
    no_agents(&env).await;
    env.stop().await;
    // A DevID key held in software (copied out, or never in a TPM) with a certificate from
    // the trusted CA, and a genuine TPM (EK, AK) certifying some other resident key: SPIRE
    // accepts this (compat_mode shows it); Kame refuses it by default.
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::KeyPair;
    let soft = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let spki = soft.public_key().as_der().unwrap().as_ref().to_vec();
    let dir = devid.dir.path();
    std::fs::write(
        dir.join("soft.pem"),
        kame_api::bundle::pem_block("PUBLIC KEY", &spki),
    )
    .unwrap();
    let s_ = |n: &str| dir.join(n).display().to_string();
    common::devid::openssl(&[
        "x509",
        "-new",
        "-subj",
        "/CN=soft",
        "-force_pubkey",
        &s_("soft.pem"),
        "-CA",
        &s_("ca.pem"),
        "-CAkey",
        &s_("ca.key"),
        "-days",
        "1",
        "-out",
        &s_("soft-cert.pem"),
    ]);
    req.devid_cert = vec![common::devid::der_of_pem(&dir.join("soft-cert.pem"))];
    let sign_soft = |c: &[u8]| {
        let nonce = kame_api::tpm_devid::ChallengeRequest::decode(c)
            .unwrap()
            .devid
            .unwrap();
        let mut sig = vec![0u8; soft.public_modulus_len()];
        soft.sign(
            &aws_lc_rs::signature::RSA_PKCS1_SHA256,
            &aws_lc_rs::rand::SystemRandom::new(),
            &nonce,
            &mut sig,
        )
        .unwrap();
        sig
    };
    let env = server(&tpm, &devid, false).await;
    refused(
        begin(&env, req.encode()).await.map(|_| ()),
        Code::PermissionDenied,
        "DevIDPub is not the DevID certificate's key",
    );
    no_agents(&env).await;
    env.stop().await;
    let env = server(&tpm, &devid, true).await;
    let (tx, rx, c) = begin(&env, req.encode()).await.unwrap();
    let mut resp = tokio::task::block_in_place(|| tpm_answer(&tpm, &s, &c));
    resp.devid = Some(sign_soft(&c));
    finish(tx, rx, resp.encode())
        .await
        .expect("compat_mode accepts what SPIRE accepts: the gap Kame closes by default");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_devid_spire_gap_02_rejects_unrestricted_ak_signing_a_forged_attest() {
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "node");
    let env = server(&tpm, &devid, false).await;
    let (mut req, _) = tokio::task::block_in_place(|| tpm_evidence(&tpm, &devid));
    // An unrestricted signing key can sign any TPMS_ATTEST: here the genuine certify bytes,
    // re-signed by it and presented as the AK.
    let (fake_ak, sig) = tokio::task::block_in_place(|| {
        let mut d = Device::open(&tpm.tcti).unwrap();
        let k = d
            .create_under_srk(&templates::bytes(templates::DEVID_RSA))
            .unwrap();
        let sig = d.sign(&k, req.certified_devid.as_ref().unwrap()).unwrap();
        (k, sig)
    });
    req.ak_pub = Some(fake_ak.public);
    req.certification_signature = Some(sig);
    refused(
        begin(&env, req.encode()).await.map(|_| ()),
        Code::PermissionDenied,
        "AK attributes",
    );
    no_agents(&env).await;
    env.stop().await;
}

/// SPIRE's server Attest failures 1–14 (§3.2), in SPIRE's order: each field missing or
/// malformed, a DevID from another provisioning CA, and the DevID's own certificate and
/// public blob standing in for the EK's. Each refusal names the check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_devid_attest_01_to_14_missing_malformed_and_foreign_fields_in_spire_order() {
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "node");
    let foreign_ca = provision(&tpm, "foreign");
    let env = server(&tpm, &devid, false).await;
    let (req, _) = tokio::task::block_in_place(|| tpm_evidence(&tpm, &devid));
    let ia = Code::InvalidArgument;
    let pd = Code::PermissionDenied;
    let foreign = foreign_ca.leaf_der.clone();
    let cases: Vec<(&str, Tamper, Code, &str)> = vec![
        (
            "2",
            Box::new(|r| r.devid_cert.clear()),
            ia,
            "no DevID certificate",
        ),
        (
            "3",
            Box::new(|r| r.devid_cert = vec![vec![1, 2, 3]]),
            ia,
            "DevID certificate 0 cannot be parsed",
        ),
        (
            "4",
            Box::new(move |r| r.devid_cert = vec![foreign.clone()]),
            pd,
            "DevID certificate does not chain to devid_ca_path",
        ),
        ("5", Box::new(|r| r.ak_pub = None), ia, "missing AKPub"),
        (
            "6",
            Box::new(|r| r.devid_pub = None),
            ia,
            "missing DevIDPub",
        ),
        ("7", Box::new(|r| r.ek_cert = None), ia, "missing EKCert"),
        ("8", Box::new(|r| r.ek_pub = None), ia, "missing EKPub"),
        (
            "9",
            Box::new(|r| r.ek_cert = Some(vec![0x30, 0])),
            ia,
            "EK certificate cannot be parsed",
        ),
        (
            "10",
            Box::new(|r| r.devid_pub = Some(vec![0, 1, 0])),
            ia,
            "DevIDPub is not a TPMT_PUBLIC",
        ),
        (
            "11",
            Box::new(|r| r.ak_pub = Some(vec![0, 1])),
            ia,
            "AKPub is not a TPMT_PUBLIC",
        ),
        (
            "12",
            Box::new(|r| r.ek_pub = Some(vec![0, 0x23, 0, 0x0b])),
            ia,
            "EKPub is not a TPMT_PUBLIC",
        ),
        (
            "13",
            Box::new(|r| r.ek_pub = r.devid_pub.clone()),
            pd,
            "EK public key does not match",
        ),
        (
            "14",
            Box::new(|r| {
                r.ek_cert = r.devid_cert.first().cloned();
                r.ek_pub = r.devid_pub.clone();
            }),
            pd,
            "EK certificate does not chain to endorsement_ca_path",
        ),
    ];
    for (case, tamper, code, says) in cases {
        let mut r = req.clone();
        tamper(&mut r);
        let got = begin(&env, r.encode()).await.map(|_| ());
        match &got {
            Err(s) if s.code() == code && s.message().contains(says) => {}
            other => panic!("case {case}: want {code:?} {says:?}, got {other:?}"),
        }
    }
    // 1. not JSON
    refused(
        begin(&env, b"not json".to_vec()).await.map(|_| ()),
        ia,
        "malformed",
    );
    // 13, another way: the EK public of another TPM does not match this EK certificate.
    let tpm2 = SwTpm::start().unwrap();
    let (other, _) = tokio::task::block_in_place(|| {
        let d2 = provision(&tpm2, "x");
        tpm_evidence(&tpm2, &d2)
    });
    let mut r = req.clone();
    r.ek_pub = other.ek_pub;
    refused(
        begin(&env, r.encode()).await.map(|_| ()),
        pd,
        "EK public key does not match",
    );
    no_agents(&env).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_devid_spire_gap_09_rejects_expired_and_not_yet_valid_devid_and_ek_certificates() {
    use kame_server::attestation::tpm_devid::{DevIdConfig, DevIdError, begin as verify_begin};
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "node");
    let ek = ek_cas(&tpm, devid.dir.path());
    let cfg = DevIdConfig {
        devid_roots: vec![devid.ca_der.clone()],
        ek_roots: kame_api::bundle::certs_from_pem(&std::fs::read_to_string(ek).unwrap()).unwrap(),
        compat_mode: false,
        ek_allow_list: vec![],
        require_quote: false,
        pcr_policy: Default::default(),
        ak_roots: vec![],
    };
    let (req, _) = tokio::task::block_in_place(|| tpm_evidence(&tpm, &devid));
    let now = kame_agent::manager::now_secs();
    // The verifier takes the time as input: the same evidence at three moments.
    assert!(verify_begin(&cfg, &req.encode(), now).is_ok());
    match verify_begin(&cfg, &req.encode(), now + 3 * 86400) {
        Err(DevIdError::UntrustedDevId(m)) => assert!(m.to_string().contains("expired"), "{m}"),
        other => panic!("{other:?}"),
    }
    match verify_begin(&cfg, &req.encode(), now - 86400) {
        Err(DevIdError::UntrustedDevId(m)) => {
            assert!(m.to_string().contains("not valid yet"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    // The EK certificate, through the chain check the server runs on it (the DevID check
    // comes first in SPIRE's order, so the EK's own dates are checked one step down):
    // swtpm's EK certificate is valid from its manufacture until 9999-12-31.
    let ek_cert = req.ek_cert.clone().unwrap();
    let ek_chain = |t: u64| kame_devid::chain::verify(&ek_cert, &[], &cfg.ek_roots, t);
    assert!(ek_chain(now).is_ok());
    let e = ek_chain(now - 2 * 86400).unwrap_err().to_string();
    assert!(e.contains("not valid yet"), "{e}");
    let year_10000 = 253_402_300_800;
    let e = ek_chain(year_10000).unwrap_err().to_string();
    assert!(e.contains("expired"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_devid_ek_allow_list_admits_ek_without_certificate_and_nothing_else() {
    use sha2::Digest;
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "node");
    let (req, s) = tokio::task::block_in_place(|| tpm_evidence(&tpm, &devid));
    let spki = kame_api::x509svid::ParsedCert::parse(req.ek_cert.as_ref().unwrap())
        .unwrap()
        .spki_der()
        .unwrap();
    let hash = hex::encode(sha2::Sha256::digest(&spki));
    let list = devid.dir.path().join("ek-allow.txt");
    std::fs::write(&list, format!("# EKs without certificates\n{hash}\n")).unwrap();
    let mut no_cert = req.clone();
    no_cert.ek_cert = None;
    // Without an allow list, an EK certificate is required (SPIRE's order: after AKPub, DevIDPub).
    let env = server(&tpm, &devid, false).await;
    refused(
        begin(&env, no_cert.encode()).await.map(|_| ()),
        Code::InvalidArgument,
        "missing EKCert",
    );
    env.stop().await;
    // With it, the listed EK attests without a certificate ...
    let ek_ca = ek_cas(&tpm, devid.dir.path());
    let mut o = opts(&tpm, &devid, &devid.ca, &ek_ca);
    o.agent_attestor = None;
    o.server_plugins = o.server_plugins.replace(
        "endorsement_ca_path",
        &format!(
            "ek_allow_list_path = \"{}\"\n            endorsement_ca_path",
            list.display()
        ),
    );
    let env = Env::start(o).await;
    let (tx, rx, c) = begin(&env, no_cert.encode()).await.unwrap();
    let resp = tokio::task::block_in_place(|| tpm_answer(&tpm, &s, &c));
    finish(tx, rx, resp.encode()).await.unwrap();
    env.stop().await;
    // ... and another TPM's EK, not listed and without a certificate, is refused.
    let tpm2 = SwTpm::start().unwrap();
    let devid2 = provision(&tpm2, "node2");
    let (mut req2, _) = tokio::task::block_in_place(|| tpm_evidence(&tpm2, &devid2));
    req2.ek_cert = None;
    let mut o = opts(&tpm2, &devid2, &devid2.ca, &ek_ca);
    o.agent_attestor = None;
    o.server_plugins = o.server_plugins.replace(
        "endorsement_ca_path",
        &format!(
            "ek_allow_list_path = \"{}\"\n            endorsement_ca_path",
            list.display()
        ),
    );
    let env = Env::start(o).await;
    refused(
        begin(&env, req2.encode()).await.map(|_| ()),
        Code::PermissionDenied,
        "not on ek_allow_list",
    );
    no_agents(&env).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_devid_spire_agent_message_from_byte_level_facts_is_accepted_in_compat_mode() {
    // Message 1 as SPIRE's agent builds it (tpm_devid.md §1.2, §1.9): EK from template L-1,
    // AK from AK_RSA under SRK_HIGH_RSA, certify with empty qualifying data, RSASSA/SHA-256;
    // no Version field. A compat_mode server (and the default one) accepts it.
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "spire-node");
    let (req, s) = tokio::task::block_in_place(|| {
        let mut d = Device::open(&tpm.tcti).unwrap();
        kame_agent::tpm_devid::evidence_spire(
            &mut d,
            vec![devid.leaf_der.clone()],
            devid.key.clone(),
        )
        .unwrap()
    });
    let b = |v: &Option<Vec<u8>>| v.clone().unwrap();
    let hexs = |v: &[u8]| hex::encode(v);
    // The byte-level facts.
    assert!(
        hexs(&b(&req.ak_pub)).starts_with("0001000b00050072000000100014000b0800"),
        "AK_RSA"
    );
    assert!(
        hexs(&b(&req.ek_pub)).starts_with(
            "0001000b000300b20020837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa00060080004300100800000000000100"
        ),
        "EK_L1_RSA"
    );
    assert!(
        hexs(&b(&req.devid_pub)).starts_with("0001000b00040072000000100014000b0800"),
        "DEVID_RSA"
    );
    assert!(
        hexs(&b(&req.certified_devid)).starts_with("ff5443478017"),
        "TPMS_ATTEST certify"
    );
    assert!(
        hexs(&b(&req.certification_signature)).starts_with("0014000b0100"),
        "RSASSA/SHA-256, 256 bytes"
    );
    let text = String::from_utf8(req.encode()).unwrap();
    assert!(text.starts_with(r#"{"DevIDCert":[""#), "{}", &text[..40]);
    assert!(text.contains(r#""DevIDPub":"AAEACwAEAHIA"#));
    assert!(text.contains(r#""AKPub":"AAEACwAFAHIA"#));
    assert!(text.contains(r#""CertifiedDevID":"/1RDR4AX"#));
    assert!(text.contains(r#""CertificationSignature":"ABQACwEA"#));
    assert!(!text.contains("Version"));
    for compat in [true, false] {
        let env = server(&tpm, &devid, compat).await;
        let (tx, rx, c) = begin(&env, req.encode()).await.unwrap();
        // A v1 challenge: exactly SPIRE's shape.
        let ch = String::from_utf8(c.clone()).unwrap();
        assert!(
            ch.starts_with(r#"{"DevID":""#) && !ch.contains("Version"),
            "{ch}"
        );
        let resp = tokio::task::block_in_place(|| tpm_answer(&tpm, &s, &c));
        let text = String::from_utf8(resp.encode()).unwrap();
        assert!(!text.contains("Quote"), "a v1 answer");
        finish(tx, rx, resp.encode()).await.unwrap();
        env.stop().await;
    }
}

/// SPIRE's server Attest failures 18–20 (§3.2): response not JSON, an empty response, and a
/// correct nonce signature without the credential answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_devid_attest_18_to_20_rejects_bad_empty_and_credential_less_responses() {
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "node");
    let env = server(&tpm, &devid, false).await;
    let (req, s) = tokio::task::block_in_place(|| tpm_evidence(&tpm, &devid));
    let (tx, rx, _) = begin(&env, req.encode()).await.unwrap();
    refused(
        finish(tx, rx, b"not json".to_vec()).await,
        Code::InvalidArgument,
        "malformed challenge response",
    );
    let (tx, rx, _) = begin(&env, req.encode()).await.unwrap();
    refused(
        finish(tx, rx, b"{}".to_vec()).await,
        Code::InvalidArgument,
        "no DevID signature",
    );
    let (tx, rx, c) = begin(&env, req.encode()).await.unwrap();
    let mut resp = tokio::task::block_in_place(|| tpm_answer(&tpm, &s, &c));
    resp.cred_activation = None;
    refused(
        finish(tx, rx, resp.encode()).await,
        Code::PermissionDenied,
        "credential activation failed",
    );
    no_agents(&env).await;
    env.stop().await;
}

/// SPIRE's gaps (§3.3 #2–#7): certify over another key than DevIDPub, AK and DevID attributes,
/// wrong TPMS_ATTEST magic, certify signed by another AK, a tampered credential HMAC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_devid_spire_gap_02_to_07_rejects_certify_of_other_key_attributes_magic_other_ak_and_hmac()
 {
    use kame_tpm::wire::{Public, public::attr};
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "node");
    let env = server(&tpm, &devid, false).await;
    let (req, s) = tokio::task::block_in_place(|| tpm_evidence(&tpm, &devid));
    // #2 a valid certify by this TPM's AK, over another resident key.
    let other = provision(&tpm, "other");
    let (other_req, _) = tokio::task::block_in_place(|| tpm_evidence(&tpm, &other));
    let mut r = req.clone();
    r.ak_pub = other_req.ak_pub.clone();
    r.certified_devid = other_req.certified_devid.clone();
    r.certification_signature = other_req.certification_signature.clone();
    refused(
        begin(&env, r.encode()).await.map(|_| ()),
        Code::PermissionDenied,
        "name does not match",
    );
    // #3 AK without fixedTPM; #4 DevID key without fixedTPM (same key, other attributes).
    let clear_fixed_tpm = |b: &[u8]| {
        let mut p = Public::parse(b).unwrap();
        p.attributes &= !attr::FIXED_TPM;
        p.marshal().unwrap()
    };
    let mut r = req.clone();
    r.ak_pub = Some(clear_fixed_tpm(req.ak_pub.as_ref().unwrap()));
    refused(
        begin(&env, r.encode()).await.map(|_| ()),
        Code::PermissionDenied,
        "AK attributes",
    );
    let mut r = req.clone();
    r.devid_pub = Some(clear_fixed_tpm(req.devid_pub.as_ref().unwrap()));
    refused(
        begin(&env, r.encode()).await.map(|_| ()),
        Code::PermissionDenied,
        "DevID key attributes",
    );
    // #5 wrong magic.
    let mut r = req.clone();
    if let Some(a) = r.certified_devid.as_mut() {
        a[0] ^= 0xff;
    }
    refused(
        begin(&env, r.encode()).await.map(|_| ()),
        Code::PermissionDenied,
        "certification of the DevID",
    );
    // #6 certify signed by another AK (the other TPM key's AK signature over our attest).
    let mut r = req.clone();
    r.certification_signature = other_req.certification_signature.clone();
    refused(
        begin(&env, r.encode()).await.map(|_| ()),
        Code::PermissionDenied,
        "certification of the DevID",
    );
    no_agents(&env).await;
    // #7 a tampered credential HMAC: the TPM refuses to activate it.
    let (tx, rx, c) = begin(&env, req.encode()).await.unwrap();
    drop((tx, rx));
    let mut ch = kame_api::tpm_devid::ChallengeRequest::decode(&c).unwrap();
    if let Some(cr) = ch.cred_activation.as_mut() {
        cr.credential[4] ^= 1;
    }
    let e = tokio::task::block_in_place(|| {
        let mut d = Device::open(&tpm.tcti).unwrap();
        answer(&mut d, &s, &ch.encode()).unwrap_err().to_string()
    });
    assert!(e.contains("ActivateCredential"), "{e}");
    env.stop().await;
}

/// SPIRE's server Attest failure 16 (§3.2): an AK whose nameAlg is NULL has no name, so no
/// credential can be made for it; refused as bad input, never an internal error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_devid_attest_16_rejects_ak_with_null_name_alg() {
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "node");
    let env = server(&tpm, &devid, true).await;
    let (mut req, _) = tokio::task::block_in_place(|| tpm_evidence(&tpm, &devid));
    if let Some(ak) = req.ak_pub.as_mut() {
        ak[2] = 0x00;
        ak[3] = 0x10; // nameAlg TPM_ALG_NULL
    }
    let r = begin(&env, req.encode()).await.map(|_| ());
    let e = r.unwrap_err();
    assert_ne!(e.code(), Code::Internal, "{e:?}");
    assert!(
        e.message().contains("AKPub") || e.message().contains("certification"),
        "{e:?}"
    );
    env.stop().await;
}

/// SPIRE's server Attest case 17 (the agent's challenge handler fails): the agent ends the
/// stream instead of answering. The server refuses with a clear error, attests nothing, and
/// goes on serving; an agent that resets the stream outright changes nothing either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_devid_attest_17_agent_ends_the_stream_instead_of_answering() {
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "node");
    let env = server(&tpm, &devid, false).await;
    let (req, s) = tokio::task::block_in_place(|| tpm_evidence(&tpm, &devid));
    // Half-closed: the agent sends nothing more.
    let (tx, mut rx, _) = begin(&env, req.encode()).await.unwrap();
    drop(tx);
    refused(
        rx.message().await,
        Code::InvalidArgument,
        "stream closed before the challenge response",
    );
    // Reset: the agent drops the call.
    let (tx, rx, _) = begin(&env, req.encode()).await.unwrap();
    drop((tx, rx));
    no_agents(&env).await;
    // The server still attests a genuine agent.
    let (tx, rx, c) = begin(&env, req.encode()).await.unwrap();
    let resp = tokio::task::block_in_place(|| tpm_answer(&tpm, &s, &c));
    finish(tx, rx, resp.encode()).await.unwrap();
    env.stop().await;
}

/// SPIRE's agent AidAttestation case 3: the server's stream fails before any challenge (here
/// a server without the tpm_devid attestor, then one that does not trust the DevID CA). The
/// agent's attestor returns the server's refusal, code and message, and does not go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_devid_agent_03_server_stream_fails_before_the_challenge() {
    use kame_agent::attestation::AttestError;
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "node");
    let p = |n: &str| devid.dir.path().join(n);
    let cfg = kame_agent::tpm_devid::TpmDevidConfig {
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
    // No tpm_devid attestor configured on the server.
    let env = Env::start(common::Opts::default()).await;
    match common::driver::attest_with(&env, &cfg).await {
        Err(AttestError::Refused { code, message }) => {
            assert_eq!(code, Code::InvalidArgument, "{message}");
            assert!(message.contains("tpm_devid"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    env.stop().await;
    // The DevID CA is not trusted.
    let other = provision(&tpm, "other");
    let ek_ca = ek_cas(&tpm, devid.dir.path());
    let mut o = opts(&tpm, &devid, &other.ca, &ek_ca);
    o.agent_attestor = None;
    let env = Env::start(o).await;
    match common::driver::attest_with(&env, &cfg).await {
        Err(AttestError::Refused { code, message }) => {
            assert_eq!(code, Code::PermissionDenied, "{message}");
            assert!(message.contains("devid_ca_path"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    no_agents(&env).await;
    env.stop().await;
}
