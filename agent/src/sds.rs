//! Envoy's Secret Discovery Service v3 on the Workload API socket (SPIRE's `sdsv3` handler):
//! `StreamSecrets`, `DeltaSecrets` and `FetchSecrets` give the calling workload its SVIDs as
//! `TlsCertificate` secrets and its trust domains' bundles as validation contexts (SPIRE leaves
//! `DeltaSecrets` Unimplemented; Kame follows xDS's incremental protocol). Resource names: a SPIFFE ID (that identity), `default_svid_name`
//! (the first identity), a trust domain ID `spiffe://<td>` (its bundle), `default_bundle_name`
//! (the agent's own trust domain), `default_all_bundles_name` (every trust domain in one SPIFFE
//! validator config); no names: everything. Validation contexts use Envoy's SPIFFE certificate
//! validator unless disabled (configuration, or the node metadata key
//! `disable_spiffe_cert_validation`) or the Envoy is 1.17 or older; then `trusted_ca`.
//!
//! The stream follows the xDS protocol: a decimal version that grows with every update of the
//! workload's view, a fresh nonce per response; a request whose nonce is not the last one sent
//! is stale and ignored, a NACK is logged, and a response is sent when the requested names
//! change or the view does. The incremental stream versions each resource by a digest of its
//! content, sends only what the client does not hold (`initial_resource_versions` on a
//! reconnect), names in `removed_resources` what is gone or was asked for and does not exist,
//! and takes at most [`MAX_SUBSCRIBED`] names. Callers are identified from kernel facts like Workload API
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
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
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

/// Names one `DeltaSecrets` stream may subscribe to.
pub const MAX_SUBSCRIBED: usize = 1024;

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

/// Secrets with their names, in SPIRE's order.
type Named = Vec<(String, Any)>;

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
        let names: BTreeSet<String> = req
            .resource_names
            .iter()
            .filter(|n| !n.is_empty())
            .cloned()
            .collect();
        let (resources, missing) = self.resources(names, node, view)?;
        if !missing.is_empty() {
            return Err(Status::invalid_argument(format!(
                "workload is not authorized for the requested identities {:?}",
                missing.into_iter().collect::<Vec<_>>()
            )));
        }
        Ok(DiscoveryResponse {
            version_info: version.to_string(),
            resources: resources.into_iter().map(|(_, a)| a).collect(),
            type_url: req.type_url.clone(),
            nonce: if version.is_empty() {
                String::new()
            } else {
                nonce()?
            },
            ..Default::default()
        })
    }

    /// The secrets `names` asks for (none: everything) as (name, resource), in SPIRE's
    /// order, and the names the workload has nothing for.
    fn resources(
        &self,
        mut names: BTreeSet<String>,
        node: Option<&Node>,
        view: &WorkloadView,
    ) -> Result<(Named, BTreeSet<String>), Status> {
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
                resources.push((id.clone(), one(&id, b)));
                names.remove(&id);
            } else if names.contains(&self.cfg.default_bundle_name) {
                let n = self.cfg.default_bundle_name.clone();
                resources.push((n.clone(), one(&n, b)));
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
                resources.push((
                    self.cfg.default_all_bundles_name.clone(),
                    validation_context(&self.cfg.default_all_bundles_name, spiffe_validator(tds)),
                ));
                names.remove(&self.cfg.default_all_bundles_name);
            }
        }
        for (td, b) in &view.federated {
            let id = format!("spiffe://{td}");
            if all || names.contains(&id) {
                resources.push((id.clone(), one(&id, b)));
                names.remove(&id);
            }
        }
        for (i, identity) in view.identities.iter().enumerate() {
            let id = entry_spiffe_id(&identity.entry);
            if all || names.contains(&id) {
                resources.push((id.clone(), tls_certificate(identity, &id)));
                names.remove(&id);
            } else if i == 0 && names.contains(&self.cfg.default_svid_name) {
                let n = self.cfg.default_svid_name.clone();
                resources.push((n.clone(), tls_certificate(identity, &n)));
                names.remove(&self.cfg.default_svid_name);
            }
        }
        Ok((resources, names))
    }

    /// The view with only unexpired SVIDs; PermissionDenied when no entry matches.
    fn current(&self, selectors: &[types::Selector]) -> Result<WorkloadView, Status> {
        let mut v = self.api.manager().view_delivering(selectors);
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
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        let selectors = self.api.selectors(&req).await?;
        self.current(&selectors)?;
        let mut incoming = req.into_inner();
        let me = self.clone();
        let mut changes = self.api.manager().subscribe();
        let (tx, out) = tokio::sync::mpsc::channel::<Result<DeltaDiscoveryResponse, Status>>(4);
        tokio::spawn(async move {
            let mut st = DeltaState::default();
            loop {
                tokio::select! {
                    r = incoming.message() => match r {
                        Ok(Some(r)) => {
                            if let Err(s) = st.apply(r) {
                                let _ = tx.send(Err(s)).await;
                                return;
                            }
                        }
                        Ok(None) => return,
                        Err(s) => {
                            tracing::debug!(error = %s, "SDS delta stream ended");
                            return;
                        }
                    },
                    r = changes.changed() => {
                        if r.is_err() {
                            return;
                        }
                    },
                    _ = tx.closed() => return,
                }
                if !st.started {
                    continue;
                }
                let answer = me
                    .current(&selectors)
                    .and_then(|view| me.delta(&mut st, &view));
                match answer {
                    Ok(None) => {}
                    Ok(Some(resp)) => {
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

/// A resource's version in the incremental protocol: a digest of its content, so a client that
/// reconnects (`initial_resource_versions`) is sent only what changed.
fn resource_version(a: &Any) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &a.value);
    hex::encode(&d.as_ref()[..8])
}

fn nonce() -> Result<String, Status> {
    let mut b = [0u8; 4];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| Status::internal("no randomness"))?;
    Ok(hex::encode(b))
}

/// What a `DeltaSecrets` stream has asked for and been sent.
#[derive(Default)]
struct DeltaState {
    started: bool,
    /// Every secret the workload has (`*`, or a first request naming nothing).
    wildcard: bool,
    subscribed: BTreeSet<String>,
    /// The version the client holds of each name; [`ABSENT`] once told it does not exist.
    held: std::collections::BTreeMap<String, String>,
    node: Option<Node>,
    system_version: u64,
}

/// `held` for a name the client was told (in `removed_resources`) does not exist.
const ABSENT: &str = "";

impl DeltaState {
    fn apply(&mut self, r: DeltaDiscoveryRequest) -> Result<(), Status> {
        if let Some(e) = &r.error_detail {
            tracing::warn!(nonce = %r.response_nonce, error = %e.message, "Envoy rejected secrets (delta)");
        }
        if r.node.is_some() {
            self.node = r.node;
        }
        if !self.started {
            self.started = true;
            self.wildcard = r.resource_names_subscribe.is_empty();
            if r.initial_resource_versions.len() > MAX_SUBSCRIBED {
                return Err(Status::invalid_argument(format!(
                    "at most {MAX_SUBSCRIBED} secrets per stream"
                )));
            }
            self.held = r
                .initial_resource_versions
                .into_iter()
                .filter(|(_, v)| !v.is_empty())
                .collect();
        }
        // Bounded before anything is kept.
        if self.subscribed.len() + r.resource_names_subscribe.len() > MAX_SUBSCRIBED {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_SUBSCRIBED} secrets per stream"
            )));
        }
        for n in r.resource_names_subscribe {
            if n == "*" {
                self.wildcard = true;
            } else if !n.is_empty() {
                self.subscribed.insert(n);
            }
        }
        for n in r.resource_names_unsubscribe {
            if n == "*" {
                self.wildcard = false;
            } else {
                self.subscribed.remove(&n);
                self.held.remove(&n);
            }
        }
        if self.subscribed.len() > MAX_SUBSCRIBED {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_SUBSCRIBED} secrets per stream"
            )));
        }
        Ok(())
    }
}

