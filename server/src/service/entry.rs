//! `spire.api.server.entry.v1.Entry`: registration entry CRUD for admins, and the authorized
//! entries of an agent (GetAuthorizedEntries, SyncAuthorizedEntries).

use super::authz::{require_admin, require_agent};
use super::*;
use crate::datastore::EntryFilter;
use kame_api::pb::entry as pb;
use kame_api::pb::entry::entry_server::Entry;
use kame_api::pb::types::federates_with_match::MatchBehavior as FedMatch;
use kame_api::pb::types::selector_match::MatchBehavior as SelMatch;
use std::pin::Pin;
use tokio_stream::Stream;
use tonic::{Request, Response, Streaming};

/// Largest page of ListEntries and of each SyncAuthorizedEntries phase.
pub const PAGE_SIZE: usize = 500;
/// Most entries one batch call may carry.
pub const MAX_BATCH: usize = 500;

#[derive(Debug, Clone)]
pub struct EntryService {
    pub ctx: Arc<Context>,
}

fn selector_set_match(entry: &[Selector], want: &[Selector], m: SelMatch) -> bool {
    let e: HashSet<&Selector> = entry.iter().collect();
    let w: HashSet<&Selector> = want.iter().collect();
    match m {
        SelMatch::MatchExact => e == w,
        SelMatch::MatchSubset => e.is_subset(&w),
        SelMatch::MatchSuperset => e.is_superset(&w),
        SelMatch::MatchAny => !e.is_disjoint(&w),
    }
}

fn fed_match(entry: &[String], want: &[String], m: FedMatch) -> bool {
    let e: HashSet<&String> = entry.iter().collect();
    let w: HashSet<&String> = want.iter().collect();
    match m {
        FedMatch::MatchExact => e == w,
        FedMatch::MatchSubset => e.is_subset(&w),
        FedMatch::MatchSuperset => e.is_superset(&w),
        FedMatch::MatchAny => !e.is_disjoint(&w),
    }
}

