//! The X509-SVID profile (X509-SVID.md, rules X509-01..X509-14) in one place: the issuer builds
//! certificates with [`ca_tbs`] / [`leaf_tbs`] and [`assemble`], and validators check them with
//! [`check_leaf`] and [`verify_chain`]. Building returns the TBS bytes so the caller can have them
//! signed wherever the key lives (a KeyManager); nothing here signs, reads files or keeps state.

use crate::Error;
use crate::keys::{KeyInfo, der_tlv, verify_x509_signature};
use crate::spiffe_id::{SpiffeId, TrustDomain};
use const_oid::AssociatedOid;
use const_oid::ObjectIdentifier;
use const_oid::db::rfc5280::{ID_KP_CLIENT_AUTH, ID_KP_SERVER_AUTH};
use der::asn1::{Ia5String, OctetString, UintRef};
use der::{Decode, Encode};
use sha1::Digest;
use spki::AlgorithmIdentifierOwned;
use std::str::FromStr;
use std::time::Duration;
use x509_cert::Certificate;
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages,
    SubjectAltName, SubjectKeyIdentifier,
};
use x509_cert::name::Name;

/// SVID `notBefore` is this far in the past, to absorb clock skew (SPIRE does the same).
pub const BACKDATE: Duration = Duration::from_secs(10);

/// Subject Key Identifier as RFC 5280 method 1: SHA-1 of the subjectPublicKey bits. Lower-case
/// hex of this is an X.509 authority's ID (as in SPIRE).
pub fn subject_key_id(spki_der: &[u8]) -> Result<Vec<u8>, Error> {
    let spki = spki::SubjectPublicKeyInfoRef::from_der(spki_der).map_err(|source| Error::Der {
        what: "bad public key",
        source,
    })?;
    Ok(sha1::Sha1::digest(spki.subject_public_key.raw_bytes()).to_vec())
}

/// Parses a distinguished name such as `C=US, O=SPIFFE` (RFC 4514 order, as SPIRE's ca_subject).
pub fn parse_name(s: &str) -> Result<Name, Error> {
    // RFC 4514 strings list the most specific RDN first; `ca_subject` lists it like openssl
    // (`C=US, O=SPIFFE`), so reverse the parts before handing them to the RFC 4514 parser.
    let parts: Vec<&str> = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    let rfc4514 = parts.iter().rev().copied().collect::<Vec<_>>().join(",");
    Name::from_str(&rfc4514).map_err(|source| Error::NameSyntax {
        name: s.to_string(),
        source,
    })
}

/// The signing certificate that issues a certificate.
#[derive(Clone, Debug)]
pub struct IssuerInfo {
    /// DER of the issuer's subject Name.
    pub subject_der: Vec<u8>,
    /// The issuer's Subject Key Identifier (becomes the AKI).
    pub key_id: Vec<u8>,
    /// Signature algorithm of the issuer's key.
    pub signature_algorithm: AlgorithmIdentifierOwned,
    /// The issuer's notAfter (unix seconds): nothing it signs may outlive it.
    pub not_after: u64,
    /// The AuthorityKeyIdentifier extension its certificates carry (pre-encoded).
    pub aki_ext_der: Vec<u8>,
    /// `signature_algorithm`, DER (pre-encoded).
    pub signature_algorithm_der: Vec<u8>,
}

impl IssuerInfo {
    pub fn from_cert_der(der: &[u8]) -> Result<Self, Error> {
        let p = ParsedCert::parse(der)?;
        let key = KeyInfo::from_spki_der(&p.spki_der()?)?;
        IssuerInfo {
            subject_der: p
                .cert
                .tbs_certificate()
                .subject()
                .to_der()
                .map_err(enc_err)?,
            key_id: match p.subject_key_id()? {
                Some(k) => k,
                None => subject_key_id(&p.spki_der()?)?,
            },
            signature_algorithm: key.x509_signature_algorithm(),
            not_after: p.not_after(),
            aki_ext_der: Vec::new(),
            signature_algorithm_der: Vec::new(),
        }
        .with_aki()
    }

    fn with_aki(mut self) -> Result<Self, Error> {
        self.aki_ext_der = aki_ext(&self.key_id)?;
        self.signature_algorithm_der = self.signature_algorithm.to_der().map_err(enc_err)?;
        Ok(self)
    }
}

