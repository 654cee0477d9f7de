//! mTLS, identity mapping, forwarding to IAM, health, reflection, CLI.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use credgate::devpki::{Authority, ClientSpec};
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::harness::*;

const PORTAL: &str = "spiffe://corp.example/ns/portal/sa/portal";

#[tokio::test]
async fn a_password_really_changes_and_can_be_changed_back() {
    let emulator = Emulator::shared();
    let rig = Rig::new(emulator, PORTAL, "Original-pass-1").await;
    let mut client = rig.client().await;

    let response = client
        .change_password(change("Original-pass-1", "Changed-pass-2"))
        .await
        .expect("change")
        .into_inner();
    assert_eq!(response.iam_user, rig.user.name);
    assert!(
        !response.iam_request_id.is_empty(),
        "IAM's request id is returned"
    );
    assert!(!response.replayed, "a first call is not a replay");
    #[allow(deprecated)]
    let legacy = response.request_id.clone();
    assert_eq!(
        legacy, response.iam_request_id,
        "the deprecated field still carries IAM's request id"
    );
    assert!(emulator.password_is(&rig.user, "Changed-pass-2").await);
    assert!(!emulator.password_is(&rig.user, "Original-pass-1").await);

    client
        .change_password(change("Changed-pass-2", "Original-pass-1"))
        .await
        .expect("change back with the new password");
    assert!(emulator.password_is(&rig.user, "Original-pass-1").await);
}

/// Every character a query or form encoding treats specially, and Latin-1
/// letters beyond ASCII: IAM's signature covers the body as sent (`%20`),
/// and the password that arrives is the one the caller chose.
#[tokio::test]
async fn passwords_with_spaces_form_characters_and_latin_1_change_and_change_back() {
    let emulator = Emulator::shared();
    let first = "Plain-pass-1";
    let rig = Rig::new(emulator, PORTAL, first).await;
    let mut client = rig.client().await;
    let awkward = [
        "with space 1",
        "a+b&c=d e!f",
        "100% sure?+",
        "Ünïcødé Lätîn-1 ÿ\u{a0}ß",
        " leading and trailing ",
        "%20 not a space %2B",
    ];
    let mut current = first.to_owned();
    for new in awkward {
        client
            .change_password(change(&current, new))
            .await
            .unwrap_or_else(|e| panic!("change to {new:?}: {e:?}"));
        assert!(
            emulator.password_is(&rig.user, new).await,
            "IAM holds another password than {new:?}"
        );
        current = new.to_owned();
    }
    client
        .change_password(change(&current, first))
        .await
        .expect("and back");
    assert!(emulator.password_is(&rig.user, first).await);
}

#[tokio::test]
async fn a_wrong_old_password_is_permission_denied() {
    let emulator = Emulator::shared();
    let rig = Rig::new(emulator, PORTAL, "Right-pass-1").await;
    let mut client = rig.client().await;

    let status = client
        .change_password(change("Wrong-pass-1", "Next-pass-2"))
        .await
        .expect_err("wrong old password");
    let metadata = expect_error(&status, Code::PermissionDenied, "OLD_PASSWORD_INCORRECT");
    assert_eq!(metadata["awsErrorCode"], "InvalidUserType");
    assert!(!metadata["awsRequestId"].is_empty());
    assert!(
        emulator.password_is(&rig.user, "Right-pass-1").await,
        "nothing changed"
    );
}

#[tokio::test]
async fn an_unmapped_caller_is_denied_and_iam_is_never_called() {
    let emulator = Emulator::shared();
    let rig = Rig::new(emulator, PORTAL, "Some-pass-1").await;
    // Same trust domain, and a prefix of a mapped ID: neither may match.
    for id in [
        "spiffe://corp.example/ns/other/sa/other",
        "spiffe://corp.example/ns/portal/sa",
    ] {
        let mut client = rig.app.client(&rig.pki, &rig.pki.spiffe_client(id)).await;
        let status = client
            .change_password(change("Some-pass-1", "Other-pass-2"))
            .await
            .expect_err("unmapped");
        let metadata = expect_error(&status, Code::PermissionDenied, "CALLER_NOT_MAPPED");
        assert!(metadata["peerIdentity"].contains(id), "{metadata:?}");
        let status = client
            .get_password_policy(credgate::api::GetPasswordPolicyRequest {})
            .await
            .expect_err("unmapped");
        expect_error(&status, Code::PermissionDenied, "CALLER_NOT_MAPPED");
    }
    assert_eq!(
        emulator
            .calls("GetAccountPasswordPolicy", &rig.user.name)
            .await,
        0
    );
    assert_eq!(emulator.calls("ChangePassword", &rig.user.name).await, 0);
    assert!(emulator.password_is(&rig.user, "Some-pass-1").await);
}

