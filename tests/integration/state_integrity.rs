//! State that cannot be confused, reset or orphaned (issue 16): callers
//! keyed by matcher kind, a limit only a change clears, claims given back
//! when the Redis connection drops, outcomes kept across a Redis restart,
//! the store's eviction policy and memory, a bound per caller, two round
//! trips per change, and `credgate lockout`. Real redis-server, the IAM
//! emulator, credgate processes.

use std::{
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use credgate::devpki::ClientSpec;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tonic::Code;
use tonic_types::StatusExt;

use crate::harness::*;

const CALLER: &str = "spiffe://corp.example/ns/state/sa/state";

fn limits(failed_attempts: u32) -> String {
    format!("[limits]\nfailed_attempts = {failed_attempts}\nfailed_attempts_window = \"1h\"\n")
}

/// `[state]` in `redis` with extra keys.
fn redis_state(redis: &Redis, extra: &str) -> String {
    format!(
        "[state]\nurl = {:?}\nkey_prefix = {:?}\n{extra}\n",
        redis.url(),
        unique("credgate") + ":"
    )
}

#[tokio::test]
async fn a_dns_caller_and_a_cn_caller_with_one_value_share_no_state() {
    let emulator = Emulator::shared();
    for backend in ["memory", "redis"] {
        let redis = Redis::start();
        let dns_user = emulator.standard_user("Dns-pass-1").await;
        let cn_user = emulator.standard_user("Cn-pass-1").await;
        let pki = Pki::new();
        let mut dns = CallerEntry::spiffe(CALLER, &dns_user);
        dns.matcher = "dns_name = \"svc.corp.example\"".into();
        let mut cn = CallerEntry::spiffe(CALLER, &cn_user);
        cn.matcher = "common_name = \"svc.corp.example\"".into();
        let mut setup = Setup::new(emulator, &pki)
            .caller(dns)
            .caller(cn)
            .toml(&limits(2));
        if backend == "redis" {
            setup = setup.toml(&redis_state(&redis, ""));
        }
        let app = setup.start();
        let dns_cert = pki.client(&ClientSpec {
            dns_names: vec!["svc.corp.example".into()],
            common_name: Some("dns-holder".into()),
            ..ClientSpec::default()
        });
        let cn_cert = pki.client(&ClientSpec {
            common_name: Some("svc.corp.example".into()),
            ..ClientSpec::default()
        });
        let mut as_dns = app.client(&pki, &dns_cert).await;
        let mut as_cn = app.client(&pki, &cn_cert).await;

        // One request_id, two callers: each runs its own change.
        let id = request_id();
        let first = as_dns
            .change_password(change_with_id("Dns-pass-1", "Dns-pass-2", &id))
            .await
            .expect("dns caller changes")
            .into_inner();
        assert_eq!(first.iam_user, dns_user.name, "{backend}");
        let second = as_cn
            .change_password(change_with_id("Cn-pass-1", "Cn-pass-2", &id))
            .await
            .unwrap_or_else(|s| panic!("{backend}: the cn caller's own change: {s:?}"))
            .into_inner();
        assert_eq!(
            second.iam_user, cn_user.name,
            "{backend}: not a replay of the dns caller's outcome"
        );
        assert!(
            emulator.password_is(&cn_user, "Cn-pass-2").await,
            "{backend}"
        );

        // The dns caller's wrong guesses lock out the dns caller only.
        for i in 0..2 {
            let status = as_dns
                .change_password(change(&format!("Dns-wrong-{i}"), "Dns-pass-3"))
                .await
                .expect_err("wrong");
            expect_error(&status, Code::PermissionDenied, "OLD_PASSWORD_INCORRECT");
        }
        let status = as_dns
            .change_password(change("Dns-pass-2", "Dns-pass-3"))
            .await
            .expect_err("locked out");
        expect_error(&status, Code::ResourceExhausted, "TOO_MANY_FAILED_ATTEMPTS");
        as_cn
            .change_password(change("Cn-pass-2", "Cn-pass-3"))
            .await
            .unwrap_or_else(|s| panic!("{backend}: the cn caller is not locked out: {s:?}"));
    }
}

#[tokio::test]
async fn policy_violations_between_wrong_guesses_do_not_reset_the_limit() {
    // A private emulator: the account password policy is account-wide.
    let emulator = Emulator::start();
    emulator
        .set_policy(14, false, false, false, false, None)
        .await;
    // Without GetAccountPasswordPolicy the local pre-check is skipped and
    // IAM's own PasswordPolicyViolation answers.
    let user = emulator
        .user(
            Some("Policy-pass-0001"),
            &["iam:ChangePassword", "iam:GetUser"],
        )
        .await;
    let rig = Rig::for_user(&emulator, CALLER, user, |s| s.toml(&limits(3)));
    let mut client = rig.client().await;
    let mut reasons = Vec::new();
    for i in 0..3 {
        let wrong = client
            .change_password(change(&format!("Wrong-guess-000{i}"), "Policy-pass-0002"))
            .await
            .expect_err("wrong");
        reasons.push(error_info(&wrong).0);
        let violation = client
            .change_password(change("Policy-pass-0001", "short"))
            .await
            .expect_err("too short");
        let (reason, metadata) = error_info(&violation);
        if reason == "PASSWORD_POLICY_VIOLATION" {
            assert_eq!(
                metadata.get("awsErrorCode").map(String::as_str),
                Some("PasswordPolicyViolation"),
                "IAM's own check, not the local one"
            );
        }
        reasons.push(reason);
    }
    assert_eq!(
        reasons,
        [
            "OLD_PASSWORD_INCORRECT",
            "PASSWORD_POLICY_VIOLATION",
            "OLD_PASSWORD_INCORRECT",
            "PASSWORD_POLICY_VIOLATION",
            "OLD_PASSWORD_INCORRECT",
            "TOO_MANY_FAILED_ATTEMPTS",
        ],
        "a policy violation is no success: it clears nothing"
    );
    let status = client
        .change_password(change("Wrong-guess-0009", "Policy-pass-0002"))
        .await
        .expect_err("locked out");
    expect_error(&status, Code::ResourceExhausted, "TOO_MANY_FAILED_ATTEMPTS");
    assert_eq!(emulator.calls("ChangePassword", &rig.user.name).await, 5);
}

/// A TCP proxy in front of Redis that, once armed, forwards the next
/// client chunk containing `pattern` to Redis and then cuts the connection
/// without passing Redis's answer back: the command ran, its caller never
/// hears so.
struct CuttingProxy {
    port: u16,
    armed: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
    cuts: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CuttingProxy {
    async fn start(upstream: u16) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let armed = Arc::new(std::sync::Mutex::new(None::<Vec<u8>>));
        let cuts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let task = tokio::spawn({
            let (armed, cuts) = (armed.clone(), cuts.clone());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        continue;
                    };
                    tokio::spawn(Self::pump(client, server, armed.clone(), cuts.clone()));
                }
            }
        });
        CuttingProxy {
            port,
            armed,
            cuts,
            task,
        }
    }

    async fn pump(
        client: TcpStream,
        server: TcpStream,
        armed: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
        cuts: Arc<std::sync::atomic::AtomicUsize>,
    ) {
        let (mut client_read, mut client_write) = client.into_split();
        let (mut server_read, mut server_write) = server.into_split();
        let cut = Arc::new(AtomicBool::new(false));
        let up = {
            let cut = cut.clone();
            async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match client_read.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    let chunk = &buf[..n];
                    let hit = {
                        let mut armed = armed.lock().expect("armed");
                        let hit = armed
                            .as_ref()
                            .is_some_and(|p| chunk.windows(p.len()).any(|w| w == p.as_slice()));
                        if hit {
                            *armed = None;
                        }
                        hit
                    };
                    if hit {
                        // Nothing more reaches the client from here on.
                        cut.store(true, Ordering::SeqCst);
                        cuts.fetch_add(1, Ordering::SeqCst);
                    }
                    if server_write.write_all(chunk).await.is_err() {
                        return;
                    }
                    if hit {
                        // Redis runs it; then the connection dies.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        return;
                    }
                }
            }
        };
        let down = async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match server_read.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if cut.load(Ordering::SeqCst) {
                    return;
                }
                if client_write.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        };
        // Whichever side ends, both sockets close.
        tokio::select! {
            () = up => {}
            () = down => {}
        }
    }

    fn arm(&self, pattern: &str) {
        *self.armed.lock().expect("armed") = Some(pattern.as_bytes().to_vec());
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn a_claim_whose_answer_was_lost_is_given_back_and_the_retry_runs_the_change() {
    let emulator = Emulator::shared();
    let redis = Redis::start();
    let proxy = CuttingProxy::start(redis.port()).await;
    let user = emulator.standard_user("Orphan-pass-1").await;
    let pki = Pki::new();
    let app = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(CALLER, &user))
        .toml(&format!(
            "[state]\nurl = {:?}\nkey_prefix = \"orphan:\"\n",
            proxy.url()
        ))
        .start();
    let mut client = app.client(&pki, &pki.spiffe_client(CALLER)).await;
    // Warm: the scripts are loaded, the connection is up.
    client
        .change_password(change_with_id(
            "Orphan-pass-1",
            "Orphan-pass-2",
            &request_id(),
        ))
        .await
        .expect("warm-up change");

    let id = request_id();
    proxy.arm(&format!(":request:{id}"));
    let status = client
        .change_password(change_with_id("Orphan-pass-2", "Orphan-pass-3", &id))
        .await
        .expect_err("the claim's answer is lost");
    expect_error(&status, Code::Unavailable, "STATE_UNAVAILABLE");
    assert_eq!(proxy.cuts.load(Ordering::SeqCst), 1, "the proxy cut once");
    assert_eq!(
        emulator.calls("ChangePassword", &user.name).await,
        1,
        "IAM was not called"
    );

    // The retry docs/errors.md recommends runs the change (the claim that
    // Redis did make was given back), not OUTCOME_UNKNOWN.
    let done = client
        .change_password(change_with_id("Orphan-pass-2", "Orphan-pass-3", &id))
        .await
        .unwrap_or_else(|s| panic!("the retry runs the change: {s:?}"))
        .into_inner();
    assert_eq!(done.iam_user, user.name);
    assert_eq!(emulator.calls("ChangePassword", &user.name).await, 2);
    assert!(emulator.password_is(&user, "Orphan-pass-3").await);
    let dump = redis.dump().await;
    assert!(
        dump.iter()
            .any(|(k, v)| k.contains(&format!(":request:{id}")) && v.contains("\"done\"")),
        "the retry's outcome is stored: {dump:?}"
    );
}

