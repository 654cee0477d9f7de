//! Every row of DESIGN.md's error table, driven through the real emulator
//! (its fault switch where IAM cannot be made to fail on demand).

use std::time::Duration;

use serde_json::json;
use tonic::{Code, Request};
use tonic_types::StatusExt;

use crate::harness::*;

const CALLER: &str = "spiffe://corp.example/ns/app/sa/app";

/// Asserts the row and that IAM's code and request id are in the metadata.
fn expect_iam_error(status: &tonic::Status, code: Code, reason: &str, aws_code: &str) {
    let metadata = expect_error(status, code, reason);
    assert_eq!(
        metadata.get("awsErrorCode").map(String::as_str),
        Some(aws_code),
        "{status:?}"
    );
    assert!(
        metadata
            .get("awsRequestId")
            .is_some_and(|id| !id.is_empty()),
        "awsRequestId missing: {status:?}"
    );
}

/// `value` with its last character replaced by a different one, so the
/// result can never equal the original (a fixed replacement would be a no-op
/// whenever the value already ended in it).
fn tampered(value: &str) -> String {
    let mut chars: Vec<char> = value.chars().collect();
    let last = chars.last_mut().expect("a non-empty value");
    *last = if *last == 'A' { 'B' } else { 'A' };
    chars.into_iter().collect()
}

fn retry_info(status: &tonic::Status) -> Option<Duration> {
    status
        .get_error_details()
        .retry_info()
        .and_then(|r| r.retry_delay)
}

#[tokio::test]
async fn iam_faults_map_to_their_rows_and_change_nothing() {
    let emulator = Emulator::shared();
    let rows = [
        (
            "LimitExceeded",
            Code::ResourceExhausted,
            "IAM_LIMIT_EXCEEDED",
        ),
        (
            "EntityTemporarilyUnmodifiable",
            Code::Unavailable,
            "ENTITY_TEMPORARILY_UNMODIFIABLE",
        ),
        ("ServiceFailure", Code::Unavailable, "IAM_SERVICE_FAILURE"),
        ("SomethingNobodyDocumented", Code::Internal, "IAM_ERROR"),
        ("AccessDenied", Code::PermissionDenied, "IAM_ACCESS_DENIED"),
    ];
    for (aws_code, code, reason) in rows {
        let rig = Rig::new(emulator, CALLER, "Fault-pass-1").await;
        emulator
            .fault("ChangePassword", &rig.user.name, json!({"error": aws_code}))
            .await;
        let status = rig
            .change("Fault-pass-1", "Fault-pass-2")
            .await
            .expect_err(aws_code);
        expect_iam_error(&status, code, reason, aws_code);
        let details = status.get_error_details();
        match reason {
            "IAM_LIMIT_EXCEEDED" => assert!(details.quota_failure().is_some(), "QuotaFailure"),
            "ENTITY_TEMPORARILY_UNMODIFIABLE" | "IAM_SERVICE_FAILURE" => {
                assert!(retry_info(&status).is_some(), "RetryInfo for {reason}")
            }
            _ => assert!(retry_info(&status).is_none(), "no RetryInfo for {reason}"),
        }
        assert_eq!(
            emulator.calls("ChangePassword", &rig.user.name).await,
            1,
            "{aws_code} is not retried"
        );
        assert!(
            emulator.password_is(&rig.user, "Fault-pass-1").await,
            "{aws_code} changed nothing"
        );
    }
}

#[tokio::test]
async fn throttling_is_retried_a_bounded_number_of_times() {
    let emulator = Emulator::shared();
    let once = Rig::new(emulator, CALLER, "Throttle-pass-1").await;
    emulator
        .fault(
            "ChangePassword",
            &once.user.name,
            json!({"error": "Throttling", "count": 1}),
        )
        .await;
    once.change("Throttle-pass-1", "Throttle-pass-2")
        .await
        .expect("one throttle is absorbed by a retry");
    assert_eq!(emulator.calls("ChangePassword", &once.user.name).await, 2);
    assert!(emulator.password_is(&once.user, "Throttle-pass-2").await);

    let always = Rig::new(emulator, CALLER, "Throttle-pass-1").await;
    emulator
        .fault(
            "ChangePassword",
            &always.user.name,
            json!({"error": "Throttling", "count": -1}),
        )
        .await;
    let status = always
        .change("Throttle-pass-1", "Throttle-pass-2")
        .await
        .expect_err("throttled");
    expect_iam_error(&status, Code::Unavailable, "IAM_THROTTLED", "Throttling");
    assert!(retry_info(&status).is_some());
    assert_eq!(emulator.calls("ChangePassword", &always.user.name).await, 3);
}

