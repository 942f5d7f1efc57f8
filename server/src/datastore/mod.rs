//! The server's persistent state behind one trait: registration entries, attested nodes and
//! their selectors, join tokens, bundles (one versioned document per trust domain; every change
//! bumps its sequence number) and the CA journal keyed by server id. Implementations: SQLite
//! ([`sqlite`]) and PostgreSQL ([`postgres`]), which share their queries ([`sqlstore`]).
//! Private keys are never stored here; they live in the KeyManager.
//!
//! Every mutation is one transaction, so a failed call persists nothing.

use async_trait::async_trait;
use kame_api::pb::types::Bundle;
use serde::{Deserialize, Serialize};

#[cfg(test)]
mod conformance;
pub mod postgres;
pub mod sql;
pub mod sqlite;
mod sqlstore;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Selector {
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
}

impl Selector {
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> Self {
        Selector {
            kind: kind.into(),
            value: value.into(),
        }
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// A registration entry. IDs are stored as canonical SPIFFE ID strings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RegistrationEntry {
    pub id: String,
    pub spiffe_id: String,
    pub parent_id: String,
    pub selectors: Vec<Selector>,
    pub x509_svid_ttl: i32,
    pub jwt_svid_ttl: i32,
    pub federates_with: Vec<String>,
    pub admin: bool,
    pub downstream: bool,
    pub expires_at: i64,
    pub dns_names: Vec<String>,
    pub revision_number: i64,
    pub store_svid: bool,
    pub hint: String,
    pub created_at: i64,
}

/// An attested agent. It is banned when both serial numbers are empty: only
/// [`DataStore::ban_node`] makes it so, and no later write undoes it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AttestedNode {
    pub spiffe_id: String,
    pub attestation_type: String,
    pub serial_number: String,
    pub expires_at: i64,
    pub new_serial_number: String,
    pub new_expires_at: i64,
    pub can_reattest: bool,
    pub selectors: Vec<Selector>,
    pub agent_version: String,
    /// The TPM's (resetCount, restartCount) at its last quote-verified attestation.
    pub tpm_boot: Option<(u32, u32)>,
    /// How many TPM resets (reboots) attestations have seen.
    pub tpm_reboots: u64,
}

impl AttestedNode {
    pub fn banned(&self) -> bool {
        self.serial_number.is_empty() && self.new_serial_number.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DsError {
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("agent is banned")]
    Banned,
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("datastore error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("datastore migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("datastore connection string: {0}")]
    Config(String),
    #[error("datastore schema: {0}")]
    Schema(String),
}

impl DsError {
    /// The database cannot be reached or is shutting down (not a fault in what was asked):
    /// the caller may retry.
    pub fn is_unavailable(&self) -> bool {
        match self {
            DsError::Db(e) => match e {
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::BeginFailed => true,
                // PostgreSQL: connection exceptions (08xxx), shutdown and not yet accepting
                // connections (57P01-57P03); SQLite: the database is busy (5) or locked (6).
                sqlx::Error::Database(d) => d.code().is_some_and(|c| {
                    c.starts_with("08")
                        || matches!(c.as_ref(), "57P01" | "57P02" | "57P03" | "5" | "6")
                }),
                _ => false,
            },
            _ => false,
        }
    }
}

pub type DsResult<T> = Result<T, DsError>;

/// What `list_entries` filters on (all given conditions must hold).
#[derive(Debug, Clone, Default)]
pub struct EntryFilter {
    pub spiffe_id: Option<String>,
    pub parent_id: Option<String>,
    pub hint: Option<String>,
    pub downstream: Option<bool>,
}

#[async_trait]
pub trait DataStore: Send + Sync + std::fmt::Debug {
    // registration entries
    /// Creates an entry; AlreadyExists when an entry with the same SPIFFE ID, parent ID and
    /// selector set exists.
    async fn create_entry(&self, entry: &RegistrationEntry) -> DsResult<RegistrationEntry>;
    async fn fetch_entry(&self, id: &str) -> DsResult<Option<RegistrationEntry>>;
    async fn list_entries(&self, filter: &EntryFilter) -> DsResult<Vec<RegistrationEntry>>;
    /// Replaces an entry (revision bumped); NotFound / AlreadyExists as for create.
    async fn update_entry(&self, entry: &RegistrationEntry) -> DsResult<RegistrationEntry>;
    async fn delete_entry(&self, id: &str) -> DsResult<RegistrationEntry>;
    async fn count_entries(&self) -> DsResult<i64>;

