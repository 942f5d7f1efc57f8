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

// TPM evidence made in software: kame_tpm's soft keys.
pub use kame_tpm::soft::{AK_ATTRIBUTES, DEVID_ATTRIBUTES, EK_ATTRIBUTES, SoftKey};
use kame_tpm::wire::alg;
use kame_tpm::wire::public::Public;

/// A DevID-profile certificate of `kind` for `spki`, device serial `serial`, from `ca`.
pub fn issue_devid(
    ca: &SoftCa,
    kind: crate::profile::DevIdKind,
    serial: &str,
    spki: &[u8],
) -> Vec<u8> {
    let issuer = IssuerInfo::from_cert_der(&ca.cert).expect("issuer");
    let (nb, na) = validity();
    let tbs = crate::profile::devid_tbs(
        &crate::profile::DevIdParams {
            kind,
            subject: "O=Kame Test Devices",
            serial_number: serial,
            hw_type: crate::profile::TCG_SV_TPM20,
            hw_serial: serial.as_bytes(),
            spki_der: spki,
            cert_serial: &[3],
            not_before: nb,
            not_after: Some(na),
        },
        &issuer,
    )
    .expect("DevID TBS");
    let sig = ca.key.sign(&SystemRandom::new(), &tbs).expect("signature");
    x509svid::assemble(&tbs, &issuer.signature_algorithm, sig.as_ref()).expect("certificate")
}

/// A node with a DevID and a certified attestation key (TCG IAK), all in software: what a
/// tpm_devid verifier trusting `devid_ca` and `ak_ca` sees from it, and its answers.
pub struct SoftCertifiedAkNode {
    pub devid_ca: SoftCa,
    pub ak_ca: SoftCa,
    pub devid: SoftKey,
    pub ak: SoftKey,
    pub devid_cert: Vec<u8>,
    pub ak_cert: Vec<u8>,
    /// SHA-256 PCR values the node quotes, by index.
    pub pcrs: std::collections::BTreeMap<u32, Vec<u8>>,
    /// For the EK route: an endorsement key and its certificate from `ek_ca`.
    pub ek_ca: SoftCa,
    pub ek: SoftKey,
    pub ek_cert: Vec<u8>,
}

impl std::fmt::Debug for SoftCertifiedAkNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SoftCertifiedAkNode")
    }
}

impl Default for SoftCertifiedAkNode {
    fn default() -> Self {
        Self::new()
    }
}

impl SoftCertifiedAkNode {
    pub fn new() -> Self {
        let devid_ca = SoftCa::root("O=Kame Test, CN=DevID CA");
        let ak_ca = SoftCa::root("O=Kame Test, CN=IAK CA");
        let devid = SoftKey::new(DEVID_ATTRIBUTES);
        let ak = SoftKey::new(AK_ATTRIBUTES);
        let devid_cert = devid_ca.issue("O=Kame Test, CN=node-1", &devid.spki());
        let ak_cert = issue_devid(&ak_ca, crate::profile::DevIdKind::Iak, "SN-1", &ak.spki());
        let ek_ca = SoftCa::root("O=Kame Test, CN=EK CA");
        let ek = SoftKey::ek();
        let ek_cert = ek_ca.issue("O=Kame Test, CN=EK", &ek.spki());
        SoftCertifiedAkNode {
            devid_ca,
            ak_ca,
            devid,
            ak,
            devid_cert,
            ak_cert,
            pcrs: (0..24).map(|i| (i, vec![0; 32])).collect(),
            ek_ca,
            ek,
            ek_cert,
        }
    }

    /// Message 1 by the EK route (SPIRE's, with Kame's v2): the EK and its certificate, and
    /// the DevID certified by the AK with empty qualifying data. Its challenge can only be
    /// answered by a TPM, so it serves for the verifier's first step.
    pub fn ek_request(&self) -> kame_api::tpm_devid::AttestationRequest {
        let (certified, sig) = self.ak.certify(&self.devid.public, &[]);
        kame_api::tpm_devid::AttestationRequest {
            devid_cert: vec![self.devid_cert.clone()],
            devid_pub: Some(self.devid.public_bytes()),
            ek_cert: Some(self.ek_cert.clone()),
            ek_pub: Some(self.ek.public_bytes()),
            ak_pub: Some(self.ak.public_bytes()),
            certified_devid: Some(certified),
            certification_signature: Some(sig),
            version: Some(2),
            ..Default::default()
        }
    }

    /// Message 1 (Kame v2 with `AKCert`).
    pub fn request(&self) -> kame_api::tpm_devid::AttestationRequest {
        kame_api::tpm_devid::AttestationRequest {
            devid_cert: vec![self.devid_cert.clone()],
            devid_pub: Some(self.devid.public_bytes()),
            ak_pub: Some(self.ak.public_bytes()),
            version: Some(2),
            ak_cert: vec![self.ak_cert.clone()],
            ..Default::default()
        }
    }

    /// Message 3 for `challenge`: the DevID's signature over the nonce, the DevID certified
    /// by the AK and a quote of the PCRs asked for, both bound to the nonce.
    pub fn answer(
        &self,
        challenge: &kame_api::tpm_devid::ChallengeRequest,
    ) -> kame_api::tpm_devid::ChallengeResponse {
        let nonce = challenge.devid.clone().unwrap_or_default();
        let (certified, certify_sig) = self.ak.certify(&self.devid.public, &nonce);
        let values: Vec<(u32, Vec<u8>)> = challenge
            .pcrs
            .iter()
            .map(|i| (*i, self.pcrs.get(i).cloned().unwrap_or_else(|| vec![0; 32])))
            .collect();
        let (quote, quote_sig) = self.ak.quote(&values, &nonce);
        kame_api::tpm_devid::ChallengeResponse {
            devid: Some(self.devid.x509_sign(&nonce)),
            cred_activation: None,
            certified_devid: Some(certified),
            certification_signature: Some(certify_sig),
            quote: Some(quote),
            quote_signature: Some(quote_sig),
            pcr_values: values,
        }
    }
}

