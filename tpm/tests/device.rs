//! `tpm::device` on a fresh swtpm: EK publics and certificates, credential activation of our
//! software MakeCredential, and quotes that tpm2-tools' `tpm2_checkquote` and our verifier accept.
#![cfg(feature = "device")]

use kame_tpm::device::{Device, EkAlg};
use kame_tpm::testing::SwTpm;
use kame_tpm::wire::attest::verify_quote;
use kame_tpm::wire::credential::make_credential;
use kame_tpm::wire::{Error, Public};

#[test]
fn device_ek_public_equals_tpm2_tools_ek_and_certificate_key() {
    use der::{Decode, Encode};
    let tpm = SwTpm::start().unwrap();
    let mut d = Device::open(&tpm.tcti).unwrap();
    for (alg, g) in [(EkAlg::Rsa2048, "rsa"), (EkAlg::EccP384, "ecc384")] {
        let ours = d.ek_public(alg).unwrap();
        tpm.tpm2("tpm2_createek", &["-c", "ek.ctx", "-G", g, "-u", "ek.pub"])
            .unwrap();
        let theirs = Public::parse_tpm2b(&tpm.read("ek.pub").unwrap()).unwrap();
        assert_eq!(ours, theirs, "{alg:?}: same EK from the default template");
        let cert = d
            .ek_certificate(alg)
            .unwrap()
            .expect("swtpm_setup provisioned an EK certificate");
        let c = x509_cert::Certificate::from_der(&cert).unwrap();
        assert_eq!(
            c.tbs_certificate()
                .subject_public_key_info()
                .to_der()
                .unwrap(),
            ours.spki_der().unwrap()
        );
    }
    assert_eq!(
        d.ek_certificate(EkAlg::EccP256).unwrap(),
        None,
        "swtpm has no P-256 EK certificate"
    );
}

#[test]
fn device_activate_credential_recovers_software_make_credential() {
    let tpm = SwTpm::start().unwrap();
    let mut d = Device::open(&tpm.tcti).unwrap();
    for (ek_alg, ecc_ak) in [
        (EkAlg::Rsa2048, false),
        (EkAlg::EccP256, true),
        // High-range templates: policy B = PolicyOR(PolicySecret(endorsement), C), SHA-384.
        (EkAlg::EccP384, true),
        (EkAlg::Rsa3072, false),
    ] {
        let ek = d.ek_public(ek_alg).unwrap();
        let ak = d.create_ak(ek_alg, ecc_ak).unwrap();
        let name = Public::parse(&ak.public).unwrap().name().unwrap();
        let cred = make_credential(&ek, b"credential for the AK", &name).unwrap();
        let got = d
            .activate_credential(ek_alg, &ak, &cred.credential_blob, &cred.secret)
            .unwrap();
        assert_eq!(got, b"credential for the AK", "{ek_alg:?}");
        // bound to another name: the TPM refuses
        let mut other = name.clone();
        other[3] ^= 1;
        let cred = make_credential(&ek, b"x", &other).unwrap();
        assert!(
            d.activate_credential(ek_alg, &ak, &cred.credential_blob, &cred.secret)
                .is_err()
        );
    }
}

#[test]
fn device_quote_verifies_with_tpm2_checkquote_and_our_verifier() {
    let tpm = SwTpm::start().unwrap();
    let mut d = Device::open(&tpm.tcti).unwrap();
    for ecc in [false, true] {
        let ak = d.create_ak(EkAlg::Rsa2048, ecc).unwrap();
        let ak_pub = Public::parse(&ak.public).unwrap();
        let nonce = b"server nonce 0123456789abcdef012";
        let pcrs = [0u32, 1, 7, 16];
        let (attest, sig) = d.quote(EkAlg::Rsa2048, &ak, &pcrs, nonce).unwrap();
        let values = d.pcr_values(&pcrs).unwrap();
        verify_quote(&ak_pub, &attest, &sig, nonce, &values).unwrap();
        assert_eq!(
            verify_quote(&ak_pub, &attest, &sig, b"another nonce", &values).unwrap_err(),
            Error::NonceMismatch
        );
        tpm.write("ak.pub", &ak_pub.marshal_tpm2b().unwrap())
            .unwrap();
        tpm.write("quote.msg", &attest).unwrap();
        tpm.write("quote.sig", &sig).unwrap();
        let nonce_hex: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
        tpm.tpm2(
            "tpm2_checkquote",
            &[
                "-u",
                "ak.pub",
                "-m",
                "quote.msg",
                "-s",
                "quote.sig",
                "-q",
                &nonce_hex,
                "-g",
                "sha256",
            ],
        )
        .unwrap_or_else(|e| panic!("tpm2_checkquote (ecc={ecc}): {e}"));
        let mut bad = attest.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        tpm.write("quote.msg", &bad).unwrap();
        assert!(
            tpm.tpm2(
                "tpm2_checkquote",
                &[
                    "-u",
                    "ak.pub",
                    "-m",
                    "quote.msg",
                    "-s",
                    "quote.sig",
                    "-q",
                    &nonce_hex,
                    "-g",
                    "sha256"
                ]
            )
            .is_err()
        );
    }
}

