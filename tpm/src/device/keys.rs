//! Ordinary keys under the storage root key: the SRK itself, creating and loading a key
//! from a template, hierarchy authorization, and signing a message or a digest with a loaded
//! key. Keys leave the TPM only as wrapped blobs.

use super::*;

impl Device {
    /// The storage root key from SPIRE's exact SRK_HIGH template (RSA-2048 or ECC P-256,
    /// empty unique): DevID blobs provisioned for SPIRE load under it.
    pub fn create_srk(&mut self, ecc: bool) -> Result<KeyHandle> {
        let hex = if ecc {
            wire::public::templates::SRK_HIGH_ECC
        } else {
            wire::public::templates::SRK_HIGH_RSA
        };
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| DeviceError::Invalid("bad SRK template".into()))?;
        let public =
            tss_esapi::structures::Public::unmarshall(&bytes).map_err(step("SRK template"))?;
        let secret = self.owner_auth;
        self.exec_auth(secret, |c| {
            c.create_primary(
                tss_esapi::interface_types::resource_handles::Hierarchy::Owner,
                public,
                None,
                None,
                None,
                None,
            )
        })
        .map(|r| r.key_handle)
        .map_err(step("create SRK"))
    }

    /// The SRK's public area (to compare with other stacks).
    pub fn srk_public(&mut self, ecc: bool) -> Result<Public> {
        let h = self.create_srk(ecc)?;
        let r = self.ctx.read_public(h).map_err(step("read SRK public"));
        self.flush(h);
        Ok(Public::parse(
            &r?.0.marshall().map_err(step("marshal SRK public"))?,
        )?)
    }

    /// Creates a key under the SRK from an exact TPMT_PUBLIC template (e.g.
    /// [`wire::public::templates::AK_RSA`], `DEVID_RSA`, `DEVID_ECC`) with an empty password;
    /// the SRK matches the key type (RSA or ECC). Returns the blobs in SPIRE's format.
    pub fn create_under_srk(&mut self, template: &[u8]) -> Result<KeyBlob> {
        let public =
            tss_esapi::structures::Public::unmarshall(template).map_err(step("key template"))?;
        let srk = self.create_srk(key_is_ecc(template))?;
        // The SRK's authorization is empty (it is made with none).
        let r = retrying(|| {
            self.exec_auth(false, |c| {
                c.create(srk, public.clone(), None, None, None, None)
            })
        })
        .map_err(step("create key under SRK"));
        self.flush(srk);
        let r = r?;
        Ok(KeyBlob {
            public: r
                .out_public
                .marshall()
                .map_err(step("marshal key public"))?,
            private: r.out_private.value().to_vec(),
            auth: vec![],
        })
    }

    /// Loads a key blob under the SRK (SRK flushed afterwards; the key stays loaded).
    pub(super) fn load_under_srk(&mut self, key: &KeyBlob) -> Result<KeyHandle> {
        let ecc = key_is_ecc(&key.public);
        let srk = self.create_srk(ecc)?;
        let public =
            tss_esapi::structures::Public::unmarshall(&key.public).map_err(step("key public blob"));
        let private = Private::try_from(key.private.clone()).map_err(step("key private blob"));
        let r = match (public, private) {
            (Ok(p), Ok(k)) => self
                .ctx
                // The SRK's authorization is empty and the private part is TPM-wrapped: a
                // password session does.
                .execute_with_session(Some(AuthSession::Password), |c| c.load(srk, k, p))
                .map_err(step("load key")),
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        self.flush(srk);
        let kh = r?;
        if !key.auth.is_empty() {
            let auth = tss_esapi::structures::Auth::try_from(key.auth.clone())
                .map_err(step("key authorization value"));
            if let Err(e) = auth.and_then(|a| {
                self.ctx
                    .tr_set_auth(ObjectHandle::from(kh), a)
                    .map_err(step("set key authorization"))
            }) {
                self.flush(kh);
                return Err(e);
            }
        }
        Ok(kh)
    }

    /// Sets the owner and endorsement hierarchy authorization values used from now on (SRK
    /// and EK creation, the EK's PolicySecret). Empty means none. A wrong value fails once at
    /// the TPM and is never retried (dictionary-attack lockout).
    pub fn set_hierarchy_auth(&mut self, owner: &[u8], endorsement: &[u8]) -> Result<()> {
        for (h, v, what) in [
            (ObjectHandle::Owner, owner, "owner hierarchy authorization"),
            (
                ObjectHandle::Endorsement,
                endorsement,
                "endorsement hierarchy authorization",
            ),
        ] {
            let a = tss_esapi::structures::Auth::try_from(v.to_vec()).map_err(step(what))?;
            self.ctx.tr_set_auth(h, a).map_err(step(what))?;
        }
        self.owner_auth = !owner.is_empty();
        self.endorsement_auth = !endorsement.is_empty();
        Ok(())
    }

    /// Signs `message` (hashed here with the key's scheme hash) with `key`; returns TPMT_SIGNATURE.
    pub fn sign(&mut self, key: &KeyBlob, message: &[u8]) -> Result<Vec<u8>> {
        let digest = message_digest(&key.public, message)?;
        self.sign_loaded_digest(key, digest)
    }

    /// Signs a precomputed digest with `key`; returns TPMT_SIGNATURE.
    pub fn sign_digest(&mut self, key: &KeyBlob, digest: &[u8]) -> Result<Vec<u8>> {
        let digest = Digest::try_from(digest.to_vec()).map_err(step("digest"))?;
        self.sign_loaded_digest(key, digest)
    }

    /// Loads `key` under the SRK, signs `digest`, and flushes it.
    pub(super) fn sign_loaded_digest(&mut self, key: &KeyBlob, digest: Digest) -> Result<Vec<u8>> {
        let kh = self.load_under_srk(key)?;
        let r = self.sign_loaded(kh, !key.auth.is_empty(), digest);
        self.flush(kh);
        r
    }

    /// TPM2_Sign by the loaded key `kh`; `secret`: its authorization value is not empty.
    pub(super) fn sign_loaded(
        &mut self,
        kh: KeyHandle,
        secret: bool,
        digest: Digest,
    ) -> Result<Vec<u8>> {
        let ticket = tss_esapi::structures::HashcheckTicket::try_from(
            tss_esapi::tss2_esys::TPMT_TK_HASHCHECK {
                tag: tss_esapi::constants::tss::TPM2_ST_HASHCHECK,
                hierarchy: tss_esapi::constants::tss::TPM2_RH_NULL,
                digest: Default::default(),
            },
        )
        .map_err(step("null hashcheck ticket"))?;
        retrying(|| {
            self.exec_auth(secret, |c| {
                c.sign(kh, digest.clone(), SignatureScheme::Null, ticket.clone())
            })
        })
        .map_err(step("sign"))
        .and_then(|s| s.marshall().map_err(step("marshal signature")))
    }
}

/// `message` hashed as the key whose TPMT_PUBLIC is `public` signs it: SHA-384 when its
/// scheme says so, else SHA-256.
pub(super) fn message_digest(public: &[u8], message: &[u8]) -> Result<Digest> {
    let hash_alg = match Public::parse(public)?.scheme().hash {
        wire::alg::SHA384 => wire::alg::SHA384,
        _ => wire::alg::SHA256,
    };
    Digest::try_from(wire::hash(hash_alg, message)?).map_err(step("digest"))
}

pub(super) fn key_is_ecc(tpmt_public: &[u8]) -> bool {
    tpmt_public.len() >= 2 && u16::from_be_bytes([tpmt_public[0], tpmt_public[1]]) == wire::alg::ECC
}
