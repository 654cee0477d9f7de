//! The Redis/Valkey state backend, shared by every replica: one server
//! (`state.url`), a Cluster (`state.cluster_nodes`) or a master found through
//! Sentinel (`state.sentinels`).
//!
//! Every [`Backend`] step is one Lua script: one round trip, atomic, on the
//! server's clock (`TIME`), so replicas with drifting clocks still share one
//! window and one idea of a claim's age. A script sent again (a Cluster
//! client resending after a lost answer) finds its own work and does not do
//! it twice. Each command has a time budget, reconnects included.
//!
//! Keys, each under `key_prefix`, with the caller's state key (escaped) as
//! the Cluster hash tag, so that all of one caller's keys share a slot and
//! the scripts that touch several of them stay atomic there:
//! - `{caller}:attempts:pending` — sorted set of reserved attempts by start;
//! - `{caller}:attempts:failed` — sorted set of failures by time;
//! - `{caller}:request:<request_id>` — the JSON record of a `request_id`;
//! - `{caller}:requests` — sorted set of the caller's `request_id`s by
//!   expiry, which bounds how many it may hold;
//! - `{caller}:released:<attempt>` — a short-lived mark that an attempt
//!   whose `begin` was never answered was given up, so that the `begin`, if
//!   still on its way, cannot claim after;
//! - `{lease:<name>}:owner` — a lease (one key, its owner's random token,
//!   expiring on its own): taken with `SET NX` semantics, renewed and given
//!   up only by the owner, compare-and-set in one script.

use std::time::Duration;

use futures_util::{FutureExt, future::BoxFuture};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, FromRedisValue, IntoConnectionInfo,
    RedisError, RedisFuture, RedisResult, Script, ScriptInvocation, TlsCertificates, TlsMode,
    Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection},
    cluster::{ClusterClient, ClusterClientBuilder},
    cluster_async::ClusterConnection,
    sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType},
};
use tokio::{sync::Mutex, time::Instant};

use super::backend::{
    Backend, Began, BeginFailed, BeginOp, EndOp, EndRecord, Ended, Entry, Failures, Limit,
    OUTCOME_TTL, StoredOutcome, Verdict, ms, poll_until,
};
use crate::{
    config::{REDIS_PASSWORD_ENV, RedisSettings, Topology},
    error::Cause,
};

/// The time, in ms, as every script reads it.
macro_rules! now_ms {
    () => {
        "local t = redis.call('TIME')\n\
         local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    };
}

/// The first write of a script that writes: a command Redis refuses when
/// out of memory (`denyoom`) that changes nothing (no member is empty).
/// Redis checks memory only until a script's first write, and a script
/// cannot be rolled back: without this gate a script whose first write is
/// a deletion would go on to write past `maxmemory`, and one refused midway
/// would leave half its writes. With it, a store out of memory refuses the
/// whole step, and ChangePassword fails closed.
macro_rules! oom_gate {
    () => {
        "redis.call('ZADD', KEYS[1], 'XX', 0, '')\n"
    };
}

/// KEYS: pending, failed, released mark, [record, requests].
/// ARGV: attempt id, max failures, window ms, reservation ttl ms, claim ttl
/// ms, max request ids, request id.
const BEGIN: &str = concat!(
    now_ms!(),
    oom_gate!(),
    r#"
local id = ARGV[1]
if redis.call('EXISTS', KEYS[3]) == 1 then return {'released', ''} end
local claiming = KEYS[4] ~= nil
if claiming then
  local v = redis.call('GET', KEYS[4])
  if v then
    local r = cjson.decode(v)
    if r.pending then
      if r.pending.owner == id then return {'granted', ''} end
      return {'pending', tostring(now - r.pending.started_ms)}
    end
    return {'done', v}
  end
elseif redis.call('ZSCORE', KEYS[1], id) then
  return {'granted', ''}
end
local window = tonumber(ARGV[3])
local reservation_ttl = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - reservation_ttl)
local max = tonumber(ARGV[2])
local failed = redis.call('ZCARD', KEYS[2])
if failed >= max then
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  return {'failures', tostring(math.max(1, tonumber(oldest[2]) + window - now))}
end
if failed + redis.call('ZCARD', KEYS[1]) >= max then return {'in_flight', ''} end
if claiming then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
  if redis.call('ZCARD', KEYS[5]) >= tonumber(ARGV[6]) then
    local oldest = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
    return {'request_ids', tostring(math.max(1, tonumber(oldest[2]) - now))}
  end
  local ttl = tonumber(ARGV[5])
  redis.call('SET', KEYS[4],
    '{"pending":{"owner":"' .. id .. '","started_ms":' .. string.format('%d', now) .. '}}',
    'PX', ttl)
  redis.call('ZADD', KEYS[5], now + ttl, ARGV[7])
  redis.call('PEXPIRE', KEYS[5], ttl)
end
redis.call('ZADD', KEYS[1], now, id)
redis.call('PEXPIRE', KEYS[1], reservation_ttl)
return {'granted', ''}
"#
);

