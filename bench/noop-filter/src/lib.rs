//! The cost floor of any wasm filter: one root context, one HTTP context per request that
//! reads the request header map once (as api-guard does) and continues. What api-guard costs
//! above this is its own logic and host calls; what this costs above plain Envoy is V8 and
//! the proxy-wasm ABI.
//!
//! Its configuration may be two numbers "S P": it then also sets S response headers and reads
//! the `source.address` property P times, one host call each, so the bench can price a single
//! host call of either kind (the difference divided by the count).

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { sets: 0, props: 0 })
    });
}}

struct Root {
    sets: usize,
    props: usize,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let cfg = self.get_plugin_configuration().unwrap_or_default();
        let text = String::from_utf8_lossy(&cfg);
        let mut nums = text
            .split_whitespace()
            .map(|n| n.parse::<usize>().unwrap_or(0).min(100));
        self.sets = nums.next().unwrap_or(0);
        self.props = nums.next().unwrap_or(0);
        true
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Noop {
            sets: self.sets,
            props: self.props,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Noop {
    sets: usize,
    props: usize,
}

impl Context for Noop {}

impl HttpContext for Noop {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let headers = self.get_http_request_headers();
        if headers.is_empty() {
            // Never true for a real request; keeps the read from being optimized away.
            log::warn!("no headers");
        }
        for _ in 0..self.props {
            if self.get_property(vec!["source", "address"]).is_none() {
                log::warn!("no source.address");
            }
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        const NAMES: [&str; 4] = ["x-bench-a", "x-bench-b", "x-bench-c", "x-bench-d"];
        for i in 0..self.sets {
            self.set_http_response_header(NAMES[i % NAMES.len()], Some("1"));
        }
        Action::Continue
    }
}
