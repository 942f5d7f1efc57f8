//! Reserve SVIDs and break-glass in the manager: while servers answer, each sync asks the
//! server (`kame.breakglass.v1.BreakGlass`) for the reserve slices the agent lacks (from the
//! expiry of each workload's SVID to `max_extension` past it) and drops those of deleted or
//! changed entries, expired slices and revoked or tainted authorities; while the glass is
//! broken, a workload whose SVID has expired is served the reserve of the present slice, each
//! delivery recorded first (an SVID the record cannot take is not served). The glass closes
//! when a sync succeeds or its time ends, and the record goes to the server.

use super::*;
use crate::breakglass::{BreakGlassError, Opening, Signer, TOKEN_AUDIENCE};
use kame_api::breakglass::Event;
use kame_api::pb::breakglass as bg;

/// Record lines sent in one report.
const REPORT_CHUNK: usize = 200;

/// Most reserve slices asked for in one sync pass (the rest wait for the next).
const RESERVES_PER_PASS: usize = 500;

/// The start of the slice a reserve covers (its notBefore is backdated a little).
fn slice_start(r: &CachedSvid, len: u64) -> u64 {
    r.not_before.div_ceil(len) * len
}

/// What the admin socket shows.
#[derive(Debug, Clone)]
pub struct GlassStatus {
    pub configured: bool,
    pub open: Option<Opening>,
    pub reserves: usize,
    pub covered_until: u64,
    pub last_contact: u64,
    pub delivered: u64,
    /// The record's length, or why it does not verify.
    pub record: Result<u64, String>,
    /// Lines a server has acknowledged.
    pub reported: u64,
}

impl Default for GlassStatus {
    fn default() -> Self {
        GlassStatus {
            configured: false,
            open: None,
            reserves: 0,
            covered_until: 0,
            last_contact: 0,
            delivered: 0,
            record: Ok(0),
            reported: 0,
        }
    }
}

impl Manager {
    /// The agent's ID and identity (its last agent SVID, expired or not), for signing the
    /// record.
    fn record_signer(&self) -> Option<(String, crate::storage::AgentIdentity)> {
        let a = self.record_signer.lock().ok()?.clone()?;
        let id = ParsedCert::parse(a.chain.first()?)
            .and_then(|c| c.spiffe_id())
            .ok()?
            .to_string();
        Some((id, a))
    }

