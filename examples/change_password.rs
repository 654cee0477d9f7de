//! Change the caller's AWS IAM console password through credgate: the client
//! a Rust service team would write, handling every outcome of the error table.
//!
//! ```text
//! CREDGATE_OLD_PASSWORD=... CREDGATE_NEW_PASSWORD=... \
//!   cargo run --example change_password -- \
//!     --ca ca.crt --cert client.crt --key client.key [--target https://localhost:8443]
//! ```
//!
//! - One intended change, one `request_id` (a fresh UUID): every retry reuses
//!   it, so credgate sends the change to IAM at most once and replays the
//!   first attempt's outcome (`--request-id` resumes an earlier change).
//! - Retries only where the error table allows: the reasons that guarantee
//!   nothing was applied (honouring `RetryInfo`), `OUTCOME_UNKNOWN`, and
//!   transport failures; never a wrong old password, a policy violation or
//!   an operator problem.
//! - Exit status: 0 changed (or acceptable, with `--validate-only`), 1
//!   refused, 2 usage, 3 gave up while the outcome is unknown or still
//!   retryable (rerun with the printed `--request-id`).

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use credgate::api::{ChangePasswordRequest, password_service_client::PasswordServiceClient};
use tokio::time::Instant;
use tonic::{
    Code, Status,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};
use tonic_types::{ErrorDetails, StatusExt};

/// Reasons after which credgate guarantees IAM was not asked to change
/// anything: the same request may be sent again.
const NOT_APPLIED: &[&str] = &[
    "IAM_THROTTLED",
    "ENTITY_TEMPORARILY_UNMODIFIABLE",
    "IAM_SERVICE_FAILURE",
    "IAM_UNREACHABLE",
    "STATE_UNAVAILABLE",
    "CALLER_CONCURRENCY_EXCEEDED",
    "DEADLINE_BEFORE_SEND",
    "AUDIT_UNAVAILABLE",
];

#[derive(Debug, Parser)]
#[command(about = "Change this service's IAM console password through credgate")]
struct Args {
    /// credgate's mTLS address.
    #[arg(long, default_value = "https://localhost:8443")]
    target: String,
    /// Name in credgate's server certificate.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// CA bundle that signed credgate's server certificate (PEM).
    #[arg(long)]
    ca: PathBuf,
    /// This service's client certificate (PEM, with any intermediates).
    #[arg(long)]
    cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// Deadline of one attempt, seconds: a little above credgate's
    /// request_timeout (10 s), so credgate reports its own timeout.
    #[arg(long, default_value_t = 12.0)]
    timeout: f64,
    /// Budget for all attempts, seconds.
    #[arg(long, default_value_t = 60.0)]
    deadline: f64,
    #[arg(long, default_value_t = 5)]
    max_attempts: u32,
    /// Resume an earlier change: reuse the request_id it printed.
    #[arg(long)]
    request_id: Option<uuid::Uuid>,
    /// Check the new password against the policy; change nothing.
    #[arg(long)]
    validate_only: bool,
}

fn secret(var: &str) -> Result<String, String> {
    std::env::var(var).map_err(|_| format!("set {var} (passwords never go on the command line)"))
}

async fn connect(args: &Args) -> Result<PasswordServiceClient<Channel>, String> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&args.ca)?))
        .identity(Identity::from_pem(read(&args.cert)?, read(&args.key)?))
        .domain_name(&args.server_name);
    let channel = Channel::from_shared(args.target.clone())
        .map_err(|e| format!("--target: {e}"))?
        .tls_config(tls)
        .map_err(|e| format!("TLS: {e}"))?
        .connect_lazy();
    Ok(PasswordServiceClient::new(channel))
}

