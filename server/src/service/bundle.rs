//! `spire.api.server.bundle.v1.Bundle`: the trust domain's own bundle (read by anyone, appended
//! by admins) and federated bundles (admins). Every change bumps the bundle's sequence number.

use super::authz::{Caller, caller, require_admin};
use super::*;
use kame_api::pb::bundle as pb;
use kame_api::pb::bundle::bundle_server::Bundle as BundleApi;
use kame_api::pb::types::Bundle;
use tonic::{Request, Response};

#[derive(Debug, Clone)]
pub struct BundleService {
    pub ctx: Arc<Context>,
}

pub fn apply_mask(mut b: Bundle, mask: Option<&types::BundleMask>) -> Bundle {
    if let Some(m) = mask {
        if !m.x509_authorities {
            b.x509_authorities.clear();
        }
        if !m.jwt_authorities {
            b.jwt_authorities.clear();
        }
        if !m.refresh_hint {
            b.refresh_hint = 0;
        }
        if !m.sequence_number {
            b.sequence_number = 0;
        }
        if !m.wit_authorities {
            b.wit_authorities.clear();
        }
    }
    b
}

/// The longest JWT key ID a downstream server may publish.
pub const MAX_KEY_ID_LEN: usize = 256;

/// Checks the authorities of a bundle from the wire (parseable certificates that are CAs,
/// parseable public keys, non-empty distinct key IDs).
pub fn validate_authorities(b: &Bundle) -> Result<(), Status> {
    for (i, c) in b.x509_authorities.iter().enumerate() {
        let p = kame_api::x509svid::ParsedCert::parse(&c.asn1)
            .map_err(|e| Status::invalid_argument(format!("x509_authorities[{i}]: {e}")))?;
        kame_api::x509svid::check_signing_cert(&p)
            .map_err(|e| Status::invalid_argument(format!("x509_authorities[{i}]: {e}")))?;
    }
    let mut kids = HashSet::new();
    for (i, k) in b.jwt_authorities.iter().enumerate() {
        if k.key_id.is_empty() {
            return Err(Status::invalid_argument(format!(
                "jwt_authorities[{i}]: missing key ID"
            )));
        }
        if !kids.insert(&k.key_id) {
            return Err(Status::invalid_argument(format!(
                "jwt_authorities[{i}]: duplicate key ID {:?}",
                k.key_id
            )));
        }
        kame_api::keys::KeyInfo::from_spki_der(&k.public_key)
            .map_err(|e| Status::invalid_argument(format!("jwt_authorities[{i}]: {e}")))?;
    }
    Ok(())
}

/// The per-bundle result of a batch call.
fn bundle_result(
    res: Result<Bundle, Status>,
    mask: Option<&types::BundleMask>,
) -> pb::BundleResult {
    match res {
        Ok(b) => pb::BundleResult {
            status: Some(ok_status()),
            bundle: Some(apply_mask(b, mask)),
        },
        Err(s) => pb::BundleResult {
            status: Some(status_of(&s)),
            bundle: None,
        },
    }
}

fn federated_td(ctx: &Context, s: &str) -> Result<TrustDomain, Status> {
    let td = TrustDomain::parse(s)
        .map_err(|e| Status::invalid_argument(format!("trust_domain: {e}")))?;
    if td == ctx.td {
        return Err(Status::invalid_argument(
            "trust_domain: that is the server's own trust domain, not a federated one",
        ));
    }
    Ok(td)
}

fn federated_bundle(ctx: &Context, b: &Bundle) -> Result<Bundle, Status> {
    let td = federated_td(ctx, &b.trust_domain)?;
    validate_authorities(b)?;
    let mut b = b.clone();
    b.trust_domain = td.as_str().to_string();
    Ok(b)
}

#[tonic::async_trait]
impl BundleApi for BundleService {
    async fn count_bundles(
        &self,
        req: Request<pb::CountBundlesRequest>,
    ) -> Result<Response<pb::CountBundlesResponse>, Status> {
        require_admin(&self.ctx, &req).await?;
        let n = self.ctx.ds.list_bundles().await.map_err(ds_status)?.len();
        Ok(Response::new(pb::CountBundlesResponse { count: n as i32 }))
    }

