//! Certificate Transparency structures for Kame's issuance log, as RFC 6962 defines them (the
//! tree algorithms as RFC 9162 states them): Merkle tree hashes over SHA-256 with the 0x00 leaf
//! and 0x01 node prefixes, inclusion and consistency proofs (made from leaf hashes, and checked),
//! the `MerkleTreeLeaf` of each entry, signed certificate timestamps (SCTs) with the X.509
//! extension that carries them, and signed tree heads. X509-SVIDs are logged as RFC 6962
//! precertificate entries, so CT tools read them; Kame's other records (JWT-SVIDs, authority
//! changes, agent attestations) use entry types from the private range (0x8000 and up).
//!
//! Pure: no I/O and no private keys. Signing is the caller's (it signs the bytes
//! [`sct_signed_data`] and [`TreeHead::signed_data`] return); verifying takes a public key.

use aws_lc_rs::digest;
use thiserror::Error;

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// The X.509 extension that carries an SCT list in a certificate (RFC 6962 §3.3).
pub const SCT_LIST_OID: der::asn1::ObjectIdentifier =
    der::asn1::ObjectIdentifier::new_unwrap("1.3.6.1.4.1.11129.2.4.2");

/// RFC 6962 `Version`: v1.
const V1: u8 = 0;
/// `SignatureType.certificate_timestamp`.
const SIG_TYPE_CERTIFICATE_TIMESTAMP: u8 = 0;
/// `SignatureType.tree_hash`.
const SIG_TYPE_TREE_HASH: u8 = 1;
/// `MerkleLeafType.timestamped_entry`.
const LEAF_TYPE_TIMESTAMPED_ENTRY: u8 = 0;
/// RFC 5246 `HashAlgorithm.sha256`.
pub const HASH_SHA256: u8 = 4;
/// RFC 5246 `SignatureAlgorithm.rsa`.
pub const SIG_RSA: u8 = 1;
/// RFC 5246 `SignatureAlgorithm.ecdsa`.
pub const SIG_ECDSA: u8 = 3;
/// The largest `opaque <..2^24-1>` field.
const MAX_U24: usize = (1 << 24) - 1;
/// The most hashes a proof may hold: a tree of 2^64 leaves needs 64 (consistency: one more).
const MAX_PROOF: usize = 65;

