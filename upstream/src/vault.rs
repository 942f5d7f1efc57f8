//! The `vault` UpstreamAuthority (SPIRE's): Vault's or OpenBao's PKI engine signs the server
//! CA's CSR at `<pki_mount_point>/root/sign-intermediate`. It sends what SPIRE sends (the CSR,
//! its common name, organization, country and URI SANs, the preferred TTL) and takes the
//! issuing CA's root: the last certificate of `ca_chain`, or `issuing_ca` when Vault is the
//! root. The Vault session (login, renewal, re-login) is the server's shared one, opened at the
//! first CSR as SPIRE does. It checks the CSR before sending it (SPIRE's rules: one URI SAN,
//! the trust domain ID) and the shape of Vault's answer; the CA checks the chain itself. It
//! does not publish JWT keys (SPIRE's `vault` does not) and keeps nothing on disk.

use crate::mint::check_csr;
use crate::{MintedX509Ca, Updates, UpstreamAuthority, UpstreamError, no_updates};
use der::{Decode, Tag, Tagged};
use kame_api::TrustDomain;
use kame_keymanager::hashicorp_vault::{VaultConnection, VaultSession, VaultSessions};
use std::sync::Arc;
use std::time::Duration;

pub const TYPE: &str = "vault";

/// SPIRE's keys (the connection and auth keys are the KeyManager's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultPkiConfig {
    pub connection: VaultConnection,
    /// Where the PKI engine is mounted (`pki`).
    pub pki_mount_point: String,
}

/// Signs the server CA with a Vault PKI engine.
#[derive(Debug)]
pub struct VaultUpstream {
    cfg: VaultPkiConfig,
    trust_domain: TrustDomain,
    sessions: VaultSessions,
    /// Logged in at the first CSR.
    session: tokio::sync::Mutex<Option<Arc<VaultSession>>>,
}

impl VaultUpstream {
    /// Nothing is contacted until the first CSR.
    pub fn new(cfg: VaultPkiConfig, trust_domain: TrustDomain, sessions: VaultSessions) -> Self {
        VaultUpstream {
            cfg,
            trust_domain,
            sessions,
            session: tokio::sync::Mutex::new(None),
        }
    }

    async fn session(&self) -> Result<Arc<VaultSession>, UpstreamError> {
        let mut s = self.session.lock().await;
        if let Some(s) = s.as_ref() {
            return Ok(s.clone());
        }
        let opened = self
            .sessions
            .get_or_open(&self.cfg.connection)
            .await
            .map_err(km_err)?;
        *s = Some(opened.clone());
        Ok(opened)
    }
}

fn km_err(e: kame_keymanager::Error) -> UpstreamError {
    use kame_keymanager::Error as E;
    match e {
        E::Unavailable(m) => UpstreamError::Unavailable(m),
        E::Backend(m) | E::Config(m) => UpstreamError::Refused(m),
        e => UpstreamError::Refused(e.to_string()),
    }
}

/// The values of the CN, O and C attributes of a DER Name, in order.
fn subject_fields(subject_der: &[u8]) -> Result<(String, Vec<String>, Vec<String>), UpstreamError> {
    const CN: &str = "2.5.4.3";
    const O: &str = "2.5.4.10";
    const C: &str = "2.5.4.6";
    let name = x509_cert::name::Name::from_der(subject_der)
        .map_err(|e| UpstreamError::BadCsr(crate::mint::CsrError::Subject(e)))?;
    let (mut cn, mut o, mut c) = (String::new(), vec![], vec![]);
    for atv in name.iter() {
        let text = match atv.value.tag() {
            Tag::Utf8String | Tag::PrintableString | Tag::Ia5String | Tag::TeletexString => {
                String::from_utf8_lossy(atv.value.value()).to_string()
            }
            _ => continue,
        };
        match atv.oid.to_string().as_str() {
            CN => cn = text,
            O => o.push(text),
            C => c.push(text),
            _ => {}
        }
    }
    Ok((cn, o, c))
}

/// The DER of a PEM certificate in Vault's answer.
fn cert_der(field: &str, pem: &str) -> Result<Vec<u8>, UpstreamError> {
    let certs = kame_api::bundle::certs_from_pem(pem)
        .map_err(|e| UpstreamError::BadAnswer(format!("{field}: {e}")))?;
    match certs.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(UpstreamError::BadAnswer(format!(
            "{field}: expected one certificate, found {}",
            certs.len()
        ))),
    }
}

