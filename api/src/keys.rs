//! Public keys as they appear on the wire (SPKI DER, JWK) and signature verification over them.
//!
//! Pure functions: parse an SPKI into a [`KeyInfo`], convert to and from JWK members, name the
//! X.509 signature algorithm for a key, and verify a signature with aws-lc-rs. No I/O.

use crate::Error;
use aws_lc_rs::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use const_oid::ObjectIdentifier;
use const_oid::db::rfc5912;
use der::asn1::{AnyRef, BitString, UintRef};
use der::{Decode, Encode, Reader, SliceReader};
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoRef};

pub const OID_EC_PUBLIC_KEY: ObjectIdentifier = rfc5912::ID_EC_PUBLIC_KEY;
pub const OID_RSA_ENCRYPTION: ObjectIdentifier = rfc5912::RSA_ENCRYPTION;
pub const OID_P256: ObjectIdentifier = rfc5912::SECP_256_R_1;
pub const OID_P384: ObjectIdentifier = rfc5912::SECP_384_R_1;
pub const OID_ECDSA_SHA256: ObjectIdentifier = rfc5912::ECDSA_WITH_SHA_256;
pub const OID_ECDSA_SHA384: ObjectIdentifier = rfc5912::ECDSA_WITH_SHA_384;
pub const OID_ECDSA_SHA512: ObjectIdentifier = rfc5912::ECDSA_WITH_SHA_512;
pub const OID_RSA_SHA256: ObjectIdentifier = rfc5912::SHA_256_WITH_RSA_ENCRYPTION;
pub const OID_RSA_SHA384: ObjectIdentifier = rfc5912::SHA_384_WITH_RSA_ENCRYPTION;
pub const OID_RSA_SHA512: ObjectIdentifier = rfc5912::SHA_512_WITH_RSA_ENCRYPTION;

/// The kinds of public key Kame accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyInfo {
    /// Uncompressed SEC1 point (0x04 || x || y).
    EcP256(Vec<u8>),
    EcP384(Vec<u8>),
    /// Modulus and exponent, big-endian without leading zeros.
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
}

impl KeyInfo {
    /// Parses a DER SubjectPublicKeyInfo (an EC point is checked to be on its curve).
    pub fn from_spki_der(der: &[u8]) -> Result<Self, Error> {
        let info = Self::describe(der)?;
        if let KeyInfo::EcP256(_) | KeyInfo::EcP384(_) = info {
            // aws-lc checks the point is on the curve.
            let alg: &dyn VerificationAlgorithm = match info {
                KeyInfo::EcP256(_) => &signature::ECDSA_P256_SHA256_ASN1,
                _ => &signature::ECDSA_P384_SHA384_ASN1,
            };
            UnparsedPublicKey::new(alg, der)
                .parse()
                .map_err(|_| Error::BadPublicKey("EC point is not on the curve".into()))?;
        }
        Ok(info)
    }

