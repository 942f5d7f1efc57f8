//! TCG enrollment on software TPMs: a device builds a TCG-CSR-IDEVID (EK certificate, IAK and
//! IDevID publics, TPM2_Certify of the IDevID by the IAK, signed by the IDevID), the CA checks
//! it, challenges the IAK's residency with the EK by credential activation, and issues the IAK
//! and IDevID certificates. Every refusal is its own error and nothing is issued.
//!
//! Here the IAK is a restricted signing key under the EK and the IDevID key an unrestricted
//! signing key under the SRK: the CA's checks are the same for the TCG's primary-key
//! templates.

use kame_devid::enroll::{
    Challenges, EnrollError, IdevidRequest, VerifiedRequest, verify_idevid_request,
};
use kame_devid::profile::{DevIdKind, DevIdParams, check_devid_cert, devid_tbs};
use kame_tpm::device::{AkBlob, AkParent, Device, EkAlg, KeyBlob};
use kame_tpm::testing::SwTpm;
use kame_tpm::wire::{self, public::templates};
use std::time::Duration;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn der_of_pem(pem: &str) -> Vec<Vec<u8>> {
    use base64::Engine;
    let mut out = vec![];
    let mut b64 = String::new();
    let mut inside = false;
    for l in pem.lines() {
        if l.starts_with("-----BEGIN") {
            inside = true;
            b64.clear();
        } else if l.starts_with("-----END") {
            inside = false;
            out.push(
                base64::engine::general_purpose::STANDARD
                    .decode(&b64)
                    .unwrap(),
            );
        } else if inside {
            b64.push_str(l.trim());
        }
    }
    out
}

/// The swtpm vendor CAs: (roots, intermediates).
fn vendor_cas(tpm: &SwTpm) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let root = std::fs::read_to_string(tpm.dir().join("ek-root-ca.pem")).unwrap();
    let inter = std::fs::read_to_string(tpm.dir().join("ek-intermediate-ca.pem")).unwrap();
    (der_of_pem(&root), der_of_pem(&inter))
}

struct Device1 {
    tpm: SwTpm,
    dev: Device,
    iak: AkBlob,
    idevid: KeyBlob,
}

fn device() -> Device1 {
    let tpm = SwTpm::start().unwrap();
    let mut dev = Device::open(&tpm.tcti).unwrap();
    let iak = dev.create_ak(EkAlg::Rsa2048, false).unwrap();
    let idevid = dev
        .create_under_srk(&templates::bytes(templates::DEVID_RSA))
        .unwrap();
    Device1 {
        tpm,
        dev,
        iak,
        idevid,
    }
}

/// A request from `d` with `attest` as the IAK (its public, and the certify it makes), signed
/// by `signer`.
fn request_with(d: &mut Device1, attest: &AkBlob, idevid: &KeyBlob, signer: &KeyBlob) -> Vec<u8> {
    let certify = d.dev.certify(EkAlg::Rsa2048, attest, idevid, &[]).unwrap();
    let ek_cert = d.dev.ek_certificate(EkAlg::Rsa2048).unwrap().unwrap();
    signed_request(
        &mut d.dev,
        ek_cert,
        &attest.public,
        &idevid.public,
        certify,
        signer,
    )
}

/// A TCG-CSR-IDEVID of these parts (EK certificate, IAK and IDevID publics, the certify and
/// its signature), signed by `signer` on `dev`.
fn signed_request(
    dev: &mut Device,
    ek_cert: Vec<u8>,
    attest_pub: &[u8],
    signing_pub: &[u8],
    certify: (Vec<u8>, Vec<u8>),
    signer: &KeyBlob,
) -> Vec<u8> {
    signed_request_serial(
        dev,
        ek_cert,
        attest_pub,
        signing_pub,
        certify,
        signer,
        "SN-0042",
    )
}

/// As [`signed_request`], for the device serial `serial`.
fn signed_request_serial(
    dev: &mut Device,
    ek_cert: Vec<u8>,
    attest_pub: &[u8],
    signing_pub: &[u8],
    (certify, certify_sig): (Vec<u8>, Vec<u8>),
    signer: &KeyBlob,
    serial: &str,
) -> Vec<u8> {
    let req = IdevidRequest {
        hash_alg: wire::alg::SHA256,
        prod_model: "kame-edge-1".into(),
        prod_serial: serial.into(),
        ek_cert,
        attest_pub: attest_pub.to_vec(),
        signing_pub: signing_pub.to_vec(),
        sgn_certify_info: certify,
        sgn_certify_info_sig: certify_sig,
        ..Default::default()
    };
    let sig = dev.sign(signer, &req.content().unwrap()).unwrap();
    req.encode(&sig).unwrap()
}

