//! Defenses against distributed abuse that per-IP and per-client limits miss (`abuse`).
//!
//! - [`key_sharing`]: one client identity from more addresses than allowed.
//! - [`adaptive`]: a route's limits tightened while its request rate surges (the `Adaptive`
//!   stage, before the pre-auth limits).
//!
//! The pipeline stage runs after credentials and scopes, before the per-client limits, so a
//! `tighten` action can make this request's limits stricter.

pub mod adaptive;
pub mod key_sharing;

use self::key_sharing::{KeySharing, Seen, MAX_DISTINCT};
use crate::config::{
    AdaptiveConfig, Config, ConfigError, KeySharingConfig, Policy, RawConfig, Warning,
};
use crate::pipeline::{Env, Exchange, Request, Step};
use crate::reply::{ErrorCode, LocalReply};
use crate::store::{SharedStore, StoreError};

/// What happens to a request from an address over the allowance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Pass, with one `credential_abuse` event per client and window.
    Log,
    /// 403 `credential_abuse`.
    Deny,
    /// Pass, with the route's per-client limits at half strength for this request
    /// (each limit takes twice the route's cost).
    Tighten,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Log => "log",
            Action::Deny => "deny",
            Action::Tighten => "tighten",
        }
    }
}

/// How much a `tighten` multiplies the cost of the per-client limits.
pub const TIGHTEN_COST_FACTOR: u64 = 2;
/// Largest `tracked_clients`: 262,144 entries of `18 + 4 × max_distinct_ips` bytes, about
/// 26 MiB of shared data at `max_distinct_ips` 20 (72 MiB at the largest), for deployments
/// with 100k+ active keys (bench/memory.py runs 100k clients).
pub const MAX_TRACKED: u32 = 1 << 18;

/// The compiled `abuse` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Abuse {
    pub key_sharing: Option<(KeySharing, Action)>,
}

/// What the stage saw, for counters (the glue reads and clears it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AbuseState {
    pub over: bool,
    pub untracked: bool,
}

impl Abuse {
    pub fn compile(raw: &RawConfig) -> Result<Abuse, ConfigError> {
        let Some(a) = &raw.abuse else {
            return Ok(Abuse::default());
        };
        let key_sharing = a
            .key_sharing
            .as_ref()
            .map(|k| compile_key_sharing("abuse.key_sharing", k))
            .transpose()?;
        Ok(Abuse { key_sharing })
    }

    /// Creates the shared-data records of every route's `adaptive`; at configuration.
    pub fn prepare_adaptive(cfg: &Config, store: &dyn SharedStore) -> Result<u32, StoreError> {
        let mut n = 0;
        let policies = cfg
            .routes
            .iter()
            .map(|r| &r.policy)
            .chain(cfg.default_route.as_ref());
        for a in policies.filter_map(|p| p.adaptive.as_ref()) {
            n += u32::from(a.prepare(store)?);
        }
        Ok(n)
    }

    /// Creates the shared-data pages; call at configuration, before traffic.
    pub fn prepare(&self, store: &dyn SharedStore) -> Result<u32, StoreError> {
        match &self.key_sharing {
            Some((k, _)) => k.prepare(store),
            None => Ok(0),
        }
    }
}

fn compile_key_sharing(
    path: &str,
    k: &KeySharingConfig,
) -> Result<(KeySharing, Action), ConfigError> {
    let range = |field: &str, v: u64, lo: u64, hi: u64| {
        if (lo..=hi).contains(&v) {
            Ok(())
        } else {
            Err(ConfigError::new(
                format!("{path}.{field}"),
                format!("must be between {lo} and {hi}"),
            ))
        }
    };
    range(
        "max_distinct_ips",
        k.max_distinct_ips.into(),
        1,
        MAX_DISTINCT.into(),
    )?;
    range("window_s", k.window_s, 1, 7 * 86400)?;
    range("prefix_v4", k.prefix_v4.into(), 8, 32)?;
    range("prefix_v6", k.prefix_v6.into(), 16, 128)?;
    range(
        "tracked_clients",
        k.tracked_clients.into(),
        4,
        MAX_TRACKED.into(),
    )?;
    let action = match k.action.as_str() {
        "log" => Action::Log,
        "deny" => Action::Deny,
        "tighten" => Action::Tighten,
        other => {
            return Err(ConfigError::new(
                format!("{path}.action"),
                format!("'{other}' is not \"log\", \"deny\" or \"tighten\""),
            ))
        }
    };
    Ok((
        KeySharing {
            max_distinct_ips: k.max_distinct_ips,
            window_s: k.window_s,
            prefix_v4: k.prefix_v4,
            prefix_v6: k.prefix_v6,
            pages: k.tracked_clients.div_ceil(key_sharing::ENTRIES as u32),
        },
        action,
    ))
}