/// KEYS: pending, failed, released mark, [record, requests].
/// ARGV: attempt id, verdict, window ms, action (store|release|hold),
/// outcome JSON, outcome ttl ms, request id, requests ttl ms, '1' when the
/// outcome is a change, how long to refuse the attempt's unanswered begin
/// (ms, 0: it was answered).
const END: &str = concat!(
    now_ms!(),
    oom_gate!(),
    r#"
local id = ARGV[1]
local verdict = ARGV[2]
local action = ARGV[4]
local result = 'settled'
if ARGV[10] ~= '0' then
  redis.call('SET', KEYS[3], '1', 'PX', tonumber(ARGV[10]))
end
if KEYS[4] and action ~= 'hold' then
  local v = redis.call('GET', KEYS[4])
  local ours, theirs_changed = false, false
  if v then
    if v == ARGV[5] then
      ours = true
    else
      local r = cjson.decode(v)
      if r.pending then
        ours = r.pending.owner == id
      elseif r.done and r.done.changed then
        theirs_changed = true
      end
    end
  end
  if action == 'release' then
    if ours then
      redis.call('DEL', KEYS[4])
      redis.call('ZREM', KEYS[5], ARGV[7])
    end
  else
    if not ours then
      if v then
        result = 'replaced'
        if verdict == 'failure' then verdict = 'release' end
      else
        result = 'missing'
      end
    end
    if ours or not v or (ARGV[9] == '1' and not theirs_changed) then
      local ttl = tonumber(ARGV[6])
      redis.call('SET', KEYS[4], ARGV[5], 'PX', ttl)
      redis.call('ZADD', KEYS[5], now + ttl, ARGV[7])
      if redis.call('PTTL', KEYS[5]) < tonumber(ARGV[8]) then
        redis.call('PEXPIRE', KEYS[5], tonumber(ARGV[8]))
      end
    end
  end
end
redis.call('ZREM', KEYS[1], id)
if verdict == 'failure' then
  redis.call('ZADD', KEYS[2], now, id)
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]))
elseif verdict == 'success' then
  redis.call('DEL', KEYS[2])
end
return result
"#
);

/// KEYS: pending, failed. ARGV: window ms, reservation ttl ms.
/// Returns {failures, age of the oldest in ms or -1, reservations}.
const FAILURES: &str = concat!(
    now_ms!(),
    r#"
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[1]))
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
local n = redis.call('ZCARD', KEYS[2])
local oldest = -1
if n > 0 then
  oldest = now - tonumber(redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')[2])
end
return {n, oldest, redis.call('ZCARD', KEYS[1])}
"#
);

/// KEYS: failed. ARGV: window ms. Returns how many failures were forgotten.
const RESET: &str = concat!(
    now_ms!(),
    r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))
local n = redis.call('ZCARD', KEYS[1])
redis.call('DEL', KEYS[1])
return n
"#
);

