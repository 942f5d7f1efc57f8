//! `kame-agent`: runs the agent, validates its configuration, checks its health, and talks to
//! the Workload API (`api fetch x509|jwt`, `api validate jwt`, `api watch`) with SPIRE's
//! command names. Exit status 0 on success, 1 on any error.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kame_agent::cli;
use kame_agent::config::{Config, DEFAULT_SOCKET_PATH};
use kame_api::conf::LogFormat;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "kame-agent",
    version,
    about = "Kame SPIFFE agent (SPIRE-compatible)",
    long_about = "Kame SPIFFE agent (SPIRE-compatible). SPIRE's spellings work too: \
                  `-socketPath s` is read as `--socket-path s`, `api fetch` alone as \
                  `api fetch x509`; a flag given twice keeps the last value.",
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Deadline for `healthcheck`, `api fetch` and `api validate` (a Go-style duration such as
    /// 5s; default 5s, as SPIRE's). `run`, `validate` and `api watch` ignore it.
    #[arg(long, global = true, value_parser = duration)]
    timeout: Option<std::time::Duration>,
}

fn duration(s: &str) -> Result<std::time::Duration, String> {
    kame_api::conf::parse_duration(s)
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the agent.
    Run {
        /// The configuration file (HCL, SPIRE's keys).
        #[arg(long, default_value = "agent.conf")]
        config: PathBuf,
        /// Expand $VAR and ${VAR} in the configuration from the environment.
        #[arg(long)]
        expand_env: bool,
        /// Overrides agent.join_token.
        #[arg(long)]
        join_token: Option<String>,
    },
    /// Checks a configuration file and exits.
    Validate {
        /// The configuration file (HCL, SPIRE's keys).
        #[arg(long, default_value = "agent.conf")]
        config: PathBuf,
        /// Expand $VAR and ${VAR} in the configuration from the environment.
        #[arg(long)]
        expand_env: bool,
    },
    /// Checks that the agent serves the Workload API.
    Healthcheck {
        /// The Workload API socket: a path or unix:///path.
        #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET", default_value = DEFAULT_SOCKET_PATH)]
        socket_path: String,
        /// Accepted for SPIRE's scripts; the check is always the same.
        #[arg(long)]
        shallow: bool,
        /// Accepted for SPIRE's scripts; the check is always the same.
        #[arg(long)]
        verbose: bool,
    },
    /// Workload API client.
    #[command(
        subcommand,
        after_help = "Examples:\n  kame-agent api fetch x509 --write /tmp/svids\n  kame-agent api fetch jwt --audience api\n  kame-agent api validate jwt --audience api --svid TOKEN\n  kame-agent api watch"
    )]
    Api(ApiCmd),
    /// Prints a shell completion script.
    ///
    /// Example: kame-agent completion bash > /etc/bash_completion.d/kame-agent
    Completion {
        /// The shell: bash, zsh, fish, elvish or powershell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum ApiCmd {
    /// Fetches SVIDs.
    #[command(
        subcommand,
        after_help = "Examples:\n  kame-agent api fetch x509 --socket-path unix:///tmp/kame-agent/public/api.sock\n  kame-agent api fetch jwt --audience api --spiffe-id spiffe://example.org/web"
    )]
    Fetch(FetchCmd),
    /// Validates SVIDs.
    #[command(
        subcommand,
        after_help = "Example:\n  kame-agent api validate jwt --audience api --svid \"$TOKEN\""
    )]
    Validate(ValidateCmd),
    /// Prints X509-SVID updates as they arrive.
    Watch {
        /// The Workload API socket: a path or unix:///path.
        #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET", default_value = DEFAULT_SOCKET_PATH)]
        socket_path: String,
    },
}

