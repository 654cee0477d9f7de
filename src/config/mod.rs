//! Configuration: parse the TOML file, validate every setting, and report all
//! problems at once.
//!
//! Parsing walks the TOML tree by hand instead of deriving `Deserialize` so
//! that one run lists every unknown key, bad value and missing section rather
//! than stopping at the first, as serde would.

use std::{
    collections::HashSet,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::de::DeserializeOwned;
use toml::{Table, Value};

/// Environment variable naming the config file when `--config` is absent.
pub(crate) const CONFIG_ENV: &str = "CREDGATE_CONFIG";

/// The validated configuration.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// Listeners, deadlines and drain budget.
    pub server: ServerSettings,
    /// Server certificate, client CA and optional CRL.
    pub tls: TlsSettings,
    /// How IAM is reached.
    pub aws: AwsSettings,
    /// Brute-force protection for the old password.
    pub limits: LimitSettings,
    /// Where the attempt counters and `request_id` outcomes live.
    pub state: StateSettings,
    /// Log format.
    pub telemetry: TelemetrySettings,
    /// Caller identities and the IAM users they act as.
    pub callers: Vec<CallerSettings>,
}

/// `[server]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServerSettings {
    /// mTLS gRPC listener.
    pub listen: SocketAddr,
    /// Plaintext health-only listener for Kubernetes probes.
    pub admin_listen: SocketAddr,
    /// Budget for a whole RPC, IAM call included.
    pub request_timeout: Duration,
    /// Drain budget after SIGTERM.
    pub shutdown_grace: Duration,
    /// PasswordService requests served at once across all connections.
    pub max_concurrent_requests: usize,
    /// PasswordService requests in flight per caller identity.
    pub max_requests_per_caller: usize,
    /// Open mTLS connections, handshakes included.
    pub max_connections: usize,
    /// Of those, per client identity; every unmapped identity shares one
    /// budget of this size. Below `max_connections`, so that no single
    /// certificate can take them all.
    pub max_connections_per_caller: usize,
    /// An HTTP/2 connection without a call for this long is closed.
    pub idle_timeout: Duration,
    /// Every connection is asked to reconnect (GOAWAY) after this long, so
    /// that CA, CRL and caller changes reach long-lived channels too.
    pub max_connection_age: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            admin_listen: SocketAddr::from(([0, 0, 0, 0], 8081)),
            request_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(20),
            max_concurrent_requests: 512,
            max_requests_per_caller: 16,
            max_connections: 4096,
            max_connections_per_caller: 64,
            idle_timeout: Duration::from_secs(5 * 60),
            max_connection_age: Duration::from_secs(60 * 60),
        }
    }
}

/// `[tls]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA bundle that client certificates must chain to (PEM).
    pub client_ca: PathBuf,
    /// PEM CRL files: one per CA in the client chains (a file may hold
    /// several). Empty: no revocation checking.
    pub crl: Vec<PathBuf>,
}

/// `[aws]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AwsSettings {
    /// Region used to sign IAM requests.
    pub region: String,
    /// Override of the IAM endpoint (an emulator or a VPC endpoint).
    pub endpoint_url: Option<String>,
    /// Override of the STS endpoint used to verify whose key a profile
    /// holds; defaults to `endpoint_url` when that is set.
    pub sts_endpoint_url: Option<String>,
}

impl Default for AwsSettings {
    fn default() -> Self {
        Self {
            region: "us-east-1".to_owned(),
            endpoint_url: None,
            sts_endpoint_url: None,
        }
    }
}

/// `[limits]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LimitSettings {
    /// Wrong old passwords tolerated per caller within the window.
    pub failed_attempts: u32,
    /// Sliding window for `failed_attempts`.
    pub failed_attempts_window: Duration,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            failed_attempts: 5,
            failed_attempts_window: Duration::from_secs(15 * 60),
        }
    }
}

/// `[state]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StateSettings {
    /// Where the state lives.
    pub backend: StateBackend,
    /// Prefix of every key, so that deployments can share one Redis.
    pub key_prefix: String,
    /// Most `request_id` records (pending or finished) one caller may hold
    /// at once; a new `request_id` beyond it gets `TOO_MANY_REQUEST_IDS`.
    pub max_request_ids_per_caller: u32,
}

impl Default for StateSettings {
    fn default() -> Self {
        Self {
            backend: StateBackend::Memory,
            key_prefix: "credgate:".to_owned(),
            max_request_ids_per_caller: 1000,
        }
    }
}

/// The state backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StateBackend {
    /// In this process: one replica's promises only.
    Memory,
    /// Redis or Valkey, shared by every replica.
    Redis(RedisSettings),
}

/// How the Redis/Valkey deployment is laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Topology {
    /// One server (`state.url`): `redis://host:port/db` or `rediss://...`.
    Standalone(String),
    /// Redis Cluster (`state.cluster_nodes`): any of its nodes, the rest is
    /// discovered.
    Cluster(Vec<String>),
    /// A master found through Sentinel (`state.sentinels` +
    /// `state.sentinel_master`), followed across failovers.
    Sentinel {
        /// The sentinels' URLs.
        sentinels: Vec<String>,
        /// The monitored master's name.
        master: String,
    },
}