/// KEYS: record. Returns {'none'|'pending'|'done', age ms | record}.
const PEEK: &str = concat!(
    now_ms!(),
    r#"
local v = redis.call('GET', KEYS[1])
if not v then return {'none', ''} end
local r = cjson.decode(v)
if r.pending then return {'pending', tostring(now - r.pending.started_ms)} end
return {'done', v}
"#
);

/// KEYS: lease. ARGV: owner, ttl ms. Takes a free lease or renews the
/// owner's; 1 when the owner holds it now.
const LEASE_ACQUIRE: &str = r#"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
  return 1
end
if v then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
return 1
"#;

/// KEYS: lease. ARGV: owner, ttl ms. Renews the owner's lease only.
const LEASE_RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
  return 1
end
return 0
"#;

/// KEYS: lease. ARGV: owner. Deletes the owner's lease only.
const LEASE_RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"#;

struct Scripts {
    begin: Script,
    end: Script,
    failures: Script,
    reset: Script,
    peek: Script,
    lease_acquire: Script,
    lease_renew: Script,
    lease_release: Script,
}

/// How the servers are reached.
enum Link {
    /// One server; the manager reconnects on its own.
    Standalone(ConnectionManager),
    /// A Cluster; its connection follows the slots once made.
    Cluster {
        client: ClusterClient,
        conn: Mutex<Option<ClusterConnection>>,
    },
    /// The master the sentinels name, looked up again after any
    /// connection-level failure or a `READONLY` answer (a failover).
    Sentinel {
        client: Mutex<SentinelClient>,
        conn: Mutex<Option<MultiplexedConnection>>,
        config: AsyncConnectionConfig,
    },
}

