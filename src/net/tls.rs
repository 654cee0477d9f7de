//! credgate's own rustls `ServerConfig`: client certificate required and
//! checked beyond chain validation (leaf rules, bounded names, CRLs for every
//! CA in the chain), reloaded when its files change.
//!
//! tonic's built-in TLS cannot reload certificates or check CRLs, which is why
//! the handshake happens in [`crate::net::connections`] with this config.
//!
//! A CRL past its nextUpdate refuses the handshakes of every certificate it
//! covers, as OpenSSL-based servers (nginx, Envoy) do: rustls' default is to
//! ignore the date. `check-config` fails on such a CRL and warns within
//! [`CRL_WARN_WITHIN`] of it; `credgate.tls.crl.expires_in` tells how long
//! the first one has left.

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

use crate::{config::TlsSettings, net::identity};

/// How often the certificate files are compared with what is loaded.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// How close to a CRL's nextUpdate `check-config` starts to warn.
pub const CRL_WARN_WITHIN: Duration = Duration::from_secs(24 * 3600);

/// A loaded CRL: whose it is and until when it may be used.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CrlValidity {
    /// The issuer's name, for messages.
    issuer: String,
    /// The issuer's raw DER name, to match the certificates it covers.
    issuer_raw: Vec<u8>,
    /// nextUpdate, seconds since the epoch; `None`: the CRL names none.
    next_update: Option<i64>,
}

