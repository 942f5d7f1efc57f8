//! `x509pop` node attestation, the server half, wire-compatible with SPIRE's agent
//! (`pkg/server/plugin/nodeattestor/x509pop`): the agent proves it holds the private key of a
//! certificate that chains to `ca_bundle_path(s)` (`mode = "external_pki"`, the default) or to
//! the server's own trust bundle (`mode = "spiffe"`, an X509-SVID whose path starts with
//! `spiffe_prefix`), by signing SHA-256(the server's nonce ‖ its own) with RSA-PSS/SHA-256 (any
//! salt length, as Go verifies) or ECDSA. Its agent ID is `spiffe://<td>/spire/agent` plus
//! `agent_path_template`; its selectors are SPIRE's (`subject:cn:`, `ca:fingerprint:`,
//! `serialnumber:`, `san:<key>:<value>`). Work on what the agent sends is bounded before any
//! signature is checked: at most `max_intermediates` certificates past the leaf (refused
//! before decoding), RSA keys at most `max_rsa_key_size` bits, and path building's budget. It
//! reads its bundles when the configuration loads and does no I/O while attesting.
//!
//! Departures from SPIRE, each safer: a leaf without keyUsage digitalSignature is refused with
//! PermissionDenied before the challenge (SPIRE answers Internal); in spiffe mode the prefix is
//! checked before the challenge, and an empty bundle refuses instead of falling back to the
//! system roots; `verify_client_ip` is not offered (the attestor does not see the peer).

pub mod template;

use super::{AttestError, Attested, NodeAttestor, Pending, Step, sha1_hex};
use crate::catalog::{PluginEnv, TrustBundle};
use crate::datastore::Selector;
use kame_api::TrustDomain;
use kame_api::conf::{ConfigError, Section, invalid};
use kame_api::keys::KeyInfo;
use kame_api::x509pop::{AttestationData, Challenge, NONCE_LEN, Response, combined_nonce};
use kame_api::x509svid::ParsedCert;
use std::sync::Arc;
use template::Template;

pub const TYPE: &str = "x509pop";

/// SPIRE's default `max_intermediates`.
pub const DEFAULT_MAX_INTERMEDIATES: usize = 4;
/// The most `max_intermediates` may be set to here.
pub const MAX_MAX_INTERMEDIATES: usize = 64;
/// SPIRE's default `max_rsa_key_size`.
pub const DEFAULT_MAX_RSA_KEY_SIZE: usize = 8192;
/// The most `max_rsa_key_size` may be set to here.
pub const MAX_MAX_RSA_KEY_SIZE: usize = 16384;
/// SPIRE's default `spiffe_prefix`.
pub const DEFAULT_SPIFFE_PREFIX: &str = "/spire-exchange/";

#[derive(Debug)]
enum Mode {
    ExternalPki { roots: Vec<Vec<u8>> },
    Spiffe { prefix: String, bundle: TrustBundle },
}

/// The `x509pop` plugin.
#[derive(Debug)]
pub struct X509Pop {
    mode: Mode,
    template: Template,
    max_intermediates: usize,
    max_rsa_key_size: usize,
    trust_domain: TrustDomain,
}

fn positive(data: &Section, key: &str, default: usize, max: usize) -> Result<usize, ConfigError> {
    match data.int(key)? {
        None => Ok(default),
        Some(n) if n <= 0 => Err(invalid(
            &data.key(key),
            format!("{key} must be greater than 0"),
        )),
        Some(n) if n as u64 > max as u64 => Err(invalid(
            &data.key(key),
            format!("{key} may be at most {max}"),
        )),
        Some(n) => Ok(n as usize),
    }
}

