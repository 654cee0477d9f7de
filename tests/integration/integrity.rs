//! Every attempt ends honestly and leaves exactly one audit event: when the
//! caller cancels, when its deadline passes in a queue or while IAM works,
//! when the answer is cut off, whatever RUST_LOG says.

use std::time::Duration;

use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt;

use crate::harness::*;

const CALLER: &str = "spiffe://corp.example/ns/integrity/sa/integrity";

/// Waits (bounded) until `app` has written `n` audit events.
async fn audit_events(app: &Credgate, n: usize) -> Vec<serde_json::Value> {
    for _ in 0..200 {
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
    for _ in 0..200 {
        if emulator.calls(action, user).await >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the emulator never saw {n} {action} by {user}");
}

#[tokio::test]
async fn a_cancelled_call_still_completes_counts_and_leaves_exactly_one_audit_event() {
    let emulator = Emulator::shared();
    let rig = Rig::for_user(
        emulator,
        CALLER,
        emulator.standard_user("Cancel-pass-1").await,
        |s| s.toml("[limits]\nfailed_attempts = 1\nfailed_attempts_window = \"1h\"\n"),
    );
    emulator
        .fault(
            "ChangePassword",
            &rig.user.name,
            json!({"delay_seconds": 1.5, "count": 2}),
        )
        .await;

    // A right old password, cancelled (stream reset) while IAM works.
    let mut client = rig.client().await;
    let call = tokio::spawn(async move {
        client
            .change_password(change("Cancel-pass-1", "Cancel-pass-2"))
            .await
    });
    until_calls(emulator, "ChangePassword", &rig.user.name, 1).await;
    call.abort();
    let events = audit_events(&rig.app, 1).await;
    assert_eq!(events[0]["outcome"], "OK", "{events:?}");
    assert!(emulator.password_is(&rig.user, "Cancel-pass-2").await);

    // A wrong old password, the whole connection dropped mid-call: the
    // failure still counts, so the next guess is refused before IAM.
    let mut client = rig.client().await;
    let call = tokio::spawn(async move {
        client
            .change_password(change("Wrong-pass-9", "Cancel-pass-3"))
            .await
    });
    until_calls(emulator, "ChangePassword", &rig.user.name, 2).await;
    call.abort();
    let events = audit_events(&rig.app, 2).await;
    assert_eq!(events[1]["outcome"], "OLD_PASSWORD_INCORRECT", "{events:?}");
    let status = rig
        .change("Wrong-pass-8", "Cancel-pass-3")
        .await
        .expect_err("locked out");
    expect_error(&status, Code::ResourceExhausted, "TOO_MANY_FAILED_ATTEMPTS");
    assert_eq!(emulator.calls("ChangePassword", &rig.user.name).await, 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rig.app.audit_events().len(), 3, "exactly one event each");
}

#[tokio::test]
async fn an_attempt_in_flight_at_sigterm_finishes_and_is_audited_before_exit() {
    let emulator = Emulator::shared();
    let mut rig = Rig::new(emulator, CALLER, "Term-pass-1").await;
    emulator
        .fault(
            "ChangePassword",
            &rig.user.name,
            json!({"delay_seconds": 1.5}),
        )
        .await;
    let mut client = rig.client().await;
    let call = tokio::spawn(async move {
        client
            .change_password(with_timeout(change("Term-pass-1", "Term-pass-2"), "500m"))
            .await
    });
    until_calls(emulator, "ChangePassword", &rig.user.name, 1).await;
    let status = call.await.expect("join").expect_err("deadline first");
    expect_error(&status, Code::DeadlineExceeded, "OUTCOME_UNKNOWN");
    // The caller is gone; the attempt is not.
    rig.app.terminate();
    let exit = rig.app.wait_exit(Duration::from_secs(10)).await;
    assert!(exit.success(), "{exit:?}");
    let events = rig.app.audit_events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["outcome"], "OK");
    assert!(emulator.password_is(&rig.user, "Term-pass-2").await);
}

#[tokio::test]
async fn audit_events_are_written_whatever_rust_log_says() {
    let emulator = Emulator::shared();
    for level in ["warn", "off"] {
        let user = emulator.standard_user("Quiet-pass-1").await;
        let pki = Pki::new();
        // No "listening" line at these levels: wait for the admin port.
        let app = Setup::new(emulator, &pki)
            .caller(CallerEntry::spiffe(CALLER, &user))
            .env("RUST_LOG", level)
            .start_quiet();
        app.client(&pki, &pki.spiffe_client(CALLER))
            .await
            .change_password(change("Quiet-pass-1", "Quiet-pass-2"))
            .await
            .expect("changed");
        let events = audit_events(&app, 1).await;
        assert_eq!(events[0]["outcome"], "OK", "RUST_LOG={level}");
        assert_eq!(events[0]["caller"], CALLER);
        let others = app
            .lines()
            .iter()
            .filter(|l| l.contains("\"level\":\"INFO\"") && !l.contains("credgate::audit"))
            .count();
        assert_eq!(others, 0, "RUST_LOG={level} still filters everything else");
    }
}

#[tokio::test]
async fn a_call_queued_past_its_deadline_is_deadline_before_send_and_audited() {
    let emulator = Emulator::shared();
    let slow = emulator.standard_user("Queue-pass-1").await;
    let queued = emulator.standard_user("Queue-pass-1").await;
    let pki = Pki::new();
    let (a, b) = (
        "spiffe://corp.example/ns/a/sa/a",
        "spiffe://corp.example/ns/b/sa/b",
    );
    let app = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(a, &slow))
        .caller(CallerEntry::spiffe(b, &queued))
        .server_toml("max_concurrent_requests = 1")
        .start();
    emulator
        .fault("ChangePassword", &slow.name, json!({"delay_seconds": 2.0}))
        .await;
    let mut client_a = app.client(&pki, &pki.spiffe_client(a)).await;
    let holder = tokio::spawn(async move {
        client_a
            .change_password(change("Queue-pass-1", "Queue-pass-2"))
            .await
    });
    until_calls(emulator, "ChangePassword", &slow.name, 1).await;
    let mut client_b = app.client(&pki, &pki.spiffe_client(b)).await;
    let started = std::time::Instant::now();
    let status = client_b
        .change_password(with_timeout(change("Queue-pass-1", "Queue-pass-2"), "700m"))
        .await
        .expect_err("queued past its deadline");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "answered at its deadline, not when the slot freed (2 s)"
    );
    expect_error(&status, Code::DeadlineExceeded, "DEADLINE_BEFORE_SEND");
    for action in ["ChangePassword", "GetAccountPasswordPolicy"] {
        assert_eq!(emulator.calls(action, &queued.name).await, 0, "{action}");
    }
    holder.await.expect("join").expect("the holder completes");
    let events = audit_events(&app, 2).await;
    let b_event = events
        .iter()
        .find(|e| e["caller"] == b)
        .expect("an audit event for the queued call");
    assert_eq!(b_event["outcome"], "DEADLINE_BEFORE_SEND");
    assert!(emulator.password_is(&queued, "Queue-pass-1").await);
}

