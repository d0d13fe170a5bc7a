//! The HTTP contract (SPEC section 5) on the embedded store: answer shapes, headers the filter
//! copies, hostile input, admin authentication.

mod common;

use common::{config_with, Service, ADMIN_TOKEN};
use serde_json::{json, Value};

async fn post(http: &reqwest::Client, url: String, body: &'static [u8]) -> (u16, Value) {
    let r = http
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn allowed_and_denied_answers_have_the_spec_shape() {
    let cfg = config_with(
        "limit = { capacity = 3, refill_tokens = 1, refill_period_s = 60 }\ndaily = { limit = 2, policy = \"hard_stop\" }",
        "",
    );
    let svc = Service::start(&cfg, None);
    let http = reqwest::Client::new();
    let v = common::check(&http, &svc.base(), "acme", 1).await;
    assert_eq!(v["allowed"], true);
    assert_eq!(
        v["remaining"], 1,
        "daily quota (1 left) is tighter than the bucket (2 left): {v}"
    );
    assert!(v["reset_s"].as_u64().unwrap() > 0);
    let h = &v["headers"];
    assert_eq!(h["ratelimit-policy"], "\"quota-global\";q=3;w=60");
    assert_eq!(h["ratelimit"], "\"quota-global\";r=2;t=60");
    assert_eq!(h["x-quota-limit"], "2");
    assert_eq!(h["x-quota-remaining"], "1");
    common::check(&http, &svc.base(), "acme", 1).await;
    let v = common::check(&http, &svc.base(), "acme", 1).await;
    assert_eq!(v["allowed"], false);
    assert_eq!(v["status"], 402);
    assert_eq!(v["error"], "quota_exceeded");
    let reset_at = v["reset_at"].as_str().unwrap();
    assert!(reset_at.ends_with("T00:00:00Z"), "{reset_at}");
    assert!(v["retry_after_s"].as_u64().unwrap() >= 1);
    assert_eq!(v["headers"]["retry-after"], v["retry_after_s"].to_string());
    assert!(v["message"].as_str().unwrap().contains("daily quota"));

    // Token bucket exhausted: 429 with retry-after.
    let cfg = config_with(
        "limit = { capacity = 1, refill_tokens = 1, refill_period_s = 30 }",
        "",
    );
    let svc = Service::start(&cfg, None);
    common::check(&http, &svc.base(), "b", 1).await;
    let v = common::check(&http, &svc.base(), "b", 1).await;
    assert_eq!(v["status"], 429);
    assert_eq!(v["error"], "rate_limit_exceeded");
    assert_eq!(v["retry_after_s"], 30);
    assert_eq!(v["headers"]["retry-after"], "30");
}

#[tokio::test]
async fn hostile_input_gets_400_in_the_error_shape() {
    let svc = Service::start(&config_with("", ""), None);
    let http = reqwest::Client::new();
    let url = || format!("{}/v1/check", svc.base());
    for body in [
        &b"not json"[..],
        b"{}",
        b"[]",
        b"{\"client\": 5}",
        b"{\"client\": \"\"}",
        b"{\"client\": \"a b\"}",
        b"{\"client\": \"a\", \"cost\": -1}",
        b"{\"client\": \"a\", \"cost\": 18446744073709551616}",
        b"{\"client\": \"a\", \"cost\": 1000001}",
        b"{\"client\": \"a\", \"tier\": \"\\u0000\"}",
        b"{\"client\": \"a\", \"extra\": 1}",
        b"{\"client\": \"a\"",
        b"\xff\xfe",
    ] {
        let (status, v) = post(&http, url(), body).await;
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(body));
        assert_eq!(v["error"], "invalid_request");
        assert!(v["message"].is_string());
    }
    let big = format!("{{\"client\": \"{}\"}}", "a".repeat(100_000));
    let r = http.post(url()).body(big).send().await.unwrap();
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "payload_too_large");
    let deep = "[".repeat(10_000);
    let r = http.post(url()).body(deep).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .get(format!("{}/nope", svc.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "not_found");
    // Still serving.
    assert_eq!(
        common::check(&http, &svc.base(), "ok", 1).await["allowed"],
        true
    );
}

#[tokio::test]
async fn admin_api_needs_the_bearer_token_and_validates() {
    let svc = Service::start(
        &config_with(
            "daily = { limit = 1, policy = \"hard_stop\" }",
            "[tiers.gold]\ndaily = { limit = 100, policy = \"overage\" }",
        ),
        None,
    );
    let http = reqwest::Client::new();
    let url = format!("{}/v1/clients/acme", svc.base());
    let r = http
        .put(&url)
        .json(&json!({"tier": "gold"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let r = http
        .put(&url)
        .bearer_auth("wrong")
        .json(&json!({"tier": "gold"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "invalid_token");
    for bad in [
        json!({"tier": "gold", "nope": 1}),
        json!({"daily": {"limit": 5, "policy": "throttle"}}),
        json!({"limit": {"capacity": 0, "refill_tokens": 1, "refill_period_s": 1}}),
        json!({"alert_webhook": {"url": "ftp://x/y", "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}}),
        json!({"alert_webhook": {"url": "http://127.0.0.1/h", "secret": "plain"}}),
    ] {
        let r = http
            .put(&url)
            .bearer_auth(ADMIN_TOKEN)
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        assert_eq!(r.json::<Value>().await.unwrap()["error"], "invalid_request");
    }
    // Upgrade to gold: takes effect on the next check.
    assert_eq!(
        common::check(&http, &svc.base(), "acme", 1).await["allowed"],
        true
    );
    assert_eq!(
        common::check(&http, &svc.base(), "acme", 1).await["status"],
        402
    );
    let r = http
        .put(&url)
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"tier": "gold", "alert_webhook": {"url": "https://hooks.example.com/q", "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["overrides"]["tier"], "gold");
    assert_eq!(
        v["alert_webhook"]["secret"], "(set)",
        "secrets are never echoed"
    );
    let v = common::check(&http, &svc.base(), "acme", 1).await;
    assert_eq!(v["allowed"], true);
    assert_eq!(v["tier"], "gold");
    let r = http
        .get(&url)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap()["overrides"]["daily"]["limit"],
        100
    );
    let r = http
        .delete(&url)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        common::check(&http, &svc.base(), "acme", 1).await["status"],
        402
    );
}

#[tokio::test]
async fn admin_api_is_off_without_a_token_and_health_endpoints_answer() {
    let svc = Service::start("[tiers.t]\n", None);
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{}/v1/clients/acme/usage", svc.base()))
        .bearer_auth("anything")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "admin_disabled");
    let r = http
        .get(format!("{}/readyz", svc.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["store"], "memory");
    common::check(&http, &svc.base(), "m", 1).await;
    let text = http
        .get(format!("{}/metrics", svc.base()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("api_guard_quota_decisions_total{outcome=\"allowed\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("api_guard_quota_store_latency_seconds_bucket"),
        "{text}"
    );
}

#[test]
fn a_bad_config_refuses_to_start_with_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.toml");
    std::fs::write(
        &path,
        "[tiers.free]\ndaily = { limit = 5, policy = \"throttle\" }\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_api-guard-quota"))
        .arg("--config")
        .arg(&path)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tiers.free.daily"), "{err}");
}
