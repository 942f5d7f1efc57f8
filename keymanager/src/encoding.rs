//! Small DER encodings the remote backends need to speak X.509's language: SubjectPublicKeyInfo
//! from raw EC points or RSA (n, e), fixed-width ECDSA `r || s` to ASN.1, PKCS#1 DigestInfo
//! prefixes, and message digests. Pure functions; it must not know any backend.

use crate::{Error, HashAlgorithm, KeyType, Result};

/// id-ecPublicKey's namedCurve parameter, DER: P-256 and P-384.
pub const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
pub const OID_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_RSA_ENCRYPTION: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
];

fn len(n: usize) -> Vec<u8> {
    match n {
        0..=0x7f => vec![n as u8],
        0x80..=0xff => vec![0x81, n as u8],
        _ => vec![0x82, (n >> 8) as u8, n as u8],
    }
}

/// A DER TLV.
pub fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend(len(body.len()));
    out.extend_from_slice(body);
    out
}

/// A DER INTEGER from big-endian unsigned bytes.
pub fn uint(bytes: &[u8]) -> Vec<u8> {
    let mut b: &[u8] = bytes;
    while b.len() > 1 && b[0] == 0 {
        b = &b[1..];
    }
    let mut body = vec![];
    if b.first().is_some_and(|x| x & 0x80 != 0) {
        body.push(0);
    }
    body.extend_from_slice(b);
    tlv(0x02, &body)
}

/// The SPKI of an EC key from its uncompressed point (`04 || X || Y`).
pub fn ec_spki(kt: KeyType, point: &[u8]) -> Result<Vec<u8>> {
    let (curve, n) = match kt {
        KeyType::EcP256 => (OID_P256, 65),
        KeyType::EcP384 => (OID_P384, 97),
        _ => return Err(Error::Backend(format!("{kt} is not an EC key type"))),
    };
    if point.len() != n || point[0] != 0x04 {
        return Err(Error::Backend(format!(
            "EC point of {} bytes is not an uncompressed {kt} point",
            point.len()
        )));
    }
    let alg = tlv(0x30, &[OID_EC_PUBLIC_KEY, curve].concat());
    let mut bits = vec![0u8];
    bits.extend_from_slice(point);
    Ok(tlv(0x30, &[alg, tlv(0x03, &bits)].concat()))
}

/// The SPKI of an RSA key from its modulus and public exponent (big-endian).
pub fn rsa_spki(modulus: &[u8], exponent: &[u8]) -> Vec<u8> {
    let alg = tlv(0x30, &[OID_RSA_ENCRYPTION, &[0x05, 0x00]].concat());
    let key = tlv(0x30, &[uint(modulus), uint(exponent)].concat());
    let mut bits = vec![0u8];
    bits.extend(key);
    tlv(0x30, &[alg, tlv(0x03, &bits)].concat())
}

/// Reads one DER TLV: (tag, body, rest).
fn read_tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = b.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (n, rest) = match first {
        0..=0x7f => (first as usize, rest),
        0x81 => (*rest.first()? as usize, rest.get(1..)?),
        0x82 => (
            ((*rest.first()? as usize) << 8) | *rest.get(1)? as usize,
            rest.get(2..)?,
        ),
        _ => return None,
    };
    Some((tag, rest.get(..n)?, rest.get(n..)?))
}

/// The key type of an SPKI (what a service reports is taken from the key itself).
pub fn key_type_of_spki(spki: &[u8]) -> Option<KeyType> {
    let (_, body, _) = read_tlv(spki)?;
    let (_, alg, rest) = read_tlv(body)?;
    let (_, oid, params) = read_tlv(alg)?;
    let full_oid = &alg[..alg.len() - params.len()];
    let _ = oid;
    if full_oid == OID_EC_PUBLIC_KEY {
        return match params {
            p if p == OID_P256 => Some(KeyType::EcP256),
            p if p == OID_P384 => Some(KeyType::EcP384),
            _ => None,
        };
    }
    if full_oid != OID_RSA_ENCRYPTION {
        return None;
    }
    let (_, bits, _) = read_tlv(rest)?;
    let (_, key, _) = read_tlv(bits.get(1..)?)?;
    let (_, n, _) = read_tlv(key)?;
    match n.iter().skip_while(|b| **b == 0).count() {
        256 => Some(KeyType::Rsa2048),
        512 => Some(KeyType::Rsa4096),
        _ => None,
    }
}

