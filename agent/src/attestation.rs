//! Node attestation, the agent half: proves the node to the server over
//! `spire.api.server.agent.v1.Agent/AttestAgent` and returns the agent X509-SVID. `join_token`
//! sends its token and expects no challenge; the other attestors are [`AgentAttestor`] plugins
//! of the [`crate::catalog`]: each makes message 1 and answers the server's challenges, and
//! the stream is driven here, once, for all of them. It never stores anything: the caller
//! keeps the SVID.

use kame_api::pb;
use std::sync::Arc;
use tonic::transport::Channel;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    #[error("no join token is configured and the agent has no cached SVID to renew")]
    NoToken,
    #[error("the server refused attestation ({code:?}): {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("the server sent a challenge the {0} attestor does not expect")]
    UnexpectedChallenge(&'static str),
    #[error("the server ended attestation without a result")]
    NoResult,
    /// A plugin's own failure (its evidence, files or keys).
    #[error("nodeattestor({name}): {source}")]
    Plugin {
        name: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl From<tonic::Status> for AttestError {
    fn from(s: tonic::Status) -> Self {
        AttestError::Refused {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

/// The agent half of a node attestor plugin (SPIRE's agent NodeAttestor plugin type).
#[async_trait::async_trait]
pub trait AgentAttestor: Send + Sync + std::fmt::Debug + 'static {
    /// The attestor's name, sent as the attestation data's type.
    fn name(&self) -> &'static str;

    /// Message 1's payload, and what answers the server's challenges to it.
    async fn start(&self) -> Result<(Vec<u8>, Box<dyn Responder>), AttestError>;

    /// For tests and tools that need the plugin's own settings.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// Answers the server's challenges within one attestation.
#[async_trait::async_trait]
pub trait Responder: Send {
    /// The response to `challenge`.
    async fn respond(&mut self, challenge: Vec<u8>) -> Result<Vec<u8>, AttestError>;
}

/// For attestors that expect no challenge.
struct NoChallenge(&'static str);

#[async_trait::async_trait]
impl Responder for NoChallenge {
    async fn respond(&mut self, _: Vec<u8>) -> Result<Vec<u8>, AttestError> {
        Err(AttestError::UnexpectedChallenge(self.0))
    }
}

/// The agent-side node attestors (a join token prints as `***`).
#[derive(Debug, Clone)]
pub enum NodeAttestor {
    JoinToken(Option<kame_api::Secret>),
    Plugin(Arc<dyn AgentAttestor>),
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
            NodeAttestor::Plugin(p) => p.name(),
        }
    }

    /// Whether this attestor can attest now (a join token can be used once).
    pub fn available(&self) -> bool {
        match self {
            NodeAttestor::JoinToken(t) => t.is_some(),
            NodeAttestor::Plugin(_) => true,
        }
    }

    /// Runs AttestAgent on an unauthenticated channel with `csr` for the agent's key.
    pub async fn attest(&self, ch: Channel, csr: Vec<u8>) -> Result<Attested, AttestError> {
        let (payload, mut responder): (Vec<u8>, Box<dyn Responder>) = match self {
            NodeAttestor::JoinToken(None) => return Err(AttestError::NoToken),
            NodeAttestor::JoinToken(Some(t)) => (
                t.expose().as_bytes().to_vec(),
                Box::new(NoChallenge("join_token")),
            ),
            NodeAttestor::Plugin(p) => p.start().await?,
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
                Some(pb::agent::attest_agent_response::Step::Challenge(c)) => {
                    let resp = responder.respond(c).await?;
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
