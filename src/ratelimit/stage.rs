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
    for (k, v) in h.pairs() {
        ex.response_headers.push((k.to_string(), v.to_string()));
    }
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
    let decision = rl.check(
        ids,
        plan.cost,
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
    for (id, e) in events.into_iter().flatten() {
        state.record(id, e);
        if e == Event::ShadowDenied {
            state.shadow_denials.push((id, rl.describe_key(id, &keys)));
        }
    }
    match decision.denial {
        None => {
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
