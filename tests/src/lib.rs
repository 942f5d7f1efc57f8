//! Kame's black-box and interoperability tests. The library holds only a gRPC client generated
//! from SPIRE's own protos (`spire_sdk`), so tests can prove wire compatibility with clients
//! built from spire-api-sdk, and the same protos as a descriptor set ([`SPIRE_SDK_FDS`]) for
//! clients in other languages. Nothing may depend on this crate.

/// SPIRE's protos (entry, bundle, agent, svid and their imports) as an encoded
/// `FileDescriptorSet`.
pub const SPIRE_SDK_FDS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/spire_sdk.fds"));

#[allow(clippy::all, missing_docs)]
pub mod spire_sdk {
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
                pub mod agent {
                    pub mod v1 {
                        tonic::include_proto!("spire.api.server.agent.v1");
                    }
                }
                pub mod svid {
                    pub mod v1 {
                        tonic::include_proto!("spire.api.server.svid.v1");
                    }
                }
            }
        }
    }
}
