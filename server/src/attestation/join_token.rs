//! `join_token` node attestation: the payload is a token an admin created; it is single use,
//! expires after its TTL, and yields the agent ID `spiffe://<td>/spire/agent/join_token/<token>`
//! with no selectors (as SPIRE). The token is consumed atomically, so two agents can never both
//! attest with it. Tokens are never logged.

use super::{AttestError, Attested};
use crate::datastore::DataStore;
use kame_api::TrustDomain;
use kame_api::spiffe_id::validate_path_segment;

pub const TYPE: &str = "join_token";

/// Validates the token's shape without consuming it.
pub fn agent_id(td: &TrustDomain, payload: &[u8]) -> Result<kame_api::SpiffeId, AttestError> {
    let token = std::str::from_utf8(payload)
        .map_err(|_| AttestError::BadInput("join token is not UTF-8".into()))?;
    if token.is_empty() {
        return Err(AttestError::BadInput("join token is empty".into()));
    }
    validate_path_segment(token)
        .map_err(|e| AttestError::BadInput(format!("join token is malformed: {e}")))?;
    td.id_from_segments(&["spire", "agent", TYPE, token])
        .map_err(|e| AttestError::BadInput(format!("join token is malformed: {e}")))
}

/// Consumes the token and returns the attestation result.
pub async fn attest(
    ds: &dyn DataStore,
    td: &TrustDomain,
    payload: &[u8],
    now: i64,
) -> Result<Attested, AttestError> {
    let agent_id = agent_id(td, payload)?;
    let token = std::str::from_utf8(payload).unwrap_or_default();
    let expires_at = ds
        .take_join_token(token)
        .await
        .map_err(|e| AttestError::Unavailable(format!("datastore: {e}")))?
        .ok_or_else(|| {
            AttestError::Denied("join token does not exist or has already been used".into())
        })?;
    if expires_at < now {
        return Err(AttestError::Denied("join token expired".into()));
    }
    Ok(Attested {
        agent_id,
        selectors: vec![],
        can_reattest: false,
        tpm_boot: None,
    })
}
