//! Load generator behind `scripts/bench` (see `docs/benchmark.md`).
//!
//! Runs IAM `ChangePassword` in three modes, one after the other, against the
//! same IAM endpoint and the same IAM users, and prints a Markdown table:
//!
//! - `direct`: aws-sdk-iam straight to IAM, signed with the user's own key.
//!   The baseline: what a caller that held the key would pay.
//! - `credgate`: the same change over mTLS through credgate, which signs the
//!   same IAM call with the same key.
//! - `credgate-validate`: `validate_only = true` through credgate. No IAM call
//!   (the account policy comes from credgate's cache), so this is credgate's
//!   own cost: mTLS, identity mapping, password and policy checks, audit.
//!
//! Worker `i` (1-based) owns IAM user and AWS profile `{user_prefix}{i}` and
//! presents `client-{i}.crt` from the `credgate dev-pki` directory, whose
//! SPIFFE ID credgate maps to that user. Each worker alternates its user's
//! password between two values, so every call must succeed; any error is
//! counted, shown, and makes the run exit non-zero.
//!
//! credgate's CPU time (utime + stime) and peak RSS (VmHWM) come from
//! `/proc/PID`, so this runs on Linux only, beside credgate and as its user
//! (resetting VmHWM between phases writes `/proc/PID/clear_refs`). The script
//! that sets all of this up is `scripts/bench`.

use std::{
    fmt::Write as _,
    fs,
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use aws_config::{
    BehaviorVersion, Region, profile::ProfileFileCredentialsProvider, retry::RetryConfig,
};
use aws_sdk_iam::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_smithy_http_client::{
    Builder,
    tls::{Provider, rustls_provider::CryptoMode},
};
use clap::{Parser, ValueEnum};
use credgate::api::{ChangePasswordRequest, password_service_client::PasswordServiceClient};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// Clock ticks per second in `/proc/PID/stat`: the kernel's USER_HZ, which
/// is part of the Linux ABI and 100 on every architecture credgate ships for
/// (x86_64, aarch64). One tick is 10 ms, hence enough requests per mode.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

/// Longest wait for one call, so that a hung peer fails the run instead of
/// stalling it: far above any latency seen (seconds at 512 workers), and
/// above credgate's own 10 s request timeout, which should answer first.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How many distinct error messages to show; the count covers all of them.
const ERRORS_SHOWN: usize = 5;

#[derive(Parser)]
#[command(about = "ChangePassword load: IAM direct vs. through credgate")]
struct Args {
    /// credgate's mTLS address.
    #[arg(long)]
    credgate: SocketAddr,
    /// credgate's process id (CPU time and peak RSS from /proc).
    #[arg(long)]
    credgate_pid: u32,
    /// The IAM emulator's process id: its CPU time is reported too.
    #[arg(long)]
    emulator_pid: Option<u32>,
    /// `credgate dev-pki` output: ca.crt and client-N.crt/.key.
    #[arg(long)]
    pki: PathBuf,
    /// The IAM endpoint credgate uses, for the direct baseline.
    #[arg(long)]
    iam_endpoint: String,
    /// Signing region.
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// Worker i acts as IAM user and AWS profile `{prefix}{i}`.
    #[arg(long, default_value = "bench-")]
    user_prefix: String,
    /// Concurrent workers, i.e. calls in flight (one IAM user each).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Measured requests per mode that calls IAM (direct, credgate).
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    /// Measured requests for credgate-validate. It is ~10-50x faster than a
    /// call that reaches IAM, so it needs more requests to last long enough
    /// for stable percentiles and for CPU time above /proc's 10 ms ticks.
    #[arg(long, default_value_t = 10_000)]
    validate_requests: usize,
    /// Unmeasured requests per mode before measuring (connections, caches).
    #[arg(long, default_value_t = 40)]
    warmup: usize,
    /// Every user's password at start (from the environment: no password in argv).
    #[arg(long, env = "BENCH_PASSWORD_A", hide_env_values = true)]
    password_a: String,
    /// The password every call alternates with.
    #[arg(long, env = "BENCH_PASSWORD_B", hide_env_values = true)]
    password_b: String,
    /// Modes to run, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "direct,credgate,credgate-validate"
    )]
    modes: Vec<Mode>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// aws-sdk-iam ChangePassword straight to IAM.
    Direct,
    /// ChangePassword through credgate.
    Credgate,
    /// ChangePassword with validate_only through credgate.
    CredgateValidate,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Credgate => "credgate",
            Mode::CredgateValidate => "credgate-validate",
        }
    }
}

