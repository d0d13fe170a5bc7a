//! Fixed-window and sliding-window counters (`algorithm`: `fixed_window`, `sliding_window`).
//!
//! They live in the same slot tables as token buckets and in the same three numbers
//! ([`BucketState`]), so one table, one CAS rule and one takeover rule serve every algorithm.
//! The encoding keeps the table's invariant: `full_at_ms` is the instant the state becomes
//! equivalent to a fresh one (so a slot is reused only when that gives nobody extra requests).
//!
//! - fixed: `full_at_ms` = end of the counted window, `frac` = its count, `aux` = 0.
//!   Windows are aligned to UTC multiples of `window_s` (`start = now - now % w`).
//! - sliding: `full_at_ms` = end of the counted window + `w` (after that, both it and its
//!   predecessor have slid out), `frac` = count of the counted window, `aux` = count of the
//!   window before it. A request at `start + e` (0 <= e < w) is admitted when
//!   `prev * (w - e) / w + cur + cost <= limit`: the previous window weighted by how much of
//!   it the trailing window still covers (the sliding-window counter), in exact integer math.
//!
//! Error bound of the sliding counter (documented in docs/CONFIG.md): it assumes the previous
//! window's requests were spread evenly. Every UTC-aligned window admits at most `limit`;
//! an arbitrary span of `window_s` admits at most `2 × limit` in the worst case (a burst at
//! the very end of one window, then traffic late in the next), like a fixed window at its
//! edge. For traffic spread over the window, the estimate tracks a true sliding log closely.
//!
//! A clock that steps back never resets a count: a stored window later than `now`'s window
//! stays the current one.

use super::bucket::{BucketState, BucketStatus, Take};

fn to_u64(x: u128) -> u64 {
    u64::try_from(x).unwrap_or(u64::MAX)
}

fn to_u32(x: u64) -> u32 {
    u32::try_from(x).unwrap_or(u32::MAX)
}

/// Fixed window of `w_ms` ms admitting `limit` per window.
pub fn fixed_take(limit: u64, w_ms: u64, s: BucketState, cost: u64, now_ms: u64) -> Take {
    let (end, count) = fixed_current(w_ms, s, now_ms);
    let left = end.saturating_sub(now_ms);
    if count + cost <= limit {
        return Take::Allowed {
            state: BucketState {
                full_at_ms: end,
                frac: to_u32(count + cost),
                aux: 0,
            },
            status: fixed_status_of(limit, w_ms, count + cost, left),
        };
    }
    Take::Denied {
        // A cost above the limit never passes (config validation prevents it): point at
        // the next window anyway.
        retry_after_ms: left.max(1),
        status: fixed_status_of(limit, w_ms, count, left),
    }
}

pub fn fixed_status(limit: u64, w_ms: u64, s: BucketState, now_ms: u64) -> BucketStatus {
    let (end, count) = fixed_current(w_ms, s, now_ms);
    fixed_status_of(limit, w_ms, count, end.saturating_sub(now_ms))
}

/// The end of the current window and its count.
fn fixed_current(w_ms: u64, s: BucketState, now_ms: u64) -> (u64, u64) {
    let end = now_ms - now_ms % w_ms + w_ms;
    if s.full_at_ms >= end {
        (s.full_at_ms, u64::from(s.frac))
    } else {
        (end, 0)
    }
}

fn fixed_status_of(limit: u64, w_ms: u64, count: u64, left_ms: u64) -> BucketStatus {
    BucketStatus {
        capacity: limit,
        refill_period_s: w_ms / 1000,
        remaining: limit.saturating_sub(count),
        full_in_ms: if count == 0 { 0 } else { left_ms },
    }
}

/// The current window's start and the counts of it and of the window before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sliding {
    start: u64,
    cur: u64,
    prev: u64,
}

fn sliding_current(w_ms: u64, s: BucketState, now_ms: u64) -> Sliding {
    let start_now = now_ms - now_ms % w_ms;
    let fresh = Sliding {
        start: start_now,
        cur: 0,
        prev: 0,
    };
    let Some(start_s) = s.full_at_ms.checked_sub(2 * w_ms) else {
        return fresh;
    };
    let (cur_s, prev_s) = (u64::from(s.frac), u64::from(s.aux));
    if start_s >= start_now {
        Sliding {
            start: start_s,
            cur: cur_s,
            prev: prev_s,
        }
    } else if start_s + w_ms == start_now {
        Sliding {
            start: start_now,
            cur: 0,
            prev: cur_s,
        }
    } else {
        fresh
    }
}

/// `w` × the estimated count at `now` (exact: no division).
fn sliding_scaled(w: u128, c: Sliding, now_ms: u64) -> u128 {
    let e = u128::from(now_ms.saturating_sub(c.start)).min(w);
    u128::from(c.prev) * (w - e) + u128::from(c.cur) * w
}

