//! Synchronisation with the server: the authorized entries (a full list, or revisions first
//! and then only the entries whose revision changed) and bundles, the workload X509-SVIDs minted for new or expiring entries and for
//! those a tainted authority signed, and the snapshot persisted after each round.

use super::*;

impl Manager {
    /// One sync pass with the server. Errors leave the cache as it was.
    pub async fn sync_once(&self) -> Result<(), ManagerError> {
        let _guard = self.sync_lock.lock().await;
        self.ensure_agent_svid().await?;
        let ch = self.authenticated_channel().await?;
        let r = self.sync_with(ch).await;
        if let Err(ManagerError::Server { code, .. }) = &r
            && matches!(
                code,
                tonic::Code::Unavailable
                    | tonic::Code::PermissionDenied
                    | tonic::Code::Unauthenticated
            )
        {
            // Reconnect next time (server restarted, or our SVID was replaced).
            self.set_channel(None);
        }
        r
    }

    pub(super) async fn sync_with(&self, ch: Channel) -> Result<(), ManagerError> {
        let mut changed = false;
        // 1. Bundle and 2. entries, asked for together (one round trip, and the server reads
        // both requests at once).
        let bundle = async {
            Ok::<_, ManagerError>(
                pb::bundle::bundle_client::BundleClient::new(ch.clone())
                    .get_bundle(pb::bundle::GetBundleRequest { output_mask: None })
                    .await?
                    .into_inner(),
            )
        };
        let (bundle, entries) = tokio::join!(bundle, self.sync_entries(ch.clone()));
        // A bundle that arrived is applied even when the entries failed: new roots and taints
        // must not wait for the entry sync to recover.
        let bundle = bundle?;
        {
            let mut st = self
                .state
                .write()
                .map_err(|_| ManagerError::Poisoned("state"))?;
            if st.bundle.as_ref() != Some(&bundle) {
                if let Ok(mut r) = self.roots.write() {
                    *r = bundle_roots(&bundle);
                }
                st.bundle = Some(bundle.clone());
                changed = true;
            }
        }
        if changed {
            // Watchers see the new bundle now, even if what follows fails.
            self.bump();
            self.storage.save_bundle(&bundle)?;
        }
        let entries = entries?;
        // 3. Federated bundles of the trust domains entries federate with.
        let tds: BTreeSet<String> = entries.values().flat_map(federated_tds).collect();
        let mut federated = BTreeMap::new();
        for td in tds {
            match pb::bundle::bundle_client::BundleClient::new(ch.clone())
                .get_federated_bundle(pb::bundle::GetFederatedBundleRequest {
                    trust_domain: td.clone(),
                    output_mask: None,
                })
                .await
            {
                Ok(b) => {
                    federated.insert(td, b.into_inner());
                }
                Err(s) if s.code() == tonic::Code::NotFound => {}
                Err(s) => return Err(s.into()),
            }
        }
        // 4. Which SVIDs to mint.
        let now = now_secs();
        let roots = bundle_roots(&bundle);
        let taint = Taint::of(&bundle);
        let need: Vec<types::Entry> = {
            let st = self
                .state
                .read()
                .map_err(|_| ManagerError::Poisoned("state"))?;
            entries
                .values()
                .filter(|e| match st.svids.get(&e.id) {
                    None => true,
                    Some(s) => {
                        s.entry_revision != e.revision_number
                            || now >= s.not_before + (s.not_after.saturating_sub(s.not_before)) / 2
                            || verify_chain(&s.chain, &roots, now).is_err()
                            || taint.taints(&s.chain, now)
                    }
                })
                .cloned()
                .collect()
        };
        if !taint.roots.is_empty() && !need.is_empty() {
            tracing::info!(
                count = need.len(),
                "re-issuing workload SVIDs (tainted authority, rotation or entry change)"
            );
        }
        let minted = self.mint_x509(ch.clone(), &need).await?;
        // 5. Install.
        {
            let mut st = self
                .state
                .write()
                .map_err(|_| ManagerError::Poisoned("state"))?;
            if st.entries != entries {
                changed = true;
            }
            if st.federated != federated {
                changed = true;
                st.federated = federated;
            }
            if !minted.is_empty() {
                changed = true;
            }
            for s in minted {
                st.svids.insert(s.entry_id.clone(), s);
            }
            let before = st.svids.len();
            st.svids.retain(|id, _| entries.contains_key(id));
            changed |= st.svids.len() != before;
            st.jwt.retain(|(id, _), _| entries.contains_key(id));
            // JWT-SVIDs signed by a tainted key are dropped at once and minted anew on demand.
            let before = st.jwt.len();
            st.jwt
                .retain(|_, j| jwt_kid(&j.token).is_none_or(|k| !taint.kids.contains(&k)));
            if st.jwt.len() != before {
                tracing::info!(
                    count = before - st.jwt.len(),
                    "dropped JWT-SVIDs signed by a tainted key"
                );
                changed = true;
            }
            st.entries = entries;
        }
        if changed {
            self.persist();
            self.bump();
        }
        self.sync_reserves(ch, &roots, &taint).await;
        Ok(())
    }

