//! HTTP context: sequences one request through the pipeline and carries out verdicts.

use super::host::{self, now_ms, Metrics, ProxyStore};
use crate::config::Config;
use crate::headers::{self, DenyLog, HeaderOp};
use crate::pipeline::{self, BodyVerdict, Env, Exchange, Request, Verdict, Wait};
use crate::quota_client::{self, Breaker, Permit, QuotaCall, QuotaOutcome};
use crate::reply::LocalReply;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

pub struct Http {
    config: Rc<Config>,
    metrics: Rc<Metrics>,
    /// The quota callout's circuit breaker, shared by the VM's requests.
    breaker: Rc<RefCell<Breaker>>,
    /// The token of the quota callout in flight (a request makes at most one at a time; any
    /// other callout answer is the JWKS fetch).
    quota_token: Option<u32>,
    ex: Exchange,
    /// The JWKS fetch this request waits for: (provider, counted as a waiter fetch).
    jwks_wait: Option<(usize, bool)>,
    /// Request body bookkeeping while the request is held: bytes Envoy has buffered (the
    /// body callbacks report the running total), bytes already fed to the pipeline, and
    /// whether the stream has ended.
    body_buffered: usize,
    body_fed: usize,
    body_ended: bool,
}

/// The request as read from the host, owned (rebuilt after a callout).
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

impl Http {
    pub fn new(config: Rc<Config>, metrics: Rc<Metrics>, breaker: Rc<RefCell<Breaker>>) -> Self {
        Self {
            config,
            metrics,
            breaker,
            quota_token: None,
            ex: Exchange::default(),
            jwks_wait: None,
            body_buffered: 0,
            body_fed: 0,
            body_ended: false,
        }
    }

