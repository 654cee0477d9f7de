//! Caller templates: a family of identities mapped by one `[[callers]]`
//! entry, each identity to the IAM user built from its captures, against
//! the IAM emulator over mTLS; and `check-config`'s refusals and
//! `--explain`.

use std::{path::Path, time::Duration};

use credgate::devpki::ClientSpec;
use tonic::Code;

use crate::harness::*;

/// A SPIFFE template (namespace/service account → IAM user) and a DNS
/// template (service → IAM user), as in docs/configuration.md.
const TEMPLATES: &str = r#"
[[callers]]
spiffe_id = "spiffe://corp.example/ns/{ns}/sa/{sa}"
iam_user = "svc-{ns}-{sa}"
aws_profile = "{ns}-{sa}"

[[callers]]
dns_name = "{svc}.apps.corp.example"
iam_user = "app-{svc}"
aws_profile = "app-{svc}"
"#;

fn spiffe_id(ns: &str, sa: &str) -> String {
    format!("spiffe://corp.example/ns/{ns}/sa/{sa}")
}

fn dns_client(pki: &Pki, name: &str) -> credgate::devpki::Issued {
    pki.client(&ClientSpec {
        dns_names: vec![name.to_owned()],
        ..ClientSpec::default()
    })
}

#[tokio::test]
async fn templated_spiffe_and_dns_callers_each_change_only_their_own_users_password() {
    let emulator = Emulator::shared();
    let ns = unique("ns");
    let svc = unique("web");
    let api = emulator
        .standard_user_named(&format!("svc-{ns}-api"), "Api-pass-1")
        .await;
    let worker = emulator
        .standard_user_named(&format!("svc-{ns}-worker"), "Worker-pass-1")
        .await;
    let web = emulator
        .standard_user_named(&format!("app-{svc}"), "Web-pass-1")
        .await;
    let pki = Pki::new();
    let app = Setup::new(emulator, &pki)
        .profile(&format!("{ns}-api"), &api.key)
        .profile(&format!("{ns}-worker"), &worker.key)
        .profile(&format!("app-{svc}"), &web.key)
        .toml(TEMPLATES)
        .start();

    let response = app
        .client(&pki, &pki.spiffe_client(&spiffe_id(&ns, "api")))
        .await
        .change_password(change("Api-pass-1", "Api-pass-2"))
        .await
        .expect("templated SPIFFE caller")
        .into_inner();
    assert_eq!(response.iam_user, api.name);
    let response = app
        .client(&pki, &dns_client(&pki, &format!("{svc}.apps.corp.example")))
        .await
        .change_password(change("Web-pass-1", "Web-pass-2"))
        .await
        .expect("templated DNS caller")
        .into_inner();
    assert_eq!(response.iam_user, web.name);

    assert!(emulator.password_is(&api, "Api-pass-2").await);
    assert!(emulator.password_is(&web, "Web-pass-2").await);
    // The other member of the family was not touched.
    assert!(emulator.password_is(&worker, "Worker-pass-1").await);
    for (user, changes) in [(&api, 1), (&web, 1), (&worker, 0)] {
        assert_eq!(
            emulator.calls("ChangePassword", &user.name).await,
            changes,
            "{}",
            user.name
        );
    }
    // Each was verified as its own user (STS) before its first change.
    assert!(emulator.calls("GetCallerIdentity", &api.name).await >= 1);
    assert!(emulator.calls("GetCallerIdentity", &web.name).await >= 1);

    // The audit trail names the resolved identity and the rule that let it in.
    let events = app.audit_events();
    let event = events
        .iter()
        .find(|e| e["iam_user"] == api.name.as_str())
        .expect("the SPIFFE caller's audit event");
    assert_eq!(event["caller"], spiffe_id(&ns, "api").as_str());
    assert_eq!(
        event["caller_template"],
        "spiffe://corp.example/ns/{ns}/sa/{sa}"
    );
    assert_eq!(event["outcome"], "OK");
}

