//! The trust domain's issuance transparency log: every X509-SVID this server mints is recorded
//! in a log kept in the datastore, as an RFC 6962 precertificate entry, before its certificate
//! is signed, and the log's signed certificate timestamp (SCT) goes into the certificate; every
//! JWT-SVID likewise (its signing input, the SCT in a claim); every change of a signing
//! authority and every agent attestation as a JSON entry. The
//! structures are `kame_api::ct`'s. Servers sharing a database append to one tree (the
//! datastore numbers entries with no gaps or duplicates); each server signs its SCTs and tree
//! heads with its own log key, kept in its KeyManager under [`LOG_KEY_ID`] (so in KMS or an HSM
//! when the CA's keys are). Appends made while others are being written go in one transaction
//! together. Tree heads are signed on a timer.
//!
//! It must not sign certificates (the CA does) or decide what is issued; it records and proves.

pub mod http;

use crate::datastore::{DataStore, DsError, LogRow, StoredTreeHead};
use kame_api::ct::{
    self, CtError, DigitallySigned, Entry, Frontier, Hash, Sct, SignedTreeHead, TreeHead,
};
use kame_keymanager::{KeyManager, KeyType, SignOpts};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// The KeyManager id of this server's log key (P-256).
pub const LOG_KEY_ID: &str = "kame-transparency-log";

/// At most this many appends are written in one transaction.
const MAX_BATCH: usize = 512;

/// Appends waiting for the writer; a full queue makes minting wait.
const QUEUE: usize = 4096;

/// `server.transparency { ... }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Issuance fails when the log cannot record (else the SVID is issued without an SCT, and
    /// the failure logged).
    pub required: bool,
    /// Clients presenting an X509-SVID (agents, admins) must have one with a valid SCT from
    /// the log of a server sharing the datastore (`require_agent_scts`; off by default, since
    /// SVIDs issued before the log was on have none).
    pub require_agent_scts: bool,
    /// How often a tree head is signed (when the log has grown).
    pub tree_head_interval: Duration,
    /// Where RFC 6962's read API is served (`bind_address`, `bind_port`); none without them.
    pub listen: Option<(String, u16)>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            required: true,
            require_agent_scts: false,
            tree_head_interval: Duration::from_secs(1),
            listen: None,
        }
    }
}

/// What went wrong in the log: one variant per failed step.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("transparency log key {LOG_KEY_ID:?}: {0}")]
    Key(#[source] kame_keymanager::Error),
    #[error("transparency log key {LOG_KEY_ID:?} is {0}; it must be ec-p256")]
    KeyType(KeyType),
    #[error("transparency log key {LOG_KEY_ID:?} changed under the log (fingerprint {0})")]
    KeyChanged(String),
    #[error("transparency log entry: {0}")]
    Entry(#[from] CtError),
    #[error("the transparency log cannot record: {0}")]
    Append(String),
    #[error("transparency log datastore: {0}")]
    Store(#[from] DsError),
    #[error("the transparency log is stopping")]
    Stopped,
    #[error("tree size {requested} is beyond the log's {size} entries")]
    BeyondLog { requested: u64, size: u64 },
    #[error("no entry with leaf hash {0} in the first {1} entries")]
    NoSuchLeaf(String, u64),
    #[error(
        "the log in the datastore has {now} entries, fewer than the {seen} this server has seen: it was rolled back or restored; no tree head is signed"
    )]
    Shrank { seen: u64, now: u64 },
    #[error("the log did not record the entry within {0:?}")]
    Timeout(Duration),
    #[error("the log's datastore returned {got} leaf hashes for a tree of {size}")]
    ShortRead { got: usize, size: u64 },
    #[error("too many proofs are being computed; try again later")]
    Busy,
}

/// How long a mint waits for its entry to be recorded.
const RECORD_TIMEOUT: Duration = Duration::from_secs(10);

/// A tree head is signed again when the latest is this old, even if the log has not grown.
const MAX_HEAD_AGE: Duration = Duration::from_secs(3600);

/// How long a proof waits for its turn.
const PROOF_WAIT: Duration = Duration::from_secs(5);

struct Append {
    row: LogRow,
    done: oneshot::Sender<Result<u64, String>>,
}