    /// The key's type and public numbers from its SubjectPublicKeyInfo, every structural
    /// check made but the point-on-curve one (left to whoever parses the key for use).
    fn describe(der: &[u8]) -> Result<Self, Error> {
        let spki = SubjectPublicKeyInfoRef::from_der(der).map_err(|source| Error::Der {
            what: "bad public key: not a SubjectPublicKeyInfo",
            source,
        })?;
        let bits = spki
            .subject_public_key
            .as_bytes()
            .ok_or_else(|| Error::BadPublicKey("key bits are not octet-aligned".into()))?;
        if spki.algorithm.oid == OID_EC_PUBLIC_KEY {
            let curve: ObjectIdentifier = spki
                .algorithm
                .parameters
                .ok_or_else(|| Error::BadPublicKey("EC key without curve".into()))?
                .decode_as()
                .map_err(|_| Error::BadPublicKey("EC curve is not a named curve".into()))?;
            let (info, len) = if curve == OID_P256 {
                (KeyInfo::EcP256(bits.to_vec()), 65)
            } else if curve == OID_P384 {
                (KeyInfo::EcP384(bits.to_vec()), 97)
            } else {
                return Err(Error::BadPublicKey(format!("unsupported EC curve {curve}")));
            };
            if bits.len() != len || bits[0] != 4 {
                return Err(Error::BadPublicKey("EC point is not uncompressed".into()));
            }
            Ok(info)
        } else if spki.algorithm.oid == OID_RSA_ENCRYPTION {
            let mut r =
                SliceReader::new(bits).map_err(|_| Error::BadPublicKey("bad RSA key".into()))?;
            let (n, e) = r
                .sequence(|r: &mut SliceReader<'_>| {
                    let n = UintRef::decode(r)?;
                    let e = UintRef::decode(r)?;
                    Ok((n.as_bytes().to_vec(), e.as_bytes().to_vec()))
                })
                .map_err(|source: der::Error| Error::Der {
                    what: "bad public key: bad RSA key",
                    source,
                })?;
            if n.len() < 256 {
                return Err(Error::BadPublicKey(format!(
                    "RSA key of {} bits is too small (minimum 2048)",
                    n.len() * 8
                )));
            }
            Ok(KeyInfo::Rsa { n, e })
        } else {
            Err(Error::BadPublicKey(format!(
                "unsupported key algorithm {}",
                spki.algorithm.oid
            )))
        }
    }

    /// Encodes as a DER SubjectPublicKeyInfo.
    pub fn to_spki_der(&self) -> Result<Vec<u8>, Error> {
        let enc = |source: der::Error| Error::Der {
            what: "encoding failed",
            source,
        };
        let (alg, bits) = match self {
            KeyInfo::EcP256(p) | KeyInfo::EcP384(p) => {
                let curve = if matches!(self, KeyInfo::EcP256(_)) {
                    OID_P256
                } else {
                    OID_P384
                };
                (
                    AlgorithmIdentifierOwned {
                        oid: OID_EC_PUBLIC_KEY,
                        parameters: Some(der::Any::encode_from(&curve).map_err(enc)?),
                    },
                    p.clone(),
                )
            }
            KeyInfo::Rsa { n, e } => {
                let n = UintRef::new(n).map_err(enc)?;
                let e = UintRef::new(e).map_err(enc)?;
                let body = [n.to_der().map_err(enc)?, e.to_der().map_err(enc)?].concat();
                (
                    AlgorithmIdentifierOwned {
                        oid: OID_RSA_ENCRYPTION,
                        parameters: Some(der::asn1::Null.into()),
                    },
                    der_tlv(0x30, &body),
                )
            }
        };
        let spki = spki::SubjectPublicKeyInfoOwned {
            algorithm: alg,
            subject_public_key: BitString::from_bytes(&bits).map_err(enc)?,
        };
        spki.to_der().map_err(enc)
    }

    /// The X.509 signature algorithm a CA with this key uses (ecdsa-with-SHA256/384,
    /// sha256WithRSAEncryption).
    pub fn x509_signature_algorithm(&self) -> AlgorithmIdentifierOwned {
        match self {
            KeyInfo::EcP256(_) => AlgorithmIdentifierOwned {
                oid: OID_ECDSA_SHA256,
                parameters: None,
            },
            KeyInfo::EcP384(_) => AlgorithmIdentifierOwned {
                oid: OID_ECDSA_SHA384,
                parameters: None,
            },
            KeyInfo::Rsa { .. } => AlgorithmIdentifierOwned {
                oid: OID_RSA_SHA256,
                parameters: Some(der::asn1::Null.into()),
            },
        }
    }

    /// The JWS `alg` a JWT signer with this key uses: ES256, ES384 or RS256.
    pub fn jws_alg(&self) -> &'static str {
        match self {
            KeyInfo::EcP256(_) => "ES256",
            KeyInfo::EcP384(_) => "ES384",
            KeyInfo::Rsa { .. } => "RS256",
        }
    }

    /// JWK members describing the key (`kty` and `crv`/`x`/`y` or `n`/`e`).
    pub fn jwk_members(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        let b64 = |b: &[u8]| serde_json::Value::String(URL_SAFE_NO_PAD.encode(b));
        match self {
            KeyInfo::EcP256(p) | KeyInfo::EcP384(p) => {
                let (crv, n) = if matches!(self, KeyInfo::EcP256(_)) {
                    ("P-256", 32)
                } else {
                    ("P-384", 48)
                };
                m.insert("kty".into(), "EC".into());
                m.insert("crv".into(), crv.into());
                m.insert("x".into(), b64(&p[1..1 + n]));
                m.insert("y".into(), b64(&p[1 + n..]));
            }
            KeyInfo::Rsa { n, e } => {
                m.insert("kty".into(), "RSA".into());
                m.insert("n".into(), b64(n));
                m.insert("e".into(), b64(e));
            }
        }
        m
    }

    /// Reads a key from JWK members. `Ok(None)` for a `kty` Kame does not know (BUN-07: the
    /// JWK is then ignored); `Err` for a known `kty` with bad members.
    pub fn from_jwk(
        jwk: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Option<Self>, Error> {
        let s = |k: &str| jwk.get(k).and_then(|v| v.as_str());
        let bytes = |k: &str| -> Result<Vec<u8>, Error> {
            let v = s(k).ok_or_else(|| Error::BadBundle(format!("JWK is missing {k:?}")))?;
            URL_SAFE_NO_PAD
                .decode(v.trim_end_matches('='))
                .map_err(|_| Error::BadBundle(format!("JWK member {k:?} is not base64url")))
        };
        match s("kty") {
            Some("EC") => {
                let (n, p384) = match s("crv") {
                    Some("P-256") => (32, false),
                    Some("P-384") => (48, true),
                    other => {
                        return Err(Error::BadBundle(format!("unsupported EC curve {other:?}")));
                    }
                };
                let (x, y) = (bytes("x")?, bytes("y")?);
                if x.len() != n || y.len() != n {
                    return Err(Error::BadBundle(
                        "EC JWK coordinates have the wrong length".into(),
                    ));
                }
                let point = [&[4u8][..], &x, &y].concat();
                let info = if p384 {
                    KeyInfo::EcP384(point)
                } else {
                    KeyInfo::EcP256(point)
                };
                // Round-trip through SPKI parsing to check the point is on the curve.
                KeyInfo::from_spki_der(&info.to_spki_der()?)
                    .map_err(|e| Error::BundleKey(Box::new(e)))?;
                Ok(Some(info))
            }
            Some("RSA") => {
                let strip = |v: Vec<u8>| {
                    let i = v.iter().position(|b| *b != 0).unwrap_or(v.len());
                    v[i..].to_vec()
                };
                let info = KeyInfo::Rsa {
                    n: strip(bytes("n")?),
                    e: strip(bytes("e")?),
                };
                KeyInfo::from_spki_der(&info.to_spki_der()?)
                    .map_err(|e| Error::BundleKey(Box::new(e)))?;
                Ok(Some(info))
            }
            Some(_) => Ok(None),
            None => Err(Error::BadBundle("JWK without \"kty\"".into())),
        }
    }
}