    // attested nodes
    async fn create_node(&self, node: &AttestedNode) -> DsResult<()>;
    async fn fetch_node(&self, spiffe_id: &str) -> DsResult<Option<AttestedNode>>;
    async fn list_nodes(&self) -> DsResult<Vec<AttestedNode>>;
    /// Applies `f` to the stored node in one transaction and returns it as written. A banned
    /// node is never written ([`DsError::Banned`]), so a change computed before a ban cannot
    /// undo it; NotFound when there is no node; an error from `f` persists nothing. `f` cannot
    /// rename the node.
    async fn modify_node(
        &self,
        spiffe_id: &str,
        f: &(dyn for<'n> Fn(&'n mut AttestedNode) -> DsResult<()> + Send + Sync),
    ) -> DsResult<AttestedNode>;
    /// Bans the node: its serial numbers are cleared and it stays banned until it is deleted
    /// (evicted). NotFound when there is no node.
    async fn ban_node(&self, spiffe_id: &str) -> DsResult<()>;
    async fn delete_node(&self, spiffe_id: &str) -> DsResult<AttestedNode>;

    // join tokens
    async fn create_join_token(&self, token: &str, expires_at: i64) -> DsResult<()>;
    /// Removes the token and returns its expiry: a token can be taken once.
    async fn take_join_token(&self, token: &str) -> DsResult<Option<i64>>;
    async fn join_token_exists(&self, token: &str) -> DsResult<bool>;

    // bundles
    async fn fetch_bundle(&self, trust_domain: &str) -> DsResult<Option<Bundle>>;
    async fn list_bundles(&self) -> DsResult<Vec<Bundle>>;
    /// Creates the bundle; AlreadyExists if present. The stored sequence number starts at 1.
    async fn create_bundle(&self, bundle: &Bundle) -> DsResult<Bundle>;
    /// Replaces the bundle's content, bumping its sequence number; NotFound if absent.
    async fn update_bundle(&self, bundle: &Bundle) -> DsResult<Bundle>;
    /// Merges X.509 and JWT authorities into the bundle (creating it if absent). The sequence
    /// number is bumped only when something was added.
    async fn append_bundle(&self, bundle: &Bundle) -> DsResult<Bundle>;
    async fn delete_bundle(&self, trust_domain: &str) -> DsResult<()>;

    // CA journal
    async fn fetch_ca_journal(&self, server_id: &str) -> DsResult<Option<Vec<u8>>>;
    async fn set_ca_journal(&self, server_id: &str, data: &[u8]) -> DsResult<()>;

