//! The mTLS listener: credgate's own rustls `ServerConfig` (client certificate
//! required, optional CRLs), reloaded when its files change, and an accept
//! loop that hands finished handshakes to tonic.
//!
//! tonic's built-in TLS cannot reload certificates or check CRLs, which is why
//! the handshake happens here and tonic only sees established streams.

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    io,
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    server::WebPkiClientVerifier,
    version::{TLS12, TLS13},
};
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, pem::PemObject,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;

use crate::config::TlsSettings;

/// How long a client may take to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the certificate files are compared with what is loaded.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// The process-wide crypto provider: aws-lc-rs, the only one in the tree.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The raw bytes of the TLS files, to detect changes and rebuild from.
#[derive(Clone, PartialEq, Eq, Hash)]
struct TlsFiles {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Vec<u8>,
    crl: Option<Vec<u8>>,
}

impl TlsFiles {
    fn read(settings: &TlsSettings) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let mut read = |name: &str, path: &Path| match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) => {
                problems.push(format!("tls.{name}: cannot read {}: {e}", path.display()));
                Vec::new()
            }
        };
        let files = Self {
            cert: read("cert", &settings.cert),
            key: read("key", &settings.key),
            client_ca: read("client_ca", &settings.client_ca),
            crl: settings.crl.as_deref().map(|p| read("crl", p)),
        };
        if problems.is_empty() {
            Ok(files)
        } else {
            Err(problems)
        }
    }

    fn fingerprint(&self) -> u64 {
        let mut h = DefaultHasher::new();
        self.hash(&mut h);
        h.finish()
    }

    /// Parses every file and builds the server config, listing every problem.
    fn build(&self) -> Result<ServerConfig, Vec<String>> {
        let mut problems = Vec::new();
        let chain = pem_certs(&self.cert, "tls.cert", &mut problems);
        let key = match PrivateKeyDer::from_pem_slice(&self.key) {
            Ok(key) => Some(key),
            Err(e) => {
                problems.push(format!("tls.key: no PEM private key found: {e}"));
                None
            }
        };
        let mut roots = RootCertStore::empty();
        for ca in pem_certs(&self.client_ca, "tls.client_ca", &mut problems) {
            if let Err(e) = roots.add(ca) {
                problems.push(format!("tls.client_ca: unusable CA certificate: {e}"));
            }
        }
        let crls = match &self.crl {
            None => Vec::new(),
            Some(bytes) => {
                match CertificateRevocationListDer::pem_slice_iter(bytes)
                    .collect::<Result<Vec<_>, _>>()
                {
                    Ok(crls) if crls.is_empty() => {
                        problems.push("tls.crl: no PEM X509 CRL found".to_owned());
                        Vec::new()
                    }
                    Ok(crls) => crls,
                    Err(e) => {
                        problems.push(format!("tls.crl: not a PEM CRL: {e}"));
                        Vec::new()
                    }
                }
            }
        };
        let (Some(key), true) = (key, problems.is_empty()) else {
            return Err(problems);
        };
        let provider = crypto_provider();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .with_crls(crls)
                // The CRL is the client CA's: intermediates are not revocation-checked.
                .only_check_end_entity_revocation()
                .build()
                .map_err(|e| vec![format!("tls.client_ca/tls.crl: {e}")])?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&TLS13, &TLS12])
            .map_err(|e| vec![format!("tls: {e}")])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| vec![format!("tls.cert/tls.key: {e}")])?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

fn pem_certs(bytes: &[u8], name: &str, problems: &mut Vec<String>) -> Vec<CertificateDer<'static>> {
    match CertificateDer::pem_slice_iter(bytes).collect::<Result<Vec<_>, _>>() {
        Ok(certs) if certs.is_empty() => {
            problems.push(format!("{name}: no PEM certificate found"));
            Vec::new()
        }
        Ok(certs) => certs,
        Err(e) => {
            problems.push(format!("{name}: not a PEM certificate: {e}"));
            Vec::new()
        }
    }
}

/// Checks the TLS files offline: readable, parseable, key matching the cert.
pub fn check(settings: &TlsSettings) -> Vec<String> {
    match TlsFiles::read(settings).and_then(|files| files.build()) {
        Ok(_) => Vec::new(),
        Err(problems) => problems,
    }
}

/// The current server config, swapped atomically when the files change.
pub struct ReloadingConfig {
    settings: TlsSettings,
    current: ArcSwap<ServerConfig>,
    fingerprint: std::sync::Mutex<u64>,
}

impl ReloadingConfig {
    /// Loads the files once; fails with every problem found.
    pub fn load(settings: &TlsSettings) -> Result<Self, Vec<String>> {
        let files = TlsFiles::read(settings)?;
        let config = files.build()?;
        Ok(Self {
            settings: settings.clone(),
            current: ArcSwap::from_pointee(config),
            fingerprint: std::sync::Mutex::new(files.fingerprint()),
        })
    }

    /// The config new handshakes use.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// Re-reads the files and swaps in a new config if they changed. A broken
    /// update (half-written rotation, bad key) keeps the old config serving.
    pub fn reload_if_changed(&self) -> Result<bool, Vec<String>> {
        let files = TlsFiles::read(&self.settings)?;
        let fingerprint = files.fingerprint();
        let mut loaded = self
            .fingerprint
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *loaded == fingerprint {
            return Ok(false);
        }
        let config = files.build()?;
        self.current.store(Arc::new(config));
        *loaded = fingerprint;
        Ok(true)
    }

    /// Polls the files until `shutdown` fires.
    pub async fn watch(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(RELOAD_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stopped(&mut shutdown) => return,
            }
            match self.reload_if_changed() {
                Ok(true) => tracing::info!("TLS certificates reloaded"),
                Ok(false) => {}
                Err(problems) => tracing::warn!(
                    problems = %problems.join("; "),
                    "TLS files changed but cannot be loaded; still serving the previous certificates"
                ),
            }
        }
    }
}

/// Resolves once `shutdown` says stop (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send: drop it before any await.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Accepts TCP connections and yields completed TLS handshakes to tonic.
///
/// Each handshake runs in its own task with a timeout, so one slow client
/// cannot stall the others. On shutdown the listener is dropped at once so new
/// connections are refused while tonic drains the established ones.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ReloadingConfig>,
    mut shutdown: watch::Receiver<bool>,
) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = stopped(&mut shutdown) => return,
            };
            let acceptor = TlsAcceptor::from(tls.current());
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Some(stream) = handshake(acceptor, tcp, peer).await {
                    // The receiver is gone only when the server stopped.
                    let _ = tx.send(Ok(stream)).await;
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<TlsStream<TcpStream>> {
    // gRPC is latency-sensitive and small-message: don't wait to coalesce.
    let _ = tcp.set_nodelay(true);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) => {
            tracing::info!(peer.address = %peer, error = %e, "TLS handshake rejected");
            None
        }
        Err(_) => {
            tracing::info!(peer.address = %peer, "TLS handshake timed out");
            None
        }
    }
}
