//! `[aws]`: the region and the endpoints credgate calls.

use toml::Table;

use super::problems::Problems;

/// The keys of `[aws]`.
pub(super) const KEYS: &[&str] = &["region", "endpoint_url", "sts_endpoint_url"];

/// `[aws]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AwsSettings {
    /// Region used to sign IAM requests.
    pub region: String,
    /// Override of the IAM endpoint (an emulator or a VPC endpoint).
    pub endpoint_url: Option<String>,
    /// Override of the STS endpoint used to verify whose key a profile
    /// holds; defaults to `endpoint_url` when that is set.
    pub sts_endpoint_url: Option<String>,
}

impl Default for AwsSettings {
    fn default() -> Self {
        Self {
            region: "us-east-1".to_owned(),
            endpoint_url: None,
            sts_endpoint_url: None,
        }
    }
}

pub(super) fn parse(p: &mut Problems, root: &Table) -> AwsSettings {
    let mut s = AwsSettings::default();
    let Some(t) = p.section(root, "aws", KEYS) else {
        return s;
    };
    if t.contains_key("region") {
        s.region = p.required_string(t, "aws", "region").unwrap_or(s.region);
    }
    s.endpoint_url = p.http_url(t, "aws", "endpoint_url");
    s.sts_endpoint_url = p.http_url(t, "aws", "sts_endpoint_url");
    s
}
