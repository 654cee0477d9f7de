//! credgate's own rustls `ServerConfig`: client certificate required and
//! checked beyond chain validation (leaf rules, bounded names, CRLs for every
//! CA in the chain), reloaded when its files change.
//!
//! tonic's built-in TLS cannot reload certificates or check CRLs, which is why
//! the handshake happens in [`crate::connections`] with this config.

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    path::Path,
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    ServerConfig, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    crypto::CryptoProvider,
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    version::{TLS12, TLS13},
};
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime, pem::PemObject,
};
use tokio_util::sync::CancellationToken;
use x509_parser::{
    certificate::X509Certificate, prelude::FromDer, revocation_list::CertificateRevocationList,
};

use crate::{config::TlsSettings, identity};

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
    crls: Vec<Vec<u8>>,
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
            crls: settings.crl.iter().map(|p| read("crl", p)).collect(),
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
        let mut crls = Vec::new();
        let mut crl_issuers = Vec::new();
        for bytes in &self.crls {
            match CertificateRevocationListDer::pem_slice_iter(bytes).collect::<Result<Vec<_>, _>>()
            {
                Ok(found) if found.is_empty() => {
                    problems.push("tls.crl: no PEM X509 CRL found".to_owned());
                }
                Ok(found) => {
                    for crl in found {
                        match CertificateRevocationList::from_der(crl.as_ref()) {
                            Ok((_, parsed)) => crl_issuers.push(parsed.issuer().as_raw().to_vec()),
                            Err(e) => problems.push(format!("tls.crl: unparsable CRL: {e}")),
                        }
                        crls.push(crl);
                    }
                }
                Err(e) => problems.push(format!("tls.crl: not a PEM CRL: {e}")),
            }
        }
        let (Some(key), true) = (key, problems.is_empty()) else {
            return Err(problems);
        };
        let provider = crypto_provider();
        let checks_revocation = !crls.is_empty();
        // Every certificate of the chain is checked against its issuer's
        // CRL, and a certificate whose issuer has no CRL loaded is refused
        // (fail closed): with CRLs configured, "unknown" is not "valid".
        let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .with_crls(crls)
            .build()
            .map_err(|e| vec![format!("tls.client_ca/tls.crl: {e}")])?;
        let verifier = Arc::new(ClientLeafVerifier {
            webpki,
            crl_issuers,
            checks_revocation,
        });
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

/// rustls' WebPKI client verifier plus credgate's leaf rules
/// ([`identity::check_leaf`]) and a precise error when a CRL is missing.
#[derive(Debug)]
struct ClientLeafVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
    /// Raw issuer names of the loaded CRLs.
    crl_issuers: Vec<Vec<u8>>,
    checks_revocation: bool,
}

impl ClientLeafVerifier {
    /// Names the first certificate of the chain whose issuer has no CRL.
    fn missing_crl(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> rustls::Error {
        let missing = std::iter::once(end_entity)
            .chain(intermediates)
            .filter_map(|der| X509Certificate::from_der(der.as_ref()).ok())
            .map(|(_, cert)| (cert.issuer().to_string(), cert.issuer().as_raw().to_vec()))
            .find(|(_, raw)| !self.crl_issuers.iter().any(|i| i == raw))
            .map(|(name, _)| name);
        let text = match missing {
            Some(issuer) => format!(
                "revocation status unknown: no CRL is loaded for issuer \"{issuer}\" \
                 (add that CA's CRL to tls.crl)"
            ),
            None => "revocation status unknown: a loaded CRL has expired or is unusable".to_owned(),
        };
        reject(text)
    }
}

fn reject(text: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(LeafRejected(
        text,
    )))))
}

#[derive(Debug)]
struct LeafRejected(String);

impl std::fmt::Display for LeafRejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LeafRejected {}

impl ClientCertVerifier for ClientLeafVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self
            .webpki
            .verify_client_cert(end_entity, intermediates, now)
        {
            Err(rustls::Error::InvalidCertificate(CertificateError::UnknownRevocationStatus))
                if self.checks_revocation =>
            {
                return Err(self.missing_crl(end_entity, intermediates));
            }
            result => result?,
        };
        identity::check_leaf(end_entity.as_ref()).map_err(reject)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
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
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(RELOAD_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
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
