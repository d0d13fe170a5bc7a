//! One ShouldRateLimit decision over all of a request's limited descriptors, as a pure
//! function of their stored counters and the time. The memory store runs this under its lock;
//! the Redis store runs `store::scripts::RLS_CHECK`, a line-by-line port, in one script, so
//! both are atomic over the whole request.
//!
//! All or nothing: the request is admitted only if every enforced descriptor admits its hits;
//! then every descriptor that admits them is charged. A denied request charges nothing
//! anywhere (envoyproxy/ratelimit charges every descriptor, even when another one denies).
//! A shadow-mode descriptor never denies; it is charged only when it would have admitted, so
//! its counter behaves as it would when enforced.
//!
//! Every operand stays below 2^53 (hits are clamped to `limit + 1`, see `rls::config`
//! bounds), so the script's doubles give the same answers.

use crate::rls::config::{Algorithm, Unit};
use time::{Date, Month, OffsetDateTime, Time};

/// One limited descriptor of a request, resolved against the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Item {
    pub algorithm: Algorithm,
    pub limit: u64,
    /// The unit's length in ms (nominal for the smooth algorithms).
    pub unit_ms: u64,
    /// Current window (fixed and sliding windows; unused by the token bucket).
    pub window_start_ms: u64,
    pub window_end_ms: u64,
    /// Hits to charge, already clamped to `limit + 1`.
    pub hits: u64,
    pub shadow: bool,
}

/// An item's stored state: fixed window `a` = count; token bucket `a` = level (tokens x
/// unit_ms), `b` = time of the level (absent = full); sliding window `a` = current window's
/// count, `b` = previous window's count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct State {
    pub a: Option<u64>,
    pub b: Option<u64>,
}

