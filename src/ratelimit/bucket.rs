//! Token-bucket arithmetic: pure, exact, overflow-free.
//!
//! A bucket is stored as the instant it will be full again (`full_at`), the GCRA form of a
//! token bucket: tokens at time `now` are `capacity - (full_at - now) / T`, where
//! `T = refill_period / refill_tokens` is the time one token takes to refill. One number
//! replaces (tokens, last update), refill is continuous, and two properties fall out:
//! - "full" is `full_at <= now`, independent of the limit's numbers, which is what the slot
//!   table needs to decide takeovers;
//! - a clock that goes backwards only makes `full_at - now` larger, so it never mints tokens.
//!
//! Time is counted in units of `1 / refill_tokens` milliseconds, so `T` is the integer
//! `refill_period_s * 1000` and every step is exact (no drift from rounding, and N requests
//! against capacity N at one instant admit exactly N). The stored form is whole milliseconds
//! plus a sub-millisecond remainder in those units. Arithmetic is `u128`: with the config
//! bounds below nothing can overflow, and conversions back to `u64` saturate.
//!
//! [`BucketParams`] also carries the window algorithms (`fixed_window`, `sliding_window`),
//! whose arithmetic is in [`super::window`]: every limit is checked, stored and refunded
//! through the same calls.

use super::window;

/// Largest `capacity` and `refill_tokens` the config accepts (fits the `u32` remainder).
pub const MAX_TOKENS: u64 = 1_000_000_000;
/// Largest `refill_period_s` the config accepts: one year.
pub const MAX_PERIOD_S: u64 = 366 * 24 * 3600;

/// How a limit counts (`algorithm` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    /// This module: continuous refill, bursts up to `capacity`.
    #[default]
    TokenBucket,
    /// `limit` per UTC-aligned window of `window_s` ([`super::window`]).
    FixedWindow,
    /// `limit` per trailing window, estimated from two fixed windows ([`super::window`]).
    SlidingWindow,
}

impl Algorithm {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "token_bucket" => Some(Algorithm::TokenBucket),
            "fixed_window" => Some(Algorithm::FixedWindow),
            "sliding_window" => Some(Algorithm::SlidingWindow),
            _ => None,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Algorithm::TokenBucket => "token_bucket",
            Algorithm::FixedWindow => "fixed_window",
            Algorithm::SlidingWindow => "sliding_window",
        }
    }
}

/// The numbers of one limit, validated. Windows are kept in the same three numbers:
/// `capacity` = `refill_tokens` = the window's `limit`, `refill_period_s` = `window_s`, which is
/// also what the `ratelimit-policy` header shows (`q=limit;w=window_s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketParams {
    capacity: u64,
    refill_tokens: u64,
    refill_period_s: u64,
    algorithm: Algorithm,
}

/// Why bucket numbers were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamError {
    /// A number is 0; the field name is given.
    Zero(&'static str),
    /// A number is above its bound; the field name and bound are given.
    TooLarge(&'static str, u64),
}

impl std::fmt::Display for ParamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParamError::Zero(field) => write!(f, "`{field}` must be at least 1"),
            ParamError::TooLarge(field, max) => write!(f, "`{field}` must be at most {max}"),
        }
    }
}

impl std::error::Error for ParamError {}

/// Stored state of one bucket: the instant it is full again. Window counters use the same
/// numbers with the same meaning of `full_at_ms` ([`super::window`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BucketState {
    /// Whole milliseconds (Unix time) of the instant the bucket is full again.
    pub full_at_ms: u64,
    /// Sub-millisecond part of that instant, in units of `1 / refill_tokens` ms (windows:
    /// the count of the current window).
    pub frac: u32,
    /// Unused by token buckets (0); a sliding window's count of the previous window.
    pub aux: u32,
}

impl BucketState {
    /// A bucket that has always been full.
    pub const FULL: BucketState = BucketState {
        full_at_ms: 0,
        frac: 0,
        aux: 0,
    };

    /// Whether the bucket is full at `now_ms`: then it is indistinguishable from a fresh one.
    pub fn is_full_at(&self, now_ms: u64) -> bool {
        self.full_at_ms < now_ms || (self.full_at_ms == now_ms && self.frac == 0)
    }
}

