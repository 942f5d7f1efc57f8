//! `spire.api.server.trustdomain.v1.TrustDomain`: federation relationships made through the
//! API (local or admin callers only), stored in the datastore and picked up by the federation
//! refresher; a relationship's bundle, when given, is stored as the federated bundle (the
//! bootstrap an https_spiffe relationship needs). Relationships in the configuration are not
//! listed here and win over stored ones for the same trust domain. Every bad input is
//! InvalidArgument with nothing written; missing ones NotFound, duplicates AlreadyExists.

use super::authz::require_admin;
use super::bundle::validate_authorities;
use super::*;
use crate::federation::Relationship;
use kame_api::pb::trustdomain as pb;
use kame_api::pb::trustdomain::trust_domain_server::TrustDomain as TrustDomainApi;
use kame_api::pb::types::{FederationRelationship, FederationRelationshipMask};
use tonic::{Request, Response};

#[derive(Debug, Clone)]
pub struct TrustDomainService {
    pub ctx: Arc<Context>,
}

/// Most relationships one List page holds.
pub const MAX_PAGE: usize = 1000;

fn mask_all() -> FederationRelationshipMask {
    FederationRelationshipMask {
        bundle_endpoint_url: true,
        bundle_endpoint_profile: true,
        trust_domain_bundle: true,
    }
}

impl TrustDomainService {
    /// `r` as `mask` asks, with its federated bundle when the mask wants it.
    async fn output(
        &self,
        mut r: FederationRelationship,
        mask: Option<&FederationRelationshipMask>,
    ) -> Result<FederationRelationship, Status> {
        let m = mask.copied().unwrap_or_else(mask_all);
        if !m.bundle_endpoint_url {
            r.bundle_endpoint_url.clear();
        }
        if !m.bundle_endpoint_profile {
            r.bundle_endpoint_profile = None;
        }
        r.trust_domain_bundle = if m.trust_domain_bundle {
            self.ctx
                .ds
                .fetch_bundle(&r.trust_domain)
                .await
                .map_err(ds_status)?
        } else {
            None
        };
        Ok(r)
    }

    /// The relationship checked, and its bundle (if given) checked for its trust domain.
    fn check(&self, r: &FederationRelationship) -> Result<Relationship, Status> {
        let rel = Relationship::from_proto(r, &self.ctx.td).map_err(Status::invalid_argument)?;
        if let Some(b) = &r.trust_domain_bundle {
            if b.trust_domain != r.trust_domain {
                return Err(Status::invalid_argument(format!(
                    "trust_domain_bundle: bundle of {:?}, not {:?}",
                    b.trust_domain, r.trust_domain
                )));
            }
            validate_authorities(b).map_err(|s| {
                Status::invalid_argument(format!("trust_domain_bundle: {}", s.message()))
            })?;
        }
        Ok(rel)
    }

    /// Stores `b` as the federated bundle of its trust domain (created or replaced).
    async fn set_bundle(&self, b: &kame_api::pb::types::Bundle) -> Result<(), Status> {
        let held = self
            .ctx
            .ds
            .fetch_bundle(&b.trust_domain)
            .await
            .map_err(ds_status)?;
        if held.is_some() {
            self.ctx.ds.update_bundle(b).await.map_err(ds_status)?;
        } else {
            self.ctx.ds.create_bundle(b).await.map_err(ds_status)?;
        }
        Ok(())
    }

    fn not_found(td: &str) -> Status {
        Status::not_found(format!(
            "federation relationship with {td:?} does not exist"
        ))
    }
}

