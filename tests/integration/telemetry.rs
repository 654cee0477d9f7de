//! Traces, metrics, logs and audit records as credgate really emits them, and
//! the proof that no password leaves the process.

use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::{
    metrics::v1::metric::Data,
    trace::v1::{span::SpanKind, status::StatusCode},
};
use serde_json::{Value, json};
use tonic::Request;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{
    harness::*,
    otlp::{Receiver, attrs, metric_text, span_text},
};

const CALLER: &str = "spiffe://corp.example/ns/traced/sa/traced";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN_ID: &str = "00f067aa0ba902b7";

fn otel_env<'a>(setup: Setup<'a>, endpoint: &str) -> Setup<'a> {
    setup
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_SERVICE_NAME", "credgate-test")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("OTEL_METRIC_EXPORT_INTERVAL", "300")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn a_call_exports_a_server_span_continuing_the_callers_trace_with_an_iam_child() {
    let receiver = Receiver::start().await;
    let emulator = Emulator::shared();
    let user = emulator.standard_user("Traced-pass-1").await;
    let rig = Rig::for_user(emulator, CALLER, user, |s| {
        otel_env(s, &receiver.endpoint())
    });
    let mut client = rig.client().await;

    let mut request = Request::new(change("Traced-pass-1", "Traced-pass-2"));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01")
            .parse()
            .expect("header"),
    );
    let response = client
        .change_password(request)
        .await
        .expect("change")
        .into_inner();
    // Health checks must not produce spans.
    let mut health = HealthClient::new(
        rig.app
            .channel(&rig.pki, Some(&rig.pki.spiffe_client(CALLER)))
            .await
            .expect("mTLS"),
    );
    health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health");

    let server = receiver
        .wait_for_span("server", |s| {
            s.name == "credgate.v1.PasswordService/ChangePassword"
        })
        .await;
    assert_eq!(
        hex(&server.trace_id),
        TRACE_ID,
        "continues the caller's trace"
    );
    assert_eq!(hex(&server.parent_span_id), PARENT_SPAN_ID);
    assert_eq!(server.kind, SpanKind::Server as i32);
    let a = attrs(&server.attributes);
    assert_eq!(a["rpc.system"], "grpc");
    assert_eq!(a["rpc.service"], "credgate.v1.PasswordService");
    assert_eq!(a["rpc.method"], "ChangePassword");
    assert_eq!(a["rpc.grpc.status_code"], "0");
    assert_eq!(a["credgate.caller"], CALLER);
    assert_eq!(a["credgate.iam_user"], rig.user.name);
    assert!(!a.contains_key("error.type"));

    // credgate's CLIENT span; the SDK's own operation span has the same name
    // and nests inside it.
    let iam = receiver
        .wait_for_span("IAM child", |s| {
            s.name == "IAM.ChangePassword" && s.kind == SpanKind::Client as i32
        })
        .await;
    assert_eq!(iam.trace_id, server.trace_id);
    assert_eq!(
        iam.parent_span_id, server.span_id,
        "IAM span is a child of the server span"
    );
    assert_eq!(iam.kind, SpanKind::Client as i32);
    let a = attrs(&iam.attributes);
    assert_eq!(a["rpc.system"], "aws-api");
    assert_eq!(a["rpc.service"], "IAM");
    assert_eq!(a["rpc.method"], "ChangePassword");
    assert_eq!(a["aws.request_id"], response.iam_request_id);
    assert_eq!(a["cloud.region"], "us-east-1");

    // The SDK's own spans nest under one of credgate's AWS CLIENT spans
    // (STS GetCallerIdentity verifying the key at its first use,
    // GetAccountPasswordPolicy for the policy pre-check, ChangePassword),
    // which are children of the server span: never at the root.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spans = receiver.spans();
    let by_id: std::collections::HashMap<_, _> =
        spans.iter().map(|s| (s.span_id.clone(), s)).collect();
    let is_ours = |s: &opentelemetry_proto::tonic::trace::v1::Span| {
        s.kind == SpanKind::Client as i32
            && (s.name.starts_with("IAM.") || s.name.starts_with("STS."))
            && s.parent_span_id == server.span_id
    };
    let sdk: Vec<_> = spans
        .iter()
        .filter(|s| s.trace_id == server.trace_id && s.span_id != server.span_id && !is_ours(s))
        .collect();
    assert!(
        sdk.iter().any(|s| s.name == "try_attempt"),
        "the SDK's spans are exported"
    );
    for span in &sdk {
        let mut cursor = *span;
        while !is_ours(cursor) {
            cursor = by_id.get(&cursor.parent_span_id).unwrap_or_else(|| {
                panic!("SDK span {} is not under an IAM client span", span.name)
            });
        }
    }
    // Nothing else: no health spans, no exporter transport spans.
    for span in &spans {
        assert!(
            !span.name.contains("Health"),
            "health traced: {}",
            span.name
        );
        assert_eq!(
            span.trace_id, server.trace_id,
            "unexpected trace from {}",
            span.name
        );
    }

    // Logs inside the span carry its ids; the audit record carries the trace.
    let audit = rig
        .app
        .wait_for_line("audit", |v| v["target"] == "credgate::audit")
        .await;
    assert_eq!(audit["trace_id"], TRACE_ID);
    assert_eq!(audit["caller"], CALLER);
    assert_eq!(audit["iam_user"], rig.user.name.as_str());
    assert_eq!(audit["outcome"], "OK");
    assert_eq!(audit["iam_request_id"], response.iam_request_id.as_str());
    assert!(
        audit["peer.address"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:"))
    );
    assert_eq!(audit["span_id"], hex(&server.span_id));
}

