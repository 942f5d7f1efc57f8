//! Persistent objects: making a key or an AK persistent at a handle (EvictControl), evicting
//! one, listing handles, and using a persistent key (its public area, certify, sign). It only
//! touches the handles the caller names.

use super::*;

impl Device {
    /// The ESYS handle of the persistent object at `handle`, opened once per [`Device`].
    pub(super) fn persistent(&mut self, handle: u32) -> Result<KeyHandle> {
        if let Some(h) = self.persistents.get(&handle) {
            return Ok(*h);
        }
        let ph = PersistentTpmHandle::new(handle).map_err(step("persistent handle"))?;
        let h = self
            .ctx
            .execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::Persistent(ph)))
            .map(KeyHandle::from)
            .map_err(step("open persistent handle"))?;
        self.persistents.insert(handle, h);
        Ok(h)
    }

    /// Closes the ESYS handles of persistent objects opened so far (no TPM command): the next
    /// use opens them afresh, as an object may have been evicted and replaced meanwhile.
    pub fn forget_persistents(&mut self) {
        for (_, h) in self.persistents.drain() {
            let mut o = ObjectHandle::from(h);
            let _ = self.ctx.tr_close(&mut o);
        }
    }

    /// `public` (a TPMT_PUBLIC from a file) when it is the public area of the persistent
    /// object at `handle`: its Name (a hash over the whole public area) must equal the Name
    /// the TPM gave for the handle. Costs no TPM command beyond opening the handle, where
    /// [`Device::persistent_public`] costs a TPM2_ReadPublic more.
    pub fn persistent_public_matching(&mut self, handle: u32, public: &[u8]) -> Result<Vec<u8>> {
        let want = Public::parse(public)?.name()?;
        let kh = self.persistent(handle)?;
        let name = self
            .ctx
            .tr_get_name(ObjectHandle::from(kh))
            .map_err(step("name of persistent object"))?;
        if name.value() != want.as_slice() {
            return Err(DeviceError::PublicMismatch(handle));
        }
        Ok(public.to_vec())
    }

    /// Persists a key made by [`Device::create_under_srk`] at `handle` (owner range), e.g. an
    /// LDevID key, so that using it needs no SRK and no load. An occupied handle is an error;
    /// nothing is replaced.
    pub fn persist_key(&mut self, key: &KeyBlob, handle: u32) -> Result<()> {
        let ph = self.free_persistent_handle(handle)?;
        let kh = self.load_under_srk(key)?;
        let r = self.evict_control(ObjectHandle::from(kh), ph, "persist key (EvictControl)");
        self.flush(kh);
        r
    }

    /// `handle` as a persistent handle, refused when an object sits there already: nothing is
    /// ever replaced.
    pub(super) fn free_persistent_handle(&mut self, handle: u32) -> Result<PersistentTpmHandle> {
        let ph = PersistentTpmHandle::new(handle).map_err(step("persistent handle"))?;
        if self.persistent_handles()?.contains(&handle) {
            return Err(DeviceError::Invalid(format!(
                "persistent handle {handle:#010x} is in use"
            )));
        }
        Ok(ph)
    }

    /// TPM2_EvictControl under the owner authorization: persists the transient `obj` at `ph`,
    /// or removes `obj` when it is the persistent object there.
    pub(super) fn evict_control(
        &mut self,
        obj: ObjectHandle,
        ph: PersistentTpmHandle,
        what: &'static str,
    ) -> Result<()> {
        let secret = self.owner_auth;
        self.exec_auth(secret, |c| {
            c.evict_control(Provision::Owner, obj, Persistent::Persistent(ph))
        })
        .map(|_| ())
        .map_err(step(what))
    }

    /// Persists the AK at `handle` (owner range 0x81000000..=0x817fffff). An occupied handle is
    /// an error; nothing is replaced.
    pub fn persist_ak(&mut self, ek_alg: EkAlg, blob: &AkBlob, handle: u32) -> Result<()> {
        let ph = self.free_persistent_handle(handle)?;
        self.with_ak(ek_alg, blob, |d, _ek, akh| {
            d.evict_control(ObjectHandle::from(akh), ph, "persist AK (EvictControl)")
        })
    }

    /// Removes the persistent object at `handle`.
    pub fn evict_persistent(&mut self, handle: u32) -> Result<()> {
        let ph = PersistentTpmHandle::new(handle).map_err(step("persistent handle"))?;
        let obj = self.persistent(handle)?;
        self.evict_control(
            ObjectHandle::from(obj),
            ph,
            "evict persistent object (EvictControl)",
        )?;
        self.persistents.remove(&handle);
        Ok(())
    }

    /// The persistent object handles in use.
    pub fn persistent_handles(&mut self) -> Result<Vec<u32>> {
        let (caps, _) = self
            .ctx
            .get_capability(CapabilityType::Handles, 0x8100_0000, 64)
            .map_err(step("get_capability(persistent handles)"))?;
        Ok(match caps {
            CapabilityData::Handles(h) => h.iter().map(|t| u32::from(*t)).collect(),
            _ => vec![],
        })
    }

    /// The TPMT_PUBLIC of the persistent object at `handle`.
    pub fn persistent_public(&mut self, handle: u32) -> Result<Vec<u8>> {
        let kh = self.persistent(handle)?;
        let (p, _, _) = self.ctx.read_public(kh).map_err(step("read public"))?;
        p.marshall().map_err(step("marshal public"))
    }

    /// TPM2_Certify of `key` (loaded under the SRK, empty password) by the persistent key at
    /// `signer` (a TCG IAK, USER role, empty password), with `nonce` as qualifying data: an
    /// LDevID key certified by the IAK. Returns (TPMS_ATTEST, TPMT_SIGNATURE).
    pub fn certify_by_persistent(
        &mut self,
        key: &KeyBlob,
        signer: u32,
        nonce: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let data = Data::try_from(nonce.to_vec()).map_err(step("nonce"))?;
        let sh = self.persistent(signer)?;
        let kh = self.load_under_srk(key)?;
        let r = self.certify_loaded(kh, !key.auth.is_empty(), sh, data);
        self.flush(kh);
        r
    }

    /// Signs `message` with the persistent unrestricted key at `handle` (USER role, empty
    /// password): SHA-256, RSASSA for RSA keys without a scheme, else the key's scheme.
    /// Returns TPMT_SIGNATURE.
    pub fn sign_persistent(&mut self, handle: u32, message: &[u8]) -> Result<Vec<u8>> {
        let public = Public::parse(&self.persistent_public(handle)?)?;
        let digest =
            Digest::try_from(wire::hash(wire::alg::SHA256, message)?).map_err(step("digest"))?;
        let scheme = if public.is_rsa() && public.scheme().scheme == wire::alg::NULL {
            SignatureScheme::RsaSsa {
                hash_scheme: tss_esapi::structures::HashScheme::new(HashingAlgorithm::Sha256),
            }
        } else {
            SignatureScheme::Null
        };
        let ticket = tss_esapi::structures::HashcheckTicket::try_from(
            tss_esapi::tss2_esys::TPMT_TK_HASHCHECK {
                tag: tss_esapi::constants::tss::TPM2_ST_HASHCHECK,
                hierarchy: tss_esapi::constants::tss::TPM2_RH_NULL,
                digest: Default::default(),
            },
        )
        .map_err(step("null hashcheck ticket"))?;
        let kh = self.persistent(handle)?;
        retrying(|| {
            self.exec_auth(false, |c| {
                c.sign(kh, digest.clone(), scheme, ticket.clone())
            })
        })
        .map_err(step("sign"))
        .and_then(|s| s.marshall().map_err(step("marshal signature")))
    }
}
