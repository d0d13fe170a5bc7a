//! HTTP context: sequences one request through the pipeline and carries out verdicts.

use super::host::{self, now_ms, Metrics, ProxyStore};
use crate::config::Config;
use crate::headers::{self, DenyLog, HeaderOp};
use crate::pipeline::{self, Env, Exchange, Request, Verdict, Wait};
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
    ex: Exchange,
}

/// The request as read from the host, owned so it can be re-read after a callout.
struct ReadRequest {
    headers: Vec<(String, String)>,
    source: Option<String>,
    route_name: Option<String>,
    method: String,
    path: String,
}

impl ReadRequest {
    fn as_request(&self) -> Request<'_> {
        Request {
            method: &self.method,
            path: &self.path,
            headers: &self.headers,
            source_address: self.source.as_deref(),
            route_name: self.route_name.as_deref(),
        }
    }
}

impl Http {
    pub fn new(config: Rc<Config>, metrics: Rc<Metrics>, breaker: Rc<RefCell<Breaker>>) -> Self {
        Self {
            config,
            metrics,
            breaker,
            ex: Exchange::default(),
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
        let find = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let (method, path) = (find(":method"), find(":path"));
        ReadRequest {
            headers,
            source,
            route_name,
            method,
            path,
        }
    }

    /// Runs the pipeline again from the current stage (after a wait) and acts on it.
    /// `paused`: whether `on_http_request_headers` already returned `Pause`.
    fn rerun(&mut self, paused: bool) -> Action {
        let r = self.read_request();
        let store = ProxyStore;
        let env = Env {
            now_ms: now_ms(),
            store: &store,
        };
        let config = Rc::clone(&self.config);
        let verdict = pipeline::run(&config, &r.as_request(), &mut self.ex, &env);
        self.act(verdict, &r.method, &r.path, paused)
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
                Ok(_) => None,
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

    fn property(&self, path: &[&str]) -> Option<String> {
        self.get_property(path.to_vec())
            .and_then(|b| String::from_utf8(b).ok())
    }

    /// Carries out a verdict. `paused` says the request is currently paused (after a wait),
    /// so forwarding must resume it instead of returning `Continue`.
    fn act(&mut self, verdict: Verdict, method: &str, path: &str, paused: bool) -> Action {
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
            Verdict::Wait(Wait::Quota(call)) => self.call_quota(call, paused),
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
        _token: u32,
        num_headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let now = now_ms();
        // No headers: Envoy's way of reporting a timeout or a reset.
        let outcome = if num_headers == 0 {
            Err("no answer within timeout_ms (or connection reset)".to_string())
        } else if body_size > quota_client::MAX_ANSWER_BYTES {
            Err("answer too large".to_string())
        } else {
            let status = self
                .get_http_call_response_headers_bytes()
                .into_iter()
                .find(|(k, _)| k == ":status")
                .and_then(|(_, v)| {
                    std::str::from_utf8(&v)
                        .ok()
                        .and_then(|s| s.parse::<u32>().ok())
                })
                .unwrap_or(0);
            let body = self
                .get_http_call_response_body(0, body_size)
                .unwrap_or_default();
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
        let _ = self.rerun(true);
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let r = self.read_request();
        let store = ProxyStore;
        let env = Env {
            now_ms: now_ms(),
            store: &store,
        };
        let config = Rc::clone(&self.config);
        let verdict = pipeline::on_request_headers(&config, &r.as_request(), &mut self.ex, &env);
        self.act(verdict, &r.method, &r.path, false)
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
            }
        }
        Action::Continue
    }
}