fn aki_ext(key_id: &[u8]) -> Result<Vec<u8>, Error> {
    ext_der(
        AuthorityKeyIdentifier::OID,
        false,
        &AuthorityKeyIdentifier {
            key_identifier: Some(OctetString::new(key_id.to_vec()).map_err(enc_err)?),
            authority_cert_issuer: None,
            authority_cert_serial_number: None,
        },
    )
}

/// Extensions every leaf carries, encoded once: cA=false, critical KU, EKU.
fn static_leaf_exts() -> Result<&'static [u8], Error> {
    static EXTS: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    if let Some(e) = EXTS.get() {
        return Ok(e);
    }
    let e = [
        ext_der(
            BasicConstraints::OID,
            true,
            &BasicConstraints {
                ca: false,
                path_len_constraint: None,
            },
        )?,
        ext_der(
            KeyUsage::OID,
            true,
            &KeyUsage(
                KeyUsages::DigitalSignature | KeyUsages::KeyEncipherment | KeyUsages::KeyAgreement,
            ),
        )?,
        ext_der(
            ExtendedKeyUsage::OID,
            false,
            &ExtendedKeyUsage(vec![ID_KP_SERVER_AUTH, ID_KP_CLIENT_AUTH]),
        )?,
    ]
    .concat();
    Ok(EXTS.get_or_init(|| e))
}

/// SubjectKeyIdentifier extension, built directly (hot path).
fn ski_ext(spki_der: &[u8]) -> Result<Vec<u8>, Error> {
    // SEQ { OID 2.5.29.14, OCTET STRING { OCTET STRING ski } }
    let ski = subject_key_id(spki_der)?;
    let oid = [0x06, 0x03, 0x55, 0x1d, 0x0e];
    Ok(der_tlv(
        0x30,
        &[&oid[..], &der_tlv(0x04, &der_tlv(0x04, &ski))].concat(),
    ))
}

/// SubjectAltName extension with one URI and DNS names, built directly (hot path).
fn san_ext_fast(uri: &str, dns_names: &[String], critical: bool) -> Result<Vec<u8>, Error> {
    let mut names = der_tlv(0x86, uri.as_bytes());
    for d in dns_names {
        if !d.is_ascii() {
            return Err(Error::BadName(format!("DNS name {d:?} is not ASCII")));
        }
        names.extend(der_tlv(0x82, d.as_bytes()));
    }
    if !uri.is_ascii() {
        return Err(Error::BadName(format!("URI {uri:?} is not ASCII")));
    }
    let oid = [0x06, 0x03, 0x55, 0x1d, 0x11];
    let crit: &[u8] = if critical { &[0x01, 0x01, 0xff] } else { &[] };
    Ok(der_tlv(
        0x30,
        &[&oid[..], crit, &der_tlv(0x04, &der_tlv(0x30, &names))].concat(),
    ))
}

/// What a CA certificate says.
pub struct CaParams<'a> {
    pub trust_domain: &'a TrustDomain,
    pub subject: &'a Name,
    pub spki_der: &'a [u8],
    pub serial: &'a [u8],
    pub not_before: u64,
    pub not_after: u64,
}

/// What an X509-SVID says. The SPIFFE ID comes from the registration entry, never from a CSR.
pub struct LeafParams<'a> {
    pub id: &'a SpiffeId,
    pub dns_names: &'a [String],
    pub spki_der: &'a [u8],
    pub serial: &'a [u8],
    pub not_before: u64,
    pub not_after: u64,
}

fn enc_err(source: der::Error) -> Error {
    Error::Der {
        what: "encoding failed",
        source,
    }
}

/// RFC 5280 time: UTCTime through 2049, GeneralizedTime from 2050 (built directly: hot path).
fn time_der(secs: u64) -> Result<Vec<u8>, Error> {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // civil_from_days (H. Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    if !(1950..=9999).contains(&y) {
        return Err(Error::BadValidity);
    }
    let (h, mi, se) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let mut out = Vec::with_capacity(17);
    let two = |out: &mut Vec<u8>, v: i64| {
        out.push(b'0' + (v / 10 % 10) as u8);
        out.push(b'0' + (v % 10) as u8);
    };
    if y < 2050 {
        out.extend_from_slice(&[0x17, 13]);
    } else {
        out.extend_from_slice(&[0x18, 15]);
        two(&mut out, y / 100);
    }
    for v in [y % 100, m, d, h as i64, mi as i64, se as i64] {
        two(&mut out, v);
    }
    out.push(b'Z');
    Ok(out)
}

