//! Software TPM2_MakeCredential (TPM 2.0 Library Part 1 §24, Part 3 §12.6): protects a secret so
//! that only the TPM holding the EK, and only for the object with the given name, can recover it
//! with TPM2_ActivateCredential. RSA EKs: the seed is RSA-OAEP encrypted with label
//! "IDENTITY\0"; ECC EKs: the seed is KDFe over an ephemeral ECDH. The hash is the EK's nameAlg;
//! the symmetric key is the EK's (AES-128-CFB for the default templates).

use super::public::{Params, Public, Unique};
use super::{Error, Result, alg, curve, digest_len, hash, hmac, put_tpm2b};
use aws_lc_rs::agreement;
use aws_lc_rs::cipher::{AES_128, AES_256, EncryptingKey, EncryptionContext, UnboundCipherKey};
use aws_lc_rs::rsa::{
    OAEP_SHA1_MGF1SHA1, OAEP_SHA256_MGF1SHA256, OAEP_SHA384_MGF1SHA384, OAEP_SHA512_MGF1SHA512,
};
use aws_lc_rs::rsa::{OaepPublicEncryptingKey, PublicEncryptingKey};

/// KDFa (Part 1 §11.4.10.2): counter-mode HMAC with `label` (a NUL is appended), `context_u`,
/// `context_v`, returning `bits / 8` bytes.
pub fn kdfa(
    hash_alg: u16,
    key: &[u8],
    label: &str,
    context_u: &[u8],
    context_v: &[u8],
    bits: u32,
) -> Result<Vec<u8>> {
    let want = bits.div_ceil(8) as usize;
    let mut out = Vec::with_capacity(want + 64);
    let mut counter: u32 = 1;
    let mut l = label.as_bytes().to_vec();
    l.push(0);
    while out.len() < want {
        out.extend(hmac(
            hash_alg,
            key,
            &[
                &counter.to_be_bytes(),
                &l,
                context_u,
                context_v,
                &bits.to_be_bytes(),
            ],
        )?);
        counter += 1;
    }
    out.truncate(want);
    Ok(out)
}

/// KDFe (Part 1 §11.4.10.3): counter-mode hash over the ECDH x-coordinate `z`.
pub fn kdfe(
    hash_alg: u16,
    z: &[u8],
    label: &str,
    party_u: &[u8],
    party_v: &[u8],
    bits: u32,
) -> Result<Vec<u8>> {
    let want = bits.div_ceil(8) as usize;
    let mut out = Vec::with_capacity(want + 64);
    let mut counter: u32 = 1;
    let mut l = label.as_bytes().to_vec();
    l.push(0);
    while out.len() < want {
        let input = [&counter.to_be_bytes()[..], z, &l, party_u, party_v].concat();
        out.extend(hash(hash_alg, &input)?);
        counter += 1;
    }
    out.truncate(want);
    Ok(out)
}

/// The output of MakeCredential, as the TPM structures ActivateCredential takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// TPM2B_ID_OBJECT (with its size).
    pub credential_blob: Vec<u8>,
    /// TPM2B_ENCRYPTED_SECRET (with its size).
    pub secret: Vec<u8>,
}

impl Credential {
    /// The file tpm2-tools' `tpm2_makecredential -o` writes and `tpm2_activatecredential -i`
    /// reads: magic 0xBADCC0DE, version 1, TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET.
    pub fn to_tpm2_tools_file(&self) -> Vec<u8> {
        let mut out = 0xBADC_C0DEu32.to_be_bytes().to_vec();
        out.extend_from_slice(&1u32.to_be_bytes());
        out.extend_from_slice(&self.credential_blob);
        out.extend_from_slice(&self.secret);
        out
    }
}