/// What to store for a charged item (the key that holds `a`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// Fixed or sliding window: the current window's new count.
    Count(u64),
    /// Token bucket: new level and its time.
    Bucket { level: u64, t_ms: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ItemResult {
    /// Over the limit and enforced: this descriptor denies the request.
    pub over: bool,
    /// Over the limit in shadow mode: answered OK, counted as a shadow denial.
    pub shadow_denied: bool,
    /// Hits left after this request (before it, when it was not charged).
    pub remaining: u64,
    /// Milliseconds until the limit is fully available again (window end, or bucket full).
    pub reset_ms: u64,
    /// Set when the item was charged.
    pub write: Option<Write>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub over: bool,
    pub items: Vec<ItemResult>,
}

struct Assess {
    admits: bool,
    before: (u64, u64),
    after: (u64, u64),
    write: Write,
}

fn ceil_div(a: u64, b: u64) -> u64 {
    if b == 0 {
        return 0;
    }
    (a as f64 / b as f64).ceil() as u64
}

fn floor_div(a: u64, b: u64) -> u64 {
    if b == 0 {
        return 0;
    }
    (a as f64 / b as f64).floor() as u64
}

fn assess(it: &Item, st: State, now: u64) -> Assess {
    let (l, u, h) = (it.limit, it.unit_ms, it.hits);
    let to_end = it.window_end_ms.saturating_sub(now);
    match it.algorithm {
        Algorithm::FixedWindow => {
            let used = st.a.unwrap_or(0);
            let after = used.saturating_add(h);
            Assess {
                admits: after <= l,
                before: (l.saturating_sub(used), to_end),
                after: (l.saturating_sub(after), to_end),
                write: Write::Count(after),
            }
        }
        Algorithm::TokenBucket => {
            // Level in tokens x unit_ms: refilling `l` tokens per `u` ms adds `l` per ms.
            let cap = l * u;
            let (mut level, mut t) = (cap, now);
            if let (Some(a), Some(b)) = (st.a, st.b) {
                level = a;
                t = b;
                if now > t {
                    level = level.saturating_add((now - t).saturating_mul(l));
                    t = now;
                }
                level = level.min(cap);
            }
            let need = h * u;
            let admits = need <= level;
            let left = if admits { level - need } else { level };
            Assess {
                admits,
                before: (floor_div(level, u), ceil_div(cap - level, l)),
                after: (floor_div(left, u), ceil_div(cap - left, l)),
                write: Write::Bucket {
                    level: left,
                    t_ms: t,
                },
            }
        }
        Algorithm::SlidingWindow => {
            let elapsed = now.saturating_sub(it.window_start_ms).min(u);
            let cur = st.a.unwrap_or(0);
            let prev = st.b.unwrap_or(0);
            // The estimate x unit_ms: the previous window weighted by its overlap with the
            // last unit of time, plus the current window.
            let w = prev
                .saturating_mul(u - elapsed)
                .saturating_add(cur.saturating_mul(u));
            let budget = l * u;
            let admits = w.saturating_add(h * u) <= budget;
            Assess {
                admits,
                before: (floor_div(budget.saturating_sub(w), u), to_end),
                after: (
                    floor_div(budget.saturating_sub(w.saturating_add(h * u)), u),
                    to_end,
                ),
                write: Write::Count(cur.saturating_add(h)),
            }
        }
    }
}

/// Decides the whole request; `states[i]` belongs to `items[i]`.
pub fn decide(items: &[Item], states: &[State], now_ms: u64) -> Decision {
    let assessed: Vec<Assess> = items
        .iter()
        .zip(
            states
                .iter()
                .copied()
                .chain(std::iter::repeat(State::default())),
        )
        .map(|(it, st)| assess(it, st, now_ms))
        .collect();
    let over = items
        .iter()
        .zip(&assessed)
        .any(|(it, a)| !it.shadow && !a.admits);
    let items = items
        .iter()
        .zip(assessed)
        .map(|(it, a)| {
            let charged = !over && a.admits;
            let (remaining, reset_ms) = if charged { a.after } else { a.before };
            ItemResult {
                over: !a.admits && !it.shadow,
                shadow_denied: !a.admits && it.shadow,
                remaining,
                reset_ms,
                write: charged.then_some(a.write),
            }
        })
        .collect();
    Decision { over, items }
}

/// Why a moment has no window (only for absurd clocks, beyond year 9999).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("timestamp {0} ms is outside the supported calendar range")]
pub struct WindowError(pub u64);

fn year_start_ms(year: i32, now: u64) -> Result<u64, WindowError> {
    let d = Date::from_calendar_date(year, Month::January, 1).map_err(|_| WindowError(now))?;
    u64::try_from(d.with_time(Time::MIDNIGHT).assume_utc().unix_timestamp())
        .ok()
        .and_then(|s| s.checked_mul(1000))
        .ok_or(WindowError(now))
}

/// The window containing `now_ms`: UTC-aligned multiples of the unit for second..day, the
/// calendar month or year for those (fixed windows). The sliding window uses nominal units.
pub fn window(unit: Unit, algorithm: Algorithm, now_ms: u64) -> Result<(u64, u64), WindowError> {
    let calendar = algorithm == Algorithm::FixedWindow;
    match unit {
        Unit::Month if calendar => {
            let p = crate::periods::month(now_ms).map_err(|_| WindowError(now_ms))?;
            Ok((p.start_ms, p.end_ms))
        }
        Unit::Year if calendar => {
            let secs = i64::try_from(now_ms / 1000).map_err(|_| WindowError(now_ms))?;
            let y = OffsetDateTime::from_unix_timestamp(secs)
                .map_err(|_| WindowError(now_ms))?
                .year();
            Ok((year_start_ms(y, now_ms)?, year_start_ms(y + 1, now_ms)?))
        }
        Unit::Week if calendar => {
            // ISO weeks start on Monday; 1970-01-01 was a Thursday (3 days after a Monday).
            let u = unit.nominal_ms();
            let shifted = now_ms.saturating_add(3 * 86_400_000);
            let start = (shifted - shifted % u).saturating_sub(3 * 86_400_000);
            Ok((start, start.saturating_add(u)))
        }
        _ => {
            let u = unit.nominal_ms();
            let start = now_ms - now_ms % u;
            Ok((start, start.saturating_add(u)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(algorithm: Algorithm, limit: u64, hits: u64, now: u64) -> Item {
        let (s, e) = window(Unit::Minute, algorithm, now).unwrap();
        Item {
            algorithm,
            limit,
            unit_ms: 60_000,
            window_start_ms: s,
            window_end_ms: e,
            hits,
            shadow: false,
        }
    }

    fn apply(st: &mut State, w: Option<Write>) {
        match w {
            Some(Write::Count(c)) => st.a = Some(c),
            Some(Write::Bucket { level, t_ms }) => {
                st.a = Some(level);
                st.b = Some(t_ms);
            }
            None => {}
        }
    }

    #[test]
    fn fixed_window_admits_exactly_n_then_resets_at_the_edge() {
        let mut st = State::default();
        let now = 120_000 + 15_000;
        for i in 0..3 {
            let d = decide(&[item(Algorithm::FixedWindow, 3, 1, now)], &[st], now);
            assert!(!d.over, "request {i}");
            assert_eq!(d.items[0].remaining, 2 - i);
            assert_eq!(d.items[0].reset_ms, 45_000);
            apply(&mut st, d.items[0].write);
        }
        let d = decide(&[item(Algorithm::FixedWindow, 3, 1, now)], &[st], now);
        assert!(d.over && d.items[0].over && d.items[0].write.is_none());
        assert_eq!(d.items[0].remaining, 0);
    }

    #[test]
    fn a_denial_by_one_descriptor_charges_no_other() {
        let now = 1_000;
        let a = item(Algorithm::FixedWindow, 10, 1, now);
        let b = item(Algorithm::FixedWindow, 1, 1, now);
        let st = [
            State {
                a: Some(4),
                b: None,
            },
            State {
                a: Some(1),
                b: None,
            },
        ];
        let d = decide(&[a, b], &st, now);
        assert!(d.over);
        assert!(!d.items[0].over && d.items[0].write.is_none());
        assert_eq!(d.items[0].remaining, 6, "not charged: remaining before");
        assert!(d.items[1].over);
    }

    #[test]
    fn shadow_mode_never_denies_and_is_charged_only_when_it_admits() {
        let now = 1_000;
        let mut s = item(Algorithm::FixedWindow, 1, 1, now);
        s.shadow = true;
        let e = item(Algorithm::FixedWindow, 5, 1, now);
        let st = [
            State {
                a: Some(1),
                b: None,
            },
            State::default(),
        ];
        let d = decide(&[s, e], &st, now);
        assert!(!d.over);
        assert!(d.items[0].shadow_denied && !d.items[0].over);
        assert!(d.items[0].write.is_none());
        assert_eq!(d.items[1].write, Some(Write::Count(1)));
    }

    #[test]
    fn zero_hits_check_without_charging_and_hits_above_limit_never_pass() {
        let now = 1_000;
        let st = [State {
            a: Some(3),
            b: None,
        }];
        let d = decide(&[item(Algorithm::FixedWindow, 3, 0, now)], &st, now);
        assert!(!d.over);
        assert_eq!(d.items[0].write, Some(Write::Count(3)));
        assert_eq!(d.items[0].remaining, 0);
        for alg in [
            Algorithm::FixedWindow,
            Algorithm::TokenBucket,
            Algorithm::SlidingWindow,
        ] {
            let d = decide(&[item(alg, 3, 4, now)], &[State::default()], now);
            assert!(d.over, "{alg:?}");
        }
    }

    #[test]
    fn token_bucket_refills_smoothly_without_a_double_burst() {
        // 60 per minute = one per second; capacity 60.
        let mut st = State::default();
        let t0 = 59_000; // one second before a minute edge
        let d = decide(&[item(Algorithm::TokenBucket, 60, 60, t0)], &[st], t0);
        assert!(!d.over);
        apply(&mut st, d.items[0].write);
        assert_eq!(d.items[0].reset_ms, 60_000);
        // Past the edge a fixed window would admit 60 more; the bucket has two tokens.
        let t1 = 61_000;
        let d = decide(&[item(Algorithm::TokenBucket, 60, 3, t1)], &[st], t1);
        assert!(d.over);
        assert_eq!(d.items[0].remaining, 2);
        let d = decide(&[item(Algorithm::TokenBucket, 60, 2, t1)], &[st], t1);
        assert!(!d.over);
        assert_eq!(d.items[0].remaining, 0);
    }

    #[test]
    fn sliding_window_weights_the_previous_window() {
        // Previous minute had 10 of 10; 30 s into this one, it still weighs 5.
        let now = 120_000 + 30_000;
        let st = [State {
            a: Some(0),
            b: Some(10),
        }];
        let d = decide(&[item(Algorithm::SlidingWindow, 10, 5, now)], &st, now);
        assert!(!d.over);
        assert_eq!(d.items[0].remaining, 0);
        assert_eq!(d.items[0].write, Some(Write::Count(5)));
        let d = decide(&[item(Algorithm::SlidingWindow, 10, 6, now)], &st, now);
        assert!(d.over);
        assert_eq!(d.items[0].remaining, 5);
    }

    #[test]
    fn windows_are_utc_aligned_and_calendar_for_month_and_year() {
        // 2024-02-15T12:00:00Z
        let now = 1_707_998_400_000;
        let (s, e) = window(Unit::Month, Algorithm::FixedWindow, now).unwrap();
        assert_eq!(e - s, 29 * 86_400_000, "February 2024 has 29 days");
        let (s, e) = window(Unit::Year, Algorithm::FixedWindow, now).unwrap();
        assert_eq!(s, 1_704_067_200_000, "2024-01-01T00:00:00Z");
        assert_eq!(e - s, 366 * 86_400_000);
        let (s, e) = window(Unit::Day, Algorithm::FixedWindow, now).unwrap();
        assert_eq!((s, e), (1_707_955_200_000, 1_708_041_600_000));
        let (s, e) = window(Unit::Month, Algorithm::SlidingWindow, now).unwrap();
        assert_eq!(e - s, 30 * 86_400_000);
        assert!(window(Unit::Year, Algorithm::FixedWindow, u64::MAX).is_err());
        // Thursday 2024-02-15 is in the week of Monday 2024-02-12.
        let (s, e) = window(Unit::Week, Algorithm::FixedWindow, now).unwrap();
        assert_eq!((s, e - s), (1_707_696_000_000, 7 * 86_400_000));
    }
}
