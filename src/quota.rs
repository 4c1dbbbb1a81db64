//! Quota periods: when a provider's counters reset, and the bounds on every token count.
//! Pure functions of `now`, so tests set the clock instead of waiting for it.
//!
//! # Token bounds
//! Every token count that comes from outside (a request's `max_tokens`, a lease's estimate, a
//! report, a provider's usage, a quota limit in a body or a file) is bounded before it reaches
//! a counter, so no sum can wrap, in Rust or in SQLite (where an integer sum past 2^63 silently
//! becomes a float):
//! - one request, lease or report names at most [`MAX_REQUEST_TOKENS`] (a billion; the
//!   largest context windows are a few million); more is refused with 400, and a provider's
//!   usage above it is clamped to it;
//! - a limit, a `used` set by hand and every counter stay at most [`MAX_COUNTER_TOKENS`]
//!   (10^15); counters saturate there.
//!
//! With these, `used + reserved + tokens` stays far below `i64::MAX` for any number of
//! reservations the process can hold, and the ledger computes it saturating anyway.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use std::fmt;
use std::str::FromStr;

/// The most tokens one request, lease or usage report may name.
pub const MAX_REQUEST_TOKENS: u64 = 1_000_000_000;
/// The largest quota limit, and where every counter saturates.
pub const MAX_COUNTER_TOKENS: u64 = 1_000_000_000_000_000;

/// A token count from outside, at most `MAX`: deserializing a larger number (or anything but a
/// whole number) fails with a message that names the bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct Bounded<const MAX: u64>(u64);

/// Tokens one request, lease or report names.
pub type RequestTokens = Bounded<MAX_REQUEST_TOKENS>;
/// A quota limit or counter.
pub type CounterTokens = Bounded<MAX_COUNTER_TOKENS>;

impl<const MAX: u64> Bounded<MAX> {
    pub const MAX: u64 = MAX;

    /// `n` if it is within the bound.
    pub fn new(n: u64) -> Option<Self> {
        (n <= MAX).then_some(Bounded(n))
    }

    /// `n`, or the bound when `n` is above it (for counts a provider sent, which are not
    /// refused but cannot be believed past the bound).
    pub fn clamped(n: u64) -> Self {
        Bounded(n.min(MAX))
    }

    pub fn get(self) -> u64 {
        self.0
    }

    /// As an SQLite integer: always exact, since every bound is below `i64::MAX`.
    pub fn as_i64(self) -> i64 {
        self.0 as i64
    }

    /// The message for a number above the bound.
    pub fn too_large(n: impl fmt::Display) -> String {
        format!("{n} is more than {MAX}, the most tokens this takes")
    }
}

impl<'de, const MAX: u64> serde::Deserialize<'de> for Bounded<MAX> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<const MAX: u64>;
        impl<const MAX: u64> serde::de::Visitor<'_> for Visit<MAX> {
            type Value = Bounded<MAX>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a whole number of tokens from 0 to {MAX}")
            }

            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Self::Value, E> {
                Bounded::new(n).ok_or_else(|| E::custom(Bounded::<MAX>::too_large(n)))
            }

            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Self::Value, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::custom(format!(
                        "{n} is negative; give 0 to {MAX} tokens"
                    ))),
                }
            }

            fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Self::Value, E> {
                if n.is_finite() && n > MAX as f64 {
                    return Err(E::custom(Bounded::<MAX>::too_large(n)));
                }
                Err(E::invalid_type(serde::de::Unexpected::Float(n), &self))
            }
        }
        d.deserialize_any(Visit::<MAX>)
    }
}

/// When a provider's quota counters go back to zero.
#[derive(Clone)]
pub enum ResetSchedule {
    Daily,
    Weekly,
    Monthly,
    Never,
    /// A cron expression with seconds, evaluated in UTC.
    Cron(Box<Cron>, String),
}

impl fmt::Debug for ResetSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_string())
    }
}

impl fmt::Display for ResetSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResetSchedule::Daily => f.write_str("daily"),
            ResetSchedule::Weekly => f.write_str("weekly"),
            ResetSchedule::Monthly => f.write_str("monthly"),
            ResetSchedule::Never => f.write_str("never"),
            ResetSchedule::Cron(_, text) => f.write_str(text),
        }
    }
}

impl PartialEq for ResetSchedule {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}

impl FromStr for ResetSchedule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "daily" => Ok(ResetSchedule::Daily),
            "weekly" => Ok(ResetSchedule::Weekly),
            "monthly" => Ok(ResetSchedule::Monthly),
            "never" => Ok(ResetSchedule::Never),
            other => CronParser::builder()
                .seconds(Seconds::Required)
                .build()
                .parse(other)
                .map(|c| ResetSchedule::Cron(Box::new(c), other.to_string()))
                .map_err(|e| {
                    format!(
                        "`{other}` is not daily, weekly, monthly, never or a cron expression with seconds ({e})"
                    )
                }),
        }
    }
}