    /// One host call for the whole map: cheaper than several single-header reads, and the
    /// only way to see repeated headers. The `_bytes` variant: the String one panics (VM
    /// abort) on a header value that is not UTF-8.
    fn read_request(&self) -> ReadRequest {
        let headers = host::utf8_headers(self.get_http_request_headers_bytes());
        let source = self.property(&["source", "address"]);
        let route_name = if self.config.needs_route_name {
            self.property(&["xds", "route_name"])
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

    /// Reads the request and runs the pipeline on it: from the start (`first`, request
    /// headers) or again from the current stage after a wait (the request headers are still
    /// readable while the request is held). `paused`: whether the request is already held.
    fn drive(&mut self, first: bool, paused: bool) -> Action {
        let r = self.read_request();
        let req = Request {
            method: r.method(),
            path: r.path(),
            headers: &r.headers,
            source_address: r.source.as_deref(),
            route_name: r.route_name.as_deref(),
        };
        let store = ProxyStore;
        let env = Env {
            now_ms: now_ms(),
            store: &store,
        };
        let config = Rc::clone(&self.config);
        let verdict = if first {
            pipeline::on_request_headers(&config, &req, &mut self.ex, &env)
        } else {
            pipeline::run(&config, &req, &mut self.ex, &env)
        };
        self.act(verdict, r.method(), r.path(), paused)
    }

    fn rerun(&mut self, paused: bool) -> Action {
        self.drive(false, paused)
    }

    /// Starts the quota callout, or fails at once when the breaker is open or the callout
    /// cannot be dispatched (so the request never hangs on a dead service).
    fn call_quota(&mut self, call: QuotaCall, paused: bool) -> Action {
        let now = now_ms();
        // Bind the permit first: a RefCell guard in the match scrutinee would live through
        // the arms, and `record` below borrows again (a double borrow aborts the VM).
        let permit = self.breaker.borrow_mut().permit(now);
        let failed = match permit {
            Permit::Skip => Some("circuit breaker open".to_string()),
            Permit::Call => match self.dispatch_http_call(
                &call.cluster,
                call.headers().to_vec(),
                Some(&call.body),
                vec![],
                Duration::from_millis(call.timeout_ms),
            ) {
                Ok(token) => {
                    self.quota_token = Some(token);
                    None
                }
                Err(e) => {
                    self.breaker.borrow_mut().record(false, now);
                    Some(format!(
                        "callout to cluster '{}' failed: {e:?}",
                        call.cluster
                    ))
                }
            },
        };
        match failed {
            None => Action::Pause,
            Some(why) => {
                self.metrics.quota_failed();
                self.ex.quota = Some(QuotaOutcome::Failed(why));
                self.rerun(paused)
            }
        }
    }

    /// The quota callout's answer: record it in the breaker, store it, run on.
    fn quota_done(&mut self, num_headers: usize, body_size: usize) {
        let now = now_ms();
        // No headers: Envoy's way of reporting a timeout or a reset.
        let outcome = if num_headers == 0 {
            Err("no answer within timeout_ms (or connection reset)".to_string())
        } else if body_size > quota_client::MAX_ANSWER_BYTES {
            Err("answer too large".to_string())
        } else {
            // hostcalls directly: the SDK's context methods unwrap() host errors (VM abort).
            let (status, body) = host::callout_status_and_body(body_size);
            quota_client::parse_answer(status, &body)
        };
        self.breaker.borrow_mut().record(outcome.is_ok(), now);
        self.ex.quota = Some(match outcome {
            Ok(a) => QuotaOutcome::Answered(a),
            Err(why) => {
                self.metrics.quota_failed();
                QuotaOutcome::Failed(why)
            }
        });
        // The request has been paused since it asked.
        let _ = self.rerun(true);
    }

    /// Starts a JWKS fetch for this request; `None` when the host refused to dispatch.
    fn dispatch_jwks(&mut self, provider: usize) -> Option<u32> {
        let config = Rc::clone(&self.config);
        let (cluster, authority, path, timeout_ms) = config.auth.fetch_target(provider)?;
        self.dispatch_http_call(
            cluster,
            vec![
                (":method", "GET"),
                (":path", path),
                (":authority", authority),
                ("accept", "application/json"),
            ],
            None,
            vec![],
            Duration::from_millis(timeout_ms),
        )
        .ok()
    }

    /// The JWKS fetch this request waited for is over: record it, then re-run the pipeline.
    fn jwks_done(&mut self, body: Option<Vec<u8>>, paused: bool) -> Action {
        let Some((provider, waiter)) = self.jwks_wait.take() else {
            return Action::Continue;
        };
        let config = Rc::clone(&self.config);
        if waiter {
            config.auth.waiter_fetch_done();
        }
        let now = now_ms();
        if let Err(e) = config
            .auth
            .fetch_finished(provider, &ProxyStore, body.as_deref(), now)
        {
            log::warn!("api-guard: JWKS fetch for provider #{provider} failed: {e}");
        }
        self.ex.jwks_fetched = true;
        self.rerun(paused)
    }

    fn property(&self, path: &[&str]) -> Option<String> {
        self.get_property(path.to_vec())
            .and_then(|b| String::from_utf8(b).ok())
    }

    /// Carries out a verdict. `paused` says the request is currently paused (after a wait),
    /// so forwarding must resume it instead of returning `Continue`.
    fn act(&mut self, verdict: Verdict, method: &str, path: &str, paused: bool) -> Action {
        self.rate_limit_events();
        match verdict {
            Verdict::Forward(edits) => {
                for name in &edits.remove {
                    self.set_http_request_header(name, None);
                }
                for (name, value) in &edits.set {
                    self.set_http_request_header(name, Some(value));
                }
                self.metrics.allowed();
                if paused {
                    self.resume_http_request();
                    Action::Pause
                } else {
                    Action::Continue
                }
            }
            Verdict::Reply(reply) => {
                self.send_reply(&reply, method, path);
                Action::Pause
            }
            Verdict::Answer(answer) => {
                self.metrics.answered();
                let headers = headers::answer_headers(
                    &self.config,
                    &answer,
                    &self.ex.response_headers,
                    &self.ex.vary,
                );
                let refs: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                self.ex.replied = true;
                self.send_http_response(answer.status, refs, None);
                Action::Pause
            }
            Verdict::Wait(Wait::Body) => self.feed_body(paused),
            Verdict::Wait(Wait::Quota(call)) => self.call_quota(call, paused),
            Verdict::Wait(Wait::Jwks { provider, waiter }) => {
                self.jwks_wait = Some((provider, waiter));
                if self.dispatch_jwks(provider).is_some() {
                    Action::Pause
                } else {
                    // Could not even dispatch: go on now, without new keys (it waits once).
                    self.jwks_done(None, paused)
                }
            }
        }
    }

    /// Feeds the body bytes buffered since the last call to the pipeline (which verifies
    /// them as they stream), and carries out what it decides. The request stays held until
    /// then: `Pause` from headers is StopIteration, from a body callback
    /// StopIterationAndBuffer, so Envoy keeps the body and forwards it unchanged later.
    fn feed_body(&mut self, paused: bool) -> Action {
        let chunk = if self.body_buffered > self.body_fed {
            // Never more than the check can use: one byte past the limit already fails it.
            let want =
                (self.body_buffered - self.body_fed).min(pipeline::body_read_limit(&self.ex));
            self.get_http_request_body(self.body_fed, want)
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        self.body_fed = self.body_fed.saturating_add(chunk.len());
        let store = ProxyStore;
        let env = Env {
            now_ms: now_ms(),
            store: &store,
        };
        let step = pipeline::on_request_body(&mut self.ex, &chunk, self.body_ended, &env);
        drop(chunk);
        match step {
            BodyVerdict::More => Action::Pause,
            BodyVerdict::Reply(reply) => {
                let (method, path) = self.method_and_path();
                self.act(Verdict::Reply(reply), &method, &path, paused)
            }
            BodyVerdict::Continue => self.rerun(paused),
        }
    }

    fn method_and_path(&self) -> (String, String) {
        let r = self.read_request();
        (r.method().to_string(), r.path().to_string())
    }

    /// A body callback (or trailers, which end the body). While the pipeline waits for the
    /// body, each chunk is fed as it arrives; while it waits for something else (a callout),
    /// the body is buffered and fed later; once the request was forwarded it streams on.
    fn on_body_event(&mut self, body_buffered: Option<usize>, end_of_stream: bool) -> Action {
        if self.ex.replied {
            return Action::Pause;
        }
        if let Some(n) = body_buffered {
            self.body_buffered = n;
        }
        self.body_ended |= end_of_stream;
        if pipeline::waits_for_body(&self.ex) {
            self.feed_body(false)
        } else if self.ex.stage == pipeline::Stage::Done {
            Action::Continue
        } else {
            Action::Pause
        }
    }

    /// Counts rate-limit events and logs shadow denials (`shadow: true` limits that would
    /// have answered 429).
    fn rate_limit_events(&mut self) {
        for (limit, e) in self.ex.ratelimit.drain_events() {
            self.metrics.limit_event(limit, e);
        }
        for (limit, key) in std::mem::take(&mut self.ex.ratelimit.shadow_denials) {
            let name = self
                .config
                .rate_limiter
                .limits
                .get(limit)
                .map_or("", |l| l.name.as_str());
            log::info!(
                "{}",
                headers::ShadowDenyLog {
                    limit: name,
                    key: &key,
                    route: self.ex.route_name(&self.config),
                    ip: self.ex.client_ip.as_deref(),
                    request_id: self.ex.request_id.as_deref(),
                }
                .line()
            );
        }
    }

    fn send_reply(&mut self, reply: &LocalReply, method: &str, path: &str) {
        let cfg = &self.config;
        self.metrics.denied(reply.code);
        log::info!(
            "{}",
            DenyLog {
                reply,
                route: self.ex.route_name(cfg),
                client: self.ex.identity.as_ref().map(|i| i.client.as_str()),
                ip: self.ex.client_ip.as_deref(),
                request_id: self.ex.request_id.as_deref(),
                method,
                path,
            }
            .line()
        );
        let headers =
            headers::local_reply_headers(cfg, reply, &self.ex.response_headers, &self.ex.vary);
        let refs: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.ex.replied = true;
        self.send_http_response(reply.status, refs, Some(&reply.body()));
    }
}

impl Context for Http {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if self.quota_token == Some(token_id) {
            self.quota_token = None;
            self.quota_done(num_headers, body_size);
            return;
        }
        let body = match host::callout_body(body_size, crate::auth::remote_jwks::MAX_BODY) {
            Ok(b) => Some(b),
            Err(e) => {
                log::warn!("api-guard: JWKS response unusable: {e}");
                None
            }
        };
        // The request has been paused since it asked for the fetch.
        self.jwks_done(body, true);
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        // A request without a body is complete now: a body check finishes immediately.
        self.body_ended = end_of_stream;
        self.drive(true, false)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.on_body_event(Some(body_size), end_of_stream)
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        // Trailers end the body (its last callback had end_of_stream false).
        self.on_body_event(None, true)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.ex.replied {
            return Action::Continue;
        }
        let existing = host::utf8_headers(self.get_http_response_headers_bytes());
        for op in headers::response_ops(
            &self.config,
            &existing,
            &self.ex.response_headers,
            &self.ex.vary,
        ) {
            match op {
                HeaderOp::Add(k, v) => self.add_http_response_header(&k, &v),
                HeaderOp::Set(k, v) => self.set_http_response_header(&k, Some(&v)),
                HeaderOp::Remove(k) => self.set_http_response_header(&k, None),
            }
        }
        Action::Continue
    }
}
