//! The benchmark behind `scripts/bench` (see `docs/benchmark.md`).
//!
//! `bench upstream` is a fast IAM/STS stand-in: an HTTP/1.1 server speaking
//! the AWS query protocol for `ChangePassword`, `GetAccountPasswordPolicy`,
//! `GetCallerIdentity` and `GetUser` with IAM's real XML, answering in
//! microseconds, so that credgate — not the upstream — is what is measured.
//! It accepts any signature; key `AKIABENCH<n>` is user `bench-<n>`.
//!
//! `bench run` starts the upstream (a child process, so that its CPU is
//! nobody's), credgate and the Python peer (`bench/python-peer`), then runs
//! the modes one after the other against the same upstream and prints one
//! Markdown report:
//!
//! - `direct`: aws-sdk-iam straight to the upstream — the floor; CPU is the
//!   load generator's own, i.e. the SDK client's;
//! - `credgate`: over mTLS on long-lived connections (4 connections × 8 in
//!   flight, and 1 in flight); CPU is credgate's (`/proc/PID`);
//! - `credgate-fresh`: a new mTLS connection per call (what grpcurl and
//!   short-lived jobs do);
//! - `peer`, `peer-fresh`: the same against the Python grpcio + boto3 peer;
//! - `credgate-redis`: 1 in flight with a `request_id`, state in Redis,
//!   beside the same with state in memory (what a Redis round trip adds);
//! - idle connections (RSS before/after 1,000 idle mTLS connections) and the
//!   time from process start to SERVING;
//! - `callers`: credgate started with 10, 1,000 and 10,000 configured
//!   callers (time to SERVING, RSS);
//! - `distinct`: 1,000 distinct callers (one template) making one change
//!   each (RSS after).
//!
//! Every call must succeed; any error fails the run. Linux only (`/proc`).

use std::{
    collections::HashMap,
    convert::Infallible,
    fmt::Write as _,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aws_config::{BehaviorVersion, Region, retry::RetryConfig};
use aws_credential_types::Credentials;
use aws_sdk_iam::error::DisplayErrorContext;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use credgate::api::{ChangePasswordRequest, password_service_client::PasswordServiceClient};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// Clock ticks per second in `/proc/PID/stat` (USER_HZ, 100 on Linux).
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;
/// A hung peer fails the run instead of stalling it.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const PASSWORD_A: &str = "Bench-Passw0rd-A!";
const PASSWORD_B: &str = "Bench-Passw0rd-B!";
/// Distinct identities of the `distinct` mode (scripts/bench issues their
/// certificates).
const DISTINCT_CALLERS: usize = 1000;

#[derive(Parser)]
#[command(about = "credgate's benchmark (scripts/bench drives it)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The fast IAM/STS stand-in; prints {"endpoint": ...} when ready.
    Upstream,
    /// Every mode, one report.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// The directory scripts/bench prepared: pki/, aws-credentials,
    /// credgate.toml (memory), credgate-redis.toml (optional), stubs/.
    #[arg(long)]
    dir: PathBuf,
    /// The credgate binary.
    #[arg(long)]
    credgate: PathBuf,
    /// The Python interpreter for the peer (empty: no peer).
    #[arg(long, default_value = "")]
    python: String,
    /// Measured seconds per mode (after a second of warm-up).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Rounds of the direct/credgate/fresh modes, interleaved; each row
    /// shows the round with the median throughput (a shared machine is noisy).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Idle connections opened for the memory measurement.
    #[arg(long, default_value_t = 1000)]
    idle_connections: usize,
    /// Modes to run (all by default).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Extra environment for credgate, KEY=VALUE (repeatable), e.g.
    /// TOKIO_WORKER_THREADS=1.
    #[arg(long = "credgate-env", value_name = "KEY=VALUE")]
    credgate_env: Vec<String>,
}

// ------------------------------------------------------------- upstream

fn form_value<'a>(body: &'a str, key: &str) -> Option<&'a str> {
    body.split('&')
        .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
}

/// The SigV4 `Authorization` header's access key id.
fn key_of(req: &Request<Incoming>) -> String {
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    auth.split("Credential=")
        .nth(1)
        .and_then(|c| c.split('/').next())
        .unwrap_or_default()
        .to_owned()
}

/// `bench-<n>` for the key `AKIABENCH<n>`.
fn user_of(key: &str) -> String {
    let n = key.trim_start_matches("AKIABENCH").trim_start_matches('0');
    format!("bench-{n}")
}