/// Builds `NodeAttestor "x509pop"` from its `plugin_data` (SPIRE's keys), reading the CA
/// bundles it names.
pub fn plugin(env: &PluginEnv, data: Section) -> Result<Arc<dyn NodeAttestor>, ConfigError> {
    let mode_key = data.key("mode");
    let spiffe = match data.string("mode")?.as_deref() {
        None | Some("") | Some("external_pki") => false,
        Some("spiffe") => true,
        Some(_) => {
            return Err(invalid(
                &mode_key,
                "mode can only be either spiffe or external_pki",
            ));
        }
    };
    let one = crate::catalog::files::optional_path(&data, "ca_bundle_path")?;
    let many = data.strings("ca_bundle_paths")?.unwrap_or_default();
    let prefix_key = data.key("spiffe_prefix");
    let prefix = match (data.string("spiffe_prefix")?, data.string("svid_prefix")?) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                &prefix_key,
                "give spiffe_prefix or svid_prefix (its old name), not both",
            ));
        }
        (Some(p), None) | (None, Some(p)) => Some(p),
        (None, None) => None,
    };
    let mode = if spiffe {
        if one.is_some() || !many.is_empty() {
            return Err(invalid(
                &data.key("ca_bundle_path"),
                "you can not use ca_bundle_path or ca_bundle_paths in spiffe mode",
            ));
        }
        let mut prefix = prefix.unwrap_or_else(|| DEFAULT_SPIFFE_PREFIX.to_string());
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Mode::Spiffe {
            prefix,
            bundle: env.trust_bundle.clone(),
        }
    } else {
        if prefix.is_some() {
            return Err(invalid(&prefix_key, "only in spiffe mode"));
        }
        let mut roots = vec![];
        match (one, many.is_empty()) {
            (Some(_), false) => {
                return Err(invalid(
                    &data.key("ca_bundle_paths"),
                    "only one of ca_bundle_path or ca_bundle_paths can be configured, not both",
                ));
            }
            (None, true) => {
                return Err(data.misspelt("ca_bundle_path").unwrap_or_else(|| {
                    invalid(
                        &data.key("ca_bundle_path"),
                        "one of ca_bundle_path or ca_bundle_paths must be configured",
                    )
                }));
            }
            (Some(p), true) => {
                roots = crate::catalog::files::certificates(&data.key("ca_bundle_path"), &p)?;
            }
            (None, false) => {
                for p in many {
                    roots.extend(crate::catalog::files::certificates(
                        &data.key("ca_bundle_paths"),
                        std::path::Path::new(&p),
                    )?);
                }
            }
        }
        Mode::ExternalPki { roots }
    };
    let default_template = if spiffe {
        "/{{ .PluginName }}/{{ .SVIDPathTrimmed }}"
    } else {
        "/{{ .PluginName }}/{{ .Fingerprint }}"
    };
    let template_text = data
        .string("agent_path_template")?
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| default_template.to_string());
    let template = Template::parse(&template_text).map_err(|e| {
        invalid(
            &data.key("agent_path_template"),
            format!("failed to parse agent svid template: {e}"),
        )
    })?;
    let max_intermediates = positive(
        &data,
        "max_intermediates",
        DEFAULT_MAX_INTERMEDIATES,
        MAX_MAX_INTERMEDIATES,
    )?;
    let max_rsa_key_size = positive(
        &data,
        "max_rsa_key_size",
        DEFAULT_MAX_RSA_KEY_SIZE,
        MAX_MAX_RSA_KEY_SIZE,
    )?;
    if data.take_bool("verify_client_ip")? == Some(true) {
        return Err(invalid(
            &data.key("verify_client_ip"),
            "not supported: Kame's x509pop does not see the peer's address",
        ));
    }
    data.finish()?;
    Ok(Arc::new(X509Pop {
        mode,
        template,
        max_intermediates,
        max_rsa_key_size,
        trust_domain: env.trust_domain.clone(),
    }))
}

impl X509Pop {
    /// `mode = "external_pki"` trusting `roots`, with SPIRE's defaults for everything else
    /// (for tests and fuzz targets, which have no configuration file).
    pub fn external_pki(trust_domain: TrustDomain, roots: Vec<Vec<u8>>) -> Result<Self, String> {
        Ok(X509Pop {
            mode: Mode::ExternalPki { roots },
            template: Template::parse("/{{ .PluginName }}/{{ .Fingerprint }}")?,
            max_intermediates: DEFAULT_MAX_INTERMEDIATES,
            max_rsa_key_size: DEFAULT_MAX_RSA_KEY_SIZE,
            trust_domain,
        })
    }
}

/// What the server keeps between the challenge and the response.
struct X509PopPending {
    nonce: Vec<u8>,
    key: KeyInfo,
    attested: Attested,
}

fn denied(m: impl Into<String>) -> AttestError {
    AttestError::Denied(m.into())
}

fn bad_input(m: impl Into<String>) -> AttestError {
    AttestError::BadInput(m.into())
}

