//! `kame-server logger get|set|reset`: SPIRE's commands for the running server's log level,
//! over the Logger API on the admin socket. Pretty output is SPIRE's
//! (`Logger Level : debug` / `Launch Level : info`); JSON is the Logger message in SPIRE's
//! protobuf JSON shape.

use super::{CliError, Common, Output, print};
use clap::Subcommand;
use kame_api::pb::logger::{
    GetLoggerRequest, ResetLogLevelRequest, SetLogLevelRequest, logger_client::LoggerClient,
};
use kame_api::pb::types;
use kame_api::serving::logging::Level;
use serde_json::json;

#[derive(Debug, Subcommand)]
pub enum LoggerCmd {
    /// Prints the log level in force and the one the server started with.
    Get {
        #[command(flatten)]
        common: Common,
    },
    /// Sets the log level until the next `set` or `reset` (or restart).
    Set {
        #[command(flatten)]
        common: Common,
        /// The new level: panic, fatal, error, warn, info, debug or trace.
        #[arg(long)]
        level: String,
    },
    /// Puts back the log level the server started with.
    Reset {
        #[command(flatten)]
        common: Common,
    },
}

/// SPIRE's name of an API level number, upper case for JSON and lower case for text.
fn name(n: i32, upper: bool) -> String {
    let s = Level::from_api(n).map_or("unspecified", |l| l.name());
    if upper {
        s.to_uppercase()
    } else {
        s.to_string()
    }
}

fn show(out: Output, l: &types::Logger) {
    print(
        out,
        json!({
            "current_level": name(l.current_level, true),
            "launch_level": name(l.launch_level, true),
        }),
        format!(
            "Logger Level : {}\nLaunch Level : {}\n\n",
            name(l.current_level, false),
            name(l.launch_level, false)
        ),
    );
}

pub async fn logger(cmd: LoggerCmd) -> Result<(), CliError> {
    match cmd {
        LoggerCmd::Get { common } => {
            let mut c = LoggerClient::new(common.connect().await?);
            let l = c.get_logger(GetLoggerRequest {}).await?.into_inner();
            show(common.output, &l);
        }
        LoggerCmd::Set { common, level } => {
            if level.is_empty() {
                return Err(CliError::Usage("a value (--level) must be set".into()));
            }
            let l = Level::parse(&level).ok_or_else(|| {
                CliError::Usage(format!(
                    "the value {level:?} is not a valid setting (panic, fatal, error, warn, info, debug, trace)"
                ))
            })?;
            let mut c = LoggerClient::new(common.connect().await?);
            let r = c
                .set_log_level(SetLogLevelRequest { new_level: l.api() })
                .await?
                .into_inner();
            show(common.output, &r);
        }
        LoggerCmd::Reset { common } => {
            let mut c = LoggerClient::new(common.connect().await?);
            let r = c
                .reset_log_level(ResetLogLevelRequest {})
                .await?
                .into_inner();
            show(common.output, &r);
        }
    }
    Ok(())
}
