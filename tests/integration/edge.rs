//! The edge as a certificate holder would try it: leaf rules, bounded names,
//! X.509-SVID identity, chains through intermediates with CRLs, and the
//! per-caller cap. (Raw HTTP/2 abuse is in tests/edge, in Python h2.)

use std::time::Duration;

use credgate::devpki::{ClientSpec, LeafDefects};
use serde_json::json;
use tonic::Code;

use crate::harness::*;

const CALLER: &str = "spiffe://corp.example/ns/edge/sa/edge";

#[tokio::test]
async fn client_certificates_that_break_the_leaf_rules_fail_the_handshake() {
    let emulator = Emulator::shared();
    let rig = Rig::new(emulator, CALLER, "Leaf-pass-1").await;
    let with = |defects: LeafDefects| ClientSpec {
        defects,
        ..ClientSpec::spiffe(CALLER)
    };
    let cases = [
        (
            with(LeafDefects {
                no_extended_key_usage: true,
                ..LeafDefects::default()
            }),
            "clientauth",
        ),
        (
            with(LeafDefects {
                key_cert_sign: true,
                ..LeafDefects::default()
            }),
            "keycertsign",
        ),
        (
            with(LeafDefects {
                no_basic_constraints: true,
                ..LeafDefects::default()
            }),
            "basicconstraints",
        ),
        (
            ClientSpec {
                dns_names: (0..2000).map(|i| format!("n{i}.corp.example")).collect(),
                ..ClientSpec::default()
            },
            "subject alternative names",
        ),
        (
            ClientSpec {
                common_name: Some("c".repeat(300)),
                ..ClientSpec::default()
            },
            "cn is 300 bytes",
        ),
    ];
    for (spec, reason) in cases {
        let client = rig.pki.client(&spec);
        rig.app
            .expect_handshake_rejected(&rig.pki, Some(&client), reason)
            .await;
    }
    assert_eq!(emulator.calls("ChangePassword", &rig.user.name).await, 0);
    // A rejected certificate's names are not logged: no line grows with them.
    assert!(
        rig.app.lines().iter().all(|l| l.len() < 4096),
        "a log line carries the certificate's names"
    );
}

