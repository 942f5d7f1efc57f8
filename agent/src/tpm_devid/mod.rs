//! `tpm_devid` node attestation, the agent half (SPIRE wire format, `tpm_devid.md` §1.2–1.6):
//! reads the DevID certificate chain and key blobs, regenerates the RSA EK (template L-1) and
//! reads its certificate from NV, makes an attestation key (under the EK; SPIRE's `AK_RSA`
//! under the SRK with [`evidence_spire`]), certifies the DevID key with it,
//! and after the server's challenge signs its nonce with the DevID key and recovers the
//! credential with TPM2_ActivateCredential. With `attestation_key_handle` and
//! `attestation_key_cert_path` (Kame servers only) it uses a persistent TCG IAK or LAK
//! instead: it sends the AK's certificate, makes no EK and no AK, and answers the nonce with a
//! signature, certify and quote made with one load of the DevID key. All TPM work runs on the
//! blocking pool through [`kame_tpm::device::SharedDevice`]; an authorization failure is never
//! retried. It keeps no key material: blobs are TPM-wrapped and a made AK lives only for one
//! attestation.

pub mod config;
pub mod sequence;

/// The attestor's name on the wire and in configuration.
pub const TYPE: &str = "tpm_devid";

use kame_api::tpm_devid::{AttestationRequest, ChallengeRequest, ChallengeResponse};
use kame_tpm::device::{AkBlob, AkParent, Device, DeviceError, EkAlg, KeyBlob};
use kame_tpm::wire;
use std::path::Path;
use std::path::PathBuf;

pub use kame_api::Secret;

/// The agent's `NodeAttestor "tpm_devid"` settings (SPIRE's keys; ours: `tcti`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmDevidConfig {
    pub devid_cert_path: PathBuf,
    pub devid_priv_path: PathBuf,
    pub devid_pub_path: PathBuf,
    /// A TCTI string (`device:/dev/tpmrm0`, `swtpm:host=…,port=…`, `tabrmd:`).
    pub tcti: String,
    /// Which EK (ours; SPIRE always uses RSA-2048, template L-1).
    pub ek_algorithm: EkAlg,
    pub devid_password: Secret,
    pub owner_hierarchy_password: Secret,
    pub endorsement_hierarchy_password: Secret,
    /// A persistent, certified attestation key (ours): used instead of an EK and a fresh AK.
    pub attestation_key: Option<CertifiedAk>,
    /// The DevID key persisted at this handle (ours, `devid_handle`; with `attestation_key`
    /// only): no SRK and no load per attestation. `devid_pub_path` must be its public area.
    pub devid_handle: Option<u32>,
}

/// A persistent TCG IAK or LAK and its certificate chain (`attestation_key_handle`,
/// `attestation_key_cert_path`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertifiedAk {
    pub handle: u32,
    /// PEM: the AK certificate first, then any intermediates.
    pub cert_path: PathBuf,
    /// The AK's TPMT_PUBLIC (`attestation_key_pub_path`, optional): checked against the
    /// handle's Name instead of read from the TPM, one TPM command less.
    pub pub_path: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevIdAgentError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate: {msg}")]
    NoCertificate { path: String, msg: String },
    #[error("DevID public blob {path} is not a TPMT_PUBLIC: {msg}")]
    BadPublic { path: String, msg: String },
    #[error("the TPM has no EK certificate for the configured ek_algorithm")]
    NoEkCertificate,
    #[error("TPM: {0}")]
    Tpm(#[from] DeviceError),
    #[error("received empty credential activation challenge from server")]
    EmptyCredential,
    #[error("received empty DevID nonce from server")]
    EmptyNonce,
    #[error("the server's challenge is malformed: {0}")]
    BadChallenge(#[source] kame_api::Error),
    #[error("the server's challenge is malformed: its credential is over 65,535 bytes")]
    CredentialTooLarge,
    #[error("DevID signature: {0}")]
    Signature(#[source] wire::Error),
    #[error("the key at attestation_key_handle {handle:#010x} is not the key of {path}")]
    AkCertMismatch { handle: u32, path: String },
    #[error("the public area at attestation_key_handle {handle:#010x} is not a usable key: {msg}")]
    BadAkPublic { handle: u32, msg: String },
    #[error("the attestation key certificate {path} has no usable key: {msg}")]
    BadAkCert { path: String, msg: String },
    #[error(
        "the server did not ask for Kame's v2 proof: a certified attestation key needs a Kame server with attestation_key_ca_path"
    )]
    CertifiedAkNeedsV2,
    #[error(
        "devid_handle needs attestation_key_handle: a persistent DevID key is certified by a persistent AK"
    )]
    PersistentDevIdNeedsCertifiedAk,
}