#[tokio::test]
async fn failures_set_error_type_and_server_faults_set_span_status_error() {
    let receiver = Receiver::start().await;
    let emulator = Emulator::shared();
    let user = emulator.standard_user("Failing-pass-1").await;
    let rig = Rig::for_user(emulator, CALLER, user, |s| {
        otel_env(s, &receiver.endpoint())
    });
    let mut client = rig.client().await;

    client
        .change_password(change("Wrong-pass-1", "Failing-pass-2"))
        .await
        .expect_err("wrong old password");
    let denied = receiver
        .wait_for_span("denied", |s| {
            attrs(&s.attributes).get("error.type").map(String::as_str)
                == Some("OLD_PASSWORD_INCORRECT")
        })
        .await;
    assert_eq!(attrs(&denied.attributes)["rpc.grpc.status_code"], "7");
    assert_ne!(
        denied.status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32),
        "PERMISSION_DENIED is the caller's fault, not the server's"
    );
    let iam = receiver
        .wait_for_span("failed IAM call", |s| {
            s.name == "IAM.ChangePassword"
                && s.kind == SpanKind::Client as i32
                && s.trace_id == denied.trace_id
        })
        .await;
    let exception = iam
        .events
        .iter()
        .find(|e| e.name == "exception")
        .expect("exception event on the IAM span");
    assert_eq!(
        attrs(&exception.attributes)["exception.type"],
        "InvalidUserType"
    );
    assert!(
        attrs(&iam.attributes)
            .get("aws.request_id")
            .is_some_and(|id| !id.is_empty())
    );

    emulator
        .fault(
            "ChangePassword",
            &rig.user.name,
            json!({"error": "ServiceFailure"}),
        )
        .await;
    client
        .change_password(change("Failing-pass-1", "Failing-pass-2"))
        .await
        .expect_err("IAM failure");
    let failed = receiver
        .wait_for_span("server fault", |s| {
            attrs(&s.attributes).get("error.type").map(String::as_str)
                == Some("IAM_SERVICE_FAILURE")
        })
        .await;
    assert_eq!(attrs(&failed.attributes)["rpc.grpc.status_code"], "14");
    assert_eq!(
        failed.status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32)
    );
    assert_ne!(
        failed.trace_id, denied.trace_id,
        "without a traceparent each call is a new trace"
    );
}

