//! RFC 5280 path validation for device certificates (EK, IDevID, LDevID): names chain, every
//! signature verifies with its issuer's key, every issuer is a CA allowed to sign certificates,
//! and every certificate is valid at the given time. One error variant per failed check. Pure
//! verification: certificates come in as DER, nothing is read from disk.
//!
//! The intermediates come from the peer being verified, so the work is bounded before any
//! signature is checked: at most [`MAX_INTERMEDIATES`] of them, issuer candidates taken by
//! name and tried key-identifier match first (a child's authorityKeyIdentifier against a
//! candidate's subjectKeyIdentifier), and at most [`CHECKS_PER_CERTIFICATE`] signature checks
//! per certificate offered, plus one per configured root, for the whole path.

use kame_api::keys::verify_x509_signature;
use x509_cert::Certificate;
use x509_cert::der::{Decode, Encode};
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, KeyUsage, SubjectKeyIdentifier,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChainError {
    #[error("certificate {0} cannot be parsed: {1}")]
    Parse(usize, #[source] der::Error),
    #[error("certificate {0} is not valid yet")]
    NotYetValid(usize),
    #[error("certificate {0} has expired")]
    Expired(usize),
    #[error("certificate {0} is not a CA (basicConstraints cA is not true)")]
    NotCa(usize),
    #[error("certificate {0} may not sign certificates (keyUsage lacks keyCertSign)")]
    NoCertSign(usize),
    #[error("certificate {0}'s signature does not verify with its issuer's key")]
    BadSignature(usize),
    #[error("no chain from the certificate to a trusted root")]
    NoTrustedRoot,
    #[error("{got} intermediate certificates were sent; at most {max} are accepted")]
    TooManyIntermediates { got: usize, max: usize },
    #[error("path building gave up after {0} signature checks")]
    TooManySignatureChecks(usize),
}

/// Most intermediates a chain may bring (SPIRE's x509pop accepts 4; EK chains of TPM vendors
/// and DevID chains have one or two).
pub const MAX_INTERMEDIATES: usize = 8;

/// Signature checks allowed per certificate offered (the leaf and each intermediate), plus
/// one per configured root: an honest chain needs one per certificate.
pub const CHECKS_PER_CERTIFICATE: usize = 2;

struct Parsed {
    cert: Certificate,
    tbs: Vec<u8>,
    spki: Vec<u8>,
    /// subjectKeyIdentifier, when present.
    ski: Option<Vec<u8>>,
    /// authorityKeyIdentifier's keyIdentifier, when present.
    aki: Option<Vec<u8>>,
}

fn parse(i: usize, der: &[u8]) -> Result<Parsed, ChainError> {
    let cert = Certificate::from_der(der).map_err(|e| ChainError::Parse(i, e))?;
    let tbs = cert
        .tbs_certificate()
        .to_der()
        .map_err(|e| ChainError::Parse(i, e))?;
    let spki = cert
        .tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .map_err(|e| ChainError::Parse(i, e))?;
    let t = cert.tbs_certificate();
    let ski = match t.get_extension::<SubjectKeyIdentifier>() {
        Ok(Some((_, k))) => Some(k.0.as_bytes().to_vec()),
        _ => None,
    };
    let aki = match t.get_extension::<AuthorityKeyIdentifier>() {
        Ok(Some((_, k))) => k.key_identifier.map(|k| k.as_bytes().to_vec()),
        _ => None,
    };
    Ok(Parsed {
        cert,
        tbs,
        spki,
        ski,
        aki,
    })
}

/// How well `issuer` fits as the issuer of `child`: None when the names differ (not a
/// candidate); 0 when the key identifiers match, 1 when one of them is absent, 2 when they
/// differ (tried last: a conforming CA puts its SKI in the AKI of what it signs).
fn candidate_rank(child: &Parsed, issuer: &Parsed) -> Option<u8> {
    if child.cert.tbs_certificate().issuer() != issuer.cert.tbs_certificate().subject() {
        return None;
    }
    Some(match (&child.aki, &issuer.ski) {
        (Some(a), Some(k)) if a == k => 0,
        (Some(_), Some(_)) => 2,
        _ => 1,
    })
}

/// The signature checks a path may still make.
struct Budget {
    left: usize,
    used: usize,
}

impl Budget {
    fn spend(&mut self) -> Result<(), ChainError> {
        if self.left == 0 {
            return Err(ChainError::TooManySignatureChecks(self.used));
        }
        self.left -= 1;
        self.used += 1;
        Ok(())
    }
}

fn check_time(i: usize, p: &Parsed, now: u64) -> Result<(), ChainError> {
    let v = p.cert.tbs_certificate().validity();
    if now < v.not_before.to_unix_duration().as_secs() {
        return Err(ChainError::NotYetValid(i));
    }
    if now > v.not_after.to_unix_duration().as_secs() {
        return Err(ChainError::Expired(i));
    }
    Ok(())
}

fn check_issuer(i: usize, p: &Parsed) -> Result<(), ChainError> {
    let tbs = p.cert.tbs_certificate();
    match tbs.get_extension::<BasicConstraints>() {
        Ok(Some((_, bc))) if bc.ca => {}
        _ => return Err(ChainError::NotCa(i)),
    }
    if let Ok(Some((_, ku))) = tbs.get_extension::<KeyUsage>()
        && !ku.key_cert_sign()
    {
        return Err(ChainError::NoCertSign(i));
    }
    Ok(())
}

fn signature_verifies(child: &Parsed, issuer: &Parsed) -> bool {
    let alg = child.cert.signature_algorithm();
    let Some(sig) = child.cert.signature().as_bytes() else {
        return false;
    };
    verify_x509_signature(
        &issuer.spki,
        &alg.oid,
        alg.parameters.as_ref().map(|p| p.into()),
        &child.tbs,
        sig,
    )
    .is_ok()
}

/// The first of `candidates` (index, certificate) that issued `child`, best key-identifier
/// match first; each signature check is paid from `budget`.
fn find_issuer<'a>(
    child: &Parsed,
    candidates: impl Iterator<Item = (usize, &'a Parsed)>,
    budget: &mut Budget,
) -> Result<Option<usize>, ChainError> {
    let mut ranked: Vec<(u8, usize, &Parsed)> = candidates
        .filter_map(|(i, c)| candidate_rank(child, c).map(|r| (r, i, c)))
        .collect();
    ranked.sort_by_key(|(r, i, _)| (*r, *i));
    for (_, i, c) in ranked {
        budget.spend()?;
        if signature_verifies(child, c) {
            return Ok(Some(i));
        }
    }
    Ok(None)
}

/// Validates `leaf` through `intermediates` (any order) to one of `roots` at `now` (unix s).
/// Returns the index of the root reached.
pub fn verify(
    leaf: &[u8],
    intermediates: &[Vec<u8>],
    roots: &[Vec<u8>],
    now: u64,
) -> Result<usize, ChainError> {
    verify_path(leaf, intermediates, roots, now).map(|p| p.root_index)
}

/// A validated path: the issuers above the leaf in chain order (intermediates, then the
/// root), as DER, and which root was reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainPath {
    pub issuers: Vec<Vec<u8>>,
    pub root_index: usize,
}