#[tokio::test]
async fn an_extra_segment_is_not_mapped_and_an_exact_entry_wins() {
    let emulator = Emulator::shared();
    let ns = unique("ns");
    // The template would make this identity `svc-<ns>-portal`; the exact
    // entry maps it to another user.
    let templated = emulator
        .standard_user_named(&format!("svc-{ns}-portal"), "Templated-pass-1")
        .await;
    let exact = emulator.standard_user("Exact-pass-1").await;
    let pki = Pki::new();
    let portal = spiffe_id(&ns, "portal");
    let app = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(&portal, &exact))
        .profile(&format!("{ns}-portal"), &templated.key)
        .toml(TEMPLATES)
        .start();

    let response = app
        .client(&pki, &pki.spiffe_client(&portal))
        .await
        .change_password(change("Exact-pass-1", "Exact-pass-2"))
        .await
        .expect("the exact entry")
        .into_inner();
    assert_eq!(response.iam_user, exact.name);
    assert!(emulator.password_is(&exact, "Exact-pass-2").await);
    assert_eq!(
        emulator.calls("ChangePassword", &templated.name).await,
        0,
        "the template's user is not touched"
    );

    for id in [
        format!("{portal}/extra"),
        format!("spiffe://corp.example/ns/{ns}/sa"),
        format!("spiffe://corp.example/ns/{ns}/role/portal"),
    ] {
        let status = app
            .client(&pki, &pki.spiffe_client(&id))
            .await
            .change_password(change("Templated-pass-1", "Templated-pass-2"))
            .await
            .expect_err("not mapped");
        expect_error(&status, Code::PermissionDenied, "CALLER_NOT_MAPPED");
    }
    let status = app
        .client(&pki, &dns_client(&pki, "a.b.apps.corp.example"))
        .await
        .change_password(change("Templated-pass-1", "Templated-pass-2"))
        .await
        .expect_err("a capture is one whole label");
    expect_error(&status, Code::PermissionDenied, "CALLER_NOT_MAPPED");
    assert_eq!(emulator.calls("ChangePassword", &templated.name).await, 0);
}

#[tokio::test]
async fn a_templated_identity_without_a_key_is_not_provisioned_and_nothing_reaches_iam() {
    // A private emulator: "nothing reaches IAM" is counted over every caller.
    let emulator = Emulator::start();
    let ns = unique("ns");
    let user = emulator
        .standard_user_named(&format!("svc-{ns}-new"), "New-pass-1")
        .await;
    let pki = Pki::new();
    let (dir, config) = Setup::new(&emulator, &pki).toml(TEMPLATES).write();
    let app = Credgate::spawn(dir, &config, &[]);
    let mut client = app
        .client(&pki, &pki.spiffe_client(&spiffe_id(&ns, "new")))
        .await;

    let status = client
        .change_password(change("New-pass-1", "New-pass-2"))
        .await
        .expect_err("no profile for the built name");
    expect_error(
        &status,
        Code::FailedPrecondition,
        "IAM_USER_NOT_PROVISIONED",
    );
    let status = client
        .get_password_policy(credgate::api::GetPasswordPolicyRequest {})
        .await
        .expect_err("no profile either");
    expect_error(
        &status,
        Code::FailedPrecondition,
        "IAM_USER_NOT_PROVISIONED",
    );
    for action in [
        "ChangePassword",
        "GetCallerIdentity",
        "GetUser",
        "GetAccountPasswordPolicy",
    ] {
        assert_eq!(emulator.all_calls(action).await, 0, "{action}");
    }

    // Provisioned later (the Secret is updated): no restart needed.
    let credentials = app.dir.path().join("credentials");
    rewrite(
        &credentials,
        &format!(
            "[{ns}-new]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            user.key.id, user.key.secret
        ),
    );
    let response = client
        .change_password(change("New-pass-1", "New-pass-2"))
        .await
        .expect("provisioned now")
        .into_inner();
    assert_eq!(response.iam_user, user.name);
    assert!(emulator.password_is(&user, "New-pass-2").await);
}