#[tokio::test]
async fn rpc_duration_and_iam_outcomes_are_exported_as_metrics() {
    let receiver = Receiver::start().await;
    let emulator = Emulator::shared();
    let user = emulator.standard_user("Metric-pass-1").await;
    let rig = Rig::for_user(emulator, CALLER, user, |s| {
        otel_env(s, &receiver.endpoint())
    });
    let mut client = rig.client().await;
    client
        .change_password(change("Metric-pass-1", "Metric-pass-2"))
        .await
        .expect("change");
    client
        .change_password(change("Wrong-pass-1", "Metric-pass-3"))
        .await
        .expect_err("wrong");

    let duration = receiver
        .wait_for_metric("rpc.server.duration", |m| match &m.data {
            Some(Data::Histogram(h)) => h.data_points.iter().any(|p| {
                attrs(&p.attributes)
                    .get("rpc.grpc.status_code")
                    .map(String::as_str)
                    == Some("7")
            }),
            _ => false,
        })
        .await;
    let Some(Data::Histogram(histogram)) = duration.data else {
        panic!("rpc.server.duration is a histogram");
    };
    let ok = histogram
        .data_points
        .iter()
        .find(|p| {
            attrs(&p.attributes)
                .get("rpc.grpc.status_code")
                .map(String::as_str)
                == Some("0")
        })
        .expect("a point for OK");
    let a = attrs(&ok.attributes);
    assert_eq!(a["rpc.method"], "ChangePassword");
    assert_eq!(a["rpc.service"], "credgate.v1.PasswordService");
    assert!(ok.count >= 1 && ok.sum.unwrap_or_default() > 0.0);

    let outcomes = receiver
        .wait_for_metric("credgate.iam.outcomes", |m| match &m.data {
            Some(Data::Sum(s)) => s.data_points.iter().any(|p| {
                attrs(&p.attributes)
                    .get("aws.error_code")
                    .map(String::as_str)
                    == Some("InvalidUserType")
            }),
            _ => false,
        })
        .await;
    let Some(Data::Sum(sum)) = outcomes.data else {
        panic!("credgate.iam.outcomes is a counter");
    };
    assert!(sum.data_points.iter().any(|p| {
        let a = attrs(&p.attributes);
        a.get("aws.error_code").map(String::as_str) == Some("OK")
            && a["rpc.method"] == "ChangePassword"
    }));
}

