//! TCG enrollment, the CA's side: the TCG-CSR-IDEVID request (TCG "TPM 2.0 Keys for Device
//! Identity and Attestation" v1.0 rev 12 §13.1) encoded and decoded, every check a
//! manufacturer CA makes before it certifies an IAK and an IDevID (§6.2.2), and the credential
//! activation challenge that proves the IAK resident with the EK. Pure: no TPM, no network,
//! no signing key (the CA signs with its KeyManager); each refusal is its own error variant.
//!
//! Layout (the spec text was not at hand; this follows the field list of §13.1 as the open
//! implementations read it: go-trusted-platform `pkg/tpm2/idevid_csr.go`, openconfig/attestz
//! `service/biz/tpm20_utils.go`): every number a big-endian UINT32.
//! ```text
//! TCG_CSR_IDEVID  = structVer(0x00000100) contentSz sigSz content[contentSz] signature[sigSz]
//! content         = structVer(0x00000100) hashAlgoId hashSz
//!                   prodModelSz prodSerialSz prodCaDataSz bootEvntLogSz ekCertSz attestPubSz
//!                   atCreateTktSz atCertifyInfoSz atCertifyInfoSignatureSz signingPubSz
//!                   sgnCertifyInfoSz sgnCertifyInfoSignatureSz padSz
//!                   then the fields in that order, and pad to a multiple of 16 bytes
//! ```
//! `attestPub` and `signingPub` are the IAK's and IDevID's TPMT_PUBLIC; `sgnCertifyInfo` is the
//! TPMS_ATTEST of TPM2_Certify of the IDevID by the IAK and `sgnCertifyInfoSignature` its
//! TPMT_SIGNATURE; `signature` is the IDevID's TPMT_SIGNATURE over `content` (TPM2_Sign of its
//! `hashAlgoId` digest).

use kame_tpm::wire::{self, attest, credential, public::Public, public::attr};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

mod challenges;
mod ldevid;
mod sealed;
pub use challenges::*;
pub use ldevid::*;
pub use sealed::*;

const STRUCT_VER: u32 = 0x0000_0100;
/// No field of a request may be larger than this, nor the whole request larger than 1 MiB.
const MAX_FIELD: usize = 256 * 1024;
const MAX_REQUEST: usize = 1024 * 1024;

