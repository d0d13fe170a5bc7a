//! The two rate-limit stages of the request pipeline (`PreAuthLimits`, `ClientLimits`).

use super::{DenyReason, Event, Report, RequestKeys, Taken};
use crate::config::Config;
use crate::pipeline::{Env, Exchange, Request, Step};
use crate::reply::{ErrorCode, LocalReply};

/// Most events one request records (each limit: at most pressure + denied, in two stages).
pub const MAX_EVENTS: usize = 32;

/// Per-request rate-limit state, kept in the [`Exchange`].
#[derive(Debug, Clone, Default)]
pub struct LimitState {
    /// Tokens taken so far (refunded if a later limit denies).
    pub taken: Taken,
    /// The limit shown in the headers so far.
    pub report: Option<Report>,
    events: [Option<(usize, Event)>; MAX_EVENTS],
    /// (limit, bucket key) of shadow limits that would have denied, for the log.
    pub shadow_denials: Vec<(usize, String)>,
}

impl LimitState {
    fn record(&mut self, limit: usize, e: Event) {
        if let Some(slot) = self.events.iter_mut().find(|s| s.is_none()) {
            *slot = Some((limit, e));
        }
    }

    /// Hands the recorded events to the glue (for stats) and forgets them.
    pub fn drain_events(&mut self) -> impl Iterator<Item = (usize, Event)> + '_ {
        self.events.iter_mut().filter_map(Option::take)
    }
}

/// Names of the headers this module sets; replaced, never duplicated, between stages.
const HEADER_NAMES: [&str; 5] = [
    "ratelimit-policy",
    "ratelimit",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
];

fn set_headers(cfg: &Config, ex: &mut Exchange, report: Option<Report>, now_ms: u64) {
    let Some(report) = report else { return };
    let Some(h) = cfg.rate_limiter.headers(&report, now_ms, None) else {
        return;
    };
    ex.response_headers
        .retain(|(k, _)| !HEADER_NAMES.contains(&k.as_str()));
    ex.response_headers.reserve(HEADER_NAMES.len());
    for (k, v) in h.into_pairs() {
        ex.response_headers.push((k.to_string(), v));
    }
}

/// One `exempt` event per (limit, key) and fill time of the limit, shared by every worker
/// (the silencing table near misses use, under a different hash): bypasses are visible in the
/// event stream without one line per request. Every bypass is still counted.
fn exempt_events(
    cfg: &Config,
    ex: &Exchange,
    keys: &RequestKeys<'_>,
    exempted: &[Option<usize>],
    env: &Env,
) -> Vec<String> {
    let mut out = Vec::new();
    const SALT: u64 = 0x6578_656d_7074_0001; // "exempt": never a near-miss entry's hash
    let rl = &cfg.rate_limiter;
    for &id in exempted.iter().flatten() {
        let Some(limit) = rl.limits.get(id) else {
            continue;
        };
        let (c, r, p) = match limit.rule.params_for(keys.tier()) {
            Some(b) => (b.capacity(), b.refill_tokens(), b.refill_period_s()),
            None => continue,
        };
        let period = super::near_miss::NearMiss::period_ms(c, r, p);
        let hash = rl.key_hash(limit, keys) ^ SALT;
        if !super::near_miss::admit(env.store, &limit.near_miss_key, hash, env.now_ms, period) {
            continue;
        }
        let message = format!(
            "request bypassed rate limit '{}' through `exempt`",
            limit.name
        );
        let line = crate::events::EventLine {
            event: "exempt",
            route: keys.route,
            policy: Some(&limit.name),
            client: ex.identity.as_ref().map(|i| i.client.as_str()),
            ip: ex.client_ip.as_deref(),
            request_id: ex.request_id.as_deref(),
            message: &message,
            extra: &[("key", rl.describe_key(id, keys).into())],
        }
        .line();
        out.push(line);
    }
    out
}

/// Limits whose key needs no identity: before credentials are verified.
pub fn pre_auth(cfg: &Config, req: &Request, ex: &mut Exchange, env: &Env) -> Step {
    run(cfg, req, ex, env, true)
}

/// Limits keyed on the client, its tier or its claims: after credentials and scopes.
pub fn client(cfg: &Config, req: &Request, ex: &mut Exchange, env: &Env) -> Step {
    run(cfg, req, ex, env, false)
}

