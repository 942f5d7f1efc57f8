//! Signing a downstream CA from a CSR with a key held in this process (the `disk` backend):
//! SPIRE's CSR checks (a valid self-signature, exactly one URI SAN, and that URI the trust
//! domain's ID) and SPIRE's CA template (the CSR's subject, cA=true, keyCertSign and cRLSign,
//! the trust domain URI SAN, a random 128-bit serial, backdated 10 s, the lifetime asked for
//! or one hour, never past the signing certificate). It reads no file.

use crate::UpstreamError;
use der::Decode;
use kame_api::csr::Csr;
use kame_api::x509svid::{self, CaParams, IssuerInfo};
use kame_api::{SpiffeId, TrustDomain};
use kame_keymanager::pem::PemKey;
use std::time::Duration;
use x509_cert::name::Name;

/// The lifetime of a minted CA when the CSR's sender states none (SPIRE's default).
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);

/// Why a CSR was refused, one variant per check (SPIRE's wording).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    #[error("unable to parse CSR: {0}")]
    Parse(#[source] kame_api::Error),
    #[error("CSR signature check failed: {0}")]
    Signature(#[source] kame_api::Error),
    #[error("CSR must have exactly one URI SAN")]
    UriCount,
    #[error("CSR with SPIFFE ID {id:?} is invalid: {source}")]
    BadId {
        id: String,
        #[source]
        source: kame_api::IdError,
    },
    #[error(
        "CSR with SPIFFE ID {id:?} is invalid: must use the trust domain ID for trust domain {td:?}"
    )]
    NotTrustDomainId { id: String, td: String },
    #[error("CSR subject cannot be read: {0}")]
    Subject(#[source] der::Error),
}

/// Parses `der` and applies SPIRE's checks for a downstream CA of `td`.
pub fn check_csr(der: &[u8], td: &TrustDomain) -> Result<Csr, CsrError> {
    let csr = kame_api::csr::parse(der).map_err(|e| match e {
        kame_api::Error::CsrSignature(_) => CsrError::Signature(e),
        e => CsrError::Parse(e),
    })?;
    let [uri] = csr.uris.as_slice() else {
        return Err(CsrError::UriCount);
    };
    let id = SpiffeId::parse(uri).map_err(|source| CsrError::BadId {
        id: uri.clone(),
        source,
    })?;
    if !id.is_root() || id.trust_domain() != td {
        return Err(CsrError::NotTrustDomainId {
            id: uri.clone(),
            td: td.as_str().to_string(),
        });
    }
    Ok(csr)
}

/// A 128-bit positive serial number.
pub fn random_serial() -> Result<Vec<u8>, UpstreamError> {
    let mut s = [0u8; 16];
    aws_lc_rs::rand::fill(&mut s)
        .map_err(|_| UpstreamError::Signing("no randomness for a serial number".into()))?;
    s[0] &= 0x7f;
    if s[0] == 0 {
        s[0] = 1;
    }
    Ok(s.to_vec())
}

/// Signs a CA certificate for `csr` (already checked) under `issuer`, whose key is `key`, at
/// `now` (unix seconds).
pub fn sign_ca(
    csr: &Csr,
    td: &TrustDomain,
    preferred_ttl: Duration,
    issuer: &IssuerInfo,
    key: &PemKey,
    now: u64,
) -> Result<Vec<u8>, UpstreamError> {
    let subject = Name::from_der(&csr.subject_der).map_err(CsrError::Subject)?;
    let ttl = if preferred_ttl.is_zero() {
        DEFAULT_TTL
    } else {
        preferred_ttl
    };
    let not_after = (now + ttl.as_secs()).min(issuer.not_after);
    let serial = random_serial()?;
    let tbs = x509svid::ca_tbs(
        &CaParams {
            trust_domain: td,
            subject: &subject,
            spki_der: &csr.spki_der,
            serial: &serial,
            not_before: now.saturating_sub(x509svid::BACKDATE.as_secs()),
            not_after,
        },
        Some(issuer),
    )
    .map_err(|e| UpstreamError::Signing(e.to_string()))?;
    let sig = key
        .sign(&tbs)
        .map_err(|e| UpstreamError::Signing(e.to_string()))?;
    x509svid::assemble(&tbs, &issuer.signature_algorithm, &sig)
        .map_err(|e| UpstreamError::Signing(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};

    fn csr(uris: &[&str]) -> Vec<u8> {
        let k = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
        let spki = k.public_key().as_der().unwrap().as_ref().to_vec();
        let uris: Vec<String> = uris.iter().map(|u| u.to_string()).collect();
        let info = kame_api::csr::request_info(&spki, &uris, &[]).unwrap();
        let sig = k.sign(&SystemRandom::new(), &info).unwrap();
        let alg = kame_api::keys::KeyInfo::from_spki_der(&spki)
            .unwrap()
            .x509_signature_algorithm();
        x509svid::assemble(&info, &alg, sig.as_ref()).unwrap()
    }

    fn td() -> TrustDomain {
        TrustDomain::parse("example.org").unwrap()
    }

    #[test]
    fn upstream_csr_with_the_trust_domain_id_is_accepted() {
        let c = check_csr(&csr(&["spiffe://example.org"]), &td()).unwrap();
        assert_eq!(c.uris, vec!["spiffe://example.org".to_string()]);
    }

    #[test]
    fn upstream_csr_refusals_say_which_rule() {
        let cases: [(&[&str], &str); 5] = [
            (&[], "CSR must have exactly one URI SAN"),
            (
                &["spiffe://example.org", "spiffe://example.org"],
                "CSR must have exactly one URI SAN",
            ),
            (
                &["spiffe://example.org/workload"],
                "CSR with SPIFFE ID \"spiffe://example.org/workload\" is invalid: must use the trust domain ID for trust domain \"example.org\"",
            ),
            (
                &["spiffe://other.org"],
                "must use the trust domain ID for trust domain \"example.org\"",
            ),
            (
                &["invalid://example.org"],
                "CSR with SPIFFE ID \"invalid://example.org\" is invalid",
            ),
        ];
        for (uris, says) in cases {
            let e = check_csr(&csr(uris), &td()).unwrap_err().to_string();
            assert!(e.contains(says), "{uris:?}: {e:?} lacks {says:?}");
        }
        let mut bad = csr(&["spiffe://example.org"]);
        let n = bad.len();
        bad[n - 5] ^= 0xff;
        let e = check_csr(&bad, &td()).unwrap_err();
        assert!(
            matches!(e, CsrError::Signature(_) | CsrError::Parse(_)),
            "{e:?}"
        );
        assert!(matches!(
            check_csr(b"junk", &td()).unwrap_err(),
            CsrError::Parse(_)
        ));
    }
}