#[tokio::test]
async fn the_attempt_limit_is_per_resolved_identity() {
    let emulator = Emulator::shared();
    let ns = unique("ns");
    let guessed = emulator
        .standard_user_named(&format!("svc-{ns}-a"), "Right-pass-1")
        .await;
    let sibling = emulator
        .standard_user_named(&format!("svc-{ns}-b"), "Right-pass-1")
        .await;
    let pki = Pki::new();
    let app = Setup::new(emulator, &pki)
        .profile(&format!("{ns}-a"), &guessed.key)
        .profile(&format!("{ns}-b"), &sibling.key)
        .toml("[limits]\nfailed_attempts = 2")
        .toml(TEMPLATES)
        .start();
    let a = pki.spiffe_client(&spiffe_id(&ns, "a"));
    for _ in 0..2 {
        // A new connection each time: the record is the identity's, not
        // the connection's.
        let status = app
            .client(&pki, &a)
            .await
            .change_password(change("Wrong-pass-1", "Next-pass-2"))
            .await
            .expect_err("wrong old password");
        expect_error(&status, Code::PermissionDenied, "OLD_PASSWORD_INCORRECT");
    }
    let status = app
        .client(&pki, &a)
        .await
        .change_password(change("Right-pass-1", "Next-pass-2"))
        .await
        .expect_err("locked out");
    expect_error(&status, Code::ResourceExhausted, "TOO_MANY_FAILED_ATTEMPTS");
    // Another identity of the same template has its own record.
    app.client(&pki, &pki.spiffe_client(&spiffe_id(&ns, "b")))
        .await
        .change_password(change("Right-pass-1", "Next-pass-2"))
        .await
        .expect("its sibling is not locked out");
    assert!(emulator.password_is(&sibling, "Next-pass-2").await);
    assert!(emulator.password_is(&guessed, "Right-pass-1").await);
}

#[tokio::test]
async fn a_built_profile_holding_another_users_key_is_refused_before_any_change() {
    let emulator = Emulator::shared();
    let ns = unique("ns");
    let intended = emulator
        .standard_user_named(&format!("svc-{ns}-api"), "Intended-pass-1")
        .await;
    let other = emulator.standard_user("Other-pass-1").await;
    let pki = Pki::new();
    // The profile the template builds for svc-<ns>-api holds another
    // user's key: the STS proof catches it, whatever the old password.
    let app = Setup::new(emulator, &pki)
        .profile(&format!("{ns}-api"), &other.key)
        .toml(TEMPLATES)
        .start();
    let mut client = app
        .client(&pki, &pki.spiffe_client(&spiffe_id(&ns, "api")))
        .await;
    for old in ["Intended-pass-1", "Other-pass-1"] {
        let status = client
            .change_password(change(old, "Next-pass-2"))
            .await
            .expect_err("another user's key");
        expect_error(&status, Code::FailedPrecondition, "IAM_USER_MISMATCH");
    }
    assert_eq!(emulator.calls("ChangePassword", &other.name).await, 0);
    assert_eq!(emulator.calls("ChangePassword", &intended.name).await, 0);
    assert!(emulator.password_is(&other, "Other-pass-1").await);
}

#[tokio::test]
async fn one_resolved_identity_holds_its_connection_budget_across_connections() {
    let emulator = Emulator::shared();
    let ns = unique("ns");
    let a = emulator
        .standard_user_named(&format!("svc-{ns}-a"), "A-pass-1")
        .await;
    let b = emulator
        .standard_user_named(&format!("svc-{ns}-b"), "B-pass-1")
        .await;
    let pki = Pki::new();
    let app = Setup::new(emulator, &pki)
        .profile(&format!("{ns}-a"), &a.key)
        .profile(&format!("{ns}-b"), &b.key)
        .server_toml("max_connections = 16\nmax_connections_per_caller = 2")
        .toml(TEMPLATES)
        .start();
    let a_cert = pki.spiffe_client(&spiffe_id(&ns, "a"));
    let policy = |channel: tonic::transport::Channel| async move {
        credgate::api::password_service_client::PasswordServiceClient::new(channel)
            .get_password_policy(credgate::api::GetPasswordPolicyRequest {})
            .await
    };
    let mut held = Vec::new();
    for _ in 0..2 {
        let channel = app.channel(&pki, Some(&a_cert)).await.expect("connect");
        policy(channel.clone()).await.expect("within the budget");
        held.push(channel);
    }
    // A third connection of the same identity is over its budget.
    let third = match app.channel(&pki, Some(&a_cert)).await {
        Ok(channel) => policy(channel).await.map(|_| ()),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    let status = third.expect_err("over max_connections_per_caller");
    assert!(
        format!("{status:?}").contains("ENHANCE_YOUR_CALM"),
        "told why (GOAWAY): {status:?}"
    );
    // Another identity of the same template has a budget of its own.
    let b_cert = pki.spiffe_client(&spiffe_id(&ns, "b"));
    let channel = app.channel(&pki, Some(&b_cert)).await.expect("connect");
    policy(channel).await.expect("its own budget");
    app.wait_for_line("the budget refusal", |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("max_connections_per_caller"))
            && v["caller"] == spiffe_id(&ns, "a").as_str()
    })
    .await;
    drop(held);
}

