//! Envoy's Secret Discovery Service v3 on the Workload API socket (SPIRE's `sdsv3` handler):
//! `StreamSecrets` and `FetchSecrets` give the calling workload its SVIDs as `TlsCertificate`
//! secrets and its trust domains' bundles as validation contexts; `DeltaSecrets` is
//! Unimplemented, as in SPIRE. Resource names: a SPIFFE ID (that identity), `default_svid_name`
//! (the first identity), a trust domain ID `spiffe://<td>` (its bundle), `default_bundle_name`
//! (the agent's own trust domain), `default_all_bundles_name` (every trust domain in one SPIFFE
//! validator config); no names: everything. Validation contexts use Envoy's SPIFFE certificate
//! validator unless disabled (configuration, or the node metadata key
//! `disable_spiffe_cert_validation`) or the Envoy is 1.17 or older; then `trusted_ca`.
//!
//! The stream follows the xDS protocol: a decimal version that grows with every update of the
//! workload's view, a fresh nonce per response; a request whose nonce is not the last one sent
//! is stale and ignored, a NACK is logged, and a response is sent when the requested names
//! change or the view does. Callers are identified from kernel facts like Workload API
//! callers (no security header), and a caller no entry matches gets PermissionDenied — where
//! SPIRE would still hand it the trust bundle. It holds no state beyond each stream.

use crate::manager::{Identity, WorkloadView, bundle_roots, entry_spiffe_id};
use crate::workload::WorkloadApi;
use envoy_types::pb::envoy::config::core::v3::{
    DataSource, Node, TypedExtensionConfig, data_source::Specifier, node::UserAgentVersionType,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate, secret,
    spiffe_cert_validator_config::TrustDomain as SpiffeTd,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService;
use envoy_types::pb::google::protobuf::Any;
use kame_api::pb::types;
use prost::{Message, Name};
use std::collections::BTreeSet;
use std::pin::Pin;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

/// The name of Envoy's SPIFFE certificate validator.
pub const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";

/// The node metadata key that overrides `disable_spiffe_cert_validation` per Envoy.
pub const DISABLE_KEY: &str = "disable_spiffe_cert_validation";

/// `agent.sds` (SPIRE's keys and defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdsConfig {
    pub default_svid_name: String,
    pub default_bundle_name: String,
    pub default_all_bundles_name: String,
    pub disable_spiffe_cert_validation: bool,
}

impl Default for SdsConfig {
    fn default() -> Self {
        SdsConfig {
            default_svid_name: "default".into(),
            default_bundle_name: "ROOTCA".into(),
            default_all_bundles_name: "ALL".into(),
            disable_spiffe_cert_validation: false,
        }
    }
}

/// The SDS service.
#[derive(Debug, Clone)]
pub struct Sds {
    api: WorkloadApi,
    cfg: SdsConfig,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

fn inline(bytes: Vec<u8>) -> Option<DataSource> {
    Some(DataSource {
        watched_directory: None,
        specifier: Some(Specifier::InlineBytes(bytes)),
    })
}

fn pem_certs(ders: &[Vec<u8>]) -> Vec<u8> {
    ders.iter()
        .map(|d| kame_api::bundle::pem_block("CERTIFICATE", d))
        .collect::<String>()
        .into_bytes()
}

fn tls_certificate(i: &Identity, name: &str) -> Any {
    any(&Secret {
        name: name.to_string(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(pem_certs(&i.svid.chain)),
            private_key: inline(
                kame_api::bundle::pem_block("PRIVATE KEY", &i.svid.key_pkcs8).into_bytes(),
            ),
            ..Default::default()
        })),
    })
}

fn validation_context(name: &str, ctx: CertificateValidationContext) -> Any {
    any(&Secret {
        name: name.to_string(),
        r#type: Some(secret::Type::ValidationContext(ctx)),
    })
}

fn spiffe_validator(tds: Vec<SpiffeTd>) -> CertificateValidationContext {
    CertificateValidationContext {
        custom_validator_config: Some(TypedExtensionConfig {
            name: SPIFFE_VALIDATOR.into(),
            typed_config: Some(any(&SpiffeCertValidatorConfig {
                trust_domains: tds,
                trust_bundles: None,
            })),
        }),
        ..Default::default()
    }
}

fn spiffe_td(b: &types::Bundle) -> SpiffeTd {
    SpiffeTd {
        name: b.trust_domain.clone(),
        trust_bundle: inline(pem_certs(&bundle_roots(b))),
        workload_trust_domain: String::new(),
    }
}

