//! The filter's side of the quota service (SPEC sections 2, 3 and 5): building the
//! `POST /v1/check` callout, reading its answer, applying it to the request, and a circuit
//! breaker so that while the service is down requests are not each delayed by the timeout.
//!
//! Pure logic: the glue (`filter/http.rs`) performs the callout and owns the breaker (one per
//! worker VM: exactness across workers is not needed to stop hammering a dead service, and a
//! per-VM breaker costs no shared-data lock).

use crate::config::{BreakerConfig, Config};
use crate::pipeline::{Env, Exchange, Request, Step, Wait};
use crate::quota_lease::{self, Grant, Owner, Take};
use crate::reply::{ErrorCode, LocalReply};
use serde::Deserialize;

/// Largest answer body read from the service; a check answer is a few hundred bytes.
pub const MAX_ANSWER_BYTES: usize = 16 * 1024;
/// At most this many headers are copied from an answer to the client's response.
const MAX_ANSWER_HEADERS: usize = 16;

/// The callout the glue performs for the quota stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaCall {
    /// `/v1/check`, or `/v1/lease` in lease mode.
    pub path: &'static str,
    pub cluster: String,
    pub authority: String,
    pub body: Vec<u8>,
    pub timeout_ms: u64,
}

impl QuotaCall {
    /// Request headers for `dispatch_http_call`.
    pub fn headers(&self) -> [(&str, &str); 4] {
        [
            (":method", "POST"),
            (":path", self.path),
            (":authority", self.authority.as_str()),
            ("content-type", "application/json"),
        ]
    }
}

/// What came of the callout, stored in the [`Exchange`] by the glue.
#[derive(Debug, Clone, PartialEq)]
pub enum QuotaOutcome {
    Answered(Answer),
    /// Timeout, reset, bad status or unreadable answer, or the breaker is open.
    Failed(String),
}

/// The service's decision.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Allow {
        remaining: Option<u64>,
        headers: Vec<(String, String)>,
        /// The lease granted (`/v1/lease` answers only).
        lease: Option<Grant>,
    },
    Deny {
        status: u32,
        code: ErrorCode,
        message: String,
        retry_after_s: Option<u64>,
        reset_at: Option<String>,
        headers: Vec<(String, String)>,
    },
}

#[derive(Deserialize)]
struct RawAnswer {
    allowed: bool,
    status: Option<u32>,
    error: Option<String>,
    message: Option<String>,
    retry_after_s: Option<u64>,
    reset_at: Option<String>,
    remaining: Option<u64>,
    #[serde(default)]
    headers: serde_json::Map<String, serde_json::Value>,
    granted: Option<u64>,
    lease_id: Option<String>,
    expires_at_ms: Option<u64>,
}