/// One X.509 extension, DER-encoded (for other certificate profiles built on [`tbs`]).
pub fn ext_der(
    oid: ObjectIdentifier,
    critical: bool,
    value: &impl Encode,
) -> Result<Vec<u8>, Error> {
    Extension {
        extn_id: oid,
        critical,
        extn_value: OctetString::new(value.to_der().map_err(enc_err)?).map_err(enc_err)?,
    }
    .to_der()
    .map_err(enc_err)
}

/// One X.509 extension whose value (the extnValue contents) is already DER.
pub fn raw_ext_der(
    oid: ObjectIdentifier,
    critical: bool,
    value_der: &[u8],
) -> Result<Vec<u8>, Error> {
    Extension {
        extn_id: oid,
        critical,
        extn_value: OctetString::new(value_der.to_vec()).map_err(enc_err)?,
    }
    .to_der()
    .map_err(enc_err)
}

fn san_der(uri: &str, dns_names: &[String], critical: bool) -> Result<Vec<u8>, Error> {
    let mut names = vec![GeneralName::UniformResourceIdentifier(
        Ia5String::new(uri).map_err(enc_err)?,
    )];
    for d in dns_names {
        names.push(GeneralName::DnsName(Ia5String::new(d).map_err(|_| {
            Error::BadName(format!("DNS name {d:?} is not ASCII"))
        })?));
    }
    ext_der(SubjectAltName::OID, critical, &SubjectAltName(names))
}

/// A v3 TBSCertificate from its parts, all DER: the signature algorithm, issuer and subject
/// Names, SubjectPublicKeyInfo and extensions; times are unix seconds (UTCTime through 2049,
/// GeneralizedTime after, up to 9999-12-31T23:59:59Z). Other certificate profiles (IEEE
/// 802.1AR DevIDs) build on it.
#[allow(clippy::too_many_arguments)]
pub fn tbs(
    serial: &[u8],
    alg_der: &[u8],
    issuer_der: &[u8],
    not_before: u64,
    not_after: u64,
    subject_der: &[u8],
    spki_der: &[u8],
    extensions: &[Vec<u8>],
) -> Result<Vec<u8>, Error> {
    if not_after <= not_before {
        return Err(Error::BadValidity);
    }
    let mut body = Vec::with_capacity(512 + spki_der.len());
    body.extend_from_slice(&[0xa0, 0x03, 0x02, 0x01, 0x02]); // [0] EXPLICIT version v3
    if serial.is_empty() || serial.len() > 20 {
        return Err(Error::Encode("serial number must be 1 to 20 bytes".into()));
    }
    body.extend(
        UintRef::new(serial)
            .map_err(enc_err)?
            .to_der()
            .map_err(enc_err)?,
    );
    body.extend_from_slice(alg_der);
    body.extend_from_slice(issuer_der);
    body.extend(der_tlv(
        0x30,
        &[time_der(not_before)?, time_der(not_after)?].concat(),
    ));
    body.extend_from_slice(subject_der);
    body.extend_from_slice(spki_der);
    body.extend(der_tlv(0xa3, &der_tlv(0x30, &extensions.concat())));
    Ok(der_tlv(0x30, &body))
}

