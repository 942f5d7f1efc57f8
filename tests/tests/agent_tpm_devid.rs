//! tpm_devid end to end on a fresh swtpm: a DevID key made in the TPM from SPIRE's template
//! under the SRK, its certificate issued by a test CA (openssl), the agent attesting with it
//! (EK certificate from the swtpm-localca, credential activation, certify by an AK), the agent
//! ID and selectors SPIRE would give, a workload served through that agent, and refusals for
//! an untrusted DevID CA and an untrusted EK CA.

mod common;

use common::devid::{DevId, ek_cas, opts, provision};
use common::{Env, Opts, TD, my_uid, wait_agent};
use kame_api::pb;
use kame_tpm::testing::SwTpm;
use sha2::Digest;
use std::path::Path;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_devid_attest_success_03_agent_on_swtpm_no_intermediate_spire_id_selectors_and_workloads()
 {
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "devid-node-1");
    let ek_ca = ek_cas(&tpm, devid.dir.path());
    let env = Env::start(opts(&tpm, &devid, &devid.ca, &ek_ca)).await;
    // The agent shows up with SPIRE's ID and selectors.
    let agent = wait_agent(&env).await;
    assert_eq!(agent.attestation_type, "tpm_devid");
    assert!(agent.can_reattest);
    let sels: Vec<String> = agent
        .selectors
        .iter()
        .map(|s| format!("{}:{}", s.r#type, s.value))
        .collect();
    let ca_fp = hex::encode(<sha1::Sha1 as sha1::Digest>::digest(&devid.ca_der));
    // The EK hash is over the SubjectPublicKeyInfo DER as the EK certificate carries it.
    let ek_cert = kame_tpm::device::Device::open(&tpm.tcti)
        .unwrap()
        .ek_certificate(kame_tpm::device::EkAlg::Rsa2048)
        .unwrap()
        .unwrap();
    let ek_spki = kame_api::x509svid::ParsedCert::parse(&ek_cert)
        .unwrap()
        .spki_der()
        .unwrap();
    let ek_hash = hex::encode(sha2::Sha256::digest(&ek_spki));
    assert_eq!(
        sels,
        vec![
            // SPIRE's, in SPIRE's order ...
            "tpm_devid:subject:cn:devid-node-1".to_string(),
            "tpm_devid:issuer:cn:Kame Test DevID CA".to_string(),
            format!("tpm_devid:ca:fingerprint:{ca_fp}"),
            // ... then Kame's: the EK, and the quoted PCRs (v2; a fresh swtpm's are zero).
            format!("tpm_devid:ek:pubhash:sha256:{ek_hash}"),
            format!("tpm_devid:pcr:sha256:0:{}", "0".repeat(64)),
            format!("tpm_devid:pcr:sha256:7:{}", "0".repeat(64)),
        ]
    );

    // A workload gets its SVID through this agent.
    env.register(
        "/tpm-workload",
        &[&format!("unix:uid:{}", my_uid())],
        |_| {},
    )
    .await;
    env.wait_for_svids(&["/tpm-workload"]).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_devid_rejects_untrusted_devid_ca_and_untrusted_ek_ca() {
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "devid-node-2");
    let other = provision(&tpm, "other");
    let ek_ca = ek_cas(&tpm, devid.dir.path());
    check_refusals(&tpm, &devid, &other, &ek_ca).await;
}

async fn check_refusals(tpm: &SwTpm, devid: &DevId, other: &DevId, ek_ca: &Path) {
    // Untrusted DevID CA.
    let e = attest_direct(opts(tpm, devid, &other.ca, ek_ca))
        .await
        .unwrap_err();
    assert!(e.contains("devid_ca_path"), "{e}");
    // Untrusted EK CA (the DevID CA stands in for a wrong vendor root).
    let e = attest_direct(opts(tpm, devid, &devid.ca, &devid.ca))
        .await
        .unwrap_err();
    assert!(e.contains("endorsement_ca_path"), "{e}");
    // Positive control with the same material.
    attest_direct(opts(tpm, devid, &devid.ca, ek_ca))
        .await
        .unwrap();
}

/// Attests with the agent's attestor directly against a server started from `o`.
async fn attest_direct(o: Opts) -> Result<(), String> {
    let mut o2 = o;
    let (block, _) = o2.agent_attestor.take().unwrap();
    // A server with the tpm_devid attestor; the agent half runs by hand.
    let env = Env::start(Opts {
        server_plugins: o2.server_plugins.clone(),
        ..Default::default()
    })
    .await;
    let cfg_text = format!(
        "agent {{\n trust_domain = \"{TD}\"\n server_address = \"x\"\n trust_bundle_path = \"x\"\n}}\nplugins {{\n {block}\n KeyManager \"memory\" {{}}\n WorkloadAttestor \"unix\" {{}}\n}}\n"
    );
    let cfg = kame_agent::config::Config::parse(&cfg_text, false).unwrap();
    let kame_agent::config::NodeAttestorConfig::Plugin(p) = cfg.node_attestor else {
        panic!("tpm_devid config expected");
    };
    let t: kame_agent::tpm_devid::TpmDevidConfig = p.as_any().downcast_ref().cloned().unwrap();
    let r = common::driver::attest_with(&env, &t)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    env.stop().await;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_devid_802_1ar_fields_become_selectors() {
    let tpm = SwTpm::start().unwrap();
    let devid = common::devid::provision_with(
        &tpm,
        "/CN=edge-7/serialNumber=SN-0042",
        Some(
            "[ext]\nsubjectAltName=otherName:1.3.6.1.5.5.7.8.4;SEQUENCE:hwmn\n[hwmn]\nhwType=OID:1.3.6.1.4.1.45724.3.1\nhwSerialNum=FORMAT:HEX,OCTETSTRING:0a0b0c0d\n",
        ),
    );
    let ek_ca = ek_cas(&tpm, devid.dir.path());
    let env = Env::start(opts(&tpm, &devid, &devid.ca, &ek_ca)).await;
    let agent = wait_agent(&env).await;
    let sels: Vec<String> = agent.selectors.iter().map(|s| s.value.clone()).collect();
    assert!(sels.contains(&"subject:cn:edge-7".to_string()), "{sels:?}");
    assert!(
        sels.contains(&"subject:serialnumber:SN-0042".to_string()),
        "{sels:?}"
    );
    assert!(
        sels.contains(&"hwmodulename:1.3.6.1.4.1.45724.3.1:0a0b0c0d".to_string()),
        "{sels:?}"
    );
    env.stop().await;
}

async fn agent_selectors(env: &Env) -> Vec<String> {
    wait_agent(env)
        .await
        .selectors
        .iter()
        .map(|s| s.value.clone())
        .collect()
}

/// SPIRE's server success cases 1 and 2 (§3.2): RSA and ECC DevIDs with an intermediate CA;
/// the exact ordered SPIRE selectors (then Kame's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_devid_attest_success_01_02_tpmutil_07_10_12_rsa_and_ecc_devid_with_intermediate() {
    for ecc in [false, true] {
        let tpm = SwTpm::start().unwrap();
        let (devid, int_der) = common::devid::provision_chain(&tpm, ecc);
        let ek_ca = ek_cas(&tpm, devid.dir.path());
        let env = Env::start(opts(&tpm, &devid, &devid.ca, &ek_ca)).await;
        let sels = agent_selectors(&env).await;
        let fp = |d: &[u8]| hex::encode(<sha1::Sha1 as sha1::Digest>::digest(d));
        assert_eq!(
            sels[..4],
            [
                "subject:cn:devid-leaf".to_string(),
                "issuer:cn:intermediate".to_string(),
                format!("ca:fingerprint:{}", fp(&int_der)),
                format!("ca:fingerprint:{}", fp(&devid.ca_der)),
            ],
            "ecc={ecc}"
        );
        assert!(sels[4].starts_with("ek:pubhash:sha256:"), "{sels:?}");
        env.stop().await;
    }
}

/// ECC and high-range EKs (Kame only; SPIRE uses the RSA-2048 L-1 EK): the agent attests with
/// the swtpm's ECC P-384 EK (template H-3, SHA-384, PolicyOR policy) and its certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_devid_agent_attests_with_high_range_ecc_p384_ek() {
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "ecc-ek-node");
    let ek_ca = ek_cas(&tpm, devid.dir.path());
    let mut o = opts(&tpm, &devid, &devid.ca, &ek_ca);
    if let Some((block, _)) = o.agent_attestor.as_mut() {
        *block = block.replace(
            "tcti = ",
            "ek_algorithm = \"ecc-p384\"\n            tcti = ",
        );
    }
    let env = Env::start(o).await;
    let sels = agent_selectors(&env).await;
    // The EK hash is the P-384 EK's.
    let ek_cert = kame_tpm::device::Device::open(&tpm.tcti)
        .unwrap()
        .ek_certificate(kame_tpm::device::EkAlg::EccP384)
        .unwrap()
        .unwrap();
    let spki = kame_api::x509svid::ParsedCert::parse(&ek_cert)
        .unwrap()
        .spki_der()
        .unwrap();
    let want = format!(
        "ek:pubhash:sha256:{}",
        hex::encode(sha2::Sha256::digest(&spki))
    );
    assert!(sels.contains(&want), "{sels:?}");
    env.register(
        "/ecc-ek-workload",
        &[&format!("unix:uid:{}", my_uid())],
        |_| {},
    )
    .await;
    env.wait_for_svids(&["/ecc-ek-workload"]).await;
    env.stop().await;
}