async fn answer(
    req: Request<Incoming>,
    ids: Arc<AtomicU64>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let key = key_of(&req);
    let user = user_of(&key);
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body = String::from_utf8_lossy(&body);
    let id = format!(
        "00000000-0000-4000-8000-{:012x}",
        ids.fetch_add(1, Ordering::Relaxed)
    );
    const IAM: &str = "https://iam.amazonaws.com/doc/2010-05-08/";
    let arn = format!("arn:aws:iam::123456789012:user/{user}");
    let xml = match form_value(&body, "Action").unwrap_or_default() {
        "ChangePassword" => format!(
            r#"<ChangePasswordResponse xmlns="{IAM}"><ResponseMetadata><RequestId>{id}</RequestId></ResponseMetadata></ChangePasswordResponse>"#
        ),
        "GetAccountPasswordPolicy" => format!(
            r#"<GetAccountPasswordPolicyResponse xmlns="{IAM}"><GetAccountPasswordPolicyResult><PasswordPolicy><MinimumPasswordLength>12</MinimumPasswordLength><RequireSymbols>true</RequireSymbols><RequireNumbers>true</RequireNumbers><RequireUppercaseCharacters>true</RequireUppercaseCharacters><RequireLowercaseCharacters>true</RequireLowercaseCharacters><AllowUsersToChangePassword>true</AllowUsersToChangePassword><ExpirePasswords>false</ExpirePasswords></PasswordPolicy></GetAccountPasswordPolicyResult><ResponseMetadata><RequestId>{id}</RequestId></ResponseMetadata></GetAccountPasswordPolicyResponse>"#
        ),
        "GetCallerIdentity" => format!(
            r#"<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><GetCallerIdentityResult><Arn>{arn}</Arn><UserId>AIDABENCH</UserId><Account>123456789012</Account></GetCallerIdentityResult><ResponseMetadata><RequestId>{id}</RequestId></ResponseMetadata></GetCallerIdentityResponse>"#
        ),
        // Key custody's age check: the signing key, made yesterday (a key
        // over warn_key_age would log a line per user).
        "ListAccessKeys" => {
            let created = humantime::format_rfc3339_seconds(
                std::time::SystemTime::now() - Duration::from_secs(86_400),
            );
            format!(
                r#"<ListAccessKeysResponse xmlns="{IAM}"><ListAccessKeysResult><AccessKeyMetadata><member><UserName>{user}</UserName><AccessKeyId>{key}</AccessKeyId><Status>Active</Status><CreateDate>{created}</CreateDate></member></AccessKeyMetadata><IsTruncated>false</IsTruncated></ListAccessKeysResult><ResponseMetadata><RequestId>{id}</RequestId></ResponseMetadata></ListAccessKeysResponse>"#
            )
        }
        "GetUser" => format!(
            r#"<GetUserResponse xmlns="{IAM}"><GetUserResult><User><Path>/</Path><UserName>{user}</UserName><UserId>AIDABENCH</UserId><Arn>{arn}</Arn><CreateDate>2026-01-01T00:00:00Z</CreateDate></User></GetUserResult><ResponseMetadata><RequestId>{id}</RequestId></ResponseMetadata></GetUserResponse>"#
        ),
        other => {
            return Ok(Response::builder()
                .status(400)
                .body(Full::new(Bytes::from(format!(
                    "unsupported action {other:?}"
                ))))
                .unwrap_or_default());
        }
    };
    Ok(Response::builder()
        .header("content-type", "text/xml")
        .header("x-amzn-requestid", id)
        .body(Full::new(Bytes::from(xml)))
        .unwrap_or_default())
}

async fn upstream() -> ExitCode {
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bench upstream: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    println!("{{\"endpoint\": \"http://{addr}\"}}");
    let ids = Arc::new(AtomicU64::new(1));
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let ids = ids.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(req, ids.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

// ------------------------------------------------------------- processes

/// A child process killed on drop.
struct Proc {
    child: Child,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `cmd` and returns the first stdout line that contains `needle`.
fn spawn_until(mut cmd: Command, needle: &str) -> Result<(Proc, String), String> {
    use std::io::BufRead;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stdin(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("spawn {cmd:?}: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = std::io::BufReader::new(stdout).lines();
    let found = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains(needle))
        .ok_or_else(|| format!("{cmd:?} ended before printing {needle:?}"))?;
    // Keep draining so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
    Ok((Proc { child }, found))
}

fn json_str(line: &str, key: &str) -> Result<String, String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("{line}: {e}"))?;
    value[key]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("no {key} in {line}"))
}

/// CPU time (user + system) of a process so far, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(14) + ticks(15)) / CLOCK_TICKS_PER_SECOND
}