#[tonic::async_trait]
impl TrustDomainApi for TrustDomainService {
    async fn list_federation_relationships(
        &self,
        req: Request<pb::ListFederationRelationshipsRequest>,
    ) -> Result<Response<pb::ListFederationRelationshipsResponse>, Status> {
        require_admin(&self.ctx, &req).await?;
        let r = req.get_ref();
        if r.page_size < 0 {
            return Err(Status::invalid_argument("page_size: must not be negative"));
        }
        let size = match r.page_size {
            0 => MAX_PAGE,
            n => (n as usize).min(MAX_PAGE),
        };
        let mut all = self
            .ctx
            .ds
            .list_federation_relationships()
            .await
            .map_err(ds_status)?;
        // Pages follow byte order (the page token is compared so), whatever the database's
        // collation.
        all.sort_by(|a, b| a.trust_domain.cmp(&b.trust_domain));
        let after: Vec<FederationRelationship> = all
            .into_iter()
            .filter(|x| r.page_token.is_empty() || x.trust_domain > r.page_token)
            .collect();
        let next_page_token = if after.len() > size {
            after[size - 1].trust_domain.clone()
        } else {
            String::new()
        };
        let mut out = vec![];
        for x in after.into_iter().take(size) {
            out.push(self.output(x, r.output_mask.as_ref()).await?);
        }
        Ok(Response::new(pb::ListFederationRelationshipsResponse {
            federation_relationships: out,
            next_page_token,
        }))
    }

    async fn get_federation_relationship(
        &self,
        req: Request<pb::GetFederationRelationshipRequest>,
    ) -> Result<Response<FederationRelationship>, Status> {
        require_admin(&self.ctx, &req).await?;
        let r = req.get_ref();
        let td = kame_api::TrustDomain::parse(&r.trust_domain)
            .map_err(|e| Status::invalid_argument(format!("trust_domain: {e}")))?;
        let x = self
            .ctx
            .ds
            .fetch_federation_relationship(td.as_str())
            .await
            .map_err(ds_status)?
            .ok_or_else(|| Self::not_found(td.as_str()))?;
        Ok(Response::new(self.output(x, r.output_mask.as_ref()).await?))
    }

    async fn batch_create_federation_relationship(
        &self,
        req: Request<pb::BatchCreateFederationRelationshipRequest>,
    ) -> Result<Response<pb::BatchCreateFederationRelationshipResponse>, Status> {
        require_admin(&self.ctx, &req).await?;
        let r = req.get_ref();
        let mut results = vec![];
        for x in &r.federation_relationships {
            let res = async {
                let rel = self.check(x)?;
                let stored = rel.to_proto();
                self.ctx
                    .ds
                    .create_federation_relationship(&stored)
                    .await
                    .map_err(ds_status)?;
                if let Some(b) = &x.trust_domain_bundle {
                    self.set_bundle(b).await?;
                }
                tracing::info!(trust_domain = %rel.trust_domain, url = %rel.bundle_endpoint_url, "federation relationship created");
                self.output(stored, r.output_mask.as_ref()).await
            }
            .await;
            results.push(match res {
                Ok(f) => pb::batch_create_federation_relationship_response::Result {
                    status: Some(ok_status()),
                    federation_relationship: Some(f),
                },
                Err(s) => pb::batch_create_federation_relationship_response::Result {
                    status: Some(status_of(&s)),
                    federation_relationship: None,
                },
            });
        }
        self.ctx.federation_triggers.reload();
        Ok(Response::new(
            pb::BatchCreateFederationRelationshipResponse { results },
        ))
    }