/// This server's view of the log: its key, the append queue, and the tree as far as it has
/// signed it.
pub struct TransparencyLog {
    ds: Arc<dyn DataStore>,
    km: Arc<dyn KeyManager>,
    spki_der: Vec<u8>,
    fingerprint: String,
    log_id: Hash,
    settings: Settings,
    queue: mpsc::Sender<Append>,
    /// The tree as of the last tree head this server signed or checked, and the newest
    /// timestamp among its entries.
    frontier: tokio::sync::Mutex<(Frontier, u64)>,
    /// Proofs read every leaf hash of the tree they are for: at most [`PROOFS`] at once, so
    /// readers of the public API cannot make the server hold many copies.
    proofs: tokio::sync::Semaphore,
    /// The log keys published in the datastore by the servers sharing it (this one's
    /// included), refreshed every [`KEYS_REFRESH`].
    known_keys: std::sync::RwLock<Arc<Vec<Vec<u8>>>>,
}

/// How often the published log keys are read again.
const KEYS_REFRESH: Duration = Duration::from_secs(10);

/// Proofs computed at once.
const PROOFS: usize = 2;

impl std::fmt::Debug for TransparencyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransparencyLog")
            .field("log_id", &hex::encode(self.log_id))
            .field("settings", &self.settings)
            .finish()
    }
}

fn now_ms() -> u64 {
    crate::ca::now_ms()
}

impl TransparencyLog {
    /// Opens the log: the log key (made on first start), and the writer task.
    pub async fn open(
        ds: Arc<dyn DataStore>,
        km: Arc<dyn KeyManager>,
        settings: Settings,
    ) -> Result<Arc<Self>, LogError> {
        let key = match km.public_key(LOG_KEY_ID).await {
            Ok(k) => k,
            Err(kame_keymanager::Error::NotFound(_)) => km
                .generate_key(LOG_KEY_ID, KeyType::EcP256)
                .await
                .map_err(LogError::Key)?,
            Err(e) => return Err(LogError::Key(e)),
        };
        if key.key_type != KeyType::EcP256 {
            return Err(LogError::KeyType(key.key_type));
        }
        let log_id = ct::log_id(&key.spki_der);
        // Published for the servers sharing the datastore, which may require agents' SVIDs
        // to carry an SCT from any of them.
        ds.put_log_key(&log_id, &key.spki_der).await?;
        let known_keys = std::sync::RwLock::new(Arc::new(ds.list_log_keys().await?));
        let (queue, rx) = mpsc::channel(QUEUE);
        tokio::spawn(writer(ds.clone(), rx));
        Ok(Arc::new(TransparencyLog {
            known_keys,
            log_id,
            spki_der: key.spki_der,
            fingerprint: key.fingerprint,
            ds,
            km,
            settings,
            queue,
            frontier: Default::default(),
            proofs: tokio::sync::Semaphore::new(PROOFS),
        }))
    }

    /// The log key's ID (SHA-256 of its SubjectPublicKeyInfo), as SCTs carry it.
    pub fn log_id(&self) -> Hash {
        self.log_id
    }