/// An unrestricted signing key under the SRK, as blobs an IAK would come in.
fn unrestricted_key(d: &mut Device1) -> AkBlob {
    let k = d
        .dev
        .create_under_srk(&templates::bytes(templates::DEVID_RSA))
        .unwrap();
    AkBlob {
        public: k.public,
        private: k.private,
        parent: AkParent::Srk,
    }
}

fn request(d: &mut Device1) -> Vec<u8> {
    let (iak, idevid) = (d.iak.clone(), d.idevid.clone());
    request_with(d, &iak, &idevid, &idevid)
}

fn verify(d: &Device1, bytes: &[u8]) -> Result<VerifiedRequest, EnrollError> {
    let (roots, inter) = vendor_cas(&d.tpm);
    verify_idevid_request(bytes, &roots, &inter, now())
}

/// The manufacturer CA: a P-256 key and its self-signed certificate.
fn manufacturer_ca() -> (aws_lc_rs::signature::EcdsaKeyPair, Vec<u8>) {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
    let k = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
    let spki = k.public_key().as_der().unwrap().as_ref().to_vec();
    let tbs = kame_devid::profile::ca_tbs(
        "C=US, O=Kame Devices, CN=Manufacturer CA",
        &spki,
        &[1],
        now() - 10,
        now() + 86400,
        None,
    )
    .unwrap();
    let alg = kame_api::keys::KeyInfo::from_spki_der(&spki)
        .unwrap()
        .x509_signature_algorithm();
    let sig = k.sign(&aws_lc_rs::rand::SystemRandom::new(), &tbs).unwrap();
    let cert = kame_api::x509svid::assemble(&tbs, &alg, sig.as_ref()).unwrap();
    (k, cert)
}

#[test]
fn tcg_enroll_manufacture_iak_and_idevid_certificates_after_credential_activation() {
    let mut d = device();
    let bytes = request(&mut d);
    let verified = verify(&d, &bytes).unwrap();
    assert_eq!(verified.request.prod_serial, "SN-0042");
    let challenges = Challenges::new(Duration::from_secs(60));
    let ch = challenges.issue(verified, "local").unwrap();
    let iak = d.iak.clone();
    let secret = d
        .dev
        .activate_credential(
            EkAlg::Rsa2048,
            &iak,
            &ch.credential_blob,
            &ch.encrypted_secret,
        )
        .unwrap();
    let ok = challenges.answer(&ch.id, &secret).unwrap();
    // Replayed: the challenge is spent.
    assert!(matches!(
        challenges.answer(&ch.id, &secret),
        Err(EnrollError::UnknownChallenge)
    ));
    // The CA issues both certificates; they follow the profile and chain to it.
    let (ca_key, ca_cert) = manufacturer_ca();
    let issuer = kame_api::x509svid::IssuerInfo::from_cert_der(&ca_cert).unwrap();
    for (kind, key, serial) in [
        (DevIdKind::Iak, &ok.iak, [0x11u8]),
        (DevIdKind::IDevId, &ok.idevid, [0x12u8]),
    ] {
        let spki = key.spki_der().unwrap();
        let tbs = devid_tbs(
            &DevIdParams {
                kind,
                subject: "O=Kame Devices, CN=kame-edge-1",
                serial_number: &ok.request.prod_serial,
                hw_type: kame_devid::profile::TCG_SV_TPM20,
                hw_serial: ok.request.prod_serial.as_bytes(),
                spki_der: &spki,
                cert_serial: &serial,
                not_before: now() - 10,
                not_after: None,
            },
            &issuer,
        )
        .unwrap();
        let sig = ca_key
            .sign(&aws_lc_rs::rand::SystemRandom::new(), &tbs)
            .unwrap();
        let cert =
            kame_api::x509svid::assemble(&tbs, &issuer.signature_algorithm, sig.as_ref()).unwrap();
        let info = check_devid_cert(&cert, kind).unwrap();
        assert_eq!(info.serial_number, "SN-0042");
        kame_devid::chain::verify(&cert, &[], std::slice::from_ref(&ca_cert), now()).unwrap();
    }
}

