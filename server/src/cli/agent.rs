//! `kame-server agent list|show|evict|ban|count` and `kame-server token generate`: the Agent
//! API on the admin socket, with SPIRE's flags and output. It only calls the API.

use super::*;

pub(super) fn agent_json(a: &types::Agent) -> Value {
    json!({
        "id": id_str(&a.id),
        "attestation_type": a.attestation_type,
        "x509svid_serial_number": a.x509svid_serial_number,
        "x509svid_expires_at": a.x509svid_expires_at,
        "selectors": a.selectors.iter().map(|s| json!({"type": s.r#type, "value": s.value})).collect::<Vec<_>>(),
        "banned": a.banned,
        "can_reattest": a.can_reattest,
        "agent_version": a.agent_version,
    })
}

pub(super) fn agent_pretty(a: &types::Agent) -> String {
    let mut s = format!(
        "SPIFFE ID         : {}\nAttestation type  : {}\nExpiration time   : {}\nSerial number     : {}\nCan re-attest     : {}\n",
        id_str(&a.id),
        a.attestation_type,
        a.x509svid_expires_at,
        a.x509svid_serial_number,
        a.can_reattest
    );
    if a.banned {
        s += "Banned            : true\n";
    }
    for sel in &a.selectors {
        s += &format!("Selector          : {}:{}\n", sel.r#type, sel.value);
    }
    s
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Generates a join token.
    Generate {
        /// Also register this SPIFFE ID for the agent that uses the token.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Token lifetime in seconds.
        #[arg(long, default_value_t = 600)]
        ttl: i64,
        #[command(flatten)]
        common: Common,
    },
}

pub async fn token(cmd: TokenCmd) -> Result<(), CliError> {
    let TokenCmd::Generate {
        spiffe_id,
        ttl,
        common,
    } = cmd;
    let ttl = ttl_arg("--ttl", Some(ttl))?;
    let agent_id = spiffe_id
        .as_deref()
        .map(|s| parse_id("--spiffe-id", s).map(|i| id_proto(&i)))
        .transpose()?;
    let mut c = pb::agent::agent_client::AgentClient::new(connect(&common.socket_path).await?);
    let t = c
        .create_join_token(pb::agent::CreateJoinTokenRequest {
            ttl,
            token: String::new(),
            agent_id,
        })
        .await?
        .into_inner();
    print(
        common.output,
        json!({"value": t.value, "expires_at": t.expires_at}),
        format!("Token: {}\n", t.value),
    );
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum AgentCmd {
    /// Lists attested agents.
    List {
        #[command(flatten)]
        common: Common,
    },
    /// Shows one agent.
    Show {
        #[arg(long)]
        spiffe_id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Deletes an agent's attestation record; it must attest again.
    Evict {
        #[arg(long)]
        spiffe_id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Bans an agent: it can neither renew nor attest again until evicted.
    Ban {
        #[arg(long)]
        spiffe_id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Counts attested agents.
    Count {
        #[command(flatten)]
        common: Common,
    },
}

pub async fn agent(cmd: AgentCmd) -> Result<(), CliError> {
    use pb::agent::agent_client::AgentClient;
    match cmd {
        AgentCmd::List { common } => {
            let mut c = AgentClient::new(connect(&common.socket_path).await?);
            let r = c
                .list_agents(pb::agent::ListAgentsRequest {
                    filter: None,
                    output_mask: None,
                    page_size: 0,
                    page_token: String::new(),
                })
                .await?
                .into_inner();
            let pretty = format!(
                "Found {} attested agent{}:\n\n{}",
                r.agents.len(),
                if r.agents.len() == 1 { "" } else { "s" },
                r.agents
                    .iter()
                    .map(|a| format!("{}\n", agent_pretty(a)))
                    .collect::<String>()
            );
            print(
                common.output,
                json!({"agents": r.agents.iter().map(agent_json).collect::<Vec<_>>()}),
                pretty,
            );
        }
        AgentCmd::Show { spiffe_id, common } => {
            let id = parse_id("--spiffe-id", &spiffe_id)?;
            let mut c = AgentClient::new(connect(&common.socket_path).await?);
            let a = c
                .get_agent(pb::agent::GetAgentRequest {
                    id: Some(id_proto(&id)),
                    output_mask: None,
                })
                .await?
                .into_inner();
            print(common.output, agent_json(&a), agent_pretty(&a));
        }
        AgentCmd::Evict { spiffe_id, common } => {
            let id = parse_id("--spiffe-id", &spiffe_id)?;
            let mut c = AgentClient::new(connect(&common.socket_path).await?);
            c.delete_agent(pb::agent::DeleteAgentRequest {
                id: Some(id_proto(&id)),
            })
            .await?;
            print(
                common.output,
                json!({"evicted": spiffe_id}),
                "Agent evicted successfully\n".into(),
            );
        }
        AgentCmd::Ban { spiffe_id, common } => {
            let id = parse_id("--spiffe-id", &spiffe_id)?;
            let mut c = AgentClient::new(connect(&common.socket_path).await?);
            c.ban_agent(pb::agent::BanAgentRequest {
                id: Some(id_proto(&id)),
            })
            .await?;
            print(
                common.output,
                json!({"banned": spiffe_id}),
                "Agent banned successfully\n".into(),
            );
        }
        AgentCmd::Count { common } => {
            let mut c = AgentClient::new(connect(&common.socket_path).await?);
            let n = c
                .count_agents(pb::agent::CountAgentsRequest { filter: None })
                .await?
                .into_inner()
                .count;
            print(
                common.output,
                json!({"count": n}),
                format!("{n} attested agent{}\n", if n == 1 { "" } else { "s" }),
            );
        }
    }
    Ok(())
}
