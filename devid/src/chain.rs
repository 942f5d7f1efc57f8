//! RFC 5280 path validation for device certificates (EK, IDevID, LDevID): names chain, every
//! signature verifies with its issuer's key, every issuer is a CA allowed to sign certificates,
//! and every certificate is valid at the given time. One error variant per failed check. Pure
//! verification: certificates come in as DER, nothing is read from disk.

use kame_api::keys::verify_x509_signature;
use x509_cert::Certificate;
use x509_cert::der::{Decode, Encode};
use x509_cert::ext::pkix::{BasicConstraints, KeyUsage};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("certificate {0} cannot be parsed: {1}")]
    Parse(usize, String),
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
}

struct Parsed {
    cert: Certificate,
    tbs: Vec<u8>,
    spki: Vec<u8>,
}

fn parse(i: usize, der: &[u8]) -> Result<Parsed, ChainError> {
    let cert = Certificate::from_der(der).map_err(|e| ChainError::Parse(i, e.to_string()))?;
    let tbs = cert
        .tbs_certificate()
        .to_der()
        .map_err(|e| ChainError::Parse(i, e.to_string()))?;
    let spki = cert
        .tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .map_err(|e| ChainError::Parse(i, e.to_string()))?;
    Ok(Parsed { cert, tbs, spki })
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

fn signed_by(child: &Parsed, issuer: &Parsed) -> bool {
    if child.cert.tbs_certificate().issuer() != issuer.cert.tbs_certificate().subject() {
        return false;
    }
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
        for (ri, r) in roots_p.iter().enumerate() {
            let Some(r) = r else { continue };
            if signed_by(current, r)
                && check_issuer(depth + 1, r).is_ok()
                && check_time(depth + 1, r, now).is_ok()
            {
                issuers.push(roots[ri].clone());
                return Ok(ChainPath {
                    issuers,
                    root_index: ri,
                });
            }
        }
        let next = inter
            .iter()
            .enumerate()
            .find(|(i, c)| !used[*i] && signed_by(current, c));
        let Some((i, c)) = next else {
            return Err(if depth == 0 && !inter.is_empty() {
                ChainError::BadSignature(0)
            } else {
                ChainError::NoTrustedRoot
            });
        };
        check_issuer(i + 1, c)?;
        check_time(i + 1, c, now)?;
        used[i] = true;
        issuers.push(intermediates[i].clone());
        current = c;
    }
    Err(ChainError::NoTrustedRoot)
}
