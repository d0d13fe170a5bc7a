//! The rate limit service in process, with a settable clock: envoyproxy/ratelimit-format
//! configs (`tests/rls_configs`, written from the shapes of its README's examples) behave as
//! that README says, every algorithm is exact under concurrency on memory, Redis and Redis
//! Cluster, and the answers have the shape Envoy reads.

mod common;

use api_guard_quota::metrics::Metrics;
use api_guard_quota::rls::config::RlsConfig;
use api_guard_quota::rls::service::RlsService;
use api_guard_quota::store::memory::MemoryStore;
use api_guard_quota::store::redis::RedisStore;
use api_guard_quota::store::{
    ClientRecord, RlsDecision, RlsItem, Store, StoreFuture, UsageSnapshot,
};
use common::{RedisCluster, RedisServer};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{rate_limit::Unit, Code};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::UInt64Value;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// 2024-02-15T12:00:00Z
const T0: u64 = 1_707_998_400_000;

struct Harness {
    svc: RlsService,
    now: Arc<AtomicU64>,
    calls: Arc<AtomicUsize>,
}

/// Counts store calls, to show which answers never touch the store.
struct Counting {
    inner: Arc<dyn Store>,
    calls: Arc<AtomicUsize>,
}

impl Store for Counting {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn check<'a>(
        &'a self,
        args: api_guard_quota::store::CheckArgs<'a>,
    ) -> StoreFuture<'a, api_guard_quota::decision::Decision> {
        self.inner.check(args)
    }
    fn usage<'a>(
        &'a self,
        client: &'a str,
        periods: &'a api_guard_quota::periods::Periods,
        now_ms: u64,
    ) -> StoreFuture<'a, UsageSnapshot> {
        self.inner.usage(client, periods, now_ms)
    }
    fn put_client<'a>(&'a self, client: &'a str, rec: &'a ClientRecord) -> StoreFuture<'a, ()> {
        self.inner.put_client(client, rec)
    }
    fn get_client<'a>(&'a self, client: &'a str) -> StoreFuture<'a, ClientRecord> {
        self.inner.get_client(client)
    }
    fn ping(&self) -> StoreFuture<'_, ()> {
        self.inner.ping()
    }
    fn rls_check<'a>(&'a self, items: &'a [RlsItem], now_ms: u64) -> StoreFuture<'a, RlsDecision> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.rls_check(items, now_ms)
    }
    fn release<'a>(
        &'a self,
        args: api_guard_quota::store::ReleaseArgs<'a>,
    ) -> StoreFuture<'a, u64> {
        self.inner.release(args)
    }
}

fn configs() -> RlsConfig {
    RlsConfig::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/rls_configs"))
        .expect("README-shaped configs load")
}

fn harness_on(store: Arc<dyn Store>, config: RlsConfig) -> Harness {
    let now = Arc::new(AtomicU64::new(T0));
    let calls = Arc::new(AtomicUsize::new(0));
    let n = now.clone();
    let svc = RlsService::new(
        Arc::new(config),
        Arc::new(Counting {
            inner: store,
            calls: calls.clone(),
        }),
        Arc::new(Metrics::new()),
        Arc::new(move || n.load(Ordering::SeqCst)),
    );
    Harness { svc, now, calls }
}

fn harness() -> Harness {
    harness_on(Arc::new(MemoryStore::default()), configs())
}

fn desc(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect(),
        ..Default::default()
    }
}

fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.into(),
        descriptors,
        hits_addend: 0,
    }
}

impl Harness {
    async fn call(&self, domain: &str, descs: &[&[(&str, &str)]]) -> RateLimitResponse {
        self.svc
            .decide(&request(domain, descs.iter().map(|d| desc(d)).collect()))
            .await
            .expect("ShouldRateLimit")
    }

    async fn ok(&self, domain: &str, d: &[(&str, &str)]) -> bool {
        self.call(domain, &[d]).await.overall_code == Code::Ok as i32
    }

    /// How many of `n` sequential single-descriptor calls are admitted.
    async fn admitted(&self, domain: &str, d: &[(&str, &str)], n: usize) -> usize {
        let mut k = 0;
        for _ in 0..n {
            if self.ok(domain, d).await {
                k += 1;
            }
        }
        k
    }

