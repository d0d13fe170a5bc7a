//! One quota decision as a pure function of the policy, the client's stored state, the cost
//! and the time. The in-memory store runs this; the Redis store runs `store::scripts::CHECK`,
//! a line-by-line port of it, so both stores pass the same test suite.
//!
//! Divisions the script does in doubles (`math.floor`/`math.ceil` of a quotient) are done
//! here in `f64` too, so both give bit-identical answers; every operand is an integer below
//! 2^53 (see `policy`), where doubles are exact.

use crate::policy::{Bucket, OveragePolicy, Policy, Quota, Setting};

/// A stored token bucket. `level` is in tokens x `period_ms`, so refills are integer math.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketState {
    pub level: u64,
    pub t_ms: u64,
    pub period_ms: u64,
}

/// One period's counter and the alert thresholds already fired in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageState {
    pub used: u64,
    pub alerted: Vec<u32>,
    /// Tier of the last admitted request (shown by the usage endpoint).
    pub tier: Option<String>,
}

/// A client's mutable state for the current day and month.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientState {
    pub bucket: Option<BucketState>,
    pub throttle: Option<BucketState>,
    pub daily: UsageState,
    pub monthly: UsageState,
}

/// What the decision needs besides policy and state.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    pub now_ms: u64,
    pub cost: u64,
    pub day_end_ms: u64,
    pub month_end_ms: u64,
    pub thresholds: &'a [u32],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    RateLimited,
    QuotaExceeded,
}

impl Outcome {
    pub fn from_code(c: i64) -> Option<Self> {
        match c {
            0 => Some(Outcome::Allowed),
            1 => Some(Outcome::RateLimited),
            2 => Some(Outcome::QuotaExceeded),
            _ => None,
        }
    }
}

/// The bucket that was applied (the tier's or a throttle), after the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketReport {
    pub capacity: u64,
    pub refill_period_s: u64,
    pub remaining: u64,
    /// Milliseconds until the bucket is full again.
    pub full_in_ms: u64,
}

/// One quota after the decision (usage includes this request when it was allowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaReport {
    pub used: u64,
    pub limit: Option<u64>,
    pub policy: Option<OveragePolicy>,
}

/// Which quota a 402 is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Daily,
    Monthly,
}

/// A threshold crossed for the first time in this period by this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FiredAlert {
    pub which: Which,
    pub threshold: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    pub tier: String,
    pub bucket: Option<BucketReport>,
    pub throttled: bool,
    /// For denials: milliseconds until the same request could pass.
    pub retry_after_ms: u64,
    pub daily: QuotaReport,
    pub monthly: QuotaReport,
    pub alerts: Vec<FiredAlert>,
    /// For `QuotaExceeded`: the quota that stopped the request.
    pub exceeded: Option<Which>,
}

fn fdiv_floor(a: u64, b: u64) -> u64 {
    (a as f64 / b as f64).floor() as u64
}
fn fdiv_ceil(a: u64, b: u64) -> u64 {
    (a as f64 / b as f64).ceil() as u64
}

/// The bucket's level at `now` (refilled, capped) and its time; a missing bucket or one stored
/// under another period starts full (a changed limit starts fresh).
fn load_bucket(st: Option<BucketState>, b: &Bucket, now: u64) -> (u64, u64, u64, u64) {
    let pms = b.period_ms();
    let cap = b.capacity.saturating_mul(pms);
    let (mut level, mut t) = (cap, now);
    if let Some(s) = st {
        if s.period_ms == pms {
            level = s.level;
            t = s.t_ms;
            if now > t {
                level = level.saturating_add((now - t).saturating_mul(b.refill_tokens));
                t = now;
            }
            level = level.min(cap);
        }
    }
    (level, t, cap, pms)
}

fn slower(a: &Bucket, than: &Bucket) -> bool {
    // a's rate < than's rate, compared without division (products stay below 2^53).
    a.refill_tokens * than.refill_period_s < than.refill_tokens * a.refill_period_s
}

