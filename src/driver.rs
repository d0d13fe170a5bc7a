//! The request driver: sequences one request through [`crate::pipeline`] and carries out
//! its verdicts through a [`Host`]: headers to upstream, local replies, callouts (quota,
//! JWKS) and their answers, the body for webhook checks, response headers, deny logs and
//! counters. Both deliveries (proxy-wasm `filter`, the native module) only translate their
//! ABI's callbacks into the calls below and map [`Action`] to their statuses.
//!
//! Event contract for a host:
//! - `on_request_headers` once; then `on_request_body` for every body callback with the
//!   *total* body length the host holds (offsets for [`Host::request_body`] count from the
//!   first body byte), `on_request_trailers` when trailers end the body;
//! - `on_callout_done` once per token from [`Platform::dispatch_callout`] (`None` when no
//!   answer came: timeout, reset);
//! - `on_response_headers` once, unless the driver sent a local response;
//! - `on_done` when the stream is gone.

mod worker;

pub use worker::{Worker, JWKS_TICK_MS, LEASE_TICK_MS};

use crate::headers::{self, DenyLog, HeaderOp};
use crate::host::{Attribute, CalloutResponse, CalloutToken, Host, LogLevel};
use crate::pipeline::{self, BodyVerdict, Env, Exchange, Request, Verdict, Wait};
use crate::quota_client::{self, Permit, QuotaCall, QuotaOutcome};
use crate::reply::LocalReply;
use std::rc::Rc;

/// What the host does with the stream after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Let the request (or response) go on.
    Continue,
    /// Hold it: from request headers, stop iteration; from a body callback, stop and keep
    /// buffering the body (it is forwarded unchanged later). The driver later resumes it
    /// ([`Host::resume_request`]) or answers it locally.
    Pause,
}

/// One request.
pub struct Driver {
    worker: Rc<Worker>,
    ex: Exchange,
    /// The quota callout in flight (a request makes at most one at a time).
    quota_token: Option<CalloutToken>,
    /// The JWKS fetch this request waits for: (token, provider, counted as a waiter fetch).
    jwks_wait: Option<(CalloutToken, usize, bool)>,
    /// Request body bookkeeping while the request is held: bytes the host holds (body
    /// callbacks report the running total), bytes already fed to the pipeline, whether the
    /// stream has ended, whether any body callback came at all.
    body_buffered: usize,
    body_fed: usize,
    body_ended: bool,
    body_seen: bool,
}

/// The request as read from the host, owned (read again after a wait).
struct ReadRequest {
    headers: Vec<(String, String)>,
    source: Option<String>,
    route_name: Option<String>,
    /// Where `:method` and `:path` are in `headers` (not copied: this runs per request).
    method_at: Option<usize>,
    path_at: Option<usize>,
}

impl ReadRequest {
    fn value(&self, at: Option<usize>) -> &str {
        at.and_then(|i| self.headers.get(i))
            .map_or("", |(_, v)| v.as_str())
    }
    fn method(&self) -> &str {
        self.value(self.method_at)
    }
    fn path(&self) -> &str {
        self.value(self.path_at)
    }
}

impl Driver {
    pub fn new(worker: Rc<Worker>) -> Self {
        Self {
            worker,
            ex: Exchange::default(),
            quota_token: None,
            jwks_wait: None,
            body_buffered: 0,
            body_fed: 0,
            body_ended: false,
            body_seen: false,
        }
    }

    pub fn on_request_headers<H: Host + ?Sized>(
        &mut self,
        host: &mut H,
        end_of_stream: bool,
    ) -> Action {
        // A request without a body is complete now: a body check finishes immediately.
        self.body_ended = end_of_stream;
        self.ex.body_ended = end_of_stream;
        self.drive(host, true, false)
    }

    /// A body callback: `buffered` is the total body length the host holds now.
    pub fn on_request_body<H: Host + ?Sized>(
        &mut self,
        host: &mut H,
        buffered: usize,
        end_of_stream: bool,
    ) -> Action {
        self.on_body_event(host, Some(buffered), end_of_stream)
    }

