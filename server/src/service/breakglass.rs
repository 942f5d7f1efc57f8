//! `kame.breakglass.v1.BreakGlass` (Kame's own, on the agents' port): reserve X509-SVIDs for
//! agents (certificates for a future validity slice, with the break-glass certificate policy,
//! that the agent serves only when its operator breaks the glass during a server outage). A
//! reserve is minted only for an agent attested by a node attestor that `server.break_glass`
//! allows, for an entry the agent is authorized for, and for a slice inside the window the
//! settings allow; it goes through the CA like every SVID (and into the transparency log).
//! It also takes the break-glass records agents report when servers answer again (every line
//! checked: sequence, hash chain, signatures, the signing key the agent's), stores them, emits
//! an audit event per line and records each in the transparency log, and lists them to
//! admins. This module never decides that the glass is broken: the agent does.

use super::authz::require_agent;
use super::*;
use crate::datastore::{BreakGlassRow, DsError};
use kame_api::breakglass as rec;
use kame_api::pb::breakglass as pb;
use kame_api::pb::breakglass::break_glass_server::BreakGlass;
use tonic::{Request, Response};

/// The audience of a break-glass token (a JWT-SVID for an agent's own SPIFFE ID that admins
/// mint in advance); agents refuse a token without it, and workloads cannot get one.
pub const TOKEN_AUDIENCE: &str = "kame-break-glass";

/// Most reserves one BatchNewReserveX509SVID call may request.
pub const MAX_BATCH: usize = 500;

/// Most slices one `max_extension` may hold (each is a certificate per entry per agent).
pub const MAX_SLICES: u64 = 48;

/// `server.break_glass`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// How far past a workload's SVID its reserves reach.
    pub max_extension: Duration,
    /// The validity of one reserve; slices start at multiples of it since the Unix epoch.
    pub slice: Duration,
    /// Agents attested by these node attestors may hold reserves.
    pub node_attestors: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_extension: Duration::from_secs(24 * 3600),
            slice: Duration::from_secs(6 * 3600),
            node_attestors: vec!["tpm_devid".into()],
        }
    }
}

/// The slice starts a reserve may have at `now` for an entry whose SVIDs live `ttl`: from the
/// slice holding `now` to the one holding `now + ttl + max_extension`.
pub fn slice_window(s: &Settings, now: u64, ttl: Duration) -> (u64, u64) {
    let len = s.slice.as_secs().max(1);
    let first = now - now % len;
    let reach = now
        .saturating_add(ttl.as_secs())
        .saturating_add(s.max_extension.as_secs());
    (first, reach - reach % len)
}

#[derive(Debug, Clone)]
pub struct BreakGlassService {
    pub ctx: Arc<Context>,
}

impl BreakGlassService {
    async fn reserve(
        &self,
        s: &Settings,
        node: &AttestedNode,
        p: &pb::ReserveParams,
    ) -> Result<types::X509svid, Status> {
        if p.entry_id.is_empty() {
            return Err(Status::invalid_argument("entry_id: missing"));
        }
        let e = authorized_entry(&self.ctx, node, &p.entry_id).await?;
        let ttl = ttl_or_default(
            "x509_svid_ttl",
            e.x509_svid_ttl,
            self.ctx.default_x509_svid_ttl,
        )?;
        let len = s.slice.as_secs();
        let start = u64::try_from(p.slice_start)
            .ok()
            .filter(|v| v % len == 0)
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "slice_start: {} is not a multiple of the slice length ({len} s)",
                    p.slice_start
                ))
            })?;
        let (first, last) = slice_window(s, crate::ca::now_secs(), ttl);
        if start < first || start > last {
            // Which slices are open depends on the time: not a malformed request.
            return Err(Status::failed_precondition(format!(
                "slice_start: {start} is outside the slices this entry may reserve now ({first} to {last})"
            )));
        }
        let end = start + len;
        let ca_end = self
            .ctx
            .ca
            .current_x509()
            .map(|a| a.issuer.not_after)
            .ok_or_else(|| Status::unavailable("the X.509 authority is not ready"))?;
        if ca_end < end {
            return Err(Status::failed_precondition(format!(
                "the active X.509 authority expires at {ca_end}, before the slice ends ({end}); \
                 ask again after the next authority is active"
            )));
        }
        let csr = super::svid::parse_csr(&p.csr)?;
        let id = SpiffeId::parse(&e.spiffe_id).map_err(|e| Status::internal(e.to_string()))?;
        let chain = self
            .ctx
            .ca
            .sign_reserve_x509_svid(
                &csr.spki_der,
                &id,
                &e.dns_names,
                start.saturating_sub(kame_api::x509svid::BACKDATE.as_secs()),
                end,
            )
            .await
            .map_err(ca_status)?;
        super::svid::x509_svid_proto(&id, chain, &e.hint)
    }
}

