//! Quota end to end: real Envoy processes with the real `.wasm`, the real `api-guard-quota`
//! binary, a real `redis-server`. Requests without credentials are keyed by client IP
//! (127.0.0.1) with tier `anonymous`, so the service configs below limit that tier.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, Once};
use std::time::{Duration, Instant};

// ------------------------------------------------------------------ helpers

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

static BUILD_QUOTA: Once = Once::new();

/// The `api-guard-quota` binary, built once per test run (debug profile, like the tests).
fn quota_bin() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let bin = target.join("debug/api-guard-quota");
    BUILD_QUOTA.call_once(|| {
        // `make test` runs `cargo test --workspace --all-targets`, which builds this binary
        // before any test runs; building it again with `-p` resolves features differently
        // and recompiles the service's dependencies (minutes) in the middle of the run.
        if std::env::var_os("API_GUARD_SKIP_WASM_BUILD").is_some() && bin.exists() {
            return;
        }
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "-p",
                "api-guard-quota",
                "--bin",
                "api-guard-quota",
                "--quiet",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo to build api-guard-quota");
        assert!(status.success(), "building api-guard-quota failed");
    });
    bin
}

fn redis_server_bin() -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("redis-server"))
                .find(|f| f.is_file())
        })
        .unwrap_or_else(|| {
            panic!("redis-server not found on PATH: `make test` installs it (apt-get install -y redis-server)")
        })
}

