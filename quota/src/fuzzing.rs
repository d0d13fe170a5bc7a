//! Fuzz target logic for the quota service (docs/FUZZING.md), shared by the libFuzzer targets
//! in `fuzz/` and `quota/tests/fuzz_replay.rs` (which replays the committed corpora). Each
//! target asserts invariants, not only "no panic".

use crate::config::Config;
use crate::rls::config::{Limit, Node, RlsConfig};
use crate::rls::matcher;
use crate::store::memory::MemoryStore;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::Value;
use std::sync::{Arc, OnceLock};
use tower::ServiceExt as _;

/// A target: takes any bytes, panics when an invariant breaks.
pub type Target = fn(&[u8]);

/// Every target, by the name its `fuzz/fuzz_targets/<name>.rs` and `fuzz/corpus/<name>/` use.
pub const TARGETS: [(&str, Target); 4] = [
    ("quota_api", quota_api),
    ("quota_config", quota_config),
    ("rls_config", rls_config),
    ("rls_request", rls_request),
];

const ADMIN_TOKEN: &str = "fuzz-admin-token-0123456789";
const FUZZ_CONFIG: &str = r#"
admin_token = "fuzz-admin-token-0123456789"
[tiers.default]
limit = { capacity = 5, refill_tokens = 1, refill_period_s = 60 }
daily = { limit = 50, policy = "hard_stop" }
[tiers.free]
limit = { capacity = 3, refill_tokens = 1, refill_period_s = 1 }
monthly = { limit = 10, policy = "throttle", throttle = { capacity = 2, refill_tokens = 1, refill_period_s = 60 } }
[tiers.pro]
monthly = { limit = 5, policy = "overage" }
"#;

struct Service {
    rt: tokio::runtime::Runtime,
    router: axum::Router,
}

fn service() -> &'static Service {
    static S: OnceLock<Service> = OnceLock::new();
    S.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let config = Config::parse(FUZZ_CONFIG, &|_| None).expect("the fuzz config parses");
        let store = Arc::new(MemoryStore::new(10_000));
        // Fixed time: the same input always meets the same periods.
        let clock: crate::api::Clock = Arc::new(|| 1_700_000_000_000);
        let router = rt.block_on(async { crate::app(config, store, clock) });
        Service { rt, router }
    })
}