    fn advance(&self, ms: u64) {
        self.now.fetch_add(ms, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn example_1_exact_values_and_no_limit_for_the_rest() {
    let h = harness();
    assert_eq!(
        h.admitted("mongo_cps", &[("database", "users")], 510).await,
        500
    );
    assert_eq!(
        h.admitted("mongo_cps", &[("database", "default")], 3).await,
        3
    );
    // No entry for this value: OK, and no current_limit in the status.
    let r = h.call("mongo_cps", &[&[("database", "other")]]).await;
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert!(r.statuses[0].current_limit.is_none());
    // Next second: a new window.
    h.advance(1000);
    assert!(h.ok("mongo_cps", &[("database", "users")]).await);
}

#[tokio::test]
async fn example_2_nested_descriptor_and_default_are_separate_limits() {
    let h = harness();
    let marketing: &[(&str, &str)] = &[("message_type", "marketing"), ("to_number", "2061111111")];
    let any: &[(&str, &str)] = &[("to_number", "2061111111")];
    // Envoy sends both descriptors in one call; the marketing one allows 5 a day.
    for i in 0..5 {
        let r = h.call("messaging", &[marketing, any]).await;
        assert_eq!(r.overall_code, Code::Ok as i32, "message {i}");
        assert_eq!(r.statuses[0].limit_remaining, 4 - i);
        assert_eq!(r.statuses[1].limit_remaining, 99 - i);
    }
    let r = h.call("messaging", &[marketing, any]).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(r.statuses[0].code, Code::OverLimit as i32);
    assert_eq!(r.statuses[1].code, Code::Ok as i32);
    // The denied call charged nothing to the 100/day limit (envoyproxy/ratelimit would have).
    assert_eq!(r.statuses[1].limit_remaining, 95);
    let l = r.statuses[0].current_limit.clone().unwrap();
    assert_eq!((l.requests_per_unit, l.unit), (5, Unit::Day as i32));
    // Day windows end at UTC midnight: 12 h after T0.
    assert_eq!(
        r.statuses[0].duration_until_reset.unwrap().seconds,
        12 * 3600
    );
    // Other messages to the number still pass, up to 100.
    assert_eq!(h.admitted("messaging", any, 200).await, 95);
}

#[tokio::test]
async fn example_3_per_address_and_a_blocked_address() {
    let h = harness();
    assert_eq!(
        h.admitted("edge_proxy_per_ip", &[("remote_address", "10.0.0.1")], 15)
            .await,
        10
    );
    assert_eq!(
        h.admitted("edge_proxy_per_ip", &[("remote_address", "10.0.0.2")], 15)
            .await,
        10
    );
    assert_eq!(
        h.admitted("edge_proxy_per_ip", &[("remote_address", "50.0.0.5")], 3)
            .await,
        0
    );
}

#[tokio::test]
async fn example_4_only_the_full_path_is_limited() {
    let h = harness();
    let full: &[(&str, &str)] = &[
        ("source_cluster", "proxy"),
        ("destination_cluster", "bar"),
        ("client_id", "c1"),
    ];
    assert_eq!(h.admitted("example4", full, 12).await, 10);
    // Shorter descriptors stop before the rule; another destination has no entry.
    let short: &[(&str, &str)] = &[("source_cluster", "proxy"), ("destination_cluster", "bar")];
    assert_eq!(h.admitted("example4", short, 20).await, 20);
    let other: &[(&str, &str)] = &[
        ("source_cluster", "proxy"),
        ("destination_cluster", "baz"),
        ("client_id", "c1"),
    ];
    assert_eq!(h.admitted("example4", other, 20).await, 20);
    let kv: &[(&str, &str)] = &[("key", "value"), ("subkey", "subvalue")];
    assert_eq!(h.admitted("example4", kv, 301).await, 300);
}

#[tokio::test]
async fn example_5_shadow_mode_answers_ok_and_counts() {
    let h = harness();
    assert_eq!(
        h.admitted("example5", &[("key1", "value1")], 4).await,
        4,
        "shadow mode never denies"
    );
    assert_eq!(h.admitted("example5", &[("key2", "value2")], 4).await, 1);
    let text = h.svc.metrics.render();
    assert!(
        text.contains(
            "api_guard_quota_rls_shadow_mode_total{domain=\"example5\",key=\"key1_value1\"} 3"
        ),
        "{text}"
    );
    assert!(text.contains(
        "api_guard_quota_rls_over_limit_total{domain=\"example5\",key=\"key2_value2\"} 3"
    ));
    // As envoyproxy/ratelimit counts them: shadow denials are over the limit too.
    assert!(text.contains(
        "api_guard_quota_rls_over_limit_total{domain=\"example5\",key=\"key1_value1\"} 3"
    ));
    assert!(text.contains(
        "api_guard_quota_rls_within_limit_total{domain=\"example5\",key=\"key1_value1\"} 1"
    ));
}

#[tokio::test]
async fn example_6_unlimited_never_touches_the_store() {
    let h = harness();
    for _ in 0..50 {
        let r = h.call("internal", &[&[("ldap", "x")]]).await;
        assert_eq!(r.overall_code, Code::Ok as i32);
        assert_eq!(r.statuses[0].limit_remaining, u32::MAX);
    }
    assert_eq!(h.calls.load(Ordering::SeqCst), 0);
    assert_eq!(h.admitted("internal", &[("azure", "x")], 101).await, 100);
    assert_eq!(h.calls.load(Ordering::SeqCst), 101);
}

#[tokio::test]
async fn example_7_replaces_drops_the_named_limit() {
    let h = harness();
    let user: &[(&str, &str)] = &[("key1", "value1"), ("user", "admin")];
    let admin: &[(&str, &str)] = &[("user", "admin")];
    // Alone, the default user limit applies: 10 a minute.
    assert_eq!(
        h.admitted("example7", &[("key1", "value1"), ("user", "bob")], 12)
            .await,
        10
    );
    // With the admin descriptor in the same call, its limit replaces the default one.
    let r = h.call("example7", &[user, admin]).await;
    assert!(r.statuses[0].current_limit.is_none());
    assert_eq!(
        r.statuses[1]
            .current_limit
            .clone()
            .unwrap()
            .requests_per_unit,
        100
    );
    let mut ok = 1;
    for _ in 0..120 {
        if h.call("example7", &[user, admin]).await.overall_code == Code::Ok as i32 {
            ok += 1;
        }
    }
    assert_eq!(ok, 100);
}

#[tokio::test]
async fn example_8_wildcard_prefix_and_exact_value_first() {
    let h = harness();
    assert_eq!(h.admitted("example8", &[("path", "/foo/baz")], 5).await, 2);
    assert_eq!(h.admitted("example8", &[("path", "/foo/qux")], 5).await, 2);
    assert_eq!(h.admitted("example8", &[("path", "/foo/bar")], 5).await, 4);
    assert_eq!(h.admitted("example8", &[("path", "/other")], 5).await, 5);
}

#[tokio::test]
async fn duplicate_descriptors_in_one_request_take_their_hits_together() {
    let h = harness();
    let d: &[(&str, &str)] = &[("azure", "x")];
    // Two copies per call: 2 hits a call, 50 calls fill the 100.
    let mut ok = 0;
    for _ in 0..60 {
        let r = h.call("internal", &[d, d]).await;
        assert_eq!(r.statuses[0], r.statuses[1]);
        if r.overall_code == Code::Ok as i32 {
            ok += 1;
        }
    }
    assert_eq!(ok, 50);
}

#[tokio::test]
async fn share_threshold_wildcard_values_share_one_counter() {
    let h = harness();
    assert_eq!(h.admitted("example9", &[("files", "/files/a")], 3).await, 3);
    assert_eq!(h.admitted("example9", &[("files", "/files/b")], 3).await, 2);
    // Without share_threshold, each value has its own counter.
    assert_eq!(h.admitted("example9", &[("files", "/docs/a")], 6).await, 5);
    assert_eq!(h.admitted("example9", &[("files", "/docs/b")], 6).await, 5);
}

#[tokio::test]
async fn hits_addend_request_and_descriptor_level() {
    let h = harness();
    let d = desc(&[("azure", "x")]);
    // Request level: 40 at once.
    let mut req = request("internal", vec![d.clone()]);
    req.hits_addend = 40;
    for left in [60, 20] {
        let r = h.svc.decide(&req).await.unwrap();
        assert_eq!(r.overall_code, Code::Ok as i32);
        assert_eq!(r.statuses[0].limit_remaining, left);
    }
    let r = h.svc.decide(&req).await.unwrap();
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(r.statuses[0].limit_remaining, 20, "a denial takes nothing");
    // Descriptor level wins; 0 checks without counting.
    let mut d0 = d.clone();
    d0.hits_addend = Some(UInt64Value { value: 0 });
    req.descriptors = vec![d0];
    for _ in 0..3 {
        let r = h.svc.decide(&req).await.unwrap();
        assert_eq!(r.statuses[0].limit_remaining, 20);
    }
    // A huge addend can never pass and does not overflow anything.
    let mut big = d;
    big.hits_addend = Some(UInt64Value { value: u64::MAX });
    req.descriptors = vec![big];
    assert_eq!(
        h.svc.decide(&req).await.unwrap().overall_code,
        Code::OverLimit as i32
    );
}

#[tokio::test]
async fn hostile_requests_are_refused_not_served() {
    let h = harness();
    let cases = [
        request("", vec![desc(&[("a", "b")])]),
        request("internal", vec![]),
        request("internal", (0..65).map(|_| desc(&[("a", "b")])).collect()),
        request(
            "internal",
            vec![desc(&(0..33).map(|_| ("a", "b")).collect::<Vec<_>>())],
        ),
        request("internal", vec![desc(&[("a", &"x".repeat(2000))])]),
    ];
    for c in cases {
        let e = h.svc.decide(&c).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }
    // An unknown domain has no limits (as in envoyproxy/ratelimit).
    assert!(h.ok("nope", &[("a", "b")]).await);
    // Separators and hash-tag braces in values cannot alias another descriptor's counter.
    let cfg =
        "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: day, requests_per_unit: 1}\n";
    let mut c = RlsConfig::default();
    c.add("d.yaml", cfg).unwrap();
    let h = harness_on(Arc::new(MemoryStore::default()), c);
    assert!(h.ok("d", &[("a", "x,a=y")]).await);
    assert!(h.ok("d", &[("a", "x}")]).await);
    assert!(h.ok("d", &[("a", "x")]).await);
    assert!(!h.ok("d", &[("a", "x")]).await);
}

const ALGOS: &str = r#"
domain: algos
descriptors:
  - key: fixed
    rate_limit: {unit: minute, requests_per_unit: 50}
  - key: big
    rate_limit: {unit: minute, requests_per_unit: 1000}
  - key: bucket
    rate_limit: {unit: minute, requests_per_unit: 50, algorithm: token_bucket}
  - key: sliding
    rate_limit: {unit: minute, requests_per_unit: 50, algorithm: sliding_window}
  - key: month
    rate_limit: {unit: month, requests_per_unit: 3}
"#;

fn algos() -> RlsConfig {
    let mut c = RlsConfig::default();
    c.add("algos.yaml", ALGOS).unwrap();
    c
}

/// 200 concurrent calls, each with a 50-limited descriptor and a 1000-limited one: exactly 50
/// pass, and the 1000 counter was charged exactly 50 (denied calls take nothing).
async fn exact_under_concurrency(store: Arc<dyn Store>) {
    let h = Arc::new(harness_on(store, algos()));
    for key in ["fixed", "bucket", "sliding"] {
        let client = format!("c-{key}");
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let (h, client) = (h.clone(), client.clone());
                tokio::spawn(async move {
                    h.call(
                        "algos",
                        &[&[(key, client.as_str())], &[("big", client.as_str())]],
                    )
                    .await
                    .overall_code
                        == Code::Ok as i32
                })
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            if t.await.unwrap() {
                ok += 1;
            }
        }
        assert_eq!(ok, 50, "{key}");
        let mut probe = desc(&[("big", client.as_str())]);
        probe.hits_addend = Some(UInt64Value { value: 0 });
        let r = h.svc.decide(&request("algos", vec![probe])).await.unwrap();
        assert_eq!(r.statuses[0].limit_remaining, 950, "{key}");
    }
}

async fn smooth_algorithms_and_calendar_windows(store: Arc<dyn Store>) {
    let h = harness_on(store, algos());
    // Token bucket: 50 per minute, refilled continuously; no fresh 50 at the minute edge.
    h.now.store(T0 + 59_000, Ordering::SeqCst);
    assert_eq!(h.admitted("algos", &[("bucket", "b")], 60).await, 50);
    h.advance(2_400); // past the edge: 2 tokens back (one per 1.2 s)
    assert_eq!(h.admitted("algos", &[("bucket", "b")], 10).await, 2);
    // Fixed window for comparison: the edge gives a fresh 50.
    h.now.store(T0 + 59_000, Ordering::SeqCst);
    assert_eq!(h.admitted("algos", &[("fixed", "f")], 60).await, 50);
    h.advance(2_400);
    assert_eq!(h.admitted("algos", &[("fixed", "f")], 60).await, 50);
    // Sliding window: the previous minute still weighs on this one.
    h.now.store(T0 + 60_000 * 10 + 59_000, Ordering::SeqCst);
    assert_eq!(h.admitted("algos", &[("sliding", "s")], 60).await, 50);
    h.advance(16_000); // 15 s into the next minute: 45 s of 60 overlap -> 37.5 still count
    assert_eq!(h.admitted("algos", &[("sliding", "s")], 60).await, 12);
    // Calendar month: January 31st 23:59:59.5 resets half a second later.
    h.now.store(1_706_745_599_500, Ordering::SeqCst);
    let r = h.call("algos", &[&[("month", "m")]]).await;
    let d = r.statuses[0].duration_until_reset.unwrap();
    assert_eq!((d.seconds, d.nanos), (0, 500_000_000));
    assert_eq!(h.admitted("algos", &[("month", "m")], 5).await, 2);
    h.advance(500);
    assert_eq!(h.admitted("algos", &[("month", "m")], 5).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_store_is_exact_and_windows_behave() {
    exact_under_concurrency(Arc::new(MemoryStore::default())).await;
    smooth_algorithms_and_calendar_windows(Arc::new(MemoryStore::default())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_store_is_exact_and_windows_behave() {
    let r = RedisServer::start(false);
    let s = RedisStore::connect(&r.url(), Duration::from_secs(2))
        .await
        .unwrap();
    exact_under_concurrency(Arc::new(s)).await;
    let s = RedisStore::connect(&r.url(), Duration::from_secs(2))
        .await
        .unwrap();
    smooth_algorithms_and_calendar_windows(Arc::new(s)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_cluster_store_is_exact() {
    let c = RedisCluster::start();
    let s = RedisStore::connect(&c.url(), Duration::from_secs(2))
        .await
        .unwrap();
    exact_under_concurrency(Arc::new(s)).await;
}

#[tokio::test]
async fn redis_down_is_unavailable_not_a_panic() {
    let mut r = RedisServer::start(false);
    let s = RedisStore::connect(&r.url(), Duration::from_millis(300))
        .await
        .unwrap();
    let h = harness_on(Arc::new(s), algos());
    assert!(h.ok("algos", &[("fixed", "x")]).await);
    r.kill();
    let e = h
        .svc
        .decide(&request("algos", vec![desc(&[("fixed", "x")])]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    assert!(h
        .svc
        .metrics
        .render()
        .contains("api_guard_quota_store_errors_total{op=\"rls\"} 1"));
}

/// The memory store (Rust) and the Redis store (Lua port) give the same answer, step by step,
/// over a seeded random walk of requests, hits and clock jumps on every algorithm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_redis_agree_on_a_random_walk() {
    const WALK: &str = r#"
domain: walk
descriptors:
  - key: f
    rate_limit: {unit: second, requests_per_unit: 7}
  - key: t
    rate_limit: {unit: second, requests_per_unit: 5, algorithm: token_bucket}
  - key: s
    rate_limit: {unit: second, requests_per_unit: 6, algorithm: sliding_window}
  - key: sh
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 9}
"#;
    let cfg = || {
        let mut c = RlsConfig::default();
        c.add("walk.yaml", WALK).unwrap();
        c
    };
    let r = RedisServer::start(false);
    let redis = RedisStore::connect(&r.url(), Duration::from_secs(2))
        .await
        .unwrap();
    let mem = harness_on(Arc::new(MemoryStore::default()), cfg());
    let red = harness_on(Arc::new(redis), cfg());
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = |n: u64| {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) % n
    };
    let mut now = T0;
    for step in 0..400 {
        now += next(700);
        mem.now.store(now, Ordering::SeqCst);
        red.now.store(now, Ordering::SeqCst);
        let keys = ["f", "t", "s", "sh"];
        let n = 1 + next(3) as usize;
        let descs: Vec<RateLimitDescriptor> = (0..n)
            .map(|_| {
                let k = keys[next(4) as usize];
                let mut d = desc(&[(k, ["a", "b"][next(2) as usize])]);
                if next(3) == 0 {
                    d.hits_addend = Some(UInt64Value { value: next(4) });
                }
                d
            })
            .collect();
        let req = request("walk", descs);
        let a = mem.svc.decide(&req).await.unwrap();
        let b = red.svc.decide(&req).await.unwrap();
        assert_eq!(a, b, "step {step}: {req:?}");
    }
}