/// What went wrong reading or checking a CT structure: one variant per failed check.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CtError {
    #[error("{0} is truncated")]
    Truncated(&'static str),
    #[error("{0} has bytes after its end")]
    TrailingBytes(&'static str),
    #[error("{what} is {len} bytes, more than its field allows")]
    TooLong { what: &'static str, len: usize },
    #[error("unsupported {what} {value}")]
    Unsupported { what: &'static str, value: u64 },
    #[error("leaf index {index} is not below the tree size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("tree size {old} is larger than tree size {new}")]
    SizesOutOfOrder { old: u64, new: u64 },
    #[error("the proof has the wrong number of hashes for this position and tree size")]
    ProofLength,
    #[error("the proof does not lead to the tree head's root hash")]
    RootMismatch,
    #[error("the proof does not lead to the older tree head's root hash")]
    OldRootMismatch,
    #[error("the signature is not made with SHA-256 and ECDSA or RSA")]
    SignatureAlgorithm,
    #[error("the signature does not verify with the log's key")]
    BadSignature,
    #[error("the SCT is from log {found}, not log {expected}")]
    WrongLog { expected: String, found: String },
    #[error("the SCT extension is not a DER OCTET STRING")]
    ExtensionEncoding,
    #[error("not a certificate: {0}")]
    Certificate(String),
    #[error("the certificate carries no SCT")]
    NoSct,
    #[error("{0}")]
    LogKey(String),
    #[error("the SCT is from log {0}, which is not a trusted log")]
    UnknownLog(String),
    #[error("JWT-SVID: {0}")]
    Jwt(String),
    #[error("a frontier of a tree of {size} entries does not have {count} hashes")]
    Frontier { size: u64, count: usize },
}

fn sha256(parts: &[&[u8]]) -> Hash {
    let mut c = digest::Context::new(&digest::SHA256);
    for p in parts {
        c.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(c.finish().as_ref());
    out
}

/// The hash of a leaf: SHA-256(0x00 || leaf input).
pub fn leaf_hash(leaf_input: &[u8]) -> Hash {
    sha256(&[&[0u8], leaf_input])
}

/// The hash of an inner node: SHA-256(0x01 || left || right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    sha256(&[&[1u8], left, right])
}

/// The root of the empty tree: SHA-256 of nothing.
pub fn empty_root() -> Hash {
    sha256(&[])
}

/// The largest power of two below `n` (n ≥ 2).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k << 1 < n {
        k <<= 1;
    }
    k
}

/// The Merkle tree hash (MTH) of leaves given by their leaf hashes.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The inclusion proof (audit path) of leaf `index` in the tree of `leaves`.
pub fn inclusion_proof(index: u64, leaves: &[Hash]) -> Result<Vec<Hash>, CtError> {
    let size = leaves.len() as u64;
    if index >= size {
        return Err(CtError::IndexOutOfRange { index, size });
    }
    let mut out = vec![];
    path(index as usize, leaves, &mut out);
    Ok(out)
}

fn path(m: usize, d: &[Hash], out: &mut Vec<Hash>) {
    let n = d.len();
    if n <= 1 {
        return;
    }
    let k = split(n);
    if m < k {
        path(m, &d[..k], out);
        out.push(root(&d[k..]));
    } else {
        path(m - k, &d[k..], out);
        out.push(root(&d[..k]));
    }
}

/// The consistency proof between the tree of the first `old_size` leaves and the tree of all
/// of `leaves`.
pub fn consistency_proof(old_size: u64, leaves: &[Hash]) -> Result<Vec<Hash>, CtError> {
    let new = leaves.len() as u64;
    if old_size > new {
        return Err(CtError::SizesOutOfOrder { old: old_size, new });
    }
    let mut out = vec![];
    if old_size == 0 || old_size == new {
        return Ok(out);
    }
    subproof(old_size as usize, leaves, true, &mut out);
    Ok(out)
}

fn subproof(m: usize, d: &[Hash], complete: bool, out: &mut Vec<Hash>) {
    let n = d.len();
    if m == n {
        if !complete {
            out.push(root(d));
        }
        return;
    }
    let k = split(n);
    if m <= k {
        subproof(m, &d[..k], complete, out);
        out.push(root(&d[k..]));
    } else {
        subproof(m - k, &d[k..], false, out);
        out.push(root(&d[..k]));
    }
}

/// Checks that the leaf with hash `leaf` sits at `index` in the tree of `size` leaves whose
/// root is `root` (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    leaf: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), CtError> {
    if index >= size {
        return Err(CtError::IndexOutOfRange { index, size });
    }
    if proof.len() > MAX_PROOF {
        return Err(CtError::ProofLength);
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s == 0 {
            return Err(CtError::ProofLength);
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(CtError::ProofLength);
    }
    if &r != root {
        return Err(CtError::RootMismatch);
    }
    Ok(())
}

/// Checks that the tree of `old_size` leaves with root `old_root` is a prefix of the tree of
/// `new_size` leaves with root `new_root` (RFC 9162 §2.1.4.2). Every tree extends the empty
/// one; a tree is consistent with itself when the roots are equal and the proof is empty.
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), CtError> {
    if old_size > new_size {
        return Err(CtError::SizesOutOfOrder {
            old: old_size,
            new: new_size,
        });
    }
    if old_size == 0 || old_size == new_size {
        if !proof.is_empty() {
            return Err(CtError::ProofLength);
        }
        if old_size == new_size && old_root != new_root {
            return Err(CtError::RootMismatch);
        }
        return Ok(());
    }
    if proof.is_empty() || proof.len() > MAX_PROOF {
        return Err(CtError::ProofLength);
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if old_size.is_power_of_two() {
        path.push(*old_root);
    }
    path.extend_from_slice(proof);
    let (mut f, mut s) = (old_size - 1, new_size - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if s == 0 {
            return Err(CtError::ProofLength);
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(CtError::ProofLength);
    }
    if &fr != old_root {
        return Err(CtError::OldRootMismatch);
    }
    if &sr != new_root {
        return Err(CtError::RootMismatch);
    }
    Ok(())
}

/// The right edge of a Merkle tree: the roots of its perfect subtrees, largest first. Enough
/// to append leaves and to compute the root without the leaves themselves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    /// One root per set bit of `size`, from the highest bit down.
    hashes: Vec<Hash>,
}

impl Frontier {
    /// The frontier of the tree of `leaves`.
    pub fn of(leaves: &[Hash]) -> Self {
        let mut f = Frontier::default();
        for l in leaves {
            f.push(*l);
        }
        f
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The roots of the perfect subtrees, largest first (one per set bit of the size): with
    /// the size, all a monitor keeps to go on from a tree head.
    pub fn hashes(&self) -> &[Hash] {
        &self.hashes
    }

    /// The frontier of a tree of `size` leaves from its [`Frontier::hashes`].
    pub fn from_parts(size: u64, hashes: Vec<Hash>) -> Result<Self, CtError> {
        if hashes.len() != size.count_ones() as usize {
            return Err(CtError::Frontier {
                size,
                count: hashes.len(),
            });
        }
        Ok(Frontier { size, hashes })
    }

    /// Appends a leaf (by its leaf hash).
    pub fn push(&mut self, leaf: Hash) {
        let mut h = leaf;
        let mut s = self.size;
        // Each trailing one bit of the old size is a subtree of the new leaf's size: merge.
        while s & 1 == 1 {
            if let Some(left) = self.hashes.pop() {
                h = node_hash(&left, &h);
            }
            s >>= 1;
        }
        self.hashes.push(h);
        self.size += 1;
    }

    /// The tree's root.
    pub fn root(&self) -> Hash {
        let mut it = self.hashes.iter().rev();
        let Some(first) = it.next() else {
            return empty_root();
        };
        it.fold(*first, |acc, left| node_hash(left, &acc))
    }
}

/// An RFC 6962 `LogEntryType`, with Kame's private types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryType {
    /// `x509_entry` (0): a certificate (Kame logs its CA certificates so).
    X509,
    /// `precert_entry` (1): an X509-SVID, its TBSCertificate without the SCT extension.
    Precert,
    /// A JWT-SVID: its header and claims (the signing input, `header.claims`), no signature.
    JwtSvid,
    /// A change of the server's signing authorities (prepare, activate, taint, revoke): JSON.
    Authority,
    /// An agent's node attestation: JSON.
    Attestation,
    /// A line of an agent's break-glass record, as the server received it: JSON.
    BreakGlass,
}

impl EntryType {
    pub fn code(self) -> u16 {
        match self {
            EntryType::X509 => 0,
            EntryType::Precert => 1,
            EntryType::JwtSvid => 0x8001,
            EntryType::Authority => 0x8002,
            EntryType::Attestation => 0x8003,
            EntryType::BreakGlass => 0x8004,
        }
    }

    pub fn from_code(c: u16) -> Result<Self, CtError> {
        Ok(match c {
            0 => EntryType::X509,
            1 => EntryType::Precert,
            0x8001 => EntryType::JwtSvid,
            0x8002 => EntryType::Authority,
            0x8003 => EntryType::Attestation,
            0x8004 => EntryType::BreakGlass,
            v => {
                return Err(CtError::Unsupported {
                    what: "log entry type",
                    value: v.into(),
                });
            }
        })
    }
}

/// What one log entry records (RFC 6962's `signed_entry`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A certificate, DER.
    X509(Vec<u8>),
    /// An X509-SVID: SHA-256 of its issuer's SubjectPublicKeyInfo, and its TBSCertificate
    /// without the SCT list extension.
    Precert { issuer_key_hash: Hash, tbs: Vec<u8> },
    /// One of Kame's records: its type (not X509 or Precert) and body.
    Kame { kind: EntryType, body: Vec<u8> },
}