/// Whether a header named in an answer may reach the client's response: only what the
/// service documents (quota/README.md), the service bucket's rate-limit headers and its own
/// `x-quota-*` ones. Everything else is dropped, so a misbehaving or compromised service
/// cannot weaken the response: no security headers (`strict-transport-security`,
/// `x-frame-options`, ...), no `access-control-*` (that would widen the CORS policy), no
/// `vary`, cookies, caching, framing or identity headers. `retry-after` is set by the filter
/// itself from `retry_after_s`, so it always agrees with the body.
fn header_name_ok(s: &str) -> bool {
    RATELIMIT_HEADERS.contains(&s)
        || s.strip_prefix("x-quota-").is_some_and(|rest| {
            !rest.is_empty()
                && rest.len() <= 48
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

fn header_value_ok(s: &str) -> bool {
    s.len() <= 512 && s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// Reads the service's answer. Anything unexpected is an error, which the filter treats like
/// an unreachable service (`failure_mode`).
pub fn parse_answer(status: u32, body: &[u8]) -> Result<Answer, String> {
    if status != 200 {
        return Err(format!("quota service answered HTTP {status}"));
    }
    if body.len() > MAX_ANSWER_BYTES {
        return Err("quota service answer too large".into());
    }
    // UTF-8 first: serde_json skips the strings of unknown members without checking them, so
    // `from_slice` alone took a body that is not JSON (found by fuzzing, docs/FUZZING.md).
    let text = std::str::from_utf8(body).map_err(|_| "quota answer is not UTF-8".to_string())?;
    let raw: RawAnswer =
        serde_json::from_str(text).map_err(|e| format!("unreadable quota answer: {e}"))?;
    // Filter, then cap: names the filter drops do not crowd out the ones it keeps (the map
    // itself is bounded by MAX_ANSWER_BYTES).
    let headers: Vec<(String, String)> = raw
        .headers
        .iter()
        .filter_map(|(k, v)| {
            let v = v.as_str()?;
            (header_name_ok(k) && header_value_ok(v)).then(|| (k.clone(), v.to_string()))
        })
        .take(MAX_ANSWER_HEADERS)
        .collect();
    if raw.allowed {
        let lease = match (raw.granted, raw.lease_id, raw.expires_at_ms) {
            (Some(granted), Some(id), Some(expires_at_ms)) => {
                if id.is_empty()
                    || id.len() > 128
                    || !id.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b'"')
                {
                    return Err("quota lease answer with an unusable lease_id".into());
                }
                Some(Grant {
                    id,
                    granted,
                    expires_at_ms,
                })
            }
            (None, None, None) => None,
            _ => return Err("quota lease answer with a partial lease".into()),
        };
        return Ok(Answer::Allow {
            remaining: raw.remaining,
            headers,
            lease,
        });
    }
    let (status, code) = match (raw.status, raw.error.as_deref()) {
        (Some(402), _) => (402, ErrorCode::QuotaExceeded),
        (Some(429), _) => (429, ErrorCode::RateLimitExceeded),
        (s, e) => {
            return Err(format!(
                "quota denial with unexpected status {s:?} / error {e:?}"
            ))
        }
    };
    // What the SPEC's reply must carry: a 429 says when to retry (`retry_after`, at least
    // 1 s, as the service itself rounds), a 402 when the quota resets (`reset_at`). A denial
    // without it is a broken answer, handled like any other (`failure_mode`).
    let retry_after_s = raw.retry_after_s.map(|s| s.max(1));
    if status == 429 && retry_after_s.is_none() {
        return Err("quota 429 denial without retry_after_s".into());
    }
    let reset_at = raw
        .reset_at
        .filter(|r| !r.is_empty() && r.len() <= 64 && r.bytes().all(|b| (0x21..0x7f).contains(&b)));
    if status == 402 && reset_at.is_none() {
        return Err("quota 402 denial without a valid reset_at".into());
    }
    let message = raw
        .message
        .filter(|m| !m.trim().is_empty() && m.len() <= 512)
        .unwrap_or_else(|| code.as_str().replace('_', " "));
    Ok(Answer::Deny {
        status,
        code,
        message,
        retry_after_s,
        reset_at,
        headers,
    })
}

/// The JSON body of `POST /v1/check`.
pub fn check_body(client: &str, tier: &str, route: &str, cost: u64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "client": client, "tier": tier, "route": route, "cost": cost,
    }))
    .unwrap_or_default()
}

/// Whether `quota.mode` is `lease` (the default).
pub fn lease_mode(cfg: &Config) -> bool {
    cfg.raw.quota.as_ref().is_some_and(|q| q.mode == "lease")
}

/// In lease mode an allowed answer must carry a lease of at least the request's cost.
pub fn check_lease_answer(cfg: &Config, a: &Answer, cost: u64) -> Result<(), String> {
    if !lease_mode(cfg) {
        return Ok(());
    }
    match a {
        Answer::Allow { lease: None, .. } => {
            Err("quota service answered without a lease (does it serve /v1/lease?)".into())
        }
        Answer::Allow { lease: Some(g), .. } if g.granted < cost => Err(format!(
            "lease of {} units is smaller than the request's cost {cost}",
            g.granted
        )),
        _ => Ok(()),
    }
}

