//! The servers' caches of what agents ask about on every sync: every registration entry,
//! indexed so that what an agent may obtain is found from the agent alone (its own children,
//! the node aliases its selectors match, and their descendants), and every attested node (who
//! is attested, banned, with which serial numbers). Their cost per sync does not grow with the
//! number of entries or agents in the trust domain. Each follows its kind of datastore change
//! events (`id > cursor`; the ids follow commit order with no gaps, so nothing is missed when
//! transactions of several servers commit out of order) and reloads in full only when its
//! cursor has fallen behind pruned events. Loading reads the event head first and then the
//! rows in keyset pages, so start-up time is bounded by the row count, not by the history.
//!
//! They never write to the datastore, and they serve what the database said at their last
//! poll: a change made on another server arrives within one poll interval.

use crate::datastore::{AttestedNode, DataStore, DsResult, EventKind, RegistrationEntry, Selector};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// How often the cache asks the datastore for new events.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Entries per page when loading, and events per batch when following.
const PAGE: i64 = 2000;
/// Events older than this are pruned; a server paused for longer reloads in full.
pub const EVENT_RETENTION: Duration = Duration::from_secs(3600);

/// What a cache holds: rows of one kind, kept by their key.
#[async_trait::async_trait]
pub trait Followed: Send + Sync + std::fmt::Debug + 'static {
    type Item: Send;
    /// The events this index follows.
    const KIND: EventKind;
    /// An empty index with the same settings.
    fn empty(&self) -> Self;
    fn key(item: &Self::Item) -> &str;
    fn insert(&mut self, item: Self::Item);
    fn remove(&mut self, key: &str);
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Up to `limit` rows with keys above `after`, in key order.
    async fn page(ds: &dyn DataStore, after: &str, limit: i64) -> DsResult<Vec<Self::Item>>;
    /// The rows events `after < id <= upto` name, as they are now.
    async fn changed(ds: &dyn DataStore, after: i64, upto: i64) -> DsResult<Vec<Self::Item>>;
}

/// Every registration entry, indexed by parent and by node-alias selector.
#[derive(Debug, Default)]
pub struct EntryIndex {
    /// `spiffe://<td>/spire/server`, the parent of node aliases.
    server_id: String,
    entries: HashMap<String, Arc<RegistrationEntry>>,
    /// Parent SPIFFE ID -> ids of the entries under it.
    children: HashMap<String, HashSet<String>>,
    /// Node aliases (entries parented to the server) by their smallest selector: an alias
    /// whose selectors are all the agent's is found under one of the agent's selectors.
    aliases: HashMap<Selector, HashSet<String>>,
}

#[async_trait::async_trait]
impl Followed for EntryIndex {
    type Item = RegistrationEntry;
    const KIND: EventKind = EventKind::Entry;

    fn empty(&self) -> Self {
        EntryIndex {
            server_id: self.server_id.clone(),
            ..Default::default()
        }
    }

    fn key(e: &RegistrationEntry) -> &str {
        &e.id
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    async fn page(ds: &dyn DataStore, after: &str, limit: i64) -> DsResult<Vec<RegistrationEntry>> {
        ds.list_entries_after(after, limit).await
    }

    async fn changed(
        ds: &dyn DataStore,
        after: i64,
        upto: i64,
    ) -> DsResult<Vec<RegistrationEntry>> {
        ds.fetch_changed_entries(after, upto).await
    }

    fn insert(&mut self, e: RegistrationEntry) {
        self.remove(&e.id);
        let server_id = self.server_id.as_str();
        self.children
            .entry(e.parent_id.clone())
            .or_default()
            .insert(e.id.clone());
        if e.parent_id == server_id
            && let Some(first) = e.selectors.iter().min()
        {
            self.aliases
                .entry(first.clone())
                .or_default()
                .insert(e.id.clone());
        }
        self.entries.insert(e.id.clone(), Arc::new(e));
    }

    fn remove(&mut self, id: &str) {
        let Some(old) = self.entries.remove(id) else {
            return;
        };
        let server_id = self.server_id.as_str();
        if let Some(set) = self.children.get_mut(&old.parent_id) {
            set.remove(id);
            if set.is_empty() {
                self.children.remove(&old.parent_id);
            }
        }
        if old.parent_id == server_id
            && let Some(first) = old.selectors.iter().min()
            && let Some(set) = self.aliases.get_mut(first)
        {
            set.remove(id);
            if set.is_empty() {
                self.aliases.remove(first);
            }
        }
    }
}

/// Every attested node, by SPIFFE ID.
#[derive(Debug, Default)]
pub struct NodeIndex {
    nodes: HashMap<String, Arc<AttestedNode>>,
}

#[async_trait::async_trait]
impl Followed for NodeIndex {
    type Item = AttestedNode;
    const KIND: EventKind = EventKind::Node;

