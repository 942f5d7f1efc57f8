//! The IEEE 802.1AR DevID certificate profile: reading the fields attestation uses (the subject
//! serialNumber attribute, OID 2.5.4.5, and the SAN otherName hardwareModuleName, RFC 4108 §5,
//! OID 1.3.6.1.5.5.7.8.4: SEQUENCE { hwType OID, hwSerialNum OCTET STRING }), building the TBS
//! of IAK, IDevID and LDevID certificates, and checking a certificate against the profile. Pure
//! DER work: it never signs (the CA's KeyManager does) and never panics on input.

use const_oid::AssociatedOid;
use der::Encode;
use der::asn1::{Any, ObjectIdentifier, OctetString};
use kame_api::x509svid::{self, IssuerInfo};
use x509_cert::Certificate;
use x509_cert::der::Decode;
use x509_cert::ext::pkix::name::{GeneralName, OtherName};
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, CertificatePolicies, KeyUsage, KeyUsages, SubjectAltName,
    SubjectKeyIdentifier, certpolicy::PolicyInformation,
};

/// id-on-hardwareModuleName (RFC 4108).
pub const HARDWARE_MODULE_NAME: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.8.4");
/// id-at-serialNumber (X.520).
pub const SERIAL_NUMBER: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.5");

#[derive(Debug, Clone, PartialEq, Eq, der::Sequence)]
struct HardwareModuleName {
    hw_type: ObjectIdentifier,
    hw_serial_num: OctetString,
}

/// An attribute value that is a PrintableString or a UTF8String, as text.
fn directory_string(value: &Any) -> Option<String> {
    value
        .decode_as::<der::asn1::PrintableStringRef<'_>>()
        .map(|s| s.to_string())
        .or_else(|_| {
            value
                .decode_as::<der::asn1::Utf8StringRef<'_>>()
                .map(|s| s.to_string())
        })
        .ok()
}

/// The subject serialNumber attributes of a certificate, in order.
pub fn subject_serial_numbers(cert_der: &[u8]) -> Vec<String> {
    let Ok(cert) = Certificate::from_der(cert_der) else {
        return vec![];
    };
    cert.tbs_certificate()
        .subject()
        .iter()
        .filter(|atv| atv.oid == SERIAL_NUMBER)
        .filter_map(|atv| directory_string(&atv.value))
        .collect()
}

