//! `/v1/lease` and `/v1/lease/release` on both stores (memory, Redis, Redis Cluster): leases
//! are taken from the bucket and quotas up front, shrink near the limit, never exceed it,
//! and a release gives back at most what was granted, once.

mod common;

use common::{config_with, RedisCluster, RedisServer, Service};
use serde_json::{json, Value};

async fn post(http: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    let r = http.post(url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn lease(http: &reqwest::Client, svc: &Service, client: &str, want: u64) -> Value {
    let (s, v) = post(
        http,
        format!("{}/v1/lease", svc.base()),
        json!({"client": client, "tier": "t", "route": "r", "want": want}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    v
}

async fn exercise(svc: &Service) {
    let http = reqwest::Client::new();
    // Far from the limit: a quarter of the bucket; near it: half of what is left, down to 1.
    let mut total = 0;
    let mut sizes = vec![];
    loop {
        let v = lease(&http, svc, "acme", 1000).await;
        if v["allowed"] == false {
            assert_eq!(v["status"], 402, "{v}");
            assert_eq!(v["granted"], 0);
            assert!(v.get("lease_id").is_none());
            break;
        }
        let g = v["granted"].as_u64().unwrap();
        assert!(v["expires_at_ms"].as_u64().unwrap() > 0);
        assert!(v["lease_id"].as_str().unwrap().len() > 20);
        sizes.push(g);
        total += g;
        assert!(total <= 50, "{sizes:?}");
    }
    assert_eq!(total, 50, "the daily hard stop, exactly: {sizes:?}");
    assert_eq!(sizes[0], 25, "a quarter of capacity 100: {sizes:?}");
    assert_eq!(*sizes.last().unwrap(), 1, "{sizes:?}");

    // A release gives back at most the grant, once; the units are usable again.
    let v = lease(&http, svc, "beta", 8).await;
    assert_eq!(v["granted"], 8);
    assert_eq!(v["headers"]["x-quota-remaining"], "42");
    let id = v["lease_id"].as_str().unwrap().to_string();
    let url = format!("{}/v1/lease/release", svc.base());
    let (s, r) = post(
        &http,
        url.clone(),
        json!({"client": "beta", "lease_id": id, "units": 5}),
    )
    .await;
    assert_eq!((s, r["released"].as_u64()), (200, Some(5)));
    let (_, r) = post(
        &http,
        url.clone(),
        json!({"client": "beta", "lease_id": id, "units": 5}),
    )
    .await;
    assert_eq!(r["released"], 3, "only what is left of the grant");
    let (_, r) = post(
        &http,
        url.clone(),
        json!({"client": "beta", "lease_id": id, "units": 5}),
    )
    .await;
    assert_eq!(r["released"], 0, "never twice");
    let v = common::check(&http, &svc.base(), "beta", 1).await;
    assert_eq!(v["headers"]["x-quota-remaining"], "49", "{v}");
    for bad in [
        json!({"client": "beta", "lease_id": "nope", "units": 1}),
        json!({"client": "beta", "lease_id": id, "units": -1}),
        json!({"client": "beta", "lease_id": id}),
    ] {
        let (s, v) = post(&http, url.clone(), bad).await;
        assert!(s == 400 || s == 422, "{s} {v}");
    }
    let (s, v) = post(
        &http,
        format!("{}/v1/lease", svc.base()),
        json!({"client": "beta", "cost": 0}),
    )
    .await;
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_request")));
}

const TIERS: &str = "limit = { capacity = 100, refill_tokens = 1, refill_period_s = 3600 }\ndaily = { limit = 50, policy = \"hard_stop\" }";

#[tokio::test]
async fn leases_on_memory() {
    let svc = Service::start(&config_with(TIERS, ""), None);
    exercise(&svc).await;
}

#[tokio::test]
async fn leases_on_redis_and_cluster() {
    let redis = RedisServer::start(false);
    let svc = Service::start(&config_with(TIERS, ""), Some(&redis.url()));
    exercise(&svc).await;
    let cluster = RedisCluster::start();
    let svc = Service::start(&config_with(TIERS, ""), Some(&cluster.url()));
    exercise(&svc).await;
}

async fn chk(
    store: &dyn api_guard_quota::store::Store,
    policy: &api_guard_quota::policy::Policy,
    cost: u64,
    now: u64,
    periods: &api_guard_quota::periods::Periods,
) -> Result<api_guard_quota::decision::Decision, api_guard_quota::store::StoreError> {
    let args = api_guard_quota::store::CheckArgs {
        client: "night",
        tier: "t",
        tier_policy: policy,
        cost,
        now_ms: now,
        periods,
        thresholds: &[],
    };
    store.check(args).await
}

/// Release math on the stores directly, with the clock as an argument: a lease taken in the
/// last second of a month and released after midnight gives its units back to the day and
/// month it was counted in, never to the new ones; the bucket gets its tokens back (capped
/// by the next load); a release never exceeds the grant.
async fn release_across_midnight(store: &dyn api_guard_quota::store::Store) {
    use api_guard_quota::lease::{BucketKind, LeaseRef};
    use api_guard_quota::periods::Periods;
    use api_guard_quota::policy::{Bucket, OveragePolicy, Policy, Quota, Setting};
    use api_guard_quota::store::ReleaseArgs;
    let policy = Policy {
        limit: Setting::On(Bucket {
            capacity: 10,
            refill_tokens: 1,
            refill_period_s: 3600,
        }),
        daily: Setting::On(Quota {
            limit: 100,
            policy: OveragePolicy::HardStop,
            throttle: None,
        }),
        ..Default::default()
    };
    // 2024-02-29T23:59:59.500Z: the last half second of a day and of a month.
    let t = 1_709_251_199_500;
    let p = Periods::at(t).unwrap();
    let d = chk(store, &policy, 8, t, &p).await.unwrap();
    assert_eq!((d.daily.used, d.bucket.unwrap().remaining), (8, 2));
    let lease = LeaseRef {
        nonce: api_guard_quota::lease::nonce(),
        day_id: p.day.id.clone(),
        month_id: p.month.id.clone(),
        bucket: BucketKind::Tier,
        granted: 8,
        expires_ms: api_guard_quota::lease::expires_at(t, 5_000, &p),
    };
    assert_eq!(lease.expires_ms, p.day.end_ms, "the lease ends at midnight");
    // After midnight, none of the 8 units spent: they go back to the lease's periods.
    let t2 = p.day.end_ms + 1_000;
    let p2 = Periods::at(t2).unwrap();
    assert_ne!(p2.month.id, p.month.id);
    let rel = |units: u64| ReleaseArgs {
        client: "night",
        lease: &lease,
        units,
        now_ms: t2,
    };
    assert_eq!(store.release(rel(6)).await.unwrap(), 6);
    assert_eq!(store.release(rel(6)).await.unwrap(), 2, "at most the grant");
    assert_eq!(store.release(rel(6)).await.unwrap(), 0);
    let old = store.usage("night", &p, t2).await.unwrap();
    assert_eq!(
        (old.daily.used, old.monthly.used),
        (0, 0),
        "given back to the old periods"
    );
    let new = store.usage("night", &p2, t2).await.unwrap();
    assert_eq!(
        (new.daily.used, new.monthly.used),
        (0, 0),
        "the new ones untouched"
    );
    // The bucket got its 8 tokens back, capped at its capacity of 10.
    let d = chk(store, &policy, 1, t2, &p2).await.unwrap();
    assert_eq!(d.bucket.unwrap().remaining, 9);
    assert_eq!(d.daily.used, 1);
}

#[tokio::test]
async fn release_math_across_midnight_on_memory_and_redis() {
    let mem = api_guard_quota::store::memory::MemoryStore::default();
    release_across_midnight(&mem).await;
    let redis = RedisServer::start(false);
    let r = api_guard_quota::store::redis::RedisStore::connect(
        &redis.url(),
        std::time::Duration::from_secs(2),
    )
    .await
    .unwrap();
    release_across_midnight(&r).await;
}
