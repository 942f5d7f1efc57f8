//! Credential activation challenges waiting for an answer: one per EK, at most
//! `PendingLimits::total` in all and `per_peer` per peer; when full, the peer holding the most
//! gives up its oldest, so no peer can lock others out. An answer is taken once.

use super::*;

/// A credential activation challenge for a device: TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET
/// for TPM2_ActivateCredential with the IAK under the EK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub id: String,
    pub credential_blob: Vec<u8>,
    pub encrypted_secret: Vec<u8>,
}

/// How many credential activation challenges may wait for an answer. Everything before the
/// challenge can be made in software from a public EK certificate, so what unauthenticated
/// peers leave pending is bounded three ways: one challenge per EK (a newer request for the
/// same EK replaces the older), at most `per_peer` for one peer (an IPv4 address or an IPv6
/// /64), and at most `total` in all, where a full table makes room by dropping the oldest
/// challenge of the peer that holds the most: no peer can lock the others out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingLimits {
    pub total: usize,
    pub per_peer: usize,
}
impl Default for PendingLimits {
    fn default() -> Self {
        PendingLimits {
            total: 4096,
            per_peer: 64,
        }
    }
}

pub(super) struct PendingEntry<V> {
    value: V,
    peer: String,
    /// What identifies the requester beyond the peer (the EK): one entry each.
    key: Vec<u8>,
    created: Instant,
    expires: Instant,
}

/// Single-use values by id, each for a while, within [`PendingLimits`].
pub(super) struct PendingTable<V> {
    ttl: Duration,
    limits: PendingLimits,
    pub(super) entries: HashMap<String, PendingEntry<V>>,
}
impl<V> PendingTable<V> {
    pub(super) fn new(ttl: Duration, limits: PendingLimits) -> Self {
        PendingTable {
            ttl,
            limits,
            entries: HashMap::new(),
        }
    }

    /// Drops what expired; refuses when `peer` already holds its share.
    pub(super) fn room(&mut self, peer: &str, now: Instant) -> Result<(), EnrollError> {
        self.entries.retain(|_, e| e.expires > now);
        let mine = self.entries.values().filter(|e| e.peer == peer).count();
        if mine >= self.limits.per_peer {
            return Err(EnrollError::TooManyPending(
                "from this address",
                self.ttl.as_secs(),
            ));
        }
        Ok(())
    }

    pub(super) fn insert(
        &mut self,
        id: String,
        value: V,
        peer: &str,
        key: Vec<u8>,
    ) -> Result<(), EnrollError> {
        let now = Instant::now();
        self.entries.retain(|_, e| e.key != key);
        self.room(peer, now)?;
        if self.entries.len() >= self.limits.total {
            self.evict_from_heaviest_peer();
        }
        self.entries.insert(
            id,
            PendingEntry {
                value,
                peer: peer.to_string(),
                key,
                created: now,
                expires: now + self.ttl,
            },
        );
        Ok(())
    }

    /// Drops the oldest entry of the peer holding the most.
    pub(super) fn evict_from_heaviest_peer(&mut self) {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for e in self.entries.values() {
            *counts.entry(e.peer.as_str()).or_default() += 1;
        }
        let Some(heaviest) = counts
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map(|(p, _)| p.to_string())
        else {
            return;
        };
        let oldest = self
            .entries
            .iter()
            .filter(|(_, e)| e.peer == heaviest)
            .min_by_key(|(_, e)| e.created)
            .map(|(id, _)| id.clone());
        if let Some(id) = oldest {
            self.entries.remove(&id);
        }
    }

    pub(super) fn take(&mut self, id: &str) -> Option<V> {
        self.entries
            .remove(id)
            .filter(|e| e.expires > Instant::now())
            .map(|e| e.value)
    }
}

pub(super) struct Pending {
    secret: Vec<u8>,
    request: VerifiedRequest,
}

/// Outstanding challenges: each answered at most once, within its lifetime. An answer to an
/// unknown, expired, replaced or already used challenge is refused (a replay).
pub struct Challenges {
    table: Mutex<PendingTable<Pending>>,
}
impl std::fmt::Debug for Challenges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Challenges").finish_non_exhaustive()
    }
}

pub(super) fn random(n: usize) -> Result<Vec<u8>, EnrollError> {
    let mut b = vec![0u8; n];
    aws_lc_rs::rand::fill(&mut b)
        .map_err(|_| EnrollError::Crypto("the random number generator"))?;
    Ok(b)
}

/// The peer a request without an address (a local socket, an in-process call) counts as.
pub const LOCAL_PEER: &str = "local";
impl Challenges {
    pub fn new(ttl: Duration) -> Self {
        Self::with_limits(ttl, PendingLimits::default())
    }

    pub fn with_limits(ttl: Duration, limits: PendingLimits) -> Self {
        Challenges {
            table: Mutex::new(PendingTable::new(ttl, limits)),
        }
    }

    pub(super) fn table(&self) -> std::sync::MutexGuard<'_, PendingTable<Pending>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `peer` may have another challenge now (checked again when it is issued): lets
    /// a caller refuse before it verifies a request.
    pub fn has_room(&self, peer: &str) -> Result<(), EnrollError> {
        self.table().room(peer, Instant::now())
    }

    /// A challenge that only the TPM holding both the EK and the IAK can answer, held for
    /// `peer` ([`LOCAL_PEER`] without an address). It replaces any challenge still pending
    /// for the same EK.
    pub fn issue(&self, request: VerifiedRequest, peer: &str) -> Result<Challenge, EnrollError> {
        self.has_room(peer)?;
        let secret = random(32)?;
        let iak_name = request.iak.name().map_err(EnrollError::Credential)?;
        let cred = credential::make_credential(&request.ek, &secret, &iak_name)
            .map_err(EnrollError::Credential)?;
        let ek = request.ek.spki_der().map_err(EnrollError::Credential)?;
        let id = hex_id(&random(16)?);
        self.table()
            .insert(id.clone(), Pending { secret, request }, peer, ek)?;
        Ok(Challenge {
            id,
            credential_blob: cred.credential_blob,
            encrypted_secret: cred.secret,
        })
    }

    /// Takes the answer to challenge `id`: the request it was issued for when `secret` is the
    /// one made for it (compared in constant time). The challenge is spent either way.
    pub fn answer(&self, id: &str, secret: &[u8]) -> Result<VerifiedRequest, EnrollError> {
        let pending = self.table().take(id).ok_or(EnrollError::UnknownChallenge)?;
        use subtle::ConstantTimeEq;
        if pending.secret.ct_eq(secret).into() {
            Ok(pending.request)
        } else {
            Err(EnrollError::WrongAnswer)
        }
    }
}

pub(super) fn hex_id(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
