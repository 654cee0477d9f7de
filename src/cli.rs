//! The command line: `serve`, `check-config` (and `--explain`), `dev-pki`,
//! `lockout`, `keys`.

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use clap::{Parser, Subcommand};

use crate::{
    aws::iam::Iam,
    aws::keys::{Keys, profiles, rotation::Trigger},
    change::principal::Principals,
    config::{CONFIG_ENV, Config, ConfigError, KeySource},
    custody::{self, Custody, CustodyError, status},
    devpki, explain,
    net::tls,
    server::{self, Listeners, ServeError},
    state::Store,
    state::lockout::{self, LockoutError},
    telemetry,
    telemetry::logs::Output,
};

/// Exit code for bad configuration or usage (EX_USAGE from sysexits.h).
pub const EX_USAGE: u8 = 64;
/// Exit code when the service fails at run time (EX_SOFTWARE).
pub const EX_SOFTWARE: u8 = 70;
/// Exit code when the state store cannot be reached (EX_UNAVAILABLE).
pub const EX_UNAVAILABLE: u8 = 69;
/// How long exporting buffered spans and metrics may take at exit.
const TELEMETRY_FLUSH_BUDGET: Duration = Duration::from_secs(5);
/// How long writing the last log lines and audit events to stdout may take
/// at exit: a stdout that takes nothing must not hold the exit forever.
const LOG_FLUSH_BUDGET: Duration = Duration::from_secs(5);

/// credgate: changes AWS IAM console passwords for mTLS-authenticated
/// services, signing with each caller's own IAM user credentials.
#[derive(Debug, Parser)]
#[command(name = "credgate", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service: mTLS gRPC on server.listen, health on server.admin_listen.
    Serve {
        /// Configuration file (TOML).
        #[arg(long, env = CONFIG_ENV, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate the configuration, its files and certificates (an expired CRL
    /// is a problem, one within 24 hours of its nextUpdate a warning), and
    /// the AWS profiles; exit 64 listing every problem. With --explain, say
    /// which caller an identity is instead.
    CheckConfig {
        /// Configuration file (TOML).
        #[arg(long, env = CONFIG_ENV, value_name = "FILE")]
        config: PathBuf,
        /// Also ask AWS whose key each profile holds (STS GetCallerIdentity,
        /// else IAM GetUser) and check it is the configured iam_user's, and
        /// PING the [state] store when one is configured.
        #[arg(long, conflicts_with = "explain")]
        online: bool,
        /// Explain which [[callers]] entry maps IDENTITY — an exact entry or
        /// a template, with its captures — as which IAM user with which key
        /// (aws_profile, and whether the AWS shared files define it), or why
        /// none does. IDENTITY is a SPIFFE ID (spiffe://...), dns:NAME,
        /// cn:NAME, or a bare name (shown both as a DNS SAN and as a CN).
        /// Only the configuration is checked (not the TLS files); nothing is
        /// sent anywhere. Exit 0 when mapped, 1 when not, 64 for a bad
        /// configuration.
        #[arg(long, value_name = "IDENTITY")]
        explain: Option<String>,
    },
    /// Write a throwaway CA, a server certificate (localhost, 127.0.0.1) and
    /// client certificates for local runs and demos. Not for production.
    DevPki {
        /// Directory to write ca.crt, ca.key, ca.crl, server.crt, server.key,
        /// client-N.crt and client-N.key into.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// SPIFFE ID of a client certificate to issue (repeatable; default
        /// spiffe://credgate.local/ns/dev/sa/dev-client).
        #[arg(long = "client", value_name = "SPIFFE_ID")]
        clients: Vec<String>,
        /// Extra DNS name for the server certificate (repeatable).
        #[arg(long = "server-name", value_name = "NAME")]
        server_names: Vec<String>,
    },
    /// Show or clear one caller's failed-attempt record in the shared
    /// [state] store (Redis/Valkey; the memory state of a running replica
    /// cannot be reached from outside).
    Lockout {
        #[command(subcommand)]
        action: LockoutAction,
    },
    /// Show or rotate the IAM users' access keys credgate holds ([keys]).
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
}