impl Topology {
    /// Whether the connections use TLS (`rediss://`).
    pub(crate) fn tls(&self) -> bool {
        match self {
            Self::Standalone(url) => url.starts_with("rediss://"),
            Self::Cluster(urls)
            | Self::Sentinel {
                sentinels: urls, ..
            } => urls.iter().all(|u| u.starts_with("rediss://")),
        }
    }
}

/// How to reach Redis/Valkey.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RedisSettings {
    /// Which servers, never with a password in a URL.
    pub topology: Topology,
    /// File holding the password (else `CREDGATE_REDIS_PASSWORD`, else none).
    pub password_file: Option<PathBuf>,
    /// PEM CA bundle for `rediss://` (else the system roots).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for `rediss://` with mutual TLS.
    pub client_cert: Option<PathBuf>,
    /// Its key.
    pub client_key: Option<PathBuf>,
    /// Budget of each command, reconnects included.
    pub command_timeout: Duration,
}

/// Environment variable holding the Redis password when no
/// `state.password_file` is set.
pub(crate) const REDIS_PASSWORD_ENV: &str = "CREDGATE_REDIS_PASSWORD";

/// `[telemetry]`
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TelemetrySettings {
    /// How log lines are written.
    pub log_format: LogFormat,
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum LogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// Human-readable text.
    Text,
}

/// One `[[callers]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CallerSettings {
    /// How the caller's certificate is recognised.
    pub matcher: Matcher,
    /// The IAM user this caller acts as.
    pub iam_user: String,
    /// The shared-config profile holding that user's access key.
    pub aws_profile: String,
}

/// Longest DNS SAN or CN a certificate may present (a DNS name is at most
/// 253 bytes): a `dns_name` or `common_name` longer than this could never
/// match, and a certificate with one is refused at the handshake.
pub(crate) const MAX_NAME_LEN: usize = 255;

/// The one certificate attribute a caller is recognised by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Matcher {
    /// The certificate's only URI SAN.
    SpiffeId(String),
    /// Any DNS SAN.
    DnsName(String),
    /// The subject common name.
    CommonName(String),
}

impl Matcher {
    /// The kind and value together, as the state store keys a caller by
    /// (DESIGN.md: "keyed by the matcher's kind and value together"). A
    /// templated caller (to come) keys by the identity it resolved to, in
    /// the same form.
    pub(crate) fn state_key(&self) -> String {
        match self {
            Self::SpiffeId(v) => format!("spiffe:{v}"),
            Self::DnsName(v) => format!("dns:{v}"),
            Self::CommonName(v) => format!("cn:{v}"),
        }
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SpiffeId(v) => write!(f, "spiffe_id {v:?}"),
            Self::DnsName(v) => write!(f, "dns_name {v:?}"),
            Self::CommonName(v) => write!(f, "common_name {v:?}"),
        }
    }
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} configuration problem(s):\n  - {}", .problems.len(), .problems.join("\n  - "))]
pub(crate) struct ConfigError {
    /// One human-readable line per problem, naming the key.
    pub problems: Vec<String>,
}

impl Config {
    /// Reads and validates the file at `path`.
    pub(crate) fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            problems: vec![format!("cannot read {}: {e}", path.display())],
        })?;
        Self::parse(&text)
    }

    /// Parses and validates configuration text.
    pub(crate) fn parse(text: &str) -> Result<Self, ConfigError> {
        let root: Table = toml::from_str(text).map_err(|e| ConfigError {
            problems: vec![format!("not valid TOML: {}", e.message())],
        })?;
        let mut p = Problems::default();
        p.unknown_keys(
            &root,
            "",
            &[
                "server",
                "tls",
                "aws",
                "limits",
                "state",
                "telemetry",
                "callers",
            ],
        );
        let server = parse_server(&mut p, &root);
        let tls = parse_tls(&mut p, &root);
        let aws = parse_aws(&mut p, &root);
        let limits = parse_limits(&mut p, &root);
        let state = parse_state(&mut p, &root);
        let telemetry = parse_telemetry(&mut p, &root);
        let callers = parse_callers(&mut p, &root);
        match tls {
            Some(tls) if p.0.is_empty() => Ok(Self {
                server,
                tls,
                aws,
                limits,
                state,
                telemetry,
                callers,
            }),
            _ => Err(ConfigError { problems: p.0 }),
        }
    }
}

