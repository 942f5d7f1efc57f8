//! The `aws_pca` UpstreamAuthority (SPIRE's): AWS Private CA signs the server CA's CSR. At the
//! first CSR it describes the CA (warning when it is not ACTIVE; its signing algorithm is the
//! default), then for each CSR calls `IssueCertificate` (the CSR in PEM, the CA signing
//! template, by default SPIRE's `SubordinateCACertificate_PathLen0/V1`, an absolute validity of
//! now + the preferred TTL) and polls `GetCertificate` until the certificate is issued (at most
//! three minutes, as SPIRE's waiter). The root is the last certificate of the returned chain,
//! joined by the supplemental bundle's certificates; the rest of the chain follows the new CA.
//! Credentials: the configured static keys (Kame's addition, as for the aws_kms KeyManager) or
//! the default AWS chain, optionally through an assumed role. It keeps nothing on disk and
//! does not publish JWT keys (SPIRE's does not).

use crate::{MintedX509Ca, Updates, UpstreamAuthority, UpstreamError, no_updates};
use aws_sdk_acmpca::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_acmpca::types::{SigningAlgorithm, Validity, ValidityPeriodType};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const TYPE: &str = "aws_pca";

/// SPIRE's default template: the server's CA may only sign end-entity certificates.
pub const DEFAULT_TEMPLATE: &str =
    "arn:aws:acm-pca:::template/SubordinateCACertificate_PathLen0/V1";

/// How long issuance may take before the CSR fails (SPIRE's `maxCertIssuanceWaitDur`).
pub const ISSUANCE_WAIT: Duration = Duration::from_secs(180);

/// SPIRE's keys, plus static credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsPcaConfig {
    pub region: String,
    pub certificate_authority_arn: String,
    pub ca_signing_template_arn: Option<String>,
    pub signing_algorithm: Option<String>,
    pub assume_role_arn: Option<String>,
    pub endpoint: Option<String>,
    /// Certificates (DER) added to the roots, from `supplemental_bundle_path`.
    pub supplemental_roots: Vec<Vec<u8>>,
    pub supplemental_bundle_path: Option<PathBuf>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<kame_api::Secret>,
    /// Each AWS call's deadline.
    pub call_timeout: Duration,
}

/// The client and what the CA's description settled.
#[derive(Debug)]
struct Opened {
    client: aws_sdk_acmpca::Client,
    signing_algorithm: SigningAlgorithm,
    template: String,
}

/// Signs the server CA with AWS Private CA.
#[derive(Debug)]
pub struct AwsPcaUpstream {
    cfg: AwsPcaConfig,
    opened: tokio::sync::OnceCell<Opened>,
}

