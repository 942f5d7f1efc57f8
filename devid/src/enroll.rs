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

const STRUCT_VER: u32 = 0x0000_0100;
/// No field of a request may be larger than this, nor the whole request larger than 1 MiB.
const MAX_FIELD: usize = 256 * 1024;
const MAX_REQUEST: usize = 1024 * 1024;

/// Why an enrollment request was refused, one variant per check.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("malformed TCG-CSR-IDEVID: {0}")]
    Malformed(String),
    #[error("prodSerial: {0}")]
    BadSerial(String),
    #[error("the request lacks {0}")]
    Missing(&'static str),
    #[error("IAK public area: {0}")]
    BadIak(String),
    #[error("the IAK is not a restricted signing key (TCG DevID §7.3.4.1: restricted, sign)")]
    IakNotRestricted,
    #[error("the IAK is not fixedTPM and fixedParent: it could leave the TPM")]
    IakNotFixed,
    #[error("IDevID public area: {0}")]
    BadIdevid(String),
    #[error("the IDevID key is exportable (not fixedTPM and fixedParent)")]
    IdevidExportable,
    #[error("the IDevID key is not an unrestricted signing key")]
    IdevidNotSigning,
    #[error("the request is not signed by its IDevID key: {0}")]
    BadRequestSignature(String),
    #[error("the IDevID is not certified by the IAK: {0}")]
    IdevidNotCertified(String),
    #[error("the EK certificate does not chain to a trusted TPM vendor CA: {0}")]
    EkUntrusted(String),
    #[error("the EK certificate's key is not a supported EK (RSA 2048 or ECC NIST P-256)")]
    EkUnsupported,
    #[error("credential activation: {0}")]
    Credential(String),
    #[error("unknown, expired or already answered enrollment challenge")]
    UnknownChallenge,
    #[error("the challenge answer is wrong: the IAK is not resident with the EK")]
    WrongAnswer,
    #[error("not a sealed certificate file: {0}")]
    SealedMalformed(String),
    #[error(
        "the sealed certificates do not open with this TPM's answer: sealed for another TPM, or altered"
    )]
    SealedForAnotherTpm,
    #[error(
        "too many pending enrollments {0}; answer the outstanding ones or let them expire ({1} s)"
    )]
    TooManyPending(&'static str, u64),
}

fn malformed(e: impl std::fmt::Display) -> EnrollError {
    EnrollError::Malformed(e.to_string())
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
    crate::profile::check_serial_number(&request.prod_serial)
        .map_err(|e| EnrollError::BadSerial(e.to_string()))?;
    let idevid =
        Public::parse(&request.signing_pub).map_err(|e| EnrollError::BadIdevid(e.to_string()))?;
    // The request is the IDevID key's word before anything else is believed.
    attest::Signature::parse(&signature)
        .and_then(|s| s.verify(&idevid, &content))
        .map_err(|e| EnrollError::BadRequestSignature(e.to_string()))?;
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
    let iak = Public::parse(&request.attest_pub).map_err(|e| EnrollError::BadIak(e.to_string()))?;
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
    .map_err(|e| EnrollError::IdevidNotCertified(e.to_string()))?;
    let path = crate::chain::verify_path(&request.ek_cert, ek_intermediates, ek_roots, now)
        .map_err(|e| EnrollError::EkUntrusted(e.to_string()))?;
    let ek_spki = kame_api::x509svid::ParsedCert::parse(&request.ek_cert)
        .and_then(|c| c.spki_der())
        .map_err(|e| EnrollError::EkUntrusted(e.to_string()))?;
    let ek = ek_public_from_spki(&ek_spki)?;
    Ok(VerifiedRequest {
        request,
        iak,
        idevid,
        ek,
        ek_issuers: path.issuers,
    })
}

/// A credential activation challenge for a device: TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET
/// for TPM2_ActivateCredential with the IAK under the EK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub id: String,
    pub credential_blob: Vec<u8>,
    pub encrypted_secret: Vec<u8>,
}