/// A `kB` line of `/proc/PID/status`, in MiB.
fn status_mib(pid: u32, key: &str) -> f64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

// ------------------------------------------------------------- clients

struct Pki {
    ca: Certificate,
    dir: PathBuf,
}

impl Pki {
    fn identity(&self, worker: usize) -> Result<Identity, String> {
        let read =
            |name: String| fs::read(self.dir.join(&name)).map_err(|e| format!("{name}: {e}"));
        Ok(Identity::from_pem(
            read(format!("client-{worker}.crt"))?,
            read(format!("client-{worker}.key"))?,
        ))
    }

    async fn channel(&self, addr: SocketAddr, worker: usize) -> Result<Channel, String> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .domain_name("localhost")
            .identity(self.identity(worker)?);
        Channel::from_shared(format!("https://{addr}"))
            .map_err(|e| e.to_string())?
            .tls_config(tls)
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| format!("connect {addr}: {e}"))
    }
}

fn direct_client(
    endpoint: &str,
    http: &aws_sdk_iam::config::SharedHttpClient,
    worker: usize,
) -> aws_sdk_iam::Client {
    let config = aws_sdk_iam::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new(
            format!("AKIABENCH{worker:011}"),
            "bench-secret",
            None,
            None,
            "bench",
        ))
        .http_client(http.clone())
        .retry_config(RetryConfig::disabled())
        .build();
    aws_sdk_iam::Client::from_conf(config)
}

#[derive(Clone)]
enum Target {
    Direct(aws_sdk_iam::Client),
    Grpc(PasswordServiceClient<Channel>),
    /// A new mTLS connection per call.
    Fresh {
        addr: SocketAddr,
        worker: usize,
    },
}

/// One call; `at_a` alternates the password (a real upstream checks it).
async fn call(target: &Target, pki: &Pki, at_a: bool, request_id: bool) -> Result<(), String> {
    let (old, new) = if at_a {
        (PASSWORD_A, PASSWORD_B)
    } else {
        (PASSWORD_B, PASSWORD_A)
    };
    let request = || ChangePasswordRequest {
        old_password: old.to_owned(),
        new_password: new.to_owned(),
        validate_only: false,
        request_id: if request_id {
            uuid::Uuid::new_v4().to_string()
        } else {
            String::new()
        },
    };
    match target {
        Target::Direct(client) => client
            .change_password()
            .old_password(old)
            .new_password(new)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| DisplayErrorContext(&e).to_string()),
        Target::Grpc(client) => {
            let answer = client
                .clone()
                .change_password(request())
                .await
                .map_err(|s| format!("gRPC {:?}: {}", s.code(), s.message()))?;
            if answer.get_ref().iam_request_id.is_empty() {
                return Err("no IAM request id in the answer".to_owned());
            }
            Ok(())
        }
        Target::Fresh { addr, worker } => {
            let channel = pki.channel(*addr, *worker).await?;
            PasswordServiceClient::new(channel)
                .change_password(request())
                .await
                .map(|_| ())
                .map_err(|s| format!("gRPC {:?}: {}", s.code(), s.message()))
        }
    }
}

// ------------------------------------------------------------- phases

struct Measured {
    calls: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    cpu_s: f64,
    peak_rss_mib: f64,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let rank =
            ((p * self.latencies.len() as f64).ceil() as usize).clamp(1, self.latencies.len());
        self.latencies[rank - 1].as_secs_f64() * 1000.0
    }

    fn cpu_us_per_call(&self) -> f64 {
        self.cpu_s * 1e6 / self.calls as f64
    }
}