#[derive(Debug, Subcommand)]
enum KeysAction {
    /// Per IAM user (the configured callers', and with Secrets Manager
    /// every user with a secret): the key source, the key id's last four
    /// characters, its age, when it was last used, where its rotation
    /// stands and when the next is due. Never a full key id or a secret.
    /// Exit 69 when AWS cannot be asked.
    Status {
        /// Configuration file (TOML).
        #[arg(long, env = CONFIG_ENV, value_name = "FILE")]
        config: PathBuf,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Rotate one IAM user's key now (keys.source = "secretsmanager"): the
    /// same protocol and lease as the background rotation, finishing an
    /// interrupted rotation first; waits out keys.old_key_grace before the
    /// old key is deactivated and deleted. Exit 0 only when done; 69 when
    /// AWS or the state store is unavailable, or another replica holds the
    /// user's rotation lease; 70 when the rotation failed. Each step is an
    /// audit event (target credgate::audit, action="rotate_key") on stdout.
    Rotate {
        /// The IAM user whose key to rotate.
        #[arg(long, value_name = "NAME")]
        iam_user: String,
        /// Configuration file (TOML).
        #[arg(long, env = CONFIG_ENV, value_name = "FILE")]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum LockoutAction {
    /// Show the caller's failed attempts in the window, its attempts in
    /// flight, and whether (and for how long) it is locked out.
    Status {
        #[command(flatten)]
        target: LockoutTarget,
        /// One JSON object instead of a sentence.
        #[arg(long)]
        json: bool,
    },
    /// Forget the caller's failed attempts, ending a lockout at once.
    /// Written as an audit event (target credgate::audit,
    /// action="lockout_reset") on stdout; the summary goes to stderr.
    Reset {
        #[command(flatten)]
        target: LockoutTarget,
    },
}

#[derive(Debug, clap::Args)]
struct LockoutTarget {
    /// The caller: a SPIFFE ID, or a DNS name or CN that one configured
    /// caller matches; `dns:NAME`, `cn:NAME` or `spiffe:ID` name the kind
    /// when a value is both (state is kept per kind and value).
    #[arg(long, value_name = "IDENTITY")]
    caller: String,
    /// Configuration file (TOML).
    #[arg(long, env = CONFIG_ENV, value_name = "FILE")]
    config: PathBuf,
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let usage_error = e.use_stderr();
            let _ = e.print();
            return if usage_error {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("credgate: cannot start the async runtime: {e}");
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Serve { config } => serve(config).await,
            Command::CheckConfig {
                config,
                explain: Some(identity),
                ..
            } => explain(config, &identity).await,
            Command::CheckConfig { config, online, .. } => check_config(config, online).await,
            Command::DevPki {
                out,
                clients,
                server_names,
            } => dev_pki(out, &server_names, &clients),
            Command::Lockout { action } => lockout_command(action).await,
            Command::Keys { action } => keys_command(action).await,
        }
    });
    // A telemetry flush still stuck on an unreachable collector must not
    // hold the exit (see `serve`).
    runtime.shutdown_timeout(Duration::from_millis(100));
    code
}

async fn serve(path: PathBuf) -> ExitCode {
    let config = match Config::load(&path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("credgate: {}: {e}", path.display());
            return ExitCode::from(EX_USAGE);
        }
    };
    let telemetry = match telemetry::init(config.telemetry.log_format) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("credgate: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let code = run(config, telemetry.output()).await;
    // Log lines and audit events first, on their own budget: the exporters'
    // flush below may be cut short by its budget.
    let telemetry = Arc::new(telemetry);
    let logs = telemetry.clone();
    let unwritten = tokio::task::spawn_blocking(move || logs.flush_logs(LOG_FLUSH_BUDGET))
        .await
        .unwrap_or_default();
    if unwritten > 0 {
        // Not silently: stderr is the one place left to say so.
        eprintln!(
            "credgate: stdout took no output for {}s at exit; {unwritten} bytes of log lines and audit events were not written",
            LOG_FLUSH_BUDGET.as_secs()
        );
    }
    // Flushing blocks until the exporter has sent; keep it off the workers,
    // and bounded: the pod's termination grace must cover preStop + the
    // longest drain (server::longest_drain) + both budgets.
    let flush = tokio::task::spawn_blocking(move || telemetry.shutdown());
    if tokio::time::timeout(TELEMETRY_FLUSH_BUDGET, flush)
        .await
        .is_err()
    {
        tracing::warn!("telemetry flush did not finish in time; buffered spans are dropped");
    }
    code
}

