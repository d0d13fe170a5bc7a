//! One test suite, run against the in-memory store and against a real `redis-server` (one
//! per test, on a free port). The Redis store runs the Lua port of the decision logic, so the
//! `redis::*` tests prove the script; `random_sequences_match_the_reference` compares it
//! decision by decision with the Rust implementation.

mod common;

use api_guard_quota::decision::{Decision, Outcome, Which};
use api_guard_quota::periods::Periods;
use api_guard_quota::policy::{Bucket, Keyword, OveragePolicy, Override, Policy, Quota, Setting};
use api_guard_quota::store::memory::MemoryStore;
use api_guard_quota::store::{CheckArgs, ClientRecord, Store, Webhook};

/// 2024-02-28T10:00:00Z: the next day is a leap day, the month ends two days later.
const T0: u64 = 1_709_114_400_000;
const DAY: u64 = 86_400_000;
const THRESHOLDS: &[u32] = &[80, 90, 100];

fn bucket(capacity: u64, refill_tokens: u64, refill_period_s: u64) -> Setting<Bucket> {
    Setting::On(Bucket {
        capacity,
        refill_tokens,
        refill_period_s,
    })
}

fn quota(limit: u64, policy: OveragePolicy, throttle: Option<Bucket>) -> Setting<Quota> {
    Setting::On(Quota {
        limit,
        policy,
        throttle,
    })
}

async fn chk(s: &dyn Store, client: &str, p: &Policy, cost: u64, now: u64) -> Decision {
    let periods = Periods::at(now).unwrap();
    s.check(CheckArgs {
        client,
        tier: "t",
        tier_policy: p,
        cost,
        now_ms: now,
        periods: &periods,
        thresholds: THRESHOLDS,
    })
    .await
    .expect("store check")
}

async fn bucket_admits_capacity_and_denials_consume_nothing(s: &dyn Store) {
    let p = Policy {
        limit: bucket(5, 1, 60),
        ..Default::default()
    };
    for i in 0..5 {
        let d = chk(s, "c1", &p, 1, T0).await;
        assert_eq!(d.outcome, Outcome::Allowed, "request {i}");
        assert_eq!(d.bucket.unwrap().remaining, 4 - i);
    }
    for _ in 0..20 {
        let d = chk(s, "c1", &p, 1, T0).await;
        assert_eq!(d.outcome, Outcome::RateLimited);
        assert_eq!(d.retry_after_ms, 60_000);
    }
    // 20 denials took nothing: one refill period gives exactly one more request.
    assert_eq!(
        chk(s, "c1", &p, 1, T0 + 60_000).await.outcome,
        Outcome::Allowed
    );
    assert_eq!(
        chk(s, "c1", &p, 1, T0 + 60_000).await.outcome,
        Outcome::RateLimited
    );
    // Counters moved only for allowed requests.
    let u = s.usage("c1", &Periods::at(T0).unwrap(), T0).await.unwrap();
    assert_eq!(u.daily.used, 6);
    // Another client has its own bucket.
    assert_eq!(chk(s, "c2", &p, 5, T0).await.outcome, Outcome::Allowed);
}

async fn bucket_refills_pro_rata_and_caps(s: &dyn Store) {
    let p = Policy {
        limit: bucket(10, 10, 10),
        ..Default::default()
    };
    assert_eq!(chk(s, "c", &p, 10, T0).await.outcome, Outcome::Allowed);
    let d = chk(s, "c", &p, 1, T0 + 500).await;
    assert_eq!(d.outcome, Outcome::RateLimited);
    assert_eq!(d.retry_after_ms, 500);
    let d = chk(s, "c", &p, 3, T0 + 3_000).await;
    assert_eq!(d.outcome, Outcome::Allowed);
    assert_eq!(d.bucket.unwrap().remaining, 0);
    // A long idle time refills to capacity, not beyond.
    let d = chk(s, "c", &p, 0, T0 + 10 * DAY).await;
    assert_eq!(d.bucket.unwrap().remaining, 10);
    assert_eq!(
        chk(s, "c", &p, 11, T0 + 10 * DAY).await.outcome,
        Outcome::RateLimited
    );
}