/// Validates a route's `adaptive` (at `path`) and compiles it with its shared-data `key`.
pub fn compile_adaptive(
    path: &str,
    key: &str,
    a: &AdaptiveConfig,
    policy: &Policy,
    warnings: &mut Vec<Warning>,
) -> Result<adaptive::Adaptive, ConfigError> {
    let range = |field: &str, v: f64, lo: f64, hi: f64, what: &str| {
        if v.is_finite() && v >= lo && v <= hi {
            Ok(())
        } else {
            Err(ConfigError::new(
                format!("{path}.{field}"),
                what.to_string(),
            ))
        }
    };
    range(
        "surge_factor",
        a.surge_factor,
        1.01,
        1000.0,
        "must be between 1.01 and 1000",
    )?;
    range(
        "baseline_s",
        a.baseline_s as f64,
        1.0,
        86400.0,
        "must be between 1 and 86400",
    )?;
    range(
        "cooldown_s",
        a.cooldown_s as f64,
        1.0,
        86400.0,
        "must be between 1 and 86400",
    )?;
    range(
        "tighten_to",
        a.tighten_to,
        0.01,
        0.99,
        "must be between 0.01 and 0.99",
    )?;
    range(
        "min_rps",
        a.min_rps,
        0.001,
        1e6,
        "must be between 0.001 and 1000000",
    )?;
    let compiled = adaptive::Adaptive {
        surge_factor: a.surge_factor,
        baseline_s: a.baseline_s,
        tighten_to: a.tighten_to,
        cooldown_s: a.cooldown_s,
        min_rps: a.min_rps,
        key: key.to_string(),
    };
    let share = compiled.effective_share();
    if (share - a.tighten_to).abs() > 1e-9 {
        warnings.push(Warning {
            path: format!("{path}.tighten_to"),
            message: format!(
                "limits are tightened through the request cost (x{}), so {} applies as {share}",
                compiled.cost_factor(),
                a.tighten_to
            ),
        });
    }
    if policy.limits.is_empty() {
        warnings.push(Warning {
            path: path.to_string(),
            message: "the route has no rate_limits: a surge is logged and counted but nothing is tightened".into(),
        });
    }
    Ok(compiled)
}

/// The `Adaptive` stage: counts the request against its route's rate and baseline, logs
/// the switches this request made, and tightens the route's limits while it surges.
pub fn adaptive_stage(cfg: &Config, _req: &Request, ex: &mut Exchange, env: &Env) -> Step {
    let Some(a) = ex.policy(cfg).and_then(|p| p.adaptive.as_ref()) else {
        return Step::Next;
    };
    let seen = a.observe(env.store, env.now_ms);
    if seen.tightened {
        ex.adaptive_factor = a.cost_factor();
    }
    push_switches(cfg, ex, a, seen);
    Step::Next
}

/// Counts a 401 or 429 the route answered into its adaptive denial rate (the pipeline calls
/// it for every such local reply), logging a switch on if this denial made one.
pub fn adaptive_denial(cfg: &Config, ex: &mut Exchange, env: &Env, code: ErrorCode) {
    if !matches!(
        code,
        ErrorCode::MissingCredentials
            | ErrorCode::InvalidToken
            | ErrorCode::InvalidApiKey
            | ErrorCode::RateLimitExceeded
    ) {
        return;
    }
    let Some(a) = ex.policy(cfg).and_then(|p| p.adaptive.as_ref()) else {
        return;
    };
    let seen = a.observe_denial(env.store, env.now_ms);
    push_switches(cfg, ex, a, seen);
}

