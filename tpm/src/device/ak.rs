//! Attestation keys and what they sign: creating and loading an AK under the EK or the SRK,
//! quotes over PCRs (with a transient or a persistent AK), PCR reads, and certifying a key by
//! an AK. It keeps nothing loaded after a call.

use super::*;

impl Device {
    /// Creates an attestation key under the EK (restricted signing, SHA-256).
    pub fn create_ak(&mut self, ek_alg: EkAlg, ecc: bool) -> Result<AkBlob> {
        let ekh = self.create_ek(ek_alg)?;
        let (key_alg, sig) = if ecc {
            (
                AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
                SignatureSchemeAlgorithm::EcDsa,
            )
        } else {
            (
                AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
                SignatureSchemeAlgorithm::RsaSsa,
            )
        };
        let r = tss_ak::create_ak_2(
            &mut self.ctx,
            ekh,
            HashingAlgorithm::Sha256,
            key_alg,
            sig,
            None,
            None,
        )
        .map_err(step("create AK"));
        self.flush(ekh);
        let r = r?;
        Ok(AkBlob {
            public: r.out_public.marshall().map_err(step("marshal AK public"))?,
            private: r.out_private.value().to_vec(),
            parent: AkParent::Ek,
        })
    }

    /// Runs `f` with the EK and the AK loaded, then flushes both.
    pub(super) fn with_ak<T>(
        &mut self,
        ek_alg: EkAlg,
        blob: &AkBlob,
        f: impl FnOnce(&mut Self, KeyHandle, KeyHandle) -> Result<T>,
    ) -> Result<T> {
        // SPIRE's AK loads under a temporary SRK first, so that at most three objects are
        // ever loaded (a DevID being certified, the AK, then the EK).
        if blob.parent == AkParent::Srk {
            let key = KeyBlob {
                public: blob.public.clone(),
                private: blob.private.clone(),
                auth: vec![],
            };
            let akh = self.load_under_srk(&key)?;
            let ekh = match self.create_ek(ek_alg) {
                Ok(h) => h,
                Err(e) => {
                    self.flush(akh);
                    return Err(e);
                }
            };
            let r = f(self, ekh, akh);
            self.flush(akh);
            self.flush(ekh);
            return r;
        }
        let ekh = self.create_ek(ek_alg)?;
        let public = tss_esapi::structures::Public::unmarshall(&blob.public)
            .map_err(step("unmarshal AK public"));
        let private = Private::try_from(blob.private.clone()).map_err(step("AK private blob"));
        let loaded = match (public, private) {
            (Ok(p), Ok(k)) => {
                tss_ak::load_ak(&mut self.ctx, ekh, None, k, p).map_err(step("load AK"))
            }
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        let akh = match loaded {
            Ok(h) => h,
            Err(e) => {
                self.flush(ekh);
                return Err(e);
            }
        };
        let r = f(self, ekh, akh);
        self.flush(akh);
        self.flush(ekh);
        r
    }

    /// TPM2_Quote over SHA-256 PCRs `pcrs` with `nonce`; returns (TPMS_ATTEST, TPMT_SIGNATURE).
    pub fn quote(
        &mut self,
        ek_alg: EkAlg,
        blob: &AkBlob,
        pcrs: &[u32],
        nonce: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        self.with_ak(ek_alg, blob, |d, _ek, akh| d.quote_with(akh, pcrs, nonce))
    }

    /// TPM2_Quote with an AK persisted at `handle` (see [`Device::persist_ak`]).
    pub fn quote_persistent(
        &mut self,
        handle: u32,
        pcrs: &[u32],
        nonce: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let akh = self.persistent(handle)?;
        self.quote_with(akh, pcrs, nonce)
    }

    pub(super) fn quote_with(
        &mut self,
        akh: KeyHandle,
        pcrs: &[u32],
        nonce: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let sel = pcr_selection(pcrs)?;
        let data = Data::try_from(nonce.to_vec()).map_err(step("nonce"))?;
        // A password session: the AK's authorization is empty and nothing in a quote is
        // secret, so an HMAC session would only cost two more TPM commands.
        let (attest, sig) = retrying(|| {
            self.ctx
                .execute_with_session(Some(AuthSession::Password), |c| {
                    c.quote(akh, data.clone(), SignatureScheme::Null, sel.clone())
                })
        })
        .map_err(step("quote"))?;
        Ok((
            attest.marshall().map_err(step("marshal attest"))?,
            sig.marshall().map_err(step("marshal signature"))?,
        ))
    }

    /// Current SHA-256 PCR values.
    pub fn pcr_values(&mut self, pcrs: &[u32]) -> Result<wire::attest::PcrValues> {
        let mut out = wire::attest::PcrValues::new();
        for chunk in pcrs.chunks(8) {
            let sel = pcr_selection(chunk)?;
            let (_, _, digests) = self
                .ctx
                .execute_without_session(|c| c.pcr_read(sel))
                .map_err(step("pcr_read"))?;
            let mut sorted = chunk.to_vec();
            sorted.sort_unstable();
            for (i, d) in sorted.iter().zip(digests.value()) {
                out.insert((wire::alg::SHA256, *i), d.value().to_vec());
            }
        }
        Ok(out)
    }
}

pub(super) fn pcr_selection(pcrs: &[u32]) -> Result<tss_esapi::structures::PcrSelectionList> {
    let slots = pcrs
        .iter()
        .map(|i| {
            if *i > 23 {
                return Err(DeviceError::Invalid(format!("PCR {i} does not exist")));
            }
            PcrSlot::try_from(1u32 << i).map_err(step("PCR slot"))
        })
        .collect::<Result<Vec<_>>>()?;
    PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(step("PCR selection"))
}
impl Device {
    /// TPM2_Certify of `key` (loaded under the SRK) by the AK, with `nonce` as qualifying data.
    /// Returns (TPMS_ATTEST, TPMT_SIGNATURE).
    pub fn certify(
        &mut self,
        ek_alg: EkAlg,
        ak: &AkBlob,
        key: &KeyBlob,
        nonce: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let data = Data::try_from(nonce.to_vec()).map_err(step("nonce"))?;
        let kh = self.load_under_srk(key)?;
        let secret = !key.auth.is_empty();
        let r = self.with_ak(ek_alg, ak, |d, _ek, akh| {
            d.certify_loaded(kh, secret, akh, data)
        });
        self.flush(kh);
        r
    }