/// Runs `targets.len()` tasks, each calling its target in a loop, for one
/// second of warm-up and then `seconds` measured; CPU and peak RSS are
/// `pid`'s over the measured part.
async fn phase(
    targets: Vec<Target>,
    pki: &Arc<Pki>,
    seconds: f64,
    pid: u32,
    request_id: bool,
) -> Result<Measured, String> {
    let warmup = Duration::from_secs(1);
    let measure = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let (measure_from, measure_to) = (start + warmup, start + warmup + measure);
    let mut tasks = Vec::new();
    for target in targets {
        let pki = pki.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut at_a = true;
            loop {
                let t0 = Instant::now();
                if t0 >= measure_to {
                    return Ok::<_, String>(latencies);
                }
                tokio::time::timeout(CALL_TIMEOUT, call(&target, &pki, at_a, request_id))
                    .await
                    .map_err(|_| "no answer within 30 s".to_owned())??;
                at_a = !at_a;
                if t0 >= measure_from {
                    latencies.push(t0.elapsed());
                }
            }
        }));
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let _ = fs::write(format!("/proc/{pid}/clear_refs"), "5");
    let cpu_before = cpu_seconds(pid);
    tokio::time::sleep_until(measure_to.into()).await;
    let cpu_s = cpu_seconds(pid) - cpu_before;
    let peak_rss_mib = status_mib(pid, "VmHWM");
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.map_err(|e| e.to_string())??);
    }
    latencies.sort();
    Ok(Measured {
        calls: latencies.len(),
        elapsed: measure,
        latencies,
        cpu_s,
        peak_rss_mib,
    })
}

// ------------------------------------------------------------- run

struct Stack {
    _upstream: Proc,
    endpoint: String,
    credgate: Proc,
}

fn start_credgate(
    bin: &Path,
    config: &Path,
    dir: &Path,
    env: &[String],
) -> Result<(Proc, SocketAddr, SocketAddr), String> {
    start_credgate_with(bin, config, &dir.join("aws-credentials"), dir, env)
}