    async fn get_bundle(
        &self,
        req: Request<pb::GetBundleRequest>,
    ) -> Result<Response<Bundle>, Status> {
        // Agents (over TCP) may get a read up to a second old; the admin socket reads the
        // datastore.
        let local = req
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            .is_some();
        let b = if local {
            self.ctx.ds.fetch_bundle(self.ctx.td.as_str()).await
        } else {
            self.ctx
                .last_good
                .bundle(
                    &*self.ctx.ds,
                    self.ctx.td.as_str(),
                    self.ctx.ca.bundle().sequence_number,
                )
                .await
        }
        .map_err(ds_status)?
        .ok_or_else(|| Status::not_found("bundle not found"))?;
        Ok(Response::new(apply_mask(
            b,
            req.get_ref().output_mask.as_ref(),
        )))
    }

    async fn append_bundle(
        &self,
        req: Request<pb::AppendBundleRequest>,
    ) -> Result<Response<Bundle>, Status> {
        require_admin(&self.ctx, &req).await?;
        let r = req.get_ref();
        if !r.wit_authorities.is_empty() {
            return Err(Status::invalid_argument(
                "wit_authorities: WIT-SVIDs are not supported",
            ));
        }
        let add = Bundle {
            trust_domain: self.ctx.td.as_str().to_string(),
            x509_authorities: r.x509_authorities.clone(),
            jwt_authorities: r.jwt_authorities.clone(),
            ..Default::default()
        };
        validate_authorities(&add)?;
        if self
            .ctx
            .ds
            .fetch_bundle(self.ctx.td.as_str())
            .await
            .map_err(ds_status)?
            .is_none()
        {
            return Err(Status::not_found("bundle not found"));
        }
        let b = self.ctx.ds.append_bundle(&add).await.map_err(ds_status)?;
        self.ctx.ca.refresh_bundle().await.map_err(ca_status)?;
        tracing::info!(sequence = b.sequence_number, "bundle appended");
        Ok(Response::new(apply_mask(b, r.output_mask.as_ref())))
    }

    async fn publish_jwt_authority(
        &self,
        req: Request<pb::PublishJwtAuthorityRequest>,
    ) -> Result<Response<pb::PublishJwtAuthorityResponse>, Status> {
        let who = super::authz::require_downstream(&self.ctx, &req).await?;
        crate::ratelimit::Limits::limit(&self.ctx.limits.jwt_signing, &req, 1).await?;
        let mut key = req
            .get_ref()
            .jwt_authority
            .clone()
            .ok_or_else(|| Status::invalid_argument("missing JWT authority"))?;
        validate_authorities(&Bundle {
            jwt_authorities: vec![key.clone()],
            ..Default::default()
        })
        .map_err(|s| Status::invalid_argument(format!("invalid JWT authority: {}", s.message())))?;
        if key.key_id.len() > MAX_KEY_ID_LEN {
            return Err(Status::invalid_argument(format!(
                "invalid JWT authority: key ID longer than {MAX_KEY_ID_LEN} bytes"
            )));
        }
        // A key that never expires, or outlives anything this server makes, could never
        // leave the bundle.
        let now = crate::ca::now_secs() as i64;
        let longest = (2 * self.ctx.ca.settings().ca_ttl.as_secs()).max(30 * 86400) as i64;
        if key.expires_at <= now {
            return Err(Status::invalid_argument(
                "invalid JWT authority: expires_at is missing or in the past",
            ));
        }
        if key.expires_at > now + longest {
            return Err(Status::invalid_argument(format!(
                "invalid JWT authority: expires more than {longest} s from now"
            )));
        }
        // Only this trust domain's operators taint keys.
        key.tainted = false;
        let kid = key.key_id.clone();
        let jwt_authorities = self
            .ctx
            .ca
            .publish_jwt_key(key, true)
            .await
            .map_err(ca_status)?;
        tracing::info!(caller = %who, key_id = %kid, "downstream JWT authority published");
        Ok(Response::new(pb::PublishJwtAuthorityResponse {
            jwt_authorities,
        }))
    }

