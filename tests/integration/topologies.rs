//! Redis as production runs it: a three-node Redis Cluster made with
//! `redis-cli --cluster create`, and a master with a replica watched by three
//! sentinels, failed over mid-test. Two credgate replicas share each.

use std::{process::Command, time::Duration};

use serde_json::json;
use tonic::Code;

use crate::harness::*;

const CALLER: &str = "spiffe://corp.example/ns/topology/sa/topology";

/// Fires `n` wrong guesses at once, spread over `apps`, and returns their
/// ErrorInfo reasons.
async fn concurrent_wrong_guesses(apps: &[Credgate], pki: &Pki, n: usize) -> Vec<String> {
    let mut clients = Vec::new();
    for app in apps {
        clients.push(app.client(pki, &pki.spiffe_client(CALLER)).await);
    }
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let mut client = clients[i % clients.len()].clone();
            tokio::spawn(async move {
                client
                    .change_password(change(&format!("Guess-{i}-wrong!"), "Never-set-1!"))
                    .await
            })
        })
        .collect();
    let mut reasons = Vec::new();
    for call in calls {
        let status = call.await.expect("join").expect_err("a wrong guess");
        reasons.push(error_info(&status).0);
    }
    reasons
}

/// Whether `app` tells `CALLER` it is locked out (a `validate_only` probe:
/// it never reaches IAM's ChangePassword).
async fn locked_out(app: &Credgate, pki: &Pki) -> bool {
    let mut probe = change("Probe-pass-1!", "Probe-pass-2!");
    probe.validate_only = true;
    match app
        .client(pki, &pki.spiffe_client(CALLER))
        .await
        .change_password(probe)
        .await
    {
        Err(status) => error_info(&status).0 == "TOO_MANY_FAILED_ATTEMPTS",
        Ok(_) => false,
    }
}