/// The new CA's chain and the root, from `sign-intermediate`'s `data` (SPIRE's reading).
pub fn read_answer(data: &serde_json::Value) -> Result<MintedX509Ca, UpstreamError> {
    let text = |k: &str| -> Result<&str, UpstreamError> {
        data.get(k).and_then(|v| v.as_str()).ok_or_else(|| {
            UpstreamError::BadAnswer(format!(
                "request is successful, but {k} data is empty or not a string"
            ))
        })
    };
    let minted = cert_der("certificate", text("certificate")?)?;
    let issuing = cert_der("issuing_ca", text("issuing_ca")?)?;
    let ca_chain: Vec<Vec<u8>> = match data.get("ca_chain") {
        None | Some(serde_json::Value::Null) => vec![],
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| {
                        UpstreamError::BadAnswer("ca_chain holds a non-string element".into())
                    })
                    .and_then(|pem| cert_der("ca_chain", pem))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(UpstreamError::BadAnswer("ca_chain is not a list".into())),
    };
    let root = ca_chain.last().cloned().unwrap_or(issuing);
    let mut chain = vec![minted.clone()];
    // Vault ≥ 1.11 lists the signed certificate itself in ca_chain.
    chain.extend(ca_chain.into_iter().filter(|c| *c != root && *c != minted));
    Ok(MintedX509Ca {
        chain,
        upstream_roots: vec![root],
    })
}

#[async_trait::async_trait]
impl UpstreamAuthority for VaultUpstream {
    async fn mint_x509_ca(
        &self,
        csr: &[u8],
        preferred_ttl: Duration,
    ) -> Result<(MintedX509Ca, Updates<Vec<Vec<u8>>>), UpstreamError> {
        let parsed = check_csr(csr, &self.trust_domain)?;
        let (cn, o, c) = subject_fields(&parsed.subject_der)?;
        let ttl = match preferred_ttl.as_secs() {
            0 => String::new(),
            s => s.to_string(),
        };
        let body = serde_json::json!({
            "csr": kame_api::bundle::pem_block("CERTIFICATE REQUEST", csr),
            "common_name": cn,
            "organization": o.join(","),
            "country": c.join(","),
            "uri_sans": parsed.uris.join(","),
            "ttl": ttl,
        });
        let session = self.session().await?;
        let mount = self.cfg.pki_mount_point.trim_matches('/');
        let answer = session
            .post(format!("{mount}/root/sign-intermediate"), body)
            .await
            .map_err(km_err)?;
        let data = answer
            .get("data")
            .ok_or_else(|| UpstreamError::BadAnswer("Vault's answer has no data".into()))?;
        Ok((read_answer(data)?, no_updates()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vault_answer_root_is_the_last_of_ca_chain_and_the_chain_drops_it_and_the_cert() {
        let pem = |d: &[u8]| kame_api::bundle::pem_block("CERTIFICATE", d);
        let c = crate::testutil::cas(3);
        let (leaf, mid, root) = (c[0].clone(), c[1].clone(), c[2].clone());
        // Vault ≥ 1.11: ca_chain lists the signed certificate, the issuer and the root.
        let data = serde_json::json!({
            "certificate": pem(&leaf),
            "issuing_ca": pem(&mid),
            "ca_chain": [pem(&leaf), pem(&mid), pem(&root)],
        });
        let m = read_answer(&data).unwrap();
        assert_eq!(m.chain, vec![leaf.clone(), mid.clone()]);
        assert_eq!(m.upstream_roots, vec![root]);
        // Vault as the root, no ca_chain: issuing_ca is the root.
        let data = serde_json::json!({"certificate": pem(&leaf), "issuing_ca": pem(&mid)});
        let m = read_answer(&data).unwrap();
        assert_eq!(m.chain, vec![leaf.clone()]);
        assert_eq!(m.upstream_roots, vec![mid.clone()]);
        let two = [pem(&leaf), pem(&mid)].concat();
        for (bad, why) in [
            (
                serde_json::json!({"issuing_ca": pem(&mid)}),
                "certificate data is empty",
            ),
            (
                serde_json::json!({"certificate": pem(&leaf)}),
                "issuing_ca data is empty",
            ),
            (
                serde_json::json!({"certificate": 3, "issuing_ca": pem(&mid)}),
                "certificate data is empty or not a string",
            ),
            (
                serde_json::json!({"certificate": pem(&leaf), "issuing_ca": pem(&mid), "ca_chain": "x"}),
                "ca_chain is not a list",
            ),
            (
                serde_json::json!({"certificate": pem(&leaf), "issuing_ca": pem(&mid), "ca_chain": [1]}),
                "non-string element",
            ),
            (
                serde_json::json!({"certificate": "not pem", "issuing_ca": pem(&mid)}),
                "certificate:",
            ),
            (
                serde_json::json!({"certificate": two, "issuing_ca": pem(&mid)}),
                "expected one certificate, found 2",
            ),
        ] {
            match read_answer(&bad) {
                Err(UpstreamError::BadAnswer(m)) => assert!(m.contains(why), "{bad}: {m}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
