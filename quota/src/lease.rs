//! Leases (`POST /v1/lease`): a number of units of a client's global bucket and quotas, taken
//! up front by one ordinary decision with `cost` = the lease's size, which the filter then
//! spends locally. Pure logic: how big a lease is, when it ends, and its id, which carries
//! everything a release needs (the periods and bucket the units came from).
//!
//! Zero over-admission holds by construction: the units are deducted atomically by the same
//! decision `/v1/check` makes (a hard-stop quota or an empty bucket refuses the size), and a
//! release gives back at most what was granted, once (`store::lease`).

use crate::decision::{Decision, Outcome};
use crate::periods::Periods;
use crate::policy::{OveragePolicy, Policy};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// Default lease lifetime; the filter asks for its next lease well before.
pub const DEFAULT_TTL_MS: u64 = 5_000;
/// Bounds of the `ttl_ms` a caller may ask for.
pub const MIN_TTL_MS: u64 = 200;
pub const MAX_TTL_MS: u64 = 60_000;
/// The largest lease, whatever is asked.
pub const MAX_UNITS: u64 = 10_000;
/// A lease takes at most this fraction (1/N) of the bucket's capacity, so several Envoys
/// share a client's burst.
pub const BUCKET_SHARE: u64 = 4;

/// The first size tried: what the filter wants (at least one request's cost), at most
/// [`MAX_UNITS`] and a quarter of the tier bucket's capacity (a stored override may differ:
/// the decision then refuses and [`smaller`] shrinks it).
pub fn first_size(policy: &Policy, cost: u64, want: u64) -> u64 {
    let mut n = want.clamp(cost, MAX_UNITS.max(cost));
    if let Some(b) = policy.limit.get() {
        n = n.min((b.capacity / BUCKET_SHARE).max(cost));
    }
    n.max(cost)
}

/// The next size after a refusal of `n`: half, never below `cost`; `None` once `cost` itself
/// was refused (the answer is then that denial, exactly as `/v1/check` gives it).
pub fn smaller(n: u64, cost: u64) -> Option<u64> {
    (n > cost).then(|| (n / 2).max(cost))
}

/// Units still available after a granted decision under the limits that can refuse (the
/// bucket applied and hard-stop quotas); `None` when nothing limits the client.
pub fn available_after(d: &Decision) -> Option<u64> {
    let mut avail: Option<u64> = d.bucket.map(|b| b.remaining);
    for q in [&d.daily, &d.monthly] {
        if let (Some(limit), Some(OveragePolicy::HardStop)) = (q.limit, q.policy) {
            let left = limit.saturating_sub(q.used);
            avail = Some(avail.map_or(left, |a| a.min(left)));
        }
    }
    avail
}

/// How much of a grant of `granted` to keep when `after` units were left once it was taken:
/// a lease never holds more than half of what was available, so a client near its limit
/// gets small leases (down to `cost`, today's per-request behaviour) and other Envoys still
/// find units. The rest goes straight back (a release).
pub fn keep(granted: u64, after: Option<u64>, cost: u64) -> u64 {
    match after {
        Some(r) if r < granted => granted.saturating_add(r).div_ceil(2).max(cost).min(granted),
        _ => granted,
    }
}

/// When a lease granted at `now` ends: `ttl_ms` later, but never past the end of the UTC day
/// (the month ends on a day boundary too), so every unit is spent in the period it was
/// counted in and a release refunds that period.
pub fn expires_at(now: u64, ttl_ms: u64, periods: &Periods) -> u64 {
    now.saturating_add(ttl_ms.clamp(MIN_TTL_MS, MAX_TTL_MS))
        .min(periods.day.end_ms)
        .min(periods.month.end_ms)
}

/// Which bucket a lease's units came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketKind {
    None,
    Tier,
    Throttle,
}

