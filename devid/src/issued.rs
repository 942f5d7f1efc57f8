//! The device's check of what a CA sends back: each certificate chains to the CA certificate
//! sent with it and, when the device pinned CAs beforehand, to one of those; it follows the
//! DevID profile of its kind; and it certifies the very key the TPM holds, not another one.
//! Pure: the caller reads the TPM's public areas and writes the files; nothing here touches
//! either, and nothing is trusted that the device did not already hold.

use crate::chain::{self, ChainError};
use crate::profile::{self, DevIdInfo, DevIdKind, ProfileError};
use kame_api::keys::KeyInfo;

/// Why the device refuses a certificate its CA sent, one variant per check.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssuedError {
    #[error("the {0:?} certificate does not chain to the CA certificate sent with it: {1}")]
    NotFromSentCa(DevIdKind, ChainError),
    #[error("the CA is not one this device trusts (--trust-ca): {0}")]
    UntrustedCa(ChainError),
    #[error("the {0:?} certificate does not follow the DevID profile: {1}")]
    Profile(DevIdKind, ProfileError),
    #[error("the TPM's public area for the {0:?} key is not usable: {1}")]
    BadTpmPublic(DevIdKind, String),
    #[error("the {0:?} certificate's key cannot be read: {1}")]
    BadCertKey(DevIdKind, String),
    #[error("the {0:?} certificate is for another key than the one in this TPM")]
    NotThisKey(DevIdKind),
}

/// Checks one certificate the CA issued for the TPM key whose TPMT_PUBLIC is `tpm_public`:
/// it chains to `sent_ca`, to one of `pinned` when there are any, follows the profile of
/// `kind`, and names that key. Returns the certificate's 802.1AR fields.
pub fn check(
    cert: &[u8],
    kind: DevIdKind,
    sent_ca: &[u8],
    pinned: &[Vec<u8>],
    tpm_public: &[u8],
    now: u64,
) -> Result<DevIdInfo, IssuedError> {
    let sent = [sent_ca.to_vec()];
    chain::verify(cert, &[], &sent, now).map_err(|e| IssuedError::NotFromSentCa(kind, e))?;
    if !pinned.is_empty() {
        chain::verify(cert, &sent, pinned, now).map_err(IssuedError::UntrustedCa)?;
    }
    let info = profile::check_devid_cert(cert, kind).map_err(|e| IssuedError::Profile(kind, e))?;
    let tpm_key = kame_tpm::wire::Public::parse(tpm_public)
        .and_then(|p| p.spki_der())
        .map_err(|e| IssuedError::BadTpmPublic(kind, e.to_string()))
        .and_then(|s| {
            KeyInfo::from_spki_der(&s).map_err(|e| IssuedError::BadTpmPublic(kind, e.to_string()))
        })?;
    let cert_key = kame_api::x509svid::ParsedCert::parse(cert)
        .and_then(|c| c.spki_der())
        .and_then(|s| KeyInfo::from_spki_der(&s))
        .map_err(|e| IssuedError::BadCertKey(kind, e.to_string()))?;
    if tpm_key != cert_key {
        return Err(IssuedError::NotThisKey(kind));
    }
    Ok(info)
}
