//! `x509pop` node attestation, the agent half, wire-compatible with SPIRE's server
//! (`pkg/agent/plugin/nodeattestor/x509pop`): sends the certificate at `certificate_path`
//! (with any at `intermediates_path`) and answers the server's nonce with its own and a
//! signature of SHA-256(both) by the key at `private_key_path`: RSA-PSS with SHA-256 and the
//! longest salt, as Go signs, or ECDSA P-256. The files are read when the configuration loads
//! (a key that is not the certificate's is refused there) and again at every attestation, so
//! a renewed certificate is picked up. Not offered: `spiffe_endpoint_socket` (the chain from
//! another agent's Workload API) and P-384 keys (no SHA-256 digest signing for them here).

use crate::attestation::{AgentAttestor, AttestError, Responder};
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair, RSA_PSS_SHA256, RsaKeyPair,
    RsaPssSaltLength, RsaSignatureEncoding,
};
use kame_api::conf::{ConfigError, Section, invalid};
use kame_api::x509pop::{
    AttestationData, Challenge, EcdsaResponse, NONCE_LEN, Response, RsaResponse,
};
use std::path::PathBuf;
use std::sync::Arc;

pub const TYPE: &str = "x509pop";

/// RSA-PSS with SHA-256 and the longest salt: what Go's `rsa.SignPSS` makes with no options.
static PSS_MAX_SALT: RsaSignatureEncoding =
    RSA_PSS_SHA256.with_pss_salt_length(RsaPssSaltLength::Max);

/// Why x509pop could not take part, one variant per failed step.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum X509PopAgentError {
    #[error("unable to load certificates from {path}: {msg}")]
    Certificates { path: String, msg: String },
    #[error("unable to load the private key from {path}: {msg}")]
    Key { path: String, msg: String },
    #[error("the private key at {0} is not the key of the certificate")]
    KeyMismatch(String),
    #[error("unable to unmarshal challenge: {0}")]
    Challenge(#[source] kame_api::Error),
    #[error("loading the certificate and key failed: {0}")]
    Load(#[source] tokio::task::JoinError),
    #[error("failed to calculate challenge response: {0}")]
    Response(String),
}

fn plugin_error(e: X509PopAgentError) -> AttestError {
    AttestError::Plugin {
        name: TYPE,
        source: Box::new(e),
    }
}

/// The agent's `NodeAttestor "x509pop"` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509PopConfig {
    pub certificate_path: PathBuf,
    pub private_key_path: PathBuf,
    pub intermediates_path: Option<PathBuf>,
}

enum SigningKey {
    Rsa(RsaKeyPair),
    EcP256(EcdsaKeyPair),
}

/// What one attestation uses: the chain sent and the key that answers.
struct Loaded {
    chain: Vec<Vec<u8>>,
    key: SigningKey,
}

fn pem_certificates(path: &std::path::Path) -> Result<Vec<Vec<u8>>, X509PopAgentError> {
    let err = |msg: String| X509PopAgentError::Certificates {
        path: path.display().to_string(),
        msg,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let certs = kame_api::bundle::certs_from_pem(&text).map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no certificates found".into()));
    }
    for c in &certs {
        kame_api::x509svid::ParsedCert::parse(c).map_err(|e| err(e.to_string()))?;
    }
    Ok(certs)
}

/// A PKCS#8, PKCS#1 (RSA) or SEC1 (EC) private key in PEM, as Go's `tls.LoadX509KeyPair`
/// takes them.
fn pem_key(path: &std::path::Path) -> Result<SigningKey, X509PopAgentError> {
    let err = |msg: &str| X509PopAgentError::Key {
        path: path.display().to_string(),
        msg: msg.to_string(),
    };
    let text = std::fs::read(path).map_err(|e| err(&e.to_string()))?;
    // The first PEM block whose label names a private key.
    let text = String::from_utf8(text).map_err(|_| err("not PEM text"))?;
    let begin = text
        .find("-----BEGIN ")
        .ok_or_else(|| err("no PEM private key"))?;
    let (label, der) =
        der::pem::decode_vec(&text.as_bytes()[begin..]).map_err(|e| err(&e.to_string()))?;
    let der: zeroize::Zeroizing<Vec<u8>> = zeroize::Zeroizing::new(der);
    let unsupported = || err("not an RSA or ECDSA P-256 private key");
    match label {
        "PRIVATE KEY" => RsaKeyPair::from_pkcs8(&der)
            .map(SigningKey::Rsa)
            .or_else(|_| {
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der)
                    .map(SigningKey::EcP256)
            })
            .map_err(|_| unsupported()),
        "RSA PRIVATE KEY" => RsaKeyPair::from_der(&der)
            .map(SigningKey::Rsa)
            .map_err(|_| unsupported()),
        "EC PRIVATE KEY" => {
            EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_FIXED_SIGNING, &der)
                .map(SigningKey::EcP256)
                .map_err(|_| unsupported())
        }
        other => Err(err(&format!("a PEM {other:?} block is not a private key"))),
    }
}

fn public_spki(key: &SigningKey) -> Option<Vec<u8>> {
    use aws_lc_rs::encoding::AsDer;
    match key {
        SigningKey::Rsa(k) => k.public_key().as_der().ok().map(|d| d.as_ref().to_vec()),
        SigningKey::EcP256(k) => k.public_key().as_der().ok().map(|d| d.as_ref().to_vec()),
    }
}

