//! `spire.api.server.svid.v1.SVID`: SVIDs minted for admins (MintX509SVID, MintJWTSVID) and for
//! agents on behalf of their authorized entries (BatchNewX509SVID, NewJWTSVID). The SPIFFE ID of
//! an agent-requested SVID comes from the registration entry, never from the CSR.

use super::authz::{require_admin, require_agent};
use super::*;
use kame_api::pb::svid as pb;
use kame_api::pb::svid::svid_server::Svid;
use kame_api::x509svid::ParsedCert;
use tonic::{Request, Response};

use std::time::Duration;

/// Most SVIDs one BatchNewX509SVID call may request.
pub const MAX_BATCH: usize = 500;

#[derive(Debug, Clone)]
pub struct SvidService {
    pub ctx: Arc<Context>,
}

pub fn parse_csr(csr: &[u8]) -> Result<kame_api::csr::Csr, Status> {
    kame_api::csr::parse(csr).map_err(|e| Status::invalid_argument(format!("csr: {e}")))
}

pub fn x509_svid_proto(
    id: &SpiffeId,
    chain: Vec<Vec<u8>>,
    hint: &str,
) -> Result<types::X509svid, Status> {
    let leaf = chain
        .first()
        .ok_or_else(|| Status::internal("empty certificate chain"))?;
    let expires_at = ParsedCert::parse(leaf)
        .map_err(|e| Status::internal(e.to_string()))?
        .not_after() as i64;
    Ok(types::X509svid {
        cert_chain: chain,
        id: id_to_proto(&id.to_string()),
        expires_at,
        hint: hint.to_string(),
    })
}

fn audience(aud: &[String]) -> Result<Vec<String>, Status> {
    if aud.is_empty() {
        return Err(Status::invalid_argument(
            "audience: at least one audience is required",
        ));
    }
    if aud.iter().any(|a| a.is_empty()) {
        return Err(Status::invalid_argument(
            "audience: values must not be empty",
        ));
    }
    Ok(aud.to_vec())
}

#[tonic::async_trait]
impl Svid for SvidService {
    async fn mint_x509svid(
        &self,
        req: Request<pb::MintX509svidRequest>,
    ) -> Result<Response<pb::MintX509svidResponse>, Status> {
        require_admin(&self.ctx, &req).await?;
        let r = req.get_ref();
        let ttl = ttl_or_default("ttl", r.ttl, self.ctx.default_x509_svid_ttl)?;
        let csr = parse_csr(&r.csr)?;
        let uri = match csr.uris.as_slice() {
            [one] => one,
            [] => {
                return Err(Status::invalid_argument(
                    "csr: the CSR has no URI SAN with the SPIFFE ID",
                ));
            }
            _ => {
                return Err(Status::invalid_argument(
                    "csr: the CSR has more than one URI SAN",
                ));
            }
        };
        let id = SpiffeId::parse(uri).map_err(|e| {
            Status::invalid_argument(format!("csr: URI SAN is not a valid SPIFFE ID: {e}"))
        })?;
        if !id.is_member_of(&self.ctx.td) {
            return Err(Status::invalid_argument(format!(
                "csr: {id} is not a member of trust domain {}",
                self.ctx.td
            )));
        }
        if id.is_root() {
            return Err(Status::invalid_argument("csr: the SPIFFE ID needs a path"));
        }
        for d in &csr.dns_names {
            validate_dns_name(d).map_err(|m| Status::invalid_argument(format!("csr: {m}")))?;
        }
        let chain = self
            .ctx
            .ca
            .sign_x509_svid(&csr.spki_der, &id, &csr.dns_names, ttl)
            .await
            .map_err(ca_status)?;
        tracing::info!(spiffe_id = %id, "minted X509-SVID");
        Ok(Response::new(pb::MintX509svidResponse {
            svid: Some(x509_svid_proto(&id, chain, "")?),
        }))
    }

    async fn mint_jwtsvid(
        &self,
        req: Request<pb::MintJwtsvidRequest>,
    ) -> Result<Response<pb::MintJwtsvidResponse>, Status> {
        require_admin(&self.ctx, &req).await?;
        let r = req.get_ref();
        let id = local_id_from_proto(&self.ctx, "id", r.id.as_ref())?;
        if id.is_root() {
            return Err(Status::invalid_argument("id: the SPIFFE ID needs a path"));
        }
        let aud = audience(&r.audience)?;
        let ttl = ttl_or_default("ttl", r.ttl, self.ctx.default_jwt_svid_ttl)?;
        let (token, iat, exp) = self
            .ctx
            .ca
            .sign_jwt_svid(&id, &aud, ttl)
            .await
            .map_err(ca_status)?;
        tracing::info!(spiffe_id = %id, "minted JWT-SVID");
        Ok(Response::new(pb::MintJwtsvidResponse {
            svid: Some(types::Jwtsvid {
                token,
                id: id_to_proto(&id.to_string()),
                expires_at: exp as i64,
                issued_at: iat as i64,
                hint: String::new(),
            }),
        }))
    }

    async fn mint_witsvid(
        &self,
        _req: Request<pb::MintWitsvidRequest>,
    ) -> Result<Response<pb::MintWitsvidResponse>, Status> {
        Err(Status::unimplemented("WIT-SVIDs are not supported"))
    }

