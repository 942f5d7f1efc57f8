//! TPMS_ATTEST (certify and quote bodies), TPMT_SIGNATURE, and the checks a verifier runs on
//! them: signature by a given public key, attestation type and nonce, certified name, and the
//! quote's PCR digest against claimed PCR values (fail closed on coverage).

use super::public::{Params, Public, Unique};
use super::{Error, Reader, Result, alg, curve, hash, put_tpm2b};
use aws_lc_rs::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use std::collections::BTreeMap;
use subtle::ConstantTimeEq;

pub const TPM_GENERATED_VALUE: u32 = 0xFF54_4347;

/// Claimed PCR values: (bank hash algorithm, PCR index) → value.
pub type PcrValues = BTreeMap<(u16, u32), Vec<u8>>;
pub const ST_ATTEST_CERTIFY: u16 = 0x8017;
pub const ST_ATTEST_QUOTE: u16 = 0x8018;
pub const ST_ATTEST_CREATION: u16 = 0x801A;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockInfo {
    pub clock: u64,
    pub reset_count: u32,
    pub restart_count: u32,
    pub safe: bool,
}

/// One bank of a TPML_PCR_SELECTION.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcrSelection {
    pub hash: u16,
    /// PCR i is bit (i mod 8) of byte i/8.
    pub select: Vec<u8>,
}

impl PcrSelection {
    /// The selected PCR indices in ascending order.
    pub fn indices(&self) -> Vec<u32> {
        let mut out = vec![];
        for (byte, b) in self.select.iter().enumerate() {
            for bit in 0..8 {
                if b & (1 << bit) != 0 {
                    out.push(byte as u32 * 8 + bit);
                }
            }
        }
        out
    }

    pub fn from_indices(hash: u16, indices: &[u32]) -> Self {
        let max = indices.iter().copied().max().unwrap_or(0);
        let mut select = vec![0u8; ((max / 8 + 1) as usize).max(3)];
        for i in indices {
            select[(i / 8) as usize] |= 1 << (i % 8);
        }
        PcrSelection { hash, select }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttestBody {
    Certify {
        name: Vec<u8>,
        qualified_name: Vec<u8>,
    },
    Quote {
        selection: Vec<PcrSelection>,
        pcr_digest: Vec<u8>,
    },
    Creation {
        object_name: Vec<u8>,
        creation_hash: Vec<u8>,
    },
}

/// A parsed TPMS_ATTEST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attest {
    pub attest_type: u16,
    pub qualified_signer: Vec<u8>,
    pub extra_data: Vec<u8>,
    pub clock_info: ClockInfo,
    pub firmware_version: u64,
    pub body: AttestBody,
}

pub fn read_pcr_selection(r: &mut Reader<'_>) -> Result<Vec<PcrSelection>> {
    let count = r.u32()?;
    if count > 16 {
        return Err(Error::Invalid(format!(
            "TPML_PCR_SELECTION with {count} banks"
        )));
    }
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let hash = r.u16()?;
        let size = r.u8()?;
        if size > 32 {
            return Err(Error::Invalid(format!("PCR select of {size} bytes")));
        }
        out.push(PcrSelection {
            hash,
            select: r.bytes(size as usize)?.to_vec(),
        });
    }
    Ok(out)
}

pub fn put_pcr_selection(out: &mut Vec<u8>, sel: &[PcrSelection]) -> Result<()> {
    out.extend_from_slice(&(sel.len() as u32).to_be_bytes());
    for s in sel {
        out.extend_from_slice(&s.hash.to_be_bytes());
        let n = u8::try_from(s.select.len())
            .map_err(|_| Error::Invalid("PCR select too long".into()))?;
        out.push(n);
        out.extend_from_slice(&s.select);
    }
    Ok(())
}

