//! `spire.api.server.localauthority.v1.LocalAuthority`: forced rotation and revocation of this
//! trust domain's X.509 and JWT authorities, for local or admin callers only. Every prepare,
//! activate, taint and revoke writes an audit event (target `kame_audit`: caller, authority,
//! force, result) whether it succeeds or not. It maps the CA's typed refusals to gRPC codes
//! (InvalidArgument for a missing or unknown ID, FailedPrecondition for a wrong state,
//! Unavailable while initializing) and must not change CA state itself.

use super::authz::{Caller, require_admin};
use super::*;
use crate::ca::{AuthorityError, AuthorityView, Kind, KindState};
use kame_api::pb::localauthority as pb;
use kame_api::pb::localauthority::local_authority_server::LocalAuthority as LocalAuthorityApi;
use tonic::{Request, Response};

#[derive(Debug, Clone)]
pub struct LocalAuthorityService {
    pub ctx: Arc<Context>,
}

/// Maps a refused or failed authority operation to its gRPC status.
pub fn authority_status(e: AuthorityError) -> Status {
    use AuthorityError as E;
    match e {
        E::NoId | E::Unknown { .. } | E::UpstreamId { .. } => {
            Status::invalid_argument(e.to_string())
        }
        E::UpstreamRootUnknown(_) => Status::not_found(e.to_string()),
        E::Initializing(_) => Status::unavailable(e.to_string()),
        E::AlreadyPrepared { .. }
        | E::AlreadyActive { .. }
        | E::NotPrepared { .. }
        | E::IsActive { .. }
        | E::IsPrepared { .. }
        | E::AlreadyTainted { .. }
        | E::NotTainted { .. }
        | E::NotInBundle { .. }
        | E::AgentsHolding { .. }
        | E::NoUpstream
        | E::LocalWithUpstream(_)
        | E::UpstreamRootTainted
        | E::UpstreamRootNotTainted => Status::failed_precondition(e.to_string()),
        E::Ca(c) => ca_status(c),
    }
}

fn state(v: &AuthorityView) -> pb::AuthorityState {
    pb::AuthorityState {
        authority_id: v.authority_id.clone(),
        expires_at: v.expires_at as i64,
        upstream_authority_subject_key_id: v.upstream_authority_id.clone(),
        tainted: v.tainted,
        agents_holding: v.agents_holding as u32,
    }
}

/// Who called, for the audit log.
fn who<T>(caller: &Caller, req: &Request<T>) -> String {
    match caller {
        Caller::Local => match req
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
        {
            Some(c) => format!("local uid={}", c.uid()),
            None => "local".to_string(),
        },
        Caller::Admin(id) | Caller::Downstream(id) => id.to_string(),
        Caller::Agent(n) => n.spiffe_id.clone(),
        Caller::Anonymous => "anonymous".to_string(),
    }
}

/// One audit event per operation, success or not.
fn audit<T>(
    caller: &str,
    action: &str,
    kind: Kind,
    authority_id: &str,
    force: bool,
    result: &Result<T, Status>,
) {
    match result {
        Ok(_) => tracing::info!(
            target: "kame_audit",
            caller,
            action,
            kind = %kind,
            authority_id,
            force,
            result = "ok",
            "local authority {action}"
        ),
        Err(s) => tracing::info!(
            target: "kame_audit",
            caller,
            action,
            kind = %kind,
            authority_id,
            force,
            result = "refused",
            code = ?s.code(),
            reason = s.message(),
            "local authority {action}"
        ),
    }
}

impl LocalAuthorityService {
    async fn get(&self, kind: Kind) -> Result<KindState, Status> {
        self.ctx
            .ca
            .authority_state(kind)
            .await
            .map_err(authority_status)
    }

    async fn prepare<T>(
        &self,
        req: &Request<T>,
        kind: Kind,
        force: bool,
    ) -> Result<pb::AuthorityState, Status> {
        let caller = require_admin(&self.ctx, req).await?;
        let r = self
            .ctx
            .ca
            .prepare_authority(kind, force)
            .await
            .map(|v| state(&v))
            .map_err(authority_status);
        let id = r.as_ref().map(|s| s.authority_id.as_str()).unwrap_or("");
        audit(&who(&caller, req), "prepare", kind, id, force, &r);
        r
    }

    async fn activate<T>(
        &self,
        req: &Request<T>,
        kind: Kind,
        id: &str,
    ) -> Result<pb::AuthorityState, Status> {
        let caller = require_admin(&self.ctx, req).await?;
        let r = self
            .ctx
            .ca
            .activate_authority(kind, id)
            .await
            .map(|v| state(&v))
            .map_err(authority_status);
        audit(&who(&caller, req), "activate", kind, id, false, &r);
        r
    }