/// Go's `%x` of the serial as a big integer, with a 0 added when that has odd length.
fn serial_number_hex(cert: &ParsedCert) -> String {
    let bytes = cert.cert.tbs_certificate().serial_number().as_bytes();
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    let mut h = hex::encode(&bytes[first..]);
    if h.is_empty() {
        h.push('0');
    }
    if h.len() % 2 == 1 {
        h.insert(0, '0');
    }
    h
}

fn name_attr(name: &x509_cert::name::Name, oid: der::asn1::ObjectIdentifier) -> String {
    super::name_attribute(name, oid).unwrap_or_default()
}

/// RSA modulus size in bits of a certificate's key, None for other keys.
fn rsa_bits(key: &KeyInfo) -> Option<usize> {
    match key {
        KeyInfo::Rsa { n, .. } => {
            let lead = n.iter().position(|b| *b != 0).unwrap_or(n.len());
            let n = &n[lead..];
            Some(
                n.first()
                    .map_or(0, |b| (n.len() - 1) * 8 + (8 - b.leading_zeros() as usize)),
            )
        }
        _ => None,
    }
}

fn key_of(cert: &ParsedCert) -> Result<KeyInfo, String> {
    cert.spki_der()
        .and_then(|s| KeyInfo::from_spki_der(&s))
        .map_err(|e| e.to_string())
}

impl X509Pop {
    fn roots(&self) -> Result<Vec<Vec<u8>>, AttestError> {
        match &self.mode {
            Mode::ExternalPki { roots } => Ok(roots.clone()),
            Mode::Spiffe { bundle, .. } => {
                let roots = bundle.roots();
                if roots.is_empty() {
                    return Err(AttestError::Unavailable(
                        "failed to get trust bundle: the server's bundle is not available yet"
                            .into(),
                    ));
                }
                Ok(roots)
            }
        }
    }

    /// The agent ID and selectors of a verified leaf (SPIRE's order).
    fn identity(
        &self,
        leaf_der: &[u8],
        leaf: &ParsedCert,
        chain_issuers: &[Vec<u8>],
    ) -> Result<Attested, AttestError> {
        let td = self.trust_domain.as_str();
        let uris = leaf
            .sans()
            .map_err(|e| bad_input(format!("unable to parse leaf certificate: {e}")))?
            .map(|(_, u, _)| u)
            .unwrap_or_default();
        let svid_path_trimmed = match &self.mode {
            Mode::ExternalPki { .. } => String::new(),
            Mode::Spiffe { prefix, .. } => {
                let id = uris
                    .iter()
                    .find(|u| u.starts_with("spiffe://"))
                    .ok_or_else(|| denied("valid SVID x509 cert not found"))?;
                let path = id["spiffe://".len()..]
                    .find('/')
                    .map(|i| &id["spiffe://".len() + i..])
                    .unwrap_or("");
                path.strip_prefix(prefix.as_str())
                    .ok_or_else(|| denied("x509 cert doesnt match SVID prefix"))?
                    .to_string()
            }
        };
        // x509pop://<td>/<key>/<value> SANs: SPIRE's san: selectors and template map.
        let san_prefix = format!("x509pop://{td}/");
        let mut sans = std::collections::BTreeMap::new();
        for u in &uris {
            if let Some(rest) = u.strip_prefix(&san_prefix)
                && let Some((k, v)) = rest.trim_matches('/').split_once('/')
            {
                sans.insert(k.to_string(), v.to_string());
            }
        }
        let fingerprint = sha1_hex(leaf_der);
        let serial = serial_number_hex(leaf);
        let tbs = leaf.cert.tbs_certificate();
        let cn_oid = const_oid::db::rfc4519::CN;
        let sn_oid = const_oid::db::rfc4519::SERIAL_NUMBER;
        let path = self
            .template
            .render(|f| {
                let f: Vec<&str> = f.iter().map(String::as_str).collect();
                Some(match f.as_slice() {
                    ["PluginName"] => TYPE.to_string(),
                    ["Fingerprint"] => fingerprint.clone(),
                    ["TrustDomain"] => td.to_string(),
                    ["SerialNumberHex"] => serial.clone(),
                    ["SVIDPathTrimmed"] => svid_path_trimmed.clone(),
                    ["Subject", "CommonName"] => name_attr(tbs.subject(), cn_oid),
                    ["Subject", "SerialNumber"] => name_attr(tbs.subject(), sn_oid),
                    ["Issuer", "CommonName"] => name_attr(tbs.issuer(), cn_oid),
                    ["Issuer", "SerialNumber"] => name_attr(tbs.issuer(), sn_oid),
                    ["URISanSelectors", k] => sans.get(*k)?.clone(),
                    _ => return None,
                })
            })
            .map_err(|e| denied(format!("failed to make spiffe id: {e}")))?;
        let agent_id = self
            .trust_domain
            .id_from_path(&format!("/spire/agent{path}"))
            .map_err(|e| denied(format!("failed to make spiffe id: {e}")))?;
        let mut selectors = vec![];
        let cn = name_attr(tbs.subject(), cn_oid);
        if !cn.is_empty() {
            selectors.push(Selector::new(TYPE, format!("subject:cn:{cn}")));
        }
        let mut seen = std::collections::HashSet::new();
        for c in chain_issuers {
            let f = sha1_hex(c);
            if seen.insert(f.clone()) {
                selectors.push(Selector::new(TYPE, format!("ca:fingerprint:{f}")));
            }
        }
        selectors.push(Selector::new(TYPE, format!("serialnumber:{serial}")));
        for (k, v) in &sans {
            selectors.push(Selector::new(TYPE, format!("san:{k}:{v}")));
        }
        Ok(Attested {
            agent_id,
            selectors,
            can_reattest: true,
            tpm_boot: None,
        })
    }
}

