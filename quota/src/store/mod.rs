//! Where counters, buckets and client overrides live: one trait, two stores.
//!
//! [`memory::MemoryStore`] is the embedded default (one process, lost on restart);
//! [`redis::RedisStore`] keeps everything in Redis (standalone or Cluster) so any number of
//! replicas share it and a restart loses nothing. Both pass the same test suite
//! (`quota/tests/store_suite.rs`). Time is an argument: the service reads the clock once per
//! request and both stores do the same math with it.

pub mod lease;
pub mod memory;
pub mod redis;
pub mod scripts;

pub use lease::ReleaseArgs;

use crate::decision::{Decision, UsageState};
use crate::periods::Periods;
use crate::policy::{Override, Policy};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;

/// A boxed future, so the trait stays usable as `dyn Store`.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store did not answer within {0} ms")]
    Timeout(u64),
    #[error("store returned data this service cannot read: {0}")]
    Corrupt(String),
    #[error("in-memory store is full ({0} clients); use --redis for this many clients")]
    Full(usize),
}

/// Everything one check needs.
#[derive(Debug, Clone)]
pub struct CheckArgs<'a> {
    pub client: &'a str,
    pub tier: &'a str,
    /// The request tier's policy from the config; a stored client override wins over it.
    pub tier_policy: &'a Policy,
    pub cost: u64,
    pub now_ms: u64,
    pub periods: &'a Periods,
    pub thresholds: &'a [u32],
}

/// Where a client's alerts go. The secret is a Standard Webhooks `whsec_<base64>` key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub url: String,
    pub secret: String,
}

/// What the admin API stores per client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientRecord {
    pub overrides: Option<Override>,
    pub webhook: Option<Webhook>,
}

/// A client's counters for the current periods, with its stored override.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageSnapshot {
    pub overrides: Option<Override>,
    pub daily: UsageState,
    pub monthly: UsageState,
}

pub trait Store: Send + Sync {
    /// `"memory"` or `"redis"`, for logs and metrics.
    fn kind(&self) -> &'static str;

    /// Decides one request atomically: when allowed, takes `cost` from the bucket and both
    /// quotas and marks newly crossed alert thresholds; when denied, changes nothing.
    fn check<'a>(&'a self, args: CheckArgs<'a>) -> StoreFuture<'a, Decision>;

    fn usage<'a>(
        &'a self,
        client: &'a str,
        periods: &'a Periods,
        now_ms: u64,
    ) -> StoreFuture<'a, UsageSnapshot>;

    /// Replaces the client's record (`None` fields are removed). Effective for the next check.
    fn put_client<'a>(&'a self, client: &'a str, rec: &'a ClientRecord) -> StoreFuture<'a, ()>;

    fn get_client<'a>(&'a self, client: &'a str) -> StoreFuture<'a, ClientRecord>;

    /// Whether the store answers (`/readyz`).
    fn ping(&self) -> StoreFuture<'_, ()>;

    /// Decides one ShouldRateLimit request over all its limited descriptors atomically
    /// (`crate::rls::decide`): all charged or none.
    fn rls_check<'a>(&'a self, items: &'a [RlsItem], now_ms: u64) -> StoreFuture<'a, RlsDecision>;

    /// Gives back up to `units` of a lease's units (`store::lease`): never more than it
    /// granted in total, whatever the number of calls. Returns the units given back.
    fn release<'a>(&'a self, args: ReleaseArgs<'a>) -> StoreFuture<'a, u64>;
}

/// One limited descriptor of a rate limit service request, with its store keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RlsItem {
    /// Holds the fixed window's count, the bucket, or the sliding window's current count.
    pub key: String,
    /// The sliding window's previous count (the same as `key` for the other algorithms).
    pub prev_key: String,
    pub item: crate::rls::decide::Item,
}

pub use crate::rls::decide::Decision as RlsDecision;

/// Keys of rate limit service counters are kept this long past their window, so replicas
/// with slightly different clocks still find them.
pub const RLS_GRACE_MS: u64 = 60_000;

/// The common prefix of a client's keys. The `{...}` hash tag puts all of one client's keys
/// in one Redis Cluster slot, which a multi-key script requires. Characters that would end the
/// tag early or clash with the escape (`{`, `}`, `%`) are percent-encoded.
pub fn key_base(client: &str) -> String {
    let mut s = String::with_capacity(client.len() + 6);
    s.push_str("ag:{");
    for c in client.chars() {
        match c {
            '{' => s.push_str("%7B"),
            '}' => s.push_str("%7D"),
            '%' => s.push_str("%25"),
            c => s.push(c),
        }
    }
    s.push('}');
    s
}

/// All keys of one client.
pub struct ClientKeys {
    pub overrides: String,
    pub webhook: String,
    pub bucket: String,
    pub throttle: String,
    pub day: String,
    pub month: String,
}

/// The admin record's keys (override, webhook), which do not depend on the period.
pub fn admin_keys(client: &str) -> (String, String) {
    let b = key_base(client);
    (format!("{b}:o"), format!("{b}:w"))
}

impl ClientKeys {
    pub fn new(client: &str, periods: &Periods) -> Self {
        let b = key_base(client);
        let (overrides, webhook) = admin_keys(client);
        Self {
            overrides,
            webhook,
            bucket: format!("{b}:b"),
            throttle: format!("{b}:tb"),
            day: format!("{b}:d:{}", periods.day.id),
            month: format!("{b}:m:{}", periods.month.id),
        }
    }
}

/// Usage counters are kept this long after their period ends, so replicas with slightly
/// different clocks still find them, then Redis drops them.
pub const USAGE_GRACE_MS: u64 = 86_400_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_base_keeps_one_hash_tag() {
        assert_eq!(key_base("acme"), "ag:{acme}");
        assert_eq!(key_base("a}b{c%"), "ag:{a%7Db%7Bc%25}");
        // Distinct clients never share a base.
        assert_ne!(key_base("a%7D"), key_base("a}"));
    }
}
