//! Node attestation, the agent half: proves the node to the server over
//! `spire.api.server.agent.v1.Agent/AttestAgent` and returns the agent X509-SVID. Attestors are
//! challenge–response state machines; `join_token` sends its token and expects no challenge.
//! It never stores anything: the caller keeps the SVID.

use kame_api::pb;
use tonic::transport::Channel;

#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error("no join token is configured and the agent has no cached SVID to renew")]
    NoToken,
    #[error("the server refused attestation ({code:?}): {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("the server sent a challenge the {0} attestor does not expect")]
    UnexpectedChallenge(&'static str),
    #[error("the server ended attestation without a result")]
    NoResult,
    #[error("nodeattestor(tpm_devid): {0}")]
    TpmDevid(#[from] crate::tpm_devid::DevIdAgentError),
}

impl From<tonic::Status> for AttestError {
    fn from(s: tonic::Status) -> Self {
        AttestError::Refused {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

/// The agent-side node attestors.
#[derive(Clone)]
pub enum NodeAttestor {
    JoinToken(Option<String>),
    TpmDevid(Box<crate::tpm_devid::TpmDevidConfig>),
}

impl std::fmt::Debug for NodeAttestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // the token is a secret until used
            NodeAttestor::JoinToken(_) => f.write_str("NodeAttestor::JoinToken"),
            NodeAttestor::TpmDevid(c) => write!(f, "NodeAttestor::TpmDevid({c:?})"),
        }
    }
}

/// The result of attestation.
#[derive(Debug, Clone)]
pub struct Attested {
    pub chain: Vec<Vec<u8>>,
    pub reattestable: bool,
}

impl NodeAttestor {
    pub fn name(&self) -> &'static str {
        match self {
            NodeAttestor::JoinToken(_) => "join_token",
            NodeAttestor::TpmDevid(_) => "tpm_devid",
        }
    }

    /// Whether this attestor can attest now (a join token can be used once).
    pub fn available(&self) -> bool {
        match self {
            NodeAttestor::JoinToken(t) => t.is_some(),
            NodeAttestor::TpmDevid(_) => true,
        }
    }

    /// Runs AttestAgent on an unauthenticated channel with `csr` for the agent's key.
    pub async fn attest(&self, ch: Channel, csr: Vec<u8>) -> Result<Attested, AttestError> {
        let mut tpm = None;
        let payload = match self {
            NodeAttestor::JoinToken(None) => return Err(AttestError::NoToken),
            NodeAttestor::JoinToken(Some(t)) => t.as_bytes().to_vec(),
            NodeAttestor::TpmDevid(cfg) => {
                let dev = kame_tpm::device::SharedDevice::open(&cfg.tcti)
                    .await
                    .map_err(crate::tpm_devid::DevIdAgentError::from)?;
                let c = cfg.clone();
                let (payload, session) = dev
                    .run(move |d| {
                        crate::tpm_devid::request(d, &c).map_err(|e| match e {
                            crate::tpm_devid::DevIdAgentError::Tpm(t) => t,
                            other => kame_tpm::device::DeviceError::Invalid(other.to_string()),
                        })
                    })
                    .await
                    .map_err(crate::tpm_devid::DevIdAgentError::from)?;
                tpm = Some((dev, std::sync::Arc::new(session)));
                payload
            }
        };
        let first = pb::agent::AttestAgentRequest {
            step: Some(pb::agent::attest_agent_request::Step::Params(
                pb::agent::attest_agent_request::Params {
                    data: Some(pb::types::AttestationData {
                        r#type: self.name().into(),
                        payload,
                    }),
                    params: Some(pb::agent::AgentX509svidParams { csr }),
                },
            )),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tx.send(first).await.map_err(|_| AttestError::NoResult)?;
        let mut stream = pb::agent::agent_client::AgentClient::new(ch)
            .attest_agent(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        let mut answered = false;
        loop {
            let Some(msg) = stream.message().await? else {
                return Err(AttestError::NoResult);
            };
            match msg.step {
                Some(pb::agent::attest_agent_response::Step::Result(r)) => {
                    let svid = r.svid.ok_or(AttestError::NoResult)?;
                    drop(tx);
                    return Ok(Attested {
                        chain: svid.cert_chain,
                        reattestable: r.reattestable,
                    });
                }
                // One challenge round, answered by the attestor that expects it.
                Some(pb::agent::attest_agent_response::Step::Challenge(c)) => {
                    let Some((dev, session)) = tpm.as_ref().filter(|_| !answered) else {
                        return Err(AttestError::UnexpectedChallenge(self.name()));
                    };
                    let session = session.clone();
                    let resp = dev
                        .run(move |d| {
                            crate::tpm_devid::respond(d, &session, &c).map_err(|e| match e {
                                crate::tpm_devid::DevIdAgentError::Tpm(t) => t,
                                other => kame_tpm::device::DeviceError::Invalid(other.to_string()),
                            })
                        })
                        .await
                        .map_err(crate::tpm_devid::DevIdAgentError::from)?;
                    answered = true;
                    tx.send(pb::agent::AttestAgentRequest {
                        step: Some(pb::agent::attest_agent_request::Step::ChallengeResponse(
                            resp,
                        )),
                    })
                    .await
                    .map_err(|_| AttestError::NoResult)?;
                }
                None => return Err(AttestError::NoResult),
            }
        }
    }
}
