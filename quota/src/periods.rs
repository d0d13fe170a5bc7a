//! UTC calendar periods for quotas: which day and month a moment falls in, when they end, and
//! the key suffix that names them in the store. Pure functions of Unix milliseconds.
//!
//! Calendar months (not 30-day windows) because that is what a contract says: "10 000 calls in
//! March" resets at `04-01T00:00:00Z`, whatever the month's length.

use time::{Date, Month, OffsetDateTime, Time};

/// Which calendar quota a period belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeriodKind {
    Daily,
    Monthly,
}

impl PeriodKind {
    pub const ALL: [PeriodKind; 2] = [PeriodKind::Daily, PeriodKind::Monthly];

    pub fn as_str(self) -> &'static str {
        match self {
            PeriodKind::Daily => "daily",
            PeriodKind::Monthly => "monthly",
        }
    }
}

/// One concrete period: `[start_ms, end_ms)` in Unix milliseconds, UTC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Period {
    pub kind: PeriodKind,
    pub start_ms: u64,
    pub end_ms: u64,
    /// `YYYYMMDD` for a day, `YYYYMM` for a month: part of the store key, so a new period
    /// starts from zero without anyone resetting anything.
    pub id: String,
}

/// Why a moment cannot be placed in a period (only for absurd clocks: beyond year 9999).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("timestamp {0} ms is outside the supported calendar range (years 1970..9999)")]
pub struct PeriodError(pub u64);

fn date_of(now_ms: u64) -> Result<Date, PeriodError> {
    let secs = i64::try_from(now_ms / 1000).map_err(|_| PeriodError(now_ms))?;
    OffsetDateTime::from_unix_timestamp(secs)
        .map(|t| t.date())
        .map_err(|_| PeriodError(now_ms))
}

fn unix_ms(date: Date) -> Result<u64, PeriodError> {
    let secs = date.with_time(Time::MIDNIGHT).assume_utc().unix_timestamp();
    u64::try_from(secs)
        .ok()
        .and_then(|s| s.checked_mul(1000))
        .ok_or(PeriodError(0))
}

/// The UTC day containing `now_ms`.
pub fn day(now_ms: u64) -> Result<Period, PeriodError> {
    let d = date_of(now_ms)?;
    let next = d.next_day().ok_or(PeriodError(now_ms))?;
    Ok(Period {
        kind: PeriodKind::Daily,
        start_ms: unix_ms(d)?,
        end_ms: unix_ms(next)?,
        id: format!("{:04}{:02}{:02}", d.year(), u8::from(d.month()), d.day()),
    })
}

/// The UTC calendar month containing `now_ms`.
pub fn month(now_ms: u64) -> Result<Period, PeriodError> {
    let d = date_of(now_ms)?;
    let first =
        Date::from_calendar_date(d.year(), d.month(), 1).map_err(|_| PeriodError(now_ms))?;
    let (ny, nm) = if d.month() == Month::December {
        (d.year() + 1, Month::January)
    } else {
        (d.year(), d.month().next())
    };
    let next = Date::from_calendar_date(ny, nm, 1).map_err(|_| PeriodError(now_ms))?;
    Ok(Period {
        kind: PeriodKind::Monthly,
        start_ms: unix_ms(first)?,
        end_ms: unix_ms(next)?,
        id: format!("{:04}{:02}", d.year(), u8::from(d.month())),
    })
}

/// Both periods a check touches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Periods {
    pub day: Period,
    pub month: Period,
}

impl Periods {
    pub fn at(now_ms: u64) -> Result<Self, PeriodError> {
        Ok(Self {
            day: day(now_ms)?,
            month: month(now_ms)?,
        })
    }

    /// [`Periods::at`], computed once per UTC day and shared: a check reads the clock on
    /// every request and the periods change once a day. The cached value is used only when
    /// `now_ms` falls inside its day (and so inside its month), so any clock, even one moving
    /// back, gets the right periods.
    pub fn at_cached(now_ms: u64) -> Result<std::sync::Arc<Self>, PeriodError> {
        use std::sync::{Arc, Mutex};
        static LAST: Mutex<Option<Arc<Periods>>> = Mutex::new(None);
        let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = last.as_ref() {
            if p.day.start_ms <= now_ms && now_ms < p.day.end_ms {
                return Ok(p.clone());
            }
        }
        let p = Arc::new(Self::at(now_ms)?);
        *last = Some(p.clone());
        Ok(p)
    }

    pub fn get(&self, kind: PeriodKind) -> &Period {
        match kind {
            PeriodKind::Daily => &self.day,
            PeriodKind::Monthly => &self.month,
        }
    }
}

