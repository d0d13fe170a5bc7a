//! Per-worker state of one filter configuration: the validated config, counter ids, the
//! quota circuit breaker, background JWKS refreshes, once-per-worker warnings.

use crate::config::{self, BreakerConfig, Config, EnvLookup};
use crate::host::{CalloutResponse, CalloutToken, CounterId, LogLevel, Platform};
use crate::quota_client::{self, Breaker, Permit};
use crate::quota_lease;
use crate::ratelimit::Event;
use crate::reply::ErrorCode;
use std::cell::{Cell, RefCell};

/// How often a host with a root timer should call [`Worker::refresh_jwks`]: it only checks
/// whether a refresh is due and fetches when it wins the shared lease (`auth::remote_jwks`).
pub const JWKS_TICK_MS: u64 = 500;
/// The timer's period in lease mode: queued lease jobs (the next lease, releases) wait at
/// most this long for a worker to dispatch them; leases are sized to last ~2 s.
pub const LEASE_TICK_MS: u64 = 50;
/// Lease slots checked for expired leases per tick (the whole table in about a second).
const SWEEP_PER_TICK: usize = 64;

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
    /// Background lease callouts in flight (`quota_lease::Job`).
    lease_calls: RefCell<Vec<(CalloutToken, quota_lease::Job)>>,
    /// Where the next expired-lease sweep starts.
    sweep_at: Cell<usize>,
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
        if leases_used(&cfg) {
            quota_lease::prepare(platform.store());
        }
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
            lease_calls: RefCell::new(Vec::new()),
            sweep_at: Cell::new(0),
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

    /// The period a host with a root timer should call [`Worker::tick`] at, or `None` when
    /// nothing runs in the background (no remote JWKS, no leases).
    pub fn tick_ms(&self) -> Option<u64> {
        if leases_used(&self.config) {
            Some(LEASE_TICK_MS)
        } else if self.needs_tick() {
            Some(JWKS_TICK_MS)
        } else {
            None
        }
    }

    /// The timer: JWKS refreshes that are due, and in lease mode the queued lease jobs and
    /// a slice of the expired-lease sweep.
    pub fn tick<P: Platform + ?Sized>(&self, platform: &mut P) {
        if self.needs_tick() {
            self.refresh_jwks(platform);
        }
        if leases_used(&self.config) {
            self.lease_jobs(platform);
        }
    }

    /// Dispatches the queued lease jobs from this worker's root (their answers come back to
    /// [`Worker::on_callout_done`], whatever happened to the requests that queued them).
    fn lease_jobs<P: Platform + ?Sized>(&self, platform: &mut P) {
        let Some(qc) = self.config.raw.quota.as_ref() else {
            return;
        };
        let now = platform.now_ms();
        let next = quota_lease::sweep(platform.store(), self.sweep_at.get(), SWEEP_PER_TICK, now);
        self.sweep_at.set(next);
        let authority = qc.authority.as_deref().unwrap_or(&qc.cluster);
        for job in quota_lease::take_jobs(platform.store()) {
            let (path, body) = match &job {
                quota_lease::Job::Refresh {
                    slot,
                    client,
                    tier,
                    route,
                    cost,
                    want,
                } => {
                    let permit = self.breaker.borrow_mut().permit(now);
                    if permit == Permit::Skip {
                        let until = now.saturating_add(qc.breaker.open_ms);
                        quota_lease::hold(platform.store(), *slot, client, tier, until);
                        continue;
                    }
                    (
                        "/v1/lease",
                        quota_lease::lease_body(client, tier, route, *cost, *want),
                    )
                }
                quota_lease::Job::Release { client, id, units } => (
                    "/v1/lease/release",
                    quota_lease::release_body(client, id, *units),
                ),
            };
            let headers = [
                (":method", "POST"),
                (":path", path),
                (":authority", authority),
                ("content-type", "application/json"),
            ];
            match platform.dispatch_callout(&qc.cluster, &headers, Some(&body), qc.timeout_ms) {
                Ok(token) => self.lease_calls.borrow_mut().push((token, job)),
                Err(e) => {
                    if let quota_lease::Job::Refresh {
                        slot, client, tier, ..
                    } = &job
                    {
                        self.breaker.borrow_mut().record(false, now);
                        quota_lease::hold(platform.store(), *slot, client, tier, now + 1000);
                    }
                    platform.log(
                        LogLevel::Debug,
                        format_args!("api-guard: lease callout to '{}' failed: {e}", qc.cluster),
                    );
                }
            }
        }
    }

    /// The answer to a background lease callout.
    fn lease_done<P: Platform + ?Sized>(
        &self,
        platform: &mut P,
        job: quota_lease::Job,
        response: Option<&dyn CalloutResponse>,
    ) {
        let quota_lease::Job::Refresh {
            slot,
            client,
            tier,
            route,
            ..
        } = job
        else {
            // Releases are best effort: a lost one under-admits, never over-admits.
            return;
        };
        let now = platform.now_ms();
        let answer = match response {
            None => Err("no answer".to_string()),
            Some(r) if r.body_len() > quota_client::MAX_ANSWER_BYTES => {
                Err("answer too large".to_string())
            }
            Some(r) => quota_client::parse_answer(r.status().unwrap_or(0), &r.body()),
        };
        self.breaker.borrow_mut().record(answer.is_ok(), now);
        let store = platform.store();
        match answer {
            Ok(quota_client::Answer::Allow {
                lease: Some(g),
                headers,
                ..
            }) => {
                let who = quota_lease::Owner {
                    client: &client,
                    tier: &tier,
                    route: &route,
                };
                quota_lease::install(store, who, &g, 0, &headers, now);
            }
            Ok(quota_client::Answer::Deny { retry_after_s, .. }) => {
                // No more units now: requests spend what is held, then ask (and get the
                // denial themselves).
                let wait = retry_after_s.unwrap_or(1).clamp(1, 10) * 1000;
                quota_lease::hold(store, slot, &client, &tier, now + wait);
            }
            _ => quota_lease::hold(store, slot, &client, &tier, now + 1000),
        }
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
        let lease_job = {
            let mut calls = self.lease_calls.borrow_mut();
            calls
                .iter()
                .position(|(t, _)| *t == token)
                .map(|at| calls.swap_remove(at).1)
        };
        if let Some(job) = lease_job {
            return self.lease_done(platform, job, response);
        }
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

/// Whether the config holds leases: `quota.mode` `lease` and some route with `"quota": true`.
pub(crate) fn leases_used(cfg: &Config) -> bool {
    quota_client::lease_mode(cfg)
        && cfg
            .routes
            .iter()
            .map(|r| &r.policy)
            .chain(cfg.default_route.as_ref())
            .any(|p| p.quota)
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