#[test]
fn tcg_enroll_rejects_a_wrong_credential_answer_and_spends_the_challenge() {
    let mut d = device();
    let bytes = request(&mut d);
    let challenges = Challenges::new(Duration::from_secs(60));
    let ch = challenges
        .issue(verify(&d, &bytes).unwrap(), "local")
        .unwrap();
    assert!(matches!(
        challenges.answer(&ch.id, &[0u8; 32]),
        Err(EnrollError::WrongAnswer)
    ));
    assert!(matches!(
        challenges.answer(&ch.id, &[0u8; 32]),
        Err(EnrollError::UnknownChallenge)
    ));
}

#[test]
fn tcg_enroll_rejects_an_idevid_not_certified_by_an_iak_of_the_same_tpm() {
    let mut d = device();
    let mut other = device();
    // The certify is made by the other TPM's IAK, the request names this TPM's IAK.
    let (o_iak, idevid) = (other.iak.clone(), d.idevid.clone());
    let o_idevid = other.idevid.clone();
    let certify = other
        .dev
        .certify(EkAlg::Rsa2048, &o_iak, &o_idevid, &[])
        .unwrap();
    let ek_cert = d.dev.ek_certificate(EkAlg::Rsa2048).unwrap().unwrap();
    let iak_pub = d.iak.public.clone();
    let bytes = signed_request(
        &mut d.dev,
        ek_cert.clone(),
        &iak_pub,
        &idevid.public,
        certify,
        &idevid,
    );
    assert!(
        matches!(verify(&d, &bytes), Err(EnrollError::IdevidNotCertified(_))),
        "{:?}",
        verify(&d, &bytes).err()
    );
    // The other TPM's own IAK and IDevID with this TPM's EK certificate: every signature
    // checks, but only a TPM holding both the EK and the IAK answers the challenge.
    let o_sig_key = other.idevid.clone();
    let certify = other
        .dev
        .certify(EkAlg::Rsa2048, &o_iak, &o_idevid, &[])
        .unwrap();
    let bytes = signed_request(
        &mut other.dev,
        ek_cert,
        &o_iak.public,
        &o_idevid.public,
        certify,
        &o_sig_key,
    );
    let challenges = Challenges::new(Duration::from_secs(60));
    let ch = challenges
        .issue(verify(&d, &bytes).unwrap(), "local")
        .unwrap();
    assert!(
        other
            .dev
            .activate_credential(
                EkAlg::Rsa2048,
                &o_iak,
                &ch.credential_blob,
                &ch.encrypted_secret
            )
            .is_err(),
        "the IAK's TPM does not hold the EK the credential is for"
    );
}

#[test]
fn tcg_enroll_rejects_an_ek_certificate_from_an_unknown_vendor_ca() {
    let mut d = device();
    let bytes = request(&mut d);
    let (_, other_ca) = manufacturer_ca();
    let (_, inter) = vendor_cas(&d.tpm);
    assert!(matches!(
        verify_idevid_request(&bytes, &[other_ca], &inter, now()),
        Err(EnrollError::EkUntrusted(_))
    ));
}

#[test]
fn tcg_enroll_rejects_a_request_signed_by_another_key() {
    let mut d = device();
    let other_key = d
        .dev
        .create_under_srk(&templates::bytes(templates::DEVID_RSA))
        .unwrap();
    let (iak, idevid) = (d.iak.clone(), d.idevid.clone());
    let bytes = request_with(&mut d, &iak, &idevid, &other_key);
    assert!(matches!(
        verify(&d, &bytes),
        Err(EnrollError::BadRequestSignature(_))
    ));
}

#[test]
fn tcg_enroll_rejects_an_iak_that_is_not_restricted() {
    let mut d = device();
    // An unrestricted signing key in the IAK's place (it can certify, but could sign anything).
    let fake_iak = unrestricted_key(&mut d);
    let idevid = d.idevid.clone();
    let bytes = request_with(&mut d, &fake_iak, &idevid, &idevid);
    assert!(matches!(
        verify(&d, &bytes),
        Err(EnrollError::IakNotRestricted)
    ));
}

