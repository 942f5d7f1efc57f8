//! `spire.api.server.agent.v1.Agent`: agent administration (list, show, evict, ban, join tokens)
//! and the agent-facing AttestAgent and RenewAgent.

use super::authz::{require_admin, require_agent};
use super::svid::{parse_csr, x509_svid_proto};
use super::*;
use crate::attestation::{AttestError, Step, join_token};
use crate::ratelimit::Limits;
use kame_api::pb::agent as pb;
use kame_api::pb::agent::agent_server::Agent;
use kame_api::x509svid::ParsedCert;
use std::pin::Pin;
use tokio_stream::Stream;
use tonic::{Request, Response, Streaming};

/// Longest join token TTL accepted (SPIRE has none; ten years keeps expiry arithmetic sane).
pub const MAX_JOIN_TOKEN_TTL: i64 = 10 * 365 * 86400;

/// How long the server waits for an agent's answer to an attestation challenge.
const CHALLENGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct AgentService {
    pub ctx: Arc<Context>,
}

fn attest_status(e: AttestError) -> Status {
    match e {
        AttestError::BadInput(m) => Status::invalid_argument(m),
        AttestError::Denied(m) => Status::permission_denied(m),
        AttestError::Precondition(m) => Status::failed_precondition(m),
        AttestError::Unavailable(m) => Status::unavailable(m),
        AttestError::Internal(m) => {
            tracing::error!(error = %m, "node attestation failed");
            Status::internal(m)
        }
    }
}

/// A plugin's refusal, named as SPIRE names it (`nodeattestor(<name>): …`).
fn plugin_status(name: &str, e: AttestError) -> Status {
    let s = attest_status(e);
    Status::new(s.code(), format!("nodeattestor({name}): {}", s.message()))
}

async fn filtered_agents(
    ctx: &Context,
    f: Option<&pb::AgentFilter>,
) -> Result<Vec<AttestedNode>, Status> {
    let all = ctx.ds.list_nodes().await.map_err(ds_status)?;
    let Some(f) = f else { return Ok(all) };
    let sel = match &f.by_selector_match {
        Some(m) => Some((
            m.selectors
                .iter()
                .map(selector_from_proto)
                .collect::<Result<Vec<_>, _>>()?,
            types::selector_match::MatchBehavior::try_from(m.r#match).map_err(|_| {
                Status::invalid_argument("filter.by_selector_match: unknown match behavior")
            })?,
        )),
        None => None,
    };
    let expires_before = if f.by_expires_before.is_empty() {
        None
    } else {
        // SPIRE's layout (what its CLI sends), or unix seconds.
        Some(
            f.by_expires_before
                .parse::<i64>()
                .ok()
                .or_else(|| kame_api::timefmt::parse_go(&f.by_expires_before))
                .ok_or_else(|| {
                    Status::invalid_argument(
                        "filter.by_expires_before: expected \"2006-01-02 15:04:05 -0700 -07\" or unix seconds",
                    )
                })?,
        )
    };
    Ok(all
        .into_iter()
        .filter(|n| f.by_attestation_type.is_empty() || n.attestation_type == f.by_attestation_type)
        .filter(|n| f.by_banned.is_none_or(|b| n.banned() == b))
        .filter(|n| f.by_can_reattest.is_none_or(|b| n.can_reattest == b))
        .filter(|n| expires_before.is_none_or(|t| n.expires_at < t))
        .filter(|n| {
            sel.as_ref().is_none_or(|(s, m)| {
                use types::selector_match::MatchBehavior as M;
                let have: HashSet<&Selector> = n.selectors.iter().collect();
                let want: HashSet<&Selector> = s.iter().collect();
                match m {
                    M::MatchExact => have == want,
                    M::MatchSubset => have.is_subset(&want),
                    M::MatchSuperset => have.is_superset(&want),
                    M::MatchAny => !have.is_disjoint(&want),
                }
            })
        })
        .collect())
}

fn agent_id_arg(ctx: &Context, id: Option<&types::Spiffeid>) -> Result<SpiffeId, Status> {
    let id = local_id_from_proto(ctx, "id", id)?;
    if !id.path().starts_with("/spire/agent/") {
        return Err(Status::invalid_argument(format!(
            "id: {id} is not an agent ID"
        )));
    }
    Ok(id)
}

