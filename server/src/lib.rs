//! kame-server: the signing authority of a SPIFFE trust domain, in the shape of SPIRE's server.
//! Modules: [`config`] (HCL), [`datastore`] (sqlx), [`ca`] (slots, rotation, journal, minting),
//! [`service`] (SPIRE-compatible gRPC APIs and their authorization), [`attestation`] (node
//! attestors), [`keymanager`] (KeyManager plugins' configuration), [`catalog`] (plugins by
//! name), [`federation`] (bundle endpoint and federated bundles), [`run`] (wiring and
//! listeners) and [`cli`]. It must not link libtss2: TPM
//! evidence is verified with the pure-Rust half of the tpm crate.

pub mod attestation;
pub mod ca;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod datastore;
pub mod entrycache;
pub mod federation;
pub mod keymanager;
pub mod metrics;
pub mod ratelimit;
pub mod run;
pub mod service;
pub mod tls;
pub mod transparency;
pub mod upstream;
