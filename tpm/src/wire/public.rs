//! TPMT_PUBLIC / TPM2B_PUBLIC (RSA and ECC objects): parse, marshal byte-identically, compute
//! the object name for any nameAlg, check key attributes, and export the key as an SPKI.

use super::{Error, Reader, Result, alg, curve, digest_len, hash, put_tpm2b};

/// TPMA_OBJECT bits.
pub mod attr {
    pub const FIXED_TPM: u32 = 1 << 1;
    pub const ST_CLEAR: u32 = 1 << 2;
    pub const FIXED_PARENT: u32 = 1 << 4;
    pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    pub const USER_WITH_AUTH: u32 = 1 << 6;
    pub const ADMIN_WITH_POLICY: u32 = 1 << 7;
    pub const NO_DA: u32 = 1 << 10;
    pub const ENCRYPTED_DUPLICATION: u32 = 1 << 11;
    pub const RESTRICTED: u32 = 1 << 16;
    pub const DECRYPT: u32 = 1 << 17;
    pub const SIGN_ENCRYPT: u32 = 1 << 18;
}

/// TPMT_SYM_DEF_OBJECT: `alg` NULL means no symmetric algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SymDef {
    pub alg: u16,
    pub key_bits: u16,
    pub mode: u16,
}

/// An asymmetric scheme (TPMT_RSA_SCHEME / TPMT_ECC_SCHEME / TPMT_KDF_SCHEME): `scheme` NULL
/// means none; `count` is ECDAA's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheme {
    pub scheme: u16,
    pub hash: u16,
    pub count: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Params {
    Rsa {
        symmetric: SymDef,
        scheme: Scheme,
        key_bits: u16,
        /// 0 means the default 65537.
        exponent: u32,
    },
    Ecc {
        symmetric: SymDef,
        scheme: Scheme,
        curve: u16,
        kdf: Scheme,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unique {
    Rsa(Vec<u8>),
    Ecc { x: Vec<u8>, y: Vec<u8> },
}

/// A TPMT_PUBLIC of an RSA or ECC object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Public {
    pub name_alg: u16,
    pub attributes: u32,
    pub auth_policy: Vec<u8>,
    pub params: Params,
    pub unique: Unique,
}

fn read_sym(r: &mut Reader<'_>) -> Result<SymDef> {
    let a = r.u16()?;
    if a == alg::NULL {
        return Ok(SymDef {
            alg: a,
            key_bits: 0,
            mode: 0,
        });
    }
    Ok(SymDef {
        alg: a,
        key_bits: r.u16()?,
        mode: r.u16()?,
    })
}

fn put_sym(out: &mut Vec<u8>, s: &SymDef) {
    out.extend_from_slice(&s.alg.to_be_bytes());
    if s.alg != alg::NULL {
        out.extend_from_slice(&s.key_bits.to_be_bytes());
        out.extend_from_slice(&s.mode.to_be_bytes());
    }
}

fn read_scheme(r: &mut Reader<'_>) -> Result<Scheme> {
    let scheme = r.u16()?;
    if scheme == alg::NULL {
        return Ok(Scheme {
            scheme,
            hash: alg::NULL,
            count: None,
        });
    }
    let hash = r.u16()?;
    let count = if scheme == alg::ECDAA {
        Some(r.u16()?)
    } else {
        None
    };
    Ok(Scheme {
        scheme,
        hash,
        count,
    })
}

fn put_scheme(out: &mut Vec<u8>, s: &Scheme) {
    out.extend_from_slice(&s.scheme.to_be_bytes());
    if s.scheme != alg::NULL {
        out.extend_from_slice(&s.hash.to_be_bytes());
        if let Some(c) = s.count {
            out.extend_from_slice(&c.to_be_bytes());
        }
    }
}

impl Public {
    /// Parses a TPMT_PUBLIC that must fill `bytes` exactly.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "TPMT_PUBLIC");
        let p = Self::read(&mut r)?;
        r.finish()?;
        Ok(p)
    }

    /// Parses a TPM2B_PUBLIC (u16 size, then TPMT_PUBLIC) that must fill `bytes` exactly.
    pub fn parse_tpm2b(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "TPM2B_PUBLIC");
        let inner = r.tpm2b()?;
        r.finish()?;
        Self::parse(inner)
    }

    pub fn read(r: &mut Reader<'_>) -> Result<Self> {
        let ty = r.u16()?;
        let name_alg = r.u16()?;
        digest_len(name_alg)?;
        let attributes = r.u32()?;
        let auth_policy = r.tpm2b()?.to_vec();
        let (params, unique) = match ty {
            alg::RSA => {
                let symmetric = read_sym(r)?;
                let scheme = read_scheme(r)?;
                let key_bits = r.u16()?;
                let exponent = r.u32()?;
                let n = r.tpm2b()?.to_vec();
                (
                    Params::Rsa {
                        symmetric,
                        scheme,
                        key_bits,
                        exponent,
                    },
                    Unique::Rsa(n),
                )
            }
            alg::ECC => {
                let symmetric = read_sym(r)?;
                let scheme = read_scheme(r)?;
                let curve = r.u16()?;
                let kdf = read_scheme(r)?;
                let x = r.tpm2b()?.to_vec();
                let y = r.tpm2b()?.to_vec();
                (
                    Params::Ecc {
                        symmetric,
                        scheme,
                        curve,
                        kdf,
                    },
                    Unique::Ecc { x, y },
                )
            }
            other => {
                return Err(Error::Unsupported {
                    what: "object type",
                    value: other as u32,
                });
            }
        };
        Ok(Public {
            name_alg,
            attributes,
            auth_policy,
            params,
            unique,
        })
    }

    /// TPMT_PUBLIC bytes (without the TPM2B size).
    pub fn marshal(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(384);
        let ty = match self.params {
            Params::Rsa { .. } => alg::RSA,
            Params::Ecc { .. } => alg::ECC,
        };
        out.extend_from_slice(&ty.to_be_bytes());
        out.extend_from_slice(&self.name_alg.to_be_bytes());
        out.extend_from_slice(&self.attributes.to_be_bytes());
        put_tpm2b(&mut out, &self.auth_policy)?;
        match (&self.params, &self.unique) {
            (
                Params::Rsa {
                    symmetric,
                    scheme,
                    key_bits,
                    exponent,
                },
                Unique::Rsa(n),
            ) => {
                put_sym(&mut out, symmetric);
                put_scheme(&mut out, scheme);
                out.extend_from_slice(&key_bits.to_be_bytes());
                out.extend_from_slice(&exponent.to_be_bytes());
                put_tpm2b(&mut out, n)?;
            }
            (
                Params::Ecc {
                    symmetric,
                    scheme,
                    curve,
                    kdf,
                },
                Unique::Ecc { x, y },
            ) => {
                put_sym(&mut out, symmetric);
                put_scheme(&mut out, scheme);
                out.extend_from_slice(&curve.to_be_bytes());
                put_scheme(&mut out, kdf);
                put_tpm2b(&mut out, x)?;
                put_tpm2b(&mut out, y)?;
            }
            _ => {
                return Err(Error::Invalid(
                    "parameters and unique of different key types".into(),
                ));
            }
        }
        Ok(out)
    }

    /// TPM2B_PUBLIC bytes.
    pub fn marshal_tpm2b(&self) -> Result<Vec<u8>> {
        let inner = self.marshal()?;
        let mut out = Vec::with_capacity(inner.len() + 2);
        put_tpm2b(&mut out, &inner)?;
        Ok(out)
    }

    /// The object's name: nameAlg ‖ H_nameAlg(TPMT_PUBLIC).
    pub fn name(&self) -> Result<Vec<u8>> {
        let mut out = self.name_alg.to_be_bytes().to_vec();
        out.extend(hash(self.name_alg, &self.marshal()?)?);
        Ok(out)
    }

    pub fn is_rsa(&self) -> bool {
        matches!(self.params, Params::Rsa { .. })
    }

    /// The signing scheme, if the key declares one.
    pub fn scheme(&self) -> Scheme {
        match &self.params {
            Params::Rsa { scheme, .. } | Params::Ecc { scheme, .. } => *scheme,
        }
    }

    pub fn symmetric(&self) -> SymDef {
        match &self.params {
            Params::Rsa { symmetric, .. } | Params::Ecc { symmetric, .. } => *symmetric,
        }
    }

    /// Checks that every bit in `required` is set and no bit in `forbidden` is.
    pub fn check_attributes(&self, required: u32, forbidden: u32) -> Result<()> {
        let names = [
            (attr::FIXED_TPM, "fixedTPM"),
            (attr::FIXED_PARENT, "fixedParent"),
            (attr::SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"),
            (attr::USER_WITH_AUTH, "userWithAuth"),
            (attr::ADMIN_WITH_POLICY, "adminWithPolicy"),
            (attr::NO_DA, "noDA"),
            (attr::RESTRICTED, "restricted"),
            (attr::DECRYPT, "decrypt"),
            (attr::SIGN_ENCRYPT, "sign"),
        ];
        for (bit, name) in names {
            if required & bit != 0 && self.attributes & bit == 0 {
                return Err(Error::Attributes(format!("{name} must be set")));
            }
            if forbidden & bit != 0 && self.attributes & bit != 0 {
                return Err(Error::Attributes(format!("{name} must not be set")));
            }
        }
        Ok(())
    }

    /// The public key as a DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> Result<Vec<u8>> {
        use der::Encode;
        use der::asn1::{BitString, UintRef};
        let enc = |e: der::Error| Error::Invalid(format!("cannot encode key: {e}"));
        let (algorithm, bits) = match (&self.params, &self.unique) {
            (
                Params::Rsa {
                    key_bits, exponent, ..
                },
                Unique::Rsa(n),
            ) => {
                if n.len() * 8 != *key_bits as usize {
                    return Err(Error::Invalid(format!(
                        "RSA modulus is {} bits, keyBits says {key_bits}",
                        n.len() * 8
                    )));
                }
                let e = if *exponent == 0 { 65537 } else { *exponent };
                let eb = e.to_be_bytes();
                let body = [
                    UintRef::new(n).map_err(enc)?.to_der().map_err(enc)?,
                    UintRef::new(&eb).map_err(enc)?.to_der().map_err(enc)?,
                ]
                .concat();
                let mut seq = vec![0x30];
                push_len(&mut seq, body.len());
                seq.extend(body);
                (
                    spki::AlgorithmIdentifierOwned {
                        oid: const_oid::db::rfc5912::RSA_ENCRYPTION,
                        parameters: Some(der::asn1::Null.into()),
                    },
                    seq,
                )
            }
            (Params::Ecc { curve: c, .. }, Unique::Ecc { x, y }) => {
                let (oid, len) = match *c {
                    curve::NIST_P256 => (const_oid::db::rfc5912::SECP_256_R_1, 32),
                    curve::NIST_P384 => (const_oid::db::rfc5912::SECP_384_R_1, 48),
                    other => {
                        return Err(Error::Unsupported {
                            what: "ECC curve",
                            value: other as u32,
                        });
                    }
                };
                if x.len() > len || y.len() > len {
                    return Err(Error::Invalid("ECC point coordinate too long".into()));
                }
                let mut point = vec![4u8];
                point.extend(std::iter::repeat_n(0, len - x.len()));
                point.extend_from_slice(x);
                point.extend(std::iter::repeat_n(0, len - y.len()));
                point.extend_from_slice(y);
                (
                    spki::AlgorithmIdentifierOwned {
                        oid: const_oid::db::rfc5912::ID_EC_PUBLIC_KEY,
                        parameters: Some(der::Any::encode_from(&oid).map_err(enc)?),
                    },
                    point,
                )
            }
            _ => {
                return Err(Error::Invalid(
                    "parameters and unique of different key types".into(),
                ));
            }
        };
        spki::SubjectPublicKeyInfoOwned {
            algorithm,
            subject_public_key: BitString::from_bytes(&bits).map_err(enc)?,
        }
        .to_der()
        .map_err(enc)
    }
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else if len < 0x100 {
        out.extend_from_slice(&[0x81, len as u8]);
    } else {
        out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]);
    }
}

