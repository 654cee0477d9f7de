//! `credgate dev-pki`: a throwaway CA with a server certificate and client
//! certificates, for local runs, demos and tests. Never for production: the
//! CA key is written next to the certificates.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CertificateRevocationListParams,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// SPIFFE ID of the client certificate written when none is asked for.
pub const DEFAULT_CLIENT_ID: &str = "spiffe://credgate.local/ns/dev/sa/dev-client";

/// Errors generating or writing the PKI.
#[derive(Debug, thiserror::Error)]
pub enum DevPkiError {
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A client identity is not usable.
    #[error("client identity {0:?}: {1}")]
    Identity(String, String),
}

/// A certificate and its private key, PEM-encoded.
pub struct Issued {
    /// Certificate (PEM).
    pub cert_pem: String,
    /// The certificate followed by its issuer's chain up to (not including)
    /// the root: what a client presents when issued by an intermediate.
    pub chain_pem: String,
    /// Private key (PKCS#8 PEM).
    pub key_pem: String,
    der: Vec<u8>,
    serial: SerialNumber,
}

impl Issued {
    /// The certificate (DER).
    pub fn der(&self) -> Vec<u8> {
        self.der.clone()
    }
}

/// What a client certificate should say about its holder.
#[derive(Debug, Clone, Default)]
pub struct ClientSpec {
    /// URI SANs (a SPIFFE identity uses exactly one).
    pub uris: Vec<String>,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// Subject CN.
    pub common_name: Option<String>,
    /// Deliberate departures from a proper leaf, for tests of the rules
    /// credgate enforces on client certificates.
    pub defects: LeafDefects,
}

/// Ways a client certificate can break the leaf rules.
#[derive(Debug, Clone, Copy, Default)]
pub struct LeafDefects {
    /// No extended key usage extension at all.
    pub no_extended_key_usage: bool,
    /// No basicConstraints extension.
    pub no_basic_constraints: bool,
    /// keyCertSign in the key usage.
    pub key_cert_sign: bool,
}

impl ClientSpec {
    /// A workload certificate with one SPIFFE ID.
    pub fn spiffe(id: &str) -> Self {
        Self {
            uris: vec![id.to_owned()],
            ..Self::default()
        }
    }
}

/// A certificate authority that issues server and client certificates.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (PEM).
    pub cert_pem: String,
    /// The CA private key (PEM).
    pub key_pem: String,
    /// What a leaf issued here presents after itself: nothing for a root,
    /// this certificate and its parents' chain for an intermediate.
    chain_pem: String,
}

fn serial() -> SerialNumber {
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&nanos.to_be_bytes());
    bytes[8..].copy_from_slice(&n.to_be_bytes());
    // Positive, as DER INTEGER serials must be.
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(serial());
    validity(&mut params, 365);
    params
}

/// Makes `params` a leaf's — a fresh serial, digital signatures only, not
/// a CA, valid for 90 days — and returns its new key and serial.
fn leaf(params: &mut CertificateParams) -> Result<(KeyPair, SerialNumber), rcgen::Error> {
    let key = KeyPair::generate()?;
    let serial = serial();
    params.serial_number = Some(serial.clone());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.is_ca = IsCa::ExplicitNoCa;
    validity(params, 90);
    Ok((key, serial))
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    // Backdated a little: clocks in a cluster disagree.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days);
}

