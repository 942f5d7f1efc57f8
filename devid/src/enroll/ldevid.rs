//! LDevID enrollment with an owner CA: the request (a new key certified by the IAK over the
//! CA's nonce, the IDevID signing the certify), its verification, and the CA's nonces:
//! stateless (MACed with their expiry), single use, and expiring.

use super::*;

/// An LDevID enrollment request: the device's IDevID and IAK (certificates from the
/// manufacturer CA and their TPM public areas), the new LDevID key's public area, its
/// TPM2_Certify by the IAK over the owner CA's nonce, and the IDevID's signature over that
/// certify (the IDevID holder takes part in this enrollment).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LdevidRequest {
    pub idevid_cert: Vec<u8>,
    pub iak_cert: Vec<u8>,
    pub idevid_pub: Vec<u8>,
    pub iak_pub: Vec<u8>,
    pub ldevid_pub: Vec<u8>,
    /// TPMS_ATTEST of TPM2_Certify(LDevID key) by the IAK, extraData = the nonce.
    pub certify_info: Vec<u8>,
    pub certify_sig: Vec<u8>,
    /// TPMT_SIGNATURE by the IDevID key over `certify_info`.
    pub idevid_sig: Vec<u8>,
}

/// Why an LDevID request was refused (beyond the shared [`EnrollError`] checks).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LdevidError {
    #[error("the {0} certificate does not chain to a trusted manufacturer CA: {1}")]
    Untrusted(&'static str, String),
    #[error("the {0} certificate does not follow the DevID profile: {1}")]
    Profile(&'static str, String),
    #[error("the IAK and IDevID certificates name different devices")]
    DeviceMismatch,
    #[error("the {0} public area is not the key of its certificate")]
    KeyMismatch(&'static str),
    #[error(transparent)]
    Enroll(#[from] EnrollError),
}

/// What an owner CA certifies after [`verify_ldevid_request`].
#[derive(Debug, Clone)]
pub struct VerifiedLdevid {
    pub ldevid: Public,
    pub device: crate::profile::DevIdInfo,
}

/// The owner CA's checks of an LDevID request bound to `nonce` (single use, the caller's):
/// IDevID and IAK certificates chain to `manufacturer_roots`, follow the profile and name the
/// same device; the public areas are their keys; the IAK is restricted and certified the new
/// key over the nonce; the IDevID key signed that certify; the new key is TPM-fixed and an
/// unrestricted signing key.
pub fn verify_ldevid_request(
    req: &LdevidRequest,
    nonce: &[u8],
    manufacturer_roots: &[Vec<u8>],
    now: u64,
) -> Result<VerifiedLdevid, LdevidError> {
    use crate::profile::{DevIdKind, check_devid_cert};
    for (cert, what) in [(&req.idevid_cert, "IDevID"), (&req.iak_cert, "IAK")] {
        crate::chain::verify(cert, &[], manufacturer_roots, now)
            .map_err(|e| LdevidError::Untrusted(what, e.to_string()))?;
    }
    let device = check_devid_cert(&req.idevid_cert, DevIdKind::IDevId)
        .map_err(|e| LdevidError::Profile("IDevID", e.to_string()))?;
    let iak_info = check_devid_cert(&req.iak_cert, DevIdKind::Iak)
        .map_err(|e| LdevidError::Profile("IAK", e.to_string()))?;
    if iak_info != device {
        return Err(LdevidError::DeviceMismatch);
    }
    // The serial goes into the LDevID's subject as the manufacturer certified it (a typed
    // value, never parsed).
    crate::profile::check_certified_serial_number(&device.serial_number)
        .map_err(|e| LdevidError::Profile("IDevID", e.to_string()))?;
    let parse = |b: &[u8]| Public::parse(b);
    let idevid = parse(&req.idevid_pub).map_err(EnrollError::BadIdevid)?;
    let iak = parse(&req.iak_pub).map_err(EnrollError::BadIak)?;
    for (p, cert, what) in [
        (&idevid, &req.idevid_cert, "IDevID"),
        (&iak, &req.iak_cert, "IAK"),
    ] {
        let spki = p.spki_der().map_err(|_| LdevidError::KeyMismatch(what))?;
        let cert_spki = kame_api::x509svid::ParsedCert::parse(cert)
            .and_then(|c| c.spki_der())
            .map_err(|_| LdevidError::KeyMismatch(what))?;
        if spki != cert_spki {
            return Err(LdevidError::KeyMismatch(what));
        }
    }
    if iak.attributes & (attr::RESTRICTED | attr::SIGN_ENCRYPT)
        != attr::RESTRICTED | attr::SIGN_ENCRYPT
    {
        return Err(EnrollError::IakNotRestricted.into());
    }
    let ldevid = parse(&req.ldevid_pub).map_err(EnrollError::BadIdevid)?;
    attest::verify_certify(&iak, &req.certify_info, &req.certify_sig, &ldevid, nonce)
        .map_err(EnrollError::IdevidNotCertified)?;
    attest::Signature::parse(&req.idevid_sig)
        .and_then(|s| s.verify(&idevid, &req.certify_info))
        .map_err(EnrollError::BadRequestSignature)?;
    if ldevid.attributes & (attr::FIXED_TPM | attr::FIXED_PARENT)
        != attr::FIXED_TPM | attr::FIXED_PARENT
    {
        return Err(EnrollError::IdevidExportable.into());
    }
    if ldevid.attributes & attr::SIGN_ENCRYPT == 0
        || ldevid.attributes & (attr::RESTRICTED | attr::DECRYPT) != 0
    {
        return Err(EnrollError::IdevidNotSigning.into());
    }
    Ok(VerifiedLdevid { ldevid, device })
}

/// Single-use nonces for LDevID enrollment, each valid for a while. Issuing one keeps no
/// state: the id carries its expiry and the nonce is an HMAC of the id under a key of this
/// CA's, so unauthenticated BeginLdevid calls cost nothing to hold. Only a nonce spent by a
/// request that passed every check is remembered (until it expires), to refuse its replay.
pub struct Nonces {
    ttl: Duration,
    key: aws_lc_rs::hmac::Key,
    spent: Mutex<HashMap<String, u64>>,
}
impl std::fmt::Debug for Nonces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nonces")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// Most spent nonces remembered: each is a request that passed every check.
pub(super) const MAX_SPENT: usize = 65_536;

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
impl Nonces {
    pub fn new(ttl: Duration) -> Result<Self, EnrollError> {
        let key = zeroize::Zeroizing::new(random(32)?);
        Ok(Nonces {
            ttl,
            key: aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &key),
            spent: Mutex::new(HashMap::new()),
        })
    }

    pub(super) fn nonce_for(&self, id: &str) -> Vec<u8> {
        aws_lc_rs::hmac::sign(&self.key, id.as_bytes())
            .as_ref()
            .to_vec()
    }

    /// A fresh (id, nonce).
    pub fn issue(&self) -> Result<(String, Vec<u8>), EnrollError> {
        let mut raw = random(16)?;
        raw.extend_from_slice(&(unix_now() + self.ttl.as_secs()).to_be_bytes());
        let id = hex_id(&raw);
        let nonce = self.nonce_for(&id);
        Ok((id, nonce))
    }

    /// The expiry an id of ours carries: 16 random bytes then the expiry, in lower-case hex.
    pub(super) fn expiry_of(id: &str) -> Result<u64, EnrollError> {
        let b = id.as_bytes();
        if b.len() != 48
            || !b
                .iter()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
        {
            return Err(EnrollError::UnknownChallenge);
        }
        id.get(32..)
            .and_then(|e| u64::from_str_radix(e, 16).ok())
            .ok_or(EnrollError::UnknownChallenge)
    }

    /// The nonce of `id` if this CA issued it, it has not expired and it is not spent.
    pub fn nonce(&self, id: &str) -> Result<Vec<u8>, EnrollError> {
        let expiry = Self::expiry_of(id)?;
        let now = unix_now();
        if now >= expiry || expiry > now + self.ttl.as_secs() {
            return Err(EnrollError::UnknownChallenge);
        }
        if self.spent_ids().contains_key(id) {
            return Err(EnrollError::UnknownChallenge);
        }
        Ok(self.nonce_for(id))
    }

    pub(super) fn spent_ids(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.spent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `id` used (after the request bound to it passed every check): a second use, or
    /// a concurrent one, is refused.
    pub fn spend(&self, id: &str) -> Result<(), EnrollError> {
        self.nonce(id)?;
        let expiry = Self::expiry_of(id)?;
        let now = unix_now();
        let mut spent = self.spent_ids();
        spent.retain(|_, exp| *exp > now);
        if spent.len() >= MAX_SPENT {
            return Err(EnrollError::TooManyPending("in all", self.ttl.as_secs()));
        }
        if spent.insert(id.to_string(), expiry).is_some() {
            return Err(EnrollError::UnknownChallenge);
        }
        Ok(())
    }

    /// [`Nonces::nonce`] and [`Nonces::spend`] at once.
    pub fn take(&self, id: &str) -> Result<Vec<u8>, EnrollError> {
        let n = self.nonce(id)?;
        self.spend(id)?;
        Ok(n)
    }
}