/// The TCG DevID key templates (TCG "TPM 2.0 Keys for Device Identity and Attestation" v1.0
/// rev 12 §7.3.4, templates H-1 RSA 2048 and H-2 ECC NIST P-256, both SHA-256): primary keys
/// in the endorsement hierarchy; fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth,
/// adminWithPolicy and sign; the IAK also restricted. authPolicy is the spec's policy
/// (Table 19, [`super::policy::tcg_devid_policy`]). Scheme and `unique` as keylime's
/// implementation of the spec (`keylime/src/tpm.rs`): RSA IAK RSASSA-PSS/SHA-256, RSA IDevID
/// no scheme, ECC ECDSA/SHA-256; unique the ASCII of "IAK" or "IDEVID" (§7.3.1), in both x
/// and y for ECC.
pub fn tcg_devid_template(key: super::policy::DevIdKey, ecc: bool) -> Result<Public> {
    use super::policy::DevIdKey;
    let mut attributes = attr::FIXED_TPM
        | attr::FIXED_PARENT
        | attr::SENSITIVE_DATA_ORIGIN
        | attr::USER_WITH_AUTH
        | attr::ADMIN_WITH_POLICY
        | attr::SIGN_ENCRYPT;
    if key == DevIdKey::Iak {
        attributes |= attr::RESTRICTED;
    }
    let unique: &[u8] = match key {
        DevIdKey::Iak => b"IAK",
        DevIdKey::IDevId => b"IDEVID",
    };
    let null_sym = SymDef {
        alg: alg::NULL,
        key_bits: 0,
        mode: 0,
    };
    let scheme = |s: u16| Scheme {
        scheme: s,
        hash: if s == alg::NULL {
            alg::NULL
        } else {
            alg::SHA256
        },
        count: None,
    };
    let (params, unique) = if ecc {
        (
            Params::Ecc {
                symmetric: null_sym,
                scheme: scheme(alg::ECDSA),
                curve: super::curve::NIST_P256,
                kdf: scheme(alg::NULL),
            },
            Unique::Ecc {
                x: unique.to_vec(),
                y: unique.to_vec(),
            },
        )
    } else {
        (
            Params::Rsa {
                symmetric: null_sym,
                scheme: scheme(if key == DevIdKey::Iak {
                    alg::RSAPSS
                } else {
                    alg::NULL
                }),
                key_bits: 2048,
                exponent: 0,
            },
            Unique::Rsa(unique.to_vec()),
        )
    };
    Ok(Public {
        name_alg: alg::SHA256,
        attributes,
        auth_policy: super::policy::tcg_devid_policy(key, alg::SHA256)?,
        params,
        unique,
    })
}

