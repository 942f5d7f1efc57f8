//! Break-glass on the agent: its settings, whether the glass is open, and the record of what
//! was done under it (`data_dir/break_glass/record.jsonl`, the format of
//! [`kame_api::breakglass`]: hash-chained lines signed by the agent's key, checked whole at
//! start and before every append). The manager decides what to serve and when to open or
//! close (see `manager::reserve`); this module keeps the state and the record and never talks
//! to a server. A record that does not verify is never appended to, and keeps the glass shut.

use kame_api::breakglass::{self as rec, Body, Event, RecordError, Tip};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The audience a break-glass token (a JWT-SVID for the agent's own SPIFFE ID) must name.
pub const TOKEN_AUDIENCE: &str = "kame-break-glass";

/// `agent.break_glass` (Kame's own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakGlassConfig {
    /// No server must have answered for this long before the glass can be broken.
    pub outage: Duration,
    /// The longest one break may last.
    pub max_duration: Duration,
    /// Breaking needs a token: a JWT-SVID for the agent's SPIFFE ID with audience
    /// [`TOKEN_AUDIENCE`], signed by an untainted JWT authority of the agent's bundle.
    pub require_token: bool,
}

impl Default for BreakGlassConfig {
    fn default() -> Self {
        BreakGlassConfig {
            outage: Duration::from_secs(300),
            max_duration: Duration::from_secs(24 * 3600),
            require_token: false,
        }
    }
}

/// Why the glass was not broken (or the record not written). Each names what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BreakGlassError {
    #[error("break-glass is not configured on this agent (agent.break_glass)")]
    NotConfigured,
    #[error("the agent has no SVID yet: it cannot sign a break-glass record")]
    NotAttested,
    #[error(
        "a server answered {ago} s ago; break-glass needs no answer for {outage} s (agent.break_glass.outage)"
    )]
    ServerAnswered { ago: u64, outage: u64 },
    #[error(
        "the agent holds no reserve SVID (the server's break_glass block, and its node_attestors, decide which agents get them)"
    )]
    NoReserves,
    #[error("a reason is required (at most {} characters)", rec::MAX_REASON)]
    Reason,
    #[error("duration: must be positive and at most {max} s (agent.break_glass.max_duration)")]
    Duration { max: u64 },
    #[error("the glass is already broken, until {closes_at}")]
    AlreadyOpen { closes_at: u64 },
    #[error("a break-glass token is required (agent.break_glass.require_token)")]
    TokenRequired,
    #[error("break-glass token refused: {0}")]
    Token(String),
    #[error("the break-glass record {path} does not verify: {source}")]
    Tampered {
        path: String,
        #[source]
        source: RecordError,
    },
    #[error("cannot write the break-glass record {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot sign the break-glass record: {0}")]
    Sign(#[from] crate::keys::KeyError),
}

/// The glass while it is broken.
#[derive(Debug, Clone)]
pub struct Opening {
    pub reason: String,
    pub opened_at: u64,
    pub closes_at: u64,
}

struct Inner {
    open: Option<Opening>,
    /// The key that signed the opening signs every line up to the closing (the agent's SVID
    /// may be renewed meanwhile).
    signer: Option<OwnedSigner>,
    /// (serial, selector set) pairs already recorded as delivered during this opening.
    delivered: BTreeSet<(String, Vec<String>)>,
    /// Where the record ends; `Err` when it does not verify.
    tip: Result<Tip, String>,
    /// The record file's length when the agent last wrote or checked it: a file of another
    /// length at the next append was changed behind the agent's back.
    len: u64,
    /// Deliveries recorded since the agent started.
    delivered_total: u64,
}

/// The signing key and chain the record's lines are signed with, and the agent's ID.
pub struct Signer<'a> {
    pub agent: String,
    pub key_pkcs8: &'a [u8],
    pub chain: &'a [Vec<u8>],
}

struct OwnedSigner {
    agent: String,
    key_pkcs8: zeroize::Zeroizing<Vec<u8>>,
    chain: Vec<Vec<u8>>,
}

impl OwnedSigner {
    fn borrow(&self) -> Signer<'_> {
        Signer {
            agent: self.agent.clone(),
            key_pkcs8: &self.key_pkcs8,
            chain: &self.chain,
        }
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("open", &self.open)
            .field("delivered", &self.delivered.len())
            .field("tip", &self.tip)
            .finish_non_exhaustive()
    }
}

