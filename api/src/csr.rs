//! PKCS#10 certificate signing requests as agents and admins send them: parse, check the
//! self-signature (proof of possession), and return the public key and requested names. The
//! caller decides which names to honour (for SVIDs the SPIFFE ID comes from the entry). No I/O.

use crate::Error;
use crate::keys::{KeyInfo, check_x509_signature};
use const_oid::db::rfc5912::ID_EXTENSION_REQ;
use der::{Decode, Encode};
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::request::{CertReq, ExtensionReq};

/// The largest CSR accepted (bytes).
pub const MAX_CSR_LEN: usize = 32 * 1024;

#[derive(Debug, Clone)]
pub struct Csr {
    /// DER of the requested subject Name.
    pub subject_der: Vec<u8>,
    pub spki_der: Vec<u8>,
    pub key: KeyInfo,
    pub uris: Vec<String>,
    pub dns_names: Vec<String>,
}

/// Slices of a CSR's DER: the CertificationRequestInfo (the signed bytes), its subject Name
/// and its SubjectPublicKeyInfo.
struct RawParts<'a> {
    info: &'a [u8],
    subject: &'a [u8],
    spki: &'a [u8],
}

impl<'a> RawParts<'a> {
    fn of(der: &'a [u8]) -> der::Result<Self> {
        use der::Reader as _;
        let mut r = der::SliceReader::new(der)?;
        r.sequence(|outer: &mut der::SliceReader<'a>| -> der::Result<_> {
            let info = outer.tlv_bytes()?;
            let mut ir = der::SliceReader::new(info)?;
            let (subject, spki) =
                ir.sequence(|i: &mut der::SliceReader<'a>| -> der::Result<_> {
                    let _version = i.tlv_bytes()?;
                    let subject = i.tlv_bytes()?;
                    let spki = i.tlv_bytes()?;
                    let _attributes = i.read_slice(i.remaining_len())?;
                    Ok((subject, spki))
                })?;
            let _algorithm = outer.tlv_bytes()?;
            let _signature = outer.tlv_bytes()?;
            Ok(RawParts {
                info,
                subject,
                spki,
            })
        })
    }
}

/// Parses a DER CSR and verifies its signature with its own key.
pub fn parse(der: &[u8]) -> Result<Csr, Error> {
    if der.is_empty() {
        return Err(Error::BadCsr("CSR is empty".into()));
    }
    if der.len() > MAX_CSR_LEN {
        return Err(Error::BadCsr(format!(
            "CSR is larger than {MAX_CSR_LEN} bytes"
        )));
    }
    let req = CertReq::from_der(der).map_err(|source| Error::Der {
        what: "bad CSR: malformed CSR",
        source,
    })?;
    // The signed bytes, the subject and the key exactly as sent (the structure was checked
    // by the decoding above): nothing is encoded again.
    let raw = RawParts::of(der).map_err(|source| Error::Der {
        what: "bad CSR",
        source,
    })?;
    let sig = req
        .signature
        .as_bytes()
        .ok_or_else(|| Error::BadCsr("signature is not octet-aligned".into()))?;
    // The key is parsed once, for its own checks and the signature's.
    let key = check_x509_signature(
        raw.spki,
        &req.algorithm.oid,
        req.algorithm.parameters.as_ref().map(|p| p.into()),
        raw.info,
        sig,
    )
    .map_err(|e| match e {
        Error::BadSignature | Error::UnsupportedSignatureAlgorithm(_) => {
            Error::CsrSignature(Box::new(e))
        }
        other => Error::CsrKey(Box::new(other)),
    })?;
    let mut uris = vec![];
    let mut dns_names = vec![];
    for attr in req.info.attributes.iter() {
        if attr.oid != ID_EXTENSION_REQ {
            continue;
        }
        for v in attr.values.iter() {
            let ext_req: ExtensionReq = v.decode_as().map_err(|source| Error::Der {
                what: "bad CSR: bad extension request",
                source,
            })?;
            for ext in ext_req.0 {
                if ext.extn_id != <SubjectAltName as const_oid::AssociatedOid>::OID {
                    continue;
                }
                let san =
                    SubjectAltName::from_der(ext.extn_value.as_bytes()).map_err(|source| {
                        Error::Der {
                            what: "bad CSR: bad SAN",
                            source,
                        }
                    })?;
                for n in san.0 {
                    match n {
                        GeneralName::UniformResourceIdentifier(u) => uris.push(u.to_string()),
                        GeneralName::DnsName(d) => dns_names.push(d.to_string()),
                        _ => {}
                    }
                }
            }
        }
    }
    Ok(Csr {
        subject_der: raw.subject.to_vec(),
        spki_der: raw.spki.to_vec(),
        key,
        uris,
        dns_names,
    })
}

/// DER of a CertificationRequestInfo with an empty subject, `spki_der`, and a SAN extension
/// request holding `uris` and `dns_names`. Sign it and finish with
/// [`crate::x509svid::assemble`].
pub fn request_info(
    spki_der: &[u8],
    uris: &[String],
    dns_names: &[String],
) -> Result<Vec<u8>, Error> {
    request_info_for(&[0x30, 0x00], spki_der, uris, dns_names)
}

/// As [`request_info`], with the subject Name `subject_der` (DER).
pub fn request_info_for(
    subject_der: &[u8],
    spki_der: &[u8],
    uris: &[String],
    dns_names: &[String],
) -> Result<Vec<u8>, Error> {
    use crate::keys::der_tlv;
    use der::asn1::{Ia5String, OctetString};
    let enc = |source: der::Error| Error::Der {
        what: "encoding failed",
        source,
    };
    let mut names = vec![];
    for u in uris {
        names.push(GeneralName::UniformResourceIdentifier(
            Ia5String::new(u).map_err(enc)?,
        ));
    }
    for d in dns_names {
        names.push(GeneralName::DnsName(Ia5String::new(d).map_err(enc)?));
    }
    let mut attrs = vec![];
    if !names.is_empty() {
        let ext = x509_cert::ext::Extension {
            extn_id: <SubjectAltName as const_oid::AssociatedOid>::OID,
            critical: false,
            extn_value: OctetString::new(SubjectAltName(names).to_der().map_err(enc)?)
                .map_err(enc)?,
        };
        let exts = der_tlv(0x30, &ext.to_der().map_err(enc)?);
        let attr = der_tlv(
            0x30,
            &[
                ID_EXTENSION_REQ.to_der().map_err(enc)?,
                der_tlv(0x31, &exts),
            ]
            .concat(),
        );
        attrs.extend(attr);
    }
    let body = [
        vec![0x02, 0x01, 0x00], // version 0
        subject_der.to_vec(),
        spki_der.to_vec(),
        der_tlv(0xa0, &attrs), // [0] IMPLICIT SET OF Attribute
    ]
    .concat();
    Ok(der_tlv(0x30, &body))
}