/// How many credential activation challenges may wait for an answer. Everything before the
/// challenge can be made in software from a public EK certificate, so what unauthenticated
/// peers leave pending is bounded three ways: one challenge per EK (a newer request for the
/// same EK replaces the older), at most `per_peer` for one peer (an IPv4 address or an IPv6
/// /64), and at most `total` in all, where a full table makes room by dropping the oldest
/// challenge of the peer that holds the most: no peer can lock the others out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingLimits {
    pub total: usize,
    pub per_peer: usize,
}

impl Default for PendingLimits {
    fn default() -> Self {
        PendingLimits {
            total: 4096,
            per_peer: 64,
        }
    }
}

struct PendingEntry<V> {
    value: V,
    peer: String,
    /// What identifies the requester beyond the peer (the EK): one entry each.
    key: Vec<u8>,
    created: Instant,
    expires: Instant,
}

/// Single-use values by id, each for a while, within [`PendingLimits`].
struct PendingTable<V> {
    ttl: Duration,
    limits: PendingLimits,
    entries: HashMap<String, PendingEntry<V>>,
}

impl<V> PendingTable<V> {
    fn new(ttl: Duration, limits: PendingLimits) -> Self {
        PendingTable {
            ttl,
            limits,
            entries: HashMap::new(),
        }
    }

    /// Drops what expired; refuses when `peer` already holds its share.
    fn room(&mut self, peer: &str, now: Instant) -> Result<(), EnrollError> {
        self.entries.retain(|_, e| e.expires > now);
        let mine = self.entries.values().filter(|e| e.peer == peer).count();
        if mine >= self.limits.per_peer {
            return Err(EnrollError::TooManyPending(
                "from this address",
                self.ttl.as_secs(),
            ));
        }
        Ok(())
    }

    fn insert(
        &mut self,
        id: String,
        value: V,
        peer: &str,
        key: Vec<u8>,
    ) -> Result<(), EnrollError> {
        let now = Instant::now();
        self.entries.retain(|_, e| e.key != key);
        self.room(peer, now)?;
        if self.entries.len() >= self.limits.total {
            self.evict_from_heaviest_peer();
        }
        self.entries.insert(
            id,
            PendingEntry {
                value,
                peer: peer.to_string(),
                key,
                created: now,
                expires: now + self.ttl,
            },
        );
        Ok(())
    }

    /// Drops the oldest entry of the peer holding the most.
    fn evict_from_heaviest_peer(&mut self) {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for e in self.entries.values() {
            *counts.entry(e.peer.as_str()).or_default() += 1;
        }
        let Some(heaviest) = counts
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map(|(p, _)| p.to_string())
        else {
            return;
        };
        let oldest = self
            .entries
            .iter()
            .filter(|(_, e)| e.peer == heaviest)
            .min_by_key(|(_, e)| e.created)
            .map(|(id, _)| id.clone());
        if let Some(id) = oldest {
            self.entries.remove(&id);
        }
    }

    fn take(&mut self, id: &str) -> Option<V> {
        self.entries
            .remove(id)
            .filter(|e| e.expires > Instant::now())
            .map(|e| e.value)
    }
}

struct Pending {
    secret: Vec<u8>,
    request: VerifiedRequest,
}

/// Outstanding challenges: each answered at most once, within its lifetime. An answer to an
/// unknown, expired, replaced or already used challenge is refused (a replay).
pub struct Challenges {
    table: Mutex<PendingTable<Pending>>,
}

impl std::fmt::Debug for Challenges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Challenges").finish_non_exhaustive()
    }
}

fn random(n: usize) -> Result<Vec<u8>, EnrollError> {
    let mut b = vec![0u8; n];
    aws_lc_rs::rand::fill(&mut b)
        .map_err(|_| EnrollError::Credential("the random number generator failed".into()))?;
    Ok(b)
}

/// The peer a request without an address (a local socket, an in-process call) counts as.
pub const LOCAL_PEER: &str = "local";

impl Challenges {
    pub fn new(ttl: Duration) -> Self {
        Self::with_limits(ttl, PendingLimits::default())
    }