#[tonic::async_trait]
impl BreakGlass for BreakGlassService {
    async fn batch_new_reserve_x509svid(
        &self,
        req: Request<pb::BatchNewReserveX509svidRequest>,
    ) -> Result<Response<pb::BatchNewReserveX509svidResponse>, Status> {
        let node = require_agent(&self.ctx, &req).await?;
        let Some(s) = self.ctx.break_glass.clone() else {
            return Err(Status::failed_precondition(
                "break-glass is not enabled on this server (server.break_glass)",
            ));
        };
        if !s.node_attestors.contains(&node.attestation_type) {
            return Err(Status::permission_denied(format!(
                "agents attested with {:?} may not hold reserve SVIDs (server.break_glass.node_attestors: {:?})",
                node.attestation_type, s.node_attestors
            )));
        }
        let r = req.get_ref();
        if r.params.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_BATCH} reserves per batch"
            )));
        }
        crate::ratelimit::Limits::limit(&self.ctx.limits.x509_signing, &req, r.params.len())
            .await?;
        // Minted together, as BatchNewX509SVID: log entries share one append.
        let results = futures::future::join_all(r.params.iter().map(|p| async {
            match self.reserve(&s, &node, p).await {
                Ok(svid) => pb::batch_new_reserve_x509svid_response::Result {
                    status: Some(ok_status()),
                    svid: Some(svid),
                },
                Err(st) => pb::batch_new_reserve_x509svid_response::Result {
                    status: Some(status_of(&st)),
                    svid: None,
                },
            }
        }))
        .await;
        Ok(Response::new(pb::BatchNewReserveX509svidResponse {
            results,
            slice_seconds: s.slice.as_secs() as i64,
            max_extension_seconds: s.max_extension.as_secs() as i64,
        }))
    }

    async fn report_record(
        &self,
        req: Request<pb::ReportRecordRequest>,
    ) -> Result<Response<pb::ReportRecordResponse>, Status> {
        let node = require_agent(&self.ctx, &req).await?;
        let lines = &req.get_ref().lines;
        if lines.len() > MAX_REPORT {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_REPORT} record lines per report"
            )));
        }
        // Each line becomes a log entry: the signing rate limit applies per line.
        crate::ratelimit::Limits::limit(&self.ctx.limits.x509_signing, &req, lines.len()).await?;
        let agent = node.spiffe_id.clone();
        let last = self
            .ctx
            .ds
            .last_break_glass(&agent)
            .await
            .map_err(ds_status)?;
        let tip = match &last {
            None => rec::Tip::default(),
            Some(row) => tip_after(row)?,
        };
        // Lines the server already holds (an acknowledgement lost on the way) are skipped, if
        // they are those lines: a record started again under this agent's ID is refused.
        let mut fresh = vec![];
        let mut held = vec![];
        for l in lines {
            let seq = serde_json::from_str::<rec::Line>(l)
                .ok()
                .and_then(|line| serde_json::from_str::<rec::Body>(&line.body).ok())
                .map(|b| b.seq);
            match seq {
                Some(s) if s < tip.next_seq => held.push((s, l)),
                _ => fresh.push(l.clone()),
            }
        }
        if let Some(first) = held.iter().map(|(s, _)| *s).min() {
            let stored = self
                .ctx
                .ds
                .list_break_glass(&agent, (tip.next_seq - first) as i64)
                .await
                .map_err(ds_status)?;
            for (seq, l) in &held {
                if !stored.iter().any(|r| r.seq == *seq && r.line == **l) {
                    tracing::warn!(
                        target: "kame_audit",
                        r#type = "audit",
                        agent_id = %agent,
                        seq,
                        "BREAK-GLASS record refused: a line differs from the one the server holds"
                    );
                    return Err(Status::failed_precondition(format!(
                        "break-glass record line {seq} differs from the line the server holds: \
                         the record was started again or changed"
                    )));
                }
            }
        }
        let (bodies, _) = rec::verify(&fresh, tip, Some(&agent))
            .map_err(|e| Status::invalid_argument(format!("break-glass record: {e}")))?;
        // Each opening's key must be this agent's: its chain names the agent and verifies
        // against the bundle.
        let bundle = self.ctx.ds.fetch_bundle(&self.ctx.td.to_string()).await;
        let roots: Vec<Vec<u8>> = match bundle {
            Ok(Some(b)) => b.x509_authorities.iter().map(|c| c.asn1.clone()).collect(),
            Ok(None) => vec![],
            Err(e) => return Err(ds_status(e)),
        };
        for (i, b) in bodies.iter().enumerate() {
            if let rec::Event::Open { signer_chain, .. } = &b.event {
                check_signer(&agent, b, signer_chain, &roots).map_err(|m| {
                    Status::invalid_argument(format!("break-glass record line {}: {m}", i + 1))
                })?;
            }
        }
        // Into the transparency log first: a report that fails after this is sent again and
        // logged twice, never not at all.
        for b in &bodies {
            let event = serde_json::to_value(&b.event).unwrap_or_default();
            self.ctx
                .ca
                .log_event(
                    kame_api::ct::EntryType::BreakGlass,
                    serde_json::json!({
                        "agent_id": agent,
                        "seq": b.seq,
                        "time": b.time,
                        "event": event,
                    }),
                    true,
                )
                .await
                .map_err(ca_status)?;
        }
        let rows: Vec<BreakGlassRow> = bodies
            .iter()
            .zip(&fresh)
            .map(|(b, l)| BreakGlassRow {
                seq: b.seq,
                time: b.time,
                kind: kind_of(&b.event).into(),
                line: l.clone(),
            })
            .collect();
        match self.ctx.ds.append_break_glass(&agent, &rows).await {
            Ok(()) => {}
            // Another server stored the same report first: the caller sends again.
            Err(DsError::AlreadyExists(_)) => {
                return Err(Status::aborted(
                    "another server stored part of this record at the same time; report again",
                ));
            }
            Err(e) => return Err(ds_status(e)),
        }
        for b in &bodies {
            let event = serde_json::to_value(&b.event).unwrap_or_default();
            tracing::warn!(
                target: "kame_audit",
                r#type = "audit",
                agent_id = %agent,
                seq = b.seq,
                time = b.time,
                event = %event,
                "BREAK-GLASS record line received"
            );
        }
        let acknowledged = bodies
            .last()
            .map(|b| b.seq)
            .or(last.map(|r| r.seq))
            .unwrap_or(0);
        Ok(Response::new(pb::ReportRecordResponse { acknowledged }))
    }

    async fn list_records(
        &self,
        req: Request<pb::ListRecordsRequest>,
    ) -> Result<Response<pb::ListRecordsResponse>, Status> {
        super::authz::require_admin(&self.ctx, &req).await?;
        let r = req.get_ref();
        if r.spiffe_id.is_empty() {
            return Err(Status::invalid_argument("spiffe_id: missing"));
        }
        let limit = match r.limit {
            0 => 1000,
            n if (1..=10_000).contains(&n) => n,
            n => {
                return Err(Status::invalid_argument(format!(
                    "limit: {n} is not from 1 to 10000"
                )));
            }
        };
        let rows = self
            .ctx
            .ds
            .list_break_glass(&r.spiffe_id, i64::from(limit))
            .await
            .map_err(ds_status)?;
        Ok(Response::new(pb::ListRecordsResponse {
            lines: rows
                .into_iter()
                .map(|r| pb::RecordLine {
                    seq: r.seq,
                    time: r.time as i64,
                    kind: r.kind,
                    line: r.line,
                })
                .collect(),
        }))
    }
}

