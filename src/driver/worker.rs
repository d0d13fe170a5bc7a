//! Per-worker state of one filter configuration: the validated config, counter ids, the
//! quota circuit breaker, background JWKS refreshes, once-per-worker warnings.

use crate::config::{self, BreakerConfig, Config, EnvLookup};
use crate::host::{CalloutResponse, CalloutToken, CounterId, LogLevel, Platform};
use crate::quota_client::Breaker;
use crate::ratelimit::Event;
use crate::reply::ErrorCode;
use std::cell::{Cell, RefCell};

/// How often a host with a root timer should call [`Worker::refresh_jwks`]: it only checks
/// whether a refresh is due and fetches when it wins the shared lease (`auth::remote_jwks`).
pub const JWKS_TICK_MS: u64 = 500;

/// One configuration on one worker thread. Requests share it through an `Rc`; what they
/// change (breaker, refreshes, warnings) sits in cells: one thread, never re-entered.
pub struct Worker {
    pub(crate) config: Config,
    pub(crate) metrics: Metrics,
    /// The quota callout's circuit breaker (per worker).
    pub(crate) breaker: RefCell<Breaker>,
    /// Background JWKS refreshes in flight: callout token -> provider index.
    refreshes: RefCell<Vec<(CalloutToken, usize)>>,
    /// The missing-body diagnostic was logged (once per worker).
    pub(crate) warned_no_body: Cell<bool>,
}

