//! The generated `credgate.v1` types and the descriptor set for reflection.

#![allow(missing_docs, unreachable_pub)]

use std::fmt;

tonic::include_proto!("credgate.v1");

/// Encoded `FileDescriptorSet` of `credgate.v1`, served through reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("credgate_descriptor");

// Generated without Debug (see build.rs) so that no `{:?}` of a request can
// print a password.
impl fmt::Debug for ChangePasswordRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChangePasswordRequest")
            .field("old_password", &"[REDACTED]")
            .field("new_password", &"[REDACTED]")
            .field("validate_only", &self.validate_only)
            .field("request_id", &self.request_id)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_of_a_request_never_shows_either_password() {
        let request = ChangePasswordRequest {
            old_password: "old-Secret-1".into(),
            new_password: "new-Secret-2".into(),
            validate_only: true,
            request_id: String::new(),
        };
        let shown = format!("{request:?} {request:#?}");
        assert!(!shown.contains("Secret"), "{shown}");
        assert!(shown.contains("validate_only: true"), "{shown}");
    }
}