/// Whether the Envoy asked for (or supports) the SPIFFE validator.
fn spiffe_mode(cfg: &SdsConfig, node: Option<&Node>) -> bool {
    let mut disabled = cfg.disable_spiffe_cert_validation;
    if let Some(v) = node
        .and_then(|n| n.metadata.as_ref())
        .and_then(|m| m.fields.get(DISABLE_KEY))
    {
        use envoy_types::pb::google::protobuf::value::Kind;
        match &v.kind {
            Some(Kind::BoolValue(b)) => disabled = *b,
            Some(Kind::StringValue(s)) => {
                if let Ok(b) = s.parse::<bool>() {
                    disabled = b;
                }
            }
            _ => {}
        }
    }
    let supported = match node.and_then(|n| n.user_agent_version_type.as_ref()) {
        Some(UserAgentVersionType::UserAgentBuildVersion(b)) => b
            .version
            .as_ref()
            .is_none_or(|v| (v.major_number == 1 && v.minor_number > 17) || v.major_number > 1),
        _ => true,
    };
    !disabled && supported
}

impl Sds {
    pub fn new(api: WorkloadApi, cfg: SdsConfig) -> Self {
        Sds { api, cfg }
    }

    /// The response for `req` from `view` (SPIRE's `buildResponse`); `version` empty for
    /// FetchSecrets (then no nonce either).
    pub fn build(
        &self,
        version: &str,
        req: &DiscoveryRequest,
        node: Option<&Node>,
        view: &WorkloadView,
    ) -> Result<DiscoveryResponse, Status> {
        let mut names: BTreeSet<String> = req
            .resource_names
            .iter()
            .filter(|n| !n.is_empty())
            .cloned()
            .collect();
        let all = names.is_empty();
        let spiffe = spiffe_mode(&self.cfg, node);
        let one = |name: &str, b: &types::Bundle| {
            if spiffe {
                validation_context(name, spiffe_validator(vec![spiffe_td(b)]))
            } else {
                validation_context(
                    name,
                    CertificateValidationContext {
                        trusted_ca: inline(pem_certs(&bundle_roots(b))),
                        ..Default::default()
                    },
                )
            }
        };
        let mut resources = vec![];
        if let Some(b) = &view.bundle {
            let id = format!("spiffe://{}", b.trust_domain);
            if all || names.contains(&id) {
                resources.push(one(&id, b));
                names.remove(&id);
            } else if names.contains(&self.cfg.default_bundle_name) {
                resources.push(one(&self.cfg.default_bundle_name, b));
                names.remove(&self.cfg.default_bundle_name);
            } else if names.contains(&self.cfg.default_all_bundles_name) {
                if !spiffe {
                    return Err(Status::internal(
                        "unable to use \"SPIFFE validator\" on Envoy below 1.17",
                    ));
                }
                let mut tds: Vec<SpiffeTd> = std::iter::once(b)
                    .chain(view.federated.values())
                    .map(spiffe_td)
                    .collect();
                tds.sort_by(|x, y| x.name.cmp(&y.name));
                resources.push(validation_context(
                    &self.cfg.default_all_bundles_name,
                    spiffe_validator(tds),
                ));
                names.remove(&self.cfg.default_all_bundles_name);
            }
        }
        for (td, b) in &view.federated {
            let id = format!("spiffe://{td}");
            if all || names.contains(&id) {
                resources.push(one(&id, b));
                names.remove(&id);
            }
        }
        for (i, identity) in view.identities.iter().enumerate() {
            let id = entry_spiffe_id(&identity.entry);
            if all || names.contains(&id) {
                resources.push(tls_certificate(identity, &id));
                names.remove(&id);
            } else if i == 0 && names.contains(&self.cfg.default_svid_name) {
                resources.push(tls_certificate(identity, &self.cfg.default_svid_name));
                names.remove(&self.cfg.default_svid_name);
            }
        }
        if !names.is_empty() {
            return Err(Status::invalid_argument(format!(
                "workload is not authorized for the requested identities {:?}",
                names.into_iter().collect::<Vec<_>>()
            )));
        }
        let nonce = if version.is_empty() {
            String::new()
        } else {
            let mut b = [0u8; 4];
            aws_lc_rs::rand::fill(&mut b).map_err(|_| Status::internal("no randomness"))?;
            hex::encode(b)
        };
        Ok(DiscoveryResponse {
            version_info: version.to_string(),
            resources,
            type_url: req.type_url.clone(),
            nonce,
            ..Default::default()
        })
    }

