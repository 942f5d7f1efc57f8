//! SPIRE's tpm_devid attestation sequence on the TPM: message 1 (load the DevID, create and
//! load an AK, read the EK, certify the DevID by the AK) and message 2 (activate the
//! server's credential and answer), with the one open attestation's loaded objects. It
//! flushes everything it loaded when an attestation ends or is replaced.

use super::*;

impl Device {
    /// Message 1 of an attestation with a fresh AK: loads the DevID key (under the SRK, then
    /// flushed), creates an AK from SPIRE's `AK_RSA` template (RSA-2048 restricted signing)
    /// and loads it, makes the EK, reads the EK's public area, and certifies the DevID by the
    /// AK. The AK goes under `parent`: the EK (Kame: in the endorsement hierarchy quotes carry
    /// true reset counts), or the SRK, in SPIRE's order of commands (`tpm_devid.md` §1.3
    /// steps 2 to 9). On failure nothing stays loaded.
    pub fn begin_attestation(
        &mut self,
        ek_alg: EkAlg,
        devid: &KeyBlob,
        parent: AkParent,
    ) -> Result<LoadedAttestation> {
        // One never answered is dropped: its objects would take the TPM's slots.
        if let Some((_, handles)) = self.attestation.take() {
            for h in handles {
                self.flush(h);
            }
        }
        self.attestations += 1;
        let mut loaded = vec![];
        let r = match parent {
            AkParent::Ek => self.begin_attestation_into(ek_alg, devid, &mut loaded),
            AkParent::Srk => self.begin_spire_attestation_into(ek_alg, devid, &mut loaded),
        };
        match &r {
            Ok(a) => self.attestation = Some((a.number, [a.ak, a.ek, a.devid])),
            Err(_) => {
                for h in loaded.into_iter().rev() {
                    self.flush(h);
                }
            }
        }
        r
    }

    pub(super) fn begin_spire_attestation_into(
        &mut self,
        ek_alg: EkAlg,
        devid: &KeyBlob,
        loaded: &mut Vec<KeyHandle>,
    ) -> Result<LoadedAttestation> {
        let dh = self.load_under_srk(devid)?;
        loaded.push(dh);
        let ak = self.create_under_srk(&wire::public::templates::bytes(
            wire::public::templates::AK_RSA,
        ))?;
        let akh = self.load_under_srk(&ak)?;
        loaded.push(akh);
        let ekh = self.create_ek(ek_alg)?;
        loaded.push(ekh);
        let ak_blob = AkBlob {
            public: ak.public,
            private: ak.private,
            parent: AkParent::Srk,
        };
        self.loaded_attestation([dh, akh, ekh], devid, ek_alg, ak_blob)
    }

    pub(super) fn begin_attestation_into(
        &mut self,
        ek_alg: EkAlg,
        devid: &KeyBlob,
        loaded: &mut Vec<KeyHandle>,
    ) -> Result<LoadedAttestation> {
        let dh = self.load_under_srk(devid)?;
        loaded.push(dh);
        let ekh = self.create_ek(ek_alg)?;
        loaded.push(ekh);
        let template = tss_esapi::structures::Public::unmarshall(&wire::public::templates::bytes(
            wire::public::templates::AK_RSA,
        ))
        .map_err(step("AK template"))?;
        // One policy session for both uses of the EK: satisfied again before the load.
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
        loaded.push(akh);
        let ak_blob = AkBlob {
            public: created
                .out_public
                .marshall()
                .map_err(step("marshal AK public"))?,
            private: created.out_private.value().to_vec(),
            parent: AkParent::Ek,
        };
        self.loaded_attestation([dh, akh, ekh], devid, ek_alg, ak_blob)
    }

    /// Message 1's last steps with the DevID, AK and EK loaded: the EK's public area and the
    /// certify of the DevID by the AK (empty qualifying data).
    pub(super) fn loaded_attestation(
        &mut self,
        [dh, akh, ekh]: [KeyHandle; 3],
        devid: &KeyBlob,
        ek_alg: EkAlg,
        ak_blob: AkBlob,
    ) -> Result<LoadedAttestation> {
        let ek_public = self
            .ctx
            .read_public(ekh)
            .map_err(step("read EK public"))
            .and_then(|(p, _, _)| p.marshall().map_err(step("marshal EK public")))?;
        let certify = self.certify_loaded(dh, !devid.auth.is_empty(), akh, Data::default())?;
        Ok(LoadedAttestation {
            device: self.id,
            number: self.attestations,
            ek: ekh,
            ak: akh,
            devid: dh,
            devid_secret: !devid.auth.is_empty(),
            ek_alg,
            ak_blob,
            ek_public,
            certify,
        })
    }

    /// The answer to the server's challenge in `a`: the DevID signs `message` (hashed with its
    /// scheme hash), the AK activates the credential under the EK, and when `pcrs` is Some
    /// (Kame v2) the AK certifies the DevID and quotes those PCRs with `nonce`.
    pub fn answer_attestation(
        &mut self,
        a: &LoadedAttestation,
        devid_public: &[u8],
        message: &[u8],
        credential_blob: &[u8],
        secret: &[u8],
        v2: Option<(&[u8], &[u32])>,
    ) -> Result<AttestationAnswer> {
        if !self.holds(a) {
            return Err(DeviceError::Invalid(
                "the attestation's objects are not loaded in this TPM connection".into(),
            ));
        }
        let digest = message_digest(devid_public, message)?;
        let signature = self.sign_loaded(a.devid, a.devid_secret, digest)?;
        let (id, es) = credential_parts(credential_blob, secret)?;
        let akh = a.ak;
        let credential = self.activate_loaded(akh, a.ek, a.ek_alg, id, es)?;
        let v2 = match v2 {
            None => None,
            Some((nonce, pcrs)) => {
                let data = Data::try_from(nonce.to_vec()).map_err(step("nonce"))?;
                let (certify, certify_signature) =
                    self.certify_loaded(a.devid, a.devid_secret, akh, data)?;
                let (quote, quote_signature) = self.quote_with(akh, pcrs, nonce)?;
                Some(PersistentAkProof {
                    signature: vec![],
                    certify,
                    certify_signature,
                    quote,
                    quote_signature,
                    pcr_values: self.pcr_values(pcrs)?,
                })
            }
        };
        Ok(AttestationAnswer {
            signature,
            credential,
            v2,
        })
    }

    /// Whether `a`'s objects are loaded in this [`Device`] (its latest attestation, not
    /// ended): a session carried to another opening of the TPM, or superseded, falls back to
    /// its blobs.
    pub fn holds(&self, a: &LoadedAttestation) -> bool {
        a.device == self.id && self.attestation.is_some_and(|(n, _)| n == a.number)
    }

    /// Flushes what [`Device::begin_attestation`] loaded (once; another's is left alone).
    pub fn end_attestation(&mut self, a: &LoadedAttestation) {
        if self.holds(a)
            && let Some((_, handles)) = self.attestation.take()
        {
            for h in handles {
                self.flush(h);
            }
        }
    }
}