/// Two replicas exporting to one collector: every span and metric carries
/// its process's `service.instance.id` (the pod name when the Deployment's
/// downward-API variable sets it, a generated id otherwise), so that a
/// Prometheus exporter keeps their series apart.
#[tokio::test]
async fn two_processes_export_with_distinct_service_instance_ids() {
    let receiver = Receiver::start().await;
    let emulator = Emulator::shared();
    let user = emulator.standard_user("Twin-pass-1").await;
    let pki = Pki::new();
    let setup = || {
        otel_env(Setup::new(emulator, &pki), &receiver.endpoint())
            .caller(CallerEntry::spiffe(CALLER, &user))
    };
    // As deploy/kubernetes sets it: service.instance.id=$(POD_NAME).
    let pod = setup()
        .env(
            "OTEL_RESOURCE_ATTRIBUTES",
            "service.instance.id=credgate-7d9f8b6c5-x2k4q,k8s.pod.name=credgate-7d9f8b6c5-x2k4q",
        )
        .start();
    let bare = setup().start();
    let (first, second) = ("Twin-pass-1", "Twin-pass-2");
    for (app, old, new) in [(&pod, first, second), (&bare, second, first)] {
        app.client(&pki, &pki.spiffe_client(CALLER))
            .await
            .change_password(change(old, new))
            .await
            .expect("change");
    }
    let mut ids = std::collections::BTreeMap::<String, std::collections::BTreeSet<String>>::new();
    for _ in 0..100 {
        ids.clear();
        for (resource, name) in receiver.resources() {
            let id = resource
                .get("service.instance.id")
                .cloned()
                .unwrap_or_default();
            assert_eq!(resource["service.name"], "credgate-test", "{name}");
            ids.entry(id).or_default().insert(name);
        }
        let complete = |signals: &std::collections::BTreeSet<String>| {
            signals.contains("rpc.server.duration")
                && signals.contains("credgate.v1.PasswordService/ChangePassword")
        };
        if ids.len() == 2 && ids.values().all(complete) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let names: Vec<&String> = ids.keys().collect();
    assert_eq!(ids.len(), 2, "two instances, each its own id: {ids:?}");
    assert!(
        ids.contains_key("credgate-7d9f8b6c5-x2k4q"),
        "the pod name from OTEL_RESOURCE_ATTRIBUTES: {names:?}"
    );
    let generated = names
        .iter()
        .find(|id| id.as_str() != "credgate-7d9f8b6c5-x2k4q")
        .expect("the other id");
    assert!(
        uuid::Uuid::parse_str(generated).is_ok(),
        "a generated id without the variable: {generated:?}"
    );
    for (id, signals) in &ids {
        assert!(
            signals.contains("rpc.server.duration")
                && signals.contains("credgate.v1.PasswordService/ChangePassword"),
            "{id}: metrics and spans both carry it: {signals:?}"
        );
    }
}

#[tokio::test]
async fn an_unreachable_collector_adds_no_error_or_delay_to_an_rpc() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let emulator = Emulator::shared();
    let user = emulator.standard_user("Nocollector-pass-1").await;
    let pki = Pki::new();
    let mut app = otel_env(
        Setup::new(emulator, &pki),
        &format!("http://127.0.0.1:{port}"),
    )
    .caller(CallerEntry::spiffe(CALLER, &user))
    .start();
    let mut client = app.client(&pki, &pki.spiffe_client(CALLER)).await;
    for i in 0..5 {
        let started = Instant::now();
        client
            .change_password(change(
                &format!("Nocollector-pass-{}", i + 1),
                &format!("Nocollector-pass-{}", i + 2),
            ))
            .await
            .expect("the RPC succeeds without a collector");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
    app.terminate();
    let exit = app.wait_exit(Duration::from_secs(20)).await;
    assert!(exit.success(), "{exit:?}");
}

/// Passwords with every character an encoding treats specially (space, `!`,
/// `+`, `&`, `=`) and Latin-1 letters beyond ASCII, for every outcome: none
/// may appear, in any encoding ([`leak_of`]), in any log line at
/// `RUST_LOG=trace`, audit event, exported span or metric, or error.
#[tokio::test]
async fn no_password_appears_in_any_log_span_event_or_error() {
    let receiver = Receiver::start().await;
    // Private emulator: this test sets the account password policy.
    let emulator = Emulator::start();
    emulator.set_policy(12, true, true, true, true, None).await;
    const OLD: &str = "Leak Old+7f&a=9c!é";
    const NEW: &str = "Leak New+b8&d=2e!ü";
    let user = emulator.standard_user(OLD).await;
    let pki = Pki::new();
    let mut app = otel_env(Setup::new(&emulator, &pki), &receiver.endpoint())
        .caller(CallerEntry::spiffe(CALLER, &user))
        .toml("[limits]\nfailed_attempts = 2\n")
        // Everything credgate and the SDK log, at every level.
        .env("RUST_LOG", "trace")
        .start();
    let mut client = app.client(&pki, &pki.spiffe_client(CALLER)).await;
    let mut stranger = app
        .client(
            &pki,
            &pki.spiffe_client("spiffe://corp.example/ns/nobody/sa/nobody"),
        )
        .await;

    let mut secrets = Vec::new();
    let mut outcomes = Vec::new();
    let mut errors = Vec::new();
    // (old, new, validate_only, fault armed first, caller's grpc-timeout, from a stranger)
    type Step<'a> = (&'a str, &'a str, bool, Option<Value>, Option<&'a str>, bool);
    let steps: Vec<Step<'_>> = vec![
        (OLD, NEW, true, None, None, false),
        (OLD, NEW, false, None, None, false),
        (NEW, "Leak Bad+\u{2603}&c4=e1", false, None, None, false),
        (NEW, "leak w&=k+2f é", false, None, None, false),
        (
            NEW,
            "Leak Iam+new&77=aa!ß",
            false,
            Some(json!({"error": "ServiceFailure"})),
            None,
            false,
        ),
        (
            NEW,
            "Leak Slow+new&19=fe!ø",
            false,
            Some(json!({"delay_seconds": 1.0})),
            Some("300m"),
            false,
        ),
        (
            "Leak Who+8a&3e=5c!à",
            "Leak Who+new&2d=4b!ç",
            false,
            None,
            None,
            true,
        ),
        (
            "Leak Wrong+5d&0f=7a!î",
            "Leak Next+a9&9c=03!þ",
            false,
            None,
            None,
            false,
        ),
        (
            "Leak Wrong+6e&1a=8b!ÿ",
            "Leak Next+a9&9c=03!þ",
            false,
            None,
            None,
            false,
        ),
        (
            "Leak Locked+0c&7d=2e!ñ",
            "Leak Next+a9&9c=03!þ",
            false,
            None,
            None,
            false,
        ),
    ];
    for (old, new, validate_only, fault, timeout, from_stranger) in steps {
        secrets.extend([old.to_owned(), new.to_owned()]);
        if let Some(fault) = fault {
            emulator.fault("ChangePassword", &user.name, fault).await;
        }
        let mut request = Request::new(change(old, new));
        request.get_mut().validate_only = validate_only;
        if let Some(timeout) = timeout {
            request
                .metadata_mut()
                .insert("grpc-timeout", timeout.parse().expect("header"));
        }
        let caller = if from_stranger {
            &mut stranger
        } else {
            &mut client
        };
        match caller.change_password(request).await {
            Ok(_) => outcomes.push("OK".to_owned()),
            Err(status) => {
                outcomes.push(error_info(&status).0);
                errors.push(format!("{status:?} {}", status.message()));
            }
        }
        if timeout.is_some() {
            // The slow change goes on after its caller's deadline: wait for
            // its real outcome (a success, which resets the attempt limit)
            // so the lockout steps below count from a known state.
            app.wait_for_line("the slow change's real outcome", |v| {
                v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("IAM answered after the caller's deadline"))
            })
            .await;
        }
    }
    assert_eq!(
        outcomes,
        [
            "OK",
            "OK",
            "PASSWORD_INVALID",
            "PASSWORD_POLICY_VIOLATION",
            "IAM_SERVICE_FAILURE",
            "OUTCOME_UNKNOWN",
            "CALLER_NOT_MAPPED",
            "OLD_PASSWORD_INCORRECT",
            "OLD_PASSWORD_INCORRECT",
            "TOO_MANY_FAILED_ATTEMPTS",
        ],
        "every path ran"
    );
    // The awkward passwords really reached IAM and changed it (signed as sent).
    assert!(emulator.password_is(&user, "Leak Slow+new&19=fe!ø").await);

    // Let the exporter flush, then stop credgate so everything is written.
    tokio::time::sleep(Duration::from_millis(800)).await;
    app.terminate();
    assert!(app.wait_exit(Duration::from_secs(20)).await.success());
    let lines = app.lines();
    let spans = receiver.spans();
    let metrics = receiver.metrics();
    assert!(
        lines.len() > 50 && spans.len() > 10 && !metrics.is_empty(),
        "telemetry was captured"
    );
    // The SDK's trace level (where it formats whole requests) never runs.
    let sdk_trace: Vec<&String> = lines
        .iter()
        .filter(|l| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| {
                v["level"] == "TRACE" && v["target"].as_str().is_some_and(|t| t.starts_with("aws_"))
            })
        })
        .collect();
    assert!(
        sdk_trace.is_empty(),
        "aws_* trace lines at RUST_LOG=trace: {sdk_trace:?}"
    );
    let audits: Vec<String> = app
        .audit_events()
        .iter()
        .map(|a| a["outcome"].as_str().unwrap_or_default().to_owned())
        .collect();
    let expected: Vec<String> = outcomes
        .iter()
        .enumerate()
        .map(|(i, o)| match (i, o.as_str()) {
            (0, _) => "VALIDATED".to_owned(),
            // The caller was told OUTCOME_UNKNOWN at its deadline; the audit
            // records what IAM really did once it answered.
            (_, "OUTCOME_UNKNOWN") => "OK".to_owned(),
            _ => o.clone(),
        })
        .collect();
    assert_eq!(audits, expected, "exactly one audit event per attempt");

    let texts = lines
        .iter()
        .map(|l| ("log line", l.clone()))
        .chain(spans.iter().map(|s| ("exported span", span_text(s))))
        .chain(metrics.iter().map(|m| ("exported metric", metric_text(m))))
        .chain(errors.iter().map(|e| ("error", e.clone())));
    for (what, text) in texts {
        for secret in &secrets {
            if let Some(form) = leak_of(&text, secret) {
                panic!("password {secret:?} in a {what}, {form}: {text}");
            }
        }
    }
}