async fn filtered(
    ctx: &Context,
    f: Option<&pb::EntryFilter>,
) -> Result<Vec<RegistrationEntry>, Status> {
    let mut dsf = EntryFilter::default();
    let mut sel: Option<(Vec<Selector>, SelMatch)> = None;
    let mut fed: Option<(Vec<String>, FedMatch)> = None;
    if let Some(f) = f {
        if let Some(id) = &f.by_spiffe_id {
            dsf.spiffe_id = Some(id_from_proto("filter.by_spiffe_id", Some(id))?.to_string());
        }
        if let Some(id) = &f.by_parent_id {
            dsf.parent_id = Some(id_from_proto("filter.by_parent_id", Some(id))?.to_string());
        }
        dsf.hint = f.by_hint.clone();
        dsf.downstream = f.by_downstream;
        if let Some(s) = &f.by_selectors {
            if s.selectors.is_empty() {
                return Err(Status::invalid_argument(
                    "filter.by_selectors: empty selector set",
                ));
            }
            let sels = s
                .selectors
                .iter()
                .map(selector_from_proto)
                .collect::<Result<Vec<_>, _>>()?;
            let m = SelMatch::try_from(s.r#match).map_err(|_| {
                Status::invalid_argument("filter.by_selectors: unknown match behavior")
            })?;
            sel = Some((sels, m));
        }
        if let Some(fw) = &f.by_federates_with {
            if fw.trust_domains.is_empty() {
                return Err(Status::invalid_argument(
                    "filter.by_federates_with: empty set",
                ));
            }
            let tds = fw
                .trust_domains
                .iter()
                .map(|t| {
                    TrustDomain::parse(t).map(|td| td.id_string()).map_err(|e| {
                        Status::invalid_argument(format!("filter.by_federates_with: {e}"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let m = FedMatch::try_from(fw.r#match).map_err(|_| {
                Status::invalid_argument("filter.by_federates_with: unknown match behavior")
            })?;
            fed = Some((tds, m));
        }
    }
    let all = ctx.ds.list_entries(&dsf).await.map_err(ds_status)?;
    Ok(all
        .into_iter()
        .filter(|e| {
            sel.as_ref()
                .is_none_or(|(s, m)| selector_set_match(&e.selectors, s, *m))
        })
        .filter(|e| {
            fed.as_ref()
                .is_none_or(|(t, m)| fed_match(&e.federates_with, t, *m))
        })
        .collect())
}

/// The existing entry a duplicate collides with (same SPIFFE ID, parent and selector set).
async fn find_similar(ctx: &Context, e: &RegistrationEntry) -> Option<RegistrationEntry> {
    let list = ctx
        .ds
        .list_entries(&EntryFilter {
            spiffe_id: Some(e.spiffe_id.clone()),
            parent_id: Some(e.parent_id.clone()),
            ..Default::default()
        })
        .await
        .ok()?;
    let want: BTreeSet<&Selector> = e.selectors.iter().collect();
    list.into_iter()
        .find(|x| x.selectors.iter().collect::<BTreeSet<_>>() == want)
}

fn validate_entry_id(id: &str) -> Result<(), Status> {
    if id.len() > 255 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Status::invalid_argument(
            "id: must be at most 255 printable ASCII characters",
        ));
    }
    Ok(())
}

impl EntryService {
    async fn create_one(
        &self,
        e: &types::Entry,
        mask: Option<&types::EntryMask>,
    ) -> pb::EntryResult {
        let ctx = &self.ctx;
        let mut entry = match entry_from_proto(ctx, e) {
            Ok(x) => x,
            Err(s) => {
                return pb::EntryResult {
                    status: Some(status_of(&s)),
                    entry: None,
                };
            }
        };
        if entry.id.is_empty() {
            entry.id = uuid::Uuid::new_v4().to_string();
        } else if let Err(s) = validate_entry_id(&entry.id) {
            return pb::EntryResult {
                status: Some(status_of(&s)),
                entry: None,
            };
        }
        if let Err(s) = check_federated_bundles(ctx, &entry).await {
            return pb::EntryResult {
                status: Some(status_of(&s)),
                entry: None,
            };
        }
        entry.created_at = crate::ca::now_secs() as i64;
        match ctx.ds.create_entry(&entry).await {
            Ok(created) => pb::EntryResult {
                status: Some(ok_status()),
                entry: Some(entry_to_proto(&created, mask)),
            },
            Err(DsError::AlreadyExists(_)) => {
                let existing = find_similar(ctx, &entry).await;
                let msg = if existing.is_some() {
                    "similar entry already exists"
                } else {
                    "an entry with this ID already exists"
                };
                pb::EntryResult {
                    status: Some(item_status(Code::AlreadyExists, msg)),
                    entry: existing.as_ref().map(|x| entry_to_proto(x, mask)),
                }
            }
            Err(err) => pb::EntryResult {
                status: Some(status_of(&ds_status(err))),
                entry: None,
            },
        }
    }

    async fn update_one(
        &self,
        e: &types::Entry,
        input: Option<&types::EntryMask>,
        output: Option<&types::EntryMask>,
    ) -> Result<RegistrationEntry, Status> {
        let ctx = &self.ctx;
        if e.id.is_empty() {
            return Err(Status::invalid_argument("id: missing entry ID"));
        }
        let mut cur = ctx
            .ds
            .fetch_entry(&e.id)
            .await
            .map_err(ds_status)?
            .ok_or_else(|| Status::not_found(format!("entry {:?} not found", e.id)))?;
        let _ = output;
        // Apply the masked fields onto the current entry, then validate the result as a whole.
        let mut wire = entry_to_proto(&cur, None);
        let all = input.is_none();
        let m = input.cloned().unwrap_or_default();
        if all || m.spiffe_id {
            wire.spiffe_id = e.spiffe_id.clone();
        }
        if all || m.parent_id {
            wire.parent_id = e.parent_id.clone();
        }
        if all || m.selectors {
            wire.selectors = e.selectors.clone();
        }
        if all || m.x509_svid_ttl {
            wire.x509_svid_ttl = e.x509_svid_ttl;
        }
        if all || m.jwt_svid_ttl {
            wire.jwt_svid_ttl = e.jwt_svid_ttl;
        }
        if all || m.federates_with {
            wire.federates_with = e.federates_with.clone();
        }
        if all || m.admin {
            wire.admin = e.admin;
        }
        if all || m.downstream {
            wire.downstream = e.downstream;
        }
        if all || m.expires_at {
            wire.expires_at = e.expires_at;
        }
        if all || m.dns_names {
            wire.dns_names = e.dns_names.clone();
        }
        if all || m.store_svid {
            wire.store_svid = e.store_svid;
        }
        if all || m.hint {
            wire.hint = e.hint.clone();
        }
        let mut updated = entry_from_proto(ctx, &wire)?;
        check_federated_bundles(ctx, &updated).await?;
        updated.id = cur.id.clone();
        updated.created_at = cur.created_at;
        cur = ctx
            .ds
            .update_entry(&updated)
            .await
            .map_err(|err| match err {
                DsError::AlreadyExists(_) => Status::already_exists("similar entry already exists"),
                other => ds_status(other),
            })?;
        Ok(cur)
    }
}

type SyncStream =
    Pin<Box<dyn Stream<Item = Result<pb::SyncAuthorizedEntriesResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Entry for EntryService {
    async fn count_entries(
        &self,
        req: Request<pb::CountEntriesRequest>,
    ) -> Result<Response<pb::CountEntriesResponse>, Status> {
        require_admin(&self.ctx, &req).await?;
        let n = filtered(&self.ctx, req.get_ref().filter.as_ref())
            .await?
            .len();
        Ok(Response::new(pb::CountEntriesResponse { count: n as i32 }))
    }

    async fn list_entries(
        &self,
        req: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        require_admin(&self.ctx, &req).await?;
        let r = req.get_ref();
        let all = filtered(&self.ctx, r.filter.as_ref()).await?;
        let (page, next_page_token) = paginate(all, r.page_size, &r.page_token)?;
        Ok(Response::new(pb::ListEntriesResponse {
            entries: page
                .iter()
                .map(|e| entry_to_proto(e, r.output_mask.as_ref()))
                .collect(),
            next_page_token,
        }))
    }

    async fn get_entry(
        &self,
        req: Request<pb::GetEntryRequest>,
    ) -> Result<Response<types::Entry>, Status> {
        require_admin(&self.ctx, &req).await?;
        let r = req.get_ref();
        if r.id.is_empty() {
            return Err(Status::invalid_argument("id: missing entry ID"));
        }
        let e = self
            .ctx
            .ds
            .fetch_entry(&r.id)
            .await
            .map_err(ds_status)?
            .ok_or_else(|| Status::not_found("entry not found"))?;
        Ok(Response::new(entry_to_proto(&e, r.output_mask.as_ref())))
    }

    async fn batch_create_entry(
        &self,
        req: Request<pb::BatchCreateEntryRequest>,
    ) -> Result<Response<pb::BatchCreateEntryResponse>, Status> {
        require_admin(&self.ctx, &req).await?;
        let r = req.get_ref();
        if r.entries.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_BATCH} entries per batch"
            )));
        }
        let mut results = vec![];
        for e in &r.entries {
            let res = self.create_one(e, r.output_mask.as_ref()).await;
            tracing::info!(
                code = res.status.as_ref().map(|s| s.code).unwrap_or_default(),
                entry_id = res.entry.as_ref().map(|x| x.id.as_str()).unwrap_or(""),
                "BatchCreateEntry"
            );
            results.push(res);
        }
        caught_up(&self.ctx).await;
        Ok(Response::new(pb::BatchCreateEntryResponse { results }))
    }

    async fn batch_update_entry(
        &self,
        req: Request<pb::BatchUpdateEntryRequest>,
    ) -> Result<Response<pb::BatchUpdateEntryResponse>, Status> {
        require_admin(&self.ctx, &req).await?;
        let r = req.get_ref();
        if r.entries.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_BATCH} entries per batch"
            )));
        }
        let mut results = vec![];
        for e in &r.entries {
            results.push(
                match self
                    .update_one(e, r.input_mask.as_ref(), r.output_mask.as_ref())
                    .await
                {
                    Ok(u) => pb::EntryResult {
                        status: Some(ok_status()),
                        entry: Some(entry_to_proto(&u, r.output_mask.as_ref())),
                    },
                    Err(s) => pb::EntryResult {
                        status: Some(status_of(&s)),
                        entry: None,
                    },
                },
            );
        }
        caught_up(&self.ctx).await;
        Ok(Response::new(pb::BatchUpdateEntryResponse { results }))
    }

    async fn batch_delete_entry(
        &self,
        req: Request<pb::BatchDeleteEntryRequest>,
    ) -> Result<Response<pb::BatchDeleteEntryResponse>, Status> {
        require_admin(&self.ctx, &req).await?;
        let r = req.get_ref();
        if r.ids.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_BATCH} IDs per batch"
            )));
        }
        let mut results = vec![];
        for id in &r.ids {
            let status = if id.is_empty() {
                item_status(Code::InvalidArgument, "missing entry ID")
            } else {
                match self.ctx.ds.delete_entry(id).await {
                    Ok(_) => ok_status(),
                    Err(e) => status_of(&ds_status(e)),
                }
            };
            results.push(pb::batch_delete_entry_response::Result {
                status: Some(status),
                id: id.clone(),
            });
        }
        caught_up(&self.ctx).await;
        Ok(Response::new(pb::BatchDeleteEntryResponse { results }))
    }

    async fn get_authorized_entries(
        &self,
        req: Request<pb::GetAuthorizedEntriesRequest>,
    ) -> Result<Response<pb::GetAuthorizedEntriesResponse>, Status> {
        let node = require_agent(&self.ctx, &req).await?;
        let entries = authorized_entries(&self.ctx, &node);
        let mask = req.get_ref().output_mask.as_ref();
        Ok(Response::new(pb::GetAuthorizedEntriesResponse {
            entries: entries.iter().map(|e| entry_to_proto(e, mask)).collect(),
        }))
    }

    type SyncAuthorizedEntriesStream = SyncStream;

    async fn sync_authorized_entries(
        &self,
        req: Request<Streaming<pb::SyncAuthorizedEntriesRequest>>,
    ) -> Result<Response<SyncStream>, Status> {
        let node = require_agent(&self.ctx, &req).await?;
        record_svid_authorities(&self.ctx, &node, &req).await;
        let entries = authorized_entries(&self.ctx, &node);
        let start = SyncState {
            inbound: req.into_inner(),
            entries,
            mask: None,
            pending: std::collections::VecDeque::new(),
            phase: SyncPhase::First,
        };
        // A state machine polled by the response stream itself: no task or channel per sync.
        let stream = futures::stream::unfold(start, |mut st| async move {
            loop {
                if let Some(item) = st.pending.pop_front() {
                    if item.is_err() {
                        st.phase = SyncPhase::Done;
                    }
                    return Some((item, st));
                }
                match st.phase {
                    SyncPhase::Done => return None,
                    SyncPhase::First => st.first().await,
                    SyncPhase::Asks => st.asked().await,
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// After a write, this server's cache takes it in at once (other servers within a poll).
async fn caught_up(ctx: &Context) {
    if let Err(e) = ctx.entries.refresh().await {
        tracing::warn!(error = %e, "cannot refresh the entry cache after a write");
    }
}

enum SyncPhase {
    /// Waiting for the first request.
    First,
    /// Revisions were sent: answering requests for entries by id.
    Asks,
    Done,
}

/// One SyncAuthorizedEntries call (SPIRE's protocol): up to a page of entries is sent whole;
/// more are sent as revisions in pages, and then the entries the agent asks for, in pages.
struct SyncState {
    inbound: Streaming<pb::SyncAuthorizedEntriesRequest>,
    entries: Vec<std::sync::Arc<RegistrationEntry>>,
    mask: Option<types::EntryMask>,
    pending: std::collections::VecDeque<Result<pb::SyncAuthorizedEntriesResponse, Status>>,
    phase: SyncPhase,
}

impl SyncState {
    fn push(&mut self, r: Result<pb::SyncAuthorizedEntriesResponse, Status>) {
        self.pending.push_back(r);
    }

    async fn first(&mut self) {
        self.phase = SyncPhase::Done;
        let first = match self.inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(s) => return self.push(Err(s)),
        };
        // SPIRE's checks on the first request: IDs come only after revisions were sent, and
        // revisions are what the agent compares.
        if !first.ids.is_empty() {
            return self.push(Err(Status::invalid_argument(
                "specifying IDs on initial request is not supported",
            )));
        }
        if first
            .output_mask
            .as_ref()
            .is_some_and(|m| !m.revision_number)
        {
            return self.push(Err(Status::invalid_argument(
                "revision number cannot be masked",
            )));
        }
        self.mask = first.output_mask;
        // Up to a page is sent whole (SPIRE: `len(entries) <= entryPageSize`).
        if self.entries.len() <= PAGE_SIZE {
            let entries = self
                .entries
                .iter()
                .map(|e| entry_to_proto(e, self.mask.as_ref()))
                .collect();
            return self.push(Ok(pb::SyncAuthorizedEntriesResponse {
                entry_revisions: vec![],
                entries,
                more: false,
            }));
        }
        let pages: Vec<Vec<pb::EntryRevision>> = self
            .entries
            .chunks(PAGE_SIZE)
            .map(|chunk| {
                chunk
                    .iter()
                    .map(|e| pb::EntryRevision {
                        id: e.id.clone(),
                        revision_number: e.revision_number,
                        created_at: e.created_at,
                    })
                    .collect()
            })
            .collect();
        let n = pages.len();
        for (i, revs) in pages.into_iter().enumerate() {
            self.push(Ok(pb::SyncAuthorizedEntriesResponse {
                entry_revisions: revs,
                entries: vec![],
                more: i + 1 < n,
            }));
        }
        self.phase = SyncPhase::Asks;
    }

    async fn asked(&mut self) {
        let ask = match self.inbound.message().await {
            Ok(Some(m)) => m,
            _ => {
                self.phase = SyncPhase::Done;
                return;
            }
        };
        let by_id: std::collections::HashMap<&str, &RegistrationEntry> =
            self.entries.iter().map(|e| (e.id.as_str(), &**e)).collect();
        let wanted: Vec<types::Entry> = ask
            .ids
            .iter()
            .filter_map(|id| by_id.get(id.as_str()))
            .map(|e| entry_to_proto(e, self.mask.as_ref()))
            .collect();
        if wanted.is_empty() {
            return self.push(Ok(pb::SyncAuthorizedEntriesResponse {
                entry_revisions: vec![],
                entries: vec![],
                more: false,
            }));
        }
        let n = wanted.len().div_ceil(PAGE_SIZE);
        let mut it = wanted.into_iter();
        for i in 0..n {
            self.push(Ok(pb::SyncAuthorizedEntriesResponse {
                entry_revisions: vec![],
                entries: it.by_ref().take(PAGE_SIZE).collect(),
                more: i + 1 < n,
            }));
        }
    }
}

/// A stream fed by a task through a small channel.
pub fn async_stream<T, F, Fut>(f: F) -> tokio_stream::wrappers::ReceiverStream<T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
