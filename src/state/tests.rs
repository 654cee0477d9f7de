//! One behavioural suite for every backend: each case runs against the
//! memory backend and against a real `redis-server` (the Debian package,
//! started per test on a free 127.0.0.1 port), through the same [`Store`]
//! and [`Backend`] calls. Cases that need the store to lose data, evict or
//! run out of memory run against Redis only: memory cannot.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use tokio::time::Instant;

use super::{backend::*, *};
use crate::{
    config::{RedisSettings, Topology},
    error::{AwsContext, IamCode, Reason},
};

/// A `redis-server` of this test's own, stopped on drop.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start() -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (Debian package redis-server; scripts/test installs it)");
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Server { child, port }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    async fn run(&self, args: &[&str]) -> ::redis::Value {
        let mut conn = ::redis::Client::open(self.url())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let mut cmd = ::redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut conn).await.expect("command")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One backend under test.
struct Bench {
    name: &'static str,
    server: Option<Server>,
}

impl Bench {
    fn memory() -> Bench {
        Bench {
            name: "memory",
            server: None,
        }
    }

    fn redis() -> Bench {
        Bench {
            name: "redis",
            server: Some(Server::start()),
        }
    }

    fn all() -> [Bench; 2] {
        [Bench::memory(), Bench::redis()]
    }

    fn store(&self, max_failures: u32, window: Duration, max_ids: u32) -> Store {
        self.store_with(max_failures, window, max_ids, Duration::from_secs(60))
    }

    fn store_with(
        &self,
        max_failures: u32,
        window: Duration,
        max_ids: u32,
        pending_lifetime: Duration,
    ) -> Store {
        let backend = match &self.server {
            None => StateBackend::Memory,
            Some(server) => StateBackend::Redis(RedisSettings {
                topology: Topology::Standalone(server.url()),
                password_file: None,
                ca_file: None,
                client_cert: None,
                client_key: None,
                command_timeout: Duration::from_secs(2),
            }),
        };
        let settings = StateSettings {
            backend,
            key_prefix: "test:".into(),
            max_request_ids_per_caller: max_ids,
        };
        let limits = LimitSettings {
            failed_attempts: max_failures,
            failed_attempts_window: window,
        };
        Store::new(&settings, &limits, pending_lifetime).expect("store")
    }
}

fn soon() -> Deadline {
    Deadline::at(Instant::now() + Duration::from_secs(5))
}

fn granted(begin: Result<Begin, Error>, bench: &Bench) -> Ticket {
    match begin {
        Ok(Begin::Granted(ticket)) => ticket,
        other => panic!("{}: expected a grant, got {other:?}", bench.name),
    }
}

fn changed(id: &str) -> StoredOutcome {
    StoredOutcome::Changed {
        iam_user: "u".into(),
        iam_request_id: id.into(),
    }
}

fn wrong_old_password() -> StoredOutcome {
    StoredOutcome::Rejected(
        Error::OldPasswordIncorrect(AwsContext {
            code: Some(IamCode::InvalidUserType),
            request_id: Some("r".into()),
        })
        .rejection(),
    )
}

/// Retries `check` for up to two seconds: background ends take a moment.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never: {what}");
}

#[tokio::test]
async fn reservations_count_before_any_failure_is_known() {
    for b in Bench::all() {
        let store = b.store(3, Duration::from_secs(60), 100);
        let mut tickets = Vec::new();
        for _ in 0..3 {
            tickets.push(granted(store.begin("a", None, soon()).await, &b));
        }
        assert!(
            matches!(
                store.begin("a", None, soon()).await,
                Ok(Begin::Refused(Limit::InFlight))
            ),
            "{}: three guesses in flight fill the limit",
            b.name
        );
        assert_eq!(store.check("a").await.expect("check"), None, "{}", b.name);
        granted(store.begin("b", None, soon()).await, &b)
            .end(Verdict::Release, Record::Release)
            .await;
        let first = tickets.pop().expect("ticket");
        first.end(Verdict::Release, Record::Release).await;
        tickets.push(granted(store.begin("a", None, soon()).await, &b));
        for t in tickets {
            t.end(Verdict::Release, Record::Release).await;
        }
        let lockout = store.lockout("a").await.expect("lockout");
        assert_eq!((lockout.failures, lockout.in_flight), (0, 0), "{}", b.name);
    }
}

