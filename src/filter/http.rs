//! HTTP context: sequences one request through the pipeline and carries out verdicts.

use super::host::{self, now_ms, Metrics, ProxyStore};
use crate::config::Config;
use crate::headers::{self, DenyLog, HeaderOp};
use crate::pipeline::{self, Env, Exchange, Request, Verdict};
use crate::reply::LocalReply;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use std::rc::Rc;

pub struct Http {
    config: Rc<Config>,
    metrics: Rc<Metrics>,
    ex: Exchange,
}

impl Http {
    pub fn new(config: Rc<Config>, metrics: Rc<Metrics>) -> Self {
        Self {
            config,
            metrics,
            ex: Exchange::default(),
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
            Verdict::Wait(w) => match w {},
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

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // One host call for the whole map: cheaper than several single-header reads, and the
        // only way to see repeated headers. The `_bytes` variant: the String one panics (VM
        // abort) on a header value that is not UTF-8.
        let headers = host::utf8_headers(self.get_http_request_headers_bytes());
        let source = self.property(&["source", "address"]);
        let route_name = if self.config.needs_route_name {
            self.property(&["xds", "route_name"])
        } else {
            None
        };
        let method = headers
            .iter()
            .find(|(k, _)| k == ":method")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let path = headers
            .iter()
            .find(|(k, _)| k == ":path")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let req = Request {
            method: &method,
            path: &path,
            headers: &headers,
            source_address: source.as_deref(),
            route_name: route_name.as_deref(),
        };
        let store = ProxyStore;
        let env = Env {
            now_ms: now_ms(),
            store: &store,
        };
        let config = Rc::clone(&self.config);
        let verdict = pipeline::on_request_headers(&config, &req, &mut self.ex, &env);
        self.act(verdict, &method, &path, false)
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