/// Prints what went wrong in plain words: reason, IAM's code, every field
/// violation, quota and lockout details.
fn explain(status: &Status, details: &ErrorDetails) {
    let reason = details
        .error_info()
        .map_or("no ErrorInfo", |i| i.reason.as_str());
    println!("  {:?} / {reason}: {}", status.code(), status.message());
    if let Some(info) = details.error_info() {
        let mut metadata: Vec<_> = info.metadata.iter().collect();
        metadata.sort();
        for (k, v) in metadata {
            println!("  {k}={v}");
        }
    }
    if let Some(bad) = details.bad_request() {
        for v in &bad.field_violations {
            println!("  - {}: {}", v.field, v.description);
        }
    }
    if let Some(quota) = details.quota_failure() {
        for v in &quota.violations {
            println!("  - quota {}: {}", v.subject, v.description);
        }
    }
    if reason == "TOO_MANY_FAILED_ATTEMPTS"
        && let Some(delay) = details.retry_info().and_then(|r| r.retry_delay)
    {
        println!(
            "  too many wrong old passwords: try again in {} s",
            delay.as_secs()
        );
    }
}

/// RetryInfo's delay when credgate sent one, else exponential backoff.
fn retry_delay(details: &ErrorDetails, attempt: u32) -> Duration {
    details
        .retry_info()
        .and_then(|r| r.retry_delay)
        .unwrap_or_else(|| {
            Duration::from_millis(500 * 2u64.pow(attempt - 1)).min(Duration::from_secs(8))
        })
}

async fn run(args: Args) -> Result<ExitCode, String> {
    let old = secret("CREDGATE_OLD_PASSWORD")?;
    let new = secret("CREDGATE_NEW_PASSWORD")?;
    let mut client = connect(&args).await?;
    let request_id = args
        .request_id
        .unwrap_or_else(uuid::Uuid::new_v4)
        .to_string();
    println!("request_id {request_id}");
    let give_up_at = Instant::now() + Duration::from_secs_f64(args.deadline);
    for attempt in 1..=args.max_attempts {
        let mut request = tonic::Request::new(ChangePasswordRequest {
            old_password: old.clone(),
            new_password: new.clone(),
            validate_only: args.validate_only,
            request_id: request_id.clone(),
        });
        let left = give_up_at.saturating_duration_since(Instant::now());
        request.set_timeout(Duration::from_secs_f64(args.timeout).min(left));
        let status = match client.change_password(request).await {
            Ok(response) => {
                let response = response.into_inner();
                if args.validate_only {
                    println!(
                        "OK: the new password is acceptable for IAM user {} (nothing changed)",
                        response.iam_user
                    );
                } else {
                    // `replayed`: this is the stored outcome of an earlier
                    // attempt with the same request_id (a retry whose first
                    // try went through); IAM was not called again.
                    let replayed = if response.replayed {
                        ", replayed from an earlier attempt"
                    } else {
                        ""
                    };
                    println!(
                        "OK: password changed for IAM user {} (IAM request id {}{replayed})",
                        response.iam_user, response.iam_request_id
                    );
                }
                return Ok(ExitCode::SUCCESS);
            }
            Err(status) => status,
        };
        let details = status.get_error_details();
        let reason = details
            .error_info()
            .filter(|i| i.domain == "credgate")
            .map(|i| i.reason.as_str());
        println!(
            "attempt {attempt}/{} with request_id {request_id} failed:",
            args.max_attempts
        );
        explain(&status, &details);
        let why = match (status.code(), reason) {
            (_, Some(r)) if NOT_APPLIED.contains(&r) => "credgate did not send the change to IAM",
            (Code::DeadlineExceeded, None | Some("OUTCOME_UNKNOWN")) => {
                "the change may have been applied; credgate will replay its outcome"
            }
            (Code::Unavailable | Code::Unknown | Code::Cancelled, None) => {
                "the call may not have reached credgate"
            }
            _ => {
                println!("not retrying: this needs a different request, or an operator");
                return Ok(ExitCode::from(1));
            }
        };
        let delay = retry_delay(&details, attempt);
        if attempt == args.max_attempts || Instant::now() + delay >= give_up_at {
            break;
        }
        println!(
            "  {why}: retrying with the same request_id in {:.1} s",
            delay.as_secs_f64()
        );
        tokio::time::sleep(delay).await;
    }
    println!(
        "gave up: the outcome is unknown or still retryable; rerun with --request-id {request_id}"
    );
    Ok(ExitCode::from(3))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("change_password: {e}");
            ExitCode::from(2)
        }
    }
}
