//! `kame-agent`: runs the agent, validates its configuration, checks its health, and talks to
//! the Workload API (`api fetch x509|jwt`, `api validate jwt`, `api watch`) with SPIRE's
//! command names. Exit status 0 on success, 1 on any error.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kame_agent::cli;
use kame_agent::config::{Config, DEFAULT_SOCKET_PATH};
use std::path::PathBuf;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    Run(RunFlags),
    /// Checks a configuration file (with the same flags as `run`) and exits.
    Validate(RunFlags),
    /// Checks that the agent serves the Workload API.
    Healthcheck {
        #[command(flatten)]
        socket: SocketArgs,
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
    /// Breaks the glass during a server outage (serves reserve SVIDs, recorded), or shows
    /// its state without --reason.
    #[command(
        after_help = "Examples:\n  kame-agent break-glass --reason \"INC-123 datastore lost\" --duration 4h\n  kame-agent break-glass --reason \"INC-123\" --duration 1h --token token.jwt\n  kame-agent break-glass   (state only)"
    )]
    BreakGlass {
        /// The agent's admin socket (agent.admin_socket_path).
        #[arg(long)]
        admin_socket_path: PathBuf,
        /// Why: goes into the record the server receives.
        #[arg(long)]
        reason: Option<String>,
        /// How long (a Go-style duration such as 4h), at most agent.break_glass.max_duration.
        #[arg(long, value_parser = duration)]
        duration: Option<std::time::Duration>,
        /// A file holding a break-glass token (a JWT-SVID for this agent's SPIFFE ID with
        /// audience kame-break-glass, made in advance with `kame-server jwt mint`).
        #[arg(long)]
        token: Option<PathBuf>,
    },
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
        #[command(flatten)]
        socket: SocketArgs,
    },
}

#[derive(Subcommand)]
enum FetchCmd {
    /// X509-SVIDs (writes svid.N.pem, svid.N.key, bundle.N.pem with --write).
    X509 {
        #[command(flatten)]
        socket: SocketArgs,
        /// Write svid.N.pem, svid.N.key, bundle.N.pem and federated_bundle.N.M.pem here.
        #[arg(long)]
        write: Option<PathBuf>,
        /// Output format: pretty (SPIRE's report) or json (SPIRE's protobuf JSON).
        #[arg(long, value_enum, default_value = "pretty")]
        output: Output,
    },
    /// JWT-SVIDs.
    Jwt {
        #[command(flatten)]
        socket: SocketArgs,
        /// An audience for the tokens; repeat for several.
        #[arg(long, required = true)]
        audience: Vec<String>,
        /// Only the token of this SPIFFE ID (default: one per identity).
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Output format: pretty (SPIRE's report) or json (SPIRE's protobuf JSON).
        #[arg(long, value_enum, default_value = "pretty")]
        output: Output,
    },
}

