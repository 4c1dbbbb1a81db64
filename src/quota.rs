//! Quota periods: when a provider's counters reset, and how many tokens a request reserves.
//! Pure functions of `now`, so tests set the clock instead of waiting for it.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use std::fmt;
use std::str::FromStr;

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
