//! `kame-server`: run the server, validate its configuration, or administer it over the admin
//! socket with SPIRE's command tree. Exit status 0 on success, 1 on any error (printed to
//! stderr with what failed).

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kame_server::cli;
use kame_server::config::Config;
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
    Run(RunFlags),
    /// Checks a configuration file (with the same flags as `run`) and exits.
    Validate(RunFlags),
    /// Checks that the server answers on its admin socket.
    Healthcheck {
        #[command(flatten)]
        socket: cli::SocketArgs,
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
    /// The running server's log level (the Logger API).
    #[command(
        subcommand,
        after_help = "Examples:
  kame-server logger get
  kame-server logger set --level debug
  kame-server logger reset"
    )]
    Logger(cli::LoggerCmd),
    /// The issuance transparency log, through its RFC 6962 read API: every answer checked
    /// with the log's public key.
    #[command(
        subcommand,
        after_help = "Examples:
  kame-server log sth --url http://127.0.0.1:8085 --log-key /var/lib/kame/server/transparency_log_key.pem
  kame-server log proof --url http://127.0.0.1:8085 --log-key key.pem --cert svid-and-issuer.pem
  kame-server log sth --url http://127.0.0.1:8085 --log-key key.pem --save sth-monday.json
  kame-server log consistency --url http://127.0.0.1:8085 --log-key key.pem --from-sth sth-monday.json
  kame-server log get --url http://127.0.0.1:8085 --log-key key.pem --start 0 --end 9
  kame-server log verify --url http://127.0.0.1:8085 --log-key key.pem"
    )]
    Log(cli::LogCmd),
}

/// `run` and `validate`: the configuration file, and SPIRE's flags that override its keys.
#[derive(clap::Args)]
struct RunFlags {
    /// The configuration file (HCL, SPIRE's keys).
    #[arg(long, default_value = "server.conf")]
    config: PathBuf,
    /// Expand $VAR and ${VAR} in the configuration from the environment.
    #[arg(long)]
    expand_env: bool,
    /// IP address to serve agents and workloads on (overrides server.bind_address).
    #[arg(long)]
    bind_address: Option<String>,
    /// Port to serve agents and workloads on (overrides server.bind_port).
    #[arg(long)]
    server_port: Option<i64>,
    /// Path of the admin API socket (overrides server.socket_path).
    #[arg(long)]
    socket_path: Option<String>,
    /// Directory for runtime data (overrides server.data_dir).
    #[arg(long)]
    data_dir: Option<String>,
    /// The trust domain (overrides server.trust_domain).
    #[arg(long)]
    trust_domain: Option<String>,
    #[command(flatten)]
    log: kame_api::spire_cli::LogFlags,
}

impl RunFlags {
    fn load(&self) -> anyhow::Result<Config> {
        let mut o = kame_server::config::Overrides::default();
        o.string("bind_address", self.bind_address.as_deref())
            .int("bind_port", self.server_port)
            .string("socket_path", self.socket_path.as_deref())
            .string("data_dir", self.data_dir.as_deref())
            .string("trust_domain", self.trust_domain.as_deref());
        self.log.apply(&mut o);
        Config::load_with(&self.config, self.expand_env, &o).with_context(|| {
            format!(
                "Kame server configuration file {} is invalid",
                self.config.display()
            )
        })
    }
}

async fn real_main() -> anyhow::Result<()> {
    let args = Cli::parse_from(kame_api::spire_cli::args_os(&[]));
    let deadline = match &args.cmd {
        Cmd::Run(_) | Cmd::Validate(_) | Cmd::Completion { .. } => None,
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
        Cmd::Run(flags) => {
            let cfg = flags.load()?;
            kame_api::serving::logging::init(kame_api::serving::logging::Settings {
                level: cfg.log_level,
                format: cfg.log_format,
                file: cfg.log_file.as_deref(),
                source_location: cfg.log_source_location,
                // Audit events (local authority operations, and with audit_log_enabled every
                // API call) are written whatever the level.
                always: &["kame_audit=info"],
                quiet: &[],
            })?;
            kame_server::run::run(cfg).await?;
        }
        Cmd::Validate(flags) => {
            let cfg = flags.load()?;
            for w in cfg.warnings() {
                eprintln!("warning: {w}");
            }
            // SPIRE's wording, which scripts look for.
            println!("Kame server configuration file is valid.");
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
        Cmd::Run(_) | Cmd::Validate(_) | Cmd::Completion { .. } => {
            anyhow::bail!("not an admin command")
        }
        Cmd::Healthcheck {
            socket, verbose, ..
        } => cli::healthcheck(&socket, verbose).await?,
        Cmd::Entry(c) => cli::entry(c).await?,
        Cmd::Bundle(c) => cli::bundle(c).await?,
        Cmd::Token(c) => cli::token(c).await?,
        Cmd::Agent(c) => cli::agent(c).await?,
        Cmd::X509(c) => cli::x509(c).await?,
        Cmd::Jwt(c) => cli::jwt(c).await?,
        Cmd::Localauthority(c) => cli::localauthority(c).await?,
        Cmd::Upstreamauthority(c) => cli::upstreamauthority(c).await?,
        Cmd::Federation(c) => cli::federation(c).await?,
        Cmd::Logger(c) => cli::logger(c).await?,
        Cmd::Log(c) => cli::log(c).await?,
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