#[tokio::test]
async fn failures_lock_a_caller_out_and_only_a_change_forgets_them() {
    for b in Bench::all() {
        let window = Duration::from_secs(60);
        let store = b.store(3, window, 100);
        for _ in 0..3 {
            granted(store.begin("a", None, soon()).await, &b)
                .end(Verdict::Failure, Record::Release)
                .await;
        }
        let retry = store.check("a").await.expect("check").expect("locked");
        assert!(
            retry <= window && retry > window / 2,
            "{}: {retry:?}",
            b.name
        );
        assert!(
            matches!(
                store.begin("a", None, soon()).await,
                Ok(Begin::Refused(Limit::Failures(_)))
            ),
            "{}",
            b.name
        );
        assert_eq!(store.reset("a").await.expect("reset"), 3, "{}", b.name);
        assert_eq!(store.check("a").await.expect("check"), None, "{}", b.name);

        granted(store.begin("a", None, soon()).await, &b)
            .end(Verdict::Failure, Record::Release)
            .await;
        let in_flight = granted(store.begin("a", None, soon()).await, &b);
        granted(store.begin("a", None, soon()).await, &b)
            .end(Verdict::Release, Record::Release)
            .await;
        assert_eq!(
            store.lockout("a").await.expect("lockout").failures,
            1,
            "{}: a release forgets nothing",
            b.name
        );
        granted(store.begin("a", None, soon()).await, &b)
            .end(Verdict::Success, Record::Release)
            .await;
        let lockout = store.lockout("a").await.expect("lockout");
        assert_eq!(
            (lockout.failures, lockout.in_flight),
            (0, 1),
            "{}: a change forgets the failures, not the attempts in flight",
            b.name
        );
        in_flight.end(Verdict::Release, Record::Release).await;
    }
}

#[tokio::test]
async fn failures_leave_the_window() {
    for b in Bench::all() {
        let store = b.store(1, Duration::from_millis(500), 100);
        granted(store.begin("a", None, soon()).await, &b)
            .end(Verdict::Failure, Record::Release)
            .await;
        assert!(
            store.check("a").await.expect("check").is_some(),
            "{}",
            b.name
        );
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(store.check("a").await.expect("check"), None, "{}", b.name);
    }
}

