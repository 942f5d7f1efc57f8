//! Kame's wire contracts, shared by server and agent: our own `.proto` files compiled with
//! tonic/prost ([`pb`]), the SPIFFE ID type ([`spiffe_id`]), public keys ([`keys`]), the
//! X509-SVID and JWT-SVID profile rules used by issuers and validators alike ([`x509svid`],
//! [`jwtsvid`]), CSRs ([`csr`]) and the bundle codec ([`bundle`]). This crate does no I/O.

pub mod breakglass;
pub mod bundle;
#[cfg(feature = "client")]
pub mod channel;
pub mod codec;
pub mod conf;
pub mod csr;
pub mod ct;
pub mod errors;
mod gojson;
pub mod jwtsvid;
pub mod keys;
pub mod secret;
#[cfg(feature = "serving")]
pub mod serving;
pub mod spiffe_id;
pub mod spire_cli;
pub mod timefmt;
pub mod tls;
pub mod tpm_devid;
pub mod x509pop;
pub mod x509svid;

pub use secret::Secret;
pub use spiffe_id::{IdError, SpiffeId, TrustDomain};

/// Generated protobuf and gRPC code, in modules that mirror the proto packages, with short
/// aliases (`pb::types`, `pb::entry`, ...).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    pub mod spire {
        pub mod api {
            pub mod types {
                tonic::include_proto!("spire.api.types");
            }
            pub mod server {
                pub mod entry {
                    pub mod v1 {
                        tonic::include_proto!("spire.api.server.entry.v1");
                    }
                }
                pub mod bundle {
                    pub mod v1 {
                        tonic::include_proto!("spire.api.server.bundle.v1");
                    }
                }
                pub mod svid {
                    pub mod v1 {
                        tonic::include_proto!("spire.api.server.svid.v1");
                    }
                }
                pub mod agent {
                    pub mod v1 {
                        tonic::include_proto!("spire.api.server.agent.v1");
                    }
                }
                pub mod localauthority {
                    pub mod v1 {
                        tonic::include_proto!("spire.api.server.localauthority.v1");
                    }
                }
                pub mod trustdomain {
                    pub mod v1 {
                        tonic::include_proto!("spire.api.server.trustdomain.v1");
                    }
                }
                pub mod logger {
                    pub mod v1 {
                        tonic::include_proto!("spire.api.server.logger.v1");
                    }
                }
            }
        }
    }
    /// Kame's TCG device enrollment (`kame.devid.v1`).
    pub mod devid {
        tonic::include_proto!("kame.devid.v1");
    }
    /// Kame's break-glass (`kame.breakglass.v1`): reserve SVIDs, the record, the agent's
    /// admin socket.
    pub mod kame {
        pub mod breakglass {
            pub mod v1 {
                tonic::include_proto!("kame.breakglass.v1");
            }
        }
    }
    pub use kame::breakglass::v1 as breakglass;
    /// The SPIFFE Workload API (no proto package).
    pub mod workload {
        tonic::include_proto!("_");
    }
    pub use spire::api::server::agent::v1 as agent;
    pub use spire::api::server::bundle::v1 as bundle;
    pub use spire::api::server::entry::v1 as entry;
    pub use spire::api::server::localauthority::v1 as localauthority;
    pub use spire::api::server::logger::v1 as logger;
    pub use spire::api::server::svid::v1 as svid;
    pub use spire::api::server::trustdomain::v1 as trustdomain;
    pub use spire::api::types;
}

/// Errors of the wire-contract checks, one variant per kind of failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid SPIFFE ID: {0}")]
    Id(#[from] IdError),
    #[error("bad public key: {0}")]
    BadPublicKey(String),
    #[error("bad distinguished name {0}")]
    BadName(String),
    #[error("encoding failed: {0}")]
    Encode(String),
    #[error("notAfter must be later than notBefore")]
    BadValidity,
    #[error("bad certificate: {0}")]
    BadCertificate(String),
    #[error("not a valid X509-SVID: {0}")]
    BadSvid(String),
    #[error("certificate {0} of the chain is not valid yet")]
    NotYetValid(usize),
    #[error("certificate {0} of the chain has expired")]
    Expired(usize),
    #[error("untrusted chain: {0}")]
    UntrustedChain(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("unsupported signature algorithm {0}")]
    UnsupportedSignatureAlgorithm(String),
    #[error("bad CSR: {0}")]
    BadCsr(String),
    #[error("bad bundle: {0}")]
    BadBundle(String),
    #[error("invalid JWT-SVID: {0}")]
    BadJwt(String),
    #[error("bad attestation message: {0}")]
    BadAttestation(String),
    /// A DER structure that does not decode or encode; `what` says which, as the message.
    #[error("{what}: {source}")]
    Der {
        what: &'static str,
        #[source]
        source: der::Error,
    },
    /// A JSON document that does not parse or serialize.
    #[error("{what}: {source}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// A distinguished name that does not parse.
    #[error("bad distinguished name {name:?}: {source}")]
    NameSyntax {
        name: String,
        #[source]
        source: der::Error,
    },
    /// The CSR's public key fails its check.
    #[error("bad CSR: {0}")]
    CsrKey(#[source] Box<Error>),
    /// The CSR's signature does not verify.
    #[error("bad CSR: CSR signature check failed: {0}")]
    CsrSignature(#[source] Box<Error>),
    /// A bundle key fails its check.
    #[error("bad bundle: {0}")]
    BundleKey(#[source] Box<Error>),
    #[error("{field} holds {got} certificates; at most {max} are accepted")]
    TooManyCertificates {
        field: String,
        got: usize,
        max: usize,
    },
}
