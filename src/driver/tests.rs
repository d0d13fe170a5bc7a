//! The whole request path through the driver on an in-memory host: what Envoy would see
//! (local replies, upstream headers, callouts, resumes, response headers, logs, counters).

use super::*;
use crate::auth::mint::SigningKey;
use crate::host::testing::FakeHost;
use crate::host::OwnedResponse;
use serde_json::{json, Value};

fn worker(cfg: Value, host: &mut FakeHost) -> Rc<Worker> {
    let json = cfg.to_string();
    let env = |name: &str| (name == "HOOK_SECRET").then(|| GH_SECRET.to_string());
    Rc::new(Worker::configure(json.as_bytes(), &env, host).expect("valid config"))
}

fn ok(status: u32, body: &str) -> OwnedResponse {
    OwnedResponse {
        status: Some(status),
        body: body.as_bytes().to_vec(),
    }
}

fn sent(host: &FakeHost) -> &crate::host::testing::SentResponse {
    host.sent.as_ref().expect("a local response")
}

fn error_code(host: &FakeHost) -> String {
    let v: Value = serde_json::from_str(&sent(host).body_text()).unwrap();
    v["error"].as_str().unwrap().to_string()
}

#[test]
fn an_allowed_request_goes_upstream_with_one_header_read_and_gets_security_headers() {
    let mut h = FakeHost::new();
    let w = worker(json!({}), &mut h);
    h.request(
        "GET",
        "/x",
        &[("x-auth-subject", "admin"), ("x-request-id", "r1")],
    );
    let mut d = Driver::new(Rc::clone(&w));
    assert_eq!(d.on_request_headers(&mut h, true), Action::Continue);
    assert!(h.sent.is_none());
    assert_eq!(
        h.request_header("x-auth-subject"),
        None,
        "spoofed identity stripped"
    );
    assert_eq!(h.counter("api_guard.allowed"), 1);
    // The hot path reads the header map and the source address once each.
    assert_eq!((h.header_reads, h.attribute_reads), (1, 1));
    h.response_headers = vec![("x-frame-options".into(), "SAMEORIGIN".into())];
    assert_eq!(d.on_response_headers(&mut h), Action::Continue);
    assert_eq!(
        h.response_header_values("x-frame-options"),
        ["SAMEORIGIN"],
        "upstream's kept"
    );
    assert_eq!(
        h.response_header_values("x-content-type-options"),
        ["nosniff"]
    );
    d.on_done(&mut h);
    assert_eq!(h.logged(LogLevel::Error, ""), 0);
}

#[test]
fn a_cors_preflight_is_answered_locally_and_counted() {
    let mut h = FakeHost::new();
    let w = worker(
        json!({"cors": {"allow_origins": ["https://app.test"], "allow_methods": ["GET", "POST"],
                        "allow_headers": ["authorization"], "max_age_s": 60}}),
        &mut h,
    );
    h.request(
        "OPTIONS",
        "/api",
        &[
            ("origin", "https://app.test"),
            ("access-control-request-method", "POST"),
        ],
    );
    let mut d = Driver::new(w);
    assert_eq!(d.on_request_headers(&mut h, true), Action::Pause);
    let r = sent(&h);
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.test")
    );
    assert_eq!(r.body, None);
    assert_eq!(h.counter("api_guard.answered"), 1);
    assert_eq!(h.counter("api_guard.allowed"), 0);
    // A local answer gets no second pass over response headers.
    h.response_headers.clear();
    d.on_response_headers(&mut h);
    assert!(h.response_headers.is_empty());
}

fn jwt_config(key: &SigningKey) -> Value {
    json!({
        "jwt_providers": {"main": {"issuer": "https://idp.test", "algorithms": ["ES256"],
                                   "local_jwks": {"keys": [key.jwk()]}}},
        "routes": [{"name": "api", "match": {"prefix": "/api"},
                    "auth": {"mode": "required", "methods": ["jwt:main"]}}]
    })
}

fn token(key: &SigningKey, host: &FakeHost) -> String {
    let claims = json!({"iss": "https://idp.test", "sub": "user-7",
                        "exp": host.now.get() / 1000 + 600});
    format!("Bearer {}", key.sign(claims.as_object().unwrap()).unwrap())
}

#[test]
fn a_valid_jwt_is_forwarded_with_the_verified_identity() {
    let key = SigningKey::generate("ES256", "k1").unwrap();
    let mut h = FakeHost::new();
    let w = worker(jwt_config(&key), &mut h);
    let bearer = token(&key, &h);
    h.request(
        "GET",
        "/api/orders",
        &[("authorization", &bearer), ("x-auth-subject", "root")],
    );
    assert_eq!(
        Driver::new(w).on_request_headers(&mut h, true),
        Action::Continue
    );
    assert_eq!(h.request_header("x-auth-subject"), Some("user-7"));
    assert!(h
        .request_header("x-request-id")
        .is_some_and(|id| id.len() == 36));
    assert_eq!(h.counter("api_guard.allowed"), 1);
}