#[tokio::test]
async fn a_claim_held_by_a_paused_redis_is_given_back_once_it_resumes() {
    let emulator = Emulator::shared();
    let redis = Redis::start();
    let user = emulator.standard_user("Paused-pass-1").await;
    let pki = Pki::new();
    let app = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(CALLER, &user))
        .toml(&redis_state(&redis, ""))
        .start();
    let mut client = app.client(&pki, &pki.spiffe_client(CALLER)).await;
    client
        .change_password(change_with_id(
            "Paused-pass-1",
            "Paused-pass-2",
            &request_id(),
        ))
        .await
        .expect("warm-up change");

    // The claim reaches a paused Redis: credgate gives up waiting, and
    // Redis runs it (and whatever gives it back) once it resumes.
    let id = request_id();
    redis.signal("STOP");
    let status = client
        .change_password(change_with_id("Paused-pass-2", "Paused-pass-3", &id))
        .await
        .expect_err("no answer in time");
    redis.signal("CONT");
    expect_error(&status, Code::Unavailable, "STATE_UNAVAILABLE");
    assert_eq!(emulator.calls("ChangePassword", &user.name).await, 1);
    let done = client
        .change_password(change_with_id("Paused-pass-2", "Paused-pass-3", &id))
        .await
        .unwrap_or_else(|s| panic!("the retry runs the change: {s:?}"))
        .into_inner();
    assert_eq!(done.iam_user, user.name);
    assert_eq!(emulator.calls("ChangePassword", &user.name).await, 2);
    assert!(emulator.password_is(&user, "Paused-pass-3").await);
}

