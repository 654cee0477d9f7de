//! The attempt limit and `request_id` outcomes hold across replicas and
//! under concurrency: real redis-server, several credgate processes.

use std::time::Duration;

use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt;

use crate::harness::*;

const CALLER: &str = "spiffe://corp.example/ns/shared/sa/shared";
const LIMITS: &str = "[limits]\nfailed_attempts = 3\nfailed_attempts_window = \"1h\"\n";

/// Fires `n` wrong guesses at once, spread over `apps`, and returns their
/// ErrorInfo reasons.
async fn concurrent_wrong_guesses(apps: &[&Credgate], pki: &Pki, n: usize) -> Vec<String> {
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

#[tokio::test]
async fn concurrent_guesses_over_two_replicas_reach_iam_at_most_failed_attempts_times() {
    let emulator = Emulator::shared();
    let redis = Redis::start();
    let user = emulator.standard_user("Shared-pass-1").await;
    let pki = Pki::new();
    let apps = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(CALLER, &user))
        .toml(LIMITS)
        .redis(&redis)
        .start_replicas(2);
    // Slow answers keep every guess in flight at once.
    emulator
        .fault(
            "ChangePassword",
            &user.name,
            json!({"delay_seconds": 0.3, "count": -1}),
        )
        .await;
    let reasons = concurrent_wrong_guesses(&[&apps[0], &apps[1]], &pki, 20).await;
    let reached = emulator.calls("ChangePassword", &user.name).await;
    assert!(reached <= 3, "{reached} guesses reached IAM: {reasons:?}");
    assert_eq!(
        reasons
            .iter()
            .filter(|r| *r == "OLD_PASSWORD_INCORRECT")
            .count() as u64,
        reached
    );
    // The others are refused before IAM: over the limit, or (while the
    // first guesses are in flight) over the attempts allowed in flight.
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
            .change_password(change("Shared-pass-1", "Shared-pass-2"))
            .await
            .expect_err("locked out on every replica");
        expect_error(&status, Code::ResourceExhausted, "TOO_MANY_FAILED_ATTEMPTS");
        let retry = status
            .get_error_details()
            .retry_info()
            .and_then(|r| r.retry_delay)
            .expect("RetryInfo");
        assert!(
            retry > Duration::from_secs(59 * 60) && retry <= Duration::from_secs(3600),
            "from the shared window: {retry:?}"
        );
    }
    assert_eq!(emulator.calls("ChangePassword", &user.name).await, reached);
}

#[tokio::test]
async fn alternating_guesses_share_one_limit_across_replicas() {
    let emulator = Emulator::shared();
    let redis = Redis::start();
    let user = emulator.standard_user("Alt-pass-1").await;
    let pki = Pki::new();
    let apps = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(CALLER, &user))
        .toml(LIMITS)
        .redis(&redis)
        .start_replicas(2);
    let mut reasons = Vec::new();
    for i in 0..6 {
        let status = apps[i % 2]
            .client(&pki, &pki.spiffe_client(CALLER))
            .await
            .change_password(change(&format!("Alt-{i}-wrong!"), "Alt-pass-2"))
            .await
            .expect_err("wrong");
        reasons.push(error_info(&status).0);
    }
    assert_eq!(
        reasons,
        [
            "OLD_PASSWORD_INCORRECT",
            "OLD_PASSWORD_INCORRECT",
            "OLD_PASSWORD_INCORRECT",
            "TOO_MANY_FAILED_ATTEMPTS",
            "TOO_MANY_FAILED_ATTEMPTS",
            "TOO_MANY_FAILED_ATTEMPTS",
        ]
    );
    assert_eq!(emulator.calls("ChangePassword", &user.name).await, 3);
}

#[tokio::test]
async fn concurrent_guesses_on_one_process_with_the_memory_backend_are_limited_too() {
    let emulator = Emulator::shared();
    let user = emulator.standard_user("Mem-pass-1").await;
    let pki = Pki::new();
    let app = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(CALLER, &user))
        .toml(LIMITS)
        .start();
    emulator
        .fault(
            "ChangePassword",
            &user.name,
            json!({"delay_seconds": 0.3, "count": -1}),
        )
        .await;
    let reasons = concurrent_wrong_guesses(&[&app], &pki, 20).await;
    let reached = emulator.calls("ChangePassword", &user.name).await;
    assert!(reached <= 3, "{reached} guesses reached IAM: {reasons:?}");
    assert!(reached >= 1);
}

