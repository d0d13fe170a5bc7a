//! Quota alerts end to end: two service replicas on one Redis, a real local HTTP receiver.
//! Each threshold is delivered once per period, signed per Standard Webhooks (verified with
//! the reference `standardwebhooks` crate), and a failed delivery is retried with the same
//! `webhook-id`.

mod common;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::{config_with, RedisServer, Service, ADMIN_TOKEN};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[derive(Default)]
struct Received {
    /// (headers, body, status we answered)
    calls: Vec<(HeaderMap, Bytes, u16)>,
}

async fn start_receiver() -> (String, Arc<Mutex<Received>>, tokio::task::JoinHandle<()>) {
    let got = Arc::new(Mutex::new(Received::default()));
    let g = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        post(move |headers: HeaderMap, body: Bytes| {
            let g = g.clone();
            async move {
                let mut r = g.lock().unwrap();
                // The very first delivery fails, to prove retries.
                let status = if r.calls.is_empty() { 500 } else { 204 };
                r.calls.push((headers, body, status));
                StatusCode::from_u16(status).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/hook"), got, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_threshold_is_delivered_once_signed_and_retried() {
    let (hook_url, got, receiver) = start_receiver().await;
    let redis = RedisServer::start(false);
    let cfg = config_with(
        "daily = { limit = 10, policy = \"overage\" }",
        "[alerts]\ninitial_backoff_ms = 100\nmax_backoff_ms = 200\ntimeout_ms = 2000",
    );
    let a = Service::start(&cfg, Some(&redis.url()));
    let b = Service::start(&cfg, Some(&redis.url()));
    let http = reqwest::Client::new();
    let r = http
        .put(format!("{}/v1/clients/acme", a.base()))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"alert_webhook": {"url": hook_url, "secret": SECRET}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // 15 checks alternating between the replicas: thresholds 80, 90, 100 of 10 are crossed at
    // the 8th, 9th and 10th request; the rest are overage and fire nothing.
    for i in 0..15 {
        let base = if i % 2 == 0 { a.base() } else { b.base() };
        let v = common::check(&http, &base, "acme", 1).await;
        assert_eq!(v["allowed"], true);
    }

    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ok = got
            .lock()
            .unwrap()
            .calls
            .iter()
            .filter(|c| c.2 == 204)
            .count();
        if ok >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alerts not delivered in time (got {ok})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Give duplicates, if any, time to show up.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let calls = std::mem::take(&mut got.lock().unwrap().calls);
    let wh = standardwebhooks::Webhook::new(SECRET).unwrap();
    let mut delivered = Vec::new();
    for (headers, body, status) in &calls {
        wh.verify(body, headers)
            .unwrap_or_else(|e| panic!("signature must verify: {e:?}"));
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["type"], "quota.threshold_reached");
        assert_eq!(v["data"]["client"], "acme");
        assert_eq!(v["data"]["quota"], "daily");
        assert_eq!(v["data"]["limit"], 10);
        let th = v["data"]["threshold_percent"].as_u64().unwrap();
        assert_eq!(
            v["data"]["used"].as_u64().unwrap(),
            th / 10,
            "used when crossing {th}%"
        );
        if *status == 204 {
            delivered.push(th);
        }
    }
    delivered.sort_unstable();
    assert_eq!(delivered, vec![80, 90, 100], "each threshold exactly once");
    assert_eq!(calls.len(), 4, "three alerts plus one retried attempt");
    let failed_id = calls[0].0["webhook-id"].clone();
    assert!(
        calls[1..].iter().any(|c| c.0["webhook-id"] == failed_id),
        "the retry reuses the webhook-id"
    );

    // The usage endpoint shows which thresholds fired.
    let u: serde_json::Value = http
        .get(format!("{}/v1/clients/acme/usage", b.base()))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        u["quotas"]["daily"]["alerts_sent"],
        serde_json::json!([80, 90, 100])
    );
    assert_eq!(u["quotas"]["daily"]["overage"], 5);

    // Metrics: the sending replicas together count 3 sent and 1 failed attempt.
    let mut sent = 0.0;
    let mut attempt_failed = 0.0;
    for base in [a.base(), b.base()] {
        let text = http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("api_guard_quota_alerts_total{result=\"sent\"} ") {
                sent += v.parse::<f64>().unwrap();
            }
            if let Some(v) =
                line.strip_prefix("api_guard_quota_alerts_total{result=\"attempt_failed\"} ")
            {
                attempt_failed += v.parse::<f64>().unwrap();
            }
        }
    }
    assert_eq!((sent, attempt_failed), (3.0, 1.0));
    receiver.abort();
}

#[tokio::test]
async fn a_check_never_waits_for_a_dead_webhook() {
    // The receiver port is closed: every delivery fails, slowly retried in the background.
    let dead = format!("http://127.0.0.1:{}/hook", common::free_port());
    let cfg = config_with(
        "daily = { limit = 1, policy = \"overage\" }",
        "[alerts]\ninitial_backoff_ms = 5000\ntimeout_ms = 5000",
    );
    let svc = Service::start(&cfg, None);
    let http = reqwest::Client::new();
    let r = http
        .put(format!("{}/v1/clients/slow", svc.base()))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"alert_webhook": {"url": dead, "secret": SECRET}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let start = Instant::now();
    for _ in 0..5 {
        common::check(&http, &svc.base(), "slow", 1).await;
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "checks were delayed by alert delivery"
    );
}
