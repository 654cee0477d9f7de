//! Listeners, the tower stack, health, reflection and graceful shutdown.
//!
//! Two ports: the mTLS port serves PasswordService, health and reflection;
//! the plaintext admin port serves only health, for Kubernetes probes, which
//! cannot present a client certificate.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    api::{self, password_service_server::PasswordServiceServer},
    config::Config,
    credentials::{self, IamClients},
    iam::Iam,
    identity::Callers,
    limits::FailedAttempts,
    rejections,
    rpc_span::{RpcSpanLayer, SERVICE},
    service::PasswordGate,
    tls::{self, ReloadingConfig},
};

/// Largest request accepted. Two 128-character passwords fit many times over;
/// anything bigger is not a password change and is refused before decoding.
const MAX_REQUEST_BYTES: usize = 4 * 1024;

/// Failures that stop the server from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
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
    /// Reflection could not be built from the descriptor sets.
    #[error("reflection: {0}")]
    Reflection(String),
    /// A server task failed.
    #[error("server: {0}")]
    Transport(String),
}

/// The two bound listeners.
pub struct Listeners {
    tls: TcpListener,
    admin: TcpListener,
}

impl Listeners {
    /// Binds both configured addresses (port 0 picks a free port).
    pub async fn bind(config: &Config) -> Result<Self, ServeError> {
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
    pub fn tls_addr(&self) -> std::io::Result<SocketAddr> {
        self.tls.local_addr()
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin.local_addr()
    }
}

/// Serves until `shutdown` resolves, then drains: admin health turns
/// NOT_SERVING, new connections are refused, in-flight calls get up to
/// `shutdown_grace` to finish.
pub async fn serve(
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
    let clients = IamClients::new(
        &config.aws,
        config.callers.iter().map(|c| c.aws_profile.as_str()),
    )
    .await;
    let gate = PasswordGate::new(
        Callers::new(&config.callers),
        Iam::new(clients),
        FailedAttempts::new(&config.limits),
        config.server.request_timeout,
    );

    let (reporter, health) = tonic_health::server::health_reporter();
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
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move { tls::stopped(&mut rx).await };

    tokio::spawn(tls_config.clone().watch(stop_rx.clone()));
    let incoming = tls::incoming(listeners.tls, tls_config, stop_rx.clone());
    let password_service =
        PasswordServiceServer::new(gate).max_decoding_message_size(MAX_REQUEST_BYTES);
    let tls_server = Server::builder()
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            config.server.max_concurrent_requests,
        ))
        .layer(RpcSpanLayer)
        .layer(rejections::layer())
        .add_service(password_service)
        .add_service(health.clone())
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone()));
    let mut tls_task = tokio::spawn(tls_server);

    let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
    let admin_server = Server::builder()
        .add_service(health)
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(listeners.admin),
            stopped(admin_stop_rx),
        );
    let admin_task = tokio::spawn(admin_server);

    tokio::select! {
        () = shutdown => {}
        // The server ending on its own is a failure; report it.
        ended = &mut tls_task => {
            let _ = admin_stop_tx.send(true);
            return match ended {
                Ok(Ok(())) => Err(ServeError::Transport("mTLS server stopped unexpectedly".into())),
                Ok(Err(e)) => Err(ServeError::Transport(e.to_string())),
                Err(e) => Err(ServeError::Transport(e.to_string())),
            };
        }
    }

    tracing::info!(
        grace = %humantime::format_duration(config.server.shutdown_grace),
        "shutting down: health NOT_SERVING, refusing new connections, draining in-flight calls"
    );
    set_serving(&reporter, ServingStatus::NotServing).await;
    let _ = stop_tx.send(true);
    match tokio::time::timeout(config.server.shutdown_grace, &mut tls_task).await {
        Ok(Ok(Ok(()))) => tracing::info!("drained"),
        Ok(Ok(Err(e))) => {
            tracing::warn!(error = %e, "mTLS server ended with an error while draining")
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "mTLS server task failed while draining"),
        Err(_) => {
            tls_task.abort();
            tracing::warn!("shutdown grace expired; cancelling the calls still in flight");
        }
    }
    // The admin port outlives the drain so probes see NOT_SERVING meanwhile.
    let _ = admin_stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(1), admin_task).await;
    Ok(())
}

async fn set_serving(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter.set_service_status(SERVICE, status).await;
}