/// ASN.1 `ECDSA-Sig-Value` from the fixed-width `r || s` form.
pub fn ecdsa_fixed_to_der(sig: &[u8]) -> Result<Vec<u8>> {
    if sig.is_empty() || !sig.len().is_multiple_of(2) {
        return Err(Error::Backend(format!(
            "ECDSA signature of {} bytes is not r || s",
            sig.len()
        )));
    }
    let (r, s) = sig.split_at(sig.len() / 2);
    Ok(tlv(0x30, &[uint(r), uint(s)].concat()))
}

/// The digest of `message`.
pub fn digest(hash: HashAlgorithm, message: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    match hash {
        HashAlgorithm::Sha256 => sha2::Sha256::digest(message).to_vec(),
        HashAlgorithm::Sha384 => sha2::Sha384::digest(message).to_vec(),
        HashAlgorithm::Sha512 => sha2::Sha512::digest(message).to_vec(),
    }
}

/// PKCS#1 v1.5 DigestInfo for `digest` (RFC 8017 §9.2 note 1).
pub fn digest_info(hash: HashAlgorithm, digest: &[u8]) -> Vec<u8> {
    let prefix: &[u8] = match hash {
        HashAlgorithm::Sha256 => &[
            0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x01, 0x05, 0x00, 0x04, 0x20,
        ],
        HashAlgorithm::Sha384 => &[
            0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x02, 0x05, 0x00, 0x04, 0x30,
        ],
        HashAlgorithm::Sha512 => &[
            0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x03, 0x05, 0x00, 0x04, 0x40,
        ],
    };
    [prefix, digest].concat()
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::{self, KeyPair};

    #[test]
    fn spki_encodings_equal_aws_lc_for_ec_and_rsa() {
        for (kt, alg) in [
            (KeyType::EcP256, &signature::ECDSA_P256_SHA256_FIXED_SIGNING),
            (KeyType::EcP384, &signature::ECDSA_P384_SHA384_FIXED_SIGNING),
        ] {
            let k = signature::EcdsaKeyPair::generate(alg).unwrap();
            let point = k.public_key().as_ref().to_vec();
            let want = k.public_key().as_der().unwrap().as_ref().to_vec();
            assert_eq!(ec_spki(kt, &point).unwrap(), want, "{kt}");
            assert_eq!(key_type_of_spki(&want), Some(kt));
            // r || s to DER verifies as ASN.1.
            let msg = b"m";
            let sig = k.sign(&aws_lc_rs::rand::SystemRandom::new(), msg).unwrap();
            let der = ecdsa_fixed_to_der(sig.as_ref()).unwrap();
            let va: &dyn signature::VerificationAlgorithm = if kt == KeyType::EcP256 {
                &signature::ECDSA_P256_SHA256_ASN1
            } else {
                &signature::ECDSA_P384_SHA384_ASN1
            };
            signature::UnparsedPublicKey::new(va, &point)
                .verify(msg, &der)
                .unwrap();
        }
        let k = signature::RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let want = k.public_key().as_der().unwrap().as_ref().to_vec();
        // RSAPublicKey ::= SEQUENCE { n INTEGER, e INTEGER }, read by hand.
        let pkcs1 = k.public_key().as_ref().to_vec();
        let read = |b: &[u8]| -> (Vec<u8>, usize) {
            let (l, h) = match b[1] {
                x if x < 0x80 => (x as usize, 2),
                0x81 => (b[2] as usize, 3),
                _ => (((b[2] as usize) << 8) | b[3] as usize, 4),
            };
            (b[h..h + l].to_vec(), h + l)
        };
        let (seq, _) = read(&pkcs1);
        let (n, used) = read(&seq);
        let (e, _) = read(&seq[used..]);
        let (n, e) = (&n[..], &e[..]);
        assert_eq!(rsa_spki(n, e), want);
        assert_eq!(key_type_of_spki(&want), Some(KeyType::Rsa2048));
        assert_eq!(key_type_of_spki(b"\x30\x00"), None);
    }
}
