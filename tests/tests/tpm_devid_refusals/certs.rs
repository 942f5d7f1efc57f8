//! tpm_devid cases about certificate paths and key types: an EK intermediate only in the
//! endorsement bundle, and a P-384 DevID signing with SHA-256 and SHA-384 schemes.

use super::*;

/// SPIRE's gap §3.3 #10: the EK certificate needs the vendor intermediate, which only the
/// server's endorsement bundle holds (SPIRE's only way; the agent sends none). Without it in
/// the bundle the EK is untrusted; with it the same message passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
pub(super) async fn tpm_devid_spire_gap_10_ek_intermediate_only_in_the_endorsement_bundle() {
    use kame_server::attestation::tpm_devid::{DevIdConfig, DevIdError, begin as verify_begin};
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "node");
    let (req, _) = tokio::task::block_in_place(|| tpm_evidence(&tpm, &devid));
    assert!(req.ek_cert_chain.is_empty(), "the agent sends no EK chain");
    let pem = |n: &str| {
        kame_api::bundle::certs_from_pem(&std::fs::read_to_string(tpm.dir().join(n)).unwrap())
            .unwrap()
    };
    let cfg = |ek_roots| DevIdConfig {
        devid_roots: vec![devid.ca_der.clone()],
        ek_roots,
        compat_mode: false,
        ek_allow_list: vec![],
        require_quote: false,
        pcr_policy: Default::default(),
        ak_roots: vec![],
    };
    let now = kame_agent::manager::now_secs();
    let root = pem("ek-root-ca.pem");
    let mut both = root.clone();
    both.extend(pem("ek-intermediate-ca.pem"));
    assert!(matches!(
        verify_begin(&cfg(root), &req.encode(), now),
        Err(DevIdError::UntrustedEk(_))
    ));
    assert!(verify_begin(&cfg(both), &req.encode(), now).is_ok());
}

/// SPIRE's gap §3.3 #11: an ECC DevID on P-384, supported on purpose. With an ECDSA/SHA-256
/// key scheme the nonce is signed over SHA-256 as SPIRE verifies it (a compat_mode server
/// accepts it too); with ECDSA/SHA-384 Kame verifies over SHA-384 as the key's scheme says,
/// which SPIRE (SHA-256 only) cannot, so compat_mode refuses that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
pub(super) async fn tpm_devid_spire_gap_11_p384_devid_with_sha256_and_sha384_schemes() {
    const P384_SHA256: &str = "0023000b00040072000000100018000b0004001000000000";
    const P384_SHA384: &str = "0023000b00040072000000100018000c0004001000000000";
    let tpm = SwTpm::start().unwrap();
    for (template, compat_ok) in [(P384_SHA256, true), (P384_SHA384, false)] {
        let devid = common::devid::provision_template(&tpm, template, "/CN=p384", None);
        let public = kame_tpm::wire::Public::parse(&devid.key.public).unwrap();
        let spki = public.spki_der().unwrap();
        assert!(
            matches!(
                kame_api::keys::KeyInfo::from_spki_der(&spki),
                Ok(kame_api::keys::KeyInfo::EcP384(_))
            ),
            "a P-384 key"
        );
        for compat in [false, true] {
            let env = server(&tpm, &devid, compat).await;
            let (req, s) = tokio::task::block_in_place(|| tpm_evidence(&tpm, &devid));
            let (tx, rx, c) = begin(&env, req.encode()).await.unwrap();
            let resp = tokio::task::block_in_place(|| tpm_answer(&tpm, &s, &c));
            let r = finish(tx, rx, resp.encode()).await;
            if compat && !compat_ok {
                refused(r, Code::PermissionDenied, "nonce signature does not verify");
            } else {
                let id = r.unwrap_or_else(|e| panic!("{template} compat={compat}: {e:?}"));
                assert!(id.contains("/spire/agent/tpm_devid/"), "{id}");
            }
            env.stop().await;
        }
    }
}
