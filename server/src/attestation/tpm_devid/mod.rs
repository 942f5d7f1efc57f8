//! `tpm_devid` node attestation, the server half, wire-compatible with SPIRE's agent
//! (`tpm_devid.md` §1): the agent proves (1) its DevID certificate chains to `devid_ca_path`,
//! (2) it holds the DevID private key (signs a fresh nonce), (3) the DevID key is resident in
//! a TPM whose EK certificate chains to `endorsement_ca_path` (TPM2_Certify of the DevID by an
//! AK, and the AK proven to sit with that EK by credential activation). Every check of SPIRE's
//! runs in SPIRE's order, each with its own error; on top, by default, the checks SPIRE lacks
//! (§1.8): `DevIDPub` is the certificate's key, AK and DevID key attributes, the certify's
//! name algorithm. `compat_mode` turns those off for strict SPIRE parity. Kame's certified-AK
//! mode replaces (3) when the agent sends `AKCert`: a persistent TCG IAK (or LAK) whose
//! certificate chains to `attestation_key_ca_path` and follows the TCG IAK profile already
//! stands for residency with a genuine EK, so no EK and no credential activation are needed; the
//! DevID certify and a PCR quote by that key, both bound to the server's nonce, prove the DevID
//! key sits in that TPM now. In that mode the AK's attributes (restricted, fixedTPM) rest on
//! the CA's TCG policies, which a Kame CA grants only after credential activation bound them to
//! the key's Name; the attribute bits the agent sends are checked too, as a second line. It uses only the pure
//! `kame_tpm::wire` half: the server never links libtss2. It holds no state between attempts
//! beyond the [`Pending`] challenge a caller keeps for one stream.

use super::{Attested, sha1_hex};
use crate::datastore::Selector;
use kame_api::TrustDomain;
use kame_api::tpm_devid::{
    AttestationRequest, ChallengeRequest, ChallengeResponse, CredActivation,
};
use kame_api::x509svid::ParsedCert;
use kame_tpm::wire::public::attr;
use kame_tpm::wire::{self, Public};

pub const TYPE: &str = "tpm_devid";