/// RFC 3339 UTC with second precision (`2024-03-01T00:00:00Z`), as used in `reset_at`.
pub fn rfc3339(unix_ms: u64) -> String {
    let secs = i64::try_from(unix_ms / 1000).unwrap_or(i64::MAX);
    match OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => {
            let (d, tm) = (t.date(), t.time());
            format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
                d.year(),
                u8::from(d.month()),
                d.day(),
                tm.hour(),
                tm.minute(),
                tm.second()
            )
        }
        Err(_) => "9999-12-31T23:59:59Z".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_periods_follow_the_clock_both_ways() {
        let t = 1_709_114_400_000; // 2024-02-28T10:00:00Z
        for now in [
            t,
            t + 1,
            t + 86_400_000,
            t - 86_400_000 * 40,
            t,
            t + 3 * 86_400_000,
        ] {
            assert_eq!(
                *Periods::at_cached(now).unwrap(),
                Periods::at(now).unwrap(),
                "{now}"
            );
        }
    }

    fn ms(s: &str) -> u64 {
        let t = OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap();
        u64::try_from(t.unix_timestamp()).unwrap() * 1000 + u64::from(t.millisecond())
    }

    #[test]
    fn day_bounds_are_utc_midnights() {
        let p = day(ms("2024-03-10T23:59:59.999Z")).unwrap();
        assert_eq!(p.start_ms, ms("2024-03-10T00:00:00Z"));
        assert_eq!(p.end_ms, ms("2024-03-11T00:00:00Z"));
        assert_eq!(p.id, "20240310");
        // The first millisecond of the next day belongs to the next day.
        let q = day(ms("2024-03-11T00:00:00Z")).unwrap();
        assert_eq!(q.id, "20240311");
        assert_eq!(q.start_ms, p.end_ms);
    }

    #[test]
    fn leap_year_february_has_29_days() {
        let p = month(ms("2024-02-15T12:00:00Z")).unwrap();
        assert_eq!(p.end_ms - p.start_ms, 29 * 86_400_000);
        assert_eq!(day(ms("2024-02-29T08:00:00Z")).unwrap().id, "20240229");
        assert_eq!(
            day(ms("2024-02-29T08:00:00Z")).unwrap().end_ms,
            ms("2024-03-01T00:00:00Z")
        );
    }

    #[test]
    fn common_and_century_years() {
        assert_eq!(
            month(ms("2023-02-01T00:00:00Z")).unwrap().end_ms,
            ms("2023-03-01T00:00:00Z")
        );
        // 2100 is not a leap year, 2000 was.
        let p = month(ms("2100-02-28T00:00:00Z")).unwrap();
        assert_eq!(p.end_ms - p.start_ms, 28 * 86_400_000);
        let p = month(ms("2000-02-28T00:00:00Z")).unwrap();
        assert_eq!(p.end_ms - p.start_ms, 29 * 86_400_000);
    }

    #[test]
    fn month_ends_and_year_rollover() {
        for (at, start, end, id) in [
            (
                "2024-01-31T23:59:59Z",
                "2024-01-01T00:00:00Z",
                "2024-02-01T00:00:00Z",
                "202401",
            ),
            (
                "2024-04-30T10:00:00Z",
                "2024-04-01T00:00:00Z",
                "2024-05-01T00:00:00Z",
                "202404",
            ),
            (
                "2024-12-31T23:59:59.999Z",
                "2024-12-01T00:00:00Z",
                "2025-01-01T00:00:00Z",
                "202412",
            ),
            (
                "2025-01-01T00:00:00Z",
                "2025-01-01T00:00:00Z",
                "2025-02-01T00:00:00Z",
                "202501",
            ),
        ] {
            let p = month(ms(at)).unwrap();
            assert_eq!(
                (p.start_ms, p.end_ms, p.id.as_str()),
                (ms(start), ms(end), id),
                "{at}"
            );
        }
        let d = day(ms("2024-12-31T23:59:59Z")).unwrap();
        assert_eq!(d.end_ms, ms("2025-01-01T00:00:00Z"));
    }

    #[test]
    fn epoch_and_far_future() {
        assert_eq!(day(0).unwrap().id, "19700101");
        assert_eq!(month(0).unwrap().end_ms, ms("1970-02-01T00:00:00Z"));
        assert!(day(u64::MAX).is_err());
        assert!(
            month(ms("9999-12-15T00:00:00Z")).is_err(),
            "no month after 9999-12"
        );
    }

    #[test]
    fn rfc3339_formatting() {
        assert_eq!(rfc3339(ms("2024-03-01T00:00:00Z")), "2024-03-01T00:00:00Z");
        assert_eq!(
            rfc3339(ms("1999-12-31T23:59:59.500Z")),
            "1999-12-31T23:59:59Z"
        );
    }
}