async fn hard_stop_denies_until_the_next_utc_day(s: &dyn Store) {
    let p = Policy {
        daily: quota(3, OveragePolicy::HardStop, None),
        monthly: quota(100, OveragePolicy::HardStop, None),
        ..Default::default()
    };
    for _ in 0..3 {
        assert_eq!(chk(s, "c", &p, 1, T0).await.outcome, Outcome::Allowed);
    }
    let d = chk(s, "c", &p, 1, T0).await;
    assert_eq!(d.outcome, Outcome::QuotaExceeded);
    assert_eq!(d.exceeded, Some(Which::Daily));
    // 2024-02-29T00:00:00Z is 14 h after T0.
    assert_eq!(d.retry_after_ms, 14 * 3_600_000);
    assert_eq!(d.daily.used, 3);
    // A request that would overshoot is refused whole, even if some units remain.
    let p2 = Policy {
        daily: quota(5, OveragePolicy::HardStop, None),
        ..p.clone()
    };
    assert_eq!(
        chk(s, "c", &p2, 3, T0).await.outcome,
        Outcome::QuotaExceeded
    );
    assert_eq!(chk(s, "c", &p2, 2, T0).await.outcome, Outcome::Allowed);
    // Leap day: a new daily counter, the monthly one carries on.
    let leap = T0 + 14 * 3_600_000;
    let d = chk(s, "c", &p, 1, leap).await;
    assert_eq!(d.outcome, Outcome::Allowed);
    assert_eq!(d.daily.used, 1);
    assert_eq!(d.monthly.used, 6);
}

async fn monthly_quota_resets_on_the_first_of_the_month(s: &dyn Store) {
    let p = Policy {
        monthly: quota(2, OveragePolicy::HardStop, None),
        ..Default::default()
    };
    assert_eq!(chk(s, "c", &p, 2, T0).await.outcome, Outcome::Allowed);
    let feb29 = T0 + DAY;
    let d = chk(s, "c", &p, 1, feb29).await;
    assert_eq!(d.outcome, Outcome::QuotaExceeded);
    assert_eq!(d.exceeded, Some(Which::Monthly));
    // 2024-03-01T00:00:00Z.
    let mar1 = 1_709_251_200_000;
    assert_eq!(d.retry_after_ms, mar1 - feb29);
    assert_eq!(
        chk(s, "c", &p, 1, mar1 - 1).await.outcome,
        Outcome::QuotaExceeded
    );
    let d = chk(s, "c", &p, 1, mar1).await;
    assert_eq!(d.outcome, Outcome::Allowed);
    assert_eq!(d.monthly.used, 1);
}

async fn throttle_applies_the_reduced_rate_after_the_quota(s: &dyn Store) {
    let p = Policy {
        limit: bucket(1000, 1000, 1),
        daily: quota(
            5,
            OveragePolicy::Throttle,
            Some(Bucket {
                capacity: 2,
                refill_tokens: 1,
                refill_period_s: 10,
            }),
        ),
        ..Default::default()
    };
    for _ in 0..5 {
        let d = chk(s, "c", &p, 1, T0).await;
        assert_eq!(d.outcome, Outcome::Allowed);
        assert!(!d.throttled);
    }
    for _ in 0..2 {
        let d = chk(s, "c", &p, 1, T0).await;
        assert_eq!(d.outcome, Outcome::Allowed);
        assert!(d.throttled);
        assert_eq!(d.bucket.unwrap().capacity, 2);
    }
    let d = chk(s, "c", &p, 1, T0).await;
    assert_eq!(d.outcome, Outcome::RateLimited);
    assert!(d.throttled);
    assert_eq!(d.retry_after_ms, 10_000);
    assert_eq!(
        chk(s, "c", &p, 1, T0 + 10_000).await.outcome,
        Outcome::Allowed
    );
    assert_eq!(chk(s, "c", &p, 1, T0 + 10_000).await.daily.used, 8);
}

async fn overage_is_allowed_and_counted(s: &dyn Store) {
    let p = Policy {
        daily: quota(3, OveragePolicy::Overage, None),
        ..Default::default()
    };
    for i in 1..=6 {
        let d = chk(s, "c", &p, 1, T0).await;
        assert_eq!(d.outcome, Outcome::Allowed);
        assert_eq!(d.daily.used, i);
        assert_eq!(d.daily.limit, Some(3));
        assert_eq!(d.daily.policy, Some(OveragePolicy::Overage));
    }
}