#[test]
fn a_bad_jwt_gets_401_a_deny_log_and_a_counter() {
    let key = SigningKey::generate("ES256", "k1").unwrap();
    let other = SigningKey::generate("ES256", "k1").unwrap();
    let mut h = FakeHost::new();
    let w = worker(jwt_config(&key), &mut h);
    let forged = token(&other, &h);
    h.request("GET", "/api/orders?q=1", &[("authorization", &forged)]);
    let mut d = Driver::new(w);
    assert_eq!(d.on_request_headers(&mut h, true), Action::Pause);
    assert_eq!(sent(&h).status, 401);
    assert_eq!(error_code(&h), "invalid_token");
    assert!(sent(&h).header("www-authenticate").is_some());
    assert_eq!(h.counter("api_guard.denied.invalid_token"), 1);
    assert_eq!(h.counter("api_guard.allowed"), 0);
    assert_eq!(h.logged(LogLevel::Info, "invalid_token"), 1, "{:?}", h.logs);
    assert_eq!(h.logged(LogLevel::Info, "/api/orders"), 1);
    // A body arriving after the reply is not forwarded.
    assert_eq!(d.on_request_body(&mut h, 10, true), Action::Pause);
}

#[test]
fn the_rate_limit_answers_429_once_the_bucket_is_empty() {
    let mut h = FakeHost::new();
    let w = worker(
        json!({"rate_limits": {"per-ip": {"key": ["ip"], "capacity": 2, "refill_tokens": 1,
                                          "refill_period_s": 60}},
               "default_route": {"rate_limits": ["per-ip"]}}),
        &mut h,
    );
    for _ in 0..2 {
        h.request("GET", "/", &[]);
        let mut d = Driver::new(Rc::clone(&w));
        assert_eq!(d.on_request_headers(&mut h, true), Action::Continue);
        d.on_response_headers(&mut h);
        assert_eq!(
            h.response_header_values("ratelimit").len(),
            1,
            "{:?}",
            h.response_headers
        );
    }
    h.request("GET", "/", &[]);
    assert_eq!(
        Driver::new(Rc::clone(&w)).on_request_headers(&mut h, true),
        Action::Pause
    );
    assert_eq!(sent(&h).status, 429);
    assert_eq!(error_code(&h), "rate_limit_exceeded");
    assert!(sent(&h).header("retry-after").is_some());
    assert_eq!(h.counter("api_guard.ratelimit.per-ip.allowed"), 2);
    assert_eq!(h.counter("api_guard.ratelimit.per-ip.denied"), 1);
    assert_eq!(h.counter("api_guard.denied.rate_limit_exceeded"), 1);
}

#[test]
fn adaptive_switches_and_near_misses_are_logged_and_counted() {
    let mut h = FakeHost::new();
    let w = worker(
        json!({"rate_limits": {"per-ip": {"key": ["ip"], "capacity": 100, "refill_tokens": 100,
                                          "refill_period_s": 60}},
               "routes": [{"name": "log in", "match": {"prefix": "/"}, "rate_limits": ["per-ip"],
                           "adaptive": {"surge_factor": 2, "baseline_s": 1, "cooldown_s": 1}}]}),
        &mut h,
    );
    let t0 = h.now.get();
    let go = |h: &mut FakeHost, at: u64| {
        h.now.set(t0 + at);
        h.request("GET", "/", &[]);
        Driver::new(Rc::clone(&w)).on_request_headers(h, true)
    };
    // Learn 1/s for a second, then 3 in a second (> 2 x 1): on; after 1 s: off.
    go(&mut h, 0);
    for i in 0..3 {
        go(&mut h, 1000 + i);
    }
    assert_eq!(h.counter("api_guard.adaptive.on"), 1);
    assert_eq!(h.counter("api_guard.adaptive.route.log_in.on"), 1);
    assert_eq!(
        h.logged(LogLevel::Info, "\"event\":\"api_guard.adaptive_on\""),
        1
    );
    assert_eq!(h.counter("api_guard.adaptive.off"), 0);
    go(&mut h, 2500);
    assert_eq!(h.counter("api_guard.adaptive.off"), 1);
    assert_eq!(h.counter("api_guard.adaptive.route.log_in.off"), 1);
    assert_eq!(
        h.logged(LogLevel::Info, "\"event\":\"api_guard.adaptive_off\""),
        1
    );
    // Tightened requests cost 2: 1 + 2 + 2 + 1 + 1 = 7 of 100 used, no near miss yet.
    assert_eq!(h.counter("api_guard.ratelimit.per-ip.near_miss"), 0);
    for i in 0..80 {
        go(&mut h, 3000 + i * 20);
    }
    assert_eq!(h.counter("api_guard.ratelimit.per-ip.near_miss"), 1);
    assert_eq!(
        h.logged(LogLevel::Info, "\"event\":\"api_guard.near_miss\""),
        1
    );
}

fn quota_config(mode: &str) -> Value {
    json!({
        "quota": {"cluster": "quota", "timeout_ms": 80, "failure_mode": mode, "mode": "check",
                  "breaker": {"failures": 2, "open_ms": 5000}},
        "routes": [{"name": "orders", "match": {"prefix": "/api"}, "quota": true, "cost": 3}]
    })
}

fn lease_config(failure_mode: &str) -> Value {
    json!({
        "quota": {"cluster": "quota", "timeout_ms": 80, "failure_mode": failure_mode,
                  "breaker": {"failures": 5, "open_ms": 5000}},
        "routes": [{"name": "orders", "match": {"prefix": "/api"}, "quota": true}]
    })
}

fn grant(h: &FakeHost, id: &str, n: u64) -> OwnedResponse {
    let exp = h.now.get() + 5000;
    ok(
        200,
        &format!(
            r#"{{"allowed":true,"granted":{n},"lease_id":"{id}","expires_at_ms":{exp},
                "headers":{{"x-quota-remaining":"90"}}}}"#
        ),
    )
}

