//! rustls verifiers that authenticate peers by X509-SVID against a live trust bundle: a server
//! verifier that also pins the expected server SPIFFE ID, and a client verifier that accepts an
//! optional client SVID of the trust domain. Bundles come from a caller-supplied function, so
//! rotations apply to the next handshake. Pure verification: no I/O.

use crate::SpiffeId;
use crate::x509svid::{ParsedCert, verify_chain};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use std::fmt;
use std::sync::Arc;

/// Returns the current X.509 authorities (DER) of the trust domain.
pub type RootsFn = Arc<dyn Fn() -> Vec<Vec<u8>> + Send + Sync>;

fn verify(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    roots: &RootsFn,
) -> Result<SpiffeId, Error> {
    let mut chain = vec![end_entity.as_ref().to_vec()];
    chain.extend(intermediates.iter().map(|c| c.as_ref().to_vec()));
    verify_chain(&chain, &roots(), now.as_secs())
        .map(|v| v.id)
        .map_err(|e| Error::General(format!("peer X509-SVID rejected: {e}")))
}

fn tls12(
    p: &CryptoProvider,
    m: &[u8],
    c: &CertificateDer<'_>,
    d: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, Error> {
    verify_tls12_signature(m, c, d, &p.signature_verification_algorithms)
}

fn tls13(
    p: &CryptoProvider,
    m: &[u8],
    c: &CertificateDer<'_>,
    d: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, Error> {
    verify_tls13_signature(m, c, d, &p.signature_verification_algorithms)
}

fn schemes(p: &CryptoProvider) -> Vec<SignatureScheme> {
    p.signature_verification_algorithms.supported_schemes()
}

/// Verifies a server's X509-SVID and that it carries `expected_id`.
pub struct SpiffeServerVerifier {
    roots: RootsFn,
    expected_id: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl SpiffeServerVerifier {
    pub fn new(roots: RootsFn, expected_id: SpiffeId, provider: Arc<CryptoProvider>) -> Self {
        SpiffeServerVerifier {
            roots,
            expected_id,
            provider,
        }
    }
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeServerVerifier({})", self.expected_id)
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let id = verify(end_entity, intermediates, now, &self.roots)?;
        if id != self.expected_id {
            return Err(Error::General(format!(
                "server presented {id}, expected {}",
                self.expected_id
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls12(&self.provider, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls13(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes(&self.provider)
    }
}

/// Accepts connections without a client certificate; a presented certificate must be a valid
/// X509-SVID of the trust domain (who may call what is decided per RPC).
pub struct SpiffeClientVerifier {
    roots: RootsFn,
    provider: Arc<CryptoProvider>,
}

impl SpiffeClientVerifier {
    pub fn new(roots: RootsFn, provider: Arc<CryptoProvider>) -> Self {
        SpiffeClientVerifier { roots, provider }
    }
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SpiffeClientVerifier")
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        verify(end_entity, intermediates, now, &self.roots)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls12(&self.provider, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls13(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes(&self.provider)
    }
}

/// The SPIFFE ID of a peer's leaf certificate (after the handshake verified the chain).
pub fn peer_id(leaf_der: &[u8]) -> Result<SpiffeId, crate::Error> {
    crate::x509svid::check_leaf(&ParsedCert::parse(leaf_der)?)
}
