//! Adaptive tightening and near-miss logging, through a real Envoy with 2 workers (both
//! deliveries): a route learns a low baseline, 200 distinct addresses each under the per-IP
//! limit surge past `surge_factor` × baseline, the route's limits tighten (a request that
//! would have passed gets 429) with exactly one `adaptive_on` event, and after `cooldown_s`
//! one `adaptive_off` and the normal limits again; a client crossing `near_miss_ratio` of a
//! limit is reported exactly once.

mod common;

use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

/// Client IPs come from the trusted `x-forwarded-for` hop. Small `baseline_s` and
/// `cooldown_s` keep the test short; the rules are the same at any scale.
const CONFIG: &str = r#"{
  "client_ip": { "xff_trusted_hops": 1, "use_remote_address": true },
  "abuse": { "near_miss_ratio": 0.8 },
  "rate_limits": {
    "per-ip": { "key": ["ip"], "capacity": 4, "refill_tokens": 4, "refill_period_s": 3600 },
    "nm":     { "key": ["ip"], "capacity": 5, "refill_tokens": 5, "refill_period_s": 3600 }
  },
  "routes": [
    { "name": "login", "match": { "prefix": "/login" }, "rate_limits": ["per-ip"],
      "adaptive": { "surge_factor": 5, "baseline_s": 2, "tighten_to": 0.5, "cooldown_s": 3 } },
    { "name": "scraped", "match": { "prefix": "/scraped" }, "rate_limits": ["nm"] }
  ],
  "default_route": { "auth": { "mode": "none" } }
}"#;

fn from(envoy: &Envoy, path: &str, ip: &str) -> Resp {
    envoy.req("GET", path).header("x-forwarded-for", ip).send()
}

/// The structured events named `event` in Envoy's log.
fn events(envoy: &Envoy, event: &str) -> Vec<Value> {
    envoy.events(event)
}

#[test]
fn a_surge_tightens_the_route_then_it_recovers_and_near_misses_are_reported_once() {
    let envoy = Envoy::start(CONFIG);

    // Baseline: 3 requests a second for 3.5 s, each from its own address (the route is
    // judged once its baseline has learned for min(baseline_s, 60) = 2 s).
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_millis(3500) {
        let r = from(&envoy, "/login", &format!("10.0.0.{n}"));
        assert_eq!(r.status, 200, "{}", r.text());
        n += 1;
        std::thread::sleep(Duration::from_millis(330));
    }
    // The victim has used 1 of its 4.
    assert_eq!(from(&envoy, "/login", "192.0.2.77").status, 200);
    assert!(events(&envoy, "adaptive_on").is_empty(), "no surge yet");

    // The surge: 200 addresses, one request each (well under the per-IP limit), far above
    // 5 x ~3/s within a second. Each passes.
    for i in 0..200 {
        let ip = format!("198.18.{}.{}", i / 250, i % 250 + 1);
        let r = from(&envoy, "/login", &ip);
        assert_eq!(r.status, 200, "{ip}: {}", r.text());
    }
    // Tightened to 0.5 (each request costs 2): the victim's 3 remaining tokens give one
    // more request, not three.
    assert_eq!(from(&envoy, "/login", "192.0.2.77").status, 200);
    let r = from(&envoy, "/login", "192.0.2.77");
    r.assert_error(429, "rate_limit_exceeded");
    let on_at = Instant::now();
    let on = events(&envoy, "adaptive_on");
    assert_eq!(on.len(), 1, "one event across both workers: {on:?}");
    assert_eq!(on[0]["route"], "login");
    assert_eq!(on[0]["policy"], "adaptive");
    assert_eq!(on[0]["tighten_to"], 0.5);
    assert!(on[0]["rate"].as_u64().unwrap() > 5, "{}", on[0]);
    assert!(
        on[0]["ip"].as_str().unwrap().starts_with("198.18."),
        "{}",
        on[0]
    );
    assert_eq!(envoy.stat("wasmcustom.api_guard.adaptive.on"), 1);
    assert_eq!(
        envoy.stat("wasmcustom.api_guard.adaptive.route.login.on"),
        1
    );
    assert_eq!(envoy.stat("wasmcustom.api_guard.adaptive.off"), 0);

    // Cooldown (3 s from the last surging request, at the latest the victim's): then one off
    // event and normal limits.
    let wait = Duration::from_millis(3300).saturating_sub(on_at.elapsed());
    std::thread::sleep(wait);
    for want in [200, 200, 200, 200, 429] {
        assert_eq!(
            from(&envoy, "/login", "192.0.2.88").status,
            want,
            "4 per address again"
        );
    }
    let off = events(&envoy, "adaptive_off");
    assert_eq!(off.len(), 1, "{off:?}");
    assert_eq!(off[0]["route"], "login");
    assert!(
        off[0]["tightened_ms"].as_u64().unwrap() >= 2000,
        "{}",
        off[0]
    );
    assert_eq!(events(&envoy, "adaptive_on").len(), 1, "no flapping");
    assert_eq!(envoy.stat("wasmcustom.api_guard.adaptive.off"), 1);
    assert_eq!(
        envoy.stat("wasmcustom.api_guard.adaptive.route.login.off"),
        1
    );

    // Near miss: 0.8 of 5 is 4. The 4th request reports, the 5th and the refused 6th don't;
    // another client staying at 3 never does.
    for want in [200, 200, 200, 200, 200, 429] {
        assert_eq!(from(&envoy, "/scraped", "203.0.113.80").status, want);
    }
    for _ in 0..3 {
        assert_eq!(from(&envoy, "/scraped", "203.0.113.81").status, 200);
    }
    let nm: Vec<Value> = events(&envoy, "near_miss")
        .into_iter()
        .filter(|e| e["policy"] == "nm")
        .collect();
    assert_eq!(nm.len(), 1, "{nm:?}");
    assert_eq!(nm[0]["route"], "scraped");
    assert_eq!(nm[0]["key"], "ip=203.0.113.80");
    assert_eq!(nm[0]["ip"], "203.0.113.80");
    assert_eq!(nm[0]["used"], 4);
    assert_eq!(nm[0]["limit"], 5);
    assert_eq!(envoy.stat("wasmcustom.api_guard.ratelimit.nm.near_miss"), 1);
}

