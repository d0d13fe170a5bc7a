//! Prometheus metrics (`GET /metrics`): decisions by outcome, store latency and errors,
//! alerts sent and failed.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::time::Duration;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum DecisionOutcome {
    allowed,
    allowed_overage,
    allowed_throttled,
    rate_limited,
    quota_exceeded,
    error,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: DecisionOutcome,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum StoreOp {
    check,
    usage,
    client,
    ping,
    /// A rate limit service decision (`ShouldRateLimit`).
    rls,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: StoreOp,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum AlertResult {
    /// Delivered (2xx).
    sent,
    /// Every attempt failed.
    failed,
    /// One attempt failed (it will be retried unless it was the last).
    attempt_failed,
    /// The queue was full; the alert was not sent.
    dropped,
    /// The client has no webhook configured.
    no_webhook,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertLabels {
    pub result: AlertResult,
}

/// Per domain and configured descriptor path (`key_value.key2`, as envoyproxy/ratelimit names
/// its stats): bounded by the config, never by request values.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RlsLabels {
    pub domain: String,
    pub key: String,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RlsCode {
    ok,
    over_limit,
    error,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RlsCodeLabels {
    pub code: RlsCode,
}

/// envoyproxy/ratelimit's per-descriptor counters, in hits (a request's `hits_addend`).
pub struct RlsMetrics {
    pub total_hits: Family<RlsLabels, Counter>,
    pub over_limit: Family<RlsLabels, Counter>,
    /// Admitted hits that left the limit at or above 80 % used (also counted as within).
    pub near_limit: Family<RlsLabels, Counter>,
    pub within_limit: Family<RlsLabels, Counter>,
    /// Hits a shadow-mode limit would have denied.
    pub shadow_mode: Family<RlsLabels, Counter>,
    /// `ShouldRateLimit` calls by overall answer.
    pub requests: Family<RlsCodeLabels, Counter>,
    /// Time to answer a `ShouldRateLimit` call (store included).
    pub latency: Histogram,
}

pub struct Metrics {
    registry: Registry,
    pub rls: RlsMetrics,
    pub decisions: Family<OutcomeLabels, Counter>,
    pub store_latency: Family<OpLabels, Histogram>,
    pub store_errors: Family<OpLabels, Counter>,
    pub alerts: Family<AlertLabels, Counter>,
}

fn latency_histogram() -> Histogram {
    // 50 us .. ~1.6 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

impl Metrics {
    /// `store` is `"memory"` or `"redis"`; metric names say `store` so dashboards work for both.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("api_guard_quota");
        let decisions = Family::<OutcomeLabels, Counter>::default();
        registry.register("decisions", "Check decisions by outcome", decisions.clone());
        let store_latency = Family::<OpLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "store_latency_seconds",
            "Latency of store (Redis) calls by operation",
            store_latency.clone(),
        );
        let store_errors = Family::<OpLabels, Counter>::default();
        registry.register(
            "store_errors",
            "Store (Redis) calls that failed or timed out, by operation",
            store_errors.clone(),
        );
        let alerts = Family::<AlertLabels, Counter>::default();
        registry.register("alerts", "Quota alert deliveries by result", alerts.clone());
        let rls = RlsMetrics {
            total_hits: Family::default(),
            over_limit: Family::default(),
            near_limit: Family::default(),
            within_limit: Family::default(),
            shadow_mode: Family::default(),
            requests: Family::default(),
            latency: latency_histogram(),
        };
        for (name, help, fam) in [
            (
                "rls_total_hits",
                "Rate limit service hits per domain and descriptor",
                &rls.total_hits,
            ),
            (
                "rls_over_limit",
                "Rate limit service hits over the limit",
                &rls.over_limit,
            ),
            (
                "rls_near_limit",
                "Rate limit service hits admitted at or above 80 % of the limit",
                &rls.near_limit,
            ),
            (
                "rls_within_limit",
                "Rate limit service hits within the limit",
                &rls.within_limit,
            ),
            (
                "rls_shadow_mode",
                "Rate limit service hits a shadow-mode limit would have denied",
                &rls.shadow_mode,
            ),
        ] {
            registry.register(name, help, fam.clone());
        }
        registry.register(
            "rls_requests",
            "ShouldRateLimit calls by overall code",
            rls.requests.clone(),
        );
        registry.register(
            "rls_request_duration_seconds",
            "Time to answer a ShouldRateLimit call",
            rls.latency.clone(),
        );
        Self {
            registry,
            rls,
            decisions,
            store_latency,
            store_errors,
            alerts,
        }
    }

    pub fn decision(&self, outcome: DecisionOutcome) {
        self.decisions
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn store_call(&self, op: StoreOp, took: Duration, ok: bool) {
        let l = OpLabels { op };
        self.store_latency
            .get_or_create(&l)
            .observe(took.as_secs_f64());
        if !ok {
            self.store_errors.get_or_create(&l).inc();
        }
    }

    pub fn alert(&self, result: AlertResult) {
        self.alerts.get_or_create(&AlertLabels { result }).inc();
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_labels() {
        let m = Metrics::new();
        m.decision(DecisionOutcome::quota_exceeded);
        m.store_call(StoreOp::check, Duration::from_micros(300), false);
        m.alert(AlertResult::sent);
        let text = m.render();
        assert!(
            text.contains("api_guard_quota_decisions_total{outcome=\"quota_exceeded\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("api_guard_quota_store_errors_total{op=\"check\"} 1"),
            "{text}"
        );
        assert!(text.contains("api_guard_quota_store_latency_seconds_count{op=\"check\"} 1"));
        assert!(text.contains("api_guard_quota_alerts_total{result=\"sent\"} 1"));
        let l = RlsLabels {
            domain: "d".into(),
            key: "k_v".into(),
        };
        m.rls.near_limit.get_or_create(&l).inc_by(3);
        m.rls.latency.observe(0.001);
        let text = m.render();
        assert!(
            text.contains("api_guard_quota_rls_near_limit_total{domain=\"d\",key=\"k_v\"} 3"),
            "{text}"
        );
        assert!(text.contains("api_guard_quota_rls_request_duration_seconds_count 1"));
    }
}
