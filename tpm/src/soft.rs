//! TPM evidence made in software (feature `soft-keys`, and this crate's tests; never in a
//! production build): P-256 keys whose TPMT_PUBLIC claims whatever attributes a test needs,
//! and the TPM2_Sign, TPM2_Certify and TPM2_Quote structures they sign. Everything a peer
//! sends before a credential activation (or, for a certified AK, at all) can be made this
//! way, which is why verifiers must bound their work on it; tests and fuzz targets use it to
//! reach the checks behind the signatures. It must not stand in for a TPM anywhere else.

use crate::wire::attest::{
    Attest, AttestBody, ClockInfo, PcrSelection, ST_ATTEST_CERTIFY, ST_ATTEST_QUOTE, Signature,
};
use crate::wire::public::{Params, Public, Scheme, SymDef, Unique, attr};
use crate::wire::{alg, curve};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};

/// A P-256 key posing as a TPM key with `attributes`.
pub struct SoftKey {
    key: EcdsaKeyPair,
    fixed: aws_lc_rs::signature::EcdsaKeyPair,
    /// Its TPMT_PUBLIC.
    pub public: Public,
}

impl std::fmt::Debug for SoftKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SoftKey")
    }
}

/// The attributes of an attestation key (restricted signing, resident).
pub const AK_ATTRIBUTES: u32 = attr::SIGN_ENCRYPT
    | attr::RESTRICTED
    | attr::FIXED_TPM
    | attr::FIXED_PARENT
    | attr::SENSITIVE_DATA_ORIGIN
    | attr::USER_WITH_AUTH;
/// The attributes of a DevID key (unrestricted signing, resident).
pub const DEVID_ATTRIBUTES: u32 = attr::SIGN_ENCRYPT
    | attr::FIXED_TPM
    | attr::FIXED_PARENT
    | attr::SENSITIVE_DATA_ORIGIN
    | attr::USER_WITH_AUTH;

/// The attributes of an endorsement key (restricted decryption, resident, policy-only).
pub const EK_ATTRIBUTES: u32 = attr::DECRYPT
    | attr::RESTRICTED
    | attr::FIXED_TPM
    | attr::FIXED_PARENT
    | attr::SENSITIVE_DATA_ORIGIN
    | attr::ADMIN_WITH_POLICY;

impl SoftKey {
    /// An ECC P-256 endorsement key as the TCG's low-range template makes it (AES-128-CFB
    /// for credentials, no signing scheme).
    pub fn ek() -> SoftKey {
        let mut k = SoftKey::new(EK_ATTRIBUTES);
        if let Params::Ecc {
            symmetric, scheme, ..
        } = &mut k.public.params
        {
            *symmetric = SymDef {
                alg: alg::AES,
                key_bits: 128,
                mode: alg::CFB,
            };
            *scheme = Scheme {
                scheme: alg::NULL,
                hash: alg::NULL,
                count: None,
            };
        }
        k
    }

    pub fn new(attributes: u32) -> SoftKey {
        use aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let fixed = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("P-256 key");
        let pkcs8 = fixed.to_pkcs8v1().expect("PKCS#8");
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref())
            .expect("the same key");
        let point = fixed.public_key().as_ref().to_vec();
        let null = Scheme {
            scheme: alg::NULL,
            hash: alg::NULL,
            count: None,
        };
        let public = Public {
            name_alg: alg::SHA256,
            attributes,
            auth_policy: vec![],
            params: Params::Ecc {
                symmetric: SymDef {
                    alg: alg::NULL,
                    key_bits: 0,
                    mode: 0,
                },
                scheme: Scheme {
                    scheme: alg::ECDSA,
                    hash: alg::SHA256,
                    count: None,
                },
                curve: curve::NIST_P256,
                kdf: null,
            },
            unique: Unique::Ecc {
                x: point[1..33].to_vec(),
                y: point[33..].to_vec(),
            },
        };
        SoftKey { key, fixed, public }
    }

    /// The TPMT_PUBLIC bytes.
    pub fn public_bytes(&self) -> Vec<u8> {
        self.public.marshal().expect("TPMT_PUBLIC")
    }

    /// SubjectPublicKeyInfo DER, as the TPMT_PUBLIC gives it.
    pub fn spki(&self) -> Vec<u8> {
        self.public.spki_der().expect("SPKI")
    }

    /// A TPMT_SIGNATURE (ECDSA, SHA-256) over `message`, as TPM2_Sign would make it.
    pub fn tpm_sign(&self, message: &[u8]) -> Vec<u8> {
        let sig = self
            .fixed
            .sign(&SystemRandom::new(), message)
            .expect("signature");
        let sig = sig.as_ref();
        Signature::Ecdsa {
            hash: alg::SHA256,
            r: sig[..32].to_vec(),
            s: sig[32..].to_vec(),
        }
        .marshal()
        .expect("TPMT_SIGNATURE")
    }

    /// An X.509-style ECDSA signature (DER) over `message`.
    pub fn x509_sign(&self, message: &[u8]) -> Vec<u8> {
        self.key
            .sign(&SystemRandom::new(), message)
            .expect("signature")
            .as_ref()
            .to_vec()
    }

    fn attest(&self, attest_type: u16, nonce: &[u8], body: AttestBody) -> (Vec<u8>, Vec<u8>) {
        let a = Attest {
            attest_type,
            qualified_signer: self.public.name().expect("name"),
            extra_data: nonce.to_vec(),
            clock_info: ClockInfo {
                clock: 1000,
                reset_count: 1,
                restart_count: 0,
                safe: true,
            },
            firmware_version: 1,
            body,
        };
        let bytes = a.marshal().expect("TPMS_ATTEST");
        let sig = self.tpm_sign(&bytes);
        (bytes, sig)
    }

    /// TPM2_Certify of `object` by this key with `nonce` as qualifying data: (TPMS_ATTEST,
    /// TPMT_SIGNATURE).
    pub fn certify(&self, object: &Public, nonce: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let name = object.name().expect("name");
        self.attest(
            ST_ATTEST_CERTIFY,
            nonce,
            AttestBody::Certify {
                qualified_name: name.clone(),
                name,
            },
        )
    }

    /// TPM2_Quote by this key of SHA-256 PCRs `values` (index, 32-byte value) with `nonce`.
    pub fn quote(&self, values: &[(u32, Vec<u8>)], nonce: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let mut sorted = values.to_vec();
        sorted.sort();
        let indices: Vec<u32> = sorted.iter().map(|(i, _)| *i).collect();
        let concat: Vec<u8> = sorted.iter().flat_map(|(_, v)| v.clone()).collect();
        self.attest(
            ST_ATTEST_QUOTE,
            nonce,
            AttestBody::Quote {
                selection: vec![PcrSelection::from_indices(alg::SHA256, &indices)],
                pcr_digest: crate::wire::hash(alg::SHA256, &concat).expect("digest"),
            },
        )
    }
}