/// Logs and counts the switches one request made.
fn push_switches(
    cfg: &Config,
    ex: &mut Exchange,
    a: &adaptive::Adaptive,
    seen: adaptive::Observed,
) {
    for sw in seen.switches.into_iter().flatten() {
        let route = ex.route_name(cfg);
        let (event, message, extra): (&str, String, Vec<(&str, serde_json::Value)>) = match sw {
            adaptive::Switch::On {
                rate,
                baseline,
                denials,
            } => (
                "adaptive_on",
                format!(
                    "route '{route}' surged to {rate} {} in a second (baseline {baseline:.2}/s): limits tightened to {} for {} s",
                    if denials { "401/429 answers" } else { "requests" },
                    a.effective_share(),
                    a.cooldown_s
                ),
                vec![
                    ("trigger", if denials { "denials" } else { "requests" }.into()),
                    ("rate", rate.into()),
                    ("baseline", ((baseline * 100.0).round() / 100.0).into()),
                    ("surge_factor", a.surge_factor.into()),
                    ("tighten_to", a.effective_share().into()),
                    ("cooldown_s", a.cooldown_s.into()),
                ],
            ),
            adaptive::Switch::Off { tightened_ms } => (
                "adaptive_off",
                format!("route '{route}' limits restored after {} ms", tightened_ms),
                vec![("tightened_ms", tightened_ms.into())],
            ),
        };
        let line = crate::events::EventLine {
            event,
            route,
            policy: Some("adaptive"),
            client: ex.identity.as_ref().map(|i| i.client.as_str()),
            ip: ex.client_ip.as_deref(),
            request_id: ex.request_id.as_deref(),
            message: &message,
            extra: &extra,
        }
        .line();
        ex.events.push(line);
        match sw {
            adaptive::Switch::On { .. } => ex.adaptive.on = true,
            adaptive::Switch::Off { .. } => ex.adaptive.off = true,
        }
    }
}

/// The adaptive switches a request made, for counters (the glue reads and clears it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdaptiveState {
    pub on: bool,
    pub off: bool,
}

