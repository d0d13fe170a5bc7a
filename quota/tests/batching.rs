//! The Redis store's batching (`store::redis`, `scripts::CHECK_MANY`): many decisions in one
//! script call must answer exactly what the same checks answer one by one, a failed decision
//! must fail only itself, and concurrent checks through the batching task must stay exact.

mod common;

use api_guard_quota::decision::{Decision, Outcome};
use api_guard_quota::periods::Periods;
use api_guard_quota::policy::{Bucket, OveragePolicy, Policy, Quota, Setting};
use api_guard_quota::store::memory::MemoryStore;
use api_guard_quota::store::redis::RedisStore;
use api_guard_quota::store::{CheckArgs, Store};
use std::sync::Arc;
use std::time::Duration;

/// 2024-02-28T10:00:00Z.
const T0: u64 = 1_709_114_400_000;
const THRESHOLDS: &[u32] = &[50, 100];

fn policy(capacity: u64, daily: u64, policy: OveragePolicy) -> Policy {
    Policy {
        limit: Setting::On(Bucket {
            capacity,
            refill_tokens: 1,
            refill_period_s: 60,
        }),
        daily: Setting::On(Quota {
            limit: daily,
            policy,
            throttle: None,
        }),
        ..Default::default()
    }
}

struct Call {
    client: String,
    policy: usize,
    cost: u64,
    now: u64,
}

/// 60 checks over 12 clients, two tier policies, a day boundary and repeated clients, so one
/// batch holds several decisions on the same keys (their order matters) and on many others.
fn calls() -> Vec<Call> {
    (0..60u64)
        .map(|i| Call {
            client: format!("c{}", (i * 7) % 12),
            policy: (i % 2) as usize,
            cost: [1, 1, 2, 0, 3][(i % 5) as usize],
            // The last ten cross into the next UTC day (new day keys in the same batch).
            now: if i < 50 {
                T0 + i
            } else {
                T0 + 14 * 3_600_000 + i
            },
        })
        .collect()
}

fn args<'a>(c: &'a Call, policies: &'a [Policy], periods: &'a Periods) -> CheckArgs<'a> {
    CheckArgs {
        client: &c.client,
        tier: if c.policy == 0 { "free" } else { "pro" },
        tier_policy: &policies[c.policy],
        cost: c.cost,
        now_ms: c.now,
        periods,
        thresholds: THRESHOLDS,
    }
}

async fn batch_equals_one_by_one(s: &RedisStore) {
    let policies = [
        // Clients alternate tiers: this one runs into its daily quota...
        policy(10, 4, OveragePolicy::HardStop),
        // ...this one into its bucket, while its quota only counts overage.
        policy(3, 2, OveragePolicy::Overage),
    ];
    let calls = calls();
    let periods: Vec<Periods> = calls.iter().map(|c| Periods::at(c.now).unwrap()).collect();
    let batch: Vec<CheckArgs> = calls
        .iter()
        .zip(&periods)
        .map(|(c, p)| args(c, &policies, p))
        .collect();
    let got = s.check_batch(&batch).await;
    let reference = MemoryStore::default();
    let mut outcomes = [0; 3];
    let mut alerts = 0;
    for (i, (a, g)) in batch.iter().zip(got).enumerate() {
        let want = reference.check(a.clone()).await.unwrap();
        let g = g.unwrap_or_else(|e| panic!("check {i}: {e}"));
        assert_eq!(g, want, "check {i} ({})", a.client);
        outcomes[g.outcome as usize] += 1;
        alerts += g.alerts.len();
    }
    // The sequence must exercise admissions and both kinds of denial, or it proves little.
    assert!(
        outcomes.iter().all(|&n| n > 0) && alerts > 0,
        "{outcomes:?} {alerts}"
    );
    // A second batch continues from the state the first one left (a minute later).
    let later: Vec<Call> = calls
        .iter()
        .take(12)
        .map(|c| Call {
            client: c.client.clone(),
            now: c.now + 14 * 3_600_000 + 60_000,
            ..*c
        })
        .collect();
    let periods: Vec<Periods> = later.iter().map(|c| Periods::at(c.now).unwrap()).collect();
    let again: Vec<CheckArgs> = later
        .iter()
        .zip(&periods)
        .map(|(c, p)| args(c, &policies, p))
        .collect();
    for (a, g) in again.iter().zip(s.check_batch(&again).await) {
        assert_eq!(g.unwrap(), reference.check(a.clone()).await.unwrap());
    }
}

