//! EK certificates read from a fresh swtpm's NV chain to the swtpm-localca root by our own
//! check (and the certificate key is the template EK); tampering breaks the chain.

use kame_devid::chain::{ChainError, verify};
use kame_tpm::device::{Device, EkAlg};
use kame_tpm::testing::SwTpm;

fn pem_certs(path: &std::path::Path) -> Vec<Vec<u8>> {
    kame_api::bundle::certs_from_pem(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn ek_certificates_from_nv_chain_to_swtpm_localca_root() {
    let tpm = SwTpm::start().unwrap();
    let roots = pem_certs(&tpm.dir().join("ek-root-ca.pem"));
    let inter = pem_certs(&tpm.dir().join("ek-intermediate-ca.pem"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut d = Device::open(&tpm.tcti).unwrap();
    for alg in [EkAlg::Rsa2048, EkAlg::EccP384] {
        let cert = d.ek_certificate(alg).unwrap().unwrap();
        assert_eq!(verify(&cert, &inter, &roots, now), Ok(0), "{alg:?}");
        // Without the intermediate there is no path, and none without a root.
        assert_eq!(
            verify(&cert, &[], &roots, now),
            Err(ChainError::NoTrustedRoot)
        );
        assert_eq!(
            verify(&cert, &inter, &[], now),
            Err(ChainError::NoTrustedRoot)
        );
        // A flipped bit in the signature breaks it.
        let mut bad = cert.clone();
        let n = bad.len();
        bad[n - 3] ^= 1;
        assert!(verify(&bad, &inter, &roots, now).is_err());
        // Expired by the time given.
        assert!(matches!(
            verify(&cert, &inter, &roots, u64::MAX / 4),
            Err(ChainError::Expired(_))
        ));
    }
}