/// What a client is told about a bucket (the rate-limit headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketStatus {
    pub capacity: u64,
    pub refill_period_s: u64,
    /// Whole tokens left, rounded down.
    pub remaining: u64,
    /// Milliseconds until the bucket is full again, rounded up.
    pub full_in_ms: u64,
}

/// The result of asking a bucket for `cost` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Granted: store `state`; `status` is after the take.
    Allowed {
        state: BucketState,
        status: BucketStatus,
    },
    /// Refused: nothing to store. `retry_after_ms` is the wait until the same request passes.
    Denied {
        retry_after_ms: u64,
        status: BucketStatus,
    },
}

/// Rounds milliseconds up to whole seconds (`retry-after`, `t=`).
pub fn ceil_secs(ms: u64) -> u64 {
    ms.div_ceil(1000)
}

fn to_u64(x: u128) -> u64 {
    u64::try_from(x).unwrap_or(u64::MAX)
}

impl BucketParams {
    /// Validates the numbers: all positive and within [`MAX_TOKENS`] / [`MAX_PERIOD_S`].
    pub fn new(
        capacity: u64,
        refill_tokens: u64,
        refill_period_s: u64,
    ) -> Result<Self, ParamError> {
        for (field, v, max) in [
            ("capacity", capacity, MAX_TOKENS),
            ("refill_tokens", refill_tokens, MAX_TOKENS),
            ("refill_period_s", refill_period_s, MAX_PERIOD_S),
        ] {
            if v == 0 {
                return Err(ParamError::Zero(field));
            }
            if v > max {
                return Err(ParamError::TooLarge(field, max));
            }
        }
        Ok(Self {
            capacity,
            refill_tokens,
            refill_period_s,
            algorithm: Algorithm::TokenBucket,
        })
    }

