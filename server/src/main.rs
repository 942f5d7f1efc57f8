//! `kame-server`: run the server, validate its configuration, or administer it over the admin
//! socket with SPIRE's command tree. Exit status 0 on success, 1 on any error (printed to
//! stderr with what failed).

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kame_server::cli;
use kame_server::config::{Config, LogFormat};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "kame-server",
    version,
    about = "Kame SPIFFE server (SPIRE-compatible)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the server.
    Run {
        #[arg(long, default_value = "server.conf")]
        config: PathBuf,
        /// Expand $VAR and ${VAR} in the configuration from the environment.
        #[arg(long)]
        expand_env: bool,
    },
    /// Checks a configuration file and exits.
    Validate {
        #[arg(long, default_value = "server.conf")]
        config: PathBuf,
        #[arg(long)]
        expand_env: bool,
    },
    /// Checks that the server answers on its admin socket.
    Healthcheck {
        #[arg(long, default_value = kame_server::config::DEFAULT_SOCKET_PATH)]
        socket_path: PathBuf,
        #[arg(long)]
        verbose: bool,
    },
    /// Registration entries.
    #[command(subcommand)]
    Entry(cli::EntryCmd),
    /// The trust bundle and federated bundles.
    #[command(subcommand)]
    Bundle(cli::BundleCmd),
    /// Join tokens.
    #[command(subcommand)]
    Token(cli::TokenCmd),
    /// Attested agents.
    #[command(subcommand)]
    Agent(cli::AgentCmd),
    /// X509-SVIDs.
    #[command(subcommand)]
    X509(cli::X509Cmd),
    /// JWT-SVIDs.
    #[command(subcommand)]
    Jwt(cli::JwtCmd),
    /// Forced rotation and revocation of the server's X.509 and JWT authorities.
    #[command(subcommand)]
    Localauthority(cli::LocalAuthorityCmd),
    /// Taint or revoke the upstream authority that signed an old local authority.
    #[command(subcommand)]
    Upstreamauthority(cli::UpstreamAuthorityCmd),
    /// Federation relationships (the TrustDomain API).
    #[command(subcommand)]
    Federation(cli::FederationCmd),
}

fn init_logging(level: &str, format: LogFormat) {
    // Audit events (local authority operations) are written whatever the log level.
    let filter =
        tracing_subscriber::EnvFilter::try_new(format!("{},kame_audit=info", level.to_lowercase()))
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

async fn real_main() -> anyhow::Result<()> {
    let args = Cli::parse();
    match args.cmd {
        Cmd::Run { config, expand_env } => {
            let cfg = Config::load(&config, expand_env)
                .with_context(|| format!("invalid configuration {}", config.display()))?;
            init_logging(&cfg.log_level, cfg.log_format);
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
        Cmd::Healthcheck {
            socket_path,
            verbose,
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
        eprintln!("Error: {e:#}");
        std::process::exit(1);
    }
}