/// One concurrent caller and the one IAM user it owns.
struct Worker {
    iam_user: String,
    /// Whether the user's current password is `password_a`.
    at_a: bool,
    direct: aws_sdk_iam::Client,
    credgate: PasswordServiceClient<Channel>,
}

impl Worker {
    /// One ChangePassword from the current password to the other one.
    /// `Err` carries a message for the report.
    async fn change(&mut self, mode: Mode, passwords: &(String, String)) -> Result<(), String> {
        let (old, new) = if self.at_a {
            (&passwords.0, &passwords.1)
        } else {
            (&passwords.1, &passwords.0)
        };
        match mode {
            Mode::Direct => {
                self.direct
                    .change_password()
                    .old_password(old)
                    .new_password(new)
                    .send()
                    .await
                    // IAM's code and message only: the full error repeats the
                    // body and its request id, so no two would compare equal.
                    .map_err(|e| match e.code() {
                        Some(code) => format!("IAM {code}: {}", e.message().unwrap_or_default()),
                        None => format!("IAM: {}", DisplayErrorContext(&e)),
                    })?;
            }
            Mode::Credgate | Mode::CredgateValidate => {
                let validate_only = mode == Mode::CredgateValidate;
                let answer = self
                    .credgate
                    .change_password(ChangePasswordRequest {
                        old_password: old.clone(),
                        new_password: new.clone(),
                        validate_only,
                        request_id: String::new(),
                    })
                    .await
                    .map_err(|s| format!("gRPC {:?}: {}", s.code(), s.message()))?
                    .into_inner();
                // A success for the wrong user, or a "change" without IAM's
                // request id, would make the numbers meaningless.
                if answer.iam_user != self.iam_user {
                    return Err(format!(
                        "credgate answered for {:?}, expected {:?}",
                        answer.iam_user, self.iam_user
                    ));
                }
                if answer.request_id.is_empty() != validate_only {
                    return Err(format!(
                        "credgate request_id {:?} with validate_only={validate_only}",
                        answer.request_id
                    ));
                }
                if validate_only {
                    return Ok(());
                }
            }
        }
        self.at_a = !self.at_a;
        Ok(())
    }
}

/// Latencies of the successful calls and the errors of one phase.
#[derive(Default)]
struct Outcome {
    latencies: Vec<Duration>,
    errors: Vec<String>,
    elapsed: Duration,
}

/// Runs `total` calls of `mode` spread over all workers (each takes the next
/// ticket until none is left), and hands the workers back with their
/// password state.
async fn run_phase(
    workers: Vec<Worker>,
    mode: Mode,
    total: usize,
    passwords: &Arc<(String, String)>,
) -> (Vec<Worker>, Outcome) {
    let tickets = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = workers
        .into_iter()
        .map(|mut worker| {
            let tickets = tickets.clone();
            let passwords = passwords.clone();
            tokio::spawn(async move {
                let mut outcome = Outcome::default();
                while tickets.fetch_add(1, Ordering::Relaxed) < total {
                    let t0 = Instant::now();
                    match tokio::time::timeout(CALL_TIMEOUT, worker.change(mode, &passwords)).await
                    {
                        Ok(Ok(())) => outcome.latencies.push(t0.elapsed()),
                        Ok(Err(e)) => outcome.errors.push(e),
                        Err(_) => outcome
                            .errors
                            .push(format!("no answer within {CALL_TIMEOUT:?}")),
                    }
                }
                (worker, outcome)
            })
        })
        .collect();
    let mut workers = Vec::with_capacity(tasks.len());
    let mut all = Outcome::default();
    for task in tasks {
        let (worker, outcome) = task.await.expect("a benchmark worker panicked");
        workers.push(worker);
        all.latencies.extend(outcome.latencies);
        all.errors.extend(outcome.errors);
    }
    all.elapsed = started.elapsed();
    (workers, all)
}

/// CPU time (user + system) a process has used so far, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    // The command name (field 2) is in parentheses and may contain spaces;
    // fields are counted from after its closing parenthesis, where field 3
    // (state) starts. utime and stime are fields 14 and 15.
    let after_comm = &stat[stat.rfind(')').expect("/proc/PID/stat has (comm)") + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks = |field: usize| -> f64 {
        fields[field - 3]
            .parse::<u64>()
            .unwrap_or_else(|e| panic!("field {field} of {path}: {e}")) as f64
    };
    (ticks(14) + ticks(15)) / CLOCK_TICKS_PER_SECOND
}

