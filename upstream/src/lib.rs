//! The UpstreamAuthority seam (SPIRE's `spire.plugin.server.upstreamauthority.v1`) and its
//! backends: an authority above a trust domain's CA that signs the CA's certificate from a
//! CSR, may take its JWT keys, and tells it the trust bundle it holds for the trust domain.
//! Backends check what they are asked (SPIRE's CSR rules) and what they load; the server's CA
//! checks what comes back. This crate never holds the server CA's private key: the CA sends a
//! CSR it signed through its KeyManager. It keeps no state on disk.

use futures::stream::BoxStream;
use kame_api::pb::types::{JwtKey, X509Certificate};
use std::time::Duration;

#[cfg(feature = "aws_pca")]
pub mod aws_pca;
pub mod disk;
pub mod mint;
pub mod spire;
#[cfg(test)]
mod testutil;
#[cfg(feature = "vault")]
pub mod vault;

/// What `MintX509CAAndSubscribe`'s first message carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintedX509Ca {
    /// DER: first the newly minted CA, then the certificates that issued it, as the upstream
    /// returns them (SVIDs carry this chain after the leaf).
    pub chain: Vec<Vec<u8>>,
    /// DER: the upstream roots this trust domain's bundle must hold.
    pub upstream_roots: Vec<Vec<u8>>,
}

/// The trust bundle of this trust domain as the upstream sees it (`SubscribeToLocalBundle`),
/// with the upstream's taint flags.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalBundle {
    pub x509_roots: Vec<X509Certificate>,
    pub jwt_keys: Vec<JwtKey>,
}

/// Later messages of a subscription; the stream ends when the upstream closes it.
pub type Updates<T> = BoxStream<'static, Result<T, UpstreamError>>;

/// A stream with no later messages.
pub fn no_updates<T: Send + 'static>() -> Updates<T> {
    Box::pin(futures::stream::empty())
}

/// One variant per way an upstream call fails, so the CA knows whether to retry. Messages
/// read after "upstream authority: ".
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// The upstream could not be reached or did not answer in time: retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The upstream refused the request (its policy, our credentials).
    #[error("refused: {0}")]
    Refused(String),
    /// The CSR breaks the upstream's rules (SPIRE's checks).
    #[error("unable to sign CSR: {0}")]
    BadCsr(#[from] mint::CsrError),
    /// The upstream's own CA could not sign (its key, its certificate).
    #[error("cannot sign: {0}")]
    Signing(String),
    /// The upstream answered something that fails our checks.
    #[error("answered badly: {0}")]
    BadAnswer(String),
    /// This backend does not offer the call (SPIRE's `Unimplemented`).
    #[error("not supported by this plugin")]
    Unimplemented,
}

/// An authority above this trust domain's CA.
#[async_trait::async_trait]
pub trait UpstreamAuthority: Send + Sync + std::fmt::Debug {
    /// Signs the CA for `csr` (PKCS#10 DER; `preferred_ttl` zero: the upstream decides) and
    /// streams later root updates (the CA does not consume them yet: `disk` sends none).
    async fn mint_x509_ca(
        &self,
        csr: &[u8],
        preferred_ttl: Duration,
    ) -> Result<(MintedX509Ca, Updates<Vec<Vec<u8>>>), UpstreamError>;

    /// Publishes a JWT key of this trust domain upstream (this server's, or one a downstream
    /// server published here); the upstream's JWT keys. Later changes arrive through
    /// [`UpstreamAuthority::subscribe_to_local_bundle`]. Backends that cannot answer
    /// [`UpstreamError::Unimplemented`] (then the key only goes into the local bundle, as
    /// SPIRE does).
    async fn publish_jwt_key(&self, _key: JwtKey) -> Result<Vec<JwtKey>, UpstreamError> {
        Err(UpstreamError::Unimplemented)
    }

    /// This trust domain's bundle as the upstream holds it, then updates.
    async fn subscribe_to_local_bundle(&self) -> Result<Updates<LocalBundle>, UpstreamError> {
        Err(UpstreamError::Unimplemented)
    }
}