#[tokio::test]
async fn a_batch_spanning_many_keys_equals_the_checks_one_by_one() {
    let srv = common::RedisServer::start(false);
    let s = RedisStore::connect(&srv.url(), Duration::from_secs(5))
        .await
        .unwrap();
    batch_equals_one_by_one(&s).await;
    // Usage counters got their expiry when created (later checks skip that write).
    let mut c = redis::Client::open(srv.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let day_key = format!("ag:{{c0}}:d:{}", Periods::at(T0).unwrap().day.id);
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&day_key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(ttl > 86_400_000, "day counter expiry: {ttl} ms");
}

/// On Cluster the batch's clients live in different slots: `check_batch` sends one `CHECK`
/// per decision and must still answer the same.
#[tokio::test]
async fn cluster_batches_answer_the_same() {
    let c = common::RedisCluster::start();
    let s = RedisStore::connect(&c.url(), Duration::from_secs(5))
        .await
        .unwrap();
    batch_equals_one_by_one(&s).await;
    assert_eq!(s.batch_stats(), (0, 0), "no batching task on Cluster");
}

#[tokio::test]
async fn a_failed_decision_fails_only_its_own_entry() {
    let srv = common::RedisServer::start(false);
    let s = RedisStore::connect(&srv.url(), Duration::from_secs(5))
        .await
        .unwrap();
    // A bucket key of the wrong type makes that client's script step fail (WRONGTYPE).
    let mut c = redis::Client::open(srv.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("ag:{broken}:b")
        .arg("not a hash")
        .query_async(&mut c)
        .await
        .unwrap();
    let p = [policy(2, 100, OveragePolicy::HardStop)];
    let periods = Periods::at(T0).unwrap();
    let mk = |client: &str| Call {
        client: client.into(),
        policy: 0,
        cost: 1,
        now: T0,
    };
    let calls = [mk("ok1"), mk("broken"), mk("ok2"), mk("ok1")];
    let batch: Vec<CheckArgs> = calls.iter().map(|c| args(c, &p, &periods)).collect();
    let got = s.check_batch(&batch).await;
    assert_eq!(got.len(), 4);
    let err = got[1].as_ref().expect_err("the broken client fails");
    assert!(err.to_string().contains("WRONGTYPE"), "{err}");
    let remaining = |d: &Result<Decision, _>| d.as_ref().unwrap().bucket.unwrap().remaining;
    assert_eq!(got[0].as_ref().unwrap().outcome, Outcome::Allowed);
    assert_eq!(remaining(&got[0]), 1);
    assert_eq!(remaining(&got[2]), 1);
    // The decision after the failure saw the first one's charge: ok1 is now empty.
    assert_eq!(remaining(&got[3]), 0);
    // And the failure charged nothing: a lone check of ok2 sees its one remaining token.
    let d = s.check(args(&mk("ok2"), &p, &periods)).await.unwrap();
    assert_eq!(
        (d.outcome, d.bucket.unwrap().remaining),
        (Outcome::Allowed, 0)
    );
}

/// Many concurrent checks through the batching task: exactly the bucket's capacity is
/// admitted for the hot client, every other client gets its own capacity, and the checks
/// really were batched (fewer script calls than decisions).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_checks_are_batched_and_exact() {
    let srv = common::RedisServer::start(false);
    let s = Arc::new(
        RedisStore::connect(&srv.url(), Duration::from_secs(5))
            .await
            .unwrap(),
    );
    let p = Arc::new(policy(25, 1_000, OveragePolicy::HardStop));
    let mut tasks = Vec::new();
    for i in 0..400u64 {
        let (s, p) = (s.clone(), p.clone());
        tasks.push(tokio::spawn(async move {
            // Half the checks on one hot client, the rest over 20 others.
            let client = if i % 2 == 0 {
                "hot".to_string()
            } else {
                format!("cold{}", (i / 2) % 20)
            };
            let periods = Periods::at(T0).unwrap();
            let d = s
                .check(CheckArgs {
                    client: &client,
                    tier: "t",
                    tier_policy: &p,
                    cost: 1,
                    now_ms: T0,
                    periods: &periods,
                    thresholds: THRESHOLDS,
                })
                .await
                .expect("check");
            (client, d.outcome == Outcome::Allowed)
        }));
    }
    let mut allowed = std::collections::HashMap::<String, u32>::new();
    for t in tasks {
        let (c, ok) = t.await.unwrap();
        *allowed.entry(c).or_default() += u32::from(ok);
    }
    assert_eq!(allowed["hot"], 25, "hot client: exactly the capacity");
    // 200 cold checks over 20 clients (10 each): all within capacity.
    for i in 0..20 {
        assert_eq!(allowed[&format!("cold{i}")], 10);
    }
    let (calls, decisions) = s.batch_stats();
    assert_eq!(decisions, 400);
    assert!(calls < decisions, "{calls} calls for {decisions} decisions");
}

/// The memory store under the same concurrency (its lock makes each decision atomic).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_memory_store_is_exact_under_the_same_load() {
    let s = Arc::new(MemoryStore::default());
    let p = Arc::new(policy(25, 1_000, OveragePolicy::HardStop));
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (s, p) = (s.clone(), p.clone());
        tasks.push(tokio::spawn(async move {
            let periods = Periods::at(T0).unwrap();
            s.check(CheckArgs {
                client: "hot",
                tier: "t",
                tier_policy: &p,
                cost: 1,
                now_ms: T0,
                periods: &periods,
                thresholds: THRESHOLDS,
            })
            .await
            .unwrap()
            .outcome
                == Outcome::Allowed
        }));
    }
    let mut n = 0;
    for t in tasks {
        n += u32::from(t.await.unwrap());
    }
    assert_eq!(n, 25);
}