    async fn taint<T>(
        &self,
        req: &Request<T>,
        kind: Kind,
        id: &str,
    ) -> Result<pb::AuthorityState, Status> {
        let caller = require_admin(&self.ctx, req).await?;
        let r = self
            .ctx
            .ca
            .taint_authority(kind, id)
            .await
            .map(|v| state(&v))
            .map_err(authority_status);
        audit(&who(&caller, req), "taint", kind, id, false, &r);
        r
    }

    async fn revoke<T>(
        &self,
        req: &Request<T>,
        kind: Kind,
        id: &str,
        force: bool,
    ) -> Result<pb::AuthorityState, Status> {
        let caller = require_admin(&self.ctx, req).await?;
        let r = self
            .ctx
            .ca
            .revoke_authority(kind, id, force)
            .await
            .map_err(authority_status);
        let who = who(&caller, req);
        if let Ok((_, holding)) = &r
            && *holding > 0
        {
            tracing::warn!(
                target: "kame_audit",
                caller = %who,
                kind = %kind,
                authority_id = id,
                agents_holding = holding,
                "revoke forced although agents still hold SVIDs under the authority"
            );
        }
        let r = r.map(|(v, _)| state(&v));
        audit(&who, "revoke", kind, id, force, &r);
        r
    }
}

fn no_wit() -> Status {
    Status::unimplemented("WIT-SVID functionality is not implemented")
}

#[tonic::async_trait]
impl LocalAuthorityApi for LocalAuthorityService {
    async fn get_jwt_authority_state(
        &self,
        req: Request<pb::GetJwtAuthorityStateRequest>,
    ) -> Result<Response<pb::GetJwtAuthorityStateResponse>, Status> {
        require_admin(&self.ctx, &req).await?;
        let s = self.get(Kind::Jwt).await?;
        Ok(Response::new(pb::GetJwtAuthorityStateResponse {
            active: s.active.as_ref().map(state),
            prepared: s.prepared.as_ref().map(state),
            old: s.old.first().map(state),
            older: s.old.iter().skip(1).map(state).collect(),
        }))
    }

    async fn prepare_jwt_authority(
        &self,
        req: Request<pb::PrepareJwtAuthorityRequest>,
    ) -> Result<Response<pb::PrepareJwtAuthorityResponse>, Status> {
        let force = req.get_ref().force;
        let s = self.prepare(&req, Kind::Jwt, force).await?;
        Ok(Response::new(pb::PrepareJwtAuthorityResponse {
            prepared_authority: Some(s),
        }))
    }

    async fn activate_jwt_authority(
        &self,
        req: Request<pb::ActivateJwtAuthorityRequest>,
    ) -> Result<Response<pb::ActivateJwtAuthorityResponse>, Status> {
        let id = req.get_ref().authority_id.clone();
        let s = self.activate(&req, Kind::Jwt, &id).await?;
        Ok(Response::new(pb::ActivateJwtAuthorityResponse {
            activated_authority: Some(s),
        }))
    }

    async fn taint_jwt_authority(
        &self,
        req: Request<pb::TaintJwtAuthorityRequest>,
    ) -> Result<Response<pb::TaintJwtAuthorityResponse>, Status> {
        let id = req.get_ref().authority_id.clone();
        let s = self.taint(&req, Kind::Jwt, &id).await?;
        Ok(Response::new(pb::TaintJwtAuthorityResponse {
            tainted_authority: Some(s),
        }))
    }

    async fn revoke_jwt_authority(
        &self,
        req: Request<pb::RevokeJwtAuthorityRequest>,
    ) -> Result<Response<pb::RevokeJwtAuthorityResponse>, Status> {
        let (id, force) = (req.get_ref().authority_id.clone(), req.get_ref().force);
        let s = self.revoke(&req, Kind::Jwt, &id, force).await?;
        Ok(Response::new(pb::RevokeJwtAuthorityResponse {
            revoked_authority: Some(s),
        }))
    }

    async fn get_x509_authority_state(
        &self,
        req: Request<pb::GetX509AuthorityStateRequest>,
    ) -> Result<Response<pb::GetX509AuthorityStateResponse>, Status> {
        require_admin(&self.ctx, &req).await?;
        let s = self.get(Kind::X509).await?;
        Ok(Response::new(pb::GetX509AuthorityStateResponse {
            active: s.active.as_ref().map(state),
            prepared: s.prepared.as_ref().map(state),
            old: s.old.first().map(state),
            older: s.old.iter().skip(1).map(state).collect(),
        }))
    }