/// One variant per failed check, in the order they run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevIdError {
    #[error("malformed attestation data: {0}")]
    Malformed(#[source] kame_api::Error),
    #[error("no DevID certificate was sent")]
    NoDevIdCert,
    #[error("DevID certificate {0} cannot be parsed: {1}")]
    BadDevIdCert(usize, #[source] kame_api::Error),
    #[error("DevID certificate does not chain to devid_ca_path: {0}")]
    UntrustedDevId(#[source] kame_devid::chain::ChainError),
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("EK certificate cannot be parsed: {0}")]
    BadEkCert(#[source] kame_api::Error),
    #[error("the EK certificate's key is not a supported key")]
    UnsupportedEkCertKey,
    #[error("{field} is not a TPMT_PUBLIC: {msg}")]
    BadPublic { field: &'static str, msg: String },
    #[error("EK public key does not match the EK certificate")]
    EkMismatch,
    #[error("EK certificate does not chain to endorsement_ca_path: {0}")]
    UntrustedEk(#[source] kame_devid::chain::ChainError),
    #[error("EK without a certificate is not on ek_allow_list (SPKI SHA-256 {0})")]
    EkNotAllowed(String),
    #[error("DevIDPub is not the DevID certificate's key")]
    DevIdPubMismatch,
    #[error("AK attributes are not those of an attestation key: {0}")]
    AkAttributes(#[source] wire::Error),
    #[error("DevID key attributes do not show a TPM-resident key: {0}")]
    DevIdAttributes(#[source] wire::Error),
    #[error("certification of the DevID by the AK does not verify: {0}")]
    BadCertify(#[source] wire::Error),
    #[error("certification of the DevID by the AK does not verify: not a certify attestation")]
    NotCertify,
    #[error(
        "certification of the DevID by the AK does not verify: the certified name is not DevIDPub's"
    )]
    CertifiedNameMismatch,
    #[error("the certification of the DevID bound to the nonce does not verify: {0}")]
    BadBoundCertify(#[source] wire::Error),
    #[error("cannot make the credential-activation challenge: {0}")]
    Challenge(#[source] wire::Error),
    #[error("the random number generator failed")]
    Rng,
    #[error("malformed challenge response: {0}")]
    BadResponse(#[source] kame_api::Error),
    #[error("malformed challenge response: no DevID signature")]
    NoNonceSignature,
    #[error("malformed challenge response: PCRValues names PCR {0} twice")]
    DuplicatePcr(u32),
    #[error("DevID nonce signature does not verify: {0}")]
    BadNonceSignature(#[source] kame_api::Error),
    #[error("DevID nonce signature does not verify: unsupported DevID key")]
    UnsupportedDevIdKey,
    #[error("credential activation failed: the secret does not match")]
    CredentialMismatch,
    #[error(
        "this server requires a PCR quote (require_quote or pcr_policy): the agent does not speak v2"
    )]
    QuoteRequired,
    #[error("v2 response lacks {0}")]
    MissingV2(&'static str),
    #[error("the agent sent an AK certificate, but compat_mode is on (SPIRE has no certified AK)")]
    CertifiedAkInCompatMode,
    #[error("the agent sent an AK certificate, but attestation_key_ca_path is not configured")]
    CertifiedAkNotConfigured,
    #[error("an AK certificate needs Kame's v2 (certify and quote bound to the nonce)")]
    CertifiedAkNeedsV2,
    #[error("AK certificate {0} cannot be parsed: {1}")]
    BadAkCert(usize, #[source] kame_api::Error),
    #[error("AK certificate does not chain to attestation_key_ca_path: {0}")]
    UntrustedAk(#[source] kame_devid::chain::ChainError),
    #[error("AK certificate is not a TCG IAK/LAK certificate: {0}")]
    AkCertProfile(#[source] kame_devid::profile::ProfileError),
    #[error("AKPub is not the AK certificate's key")]
    AkCertMismatch,
    #[error("quote does not verify: {0}")]
    BadQuote(#[source] wire::Error),
    #[error("quote does not verify: PCR sha256:{0} was not quoted")]
    PcrNotQuoted(u32),
    #[error("cannot make the agent ID: {0}")]
    AgentId(#[source] kame_api::IdError),
    #[error("PCR sha256:{index} is {got}, the policy requires {want}")]
    PcrPolicy {
        index: u32,
        got: String,
        want: String,
    },
}

impl DevIdError {
    /// The server is not set up for what the agent asks (a certified AK): neither the
    /// agent's mistake nor a failed proof.
    pub fn is_precondition(&self) -> bool {
        matches!(
            self,
            DevIdError::CertifiedAkInCompatMode | DevIdError::CertifiedAkNotConfigured
        )
    }

    /// Malformed input is the caller's mistake; a failed proof is a refusal.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            DevIdError::Malformed(_)
                | DevIdError::NoDevIdCert
                | DevIdError::BadDevIdCert(..)
                | DevIdError::Missing(_)
                | DevIdError::BadEkCert(_)
                | DevIdError::BadPublic { .. }
                | DevIdError::BadResponse(_)
                | DevIdError::NoNonceSignature
                | DevIdError::DuplicatePcr(_)
                | DevIdError::MissingV2(_)
                | DevIdError::CertifiedAkNeedsV2
                | DevIdError::BadAkCert(..)
        )
    }
}

/// `NodeAttestor "tpm_devid"` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevIdConfig {
    /// DER roots for DevID certificates.
    pub devid_roots: Vec<Vec<u8>>,
    /// DER roots (and vendor intermediates) for EK certificates.
    pub ek_roots: Vec<Vec<u8>>,
    /// SPIRE parity: skip the checks SPIRE lacks.
    pub compat_mode: bool,
    /// SHA-256 (lowercase hex) of the SubjectPublicKeyInfo DER of EKs trusted without an EK
    /// certificate (TPMs that have none); empty: EK certificates are required.
    pub ek_allow_list: Vec<String>,
    /// Refuse agents that do not speak v2.
    pub require_quote: bool,
    /// Expected SHA-256 PCR values by index.
    pub pcr_policy: std::collections::BTreeMap<u32, Vec<u8>>,
    /// DER roots for attestation-key (TCG IAK/LAK) certificates (`attestation_key_ca_path`);
    /// empty: certified AKs are refused.
    pub ak_roots: Vec<Vec<u8>>,
}

/// The `tpm_devid` plugin: its settings and the trust domain its agent IDs are in.
#[derive(Debug)]
pub struct TpmDevid {
    pub cfg: DevIdConfig,
    pub trust_domain: TrustDomain,
}

/// Builds `NodeAttestor "tpm_devid"` from its `plugin_data` (SPIRE's keys, plus Kame's
/// `compat_mode`, `ek_allow_list_path`, `require_quote`, `pcr_policy`,
/// `attestation_key_ca_path`), reading the bundles it names.
pub fn plugin(
    env: &crate::catalog::PluginEnv,
    data: kame_api::conf::Section,
) -> Result<std::sync::Arc<dyn super::NodeAttestor>, kame_api::conf::ConfigError> {
    use crate::catalog::files;
    use kame_api::conf::invalid;
    let devid_roots = files::required_certificates(&data, "devid_ca_path")?;
    let ek_roots = files::required_certificates(&data, "endorsement_ca_path")?;
    let compat_mode = data.take_bool("compat_mode")?.unwrap_or(false);
    let ek_allow_list = match files::optional_path(&data, "ek_allow_list_path")? {
        None => vec![],
        Some(p) => files::sha256_list(&data.key("ek_allow_list_path"), &p)?,
    };
    let require_quote = data.take_bool("require_quote")?.unwrap_or(false);
    let ak_roots = match files::optional_path(&data, "attestation_key_ca_path")? {
        None => vec![],
        Some(p) => files::certificates(&data.key("attestation_key_ca_path"), &p)?,
    };
    let mut pcr_policy = std::collections::BTreeMap::new();
    let mut data = data;
    if let Some(mut pol) = data.section("pcr_policy")? {
        if let Some(sha) = pol.section("sha256")? {
            for k in sha.keys() {
                let key = sha.key(&k);
                let i: u32 = k
                    .parse()
                    .ok()
                    .filter(|i| *i < 24)
                    .ok_or_else(|| invalid(&key, "not a PCR index (0-23)"))?;
                let v = sha.string(&k)?.unwrap_or_default();
                let b = hex::decode(v.trim())
                    .ok()
                    .filter(|b| b.len() == 32)
                    .ok_or_else(|| invalid(&key, "expected a SHA-256 value in hex"))?;
                pcr_policy.insert(i, b);
            }
            sha.finish()?;
        }
        pol.finish()?;
    }
    data.finish()?;
    Ok(std::sync::Arc::new(TpmDevid {
        cfg: DevIdConfig {
            devid_roots,
            ek_roots,
            compat_mode,
            ek_allow_list,
            require_quote,
            pcr_policy,
            ak_roots,
        },
        trust_domain: env.trust_domain.clone(),
    }))
}

impl From<DevIdError> for super::AttestError {
    fn from(e: DevIdError) -> Self {
        let m = e.to_string();
        if matches!(e, DevIdError::Rng) {
            super::AttestError::Internal(m)
        } else if e.is_bad_input() {
            super::AttestError::BadInput(m)
        } else if e.is_precondition() {
            super::AttestError::Precondition(m)
        } else {
            super::AttestError::Denied(m)
        }
    }
}

impl super::NodeAttestor for TpmDevid {
    fn begin(&self, payload: &[u8], now: u64) -> Result<super::Step, super::AttestError> {
        let (pending, challenge) = begin(&self.cfg, payload, now)?;
        Ok(super::Step::Challenge {
            challenge: challenge.encode(),
            pending: Box::new(pending),
        })
    }

    fn finish(
        &self,
        pending: super::Pending,
        response: &[u8],
        _now: u64,
    ) -> Result<Attested, super::AttestError> {
        let pending = pending.downcast::<Pending>().map_err(|_| {
            super::AttestError::Internal("tpm_devid was handed another attestor's state".into())
        })?;
        Ok(finish(&self.trust_domain, *pending, response)?)
    }
}

/// The PCRs a v2 quote covers when no policy names any: the firmware and Secure Boot ones.
const DEFAULT_QUOTE_PCRS: [u32; 2] = [0, 7];

/// What the server keeps between the challenge and the response.
#[derive(Clone)]
pub struct Pending {
    leaf: Vec<u8>,
    /// The selectors naming the TPM: `ek:pubhash:…`, or for a certified AK `ak:pubhash:…`
    /// and the AK certificate's serial numbers.
    tpm_selectors: Vec<String>,
    /// v2: the AK and DevID publics to check the nonce-bound certify and the quote, and the
    /// PCRs asked for.
    v2: Option<(Public, Public, Vec<u32>)>,
    policy: std::collections::BTreeMap<u32, Vec<u8>>,
    chain_issuers: Vec<Vec<u8>>,
    nonce: Vec<u8>,
    /// The hash of the nonce signature: SHA-256 as SPIRE, or SHA-384 when DevIDPub's scheme
    /// names it (a P-384 DevID made with ECDSA/SHA-384; never in compat_mode).
    nonce_sha384: bool,
    /// The credential-activation secret (None for a certified AK, which answers none).
    secret: Option<zeroize::Zeroizing<Vec<u8>>>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pending")
    }
}

fn random(n: usize) -> Result<Vec<u8>, DevIdError> {
    let mut b = vec![0u8; n];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| DevIdError::Rng)?;
    Ok(b)
}

fn public(field: &'static str, b: &[u8]) -> Result<Public, DevIdError> {
    Public::parse(b).map_err(|e| DevIdError::BadPublic {
        field,
        msg: e.to_string(),
    })
}

fn key_of_spki(spki: &[u8]) -> Option<kame_api::keys::KeyInfo> {
    kame_api::keys::KeyInfo::from_spki_der(spki).ok()
}

fn strip_tpm2b(b: &[u8]) -> Result<Vec<u8>, DevIdError> {
    let mut r = wire::Reader::new(b, "TPM2B");
    let inner = r.tpm2b().map_err(DevIdError::Challenge)?.to_vec();
    Ok(inner)
}

/// Step 1: checks message 1 and makes the challenge (SPIRE's §1.4 steps 1–10).
pub fn begin(
    cfg: &DevIdConfig,
    payload: &[u8],
    now: u64,
) -> Result<(Pending, ChallengeRequest), DevIdError> {
    let req = AttestationRequest::decode(payload).map_err(DevIdError::Malformed)?;
    let v2 = req.version.is_some_and(|v| v >= 2);
    // A PCR policy is checked on a quote, which only v2 agents make: a policy without a
    // quote must not pass (an agent leaving out "Version" would skip it).
    if (cfg.require_quote || !cfg.pcr_policy.is_empty()) && !v2 {
        return Err(DevIdError::QuoteRequired);
    }
    // 2. DevID certificates.
    let Some(leaf) = req.devid_cert.first().cloned() else {
        return Err(DevIdError::NoDevIdCert);
    };
    let leaf_cert = ParsedCert::parse(&leaf).map_err(|e| DevIdError::BadDevIdCert(0, e))?;
    for (i, c) in req.devid_cert.iter().enumerate().skip(1) {
        ParsedCert::parse(c).map_err(|e| DevIdError::BadDevIdCert(i, e))?;
    }
    // 3. DevID chain.
    let path = kame_devid::chain::verify_path(&leaf, &req.devid_cert[1..], &cfg.devid_roots, now)
        .map_err(DevIdError::UntrustedDevId)?;
    // 4. The DevID nonce.
    let nonce = random(32)?;
    if !req.ak_cert.is_empty() {
        return begin_certified_ak(cfg, &req, leaf, &leaf_cert, path.issuers, nonce, now);
    }
    // 5. Residency data, in SPIRE's order.
    let ak_pub = req.ak_pub.as_deref().filter(|b| !b.is_empty());
    let ak_pub = ak_pub.ok_or(DevIdError::Missing("AKPub"))?;
    let devid_pub = req.devid_pub.as_deref().filter(|b| !b.is_empty());
    let devid_pub = devid_pub.ok_or(DevIdError::Missing("DevIDPub"))?;
    let ek_cert = req.ek_cert.as_deref().filter(|b| !b.is_empty());
    if ek_cert.is_none() && cfg.ek_allow_list.is_empty() {
        return Err(DevIdError::Missing("EKCert"));
    }
    let ek_pub = req.ek_pub.as_deref().filter(|b| !b.is_empty());
    let ek_pub = ek_pub.ok_or(DevIdError::Missing("EKPub"))?;
    // 6. Parse.
    let ek_cert_p = ek_cert
        .map(|c| ParsedCert::parse(c).map_err(DevIdError::BadEkCert))
        .transpose()?;
    let devid_p = public("DevIDPub", devid_pub)?;
    let ak_p = public("AKPub", ak_pub)?;
    let ek_p = public("EKPub", ek_pub)?;
    let ek_spki = ek_p.spki_der().map_err(|e| DevIdError::BadPublic {
        field: "EKPub",
        msg: e.to_string(),
    })?;
    let pub_key = key_of_spki(&ek_spki).ok_or_else(|| DevIdError::BadPublic {
        field: "EKPub",
        msg: "unsupported key".into(),
    })?;
    if cfg.compat_mode && !ek_p.is_rsa() {
        return Err(DevIdError::BadPublic {
            field: "EKPub",
            msg: "only RSA EKs are accepted in compat_mode".into(),
        });
    }
    let ek_hash = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&ek_spki))
    };
    let allowed = cfg.ek_allow_list.iter().any(|h| h == &ek_hash);
    match (&ek_cert_p, ek_cert) {
        (Some(p), Some(der)) => {
            // 7. EK key match (SPIRE: RSA only; Kame also ECC).
            let cert_key = p
                .spki_der()
                .ok()
                .and_then(|s| key_of_spki(&s))
                .ok_or(DevIdError::UnsupportedEkCertKey)?;
            if cert_key != pub_key {
                return Err(DevIdError::EkMismatch);
            }
            // 8. EK chain, unless allow-listed. SPIRE takes no intermediates from the agent;
            // Kame also uses those the agent read from its TPM's NV (EKCertChain): they are
            // only a path to a configured root, never trusted by themselves.
            if let Err(e) = kame_devid::chain::verify(der, &req.ek_cert_chain, &cfg.ek_roots, now)
                && !allowed
            {
                return Err(DevIdError::UntrustedEk(e));
            }
        }
        _ if allowed => {}
        _ => return Err(DevIdError::EkNotAllowed(ek_hash)),
    }
    if !cfg.compat_mode {
        check_keys(&leaf_cert, &devid_p, &ak_p)?;
    }
    // 9. DevID certified by the AK (empty qualifying data in v1).
    let certified = req
        .certified_devid
        .as_deref()
        .ok_or(DevIdError::Missing("CertifiedDevID"))?;
    let sig = req
        .certification_signature
        .as_deref()
        .ok_or(DevIdError::Missing("CertificationSignature"))?;
    check_certify(cfg.compat_mode, &ak_p, &devid_p, certified, sig)?;
    // 10. Credential activation: a secret only the TPM holding the EK can recover for the AK.
    let secret = random(32)?;
    let ak_name = ak_p.name().map_err(DevIdError::Challenge)?;
    let cred = wire::credential::make_credential(&ek_p, &secret, &ak_name)
        .map_err(DevIdError::Challenge)?;
    let pcrs = quote_pcrs(cfg);
    let challenge = ChallengeRequest {
        devid: Some(nonce.clone()),
        cred_activation: Some(CredActivation {
            credential: strip_tpm2b(&cred.credential_blob)?,
            secret: strip_tpm2b(&cred.secret)?,
        }),
        // v2 only for agents that asked: Go agents never see these fields.
        version: v2.then_some(2),
        pcrs: if v2 { pcrs.clone() } else { vec![] },
    };
    Ok((
        Pending {
            leaf,
            tpm_selectors: vec![format!("ek:pubhash:sha256:{ek_hash}")],
            v2: v2.then(|| (ak_p.clone(), devid_p.clone(), pcrs)),
            policy: cfg.pcr_policy.clone(),
            chain_issuers: path.issuers,
            nonce,
            nonce_sha384: !cfg.compat_mode && devid_p.scheme().hash == wire::alg::SHA384,
            secret: Some(zeroize::Zeroizing::new(secret)),
        },
        challenge,
    ))
}

/// Step 9: the AK's certify of the DevID key, with SPIRE's check in `compat_mode` (the
/// certified name's digest only) or the full one (the whole name, with the hash algorithm).
fn check_certify(
    compat_mode: bool,
    ak_p: &Public,
    devid_p: &Public,
    certified: &[u8],
    sig: &[u8],
) -> Result<(), DevIdError> {
    if compat_mode {
        // SPIRE compares the name's digest only.
        let attest = wire::Attest::parse(certified).map_err(DevIdError::BadCertify)?;
        wire::Signature::parse(sig)
            .and_then(|s| s.verify(ak_p, certified))
            .map_err(DevIdError::BadCertify)?;
        let wire::AttestBody::Certify { name, .. } = &attest.body else {
            return Err(DevIdError::NotCertify);
        };
        let want = devid_p.name().map_err(DevIdError::BadCertify)?;
        if name.get(2..) != want.get(2..) {
            return Err(DevIdError::CertifiedNameMismatch);
        }
    } else {
        wire::attest::verify_certify(ak_p, certified, sig, devid_p, &[])
            .map_err(DevIdError::BadCertify)?;
    }
    Ok(())
}

/// The PCRs a v2 quote must cover: the policy's, else [`DEFAULT_QUOTE_PCRS`].
fn quote_pcrs(cfg: &DevIdConfig) -> Vec<u32> {
    if cfg.pcr_policy.is_empty() {
        DEFAULT_QUOTE_PCRS.to_vec()
    } else {
        cfg.pcr_policy.keys().copied().collect()
    }
}

/// The binding checks SPIRE lacks (§1.8, checks 22–24).
fn check_keys(leaf_cert: &ParsedCert, devid_p: &Public, ak_p: &Public) -> Result<(), DevIdError> {
    // 22. DevIDPub is the certificate's key.
    let leaf_key = leaf_cert.spki_der().ok().and_then(|s| key_of_spki(&s));
    let devid_key = devid_p.spki_der().ok().and_then(|s| key_of_spki(&s));
    if leaf_key.is_none() || leaf_key != devid_key {
        return Err(DevIdError::DevIdPubMismatch);
    }
    // 23. The AK is a restricted signing key that never left the TPM.
    ak_p.check_attributes(
        attr::SIGN_ENCRYPT
            | attr::RESTRICTED
            | attr::FIXED_TPM
            | attr::FIXED_PARENT
            | attr::SENSITIVE_DATA_ORIGIN,
        attr::DECRYPT,
    )
    .map_err(DevIdError::AkAttributes)?;
    // 24. The DevID key was made in, and cannot leave, the TPM.
    devid_p
        .check_attributes(
            attr::SIGN_ENCRYPT | attr::FIXED_TPM | attr::FIXED_PARENT | attr::SENSITIVE_DATA_ORIGIN,
            attr::RESTRICTED,
        )
        .map_err(DevIdError::DevIdAttributes)
}

/// Step 1 with a certified AK (the agent sent `AKCert`): the AK certificate replaces the EK,
/// its chain and credential activation; the nonce-bound certify and quote come in message 3.
fn begin_certified_ak(
    cfg: &DevIdConfig,
    req: &AttestationRequest,
    leaf: Vec<u8>,
    leaf_cert: &ParsedCert,
    chain_issuers: Vec<Vec<u8>>,
    nonce: Vec<u8>,
    now: u64,
) -> Result<(Pending, ChallengeRequest), DevIdError> {
    if cfg.compat_mode {
        return Err(DevIdError::CertifiedAkInCompatMode);
    }
    if cfg.ak_roots.is_empty() {
        return Err(DevIdError::CertifiedAkNotConfigured);
    }
    if req.version.is_none_or(|v| v < 2) {
        return Err(DevIdError::CertifiedAkNeedsV2);
    }
    let ak_pub = req.ak_pub.as_deref().filter(|b| !b.is_empty());
    let ak_pub = ak_pub.ok_or(DevIdError::Missing("AKPub"))?;
    let devid_pub = req.devid_pub.as_deref().filter(|b| !b.is_empty());
    let devid_pub = devid_pub.ok_or(DevIdError::Missing("DevIDPub"))?;
    let mut ak_certs = vec![];
    for (i, c) in req.ak_cert.iter().enumerate() {
        ak_certs.push(ParsedCert::parse(c).map_err(|e| DevIdError::BadAkCert(i, e))?);
    }
    let (ak_leaf, ak_leaf_cert) = match (req.ak_cert.first(), ak_certs.first()) {
        (Some(d), Some(p)) => (d, p),
        _ => return Err(DevIdError::Missing("AKCert")),
    };
    kame_devid::chain::verify(ak_leaf, &req.ak_cert[1..], &cfg.ak_roots, now)
        .map_err(DevIdError::UntrustedAk)?;
    // The issuer vouches for residency with a genuine EK and for a restricted key (TCG
    // certificate policies tcg-cap-verifiedTPMResidency and -Restricted).
    kame_devid::profile::check_devid_cert(ak_leaf, kame_devid::profile::DevIdKind::Iak)
        .map_err(DevIdError::AkCertProfile)?;
    let devid_p = public("DevIDPub", devid_pub)?;
    let ak_p = public("AKPub", ak_pub)?;
    let ak_spki = ak_p.spki_der().map_err(|e| DevIdError::BadPublic {
        field: "AKPub",
        msg: e.to_string(),
    })?;
    let cert_key = ak_leaf_cert.spki_der().ok().and_then(|s| key_of_spki(&s));
    if cert_key.is_none() || cert_key != key_of_spki(&ak_spki) {
        return Err(DevIdError::AkCertMismatch);
    }
    check_keys(leaf_cert, &devid_p, &ak_p)?;
    let ak_hash = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&ak_spki))
    };
    let mut tpm_selectors = vec![format!("ak:pubhash:sha256:{ak_hash}")];
    for sn in kame_devid::profile::subject_serial_numbers(ak_leaf) {
        tpm_selectors.push(format!("ak:subject:serialnumber:{sn}"));
    }
    let pcrs = quote_pcrs(cfg);
    let challenge = ChallengeRequest {
        devid: Some(nonce.clone()),
        cred_activation: None,
        version: Some(2),
        pcrs: pcrs.clone(),
    };
    Ok((
        Pending {
            leaf,
            tpm_selectors,
            nonce_sha384: devid_p.scheme().hash == wire::alg::SHA384,
            v2: Some((ak_p, devid_p, pcrs)),
            policy: cfg.pcr_policy.clone(),
            chain_issuers,
            nonce,
            secret: None,
        },
        challenge,
    ))
}

fn first_cn(cert: &ParsedCert, issuer: bool) -> Option<String> {
    let tbs = cert.cert.tbs_certificate();
    let name = if issuer { tbs.issuer() } else { tbs.subject() };
    super::name_attribute(name, const_oid::db::rfc4519::CN)
}

/// Step 2: checks message 3 and returns the agent's ID and selectors (§1.4 steps 12–14).
pub fn finish(td: &TrustDomain, pending: Pending, response: &[u8]) -> Result<Attested, DevIdError> {
    let resp = ChallengeResponse::decode(response).map_err(DevIdError::BadResponse)?;
    let sig = resp.devid.ok_or(DevIdError::NoNonceSignature)?;
    let leaf = ParsedCert::parse(&pending.leaf).map_err(|e| DevIdError::BadDevIdCert(0, e))?;
    let spki = leaf
        .spki_der()
        .map_err(|e| DevIdError::BadDevIdCert(0, e))?;
    // 12. Proof of possession: SHA256WithRSA or ECDSAWithSHA256, as SPIRE; with SHA-384 when
    // the DevID key's TPM scheme signs with it (P-384 DevIDs, supported on purpose).
    use kame_api::keys::{
        KeyInfo, OID_ECDSA_SHA256, OID_ECDSA_SHA384, OID_RSA_SHA256, OID_RSA_SHA384,
    };
    let alg = match (key_of_spki(&spki), pending.nonce_sha384) {
        (Some(KeyInfo::Rsa { .. }), false) => OID_RSA_SHA256,
        (Some(KeyInfo::Rsa { .. }), true) => OID_RSA_SHA384,
        (Some(_), false) => OID_ECDSA_SHA256,
        (Some(_), true) => OID_ECDSA_SHA384,
        (None, _) => {
            return Err(DevIdError::UnsupportedDevIdKey);
        }
    };
    kame_api::keys::verify_x509_signature(&spki, &alg, None, &pending.nonce, &sig)
        .map_err(DevIdError::BadNonceSignature)?;
    // 13. Proof of residency, compared in constant time (a certified AK proves it with the
    // nonce-bound certify below instead).
    if let Some(secret) = &pending.secret {
        let got = resp.cred_activation.unwrap_or_default();
        use subtle::ConstantTimeEq;
        if got.len() != secret.len() || !bool::from(got.ct_eq(secret)) {
            return Err(DevIdError::CredentialMismatch);
        }
    }
    // v2: the certify and a quote, both bound to this nonce, and the PCR policy.
    let mut tpm_boot = None;
    let mut pcr_selectors = vec![];
    if let Some((ak, devid, pcrs)) = &pending.v2 {
        let certified = resp
            .certified_devid
            .as_deref()
            .ok_or(DevIdError::MissingV2("CertifiedDevID"))?;
        let csig = resp
            .certification_signature
            .as_deref()
            .ok_or(DevIdError::MissingV2("CertificationSignature"))?;
        wire::attest::verify_certify(ak, certified, csig, devid, &pending.nonce)
            .map_err(DevIdError::BadBoundCertify)?;
        let quote = resp
            .quote
            .as_deref()
            .ok_or(DevIdError::MissingV2("Quote"))?;
        let qsig = resp
            .quote_signature
            .as_deref()
            .ok_or(DevIdError::MissingV2("QuoteSignature"))?;
        let mut values = wire::attest::PcrValues::new();
        for (i, v) in &resp.pcr_values {
            // "7" and "07" are one PCR: a second value for it is not a quote's.
            if values.insert((wire::alg::SHA256, *i), v.clone()).is_some() {
                return Err(DevIdError::DuplicatePcr(*i));
            }
        }
        let attest = wire::attest::verify_quote(ak, quote, qsig, &pending.nonce, &values)
            .map_err(DevIdError::BadQuote)?;
        for i in pcrs {
            let got = values
                .get(&(wire::alg::SHA256, *i))
                .ok_or(DevIdError::PcrNotQuoted(*i))?;
            if let Some(want) = pending.policy.get(i)
                && want != got
            {
                return Err(DevIdError::PcrPolicy {
                    index: *i,
                    got: hex::encode(got),
                    want: hex::encode(want),
                });
            }
            pcr_selectors.push(format!("pcr:sha256:{i}:{}", hex::encode(got)));
        }
        tpm_boot = Some((
            attest.clock_info.reset_count,
            attest.clock_info.restart_count,
        ));
    }
    // 14. Identity and selectors as SPIRE emits them.
    let fp = sha1_hex(&pending.leaf);
    let agent_id = td
        .id_from_segments(&["spire", "agent", TYPE, &fp])
        .map_err(DevIdError::AgentId)?;
    let mut selectors = vec![];
    if let Some(cn) = first_cn(&leaf, false).filter(|c| !c.is_empty()) {
        selectors.push(Selector::new(TYPE, format!("subject:cn:{cn}")));
    }
    if let Some(cn) = first_cn(&leaf, true).filter(|c| !c.is_empty()) {
        selectors.push(Selector::new(TYPE, format!("issuer:cn:{cn}")));
    }
    let mut seen = std::collections::HashSet::new();
    for c in &pending.chain_issuers {
        let f = sha1_hex(c);
        if seen.insert(f.clone()) {
            selectors.push(Selector::new(TYPE, format!("ca:fingerprint:{f}")));
        }
    }
    // Kame's, after SPIRE's.
    for sn in kame_devid::profile::subject_serial_numbers(&pending.leaf) {
        selectors.push(Selector::new(TYPE, format!("subject:serialnumber:{sn}")));
    }
    for (oid, serial) in kame_devid::profile::hardware_module_names(&pending.leaf) {
        selectors.push(Selector::new(
            TYPE,
            format!("hwmodulename:{oid}:{}", hex::encode(serial)),
        ));
    }
    for s in pending.tpm_selectors {
        selectors.push(Selector::new(TYPE, s));
    }
    for p in pcr_selectors {
        selectors.push(Selector::new(TYPE, p));
    }
    Ok(Attested {
        agent_id,
        selectors,
        can_reattest: true,
        tpm_boot,
    })
}

#[cfg(test)]
mod tests;