#[tokio::test]
async fn a_retry_with_the_same_request_id_on_another_replica_gets_the_first_outcome() {
    let emulator = Emulator::shared();
    let redis = Redis::start();
    let user = emulator.standard_user("Idem-pass-1").await;
    let other = emulator.standard_user("Idem-pass-1").await;
    let pki = Pki::new();
    let other_caller = "spiffe://corp.example/ns/other/sa/other";
    let apps = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(CALLER, &user))
        .caller(CallerEntry::spiffe(other_caller, &other))
        .redis(&redis)
        .start_replicas(2);
    emulator
        .fault("ChangePassword", &user.name, json!({"delay_seconds": 2.5}))
        .await;
    let id = request_id();
    let client = |i: usize, who: &str| {
        let (app, pki, who) = (&apps[i], &pki, who.to_owned());
        async move { app.client(pki, &pki.spiffe_client(&who)).await }
    };

    // IAM answers after the caller's deadline: OUTCOME_UNKNOWN.
    let status = client(0, CALLER)
        .await
        .change_password(with_timeout(
            change_with_id("Idem-pass-1", "Idem-pass-2", &id),
            "800m",
        ))
        .await
        .expect_err("deadline first");
    expect_error(&status, Code::DeadlineExceeded, "OUTCOME_UNKNOWN");

    // A retry on the other replica while the first still runs, with too
    // little time to see it finish: OUTCOME_UNKNOWN again, with RetryInfo.
    let status = client(1, CALLER)
        .await
        .change_password(with_timeout(
            change_with_id("Idem-pass-1", "Idem-pass-2", &id),
            "300m",
        ))
        .await
        .expect_err("still running");
    expect_error(&status, Code::DeadlineExceeded, "OUTCOME_UNKNOWN");
    assert!(status.get_error_details().retry_info().is_some());

    // A retry with time to wait gets the real outcome once it exists.
    let done = client(1, CALLER)
        .await
        .change_password(with_timeout(
            change_with_id("Idem-pass-1", "Idem-pass-2", &id),
            "5S",
        ))
        .await
        .expect("the first attempt's outcome")
        .into_inner();
    assert_eq!(done.iam_user, user.name);
    assert!(!done.iam_request_id.is_empty());
    assert!(
        done.replayed,
        "the first attempt's outcome, not a call of its own"
    );
    // And later retries replay it, on either replica, without IAM.
    for i in [0, 1] {
        let again = client(i, CALLER)
            .await
            .change_password(change_with_id("Idem-pass-1", "Idem-pass-2", &id))
            .await
            .expect("replayed")
            .into_inner();
        assert_eq!(again.iam_request_id, done.iam_request_id);
        assert!(again.replayed);
    }
    assert_eq!(emulator.calls("ChangePassword", &user.name).await, 1);
    assert!(emulator.password_is(&user, "Idem-pass-2").await);

    // Another caller's identical request_id is its own.
    client(0, other_caller)
        .await
        .change_password(change_with_id("Idem-pass-1", "Idem-pass-3", &id))
        .await
        .expect("independent");
    assert!(emulator.password_is(&other, "Idem-pass-3").await);

    // A stored failure is replayed too, not re-sent.
    let wrong = request_id();
    for _ in 0..2 {
        let status = client(0, CALLER)
            .await
            .change_password(change_with_id("Not-the-pass-9", "Idem-pass-4", &wrong))
            .await
            .expect_err("wrong");
        expect_error(&status, Code::PermissionDenied, "OLD_PASSWORD_INCORRECT");
    }
    assert_eq!(emulator.calls("ChangePassword", &user.name).await, 2);

    let replays = apps
        .iter()
        .flat_map(|a| a.audit_events())
        .filter(|e| e["replayed"] == true)
        .count();
    assert!(replays >= 4, "replays are audited as such");
}

#[tokio::test]
async fn a_request_id_must_be_a_uuid() {
    let emulator = Emulator::shared();
    let rig = Rig::new(emulator, CALLER, "Uuid-pass-1").await;
    let status = rig
        .client()
        .await
        .change_password(change_with_id("Uuid-pass-1", "Uuid-pass-2", "retry-1"))
        .await
        .expect_err("not a UUID");
    expect_error(&status, Code::InvalidArgument, "REQUEST_ID_INVALID");
    let details = status.get_error_details();
    assert_eq!(
        details.bad_request().expect("BadRequest").field_violations[0].field,
        "request_id"
    );
    assert_eq!(emulator.calls("ChangePassword", &rig.user.name).await, 0);
}

