//! `spire.api.server.logger.v1.Logger`: reads and changes the running server's log level
//! (SPIRE's `logger get|set|reset`), for callers on the admin socket only, as in SPIRE. It
//! changes nothing but the level of the logger the process installed at start.

use super::authz::{Caller, caller};
use super::*;
use kame_api::pb::logger as pb;
use kame_api::pb::logger::logger_server::Logger as LoggerApi;
use kame_api::serving::logging::{Level, LogControl};
use tonic::{Request, Response};

#[derive(Debug, Clone)]
pub struct LoggerService {
    pub ctx: Arc<Context>,
}

impl LoggerService {
    async fn control<T>(&self, req: &Request<T>) -> Result<&'static LogControl, Status> {
        if !matches!(caller(&self.ctx, req).await?, Caller::Local) {
            return Err(Status::permission_denied(
                "the Logger API is served to callers on the admin socket only",
            ));
        }
        kame_api::serving::logging::control().ok_or_else(|| {
            Status::failed_precondition("this process runs without a logger it can change")
        })
    }
}

fn logger(c: &LogControl) -> types::Logger {
    types::Logger {
        current_level: c.current().api(),
        launch_level: c.launch().api(),
    }
}

fn set(c: &LogControl, level: Level) -> Result<(), Status> {
    c.set(level)
        .map_err(|e| Status::internal(format!("cannot change the log level: {e}")))
}

#[tonic::async_trait]
impl LoggerApi for LoggerService {
    async fn get_logger(
        &self,
        req: Request<pb::GetLoggerRequest>,
    ) -> Result<Response<types::Logger>, Status> {
        let c = self.control(&req).await?;
        Ok(Response::new(logger(c)))
    }

    async fn set_log_level(
        &self,
        req: Request<pb::SetLogLevelRequest>,
    ) -> Result<Response<types::Logger>, Status> {
        let c = self.control(&req).await?;
        let n = req.get_ref().new_level;
        let level = match Level::from_api(n) {
            Some(l) => l,
            None if n == 0 => {
                return Err(Status::invalid_argument(
                    "newLevel value cannot be LogLevel_UNSPECIFIED",
                ));
            }
            None => return Err(Status::invalid_argument("unsupported log level")),
        };
        tracing::info!(new_log_level = %level, "SetLogLevel called");
        set(c, level)?;
        Ok(Response::new(logger(c)))
    }

    async fn reset_log_level(
        &self,
        req: Request<pb::ResetLogLevelRequest>,
    ) -> Result<Response<types::Logger>, Status> {
        let c = self.control(&req).await?;
        tracing::info!(launch_log_level = %c.launch(), "ResetLogLevel called");
        set(c, c.launch())?;
        Ok(Response::new(logger(c)))
    }
}