/// The search above is only as good as [`leak_of`]: it must see a password
/// through every encoding a dependency could apply.
#[test]
fn the_leak_search_sees_through_every_encoding() {
    let secret = "Leak New+b8&d=2e!ü";
    let percent = "Leak%20New%2Bb8%26d%3D2e%21%C3%BC";
    let body = format!("Action=ChangePassword&NewPassword={percent}&Version=2010-05-08");
    let leaks = [
        format!(r#"{{"message":"x","password":"{secret}"}}"#),
        percent.to_owned(),
        "Leak%20New%2bb8%26d%3d2e%21%c3%bc".to_owned(),
        "Leak+New%2Bb8%26d%3D2e%21%C3%BC".to_owned(),
        "Leak+New%2Bb8&d=2e!\u{fc}".to_owned(),
        "4c65616b204e65772b623826643d326521c3bc".to_owned(),
        "4C65616B204E65772B623826643D326521C3BC".to_owned(),
        format!("{:?}", body.as_bytes()),
        format!("Once(Some(b\"{}\"))", body.as_bytes().escape_ascii()),
        r"Leak New+b8&d=2e!\u00fc".to_owned(),
        format!("{:?}", secret.as_bytes()),
        // A Debug of a Debug (SdkBody's bytes inside a field), in a JSON line.
        serde_json::to_string(&format!(
            "SdkBody {{ inner: {:?} }}",
            body.as_bytes().escape_ascii().to_string()
        ))
        .expect("JSON"),
    ];
    for leak in &leaks {
        assert!(leak_of(leak, secret).is_some(), "not found in {leak}");
    }
    for clean in [
        "Leak New+b8&d=2e!u",
        "Leak%20New%2Bb8%26d%3D2e%21",
        "NewPassword=REDACTED",
        "[76, 101, 97, 107]",
    ] {
        assert_eq!(leak_of(clean, secret), None, "{clean}");
    }
}

#[tokio::test]
async fn buffered_spans_are_flushed_on_shutdown() {
    let receiver = Receiver::start().await;
    let emulator = Emulator::shared();
    let user = emulator.standard_user("Flush-pass-1").await;
    // A batch delay far beyond the test: only the shutdown flush can deliver.
    let mut rig = Rig::for_user(emulator, CALLER, user, |s| {
        otel_env(s, &receiver.endpoint()).env("OTEL_BSP_SCHEDULE_DELAY", "600000")
    });
    rig.change("Flush-pass-1", "Flush-pass-2")
        .await
        .expect("change");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !receiver
            .spans()
            .iter()
            .any(|s| s.name == "credgate.v1.PasswordService/ChangePassword"),
        "exported before shutdown: the batch delay did not apply"
    );
    rig.app.terminate();
    assert!(rig.app.wait_exit(Duration::from_secs(20)).await.success());
    receiver
        .wait_for_span("flushed at shutdown", |s| {
            s.name == "credgate.v1.PasswordService/ChangePassword"
        })
        .await;
}

