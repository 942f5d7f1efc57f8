//! Private keys the agent makes for itself and for workloads: ECDSA P-256 from aws-lc-rs,
//! kept as PKCS#8 DER, and the CSRs that carry their public halves to the server. Key bytes
//! are zeroized when dropped; nothing here logs or stores them.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("key generation failed")]
    Generate,
    #[error("stored key is not a P-256 PKCS#8 key")]
    BadKey,
    #[error("building the CSR failed: {0}")]
    Csr(#[source] kame_api::Error),
    #[error("building the CSR failed: the key did not sign")]
    CsrSignature,
    #[error("the key did not sign")]
    Sign,
}

/// A fresh P-256 key as PKCS#8 DER.
pub fn generate() -> Result<Zeroizing<Vec<u8>>, KeyError> {
    let k =
        EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).map_err(|_| KeyError::Generate)?;
    let der = k.to_pkcs8v1().map_err(|_| KeyError::Generate)?;
    Ok(Zeroizing::new(der.as_ref().to_vec()))
}

/// The SubjectPublicKeyInfo DER of a PKCS#8 P-256 key.
pub fn spki(pkcs8: &[u8]) -> Result<Vec<u8>, KeyError> {
    let k = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8)
        .map_err(|_| KeyError::BadKey)?;
    Ok(k.public_key()
        .as_der()
        .map_err(|_| KeyError::BadKey)?
        .as_ref()
        .to_vec())
}

/// A CSR (empty subject, no SANs: the server takes identities from entries) signed by `pkcs8`.
pub fn csr(pkcs8: &[u8]) -> Result<Vec<u8>, KeyError> {
    let k = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8)
        .map_err(|_| KeyError::BadKey)?;
    let spki = spki(pkcs8)?;
    let info = kame_api::csr::request_info(&spki, &[], &[]).map_err(KeyError::Csr)?;
    let sig = k
        .sign(&SystemRandom::new(), &info)
        .map_err(|_| KeyError::CsrSignature)?;
    let alg = kame_api::keys::KeyInfo::from_spki_der(&spki)
        .map_err(KeyError::Csr)?
        .x509_signature_algorithm();
    kame_api::x509svid::assemble(&info, &alg, sig.as_ref()).map_err(KeyError::Csr)
}

/// An ECDSA P-256 SHA-256 signature (ASN.1 DER) by `pkcs8` over `message`.
pub fn sign(pkcs8: &[u8], message: &[u8]) -> Result<Vec<u8>, KeyError> {
    let k = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8)
        .map_err(|_| KeyError::BadKey)?;
    Ok(k.sign(&SystemRandom::new(), message)
        .map_err(|_| KeyError::Sign)?
        .as_ref()
        .to_vec())
}

/// Whether `pkcs8` holds the private half of the certificate's public key.
pub fn matches_cert(pkcs8: &[u8], cert_der: &[u8]) -> bool {
    let Ok(s) = spki(pkcs8) else { return false };
    kame_api::x509svid::ParsedCert::parse(cert_der)
        .and_then(|c| c.spki_der())
        .map(|c| c == s)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_csr_parses_and_carries_the_key() {
        let k = generate().unwrap();
        let c = csr(&k).unwrap();
        let parsed = kame_api::csr::parse(&c).unwrap();
        assert!(parsed.uris.is_empty());
        assert!(spki(&[1, 2, 3]).is_err());
    }
}