    fn empty(&self) -> Self {
        NodeIndex::default()
    }

    fn key(n: &AttestedNode) -> &str {
        &n.spiffe_id
    }

    fn insert(&mut self, n: AttestedNode) {
        self.nodes.insert(n.spiffe_id.clone(), Arc::new(n));
    }

    fn remove(&mut self, key: &str) {
        self.nodes.remove(key);
    }

    fn len(&self) -> usize {
        self.nodes.len()
    }

    async fn page(ds: &dyn DataStore, after: &str, limit: i64) -> DsResult<Vec<AttestedNode>> {
        ds.list_nodes_after(after, limit).await
    }

    async fn changed(ds: &dyn DataStore, after: i64, upto: i64) -> DsResult<Vec<AttestedNode>> {
        ds.fetch_changed_nodes(after, upto).await
    }
}

#[derive(Debug)]
struct State<T> {
    index: T,
    /// The last event applied.
    cursor: i64,
}

/// A cache of one kind of row (see the module documentation).
#[derive(Debug)]
pub struct Cache<T: Followed> {
    ds: Arc<dyn DataStore>,
    state: RwLock<State<T>>,
    /// One refresh at a time.
    refreshing: tokio::sync::Mutex<()>,
}

/// The registration entries.
pub type EntryCache = Cache<EntryIndex>;
/// The attested nodes.
pub type NodeCache = Cache<NodeIndex>;

impl EntryCache {
    /// Loads every entry. `server_id` is `spiffe://<td>/spire/server`, the parent of node
    /// aliases.
    pub async fn load(ds: Arc<dyn DataStore>, server_id: String) -> DsResult<Arc<Self>> {
        Cache::load_with(
            ds,
            EntryIndex {
                server_id,
                ..Default::default()
            },
        )
        .await
    }
}

impl NodeCache {
    /// Loads every attested node.
    pub async fn load(ds: Arc<dyn DataStore>) -> DsResult<Arc<Self>> {
        Cache::load_with(ds, NodeIndex::default()).await
    }