    pub(super) fn persist(&self) {
        let snap = match self.state.read() {
            Ok(st) => CacheSnapshot {
                bundle: st.bundle.clone(),
                federated: st.federated.values().cloned().collect(),
                entries: st.entries.values().cloned().collect(),
                svids: st.svids.values().cloned().collect(),
            },
            Err(_) => return,
        };
        if let Err(e) = self.storage.save_cache(&snap) {
            tracing::warn!(error = %e, "cannot persist the SVID cache");
        }
    }

    /// SyncAuthorizedEntries as SPIRE's agent does it: a full list, or revisions first and
    /// then only the entries whose revision changed. The first call sends its one request and
    /// half-closes, so the usual exchange is one message each way (the server ends the call
    /// after its listing). Only when revisions come back and some are new does a second call
    /// stay open to ask for those entries.
    pub(super) async fn sync_entries(
        &self,
        ch: Channel,
    ) -> Result<BTreeMap<String, types::Entry>, ManagerError> {
        let first = || pb::entry::SyncAuthorizedEntriesRequest {
            output_mask: None,
            ids: vec![],
        };
        let mut stream = self
            .open_sync(ch.clone(), tokio_stream::once(first()))
            .await?;
        let (mut out, revisions) = read_listing(&mut stream).await?;
        read_end(&mut stream).await?;
        if revisions.is_empty() || self.keep_unchanged(&revisions, &mut out)?.is_empty() {
            return Ok(out);
        }
        // Some entries changed: a call that stays open to ask for them.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let _ = tx.send(first()).await;
        let mut stream = self
            .open_sync(ch, tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?;
        let (mut out, revisions) = read_listing(&mut stream).await?;
        let ask = self.keep_unchanged(&revisions, &mut out)?;
        for chunk in ask.chunks(BATCH) {
            let _ = tx
                .send(pb::entry::SyncAuthorizedEntriesRequest {
                    output_mask: None,
                    ids: chunk.to_vec(),
                })
                .await;
            loop {
                let Some(m) = stream.message().await? else {
                    return Err(ManagerError::SyncProtocol(
                        "SyncAuthorizedEntries ended before answering an ask",
                    ));
                };
                for e in m.entries {
                    out.insert(e.id.clone(), e);
                }
                if !m.more {
                    break;
                }
            }
        }
        drop(tx);
        read_end(&mut stream).await?;
        Ok(out)
    }

    /// Starts a SyncAuthorizedEntries call with the authorities the agent holds in its header.
    async fn open_sync<S>(
        &self,
        ch: Channel,
        requests: S,
    ) -> Result<tonic::Streaming<pb::entry::SyncAuthorizedEntriesResponse>, ManagerError>
    where
        S: tokio_stream::Stream<Item = pb::entry::SyncAuthorizedEntriesRequest> + Send + 'static,
    {
        let mut req = tonic::Request::new(requests);
        if let Ok(v) = self.held_authorities().join(",").parse() {
            req.metadata_mut().insert(SVID_AUTHORITIES_HEADER, v);
        }
        Ok(pb::entry::entry_client::EntryClient::new(ch)
            .sync_authorized_entries(req)
            .await?
            .into_inner())
    }

    /// Of `revisions`, the entries the cache holds at the same revision go into `out`; the
    /// ids of the others are returned, to be asked for.
    fn keep_unchanged(
        &self,
        revisions: &[pb::entry::EntryRevision],
        out: &mut BTreeMap<String, types::Entry>,
    ) -> Result<Vec<String>, ManagerError> {
        let st = self
            .state
            .read()
            .map_err(|_| ManagerError::Poisoned("state"))?;
        let mut ask = vec![];
        for r in revisions {
            match st.entries.get(&r.id) {
                Some(e) if e.revision_number == r.revision_number => {
                    out.insert(r.id.clone(), e.clone());
                }
                _ => ask.push(r.id.clone()),
            }
        }
        Ok(ask)
    }

    /// The authorities the agent's SVIDs chain to (its own and its workloads'), and the key
    /// IDs of the JWT-SVIDs it caches: what the server counts before a revocation.
    pub(super) fn held_authorities(&self) -> Vec<String> {
        let Ok(st) = self.state.read() else {
            return vec![];
        };
        let mut out: BTreeSet<String> = st
            .agent
            .iter()
            .map(|a| a.chain.as_slice())
            .chain(st.svids.values().map(|s| s.chain.as_slice()))
            .filter_map(chain_authority)
            .collect();
        out.extend(st.jwt.values().filter_map(|j| jwt_kid(&j.token)));
        out.into_iter().collect()
    }

    pub(super) async fn mint_x509(
        &self,
        ch: Channel,
        entries: &[types::Entry],
    ) -> Result<Vec<CachedSvid>, ManagerError> {
        let mut out = vec![];
        for chunk in entries.chunks(BATCH) {
            let mut keys_by_entry = vec![];
            let mut params = vec![];
            for e in chunk {
                let k = keys::generate()?;
                params.push(pb::svid::NewX509svidParams {
                    entry_id: e.id.clone(),
                    csr: keys::csr(&k)?,
                });
                keys_by_entry.push((e, k));
            }
            let resp = pb::svid::svid_client::SvidClient::new(ch.clone())
                .batch_new_x509svid(pb::svid::BatchNewX509svidRequest { params })
                .await?
                .into_inner();
            for ((e, k), r) in keys_by_entry.into_iter().zip(resp.results) {
                if let Some((s, _)) = minted_svid(e, k, r.status, r.svid, "an SVID", false) {
                    out.push(s);
                }
            }
        }
        if !out.is_empty() {
            tracing::debug!(count = out.len(), "minted workload X509-SVIDs");
        }
        Ok(out)
    }
}

/// One result of a batch the server minted for `e` (an SVID for the key `k`), with its leaf;
/// a refusal or an unparsable SVID is logged (a refusal at debug level when `quiet`: reserves
/// are asked for again at every sync) and gives nothing.
pub(super) fn minted_svid(
    e: &types::Entry,
    k: zeroize::Zeroizing<Vec<u8>>,
    status: Option<types::Status>,
    svid: Option<types::X509svid>,
    what: &str,
    quiet: bool,
) -> Option<(CachedSvid, ParsedCert)> {
    match (status, svid) {
        (Some(s), Some(svid)) if s.code == 0 => {
            let Some(leaf) = svid
                .cert_chain
                .first()
                .and_then(|c| ParsedCert::parse(c).ok())
            else {
                tracing::warn!(entry_id = %e.id, what, "server returned an unparsable SVID");
                return None;
            };
            Some((
                CachedSvid {
                    entry_id: e.id.clone(),
                    entry_revision: e.revision_number,
                    not_before: leaf.not_before(),
                    not_after: leaf.not_after(),
                    chain: svid.cert_chain,
                    key_pkcs8: k,
                },
                leaf,
            ))
        }
        (s, _) => {
            let (code, msg) = s.map(|s| (s.code, s.message)).unwrap_or_default();
            if quiet {
                tracing::debug!(entry_id = %e.id, code, msg, what, "server did not mint");
            } else {
                tracing::warn!(entry_id = %e.id, code, msg, what, "server did not mint");
            }
            None
        }
    }
}

/// The server's first answer to a sync: entries sent whole, or revisions, up to the page
/// marked as the last.
async fn read_listing(
    stream: &mut tonic::Streaming<pb::entry::SyncAuthorizedEntriesResponse>,
) -> Result<
    (
        BTreeMap<String, types::Entry>,
        Vec<pb::entry::EntryRevision>,
    ),
    ManagerError,
> {
    let mut out = BTreeMap::new();
    let mut revisions = vec![];
    loop {
        let Some(m) = stream.message().await? else {
            // The call ended before the page marked as the last: the listing is incomplete.
            return Err(ManagerError::SyncProtocol(
                "SyncAuthorizedEntries ended before its last page",
            ));
        };
        for e in m.entries {
            out.insert(e.id.clone(), e);
        }
        revisions.extend(m.entry_revisions);
        if !m.more {
            return Ok((out, revisions));
        }
    }
}

/// Reads a sync call to its end, so that its status is checked and the call closes cleanly
/// (no reset). A server that goes on talking after its last page breaks the protocol.
async fn read_end(
    stream: &mut tonic::Streaming<pb::entry::SyncAuthorizedEntriesResponse>,
) -> Result<(), ManagerError> {
    match stream.message().await? {
        None => Ok(()),
        Some(_) => Err(ManagerError::SyncProtocol(
            "SyncAuthorizedEntries sent a message after its last page",
        )),
    }
}