/// The quota stage: asks the service (via the glue) and applies its answer. In lease mode
/// it first spends units of a lease this Envoy holds (`quota_lease`), and asks only when
/// there is none.
pub fn stage(cfg: &Config, _req: &Request, ex: &mut Exchange, env: &Env) -> Step {
    let Some(qc) = cfg.raw.quota.as_ref() else {
        return Step::Next;
    };
    if !ex.policy(cfg).is_some_and(|p| p.quota) {
        return Step::Next;
    }
    let lease = lease_mode(cfg);
    let cost = ex.policy(cfg).map(|p| p.cost).unwrap_or(1);
    let (client, tier) = match &ex.identity {
        Some(id) => (id.client.clone(), id.tier.clone()),
        None => (
            ex.client_ip.clone().unwrap_or_else(|| "unknown".into()),
            crate::identity::ANONYMOUS_TIER.to_string(),
        ),
    };
    let route = ex.route_name(cfg).to_string();
    let who = Owner {
        client: &client,
        tier: &tier,
        route: &route,
    };
    match ex.quota.take() {
        None => {
            let (path, body) = if lease && cost > 0 {
                match quota_lease::take(env.store, who, cost, env.now_ms) {
                    Take::Taken { headers } => {
                        merge_headers(&mut ex.response_headers, headers);
                        return Step::Next;
                    }
                    Take::Need { want } => (
                        "/v1/lease",
                        quota_lease::lease_body(&client, &tier, &route, cost, want),
                    ),
                }
            } else {
                ("/v1/check", check_body(&client, &tier, &route, cost))
            };
            Step::Wait(Wait::Quota(QuotaCall {
                path,
                cluster: qc.cluster.clone(),
                authority: qc.authority.clone().unwrap_or_else(|| qc.cluster.clone()),
                body,
                timeout_ms: qc.timeout_ms,
            }))
        }
        Some(QuotaOutcome::Answered(Answer::Allow {
            headers,
            lease: Some(g),
            ..
        })) if lease && g.granted >= cost => {
            // This request spends `cost` of the grant; the rest is held for the next ones.
            let headers = quota_lease::install(env.store, who, &g, cost, &headers, env.now_ms);
            merge_headers(&mut ex.response_headers, headers);
            Step::Next
        }
        Some(QuotaOutcome::Answered(a @ Answer::Allow { .. })) if lease => {
            // No usable lease in the answer (the driver already turns this into a failure):
            // never admit without granted units.
            let why = check_lease_answer(cfg, &a, cost)
                .err()
                .unwrap_or_else(|| "lease answer unusable".into());
            failure(qc, &why)
        }
        Some(QuotaOutcome::Answered(Answer::Allow { headers, .. })) => {
            merge_headers(&mut ex.response_headers, headers);
            Step::Next
        }
        Some(QuotaOutcome::Answered(Answer::Deny {
            status,
            code,
            message,
            retry_after_s,
            reset_at,
            headers,
        })) => {
            if lease {
                // Refused while a background refresh won the last units for this Envoy:
                // they were granted, so the request spends one of them and goes on.
                if let Take::Taken { headers } = quota_lease::take(env.store, who, cost, env.now_ms)
                {
                    merge_headers(&mut ex.response_headers, headers);
                    return Step::Next;
                }
            }
            // The service's rate-limit headers replace the local limit's set only when its
            // bucket is the tighter one, as on an allowed request: a reply never mixes two
            // limits' headers.
            merge_headers(&mut ex.response_headers, headers);
            let mut r = LocalReply::new(code, message).with_policy("quota");
            r.status = status;
            if let Some(s) = retry_after_s {
                r = r
                    .with_field("retry_after", s)
                    .with_header("retry-after", s.to_string());
            }
            if let Some(at) = reset_at {
                r = r.with_field("reset_at", at);
            }
            Step::Reply(r)
        }
        Some(QuotaOutcome::Failed(why)) => {
            if lease {
                // A background refresh may have landed while this request waited.
                if let Take::Taken { headers } = quota_lease::take(env.store, who, cost, env.now_ms)
                {
                    merge_headers(&mut ex.response_headers, headers);
                    return Step::Next;
                }
            }
            failure(qc, &why)
        }
    }
}

/// `failure_mode`: the service failed or answered something unusable.
fn failure(qc: &crate::config::QuotaConfig, why: &str) -> Step {
    if qc.failure_mode == "deny" {
        Step::Reply(
            LocalReply::new(
                ErrorCode::QuotaUnavailable,
                "the quota service is unavailable; try again later",
            )
            .with_policy(format!("quota: {why}")),
        )
    } else {
        Step::Next
    }
}

/// The rate-limit headers that describe one limit together (SPEC section 3).
const RATELIMIT_HEADERS: [&str; 5] = [
    "ratelimit-policy",
    "ratelimit",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
];

fn remaining_in(headers: &[(String, String)]) -> Option<u64> {
    headers
        .iter()
        .find(|(k, _)| k == "x-ratelimit-remaining")
        .and_then(|(_, v)| v.parse::<u64>().ok())
}