impl Attest {
    /// Parses a TPMS_ATTEST that must fill `bytes` exactly.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "TPMS_ATTEST");
        let magic = r.u32()?;
        if magic != TPM_GENERATED_VALUE {
            return Err(Error::BadMagic(magic));
        }
        let attest_type = r.u16()?;
        let qualified_signer = r.tpm2b()?.to_vec();
        let extra_data = r.tpm2b()?.to_vec();
        let clock_info = ClockInfo {
            clock: r.u64()?,
            reset_count: r.u32()?,
            restart_count: r.u32()?,
            safe: match r.u8()? {
                0 => false,
                1 => true,
                v => return Err(Error::Invalid(format!("clockInfo.safe is {v}"))),
            },
        };
        let firmware_version = r.u64()?;
        let body = match attest_type {
            ST_ATTEST_CERTIFY => AttestBody::Certify {
                name: r.tpm2b()?.to_vec(),
                qualified_name: r.tpm2b()?.to_vec(),
            },
            ST_ATTEST_QUOTE => AttestBody::Quote {
                selection: read_pcr_selection(&mut r)?,
                pcr_digest: r.tpm2b()?.to_vec(),
            },
            ST_ATTEST_CREATION => AttestBody::Creation {
                object_name: r.tpm2b()?.to_vec(),
                creation_hash: r.tpm2b()?.to_vec(),
            },
            other => {
                return Err(Error::Unsupported {
                    what: "attestation type",
                    value: other as u32,
                });
            }
        };
        r.finish()?;
        Ok(Attest {
            attest_type,
            qualified_signer,
            extra_data,
            clock_info,
            firmware_version,
            body,
        })
    }

    /// TPMS_ATTEST bytes.
    pub fn marshal(&self) -> Result<Vec<u8>> {
        let mut out = TPM_GENERATED_VALUE.to_be_bytes().to_vec();
        out.extend_from_slice(&self.attest_type.to_be_bytes());
        put_tpm2b(&mut out, &self.qualified_signer)?;
        put_tpm2b(&mut out, &self.extra_data)?;
        out.extend_from_slice(&self.clock_info.clock.to_be_bytes());
        out.extend_from_slice(&self.clock_info.reset_count.to_be_bytes());
        out.extend_from_slice(&self.clock_info.restart_count.to_be_bytes());
        out.push(self.clock_info.safe as u8);
        out.extend_from_slice(&self.firmware_version.to_be_bytes());
        match &self.body {
            AttestBody::Certify {
                name,
                qualified_name,
            } => {
                put_tpm2b(&mut out, name)?;
                put_tpm2b(&mut out, qualified_name)?;
            }
            AttestBody::Quote {
                selection,
                pcr_digest,
            } => {
                put_pcr_selection(&mut out, selection)?;
                put_tpm2b(&mut out, pcr_digest)?;
            }
            AttestBody::Creation {
                object_name,
                creation_hash,
            } => {
                put_tpm2b(&mut out, object_name)?;
                put_tpm2b(&mut out, creation_hash)?;
            }
        }
        Ok(out)
    }
}

/// A parsed TPMT_SIGNATURE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signature {
    RsaSsa { hash: u16, sig: Vec<u8> },
    RsaPss { hash: u16, sig: Vec<u8> },
    Ecdsa { hash: u16, r: Vec<u8>, s: Vec<u8> },
}