/// `deploy/observability/metrics.json`: the metric contract of the operator
/// kit (alert rules and dashboard are checked against it in tests/deploy).
fn operator_kit_metrics() -> Value {
    let text = std::fs::read_to_string(repo().join("deploy/observability/metrics.json"))
        .expect("metrics.json");
    serde_json::from_str(&text).expect("metrics.json is JSON")
}

#[tokio::test]
async fn every_metric_the_operator_kit_names_is_exported_and_nothing_else() {
    let receiver = Receiver::start().await;
    let emulator = Emulator::shared();
    let mut redis = Redis::start();
    let user = emulator.standard_user("Kit-pass-1").await;
    let pki = Pki::new();
    let app = otel_env(Setup::new(emulator, &pki), &receiver.endpoint())
        .caller(CallerEntry::spiffe(CALLER, &user))
        .toml("[limits]\nfailed_attempts = 1\n")
        .redis(&redis)
        .crl(pki.ca.crl(&[]).expect("CRL"))
        .start();
    let channel = app
        .channel(&pki, Some(&pki.spiffe_client(CALLER)))
        .await
        .expect("mTLS");
    let mut client =
        credgate::api::password_service_client::PasswordServiceClient::new(channel.clone());
    let id = request_id();
    for _ in 0..2 {
        // Changed, then replayed from the store.
        client
            .change_password(change_with_id("Kit-pass-1", "Kit-pass-2", &id))
            .await
            .expect("changed");
    }
    client
        .change_password(change("Kit-wrong-1", "Kit-pass-3"))
        .await
        .expect_err("wrong");
    client
        .change_password(change("Kit-wrong-2", "Kit-pass-3"))
        .await
        .expect_err("refused by the limit");
    // A made-up method: named _OTHER, never by its path.
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let status = grpc
        .unary::<_, credgate::api::GetPasswordPolicyResponse, _>(
            Request::new(credgate::api::GetPasswordPolicyRequest {}),
            http::uri::PathAndQuery::from_static("/credgate.v1.PasswordService/Bogus-0x41"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .expect_err("no such method");
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    redis.stop();
    client
        .change_password(change("Kit-pass-2", "Kit-pass-3"))
        .await
        .expect_err("store down");

    let kit = operator_kit_metrics();
    let series = kit["series"].as_array().expect("series");
    for entry in series {
        let name = entry["otel_name"].as_str().expect("otel_name");
        receiver.wait_for_metric(name, |_| true).await;
    }
    let named: Vec<&str> = series
        .iter()
        .filter_map(|e| e["otel_name"].as_str())
        .collect();
    for metric in receiver.metrics() {
        assert!(
            named.contains(&metric.name.as_str()),
            "{} is exported but missing from metrics.json",
            metric.name
        );
    }

    // Labels: the error reason on failures, _OTHER for unknown methods, and
    // every attribute metrics.json promises.
    let duration = receiver
        .wait_for_metric("rpc.server.duration", |m| match &m.data {
            Some(Data::Histogram(h)) => h.data_points.iter().any(|p| {
                attrs(&p.attributes).get("error.type").map(String::as_str)
                    == Some("STATE_UNAVAILABLE")
            }),
            _ => false,
        })
        .await;
    let Some(Data::Histogram(histogram)) = duration.data else {
        panic!("a histogram");
    };
    let methods: Vec<String> = histogram
        .data_points
        .iter()
        .map(|p| attrs(&p.attributes)["rpc.method"].clone())
        .collect();
    assert!(methods.iter().any(|m| m == "_OTHER"), "{methods:?}");
    assert!(
        !methods.iter().any(|m| m.contains("Bogus")),
        "a made-up path became a label: {methods:?}"
    );
    let known_reasons: Vec<&str> = series[0]["attributes"]["error.type"]["values"]
        .as_array()
        .expect("values")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for point in &histogram.data_points {
        if let Some(reason) = attrs(&point.attributes).get("error.type") {
            assert!(known_reasons.contains(&reason.as_str()), "{reason}");
        }
    }
    let other = receiver
        .wait_for_span("the _OTHER span", |s| s.name.ends_with("/_OTHER"))
        .await;
    assert_eq!(
        other.name, "credgate.v1.PasswordService/_OTHER",
        "span names are a closed set"
    );
    for entry in series {
        let name = entry["otel_name"].as_str().expect("name");
        let Some(wanted) = entry["attributes"].as_object() else {
            continue;
        };
        let metric = receiver.wait_for_metric(name, |_| true).await;
        let points: Vec<_> = match &metric.data {
            Some(Data::Histogram(h)) => {
                h.data_points.iter().map(|p| attrs(&p.attributes)).collect()
            }
            Some(Data::Sum(s)) => s.data_points.iter().map(|p| attrs(&p.attributes)).collect(),
            Some(Data::Gauge(g)) => g.data_points.iter().map(|p| attrs(&p.attributes)).collect(),
            other => panic!("{name}: unexpected data {other:?}"),
        };
        for (key, spec) in wanted {
            if spec["optional"] == true {
                continue;
            }
            assert!(
                points.iter().all(|p| p.contains_key(key)),
                "{name} lacks attribute {key}"
            );
        }
    }
    // The CRL written above is valid for seven days.
    let crl = receiver
        .wait_for_metric("credgate.tls.crl.expires_in", |_| true)
        .await;
    let Some(Data::Gauge(gauge)) = crl.data else {
        panic!("credgate.tls.crl.expires_in is a gauge");
    };
    let seconds = match gauge.data_points.last().and_then(|p| p.value) {
        Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(s)) => s,
        other => panic!("seconds as an integer: {other:?}"),
    };
    assert!(
        (7 * 86400 - 600..=7 * 86400).contains(&seconds),
        "a CRL valid for 7 days expires in {seconds} s"
    );
    assert_eq!(crl.unit, "s");
}