impl Entry {
    pub fn entry_type(&self) -> EntryType {
        match self {
            Entry::X509(_) => EntryType::X509,
            Entry::Precert { .. } => EntryType::Precert,
            Entry::Kame { kind, .. } => *kind,
        }
    }

    /// `entry_type` then `signed_entry`, as in both the leaf and the SCT's signed data.
    fn encode_typed(&self, out: &mut Vec<u8>) -> Result<(), CtError> {
        out.extend_from_slice(&self.entry_type().code().to_be_bytes());
        match self {
            Entry::X509(cert) => put_u24(out, "certificate", cert),
            Entry::Precert {
                issuer_key_hash,
                tbs,
            } => {
                out.extend_from_slice(issuer_key_hash);
                put_u24(out, "TBSCertificate", tbs)
            }
            Entry::Kame { body, .. } => put_u24(out, "entry body", body),
        }
    }

    fn decode_typed(r: &mut Reader<'_>) -> Result<Self, CtError> {
        let kind = EntryType::from_code(r.u16()?)?;
        Ok(match kind {
            EntryType::X509 => Entry::X509(r.u24_bytes()?.to_vec()),
            EntryType::Precert => {
                let issuer_key_hash = r.array32()?;
                Entry::Precert {
                    issuer_key_hash,
                    tbs: r.u24_bytes()?.to_vec(),
                }
            }
            kind => Entry::Kame {
                kind,
                body: r.u24_bytes()?.to_vec(),
            },
        })
    }
}