/// SPIRE's exact templates (`tpm_devid.md` §1.9), as hex TPMT_PUBLIC.
pub mod templates {
    pub const SRK_HIGH_RSA: &str = "0001000b00030472000000060080004300100800000000000000";
    pub const SRK_HIGH_ECC: &str = "0023000b00030472000000060080004300100003001000000000";
    /// go-tpm-tools `AKTemplateRSA`: the ephemeral AK SPIRE creates under the SRK.
    pub const AK_RSA: &str = "0001000b00050072000000100014000b0800000000000000";
    /// SPIRE's test/provisioner DevID templates (unrestricted signing keys).
    pub const DEVID_RSA: &str = "0001000b00040072000000100014000b0800000000000000";
    pub const DEVID_ECC: &str = concat!(
        "0023000b00040072000000100018000b00030010",
        "0020",
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0020",
        "0000000000000000000000000000000000000000000000000000000000000000"
    );

    /// A template's bytes.
    pub fn bytes(hex: &str) -> Vec<u8> {
        (0..hex.len() / 2)
            .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// SPIRE's template bytes, `tpm_devid.md` §1.9.
    fn spire_templates() -> Vec<(&'static str, Vec<u8>)> {
        let z = |n: usize| "00".repeat(n);
        vec![
            (
                "SRK_HIGH_RSA",
                unhex("0001000b 00030472 0000 000600800043 0010 0800 00000000 0000"),
            ),
            (
                "SRK_HIGH_ECC",
                unhex("0023000b 00030472 0000 000600800043 0010 0003 0010 0000 0000"),
            ),
            (
                "AK_RSA",
                unhex("0001000b 00050072 0000 0010 0014000b 0800 00000000 0000"),
            ),
            (
                "DEVID_RSA",
                unhex("0001000b 00040072 0000 0010 0014000b 0800 00000000 0000"),
            ),
            (
                "DEVID_ECC",
                unhex(&format!(
                    "0023000b 00040072 0000 0010 0018000b 0003 0010 0020{} 0020{}",
                    z(32),
                    z(32)
                )),
            ),
            (
                "EK_L1_RSA",
                unhex(&format!(
                    "0001000b 000300b2 0020 837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa 000600800043 0010 0800 00000000 0100{}",
                    z(256)
                )),
            ),
        ]
    }

    #[test]
    fn spire_template_bytes_round_trip_byte_for_byte() {
        for (name, bytes) in spire_templates() {
            let p = Public::parse(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(p.marshal().unwrap(), bytes, "{name}");
            let t = Public::parse_tpm2b(&p.marshal_tpm2b().unwrap()).unwrap();
            assert_eq!(t, p);
        }
        assert_eq!(unhex(templates::SRK_HIGH_RSA), spire_templates()[0].1);
        assert_eq!(unhex(templates::SRK_HIGH_ECC), spire_templates()[1].1);
        assert_eq!(templates::bytes(templates::AK_RSA), spire_templates()[2].1);
        assert_eq!(
            templates::bytes(templates::DEVID_RSA),
            spire_templates()[3].1
        );
        assert_eq!(
            templates::bytes(templates::DEVID_ECC),
            spire_templates()[4].1
        );
    }

    #[test]
    fn template_attributes_are_what_spire_says() {
        let t = spire_templates();
        let ak = Public::parse(&t[2].1).unwrap();
        ak.check_attributes(
            attr::SIGN_ENCRYPT
                | attr::RESTRICTED
                | attr::FIXED_TPM
                | attr::FIXED_PARENT
                | attr::SENSITIVE_DATA_ORIGIN
                | attr::USER_WITH_AUTH,
            attr::DECRYPT,
        )
        .unwrap();
        let devid = Public::parse(&t[3].1).unwrap();
        assert!(devid.check_attributes(attr::RESTRICTED, 0).is_err());
        let ek = Public::parse(&t[5].1).unwrap();
        ek.check_attributes(
            attr::DECRYPT | attr::RESTRICTED | attr::ADMIN_WITH_POLICY,
            attr::USER_WITH_AUTH,
        )
        .unwrap();
        // The EK policy digest: SHA-256(SHA-256(0^32 ‖ 00000151 ‖ 4000000B)) per §1.9.
        let inner = [vec![0u8; 32], unhex("00000151 4000000B")].concat();
        let first = hash(alg::SHA256, &inner).unwrap();
        let policy = hash(alg::SHA256, &first).unwrap();
        assert_eq!(
            policy, ek.auth_policy,
            "PolicySecret(TPM_RH_ENDORSEMENT) policy digest"
        );
    }

    #[test]
    fn truncated_and_garbage_input_is_an_error_never_a_panic() {
        for (name, bytes) in spire_templates() {
            for cut in 0..bytes.len() {
                assert!(Public::parse(&bytes[..cut]).is_err(), "{name} cut at {cut}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(matches!(Public::parse(&longer), Err(Error::Trailing(..))));
        }
        assert!(Public::parse_tpm2b(&[0xff, 0xff, 0x00]).is_err());
        assert!(
            Public::parse(&unhex("0008000b00000000 0000")).is_err(),
            "keyedhash objects are not keys"
        );
        assert!(
            Public::parse(&unhex("0001 0099 00000000 0000")).is_err(),
            "unknown nameAlg"
        );
    }
}
