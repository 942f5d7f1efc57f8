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

/// SPIRE's `printAgents`: the expiry as a date, `Banned` in place of the serial number.
pub(super) fn agent_pretty(a: &types::Agent) -> String {
    let mut s = format!(
        "SPIFFE ID         : {}\nAttestation type  : {}\nExpiration time   : {}\n",
        id_str(&a.id),
        a.attestation_type,
        kame_api::timefmt::utc(a.x509svid_expires_at),
    );
    if a.banned {
        s += "Banned            : true\n";
    } else {
        s += &format!("Serial number     : {}\n", a.x509svid_serial_number);
    }
    s += &format!("Can re-attest     : {}\n", a.can_reattest);
    if !a.agent_version.is_empty() {
        s += &format!("Agent version     : {}\n", a.agent_version);
    }
    for sel in &a.selectors {
        s += &format!("Selectors         : {}:{}\n", sel.r#type, sel.value);
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
        /// Token lifetime: seconds or a duration such as 10m.
        #[arg(long, default_value = "600", value_parser = ttl_value)]
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
    let mut c = pb::agent::agent_client::AgentClient::new(common.connect().await?);
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
    /// Lists attested agents (all, or those the filters match).
    ///
    /// Example: kame-server agent list --attestation-type tpm_devid --banned false
    List {
        #[command(flatten)]
        filter: AgentFilterArgs,
        #[command(flatten)]
        common: Common,
    },
    /// Deletes the records of agents whose SVID expired more than --expired-for ago and that
    /// can re-attest (SPIRE's `agent purge`).
    ///
    /// Example: kame-server agent purge --expired-for 720h --dry-run
    Purge {
        /// How long ago the agent's SVID must have expired (a duration).
        #[arg(long, default_value = "720h", value_parser = purge_age)]
        expired_for: std::time::Duration,
        /// Only say which agents would be purged.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Shows one agent.
    Show {
        /// The agent's SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Deletes an agent's attestation record; it must attest again.
    Evict {
        /// The agent's SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Bans an agent: it can neither renew nor attest again until evicted.
    Ban {
        /// The agent's SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Counts attested agents (all, or those the filters match).
    Count {
        #[command(flatten)]
        filter: AgentFilterArgs,
        #[command(flatten)]
        common: Common,
    },
}

fn purge_age(s: &str) -> Result<std::time::Duration, String> {
    kame_api::conf::parse_duration(s)
}

/// SPIRE's `agent list` / `agent count` filters.
#[derive(Debug, Clone, Args)]
pub struct AgentFilterArgs {
    /// A selector `type:value` the agent must have; repeat for several.
    #[arg(long = "selector")]
    pub selectors: Vec<String>,
    /// How the selectors match: exact, any, superset (the agent has all of them) or subset.
    #[arg(long, default_value = "superset")]
    pub match_selectors_on: String,
    /// Only agents attested with this node attestor.
    #[arg(long)]
    pub attestation_type: Option<String>,
    /// `true` or `false`: only agents that can (cannot) re-attest; anything else: all.
    #[arg(long)]
    pub can_reattest: Option<String>,
    /// `true` or `false`: only banned (not banned) agents; anything else: all.
    #[arg(long)]
    pub banned: Option<String>,
    /// Only agents whose SVID expires before this time (`2006-01-02 15:04:05 -0700 -07`, as
    /// SPIRE's flag, or unix seconds).
    #[arg(long)]
    pub expires_before: Option<String>,
}

impl AgentFilterArgs {
    fn filter(&self) -> Result<Option<pb::agent::AgentFilter>, CliError> {
        use types::selector_match::MatchBehavior as M;
        let tri = |v: &Option<String>| match v.as_deref() {
            Some("true") => Some(true),
            Some("false") => Some(false),
            _ => None,
        };
        let by_selector_match = if self.selectors.is_empty() {
            None
        } else {
            let m = match self.match_selectors_on.as_str() {
                "exact" => M::MatchExact,
                "any" => M::MatchAny,
                "superset" => M::MatchSuperset,
                "subset" => M::MatchSubset,
                other => {
                    return Err(CliError::Usage(format!(
                        "--match-selectors-on: {other:?} is not exact, any, superset or subset"
                    )));
                }
            };
            Some(types::SelectorMatch {
                selectors: self
                    .selectors
                    .iter()
                    .map(|s| parse_selector(s))
                    .collect::<Result<_, _>>()?,
                r#match: m as i32,
            })
        };
        if let Some(t) = &self.expires_before
            && t.parse::<i64>().is_err()
            && kame_api::timefmt::parse_go(t).is_none()
        {
            return Err(CliError::Usage(format!(
                "--expires-before: {t:?} is not of the form \"2006-01-02 15:04:05 -0700 -07\""
            )));
        }
        let f = pb::agent::AgentFilter {
            by_attestation_type: self.attestation_type.clone().unwrap_or_default(),
            by_selector_match,
            by_banned: tri(&self.banned),
            by_can_reattest: tri(&self.can_reattest),
            by_expires_before: self.expires_before.clone().unwrap_or_default(),
        };
        Ok((f != pb::agent::AgentFilter::default()).then_some(f))
    }
}

pub async fn agent(cmd: AgentCmd) -> Result<(), CliError> {
    use pb::agent::agent_client::AgentClient;
    match cmd {
        AgentCmd::List { filter, common } => {
            let filter = filter.filter()?;
            let mut c = AgentClient::new(common.connect().await?);
            let r = c
                .list_agents(pb::agent::ListAgentsRequest {
                    filter,
                    output_mask: None,
                    page_size: 0,
                    page_token: String::new(),
                })
                .await?
                .into_inner();
            let pretty = if r.agents.is_empty() {
                "No attested agents found\n".to_string()
            } else {
                format!(
                    "Found {} attested agent{}:\n\n{}",
                    r.agents.len(),
                    if r.agents.len() == 1 { "" } else { "s" },
                    r.agents
                        .iter()
                        .map(|a| format!("{}\n", agent_pretty(a)))
                        .collect::<String>()
                )
            };
            print(
                common.output,
                json!({"agents": r.agents.iter().map(agent_json).collect::<Vec<_>>()}),
                pretty,
            );
        }
        AgentCmd::Show { spiffe_id, common } => {
            let id = parse_id("--spiffe-id", &spiffe_id)?;
            let ch = common.connect().await?;
            let mut c = AgentClient::new(ch.clone());
            let a = c
                .get_agent(pb::agent::GetAgentRequest {
                    id: Some(id_proto(&id)),
                    output_mask: None,
                })
                .await?
                .into_inner();
            // Kame's break-glass records (a SPIRE server has none: Unimplemented).
            let lines = match pb::breakglass::break_glass_client::BreakGlassClient::new(ch)
                .list_records(pb::breakglass::ListRecordsRequest {
                    spiffe_id: id.to_string(),
                    limit: 0,
                })
                .await
            {
                Ok(r) => r.into_inner().lines,
                Err(s) if s.code() == tonic::Code::Unimplemented => vec![],
                Err(s) => return Err(s.into()),
            };
            let mut j = agent_json(&a);
            let mut p = agent_pretty(&a);
            if !lines.is_empty() {
                let (events, text) = break_glass_report(&lines);
                j["break_glass"] = events;
                p.push_str(&text);
            }
            print(common.output, j, p);
        }
        AgentCmd::Evict { spiffe_id, common } => {
            let id = parse_id("--spiffe-id", &spiffe_id)?;
            let mut c = AgentClient::new(common.connect().await?);
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
            let mut c = AgentClient::new(common.connect().await?);
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
        AgentCmd::Purge {
            expired_for,
            dry_run,
            common,
        } => purge(expired_for, dry_run, common).await?,
        AgentCmd::Count { filter, common } => {
            let filter = filter.filter()?;
            let mut c = AgentClient::new(common.connect().await?);
            let n = c
                .count_agents(pb::agent::CountAgentsRequest { filter })
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

/// `agent purge`: SPIRE's selection (agents that can re-attest, their SVID expired longer ago
/// than `expired_for`) and report; each deletion is its own call, a failure reported and the
/// rest carried on.
async fn purge(
    expired_for: std::time::Duration,
    dry_run: bool,
    common: Common,
) -> Result<(), CliError> {
    use pb::agent::agent_client::AgentClient;
    let mut c = AgentClient::new(common.connect().await?);
    let agents = c
        .list_agents(pb::agent::ListAgentsRequest {
            filter: Some(pb::agent::AgentFilter {
                by_can_reattest: Some(true),
                ..Default::default()
            }),
            output_mask: None,
            page_size: 0,
            page_token: String::new(),
        })
        .await?
        .into_inner()
        .agents;
    let cutoff = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
        - i64::try_from(expired_for.as_secs()).unwrap_or(i64::MAX);
    let mut results = vec![];
    for a in agents.iter().filter(|a| a.x509svid_expires_at < cutoff) {
        let error = if dry_run {
            None
        } else {
            c.delete_agent(pb::agent::DeleteAgentRequest { id: a.id.clone() })
                .await
                .err()
                .map(|s| s.message().to_string())
        };
        results.push((id_str(&a.id), !dry_run && error.is_none(), error));
    }
    let json_v = json!({"expired_agents": results.iter().map(|(id, deleted, error)| {
        json!({"agent_id": id, "deleted": deleted, "error": error.clone().unwrap_or_default()})
    }).collect::<Vec<_>>()});
    let mut pretty = String::new();
    if results.is_empty() {
        pretty += "No agents to purge.\n";
    } else {
        let n = results.len();
        pretty += &format!(
            "Found {n} expired agent{}\n\n",
            if n == 1 { "" } else { "s" }
        );
        if dry_run {
            pretty += "\nAgents that can be purged:\n";
            for (id, _, _) in &results {
                pretty += &format!("SPIFFE ID         : {id}\n");
            }
        } else {
            if results.iter().any(|r| r.1) {
                pretty += "Agents purged:\n";
                for (id, _, _) in results.iter().filter(|r| r.1) {
                    pretty += &format!("SPIFFE ID         : {id}\n");
                }
            }
            if results.iter().any(|r| !r.1) {
                pretty += "Agents not purged:\n";
                for (id, _, e) in results.iter().filter(|r| !r.1) {
                    pretty += &format!(
                        "SPIFFE ID         : {id}\nError             : {}\n",
                        e.clone().unwrap_or_default()
                    );
                }
            }
        }
    }
    print(common.output, json_v, pretty);
    Ok(())
}

/// An agent's break-glass record lines as JSON events and as text (what `agent show` adds):
/// each opening (when, why, until), each reserve SVID delivered, each closing.
pub fn break_glass_report(lines: &[pb::breakglass::RecordLine]) -> (serde_json::Value, String) {
    let mut events = vec![];
    let mut text = String::from("\nBreak-glass record:\n");
    for l in lines {
        let body = serde_json::from_str::<kame_api::breakglass::Line>(&l.line)
            .ok()
            .and_then(|line| serde_json::from_str::<kame_api::breakglass::Body>(&line.body).ok());
        let Some(b) = body else {
            continue;
        };
        let when = kame_api::timefmt::utc(b.time as i64);
        use kame_api::breakglass::Event;
        let line = match &b.event {
            Event::Open {
                reason,
                closes_at,
                token,
                ..
            } => format!(
                "  #{} {when} OPENED until {}: {reason:?}{}\n",
                b.seq,
                kame_api::timefmt::utc(*closes_at as i64),
                token
                    .as_ref()
                    .map(|t| format!(" (token {t:?})"))
                    .unwrap_or_default()
            ),
            Event::Deliver {
                spiffe_id,
                serial,
                not_after,
                selectors,
                ..
            } => format!(
                "  #{} {when} delivered {spiffe_id:?} serial {serial:?} valid until {} to {:?}\n",
                b.seq,
                kame_api::timefmt::utc(*not_after as i64),
                selectors.join(",")
            ),
            Event::Close { cause } => format!("  #{} {when} CLOSED: {cause:?}\n", b.seq),
        };
        text.push_str(&line);
        let mut e = serde_json::to_value(&b.event).unwrap_or_default();
        e["seq"] = json!(b.seq);
        e["time"] = json!(b.time);
        if let Some(o) = e.as_object_mut() {
            o.remove("signer_chain");
        }
        events.push(e);
    }
    (serde_json::Value::Array(events), text)
}