/// A log entry as the tree holds it: RFC 6962's `MerkleTreeLeaf` (v1, timestamped entry, no
/// extensions); its encoding is the leaf input whose [`leaf_hash`] the tree is built from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// Milliseconds since the epoch: the SCT's timestamp.
    pub timestamp: u64,
    pub entry: Entry,
}

impl Leaf {
    pub fn encode(&self) -> Result<Vec<u8>, CtError> {
        leaf_input(self.timestamp, &self.entry)
    }

    pub fn decode(leaf_input: &[u8]) -> Result<Self, CtError> {
        let mut r = Reader::new(leaf_input, "MerkleTreeLeaf");
        let version = r.u8()?;
        if version != V1 {
            return Err(CtError::Unsupported {
                what: "leaf version",
                value: version.into(),
            });
        }
        let leaf_type = r.u8()?;
        if leaf_type != LEAF_TYPE_TIMESTAMPED_ENTRY {
            return Err(CtError::Unsupported {
                what: "leaf type",
                value: leaf_type.into(),
            });
        }
        let timestamp = r.u64()?;
        let entry = Entry::decode_typed(&mut r)?;
        let _extensions = r.u16_bytes()?;
        r.end()?;
        Ok(Leaf { timestamp, entry })
    }

    pub fn hash(&self) -> Result<Hash, CtError> {
        Ok(leaf_hash(&self.encode()?))
    }
}

/// The `MerkleTreeLeaf` encoding of `entry` logged at `timestamp` (what [`Leaf::encode`]
/// gives, without building a [`Leaf`]).
pub fn leaf_input(timestamp: u64, entry: &Entry) -> Result<Vec<u8>, CtError> {
    let body = match entry {
        Entry::X509(b) | Entry::Kame { body: b, .. } => b.len(),
        Entry::Precert { tbs, .. } => tbs.len() + 32,
    };
    let mut out = Vec::with_capacity(20 + body);
    out.extend_from_slice(&[V1, LEAF_TYPE_TIMESTAMPED_ENTRY]);
    out.extend_from_slice(&timestamp.to_be_bytes());
    entry.encode_typed(&mut out)?;
    out.extend_from_slice(&[0, 0]); // no extensions
    Ok(out)
}

/// The bytes an SCT's signature covers (RFC 6962 §3.2), no extensions.
pub fn sct_signed_data(timestamp: u64, entry: &Entry) -> Result<Vec<u8>, CtError> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&[V1, SIG_TYPE_CERTIFICATE_TIMESTAMP]);
    out.extend_from_slice(&timestamp.to_be_bytes());
    entry.encode_typed(&mut out)?;
    out.extend_from_slice(&[0, 0]);
    Ok(out)
}

/// A TLS `digitally-signed` value: the hash and signature algorithms, and the signature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DigitallySigned {
    pub hash_alg: u8,
    pub sig_alg: u8,
    pub signature: Vec<u8>,
}

impl DigitallySigned {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), CtError> {
        out.extend_from_slice(&[self.hash_alg, self.sig_alg]);
        put_u16(out, "signature", &self.signature)
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, CtError> {
        Ok(DigitallySigned {
            hash_alg: r.u8()?,
            sig_alg: r.u8()?,
            signature: r.u16_bytes()?.to_vec(),
        })
    }

