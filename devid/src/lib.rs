//! Device identities (IEEE 802.1AR, TCG "TPM 2.0 Keys for Device Identity and Attestation").
//! So far: generic X.509 chain validation for TPM and device certificates (EK, IDevID, LDevID),
//! which are not SPIFFE SVIDs. It must not talk to the server or the agent.

pub mod chain;
