//! AWS, behind one narrow seam: [`iam`] (the IAM and STS calls and the
//! classification of their failures), [`credentials`] (one SDK client per
//! profile over a shared HTTP pool), [`change_body`] (the SDK interceptor
//! that writes the passwords into a body credgate wipes) and [`password`]
//! (passwords as IAM defines them: the secret type, IAM's character rules,
//! the account password policy).

pub(crate) mod change_body;
pub(crate) mod credentials;
pub(crate) mod iam;
pub(crate) mod password;