    /// TPM2_Certify of the loaded `kh` by `signer` (empty authorization). The certified
    /// object is authorized in an HMAC session when its value is `secret` (it never crosses
    /// the bus), else in a password session.
    pub(super) fn certify_loaded(
        &mut self,
        kh: KeyHandle,
        secret: bool,
        signer: KeyHandle,
        data: Data,
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let object_session = if secret {
            Some(self.hmac_session()?)
        } else {
            None
        };
        let r = self
            .ctx
            .execute_with_sessions(
                (
                    Some(object_session.unwrap_or(AuthSession::Password)),
                    Some(AuthSession::Password),
                    None,
                ),
                |c| c.certify(ObjectHandle::from(kh), signer, data, SignatureScheme::Null),
            )
            .map_err(step("certify"));
        if let Some(session) = object_session {
            self.flush_session(session);
        }
        r.and_then(|(a, s)| {
            Ok((
                a.marshall().map_err(step("marshal attest"))?,
                s.marshall().map_err(step("marshal signature"))?,
            ))
        })
    }

    /// The proof of a DevID key with a persistent attestation key (a TCG IAK or LAK): the
    /// DevID key (persistent at `devid_handle`, or else loaded once under the SRK) signs `message` (hashed with its scheme hash);
    /// the AK at `ak` certifies it and quotes the SHA-256 PCRs `pcrs`, both with `nonce` as
    /// qualifying data. No EK, no AK to create or load: the fewest TPM commands that prove a
    /// DevID key resident in this TPM now.
    pub fn prove_with_persistent_ak(
        &mut self,
        devid: &KeyBlob,
        devid_handle: Option<u32>,
        ak: u32,
        message: &[u8],
        nonce: &[u8],
        pcrs: &[u32],
    ) -> Result<PersistentAkProof> {
        let digest = message_digest(&devid.public, message)?;
        let data = Data::try_from(nonce.to_vec()).map_err(step("nonce"))?;
        let akh = self.persistent(ak)?;
        let kh = match devid_handle {
            Some(h) => {
                let kh = self.persistent(h)?;
                let auth = tss_esapi::structures::Auth::try_from(devid.auth.clone())
                    .map_err(step("key authorization value"))?;
                self.ctx
                    .tr_set_auth(ObjectHandle::from(kh), auth)
                    .map_err(step("set key authorization"))?;
                kh
            }
            None => self.load_under_srk(devid)?,
        };
        let r = self
            .sign_loaded(kh, !devid.auth.is_empty(), digest)
            .and_then(|signature| {
                let (certify, certify_signature) =
                    self.certify_loaded(kh, !devid.auth.is_empty(), akh, data)?;
                Ok((signature, certify, certify_signature))
            });
        if devid_handle.is_none() {
            self.flush(kh);
        }
        let (signature, certify, certify_signature) = r?;
        let (quote, quote_signature) = self.quote_with(akh, pcrs, nonce)?;
        Ok(PersistentAkProof {
            signature,
            certify,
            certify_signature,
            quote,
            quote_signature,
            pcr_values: self.pcr_values(pcrs)?,
        })
    }
}
