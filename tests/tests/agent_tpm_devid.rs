//! tpm_devid end to end on a fresh swtpm: a DevID key made in the TPM from SPIRE's template
//! under the SRK, its certificate issued by a test CA (openssl), the agent attesting with it
//! (EK certificate from the swtpm-localca, credential activation, certify by an AK), the agent
//! ID and selectors SPIRE would give, a workload served through that agent, and refusals for
//! an untrusted DevID CA and an untrusted EK CA.

mod common;

use common::{Env, Opts, TD, my_uid};
use kame_api::pb;
use kame_tpm::device::Device;
use kame_tpm::testing::SwTpm;
use kame_tpm::wire::{Public, public::templates};
use sha1::Digest;
use std::path::{Path, PathBuf};

struct DevId {
    dir: tempfile::TempDir,
    cert: PathBuf,
    ca: PathBuf,
    ca_der: Vec<u8>,
    leaf_der: Vec<u8>,
}

fn openssl(args: &[&str]) {
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

fn der_of_pem(p: &Path) -> Vec<u8> {
    kame_api::bundle::certs_from_pem(&std::fs::read_to_string(p).unwrap()).unwrap()[0].clone()
}

/// A DevID key in the TPM (SPIRE's DEVID_RSA template), blobs in SPIRE's format, and a
/// certificate for it from a fresh test CA with subject CN `cn`.
fn provision(tpm: &SwTpm, cn: &str) -> DevId {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let mut d = Device::open(&tpm.tcti).unwrap();
    let key = d
        .create_under_srk(&templates::bytes(templates::DEVID_RSA))
        .unwrap();
    std::fs::write(p("devid.pub"), &key.public).unwrap();
    std::fs::write(p("devid.priv"), &key.private).unwrap();
    let spki = Public::parse(&key.public).unwrap().spki_der().unwrap();
    std::fs::write(
        p("devid_key.pem"),
        kame_api::bundle::pem_block("PUBLIC KEY", &spki),
    )
    .unwrap();
    let s = |x: &Path| x.display().to_string();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &s(&p("ca.key")),
        "-out",
        &s(&p("ca.pem")),
        "-subj",
        "/CN=Kame Test DevID CA",
        "-days",
        "2",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(&[
        "x509",
        "-new",
        "-subj",
        &format!("/CN={cn}"),
        "-force_pubkey",
        &s(&p("devid_key.pem")),
        "-CA",
        &s(&p("ca.pem")),
        "-CAkey",
        &s(&p("ca.key")),
        "-days",
        "1",
        "-out",
        &s(&p("devid.pem")),
    ]);
    DevId {
        cert: p("devid.pem"),
        ca: p("ca.pem"),
        ca_der: der_of_pem(&p("ca.pem")),
        leaf_der: der_of_pem(&p("devid.pem")),
        dir,
    }
}

fn ek_cas(tpm: &SwTpm, into: &Path) -> PathBuf {
    let mut pem = std::fs::read_to_string(tpm.dir().join("ek-root-ca.pem")).unwrap();
    pem.push_str(&std::fs::read_to_string(tpm.dir().join("ek-intermediate-ca.pem")).unwrap());
    let out = into.join("endorsement-cas.pem");
    std::fs::write(&out, pem).unwrap();
    out
}

fn opts(tpm: &SwTpm, devid: &DevId, devid_ca: &Path, ek_ca: &Path) -> Opts {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_devid_agent_attests_on_swtpm_with_spire_id_and_selectors_and_serves_workloads() {
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "devid-node-1");
    let ek_ca = ek_cas(&tpm, devid.dir.path());
    let env = Env::start(opts(&tpm, &devid, &devid.ca, &ek_ca)).await;
    // The agent shows up with SPIRE's ID and selectors.
    let path = env
        .agent_id
        .trim_start_matches(&format!("spiffe://{TD}"))
        .to_string();
    let mut agent = None;
    for _ in 0..100 {
        let r = pb::agent::agent_client::AgentClient::new(env.admin().await)
            .get_agent(pb::agent::GetAgentRequest {
                id: Some(common::sid(TD, &path)),
                output_mask: None,
            })
            .await;
        if let Ok(a) = r {
            agent = Some(a.into_inner());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let agent = agent.expect("agent attested with tpm_devid");
    assert_eq!(agent.attestation_type, "tpm_devid");
    assert!(agent.can_reattest);
    let sels: Vec<String> = agent
        .selectors
        .iter()
        .map(|s| format!("{}:{}", s.r#type, s.value))
        .collect();
    let ca_fp = hex::encode(sha1::Sha1::digest(&devid.ca_der));
    assert_eq!(
        sels,
        vec![
            "tpm_devid:subject:cn:devid-node-1".to_string(),
            "tpm_devid:issuer:cn:Kame Test DevID CA".to_string(),
            format!("tpm_devid:ca:fingerprint:{ca_fp}"),
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
    let kame_agent::config::NodeAttestorConfig::TpmDevid(t) = cfg.node_attestor else {
        panic!("tpm_devid config expected");
    };
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
    let r = kame_agent::attestation::NodeAttestor::TpmDevid(t)
        .attest(ch, kame_agent::keys::csr(&key).unwrap())
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    env.stop().await;
    r
}