/// One connection of any [`Link`].
#[derive(Clone)]
enum Conn {
    Manager(ConnectionManager),
    Cluster(ClusterConnection),
    Node(MultiplexedConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Manager(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
            Self::Node(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Manager(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Node(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Manager(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
            Self::Node(c) => c.get_db(),
        }
    }
}

/// See the module docs.
pub(crate) struct Redis {
    link: Link,
    prefix: String,
    timeout: Duration,
    scripts: Scripts,
}

/// A failure, and whether the command may have reached the server.
struct Failed {
    error: Cause,
    sent: bool,
}

impl From<Failed> for Cause {
    fn from(f: Failed) -> Self {
        f.error
    }
}

impl Redis {
    /// Prepares the connection; nothing is sent until the first command.
    pub(crate) fn new(settings: &RedisSettings, prefix: &str) -> Result<Self, String> {
        let password = password(settings)?;
        let tls = tls_certificates(settings)?;
        let timeout = settings.command_timeout;
        let link = match &settings.topology {
            Topology::Standalone(url) => {
                let info = with_password(url, password.as_deref())
                    .map_err(|e| format!("state.url: {e}"))?;
                let client = match tls {
                    Some(certs) => Client::build_with_tls(info, certs),
                    None => Client::open(info),
                }
                .map_err(|e| format!("state.url: {e}"))?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    // Reconnects are retried by the next command, not in a
                    // loop that would hold this one past its budget.
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(1));
                let manager = ConnectionManager::new_lazy_with_config(client, config)
                    .map_err(|e| format!("state.url: {e}"))?;
                Link::Standalone(manager)
            }
            Topology::Cluster(nodes) => {
                let mut builder = ClusterClientBuilder::new(nodes.iter().map(String::as_str))
                    .connection_timeout(timeout)
                    .response_timeout(timeout);
                if let Some(password) = &password {
                    builder = builder.password(password);
                }
                if let Some(certs) = tls {
                    builder = builder.certs(certs);
                }
                let client = builder
                    .build()
                    .map_err(|e| format!("state.cluster_nodes: {e}"))?;
                Link::Cluster {
                    client,
                    conn: Mutex::new(None),
                }
            }
            Topology::Sentinel { sentinels, master } => {
                let client = sentinel_client(sentinels, master, password.as_deref(), tls)
                    .map_err(|e| format!("state.sentinels: {e}"))?;
                Link::Sentinel {
                    client: Mutex::new(client),
                    conn: Mutex::new(None),
                    config: AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(timeout))
                        .set_response_timeout(Some(timeout)),
                }
            }
        };
        Ok(Self {
            link,
            prefix: prefix.to_owned(),
            timeout,
            scripts: Scripts {
                begin: Script::new(BEGIN),
                end: Script::new(END),
                failures: Script::new(FAILURES),
                reset: Script::new(RESET),
                peek: Script::new(PEEK),
                lease_acquire: Script::new(LEASE_ACQUIRE),
                lease_renew: Script::new(LEASE_RENEW),
                lease_release: Script::new(LEASE_RELEASE),
            },
        })
    }

    /// `<prefix>{<caller>}:<suffix>`. The caller's key is escaped so that
    /// no brace in it (a CN may hold anything) can move the hash tag.
    pub(super) fn key(&self, caller: &str, suffix: &str) -> String {
        let tag = caller
            .replace('%', "%25")
            .replace('{', "%7B")
            .replace('}', "%7D");
        format!("{}{{{tag}}}:{suffix}", self.prefix)
    }

    fn attempt_keys(&self, caller: &str) -> (String, String) {
        (
            self.key(caller, "attempts:pending"),
            self.key(caller, "attempts:failed"),
        )
    }

    /// A connection, made (or looked up through the sentinels) if needed.
    async fn conn(&self) -> RedisResult<Conn> {
        match &self.link {
            Link::Standalone(manager) => Ok(Conn::Manager(manager.clone())),
            Link::Cluster { client, conn } => {
                let mut conn = conn.lock().await;
                if let Some(c) = &*conn {
                    return Ok(Conn::Cluster(c.clone()));
                }
                let c = client.get_async_connection().await?;
                *conn = Some(c.clone());
                Ok(Conn::Cluster(c))
            }
            Link::Sentinel {
                client,
                conn,
                config,
            } => {
                let mut conn = conn.lock().await;
                if let Some(c) = &*conn {
                    return Ok(Conn::Node(c.clone()));
                }
                let master = client.lock().await.async_get_client().await?;
                let c = master
                    .get_multiplexed_async_connection_with_config(config)
                    .await?;
                *conn = Some(c.clone());
                Ok(Conn::Node(c))
            }
        }
    }

    /// After a failure: a Sentinel master is looked up again (it may have
    /// failed over), a Cluster connection that never worked is made again.
    async fn forget(&self, error: Option<&RedisError>) {
        let connection_level = error.is_none_or(|e| {
            e.is_io_error()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || e.is_timeout()
                || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
        });
        if let (Link::Sentinel { conn, .. }, true) = (&self.link, connection_level) {
            *conn.lock().await = None;
        }
    }

    /// Runs `invocation` within the command budget.
    async fn script<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, Failed> {
        self.bounded(async |conn: &mut Conn| invocation.invoke_async(conn).await)
            .await
    }

    /// Runs `command` within the command budget.
    async fn command<T: FromRedisValue>(&self, command: &Cmd) -> Result<T, Failed> {
        self.bounded(async |conn: &mut Conn| command.query_async(conn).await)
            .await
    }

    async fn bounded<T>(
        &self,
        op: impl AsyncFnOnce(&mut Conn) -> RedisResult<T>,
    ) -> Result<T, Failed> {
        let mut sent = false;
        let run = async {
            let mut conn = self.conn().await?;
            sent = true;
            op(&mut conn).await
        };
        let result = tokio::time::timeout(self.timeout, run).await;
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.forget(Some(&e)).await;
                Err(Failed {
                    // Refused connections carried nothing.
                    sent: sent && !e.is_connection_refusal(),
                    error: Cause::new(e),
                })
            }
            Err(_) => {
                self.forget(None).await;
                Err(Failed {
                    sent,
                    error: Cause::msg(format!(
                        "no answer from Redis within {}ms",
                        self.timeout.as_millis()
                    )),
                })
            }
        }
    }