impl Signature {
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "TPMT_SIGNATURE");
        let sig_alg = r.u16()?;
        let s = match sig_alg {
            alg::RSASSA => Signature::RsaSsa {
                hash: r.u16()?,
                sig: r.tpm2b()?.to_vec(),
            },
            alg::RSAPSS => Signature::RsaPss {
                hash: r.u16()?,
                sig: r.tpm2b()?.to_vec(),
            },
            alg::ECDSA => Signature::Ecdsa {
                hash: r.u16()?,
                r: r.tpm2b()?.to_vec(),
                s: r.tpm2b()?.to_vec(),
            },
            other => {
                return Err(Error::Unsupported {
                    what: "signature algorithm",
                    value: other as u32,
                });
            }
        };
        r.finish()?;
        Ok(s)
    }

    pub fn marshal(&self) -> Result<Vec<u8>> {
        let mut out = vec![];
        match self {
            Signature::RsaSsa { hash, sig } | Signature::RsaPss { hash, sig } => {
                let a = if matches!(self, Signature::RsaSsa { .. }) {
                    alg::RSASSA
                } else {
                    alg::RSAPSS
                };
                out.extend_from_slice(&a.to_be_bytes());
                out.extend_from_slice(&hash.to_be_bytes());
                put_tpm2b(&mut out, sig)?;
            }
            Signature::Ecdsa { hash, r, s } => {
                out.extend_from_slice(&alg::ECDSA.to_be_bytes());
                out.extend_from_slice(&hash.to_be_bytes());
                put_tpm2b(&mut out, r)?;
                put_tpm2b(&mut out, s)?;
            }
        }
        Ok(out)
    }

    pub fn scheme(&self) -> u16 {
        match self {
            Signature::RsaSsa { .. } => alg::RSASSA,
            Signature::RsaPss { .. } => alg::RSAPSS,
            Signature::Ecdsa { .. } => alg::ECDSA,
        }
    }

    pub fn hash(&self) -> u16 {
        match self {
            Signature::RsaSsa { hash, .. }
            | Signature::RsaPss { hash, .. }
            | Signature::Ecdsa { hash, .. } => *hash,
        }
    }

    /// Verifies this signature by `key` over `message` (the TPM signs H_hash(message)).
    pub fn verify(&self, key: &Public, message: &[u8]) -> Result<()> {
        let declared = key.scheme();
        if declared.scheme != alg::NULL
            && (declared.scheme != self.scheme() || declared.hash != self.hash())
        {
            return Err(Error::SchemeMismatch {
                got: self.scheme(),
                want: declared.scheme,
            });
        }
        let spki = key.spki_der()?;
        let (va, sig): (&dyn VerificationAlgorithm, Vec<u8>) =
            match (self, &key.params, &key.unique) {
                (Signature::RsaSsa { hash, sig }, Params::Rsa { .. }, Unique::Rsa(_)) => (
                    match *hash {
                        alg::SHA256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                        alg::SHA384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                        alg::SHA512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                        alg::SHA1 => &signature::RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY,
                        h => {
                            return Err(Error::Unsupported {
                                what: "signature hash",
                                value: h as u32,
                            });
                        }
                    },
                    sig.clone(),
                ),
                (Signature::RsaPss { hash, sig }, Params::Rsa { .. }, Unique::Rsa(_)) => (
                    match *hash {
                        alg::SHA256 => &signature::RSA_PSS_2048_8192_SHA256,
                        alg::SHA384 => &signature::RSA_PSS_2048_8192_SHA384,
                        alg::SHA512 => &signature::RSA_PSS_2048_8192_SHA512,
                        h => {
                            return Err(Error::Unsupported {
                                what: "signature hash",
                                value: h as u32,
                            });
                        }
                    },
                    sig.clone(),
                ),
                (
                    Signature::Ecdsa { hash, r, s },
                    Params::Ecc { curve: c, .. },
                    Unique::Ecc { .. },
                ) => {
                    let va: &dyn VerificationAlgorithm = match (*c, *hash) {
                        (curve::NIST_P256, alg::SHA256) => &signature::ECDSA_P256_SHA256_ASN1,
                        (curve::NIST_P256, alg::SHA384) => &signature::ECDSA_P256_SHA384_ASN1,
                        (curve::NIST_P384, alg::SHA384) => &signature::ECDSA_P384_SHA384_ASN1,
                        (curve::NIST_P384, alg::SHA256) => &signature::ECDSA_P384_SHA256_ASN1,
                        (c, h) => {
                            return Err(Error::Unsupported {
                                what: "ECDSA curve/hash",
                                value: ((c as u32) << 16) | h as u32,
                            });
                        }
                    };
                    (va, ecdsa_der(r, s)?)
                }
                _ => {
                    return Err(Error::Invalid(
                        "signature algorithm does not fit the key type".into(),
                    ));
                }
            };
        UnparsedPublicKey::new(va, &spki)
            .verify(message, &sig)
            .map_err(|_| Error::BadSignature)
    }
}

/// ECDSA-Sig-Value DER from big-endian r and s.
fn ecdsa_der(r: &[u8], s: &[u8]) -> Result<Vec<u8>> {
    use der::Encode;
    let int = |v: &[u8]| -> Result<Vec<u8>> {
        der::asn1::UintRef::new(v)
            .and_then(|u| u.to_der())
            .map_err(|_| Error::BadSignature)
    };
    let body = [int(r)?, int(s)?].concat();
    if body.len() > 127 {
        return Err(Error::BadSignature);
    }
    Ok([vec![0x30, body.len() as u8], body].concat())
}

fn check_nonce(got: &[u8], want: &[u8]) -> Result<()> {
    if got.len() != want.len() || !bool::from(got.ct_eq(want)) {
        return Err(Error::NonceMismatch);
    }
    Ok(())
}

/// Verifies a TPM2_Certify: `signer` signed `attest_bytes` (signature `sig_bytes`), which
/// certifies an object whose name is `certified.name()`, with `nonce` as extraData.
pub fn verify_certify(
    signer: &Public,
    attest_bytes: &[u8],
    sig_bytes: &[u8],
    certified: &Public,
    nonce: &[u8],
) -> Result<Attest> {
    let attest = Attest::parse(attest_bytes)?;
    if attest.attest_type != ST_ATTEST_CERTIFY {
        return Err(Error::WrongType {
            got: attest.attest_type,
            want: ST_ATTEST_CERTIFY,
        });
    }
    Signature::parse(sig_bytes)?.verify(signer, attest_bytes)?;
    check_nonce(&attest.extra_data, nonce)?;
    let AttestBody::Certify { name, .. } = &attest.body else {
        return Err(Error::WrongType {
            got: attest.attest_type,
            want: ST_ATTEST_CERTIFY,
        });
    };
    if name != &certified.name()? {
        return Err(Error::NameMismatch);
    }
    Ok(attest)
}