impl AgentService {
    /// Attestation itself; `attestor` is set as soon as the agent names it (for the log).
    async fn attest_steps(
        &self,
        req: Request<Streaming<pb::AttestAgentRequest>>,
        peer: &str,
        attestor: &mut String,
    ) -> Result<Response<AttestStream>, Status> {
        Limits::limit(&self.ctx.limits.attestation, &req, 1).await?;
        let mut inbound = req.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            Status::invalid_argument("stream closed before attestation parameters")
        })?;
        let params = match first.step {
            Some(pb::attest_agent_request::Step::Params(p)) => p,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must carry params",
                ));
            }
        };
        let data = params
            .data
            .ok_or_else(|| Status::invalid_argument("params.data: missing attestation data"))?;
        attestor.clone_from(&data.r#type);
        let csr_bytes = params
            .params
            .map(|p| p.csr)
            .ok_or_else(|| Status::invalid_argument("params.params: missing CSR"))?;
        // Validate everything before consuming single-use evidence.
        let csr = parse_csr(&csr_bytes)?;
        let attested = match data.r#type.as_str() {
            join_token::TYPE if self.ctx.join_token_enabled => {
                let id =
                    join_token::agent_id(&self.ctx.td, &data.payload).map_err(attest_status)?;
                let prior = self
                    .ctx
                    .ds
                    .fetch_node(&id.to_string())
                    .await
                    .map_err(ds_status)?;
                if prior.is_some_and(|n| n.banned()) {
                    return Err(Status::permission_denied("agent is banned"));
                }
                join_token::attest(
                    self.ctx.ds.as_ref(),
                    &self.ctx.td,
                    &data.payload,
                    crate::ca::now_secs() as i64,
                )
                .await
                .map_err(attest_status)?
            }
            name if self.ctx.node_attestors.contains_key(name) => {
                let name = name.to_string();
                let attestor = self.ctx.node_attestors[&name].clone();
                let payload = data.payload;
                let a = attestor.clone();
                let step =
                    attest_check(&self.ctx, move || a.begin(&payload, crate::ca::now_secs()))
                        .await?
                        .map_err(|e| plugin_status(&name, e))?;
                let (challenge, pending) = match step {
                    Step::Done(attested) => {
                        let resp = self.complete_attestation(attested, &csr, &name).await?;
                        return Ok(Response::new(Box::pin(tokio_stream::once(Ok(resp)))));
                    }
                    Step::Challenge { challenge, pending } => (challenge, pending),
                };
                // One challenge round: send it, then finish on the agent's response.
                let svc = self.clone();
                let peer = peer.to_string();
                let stream = super::entry::async_stream(move |tx| async move {
                    let first = pb::AttestAgentResponse {
                        step: Some(pb::attest_agent_response::Step::Challenge(challenge)),
                    };
                    if tx.send(Ok(first)).await.is_err() {
                        return;
                    }
                    let result = async {
                        // An agent that never answers must not hold the attempt open.
                        let msg = tokio::time::timeout(CHALLENGE_TIMEOUT, inbound.message())
                            .await
                            .map_err(|_| {
                                Status::deadline_exceeded("no challenge response in time")
                            })??
                            .ok_or_else(|| {
                                Status::invalid_argument(
                                    "stream closed before the challenge response",
                                )
                            })?;
                        let Some(pb::attest_agent_request::Step::ChallengeResponse(r)) = msg.step
                        else {
                            return Err(Status::invalid_argument("expected a challenge response"));
                        };
                        let attested = attest_check(&svc.ctx, move || {
                            attestor.finish(pending, &r, crate::ca::now_secs())
                        })
                        .await?
                        .map_err(|e| plugin_status(&name, e))?;
                        svc.complete_attestation(attested, &csr, &name).await
                    }
                    .await;
                    if let Err(s) = &result {
                        log_refusal(&svc.ctx, &name, &peer, s);
                    }
                    let _ = tx.send(result).await;
                });
                return Ok(Response::new(Box::pin(stream)));
            }
            "" => {
                return Err(Status::invalid_argument(
                    "params.data.type: missing attestor type",
                ));
            }
            other => {
                return Err(Status::invalid_argument(format!(
                    "params.data.type: node attestor {other:?} is not configured"
                )));
            }
        };
        let resp = self
            .complete_attestation(attested, &csr, &data.r#type)
            .await?;
        Ok(Response::new(Box::pin(tokio_stream::once(Ok(resp)))))
    }

    async fn sign_agent_svid(
        &self,
        id: &SpiffeId,
        csr: &kame_api::csr::Csr,
    ) -> Result<(types::X509svid, String, i64), Status> {
        let chain = self
            .ctx
            .ca
            .sign_x509_svid(&csr.spki_der, id, &[], self.ctx.agent_ttl)
            .await
            .map_err(ca_status)?;
        let leaf = ParsedCert::parse(&chain[0]).map_err(|e| Status::internal(e.to_string()))?;
        let serial = leaf.serial_hex();
        let exp = leaf.not_after() as i64;
        Ok((x509_svid_proto(id, chain, "")?, serial, exp))
    }

    /// Records the attested node and signs its SVID: the common end of every attestor. A ban
    /// that lands while the SVID is signed holds: the record of a banned node is not written,
    /// and the SVID is not returned.
    async fn complete_attestation(
        &self,
        attested: crate::attestation::Attested,
        csr: &kame_api::csr::Csr,
        attestation_type: &str,
    ) -> Result<pb::AttestAgentResponse, Status> {
        let id_s = attested.agent_id.to_string();
        let existing = self.ctx.ds.fetch_node(&id_s).await.map_err(ds_status)?;
        if existing.as_ref().is_some_and(|n| n.banned()) {
            return Err(Status::permission_denied("agent is banned"));
        }
        // Into the transparency log before the agent gets its SVID (fails closed as issuance
        // does); recorded while the SVID is signed, so both entries can share a commit.
        let logged = self.ctx.ca.log_event(
            kame_api::ct::EntryType::Attestation,
            serde_json::json!({
                "event": "attest",
                "agent_id": id_s,
                "attestation_type": attestation_type,
                "reattestation": existing.is_some(),
                "selectors": attested
                    .selectors
                    .iter()
                    .map(|s| format!("{}:{}", s.kind, s.value))
                    .collect::<Vec<_>>(),
            }),
            true,
        );
        let (logged, signed) = tokio::join!(logged, self.sign_agent_svid(&attested.agent_id, csr));
        logged.map_err(ca_status)?;
        let (svid, serial, exp) = signed?;
        let reattest = |n: &mut AttestedNode| -> crate::datastore::DsResult<()> {
            n.attestation_type = attestation_type.to_string();
            n.serial_number = serial.clone();
            n.expires_at = exp;
            n.new_serial_number.clear();
            n.new_expires_at = 0;
            n.can_reattest = attested.can_reattest;
            n.selectors = attested.selectors.clone();
            // A TPM reset (resetCount grew) since the last quote is a reboot: count it.
            if let (Some(prev), Some(now)) = (n.tpm_boot, attested.tpm_boot)
                && now.0 > prev.0
            {
                n.tpm_reboots += 1;
            }
            n.tpm_boot = attested.tpm_boot;
            Ok(())
        };
        let node = match &existing {
            Some(prev) => {
                let node = self
                    .ctx
                    .ds
                    .modify_node(&id_s, &reattest)
                    .await
                    .map_err(ds_status)?;
                if node.tpm_reboots > prev.tpm_reboots {
                    tracing::warn!(
                        agent_id = %id_s,
                        reset_count_before = prev.tpm_boot.map(|b| b.0).unwrap_or_default(),
                        reset_count_now = attested.tpm_boot.map(|b| b.0).unwrap_or_default(),
                        reboots = node.tpm_reboots,
                        "agent's TPM was reset (reboot) since its last attestation"
                    );
                }
                node
            }
            None => {
                let mut node = AttestedNode {
                    spiffe_id: id_s.clone(),
                    ..Default::default()
                };
                // Infallible for a new record.
                reattest(&mut node).map_err(ds_status)?;
                self.ctx.ds.create_node(&node).await.map_err(ds_status)?;
                node
            }
        };
        // A re-attested agent's previous SVID stops working here at once.
        if let Err(e) = self.ctx.nodes.refresh().await {
            tracing::warn!(error = %e, "cannot refresh the node cache after a write");
        }
        tracing::info!(agent_id = %node.spiffe_id, attestor = %attestation_type, "agent attested");
        self.ctx.ca.metrics().attestation(attestation_type, false);
        let resp = pb::AttestAgentResponse {
            step: Some(pb::attest_agent_response::Step::Result(
                pb::attest_agent_response::Result {
                    svid: Some(svid),
                    reattestable: attested.can_reattest,
                },
            )),
        };
        Ok(resp)
    }
}