fn read(p: &Path) -> Result<Vec<u8>, DevIdAgentError> {
    std::fs::read(p).map_err(|source| DevIdAgentError::Read {
        path: p.display().to_string(),
        source,
    })
}

/// What the agent keeps between message 1 and the challenge.
#[derive(Debug)]
pub struct Session {
    pub devid: KeyBlob,
    /// The DevID key's persistent handle, when it has one (`devid_handle`).
    pub devid_handle: Option<u32>,
    pub ak: SessionAk,
    pub ek_alg: EkAlg,
    /// The DevID, EK and AK still loaded from message 1 (Kame's EK flow), when the answer
    /// comes over the same TPM connection; else the blobs are loaded again.
    pub loaded: Option<sequence::Loaded>,
}

impl Session {
    /// A session whose AK was made for this attestation, with the DevID from blobs.
    fn made(devid: KeyBlob, ak: AkBlob, ek_alg: EkAlg) -> Self {
        Session {
            devid,
            devid_handle: None,
            ak: SessionAk::Made(ak),
            ek_alg,
            loaded: None,
        }
    }
}

/// The attestation key of one attestation.
#[derive(Debug)]
pub enum SessionAk {
    /// Made for this attestation (under the EK or, as SPIRE's, the SRK).
    Made(AkBlob),
    /// A persistent certified AK (TCG IAK or LAK) at this handle.
    Persistent(u32),
}

/// The PEM certificates of `path`, at least one.
fn read_certs(path: &Path) -> Result<Vec<Vec<u8>>, DevIdAgentError> {
    let no_cert = |msg: String| DevIdAgentError::NoCertificate {
        path: path.display().to_string(),
        msg,
    };
    let pem = String::from_utf8(read(path)?).map_err(|_| no_cert("not text".into()))?;
    let certs = kame_api::bundle::certs_from_pem(&pem).map_err(|e| no_cert(e.to_string()))?;
    if certs.is_empty() {
        return Err(no_cert("empty".into()));
    }
    Ok(certs)
}

/// Message 1: reads files, runs the TPM commands, returns the JSON payload and the session.
pub fn request(
    d: &mut Device,
    cfg: &TpmDevidConfig,
) -> Result<(Vec<u8>, Session), DevIdAgentError> {
    let certs = read_certs(&cfg.devid_cert_path)?;
    // Persistent objects are opened afresh for each attestation: one may have been replaced
    // (re-enrollment) since the last.
    d.forget_persistents();
    let mut devid = match cfg.devid_handle {
        // The private blob is not needed: the key is in the TPM at the handle.
        Some(_) => KeyBlob::from_files(&read(&cfg.devid_pub_path)?, &[]),
        None => KeyBlob::from_files(&read(&cfg.devid_pub_path)?, &read(&cfg.devid_priv_path)?),
    };
    devid.auth = cfg.devid_password.expose().as_bytes().to_vec();
    d.set_hierarchy_auth(
        cfg.owner_hierarchy_password.expose().as_bytes(),
        cfg.endorsement_hierarchy_password.expose().as_bytes(),
    )?;
    wire::Public::parse(&devid.public).map_err(|e| DevIdAgentError::BadPublic {
        path: cfg.devid_pub_path.display().to_string(),
        msg: e.to_string(),
    })?;
    let (req, session) = match (&cfg.attestation_key, cfg.devid_handle) {
        (Some(ak), handle) => evidence_certified_ak(d, certs, devid, handle, ak)?,
        (None, None) => evidence_with(d, certs, devid, cfg.ek_algorithm)?,
        (None, Some(_)) => return Err(DevIdAgentError::PersistentDevIdNeedsCertifiedAk),
    };
    Ok((req.encode(), session))
}