    /// Trailers end the body (its last callback had end_of_stream false).
    pub fn on_request_trailers<H: Host + ?Sized>(&mut self, host: &mut H) -> Action {
        self.on_body_event(host, None, true)
    }

    pub fn on_response_headers<H: Host + ?Sized>(&mut self, host: &mut H) -> Action {
        if self.ex.replied {
            return Action::Continue;
        }
        let existing = host.response_headers();
        let cfg = &self.worker.config;
        for op in headers::response_ops(cfg, &existing, &self.ex.response_headers, &self.ex.vary) {
            match op {
                HeaderOp::Add(k, v) => host.add_response_header(&k, &v),
                HeaderOp::Set(k, v) => host.set_response_header(&k, Some(&v)),
                HeaderOp::Remove(k) => host.set_response_header(&k, None),
            }
        }
        Action::Continue
    }

    /// The answer to a callout this request dispatched (`None`: no answer within the
    /// timeout, or a reset). The request has been held since it asked; the driver resumes
    /// or answers it.
    pub fn on_callout_done<H: Host + ?Sized>(
        &mut self,
        host: &mut H,
        token: CalloutToken,
        response: Option<&dyn CalloutResponse>,
    ) {
        if self.quota_token == Some(token) {
            self.quota_token = None;
            self.quota_done(host, response);
            return;
        }
        let Some((_, provider, waiter)) = self.jwks_wait.filter(|(t, _, _)| *t == token) else {
            return;
        };
        self.jwks_wait = None;
        let body = match worker::jwks_body(response) {
            Ok(b) => Some(b),
            Err(e) => {
                host.log(
                    LogLevel::Warn,
                    format_args!("api-guard: JWKS response unusable: {e}"),
                );
                None
            }
        };
        let _ = self.jwks_done(host, provider, waiter, body, true);
    }

    /// The stream is over. A request held for its body (webhook, body count) whose body never
    /// reached the filter means Envoy held it back: with `allow_on_headers_stop_iteration: false` (Envoy's default for
    /// proxy-wasm) pausing at the headers withholds the body callbacks too, the router never
    /// sees the request (so not even the route timeout starts), and it hangs until the
    /// client gives up. Said loudly, once per worker (a client that leaves before sending its
    /// body looks the same, hence the hedged wording).
    ///
    /// Whatever the end (normal, client reset, local reply, upstream timeout), what the
    /// request holds in shared state is given back here (the backend ceiling's in-flight
    /// admission): both deliveries call this on every stream end.
    pub fn on_done<H: Host + ?Sized>(&mut self, host: &mut H) {
        let env = Env {
            now_ms: host.now_ms(),
            store: host.store(),
        };
        pipeline::on_stream_end(&self.worker.config, &mut self.ex, &env);
        if pipeline::waits_for_body(&self.ex)
            && !self.body_seen
            && !self.ex.replied
            && !self.worker.warned_no_body.replace(true)
        {
            host.log(
                LogLevel::Error,
                format_args!(
                    "api-guard: a request on route '{}', held for its body (webhook signature, \
                     max_body_bytes or json_schema), ended without its body ever reaching the filter. If \
                     such requests hang with no answer until the client gives up, set \
                     `allow_on_headers_stop_iteration: true` in the Wasm plugin config: with Envoy's default (false), holding the request headers \
                     also withholds the body from the filter",
                    self.ex.route_name(&self.worker.config)
                ),
            );
        }
    }