async fn run(config: Config, sink: Output) -> ExitCode {
    let listeners = match Listeners::bind(&config).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    let addr =
        |r: std::io::Result<std::net::SocketAddr>| r.map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(
        tls_addr = addr(listeners.tls_addr()),
        admin_addr = addr(listeners.admin_addr()),
        callers = config.callers.len(),
        templates = config.templates.len(),
        version = env!("CARGO_PKG_VERSION"),
        "credgate listening"
    );
    match server::serve(config, listeners, sink, shutdown_signal()).await {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            // Unusable TLS files are a configuration problem, as in
            // check-config: the operator must fix the files, not retry.
            ExitCode::from(match e {
                ServeError::Tls(_) => EX_USAGE,
                _ => EX_SOFTWARE,
            })
        }
    }
}

/// Resolves on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!(signal = "SIGTERM", "signal received"),
                _ = int.recv() => tracing::info!(signal = "SIGINT", "signal received"),
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}

async fn check_config(path: PathBuf, online: bool) -> ExitCode {
    let problems = match Config::load(&path) {
        Err(ConfigError { problems }) => problems,
        Ok(config) => {
            let tls::Checked {
                mut problems,
                warnings,
            } = tls::check(&config.tls);
            for warning in &warnings {
                eprintln!("{}: warning: {warning}", path.display());
            }
            if config.keys.source == KeySource::Profiles {
                let profiles = config
                    .callers
                    .iter()
                    .filter_map(|c| c.aws_profile.as_deref());
                problems.extend(profiles::missing_profiles(profiles).await);
            }
            // Offline: reads the password and TLS files, connects to nothing.
            if let Err(e) = Store::new(&config.state, &config.limits, Duration::ZERO) {
                problems.push(e);
            }
            if online && problems.is_empty() {
                problems.extend(check_online(&config).await);
            }
            if problems.is_empty() {
                println!(
                    "{}: OK ({} caller(s), {} template(s); mTLS on {}, health on {}{})",
                    path.display(),
                    config.callers.len(),
                    config.templates.len(),
                    config.server.listen,
                    config.server.admin_listen,
                    if online {
                        "; IAM identities verified, state store reachable and noeviction"
                    } else {
                        ""
                    }
                );
                return ExitCode::SUCCESS;
            }
            problems
        }
    };
    eprintln!("{}: {} problem(s):", path.display(), problems.len());
    for p in &problems {
        eprintln!("  - {p}");
    }
    ExitCode::from(EX_USAGE)
}

/// Exit code of `check-config --explain` for an identity no entry maps.
pub const EXIT_NOT_MAPPED: u8 = 1;

async fn explain(path: PathBuf, identity: &str) -> ExitCode {
    let config = match Config::load(&path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("credgate: {}: {e}", path.display());
            return ExitCode::from(EX_USAGE);
        }
    };
    match explain::explain(&config, identity).await {
        Ok(explanation) => {
            print!("{}", explanation.text);
            if explanation.mapped {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_NOT_MAPPED)
            }
        }
        Err(e) => {
            eprintln!("credgate check-config: {e}");
            ExitCode::from(EX_USAGE)
        }
    }
}

async fn check_online(config: &Config) -> Vec<String> {
    let iam = iam(config).await;
    let mut problems = Principals::new()
        .problems(&iam, &custody::signers(&config.callers))
        .await;
    if let Ok(store) = Store::new(&config.state, &config.limits, Duration::ZERO)
        && let Err(e) = store.verify().await
    {
        problems.push(e.to_string());
    }
    problems
}

async fn lockout_command(action: LockoutAction) -> ExitCode {
    let (LockoutAction::Status { target, .. } | LockoutAction::Reset { target }) = &action;
    let config = match Config::load(&target.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("credgate: {}: {e}", target.config.display());
            return ExitCode::from(EX_USAGE);
        }
    };
    let result = match &action {
        LockoutAction::Status { target, json } => lockout::status(&config, &target.caller, *json)
            .await
            .map(|text| println!("{text}")),
        LockoutAction::Reset { target } => {
            // The audit event goes out as the service's do: a JSON line on
            // stdout, in the configured format.
            let telemetry = match telemetry::init(config.telemetry.log_format) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("credgate: {e}");
                    return ExitCode::from(EX_SOFTWARE);
                }
            };
            let result = lockout::reset(&config, &target.caller).await;
            let unwritten =
                tokio::task::spawn_blocking(move || telemetry.flush_logs(LOG_FLUSH_BUDGET))
                    .await
                    .unwrap_or_default();
            if unwritten > 0 {
                eprintln!(
                    "credgate: stdout took no output for {}s; the reset's audit event was not written",
                    LOG_FLUSH_BUDGET.as_secs()
                );
            }
            result.map(|text| eprintln!("{text}"))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("credgate lockout: {e}");
            ExitCode::from(match e {
                LockoutError::Usage(_) => EX_USAGE,
                LockoutError::Store(_) => EX_UNAVAILABLE,
            })
        }
    }
}