impl Sds {
    /// The incremental response for `st` from `view`: the secrets whose version the client
    /// does not hold, and as removed the names it held that are gone or asked for and absent;
    /// `None` when there is nothing to say.
    fn delta(
        &self,
        st: &mut DeltaState,
        view: &WorkloadView,
    ) -> Result<Option<DeltaDiscoveryResponse>, Status> {
        let node = st.node.as_ref();
        let mut want: std::collections::BTreeMap<String, Any> = Default::default();
        if st.wildcard {
            want.extend(self.resources(BTreeSet::new(), node, view)?.0);
        }
        let mut absent = BTreeSet::new();
        if !st.subscribed.is_empty() {
            let (named, missing) = self.resources(st.subscribed.clone(), node, view)?;
            want.extend(named);
            absent = missing;
        }
        let mut resources = vec![];
        for (name, a) in want.iter() {
            let version = resource_version(a);
            if st.held.get(name) != Some(&version) {
                st.held.insert(name.clone(), version.clone());
                resources.push(Resource {
                    name: name.clone(),
                    version,
                    resource: Some(a.clone()),
                    ..Default::default()
                });
            }
        }
        let gone: Vec<String> = st
            .held
            .iter()
            .filter(|(n, v)| !want.contains_key(*n) && v.as_str() != ABSENT)
            .map(|(n, _)| n.clone())
            .chain(
                absent
                    .into_iter()
                    .filter(|n| st.held.get(n).is_none_or(|v| v != ABSENT)),
            )
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        for n in &gone {
            st.held.insert(n.clone(), ABSENT.to_string());
        }
        // Names neither subscribed nor covered by the wildcard are forgotten.
        st.held
            .retain(|n, _| st.wildcard || st.subscribed.contains(n) || want.contains_key(n));
        if resources.is_empty() && gone.is_empty() {
            return Ok(None);
        }
        st.system_version += 1;
        Ok(Some(DeltaDiscoveryResponse {
            system_version_info: st.system_version.to_string(),
            resources,
            type_url: Secret::type_url(),
            removed_resources: gone,
            nonce: nonce()?,
            ..Default::default()
        }))
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
