//! End to end: a real Envoy (pinned, `.tools/` or `$ENVOY_BIN`) whose only rate limiting is
//! its native `envoy.filters.http.ratelimit` filter, calling `api-guard-quota --rls-listen`
//! over gRPC, on the memory store and on a real Redis. No api-guard filter in the chain.

mod common;

use common::rls::{bootstrap, ratelimit_filter, route, Envoy, RlsProc};
use common::RedisServer;
use serde_json::{json, Value};

const CONF: &str = r#"
domain: e2e
descriptors:
  - key: generic_key
    value: five
    rate_limit: {unit: day, requests_per_unit: 5}
  - key: generic_key
    value: burst
    rate_limit: {unit: day, requests_per_unit: 20}
  - key: generic_key
    value: tight
    rate_limit: {unit: day, requests_per_unit: 2}
  - key: generic_key
    value: credits
    rate_limit: {unit: day, requests_per_unit: 10, name: credits}
  - key: generic_key
    value: shadow
    shadow_mode: true
    rate_limit: {unit: day, requests_per_unit: 2}
  - key: generic_key
    value: free_for_all
    rate_limit: {unlimited: true}
  - key: remote_address
    rate_limit: {unit: day, requests_per_unit: 4}
  - key: plan
    value: gold
    descriptors:
      - key: user
        rate_limit: {unit: day, requests_per_unit: 3}
  - key: plan
    value: free
    descriptors:
      - key: user
        rate_limit: {unit: day, requests_per_unit: 1}
"#;

fn generic(value: &str) -> Value {
    json!([{"actions": [{"generic_key": {"descriptor_value": value}}]}])
}

/// A route whose descriptors come from the rate limit filter's per-route config, with a
/// static `hits_addend`.
fn per_filter_route(prefix: &str, value: &str, hits: u64) -> Value {
    json!({
        "match": {"prefix": prefix},
        "route": {"cluster": "upstream", "prefix_rewrite": "/healthz", "timeout": "5s"},
        "typed_per_filter_config": {"envoy.filters.http.ratelimit": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimitPerRoute",
            "rate_limits": [{"actions": [{"generic_key": {"descriptor_value": value}}],
                             "hits_addend": {"number": hits}}]
        }}
    })
}

fn routes() -> Vec<Value> {
    vec![
        route("/five", generic("five")),
        route("/burst", generic("burst")),
        route("/shadow", generic("shadow")),
        route("/unlimited", generic("free_for_all")),
        // hits_addend is read from the filter's per-route `rate_limits` (Envoy ignores it in
        // the route's own `rate_limits`).
        per_filter_route("/cost3", "credits", 3),
        per_filter_route("/peek", "credits", 0),
        route(
            "/nested",
            json!([{"actions": [
                {"request_headers": {"header_name": "x-plan", "descriptor_key": "plan"}},
                {"request_headers": {"header_name": "x-user", "descriptor_key": "user"}}
            ]}]),
        ),
        // Two descriptors in one call: the client's address (4/day) and "tight" (2/day).
        route(
            "/both",
            json!([{"actions": [{"remote_address": {}}]},
                   {"actions": [{"generic_key": {"descriptor_value": "tight"}}]}]),
        ),
        route("/ip", json!([{"actions": [{"remote_address": {}}]}])),
    ]
}

struct Stack {
    // Field order = drop order: Envoy first, then the service, then Redis.
    envoy: Envoy,
    svc: RlsProc,
    _redis: Option<RedisServer>,
}

fn stack(redis: bool, failure_mode_deny: bool) -> Stack {
    let redis = redis.then(|| RedisServer::start(false));
    let svc = RlsProc::start(
        &[("e2e.yaml", CONF)],
        redis.as_ref().map(|r| r.url()).as_deref(),
    );
    let envoy = Envoy::start(&bootstrap(
        ratelimit_filter("e2e", failure_mode_deny),
        routes(),
        &[svc.rls_port()],
        svc.http_port(),
    ));
    Stack {
        envoy,
        svc,
        _redis: redis,
    }
}

async fn get(c: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut r = c.get(url);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.expect("request through Envoy")
}

fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

async fn statuses(c: &reqwest::Client, url: &str, n: usize, hdrs: &[(&str, &str)]) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(get(c, url, hdrs).await.status().as_u16());
    }
    out
}

