//! `kame-server`: run the server, validate its configuration, or administer it over the admin
//! socket with SPIRE's command tree. Exit status 0 on success, 1 on any error (printed to
//! stderr with what failed).

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kame_server::cli;
use kame_server::config::{Config, LogFormat};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "kame-server",
    version,
    about = "Kame SPIFFE server (SPIRE-compatible)",
    long_about = "Kame SPIFFE server (SPIRE-compatible). SPIRE's spellings work too: \
                  `-spiffeID x`, `-x509SVIDTTL=60`, `-admin=true` are read as `--spiffe-id x`, \
                  `--x509-svid-ttl=60`, `--admin`; a flag given twice keeps the last value.",
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Deadline for an admin command (a Go-style duration such as 5s or 1m; default 5s for
    /// healthcheck, 30s for the others). `run` and `validate` ignore it.
    #[arg(long, global = true, value_parser = duration)]
    timeout: Option<std::time::Duration>,
}

fn duration(s: &str) -> Result<std::time::Duration, String> {
    kame_api::conf::parse_duration(s)
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the server.
    Run {
        /// The configuration file (HCL, SPIRE's keys).
        #[arg(long, default_value = "server.conf")]
        config: PathBuf,
        /// Expand $VAR and ${VAR} in the configuration from the environment.
        #[arg(long)]
        expand_env: bool,
    },
    /// Checks a configuration file and exits.
    Validate {
        /// The configuration file (HCL, SPIRE's keys).
        #[arg(long, default_value = "server.conf")]
        config: PathBuf,
        /// Expand $VAR and ${VAR} in the configuration from the environment.
        #[arg(long)]
        expand_env: bool,
    },
    /// Checks that the server answers on its admin socket.
    Healthcheck {
        /// Path to the server's admin API socket.
        #[arg(long, default_value = kame_server::config::DEFAULT_SOCKET_PATH)]
        socket_path: PathBuf,
        /// Also print the bundle sequence number.
        #[arg(long)]
        verbose: bool,
        /// Accepted for SPIRE's scripts; the check is always the same.
        #[arg(long)]
        shallow: bool,
    },
    /// Registration entries.
    #[command(
        subcommand,
        after_help = "Examples:
  kame-server entry create --parent-id spiffe://example.org/spire/agent/join_token/T \\
      --spiffe-id spiffe://example.org/web --selector unix:uid:1000 --x509-svid-ttl 1h
  kame-server entry create --data entries.json     # SPIRE's {\"entries\": [...]}
  kame-server entry show --selector unix:uid:1000
  kame-server entry delete --entry-id ID"
    )]
    Entry(cli::EntryCmd),
    /// The trust bundle and federated bundles.
    #[command(
        subcommand,
        after_help = "Examples:
  kame-server bundle show --format spiffe > example.org.json
  kame-server bundle set --id other.org --path other.json --format spiffe
  kame-server bundle list"
    )]
    Bundle(cli::BundleCmd),
    /// Join tokens.
    #[command(
        subcommand,
        after_help = "Example:
  kame-server token generate --spiffe-id spiffe://example.org/node1 --ttl 1h"
    )]
    Token(cli::TokenCmd),
    /// Attested agents.
    #[command(
        subcommand,
        after_help = "Examples:
  kame-server agent list --attestation-type tpm_devid
  kame-server agent ban --spiffe-id spiffe://example.org/spire/agent/join_token/T
  kame-server agent purge --expired-for 720h --dry-run"
    )]
    Agent(cli::AgentCmd),
    /// X509-SVIDs.
    #[command(
        subcommand,
        after_help = "Example:
  kame-server x509 mint --spiffe-id spiffe://example.org/batch --ttl 1h --write out/"
    )]
    X509(cli::X509Cmd),
    /// JWT-SVIDs.
    #[command(
        subcommand,
        after_help = "Example:
  kame-server jwt mint --spiffe-id spiffe://example.org/batch --audience api --ttl 5m"
    )]
    Jwt(cli::JwtCmd),
    /// Forced rotation and revocation of the server's X.509 and JWT authorities.
    #[command(
        subcommand,
        after_help = "Examples:
  kame-server localauthority x509 prepare
  kame-server localauthority x509 activate --authority-id NEW
  kame-server localauthority x509 taint --authority-id OLD
  kame-server localauthority x509 revoke --authority-id OLD"
    )]
    Localauthority(cli::LocalAuthorityCmd),
    /// Taint or revoke the upstream authority that signed an old local authority.
    #[command(
        subcommand,
        after_help = "Example:
  kame-server upstreamauthority taint --subject-key-id SKID"
    )]
    Upstreamauthority(cli::UpstreamAuthorityCmd),
    /// Prints a shell completion script.
    ///
    /// Example: kame-server completion bash > /etc/bash_completion.d/kame-server
    Completion {
        /// The shell: bash, zsh, fish, elvish or powershell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Federation relationships (the TrustDomain API).
    #[command(
        subcommand,
        after_help = "Examples:
  kame-server federation create --trust-domain other.org \\
      --bundle-endpoint-url https://bundles.other.org:8443/ --bundle-endpoint-profile https_web
  kame-server federation list
  kame-server federation refresh --id other.org"
    )]
    Federation(cli::FederationCmd),
}