    /// Checks the signature over `message` with the key in `spki_der` (SHA-256 with ECDSA,
    /// ASN.1 DER signature, or with RSA PKCS#1 v1.5: what RFC 6962 allows).
    pub fn verify(&self, spki_der: &[u8], message: &[u8]) -> Result<(), CtError> {
        let alg = match (self.hash_alg, self.sig_alg) {
            (HASH_SHA256, SIG_ECDSA) => crate::keys::OID_ECDSA_SHA256,
            (HASH_SHA256, SIG_RSA) => crate::keys::OID_RSA_SHA256,
            _ => return Err(CtError::SignatureAlgorithm),
        };
        crate::keys::verify_x509_signature(spki_der, &alg, None, message, &self.signature)
            .map_err(|_| CtError::BadSignature)
    }
}

/// A log's ID: SHA-256 of its public key's SubjectPublicKeyInfo.
pub fn log_id(spki_der: &[u8]) -> Hash {
    key_hash(spki_der)
}

/// SHA-256 of a SubjectPublicKeyInfo (a precertificate entry's `issuer_key_hash`).
pub fn key_hash(spki_der: &[u8]) -> Hash {
    sha256(&[spki_der])
}

/// A signed certificate timestamp (RFC 6962 §3.2), v1, no extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sct {
    pub log_id: Hash,
    /// Milliseconds since the epoch.
    pub timestamp: u64,
    pub signature: DigitallySigned,
}

impl Sct {
    pub fn encode(&self) -> Result<Vec<u8>, CtError> {
        let mut out = Vec::with_capacity(48 + 4 + self.signature.signature.len());
        out.push(V1);
        out.extend_from_slice(&self.log_id);
        out.extend_from_slice(&self.timestamp.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        self.signature.encode(&mut out)?;
        Ok(out)
    }

    pub fn decode(b: &[u8]) -> Result<Self, CtError> {
        let mut r = Reader::new(b, "SCT");
        let version = r.u8()?;
        if version != V1 {
            return Err(CtError::Unsupported {
                what: "SCT version",
                value: version.into(),
            });
        }
        let log_id = r.array32()?;
        let timestamp = r.u64()?;
        let _extensions = r.u16_bytes()?;
        let signature = DigitallySigned::decode(&mut r)?;
        r.end()?;
        Ok(Sct {
            log_id,
            timestamp,
            signature,
        })
    }

    /// Checks that this SCT is the log's (`spki_der`) promise to record `entry`.
    pub fn verify(&self, spki_der: &[u8], entry: &Entry) -> Result<(), CtError> {
        let expected = log_id(spki_der);
        if self.log_id != expected {
            return Err(CtError::WrongLog {
                expected: hex::encode(expected),
                found: hex::encode(self.log_id),
            });
        }
        self.signature
            .verify(spki_der, &sct_signed_data(self.timestamp, entry)?)
    }
}

/// The value (extnValue contents) of the SCT list extension: a DER OCTET STRING holding the
/// TLS-encoded `SignedCertificateTimestampList`.
pub fn sct_list_extension_value(scts: &[Sct]) -> Result<Vec<u8>, CtError> {
    use der::Encode;
    der::asn1::OctetString::new(sct_list(scts)?)
        .and_then(|o| o.to_der())
        .map_err(|_| CtError::ExtensionEncoding)
}

/// The SCTs in an SCT list extension's value.
pub fn parse_sct_list_extension(value: &[u8]) -> Result<Vec<Sct>, CtError> {
    use der::Decode;
    let octets = der::asn1::OctetString::from_der(value).map_err(|_| CtError::ExtensionEncoding)?;
    parse_sct_list(octets.as_bytes())
}

/// RFC 6962's TLS-encoded `SignedCertificateTimestampList`.
fn sct_list(scts: &[Sct]) -> Result<Vec<u8>, CtError> {
    let mut list = vec![];
    for s in scts {
        put_u16(&mut list, "SCT", &s.encode()?)?;
    }
    let mut tls = Vec::with_capacity(list.len() + 2);
    put_u16(&mut tls, "SCT list", &list)?;
    Ok(tls)
}

fn parse_sct_list(tls: &[u8]) -> Result<Vec<Sct>, CtError> {
    let mut r = Reader::new(tls, "SCT list");
    let list = r.u16_bytes()?;
    r.end()?;
    let mut r = Reader::new(list, "SCT list");
    let mut out = vec![];
    while !r.is_empty() {
        out.push(Sct::decode(r.u16_bytes()?)?);
    }
    Ok(out)
}

/// The claim that carries a JWT-SVID's SCTs: base64 (standard alphabet, padded) of RFC 6962's
/// TLS-encoded `SignedCertificateTimestampList`. A claim, not a header: JWT-SVIDs allow no
/// header but `alg`, `kid` and `typ` (JWT-02), and other claims are allowed (JWT-09).
pub const JWT_SCT_CLAIM: &str = "kame_scts";

/// The log entry of a JWT-SVID: its JWS signing input (`b64(header).b64(claims)`) before the
/// SCT claim is added, as bytes.
pub fn jwt_entry(signing_input: &str) -> Entry {
    Entry::Kame {
        kind: EntryType::JwtSvid,
        body: signing_input.as_bytes().to_vec(),
    }
}

fn jwt_bad(m: &str) -> CtError {
    CtError::Jwt(m.to_string())
}

/// Adds the SCT claim to a JWT-SVID's signing input: the claims' closing brace becomes
/// `,"kame_scts":"<base64>"}`, so that a verifier gets the logged claims back by taking that
/// suffix off, byte for byte, without re-encoding any JSON.
pub fn jwt_input_with_scts(signing_input: &str, scts: &[Sct]) -> Result<String, CtError> {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    let (header, payload) = signing_input
        .split_once('.')
        .ok_or_else(|| jwt_bad("the signing input has no claims"))?;
    let mut claims = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| jwt_bad("the claims are not base64url"))?;
    if claims.first() != Some(&b'{') || claims.pop() != Some(b'}') {
        return Err(jwt_bad("the claims are not a JSON object"));
    }
    if claims.len() > 1 {
        claims.push(b',');
    }
    claims.extend_from_slice(
        format!(
            "\"{JWT_SCT_CLAIM}\":\"{}\"}}",
            STANDARD.encode(sct_list(scts)?)
        )
        .as_bytes(),
    );
    Ok(format!("{header}.{}", URL_SAFE_NO_PAD.encode(claims)))
}

