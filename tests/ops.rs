//! The operator's kit (`deploy/`) and `api-guard check --explain`.
//!
//! - The alert rules pass `promtool check rules`; `promtool test rules` passes and covers every
//!   alert both firing and not firing; every alert links an existing runbook section. The
//!   dashboard is importable (a data source variable, panels on the grid) and its queries
//!   parse with Prometheus' own parser.
//! - The rules and the Grafana dashboard use only metric names that a live Envoy (this
//!   delivery: the harness runs the file for the wasm filter and the dynamic module) shows on
//!   `/stats/prometheus` and the live quota service shows on `/metrics`, after traffic that
//!   makes each alert's events happen (and the counters are checked to have counted them).
//! - `api-guard check --explain` on envoy/demo-filter.json and envoy/demo.yaml.
//!
//! promtool comes from the Debian package `prometheus` (`scripts/tools.sh promtool`, run by
//! `make test`).

mod common;

use common::*;
use promql_parser::label::{MatchOp, Matcher};
use promql_parser::parser::Expr;
use promql_parser::util::{walk_expr, ExprVisitor};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

const RULES: &str = "deploy/prometheus/api-guard.rules.yml";
const RULES_TEST: &str = "deploy/prometheus/api-guard.rules.test.yml";
const PROMETHEUS_EXAMPLE: &str = "deploy/prometheus/prometheus.example.yml";
const DASHBOARD: &str = "deploy/grafana/api-guard.json";
const RUNBOOKS: &str = "docs/runbooks.md";

fn promtool() -> Command {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("promtool"))
            .find(|f| f.is_file())
    });
    let bin = found.unwrap_or_else(|| {
        panic!("promtool not found on PATH: `make test` installs it (scripts/tools.sh promtool: Debian package prometheus)")
    });
    let mut c = Command::new(bin);
    c.stdin(Stdio::null());
    c
}

fn run_ok(mut c: Command, what: &str) -> String {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(repo().join(path)).unwrap();
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// (alert name, expression, runbook_url) of every alert rule.
fn alerts() -> Vec<(String, String, String)> {
    let doc = yaml(RULES);
    let mut out = Vec::new();
    for g in doc["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            if let Some(name) = r["alert"].as_str() {
                out.push((
                    name.to_string(),
                    r["expr"].as_str().unwrap().to_string(),
                    r["annotations"]["runbook_url"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                ));
            }
        }
    }
    assert!(out.len() >= 8, "alerts missing from {RULES}: {out:?}");
    out
}

/// Every query of the dashboard, with Grafana's `$__rate_interval` made a plain range.
fn dashboard_queries() -> Vec<(String, String)> {
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join(DASHBOARD)).unwrap()).unwrap();
    let mut out = Vec::new();
    fn walk(v: &Value, title: &str, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(o) => {
                let title = o.get("title").and_then(Value::as_str).unwrap_or(title);
                if let Some(e) = o.get("expr").and_then(Value::as_str) {
                    out.push((title.to_string(), e.replace("$__rate_interval", "5m")));
                }
                for c in o.values() {
                    walk(c, title, out);
                }
            }
            Value::Array(a) => a.iter().for_each(|c| walk(c, title, out)),
            _ => {}
        }
    }
    walk(&doc["panels"], "", &mut out);
    assert!(out.len() >= 10, "dashboard queries: {out:?}");
    out
}

// ------------------------------------------------------------------ promtool

#[test]
fn alert_rules_pass_promtool_check() {
    let mut c = promtool();
    c.args(["check", "rules"]).arg(repo().join(RULES));
    let out = run_ok(c, "promtool check rules");
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", alerts().len())),
        "{out}"
    );
}

#[test]
fn example_prometheus_config_loads_the_rules() {
    let mut c = promtool();
    c.args(["check", "config"])
        .arg(repo().join(PROMETHEUS_EXAMPLE));
    let out = run_ok(c, "promtool check config");
    assert!(out.contains("SUCCESS: 1 rule files found"), "{out}");
}