#[tokio::test]
async fn dns_and_common_name_callers_are_matched_exactly_and_several_uri_sans_are_rejected() {
    let emulator = Emulator::shared();
    let by_dns = emulator.standard_user("Dns-pass-1").await;
    let by_cn = emulator.standard_user("Cn-pass-1").await;
    let pki = Pki::new();
    let mut dns_entry = CallerEntry::spiffe("unused", &by_dns);
    dns_entry.matcher = "dns_name = \"worker.corp.example\"".into();
    let mut cn_entry = CallerEntry::spiffe("unused", &by_cn);
    cn_entry.matcher = "common_name = \"batch-job\"".into();
    let app = Setup::new(emulator, &pki)
        .caller(dns_entry)
        .caller(cn_entry)
        .start();

    let dns_client = ClientSpec {
        dns_names: vec!["other.corp.example".into(), "worker.corp.example".into()],
        ..ClientSpec::default()
    };
    let cn_client = ClientSpec {
        common_name: Some("batch-job".into()),
        ..ClientSpec::default()
    };
    for (spec, user, old, new) in [
        (dns_client, &by_dns, "Dns-pass-1", "Dns-pass-2"),
        (cn_client, &by_cn, "Cn-pass-1", "Cn-pass-2"),
    ] {
        let mut client = app.client(&pki, &pki.client(&spec)).await;
        let out = client
            .change_password(change(old, new))
            .await
            .unwrap_or_else(|s| panic!("{spec:?}: {s:?}"))
            .into_inner();
        assert_eq!(out.iam_user, user.name, "{spec:?}");
    }

    let two_uris = pki.client(&ClientSpec {
        uris: vec!["spiffe://a/b".into(), "spiffe://c/d".into()],
        common_name: Some("batch-job".into()),
        ..ClientSpec::default()
    });
    let mut client = app.client(&pki, &two_uris).await;
    let status = client
        .change_password(change("Cn-pass-2", "Cn-pass-3"))
        .await
        .expect_err("several URI SANs");
    expect_error(&status, Code::PermissionDenied, "CALLER_NOT_MAPPED");
}

/// Without a client certificate the TLS 1.3 handshake completes on the
/// client's side; the server's rejection arrives with the first RPC.
#[tokio::test]
async fn a_client_without_a_certificate_cannot_call() {
    let emulator = Emulator::shared();
    let rig = Rig::new(emulator, PORTAL, "Some-pass-1").await;
    rig.app
        .expect_handshake_rejected(&rig.pki, None, "certificate")
        .await;
    assert_eq!(emulator.calls("ChangePassword", &rig.user.name).await, 0);
}

#[tokio::test]
async fn a_certificate_from_another_ca_fails_the_handshake() {
    let emulator = Emulator::shared();
    let rig = Rig::new(emulator, PORTAL, "Some-pass-1").await;
    let stranger = Authority::new("someone else's CA").expect("CA");
    let forged = stranger.client(&ClientSpec::spiffe(PORTAL)).expect("cert");
    // rustls names the cause: the issuer is unknown.
    rig.app
        .expect_handshake_rejected(&rig.pki, Some(&forged), "issuer")
        .await;
    assert_eq!(emulator.calls("ChangePassword", &rig.user.name).await, 0);
    assert!(emulator.password_is(&rig.user, "Some-pass-1").await);
}

