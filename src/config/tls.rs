//! `[tls]`: the server's certificate and key, the client CA, the CRLs.

use std::path::PathBuf;

use toml::{Table, Value};

use super::problems::Problems;

/// The keys of `[tls]`.
pub(super) const KEYS: &[&str] = &["cert", "key", "client_ca", "crl"];

/// `[tls]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA bundle that client certificates must chain to (PEM).
    pub client_ca: PathBuf,
    /// PEM CRL files: one per CA in the client chains (a file may hold
    /// several). Empty: no revocation checking.
    pub crl: Vec<PathBuf>,
}

pub(super) fn parse(p: &mut Problems, root: &Table) -> Option<TlsSettings> {
    if !root.contains_key("tls") {
        p.push("tls: missing section (cert, key and client_ca are required)".to_owned());
        return None;
    }
    let t = p.section(root, "tls", KEYS)?;
    let cert = p.required_string(t, "tls", "cert");
    let key = p.required_string(t, "tls", "key");
    let client_ca = p.required_string(t, "tls", "client_ca");
    // One file or a list: a chain through intermediates needs each CA's CRL.
    let crl = match t.get("crl") {
        None => Vec::new(),
        Some(Value::String(path)) => vec![PathBuf::from(path)],
        Some(Value::Array(_)) => p
            .value::<Vec<String>>(t, "tls", "crl")
            .unwrap_or_default()
            .into_iter()
            .map(PathBuf::from)
            .collect(),
        Some(other) => {
            p.push(format!(
                "tls.crl: expected a path or a list of paths, found {}",
                other.type_str()
            ));
            Vec::new()
        }
    };
    Some(TlsSettings {
        cert: cert?.into(),
        key: key?.into(),
        client_ca: client_ca?.into(),
        crl,
    })
}