    /// The view with only unexpired SVIDs; PermissionDenied when no entry matches.
    fn current(&self, selectors: &[types::Selector]) -> Result<WorkloadView, Status> {
        let mut v = self.api.manager().view(selectors);
        if v.matched == 0 {
            return Err(Status::permission_denied("no identity issued"));
        }
        let now = crate::manager::now_secs();
        v.identities.retain(|i| i.svid.not_after > now);
        Ok(v)
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type DeltaSecretsStream = BoxStream<DeltaDiscoveryResponse>;
    type StreamSecretsStream = BoxStream<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        _req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented("Method is not implemented"))
    }

    async fn fetch_secrets(
        &self,
        req: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let selectors = self.api.selectors(&req).await?;
        let view = self.current(&selectors)?;
        let r = req.get_ref();
        Ok(Response::new(self.build("", r, r.node.as_ref(), &view)?))
    }

    async fn stream_secrets(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let selectors = self.api.selectors(&req).await?;
        self.current(&selectors)?;
        let mut incoming = req.into_inner();
        let me = self.clone();
        let mut changes = self.api.manager().subscribe();
        let (tx, out) = tokio::sync::mpsc::channel::<Result<DiscoveryResponse, Status>>(4);
        tokio::spawn(async move {
            let mut version: u64 = 0;
            let mut last_nonce = String::new();
            let mut last_node: Option<Node> = None;
            let mut last_req: Option<DiscoveryRequest> = None;
            let mut last_view: Option<WorkloadView> = None;
            loop {
                // Names: the requested set changed (or first request): always answer.
                // View: the agent's state changed: answer when this workload's secrets did.
                let names_changed = tokio::select! {
                    r = incoming.message() => match r {
                        Ok(Some(mut r)) => {
                            if let Some(e) = &r.error_detail {
                                tracing::warn!(resources = ?r.resource_names, error = %e.message, "Envoy reported errors applying secrets");
                            }
                            if !last_nonce.is_empty() {
                                if r.response_nonce != last_nonce {
                                    tracing::debug!(nonce = %r.response_nonce, expect = %last_nonce, "stale SDS request ignored");
                                    continue;
                                }
                                if r.version_info != version.to_string() {
                                    tracing::warn!(version = %r.version_info, expect = version, "Envoy rejected the last secrets");
                                }
                            }
                            if r.node.is_none() {
                                r.node = last_node.clone();
                            } else {
                                last_node = r.node.clone();
                            }
                            let changed = last_req.as_ref().is_none_or(|l| {
                                let a: BTreeSet<&String> = l.resource_names.iter().collect();
                                let b: BTreeSet<&String> = r.resource_names.iter().collect();
                                a != b
                            });
                            last_req = Some(r);
                            if !changed {
                                continue;
                            }
                            true
                        }
                        Ok(None) => return,
                        Err(s) => {
                            tracing::debug!(error = %s, "SDS stream ended");
                            return;
                        }
                    },
                    r = changes.changed() => {
                        if r.is_err() {
                            return;
                        }
                        false
                    },
                    _ = tx.closed() => return,
                };
                let Some(req) = &last_req else { continue };
                let view = match me.current(&selectors) {
                    Ok(v) => v,
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                };
                if !names_changed && last_view.as_ref().is_some_and(|v| same_view(v, &view)) {
                    continue;
                }
                version += 1;
                match me.build(&version.to_string(), req, req.node.as_ref(), &view) {
                    Ok(resp) => {
                        last_nonce = resp.nonce.clone();
                        last_view = Some(view);
                        if tx.send(Ok(resp)).await.is_err() {
                            return;
                        }
                    }
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }
}

/// Whether two views give a workload the same secrets.
fn same_view(a: &WorkloadView, b: &WorkloadView) -> bool {
    let ids = |v: &WorkloadView| -> Vec<(String, Vec<Vec<u8>>)> {
        v.identities
            .iter()
            .map(|i| (entry_spiffe_id(&i.entry), i.svid.chain.clone()))
            .collect()
    };
    let bundles = |v: &WorkloadView| -> Vec<(String, Vec<Vec<u8>>)> {
        v.bundle
            .iter()
            .chain(v.federated.values())
            .map(|b| (b.trust_domain.clone(), bundle_roots(b)))
            .collect()
    };
    ids(a) == ids(b) && bundles(a) == bundles(b)
}