/// Adds the service's headers to the client's response. The rate-limit headers describe one
/// limit, the one with the least remaining (SPEC section 3): the service's global bucket
/// replaces a local limit's set only when it has less remaining; the `x-quota-*` headers are
/// always added.
fn merge_headers(out: &mut Vec<(String, String)>, headers: Vec<(String, String)>) {
    let service_wins = match (remaining_in(out), remaining_in(&headers)) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(local), Some(service)) => service < local,
    };
    if service_wins {
        out.retain(|(k, _)| !RATELIMIT_HEADERS.contains(&k.as_str()));
    }
    for (k, v) in headers {
        if RATELIMIT_HEADERS.contains(&k.as_str()) && !service_wins {
            continue;
        }
        match out.iter_mut().find(|(hk, _)| *hk == k) {
            Some(slot) => slot.1 = v,
            None => out.push((k, v)),
        }
    }
}

/// Circuit breaker over the callout: after `failures` consecutive failures it opens for
/// `open_ms` (requests skip the callout and get `failure_mode` at once), then lets one probe
/// through; a successful probe closes it, a failed one opens it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breaker {
    failures_to_open: u32,
    open_ms: u64,
    state: BreakerState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed {
        failures: u32,
    },
    Open {
        until_ms: u64,
    },
    /// One probe is in flight since `since_ms`.
    HalfOpen {
        since_ms: u64,
    },
}

/// Whether to call the service now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    Call,
    Skip,
}