#[tokio::test]
async fn an_unreachable_store_fails_closed_and_credgate_recovers_when_it_returns() {
    let emulator = Emulator::shared();
    let mut redis = Redis::start();
    let user = emulator.standard_user("Down-pass-1").await;
    let pki = Pki::new();
    let app = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(CALLER, &user))
        .redis(&redis)
        .start();
    let mut client = app.client(&pki, &pki.spiffe_client(CALLER)).await;
    client
        .change_password(change("Down-pass-1", "Down-pass-2"))
        .await
        .expect("store up");

    redis.stop();
    for validate_only in [false, true] {
        let mut request = change("Down-pass-2", "Down-pass-3");
        request.validate_only = validate_only;
        let status = client
            .change_password(request)
            .await
            .expect_err("fail closed");
        expect_error(&status, Code::Unavailable, "STATE_UNAVAILABLE");
        assert!(status.get_error_details().retry_info().is_some());
    }
    // A request_id whose claim fails is no replay, and its audit says so.
    let id = request_id();
    let status = client
        .change_password(change_with_id("Down-pass-2", "Down-pass-3", &id))
        .await
        .expect_err("fail closed");
    expect_error(&status, Code::Unavailable, "STATE_UNAVAILABLE");
    let event = app
        .wait_for_line("the failed claim's audit event", |v| {
            v["target"] == "credgate::audit" && v["request_id"] == id.as_str()
        })
        .await;
    assert_eq!(event["outcome"], "STATE_UNAVAILABLE", "{event}");
    assert_eq!(event["replayed"], false, "{event}");
    assert_eq!(
        emulator.calls("ChangePassword", &user.name).await,
        1,
        "IAM is not called while the store is down"
    );
    client
        .get_password_policy(credgate::api::GetPasswordPolicyRequest {})
        .await
        .expect("reads keep working");
    app.wait_for_line("the store-down log line", |v| {
        v["level"] == "ERROR"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("state store unreachable"))
    })
    .await;

    redis.restart();
    let mut recovered = false;
    for _ in 0..50 {
        match client
            .change_password(change("Down-pass-2", "Down-pass-3"))
            .await
        {
            Ok(_) => {
                recovered = true;
                break;
            }
            Err(status) => {
                expect_error(&status, Code::Unavailable, "STATE_UNAVAILABLE");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert!(recovered, "no restart of credgate needed");
    assert!(emulator.password_is(&user, "Down-pass-3").await);
    app.wait_for_line("the recovery log line", |v| {
        v["message"] == "state store reachable again"
    })
    .await;
}

#[tokio::test]
async fn the_store_never_holds_a_password_or_anything_but_ids_and_outcomes() {
    let emulator = Emulator::shared();
    let redis = Redis::start();
    let user = emulator.standard_user("Store-Old-4b2a!").await;
    let pki = Pki::new();
    let app = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(CALLER, &user))
        .toml(LIMITS)
        .redis(&redis)
        .start();
    let mut client = app.client(&pki, &pki.spiffe_client(CALLER)).await;
    let mut secrets = Vec::new();
    let too_long = format!("Store-Long-{}", "7".repeat(130));
    let steps = [
        ("Store-Old-4b2a!", "Store-New-9c1d!"),
        ("Store-Wrong-1e7f!", "Store-Other-5a3b!"),
        ("Store-New-9c1d!", "Store-Bad-\u{2603}"),
        ("Store-New-9c1d!", too_long.as_str()),
        ("Store-New-9c1d!", "Store-Last-0d8e!"),
    ];
    for (old, new) in steps {
        secrets.extend([old, new]);
        let _ = client
            .change_password(change_with_id(old, new, &request_id()))
            .await;
        let dump = redis.dump().await;
        assert!(!dump.is_empty());
        for (key, value) in &dump {
            for secret in &secrets {
                let encoded = secret.replace('!', "%21");
                for text in [key, value] {
                    assert!(
                        !text.contains(secret) && !text.contains(&encoded),
                        "password in the store: {key} = {value}"
                    );
                }
            }
            // Only the documented shapes: attempt ids with times, the
            // caller's request_ids (UUIDs) with expiry times, a release
            // mark, or an outcome record; nothing derived from a password
            // can hide.
            if key.contains(":attempts:") {
                assert!(value.starts_with("[(\""), "{key} = {value}");
            } else if key.ends_with(":requests") {
                let members: Vec<&str> = value
                    .split("(\"")
                    .skip(1)
                    .filter_map(|m| m.split('"').next())
                    .collect();
                assert!(!members.is_empty(), "{key} = {value}");
                for member in members {
                    assert!(uuid::Uuid::parse_str(member).is_ok(), "{key} = {value}");
                }
            } else if key.contains(":released:") {
                assert_eq!(value, "1", "{key}");
            } else {
                let record: serde_json::Value = serde_json::from_str(value).expect("JSON");
                let shape = record
                    .as_object()
                    .and_then(|o| o.keys().next().cloned())
                    .unwrap_or_default();
                assert!(["pending", "done"].contains(&shape.as_str()), "{value}");
            }
        }
    }
}