fn sliding_status_of(limit: u64, w_ms: u64, c: Sliding, now_ms: u64) -> BucketStatus {
    let w = u128::from(w_ms);
    let used = sliding_scaled(w, c, now_ms);
    let remaining = to_u64((u128::from(limit) * w).saturating_sub(used) / w);
    // Fully recovered when the counted window and its successor have slid out.
    let full_at = if c.cur > 0 {
        c.start + 2 * w_ms
    } else if c.prev > 0 {
        c.start + w_ms
    } else {
        now_ms
    };
    BucketStatus {
        capacity: limit,
        refill_period_s: w_ms / 1000,
        remaining,
        full_in_ms: full_at.saturating_sub(now_ms),
    }
}

pub fn sliding_status(limit: u64, w_ms: u64, s: BucketState, now_ms: u64) -> BucketStatus {
    sliding_status_of(limit, w_ms, sliding_current(w_ms, s, now_ms), now_ms)
}

/// Sliding window of `w_ms` ms admitting `limit` per trailing window (estimated).
pub fn sliding_take(limit: u64, w_ms: u64, s: BucketState, cost: u64, now_ms: u64) -> Take {
    let c = sliding_current(w_ms, s, now_ms);
    let w = u128::from(w_ms);
    let cap = u128::from(limit) * w;
    if sliding_scaled(w, c, now_ms) + u128::from(cost) * w <= cap {
        let after = Sliding {
            cur: c.cur + cost,
            ..c
        };
        return Take::Allowed {
            state: BucketState {
                full_at_ms: c.start + 2 * w_ms,
                frac: to_u32(after.cur),
                aux: to_u32(c.prev),
            },
            status: sliding_status_of(limit, w_ms, after, now_ms),
        };
    }
    Take::Denied {
        retry_after_ms: sliding_retry_ms(limit, w_ms, c, cost, now_ms).max(1),
        status: sliding_status_of(limit, w_ms, c, now_ms),
    }
}

/// The wait until a request of `cost` passes, assuming nothing else is admitted meanwhile.
fn sliding_retry_ms(limit: u64, w_ms: u64, c: Sliding, cost: u64, now_ms: u64) -> u64 {
    let w = u128::from(w_ms);
    // Smallest elapsed `e` with `count * (w - e) <= room * w`, i.e. `e >= w - room*w/count`.
    let first_e = |count: u64, room: u64| -> u128 {
        if count == 0 {
            0
        } else {
            w.saturating_sub(u128::from(room) * w / u128::from(count))
        }
    };
    if cost > limit {
        return (c.start + 2 * w_ms).saturating_sub(now_ms);
    }
    // Later in the current window, as the previous window's weight shrinks.
    if c.cur + cost <= limit {
        let e = first_e(c.prev, limit - cost - c.cur);
        // Integer flooring can leave the bound one short; the next ms passes for sure.
        if e < w {
            let at = c.start + to_u64(e);
            if at > now_ms {
                return at - now_ms;
            }
        }
    }
    // In the next window: this window's count becomes the weighted one.
    let e = first_e(c.cur, limit - cost).min(w);
    (c.start + w_ms + to_u64(e)).saturating_sub(now_ms)
}