fn init_logging(
    level: &str,
    format: LogFormat,
    file: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    // `log_file`: appended to, never truncated; otherwise stderr.
    let writer = match file {
        Some(p) => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::sync::Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("cannot open log_file {}", p.display()))?,
        )),
        None => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
    };
    // Audit events (local authority operations) are written whatever the log level.
    let filter =
        tracing_subscriber::EnvFilter::try_new(format!("{},kame_audit=info", level.to_lowercase()))
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour only for a person at a terminal, never in files or journals.
        .with_ansi(file.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(writer);
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
    Ok(())
}

async fn real_main() -> anyhow::Result<()> {
    let args = Cli::parse_from(kame_api::spire_cli::args_os(&[]));
    let deadline = match &args.cmd {
        Cmd::Run { .. } | Cmd::Validate { .. } | Cmd::Completion { .. } => None,
        Cmd::Healthcheck { .. } => Some(args.timeout.unwrap_or(Duration::from_secs(5))),
        _ => Some(args.timeout.unwrap_or(Duration::from_secs(30))),
    };
    let Some(deadline) = deadline else {
        return daemon(args.cmd).await;
    };
    // A command's output piped into `head` ends it as it ends C and Go tools: by SIGPIPE.
    sigpipe::reset();
    tokio::time::timeout(deadline, admin(args.cmd))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "no answer from the server within {deadline:?} (is it running, or stopped?); --timeout sets the deadline"
            )
        })?
}

async fn daemon(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Run { config, expand_env } => {
            let cfg = Config::load(&config, expand_env)
                .with_context(|| format!("invalid configuration {}", config.display()))?;
            init_logging(&cfg.log_level, cfg.log_format, cfg.log_file.as_deref())?;
            kame_server::run::run(cfg).await?;
        }
        Cmd::Validate { config, expand_env } => {
            let cfg = Config::load(&config, expand_env)
                .with_context(|| format!("invalid configuration {}", config.display()))?;
            for w in cfg.warnings() {
                eprintln!("warning: {w}");
            }
            println!("Configuration is valid.");
        }
        Cmd::Completion { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "kame-server",
                &mut std::io::stdout(),
            );
        }
        other => admin(other).await?,
    }
    Ok(())
}

async fn admin(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Run { .. } | Cmd::Validate { .. } | Cmd::Completion { .. } => {
            anyhow::bail!("not an admin command")
        }
        Cmd::Healthcheck {
            socket_path,
            verbose,
            ..
        } => cli::healthcheck(&socket_path, verbose).await?,
        Cmd::Entry(c) => cli::entry(c).await?,
        Cmd::Bundle(c) => cli::bundle(c).await?,
        Cmd::Token(c) => cli::token(c).await?,
        Cmd::Agent(c) => cli::agent(c).await?,
        Cmd::X509(c) => cli::x509(c).await?,
        Cmd::Jwt(c) => cli::jwt(c).await?,
        Cmd::Localauthority(c) => cli::localauthority(c).await?,
        Cmd::Upstreamauthority(c) => cli::upstreamauthority(c).await?,
        Cmd::Federation(c) => cli::federation(c).await?,
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    // One rustls provider for the whole process, installed before any TLS use.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    if let Err(e) = real_main().await {
        // The error and its causes, each said once.
        eprintln!("Error: {}", kame_api::errors::chain(e.as_ref()));
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Every command says what it does, every flag has help text, every group an example.
    #[test]
    fn cli_every_command_and_flag_has_help() {
        let cmd = Cli::command();
        let missing = kame_api::spire_cli::missing_help(&cmd);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
        cmd.debug_assert();
    }
}
