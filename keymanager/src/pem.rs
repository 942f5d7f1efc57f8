//! A private key the operator keeps in a PEM file (an upstream CA's key): PKCS#8, PKCS#1 (RSA)
//! or SEC1 (EC), the forms Go's `tls.LoadX509KeyPair` takes, as RSA 2048/4096 or ECDSA
//! P-256/P-384. It parses the text it is given and signs; it reads no file and writes none,
//! and the decoded key bytes are zeroized.

use crate::local::{LocalKey, Material};
use crate::{KeyType, PublicKey, SignOpts};
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING, EcdsaKeyPair, RsaKeyPair,
};
use zeroize::Zeroizing;

/// Why a PEM private key was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PemKeyError {
    #[error("not PEM text")]
    NotText,
    #[error("no PEM private key")]
    NoPem,
    #[error("bad PEM: {0}")]
    BadPem(String),
    #[error("a PEM {0:?} block is not a private key")]
    NotAKey(String),
    #[error("not an RSA (2048 or 4096 bits) or ECDSA P-256/P-384 private key")]
    Unsupported,
    #[error("signing failed: {0}")]
    Sign(#[source] crate::Error),
}

/// A private key from PEM, held in memory.
#[derive(Debug)]
pub struct PemKey(LocalKey);

impl PemKey {
    /// The first PEM block of `text`, which must be a private key.
    pub fn parse(text: &[u8]) -> Result<Self, PemKeyError> {
        let text = std::str::from_utf8(text).map_err(|_| PemKeyError::NotText)?;
        let begin = text.find("-----BEGIN ").ok_or(PemKeyError::NoPem)?;
        let (label, der) = der::pem::decode_vec(&text.as_bytes()[begin..])
            .map_err(|e| PemKeyError::BadPem(e.to_string()))?;
        let der = Zeroizing::new(der);
        let ec = |m: Result<EcdsaKeyPair, _>, kt| m.ok().map(|k| (kt, Material::Ec(k)));
        let rsa = |k: RsaKeyPair| {
            let kt = match k.public_modulus_len() {
                256 => KeyType::Rsa2048,
                512 => KeyType::Rsa4096,
                _ => return None,
            };
            Some((kt, Material::Rsa(k)))
        };
        let found = match label {
            "PRIVATE KEY" => RsaKeyPair::from_pkcs8(&der)
                .ok()
                .and_then(rsa)
                .or_else(|| {
                    ec(
                        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &der),
                        KeyType::EcP256,
                    )
                })
                .or_else(|| {
                    ec(
                        EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_ASN1_SIGNING, &der),
                        KeyType::EcP384,
                    )
                }),
            "RSA PRIVATE KEY" => RsaKeyPair::from_der(&der).ok().and_then(rsa),
            "EC PRIVATE KEY" => ec(
                EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_ASN1_SIGNING, &der),
                KeyType::EcP256,
            )
            .or_else(|| {
                ec(
                    EcdsaKeyPair::from_private_key_der(&ECDSA_P384_SHA384_ASN1_SIGNING, &der),
                    KeyType::EcP384,
                )
            }),
            other => return Err(PemKeyError::NotAKey(other.to_string())),
        };
        let (kt, material) = found.ok_or(PemKeyError::Unsupported)?;
        LocalKey::from_material("pem", kt, material)
            .map(PemKey)
            .map_err(|_| PemKeyError::Unsupported)
    }

    /// The public half (SPKI DER, type).
    pub fn public(&self) -> &PublicKey {
        &self.0.public
    }

    /// Signs `message` as X.509 signatures by this key type are made (ECDSA with the curve's
    /// hash, DER; RSA PKCS#1 v1.5 with SHA-256).
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, PemKeyError> {
        self.0
            .sign(message, SignOpts::for_key(self.0.key_type))
            .map_err(PemKeyError::Sign)
    }
}