#[tokio::test]
async fn a_revoked_client_certificate_fails_the_handshake() {
    let emulator = Emulator::shared();
    let user = emulator.standard_user("Some-pass-1").await;
    let pki = Pki::new();
    let revoked = pki.spiffe_client(PORTAL);
    let good = pki.spiffe_client(PORTAL);
    let mut setup = Setup::new(emulator, &pki).caller(CallerEntry::spiffe(PORTAL, &user));
    setup.crl_pem = Some(pki.ca.crl(&[&revoked]).expect("CRL"));
    let app = setup.start();

    let mut ok = app.client(&pki, &good).await;
    ok.change_password(change("Some-pass-1", "Other-pass-2"))
        .await
        .expect("an unrevoked certificate works");
    app.expect_handshake_rejected(&pki, Some(&revoked), "revoked")
        .await;
    assert!(emulator.password_is(&user, "Other-pass-2").await);
}

#[tokio::test]
async fn invalid_passwords_are_rejected_before_iam() {
    let emulator = Emulator::shared();
    let rig = Rig::new(emulator, PORTAL, "Valid-pass-1").await;
    let mut client = rig.client().await;
    let long = "a".repeat(129);
    let cases = [
        ("Valid-pass-1", "", "new_password"),
        ("", "Next-pass-2", "old_password"),
        ("Valid-pass-1", long.as_str(), "new_password"),
        ("Valid-pass-1", "snowman-\u{2603}", "new_password"),
        ("Valid-pass-1", "bell-\u{7}", "new_password"),
    ];
    for (old, new, field) in cases {
        let status = client
            .change_password(change(old, new))
            .await
            .expect_err("invalid");
        expect_error(&status, Code::InvalidArgument, "PASSWORD_INVALID");
        use tonic_types::StatusExt;
        let details = status.get_error_details();
        let bad = details.bad_request().expect("BadRequest");
        assert_eq!(bad.field_violations[0].field, field);
    }
    assert_eq!(emulator.calls("ChangePassword", &rig.user.name).await, 0);
}