    /// Reads the request and runs the pipeline on it: from the start (`first`, request
    /// headers) or again from the current stage after a wait (the request headers are still
    /// readable while the request is held). `paused`: whether the request is already held.
    fn drive<H: Host + ?Sized>(&mut self, host: &mut H, first: bool, paused: bool) -> Action {
        if self.ex.replied {
            // Answered while a callout was pending (a body over its limit): the callout's
            // answer must not run the pipeline on.
            return Action::Pause;
        }
        let worker = Rc::clone(&self.worker);
        let config = &worker.config;
        let r = read_request(host, config.needs_route_name);
        let req = Request {
            method: r.method(),
            path: r.path(),
            headers: &r.headers,
            source_address: r.source.as_deref(),
            route_name: r.route_name.as_deref(),
        };
        let env = Env {
            now_ms: host.now_ms(),
            store: host.store(),
        };
        let verdict = if first {
            pipeline::on_request_headers(config, &req, &mut self.ex, &env)
        } else {
            pipeline::run(config, &req, &mut self.ex, &env)
        };
        self.act(host, verdict, r.method(), r.path(), paused)
    }

    /// Carries out a verdict. `paused` says the request is currently held (after a wait),
    /// so forwarding must resume it instead of returning `Continue`.
    fn act<H: Host + ?Sized>(
        &mut self,
        host: &mut H,
        verdict: Verdict,
        method: &str,
        path: &str,
        paused: bool,
    ) -> Action {
        self.rate_limit_events(host);
        match verdict {
            Verdict::Forward(edits) => {
                for name in &edits.remove {
                    host.set_request_header(name, None);
                }
                for (name, value) in &edits.set {
                    host.set_request_header(name, Some(value));
                }
                self.worker.metrics.allowed(host);
                if paused {
                    host.resume_request();
                    Action::Pause
                } else {
                    Action::Continue
                }
            }
            Verdict::Reply(reply) => {
                self.send_reply(host, &reply, method, path);
                Action::Pause
            }
            Verdict::Answer(answer) => {
                let cfg = &self.worker.config;
                self.worker.metrics.answered(host);
                let headers =
                    headers::answer_headers(cfg, &answer, &self.ex.response_headers, &self.ex.vary);
                self.ex.replied = true;
                send(host, answer.status, &headers, None);
                Action::Pause
            }
            Verdict::Wait(Wait::Body) => self.feed_body(host, paused),
            Verdict::Wait(Wait::Quota(call)) => self.call_quota(host, call, paused),
            Verdict::Wait(Wait::Jwks { provider, waiter }) => {
                let worker = Rc::clone(&self.worker);
                let token = worker.config.auth.fetch_target(provider).and_then(
                    |(cluster, authority, path, timeout_ms)| {
                        let headers = worker::jwks_request(path, authority);
                        host.dispatch_callout(cluster, &headers, None, timeout_ms)
                            .ok()
                    },
                );
                match token {
                    Some(t) => {
                        self.jwks_wait = Some((t, provider, waiter));
                        Action::Pause
                    }
                    // Could not even dispatch: go on now, without new keys (it waits once).
                    None => self.jwks_done(host, provider, waiter, None, paused),
                }
            }
        }
    }

    /// Starts the quota callout, or fails at once when the breaker is open or the callout
    /// cannot be dispatched (so the request never hangs on a dead service).
    fn call_quota<H: Host + ?Sized>(
        &mut self,
        host: &mut H,
        call: QuotaCall,
        paused: bool,
    ) -> Action {
        let now = host.now_ms();
        // Bind the permit first: a RefCell guard in the match scrutinee would live through
        // the arms, and `record` below borrows again (a double borrow panics).
        let permit = self.worker.breaker.borrow_mut().permit(now);
        let failed = match permit {
            Permit::Skip => Some("circuit breaker open".to_string()),
            Permit::Call => {
                match host.dispatch_callout(
                    &call.cluster,
                    &call.headers(),
                    Some(&call.body),
                    call.timeout_ms,
                ) {
                    Ok(token) => {
                        self.quota_token = Some(token);
                        None
                    }
                    Err(e) => {
                        self.worker.breaker.borrow_mut().record(false, now);
                        Some(format!("callout to cluster '{}' failed: {e}", call.cluster))
                    }
                }
            }
        };
        match failed {
            None => Action::Pause,
            Some(why) => {
                self.worker.metrics.quota_failed(host);
                self.ex.quota = Some(QuotaOutcome::Failed(why));
                self.drive(host, false, paused)
            }
        }
    }