/// The TPM half of message 1 with a persistent certified AK: its public area is the only TPM
/// read. The certify comes bound to the server's nonce in message 3.
pub fn evidence_certified_ak(
    d: &mut Device,
    certs: Vec<Vec<u8>>,
    devid: KeyBlob,
    devid_handle: Option<u32>,
    ak: &CertifiedAk,
) -> Result<(AttestationRequest, Session), DevIdAgentError> {
    let ak_cert = read_certs(&ak.cert_path)?;
    if let Some(h) = devid_handle {
        d.persistent_public_matching(h, &devid.public)?;
    }
    let ak_pub = match &ak.pub_path {
        Some(p) => {
            let file = KeyBlob::from_files(&read(p)?, &[]).public;
            d.persistent_public_matching(ak.handle, &file)?
        }
        None => d.persistent_public(ak.handle)?,
    };
    let tpm_key = wire::Public::parse(&ak_pub)
        .map_err(|e| e.to_string())
        .and_then(|p| p.spki_der().map_err(|e| e.to_string()))
        .and_then(|s| kame_api::keys::KeyInfo::from_spki_der(&s).map_err(|e| e.to_string()))
        .map_err(|msg| DevIdAgentError::BadAkPublic {
            handle: ak.handle,
            msg,
        })?;
    let cert_key = kame_api::x509svid::ParsedCert::parse(&ak_cert[0])
        .and_then(|c| c.spki_der())
        .and_then(|s| kame_api::keys::KeyInfo::from_spki_der(&s))
        .map_err(|e| DevIdAgentError::BadAkCert {
            path: ak.cert_path.display().to_string(),
            msg: e.to_string(),
        })?;
    if tpm_key != cert_key {
        return Err(DevIdAgentError::AkCertMismatch {
            handle: ak.handle,
            path: ak.cert_path.display().to_string(),
        });
    }
    let req = AttestationRequest {
        devid_cert: certs,
        devid_pub: Some(devid.public.clone()),
        ak_pub: Some(ak_pub),
        version: Some(2),
        ak_cert,
        ..Default::default()
    };
    Ok((
        req,
        Session {
            devid,
            devid_handle,
            ak: SessionAk::Persistent(ak.handle),
            ek_alg: EkAlg::Rsa2048,
            loaded: None,
        },
    ))
}

/// The TPM half of message 1: EK (template L-1) and its certificate, a fresh AK, and the
/// DevID certified by it.
pub fn evidence(
    d: &mut Device,
    certs: Vec<Vec<u8>>,
    devid: KeyBlob,
) -> Result<(AttestationRequest, Session), DevIdAgentError> {
    evidence_with(d, certs, devid, EkAlg::Rsa2048)
}

/// [`evidence`] with the EK of `ek_alg` (ECC and high-range EKs: Kame servers only).
pub fn evidence_with(
    d: &mut Device,
    certs: Vec<Vec<u8>>,
    devid: KeyBlob,
    ek_alg: EkAlg,
) -> Result<(AttestationRequest, Session), DevIdAgentError> {
    // An AK in the endorsement hierarchy (under the EK): a TPM obfuscates the reset and
    // restart counts in quotes signed by owner-hierarchy keys such as SPIRE's SRK-parented
    // AK, and v2 needs them to see reboots. SPIRE's server accepts either.
    let (mut req, session) = made_ak_evidence(d, certs, devid, ek_alg, AkParent::Ek)?;
    // Vendor intermediates the TPM keeps in NV (TCG EK chain range), for Kame servers.
    req.ek_cert_chain = d.ek_chain_certificates()?;
    // Kame v2: a Kame server answers with a nonce-bound certify and PCR quote request;
    // SPIRE's server ignores the field.
    req.version = Some(2);
    Ok((req, session))
}

/// Message 1 exactly as SPIRE's agent builds it (`tpm_devid.md` §1.3): the AK from `AK_RSA`
/// under the SRK, no `Version`.
pub fn evidence_spire(
    d: &mut Device,
    certs: Vec<Vec<u8>>,
    devid: KeyBlob,
) -> Result<(AttestationRequest, Session), DevIdAgentError> {
    made_ak_evidence(d, certs, devid, EkAlg::Rsa2048, AkParent::Srk)
}

/// Message 1 with an AK made for this attestation under `parent`: the EK certificate, the EK
/// and AK publics and the DevID certified by the AK. The DevID, the EK and the AK stay loaded
/// for the answer, as SPIRE keeps them.
fn made_ak_evidence(
    d: &mut Device,
    certs: Vec<Vec<u8>>,
    devid: KeyBlob,
    ek_alg: EkAlg,
    parent: AkParent,
) -> Result<(AttestationRequest, Session), DevIdAgentError> {
    let ek_cert = d
        .ek_certificate(ek_alg)?
        .ok_or(DevIdAgentError::NoEkCertificate)?;
    let loaded = sequence::begin(d, ek_alg, &devid, parent)?;
    let ak = loaded.ak_blob.clone();
    let (certified, sig) = loaded.certify.clone();
    let req = AttestationRequest {
        devid_cert: certs,
        devid_pub: Some(devid.public.clone()),
        ek_cert: Some(ek_cert),
        ek_pub: Some(loaded.ek_public.clone()),
        ak_pub: Some(ak.public.clone()),
        certified_devid: Some(certified),
        certification_signature: Some(sig),
        ..Default::default()
    };
    let mut session = Session::made(devid, ak, ek_alg);
    session.loaded = Some(loaded);
    Ok((req, session))
}

