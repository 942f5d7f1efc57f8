//! Device identities (IEEE 802.1AR, TCG "TPM 2.0 Keys for Device Identity and Attestation").
//! So far: generic X.509 chain validation for TPM and device certificates (EK, IDevID, LDevID),
//! which are not SPIFFE SVIDs, and reading the 802.1AR fields attestation uses. It must not talk to the server or the agent.

pub mod chain;
pub mod profile;
