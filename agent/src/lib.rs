//! kame-agent: proves its node to kame-server (node attestation), keeps the agent's SVID
//! renewed, syncs the registration entries it is authorized for, mints and rotates workload
//! SVIDs, and serves them to local processes through the SPIFFE Workload API, identifying each
//! caller from kernel facts (the unix workload attestor). It must not depend on the server
//! crate: it speaks to the server only over SPIRE's wire protocol.
#![forbid(unsafe_code)]

pub mod admin;
pub mod attestation;
pub mod attestor;
pub mod breakglass;
pub mod catalog;
pub mod cli;
/// Channels to the server (shared with downstream servers: `kame_api::channel`).
pub use kame_api::channel as client;
pub mod config;
pub mod keys;
pub mod manager;
pub mod run;
pub mod sds;
pub mod storage;
pub mod tpm_devid;
pub mod workload;
pub mod x509pop;