#[tokio::test]
async fn time_spent_before_sending_ends_in_deadline_before_send_and_iam_sees_nothing() {
    // Private emulator: its faults below delay every signer.
    let emulator = Emulator::start();
    let user = emulator.standard_user("Early-pass-1").await;
    // The identity check and the policy read eat the budget.
    for action in ["GetCallerIdentity", "GetAccountPasswordPolicy"] {
        let rig = Rig::for_user(
            &emulator,
            CALLER,
            emulator.standard_user("Early-pass-1").await,
            |s| s,
        );
        emulator
            .fault(
                action,
                &rig.user.name,
                json!({"delay_seconds": 3.0, "count": -1}),
            )
            .await;
        let status = rig
            .client()
            .await
            .change_password(with_timeout(change("Early-pass-1", "Early-pass-2"), "1S"))
            .await
            .expect_err("out of time");
        expect_error(&status, Code::DeadlineExceeded, "DEADLINE_BEFORE_SEND");
        assert_eq!(
            emulator.calls("ChangePassword", &rig.user.name).await,
            0,
            "{action}"
        );
        assert!(emulator.password_is(&rig.user, "Early-pass-1").await);
    }
    drop(user);
}

#[tokio::test]
async fn a_connect_that_cannot_finish_in_time_is_never_sent() {
    // An IAM endpoint whose TCP handshake never completes: a listener with
    // a full accept queue drops further SYNs.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let blackhole = socket.listen(0).expect("listen");
    let addr = blackhole.local_addr().expect("addr");
    let _fillers: Vec<_> = (0..4)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()
        })
        .collect();
    let emulator = Emulator::shared();
    let user = emulator.standard_user("Connect-pass-1").await;
    let pki = Pki::new();
    let mut setup = Setup::new(emulator, &pki).caller(CallerEntry::spiffe(CALLER, &user));
    // STS stays reachable (the profile verifies); IAM does not.
    setup.emulator_endpoint = format!("http://{addr}");
    setup.aws_toml = format!("sts_endpoint_url = {:?}\n", emulator.endpoint);
    let app = setup.start();
    let mut client = app.client(&pki, &pki.spiffe_client(CALLER)).await;
    let status = client
        .change_password(with_timeout(
            change("Connect-pass-1", "Connect-pass-2"),
            "1500m",
        ))
        .await
        .expect_err("IAM cannot be reached");
    let (reason, _) = error_info(&status);
    assert!(
        matches!(
            (status.code(), reason.as_str()),
            (Code::DeadlineExceeded, "DEADLINE_BEFORE_SEND")
                | (Code::Unavailable, "IAM_UNREACHABLE")
        ),
        "nothing was sent, and the answer says so: {status:?}"
    );
    assert!(
        !status.message().contains(&addr.to_string()),
        "no internal address reaches the caller: {status:?}"
    );
}

