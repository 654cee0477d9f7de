//! Key custody against real peers: keys read from Secrets Manager (the
//! emulator serves it on the IAM port), rotated under load, after a crash
//! at every step of the protocol, by two replicas sharing a lease in a real
//! redis-server; `credgate keys status|rotate`; key age. credgate's own
//! identity and every managed IAM user run with exactly the shipped
//! policies of `deploy/aws/`, which the emulator evaluates (users' ARNs,
//! secrets' ARNs, `${aws:username}`).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde_json::Value;
use tonic::Code;

use crate::harness::*;

const CALLER: &str = "spiffe://corp.example/ns/custody/sa/custody";
const OTHER: &str = "spiffe://corp.example/ns/custody/sa/other";
/// Rotations here run in seconds: a short grace, a short refresh.
const FAST: &str = "refresh = \"1s\"\nold_key_grace = \"2s\"";
/// SIGABRT: what `CREDGATE_FAULT_ABORT` ends the process with.
const SIGABRT: i32 = 6;
/// A rotation, its grace included, is done well within this.
const ROTATION: Duration = Duration::from_secs(60);

/// A fresh secret-name prefix under `credgate/` (the shipped role policy's
/// prefix), so that tests sharing the emulator list only their own secrets.
fn prefix() -> String {
    format!("credgate/{}", unique("t"))
}

fn keys_toml(prefix: &str, extra: &str) -> String {
    format!("secret_name = \"{prefix}/{{iam_user}}\"\n{extra}")
}

/// credgate's own identity: a user with the shipped role policy only.
async fn identity(emulator: &Emulator) -> AccessKey {
    emulator
        .user_with_policy(None, "credgate-role-policy.json")
        .await
        .key
}

/// A managed IAM user with the shipped policy only, its key in its secret.
async fn enrolled(emulator: &Emulator, prefix: &str, password: &str) -> IamUser {
    enrolled_named(emulator, prefix, &unique("user"), password).await
}

/// As [`enrolled`], named `name`.
async fn enrolled_named(emulator: &Emulator, prefix: &str, name: &str, password: &str) -> IamUser {
    let user = managed_user(emulator, name, password).await;
    emulator
        .put_secret(&format!("{prefix}/{}", user.name), &user.key)
        .await;
    user
}

/// A managed IAM user named `name` with the shipped policy only, no secret.
async fn managed_user(emulator: &Emulator, name: &str, password: &str) -> IamUser {
    emulator
        .user_named_with_policy(name, Some(password), "managed-user-policy.json")
        .await
}

fn last4(id: &str) -> &str {
    &id[id.len() - 4..]
}