fn pct(s: &[u8]) -> String {
    let mut out = String::new();
    for &b in s {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The HTTP API with its real router and handlers over a memory store: `/v1/check` and the
/// admin endpoints. Byte 0 picks the endpoint, byte 1 the credentials; then `id\nbody`. No
/// answer is a 5xx but a full store's 503; every error is the SPEC's JSON shape; a body that
/// is not JSON is always refused; a check answer says `allowed`, and a denial carries its
/// status and code.
pub fn quota_api(data: &[u8]) {
    let (Some(&ep), Some(&auth)) = (data.first(), data.get(1)) else {
        return;
    };
    let rest = &data[2..];
    let (id, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let id = pct(id);
    let (method, uri) = match ep % 5 {
        0 => (Method::POST, "/v1/check".to_string()),
        1 => (Method::PUT, format!("/v1/clients/{id}")),
        2 => (Method::GET, format!("/v1/clients/{id}")),
        3 => (Method::DELETE, format!("/v1/clients/{id}")),
        _ => (
            Method::GET,
            format!("/v1/clients/{id}/usage?tier={}", pct(body)),
        ),
    };
    let mut req = Request::builder().method(method.clone()).uri(&uri);
    match auth % 3 {
        0 => req = req.header("authorization", format!("Bearer {ADMIN_TOKEN}")),
        1 => req = req.header("authorization", "Bearer wrong-token-0123456789"),
        _ => {}
    }
    let Ok(req) = req
        .header("content-type", "application/json")
        .body(Body::from(body.to_vec()))
    else {
        return;
    };
    let s = service();
    let (status, headers, bytes) = s.rt.block_on(async {
        let resp = s.router.clone().oneshot(req).await.expect("infallible");
        let (parts, b) = resp.into_parts();
        let bytes = axum::body::to_bytes(b, 1 << 20)
            .await
            .expect("a bounded body");
        (parts.status, parts.headers, bytes)
    });
    if status == StatusCode::NO_CONTENT {
        return;
    }
    let json: Value = serde_json::from_slice(&bytes).expect("every answer is JSON");
    // The one 5xx by design: the memory store is full (its client cap; the store is shared by
    // all inputs of a run, and the clock is fixed, so nothing expires).
    assert!(
        !status.is_server_error()
            || status == StatusCode::SERVICE_UNAVAILABLE
                && json.get("error").and_then(Value::as_str) == Some("store_unavailable"),
        "{method} {uri}: {status} {json}"
    );
    let is_check = ep % 5 == 0;
    if status.is_client_error() && !(is_check && matches!(status.as_u16(), 402 | 429)) {
        assert!(
            json.get("error").and_then(Value::as_str).is_some(),
            "{json}"
        );
        assert!(
            json.get("message").and_then(Value::as_str).is_some(),
            "{json}"
        );
        if status == StatusCode::UNAUTHORIZED {
            assert!(headers.contains_key("www-authenticate"));
        }
    }
    let body_is_json = serde_json::from_slice::<Value>(body).is_ok();
    if matches!(ep % 5, 0 | 1) && !body_is_json {
        assert!(
            status.is_client_error(),
            "{uri}: non-JSON body answered {status}"
        );
    }
    if is_check && (status.is_success() || matches!(status.as_u16(), 402 | 429)) {
        let allowed = json
            .get("allowed")
            .and_then(Value::as_bool)
            .expect("allowed");
        if !allowed {
            let st = json.get("status").and_then(Value::as_u64).expect("status");
            assert!(st == 402 || st == 429, "{json}");
            assert!(json.get("error").and_then(Value::as_str).is_some());
            if st == 429 {
                assert!(json
                    .get("retry_after_s")
                    .and_then(Value::as_u64)
                    .is_some_and(|s| s >= 1));
            }
        }
    }
    if !is_check && status.is_success() {
        // Admin answers only ever follow the right token.
        assert_eq!(auth % 3, 0, "{uri}: admin answer without the admin token");
    }
}

/// The service's TOML config. What is accepted is within the documented bounds: thresholds
/// sorted, distinct, 1..=1000 (16 at most); 1..=50 attempts; backoff ceiling ≥ start; an
/// admin token of 16 characters or more; every tier's policy valid and served as its own.
pub fn quota_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = |n: &str| (n == "FUZZ_TOKEN").then(|| ADMIN_TOKEN.to_string());
    let Ok(c) = Config::parse(text, &env) else {
        return;
    };
    let t = &c.alerts.thresholds;
    assert!(t.len() <= 16 && t.windows(2).all(|w| w[0] < w[1]));
    assert!(t.iter().all(|&x| (1..=1000).contains(&x)));
    assert!((1..=50).contains(&c.alerts.max_attempts));
    assert!(c.alerts.max_backoff_ms >= c.alerts.initial_backoff_ms);
    assert!(c.alerts.timeout_ms > 0 && c.alerts.queue > 0);
    assert!(c.admin_token.as_ref().is_none_or(|t| t.len() >= 16));
    for (name, p) in &c.tiers {
        assert!(p.validate(name).is_ok(), "tier {name} accepted but invalid");
        assert_eq!(
            &c.tier_policy(name),
            p,
            "tier {name} not served as configured"
        );
    }
}

/// An independent lookup over exact (`key_value`) and any-value (`key`) children; `None`
/// when a visited node has wildcard children (their order rules are not modelled here).
fn oracle_find<'a>(root: &'a Node, entries: &[(&str, &str)]) -> Option<Option<&'a Node>> {
    let mut node = root;
    for (k, v) in entries {
        if !node.wildcards.is_empty() {
            return None;
        }
        match node
            .children
            .get(&format!("{k}_{v}"))
            .or_else(|| node.children.get(*k))
        {
            Some(n) => node = n,
            None => return Some(None),
        }
    }
    Some(Some(node))
}

/// envoyproxy/ratelimit YAML (one file), then a request descriptor: the input is
/// `yaml`, a line `#descriptor`, and `key=value` lines. Accepted configs name a domain, have
/// bounded counted limits, parse the same way twice, and the matcher picks the rule an
/// independent tree walk finds.
pub fn rls_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (yaml, desc) = text.split_once("\n#descriptor\n").unwrap_or((text, ""));
    let Ok((domain, root)) = RlsConfig::parse_file(yaml) else {
        return;
    };
    assert!(!domain.is_empty());
    let again = RlsConfig::parse_file(yaml).expect("deterministic");
    assert_eq!(again.1, root, "parse is not deterministic");
    fn walk(n: &Node, depth: usize) {
        assert!(depth < 64, "tree too deep");
        if let Some(r) = &n.rule {
            assert!(!r.stat_key.is_empty());
            if let Limit::Counted(c) = &r.limit {
                // Counts stay exact in the store's Lua (doubles); a bucket or sliding window
                // also multiplies by the unit in ms, which must stay exact too. A fixed window
                // only compares its count with the limit, so the product does not bound it.
                assert!(c.requests_per_unit <= crate::rls::config::MAX_REQUESTS_PER_UNIT);
                if c.algorithm != crate::rls::config::Algorithm::FixedWindow {
                    assert!(
                        u128::from(c.requests_per_unit) * u128::from(c.unit.nominal_ms())
                            < 1u128 << 52
                    );
                }
            }
        }
        for c in n.children.values() {
            walk(c, depth + 1);
        }
        for (_, c) in &n.wildcards {
            walk(c, depth + 1);
        }
    }
    walk(&root, 0);
    let entries: Vec<(&str, &str)> = desc
        .lines()
        .take(16)
        .map(|l| l.split_once('=').unwrap_or((l, "")))
        .collect();
    let got = matcher::find_match(&root, &entries);
    if let Some(m) = &got {
        assert!(!entries.is_empty());
        for (i, _) in &m.shared {
            assert!(*i < entries.len());
        }
    }
    if let Some(want) = oracle_find(&root, &entries) {
        let want = want.and_then(|n| n.rule.as_ref());
        assert_eq!(
            got.map(|m| m.rule),
            want,
            "matcher disagrees with the tree walk"
        );
    }
}

