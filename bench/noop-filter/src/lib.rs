//! The cost floor of any wasm filter: one root context, one HTTP context per request that
//! reads the request header map once (as api-guard does) and continues. What api-guard costs
//! above this is its own logic and host calls; what this costs above plain Envoy is V8 and
//! the proxy-wasm ABI.
//!
//! Its configuration may be a number N: it then also sets N response headers, one host call
//! each, so the bench can price a single host call (the difference divided by N).

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { sets: 0 }) });
}}

struct Root {
    sets: usize,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let cfg = self.get_plugin_configuration().unwrap_or_default();
        self.sets = std::str::from_utf8(&cfg)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
            .min(100);
        true
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Noop { sets: self.sets }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Noop {
    sets: usize,
}

impl Context for Noop {}

impl HttpContext for Noop {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let headers = self.get_http_request_headers();
        if headers.is_empty() {
            // Never true for a real request; keeps the read from being optimized away.
            log::warn!("no headers");
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