/// What a JWT-SVID (`header.claims.signature`, or its signing input) was logged as: its SCTs,
/// and the signing input without the SCT claim. The claim must be the last member of the
/// claims object, as [`jwt_input_with_scts`] writes it.
pub fn jwt_logged_input(token: &str) -> Result<(Vec<Sct>, String), CtError> {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    let mut parts = token.split('.');
    let (Some(header), Some(payload)) = (parts.next(), parts.next()) else {
        return Err(jwt_bad("not a JWS compact serialization"));
    };
    let claims = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| jwt_bad("the claims are not base64url"))?;
    let claims = std::str::from_utf8(&claims).map_err(|_| jwt_bad("the claims are not UTF-8"))?;
    let marker = format!("\"{JWT_SCT_CLAIM}\":\"");
    let Some(at) = claims.rfind(&marker) else {
        return Err(CtError::NoSct);
    };
    let value = claims[at + marker.len()..]
        .strip_suffix("\"}")
        .ok_or_else(|| jwt_bad("the SCT claim is not the last claim"))?;
    let list = STANDARD
        .decode(value)
        .map_err(|_| jwt_bad("the SCT claim is not base64"))?;
    let before = &claims[..at];
    let logged = if let Some(rest) = before.strip_suffix(',') {
        format!("{rest}}}")
    } else if before == "{" {
        "{}".to_string()
    } else {
        return Err(jwt_bad(
            "the SCT claim is not a member of the claims object",
        ));
    };
    Ok((
        parse_sct_list(&list)?,
        format!("{header}.{}", URL_SAFE_NO_PAD.encode(logged)),
    ))
}

/// Checks that a JWT-SVID carries an SCT from one of the logs whose public keys are
/// `log_keys` that verifies over the token as logged: what a validator that requires issuance
/// transparency checks (after, not instead of, the JWT-SVID's own validation). Returns that
/// SCT; else the reason the last candidate failed ([`CtError::NoSct`] without any).
pub fn check_jwt_sct(token: &str, log_keys: &[Vec<u8>]) -> Result<Sct, CtError> {
    let (scts, input) = jwt_logged_input(token)?;
    check_scts(scts, &jwt_entry(&input), log_keys)
}

