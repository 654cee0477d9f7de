//! One `ChangePassword` attempt: its audit slot ([`audit`]), the attempt
//! itself ([`attempt`]: the `request_id` claim and the attempt limit in
//! `state`, then IAM), and the checks before IAM is called: whose key the
//! caller's profile holds ([`principal`]) and the account password policy
//! ([`policy_cache`]).

pub(crate) mod attempt;
pub(crate) mod audit;
pub(crate) mod policy_cache;
pub(crate) mod principal;