/// Accumulates problems while the parser keeps going.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn push(&mut self, problem: String) {
        self.0.push(problem);
    }

    fn unknown_keys(&mut self, table: &Table, prefix: &str, known: &[&str]) {
        for key in table.keys().filter(|k| !known.contains(&k.as_str())) {
            self.push(format!("{prefix}{key}: unknown key"));
        }
    }

    /// The sub-table `name` of `root`, checked for unknown keys.
    fn section<'a>(&mut self, root: &'a Table, name: &str, known: &[&str]) -> Option<&'a Table> {
        match root.get(name) {
            None => None,
            Some(Value::Table(t)) => {
                self.unknown_keys(t, &format!("{name}."), known);
                Some(t)
            }
            Some(other) => {
                self.push(format!(
                    "{name}: expected a table, found {}",
                    other.type_str()
                ));
                None
            }
        }
    }

    /// Deserializes `table[key]`, recording a problem on failure.
    fn value<T: DeserializeOwned>(&mut self, table: &Table, path: &str, key: &str) -> Option<T> {
        let value = table.get(key)?;
        match value.clone().try_into::<T>() {
            Ok(v) => Some(v),
            Err(e) => {
                self.push(format!("{path}.{key}: {}", e.message().trim()));
                None
            }
        }
    }

    fn addr(&mut self, table: &Table, path: &str, key: &str) -> Option<SocketAddr> {
        let text: String = self.value(table, path, key)?;
        text.parse()
            .map_err(|_| {
                self.push(format!(
                    "{path}.{key}: {text:?} is not an IP:port address (e.g. \"0.0.0.0:8443\")"
                ))
            })
            .ok()
    }

    fn duration(&mut self, table: &Table, path: &str, key: &str) -> Option<Duration> {
        let text: String = self.value(table, path, key)?;
        match humantime::parse_duration(&text) {
            Ok(d) if d.is_zero() => {
                self.push(format!("{path}.{key}: must be greater than zero"));
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                self.push(format!(
                    "{path}.{key}: {text:?} is not a duration like \"10s\" or \"15m\": {e}"
                ));
                None
            }
        }
    }

    fn positive<T>(&mut self, table: &Table, path: &str, key: &str) -> Option<T>
    where
        T: DeserializeOwned + Default + PartialOrd,
    {
        let v: T = self.value(table, path, key)?;
        if v <= T::default() {
            self.push(format!("{path}.{key}: must be greater than zero"));
            return None;
        }
        Some(v)
    }

    fn http_url(&mut self, table: &Table, path: &str, key: &str) -> Option<String> {
        let url: String = self.value(table, path, key)?;
        if url.starts_with("http://") || url.starts_with("https://") {
            Some(url)
        } else {
            self.push(format!(
                "{path}.{key}: {url:?} must start with http:// or https://"
            ));
            None
        }
    }

    fn required_string(&mut self, table: &Table, path: &str, key: &str) -> Option<String> {
        if !table.contains_key(key) {
            self.push(format!("{path}.{key}: missing"));
            return None;
        }
        let v: String = self.value(table, path, key)?;
        if v.trim().is_empty() {
            self.push(format!("{path}.{key}: must not be empty"));
            return None;
        }
        Some(v)
    }
}

fn parse_server(p: &mut Problems, root: &Table) -> ServerSettings {
    let mut s = ServerSettings::default();
    let known = [
        "listen",
        "admin_listen",
        "request_timeout",
        "shutdown_grace",
        "max_concurrent_requests",
        "max_requests_per_caller",
        "max_connections",
        "max_connections_per_caller",
        "idle_timeout",
        "max_connection_age",
    ];
    let Some(t) = p.section(root, "server", &known) else {
        return s;
    };
    s.listen = p.addr(t, "server", "listen").unwrap_or(s.listen);
    s.admin_listen = p
        .addr(t, "server", "admin_listen")
        .unwrap_or(s.admin_listen);
    s.request_timeout = p
        .duration(t, "server", "request_timeout")
        .unwrap_or(s.request_timeout);
    s.shutdown_grace = p
        .duration(t, "server", "shutdown_grace")
        .unwrap_or(s.shutdown_grace);
    s.max_concurrent_requests = p
        .positive(t, "server", "max_concurrent_requests")
        .unwrap_or(s.max_concurrent_requests);
    s.max_requests_per_caller = p
        .positive(t, "server", "max_requests_per_caller")
        .unwrap_or(s.max_requests_per_caller);
    let max_connections = p.positive(t, "server", "max_connections");
    s.max_connections = max_connections.unwrap_or(s.max_connections);
    let per_caller = p.positive(t, "server", "max_connections_per_caller");
    s.max_connections_per_caller = per_caller.unwrap_or(s.max_connections_per_caller);
    // Compared only when both are usable (a bad value is reported already).
    let usable = |key: &str, value: Option<usize>| value.is_some() || !t.contains_key(key);
    if usable("max_connections", max_connections)
        && usable("max_connections_per_caller", per_caller)
        && s.max_connections_per_caller >= s.max_connections
    {
        let default = if per_caller.is_none() {
            ", the default"
        } else {
            ""
        };
        p.push(format!(
            "server.max_connections_per_caller: must be below server.max_connections ({}), \
             or one certificate could hold every connection (it is {}{default})",
            s.max_connections, s.max_connections_per_caller
        ));
    }
    s.idle_timeout = p
        .duration(t, "server", "idle_timeout")
        .unwrap_or(s.idle_timeout);
    s.max_connection_age = p
        .duration(t, "server", "max_connection_age")
        .unwrap_or(s.max_connection_age);
    // A call admitted just before SIGTERM must be able to finish within the
    // drain (DESIGN.md, "Audit").
    if s.shutdown_grace < s.request_timeout {
        p.push(format!(
            "server.shutdown_grace: {} is shorter than server.request_timeout ({}); a call admitted just before shutdown could not finish",
            humantime::format_duration(s.shutdown_grace),
            humantime::format_duration(s.request_timeout)
        ));
    }
    // Port 0 (any free port) on both is fine: each bind gets its own.
    if s.listen == s.admin_listen && s.listen.port() != 0 {
        p.push(format!(
            "server.admin_listen: must differ from server.listen ({})",
            s.listen
        ));
    }
    s
}