impl NodeAttestor for X509Pop {
    fn begin(&self, payload: &[u8], now: u64) -> Result<Step, AttestError> {
        let data =
            AttestationData::decode(payload, self.max_intermediates + 1).map_err(|e| match e {
                kame_api::Error::TooManyCertificates { .. } => {
                    denied("too many intermediate certificates")
                }
                e => bad_input(format!("failed to unmarshal data: {e}")),
            })?;
        let Some((leaf_der, intermediates)) = data.certificates.split_first() else {
            return Err(bad_input("no certificate to attest"));
        };
        let leaf = ParsedCert::parse(leaf_der)
            .map_err(|e| bad_input(format!("unable to parse leaf certificate: {e}")))?;
        let key = key_of(&leaf)
            .map_err(|e| bad_input(format!("unable to parse leaf certificate: {e}")))?;
        if rsa_bits(&key).is_some_and(|b| b > self.max_rsa_key_size) {
            return Err(denied("leaf certificate key size too large"));
        }
        for (i, c) in intermediates.iter().enumerate() {
            let p = ParsedCert::parse(c).map_err(|e| {
                bad_input(format!("unable to parse intermediate certificate {i}: {e}"))
            })?;
            let k = key_of(&p).map_err(|e| {
                bad_input(format!("unable to parse intermediate certificate {i}: {e}"))
            })?;
            if rsa_bits(&k).is_some_and(|b| b > self.max_rsa_key_size) {
                return Err(denied(format!(
                    "intermediate certificate {i} key size too large"
                )));
            }
        }
        let roots = self.roots()?;
        let path = kame_devid::chain::verify_path_limited(
            leaf_der,
            intermediates,
            &roots,
            now,
            self.max_intermediates,
        )
        .map_err(|e| denied(format!("certificate verification failed: {e}")))?;
        match leaf.key_usage() {
            Ok(Some((_, ku))) if ku.digital_signature() => {}
            _ => {
                return Err(denied(
                    "certificate not intended for digital signature use (keyUsage lacks digitalSignature)",
                ));
            }
        }
        let attested = self.identity(leaf_der, &leaf, &path.issuers)?;
        let mut nonce = vec![0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce)
            .map_err(|_| AttestError::Internal("the random number generator failed".into()))?;
        let challenge = match &key {
            KeyInfo::Rsa { .. } => Challenge {
                rsa_nonce: Some(nonce.clone()),
                ecdsa_nonce: None,
            },
            KeyInfo::EcP256(_) | KeyInfo::EcP384(_) => Challenge {
                rsa_nonce: None,
                ecdsa_nonce: Some(nonce.clone()),
            },
        };
        Ok(Step::Challenge {
            challenge: challenge.encode(),
            pending: Box::new(X509PopPending {
                nonce,
                key,
                attested,
            }),
        })
    }