impl Worker {
    /// Validates `json` (secrets `{"env": NAME}` through `env`), prepares the shared store and
    /// defines the counters. `Err`: the host must refuse the configuration (the message is
    /// already logged).
    pub fn configure<P: Platform + ?Sized>(
        json: &[u8],
        env: EnvLookup<'_>,
        platform: &mut P,
    ) -> Result<Worker, String> {
        let cfg = match config::parse(json, env) {
            Ok((cfg, warnings)) => {
                for w in warnings {
                    platform.log(
                        LogLevel::Warn,
                        format_args!("api-guard: config warning at `{}`: {}", w.path, w.message),
                    );
                }
                cfg
            }
            Err(e) => {
                platform.log(
                    LogLevel::Error,
                    format_args!("api-guard: invalid configuration, refusing to start: {e}"),
                );
                return Err(e.to_string());
            }
        };
        let store = platform.store();
        // Pre-create the webhook replay slots: key creation is not atomic.
        cfg.webhooks.prepare(store);
        // Shared-data keys must exist before traffic: Envoy inserts a missing key whatever
        // CAS version a writer names, so creating them under load races.
        match cfg.rate_limiter.prepare(store) {
            Ok(0) => {}
            Ok(n) => platform.log(
                LogLevel::Info,
                format_args!("api-guard: created {n} rate-limit slot pages"),
            ),
            Err(e) => platform.log(
                LogLevel::Warn,
                format_args!("api-guard: preparing rate-limit tables: {e}"),
            ),
        }
        if let Err(e) = crate::abuse::Abuse::prepare_adaptive(&cfg, store) {
            platform.log(
                LogLevel::Warn,
                format_args!("api-guard: preparing the adaptive route records: {e:?}"),
            );
        }
        if let Err(e) = cfg.abuse.prepare(store) {
            platform.log(
                LogLevel::Warn,
                format_args!("api-guard: preparing the key-sharing table: {e:?}"),
            );
        }
        crate::auth::remote_jwks::prepare(&cfg.auth, platform.store());
        crate::hygiene::prepare(&cfg, platform.store());
        let metrics = Metrics::define(&cfg, platform);
        let breaker = cfg
            .raw
            .quota
            .as_ref()
            .map(|q| q.breaker.clone())
            .unwrap_or_else(BreakerConfig::default);
        Ok(Worker {
            breaker: RefCell::new(Breaker::new(&breaker)),
            config: cfg,
            metrics,
            refreshes: RefCell::new(Vec::new()),
            warned_no_body: Cell::new(false),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether background JWKS refreshes are useful (some provider has a remote JWKS): a
    /// host with a timer then calls [`Worker::refresh_jwks`] every [`JWKS_TICK_MS`]. A host
    /// without one may skip it: requests fetch a missing set themselves (`Wait::Jwks`).
    pub fn needs_tick(&self) -> bool {
        self.config.auth.has_remote_jwks()
    }

    /// Starts the JWKS fetches that are due and won by this worker.
    pub fn refresh_jwks<P: Platform + ?Sized>(&self, platform: &mut P) {
        let auth = &self.config.auth;
        for provider in auth.refreshes_due(platform.store(), platform.now_ms()) {
            let Some((cluster, authority, path, timeout_ms)) = auth.fetch_target(provider) else {
                continue;
            };
            match platform.dispatch_callout(
                cluster,
                &jwks_request(path, authority),
                None,
                timeout_ms,
            ) {
                Ok(token) => self.refreshes.borrow_mut().push((token, provider)),
                Err(e) => {
                    platform.log(
                        LogLevel::Warn,
                        format_args!("api-guard: cannot fetch JWKS from cluster '{cluster}': {e}"),
                    );
                    let _ =
                        auth.fetch_finished(provider, platform.store(), None, platform.now_ms());
                }
            }
        }
    }

    /// The answer to a callout started by [`Worker::refresh_jwks`] (`None`: no answer, a
    /// timeout or a reset). Unknown tokens are ignored.
    pub fn on_callout_done<P: Platform + ?Sized>(
        &self,
        platform: &mut P,
        token: CalloutToken,
        response: Option<&dyn CalloutResponse>,
    ) {
        let provider = {
            let mut calls = self.refreshes.borrow_mut();
            let Some(at) = calls.iter().position(|(t, _)| *t == token) else {
                return;
            };
            calls.swap_remove(at).1
        };
        let body = match jwks_body(response) {
            Ok(b) => Some(b),
            Err(e) => {
                platform.log(
                    LogLevel::Warn,
                    format_args!("api-guard: JWKS response for provider #{provider} unusable: {e}"),
                );
                None
            }
        };
        match self.config.auth.fetch_finished(
            provider,
            platform.store(),
            body.as_deref(),
            platform.now_ms(),
        ) {
            Ok(n) => platform.log(
                LogLevel::Info,
                format_args!("api-guard: JWKS for provider #{provider} refreshed ({n} keys)"),
            ),
            Err(e) => platform.log(
                LogLevel::Warn,
                format_args!(
                    "api-guard: JWKS refresh for provider #{provider} failed, keeping the last good set: {e}"
                ),
            ),
        }
    }
}

/// The headers of a JWKS fetch.
pub(crate) fn jwks_request<'a>(path: &'a str, authority: &'a str) -> [(&'a str, &'a str); 4] {
    [
        (":method", "GET"),
        (":path", path),
        (":authority", authority),
        ("accept", "application/json"),
    ]
}

/// The body of a JWKS answer when it is a 200 of at most `remote_jwks::MAX_BODY` bytes, or
/// why not (for the log). An oversized body is refused before it is copied.
pub(crate) fn jwks_body(response: Option<&dyn CalloutResponse>) -> Result<Vec<u8>, String> {
    let Some(r) = response else {
        return Err("no answer (timeout or connection reset)".into());
    };
    match r.status() {
        Some(200) => {}
        Some(s) => return Err(format!("HTTP status {s}")),
        None => return Err("HTTP status none".into()),
    }
    let (len, max) = (r.body_len(), crate::auth::remote_jwks::MAX_BODY);
    if len > max {
        return Err(format!("body of {len} bytes is over the {max}-byte limit"));
    }
    Ok(r.body())
}

/// Counter ids (`api_guard.*`). A host without counters leaves them `None`.
pub(crate) struct Metrics {
    allowed: Option<CounterId>,
    /// Requests the filter answered itself without denying them (CORS preflights).
    answered: Option<CounterId>,
    /// Quota callouts that failed (timeout, error, unreadable answer) or were skipped by the
    /// open circuit breaker: `failure_mode` was applied.
    quota_failed: Option<CounterId>,
    denied: [Option<CounterId>; ErrorCode::ALL.len()],
    /// Requests that bypassed a rate limit through an `exempt` (one per limit bypassed).
    exempt: Option<CounterId>,
    /// `abuse.key_sharing`: requests from an address over the allowance, and requests not
    /// tracked (table page full of live clients, contention).
    key_sharing_over: Option<CounterId>,
    key_sharing_untracked: Option<CounterId>,
    /// Route `adaptive` switches, all routes: on, off (`on - off` is the number of routes
    /// tightened right now, up to a switch off not yet made, see `abuse::adaptive`).
    adaptive_all: [Option<CounterId>; 2],
    /// The same per route (by index; the default route last), `None` without `adaptive`.
    adaptive_routes: Vec<[Option<CounterId>; 2]>,
    /// Per rate limit (by index): allowed, denied, shadow_denied, slot_pressure, contention,
    /// exempt, near_miss.
    limits: Vec<[Option<CounterId>; 7]>,
}

/// Counter suffixes per rate limit, in [`Event`] order.
const LIMIT_EVENTS: [&str; 7] = [
    "allowed",
    "denied",
    "shadow_denied",
    "slot_pressure",
    "contention",
    "exempt",
    "near_miss",
];

fn event_index(e: Event) -> usize {
    match e {
        Event::Allowed => 0,
        Event::Denied => 1,
        Event::ShadowDenied => 2,
        Event::SlotPressure => 3,
        Event::Contention => 4,
        Event::Exempt => 5,
        Event::NearMiss => 6,
    }
}

impl Metrics {
    fn define<P: Platform + ?Sized>(cfg: &Config, p: &mut P) -> Self {
        let mut denied = [None; ErrorCode::ALL.len()];
        for (slot, code) in denied.iter_mut().zip(ErrorCode::ALL) {
            *slot = p.define_counter(&format!("api_guard.denied.{}", code.as_str()));
        }
        let limits = cfg
            .rate_limiter
            .limits
            .iter()
            .map(|l| {
                LIMIT_EVENTS
                    .map(|e| p.define_counter(&format!("api_guard.ratelimit.{}.{e}", l.name)))
            })
            .collect();
        let policies = cfg
            .routes
            .iter()
            .map(|r| (r.name.as_str(), &r.policy))
            .chain(cfg.default_route.as_ref().map(|d| ("default", d)));
        let adaptive_routes = policies
            .map(|(name, policy)| {
                if policy.adaptive.is_none() {
                    return [None, None];
                }
                // Route names are free text; stat names keep to a safe alphabet.
                let name: String = name
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect();
                ["on", "off"]
                    .map(|e| p.define_counter(&format!("api_guard.adaptive.route.{name}.{e}")))
            })
            .collect();
        Self {
            adaptive_all: [
                p.define_counter("api_guard.adaptive.on"),
                p.define_counter("api_guard.adaptive.off"),
            ],
            adaptive_routes,
            allowed: p.define_counter("api_guard.allowed"),
            answered: p.define_counter("api_guard.answered"),
            quota_failed: p.define_counter("api_guard.quota.unavailable"),
            denied,
            exempt: p.define_counter("api_guard.exempt"),
            key_sharing_over: p.define_counter("api_guard.abuse.key_sharing.over"),
            key_sharing_untracked: p.define_counter("api_guard.abuse.key_sharing.untracked"),
            limits,
        }
    }

    fn bump<P: Platform + ?Sized>(p: &P, id: Option<CounterId>) {
        if let Some(id) = id {
            p.increment_counter(id, 1);
        }
    }

    /// Counts what happened at one rate limit.
    pub fn limit_event<P: Platform + ?Sized>(&self, p: &P, limit: usize, e: Event) {
        Self::bump(p, self.limits.get(limit).and_then(|c| c[event_index(e)]));
        if e == Event::Exempt {
            Self::bump(p, self.exempt);
        }
    }

    /// Counts what the abuse stage saw.
    pub fn abuse<P: Platform + ?Sized>(&self, p: &P, s: crate::abuse::AbuseState) {
        if s.over {
            Self::bump(p, self.key_sharing_over);
        }
        if s.untracked {
            Self::bump(p, self.key_sharing_untracked);
        }
    }

    /// Counts the adaptive switches a request of `matched` made.
    pub fn adaptive<P: Platform + ?Sized>(
        &self,
        p: &P,
        cfg: &Config,
        matched: crate::pipeline::Matched,
        s: crate::abuse::AdaptiveState,
    ) {
        use crate::pipeline::Matched;
        let route = match matched {
            Matched::Route(i) => self.adaptive_routes.get(i),
            Matched::Default => self.adaptive_routes.get(cfg.routes.len()),
            Matched::None => None,
        };
        for (i, happened) in [s.on, s.off].into_iter().enumerate() {
            if happened {
                Self::bump(p, self.adaptive_all[i]);
                Self::bump(p, route.and_then(|r| r[i]));
            }
        }
    }

    pub fn allowed<P: Platform + ?Sized>(&self, p: &P) {
        Self::bump(p, self.allowed);
    }

    pub fn answered<P: Platform + ?Sized>(&self, p: &P) {
        Self::bump(p, self.answered);
    }

    pub fn quota_failed<P: Platform + ?Sized>(&self, p: &P) {
        Self::bump(p, self.quota_failed);
    }

    pub fn denied<P: Platform + ?Sized>(&self, p: &P, code: ErrorCode) {
        Self::bump(p, self.denied.get(code.index()).copied().flatten());
    }
}
