//! api-guard-quota: global token-bucket limits and daily/monthly quotas for api-guard,
//! shared by every Envoy through one service (SPEC section 5).
//!
//! Pure logic (`periods`, `policy`, `decision`) takes time as an argument; `store` holds
//! state (memory or Redis, one trait); `api` is the HTTP surface; `rls` serves Envoy's rate
//! limit service gRPC API on the same stores; `alerts` delivers quota webhooks in the
//! background; `main.rs` only wires these together.

pub mod alerts;
pub mod api;
pub mod config;
pub mod decision;
/// Fuzz target logic shared by `fuzz/` and `quota/tests/fuzz_replay.rs`; not an API.
#[doc(hidden)]
pub mod fuzzing;
pub mod lease;
pub mod metrics;
pub mod periods;
pub mod policy;
pub mod rls;
pub mod store;

use std::sync::Arc;

/// Builds the service around a store: the router plus its state (metrics, alert queue).
/// Must run inside a Tokio runtime (it spawns the alert task).
pub fn app(
    config: config::Config,
    store: Arc<dyn store::Store>,
    clock: api::Clock,
) -> axum::Router {
    app_with_metrics(config, store, clock, Arc::new(metrics::Metrics::new()))
}

/// [`app`] with a metrics registry shared with the rate limit service (one `/metrics`).
pub fn app_with_metrics(
    config: config::Config,
    store: Arc<dyn store::Store>,
    clock: api::Clock,
    metrics: Arc<metrics::Metrics>,
) -> axum::Router {
    let alerts = alerts::spawn(config.alerts.clone(), store.clone(), metrics.clone());
    api::router(api::AppState {
        config: Arc::new(config),
        store,
        metrics,
        alerts,
        clock,
    })
}

/// The HTTP side of a service started without `--config`: health and metrics only.
pub fn ops_app(
    store: Arc<dyn store::Store>,
    clock: api::Clock,
    metrics: Arc<metrics::Metrics>,
) -> axum::Router {
    let config = config::Config::default();
    let alerts = alerts::spawn(config.alerts.clone(), store.clone(), metrics.clone());
    api::ops_router(api::AppState {
        config: Arc::new(config),
        store,
        metrics,
        alerts,
        clock,
    })
}