#[tokio::test]
async fn a_timeout_after_sending_is_outcome_unknown_and_never_retried() {
    let emulator = Emulator::shared();
    let rig = Rig::new(emulator, CALLER, "Slow-pass-1").await;
    emulator
        .fault(
            "ChangePassword",
            &rig.user.name,
            json!({"delay_seconds": 3.0}),
        )
        .await;
    let mut client = rig
        .app
        .client(&rig.pki, &rig.pki.spiffe_client(CALLER))
        .await;
    let mut request = Request::new(change("Slow-pass-1", "Slow-pass-2"));
    // The caller's deadline is shorter than request_timeout (10s): it wins.
    // Set as metadata only, so that this client does not give up first.
    request
        .metadata_mut()
        .insert("grpc-timeout", "1500m".parse().expect("header"));
    let started = std::time::Instant::now();
    let status = client.change_password(request).await.expect_err("deadline");
    let (reason, _) = error_info(&status);
    assert_eq!(
        (status.code(), reason.as_str()),
        (Code::DeadlineExceeded, "OUTCOME_UNKNOWN")
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(emulator.calls("ChangePassword", &rig.user.name).await, 1);
    // The emulator finishes the slow request: the password did change, which
    // is exactly why OUTCOME_UNKNOWN must not be retried blindly.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(emulator.calls("ChangePassword", &rig.user.name).await, 1);
}

#[tokio::test]
async fn request_timeout_bounds_the_iam_call() {
    let emulator = Emulator::shared();
    let user = emulator.standard_user("Slow-pass-1").await;
    let pki = Pki::new();
    let app = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(CALLER, &user))
        .server_toml("request_timeout = \"1s\"")
        .start();
    emulator
        .fault("ChangePassword", &user.name, json!({"delay_seconds": 2.5}))
        .await;
    let mut client = app.client(&pki, &pki.spiffe_client(CALLER)).await;
    let status = client
        .change_password(change("Slow-pass-1", "Slow-pass-2"))
        .await
        .expect_err("server deadline");
    expect_error(&status, Code::DeadlineExceeded, "OUTCOME_UNKNOWN");
    assert_eq!(emulator.calls("ChangePassword", &user.name).await, 1);
}

#[tokio::test]
async fn a_missing_login_profile_is_a_failed_precondition() {
    let emulator = Emulator::shared();
    let user = emulator
        .user(
            None,
            &["iam:ChangePassword", "iam:GetAccountPasswordPolicy"],
        )
        .await;
    let rig = Rig::for_user(emulator, CALLER, user, |s| s);
    let status = rig
        .change("Any-pass-1", "Any-pass-2")
        .await
        .expect_err("no login profile");
    expect_iam_error(
        &status,
        Code::FailedPrecondition,
        "LOGIN_PROFILE_MISSING",
        "NoSuchEntity",
    );
}

#[tokio::test]
async fn a_user_without_permission_gets_iam_access_denied() {
    let emulator = Emulator::shared();
    let user = emulator.user(Some("Denied-pass-1"), &[]).await;
    let rig = Rig::for_user(emulator, CALLER, user, |s| s);
    let status = rig
        .change("Denied-pass-1", "Denied-pass-2")
        .await
        .expect_err("denied");
    expect_iam_error(
        &status,
        Code::PermissionDenied,
        "IAM_ACCESS_DENIED",
        "AccessDenied",
    );
    assert!(emulator.password_is(&rig.user, "Denied-pass-1").await);
}

#[tokio::test]
async fn rejected_credentials_are_upstream_credentials_rejected() {
    let emulator = Emulator::shared();
    for (aws_code, tamper) in [
        ("SignatureDoesNotMatch", true),
        ("InvalidClientTokenId", false),
    ] {
        let mut user = emulator.standard_user("Cred-pass-1").await;
        let real = user.key.clone();
        if tamper {
            user.key.secret = tampered(&real.secret);
            assert_ne!(
                user.key.secret, real.secret,
                "the tamper must change the secret"
            );
        } else {
            user.key.id = tampered(&real.id);
            assert_ne!(user.key.id, real.id, "the tamper must change the key id");
        }
        let rig = Rig::for_user(emulator, CALLER, user, |s| s);
        let status = rig
            .change("Cred-pass-1", "Cred-pass-2")
            .await
            .expect_err(aws_code);
        expect_iam_error(
            &status,
            Code::FailedPrecondition,
            "UPSTREAM_CREDENTIALS_REJECTED",
            aws_code,
        );
    }
}