    async fn batch_new_x509svid(
        &self,
        req: Request<pb::BatchNewX509svidRequest>,
    ) -> Result<Response<pb::BatchNewX509svidResponse>, Status> {
        let node = require_agent(&self.ctx, &req).await?;
        let r = req.get_ref();
        if r.params.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_BATCH} SVIDs per batch"
            )));
        }
        crate::ratelimit::Limits::limit(&self.ctx.limits.x509_signing, &req, r.params.len())
            .await?;
        // The SVIDs of a batch are minted together: with a transparency log, their entries
        // share one append instead of waiting for one each.
        let results = futures::future::join_all(r.params.iter().map(|p| async {
            let res = async {
                if p.entry_id.is_empty() {
                    return Err(Status::invalid_argument("entry_id: missing"));
                }
                let e = authorized_entry(&self.ctx, &node, &p.entry_id).await?;
                let csr = parse_csr(&p.csr)?;
                let id =
                    SpiffeId::parse(&e.spiffe_id).map_err(|e| Status::internal(e.to_string()))?;
                let ttl = ttl_or_default(
                    "x509_svid_ttl",
                    e.x509_svid_ttl,
                    self.ctx.default_x509_svid_ttl,
                )?;
                let chain = self
                    .ctx
                    .ca
                    .sign_x509_svid(&csr.spki_der, &id, &e.dns_names, ttl)
                    .await
                    .map_err(ca_status)?;
                x509_svid_proto(&id, chain, &e.hint)
            }
            .await;
            match res {
                Ok(svid) => pb::batch_new_x509svid_response::Result {
                    status: Some(ok_status()),
                    svid: Some(svid),
                },
                Err(s) => pb::batch_new_x509svid_response::Result {
                    status: Some(status_of(&s)),
                    svid: None,
                },
            }
        }))
        .await;
        Ok(Response::new(pb::BatchNewX509svidResponse { results }))
    }

    async fn new_jwtsvid(
        &self,
        req: Request<pb::NewJwtsvidRequest>,
    ) -> Result<Response<pb::NewJwtsvidResponse>, Status> {
        let node = require_agent(&self.ctx, &req).await?;
        let r = req.get_ref();
        if r.entry_id.is_empty() {
            return Err(Status::invalid_argument("entry_id: missing"));
        }
        crate::ratelimit::Limits::limit(&self.ctx.limits.jwt_signing, &req, 1).await?;
        let aud = audience(&r.audience)?;
        // Break-glass tokens are minted by admins only (MintJWTSVID): a workload may not ask
        // for one, whatever its entry's SPIFFE ID.
        if aud.iter().any(|a| a == super::breakglass::TOKEN_AUDIENCE) {
            return Err(Status::invalid_argument(format!(
                "audience: {:?} is reserved for break-glass tokens, which only admins mint",
                super::breakglass::TOKEN_AUDIENCE
            )));
        }
        let e = authorized_entry(&self.ctx, &node, &r.entry_id).await?;
        let id = SpiffeId::parse(&e.spiffe_id).map_err(|e| Status::internal(e.to_string()))?;
        let ttl = ttl_or_default(
            "jwt_svid_ttl",
            e.jwt_svid_ttl,
            self.ctx.default_jwt_svid_ttl,
        )?;
        let (token, iat, exp) = self
            .ctx
            .ca
            .sign_jwt_svid(&id, &aud, ttl)
            .await
            .map_err(ca_status)?;
        Ok(Response::new(pb::NewJwtsvidResponse {
            svid: Some(types::Jwtsvid {
                token,
                id: id_to_proto(&e.spiffe_id),
                expires_at: exp as i64,
                issued_at: iat as i64,
                hint: e.hint.clone(),
            }),
        }))
    }

    async fn batch_new_witsvid(
        &self,
        _req: Request<pb::BatchNewWitsvidRequest>,
    ) -> Result<Response<pb::BatchNewWitsvidResponse>, Status> {
        Err(Status::unimplemented("WIT-SVIDs are not supported"))
    }

    async fn new_downstream_x509ca(
        &self,
        req: Request<pb::NewDownstreamX509caRequest>,
    ) -> Result<Response<pb::NewDownstreamX509caResponse>, Status> {
        let caller = super::authz::require_downstream(&self.ctx, &req).await?;
        crate::ratelimit::Limits::limit(&self.ctx.limits.x509_signing, &req, 1).await?;
        let r = req.get_ref();
        let csr = parse_csr(&r.csr)?;
        let ttl = Duration::from_secs(u64::try_from(r.preferred_ttl.max(0)).unwrap_or(0));
        let chain = self
            .ctx
            .ca
            .sign_downstream_ca(&csr.spki_der, ttl)
            .await
            .map_err(ca_status)?;
        let x509_authorities = self
            .ctx
            .ca
            .bundle()
            .x509_authorities
            .iter()
            .map(|c| c.asn1.clone())
            .collect();
        tracing::info!(caller = %caller, "signed a downstream X.509 CA");
        Ok(Response::new(pb::NewDownstreamX509caResponse {
            ca_cert_chain: chain,
            x509_authorities,
        }))
    }
}
