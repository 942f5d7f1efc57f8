//! Device identities (IEEE 802.1AR, TCG "TPM 2.0 Keys for Device Identity and Attestation").
//! X.509 chain validation for TPM and device certificates (EK, IDevID, LDevID), which are not
//! SPIFFE SVIDs; the 802.1AR certificate profile (build and check); and the CA's side of TCG
//! enrollment (the TCG-CSR-IDEVID request, its checks, credential activation challenges), and the device's
//! check of what a CA sends back. It must not talk to the server or the agent.

pub mod ca;
pub mod chain;
pub mod enroll;
pub mod issued;
pub mod profile;
pub mod registry;
#[cfg(feature = "cli")]
pub mod service;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