#[tokio::test]
async fn an_expired_token_refreshes_the_credentials_once_and_retries_once() {
    let emulator = Emulator::shared();
    let rig = Rig::new(emulator, CALLER, "Expired-pass-1").await;
    emulator
        .fault(
            "ChangePassword",
            &rig.user.name,
            json!({"error": "ExpiredToken", "count": 1}),
        )
        .await;
    rig.change("Expired-pass-1", "Expired-pass-2")
        .await
        .expect("refreshed and retried once");
    assert_eq!(emulator.calls("ChangePassword", &rig.user.name).await, 2);

    emulator
        .fault(
            "ChangePassword",
            &rig.user.name,
            json!({"error": "ExpiredToken", "count": -1}),
        )
        .await;
    let status = rig
        .change("Expired-pass-2", "Expired-pass-3")
        .await
        .expect_err("still expired");
    expect_iam_error(
        &status,
        Code::FailedPrecondition,
        "UPSTREAM_CREDENTIALS_REJECTED",
        "ExpiredToken",
    );
    assert_eq!(emulator.calls("ChangePassword", &rig.user.name).await, 4);
}

#[tokio::test]
async fn a_rotated_access_key_is_picked_up_from_the_credentials_file() {
    let emulator = Emulator::shared();
    let rig = Rig::new(emulator, CALLER, "Rotate-pass-1").await;
    // Rotate: a new key in the file, the old one deleted in IAM.
    let new_key = emulator.access_key(&rig.user.name).await;
    rewrite(
        &rig.app.dir.path().join("credentials"),
        &format!(
            "[{}]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            rig.user.name, new_key.id, new_key.secret
        ),
    );
    emulator
        .admin()
        .delete_access_key()
        .user_name(&rig.user.name)
        .access_key_id(&rig.user.key.id)
        .send()
        .await
        .expect("DeleteAccessKey");
    rig.change("Rotate-pass-1", "Rotate-pass-2")
        .await
        .expect("the new key is used after IAM rejects the old one");
    assert!(emulator.password_is(&rig.user, "Rotate-pass-2").await);
}

#[tokio::test]
async fn an_unreachable_iam_endpoint_is_iam_unreachable() {
    let emulator = Emulator::shared();
    let user = emulator.standard_user("Unreach-pass-1").await;
    // A port that was just free: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let pki = Pki::new();
    let mut setup = Setup::new(emulator, &pki).caller(CallerEntry::spiffe(CALLER, &user));
    setup.emulator_endpoint = format!("http://127.0.0.1:{port}");
    let app = setup.start();
    let mut client = app.client(&pki, &pki.spiffe_client(CALLER)).await;
    let status = client
        .change_password(change("Unreach-pass-1", "Unreach-pass-2"))
        .await
        .expect_err("unreachable");
    let metadata = expect_error(&status, Code::Unavailable, "IAM_UNREACHABLE");
    assert!(!metadata.contains_key("awsErrorCode"));
    assert!(retry_info(&status).is_some());
    // The address stays in the server log; the caller learns nothing of
    // the internal network.
    let endpoint = format!("127.0.0.1:{port}");
    assert!(
        !status.message().contains(&endpoint) && !metadata.values().any(|v| v.contains(&endpoint)),
        "{status:?}"
    );
    app.wait_for_line("the cause in the server log", |v| {
        v["message"] == "request rejected"
            && v["cause"].as_str().is_some_and(|c| c.contains(&endpoint))
    })
    .await;
}

#[tokio::test]
async fn profiles_signing_as_a_role_session_or_the_root_are_refused_without_calling_iam() {
    // Private emulator: its ChangePassword counter counts every signer.
    let emulator = Emulator::start();
    let session = emulator
        .role_session(&["iam:ChangePassword", "iam:GetAccountPasswordPolicy"])
        .await;
    let root = IamUser {
        name: "root-profile".into(),
        key: emulator.root_key().await,
    };
    for principal in [session, root] {
        let profile = principal.name.clone();
        let rig = Rig::for_user(&emulator, CALLER, principal, |s| s);
        let status = rig
            .change("Role-pass-1", "Role-pass-2")
            .await
            .expect_err("not the configured IAM user");
        expect_error(&status, Code::FailedPrecondition, "IAM_USER_MISMATCH");
        rig.app
            .wait_for_line("one ERROR naming the profile", |v| {
                v["level"] == "ERROR" && v["profile"] == profile.as_str()
            })
            .await;
    }
    assert_eq!(emulator.all_calls("ChangePassword").await, 0);
}