/// As [`verify`], returning the path it validated.
pub fn verify_path(
    leaf: &[u8],
    intermediates: &[Vec<u8>],
    roots: &[Vec<u8>],
    now: u64,
) -> Result<ChainPath, ChainError> {
    verify_counted(leaf, intermediates, roots, now).0
}

/// As [`verify_path`], with at most `max_intermediates` intermediates (an operator's setting,
/// such as x509pop's `max_intermediates`) instead of [`MAX_INTERMEDIATES`]. The signature
/// budget stays proportional to what was sent.
pub fn verify_path_limited(
    leaf: &[u8],
    intermediates: &[Vec<u8>],
    roots: &[Vec<u8>],
    now: u64,
    max_intermediates: usize,
) -> Result<ChainPath, ChainError> {
    verify_counted_limited(leaf, intermediates, roots, now, max_intermediates).0
}

/// [`verify_path`], and how many signatures it checked.
fn verify_counted(
    leaf: &[u8],
    intermediates: &[Vec<u8>],
    roots: &[Vec<u8>],
    now: u64,
) -> (Result<ChainPath, ChainError>, usize) {
    verify_counted_limited(leaf, intermediates, roots, now, MAX_INTERMEDIATES)
}

fn verify_counted_limited(
    leaf: &[u8],
    intermediates: &[Vec<u8>],
    roots: &[Vec<u8>],
    now: u64,
    max_intermediates: usize,
) -> (Result<ChainPath, ChainError>, usize) {
    let mut budget = Budget {
        left: CHECKS_PER_CERTIFICATE * (intermediates.len() + 1) + roots.len(),
        used: 0,
    };
    let r = build(
        leaf,
        intermediates,
        roots,
        now,
        max_intermediates,
        &mut budget,
    );
    (r, budget.used)
}