/// One request through the lease path: `Continue` without a callout, or `None` when it
/// paused for one.
fn leased(h: &mut FakeHost, w: &Rc<Worker>) -> Option<Driver> {
    h.request("GET", "/api/x", &[]);
    let mut d = Driver::new(Rc::clone(w));
    match d.on_request_headers(h, true) {
        Action::Continue => None,
        Action::Pause => Some(d),
    }
}

#[test]
fn in_lease_mode_one_callout_serves_many_requests_and_the_next_lease_comes_in_the_background() {
    let mut h = FakeHost::new();
    let w = worker(lease_config("deny"), &mut h);
    assert_eq!(w.tick_ms(), Some(crate::driver::LEASE_TICK_MS));
    // No lease: the first request waits for one.
    let mut d = leased(&mut h, &w).expect("waits for the first lease");
    let call = h.callouts[0].clone();
    assert_eq!(call.header(":path"), Some("/v1/lease"));
    let body: Value = serde_json::from_slice(call.body.as_deref().unwrap()).unwrap();
    assert_eq!(
        (body["cost"].as_u64(), body["want"].as_u64()),
        (Some(1), Some(32))
    );
    let g = grant(&h, "L1", 4);
    d.on_callout_done(&mut h, call.token, Some(&g));
    assert_eq!(h.resumed, 1);
    d.on_response_headers(&mut h);
    // The service counts the whole lease as used; the 3 units still held are the client's.
    assert_eq!(h.response_header_values("x-quota-remaining"), ["93"]);
    // The next 3 requests spend the lease without a callout; the first queues a refresh.
    for _ in 0..3 {
        assert!(leased(&mut h, &w).is_none());
    }
    assert_eq!(h.callouts.len(), 1, "no callout on the request path");
    w.tick(&mut h);
    assert_eq!(h.callouts.len(), 2, "the timer asks for the next lease");
    let refresh = h.callouts[1].clone();
    assert_eq!(refresh.header(":path"), Some("/v1/lease"));
    let g = grant(&h, "L2", 10);
    w.on_callout_done(&mut h, refresh.token, Some(&g));
    for _ in 0..10 {
        assert!(leased(&mut h, &w).is_none());
    }
    w.tick(&mut h);
    // A refresh for L2 went out during those 10; nothing else.
    assert_eq!(h.callouts.len(), 3);
    assert_eq!(h.counter("api_guard.allowed"), 14);
}

#[test]
fn with_the_service_down_a_held_lease_is_used_up_then_failure_mode_applies() {
    let mut h = FakeHost::new();
    let w = worker(lease_config("deny"), &mut h);
    let mut d = leased(&mut h, &w).unwrap();
    let token = h.callouts[0].token;
    let g = grant(&h, "L1", 3);
    d.on_callout_done(&mut h, token, Some(&g));
    assert!(leased(&mut h, &w).is_none());
    // The refresh times out.
    w.tick(&mut h);
    let token = h.callouts[1].token;
    w.on_callout_done(&mut h, token, None);
    assert!(leased(&mut h, &w).is_none(), "the last held unit");
    // Nothing held: the request asks, the service is down, failure_mode deny answers 503.
    let mut d = leased(&mut h, &w).expect("asks");
    let token = h.callouts.last().unwrap().token;
    d.on_callout_done(&mut h, token, None);
    assert_eq!(sent(&h).status, 503);
    assert_eq!(error_code(&h), "quota_unavailable");
    assert_eq!(
        h.counter("api_guard.allowed"),
        3,
        "exactly the granted units"
    );
}

#[test]
fn a_failed_lease_call_spends_a_lease_that_landed_meanwhile() {
    let mut h = FakeHost::new();
    let w = worker(lease_config("deny"), &mut h);
    let mut d = leased(&mut h, &w).expect("waits");
    // A background refresh is installed while this request waits for its own call.
    let who = crate::quota_lease::Owner {
        client: "10.0.0.1",
        tier: "anonymous",
        route: "orders",
    };
    let g = crate::quota_lease::Grant {
        id: "bg".into(),
        granted: 2,
        expires_at_ms: h.now.get() + 5000,
    };
    crate::quota_lease::install(&*h.store, who, &g, 0, &[], h.now.get());
    let token = h.callouts[0].token;
    d.on_callout_done(&mut h, token, None);
    assert!(h.sent.is_none(), "not 503: a granted unit was held");
    assert_eq!(h.resumed, 1);
    assert!(leased(&mut h, &w).is_none(), "the second unit");
    assert!(leased(&mut h, &w).is_some(), "then nothing is held");
}

#[test]
fn an_expired_lease_gives_its_units_back_through_the_timer() {
    let mut h = FakeHost::new();
    let w = worker(lease_config("allow"), &mut h);
    let mut d = leased(&mut h, &w).unwrap();
    let token = h.callouts[0].token;
    let g = grant(&h, "L1", 50);
    d.on_callout_done(&mut h, token, Some(&g));
    h.now.set(h.now.get() + 6000);
    for _ in 0..(crate::quota_lease::SLOTS / 64 + 1) {
        w.tick(&mut h);
    }
    let release = h.callouts.last().unwrap();
    assert_eq!(release.header(":path"), Some("/v1/lease/release"));
    let body: Value = serde_json::from_slice(release.body.as_deref().unwrap()).unwrap();
    assert_eq!(
        body,
        json!({"client": "10.0.0.1", "lease_id": "L1", "units": 49})
    );
    // An expired lease is never spent: the next request asks again.
    assert!(leased(&mut h, &w).is_some());
}