    /// The reserve of entry `e`, minted for its present revision, valid at `now`, if any.
    pub(super) fn reserve_at<'a>(
        st: &'a State,
        e: &types::Entry,
        now: u64,
    ) -> Option<&'a CachedSvid> {
        st.reserves.get(&e.id)?.iter().find(|r| {
            r.entry_revision == e.revision_number && r.not_before <= now && now < r.not_after
        })
    }

    /// Records the reserves in `served` as delivered to a workload with `selectors`; returns
    /// the entry IDs whose delivery the record did not take (they must not be served).
    pub(super) fn record_deliveries(
        &self,
        served: &[(types::Entry, CachedSvid)],
        selectors: &[types::Selector],
    ) -> BTreeSet<String> {
        let mut refused = BTreeSet::new();
        let Some(g) = &self.glass else {
            return refused;
        };
        let mut sel: Vec<String> = selectors
            .iter()
            .map(|s| format!("{}:{}", s.r#type, s.value))
            .collect();
        sel.sort();
        for (e, r) in served {
            let serial = r
                .chain
                .first()
                .and_then(|c| ParsedCert::parse(c).ok())
                .map(|c| c.serial_hex())
                .unwrap_or_default();
            let event = Event::Deliver {
                entry_id: e.id.clone(),
                spiffe_id: entry_spiffe_id(e),
                serial,
                not_before: r.not_before,
                not_after: r.not_after,
                selectors: sel.clone(),
            };
            match g.deliver(event) {
                Ok(true) => tracing::warn!(
                    entry_id = %e.id,
                    spiffe_id = %entry_spiffe_id(e),
                    not_after = r.not_after,
                    "BREAK-GLASS: reserve SVID delivered"
                ),
                Ok(false) => {}
                Err(err) => {
                    tracing::error!(error = %kame_api::errors::chain(&err), entry_id = %e.id, "BREAK-GLASS: the record cannot take a delivery; the reserve is not served");
                    refused.insert(e.id.clone());
                }
            }
        }
        refused
    }

    /// Breaks the glass: `reason` and `duration` from the operator, `token` when given.
    pub fn break_glass(
        &self,
        reason: &str,
        duration: Duration,
        token: Option<&str>,
    ) -> Result<Opening, BreakGlassError> {
        let g = self.glass.as_ref().ok_or(BreakGlassError::NotConfigured)?;
        g.precheck(reason, duration)?;
        let now = now_secs();
        let held = self
            .state
            .read()
            .map(|st| {
                st.reserves
                    .values()
                    .flatten()
                    .filter(|r| r.not_after > now)
                    .count()
            })
            .unwrap_or(0);
        if held == 0 {
            return Err(BreakGlassError::NoReserves);
        }
        let (agent, id) = self.record_signer().ok_or(BreakGlassError::NotAttested)?;
        let token_id = match token.map(str::trim).filter(|t| !t.is_empty()) {
            None if g.cfg.require_token => return Err(BreakGlassError::TokenRequired),
            None => None,
            Some(t) => Some(self.check_token(t, &agent, now)?),
        };
        let o = g.open(
            &Signer {
                agent,
                key_pkcs8: &id.key_pkcs8,
                chain: &id.chain,
            },
            reason,
            duration,
            token_id,
        )?;
        self.bump();
        Ok(o)
    }

    /// A break-glass token: a JWT-SVID for this agent's SPIFFE ID, audience
    /// [`TOKEN_AUDIENCE`], signed by an untainted JWT authority of the own bundle (with an SCT
    /// when transparency log keys are configured). Returns the token's ID for the record.
    fn check_token(&self, token: &str, agent: &str, now: u64) -> Result<String, BreakGlassError> {
        let bundle = self
            .state
            .read()
            .ok()
            .and_then(|st| st.bundle.clone())
            .ok_or_else(|| BreakGlassError::Token("the agent holds no bundle".into()))?;
        let td = self.cfg.trust_domain.to_string();
        let v = kame_api::jwtsvid::validate(token, TOKEN_AUDIENCE, now, |t| {
            (t.to_string() == td).then(|| {
                bundle
                    .jwt_authorities
                    .iter()
                    .filter(|k| !k.tainted)
                    .map(|k| kame_api::jwtsvid::JwtAuthority {
                        kid: k.key_id.clone(),
                        spki_der: k.public_key.clone(),
                    })
                    .collect()
            })
        })
        .map_err(|e| BreakGlassError::Token(e.to_string()))?;
        if v.sub.to_string() != agent {
            return Err(BreakGlassError::Token(format!(
                "it is for {}, not this agent ({agent})",
                v.sub
            )));
        }
        let keys = &self.cfg.transparency_log_keys;
        if !keys.is_empty() {
            kame_api::ct::check_jwt_sct(token, keys).map_err(|e| {
                BreakGlassError::Token(format!("no valid SCT from a trusted log: {e}"))
            })?;
        }
        let h = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
        Ok(hex::encode(&h.as_ref()[..16]))
    }

    /// Closes the glass with `cause`, if it is open; watchers see the change.
    pub fn close_glass(&self, cause: &str) {
        let Some(g) = &self.glass else { return };
        match g.close(cause) {
            Ok(false) => {}
            Ok(true) => self.bump(),
            Err(e) => {
                tracing::error!(error = %kame_api::errors::chain(&e), "BREAK-GLASS: closed, but the record cannot take the line");
                self.bump();
            }
        }
    }

    /// After each sync pass: one a server answered (even with a refusal, as a ban) closes the
    /// glass and reports the record; the time ending closes it too.
    pub(super) async fn after_sync(&self, ok: bool) {
        let Some(g) = &self.glass else { return };
        if ok {
            g.contact();
            self.close_glass("servers answered");
            if let Err(e) = self.report_record().await {
                tracing::warn!(error = %kame_api::errors::chain(&e), "cannot report the break-glass record yet");
            }
        } else if g.expired_at(now_secs()) {
            self.close_glass("duration ended");
        }
    }

    /// Sends the lines no server has acknowledged, [`REPORT_CHUNK`] at a time.
    async fn report_record(&self) -> Result<(), ManagerError> {
        let Some(g) = &self.glass else {
            return Ok(());
        };
        let lines = match g.unreported() {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the break-glass record");
                return Ok(());
            }
        };
        if lines.is_empty() {
            return Ok(());
        }
        let ch = self.authenticated_channel().await?;
        let mut client = bg::break_glass_client::BreakGlassClient::new(ch);
        for chunk in lines.chunks(REPORT_CHUNK) {
            let r = client
                .report_record(bg::ReportRecordRequest {
                    lines: chunk.to_vec(),
                })
                .await?
                .into_inner();
            if let Err(e) = g.set_reported(r.acknowledged) {
                tracing::warn!(error = %e, "cannot store how much of the record was reported");
            }
            tracing::info!(
                acknowledged = r.acknowledged,
                "break-glass record reported to the server"
            );
        }
        Ok(())
    }

    pub fn glass_status(&self) -> GlassStatus {
        let Some(g) = &self.glass else {
            return GlassStatus::default();
        };
        let now = now_secs();
        let (reserves, covered_until) = self
            .state
            .read()
            .map(|st| {
                let live: Vec<&CachedSvid> = st
                    .reserves
                    .values()
                    .flatten()
                    .filter(|r| r.not_after > now)
                    .collect();
                (
                    live.len(),
                    live.iter().map(|r| r.not_after).max().unwrap_or(0),
                )
            })
            .unwrap_or_default();
        GlassStatus {
            configured: true,
            open: g.open_at(now),
            reserves,
            covered_until,
            last_contact: g.last_contact(),
            delivered: g.delivered_total(),
            record: g.record_state(),
            reported: g.reported(),
        }
    }

    /// Keeps the reserves current: drops those no longer good, asks for the missing slices.
    /// Failures are logged: reserves never hold up the sync.
    pub(super) async fn sync_reserves(&self, ch: Channel, roots: &[Vec<u8>], taint: &Taint) {
        if self.glass.is_none() {
            return;
        }
        if let Err(e) = self.sync_reserves_inner(ch, roots, taint).await {
            let quiet = matches!(
                &e,
                ManagerError::Server { code, .. } if matches!(
                    code,
                    tonic::Code::Unimplemented
                        | tonic::Code::FailedPrecondition
                        | tonic::Code::PermissionDenied
                )
            );
            // Said once while it lasts: a server without break-glass answers every sync.
            if !quiet
                || !self
                    .reserve_refused
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                tracing::warn!(error = %kame_api::errors::chain(&e), "cannot get reserve SVIDs for break-glass");
            }
        } else {
            self.reserve_refused
                .store(false, std::sync::atomic::Ordering::Relaxed);
        }
    }

    async fn sync_reserves_inner(
        &self,
        ch: Channel,
        roots: &[Vec<u8>],
        taint: &Taint,
    ) -> Result<(), ManagerError> {
        let now = now_secs();
        // 1. Drop what is no longer good, whatever the server says next: reserves of deleted
        // or changed entries, ended slices, revoked or tainted authorities.
        let pruned = {
            let mut st = self
                .state
                .write()
                .map_err(|_| ManagerError::Poisoned("state"))?;
            let st = &mut *st;
            let before: usize = st.reserves.values().map(Vec::len).sum();
            let entries = &st.entries;
            for (id, rs) in st.reserves.iter_mut() {
                rs.retain(|r| {
                    let at = now.max(r.not_before + x509svid_backdate() + 1);
                    entries
                        .get(id)
                        .is_some_and(|e| e.revision_number == r.entry_revision)
                        && r.not_after > now
                        && verify_chain(&r.chain, roots, at).is_ok()
                        && !taint.taints(&r.chain, at)
                });
            }
            st.reserves.retain(|_, rs| !rs.is_empty());
            let after: usize = st.reserves.values().map(Vec::len).sum();
            after != before
        };
        if pruned {
            self.persist_reserves();
        }
        let mut client = bg::break_glass_client::BreakGlassClient::new(ch);
        let params = *self
            .reserve_params
            .lock()
            .map_err(|_| ManagerError::Poisoned("reserve"))?;
        let (len, max_ext) = match params {
            Some(p) => p,
            None => {
                // An empty batch tells the server's slice length and maximum extension.
                let r = client
                    .batch_new_reserve_x509svid(bg::BatchNewReserveX509svidRequest {
                        params: vec![],
                    })
                    .await?
                    .into_inner();
                self.note_reserve_params(&r)?
            }
        };
        let first = now - now % len;
        // 2. The slices each entry lacks.
        let want = {
            let st = self
                .state
                .read()
                .map_err(|_| ManagerError::Poisoned("state"))?;
            let mut want = vec![];
            for (id, s) in &st.svids {
                let Some(e) = st.entries.get(id) else {
                    continue;
                };
                let have: BTreeSet<u64> = st
                    .reserves
                    .get(id)
                    .map(|v| v.iter().map(|r| slice_start(r, len)).collect())
                    .unwrap_or_default();
                let from = s.not_after - s.not_after % len;
                let to = s.not_after.saturating_add(max_ext);
                let to = to - to % len;
                let mut t = from.max(first);
                while t <= to && want.len() < RESERVES_PER_PASS {
                    if !have.contains(&t) {
                        want.push((e.clone(), t));
                    }
                    t += len;
                }
            }
            want
        };
        // 3. Asked for a batch at a time; each batch is kept as it arrives.
        for chunk in want.chunks(BATCH) {
            let mut keys_by = vec![];
            let mut params = vec![];
            for (e, start) in chunk {
                let k = keys::generate()?;
                params.push(bg::ReserveParams {
                    entry_id: e.id.clone(),
                    csr: keys::csr(&k)?,
                    slice_start: *start as i64,
                });
                keys_by.push((e, k));
            }
            let resp = client
                .batch_new_reserve_x509svid(bg::BatchNewReserveX509svidRequest { params })
                .await?
                .into_inner();
            self.note_reserve_params(&resp)?;
            let mut minted = vec![];
            for ((e, k), r) in keys_by.into_iter().zip(resp.results) {
                let Some((svid, leaf)) =
                    super::sync::minted_svid(e, k, r.status, r.svid, "a reserve SVID", true)
                else {
                    continue;
                };
                if !leaf.is_break_glass().unwrap_or(false) {
                    tracing::warn!(entry_id = %e.id, "the server sent a reserve SVID without the break-glass policy; dropped");
                    continue;
                }
                minted.push(svid);
            }
            if minted.is_empty() {
                continue;
            }
            tracing::debug!(count = minted.len(), "reserve SVIDs minted for break-glass");
            {
                let mut st = self
                    .state
                    .write()
                    .map_err(|_| ManagerError::Poisoned("state"))?;
                for r in minted {
                    // An entry changed meanwhile keeps only reserves of its present revision.
                    let current = st
                        .entries
                        .get(&r.entry_id)
                        .is_some_and(|e| e.revision_number == r.entry_revision);
                    if current {
                        let v = st.reserves.entry(r.entry_id.clone()).or_default();
                        v.push(r);
                        v.sort_by_key(|r| r.not_before);
                    }
                }
            }
            self.persist_reserves();
        }
        Ok(())
    }

    /// Takes the server's slice length and maximum extension from its answer (they may
    /// change, or differ between servers): asking by the old ones would only be refused.
    fn note_reserve_params(
        &self,
        r: &bg::BatchNewReserveX509svidResponse,
    ) -> Result<(u64, u64), ManagerError> {
        let p = (
            u64::try_from(r.slice_seconds).unwrap_or(0),
            u64::try_from(r.max_extension_seconds).unwrap_or(0),
        );
        if p.0 == 0 {
            return Err(ManagerError::SyncProtocol(
                "the server gave no reserve slice length",
            ));
        }
        if let Ok(mut g) = self.reserve_params.lock() {
            *g = Some(p);
        }
        Ok(p)
    }

    fn persist_reserves(&self) {
        let all: Vec<CachedSvid> = match self.state.read() {
            Ok(st) => st.reserves.values().flatten().cloned().collect(),
            Err(_) => return,
        };
        if let Err(e) = self.storage.save_reserves(&all) {
            tracing::warn!(error = %e, "cannot persist the reserve SVIDs");
        }
    }
}

fn x509svid_backdate() -> u64 {
    kame_api::x509svid::BACKDATE.as_secs()
}