/// Protects `secret` (at most the nameAlg digest size) for the object named `object_name`
/// under the endorsement key `ek`.
pub fn make_credential(ek: &Public, secret: &[u8], object_name: &[u8]) -> Result<Credential> {
    let name_alg = ek.name_alg;
    let dlen = digest_len(name_alg)?;
    if secret.is_empty() || secret.len() > dlen {
        return Err(Error::Invalid(format!(
            "credential must be 1 to {dlen} bytes"
        )));
    }
    let sym = ek.symmetric();
    if sym.alg != alg::AES || sym.mode != alg::CFB || !(sym.key_bits == 128 || sym.key_bits == 256)
    {
        return Err(Error::Unsupported {
            what: "EK symmetric algorithm",
            value: sym.alg as u32,
        });
    }
    let (seed, encrypted_seed) = match (&ek.params, &ek.unique) {
        (Params::Rsa { .. }, Unique::Rsa(_)) => {
            let mut seed = vec![0u8; dlen];
            aws_lc_rs::rand::fill(&mut seed).map_err(|_| Error::Crypto("random"))?;
            let oaep = match name_alg {
                alg::SHA1 => &OAEP_SHA1_MGF1SHA1,
                alg::SHA256 => &OAEP_SHA256_MGF1SHA256,
                alg::SHA384 => &OAEP_SHA384_MGF1SHA384,
                alg::SHA512 => &OAEP_SHA512_MGF1SHA512,
                other => {
                    return Err(Error::Unsupported {
                        what: "hash algorithm",
                        value: other as u32,
                    });
                }
            };
            let key = PublicEncryptingKey::from_der(&ek.spki_der()?)
                .map_err(|_| Error::Crypto("RSA EK public key"))?;
            let key = OaepPublicEncryptingKey::new(key)
                .map_err(|_| Error::Crypto("RSA EK public key"))?;
            let mut ct = vec![0u8; key.ciphertext_size()];
            let n = key
                .encrypt(oaep, &seed, &mut ct, Some(b"IDENTITY\0"))
                .map_err(|_| Error::Crypto("RSA-OAEP"))?
                .len();
            ct.truncate(n);
            (seed, ct)
        }
        (Params::Ecc { curve: c, .. }, Unique::Ecc { x, y }) => {
            let (ag, n) = match *c {
                curve::NIST_P256 => (&agreement::ECDH_P256, 32),
                curve::NIST_P384 => (&agreement::ECDH_P384, 48),
                other => {
                    return Err(Error::Unsupported {
                        what: "ECC curve",
                        value: other as u32,
                    });
                }
            };
            if x.len() > n || y.len() > n {
                return Err(Error::Invalid("EK point coordinate too long".into()));
            }
            let pad = |v: &[u8]| [vec![0u8; n - v.len()], v.to_vec()].concat();
            let (ekx, eky) = (pad(x), pad(y));
            let peer = [&[4u8][..], &ekx, &eky].concat();
            let eph =
                agreement::EphemeralPrivateKey::generate(ag, &aws_lc_rs::rand::SystemRandom::new())
                    .map_err(|_| Error::Crypto("ECDH key"))?;
            let eph_pub = eph
                .compute_public_key()
                .map_err(|_| Error::Crypto("ECDH key"))?;
            let eph_pub = eph_pub.as_ref().to_vec();
            let (ex, ey) = (&eph_pub[1..1 + n], &eph_pub[1 + n..]);
            let z = agreement::agree_ephemeral(
                eph,
                agreement::UnparsedPublicKey::new(ag, &peer),
                Error::Crypto("ECDH with the EK point"),
                |z| Ok(z.to_vec()),
            )?;
            let seed = kdfe(name_alg, &z, "IDENTITY", ex, &ekx, (dlen * 8) as u32)?;
            let mut point = vec![];
            put_tpm2b(&mut point, ex)?;
            put_tpm2b(&mut point, ey)?;
            (seed, point)
        }
        _ => {
            return Err(Error::Invalid(
                "EK parameters and unique of different key types".into(),
            ));
        }
    };
    // encIdentity = CFB(symKey, IV=0, TPM2B_DIGEST(secret))
    let sym_key = kdfa(
        name_alg,
        &seed,
        "STORAGE",
        object_name,
        &[],
        sym.key_bits as u32,
    )?;
    let mut plain = vec![];
    put_tpm2b(&mut plain, secret)?;
    let cipher_alg = if sym.key_bits == 128 {
        &AES_128
    } else {
        &AES_256
    };
    let key = UnboundCipherKey::new(cipher_alg, &sym_key).map_err(|_| Error::Crypto("AES key"))?;
    let enc = EncryptingKey::cfb128(key).map_err(|_| Error::Crypto("AES-CFB"))?;
    enc.less_safe_encrypt(&mut plain, EncryptionContext::Iv128([0u8; 16].into()))
        .map_err(|_| Error::Crypto("AES-CFB"))?;
    let enc_identity = plain;
    let hmac_key = kdfa(name_alg, &seed, "INTEGRITY", &[], &[], (dlen * 8) as u32)?;
    let outer_hmac = hmac(name_alg, &hmac_key, &[&enc_identity, object_name])?;
    let mut id_object = vec![];
    put_tpm2b(&mut id_object, &outer_hmac)?;
    id_object.extend_from_slice(&enc_identity);
    let mut credential_blob = vec![];
    put_tpm2b(&mut credential_blob, &id_object)?;
    let mut secret_out = vec![];
    put_tpm2b(&mut secret_out, &encrypted_seed)?;
    Ok(Credential {
        credential_blob,
        secret: secret_out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kdfa_length_determinism_and_bit_length_binding() {
        // Correctness against a TPM is shown by the tpm2_activatecredential tests; here: output
        // length, determinism, and that the requested bit length is part of the input.
        let a = kdfa(alg::SHA256, b"key", "STORAGE", b"u", b"v", 128).unwrap();
        assert_eq!(a.len(), 16);
        assert_eq!(
            a,
            kdfa(alg::SHA256, b"key", "STORAGE", b"u", b"v", 128).unwrap()
        );
        let long = kdfa(alg::SHA256, b"key", "STORAGE", b"u", b"v", 512).unwrap();
        assert_eq!(long.len(), 64);
        assert_ne!(&long[..16], &a[..], "the bit length is part of the input");
    }

    #[test]
    fn make_credential_rejects_bad_input() {
        let ek = super::super::Public::parse(&{
            let z = "00".repeat(256);
            let h = format!("0001000b000300b20020837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa0006008000430010080000000000 0100{z}");
            let h: String = h.chars().filter(|c| !c.is_whitespace()).collect();
            (0..h.len()).step_by(2).map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap()).collect::<Vec<u8>>()
        })
        .unwrap();
        assert!(make_credential(&ek, &[], b"name").is_err());
        assert!(make_credential(&ek, &[1; 33], b"name").is_err());
        // an all-zero modulus is not an RSA key
        assert!(make_credential(&ek, &[1; 32], b"name").is_err());
    }
}