/// Verifies a TPM2_Quote by `ak` over claimed PCR values `pcrs` ((bank hash alg, index) → value)
/// with `nonce` as extraData. Every claimed value must be inside the signed selection, every
/// selected PCR must have a value exactly one digest of its bank long, no bank may be selected
/// twice, and the digest (with the signature's hash) must match.
pub fn verify_quote(
    ak: &Public,
    attest_bytes: &[u8],
    sig_bytes: &[u8],
    nonce: &[u8],
    pcrs: &PcrValues,
) -> Result<Attest> {
    let attest = Attest::parse(attest_bytes)?;
    if attest.attest_type != ST_ATTEST_QUOTE {
        return Err(Error::WrongType {
            got: attest.attest_type,
            want: ST_ATTEST_QUOTE,
        });
    }
    let sig = Signature::parse(sig_bytes)?;
    sig.verify(ak, attest_bytes)?;
    check_nonce(&attest.extra_data, nonce)?;
    let AttestBody::Quote {
        selection,
        pcr_digest,
    } = &attest.body
    else {
        return Err(Error::WrongType {
            got: attest.attest_type,
            want: ST_ATTEST_QUOTE,
        });
    };
    // Every value is exactly one digest of its bank: the digest covers the concatenation, so
    // a value of another length would shift bytes between PCRs and pass a policy on one of
    // them. A bank selected twice, or one of an unknown size, is refused for the same reason.
    let mut covered = std::collections::BTreeSet::new();
    let mut banks = std::collections::BTreeSet::new();
    let mut concat = vec![];
    for bank in selection {
        if !banks.insert(bank.hash) {
            return Err(Error::PcrBankRepeated(bank.hash));
        }
        let want = super::digest_len(bank.hash)?;
        for i in bank.indices() {
            covered.insert((bank.hash, i));
            let v = pcrs.get(&(bank.hash, i)).ok_or(Error::PcrValueMissing {
                bank: bank.hash,
                index: i,
            })?;
            if v.len() != want {
                return Err(Error::PcrValueLength {
                    bank: bank.hash,
                    index: i,
                    got: v.len(),
                    want,
                });
            }
            concat.extend_from_slice(v);
        }
    }
    if let Some((bank, index)) = pcrs.keys().find(|k| !covered.contains(k)) {
        return Err(Error::PcrNotSelected {
            bank: *bank,
            index: *index,
        });
    }
    let digest = hash(sig.hash(), &concat)?;
    if digest.len() != pcr_digest.len() || !bool::from(digest.ct_eq(pcr_digest)) {
        return Err(Error::PcrDigestMismatch);
    }
    Ok(attest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_quote() -> Attest {
        Attest {
            attest_type: ST_ATTEST_QUOTE,
            qualified_signer: vec![0, 0x0b, 1, 2, 3],
            extra_data: b"nonce".to_vec(),
            clock_info: ClockInfo {
                clock: 5,
                reset_count: 1,
                restart_count: 2,
                safe: true,
            },
            firmware_version: 42,
            body: AttestBody::Quote {
                selection: vec![PcrSelection::from_indices(alg::SHA256, &[0, 7, 16])],
                pcr_digest: vec![9; 32],
            },
        }
    }

    #[test]
    fn attest_round_trip_and_truncation() {
        let a = sample_quote();
        let b = a.marshal().unwrap();
        assert_eq!(Attest::parse(&b).unwrap(), a);
        for cut in 0..b.len() {
            assert!(Attest::parse(&b[..cut]).is_err());
        }
        let mut bad = b.clone();
        bad[0] ^= 1;
        assert!(matches!(Attest::parse(&bad), Err(Error::BadMagic(_))));
        assert_eq!(
            PcrSelection::from_indices(alg::SHA256, &[0, 7, 16]).indices(),
            vec![0, 7, 16]
        );
    }

    #[test]
    fn signature_round_trip_and_truncation() {
        for s in [
            Signature::RsaSsa {
                hash: alg::SHA256,
                sig: vec![1; 256],
            },
            Signature::Ecdsa {
                hash: alg::SHA256,
                r: vec![2; 32],
                s: vec![3; 32],
            },
        ] {
            let b = s.marshal().unwrap();
            assert_eq!(Signature::parse(&b).unwrap(), s);
            for cut in 0..b.len() {
                assert!(Signature::parse(&b[..cut]).is_err());
            }
        }
        assert!(
            Signature::parse(&[0x00, 0x10]).is_err(),
            "NULL signature is not accepted"
        );
    }
}

/// Quotes signed by a software P-256 AK, to check what `verify_quote` makes of claimed values.
#[cfg(test)]
mod quote_values {
    use super::*;
    use crate::soft::{AK_ATTRIBUTES, SoftKey};

    /// A quote of `selection` whose digest is SHA-256 of `concat`, signed by `ak`.
    fn quote(ak: &SoftKey, selection: Vec<PcrSelection>, concat: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let a = Attest {
            attest_type: ST_ATTEST_QUOTE,
            qualified_signer: vec![0, 0x0b],
            extra_data: b"nonce".to_vec(),
            clock_info: ClockInfo {
                clock: 1,
                reset_count: 0,
                restart_count: 0,
                safe: true,
            },
            firmware_version: 1,
            body: AttestBody::Quote {
                selection,
                pcr_digest: crate::wire::hash(alg::SHA256, concat).unwrap(),
            },
        };
        let bytes = a.marshal().unwrap();
        let sig = ak.tpm_sign(&bytes);
        (bytes, sig)
    }

    /// The attack of issue 19 item 2: the TPM quoted PCR1 = R1, PCR7 = a bad value and PCR23 =
    /// the golden PCR7 value (replayed there from a good boot's event log). The node claims
    /// PCR1 = R1‖R7bad, PCR7 = golden and PCR23 = empty: the concatenation, and so the digest,
    /// is the same, and a policy on PCR7 would pass.
    #[test]
    fn pcr_values_of_wrong_length_are_refused() {
        let ak = SoftKey::new(AK_ATTRIBUTES);
        let (r1, bad7, golden) = (vec![0x11; 32], vec![0xbb; 32], vec![0x77; 32]);
        let sel = vec![PcrSelection::from_indices(alg::SHA256, &[1, 7, 23])];
        let (q, s) = quote(
            &ak,
            sel,
            &[r1.clone(), bad7.clone(), golden.clone()].concat(),
        );
        let honest: PcrValues = [
            ((alg::SHA256, 1), r1.clone()),
            ((alg::SHA256, 7), bad7.clone()),
            ((alg::SHA256, 23), golden.clone()),
        ]
        .into();
        verify_quote(&ak.public, &q, &s, b"nonce", &honest).expect("honest values verify");
        let shifted: PcrValues = [
            ((alg::SHA256, 1), [r1.clone(), bad7.clone()].concat()),
            ((alg::SHA256, 7), golden.clone()),
            ((alg::SHA256, 23), vec![]),
        ]
        .into();
        let e = verify_quote(&ak.public, &q, &s, b"nonce", &shifted).unwrap_err();
        assert_eq!(
            e,
            Error::PcrValueLength {
                bank: alg::SHA256,
                index: 1,
                got: 64,
                want: 32
            }
        );
        assert_eq!(
            e.to_string(),
            "PCR sha256:1 value is 64 bytes; that bank's digests are 32"
        );
        // One byte moved from one value to the next is refused too.
        let nudged: PcrValues = [
            ((alg::SHA256, 1), [&r1[..], &bad7[..1]].concat()),
            ((alg::SHA256, 7), bad7[1..].to_vec()),
            ((alg::SHA256, 23), golden),
        ]
        .into();
        assert!(matches!(
            verify_quote(&ak.public, &q, &s, b"nonce", &nudged),
            Err(Error::PcrValueLength {
                index: 1,
                got: 33,
                ..
            })
        ));
    }

    #[test]
    fn pcr_duplicate_and_unknown_banks_are_refused() {
        let ak = SoftKey::new(AK_ATTRIBUTES);
        let v = vec![0x11; 32];
        // The SHA-256 bank selected twice: PCR 7 would be hashed in twice.
        let dup = vec![
            PcrSelection::from_indices(alg::SHA256, &[7]),
            PcrSelection::from_indices(alg::SHA256, &[7]),
        ];
        let (q, s) = quote(&ak, dup, &[v.clone(), v.clone()].concat());
        let values: PcrValues = [((alg::SHA256, 7), v.clone())].into();
        assert_eq!(
            verify_quote(&ak.public, &q, &s, b"nonce", &values).unwrap_err(),
            Error::PcrBankRepeated(alg::SHA256)
        );
        // A bank whose algorithm is no hash Kame knows (its digest size is unknown).
        let unknown = vec![PcrSelection::from_indices(0x0012, &[7])];
        let (q, s) = quote(&ak, unknown, &v);
        let values: PcrValues = [((0x0012, 7), v)].into();
        assert!(matches!(
            verify_quote(&ak.public, &q, &s, b"nonce", &values),
            Err(Error::Unsupported { .. })
        ));
    }
}