/// TBS of a self-signed (issuer = None) or subordinate signing certificate: cA=true, critical
/// KU keyCertSign+cRLSign, URI SAN = the trust domain ID (no path, X509-11), SKI, AKI.
pub fn ca_tbs(p: &CaParams<'_>, issuer: Option<&IssuerInfo>) -> Result<Vec<u8>, Error> {
    let key = KeyInfo::from_spki_der(p.spki_der)?;
    let subject_der = p.subject.to_der().map_err(enc_err)?;
    let ski = subject_key_id(p.spki_der)?;
    let (issuer_der, aki, alg) = match issuer {
        Some(i) => (
            i.subject_der.clone(),
            i.key_id.clone(),
            i.signature_algorithm.clone(),
        ),
        None => (
            subject_der.clone(),
            ski.clone(),
            key.x509_signature_algorithm(),
        ),
    };
    let exts = vec![
        ext_der(
            BasicConstraints::OID,
            true,
            &BasicConstraints {
                ca: true,
                path_len_constraint: None,
            },
        )?,
        ext_der(
            KeyUsage::OID,
            true,
            &KeyUsage(KeyUsages::KeyCertSign | KeyUsages::CRLSign),
        )?,
        ext_der(
            SubjectKeyIdentifier::OID,
            false,
            &SubjectKeyIdentifier(OctetString::new(ski).map_err(enc_err)?),
        )?,
        ext_der(
            AuthorityKeyIdentifier::OID,
            false,
            &AuthorityKeyIdentifier {
                key_identifier: Some(OctetString::new(aki).map_err(enc_err)?),
                authority_cert_issuer: None,
                authority_cert_serial_number: None,
            },
        )?,
        san_der(&p.trust_domain.id_string(), &[], subject_der.len() <= 2)?,
    ];
    tbs(
        p.serial,
        &alg.to_der().map_err(enc_err)?,
        &issuer_der,
        p.not_before,
        p.not_after,
        &subject_der,
        p.spki_der,
        &exts,
    )
}

const LEAF_SUBJECT: &str = "C=US, O=SPIRE";

fn default_leaf_subject() -> Result<&'static [u8], Error> {
    static SUBJECT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    if let Some(s) = SUBJECT.get() {
        return Ok(s);
    }
    let der = parse_name(LEAF_SUBJECT)?.to_der().map_err(enc_err)?;
    Ok(SUBJECT.get_or_init(|| der))
}

/// TBS of an X509-SVID leaf: exactly one URI SAN (X509-01) plus DNS names, cA=false (X509-05),
/// critical KU digitalSignature (+keyEncipherment, keyAgreement as SPIRE) and never
/// keyCertSign/cRLSign (X509-07..09), EKU serverAuth+clientAuth (X509-12), SKI, AKI. Subject is
/// `C=US, O=SPIRE` plus CN = the first DNS name, as SPIRE's. notAfter is capped at the issuer's.
pub fn leaf_tbs(p: &LeafParams<'_>, issuer: &IssuerInfo) -> Result<Vec<u8>, Error> {
    leaf_tbs_with(p, issuer, &[])
}

/// As [`leaf_tbs`], with `extra` extensions (DER) after the profile's: removing them gives
/// exactly [`leaf_tbs`]'s bytes (how a certificate with an SCT list relates to its
/// precertificate entry).
pub fn leaf_tbs_with(
    p: &LeafParams<'_>,
    issuer: &IssuerInfo,
    extra: &[Vec<u8>],
) -> Result<Vec<u8>, Error> {
    if p.id.is_root() {
        return Err(Error::BadSvid(
            "an X509-SVID needs a SPIFFE ID with a path (X509-03)".into(),
        ));
    }
    p.id.check_issuable()?;
    // The key was validated where it came in (CSR signature check); its encoding is checked
    // when the SKI is computed below.
    let subject_der = match p.dns_names.first() {
        None => default_leaf_subject()?.to_vec(),
        Some(cn) => {
            if cn.contains(',') || cn.contains('=') || cn.contains('+') {
                return Err(Error::BadName(format!("DNS name {cn:?}")));
            }
            parse_name(&format!("{LEAF_SUBJECT}, CN={cn}"))?
                .to_der()
                .map_err(enc_err)?
        }
    };
    let not_after = p.not_after.min(issuer.not_after);
    let aki = if issuer.aki_ext_der.is_empty() {
        aki_ext(&issuer.key_id)?
    } else {
        issuer.aki_ext_der.clone()
    };
    let mut exts = vec![
        static_leaf_exts()?.to_vec(),
        ski_ext(p.spki_der)?,
        aki,
        san_ext_fast(&p.id.to_string(), p.dns_names, false)?,
    ];
    exts.extend_from_slice(extra);
    let alg_der = if issuer.signature_algorithm_der.is_empty() {
        issuer.signature_algorithm.to_der().map_err(enc_err)?
    } else {
        issuer.signature_algorithm_der.clone()
    };
    tbs(
        p.serial,
        &alg_der,
        &issuer.subject_der,
        p.not_before,
        not_after,
        &subject_der,
        p.spki_der,
        &exts,
    )
}