/// The attributes the CA checks are bound to the key: a device that declares an unrestricted
/// key as restricted passes every check on paper, but the credential is made for the declared
/// public area's Name (a hash over its attributes), so the TPM holding the real key cannot
/// open it and no certificate is issued. This is what lets a verifier rely on the IAK
/// certificate's tcg-cap-verifiedTPMRestricted policy later.
#[test]
fn tcg_enroll_an_iak_that_lies_about_its_attributes_cannot_answer_the_challenge() {
    let mut d = device();
    let real = unrestricted_key(&mut d);
    let mut declared = wire::Public::parse(&real.public).unwrap();
    declared.attributes |= wire::public::attr::RESTRICTED;
    let declared = declared.marshal().unwrap();
    let idevid = d.idevid.clone();
    let certify = d.dev.certify(EkAlg::Rsa2048, &real, &idevid, &[]).unwrap();
    let ek_cert = d.dev.ek_certificate(EkAlg::Rsa2048).unwrap().unwrap();
    let bytes = signed_request(
        &mut d.dev,
        ek_cert,
        &declared,
        &idevid.public,
        certify,
        &idevid,
    );
    // On paper the request is fine: the key signs, the declared bits say restricted.
    let verified = verify(&d, &bytes).unwrap();
    // The control: a credential made for the real public area's Name opens with this key
    // under this EK, so the refusal below is the Name's doing and nothing else's.
    let secret = [7u8; 32];
    let real_name = wire::Public::parse(&real.public).unwrap().name().unwrap();
    let honest = wire::credential::make_credential(&verified.ek, &secret, &real_name).unwrap();
    let opened = d
        .dev
        .activate_credential(
            EkAlg::Rsa2048,
            &real,
            &honest.credential_blob,
            &honest.secret,
        )
        .unwrap();
    assert_eq!(opened, secret);
    // The CA's challenge is made for the declared Name: the TPM refuses it (TPM_RC_INTEGRITY,
    // the credential's HMAC over the Name does not match), so no answer exists.
    let challenges = Challenges::new(Duration::from_secs(60));
    let ch = challenges.issue(verified, "local").unwrap();
    let e = d
        .dev
        .activate_credential(
            EkAlg::Rsa2048,
            &real,
            &ch.credential_blob,
            &ch.encrypted_secret,
        )
        .unwrap_err();
    // TPM_RC_INTEGRITY is format-one error 0x01F.
    let dbg = format!("{e:?}");
    assert!(
        dbg.contains("ActivateCredential")
            && dbg.contains("FormatOne")
            && dbg.contains("error_number: 31,"),
        "{dbg}"
    );
}

#[test]
fn tcg_enroll_rejects_an_exportable_idevid_key() {
    let mut d = device();
    // DEVID_RSA without fixedTPM and fixedParent (0x00040072 -> 0x00040060): duplicable.
    let template = templates::DEVID_RSA.replacen("00040072", "00040060", 1);
    assert_ne!(template, templates::DEVID_RSA);
    let exportable = d
        .dev
        .create_under_srk(&templates::bytes(&template))
        .unwrap();
    let iak = d.iak.clone();
    let bytes = request_with(&mut d, &iak, &exportable, &exportable);
    assert!(matches!(
        verify(&d, &bytes),
        Err(EnrollError::IdevidExportable)
    ));
}

#[test]
fn tcg_enroll_request_encoding_round_trips_and_refuses_garbage() {
    let req = IdevidRequest {
        hash_alg: wire::alg::SHA256,
        prod_model: "m".into(),
        prod_serial: "s".into(),
        ek_cert: vec![1, 2, 3],
        attest_pub: vec![4],
        signing_pub: vec![5, 6],
        sgn_certify_info: vec![7],
        sgn_certify_info_sig: vec![8],
        ..Default::default()
    };
    let bytes = req.encode(b"sig").unwrap();
    let (back, content, sig) = IdevidRequest::decode(&bytes).unwrap();
    assert_eq!(back, req);
    assert_eq!(content, req.content().unwrap());
    assert_eq!(content.len() % 16, 0, "padded to 16 bytes");
    assert_eq!(sig, b"sig");
    for bad in [&bytes[..bytes.len() - 1], &[0u8; 3][..], &[]] {
        let e = IdevidRequest::decode(bad).unwrap_err();
        assert!(
            matches!(
                e,
                EnrollError::Malformed(_) | EnrollError::MalformedField(_)
            ),
            "{e}"
        );
        assert!(e.to_string().starts_with("malformed TCG-CSR-IDEVID"), "{e}");
    }
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert!(IdevidRequest::decode(&trailing).is_err());
    // A request missing its EK certificate is refused before any signature is checked.
    let empty = IdevidRequest {
        ek_cert: vec![],
        ..req
    };
    assert!(matches!(
        verify_idevid_request(&empty.encode(b"sig").unwrap(), &[], &[], now()),
        Err(EnrollError::Missing("ekCert"))
    ));
}