    async fn prepare_x509_authority(
        &self,
        req: Request<pb::PrepareX509AuthorityRequest>,
    ) -> Result<Response<pb::PrepareX509AuthorityResponse>, Status> {
        let force = req.get_ref().force;
        let s = self.prepare(&req, Kind::X509, force).await?;
        Ok(Response::new(pb::PrepareX509AuthorityResponse {
            prepared_authority: Some(s),
        }))
    }

    async fn activate_x509_authority(
        &self,
        req: Request<pb::ActivateX509AuthorityRequest>,
    ) -> Result<Response<pb::ActivateX509AuthorityResponse>, Status> {
        let id = req.get_ref().authority_id.clone();
        let s = self.activate(&req, Kind::X509, &id).await?;
        Ok(Response::new(pb::ActivateX509AuthorityResponse {
            activated_authority: Some(s),
        }))
    }

    async fn taint_x509_authority(
        &self,
        req: Request<pb::TaintX509AuthorityRequest>,
    ) -> Result<Response<pb::TaintX509AuthorityResponse>, Status> {
        let id = req.get_ref().authority_id.clone();
        let s = self.taint(&req, Kind::X509, &id).await?;
        Ok(Response::new(pb::TaintX509AuthorityResponse {
            tainted_authority: Some(s),
        }))
    }

    async fn taint_x509_upstream_authority(
        &self,
        req: Request<pb::TaintX509UpstreamAuthorityRequest>,
    ) -> Result<Response<pb::TaintX509UpstreamAuthorityResponse>, Status> {
        let caller = require_admin(&self.ctx, &req).await?;
        let skid = req.get_ref().subject_key_id.clone();
        let r = self
            .ctx
            .ca
            .taint_upstream_authority(&skid)
            .await
            .map_err(authority_status);
        audit(
            &who(&caller, &req),
            "taint upstream",
            Kind::X509,
            &skid,
            false,
            &r,
        );
        Ok(Response::new(pb::TaintX509UpstreamAuthorityResponse {
            upstream_authority_subject_key_id: r?,
        }))
    }

    async fn revoke_x509_authority(
        &self,
        req: Request<pb::RevokeX509AuthorityRequest>,
    ) -> Result<Response<pb::RevokeX509AuthorityResponse>, Status> {
        let (id, force) = (req.get_ref().authority_id.clone(), req.get_ref().force);
        let s = self.revoke(&req, Kind::X509, &id, force).await?;
        Ok(Response::new(pb::RevokeX509AuthorityResponse {
            revoked_authority: Some(s),
        }))
    }

    async fn revoke_x509_upstream_authority(
        &self,
        req: Request<pb::RevokeX509UpstreamAuthorityRequest>,
    ) -> Result<Response<pb::RevokeX509UpstreamAuthorityResponse>, Status> {
        let caller = require_admin(&self.ctx, &req).await?;
        let skid = req.get_ref().subject_key_id.clone();
        let force = req.get_ref().force;
        let r = self
            .ctx
            .ca
            .revoke_upstream_authority(&skid, force)
            .await
            .map(|(id, _)| id)
            .map_err(authority_status);
        audit(
            &who(&caller, &req),
            "revoke upstream",
            Kind::X509,
            &skid,
            force,
            &r,
        );
        Ok(Response::new(pb::RevokeX509UpstreamAuthorityResponse {
            upstream_authority_subject_key_id: r?,
        }))
    }

    async fn get_wit_authority_state(
        &self,
        req: Request<pb::GetWitAuthorityStateRequest>,
    ) -> Result<Response<pb::GetWitAuthorityStateResponse>, Status> {
        require_admin(&self.ctx, &req).await?;
        Err(no_wit())
    }

    async fn prepare_wit_authority(
        &self,
        req: Request<pb::PrepareWitAuthorityRequest>,
    ) -> Result<Response<pb::PrepareWitAuthorityResponse>, Status> {
        require_admin(&self.ctx, &req).await?;
        Err(no_wit())
    }

    async fn activate_wit_authority(
        &self,
        req: Request<pb::ActivateWitAuthorityRequest>,
    ) -> Result<Response<pb::ActivateWitAuthorityResponse>, Status> {
        require_admin(&self.ctx, &req).await?;
        Err(no_wit())
    }

    async fn taint_wit_authority(
        &self,
        req: Request<pb::TaintWitAuthorityRequest>,
    ) -> Result<Response<pb::TaintWitAuthorityResponse>, Status> {
        require_admin(&self.ctx, &req).await?;
        Err(no_wit())
    }

    async fn revoke_wit_authority(
        &self,
        req: Request<pb::RevokeWitAuthorityRequest>,
    ) -> Result<Response<pb::RevokeWitAuthorityResponse>, Status> {
        require_admin(&self.ctx, &req).await?;
        Err(no_wit())
    }
}
