//! Near-miss logging (`abuse.near_miss_ratio`): one `near_miss` event when a request's
//! admission makes a key first reach that share of a limit, so traffic that stays just under
//! a limit for days shows up in the logs.
//!
//! "First": the request that moves the key's use from below the threshold to at or above it
//! (`used` is the bucket's or window's whole tokens in use, `capacity - remaining`). A key
//! that drifts back under (refill) and crosses again would report again, so reports are also
//! rate-limited per (limit, key): at most one per key per *fill time* of the limit (the time
//! an empty bucket takes to refill: `capacity × refill_period_s / refill_tokens`, which is
//! `window_s` for windows), at least 1 s and at most one day.
//!
//! The rate limit is shared by every worker: a fixed, direct-mapped table of [`ENTRIES`]
//! (key fingerprint, reported-until) pairs per limit in one shared-data value
//! (`ag:nm:<limit>`), created at configuration and updated with CAS. Memory is bounded (about
//! 3 KiB per limit); two keys that share an entry evict each other, so under many crossing
//! keys a key may report twice in a period, never zero times.

use crate::store::{SharedStore, StoreError};

/// Entries of one limit's table.
pub const ENTRIES: usize = 256;
const ENTRY_BYTES: usize = 12;
const VERSION: u8 = 1;
const KEY_PREFIX: &str = "ag:nm:";
const MAX_CAS_RETRIES: u32 = 8;
/// Longest rate-limiting period of one key's reports.
const MAX_PERIOD_MS: u64 = 86_400_000;
/// `near_miss_ratio` default (SPEC section 2).
pub const DEFAULT_RATIO: f64 = 0.8;

/// The compiled `near_miss_ratio`, in parts per million (the rate limiter stays `Eq`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NearMiss {
    pub ratio_ppm: u32,
}

impl Default for NearMiss {
    fn default() -> Self {
        Self::from_ratio(DEFAULT_RATIO)
    }
}

impl NearMiss {
    /// `ratio` must be in (0, 1) (config validation).
    pub fn from_ratio(ratio: f64) -> Self {
        Self {
            ratio_ppm: (ratio * 1e6).round().clamp(1.0, 999_999.0) as u32,
        }
    }

    pub fn ratio(&self) -> f64 {
        f64::from(self.ratio_ppm) / 1e6
    }

    /// The smallest `used` at or above the ratio of `capacity` (at least 1).
    pub fn threshold(&self, capacity: u64) -> u64 {
        let t = (u128::from(capacity) * u128::from(self.ratio_ppm)).div_ceil(1_000_000);
        u64::try_from(t).unwrap_or(u64::MAX).max(1)
    }

    /// Whether taking `cost` made the use go from below the threshold to at or above it;
    /// `used_after` is the use after the take.
    pub fn crossed(&self, capacity: u64, used_after: u64, cost: u64) -> bool {
        let t = self.threshold(capacity);
        used_after >= t && used_after.saturating_sub(cost) < t
    }

    /// How long one key's report silences the next: the limit's fill time, within bounds.
    pub fn period_ms(capacity: u64, refill_tokens: u64, refill_period_s: u64) -> u64 {
        let ms = u128::from(capacity) * u128::from(refill_period_s) * 1000
            / u128::from(refill_tokens.max(1));
        u64::try_from(ms)
            .unwrap_or(u64::MAX)
            .clamp(1000, MAX_PERIOD_MS)
    }
}

/// Shared-data key of a limit's table.
pub fn table_key(limit: &str) -> String {
    format!("{KEY_PREFIX}{limit}")
}

fn empty_table() -> Vec<u8> {
    let mut v = vec![0u8; 1 + ENTRIES * ENTRY_BYTES];
    v[0] = VERSION;
    v
}

/// Creates a limit's table if missing or of another layout (key creation is not atomic in
/// Envoy: do it at configuration). Returns whether it wrote.
pub fn prepare(store: &dyn SharedStore, key: &str) -> Result<bool, StoreError> {
    match store.get(key) {
        Some((v, _)) if v.len() == 1 + ENTRIES * ENTRY_BYTES && v[0] == VERSION => Ok(false),
        _ => store.set(key, &empty_table(), None).map(|()| true),
    }
}