/// IAK and IDevID as the TCG specifies them: primary keys in the endorsement hierarchy from
/// the TCG templates, with the TCG policy (its Certify and ActivateCredential branches used),
/// persisted at the provisioning handles.
fn tcg_primaries_enroll(ecc: bool) {
    use kame_tpm::wire::policy::{DevIdKey, tcg_devid_policy};
    use kame_tpm::wire::public::{Public, attr};
    const IDEVID: u32 = 0x8102_0000;
    const IAK: u32 = 0x8102_0001;
    let tpm = SwTpm::start().unwrap();
    let mut dev = Device::open(&tpm.tcti).unwrap();
    let iak_pub = dev.provision_tcg_key(DevIdKey::Iak, ecc, IAK).unwrap();
    let idevid_pub = dev
        .provision_tcg_key(DevIdKey::IDevId, ecc, IDEVID)
        .unwrap();
    assert!(
        dev.provision_tcg_key(DevIdKey::Iak, ecc, IAK).is_err(),
        "an occupied handle is never replaced"
    );
    let (iak, idevid) = (
        Public::parse(&iak_pub).unwrap(),
        Public::parse(&idevid_pub).unwrap(),
    );
    assert_eq!(
        iak.auth_policy,
        tcg_devid_policy(DevIdKey::Iak, wire::alg::SHA256).unwrap()
    );
    assert_eq!(
        idevid.auth_policy,
        tcg_devid_policy(DevIdKey::IDevId, wire::alg::SHA256).unwrap()
    );
    assert_ne!(iak.attributes & attr::RESTRICTED, 0);
    assert_eq!(idevid.attributes & attr::RESTRICTED, 0);
    // The same template in the same TPM gives the same key (a primary key is derived).
    assert_eq!(dev.persistent_public(IAK).unwrap(), iak_pub);

    let (certify, certify_sig) = dev.certify_tcg(IDEVID, DevIdKey::IDevId, IAK, &[]).unwrap();
    let req = IdevidRequest {
        hash_alg: wire::alg::SHA256,
        prod_model: "kame-edge-1".into(),
        prod_serial: "SN-7".into(),
        ek_cert: dev.ek_certificate(EkAlg::Rsa2048).unwrap().unwrap(),
        attest_pub: iak_pub,
        signing_pub: idevid_pub,
        sgn_certify_info: certify,
        sgn_certify_info_sig: certify_sig,
        ..Default::default()
    };
    let sig = dev
        .sign_persistent(IDEVID, &req.content().unwrap())
        .unwrap();
    let bytes = req.encode(&sig).unwrap();
    let (roots, inter) = vendor_cas(&tpm);
    let verified = verify_idevid_request(&bytes, &roots, &inter, now()).unwrap();
    let challenges = Challenges::new(Duration::from_secs(60));
    let ch = challenges.issue(verified, "local").unwrap();
    let secret = dev
        .activate_credential_tcg(
            EkAlg::Rsa2048,
            IAK,
            &ch.credential_blob,
            &ch.encrypted_secret,
        )
        .unwrap();
    let ok = challenges.answer(&ch.id, &secret).unwrap();
    assert_eq!(ok.request.prod_serial, "SN-7");
}

#[test]
fn tcg_enroll_tcg_template_rsa_iak_and_idevid_primaries_certify_and_activate() {
    tcg_primaries_enroll(false);
}

#[test]
fn tcg_enroll_tcg_template_ecc_iak_and_idevid_primaries_certify_and_activate() {
    tcg_primaries_enroll(true);
}

