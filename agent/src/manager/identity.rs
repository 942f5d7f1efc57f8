//! The agent's own identity: node attestation, the agent X509-SVID installed and renewed (or
//! the node attested again, when its attestor allows) past half its lifetime, and the
//! authenticated channel that SVID opens. It never reads workload state.

use super::*;

impl Manager {
    pub(super) fn current_channel(&self) -> Option<Channel> {
        self.channel.lock().ok().and_then(|c| c.clone())
    }

    pub(super) fn set_channel(&self, ch: Option<Channel>) {
        if let Ok(mut c) = self.channel.lock() {
            *c = ch;
        }
    }

    pub(super) async fn authenticated_channel(&self) -> Result<Channel, ManagerError> {
        if let Some(ch) = self.current_channel() {
            return Ok(ch);
        }
        let agent = self
            .state
            .read()
            .map_err(|_| ManagerError::Poisoned("state"))?
            .agent
            .clone()
            .ok_or(ManagerError::NotAttested)?;
        let ch = client::connect_any_requiring_sct(
            &self.cfg.servers,
            &self.server_id,
            self.roots.clone(),
            Some((agent.chain.clone(), agent.key_pkcs8.to_vec())),
            self.cfg.transparency_log_keys.clone(),
        )
        .await?;
        self.set_channel(Some(ch.clone()));
        Ok(ch)
    }

    /// Attests the node and installs the new agent SVID.
    pub(super) async fn attest(&self) -> Result<(), ManagerError> {
        let attestor = self
            .attestor
            .lock()
            .map(|a| a.clone())
            .map_err(|_| ManagerError::Poisoned("attestor"))?;
        let key = keys::generate()?;
        let csr = keys::csr(&key)?;
        let ch = client::connect_any_requiring_sct(
            &self.cfg.servers,
            &self.server_id,
            self.roots.clone(),
            None,
            self.cfg.transparency_log_keys.clone(),
        )
        .await?;
        let res = attestor.attest(ch, csr).await?;
        if let NodeAttestor::JoinToken(_) = attestor
            && let Ok(mut a) = self.attestor.lock()
        {
            // A join token is single-use: forget it once spent.
            *a = NodeAttestor::JoinToken(None);
        }
        self.install_agent_svid(res.chain, key, res.reattestable)?;
        if let Some(id) = self.agent_id() {
            tracing::info!(agent_id = %id, "node attested");
        }
        Ok(())
    }

    pub(super) fn install_agent_svid(
        &self,
        chain: Vec<Vec<u8>>,
        key: zeroize::Zeroizing<Vec<u8>>,
        reattestable: bool,
    ) -> Result<(), ManagerError> {
        let roots = self.roots.read().map(|r| r.clone()).unwrap_or_default();
        let v = verify_chain(&chain, &roots, now_secs()).map_err(ManagerError::AgentSvidChain)?;
        if !v.id.path().starts_with("/spire/agent/") || !v.id.is_member_of(&self.cfg.trust_domain) {
            return Err(ManagerError::BadAgentSvid(format!(
                "{} is not an agent ID of {}",
                v.id, self.cfg.trust_domain
            )));
        }
        let first = chain
            .first()
            .ok_or_else(|| ManagerError::BadAgentSvid("empty chain".into()))?;
        if !keys::matches_cert(&key, first) {
            return Err(ManagerError::BadAgentSvid(
                "certificate does not carry the agent's key".into(),
            ));
        }
        let id = AgentIdentity {
            chain,
            key_pkcs8: key,
            reattestable,
        };
        self.storage.save_agent(&id)?;
        if self.glass.is_some() {
            if let Err(e) = self.storage.save_record_signer(&id) {
                tracing::warn!(error = %e, "cannot keep the break-glass record's signing key");
            }
            if let Ok(mut s) = self.record_signer.lock() {
                *s = Some(id.clone());
            }
        }
        if let Ok(mut st) = self.state.write() {
            st.agent = Some(id);
        }
        self.set_channel(None);
        Ok(())
    }

    /// Makes sure the agent has a usable SVID: attests when it has none, renews (or
    /// re-attests when allowed) past half its lifetime.
    pub(super) async fn ensure_agent_svid(&self) -> Result<(), ManagerError> {
        let now = now_secs();
        let agent = self.state.read().ok().and_then(|s| s.agent.clone());
        let Some(agent) = agent else {
            return self.attest().await;
        };
        let (nb, na) = match agent.chain.first().map(|c| ParsedCert::parse(c)) {
            Some(Ok(c)) => (c.not_before(), c.not_after()),
            _ => (0, 0),
        };
        if now >= na {
            tracing::warn!("agent SVID expired");
            if let Ok(mut st) = self.state.write() {
                st.agent = None;
            }
            self.set_channel(None);
            self.storage.remove_agent();
            return self.attest().await;
        }
        let tainted = self
            .state
            .read()
            .ok()
            .and_then(|s| s.bundle.as_ref().map(Taint::of))
            .is_some_and(|t| t.taints(&agent.chain, now));
        if tainted {
            tracing::info!("agent SVID chains to a tainted authority: rotating it now");
        } else if now < nb + (na - nb) / 2 {
            return Ok(());
        }
        let can_reattest =
            agent.reattestable && self.attestor.lock().map(|a| a.available()).unwrap_or(false);
        if can_reattest {
            return self.attest().await;
        }
        let key = keys::generate()?;
        let csr = keys::csr(&key)?;
        let ch = self.authenticated_channel().await?;
        let resp = pb::agent::agent_client::AgentClient::new(ch)
            .renew_agent(pb::agent::RenewAgentRequest {
                params: Some(pb::agent::AgentX509svidParams { csr }),
            })
            .await?
            .into_inner();
        let svid = resp
            .svid
            .ok_or_else(|| ManagerError::BadAgentSvid("renewal returned no SVID".into()))?;
        self.install_agent_svid(svid.cert_chain, key, agent.reattestable)?;
        tracing::info!("agent SVID renewed");
        Ok(())
    }
}