#[tokio::test]
async fn a_redis_restart_between_claim_and_completion_costs_no_second_iam_call() {
    let emulator = Emulator::shared();
    let mut redis = Redis::start();
    let user = emulator.standard_user("Restart-pass-1").await;
    let pki = Pki::new();
    let app = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(CALLER, &user))
        .toml(&redis_state(&redis, ""))
        .start();
    let client = app.client(&pki, &pki.spiffe_client(CALLER)).await;
    emulator
        .fault("ChangePassword", &user.name, json!({"delay_seconds": 2.0}))
        .await;
    let id = request_id();
    let first = {
        let (mut client, id) = (client.clone(), id.clone());
        tokio::spawn(async move {
            client
                .change_password(with_timeout(
                    change_with_id("Restart-pass-1", "Restart-pass-2", &id),
                    "8S",
                ))
                .await
        })
    };
    for _ in 0..100 {
        if emulator.calls("ChangePassword", &user.name).await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(emulator.calls("ChangePassword", &user.name).await, 1);
    // Everything credgate stored is gone (no persistence).
    redis.stop();
    redis.restart();
    let changed = first
        .await
        .expect("join")
        .expect("the first call changes the password")
        .into_inner();
    app.wait_for_line("the lost-claim ERROR", |v| {
        v["level"] == "ERROR"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("the request_id claim was gone"))
    })
    .await;

    let mut client = client;
    let again = client
        .change_password(change_with_id("Restart-pass-1", "Restart-pass-2", &id))
        .await
        .unwrap_or_else(|s| panic!("replayed, not run again: {s:?}"))
        .into_inner();
    assert_eq!(
        again.iam_request_id, changed.iam_request_id,
        "the first call's outcome"
    );
    assert!(again.replayed, "a replay says so");
    assert_eq!(
        emulator.calls("ChangePassword", &user.name).await,
        1,
        "exactly one IAM call for one request_id"
    );
    assert!(emulator.password_is(&user, "Restart-pass-2").await);
}