    /// The keys the begin and end scripts take, in their order: the
    /// caller's pending and failed attempts, this attempt's release mark,
    /// and with a `request_id` its record and the caller's list of them.
    fn attempt_script_keys(
        &self,
        invocation: &mut ScriptInvocation<'_>,
        caller: &str,
        attempt: &str,
        request_id: Option<&str>,
    ) {
        let (pending, failed) = self.attempt_keys(caller);
        invocation
            .key(pending)
            .key(failed)
            .key(self.key(caller, &format!("released:{attempt}")));
        if let Some(request_id) = request_id {
            invocation
                .key(self.key(caller, &format!("request:{request_id}")))
                .key(self.key(caller, "requests"));
        }
    }

    async fn begin_once(&self, op: &BeginOp) -> Result<Began, Failed> {
        let mut invocation = self.scripts.begin.prepare_invoke();
        self.attempt_script_keys(
            &mut invocation,
            &op.caller,
            &op.id,
            op.request_id.as_deref(),
        );
        invocation
            .arg(&op.id)
            .arg(op.max_failures)
            .arg(ms(op.window))
            .arg(ms(op.reservation_ttl))
            .arg(ms(OUTCOME_TTL))
            .arg(op.max_request_ids)
            .arg(op.request_id.as_deref().unwrap_or_default());
        let (kind, detail): (String, String) = self.script(&invocation).await?;
        parse_found(&kind, &detail).map_err(|error| Failed { error, sent: true })
    }

    async fn end_once(&self, op: &EndOp) -> Result<Ended, Failed> {
        let mut invocation = self.scripts.end.prepare_invoke();
        self.attempt_script_keys(
            &mut invocation,
            &op.caller,
            &op.id,
            op.request_id.as_deref(),
        );
        let (action, outcome, ttl, changed) = match &op.record {
            EndRecord::Store(outcome, ttl) => (
                "store",
                serde_json::to_string(&Entry::Done(outcome.clone())).map_err(|e| Failed {
                    error: Cause::new(e),
                    sent: false,
                })?,
                *ttl,
                matches!(outcome, StoredOutcome::Changed { .. }),
            ),
            EndRecord::Release => ("release", String::new(), Duration::ZERO, false),
            EndRecord::Hold => ("hold", String::new(), Duration::ZERO, false),
        };
        invocation
            .arg(&op.id)
            .arg(match op.verdict {
                Verdict::Success => "success",
                Verdict::Release => "release",
                Verdict::Failure => "failure",
            })
            .arg(ms(op.window))
            .arg(action)
            .arg(outcome)
            .arg(ms(ttl))
            .arg(op.request_id.as_deref().unwrap_or_default())
            .arg(ms(OUTCOME_TTL))
            .arg(if changed { "1" } else { "0" })
            .arg(op.unanswered.map_or(0, ms));
        let answer: String = self.script(&invocation).await?;
        match answer.as_str() {
            "settled" => Ok(Ended::Settled),
            "missing" => Ok(Ended::Missing),
            "replaced" => Ok(Ended::Replaced),
            other => Err(Failed {
                error: Cause::msg(format!("unexpected answer {other:?} from the end script")),
                sent: true,
            }),
        }
    }

    /// Runs a lease script on lease `name`: whether it answered 1.
    async fn lease(
        &self,
        script: &Script,
        name: &str,
        owner: &str,
        ttl: Option<Duration>,
    ) -> Result<bool, Cause> {
        let mut invocation = script.prepare_invoke();
        invocation
            .key(self.key(&format!("lease:{name}"), "owner"))
            .arg(owner);
        if let Some(ttl) = ttl {
            invocation.arg(ms(ttl));
        }
        let held: i64 = self.script(&invocation).await?;
        Ok(held == 1)
    }