#[test]
fn a_quota_answer_resumes_the_held_request_with_its_headers() {
    let mut h = FakeHost::new();
    let w = worker(quota_config("deny"), &mut h);
    h.request("GET", "/api/x", &[]);
    let mut d = Driver::new(w);
    assert_eq!(d.on_request_headers(&mut h, true), Action::Pause);
    let call = h.callouts.last().unwrap().clone();
    assert_eq!(call.cluster, "quota");
    assert_eq!(call.timeout_ms, 80);
    assert_eq!(call.header(":path"), Some("/v1/check"));
    let body: Value = serde_json::from_slice(call.body.as_deref().unwrap()).unwrap();
    assert_eq!(
        (body["route"].as_str(), body["cost"].as_u64()),
        (Some("orders"), Some(3))
    );
    // Body bytes arriving during the callout are held, not forwarded.
    assert_eq!(d.on_request_body(&mut h, 4, false), Action::Pause);
    let answer = ok(
        200,
        r#"{"allowed":true,"headers":{"x-quota-remaining":"4"}}"#,
    );
    d.on_callout_done(&mut h, call.token, Some(&answer));
    assert_eq!(h.resumed, 1);
    assert!(h.sent.is_none());
    assert_eq!(d.on_request_body(&mut h, 8, true), Action::Continue);
    d.on_response_headers(&mut h);
    assert_eq!(h.response_header_values("x-quota-remaining"), ["4"]);
}

#[test]
fn a_quota_denial_is_the_services_reply() {
    let mut h = FakeHost::new();
    let w = worker(quota_config("allow"), &mut h);
    h.request("GET", "/api/x", &[]);
    let mut d = Driver::new(w);
    d.on_request_headers(&mut h, true);
    let token = h.callouts[0].token;
    let answer = ok(
        200,
        r#"{"allowed":false,"status":402,"error":"quota_exceeded","message":"used up","retry_after_s":60,"reset_at":"2024-03-01T00:00:00Z"}"#,
    );
    // Another token (a stale or foreign callout) changes nothing.
    d.on_callout_done(&mut h, CalloutToken(999), Some(&answer));
    assert!(h.sent.is_none());
    d.on_callout_done(&mut h, token, Some(&answer));
    assert_eq!(sent(&h).status, 402);
    assert_eq!(error_code(&h), "quota_exceeded");
    assert_eq!(h.resumed, 0);
}