fn parse_tls(p: &mut Problems, root: &Table) -> Option<TlsSettings> {
    if !root.contains_key("tls") {
        p.push("tls: missing section (cert, key and client_ca are required)".to_owned());
        return None;
    }
    let t = p.section(root, "tls", &["cert", "key", "client_ca", "crl"])?;
    let cert = p.required_string(t, "tls", "cert");
    let key = p.required_string(t, "tls", "key");
    let client_ca = p.required_string(t, "tls", "client_ca");
    // One file or a list: a chain through intermediates needs each CA's CRL.
    let crl = match t.get("crl") {
        None => Vec::new(),
        Some(Value::String(path)) => vec![PathBuf::from(path)],
        Some(Value::Array(_)) => p
            .value::<Vec<String>>(t, "tls", "crl")
            .unwrap_or_default()
            .into_iter()
            .map(PathBuf::from)
            .collect(),
        Some(other) => {
            p.push(format!(
                "tls.crl: expected a path or a list of paths, found {}",
                other.type_str()
            ));
            Vec::new()
        }
    };
    Some(TlsSettings {
        cert: cert?.into(),
        key: key?.into(),
        client_ca: client_ca?.into(),
        crl,
    })
}

fn parse_aws(p: &mut Problems, root: &Table) -> AwsSettings {
    let mut s = AwsSettings::default();
    let Some(t) = p.section(root, "aws", &["region", "endpoint_url", "sts_endpoint_url"]) else {
        return s;
    };
    if t.contains_key("region") {
        s.region = p.required_string(t, "aws", "region").unwrap_or(s.region);
    }
    s.endpoint_url = p.http_url(t, "aws", "endpoint_url");
    s.sts_endpoint_url = p.http_url(t, "aws", "sts_endpoint_url");
    s
}

fn parse_limits(p: &mut Problems, root: &Table) -> LimitSettings {
    let mut s = LimitSettings::default();
    let Some(t) = p.section(
        root,
        "limits",
        &["failed_attempts", "failed_attempts_window"],
    ) else {
        return s;
    };
    s.failed_attempts = p
        .positive(t, "limits", "failed_attempts")
        .unwrap_or(s.failed_attempts);
    s.failed_attempts_window = p
        .duration(t, "limits", "failed_attempts_window")
        .unwrap_or(s.failed_attempts_window);
    s
}

fn parse_state(p: &mut Problems, root: &Table) -> StateSettings {
    let mut s = StateSettings::default();
    let known = [
        "backend",
        "url",
        "cluster_nodes",
        "sentinels",
        "sentinel_master",
        "key_prefix",
        "max_request_ids_per_caller",
        "password_file",
        "ca_file",
        "client_cert",
        "client_key",
        "command_timeout",
    ];
    let Some(t) = p.section(root, "state", &known) else {
        return s;
    };
    if t.contains_key("key_prefix")
        && let Some(prefix) = p.required_string(t, "state", "key_prefix")
    {
        // A brace would move the Cluster hash tag off the caller, or (`{}`)
        // hash each key on its own: one caller's keys in several slots, and
        // its Lua scripts refused.
        if prefix.contains(['{', '}']) {
            p.push(format!(
                "state.key_prefix: {prefix:?} must not contain '{{' or '}}' \
                 (credgate puts each caller's Redis Cluster hash tag there itself)"
            ));
        } else {
            s.key_prefix = prefix;
        }
    }
    s.max_request_ids_per_caller = p
        .positive(t, "state", "max_request_ids_per_caller")
        .unwrap_or(s.max_request_ids_per_caller);
    let backend: Option<String> = p.value(t, "state", "backend");
    let layout = parse_topology(p, t);
    let path = |p: &mut Problems, key| p.value::<String>(t, "state", key).map(PathBuf::from);
    let password_file = path(p, "password_file");
    let ca_file = path(p, "ca_file");
    let client_cert = path(p, "client_cert");
    let client_key = path(p, "client_key");
    let command_timeout = p
        .duration(t, "state", "command_timeout")
        .unwrap_or(Duration::from_millis(250));
    let redis_only = [
        ("password_file", password_file.is_some()),
        ("ca_file", ca_file.is_some()),
        ("client_cert", client_cert.is_some()),
        ("client_key", client_key.is_some()),
        ("command_timeout", t.contains_key("command_timeout")),
    ];
    match (backend.as_deref(), layout) {
        (None | Some("memory"), Layout::None) => {
            for (key, set) in redis_only {
                if set {
                    p.push(format!(
                        "state.{key}: only applies to the redis backend \
                         (set state.url, state.cluster_nodes or state.sentinels)"
                    ));
                }
            }
        }
        (Some("memory"), Layout::Given { .. }) => {
            p.push(
                "state.backend: the memory backend takes no url, cluster_nodes or sentinels \
                 (remove them, or set backend = \"redis\")"
                    .to_owned(),
            );
        }
        (Some("redis"), Layout::None) => p.push(
            "state.url: the redis backend needs one of url, cluster_nodes or sentinels".to_owned(),
        ),
        (None | Some("redis"), Layout::Given { topology, tls }) => {
            if !tls {
                for (key, set) in &redis_only[1..4] {
                    if *set {
                        p.push(format!("state.{key}: only applies to rediss:// (TLS) URLs"));
                    }
                }
            }
            if client_cert.is_some() != client_key.is_some() {
                p.push("state.client_cert and state.client_key: set both or neither".to_owned());
            }
            // `None`: unusable, its problems already recorded.
            if let Some(topology) = topology {
                s.backend = StateBackend::Redis(RedisSettings {
                    topology,
                    password_file,
                    ca_file,
                    client_cert,
                    client_key,
                    command_timeout,
                });
            }
        }
        (Some(other), _) => p.push(format!(
            "state.backend: {other:?} is not \"memory\" or \"redis\""
        )),
    }
    s
}