#[test]
fn promtool_unit_tests_pass_and_cover_every_alert_firing_and_not_firing() {
    let mut c = promtool();
    c.args(["test", "rules", "api-guard.rules.test.yml"])
        .current_dir(repo().join("deploy/prometheus"));
    let out = run_ok(c, "promtool test rules");
    assert!(out.contains("SUCCESS"), "{out}");

    let doc = yaml(RULES_TEST);
    let mut fires = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for t in doc["tests"].as_array().unwrap() {
        for a in t["alert_rule_test"].as_array().into_iter().flatten() {
            let name = a["alertname"].as_str().unwrap().to_string();
            let expected = a["exp_alerts"].as_array().map_or(0, Vec::len);
            if expected > 0 {
                fires.insert(name);
            } else {
                silent.insert(name);
            }
        }
    }
    for (name, _, _) in alerts() {
        assert!(fires.contains(&name), "no test where {name} fires");
        assert!(silent.contains(&name), "no test where {name} stays silent");
    }
}

#[test]
fn every_alert_links_a_runbook_section_that_exists() {
    let text = std::fs::read_to_string(repo().join(RUNBOOKS)).unwrap();
    // GitHub's heading anchors: lower case, spaces to '-', other punctuation dropped.
    let anchors: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(|h| {
            h.trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect();
    for (name, _, url) in alerts() {
        let anchor = url
            .strip_prefix("docs/runbooks.md#")
            .unwrap_or_else(|| panic!("{name}: runbook_url {url:?} is not docs/runbooks.md#..."));
        assert_eq!(anchor, name.to_lowercase(), "{name}: runbook_url {url}");
        assert!(
            anchors.contains(anchor),
            "{name}: no section `## {name}` in {RUNBOOKS}"
        );
        let section = text.split(&format!("## {name}\n")).nth(1).unwrap();
        let section = section.split("\n## ").next().unwrap();
        for part in [
            "**What it means.**",
            "**Attack or broken client?**",
            "**What to change.**",
        ] {
            assert!(section.contains(part), "{name}: runbook lacks {part}");
        }
    }
}

#[test]
fn dashboard_queries_are_promql_prometheus_accepts() {
    // promtool has no query checker; recording rules hold any expression, so each query
    // becomes one and `promtool check rules` parses it with Prometheus' own parser.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let queries = dashboard_queries();
    for (i, (_, e)) in queries.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard:q{i}\n        expr: {}\n",
            serde_json::to_string(e).unwrap()
        ));
    }
    let file = write_temp("dashboard-rules.yml", &rules);
    let mut c = promtool();
    c.args(["check", "rules"]).arg(&file);
    let out = run_ok(c, "promtool check rules (dashboard queries)");
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", queries.len())),
        "{out}"
    );
}

#[test]
fn dashboard_is_importable_json_with_panels_that_do_not_overlap() {
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join(DASHBOARD)).unwrap()).unwrap();
    assert_eq!(doc["uid"], "api-guard");
    assert!(doc["schemaVersion"].as_u64().is_some());
    let vars = doc["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter()
            .any(|v| v["name"] == "datasource" && v["type"] == "datasource"),
        "a Prometheus data source variable, so the import asks for one"
    );
    let panels = doc["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate id: {p}");
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(x + w <= 24, "{} is wider than the grid", p["title"]);
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(
                    cells.insert((cx, cy)),
                    "{} overlaps another panel",
                    p["title"]
                );
            }
        }
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{} has no query", p["title"]);
        for t in targets.iter().chain(std::iter::once(p)) {
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "{}: queries the chosen data source",
                p["title"]
            );
        }
    }
}

// ------------------------------------------------------------------ metric names

/// Metric names and `__name__` patterns a PromQL expression selects.
#[derive(Default)]
struct Selected {
    names: BTreeSet<String>,
    /// Selectors without a literal name: their `__name__` matchers (all must hold).
    patterns: Vec<Vec<Matcher>>,
    /// `job` label values the expression matches on.
    jobs: BTreeSet<String>,
}