struct Redis {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Redis {
    /// With AOF persistence, fsync on every write.
    fn start() -> Self {
        let mut r = Redis {
            port: free_port(),
            dir: temp_dir("redis"),
            child: None,
        };
        r.spawn();
        r
    }
    fn spawn(&mut self) {
        let child = Command::new(redis_server_bin())
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--protected-mode",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        wait_port(self.port, "redis-server");
    }
    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
    fn crash_and_restart(&mut self) {
        self.kill();
        self.spawn();
    }
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {port} within 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

const ADMIN: &str = "e2e-admin-token-0123456789";

/// An `api-guard-quota` process on a fixed port (so Envoy's cluster finds it after restarts).
struct Quota {
    port: u16,
    config: PathBuf,
    redis: Option<String>,
    child: Option<Child>,
}

impl Quota {
    fn start(tier_toml: &str, redis: Option<&str>) -> Self {
        Self::start_on(free_port(), tier_toml, redis)
    }
    fn start_on(port: u16, tier_toml: &str, redis: Option<&str>) -> Self {
        let dir = temp_dir("quota");
        let config = dir.join("quota.toml");
        std::fs::write(
            &config,
            format!(
                "admin_token = \"{ADMIN}\"\n[alerts]\ninitial_backoff_ms = 100\n[tiers.anonymous]\n{tier_toml}\n"
            ),
        )
        .unwrap();
        let mut q = Quota {
            port,
            config,
            redis: redis.map(str::to_string),
            child: None,
        };
        q.spawn();
        q
    }
    fn spawn(&mut self) {
        let mut cmd = Command::new(quota_bin());
        cmd.arg("--config")
            .arg(&self.config)
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .env("RUST_LOG", "warn");
        if let Some(r) = &self.redis {
            cmd.args(["--redis", r]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start api-guard-quota");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line.starts_with("api-guard-quota ready") {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(20)).is_err() {
            let _ = child.kill();
            panic!("api-guard-quota not ready within 20 s");
        }
        self.child = Some(child);
    }
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
    fn admin(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        let mut r =
            http(self.port, method, path).header("authorization", &format!("Bearer {ADMIN}"));
        if let Some(b) = body {
            r = r
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        r.send()
    }
    fn used_today(&self, client: &str) -> u64 {
        let r = self.admin("GET", &format!("/v1/clients/{client}/usage"), None);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["quotas"]["daily"]["used"].as_u64().unwrap()
    }
}

impl Drop for Quota {
    fn drop(&mut self) {
        self.kill();
    }
}

fn filter_config(failure_mode: &str, timeout_ms: u64, breaker: Value) -> String {
    json!({
        "quota": {"cluster": "quota", "timeout_ms": timeout_ms, "failure_mode": failure_mode,
                  "mode": "check", "breaker": breaker},
        "routes": [
            {"name": "orders", "match": {"prefix": "/api/orders"}, "quota": true},
            {"name": "public", "match": {"prefix": "/public"}}
        ]
    })
    .to_string()
}

fn envoy_for(quota_port: u16, cfg: &str) -> Envoy {
    Envoy::builder(cfg).cluster("quota", quota_port).start()
}

fn lease_config(failure_mode: &str) -> String {
    json!({
        "quota": {"cluster": "quota", "timeout_ms": 1000, "failure_mode": failure_mode,
                  "breaker": {"failures": 1000}},
        "routes": [{"name": "orders", "match": {"prefix": "/api/orders"}, "quota": true}]
    })
    .to_string()
}

/// Sends `per_thread` requests from each of `threads` threads, alternating between `ports`;
/// returns the statuses.
fn burst(ports: &[u16], threads: usize, per_thread: usize) -> Vec<u16> {
    let ports = ports.to_vec();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let ports = ports.clone();
            std::thread::spawn(move || {
                (0..per_thread)
                    .map(|i| {
                        http(ports[(t + i) % ports.len()], "GET", "/api/orders/1")
                            .send()
                            .status
                    })
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}

// ------------------------------------------------------------------ tests

/// Lease mode (the default): two Envoys with two workers each, many concurrent requests. A
/// global bucket and a hard-stop daily quota each admit exactly N, never N+1: a request is
/// admitted only with a granted unit. Units held in one Envoy's lease are spent by its next
/// requests, so with load continuing on both, all N are admitted.
#[test]
fn leases_admit_exactly_n_across_two_envoys() {
    for (tier, n, denial) in [
        (
            "limit = { capacity = 40, refill_tokens = 1, refill_period_s = 3600 }",
            40,
            429,
        ),
        (
            "limit = { capacity = 1000, refill_tokens = 1000, refill_period_s = 1 }\n\
             daily = { limit = 30, policy = \"hard_stop\" }",
            30,
            402,
        ),
    ] {
        // A Redis each: usage is counted even without a quota configured.
        let redis = Redis::start();
        let quota = Quota::start(tier, Some(&redis.url()));
        let cfg = lease_config("deny");
        let a = envoy_for(quota.port, &cfg);
        let b = Envoy::builder(&cfg)
            .cluster("quota", quota.port)
            .upstream(a.upstream.clone())
            .start();
        let mut ok = 0;
        let mut denied = 0;
        let deadline = Instant::now() + Duration::from_secs(12);
        while ok < n && Instant::now() < deadline {
            for s in burst(&[a.port, b.port], 8, 6) {
                match s {
                    200 => ok += 1,
                    s => {
                        assert_eq!(s, denial);
                        denied += 1;
                    }
                }
            }
            assert!(ok <= n, "{ok} admitted, over the global {n}");
            // Background refreshes land, expired leases come back.
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(ok, n, "exactly N admitted ({denied} denied)");
        assert!(denied > 0);
        assert_eq!(a.received().len(), n, "the upstream saw exactly N");
        // A hard stop can never count more than its limit: all N spent, none held.
        if denial == 402 {
            assert_eq!(quota.used_today("127.0.0.1"), n as u64);
        }
    }
}

/// A steady client: in lease mode at most 10 % as many callouts (Envoy's own count of
/// requests to the quota cluster) as requests; in check mode one per request.
#[test]
fn a_steady_client_makes_few_callouts_in_lease_mode_and_one_per_request_in_check_mode() {
    let quota = Quota::start(
        "limit = { capacity = 100000, refill_tokens = 100000, refill_period_s = 1 }\n\
         daily = { limit = 1000000, policy = \"hard_stop\" }",
        None,
    );
    let envoy = envoy_for(quota.port, &lease_config("deny"));
    let n = 400;
    let mut last = None;
    for _ in 0..n {
        let r = envoy.get("/api/orders");
        assert_eq!(r.status, 200, "{}", r.text());
        last = Some(r);
    }
    let callouts = envoy.stat("cluster.quota.upstream_rq_total");
    eprintln!("lease mode: {callouts} quota callouts for {n} requests");
    assert!(callouts >= 1);
    assert!(
        callouts * 10 <= n,
        "{callouts} callouts for {n} requests in lease mode"
    );
    // Headers come from the lease state: the quota counts the units this Envoy holds as
    // the client's, so the remaining never drops below what was really spent.
    let last = last.unwrap();
    let remaining: u64 = last.header("x-quota-remaining").unwrap().parse().unwrap();
    assert!(remaining <= 1_000_000 - n, "{remaining}");
    assert!(remaining >= 1_000_000 - n - 1_000, "{remaining}");
    assert_eq!(last.header("x-quota-limit"), Some("1000000"));
    // The units still held come back when the lease expires (released by the timer): the
    // service then counts exactly what was spent.
    let held = quota.used_today("127.0.0.1");
    assert!(held >= n, "{held} < {n}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while quota.used_today("127.0.0.1") != n {
        assert!(
            Instant::now() < deadline,
            "used {} for {n} admitted (held {held})",
            quota.used_today("127.0.0.1")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "lease mode: {} units held after the load, given back",
        held - n
    );
    drop(envoy);

    let cfg = filter_config("deny", 1000, json!({}));
    let envoy = envoy_for(quota.port, &cfg);
    for _ in 0..50 {
        assert_eq!(envoy.get("/api/orders").status, 200);
    }
    assert_eq!(envoy.stat("cluster.quota.upstream_rq_total"), 50);
}

/// The service killed mid-load: held leases are spent, then `failure_mode` (deny) applies;
/// admitted requests never exceed the limit. After a restart on Redis nothing granted is
/// counted twice, and unused units come back once the leases expire.
#[test]
fn the_quota_service_killed_mid_load_never_over_admits() {
    let redis = Redis::start();
    let n = 60;
    let mut quota = Quota::start(
        "limit = { capacity = 1000, refill_tokens = 1000, refill_period_s = 1 }\n\
         daily = { limit = 60, policy = \"hard_stop\" }",
        Some(&redis.url()),
    );
    let envoy = envoy_for(quota.port, &lease_config("deny"));
    let first = burst(&[envoy.port], 4, 5);
    let ok1 = first.iter().filter(|&&s| s == 200).count();
    assert!(ok1 > 0);
    // Let background refreshes in flight finish: a kill while the service is answering one
    // loses that lease's units (documented), which would make the final count inexact.
    std::thread::sleep(Duration::from_millis(200));
    quota.kill();
    let during = burst(&[envoy.port], 8, 10);
    let ok2 = during.iter().filter(|&&s| s == 200).count();
    assert!(during.iter().all(|&s| s == 200 || s == 503), "{during:?}");
    eprintln!(
        "service killed: {ok1} admitted before, {ok2} of {} during",
        during.len()
    );
    assert!(
        during.contains(&503),
        "once the leases are spent: failure_mode deny"
    );
    assert!(ok1 + ok2 <= n);
    quota.restart();
    let mut ok = ok1 + ok2;
    let deadline = Instant::now() + Duration::from_secs(12);
    while ok < n && Instant::now() < deadline {
        ok += burst(&[envoy.port], 8, 5)
            .iter()
            .filter(|&&s| s == 200)
            .count();
        assert!(ok <= n, "{ok} over the quota of {n}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        envoy.received().len(),
        ok,
        "the upstream saw exactly the admitted"
    );
    // Units granted before the kill and never spent come back when their lease expires.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let used = quota.used_today("127.0.0.1");
        assert!(
            used >= ok as u64,
            "spent units are never given back: {used} < {ok}"
        );
        if used == ok as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "used {used}, admitted {ok}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_global_limit_admits_exactly_n_across_two_envoys() {
    let redis = Redis::start();
    let quota = Quota::start(
        "limit = { capacity = 15, refill_tokens = 1, refill_period_s = 3600 }",
        Some(&redis.url()),
    );
    let cfg = filter_config("deny", 1000, json!({}));
    let a = envoy_for(quota.port, &cfg);
    let b = Envoy::builder(&cfg)
        .cluster("quota", quota.port)
        .upstream(a.upstream.clone())
        .start();
    let ports = [a.port, b.port];
    // 40 requests from 8 threads, alternating between the two Envoy processes.
    let results = Arc::new(Mutex::new(Vec::new()));
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let results = results.clone();
            std::thread::spawn(move || {
                for i in 0..5 {
                    let port = ports[(t + i) % 2];
                    let r = http(port, "GET", "/api/orders/1").send();
                    results.lock().unwrap().push(r);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let results = results.lock().unwrap();
    let ok = results.iter().filter(|r| r.status == 200).count();
    assert_eq!(
        ok, 15,
        "exactly the global capacity passes across both Envoys"
    );
    for r in results.iter().filter(|r| r.status != 200) {
        let body = r.assert_error(429, "rate_limit_exceeded");
        assert!(body["retry_after"].as_u64().unwrap() >= 1);
        assert!(r.header("retry-after").is_some());
    }
    // Routes without `quota` never call the service.
    assert_eq!(http(a.port, "GET", "/public/x").send().status, 200);
}

#[test]
fn hard_stop_quota_answers_402_with_reset_at() {
    let quota = Quota::start("daily = { limit = 3, policy = \"hard_stop\" }", None);
    let envoy = envoy_for(quota.port, &filter_config("deny", 1000, json!({})));
    for i in 0..3 {
        let r = envoy.get("/api/orders");
        assert_eq!(r.status, 200, "request {i}");
        assert_eq!(r.header("x-quota-limit"), Some("3"));
        assert_eq!(
            r.header("x-quota-remaining"),
            Some((2 - i).to_string().as_str())
        );
    }
    let r = envoy.get("/api/orders");
    let body = r.assert_error(402, "quota_exceeded");
    let reset_at = body["reset_at"].as_str().unwrap();
    assert!(
        reset_at.ends_with("T00:00:00Z"),
        "reset at the next UTC midnight: {reset_at}"
    );
    assert!(body["message"].as_str().unwrap().contains("daily quota"));
    assert_eq!(r.header("x-quota-remaining"), Some("0"));
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    // Denied requests consumed nothing.
    assert_eq!(quota.used_today("127.0.0.1"), 3);
    assert_eq!(
        envoy.received().len(),
        3,
        "the upstream saw only the admitted requests"
    );
}

#[test]
fn throttle_and_overage_behave_as_documented() {
    // throttle: after 3 units a day, a bucket of 2 (refilled 1 per hour) replaces the tier's.
    let quota = Quota::start(
        "limit = { capacity = 100, refill_tokens = 100, refill_period_s = 1 }\n\
         daily = { limit = 3, policy = \"throttle\", throttle = { capacity = 2, refill_tokens = 1, refill_period_s = 3600 } }",
        None,
    );
    let envoy = envoy_for(quota.port, &filter_config("deny", 1000, json!({})));
    let statuses: Vec<u16> = (0..7).map(|_| envoy.get("/api/orders").status).collect();
    assert_eq!(statuses, vec![200, 200, 200, 200, 200, 429, 429]);
    let r = envoy.get("/api/orders");
    let body = r.assert_error(429, "rate_limit_exceeded");
    assert!(body["message"].as_str().unwrap().contains("throttled"));
    assert!(r
        .header("ratelimit-policy")
        .unwrap()
        .contains("quota-throttle"));
    drop(envoy);

    // overage: never denied, the overage is reported.
    let quota = Quota::start("daily = { limit = 2, policy = \"overage\" }", None);
    let envoy = envoy_for(quota.port, &filter_config("deny", 1000, json!({})));
    for i in 1..=5u64 {
        let r = envoy.get("/api/orders");
        assert_eq!(r.status, 200);
        let over = r
            .header("x-quota-overage")
            .map(|v| v.parse::<u64>().unwrap());
        assert_eq!(over, i.checked_sub(2).filter(|&o| o > 0), "request {i}");
    }
    let u = quota
        .admin("GET", "/v1/clients/127.0.0.1/usage", None)
        .json();
    assert_eq!(u["quotas"]["daily"]["overage"], 3);
}

/// Accepts connections and never answers: a hung quota service.
fn black_hole(port: u16) -> Arc<AtomicBool> {
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind black hole");
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while !s.load(Ordering::SeqCst) {
            if let Ok((c, _)) = listener.accept() {
                held.push(c);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for mut c in held {
            let mut buf = [0u8; 1];
            let _ = c.set_nonblocking(true);
            let _ = c.read(&mut buf);
        }
    });
    stop
}

fn timed(envoy: &Envoy, path: &str) -> (Resp, Duration) {
    let t = Instant::now();
    let r = envoy.get(path);
    (r, t.elapsed())
}

#[test]
fn a_hung_service_costs_timeout_ms_until_the_breaker_opens_then_recovers() {
    let port = free_port();
    let hole = black_hole(port);
    let cfg = filter_config("deny", 300, json!({"failures": 2, "open_ms": 1500}));
    // One worker, so one breaker sees every request.
    let envoy = Envoy::builder(&cfg)
        .cluster("quota", port)
        .concurrency(1)
        .start();
    for _ in 0..2 {
        let (r, took) = timed(&envoy, "/api/orders");
        r.assert_error(503, "quota_unavailable");
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_millis(2000),
            "a hung service costs about timeout_ms: {took:?}"
        );
    }
    // Breaker open: no more waiting.
    for _ in 0..5 {
        let (r, took) = timed(&envoy, "/api/orders");
        r.assert_error(503, "quota_unavailable");
        assert!(
            took < Duration::from_millis(150),
            "breaker open, yet {took:?}"
        );
    }
    assert!(envoy.stat("wasmcustom.api_guard.quota.unavailable") >= 7);
    // The service comes back on the same port; after open_ms the probe succeeds.
    hole.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(100));
    let _quota = Quota::start_on(
        port,
        "daily = { limit = 100, policy = \"hard_stop\" }",
        None,
    );
    std::thread::sleep(Duration::from_millis(1600));
    let r = envoy.get("/api/orders");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-quota-limit"), Some("100"));
    let r = envoy.get("/api/orders");
    assert_eq!(r.header("x-quota-remaining"), Some("98"));
}

#[test]
fn a_dead_service_fails_fast_and_failure_mode_allow_lets_requests_through() {
    let port = free_port(); // nothing listens: connection refused
    let cfg = filter_config("allow", 300, json!({"failures": 3, "open_ms": 60000}));
    let envoy = Envoy::builder(&cfg).cluster("quota", port).start();
    let t = Instant::now();
    for _ in 0..10 {
        let r = envoy.get("/api/orders");
        assert_eq!(r.status, 200, "failure_mode allow: {}", r.text());
        assert!(r.header("x-quota-limit").is_none());
    }
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t.elapsed()
    );
    // An unknown cluster (dispatch fails at once) behaves the same.
    let cfg =
        json!({"quota": {"cluster": "no-such-cluster", "failure_mode": "deny", "mode": "check"},
                     "routes": [{"name": "o", "match": {"prefix": "/"}, "quota": true}]})
        .to_string();
    let envoy = Envoy::start(&cfg);
    envoy.get("/x").assert_error(503, "quota_unavailable");
}

#[test]
fn no_counts_are_lost_when_redis_or_the_service_restart() {
    let mut redis = Redis::start();
    let mut quota = Quota::start(
        "daily = { limit = 8, policy = \"hard_stop\" }",
        Some(&redis.url()),
    );
    let envoy = envoy_for(
        quota.port,
        &filter_config("deny", 1000, json!({"failures": 100})),
    );
    for _ in 0..5 {
        assert_eq!(envoy.get("/api/orders").status, 200);
    }
    redis.crash_and_restart();
    quota.restart();
    assert_eq!(quota.used_today("127.0.0.1"), 5);
    let statuses: Vec<u16> = (0..4).map(|_| envoy.get("/api/orders").status).collect();
    assert_eq!(statuses, vec![200, 200, 200, 402]);
}

#[test]
fn an_alert_is_received_once_per_threshold_with_a_valid_signature() {
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let receiver = api_guard::echo::EchoServer::start("127.0.0.1:0").expect("receiver");
    let quota = Quota::start("daily = { limit = 10, policy = \"overage\" }", None);
    let r = quota.admin(
        "PUT",
        "/v1/clients/127.0.0.1",
        Some(json!({"alert_webhook": {"url": format!("http://127.0.0.1:{}/alerts", receiver.port), "secret": secret}})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let envoy = envoy_for(quota.port, &filter_config("deny", 1000, json!({})));
    for _ in 0..14 {
        assert_eq!(envoy.get("/api/orders").status, 200);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let alerts = loop {
        let got: Vec<_> = receiver
            .received()
            .into_iter()
            .filter(|r| r.path == "/alerts")
            .collect();
        if got.len() >= 3 || Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        receiver
            .received()
            .iter()
            .filter(|r| r.path == "/alerts")
            .count(),
        3
    );
    let key = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(secret.trim_start_matches("whsec_"))
            .unwrap()
    };
    let mut thresholds = Vec::new();
    for a in &alerts {
        let h = |n: &str| {
            a.header(n)
                .unwrap_or_else(|| panic!("alert without {n}"))
                .to_string()
        };
        let (id, ts, sig) = (
            h("webhook-id"),
            h("webhook-timestamp"),
            h("webhook-signature"),
        );
        use hmac::{Hmac, Mac};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
        mac.update(format!("{id}.{ts}.").as_bytes());
        mac.update(&a.body);
        use base64::Engine;
        let want = format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        );
        assert!(
            sig.split(' ').any(|s| s == want),
            "signature {sig} != {want}"
        );
        let v: Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(v["data"]["client"], "127.0.0.1");
        thresholds.push(v["data"]["threshold_percent"].as_u64().unwrap());
    }
    thresholds.sort_unstable();
    assert_eq!(thresholds, vec![80, 90, 100]);
}

#[test]
fn rate_limit_headers_describe_the_limit_with_the_least_remaining() {
    let quota = Quota::start(
        "limit = { capacity = 3, refill_tokens = 1, refill_period_s = 3600 }",
        None,
    );
    let cfg = |local_capacity: u64| {
        json!({
            "quota": {"cluster": "quota", "timeout_ms": 1000, "failure_mode": "deny",
                      "mode": "check"},
            "rate_limits": {"local": {"key": ["ip"], "capacity": local_capacity,
                                      "refill_tokens": 1, "refill_period_s": 3600}},
            "routes": [{"name": "orders", "match": {"prefix": "/api/orders"},
                        "rate_limits": ["local"], "quota": true}]
        })
        .to_string()
    };
    // Local bucket of 10, service bucket of 3: the service's is tighter and is shown.
    let envoy = envoy_for(quota.port, &cfg(10));
    let r = envoy.get("/api/orders");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-remaining"), Some("2"));
    assert!(r
        .header("ratelimit")
        .unwrap()
        .starts_with("\"quota-global\""));
    assert_eq!(
        r.header("ratelimit-policy"),
        Some("\"quota-global\";q=3;w=3600")
    );
    assert_eq!(
        r.header_all("ratelimit").len(),
        1,
        "one limit's headers, not two"
    );
    drop(envoy);
    // Local bucket of 2 (1 left) vs the service's 49 left: the local one is shown.
    let quota2 = Quota::start(
        "limit = { capacity = 50, refill_tokens = 1, refill_period_s = 3600 }",
        None,
    );
    let envoy = envoy_for(quota2.port, &cfg(2));
    let r = envoy.get("/api/orders");
    assert_eq!(r.header("x-ratelimit-remaining"), Some("1"));
    assert!(
        r.header("ratelimit").unwrap().starts_with("\"local\""),
        "{:?}",
        r.header("ratelimit")
    );
    assert_eq!(
        r.header("x-quota-limit"),
        None,
        "no quotas configured in this tier"
    );
    // The local limit denies first: the service is not asked (its bucket keeps 49).
    envoy.get("/api/orders");
    envoy
        .get("/api/orders")
        .assert_error(429, "rate_limit_exceeded");
    let u = quota2
        .admin("GET", "/v1/clients/127.0.0.1/usage", None)
        .json();
    assert_eq!(u["quotas"]["daily"]["used"], 2);
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn api_key_clients_are_counted_per_client_under_their_tier() {
    let quota = Quota::start(
        "\n[tiers.free]\ndaily = { limit = 2, policy = \"hard_stop\" }\n\
         [tiers.pro]\ndaily = { limit = 4, policy = \"hard_stop\" }",
        None,
    );
    let cfg = json!({
        "api_keys": {"header": "x-api-key", "keys": [
            {"id": "acme", "sha256": sha256_hex("acme-secret-key"), "tier": "pro"},
            {"id": "tiny", "sha256": sha256_hex("tiny-secret-key"), "tier": "free"}]},
        "quota": {"cluster": "quota", "timeout_ms": 1000, "failure_mode": "deny",
                  "mode": "check"},
        "routes": [{"name": "orders", "match": {"prefix": "/api/orders"},
                    "auth": {"mode": "required", "methods": ["api_key"]}, "quota": true}]
    })
    .to_string();
    let envoy = envoy_for(quota.port, &cfg);
    let send = |key: &str| {
        envoy
            .req("GET", "/api/orders")
            .header("x-api-key", key)
            .send()
    };
    let tiny: Vec<u16> = (0..3).map(|_| send("tiny-secret-key").status).collect();
    assert_eq!(tiny, vec![200, 200, 402], "free tier: 2 a day");
    let acme: Vec<u16> = (0..5).map(|_| send("acme-secret-key").status).collect();
    assert_eq!(
        acme,
        vec![200, 200, 200, 200, 402],
        "pro tier: 4 a day, counted apart"
    );
    // An unauthenticated request is refused before the service is asked.
    envoy
        .get("/api/orders")
        .assert_error(401, "missing_credentials");
    let u = quota.admin("GET", "/v1/clients/acme/usage", None).json();
    assert_eq!(u["tier"], "pro");
    assert_eq!(u["quotas"]["daily"]["used"], 4);
    assert_eq!(quota.used_today("127.0.0.1"), 0);
}