/// Certificate DER from TBS bytes and the issuer's signature over them.
pub fn assemble(
    tbs: &[u8],
    alg: &AlgorithmIdentifierOwned,
    signature: &[u8],
) -> Result<Vec<u8>, Error> {
    assemble_der(tbs, &alg.to_der().map_err(enc_err)?, signature)
}

/// [`assemble`] with the signature algorithm already DER-encoded.
pub fn assemble_der(tbs: &[u8], alg_der: &[u8], signature: &[u8]) -> Result<Vec<u8>, Error> {
    // BIT STRING with no unused bits.
    let mut sig = Vec::with_capacity(signature.len() + 1);
    sig.push(0);
    sig.extend_from_slice(signature);
    Ok(der_tlv(
        0x30,
        &[tbs, alg_der, &der_tlv(0x03, &sig)].concat(),
    ))
}

/// A SAN extension's criticality, URIs and DNS names.
pub type SanList = (bool, Vec<String>, Vec<String>);

/// A parsed certificate with the raw TBS bytes kept for signature checks.
pub struct ParsedCert {
    pub cert: Certificate,
    tbs_raw: Vec<u8>,
}

impl ParsedCert {
    pub fn parse(der: &[u8]) -> Result<Self, Error> {
        let cert = Certificate::from_der(der).map_err(|source| Error::Der {
            what: "bad certificate: cannot parse certificate",
            source,
        })?;
        let tbs_raw = cert
            .tbs_certificate()
            .to_der()
            .map_err(|source| Error::Der {
                what: "bad certificate",
                source,
            })?;
        Ok(ParsedCert { cert, tbs_raw })
    }

    pub fn spki_der(&self) -> Result<Vec<u8>, Error> {
        self.cert
            .tbs_certificate()
            .subject_public_key_info()
            .to_der()
            .map_err(enc_err)
    }

    pub fn not_before(&self) -> u64 {
        self.cert
            .tbs_certificate()
            .validity()
            .not_before
            .to_unix_duration()
            .as_secs()
    }

    pub fn not_after(&self) -> u64 {
        self.cert
            .tbs_certificate()
            .validity()
            .not_after
            .to_unix_duration()
            .as_secs()
    }

    /// Lower-case hex of the serial number.
    pub fn serial_hex(&self) -> String {
        hex::encode(self.cert.tbs_certificate().serial_number().as_bytes())
    }

    fn ext<'a, T: Decode<'a> + const_oid::AssociatedOid>(
        &'a self,
    ) -> Result<Option<(bool, T)>, Error> {
        self.cert
            .tbs_certificate()
            .get_extension::<T>()
            .map_err(|_| {
                Error::BadCertificate(format!("malformed or repeated extension {}", T::OID))
            })
    }

    pub fn subject_key_id(&self) -> Result<Option<Vec<u8>>, Error> {
        Ok(self
            .ext::<SubjectKeyIdentifier>()?
            .map(|(_, s)| s.0.as_bytes().to_vec()))
    }

    pub fn authority_key_id(&self) -> Result<Option<Vec<u8>>, Error> {
        Ok(self
            .ext::<AuthorityKeyIdentifier>()?
            .and_then(|(_, a)| a.key_identifier.map(|k| k.as_bytes().to_vec())))
    }

    /// (critical, URIs, DNS names) of the SAN extension, if present.
    pub fn sans(&self) -> Result<Option<SanList>, Error> {
        Ok(self.ext::<SubjectAltName>()?.map(|(critical, san)| {
            let mut uris = vec![];
            let mut dns = vec![];
            for n in san.0 {
                match n {
                    GeneralName::UniformResourceIdentifier(u) => uris.push(u.to_string()),
                    GeneralName::DnsName(d) => dns.push(d.to_string()),
                    _ => {}
                }
            }
            (critical, uris, dns)
        }))
    }

    pub fn basic_constraints(&self) -> Result<Option<(bool, BasicConstraints)>, Error> {
        self.ext::<BasicConstraints>()
    }

    pub fn key_usage(&self) -> Result<Option<(bool, KeyUsage)>, Error> {
        self.ext::<KeyUsage>()
    }

    pub fn extended_key_usage(&self) -> Result<Option<ExtendedKeyUsage>, Error> {
        Ok(self.ext::<ExtendedKeyUsage>()?.map(|(_, e)| e))
    }

    fn is_ca(&self) -> Result<bool, Error> {
        Ok(self.basic_constraints()?.is_some_and(|(_, bc)| bc.ca))
    }