/// Whether this key may report now (and, if so, marks it silent for `period_ms`). A table
/// that is missing, foreign or stays contended answers `false`: a lost report is better than
/// a log flood.
pub fn admit(store: &dyn SharedStore, key: &str, hash: u64, now_ms: u64, period_ms: u64) -> bool {
    let at = 1 + (hash as usize % ENTRIES) * ENTRY_BYTES;
    // 0 marks an empty entry.
    let fp = ((hash >> 32) as u32).max(1);
    for _ in 0..MAX_CAS_RETRIES {
        let Some((mut v, cas)) = store.get(key) else {
            return false;
        };
        if v.len() != 1 + ENTRIES * ENTRY_BYTES || v[0] != VERSION {
            return false;
        }
        let old_fp = u32::from_le_bytes(v[at..at + 4].try_into().unwrap_or([0; 4]));
        let until = u64::from_le_bytes(v[at + 4..at + 12].try_into().unwrap_or([0; 8]));
        if old_fp == fp && now_ms < until {
            return false;
        }
        v[at..at + 4].copy_from_slice(&fp.to_le_bytes());
        v[at + 4..at + 12].copy_from_slice(&now_ms.saturating_add(period_ms).to_le_bytes());
        match store.set(key, &v, Some(cas)) {
            Ok(()) => return true,
            Err(StoreError::CasMismatch) => continue,
            Err(StoreError::Failed) => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[test]
    fn crossing_is_from_below_to_at_or_above() {
        let n = NearMiss::default();
        assert_eq!(n.threshold(10), 8);
        assert_eq!(n.threshold(1), 1);
        assert_eq!(n.threshold(3), 3); // 2.4 rounds up
        assert!(!n.crossed(10, 7, 1));
        assert!(n.crossed(10, 8, 1));
        assert!(!n.crossed(10, 9, 1), "already over before");
        assert!(n.crossed(10, 9, 2), "a cost of 2 jumps over 8");
        assert!(n.crossed(10, 10, 4));
        assert_eq!(NearMiss::from_ratio(0.5).threshold(5), 3);
        assert_eq!(NearMiss::from_ratio(0.999_999_9).ratio_ppm, 999_999);
    }

    #[test]
    fn period_is_the_fill_time_within_bounds() {
        assert_eq!(NearMiss::period_ms(10, 1, 60), 600_000);
        assert_eq!(NearMiss::period_ms(100, 100, 60), 60_000);
        assert_eq!(NearMiss::period_ms(1, 1000, 1), 1000);
        assert_eq!(NearMiss::period_ms(1_000_000, 1, 31_622_400), MAX_PERIOD_MS);
    }

    #[test]
    fn one_report_per_key_and_period_shared_by_all_callers() {
        let s = MemoryStore::new();
        let k = table_key("l");
        assert!(prepare(&s, &k).unwrap());
        assert!(!prepare(&s, &k).unwrap(), "idempotent");
        let t0 = 1_700_000_000_000;
        assert!(admit(&s, &k, 42 | (7 << 32), t0, 10_000));
        // Another "worker" (same store) within the period: silent.
        assert!(!admit(&s, &k, 42 | (7 << 32), t0 + 9_999, 10_000));
        // Another key in another entry reports.
        assert!(admit(&s, &k, 43 | (7 << 32), t0, 10_000));
        assert!(admit(&s, &k, 42 | (7 << 32), t0 + 10_000, 10_000));
        // A key evicting another: both may report (never zero).
        assert!(admit(&s, &k, 42 | (8 << 32), t0 + 10_001, 10_000));
        assert!(admit(&s, &k, 42 | (7 << 32), t0 + 10_002, 10_000));
        assert_eq!(s.len(), 1, "one bounded value per limit");
    }

    #[test]
    fn missing_or_foreign_tables_never_report() {
        let s = MemoryStore::new();
        assert!(!admit(&s, "ag:nm:x", 1, 1, 1000));
        s.set("ag:nm:x", b"junk", None).unwrap();
        assert!(!admit(&s, "ag:nm:x", 1, 1, 1000));
        assert!(prepare(&s, "ag:nm:x").unwrap());
        assert!(admit(&s, "ag:nm:x", 1, 1, 1000));
    }
}