#[tokio::test]
async fn a_store_that_may_evict_keys_is_refused_at_start_and_by_check_config() {
    let emulator = Emulator::shared();
    let redis = Redis::start_with(None, &["--maxmemory-policy", "volatile-lru"]);
    let user = emulator.standard_user("Evict-pass-1").await;
    let pki = Pki::new();
    let setup = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(CALLER, &user))
        .toml(&redis_state(&redis, ""));
    let (dir, config) = setup.write();

    let (code, _, stderr) = check_config(dir.path(), &config, true);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("maxmemory-policy is \"volatile-lru\"") && stderr.contains("noeviction"),
        "{stderr}"
    );
    let (code, stdout, stderr) = check_config(dir.path(), &config, false);
    assert_eq!(code, Some(0), "offline, nothing is asked: {stdout}{stderr}");

    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::from({
            let mut cmd = credgate_command(dir.path());
            cmd.args(["serve", "--config"]).arg(&config);
            cmd
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output(),
    )
    .await
    .expect("credgate refuses to start, promptly")
    .expect("run");
    let output =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(70), "{output}");
    assert!(output.contains("requires noeviction"), "{output}");

    // Fixed, credgate starts; then the store comes back (a restart, a
    // failover) evicting: ChangePassword fails closed, IAM is not called.
    redis
        .command(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])
        .await
        .expect("CONFIG SET");
    let app = Credgate::spawn(dir, &config, &[]);
    let mut client = app.client(&pki, &pki.spiffe_client(CALLER)).await;
    client
        .change_password(change_with_id(
            "Evict-pass-1",
            "Evict-pass-2",
            &request_id(),
        ))
        .await
        .expect("noeviction: served");
    let port = redis.port();
    drop(redis);
    let _evicting = Redis::start_on(port, None, &["--maxmemory-policy", "allkeys-lru"]);
    let policy_logged = |app: &Credgate| {
        app.lines()
            .iter()
            .any(|l| l.contains("\"ERROR\"") && l.contains("maxmemory-policy is not noeviction"))
    };
    for _ in 0..100 {
        let mut probe = change("Evict-pass-2", "Evict-pass-3");
        probe.validate_only = true;
        let _ = client.change_password(probe).await;
        if policy_logged(&app) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(policy_logged(&app), "{}", app.lines().join("\n"));
    for request in [
        change("Evict-pass-2", "Evict-pass-3"),
        change_with_id("Evict-pass-2", "Evict-pass-3", &request_id()),
    ] {
        let status = client.change_password(request).await.expect_err("closed");
        expect_error(&status, Code::Unavailable, "STATE_UNAVAILABLE");
    }
    assert_eq!(emulator.calls("ChangePassword", &user.name).await, 1);
}