fn redis_cli(args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(args)
        .output()
        .expect("redis-cli (installed with redis-server)");
    assert!(
        out.status.success(),
        "redis-cli {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `ready` (every 100 ms, up to `within`).
async fn until(what: &str, within: Duration, mut ready: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !ready().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------- Cluster

struct Cluster {
    nodes: Vec<Redis>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let nodes: Vec<Redis> = (0..3)
            .map(|i| {
                let conf = dir.path().join(format!("nodes-{i}.conf"));
                let bus = free_port().to_string();
                Redis::start_with(
                    None,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        conf.to_str().expect("utf-8 path"),
                        "--cluster-port",
                        &bus,
                        "--cluster-node-timeout",
                        "5000",
                    ],
                )
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        redis_cli(&args);
        for node in &nodes {
            until(
                "cluster_state:ok",
                Duration::from_secs(30),
                async || match node.command(&["CLUSTER", "INFO"]).await {
                    Ok(redis::Value::BulkString(text)) => {
                        String::from_utf8_lossy(&text).contains("cluster_state:ok")
                    }
                    Ok(redis::Value::VerbatimString { text, .. }) => {
                        text.contains("cluster_state:ok")
                    }
                    _ => false,
                },
            )
            .await;
        }
        Cluster { nodes, _dir: dir }
    }

    fn state_toml(&self) -> String {
        let urls: Vec<String> = self.nodes.iter().map(Redis::url).collect();
        format!(
            "[state]\ncluster_nodes = {}\nkey_prefix = {:?}\n",
            serde_json::to_string(&urls).expect("json"),
            unique("credgate") + ":"
        )
    }
}

/// The hash tag of a key: what between its first `{` and the next `}`.
fn hash_tag(key: &str) -> &str {
    let open = key.find('{').expect("a tagged key");
    let close = key[open..].find('}').expect("closed") + open;
    &key[open + 1..close]
}

#[tokio::test]
async fn a_redis_cluster_holds_the_limit_and_the_request_ids_across_two_replicas() {
    let emulator = Emulator::shared();
    let cluster = Cluster::start().await;
    let user = emulator.standard_user("Cluster-pass-1!").await;
    let others = [
        emulator.standard_user("Other-pass-1!").await,
        emulator.standard_user("Other-pass-1!").await,
    ];
    let pki = Pki::new();
    let other_callers = [
        "spiffe://corp.example/ns/cluster-a/sa/a",
        "spiffe://corp.example/ns/cluster-b/sa/b",
    ];
    let mut setup = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(CALLER, &user))
        .toml("[limits]\nfailed_attempts = 3\nfailed_attempts_window = \"1h\"\n")
        .toml(&cluster.state_toml());
    for (caller, other) in other_callers.iter().zip(&others) {
        setup = setup.caller(CallerEntry::spiffe(caller, other));
    }
    let apps = setup.start_replicas(2);

    // A request_id outcome, replayed by the other replica.
    for (caller, other) in other_callers.iter().zip(&others) {
        let id = request_id();
        for app in &apps {
            let done = app
                .client(&pki, &pki.spiffe_client(caller))
                .await
                .change_password(change_with_id("Other-pass-1!", "Other-pass-2!", &id))
                .await
                .unwrap_or_else(|s| panic!("changed or replayed: {s:?}"))
                .into_inner();
            assert_eq!(done.iam_user, other.name);
        }
        assert_eq!(emulator.calls("ChangePassword", &other.name).await, 1);
    }

    emulator
        .fault(
            "ChangePassword",
            &user.name,
            json!({"delay_seconds": 0.3, "count": -1}),
        )
        .await;
    let reasons = concurrent_wrong_guesses(&apps, &pki, 20).await;
    let reached = emulator.calls("ChangePassword", &user.name).await;
    assert!(reached <= 3, "{reached} guesses reached IAM: {reasons:?}");
    assert!(
        reasons.iter().all(|r| [
            "OLD_PASSWORD_INCORRECT",
            "TOO_MANY_FAILED_ATTEMPTS",
            "CALLER_CONCURRENCY_EXCEEDED"
        ]
        .contains(&r.as_str())),
        "{reasons:?}"
    );
    for app in &apps {
        let status = app
            .client(&pki, &pki.spiffe_client(CALLER))
            .await
            .change_password(change("Cluster-pass-1!", "Cluster-pass-2!"))
            .await
            .expect_err("locked out on every replica");
        expect_error(&status, Code::ResourceExhausted, "TOO_MANY_FAILED_ATTEMPTS");
    }
    assert_eq!(emulator.calls("ChangePassword", &user.name).await, reached);

    // Every caller's keys sit in one slot, each on one node.
    let mut tags: std::collections::HashMap<String, (u16, i64)> = Default::default();
    let mut found = 0;
    for node in &cluster.nodes {
        for (key, _) in node.dump().await {
            found += 1;
            let slot = match node
                .command(&["CLUSTER", "KEYSLOT", &key])
                .await
                .expect("KEYSLOT")
            {
                redis::Value::Int(slot) => slot,
                other => panic!("{other:?}"),
            };
            let tag = hash_tag(&key).to_owned();
            let first = *tags.entry(tag.clone()).or_insert((node.port(), slot));
            assert_eq!(
                first,
                (node.port(), slot),
                "{key}: all of {tag}'s keys in one slot"
            );
        }
    }
    assert!(found > 0 && tags.len() == 3, "{tags:?}");
}

// --------------------------------------------------------------- Sentinel

struct Sentinels {
    master: Redis,
    replica: Redis,
    sentinels: Vec<Redis>,
    _dir: tempfile::TempDir,
}

const MASTER_NAME: &str = "credgate-test";

impl Sentinels {
    async fn start() -> Sentinels {
        let dir = tempfile::tempdir().expect("tempdir");
        let master = Redis::start();
        let master_port = master.port().to_string();
        let replica = Redis::start_with(None, &["--replicaof", "127.0.0.1", &master_port]);
        until("the replica in sync", Duration::from_secs(30), async || {
            replica
                .info("replication", "master_link_status")
                .await
                .as_deref()
                == Some("up")
        })
        .await;
        let sentinels = (0..3)
            .map(|i| {
                let conf = dir.path().join(format!("sentinel-{i}.conf"));
                std::fs::write(
                    &conf,
                    format!(
                        "sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
                         sentinel down-after-milliseconds {MASTER_NAME} 2000\n\
                         sentinel failover-timeout {MASTER_NAME} 10000\n"
                    ),
                )
                .expect("write sentinel.conf");
                Redis::start_with(Some(conf), &["--sentinel"])
            })
            .collect();
        let s = Sentinels {
            master,
            replica,
            sentinels,
            _dir: dir,
        };
        // Each sentinel knows the replica before a failover is asked for.
        for sentinel in &s.sentinels {
            until(
                "the sentinel sees the replica",
                Duration::from_secs(30),
                async || {
                    matches!(
                        sentinel.command(&["SENTINEL", "REPLICAS", MASTER_NAME]).await,
                        Ok(redis::Value::Array(replicas)) if !replicas.is_empty()
                    )
                },
            )
            .await;
        }
        s
    }

    fn state_toml(&self) -> String {
        let urls: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("redis://127.0.0.1:{}", s.port()))
            .collect();
        format!(
            "[state]\nsentinels = {}\nsentinel_master = {MASTER_NAME:?}\nkey_prefix = {:?}\n",
            serde_json::to_string(&urls).expect("json"),
            unique("credgate") + ":"
        )
    }

    async fn master_port(&self, sentinel: &Redis) -> Option<u16> {
        match sentinel
            .command(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME])
            .await
        {
            Ok(redis::Value::Array(addr)) => match addr.get(1) {
                Some(redis::Value::BulkString(port)) => String::from_utf8_lossy(port).parse().ok(),
                _ => None,
            },
            _ => None,
        }
    }
}

