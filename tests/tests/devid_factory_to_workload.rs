//! From the factory to a workload on one software TPM: manufacture (TCG IAK and IDevID
//! primaries, TCG-CSR-IDEVID, the manufacturer CA's checks and credential activation, IAK and
//! IDevID certificates), LDevID enrollment with an owner CA (a new TPM key certified by the
//! IAK over the owner CA's nonce, signed by the IDevID), then the agent attests with tpm_devid
//! using the LDevID and a workload gets its SVID.

mod common;

use common::devid::{DevId, ek_cas, opts};
use common::{Env, my_uid, wait_agent};
use kame_devid::ca::DevIdCa;
use kame_devid::enroll::{
    Challenges, IdevidRequest, LdevidRequest, Nonces, verify_idevid_request, verify_ldevid_request,
};
use kame_tpm::device::{Device, EkAlg};
use kame_tpm::testing::SwTpm;
use kame_tpm::wire::{self, policy::DevIdKey, public::templates};
use std::sync::Arc;
use std::time::Duration;

const IDEVID: u32 = 0x8102_0000;
const IAK: u32 = 0x8102_0001;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn pem_ders(path: &std::path::Path) -> Vec<Vec<u8>> {
    use base64::Engine;
    let text = std::fs::read_to_string(path).unwrap();
    text.split("-----BEGIN CERTIFICATE-----")
        .skip(1)
        .map(|b| {
            let body: String = b
                .split("-----END CERTIFICATE-----")
                .next()
                .unwrap()
                .lines()
                .map(str::trim)
                .collect();
            base64::engine::general_purpose::STANDARD
                .decode(body)
                .unwrap()
        })
        .collect()
}

fn pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devid_factory_to_workload_manufacture_ldevid_enrollment_tpm_devid_attestation() {
    let tpm = SwTpm::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ek_ca = ek_cas(&tpm, dir.path());
    let ek_all = pem_ders(&ek_ca);
    let mut dev = Device::open(&tpm.tcti).unwrap();

    // Manufacture.
    let iak_pub = dev.provision_tcg_key(DevIdKey::Iak, false, IAK).unwrap();
    let idevid_pub = dev
        .provision_tcg_key(DevIdKey::IDevId, false, IDEVID)
        .unwrap();
    let (certify, certify_sig) = dev.certify_tcg(IDEVID, DevIdKey::IDevId, IAK, &[]).unwrap();
    let req = IdevidRequest {
        hash_alg: wire::alg::SHA256,
        prod_model: "kame-edge".into(),
        prod_serial: "SN-FACTORY-1".into(),
        ek_cert: dev.ek_certificate(EkAlg::Rsa2048).unwrap().unwrap(),
        attest_pub: iak_pub.clone(),
        signing_pub: idevid_pub.clone(),
        sgn_certify_info: certify,
        sgn_certify_info_sig: certify_sig,
        ..Default::default()
    };
    let sig = dev
        .sign_persistent(IDEVID, &req.content().unwrap())
        .unwrap();
    let verified = verify_idevid_request(
        &req.encode(&sig).unwrap(),
        &ek_all[..1],
        &ek_all[1..],
        now(),
    )
    .unwrap();
    let challenges = Challenges::new(Duration::from_secs(60));
    let ch = challenges.issue(verified).unwrap();
    let secret = dev
        .activate_credential_tcg(
            EkAlg::Rsa2048,
            IAK,
            &ch.credential_blob,
            &ch.encrypted_secret,
        )
        .unwrap();
    let enrolled = challenges.answer(&ch.id, &secret).unwrap();
    let manufacturer = DevIdCa::init(
        Arc::new(kame_keymanager::memory::MemoryKeyManager::new()),
        "manufacturer",
        kame_keymanager::KeyType::EcP256,
        "O=Kame Devices, CN=Manufacturer CA",
        86400 * 365,
    )
    .await
    .unwrap();
    let (iak_cert, idevid_cert) = manufacturer
        .issue_manufactured(&enrolled, "O=Kame Devices, CN=kame-edge")
        .await
        .unwrap();

    // LDevID enrollment with the owner CA.
    let owner = DevIdCa::init(
        Arc::new(kame_keymanager::memory::MemoryKeyManager::new()),
        "owner",
        kame_keymanager::KeyType::EcP256,
        "O=Fleet Owner, CN=Owner CA",
        86400 * 365,
    )
    .await
    .unwrap();
    let nonces = Nonces::new(Duration::from_secs(60));
    let (nonce_id, nonce) = nonces.issue().unwrap();
    let key = dev
        .create_under_srk(&templates::bytes(templates::DEVID_RSA))
        .unwrap();
    let (certify_info, certify_sig) = dev.certify_by_persistent(&key, IAK, &nonce).unwrap();
    let idevid_sig = dev.sign_persistent(IDEVID, &certify_info).unwrap();
    let request = LdevidRequest {
        idevid_cert,
        iak_cert,
        idevid_pub,
        iak_pub,
        ldevid_pub: key.public.clone(),
        certify_info,
        certify_sig,
        idevid_sig,
    };
    drop(dev); // swtpm serves one client: the agent's, from here on.
    let nonce = nonces.take(&nonce_id).unwrap();
    assert!(nonces.take(&nonce_id).is_err(), "a nonce is used once");
    let v = verify_ldevid_request(
        &request,
        &nonce,
        &[manufacturer.certificate().to_vec()],
        now(),
    )
    .unwrap();
    // Bound to its nonce: the same proof over another nonce is refused.
    assert!(
        verify_ldevid_request(
            &request,
            b"another nonce",
            &[manufacturer.certificate().to_vec()],
            now()
        )
        .is_err()
    );
    let ldevid = owner.issue_ldevid(&v, "O=Fleet Owner").await.unwrap();

    // The files tpm_devid reads, where its configuration names them.
    let devid_dir = tempfile::tempdir().unwrap();
    let p = |n: &str| devid_dir.path().join(n);
    std::fs::write(p("devid.pem"), pem(&ldevid)).unwrap();
    std::fs::write(p("devid-ca.pem"), pem(owner.certificate())).unwrap();
    std::fs::write(p("devid.pub"), &key.public).unwrap();
    kame_keymanager::disk::write_secret_file(&p("devid.priv"), &key.private).unwrap();
    let devid = DevId {
        cert: p("devid.pem"),
        ca: p("devid-ca.pem"),
        ca_key: std::path::PathBuf::new(),
        ca_der: owner.certificate().to_vec(),
        leaf_der: ldevid.clone(),
        key,
        dir: devid_dir,
    };
    let env = Env::start(opts(&tpm, &devid, &devid.ca, &ek_ca)).await;
    let agent = wait_agent(&env).await;
    assert_eq!(agent.attestation_type, "tpm_devid");
    let sels: Vec<String> = agent
        .selectors
        .iter()
        .map(|s| format!("{}:{}", s.r#type, s.value))
        .collect();
    assert!(
        sels.contains(&"tpm_devid:subject:serialnumber:SN-FACTORY-1".to_string()),
        "{sels:?}"
    );
    env.register(
        "/edge-workload",
        &[&format!("unix:uid:{}", my_uid())],
        |_| {},
    )
    .await;
    env.wait_for_svids(&["/edge-workload"]).await;
    env.stop().await;
}