    /// The SPIFFE ID of this certificate's single URI SAN (X509-01/02).
    pub fn spiffe_id(&self) -> Result<SpiffeId, Error> {
        let (_, uris, _) = self
            .sans()?
            .ok_or_else(|| Error::BadSvid("certificate has no URI SAN (X509-01)".into()))?;
        match uris.as_slice() {
            [one] => SpiffeId::parse(one)
                .map_err(|e| Error::BadSvid(format!("URI SAN is not a SPIFFE ID: {e} (X509-02)"))),
            [] => Err(Error::BadSvid(
                "certificate has no URI SAN (X509-01)".into(),
            )),
            _ => Err(Error::BadSvid(
                "certificate has more than one URI SAN (X509-01)".into(),
            )),
        }
    }

    /// Checks that `self` was signed by the key of `issuer`.
    pub fn check_signed_by(&self, issuer_spki_der: &[u8]) -> Result<(), Error> {
        let alg = self.cert.signature_algorithm();
        let sig = self
            .cert
            .signature()
            .as_bytes()
            .ok_or(Error::BadSignature)?;
        verify_x509_signature(
            issuer_spki_der,
            &alg.oid,
            alg.parameters.as_ref().map(|p| p.into()),
            &self.tbs_raw,
            sig,
        )
    }
}

/// Kame's break-glass certificate policy: a UUID OID (ITU-T X.667, arc 2.25) carried in the
/// certificatePolicies extension of reserve X509-SVIDs, the SVIDs an agent serves only under
/// break-glass. SVIDs minted normally carry no certificate policy.
pub const BREAK_GLASS_POLICY: &str = "2.25.161190094665278160941200676328092638606";
const BREAK_GLASS_UUID: u128 = 161_190_094_665_278_160_941_200_676_328_092_638_606;
const CERTIFICATE_POLICIES: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.32");

/// The contents octets of [`BREAK_GLASS_POLICY`]'s DER encoding (its last arc needs 128 bits,
/// more than `const_oid` holds, so it is encoded here).
fn break_glass_oid_content() -> Vec<u8> {
    // First two arcs: 2 * 40 + 25; then the UUID in base 128, high groups first.
    let mut groups = vec![];
    let mut v = BREAK_GLASS_UUID;
    loop {
        groups.push((v & 0x7f) as u8);
        v >>= 7;
        if v == 0 {
            break;
        }
    }
    let mut out = vec![2 * 40 + 25];
    let last = groups.len() - 1;
    for (i, g) in groups.iter().rev().enumerate() {
        out.push(if i < last { g | 0x80 } else { *g });
    }
    out
}

/// The certificatePolicies extension (non-critical) naming [`BREAK_GLASS_POLICY`], DER.
pub fn break_glass_policy_ext() -> Result<Vec<u8>, Error> {
    let oid = der_tlv(0x06, &break_glass_oid_content());
    // CertificatePolicies ::= SEQUENCE OF PolicyInformation ::= SEQUENCE { policyIdentifier }
    let value = der_tlv(0x30, &der_tlv(0x30, &oid));
    raw_ext_der(CERTIFICATE_POLICIES, false, &value)
}

