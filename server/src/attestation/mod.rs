//! Server halves of node attestors. Each turns attestation data from an agent into an agent
//! SPIFFE ID and selectors, or a precise refusal. `join_token` is built into the Agent API, as
//! in SPIRE (it consumes a token from the datastore); the others are [`NodeAttestor`] plugins
//! of the [`crate::catalog`]: pure checks over bytes, a first step and, when they challenge, a
//! second one, which the Agent API drives over the AttestAgent stream.

pub mod join_token;
pub mod tpm_devid;
pub mod x509pop;

use crate::datastore::Selector;
use kame_api::SpiffeId;

/// What a successful attestation establishes.
#[derive(Debug, Clone)]
pub struct Attested {
    pub agent_id: SpiffeId,
    pub selectors: Vec<Selector>,
    pub can_reattest: bool,
    /// The TPM's (resetCount, restartCount) from a quote's clockInfo, when one was verified.
    pub tpm_boot: Option<(u32, u32)>,
}

/// Why an attestation was refused; the variant is the gRPC code the agent gets.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// Malformed attestation data (InvalidArgument).
    #[error("{0}")]
    BadInput(String),
    /// A proof that does not hold (PermissionDenied).
    #[error("{0}")]
    Denied(String),
    /// The server is not set up for what the agent asks (FailedPrecondition).
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    Unavailable(String),
    /// A bug of ours (Internal).
    #[error("{0}")]
    Internal(String),
}

/// What a node attestor keeps between its challenge and the agent's response.
pub type Pending = Box<dyn std::any::Any + Send>;

/// The outcome of a node attestor's first step.
pub enum Step {
    /// Attested from the first message alone.
    Done(Attested),
    /// A challenge to send the agent, and what to keep for its response.
    Challenge {
        challenge: Vec<u8>,
        pending: Pending,
    },
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Done(a) => f.debug_tuple("Done").field(a).finish(),
            Step::Challenge { challenge, .. } => f
                .debug_struct("Challenge")
                .field("challenge_bytes", &challenge.len())
                .finish_non_exhaustive(),
        }
    }
}

/// The server half of a node attestor (SPIRE's NodeAttestor plugin type): pure checks of what
/// an unauthenticated agent sends, so they run off the async workers and can be fuzzed. Built
/// from its `plugin_data` by the [`crate::catalog`]; it must bound its work on peer input
/// before anything costly, and must not do I/O.
pub trait NodeAttestor: Send + Sync + std::fmt::Debug {
    /// Checks message 1 (the attestation data's payload) at `now` (unix seconds).
    fn begin(&self, payload: &[u8], now: u64) -> Result<Step, AttestError>;

    /// Checks the agent's response to the challenge `begin` made, with what it kept.
    fn finish(&self, pending: Pending, response: &[u8], now: u64) -> Result<Attested, AttestError>;
}

/// The last value of attribute `oid` in `name` as text (a UTF8String or PrintableString), as
/// Go's `pkix.Name` keeps the last one it meets; None when there is none.
pub(crate) fn name_attribute(
    name: &x509_cert::name::Name,
    oid: der::asn1::ObjectIdentifier,
) -> Option<String> {
    let mut out = None;
    for atv in name.iter().filter(|a| a.oid == oid) {
        let v = atv
            .value
            .decode_as::<der::asn1::Utf8StringRef<'_>>()
            .map(|s| s.to_string())
            .or_else(|_| {
                atv.value
                    .decode_as::<der::asn1::PrintableStringRef<'_>>()
                    .map(|s| s.to_string())
            });
        if let Ok(v) = v {
            out = Some(v);
        }
    }
    out
}

/// Lower-case hex SHA-1 of `b` (certificate fingerprints in agent IDs and selectors).
pub(crate) fn sha1_hex(b: &[u8]) -> String {
    use sha1::Digest;
    hex::encode(sha1::Sha1::digest(b))
}