async fn replicated(master: &Redis, replica: &Redis) -> bool {
    let offset = master.info("replication", "master_repl_offset").await;
    offset.is_some() && replica.info("replication", "slave_repl_offset").await == offset
}

#[tokio::test]
async fn sentinel_failover_mid_test_keeps_the_limit_across_two_replicas() {
    let emulator = Emulator::shared();
    let topology = Sentinels::start().await;
    let user = emulator.standard_user("Sentinel-pass-1!").await;
    let pki = Pki::new();
    let apps = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(CALLER, &user))
        .toml("[limits]\nfailed_attempts = 5\nfailed_attempts_window = \"1h\"\n")
        .toml(&topology.state_toml())
        .start_replicas(2);

    // Two failures on the first master.
    let mut client = apps[0].client(&pki, &pki.spiffe_client(CALLER)).await;
    for i in 0..2 {
        let status = client
            .change_password(change(&format!("Before-{i}-wrong!"), "Never-set-1!"))
            .await
            .expect_err("wrong");
        expect_error(&status, Code::PermissionDenied, "OLD_PASSWORD_INCORRECT");
    }
    until(
        "the replica caught up",
        Duration::from_secs(10),
        async || replicated(&topology.master, &topology.replica).await,
    )
    .await;

    // The failover.
    redis_cli(&[
        "-p",
        &topology.sentinels[0].port().to_string(),
        "SENTINEL",
        "FAILOVER",
        MASTER_NAME,
    ]);
    for sentinel in &topology.sentinels {
        until(
            "every sentinel names the new master",
            Duration::from_secs(30),
            async || topology.master_port(sentinel).await == Some(topology.replica.port()),
        )
        .await;
    }
    until(
        "the old master demoted",
        Duration::from_secs(30),
        async || topology.master.info("replication", "role").await.as_deref() == Some("slave"),
    )
    .await;

    // 20 guesses at once on both credgate replicas, which still hold
    // connections to the old master: they follow the sentinels to the new
    // one (or fail closed while they do), and the limit still counts the
    // two failures from before.
    emulator
        .fault(
            "ChangePassword",
            &user.name,
            json!({"delay_seconds": 0.3, "count": -1}),
        )
        .await;
    let reasons = concurrent_wrong_guesses(&apps, &pki, 20).await;
    let reached = emulator.calls("ChangePassword", &user.name).await;
    assert!(reached <= 5, "{reached} guesses reached IAM: {reasons:?}");
    assert!(
        reasons.iter().all(|r| [
            "OLD_PASSWORD_INCORRECT",
            "TOO_MANY_FAILED_ATTEMPTS",
            "CALLER_CONCURRENCY_EXCEEDED",
            "STATE_UNAVAILABLE",
        ]
        .contains(&r.as_str())),
        "{reasons:?}"
    );
    // Guesses refused while the replicas found the new master left room:
    // fill it, one at a time, and the lockout comes at exactly five.
    for i in 0..20 {
        if locked_out(&apps[0], &pki).await && locked_out(&apps[1], &pki).await {
            break;
        }
        let _ = apps[i % 2]
            .client(&pki, &pki.spiffe_client(CALLER))
            .await
            .change_password(change(&format!("After-{i}-wrong!"), "Never-set-1!"))
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for app in &apps {
        assert!(locked_out(app, &pki).await, "locked out on every replica");
    }
    assert_eq!(
        emulator.calls("ChangePassword", &user.name).await,
        5,
        "exactly failed_attempts guesses reached IAM, across the failover"
    );
    assert_eq!(
        topology
            .replica
            .info("replication", "role")
            .await
            .as_deref(),
        Some("master")
    );
}