impl ParsedCert {
    /// Whether the certificate names [`BREAK_GLASS_POLICY`] among its certificate policies (a
    /// reserve SVID, served only under break-glass). A malformed certificatePolicies
    /// extension is an error.
    pub fn is_break_glass(&self) -> Result<bool, Error> {
        let Some(exts) = self.cert.tbs_certificate().extensions() else {
            return Ok(false);
        };
        let want = break_glass_oid_content();
        let bad = |_| Error::BadCertificate("malformed certificatePolicies extension".into());
        for e in exts.iter().filter(|e| e.extn_id == CERTIFICATE_POLICIES) {
            let infos: Vec<der::Any> = Vec::from_der(e.extn_value.as_bytes()).map_err(bad)?;
            for info in infos {
                let parts: Vec<der::Any> = info.decode_as().map_err(bad)?;
                if let Some(id) = parts.first()
                    && der::Tagged::tag(id) == der::Tag::ObjectIdentifier
                    && id.value() == want.as_slice()
                {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
}

/// Checks a leaf against the X509-SVID rules a validator enforces (X509-01, 02, 03, 05, 07, 08,
/// 09) and returns its SPIFFE ID. No time or signature checks (X509-16).
pub fn check_leaf(leaf: &ParsedCert) -> Result<SpiffeId, Error> {
    let id = leaf.spiffe_id()?;
    if id.is_root() {
        return Err(Error::BadSvid(
            "leaf SPIFFE ID has no path (X509-03)".into(),
        ));
    }
    if leaf.is_ca()? {
        return Err(Error::BadSvid("leaf has cA=true (X509-05)".into()));
    }
    let (_, ku) = leaf
        .key_usage()?
        .ok_or_else(|| Error::BadSvid("leaf has no key usage extension (X509-07)".into()))?;
    if !ku.digital_signature() {
        return Err(Error::BadSvid(
            "leaf key usage lacks digitalSignature (X509-08)".into(),
        ));
    }
    if ku.key_cert_sign() {
        return Err(Error::BadSvid(
            "leaf key usage has keyCertSign (X509-09)".into(),
        ));
    }
    if ku.crl_sign() {
        return Err(Error::BadSvid(
            "leaf key usage has cRLSign (X509-09)".into(),
        ));
    }
    Ok(id)
}

/// Checks a signing certificate (intermediate or root): cA=true and keyCertSign (X509-06).
pub fn check_signing_cert(cert: &ParsedCert) -> Result<(), Error> {
    if !cert.is_ca()? {
        return Err(Error::BadSvid(
            "signing certificate is not a CA (X509-06)".into(),
        ));
    }
    match cert.key_usage()? {
        Some((_, ku)) if ku.key_cert_sign() => Ok(()),
        _ => Err(Error::BadSvid(
            "signing certificate lacks keyCertSign (X509-06)".into(),
        )),
    }
}

/// Go's rule for a certificate that signs another (`CheckSignatureFrom`), which trust anchors
/// and upstream CAs are held to: cA=true (a v1 certificate has no extensions and passes), and
/// keyCertSign when a key usage extension is present. Stock `openssl req -x509` roots carry
/// no key usage, and SPIRE accepts them.
pub fn check_ca_lenient(cert: &ParsedCert) -> Result<(), Error> {
    let v1 = cert.cert.tbs_certificate().version() == x509_cert::Version::V1;
    match cert.basic_constraints()? {
        Some((_, bc)) if bc.ca => {}
        None if v1 => {}
        _ => {
            return Err(Error::BadSvid(
                "signing certificate is not a CA (X509-06)".into(),
            ));
        }
    }
    match cert.key_usage()? {
        Some((_, ku)) if !ku.key_cert_sign() => Err(Error::BadSvid(
            "signing certificate lacks keyCertSign (X509-06)".into(),
        )),
        _ => Ok(()),
    }
}

/// The pathLenConstraint of a CA certificate, if it sets one.
fn path_len(cert: &ParsedCert) -> Result<Option<u8>, Error> {
    Ok(cert
        .basic_constraints()?
        .and_then(|(_, bc)| bc.path_len_constraint))
}

/// The outcome of [`verify_chain`].
#[derive(Debug, Clone)]
pub struct VerifiedChain {
    pub id: SpiffeId,
    /// Index into `roots` of the root the chain ends at.
    pub root_index: usize,
    pub leaf_not_after: u64,
    pub leaf_serial_hex: String,
}

/// RFC 5280 path validation of an X509-SVID chain (leaf first, then intermediates) against the
/// X.509 authorities of the leaf's own trust domain (X509-14): profile checks, names, signatures,
/// validity periods at `now` (unix seconds), cA/keyCertSign on every signer.
pub fn verify_chain(
    chain: &[Vec<u8>],
    roots: &[Vec<u8>],
    now: u64,
) -> Result<VerifiedChain, Error> {
    let parsed = parse_chain(chain)?;
    let leaf = parsed
        .first()
        .ok_or_else(|| Error::BadSvid("empty certificate chain".into()))?;
    let id = check_leaf(leaf)?;
    let root_index = path_to_root(&parsed, chain, roots, now, 0)?;
    Ok(VerifiedChain {
        id,
        root_index,
        leaf_not_after: leaf.not_after(),
        leaf_serial_hex: leaf.serial_hex(),
    })
}

/// Path validation of a signing certificate's chain (the CA first, then the certificates that
/// issued it) against `roots`: the same checks as [`verify_chain`], with a CA in place of the
/// leaf, which will have `depth` CA levels below it (0: it signs leaves only). A chain of one
/// certificate that is itself among `roots` is valid (held to [`check_ca_lenient`], as a trust
/// anchor). Returns the index of the root the chain ends at.
pub fn verify_ca_chain(
    chain: &[Vec<u8>],
    roots: &[Vec<u8>],
    now: u64,
    depth: usize,
) -> Result<usize, Error> {
    let parsed = parse_chain(chain)?;
    let first = parsed
        .first()
        .ok_or_else(|| Error::BadSvid("empty certificate chain".into()))?;
    if path_len(first)?.is_some_and(|p| (p as usize) < depth) {
        return Err(Error::UntrustedChain(format!(
            "certificate 0 allows fewer than {depth} CA levels below it (pathLenConstraint)"
        )));
    }
    if let [only] = chain
        && let Some(ri) = roots.iter().position(|r| r == only)
    {
        check_ca_lenient(first)?;
        if now < first.not_before() {
            return Err(Error::NotYetValid(0));
        }
        if now > first.not_after() {
            return Err(Error::Expired(0));
        }
        return Ok(ri);
    }
    check_signing_cert(first)?;
    path_to_root(&parsed, chain, roots, now, 1 + depth)
}

fn parse_chain(chain: &[Vec<u8>]) -> Result<Vec<ParsedCert>, Error> {
    chain.iter().map(|c| ParsedCert::parse(c)).collect()
}

/// Validity at `now` of every certificate, each signed by the next, and the last signed by
/// (or equal to) one of `roots`: the index of that root. Every signer's pathLenConstraint
/// holds: the CA certificates below certificate `j` are `j - 1 + extra` (`extra` 0 when the
/// chain starts with a leaf; 1 plus the levels it will sign when it starts with a CA).
/// Trust anchors are held to [`check_ca_lenient`], the certificates between to
/// [`check_signing_cert`].
fn path_to_root(
    parsed: &[ParsedCert],
    chain: &[Vec<u8>],
    roots: &[Vec<u8>],
    now: u64,
    extra: usize,
) -> Result<usize, Error> {
    let below = |j: usize| (j + extra).saturating_sub(1);
    let path_ok = |c: &ParsedCert, j: usize| -> Result<(), Error> {
        match path_len(c)? {
            Some(p) if (p as usize) < below(j) => Err(Error::UntrustedChain(format!(
                "certificate {j} allows {p} CA levels below it, the chain has {}",
                below(j)
            ))),
            _ => Ok(()),
        }
    };
    for (i, c) in parsed.iter().enumerate() {
        if now < c.not_before() {
            return Err(Error::NotYetValid(i));
        }
        if now > c.not_after() {
            return Err(Error::Expired(i));
        }
        if i > 0 {
            if i + 1 == parsed.len() && roots.iter().any(|r| r == &chain[i]) {
                check_ca_lenient(c)?;
            } else {
                check_signing_cert(c)?;
            }
            path_ok(c, i)?;
            let child = &parsed[i - 1];
            if child.cert.tbs_certificate().issuer() != c.cert.tbs_certificate().subject() {
                return Err(Error::UntrustedChain(format!(
                    "certificate {} was not issued by certificate {i}",
                    i - 1
                )));
            }
            child.check_signed_by(&c.spki_der()?)?;
        }
    }
    let last = parsed.last().ok_or(Error::BadSignature)?;
    let last_issuer = last.cert.tbs_certificate().issuer();
    for (ri, root_der) in roots.iter().enumerate() {
        let Ok(root) = ParsedCert::parse(root_der) else {
            continue;
        };
        // The chain may end with the root itself.
        if parsed.len() > 1 && chain.last() == Some(root_der) {
            return Ok(ri);
        }
        if root.cert.tbs_certificate().subject() != last_issuer {
            continue;
        }
        if check_ca_lenient(&root).is_err()
            || path_ok(&root, parsed.len()).is_err()
            || now > root.not_after()
            || now < root.not_before()
        {
            continue;
        }
        let Ok(spki) = root.spki_der() else { continue };
        if last.check_signed_by(&spki).is_ok() {
            return Ok(ri);
        }
    }
    Err(Error::UntrustedChain(
        "chain does not end at an authority of its trust domain's bundle".into(),
    ))
}

#[cfg(test)]
pub(crate) mod tests;
