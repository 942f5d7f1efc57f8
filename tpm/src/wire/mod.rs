//! TPM 2.0 wire structures (TPM 2.0 Library Part 2) parsed and marshaled in pure Rust. Parsers
//! take untrusted bytes: every read is bounds-checked, sizes are validated, and any malformed
//! input is an [`Error`], never a panic. No I/O.

pub mod attest;
pub mod credential;
pub mod policy;
pub mod public;

pub use attest::{Attest, AttestBody, ClockInfo, PcrSelection, Signature};
pub use public::Public;

/// TPM_ALG_ID values used here.
pub mod alg {
    pub const RSA: u16 = 0x0001;
    pub const SHA1: u16 = 0x0004;
    pub const HMAC: u16 = 0x0005;
    pub const AES: u16 = 0x0006;
    pub const KEYEDHASH: u16 = 0x0008;
    pub const SHA256: u16 = 0x000B;
    pub const SHA384: u16 = 0x000C;
    pub const SHA512: u16 = 0x000D;
    pub const NULL: u16 = 0x0010;
    pub const RSASSA: u16 = 0x0014;
    pub const RSAES: u16 = 0x0015;
    pub const RSAPSS: u16 = 0x0016;
    pub const OAEP: u16 = 0x0017;
    pub const ECDSA: u16 = 0x0018;
    pub const ECDH: u16 = 0x0019;
    pub const ECDAA: u16 = 0x001A;
    pub const KDF1_SP800_56A: u16 = 0x0020;
    pub const ECC: u16 = 0x0023;
    pub const SYMCIPHER: u16 = 0x0025;
    pub const CFB: u16 = 0x0043;
}

/// TPM_ECC_CURVE values.
pub mod curve {
    pub const NIST_P256: u16 = 0x0003;
    pub const NIST_P384: u16 = 0x0004;
}

/// Why bytes are not the TPM structure they claim to be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{0}: input is truncated")]
    Truncated(&'static str),
    #[error("{0}: {1} unexpected trailing bytes")]
    Trailing(&'static str, usize),
    #[error("{what}: unsupported value 0x{value:04x}")]
    Unsupported { what: &'static str, value: u32 },
    #[error("{0}")]
    Invalid(String),
    #[error("attestation magic is 0x{0:08x}, not TPM_GENERATED_VALUE")]
    BadMagic(u32),
    #[error("attestation type is 0x{got:04x}, expected 0x{want:04x}")]
    WrongType { got: u16, want: u16 },
    #[error("extraData does not match the expected nonce")]
    NonceMismatch,
    #[error("the certified object's name does not match")]
    NameMismatch,
    #[error("signature scheme 0x{got:04x} does not match the key's scheme 0x{want:04x}")]
    SchemeMismatch { got: u16, want: u16 },
    #[error("signature does not verify")]
    BadSignature,
    #[error("PCR digest does not match the quoted PCR values")]
    PcrDigestMismatch,
    #[error("PCR {bank:#06x}:{index} is not in the quote's signed selection")]
    PcrNotSelected { bank: u16, index: u32 },
    #[error("PCR {bank:#06x}:{index} is selected but its value was not given")]
    PcrValueMissing { bank: u16, index: u32 },
    #[error("PCR {}:{index} value is {got} bytes; that bank's digests are {want}", bank_name(*bank))]
    PcrValueLength {
        bank: u16,
        index: u32,
        got: usize,
        want: usize,
    },
    #[error("the quote selects the {} bank more than once", bank_name(*.0))]
    PcrBankRepeated(u16),
    #[error("key attribute check failed: {0}")]
    Attributes(String),
    #[error("cryptographic operation failed: {0}")]
    Crypto(&'static str),
}

pub type Result<T> = std::result::Result<T, Error>;

/// A bounds-checked big-endian reader.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(Error::Truncated(self.what));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.bytes(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self) -> Result<u32> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self) -> Result<u64> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    /// A TPM2B: u16 size then that many bytes.
    pub fn tpm2b(&mut self) -> Result<&'a [u8]> {
        let n = self.u16()? as usize;
        self.bytes(n)
    }
    /// Fails unless everything was read.
    pub fn finish(self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Error::Trailing(self.what, self.buf.len()))
        }
    }
}

/// Appends a TPM2B (u16 size then bytes).
pub fn put_tpm2b(out: &mut Vec<u8>, data: &[u8]) -> Result<()> {
    let n = u16::try_from(data.len())
        .map_err(|_| Error::Invalid("TPM2B larger than 65535 bytes".into()))?;
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(data);
    Ok(())
}

/// The name of a PCR bank (its hash algorithm) in messages and selectors: `sha256`, or the
/// algorithm number for one Kame does not know.
pub fn bank_name(hash_alg: u16) -> String {
    match hash_alg {
        alg::SHA1 => "sha1".into(),
        alg::SHA256 => "sha256".into(),
        alg::SHA384 => "sha384".into(),
        alg::SHA512 => "sha512".into(),
        other => format!("{other:#06x}"),
    }
}

/// Digest size of a TPM hash algorithm.
pub fn digest_len(hash_alg: u16) -> Result<usize> {
    Ok(match hash_alg {
        alg::SHA1 => 20,
        alg::SHA256 => 32,
        alg::SHA384 => 48,
        alg::SHA512 => 64,
        other => {
            return Err(Error::Unsupported {
                what: "hash algorithm",
                value: other as u32,
            });
        }
    })
}

fn digest_alg(hash_alg: u16) -> Result<&'static aws_lc_rs::digest::Algorithm> {
    Ok(match hash_alg {
        alg::SHA1 => &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
        alg::SHA256 => &aws_lc_rs::digest::SHA256,
        alg::SHA384 => &aws_lc_rs::digest::SHA384,
        alg::SHA512 => &aws_lc_rs::digest::SHA512,
        other => {
            return Err(Error::Unsupported {
                what: "hash algorithm",
                value: other as u32,
            });
        }
    })
}

/// H_alg(data).
pub fn hash(hash_alg: u16, data: &[u8]) -> Result<Vec<u8>> {
    Ok(aws_lc_rs::digest::digest(digest_alg(hash_alg)?, data)
        .as_ref()
        .to_vec())
}

/// HMAC_alg(key, data...).
pub fn hmac(hash_alg: u16, key: &[u8], data: &[&[u8]]) -> Result<Vec<u8>> {
    let a = match hash_alg {
        alg::SHA1 => aws_lc_rs::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        alg::SHA256 => aws_lc_rs::hmac::HMAC_SHA256,
        alg::SHA384 => aws_lc_rs::hmac::HMAC_SHA384,
        alg::SHA512 => aws_lc_rs::hmac::HMAC_SHA512,
        other => {
            return Err(Error::Unsupported {
                what: "hash algorithm",
                value: other as u32,
            });
        }
    };
    let k = aws_lc_rs::hmac::Key::new(a, key);
    let mut ctx = aws_lc_rs::hmac::Context::with_key(&k);
    for d in data {
        ctx.update(d);
    }
    Ok(ctx.sign().as_ref().to_vec())
}
