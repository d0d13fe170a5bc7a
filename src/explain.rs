//! `api-guard check --explain`: what a validated config does to a request, route by route, in
//! the order of SPEC section 3 (route → path checks → CORS preflight → per-IP/route limits →
//! credentials → scopes → key sharing → per-client limits → quota → webhook body check → forward), with the
//! request hygiene checks where the pipeline runs them (the declared body size and content
//! type after the CORS preflight; a body of unknown length, the `json_schema` check and the
//! backend ceiling last, before forwarding), and the settings each step applies. A reviewer reads this to see that a config does what its author
//! thinks; it is a pure function of the compiled config, so it cannot drift from what the
//! filter runs (the same `config::parse` builds both).

use crate::abuse::Action;
use crate::config::{AuthConfig, BackendCeilingConfig, Config, MatchConfig, Policy, RawConfig};
use crate::ratelimit::bucket::{Algorithm, BucketParams};
use crate::ratelimit::{KeyPart, Limit, LimitRule, TierRule, WhenFull};
use std::fmt::Write;

/// The steps of SPEC section 3 and the request hygiene checks, in pipeline order (the labels
/// of the numbered lines).
pub const STEPS: [&str; 14] = [
    "route",
    "path checks",
    "CORS preflight",
    "body size and content type",
    "per-IP/route limits",
    "credentials",
    "scopes",
    "key sharing",
    "per-client limits",
    "quota",
    "webhook body check",
    "body of unknown length, json_schema",
    "backend ceiling",
    "forward",
];

/// The explanation of a whole config: global settings, then each route in match order, the
/// default route, and what happens to a request no route matches.
pub fn explain(cfg: &Config) -> String {
    let mut out = String::new();
    global(cfg, &mut out);
    for (i, route) in cfg.routes.iter().enumerate() {
        let m = cfg.raw.routes.get(i).map(|r| &r.matcher);
        let head = format!("route {} \"{}\" (routes[{i}])", i + 1, route.name);
        let matched = m.map(describe_match).unwrap_or_default();
        let first = if i == 0 {
            format!("{matched}; routes are tried in order, the first match wins")
        } else {
            format!("{matched}; only if routes 1-{i} did not match (first match wins)")
        };
        let ceiling = cfg
            .raw
            .routes
            .get(i)
            .and_then(|r| r.backend_ceiling.as_ref());
        policy(cfg, &head, &first, &route.policy, ceiling, &mut out);
    }
    match &cfg.default_route {
        Some(p) => policy(
            cfg,
            "default_route",
            "a request that matches no route above",
            p,
            cfg.raw
                .default_route
                .as_ref()
                .and_then(|d| d.backend_ceiling.as_ref()),
            &mut out,
        ),
        None => {
            let _ = writeln!(out, "\nno route matched (there is no default_route):");
            let _ = writeln!(
                out,
                "  the request is forwarded after the path checks{}, with security headers; \
                 no credentials, no rate limit, no quota (`api-guard check` warns: add a \
                 default_route)",
                if cfg.cors.is_some() {
                    " and the CORS preflight"
                } else {
                    ""
                }
            );
        }
    }
    out
}

