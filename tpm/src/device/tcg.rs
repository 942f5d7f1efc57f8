//! TCG device identity provisioning (TPM 2.0 Keys for Device Identity and Attestation):
//! creating IAK/IDevID keys from the TCG templates and persisting them, certifying one by
//! the other, and activating a credential for an enrollment CA. It holds no CA logic.

use super::*;

impl Device {
    /// Creates a TCG DevID key (IAK or IDevID) as a primary key in the endorsement hierarchy
    /// from the TCG template ([`wire::public::tcg_devid_template`]) and persists it at
    /// `handle` (owner range; the TCG Provisioning Guidance §7.8 uses 0x81020000 for the
    /// IDevID). An occupied handle is an error; nothing is replaced. Returns its TPMT_PUBLIC.
    pub fn provision_tcg_key(
        &mut self,
        key: wire::policy::DevIdKey,
        ecc: bool,
        handle: u32,
    ) -> Result<Vec<u8>> {
        let ph = self.free_persistent_handle(handle)?;
        let template = wire::public::tcg_devid_template(key, ecc)?.marshal()?;
        let public =
            tss_esapi::structures::Public::unmarshall(&template).map_err(step("TCG template"))?;
        let kh = self.create_endorsement_primary(public, "create TCG DevID primary")?;
        let out = self
            .ctx
            .read_public(kh)
            .map_err(step("read TCG key public"))
            .and_then(|(p, _, _)| p.marshall().map_err(step("marshal TCG key public")));
        let persisted = out.and_then(|out| {
            self.evict_control(ObjectHandle::from(kh), ph, "persist TCG key (EvictControl)")
                .map(|_| out)
        });
        self.flush(kh);
        persisted
    }

    /// TPM2_Certify of the TCG key at `object` (its ADMIN role through the policy's Certify
    /// branch) by the key at `signer` (USER role, empty password), with `nonce` as qualifying
    /// data. Returns (TPMS_ATTEST, TPMT_SIGNATURE).
    pub fn certify_tcg(
        &mut self,
        object: u32,
        object_key: wire::policy::DevIdKey,
        signer: u32,
        nonce: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let data = Data::try_from(nonce.to_vec()).map_err(step("nonce"))?;
        let oh = self.persistent(object)?;
        let sh = self.persistent(signer)?;
        let session =
            self.tcg_admin_session(object_key, tss_esapi::constants::CommandCode::Certify)?;
        let r = self
            .ctx
            .execute_with_sessions((Some(session), Some(AuthSession::Password), None), |c| {
                c.certify(ObjectHandle::from(oh), sh, data, SignatureScheme::Null)
            })
            .map_err(step("certify (TCG policy)"))
            .and_then(|(a, s)| {
                Ok((
                    a.marshall().map_err(step("marshal attest"))?,
                    s.marshall().map_err(step("marshal signature"))?,
                ))
            });
        self.flush_session(session);
        r
    }

    /// TPM2_ActivateCredential with the persistent TCG IAK at `iak` (ADMIN role through the
    /// policy's ActivateCredential branch) under this TPM's EK: the answer to a CA's
    /// enrollment challenge. `credential_blob` and `secret` are TPM2B_ID_OBJECT and
    /// TPM2B_ENCRYPTED_SECRET.
    pub fn activate_credential_tcg(
        &mut self,
        ek_alg: EkAlg,
        iak: u32,
        credential_blob: &[u8],
        secret: &[u8],
    ) -> Result<Vec<u8>> {
        if matches!(ek_alg, EkAlg::EccP384 | EkAlg::Rsa3072) {
            return Err(DeviceError::Invalid(
                "TCG IAK credential activation uses a low-range (SHA-256) EK".into(),
            ));
        }
        let (id, es) = credential_parts(credential_blob, secret)?;
        let iakh = self.persistent(iak)?;
        let iak_session = self.tcg_admin_session(
            wire::policy::DevIdKey::Iak,
            tss_esapi::constants::CommandCode::ActivateCredential,
        )?;
        let ekh = match self.create_ek(ek_alg) {
            Ok(h) => h,
            Err(e) => {
                self.flush_session(iak_session);
                return Err(e);
            }
        };
        let r = self
            .endorsement_policy_session(HashingAlgorithm::Sha256)
            .and_then(|(ek_session, _)| {
                let r = self
                    .ctx
                    .execute_with_sessions((Some(iak_session), Some(ek_session), None), |c| {
                        c.activate_credential(iakh, ekh, id, es)
                    })
                    .map_err(step("ActivateCredential (TCG IAK)"));
                self.flush_session(ek_session);
                r
            });
        self.flush_session(iak_session);
        self.flush(ekh);
        Ok(r?.value().to_vec())
    }

    /// TPM2_ActivateCredential of the loaded AK under the loaded EK: the AK (ADMIN role) with
    /// its empty password, the EK (USER role) through its policy.
    pub(super) fn activate_loaded(
        &mut self,
        akh: KeyHandle,
        ekh: KeyHandle,
        ek_alg: EkAlg,
        id: IdObject,
        es: EncryptedSecret,
    ) -> Result<Vec<u8>> {
        let policy = self.ek_policy_session(ek_alg)?;
        let r = self
            .ctx
            .execute_with_sessions((Some(AuthSession::Password), Some(policy), None), |c| {
                c.activate_credential(akh, ekh, id, es)
            })
            .map_err(step("ActivateCredential"));
        self.flush_session(policy);
        Ok(r?.value().to_vec())
    }

    /// TPM2_ActivateCredential: recovers a credential made for the AK under this TPM's EK.
    /// `credential_blob` and `secret` are TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET.
    pub fn activate_credential(
        &mut self,
        ek_alg: EkAlg,
        blob: &AkBlob,
        credential_blob: &[u8],
        secret: &[u8],
    ) -> Result<Vec<u8>> {
        let (id, es) = credential_parts(credential_blob, secret)?;
        self.with_ak(ek_alg, blob, |d, ekh, akh| {
            d.activate_loaded(akh, ekh, ek_alg, id, es)
        })
    }
}

/// A credential as ActivateCredential takes it, from TPM2B_ID_OBJECT and
/// TPM2B_ENCRYPTED_SECRET (each with its size, filling its bytes exactly).
pub(super) fn credential_parts(
    credential_blob: &[u8],
    secret: &[u8],
) -> Result<(IdObject, EncryptedSecret)> {
    let strip = |b: &[u8]| -> Result<Vec<u8>> {
        let mut r = wire::Reader::new(b, "TPM2B");
        let inner = r.tpm2b()?.to_vec();
        r.finish()?;
        Ok(inner)
    };
    Ok((
        IdObject::try_from(strip(credential_blob)?).map_err(step("credential blob"))?,
        EncryptedSecret::try_from(strip(secret)?).map_err(step("encrypted secret"))?,
    ))
}