    pub fn with_limits(ttl: Duration, limits: PendingLimits) -> Self {
        Challenges {
            table: Mutex::new(PendingTable::new(ttl, limits)),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, PendingTable<Pending>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `peer` may have another challenge now (checked again when it is issued): lets
    /// a caller refuse before it verifies a request.
    pub fn has_room(&self, peer: &str) -> Result<(), EnrollError> {
        self.table().room(peer, Instant::now())
    }

    /// A challenge that only the TPM holding both the EK and the IAK can answer, held for
    /// `peer` ([`LOCAL_PEER`] without an address). It replaces any challenge still pending
    /// for the same EK.
    pub fn issue(&self, request: VerifiedRequest, peer: &str) -> Result<Challenge, EnrollError> {
        self.has_room(peer)?;
        let secret = random(32)?;
        let iak_name = request
            .iak
            .name()
            .map_err(|e| EnrollError::Credential(e.to_string()))?;
        let cred = credential::make_credential(&request.ek, &secret, &iak_name)
            .map_err(|e| EnrollError::Credential(e.to_string()))?;
        let ek = request
            .ek
            .spki_der()
            .map_err(|e| EnrollError::Credential(e.to_string()))?;
        let id = hex_id(&random(16)?);
        self.table()
            .insert(id.clone(), Pending { secret, request }, peer, ek)?;
        Ok(Challenge {
            id,
            credential_blob: cred.credential_blob,
            encrypted_secret: cred.secret,
        })
    }

    /// Takes the answer to challenge `id`: the request it was issued for when `secret` is the
    /// one made for it (compared in constant time). The challenge is spent either way.
    pub fn answer(&self, id: &str, secret: &[u8]) -> Result<VerifiedRequest, EnrollError> {
        let pending = self.table().take(id).ok_or(EnrollError::UnknownChallenge)?;
        use subtle::ConstantTimeEq;
        if pending.secret.ct_eq(secret).into() {
            Ok(pending.request)
        } else {
            Err(EnrollError::WrongAnswer)
        }
    }
}

fn hex_id(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An LDevID enrollment request: the device's IDevID and IAK (certificates from the
/// manufacturer CA and their TPM public areas), the new LDevID key's public area, its
/// TPM2_Certify by the IAK over the owner CA's nonce, and the IDevID's signature over that
/// certify (the IDevID holder takes part in this enrollment).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LdevidRequest {
    pub idevid_cert: Vec<u8>,
    pub iak_cert: Vec<u8>,
    pub idevid_pub: Vec<u8>,
    pub iak_pub: Vec<u8>,
    pub ldevid_pub: Vec<u8>,
    /// TPMS_ATTEST of TPM2_Certify(LDevID key) by the IAK, extraData = the nonce.
    pub certify_info: Vec<u8>,
    pub certify_sig: Vec<u8>,
    /// TPMT_SIGNATURE by the IDevID key over `certify_info`.
    pub idevid_sig: Vec<u8>,
}

/// Why an LDevID request was refused (beyond the shared [`EnrollError`] checks).
#[derive(Debug, thiserror::Error)]
pub enum LdevidError {
    #[error("the {0} certificate does not chain to a trusted manufacturer CA: {1}")]
    Untrusted(&'static str, String),
    #[error("the {0} certificate does not follow the DevID profile: {1}")]
    Profile(&'static str, String),
    #[error("the IAK and IDevID certificates name different devices")]
    DeviceMismatch,
    #[error("the {0} public area is not the key of its certificate")]
    KeyMismatch(&'static str),
    #[error(transparent)]
    Enroll(#[from] EnrollError),
}

/// What an owner CA certifies after [`verify_ldevid_request`].
#[derive(Debug, Clone)]
pub struct VerifiedLdevid {
    pub ldevid: Public,
    pub device: crate::profile::DevIdInfo,
}

/// The owner CA's checks of an LDevID request bound to `nonce` (single use, the caller's):
/// IDevID and IAK certificates chain to `manufacturer_roots`, follow the profile and name the
/// same device; the public areas are their keys; the IAK is restricted and certified the new
/// key over the nonce; the IDevID key signed that certify; the new key is TPM-fixed and an
/// unrestricted signing key.
pub fn verify_ldevid_request(
    req: &LdevidRequest,
    nonce: &[u8],
    manufacturer_roots: &[Vec<u8>],
    now: u64,
) -> Result<VerifiedLdevid, LdevidError> {
    use crate::profile::{DevIdKind, check_devid_cert};
    for (cert, what) in [(&req.idevid_cert, "IDevID"), (&req.iak_cert, "IAK")] {
        crate::chain::verify(cert, &[], manufacturer_roots, now)
            .map_err(|e| LdevidError::Untrusted(what, e.to_string()))?;
    }
    let device = check_devid_cert(&req.idevid_cert, DevIdKind::IDevId)
        .map_err(|e| LdevidError::Profile("IDevID", e.to_string()))?;
    let iak_info = check_devid_cert(&req.iak_cert, DevIdKind::Iak)
        .map_err(|e| LdevidError::Profile("IAK", e.to_string()))?;
    if iak_info != device {
        return Err(LdevidError::DeviceMismatch);
    }
    // The serial goes into the LDevID's subject as the manufacturer certified it (a typed
    // value, never parsed).
    crate::profile::check_certified_serial_number(&device.serial_number)
        .map_err(|e| LdevidError::Profile("IDevID", e.to_string()))?;
    let parse = |b: &[u8]| Public::parse(b);
    let idevid = parse(&req.idevid_pub).map_err(|e| EnrollError::BadIdevid(e.to_string()))?;
    let iak = parse(&req.iak_pub).map_err(|e| EnrollError::BadIak(e.to_string()))?;
    for (p, cert, what) in [
        (&idevid, &req.idevid_cert, "IDevID"),
        (&iak, &req.iak_cert, "IAK"),
    ] {
        let spki = p.spki_der().map_err(|_| LdevidError::KeyMismatch(what))?;
        let cert_spki = kame_api::x509svid::ParsedCert::parse(cert)
            .and_then(|c| c.spki_der())
            .map_err(|_| LdevidError::KeyMismatch(what))?;
        if spki != cert_spki {
            return Err(LdevidError::KeyMismatch(what));
        }
    }
    if iak.attributes & (attr::RESTRICTED | attr::SIGN_ENCRYPT)
        != attr::RESTRICTED | attr::SIGN_ENCRYPT
    {
        return Err(EnrollError::IakNotRestricted.into());
    }
    let ldevid = parse(&req.ldevid_pub).map_err(|e| EnrollError::BadIdevid(e.to_string()))?;
    attest::verify_certify(&iak, &req.certify_info, &req.certify_sig, &ldevid, nonce)
        .map_err(|e| EnrollError::IdevidNotCertified(e.to_string()))?;
    attest::Signature::parse(&req.idevid_sig)
        .and_then(|s| s.verify(&idevid, &req.certify_info))
        .map_err(|e| EnrollError::BadRequestSignature(e.to_string()))?;
    if ldevid.attributes & (attr::FIXED_TPM | attr::FIXED_PARENT)
        != attr::FIXED_TPM | attr::FIXED_PARENT
    {
        return Err(EnrollError::IdevidExportable.into());
    }
    if ldevid.attributes & attr::SIGN_ENCRYPT == 0
        || ldevid.attributes & (attr::RESTRICTED | attr::DECRYPT) != 0
    {
        return Err(EnrollError::IdevidNotSigning.into());
    }
    Ok(VerifiedLdevid { ldevid, device })
}

/// Single-use nonces for LDevID enrollment, each valid for a while. Issuing one keeps no
/// state: the id carries its expiry and the nonce is an HMAC of the id under a key of this
/// CA's, so unauthenticated BeginLdevid calls cost nothing to hold. Only a nonce spent by a
/// request that passed every check is remembered (until it expires), to refuse its replay.
pub struct Nonces {
    ttl: Duration,
    key: aws_lc_rs::hmac::Key,
    spent: Mutex<HashMap<String, u64>>,
}

impl std::fmt::Debug for Nonces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nonces")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// Most spent nonces remembered: each is a request that passed every check.
const MAX_SPENT: usize = 65_536;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Nonces {
    pub fn new(ttl: Duration) -> Result<Self, EnrollError> {
        let key = zeroize::Zeroizing::new(random(32)?);
        Ok(Nonces {
            ttl,
            key: aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &key),
            spent: Mutex::new(HashMap::new()),
        })
    }

    fn nonce_for(&self, id: &str) -> Vec<u8> {
        aws_lc_rs::hmac::sign(&self.key, id.as_bytes())
            .as_ref()
            .to_vec()
    }

    /// A fresh (id, nonce).
    pub fn issue(&self) -> Result<(String, Vec<u8>), EnrollError> {
        let mut raw = random(16)?;
        raw.extend_from_slice(&(unix_now() + self.ttl.as_secs()).to_be_bytes());
        let id = hex_id(&raw);
        let nonce = self.nonce_for(&id);
        Ok((id, nonce))
    }

    /// The expiry an id of ours carries: 16 random bytes then the expiry, in lower-case hex.
    fn expiry_of(id: &str) -> Result<u64, EnrollError> {
        let b = id.as_bytes();
        if b.len() != 48
            || !b
                .iter()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
        {
            return Err(EnrollError::UnknownChallenge);
        }
        id.get(32..)
            .and_then(|e| u64::from_str_radix(e, 16).ok())
            .ok_or(EnrollError::UnknownChallenge)
    }

    /// The nonce of `id` if this CA issued it, it has not expired and it is not spent.
    pub fn nonce(&self, id: &str) -> Result<Vec<u8>, EnrollError> {
        let expiry = Self::expiry_of(id)?;
        let now = unix_now();
        if now >= expiry || expiry > now + self.ttl.as_secs() {
            return Err(EnrollError::UnknownChallenge);
        }
        if self.spent_ids().contains_key(id) {
            return Err(EnrollError::UnknownChallenge);
        }
        Ok(self.nonce_for(id))
    }

    fn spent_ids(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.spent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `id` used (after the request bound to it passed every check): a second use, or
    /// a concurrent one, is refused.
    pub fn spend(&self, id: &str) -> Result<(), EnrollError> {
        self.nonce(id)?;
        let expiry = Self::expiry_of(id)?;
        let now = unix_now();
        let mut spent = self.spent_ids();
        spent.retain(|_, exp| *exp > now);
        if spent.len() >= MAX_SPENT {
            return Err(EnrollError::TooManyPending("in all", self.ttl.as_secs()));
        }
        if spent.insert(id.to_string(), expiry).is_some() {
            return Err(EnrollError::UnknownChallenge);
        }
        Ok(())
    }

    /// [`Nonces::nonce`] and [`Nonces::spend`] at once.
    pub fn take(&self, id: &str) -> Result<Vec<u8>, EnrollError> {
        let n = self.nonce(id)?;
        self.spend(id)?;
        Ok(n)
    }
}

#[cfg(test)]
mod pending_tests {
    use super::*;
    use crate::testing::{SoftCa, SoftDevice};
    use std::sync::Arc;

    fn now() -> u64 {
        unix_now()
    }

    /// Issue 19 item 8: one challenge per EK, `per_peer` per peer, and a full table makes
    /// room at the expense of the peer holding the most.
    #[test]
    fn enroll_pending_challenges_one_per_ek_capped_per_peer_never_locked_out() {
        let ek_ca = Arc::new(SoftCa::root("O=Vendor, CN=EK CA"));
        let roots = vec![ek_ca.cert.clone()];
        let verified = |serial: &str| {
            let d = SoftDevice::under(ek_ca.clone(), serial);
            let bytes = d.sign_request(&d.idevid_request()).unwrap();
            (
                d,
                verify_idevid_request(&bytes, &roots, &[], now()).unwrap(),
            )
        };
        let limits = PendingLimits {
            total: 4,
            per_peer: 3,
        };
        let c = Challenges::with_limits(Duration::from_secs(60), limits);
        // The same EK again: the newer challenge replaces the older.
        let (d1, v) = verified("SN-1");
        let first = c.issue(v, "10.0.0.1").unwrap();
        let bytes = d1.sign_request(&d1.idevid_request()).unwrap();
        let again = verify_idevid_request(&bytes, &roots, &[], now()).unwrap();
        let second = c.issue(again, "10.0.0.1").unwrap();
        assert!(matches!(
            c.answer(&first.id, &[0; 32]),
            Err(EnrollError::UnknownChallenge)
        ));
        assert!(matches!(
            c.answer(&second.id, &[0; 32]),
            Err(EnrollError::WrongAnswer)
        ));
        // Three per peer.
        let oldest = c.issue(verified("SN-2").1, "10.0.0.1").unwrap();
        std::thread::sleep(Duration::from_millis(2));
        let younger = c.issue(verified("SN-3").1, "10.0.0.1").unwrap();
        c.issue(verified("SN-4").1, "10.0.0.1").unwrap();
        assert!(matches!(
            c.issue(verified("SN-5").1, "10.0.0.1"),
            Err(EnrollError::TooManyPending("from this address", 60))
        ));
        // Full (three of 10.0.0.1, one of 10.0.0.2): a third peer still gets in, and the
        // challenge that makes room is the oldest of the peer holding the most.
        let light = c.issue(verified("SN-6").1, "10.0.0.2").unwrap();
        let newcomer = c.issue(verified("SN-7").1, "10.0.0.3").unwrap();
        assert_eq!(c.table().entries.len(), 4);
        assert!(matches!(
            c.answer(&oldest.id, &[0; 32]),
            Err(EnrollError::UnknownChallenge)
        ));
        for live in [&younger, &light, &newcomer] {
            assert!(matches!(
                c.answer(&live.id, &[0; 32]),
                Err(EnrollError::WrongAnswer)
            ));
        }
    }

    #[test]
    fn enroll_ldevid_nonces_are_stateless_single_use_and_expire() {
        let n = Nonces::new(Duration::from_secs(300)).unwrap();
        for _ in 0..10_000 {
            n.issue().unwrap();
        }
        assert!(n.spent_ids().is_empty(), "issuing keeps nothing");
        let (id, nonce) = n.issue().unwrap();
        assert_eq!(n.nonce(&id).unwrap(), nonce);
        n.spend(&id).unwrap();
        assert!(matches!(n.nonce(&id), Err(EnrollError::UnknownChallenge)));
        assert!(matches!(n.spend(&id), Err(EnrollError::UnknownChallenge)));
        // Another CA's id, a forged expiry, garbage: unknown.
        let other = Nonces::new(Duration::from_secs(300)).unwrap();
        let (oid, onc) = other.issue().unwrap();
        assert_ne!(
            n.nonce(&oid).unwrap(),
            onc,
            "only the issuing CA knows the nonce"
        );
        let far = format!("{}{:016x}", &oid[..32], unix_now() + 10_000);
        assert!(n.nonce(&far).is_err(), "an expiry beyond the TTL");
        let past = format!("{}{:016x}", &oid[..32], unix_now() - 1);
        assert!(n.nonce(&past).is_err(), "expired");
        for bad in [
            "",
            "zz",
            &"0".repeat(48),
            &"G".repeat(48),
            &"é".repeat(24),
            &"€".repeat(16),
        ] {
            assert!(n.nonce(bad).is_err(), "{bad:?}");
        }
    }
}

/// Offline issuance (`kame-devid ca issue`), the TCG's other enrollment route: instead of a
/// challenge round, the CA seals the certificates it issued for a verified request under a
/// fresh key that it sends as a credential for the IAK under the EK (TPM2_MakeCredential), so
/// that only the TPM holding both recovers the key (TPM2_ActivateCredential) and reads them.
/// AES-256-GCM; the file is `KAMESEAL1` then four TPM2B fields: credential blob, encrypted
/// secret, GCM nonce, ciphertext of the TPM2B-framed DER certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub credential_blob: Vec<u8>,
    pub encrypted_secret: Vec<u8>,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

const SEALED_MAGIC: &[u8] = b"KAMESEAL1";

fn put_tpm2b(out: &mut Vec<u8>, b: &[u8]) -> Result<(), EnrollError> {
    wire::put_tpm2b(out, b).map_err(|e| EnrollError::SealedMalformed(e.to_string()))
}

impl Sealed {
    /// Seals `certs` (DER) for the TPM that made `request`.
    pub fn seal(request: &VerifiedRequest, certs: &[&[u8]]) -> Result<Sealed, EnrollError> {
        use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
        let key = zeroize::Zeroizing::new(random(32)?);
        let iak_name = request
            .iak
            .name()
            .map_err(|e| EnrollError::Credential(e.to_string()))?;
        let cred = credential::make_credential(&request.ek, &key, &iak_name)
            .map_err(|e| EnrollError::Credential(e.to_string()))?;
        let mut plain = vec![];
        for c in certs {
            put_tpm2b(&mut plain, c)?;
        }
        let nonce = random(12)?;
        let n = Nonce::try_assume_unique_for_key(&nonce)
            .map_err(|_| EnrollError::Credential("GCM nonce".into()))?;
        let sealing = UnboundKey::new(&AES_256_GCM, &key)
            .map(LessSafeKey::new)
            .map_err(|_| EnrollError::Credential("AES key".into()))?;
        sealing
            .seal_in_place_append_tag(n, Aad::from(SEALED_MAGIC), &mut plain)
            .map_err(|_| EnrollError::Credential("AES-GCM seal failed".into()))?;
        Ok(Sealed {
            credential_blob: cred.credential_blob,
            encrypted_secret: cred.secret,
            nonce,
            ciphertext: plain,
        })
    }

    /// The DER certificates, with the key TPM2_ActivateCredential recovered.
    pub fn open(&self, key: &[u8]) -> Result<Vec<Vec<u8>>, EnrollError> {
        use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
        let opening = UnboundKey::new(&AES_256_GCM, key)
            .map(LessSafeKey::new)
            .map_err(|_| EnrollError::SealedForAnotherTpm)?;
        let n = Nonce::try_assume_unique_for_key(&self.nonce)
            .map_err(|_| EnrollError::SealedMalformed("the nonce is not 12 bytes".into()))?;
        let mut buf = self.ciphertext.clone();
        let plain = opening
            .open_in_place(n, Aad::from(SEALED_MAGIC), &mut buf)
            .map_err(|_| EnrollError::SealedForAnotherTpm)?;
        let mut r = wire::Reader::new(plain, "sealed certificates");
        let mut out = vec![];
        while r.remaining() > 0 {
            out.push(
                r.tpm2b()
                    .map_err(|e| EnrollError::SealedMalformed(e.to_string()))?
                    .to_vec(),
            );
        }
        Ok(out)
    }

    pub fn encode(&self) -> Result<Vec<u8>, EnrollError> {
        let mut out = SEALED_MAGIC.to_vec();
        for f in [
            &self.credential_blob,
            &self.encrypted_secret,
            &self.nonce,
            &self.ciphertext,
        ] {
            put_tpm2b(&mut out, f)?;
        }
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<Sealed, EnrollError> {
        let body = bytes
            .strip_prefix(SEALED_MAGIC)
            .ok_or_else(|| EnrollError::SealedMalformed("no KAMESEAL1 header".into()))?;
        let bad = |e: wire::Error| EnrollError::SealedMalformed(e.to_string());
        let mut r = wire::Reader::new(body, "sealed certificates");
        let mut field = || r.tpm2b().map(|b| b.to_vec()).map_err(bad);
        let s = Sealed {
            credential_blob: field()?,
            encrypted_secret: field()?,
            nonce: field()?,
            ciphertext: field()?,
        };
        r.finish().map_err(bad)?;
        Ok(s)
    }
}
