//! No counts are lost when Redis (with AOF persistence) is killed and restarted, or when the
//! service itself is restarted: all state lives in Redis, and the service reconnects.

mod common;

use common::{config_with, RedisServer, Service, ADMIN_TOKEN};
use std::time::{Duration, Instant};

async fn used(http: &reqwest::Client, base: &str, client: &str) -> u64 {
    let u: serde_json::Value = http
        .get(format!("{base}/v1/clients/{client}/usage"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    u["quotas"]["daily"]["used"].as_u64().unwrap()
}

#[tokio::test]
async fn counts_survive_a_redis_crash_and_a_service_restart() {
    let mut redis = RedisServer::start(true);
    let cfg = config_with("daily = { limit = 10, policy = \"hard_stop\" }", "");
    let mut svc = Service::start(&cfg, Some(&redis.url()));
    let http = reqwest::Client::new();
    for _ in 0..7 {
        assert_eq!(
            common::check(&http, &svc.base(), "durable", 1).await["allowed"],
            true
        );
    }

    // SIGKILL: only what the AOF holds survives (fsync on every write).
    redis.crash_and_restart();
    // The service reconnects by itself; the first calls may fail while it does.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = http
            .get(format!("{}/readyz", svc.base()))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "service did not reconnect to Redis"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(used(&http, &svc.base(), "durable").await, 7);

    svc.restart(Some(&redis.url()));
    assert_eq!(used(&http, &svc.base(), "durable").await, 7);
    // The limit still counts from 7: three more pass, the fourth is refused.
    for _ in 0..3 {
        assert_eq!(
            common::check(&http, &svc.base(), "durable", 1).await["allowed"],
            true
        );
    }
    let v = common::check(&http, &svc.base(), "durable", 1).await;
    assert_eq!(v["status"], 402);
}

#[tokio::test]
async fn redis_down_means_503_and_not_ready_then_recovery() {
    let mut redis = RedisServer::start(false);
    let cfg = config_with("daily = { limit = 10, policy = \"hard_stop\" }", "");
    let svc = Service::start(&cfg, Some(&redis.url()));
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(format!("{}/readyz", svc.base()))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    redis.kill();
    let start = Instant::now();
    let r = http
        .post(format!("{}/v1/check", svc.base()))
        .json(&serde_json::json!({"client": "x", "tier": "t"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "a dead Redis must fail fast"
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "store_unavailable");
    assert_eq!(
        http.get(format!("{}/readyz", svc.base()))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
    assert_eq!(
        http.get(format!("{}/healthz", svc.base()))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let text = http
        .get(format!("{}/metrics", svc.base()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("api_guard_quota_store_errors_total{op=\"check\"}"),
        "{text}"
    );
    assert!(
        text.contains("api_guard_quota_decisions_total{outcome=\"error\"} 1"),
        "{text}"
    );

    redis.crash_and_restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = http
            .post(format!("{}/v1/check", svc.base()))
            .json(&serde_json::json!({"client": "x", "tier": "t"}))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no recovery after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