    async fn peek(&self, caller: &str, request_id: &str) -> Result<Option<Began>, Cause> {
        let mut invocation = self.scripts.peek.prepare_invoke();
        invocation.key(self.key(caller, &format!("request:{request_id}")));
        let (kind, detail): (String, String) = self.script(&invocation).await?;
        if kind == "none" {
            return Ok(None);
        }
        parse_found(&kind, &detail).map(Some)
    }
}

/// A script's `{kind, detail}` answer.
fn parse_found(kind: &str, detail: &str) -> Result<Began, Cause> {
    let millis = || {
        detail
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|e| Cause::msg(format!("bad duration {detail:?} from a script: {e}")))
    };
    Ok(match kind {
        "granted" => Began::Granted,
        "released" => Began::Released,
        "in_flight" => Began::Refused(Limit::InFlight),
        "failures" => Began::Refused(Limit::Failures(millis()?)),
        "request_ids" => Began::Refused(Limit::RequestIds(millis()?)),
        // A clock step back on the server can make an age negative.
        "pending" => Began::Pending(millis().unwrap_or_default()),
        "done" => {
            let Entry::Done(outcome) = serde_json::from_str(detail).map_err(Cause::new)?;
            Began::Done(outcome)
        }
        other => {
            return Err(Cause::msg(format!(
                "unexpected answer {other:?} from a script"
            )));
        }
    })
}

impl Backend for Redis {
    fn begin<'a>(&'a self, op: &'a BeginOp) -> BoxFuture<'a, Result<Began, BeginFailed>> {
        async move {
            self.begin_once(op).await.map_err(|f| BeginFailed {
                cause: f.error,
                may_have_run: f.sent,
            })
        }
        .boxed()
    }

    fn end<'a>(&'a self, op: &'a EndOp) -> BoxFuture<'a, Result<Ended, Cause>> {
        async move { Ok(self.end_once(op).await?) }.boxed()
    }

    fn failures<'a>(
        &'a self,
        caller: &'a str,
        window: Duration,
        reservation_ttl: Duration,
    ) -> BoxFuture<'a, Result<Failures, Cause>> {
        async move {
            let (pending, failed) = self.attempt_keys(caller);
            let mut invocation = self.scripts.failures.prepare_invoke();
            invocation
                .key(pending)
                .key(failed)
                .arg(ms(window))
                .arg(ms(reservation_ttl));
            let (count, oldest, in_flight): (u32, i64, u32) = self.script(&invocation).await?;
            Ok(Failures {
                count,
                oldest_age: u64::try_from(oldest).ok().map(Duration::from_millis),
                in_flight,
            })
        }
        .boxed()
    }

    fn reset<'a>(&'a self, caller: &'a str, window: Duration) -> BoxFuture<'a, Result<u32, Cause>> {
        async move {
            let (_, failed) = self.attempt_keys(caller);
            let mut invocation = self.scripts.reset.prepare_invoke();
            invocation.key(failed).arg(ms(window));
            Ok(self.script(&invocation).await?)
        }
        .boxed()
    }

    fn wait<'a>(
        &'a self,
        caller: &'a str,
        request_id: &'a str,
        until: Instant,
        lost_after: Duration,
    ) -> BoxFuture<'a, Result<Option<Began>, Cause>> {
        poll_until(until, lost_after, move || self.peek(caller, request_id)).boxed()
    }

    fn lease_acquire<'a>(
        &'a self,
        name: &'a str,
        owner: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, Cause>> {
        self.lease(&self.scripts.lease_acquire, name, owner, Some(ttl))
            .boxed()
    }

    fn lease_renew<'a>(
        &'a self,
        name: &'a str,
        owner: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, Cause>> {
        self.lease(&self.scripts.lease_renew, name, owner, Some(ttl))
            .boxed()
    }

    fn lease_release<'a>(
        &'a self,
        name: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<bool, Cause>> {
        self.lease(&self.scripts.lease_release, name, owner, None)
            .boxed()
    }

    fn eviction_policies(&self) -> BoxFuture<'_, Result<Option<Vec<String>>, Cause>> {
        async move {
            let info: Value = self
                .command(redis::cmd("INFO").arg("memory"))
                .await?;
            let mut texts = Vec::new();
            collect_texts(&info, &mut texts);
            let policies: Vec<String> = texts
                .iter()
                .flat_map(|t| t.lines())
                .filter_map(|l| l.strip_prefix("maxmemory_policy:"))
                .map(|p| p.trim().to_owned())
                .collect();
            if policies.is_empty() {
                return Err(Cause::msg(
                    "INFO memory did not report maxmemory_policy; cannot tell whether the store evicts keys",
                ));
            }
            Ok(Some(policies))
        }
        .boxed()
    }

    fn shared(&self) -> bool {
        true
    }
}