    /// Applies `f` to the stored bundle of `trust_domain` in one transaction; when `f` says it
    /// changed something the bundle is written with its sequence number bumped. NotFound if
    /// there is no bundle; an error from `f` persists nothing.
    async fn modify_bundle(
        &self,
        trust_domain: &str,
        f: &(dyn for<'b> Fn(&'b mut Bundle) -> DsResult<bool> + Send + Sync),
    ) -> DsResult<Bundle>;

    // CA journal (every server's, for authorities other servers hold)
    async fn list_ca_journals(&self) -> DsResult<Vec<(String, Vec<u8>)>>;

    // Revocation readiness (see migrations/sqlite/0003_agent_authorities.sql).
    /// Records the authorities (lower-case hex SKIDs) an agent's SVIDs chain to, seen at
    /// `seen_at` (unix seconds).
    async fn record_agent_authorities(
        &self,
        spiffe_id: &str,
        authorities: &[String],
        seen_at: i64,
    ) -> DsResult<()>;
    /// Agents still attested and seen at or after `since`, with what they reported.
    async fn list_agent_authorities(&self, since: i64) -> DsResult<Vec<AgentAuthorities>>;

    // Federation relationships (see migrations/sqlite/0006_federation_relationships.sql),
    // stored without their bundle. AlreadyExists / NotFound as the names say.
    async fn create_federation_relationship(
        &self,
        r: &kame_api::pb::types::FederationRelationship,
    ) -> DsResult<()>;
    async fn fetch_federation_relationship(
        &self,
        trust_domain: &str,
    ) -> DsResult<Option<kame_api::pb::types::FederationRelationship>>;
    /// Every relationship, by trust domain.
    async fn list_federation_relationships(
        &self,
    ) -> DsResult<Vec<kame_api::pb::types::FederationRelationship>>;
    async fn update_federation_relationship(
        &self,
        r: &kame_api::pb::types::FederationRelationship,
    ) -> DsResult<()>;
    async fn delete_federation_relationship(&self, trust_domain: &str) -> DsResult<()>;

    // Key intents (see migrations/sqlite/0002_key_intents.sql).
    async fn put_key_intent(&self, intent: &KeyIntent) -> DsResult<()>;
    async fn list_key_intents(&self, server_id: &str) -> DsResult<Vec<KeyIntent>>;
    async fn delete_key_intent(&self, intent_id: &str) -> DsResult<()>;

    // Change events (see migrations/sqlite/0005_change_events.sql): ids follow commit order
    // with no gaps, so a reader that has seen event N has seen every event before it.
    /// The id of the last event of `kind` committed (0 before the first).
    async fn last_event(&self, kind: EventKind) -> DsResult<i64>;
    /// Up to `limit` events of `kind` with ids above `after`, in id order.
    async fn list_events(&self, kind: EventKind, after: i64, limit: i64) -> DsResult<Vec<Event>>;
    /// Deletes the events of `kind` created before `before` (unix seconds); returns how many.
    async fn prune_events(&self, kind: EventKind, before: i64) -> DsResult<u64>;
    /// The entries entry events `after < id <= upto` name, as they are now (deleted ones
    /// absent).
    async fn fetch_changed_entries(
        &self,
        after: i64,
        upto: i64,
    ) -> DsResult<Vec<RegistrationEntry>>;
    /// Up to `limit` entries with ids above `after_id`, in id order (keyset paging).
    async fn list_entries_after(
        &self,
        after_id: &str,
        limit: i64,
    ) -> DsResult<Vec<RegistrationEntry>>;
    /// The agents node events `after < id <= upto` name, as they are now.
    async fn fetch_changed_nodes(&self, after: i64, upto: i64) -> DsResult<Vec<AttestedNode>>;
    /// Up to `limit` agents with SPIFFE IDs above `after`, in order (keyset paging).
    async fn list_nodes_after(&self, after: &str, limit: i64) -> DsResult<Vec<AttestedNode>>;

    // The transparency log (see migrations/sqlite/0007_transparency_log.sql and
    // 0008_transparency_log_keys.sql).
    /// Appends `entries` in one transaction, numbered on from the log's size at commit (no
    /// gaps or duplicates whichever server appends); returns the first one's sequence number.
    async fn append_log_entries(&self, entries: &[LogRow]) -> DsResult<u64>;
    /// The number of entries in the log.
    async fn log_size(&self) -> DsResult<u64>;
    /// The entries with sequence numbers `start..end`, in order.
    async fn list_log_entries(&self, start: u64, end: u64) -> DsResult<Vec<(u64, LogRow)>>;
    /// The leaf hashes of entries `start..end`, in order.
    async fn log_leaf_hashes(&self, start: u64, end: u64) -> DsResult<Vec<[u8; 32]>>;
    /// The leaf hashes of entries `start..end` with each entry's timestamp (milliseconds, from
    /// its leaf input), in order.
    async fn log_leaf_times(&self, start: u64, end: u64) -> DsResult<Vec<([u8; 32], u64)>>;
    /// The sequence number of the first entry with this leaf hash.
    async fn find_log_leaf(&self, leaf_hash: &[u8; 32]) -> DsResult<Option<u64>>;
    /// Stores a signed tree head (one per log key and tree size: another is ignored).
    async fn put_tree_head(&self, head: &StoredTreeHead) -> DsResult<()>;
    /// The tree head the log key `log_id` signed for the largest tree, or for exactly `size`.
    async fn fetch_tree_head(
        &self,
        log_id: &[u8; 32],
        size: Option<u64>,
    ) -> DsResult<Option<StoredTreeHead>>;
    /// Publishes a log key (its ID and SubjectPublicKeyInfo) to the servers sharing the
    /// database; a key already there is kept as it is.
    async fn put_log_key(&self, log_id: &[u8; 32], public_key: &[u8]) -> DsResult<()>;
    /// Every published log key (SubjectPublicKeyInfo DER), oldest first.
    async fn list_log_keys(&self) -> DsResult<Vec<Vec<u8>>>;

    // Break-glass records (migrations/sqlite/0009_break_glass_records.sql).
    /// Stores an agent's record lines in one transaction; a sequence number already stored
    /// (another server took the same report) is AlreadyExists and nothing is stored.
    async fn append_break_glass(&self, agent_id: &str, rows: &[BreakGlassRow]) -> DsResult<()>;
    /// The agent's last stored line and the key of the opening in force there.
    async fn last_break_glass(&self, agent_id: &str) -> DsResult<Option<BreakGlassRow>>;
    /// The agent's last `limit` lines, in order.
    async fn list_break_glass(&self, agent_id: &str, limit: i64) -> DsResult<Vec<BreakGlassRow>>;
}