/// `credgate check-config --explain IDENTITY` on `config`: (exit code,
/// stdout, stderr).
fn explain(dir: &Path, config: &Path, identity: &str) -> (Option<i32>, String, String) {
    let out = credgate_command(dir)
        .args(["check-config", "--config"])
        .arg(config)
        .args(["--explain", identity])
        .output()
        .expect("check-config --explain");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn explain_says_which_entry_maps_an_identity_or_why_none_does() {
    let emulator = Emulator::shared();
    let exact = emulator.standard_user("Any-pass-1").await;
    let pki = Pki::new();
    let portal = spiffe_id("portal", "portal");
    let (dir, config) = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(&portal, &exact))
        .profile("payments-api", &exact.key)
        .toml(TEMPLATES)
        .toml(
            "[[callers]]\ncommon_name = \"legacy\"\niam_user = \"legacy\"\naws_profile = \"legacy\"\n",
        )
        .write();
    let dir = dir.path();

    let (code, out, err) = explain(dir, &config, &spiffe_id("payments", "api"));
    assert_eq!(code, Some(0), "{out}{err}");
    for needle in [
        "mapped by callers[0], the spiffe_id template \"spiffe://corp.example/ns/{ns}/sa/{sa}\"",
        "captures: ns=\"payments\" sa=\"api\"",
        "iam_user: svc-payments-api (from \"svc-{ns}-{sa}\")",
        "key: aws_profile \"payments-api\", defined in the AWS shared files",
        "state key: spiffe:spiffe://corp.example/ns/payments/sa/api",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }

    // Mapped, but its key is not there: said, still exit 0 (the mapping
    // holds; the call gets IAM_USER_NOT_PROVISIONED).
    let (code, out, _) = explain(dir, &config, "dns:web.apps.corp.example");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("iam_user: app-web"), "{out}");
    assert!(
        out.contains("key: aws_profile \"app-web\", NOT defined in the AWS shared files (AWS_SHARED_CREDENTIALS_FILE / AWS_CONFIG_FILE): its calls get IAM_USER_NOT_PROVISIONED until it is"),
        "{out}"
    );

    let (code, out, _) = explain(dir, &config, &portal);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("mapped by callers[3], an exact entry"),
        "{out}"
    );
    assert!(out.contains(&format!("iam_user: {}", exact.name)), "{out}");
    assert!(
        out.contains("callers[0]'s spiffe_id template \"spiffe://corp.example/ns/{ns}/sa/{sa}\" matches it too; the exact entry wins"),
        "{out}"
    );

    let (code, out, _) = explain(dir, &config, &format!("{portal}/extra"));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("not mapped (CALLER_NOT_MAPPED)"), "{out}");
    assert!(out.contains("this one has 5 path segments"), "{out}");
    assert!(
        out.contains("callers[0]: spiffe_id template \"spiffe://corp.example/ns/{ns}/sa/{sa}\" (4 path segments)"),
        "{out}"
    );

    let (code, out, _) = explain(dir, &config, "dns:*.apps.corp.example");
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(
            "has its shape, but {svc} would capture \"*\", and a capture is [A-Za-z0-9._-]{1,63}"
        ),
        "{out}"
    );

    let long = "a".repeat(62);
    let (code, out, _) = explain(dir, &config, &format!("dns:{long}.apps.corp.example"));
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!("builds the IAM user name \"app-{long}\" from \"app-{{svc}}\", which is not a valid IAM user name")),
        "{out}"
    );

    let (code, out, _) = explain(dir, &config, "spiffe://Corp.example/ns/a/sa/b");
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("not a valid SPIFFE ID: the trust domain must be lower case"),
        "{out}"
    );

    // A bare name may be a DNS SAN or a CN: both readings are shown.
    let (code, out, _) = explain(dir, &config, "legacy");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("could be a DNS SAN or a subject CN"), "{out}");
    assert!(out.contains("dns_name \"legacy\"\n  not mapped"), "{out}");
    assert!(
        out.contains("common_name \"legacy\"\n  mapped by callers[2], an exact entry"),
        "{out}"
    );

    let (code, _, err) = explain(dir, &config, "dns:");
    assert_eq!(code, Some(64), "{err}");
}

