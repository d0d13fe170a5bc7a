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