impl Authority {
    /// A new self-signed CA valid for a year.
    pub fn new(name: &str) -> Result<Self, DevPkiError> {
        let key = KeyPair::generate()?;
        let params = ca_params(name);
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
            chain_pem: String::new(),
        })
    }

    /// An intermediate CA signed by this one.
    pub fn intermediate(&self, name: &str) -> Result<Self, DevPkiError> {
        let key = KeyPair::generate()?;
        let params = ca_params(name);
        let (cert, chain_pem) = self.signed(&params, &key)?;
        Ok(Self {
            chain_pem,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// `params` for `key`, signed by this CA, and the chain the new
    /// certificate presents: itself, then this CA's own chain.
    fn signed(
        &self,
        params: &CertificateParams,
        key: &KeyPair,
    ) -> Result<(Certificate, String), rcgen::Error> {
        let cert = params.signed_by(key, &self.issuer)?;
        let chain_pem = format!("{}{}", cert.pem(), self.chain_pem);
        Ok((cert, chain_pem))
    }

    fn issue(&self, mut params: CertificateParams) -> Result<Issued, DevPkiError> {
        let (key, serial) = leaf(&mut params)?;
        Ok(self.sign(params, key, serial)?)
    }

    fn sign(
        &self,
        params: CertificateParams,
        key: KeyPair,
        serial: SerialNumber,
    ) -> Result<Issued, rcgen::Error> {
        let (cert, chain_pem) = self.signed(&params, &key)?;
        Ok(Issued {
            chain_pem,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
            serial,
        })
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server(&self, names: &[String]) -> Result<Issued, DevPkiError> {
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().map_or("credgate", String::as_str),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A client certificate saying what `spec` says.
    pub fn client(&self, spec: &ClientSpec) -> Result<Issued, DevPkiError> {
        let mut params = CertificateParams::default();
        for uri in &spec.uris {
            let san = uri
                .as_str()
                .try_into()
                .map_err(|e: rcgen::Error| DevPkiError::Identity(uri.clone(), e.to_string()))?;
            params.subject_alt_names.push(SanType::URI(san));
        }
        for dns in &spec.dns_names {
            let san = dns
                .as_str()
                .try_into()
                .map_err(|e: rcgen::Error| DevPkiError::Identity(dns.clone(), e.to_string()))?;
            params.subject_alt_names.push(SanType::DnsName(san));
        }
        if let Some(cn) = &spec.common_name {
            params
                .distinguished_name
                .push(DnType::CommonName, cn.as_str());
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let (key, serial) = leaf(&mut params)?;
        let defects = spec.defects;
        if defects.no_extended_key_usage {
            params.extended_key_usages.clear();
        }
        if defects.no_basic_constraints {
            params.is_ca = IsCa::NoCa;
        }
        if defects.key_cert_sign {
            params.key_usages.push(KeyUsagePurpose::KeyCertSign);
        }
        Ok(self.sign(params, key, serial)?)
    }

    /// A CRL (PEM) revoking `revoked`, valid for a week.
    pub fn crl(&self, revoked: &[&Issued]) -> Result<String, DevPkiError> {
        self.crl_until(
            revoked,
            std::time::SystemTime::now() + std::time::Duration::from_secs(7 * 24 * 3600),
        )
    }

    /// A CRL (PEM) revoking `revoked` whose nextUpdate is `next_update`
    /// (in the past: an expired CRL), issued an hour before the earlier of
    /// now and `next_update`.
    pub fn crl_until(
        &self,
        revoked: &[&Issued],
        next_update: std::time::SystemTime,
    ) -> Result<String, DevPkiError> {
        let now = OffsetDateTime::now_utc();
        let next_update = OffsetDateTime::from(next_update);
        let params = CertificateRevocationListParams {
            this_update: now.min(next_update) - Duration::hours(1),
            next_update,
            crl_number: serial(),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|issued| RevokedCertParams {
                    serial_number: issued.serial.clone(),
                    revocation_time: now - Duration::minutes(1),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}

/// What `dev-pki` wrote.
#[derive(Debug)]
pub struct Written {
    /// Every file, in writing order.
    pub files: Vec<PathBuf>,
    /// `(SPIFFE ID, certificate path)` per client.
    pub clients: Vec<(String, PathBuf)>,
}

/// Writes `ca.crt`, `ca.key`, `ca.crl` (empty), `server.crt`, `server.key`
/// (for localhost, 127.0.0.1 and `server_names`) and `client-N.crt`/`.key`
/// per client ID into `out`.
pub fn write(
    out: &Path,
    server_names: &[String],
    clients: &[String],
) -> Result<Written, DevPkiError> {
    let ca = Authority::new("credgate dev CA")?;
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    names.extend(server_names.iter().cloned());
    let server = ca.server(&names)?;
    let default_client = [DEFAULT_CLIENT_ID.to_owned()];
    let clients = if clients.is_empty() {
        &default_client[..]
    } else {
        clients
    };

    std::fs::create_dir_all(out).map_err(|source| DevPkiError::Write {
        path: out.to_owned(),
        source,
    })?;
    let mut written = Written {
        files: Vec::new(),
        clients: Vec::new(),
    };
    let mut put = |name: &str, text: &str, secret: bool| -> Result<PathBuf, DevPkiError> {
        let path = out.join(name);
        write_file(&path, text, secret).map_err(|source| DevPkiError::Write {
            path: path.clone(),
            source,
        })?;
        written.files.push(path.clone());
        Ok(path)
    };
    put("ca.crt", &ca.cert_pem, false)?;
    put("ca.key", &ca.key_pem, true)?;
    put("ca.crl", &ca.crl(&[])?, false)?;
    put("server.crt", &server.cert_pem, false)?;
    put("server.key", &server.key_pem, true)?;
    let mut client_paths = Vec::new();
    for (i, id) in clients.iter().enumerate() {
        if let Err(why) = crate::spiffe::validate(id) {
            return Err(DevPkiError::Identity(
                id.clone(),
                format!("not a SPIFFE ID (spiffe://trust-domain/path): {why}"),
            ));
        }
        let issued = ca.client(&ClientSpec::spiffe(id))?;
        let cert = put(&format!("client-{}.crt", i + 1), &issued.cert_pem, false)?;
        put(&format!("client-{}.key", i + 1), &issued.key_pem, true)?;
        client_paths.push((id.clone(), cert));
    }
    written.clients = client_paths;
    Ok(written)
}

fn write_file(path: &Path, text: &str, secret: bool) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mode = if secret { 0o600 } else { 0o644 };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    std::io::Write::write_all(&mut file, text.as_bytes())
}