impl Breaker {
    pub fn new(cfg: &BreakerConfig) -> Self {
        Self {
            failures_to_open: cfg.failures.max(1),
            open_ms: cfg.open_ms,
            state: BreakerState::Closed { failures: 0 },
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    pub fn permit(&mut self, now_ms: u64) -> Permit {
        match self.state {
            BreakerState::Closed { .. } => Permit::Call,
            BreakerState::Open { until_ms } if now_ms >= until_ms => {
                self.state = BreakerState::HalfOpen { since_ms: now_ms };
                Permit::Call
            }
            BreakerState::Open { .. } => Permit::Skip,
            // A probe that never reported back (should not happen: Envoy always calls back)
            // must not keep the breaker half-open forever.
            BreakerState::HalfOpen { since_ms }
                if now_ms.saturating_sub(since_ms) >= self.open_ms =>
            {
                self.state = BreakerState::HalfOpen { since_ms: now_ms };
                Permit::Call
            }
            BreakerState::HalfOpen { .. } => Permit::Skip,
        }
    }

    pub fn record(&mut self, ok: bool, now_ms: u64) {
        self.state = match (ok, self.state) {
            (true, _) => BreakerState::Closed { failures: 0 },
            (false, BreakerState::Closed { failures }) if failures + 1 < self.failures_to_open => {
                BreakerState::Closed {
                    failures: failures + 1,
                }
            }
            (false, BreakerState::Open { until_ms }) => BreakerState::Open { until_ms },
            (false, _) => BreakerState::Open {
                until_ms: now_ms.saturating_add(self.open_ms),
            },
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{AuthMethod, Identity};
    use crate::pipeline::{on_request_headers, Verdict};
    use crate::store::MemoryStore;

    fn breaker(failures: u32, open_ms: u64) -> Breaker {
        Breaker::new(&BreakerConfig { failures, open_ms })
    }

    #[test]
    fn breaker_opens_after_consecutive_failures_and_probes_once() {
        let mut b = breaker(3, 1000);
        for _ in 0..2 {
            assert_eq!(b.permit(0), Permit::Call);
            b.record(false, 0);
        }
        // A success in between resets the count.
        b.record(true, 0);
        for _ in 0..3 {
            assert_eq!(b.permit(10), Permit::Call);
            b.record(false, 10);
        }
        assert_eq!(b.state(), BreakerState::Open { until_ms: 1010 });
        assert_eq!(b.permit(500), Permit::Skip);
        assert_eq!(b.permit(1010), Permit::Call, "the probe");
        assert_eq!(b.permit(1011), Permit::Skip, "only one probe at a time");
        b.record(false, 1020);
        assert_eq!(b.state(), BreakerState::Open { until_ms: 2020 });
        assert_eq!(b.permit(2020), Permit::Call);
        b.record(true, 2030);
        assert_eq!(b.state(), BreakerState::Closed { failures: 0 });
        assert_eq!(b.permit(2031), Permit::Call);
    }

    #[test]
    fn a_lost_probe_does_not_wedge_the_breaker() {
        let mut b = breaker(1, 100);
        b.record(false, 0);
        assert_eq!(b.permit(100), Permit::Call);
        assert_eq!(b.permit(150), Permit::Skip);
        assert_eq!(b.permit(200), Permit::Call);
    }

    #[test]
    fn late_failures_while_open_do_not_extend_it() {
        let mut b = breaker(1, 100);
        b.record(false, 0);
        b.record(false, 50);
        assert_eq!(b.state(), BreakerState::Open { until_ms: 100 });
    }

    #[test]
    fn answers_parse_and_hostile_ones_fail() {
        let a = parse_answer(
            200,
            br#"{"allowed":true,"remaining":4,"reset_s":9,"headers":{"x-quota-remaining":"4","set-cookie":"a=b","X-Bad":"1","x-crlf":"a\r\nb"}}"#,
        )
        .unwrap();
        assert_eq!(
            a,
            Answer::Allow {
                remaining: Some(4),
                headers: vec![("x-quota-remaining".into(), "4".into())],
                lease: None,
            }
        );
        let d = parse_answer(
            200,
            br#"{"allowed":false,"status":402,"error":"quota_exceeded","message":"daily quota used up","retry_after_s":60,"reset_at":"2024-03-01T00:00:00Z","headers":{"retry-after":"60"}}"#,
        )
        .unwrap();
        match d {
            Answer::Deny {
                status,
                code,
                reset_at,
                ..
            } => {
                assert_eq!((status, code), (402, ErrorCode::QuotaExceeded));
                assert_eq!(reset_at.as_deref(), Some("2024-03-01T00:00:00Z"));
            }
            a => panic!("{a:?}"),
        }
        assert!(parse_answer(503, b"{}").is_err());
        assert!(parse_answer(200, b"not json").is_err());
        assert!(parse_answer(200, br#"{"allowed":false,"status":500}"#).is_err());
        assert!(parse_answer(200, &vec![b' '; MAX_ANSWER_BYTES + 1]).is_err());
    }

    #[test]
    fn an_answer_that_is_not_utf8_is_refused_even_in_an_unknown_member() {
        // fuzz/corpus/quota_answer/regression-non-utf8-unknown-member: was accepted.
        assert!(parse_answer(200, b"{\"allowed\":true,\"x\":\"\xff\xfe\"}").is_err());
        assert!(parse_answer(200, b"{\"allowed\":true,\"x\":\"ok\"}").is_ok());
    }

    #[test]
    fn only_rate_limit_and_quota_headers_are_copied_from_an_answer() {
        let body = br#"{"allowed":true,"headers":{
            "x-quota-remaining":"4","x-quota-overage":"2","ratelimit":"\"q\";r=1;t=1",
            "x-ratelimit-remaining":"1","retry-after":"9",
            "access-control-allow-origin":"*","access-control-allow-credentials":"true",
            "strict-transport-security":"max-age=0","x-frame-options":"ALLOWALL",
            "content-security-policy":"default-src *","vary":"x","cache-control":"public",
            "x-auth-subject":"admin","location":"https://evil.example","x-quota-":"1",
            "x-quota-A":"1","www-authenticate":"Basic"}}"#;
        let Answer::Allow { headers, .. } = parse_answer(200, body).unwrap() else {
            panic!("an allow")
        };
        let mut names: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "ratelimit",
                "x-quota-overage",
                "x-quota-remaining",
                "x-ratelimit-remaining"
            ]
        );
    }

    #[test]
    fn a_denial_must_say_when_to_come_back() {
        // A 429 needs retry_after_s, a 402 a reset_at: without them the answer is broken.
        assert!(parse_answer(200, br#"{"allowed":false,"status":429}"#).is_err());
        assert!(parse_answer(200, br#"{"allowed":false,"status":402,"retry_after_s":5}"#).is_err());
        assert!(parse_answer(
            200,
            br#"{"allowed":false,"status":402,"reset_at":"2024-03-01T00:00:00Z
x: y"}"#
        )
        .is_err());
        match parse_answer(
            200,
            br#"{"allowed":false,"status":429,"retry_after_s":0,"message":" "}"#,
        )
        .unwrap()
        {
            Answer::Deny {
                retry_after_s,
                message,
                ..
            } => {
                assert_eq!(retry_after_s, Some(1), "rounded up to a whole second");
                assert_eq!(message, "rate limit exceeded");
            }
            a => panic!("{a:?}"),
        }
    }

    #[test]
    fn a_denial_keeps_the_local_limit_headers_unless_the_service_is_tighter() {
        let c = cfg("allow");
        let mut ex = Exchange::default();
        let _ = run_once(&c, "/api", &mut ex);
        ex.response_headers = vec![
            ("ratelimit-policy".into(), "\"local\";q=10;w=60".into()),
            ("ratelimit".into(), "\"local\";r=0;t=60".into()),
            ("x-ratelimit-remaining".into(), "0".into()),
        ];
        ex.quota = Some(QuotaOutcome::Answered(
            parse_answer(
                200,
                br#"{"allowed":false,"status":429,"retry_after_s":3,"headers":{
                "ratelimit":"\"quota-global\";r=0;t=3","x-ratelimit-remaining":"0",
                "retry-after":"999","x-frame-options":"ALLOWALL"}}"#,
            )
            .unwrap(),
        ));
        let Verdict::Reply(r) = run_once(&c, "/api", &mut ex) else {
            panic!("a 429")
        };
        let h = crate::headers::local_reply_headers(&c, &r, &ex.response_headers, &ex.vary);
        let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("ratelimit"), Some("\"local\";r=0;t=60"), "no mixed set");
        assert_eq!(get("retry-after"), Some("3"), "agrees with the body");
        assert_eq!(get("x-frame-options"), Some("DENY"));
        let body: serde_json::Value = serde_json::from_slice(&r.body()).unwrap();
        assert_eq!(body["retry_after"], 3);
    }

    #[test]
    fn service_ratelimit_headers_replace_local_ones_only_when_tighter() {
        let h = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let local = h(&[
            ("ratelimit-policy", "\"local\";q=10;w=60"),
            ("ratelimit", "\"local\";r=5;t=30"),
            ("x-ratelimit-remaining", "5"),
        ]);
        let svc = |r: &str| {
            h(&[
                ("ratelimit", "\"quota-global\";r=X;t=1"),
                ("x-ratelimit-remaining", r),
                ("x-quota-remaining", "9"),
            ])
        };
        let mut out = local.clone();
        merge_headers(&mut out, svc("9"));
        assert_eq!(out[1].1, "\"local\";r=5;t=30", "local limit is tighter");
        assert!(out.contains(&("x-quota-remaining".into(), "9".into())));
        let mut out = local.clone();
        merge_headers(&mut out, svc("2"));
        assert!(out.contains(&("ratelimit".into(), "\"quota-global\";r=X;t=1".into())));
        assert!(
            !out.iter().any(|(k, _)| k == "ratelimit-policy"),
            "no mix of two limits' headers"
        );
        let mut out = Vec::new();
        merge_headers(&mut out, svc("7"));
        assert_eq!(out.len(), 3);
    }

    fn cfg(mode: &str) -> Config {
        let json = format!(
            r#"{{"quota":{{"cluster":"quota","timeout_ms":50,"failure_mode":"{mode}","mode":"check"}},
                "routes":[{{"name":"orders","match":{{"prefix":"/api"}},"quota":true,"cost":3}},
                          {{"name":"free","match":{{"prefix":"/free"}}}}]}}"#
        );
        crate::config::parse(json.as_bytes(), &|_| None).unwrap().0
    }

    fn run_once(c: &Config, path: &str, ex: &mut Exchange) -> Verdict {
        let store = MemoryStore::new();
        let env = Env {
            now_ms: 0,
            store: &store,
        };
        let h = vec![("x-request-id".to_string(), "r".to_string())];
        let req = Request {
            method: "GET",
            path,
            headers: &h,
            source_address: Some("10.1.2.3:5"),
            route_name: None,
        };
        if ex.stage == crate::pipeline::Stage::Quota {
            crate::pipeline::run(c, &req, ex, &env)
        } else {
            on_request_headers(c, &req, ex, &env)
        }
    }

    #[test]
    fn quota_routes_wait_for_the_service_with_identity_and_cost() {
        let c = cfg("allow");
        let mut ex = Exchange::default();
        match run_once(&c, "/free", &mut ex) {
            Verdict::Forward(_) => {}
            v => panic!("no quota on this route: {v:?}"),
        }
        let mut ex = Exchange {
            identity: Some(Identity {
                method: AuthMethod::ApiKey,
                subject: "acme".into(),
                client: "acme".into(),
                tier: "pro".into(),
                scopes: vec![],
                roles: vec![],
                forwarded: vec![],
                claims: vec![],
                strip_authorization: false,
            }),
            ..Default::default()
        };
        match run_once(&c, "/api/x", &mut ex) {
            Verdict::Wait(Wait::Quota(call)) => {
                assert_eq!(call.cluster, "quota");
                assert_eq!(call.authority, "quota");
                assert_eq!(call.timeout_ms, 50);
                let v: serde_json::Value = serde_json::from_slice(&call.body).unwrap();
                assert_eq!(
                    v,
                    serde_json::json!({"client":"acme","tier":"pro","route":"orders","cost":3})
                );
            }
            v => panic!("{v:?}"),
        }
        // The answer comes back: a 402 becomes the SPEC's local reply.
        ex.quota = Some(QuotaOutcome::Answered(
            parse_answer(200, br#"{"allowed":false,"status":402,"error":"quota_exceeded","message":"m","retry_after_s":5,"reset_at":"2024-03-01T00:00:00Z","headers":{"retry-after":"5"}}"#).unwrap(),
        ));
        match run_once(&c, "/api/x", &mut ex) {
            Verdict::Reply(r) => {
                assert_eq!((r.status, r.code), (402, ErrorCode::QuotaExceeded));
                let body: serde_json::Value = serde_json::from_slice(&r.body()).unwrap();
                assert_eq!(body["reset_at"], "2024-03-01T00:00:00Z");
                assert_eq!(body["retry_after"], 5);
                assert_eq!(r.headers, vec![("retry-after".into(), "5".into())]);
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn anonymous_requests_are_keyed_by_ip_and_failures_follow_failure_mode() {
        for (mode, denied) in [("allow", false), ("deny", true)] {
            let c = cfg(mode);
            let mut ex = Exchange::default();
            match run_once(&c, "/api", &mut ex) {
                Verdict::Wait(Wait::Quota(call)) => {
                    let v: serde_json::Value = serde_json::from_slice(&call.body).unwrap();
                    assert_eq!(v["client"], "10.1.2.3");
                    assert_eq!(v["tier"], "anonymous");
                }
                v => panic!("{v:?}"),
            }
            ex.quota = Some(QuotaOutcome::Failed("timeout".into()));
            match (run_once(&c, "/api", &mut ex), denied) {
                (Verdict::Reply(r), true) => {
                    assert_eq!((r.status, r.code), (503, ErrorCode::QuotaUnavailable))
                }
                (Verdict::Forward(_), false) => {}
                (v, _) => panic!("{mode}: {v:?}"),
            }
        }
    }

    #[test]
    fn in_lease_mode_an_answer_without_a_usable_lease_never_admits() {
        let json = r#"{"quota":{"cluster":"quota","failure_mode":"deny"},
            "routes":[{"name":"orders","match":{"prefix":"/api"},"quota":true,"cost":3}]}"#;
        let c = crate::config::parse(json.as_bytes(), &|_| None).unwrap().0;
        for answer in [
            &br#"{"allowed":true,"headers":{}}"#[..],
            br#"{"allowed":true,"granted":2,"lease_id":"L","expires_at_ms":99999999}"#,
        ] {
            let mut ex = Exchange::default();
            match run_once(&c, "/api", &mut ex) {
                Verdict::Wait(Wait::Quota(call)) => assert_eq!(call.path, "/v1/lease"),
                v => panic!("{v:?}"),
            }
            ex.quota = Some(QuotaOutcome::Answered(parse_answer(200, answer).unwrap()));
            match run_once(&c, "/api", &mut ex) {
                Verdict::Reply(r) => assert_eq!(r.code, ErrorCode::QuotaUnavailable),
                v => panic!("admitted without a lease: {v:?}"),
            }
        }
    }

    #[test]
    fn an_allow_adds_the_service_headers() {
        let c = cfg("allow");
        let mut ex = Exchange::default();
        let _ = run_once(&c, "/api", &mut ex);
        ex.quota = Some(QuotaOutcome::Answered(
            parse_answer(
                200,
                br#"{"allowed":true,"remaining":3,"headers":{"x-quota-remaining":"3"}}"#,
            )
            .unwrap(),
        ));
        assert!(matches!(run_once(&c, "/api", &mut ex), Verdict::Forward(_)));
        assert!(ex
            .response_headers
            .contains(&("x-quota-remaining".into(), "3".into())));
    }
}
