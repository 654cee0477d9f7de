//! The Redis/Valkey state backend, shared by every replica.
//!
//! One multiplexed connection (redis-rs `ConnectionManager`, reconnecting on
//! its own), a time budget on every command, and Lua scripts wherever a
//! decision and its write must be one atomic step. Scripts take the time from
//! the Redis server (`TIME`), so replicas with drifting clocks still share
//! one window.
//!
//! Keys, each under `key_prefix`, with the caller identity as a hash tag so
//! that one caller's keys share a cluster slot:
//! - `{caller}:attempts:pending` — sorted set of reserved attempts by start;
//! - `{caller}:attempts:failed` — sorted set of failures by time;
//! - `{caller}:request:<request_id>` — the JSON [`Entry`] of a `request_id`.

use std::{future::Future, time::Duration};

use redis::{
    AsyncCommands, Client, IntoConnectionInfo, Script, TlsCertificates,
    aio::{ConnectionManager, ConnectionManagerConfig},
};

use super::{Entry, Limit, Verdict};
use crate::{
    config::{REDIS_PASSWORD_ENV, RedisSettings},
    error::Cause,
};

const RESERVE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[4]))
local max = tonumber(ARGV[2])
local failed = redis.call('ZCARD', KEYS[2])
if failed >= max then
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  return math.max(1, tonumber(oldest[2]) + window - now)
end
if ARGV[1] ~= '' and failed + redis.call('ZCARD', KEYS[1]) >= max then
  return -1
end
if ARGV[1] ~= '' then
  redis.call('ZADD', KEYS[1], now, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
end
return 0
";

const SETTLE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREM', KEYS[1], ARGV[1])
if ARGV[2] == 'failure' then
  redis.call('ZADD', KEYS[2], now, ARGV[1])
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]))
elseif ARGV[2] == 'success' then
  redis.call('DEL', KEYS[2])
end
return 1
";

const CLAIM: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return false
end
return redis.call('GET', KEYS[1])
";

const ABANDON: &str = r#"
local v = redis.call('GET', KEYS[1])
if v and string.find(v, '"owner":"' .. ARGV[1] .. '"', 1, true) then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// How long a reservation may stay pending before it is taken for the
/// remains of a replica that died mid-call (it counted as a failure meanwhile).
const PENDING_RESERVATION_TTL: Duration = Duration::from_secs(10 * 60);