fn global(cfg: &Config, out: &mut String) {
    let raw = &cfg.raw;
    let _ = writeln!(out, "Every request:");
    let ip = if cfg.client_ip.xff_trusted_hops == 0 {
        "the downstream peer address (source.address)".to_string()
    } else {
        format!(
            "x-forwarded-for, address {} from the right (xff_trusted_hops {}, use_remote_address {})",
            cfg.client_ip.xff_trusted_hops,
            cfg.client_ip.xff_trusted_hops,
            cfg.client_ip.use_remote_address.unwrap_or(false)
        )
    };
    let _ = writeln!(out, "  client IP: {ip}");
    let names: Vec<&str> = cfg
        .security_headers
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    let _ = writeln!(
        out,
        "  response headers: {} (set when the upstream did not set them)",
        list_or(&names, "none (every default removed)")
    );
    let _ = writeln!(
        out,
        "  stripped from the client's request: {}",
        list_or(&cfg.stripped_request_headers, "nothing")
    );
    let _ = writeln!(
        out,
        "  path checks: matching runs on the normalized path (query dropped, `//` merged, \
         `.`/`..` resolved); %2F, %5C, `\\`, `..` above the root, a bad `%` and paths a \
         backend could read differently get 400 invalid_request"
    );
    if let Some(c) = &raw.cors {
        let origins: Vec<&str> = c
            .allow_origins
            .iter()
            .chain(&c.allow_origin_patterns)
            .map(String::as_str)
            .collect();
        let _ = writeln!(
            out,
            "  CORS: origins {}; methods {}; headers {}{}{}",
            list_or(&origins, "(none)"),
            list_or(&c.allow_methods, "(none)"),
            list_or(&c.allow_headers, "(none)"),
            if c.allow_credentials {
                "; with credentials"
            } else {
                ""
            },
            c.max_age_s
                .map(|s| format!("; max-age {s} s"))
                .unwrap_or_default()
        );
    }
    if !cfg.rate_limiter.limits.is_empty() {
        let _ = writeln!(
            out,
            "  rate limit tables: when every slot for a new key is busy, {}",
            match cfg.rate_limiter.when_full {
                WhenFull::Allow => "the request is admitted untracked (when_full allow)",
                WhenFull::Deny => "the request gets 429 (when_full deny)",
            }
        );
    }
    if !cfg.rate_limiter.limits.is_empty() {
        let _ = writeln!(
            out,
            "  near misses: one near_miss event when a key first reaches {} of a limit              (abuse.near_miss_ratio), at most one per key per fill time of the limit",
            cfg.rate_limiter.near_miss.ratio()
        );
    }
    if raw.routes.is_empty() && raw.default_route.is_none() {
        let _ = writeln!(out, "  no routes and no default_route");
    }
}

fn policy(
    cfg: &Config,
    head: &str,
    matched: &str,
    p: &Policy,
    ceiling: Option<&BackendCeilingConfig>,
    out: &mut String,
) {
    let _ = writeln!(out, "\n{head}:");
    let steps: [String; 14] = [
        matched.to_string(),
        "as every request (400 invalid_request on an ambiguous path)".to_string(),
        cors(cfg),
        declared_body(p),
        with_adaptive(limits(cfg, p, true), p),
        credentials(&cfg.raw, p.auth.as_ref()),
        scopes(p.auth.as_ref()),
        key_sharing(cfg),
        limits(cfg, p, false),
        quota(&cfg.raw, p),
        webhook(&cfg.raw, p.webhook.as_deref()),
        unknown_length_body(p),
        backend_ceiling(ceiling),
        forward(cfg, p),
    ];
    for (i, (label, text)) in STEPS.iter().zip(steps).enumerate() {
        let mut lines = text.lines();
        let _ = writeln!(
            out,
            "  {:>2}. {label}: {}",
            i + 1,
            lines.next().unwrap_or("")
        );
        for l in lines {
            let _ = writeln!(out, "        {l}");
        }
    }
}

