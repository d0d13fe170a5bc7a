//! Root context: owns the validated config (one per worker VM) and creates HTTP contexts.

use super::host::{Metrics, ProxyStore};
use super::http::Http;
use crate::config::{self, BreakerConfig, Config};
use crate::quota_client::Breaker;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;
use std::cell::RefCell;
use std::rc::Rc;

#[derive(Default)]
pub struct Root {
    config: Option<Rc<Config>>,
    metrics: Option<Rc<Metrics>>,
    breaker: Option<Rc<RefCell<Breaker>>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        // `{"env": "NAME"}` secrets come from vm_config.environment_variables (WASI environ).
        match config::parse(&bytes, &|name| std::env::var(name).ok()) {
            Ok((cfg, warnings)) => {
                for w in warnings {
                    log::warn!("api-guard: config warning at `{}`: {}", w.path, w.message);
                }
                // Pre-create the webhook replay slots: key creation is not atomic.
                cfg.webhooks.prepare(&ProxyStore);
                // Shared-data keys must exist before traffic: Envoy inserts a missing key
                // whatever CAS version a writer names, so creating them under load races.
                match cfg.rate_limiter.prepare(&ProxyStore) {
                    Ok(0) => {}
                    Ok(n) => log::info!("api-guard: created {n} rate-limit slot pages"),
                    Err(e) => log::warn!("api-guard: preparing rate-limit tables: {e}"),
                }
                self.metrics = Some(Rc::new(Metrics::define(&cfg)));
                let breaker = cfg
                    .raw
                    .quota
                    .as_ref()
                    .map(|q| q.breaker.clone())
                    .unwrap_or_else(BreakerConfig::default);
                self.breaker = Some(Rc::new(RefCell::new(Breaker::new(&breaker))));
                self.config = Some(Rc::new(cfg));
                true
            }
            Err(e) => {
                // Returning false makes Envoy reject the filter config (and refuse to start).
                log::error!("api-guard: invalid configuration, refusing to start: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http::new(
            self.config.clone()?,
            self.metrics.clone()?,
            self.breaker.clone()?,
        )))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