    /// The log key's SubjectPublicKeyInfo, DER: what verifiers are configured with.
    pub fn public_key_der(&self) -> &[u8] {
        &self.spki_der
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The public keys (SubjectPublicKeyInfo DER) of the logs of every server sharing the
    /// datastore, as last read.
    pub fn known_keys(&self) -> Arc<Vec<Vec<u8>>> {
        self.known_keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn refresh_known_keys(&self) {
        match self.ds.list_log_keys().await {
            Ok(k) => *self.known_keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(k),
            Err(e) => tracing::warn!(error = %e, "transparency log: cannot read the log keys"),
        }
    }

    async fn sign(&self, message: &[u8]) -> Result<DigitallySigned, LogError> {
        let sig = self
            .km
            .sign(LOG_KEY_ID, message, SignOpts::for_key(KeyType::EcP256))
            .await
            .map_err(LogError::Key)?;
        if sig.fingerprint != self.fingerprint {
            return Err(LogError::KeyChanged(sig.fingerprint));
        }
        Ok(DigitallySigned {
            hash_alg: ct::HASH_SHA256,
            sig_alg: ct::SIG_ECDSA,
            signature: sig.bytes,
        })
    }

    /// Records `entry` and returns the log's SCT for it. The entry is written to the datastore
    /// and its SCT signed at the same time; both must succeed. `extra` is what `get-entries`
    /// returns beside the entry.
    pub async fn record(&self, entry: &Entry, extra: Vec<u8>) -> Result<(u64, Sct), LogError> {
        let timestamp = now_ms();
        let signed = ct::sct_signed_data(timestamp, entry)?;
        let leaf_input = ct::leaf_input(timestamp, entry)?;
        let row = LogRow {
            leaf_hash: ct::leaf_hash(&leaf_input),
            leaf_input,
            extra,
        };
        let (done, appended) = oneshot::channel();
        let append = async {
            self.queue
                .send(Append { row, done })
                .await
                .map_err(|_| LogError::Stopped)?;
            appended
                .await
                .map_err(|_| LogError::Stopped)?
                .map_err(LogError::Append)
        };
        let (seq, signature) = tokio::join!(
            tokio::time::timeout(RECORD_TIMEOUT, append),
            self.sign(&signed)
        );
        let seq = seq.map_err(|_| LogError::Timeout(RECORD_TIMEOUT))??;
        Ok((
            seq,
            Sct {
                log_id: self.log_id,
                timestamp,
                signature: signature?,
            },
        ))
    }

    /// Records one of Kame's events (an authority change, an agent's attestation) as a JSON
    /// entry of type `kind`; returns its index.
    pub async fn record_event(
        &self,
        kind: ct::EntryType,
        body: &serde_json::Value,
    ) -> Result<u64, LogError> {
        let entry = Entry::Kame {
            kind,
            body: body.to_string().into_bytes(),
        };
        Ok(self.record(&entry, vec![]).await?.0)
    }

    /// Brings the frontier to `size` entries, reading only the leaf hashes it lacks; returns
    /// the root and the newest timestamp among the entries.
    async fn frontier_at(&self, size: u64) -> Result<(Hash, u64), LogError> {
        let mut guard = self.frontier.lock().await;
        let (f, newest) = &mut *guard;
        if f.size() > size {
            // The datastore holds fewer entries than this server has seen (a restore, or a
            // replica behind its primary): the log has forked. Sign nothing.
            return Err(LogError::Shrank {
                seen: f.size(),
                now: size,
            });
        }
        while f.size() < size {
            let end = size.min(f.size() + 65_536);
            for (h, ts) in self.ds.log_leaf_times(f.size(), end).await? {
                f.push(h);
                *newest = (*newest).max(ts);
            }
            if f.size() < end {
                return Err(LogError::Store(DsError::Corrupt(format!(
                    "the log has {} entries but entry {} is missing",
                    size,
                    f.size()
                ))));
            }
        }
        Ok((f.root(), *newest))
    }

    /// Signs a tree head for the log as it is now, unless this server already signed one for
    /// that size; returns the latest.
    pub async fn sign_tree_head(&self) -> Result<SignedTreeHead, LogError> {
        let size = self.ds.log_size().await?;
        let last = self.ds.fetch_tree_head(&self.log_id, None).await?;
        if let Some(h) = &last
            && h.tree_size >= size
            && now_ms().saturating_sub(h.timestamp) < MAX_HEAD_AGE.as_millis() as u64
        {
            return stored_to_sth(h);
        }
        let (root_hash, newest) = self.frontier_at(size).await?;
        // Never older than an entry it covers (RFC 6962 §3.5; an entry may come from a
        // server whose clock runs ahead of this one's) or than this key's last tree head.
        let timestamp = now_ms()
            .max(newest)
            .max(last.map(|h| h.timestamp).unwrap_or(0));
        let head = TreeHead {
            tree_size: size,
            timestamp,
            root_hash,
        };
        let signature = self.sign(&head.signed_data()).await?;
        let sth = SignedTreeHead { head, signature };
        self.ds
            .put_tree_head(&StoredTreeHead {
                log_id: self.log_id,
                tree_size: sth.head.tree_size,
                timestamp: sth.head.timestamp,
                root_hash: sth.head.root_hash,
                signature: sth.signature_bytes()?,
            })
            .await?;
        Ok(sth)
    }

    /// The latest tree head this server signed (signing the first if there is none).
    pub async fn latest_tree_head(&self) -> Result<SignedTreeHead, LogError> {
        match self.ds.fetch_tree_head(&self.log_id, None).await? {
            Some(h) => stored_to_sth(&h),
            None => self.sign_tree_head().await,
        }
    }

    /// Signs tree heads every `tree_head_interval`, and reads the published log keys every
    /// [`KEYS_REFRESH`], until `shutdown` turns true.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.settings.tree_head_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut keys = tokio::time::interval(KEYS_REFRESH);
        keys.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = self.sign_tree_head().await {
                        tracing::warn!(error = %e, "transparency log: cannot sign a tree head");
                    }
                }
                _ = keys.tick() => self.refresh_known_keys().await,
                r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { return },
            }
        }
    }

    /// The index of the leaf with hash `leaf_hash` and its inclusion proof in the tree of
    /// `tree_size` entries.
    pub async fn inclusion_proof(
        &self,
        leaf_hash: &Hash,
        tree_size: u64,
    ) -> Result<(u64, Vec<Hash>), LogError> {
        let size = self.ds.log_size().await?;
        if tree_size > size {
            return Err(LogError::BeyondLog {
                requested: tree_size,
                size,
            });
        }
        let index = match self.ds.find_log_leaf(leaf_hash).await? {
            Some(i) if i < tree_size => i,
            _ => return Err(LogError::NoSuchLeaf(hex::encode(leaf_hash), tree_size)),
        };
        let hashes = self.leaf_hashes_for_proof(tree_size).await?;
        let proof = tokio::task::spawn_blocking(move || ct::inclusion_proof(index, &hashes))
            .await
            .map_err(|_| LogError::Stopped)??;
        Ok((index, proof))
    }

    /// Entries `start..end` as stored (fewer when the log is shorter).
    pub async fn entries(&self, start: u64, end: u64) -> Result<Vec<(u64, LogRow)>, LogError> {
        Ok(self.ds.list_log_entries(start, end).await?)
    }

    /// The consistency proof between the trees of `first` and `second` entries.
    pub async fn consistency_proof(&self, first: u64, second: u64) -> Result<Vec<Hash>, LogError> {
        let size = self.ds.log_size().await?;
        if second > size {
            return Err(LogError::BeyondLog {
                requested: second,
                size,
            });
        }
        let hashes = self.leaf_hashes_for_proof(second).await?;
        Ok(
            tokio::task::spawn_blocking(move || ct::consistency_proof(first, &hashes))
                .await
                .map_err(|_| LogError::Stopped)??,
        )
    }

    /// The leaf hashes of the tree of `size` entries, for a proof: one proof's read at a
    /// time per [`PROOFS`] permit, waiting at most [`PROOF_WAIT`] for one.
    async fn leaf_hashes_for_proof(&self, size: u64) -> Result<Vec<Hash>, LogError> {
        let _turn = tokio::time::timeout(PROOF_WAIT, self.proofs.acquire())
            .await
            .map_err(|_| LogError::Busy)?
            .map_err(|_| LogError::Stopped)?;
        let hashes = self.ds.log_leaf_hashes(0, size).await?;
        if hashes.len() as u64 != size {
            return Err(LogError::ShortRead {
                got: hashes.len(),
                size,
            });
        }
        Ok(hashes)
    }
}

fn stored_to_sth(h: &StoredTreeHead) -> Result<SignedTreeHead, LogError> {
    Ok(SignedTreeHead {
        head: TreeHead {
            tree_size: h.tree_size,
            timestamp: h.timestamp,
            root_hash: h.root_hash,
        },
        signature: SignedTreeHead::decode_signature(&h.signature)?,
    })
}

/// Writes appends as they come: whatever is waiting when a write starts goes in it (up to
/// [`MAX_BATCH`]), so under load appends share transactions and alone one waits for nothing.
async fn writer(ds: Arc<dyn DataStore>, mut rx: mpsc::Receiver<Append>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (rows, waiting): (Vec<LogRow>, Vec<_>) =
            batch.drain(..).map(|a| (a.row, a.done)).unzip();
        let r = ds.append_log_entries(&rows).await;
        for (i, done) in waiting.into_iter().enumerate() {
            let _ = done.send(match &r {
                Ok(first) => Ok(first + i as u64),
                Err(e) => Err(e.to_string()),
            });
        }
        if let Err(e) = r {
            tracing::warn!(error = %e, entries = rows.len(), "transparency log: append failed");
        }
    }
}
