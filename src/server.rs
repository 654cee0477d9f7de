//! Listeners, the tower stack, health, reflection and graceful shutdown.
//!
//! Two ports: the mTLS port serves PasswordService, health and reflection;
//! the plaintext admin port serves only health, for Kubernetes probes, which
//! cannot present a client certificate.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{service::Routes, transport::Server};
use tonic_health::{ServingStatus, server::HealthReporter};
use tower::Layer;

use crate::{
    api::{self, password_service_server::PasswordServiceServer},
    attempt::{Gate, UPSTREAM_TIMEOUT},
    config::Config,
    connections::{self, MakeService},
    credentials::{self, AwsClients},
    edge::{Connection, Edge, Limits, MAX_REQUEST_BYTES},
    iam::Iam,
    identity::Callers,
    policy_cache::PolicyCache,
    principal::Principals,
    rpc_span::{RpcSpan, RpcSpanLayer, SERVICE},
    service::PasswordGate,
    state::{Store, Unfit},
    tls::ReloadingConfig,
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

/// Serves until `shutdown` resolves, then drains: admin health turns
/// NOT_SERVING, new connections are refused, open connections get a GOAWAY,
/// and in-flight calls and attempts get up to `shutdown_grace` to finish.
pub(crate) async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let tls_config = Arc::new(ReloadingConfig::load(&config.tls).map_err(ServeError::Tls)?);
    // Not fatal: the other callers can still be served, and the file may be
    // fixed (Secret update) without a restart. Their calls fail with
    // UPSTREAM_CREDENTIALS_REJECTED meanwhile.
    for problem in credentials::missing_profiles(&config.callers).await {
        tracing::warn!(problem, "caller cannot be served until its profile exists");
    }
    let profiles = || config.callers.iter().map(|c| c.aws_profile.as_str());
    let clients = AwsClients::new(&config.aws, profiles()).await;
    // A claim still pending after this long belongs to a replica that died.
    let pending_lifetime =
        config.server.request_timeout + UPSTREAM_TIMEOUT + Duration::from_secs(60);
    let store =
        Store::new(&config.state, &config.limits, pending_lifetime).map_err(ServeError::State)?;
    if !store.is_shared() {
        tracing::info!(
            "state in process memory: the attempt limit and request_id replays hold for this replica only"
        );
    } else {
        match store.verify().await {
            Ok(()) => {}
            // A store that may evict keys would silently reset lockouts and
            // re-run request_ids: refuse to start on it.
            Err(e @ Unfit::Evicts(_)) => return Err(ServeError::State(e.to_string())),
            // Unreachable: start anyway and fail closed until it is back
            // (its policy is checked again then).
            Err(e @ Unfit::Unreachable(_)) => tracing::warn!(
                error = %e,
                "state store not reachable at start; ChangePassword fails closed until it is"
            ),
        }
    }
    let tracker = TaskTracker::new();
    let gate = Arc::new(Gate {
        iam: Iam::new(clients),
        store,
        principals: Principals::new(&config.callers),
        policies: PolicyCache::new(profiles()),
        tracker: tracker.clone(),
    });
    // Whose key each profile holds, learnt in the background: SERVING does
    // not wait for AWS, and a profile not verified yet is verified on use.
    tokio::spawn({
        let gate = gate.clone();
        async move { gate.principals.verify_all(&gate.iam).await }
    });

    let (reporter, health) = tonic_health::server::health_reporter();
    let health = health.max_decoding_message_size(MAX_REQUEST_BYTES);
    set_serving(&reporter, ServingStatus::Serving).await;
    // Both versions: grpcurl before 1.9 only speaks v1alpha.
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
    let routes = Routes::new(password_service)
        .add_service(health.clone())
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .prepare();
    let stack = Arc::new(Stack {
        routes,
        limits: Arc::new(Limits {
            request_timeout: config.server.request_timeout,
            concurrent: Arc::new(tokio::sync::Semaphore::new(
                config.server.max_concurrent_requests,
            )),
            per_caller: config.server.max_requests_per_caller,
        }),
    });
    let callers = Arc::new(Callers::new(
        &config.callers,
        config.server.max_requests_per_caller,
    ));

    let stop = CancellationToken::new();
    tokio::spawn(tls_config.clone().watch(stop.clone()));
    let settings = connections::Settings {
        max_connections: config.server.max_connections,
        idle_timeout: config.server.idle_timeout,
        max_connection_age: config.server.max_connection_age,
        grace: config.server.request_timeout + Duration::from_secs(1),
    };
    let mut tls_task = tokio::spawn(connections::serve(
        listeners.tls,
        tls_config,
        callers,
        settings,
        stack,
        stop.clone(),
        tracker.clone(),
    ));

    let admin_stop = CancellationToken::new();
    let admin_server = Server::builder()
        .add_service(health)
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(listeners.admin),
            admin_stop.clone().cancelled_owned(),
        );
    let admin_task = tokio::spawn(admin_server);

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
    set_serving(&reporter, ServingStatus::NotServing).await;
    stop.cancel();
    tracker.close();
    let drain_started = tokio::time::Instant::now();
    match tokio::time::timeout(config.server.shutdown_grace, tracker.wait()).await {
        Ok(()) => tracing::info!("drained"),
        Err(_) => tracing::warn!(
            still_running = tracker.len(),
            "shutdown grace expired; abandoning the calls and attempts still in flight"
        ),
    }
    // Attempts the store did not settle at once (it was down) are retried in
    // the background; give them what is left of the grace.
    gate.store
        .drain(
            config
                .server
                .shutdown_grace
                .saturating_sub(drain_started.elapsed()),
        )
        .await;
    // The admin port outlives the drain so probes see NOT_SERVING meanwhile.
    admin_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), admin_task).await;
    Ok(())
}

async fn set_serving(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter.set_service_status(SERVICE, status).await;
}