    /// A window counter: `limit` requests per `window_s` (fixed or sliding).
    pub fn window(algorithm: Algorithm, limit: u64, window_s: u64) -> Result<Self, ParamError> {
        for (field, v, max) in [
            ("limit", limit, MAX_TOKENS),
            ("window_s", window_s, MAX_PERIOD_S),
        ] {
            if v == 0 {
                return Err(ParamError::Zero(field));
            }
            if v > max {
                return Err(ParamError::TooLarge(field, max));
            }
        }
        Ok(Self {
            capacity: limit,
            refill_tokens: limit,
            refill_period_s: window_s,
            algorithm,
        })
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    fn window_ms(&self) -> u64 {
        self.refill_period_s * 1000
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn refill_tokens(&self) -> u64 {
        self.refill_tokens
    }

    pub fn refill_period_s(&self) -> u64 {
        self.refill_period_s
    }

    /// Units per millisecond (`refill_tokens`; never 0 once validated).
    fn per_ms(&self) -> u128 {
        u128::from(self.refill_tokens.max(1))
    }

    /// Units one token takes to refill.
    fn per_token(&self) -> u128 {
        u128::from(self.refill_period_s) * 1000
    }

    fn burst(&self) -> u128 {
        u128::from(self.capacity) * self.per_token()
    }

    fn units_of(&self, s: BucketState) -> u128 {
        // A remainder written under other numbers (config reload) is clamped, never carried
        // into a later instant, so a reload cannot mint tokens through it.
        let frac = u128::from(s.frac).min(self.per_ms() - 1);
        u128::from(s.full_at_ms) * self.per_ms() + frac
    }

    fn state_at_units(&self, x: u128) -> BucketState {
        let per_ms = self.per_ms();
        match u64::try_from(x / per_ms) {
            Ok(ms) => BucketState {
                full_at_ms: ms,
                // < refill_tokens <= MAX_TOKENS < u32::MAX
                frac: u32::try_from(x % per_ms).unwrap_or(u32::MAX),
                aux: 0,
            },
            Err(_) => BucketState {
                full_at_ms: u64::MAX,
                frac: 0,
                aux: 0,
            },
        }
    }

    fn units_to_ms_ceil(&self, units: u128) -> u64 {
        to_u64(units.div_ceil(self.per_ms()))
    }

    fn status_for_debt(&self, debt: u128) -> BucketStatus {
        BucketStatus {
            capacity: self.capacity,
            refill_period_s: self.refill_period_s,
            remaining: to_u64(self.burst().saturating_sub(debt) / self.per_token()),
            full_in_ms: self.units_to_ms_ceil(debt),
        }
    }

    /// Units of refill still owed at `now_ms` (0 when full).
    fn debt(&self, s: BucketState, now_ms: u64) -> u128 {
        self.units_of(s)
            .saturating_sub(u128::from(now_ms) * self.per_ms())
    }

    /// The bucket as a client would see it at `now_ms`, without taking anything.
    pub fn status(&self, s: BucketState, now_ms: u64) -> BucketStatus {
        match self.algorithm {
            Algorithm::TokenBucket => self.status_for_debt(self.debt(s, now_ms)),
            Algorithm::FixedWindow => {
                window::fixed_status(self.capacity, self.window_ms(), s, now_ms)
            }
            Algorithm::SlidingWindow => {
                window::sliding_status(self.capacity, self.window_ms(), s, now_ms)
            }
        }
    }

    /// Asks for `cost` tokens at `now_ms`.
    pub fn take(&self, s: BucketState, cost: u64, now_ms: u64) -> Take {
        match self.algorithm {
            Algorithm::TokenBucket => self.take_tokens(s, cost, now_ms),
            Algorithm::FixedWindow => {
                window::fixed_take(self.capacity, self.window_ms(), s, cost, now_ms)
            }
            Algorithm::SlidingWindow => {
                window::sliding_take(self.capacity, self.window_ms(), s, cost, now_ms)
            }
        }
    }

    fn take_tokens(&self, s: BucketState, cost: u64, now_ms: u64) -> Take {
        let now = u128::from(now_ms) * self.per_ms();
        let x = self.units_of(s);
        let debt = x.saturating_sub(now);
        let cost_units = u128::from(cost) * self.per_token();
        let need = debt + cost_units;
        let burst = self.burst();
        if need <= burst {
            return Take::Allowed {
                state: self.state_at_units(x.max(now) + cost_units),
                status: self.status_for_debt(need),
            };
        }
        let retry_after_ms = if cost > self.capacity {
            // Can never pass (config validation prevents this); point at the next full bucket.
            self.units_to_ms_ceil(debt).max(1000)
        } else {
            self.units_to_ms_ceil(need - burst)
        };
        Take::Denied {
            retry_after_ms,
            status: self.status_for_debt(debt),
        }
    }

    /// Gives back `cost` tokens taken earlier (a later limit of the same request denied it).
    /// The bucket never holds more than its capacity.
    pub fn refund(&self, s: BucketState, cost: u64) -> BucketState {
        if self.algorithm != Algorithm::TokenBucket {
            return window::refund(s, cost);
        }
        let cost_units = u128::from(cost) * self.per_token();
        self.state_at_units(self.units_of(s).saturating_sub(cost_units))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    fn p(c: u64, r: u64, s: u64) -> BucketParams {
        BucketParams::new(c, r, s).unwrap()
    }

    fn allowed(t: Take) -> (BucketState, BucketStatus) {
        match t {
            Take::Allowed { state, status } => (state, status),
            Take::Denied { .. } => panic!("expected allowed, got {t:?}"),
        }
    }

    fn denied(t: Take) -> (u64, BucketStatus) {
        match t {
            Take::Denied {
                retry_after_ms,
                status,
            } => (retry_after_ms, status),
            Take::Allowed { .. } => panic!("expected denied, got {t:?}"),
        }
    }

    /// Takes `cost` repeatedly at one instant; returns how many were admitted.
    fn drain(b: &BucketParams, s: &mut BucketState, cost: u64, now: u64, tries: u32) -> u32 {
        let mut n = 0;
        for _ in 0..tries {
            if let Take::Allowed { state, .. } = b.take(*s, cost, now) {
                *s = state;
                n += 1;
            }
        }
        n
    }

    #[test]
    fn a_fresh_bucket_admits_exactly_its_capacity_at_one_instant() {
        // 7 per 60 s: one token every 8571.43 ms, not a whole number of ms.
        for (c, r, per) in [
            (20, 20, 60),
            (5, 5, 60),
            (7, 7, 60),
            (3, 1000, 1),
            (1, 3, 7),
        ] {
            let b = p(c, r, per);
            let mut s = BucketState::FULL;
            assert_eq!(drain(&b, &mut s, 1, T0, 1000), c as u32, "{c}/{r}/{per}");
        }
    }

    #[test]
    fn remaining_counts_down_and_refill_is_continuous() {
        let b = p(5, 5, 60); // one token per 12 s
        let mut s = BucketState::FULL;
        assert_eq!(b.status(s, T0).remaining, 5);
        assert_eq!(b.status(s, T0).full_in_ms, 0);
        for want in (0..5).rev() {
            let (ns, st) = allowed(b.take(s, 1, T0));
            s = ns;
            assert_eq!(st.remaining, want);
        }
        assert_eq!(b.status(s, T0).full_in_ms, 60_000);
        let (retry, st) = denied(b.take(s, 1, T0));
        assert_eq!(retry, 12_000);
        assert_eq!(st.remaining, 0);
        // One ms short of a token: still denied, 1 ms to wait.
        assert_eq!(denied(b.take(s, 1, T0 + 11_999)).0, 1);
        assert_eq!(b.status(s, T0 + 11_999).remaining, 0);
        // Exactly one token later.
        assert_eq!(b.status(s, T0 + 12_000).remaining, 1);
        assert_eq!(b.status(s, T0 + 30_000).remaining, 2);
        assert_eq!(b.status(s, T0 + 30_000).full_in_ms, 30_000);
        let (s2, st) = allowed(b.take(s, 1, T0 + 12_000));
        assert_eq!(st.remaining, 0);
        assert!(matches!(b.take(s2, 1, T0 + 12_000), Take::Denied { .. }));
        // Long idle: full, never more than capacity.
        assert_eq!(b.status(s, T0 + 10_000_000).remaining, 5);
        assert!(s.is_full_at(T0 + 60_000));
        assert!(!s.is_full_at(T0 + 59_999));
        let mut s3 = s;
        assert_eq!(drain(&b, &mut s3, 1, T0 + 10_000_000, 100), 5);
    }

    #[test]
    fn fractional_refill_is_exact_over_many_steps() {
        // 7 tokens per 60 s. Take one token whenever one is available, 1 ms steps, for one
        // hour: exactly 7 * 60 tokens (plus the initial burst) are admitted, no drift.
        let b = p(7, 7, 60);
        let mut s = BucketState::FULL;
        let mut admitted = 0u64;
        let hour = 3_600_000;
        for t in (0..=hour).step_by(1) {
            if let Take::Allowed { state, .. } = b.take(s, 1, T0 + t) {
                s = state;
                admitted += 1;
            }
        }
        assert_eq!(admitted, 7 + 7 * 60);
    }

    #[test]
    fn cost_takes_several_tokens_and_retry_after_waits_for_all_of_them() {
        let b = p(10, 1, 1); // one token per second
        let (s, st) = allowed(b.take(BucketState::FULL, 4, T0));
        assert_eq!(st.remaining, 6);
        let (s, st) = allowed(b.take(s, 4, T0));
        assert_eq!(st.remaining, 2);
        let (retry, st) = denied(b.take(s, 4, T0));
        assert_eq!(st.remaining, 2, "a denied take consumes nothing");
        assert_eq!(retry, 2_000);
        assert_eq!(ceil_secs(retry), 2);
        // After 1.5 s: 3.5 tokens, half a token short.
        let (retry, _) = denied(b.take(s, 4, T0 + 1_500));
        assert_eq!(retry, 500);
        assert_eq!(ceil_secs(retry), 1);
        allowed(b.take(s, 4, T0 + 2_000));
        // A cost above capacity can never pass and says so with a positive wait.
        let (retry, _) = denied(b.take(BucketState::FULL, 11, T0));
        assert!(retry >= 1000);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(ceil_secs(0), 0);
        assert_eq!(ceil_secs(1), 1);
        assert_eq!(ceil_secs(999), 1);
        assert_eq!(ceil_secs(1000), 1);
        assert_eq!(ceil_secs(1001), 2);
        assert_eq!(ceil_secs(u64::MAX), u64::MAX / 1000 + 1);
        // 3 per 10 s: one token every 3333.33 ms. Denied right after draining: 3334 ms, 4 s.
        let b = p(3, 3, 10);
        let mut s = BucketState::FULL;
        drain(&b, &mut s, 1, T0, 3);
        let (retry, _) = denied(b.take(s, 1, T0));
        assert_eq!(retry, 3334);
        assert_eq!(ceil_secs(retry), 4);
        // Then at the first ms on which the token is complete, it passes.
        assert!(matches!(b.take(s, 1, T0 + 3333), Take::Denied { .. }));
        allowed(b.take(s, 1, T0 + 3334));
    }

    #[test]
    fn a_clock_going_backwards_never_mints_tokens() {
        let b = p(5, 5, 60);
        let mut s = BucketState::FULL;
        drain(&b, &mut s, 1, T0, 5);
        // Another worker's clock is 10 s behind, or the wall clock stepped back an hour.
        for back in [1, 10_000, 3_600_000, T0] {
            let now = T0 - back;
            let (retry, st) = denied(b.take(s, 1, now));
            assert_eq!(st.remaining, 0);
            assert!(retry >= 12_000);
            assert!(!s.is_full_at(now));
        }
        // The clock at 0 or u64::MAX does not panic.
        let _ = b.take(s, 1, 0);
        let _ = b.take(s, 1, u64::MAX);
        let _ = b.status(s, u64::MAX);
    }

    #[test]
    fn refund_restores_what_was_taken_and_never_exceeds_capacity() {
        let b = p(5, 5, 60);
        let (s1, _) = allowed(b.take(BucketState::FULL, 2, T0));
        let s2 = b.refund(s1, 2);
        assert_eq!(b.status(s2, T0).remaining, 5);
        assert!(s2.is_full_at(T0));
        // Refunding more than is missing does not push the bucket above capacity.
        let s3 = b.refund(s1, 100);
        assert_eq!(b.status(s3, T0).remaining, 5);
        let mut s4 = s3;
        assert_eq!(drain(&b, &mut s4, 1, T0, 100), 5);
    }

    #[test]
    fn huge_numbers_neither_overflow_nor_panic() {
        let b = p(MAX_TOKENS, MAX_TOKENS, MAX_PERIOD_S);
        let (s, st) = allowed(b.take(BucketState::FULL, MAX_TOKENS, u64::MAX));
        assert_eq!(st.remaining, 0);
        let _ = b.take(s, MAX_TOKENS, u64::MAX);
        let _ = b.take(s, u64::MAX, 0);
        let _ = b.refund(s, u64::MAX);
        let slow = p(1, 1, MAX_PERIOD_S);
        let (s, st) = allowed(slow.take(BucketState::FULL, 1, T0));
        assert_eq!(st.full_in_ms, MAX_PERIOD_S * 1000);
        let (retry, _) = denied(slow.take(s, 1, T0));
        assert_eq!(retry, MAX_PERIOD_S * 1000);
        // A state written under other numbers (a reload) is read safely.
        let odd = BucketState {
            full_at_ms: u64::MAX,
            frac: u32::MAX,
            aux: u32::MAX,
        };
        let _ = p(1, 1, 1).take(odd, 1, T0);
        assert_eq!(p(1, 1, 1).status(odd, T0).remaining, 0);
    }

    #[test]
    fn params_are_validated() {
        assert_eq!(
            BucketParams::new(0, 1, 1),
            Err(ParamError::Zero("capacity"))
        );
        assert_eq!(
            BucketParams::new(1, 0, 1),
            Err(ParamError::Zero("refill_tokens"))
        );
        assert_eq!(
            BucketParams::new(1, 1, 0),
            Err(ParamError::Zero("refill_period_s"))
        );
        assert!(matches!(
            BucketParams::new(MAX_TOKENS + 1, 1, 1),
            Err(ParamError::TooLarge("capacity", _))
        ));
        assert!(matches!(
            BucketParams::new(1, 1, MAX_PERIOD_S + 1),
            Err(ParamError::TooLarge("refill_period_s", _))
        ));
        assert!(ParamError::Zero("capacity")
            .to_string()
            .contains("capacity"));
    }
}