/// A TLV with a one-byte tag and DER length.
pub(crate) fn der_tlv(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 6);
    out.push(tag);
    let len = body.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes
            .iter()
            .position(|b| *b != 0)
            .unwrap_or(bytes.len() - 1);
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(body);
    out
}

/// Verifies an X.509-style signature (`alg` is the signatureAlgorithm OID; ECDSA signatures in
/// ASN.1 DER) made by the key in `spki_der` over `message`.
pub fn verify_x509_signature(
    spki_der: &[u8],
    alg: &ObjectIdentifier,
    params: Option<AnyRef<'_>>,
    message: &[u8],
    sig: &[u8],
) -> Result<(), Error> {
    check_x509_signature(spki_der, alg, params, message, sig).map(|_| ())
}

/// As [`verify_x509_signature`], returning the key: it is parsed once, for its checks (an EC
/// point on its curve) and the signature's.
pub fn check_x509_signature(
    spki_der: &[u8],
    alg: &ObjectIdentifier,
    params: Option<AnyRef<'_>>,
    message: &[u8],
    sig: &[u8],
) -> Result<KeyInfo, Error> {
    let key = KeyInfo::describe(spki_der)?;
    let null_ok = params.is_none_or(|p| p.is_null());
    let va: &dyn VerificationAlgorithm = match (&key, *alg) {
        (KeyInfo::EcP256(_), OID_ECDSA_SHA256) => &signature::ECDSA_P256_SHA256_ASN1,
        (KeyInfo::EcP256(_), OID_ECDSA_SHA384) => &signature::ECDSA_P256_SHA384_ASN1,
        (KeyInfo::EcP384(_), OID_ECDSA_SHA384) => &signature::ECDSA_P384_SHA384_ASN1,
        (KeyInfo::EcP384(_), OID_ECDSA_SHA256) => &signature::ECDSA_P384_SHA256_ASN1,
        (KeyInfo::Rsa { .. }, OID_RSA_SHA256) if null_ok => &signature::RSA_PKCS1_2048_8192_SHA256,
        (KeyInfo::Rsa { .. }, OID_RSA_SHA384) if null_ok => &signature::RSA_PKCS1_2048_8192_SHA384,
        (KeyInfo::Rsa { .. }, OID_RSA_SHA512) if null_ok => &signature::RSA_PKCS1_2048_8192_SHA512,
        _ => return Err(Error::UnsupportedSignatureAlgorithm(alg.to_string())),
    };
    let parsed = UnparsedPublicKey::new(va, spki_der)
        .parse()
        .map_err(|_| match key {
            KeyInfo::Rsa { .. } => Error::BadPublicKey("bad RSA key".into()),
            _ => Error::BadPublicKey("EC point is not on the curve".into()),
        })?;
    parsed
        .verify_sig(message, sig)
        .map_err(|_| Error::BadSignature)?;
    Ok(key)
}