/// A `kB` line of `/proc/PID/status` (`VmHWM`, `VmRSS`), in MiB.
fn status_mib(pid: u32, key: &str) -> f64 {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {path}"));
    kib as f64 / 1024.0
}

/// credgate's peak resident memory, per phase.
///
/// VmHWM is a high-water mark since the process started; writing `5` to
/// `/proc/PID/clear_refs` resets it to the current RSS, which makes it a
/// peak per phase. The first calls of each caller (loading its credentials,
/// fetching the account policy) may peak higher than the steady state, so
/// warm-up and measured requests are tracked apart.
struct PeakRss {
    pid: u32,
    /// Whether VmHWM could be reset; if not, every peak is since start.
    resettable: bool,
    /// The highest peak seen, start-up included.
    overall_mib: f64,
}

impl PeakRss {
    fn new(pid: u32) -> Self {
        let overall_mib = status_mib(pid, "VmHWM");
        let mut peak = Self {
            pid,
            resettable: true,
            overall_mib,
        };
        peak.resettable = peak.reset();
        peak
    }

    /// Starts a new peak window; false when the kernel refused.
    fn reset(&self) -> bool {
        fs::write(format!("/proc/{}/clear_refs", self.pid), "5").is_ok()
    }

    /// The peak since the last [`reset`](Self::reset), in MiB.
    fn take(&mut self) -> f64 {
        let peak = status_mib(self.pid, "VmHWM");
        self.overall_mib = self.overall_mib.max(peak);
        if self.resettable {
            self.reset();
        }
        peak
    }
}

/// The nearest-rank percentile of sorted latencies, in milliseconds.
fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1000.0
}

/// One row of the report.
struct Row {
    mode: Mode,
    requests: usize,
    errors: usize,
    throughput: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    credgate_cpu_per_1000: f64,
    emulator_cpu_per_1000: Option<f64>,
    warmup_peak_mib: f64,
    peak_mib: f64,
}

async fn connect(args: &Args, ca: &Certificate, index: usize) -> PasswordServiceClient<Channel> {
    let read = |name: String| {
        let path = args.pki.join(&name);
        fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    };
    let identity = Identity::from_pem(
        read(format!("client-{index}.crt")),
        read(format!("client-{index}.key")),
    );
    let tls = ClientTlsConfig::new()
        .ca_certificate(ca.clone())
        // dev-pki's server certificate names localhost and 127.0.0.1.
        .domain_name("localhost")
        .identity(identity);
    let channel = Channel::from_shared(format!("https://{}", args.credgate))
        .expect("credgate URI")
        .tls_config(tls)
        .expect("client TLS config")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("mTLS connection to credgate at {}: {e}", args.credgate));
    PasswordServiceClient::new(channel)
}

/// The direct baseline's IAM client, configured like credgate's own: the
/// profile's key only, no SDK retries, one shared HTTP connection pool.
async fn direct_client(
    args: &Args,
    http: &aws_sdk_iam::config::SharedHttpClient,
    profile: &str,
) -> aws_sdk_iam::Client {
    let config = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(args.region.clone()))
        .endpoint_url(&args.iam_endpoint)
        .credentials_provider(
            ProfileFileCredentialsProvider::builder()
                .profile_name(profile)
                .build(),
        )
        .http_client(http.clone())
        .retry_config(RetryConfig::disabled())
        .load()
        .await;
    aws_sdk_iam::Client::new(&config)
}

/// CPUs and load average: the three processes share this machine, and a
/// busy machine (a build running beside) skews every number.
fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "{cpus} CPUs, load average {} before the run",
        load.join(" ")
    )
}