/// The rotation steps audited in `events`, in order: (step, outcome).
fn steps(events: &[Value]) -> Vec<(String, String)> {
    events
        .iter()
        .filter(|v| v["target"] == "credgate::audit" && v["action"] == "rotate_key")
        .map(|v| {
            (
                v["step"].as_str().unwrap_or_default().to_owned(),
                v["outcome"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn json_lines(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The protocol's promises, at any moment: at most one of the user's keys
/// is held by no stage of the secret, and the secret's `AWSCURRENT` key
/// signs as the user.
async fn assert_invariants(emulator: &Emulator, secret: &str, user: &str, when: &str) {
    let mut held = Vec::new();
    for stage in ["AWSCURRENT", "AWSPENDING", "AWSPREVIOUS"] {
        if let Some(key) = emulator.secret_key(secret, stage).await {
            held.push(key.id);
        }
    }
    let keys = emulator.access_keys(user).await;
    let outside = keys.iter().filter(|(id, _)| !held.contains(id)).count();
    assert!(
        outside <= 1,
        "{when}: {outside} keys outside the secret: {keys:?}"
    );
    let current = emulator
        .secret_key(secret, "AWSCURRENT")
        .await
        .unwrap_or_else(|| panic!("{when}: no AWSCURRENT"));
    let signer = emulator.who_signs(&current).await;
    assert!(
        signer
            .as_deref()
            .is_ok_and(|arn| arn.ends_with(&format!(":user/{user}"))),
        "{when}: the current key does not sign as {user}: {signer:?}"
    );
}

/// After a finished rotation: one key, the secret's `AWSCURRENT`, active.
async fn assert_one_key(emulator: &Emulator, secret: &str, user: &str) -> AccessKey {
    let current = emulator
        .secret_key(secret, "AWSCURRENT")
        .await
        .expect("AWSCURRENT");
    assert_eq!(
        emulator.access_keys(user).await,
        vec![(current.id.clone(), true)],
        "exactly one key, the secret's current one"
    );
    assert!(
        emulator.secret_key(secret, "AWSPENDING").await.is_none(),
        "no AWSPENDING left"
    );
    current
}

#[tokio::test]
async fn a_key_from_secrets_manager_signs_and_a_user_without_a_secret_is_refused_before_iam() {
    // Private emulator: "nothing reached IAM" is counted over every signer.
    let emulator = Emulator::start();
    let prefix = prefix();
    let identity = identity(&emulator).await;
    let user = enrolled(&emulator, &prefix, "Sm-pass-1").await;
    let missing = emulator
        .user_with_policy(Some("Sm-pass-2"), "managed-user-policy.json")
        .await;
    let pki = Pki::new();
    let app = Setup::new(&emulator, &pki)
        .caller(CallerEntry::spiffe(CALLER, &user))
        .caller(CallerEntry::spiffe(OTHER, &missing))
        .secrets_manager(&identity, &keys_toml(&prefix, "rotate_after = \"0s\""))
        .start();

    let changed = app
        .client(&pki, &pki.spiffe_client(CALLER))
        .await
        .change_password(change("Sm-pass-1", "Sm-pass-1b"))
        .await
        .expect("changed with the key from the secret")
        .into_inner();
    assert_eq!(changed.iam_user, user.name);
    assert!(emulator.password_is(&user, "Sm-pass-1b").await);

    let before: Vec<u64> = futures_util::future::join_all(
        [
            "ChangePassword",
            "GetAccountPasswordPolicy",
            "GetCallerIdentity",
            "GetUser",
        ]
        .map(|a| emulator.all_calls(a)),
    )
    .await;
    let mut other = app.client(&pki, &pki.spiffe_client(OTHER)).await;
    let status = other
        .change_password(change("Sm-pass-2", "Sm-pass-2b"))
        .await
        .expect_err("no secret");
    expect_error(
        &status,
        Code::FailedPrecondition,
        "IAM_USER_NOT_PROVISIONED",
    );
    let status = other
        .get_password_policy(credgate::api::GetPasswordPolicyRequest {})
        .await
        .expect_err("no secret");
    expect_error(
        &status,
        Code::FailedPrecondition,
        "IAM_USER_NOT_PROVISIONED",
    );
    let after: Vec<u64> = futures_util::future::join_all(
        [
            "ChangePassword",
            "GetAccountPasswordPolicy",
            "GetCallerIdentity",
            "GetUser",
        ]
        .map(|a| emulator.all_calls(a)),
    )
    .await;
    assert_eq!(before, after, "nothing was sent to IAM or STS, as anyone");
    assert!(emulator.password_is(&missing, "Sm-pass-2").await);
    app.wait_for_line("the refusal's audit event", |v| {
        v["target"] == "credgate::audit"
            && v["caller"] == OTHER
            && v["outcome"] == "IAM_USER_NOT_PROVISIONED"
    })
    .await;
}

/// A template with Secrets Manager: each identity of the family acts as
/// the user its captures build, with that user's own secret; one whose
/// user has no secret yet is refused before IAM, and served once the
/// secret exists, without a restart or a config change.
#[tokio::test]
async fn templated_callers_use_their_built_users_secrets_and_are_served_once_enrolled() {
    let emulator = Emulator::shared();
    let prefix = prefix();
    let identity = identity(emulator).await;
    let ns = unique("ns");
    let api = enrolled_named(emulator, &prefix, &format!("svc-{ns}-api"), "Tpl-pass-1").await;
    let late = managed_user(emulator, &format!("svc-{ns}-late"), "Late-pass-1").await;
    let pki = Pki::new();
    let app = Setup::new(emulator, &pki)
        .toml(
            r#"
[[callers]]
spiffe_id = "spiffe://corp.example/sm/{ns}/sa/{sa}"
iam_user = "svc-{ns}-{sa}"
"#,
        )
        .secrets_manager(&identity, &keys_toml(&prefix, FAST))
        .start();
    let id = |sa: &str| format!("spiffe://corp.example/sm/{ns}/sa/{sa}");

    let changed = app
        .client(&pki, &pki.spiffe_client(&id("api")))
        .await
        .change_password(change("Tpl-pass-1", "Tpl-pass-2"))
        .await
        .expect("the built user's key from its secret")
        .into_inner();
    assert_eq!(changed.iam_user, api.name);
    assert!(emulator.password_is(&api, "Tpl-pass-2").await);

    let mut late_client = app.client(&pki, &pki.spiffe_client(&id("late"))).await;
    let status = late_client
        .change_password(change("Late-pass-1", "Late-pass-2"))
        .await
        .expect_err("no secret yet");
    expect_error(
        &status,
        Code::FailedPrecondition,
        "IAM_USER_NOT_PROVISIONED",
    );
    for action in ["ChangePassword", "GetCallerIdentity"] {
        assert_eq!(emulator.calls(action, &late.name).await, 0, "{action}");
    }

    // Enrolled: served within `refresh` (1 s), same connection, no restart.
    emulator
        .put_secret(&format!("{prefix}/{}", late.name), &late.key)
        .await;
    let mut served = None;
    for _ in 0..50 {
        match late_client
            .change_password(change("Late-pass-1", "Late-pass-2"))
            .await
        {
            Ok(response) => {
                served = Some(response.into_inner());
                break;
            }
            Err(status) => {
                expect_error(
                    &status,
                    Code::FailedPrecondition,
                    "IAM_USER_NOT_PROVISIONED",
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let served = served.expect("served once its secret exists");
    assert_eq!(served.iam_user, late.name);
    assert!(emulator.password_is(&late, "Late-pass-2").await);
    assert!(emulator.password_is(&api, "Tpl-pass-2").await, "untouched");
}

#[tokio::test]
async fn a_rotation_under_load_fails_no_call_and_leaves_one_key_the_secret_holds() {
    let emulator = Emulator::shared();
    let prefix = prefix();
    let identity = identity(emulator).await;
    let user = enrolled(emulator, &prefix, "Load-pass-0").await;
    let secret = format!("{prefix}/{}", user.name);
    let old = user.key.clone();
    let pki = Pki::new();
    // Due 10 s after the key was made: the next one is due 10 s after this
    // rotation, well after the checks below.
    let app = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(CALLER, &user))
        .secrets_manager(
            &identity,
            &keys_toml(&prefix, &format!("{FAST}\nrotate_after = \"10s\"")),
        )
        .start();
    let mut client = app.client(&pki, &pki.spiffe_client(CALLER)).await;

    // One change after the other, until the old key is gone and 1.5 s more.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = tokio::spawn({
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        async move {
            let mut i = 0;
            let started = std::time::Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < ROTATION {
                let (old, new) = (format!("Load-pass-{i}"), format!("Load-pass-{}", i + 1));
                match client.change_password(change(&old, &new)).await {
                    Ok(_) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                    }
                    Err(status) => {
                        eprintln!("failed call during the rotation: {status:?}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            i
        }
    });
    app.wait_for_line_within("the old key deleted", ROTATION, |v| {
        v["action"] == "rotate_key" && v["step"] == "delete_old" && v["outcome"] == "OK"
    })
    .await;
    let during = ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let changes = load.await.expect("load");
    assert_eq!(failed.load(Ordering::Relaxed), 0, "a call failed");
    assert!(
        during >= 20 && changes > during,
        "the calls ran through the rotation: {during} before its end, {changes} in all"
    );
    assert!(
        emulator
            .password_is(&user, &format!("Load-pass-{changes}"))
            .await
    );

    let current = assert_one_key(emulator, &secret, &user.name).await;
    assert_ne!(current.id, old.id, "a new key");
    assert_eq!(
        emulator.who_signs(&old).await,
        Err("InvalidClientTokenId".to_owned()),
        "the old key no longer signs"
    );
    assert_eq!(
        emulator
            .secret_key(&secret, "AWSPREVIOUS")
            .await
            .map(|k| k.id),
        Some(old.id.clone()),
        "AWSPREVIOUS is the old key's version"
    );
    let events = app.audit_events();
    let rotation: Vec<&Value> = events
        .iter()
        .filter(|v| v["action"] == "rotate_key")
        .collect();
    assert_eq!(
        steps(&events),
        [
            "create",
            "store_pending",
            "prove",
            "promote",
            "deactivate_old",
            "delete_old"
        ]
        .map(|s| (s.to_owned(), "OK".to_owned())),
        "every step audited, in order"
    );
    for event in rotation {
        assert_eq!(event["iam_user"], user.name.as_str());
        assert_eq!(event["trigger"], "schedule");
        assert_eq!(event["old_key"], last4(&old.id), "{event}");
        assert_eq!(event["new_key"], last4(&current.id), "{event}");
    }
    app.wait_for_line("the rotation logged", |v| {
        v["message"] == "access key rotated" && v["iam_user"] == user.name.as_str()
    })
    .await;
}

#[tokio::test]
async fn a_rotation_killed_after_any_step_is_finished_by_the_next_run() {
    let emulator = Emulator::shared();
    let prefix = prefix();
    let identity = identity(emulator).await;
    let user = enrolled(emulator, &prefix, "Crash-pass-0").await;
    let secret = format!("{prefix}/{}", user.name);
    let pki = Pki::new();
    let setup = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(CALLER, &user))
        .secrets_manager(
            &identity,
            &keys_toml(&prefix, &format!("{FAST}\nrotate_after = \"0s\"")),
        );
    // The service the caller uses throughout: never faulted, never restarted.
    let app = setup.launch();
    let mut client = app.client(&pki, &pki.spiffe_client(CALLER)).await;
    let mut changes = 0;
    let rotate = ["keys", "rotate", "--iam-user", &user.name];
    for point in [
        "after_create",
        "after_pending",
        "after_proof",
        "after_promote",
        "after_deactivate",
    ] {
        let crashed = setup.cli(&rotate, &[("CREDGATE_FAULT_ABORT", point)]);
        assert_eq!(crashed.signal, Some(SIGABRT), "{point}: {crashed:?}");
        assert_invariants(emulator, &secret, &user.name, &format!("killed {point}")).await;
        // The caller is served with whatever key is current.
        client
            .change_password(change(
                &format!("Crash-pass-{changes}"),
                &format!("Crash-pass-{}", changes + 1),
            ))
            .await
            .unwrap_or_else(|e| panic!("killed {point}: the caller failed: {e:?}"));
        changes += 1;

        let resumed = setup.cli(&rotate, &[]);
        assert_eq!(resumed.code, Some(0), "after {point}: {resumed:?}");
        assert_invariants(emulator, &secret, &user.name, &format!("resumed {point}")).await;
        assert_one_key(emulator, &secret, &user.name).await;
        let done = steps(&resumed.json_lines());
        assert!(
            done.iter().all(|(_, outcome)| outcome == "OK"),
            "after {point}: {done:?}"
        );
        assert!(
            done.iter().any(|(step, _)| step == "delete_old"),
            "after {point}: the resumed run retired the old key: {done:?}"
        );
        let first = done.first().map(|(step, _)| step.as_str());
        let expected = match point {
            // The key created before the crash was never stored: an orphan.
            "after_create" => "delete_orphan",
            // Stored: the same key is proven and promoted, not another made.
            "after_pending" | "after_proof" => "prove",
            // Promoted: the old key waits out its grace, then goes.
            "after_promote" => "deactivate_old",
            // Deactivated: it is deleted.
            _ => "delete_old",
        };
        assert_eq!(first, Some(expected), "after {point}: {done:?}");
        client
            .change_password(change(
                &format!("Crash-pass-{changes}"),
                &format!("Crash-pass-{}", changes + 1),
            ))
            .await
            .unwrap_or_else(|e| panic!("resumed {point}: the caller failed: {e:?}"));
        changes += 1;
    }
    assert!(
        emulator
            .password_is(&user, &format!("Crash-pass-{changes}"))
            .await
    );
}

#[tokio::test]
async fn a_service_killed_mid_rotation_finishes_it_once_restarted() {
    let emulator = Emulator::shared();
    let prefix = prefix();
    let identity = identity(emulator).await;
    let user = enrolled(emulator, &prefix, "Restart-pass-0").await;
    let secret = format!("{prefix}/{}", user.name);
    let pki = Pki::new();
    let keys = keys_toml(&prefix, &format!("{FAST}\nrotate_after = \"5s\""));
    let setup = || {
        Setup::new(emulator, &pki)
            .caller(CallerEntry::spiffe(CALLER, &user))
            .secrets_manager(&identity, &keys)
    };
    let mut crashing = setup().env("CREDGATE_FAULT_ABORT", "after_proof").start();
    let status = crashing.wait_exit(ROTATION).await;
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(SIGABRT)
    );
    assert_invariants(emulator, &secret, &user.name, "killed").await;
    let pending = emulator
        .secret_key(&secret, "AWSPENDING")
        .await
        .expect("stored and proven, not promoted");

    let app = setup().start();
    app.wait_for_line_within("the old key deleted", ROTATION, |v| {
        v["action"] == "rotate_key" && v["step"] == "delete_old" && v["outcome"] == "OK"
    })
    .await;
    let current = assert_one_key(emulator, &secret, &user.name).await;
    assert_eq!(
        current.id, pending.id,
        "the pending key was promoted, no other made"
    );
    assert_eq!(emulator.calls("CreateAccessKey", &user.name).await, 1);
    let changed = app
        .client(&pki, &pki.spiffe_client(CALLER))
        .await
        .change_password(change("Restart-pass-0", "Restart-pass-1"))
        .await;
    assert!(changed.is_ok(), "{changed:?}");
}

#[tokio::test]
async fn two_replicas_due_at_once_rotate_a_user_exactly_once() {
    let redis = Redis::start();
    let emulator = Emulator::shared();
    let prefix = prefix();
    let identity = identity(emulator).await;
    let user = enrolled(emulator, &prefix, "Twice-pass-0").await;
    let secret = format!("{prefix}/{}", user.name);
    let pki = Pki::new();
    // Both check every second; both find the key due at the same moment.
    let replicas = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(CALLER, &user))
        .redis(&redis)
        .secrets_manager(
            &identity,
            &keys_toml(&prefix, &format!("{FAST}\nrotate_after = \"10s\"")),
        )
        .start_replicas(2);
    let deadline = std::time::Instant::now() + ROTATION;
    let done = loop {
        let found = replicas.iter().position(|r| {
            steps(&json_lines(&r.lines()))
                .iter()
                .any(|(step, outcome)| step == "delete_old" && outcome == "OK")
        });
        if let Some(i) = found {
            break i;
        }
        assert!(std::time::Instant::now() < deadline, "no rotation finished");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The other replica's next checks find nothing left to do.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let creates: usize = replicas
        .iter()
        .map(|r| {
            steps(&json_lines(&r.lines()))
                .iter()
                .filter(|(step, _)| step == "create")
                .count()
        })
        .sum();
    assert_eq!(creates, 1, "one replica rotated");
    assert_eq!(
        emulator.calls("CreateAccessKey", &user.name).await,
        1,
        "IAM saw one new key"
    );
    let other = &replicas[1 - done];
    assert!(
        steps(&json_lines(&other.lines())).is_empty(),
        "the other replica took no step"
    );
    assert_one_key(emulator, &secret, &user.name).await;
}

#[tokio::test]
async fn an_orphan_second_key_is_deleted_not_hit_against_the_key_limit() {
    let emulator = Emulator::shared();
    let prefix = prefix();
    let identity = identity(emulator).await;
    let user = enrolled(emulator, &prefix, "Orphan-pass-0").await;
    let secret = format!("{prefix}/{}", user.name);
    // Created and never stored: what a crash between the two leaves.
    let orphan = emulator.access_key(&user.name).await;
    assert_eq!(emulator.access_keys(&user.name).await.len(), 2);
    let pki = Pki::new();
    let setup = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(CALLER, &user))
        .secrets_manager(
            &identity,
            &keys_toml(&prefix, &format!("{FAST}\nrotate_after = \"0s\"")),
        );
    let run = setup.cli(&["keys", "rotate", "--iam-user", &user.name], &[]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let events = run.json_lines();
    let done = steps(&events);
    assert_eq!(
        done.first(),
        Some(&("delete_orphan".to_owned(), "OK".to_owned())),
        "{done:?}"
    );
    let deleted = events
        .iter()
        .find(|v| v["step"] == "delete_orphan")
        .expect("event");
    assert_eq!(deleted["new_key"], last4(&orphan.id));
    assert_eq!(deleted["trigger"], "command");
    assert!(
        done.iter().all(|(_, outcome)| outcome == "OK"),
        "no LimitExceeded, no failure: {done:?}"
    );
    assert_eq!(emulator.calls("CreateAccessKey", &user.name).await, 1);
    let current = assert_one_key(emulator, &secret, &user.name).await;
    assert!(current.id != orphan.id && current.id != user.key.id);
    assert_eq!(
        emulator.who_signs(&orphan).await,
        Err("InvalidClientTokenId".to_owned())
    );
}

#[tokio::test]
async fn keys_status_shows_every_user_by_its_keys_last_four_characters_and_nothing_holds_a_key() {
    let emulator = Emulator::shared();
    let prefix = prefix();
    let identity = identity(emulator).await;
    let user = enrolled(emulator, &prefix, "Status-pass-0").await;
    // Configured, no secret.
    let missing = emulator
        .user_with_policy(Some("Status-pass-1"), "managed-user-policy.json")
        .await;
    // A secret, no configured caller (a templated caller's user, say).
    let listed = enrolled(emulator, &prefix, "Status-pass-2").await;
    let secret = format!("{prefix}/{}", user.name);
    let pki = Pki::new();
    let setup = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(CALLER, &user))
        .caller(CallerEntry::spiffe(OTHER, &missing))
        .secrets_manager(
            &identity,
            &keys_toml(&prefix, &format!("{FAST}\nrotate_after = \"30d\"")),
        );
    let app = setup.launch();

    let status = setup.cli(&["keys", "status", "--json"], &[]);
    assert_eq!(status.code, Some(0), "{status:?}");
    let report: Value = serde_json::from_str(&status.stdout).expect("one JSON object");
    assert_eq!(report["source"], "secretsmanager");
    assert_eq!(report["secret_name"], format!("{prefix}/{{iam_user}}"));
    assert_eq!(report["rotate_after_seconds"], 30 * 86400);
    assert_eq!(report["warn_key_age_seconds"], 90 * 86400);
    let users = report["users"].as_array().expect("users");
    let by_name = |name: &str| {
        users
            .iter()
            .find(|u| u["iam_user"] == name)
            .unwrap_or_else(|| panic!("{name} in {users:?}"))
    };
    assert_eq!(users.len(), 3, "{users:?}");
    let fields = [
        "iam_user",
        "profile",
        "key_id_suffix",
        "created",
        "age_seconds",
        "over_age",
        "last_used",
        "last_used_service",
        "rotation",
        "next_rotation",
        "error",
    ];
    for u in users {
        let keys: Vec<&str> = u
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys.len(), fields.len(), "{u}");
        assert!(fields.iter().all(|f| keys.contains(f)), "{u}");
    }
    for (u, key) in [(&user, &user.key), (&listed, &listed.key)] {
        let row = by_name(&u.name);
        assert_eq!(row["key_id_suffix"], last4(&key.id), "{row}");
        assert_eq!(row["rotation"], "idle", "{row}");
        assert_eq!(row["over_age"], false);
        assert!(
            row["age_seconds"].as_u64().is_some_and(|a| a < 600),
            "{row}"
        );
        assert!(
            row["created"].is_string() && row["next_rotation"].is_string(),
            "{row}"
        );
        assert!(row["error"].is_null(), "{row}");
        assert!(row["profile"].is_null());
    }
    let row = by_name(&missing.name);
    assert_eq!(row["rotation"], "not_provisioned", "{row}");
    assert!(row["key_id_suffix"].is_null());

    let table = setup.cli(&["keys", "status"], &[]);
    assert_eq!(table.code, Some(0), "{table:?}");
    assert!(table.stdout.contains("IAM USER"), "{}", table.stdout);
    assert!(
        table.stdout.contains(&format!("…{}", last4(&user.key.id))),
        "{}",
        table.stdout
    );

    let rotated = setup.cli(&["keys", "rotate", "--iam-user", &user.name], &[]);
    assert_eq!(rotated.code, Some(0), "{rotated:?}");
    let new = assert_one_key(emulator, &secret, &user.name).await;
    let after = setup.cli(&["keys", "status", "--json"], &[]);
    let report: Value = serde_json::from_str(&after.stdout).expect("JSON");
    let row = report["users"]
        .as_array()
        .expect("users")
        .iter()
        .find(|u| u["iam_user"] == user.name.as_str())
        .expect("row")
        .clone();
    assert_eq!(row["key_id_suffix"], last4(&new.id));
    // The service signs with the new key from now on.
    let changed = app
        .client(&pki, &pki.spiffe_client(CALLER))
        .await
        .change_password(change("Status-pass-0", "Status-pass-9"))
        .await;
    assert!(changed.is_ok(), "{changed:?}");

    let outputs = [
        (
            "keys status --json",
            format!("{}{}", status.stdout, status.stderr),
        ),
        ("keys status", format!("{}{}", table.stdout, table.stderr)),
        (
            "keys rotate",
            format!("{}{}", rotated.stdout, rotated.stderr),
        ),
        (
            "keys status after",
            format!("{}{}", after.stdout, after.stderr),
        ),
        ("serve", app.lines().join("\n")),
    ];
    let keys = [
        ("the old key id", &user.key.id),
        ("the old secret", &user.key.secret),
        ("the new key id", &new.id),
        ("the new secret", &new.secret),
        ("another user's key id", &listed.key.id),
        ("another user's secret", &listed.key.secret),
        ("credgate's own key id", &identity.id),
        ("credgate's own secret", &identity.secret),
    ];
    for (output, text) in &outputs {
        for (what, value) in keys {
            assert!(
                leak_of(text, value).is_none(),
                "{what} in the output of {output}: {:?}",
                leak_of(text, value)
            );
        }
    }
}

#[tokio::test]
async fn a_key_older_than_warn_key_age_warns_once_and_is_reported_over_age() {
    let emulator = Emulator::shared();
    let user = emulator.standard_user("Age-pass-0").await;
    // Older than the warn_key_age below by the time credgate looks.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let pki = Pki::new();
    let setup = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(CALLER, &user))
        .toml("[keys]\nwarn_key_age = \"2s\"");
    let app = setup.launch();
    app.wait_for_line("the age warning", |v| {
        v["level"] == "WARN"
            && v["iam_user"] == user.name.as_str()
            && v["message"]
                .as_str()
                .is_some_and(|m| m.contains("older than keys.warn_key_age"))
    })
    .await;
    let status = setup.cli(&["keys", "status", "--json"], &[]);
    assert_eq!(status.code, Some(0), "{status:?}");
    let report: Value = serde_json::from_str(&status.stdout).expect("JSON");
    assert_eq!(report["source"], "profiles");
    assert!(report["secret_name"].is_null() && report["rotate_after_seconds"].is_null());
    let row = &report["users"][0];
    assert_eq!(row["iam_user"], user.name.as_str());
    assert_eq!(row["profile"], user.name.as_str());
    assert_eq!(row["over_age"], true, "{row}");
    assert_eq!(row["rotation"], "manual");
    assert!(row["next_rotation"].is_null());
    let warnings = app
        .lines()
        .iter()
        .filter(|l| l.contains("older than keys.warn_key_age"))
        .count();
    assert_eq!(warnings, 1, "one WARN line per user per day");
}

#[tokio::test]
async fn the_keys_commands_explain_themselves_and_refuse_what_cannot_work() {
    let emulator = Emulator::shared();
    let user = emulator.standard_user("Cli-pass-0").await;
    let pki = Pki::new();
    let setup = Setup::new(emulator, &pki).caller(CallerEntry::spiffe(CALLER, &user));
    for help in [
        vec!["keys", "--help"],
        vec!["keys", "status", "--help"],
        vec!["keys", "rotate", "--help"],
    ] {
        let out = std::process::Command::new(credgate_bin())
            .args(&help)
            .output()
            .expect("run");
        assert!(out.status.success(), "{help:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Usage: credgate keys"), "{help:?}: {text}");
    }
    let out = std::process::Command::new(credgate_bin())
        .args(["keys", "rotate"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64), "no --iam-user");
    let run = setup.cli(&["keys", "rotate", "--iam-user", &user.name], &[]);
    assert_eq!(run.code, Some(64), "{run:?}");
    assert!(run.stderr.contains("secretsmanager"), "{}", run.stderr);
    let run = setup.cli(&["keys", "rotate", "--iam-user", "not a user"], &[]);
    assert_eq!(run.code, Some(64), "{run:?}");
    assert!(
        run.stderr.contains("is not an IAM user name"),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn a_key_iam_rejects_is_read_again_from_the_secret_at_once() {
    let emulator = Emulator::shared();
    let prefix = prefix();
    let identity = identity(emulator).await;
    let user = enrolled(emulator, &prefix, "Reread-pass-0").await;
    let secret = format!("{prefix}/{}", user.name);
    let pki = Pki::new();
    // A cached key is trusted for a minute: only a rejection reads it sooner.
    let app = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(CALLER, &user))
        .secrets_manager(
            &identity,
            &keys_toml(
                &prefix,
                "refresh = \"60s\"\nold_key_grace = \"2m\"\nrotate_after = \"0s\"",
            ),
        )
        .start();
    let mut client = app.client(&pki, &pki.spiffe_client(CALLER)).await;
    client
        .change_password(change("Reread-pass-0", "Reread-pass-1"))
        .await
        .expect("with the first key");
    // Replaced behind credgate's back, the old key deleted at once.
    let new = emulator.access_key(&user.name).await;
    emulator
        .secrets()
        .put_secret_value()
        .secret_id(&secret)
        .secret_string(
            serde_json::json!({"access_key_id": new.id, "secret_access_key": new.secret})
                .to_string(),
        )
        .send()
        .await
        .expect("PutSecretValue");
    emulator
        .admin()
        .delete_access_key()
        .user_name(&user.name)
        .access_key_id(&user.key.id)
        .send()
        .await
        .expect("DeleteAccessKey");
    client
        .change_password(change("Reread-pass-1", "Reread-pass-2"))
        .await
        .expect("rejected once, read again, signed with the new key");
    assert!(emulator.password_is(&user, "Reread-pass-2").await);
    app.wait_for_line("the re-read", |v| {
        v["message"] == "AWS rejected the credentials; re-read the key, trying once more"
            && v["iam_user"] == user.name.as_str()
    })
    .await;
}