fn list_or<S: AsRef<str>>(items: &[S], none: &str) -> String {
    if items.is_empty() {
        none.to_string()
    } else {
        items
            .iter()
            .map(AsRef::as_ref)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn describe_match(m: &MatchConfig) -> String {
    let methods = match &m.methods {
        Some(ms) => ms.join("|"),
        None => "any method".to_string(),
    };
    let path = if let Some(p) = &m.path {
        format!("path = {p}")
    } else if let Some(p) = &m.prefix {
        format!("path under {p} (segment-aware prefix)")
    } else if let Some(t) = &m.template {
        format!("path template {t}")
    } else if let Some(n) = &m.route_name {
        format!("Envoy route name = {n}")
    } else {
        "any path".to_string()
    };
    format!("{methods}, {path}")
}

fn cors(cfg: &Config) -> String {
    if cfg.cors.is_none() {
        return "skipped (no `cors` section: OPTIONS requests are handled like any other)".into();
    }
    "an OPTIONS with origin and access-control-request-method is answered here: 204 when \
     CORS (above) allows it, else 403 cors_rejected"
        .into()
}

fn declared_body(p: &Policy) -> String {
    let h = p.hygiene.as_ref();
    let mut checks = Vec::new();
    if let Some(n) = h.and_then(|h| h.max_body_bytes) {
        checks.push(format!(
            "a declared content-length over {n} bytes: 413 payload_too_large (nothing read)"
        ));
    }
    if let Some(h) = h.filter(|h| !h.content_types.is_empty()) {
        let ranges: Vec<String> = h.content_types.iter().map(|r| r.to_string()).collect();
        checks.push(format!(
            "a body's content type must be one of {} (parameters ignored; none, or another: \
             415 unsupported_media_type)",
            ranges.join(", ")
        ));
    }
    if checks.is_empty() {
        "none (no max_body_bytes or content_types)".into()
    } else {
        checks.join("\n")
    }
}

fn unknown_length_body(p: &Policy) -> String {
    let h = p.hygiene.as_ref();
    let Some(n) = h.and_then(|h| h.max_body_bytes) else {
        return "skipped (no max_body_bytes)".into();
    };
    let mut text = format!(
        "a body without content-length (chunked) is held and counted: over {n} bytes, 413 \
         payload_too_large before any byte is forwarded"
    );
    if let Some(s) = h.and_then(|h| h.json_schema.as_ref()) {
        let _ = write!(
            text,
            "\nevery non-empty body is held to its end and must be JSON (no duplicate keys) \
             satisfying json_schema (draft {}), whatever its content-type: otherwise 400 \
             invalid_request naming the failing JSON pointer and keyword",
            s.draft
        );
    }
    text
}

fn backend_ceiling(c: Option<&BackendCeilingConfig>) -> String {
    let Some(c) = c else {
        return "skipped (no backend_ceiling)".into();
    };
    let mut caps = Vec::new();
    if let Some(r) = c.max_rps {
        caps.push(format!("{r} requests per second"));
    }
    if let Some(n) = c.max_in_flight {
        caps.push(format!(
            "{n} in flight (a request counts until its stream ends, at most {} s)",
            c.in_flight_expiry_s
                .unwrap_or(crate::hygiene::ceiling::DEFAULT_EXPIRY_S)
        ));
    }
    format!(
        "at most {} across all clients and workers; over it: 503 backend_overloaded with \
         retry-after",
        caps.join(" and ")
    )
}

fn key(parts: &[KeyPart]) -> String {
    parts
        .iter()
        .map(|p| match p {
            KeyPart::Ip => "ip".to_string(),
            KeyPart::Client => "client".to_string(),
            KeyPart::Route => "route".to_string(),
            KeyPart::Tier => "tier".to_string(),
            KeyPart::Header(h) => format!("header:{h}"),
            KeyPart::Claim(c) => format!("claim:{c}"),
        })
        .collect::<Vec<_>>()
        .join("+")
}

fn bucket(b: &BucketParams) -> String {
    match b.algorithm() {
        Algorithm::TokenBucket => format!(
            "{} tokens, refill {} per {} s",
            b.capacity(),
            b.refill_tokens(),
            b.refill_period_s()
        ),
        Algorithm::FixedWindow => format!(
            "{} per {} s, fixed window (UTC-aligned)",
            b.capacity(),
            b.refill_period_s()
        ),
        Algorithm::SlidingWindow => format!(
            "{} per {} s, sliding window",
            b.capacity(),
            b.refill_period_s()
        ),
    }
}

fn key_sharing(cfg: &Config) -> String {
    let Some((k, action)) = &cfg.abuse.key_sharing else {
        return "skipped (no abuse.key_sharing)".into();
    };
    let over = match action {
        Action::Log => "logged (one credential_abuse event per client and window)",
        Action::Deny => "403 credential_abuse",
        Action::Tighten => "per-client limits at half strength for the request",
    };
    format!(
        "authenticated clients: at most {} addresses (IPv4 /{}, IPv6 /{}) per {} s; a new address over it: {over}",
        k.max_distinct_ips, k.prefix_v4, k.prefix_v6, k.window_s
    )
}

/// A limit's numbers: one line for a fixed bucket, one line per tier otherwise.
fn rule(r: &LimitRule) -> Vec<String> {
    match r {
        LimitRule::Fixed(b) => vec![bucket(b)],
        LimitRule::Tiered { tiers, default } => {
            let one = |t: &TierRule| match t {
                TierRule::Unlimited => "unlimited".to_string(),
                TierRule::Bucket(b) => bucket(b),
            };
            let mut lines: Vec<String> = tiers
                .iter()
                .map(|(name, t)| format!("  tier {name}: {}", one(t)))
                .collect();
            lines.push(match default {
                Some(t) => format!("  any other tier: {}", one(t)),
                None => "  any other tier: not limited".to_string(),
            });
            lines
        }
    }
}

fn limit_lines(l: &Limit, cost: u64, out: &mut Vec<String>) {
    let effect = if l.shadow {
        "SHADOW: counted and logged, never denies"
    } else {
        "over it: 429 rate_limit_exceeded"
    };
    let head = format!("{} (key {}, cost {cost}; {effect})", l.name, key(&l.key));
    let mut numbers = rule(&l.rule);
    if numbers.len() == 1 && !numbers[0].starts_with(' ') {
        out.push(format!("{head}: {}", numbers.remove(0)));
    } else {
        out.push(format!("{head}, per tier:"));
        out.extend(numbers);
    }
    if let Some(e) = &l.exempt {
        out.push(format!("  exempt: {}", e.describe()));
    }
}

fn limits(cfg: &Config, p: &Policy, pre: bool) -> String {
    let plan = &p.limits;
    let ids = if pre { &plan.pre_auth } else { &plan.post_auth };
    let mut lines = Vec::new();
    for l in ids.iter().filter_map(|i| cfg.rate_limiter.limits.get(*i)) {
        limit_lines(l, plan.cost, &mut lines);
    }
    if let (false, Some(e)) = (lines.is_empty(), &plan.exempt) {
        lines.push(format!("route exempt from these: {}", e.describe()));
    }
    if lines.is_empty() {
        return if pre {
            "none (no limit keyed on ip, route or headers only)".into()
        } else {
            "none (no limit keyed on client, tier or claims)".into()
        };
    }
    lines.join("\n")
}

/// The route's `adaptive` tightening, shown with the first limit step (it is counted just
/// before it and applies to both limit steps).
fn with_adaptive(text: String, p: &Policy) -> String {
    let Some(a) = &p.adaptive else {
        return text;
    };
    format!(
        "{text}\nadaptive: the route's requests are counted first; when a second holds more than {} x max(baseline, {}/s) (baseline: mean rate over {} s, judged after {} s of learning, frozen while tightened), every limit of the route (here and per-client) takes {}x the cost, i.e. tightened to {} (tighten_to {}), until {} s after the last surging request; adaptive_on / adaptive_off events",
        a.surge_factor,
        a.min_rps,
        a.baseline_s,
        a.warmup_s(),
        a.cost_factor(),
        a.effective_share(),
        a.tighten_to,
        a.cooldown_s
    )
}

fn jwt_method(raw: &RawConfig, provider: &str) -> String {
    let Some(p) = raw.jwt_providers.get(provider) else {
        return format!("jwt:{provider}");
    };
    let mut keys = Vec::new();
    if let Some(local) = &p.local_jwks {
        let n = local
            .get("keys")
            .and_then(|k| k.as_array())
            .map_or(0, Vec::len);
        keys.push(format!("{n} local key{}", if n == 1 { "" } else { "s" }));
    }
    if let Some(r) = &p.remote_jwks {
        keys.push(format!(
            "remote JWKS {} via cluster {} (refresh {} s)",
            r.path, r.cluster, r.refresh_s
        ));
    }
    let mut s = format!(
        "jwt:{provider}: Authorization: Bearer, {}, issuer {}, audiences {}, {}, exp {}, skew {} s",
        p.algorithms.join("|"),
        p.issuer.as_deref().unwrap_or("any"),
        list_or(&p.audiences, "any"),
        keys.join(" + "),
        if p.require_exp {
            "required"
        } else {
            "optional"
        },
        p.clock_skew_s
    );
    if let Some(t) = &p.tier_claim {
        let _ = write!(s, ", tier from claim {t}");
    }
    s
}

fn credentials(raw: &RawConfig, auth: Option<&AuthConfig>) -> String {
    let Some(a) = auth else {
        return "skipped (no `auth`: no credential is checked, every request is anonymous)".into();
    };
    let methods: Vec<String> = a
        .methods
        .iter()
        .map(|m| match m.strip_prefix("jwt:") {
            Some(p) => jwt_method(raw, p),
            None if m == "api_key" => {
                let (header, n) = raw
                    .api_keys
                    .as_ref()
                    .map_or(("x-api-key", 0), |k| (k.header.as_str(), k.keys.len()));
                format!(
                    "api_key: header {header}, {n} key{}",
                    if n == 1 { "" } else { "s" }
                )
            }
            None => m.clone(),
        })
        .collect();
    let accepted = format!(
        "a bad one: 401 invalid_token / invalid_api_key; the first present of:\n  {}",
        methods.join("\n  ")
    );
    match a.mode.as_str() {
        "none" => "skipped (auth.mode none: no credential is checked)".into(),
        "optional" => format!("optional: checked when present, none = anonymous; {accepted}"),
        _ => format!("required: none presented: 401 missing_credentials; {accepted}"),
    }
}

fn scopes(auth: Option<&AuthConfig>) -> String {
    let Some(a) = auth.filter(|a| a.mode != "none") else {
        return "skipped (no credentials checked)".into();
    };
    let mut rules = Vec::new();
    if !a.scopes_all.is_empty() {
        rules.push(format!("all of scopes {}", a.scopes_all.join(", ")));
    }
    if !a.scopes_any.is_empty() {
        rules.push(format!("one of scopes {}", a.scopes_any.join(", ")));
    }
    if !a.roles_any.is_empty() {
        rules.push(format!("one of roles {}", a.roles_any.join(", ")));
    }
    if rules.is_empty() {
        return "none (any verified credential passes)".into();
    }
    let anonymous = if a.mode == "optional" {
        " (an anonymous request has none)"
    } else {
        ""
    };
    format!(
        "needs {}{anonymous}; else 403 insufficient_scope",
        rules.join(" and ")
    )
}

fn quota(raw: &RawConfig, p: &Policy) -> String {
    let Some(q) = raw.quota.as_ref().filter(|_| p.quota) else {
        return "skipped (route has no \"quota\": true)".into();
    };
    let failure = if q.failure_mode == "deny" {
        "deny: 503 quota_unavailable"
    } else {
        "allow: the request goes on"
    };
    let call = if q.mode == "lease" {
        "units from a lease held by this Envoy (refreshed in the background); without one, \
         POST /v1/lease"
    } else {
        "POST /v1/check"
    };
    format!(
        "{call} to cluster {} (authority {}), cost {}, timeout {} ms; its answer may \
         be 429 rate_limit_exceeded or 402 quota_exceeded\non timeout, error or open breaker: \
         failure_mode {failure}; breaker opens after {} failures in a row per worker, for {} ms",
        q.cluster,
        q.authority.as_deref().unwrap_or(&q.cluster),
        p.cost,
        q.timeout_ms,
        q.breaker.failures,
        q.breaker.open_ms
    )
}

fn webhook(raw: &RawConfig, name: Option<&str>) -> String {
    let Some(name) = name else {
        return "skipped (no webhook)".into();
    };
    let Some(w) = raw.webhooks.get(name) else {
        return format!("webhook {name}");
    };
    let signature = match w.scheme.as_str() {
        "github" => "x-hub-signature-256 (HMAC-SHA256 of the body)",
        "stripe" => "stripe-signature (HMAC-SHA256 of t.body)",
        "standard" => "webhook-id/-timestamp/-signature (Standard Webhooks)",
        "slack" => "x-slack-signature (HMAC-SHA256 of v0:ts:body)",
        other => other,
    };
    let timed = if w.scheme == "github" {
        String::new()
    } else {
        format!(", tolerance {} s, replays refused", w.tolerance_s)
    };
    format!(
        "{name}: scheme {}, {signature}, {} secret{}{timed}\nthe body is held until verified \
         (nothing reaches the upstream before); over {} bytes: 413 payload_too_large; bad \
         signature: 401 invalid_signature",
        w.scheme,
        w.secrets.len(),
        if w.secrets.len() == 1 { "" } else { "s" },
        w.max_body_bytes
    )
}

fn forward(cfg: &Config, p: &Policy) -> String {
    let ih = &cfg.identity_headers;
    let authenticated = p.auth.as_ref().is_some_and(|a| a.mode != "none");
    let mut s = if authenticated {
        format!(
            "to the upstream with {}, {}, {}, {} set from the verified identity",
            ih.subject, ih.client, ih.tier, ih.scopes
        )
    } else {
        "to the upstream, with no identity headers (they are stripped from the client's request)"
            .to_string()
    };
    if authenticated {
        let claims: Vec<String> = p
            .auth
            .iter()
            .flat_map(|a| &a.methods)
            .filter_map(|m| m.strip_prefix("jwt:"))
            .filter_map(|prov| cfg.raw.jwt_providers.get(prov))
            .flat_map(|j| &j.forward_claims)
            .map(|(c, h)| format!("claim {c} as {h}"))
            .collect();
        if !claims.is_empty() {
            let _ = write!(s, ", {}", claims.join(", "));
        }
    }
    s.push_str("; x-request-id added when absent");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn explain_json(json: &str) -> String {
        let env = |name: &str| (name == "HOOK_SECRET").then(|| "s3cret".to_string());
        let (cfg, _) = crate::config::parse(json.as_bytes(), &env).expect("valid config");
        explain(&cfg)
    }

    /// The numbered steps of one route's block, as (label, text) pairs; a step's
    /// continuation lines are joined to its text with newlines.
    fn block(out: &str, head: &str) -> Vec<(String, String)> {
        let start = out
            .find(&format!("\n{head}"))
            .unwrap_or_else(|| panic!("no block {head} in\n{out}"));
        let body = &out[start + 1..];
        let end = body[1..].find("\n\n").map_or(body.len(), |e| e + 1);
        let mut steps: Vec<(String, String)> = Vec::new();
        for l in body[..end].lines().skip(1) {
            let numbered = l
                .trim_start()
                .split_once(". ")
                .filter(|(n, _)| n.parse::<u32>().is_ok())
                .and_then(|(_, rest)| rest.split_once(": "));
            match (numbered, steps.last_mut()) {
                (Some((label, text)), _) => steps.push((label.into(), text.into())),
                (None, Some(last)) => {
                    last.1.push('\n');
                    last.1.push_str(l.trim());
                }
                (None, None) => panic!("text before the first step: {l}"),
            }
        }
        steps
    }

    const FULL: &str = r#"{
      "api_keys": {"keys": [{"id": "a", "sha256": "7b340101426eaa6810ee547503b923bfd895a40cd62b1e52686bf8ffaa8d6e36", "tier": "pro", "scopes": ["read"]}]},
      "rate_limits": {
        "per-ip": {"key": ["ip"], "capacity": 5, "refill_tokens": 5, "refill_period_s": 60},
        "per-client": {"key": ["client", "route"], "tiers": {
          "anonymous": {"capacity": 15, "refill_tokens": 10, "refill_period_s": 60},
          "internal": "unlimited"}},
        "probe": {"key": ["header:x-tenant"], "capacity": 100, "refill_tokens": 1, "refill_period_s": 1, "shadow": true}
      },
      "cors": {"allow_origins": ["https://app.example.com"], "allow_credentials": true, "max_age_s": 600},
      "webhooks": {"gh": {"scheme": "github", "secrets": [{"env": "HOOK_SECRET"}], "max_body_bytes": 4096}},
      "quota": {"cluster": "quota", "timeout_ms": 80, "failure_mode": "deny"},
      "routes": [
        {"name": "login", "match": {"methods": ["POST"], "path": "/login"},
         "auth": {"mode": "none"}, "rate_limits": ["per-ip", "probe"]},
        {"name": "orders", "match": {"prefix": "/api/orders"},
         "auth": {"mode": "required", "methods": ["api_key"], "scopes_all": ["read"]},
         "rate_limits": ["per-ip", "per-client"], "cost": 3, "quota": true,
         "max_body_bytes": 2048, "content_types": ["application/json", "text/*"],
         "backend_ceiling": {"max_rps": 50, "max_in_flight": 8}},
        {"name": "hook", "match": {"methods": ["POST"], "template": "/hooks/{id}"},
         "auth": {"mode": "none"}, "webhook": "gh"}
      ],
      "default_route": {"auth": {"mode": "optional", "methods": ["api_key"]}}
    }"#;

    #[test]
    fn every_block_lists_the_spec_steps_in_order() {
        let out = explain_json(FULL);
        for head in [
            "route 1 \"login\"",
            "route 2 \"orders\"",
            "route 3 \"hook\"",
            "default_route",
        ] {
            let labels: Vec<String> = block(&out, head).into_iter().map(|(l, _)| l).collect();
            assert_eq!(labels, STEPS, "{head} in\n{out}");
        }
    }

    #[test]
    fn limits_are_split_before_and_after_credentials_with_their_numbers() {
        let out = explain_json(FULL);
        let orders = block(&out, "route 2 \"orders\"");
        let pre = &orders[4].1;
        let post = &orders[8].1;
        assert_eq!(
            pre,
            "per-ip (key ip, cost 3; over it: 429 rate_limit_exceeded): 5 tokens, refill 5 per 60 s"
        );
        assert!(!pre.contains("per-client"), "{pre}");
        assert_eq!(
            post,
            "per-client (key client+route, cost 3; over it: 429 rate_limit_exceeded), per tier:\n\
             tier anonymous: 15 tokens, refill 10 per 60 s\n\
             tier internal: unlimited\n\
             any other tier: not limited"
        );
        let login = block(&out, "route 1 \"login\"");
        assert_eq!(
            login[4].1,
            "per-ip (key ip, cost 1; over it: 429 rate_limit_exceeded): 5 tokens, refill 5 per 60 s\n\
             probe (key header:x-tenant, cost 1; SHADOW: counted and logged, never denies): \
             100 tokens, refill 1 per 1 s"
        );
    }

    #[test]
    fn credentials_scopes_quota_and_webhook_show_their_settings() {
        let out = explain_json(FULL);
        let orders = block(&out, "route 2 \"orders\"");
        assert!(orders[0]
            .1
            .starts_with("any method, path under /api/orders"));
        assert!(orders[0].1.contains("only if routes 1-1 did not match"));
        assert_eq!(
            orders[5].1,
            "required: none presented: 401 missing_credentials; a bad one: 401 invalid_token / \
             invalid_api_key; the first present of:\napi_key: header x-api-key, 1 key"
        );
        assert_eq!(
            orders[6].1,
            "needs all of scopes read; else 403 insufficient_scope"
        );
        assert!(
            orders[9].1.starts_with(
                "units from a lease held by this Envoy (refreshed in the background); without \
                 one, POST /v1/lease to cluster quota (authority quota), cost 3, timeout 80 ms"
            ),
            "{}",
            orders[9].1
        );
        assert!(out.contains("failure_mode deny: 503 quota_unavailable; breaker opens after 3 failures in a row per worker, for 5000 ms"), "{out}");
        assert!(orders[13].1.contains("x-auth-subject"));
        let hook = block(&out, "route 3 \"hook\"");
        assert!(hook[0].1.starts_with("POST, path template /hooks/{id}"));
        assert!(hook[5].1.starts_with("skipped (auth.mode none"));
        assert_eq!(hook[9].1, "skipped (route has no \"quota\": true)");
        assert!(hook[10].1.starts_with(
            "gh: scheme github, x-hub-signature-256 (HMAC-SHA256 of the body), 1 secret"
        ));
        assert!(out.contains("over 4096 bytes: 413 payload_too_large"));
        assert!(!out.contains("s3cret"), "secrets never appear: {out}");
        let default = block(&out, "default_route");
        assert!(default[5].1.starts_with("optional: checked when present"));
        assert_eq!(default[6].1, "none (any verified credential passes)");
        assert!(default[2].1.contains("204 when CORS (above) allows it"));
        assert!(out.contains(
            "\n  CORS: origins https://app.example.com; methods GET, HEAD, POST; headers (none); \
             with credentials; max-age 600 s\n"
        ));
    }

    #[test]
    fn request_hygiene_shows_where_the_pipeline_runs_it() {
        let out = explain_json(FULL);
        let orders = block(&out, "route 2 \"orders\"");
        assert_eq!(
            orders[3].1,
            "a declared content-length over 2048 bytes: 413 payload_too_large (nothing read)\n\
             a body's content type must be one of application/json, text/* (parameters \
             ignored; none, or another: 415 unsupported_media_type)"
        );
        assert!(orders[11]
            .1
            .contains("over 2048 bytes, 413 payload_too_large"));
        assert_eq!(
            orders[12].1,
            "at most 50 requests per second and 8 in flight (a request counts until its stream \
             ends, at most 300 s) across all clients and workers; over it: 503 \
             backend_overloaded with retry-after"
        );
        let login = block(&out, "route 1 \"login\"");
        assert_eq!(login[3].1, "none (no max_body_bytes or content_types)");
        assert_eq!(login[11].1, "skipped (no max_body_bytes)");
        assert_eq!(login[12].1, "skipped (no backend_ceiling)");
    }

    #[test]
    fn a_json_schema_route_shows_its_body_check() {
        let out = explain_json(
            r#"{"routes": [{"name": "orders", "match": {"path": "/orders"},
                "json_schema": {"$schema": "http://json-schema.org/draft-07/schema#",
                                "type": "object"}}]}"#,
        );
        let orders = block(&out, "route 1 \"orders\"");
        assert_eq!(orders[11].0, "body of unknown length, json_schema");
        assert!(
            orders[3].1.contains("over 1048576 bytes: 413"),
            "the default cap of a json_schema route: {out}"
        );
        assert!(
            orders[11].1.contains(
                "must be JSON (no duplicate keys) satisfying json_schema (draft 7), whatever its \
                 content-type: otherwise 400 invalid_request naming the failing JSON pointer"
            ),
            "{out}"
        );
    }

    #[test]
    fn a_route_without_auth_and_the_missing_default_route_are_spelled_out() {
        let out = explain_json(
            r#"{"routes": [{"name": "open", "match": {"path": "/x"}}],
                "security_headers": {"x-frame-options": null}}"#,
        );
        let open = block(&out, "route 1 \"open\"");
        assert!(open[5].1.starts_with("skipped (no `auth`"), "{out}");
        assert!(open[2].1.starts_with("skipped (no `cors` section"));
        assert!(out.contains("\nno route matched (there is no default_route):\n  the request is forwarded after the path checks, with security headers; no credentials"), "{out}");
        assert!(
            !out.contains("x-frame-options"),
            "removed header listed:\n{out}"
        );
        assert!(out.contains("client IP: the downstream peer address"));
    }

    #[test]
    fn the_output_is_deterministic() {
        assert_eq!(explain_json(FULL), explain_json(FULL));
    }

    #[test]
    fn windows_exemptions_and_key_sharing_are_shown() {
        let out = explain_json(
            r#"{
          "api_keys": {"header": "x-api-key", "keys": [{"id": "a", "sha256": "6f0f8db1716f1a7909f09fef4ef9730dbcaa99df6f63e5f832f2122b27af2335"}]},
          "abuse": {"key_sharing": {"max_distinct_ips": 5, "action": "deny"}},
          "rate_limits": {
            "m": {"key": ["ip"], "algorithm": "sliding_window", "limit": 100, "window_s": 60,
                  "exempt": {"cidrs": ["10.0.0.0/8"]}},
            "d": {"key": ["client"], "algorithm": "fixed_window", "limit": 5000, "window_s": 86400}},
          "routes": [{"name": "api", "match": {"prefix": "/api"}, "rate_limits": ["m", "d"],
                      "exempt": {"clients": ["svc"]},
                      "auth": {"mode": "required", "methods": ["api_key"]}}],
          "default_route": {"auth": {"mode": "none"}}
        }"#,
        );
        let api = block(&out, "route 1 \"api\"");
        assert_eq!(
            api[4].1,
            "none (no limit keyed on ip, route or headers only)"
        );
        assert_eq!(
            api[7].1,
            "authenticated clients: at most 5 addresses (IPv4 /32, IPv6 /64) per 600 s; a new \
             address over it: 403 credential_abuse"
        );
        assert_eq!(
            api[8].1,
            "m (key ip, cost 1; over it: 429 rate_limit_exceeded): 100 per 60 s, sliding window\n\
             exempt: cidrs 10.0.0.0/8\n\
             d (key client, cost 1; over it: 429 rate_limit_exceeded): 5000 per 86400 s, fixed \
             window (UTC-aligned)\n\
             route exempt from these: clients svc"
        );
    }

    #[test]
    fn adaptive_settings_and_the_near_miss_ratio_are_shown() {
        let out = explain_json(
            r#"{
          "abuse": {"near_miss_ratio": 0.9},
          "rate_limits": {"ip": {"key": ["ip"], "capacity": 10, "refill_tokens": 10, "refill_period_s": 60}},
          "routes": [{"name": "login", "match": {"prefix": "/login"}, "rate_limits": ["ip"],
                      "adaptive": {"surge_factor": 8, "baseline_s": 300, "tighten_to": 0.25, "cooldown_s": 120}}],
          "default_route": {"auth": {"mode": "none"}}
        }"#,
        );
        assert!(
            out.contains(
                "near misses: one near_miss event when a key first reaches 0.9 of a limit"
            ),
            "{out}"
        );
        let login = block(&out, "route 1 \"login\"");
        assert_eq!(
            login[4].1,
            "ip (key ip, cost 1; over it: 429 rate_limit_exceeded): 10 tokens, refill 10 per 60 s\n\
             adaptive: the route's requests are counted first; when a second holds more than 8 x \
             max(baseline, 1/s) (baseline: mean rate over 300 s, judged after 60 s of learning, \
             frozen while tightened), every limit of the route (here and per-client) takes 4x \
             the cost, i.e. tightened to 0.25 (tighten_to 0.25), until 120 s after the last \
             surging request; adaptive_on / adaptive_off events"
        );
        let default = block(&out, "default_route");
        assert!(!default[4].1.contains("adaptive"));
    }
}
