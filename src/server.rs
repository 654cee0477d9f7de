//! Listeners, the tower stack, health, reflection and graceful shutdown.
//!
//! Two ports: the mTLS port serves PasswordService, health and reflection;
//! the plaintext admin port serves only health, for Kubernetes probes, which
//! cannot present a client certificate. Health on both is NOT_SERVING while
//! the log sink is stalled ([`crate::telemetry::logs`]) and once shutdown begins.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{service::Routes, transport::Server};
use tonic_health::{
    ServingStatus,
    pb::health_server::{Health, HealthServer},
    server::HealthReporter,
};
use tower::Layer;

use crate::{
    api::{self, password_service_server::PasswordServiceServer},
    aws::iam::Iam,
    aws::keys::{Keys, profiles},
    change::attempt::{Gate, UPSTREAM_TIMEOUT},
    change::policy_cache::PolicyCache,
    change::principal::Principals,
    config::{Config, KeySource},
    custody::{self, Custody},
    net::connections::{self, Connection, MakeService},
    net::identity::Callers,
    net::tls::ReloadingConfig,
    rpc::edge::{Edge, Limits, MAX_REQUEST_BYTES},
    rpc::service::PasswordGate,
    rpc::span::{RpcSpan, RpcSpanLayer, SERVICE},
    state::{Store, Unfit},
    telemetry,
    telemetry::logs::{Output, STALL},
};

/// Failures that stop the server from starting or running.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ServeError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS files are unusable.
    #[error("TLS configuration:\n  - {}", .0.join("\n  - "))]
    Tls(Vec<String>),
    /// The state store cannot be set up (not: is unreachable).
    #[error("state store: {0}")]
    State(String),
    /// Reflection could not be built from the descriptor sets.
    #[error("reflection: {0}")]
    Reflection(String),
    /// A server task failed.
    #[error("server: {0}")]
    Transport(String),
}

/// The two bound listeners.
pub(crate) struct Listeners {
    tls: TcpListener,
    admin: TcpListener,
}

impl Listeners {
    /// Binds both configured addresses (port 0 picks a free port).
    pub(crate) async fn bind(config: &Config) -> Result<Self, ServeError> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind { addr, source })
        };
        Ok(Self {
            tls: bind(config.server.listen).await?,
            admin: bind(config.server.admin_listen).await?,
        })
    }

    /// The bound mTLS address.
    pub(crate) fn tls_addr(&self) -> std::io::Result<SocketAddr> {
        self.tls.local_addr()
    }

    /// The bound admin address.
    pub(crate) fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin.local_addr()
    }
}

/// The per-connection service stack: span and metrics outermost, then the
/// edge, then tonic's routes.
struct Stack {
    routes: Routes,
    limits: Arc<Limits>,
}

impl MakeService for Stack {
    type Service = RpcSpan<Edge<Routes>>;

    fn make(&self, conn: Arc<Connection>) -> Self::Service {
        RpcSpanLayer.layer(Edge::new(self.routes.clone(), self.limits.clone(), conn))
    }
}

/// How long after its caller's deadline an attempt can still be writing its
/// outcome: IAM's late answer ([`UPSTREAM_TIMEOUT`]), then the state store
/// (a few command timeouts) and the audit event.
const AFTER_DEADLINE: Duration = UPSTREAM_TIMEOUT.saturating_add(Duration::from_secs(5));

/// The longest shutdown can take with the given settings: the grace for
/// calls, or an attempt admitted just before SIGTERM that reached IAM and
/// runs to the end of its upstream wait, whichever is longer. The pod's
/// termination grace must cover it (plus preStop and the telemetry flush).
pub(crate) fn longest_drain(request_timeout: Duration, shutdown_grace: Duration) -> Duration {
    shutdown_grace.max(request_timeout + AFTER_DEADLINE)
}