impl<'de> serde::Deserialize<'de> for ResetSchedule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn midnight(date: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0).expect("midnight exists"))
}

fn first_of_month(year: i32, month: u32) -> DateTime<Utc> {
    midnight(NaiveDate::from_ymd_opt(year, month, 1).expect("valid first of month"))
}

impl ResetSchedule {
    /// The start of the period that contains `now`. For `never`, the period is all of time and
    /// starts when the counter was created, so the caller's `now` is returned.
    pub fn period_start(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            ResetSchedule::Daily => midnight(now.date_naive()),
            ResetSchedule::Weekly => {
                let days = now.weekday().num_days_from_monday() as i64;
                midnight(now.date_naive()) - Duration::days(days)
            }
            ResetSchedule::Monthly => first_of_month(now.year(), now.month()),
            ResetSchedule::Never => now,
            ResetSchedule::Cron(cron, _) => {
                cron.find_previous_occurrence(&now, true).unwrap_or(now)
            }
        }
    }

    /// The start of the period that contains `now`, for a schedule that has periods: `None`
    /// for `never`, and for a cron expression that never fired before `now`. The scheduled
    /// reset's one input: a counter is due when its period began before this (see
    /// [`ResetSchedule::reset_due`]).
    pub fn current_start(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            ResetSchedule::Never => None,
            ResetSchedule::Cron(cron, _) => cron.find_previous_occurrence(&now, true).ok(),
            _ => Some(self.period_start(now)),
        }
    }

    /// Whether a counter whose period began at `period_start` is due a reset at `now`, and if
    /// so the start of its new period: a boundary of the schedule lies in `(period_start,
    /// now]`. The store's scheduled reset applies this rule in SQL (`period_start < start`),
    /// so a reset applies once however late it runs, and a counter created in the current
    /// period is never due.
    pub fn reset_due(
        &self,
        period_start: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        self.current_start(now)
            .filter(|start| period_start < *start)
    }

    /// The first reset strictly after `after`; `None` for `never`.
    pub fn next_reset(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            ResetSchedule::Daily => Some(midnight(after.date_naive()) + Duration::days(1)),
            ResetSchedule::Weekly => Some(self.period_start(after) + Duration::days(7)),
            ResetSchedule::Monthly => {
                let (y, m) = if after.month() == 12 {
                    (after.year() + 1, 1)
                } else {
                    (after.year(), after.month() + 1)
                };
                Some(first_of_month(y, m))
            }
            ResetSchedule::Never => None,
            ResetSchedule::Cron(cron, _) => cron.find_next_occurrence(&after, false).ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn bounded_token_counts() {
        type B = Bounded<100>;
        let parse = |text: &str| serde_json::from_str::<B>(text);
        for ok in ["0", "1", "99", "100"] {
            assert_eq!(parse(ok).unwrap().get(), ok.parse::<u64>().unwrap());
        }
        for bad in [
            "101",
            "18446744073709551615",
            "9223372036854775807",
            "100000000000000000000",
            "1e300",
            "-1",
            "-9223372036854775808",
            "1.5",
            "\"5\"",
            "null",
            "true",
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(!e.is_empty(), "{bad}");
        }
        assert!(parse("101").unwrap_err().to_string().contains("100"));
        assert_eq!(B::clamped(u64::MAX).get(), 100);
        assert_eq!(B::clamped(7).get(), 7);
        assert_eq!(B::new(101), None);
        assert_eq!(
            CounterTokens::clamped(u64::MAX).as_i64(),
            MAX_COUNTER_TOKENS as i64
        );
    }

    #[test]
    fn calendar_periods() {
        let now = t("2026-11-27T10:30:00Z"); // a Friday
        let d = ResetSchedule::Daily;
        assert_eq!(d.period_start(now), t("2026-11-27T00:00:00Z"));
        assert_eq!(d.next_reset(now), Some(t("2026-11-28T00:00:00Z")));
        let w = ResetSchedule::Weekly;
        assert_eq!(w.period_start(now), t("2026-11-23T00:00:00Z"));
        assert_eq!(w.next_reset(now), Some(t("2026-11-30T00:00:00Z")));
        let m = ResetSchedule::Monthly;
        assert_eq!(m.period_start(now), t("2026-11-01T00:00:00Z"));
        assert_eq!(m.next_reset(now), Some(t("2026-12-01T00:00:00Z")));
        assert_eq!(
            m.next_reset(t("2026-12-31T23:59:59Z")),
            Some(t("2027-01-01T00:00:00Z"))
        );
        assert_eq!(ResetSchedule::Never.next_reset(now), None);
    }

    #[test]
    fn cron_periods() {
        let c: ResetSchedule = "0 0 */6 * * *".parse().unwrap();
        let now = t("2026-11-27T10:30:00Z");
        assert_eq!(c.period_start(now), t("2026-11-27T06:00:00Z"));
        assert_eq!(c.next_reset(now), Some(t("2026-11-27T12:00:00Z")));
        assert!("every tuesday".parse::<ResetSchedule>().is_err());
        assert!(
            "0 0 * * *".parse::<ResetSchedule>().is_err(),
            "seconds are required"
        );
    }

    /// Whether a counter started at `start` is due at `now`.
    fn due(s: &ResetSchedule, start: &str, now: &str) -> bool {
        s.reset_due(t(start), t(now)).is_some()
    }

    #[test]
    fn due_at_the_boundary_and_not_the_second_before() {
        let d = ResetSchedule::Daily;
        assert!(!due(&d, "2026-11-27T00:00:00Z", "2026-11-27T23:59:59Z"));
        assert!(due(&d, "2026-11-27T00:00:00Z", "2026-11-28T00:00:00Z"));
        assert_eq!(
            d.reset_due(t("2026-11-27T00:00:00Z"), t("2026-11-28T00:00:00Z")),
            Some(t("2026-11-28T00:00:00Z"))
        );
        // Several boundaries passed (a server down for days): one reset, to the current one.
        assert_eq!(
            d.reset_due(t("2026-11-20T00:00:00Z"), t("2026-11-28T13:00:00Z")),
            Some(t("2026-11-28T00:00:00Z"))
        );
        // A counter whose period starts later than now (a clock set back) is not due.
        assert!(!due(&d, "2026-11-29T00:00:00Z", "2026-11-28T13:00:00Z"));
        let w = ResetSchedule::Weekly;
        assert!(!due(&w, "2026-11-23T00:00:00Z", "2026-11-29T23:59:59Z"));
        assert!(due(&w, "2026-11-23T00:00:00Z", "2026-11-30T00:00:00Z"));
    }

    #[test]
    fn due_over_month_ends_and_leap_days() {
        let m = ResetSchedule::Monthly;
        for (start, last, first) in [
            ("2026-01-01", "2026-01-31", "2026-02-01"),
            ("2026-02-01", "2026-02-28", "2026-03-01"),
            ("2028-02-01", "2028-02-29", "2028-03-01"),
            ("2026-04-01", "2026-04-30", "2026-05-01"),
            ("2026-12-01", "2026-12-31", "2027-01-01"),
        ] {
            let start = format!("{start}T00:00:00Z");
            assert!(!due(&m, &start, &format!("{last}T23:59:59Z")), "{last}");
            assert!(due(&m, &start, &format!("{first}T00:00:00Z")), "{first}");
        }
        let d = ResetSchedule::Daily;
        assert!(due(&d, "2028-02-28T00:00:00Z", "2028-02-29T00:00:00Z"));
        assert!(!due(&d, "2028-02-29T00:00:00Z", "2028-02-29T23:59:59Z"));
        assert!(due(&d, "2028-02-29T00:00:00Z", "2028-03-01T00:00:00Z"));
        // A cron expression on the leap day alone: due from 2028-02-29, not in the years
        // between.
        let leap: ResetSchedule = "0 0 0 29 2 *".parse().unwrap();
        assert!(!due(&leap, "2024-02-29T00:00:00Z", "2028-02-28T23:59:59Z"));
        assert!(due(&leap, "2024-02-29T00:00:00Z", "2028-02-29T00:00:00Z"));
    }

    #[test]
    fn due_for_cron_and_never() {
        let c: ResetSchedule = "30 15 */6 * * *".parse().unwrap();
        assert!(!due(&c, "2026-11-27T06:15:30Z", "2026-11-27T12:15:29Z"));
        assert!(due(&c, "2026-11-27T06:15:30Z", "2026-11-27T12:15:30Z"));
        assert_eq!(
            c.reset_due(t("2026-11-27T06:15:30Z"), t("2026-11-27T17:00:00Z")),
            Some(t("2026-11-27T12:15:30Z"))
        );
        let n = ResetSchedule::Never;
        assert_eq!(n.current_start(t("2026-11-27T00:00:00Z")), None);
        assert!(!due(&n, "1970-01-01T00:00:00Z", "2099-01-01T00:00:00Z"));
    }

    #[test]
    fn next_reset_is_after_period_start_for_any_instant() {
        for s in ["daily", "weekly", "monthly", "0 30 1 * * *"] {
            let sched: ResetSchedule = s.parse().unwrap();
            let mut now = t("2026-01-01T00:00:00Z");
            for _ in 0..500 {
                let start = sched.period_start(now);
                let next = sched.next_reset(now).unwrap();
                assert!(start <= now && now < next, "{s} at {now}: {start} {next}");
                now += Duration::minutes(1013);
            }
        }
    }
}
