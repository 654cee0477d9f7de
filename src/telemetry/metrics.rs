//! The metric instruments, their names and attributes: the contract of
//! `deploy/observability` (its `metrics.json`).

use std::sync::{
    Arc, LazyLock, OnceLock,
    atomic::{AtomicBool, Ordering},
};

use opentelemetry::{
    KeyValue, global,
    metrics::{Counter, Histogram, ObservableGauge},
};

/// The service's metric instruments, created from the global meter provider
/// on first use (after [`init`]). Names and attributes are the contract of
/// `deploy/observability` (its `metrics.json`).
pub(crate) struct Metrics {
    /// `rpc.server.duration`, milliseconds, by method, status code and
    /// `error.type` (the ErrorInfo reason).
    pub rpc_server_duration: Histogram<f64>,
    /// `credgate.iam.outcomes`: IAM calls by method and error code.
    pub iam_outcomes: Counter<u64>,
    /// `credgate.limit.decisions`: attempt reservations, `allowed`/`refused`.
    pub limit_decisions: Counter<u64>,
    /// `credgate.idempotency.replays`: retries answered from a stored
    /// outcome (`stored`) or still waiting at their deadline (`in_progress`).
    pub idempotency_replays: Counter<u64>,
    /// `credgate.state.duration`: state store commands, milliseconds.
    pub state_duration: Histogram<f64>,
    /// `credgate.state.errors`: failed state store commands.
    pub state_errors: Counter<u64>,
    /// `credgate.state.lost_records`: outcomes whose `request_id` claim was
    /// gone from the store (`record`: `missing`, or `replaced` by another
    /// call that then also reached IAM).
    pub state_lost_records: Counter<u64>,
    /// `credgate.keys.rotations`: key rotation runs by `outcome` (`ok`: a
    /// rotation completed, its old key deleted; `failed`).
    pub key_rotations: Counter<u64>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let meter = global::meter("credgate");
    Metrics {
        rpc_server_duration: meter
            .f64_histogram("rpc.server.duration")
            .with_unit("ms")
            .with_description("Duration of inbound RPCs")
            .build(),
        iam_outcomes: meter
            .u64_counter("credgate.iam.outcomes")
            .with_description("IAM calls by outcome (aws.error_code, OK on success)")
            .build(),
        limit_decisions: meter
            .u64_counter("credgate.limit.decisions")
            .with_description("Wrong-old-password limit decisions (decision: allowed|refused)")
            .build(),
        idempotency_replays: meter
            .u64_counter("credgate.idempotency.replays")
            .with_description(
                "Retries with a known request_id (result: stored|in_progress); IAM not called",
            )
            .build(),
        state_duration: meter
            .f64_histogram("credgate.state.duration")
            .with_unit("ms")
            .with_description("State store (Redis) command latency")
            .build(),
        state_errors: meter
            .u64_counter("credgate.state.errors")
            .with_description("Failed state store (Redis) commands")
            .build(),
        state_lost_records: meter
            .u64_counter("credgate.state.lost_records")
            .with_description(
                "request_id outcomes whose claim was gone from the state store (record: missing|replaced)",
            )
            .build(),
        key_rotations: meter
            .u64_counter("credgate.keys.rotations")
            .with_description("IAM access key rotations by outcome (outcome: ok|failed)")
            .build(),
    }
});

/// Exports `credgate.state.up` (1 reachable, 0 not) from `up`.
pub(crate) fn observe_state_up(up: Arc<AtomicBool>) {
    static GAUGE: OnceLock<ObservableGauge<u64>> = OnceLock::new();
    GAUGE.get_or_init(|| {
        global::meter("credgate")
            .u64_observable_gauge("credgate.state.up")
            .with_description("Whether the shared state store answered its last command")
            .with_callback(move |observer| {
                observer.observe(u64::from(up.load(Ordering::Relaxed)), &[]);
            })
            .build()
    });
}

/// Exports `credgate.tls.crl.expires_in`: seconds until the first loaded
/// CRL passes its nextUpdate, negative once it has (handshakes of the
/// certificates it covers are then refused).
pub(crate) fn observe_crl_expiry(expires_in: impl Fn() -> Option<i64> + Send + Sync + 'static) {
    static GAUGE: OnceLock<ObservableGauge<i64>> = OnceLock::new();
    GAUGE.get_or_init(|| {
        global::meter("credgate")
            .i64_observable_gauge("credgate.tls.crl.expires_in")
            .with_unit("s")
            .with_description(
                "Seconds until the first loaded CRL passes its nextUpdate (negative: expired)",
            )
            .with_callback(move |observer| {
                if let Some(seconds) = expires_in() {
                    observer.observe(seconds, &[]);
                }
            })
            .build()
    });
}

/// Exports `credgate.keys.oldest_age` (seconds: the oldest access key in
/// use, when one is known) and `credgate.keys.over_age` (how many users'
/// keys are older than `keys.warn_key_age`). No per-user labels.
pub(crate) fn observe_key_ages(
    oldest: impl Fn() -> Option<u64> + Send + Sync + 'static,
    over_age: impl Fn() -> u64 + Send + Sync + 'static,
) {
    static GAUGES: OnceLock<(ObservableGauge<u64>, ObservableGauge<u64>)> = OnceLock::new();
    GAUGES.get_or_init(|| {
        let meter = global::meter("credgate");
        (
            meter
                .u64_observable_gauge("credgate.keys.oldest_age")
                .with_unit("s")
                .with_description("Age of the oldest IAM access key credgate signs with")
                .with_callback(move |observer| {
                    if let Some(seconds) = oldest() {
                        observer.observe(seconds, &[]);
                    }
                })
                .build(),
            meter
                .u64_observable_gauge("credgate.keys.over_age")
                .with_description("IAM users whose access key is older than keys.warn_key_age")
                .with_callback(move |observer| observer.observe(over_age(), &[]))
                .build(),
        )
    });
}

/// The global instruments.
pub(crate) fn metrics() -> &'static Metrics {
    &METRICS
}

/// Records one IAM call's outcome.
pub(crate) fn count_iam_outcome(method: &'static str, code: &str) {
    metrics().iam_outcomes.add(
        1,
        &[
            KeyValue::new("rpc.method", method),
            KeyValue::new("aws.error_code", code.to_owned()),
        ],
    );
}
