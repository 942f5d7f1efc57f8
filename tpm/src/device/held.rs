//! Objects a caller keeps loaded across calls: a key under the SRK, the EK, an AK made under
//! the EK, each an opaque [`Held`] that only this opening of the TPM can use. A caller that
//! runs a multi-step protocol (SPIRE's tpm_devid attestation, in the agent) holds what it
//! loaded between steps, then flushes it; [`Device::release_held`] flushes everything held,
//! so one sequence never answered cannot keep the TPM's few object slots. Objects a dead
//! process left behind are flushed by the next [`Device::open`]. It knows no protocol.

use super::*;

/// A transient object loaded for a caller, until [`Device::flush_held`] or
/// [`Device::release_held`].
#[derive(Debug)]
pub struct Held {
    /// The [`Device`] it was loaded by, and its number among that device's objects.
    device: u64,
    number: u64,
    handle: KeyHandle,
    /// The object has an authorization value (an HMAC session is needed to use it).
    secret: bool,
}

impl Device {
    fn hold(&mut self, handle: KeyHandle, secret: bool) -> Held {
        self.held_count += 1;
        self.held.push((self.held_count, handle));
        Held {
            device: self.id,
            number: self.held_count,
            handle,
            secret,
        }
    }

    /// Whether `h` is still loaded in this [`Device`] (not flushed, not released, not from
    /// another opening of the TPM).
    pub fn holds(&self, h: &Held) -> bool {
        h.device == self.id && self.held.iter().any(|(n, _)| *n == h.number)
    }

    fn check(&self, h: &Held) -> Result<KeyHandle> {
        if self.holds(h) {
            Ok(h.handle)
        } else {
            Err(DeviceError::Invalid(
                "the object is not loaded in this TPM connection".into(),
            ))
        }
    }

    /// Flushes `h` (nothing when it is no longer loaded); `h` is then a stale token.
    pub fn flush_held(&mut self, h: &Held) {
        if self.holds(h) {
            self.held.retain(|(n, _)| *n != h.number);
            self.flush(h.handle);
        }
    }

    /// Flushes every object held for callers.
    pub fn release_held(&mut self) {
        for (_, handle) in std::mem::take(&mut self.held) {
            self.flush(handle);
        }
    }

    /// Loads `key` (created under the SRK) and holds it.
    pub fn load_held(&mut self, key: &KeyBlob) -> Result<Held> {
        let h = self.load_under_srk(key)?;
        Ok(self.hold(h, !key.auth.is_empty()))
    }

    /// Creates the EK of `alg` and holds it.
    pub fn ek_held(&mut self, alg: EkAlg) -> Result<Held> {
        let h = self.create_ek(alg)?;
        Ok(self.hold(h, false))
    }

    /// Creates an AK from SPIRE's `AK_RSA` template under the held EK `ek` (with its policy
    /// session, satisfied again for the load) and holds it; returns it with its blobs.
    pub fn ak_under_ek_held(&mut self, ek: &Held, ek_alg: EkAlg) -> Result<(Held, AkBlob)> {
        let ekh = self.check(ek)?;
        let template = tss_esapi::structures::Public::unmarshall(&wire::public::templates::bytes(
            wire::public::templates::AK_RSA,
        ))
        .map_err(step("AK template"))?;
        let session = self.ek_policy_session(ek_alg)?;
        let created = retrying(|| {
            self.ctx.execute_with_session(Some(session), |c| {
                c.create(ekh, template.clone(), None, None, None, None)
            })
        })
        .map_err(step("create AK under the EK"));
        let akh = created.and_then(|created| {
            self.renew_ek_policy(session, ek_alg)?;
            let akh = self
                .ctx
                .execute_with_session(Some(session), |c| {
                    c.load(ekh, created.out_private.clone(), created.out_public.clone())
                })
                .map_err(step("load AK"))?;
            Ok((akh, created))
        });
        self.flush_session(session);
        let (akh, created) = akh?;
        let held = self.hold(akh, false);
        let blob = created
            .out_public
            .marshall()
            .map_err(step("marshal AK public"))
            .map(|public| AkBlob {
                public,
                private: created.out_private.value().to_vec(),
                parent: AkParent::Ek,
            });
        match blob {
            Ok(b) => Ok((held, b)),
            Err(e) => {
                self.flush_held(&held);
                Err(e)
            }
        }
    }

    /// The held object's TPMT_PUBLIC.
    pub fn held_public(&mut self, h: &Held) -> Result<Vec<u8>> {
        let kh = self.check(h)?;
        self.ctx
            .read_public(kh)
            .map_err(step("read public"))
            .and_then(|(p, _, _)| p.marshall().map_err(step("marshal public")))
    }

    /// TPM2_Certify of the held `object` by the held `signer` over `qualifying_data`:
    /// (TPMS_ATTEST, TPMT_SIGNATURE).
    pub fn certify_held(
        &mut self,
        object: &Held,
        signer: &Held,
        qualifying_data: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let (kh, sh) = (self.check(object)?, self.check(signer)?);
        let data = Data::try_from(qualifying_data.to_vec()).map_err(step("qualifying data"))?;
        self.certify_loaded(kh, object.secret, sh, data)
    }

    /// The held key's TPMT_SIGNATURE over `message`, hashed with the hash of its scheme
    /// (`public` is its TPMT_PUBLIC).
    pub fn sign_held(&mut self, key: &Held, public: &[u8], message: &[u8]) -> Result<Vec<u8>> {
        let kh = self.check(key)?;
        let digest = message_digest(public, message)?;
        self.sign_loaded(kh, key.secret, digest)
    }

    /// TPM2_ActivateCredential with the held `ak` and the held EK `ek` (its policy session):
    /// the secret the server bound to the AK's name. `credential_blob` and `secret` are the
    /// TPM2B-wrapped ID object and encrypted secret.
    pub fn activate_held(
        &mut self,
        ak: &Held,
        ek: &Held,
        ek_alg: EkAlg,
        credential_blob: &[u8],
        secret: &[u8],
    ) -> Result<Vec<u8>> {
        let (akh, ekh) = (self.check(ak)?, self.check(ek)?);
        let (id, es) = credential_parts(credential_blob, secret)?;
        self.activate_loaded(akh, ekh, ek_alg, id, es)
    }

    /// A quote by the held `ak` over `pcrs` (SHA-256 bank) with `nonce`:
    /// (TPMS_ATTEST, TPMT_SIGNATURE).
    pub fn quote_held(
        &mut self,
        ak: &Held,
        pcrs: &[u32],
        nonce: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let akh = self.check(ak)?;
        self.quote_with(akh, pcrs, nonce)
    }
}
