//! PKCS#10 certificate signing requests as agents and admins send them: parse, check the
//! self-signature (proof of possession), and return the public key and requested names. The
//! caller decides which names to honour (for SVIDs the SPIFFE ID comes from the entry). No I/O.

use crate::Error;
use crate::keys::{KeyInfo, verify_x509_signature};
use const_oid::db::rfc5912::ID_EXTENSION_REQ;
use der::{Decode, Encode};
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::request::{CertReq, ExtensionReq};

/// The largest CSR accepted (bytes).
pub const MAX_CSR_LEN: usize = 32 * 1024;

#[derive(Debug, Clone)]
pub struct Csr {
    pub spki_der: Vec<u8>,
    pub key: KeyInfo,
    pub uris: Vec<String>,
    pub dns_names: Vec<String>,
}

/// Parses a DER CSR and verifies its signature with its own key.
pub fn parse(der: &[u8]) -> Result<Csr, Error> {
    if der.is_empty() {
        return Err(Error::BadCsr("CSR is empty".into()));
    }
    if der.len() > MAX_CSR_LEN {
        return Err(Error::BadCsr(format!("CSR is larger than {MAX_CSR_LEN} bytes")));
    }
    let req = CertReq::from_der(der).map_err(|e| Error::BadCsr(format!("malformed CSR: {e}")))?;
    let spki_der = req
        .info
        .public_key
        .to_der()
        .map_err(|e| Error::BadCsr(e.to_string()))?;
    let key = KeyInfo::from_spki_der(&spki_der).map_err(|e| Error::BadCsr(e.to_string()))?;
    let info_der = req.info.to_der().map_err(|e| Error::BadCsr(e.to_string()))?;
    let sig = req
        .signature
        .as_bytes()
        .ok_or_else(|| Error::BadCsr("signature is not octet-aligned".into()))?;
    verify_x509_signature(
        &spki_der,
        &req.algorithm.oid,
        req.algorithm.parameters.as_ref().map(|p| p.into()),
        &info_der,
        sig,
    )
    .map_err(|e| Error::BadCsr(format!("CSR signature check failed: {e}")))?;
    let mut uris = vec![];
    let mut dns_names = vec![];
    for attr in req.info.attributes.iter() {
        if attr.oid != ID_EXTENSION_REQ {
            continue;
        }
        for v in attr.values.iter() {
            let ext_req: ExtensionReq = v
                .decode_as()
                .map_err(|e| Error::BadCsr(format!("bad extension request: {e}")))?;
            for ext in ext_req.0 {
                if ext.extn_id != <SubjectAltName as const_oid::AssociatedOid>::OID {
                    continue;
                }
                let san = SubjectAltName::from_der(ext.extn_value.as_bytes())
                    .map_err(|e| Error::BadCsr(format!("bad SAN: {e}")))?;
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
        spki_der,
        key,
        uris,
        dns_names,
    })
}
