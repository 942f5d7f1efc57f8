//! Test support (feature `testing`, never in a production build): software certificate
//! authorities with P-256 keys, and the adversarial chains path validation must survive
//! (many certificates sharing one name). For tests, fuzz seeds and benchmarks only; it must not
//! be used to issue anything real.

use crate::profile::ca_tbs;
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
use kame_api::x509svid::{self, IssuerInfo};

/// Validity of every test certificate: from an hour ago for a year.
fn validity() -> (u64, u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    (now - 3600, now + 365 * 86400)
}

/// A CA certificate (cA, keyCertSign) and its software key.
pub struct SoftCa {
    key: EcdsaKeyPair,
    /// DER.
    pub cert: Vec<u8>,
}

impl std::fmt::Debug for SoftCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SoftCa")
    }
}

fn new_key() -> (EcdsaKeyPair, Vec<u8>) {
    let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).expect("P-256 key");
    let spki = key.public_key().as_der().expect("SPKI").as_ref().to_vec();
    (key, spki)
}

impl SoftCa {
    /// A self-signed root named `subject` (e.g. `O=Test, CN=Root`).
    pub fn root(subject: &str) -> SoftCa {
        let (key, spki) = new_key();
        let (nb, na) = validity();
        let tbs = ca_tbs(subject, &spki, &[1], nb, na, None).expect("root TBS");
        let cert = sign(&key, &spki, &tbs);
        SoftCa { key, cert }
    }

    /// A CA named `subject` issued by this one.
    pub fn issue_ca(&self, subject: &str) -> SoftCa {
        let (key, spki) = new_key();
        let cert = self.issue(subject, &spki);
        SoftCa { key, cert }
    }

    /// A certificate (a CA profile, which path validation does not look at in a leaf) for
    /// `spki` named `subject`, issued by this CA.
    pub fn issue(&self, subject: &str, spki: &[u8]) -> Vec<u8> {
        let issuer = IssuerInfo::from_cert_der(&self.cert).expect("issuer");
        let (nb, na) = validity();
        let tbs = ca_tbs(subject, spki, &[2], nb, na, Some(&issuer)).expect("TBS");
        let sig = self
            .key
            .sign(&SystemRandom::new(), &tbs)
            .expect("signature");
        x509svid::assemble(&tbs, &issuer.signature_algorithm, sig.as_ref()).expect("certificate")
    }

    /// A leaf with a fresh key, named `subject`, issued by this CA.
    pub fn issue_leaf(&self, subject: &str) -> Vec<u8> {
        let (_, spki) = new_key();
        self.issue(subject, &spki)
    }
}

fn sign(key: &EcdsaKeyPair, spki: &[u8], tbs: &[u8]) -> Vec<u8> {
    let alg = kame_api::keys::KeyInfo::from_spki_der(spki)
        .expect("key info")
        .x509_signature_algorithm();
    let sig = key.sign(&SystemRandom::new(), tbs).expect("signature");
    x509svid::assemble(tbs, &alg, sig.as_ref()).expect("certificate")
}

/// The chain a path builder that tries every certificate at every depth spends quadratic time
/// on: `n` CAs all named `subject`, each issued by the next (the last self-signed), and a leaf
/// issued by the first. Returned as (leaf, CAs), the CAs in the order that puts each one's
/// issuer last among those left.
pub fn same_name_chain(n: usize, subject: &str) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut cas = vec![SoftCa::root(subject)];
    for _ in 1..n {
        let next = cas.last().expect("one CA").issue_ca(subject);
        cas.push(next);
    }
    // cas[0] is the self-signed top; cas[n-1] issues the leaf.
    let leaf = cas.last().expect("one CA").issue_leaf(subject);
    // The builder looks for the leaf's issuer (cas[n-1]) first: put it last, and so on.
    let ders = cas.into_iter().map(|c| c.cert).collect();
    (leaf, ders)
}
