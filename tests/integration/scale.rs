//! Many callers in one pod: credgate started with 10,000 configured callers
//! (exact entries and a few templates) reaches SERVING, and what the
//! configuration and identity side costs per caller. Bounds are generous
//! (a loaded CI machine, a debug build): the benchmark (docs/benchmark.md)
//! carries the real targets.

use std::time::{Duration, Instant};

use crate::harness::*;

/// Templates beside the exact entries, as a platform team would add them.
const TEMPLATES: &str = r#"
[[callers]]
spiffe_id = "spiffe://corp.example/tpl/{ns}/sa/{sa}"
iam_user = "svc-{ns}-{sa}"
aws_profile = "{ns}-{sa}"
[[callers]]
dns_name = "{svc}.apps.corp.example"
iam_user = "app-{svc}"
aws_profile = "app-{svc}"
[[callers]]
spiffe_id = "spiffe://corp.example/batch/{job}"
iam_user = "batch-{job}"
aws_profile = "batch-{job}"
"#;

/// How a run's callers hold their keys.
#[derive(Clone, Copy, Debug)]
enum Profiles {
    /// One profile (and IAM user) for every exact caller: one set of AWS
    /// clients, so what grows is the configuration and identity side.
    Shared,
    /// A profile per caller, as in production: one set of AWS clients
    /// each, built only when the caller (or key custody) uses it.
    PerCaller,
}

struct Started {
    serving_after: Duration,
    rss_kib: u64,
}

/// Starts credgate with `exact` exact callers plus the templates, and
/// measures the time from spawn to health SERVING and the RSS then.
async fn start(pki: &Pki, exact: usize, profiles: Profiles) -> Started {
    // AWS nobody listens on: key custody's sweep of every user's key
    // fails at once and sends nothing anywhere.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let mut setup = Setup::with_endpoint(&format!("http://{closed}"), pki).toml(TEMPLATES);
    for i in 0..exact {
        let (user, profile) = match profiles {
            Profiles::Shared => ("shared-user".to_owned(), "shared".to_owned()),
            Profiles::PerCaller => (format!("user-{i}"), format!("profile-{i}")),
        };
        setup.callers.push(CallerEntry {
            matcher: format!("spiffe_id = \"spiffe://corp.example/ns/team-{i}/sa/app\""),
            iam_user: user,
            profile,
            key: AccessKey {
                id: format!("AKIAEXAMPLE{i:09}"),
                secret: format!("not-a-secret-{i}"),
                session_token: None,
            },
        });
    }
    let spawned = Instant::now();
    // Quiet: this test reads no log line.
    let app = setup.env("RUST_LOG", "warn").start_quiet();
    let mut serving = false;
    for _ in 0..2400 {
        if app.admin_health().await.is_ok_and(|status| status == 1) {
            serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(serving, "not SERVING within 120 s");
    let serving_after = spawned.elapsed();
    // Let start-up's transient allocations settle, and key custody's first
    // sweep (one failed ListAccessKeys per user) run.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    Started {
        serving_after,
        rss_kib: app.rss_kib(),
    }
}

#[tokio::test]
async fn ten_thousand_callers_reach_serving_and_cost_little_each_on_the_identity_side() {
    let pki = Pki::new();
    let small = start(&pki, 10, Profiles::Shared).await;
    let shared = start(&pki, 10_000, Profiles::Shared).await;
    let per_caller = start(&pki, 10_000, Profiles::PerCaller).await;
    let per_caller_kib =
        |s: &Started| (s.rss_kib.saturating_sub(small.rss_kib)) as f64 / (10_000 - 10) as f64;
    eprintln!(
        "10 callers: SERVING after {:?}, RSS {} KiB\n\
         10,000 callers, one profile: SERVING after {:?}, RSS {} KiB ({:.2} KiB per caller)\n\
         10,000 callers, a profile each: SERVING after {:?}, RSS {} KiB ({:.2} KiB per caller)",
        small.serving_after,
        small.rss_kib,
        shared.serving_after,
        shared.rss_kib,
        per_caller_kib(&shared),
        per_caller.serving_after,
        per_caller.rss_kib,
        per_caller_kib(&per_caller),
    );
    // Configuration, identity index, the key source's list of profiles:
    // about 2 KiB each in the release build (docs/benchmark.md); 6 KiB is
    // generous for a debug build on a loaded machine. Before clients were
    // built lazily, a profile each cost about 35 KiB per caller.
    for (what, started) in [("one profile", &shared), ("a profile each", &per_caller)] {
        assert!(
            per_caller_kib(started) < 6.0,
            "{what}: {:.2} KiB per caller",
            per_caller_kib(started)
        );
        assert!(
            started.serving_after < Duration::from_secs(30),
            "{what}: SERVING after {:?}",
            started.serving_after
        );
    }
}