pub(crate) struct Redis {
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
    reserve: Script,
    settle: Script,
    claim: Script,
    abandon: Script,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Redis {
    /// Prepares the connection; nothing is sent until the first command.
    pub(crate) fn new(settings: &RedisSettings, prefix: &str) -> Result<Self, String> {
        let mut info = settings
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| format!("state.url: {e}"))?;
        if let Some(password) = password(settings)? {
            let redis = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(redis);
        }
        let client = if settings.url.starts_with("rediss://") {
            let read = |path: &std::path::Path, key: &str| {
                std::fs::read(path)
                    .map_err(|e| format!("state.{key}: cannot read {}: {e}", path.display()))
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
            Client::build_with_tls(
                info,
                TlsCertificates {
                    client_tls,
                    root_cert,
                },
            )
        } else {
            Client::open(info)
        }
        .map_err(|e| format!("state.url: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.command_timeout))
            .set_response_timeout(Some(settings.command_timeout))
            // Reconnects are retried by the next command, not in a loop
            // that would hold this one past its budget.
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("state.url: {e}"))?;
        Ok(Self {
            conn,
            prefix: prefix.to_owned(),
            timeout: settings.command_timeout,
            reserve: Script::new(RESERVE),
            settle: Script::new(SETTLE),
            claim: Script::new(CLAIM),
            abandon: Script::new(ABANDON),
        })
    }

    fn key(&self, caller: &str, suffix: &str) -> String {
        format!("{}{{{caller}}}:{suffix}", self.prefix)
    }

    fn attempt_keys(&self, caller: &str) -> (String, String) {
        (
            self.key(caller, "attempts:pending"),
            self.key(caller, "attempts:failed"),
        )
    }

    fn record_key(&self, caller: &str, request_id: &str) -> String {
        self.key(caller, &format!("request:{request_id}"))
    }

    /// Runs `op` within the command budget.
    async fn bounded<T>(
        &self,
        op: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, Cause> {
        match tokio::time::timeout(self.timeout, op).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Cause::new(e)),
            Err(_) => Err(Cause::msg(format!(
                "no answer from Redis within {}ms",
                self.timeout.as_millis()
            ))),
        }
    }

    async fn limit(
        &self,
        caller: &str,
        id: &str,
        max: u32,
        window: Duration,
    ) -> Result<Option<Limit>, Cause> {
        let (pending, failed) = self.attempt_keys(caller);
        let mut conn = self.conn.clone();
        let answer: i64 = self
            .bounded(
                self.reserve
                    .key(pending)
                    .key(failed)
                    .arg(id)
                    .arg(max)
                    .arg(ms(window))
                    .arg(ms(PENDING_RESERVATION_TTL))
                    .invoke_async(&mut conn),
            )
            .await?;
        Ok(match answer {
            0 => None,
            ms if ms > 0 => Some(Limit::Failures(Duration::from_millis(ms.unsigned_abs()))),
            _ => Some(Limit::InFlight),
        })
    }

    pub(crate) async fn reserve(
        &self,
        caller: &str,
        id: &str,
        max: u32,
        window: Duration,
    ) -> Result<Option<Limit>, Cause> {
        self.limit(caller, id, max, window).await
    }

    pub(crate) async fn check(
        &self,
        caller: &str,
        max: u32,
        window: Duration,
    ) -> Result<Option<Duration>, Cause> {
        // An empty id checks the failures without reserving.
        Ok(match self.limit(caller, "", max, window).await? {
            Some(Limit::Failures(retry_after)) => Some(retry_after),
            _ => None,
        })
    }

    pub(crate) async fn settle(
        &self,
        caller: &str,
        id: &str,
        verdict: Verdict,
        window: Duration,
    ) -> Result<(), Cause> {
        let (pending, failed) = self.attempt_keys(caller);
        let verdict = match verdict {
            Verdict::Success => "success",
            Verdict::Release => "release",
            Verdict::Failure => "failure",
        };
        let mut conn = self.conn.clone();
        self.bounded(
            self.settle
                .key(pending)
                .key(failed)
                .arg(id)
                .arg(verdict)
                .arg(ms(window))
                .invoke_async::<i64>(&mut conn),
        )
        .await?;
        Ok(())
    }

    pub(crate) async fn claim(
        &self,
        caller: &str,
        request_id: &str,
        pending: &str,
        ttl: Duration,
    ) -> Result<Option<Entry>, Cause> {
        let mut conn = self.conn.clone();
        let existing: Option<String> = self
            .bounded(
                self.claim
                    .key(self.record_key(caller, request_id))
                    .arg(pending)
                    .arg(ms(ttl))
                    .invoke_async(&mut conn),
            )
            .await?;
        existing.as_deref().map(Entry::decode).transpose()
    }

    pub(crate) async fn get(&self, caller: &str, request_id: &str) -> Result<Option<Entry>, Cause> {
        let mut conn = self.conn.clone();
        let key = self.record_key(caller, request_id);
        let value: Option<String> = self.bounded(conn.get(key)).await?;
        value.as_deref().map(Entry::decode).transpose()
    }

    pub(crate) async fn complete(
        &self,
        caller: &str,
        request_id: &str,
        done: &str,
        ttl: Duration,
    ) -> Result<(), Cause> {
        let mut conn = self.conn.clone();
        let key = self.record_key(caller, request_id);
        let _: Option<String> = self
            .bounded(
                redis::cmd("SET")
                    .arg(key)
                    .arg(done)
                    .arg("XX")
                    .arg("PX")
                    .arg(ms(ttl))
                    .query_async(&mut conn),
            )
            .await?;
        Ok(())
    }

    pub(crate) async fn abandon(
        &self,
        caller: &str,
        request_id: &str,
        owner: &str,
    ) -> Result<(), Cause> {
        let mut conn = self.conn.clone();
        self.bounded(
            self.abandon
                .key(self.record_key(caller, request_id))
                .arg(owner)
                .invoke_async::<i64>(&mut conn),
        )
        .await?;
        Ok(())
    }

    pub(crate) async fn ping(&self) -> Result<(), Cause> {
        let mut conn = self.conn.clone();
        let _: String = self
            .bounded(redis::cmd("PING").query_async(&mut conn))
            .await?;
        Ok(())
    }
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