impl BucketKind {
    fn tag(self) -> &'static str {
        match self {
            BucketKind::None => "n",
            BucketKind::Tier => "b",
            BucketKind::Throttle => "t",
        }
    }
    pub fn of(d: &Decision) -> Self {
        match (d.bucket, d.throttled) {
            (None, _) => BucketKind::None,
            (Some(_), false) => BucketKind::Tier,
            (Some(_), true) => BucketKind::Throttle,
        }
    }
}

/// What a lease id says: `<nonce>.<day id>.<month id>.<bucket>.<granted>.<expires ms>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRef {
    pub nonce: String,
    pub day_id: String,
    pub month_id: String,
    pub bucket: BucketKind,
    pub granted: u64,
    pub expires_ms: u64,
}

impl LeaseRef {
    pub fn id(&self) -> String {
        format!(
            "{}.{}.{}.{}.{}.{}",
            self.nonce,
            self.day_id,
            self.month_id,
            self.bucket.tag(),
            self.granted,
            self.expires_ms
        )
    }

    /// Reads an id; `None` for anything not made by [`LeaseRef::id`].
    pub fn parse(id: &str) -> Option<Self> {
        if id.len() > 128 {
            return None;
        }
        let mut p = id.split('.');
        let nonce = p.next()?;
        let day_id = p.next()?;
        let month_id = p.next()?;
        let bucket = match p.next()? {
            "n" => BucketKind::None,
            "b" => BucketKind::Tier,
            "t" => BucketKind::Throttle,
            _ => return None,
        };
        let granted = p.next()?.parse().ok()?;
        let expires_ms = p.next()?.parse().ok()?;
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
        (p.next().is_none()
            && hex(nonce, 16)
            && digits(day_id, 8)
            && digits(month_id, 6)
            && granted <= MAX_UNITS.max(crate::api::MAX_COST))
        .then(|| LeaseRef {
            nonce: nonce.into(),
            day_id: day_id.into(),
            month_id: month_id.into(),
            bucket,
            granted,
            expires_ms,
        })
    }
}