fn render(args: &Args, machine: &str, rows: &[Row], idle_rss_mib: f64, rss: &PeakRss) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "{} concurrent workers; each mode: {} warm-up requests, then the measured ones; {machine}.\n",
        args.concurrency, args.warmup
    );
    let _ = writeln!(
        out,
        "| mode | requests | errors | req/s | p50 ms | p90 ms | p99 ms | max ms \
         | credgate CPU s / 1000 req | emulator CPU s / 1000 req \
         | credgate peak RSS MiB, warm-up / measured |"
    );
    let _ = writeln!(out, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for r in rows {
        let emulator = r
            .emulator_cpu_per_1000
            .map_or_else(|| "–".to_owned(), |c| format!("{c:.2}"));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {:.1} / {:.1} |",
            r.mode.name(),
            r.requests,
            r.errors,
            r.throughput,
            r.p50,
            r.p90,
            r.p99,
            r.max,
            r.credgate_cpu_per_1000,
            emulator,
            r.warmup_peak_mib,
            r.peak_mib,
        );
    }
    let _ = writeln!(
        out,
        "\ncredgate RSS: {idle_rss_mib:.1} MiB with all clients connected, before any request; \
         peak {:.1} MiB over the whole run, start-up included (VmHWM).",
        rss.overall_mib
    );
    if !rss.resettable {
        let _ = writeln!(
            out,
            "(VmHWM could not be reset: every peak above is since credgate started.)"
        );
    }
    let find = |mode| rows.iter().find(|r| r.mode == mode);
    // Only a comparison of two clean runs means anything.
    if let (Some(d), Some(c)) = (find(Mode::Direct), find(Mode::Credgate))
        && d.errors == 0
        && c.errors == 0
    {
        let _ = writeln!(
            out,
            "credgate's added latency over direct: p50 {:+.2} ms, p90 {:+.2} ms, p99 {:+.2} ms; \
             throughput {:.0}% of direct.",
            c.p50 - d.p50,
            c.p90 - d.p90,
            c.p99 - d.p99,
            100.0 * c.throughput / d.throughput,
        );
    }
    out
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let machine = machine();
    assert!(args.concurrency > 0, "--concurrency must be at least 1");
    let passwords = Arc::new((args.password_a.clone(), args.password_b.clone()));

    let ca_path = args.pki.join("ca.crt");
    let ca = Certificate::from_pem(
        fs::read(&ca_path).unwrap_or_else(|e| panic!("reading {}: {e}", ca_path.display())),
    );
    let http = Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::AwsLc))
        .build_https();
    let mut workers = Vec::with_capacity(args.concurrency);
    for i in 1..=args.concurrency {
        let iam_user = format!("{}{i}", args.user_prefix);
        workers.push(Worker {
            direct: direct_client(&args, &http, &iam_user).await,
            credgate: connect(&args, &ca, i).await,
            iam_user,
            at_a: true,
        });
    }

    let idle_rss_mib = status_mib(args.credgate_pid, "VmRSS");
    let mut rss = PeakRss::new(args.credgate_pid);
    let mut rows = Vec::new();
    let mut shown = Vec::new();
    let mut warmup_errors = 0;
    for &mode in &args.modes {
        let (warm, warmup) = run_phase(workers, mode, args.warmup, &passwords).await;
        let warmup_peak_mib = rss.take();
        warmup_errors += warmup.errors.len();
        shown.extend(
            warmup
                .errors
                .into_iter()
                .map(|e| format!("{} (warm-up): {e}", mode.name())),
        );

        let requests = match mode {
            Mode::CredgateValidate => args.validate_requests,
            Mode::Direct | Mode::Credgate => args.requests,
        };
        let credgate_cpu = cpu_seconds(args.credgate_pid);
        let emulator_cpu = args.emulator_pid.map(cpu_seconds);
        let (after, mut outcome) = run_phase(warm, mode, requests, &passwords).await;
        workers = after;
        let per_1000 =
            |before: f64, pid: u32| (cpu_seconds(pid) - before) * 1000.0 / requests as f64;

        outcome.latencies.sort_unstable();
        let lat = &outcome.latencies;
        rows.push(Row {
            mode,
            requests,
            errors: outcome.errors.len(),
            // Successful calls only: a fast error is no throughput.
            throughput: lat.len() as f64 / outcome.elapsed.as_secs_f64(),
            p50: percentile_ms(lat, 0.50),
            p90: percentile_ms(lat, 0.90),
            p99: percentile_ms(lat, 0.99),
            max: percentile_ms(lat, 1.0),
            credgate_cpu_per_1000: per_1000(credgate_cpu, args.credgate_pid),
            emulator_cpu_per_1000: emulator_cpu
                .zip(args.emulator_pid)
                .map(|(b, p)| per_1000(b, p)),
            warmup_peak_mib,
            peak_mib: rss.take(),
        });
        shown.extend(
            outcome
                .errors
                .into_iter()
                .map(|e| format!("{}: {e}", mode.name())),
        );
    }

    print!("{}", render(&args, &machine, &rows, idle_rss_mib, &rss));
    let errors = warmup_errors + rows.iter().map(|r| r.errors).sum::<usize>();
    if errors == 0 {
        return ExitCode::SUCCESS;
    }
    shown.sort();
    shown.dedup();
    eprintln!("\n{errors} calls failed (warm-up included); distinct errors:");
    for e in shown.iter().take(ERRORS_SHOWN) {
        eprintln!("  {e}");
    }
    ExitCode::FAILURE
}
