//! api-guard-quota: global token-bucket limits and daily/monthly quotas for api-guard,
//! shared by every Envoy through one service (SPEC section 5).
//!
//! Pure logic (`periods`, `policy`, `decision`) takes time as an argument; `store` holds
//! state (memory or Redis, one trait); `api` is the HTTP surface; `alerts` delivers quota
//! webhooks in the background; `main.rs` only wires these together.

pub mod alerts;
pub mod api;
pub mod config;
pub mod decision;
pub mod metrics;
pub mod periods;
pub mod policy;
pub mod store;

use std::sync::Arc;

/// Builds the service around a store: the router plus its state (metrics, alert queue).
/// Must run inside a Tokio runtime (it spawns the alert task).
pub fn app(
    config: config::Config,
    store: Arc<dyn store::Store>,
    clock: api::Clock,
) -> axum::Router {
    let metrics = Arc::new(metrics::Metrics::new());
    let alerts = alerts::spawn(config.alerts.clone(), store.clone(), metrics.clone());
    api::router(api::AppState {
        config: Arc::new(config),
        store,
        metrics,
        alerts,
        clock,
    })
}
