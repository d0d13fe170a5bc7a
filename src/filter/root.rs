//! Root context: one [`Worker`] per VM (worker thread), the JWKS refresh timer, and the HTTP
//! contexts.

use super::host::{WasmCallout, WasmHost};
use super::http::Http;
use crate::driver::Worker;
use crate::host::CalloutToken;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;
use std::rc::Rc;
use std::time::Duration;

#[derive(Default)]
pub struct Root {
    worker: Option<Rc<Worker>>,
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        num_headers: usize,
        body_size: usize,
        _: usize,
    ) {
        if let Some(w) = &self.worker {
            // No headers: Envoy's way of reporting a timeout or a reset.
            let answer = WasmCallout { body_size };
            let answer = (num_headers > 0).then_some(&answer as _);
            w.on_callout_done(&mut WasmHost, CalloutToken(token.into()), answer);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        // `{"env": "NAME"}` secrets come from vm_config.environment_variables (WASI environ).
        // Err: Envoy rejects the filter config (and refuses to start); the driver logged why.
        let Ok(worker) = Worker::configure(&bytes, &|n| std::env::var(n).ok(), &mut WasmHost)
        else {
            return false;
        };
        if let Some(ms) = worker.tick_ms() {
            self.set_tick_period(Duration::from_millis(ms));
        }
        self.worker = Some(Rc::new(worker));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http::new(Rc::clone(self.worker.as_ref()?))))
    }

    fn on_tick(&mut self) {
        if let Some(w) = &self.worker {
            w.tick(&mut WasmHost);
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