#[tokio::test]
async fn answers_that_may_hide_an_applied_change_are_outcome_unknown() {
    let emulator = Emulator::shared();
    let faults = [
        json!({"response": "truncated", "apply": true}),
        json!({"response": "bare", "status": 502, "apply": true}),
        json!({"response": "bare", "status": 504, "apply": false}),
    ];
    for fault in faults {
        let rig = Rig::new(emulator, CALLER, "Cut-pass-1").await;
        emulator
            .fault("ChangePassword", &rig.user.name, fault.clone())
            .await;
        let status = rig
            .change("Cut-pass-1", "Cut-pass-2")
            .await
            .expect_err("no clean answer");
        expect_error(&status, Code::DeadlineExceeded, "OUTCOME_UNKNOWN");
        assert!(
            status.get_error_details().retry_info().is_none(),
            "no blind retry invited: {fault}"
        );
        assert_eq!(
            emulator.calls("ChangePassword", &rig.user.name).await,
            1,
            "never retried: {fault}"
        );
        let applied = fault["apply"] == true;
        assert_eq!(
            emulator.password_is(&rig.user, "Cut-pass-2").await,
            applied,
            "{fault}"
        );
    }
}

#[tokio::test]
async fn get_password_policy_never_answers_outcome_unknown() {
    let emulator = Emulator::shared();
    let rows = [
        (
            json!({"delay_seconds": 2.0}),
            Code::DeadlineExceeded,
            "IAM_TIMEOUT",
        ),
        (
            json!({"response": "bare", "status": 502, "apply": false}),
            Code::Unavailable,
            "IAM_SERVICE_FAILURE",
        ),
        (
            json!({"response": "truncated", "apply": true}),
            Code::Unavailable,
            "IAM_SERVICE_FAILURE",
        ),
    ];
    for (fault, code, reason) in rows {
        let rig = Rig::new(emulator, CALLER, "Read-pass-1").await;
        emulator
            .fault("GetAccountPasswordPolicy", &rig.user.name, fault.clone())
            .await;
        let status = rig
            .client()
            .await
            .get_password_policy(with_timeout(
                credgate::api::GetPasswordPolicyRequest {},
                "1S",
            ))
            .await
            .expect_err("no usable answer");
        expect_error(&status, code, reason);
    }
}