async fn alerts_fire_once_per_threshold_per_period(s: &dyn Store) {
    let p = Policy {
        daily: quota(10, OveragePolicy::Overage, None),
        monthly: quota(1000, OveragePolicy::Overage, None),
        ..Default::default()
    };
    let mut fired = vec![];
    for _ in 0..20 {
        let d = chk(s, "c", &p, 1, T0).await;
        fired.extend(d.alerts.iter().map(|a| (a.which, a.threshold)));
    }
    assert_eq!(
        fired,
        vec![(Which::Daily, 80), (Which::Daily, 90), (Which::Daily, 100)]
    );
    let u = s.usage("c", &Periods::at(T0).unwrap(), T0).await.unwrap();
    assert_eq!(u.daily.alerted, vec![80, 90, 100]);
    // The next day starts over.
    let d = chk(s, "c", &p, 8, T0 + DAY).await;
    assert_eq!(
        d.alerts
            .iter()
            .map(|a| (a.which, a.threshold))
            .collect::<Vec<_>>(),
        vec![(Which::Daily, 80)]
    );
    // Denied requests never fire alerts.
    let hs = Policy {
        daily: quota(1, OveragePolicy::HardStop, None),
        ..Default::default()
    };
    assert_eq!(chk(s, "h", &hs, 2, T0).await.alerts.len(), 0);
}

async fn overrides_apply_at_once_and_delete_restores_the_tier(s: &dyn Store) {
    let p = Policy {
        daily: quota(1, OveragePolicy::HardStop, None),
        ..Default::default()
    };
    assert_eq!(chk(s, "acme", &p, 1, T0).await.outcome, Outcome::Allowed);
    assert_eq!(
        chk(s, "acme", &p, 1, T0).await.outcome,
        Outcome::QuotaExceeded
    );
    // Mid-period upgrade: the used count stays, the new limit applies to the next request.
    let rec = ClientRecord {
        overrides: Some(Override {
            tier: Some("enterprise".into()),
            daily: Some(quota(3, OveragePolicy::HardStop, None)),
            limit: Some(Setting::Off(Keyword::Unlimited)),
            ..Default::default()
        }),
        webhook: Some(Webhook {
            url: "http://127.0.0.1:9/hook".into(),
            secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        }),
    };
    s.put_client("acme", &rec).await.unwrap();
    assert_eq!(s.get_client("acme").await.unwrap(), rec);
    let d = chk(s, "acme", &p, 1, T0).await;
    assert_eq!(d.outcome, Outcome::Allowed);
    assert_eq!(d.tier, "enterprise");
    assert_eq!(d.daily.used, 2);
    assert_eq!(chk(s, "acme", &p, 1, T0).await.outcome, Outcome::Allowed);
    assert_eq!(
        chk(s, "acme", &p, 1, T0).await.outcome,
        Outcome::QuotaExceeded
    );
    let u = s
        .usage("acme", &Periods::at(T0).unwrap(), T0)
        .await
        .unwrap();
    assert_eq!(u.overrides, rec.overrides);
    assert_eq!(u.daily.tier.as_deref(), Some("enterprise"));
    // Removing the override puts the client back on its tier (and the tier's limit of 1).
    s.put_client("acme", &ClientRecord::default())
        .await
        .unwrap();
    assert_eq!(s.get_client("acme").await.unwrap(), ClientRecord::default());
    let d = chk(s, "acme", &p, 0, T0).await;
    assert_eq!(d.tier, "t");
    assert_eq!(
        chk(s, "acme", &p, 1, T0).await.outcome,
        Outcome::QuotaExceeded
    );
}

async fn hostile_client_ids_stay_separate(s: &dyn Store) {
    let p = Policy {
        daily: quota(1, OveragePolicy::HardStop, None),
        ..Default::default()
    };
    let ids = ["a}", "a%7D", "a", "{a}", "a}:d:20240228", "a:b"];
    for id in ids {
        assert_eq!(
            chk(s, id, &p, 1, T0).await.outcome,
            Outcome::Allowed,
            "{id}"
        );
    }
    for id in ids {
        let u = s.usage(id, &Periods::at(T0).unwrap(), T0).await.unwrap();
        assert_eq!(u.daily.used, 1, "{id}");
    }
}

async fn unused_clients_read_as_empty(s: &dyn Store) {
    let u = s
        .usage("nobody", &Periods::at(T0).unwrap(), T0)
        .await
        .unwrap();
    assert_eq!(u.daily.used, 0);
    assert!(u.overrides.is_none());
    assert_eq!(
        s.get_client("nobody").await.unwrap(),
        ClientRecord::default()
    );
    s.ping().await.unwrap();
}