    async fn publish_wit_authority(
        &self,
        _req: Request<pb::PublishWitAuthorityRequest>,
    ) -> Result<Response<pb::PublishWitAuthorityResponse>, Status> {
        Err(Status::unimplemented("WIT-SVIDs are not supported"))
    }

    async fn list_federated_bundles(
        &self,
        req: Request<pb::ListFederatedBundlesRequest>,
    ) -> Result<Response<pb::ListFederatedBundlesResponse>, Status> {
        require_admin(&self.ctx, &req).await?;
        let r = req.get_ref();
        let all: Vec<Bundle> = self
            .ctx
            .ds
            .list_bundles()
            .await
            .map_err(ds_status)?
            .into_iter()
            .filter(|b| b.trust_domain != self.ctx.td.as_str())
            .collect();
        let (page, next_page_token) = paginate(all, r.page_size, &r.page_token)?;
        Ok(Response::new(pb::ListFederatedBundlesResponse {
            bundles: page
                .into_iter()
                .map(|b| apply_mask(b, r.output_mask.as_ref()))
                .collect(),
            next_page_token,
        }))
    }

    async fn get_federated_bundle(
        &self,
        req: Request<pb::GetFederatedBundleRequest>,
    ) -> Result<Response<Bundle>, Status> {
        let c = caller(&self.ctx, &req).await?;
        if !matches!(c, Caller::Local | Caller::Admin(_) | Caller::Agent(_)) {
            return Err(Status::permission_denied(
                "caller must be local, an admin or an agent",
            ));
        }
        let r = req.get_ref();
        let td = federated_td(&self.ctx, &r.trust_domain)?;
        let b = self
            .ctx
            .ds
            .fetch_bundle(td.as_str())
            .await
            .map_err(ds_status)?
            .ok_or_else(|| Status::not_found("bundle not found"))?;
        Ok(Response::new(apply_mask(b, r.output_mask.as_ref())))
    }

    async fn batch_create_federated_bundle(
        &self,
        req: Request<pb::BatchCreateFederatedBundleRequest>,
    ) -> Result<Response<pb::BatchCreateFederatedBundleResponse>, Status> {
        require_admin(&self.ctx, &req).await?;
        let r = req.get_ref();
        let mut results = vec![];
        for b in &r.bundle {
            let res = match federated_bundle(&self.ctx, b) {
                Err(s) => Err(s),
                Ok(b) => self.ctx.ds.create_bundle(&b).await.map_err(ds_status),
            };
            if let Ok(b) = &res {
                // The relationship's refresher (if any) fetches now: an https_spiffe one can
                // authenticate its endpoint with this bundle; an https_web one replaces it
                // with what the endpoint publishes.
                self.ctx.federation_triggers.trigger(&b.trust_domain);
            }
            results.push(bundle_result(res, r.output_mask.as_ref()));
        }
        Ok(Response::new(pb::BatchCreateFederatedBundleResponse {
            results,
        }))
    }

    async fn batch_update_federated_bundle(
        &self,
        req: Request<pb::BatchUpdateFederatedBundleRequest>,
    ) -> Result<Response<pb::BatchUpdateFederatedBundleResponse>, Status> {
        require_admin(&self.ctx, &req).await?;
        let r = req.get_ref();
        let mut results = vec![];
        for b in &r.bundle {
            let res = async {
                let b = federated_bundle(&self.ctx, b)?;
                let mut cur = self
                    .ctx
                    .ds
                    .fetch_bundle(&b.trust_domain)
                    .await
                    .map_err(ds_status)?
                    .ok_or_else(|| Status::not_found("bundle not found"))?;
                let m = r.input_mask.unwrap_or(types::BundleMask {
                    x509_authorities: true,
                    jwt_authorities: true,
                    refresh_hint: true,
                    sequence_number: false,
                    wit_authorities: true,
                });
                if m.x509_authorities {
                    cur.x509_authorities = b.x509_authorities.clone();
                }
                if m.jwt_authorities {
                    cur.jwt_authorities = b.jwt_authorities.clone();
                }
                if m.refresh_hint {
                    cur.refresh_hint = b.refresh_hint;
                }
                self.ctx.ds.update_bundle(&cur).await.map_err(ds_status)
            }
            .await;
            if let Ok(b) = &res {
                // The relationship's refresher (if any) fetches now: an https_spiffe one can
                // authenticate its endpoint with this bundle; an https_web one replaces it
                // with what the endpoint publishes.
                self.ctx.federation_triggers.trigger(&b.trust_domain);
            }
            results.push(bundle_result(res, r.output_mask.as_ref()));
        }
        Ok(Response::new(pb::BatchUpdateFederatedBundleResponse {
            results,
        }))
    }

