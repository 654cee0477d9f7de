//! Exactly one audit event per attempt, everywhere DESIGN.md's "Audit"
//! paragraph lists: tonic's own refusals, SIGTERM while IAM works, a panic
//! in an attempt, a stdout nobody reads. Plus what the response tells the
//! caller about its `request_id`, and passwords the form body must escape.

use std::time::{Duration, Instant};

use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt;

use crate::harness::*;

const CALLER: &str = "spiffe://corp.example/ns/audit/sa/audit";

/// `grpc.health.v1` status codes.
const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;

/// Waits (bounded) until `app` has written `n` audit events.
async fn audit_events(app: &Credgate, n: usize) -> Vec<serde_json::Value> {
    for _ in 0..300 {
        let events = app.audit_events();
        if events.len() >= n {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "expected {n} audit events; output:\n{}",
        app.lines().join("\n")
    );
}

/// Waits (bounded) until the emulator has seen `n` `action` calls by `user`.
async fn until_calls(emulator: &Emulator, action: &str, user: &str, n: u64) {
    for _ in 0..300 {
        if emulator.calls(action, user).await >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the emulator never saw {n} {action} by {user}");
}

/// Waits (bounded) until the admin port reports `status`.
async fn until_health(app: &Credgate, status: i32, what: &str) {
    for _ in 0..100 {
        if answered(app.admin_health()).await.ok() == Some(status) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("admin health never became {what}");
}

/// `call`'s result, or a panic when credgate stops answering (a frozen
/// runtime would otherwise hang the test).
async fn answered<T>(call: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("credgate answers within 10 s")
}

fn reason(status: &tonic::Status) -> String {
    error_info(status).0
}

#[tokio::test]
async fn a_compressed_request_is_refused_with_its_own_reason_and_audited_once() {
    let emulator = Emulator::shared();
    let rig = Rig::new(emulator, CALLER, "Gzip-pass-1").await;
    let mut client = rig.client().await;
    let mut request = tonic::Request::new(change("Gzip-pass-1", "Gzip-pass-2"));
    request
        .metadata_mut()
        .insert("grpc-encoding", "gzip".parse().expect("header"));
    let status = client
        .change_password(request)
        .await
        .expect_err("compressed messages are refused");
    expect_error(&status, Code::Unimplemented, "COMPRESSION_UNSUPPORTED");
    assert_eq!(
        status
            .metadata()
            .get("grpc-accept-encoding")
            .and_then(|v| v.to_str().ok()),
        Some("identity"),
        "names what is accepted"
    );
    let events = audit_events(&rig.app, 1).await;
    assert_eq!(
        events[0]["outcome"], "COMPRESSION_UNSUPPORTED",
        "{events:?}"
    );
    assert_eq!(events[0]["caller"], CALLER);

    // The other method, and a made-up one: same ErrorInfo, no audit event.
    let mut request = tonic::Request::new(credgate::api::GetPasswordPolicyRequest {});
    request
        .metadata_mut()
        .insert("grpc-encoding", "deflate".parse().expect("header"));
    let status = client
        .get_password_policy(request)
        .await
        .expect_err("compressed");
    expect_error(&status, Code::Unimplemented, "COMPRESSION_UNSUPPORTED");
    let channel = rig
        .app
        .channel(&rig.pki, Some(&rig.pki.spiffe_client(CALLER)))
        .await
        .expect("channel");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let status = grpc
        .unary::<_, credgate::api::GetPasswordPolicyResponse, _>(
            tonic::Request::new(credgate::api::GetPasswordPolicyRequest {}),
            http::uri::PathAndQuery::from_static("/credgate.v1.PasswordService/Bogus"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .expect_err("no such method");
    expect_error(&status, Code::Unimplemented, "UNKNOWN_METHOD");

    // An uncompressed call still works, and each call left one event only.
    rig.change("Gzip-pass-1", "Gzip-pass-2")
        .await
        .expect("identity encoding");
    let events = audit_events(&rig.app, 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events_now = rig.app.audit_events();
    assert_eq!(events_now.len(), 2, "{events_now:?}");
    assert_eq!(events[1]["outcome"], "OK");
    assert_eq!(emulator.calls("ChangePassword", &rig.user.name).await, 1);
}

#[tokio::test]
async fn the_response_names_iams_request_id_and_says_when_it_is_a_replay() {
    let emulator = Emulator::shared();
    let rig = Rig::new(emulator, CALLER, "Replay-pass-1").await;
    let id = request_id();
    let mut client = rig.client().await;
    let first = client
        .change_password(change_with_id("Replay-pass-1", "Replay-pass-2", &id))
        .await
        .expect("changed")
        .into_inner();
    assert!(!first.iam_request_id.is_empty());
    assert!(!first.replayed, "the first call ran");
    #[allow(deprecated)]
    let legacy = first.request_id.clone();
    assert_eq!(legacy, first.iam_request_id, "deprecated, same value");

    let again = client
        .change_password(change_with_id("Replay-pass-1", "Replay-pass-2", &id))
        .await
        .expect("replayed")
        .into_inner();
    assert!(again.replayed, "the stored outcome");
    assert_eq!(again.iam_request_id, first.iam_request_id);
    assert_ne!(
        again.iam_request_id, id,
        "IAM's request id, not the caller's"
    );
    assert_eq!(emulator.calls("ChangePassword", &rig.user.name).await, 1);
    let events = audit_events(&rig.app, 2).await;
    assert_eq!(
        (&events[0]["replayed"], &events[1]["replayed"]),
        (&json!(false), &json!(true))
    );
}

#[tokio::test]
async fn passwords_with_form_syntax_and_latin_1_characters_change_end_to_end() {
    let emulator = Emulator::shared();
    // What a form body must escape: & = + % and non-ASCII. (Spaces: the
    // emulator's signature check re-encodes them until issue 17 lands.)
    let (first, second) = ("Amp&Eq=Plus+Pct%-1", "Été-ÿ&=+%~.-_Zz9");
    let rig = Rig::new(emulator, CALLER, first).await;
    rig.change(first, second).await.expect("changed");
    assert!(emulator.password_is(&rig.user, second).await);
    rig.change(second, first).await.expect("changed back");
    assert!(emulator.password_is(&rig.user, first).await);
    let lines = rig.app.lines().join("\n");
    for secret in [first, second] {
        assert!(!lines.contains(secret), "no password in the output");
    }
}

#[tokio::test]
async fn sigterm_waits_past_the_grace_for_an_attempt_at_iam_and_audits_its_real_outcome() {
    let emulator = Emulator::shared();
    let user = emulator.standard_user("Late-pass-1").await;
    // The default grace (20 s) and request_timeout (10 s).
    let mut rig = Rig::for_user(emulator, CALLER, user, |s| {
        s.server_toml("shutdown_grace = \"20s\"")
    });
    emulator
        .fault(
            "ChangePassword",
            &rig.user.name,
            json!({"delay_seconds": 25.0}),
        )
        .await;
    let mut client = rig.client().await;
    let call = tokio::spawn(async move {
        client
            .change_password(change("Late-pass-1", "Late-pass-2"))
            .await
    });
    until_calls(emulator, "ChangePassword", &rig.user.name, 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sigterm = Instant::now();
    rig.app.terminate();

    // The caller is answered at its deadline, as always.
    let status = call.await.expect("join").expect_err("deadline first");
    expect_error(&status, Code::DeadlineExceeded, "OUTCOME_UNKNOWN");
    let exit = rig.app.wait_exit(Duration::from_secs(60)).await;
    assert!(exit.success(), "{exit:?}");
    assert!(
        sigterm.elapsed() > Duration::from_secs(20),
        "waited past the grace for IAM: {:?}",
        sigterm.elapsed()
    );
    let events = rig.app.audit_events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["outcome"], "OK", "IAM's real answer: {events:?}");
    assert!(
        !events[0]["iam_request_id"]
            .as_str()
            .unwrap_or_default()
            .is_empty()
    );
    assert!(emulator.password_is(&rig.user, "Late-pass-2").await);
    assert!(
        rig.app
            .lines()
            .iter()
            .any(|l| l.contains("still waiting for the attempts that went to IAM")),
        "the wait is logged"
    );
}

/// Needs the `fault-injection` feature (scripts/test turns it on): only
/// such a build has the fault point that makes an attempt panic.
#[cfg(feature = "fault-injection")]
#[tokio::test]
async fn a_panic_after_iam_answered_is_caught_once_audited_with_iams_answer_and_settled() {
    let emulator = Emulator::shared();
    let user = emulator.standard_user("Panic-pass-0").await;
    let rig = Rig::for_user(emulator, CALLER, user, |s| {
        s.toml("[limits]\nfailed_attempts = 3\nfailed_attempts_window = \"1h\"")
            .env("CREDGATE_FAULT_PANIC", "after_iam")
    });
    // More panicking changes than failed_attempts: a reservation left
    // behind by each would lock the caller out.
    for i in 0..5 {
        let (old, new) = (format!("Panic-pass-{i}"), format!("Panic-pass-{}", i + 1));
        let status = rig.change(&old, &new).await.expect_err("panicked");
        let metadata = expect_error(&status, Code::Internal, "INTERNAL_ERROR");
        assert!(metadata.contains_key("awsRequestId"), "{status:?}");
        assert!(
            emulator.password_is(&rig.user, &new).await,
            "IAM applied it"
        );
    }
    // IAM's own answer settles the limit: three wrong old passwords count,
    // though each attempt ended in a panic, and the fourth is refused.
    for _ in 0..3 {
        let status = rig
            .change("Wrong-pass-1", "Panic-pass-9")
            .await
            .expect_err("panicked");
        expect_error(&status, Code::Internal, "INTERNAL_ERROR");
    }
    let status = rig
        .change("Wrong-pass-1", "Panic-pass-9")
        .await
        .expect_err("locked out");
    expect_error(&status, Code::ResourceExhausted, "TOO_MANY_FAILED_ATTEMPTS");
    assert_eq!(emulator.calls("ChangePassword", &rig.user.name).await, 8);

    let events = audit_events(&rig.app, 9).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rig.app.audit_events().len(), 9, "one event per attempt");
    for (i, event) in events.iter().enumerate().take(8) {
        assert_eq!(event["outcome"], "INTERNAL_ERROR", "{event}");
        let iam = if i < 5 {
            "OK"
        } else {
            "OLD_PASSWORD_INCORRECT"
        };
        assert_eq!(event["iam_outcome"], iam, "{event}");
        assert!(
            !event["iam_request_id"]
                .as_str()
                .unwrap_or_default()
                .is_empty(),
            "{event}"
        );
    }
    assert_eq!(events[8]["outcome"], "TOO_MANY_FAILED_ATTEMPTS");
    // Caught where it happened: one panic per attempt, never a second one
    // from polling the panicked future again.
    let lines = rig.app.lines();
    let panics = lines.iter().filter(|l| l.contains("panicked at")).count();
    assert_eq!(panics, 8, "{}", lines.join("\n"));
    assert!(!lines.iter().any(|l| l.contains("resumed after panicking")));
}

#[tokio::test]
async fn a_stalled_stdout_refuses_changes_before_iam_while_everything_else_answers() {
    let emulator = Emulator::shared();
    let user = emulator.standard_user("Stall-pass-1").await;
    let pki = Pki::new();
    let (app, mut hold) = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(CALLER, &user))
        .start_with_stdout_unread();
    let mut client = app.client(&pki, &pki.spiffe_client(CALLER)).await;

    // An attempt at IAM when stdout stalls: its event must not be lost.
    emulator
        .fault("ChangePassword", &user.name, json!({"delay_seconds": 8.0}))
        .await;
    let mut slow_client = client.clone();
    let slow = tokio::spawn(async move {
        slow_client
            .change_password(change("Stall-pass-1", "Stall-pass-2"))
            .await
    });
    until_calls(emulator, "ChangePassword", &user.name, 1).await;

    // Fill the pipe nobody reads: each refused input writes lines and an
    // audit event, until credgate notices the stall.
    let mut invalid = 0;
    let mut refused = 0;
    let started = Instant::now();
    while refused == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60) && invalid < 20_000,
            "no stall noticed after {invalid} calls"
        );
        let status = answered(client.change_password(change("", "Stall-pass-3")))
            .await
            .expect_err("refused");
        match reason(&status).as_str() {
            "PASSWORD_INVALID" => invalid += 1,
            "AUDIT_UNAVAILABLE" => refused += 1,
            other => panic!("unexpected {other}: {status:?}"),
        }
    }

    // Stalled: a valid change is refused before IAM, with RetryInfo ...
    let status = answered(client.change_password(change("Stall-pass-1", "Stall-pass-3")))
        .await
        .expect_err("refused");
    expect_error(&status, Code::Unavailable, "AUDIT_UNAVAILABLE");
    assert!(status.get_error_details().retry_info().is_some());
    refused += 1;
    // ... health turns NOT_SERVING, and everything else keeps answering.
    until_health(&app, NOT_SERVING, "NOT_SERVING").await;
    answered(client.get_password_policy(credgate::api::GetPasswordPolicyRequest {}))
        .await
        .expect("GetPasswordPolicy answers");
    // The attempt made before the stall ends normally.
    slow.await.expect("join").expect("the slow change succeeds");
    assert_eq!(emulator.calls("ChangePassword", &user.name).await, 1);

    // Someone reads stdout again: SERVING, changes go through, and every
    // audit event is there.
    hold.read_again();
    until_health(&app, SERVING, "SERVING again").await;
    client
        .change_password(change("Stall-pass-2", "Stall-pass-3"))
        .await
        .expect("changes again");
    assert_eq!(emulator.calls("ChangePassword", &user.name).await, 2);
    let total = invalid + refused + 2;
    let events = audit_events(&app, total).await;
    let count = |outcome: &str| events.iter().filter(|e| e["outcome"] == outcome).count();
    assert_eq!(count("OK"), 2, "the slow change and the last one");
    assert_eq!(count("PASSWORD_INVALID"), invalid);
    assert_eq!(count("AUDIT_UNAVAILABLE"), refused);
    assert_eq!(events.len(), total);
    println!("pipe filled after {invalid} calls; {refused} refused while stalled");
}