/// The hardwareModuleName entries of the SAN: (hwType OID, hwSerialNum bytes).
pub fn hardware_module_names(cert_der: &[u8]) -> Vec<(String, Vec<u8>)> {
    let Ok(cert) = Certificate::from_der(cert_der) else {
        return vec![];
    };
    let Ok(Some((_, san))) = cert.tbs_certificate().get_extension::<SubjectAltName>() else {
        return vec![];
    };
    let mut out = vec![];
    for name in san.0.iter() {
        if let GeneralName::OtherName(o) = name
            && o.type_id == HARDWARE_MODULE_NAME
            && let Ok(h) = o.value.decode_as::<HardwareModuleName>()
        {
            out.push((h.hw_type.to_string(), h.hw_serial_num.as_bytes().to_vec()));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Building and checking DevID certificates (IEEE 802.1AR-2018 §8, with the TCG "TPM 2.0 Keys
// for Device Identity and Attestation" v1.0 rev 12 certificate policies).

/// tcg-cap-verifiedTPMResidency: the CA verified that the key is resident in the same TPM as a
/// genuine EK (TCG DevID v1.0 rev 12 §8 (certificate policies, p. 60): "An IDevID/IAK … SHOULD
/// include tcg-cap-verifiedTPMResidency … and also one of tcg-cap-verifiedTPMFixed (IDevID) or
/// tcg-cap-verifiedTPMRestricted (IAK)"; OID arc 2.23.133.11.1 of the TCG OID registry).
pub const TCG_CAP_VERIFIED_TPM_RESIDENCY: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("2.23.133.11.1.1");
/// tcg-cap-verifiedTPMFixed: the key is fixedTPM (IDevID, LDevID). Same source.
pub const TCG_CAP_VERIFIED_TPM_FIXED: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("2.23.133.11.1.2");
/// tcg-cap-verifiedTPMRestricted: the key is a restricted signing key (IAK). Same source.
pub const TCG_CAP_VERIFIED_TPM_RESTRICTED: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("2.23.133.11.1.3");
/// tcg-sv-tpm20: the hwType of a hardwareModuleName naming a TPM 2.0 (TCG EK Credential
/// Profile 2.5 §3.2.12 / TCG OID registry 2.23.133.1.2).
pub const TCG_SV_TPM20: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.23.133.1.2");

/// The DevID certificate kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevIdKind {
    /// Initial Attestation Key (a restricted signing key).
    Iak,
    /// Initial Device Identity (the manufacturer's, an unrestricted signing key).
    IDevId,
    /// Locally significant Device Identity (the owner's).
    LDevId,
}

impl DevIdKind {
    /// The TCG certificate policies a certificate of this kind carries.
    pub fn policies(self) -> [ObjectIdentifier; 2] {
        match self {
            DevIdKind::Iak => [
                TCG_CAP_VERIFIED_TPM_RESIDENCY,
                TCG_CAP_VERIFIED_TPM_RESTRICTED,
            ],
            DevIdKind::IDevId | DevIdKind::LDevId => {
                [TCG_CAP_VERIFIED_TPM_RESIDENCY, TCG_CAP_VERIFIED_TPM_FIXED]
            }
        }
    }
}

/// 9999-12-31T23:59:59Z: "no well-defined expiration date" (IEEE 802.1AR-2018 §8.5, RFC 5280
/// §4.1.2.5), allowed for IDevIDs and IAKs.
pub const NO_EXPIRY: u64 = 253_402_300_799;

/// Why a DevID certificate could not be built or does not follow the profile, one variant per
/// check.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileError {
    #[error("not a certificate: {0}")]
    Parse(#[source] der::Error),
    #[error("encoding failed: {0}")]
    Encode(#[source] der::Error),
    /// The serial number cannot be a PrintableString or UTF8String.
    #[error("the device serial number cannot be encoded: {0}")]
    SerialNumberEncoding(#[source] der::Error),
    #[error("the subject has no serialNumber attribute (IEEE 802.1AR §8.6)")]
    NoSerialNumber,
    #[error("the subjectAltName has no hardwareModuleName (IEEE 802.1AR §8.9)")]
    NoHardwareModuleName,
    #[error("keyUsage is missing or not critical (IEEE 802.1AR §8.10)")]
    KeyUsageNotCritical,
    #[error("keyUsage lacks digitalSignature")]
    NoDigitalSignature,
    #[error("keyUsage allows certificate or CRL signing: a DevID is an end-entity key")]
    SigningCaKeyUsage,
    #[error("certificate policy {0} ({1}) is missing")]
    MissingPolicy(String, &'static str),
    #[error("the device serial number {0}")]
    BadSerialNumber(String),
    #[error("{0}")]
    Api(#[from] kame_api::Error),
}

fn enc(e: der::Error) -> ProfileError {
    ProfileError::Encode(e)
}

/// What goes into a DevID certificate.
#[derive(Debug, Clone)]
pub struct DevIdParams<'a> {
    pub kind: DevIdKind,
    /// The subject without the serialNumber, e.g. `O=Example Devices, CN=sensor`.
    pub subject: &'a str,
    /// The device serial number (subject serialNumber).
    pub serial_number: &'a str,
    /// hardwareModuleName: the hardware type and its serial number.
    pub hw_type: ObjectIdentifier,
    pub hw_serial: &'a [u8],
    /// The certified key.
    pub spki_der: &'a [u8],
    /// The certificate's serial number (positive, 1 to 20 bytes).
    pub cert_serial: &'a [u8],
    pub not_before: u64,
    /// None: [`NO_EXPIRY`].
    pub not_after: Option<u64>,
}

/// The hardwareModuleName otherName (RFC 4108 §5).
fn hmn_general_name(
    hw_type: ObjectIdentifier,
    hw_serial: &[u8],
) -> Result<GeneralName, ProfileError> {
    let hmn = HardwareModuleName {
        hw_type,
        hw_serial_num: OctetString::new(hw_serial).map_err(enc)?,
    };
    Ok(GeneralName::OtherName(OtherName {
        type_id: HARDWARE_MODULE_NAME,
        value: Any::encode_from(&hmn).map_err(enc)?,
    }))
}

/// X.520's upper bound on a serialNumber attribute (ub-serial-number).
pub const MAX_SERIAL_NUMBER: usize = 64;

fn is_printable(c: char) -> bool {
    c.is_ascii_alphanumeric() || " '()+,-./:=?".contains(c)
}

/// Checks that a device serial a device sent (a TCG-CSR-IDEVID's prodSerial) can be a subject
/// serialNumber: 1 to [`MAX_SERIAL_NUMBER`] characters of the PrintableString set (X.520:
/// A–Z, a–z, 0–9, space and `'()+,-./:=?`). It becomes a typed attribute either way; this
/// keeps what a device names itself to plain values.
pub fn check_serial_number(serial: &str) -> Result<(), ProfileError> {
    check_certified_serial_number(serial)?;
    if let Some(c) = serial.chars().find(|c| !is_printable(*c)) {
        return Err(ProfileError::BadSerialNumber(format!(
            "holds {c:?}, which is not a PrintableString character (A-Z a-z 0-9 space ' ( ) + , - . / : = ?)"
        )));
    }
    Ok(())
}

/// Checks a serial a CA already certified (an IDevID's, for an LDevID): 1 to
/// [`MAX_SERIAL_NUMBER`] characters, none of them a control character. Manufacturer CAs
/// other than Kame's may use a UTF8String; it is carried over as one.
pub fn check_certified_serial_number(serial: &str) -> Result<(), ProfileError> {
    let bad = |why: String| Err(ProfileError::BadSerialNumber(why));
    if serial.is_empty() {
        return bad("is empty".into());
    }
    let n = serial.chars().count();
    if n > MAX_SERIAL_NUMBER {
        return bad(format!(
            "is {n} characters long; at most {MAX_SERIAL_NUMBER} are allowed"
        ));
    }
    if let Some(c) = serial.chars().find(|c| c.is_control()) {
        return bad(format!("holds the control character {c:?}"));
    }
    Ok(())
}

/// The DER of `subject` (the operator's, trusted) with the device's serialNumber appended as
/// a typed attribute, a PrintableString when the serial fits that set, else a UTF8String: the
/// serial is never parsed as DN syntax.
fn subject_with_serial(subject: &str, serial: &str) -> Result<Vec<u8>, ProfileError> {
    use x509_cert::attr::AttributeTypeAndValue;
    use x509_cert::name::{RdnSequence, RelativeDistinguishedName};
    check_certified_serial_number(serial)?;
    let mut rdns: RdnSequence = x509svid::parse_name(subject)?.into();
    let bad = ProfileError::SerialNumberEncoding;
    let value = if serial.chars().all(is_printable) {
        Any::encode_from(&der::asn1::PrintableStringRef::new(serial).map_err(bad)?)
    } else {
        Any::encode_from(&der::asn1::Utf8StringRef::new(serial).map_err(bad)?)
    }
    .map_err(enc)?;
    let atv = AttributeTypeAndValue {
        oid: SERIAL_NUMBER,
        value,
    };
    rdns.push(RelativeDistinguishedName::try_from(vec![atv]).map_err(enc)?);
    rdns.to_der().map_err(enc)
}

/// The TBSCertificate of a DevID certificate issued by `issuer`: subject with serialNumber,
/// SAN hardwareModuleName, critical keyUsage digitalSignature, the kind's TCG certificate
/// policies, SKI and AKI. Sign it with the issuer's key and [`x509svid::assemble`] it.
pub fn devid_tbs(p: &DevIdParams<'_>, issuer: &IssuerInfo) -> Result<Vec<u8>, ProfileError> {
    let subject_der = subject_with_serial(p.subject, p.serial_number)?;
    let ski = x509svid::subject_key_id(p.spki_der)?;
    let exts = vec![
        x509svid::ext_der(
            KeyUsage::OID,
            true,
            &KeyUsage(KeyUsages::DigitalSignature.into()),
        )?,
        x509svid::ext_der(
            SubjectAltName::OID,
            false,
            &SubjectAltName(vec![hmn_general_name(p.hw_type, p.hw_serial)?]),
        )?,
        x509svid::ext_der(
            CertificatePolicies::OID,
            false,
            &CertificatePolicies(
                p.kind
                    .policies()
                    .into_iter()
                    .map(|policy_identifier| PolicyInformation {
                        policy_identifier,
                        policy_qualifiers: None,
                    })
                    .collect(),
            ),
        )?,
    ]
    .into_iter()
    .chain(key_ids(ski, issuer.key_id.clone())?)
    .collect::<Vec<_>>();
    let alg_der = issuer.signature_algorithm.to_der().map_err(enc)?;
    Ok(x509svid::tbs(
        p.cert_serial,
        &alg_der,
        &issuer.subject_der,
        p.not_before,
        p.not_after.unwrap_or(NO_EXPIRY),
        &subject_der,
        p.spki_der,
        &exts,
    )?)
}

/// The subjectKeyIdentifier and authorityKeyIdentifier extensions.
fn key_ids(ski: Vec<u8>, aki: Vec<u8>) -> Result<[Vec<u8>; 2], ProfileError> {
    Ok([
        x509svid::ext_der(
            SubjectKeyIdentifier::OID,
            false,
            &SubjectKeyIdentifier(OctetString::new(ski).map_err(enc)?),
        )?,
        x509svid::ext_der(
            AuthorityKeyIdentifier::OID,
            false,
            &AuthorityKeyIdentifier {
                key_identifier: Some(OctetString::new(aki).map_err(enc)?),
                authority_cert_issuer: None,
                authority_cert_serial_number: None,
            },
        )?,
    ])
}

/// The 802.1AR fields of a DevID certificate that follows the profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevIdInfo {
    pub serial_number: String,
    /// (hwType OID, hwSerialNum)
    pub hardware_module_name: (String, Vec<u8>),
}

/// Checks that `cert_der` follows the DevID profile for `kind`: a subject serialNumber, a
/// hardwareModuleName, a critical keyUsage with digitalSignature and without keyCertSign or
/// cRLSign, and the kind's TCG certificate policies. (Chain and signature checks are
/// [`crate::chain`]'s.)
pub fn check_devid_cert(cert_der: &[u8], kind: DevIdKind) -> Result<DevIdInfo, ProfileError> {
    let cert = Certificate::from_der(cert_der).map_err(ProfileError::Parse)?;
    let tbs = cert.tbs_certificate();
    let serial_number = subject_serial_numbers(cert_der)
        .into_iter()
        .next()
        .ok_or(ProfileError::NoSerialNumber)?;
    let hardware_module_name = hardware_module_names(cert_der)
        .into_iter()
        .next()
        .ok_or(ProfileError::NoHardwareModuleName)?;
    match tbs.get_extension::<KeyUsage>() {
        Ok(Some((true, ku))) => {
            if !ku.digital_signature() {
                return Err(ProfileError::NoDigitalSignature);
            }
            if ku.key_cert_sign() || ku.crl_sign() {
                return Err(ProfileError::SigningCaKeyUsage);
            }
        }
        _ => return Err(ProfileError::KeyUsageNotCritical),
    }
    let policies: Vec<ObjectIdentifier> = match tbs.get_extension::<CertificatePolicies>() {
        Ok(Some((_, p))) => p.0.iter().map(|i| i.policy_identifier).collect(),
        _ => vec![],
    };
    for (oid, name) in kind.policies().into_iter().zip(match kind {
        DevIdKind::Iak => [
            "tcg-cap-verifiedTPMResidency",
            "tcg-cap-verifiedTPMRestricted",
        ],
        _ => ["tcg-cap-verifiedTPMResidency", "tcg-cap-verifiedTPMFixed"],
    }) {
        if !policies.contains(&oid) {
            return Err(ProfileError::MissingPolicy(oid.to_string(), name));
        }
    }
    Ok(DevIdInfo {
        serial_number,
        hardware_module_name,
    })
}

/// The TBSCertificate of a DevID-issuing CA (manufacturer or owner CA): cA=true, critical
/// keyUsage keyCertSign+cRLSign, SKI, and AKI when `issuer` is given (else self-signed; the
/// signature algorithm is then the key's own, given as `self_alg_der`).
pub fn ca_tbs(
    subject: &str,
    spki_der: &[u8],
    serial: &[u8],
    not_before: u64,
    not_after: u64,
    issuer: Option<&IssuerInfo>,
) -> Result<Vec<u8>, ProfileError> {
    use x509_cert::ext::pkix::BasicConstraints;
    let subject_der = x509svid::parse_name(subject)?.to_der().map_err(enc)?;
    let ski = x509svid::subject_key_id(spki_der)?;
    let key = kame_api::keys::KeyInfo::from_spki_der(spki_der)?;
    let (issuer_der, aki, alg_der) = match issuer {
        Some(i) => (
            i.subject_der.clone(),
            i.key_id.clone(),
            i.signature_algorithm.to_der().map_err(enc)?,
        ),
        None => (
            subject_der.clone(),
            ski.clone(),
            key.x509_signature_algorithm().to_der().map_err(enc)?,
        ),
    };
    let exts = vec![
        x509svid::ext_der(
            BasicConstraints::OID,
            true,
            &BasicConstraints {
                ca: true,
                path_len_constraint: None,
            },
        )?,
        x509svid::ext_der(
            KeyUsage::OID,
            true,
            &KeyUsage(KeyUsages::KeyCertSign | KeyUsages::CRLSign),
        )?,
    ]
    .into_iter()
    .chain(key_ids(ski, aki)?)
    .collect::<Vec<_>>();
    Ok(x509svid::tbs(
        serial,
        &alg_der,
        &issuer_der,
        not_before,
        not_after,
        &subject_der,
        spki_der,
        &exts,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};

    fn key() -> (EcdsaKeyPair, Vec<u8>) {
        let k = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
        let spki = k.public_key().as_der().unwrap().as_ref().to_vec();
        (k, spki)
    }

    fn sign(k: &EcdsaKeyPair, tbs: &[u8]) -> Vec<u8> {
        k.sign(&SystemRandom::new(), tbs).unwrap().as_ref().to_vec()
    }

    /// A self-signed manufacturer CA and a DevID of `kind` it issues.
    fn issue(kind: DevIdKind, not_after: Option<u64>) -> (Vec<u8>, Vec<u8>) {
        issue_serial(kind, not_after, "SN-0042").unwrap()
    }

    /// As [`issue`], for the device serial `serial`.
    fn issue_serial(
        kind: DevIdKind,
        not_after: Option<u64>,
        serial: &str,
    ) -> Result<(Vec<u8>, Vec<u8>), ProfileError> {
        let (ca_key, ca_spki) = key();
        let tbs = ca_tbs(
            "C=US, O=Kame Devices, CN=Manufacturer CA",
            &ca_spki,
            &[1],
            1_700_000_000,
            1_900_000_000,
            None,
        )
        .unwrap();
        let alg = kame_api::keys::KeyInfo::from_spki_der(&ca_spki)
            .unwrap()
            .x509_signature_algorithm();
        let ca = x509svid::assemble(&tbs, &alg, &sign(&ca_key, &tbs)).unwrap();
        let issuer = IssuerInfo::from_cert_der(&ca).unwrap();
        let (_, spki) = key();
        let tbs = devid_tbs(
            &DevIdParams {
                kind,
                subject: "O=Kame Devices, CN=edge-sensor",
                serial_number: serial,
                hw_type: TCG_SV_TPM20,
                hw_serial: b"IBM:ek-aki:0042",
                spki_der: &spki,
                cert_serial: &[0x42],
                not_before: 1_700_000_000,
                not_after,
            },
            &issuer,
        )?;
        let cert =
            x509svid::assemble(&tbs, &issuer.signature_algorithm, &sign(&ca_key, &tbs)).unwrap();
        Ok((ca, cert))
    }

    /// The subject's attributes as (OID, value) in DER order.
    fn subject_attributes(cert: &[u8]) -> Vec<(String, String)> {
        let c = Certificate::from_der(cert).unwrap();
        c.tbs_certificate()
            .subject()
            .iter()
            .map(|atv| {
                let v = directory_string(&atv.value)
                    .unwrap_or_else(|| format!("<{}>", hex_of(atv.value.value())));
                (atv.oid.to_string(), v)
            })
            .collect()
    }

    fn hex_of(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// Issue 19 item 3: a device serial is a value, never DN syntax. RDN separators, a second
    /// serialNumber, multi-valued RDNs and RFC 4514 `#hex` values all stay inside the one
    /// serialNumber attribute or are refused; the rest of the subject is the operator's.
    #[test]
    fn devid_serial_number_cannot_inject_subject_attributes() {
        let operator = vec![
            ("2.5.4.10".to_string(), "Kame Devices".to_string()),
            ("2.5.4.3".to_string(), "edge-sensor".to_string()),
        ];
        for serial in [
            "SN-1, CN=admin",
            "X, serialNumber=SN-OTHER",
            "SN-1+CN=admin",
            "SN-1,O=Other",
            "#13045345524e",
            "SN\\,x",
        ] {
            match issue_serial(DevIdKind::IDevId, None, serial) {
                Err(ProfileError::BadSerialNumber(_)) => {}
                Err(e) => panic!("{serial:?}: {e}"),

                Ok((_, cert)) => {
                    let mut want = operator.clone();
                    want.push(("2.5.4.5".to_string(), serial.to_string()));
                    assert_eq!(subject_attributes(&cert), want, "{serial:?}");
                    assert_eq!(subject_serial_numbers(&cert), vec![serial.to_string()]);
                }
            }
        }
        // Empty, with a control character, or longer than X.520's 64: refused.
        for serial in ["", "SN\u{0}1", "SN\n1", &"9".repeat(65)] {
            assert!(
                matches!(
                    issue_serial(DevIdKind::IDevId, None, serial),
                    Err(ProfileError::BadSerialNumber(_))
                ),
                "{serial:?} was accepted"
            );
        }
        let (_, cert) = issue_serial(DevIdKind::IDevId, None, &"9".repeat(64)).unwrap();
        assert_eq!(subject_serial_numbers(&cert), vec!["9".repeat(64)]);
        // A serial another manufacturer certified as a UTF8String is carried over as one
        // (an LDevID for its device); what a device sends must be a PrintableString.
        let (_, cert) = issue_serial(DevIdKind::LDevId, None, "SN_\u{e9}#1").unwrap();
        assert_eq!(
            subject_serial_numbers(&cert),
            vec!["SN_\u{e9}#1".to_string()]
        );
        for serial in ["SN_1", "SN-\u{e9}", "#04", "a\\b"] {
            assert!(check_serial_number(serial).is_err(), "{serial:?}");
            check_certified_serial_number(serial).unwrap();
        }
        check_serial_number("SN-1, CN=admin+O=x").unwrap();
    }

    #[test]
    fn devid_8021ar_idevid_carries_serial_number_hmn_critical_ku_and_tcg_policies() {
        let (ca, cert) = issue(DevIdKind::IDevId, None);
        let info = check_devid_cert(&cert, DevIdKind::IDevId).unwrap();
        assert_eq!(info.serial_number, "SN-0042");
        assert_eq!(
            info.hardware_module_name,
            ("2.23.133.1.2".to_string(), b"IBM:ek-aki:0042".to_vec())
        );
        let p = x509svid::ParsedCert::parse(&cert).unwrap();
        assert_eq!(p.not_after(), NO_EXPIRY, "99991231235959Z for an IDevID");
        p.check_signed_by(
            &x509svid::ParsedCert::parse(&ca)
                .unwrap()
                .spki_der()
                .unwrap(),
        )
        .unwrap();
        // An IDevID is not an IAK: the restricted-key policy is missing.
        assert!(matches!(
            check_devid_cert(&cert, DevIdKind::Iak),
            Err(ProfileError::MissingPolicy(o, "tcg-cap-verifiedTPMRestricted")) if o == "2.23.133.11.1.3"
        ));
        let (_, iak) = issue(DevIdKind::Iak, Some(1_800_000_000));
        check_devid_cert(&iak, DevIdKind::Iak).unwrap();
    }

    #[test]
    fn devid_8021ar_profile_refuses_a_ca_certificate_and_a_plain_certificate() {
        let (ca, _) = issue(DevIdKind::IDevId, None);
        assert!(matches!(
            check_devid_cert(&ca, DevIdKind::IDevId),
            Err(ProfileError::NoSerialNumber)
        ));
        assert!(matches!(
            check_devid_cert(b"not der", DevIdKind::IDevId),
            Err(ProfileError::Parse(_))
        ));
    }

    #[test]
    fn devid_8021ar_openssl_shows_hardware_module_name_and_serial_number() {
        let (_, cert) = issue(DevIdKind::IDevId, None);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idevid.der");
        std::fs::write(&path, &cert).unwrap();
        let openssl = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).to_string()
        };
        let text = openssl(&["x509", "-inform", "DER", "-noout", "-text", "-in"]);
        assert!(text.contains("serialNumber = SN-0042"), "{text}");
        // OpenSSL 3.0 names the otherName by its OID (later releases decode it as
        // hardwareModuleName); its content is checked with asn1parse below.
        assert!(
            text.contains("othername: 1.3.6.1.5.5.7.8.4::") || text.contains("hardwareModuleName"),
            "{text}"
        );
        assert!(text.contains("Policy: 2.23.133.11.1.1"), "{text}");
        assert!(text.contains("Policy: 2.23.133.11.1.2"), "{text}");
        assert!(
            text.contains("Key Usage: critical\n                Digital Signature\n"),
            "{text}"
        );
        assert!(
            text.contains("Not After : Dec 31 23:59:59 9999 GMT"),
            "{text}"
        );
        // asn1parse of the SAN extension's value (the OCTET STRING after its OID).
        let asn1 = openssl(&["asn1parse", "-inform", "DER", "-in"]);
        let san_value = asn1
            .lines()
            .skip_while(|l| !l.contains("X509v3 Subject Alternative Name"))
            .nth(1)
            .and_then(|l| l.split(':').next())
            .map(|o| o.trim().to_string())
            .unwrap_or_default();
        let hmn = openssl(&[
            "asn1parse",
            "-inform",
            "DER",
            "-strparse",
            &san_value,
            "-in",
        ]);
        assert!(hmn.contains("1.3.6.1.5.5.7.8.4"), "{hmn}");
        assert!(hmn.contains("2.23.133.1.2"), "hwType in {hmn}");
        assert!(
            hmn.contains("OCTET STRING      :IBM:ek-aki:0042"),
            "hwSerialNum in {hmn}"
        );
    }
}