fn sdk<E>(
    op: &'static str,
) -> impl FnOnce(SdkError<E, aws_sdk_acmpca::config::http::HttpResponse>) -> UpstreamError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    move |e| {
        let text = aws_sdk_acmpca::error::DisplayErrorContext(&e).to_string();
        match &e {
            SdkError::TimeoutError(_)
            | SdkError::DispatchFailure(_)
            | SdkError::ResponseError(_) => {
                UpstreamError::Unavailable(format!("AWS Private CA {op}: {text}"))
            }
            SdkError::ServiceError(s) => {
                let code = s.err().code().unwrap_or("");
                let status = s.raw().status().as_u16();
                let m = format!(
                    "AWS Private CA {op}: HTTP {status} {code}: {}",
                    s.err().message().unwrap_or("")
                );
                if status >= 500 || status == 429 || code.contains("Throttl") {
                    UpstreamError::Unavailable(m)
                } else {
                    UpstreamError::Refused(m)
                }
            }
            _ => UpstreamError::Refused(format!("AWS Private CA {op}: {text}")),
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `cert` then the chain without its last certificate; the roots are that last certificate
/// and the supplemental ones, without duplicates (SPIRE's reading of `GetCertificate`).
pub fn read_issued(
    cert_pem: &str,
    chain_pem: &str,
    supplemental: &[Vec<u8>],
) -> Result<MintedX509Ca, UpstreamError> {
    let bad = |w: &str, e: kame_api::Error| UpstreamError::BadAnswer(format!("{w}: {e}"));
    if cert_pem.trim().is_empty() {
        return Err(UpstreamError::BadAnswer(
            "expected one certificate, found 0".into(),
        ));
    }
    let cert = kame_api::bundle::certs_from_pem(cert_pem).map_err(|e| bad("certificate", e))?;
    let [cert] = cert.as_slice() else {
        return Err(UpstreamError::BadAnswer(format!(
            "expected one certificate, found {}",
            cert.len()
        )));
    };
    if chain_pem.trim().is_empty() {
        return Err(UpstreamError::BadAnswer(
            "GetCertificate returned no certificate chain".into(),
        ));
    }
    let mut chain =
        kame_api::bundle::certs_from_pem(chain_pem).map_err(|e| bad("certificate chain", e))?;
    let root = chain.pop().ok_or_else(|| {
        UpstreamError::BadAnswer("GetCertificate returned no certificate chain".into())
    })?;
    let mut roots = vec![root];
    for s in supplemental {
        if !roots.contains(s) {
            roots.push(s.clone());
        }
    }
    let mut out = vec![cert.clone()];
    out.extend(chain);
    Ok(MintedX509Ca {
        chain: out,
        upstream_roots: roots,
    })
}

impl AwsPcaUpstream {
    /// Nothing is contacted until the first CSR.
    pub fn new(cfg: AwsPcaConfig) -> Self {
        AwsPcaUpstream {
            cfg,
            opened: tokio::sync::OnceCell::new(),
        }
    }

    async fn open(&self) -> Result<&Opened, UpstreamError> {
        self.opened.get_or_try_init(|| self.describe()).await
    }

    async fn describe(&self) -> Result<Opened, UpstreamError> {
        let cfg = &self.cfg;
        let mut shared =
            kame_keymanager::aws_sdk::sdk_config(&kame_keymanager::aws_sdk::AwsSettings {
                region: &cfg.region,
                static_credentials: cfg
                    .access_key_id
                    .as_deref()
                    .zip(cfg.secret_access_key.as_ref().map(|s| s.expose())),
                endpoint: cfg.endpoint.as_deref(),
                call_timeout: cfg.call_timeout,
            })
            .await;
        if let Some(role) = &cfg.assume_role_arn {
            let provider = aws_config::sts::AssumeRoleProvider::builder(role.clone())
                .session_name("kame-server")
                .configure(&shared)
                .build()
                .await;
            shared = shared
                .into_builder()
                .credentials_provider(aws_sdk_acmpca::config::SharedCredentialsProvider::new(
                    provider,
                ))
                .build();
        }
        let client = aws_sdk_acmpca::Client::new(&shared);
        let d = client
            .describe_certificate_authority()
            .certificate_authority_arn(&cfg.certificate_authority_arn)
            .send()
            .await
            .map_err(sdk("DescribeCertificateAuthority"))?;
        let ca = d.certificate_authority();
        let status = ca.and_then(|c| c.status()).map(|s| s.as_str().to_string());
        if status.as_deref() != Some("ACTIVE") {
            tracing::warn!(
                certificate_authority_arn = %cfg.certificate_authority_arn,
                status = %status.unwrap_or_default(),
                "the certificate authority is in an invalid state for issuance"
            );
        }
        let signing_algorithm = match &cfg.signing_algorithm {
            Some(a) => SigningAlgorithm::from(a.as_str()),
            None => ca
                .and_then(|c| c.certificate_authority_configuration())
                .map(|c| c.signing_algorithm().clone())
                .ok_or_else(|| {
                    UpstreamError::BadAnswer(
                        "DescribeCertificateAuthority: no signing algorithm".into(),
                    )
                })?,
        };
        Ok(Opened {
            client,
            signing_algorithm,
            template: cfg
                .ca_signing_template_arn
                .clone()
                .unwrap_or_else(|| DEFAULT_TEMPLATE.to_string()),
        })
    }
}

#[async_trait::async_trait]
impl UpstreamAuthority for AwsPcaUpstream {
    async fn mint_x509_ca(
        &self,
        csr: &[u8],
        preferred_ttl: Duration,
    ) -> Result<(MintedX509Ca, Updates<Vec<Vec<u8>>>), UpstreamError> {
        // The CSR is the server's own; Private CA checks it against its template.
        kame_api::csr::parse(csr)
            .map_err(|e| UpstreamError::BadCsr(crate::mint::CsrError::Parse(e)))?;
        let o = self.open().await?;
        let pem = kame_api::bundle::pem_block("CERTIFICATE REQUEST", csr);
        let not_after = now_secs().saturating_add(preferred_ttl.as_secs());
        let issued = o
            .client
            .issue_certificate()
            .certificate_authority_arn(&self.cfg.certificate_authority_arn)
            .csr(aws_sdk_acmpca::primitives::Blob::new(pem.into_bytes()))
            .signing_algorithm(o.signing_algorithm.clone())
            .template_arn(&o.template)
            .validity(
                Validity::builder()
                    .r#type(ValidityPeriodType::Absolute)
                    .value(i64::try_from(not_after).unwrap_or(i64::MAX))
                    .build()
                    .map_err(|e| UpstreamError::Refused(e.to_string()))?,
            )
            .send()
            .await
            .map_err(sdk("IssueCertificate"))?;
        let arn = issued
            .certificate_arn()
            .ok_or_else(|| UpstreamError::BadAnswer("IssueCertificate: no certificate ARN".into()))?
            .to_string();
        tracing::info!(certificate_arn = %arn, "waiting for issuance from AWS Private CA");
        let deadline = tokio::time::Instant::now() + ISSUANCE_WAIT;
        let mut pause = Duration::from_millis(250);
        loop {
            let r = o
                .client
                .get_certificate()
                .certificate_authority_arn(&self.cfg.certificate_authority_arn)
                .certificate_arn(&arn)
                .send()
                .await;
            match r {
                Ok(got) => {
                    return Ok((
                        read_issued(
                            got.certificate().unwrap_or_default(),
                            got.certificate_chain().unwrap_or_default(),
                            &self.cfg.supplemental_roots,
                        )?,
                        no_updates(),
                    ));
                }
                Err(SdkError::ServiceError(s))
                    if s.err().code() == Some("RequestInProgressException") =>
                {
                    if tokio::time::Instant::now() + pause > deadline {
                        return Err(UpstreamError::Unavailable(format!(
                            "AWS Private CA did not issue {arn} within {ISSUANCE_WAIT:?}"
                        )));
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(sdk("GetCertificate")(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aws_pca_root_is_the_last_of_the_chain_joined_by_the_supplemental_bundle() {
        let pem = |d: &[u8]| kame_api::bundle::pem_block("CERTIFICATE", d);
        let c = crate::testutil::cas(4);
        let chain = [pem(&c[1]), pem(&c[2])].concat();
        let m = read_issued(&pem(&c[0]), &chain, &[c[2].clone(), c[3].clone()]).unwrap();
        assert_eq!(m.chain, vec![c[0].clone(), c[1].clone()]);
        assert_eq!(
            m.upstream_roots,
            vec![c[2].clone(), c[3].clone()],
            "deduplicated"
        );
        for (cert, chain, why) in [
            (pem(&c[0]), String::new(), "no certificate chain"),
            (
                String::new(),
                pem(&c[1]),
                "expected one certificate, found 0",
            ),
            ("junk".to_string(), pem(&c[1]), "certificate:"),
        ] {
            match read_issued(&cert, &chain, &[]) {
                Err(UpstreamError::BadAnswer(m)) => assert!(m.contains(why), "{m}"),
                other => panic!("{why}: {other:?}"),
            }
        }
    }
}