/// As [`start_credgate`], with the AWS credentials file `credentials`.
fn start_credgate_with(
    bin: &Path,
    config: &Path,
    credentials: &Path,
    dir: &Path,
    env: &[String],
) -> Result<(Proc, SocketAddr, SocketAddr), String> {
    let mut cmd = Command::new(bin);
    for pair in env {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("--credgate-env {pair:?}: KEY=VALUE"))?;
        cmd.env(key, value);
    }
    cmd.args(["serve", "--config"])
        .arg(config)
        .env("AWS_SHARED_CREDENTIALS_FILE", credentials)
        .env("AWS_CONFIG_FILE", dir.join("aws-config"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("RUST_LOG")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
    let (proc, line) = spawn_until(cmd, "credgate listening")?;
    let addr = |k| -> Result<SocketAddr, String> {
        json_str(&line, k)?.parse().map_err(|e| format!("{k}: {e}"))
    };
    Ok((proc, addr("tls_addr")?, addr("admin_addr")?))
}

/// Writes `config` with the upstream's endpoint in place of `@ENDPOINT@`.
fn render_config(dir: &Path, name: &str, endpoint: &str) -> Result<PathBuf, String> {
    let template = fs::read_to_string(dir.join(name)).map_err(|e| format!("{name}: {e}"))?;
    let path = dir.join(format!("rendered-{name}"));
    fs::write(&path, template.replace("@ENDPOINT@", endpoint)).map_err(|e| e.to_string())?;
    Ok(path)
}

/// Waits until the admin port at `admin` answers SERVING.
async fn until_serving(admin: SocketAddr, started: Instant) -> Result<(), String> {
    let channel = Channel::from_shared(format!("http://{admin}"))
        .map_err(|e| e.to_string())?
        .connect_lazy();
    let mut health = HealthClient::new(channel);
    loop {
        let serving = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .is_ok_and(|r| r.get_ref().status == 1);
        if serving {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err("credgate not SERVING within 30 s".to_owned());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn serving_ms(bin: &Path, config: &Path, dir: &Path, env: &[String]) -> Result<f64, String> {
    let mut samples = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let (proc, _, admin) = start_credgate(bin, config, dir, env)?;
        until_serving(admin, started).await?;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
        drop(proc);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

struct Report {
    text: String,
}

impl Report {
    fn line(&mut self, text: impl AsRef<str>) {
        self.text.push_str(text.as_ref());
        self.text.push('\n');
    }
}

fn row(report: &mut Report, mode: &str, m: &Measured, cpu_of: &str, baseline: Option<&Measured>) {
    let ratio = |v: f64, b: f64| {
        if b > 0.0 {
            format!("{:.2}×", v / b)
        } else {
            "–".to_owned()
        }
    };
    let (rate_ratio, cpu_ratio) = match baseline {
        Some(b) => (
            ratio(m.rate(), b.rate()),
            ratio(m.cpu_us_per_call(), b.cpu_us_per_call()),
        ),
        None => ("1×".to_owned(), "1×".to_owned()),
    };
    report.line(format!(
        "| {mode} | {:.0} | {rate_ratio} | {:.2} | {:.2} | {:.2} | {:.0} ({cpu_of}) | {cpu_ratio} | {:.1} |",
        m.rate(),
        m.percentile_ms(0.50),
        m.percentile_ms(0.99),
        m.percentile_ms(0.999),
        m.cpu_us_per_call(),
        m.peak_rss_mib,
    ));
}

async fn run(args: RunArgs) -> Result<String, String> {
    let wanted = |mode: &str| args.only.is_empty() || args.only.iter().any(|m| m == mode);
    let dir = &args.dir;
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut up = Command::new(&me);
    up.arg("upstream");
    let (upstream, line) = spawn_until(up, "endpoint")?;
    let endpoint = json_str(&line, "endpoint")?;
    let config = render_config(dir, "credgate.toml", &endpoint)?;
    let (credgate, addr, _) = start_credgate(&args.credgate, &config, dir, &args.credgate_env)?;
    let stack = Stack {
        _upstream: upstream,
        endpoint,
        credgate,
    };
    let pki = Arc::new(Pki {
        ca: Certificate::from_pem(fs::read(dir.join("pki/ca.crt")).map_err(|e| e.to_string())?),
        dir: dir.join("pki"),
    });
    let me_pid = std::process::id();
    let credgate_pid = stack.credgate.pid();
    let mut report = Report {
        text: String::new(),
    };
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    report.line(format!(
        "{cpus} CPUs shared by the load generator, credgate, the upstream and the peer; \
         {:.0} s measured per mode after 1 s of warm-up, {} interleaved rounds, the round \
         with the median throughput shown; credgate at its production log settings (JSON, \
         info, audit on){}.\n",
        args.seconds,
        args.rounds,
        if args.credgate_env.is_empty() {
            String::new()
        } else {
            format!(", with {}", args.credgate_env.join(" "))
        }
    ));
    report.line(
        "| mode | calls/s | vs direct | p50 ms | p99 ms | p99.9 ms | CPU µs/call (whose) | CPU vs direct | peak RSS MiB |",
    );
    report.line("|---|--:|--:|--:|--:|--:|--:|--:|--:|");
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::AwsLc,
        ))
        .build_https();
    let grpc = |workers: &[usize], per: usize| {
        let (pki, workers) = (pki.clone(), workers.to_vec());
        async move {
            let mut targets = Vec::new();
            for w in workers {
                let client = PasswordServiceClient::new(pki.channel(addr, w).await?);
                targets.extend((0..per).map(|_| Target::Grpc(client.clone())));
            }
            Ok::<_, String>(targets)
        }
    };
    let mut rounds: HashMap<&str, Vec<Measured>> = HashMap::new();
    for _ in 0..args.rounds.max(1) {
        for (name, inflight) in [("direct-32", 32usize), ("direct-1", 1)] {
            if !wanted("direct") {
                break;
            }
            let targets = (1..=inflight)
                .map(|i| Target::Direct(direct_client(&stack.endpoint, &http, (i - 1) % 4 + 1)))
                .collect();
            let m = phase(targets, &pki, args.seconds, me_pid, false).await?;
            rounds.entry(name).or_default().push(m);
        }
        if wanted("credgate") {
            let targets = grpc(&[1, 2, 3, 4], 8).await?;
            let m = phase(targets, &pki, args.seconds, credgate_pid, false).await?;
            rounds.entry("credgate-32").or_default().push(m);
            let targets = grpc(&[1], 1).await?;
            let m = phase(targets, &pki, args.seconds, credgate_pid, false).await?;
            rounds.entry("credgate-1").or_default().push(m);
        }
        if wanted("fresh") {
            let targets = (1..=8)
                .map(|i| Target::Fresh {
                    addr,
                    worker: (i - 1) % 4 + 1,
                })
                .collect();
            let m = phase(targets, &pki, args.seconds, credgate_pid, false).await?;
            rounds.entry("credgate-fresh").or_default().push(m);
        }
    }
    // The round with the median throughput, whole: its numbers belong together.
    let results: HashMap<&str, Measured> = rounds
        .into_iter()
        .map(|(name, mut runs)| {
            runs.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
            let middle = runs.len() / 2;
            (name, runs.swap_remove(middle))
        })
        .collect();
    let order = [
        ("direct-32", "direct, 32 in flight", "SDK client"),
        ("credgate-32", "credgate, 4 conn × 8 in flight", "credgate"),
        ("direct-1", "direct, 1 in flight", "SDK client"),
        ("credgate-1", "credgate, 1 in flight", "credgate"),
        (
            "credgate-fresh",
            "credgate, new mTLS connection per call, 8 at once",
            "credgate",
        ),
    ];
    for (key, label, whose) in order {
        if let Some(m) = results.get(key) {
            let base = match key {
                "credgate-32" => results.get("direct-32"),
                "credgate-1" => results.get("direct-1"),
                "direct-32" | "direct-1" => None,
                _ => results.get("direct-32"),
            };
            row(&mut report, label, m, whose, base);
        }
    }

    // The Python peer, same upstream, same certificates.
    if !args.python.is_empty() && wanted("peer") {
        let mut cmd = Command::new(&args.python);
        cmd.arg(dir.join("peer.py"))
            .args(["--stubs"])
            .arg(dir.join("stubs"))
            .args(["--listen", "127.0.0.1:0", "--workers", "32", "--cert"])
            .arg(dir.join("pki/server.crt"))
            .arg("--key")
            .arg(dir.join("pki/server.key"))
            .arg("--client-ca")
            .arg(dir.join("pki/ca.crt"))
            .arg("--callers")
            .arg(&config)
            .args(["--endpoint-url", &stack.endpoint])
            .env("AWS_SHARED_CREDENTIALS_FILE", dir.join("aws-credentials"))
            .env("AWS_CONFIG_FILE", dir.join("aws-config"))
            .env("AWS_EC2_METADATA_DISABLED", "true");
        let (peer, line) = spawn_until(cmd, "listening")?;
        let peer_addr: SocketAddr = json_str(&line, "listening")?
            .parse()
            .map_err(|e| format!("peer address: {e}"))?;
        let mut targets = Vec::new();
        for w in 1..=4 {
            let client = PasswordServiceClient::new(pki.channel(peer_addr, w).await?);
            targets.extend((0..8).map(|_| Target::Grpc(client.clone())));
        }
        let m = phase(targets, &pki, args.seconds, peer.pid(), false).await?;
        row(
            &mut report,
            "Python peer, 4 conn × 8 in flight",
            &m,
            "peer",
            results.get("direct-32"),
        );
        let fresh = (1..=8)
            .map(|i| Target::Fresh {
                addr: peer_addr,
                worker: (i - 1) % 4 + 1,
            })
            .collect();
        let f = phase(fresh, &pki, args.seconds, peer.pid(), false).await?;
        row(
            &mut report,
            "Python peer, new mTLS connection per call, 8 at once",
            &f,
            "peer",
            results.get("direct-32"),
        );
        report.line("");
        if let Some(c) = results.get("credgate-32") {
            report.line(format!(
                "- credgate vs the Python peer at 32 in flight: **{:.1}×** the calls/s, {:.2}× its p99.",
                c.rate() / m.rate(),
                c.percentile_ms(0.99) / m.percentile_ms(0.99)
            ));
        }
        if let Some(c) = results.get("credgate-fresh") {
            report.line(format!(
                "- new connection per call: credgate **{:.1}×** the Python peer's calls/s.",
                c.rate() / f.rate()
            ));
        }
    } else {
        report.line("");
    }
    if let (Some(c), Some(d)) = (results.get("credgate-32"), results.get("direct-32")) {
        report.line(format!(
            "- credgate CPU per call is **{:.2}×** the SDK client's own ({:.0} vs {:.0} µs); \
             its throughput {:.2}× direct.",
            c.cpu_us_per_call() / d.cpu_us_per_call(),
            c.cpu_us_per_call(),
            d.cpu_us_per_call(),
            c.rate() / d.rate()
        ));
    }
    if let (Some(c), Some(d)) = (results.get("credgate-1"), results.get("direct-1")) {
        report.line(format!(
            "- 1 in flight: credgate adds **{:.2} ms** at p50 and **{:.2} ms** at p99 over the direct SDK.",
            c.percentile_ms(0.5) - d.percentile_ms(0.5),
            c.percentile_ms(0.99) - d.percentile_ms(0.99)
        ));
    }
    if let (Some(f), Some(c)) = (results.get("credgate-fresh"), results.get("credgate-32")) {
        report.line(format!(
            "- a fresh mTLS connection costs credgate about **{:.0} µs** of CPU (handshake and \
             connection set-up: {:.0} µs per fresh call minus {:.0} µs per call on a kept connection).",
            f.cpu_us_per_call() - c.cpu_us_per_call(),
            f.cpu_us_per_call(),
            c.cpu_us_per_call()
        ));
    }

    // Redis: what a round trip adds, 1 in flight with a request_id.
    if wanted("redis") && dir.join("credgate-redis.toml").exists() {
        let targets = grpc(&[1], 1).await?;
        let memory = phase(targets, &pki, args.seconds, credgate_pid, true).await?;
        let redis_config = render_config(dir, "credgate-redis.toml", &stack.endpoint)?;
        let (redis_credgate, redis_addr, _) =
            start_credgate(&args.credgate, &redis_config, dir, &args.credgate_env)?;
        let client = PasswordServiceClient::new(pki.channel(redis_addr, 1).await?);
        let m = phase(
            vec![Target::Grpc(client)],
            &pki,
            args.seconds,
            redis_credgate.pid(),
            true,
        )
        .await?;
        report.line(format!(
            "- state in Redis (same host, 1 in flight, with a request_id: two round trips, one \
             before IAM and one after): p50 {:.2} ms vs {:.2} ms in memory (**+{:.2} ms**), p99 {:.2} vs {:.2} ms; \
             credgate CPU {:.0} vs {:.0} µs per call.",
            m.percentile_ms(0.5),
            memory.percentile_ms(0.5),
            m.percentile_ms(0.5) - memory.percentile_ms(0.5),
            m.percentile_ms(0.99),
            memory.percentile_ms(0.99),
            m.cpu_us_per_call(),
            memory.cpu_us_per_call()
        ));
    }

    // Memory: idle, then with many idle connections.
    if wanted("idle") {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = status_mib(credgate_pid, "VmRSS");
        let mut channels = Vec::new();
        for i in 0..args.idle_connections {
            let channel = pki.channel(addr, i % 4 + 1).await?;
            // One call each, so the connection is really set up on both sides.
            HealthClient::new(channel.clone())
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map_err(|e| e.to_string())?;
            channels.push(channel);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = status_mib(credgate_pid, "VmRSS");
        report.line(format!(
            "- memory: credgate RSS {before:.1} MiB after the load, {after:.1} MiB with {} idle mTLS \
             connections open (**+{:.1} MiB**, {:.1} KiB per connection).",
            args.idle_connections,
            after - before,
            (after - before) * 1024.0 / args.idle_connections as f64
        ));
        drop(channels);
    }
    if wanted("startup") {
        let fresh_rss = {
            let (proc, _, _) = start_credgate(&args.credgate, &config, dir, &args.credgate_env)?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let rss = status_mib(proc.pid(), "VmRSS");
            drop(proc);
            rss
        };
        let ms = serving_ms(&args.credgate, &config, dir, &args.credgate_env).await?;
        report.line(format!(
            "- start-up: SERVING on the admin port **{ms:.0} ms** after the process starts \
             (median of 5); idle RSS right after start {fresh_rss:.1} MiB."
        ));
    }
    if wanted("callers") {
        configured_callers(&args, &stack.endpoint, &mut report).await?;
    }
    if wanted("distinct") && dir.join("credgate-distinct.toml").exists() {
        distinct_callers(&args, &stack.endpoint, &pki, &mut report).await?;
    }
    let _ = writeln!(report.text);
    Ok(report.text)
}

/// Configured callers at scale: credgate started with `n` exact callers,
/// each its own IAM user with its own profile (the costly case: no two
/// share clients); the time to SERVING and the RSS then and once key
/// custody's first sweep (one `ListAccessKeys` per user, four at a time)
/// is over. Per caller: the RSS over the 10-caller run's, divided.
async fn configured_callers(
    args: &RunArgs,
    endpoint: &str,
    report: &mut Report,
) -> Result<(), String> {
    let dir = &args.dir;
    let base = fs::read_to_string(dir.join("credgate.toml")).map_err(|e| e.to_string())?;
    // The settings, without the four bench callers.
    let head = base
        .split("[[callers]]")
        .next()
        .unwrap_or_default()
        .replace("@ENDPOINT@", endpoint);
    report.line("");
    report.line(
        "| configured callers (a profile each) | SERVING after ms | RSS at SERVING MiB | RSS after key custody's first sweep MiB | per caller KiB, after the sweep (over 10 callers) |",
    );
    report.line("|--:|--:|--:|--:|--:|");
    let mut small: Option<f64> = None;
    for n in [10usize, 1_000, 10_000] {
        let mut config = head.clone();
        let mut credentials = String::new();
        for i in 1..=n {
            // Users bench-10001...: the upstream signs key AKIABENCH<n> as bench-<n>.
            let user = 10_000 + i;
            let _ = write!(
                config,
                "\n[[callers]]\nspiffe_id = \"spiffe://credgate.bench/ns/scale/sa/c{i}\"\n\
                 iam_user = \"bench-{user}\"\naws_profile = \"scale-{user}\"\n"
            );
            let _ = write!(
                credentials,
                "[scale-{user}]\naws_access_key_id = AKIABENCH{user:011}\n\
                 aws_secret_access_key = bench-secret\n"
            );
        }
        let config_path = dir.join(format!("callers-{n}.toml"));
        let credentials_path = dir.join(format!("aws-credentials-{n}"));
        fs::write(&config_path, config).map_err(|e| e.to_string())?;
        fs::write(&credentials_path, credentials).map_err(|e| e.to_string())?;
        let started = Instant::now();
        let (proc, _, admin) = start_credgate_with(
            &args.credgate,
            &config_path,
            &credentials_path,
            dir,
            &args.credgate_env,
        )?;
        until_serving(admin, started).await?;
        let serving_ms = started.elapsed().as_secs_f64() * 1000.0;
        let at_serving = status_mib(proc.pid(), "VmRSS");
        // The sweep takes well under a millisecond per user here.
        tokio::time::sleep(Duration::from_secs(2) + Duration::from_millis(n as u64)).await;
        let swept = status_mib(proc.pid(), "VmRSS");
        drop(proc);
        let per_caller = match small {
            Some(base) if n > 10 => format!("{:.2}", (swept - base) * 1024.0 / (n - 10) as f64),
            _ => "—".to_owned(),
        };
        small.get_or_insert(swept);
        report.line(format!(
            "| {n} | {serving_ms:.0} | {at_serving:.1} | {swept:.1} | {per_caller} |"
        ));
    }
    Ok(())
}

/// 1,000 distinct callers (one template), each making one change on its own
/// new mTLS connection, 8 at once, against a fresh credgate: every one gets
/// its own clients (the cache keeps 256), its key verified (STS) and the
/// policy read; what memory that leaves behind.
async fn distinct_callers(
    args: &RunArgs,
    endpoint: &str,
    pki: &Arc<Pki>,
    report: &mut Report,
) -> Result<(), String> {
    use futures_util::{StreamExt, TryStreamExt};
    let dir = &args.dir;
    let config = render_config(dir, "credgate-distinct.toml", endpoint)?;
    let (proc, addr, _) = start_credgate(&args.credgate, &config, dir, &args.credgate_env)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = status_mib(proc.pid(), "VmRSS");
    let cpu_before = cpu_seconds(proc.pid());
    let started = Instant::now();
    // scripts/bench issues client-5 ... client-1004 to the distinct identities.
    futures_util::stream::iter(5..5 + DISTINCT_CALLERS)
        .map(|worker| {
            let pki = pki.clone();
            async move { call(&Target::Fresh { addr, worker }, &pki, true, false).await }
        })
        .buffer_unordered(8)
        .try_collect::<Vec<()>>()
        .await?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_ms = (cpu_seconds(proc.pid()) - cpu_before) * 1000.0 / DISTINCT_CALLERS as f64;
    let after = status_mib(proc.pid(), "VmRSS");
    let peak = status_mib(proc.pid(), "VmHWM");
    drop(proc);
    report.line("");
    report.line(format!(
        "- {DISTINCT_CALLERS} distinct callers (one template), one change each on a new mTLS \
         connection, 8 at once: all succeeded in {elapsed:.1} s ({cpu_ms:.1} ms of credgate CPU \
         each: handshake, key verification, policy read, change); credgate RSS {before:.1} MiB \
         before, **{after:.1} MiB** after (peak {peak:.1} MiB)."
    ));
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match cli.command {
            Cmd::Upstream => upstream().await,
            Cmd::Run(args) => match run(args).await {
                Ok(report) => {
                    print!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("bench: {e}");
                    ExitCode::FAILURE
                }
            },
        }
    })
}