impl ExprVisitor for Selected {
    type Error = String;
    fn pre_visit(&mut self, e: &Expr) -> Result<bool, String> {
        let vs = match e {
            Expr::VectorSelector(vs) => vs,
            Expr::MatrixSelector(ms) => &ms.vs,
            _ => return Ok(true),
        };
        let name_matchers: Vec<Matcher> = vs
            .matchers
            .matchers
            .iter()
            .filter(|m| m.name == "__name__")
            .cloned()
            .collect();
        for m in &vs.matchers.matchers {
            if m.name == "job" {
                self.jobs.insert(m.value.clone());
            }
        }
        match (&vs.name, name_matchers.is_empty()) {
            (Some(n), _) => {
                self.names.insert(n.clone());
            }
            (None, false) => self.patterns.push(name_matchers),
            (None, true) => return Err(format!("a selector without a metric name: {vs}")),
        }
        Ok(true)
    }
}

fn selected(exprs: &[(String, String)]) -> Selected {
    let mut s = Selected::default();
    for (what, e) in exprs {
        let ast = promql_parser::parser::parse(e).unwrap_or_else(|err| panic!("{what}: {err}"));
        walk_expr(&mut s, &ast).unwrap_or_else(|err| panic!("{what}: {err}"));
    }
    s
}

/// Names of the samples in a Prometheus text exposition, with their value summed over labels.
fn exposed(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let value = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        *out.entry(line[..end].to_string()).or_insert(0.0) += value;
    }
    out
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn wait_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn redis_server(port: u16, dir: &Path) -> Proc {
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "no", "--protected-mode", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server (`make test` installs it: scripts/tools.sh redis)");
    wait_port(port, "redis-server");
    Proc(child)
}

/// The `api-guard-quota` binary `cargo test` built with the workspace (as tests/quota.rs).
fn quota_bin() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"));
    let bin = target.join("debug/api-guard-quota");
    if !(std::env::var_os("API_GUARD_SKIP_WASM_BUILD").is_some() && bin.exists()) {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "api-guard-quota", "--bin", "api-guard-quota"])
            .arg("--quiet")
            .current_dir(repo())
            .status()
            .expect("run cargo to build api-guard-quota");
        assert!(status.success(), "building api-guard-quota failed");
    }
    bin
}