/// Serves until `shutdown` resolves, then drains: health turns NOT_SERVING,
/// new connections are refused, open connections get a GOAWAY, in-flight
/// calls get up to `shutdown_grace`, and every attempt that went to IAM is
/// waited for until its audit event is written, however long past the
/// grace that takes ([`longest_drain`] bounds it).
pub(crate) async fn serve(
    config: Config,
    listeners: Listeners,
    sink: Output,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let tls = load_tls(&config)?;
    connections::raise_fd_limit(config.server.max_connections);
    let gate = Arc::new(gate(&config, sink.clone()).await?);
    let custody = Arc::new(Custody::new(
        gate.iam.clone(),
        gate.store.clone(),
        &config.keys,
        custody::signers(&config.callers),
    ));
    custody.export_metrics();
    let (reporter, health) = tonic_health::server::health_reporter();
    let health = health.max_decoding_message_size(MAX_REQUEST_BYTES);
    set_serving(&reporter, ServingStatus::Serving).await;
    let stack = Arc::new(Stack {
        routes: routes(&gate, health.clone())?,
        limits: Arc::new(limits(&config, sink.clone())),
    });
    let callers = Arc::new(Callers::new(
        &config.callers,
        &config.templates,
        config.server.max_requests_per_caller,
    ));

    let stop = CancellationToken::new();
    tokio::spawn(tls.clone().watch(stop.clone()));
    // Key ages and rotations, in the background from now on.
    tokio::spawn(custody.run(stop.clone()));
    let sink_watcher = tokio::spawn(watch_sink(sink, reporter.clone(), stop.clone()));
    let mut tls_task = tokio::spawn(connections::serve(
        listeners.tls,
        tls,
        callers,
        connection_settings(&config),
        stack,
        stop.clone(),
        gate.tracker.clone(),
    ));
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(serve_admin(listeners.admin, health, admin_stop.clone()));

    tokio::select! {
        () = shutdown => {}
        // The accept loop ending on its own is a failure; report it.
        ended = &mut tls_task => {
            admin_stop.cancel();
            return Err(ServeError::Transport(match ended {
                Ok(()) => "mTLS listener stopped unexpectedly".to_owned(),
                Err(e) => e.to_string(),
            }));
        }
    }

    tracing::info!(
        grace = %humantime::format_duration(config.server.shutdown_grace),
        "shutting down: health NOT_SERVING, refusing new connections, draining in-flight calls"
    );
    // Stop the sink watcher first: nothing may turn health SERVING again.
    stop.cancel();
    let _ = sink_watcher.await;
    set_serving(&reporter, ServingStatus::NotServing).await;
    drain(&config, &gate).await;
    // The admin port outlives the drain, so probes see NOT_SERVING meanwhile.
    admin_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), admin_task).await;
    Ok(())
}

/// The plaintext admin port: health only, until `stop`.
async fn serve_admin<H: Health>(
    listener: TcpListener,
    health: HealthServer<H>,
    stop: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    Server::builder()
        .add_service(health)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop.cancelled_owned())
        .await
}

/// The TLS files, loaded and checked; with CRLs, their expiry is exported.
fn load_tls(config: &Config) -> Result<Arc<ReloadingConfig>, ServeError> {
    let tls = Arc::new(ReloadingConfig::load(&config.tls).map_err(ServeError::Tls)?);
    if !config.tls.crl.is_empty() {
        let tls = tls.clone();
        telemetry::observe_crl_expiry(move || tls.crl_expires_in());
    }
    Ok(tls)
}

/// Everything an attempt needs: IAM with each user's key from the
/// configured source, the state store, the keys' identities and the
/// policies, the trackers shutdown waits on, and the log sink.
async fn gate(config: &Config, sink: Output) -> Result<Gate, ServeError> {
    let profiles = config
        .callers
        .iter()
        .filter_map(|c| c.aws_profile.as_deref());
    if config.keys.source == KeySource::Profiles {
        // Not fatal: the other callers can still be served, and the file may
        // be fixed (Secret update) without a restart. Their calls fail with
        // UPSTREAM_CREDENTIALS_REJECTED meanwhile.
        for problem in profiles::missing_profiles(profiles.clone()).await {
            tracing::warn!(problem, "caller cannot be served until its profile exists");
        }
    }
    let keys = Keys::new(&config.aws, &config.keys, &config.callers).await;
    Ok(Gate {
        iam: Arc::new(Iam::new(keys)),
        store: open_store(config).await?,
        principals: Principals::new(),
        policies: PolicyCache::new(),
        tracker: TaskTracker::new(),
        at_iam: TaskTracker::new(),
        sink,
    })
}

/// The configured state store. A shared one that may evict keys would
/// silently reset lockouts and re-run request_ids: credgate refuses to
/// start on it. One that does not answer yet is served anyway, failing
/// closed until it does (its policy is checked again then).
async fn open_store(config: &Config) -> Result<Store, ServeError> {
    // A claim still pending after this long belongs to a replica that died.
    let pending_lifetime =
        config.server.request_timeout + UPSTREAM_TIMEOUT + Duration::from_secs(60);
    let store =
        Store::new(&config.state, &config.limits, pending_lifetime).map_err(ServeError::State)?;
    if !store.is_shared() {
        tracing::info!(
            "state in process memory: the attempt limit and request_id replays hold for this replica only"
        );
        return Ok(store);
    }
    match store.verify().await {
        Ok(()) => {}
        Err(e @ Unfit::Evicts(_)) => return Err(ServeError::State(e.to_string())),
        Err(e @ Unfit::Unreachable(_)) => tracing::warn!(
            error = %e,
            "state store not reachable at start; ChangePassword fails closed until it is"
        ),
    }
    Ok(store)
}