#[tokio::test]
async fn a_key_rotation_takes_its_lease_on_a_redis_cluster() {
    let emulator = Emulator::shared();
    let cluster = Cluster::start().await;
    let prefix = format!("credgate/{}", unique("cluster"));
    let identity = emulator
        .user_with_policy(None, "credgate-role-policy.json")
        .await
        .key;
    let user = emulator
        .user_with_policy(Some("Lease-pass-1!"), "managed-user-policy.json")
        .await;
    emulator
        .put_secret(&format!("{prefix}/{}", user.name), &user.key)
        .await;
    let key_prefix = unique("credgate") + ":";
    let urls: Vec<String> = cluster.nodes.iter().map(Redis::url).collect();
    let pki = Pki::new();
    let setup = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(CALLER, &user))
        .toml(&format!(
            "[state]\ncluster_nodes = {}\nkey_prefix = {key_prefix:?}\n",
            serde_json::to_string(&urls).expect("json")
        ))
        .secrets_manager(
            &identity,
            &format!(
                "secret_name = \"{prefix}/{{iam_user}}\"\nrefresh = \"1s\"\n\
                 old_key_grace = \"2s\"\nrotate_after = \"0s\""
            ),
        );
    // Another replica's lease, as it holds it: one key, its owner's token.
    let lease = format!("{key_prefix}{{lease:rotate:{}}}:owner", user.name);
    let port = cluster.nodes[0].port().to_string();
    let cli = |args: &[&str]| {
        let mut all = vec!["-c", "-p", port.as_str()];
        all.extend(args);
        redis_cli(&all)
    };
    cli(&["SET", &lease, "another-replica", "PX", "60000"]);
    let busy = setup.cli(&["keys", "rotate", "--iam-user", &user.name], &[]);
    assert_eq!(busy.code, Some(69), "{busy:?}");
    assert!(
        busy.stderr.contains("in progress elsewhere"),
        "{}",
        busy.stderr
    );
    assert_eq!(emulator.calls("CreateAccessKey", &user.name).await, 0);
    assert_eq!(
        cli(&["GET", &lease]).trim(),
        "another-replica",
        "not taken over"
    );

    cli(&["DEL", &lease]);
    let done = setup.cli(&["keys", "rotate", "--iam-user", &user.name], &[]);
    assert_eq!(done.code, Some(0), "{done:?}");
    assert_eq!(emulator.calls("CreateAccessKey", &user.name).await, 1);
    assert_eq!(cli(&["EXISTS", &lease]).trim(), "0", "given up when done");
}