/// Break-glass state and record of one agent.
#[derive(Debug)]
pub struct Glass {
    pub cfg: BreakGlassConfig,
    dir: PathBuf,
    /// When a server last answered (Unix seconds); at start, the start time: an agent just
    /// started must wait `outage` too.
    last_contact: AtomicU64,
    inner: Mutex<Inner>,
}

fn now_secs() -> u64 {
    crate::manager::now_secs()
}

impl Glass {
    /// The state for an agent whose `data_dir` is `data_dir`; the record there is read and
    /// verified (a record that does not verify keeps the glass shut until it is dealt with).
    pub fn new(cfg: BreakGlassConfig, data_dir: &Path) -> Self {
        let dir = data_dir.join("break_glass");
        let path = dir.join("record.jsonl");
        let tip = match read_record(&path) {
            Ok(lines) => rec::verify(&lines, Tip::default(), None)
                .map(|(_, t)| t)
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if let Err(e) = &tip {
            tracing::error!(error = %e, "the break-glass record does not verify: it may have been tampered with");
        }
        Glass {
            cfg,
            dir,
            last_contact: AtomicU64::new(now_secs()),
            inner: Mutex::new(Inner {
                open: None,
                signer: None,
                delivered: BTreeSet::new(),
                tip,
                len,
                delivered_total: 0,
            }),
        }
    }

    pub fn record_path(&self) -> PathBuf {
        self.dir.join("record.jsonl")
    }

    fn reported_path(&self) -> PathBuf {
        self.dir.join("reported")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A server answered now.
    pub fn contact(&self) {
        self.last_contact.store(now_secs(), Ordering::Relaxed);
    }

    pub fn last_contact(&self) -> u64 {
        self.last_contact.load(Ordering::Relaxed)
    }

    /// The opening in force at `now`, if any.
    pub fn open_at(&self, now: u64) -> Option<Opening> {
        self.lock().open.clone().filter(|o| now < o.closes_at)
    }

    /// Whether the glass opened and its time has passed (the caller closes it).
    pub fn expired_at(&self, now: u64) -> bool {
        self.lock()
            .open
            .as_ref()
            .is_some_and(|o| now >= o.closes_at)
    }

    pub fn delivered_total(&self) -> u64 {
        self.lock().delivered_total
    }

    /// The checks before breaking that do not need the manager: configuration, record, reason,
    /// duration, outage, not already open.
    pub fn precheck(&self, reason: &str, duration: Duration) -> Result<(), BreakGlassError> {
        let reason = reason.trim();
        if reason.is_empty() || reason.chars().count() > rec::MAX_REASON {
            return Err(BreakGlassError::Reason);
        }
        if duration.is_zero() || duration > self.cfg.max_duration {
            return Err(BreakGlassError::Duration {
                max: self.cfg.max_duration.as_secs(),
            });
        }
        let inner = self.lock();
        if let Err(e) = &inner.tip {
            return Err(BreakGlassError::Tampered {
                path: self.record_path().display().to_string(),
                source: RecordError::Malformed {
                    line: 0,
                    msg: e.clone(),
                },
            });
        }
        let now = now_secs();
        if let Some(o) = inner.open.as_ref().filter(|o| now < o.closes_at) {
            return Err(BreakGlassError::AlreadyOpen {
                closes_at: o.closes_at,
            });
        }
        let ago = now.saturating_sub(self.last_contact());
        if ago < self.cfg.outage.as_secs() {
            return Err(BreakGlassError::ServerAnswered {
                ago,
                outage: self.cfg.outage.as_secs(),
            });
        }
        Ok(())
    }

    /// Opens the glass (after [`Glass::precheck`] and the manager's checks) and records it.
    pub fn open(
        &self,
        signer: &Signer<'_>,
        reason: &str,
        duration: Duration,
        token: Option<String>,
    ) -> Result<Opening, BreakGlassError> {
        self.precheck(reason, duration)?;
        let now = now_secs();
        let opening = Opening {
            reason: reason.trim().to_string(),
            opened_at: now,
            closes_at: now.saturating_add(duration.as_secs()),
        };
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        self.append(
            signer,
            Event::Open {
                reason: opening.reason.clone(),
                duration_secs: duration.as_secs(),
                closes_at: opening.closes_at,
                token,
                signer_chain: signer.chain.iter().map(|c| b64.encode(c)).collect(),
            },
        )?;
        let mut inner = self.lock();
        inner.open = Some(opening.clone());
        inner.signer = Some(OwnedSigner {
            agent: signer.agent.clone(),
            key_pkcs8: zeroize::Zeroizing::new(signer.key_pkcs8.to_vec()),
            chain: signer.chain.to_vec(),
        });
        inner.delivered.clear();
        tracing::warn!(
            reason = %opening.reason,
            closes_at = opening.closes_at,
            "BREAK-GLASS: the glass is broken; reserve SVIDs are served to workloads whose SVIDs expire"
        );
        Ok(opening)
    }

    /// Records a delivery, once per serial and workload selector set in an opening, signed by
    /// the opening's key; returns whether it was new.
    pub fn deliver(&self, event: Event) -> Result<bool, BreakGlassError> {
        let Event::Deliver {
            serial, selectors, ..
        } = &event
        else {
            return Ok(false);
        };
        let key = (serial.clone(), selectors.clone());
        let signer = {
            let inner = self.lock();
            if inner.delivered.contains(&key) {
                return Ok(false);
            }
            inner.signer.as_ref().map(|s| OwnedSigner {
                agent: s.agent.clone(),
                key_pkcs8: s.key_pkcs8.clone(),
                chain: s.chain.clone(),
            })
        };
        let signer = signer.ok_or(BreakGlassError::NotAttested)?;
        self.append(&signer.borrow(), event)?;
        let mut inner = self.lock();
        inner.delivered.insert(key);
        inner.delivered_total += 1;
        Ok(true)
    }

    /// Closes the glass, if open, and records why (signed by the opening's key).
    pub fn close(&self, cause: &str) -> Result<bool, BreakGlassError> {
        let signer = {
            let mut inner = self.lock();
            if inner.open.is_none() {
                return Ok(false);
            }
            inner.signer.take()
        };
        let r = match &signer {
            Some(s) => self.append(
                &s.borrow(),
                Event::Close {
                    cause: cause.to_string(),
                },
            ),
            None => Err(BreakGlassError::NotAttested),
        };
        // Closed even when the record cannot take the line: serving stops either way.
        let mut inner = self.lock();
        inner.open = None;
        inner.delivered.clear();
        drop(inner);
        tracing::warn!(cause, "BREAK-GLASS: the glass is closed");
        r.map(|_| true)
    }

    /// Appends one signed line, after checking that the record on disk still has the length
    /// this agent left it with (a line removed or added since is tampering; an edit that keeps
    /// the length is caught by the full check at start and by the server). The check costs
    /// the same however long the record is.
    fn append(&self, signer: &Signer<'_>, event: Event) -> Result<(), BreakGlassError> {
        let path = self.record_path();
        let io = |source| BreakGlassError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut inner = self.lock();
        let tip = inner.tip.clone().map_err(|e| BreakGlassError::Tampered {
            path: path.display().to_string(),
            source: RecordError::Malformed { line: 0, msg: e },
        })?;
        let on_disk = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io(e)),
        };
        if on_disk != inner.len {
            let source = RecordError::Malformed {
                line: 0,
                msg: format!(
                    "the record on disk is {on_disk} bytes long, not the {} the agent left",
                    inner.len
                ),
            };
            inner.tip = Err(source.to_string());
            return Err(BreakGlassError::Tampered {
                path: path.display().to_string(),
                source,
            });
        }
        use base64::Engine;
        let spki = crate::keys::spki(signer.key_pkcs8)?;
        let body = Body {
            seq: tip.next_seq,
            prev: tip.prev.clone(),
            time: now_secs(),
            agent: signer.agent.clone(),
            key: base64::engine::general_purpose::STANDARD.encode(&spki),
            event,
        };
        let mut sign_err = None;
        let line = rec::seal(&body, |m| match crate::keys::sign(signer.key_pkcs8, m) {
            Ok(s) => s,
            Err(e) => {
                sign_err = Some(e);
                vec![]
            }
        })
        .map_err(|source| BreakGlassError::Tampered {
            path: path.display().to_string(),
            source,
        })?;
        if let Some(e) = sign_err {
            return Err(e.into());
        }
        let (_, next) = rec::verify(std::slice::from_ref(&line), tip, None).map_err(|source| {
            BreakGlassError::Tampered {
                path: path.display().to_string(),
                source,
            }
        })?;
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        let text = format!("{line}\n");
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        inner.tip = Ok(next);
        inner.len += text.len() as u64;
        Ok(())
    }

