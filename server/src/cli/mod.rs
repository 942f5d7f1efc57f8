//! `kame-server` admin commands in SPIRE's tree (`entry create`, `bundle show`, `token generate`,
//! `agent list`, `x509 mint`, `jwt mint`, `healthcheck`), talking to the server's admin Unix
//! socket. Output is `pretty` (SPIRE-like text) or `json`. Errors carry the gRPC code and message.

use crate::config::DEFAULT_SOCKET_PATH;
use clap::{Args, Subcommand, ValueEnum};
use kame_api::bundle as codec;
use kame_api::pb::{self, types};
use kame_api::{SpiffeId, TrustDomain};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use tonic::transport::Channel;

mod agent;
mod bundle;
mod entry;
mod federation;
mod log;
mod logger;
mod svid;
pub use agent::*;
pub use bundle::*;
pub use entry::*;
pub use federation::*;
pub use log::{LogArgs, LogCmd, log, monitor_pass};
pub use logger::{LoggerCmd, logger};
pub use svid::*;

mod authority;
pub use authority::{
    AuthorityCmd, LocalAuthorityCmd, UpstreamAuthorityCmd, localauthority, upstreamauthority,
};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot connect to the server at {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("server error ({code:?}): {message}")]
    Rpc { code: tonic::Code, message: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Failed(String),
    /// A service the command reads could not be reached or did not answer (worth retrying).
    #[error("{0}")]
    Unreachable(String),
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        CliError::Rpc {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct Common {
    #[command(flatten)]
    pub socket: SocketArgs,
    /// Output format.
    #[arg(long, value_enum, default_value = "pretty")]
    pub output: Output,
}

impl Common {
    /// A channel to the admin socket these flags name.
    pub async fn connect(&self) -> Result<Channel, CliError> {
        self.socket.connect().await
    }
}

/// Which admin socket: SPIRE's `-socketPath`, or `-instance` in
/// `$SPIRE_SERVER_PRIVATE_SOCKET_TEMPLATE`, or `$SPIRE_SERVER_PRIVATE_SOCKET`, or the default.
#[derive(Debug, Clone, Args)]
pub struct SocketArgs {
    /// Path to the server's admin API socket [default: /tmp/kame-server/private/api.sock,
    /// or $SPIRE_SERVER_PRIVATE_SOCKET].
    #[arg(long)]
    pub socket_path: Option<PathBuf>,
    /// Instance name to put in place of %i in $SPIRE_SERVER_PRIVATE_SOCKET_TEMPLATE.
    #[arg(long)]
    pub instance: Option<String>,
}

impl SocketArgs {
    /// The socket path these flags and the environment choose.
    pub fn path(&self) -> Result<PathBuf, CliError> {
        let flag = self.socket_path.as_ref().map(|p| p.to_string_lossy());
        kame_api::spire_cli::resolve_socket(
            flag.as_deref(),
            self.instance.as_deref(),
            "SPIRE_SERVER_PRIVATE_SOCKET",
            &[],
            DEFAULT_SOCKET_PATH,
            |k| std::env::var(k).ok(),
        )
        .map(PathBuf::from)
        .map_err(|e| CliError::Usage(e.to_string()))
    }

    /// A channel to the chosen socket.
    pub async fn connect(&self) -> Result<Channel, CliError> {
        connect(&self.path()?).await
    }
}

/// Connects to the admin socket (`/path` or `unix:///path`).
pub async fn connect(socket: &Path) -> Result<Channel, CliError> {
    let s = socket.to_string_lossy();
    let path = PathBuf::from(s.strip_prefix("unix://").unwrap_or(&s));
    kame_api::channel::unix(&path).await.map_err(|e| match e {
        kame_api::channel::ClientError::Unix { path, source } => CliError::Connect { path, source },
        other => CliError::Usage(other.to_string()),
    })
}

fn parse_id(flag: &str, s: &str) -> Result<SpiffeId, CliError> {
    SpiffeId::parse(s)
        .map_err(|e| CliError::Usage(format!("{flag}: {s:?} is not a valid SPIFFE ID: {e}")))
}

/// Splits `spiffe://td/path` into the wire message without judging it: the server validates IDs
/// and answers InvalidArgument, so the CLI and API agree on what is valid.
fn loose_id(flag: &str, s: &str) -> Result<types::Spiffeid, CliError> {
    let rest = s
        .strip_prefix("spiffe://")
        .ok_or_else(|| CliError::Usage(format!("{flag}: {s:?} must start with spiffe://")))?;
    let (td, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    Ok(types::Spiffeid {
        trust_domain: td.to_string(),
        path: path.to_string(),
    })
}

fn id_proto(id: &SpiffeId) -> types::Spiffeid {
    types::Spiffeid {
        trust_domain: id.trust_domain().as_str().to_string(),
        path: id.path().to_string(),
    }
}

fn id_str(id: &Option<types::Spiffeid>) -> String {
    match id {
        Some(i) => format!("spiffe://{}{}", i.trust_domain, i.path),
        None => String::new(),
    }
}

fn parse_selector(s: &str) -> Result<types::Selector, CliError> {
    match s.split_once(':') {
        Some((t, v)) if !t.is_empty() && !v.is_empty() => Ok(types::Selector {
            r#type: t.to_string(),
            value: v.to_string(),
        }),
        _ => Err(CliError::Usage(format!(
            "--selector: {s:?} is not of the form type:value"
        ))),
    }
}

fn check_status(s: &Option<types::Status>) -> Result<(), CliError> {
    match s {
        Some(st) if st.code != 0 => Err(CliError::Rpc {
            code: tonic::Code::from_i32(st.code),
            message: st.message.clone(),
        }),
        None => Err(CliError::Failed("server returned no status".into())),
        _ => Ok(()),
    }
}

/// The status of a batch call's first (only) result.
fn check_first<'a>(
    mut statuses: impl Iterator<Item = &'a Option<types::Status>>,
) -> Result<(), CliError> {
    check_status(
        statuses
            .next()
            .ok_or_else(|| CliError::Failed("no result".into()))?,
    )
}

fn print(out: Output, json_v: Value, pretty: String) {
    match out {
        Output::Json => println!("{json_v}"),
        Output::Pretty => print!("{pretty}"),
    }
}

/// A TTL flag's value: seconds (SPIRE's entry flags) or a Go duration such as `1h` (SPIRE's
/// mint flags); either is accepted everywhere.
pub fn ttl_value(s: &str) -> Result<i64, String> {
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    let d = kame_api::conf::parse_duration(s)
        .map_err(|e| format!("{s:?} is neither seconds nor a duration (1h, 30m, 90s): {e}"))?;
    i64::try_from(d.as_secs()).map_err(|_| format!("{s:?} is too long"))
}

fn ttl_arg(flag: &str, v: Option<i64>) -> Result<i32, CliError> {
    match v {
        None => Ok(0),
        Some(t) if t < 0 => Err(CliError::Usage(format!("{flag}: must not be negative"))),
        Some(t) => i32::try_from(t).map_err(|_| {
            CliError::Usage(format!(
                "{flag}: {t} is too large (at most {} seconds)",
                i32::MAX
            ))
        }),
    }
}

// ---------------------------------------------------------------- entry

// ---------------------------------------------------------------- bundle

// ---------------------------------------------------------------- token, agent

// ---------------------------------------------------------------- x509 / jwt mint

/// `healthcheck`: the server answers on its admin socket and has a bundle.
pub async fn healthcheck(socket: &SocketArgs, verbose: bool) -> Result<(), CliError> {
    let mut c = pb::bundle::bundle_client::BundleClient::new(socket.connect().await?);
    let b = c
        .get_bundle(pb::bundle::GetBundleRequest { output_mask: None })
        .await?
        .into_inner();
    if b.x509_authorities.is_empty() {
        return Err(CliError::Failed("server has no X.509 authority yet".into()));
    }
    if verbose {
        eprintln!("Server is healthy (bundle sequence {}).", b.sequence_number);
    }
    println!("Server is healthy.");
    Ok(())
}