#[test]
fn adaptive_config_errors_name_the_path() {
    for (config, path) in [
        (
            r#"{"routes":[{"name":"r","match":{"prefix":"/"},"adaptive":{"tighten_to":1.5}}]}"#,
            "routes[0].adaptive.tighten_to",
        ),
        (
            r#"{"default_route":{"adaptive":{"surge_factor":0.5}}}"#,
            "default_route.adaptive.surge_factor",
        ),
        (
            r#"{"abuse":{"near_miss_ratio":1}}"#,
            "abuse.near_miss_ratio",
        ),
    ] {
        let file = write_temp("adaptive-check.json", config);
        let out = cli().arg("check").arg(&file).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{config}: {text}");
        assert!(text.contains(path), "{config}: {text}");
    }
}

/// A route whose request rate stays flat while its 401s burst (credential stuffing with
/// few requests): the denial rate switches it on.
const STUFFED: &str = r#"{
  "client_ip": { "xff_trusted_hops": 1, "use_remote_address": true },
  "api_keys": { "header": "x-api-key", "keys": [
    { "id": "acme", "sha256": "6f0f8db1716f1a7909f09fef4ef9730dbcaa99df6f63e5f832f2122b27af2335" } ] },
  "rate_limits": {
    "per-ip": { "key": ["ip"], "capacity": 4, "refill_tokens": 4, "refill_period_s": 3600 }
  },
  "routes": [
    { "name": "signin", "match": { "prefix": "/signin" }, "rate_limits": ["per-ip"],
      "auth": { "mode": "required", "methods": ["api_key"] },
      "adaptive": { "surge_factor": 5, "baseline_s": 2, "tighten_to": 0.5, "cooldown_s": 30 } }
  ],
  "default_route": { "auth": { "mode": "none" } }
}"#;

#[test]
fn a_burst_of_401s_tightens_the_route_without_a_request_surge() {
    let envoy = Envoy::start(STUFFED);
    let signin = |ip: &str, key: &str| {
        envoy
            .req("GET", "/signin")
            .header("x-forwarded-for", ip)
            .header("x-api-key", key)
            .send()
    };
    // Baseline: about 4 good requests a second for 3.5 s, no denials.
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_millis(3500) {
        let r = signin(&format!("10.1.0.{n}"), "k-acme-0123456789abcdef");
        assert_eq!(r.status, 200, "{}", r.text());
        n += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(signin("192.0.2.90", "k-acme-0123456789abcdef").status, 200);
    // 8 wrong keys from 8 addresses in well under a second: 8 requests is no request surge
    // (5 x ~4/s), but more than 5 x max(0, min_rps 1) denials.
    for i in 0..8 {
        signin(&format!("198.19.0.{i}"), "k-wrong-key-000000000000")
            .assert_error(401, "invalid_api_key");
    }
    let on = events(&envoy, "adaptive_on");
    assert_eq!(on.len(), 1, "{on:?}");
    assert_eq!(on[0]["trigger"], "denials");
    assert_eq!(on[0]["route"], "signin");
    // Tightened: the good client's 3 remaining tokens give one more request, not three.
    assert_eq!(signin("192.0.2.90", "k-acme-0123456789abcdef").status, 200);
    signin("192.0.2.90", "k-acme-0123456789abcdef").assert_error(429, "rate_limit_exceeded");
    assert_eq!(envoy.stat("wasmcustom.api_guard.adaptive.on"), 1);
}