#[tokio::test]
async fn a_request_id_is_claimed_once_and_its_outcome_replayed() {
    for b in Bench::all() {
        let store = Arc::new(b.store(5, Duration::from_secs(60), 100));
        let first = granted(store.begin("a", Some("id-1"), soon()).await, &b);
        assert!(
            matches!(
                store.begin("a", Some("id-1"), soon()).await,
                Ok(Begin::Pending)
            ),
            "{}",
            b.name
        );
        granted(store.begin("b", Some("id-1"), soon()).await, &b)
            .end(Verdict::Release, Record::Release)
            .await;
        let waiter = {
            let store = store.clone();
            tokio::spawn(async move { store.wait("a", "id-1", soon()).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        first
            .end(Verdict::Success, Record::Store(changed("iam-1")))
            .await;
        assert!(
            matches!(waiter.await.expect("join"), Ok(Waited::Done(o)) if o == changed("iam-1")),
            "{}: the waiter sees the outcome",
            b.name
        );
        assert!(
            matches!(
                store.begin("a", Some("id-1"), soon()).await,
                Ok(Begin::Done(o)) if o == changed("iam-1")
            ),
            "{}",
            b.name
        );

        let wrong = granted(store.begin("a", Some("id-2"), soon()).await, &b);
        wrong
            .end(Verdict::Failure, Record::Store(wrong_old_password()))
            .await;
        assert!(
            matches!(
                store.begin("a", Some("id-2"), soon()).await,
                Ok(Begin::Done(o)) if o == wrong_old_password()
            ),
            "{}: a rejection replays too",
            b.name
        );
        let pending = store.wait("a", "id-3", soon()).await.expect("wait");
        assert!(matches!(pending, Waited::Gone), "{}", b.name);
    }
}

#[tokio::test]
async fn a_released_claim_runs_again_and_a_waiter_is_told() {
    for b in Bench::all() {
        let store = Arc::new(b.store(5, Duration::from_secs(60), 100));
        let first = granted(store.begin("a", Some("id"), soon()).await, &b);
        let waiter = {
            let store = store.clone();
            tokio::spawn(async move { store.wait("a", "id", soon()).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        first.end(Verdict::Release, Record::Release).await;
        assert!(
            matches!(waiter.await.expect("join"), Ok(Waited::Gone)),
            "{}",
            b.name
        );
        granted(store.begin("a", Some("id"), soon()).await, &b)
            .end(Verdict::Release, Record::Release)
            .await;
    }
}

#[tokio::test]
async fn a_ticket_dropped_before_iam_was_called_gives_everything_back() {
    for b in Bench::all() {
        let store = b.store(1, Duration::from_secs(60), 100);
        let ticket = granted(store.begin("a", Some("id"), soon()).await, &b);
        drop(ticket);
        eventually(&format!("{}: released", b.name), async || {
            match store.begin("a", Some("id"), soon()).await {
                Ok(Begin::Granted(t)) => {
                    t.end(Verdict::Release, Record::Release).await;
                    true
                }
                _ => false,
            }
        })
        .await;
        assert_eq!(
            store.lockout("a").await.expect("lockout").failures,
            0,
            "{}",
            b.name
        );
    }
}

#[tokio::test]
async fn a_ticket_dropped_after_iam_may_have_been_called_counts_and_keeps_its_claim() {
    for b in Bench::all() {
        let lifetime = Duration::from_millis(300);
        let store = b.store_with(2, Duration::from_secs(60), 100, lifetime);
        let mut ticket = granted(store.begin("a", Some("id"), soon()).await, &b);
        ticket.sending();
        drop(ticket);
        eventually(&format!("{}: counted", b.name), async || {
            store.lockout("a").await.expect("lockout").failures == 1
        })
        .await;
        assert!(
            matches!(
                store.begin("a", Some("id"), soon()).await,
                Ok(Begin::Pending)
            ),
            "{}: a retry is not run again",
            b.name
        );
        tokio::time::sleep(lifetime * 2).await;
        assert!(
            matches!(store.begin("a", Some("id"), soon()).await, Ok(Begin::Lost)),
            "{}: its outcome will never be known",
            b.name
        );
    }
}

#[tokio::test]
async fn a_caller_holds_a_bounded_number_of_request_ids() {
    for b in Bench::all() {
        let store = b.store(5, Duration::from_secs(60), 2);
        let unchanged = StoredOutcome::Rejected(
            Error::PolicyViolation {
                violations: Vec::new(),
                aws: None,
            }
            .rejection(),
        );
        for id in ["id-1", "id-2"] {
            granted(store.begin("a", Some(id), soon()).await, &b)
                .end(Verdict::Release, Record::Store(unchanged.clone()))
                .await;
        }
        match store.begin("a", Some("id-3"), soon()).await {
            Ok(Begin::Refused(Limit::RequestIds(retry))) => assert!(
                retry <= UNCHANGED_OUTCOME_TTL && retry > UNCHANGED_OUTCOME_TTL / 2,
                "{}: outcomes that changed nothing are kept briefly: {retry:?}",
                b.name
            ),
            other => panic!("{}: {other:?}", b.name),
        }
        assert!(
            matches!(
                store.begin("a", Some("id-1"), soon()).await,
                Ok(Begin::Done(_))
            ),
            "{}: stored outcomes still replay",
            b.name
        );
        granted(store.begin("a", None, soon()).await, &b)
            .end(Verdict::Release, Record::Release)
            .await;
        granted(store.begin("b", Some("id-3"), soon()).await, &b)
            .end(Verdict::Success, Record::Store(changed("x")))
            .await;
        granted(store.begin("b", Some("id-4"), soon()).await, &b)
            .end(Verdict::Success, Record::Store(changed("y")))
            .await;
        match store.begin("b", Some("id-5"), soon()).await {
            Ok(Begin::Refused(Limit::RequestIds(retry))) => assert!(
                retry > OUTCOME_TTL - Duration::from_secs(60),
                "{}: changes are kept a day: {retry:?}",
                b.name
            ),
            other => panic!("{}: {other:?}", b.name),
        }
    }
}

fn begin_op(caller: &str, id: &str, request_id: Option<&str>) -> BeginOp {
    BeginOp {
        caller: caller.into(),
        id: id.into(),
        request_id: request_id.map(str::to_owned),
        max_failures: 3,
        window: Duration::from_secs(60),
        reservation_ttl: Duration::from_secs(120),
        max_request_ids: 100,
    }
}

fn end_op(id: &str, request_id: Option<&str>, verdict: Verdict, record: EndRecord) -> EndOp {
    EndOp {
        caller: "a".into(),
        id: id.into(),
        request_id: request_id.map(str::to_owned),
        verdict,
        record,
        window: Duration::from_secs(60),
        unanswered: None,
    }
}

#[tokio::test]
async fn steps_sent_twice_take_effect_once() {
    for b in Bench::all() {
        let store = b.store(3, Duration::from_secs(60), 100);
        let backend = &store.shared.backend;
        for request_id in [None, Some("id")] {
            let op = begin_op("a", "attempt-1", request_id);
            for _ in 0..2 {
                assert_eq!(backend.begin(&op).await.expect("begin"), Began::Granted);
            }
            let failures = backend
                .failures("a", op.window, op.reservation_ttl)
                .await
                .expect("failures");
            assert_eq!(failures.in_flight, 1, "{}: one reservation", b.name);
            let end = end_op(
                "attempt-1",
                request_id,
                Verdict::Failure,
                EndRecord::Store(wrong_old_password(), Duration::from_secs(60)),
            );
            for _ in 0..2 {
                assert_eq!(
                    backend.end(&end).await.expect("end"),
                    Ended::Settled,
                    "{}",
                    b.name
                );
            }
            store.reset("a").await.expect("reset");
        }
        let failures = backend
            .failures("a", Duration::from_secs(60), Duration::from_secs(60))
            .await
            .expect("failures");
        assert_eq!((failures.count, failures.in_flight), (0, 0), "{}", b.name);
    }
}

#[tokio::test]
async fn a_begin_arriving_after_its_release_claims_nothing() {
    for b in Bench::all() {
        let store = b.store(3, Duration::from_secs(60), 100);
        let backend = &store.shared.backend;
        let mut release = end_op("late", Some("id"), Verdict::Release, EndRecord::Release);
        release.unanswered = Some(Duration::from_secs(60));
        backend.end(&release).await.expect("end");
        assert_eq!(
            backend
                .begin(&begin_op("a", "late", Some("id")))
                .await
                .expect("begin"),
            Began::Released,
            "{}",
            b.name
        );
        granted(store.begin("a", Some("id"), soon()).await, &b)
            .end(Verdict::Release, Record::Release)
            .await;
        let failures = backend
            .failures("a", Duration::from_secs(60), Duration::from_secs(60))
            .await
            .expect("failures");
        assert_eq!(failures.in_flight, 0, "{}", b.name);
    }
}

// ----------------------------------------------------------- Redis only

#[tokio::test]
async fn an_outcome_whose_claim_vanished_is_stored_again() {
    let b = Bench::redis();
    let server = b.server.as_ref().expect("redis");
    let store = b.store(3, Duration::from_secs(60), 100);
    let backend = &store.shared.backend;
    let op = begin_op("a", "attempt-1", Some("id"));
    assert_eq!(backend.begin(&op).await.expect("begin"), Began::Granted);
    server.run(&["FLUSHDB"]).await;
    let ended = backend
        .end(&end_op(
            "attempt-1",
            Some("id"),
            Verdict::Success,
            EndRecord::Store(changed("iam-1"), OUTCOME_TTL),
        ))
        .await
        .expect("end");
    assert_eq!(ended, Ended::Missing);
    assert!(matches!(
        store.begin("a", Some("id"), soon()).await,
        Ok(Begin::Done(o)) if o == changed("iam-1")
    ));
}

#[tokio::test]
async fn a_call_that_raced_a_vanished_claim_never_overwrites_a_change() {
    let b = Bench::redis();
    let server = b.server.as_ref().expect("redis");
    let store = b.store(3, Duration::from_secs(60), 100);
    let backend = &store.shared.backend;
    // Either order of completion leaves the change on record, and the
    // loser's "wrong old password" (caused by the winner's change) does not
    // count.
    for changed_first in [true, false] {
        let request_id = if changed_first { "id-1" } else { "id-2" };
        let first = begin_op("a", &format!("first-{request_id}"), Some(request_id));
        assert_eq!(backend.begin(&first).await.expect("begin"), Began::Granted);
        server.run(&["FLUSHDB"]).await;
        let second = begin_op("a", &format!("second-{request_id}"), Some(request_id));
        assert_eq!(backend.begin(&second).await.expect("begin"), Began::Granted);
        let (winner, loser) = if changed_first {
            (&first, &second)
        } else {
            (&second, &first)
        };
        let won = end_op(
            &winner.id,
            Some(request_id),
            Verdict::Success,
            EndRecord::Store(changed("iam-1"), OUTCOME_TTL),
        );
        let lost = end_op(
            &loser.id,
            Some(request_id),
            Verdict::Failure,
            EndRecord::Store(wrong_old_password(), UNCHANGED_OUTCOME_TTL),
        );
        let (a, z) = if changed_first {
            (&won, &lost)
        } else {
            (&lost, &won)
        };
        let ended = [
            backend.end(a).await.expect("end"),
            backend.end(z).await.expect("end"),
        ];
        assert!(ended.contains(&Ended::Replaced), "{ended:?}");
        assert!(
            matches!(
                store.begin("a", Some(request_id), soon()).await,
                Ok(Begin::Done(o)) if o == changed("iam-1")
            ),
            "changed_first={changed_first}"
        );
        assert_eq!(
            store.lockout("a").await.expect("lockout").failures,
            0,
            "changed_first={changed_first}"
        );
    }
}

#[tokio::test]
async fn a_store_that_may_evict_keys_is_refused_until_it_may_not() {
    let b = Bench::redis();
    let server = b.server.as_ref().expect("redis");
    let store = b.store(3, Duration::from_secs(60), 100);
    store.verify().await.expect("noeviction by default");
    server
        .run(&["CONFIG", "SET", "maxmemory-policy", "volatile-lru"])
        .await;
    assert!(
        matches!(store.verify().await, Err(Unfit::Evicts(p)) if p == "volatile-lru"),
        "refused"
    );
    let refused = store.begin("a", None, soon()).await.expect_err("closed");
    assert_eq!(refused.reason(), Reason::StateUnavailable);
    server
        .run(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])
        .await;
    store.verify().await.expect("fixed");
    granted(store.begin("a", None, soon()).await, &b)
        .end(Verdict::Release, Record::Release)
        .await;
}

#[tokio::test]
async fn a_store_out_of_memory_fails_closed() {
    let b = Bench::redis();
    let server = b.server.as_ref().expect("redis");
    let store = b.store(3, Duration::from_secs(60), 100);
    server.run(&["CONFIG", "SET", "maxmemory", "1"]).await;
    for request_id in [None, Some("id")] {
        let refused = store.begin("a", request_id, soon()).await.expect_err("OOM");
        assert_eq!(refused.reason(), Reason::StateUnavailable, "{refused:?}");
    }
    assert_eq!(
        server.run(&["DBSIZE"]).await,
        ::redis::Value::Int(0),
        "nothing half-written"
    );
    server.run(&["CONFIG", "SET", "maxmemory", "0"]).await;
    granted(store.begin("a", Some("id"), soon()).await, &b)
        .end(Verdict::Release, Record::Release)
        .await;
}

#[test]
fn a_caller_key_cannot_move_its_hash_tag() {
    let settings = RedisSettings {
        topology: Topology::Standalone("redis://127.0.0.1:1/0".into()),
        password_file: None,
        ca_file: None,
        client_cert: None,
        client_key: None,
        command_timeout: Duration::from_secs(1),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = runtime.enter();
    let redis = redis::Redis::new(&settings, "p:").expect("redis");
    assert_eq!(
        redis.key("cn:a}b{c%", "attempts:failed"),
        "p:{cn:a%7Db%7Bc%25}:attempts:failed"
    );
}

#[tokio::test]
async fn one_holder_at_a_time_holds_a_lease_and_only_it_renews_or_gives_it_up() {
    for b in Bench::all() {
        let store = b.store(3, Duration::from_secs(60), 100);
        let ttl = Duration::from_secs(5);
        let first = store
            .lease("rotate:u", ttl)
            .await
            .expect("store")
            .unwrap_or_else(|| panic!("{}: a free lease is taken", b.name));
        assert!(
            store.lease("rotate:u", ttl).await.expect("store").is_none(),
            "{}: a held lease is refused to another holder",
            b.name
        );
        let other = store.lease("rotate:v", ttl).await.expect("store");
        assert!(other.is_some(), "{}: leases are by name", b.name);
        assert!(first.renew().await.expect("store"), "{}", b.name);
        assert!(first.release().await.expect("store"), "{}", b.name);
        let second = store.lease("rotate:u", ttl).await.expect("store");
        assert!(second.is_some(), "{}: free again once given up", b.name);
        // A dropped lease is given up in the background.
        drop(second);
        eventually("a dropped lease is given up", async || {
            matches!(store.lease("rotate:u", ttl).await, Ok(Some(_)))
        })
        .await;
    }
}

#[tokio::test]
async fn an_expired_lease_is_taken_by_another_and_its_old_holder_cannot_touch_it() {
    for b in Bench::all() {
        let store = b.store(3, Duration::from_secs(60), 100);
        let stale = store
            .lease("rotate:u", Duration::from_millis(300))
            .await
            .expect("store")
            .expect("taken");
        tokio::time::sleep(Duration::from_millis(600)).await;
        let now = store
            .lease("rotate:u", Duration::from_secs(5))
            .await
            .expect("store")
            .unwrap_or_else(|| panic!("{}: an expired lease is free", b.name));
        assert!(!stale.renew().await.expect("store"), "{}", b.name);
        assert!(!stale.release().await.expect("store"), "{}", b.name);
        // The old holder's release did not free the new holder's lease.
        assert!(
            store
                .lease("rotate:u", Duration::from_secs(5))
                .await
                .expect("store")
                .is_none(),
            "{}",
            b.name
        );
        assert!(now.renew().await.expect("store"), "{}", b.name);
    }
}

#[tokio::test]
async fn replicas_share_a_lease_through_redis_in_one_key() {
    let b = Bench::redis();
    let server = b.server.as_ref().expect("redis");
    let (one, two) = (
        b.store(3, Duration::from_secs(60), 100),
        b.store(3, Duration::from_secs(60), 100),
    );
    let held = one
        .lease("rotate:portal-svc", Duration::from_secs(5))
        .await
        .expect("store")
        .expect("taken");
    assert!(
        two.lease("rotate:portal-svc", Duration::from_secs(5))
            .await
            .expect("store")
            .is_none(),
        "the other replica is refused"
    );
    let ::redis::Value::Array(keys) = server.run(&["KEYS", "*"]).await else {
        panic!("KEYS answers an array");
    };
    assert_eq!(
        keys,
        vec![::redis::Value::BulkString(
            b"test:{lease:rotate:portal-svc}:owner".to_vec()
        )],
        "one key per lease"
    );
    let ::redis::Value::Int(ttl) = server
        .run(&["PTTL", "test:{lease:rotate:portal-svc}:owner"])
        .await
    else {
        panic!("PTTL answers an integer");
    };
    assert!((1..=5000).contains(&ttl), "it expires on its own: {ttl}");
    assert!(held.release().await.expect("store"));
    assert!(
        two.lease("rotate:portal-svc", Duration::from_secs(5))
            .await
            .expect("store")
            .is_some()
    );
}
