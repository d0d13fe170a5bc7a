//! Host services behind the crate's traits: shared data, the clock, metrics.

use crate::config::Config;
use crate::ratelimit::Event;
use crate::reply::ErrorCode;
use crate::store::{SharedStore, StoreError};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{MetricType, Status};
use std::time::UNIX_EPOCH;

/// Envoy shared data (process-wide, every worker's VM sees the same map).
pub struct ProxyStore;

impl SharedStore for ProxyStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(v), Some(cas))) => Some((v, cas)),
            _ => None,
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(StoreError::CasMismatch),
            Err(_) => Err(StoreError::Failed),
        }
    }
}

/// Header values as text. proxy-wasm's String accessors `unwrap()` UTF-8 decoding, so a
/// single byte 0xFF from a client would abort the VM; read bytes and replace invalid
/// sequences instead (a credential with such bytes is invalid either way). Names are tokens
/// validated by Envoy's codecs.
pub fn utf8_headers(raw: Vec<(String, Vec<u8>)>) -> Vec<(String, String)> {
    raw.into_iter()
        .map(|(k, v)| {
            let v = match String::from_utf8(v) {
                Ok(s) => s,
                Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
            };
            (k, v)
        })
        .collect()
}

/// Unix milliseconds from the host clock (wasm has no clock of its own in Envoy's sense).
pub fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Counters in Envoy stats (`/stats`: `wasmcustom.api_guard.*`). Ids are per VM.
pub struct Metrics {
    allowed: Option<u32>,
    /// Requests the filter answered itself without denying them (CORS preflights).
    answered: Option<u32>,
    /// Quota callouts that failed (timeout, error, unreadable answer) or were skipped by the
    /// open circuit breaker: `failure_mode` was applied.
    quota_failed: Option<u32>,
    denied: [Option<u32>; ErrorCode::ALL.len()],
    /// Per rate limit (by index): allowed, denied, shadow_denied, slot_pressure, contention.
    limits: Vec<[Option<u32>; 5]>,
}

/// Counter suffixes per rate limit, in [`Event`] order.
const LIMIT_EVENTS: [&str; 5] = [
    "allowed",
    "denied",
    "shadow_denied",
    "slot_pressure",
    "contention",
];

fn event_index(e: Event) -> usize {
    match e {
        Event::Allowed => 0,
        Event::Denied => 1,
        Event::ShadowDenied => 2,
        Event::SlotPressure => 3,
        Event::Contention => 4,
    }
}

fn counter(name: &str) -> Option<u32> {
    hostcalls::define_metric(MetricType::Counter, name).ok()
}

impl Metrics {
    pub fn define(cfg: &Config) -> Self {
        let mut denied = [None; ErrorCode::ALL.len()];
        for (slot, code) in denied.iter_mut().zip(ErrorCode::ALL) {
            *slot = counter(&format!("api_guard.denied.{}", code.as_str()));
        }
        let limits = cfg
            .rate_limiter
            .limits
            .iter()
            .map(|l| LIMIT_EVENTS.map(|e| counter(&format!("api_guard.ratelimit.{}.{e}", l.name))))
            .collect();
        Self {
            allowed: counter("api_guard.allowed"),
            answered: counter("api_guard.answered"),
            quota_failed: counter("api_guard.quota.unavailable"),
            denied,
            limits,
        }
    }

    /// Counts what happened at one rate limit.
    pub fn limit_event(&self, limit: usize, e: Event) {
        if let Some(Some(id)) = self.limits.get(limit).map(|c| c[event_index(e)]) {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    pub fn allowed(&self) {
        if let Some(id) = self.allowed {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    pub fn answered(&self) {
        if let Some(id) = self.answered {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    pub fn quota_failed(&self) {
        if let Some(id) = self.quota_failed {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    pub fn denied(&self, code: ErrorCode) {
        if let Some(Some(id)) = self.denied.get(code.index()) {
            let _ = hostcalls::increment_metric(*id, 1);
        }
    }
}