#[tokio::test]
async fn a_store_out_of_memory_fails_closed_before_iam() {
    let emulator = Emulator::shared();
    let redis = Redis::start();
    let user = emulator.standard_user("Oom-pass-1").await;
    let pki = Pki::new();
    let app = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(CALLER, &user))
        .toml(&redis_state(&redis, ""))
        .start();
    let mut client = app.client(&pki, &pki.spiffe_client(CALLER)).await;
    client
        .change_password(change("Oom-pass-1", "Oom-pass-2"))
        .await
        .expect("room");
    redis
        .command(&["CONFIG", "SET", "maxmemory", "1"])
        .await
        .expect("CONFIG SET");
    for request in [
        change("Oom-pass-2", "Oom-pass-3"),
        change_with_id("Oom-pass-2", "Oom-pass-3", &request_id()),
    ] {
        let status = client.change_password(request).await.expect_err("OOM");
        expect_error(&status, Code::Unavailable, "STATE_UNAVAILABLE");
        assert!(status.get_error_details().retry_info().is_some());
    }
    assert_eq!(
        emulator.calls("ChangePassword", &user.name).await,
        1,
        "IAM is not called"
    );
    redis
        .command(&["CONFIG", "SET", "maxmemory", "0"])
        .await
        .expect("CONFIG SET");
    client
        .change_password(change("Oom-pass-2", "Oom-pass-3"))
        .await
        .expect("room again");
}

#[tokio::test]
async fn one_caller_cannot_hold_more_request_ids_than_configured() {
    let emulator = Emulator::shared();
    for backend in ["memory", "redis"] {
        let redis = Redis::start();
        let user = emulator.standard_user("Bound-pass-0").await;
        let pki = Pki::new();
        let mut setup = Setup::new(emulator, &pki).caller(CallerEntry::spiffe(CALLER, &user));
        setup = if backend == "redis" {
            setup.toml(&redis_state(&redis, "max_request_ids_per_caller = 2"))
        } else {
            setup.toml("[state]\nmax_request_ids_per_caller = 2\n")
        };
        let app = setup.start();
        let mut client = app.client(&pki, &pki.spiffe_client(CALLER)).await;
        let ids: Vec<String> = (0..3).map(|_| request_id()).collect();
        for (i, id) in ids.iter().take(2).enumerate() {
            client
                .change_password(change_with_id(
                    &format!("Bound-pass-{i}"),
                    &format!("Bound-pass-{}", i + 1),
                    id,
                ))
                .await
                .unwrap_or_else(|s| panic!("{backend}: {s:?}"));
        }
        let status = client
            .change_password(change_with_id("Bound-pass-2", "Bound-pass-3", &ids[2]))
            .await
            .expect_err("over the bound");
        expect_error(&status, Code::ResourceExhausted, "TOO_MANY_REQUEST_IDS");
        let details = status.get_error_details();
        let retry = details
            .retry_info()
            .and_then(|r| r.retry_delay)
            .expect("RetryInfo");
        assert!(
            retry > Duration::from_secs(23 * 3600),
            "{backend}: {retry:?}"
        );
        assert!(details.quota_failure().is_some(), "{backend}");
        assert_eq!(emulator.calls("ChangePassword", &user.name).await, 2);
        // Stored outcomes replay, and calls without a request_id go on.
        client
            .change_password(change_with_id("Bound-pass-0", "Bound-pass-1", &ids[0]))
            .await
            .unwrap_or_else(|s| panic!("{backend}: replayed: {s:?}"));
        client
            .change_password(change("Bound-pass-2", "Bound-pass-3"))
            .await
            .unwrap_or_else(|s| panic!("{backend}: {s:?}"));
        assert_eq!(emulator.calls("ChangePassword", &user.name).await, 3);
    }
}

