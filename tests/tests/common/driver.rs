//! tpm_devid message driver: sends SPIRE's three attestation messages to a running server one
//! by one, so a test can tamper with any of them, and checks refusals by code and message.

use super::Env;
use super::devid::{DevId, ek_cas, opts};
use kame_agent::tpm_devid::{Session, answer, evidence};
use kame_api::pb;
use kame_api::tpm_devid::{AttestationRequest, ChallengeResponse};
use kame_tpm::device::Device;
use kame_tpm::testing::SwTpm;
use tonic::Code;

pub type Tx = tokio::sync::mpsc::Sender<pb::agent::AttestAgentRequest>;
pub type Tamper = Box<dyn Fn(&mut AttestationRequest)>;
pub type Rx = tonic::Streaming<pb::agent::AttestAgentResponse>;

/// A server with tpm_devid trusting `devid`'s CA and the swtpm's EK CAs.
pub async fn server(tpm: &SwTpm, devid: &DevId, compat: bool) -> Env {
    let ek_ca = ek_cas(tpm, devid.dir.path());
    let mut o = opts(tpm, devid, &devid.ca, &ek_ca);
    o.agent_attestor = None;
    if compat {
        o.server_plugins = o.server_plugins.replace(
            "endorsement_ca_path",
            "compat_mode = true\n            endorsement_ca_path",
        );
    }
    Env::start(o).await
}

/// Sends message 1; returns the stream and the server's challenge (or its refusal).
pub async fn begin(env: &Env, payload: Vec<u8>) -> Result<(Tx, Rx, Vec<u8>), tonic::Status> {
    begin_typed(env, "tpm_devid", payload).await
}

/// Sends message 1 of node attestor `kind`; returns the stream and the server's challenge (or
/// its refusal).
pub async fn begin_typed(
    env: &Env,
    kind: &str,
    payload: Vec<u8>,
) -> Result<(Tx, Rx, Vec<u8>), tonic::Status> {
    let ch = env.agent_channel().await;
    let key = kame_agent::keys::generate().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(pb::agent::AttestAgentRequest {
        step: Some(pb::agent::attest_agent_request::Step::Params(
            pb::agent::attest_agent_request::Params {
                data: Some(pb::types::AttestationData {
                    r#type: kind.into(),
                    payload,
                }),
                params: Some(pb::agent::AgentX509svidParams {
                    csr: kame_agent::keys::csr(&key).unwrap(),
                }),
            },
        )),
    })
    .await
    .unwrap();
    let mut stream = pb::agent::agent_client::AgentClient::new(ch)
        .attest_agent(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    match stream.message().await?.and_then(|m| m.step) {
        Some(pb::agent::attest_agent_response::Step::Challenge(c)) => Ok((tx, stream, c)),
        other => panic!("expected a challenge, got {other:?}"),
    }
}

/// Sends message 3; returns the agent SPIFFE ID or the refusal.
pub async fn finish(tx: Tx, mut rx: Rx, response: Vec<u8>) -> Result<String, tonic::Status> {
    tx.send(pb::agent::AttestAgentRequest {
        step: Some(pb::agent::attest_agent_request::Step::ChallengeResponse(
            response,
        )),
    })
    .await
    .unwrap();
    match rx.message().await?.and_then(|m| m.step) {
        Some(pb::agent::attest_agent_response::Step::Result(r)) => {
            let svid = r.svid.unwrap();
            let id = svid.id.unwrap();
            Ok(format!("spiffe://{}{}", id.trust_domain, id.path))
        }
        other => panic!("expected a result, got {other:?}"),
    }
}

pub fn tpm_evidence(tpm: &SwTpm, devid: &DevId) -> (AttestationRequest, Session) {
    let mut d = Device::open(&tpm.tcti).unwrap();
    evidence(&mut d, vec![devid.leaf_der.clone()], devid.key.clone()).unwrap()
}

pub fn tpm_answer(tpm: &SwTpm, s: &Session, challenge: &[u8]) -> ChallengeResponse {
    let mut d = Device::open(&tpm.tcti).unwrap();
    answer(&mut d, s, challenge).unwrap()
}

pub fn refused(r: Result<impl std::fmt::Debug, tonic::Status>, code: Code, says: &str) {
    match r {
        Err(s) => {
            assert_eq!(s.code(), code, "{s:?}");
            assert!(
                s.message().contains(says),
                "{says:?} not in {:?}",
                s.message()
            );
        }
        Ok(v) => panic!("accepted: {v:?}"),
    }
}

pub async fn no_agents(env: &Env) {
    let agents = pb::agent::agent_client::AgentClient::new(env.admin().await)
        .list_agents(pb::agent::ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert!(
        agents.iter().all(|a| a.attestation_type != "tpm_devid"),
        "nothing attested through tpm_devid: {agents:?}"
    );
}

/// Runs the agent's tpm_devid attestor with `cfg` against the server in `env`.
pub async fn attest_with(
    env: &Env,
    cfg: &kame_agent::tpm_devid::TpmDevidConfig,
) -> Result<kame_agent::attestation::Attested, kame_agent::attestation::AttestError> {
    let key = kame_agent::keys::generate().unwrap();
    kame_agent::attestation::NodeAttestor::Plugin(std::sync::Arc::new(cfg.clone()))
        .attest(
            env.agent_channel().await,
            kame_agent::keys::csr(&key).unwrap(),
        )
        .await
}