    fn finish(
        &self,
        pending: Pending,
        response: &[u8],
        _now: u64,
    ) -> Result<Attested, AttestError> {
        let p = pending.downcast::<X509PopPending>().map_err(|_| {
            AttestError::Internal("x509pop was handed another attestor's state".into())
        })?;
        let r = Response::decode(response)
            .map_err(|e| bad_input(format!("unable to unmarshal challenge response: {e}")))?;
        let failed = |m: &str| denied(format!("challenge response verification failed: {m}"));
        match (&p.key, &r) {
            (KeyInfo::Rsa { n, e }, Response { rsa: Some(rr), .. }) => {
                let combined =
                    combined_nonce(&p.nonce, &rr.nonce).map_err(|e| failed(&e.to_string()))?;
                if !pss::verify_sha256_any_salt(n, e, &combined, &rr.signature) {
                    return Err(failed("RSA signature verify failed"));
                }
            }
            (KeyInfo::Rsa { .. }, _) => return Err(failed("expecting RSA response")),
            (
                KeyInfo::EcP256(point) | KeyInfo::EcP384(point),
                Response {
                    ecdsa: Some(er), ..
                },
            ) => {
                let combined =
                    combined_nonce(&p.nonce, &er.nonce).map_err(|e| failed(&e.to_string()))?;
                let alg: &'static aws_lc_rs::signature::EcdsaVerificationAlgorithm = match &p.key {
                    KeyInfo::EcP256(_) => &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
                    _ => &aws_lc_rs::signature::ECDSA_P384_SHA256_ASN1,
                };
                if !ecdsa_verify_digest(alg, point, &combined, &er.r, &er.s) {
                    return Err(failed("ECDSA signature verify failed"));
                }
            }
            (_, _) => return Err(failed("expecting ECDSA response")),
        }
        Ok(p.attested)
    }
}

/// Verifies ECDSA (r, s as big-endian integers, Go's `big.Int.Bytes`) over `digest` used as
/// the hash, as Go's `ecdsa.Verify` does.
fn ecdsa_verify_digest(
    alg: &'static aws_lc_rs::signature::EcdsaVerificationAlgorithm,
    point: &[u8],
    digest: &[u8; 32],
    r: &[u8],
    s: &[u8],
) -> bool {
    use der::Encode;
    // Neither integer can be longer than a P-384 scalar: that keeps the DER short-form.
    let int = |v: &[u8]| {
        der::asn1::UintRef::new(v)
            .ok()
            .filter(|u| u.as_bytes().len() <= 48)
            .and_then(|u| u.to_der().ok())
    };
    let (Some(r), Some(s)) = (int(r), int(s)) else {
        return false;
    };
    let body = [r, s].concat();
    let mut sig = vec![0x30, body.len() as u8];
    sig.extend_from_slice(&body);
    let Ok(d) = aws_lc_rs::digest::Digest::import_less_safe(digest, &aws_lc_rs::digest::SHA256)
    else {
        return false;
    };
    aws_lc_rs::signature::UnparsedPublicKey::new(alg, point)
        .verify_digest(&d, &sig)
        .is_ok()
}

/// RSASSA-PSS verification (RFC 8017 §8.1.2, §9.1.2) with SHA-256 and MGF1-SHA-256 over a
/// digest, recovering the salt length from the encoded message as Go's `rsa.VerifyPSS` does
/// with `PSSSaltLengthAuto`: SPIRE's agents sign with the longest salt, other signers with
/// the hash's length; both verify. The RSA operation is on public values only.
mod pss {
    use num_bigint::BigUint;

    const H_LEN: usize = 32;

    fn sha256(parts: &[&[u8]]) -> [u8; H_LEN] {
        let mut c = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        for p in parts {
            c.update(p);
        }
        let mut out = [0u8; H_LEN];
        out.copy_from_slice(c.finish().as_ref());
        out
    }

