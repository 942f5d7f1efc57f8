//! Offline issuance: certificates sealed to the requesting TPM (a credential only its EK can
//! activate wraps the key that encrypts them), and their file format. Only that TPM can open
//! them.

use super::*;

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

pub(super) const SEALED_MAGIC: &[u8] = b"KAMESEAL1";

pub(super) fn put_tpm2b(out: &mut Vec<u8>, b: &[u8]) -> Result<(), EnrollError> {
    wire::put_tpm2b(out, b).map_err(EnrollError::SealedFormat)
}
impl Sealed {
    /// Seals `certs` (DER) for the TPM that made `request`.
    pub fn seal(request: &VerifiedRequest, certs: &[&[u8]]) -> Result<Sealed, EnrollError> {
        use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
        let key = zeroize::Zeroizing::new(random(32)?);
        let iak_name = request.iak.name().map_err(EnrollError::Credential)?;
        let cred = credential::make_credential(&request.ek, &key, &iak_name)
            .map_err(EnrollError::Credential)?;
        let mut plain = vec![];
        for c in certs {
            put_tpm2b(&mut plain, c)?;
        }
        let nonce = random(12)?;
        let n = Nonce::try_assume_unique_for_key(&nonce)
            .map_err(|_| EnrollError::Crypto("the GCM nonce"))?;
        let sealing = UnboundKey::new(&AES_256_GCM, &key)
            .map(LessSafeKey::new)
            .map_err(|_| EnrollError::Crypto("the AES key"))?;
        sealing
            .seal_in_place_append_tag(n, Aad::from(SEALED_MAGIC), &mut plain)
            .map_err(|_| EnrollError::Crypto("AES-GCM sealing"))?;
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
            out.push(r.tpm2b().map_err(EnrollError::SealedFormat)?.to_vec());
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
        let bad = EnrollError::SealedFormat;
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