/// Every command one `credgate` sends to Redis while `during` runs, as
/// `MONITOR` shows them (script-internal commands left out).
async fn monitored(redis: &Redis, during: impl Future<Output = ()>) -> Vec<String> {
    let mut monitor = tokio::process::Command::new("redis-cli")
        .args(["-p", &redis.port().to_string(), "MONITOR"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-cli (Debian package redis-tools, installed with redis-server)");
    let mut stdout = monitor.stdout.take().expect("stdout");
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    // MONITOR answers OK once it is in place.
    while !seen.contains("OK") {
        let n = stdout.read(&mut buf).await.expect("read");
        assert!(n > 0, "MONITOR ended");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    during.await;
    // Let the last commands reach the monitor, then stop it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    monitor.kill().await.expect("kill");
    let mut rest = String::new();
    let _ = stdout.read_to_string(&mut rest).await;
    seen.push_str(&rest);
    seen.lines()
        .filter(|l| l.contains('"') && !l.contains("[0 lua]"))
        .map(|l| l.split_once("] ").map_or(l, |(_, c)| c).to_owned())
        .collect()
}

#[tokio::test]
async fn a_change_costs_one_redis_round_trip_before_iam_and_one_after() {
    let emulator = Emulator::shared();
    let redis = Redis::start();
    let user = emulator.standard_user("Trip-pass-1").await;
    let pki = Pki::new();
    let app = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(CALLER, &user))
        .toml(&redis_state(&redis, ""))
        .start();
    let mut client = app.client(&pki, &pki.spiffe_client(CALLER)).await;
    // Warm: scripts loaded, eviction policy read.
    client
        .change_password(change_with_id("Trip-pass-1", "Trip-pass-2", &request_id()))
        .await
        .expect("warm-up");
    let commands = monitored(&redis, async {
        client
            .change_password(change_with_id("Trip-pass-2", "Trip-pass-3", &request_id()))
            .await
            .expect("with a request_id");
        client
            .change_password(change("Trip-pass-3", "Trip-pass-4"))
            .await
            .expect("without");
        let wrong = client
            .change_password(change_with_id("Trip-wrong-1", "Trip-pass-5", &request_id()))
            .await
            .expect_err("wrong");
        expect_error(&wrong, Code::PermissionDenied, "OLD_PASSWORD_INCORRECT");
    })
    .await;
    assert_eq!(commands.len(), 6, "two per change: {commands:#?}");
    assert!(
        commands.iter().all(|c| c.starts_with("\"EVALSHA\"")),
        "{commands:#?}"
    );
}

/// Runs `credgate lockout ...` with the config of `dir`.
fn lockout(
    dir: &std::path::Path,
    config: &std::path::Path,
    args: &[&str],
) -> (i32, String, String) {
    let out = credgate_command(dir)
        .arg("lockout")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn an_operator_sees_and_resets_a_lockout_and_the_reset_is_audited() {
    let emulator = Emulator::shared();
    let redis = Redis::start();
    let user = emulator.standard_user("Lock-pass-1").await;
    let other = emulator.standard_user("Lock-pass-1").await;
    let pki = Pki::new();
    let mut dns = CallerEntry::spiffe(CALLER, &other);
    dns.matcher = "dns_name = \"twin.corp.example\"".into();
    let mut cn = CallerEntry::spiffe(CALLER, &other);
    cn.matcher = "common_name = \"twin.corp.example\"".into();
    let setup = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(CALLER, &user))
        .caller(dns)
        .caller(cn)
        .toml(&limits(2))
        .toml(&redis_state(&redis, ""));
    let (dir, config) = setup.write();
    let app = Credgate::spawn(dir, &config, &[]);
    let dir = app.dir.path();
    let mut client = app.client(&pki, &pki.spiffe_client(CALLER)).await;
    for i in 0..2 {
        client
            .change_password(change(&format!("Lock-wrong-{i}"), "Lock-pass-2"))
            .await
            .expect_err("wrong");
    }

    let (code, stdout, stderr) = lockout(dir, &config, &["status", "--caller", CALLER, "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let status: Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(status["caller"], format!("spiffe:{CALLER}"));
    assert_eq!(status["failures"], 2);
    assert_eq!(status["limit"], 2);
    assert_eq!(status["locked_out"], true);
    assert!(status["retry_after_seconds"].as_u64().expect("retry") > 3500);
    let (code, text, _) = lockout(dir, &config, &["status", "--caller", CALLER]);
    assert_eq!(code, 0);
    assert!(
        text.contains("2 of 2 failed attempts") && text.contains("locked out for"),
        "{text}"
    );

    let (code, stdout, stderr) = lockout(dir, &config, &["reset", "--caller", CALLER]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("cleared 2 failed attempt(s)"), "{stderr}");
    let audit: Value = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["target"] == "credgate::audit")
        .unwrap_or_else(|| panic!("an audit event on stdout: {stdout}"));
    assert_eq!(audit["action"], "lockout_reset");
    assert_eq!(audit["caller"], format!("spiffe:{CALLER}"));
    assert_eq!(audit["failures_cleared"], 2);

    client
        .change_password(change("Lock-pass-1", "Lock-pass-2"))
        .await
        .expect("no longer locked out");
    let (_, stdout, _) = lockout(dir, &config, &["status", "--caller", CALLER, "--json"]);
    let status: Value = serde_json::from_str(stdout.trim()).expect("JSON");
    assert_eq!(
        (status["failures"].clone(), status["locked_out"].clone()),
        (json!(0), json!(false))
    );

    // A value two callers' matchers share must name its kind.
    let (code, _, stderr) = lockout(dir, &config, &["status", "--caller", "twin.corp.example"]);
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("dns:twin.corp.example") && stderr.contains("cn:twin.corp.example"),
        "{stderr}"
    );
    let (code, stdout, stderr) = lockout(
        dir,
        &config,
        &["status", "--caller", "cn:twin.corp.example", "--json"],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("\"cn:twin.corp.example\""), "{stdout}");

    // The store down: exit 69, nothing claimed.
    drop(redis);
    let (code, _, stderr) = lockout(dir, &config, &["reset", "--caller", CALLER]);
    assert_eq!(code, 69, "{stderr}");

    let help = credgate_command(dir)
        .args(["lockout", "reset", "--help"])
        .output()
        .expect("help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--caller <IDENTITY>") && help.contains("lockout_reset"),
        "{help}"
    );
}

#[tokio::test]
async fn lockout_refuses_the_memory_state_of_a_running_replica() {
    let emulator = Emulator::shared();
    let user = emulator.standard_user("Mem-lock-1").await;
    let pki = Pki::new();
    let (dir, config) = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(CALLER, &user))
        .write();
    let (code, _, stderr) = lockout(dir.path(), &config, &["status", "--caller", CALLER]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("each replica's memory"), "{stderr}");
}