#[tokio::test]
async fn a_profile_holding_another_users_key_is_refused_before_change_password() {
    let emulator = Emulator::shared();
    let owner = emulator.standard_user("Mine-pass-1").await;
    let victim = emulator.standard_user("Victim-pass-1").await;
    let pki = Pki::new();
    // The caller is configured as `owner`, but its profile holds the
    // victim's key: ChangePassword would change the victim's password.
    let entry = CallerEntry {
        matcher: format!("spiffe_id = {CALLER:?}"),
        iam_user: owner.name.clone(),
        profile: owner.name.clone(),
        key: victim.key.clone(),
    };
    let app = Setup::new(emulator, &pki).caller(entry).start();
    let mut client = app.client(&pki, &pki.spiffe_client(CALLER)).await;
    for _ in 0..2 {
        let status = client
            .change_password(change("Victim-pass-1", "Victim-pass-2"))
            .await
            .expect_err("mismatch");
        expect_error(&status, Code::FailedPrecondition, "IAM_USER_MISMATCH");
    }
    assert_eq!(emulator.calls("ChangePassword", &victim.name).await, 0);
    assert!(emulator.password_is(&victim, "Victim-pass-1").await);
    let errors = app
        .lines()
        .iter()
        .filter(|l| {
            l.contains("\"level\":\"ERROR\"") && l.contains(&format!("user/{}", victim.name))
        })
        .count();
    assert_eq!(errors, 1, "logged once at ERROR, naming whose key it is");
}

#[tokio::test]
async fn a_hundred_cold_policy_reads_cost_one_iam_call_and_a_denial_is_remembered() {
    let emulator = Emulator::shared();
    let rig = Rig::for_user(
        emulator,
        CALLER,
        emulator.standard_user("Herd-pass-1").await,
        |s| s.server_toml("max_requests_per_caller = 200"),
    );
    emulator
        .fault(
            "GetAccountPasswordPolicy",
            &rig.user.name,
            json!({"delay_seconds": 0.5}),
        )
        .await;
    // Four connections of 25 calls: each stays under the 32 streams a
    // connection may open, also before the client has read the server's
    // SETTINGS (beyond them a stream is refused, REFUSED_STREAM).
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(rig.client().await);
    }
    let calls: Vec<_> = (0..100)
        .map(|i| {
            let mut client = clients[i % clients.len()].clone();
            tokio::spawn(async move {
                client
                    .get_password_policy(credgate::api::GetPasswordPolicyRequest {})
                    .await
            })
        })
        .collect();
    for call in calls {
        call.await.expect("join").expect("policy");
    }
    assert_eq!(
        emulator
            .calls("GetAccountPasswordPolicy", &rig.user.name)
            .await,
        1
    );

    // Without iam:GetAccountPasswordPolicy: one IAM call, then the denial
    // is remembered while changes go on (IAM enforces the policy itself).
    let denied = emulator
        .user(Some("Deny-pass-1"), &["iam:ChangePassword", "iam:GetUser"])
        .await;
    let name = denied.name.clone();
    let rig = Rig::for_user(emulator, CALLER, denied, |s| s);
    let passwords = ["Deny-pass-1", "Deny-pass-2", "Deny-pass-3", "Deny-pass-4"];
    for pair in passwords.windows(2) {
        rig.change(pair[0], pair[1]).await.expect("changed");
    }
    assert_eq!(emulator.calls("GetAccountPasswordPolicy", &name).await, 1);
}
