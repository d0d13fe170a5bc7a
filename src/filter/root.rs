//! Root context: owns the validated config (one per worker VM) and creates HTTP contexts.

use super::host::{now_ms, Metrics, ProxyStore};
use super::http::Http;
use crate::config::{self, BreakerConfig, Config};
use crate::quota_client::Breaker;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

/// How often a worker checks whether a remote JWKS refresh is due (it fetches only when it
/// wins the shared lease, see `auth::remote_jwks`).
const JWKS_TICK: Duration = Duration::from_millis(500);

#[derive(Default)]
pub struct Root {
    config: Option<Rc<Config>>,
    metrics: Option<Rc<Metrics>>,
    /// In-flight JWKS refreshes: callout token -> provider index.
    jwks_calls: HashMap<u32, usize>,
    /// The quota callout's circuit breaker (per worker VM).
    breaker: Option<Rc<RefCell<Breaker>>>,
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let (Some(provider), Some(cfg)) = (self.jwks_calls.remove(&token_id), &self.config) else {
            return;
        };
        let ok = self
            .get_http_call_response_header_bytes(":status")
            .is_some_and(|s| s == b"200");
        let body = if ok {
            self.get_http_call_response_body(0, body_size)
        } else {
            None
        };
        match cfg
            .auth
            .fetch_finished(provider, &ProxyStore, body.as_deref(), now_ms())
        {
            Ok(n) => log::info!("api-guard: JWKS for provider #{provider} refreshed ({n} keys)"),
            Err(e) => log::warn!(
                "api-guard: JWKS refresh for provider #{provider} failed, keeping the last good set: {e}"
            ),
        }
    }
}

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
                crate::auth::remote_jwks::prepare(&cfg.auth, &ProxyStore);
                if cfg.auth.has_remote_jwks() {
                    self.set_tick_period(JWKS_TICK);
                }
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

    fn on_tick(&mut self) {
        let Some(cfg) = self.config.clone() else {
            return;
        };
        for provider in cfg.auth.refreshes_due(&ProxyStore, now_ms()) {
            let Some((cluster, authority, path, timeout_ms)) = cfg.auth.fetch_target(provider)
            else {
                continue;
            };
            match self.dispatch_http_call(
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
            ) {
                Ok(token) => {
                    self.jwks_calls.insert(token, provider);
                }
                Err(e) => {
                    log::warn!("api-guard: cannot fetch JWKS from cluster '{cluster}': {e:?}");
                    let _ = cfg
                        .auth
                        .fetch_finished(provider, &ProxyStore, None, now_ms());
                }
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