#[tokio::test]
async fn an_unverifiable_session_key_is_served_and_iam_says_invalid_user_type() {
    // Private emulator: the faults below hit every signer.
    let emulator = Emulator::start();
    for action in ["GetCallerIdentity", "GetUser"] {
        emulator
            .fault_for_anyone(action, json!({"error": "AccessDenied", "count": -1}))
            .await;
    }
    let session = emulator
        .role_session(&["iam:ChangePassword", "iam:GetAccountPasswordPolicy"])
        .await;
    let rig = Rig::for_user(&emulator, CALLER, session, |s| s);
    let status = rig
        .change("Role-pass-1", "Role-pass-2")
        .await
        .expect_err("a role");
    expect_iam_error(
        &status,
        Code::FailedPrecondition,
        "INVALID_USER_TYPE",
        "InvalidUserType",
    );
    let warnings = rig
        .app
        .lines()
        .iter()
        .filter(|l| l.contains("cannot read whose key this is"))
        .count();
    assert_eq!(warnings, 1, "one WARN line for an unverifiable profile");
}

#[tokio::test]
async fn repeated_wrong_old_passwords_lock_the_caller_out_before_iam() {
    let emulator = Emulator::shared();
    let user = emulator.standard_user("Lock-pass-1").await;
    let rig = Rig::for_user(emulator, CALLER, user, |s| {
        s.toml("[limits]\nfailed_attempts = 2\nfailed_attempts_window = \"1h\"\n")
    });
    for _ in 0..2 {
        let status = rig
            .change("Guess-pass-1", "Lock-pass-2")
            .await
            .expect_err("wrong");
        expect_error(&status, Code::PermissionDenied, "OLD_PASSWORD_INCORRECT");
    }
    let status = rig
        .change("Lock-pass-1", "Lock-pass-2")
        .await
        .expect_err("locked out even with the right password");
    expect_error(&status, Code::ResourceExhausted, "TOO_MANY_FAILED_ATTEMPTS");
    let delay = retry_info(&status).expect("RetryInfo");
    assert!(
        delay > Duration::from_secs(3500) && delay <= Duration::from_secs(3600),
        "{delay:?}"
    );
    assert_eq!(
        emulator.calls("ChangePassword", &rig.user.name).await,
        2,
        "IAM not called"
    );
}

#[tokio::test]
async fn the_account_policy_is_served_and_checked_before_iam_with_every_unmet_rule() {
    let emulator = Emulator::start();
    let rig = Rig::new(&emulator, CALLER, "Policy-pass-1!").await;
    let mut client = rig
        .app
        .client(&rig.pki, &rig.pki.spiffe_client(CALLER))
        .await;
    let none = client
        .get_password_policy(credgate::api::GetPasswordPolicyRequest {})
        .await
        .expect("policy")
        .into_inner();
    assert_eq!(none.policy, None, "no account policy: unset, not an error");

    emulator
        .set_policy(14, true, true, true, true, Some(2))
        .await;
    // A new credgate, so the (short-lived) policy cache starts empty.
    let rig = Rig::for_user(&emulator, CALLER, rig.user, |s| s);
    let mut client = rig
        .app
        .client(&rig.pki, &rig.pki.spiffe_client(CALLER))
        .await;
    let policy = client
        .get_password_policy(credgate::api::GetPasswordPolicyRequest {})
        .await
        .expect("policy")
        .into_inner()
        .policy
        .expect("set");
    assert_eq!(policy.minimum_password_length, 14);
    assert!(policy.require_symbols && policy.require_numbers);
    assert!(policy.require_uppercase_characters && policy.require_lowercase_characters);
    assert_eq!(policy.password_reuse_prevention, 2);

    let status = rig
        .change("Policy-pass-1!", "weak")
        .await
        .expect_err("weak");
    expect_error(&status, Code::InvalidArgument, "PASSWORD_POLICY_VIOLATION");
    let details = status.get_error_details();
    let violations = &details.bad_request().expect("BadRequest").field_violations;
    assert_eq!(
        violations.len(),
        4,
        "length, symbols, numbers, uppercase: {violations:?}"
    );
    assert!(violations.iter().all(|v| v.field == "new_password"));
    assert_eq!(
        emulator.calls("ChangePassword", &rig.user.name).await,
        0,
        "checked before IAM"
    );

    // validate_only runs every check and changes nothing.
    let mut request = change("Policy-pass-1!", "Strong-enough-2!");
    request.validate_only = true;
    let validated = client
        .change_password(request)
        .await
        .expect("valid")
        .into_inner();
    assert_eq!(validated.iam_user, rig.user.name);
    assert!(validated.iam_request_id.is_empty());
    assert!(!validated.replayed);
    let mut request = change("Policy-pass-1!", "weak");
    request.validate_only = true;
    client.change_password(request).await.expect_err("invalid");
    assert_eq!(emulator.calls("ChangePassword", &rig.user.name).await, 0);
    assert!(emulator.password_is(&rig.user, "Policy-pass-1!").await);

    // IAM's own PasswordPolicyViolation (reuse prevention) maps the same way.
    rig.change("Policy-pass-1!", "Strong-enough-2!")
        .await
        .expect("change");
    let status = rig
        .change("Strong-enough-2!", "Policy-pass-1!")
        .await
        .expect_err("reused");
    expect_iam_error(
        &status,
        Code::InvalidArgument,
        "PASSWORD_POLICY_VIOLATION",
        "PasswordPolicyViolation",
    );
    let details = status.get_error_details();
    assert_eq!(
        details.bad_request().expect("BadRequest").field_violations[0].field,
        "new_password"
    );
}