fn der_int(v: &[u8]) -> Vec<u8> {
    let mut v: Vec<u8> = v.iter().copied().skip_while(|b| *b == 0).collect();
    if v.is_empty() || v[0] & 0x80 != 0 {
        v.insert(0, 0);
    }
    let mut out = vec![0x02];
    out.extend(der_len(v.len()));
    out.extend(v);
    out
}

fn der_len(n: usize) -> Vec<u8> {
    if n < 0x80 {
        vec![n as u8]
    } else if n < 0x100 {
        vec![0x81, n as u8]
    } else {
        vec![0x82, (n >> 8) as u8, n as u8]
    }
}

/// Message 3: the nonce signed by the DevID key and the recovered credential.
pub fn respond(
    d: &mut Device,
    session: &Session,
    challenge: &[u8],
) -> Result<Vec<u8>, DevIdAgentError> {
    Ok(answer(d, session, challenge)?.encode())
}

/// The TPM half of message 3.
pub fn answer(
    d: &mut Device,
    session: &Session,
    challenge: &[u8],
) -> Result<ChallengeResponse, DevIdAgentError> {
    let r = answer_with(d, session, challenge);
    // Whatever the outcome, the objects loaded for message 1 are done with.
    if let Some(loaded) = &session.loaded {
        sequence::end(d, loaded);
    }
    r
}

fn answer_with(
    d: &mut Device,
    session: &Session,
    challenge: &[u8],
) -> Result<ChallengeResponse, DevIdAgentError> {
    let c = ChallengeRequest::decode(challenge).map_err(DevIdAgentError::BadChallenge)?;
    let nonce = c
        .devid
        .filter(|n| !n.is_empty())
        .ok_or(DevIdAgentError::EmptyNonce)?;
    let ak = match &session.ak {
        SessionAk::Made(ak) => ak,
        SessionAk::Persistent(handle) => {
            if c.version.is_none_or(|v| v < 2) {
                return Err(DevIdAgentError::CertifiedAkNeedsV2);
            }
            let p = d.prove_with_persistent_ak(
                &session.devid,
                session.devid_handle,
                *handle,
                &nonce,
                &nonce,
                &c.pcrs,
            )?;
            let resp = ChallengeResponse {
                devid: Some(signature_for_server(&p.signature)?),
                ..Default::default()
            };
            return Ok(with_v2(resp, p));
        }
    };
    let cred = c.cred_activation.ok_or(DevIdAgentError::EmptyCredential)?;
    let tpm2b = |b: &[u8]| -> Result<Vec<u8>, DevIdAgentError> {
        let n = u16::try_from(b.len()).map_err(|_| DevIdAgentError::CredentialTooLarge)?;
        Ok([n.to_be_bytes().as_slice(), b].concat())
    };
    let (credential, secret) = (tpm2b(&cred.credential)?, tpm2b(&cred.secret)?);
    let v2 = c.version.is_some_and(|v| v >= 2);
    if let Some(loaded) = session.loaded.as_ref().filter(|l| sequence::holds(d, l)) {
        // Everything still loaded from message 1: no EK, AK or DevID to make or load again.
        let a = sequence::answer(
            d,
            loaded,
            &session.devid.public,
            &nonce,
            &credential,
            &secret,
            v2.then_some((nonce.as_slice(), c.pcrs.as_slice())),
        )?;
        let resp = ChallengeResponse {
            devid: Some(signature_for_server(&a.signature)?),
            cred_activation: Some(a.credential),
            ..Default::default()
        };
        return Ok(match a.v2 {
            Some(p) => with_v2(resp, p),
            None => resp,
        });
    }
    let resp = ChallengeResponse {
        devid: Some(signature_for_server(&d.sign(&session.devid, &nonce)?)?),
        cred_activation: Some(d.activate_credential(session.ek_alg, ak, &credential, &secret)?),
        ..Default::default()
    };
    if !v2 {
        return Ok(resp);
    }
    // Bound to the server's nonce: a fresh certify of the DevID and a quote of the PCRs it
    // asked for, both by the AK whose credential was just activated.
    let (certify, certify_signature) = d.certify(session.ek_alg, ak, &session.devid, &nonce)?;
    let (quote, quote_signature) = d.quote(session.ek_alg, ak, &c.pcrs, &nonce)?;
    let proof = kame_tpm::device::PersistentAkProof {
        signature: vec![],
        certify,
        certify_signature,
        quote,
        quote_signature,
        pcr_values: d.pcr_values(&c.pcrs)?,
    };
    Ok(with_v2(resp, proof))
}

