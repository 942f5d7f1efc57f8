//! Server halves of node attestors. Each turns attestation data from an agent into an agent
//! SPIFFE ID and selectors, or a precise refusal. `join_token` and `tpm_devid`.

pub mod join_token;
pub mod tpm_devid;

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

#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error("{0}")]
    BadInput(String),
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    Unavailable(String),
}
