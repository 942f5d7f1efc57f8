//! tpm_devid refusals, each a named case from SPIRE's catalogue and the gaps it leaves
//! (`tpm_devid.md` §3.2, §3.3, §1.8), driven message by message against a real server with
//! evidence from real swtpm TPMs, tampered where the case says. Every refusal is checked for
//! the check that failed, and nothing is attested.

mod common;

use common::devid::{DevId, ek_cas, opts, provision};
use common::{Env, TD};
use kame_agent::tpm_devid::{Session, answer, evidence};
use kame_api::pb;
use kame_api::tpm_devid::{AttestationRequest, ChallengeResponse};
use kame_tpm::device::Device;
use kame_tpm::testing::SwTpm;
use kame_tpm::wire::public::templates;
use tonic::Code;

type Tx = tokio::sync::mpsc::Sender<pb::agent::AttestAgentRequest>;
type Tamper = Box<dyn Fn(&mut AttestationRequest)>;
type Rx = tonic::Streaming<pb::agent::AttestAgentResponse>;

/// A server with tpm_devid trusting `devid`'s CA and the swtpm's EK CAs.
async fn server(tpm: &SwTpm, devid: &DevId, compat: bool) -> Env {
    let ek_ca = ek_cas(tpm, devid.dir.path());
    let mut o = opts(tpm, devid, &devid.ca, &ek_ca);
    o.agent_attestor = None;
    if compat {
        o.server_plugins = o.server_plugins.replace(
            "endorsement_ca_path",
            "compat_mode = true\n            endorsement_ca_path",
        );
    }
    Env::start(o).await
}

