//! A DevID-issuing CA: the manufacturer CA that certifies IAKs and IDevIDs after TCG
//! enrollment, or an owner CA that certifies LDevIDs. Its private key sits in a KeyManager
//! (memory, disk, AWS KMS, Vault Transit, a PKCS#11 HSM), so it never touches this process's
//! memory with a remote backend; every signature is checked against the key's fingerprint.
//! It checks what it issues against the 802.1AR profile before handing it out. It decides
//! nothing about who may enroll: callers pass requests that passed [`crate::enroll`].

use crate::enroll::{VerifiedLdevid, VerifiedRequest};
use crate::profile::{self, DevIdKind, DevIdParams, ProfileError};
use kame_api::x509svid::{self, IssuerInfo, ParsedCert};
use kame_keymanager::{KeyManager, KeyType, PublicKey, SignOpts, sign_checked};
use std::sync::Arc;

/// Why the CA could not start or issue, one variant per failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    #[error("key manager: {0}")]
    KeyManager(#[from] kame_keymanager::Error),
    #[error("certificate profile: {0}")]
    Profile(#[from] ProfileError),
    #[error("{0}")]
    Api(#[from] kame_api::Error),
    #[error("the CA certificate does not carry the KeyManager key {0:?}")]
    KeyMismatch(String),
    #[error("the system random number generator failed")]
    Random,
    /// The device's hardwareModuleName type is not an object identifier.
    #[error("the hardwareModuleName type is not an OID: {0}")]
    HardwareModuleType(#[source] der::oid::Error),
    /// A device key's TPMT_PUBLIC that has no SubjectPublicKeyInfo form.
    #[error("bad public key: {0}")]
    Key(#[source] kame_tpm::wire::Error),
}

/// A CA whose key is the KeyManager key `key.id`.
#[derive(Debug, Clone)]
pub struct DevIdCa {
    km: Arc<dyn KeyManager>,
    key: PublicKey,
    cert: Vec<u8>,
    issuer: IssuerInfo,
}

fn serial() -> Result<Vec<u8>, CaError> {
    let mut s = vec![0u8; 16];
    aws_lc_rs::rand::fill(&mut s).map_err(|_| CaError::Random)?;
    s[0] = (s[0] & 0x7f).max(1);
    Ok(s)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl DevIdCa {
    /// Makes a new key `key_id` in `km` and a self-signed CA certificate for it, valid for
    /// `ttl_secs`.
    pub async fn init(
        km: Arc<dyn KeyManager>,
        key_id: &str,
        key_type: KeyType,
        subject: &str,
        ttl_secs: u64,
    ) -> Result<Self, CaError> {
        let key = km.generate_key(key_id, key_type).await?;
        let nb = now().saturating_sub(60);
        let tbs = profile::ca_tbs(
            subject,
            &key.spki_der,
            &serial()?,
            nb,
            nb + ttl_secs.max(60),
            None,
        )?;
        let alg = kame_api::keys::KeyInfo::from_spki_der(&key.spki_der)?.x509_signature_algorithm();
        let sig = sign_checked(km.as_ref(), &key, &tbs, SignOpts::for_key(key_type)).await?;
        let cert = x509svid::assemble(&tbs, &alg, &sig)?;
        Self::open(km, key_id, cert).await
    }

    /// The CA of `cert_der` whose key is `key_id` in `km` (checked to match).
    pub async fn open(
        km: Arc<dyn KeyManager>,
        key_id: &str,
        cert_der: Vec<u8>,
    ) -> Result<Self, CaError> {
        let key = km.public_key(key_id).await?;
        if ParsedCert::parse(&cert_der)?.spki_der()? != key.spki_der {
            return Err(CaError::KeyMismatch(key_id.to_string()));
        }
        let issuer = IssuerInfo::from_cert_der(&cert_der)?;
        Ok(DevIdCa {
            km,
            key,
            cert: cert_der,
            issuer,
        })
    }

    /// The CA certificate, DER.
    pub fn certificate(&self) -> &[u8] {
        &self.cert
    }

    /// Issues a DevID certificate (a fresh serial number; notAfter capped at the CA's).
    pub async fn issue(&self, p: &DevIdParams<'_>) -> Result<Vec<u8>, CaError> {
        let cert_serial = serial()?;
        let not_after = Some(
            p.not_after
                .unwrap_or(profile::NO_EXPIRY)
                .min(self.issuer.not_after),
        );
        let p = DevIdParams {
            cert_serial: &cert_serial,
            not_after,
            ..p.clone()
        };
        let tbs = profile::devid_tbs(&p, &self.issuer)?;
        let sig = sign_checked(
            self.km.as_ref(),
            &self.key,
            &tbs,
            SignOpts::for_key(self.key.key_type),
        )
        .await?;
        let cert = x509svid::assemble(&tbs, &self.issuer.signature_algorithm, &sig)?;
        ParsedCert::parse(&cert)?.check_signed_by(&self.key.spki_der)?;
        profile::check_devid_cert(&cert, p.kind)?;
        Ok(cert)
    }

    /// The IAK and IDevID certificates for an enrolled device (after its credential
    /// activation succeeded): subject `subject` plus the device serial, hardwareModuleName
    /// (tcg-sv-tpm20, the product serial). Returns (IAK certificate, IDevID certificate).
    pub async fn issue_manufactured(
        &self,
        v: &VerifiedRequest,
        subject: &str,
    ) -> Result<(Vec<u8>, Vec<u8>), CaError> {
        let spki = |k: &kame_tpm::wire::public::Public| k.spki_der().map_err(CaError::Key);
        let (iak_spki, idevid_spki) = (spki(&v.iak)?, spki(&v.idevid)?);
        let params = |kind, spki_der| DevIdParams {
            kind,
            subject,
            serial_number: &v.request.prod_serial,
            hw_type: profile::TCG_SV_TPM20,
            hw_serial: v.request.prod_serial.as_bytes(),
            spki_der,
            cert_serial: &[],
            not_before: now().saturating_sub(60),
            not_after: None,
        };
        let iak = self.issue(&params(DevIdKind::Iak, &iak_spki)).await?;
        let idevid = self.issue(&params(DevIdKind::IDevId, &idevid_spki)).await?;
        Ok((iak, idevid))
    }

    /// The LDevID certificate for a device's new key after [`crate::enroll::verify_ldevid_request`]:
    /// the device's serialNumber and hardwareModuleName (from its IDevID), `subject`.
    pub async fn issue_ldevid(
        &self,
        v: &VerifiedLdevid,
        subject: &str,
    ) -> Result<Vec<u8>, CaError> {
        let spki = v.ldevid.spki_der().map_err(CaError::Key)?;
        let hw_type = der::asn1::ObjectIdentifier::new(&v.device.hardware_module_name.0)
            .map_err(CaError::HardwareModuleType)?;
        self.issue(&DevIdParams {
            kind: DevIdKind::LDevId,
            subject,
            serial_number: &v.device.serial_number,
            hw_type,
            hw_serial: &v.device.hardware_module_name.1,
            spki_der: &spki,
            cert_serial: &[],
            not_before: now().saturating_sub(60),
            not_after: None,
        })
        .await
    }
}