#[tokio::test]
async fn an_svid_is_identified_by_its_spiffe_id_alone() {
    let emulator = Emulator::shared();
    let by_cn = emulator.standard_user("Svid-pass-1").await;
    let pki = Pki::new();
    let mut cn_entry = CallerEntry::spiffe("unused", &by_cn);
    cn_entry.matcher = "common_name = \"batch-job\"".into();
    let app = Setup::new(emulator, &pki).caller(cn_entry).start();
    for spec in [
        ClientSpec {
            uris: vec!["spiffe://corp.example/ns/evil/sa/evil".into()],
            common_name: Some("batch-job".into()),
            ..ClientSpec::default()
        },
        ClientSpec {
            uris: vec!["spiffe://corp.example/ns/evil/sa/evil".into()],
            dns_names: vec!["batch-job".into()],
            ..ClientSpec::default()
        },
    ] {
        let status = app
            .client(&pki, &pki.client(&spec))
            .await
            .change_password(change("Svid-pass-1", "Svid-pass-2"))
            .await
            .expect_err("an SVID is its SPIFFE ID");
        expect_error(&status, Code::PermissionDenied, "CALLER_NOT_MAPPED");
    }
    assert_eq!(emulator.calls("ChangePassword", &by_cn.name).await, 0);

    // Identity data in errors and logs is bounded, and logged once per call.
    let many = ClientSpec {
        dns_names: (0..32)
            .map(|i| format!("name-{i:02}.corp.example"))
            .collect(),
        ..ClientSpec::default()
    };
    let status = app
        .client(&pki, &pki.client(&many))
        .await
        .change_password(change("Svid-pass-1", "Svid-pass-2"))
        .await
        .expect_err("unmapped");
    let metadata = expect_error(&status, Code::PermissionDenied, "CALLER_NOT_MAPPED");
    assert!(metadata["peerIdentity"].len() <= 300, "{metadata:?}");
    assert!(metadata["peerIdentity"].ends_with("(truncated)"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mentions = app
        .lines()
        .iter()
        .filter(|l| l.contains("name-00.corp.example"))
        .count();
    assert_eq!(mentions, 2, "one rejection line and one audit event");
}

#[tokio::test]
async fn a_chain_through_an_intermediate_works_with_a_crl_for_each_ca() {
    let emulator = Emulator::shared();
    let user = emulator.standard_user("Chain-pass-1").await;
    let pki = Pki::new();
    let intermediate = pki
        .ca
        .intermediate("credgate test issuing CA")
        .expect("intermediate");
    let good = intermediate
        .client(&ClientSpec::spiffe(CALLER))
        .expect("client");
    let revoked = intermediate
        .client(&ClientSpec::spiffe(CALLER))
        .expect("client");
    let root_crl = pki.ca.crl(&[]).expect("root CRL");
    let issuing_crl = intermediate.crl(&[&revoked]).expect("issuing CRL");

    // Both CRLs (one file, two PEM blocks): the chain is checked end to end.
    let mut setup = Setup::new(emulator, &pki).caller(CallerEntry::spiffe(CALLER, &user));
    setup.crl_pem = Some(format!("{root_crl}{issuing_crl}"));
    let app = setup.start();
    app.client(&pki, &good)
        .await
        .change_password(change("Chain-pass-1", "Chain-pass-2"))
        .await
        .expect("a valid chain through an intermediate");
    app.expect_handshake_rejected(&pki, Some(&revoked), "revoked")
        .await;

    // Only the root's CRL: the intermediate's leaves are refused (fail
    // closed), with a log line naming the issuer whose CRL is missing.
    let mut setup = Setup::new(emulator, &pki).caller(CallerEntry::spiffe(CALLER, &user));
    setup.crl_pem = Some(root_crl);
    let app = setup.start();
    app.expect_handshake_rejected(&pki, Some(&good), "credgate test issuing ca")
        .await;
    assert!(emulator.password_is(&user, "Chain-pass-2").await);
}

#[tokio::test]
async fn a_caller_over_its_in_flight_cap_is_refused_at_once_and_others_are_not() {
    let emulator = Emulator::shared();
    let busy = emulator.standard_user("Cap-pass-1").await;
    let calm = emulator.standard_user("Cap-pass-1").await;
    let pki = Pki::new();
    let (a, b) = (
        "spiffe://corp.example/ns/a/sa/a",
        "spiffe://corp.example/ns/b/sa/b",
    );
    let app = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(a, &busy))
        .caller(CallerEntry::spiffe(b, &calm))
        .server_toml("max_requests_per_caller = 1")
        .start();
    emulator
        .fault("ChangePassword", &busy.name, json!({"delay_seconds": 1.5}))
        .await;
    let mut client_a = app.client(&pki, &pki.spiffe_client(a)).await;
    let slow = {
        let mut client = client_a.clone();
        tokio::spawn(async move {
            client
                .change_password(change("Cap-pass-1", "Cap-pass-2"))
                .await
        })
    };
    for _ in 0..100 {
        if emulator.calls("ChangePassword", &busy.name).await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = std::time::Instant::now();
    let status = client_a
        .get_password_policy(credgate::api::GetPasswordPolicyRequest {})
        .await
        .expect_err("over the cap");
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "refused at once, not after the slow call (1.5 s)"
    );
    expect_error(
        &status,
        Code::ResourceExhausted,
        "CALLER_CONCURRENCY_EXCEEDED",
    );
    app.client(&pki, &pki.spiffe_client(b))
        .await
        .change_password(change("Cap-pass-1", "Cap-pass-2"))
        .await
        .expect("another caller is not affected");
    slow.await.expect("join").expect("the slow call completes");
}

#[tokio::test]
async fn no_stream_outlives_request_timeout() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    let emulator = Emulator::shared();
    let rig = Rig::for_user(
        emulator,
        CALLER,
        emulator.standard_user("Stream-pass-1").await,
        |s| s.server_toml("request_timeout = \"2s\""),
    );
    let channel = rig
        .app
        .channel(&rig.pki, Some(&rig.pki.spiffe_client(CALLER)))
        .await
        .expect("mTLS");
    // A reflection stream that sends nothing and is never closed.
    let (_keep_open, requests) = tokio::sync::mpsc::channel(1);
    let started = std::time::Instant::now();
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(requests))
        .await
        .expect("stream opened")
        .into_inner();
    let ended = tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .expect("the server ends the stream");
    let status = ended.expect_err("ended with a status");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1500) && elapsed < Duration::from_secs(4),
        "cut at request_timeout: {elapsed:?}"
    );
}