/// One line of an agent's break-glass record, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakGlassRow {
    pub seq: u64,
    pub time: u64,
    /// `open`, `deliver` or `close`.
    pub kind: String,
    /// The line as the agent wrote and signed it.
    pub line: String,
}

/// One transparency log entry as stored: the `MerkleTreeLeaf` encoding, its leaf hash, and
/// the extra data `get-entries` returns with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRow {
    pub leaf_input: Vec<u8>,
    pub leaf_hash: [u8; 32],
    pub extra: Vec<u8>,
}

/// A signed tree head as stored: the log key's ID, size, timestamp (ms), root hash and the
/// TLS-encoded signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTreeHead {
    /// The signing log key's ID (SHA-256 of its SubjectPublicKeyInfo).
    pub log_id: [u8; 32],
    pub tree_size: u64,
    pub timestamp: u64,
    pub root_hash: [u8; 32],
    pub signature: Vec<u8>,
}

/// What a change event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A registration entry (created, updated or deleted).
    Entry,
    /// An attested node (attested, renewed, banned or evicted).
    Node,
}

/// One change: the entry id or agent SPIFFE ID it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: i64,
    pub key: String,
}

/// Merges `add` into `base` (by content), returning whether anything changed.
/// A key creation the CA started: the KeyManager key `key_id` of `key_type`, made with the
/// backend marker `intent_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyIntent {
    pub intent_id: String,
    pub server_id: String,
    pub key_id: String,
    pub key_type: String,
    pub created_at: i64,
}

/// What an agent last reported of the authorities its SVIDs chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentAuthorities {
    pub spiffe_id: String,
    pub authorities: Vec<String>,
    pub seen_at: i64,
}

pub fn merge_bundle(base: &mut Bundle, add: &Bundle) -> bool {
    let mut changed = false;
    for c in &add.x509_authorities {
        if !base.x509_authorities.iter().any(|x| x.asn1 == c.asn1) {
            base.x509_authorities.push(c.clone());
            changed = true;
        }
    }
    for k in &add.jwt_authorities {
        if !base.jwt_authorities.iter().any(|x| x.key_id == k.key_id) {
            base.jwt_authorities.push(k.clone());
            changed = true;
        }
    }
    changed
}