    /// MGF1 with SHA-256 (RFC 8017 §B.2.1).
    fn mgf1(seed: &[u8], len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + H_LEN);
        let mut counter: u32 = 0;
        while out.len() < len {
            out.extend_from_slice(&sha256(&[seed, &counter.to_be_bytes()]));
            counter += 1;
        }
        out.truncate(len);
        out
    }

    pub fn verify_sha256_any_salt(n: &[u8], e: &[u8], digest: &[u8; 32], sig: &[u8]) -> bool {
        let n = BigUint::from_bytes_be(n);
        let k = n.bits().div_ceil(8) as usize;
        if sig.len() != k || n.bits() < 2 {
            return false;
        }
        let s = BigUint::from_bytes_be(sig);
        if s >= n {
            return false;
        }
        let m = s.modpow(&BigUint::from_bytes_be(e), &n);
        let em_bits = n.bits() as usize - 1;
        let em_len = em_bits.div_ceil(8);
        let m = m.to_bytes_be();
        if m.len() > em_len || em_len < H_LEN + 2 {
            return false;
        }
        let mut em = vec![0u8; em_len - m.len()];
        em.extend_from_slice(&m);
        if em[em_len - 1] != 0xbc {
            return false;
        }
        let db_len = em_len - H_LEN - 1;
        let (masked_db, h) = (&em[..db_len], &em[db_len..em_len - 1]);
        let unused = 8 * em_len - em_bits;
        let top_mask = 0xffu8.checked_shr(unused as u32).unwrap_or(0);
        if masked_db[0] & !top_mask != 0 {
            return false;
        }
        let mut db: Vec<u8> = masked_db
            .iter()
            .zip(mgf1(h, db_len))
            .map(|(a, b)| a ^ b)
            .collect();
        db[0] &= top_mask;
        // DB = PS (zeros) || 0x01 || salt: the salt is what follows the first non-zero byte.
        let Some(sep) = db.iter().position(|b| *b != 0) else {
            return false;
        };
        if db[sep] != 0x01 {
            return false;
        }
        let salt = &db[sep + 1..];
        sha256(&[&[0u8; 8], digest, salt]).as_slice() == h
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use aws_lc_rs::signature::{
            KeyPair, RSA_PSS_SHA256, RsaKeyPair, RsaPssSaltLength, RsaSignatureEncoding,
        };

        fn digest() -> [u8; 32] {
            sha256(&[b"combined nonce"])
        }

        fn nbytes(k: &RsaKeyPair) -> (Vec<u8>, Vec<u8>) {
            let spki = {
                use aws_lc_rs::encoding::AsDer;
                k.public_key().as_der().unwrap().as_ref().to_vec()
            };
            match kame_api::keys::KeyInfo::from_spki_der(&spki).unwrap() {
                kame_api::keys::KeyInfo::Rsa { n, e } => (n, e),
                _ => unreachable!(),
            }
        }

        /// Signatures with the longest salt (Go's agents), the hash-length salt and no salt
        /// all verify; a changed bit, digest or salt never does.
        #[test]
        fn x509pop_rsa_pss_verifies_any_salt_length_and_nothing_else() {
            for bits in [
                aws_lc_rs::rsa::KeySize::Rsa2048,
                aws_lc_rs::rsa::KeySize::Rsa3072,
            ] {
                let k = RsaKeyPair::generate(bits).unwrap();
                let (n, e) = nbytes(&k);
                let d = aws_lc_rs::digest::Digest::import_less_safe(
                    &digest(),
                    &aws_lc_rs::digest::SHA256,
                )
                .unwrap();
                static MAX: RsaSignatureEncoding =
                    RSA_PSS_SHA256.with_pss_salt_length(RsaPssSaltLength::Max);
                static HASH: RsaSignatureEncoding =
                    RSA_PSS_SHA256.with_pss_salt_length(RsaPssSaltLength::Digest);
                static NONE: RsaSignatureEncoding =
                    RSA_PSS_SHA256.with_pss_salt_length(RsaPssSaltLength::Custom(0));
                static SEVEN: RsaSignatureEncoding =
                    RSA_PSS_SHA256.with_pss_salt_length(RsaPssSaltLength::Custom(7));
                for (name, salt) in [
                    ("max", &MAX),
                    ("hash", &HASH),
                    ("none", &NONE),
                    ("7", &SEVEN),
                ] {
                    let mut sig = vec![0u8; k.public_modulus_len()];
                    k.sign_digest(salt, &d, &mut sig).unwrap();
                    assert!(verify_sha256_any_salt(&n, &e, &digest(), &sig), "{name}");
                    let mut bad = sig.clone();
                    bad[40] ^= 1;
                    assert!(!verify_sha256_any_salt(&n, &e, &digest(), &bad));
                    assert!(!verify_sha256_any_salt(&n, &e, &sha256(&[b"other"]), &sig));
                    assert!(!verify_sha256_any_salt(&n, &e, &digest(), &sig[1..]));
                }
            }
        }
    }
}