#[tokio::test]
async fn an_expired_crl_refuses_handshakes_and_names_itself_and_check_config_fails_on_it() {
    use std::time::SystemTime;
    let emulator = Emulator::shared();
    let user = emulator.standard_user("Crl-pass-1").await;
    let pki = Pki::new();
    let client = pki.spiffe_client(CALLER);
    let day = Duration::from_secs(24 * 3600);
    // One day past nextUpdate (the reproduction).
    let expired = pki
        .ca
        .crl_until(&[], SystemTime::now() - day)
        .expect("expired CRL");

    let mut setup = Setup::new(emulator, &pki).caller(CallerEntry::spiffe(CALLER, &user));
    setup.crl_pem = Some(expired);
    let (dir, config) = setup.write();
    let (code, _, stderr) = check_config(dir.path(), &config, false);
    assert_eq!(
        code,
        Some(64),
        "check-config accepts an expired CRL:\n{stderr}"
    );
    assert!(
        stderr.contains("tls.crl: the CRL of issuer") && stderr.contains("expired at"),
        "{stderr}"
    );
    // serve still starts (a fresh CRL may be mounted without a restart),
    // says so, and refuses every certificate the CRL covers.
    let app = Credgate::spawn(dir, &config, &setup.env);
    app.wait_for_line("the expired CRL at start-up", |v| {
        v["level"] == "ERROR"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.contains("credgate test CA") && m.contains("expired at"))
    })
    .await;
    app.expect_handshake_rejected(&pki, Some(&client), "expired at")
        .await;
    assert!(
        app.lines()
            .iter()
            .any(|l| l.contains("TLS handshake rejected")
                && l.contains("the CRL of issuer")
                && l.contains("CN=credgate test CA")),
        "the rejection names the expired CRL"
    );
    assert_eq!(emulator.calls("ChangePassword", &user.name).await, 0);

    // A fresh CRL swapped in on disk (no restart) is used again.
    rewrite(
        &app.dir.path().join("ca.crl"),
        &pki.ca.crl(&[]).expect("fresh CRL"),
    );
    app.wait_for_line("the reload", |v| {
        v["message"] == "TLS certificates reloaded"
    })
    .await;
    app.client(&pki, &client)
        .await
        .change_password(change("Crl-pass-1", "Crl-pass-2"))
        .await
        .expect("a fresh CRL lets the certificate through");

    // Within a day of nextUpdate: a warning, not a failure.
    let mut setup = Setup::new(emulator, &pki).caller(CallerEntry::spiffe(CALLER, &user));
    setup.crl_pem = Some(
        pki.ca
            .crl_until(&[], SystemTime::now() + Duration::from_secs(3 * 3600))
            .expect("CRL"),
    );
    let (dir, config) = setup.write();
    let (code, stdout, stderr) = check_config(dir.path(), &config, false);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("OK"), "{stdout}");
    assert!(
        stderr.contains("warning: tls.crl: the CRL of issuer") && stderr.contains("expires at"),
        "no warning for a CRL expiring within 24 h:\n{stderr}"
    );
    // A week away: nothing to say.
    let mut setup = Setup::new(emulator, &pki).caller(CallerEntry::spiffe(CALLER, &user));
    setup.crl_pem = Some(pki.ca.crl(&[]).expect("CRL"));
    let (dir, config) = setup.write();
    let (code, _, stderr) = check_config(dir.path(), &config, false);
    assert_eq!((code, stderr.as_str()), (Some(0), ""));
}