/// What `[state]` says about Redis servers.
enum Layout {
    /// No `url`, `cluster_nodes` or `sentinels`.
    None,
    /// One of them, usable (`Some`) or not (its problems recorded).
    Given {
        topology: Option<Topology>,
        /// Every URL is `rediss://`.
        tls: bool,
    },
}

/// `url`, `cluster_nodes` or `sentinels` + `sentinel_master`: exactly one
/// layout, every URL checked.
fn parse_topology(p: &mut Problems, t: &Table) -> Layout {
    let url: Option<String> = p.value(t, "state", "url");
    let cluster: Option<Vec<String>> = p.value(t, "state", "cluster_nodes");
    let sentinels: Option<Vec<String>> = p.value(t, "state", "sentinels");
    let master: Option<String> = p.value(t, "state", "sentinel_master");
    let urls: Vec<&String> = url
        .iter()
        .chain(cluster.iter().flatten())
        .chain(sentinels.iter().flatten())
        .collect();
    let tls = !urls.is_empty() && urls.iter().all(|u| u.starts_with("rediss://"));
    let given = [url.is_some(), cluster.is_some(), sentinels.is_some()];
    if given.iter().filter(|g| **g).count() > 1 {
        p.push(
            "state: set only one of url, cluster_nodes and sentinels (one Redis deployment)"
                .to_owned(),
        );
        return Layout::Given {
            topology: None,
            tls,
        };
    }
    if master.is_some() != sentinels.is_some() {
        p.push("state.sentinel_master and state.sentinels: set both or neither".to_owned());
    }
    let problems = p.0.len();
    let topology = if let Some(url) = url {
        check_redis_url(p, "state.url", &url, true);
        Topology::Standalone(url)
    } else if let Some(nodes) = cluster {
        check_redis_urls(p, "state.cluster_nodes", &nodes, false);
        Topology::Cluster(nodes)
    } else if let Some(sentinels) = sentinels {
        check_redis_urls(p, "state.sentinels", &sentinels, false);
        let master = master.unwrap_or_default();
        if master.trim().is_empty() {
            p.push("state.sentinel_master: must name the master the sentinels monitor".to_owned());
        }
        Topology::Sentinel { sentinels, master }
    } else {
        return Layout::None;
    };
    Layout::Given {
        topology: (p.0.len() == problems).then_some(topology),
        tls,
    }
}

fn check_redis_urls(p: &mut Problems, key: &str, urls: &[String], db: bool) {
    if urls.is_empty() {
        p.push(format!(
            "{key}: must list at least one redis:// or rediss:// URL"
        ));
    }
    for (i, url) in urls.iter().enumerate() {
        check_redis_url(p, &format!("{key}[{i}]"), url, db);
    }
    let tls = urls.iter().filter(|u| u.starts_with("rediss://")).count();
    if tls != 0 && tls != urls.len() {
        p.push(format!("{key}: mixes redis:// and rediss:// URLs"));
    }
}

/// One URL: a Redis scheme, parseable, no password, and a database other
/// than 0 only where the layout has databases (Cluster and the node a
/// sentinel names have only 0).
fn check_redis_url(p: &mut Problems, key: &str, url: &str, db: bool) {
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        p.push(format!(
            "{key}: {url:?} must start with redis:// or rediss://"
        ));
        return;
    }
    match redis::IntoConnectionInfo::into_connection_info(url) {
        Err(e) => p.push(format!("{key}: not a Redis URL: {e}")),
        Ok(_) if url_has_password(url) => p.push(format!(
            "{key}: must not carry a password; use state.password_file or the \
             CREDGATE_REDIS_PASSWORD environment variable"
        )),
        Ok(info) if !db && info.redis_settings().db() != 0 => p.push(format!(
            "{key}: names database {}, but only database 0 exists here",
            info.redis_settings().db()
        )),
        Ok(_) => {}
    }
}