    /// The quota callout's answer: record it in the breaker, store it, run on.
    fn quota_done<H: Host + ?Sized>(
        &mut self,
        host: &mut H,
        response: Option<&dyn CalloutResponse>,
    ) {
        let now = host.now_ms();
        let outcome = match response {
            None => Err("no answer within timeout_ms (or connection reset)".to_string()),
            Some(r) if r.body_len() > quota_client::MAX_ANSWER_BYTES => {
                Err("answer too large".to_string())
            }
            Some(r) => quota_client::parse_answer(r.status().unwrap_or(0), &r.body()),
        };
        let cost = self.ex.policy(&self.worker.config).map_or(1, |p| p.cost);
        let outcome = outcome.and_then(|a| {
            quota_client::check_lease_answer(&self.worker.config, &a, cost).map(|()| a)
        });
        self.worker
            .breaker
            .borrow_mut()
            .record(outcome.is_ok(), now);
        self.ex.quota = Some(match outcome {
            Ok(a) => QuotaOutcome::Answered(a),
            Err(why) => {
                self.worker.metrics.quota_failed(host);
                QuotaOutcome::Failed(why)
            }
        });
        // The request has been held since it asked.
        let _ = self.drive(host, false, true);
    }

    /// The JWKS fetch this request waited for is over: record it, then re-run the pipeline.
    fn jwks_done<H: Host + ?Sized>(
        &mut self,
        host: &mut H,
        provider: usize,
        waiter: bool,
        body: Option<Vec<u8>>,
        paused: bool,
    ) -> Action {
        let worker = Rc::clone(&self.worker);
        let auth = &worker.config.auth;
        if waiter {
            auth.waiter_fetch_done();
        }
        if let Err(e) = auth.fetch_finished(provider, host.store(), body.as_deref(), host.now_ms())
        {
            host.log(
                LogLevel::Warn,
                format_args!("api-guard: JWKS fetch for provider #{provider} failed: {e}"),
            );
        }
        self.ex.jwks_fetched = true;
        self.drive(host, false, paused)
    }

    /// Feeds the body bytes buffered since the last call to the pipeline (which verifies
    /// them as they stream), and carries out what it decides. The request stays held until
    /// then, and the host keeps the body to forward it unchanged later.
    fn feed_body<H: Host + ?Sized>(&mut self, host: &mut H, paused: bool) -> Action {
        // Never more than the check can use: one byte past the limit already fails it, and
        // counting a body's size needs none.
        let want = self
            .body_buffered
            .saturating_sub(self.body_fed)
            .min(pipeline::body_read_limit(&self.ex));
        let chunk = if want > 0 {
            host.request_body(self.body_fed, want)
        } else {
            Vec::new()
        };
        self.body_fed = self.body_fed.saturating_add(chunk.len());
        let env = Env {
            now_ms: host.now_ms(),
            store: host.store(),
        };
        let step = pipeline::on_request_body_total(
            &mut self.ex,
            self.body_buffered,
            &chunk,
            self.body_ended,
            &env,
        );
        drop(chunk);
        match step {
            BodyVerdict::More => Action::Pause,
            BodyVerdict::Reply(reply) => {
                let r = read_request(host, false);
                self.act(host, Verdict::Reply(reply), r.method(), r.path(), paused)
            }
            BodyVerdict::Continue => self.drive(host, false, paused),
        }
    }

