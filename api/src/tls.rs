//! rustls verifiers that authenticate peers by X509-SVID against a live trust bundle: a server
//! verifier that also pins the expected server SPIFFE ID, and a client verifier that accepts an
//! optional client SVID of the trust domain. Bundles come from a caller-supplied function, so
//! rotations apply to the next handshake. Either can also require the peer's SVID to carry a
//! valid SCT from a trusted issuance transparency log (`requiring_sct`), so that an SVID
//! minted outside the log (a rogue copy of the CA key) is refused. Pure verification: no I/O.

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

/// Returns the public keys (SubjectPublicKeyInfo DER) of the transparency logs whose SCTs a
/// verifier accepts.
pub type LogKeysFn = Arc<dyn Fn() -> Vec<Vec<u8>> + Send + Sync>;

fn verify(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    roots: &RootsFn,
    require_sct: Option<&LogKeysFn>,
) -> Result<SpiffeId, Error> {
    let mut chain = vec![end_entity.as_ref().to_vec()];
    chain.extend(intermediates.iter().map(|c| c.as_ref().to_vec()));
    let roots = roots();
    let verified = verify_chain(&chain, &roots, now.as_secs())
        .map_err(|e| Error::General(format!("peer X509-SVID rejected: {e}")))?;
    if let Some(keys) = require_sct {
        // The leaf's issuer: the first intermediate, or the root the chain ends at.
        let issuer = chain
            .get(1)
            .or_else(|| roots.get(verified.root_index))
            .ok_or_else(|| Error::General("peer X509-SVID rejected: no issuer".into()))?;
        let issuer_spki = ParsedCert::parse(issuer)
            .and_then(|c| c.spki_der())
            .map_err(|e| Error::General(format!("peer X509-SVID rejected: issuer: {e}")))?;
        crate::ct::check_embedded_sct(&chain[0], &issuer_spki, &keys()).map_err(|e| {
            Error::General(format!(
                "peer X509-SVID rejected: no valid SCT from a trusted transparency log: {e}"
            ))
        })?;
    }
    Ok(verified.id)
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
    require_sct: Option<LogKeysFn>,
}

impl SpiffeServerVerifier {
    pub fn new(roots: RootsFn, expected_id: SpiffeId, provider: Arc<CryptoProvider>) -> Self {
        SpiffeServerVerifier {
            roots,
            expected_id,
            provider,
            require_sct: None,
        }
    }

    /// Also requires the server's X509-SVID to carry a valid SCT from one of these logs.
    pub fn requiring_sct(mut self, log_keys: LogKeysFn) -> Self {
        self.require_sct = Some(log_keys);
        self
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
        let id = verify(
            end_entity,
            intermediates,
            now,
            &self.roots,
            self.require_sct.as_ref(),
        )?;
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
    require_sct: Option<LogKeysFn>,
}

impl SpiffeClientVerifier {
    pub fn new(roots: RootsFn, provider: Arc<CryptoProvider>) -> Self {
        SpiffeClientVerifier {
            roots,
            provider,
            require_sct: None,
        }
    }