#[derive(Subcommand)]
enum FetchCmd {
    /// X509-SVIDs (writes svid.N.pem, svid.N.key, bundle.N.pem with --write).
    X509 {
        /// The Workload API socket: a path or unix:///path.
        #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET", default_value = DEFAULT_SOCKET_PATH)]
        socket_path: String,
        /// Write svid.N.pem, svid.N.key, bundle.N.pem and federated_bundle.N.M.pem here.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// JWT-SVIDs.
    Jwt {
        /// The Workload API socket: a path or unix:///path.
        #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET", default_value = DEFAULT_SOCKET_PATH)]
        socket_path: String,
        /// An audience for the tokens; repeat for several.
        #[arg(long, required = true)]
        audience: Vec<String>,
        /// Only the token of this SPIFFE ID (default: one per identity).
        #[arg(long)]
        spiffe_id: Option<String>,
    },
}

#[derive(Subcommand)]
enum ValidateCmd {
    /// Validates a JWT-SVID.
    Jwt {
        /// The Workload API socket: a path or unix:///path.
        #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET", default_value = DEFAULT_SOCKET_PATH)]
        socket_path: String,
        /// The audience the token must carry.
        #[arg(long)]
        audience: String,
        /// The JWT-SVID to validate.
        #[arg(long)]
        svid: String,
    },
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
    // tss-esapi logs every context and handle it closes at INFO: kept to warnings unless the
    // operator asks for debug.
    let level = level.to_lowercase();
    let directive = match level.as_str() {
        "debug" | "trace" => level.clone(),
        _ => format!("{level},tss_esapi=warn"),
    };
    let filter = tracing_subscriber::EnvFilter::try_new(directive)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tss_esapi=warn"));
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
    let args = Cli::parse_from(kame_api::spire_cli::args_os(&[(
        &["api", "fetch"],
        "x509",
        &["x509", "jwt", "help"],
    )]));
    match args.cmd {
        cmd @ (Cmd::Run { .. } | Cmd::Validate { .. }) => daemon(cmd).await,
        Cmd::Completion { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "kame-agent",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        cmd => {
            // Output piped into `head` ends the command by SIGPIPE, as C and Go tools end.
            sigpipe::reset();
            if matches!(cmd, Cmd::Api(ApiCmd::Watch { .. })) {
                return client(cmd).await;
            }
            let deadline = args.timeout.unwrap_or(std::time::Duration::from_secs(5));
            tokio::time::timeout(deadline, client(cmd))
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "no answer from the agent within {deadline:?} (is it running, or stopped?); --timeout sets the deadline"
                    )
                })?
        }
    }
}

async fn daemon(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Run {
            config,
            expand_env,
            join_token,
        } => {
            let mut cfg = Config::load(&config, expand_env)
                .with_context(|| format!("invalid configuration {}", config.display()))?;
            if join_token.is_some() {
                cfg.join_token = join_token.map(kame_api::Secret::new);
            }
            init_logging(&cfg.log_level, cfg.log_format, cfg.log_file.as_deref())?;
            let mut running = kame_agent::run::start(&cfg).await?;
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .context("installing the SIGTERM handler")?;
            let fatal = tokio::select! {
                _ = tokio::signal::ctrl_c() => None,
                _ = term.recv() => None,
                why = running.fatal() => Some(why),
            };
            tracing::info!("stopping");
            running.stop().await;
            if let Some(why) = fatal {
                anyhow::bail!("{why}");
            }
        }
        Cmd::Validate { config, expand_env } => {
            Config::load(&config, expand_env)
                .with_context(|| format!("invalid configuration {}", config.display()))?;
            println!("Configuration is valid.");
        }
        _ => anyhow::bail!("not a daemon command"),
    }
    Ok(())
}

async fn client(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Run { .. } | Cmd::Validate { .. } | Cmd::Completion { .. } => {
            anyhow::bail!("not a client command")
        }
        Cmd::Healthcheck { socket_path, .. } => cli::healthcheck(&socket_path).await?,
        Cmd::Api(ApiCmd::Fetch(FetchCmd::X509 { socket_path, write })) => {
            cli::fetch_x509(&socket_path, write.as_deref()).await?
        }
        Cmd::Api(ApiCmd::Fetch(FetchCmd::Jwt {
            socket_path,
            audience,
            spiffe_id,
        })) => cli::fetch_jwt(&socket_path, &audience, spiffe_id.as_deref()).await?,
        Cmd::Api(ApiCmd::Validate(ValidateCmd::Jwt {
            socket_path,
            audience,
            svid,
        })) => cli::validate_jwt(&socket_path, &audience, &svid).await?,
        Cmd::Api(ApiCmd::Watch { socket_path }) => cli::watch(&socket_path).await?,
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