/// `resp` with Kame v2's nonce-bound certify, quote and PCR values from `p`.
fn with_v2(resp: ChallengeResponse, p: kame_tpm::device::PersistentAkProof) -> ChallengeResponse {
    ChallengeResponse {
        certified_devid: Some(p.certify),
        certification_signature: Some(p.certify_signature),
        quote: Some(p.quote),
        quote_signature: Some(p.quote_signature),
        pcr_values: p.pcr_values.into_iter().map(|((_, i), v)| (i, v)).collect(),
        ..resp
    }
}

/// A TPMT_SIGNATURE as Go's CheckSignature expects it: RSA raw, ECDSA DER SEQUENCE { r, s }.
pub fn signature_for_server(tpm_sig: &[u8]) -> Result<Vec<u8>, DevIdAgentError> {
    Ok(
        match wire::Signature::parse(tpm_sig).map_err(DevIdAgentError::Signature)? {
            wire::Signature::RsaSsa { sig, .. } | wire::Signature::RsaPss { sig, .. } => sig,
            wire::Signature::Ecdsa { r, s, .. } => {
                let body = [der_int(&r), der_int(&s)].concat();
                let mut out = vec![0x30];
                out.extend(der_len(body.len()));
                out.extend(body);
                out
            }
        },
    )
}

/// Builds the agent's `NodeAttestor "tpm_devid"` from its `plugin_data`.
pub fn plugin(
    data: kame_api::conf::Section,
) -> Result<std::sync::Arc<dyn crate::attestation::AgentAttestor>, kame_api::conf::ConfigError> {
    let cfg = config::tpm_devid_config(&data)?;
    data.finish()?;
    Ok(std::sync::Arc::new(cfg))
}

impl From<DevIdAgentError> for crate::attestation::AttestError {
    fn from(e: DevIdAgentError) -> Self {
        crate::attestation::AttestError::Plugin {
            name: TYPE,
            source: Box::new(e),
        }
    }
}

/// One attestation's TPM and session: answers the server's one challenge.
struct TpmResponder {
    dev: kame_tpm::device::SharedDevice,
    session: std::sync::Arc<Session>,
    answered: bool,
}

#[async_trait::async_trait]
impl crate::attestation::Responder for TpmResponder {
    async fn respond(
        &mut self,
        challenge: Vec<u8>,
    ) -> Result<Vec<u8>, crate::attestation::AttestError> {
        if self.answered {
            return Err(crate::attestation::AttestError::UnexpectedChallenge(TYPE));
        }
        let session = self.session.clone();
        let resp = self
            .dev
            .run(move |d| {
                respond(d, &session, &challenge).map_err(|e| match e {
                    DevIdAgentError::Tpm(t) => t,
                    other => DeviceError::Invalid(other.to_string()),
                })
            })
            .await
            .map_err(DevIdAgentError::from)?;
        self.answered = true;
        Ok(resp)
    }
}

#[async_trait::async_trait]
impl crate::attestation::AgentAttestor for TpmDevidConfig {
    fn name(&self) -> &'static str {
        TYPE
    }

    async fn start(
        &self,
    ) -> Result<(Vec<u8>, Box<dyn crate::attestation::Responder>), crate::attestation::AttestError>
    {
        let dev = kame_tpm::device::SharedDevice::open(&self.tcti)
            .await
            .map_err(DevIdAgentError::from)?;
        let c = self.clone();
        let (payload, session) = dev
            .run(move |d| {
                request(d, &c).map_err(|e| match e {
                    DevIdAgentError::Tpm(t) => t,
                    other => DeviceError::Invalid(other.to_string()),
                })
            })
            .await
            .map_err(DevIdAgentError::from)?;
        Ok((
            payload,
            Box::new(TpmResponder {
                dev,
                session: std::sync::Arc::new(session),
                answered: false,
            }),
        ))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tpm_devid_ecdsa_signature_is_der_with_positive_integers() {
        assert_eq!(der_int(&[0x00, 0x80]), vec![0x02, 0x02, 0x00, 0x80]);
        assert_eq!(der_int(&[0x00, 0x00, 0x01]), vec![0x02, 0x01, 0x01]);
        assert_eq!(der_int(&[]), vec![0x02, 0x01, 0x00]);
        assert_eq!(der_len(200), vec![0x81, 200]);
    }
}
