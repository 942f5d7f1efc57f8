//! The agent's admin socket (`admin_socket_path`, mode 0600): Kame's `kame.breakglass.v1.Admin`
//! — breaking the glass and reading its state — and the client `kame-agent break-glass` uses.
//! Only the agent's own user and root may call (the socket's mode, and the kernel's peer
//! credentials checked on every call). Nothing here is served to workloads.

use crate::breakglass::BreakGlassError;
use crate::manager::{GlassStatus, Manager};
use kame_api::pb::breakglass as pb;
use kame_api::pb::breakglass::admin_server::Admin;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};

#[derive(Debug, Clone)]
pub struct AdminService {
    pub manager: Arc<Manager>,
    /// The agent's own uid (from /proc/self).
    pub uid: u32,
}

/// The uid the agent runs as.
pub fn own_uid() -> std::io::Result<u32> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata("/proc/self")?.uid())
}

impl AdminService {
    fn check_peer<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let peer = req
            .extensions()
            .get::<crate::workload::ConnInfo>()
            .and_then(|c| c.peer)
            .ok_or_else(|| Status::permission_denied("caller credentials are not available"))?;
        if peer.uid != 0 && peer.uid != self.uid {
            return Err(Status::permission_denied(format!(
                "uid {} may not use the admin socket (only root and the agent's user)",
                peer.uid
            )));
        }
        Ok(())
    }
}

fn status_of(e: BreakGlassError) -> Status {
    use BreakGlassError::*;
    let msg = kame_api::errors::chain(&e);
    match e {
        Reason | Duration { .. } => Status::invalid_argument(msg),
        Token(_) => Status::permission_denied(msg),
        TokenRequired => Status::unauthenticated(msg),
        NotConfigured
        | NotAttested
        | ServerAnswered { .. }
        | NoReserves
        | AlreadyOpen { .. }
        | Tampered { .. } => Status::failed_precondition(msg),
        Io { .. } => Status::unavailable(msg),
        _ => Status::internal(msg),
    }
}

pub fn status_proto(s: &GlassStatus) -> pb::BreakGlassStatus {
    pb::BreakGlassStatus {
        open: s.open.is_some(),
        reason: s
            .open
            .as_ref()
            .map(|o| o.reason.clone())
            .unwrap_or_default(),
        opened_at: s.open.as_ref().map(|o| o.opened_at as i64).unwrap_or(0),
        closes_at: s.open.as_ref().map(|o| o.closes_at as i64).unwrap_or(0),
        reserves: s.reserves as u64,
        covered_until: s.covered_until as i64,
        last_server_contact: s.last_contact as i64,
        delivered: s.delivered,
        record_error: s.record.clone().err().unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn break_glass(
        &self,
        req: Request<pb::BreakGlassRequest>,
    ) -> Result<Response<pb::BreakGlassStatus>, Status> {
        self.check_peer(&req)?;
        let r = req.get_ref();
        let secs = u64::try_from(r.duration_seconds)
            .ok()
            .filter(|d| *d > 0)
            .ok_or_else(|| Status::invalid_argument("duration_seconds: must be positive"))?;
        let token = Some(r.token.as_str()).filter(|t| !t.is_empty());
        self.manager
            .break_glass(&r.reason, Duration::from_secs(secs), token)
            .map_err(status_of)?;
        Ok(Response::new(status_proto(&self.manager.glass_status())))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::BreakGlassStatus>, Status> {
        self.check_peer(&req)?;
        let s = self.manager.glass_status();
        if !s.configured {
            return Err(status_of(BreakGlassError::NotConfigured));
        }
        Ok(Response::new(status_proto(&s)))
    }
}

/// `kame-agent break-glass`: breaks the glass (with `reason`) or, without one, shows its state.
pub async fn client(
    socket: &std::path::Path,
    open: Option<(String, Duration, Option<String>)>,
) -> Result<pb::BreakGlassStatus, crate::cli::CliError> {
    let ch = kame_api::channel::unix(socket).await.map_err(|e| {
        crate::cli::CliError::Failed(format!(
            "cannot connect to the agent's admin socket {} (agent.admin_socket_path): {e}",
            socket.display()
        ))
    })?;
    let refused = |s: Status| {
        crate::cli::CliError::Failed(format!(
            "the agent refused ({:?}): {}",
            s.code(),
            s.message()
        ))
    };
    let mut c = pb::admin_client::AdminClient::new(ch);
    let r = match open {
        Some((reason, d, token)) => c
            .break_glass(pb::BreakGlassRequest {
                reason,
                duration_seconds: d.as_secs() as i64,
                token: token.unwrap_or_default(),
            })
            .await
            .map_err(refused)?,
        None => c.status(pb::StatusRequest {}).await.map_err(refused)?,
    };
    Ok(r.into_inner())
}

/// The state as `kame-agent break-glass` prints it.
pub fn report(s: &pb::BreakGlassStatus) -> String {
    let t = |v: i64| {
        if v <= 0 {
            "never".to_string()
        } else {
            kame_api::timefmt::utc(v)
        }
    };
    let mut out = if s.open {
        format!(
            "Break-glass: OPEN since {} until {}\nReason: {}\n",
            t(s.opened_at),
            t(s.closes_at),
            s.reason
        )
    } else {
        "Break-glass: closed\n".to_string()
    };
    out.push_str(&format!(
        "Reserve SVIDs held: {} (covering until {})\nLast server answer: {}\nReserve SVIDs delivered since start: {}\n",
        s.reserves,
        t(s.covered_until),
        t(s.last_server_contact),
        s.delivered
    ));
    if !s.record_error.is_empty() {
        out.push_str(&format!(
            "THE BREAK-GLASS RECORD DOES NOT VERIFY (tampered with?): {}\n",
            s.record_error
        ));
    }
    out
}