fn run(cfg: &Config, req: &Request, ex: &mut Exchange, env: &Env, pre: bool) -> Step {
    let Some(policy) = ex.policy(cfg) else {
        return Step::Next;
    };
    let plan = &policy.limits;
    let ids = if pre { &plan.pre_auth } else { &plan.post_auth };
    if ids.is_empty() {
        return Step::Next;
    }
    let rl = &cfg.rate_limiter;
    let keys = RequestKeys {
        ip: ex.client_ip.as_deref().unwrap_or(""),
        route: ex.route_name(cfg),
        headers: req.headers,
        identity: if pre { None } else { ex.identity.as_ref() },
    };
    let state = &mut ex.ratelimit;
    let mut events: [Option<(usize, Event)>; 2 * super::config::MAX_LIMITS_PER_ROUTE] =
        Default::default();
    let mut n = 0;
    // `abuse.key_sharing` with `tighten`: the per-client limits count this request double;
    // a route under `adaptive` tightening: all its limits count it `adaptive_factor` times.
    let mut cost = if !pre && ex.tightened {
        plan.cost.saturating_mul(crate::abuse::TIGHTEN_COST_FACTOR)
    } else {
        plan.cost
    };
    if ex.adaptive_factor > 1 {
        cost = cost.saturating_mul(ex.adaptive_factor);
    }
    let decision = rl.check(
        ids,
        cost,
        plan.exempt.as_ref(),
        &keys,
        env.now_ms,
        env.store,
        &mut state.taken,
        &mut |id, e| {
            if let Some(slot) = events.get_mut(n) {
                *slot = Some((id, e));
                n += 1;
            }
        },
    );
    let mut exempted: [Option<usize>; super::config::MAX_LIMITS_PER_ROUTE] = Default::default();
    for (id, e) in events.into_iter().flatten() {
        state.record(id, e);
        if e == Event::ShadowDenied {
            state.shadow_denials.push((id, rl.describe_key(id, &keys)));
        }
        if e == Event::Exempt {
            if let Some(slot) = exempted.iter_mut().find(|s| s.is_none()) {
                *slot = Some(id);
            }
        }
    }
    let lines = exempt_events(cfg, ex, &keys, &exempted, env);
    ex.events.extend(lines);
    match decision.denial {
        None => {
            for h in decision.near_misses.iter().flatten() {
                let Some(limit) = rl.limits.get(h.limit) else {
                    continue;
                };
                let message = format!(
                    "key reached {} of {} of rate limit '{}' (near_miss_ratio {})",
                    h.used,
                    h.capacity,
                    limit.name,
                    rl.near_miss.ratio()
                );
                let line = crate::events::EventLine {
                    event: "near_miss",
                    route: keys.route,
                    policy: Some(&limit.name),
                    client: ex.identity.as_ref().map(|i| i.client.as_str()),
                    ip: ex.client_ip.as_deref(),
                    request_id: ex.request_id.as_deref(),
                    message: &message,
                    extra: &[
                        ("key", rl.describe_key(h.limit, &keys).into()),
                        ("used", h.used.into()),
                        ("limit", h.capacity.into()),
                        ("shadow", limit.shadow.into()),
                    ],
                }
                .line();
                ex.events.push(line);
            }
            let state = &mut ex.ratelimit;
            let report = Report::tighter(state.report, decision.report);
            state.report = report;
            set_headers(cfg, ex, report, env.now_ms);
            Step::Next
        }
        Some(d) => {
            let name = rl.limits.get(d.limit).map_or("", |l| l.name.as_str());
            let key = rl.describe_key(d.limit, &keys);
            let message = match d.reason {
                DenyReason::Exhausted => format!(
                    "rate limit '{name}' exceeded; retry in {} s",
                    d.retry_after_s
                ),
                DenyReason::SlotsFull | DenyReason::Contention => format!(
                    "rate limit '{name}' cannot track more clients right now; retry in {} s",
                    d.retry_after_s
                ),
            };
            let reply = LocalReply::new(ErrorCode::RateLimitExceeded, message)
                .with_field("retry_after", d.retry_after_s)
                .with_header("retry-after", d.retry_after_s.to_string())
                .with_policy(name)
                .with_key(key);
            ex.ratelimit.report = decision.report;
            set_headers(cfg, ex, decision.report, env.now_ms);
            Step::Reply(reply)
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{self, Config};
    use crate::pipeline::{on_request_headers, Env, Exchange, Request, Verdict};
    use crate::reply::ErrorCode;
    use crate::store::MemoryStore;

    fn cfg(json: &str) -> Config {
        config::parse(json.as_bytes(), &|_| None).unwrap().0
    }

    fn go(c: &Config, store: &MemoryStore, now_ms: u64) -> (Verdict, Exchange) {
        let headers = vec![(":method".to_string(), "GET".to_string())];
        let req = Request {
            method: "GET",
            path: "/x",
            headers: &headers,
            source_address: Some("192.0.2.1:5000"),
            route_name: None,
        };
        let env = Env { now_ms, store };
        let mut ex = Exchange::default();
        let v = on_request_headers(c, &req, &mut ex, &env);
        (v, ex)
    }

    fn header<'a>(ex: &'a Exchange, name: &str) -> Option<&'a str> {
        ex.response_headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn the_pipeline_counts_down_then_replies_429_with_retry_after() {
        let c = cfg(
            r#"{"rate_limits":{"a":{"key":["ip"],"capacity":2,"refill_tokens":1,"refill_period_s":30},
                               "b":{"key":["client"],"capacity":9,"refill_tokens":9,"refill_period_s":9}},
                "default_route":{"rate_limits":["a","b"]}}"#,
        );
        let store = MemoryStore::new();
        c.rate_limiter.prepare(&store).unwrap();
        let now = 1_700_000_000_000;
        let (v, mut ex) = go(&c, &store, now);
        assert!(matches!(v, Verdict::Forward(_)));
        assert_eq!(header(&ex, "ratelimit"), Some("\"a\";r=1;t=30"));
        assert_eq!(header(&ex, "x-ratelimit-reset"), Some("1700000030"));
        assert_eq!(
            ex.response_headers.len(),
            5,
            "headers replaced between stages, not duplicated"
        );
        let events: Vec<_> = ex.ratelimit.drain_events().collect();
        assert_eq!(events.len(), 2, "{events:?}");
        go(&c, &store, now);
        let (v, ex) = go(&c, &store, now + 1000);
        let Verdict::Reply(r) = v else {
            panic!("expected 429, got {v:?}")
        };
        assert_eq!(r.code, ErrorCode::RateLimitExceeded);
        assert_eq!(r.policy.as_deref(), Some("a"));
        assert_eq!(r.key.as_deref(), Some("ip=192.0.2.1"));
        assert_eq!(
            r.headers,
            vec![("retry-after".to_string(), "29".to_string())]
        );
        let body: serde_json::Value = serde_json::from_slice(&r.body()).unwrap();
        assert_eq!(body["retry_after"], 29);
        assert_eq!(header(&ex, "ratelimit"), Some("\"a\";r=0;t=59"));
    }

    #[test]
    fn exempt_requests_bypass_the_limit_and_are_recorded() {
        let c = cfg(
            r#"{"rate_limits":{"a":{"key":["ip"],"capacity":1,"refill_tokens":1,"refill_period_s":60,
                                     "exempt":{"cidrs":["192.0.2.0/24"]}},
                               "b":{"key":["ip"],"algorithm":"fixed_window","limit":1,"window_s":60}},
                "routes":[{"name":"r","match":{"prefix":"/x"},"rate_limits":["a"]},
                          {"name":"s","match":{"prefix":"/y"},"rate_limits":["b"],"exempt":{"cidrs":["192.0.2.1"]}}],
                "default_route":{"rate_limits":["b"]}}"#,
        );
        let store = MemoryStore::new();
        c.rate_limiter.prepare(&store).unwrap();
        let now = 1_700_000_000_000;
        for i in 0..3 {
            let (v, mut ex) = go(&c, &store, now);
            assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
            // One `exempt` event per key and fill time, not one per request.
            assert_eq!(ex.events.len(), usize::from(i == 0), "{:?}", ex.events);
            if i == 0 {
                assert!(ex.events[0].starts_with("{\"event\":\"api_guard.exempt\""));
            }
            let events: Vec<_> = ex.ratelimit.drain_events().collect();
            assert_eq!(events, vec![(0, super::super::Event::Exempt)]);
            assert_eq!(
                header(&ex, "ratelimit"),
                None,
                "an exempt request shows no limit"
            );
        }
    }

    #[test]
    fn a_key_crossing_the_near_miss_ratio_reports_once_per_fill_time() {
        let c = cfg(r#"{"abuse":{"near_miss_ratio":0.5},
                "rate_limits":{"a":{"key":["ip"],"capacity":4,"refill_tokens":4,"refill_period_s":10}},
                "default_route":{"rate_limits":["a"]}}"#);
        let store = MemoryStore::new();
        c.rate_limiter.prepare(&store).unwrap();
        let now = 1_700_000_000_000;
        let mut lines = Vec::new();
        let mut counted = 0;
        for i in 0..4 {
            let (v, mut ex) = go(&c, &store, now + i);
            assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
            counted += ex
                .ratelimit
                .drain_events()
                .filter(|(_, e)| *e == super::super::Event::NearMiss)
                .count();
            if !ex.events.is_empty() {
                lines.push((i, ex.events.clone()));
            }
        }
        assert_eq!(counted, 1);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0].0, 1, "the 2nd request reaches 2 of 4");
        let v: serde_json::Value = serde_json::from_str(&lines[0].1[0]).unwrap();
        assert_eq!(v["event"], "api_guard.near_miss");
        assert_eq!(v["policy"], "a");
        assert_eq!(v["key"], "ip=192.0.2.1");
        assert_eq!(v["used"], 2);
        assert_eq!(v["limit"], 4);
        assert_eq!(v["ip"], "192.0.2.1");
        // Refilled (3.6 tokens back after 9 s) and crossing again within the 10 s silence:
        // not reported.
        for t in [9_000, 9_001] {
            let (_, ex) = go(&c, &store, now + t);
            assert!(ex.events.is_empty(), "{:?}", ex.events);
        }
        // After the fill time, a new crossing reports again.
        go(&c, &store, now + 20_000);
        let (_, ex) = go(&c, &store, now + 20_001);
        assert_eq!(ex.events.len(), 1, "{:?}", ex.events);
    }

    #[test]
    fn near_miss_ratio_is_validated() {
        for r in ["0", "1", "-0.5", "1.5"] {
            let json = format!(r#"{{"abuse":{{"near_miss_ratio":{r}}}}}"#);
            let e = config::parse(json.as_bytes(), &|_| None).unwrap_err();
            assert_eq!(e.path, "abuse.near_miss_ratio", "{r}: {e}");
        }
    }
}