#[tokio::test]
async fn oversized_and_undecodable_requests_are_refused_before_the_handler() {
    let emulator = Emulator::shared();
    let rig = Rig::new(emulator, PORTAL, "Valid-pass-1").await;
    let mut client = rig.client().await;
    let huge = "x".repeat(64 * 1024);
    let status = client
        .change_password(change("Valid-pass-1", &huge))
        .await
        .expect_err("oversized");
    expect_error(&status, Code::ResourceExhausted, "REQUEST_TOO_LARGE");

    /// Field 1 as a varint where ChangePasswordRequest has a string.
    #[derive(Clone, PartialEq, prost::Message)]
    struct NotARequest {
        #[prost(uint64, tag = "1")]
        old_password: u64,
    }
    let channel = rig
        .app
        .channel(&rig.pki, Some(&rig.pki.spiffe_client(PORTAL)))
        .await
        .expect("mTLS");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let status = grpc
        .unary::<_, credgate::api::ChangePasswordResponse, _>(
            tonic::Request::new(NotARequest { old_password: 7 }),
            http::uri::PathAndQuery::from_static("/credgate.v1.PasswordService/ChangePassword"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .expect_err("undecodable");
    expect_error(&status, Code::Internal, "REQUEST_MALFORMED");
    assert!(status.message().contains("wire type"), "{status:?}");
    assert_eq!(emulator.calls("ChangePassword", &rig.user.name).await, 0);
}

#[tokio::test]
async fn health_is_served_on_both_ports() {
    let emulator = Emulator::shared();
    let rig = Rig::new(emulator, PORTAL, "Valid-pass-1").await;
    let admin = tonic::transport::Channel::from_shared(format!("http://{}", rig.app.admin_addr))
        .expect("uri")
        .connect()
        .await
        .expect("plaintext admin port");
    let mtls = rig
        .app
        .channel(&rig.pki, Some(&rig.pki.spiffe_client(PORTAL)))
        .await
        .expect("mTLS");
    for channel in [admin.clone(), mtls] {
        let mut health = HealthClient::new(channel);
        for service in ["", "credgate.v1.PasswordService"] {
            let status = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .expect("health")
                .into_inner()
                .status();
            assert_eq!(status, ServingStatus::Serving, "{service:?}");
        }
    }
    // The admin port serves nothing but health.
    let status = credgate::api::password_service_client::PasswordServiceClient::new(admin)
        .change_password(change("Valid-pass-1", "Other-pass-2"))
        .await
        .expect_err("not on the admin port");
    assert_eq!(status.code(), Code::Unimplemented);
}

#[tokio::test]
async fn sigterm_turns_health_not_serving_and_lets_in_flight_calls_finish() {
    let emulator = Emulator::shared();
    let mut rig = Rig::new(emulator, PORTAL, "Drain-pass-1").await;
    let mut client = rig.client().await;
    emulator
        .fault(
            "ChangePassword",
            &rig.user.name,
            serde_json::json!({"delay_seconds": 1.5}),
        )
        .await;
    let call = tokio::spawn(async move {
        client
            .change_password(change("Drain-pass-1", "Drain-pass-2"))
            .await
    });
    for _ in 0..100 {
        if emulator.calls("ChangePassword", &rig.user.name).await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rig.app.terminate();
    let mut health = HealthClient::new(
        tonic::transport::Channel::from_shared(format!("http://{}", rig.app.admin_addr))
            .expect("uri")
            .connect()
            .await
            .expect("admin port still open while draining"),
    );
    // The signal is handled asynchronously: look (bounded) until the drain
    // shows, while the call is still in flight.
    let mut status = ServingStatus::Serving;
    let mut refused = false;
    for _ in 0..50 {
        status = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health")
            .into_inner()
            .status();
        refused = tokio::net::TcpStream::connect(rig.app.tls_addr)
            .await
            .is_err();
        if status == ServingStatus::NotServing && refused {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, ServingStatus::NotServing);
    assert!(refused, "new connections are refused while draining");
    assert!(
        !call.is_finished(),
        "all of this while the call is in flight"
    );
    call.await
        .expect("join")
        .expect("the in-flight call completes");
    let exit = rig.app.wait_exit(Duration::from_secs(10)).await;
    assert!(exit.success(), "{exit:?}");
    assert!(emulator.password_is(&rig.user, "Drain-pass-2").await);
}

fn run_grpcurl(args: &[&str]) -> String {
    let out = Command::new(venv_bin("grpcurl"))
        .args(args)
        .output()
        .expect("grpcurl (installed by the test command into .venv)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "grpcurl {args:?} failed:\n{text}");
    text
}

#[tokio::test]
async fn grpcurl_lists_the_services_through_reflection_and_changes_a_password() {
    let emulator = Emulator::shared();
    let user = emulator.standard_user("Grpcurl-pass-1").await;
    // The PKI comes from the CLI, as a user would make it.
    let pki_dir = tempfile::tempdir().expect("tempdir");
    let status = Command::new(credgate_bin())
        .args(["dev-pki", "--out"])
        .arg(pki_dir.path())
        .args(["--client", PORTAL])
        .status()
        .expect("dev-pki");
    assert!(status.success());
    let read = |name: &str| std::fs::read_to_string(pki_dir.path().join(name)).expect(name);
    let pki = Pki {
        ca: Authority::new("unused").expect("CA"),
        server: credgate::devpki::Authority::new("unused")
            .expect("CA")
            .server(&["unused".into()])
            .expect("server"),
    };
    let mut setup = Setup::new(emulator, &pki).caller(CallerEntry::spiffe(PORTAL, &user));
    let (dir, config) = {
        setup.crl_pem = Some(read("ca.crl"));
        setup.write()
    };
    // Swap in the CLI-made server certificate and CA.
    for (from, to) in [
        ("server.crt", "server.crt"),
        ("server.key", "server.key"),
        ("ca.crt", "ca.crt"),
    ] {
        std::fs::copy(pki_dir.path().join(from), dir.path().join(to)).expect("copy");
    }
    drop(setup);
    let app = Credgate::spawn(dir, &config, &[]);
    let addr = format!("127.0.0.1:{}", app.tls_addr.port());
    let tls = |extra: &[&str]| {
        let mut args = vec![
            "-cacert".to_owned(),
            pki_dir.path().join("ca.crt").display().to_string(),
            "-cert".to_owned(),
            pki_dir.path().join("client-1.crt").display().to_string(),
            "-key".to_owned(),
            pki_dir.path().join("client-1.key").display().to_string(),
            "-servername".to_owned(),
            "localhost".to_owned(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let list_args = tls(&[&addr, "list"]);
    let listed = run_grpcurl(&list_args.iter().map(String::as_str).collect::<Vec<_>>());
    for service in [
        "credgate.v1.PasswordService",
        "grpc.health.v1.Health",
        // grpcurl 1.8 asks through v1alpha; v1 is covered below.
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(listed.contains(service), "{service} not listed:\n{listed}");
    }
    let body = r#"{"old_password":"Grpcurl-pass-1","new_password":"Grpcurl-pass-2"}"#;
    let call_args = tls(&[
        "-d",
        body,
        &addr,
        "credgate.v1.PasswordService/ChangePassword",
    ]);
    let answer = run_grpcurl(&call_args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(answer.contains(&user.name), "{answer}");
    assert!(answer.contains("requestId"), "{answer}");
    assert!(emulator.password_is(&user, "Grpcurl-pass-2").await);
}

#[test]
fn check_config_reports_every_problem_at_once_with_exit_64() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        r#"
        [server]
        listen = "not-an-address"
        request_timeout = "10 parsecs"
        [tls]
        cert = "/nonexistent/tls.crt"
        key = "/nonexistent/tls.key"
        client_ca = "/nonexistent/ca.crt"
        [[callers]]
        spiffe_id = "spiffe://corp.example/a"
        common_name = "also-a"
        iam_user = "a"
        aws_profile = "a"
        [[callers]]
        dns_name = "b.example"
        iam_user = "b"
        aws_profile = "b"
        surprise = true
        "#,
    )
    .expect("write");
    let (code, _, stderr) = check_config(dir.path(), &config, false);
    assert_eq!(code, Some(64), "{stderr}");
    for needle in [
        "server.listen",
        "server.request_timeout",
        "callers[0]: needs exactly one of",
        "callers[1].surprise: unknown key",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?}:\n{stderr}");
    }
    assert!(stderr.contains("4 problem(s)"), "{stderr}");

    // A syntactically valid config whose files and profiles are missing.
    std::fs::write(
        &config,
        r#"
        [tls]
        cert = "/nonexistent/tls.crt"
        key = "/nonexistent/tls.key"
        client_ca = "/nonexistent/ca.crt"
        [[callers]]
        spiffe_id = "spiffe://corp.example/a"
        iam_user = "a"
        aws_profile = "no-such-profile"
        "#,
    )
    .expect("write");
    std::fs::write(
        dir.path().join("credentials"),
        "[other]\naws_access_key_id = x\naws_secret_access_key = y\n",
    )
    .expect("write");
    let (code, _, stderr) = check_config(dir.path(), &config, false);
    assert_eq!(code, Some(64), "{stderr}");
    for needle in [
        "tls.cert: cannot read",
        "tls.key: cannot read",
        "tls.client_ca: cannot read",
        "\"no-such-profile\"",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?}:\n{stderr}");
    }

    // serve refuses the same unreadable TLS files as a configuration
    // problem too (64, not 70): retrying cannot help, the files must change.
    let text = std::fs::read_to_string(&config).expect("read");
    let text =
        format!("[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{text}");
    std::fs::write(&config, text).expect("write");
    let mut serve = Command::new(credgate_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            dir.path().join("credentials"),
        )
        .env("AWS_CONFIG_FILE", dir.path().join("config"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = serve.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "serve kept running with unreadable TLS files"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    std::io::Read::read_to_string(&mut serve.stdout.take().expect("stdout"), &mut out)
        .expect("read");
    assert_eq!(status.code(), Some(64), "{out}");
    assert!(out.contains("tls.cert: cannot read"), "{out}");
}

#[tokio::test]
async fn check_config_accepts_a_good_config_and_online_verifies_the_iam_user() {
    let emulator = Emulator::shared();
    let user = emulator.standard_user("Check-pass-1").await;
    let other = emulator.standard_user("Check-pass-1").await;
    let pki = Pki::new();
    let mut wrong = CallerEntry::spiffe("spiffe://corp.example/wrong", &other);
    wrong.iam_user = "somebody-else".into();
    let setup = Setup::new(emulator, &pki).caller(CallerEntry::spiffe(PORTAL, &user));
    let (dir, config) = setup.write();
    let (code, stdout, stderr) = check_config(dir.path(), &config, false);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("OK"));
    let (code, _, stderr) = check_config(dir.path(), &config, true);
    assert_eq!(code, Some(0), "{stderr}");

    let (dir, config) = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(PORTAL, &user))
        .caller(wrong)
        .write();
    let (code, _, stderr) = check_config(dir.path(), &config, true);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains(&format!(
            ":user/{}, not as the configured IAM user \"somebody-else\"",
            other.name
        )),
        "{stderr}"
    );
}

#[test]
fn version_and_help_work_on_every_subcommand() {
    let out = Command::new(credgate_bin())
        .arg("--version")
        .output()
        .expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    for sub in ["serve", "check-config", "dev-pki"] {
        let out = Command::new(credgate_bin())
            .args([sub, "--help"])
            .output()
            .expect("run");
        assert!(out.status.success(), "{sub} --help");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{sub}"
        );
    }
    let out = Command::new(credgate_bin())
        .arg("no-such-command")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
}

#[tokio::test]
async fn reflection_v1_lists_every_service() {
    use tokio_stream::StreamExt;
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let emulator = Emulator::shared();
    let rig = Rig::new(emulator, PORTAL, "Valid-pass-1").await;
    let channel = rig
        .app
        .channel(&rig.pki, Some(&rig.pki.spiffe_client(PORTAL)))
        .await
        .expect("mTLS");
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection v1")
        .into_inner();
    let response = responses.next().await.expect("a response").expect("ok");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected {response:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for service in ["credgate.v1.PasswordService", "grpc.health.v1.Health"] {
        assert!(
            names.iter().any(|n| n == service),
            "{service} missing from {names:?}"
        );
    }
}

#[tokio::test]
async fn tls_files_are_reloaded_when_they_change_and_a_broken_update_keeps_serving() {
    let emulator = Emulator::shared();
    let rig = Rig::new(emulator, PORTAL, "Reload-pass-1").await;
    let ca_path = rig.app.dir.path().join("ca.crt");
    let old_client = rig.pki.spiffe_client(PORTAL);
    let new_ca = Authority::new("the next client CA").expect("CA");
    let new_client = new_ca.client(&ClientSpec::spiffe(PORTAL)).expect("cert");
    // A validate_only call: Ok when the handshake and the call succeed.
    let (app, pki) = (&rig.app, &rig.pki);
    let call = move |client: credgate::devpki::Issued| async move {
        let channel = app
            .channel(pki, Some(&client))
            .await
            .map_err(|e| e.to_string())?;
        let mut request = change("Reload-pass-1", "Reload-pass-2");
        request.validate_only = true;
        credgate::api::password_service_client::PasswordServiceClient::new(channel)
            .change_password(request)
            .await
            .map(|_| ())
            .map_err(|s| s.to_string())
    };
    let reissue = |ca: &Authority| ca.client(&ClientSpec::spiffe(PORTAL)).expect("cert");
    assert!(call(reissue(&rig.pki.ca)).await.is_ok());
    assert!(call(reissue(&new_ca)).await.is_err(), "not trusted yet");

    // A half-written rotation: credgate logs it and keeps the old files.
    rewrite(&ca_path, "-----BEGIN CERTIFICATE-----\ngarbage\n");
    rig.app
        .wait_for_line("the failed reload", |v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("still serving the previous certificates"))
        })
        .await;
    assert!(
        call(reissue(&rig.pki.ca)).await.is_ok(),
        "old CA still trusted"
    );

    // The real rotation: trust both CAs during the overlap.
    rewrite(
        &ca_path,
        &format!("{}{}", rig.pki.ca.cert_pem, new_ca.cert_pem),
    );
    rig.app
        .wait_for_line("the reload", |v| {
            v["message"] == "TLS certificates reloaded"
        })
        .await;
    assert!(
        call(new_client).await.is_ok(),
        "the new CA is trusted without a restart"
    );
    assert!(call(old_client).await.is_ok());
}

#[tokio::test]
async fn tls_1_2_and_1_3_clients_complete_the_mutual_handshake() {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
    let emulator = Emulator::shared();
    let rig = Rig::new(emulator, PORTAL, "Tls-pass-1").await;
    let client = rig.pki.spiffe_client(PORTAL);
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(rig.pki.ca.cert_pem.as_bytes()).expect("CA"))
            .expect("root");
        let config =
            rustls::ClientConfig::builder_with_provider(credgate::net::tls::crypto_provider())
                .with_protocol_versions(&[version])
                .expect("versions")
                .with_root_certificates(roots)
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(client.cert_pem.as_bytes()).expect("cert")],
                    PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes()).expect("key"),
                )
                .expect("client auth");
        let tcp = tokio::net::TcpStream::connect(rig.app.tls_addr)
            .await
            .expect("connect");
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(ServerName::try_from("localhost").expect("name"), tcp)
            .await
            .unwrap_or_else(|e| panic!("{version:?} handshake: {e}"));
        let (_, session) = tls.get_ref();
        assert_eq!(session.protocol_version(), Some(version.version));
        assert_eq!(
            session.alpn_protocol(),
            None,
            "ALPN is offered by the server only when asked"
        );
    }
}