#[derive(Subcommand)]
enum ValidateCmd {
    /// Validates a JWT-SVID.
    Jwt {
        #[command(flatten)]
        socket: SocketArgs,
        /// The audience the token must carry.
        #[arg(long)]
        audience: String,
        /// The JWT-SVID to validate.
        #[arg(long)]
        svid: String,
        /// Output format: pretty (SPIRE's report) or json (SPIRE's protobuf JSON).
        #[arg(long, value_enum, default_value = "pretty")]
        output: Output,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Pretty,
    Json,
}

/// Which Workload API socket: SPIRE's `-socketPath`, or `-instance` in
/// `$SPIRE_AGENT_PUBLIC_SOCKET_TEMPLATE`, or `$SPIRE_AGENT_PUBLIC_SOCKET`, or
/// `$SPIFFE_ENDPOINT_SOCKET`, or the default.
#[derive(clap::Args)]
struct SocketArgs {
    /// The Workload API socket, a path or unix:///path [default:
    /// /tmp/kame-agent/public/api.sock, or $SPIRE_AGENT_PUBLIC_SOCKET, or
    /// $SPIFFE_ENDPOINT_SOCKET].
    #[arg(long)]
    socket_path: Option<String>,
    /// Instance name to put in place of %i in $SPIRE_AGENT_PUBLIC_SOCKET_TEMPLATE.
    #[arg(long)]
    instance: Option<String>,
}

impl SocketArgs {
    fn addr(&self) -> anyhow::Result<String> {
        Ok(kame_api::spire_cli::resolve_socket(
            self.socket_path.as_deref(),
            self.instance.as_deref(),
            "SPIRE_AGENT_PUBLIC_SOCKET",
            &["SPIFFE_ENDPOINT_SOCKET"],
            DEFAULT_SOCKET_PATH,
            |k| std::env::var(k).ok(),
        )?)
    }
}

/// `run` and `validate`: the configuration file, and SPIRE's flags that override its keys
/// (those SPIRE has and Kame does not are refused by name).
#[derive(clap::Args)]
struct RunFlags {
    /// The configuration file (HCL, SPIRE's keys).
    #[arg(long, default_value = "agent.conf")]
    config: PathBuf,
    /// Expand $VAR and ${VAR} in the configuration from the environment.
    #[arg(long)]
    expand_env: bool,
    /// A join token from the server (overrides agent.join_token).
    #[arg(long)]
    join_token: Option<String>,
    /// A file holding the join token (overrides agent.join_token_file).
    #[arg(long)]
    join_token_file: Option<String>,
    /// Directory for runtime data (overrides agent.data_dir).
    #[arg(long)]
    data_dir: Option<String>,
    /// The server's address (overrides agent.server_address).
    #[arg(long)]
    server_address: Option<String>,
    /// The server's port (overrides agent.server_port).
    #[arg(long)]
    server_port: Option<i64>,
    /// The trust domain (overrides agent.trust_domain).
    #[arg(long)]
    trust_domain: Option<String>,
    /// The bootstrap trust bundle file (overrides agent.trust_bundle_path).
    #[arg(long)]
    trust_bundle: Option<String>,
    /// SPIRE's agent.trust_bundle_url (Kame does not support it: refused by name).
    #[arg(long)]
    trust_bundle_url: Option<String>,
    /// SPIRE's agent.trust_bundle_format (Kame does not support it: refused by name).
    #[arg(long)]
    trust_bundle_format: Option<String>,
    /// The Workload API socket path (overrides agent.socket_path).
    #[arg(long)]
    socket_path: Option<String>,
    #[command(flatten)]
    log: kame_api::spire_cli::LogFlags,
    /// SPIRE's agent.insecure_bootstrap (Kame does not support it: refused by name).
    #[arg(long)]
    insecure_bootstrap: bool,
    /// SPIRE's agent.allow_unauthenticated_verifiers (Kame does not support it: refused by
    /// name).
    #[arg(long)]
    allow_unauthenticated_verifiers: bool,
    /// SPIRE's agent.disable_workload_api (Kame does not support it: refused by name).
    #[arg(long)]
    disable_workload_api: bool,
    /// SPIRE's agent.disable_sds_api (Kame does not support it: refused by name).
    #[arg(long)]
    disable_sds_api: bool,
    /// SPIRE's agent.rebootstrap_mode (Kame does not support it: refused by name).
    #[arg(long)]
    rebootstrap_mode: Option<String>,
    /// SPIRE's agent.rebootstrap_delay (Kame does not support it: refused by name).
    #[arg(long)]
    rebootstrap_delay: Option<String>,
}

impl RunFlags {
    fn load(&self) -> anyhow::Result<Config> {
        let mut o = kame_agent::config::Overrides::default();
        o.string("join_token", self.join_token.as_deref())
            .string("join_token_file", self.join_token_file.as_deref())
            .string("data_dir", self.data_dir.as_deref())
            .string("server_address", self.server_address.as_deref())
            .int("server_port", self.server_port)
            .string("trust_domain", self.trust_domain.as_deref())
            .string("trust_bundle_path", self.trust_bundle.as_deref())
            .string("trust_bundle_url", self.trust_bundle_url.as_deref())
            .string("trust_bundle_format", self.trust_bundle_format.as_deref())
            .string("socket_path", self.socket_path.as_deref())
            .switch("insecure_bootstrap", self.insecure_bootstrap)
            .switch(
                "allow_unauthenticated_verifiers",
                self.allow_unauthenticated_verifiers,
            )
            .switch("disable_workload_api", self.disable_workload_api)
            .switch("disable_sds_api", self.disable_sds_api)
            .string("rebootstrap_mode", self.rebootstrap_mode.as_deref())
            .string("rebootstrap_delay", self.rebootstrap_delay.as_deref());
        self.log.apply(&mut o);
        Config::load_with(&self.config, self.expand_env, &o).with_context(|| {
            format!(
                "Kame agent configuration file {} is invalid",
                self.config.display()
            )
        })
    }
}

async fn real_main() -> anyhow::Result<()> {
    let args = Cli::parse_from(kame_api::spire_cli::args_os(&[(
        &["api", "fetch"],
        "x509",
        &["x509", "jwt", "help"],
    )]));
    match args.cmd {
        cmd @ (Cmd::Run(_) | Cmd::Validate(_)) => daemon(cmd).await,
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
        Cmd::Run(flags) => {
            // Each TPM error logged once, by the agent (not also by the C library).
            kame_tpm::device::quiet_esys_stderr();
            let cfg = flags.load()?;
            kame_api::serving::logging::init(kame_api::serving::logging::Settings {
                level: cfg.log_level,
                format: cfg.log_format,
                file: cfg.log_file.as_deref(),
                source_location: cfg.log_source_location,
                always: &[],
                // tss-esapi logs every context and handle it closes at INFO, and each failed
                // TPM command at ERROR, which the agent reports itself with its context:
                // silent unless the operator asks for debug.
                quiet: &["tss_esapi=off"],
            })?;
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
        Cmd::Validate(flags) => {
            flags.load()?;
            // SPIRE's wording, which scripts look for.
            println!("Kame agent configuration file is valid.");
        }
        _ => anyhow::bail!("not a daemon command"),
    }
    Ok(())
}

async fn client(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Run(_) | Cmd::Validate(_) | Cmd::Completion { .. } => {
            anyhow::bail!("not a client command")
        }
        Cmd::Healthcheck { socket, .. } => cli::healthcheck(&socket.addr()?).await?,
        Cmd::Api(ApiCmd::Fetch(FetchCmd::X509 {
            socket,
            write,
            output,
        })) => cli::fetch_x509(&socket.addr()?, write.as_deref(), output == Output::Json).await?,
        Cmd::Api(ApiCmd::Fetch(FetchCmd::Jwt {
            socket,
            audience,
            spiffe_id,
            output,
        })) => {
            cli::fetch_jwt(
                &socket.addr()?,
                &audience,
                spiffe_id.as_deref(),
                output == Output::Json,
            )
            .await?
        }
        Cmd::Api(ApiCmd::Validate(ValidateCmd::Jwt {
            socket,
            audience,
            svid,
            output,
        })) => cli::validate_jwt(&socket.addr()?, &audience, &svid, output == Output::Json).await?,
        Cmd::Api(ApiCmd::Watch { socket }) => cli::watch(&socket.addr()?).await?,
        Cmd::BreakGlass {
            admin_socket_path,
            reason,
            duration,
            token,
        } => {
            let open = match (reason, duration) {
                (None, None) if token.is_none() => None,
                (Some(r), Some(d)) => {
                    let token = token
                        .map(|p| {
                            std::fs::read_to_string(&p)
                                .map(|t| t.trim().to_string())
                                .with_context(|| format!("reading the token {}", p.display()))
                        })
                        .transpose()?;
                    Some((r, d, token))
                }
                _ => anyhow::bail!("give both --reason and --duration to break the glass"),
            };
            let s = kame_agent::admin::client(&admin_socket_path, open).await?;
            print!("{}", kame_agent::admin::report(&s));
        }
    }
    Ok(())
}

/// Threads for blocking work (TPM calls, key files, workload attestation): a burst queues
/// for these instead of starting hundreds of threads, and idle ones end after a second.
/// Workload attestation has a smaller share of its own (`attestor::CONCURRENT`), so callers
/// cannot hold every thread.
const BLOCKING_THREADS: usize = 32;

fn main() {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS)
        .thread_keep_alive(std::time::Duration::from_secs(1))
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    rt.block_on(async {
        // One rustls provider for the whole process, installed before any TLS use.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        if let Err(e) = real_main().await {
            // The error and its causes, each said once.
            eprintln!("Error: {}", kame_api::errors::chain(e.as_ref()));
            std::process::exit(1);
        }
    });
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