/// A fresh nonce: unique per process (a counter) and across replicas (the standard library's
/// randomly seeded hasher).
pub fn nonce() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(SEQ.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// Whether a decision granted its units.
pub fn granted(d: &Decision) -> bool {
    d.outcome == Outcome::Allowed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::{decide, ClientState, Input};
    use crate::policy::{Bucket, Quota, Setting};

    fn policy(cap: u64, daily: Option<u64>) -> Policy {
        Policy {
            limit: Setting::On(Bucket {
                capacity: cap,
                refill_tokens: 1,
                refill_period_s: 3600,
            }),
            daily: match daily {
                Some(limit) => Setting::On(Quota {
                    limit,
                    policy: OveragePolicy::HardStop,
                    throttle: None,
                }),
                None => Policy::default().daily,
            },
            ..Default::default()
        }
    }

    /// Grants leases the way the API does (first size, halve on refusal, keep at most half
    /// of what was left) against the pure decision; returns the kept sizes until refusal.
    fn leases(p: &Policy, st: &mut ClientState, want: u64, cost: u64) -> Vec<u64> {
        let mut out = vec![];
        'outer: loop {
            let mut n = first_size(p, cost, want);
            loop {
                let before = st.clone();
                let d = decide(
                    st,
                    "t",
                    p,
                    &Input {
                        now_ms: 1000,
                        cost: n,
                        day_end_ms: 86_400_000,
                        month_end_ms: 86_400_000 * 31,
                        thresholds: &[],
                    },
                );
                if granted(&d) {
                    let k = keep(n, available_after(&d), cost);
                    // The release of the excess, as the store does it.
                    st.daily.used -= n - k;
                    if let Some(b) = st.bucket.as_mut() {
                        b.level += (n - k) * b.period_ms;
                    }
                    out.push(k);
                    break;
                }
                assert_eq!(*st, before, "a refusal changes nothing");
                match smaller(n, cost) {
                    Some(m) => n = m,
                    None => break 'outer,
                }
            }
        }
        out
    }

    #[test]
    fn far_from_the_limit_leases_are_large_and_near_it_they_shrink_to_one() {
        let p = policy(400, None);
        let mut st = ClientState::default();
        let got = leases(&p, &mut st, 1000, 1);
        assert_eq!(got[0], 100, "a quarter of the capacity");
        assert_eq!(
            got.iter().sum::<u64>(),
            400,
            "exactly the capacity, never more"
        );
        assert_eq!(*got.last().unwrap(), 1, "the last units go one at a time");
        assert!(got.windows(2).all(|w| w[0] >= w[1]));
    }

    #[test]
    fn a_hard_stop_quota_is_never_exceeded_by_leases() {
        let p = policy(1000, Some(37));
        let mut st = ClientState::default();
        let got = leases(&p, &mut st, 500, 1);
        assert_eq!(got.iter().sum::<u64>(), 37);
        assert_eq!(st.daily.used, 37);
        // With a cost of 3, the last 1 unit is never granted.
        let mut st = ClientState::default();
        let got = leases(&p, &mut st, 500, 3);
        assert!(got.iter().all(|&k| k >= 3));
        assert_eq!(got.iter().sum::<u64>(), 36);
    }

    #[test]
    fn sizing_math_edges() {
        let p = policy(2, None);
        assert_eq!(
            first_size(&p, 1, 100),
            1,
            "tiny bucket: a quarter rounds to cost"
        );
        assert_eq!(first_size(&p, 5, 1), 5, "never below one request's cost");
        assert_eq!(first_size(&Policy::default(), 1, 1 << 40), MAX_UNITS);
        assert_eq!(smaller(1, 1), None);
        assert_eq!(smaller(9, 2), Some(4));
        assert_eq!(smaller(3, 2), Some(2));
        assert_eq!(keep(10, None, 1), 10);
        assert_eq!(keep(10, Some(10), 1), 10);
        assert_eq!(keep(10, Some(0), 1), 5);
        assert_eq!(keep(1, Some(0), 1), 1);
        assert_eq!(keep(4, Some(0), 3), 3);
    }

    #[test]
    fn a_lease_never_spans_a_day_or_month_boundary() {
        // 2024-02-29T23:59:58Z: day and month end 2 s later.
        let t = 1_709_251_198_000;
        let p = Periods::at(t).unwrap();
        assert_eq!(expires_at(t, 5_000, &p), t + 2_000);
        assert_eq!(p.day.end_ms, p.month.end_ms);
        // Mid-day: the TTL, clamped.
        let t = 1_709_200_000_000;
        let p = Periods::at(t).unwrap();
        assert_eq!(expires_at(t, 5_000, &p), t + 5_000);
        assert_eq!(expires_at(t, 1, &p), t + MIN_TTL_MS);
        assert_eq!(expires_at(t, u64::MAX, &p), t + MAX_TTL_MS);
        // The last millisecond of a day still gets a (1 ms) lease, counted in that day.
        let t = p.day.end_ms - 1;
        assert_eq!(expires_at(t, 5_000, &Periods::at(t).unwrap()), t + 1);
    }

    #[test]
    fn lease_ids_round_trip_and_hostile_ones_are_refused() {
        let r = LeaseRef {
            nonce: nonce(),
            day_id: "20240229".into(),
            month_id: "202402".into(),
            bucket: BucketKind::Throttle,
            granted: 12,
            expires_ms: 99,
        };
        assert_eq!(LeaseRef::parse(&r.id()), Some(r.clone()));
        assert_ne!(nonce(), nonce());
        for bad in [
            "",
            "x.20240229.202402.b.1.1",
            "0123456789abcdef.2024022.202402.b.1.1",
            "0123456789abcdef.20240229.202402.q.1.1",
            "0123456789abcdef.20240229.202402.b.-1.1",
            "0123456789abcdef.20240229.202402.b.1.1.9",
            "0123456789abcdef.20240229.202402.b.99999999999.1",
            "0123456789abcdef.2024}229.202402.b.1.1",
        ] {
            assert_eq!(LeaseRef::parse(bad), None, "{bad}");
        }
    }
}