/// Every text in an answer: one server's INFO, or a Cluster's map of them.
fn collect_texts(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::BulkString(bytes) => out.push(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(s) => out.push(s.clone()),
        Value::VerbatimString { text, .. } => out.push(text.clone()),
        Value::Array(items) | Value::Set(items) => {
            for item in items {
                collect_texts(item, out);
            }
        }
        Value::Map(pairs) => {
            for (_, item) in pairs {
                collect_texts(item, out);
            }
        }
        _ => {}
    }
}

fn with_password(url: &str, password: Option<&str>) -> RedisResult<redis::ConnectionInfo> {
    let mut info = url.into_connection_info()?;
    if let Some(password) = password {
        let redis = info.redis_settings().clone().set_password(password);
        info = info.set_redis_settings(redis);
    }
    Ok(info)
}

fn sentinel_client(
    sentinels: &[String],
    master: &str,
    password: Option<&str>,
    tls: Option<TlsCertificates>,
) -> RedisResult<SentinelClient> {
    let addrs = sentinels
        .iter()
        .map(|url| {
            url.as_str()
                .into_connection_info()
                .map(|i| i.addr().clone())
        })
        .collect::<RedisResult<Vec<ConnectionAddr>>>()?;
    let secure = addrs
        .iter()
        .all(|a| matches!(a, ConnectionAddr::TcpTls { .. }));
    let mut builder = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)?;
    if let Some(password) = password {
        // One password for the data nodes and the sentinels, as the usual
        // charts set it up.
        builder = builder
            .set_client_to_redis_password(password)
            .set_client_to_sentinel_password(password);
    }
    if secure {
        builder = builder
            .set_client_to_redis_tls_mode(TlsMode::Secure)
            .set_client_to_sentinel_tls_mode(TlsMode::Secure);
        if let Some(certs) = tls {
            builder = builder
                .set_client_to_redis_certificates(certs.clone())
                .set_client_to_sentinel_certificates(certs);
        }
    }
    builder.build()
}

/// The CA and client certificate for `rediss://`, when configured.
fn tls_certificates(settings: &RedisSettings) -> Result<Option<TlsCertificates>, String> {
    if !settings.topology.tls() {
        return Ok(None);
    }
    let read = |path: &std::path::Path, key: &str| {
        std::fs::read(path).map_err(|e| format!("state.{key}: cannot read {}: {e}", path.display()))
    };
    let client_tls = match (&settings.client_cert, &settings.client_key) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read(cert, "client_cert")?,
            client_key: read(key, "client_key")?,
        }),
        _ => None,
    };
    let root_cert = settings
        .ca_file
        .as_deref()
        .map(|p| read(p, "ca_file"))
        .transpose()?;
    Ok(Some(TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// The password: `state.password_file`, else `$CREDGATE_REDIS_PASSWORD`.
fn password(settings: &RedisSettings) -> Result<Option<String>, String> {
    if let Some(path) = &settings.password_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("state.password_file: cannot read {}: {e}", path.display()))?;
        // Secret files usually end in a newline that is not part of the password.
        return Ok(Some(text.trim_end_matches(['\r', '\n']).to_owned()));
    }
    Ok(std::env::var(REDIS_PASSWORD_ENV)
        .ok()
        .filter(|p| !p.is_empty()))
}
