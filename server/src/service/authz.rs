//! Who is calling, and may they. Callers on the admin Unix socket are local admins (the socket's
//! directory is 0770). Over TCP the TLS handshake has already verified any client X509-SVID
//! against the bundle; here the SVID's ID is classified: an attested, unbanned agent whose SVID
//! serial the server issued, or a workload whose registration entry is marked admin.

use super::{Context, ds_status};
use crate::datastore::{AttestedNode, DsError, EntryFilter};
use kame_api::SpiffeId;
use kame_api::x509svid::ParsedCert;
use tonic::transport::server::{TcpConnectInfo, UdsConnectInfo};
use tonic::{Request, Status};

type TlsInfo = tonic::transport::server::TlsConnectInfo<TcpConnectInfo>;

#[derive(Debug, Clone)]
pub enum Caller {
    /// On the admin Unix socket.
    Local,
    /// An attested agent presenting its current SVID.
    Agent(Box<AttestedNode>),
    /// A workload whose entry is marked admin.
    Admin(SpiffeId),
    /// A workload whose entry is marked downstream (a nested server), not admin.
    Downstream(SpiffeId),
    /// A TLS client without a certificate.
    Anonymous,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        matches!(self, Caller::Local | Caller::Admin(_))
    }
}

/// The SPIFFE ID and serial of the client certificate, if any.
fn peer_svid<T>(req: &Request<T>) -> Result<Option<(SpiffeId, String)>, Status> {
    let Some(info) = req.extensions().get::<TlsInfo>() else {
        return Ok(None);
    };
    let Some(certs) = info.peer_certs() else {
        return Ok(None);
    };
    let Some(leaf) = certs.first() else {
        return Ok(None);
    };
    let p = ParsedCert::parse(leaf.as_ref())
        .map_err(|e| Status::unauthenticated(format!("bad client certificate: {e}")))?;
    let id = kame_api::x509svid::check_leaf(&p).map_err(|e| {
        Status::unauthenticated(format!("client certificate is not an X509-SVID: {e}"))
    })?;
    Ok(Some((id, p.serial_hex())))
}

pub async fn caller<T>(ctx: &Context, req: &Request<T>) -> Result<Caller, Status> {
    if req.extensions().get::<UdsConnectInfo>().is_some() {
        return Ok(Caller::Local);
    }
    let Some((id, serial)) = peer_svid(req)? else {
        return Ok(Caller::Anonymous);
    };
    if !id.is_member_of(&ctx.td) {
        return Err(Status::permission_denied(format!(
            "{id} is not a member of trust domain {}",
            ctx.td
        )));
    }
    let id_s = id.to_string();
    if id.path().starts_with("/spire/agent/") {
        // The node cache answers the common case (the agent's current SVID) without the
        // datastore, also while it is unreachable; anything else is read from the datastore.
        if let Some(n) = ctx.nodes.get(&id_s)
            && !n.banned()
            && serial == n.serial_number
        {
            return Ok(Caller::Agent(Box::new((*n).clone())));
        }
        let node = ctx
            .ds
            .fetch_node(&id_s)
            .await
            .map_err(ds_status)?
            .ok_or_else(|| Status::permission_denied(format!("agent {id} is not attested")))?;
        if node.banned() {
            return Err(Status::permission_denied(format!("agent {id} is banned")));
        }
        if serial == node.serial_number {
            return Ok(Caller::Agent(Box::new(node)));
        }
        if serial == node.new_serial_number {
            // The agent switched to the SVID issued by its last renewal: promote it (never over
            // a ban that landed since the read above).
            let promote = |n: &mut AttestedNode| -> crate::datastore::DsResult<()> {
                if n.serial_number == serial {
                    return Ok(());
                }
                if n.new_serial_number != serial {
                    return Err(DsError::FailedPrecondition(
                        "the SVID is no longer active".into(),
                    ));
                }
                n.serial_number = std::mem::take(&mut n.new_serial_number);
                n.expires_at = n.new_expires_at;
                n.new_expires_at = 0;
                Ok(())
            };
            let n = ctx
                .ds
                .modify_node(&id_s, &promote)
                .await
                .map_err(|e| match e {
                    DsError::FailedPrecondition(_) => Status::permission_denied(format!(
                        "agent {id} presented an SVID that is no longer active"
                    )),
                    e => ds_status(e),
                })?;
            // The retired SVID stops working here at once (on other servers within a poll).
            if let Err(e) = ctx.nodes.refresh().await {
                tracing::warn!(error = %e, "cannot refresh the node cache after a write");
            }
            return Ok(Caller::Agent(Box::new(n)));
        }
        return Err(Status::permission_denied(format!(
            "agent {id} presented an SVID that is no longer active"
        )));
    }
    let entries = ctx
        .ds
        .list_entries(&EntryFilter {
            spiffe_id: Some(id_s),
            ..Default::default()
        })
        .await
        .map_err(ds_status)?;
    if entries.iter().any(|e| e.admin) {
        return Ok(Caller::Admin(id));
    }
    if entries.iter().any(|e| e.downstream) {
        return Ok(Caller::Downstream(id));
    }
    Err(Status::permission_denied(format!(
        "{id} is neither an agent nor an admin"
    )))
}

/// A workload whose registration entry is marked `downstream` (SPIRE's `allow_downstream`):
/// a nested server asking for its CA or publishing its JWT key.
pub async fn require_downstream<T>(ctx: &Context, req: &Request<T>) -> Result<SpiffeId, Status> {
    let refused = || Status::permission_denied("caller is not a downstream workload");
    match caller(ctx, req).await {
        Ok(Caller::Downstream(id)) => Ok(id),
        // An admin entry may be downstream too.
        Ok(Caller::Admin(id)) => {
            let entries = ctx
                .ds
                .list_entries(&EntryFilter {
                    spiffe_id: Some(id.to_string()),
                    downstream: Some(true),
                    ..Default::default()
                })
                .await
                .map_err(ds_status)?;
            if entries.is_empty() {
                Err(refused())
            } else {
                Ok(id)
            }
        }
        Ok(_) => Err(refused()),
        Err(s) if s.code() == tonic::Code::PermissionDenied => Err(refused()),
        Err(s) => Err(s),
    }
}

pub async fn require_admin<T>(ctx: &Context, req: &Request<T>) -> Result<Caller, Status> {
    let c = caller(ctx, req).await?;
    if c.is_admin() {
        Ok(c)
    } else {
        Err(Status::permission_denied(
            "caller must be local or present an admin X509-SVID",
        ))
    }
}

pub async fn require_agent<T>(ctx: &Context, req: &Request<T>) -> Result<AttestedNode, Status> {
    match caller(ctx, req).await? {
        Caller::Agent(n) => Ok(*n),
        _ => Err(Status::permission_denied(
            "caller must present an active agent X509-SVID",
        )),
    }
}