type AttestStream = Pin<Box<dyn Stream<Item = Result<pb::AttestAgentResponse, Status>> + Send>>;

/// A refused attestation, at INFO with the attestor, the peer and the reason, and counted
/// (rate-limited attempts at DEBUG and not counted here: a flood must not flood the log, and
/// the rate limits count their own). The count's attestor label is a configured attestor or
/// `unknown`: the peer chooses what it sends.
fn log_refusal(ctx: &Context, attestor: &str, peer: &str, s: &Status) {
    let known = ctx.node_attestors.contains_key(attestor)
        || (attestor == join_token::TYPE && ctx.join_token_enabled);
    // What a peer sent is logged escaped and cut short, never as it came.
    let shown = if known {
        attestor.to_string()
    } else {
        format!(
            "unknown {:?}",
            attestor.chars().take(64).collect::<String>()
        )
    };
    if s.code() == tonic::Code::ResourceExhausted {
        tracing::debug!(attestor = %shown, peer = %peer, reason = %s.message(), "attestation throttled");
        return;
    }
    tracing::info!(attestor = %shown, peer = %peer, code = ?s.code(), reason = %s.message(), "attestation refused");
    ctx.ca
        .metrics()
        .attestation(if known { attestor } else { "unknown" }, true);
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn count_agents(
        &self,
        req: Request<pb::CountAgentsRequest>,
    ) -> Result<Response<pb::CountAgentsResponse>, Status> {
        require_admin(&self.ctx, &req).await?;
        let n = filtered_agents(&self.ctx, req.get_ref().filter.as_ref())
            .await?
            .len();
        Ok(Response::new(pb::CountAgentsResponse { count: n as i32 }))
    }

    async fn list_agents(
        &self,
        req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        require_admin(&self.ctx, &req).await?;
        let r = req.get_ref();
        let all = filtered_agents(&self.ctx, r.filter.as_ref()).await?;
        let (page, next_page_token) = paginate(all, r.page_size, &r.page_token)?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: page
                .iter()
                .map(|n| agent_to_proto(n, r.output_mask.as_ref()))
                .collect(),
            next_page_token,
        }))
    }

    async fn get_agent(
        &self,
        req: Request<pb::GetAgentRequest>,
    ) -> Result<Response<types::Agent>, Status> {
        require_admin(&self.ctx, &req).await?;
        let r = req.get_ref();
        let id = agent_id_arg(&self.ctx, r.id.as_ref())?;
        let n = self
            .ctx
            .ds
            .fetch_node(&id.to_string())
            .await
            .map_err(ds_status)?
            .ok_or_else(|| Status::not_found("agent not found"))?;
        Ok(Response::new(agent_to_proto(&n, r.output_mask.as_ref())))
    }

    async fn delete_agent(
        &self,
        req: Request<pb::DeleteAgentRequest>,
    ) -> Result<Response<()>, Status> {
        require_admin(&self.ctx, &req).await?;
        let id = agent_id_arg(&self.ctx, req.get_ref().id.as_ref())?;
        self.ctx
            .ds
            .delete_node(&id.to_string())
            .await
            .map_err(ds_status)?;
        // This server stops serving it at once (the others within a poll).
        if let Err(e) = self.ctx.nodes.refresh().await {
            tracing::warn!(error = %e, "cannot refresh the node cache after a write");
        }
        tracing::info!(agent_id = %id, "agent evicted");
        Ok(Response::new(()))
    }

    async fn ban_agent(&self, req: Request<pb::BanAgentRequest>) -> Result<Response<()>, Status> {
        require_admin(&self.ctx, &req).await?;
        let id = agent_id_arg(&self.ctx, req.get_ref().id.as_ref())?;
        self.ctx
            .ds
            .ban_node(&id.to_string())
            .await
            .map_err(ds_status)?;
        // This server stops serving it at once (the others within a poll).
        if let Err(e) = self.ctx.nodes.refresh().await {
            tracing::warn!(error = %e, "cannot refresh the node cache after a write");
        }
        tracing::info!(agent_id = %id, "agent banned");
        Ok(Response::new(()))
    }

    type AttestAgentStream = AttestStream;

    async fn attest_agent(
        &self,
        req: Request<Streaming<pb::AttestAgentRequest>>,
    ) -> Result<Response<AttestStream>, Status> {
        let peer = req
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "local".into());
        let mut attestor = String::new();
        let r = self.attest_steps(req, &peer, &mut attestor).await;
        if let Err(s) = &r {
            log_refusal(&self.ctx, &attestor, &peer, s);
        }
        r
    }

    async fn renew_agent(
        &self,
        req: Request<pb::RenewAgentRequest>,
    ) -> Result<Response<pb::RenewAgentResponse>, Status> {
        let node = require_agent(&self.ctx, &req).await?;
        let csr_bytes = req
            .get_ref()
            .params
            .as_ref()
            .map(|p| p.csr.clone())
            .ok_or_else(|| Status::invalid_argument("params: missing CSR"))?;
        let csr = parse_csr(&csr_bytes)?;
        Limits::limit(&self.ctx.limits.x509_signing, &req, 1).await?;
        let id = SpiffeId::parse(&node.spiffe_id).map_err(|e| Status::internal(e.to_string()))?;
        let (svid, serial, exp) = self.sign_agent_svid(&id, &csr).await?;
        // Only the renewal's own fields: a ban (or anything else) written since the read
        // above stands.
        let renewed = |n: &mut AttestedNode| -> crate::datastore::DsResult<()> {
            n.new_serial_number = serial.clone();
            n.new_expires_at = exp;
            Ok(())
        };
        self.ctx
            .ds
            .modify_node(&node.spiffe_id, &renewed)
            .await
            .map_err(ds_status)?;
        Ok(Response::new(pb::RenewAgentResponse { svid: Some(svid) }))
    }

    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<types::JoinToken>, Status> {
        require_admin(&self.ctx, &req).await?;
        let r = req.get_ref();
        if r.ttl < 1 {
            return Err(Status::invalid_argument("ttl: a positive TTL is required"));
        }
        if r.ttl as i64 > MAX_JOIN_TOKEN_TTL {
            return Err(Status::invalid_argument(format!(
                "ttl: at most {MAX_JOIN_TOKEN_TTL} seconds"
            )));
        }
        let alias = match &r.agent_id {
            None => None,
            Some(id) => {
                let id = local_id_from_proto(&self.ctx, "agent_id", Some(id))?;
                if id.is_root() {
                    return Err(Status::invalid_argument("agent_id: needs a path"));
                }
                Some(id)
            }
        };
        let token = if r.token.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else {
            r.token.clone()
        };
        let agent_id =
            join_token::agent_id(&self.ctx.td, token.as_bytes()).map_err(attest_status)?;
        let expires_at = crate::ca::now_secs() as i64 + r.ttl as i64;
        self.ctx
            .ds
            .create_join_token(&token, expires_at)
            .await
            .map_err(ds_status)?;
        if let Some(alias) = alias {
            let entry = RegistrationEntry {
                id: uuid::Uuid::new_v4().to_string(),
                spiffe_id: alias.to_string(),
                parent_id: agent_id.to_string(),
                selectors: vec![Selector::new("spiffe_id", agent_id.to_string())],
                created_at: crate::ca::now_secs() as i64,
                ..Default::default()
            };
            if let Err(e) = self.ctx.ds.create_entry(&entry).await {
                // Leave nothing half-done: the token goes if its entry could not be created.
                let _ = self.ctx.ds.take_join_token(&token).await;
                return Err(ds_status(e));
            }
        }
        if let Err(e) = self.ctx.entries.refresh().await {
            tracing::warn!(error = %e, "cannot refresh the entry cache after a write");
        }
        tracing::info!(expires_at, "join token created");
        Ok(Response::new(types::JoinToken {
            value: token,
            expires_at,
        }))
    }

    async fn post_status(
        &self,
        req: Request<pb::PostStatusRequest>,
    ) -> Result<Response<pb::PostStatusResponse>, Status> {
        let node = require_agent(&self.ctx, &req).await?;
        let v = &req.get_ref().agent_version;
        if v.len() > 256 {
            return Err(Status::invalid_argument("agent_version: too long"));
        }
        let version = |n: &mut AttestedNode| -> crate::datastore::DsResult<()> {
            n.agent_version = v.clone();
            Ok(())
        };
        self.ctx
            .ds
            .modify_node(&node.spiffe_id, &version)
            .await
            .map_err(ds_status)?;
        Ok(Response::new(pb::PostStatusResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server not set up for certified AKs is a precondition, malformed data bad input, a
    /// failed proof a refusal; each named after its attestor.
    #[test]
    fn tpm_devid_status_codes_say_what_failed() {
        use crate::attestation::tpm_devid::DevIdError as E;
        for (e, code) in [
            (E::CertifiedAkNotConfigured, tonic::Code::FailedPrecondition),
            (E::CertifiedAkInCompatMode, tonic::Code::FailedPrecondition),
            (E::CertifiedAkNeedsV2, tonic::Code::InvalidArgument),
            (E::Missing("AKPub"), tonic::Code::InvalidArgument),
            (E::AkCertMismatch, tonic::Code::PermissionDenied),
            (E::CredentialMismatch, tonic::Code::PermissionDenied),
        ] {
            let s = plugin_status("tpm_devid", e.into());
            assert_eq!(s.code(), code);
            assert!(
                s.message().starts_with("nodeattestor(tpm_devid): "),
                "{s:?}"
            );
        }
    }
}