    async fn batch_update_federation_relationship(
        &self,
        req: Request<pb::BatchUpdateFederationRelationshipRequest>,
    ) -> Result<Response<pb::BatchUpdateFederationRelationshipResponse>, Status> {
        require_admin(&self.ctx, &req).await?;
        let r = req.get_ref();
        let m = r.input_mask.unwrap_or_else(mask_all);
        let mut results = vec![];
        for x in &r.federation_relationships {
            let res = async {
                let mut cur = self
                    .ctx
                    .ds
                    .fetch_federation_relationship(&x.trust_domain)
                    .await
                    .map_err(ds_status)?
                    .ok_or_else(|| Self::not_found(&x.trust_domain))?;
                if m.bundle_endpoint_url {
                    cur.bundle_endpoint_url = x.bundle_endpoint_url.clone();
                }
                if m.bundle_endpoint_profile {
                    cur.bundle_endpoint_profile = x.bundle_endpoint_profile.clone();
                }
                cur.trust_domain_bundle = if m.trust_domain_bundle {
                    x.trust_domain_bundle.clone()
                } else {
                    None
                };
                let rel = self.check(&cur)?;
                let stored = rel.to_proto();
                self.ctx
                    .ds
                    .update_federation_relationship(&stored)
                    .await
                    .map_err(ds_status)?;
                if let Some(b) = &cur.trust_domain_bundle {
                    self.set_bundle(b).await?;
                }
                tracing::info!(trust_domain = %rel.trust_domain, "federation relationship updated");
                self.output(stored, r.output_mask.as_ref()).await
            }
            .await;
            results.push(match res {
                Ok(f) => pb::batch_update_federation_relationship_response::Result {
                    status: Some(ok_status()),
                    federation_relationship: Some(f),
                },
                Err(s) => pb::batch_update_federation_relationship_response::Result {
                    status: Some(status_of(&s)),
                    federation_relationship: None,
                },
            });
        }
        self.ctx.federation_triggers.reload();
        Ok(Response::new(
            pb::BatchUpdateFederationRelationshipResponse { results },
        ))
    }

    async fn batch_delete_federation_relationship(
        &self,
        req: Request<pb::BatchDeleteFederationRelationshipRequest>,
    ) -> Result<Response<pb::BatchDeleteFederationRelationshipResponse>, Status> {
        require_admin(&self.ctx, &req).await?;
        let mut results = vec![];
        for td in &req.get_ref().trust_domains {
            let res = async {
                kame_api::TrustDomain::parse(td)
                    .map_err(|e| Status::invalid_argument(format!("trust_domain: {e}")))?;
                self.ctx
                    .ds
                    .delete_federation_relationship(td)
                    .await
                    .map_err(|e| match e {
                        crate::datastore::DsError::NotFound(_) => Self::not_found(td),
                        e => ds_status(e),
                    })
            }
            .await;
            if res.is_ok() {
                tracing::info!(trust_domain = %td, "federation relationship deleted");
            }
            results.push(pb::batch_delete_federation_relationship_response::Result {
                status: Some(match &res {
                    Ok(()) => ok_status(),
                    Err(s) => status_of(s),
                }),
                trust_domain: td.clone(),
            });
        }
        self.ctx.federation_triggers.reload();
        Ok(Response::new(
            pb::BatchDeleteFederationRelationshipResponse { results },
        ))
    }

    async fn refresh_bundle(
        &self,
        req: Request<pb::RefreshBundleRequest>,
    ) -> Result<Response<()>, Status> {
        require_admin(&self.ctx, &req).await?;
        let td = kame_api::TrustDomain::parse(&req.get_ref().trust_domain)
            .map_err(|e| Status::invalid_argument(format!("trust_domain: {e}")))?;
        let triggers = &self.ctx.federation_triggers;
        let limit = crate::federation::refresher::FETCH_TIMEOUT + std::time::Duration::from_secs(5);
        let mut outcome = triggers.refresh_now(td.as_str(), limit).await;
        if outcome.is_none()
            && self
                .ctx
                .ds
                .fetch_federation_relationship(td.as_str())
                .await
                .map_err(ds_status)?
                .is_some()
        {
            // Made a moment ago: its refresher is being started.
            triggers.reload();
            for _ in 0..20 {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                outcome = triggers.refresh_now(td.as_str(), limit).await;
                if outcome.is_some() {
                    break;
                }
            }
        }
        match outcome {
            None => {
                return Err(Self::not_found(td.as_str()));
            }
            Some(Err(e)) => {
                return Err(Status::unavailable(format!(
                    "failed to refresh the bundle of {}: {e}",
                    td.as_str()
                )));
            }
            Some(Ok(())) => {}
        }
        Ok(Response::new(()))
    }
}