/// Manufacture end to end with the CA's key in `km`: the device's request is checked, its
/// challenge answered, and the CA issues IAK and IDevID certificates that follow the profile
/// and chain to the CA certificate.
async fn manufacture_with(km: std::sync::Arc<dyn kame_keymanager::KeyManager>) {
    let mut d = device();
    let bytes = request(&mut d);
    let challenges = Challenges::new(Duration::from_secs(60));
    let ch = challenges
        .issue(verify(&d, &bytes).unwrap(), "local")
        .unwrap();
    let iak = d.iak.clone();
    let secret = d
        .dev
        .activate_credential(
            EkAlg::Rsa2048,
            &iak,
            &ch.credential_blob,
            &ch.encrypted_secret,
        )
        .unwrap();
    let enrolled = challenges.answer(&ch.id, &secret).unwrap();
    let ca = kame_devid::ca::DevIdCa::init(
        km.clone(),
        "manufacturer-ca",
        kame_keymanager::KeyType::EcP256,
        "C=US, O=Kame Devices, CN=Manufacturer CA",
        86400 * 365,
    )
    .await
    .unwrap();
    let (iak_cert, idevid_cert) = ca
        .issue_manufactured(&enrolled, "O=Kame Devices, CN=kame-edge-1")
        .await
        .unwrap();
    let roots = vec![ca.certificate().to_vec()];
    for (cert, kind, key) in [
        (&iak_cert, DevIdKind::Iak, &enrolled.iak),
        (&idevid_cert, DevIdKind::IDevId, &enrolled.idevid),
    ] {
        assert_eq!(
            check_devid_cert(cert, kind).unwrap().serial_number,
            "SN-0042"
        );
        kame_devid::chain::verify(cert, &[], &roots, now()).unwrap();
        let p = kame_api::x509svid::ParsedCert::parse(cert).unwrap();
        assert_eq!(p.spki_der().unwrap(), key.spki_der().unwrap());
    }
    // Reopened from its certificate: the same key in the KeyManager.
    kame_devid::ca::DevIdCa::open(km, "manufacturer-ca", ca.certificate().to_vec())
        .await
        .unwrap();
}

#[tokio::test]
async fn tcg_enroll_manufacturer_ca_key_in_memory_issues_iak_and_idevid() {
    manufacture_with(std::sync::Arc::new(
        kame_keymanager::memory::MemoryKeyManager::new(),
    ))
    .await;
}

#[tokio::test]
async fn tcg_enroll_manufacturer_ca_key_in_a_pkcs11_hsm_issues_iak_and_idevid() {
    // SoftHSM2 reads its configuration once per process: the test runs in a child process
    // with a fresh token.
    let Some(hsm) = kame_keymanager::testing::SoftHsm::child(
        "tcg_enroll_manufacturer_ca_key_in_a_pkcs11_hsm_issues_iak_and_idevid",
    ) else {
        return;
    };
    let km =
        kame_keymanager::pkcs11::Pkcs11KeyManager::open(kame_keymanager::pkcs11::Pkcs11Config {
            module_path: hsm.module.clone(),
            token_label: hsm.token_label.clone(),
            user_pin: hsm.pin.as_str().into(),
            server_id: "kame-devid-ca".into(),
        })
        .await
        .unwrap();
    manufacture_with(std::sync::Arc::new(km)).await;
}

/// Issue 19 item 3: the device serial becomes a subject attribute and a selector, so a
/// request whose serial is not a PrintableString of 1 to 64 characters (RFC 4514 `#hex`,
/// escapes, control or non-ASCII characters) is refused before any challenge is made.
#[test]
fn tcg_enroll_refuses_a_serial_that_is_not_a_printable_string() {
    let mut d = device();
    let (iak, idevid) = (d.iak.clone(), d.idevid.clone());
    let certify = d.dev.certify(EkAlg::Rsa2048, &iak, &idevid, &[]).unwrap();
    let ek_cert = d.dev.ek_certificate(EkAlg::Rsa2048).unwrap().unwrap();
    let with = |d: &mut Device1, serial: &str| {
        let bytes = signed_request_serial(
            &mut d.dev,
            ek_cert.clone(),
            &iak.public,
            &idevid.public,
            certify.clone(),
            &idevid,
            serial,
        );
        verify(d, &bytes)
    };
    for serial in [
        "#0403534e2d31",
        "SN-1\\, CN=admin",
        "SN\u{e9}",
        "SN\n1",
        "",
        &"9".repeat(65),
    ] {
        match with(&mut d, serial) {
            Err(EnrollError::BadSerial(_)) => {}
            Err(EnrollError::Missing("prodSerial")) if serial.is_empty() => {}
            other => panic!("{serial:?}: {other:?}"),
        }
    }
    // Every PrintableString character is a value, not syntax: accepted as it is.
    let v = with(&mut d, "SN-1, CN=admin+O=x").unwrap();
    assert_eq!(v.request.prod_serial, "SN-1, CN=admin+O=x");
}
