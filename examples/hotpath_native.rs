//! Native cost of the request path's logic (no wasm, no host calls): one request through
//! `pipeline::on_request_headers` and `headers::response_ops`, for the `{}` config and for a
//! config doing RS256 JWT (same token each time: the cached path) + a per-client rate limit +
//! the security headers. `cargo run --release --example hotpath_native`.
//! In Envoy the same work runs in V8 (roughly 1.5-3x slower) plus the host calls; see
//! `examples/hotpath_bench.py` for the in-Envoy figures.

use api_guard::config;
use api_guard::headers;
use api_guard::pipeline::{self, Env, Exchange, Request, Verdict};
use api_guard::store::MemoryStore;
use serde_json::{json, Value};
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// Counts heap allocations: in wasm each costs tens of nanoseconds (dlmalloc in V8).
struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        System.realloc(p, l, n)
    }
}
#[global_allocator]
static GLOBAL: Counting = Counting;

const ISS: &str = "https://auth.example.com";
const AUD: &str = "https://api.example.com";

fn request_headers(token: &str) -> Vec<(String, String)> {
    [
        (":authority", "127.0.0.1:10000"),
        (":path", "/api/orders"),
        (":method", "GET"),
        (":scheme", "http"),
        ("host", "127.0.0.1:10000"),
        ("authorization", &format!("Bearer {token}")),
        ("origin", "https://app.example.com"),
        ("x-forwarded-for", "127.0.0.1"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "2f6a6c1e-4b8f-4f7e-9a51-3b2c9d0e1f2a"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn per_request(label: &str, cfg: &config::Config, headers: &[(String, String)], n: u32) {
    let store = MemoryStore::new();
    cfg.rate_limiter.prepare(&store).expect("prepare");
    api_guard::abuse::Abuse::prepare_adaptive(cfg, &store).expect("prepare adaptive");
    cfg.abuse.prepare(&store).expect("prepare key sharing");
    let upstream = vec![
        (":status".to_string(), "200".to_string()),
        ("content-length".to_string(), "3".to_string()),
        ("content-type".to_string(), "text/plain".to_string()),
        (
            "date".to_string(),
            "Sat, 22 Nov 2025 21:00:00 GMT".to_string(),
        ),
        ("server".to_string(), "envoy".to_string()),
    ];
    let mut now_ms = 1_800_000_000_000u64;
    let run = |n: u32, now_ms: &mut u64| {
        let t0 = Instant::now();
        for _ in 0..n {
            *now_ms += 1;
            let env = Env {
                now_ms: *now_ms,
                store: &store,
            };
            let req = Request {
                method: "GET",
                path: "/api/orders",
                headers,
                source_address: Some("127.0.0.1:50000"),
                route_name: None,
            };
            let mut ex = Exchange::default();
            let v = pipeline::on_request_headers(cfg, &req, &mut ex, &env);
            assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
            black_box(&v);
            let ops = headers::response_ops(cfg, &upstream, &ex.response_headers, &ex.vary);
            black_box(ops);
        }
        t0.elapsed().as_secs_f64() * 1e6 / f64::from(n)
    };
    run(n / 10, &mut now_ms);
    let a0 = ALLOCS.load(Relaxed);
    let us = run(n, &mut now_ms);
    let allocs = (ALLOCS.load(Relaxed) - a0) as f64 / f64::from(n);
    println!("{label:40} {us:8.2} µs/request {allocs:6.1} allocations/request");
}

/// A token and the JWK that verifies it: from the environment (the wasm build cannot mint),
/// else minted here.
fn token_and_jwk() -> (String, Value) {
    if let (Ok(t), Ok(j)) = (std::env::var("HOTPATH_TOKEN"), std::env::var("HOTPATH_JWK")) {
        return (t, serde_json::from_str(&j).expect("HOTPATH_JWK is a JWK"));
    }
    mint()
}

#[cfg(target_arch = "wasm32")]
fn mint() -> (String, Value) {
    panic!("set HOTPATH_TOKEN and HOTPATH_JWK (the native run prints them)")
}

#[cfg(not(target_arch = "wasm32"))]
fn mint() -> (String, Value) {
    let key = api_guard::auth::mint::SigningKey::generate("RS256", "bench").expect("key");
    let mut claims = serde_json::Map::new();
    for (k, v) in [
        ("iss", json!(ISS)),
        ("aud", json!(AUD)),
        ("sub", json!("user-1")),
        ("iat", json!(1_800_000_000u64)),
        ("exp", json!(1_800_007_200u64)),
        ("scope", json!("read:orders write:orders")),
        ("jti", json!("j1")),
    ] {
        claims.insert(k.to_string(), v);
    }
    let token = key.sign(&claims).expect("sign");
    let jwk = key.jwk();
    println!("HOTPATH_TOKEN={token} HOTPATH_JWK='{jwk}'");
    (token, jwk)
}

fn main() {
    let (token, jwk) = token_and_jwk();
    let full = json!({
        "jwt_providers": {"main": {"issuer": ISS, "audiences": [AUD], "algorithms": ["RS256"],
                                   "local_jwks": {"keys": [jwk]}}},
        "rate_limits": {"per-client": {"key": ["client"], "capacity": 1_000_000_000u64,
                                       "refill_tokens": 1_000_000_000u64, "refill_period_s": 1}},
        "default_route": {"auth": {"mode": "required", "methods": ["jwt:main"]},
                          "rate_limits": ["per-client"]},
    });
    let mut jwt_only = full.clone();
    jwt_only.as_object_mut().map(|o| o.remove("rate_limits"));
    jwt_only["default_route"]
        .as_object_mut()
        .map(|o| o.remove("rate_limits"));
    let mut rl_only = full.clone();
    rl_only.as_object_mut().map(|o| o.remove("jwt_providers"));
    rl_only["default_route"]
        .as_object_mut()
        .map(|o| o.remove("auth"));
    rl_only["rate_limits"]["per-client"]["key"] = json!(["ip"]);
    let parse = |v: &Value| {
        config::parse(v.to_string().as_bytes(), &|_| None)
            .expect("config")
            .0
    };
    let headers = request_headers(&token);
    per_request(
        "{} (path, ids, security headers)",
        &parse(&json!({})),
        &headers,
        200_000,
    );
    per_request("JWT RS256 cached", &parse(&jwt_only), &headers, 100_000);
    per_request("rate limit by IP", &parse(&rl_only), &headers, 100_000);
    // A request a millisecond: 1000/s against a learned baseline of 1000/s, never a surge;
    // the cost is the per-request count (one CAS write of the route's record).
    let mut adaptive = rl_only.clone();
    adaptive["default_route"]["adaptive"] = json!({"surge_factor": 10, "baseline_s": 60});
    per_request(
        "rate limit by IP + adaptive route",
        &parse(&adaptive),
        &headers,
        100_000,
    );
    let mut sliding = rl_only.clone();
    sliding["rate_limits"]["per-client"] = json!({"key": ["ip"], "algorithm": "sliding_window",
                                                  "limit": 1_000_000_000u64, "window_s": 60});
    per_request("sliding window by IP", &parse(&sliding), &headers, 100_000);
    // Exemptions the request does not match (the common case: every request pays the check).
    let mut exempt = rl_only.clone();
    exempt["rate_limits"]["per-client"]["exempt"] =
        json!({"cidrs": ["10.0.0.0/8", "172.16.0.0/12", "2001:db8::/32"]});
    per_request(
        "rate limit by IP + exempt CIDRs",
        &parse(&exempt),
        &headers,
        100_000,
    );
    per_request(
        "JWT RS256 cached + rate limit + headers",
        &parse(&full),
        &headers,
        100_000,
    );
    let mut ks = full.clone();
    ks["abuse"] = json!({"key_sharing": {"max_distinct_ips": 20}});
    per_request(
        "... + key sharing (abuse.key_sharing)",
        &parse(&ks),
        &headers,
        100_000,
    );
}