#[test]
fn check_config_refuses_bad_templates_all_at_once_and_explain_needs_a_valid_config() {
    let pki = Pki::new();
    let bad = r#"
[[callers]]
spiffe_id = "spiffe://corp.example/ns/{ns}/sa/{sa}"
iam_user = "svc-{ns}-{sa}"
aws_profile = "{ns}-{sa}"

[[callers]]
spiffe_id = "spiffe://corp.example/ns/{team}/sa/api"
iam_user = "api-{team}"
aws_profile = "api-{team}"

[[callers]]
spiffe_id = "spiffe://corp.example/jobs/{job}"
iam_user = "job-{name}"
aws_profile = "job-{job}"

[[callers]]
dns_name = "{svc}.{svc}.corp.example"
iam_user = "svc-{svc}"
aws_profile = "svc-{svc}"

[[callers]]
dns_name = "x{svc}.corp.example"
iam_user = "x-{svc}"
aws_profile = "x-{svc}"

[[callers]]
spiffe_id = "spiffe://corp.example/batch/{job"
iam_user = "batch"
aws_profile = "batch"

[[callers]]
spiffe_id = "spiffe://corp.example/long/{x}"
iam_user = "this-literal-part-is-far-too-long-for-any-iam-user-name-to-hold-{x}"
aws_profile = "long-{x}"

[[callers]]
common_name = "{svc}"
iam_user = "cn-{svc}"
aws_profile = "cn-{svc}"
"#;
    let (dir, config) = Setup::with_endpoint("http://127.0.0.1:9", &pki)
        .toml(bad)
        .write();
    let (code, out, err) = check_config(dir.path(), &config, false);
    assert_eq!(code, Some(64), "{out}{err}");
    for needle in [
        "7 problem(s)",
        "callers[1]: template \"spiffe://corp.example/ns/{team}/sa/api\" and callers[0]'s template \"spiffe://corp.example/ns/{ns}/sa/{sa}\" could both match one identity (e.g. \"spiffe://corp.example/ns/x/sa/api\")",
        "callers[2].iam_user: \"job-{name}\" uses {name}, which the identity template does not capture",
        "callers[3].dns_name: template \"{svc}.{svc}.corp.example\" capture {svc} is used twice",
        "callers[4].dns_name: template \"x{svc}.corp.example\" label \"x{svc}\" mixes a capture with other text",
        "callers[5].spiffe_id: template \"spiffe://corp.example/batch/{job\" \"{job\" has a '{' that is not closed",
        "callers[6].iam_user: \"this-literal-part-is-far-too-long-for-any-iam-user-name-to-hold-{x}\" can never be a valid IAM user name",
        "callers[7].common_name: \"{svc}\": common_name has no templates",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    let (code, _, err) = explain(dir.path(), &config, "spiffe://corp.example/ns/a/sa/b");
    assert_eq!(
        code,
        Some(64),
        "a bad configuration explains nothing: {err}"
    );
    assert!(err.contains("could both match"), "{err}");

    let help = credgate_command(dir.path())
        .args(["check-config", "--help"])
        .output()
        .expect("--help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--explain <IDENTITY>"), "{help}");
    assert!(
        help.contains("Exit 0 when mapped, 1 when not, 64 for a bad configuration"),
        "{help}"
    );
}

/// Key age covers templated callers too: their users are known only once
/// they call, so the first call of one has its key's age checked then (one
/// WARN line when too old), not at key custody's next sweep an hour later.
#[tokio::test]
async fn a_templated_callers_old_key_is_reported_after_its_first_call() {
    let emulator = Emulator::shared();
    let ns = unique("ns");
    let user = emulator
        .standard_user_named(&format!("svc-{ns}-aged"), "Aged-pass-1")
        .await;
    // Older than the warn_key_age below by the time credgate looks.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let pki = Pki::new();
    let app = Setup::new(emulator, &pki)
        .profile(&format!("{ns}-aged"), &user.key)
        .toml(&format!("[keys]\nwarn_key_age = \"2s\"\n{TEMPLATES}"))
        .start();
    let age_warning = |v: &serde_json::Value| {
        v["level"] == "WARN"
            && v["iam_user"] == user.name.as_str()
            && v["message"]
                .as_str()
                .is_some_and(|m| m.contains("older than keys.warn_key_age"))
    };
    // Not configured, so not in the start-up sweep.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !app.lines()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .any(|v| age_warning(&v)),
        "no caller has used the templated user yet"
    );
    app.client(&pki, &pki.spiffe_client(&spiffe_id(&ns, "aged")))
        .await
        .change_password(change("Aged-pass-1", "Aged-pass-2"))
        .await
        .expect("templated caller");
    app.wait_for_line("the templated user's age warning", age_warning)
        .await;
}