#[tokio::test]
async fn a_profile_missing_at_start_is_rejected_until_the_file_provides_it() {
    let emulator = Emulator::shared();
    let user = emulator.standard_user("Late-pass-1").await;
    let pki = Pki::new();
    let (dir, config) = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(CALLER, &user))
        .write();
    let credentials = dir.path().join("credentials");
    let with_profile = std::fs::read_to_string(&credentials).expect("credentials");
    rewrite(
        &credentials,
        "[somebody-else]\naws_access_key_id = AKIAX\naws_secret_access_key = x\n",
    );
    let app = Credgate::spawn(dir, &config, &[]);
    app.wait_for_line("the startup warning", |v| {
        v["level"] == "WARN"
            && v["problem"]
                .as_str()
                .is_some_and(|p| p.contains(&user.name))
    })
    .await;
    let mut client = app.client(&pki, &pki.spiffe_client(CALLER)).await;

    let status = client
        .change_password(change("Late-pass-1", "Late-pass-2"))
        .await
        .expect_err("no profile");
    let metadata = expect_error(
        &status,
        Code::FailedPrecondition,
        "UPSTREAM_CREDENTIALS_REJECTED",
    );
    assert!(
        !metadata.contains_key("awsErrorCode"),
        "IAM was never asked: {metadata:?}"
    );
    assert_eq!(emulator.calls("ChangePassword", &user.name).await, 0);

    rewrite(&credentials, &with_profile);
    client
        .change_password(change("Late-pass-1", "Late-pass-2"))
        .await
        .expect("the profile is re-read once it exists");
    assert!(emulator.password_is(&user, "Late-pass-2").await);
}

/// A minimal HTTP forward proxy on 127.0.0.1: counts the connections it is
/// asked to forward, and pipes each to the host of its absolute-form target.
async fn forward_proxy() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let forwarded = Arc::new(AtomicUsize::new(0));
    let counter = forwarded.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut chunk = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match inbound.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let Some(authority) = text
                    .split_whitespace()
                    .nth(1)
                    .and_then(|target| target.strip_prefix("http://"))
                    .and_then(|rest| rest.split('/').next())
                else {
                    return;
                };
                let Ok(mut upstream) = tokio::net::TcpStream::connect(authority).await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                if upstream.write_all(&head).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut upstream).await;
                }
            });
        }
    });
    (addr, forwarded)
}

#[tokio::test]
async fn iam_calls_go_through_the_proxy_the_environment_names() {
    let (proxy, forwarded) = forward_proxy().await;
    let emulator = Emulator::shared();
    let user = emulator.standard_user("Proxied-pass-1").await;
    let rig = Rig::for_user(emulator, CALLER, user, |s| {
        s.env("HTTP_PROXY", &format!("http://{proxy}"))
    });
    rig.change("Proxied-pass-1", "Proxied-pass-2")
        .await
        .expect("change through the proxy");
    assert!(
        forwarded.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the proxy was not used"
    );
    assert!(emulator.password_is(&rig.user, "Proxied-pass-2").await);
}