/// `n` requests at once; how many got each status.
async fn concurrent(url: &str, n: usize) -> (usize, usize) {
    let c = reqwest::Client::new();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (c, url) = (c.clone(), url.to_string());
            tokio::spawn(async move { c.get(url).send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    let (mut ok, mut limited) = (0, 0);
    for t in tasks {
        match t.await.expect("task").expect("request") {
            200 => ok += 1,
            429 => limited += 1,
            s => panic!("unexpected status {s}"),
        }
    }
    (ok, limited)
}

async fn exactly_n_then_429_with_headers(redis: bool) {
    let s = stack(redis, false);
    let c = reqwest::Client::new();
    for i in 0..5u64 {
        let r = get(&c, &s.envoy.url("/five"), &[]).await;
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(
            header(&r, "x-ratelimit-remaining").as_deref(),
            Some((4 - i).to_string().as_str())
        );
        let limit = header(&r, "x-ratelimit-limit").unwrap_or_default();
        assert!(limit.starts_with("5, 5;w=86400"), "{limit}");
        let reset: u64 = header(&r, "x-ratelimit-reset")
            .and_then(|v| v.parse().ok())
            .expect("x-ratelimit-reset");
        assert!(reset > 0 && reset <= 86_400, "{reset}");
    }
    for _ in 0..3 {
        let r = get(&c, &s.envoy.url("/five"), &[]).await;
        assert_eq!(r.status(), 429);
        assert_eq!(header(&r, "x-envoy-ratelimited").as_deref(), Some("true"));
        assert_eq!(header(&r, "x-ratelimit-remaining").as_deref(), Some("0"));
    }
    // Exact under concurrency: 60 at once against 20.
    assert_eq!(concurrent(&s.envoy.url("/burst"), 60).await, (20, 40));
    // Unlimited answers OK forever, without touching the store.
    assert!(statuses(&c, &s.envoy.url("/unlimited"), 30, &[])
        .await
        .iter()
        .all(|&st| st == 200));
    let m = |name: &str, key: &str| {
        s.svc.metric(&format!(
            "api_guard_quota_rls_{name}_total{{domain=\"e2e\",key=\"{key}\"}}"
        ))
    };
    assert_eq!(m("total_hits", "generic_key_five"), 8);
    assert_eq!(m("over_limit", "generic_key_five"), 3);
    assert_eq!(m("within_limit", "generic_key_five"), 5);
    // 4 of 5 used is the 80 % mark: the 4th and 5th are near the limit.
    assert_eq!(m("near_limit", "generic_key_five"), 2);
    assert_eq!(m("within_limit", "generic_key_free_for_all"), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_exactly_n_then_429_with_headers() {
    exactly_n_then_429_with_headers(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_exactly_n_then_429_with_headers() {
    exactly_n_then_429_with_headers(true).await;
}

async fn descriptors_hits_and_shadow(redis: bool) {
    let s = stack(redis, false);
    let c = reqwest::Client::new();
    let url = |p: &str| s.envoy.url(p);

    // Nested descriptors, exact value matches: a counter per (plan, user).
    let gold = [("x-plan", "gold"), ("x-user", "alice")];
    assert_eq!(
        statuses(&c, &url("/nested"), 5, &gold).await,
        [200, 200, 200, 429, 429]
    );
    let free = [("x-plan", "free"), ("x-user", "alice")];
    assert_eq!(
        statuses(&c, &url("/nested"), 3, &free).await,
        [200, 429, 429]
    );
    let bob = [("x-plan", "free"), ("x-user", "bob")];
    assert_eq!(statuses(&c, &url("/nested"), 2, &bob).await, [200, 429]);
    // A value with no entry in the config has no limit.
    let silver = [("x-plan", "silver"), ("x-user", "alice")];
    assert!(statuses(&c, &url("/nested"), 6, &silver)
        .await
        .iter()
        .all(|&st| st == 200));

    // hits_addend: 0 checks without counting; 3 takes three.
    let r = get(&c, &url("/peek"), &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-remaining").as_deref(), Some("10"));
    for left in ["7", "4", "1"] {
        let r = get(&c, &url("/cost3"), &[]).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-ratelimit-remaining").as_deref(), Some(left));
    }
    assert_eq!(get(&c, &url("/cost3"), &[]).await.status(), 429);
    let r = get(&c, &url("/peek"), &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-remaining").as_deref(), Some("1"));

    // Shadow mode: never denies, counts what it would have denied.
    assert!(statuses(&c, &url("/shadow"), 5, &[])
        .await
        .iter()
        .all(|&st| st == 200));
    assert_eq!(
        s.svc.metric(
            "api_guard_quota_rls_shadow_mode_total{domain=\"e2e\",key=\"generic_key_shadow\"}"
        ),
        3
    );

    // Two descriptors in one call: "tight" (2) denies the third; the denied request takes
    // nothing from the address's 4, so exactly 2 more pass on /ip.
    assert_eq!(statuses(&c, &url("/both"), 3, &[]).await, [200, 200, 429]);
    assert_eq!(statuses(&c, &url("/ip"), 3, &[]).await, [200, 200, 429]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_descriptors_hits_addend_and_shadow_mode() {
    descriptors_hits_and_shadow(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_descriptors_hits_addend_and_shadow_mode() {
    descriptors_hits_and_shadow(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_mode_with_the_service_down() {
    let c = reqwest::Client::new();
    // The upstream is a live service; the rate limit cluster points at a closed port.
    let up = RlsProc::start(&[("e2e.yaml", CONF)], None);
    let dead = common::free_port();
    for (deny, want) in [(false, 200), (true, 500)] {
        let envoy = Envoy::start(&bootstrap(
            ratelimit_filter("e2e", deny),
            routes(),
            &[dead],
            up.http_port(),
        ));
        for _ in 0..3 {
            let r = get(&c, &envoy.url("/five"), &[]).await;
            assert_eq!(r.status(), want, "failure_mode_deny: {deny}");
        }
    }
    // Nothing reached the service's counters.
    assert_eq!(
        up.metric("api_guard_quota_rls_total_hits_total{domain=\"e2e\",key=\"generic_key_five\"}"),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_on_one_redis_stay_exact() {
    let redis = RedisServer::start(false);
    let a = RlsProc::start(&[("e2e.yaml", CONF)], Some(&redis.url()));
    let b = RlsProc::start(&[("e2e.yaml", CONF)], Some(&redis.url()));
    let envoy = Envoy::start(&bootstrap(
        ratelimit_filter("e2e", false),
        routes(),
        &[a.rls_port(), b.rls_port()],
        a.http_port(),
    ));
    assert_eq!(concurrent(&envoy.url("/burst"), 80).await, (20, 60));
    let calls = |s: &RlsProc| {
        s.metric("api_guard_quota_rls_requests_total{code=\"ok\"}")
            + s.metric("api_guard_quota_rls_requests_total{code=\"over_limit\"}")
    };
    let (ca, cb) = (calls(&a), calls(&b));
    assert_eq!(ca + cb, 80);
    assert!(ca > 0 && cb > 0, "both replicas answered: {ca} / {cb}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_between_envoy_and_the_service() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = common::rls::self_signed_cert(dir.path());
    let (cert_s, key_s) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let svc = RlsProc::start_with(
        &[("e2e.yaml", CONF)],
        None,
        &["--rls-tls-cert", cert_s, "--rls-tls-key", key_s],
    );
    let c = reqwest::Client::new();
    // failure_mode_deny: a failed TLS handshake would answer 500, not 200 or 429.
    let mut b = bootstrap(
        ratelimit_filter("e2e", true),
        routes(),
        &[svc.rls_port()],
        svc.http_port(),
    );
    assert_eq!(b["static_resources"]["clusters"][0]["name"], "rls");
    b["static_resources"]["clusters"][0]["transport_socket"] = json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": "localhost",
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "validation_context": {
                    "trusted_ca": {"filename": cert_s},
                    "match_typed_subject_alt_names": [
                        {"san_type": "DNS", "matcher": {"exact": "localhost"}}
                    ]
                }
            }
        }
    });
    let envoy = Envoy::start(&b);
    assert_eq!(
        statuses(&c, &envoy.url("/five"), 7, &[]).await,
        [200, 200, 200, 200, 200, 429, 429]
    );
    drop(envoy);
    // The same service refuses plaintext: Envoy without TLS gets no answer (500 here).
    let plain = Envoy::start(&bootstrap(
        ratelimit_filter("e2e", true),
        routes(),
        &[svc.rls_port()],
        svc.http_port(),
    ));
    assert_eq!(get(&c, &plain.url("/five"), &[]).await.status(), 500);
}

#[test]
fn example_envoy_config_validates_and_its_rls_config_loads() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    common::rls::envoy_validate(&root.join("envoy/ratelimit-native.yaml"))
        .unwrap_or_else(|e| panic!("envoy --mode validate: {e}"));
    let c = api_guard_quota::rls::config::RlsConfig::load(&root.join("envoy/ratelimit"))
        .expect("example rls config");
    assert!(c.domains.contains_key("api"));
}

#[test]
fn a_bad_rls_config_refuses_to_start_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: minute, requests_per_units: 5}\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_api-guard-quota"))
        .arg("--rls-config")
        .arg(&bad)
        .args(["--rls-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "error")
        .output()
        .expect("run api-guard-quota");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("descriptors[0].rate_limit") && err.contains("requests_per_units"),
        "{err}"
    );
}
