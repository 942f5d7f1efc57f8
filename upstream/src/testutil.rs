//! Test certificates for the backends' answer readers.

use kame_api::TrustDomain;

/// Self-signed CAs, distinct (DER) but unrelated: the reading only sorts them.
pub fn cas(n: usize) -> Vec<Vec<u8>> {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
    use kame_api::x509svid::{self, CaParams};
    let td = TrustDomain::parse("example.org").unwrap();
    (0..n)
        .map(|i| {
            let k = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
            let spki = k.public_key().as_der().unwrap().as_ref().to_vec();
            let subject = x509svid::parse_name(&format!("CN=ca{i}")).unwrap();
            let tbs = x509svid::ca_tbs(
                &CaParams {
                    trust_domain: &td,
                    subject: &subject,
                    spki_der: &spki,
                    serial: &[1, i as u8],
                    not_before: 0,
                    not_after: 4_000_000_000,
                },
                None,
            )
            .unwrap();
            let sig = k.sign(&SystemRandom::new(), &tbs).unwrap();
            let alg = kame_api::keys::KeyInfo::from_spki_der(&spki)
                .unwrap()
                .x509_signature_algorithm();
            x509svid::assemble(&tbs, &alg, sig.as_ref()).unwrap()
        })
        .collect()
}