/// Sends message 1; returns the stream and the server's challenge (or its refusal).
async fn begin(env: &Env, payload: Vec<u8>) -> Result<(Tx, Rx, Vec<u8>), tonic::Status> {
    let roots: Vec<Vec<u8>> = env
        .bundle()
        .await
        .x509_authorities
        .iter()
        .map(|c| c.asn1.clone())
        .collect();
    let ch = kame_agent::client::connect(
        "127.0.0.1",
        env.tcp_port,
        &kame_api::SpiffeId::parse(&format!("spiffe://{TD}/spire/server")).unwrap(),
        std::sync::Arc::new(std::sync::RwLock::new(roots)),
        None,
    )
    .await
    .unwrap();
    let key = kame_agent::keys::generate().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(pb::agent::AttestAgentRequest {
        step: Some(pb::agent::attest_agent_request::Step::Params(
            pb::agent::attest_agent_request::Params {
                data: Some(pb::types::AttestationData {
                    r#type: "tpm_devid".into(),
                    payload,
                }),
                params: Some(pb::agent::AgentX509svidParams {
                    csr: kame_agent::keys::csr(&key).unwrap(),
                }),
            },
        )),
    })
    .await
    .unwrap();
    let mut stream = pb::agent::agent_client::AgentClient::new(ch)
        .attest_agent(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    match stream.message().await?.and_then(|m| m.step) {
        Some(pb::agent::attest_agent_response::Step::Challenge(c)) => Ok((tx, stream, c)),
        other => panic!("expected a challenge, got {other:?}"),
    }
}

/// Sends message 3; returns the agent SPIFFE ID or the refusal.
async fn finish(tx: Tx, mut rx: Rx, response: Vec<u8>) -> Result<String, tonic::Status> {
    tx.send(pb::agent::AttestAgentRequest {
        step: Some(pb::agent::attest_agent_request::Step::ChallengeResponse(
            response,
        )),
    })
    .await
    .unwrap();
    match rx.message().await?.and_then(|m| m.step) {
        Some(pb::agent::attest_agent_response::Step::Result(r)) => {
            let svid = r.svid.unwrap();
            let id = svid.id.unwrap();
            Ok(format!("spiffe://{}{}", id.trust_domain, id.path))
        }
        other => panic!("expected a result, got {other:?}"),
    }
}

fn tpm_evidence(tpm: &SwTpm, devid: &DevId) -> (AttestationRequest, Session) {
    let mut d = Device::open(&tpm.tcti).unwrap();
    evidence(&mut d, vec![devid.leaf_der.clone()], devid.key.clone()).unwrap()
}

fn tpm_answer(tpm: &SwTpm, s: &Session, challenge: &[u8]) -> ChallengeResponse {
    let mut d = Device::open(&tpm.tcti).unwrap();
    answer(&mut d, s, challenge).unwrap()
}

fn refused(r: Result<impl std::fmt::Debug, tonic::Status>, code: Code, says: &str) {
    match r {
        Err(s) => {
            assert_eq!(s.code(), code, "{s:?}");
            assert!(
                s.message().contains(says),
                "{says:?} not in {:?}",
                s.message()
            );
        }
        Ok(v) => panic!("accepted: {v:?}"),
    }
}

async fn no_agents(env: &Env) {
    let agents = pb::agent::agent_client::AgentClient::new(env.admin().await)
        .list_agents(pb::agent::ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert!(
        agents.iter().all(|a| a.attestation_type != "tpm_devid"),
        "nothing attested through tpm_devid: {agents:?}"
    );
}

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
async fn tpm_devid_rejects_replayed_challenge_response() {
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
async fn tpm_devid_rejects_devid_from_another_tpm() {
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
async fn tpm_devid_rejects_swapped_devid_pub_and_software_devid_key_with_genuine_ek() {
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
async fn tpm_devid_rejects_unrestricted_ak() {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_devid_rejects_missing_fields_in_spire_order_and_malformed_messages() {
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "node");
    let env = server(&tpm, &devid, false).await;
    let (req, _) = tokio::task::block_in_place(|| tpm_evidence(&tpm, &devid));
    let cases: Vec<(Tamper, &str)> = vec![
        (Box::new(|r| r.devid_cert.clear()), "no DevID certificate"),
        (
            Box::new(|r| r.devid_cert = vec![vec![1, 2, 3]]),
            "DevID certificate 0 cannot be parsed",
        ),
        (Box::new(|r| r.ak_pub = None), "missing AKPub"),
        (Box::new(|r| r.devid_pub = None), "missing DevIDPub"),
        (Box::new(|r| r.ek_cert = None), "missing EKCert"),
        (Box::new(|r| r.ek_pub = None), "missing EKPub"),
        (
            Box::new(|r| r.ek_cert = Some(vec![0x30, 0])),
            "EK certificate cannot be parsed",
        ),
        (
            Box::new(|r| r.ak_pub = Some(vec![0, 1])),
            "AKPub is not a TPMT_PUBLIC",
        ),
    ];
    for (tamper, says) in cases {
        let mut r = req.clone();
        tamper(&mut r);
        refused(
            begin(&env, r.encode()).await.map(|_| ()),
            Code::InvalidArgument,
            says,
        );
    }
    refused(
        begin(&env, b"not json".to_vec()).await.map(|_| ()),
        Code::InvalidArgument,
        "malformed",
    );
    // The EK public of another TPM does not match this EK certificate.
    let tpm2 = SwTpm::start().unwrap();
    let (other, _) = tokio::task::block_in_place(|| {
        let d2 = provision(&tpm2, "x");
        tpm_evidence(&tpm2, &d2)
    });
    let mut r = req.clone();
    r.ek_pub = other.ek_pub;
    refused(
        begin(&env, r.encode()).await.map(|_| ()),
        Code::PermissionDenied,
        "EK public key does not match",
    );
    no_agents(&env).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_devid_rejects_expired_and_not_yet_valid_devid_certificates() {
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
    };
    let (req, _) = tokio::task::block_in_place(|| tpm_evidence(&tpm, &devid));
    let now = kame_agent::manager::now_secs();
    // The verifier takes the time as input: the same evidence at three moments.
    assert!(verify_begin(&cfg, &req.encode(), now).is_ok());
    match verify_begin(&cfg, &req.encode(), now + 3 * 86400) {
        Err(DevIdError::UntrustedDevId(m)) => assert!(m.contains("expired"), "{m}"),
        other => panic!("{other:?}"),
    }
    match verify_begin(&cfg, &req.encode(), now - 86400) {
        Err(DevIdError::UntrustedDevId(m)) => assert!(m.contains("not valid yet"), "{m}"),
        other => panic!("{other:?}"),
    }
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
async fn tpm_devid_v2_pcr_policy_passes_refuses_after_extend_and_reports_reboot() {
    let mut tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "node");
    let ek_ca = ek_cas(&tpm, devid.dir.path());
    // Policy: PCR 7 as it is now (a fresh TPM: zero); v1 agents refused.
    let mut o = opts(&tpm, &devid, &devid.ca, &ek_ca);
    o.agent_attestor = None;
    o.server_plugins = o.server_plugins.replace(
        "endorsement_ca_path",
        &format!(
            "require_quote = true\n            pcr_policy {{\n                sha256 = {{\n                    \"7\" = \"{}\"\n                }}\n            }}\n            endorsement_ca_path",
            "00".repeat(32)
        ),
    );
    let env = Env::start(o).await;
    let attempt = |tcti: String| {
        let devid_key = devid.key.clone();
        let leaf = devid.leaf_der.clone();
        move || {
            let mut d = Device::open(&tcti).unwrap();
            evidence(&mut d, vec![leaf], devid_key).unwrap()
        }
    };
    // 1. Matching PCRs: attested, with the PCR selector.
    let (req, s) = tokio::task::block_in_place(attempt(tpm.tcti.clone()));
    assert_eq!(req.version, Some(2));
    let (tx, rx, c) = begin(&env, req.encode()).await.unwrap();
    let ch = kame_api::tpm_devid::ChallengeRequest::decode(&c).unwrap();
    assert_eq!((ch.version, ch.pcrs.clone()), (Some(2), vec![7]));
    let resp = tokio::task::block_in_place(|| tpm_answer(&tpm, &s, &c));
    let id = finish(tx, rx, resp.encode()).await.unwrap();
    let node = env
        .server
        .as_ref()
        .unwrap()
        .ctx
        .ds
        .fetch_node(&id)
        .await
        .unwrap()
        .unwrap();
    assert!(
        node.selectors
            .iter()
            .any(|s| s.value == format!("pcr:sha256:7:{}", "00".repeat(32))),
        "{:?}",
        node.selectors
    );
    assert_eq!(node.tpm_reboots, 0);
    let boot = node.tpm_boot.expect("clockInfo recorded");
    // 2. A v1 message (no Version) is refused: require_quote.
    let mut v1 = req.clone();
    v1.version = None;
    refused(
        begin(&env, v1.encode()).await.map(|_| ()),
        Code::PermissionDenied,
        "requires a PCR quote",
    );
    // 3. PCR 7 extended (e.g. Secure Boot state changed): refused, naming the PCR.
    tpm.tpm2(
        "tpm2_pcrextend",
        &[&format!("7:sha256={}", "ab".repeat(32))],
    )
    .unwrap();
    let (req, s) = tokio::task::block_in_place(attempt(tpm.tcti.clone()));
    let (tx, rx, c) = begin(&env, req.encode()).await.unwrap();
    let resp = tokio::task::block_in_place(|| tpm_answer(&tpm, &s, &c));
    refused(
        finish(tx, rx, resp.encode()).await,
        Code::PermissionDenied,
        "PCR sha256:7 is",
    );
    // 4. Reboot (swtpm power cycle): PCRs are back to the policy, the reset is counted.
    tpm.restart().unwrap();
    let (req, s) = tokio::task::block_in_place(attempt(tpm.tcti.clone()));
    let (tx, rx, c) = begin(&env, req.encode()).await.unwrap();
    let resp = tokio::task::block_in_place(|| tpm_answer(&tpm, &s, &c));
    let id2 = finish(tx, rx, resp.encode()).await.unwrap();
    assert_eq!(id2, id);
    let node = env
        .server
        .as_ref()
        .unwrap()
        .ctx
        .ds
        .fetch_node(&id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(node.tpm_reboots, 1, "reboot reported");
    assert!(node.tpm_boot.unwrap().0 > boot.0);
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
async fn tpm_devid_rejects_bad_empty_and_credential_less_responses() {
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
async fn tpm_devid_rejects_spire_gaps_certify_of_other_key_attributes_magic_other_ak_and_hmac() {
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
async fn tpm_devid_rejects_ak_with_null_name_alg() {
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