/// The services of the mTLS port: PasswordService, health, and reflection
/// (both versions: grpcurl before 1.9 only speaks v1alpha).
fn routes<H: Health>(gate: &Arc<Gate>, health: HealthServer<H>) -> Result<Routes, ServeError> {
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(api::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc.ErrorInfo & co., so grpcurl can decode error details.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))?
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let password_service = PasswordServiceServer::new(PasswordGate::new(gate.clone()))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    Ok(Routes::new(password_service)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .prepare())
}

/// The edge's limits, shared by every connection.
fn limits(config: &Config, sink: Output) -> Limits {
    Limits {
        request_timeout: config.server.request_timeout,
        concurrent: Arc::new(tokio::sync::Semaphore::new(
            config.server.max_concurrent_requests,
        )),
        per_caller: config.server.max_requests_per_caller,
        sink,
    }
}

/// The connection limits of `[server]`.
fn connection_settings(config: &Config) -> connections::Settings {
    connections::Settings {
        max_connections: config.server.max_connections,
        max_connections_per_caller: config.server.max_connections_per_caller,
        idle_timeout: config.server.idle_timeout,
        max_connection_age: config.server.max_connection_age,
        request_timeout: config.server.request_timeout,
        grace: config.server.request_timeout + Duration::from_secs(1),
    }
}

/// Waits for calls and attempts: all of them within `shutdown_grace`, and
/// beyond it the attempts that went to IAM, until each has written its
/// audit event (they end by themselves within [`AFTER_DEADLINE`] of their
/// deadline, so [`longest_drain`] is only a backstop).
async fn drain(config: &Config, gate: &Gate) {
    let started = tokio::time::Instant::now();
    wait_for_attempts(config, &gate.tracker, &gate.at_iam).await;
    // Attempts the store did not settle at once (it was down) are retried in
    // the background; give them what is left of the grace.
    gate.store
        .drain(
            config
                .server
                .shutdown_grace
                .saturating_sub(started.elapsed()),
        )
        .await;
}

/// The calls and attempts part of [`drain`].
async fn wait_for_attempts(config: &Config, tracker: &TaskTracker, at_iam: &TaskTracker) {
    let started = tokio::time::Instant::now();
    tracker.close();
    at_iam.close();
    if tokio::time::timeout(config.server.shutdown_grace, tracker.wait())
        .await
        .is_ok()
    {
        tracing::info!("drained");
        return;
    }
    if !at_iam.is_empty() {
        tracing::info!(
            attempts = at_iam.len(),
            "shutdown grace expired; still waiting for the attempts that went to IAM"
        );
    }
    let backstop =
        started + longest_drain(config.server.request_timeout, config.server.shutdown_grace);
    match tokio::time::timeout_at(backstop, at_iam.wait()).await {
        Ok(()) => tracing::info!(
            abandoned_calls = tracker.len(),
            "every attempt that went to IAM is audited; abandoning the calls still open"
        ),
        Err(_) => tracing::error!(
            attempts = at_iam.len(),
            "attempts that went to IAM outlived their upstream wait; exiting without their audit events"
        ),
    }
}

/// Follows the log sink: health is NOT_SERVING while it is stalled, and
/// SERVING again once it takes bytes, with a report of what was dropped.
async fn watch_sink(sink: Output, reporter: HealthReporter, stop: CancellationToken) {
    let mut tick = tokio::time::interval(STALL / 10);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stalled = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = sink.stalled();
        if now != stalled {
            stalled = now;
            let status = if now {
                tracing::warn!(
                    "log sink stalled: ChangePassword answers AUDIT_UNAVAILABLE, health NOT_SERVING"
                );
                ServingStatus::NotServing
            } else {
                tracing::info!("log sink writing again: health SERVING");
                ServingStatus::Serving
            };
            set_serving(&reporter, status).await;
        }
        if now {
            continue;
        }
        report_dropped(&sink);
    }
}

/// Reports, once the sink takes bytes again, what it could not take.
fn report_dropped(sink: &Output) {
    let dropped = sink.take_dropped();
    if !dropped.any() {
        return;
    }
    if dropped.refusals > 0 {
        tracing::info!(
            target: telemetry::AUDIT_TARGET,
            outcome = crate::error::Reason::AuditUnavailable.as_str(),
            unrecorded = dropped.refusals,
            "password change attempts refused with AUDIT_UNAVAILABLE while the log sink was stalled, beyond those recorded one by one"
        );
    }
    if dropped.audit > 0 || dropped.unwritable_bytes > 0 {
        tracing::error!(
            audit_events = dropped.audit,
            unwritable_bytes = dropped.unwritable_bytes,
            "audit events lost: the log buffer was full or stdout failed"
        );
    }
    if dropped.logs > 0 {
        tracing::warn!(
            log_lines = dropped.logs,
            "log lines dropped while stdout was stalled"
        );
    }
}

async fn set_serving(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter.set_service_status(SERVICE, status).await;
}