/// Decides one check and, when allowed, updates `st` (denials leave it untouched).
pub fn decide(st: &mut ClientState, tier: &str, policy: &Policy, input: &Input<'_>) -> Decision {
    let now = input.now_ms;
    let cost = input.cost;
    let quotas: [(&Setting<Quota>, u64, Which); 2] = [
        (&policy.daily, input.day_end_ms, Which::Daily),
        (&policy.monthly, input.month_end_ms, Which::Monthly),
    ];
    let mut used = [st.daily.used, st.monthly.used];
    let mut exceeded: Option<Which> = None;
    let mut reset_at = 0u64;
    let mut throttle: Option<&Bucket> = None;
    for (i, (setting, end, which)) in quotas.iter().enumerate() {
        if let Setting::On(q) = setting {
            if used[i].saturating_add(cost) > q.limit {
                match q.policy {
                    OveragePolicy::HardStop => {
                        // The later reset is the one worth waiting for.
                        if *end >= reset_at {
                            exceeded = Some(*which);
                            reset_at = *end;
                        }
                    }
                    OveragePolicy::Throttle => {
                        if let Some(tb) = &q.throttle {
                            if throttle.is_none_or(|cur| slower(tb, cur)) {
                                throttle = Some(tb);
                            }
                        }
                    }
                    OveragePolicy::Overage => {}
                }
            }
        }
    }

    let (bucket_cfg, throttled) = match throttle {
        Some(tb) => (Some(tb), true),
        None => (policy.limit.get(), false),
    };
    let mut outcome = Outcome::Allowed;
    let mut retry = 0u64;
    if exceeded.is_some() {
        outcome = Outcome::QuotaExceeded;
        retry = reset_at.saturating_sub(now);
    }
    let mut report = None;
    if let Some(b) = bucket_cfg {
        let stored = if throttled { st.throttle } else { st.bucket };
        let (mut level, t, cap, pms) = load_bucket(stored, b, now);
        let need = cost.saturating_mul(pms);
        if outcome == Outcome::Allowed {
            if need > level {
                outcome = Outcome::RateLimited;
                retry = if need > cap {
                    // Can never pass: a cost above capacity; hint one refill period.
                    pms
                } else {
                    fdiv_ceil(need - level, b.refill_tokens)
                };
            } else {
                level -= need;
                let new = Some(BucketState {
                    level,
                    t_ms: t,
                    period_ms: pms,
                });
                if throttled {
                    st.throttle = new;
                } else {
                    st.bucket = new;
                }
            }
        }
        report = Some(BucketReport {
            capacity: b.capacity,
            refill_period_s: b.refill_period_s,
            remaining: fdiv_floor(level, pms),
            full_in_ms: fdiv_ceil(cap - level, b.refill_tokens),
        });
    }

    let mut alerts = Vec::new();
    if outcome == Outcome::Allowed {
        for (i, (setting, _, which)) in quotas.iter().enumerate() {
            let u = if i == 0 {
                &mut st.daily
            } else {
                &mut st.monthly
            };
            u.used = u.used.saturating_add(cost);
            used[i] = u.used;
            u.tier = Some(tier.to_string());
            if let Setting::On(q) = setting {
                if q.limit > 0 {
                    for &th in input.thresholds {
                        let reached =
                            u128::from(u.used) * 100 >= u128::from(th) * u128::from(q.limit);
                        if reached && !u.alerted.contains(&th) {
                            u.alerted.push(th);
                            alerts.push(FiredAlert {
                                which: *which,
                                threshold: th,
                            });
                        }
                    }
                }
            }
        }
    }
    let rep = |s: &Setting<Quota>, used: u64| QuotaReport {
        used,
        limit: s.get().map(|q| q.limit),
        policy: s.get().map(|q| q.policy),
    };
    Decision {
        outcome,
        tier: tier.to_string(),
        bucket: report,
        throttled,
        retry_after_ms: retry,
        daily: rep(&policy.daily, used[0]),
        monthly: rep(&policy.monthly, used[1]),
        alerts,
        exceeded: if outcome == Outcome::QuotaExceeded {
            exceeded
        } else {
            None
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Keyword, Quota};

    fn bucket(c: u64, r: u64, p: u64) -> Setting<Bucket> {
        Setting::On(Bucket {
            capacity: c,
            refill_tokens: r,
            refill_period_s: p,
        })
    }
    fn quota(limit: u64, policy: OveragePolicy, throttle: Option<Bucket>) -> Setting<Quota> {
        Setting::On(Quota {
            limit,
            policy,
            throttle,
        })
    }
    fn input(now_ms: u64, cost: u64) -> Input<'static> {
        Input {
            now_ms,
            cost,
            day_end_ms: 86_400_000,
            month_end_ms: 31 * 86_400_000,
            thresholds: &[80, 90, 100],
        }
    }

    #[test]
    fn bucket_admits_capacity_then_refills_pro_rata() {
        let p = Policy {
            limit: bucket(3, 1, 1),
            ..Default::default()
        };
        let mut st = ClientState::default();
        for i in 0..3 {
            let d = decide(&mut st, "free", &p, &input(1000, 1));
            assert_eq!(d.outcome, Outcome::Allowed, "request {i}");
        }
        let d = decide(&mut st, "free", &p, &input(1000, 1));
        assert_eq!(d.outcome, Outcome::RateLimited);
        assert_eq!(d.retry_after_ms, 1000);
        // Half a period later still nothing; a full period later one token.
        assert_eq!(
            decide(&mut st, "free", &p, &input(1500, 1)).outcome,
            Outcome::RateLimited
        );
        let d = decide(&mut st, "free", &p, &input(2000, 1));
        assert_eq!(d.outcome, Outcome::Allowed);
        assert_eq!(d.bucket.unwrap().remaining, 0);
        assert_eq!(d.bucket.unwrap().full_in_ms, 3000);
    }

    #[test]
    fn denials_consume_nothing() {
        let p = Policy {
            limit: bucket(5, 1, 60),
            daily: quota(2, OveragePolicy::HardStop, None),
            ..Default::default()
        };
        let mut st = ClientState::default();
        assert_eq!(
            decide(&mut st, "t", &p, &input(0, 2)).outcome,
            Outcome::Allowed
        );
        let before = st.clone();
        let d = decide(&mut st, "t", &p, &input(0, 1));
        assert_eq!(d.outcome, Outcome::QuotaExceeded);
        assert_eq!(d.exceeded, Some(Which::Daily));
        assert_eq!(d.retry_after_ms, 86_400_000);
        assert_eq!(st, before, "a 402 must not touch the bucket or counters");
        // A rate-limited request does not count against the quota either.
        let p2 = Policy {
            limit: bucket(1, 1, 60),
            daily: quota(10, OveragePolicy::HardStop, None),
            ..Default::default()
        };
        let mut st = ClientState::default();
        decide(&mut st, "t", &p2, &input(0, 1));
        assert_eq!(
            decide(&mut st, "t", &p2, &input(0, 1)).outcome,
            Outcome::RateLimited
        );
        assert_eq!(st.daily.used, 1);
    }

    #[test]
    fn throttle_switches_to_the_slower_bucket_after_the_quota() {
        let tb = Bucket {
            capacity: 1,
            refill_tokens: 1,
            refill_period_s: 10,
        };
        let p = Policy {
            limit: bucket(100, 100, 1),
            daily: quota(2, OveragePolicy::Throttle, Some(tb)),
            ..Default::default()
        };
        let mut st = ClientState::default();
        for _ in 0..2 {
            let d = decide(&mut st, "t", &p, &input(0, 1));
            assert!(!d.throttled);
        }
        let d = decide(&mut st, "t", &p, &input(0, 1));
        assert_eq!(d.outcome, Outcome::Allowed);
        assert!(d.throttled);
        let d = decide(&mut st, "t", &p, &input(0, 1));
        assert_eq!(d.outcome, Outcome::RateLimited);
        assert_eq!(d.retry_after_ms, 10_000);
        assert_eq!(st.daily.used, 3, "throttled requests still count");
    }

    #[test]
    fn overage_keeps_serving_and_alerts_fire_once() {
        let p = Policy {
            daily: quota(10, OveragePolicy::Overage, None),
            ..Default::default()
        };
        let mut st = ClientState::default();
        let mut fired = vec![];
        for _ in 0..15 {
            let d = decide(&mut st, "t", &p, &input(0, 1));
            assert_eq!(d.outcome, Outcome::Allowed);
            fired.extend(d.alerts.iter().map(|a| (a.which, a.threshold)));
        }
        assert_eq!(
            fired,
            vec![(Which::Daily, 80), (Which::Daily, 90), (Which::Daily, 100)]
        );
        assert_eq!(st.daily.used, 15);
    }

    #[test]
    fn a_jump_past_several_thresholds_fires_each() {
        let p = Policy {
            monthly: quota(10, OveragePolicy::Overage, None),
            ..Default::default()
        };
        let mut st = ClientState::default();
        let d = decide(&mut st, "t", &p, &input(0, 9));
        assert_eq!(d.alerts.len(), 2);
        assert!(d.alerts.iter().all(|a| a.which == Which::Monthly));
    }

    #[test]
    fn both_quotas_exhausted_reports_the_later_reset() {
        let p = Policy {
            daily: quota(1, OveragePolicy::HardStop, None),
            monthly: quota(1, OveragePolicy::HardStop, None),
            ..Default::default()
        };
        let mut st = ClientState::default();
        decide(&mut st, "t", &p, &input(0, 1));
        let d = decide(&mut st, "t", &p, &input(0, 1));
        assert_eq!(d.exceeded, Some(Which::Monthly));
        assert_eq!(d.retry_after_ms, 31 * 86_400_000);
    }

    #[test]
    fn cost_above_capacity_never_passes() {
        let p = Policy {
            limit: bucket(5, 1, 1),
            ..Default::default()
        };
        let mut st = ClientState::default();
        let d = decide(&mut st, "t", &p, &input(0, 6));
        assert_eq!(d.outcome, Outcome::RateLimited);
        assert_eq!(d.bucket.unwrap().remaining, 5);
    }

    #[test]
    fn a_changed_period_starts_full_and_clock_going_back_does_not_refill() {
        let mut st = ClientState::default();
        let p = Policy {
            limit: bucket(2, 1, 60),
            ..Default::default()
        };
        decide(&mut st, "t", &p, &input(10_000, 2));
        assert_eq!(
            decide(&mut st, "t", &p, &input(5_000, 1)).outcome,
            Outcome::RateLimited
        );
        let p2 = Policy {
            limit: bucket(2, 1, 30),
            ..Default::default()
        };
        assert_eq!(
            decide(&mut st, "t", &p2, &input(10_000, 1)).outcome,
            Outcome::Allowed
        );
        let unl = Policy {
            limit: Setting::Off(Keyword::Unlimited),
            ..Default::default()
        };
        let d = decide(&mut st, "t", &unl, &input(10_000, 1_000_000));
        assert_eq!(d.outcome, Outcome::Allowed);
        assert!(d.bucket.is_none());
    }
}