fn build(
    leaf: &[u8],
    intermediates: &[Vec<u8>],
    roots: &[Vec<u8>],
    now: u64,
    max_intermediates: usize,
    budget: &mut Budget,
) -> Result<ChainPath, ChainError> {
    if intermediates.len() > max_intermediates {
        return Err(ChainError::TooManyIntermediates {
            got: intermediates.len(),
            max: max_intermediates,
        });
    }
    let leaf = parse(0, leaf)?;
    check_time(0, &leaf, now)?;
    let inter: Vec<Parsed> = intermediates
        .iter()
        .enumerate()
        .map(|(i, d)| parse(i + 1, d))
        .collect::<Result<_, _>>()?;
    let roots_p: Vec<Option<Parsed>> = roots.iter().map(|d| parse(0, d).ok()).collect();
    let mut current = &leaf;
    let mut used = vec![false; inter.len()];
    let mut issuers = vec![];
    for depth in 0..=inter.len() {
        let usable_roots = roots_p
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().map(|r| (i, r)))
            .filter(|(_, r)| {
                check_issuer(depth + 1, r).is_ok() && check_time(depth + 1, r, now).is_ok()
            });
        if let Some(ri) = find_issuer(current, usable_roots, budget)? {
            issuers.push(roots[ri].clone());
            return Ok(ChainPath {
                issuers,
                root_index: ri,
            });
        }
        let unused = inter.iter().enumerate().filter(|(i, _)| !used[*i]);
        let Some(i) = find_issuer(current, unused, budget)? else {
            return Err(if depth == 0 && !inter.is_empty() {
                ChainError::BadSignature(0)
            } else {
                ChainError::NoTrustedRoot
            });
        };
        let c = &inter[i];
        check_issuer(i + 1, c)?;
        check_time(i + 1, c, now)?;
        used[i] = true;
        issuers.push(intermediates[i].clone());
        current = c;
    }
    Err(ChainError::NoTrustedRoot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{SoftCa, same_name_chain};

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn chain_honest_path_takes_one_signature_check_per_certificate() {
        let root = SoftCa::root("CN=Root");
        let mid = root.issue_ca("CN=Intermediate");
        let leaf = mid.issue_leaf("CN=device");
        let (r, checks) = verify_counted(
            &leaf,
            std::slice::from_ref(&mid.cert),
            std::slice::from_ref(&root.cert),
            now(),
        );
        let path = r.unwrap();
        assert_eq!(path.issuers, vec![mid.cert.clone(), root.cert.clone()]);
        assert_eq!(checks, 2);
    }

    /// Issue 19 item 1: intermediates that all share one name, in the order that makes a
    /// naive builder try every one at every depth, cost at most k·(N+1) + R checks, and more
    /// than MAX_INTERMEDIATES cost nothing at all.
    #[test]
    fn chain_signature_checks_are_bounded_by_k_per_certificate() {
        let root = SoftCa::root("CN=Real Root");
        let roots = vec![root.cert.clone()];
        for n in 1..=MAX_INTERMEDIATES {
            let (leaf, cas) = same_name_chain(n, "CN=attacker");
            let (r, checks) = verify_counted(&leaf, &cas, &roots, now());
            assert!(r.is_err(), "{n}: an attacker's chain was accepted");
            let bound = CHECKS_PER_CERTIFICATE * (n + 1) + roots.len();
            assert!(
                checks <= bound,
                "{n} intermediates: {checks} checks > {bound}"
            );
        }
        // The same chain, its AKI/SKI matched: one check per certificate.
        let (leaf, cas) = same_name_chain(MAX_INTERMEDIATES, "CN=attacker");
        let (_, checks) = verify_counted(&leaf, &cas, &roots, now());
        assert!(checks <= MAX_INTERMEDIATES + 1, "{checks}");
        let (leaf, cas) = same_name_chain(64, "CN=attacker");
        let t = std::time::Instant::now();
        let (r, checks) = verify_counted(&leaf, &cas, &roots, now());
        assert_eq!(
            r,
            Err(ChainError::TooManyIntermediates {
                got: 64,
                max: MAX_INTERMEDIATES
            })
        );
        assert_eq!(checks, 0);
        assert!(t.elapsed() < std::time::Duration::from_millis(10));
    }

    /// Same-named CAs none of which issued the leaf (their key identifiers do not match, so
    /// each is tried) stay within the budget.
    #[test]
    fn chain_budget_holds_when_no_candidate_is_the_issuer() {
        let root = SoftCa::root("CN=Real Root");
        // Siblings: N CAs named alike under one parent, none of which issued the leaf.
        let parent = SoftCa::root("CN=attacker");
        let decoys: Vec<Vec<u8>> = (0..MAX_INTERMEDIATES)
            .map(|_| parent.issue_ca("CN=attacker").cert)
            .collect();
        let other = SoftCa::root("CN=attacker");
        let leaf = other.issue_leaf("CN=device");
        let (r, checks) = verify_counted(&leaf, &decoys, std::slice::from_ref(&root.cert), now());
        assert_eq!(r, Err(ChainError::BadSignature(0)));
        assert!(checks <= CHECKS_PER_CERTIFICATE * (MAX_INTERMEDIATES + 1) + 1);
    }
}
