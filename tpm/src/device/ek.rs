//! The endorsement key: creating it from the TCG templates (RSA-2048 L-1, ECC P-256 L-2
//! or their high-range variants), its public area, its certificate and the certificates
//! chained to it in NV, and the policy it is used under. It must not persist anything.

use super::*;

impl Device {
    pub(super) fn create_ek(&mut self, alg: EkAlg) -> Result<KeyHandle> {
        let public = tss_ek::create_ek_public_from_default_template_2(alg.selection(), None)
            .map_err(step("EK template"))?;
        self.create_endorsement_primary(public, "create EK")
    }

    /// TPM2_CreatePrimary in the endorsement hierarchy (retried while the TPM asks).
    pub(super) fn create_endorsement_primary(
        &mut self,
        public: tss_esapi::structures::Public,
        what: &'static str,
    ) -> Result<KeyHandle> {
        let secret = self.endorsement_auth;
        retrying(|| {
            self.exec_auth(secret, |c| {
                c.create_primary(
                    tss_esapi::interface_types::resource_handles::Hierarchy::Endorsement,
                    public.clone(),
                    None,
                    None,
                    None,
                    None,
                )
            })
        })
        .map(|r| r.key_handle)
        .map_err(step(what))
    }

    /// The EK public area from the default template.
    pub fn ek_public(&mut self, alg: EkAlg) -> Result<Public> {
        let h = self.create_ek(alg)?;
        let r = self.ctx.read_public(h).map_err(step("read EK public"));
        self.flush(h);
        let (public, _, _) = r?;
        Ok(Public::parse(
            &public.marshall().map_err(step("marshal EK public"))?,
        )?)
    }

    /// The EK certificate (DER) from its NV index, or None when the TPM has none. Read as
    /// go-tpm reads it: the NV buffer size, the index's public area, then NV_Read in chunks
    /// under the index's own (empty) authorization in a password session.
    pub fn ek_certificate(&mut self, alg: EkAlg) -> Result<Option<Vec<u8>>> {
        let index = match alg {
            EkAlg::Rsa2048 => 0x01c0_0002,
            EkAlg::EccP256 => 0x01c0_000a,
            EkAlg::EccP384 => 0x01c0_0016,
            EkAlg::Rsa3072 => 0x01c0_001c,
        };
        let idx = tss_esapi::handles::NvIndexTpmHandle::new(index).map_err(step("NV index"))?;
        let (caps, _) = self
            .ctx
            .get_capability(
                CapabilityType::TpmProperties,
                tss_esapi::constants::PropertyTag::NvBufferMax.into(),
                1,
            )
            .map_err(step("get_capability(NV_BUFFER_MAX)"))?;
        let chunk = match caps {
            CapabilityData::TpmProperties(list) => list
                .find(tss_esapi::constants::PropertyTag::NvBufferMax)
                .map(|p| p.value()),
            _ => None,
        }
        .and_then(|v| u16::try_from(v).ok())
        .filter(|v| *v > 0)
        .unwrap_or(512);
        // ESYS reads the index's public area (TPM2_NV_ReadPublic) to make the handle.
        let nv = match self
            .ctx
            .execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::NvIndex(idx)))
        {
            Ok(h) => h,
            Err(tss_esapi::Error::Tss2Error(_)) => return Ok(None),
            Err(e) => return Err(step("open EK certificate NV index")(e)),
        };
        let r = self.nv_read_whole(tss_esapi::handles::NvIndexHandle::from(nv), chunk);
        let mut nv = nv;
        let _ = self.ctx.tr_close(&mut nv);
        let data = r?;
        Ok(Some(trim_der(&data)?))
    }

    /// EK chain certificates (issuer certificates up to the vendor root) from the TCG EK
    /// certificate chain NV range 0x01c00100..=0x01c001ff, in index order; each index may hold
    /// several concatenated DER certificates. Empty when the TPM has none.
    pub fn ek_chain_certificates(&mut self) -> Result<Vec<Vec<u8>>> {
        let (caps, _) = self
            .ctx
            .get_capability(CapabilityType::Handles, 0x01c0_0100, 256)
            .map_err(step("get_capability(NV indices)"))?;
        let CapabilityData::Handles(handles) = caps else {
            return Ok(vec![]);
        };
        let mut out = vec![];
        for h in handles.iter() {
            let raw = u32::from(*h);
            if !(0x01c0_0100..=0x01c0_01ff).contains(&raw) {
                continue;
            }
            let idx = tss_esapi::handles::NvIndexTpmHandle::new(raw).map_err(step("NV index"))?;
            let auth = self
                .ctx
                .execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::NvIndex(idx)))
                .map_err(step("open NV index"))?;
            let data = self
                .exec_auth(false, |c| {
                    tss_esapi::abstraction::nv::read_full(
                        c,
                        tss_esapi::interface_types::resource_handles::NvAuth::NvIndex(auth.into()),
                        idx,
                    )
                })
                .map_err(step("read EK chain NV index"))?;
            let mut rest: &[u8] = &data;
            while rest.first() == Some(&0x30) {
                let cert = trim_der(rest)?;
                rest = &rest[cert.len()..];
                out.push(cert);
            }
        }
        Ok(out)
    }
}

/// The EK's authPolicy for `ek_alg`: (the policy session's hash, the PolicyOR branches).
/// Policy A = PolicySecret(TPM_RH_ENDORSEMENT) for the low-range templates; for the
/// high-range ones (SHA-384 nameAlg) policy B = PolicyOR(A, C), satisfied by PolicySecret then
/// PolicyOR over both branches.
pub(super) fn ek_policy(ek_alg: EkAlg) -> Result<(HashingAlgorithm, Option<[Vec<u8>; 2]>)> {
    let ek_name_alg = match ek_alg {
        EkAlg::Rsa2048 | EkAlg::EccP256 => wire::alg::SHA256,
        EkAlg::EccP384 | EkAlg::Rsa3072 => wire::alg::SHA384,
    };
    Ok(match wire::policy::ek_policy_b_branches(ek_name_alg)? {
        Some(b) => (HashingAlgorithm::Sha384, Some(b)),
        None => (HashingAlgorithm::Sha256, None),
    })
}
impl Device {
    /// A policy session satisfying the EK's authPolicy: PolicySecret(TPM_RH_ENDORSEMENT)
    /// (policy A), and for the high-range templates (SHA-384 nameAlg) PolicyOR(A, C) on top
    /// (policy B). The caller flushes it.
    pub(super) fn ek_policy_session(&mut self, ek_alg: EkAlg) -> Result<AuthSession> {
        let (session_hash, branches) = ek_policy(ek_alg)?;
        let (session, ps) = self.endorsement_policy_session(session_hash)?;
        if let Some(b) = &branches
            && let Err(e) = self.policy_or_branches(ps, b, "PolicyOR(A, C)")
        {
            self.flush_session(session);
            return Err(e);
        }
        Ok(session)
    }

    /// Satisfies the EK's authPolicy again in a policy session already used once (a policy
    /// session's digest starts over after each command).
    pub(super) fn renew_ek_policy(&mut self, session: AuthSession, ek_alg: EkAlg) -> Result<()> {
        let ps = PolicySession::try_from(session).map_err(step("policy session"))?;
        self.policy_secret_endorsement(ps)?;
        if let (_, Some(b)) = ek_policy(ek_alg)? {
            self.policy_or_branches(ps, &b, "PolicyOR(A, C)")?;
        }
        Ok(())
    }
}