    /// Also requires a client's X509-SVID to carry a valid SCT from one of these logs.
    pub fn requiring_sct(mut self, log_keys: LogKeysFn) -> Self {
        self.require_sct = Some(log_keys);
        self
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
        verify(
            end_entity,
            intermediates,
            now,
            &self.roots,
            self.require_sct.as_ref(),
        )?;
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

#[cfg(test)]
mod tests {
    //! A verifier that requires SCTs, against SVIDs minted with one, without one (a rogue copy
    //! of the CA key signing outside the log), with one from another log, and with one copied
    //! from another SVID.

    use super::*;
    use crate::TrustDomain;
    use crate::ct::{self, DigitallySigned, Entry, Sct};
    use crate::x509svid::tests::Key;
    use crate::x509svid::{
        CaParams, IssuerInfo, LeafParams, assemble, ca_tbs, leaf_tbs, leaf_tbs_with, parse_name,
        raw_ext_der,
    };

    fn alg(spki: &[u8]) -> x509_cert::spki::AlgorithmIdentifierOwned {
        crate::keys::KeyInfo::from_spki_der(spki)
            .unwrap()
            .x509_signature_algorithm()
    }

    struct Ca {
        key: Key,
        cert: Vec<u8>,
    }

    fn ca(td: &TrustDomain) -> Ca {
        let key = Key::new();
        let spki = key.spki();
        let tbs = ca_tbs(
            &CaParams {
                trust_domain: td,
                subject: &parse_name("C=US, O=SPIFFE").unwrap(),
                spki_der: &spki,
                serial: &[1],
                not_before: 1_000,
                not_after: 4_000_000_000,
            },
            None,
        )
        .unwrap();
        let cert = assemble(&tbs, &alg(&spki), &key.sign(&tbs)).unwrap();
        Ca { key, cert }
    }

    /// An SVID signed by `ca`; with `log`, carrying that log's SCT over its precertificate
    /// entry (or over `sct_for`'s, to copy an SCT from another SVID).
    fn svid(ca: &Ca, path: &str, log: Option<&Key>, sct_for: Option<&[u8]>) -> Vec<u8> {
        let k = Key::new();
        let spki = k.spki();
        let issuer = IssuerInfo::from_cert_der(&ca.cert).unwrap();
        let id = SpiffeId::parse(&format!("spiffe://example.org{path}")).unwrap();
        let params = LeafParams {
            id: &id,
            dns_names: &[],
            spki_der: &spki,
            serial: &[7],
            not_before: 2_000,
            not_after: 3_000_000_000,
        };
        let precert = leaf_tbs(&params, &issuer).unwrap();
        let tbs = match log {
            None => precert,
            Some(log) => {
                let entry = Entry::Precert {
                    issuer_key_hash: ct::key_hash(&ca.key.spki()),
                    tbs: sct_for.map(<[u8]>::to_vec).unwrap_or(precert),
                };
                let timestamp = 1_700_000_000_000;
                let sct = Sct {
                    log_id: ct::log_id(&log.spki()),
                    timestamp,
                    signature: DigitallySigned {
                        hash_alg: ct::HASH_SHA256,
                        sig_alg: ct::SIG_ECDSA,
                        signature: log.sign(&ct::sct_signed_data(timestamp, &entry).unwrap()),
                    },
                };
                let value = ct::sct_list_extension_value(&[sct]).unwrap();
                leaf_tbs_with(
                    &params,
                    &issuer,
                    &[raw_ext_der(ct::SCT_LIST_OID, false, &value).unwrap()],
                )
                .unwrap()
            }
        };
        assemble(&tbs, &alg(&ca.key.spki()), &ca.key.sign(&tbs)).unwrap()
    }

    fn check(v: &SpiffeClientVerifier, cert: &[u8]) -> Result<(), String> {
        v.verify_client_cert(
            &CertificateDer::from(cert.to_vec()),
            &[],
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(1_800_000_000)),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    #[test]
    fn tls_verifier_requiring_scts_refuses_svids_minted_outside_the_log() {
        let td = TrustDomain::parse("example.org").unwrap();
        let ca = ca(&td);
        let (log, other_log) = (Key::new(), Key::new());
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let roots: RootsFn = {
            let c = ca.cert.clone();
            Arc::new(move || vec![c.clone()])
        };
        let keys: LogKeysFn = {
            let k = log.spki();
            Arc::new(move || vec![k.clone()])
        };
        let lax = SpiffeClientVerifier::new(roots.clone(), provider.clone());
        let strict = SpiffeClientVerifier::new(roots, provider).requiring_sct(keys);

        let logged = svid(&ca, "/logged", Some(&log), None);
        check(&strict, &logged).unwrap();
        // The SCT is RFC 6962's: its entry is what a verifier rebuilds from the certificate.
        let issuer_spki = ca.key.spki();
        ct::check_embedded_sct(&logged, &issuer_spki, &[log.spki()]).unwrap();

        let rogue = svid(&ca, "/rogue", None, None);
        check(&lax, &rogue).unwrap();
        let e = check(&strict, &rogue).unwrap_err();
        assert!(
            e.contains("no valid SCT") && e.contains("carries no SCT"),
            "{e}"
        );

        let elsewhere = svid(&ca, "/elsewhere", Some(&other_log), None);
        let e = check(&strict, &elsewhere).unwrap_err();
        assert!(e.contains("not a trusted log"), "{e}");

        // An SCT made for another SVID's entry does not verify over this one's.
        let other_tbs = {
            let cert = svid(&ca, "/other", None, None);
            let (_, content, _) = crate::ct::tlv(&cert).unwrap();
            crate::ct::tlv(content).unwrap().2.to_vec()
        };
        let copied = svid(&ca, "/copied", Some(&log), Some(&other_tbs));
        let e = check(&strict, &copied).unwrap_err();
        assert!(e.contains("does not verify"), "{e}");
    }
}
