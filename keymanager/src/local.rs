//! In-process key material (aws-lc-rs) shared by the `memory` and `disk` backends: generation,
//! PKCS#8 import/export and signing. It must not touch the filesystem; `disk` does that.

use crate::{Error, HashAlgorithm, KeyType, PublicKey, Result, SignOpts, fingerprint};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
#[cfg(feature = "disk")]
use zeroize::Zeroizing;

pub(crate) enum Material {
    Ec(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

pub(crate) struct LocalKey {
    pub key_type: KeyType,
    pub material: Material,
    pub public: PublicKey,
}

impl std::fmt::Debug for LocalKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

fn ec_alg(kt: KeyType) -> &'static signature::EcdsaSigningAlgorithm {
    match kt {
        KeyType::EcP384 => &signature::ECDSA_P384_SHA384_ASN1_SIGNING,
        _ => &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
    }
}

impl LocalKey {
    pub fn generate(id: &str, kt: KeyType) -> Result<Self> {
        let material = match kt {
            KeyType::EcP256 | KeyType::EcP384 => Material::Ec(
                EcdsaKeyPair::generate(ec_alg(kt)).map_err(|_| Error::Generate(id.into()))?,
            ),
            KeyType::Rsa2048 | KeyType::Rsa4096 => {
                let size = if kt == KeyType::Rsa2048 {
                    KeySize::Rsa2048
                } else {
                    KeySize::Rsa4096
                };
                Material::Rsa(RsaKeyPair::generate(size).map_err(|_| Error::Generate(id.into()))?)
            }
        };
        Self::from_material(id, kt, material)
    }

    pub(crate) fn from_material(id: &str, kt: KeyType, material: Material) -> Result<Self> {
        let spki_der = match &material {
            Material::Ec(k) => k
                .public_key()
                .as_der()
                .map_err(|_| Error::Generate(id.into()))?
                .as_ref()
                .to_vec(),
            Material::Rsa(k) => k
                .public_key()
                .as_der()
                .map_err(|_| Error::Generate(id.into()))?
                .as_ref()
                .to_vec(),
        };
        let public = PublicKey {
            id: id.to_string(),
            key_type: kt,
            fingerprint: fingerprint(&spki_der),
            spki_der,
        };
        Ok(LocalKey {
            key_type: kt,
            material,
            public,
        })
    }

    #[cfg(feature = "disk")]
    /// PKCS#8 v1 DER of the private key (secret: zeroized on drop).
    pub fn to_pkcs8(&self) -> Result<Zeroizing<Vec<u8>>> {
        let der = match &self.material {
            Material::Ec(k) => k
                .to_pkcs8v1()
                .map_err(|_| Error::Generate(self.public.id.clone()))?
                .as_ref()
                .to_vec(),
            Material::Rsa(k) => k
                .as_der()
                .map_err(|_| Error::Generate(self.public.id.clone()))?
                .as_ref()
                .to_vec(),
        };
        Ok(Zeroizing::new(der))
    }

    #[cfg(feature = "disk")]
    pub fn from_pkcs8(id: &str, kt: KeyType, pkcs8: &[u8]) -> Result<Self> {
        let bad = |why: &str| Error::Store {
            path: String::new(),
            reason: format!("key {id:?}: {why}"),
        };
        let material = match kt {
            KeyType::EcP256 | KeyType::EcP384 => Material::Ec(
                EcdsaKeyPair::from_pkcs8(ec_alg(kt), pkcs8)
                    .map_err(|_| bad("not a PKCS#8 key of the recorded EC type"))?,
            ),
            KeyType::Rsa2048 | KeyType::Rsa4096 => {
                let k = RsaKeyPair::from_pkcs8(pkcs8).map_err(|_| bad("not a PKCS#8 RSA key"))?;
                let want = if kt == KeyType::Rsa2048 { 256 } else { 512 };
                if k.public_modulus_len() != want {
                    return Err(bad("RSA modulus size differs from the recorded type"));
                }
                Material::Rsa(k)
            }
        };
        Self::from_material(id, kt, material)
    }

    pub fn sign(&self, message: &[u8], opts: SignOpts) -> Result<Vec<u8>> {
        let unsupported = || Error::UnsupportedSignOpts {
            id: self.public.id.clone(),
            key_type: self.key_type,
            hash: opts.hash,
            pss: opts.pss,
        };
        let rng = SystemRandom::new();
        match &self.material {
            Material::Ec(k) => {
                if opts.pss || opts.hash != self.key_type.default_hash() {
                    return Err(unsupported());
                }
                let sig = k
                    .sign(&rng, message)
                    .map_err(|_| Error::Sign(self.public.id.clone()))?;
                Ok(sig.as_ref().to_vec())
            }
            Material::Rsa(k) => {
                let pad: &'static dyn signature::RsaEncoding = match (opts.hash, opts.pss) {
                    (HashAlgorithm::Sha256, false) => &signature::RSA_PKCS1_SHA256,
                    (HashAlgorithm::Sha384, false) => &signature::RSA_PKCS1_SHA384,
                    (HashAlgorithm::Sha512, false) => &signature::RSA_PKCS1_SHA512,
                    (HashAlgorithm::Sha256, true) => &signature::RSA_PSS_SHA256,
                    (HashAlgorithm::Sha384, true) => &signature::RSA_PSS_SHA384,
                    (HashAlgorithm::Sha512, true) => &signature::RSA_PSS_SHA512,
                };
                let mut sig = vec![0u8; k.public_modulus_len()];
                k.sign(pad, &rng, message, &mut sig)
                    .map_err(|_| Error::Sign(self.public.id.clone()))?;
                Ok(sig)
            }
        }
    }
}