#[test]
fn quota_failures_apply_failure_mode_and_open_the_breaker() {
    let mut h = FakeHost::new();
    let w = worker(quota_config("deny"), &mut h);
    // 1: no answer (timeout); 2: an oversized answer whose body is never read.
    for answer in [
        None,
        Some(ok(200, &"x".repeat(quota_client::MAX_ANSWER_BYTES + 1))),
    ] {
        h.request("GET", "/api/x", &[]);
        let mut d = Driver::new(Rc::clone(&w));
        assert_eq!(d.on_request_headers(&mut h, true), Action::Pause);
        let token = h.callouts.last().unwrap().token;
        d.on_callout_done(&mut h, token, answer.as_ref().map(|a| a as _));
        assert_eq!(sent(&h).status, 503);
        assert_eq!(error_code(&h), "quota_unavailable");
    }
    // Two failures opened the breaker: no callout, an answer at once.
    h.request("GET", "/api/x", &[]);
    assert_eq!(
        Driver::new(Rc::clone(&w)).on_request_headers(&mut h, true),
        Action::Pause
    );
    assert_eq!(h.callouts.len(), 2);
    assert_eq!(sent(&h).status, 503);
    assert_eq!(h.counter("api_guard.quota.unavailable"), 3);
    // After open_ms one probe calls again; its success closes the breaker.
    h.now.set(h.now.get() + 5001);
    h.request("GET", "/api/x", &[]);
    let mut d = Driver::new(Rc::clone(&w));
    assert_eq!(d.on_request_headers(&mut h, true), Action::Pause);
    assert_eq!(h.callouts.len(), 3);
    let token = h.callouts[2].token;
    d.on_callout_done(&mut h, token, Some(&ok(200, r#"{"allowed":true}"#)));
    assert_eq!(h.resumed, 1);
}

#[test]
fn a_quota_callout_that_cannot_be_dispatched_never_holds_the_request() {
    let mut h = FakeHost::new();
    let w = worker(quota_config("allow"), &mut h);
    h.refuse_callouts = true;
    h.request("GET", "/api/x", &[]);
    assert_eq!(
        Driver::new(w).on_request_headers(&mut h, true),
        Action::Continue
    );
    assert!(h.sent.is_none());
    assert_eq!(h.counter("api_guard.quota.unavailable"), 1);
    assert_eq!(h.counter("api_guard.allowed"), 1);
}

fn remote_jwks_config() -> Value {
    json!({
        "jwt_providers": {"idp": {"algorithms": ["ES256"],
                                  "remote_jwks": {"cluster": "idp", "path": "/jwks.json"}}},
        "default_route": {"auth": {"mode": "required", "methods": ["jwt:idp"]}}
    })
}

#[test]
fn a_request_fetches_a_missing_jwks_itself_and_is_resumed() {
    let key = SigningKey::generate("ES256", "r1").unwrap();
    let mut h = FakeHost::new();
    let w = worker(remote_jwks_config(), &mut h);
    let claims = json!({"sub": "u1", "exp": h.now.get() / 1000 + 60});
    let bearer = format!("Bearer {}", key.sign(claims.as_object().unwrap()).unwrap());
    h.request("GET", "/x", &[("authorization", &bearer)]);
    let mut d = Driver::new(Rc::clone(&w));
    assert_eq!(d.on_request_headers(&mut h, true), Action::Pause);
    let call = h.callouts[0].clone();
    assert_eq!(
        (call.cluster.as_str(), call.header(":path")),
        ("idp", Some("/jwks.json"))
    );
    let jwks = json!({"keys": [key.jwk()]}).to_string();
    d.on_callout_done(&mut h, call.token, Some(&ok(200, &jwks)));
    assert_eq!(h.resumed, 1);
    assert!(h.sent.is_none());
    assert_eq!(h.request_header("x-auth-subject"), Some("u1"));
    // The set is shared now: the next request verifies without a callout.
    h.request("GET", "/x", &[("authorization", &bearer)]);
    assert_eq!(
        Driver::new(w).on_request_headers(&mut h, true),
        Action::Continue
    );
    assert_eq!(h.callouts.len(), 1);
}

/// An answer that must never be copied.
struct Huge;
impl CalloutResponse for Huge {
    fn status(&self) -> Option<u32> {
        Some(200)
    }
    fn body_len(&self) -> usize {
        10 << 20
    }
    fn body(&self) -> Vec<u8> {
        panic!("an oversized JWKS was copied")
    }
}

#[test]
fn an_oversized_jwks_is_refused_without_being_copied_and_the_request_denied() {
    let key = SigningKey::generate("ES256", "r1").unwrap();
    let mut h = FakeHost::new();
    let w = worker(remote_jwks_config(), &mut h);
    let claims = json!({"sub": "u1", "exp": h.now.get() / 1000 + 60});
    let bearer = format!("Bearer {}", key.sign(claims.as_object().unwrap()).unwrap());
    h.request("GET", "/x", &[("authorization", &bearer)]);
    let mut d = Driver::new(w);
    d.on_request_headers(&mut h, true);
    let token = h.callouts[0].token;
    d.on_callout_done(&mut h, token, Some(&Huge));
    assert_eq!(
        h.logged(LogLevel::Warn, "over the 262144-byte limit"),
        1,
        "{:?}",
        h.logs
    );
    assert_eq!(sent(&h).status, 401);
    assert_eq!(h.resumed, 0);
}

#[test]
fn the_worker_refreshes_jwks_in_the_background_when_the_host_has_a_timer() {
    let key = SigningKey::generate("ES256", "r1").unwrap();
    let mut h = FakeHost::new();
    let w = worker(remote_jwks_config(), &mut h);
    assert!(w.needs_tick());
    w.refresh_jwks(&mut h);
    assert_eq!(h.callouts.len(), 1, "a first set is due at once");
    let jwks = json!({"keys": [key.jwk()]}).to_string();
    let token = h.callouts[0].token;
    w.on_callout_done(&mut h, token, Some(&ok(200, &jwks)));
    assert_eq!(
        h.logged(LogLevel::Info, "refreshed (1 keys)"),
        1,
        "{:?}",
        h.logs
    );
    w.refresh_jwks(&mut h);
    assert_eq!(h.callouts.len(), 1, "fresh: nothing due");
    let claims = json!({"sub": "u1", "exp": h.now.get() / 1000 + 60});
    let bearer = format!("Bearer {}", key.sign(claims.as_object().unwrap()).unwrap());
    h.request("GET", "/x", &[("authorization", &bearer)]);
    assert_eq!(
        Driver::new(w).on_request_headers(&mut h, true),
        Action::Continue
    );
    assert!(!worker(json!({}), &mut FakeHost::new()).needs_tick());
}

const GH_SECRET: &str = "It's a Secret to Everybody";
const GH_SIG: &str = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

fn webhook_config() -> Value {
    json!({
        "webhooks": {"gh": {"scheme": "github", "secrets": [{"env": "HOOK_SECRET"}],
                            "max_body_bytes": 64}},
        "routes": [{"name": "hook", "match": {"path": "/hook"}, "auth": {"mode": "none"},
                    "webhook": "gh"}]
    })
}

#[test]
fn a_webhook_body_is_verified_as_it_streams_then_forwarded() {
    let mut h = FakeHost::new();
    let w = worker(webhook_config(), &mut h);
    h.request("POST", "/hook", &[("x-hub-signature-256", GH_SIG)]);
    let mut d = Driver::new(w);
    assert_eq!(d.on_request_headers(&mut h, false), Action::Pause);
    h.body.extend_from_slice(b"Hello, ");
    assert_eq!(d.on_request_body(&mut h, 7, false), Action::Pause);
    h.body.extend_from_slice(b"World!");
    assert_eq!(d.on_request_body(&mut h, 13, true), Action::Continue);
    assert!(h.sent.is_none());
    assert_eq!(h.counter("api_guard.allowed"), 1);
    d.on_done(&mut h);
    assert_eq!(h.logged(LogLevel::Error, ""), 0);
}

#[test]
fn a_tampered_or_oversized_webhook_body_is_refused_without_reading_past_the_limit() {
    let mut h = FakeHost::new();
    let w = worker(webhook_config(), &mut h);
    h.request("POST", "/hook", &[("x-hub-signature-256", GH_SIG)]);
    let mut d = Driver::new(Rc::clone(&w));
    d.on_request_headers(&mut h, false);
    h.body.extend_from_slice(b"Hello, World?");
    // Trailers end the body.
    assert_eq!(d.on_request_body(&mut h, 13, false), Action::Pause);
    assert_eq!(d.on_request_trailers(&mut h), Action::Pause);
    assert_eq!(sent(&h).status, 401);
    assert_eq!(error_code(&h), "invalid_signature");

    h.request("POST", "/hook", &[("x-hub-signature-256", GH_SIG)]);
    let mut d = Driver::new(w);
    d.on_request_headers(&mut h, false);
    h.body = vec![b'a'; 10_000];
    assert_eq!(d.on_request_body(&mut h, 10_000, false), Action::Pause);
    assert_eq!(sent(&h).status, 413);
    assert!(
        h.largest_body_read <= 65,
        "read {} bytes",
        h.largest_body_read
    );
}

#[test]
fn a_webhook_body_that_never_arrives_names_the_envoy_setting_once_per_worker() {
    let mut h = FakeHost::new();
    let w = worker(webhook_config(), &mut h);
    for _ in 0..2 {
        h.request("POST", "/hook", &[("x-hub-signature-256", GH_SIG)]);
        let mut d = Driver::new(Rc::clone(&w));
        assert_eq!(d.on_request_headers(&mut h, false), Action::Pause);
        // Envoy held the body back; the stream times out.
        d.on_done(&mut h);
    }
    assert_eq!(
        h.logged(LogLevel::Error, "allow_on_headers_stop_iteration"),
        1,
        "{:?}",
        h.logs
    );
    assert_eq!(h.logged(LogLevel::Error, "'hook'"), 1);
}

#[test]
fn a_bad_path_is_refused_and_an_invalid_config_is_refused_loudly() {
    let mut h = FakeHost::new();
    let w = worker(json!({}), &mut h);
    h.request("GET", "/a/%2e%2e/%2e%2e/etc", &[]);
    assert_eq!(
        Driver::new(w).on_request_headers(&mut h, true),
        Action::Pause
    );
    assert_eq!(sent(&h).status, 400);
    assert_eq!(h.counter("api_guard.denied.invalid_request"), 1);

    let mut h = FakeHost::new();
    let err = Worker::configure(br#"{"routes": 7}"#, &|_| None, &mut h).err();
    assert!(err.is_some());
    assert_eq!(h.logged(LogLevel::Error, "invalid configuration"), 1);
}

fn hygiene_config() -> Value {
    json!({
        "quota": {"cluster": "quota", "timeout_ms": 80},
        "routes": [
            {"name": "small", "match": {"path": "/small"}, "max_body_bytes": 16},
            {"name": "json", "match": {"path": "/json"},
             "content_types": ["application/json", "text/*"]},
            {"name": "slow", "match": {"path": "/slow"},
             "backend_ceiling": {"max_in_flight": 1}},
            {"name": "q", "match": {"path": "/q"}, "quota": true, "max_body_bytes": 8}
        ]
    })
}

fn assert_reply(h: &FakeHost, status: u32, code: &str) {
    let s = sent(h);
    assert_eq!(s.status, status, "{}", s.body_text());
    assert_eq!(error_code(h), code);
    assert_eq!(s.header("content-type"), Some("application/json"));
    assert_eq!(s.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(h.counter(&format!("api_guard.denied.{code}")), 1);
}

#[test]
fn a_declared_length_over_max_body_bytes_is_refused_at_the_headers() {
    let mut h = FakeHost::new();
    let w = worker(hygiene_config(), &mut h);
    h.request("POST", "/small", &[("content-length", "17")]);
    let mut d = Driver::new(Rc::clone(&w));
    assert_eq!(d.on_request_headers(&mut h, false), Action::Pause);
    assert_reply(&h, 413, "payload_too_large");
    // The body that follows is never read nor forwarded.
    h.body = vec![b'x'; 17];
    assert_eq!(d.on_request_body(&mut h, 17, true), Action::Pause);
    assert_eq!(h.largest_body_read, 0);

    // Within the limit: forwarded at once (Envoy's codec enforces the declared length).
    h.request("POST", "/small", &[("content-length", "16")]);
    let mut d = Driver::new(w);
    assert_eq!(d.on_request_headers(&mut h, false), Action::Continue);
    assert!(h.sent.is_none());
}

#[test]
fn a_chunked_body_is_held_counted_without_copying_and_refused_once_past_the_limit() {
    let mut h = FakeHost::new();
    let w = worker(hygiene_config(), &mut h);
    h.request("POST", "/small", &[("transfer-encoding", "chunked")]);
    let mut d = Driver::new(Rc::clone(&w));
    assert_eq!(d.on_request_headers(&mut h, false), Action::Pause);
    h.body = vec![b'x'; 10];
    assert_eq!(d.on_request_body(&mut h, 10, false), Action::Pause);
    assert!(h.sent.is_none());
    h.body = vec![b'x'; 17];
    // Not the end of the stream yet: refused as soon as the total passes 16.
    assert_eq!(d.on_request_body(&mut h, 17, false), Action::Pause);
    assert_reply(&h, 413, "payload_too_large");
    assert_eq!(h.largest_body_read, 0, "counting needs no body bytes");
    assert_eq!(h.resumed, 0);
    assert_eq!(h.counter("api_guard.allowed"), 0);

    // Within the limit: held to the end, then released (the held body goes on unchanged).
    h.request("POST", "/small", &[("transfer-encoding", "chunked")]);
    let mut d = Driver::new(w);
    assert_eq!(d.on_request_headers(&mut h, false), Action::Pause);
    assert_eq!(d.on_request_body(&mut h, 9, false), Action::Pause);
    assert_eq!(d.on_request_body(&mut h, 16, false), Action::Pause);
    assert_eq!(d.on_request_trailers(&mut h), Action::Continue);
    assert!(h.sent.is_none());
    assert_eq!(h.counter("api_guard.allowed"), 1);
    d.on_done(&mut h);
    assert_eq!(h.logged(LogLevel::Error, ""), 0);
}

#[test]
fn a_body_over_the_limit_during_a_callout_is_refused_and_the_answer_ignored() {
    let mut h = FakeHost::new();
    let w = worker(hygiene_config(), &mut h);
    h.request("POST", "/q", &[]);
    let mut d = Driver::new(w);
    assert_eq!(d.on_request_headers(&mut h, false), Action::Pause);
    let call = h.callouts.last().unwrap().clone();
    assert_eq!(d.on_request_body(&mut h, 8, false), Action::Pause);
    assert!(h.sent.is_none());
    assert_eq!(d.on_request_body(&mut h, 9, false), Action::Pause);
    assert_reply(&h, 413, "payload_too_large");
    d.on_callout_done(&mut h, call.token, Some(&ok(200, r#"{"allowed":true}"#)));
    assert_eq!(h.resumed, 0, "a refused request is never resumed");
    assert_eq!(h.counter("api_guard.allowed"), 0);
}

#[test]
fn content_types_are_an_allow_list_for_requests_with_a_body() {
    // (request headers, end of stream at the headers, accepted: None = nothing to check)
    type Case<'a> = (&'a [(&'a str, &'a str)], bool, Option<bool>);
    let cases: [Case; 8] = [
        (&[("content-type", "application/json")], false, Some(true)),
        (
            &[("content-type", "Application/JSON; charset=utf-8")],
            false,
            Some(true),
        ),
        (&[("content-type", "text/csv")], false, Some(true)),
        (&[("content-type", "application/xml")], false, Some(false)),
        (&[("content-length", "3")], false, Some(false)),
        (&[("content-type", "json")], false, Some(false)),
        (
            &[
                ("content-type", "application/json"),
                ("content-type", "application/xml"),
            ],
            false,
            Some(false),
        ),
        // No body: nothing to check.
        (&[], true, None),
    ];
    for (headers, end_of_stream, accepted) in cases {
        let mut h = FakeHost::new();
        let w = worker(hygiene_config(), &mut h);
        h.request("POST", "/json", headers);
        let action = Driver::new(w).on_request_headers(&mut h, end_of_stream);
        match accepted {
            Some(false) => {
                assert_eq!(action, Action::Pause, "{headers:?}");
                assert_reply(&h, 415, "unsupported_media_type");
            }
            _ => {
                assert_eq!(action, Action::Continue, "{headers:?}");
                assert!(h.sent.is_none(), "{headers:?}");
            }
        }
    }
    // A GET without a body passes; one with a body of unknown length needs a type.
    let mut h = FakeHost::new();
    let w = worker(hygiene_config(), &mut h);
    h.request("GET", "/json", &[]);
    assert_eq!(
        Driver::new(Rc::clone(&w)).on_request_headers(&mut h, true),
        Action::Continue
    );
    h.request("PUT", "/json", &[("transfer-encoding", "chunked")]);
    assert_eq!(
        Driver::new(w).on_request_headers(&mut h, false),
        Action::Pause
    );
    assert_eq!(sent(&h).status, 415);
}

#[test]
fn the_backend_ceiling_counts_in_flight_until_every_kind_of_stream_end() {
    let mut h = FakeHost::new();
    let w = worker(hygiene_config(), &mut h);
    let start = |h: &mut FakeHost| {
        h.request("GET", "/slow", &[]);
        let mut d = Driver::new(Rc::clone(&w));
        let a = d.on_request_headers(h, true);
        (d, a)
    };
    let (mut first, a) = start(&mut h);
    assert_eq!(a, Action::Continue);
    let (_, a) = start(&mut h);
    assert_eq!(a, Action::Pause);
    assert_reply(&h, 503, "backend_overloaded");
    assert_eq!(sent(&h).header("retry-after"), Some("1"));
    // The upstream answered; the stream ends normally.
    first.on_response_headers(&mut h);
    first.on_done(&mut h);
    let (mut second, a) = start(&mut h);
    assert_eq!(a, Action::Continue);
    // A client reset (or upstream timeout) is a stream end without a response.
    second.on_done(&mut h);
    let (mut third, a) = start(&mut h);
    assert_eq!(a, Action::Continue);
    // A request the ceiling refused holds nothing; its end gives nothing back.
    let (mut refused, _) = start(&mut h);
    refused.on_done(&mut h);
    let (_, a) = start(&mut h);
    assert_eq!(a, Action::Pause, "still one in flight");
    third.on_done(&mut h);
    third.on_done(&mut h);
    let (_, a) = start(&mut h);
    assert_eq!(a, Action::Continue);
}

fn schema_config() -> Value {
    json!({
        "quota": {"cluster": "quota", "timeout_ms": 80},
        "webhooks": {"gh": {"scheme": "github", "secrets": [{"env": "HOOK_SECRET"}]}},
        "routes": [
            {"name": "orders", "match": {"path": "/orders"}, "max_body_bytes": 64,
             "json_schema": {"type": "object", "required": ["qty"],
                             "properties": {"qty": {"type": "integer", "minimum": 1}}}},
            {"name": "q", "match": {"path": "/q"}, "quota": true,
             "json_schema": {"required": ["qty"]}},
            {"name": "hook", "match": {"path": "/hook"}, "webhook": "gh",
             "json_schema": {"required": ["qty"]}}
        ]
    })
}

fn reply_json(h: &FakeHost) -> Value {
    serde_json::from_str(&sent(h).body_text()).unwrap()
}

#[test]
fn a_json_schema_body_is_copied_as_it_streams_and_checked_whole() {
    let mut h = FakeHost::new();
    let w = worker(schema_config(), &mut h);
    h.request("POST", "/orders", &[("transfer-encoding", "chunked")]);
    let mut d = Driver::new(Rc::clone(&w));
    assert_eq!(d.on_request_headers(&mut h, false), Action::Pause);
    h.body.extend_from_slice(b"{\"qty\":");
    assert_eq!(d.on_request_body(&mut h, 7, false), Action::Pause);
    h.body.extend_from_slice(b" 2}");
    assert_eq!(d.on_request_body(&mut h, 10, true), Action::Continue);
    assert!(h.sent.is_none());
    assert!(
        h.largest_body_read <= 65,
        "never more than the limit plus one"
    );
    assert_eq!(h.counter("api_guard.allowed"), 1);

    // Invalid: 400 naming the pointer and keyword; never resumed.
    h.request("POST", "/orders", &[("content-length", "10")]);
    let mut d = Driver::new(Rc::clone(&w));
    assert_eq!(d.on_request_headers(&mut h, false), Action::Pause);
    h.body.extend_from_slice(b"{\"qty\": 0}");
    assert_eq!(d.on_request_body(&mut h, 10, true), Action::Pause);
    assert_reply(&h, 400, "invalid_request");
    let v = reply_json(&h);
    assert_eq!(
        (v["pointer"].as_str(), v["keyword"].as_str()),
        (Some("/qty"), Some("minimum"))
    );
    assert_eq!(h.resumed, 0);
    assert_eq!(h.counter("api_guard.allowed"), 1);

    // No body: nothing to hold or check.
    h.request("POST", "/orders", &[("content-length", "0")]);
    let mut d = Driver::new(Rc::clone(&w));
    assert_eq!(d.on_request_headers(&mut h, true), Action::Continue);

    // Over the limit while streaming: 413 without copying past it.
    h.request("POST", "/orders", &[("transfer-encoding", "chunked")]);
    let mut d = Driver::new(w);
    assert_eq!(d.on_request_headers(&mut h, false), Action::Pause);
    h.body = vec![b' '; 65];
    assert_eq!(d.on_request_body(&mut h, 65, false), Action::Pause);
    assert_eq!(sent(&h).status, 413);
    assert!(h.largest_body_read <= 65);
}

#[test]
fn a_json_schema_body_that_arrived_during_a_callout_is_read_then_checked() {
    let mut h = FakeHost::new();
    let w = worker(schema_config(), &mut h);
    for (body, status) in [
        (&b"{\"qty\": 1}"[..], None),
        (&b"{\"n\": 1}"[..], Some(400)),
    ] {
        h.request("POST", "/q", &[("content-length", "10")]);
        let mut d = Driver::new(Rc::clone(&w));
        assert_eq!(d.on_request_headers(&mut h, false), Action::Pause);
        let call = h.callouts.last().unwrap().clone();
        h.body = body.to_vec();
        // Held for the callout: buffered, not read.
        assert_eq!(d.on_request_body(&mut h, body.len(), true), Action::Pause);
        assert_eq!(h.largest_body_read, 0);
        d.on_callout_done(&mut h, call.token, Some(&ok(200, r#"{"allowed":true}"#)));
        match status {
            None => {
                assert!(h.sent.is_none(), "{}", sent(&h).body_text());
                assert_eq!(h.resumed, 1);
            }
            Some(s) => {
                assert_eq!(sent(&h).status, s, "{}", sent(&h).body_text());
                assert_eq!(h.resumed, 0);
            }
        }
    }
    // A host that reports bytes it does not hand over: refused, never forwarded unchecked.
    h.request("POST", "/q", &[("content-length", "10")]);
    let mut d = Driver::new(w);
    assert_eq!(d.on_request_headers(&mut h, false), Action::Pause);
    let call = h.callouts.last().unwrap().clone();
    h.body = b"{\"qty\"".to_vec();
    assert_eq!(d.on_request_body(&mut h, 10, true), Action::Pause);
    d.on_callout_done(&mut h, call.token, Some(&ok(200, r#"{"allowed":true}"#)));
    assert_eq!(sent(&h).status, 500);
    assert_eq!(h.resumed, 0);
}

#[test]
fn a_webhook_body_is_read_once_for_the_signature_and_the_schema() {
    use hmac::{Hmac, Mac};
    let sig = |body: &[u8]| {
        let mut m = Hmac::<sha2::Sha256>::new_from_slice(GH_SECRET.as_bytes()).unwrap();
        m.update(body);
        format!("sha256={}", hex::encode(m.finalize().into_bytes()))
    };
    let mut h = FakeHost::new();
    let w = worker(schema_config(), &mut h);
    for (body, status) in [
        (&b"{\"qty\": 3}"[..], None),
        (&b"{\"n\": 3}"[..], Some(400)),
    ] {
        h.request("POST", "/hook", &[("x-hub-signature-256", &sig(body))]);
        let mut d = Driver::new(Rc::clone(&w));
        assert_eq!(d.on_request_headers(&mut h, false), Action::Pause);
        h.body.extend_from_slice(&body[..4]);
        assert_eq!(d.on_request_body(&mut h, 4, false), Action::Pause);
        h.body.extend_from_slice(&body[4..]);
        let action = d.on_request_body(&mut h, body.len(), true);
        match status {
            None => {
                assert_eq!(action, Action::Continue);
                assert!(h.sent.is_none(), "{}", sent(&h).body_text());
            }
            Some(s) => {
                assert_eq!(sent(&h).status, s);
                assert_eq!(reply_json(&h)["keyword"], "required");
            }
        }
    }
}
