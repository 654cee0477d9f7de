//! AWS, behind one narrow seam: [`iam`] (the IAM and STS calls and the
//! classification of their failures), [`credentials`] (each IAM user's
//! clients over a shared HTTP pool), [`keys`] (where each user's key comes
//! from, its rotation and its age), [`change_body`] (the SDK interceptor
//! that writes the passwords into a body credgate wipes) and [`password`]
//! (passwords as IAM defines them: the secret type, IAM's character rules,
//! the account password policy).

pub(crate) mod change_body;
pub(crate) mod credentials;
pub(crate) mod iam;
pub(crate) mod keys;
pub(crate) mod password;