/// The first of `scts` from one of `log_keys` whose signature verifies over `entry`.
fn check_scts(scts: Vec<Sct>, entry: &Entry, log_keys: &[Vec<u8>]) -> Result<Sct, CtError> {
    let mut last = CtError::NoSct;
    for sct in scts {
        let Some(key) = log_keys.iter().find(|k| log_id(k) == sct.log_id) else {
            last = CtError::UnknownLog(hex::encode(sct.log_id));
            continue;
        };
        match sct.verify(key, entry) {
            Ok(()) => return Ok(sct),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// What a certificate with embedded SCTs was logged as: its SCTs, and its precertificate entry
/// (the TBSCertificate without the SCT list extension, and the SHA-256 of the issuer's
/// SubjectPublicKeyInfo, `issuer_spki_der`), as a verifier rebuilds it from the certificate.
pub fn precert_entry(
    cert_der: &[u8],
    issuer_spki_der: &[u8],
) -> Result<(Vec<Sct>, Entry), CtError> {
    let bad = |m: &str| CtError::Certificate(m.to_string());
    let (tag, cert, _) = tlv(cert_der).ok_or_else(|| bad("not DER"))?;
    if tag != 0x30 {
        return Err(bad("not a SEQUENCE"));
    }
    let (tag, tbs, _) = tlv(cert).ok_or_else(|| bad("no TBSCertificate"))?;
    if tag != 0x30 {
        return Err(bad("the TBSCertificate is not a SEQUENCE"));
    }
    let sct_oid = crate::keys::der_tlv(0x06, SCT_LIST_OID.as_bytes());
    let mut body = Vec::with_capacity(tbs.len());
    let mut scts = None;
    let mut rest = tbs;
    while !rest.is_empty() {
        let (tag, content, whole) = tlv(rest).ok_or_else(|| bad("truncated TBSCertificate"))?;
        rest = &rest[whole.len()..];
        if tag != 0xa3 {
            body.extend_from_slice(whole);
            continue;
        }
        let (_, list, _) = tlv(content).ok_or_else(|| bad("bad extensions"))?;
        let mut kept = Vec::with_capacity(list.len());
        let mut exts = list;
        while !exts.is_empty() {
            let (_, ext, whole) = tlv(exts).ok_or_else(|| bad("bad extension"))?;
            exts = &exts[whole.len()..];
            if !ext.starts_with(&sct_oid) {
                kept.extend_from_slice(whole);
                continue;
            }
            let mut f = &ext[sct_oid.len()..];
            let (mut tag, mut value, mut w) = tlv(f).ok_or_else(|| bad("bad SCT extension"))?;
            if tag == 0x01 {
                f = &f[w.len()..];
                (tag, value, w) = tlv(f).ok_or_else(|| bad("bad SCT extension"))?;
            }
            if tag != 0x04 || w.len() != f.len() {
                return Err(CtError::ExtensionEncoding);
            }
            scts = Some(parse_sct_list_extension(value)?);
        }
        if !kept.is_empty() {
            body.extend(crate::keys::der_tlv(
                0xa3,
                &crate::keys::der_tlv(0x30, &kept),
            ));
        }
    }
    let scts = scts.ok_or(CtError::NoSct)?;
    Ok((
        scts,
        Entry::Precert {
            issuer_key_hash: key_hash(issuer_spki_der),
            tbs: crate::keys::der_tlv(0x30, &body),
        },
    ))
}

/// A log's public key from PEM text (a `PUBLIC KEY` block), as SubjectPublicKeyInfo DER; only
/// P-256, the key type a log signs with.
pub fn log_key_from_pem(text: &str) -> Result<Vec<u8>, CtError> {
    use base64::Engine;
    let body: String = text
        .lines()
        .skip_while(|l| l.trim() != "-----BEGIN PUBLIC KEY-----")
        .skip(1)
        .take_while(|l| l.trim() != "-----END PUBLIC KEY-----")
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .ok()
        .filter(|d| !d.is_empty())
        .ok_or(CtError::LogKey("not a PEM PUBLIC KEY".into()))?;
    match crate::keys::KeyInfo::from_spki_der(&der) {
        Ok(crate::keys::KeyInfo::EcP256(_)) => Ok(der),
        Ok(_) => Err(CtError::LogKey("a transparency log key is P-256".into())),
        Err(e) => Err(CtError::LogKey(e.to_string())),
    }
}

/// Checks that `leaf_der`, issued by the certificate whose SubjectPublicKeyInfo is
/// `issuer_spki_der`, carries an SCT from one of the logs whose public keys are `log_keys`
/// (SubjectPublicKeyInfo DER), and that its signature verifies over the certificate's
/// precertificate entry: what a verifier that requires issuance transparency checks. Returns
/// that SCT; else the reason the last candidate failed ([`CtError::NoSct`] without any).
pub fn check_embedded_sct(
    leaf_der: &[u8],
    issuer_spki_der: &[u8],
    log_keys: &[Vec<u8>],
) -> Result<Sct, CtError> {
    let (scts, entry) = precert_entry(leaf_der, issuer_spki_der)?;
    check_scts(scts, &entry, log_keys)
}

/// One DER TLV with a definite length: (tag, contents, the whole TLV).
pub(crate) fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)?;
    let (len, head) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | usize::from(*b.get(2 + i)?);
        }
        (len, 2 + n)
    };
    let end = head.checked_add(len)?;
    Some((tag, b.get(head..end)?, b.get(..end)?))
}