/// A device enrolling with a manufacturer CA (TCG-CSR-IDEVID) and an owner CA (LDevID), its
/// TPM made in software: an EK certified by `ek_ca`, the IAK and the IDevID key.
pub struct SoftDevice {
    pub ek_ca: std::sync::Arc<SoftCa>,
    pub ek: SoftKey,
    pub ek_cert: Vec<u8>,
    pub iak: SoftKey,
    pub idevid: SoftKey,
    pub serial: String,
}

impl std::fmt::Debug for SoftDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SoftDevice")
    }
}

impl SoftDevice {
    pub fn new(serial: &str) -> SoftDevice {
        Self::under(
            std::sync::Arc::new(SoftCa::root("O=Kame Test TPM Vendor, CN=EK CA")),
            serial,
        )
    }

    /// A device whose EK certificate `ek_ca` issued (many devices of one TPM vendor).
    pub fn under(ek_ca: std::sync::Arc<SoftCa>, serial: &str) -> SoftDevice {
        let ek = SoftKey::ek();
        let ek_cert = ek_ca.issue("O=Kame Test TPM Vendor, CN=EK", &ek.spki());
        SoftDevice {
            ek_ca,
            ek,
            ek_cert,
            iak: SoftKey::new(AK_ATTRIBUTES),
            idevid: SoftKey::new(DEVID_ATTRIBUTES),
            serial: serial.to_string(),
        }
    }

    /// The TCG-CSR-IDEVID's content (unsigned): the IDevID key certified by the IAK.
    pub fn idevid_request(&self) -> crate::enroll::IdevidRequest {
        let (certify, sig) = self.iak.certify(&self.idevid.public, &[]);
        crate::enroll::IdevidRequest {
            hash_alg: alg::SHA256,
            prod_model: "kame-soft-1".into(),
            prod_serial: self.serial.clone(),
            ek_cert: self.ek_cert.clone(),
            attest_pub: self.iak.public_bytes(),
            signing_pub: self.idevid.public_bytes(),
            sgn_certify_info: certify,
            sgn_certify_info_sig: sig,
            ..Default::default()
        }
    }

    /// `req` encoded and signed by the IDevID key (None when a field cannot be encoded).
    pub fn sign_request(&self, req: &crate::enroll::IdevidRequest) -> Option<Vec<u8>> {
        let sig = self.idevid.tpm_sign(&req.content().ok()?);
        req.encode(&sig).ok()
    }

    /// The IAK and IDevID certificates `manufacturer` would issue this device.
    pub fn manufactured(&self, manufacturer: &SoftCa) -> (Vec<u8>, Vec<u8>) {
        use crate::profile::DevIdKind;
        (
            issue_devid(manufacturer, DevIdKind::Iak, &self.serial, &self.iak.spki()),
            issue_devid(
                manufacturer,
                DevIdKind::IDevId,
                &self.serial,
                &self.idevid.spki(),
            ),
        )
    }

    /// An LDevID request for `ldevid` bound to `nonce`, with certificates from
    /// `manufacturer`.
    pub fn ldevid_request(
        &self,
        manufacturer: &SoftCa,
        ldevid: &Public,
        nonce: &[u8],
    ) -> crate::enroll::LdevidRequest {
        let (iak_cert, idevid_cert) = self.manufactured(manufacturer);
        let mut r = crate::enroll::LdevidRequest {
            idevid_cert,
            iak_cert,
            idevid_pub: self.idevid.public_bytes(),
            iak_pub: self.iak.public_bytes(),
            ldevid_pub: ldevid.marshal().expect("TPMT_PUBLIC"),
            ..Default::default()
        };
        self.sign_ldevid(&mut r, ldevid, nonce);
        r
    }

    /// Certifies `ldevid` by the IAK over `nonce` into `r` and signs that with the IDevID.
    pub fn sign_ldevid(&self, r: &mut crate::enroll::LdevidRequest, ldevid: &Public, nonce: &[u8]) {
        let (certify, sig) = self.iak.certify(ldevid, nonce);
        r.idevid_sig = self.idevid.tpm_sign(&certify);
        r.certify_info = certify;
        r.certify_sig = sig;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> u64 {
        validity().0 + 3600
    }

    /// The software device passes every check of both enrollments: a fuzz target that starts
    /// from it reaches the checks behind the signatures.
    #[test]
    fn soft_device_requests_pass_the_cas_checks() {
        let d = SoftDevice::new("SN-SOFT-1");
        let bytes = d.sign_request(&d.idevid_request()).unwrap();
        let v = crate::enroll::verify_idevid_request(
            &bytes,
            std::slice::from_ref(&d.ek_ca.cert),
            &[],
            now(),
        )
        .unwrap();
        assert_eq!(v.request.prod_serial, "SN-SOFT-1");
        let manufacturer = SoftCa::root("O=Kame Test, CN=Manufacturer CA");
        let ldevid = SoftKey::new(DEVID_ATTRIBUTES);
        let r = d.ldevid_request(&manufacturer, &ldevid.public, b"nonce");
        let v = crate::enroll::verify_ldevid_request(
            &r,
            b"nonce",
            std::slice::from_ref(&manufacturer.cert),
            now(),
        )
        .unwrap();
        assert_eq!(v.device.serial_number, "SN-SOFT-1");
        assert!(
            crate::enroll::verify_ldevid_request(&r, b"other", &[manufacturer.cert], now())
                .is_err()
        );
    }
}