impl CrlValidity {
    fn next_update_text(&self) -> String {
        self.next_update
            .and_then(|secs| u64::try_from(secs).ok())
            .map(|secs| {
                humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs))
                    .to_string()
            })
            .unwrap_or_default()
    }

    /// Seconds until nextUpdate (negative once passed).
    fn expires_in(&self, now: i64) -> Option<i64> {
        self.next_update.map(|at| at - now)
    }

    fn expired_text(&self) -> String {
        format!(
            "the CRL of issuer \"{}\" expired at {} (nextUpdate): certificates it covers are \
             refused until a fresh CRL is loaded (tls.crl)",
            self.issuer,
            self.next_update_text()
        )
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// What [`check`] found: problems fail `check-config`, warnings do not.
#[derive(Debug, Default)]
pub struct Checked {
    /// Unusable files, expired CRLs.
    pub problems: Vec<String>,
    /// CRLs within [`CRL_WARN_WITHIN`] of their nextUpdate.
    pub warnings: Vec<String>,
}

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
    /// An expired CRL is no problem here: it is loaded, and refuses.
    fn build(&self) -> Result<(ServerConfig, Vec<CrlValidity>), Vec<String>> {
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
        let mut validity = Vec::new();
        for bytes in &self.crls {
            match CertificateRevocationListDer::pem_slice_iter(bytes).collect::<Result<Vec<_>, _>>()
            {
                Ok(found) if found.is_empty() => {
                    problems.push("tls.crl: no PEM X509 CRL found".to_owned());
                }
                Ok(found) => {
                    for crl in found {
                        match CertificateRevocationList::from_der(crl.as_ref()) {
                            Ok((_, parsed)) => validity.push(CrlValidity {
                                issuer: parsed.issuer().to_string(),
                                issuer_raw: parsed.issuer().as_raw().to_vec(),
                                next_update: parsed.next_update().map(|t| t.timestamp()),
                            }),
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
            .enforce_revocation_expiration()
            .build()
            .map_err(|e| vec![format!("tls.client_ca/tls.crl: {e}")])?;
        let verifier = Arc::new(ClientLeafVerifier {
            webpki,
            crls: validity.clone(),
            checks_revocation,
        });
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&TLS13, &TLS12])
            .map_err(|e| vec![format!("tls: {e}")])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| vec![format!("tls.cert/tls.key: {e}")])?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok((config, validity))
    }
}

/// rustls' WebPKI client verifier plus credgate's leaf rules
/// ([`identity::check_leaf`]) and a precise error when a CRL is missing.
#[derive(Debug)]
struct ClientLeafVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
    /// The loaded CRLs.
    crls: Vec<CrlValidity>,
    checks_revocation: bool,
}

impl ClientLeafVerifier {
    /// The issuers (name, raw DER) of the chain's certificates, leaf first.
    fn issuers(
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Vec<(String, Vec<u8>)> {
        std::iter::once(end_entity)
            .chain(intermediates)
            .filter_map(|der| X509Certificate::from_der(der.as_ref()).ok())
            .map(|(_, cert)| (cert.issuer().to_string(), cert.issuer().as_raw().to_vec()))
            .collect()
    }

    /// Names the CRL of the chain that has expired.
    fn expired_crl(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> rustls::Error {
        let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        let issuers = Self::issuers(end_entity, intermediates);
        let expired = self.crls.iter().find(|crl| {
            crl.expires_in(now).is_some_and(|left| left <= 0)
                && issuers.iter().any(|(_, raw)| *raw == crl.issuer_raw)
        });
        reject(match expired {
            Some(crl) => format!("revocation status unknown: {}", crl.expired_text()),
            None => "revocation status unknown: a loaded CRL has expired".to_owned(),
        })
    }

    /// Names the first certificate of the chain whose issuer has no CRL.
    fn missing_crl(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> rustls::Error {
        let missing = Self::issuers(end_entity, intermediates)
            .into_iter()
            .find(|(_, raw)| !self.crls.iter().any(|crl| crl.issuer_raw == *raw))
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
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ExpiredRevocationList
                | CertificateError::ExpiredRevocationListContext { .. },
            )) => {
                return Err(self.expired_crl(end_entity, intermediates, now));
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

/// Checks the TLS files offline: readable, parseable, key matching the
/// cert, no CRL expired (and warns about one that soon will be).
pub fn check(settings: &TlsSettings) -> Checked {
    match TlsFiles::read(settings).and_then(|files| files.build()) {
        Ok((_, crls)) => crl_dates(&crls, unix_now()),
        Err(problems) => Checked {
            problems,
            warnings: Vec::new(),
        },
    }
}

/// Expired CRLs as problems, CRLs within [`CRL_WARN_WITHIN`] as warnings.
fn crl_dates(crls: &[CrlValidity], now: i64) -> Checked {
    let warn_within = i64::try_from(CRL_WARN_WITHIN.as_secs()).unwrap_or(i64::MAX);
    let mut checked = Checked::default();
    for crl in crls {
        match crl.expires_in(now) {
            Some(left) if left <= 0 => checked
                .problems
                .push(format!("tls.crl: {}", crl.expired_text())),
            Some(left) if left <= warn_within => checked.warnings.push(format!(
                "tls.crl: the CRL of issuer \"{}\" expires at {} (nextUpdate, in {}): \
                 load a fresh one before, or every certificate it covers is refused",
                crl.issuer,
                crl.next_update_text(),
                humantime::format_duration(Duration::from_secs(left.unsigned_abs()))
            )),
            _ => {}
        }
    }
    checked
}

/// The current server config, swapped atomically when the files change.
pub struct ReloadingConfig {
    settings: TlsSettings,
    current: ArcSwap<ServerConfig>,
    /// The CRLs `current` checks against.
    crls: ArcSwap<Vec<CrlValidity>>,
    fingerprint: std::sync::Mutex<u64>,
}

impl ReloadingConfig {
    /// Loads the files once; fails with every problem found.
    pub fn load(settings: &TlsSettings) -> Result<Self, Vec<String>> {
        let files = TlsFiles::read(settings)?;
        let (config, crls) = files.build()?;
        announce_crl_dates(&crls);
        Ok(Self {
            settings: settings.clone(),
            current: ArcSwap::from_pointee(config),
            crls: ArcSwap::from_pointee(crls),
            fingerprint: std::sync::Mutex::new(files.fingerprint()),
        })
    }

    /// Seconds until the first loaded CRL passes its nextUpdate (negative
    /// once it has); `None` without a dated CRL.
    pub fn crl_expires_in(&self) -> Option<i64> {
        let now = unix_now();
        self.crls
            .load()
            .iter()
            .filter_map(|c| c.expires_in(now))
            .min()
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
        let (config, crls) = files.build()?;
        announce_crl_dates(&crls);
        self.current.store(Arc::new(config));
        self.crls.store(Arc::new(crls));
        *loaded = fingerprint;
        Ok(true)
    }

    /// Polls the files until `shutdown` fires.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(RELOAD_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut expired = self.expired_crls();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            // A CRL that expires while loaded: said once, when it happens.
            let now_expired = self.expired_crls();
            for crl in now_expired.iter().filter(|c| !expired.contains(c)) {
                tracing::error!(crl.issuer = %crl.issuer, "{}", crl.expired_text());
            }
            expired = now_expired;
            match self.reload_if_changed() {
                Ok(true) => {
                    tracing::info!("TLS certificates reloaded");
                    // The reload announced the new CRLs' dates itself.
                    expired = self.expired_crls();
                }
                Ok(false) => {}
                Err(problems) => tracing::warn!(
                    problems = %problems.join("; "),
                    "TLS files changed but cannot be loaded; still serving the previous certificates"
                ),
            }
        }
    }

    fn expired_crls(&self) -> Vec<CrlValidity> {
        let now = unix_now();
        let crls = self.crls.load();
        crls.iter()
            .filter(|c| c.expires_in(now).is_some_and(|left| left <= 0))
            .cloned()
            .collect()
    }
}

/// Logs every loaded CRL that has expired (ERROR: handshakes are refused)
/// or expires within [`CRL_WARN_WITHIN`] (WARN).
fn announce_crl_dates(crls: &[CrlValidity]) {
    let checked = crl_dates(crls, unix_now());
    for problem in &checked.problems {
        tracing::error!("{problem}");
    }
    for warning in &checked.warnings {
        tracing::warn!("{warning}");
    }
}
