//! Sessions: HMAC sessions for parameter encryption, and the policy sessions the TCG
//! provisioning guidance uses (PolicySecret on the endorsement hierarchy, PolicyOR over its
//! branches). Every session is flushed by the call that started it.

use super::*;

impl Device {
    /// An unsalted, unbound HMAC session (parameter encryption on), as ESYS's null-auth
    /// session: the object's authorization value keys the HMAC and is never sent. The caller
    /// flushes it.
    pub(super) fn hmac_session(&mut self) -> Result<AuthSession> {
        let session = self
            .ctx
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Hmac,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(step("start HMAC session"))?
            .ok_or_else(|| DeviceError::Invalid("TPM returned no session".into()))?;
        let (attributes, mask) = tss_esapi::attributes::SessionAttributesBuilder::new()
            .with_decrypt(true)
            .with_encrypt(true)
            .build();
        if let Err(e) = self.ctx.tr_sess_set_attributes(session, attributes, mask) {
            self.flush_session(session);
            return Err(step("HMAC session attributes")(e));
        }
        Ok(session)
    }

    /// A policy session satisfying a TCG DevID key's policy for `code` (its ADMIN-role
    /// branch): PolicySecret(endorsement), PolicyCommandCode(code), PolicyOR over the four
    /// branches. The caller flushes it.
    pub(super) fn tcg_admin_session(
        &mut self,
        key: wire::policy::DevIdKey,
        code: tss_esapi::constants::CommandCode,
    ) -> Result<tss_esapi::interface_types::session_handles::AuthSession> {
        let branches = wire::policy::tcg_devid_policy_branches(key, wire::alg::SHA256)?;
        let (session, ps) = self.endorsement_policy_session(HashingAlgorithm::Sha256)?;
        let r = self
            .ctx
            .execute_without_session(|c| c.policy_command_code(ps, code))
            .map_err(step("PolicyCommandCode"))
            .and_then(|_| self.policy_or_branches(ps, &branches, "PolicyOR (TCG DevID policy)"));
        if let Err(e) = r {
            self.flush_session(session);
            return Err(e);
        }
        Ok(session)
    }

    /// A policy session (`hash`) after TPM2_PolicySecret(TPM_RH_ENDORSEMENT) under the
    /// endorsement authorization: what EKs and the TCG DevID keys' policies start with. The
    /// caller flushes it; it is flushed here if PolicySecret fails.
    pub(super) fn endorsement_policy_session(
        &mut self,
        hash: HashingAlgorithm,
    ) -> Result<(AuthSession, PolicySession)> {
        let session = self
            .ctx
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                SymmetricDefinition::AES_128_CFB,
                hash,
            )
            .map_err(step("start policy session"))?
            .ok_or_else(|| DeviceError::Invalid("TPM returned no session".into()))?;
        let r = PolicySession::try_from(session)
            .map_err(step("policy session"))
            .and_then(|ps| self.policy_secret_endorsement(ps).map(|_| ps));
        match r {
            Ok(ps) => Ok((session, ps)),
            Err(e) => {
                self.flush_session(session);
                Err(e)
            }
        }
    }

    /// TPM2_PolicySecret(TPM_RH_ENDORSEMENT) in `ps`, under the endorsement authorization.
    pub(super) fn policy_secret_endorsement(&mut self, ps: PolicySession) -> Result<()> {
        let secret = self.endorsement_auth;
        self.exec_auth(secret, |c| {
            c.policy_secret(
                ps,
                AuthHandle::Endorsement,
                Nonce::default(),
                Digest::default(),
                Nonce::default(),
                None,
            )
        })
        .map(|_| ())
        .map_err(step("PolicySecret(endorsement)"))
    }

    /// TPM2_PolicyOR over `branches` in `ps`.
    pub(super) fn policy_or_branches(
        &mut self,
        ps: PolicySession,
        branches: &[Vec<u8>],
        what: &'static str,
    ) -> Result<()> {
        let mut list = tss_esapi::structures::DigestList::new();
        for b in branches {
            let dg = Digest::try_from(b.clone()).map_err(step("policy digest"))?;
            list.add(dg).map_err(step("policy digest list"))?;
        }
        self.ctx
            .execute_without_session(|c| c.policy_or(ps, list))
            .map_err(step(what))
    }

    pub(super) fn flush_session(&mut self, s: AuthSession) {
        let _ = self.ctx.flush_context(SessionHandle::from(s).into());
    }
}
