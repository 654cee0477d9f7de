//! One deadline per request, taken when the request arrives: queueing, body
//! read, state store, policy read and IAM all spend the same budget.

use std::time::Duration;

use tokio::time::Instant;

/// How much earlier than the caller's own deadline credgate gives up: the
/// caller must receive credgate's answer (`OUTCOME_UNKNOWN`,
/// `DEADLINE_BEFORE_SEND`) before its own timer fires and it sees a bare
/// `DEADLINE_EXCEEDED` or `CANCELLED` instead. A tenth of the budget, at most
/// 100 ms.
const MAX_MARGIN: Duration = Duration::from_millis(100);

/// When a request must be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Deadline {
    at: Instant,
    /// How much earlier than the caller's own deadline `at` is.
    margin: Duration,
}

impl Deadline {
    /// The deadline of a request arriving now: the shorter of
    /// `request_timeout` and the caller's `grpc-timeout`, less the margin.
    pub(crate) fn on_arrival(request_timeout: Duration, grpc_timeout: Option<&str>) -> Self {
        let budget = grpc_timeout
            .and_then(parse_grpc_timeout)
            .map_or(request_timeout, |t| t.min(request_timeout));
        let margin = MAX_MARGIN.min(budget / 10);
        Self {
            at: Instant::now() + budget.saturating_sub(margin),
            margin,
        }
    }

    /// A deadline at `at` (background work).
    pub(crate) fn at(at: Instant) -> Self {
        Self {
            at,
            margin: Duration::ZERO,
        }
    }

    /// Halfway between this deadline and the caller's own: when the edge
    /// answers for a handler that did not answer in time.
    pub(crate) fn fallback(self) -> Instant {
        self.at + self.margin / 2
    }

    /// The instant.
    pub(crate) fn instant(self) -> Instant {
        self.at
    }

    /// Time left, zero once passed.
    pub(crate) fn remaining(self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// Whether it has passed.
    pub(crate) fn passed(self) -> bool {
        Instant::now() >= self.at
    }
}

/// Parses a gRPC `grpc-timeout` header: up to 8 digits and a unit.
pub(crate) fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 || !value.is_ascii() {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_grpc_timeout("1500m"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
        assert_eq!(parse_grpc_timeout("10"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("+5S"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_shorter_budget_wins_less_the_margin() {
        let start = Instant::now();
        let d = Deadline::on_arrival(Duration::from_secs(10), None);
        assert_eq!(d.instant() - start, Duration::from_millis(9_900));
        let d = Deadline::on_arrival(Duration::from_secs(10), Some("500m"));
        assert_eq!(d.instant() - start, Duration::from_millis(450));
        let d = Deadline::on_arrival(Duration::from_secs(10), Some("bogus"));
        assert_eq!(d.instant() - start, Duration::from_millis(9_900));
    }

    proptest! {
        #[test]
        fn parsing_never_panics_and_accepts_only_the_grammar(value in "\\PC{0,12}") {
            if let Some(d) = parse_grpc_timeout(&value) {
                prop_assert!(value.len() >= 2 && value.len() <= 9);
                prop_assert!("HMSmun".contains(&value[value.len() - 1..]));
                prop_assert!(d <= Duration::from_secs(99_999_999 * 3600));
            }
        }

        #[test]
        fn every_well_formed_timeout_parses(n in 0u64..100_000_000, unit in "[HMSmun]") {
            let value = format!("{n}{unit}");
            prop_assert!(parse_grpc_timeout(&value).is_some(), "{}", value);
        }
    }
}