    /// The lines not yet acknowledged by a server (sequence numbers after the stored mark);
    /// the file is read only when there are some.
    pub fn unreported(&self) -> Result<Vec<String>, BreakGlassError> {
        let written = self.lock().tip.as_ref().map(|t| t.next_seq - 1).ok();
        if written.is_some_and(|w| w <= self.reported()) {
            return Ok(vec![]);
        }
        let path = self.record_path();
        let lines = read_record(&path).map_err(|source| BreakGlassError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let done = self.reported();
        Ok(lines.into_iter().skip(done as usize).collect())
    }

    /// How many lines a server has acknowledged.
    pub fn reported(&self) -> u64 {
        std::fs::read_to_string(self.reported_path())
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Stores how many lines a server acknowledged; more than the record holds is the
    /// server holding another record under this agent's ID (refused: nothing is marked).
    pub fn set_reported(&self, n: u64) -> Result<(), BreakGlassError> {
        let written = self
            .lock()
            .tip
            .as_ref()
            .map(|t| t.next_seq - 1)
            .unwrap_or(0);
        if n > written {
            return Err(BreakGlassError::Io {
                path: self.reported_path().display().to_string(),
                source: std::io::Error::other(format!(
                    "the server acknowledged {n} lines, but the record holds {written}: it holds another record for this agent"
                )),
            });
        }
        let path = self.reported_path();
        crate::storage::write_atomic(&path, format!("{n}\n").as_bytes(), 0o600).map_err(|e| {
            BreakGlassError::Io {
                path: path.display().to_string(),
                source: std::io::Error::other(e.to_string()),
            }
        })
    }

    /// Whether the record verifies (the error when it does not).
    pub fn record_state(&self) -> Result<u64, String> {
        self.lock().tip.clone().map(|t| t.next_seq - 1)
    }
}

/// The record's lines (empty when there is none yet).
fn read_record(path: &Path) -> std::io::Result<Vec<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s.lines().map(str::to_string).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliver(serial: &str) -> Event {
        Event::Deliver {
            entry_id: "e".into(),
            spiffe_id: "spiffe://example.org/w".into(),
            serial: serial.into(),
            not_before: 1,
            not_after: 2,
            selectors: vec![],
        }
    }

    /// Opening, deliveries (once per serial) and closing are appended and verify; the glass
    /// refuses to open before the outage time; a line appended behind the agent's back stops
    /// the next append, and a restarted agent finds the record broken.
    #[test]
    fn break_glass_record_appends_and_detects_changes_between_appends() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = BreakGlassConfig {
            outage: Duration::from_secs(1),
            ..Default::default()
        };
        let g = Glass::new(cfg.clone(), dir.path());
        let key = crate::keys::generate().unwrap();
        let signer = Signer {
            agent: "spiffe://example.org/spire/agent/x".into(),
            key_pkcs8: &key,
            chain: &[],
        };
        assert!(matches!(
            g.open(&signer, "INC", Duration::from_secs(60), None),
            Err(BreakGlassError::ServerAnswered { .. })
        ));
        g.last_contact.store(0, Ordering::Relaxed);
        g.open(&signer, "INC", Duration::from_secs(60), None)
            .unwrap();
        assert!(g.deliver(deliver("01")).unwrap());
        assert!(!g.deliver(deliver("01")).unwrap(), "once per serial");
        assert!(g.close("servers answered").unwrap());
        assert_eq!(g.record_state(), Ok(3));
        let lines = read_record(&g.record_path()).unwrap();
        assert_eq!(
            rec::verify(&lines, Tip::default(), None).unwrap().0.len(),
            3
        );
        assert_eq!(g.unreported().unwrap().len(), 3);
        g.set_reported(3).unwrap();
        assert!(g.unreported().unwrap().is_empty());

        // A line added behind the agent's back.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(g.record_path())
            .unwrap();
        f.write_all(b"{\"body\":\"{}\",\"sig\":\"\"}\n").unwrap();
        g.open(&signer, "INC-2", Duration::from_secs(60), None)
            .unwrap_err();
        assert!(g.record_state().is_err());
        let again = Glass::new(cfg, dir.path());
        assert!(again.record_state().is_err());
        assert!(matches!(
            again.precheck("INC-3", Duration::from_secs(60)),
            Err(BreakGlassError::Tampered { .. })
        ));
    }
}
