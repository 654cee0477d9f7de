//! `examples/change_password.rs` against a real credgate and the emulator,
//! so that the client a team copies can never rot.

use std::{path::PathBuf, process::Output};

use serde_json::json;

use crate::harness::*;

const CALLER: &str = "spiffe://corp.example/ns/example/sa/example";

/// The example binary `cargo test` builds beside the test binaries.
fn example_bin() -> PathBuf {
    let deps = std::env::current_exe().expect("test binary");
    let profile = deps
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>");
    let bin = profile.join("examples").join("change_password");
    assert!(
        bin.exists(),
        "{} is missing: `cargo build --examples` (scripts/test does) builds it",
        bin.display()
    );
    bin
}

/// Runs the example as `rig`'s caller; (exit code, stdout).
async fn run_example(rig: &Rig, old: &str, new: &str, args: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let client = rig.pki.spiffe_client(&rig.caller);
    let put = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    };
    let (ca, cert, key) = (
        put("ca.crt", &rig.pki.ca.cert_pem),
        put("client.crt", &client.chain_pem),
        put("client.key", &client.key_pem),
    );
    let mut cmd = tokio::process::Command::new(example_bin());
    cmd.arg("--target")
        .arg(format!("https://{}", rig.app.tls_addr))
        .arg("--ca")
        .arg(ca)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .args(args)
        .env("CREDGATE_OLD_PASSWORD", old)
        .env("CREDGATE_NEW_PASSWORD", new);
    let Output { status, stdout, .. } =
        tokio::time::timeout(std::time::Duration::from_secs(60), cmd.output())
            .await
            .expect("the example finishes")
            .expect("run the example");
    (status.code(), String::from_utf8_lossy(&stdout).into_owned())
}

#[tokio::test]
async fn the_rust_example_changes_a_password_and_explains_refusals() {
    let emulator = Emulator::shared();
    let rig = Rig::new(emulator, CALLER, "Example-pass-1").await;
    let (code, out) = run_example(&rig, "Example-pass-1", "Example-pass-2", &[]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!(
            "OK: password changed for IAM user {}",
            rig.user.name
        )),
        "{out}"
    );
    assert!(emulator.password_is(&rig.user, "Example-pass-2").await);

    let (code, out) = run_example(&rig, "Not-the-pass-1", "Example-pass-3", &[]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("OLD_PASSWORD_INCORRECT") && out.contains("not retrying"),
        "{out}"
    );
    assert_eq!(
        emulator.calls("ChangePassword", &rig.user.name).await,
        2,
        "a wrong old password is never retried"
    );
}

#[tokio::test]
async fn the_rust_example_lists_every_policy_violation() {
    // Private emulator: the account password policy is account-wide.
    let emulator = Emulator::start();
    emulator.set_policy(14, true, true, true, true, None).await;
    let rig = Rig::new(&emulator, CALLER, "Policy-Example-pass-1!").await;
    let (code, out) = run_example(&rig, "Policy-Example-pass-1!", "short", &[]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("PASSWORD_POLICY_VIOLATION"), "{out}");
    let rules = out
        .lines()
        .filter(|l| l.trim_start().starts_with("- new_password:"))
        .count();
    assert_eq!(rules, 4, "length, symbol, number, uppercase: {out}");
    assert_eq!(emulator.calls("ChangePassword", &rig.user.name).await, 0);
}

#[tokio::test]
async fn the_rust_example_resolves_outcome_unknown_with_the_same_request_id() {
    let emulator = Emulator::shared();
    let rig = Rig::new(emulator, CALLER, "Unknown-Example-1").await;
    emulator
        .fault(
            "ChangePassword",
            &rig.user.name,
            json!({"delay_seconds": 3.0}),
        )
        .await;
    let (code, out) = run_example(
        &rig,
        "Unknown-Example-1",
        "Unknown-Example-2",
        &["--timeout", "1"],
    )
    .await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("OUTCOME_UNKNOWN"), "{out}");
    assert!(out.contains("retrying with the same request_id"), "{out}");
    assert!(
        out.contains("OK: password changed") && out.contains("replayed from an earlier attempt"),
        "the retry's answer is the first attempt's stored outcome: {out}"
    );
    assert_eq!(
        emulator.calls("ChangePassword", &rig.user.name).await,
        1,
        "IAM saw the change once: {out}"
    );
    assert!(emulator.password_is(&rig.user, "Unknown-Example-2").await);
}