/// Whether `redis://user:password@host` carries a password.
fn url_has_password(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    authority
        .rsplit_once('@')
        .is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

fn parse_telemetry(p: &mut Problems, root: &Table) -> TelemetrySettings {
    let mut s = TelemetrySettings::default();
    let Some(t) = p.section(root, "telemetry", &["log_format"]) else {
        return s;
    };
    match p.value::<String>(t, "telemetry", "log_format").as_deref() {
        None | Some("json") => {}
        Some("text") => s.log_format = LogFormat::Text,
        Some(other) => p.push(format!(
            "telemetry.log_format: {other:?} is not \"json\" or \"text\""
        )),
    }
    s
}

fn parse_callers(p: &mut Problems, root: &Table) -> Vec<CallerSettings> {
    let entries = match root.get("callers") {
        None => {
            p.push("callers: no [[callers]] entries; every caller would be denied".to_owned());
            return Vec::new();
        }
        Some(Value::Array(entries)) => entries,
        Some(other) => {
            p.push(format!(
                "callers: expected an array of tables ([[callers]]), found {}",
                other.type_str()
            ));
            return Vec::new();
        }
    };
    let known = [
        "spiffe_id",
        "dns_name",
        "common_name",
        "iam_user",
        "aws_profile",
    ];
    let mut seen = HashSet::new();
    let mut callers = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let path = format!("callers[{i}]");
        let Value::Table(t) = entry else {
            p.push(format!("{path}: expected a table"));
            continue;
        };
        p.unknown_keys(t, &format!("{path}."), &known);
        let mut matchers = Vec::new();
        if let Some(v) = p.value::<String>(t, &path, "spiffe_id") {
            match crate::spiffe::validate(&v) {
                Ok(()) => matchers.push(Matcher::SpiffeId(v)),
                Err(why) => {
                    p.push(format!(
                        "{path}.spiffe_id: {v:?} is not a SPIFFE ID (spiffe://trust-domain/path): {why}"
                    ));
                    continue;
                }
            }
        }
        if let Some(v) = p.value::<String>(t, &path, "dns_name") {
            matchers.push(Matcher::DnsName(v));
        }
        if let Some(v) = p.value::<String>(t, &path, "common_name") {
            matchers.push(Matcher::CommonName(v));
        }
        let iam_user = p.required_string(t, &path, "iam_user");
        let aws_profile = p.required_string(t, &path, "aws_profile");
        if matchers.len() != 1 {
            p.push(format!(
                "{path}: needs exactly one of spiffe_id, dns_name, common_name (found {})",
                matchers.len()
            ));
            continue;
        }
        let matcher = matchers.remove(0);
        if let Matcher::DnsName(v) | Matcher::CommonName(v) = &matcher {
            if v.trim().is_empty() {
                p.push(format!("{path}: identity must not be empty"));
                continue;
            }
            if v.len() > MAX_NAME_LEN {
                p.push(format!(
                    "{path}: identity longer than {} bytes can never match a certificate",
                    MAX_NAME_LEN
                ));
                continue;
            }
        }
        if !seen.insert(matcher.clone()) {
            p.push(format!(
                "{path}: duplicate identity {matcher}: each identity maps to exactly one IAM user"
            ));
            continue;
        }
        if let (Some(iam_user), Some(aws_profile)) = (iam_user, aws_profile) {
            // A profile holds one user's key: two users on one profile means
            // one caller would act as the other's IAM user.
            if let Some(first) = callers
                .iter()
                .find(|c: &&CallerSettings| c.aws_profile == aws_profile && c.iam_user != iam_user)
            {
                p.push(format!(
                    "{path}: aws_profile {aws_profile:?} is already the profile of iam_user {:?}; \
                     a profile holds one IAM user's key, so it cannot act as {iam_user:?} too",
                    first.iam_user
                ));
                continue;
            }
            callers.push(CallerSettings {
                matcher,
                iam_user,
                aws_profile,
            });
        }
    }
    callers
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [tls]
        cert = "c.pem"
        key = "k.pem"
        client_ca = "ca.pem"
        [[callers]]
        spiffe_id = "spiffe://corp.example/ns/a/sa/a"
        iam_user = "a"
        aws_profile = "a"
    "#;

    #[test]
    fn a_minimal_config_gets_the_documented_defaults() {
        let config = Config::parse(MINIMAL).expect("valid");
        assert_eq!(config.server, ServerSettings::default());
        assert_eq!(config.server.listen.to_string(), "0.0.0.0:8443");
        assert_eq!(config.server.admin_listen.to_string(), "0.0.0.0:8081");
        assert_eq!(config.server.request_timeout, Duration::from_secs(10));
        assert_eq!(config.server.shutdown_grace, Duration::from_secs(20));
        assert_eq!(config.aws.region, "us-east-1");
        assert_eq!(config.limits.failed_attempts, 5);
        assert_eq!(config.telemetry.log_format, LogFormat::Json);
        assert_eq!(
            config.callers[0].matcher,
            Matcher::SpiffeId("spiffe://corp.example/ns/a/sa/a".into())
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
            colour = "blue"
            [server]
            listen = "nowhere"
            request_timeout = "soon"
            max_concurrent_requests = 0
            [telemetry]
            log_format = "xml"
            [[callers]]
            spiffe_id = "spiffe://a/b"
            dns_name = "b.example"
            iam_user = "x"
            aws_profile = "x"
            [[callers]]
            common_name = "c"
            iam_user = "c"
            aws_profile = "c"
            [[callers]]
            common_name = "c"
            iam_user = "d"
            aws_profile = "d"
            extra = 1
        "#;
        let err = Config::parse(text).expect_err("invalid");
        let all = err.problems.join("\n");
        for needle in [
            "colour: unknown key",
            "server.listen",
            "server.request_timeout",
            "server.max_concurrent_requests: must be greater than zero",
            "telemetry.log_format",
            "tls: missing section",
            "callers[0]: needs exactly one of",
            "callers[2]: duplicate identity",
            "callers[2].extra: unknown key",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert_eq!(err.problems.len(), 9, "{all}");
    }

    #[test]
    fn one_identity_can_never_hold_every_connection() {
        let with = |server: &str| Config::parse(&format!("[server]\n{server}\n{MINIMAL}"));
        let config = with("max_connections = 100\nmax_connections_per_caller = 99").expect("valid");
        assert_eq!(config.server.max_connections_per_caller, 99);
        assert_eq!(
            Config::parse(MINIMAL)
                .expect("valid")
                .server
                .max_connections_per_caller,
            64
        );
        let err = with("max_connections = 64").expect_err("the default 64 is not below 64");
        assert_eq!(err.problems.len(), 1, "{err}");
        assert!(
            err.problems[0].starts_with("server.max_connections_per_caller: must be below")
                && err.problems[0].contains("the default"),
            "{err}"
        );
        let err = with("max_connections = 8\nmax_connections_per_caller = 0").expect_err("zero");
        assert_eq!(
            err.problems.len(),
            1,
            "one problem, not a second about the default: {err}"
        );
    }

    #[test]
    fn a_caller_without_any_matcher_is_an_error() {
        let text = MINIMAL.replace("spiffe_id = \"spiffe://corp.example/ns/a/sa/a\"", "");
        let err = Config::parse(&text).expect_err("invalid");
        assert!(err.problems[0].contains("found 0"), "{err}");
    }

    #[test]
    fn a_shutdown_grace_shorter_than_the_request_timeout_is_an_error() {
        let with = |server: &str| format!("[server]\n{server}\n{MINIMAL}");
        let err = Config::parse(&with("request_timeout = \"30s\"\nshutdown_grace = \"20s\""))
            .expect_err("grace too short");
        assert!(
            err.problems[0].starts_with(
                "server.shutdown_grace: 20s is shorter than server.request_timeout (30s)"
            ),
            "{err}"
        );
        Config::parse(&with("request_timeout = \"20s\"\nshutdown_grace = \"20s\""))
            .expect("equal is enough");
    }

    fn with_callers(callers: &str) -> String {
        format!("[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nclient_ca = \"ca.pem\"\n{callers}")
    }

    #[test]
    fn every_bad_spiffe_id_is_reported_at_once_with_its_rule() {
        let bad = [
            ("spiffe://corp.example/ns/a?x=1", "query"),
            ("spiffe://corp.example/ns/a#f", "fragment"),
            ("spiffe://corp.example:8443/ns/a", "port"),
            ("spiffe://me@corp.example/ns/a", "userinfo"),
            ("spiffe:///ns/a", "empty trust domain"),
            ("spiffe://corp.example/ns/../a", "'..'"),
            ("spiffe://corp.example/ns/a b", "whitespace"),
        ];
        let callers: String = bad
            .iter()
            .enumerate()
            .map(|(i, (id, _))| {
                format!(
                    "[[callers]]\nspiffe_id = {id:?}\niam_user = \"u{i}\"\naws_profile = \"p{i}\"\n"
                )
            })
            .collect();
        let err = Config::parse(&with_callers(&callers)).expect_err("invalid");
        assert_eq!(err.problems.len(), bad.len(), "{err}");
        for (i, (_, rule)) in bad.iter().enumerate() {
            assert!(
                err.problems[i].starts_with(&format!("callers[{i}].spiffe_id"))
                    && err.problems[i].contains(rule),
                "{}",
                err.problems[i]
            );
        }
    }

    #[test]
    fn one_profile_cannot_stand_for_two_iam_users() {
        let text = with_callers(
            r#"
            [[callers]]
            spiffe_id = "spiffe://corp/ns/a/sa/a"
            iam_user = "alice"
            aws_profile = "shared"
            [[callers]]
            spiffe_id = "spiffe://corp/ns/b/sa/b"
            iam_user = "bob"
            aws_profile = "shared"
            [[callers]]
            dns_name = "alice.corp"
            iam_user = "alice"
            aws_profile = "shared"
        "#,
        );
        let err = Config::parse(&text).expect_err("invalid");
        assert_eq!(err.problems.len(), 1, "{err}");
        assert!(err.problems[0].starts_with("callers[1]"), "{err}");
        assert!(err.problems[0].contains("\"shared\""), "{err}");
    }

    #[test]
    fn the_state_section_selects_a_backend_and_refuses_passwords_in_the_url() {
        let config = Config::parse(MINIMAL).expect("valid");
        assert_eq!(config.state.backend, StateBackend::Memory);
        assert_eq!(config.state.key_prefix, "credgate:");

        let redis = format!(
            "{MINIMAL}\n[state]\nurl = \"rediss://redis.svc:6380/2\"\nkey_prefix = \"team-a:\"\n\
             ca_file = \"ca.pem\"\ncommand_timeout = \"100ms\"\n"
        );
        let config = Config::parse(&redis).expect("valid");
        let StateBackend::Redis(r) = &config.state.backend else {
            panic!("redis");
        };
        assert_eq!(
            r.topology,
            Topology::Standalone("rediss://redis.svc:6380/2".into())
        );
        assert_eq!(r.command_timeout, Duration::from_millis(100));
        assert_eq!(config.state.key_prefix, "team-a:");

        let bad = format!(
            "{MINIMAL}\n[state]\nbackend = \"redis\"\nurl = \"redis://:hunter2@redis:6379\"\n\
             ca_file = \"ca.pem\"\nclient_cert = \"c.pem\"\nflavour = 1\n"
        );
        let err = Config::parse(&bad).expect_err("invalid");
        let all = err.problems.join("\n");
        for needle in [
            "state.flavour: unknown key",
            "state.url: must not carry a password",
            "state.ca_file: only applies to rediss://",
            "state.client_cert: only applies to rediss://",
            "state.client_cert and state.client_key",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert!(
            !all.contains("hunter2"),
            "the password is not echoed: {all}"
        );

        let memory_with_url =
            format!("{MINIMAL}\n[state]\nbackend = \"memory\"\nurl = \"redis://r\"\n");
        assert!(Config::parse(&memory_with_url).is_err());
    }

    #[test]
    fn cluster_and_sentinel_layouts_are_parsed_and_checked_all_at_once() {
        let state = |body: &str| format!("{MINIMAL}\n[state]\n{body}\n");
        let cluster = Config::parse(&state(
            "cluster_nodes = [\"redis://r-0:6379\", \"redis://r-1:6379\"]\n\
             max_request_ids_per_caller = 50",
        ))
        .expect("valid");
        let StateBackend::Redis(r) = &cluster.state.backend else {
            panic!("redis");
        };
        assert_eq!(
            r.topology,
            Topology::Cluster(vec!["redis://r-0:6379".into(), "redis://r-1:6379".into()])
        );
        assert_eq!(cluster.state.max_request_ids_per_caller, 50);
        let sentinel = Config::parse(&state(
            "sentinels = [\"redis://s-0:26379\"]\nsentinel_master = \"credgate\"",
        ))
        .expect("valid");
        let StateBackend::Redis(r) = &sentinel.state.backend else {
            panic!("redis");
        };
        assert_eq!(
            r.topology,
            Topology::Sentinel {
                sentinels: vec!["redis://s-0:26379".into()],
                master: "credgate".into()
            }
        );

        let err = Config::parse(&state(
            "url = \"redis://a\"\ncluster_nodes = [\"redis://b\"]\nkey_prefix = \"x{y}:\"\n\
             max_request_ids_per_caller = 0",
        ))
        .expect_err("invalid");
        let all = err.problems.join("\n");
        for needle in [
            "state: set only one of url, cluster_nodes and sentinels",
            "state.key_prefix: \"x{y}:\" must not contain",
            "state.max_request_ids_per_caller: must be greater than zero",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        let err = Config::parse(&state(
            "cluster_nodes = [\"redis://a/3\", \"rediss://b\", \"http://c\", \"redis://:pw@d\"]",
        ))
        .expect_err("invalid");
        let all = err.problems.join("\n");
        for needle in [
            "state.cluster_nodes[0]: names database 3",
            "state.cluster_nodes[2]: \"http://c\" must start with redis://",
            "state.cluster_nodes[3]: must not carry a password",
            "state.cluster_nodes: mixes redis:// and rediss://",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert!(!all.contains("pw@"), "no password echoed: {all}");
        let err =
            Config::parse(&state("sentinels = []\ncommand_timeout = \"1s\"")).expect_err("invalid");
        let all = err.problems.join("\n");
        for needle in [
            "state.sentinel_master and state.sentinels: set both or neither",
            "state.sentinels: must list at least one",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        let err = Config::parse(&state("command_timeout = \"1s\"")).expect_err("invalid");
        assert!(
            err.problems[0].contains("state.command_timeout: only applies to the redis backend"),
            "{err}"
        );
    }

    #[test]
    fn state_keys_carry_the_matcher_kind() {
        let keys = [
            Matcher::SpiffeId("spiffe://corp/ns/a/sa/a".into()),
            Matcher::DnsName("svc.corp".into()),
            Matcher::CommonName("svc.corp".into()),
        ]
        .map(|m| m.state_key());
        assert_eq!(
            keys,
            [
                "spiffe:spiffe://corp/ns/a/sa/a",
                "dns:svc.corp",
                "cn:svc.corp"
            ]
        );
    }

    #[test]
    fn a_crl_is_one_file_or_a_list_of_files() {
        let one = MINIMAL.replace(
            "client_ca = \"ca.pem\"",
            "client_ca = \"ca.pem\"\ncrl = \"a.crl\"",
        );
        assert_eq!(Config::parse(&one).expect("valid").tls.crl.len(), 1);
        let two = MINIMAL.replace(
            "client_ca = \"ca.pem\"",
            "client_ca = \"ca.pem\"\ncrl = [\"root.crl\", \"issuing.crl\"]",
        );
        assert_eq!(Config::parse(&two).expect("valid").tls.crl.len(), 2);
        let wrong = MINIMAL.replace("client_ca = \"ca.pem\"", "client_ca = \"ca.pem\"\ncrl = 3");
        assert!(Config::parse(&wrong).is_err());
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics_on_arbitrary_text(text in "\\PC{0,400}") {
            let _ = Config::parse(&text);
        }

        #[test]
        fn parsing_never_panics_on_mutated_valid_configs(
            edits in proptest::collection::vec((proptest::sample::select(
                vec!["=", "\"", "[", "]", "\n", "0", "-1", "x", "spiffe://", "\u{0}", "[[callers]]"]
            ), proptest::prelude::any::<proptest::sample::Index>()), 1..6),
        ) {
            let mut text = MINIMAL.to_owned();
            for (insert, at) in edits {
                let mut i = at.index(text.len() + 1);
                while !text.is_char_boundary(i) {
                    i -= 1;
                }
                text.insert_str(i, insert);
            }
            // Valid or not, every outcome is a value: invalid configs list
            // at least one problem.
            if let Err(e) = Config::parse(&text) {
                proptest::prop_assert!(!e.problems.is_empty());
            }
        }
    }

    #[test]
    fn a_spiffe_id_must_use_the_spiffe_scheme() {
        let text = MINIMAL.replace("spiffe://corp.example/ns/a/sa/a", "https://a/b");
        let err = Config::parse(&text).expect_err("invalid");
        assert!(err.problems[0].contains("is not a SPIFFE ID"), "{err}");
    }
}