/// A fixed pseudo-random walk over policies, costs and times; every decision must equal the
/// Rust reference (a fresh in-memory store fed the same calls).
async fn random_sequences_match_the_reference(s: &dyn Store) {
    let reference = MemoryStore::default();
    let tb = Bucket {
        capacity: 3,
        refill_tokens: 2,
        refill_period_s: 7,
    };
    let policies = [
        Policy {
            limit: bucket(7, 3, 5),
            daily: quota(25, OveragePolicy::Throttle, Some(tb.clone())),
            monthly: quota(60, OveragePolicy::HardStop, None),
        },
        Policy {
            limit: bucket(4, 1, 1),
            daily: quota(9, OveragePolicy::Overage, None),
            monthly: quota(40, OveragePolicy::Throttle, Some(tb)),
        },
        Policy {
            limit: bucket(1_000_000, 333_333, 86_400),
            daily: quota(17, OveragePolicy::HardStop, None),
            ..Default::default()
        },
    ];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut now = T0;
    let mut seen = [0u32; 5];
    for step in 0..600 {
        let client = ["r1", "r2", "r3"][next(3) as usize];
        let p = &policies[next(3) as usize];
        let cost = [0, 1, 1, 1, 2, 3, 8][next(7) as usize];
        now += [0, 0, 1, 137, 999, 5_000, 3_600_000, 9 * 3_600_000][next(8) as usize];
        let got = chk(s, client, p, cost, now).await;
        let want = chk(&reference, client, p, cost, now).await;
        assert_eq!(
            got, want,
            "step {step}: client {client} cost {cost} now {now}"
        );
        seen[got.outcome as usize] += 1;
        seen[3] += u32::from(got.throttled);
        seen[4] += got.alerts.len() as u32;
    }
    // The walk must reach every branch, or it proves nothing.
    assert!(seen.iter().all(|&n| n > 0), "outcomes seen: {seen:?}");
}

macro_rules! suite {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $case() {
                    let s = super::MemoryStore::default();
                    super::$case(&s).await;
                }
            )*
        }
        mod redis {
            use api_guard_quota::store::redis::RedisStore;
            use std::time::Duration;
            $(
                #[tokio::test]
                async fn $case() {
                    let srv = super::common::RedisServer::start(false);
                    let s = RedisStore::connect(&srv.url(), Duration::from_secs(5)).await.expect("connect");
                    super::$case(&s).await;
                }
            )*
        }
        mod cluster {
            use api_guard_quota::store::redis::RedisStore;
            use std::time::Duration;
            $(
                #[tokio::test]
                async fn $case() {
                    let c = super::common::RedisCluster::start();
                    let s = RedisStore::connect(&c.url(), Duration::from_secs(5)).await.expect("connect");
                    super::$case(&s).await;
                }
            )*
        }
    };
}

/// Many clients on a 3-node Cluster: each client's keys stay in its slot (hash tag), and the
/// clients spread over all nodes.
#[tokio::test]
async fn cluster_spreads_clients_over_nodes() {
    use api_guard_quota::store::redis::RedisStore;
    let c = common::RedisCluster::start();
    let s = RedisStore::connect(&c.url(), std::time::Duration::from_secs(5))
        .await
        .unwrap();
    let p = Policy {
        limit: bucket(2, 1, 60),
        daily: quota(5, OveragePolicy::Overage, None),
        monthly: quota(50, OveragePolicy::Overage, None),
    };
    for i in 0..60 {
        let client = format!("client-{i}");
        assert_eq!(chk(&s, &client, &p, 1, T0).await.outcome, Outcome::Allowed);
        assert_eq!(
            chk(&s, &client, &p, 2, T0).await.outcome,
            Outcome::RateLimited
        );
    }
    let counts = c.key_counts();
    assert!(counts.iter().all(|&n| n > 0), "keys per node: {counts:?}");
    // 3 keys per client (bucket, day, month), wherever they live.
    assert_eq!(counts.iter().sum::<u64>(), 180);
}

suite!(
    bucket_admits_capacity_and_denials_consume_nothing,
    bucket_refills_pro_rata_and_caps,
    hard_stop_denies_until_the_next_utc_day,
    monthly_quota_resets_on_the_first_of_the_month,
    throttle_applies_the_reduced_rate_after_the_quota,
    overage_is_allowed_and_counted,
    alerts_fire_once_per_threshold_per_period,
    overrides_apply_at_once_and_delete_restores_the_tier,
    hostile_client_ids_stay_separate,
    unused_clients_read_as_empty,
    random_sequences_match_the_reference,
);