    /// The agent `id` as last read.
    pub fn get(&self, id: &str) -> Option<Arc<AttestedNode>> {
        self.read().index.nodes.get(id).cloned()
    }
}

impl<T: Followed> Cache<T> {
    async fn load_with(ds: Arc<dyn DataStore>, empty: T) -> DsResult<Arc<Self>> {
        let cache = Arc::new(Cache {
            ds,
            state: RwLock::new(State {
                index: empty,
                cursor: 0,
            }),
            refreshing: tokio::sync::Mutex::new(()),
        });
        cache.reload().await?;
        Ok(cache)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State<T>> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State<T>> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads everything again: the event head first, then the rows, then the events
    /// committed meanwhile.
    async fn reload(&self) -> DsResult<()> {
        let _one = self.refreshing.lock().await;
        let head = self.ds.last_event(T::KIND).await?;
        let mut fresh = self.read().index.empty();
        let mut after = String::new();
        loop {
            let page = T::page(&*self.ds, &after, PAGE).await?;
            let Some(last) = page.last() else { break };
            after = T::key(last).to_string();
            let done = (page.len() as i64) < PAGE;
            for item in page {
                fresh.insert(item);
            }
            if done {
                break;
            }
        }
        *self.write() = State {
            index: fresh,
            cursor: head,
        };
        self.follow().await.map(|_| ())
    }

    /// Applies the events committed since the last refresh.
    pub async fn refresh(&self) -> DsResult<()> {
        let stale = {
            let _one = self.refreshing.lock().await;
            self.follow().await?
        };
        if stale {
            tracing::warn!(
                kind = ?T::KIND,
                "change events were pruned past this server's cursor: reloading"
            );
            self.reload().await?;
        }
        Ok(())
    }

    /// Follows events from the cursor (the caller holds `refreshing`); true when the cursor
    /// is behind pruned events or ahead of the database, so only a reload can catch up.
    async fn follow(&self) -> DsResult<bool> {
        loop {
            let cursor = self.read().cursor;
            let head = self.ds.last_event(T::KIND).await?;
            if head == cursor {
                return Ok(false);
            }
            if head < cursor {
                return Ok(true);
            }
            let events = self.ds.list_events(T::KIND, cursor, PAGE).await?;
            let contiguous = events
                .iter()
                .enumerate()
                .all(|(i, ev)| ev.id == cursor + 1 + i as i64);
            let Some(upto) = events.last().map(|e| e.id) else {
                return Ok(true);
            };
            if !contiguous {
                return Ok(true);
            }
            let now = T::changed(&*self.ds, cursor, upto).await?;
            let mut st = self.write();
            for ev in &events {
                st.index.remove(&ev.key);
            }
            for item in now {
                st.index.insert(item);
            }
            st.cursor = upto;
        }
    }

    /// Polls the datastore every `every` until the cache is dropped, and prunes old events
    /// every ten minutes.
    pub fn spawn_follower(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_prune = std::time::Instant::now();
            loop {
                tick.tick().await;
                let Some(cache) = weak.upgrade() else { return };
                if let Err(e) = cache.refresh().await {
                    tracing::warn!(kind = ?T::KIND, error = %e, "cannot follow change events; serving what was read");
                }
                if last_prune.elapsed() >= Duration::from_secs(600) {
                    last_prune = std::time::Instant::now();
                    let before = crate::ca::now_secs().saturating_sub(EVENT_RETENTION.as_secs());
                    if let Err(e) = cache.ds.prune_events(T::KIND, before as i64).await {
                        tracing::warn!(error = %e, "cannot prune change events");
                    }
                }
            }
        })
    }

    /// The number of rows cached.
    pub fn len(&self) -> usize {
        self.read().index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl EntryCache {
    /// The entry `id`, if cached.
    pub fn get(&self, id: &str) -> Option<Arc<RegistrationEntry>> {
        self.read().index.entries.get(id).cloned()
    }

    /// The entries an agent with `agent_id` and `selectors` may obtain SVIDs for, sorted by
    /// id: those parented to the agent, to node aliases (entries parented to the server)
    /// whose selectors are all the agent's, and, recursively, to any entry already
    /// authorized. Entries expired at `now` are left out, with what lies under them.
    pub fn authorized(
        &self,
        agent_id: &str,
        selectors: &[Selector],
        now: i64,
    ) -> Vec<Arc<RegistrationEntry>> {
        let st = self.read();
        let idx = &st.index;
        let agent_selectors: HashSet<&Selector> = selectors.iter().collect();
        let mut frontier: Vec<&str> = vec![agent_id];
        for s in selectors {
            for id in idx.aliases.get(s).into_iter().flatten() {
                if let Some(e) = idx.entries.get(id)
                    && e.selectors.iter().all(|s| agent_selectors.contains(s))
                {
                    frontier.push(e.spiffe_id.as_str());
                }
            }
        }
        let mut visited: HashSet<&str> = HashSet::new();
        let mut seen: HashSet<&str> = HashSet::new();
        let mut out: Vec<Arc<RegistrationEntry>> = vec![];
        while let Some(parent) = frontier.pop() {
            if !visited.insert(parent) {
                continue;
            }
            for id in idx.children.get(parent).into_iter().flatten() {
                let Some(e) = idx.entries.get(id) else {
                    continue;
                };
                if e.expires_at != 0 && e.expires_at < now {
                    continue;
                }
                if seen.insert(e.id.as_str()) {
                    frontier.push(e.spiffe_id.as_str());
                    out.push(e.clone());
                }
            }
        }
        drop(st);
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }
}