fn quota_service(port: u16, redis_port: u16, dir: &Path) -> Proc {
    let config = dir.join("quota.toml");
    // Anonymous callers (keyed by IP): 3 a day, and an alert at 100 % (no webhook is set
    // for the client, so it is counted as `no_webhook`).
    std::fs::write(
        &config,
        "[alerts]\nthresholds = [100]\n[tiers.anonymous]\ndaily = { limit = 3, policy = \"hard_stop\" }\n",
    )
    .unwrap();
    let mut child = Command::new(quota_bin())
        .arg("--config")
        .arg(&config)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--redis", &format!("redis://127.0.0.1:{redis_port}")])
        .args(["--redis-timeout-ms", "200"])
        .env("RUST_LOG", "error")
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
    let proc = Proc(child);
    rx.recv_timeout(Duration::from_secs(20))
        .expect("api-guard-quota not ready within 20 s");
    proc
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// Whether this build has an error code (so its `api_guard_denied_<code>` counter).
fn build_has_code(code: &str) -> bool {
    api_guard::reply::ErrorCode::ALL
        .iter()
        .any(|c| c.as_str() == code)
}

/// The rules name `api_guard_denied_backend_overloaded` ahead of the backend ceiling (issue
/// 13, built on another branch). Accepted only while this build lacks the error code; once
/// it has it, the test below drives a ceiling denial and requires the counter to count it.
fn pending_denial_counter(name: &str) -> bool {
    name == "api_guard_denied_backend_overloaded" && !build_has_code("backend_overloaded")
}

#[test]
fn rules_and_dashboard_use_only_metrics_envoy_and_the_quota_service_expose() {
    let dir = temp_dir("ops");
    let redis_port = free_port();
    let mut redis = Some(redis_server(redis_port, &dir));
    let quota_port = free_port();
    let _quota = quota_service(quota_port, redis_port, &dir);

    let ceiling = build_has_code("backend_overloaded");
    let mut cfg = json!({
        "api_keys": {"keys": [
            {"id": "reader", "sha256": sha256_hex("reader-key"), "scopes": ["read"]},
            {"id": "operator", "sha256": sha256_hex("operator-key"), "scopes": ["admin"]}
        ]},
        "rate_limits": {
            "per-ip": {"key": ["ip"], "capacity": 2, "refill_tokens": 1, "refill_period_s": 3600},
            "probe": {"key": ["ip"], "capacity": 1, "refill_tokens": 1, "refill_period_s": 3600, "shadow": true},
            "per-ip-loose": {"key": ["ip"], "capacity": 100, "refill_tokens": 100, "refill_period_s": 60}
        },
        "webhooks": {"gh": {"scheme": "github", "secrets": ["ops-test-secret"]}},
        "quota": {"cluster": "quota", "timeout_ms": 500, "failure_mode": "allow",
                  "mode": "check"},
        "routes": [
            {"name": "limited", "match": {"prefix": "/limited"}, "auth": {"mode": "none"},
             "rate_limits": ["per-ip", "probe"]},
            {"name": "hook", "match": {"methods": ["POST"], "path": "/hook"},
             "auth": {"mode": "none"}, "webhook": "gh"},
            {"name": "metered", "match": {"prefix": "/metered"}, "auth": {"mode": "none"},
             "quota": true},
            {"name": "admin", "match": {"prefix": "/admin"},
             "auth": {"mode": "required", "methods": ["api_key"], "scopes_all": ["admin"]}},
            {"name": "surging", "match": {"prefix": "/surging"}, "auth": {"mode": "none"},
             "rate_limits": ["per-ip-loose"],
             "adaptive": {"surge_factor": 2, "baseline_s": 1, "cooldown_s": 60}}
        ],
        "default_route": {"auth": {"mode": "required", "methods": ["api_key"]}}
    });
    if ceiling {
        cfg["routes"].as_array_mut().unwrap().push(json!(
            {"name": "ceiling", "match": {"prefix": "/ceiling"}, "auth": {"mode": "none"},
             "backend_ceiling": {"max_rps": 1}}
        ));
    }
    let envoy = Envoy::builder(&cfg.to_string())
        .cluster("quota", quota_port)
        .start();

    // The events the alerts are about, each at least once.
    assert_eq!(envoy.get("/limited").status, 200);
    assert_eq!(envoy.get("/limited").status, 200);
    envoy
        .get("/limited")
        .assert_error(429, "rate_limit_exceeded");
    envoy
        .get("/orders")
        .assert_error(401, "missing_credentials");
    envoy
        .req("GET", "/orders")
        .header("x-api-key", "wrong-key")
        .send()
        .assert_error(401, "invalid_api_key");
    envoy
        .req("GET", "/admin")
        .header("x-api-key", "reader-key")
        .send()
        .assert_error(403, "insufficient_scope");
    envoy
        .req("POST", "/hook")
        .header("x-hub-signature-256", &format!("sha256={}", "0".repeat(64)))
        .body("{}")
        .send()
        .assert_error(401, "invalid_signature");
    if ceiling {
        // max_rps 1: within a second, the second request on is shed.
        let shed = (0..5)
            .map(|_| envoy.get("/ceiling"))
            .filter(|r| r.status == 503)
            .inspect(|r| {
                r.assert_error(503, "backend_overloaded");
            })
            .count();
        assert!(shed >= 1, "max_rps 1 shed nothing of 5 requests");
    }
    // A surge on an adaptive route (ApiGuardAdaptiveTighteningActive): one request, then,
    // early in a later second (the baseline has learned 1 s), 4 requests: more than 2 x 1/s.
    assert_eq!(envoy.get("/surging").status, 200);
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_millis();
    std::thread::sleep(Duration::from_millis(u64::from(1050 - ms)));
    for _ in 0..4 {
        assert_eq!(envoy.get("/surging").status, 200);
    }
    // The quota service answers (3 a day, the third crosses the 100 % alert), then refuses.
    for _ in 0..3 {
        assert_eq!(envoy.get("/metered").status, 200);
    }
    envoy.get("/metered").assert_error(402, "quota_exceeded");
    // Redis goes away: the service's store calls fail, it answers 503, and the filter
    // applies failure_mode (allow).
    drop(redis.take());
    let r = envoy.get("/metered");
    assert_eq!(r.status, 200, "failure_mode allow: {}", r.text());

    let envoy_metrics = exposed(&envoy.prometheus());
    // The alert is sent by a background task: wait for it to be counted.
    let deadline = Instant::now() + Duration::from_secs(10);
    let quota_metrics = loop {
        let m = exposed(&String::from_utf8_lossy(
            &http(quota_port, "GET", "/metrics").send().body,
        ));
        if m.contains_key("api_guard_quota_alerts_total") || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(50));
    };

    // The filter defines every counter at configure, so Envoy lists them at 0 before any
    // traffic (both deliveries): presence alone proves little. Each alert's metric must have
    // counted its event. The quota service's families appear only once a label set is used,
    // which the traffic above does (decisions, store calls, a failed one, an alert).
    let mut counted = vec![
        ("api_guard_allowed", 6.0),
        ("api_guard_denied_rate_limit_exceeded", 1.0),
        ("api_guard_denied_missing_credentials", 1.0),
        ("api_guard_denied_invalid_api_key", 1.0),
        ("api_guard_denied_insufficient_scope", 1.0),
        ("api_guard_denied_invalid_signature", 1.0),
        ("api_guard_denied_quota_exceeded", 1.0),
        ("api_guard_quota_unavailable", 1.0),
        ("api_guard_ratelimit_per_ip_denied", 1.0),
        ("api_guard_ratelimit_probe_shadow_denied", 1.0),
        ("api_guard_adaptive_on", 1.0),
        ("envoy_cluster_upstream_rq_total", 6.0),
    ];
    if ceiling {
        counted.push(("api_guard_denied_backend_overloaded", 1.0));
    }
    for (name, at_least) in counted {
        let v = envoy_metrics.get(name).copied();
        assert!(
            v.is_some_and(|v| v >= at_least),
            "{name} = {v:?} on {:?}'s /stats/prometheus (want >= {at_least}); api_guard names: {:?}",
            envoy.delivery,
            envoy_metrics
                .keys()
                .filter(|k| k.contains("api_guard"))
                .collect::<Vec<_>>()
        );
    }
    for (name, at_least) in [
        ("api_guard_quota_decisions_total", 5.0),
        ("api_guard_quota_store_errors_total", 1.0),
        ("api_guard_quota_store_latency_seconds_count", 5.0),
        ("api_guard_quota_alerts_total", 1.0),
    ] {
        let v = quota_metrics.get(name).copied();
        assert!(
            v.is_some_and(|v| v >= at_least),
            "{name} = {v:?} on the quota service's /metrics (want >= {at_least}): {:?}",
            quota_metrics.keys().collect::<Vec<_>>()
        );
    }

    let live: BTreeSet<&str> = envoy_metrics
        .keys()
        .chain(quota_metrics.keys())
        .map(String::as_str)
        .collect();
    let rule_exprs: Vec<(String, String)> = alerts().into_iter().map(|(n, e, _)| (n, e)).collect();
    let mut all = rule_exprs.clone();
    all.extend(dashboard_queries());
    let used = selected(&all);

    let mut pending = Vec::new();
    for name in &used.names {
        if live.contains(name.as_str()) {
            continue;
        }
        // Prometheus makes `up` itself for every scrape target; the job it is matched on must
        // be one the example config scrapes (checked below).
        if name == "up" {
            continue;
        }
        if pending_denial_counter(name) {
            pending.push(name.clone());
            continue;
        }
        panic!(
            "`{name}` is used by the rules or the dashboard but neither Envoy ({:?}) nor the \
             quota service exposes it",
            envoy.delivery
        );
    }
    for matchers in &used.patterns {
        let hits: Vec<&&str> = live
            .iter()
            .filter(|n| matchers.iter().all(|m| m.is_match(n)))
            .collect();
        assert!(
            !hits.is_empty(),
            "no live metric matches {matchers:?} (used by the dashboard or the rules)"
        );
        for m in matchers {
            assert!(matches!(m.op, MatchOp::Re(_) | MatchOp::NotRe(_)), "{m:?}");
        }
    }
    let example = yaml(PROMETHEUS_EXAMPLE);
    let jobs: BTreeSet<&str> = example["scrape_configs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["job_name"].as_str())
        .collect();
    for j in &used.jobs {
        assert!(
            jobs.contains(j.as_str()),
            "job {j:?} is not scraped by {PROMETHEUS_EXAMPLE}"
        );
    }
    if !pending.is_empty() {
        eprintln!(
            "accepted ahead of their feature (no such error code in this build): {pending:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ------------------------------------------------------------------ check --explain

#[test]
fn check_explain_prints_each_route_checks_in_spec_order() {
    let demo = repo().join("envoy/demo-filter.json");
    let out = cli()
        .args(["check", "--explain"])
        .arg(&demo)
        .env("DEMO_GITHUB_WEBHOOK_SECRET", "demo-webhook-secret")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for head in [
        "route 1 \"health\" (routes[0]):",
        "route 4 \"orders-read\" (routes[3]):",
        "route 6 \"github-hook\" (routes[5]):",
        "default_route:",
    ] {
        assert!(text.contains(head), "no `{head}` in\n{text}");
    }
    // Every block lists the ten steps of SPEC section 3, in order.
    let blocks: Vec<&str> = text
        .split("\n\n")
        .filter(|b| b.contains(" 1. route:"))
        .collect();
    assert_eq!(blocks.len(), 7, "6 routes + default_route:\n{text}");
    for b in &blocks {
        let labels: Vec<&str> = b
            .lines()
            .filter_map(|l| l.trim_start().split_once(". "))
            .filter_map(|(n, rest)| n.parse::<u32>().ok().and(rest.split_once(": ")))
            .map(|(label, _)| label)
            .collect();
        assert_eq!(labels, api_guard::explain::STEPS, "{b}");
    }
    let orders = blocks
        .iter()
        .find(|b| b.contains("\"orders-read\""))
        .unwrap();
    for want in [
        "GET, path under /api/orders",
        "required: none presented: 401 missing_credentials",
        "jwt:demo: Authorization: Bearer, ES256, issuer https://auth.demo.local",
        "api_key: header x-api-key, 2 keys",
        "needs all of scopes read:orders",
        "per-client (key client, cost 1; over it: 429 rate_limit_exceeded), per tier:",
        "tier anonymous: 15 tokens, refill 10 per 60 s",
        "tier internal: unlimited",
        "any other tier: 100 tokens, refill 60 per 60 s",
        "POST /v1/lease to cluster quota (authority quota), cost 1, timeout 100 ms",
        "failure_mode allow",
    ] {
        assert!(orders.contains(want), "no `{want}` in\n{orders}");
    }
    let login = blocks.iter().find(|b| b.contains("\"login\"")).unwrap();
    assert!(
        login.contains(
            "5. per-IP/route limits: login-per-ip (key ip, cost 1; over it: 429 \
             rate_limit_exceeded): 5 tokens, refill 5 per 60 s"
        ),
        "{login}"
    );
    let hook = blocks
        .iter()
        .find(|b| b.contains("\"github-hook\""))
        .unwrap();
    assert!(
        hook.contains("11. webhook body check: github: scheme github"),
        "{hook}"
    );
    assert!(
        !text.contains("demo-webhook-secret"),
        "a secret was printed"
    );

    // The same from the Envoy config that embeds it, and an invalid config still fails.
    let yaml = cli()
        .args(["check", "--explain"])
        .arg(repo().join("envoy/demo.yaml"))
        .env("DEMO_GITHUB_WEBHOOK_SECRET", "demo-webhook-secret")
        .output()
        .unwrap();
    let ytext = String::from_utf8_lossy(&yaml.stdout);
    assert!(yaml.status.success(), "{ytext}");
    assert!(ytext.contains("api-guard wasm filter at `"), "{ytext}");
    assert!(ytext.contains("route 4 \"orders-read\""), "{ytext}");
    let bad = write_temp("bad.json", r#"{"routes":[{"name":"a","match":{}}]}"#);
    let out = cli()
        .args(["check", "--explain"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("1. route"));
}