    /// A body callback (or trailers, which end the body). While the pipeline waits for the
    /// body, each chunk is fed as it arrives; while it waits for something else (a callout),
    /// the body is buffered and fed later; once the request was forwarded it streams on.
    fn on_body_event<H: Host + ?Sized>(
        &mut self,
        host: &mut H,
        buffered: Option<usize>,
        end_of_stream: bool,
    ) -> Action {
        self.body_seen = true;
        if self.ex.replied {
            return Action::Pause;
        }
        if let Some(n) = buffered {
            self.body_buffered = n;
        }
        self.body_ended |= end_of_stream;
        if pipeline::waits_for_body(&self.ex) {
            self.feed_body(host, false)
        } else if self.ex.stage == pipeline::Stage::Done {
            Action::Continue
        } else if pipeline::counts_body(&self.ex) {
            // Held for something else (a callout): still never buffer past the limit.
            match pipeline::check_body_size(&mut self.ex, self.body_buffered, self.body_ended) {
                Some(reply) => {
                    let r = read_request(host, false);
                    self.act(host, Verdict::Reply(reply), r.method(), r.path(), false)
                }
                None => Action::Pause,
            }
        } else {
            Action::Pause
        }
    }

    /// Counts rate-limit events and logs shadow denials (`shadow: true` limits that would
    /// have answered 429).
    fn rate_limit_events<H: Host + ?Sized>(&mut self, host: &mut H) {
        let worker = &self.worker;
        for (limit, e) in self.ex.ratelimit.drain_events() {
            worker.metrics.limit_event(host, limit, e);
        }
        // Structured events (`credential_abuse`, ...) and the abuse stage's counters.
        for line in std::mem::take(&mut self.ex.events) {
            host.log(LogLevel::Info, format_args!("{line}"));
        }
        worker
            .metrics
            .abuse(host, std::mem::take(&mut self.ex.abuse));
        worker.metrics.adaptive(
            host,
            &worker.config,
            self.ex.matched,
            std::mem::take(&mut self.ex.adaptive),
        );
        for (limit, key) in std::mem::take(&mut self.ex.ratelimit.shadow_denials) {
            let name = worker
                .config
                .rate_limiter
                .limits
                .get(limit)
                .map_or("", |l| l.name.as_str());
            let line = headers::ShadowDenyLog {
                limit: name,
                key: &key,
                route: self.ex.route_name(&worker.config),
                ip: self.ex.client_ip.as_deref(),
                request_id: self.ex.request_id.as_deref(),
            }
            .line();
            host.log(LogLevel::Info, format_args!("{line}"));
        }
    }

    fn send_reply<H: Host + ?Sized>(
        &mut self,
        host: &mut H,
        reply: &LocalReply,
        method: &str,
        path: &str,
    ) {
        let cfg = &self.worker.config;
        self.worker.metrics.denied(host, reply.code);
        let line = DenyLog {
            reply,
            route: self.ex.route_name(cfg),
            client: self.ex.identity.as_ref().map(|i| i.client.as_str()),
            ip: self.ex.client_ip.as_deref(),
            request_id: self.ex.request_id.as_deref(),
            method,
            path,
        }
        .line();
        host.log(LogLevel::Info, format_args!("{line}"));
        let headers =
            headers::local_reply_headers(cfg, reply, &self.ex.response_headers, &self.ex.vary);
        self.ex.replied = true;
        send(host, reply.status, &headers, Some(&reply.body()));
    }
}

/// One host call for the whole header map: cheaper than several single-header reads, and
/// the only way to see repeated headers.
fn read_request<H: Host + ?Sized>(host: &mut H, route_name: bool) -> ReadRequest {
    let headers = host.request_headers();
    let source = host.attribute(Attribute::SourceAddress);
    let route_name = if route_name {
        host.attribute(Attribute::RouteName)
    } else {
        None
    };
    let at = |name: &str| headers.iter().position(|(k, _)| k == name);
    let (method_at, path_at) = (at(":method"), at(":path"));
    ReadRequest {
        headers,
        source,
        route_name,
        method_at,
        path_at,
    }
}

fn send<H: Host + ?Sized>(
    host: &mut H,
    status: u32,
    headers: &[(String, String)],
    body: Option<&[u8]>,
) {
    let refs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    host.send_response(status, &refs, body);
}

#[cfg(test)]
mod tests;