/// The pipeline stage: authenticated requests only.
pub fn stage(cfg: &Config, _req: &Request, ex: &mut Exchange, env: &Env) -> Step {
    let Some((ks, action)) = &cfg.abuse.key_sharing else {
        return Step::Next;
    };
    let Some(id) = &ex.identity else {
        return Step::Next;
    };
    let ip = ex.client_ip.as_deref().unwrap_or("");
    match ks.observe(env.store, &id.client, ip, env.now_ms) {
        Seen::Within => Step::Next,
        Seen::Untracked => {
            ex.abuse.untracked = true;
            Step::Next
        }
        Seen::Over { first } => {
            ex.abuse.over = true;
            let message = format!(
                "client '{}' was seen from more than {} addresses within {} s",
                id.client, ks.max_distinct_ips, ks.window_s
            );
            if first {
                let line = crate::events::EventLine {
                    event: "credential_abuse",
                    route: ex.route_name(cfg),
                    policy: Some("key_sharing"),
                    client: Some(&id.client),
                    ip: ex.client_ip.as_deref(),
                    request_id: ex.request_id.as_deref(),
                    message: &message,
                    extra: &[
                        ("action", action.as_str().into()),
                        ("max_distinct_ips", ks.max_distinct_ips.into()),
                        ("window_s", ks.window_s.into()),
                    ],
                }
                .line();
                ex.events.push(line);
            }
            match action {
                Action::Log => Step::Next,
                Action::Tighten => {
                    ex.tightened = true;
                    Step::Next
                }
                Action::Deny => Step::Reply(
                    LocalReply::new(ErrorCode::CredentialAbuse, message).with_policy("key_sharing"),
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config;
    use crate::pipeline::{on_request_headers, Env, Exchange, Request, Verdict};
    use crate::reply::ErrorCode;
    use crate::store::MemoryStore;

    const KEYS: &str = r#""api_keys":{"header":"x-api-key","keys":[{"id":"acme","sha256":"6f0f8db1716f1a7909f09fef4ef9730dbcaa99df6f63e5f832f2122b27af2335","tier":"pro"}]}"#;

    fn run(json: &str, ips: &[&str]) -> Vec<(Verdict, Exchange)> {
        let c = config::parse(json.as_bytes(), &|_| None).unwrap().0;
        let store = MemoryStore::new();
        c.abuse.prepare(&store).unwrap();
        c.rate_limiter.prepare(&store).unwrap();
        ips.iter()
            .map(|ip| {
                let headers = vec![
                    (":method".to_string(), "GET".to_string()),
                    (
                        "x-api-key".to_string(),
                        "k-acme-0123456789abcdef".to_string(),
                    ),
                ];
                let source = format!("{ip}:5000");
                let req = Request {
                    method: "GET",
                    path: "/x",
                    headers: &headers,
                    source_address: Some(&source),
                    route_name: None,
                };
                let env = Env {
                    now_ms: 1_700_000_400_000,
                    store: &store,
                };
                let mut ex = Exchange::default();
                let v = on_request_headers(&c, &req, &mut ex, &env);
                (v, ex)
            })
            .collect()
    }

    #[test]
    fn deny_refuses_new_addresses_past_the_allowance_and_reports_once() {
        let json = format!(
            r#"{{{KEYS},"abuse":{{"key_sharing":{{"max_distinct_ips":2,"action":"deny"}}}},
                "default_route":{{"auth":{{"mode":"required","methods":["api_key"]}}}}}}"#
        );
        let out = run(
            &json,
            &[
                "192.0.2.1",
                "192.0.2.2",
                "192.0.2.3",
                "192.0.2.4",
                "192.0.2.1",
            ],
        );
        let codes: Vec<_> = out
            .iter()
            .map(|(v, _)| match v {
                Verdict::Reply(r) => Some(r.code),
                _ => None,
            })
            .collect();
        assert_eq!(
            codes,
            [
                None,
                None,
                Some(ErrorCode::CredentialAbuse),
                Some(ErrorCode::CredentialAbuse),
                None
            ]
        );
        assert_eq!(out[2].1.events.len(), 1, "one event per client and window");
        assert!(out[2].1.events[0].contains("\"event\":\"api_guard.credential_abuse\""));
        assert!(out[3].1.events.is_empty());
        assert!(out[3].1.abuse.over);
    }

    #[test]
    fn tighten_halves_the_client_limits_for_the_request() {
        let json = format!(
            r#"{{{KEYS},"abuse":{{"key_sharing":{{"max_distinct_ips":1,"action":"tighten"}}}},
                "rate_limits":{{"c":{{"key":["client"],"capacity":4,"refill_tokens":1,"refill_period_s":3600}}}},
                "default_route":{{"auth":{{"mode":"required","methods":["api_key"]}},"rate_limits":["c"]}}}}"#
        );
        // 1 token from the known address, then 2 each from the others: 1 + 2 = 3, 3 + 2 > 4.
        let out = run(&json, &["192.0.2.1", "192.0.2.2", "192.0.2.3"]);
        assert!(matches!(out[0].0, Verdict::Forward(_)));
        assert!(matches!(out[1].0, Verdict::Forward(_)));
        match &out[2].0 {
            Verdict::Reply(r) => assert_eq!(r.code, ErrorCode::RateLimitExceeded),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn config_errors_name_the_path() {
        for (ks, path) in [
            (
                r#"{"max_distinct_ips":0}"#,
                "abuse.key_sharing.max_distinct_ips",
            ),
            (
                r#"{"max_distinct_ips":65}"#,
                "abuse.key_sharing.max_distinct_ips",
            ),
            (r#"{"action":"ban"}"#, "abuse.key_sharing.action"),
            (r#"{"prefix_v4":33}"#, "abuse.key_sharing.prefix_v4"),
            (r#"{"prefix_v6":8}"#, "abuse.key_sharing.prefix_v6"),
            (r#"{"window_s":0}"#, "abuse.key_sharing.window_s"),
            (
                r#"{"tracked_clients":1}"#,
                "abuse.key_sharing.tracked_clients",
            ),
            (r#"{"bogus":1}"#, "abuse.key_sharing"),
        ] {
            let json = format!(r#"{{"abuse":{{"key_sharing":{ks}}}}}"#);
            let e = config::parse(json.as_bytes(), &|_| None).unwrap_err();
            assert!(e.path.starts_with(path), "{ks}: {e}");
        }
    }

    #[test]
    fn adaptive_tightens_every_limit_of_a_surging_route_then_restores_them() {
        let json = r#"{"client_ip":{"xff_trusted_hops":1,"use_remote_address":false},
            "rate_limits":{"ip":{"key":["ip"],"capacity":4,"refill_tokens":4,"refill_period_s":3600}},
            "routes":[{"name":"login","match":{"prefix":"/"},"rate_limits":["ip"],
                       "adaptive":{"surge_factor":5,"baseline_s":2,"tighten_to":0.5,"cooldown_s":2}}]}"#;
        let c = config::parse(json.as_bytes(), &|_| None).unwrap().0;
        let store = MemoryStore::new();
        c.rate_limiter.prepare(&store).unwrap();
        super::Abuse::prepare_adaptive(&c, &store).unwrap();
        let t0 = 1_700_000_000_000u64;
        let go = |ip: &str, now_ms: u64| {
            let headers = vec![
                (":method".to_string(), "GET".to_string()),
                ("x-forwarded-for".to_string(), ip.to_string()),
            ];
            let req = Request {
                method: "GET",
                path: "/x",
                headers: &headers,
                source_address: Some("127.0.0.1:5000"),
                route_name: None,
            };
            let env = Env {
                now_ms,
                store: &store,
            };
            let mut ex = Exchange::default();
            let v = on_request_headers(&c, &req, &mut ex, &env);
            (matches!(v, Verdict::Forward(_)), ex)
        };
        // Baseline: 1 request a second for 3 s (floored at min_rps 1: threshold 5).
        for s in 0..3 {
            assert!(go(&format!("10.0.0.{s}"), t0 + s * 1000).0);
        }
        // "victim" has used 1 of 4 before the surge.
        assert!(go("10.1.1.1", t0 + 3000).0);
        // Distinct addresses in one second: the 6th request of the second surges (> 5).
        let mut on = Vec::new();
        for i in 0..6 {
            let (ok, ex) = go(&format!("10.2.0.{i}"), t0 + 3100 + i);
            assert!(ok);
            on.extend(ex.events.clone());
            assert_eq!(ex.adaptive.on, i == 4);
        }
        assert_eq!(on.len(), 1, "{on:?}");
        let v: serde_json::Value = serde_json::from_str(&on[0]).unwrap();
        assert_eq!(v["event"], "api_guard.adaptive_on");
        assert_eq!(v["route"], "login");
        assert_eq!(v["policy"], "adaptive");
        assert_eq!(v["ip"], "10.2.0.4");
        assert_eq!(
            v["rate"], 6,
            "the victim's request of that second counts too"
        );
        // Tightened: each request costs 2; the victim had 3 left: one passes, the next 429s
        // (it would have had 2 more at normal strength).
        assert!(go("10.1.1.1", t0 + 3500).0);
        let (ok, ex) = go("10.1.1.1", t0 + 3600);
        assert!(!ok);
        assert_eq!(ex.adaptive_factor, 2);
        // Every request of that second was over 5, so the cooldown runs 2 s from the last
        // (3600). Before: still tightened; after: one off event, cost 1.
        let (_, ex) = go("10.3.0.2", t0 + 5599);
        assert_eq!(ex.adaptive_factor, 2);
        let (ok, ex) = go("10.3.0.1", t0 + 5600);
        assert!(ok);
        assert!(ex.adaptive.off && ex.events.len() == 1, "{:?}", ex.events);
        assert!(ex.events[0].contains("\"event\":\"api_guard.adaptive_off\""));
        assert_eq!(ex.adaptive_factor, 0);
        let (ok, ex) = go("10.3.0.1", t0 + 5700);
        assert!(ok && ex.events.is_empty());
    }

    #[test]
    fn adaptive_config_errors_name_the_path_and_odd_shares_warn() {
        for (a, path) in [
            (r#"{"surge_factor":1}"#, "surge_factor"),
            (r#"{"surge_factor":1e9}"#, "surge_factor"),
            (r#"{"baseline_s":0}"#, "baseline_s"),
            (r#"{"cooldown_s":0}"#, "cooldown_s"),
            (r#"{"cooldown_s":100000}"#, "cooldown_s"),
            (r#"{"tighten_to":1}"#, "tighten_to"),
            (r#"{"tighten_to":0}"#, "tighten_to"),
            (r#"{"min_rps":0}"#, "min_rps"),
            (r#"{"bogus":1}"#, ""),
        ] {
            let json =
                format!(r#"{{"routes":[{{"name":"r","match":{{"prefix":"/"}},"adaptive":{a}}}]}}"#);
            let e = config::parse(json.as_bytes(), &|_| None).unwrap_err();
            assert!(
                e.path
                    .starts_with(format!("routes[0].adaptive.{path}").trim_end_matches('.')),
                "{a}: {e}"
            );
            let json = format!(r#"{{"default_route":{{"adaptive":{a}}}}}"#);
            let e = config::parse(json.as_bytes(), &|_| None).unwrap_err();
            assert!(e.path.starts_with("default_route.adaptive"), "{a}: {e}");
        }
        let json = r#"{"default_route":{"adaptive":{"tighten_to":0.3}}}"#;
        let (_, w) = config::parse(json.as_bytes(), &|_| None).unwrap();
        assert!(w
            .iter()
            .any(|w| w.path == "default_route.adaptive.tighten_to" && w.message.contains("0.25")));
        assert!(w
            .iter()
            .any(|w| w.path == "default_route.adaptive" && w.message.contains("no rate_limits")));
    }
}
