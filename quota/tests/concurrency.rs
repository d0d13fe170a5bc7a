//! 200 concurrent checks on a limit of 50, spread over TWO service processes sharing one real
//! Redis, admit exactly 50: once for a token bucket (429 for the rest) and once for a daily
//! hard-stop quota (402 for the rest).

mod common;

use common::{config_with, RedisServer, Service};
use std::sync::Arc;

async fn burst(bases: &[String], client: &str, n: usize) -> (usize, Vec<u64>) {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let bases: Arc<Vec<String>> = Arc::new(bases.to_vec());
    let start = Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (http, bases, start, client) = (
            http.clone(),
            bases.clone(),
            start.clone(),
            client.to_string(),
        );
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let base = &bases[i % bases.len()];
            common::check(&http, base, &client, 1).await
        }));
    }
    let mut allowed = 0;
    let mut statuses = Vec::new();
    for t in tasks {
        let v = t.await.unwrap();
        if v["allowed"] == true {
            allowed += 1;
        } else {
            statuses.push(v["status"].as_u64().unwrap_or(0));
        }
    }
    (allowed, statuses)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_admit_exactly_the_bucket_capacity() {
    let redis = RedisServer::start(false);
    // Refill of 1 per hour: the burst cannot be helped by refills.
    let cfg = config_with(
        "limit = { capacity = 50, refill_tokens = 1, refill_period_s = 3600 }",
        "",
    );
    let a = Service::start(&cfg, Some(&redis.url()));
    let b = Service::start(&cfg, Some(&redis.url()));
    let (allowed, denied) = burst(&[a.base(), b.base()], "burst-bucket", 200).await;
    assert_eq!(allowed, 50, "exactly the capacity must pass");
    assert_eq!(denied.len(), 150);
    assert!(
        denied.iter().all(|&s| s == 429),
        "denials are 429: {denied:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_admit_exactly_the_daily_quota() {
    let redis = RedisServer::start(false);
    let cfg = config_with("daily = { limit = 50, policy = \"hard_stop\" }", "");
    let a = Service::start(&cfg, Some(&redis.url()));
    let b = Service::start(&cfg, Some(&redis.url()));
    let (allowed, denied) = burst(&[a.base(), b.base()], "burst-quota", 200).await;
    assert_eq!(allowed, 50);
    assert!(
        denied.iter().all(|&s| s == 402),
        "denials are 402: {denied:?}"
    );
    // Both replicas see the same count.
    let http = reqwest::Client::new();
    for base in [a.base(), b.base()] {
        let u: serde_json::Value = http
            .get(format!("{base}/v1/clients/burst-quota/usage"))
            .bearer_auth(common::ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(u["quotas"]["daily"]["used"], 50, "{u}");
        assert_eq!(u["quotas"]["daily"]["remaining"], 0, "{u}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_memory_store_is_exact_under_concurrency_too() {
    let cfg = config_with(
        "limit = { capacity = 50, refill_tokens = 1, refill_period_s = 3600 }",
        "",
    );
    let a = Service::start(&cfg, None);
    let (allowed, _) = burst(&[a.base()], "burst-mem", 200).await;
    assert_eq!(allowed, 50);
}