/// Why an enrollment request was refused, one variant per check.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollError {
    #[error("malformed TCG-CSR-IDEVID: {0}")]
    Malformed(String),
    #[error("malformed TCG-CSR-IDEVID: {0}")]
    MalformedField(#[source] wire::Error),
    #[error("prodSerial: {0}")]
    BadSerial(#[source] crate::profile::ProfileError),
    #[error("the request lacks {0}")]
    Missing(&'static str),
    #[error("IAK public area: {0}")]
    BadIak(#[source] wire::Error),
    #[error("the IAK is not a restricted signing key (TCG DevID §7.3.4.1: restricted, sign)")]
    IakNotRestricted,
    #[error("the IAK is not fixedTPM and fixedParent: it could leave the TPM")]
    IakNotFixed,
    #[error("IDevID public area: {0}")]
    BadIdevid(#[source] wire::Error),
    #[error("the IDevID key is exportable (not fixedTPM and fixedParent)")]
    IdevidExportable,
    #[error("the IDevID key is not an unrestricted signing key")]
    IdevidNotSigning,
    #[error("the request is not signed by its IDevID key: {0}")]
    BadRequestSignature(#[source] wire::Error),
    #[error("the IDevID is not certified by the IAK: {0}")]
    IdevidNotCertified(#[source] wire::Error),
    #[error("the EK certificate does not chain to a trusted TPM vendor CA: {0}")]
    EkUntrusted(#[source] crate::chain::ChainError),
    #[error("the EK certificate cannot be read: {0}")]
    BadEkCert(#[source] kame_api::Error),
    #[error("the EK certificate's key is not a supported EK (RSA 2048 or ECC NIST P-256)")]
    EkUnsupported,
    #[error("credential activation: {0}")]
    Credential(#[source] wire::Error),
    /// A local cryptographic step failed (the RNG, the sealing cipher): our fault, not the
    /// request's.
    #[error("credential activation: {0} failed")]
    Crypto(&'static str),
    #[error("unknown, expired or already answered enrollment challenge")]
    UnknownChallenge,
    #[error("the challenge answer is wrong: the IAK is not resident with the EK")]
    WrongAnswer,
    #[error("not a sealed certificate file: {0}")]
    SealedMalformed(String),
    #[error("not a sealed certificate file: {0}")]
    SealedFormat(#[source] wire::Error),
    #[error(
        "the sealed certificates do not open with this TPM's answer: sealed for another TPM, or altered"
    )]
    SealedForAnotherTpm,
    #[error(
        "too many pending enrollments {0}; answer the outstanding ones or let them expire ({1} s)"
    )]
    TooManyPending(&'static str, u64),
}

fn malformed(e: wire::Error) -> EnrollError {
    EnrollError::MalformedField(e)
}

/// The fields of a TCG-CSR-IDEVID.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdevidRequest {
    /// TPM_ALG_ID of the hash the signature uses (SHA-256: 0x000B).
    pub hash_alg: u16,
    pub prod_model: String,
    pub prod_serial: String,
    pub prod_ca_data: Vec<u8>,
    pub boot_event_log: Vec<u8>,
    /// The EK certificate, DER.
    pub ek_cert: Vec<u8>,
    /// The IAK's TPMT_PUBLIC.
    pub attest_pub: Vec<u8>,
    pub at_create_tkt: Vec<u8>,
    pub at_certify_info: Vec<u8>,
    pub at_certify_info_sig: Vec<u8>,
    /// The IDevID key's TPMT_PUBLIC.
    pub signing_pub: Vec<u8>,
    /// TPMS_ATTEST of TPM2_Certify(IDevID) by the IAK, and its TPMT_SIGNATURE.
    pub sgn_certify_info: Vec<u8>,
    pub sgn_certify_info_sig: Vec<u8>,
}

fn put(out: &mut Vec<u8>, v: usize) -> Result<(), EnrollError> {
    let v = u32::try_from(v).map_err(|_| EnrollError::Malformed("field too large".into()))?;
    out.extend_from_slice(&v.to_be_bytes());
    Ok(())
}

impl IdevidRequest {
    fn fields(&self) -> [&[u8]; 12] {
        [
            self.prod_model.as_bytes(),
            self.prod_serial.as_bytes(),
            &self.prod_ca_data,
            &self.boot_event_log,
            &self.ek_cert,
            &self.attest_pub,
            &self.at_create_tkt,
            &self.at_certify_info,
            &self.at_certify_info_sig,
            &self.signing_pub,
            &self.sgn_certify_info,
            &self.sgn_certify_info_sig,
        ]
    }

    /// The `content` the IDevID signs.
    pub fn content(&self) -> Result<Vec<u8>, EnrollError> {
        let hash_sz = wire::digest_len(self.hash_alg).map_err(malformed)?;
        let fields = self.fields();
        let body: usize = fields.iter().map(|f| f.len()).sum();
        let header = 4 * (3 + fields.len() + 1);
        let pad = (16 - (header + body) % 16) % 16;
        let mut out = Vec::with_capacity(header + body + pad);
        put(&mut out, STRUCT_VER as usize)?;
        put(&mut out, self.hash_alg as usize)?;
        put(&mut out, hash_sz)?;
        for f in fields {
            put(&mut out, f.len())?;
        }
        put(&mut out, pad)?;
        for f in fields {
            out.extend_from_slice(f);
        }
        out.resize(out.len() + pad, 0);
        Ok(out)
    }

    /// The whole request with the IDevID's `signature` (TPMT_SIGNATURE) over [`Self::content`].
    pub fn encode(&self, signature: &[u8]) -> Result<Vec<u8>, EnrollError> {
        let content = self.content()?;
        let mut out = Vec::with_capacity(12 + content.len() + signature.len());
        put(&mut out, STRUCT_VER as usize)?;
        put(&mut out, content.len())?;
        put(&mut out, signature.len())?;
        out.extend_from_slice(&content);
        out.extend_from_slice(signature);
        Ok(out)
    }

    /// Parses a request: (fields, the signed content, the signature). Every size is checked;
    /// the parts must fill the request exactly.
    pub fn decode(bytes: &[u8]) -> Result<(IdevidRequest, Vec<u8>, Vec<u8>), EnrollError> {
        if bytes.len() > MAX_REQUEST {
            return Err(EnrollError::Malformed("request larger than 1 MiB".into()));
        }
        let mut r = wire::Reader::new(bytes, "TCG_CSR_IDEVID");
        if r.u32().map_err(malformed)? != STRUCT_VER {
            return Err(EnrollError::Malformed("unknown structVer".into()));
        }
        let content_sz = r.u32().map_err(malformed)? as usize;
        let sig_sz = r.u32().map_err(malformed)? as usize;
        let content = r.bytes(content_sz).map_err(malformed)?.to_vec();
        let signature = r.bytes(sig_sz).map_err(malformed)?.to_vec();
        r.finish().map_err(malformed)?;

        let mut c = wire::Reader::new(&content, "TCG_IDEVID_CONTENT");
        if c.u32().map_err(malformed)? != STRUCT_VER {
            return Err(EnrollError::Malformed("unknown content structVer".into()));
        }
        let hash_alg = u16::try_from(c.u32().map_err(malformed)?)
            .map_err(|_| EnrollError::Malformed("hashAlgoId out of range".into()))?;
        let hash_sz = c.u32().map_err(malformed)? as usize;
        if wire::digest_len(hash_alg).map_err(malformed)? != hash_sz {
            return Err(EnrollError::Malformed(
                "hashSz does not match hashAlgoId".into(),
            ));
        }
        let mut sizes = [0usize; 13];
        for s in sizes.iter_mut() {
            *s = c.u32().map_err(malformed)? as usize;
            if *s > MAX_FIELD {
                return Err(EnrollError::Malformed("field larger than 256 KiB".into()));
            }
        }
        let mut take = |n: usize| -> Result<Vec<u8>, EnrollError> {
            Ok(c.bytes(n).map_err(malformed)?.to_vec())
        };
        let text = |b: Vec<u8>, what: &str| {
            String::from_utf8(b).map_err(|_| EnrollError::Malformed(format!("{what} is not UTF-8")))
        };
        let req = IdevidRequest {
            hash_alg,
            prod_model: text(take(sizes[0])?, "prodModel")?,
            prod_serial: text(take(sizes[1])?, "prodSerial")?,
            prod_ca_data: take(sizes[2])?,
            boot_event_log: take(sizes[3])?,
            ek_cert: take(sizes[4])?,
            attest_pub: take(sizes[5])?,
            at_create_tkt: take(sizes[6])?,
            at_certify_info: take(sizes[7])?,
            at_certify_info_sig: take(sizes[8])?,
            signing_pub: take(sizes[9])?,
            sgn_certify_info: take(sizes[10])?,
            sgn_certify_info_sig: take(sizes[11])?,
        };
        let pad = take(sizes[12])?;
        if pad.iter().any(|b| *b != 0) {
            return Err(EnrollError::Malformed("non-zero padding".into()));
        }
        c.finish().map_err(malformed)?;
        Ok((req, content, signature))
    }
}

/// A request that passed every check but credential activation.
#[derive(Debug, Clone)]
pub struct VerifiedRequest {
    pub request: IdevidRequest,
    pub iak: Public,
    pub idevid: Public,
    /// The EK, rebuilt from the certificate's key and the TCG default EK template.
    pub ek: Public,
    /// The EK certificate's path above it (intermediates, then the vendor root).
    pub ek_issuers: Vec<Vec<u8>>,
}

/// The TCG EK Credential Profile's default low-range EK templates (L-1 RSA 2048, L-2 ECC NIST
/// P-256: TCG EK Credential Profile 2.5 §B.3.3, B.3.4) with the key of `spki_der`: the EK the
/// certificate names, as MakeCredential needs it.
pub fn ek_public_from_spki(spki_der: &[u8]) -> Result<Public, EnrollError> {
    use kame_api::keys::KeyInfo;
    let info = KeyInfo::from_spki_der(spki_der).map_err(|_| EnrollError::EkUnsupported)?;
    let attributes = attr::FIXED_TPM
        | attr::FIXED_PARENT
        | attr::SENSITIVE_DATA_ORIGIN
        | attr::ADMIN_WITH_POLICY
        | attr::RESTRICTED
        | attr::DECRYPT;
    let auth_policy = wire::policy::policy_secret_endorsement(wire::alg::SHA256)
        .map_err(|_| EnrollError::EkUnsupported)?;
    let symmetric = wire::public::SymDef {
        alg: wire::alg::AES,
        key_bits: 128,
        mode: wire::alg::CFB,
    };
    let null = wire::public::Scheme {
        scheme: wire::alg::NULL,
        hash: wire::alg::NULL,
        count: None,
    };
    let (params, unique) = match info {
        KeyInfo::Rsa { n, e } if n.len() == 256 && e == [1, 0, 1] => (
            wire::public::Params::Rsa {
                symmetric,
                scheme: null,
                key_bits: 2048,
                exponent: 0,
            },
            wire::public::Unique::Rsa(n),
        ),
        KeyInfo::EcP256(point) => (
            wire::public::Params::Ecc {
                symmetric,
                scheme: null,
                curve: wire::curve::NIST_P256,
                kdf: null,
            },
            wire::public::Unique::Ecc {
                x: point[1..33].to_vec(),
                y: point[33..65].to_vec(),
            },
        ),
        _ => return Err(EnrollError::EkUnsupported),
    };
    Ok(Public {
        name_alg: wire::alg::SHA256,
        attributes,
        auth_policy,
        params,
        unique,
    })
}

/// Every check of a TCG-CSR-IDEVID except credential activation (TCG DevID §6.2.2): the
/// IDevID key signed the request; the IAK is a restricted, TPM-fixed signing key; the IDevID
/// key is a TPM-fixed (not exportable), unrestricted signing key certified by the IAK
/// (TPM2_Certify); the EK certificate chains to one of `ek_roots` (TPM vendor CAs) through
/// `ek_intermediates`.
pub fn verify_idevid_request(
    bytes: &[u8],
    ek_roots: &[Vec<u8>],
    ek_intermediates: &[Vec<u8>],
    now: u64,
) -> Result<VerifiedRequest, EnrollError> {
    let (request, content, signature) = IdevidRequest::decode(bytes)?;
    for (f, what) in [
        (request.prod_model.as_bytes(), "prodModel"),
        (request.prod_serial.as_bytes(), "prodSerial"),
        (&request.ek_cert[..], "ekCert"),
        (&request.attest_pub[..], "attestPub (the IAK)"),
        (&request.signing_pub[..], "signingPub (the IDevID key)"),
        (&request.sgn_certify_info[..], "sgnCertifyInfo"),
        (&request.sgn_certify_info_sig[..], "sgnCertifyInfoSignature"),
    ] {
        if f.is_empty() {
            return Err(EnrollError::Missing(what));
        }
    }
    // The serial becomes a subject attribute and a selector: a value, never syntax.
    crate::profile::check_serial_number(&request.prod_serial).map_err(EnrollError::BadSerial)?;
    let idevid = Public::parse(&request.signing_pub).map_err(EnrollError::BadIdevid)?;
    // The request is the IDevID key's word before anything else is believed.
    attest::Signature::parse(&signature)
        .and_then(|s| s.verify(&idevid, &content))
        .map_err(EnrollError::BadRequestSignature)?;
    if idevid.attributes & (attr::FIXED_TPM | attr::FIXED_PARENT)
        != attr::FIXED_TPM | attr::FIXED_PARENT
    {
        return Err(EnrollError::IdevidExportable);
    }
    if idevid.attributes & attr::SIGN_ENCRYPT == 0
        || idevid.attributes & (attr::RESTRICTED | attr::DECRYPT) != 0
    {
        return Err(EnrollError::IdevidNotSigning);
    }
    let iak = Public::parse(&request.attest_pub).map_err(EnrollError::BadIak)?;
    if iak.attributes & (attr::RESTRICTED | attr::SIGN_ENCRYPT)
        != attr::RESTRICTED | attr::SIGN_ENCRYPT
        || iak.attributes & attr::DECRYPT != 0
    {
        return Err(EnrollError::IakNotRestricted);
    }
    if iak.attributes & (attr::FIXED_TPM | attr::FIXED_PARENT)
        != attr::FIXED_TPM | attr::FIXED_PARENT
    {
        return Err(EnrollError::IakNotFixed);
    }
    attest::verify_certify(
        &iak,
        &request.sgn_certify_info,
        &request.sgn_certify_info_sig,
        &idevid,
        &[],
    )
    .map_err(EnrollError::IdevidNotCertified)?;
    let path = crate::chain::verify_path(&request.ek_cert, ek_intermediates, ek_roots, now)
        .map_err(EnrollError::EkUntrusted)?;
    let ek_spki = kame_api::x509svid::ParsedCert::parse(&request.ek_cert)
        .and_then(|c| c.spki_der())
        .map_err(EnrollError::BadEkCert)?;
    let ek = ek_public_from_spki(&ek_spki)?;
    Ok(VerifiedRequest {
        request,
        iak,
        idevid,
        ek,
        ek_issuers: path.issuers,
    })
}

#[cfg(test)]
mod pending_tests;