/// A tree head: what a signed tree head (STH) signs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeHead {
    pub tree_size: u64,
    /// Milliseconds since the epoch.
    pub timestamp: u64,
    pub root_hash: Hash,
}

impl TreeHead {
    /// The bytes the STH's signature covers (RFC 6962 §3.5).
    pub fn signed_data(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + 8 + 8 + 32);
        out.extend_from_slice(&[V1, SIG_TYPE_TREE_HASH]);
        out.extend_from_slice(&self.timestamp.to_be_bytes());
        out.extend_from_slice(&self.tree_size.to_be_bytes());
        out.extend_from_slice(&self.root_hash);
        out
    }
}

/// A tree head and the log's signature over it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedTreeHead {
    pub head: TreeHead,
    pub signature: DigitallySigned,
}

impl SignedTreeHead {
    /// The TLS encoding of the signature, as `get-sth` returns it (base64).
    pub fn signature_bytes(&self) -> Result<Vec<u8>, CtError> {
        let mut out = vec![];
        self.signature.encode(&mut out)?;
        Ok(out)
    }

    pub fn decode_signature(b: &[u8]) -> Result<DigitallySigned, CtError> {
        let mut r = Reader::new(b, "tree head signature");
        let s = DigitallySigned::decode(&mut r)?;
        r.end()?;
        Ok(s)
    }

    pub fn verify(&self, spki_der: &[u8]) -> Result<(), CtError> {
        self.signature.verify(spki_der, &self.head.signed_data())
    }
}

fn put_u16(out: &mut Vec<u8>, what: &'static str, b: &[u8]) -> Result<(), CtError> {
    let len = u16::try_from(b.len()).map_err(|_| CtError::TooLong { what, len: b.len() })?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(b);
    Ok(())
}

fn put_u24(out: &mut Vec<u8>, what: &'static str, b: &[u8]) -> Result<(), CtError> {
    if b.len() > MAX_U24 {
        return Err(CtError::TooLong { what, len: b.len() });
    }
    out.extend_from_slice(&(b.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(b);
    Ok(())
}

/// A bounds-checked reader of TLS-encoded fields.
struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8], what: &'static str) -> Self {
        Reader { b, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], CtError> {
        if self.b.len() < n {
            return Err(CtError::Truncated(self.what));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }

    fn u8(&mut self) -> Result<u8, CtError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, CtError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u64(&mut self) -> Result<u64, CtError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }

    fn array32(&mut self) -> Result<Hash, CtError> {
        let mut a = [0u8; 32];
        a.copy_from_slice(self.take(32)?);
        Ok(a)
    }

    fn u16_bytes(&mut self) -> Result<&'a [u8], CtError> {
        let n = self.u16()? as usize;
        self.take(n)
    }

    fn u24_bytes(&mut self) -> Result<&'a [u8], CtError> {
        let b = self.take(3)?;
        let n = (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]);
        self.take(n)
    }

    fn is_empty(&self) -> bool {
        self.b.is_empty()
    }

    fn end(&self) -> Result<(), CtError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(CtError::TrailingBytes(self.what))
        }
    }
}

#[cfg(test)]
mod tests;