#[test]
fn device_open_rejects_bad_tcti_and_flushes_leftovers() {
    assert!(Device::open("nonsense:x").is_err());
    let tpm = SwTpm::start().unwrap();
    // Leave three transient objects behind, as a crashed process would.
    for _ in 0..3 {
        tpm.raw(
            "tpm2_createprimary",
            &["-C", "o", "-G", "ecc", "-c", "p.ctx"],
        )
        .unwrap();
    }
    let mut d = Device::open(&tpm.tcti).unwrap();
    // With the slots freed, EK + AK work.
    let ak = d.create_ak(EkAlg::EccP256, true).unwrap();
    d.quote(EkAlg::EccP256, &ak, &[0], b"n").unwrap();
}

#[test]
fn device_srk_matches_tpm2_tools_and_devid_blobs_certify_and_sign() {
    use kame_tpm::device::KeyBlob;
    use kame_tpm::wire::Signature;
    use kame_tpm::wire::attest::verify_certify;
    let tpm = SwTpm::start().unwrap();
    // SPIRE's SRK_HIGH templates as tpm2-tools creates them (tpm_devid.md §1.9): a DevID lives
    // under the SRK of its own key type.
    let attrs = "restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda";
    let mut d = Device::open(&tpm.tcti).unwrap();
    for (g, srk_g, ecc) in [
        ("ecc256:ecdsa-sha256:null", "ecc256:null:aes128cfb", true),
        (
            "rsa2048:rsassa-sha256:null",
            "rsa2048:null:aes128cfb",
            false,
        ),
    ] {
        let name = g;
        tpm.tpm2(
            "tpm2_createprimary",
            &[
                "-C", "o", "-g", "sha256", "-G", srk_g, "-a", attrs, "-c", "srk.ctx",
            ],
        )
        .unwrap();
        tpm.tpm2("tpm2_readpublic", &["-c", "srk.ctx", "-o", "srk.pub"])
            .unwrap();
        let srk = d.srk_public(ecc).unwrap();
        assert_eq!(
            srk,
            Public::parse_tpm2b(&tpm.read("srk.pub").unwrap()).unwrap(),
            "same SRK from SPIRE's template ({srk_g})"
        );
        tpm.tpm2(
            "tpm2_create",
            &[
                "-C",
                "srk.ctx",
                "-G",
                g,
                "-a",
                "sign|fixedtpm|fixedparent|sensitivedataorigin|userwithauth",
                "-u",
                "devid.pub",
                "-r",
                "devid.priv",
            ],
        )
        .unwrap();
        let (pub_tpm2b, priv_tpm2b) = (
            tpm.read("devid.pub").unwrap(),
            tpm.read("devid.priv").unwrap(),
        );
        // tpm2-tools format (TPM2B) and SPIRE's (no size prefix) load alike.
        let a = KeyBlob::from_files(&pub_tpm2b, &priv_tpm2b);
        let b = KeyBlob::from_files(&pub_tpm2b[2..], &priv_tpm2b[2..]);
        assert_eq!(a, b, "{name}");
        let devid = Public::parse(&a.public).unwrap();
        let ak = d.create_ak(EkAlg::Rsa2048, true).unwrap();
        let nonce = b"certify nonce";
        let (attest, sig) = d.certify(EkAlg::Rsa2048, &ak, &a, nonce).unwrap();
        verify_certify(
            &Public::parse(&ak.public).unwrap(),
            &attest,
            &sig,
            &devid,
            nonce,
        )
        .unwrap();
        let s = d.sign(&a, b"message to sign").unwrap();
        Signature::parse(&s)
            .unwrap()
            .verify(&devid, b"message to sign")
            .unwrap();
        assert_eq!(
            Signature::parse(&s)
                .unwrap()
                .verify(&devid, b"another")
                .unwrap_err(),
            Error::BadSignature
        );
    }
}

#[test]
fn device_ak_persisted_at_handle_quotes_and_is_evicted() {
    let tpm = SwTpm::start().unwrap();
    let mut d = Device::open(&tpm.tcti).unwrap();
    let ak = d.create_ak(EkAlg::Rsa2048, true).unwrap();
    let handle = 0x8101_0002;
    let before = d.persistent_handles().unwrap();
    assert!(!before.contains(&handle));
    d.persist_ak(EkAlg::Rsa2048, &ak, handle).unwrap();
    assert!(d.persistent_handles().unwrap().contains(&handle));
    assert!(
        d.persist_ak(EkAlg::Rsa2048, &ak, handle)
            .unwrap_err()
            .to_string()
            .contains("in use")
    );
    // A new session (as after an agent restart) quotes with the persisted AK.
    drop(d);
    let mut d = Device::open(&tpm.tcti).unwrap();
    let (attest, sig) = d.quote_persistent(handle, &[0, 7], b"nonce").unwrap();
    let pcrs = d.pcr_values(&[0, 7]).unwrap();
    verify_quote(
        &Public::parse(&ak.public).unwrap(),
        &attest,
        &sig,
        b"nonce",
        &pcrs,
    )
    .unwrap();
    d.evict_persistent(handle).unwrap();
    assert!(!d.persistent_handles().unwrap().contains(&handle));
    assert!(d.quote_persistent(handle, &[0], b"n").is_err());
    assert!(
        d.persist_ak(EkAlg::Rsa2048, &ak, 0x4000_0001).is_err(),
        "not a persistent handle"
    );
}