impl X509PopConfig {
    /// Reads the certificates and the key, and checks the key is the leaf's.
    fn load(&self) -> Result<Loaded, X509PopAgentError> {
        let mut chain = pem_certificates(&self.certificate_path)?;
        if let Some(p) = &self.intermediates_path {
            chain.extend(pem_certificates(p)?);
        }
        let key = pem_key(&self.private_key_path)?;
        let mismatch =
            || X509PopAgentError::KeyMismatch(self.private_key_path.display().to_string());
        let leaf_key = kame_api::x509svid::ParsedCert::parse(&chain[0])
            .and_then(|c| c.spki_der())
            .and_then(|s| kame_api::keys::KeyInfo::from_spki_der(&s))
            .map_err(|_| mismatch())?;
        let own = public_spki(&key)
            .and_then(|s| kame_api::keys::KeyInfo::from_spki_der(&s).ok())
            .ok_or_else(mismatch)?;
        if own != leaf_key {
            return Err(mismatch());
        }
        Ok(Loaded { chain, key })
    }
}

/// Builds the agent's `NodeAttestor "x509pop"` from its `plugin_data` (SPIRE's keys), loading
/// the files to check them.
pub fn plugin(data: Section) -> Result<Arc<dyn AgentAttestor>, ConfigError> {
    let path = |k: &str| -> Result<Option<PathBuf>, ConfigError> {
        Ok(data
            .string(k)?
            .filter(|v| !v.trim().is_empty())
            .map(PathBuf::from))
    };
    if path("spiffe_endpoint_socket")?.is_some() {
        return Err(invalid(
            &data.key("spiffe_endpoint_socket"),
            "not supported: give certificate_path and private_key_path",
        ));
    }
    let private_key_path = path("private_key_path")?.ok_or_else(|| {
        invalid(
            &data.key("private_key_path"),
            "private_key_path is required",
        )
    })?;
    let certificate_path = path("certificate_path")?.ok_or_else(|| {
        invalid(
            &data.key("certificate_path"),
            "certificate_path is required",
        )
    })?;
    let intermediates_path = path("intermediates_path")?;
    let keys = [
        data.key("certificate_path"),
        data.key("intermediates_path"),
        data.key("private_key_path"),
    ];
    data.finish()?;
    let cfg = X509PopConfig {
        certificate_path,
        private_key_path,
        intermediates_path,
    };
    cfg.load().map_err(|e| {
        let key = match &e {
            X509PopAgentError::Certificates { path, .. }
                if Some(std::path::Path::new(path)) == cfg.intermediates_path.as_deref() =>
            {
                &keys[1]
            }
            X509PopAgentError::Certificates { .. } => &keys[0],
            _ => &keys[2],
        };
        invalid(key, e.to_string())
    })?;
    Ok(Arc::new(cfg))
}

/// Answers the server's one challenge with the loaded key.
struct KeyResponder {
    key: SigningKey,
}

impl KeyResponder {
    fn answer(&self, challenge: &[u8]) -> Result<Vec<u8>, X509PopAgentError> {
        let c = Challenge::decode(challenge).map_err(X509PopAgentError::Challenge)?;
        let failed = |m: &str| X509PopAgentError::Response(m.to_string());
        let mut nonce = vec![0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce)
            .map_err(|_| failed("the random number generator failed"))?;
        let digest_of = |server_nonce: &[u8]| {
            let combined = kame_api::x509pop::combined_nonce(server_nonce, &nonce)
                .map_err(|e| failed(&e.to_string()))?;
            aws_lc_rs::digest::Digest::import_less_safe(&combined, &aws_lc_rs::digest::SHA256)
                .map_err(|_| failed("digest"))
        };
        let response = match &self.key {
            SigningKey::Rsa(k) => {
                let server_nonce = c
                    .rsa_nonce
                    .ok_or_else(|| failed("expecting RSA challenge"))?;
                let d = digest_of(&server_nonce)?;
                let mut signature = vec![0u8; k.public_modulus_len()];
                k.sign_digest(&PSS_MAX_SALT, &d, &mut signature)
                    .map_err(|_| failed("RSA signing failed"))?;
                Response {
                    rsa: Some(RsaResponse { nonce, signature }),
                    ecdsa: None,
                }
            }
            SigningKey::EcP256(k) => {
                let server_nonce = c
                    .ecdsa_nonce
                    .ok_or_else(|| failed("expecting ECDSA challenge"))?;
                let d = digest_of(&server_nonce)?;
                let sig = k
                    .sign_digest(&d)
                    .map_err(|_| failed("ECDSA signing failed"))?;
                let (r, s) = sig.as_ref().split_at(32);
                // Go's big.Int.Bytes: big-endian without leading zeros.
                let minimal = |v: &[u8]| {
                    let lead = v.iter().position(|b| *b != 0).unwrap_or(v.len());
                    v[lead..].to_vec()
                };
                Response {
                    rsa: None,
                    ecdsa: Some(EcdsaResponse {
                        nonce,
                        r: minimal(r),
                        s: minimal(s),
                    }),
                }
            }
        };
        Ok(response.encode())
    }
}

#[async_trait::async_trait]
impl Responder for KeyResponder {
    async fn respond(&mut self, challenge: Vec<u8>) -> Result<Vec<u8>, AttestError> {
        self.answer(&challenge).map_err(plugin_error)
    }
}

#[async_trait::async_trait]
impl AgentAttestor for X509PopConfig {
    fn name(&self) -> &'static str {
        TYPE
    }

    async fn start(&self) -> Result<(Vec<u8>, Box<dyn Responder>), AttestError> {
        let cfg = self.clone();
        let loaded = tokio::task::spawn_blocking(move || cfg.load())
            .await
            .map_err(|e| plugin_error(X509PopAgentError::Load(e)))?
            .map_err(plugin_error)?;
        let payload = AttestationData {
            certificates: loaded.chain,
        }
        .encode();
        Ok((payload, Box::new(KeyResponder { key: loaded.key })))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