/// can_reattest: with an 8 s agent SVID the agent attests again with the TPM at half life
/// (a new SVID under the same ID), and keeps serving workloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_devid_agent_reattests_with_the_tpm_to_renew_its_svid() {
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "renewing-node");
    let ek_ca = ek_cas(&tpm, devid.dir.path());
    let mut o = opts(&tpm, &devid, &devid.ca, &ek_ca);
    o.extra_server = "agent_ttl = \"8s\"";
    let env = Env::start(o).await;
    agent_selectors(&env).await;
    let path = env
        .agent_id
        .trim_start_matches(&format!("spiffe://{TD}"))
        .to_string();
    let serial = || async {
        pb::agent::agent_client::AgentClient::new(env.admin().await)
            .get_agent(pb::agent::GetAgentRequest {
                id: Some(common::sid(TD, &path)),
                output_mask: None,
            })
            .await
            .unwrap()
            .into_inner()
            .x509svid_serial_number
    };
    let first = serial().await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while serial().await == first {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent did not re-attest"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    env.register(
        "/after-reattest",
        &[&format!("unix:uid:{}", my_uid())],
        |_| {},
    )
    .await;
    env.wait_for_svids(&["/after-reattest"]).await;
    env.stop().await;
}

/// EK intermediates read by the agent from the TPM's NV chain range and sent (Kame's
/// EKCertChain): the server's endorsement bundle then needs only the vendor root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_devid_ek_intermediate_from_tpm_nv_chains_to_a_root_only_bundle() {
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "chain-node");
    let root_only = devid.dir.path().join("ek-root-only.pem");
    std::fs::copy(tpm.dir().join("ek-root-ca.pem"), &root_only).unwrap();
    // Without the intermediate in NV, a root-only bundle does not verify the EK (checked at
    // the verifier, so no agent holds the single-client swtpm connection meanwhile).
    use kame_server::attestation::tpm_devid::{DevIdConfig, DevIdError, begin};
    let cfg = DevIdConfig {
        devid_roots: vec![devid.ca_der.clone()],
        ek_roots: kame_api::bundle::certs_from_pem(&std::fs::read_to_string(&root_only).unwrap())
            .unwrap(),
        compat_mode: false,
        ek_allow_list: vec![],
        require_quote: false,
        pcr_policy: Default::default(),
        ak_roots: vec![],
    };
    let message = |tcti: &str| {
        let mut d = kame_tpm::device::Device::open(tcti).unwrap();
        kame_agent::tpm_devid::evidence(&mut d, vec![devid.leaf_der.clone()], devid.key.clone())
            .unwrap()
            .0
    };
    let req = tokio::task::block_in_place(|| message(&tpm.tcti));
    assert!(req.ek_cert_chain.is_empty());
    let now = kame_agent::manager::now_secs();
    assert!(matches!(
        begin(&cfg, &req.encode(), now),
        Err(DevIdError::UntrustedEk(_))
    ));
    // The vendor puts the intermediate into NV 0x01c00100; the agent sends it.
    let der = common::devid::der_of_pem(&tpm.dir().join("ek-intermediate-ca.pem"));
    std::fs::write(tpm.dir().join("inter.der"), &der).unwrap();
    let size = der.len().to_string();
    for args in [
        vec![
            "tpm2_nvdefine",
            "0x01c00100",
            "-C",
            "o",
            "-s",
            &size,
            "-a",
            "ownerread|ownerwrite|authread|authwrite",
        ],
        vec!["tpm2_nvwrite", "0x01c00100", "-C", "o", "-i", "inter.der"],
    ] {
        let o = tpm.tpm2(args[0], &args[1..]).unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let req = tokio::task::block_in_place(|| message(&tpm.tcti));
    assert_eq!(
        req.ek_cert_chain,
        vec![der.clone()],
        "the agent reads the NV chain"
    );
    assert!(begin(&cfg, &req.encode(), now).is_ok());
    let env = Env::start(opts(&tpm, &devid, &devid.ca, &root_only)).await;
    agent_selectors(&env).await;
    env.stop().await;
}
