//! Reading the IEEE 802.1AR DevID certificate fields attestation uses: the subject
//! serialNumber attribute (OID 2.5.4.5) and the SAN otherName hardwareModuleName
//! (RFC 4108 §5, OID 1.3.6.1.5.5.7.8.4: SEQUENCE { hwType OID, hwSerialNum OCTET STRING }).
//! Pure parsing of DER; unknown or malformed fields are skipped, never a panic.

use der::asn1::{ObjectIdentifier, OctetString};
use x509_cert::Certificate;
use x509_cert::der::Decode;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;

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

/// The subject serialNumber attributes of a certificate, in order.
pub fn subject_serial_numbers(cert_der: &[u8]) -> Vec<String> {
    let Ok(cert) = Certificate::from_der(cert_der) else {
        return vec![];
    };
    let mut out = vec![];
    for atv in cert.tbs_certificate().subject().iter() {
        if atv.oid == SERIAL_NUMBER {
            let v = atv
                .value
                .decode_as::<der::asn1::PrintableStringRef<'_>>()
                .map(|s| s.to_string())
                .or_else(|_| {
                    atv.value
                        .decode_as::<der::asn1::Utf8StringRef<'_>>()
                        .map(|s| s.to_string())
                });
            if let Ok(v) = v {
                out.push(v);
            }
        }
    }
    out
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