/// Converts an ASN.1 DER ECDSA signature to the fixed-width r||s form JWS uses.
pub fn ecdsa_der_to_fixed(der_sig: &[u8], field_len: usize) -> Result<Vec<u8>, Error> {
    let bad = || Error::Encode("malformed ECDSA signature".into());
    let mut r = SliceReader::new(der_sig).map_err(|_| bad())?;
    let (a, b) = r
        .sequence(|r: &mut SliceReader<'_>| {
            let a = UintRef::decode(r)?;
            let b = UintRef::decode(r)?;
            Ok((a.as_bytes().to_vec(), b.as_bytes().to_vec()))
        })
        .map_err(|_: der::Error| bad())?;
    if a.len() > field_len || b.len() > field_len {
        return Err(bad());
    }
    let mut out = vec![0u8; 2 * field_len];
    out[field_len - a.len()..field_len].copy_from_slice(&a);
    out[2 * field_len - b.len()..].copy_from_slice(&b);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair};

    #[test]
    fn spki_jwk_round_trip_ec_and_rsa() {
        for alg in [
            &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &signature::ECDSA_P384_SHA384_ASN1_SIGNING,
        ] {
            let k = EcdsaKeyPair::generate(alg).unwrap();
            let spki = k.public_key().as_der().unwrap().as_ref().to_vec();
            let info = KeyInfo::from_spki_der(&spki).unwrap();
            assert_eq!(info.to_spki_der().unwrap(), spki);
            let back = KeyInfo::from_jwk(&info.jwk_members()).unwrap().unwrap();
            assert_eq!(back, info);
        }
        let k = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let spki = k.public_key().as_der().unwrap().as_ref().to_vec();
        let info = KeyInfo::from_spki_der(&spki).unwrap();
        assert_eq!(info.to_spki_der().unwrap(), spki);
        assert_eq!(
            KeyInfo::from_jwk(&info.jwk_members()).unwrap().unwrap(),
            info
        );
    }

    #[test]
    fn der_to_fixed_signature_verifies() {
        let k = EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let sig = k.sign(&rng, b"msg").unwrap();
        let fixed = ecdsa_der_to_fixed(sig.as_ref(), 32).unwrap();
        UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, k.public_key().as_ref())
            .verify(b"msg", &fixed)
            .unwrap();
    }
}