/// Gives back `cost` requests counted in the stored window.
pub fn refund(s: BucketState, cost: u64) -> BucketState {
    BucketState {
        frac: to_u32(u64::from(s.frac).saturating_sub(cost)),
        ..s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: u64 = 60_000;
    /// A UTC minute boundary.
    const T0: u64 = 1_700_000_040_000;

    fn run(
        f: fn(u64, u64, BucketState, u64, u64) -> Take,
        limit: u64,
        s: &mut BucketState,
        now: u64,
        n: u32,
    ) -> u32 {
        let mut ok = 0;
        for _ in 0..n {
            if let Take::Allowed { state, .. } = f(limit, W, *s, 1, now) {
                *s = state;
                ok += 1;
            }
        }
        ok
    }

    #[test]
    fn fixed_windows_align_to_utc_and_reset_at_the_boundary() {
        assert_eq!(T0 % W, 0);
        let mut s = BucketState::FULL;
        assert_eq!(run(fixed_take, 5, &mut s, T0 + 59_000, 100), 5);
        match fixed_take(5, W, s, 1, T0 + 59_000) {
            Take::Denied {
                retry_after_ms,
                status,
            } => {
                assert_eq!(retry_after_ms, 1000, "until the minute ends");
                assert_eq!(status.remaining, 0);
                assert_eq!(status.full_in_ms, 1000);
            }
            t => panic!("{t:?}"),
        }
        // A new minute: a whole new allowance (the double burst fixed windows allow).
        assert_eq!(run(fixed_take, 5, &mut s, T0 + W, 100), 5);
        assert!(
            s.is_full_at(T0 + 2 * W + 1),
            "a stale window frees its slot"
        );
        assert!(!s.is_full_at(T0 + 2 * W - 1));
    }

    #[test]
    fn fixed_window_status_of_an_untouched_key_is_full() {
        let st = fixed_status(10, W, BucketState::FULL, T0 + 5);
        assert_eq!(
            (st.remaining, st.full_in_ms, st.capacity, st.refill_period_s),
            (10, 0, 10, 60)
        );
    }

    #[test]
    fn sliding_window_weights_the_previous_window() {
        let mut s = BucketState::FULL;
        assert_eq!(run(sliding_take, 10, &mut s, T0 + 50_000, 100), 10);
        // 15 s into the next window the previous 10 weigh 10 * 45/60 = 7.5: 2 more pass.
        assert_eq!(run(sliding_take, 10, &mut s, T0 + W + 15_000, 100), 2);
        // At 30 s: weight 5, count 2: 3 more pass.
        assert_eq!(run(sliding_take, 10, &mut s, T0 + W + 30_000, 100), 3);
        // Two windows later everything has slid out.
        assert_eq!(run(sliding_take, 10, &mut s, T0 + 3 * W, 100), 10);
    }

    #[test]
    fn sliding_retry_after_is_exactly_when_the_request_passes() {
        for (fill_at, deny_at) in [
            (50_000, W + 15_000),
            (1_000, 2_000),
            (0, W - 1),
            (59_999, W),
        ] {
            let mut s = BucketState::FULL;
            run(sliding_take, 10, &mut s, T0 + fill_at, 100);
            let mut t = T0 + deny_at;
            run(sliding_take, 10, &mut s, t, 100);
            let Take::Denied { retry_after_ms, .. } = sliding_take(10, W, s, 1, t) else {
                panic!("expected a denial at {deny_at}")
            };
            t += retry_after_ms;
            assert!(
                matches!(sliding_take(10, W, s, 1, t), Take::Allowed { .. }),
                "passes after retry_after ({fill_at}, {deny_at}, {retry_after_ms})"
            );
            assert!(
                matches!(sliding_take(10, W, s, 1, t - 1), Take::Denied { .. }),
                "and not one ms before ({fill_at}, {deny_at}, {retry_after_ms})"
            );
        }
    }

    #[test]
    fn every_aligned_window_admits_at_most_the_limit_and_any_span_at_most_twice() {
        // Requests every 250 ms for 5 minutes, greedy: count per aligned window and per
        // trailing span.
        let mut s = BucketState::FULL;
        let mut admitted = Vec::new();
        let mut t = T0 + 7_000;
        while t < T0 + 5 * W {
            if let Take::Allowed { state, .. } = sliding_take(20, W, s, 1, t) {
                s = state;
                admitted.push(t);
            }
            t += 250;
        }
        for k in 0..5 {
            let (a, b) = (T0 + k * W, T0 + (k + 1) * W);
            let n = admitted.iter().filter(|&&x| x >= a && x < b).count();
            assert!(n <= 20, "window {k}: {n}");
        }
        for &x in &admitted {
            let n = admitted.iter().filter(|&&y| y >= x && y < x + W).count();
            assert!(n <= 40, "span from {x}: {n}");
        }
        // Steady demand above the limit: each full minute gets close to the limit.
        let n = admitted
            .iter()
            .filter(|&&x| (T0 + 2 * W..T0 + 3 * W).contains(&x))
            .count();
        assert!(n >= 18, "{n}");
    }

    #[test]
    fn a_clock_stepping_back_never_resets_a_count() {
        for f in [
            fixed_take as fn(u64, u64, BucketState, u64, u64) -> Take,
            sliding_take,
        ] {
            let mut s = BucketState::FULL;
            assert_eq!(run(f, 3, &mut s, T0 + W + 10, 10), 3);
            assert_eq!(
                run(f, 3, &mut s, T0 + 10, 10),
                0,
                "an earlier minute does not reopen"
            );
        }
    }

    #[test]
    fn refund_gives_back_what_was_counted() {
        let mut s = BucketState::FULL;
        run(fixed_take, 3, &mut s, T0, 3);
        s = refund(s, 1);
        assert_eq!(run(fixed_take, 3, &mut s, T0 + 1, 10), 1);
        let mut s = BucketState::FULL;
        run(sliding_take, 3, &mut s, T0, 3);
        s = refund(s, 2);
        assert_eq!(run(sliding_take, 3, &mut s, T0 + 1, 10), 2);
        assert_eq!(refund(BucketState::FULL, 5), BucketState::FULL);
    }

    #[test]
    fn huge_numbers_do_not_overflow() {
        let (limit, w) = (1_000_000_000, 366 * 24 * 3600 * 1000);
        let now = u64::MAX / 4;
        let s = BucketState::FULL;
        let Take::Allowed { state, .. } = sliding_take(limit, w, s, limit, now) else {
            panic!()
        };
        assert!(matches!(
            sliding_take(limit, w, state, 1, now),
            Take::Denied { .. }
        ));
        let Take::Allowed { state, .. } = fixed_take(limit, w, s, limit, now) else {
            panic!()
        };
        assert!(matches!(
            fixed_take(limit, w, state, 1, now),
            Take::Denied { .. }
        ));
    }
}