    async fn batch_set_federated_bundle(
        &self,
        req: Request<pb::BatchSetFederatedBundleRequest>,
    ) -> Result<Response<pb::BatchSetFederatedBundleResponse>, Status> {
        require_admin(&self.ctx, &req).await?;
        let r = req.get_ref();
        let mut results = vec![];
        for b in &r.bundle {
            let res = async {
                let b = federated_bundle(&self.ctx, b)?;
                if self
                    .ctx
                    .ds
                    .fetch_bundle(&b.trust_domain)
                    .await
                    .map_err(ds_status)?
                    .is_some()
                {
                    self.ctx.ds.update_bundle(&b).await.map_err(ds_status)
                } else {
                    self.ctx.ds.create_bundle(&b).await.map_err(ds_status)
                }
            }
            .await;
            if let Ok(b) = &res {
                // The relationship's refresher (if any) fetches now: an https_spiffe one can
                // authenticate its endpoint with this bundle; an https_web one replaces it
                // with what the endpoint publishes.
                self.ctx.federation_triggers.trigger(&b.trust_domain);
            }
            results.push(bundle_result(res, r.output_mask.as_ref()));
        }
        Ok(Response::new(pb::BatchSetFederatedBundleResponse {
            results,
        }))
    }

    async fn batch_delete_federated_bundle(
        &self,
        req: Request<pb::BatchDeleteFederatedBundleRequest>,
    ) -> Result<Response<pb::BatchDeleteFederatedBundleResponse>, Status> {
        require_admin(&self.ctx, &req).await?;
        let r = req.get_ref();
        let mode = pb::batch_delete_federated_bundle_request::Mode::try_from(r.mode)
            .map_err(|_| Status::invalid_argument("mode: unknown"))?;
        let entries = self
            .ctx
            .ds
            .list_entries(&Default::default())
            .await
            .map_err(ds_status)?;
        let mut results = vec![];
        for t in &r.trust_domains {
            let res = async {
                let td = federated_td(&self.ctx, t)?;
                let id = td.id_string();
                let users: Vec<&RegistrationEntry> =
                    entries.iter().filter(|e| e.federates_with.contains(&id)).collect();
                use pb::batch_delete_federated_bundle_request::Mode;
                match mode {
                    Mode::Restrict if !users.is_empty() => {
                        return Err(Status::failed_precondition(format!(
                            "{} registration entries federate with {td}; use mode DELETE or DISSOCIATE",
                            users.len()
                        )));
                    }
                    Mode::Delete => {
                        for e in &users {
                            self.ctx.ds.delete_entry(&e.id).await.map_err(ds_status)?;
                        }
                    }
                    Mode::Dissociate => {
                        for e in &users {
                            let mut e = (*e).clone();
                            e.federates_with.retain(|f| f != &id);
                            self.ctx.ds.update_entry(&e).await.map_err(ds_status)?;
                        }
                    }
                    Mode::Restrict => {}
                }
                self.ctx.ds.delete_bundle(td.as_str()).await.map_err(ds_status)
            }
            .await;
            results.push(pb::batch_delete_federated_bundle_response::Result {
                status: Some(match res {
                    Ok(()) => ok_status(),
                    Err(s) => status_of(&s),
                }),
                trust_domain: t.clone(),
            });
        }
        if let Err(e) = self.ctx.entries.refresh().await {
            tracing::warn!(error = %e, "cannot refresh the entry cache after a write");
        }
        Ok(Response::new(pb::BatchDeleteFederatedBundleResponse {
            results,
        }))
    }
}