#[test]
fn device_reads_ek_chain_certificates_from_nv_range() {
    let tpm = SwTpm::start().unwrap();
    let mut d = Device::open(&tpm.tcti).unwrap();
    assert!(
        d.ek_chain_certificates().unwrap().is_empty(),
        "swtpm_setup writes no chain certificates"
    );
    // Put the localca intermediate (DER) into the first EK chain index, as a vendor would.
    std::process::Command::new("openssl")
        .args([
            "x509",
            "-in",
            "ek-intermediate-ca.pem",
            "-outform",
            "DER",
            "-out",
            "inter.der",
        ])
        .current_dir(tpm.dir())
        .output()
        .unwrap();
    let der = tpm.read("inter.der").unwrap();
    let size = der.len().to_string();
    tpm.tpm2(
        "tpm2_nvdefine",
        &[
            "0x01c00100",
            "-C",
            "o",
            "-s",
            &size,
            "-a",
            "ownerread|ownerwrite|authread|authwrite",
        ],
    )
    .unwrap();
    tpm.tpm2(
        "tpm2_nvwrite",
        &["0x01c00100", "-C", "o", "-i", "inter.der"],
    )
    .unwrap();
    assert_eq!(d.ek_chain_certificates().unwrap(), vec![der]);
}

#[test]
fn device_spire_ak_and_devid_templates_create_keys_byte_for_byte_under_the_srk() {
    use kame_tpm::wire::attest::verify_certify;
    use kame_tpm::wire::public::templates;
    let tpm = SwTpm::start().unwrap();
    let mut d = Device::open(&tpm.tcti).unwrap();
    // (template, bytes of the empty `unique` at its end that the TPM fills in)
    for (name, hex, unique_len) in [
        ("AK_RSA", templates::AK_RSA, 2),
        ("DEVID_RSA", templates::DEVID_RSA, 2),
        ("DEVID_ECC", templates::DEVID_ECC, 68),
    ] {
        let t = templates::bytes(hex);
        let key = d.create_under_srk(&t).unwrap();
        let prefix = &t[..t.len() - unique_len];
        assert_eq!(&key.public[..prefix.len()], prefix, "{name}");
        assert_ne!(key.public, t, "{name}: the TPM filled in unique");
        if name.starts_with("DEVID") {
            // A DevID made from SPIRE's template certifies under an AK and signs.
            let ak = d.create_ak(EkAlg::Rsa2048, false).unwrap();
            let (attest, sig) = d.certify(EkAlg::Rsa2048, &ak, &key, b"n").unwrap();
            verify_certify(
                &Public::parse(&ak.public).unwrap(),
                &attest,
                &sig,
                &Public::parse(&key.public).unwrap(),
                b"n",
            )
            .unwrap();
        }
    }
    // A template that is not a TPMT_PUBLIC is refused before the TPM sees it.
    assert!(d.create_under_srk(&[0, 1, 2]).is_err());
}

#[test]
fn device_tabrmd_tcti_is_understood_and_a_missing_daemon_is_an_open_error() {
    // `tabrmd:` is a valid TCTI name; with no access broker running, opening fails at the
    // open step (not as an unknown TCTI), so an operator is told what is missing.
    match Device::open("tabrmd:bus_type=session") {
        Err(kame_tpm::device::DeviceError::Open { tcti, .. }) => {
            assert_eq!(tcti, "tabrmd:bus_type=session")
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("no tabrmd runs in tests"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_shared_runs_operations_off_the_runtime_one_at_a_time() {
    use kame_tpm::device::SharedDevice;
    let tpm = SwTpm::start().unwrap();
    let d = SharedDevice::open(&tpm.tcti).await.unwrap();
    let mut tasks = vec![];
    for _ in 0..4 {
        let d = d.clone();
        tasks.push(tokio::spawn(async move {
            d.run(|d| {
                let ak = d.create_ak(EkAlg::EccP256, true)?;
                d.quote(EkAlg::EccP256, &ak, &[0, 7], b"nonce")
            })
            .await
        }));
    }
    for t in tasks {
        let (attest, _) = t.await.unwrap().unwrap();
        assert!(!attest.is_empty());
    }
    // An error inside the closure comes back as the error, and the device stays usable.
    assert!(
        d.run(|d| d.quote(
            EkAlg::EccP256,
            &kame_tpm::device::AkBlob {
                public: vec![1],
                ..Default::default()
            },
            &[0],
            b"n"
        ))
        .await
        .is_err()
    );
    d.run(|d| d.ek_public(EkAlg::Rsa2048)).await.unwrap();
}
