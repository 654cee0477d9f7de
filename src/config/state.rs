//! `[state]`: where the attempt counters and `request_id` outcomes live —
//! this process's memory, or Redis/Valkey (one server, Cluster or Sentinel)
//! with its credentials and TLS files.

use std::{path::PathBuf, time::Duration};

use toml::Table;

use super::problems::{Problems, set};

/// The keys of `[state]`.
pub(super) const KEYS: &[&str] = &[
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

/// `state.command_timeout` when it is not set.
const COMMAND_TIMEOUT: Duration = Duration::from_millis(250);

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

impl StateSettings {
    /// Whether every replica shares the state (Redis/Valkey).
    pub(crate) fn is_shared(&self) -> bool {
        matches!(self.backend, StateBackend::Redis(_))
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

pub(super) fn parse(p: &mut Problems, root: &Table) -> StateSettings {
    let mut s = StateSettings::default();
    let Some(t) = p.section(root, "state", KEYS) else {
        return s;
    };
    set(&mut s.key_prefix, key_prefix(p, t));
    set(
        &mut s.max_request_ids_per_caller,
        p.positive(t, "state", "max_request_ids_per_caller"),
    );
    set(&mut s.backend, backend(p, t));
    s
}

/// `key_prefix`, when set and usable. A brace would move the Cluster hash
/// tag off the caller, or (`{}`) hash each key on its own: one caller's keys
/// in several slots, and its Lua scripts refused.
fn key_prefix(p: &mut Problems, t: &Table) -> Option<String> {
    if !t.contains_key("key_prefix") {
        return None;
    }
    let prefix = p.required_string(t, "state", "key_prefix")?;
    if prefix.contains(['{', '}']) {
        p.push(format!(
            "state.key_prefix: {prefix:?} must not contain '{{' or '}}' \
             (credgate puts each caller's Redis Cluster hash tag there itself)"
        ));
        return None;
    }
    Some(prefix)
}

/// The backend `[state]` asks for: `None` for memory, and when what it asks
/// for is unusable (its problems recorded).
fn backend(p: &mut Problems, t: &Table) -> Option<StateBackend> {
    let name: Option<String> = p.value(t, "state", "backend");
    let layout = parse_topology(p, t);
    let options = Options::read(p, t);
    match (name.as_deref(), layout) {
        (None | Some("memory"), Layout::None) => {
            options.refuse_without_redis(p);
            None
        }
        (Some("memory"), Layout::Given { .. }) => {
            p.push(
                "state.backend: the memory backend takes no url, cluster_nodes or sentinels \
                 (remove them, or set backend = \"redis\")"
                    .to_owned(),
            );
            None
        }
        (Some("redis"), Layout::None) => {
            p.push(
                "state.url: the redis backend needs one of url, cluster_nodes or sentinels"
                    .to_owned(),
            );
            None
        }
        (None | Some("redis"), Layout::Given { topology, tls }) => {
            options.check_for_redis(p, tls);
            // `None`: unusable, its problems already recorded.
            topology.map(|topology| StateBackend::Redis(options.settings(topology)))
        }
        (Some(other), _) => {
            p.push(format!(
                "state.backend: {other:?} is not \"memory\" or \"redis\""
            ));
            None
        }
    }
}

/// The options only a Redis backend takes.
struct Options {
    password_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    command_timeout: Option<Duration>,
    command_timeout_set: bool,
}

impl Options {
    fn read(p: &mut Problems, t: &Table) -> Self {
        let mut path = |key| p.value::<String>(t, "state", key).map(PathBuf::from);
        let (password_file, ca_file) = (path("password_file"), path("ca_file"));
        let (client_cert, client_key) = (path("client_cert"), path("client_key"));
        Self {
            password_file,
            ca_file,
            client_cert,
            client_key,
            command_timeout: p.duration(t, "state", "command_timeout"),
            command_timeout_set: t.contains_key("command_timeout"),
        }
    }

    /// Each option, whether it is set, and whether it needs `rediss://`.
    fn given(&self) -> [(&'static str, bool, bool); 5] {
        [
            ("password_file", self.password_file.is_some(), false),
            ("ca_file", self.ca_file.is_some(), true),
            ("client_cert", self.client_cert.is_some(), true),
            ("client_key", self.client_key.is_some(), true),
            ("command_timeout", self.command_timeout_set, false),
        ]
    }

    /// The memory backend takes none of them.
    fn refuse_without_redis(&self, p: &mut Problems) {
        for (key, _, _) in self.given().into_iter().filter(|(_, set, _)| *set) {
            p.push(format!(
                "state.{key}: only applies to the redis backend \
                 (set state.url, state.cluster_nodes or state.sentinels)"
            ));
        }
    }

    /// TLS files only with `rediss://`; a client certificate with its key.
    fn check_for_redis(&self, p: &mut Problems, tls: bool) {
        if !tls {
            for (key, _, _) in self
                .given()
                .into_iter()
                .filter(|(_, set, tls)| *set && *tls)
            {
                p.push(format!("state.{key}: only applies to rediss:// (TLS) URLs"));
            }
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            p.push("state.client_cert and state.client_key: set both or neither".to_owned());
        }
    }

    fn settings(self, topology: Topology) -> RedisSettings {
        RedisSettings {
            topology,
            password_file: self.password_file,
            ca_file: self.ca_file,
            client_cert: self.client_cert,
            client_key: self.client_key,
            command_timeout: self.command_timeout.unwrap_or(COMMAND_TIMEOUT),
        }
    }
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