/// Most record lines one report may carry (each is a signature check, an audit event and a
/// transparency log entry).
pub const MAX_REPORT: usize = 500;

fn kind_of(e: &rec::Event) -> &'static str {
    match e {
        rec::Event::Open { .. } => "open",
        rec::Event::Deliver { .. } => "deliver",
        rec::Event::Close { .. } => "close",
    }
}

/// Where the stored record of an agent ends, from its last line (verified when stored).
fn tip_after(row: &BreakGlassRow) -> Result<rec::Tip, Status> {
    let bad = |m: String| Status::internal(format!("stored break-glass line {}: {m}", row.seq));
    let line: rec::Line = serde_json::from_str(&row.line).map_err(|e| bad(e.to_string()))?;
    let body: rec::Body = serde_json::from_str(&line.body).map_err(|e| bad(e.to_string()))?;
    Ok(rec::Tip {
        next_seq: body.seq + 1,
        prev: rec::body_hash(&line.body),
        key: Some(body.key.clone()),
        agent: Some(body.agent),
    })
}

/// Checks that an opening's key is the agent's: the chain's leaf holds the key, names the
/// agent, and chains to `roots` at the opening's time (or the leaf's last second, when the
/// opening came after it: an outage may outlast the agent's SVID).
fn check_signer(
    agent: &str,
    body: &rec::Body,
    chain_b64: &[String],
    roots: &[Vec<u8>],
) -> Result<(), String> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    if chain_b64.is_empty() || chain_b64.len() > 8 {
        return Err("the opening names no signer chain (or more than 8 certificates)".into());
    }
    let chain = chain_b64
        .iter()
        .map(|c| b64.decode(c))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("signer chain: {e}"))?;
    let leaf = kame_api::x509svid::ParsedCert::parse(&chain[0]).map_err(|e| e.to_string())?;
    let spki = leaf.spki_der().map_err(|e| e.to_string())?;
    if b64.encode(&spki) != body.key {
        return Err("the signing key is not the signer chain's".into());
    }
    let id = leaf.spiffe_id().map_err(|e| e.to_string())?;
    if id.to_string() != agent {
        return Err(format!("the signer chain is {id}'s, not this agent's"));
    }
    let (nb, na) = (leaf.not_before(), leaf.not_after());
    if nb >= na {
        return Err("the signer certificate's validity is empty".into());
    }
    if body.time < nb {
        return Err("the glass was broken before the signer certificate was valid".into());
    }
    // At the opening, or at the certificate's last second if the opening came after it (an
    // outage may outlast the agent's SVID; its key stays the agent's).
    let at = body.time.min(na - 1);
    kame_api::x509svid::verify_chain(&chain, roots, at)
        .map_err(|e| format!("the signer chain does not verify against the bundle: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slices start at multiples of the slice length; the window runs from the slice holding
    /// now to the one holding now + TTL + max_extension.
    #[test]
    fn break_glass_slice_window_is_aligned_and_bounded() {
        let s = Settings {
            max_extension: Duration::from_secs(24 * 3600),
            slice: Duration::from_secs(6 * 3600),
            node_attestors: vec![],
        };
        let now = 1_000_000_000;
        let (first, last) = slice_window(&s, now, Duration::from_secs(3600));
        assert_eq!(first % 21_600, 0);
        assert!(first <= now && now < first + 21_600);
        assert_eq!(last % 21_600, 0);
        let reach = now + 3600 + 24 * 3600;
        assert!(last <= reach && reach < last + 21_600);
        // 1h + 24h past now, from 6400 s into a slice: 4 more slice starts.
        assert_eq!((last - first) / 21_600, 4);
    }
}