/// The configs `rls_request` decides against: the README-shaped examples the RLS tests use.
fn rls_fixture() -> &'static RlsConfig {
    static C: OnceLock<RlsConfig> = OnceLock::new();
    C.get_or_init(|| {
        let mut c = RlsConfig::default();
        for (name, text) in [
            ("1", include_str!("../tests/rls_configs/1_mongo_cps.yaml")),
            ("2", include_str!("../tests/rls_configs/2_messaging.yaml")),
            (
                "3",
                include_str!("../tests/rls_configs/3_edge_proxy_per_ip.yaml"),
            ),
            (
                "4",
                include_str!("../tests/rls_configs/4_nested_header.yaml"),
            ),
            ("5", include_str!("../tests/rls_configs/5_shadow.yaml")),
            ("6", include_str!("../tests/rls_configs/6_unlimited.yaml")),
            ("7", include_str!("../tests/rls_configs/7_replaces.yaml")),
            ("8", include_str!("../tests/rls_configs/8_wildcard.yaml")),
            (
                "9",
                include_str!("../tests/rls_configs/9_share_threshold.yaml"),
            ),
        ] {
            c.add(name, text).expect("the RLS test configs load");
        }
        c
    })
}

/// A `ShouldRateLimit` request as Envoy sends it (protobuf bytes), decided by the real
/// service code on a fresh memory store at a fixed time, twice. A refusal is
/// INVALID_ARGUMENT with a message; an answer has one status per descriptor, in order, is
/// over the limit overall exactly when a status is, never reports more remaining than its
/// limit, and the same request again at the same instant is never less restricted.
pub fn rls_request(data: &[u8]) {
    use crate::metrics::Metrics;
    use crate::rls::service::RlsService;
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
    use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
    use prost::Message as _;
    let Ok(req) = RateLimitRequest::decode(data) else {
        return;
    };
    let svc = RlsService::new(
        Arc::new(rls_fixture().clone()),
        Arc::new(MemoryStore::new(10_000)),
        Arc::new(Metrics::new()),
        Arc::new(|| 1_700_000_000_000),
    );
    let s = service();
    let check = |r: &Result<RateLimitResponse, tonic::Status>| -> Option<RateLimitResponse> {
        match r {
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
                assert!(!e.message().is_empty());
                None
            }
            Ok(resp) => {
                assert_eq!(resp.statuses.len(), req.descriptors.len());
                let any_over = resp
                    .statuses
                    .iter()
                    .any(|st| st.code == Code::OverLimit as i32);
                assert_eq!(resp.overall_code == Code::OverLimit as i32, any_over);
                for st in &resp.statuses {
                    assert!(st.code == Code::Ok as i32 || st.code == Code::OverLimit as i32);
                    if let Some(l) = &st.current_limit {
                        assert!(st.limit_remaining <= l.requests_per_unit);
                    }
                }
                Some(resp.clone())
            }
        }
    };
    let first = check(&s.rt.block_on(svc.decide(&req)));
    let second = check(&s.rt.block_on(svc.decide(&req)));
    match (first, second) {
        (Some(a), Some(b)) => {
            for (x, y) in a.statuses.iter().zip(&b.statuses) {
                if x.code == Code::OverLimit as i32 {
                    assert_eq!(y.code, x.code, "a denial turned into an admission");
                }
                if x.current_limit.is_some() {
                    assert!(
                        y.limit_remaining <= x.limit_remaining,
                        "the counter went back"
                    );
                }
            }
        }
        (None, None) => {}
        _ => panic!("the same request was refused once and decided once"),
    }
}