/// IAM with the configured key source.
async fn iam(config: &Config) -> Iam {
    Iam::new(Keys::new(&config.aws, &config.keys, &config.callers).await)
}

async fn keys_command(action: KeysAction) -> ExitCode {
    let (KeysAction::Status { config: path, .. } | KeysAction::Rotate { config: path, .. }) =
        &action;
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("credgate: {}: {e}", path.display());
            return ExitCode::from(EX_USAGE);
        }
    };
    let store = match Store::new(&config.state, &config.limits, Duration::ZERO) {
        Ok(store) => store,
        Err(e) => {
            eprintln!("credgate keys: state store: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let custody = Custody::new(
        Arc::new(iam(&config).await),
        store,
        &config.keys,
        custody::signers(&config.callers),
    );
    match action {
        KeysAction::Status { json, .. } => keys_status(&custody, json).await,
        KeysAction::Rotate { iam_user, .. } => keys_rotate(&config, &custody, &iam_user).await,
    }
}

async fn keys_status(custody: &Custody, json: bool) -> ExitCode {
    let reports = match status::reports(custody).await {
        Ok(reports) => reports,
        Err(e) => {
            eprintln!("credgate keys status: cannot list the users with a secret: {e}");
            return ExitCode::from(EX_UNAVAILABLE);
        }
    };
    if json {
        println!("{}", status::json(custody, &reports));
    } else {
        print!("{}", status::text(custody, &reports));
    }
    ExitCode::SUCCESS
}

async fn keys_rotate(config: &Config, custody: &Custody, iam_user: &str) -> ExitCode {
    if !crate::config::is_iam_user_name(iam_user) {
        eprintln!(
            "credgate keys rotate: --iam-user {iam_user:?} is not an IAM user name \
             ([A-Za-z0-9+=,.@_-], 1 to 64 characters)"
        );
        return ExitCode::from(EX_USAGE);
    }
    if config.keys.source == KeySource::SecretsManager && !config.state.is_shared() {
        eprintln!(
            "credgate keys rotate: warning: [state] is in memory, so this command's lease \
             cannot keep a running credgate from rotating the same user: run it only where \
             the service has keys.rotate_after = \"0s\" (docs/operations.md, Key custody)"
        );
    }
    // The audit events go out as the service's do: JSON lines on stdout.
    let telemetry = match telemetry::init(config.telemetry.log_format) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("credgate: {e}");
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    eprintln!(
        "credgate keys rotate: rotating the key of IAM user {iam_user:?}; the old key is \
         deactivated and deleted {} after the new one is promoted",
        humantime::format_duration(config.keys.old_key_grace)
    );
    let result = custody.rotate(iam_user, Trigger::Command).await;
    let unwritten = tokio::task::spawn_blocking(move || telemetry.flush_logs(LOG_FLUSH_BUDGET))
        .await
        .unwrap_or_default();
    if unwritten > 0 {
        eprintln!(
            "credgate: stdout took no output for {}s; audit events of the rotation were not written",
            LOG_FLUSH_BUDGET.as_secs()
        );
    }
    match result {
        Ok(_) => {
            eprintln!(
                "credgate keys rotate: IAM user {iam_user:?} has a new key; the old one is deleted"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("credgate keys rotate: {e}");
            ExitCode::from(match &e {
                CustodyError::Usage(_) => EX_USAGE,
                CustodyError::Busy(_) | CustodyError::Store(_) => EX_UNAVAILABLE,
                CustodyError::Rotation(e) if e.unavailable() => EX_UNAVAILABLE,
                CustodyError::Rotation(_) => EX_SOFTWARE,
            })
        }
    }
}

fn dev_pki(out: PathBuf, server_names: &[String], clients: &[String]) -> ExitCode {
    match devpki::write(&out, server_names, clients) {
        Ok(written) => {
            for file in &written.files {
                println!("wrote {}", file.display());
            }
            for (id, cert) in &written.clients {
                println!("client {id} -> {}", cert.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("credgate dev-pki: {e}");
            ExitCode::from(EX_USAGE)
        }
    }
}