#[tokio::test]
async fn buf_curl_calls_through_reflection_v1() {
    let emulator = Emulator::shared();
    let rig = Rig::new(emulator, PORTAL, "Bufcurl-pass-1").await;
    let client = rig.pki.spiffe_client(PORTAL);
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    };
    let (ca, cert, key) = (
        write("ca.crt", &rig.pki.ca.cert_pem),
        write("client.crt", &client.cert_pem),
        write("client.key", &client.key_pem),
    );
    let url = format!(
        "https://localhost:{}/credgate.v1.PasswordService/ChangePassword",
        rig.app.tls_addr.port()
    );
    let out = Command::new(repo().join("node_modules/.bin/buf"))
        .args([
            "curl",
            "--protocol",
            "grpc",
            "--reflect-protocol",
            "grpc-v1",
            "--cacert",
        ])
        .arg(&ca)
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .args([
            "-d",
            r#"{"old_password":"Bufcurl-pass-1","new_password":"Bufcurl-pass-2"}"#,
            &url,
        ])
        .output()
        .expect("buf (installed by the test command into node_modules)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&rig.user.name) && text.contains("requestId"),
        "{text}"
    );
    assert!(emulator.password_is(&rig.user, "Bufcurl-pass-2").await);
}

#[tokio::test]
async fn max_concurrent_requests_holds_further_calls_until_one_finishes() {
    let emulator = Emulator::shared();
    let first = emulator.standard_user("Limit-pass-1").await;
    let second = emulator.standard_user("Limit-pass-1").await;
    let pki = Pki::new();
    let (a, b) = (
        "spiffe://corp.example/ns/a/sa/a",
        "spiffe://corp.example/ns/b/sa/b",
    );
    let app = Setup::new(emulator, &pki)
        .caller(CallerEntry::spiffe(a, &first))
        .caller(CallerEntry::spiffe(b, &second))
        .server_toml("max_concurrent_requests = 1")
        .start();
    emulator
        .fault(
            "ChangePassword",
            &first.name,
            serde_json::json!({"delay_seconds": 1.5}),
        )
        .await;
    let mut client_a = app.client(&pki, &pki.spiffe_client(a)).await;
    let mut client_b = app.client(&pki, &pki.spiffe_client(b)).await;
    let slow = tokio::spawn(async move {
        client_a
            .change_password(change("Limit-pass-1", "Limit-pass-2"))
            .await
    });
    for _ in 0..100 {
        if emulator.calls("ChangePassword", &first.name).await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let queued = tokio::spawn(async move {
        client_b
            .change_password(change("Limit-pass-1", "Limit-pass-2"))
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        emulator
            .calls("GetAccountPasswordPolicy", &second.name)
            .await
            + emulator.calls("ChangePassword", &second.name).await,
        0,
        "the second call waits while the first holds the only slot"
    );
    slow.await.expect("join").expect("first call");
    queued
        .await
        .expect("join")
        .expect("the held call runs once the slot frees");
    assert!(emulator.password_is(&second, "Limit-pass-2").await);
}
