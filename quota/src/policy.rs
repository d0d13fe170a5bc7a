//! What limits apply to a client: a tier's token bucket and its daily/monthly quotas, and a
//! client's overrides of them. Shared by the config file, the admin API and both stores.
//!
//! The same types are serialized to JSON for the Redis script (which decodes them with
//! `cjson`), so the field names here are also the script's. Every number is bounded so the
//! script's double-precision arithmetic stays exact (integers below 2^53).

use serde::{Deserialize, Serialize};

/// Largest quota or capacity (tokens/units) a config may name.
pub const MAX_AMOUNT: u64 = 1_000_000_000_000;
/// Largest refill amount per period: keeps `refill_tokens * refill_period_s` below 2^53.
pub const MAX_REFILL_TOKENS: u64 = 1 << 28;
/// One year: longer refill periods are almost certainly a unit mistake.
pub const MAX_PERIOD_S: u64 = 31_536_000;
/// Buckets are stored scaled by the period in ms; this keeps the scaled level exact in Lua.
const MAX_SCALED: u64 = 1 << 53;

/// A token bucket: `capacity` tokens, `refill_tokens` added every `refill_period_s` seconds
/// (continuously, pro rata), as in the filter's `rate_limits`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bucket {
    pub capacity: u64,
    pub refill_tokens: u64,
    pub refill_period_s: u64,
}

/// The keyword that switches a limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Keyword {
    Unlimited,
}

/// A limit that may be switched off with `"unlimited"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Setting<T> {
    Off(Keyword),
    On(T),
}

impl<T> Setting<T> {
    pub fn get(&self) -> Option<&T> {
        match self {
            Setting::Off(_) => None,
            Setting::On(t) => Some(t),
        }
    }
}

impl<T> Default for Setting<T> {
    fn default() -> Self {
        Setting::Off(Keyword::Unlimited)
    }
}

/// What happens once a quota is used up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OveragePolicy {
    /// Deny with 402 `quota_exceeded` until the period resets.
    HardStop,
    /// Keep serving, but through the quota's `throttle` bucket instead of the tier's limit.
    Throttle,
    /// Keep serving; units past the limit are reported as overage (for billing).
    Overage,
}

impl OveragePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            OveragePolicy::HardStop => "hard_stop",
            OveragePolicy::Throttle => "throttle",
            OveragePolicy::Overage => "overage",
        }
    }
    /// The small integer the Redis script returns for it.
    pub fn code(self) -> i64 {
        match self {
            OveragePolicy::HardStop => 0,
            OveragePolicy::Throttle => 1,
            OveragePolicy::Overage => 2,
        }
    }
    pub fn from_code(c: i64) -> Option<Self> {
        match c {
            0 => Some(OveragePolicy::HardStop),
            1 => Some(OveragePolicy::Throttle),
            2 => Some(OveragePolicy::Overage),
            _ => None,
        }
    }
}

/// A calendar quota: `limit` units per UTC day or month.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    pub limit: u64,
    pub policy: OveragePolicy,
    /// The reduced rate once the quota is used up; required with `policy = "throttle"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle: Option<Bucket>,
}

/// Everything that limits one tier (or one client, after overrides).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub limit: Setting<Bucket>,
    #[serde(default)]
    pub daily: Setting<Quota>,
    #[serde(default)]
    pub monthly: Setting<Quota>,
}

/// A client's overrides as stored: each present field replaces the tier's. When the admin
/// names a `tier`, the service fills the fields the admin left out from that tier's config at
/// the time of the `PUT` (see README: overrides are snapshots).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<Setting<Bucket>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily: Option<Setting<Quota>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly: Option<Setting<Quota>>,
}

impl Override {
    /// The policy and tier name in force: the override's fields over the request's tier.
    pub fn apply(&self, tier: &str, base: &Policy) -> (String, Policy) {
        let tier = self.tier.clone().unwrap_or_else(|| tier.to_string());
        let policy = Policy {
            limit: self.limit.clone().unwrap_or_else(|| base.limit.clone()),
            daily: self.daily.clone().unwrap_or_else(|| base.daily.clone()),
            monthly: self.monthly.clone().unwrap_or_else(|| base.monthly.clone()),
        };
        (tier, policy)
    }
}

/// A limit value outside what the service accepts; `field` names where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PolicyError {
    pub field: String,
    pub message: String,
}

fn err(field: &str, message: impl Into<String>) -> PolicyError {
    PolicyError {
        field: field.to_string(),
        message: message.into(),
    }
}

impl Bucket {
    pub fn period_ms(&self) -> u64 {
        self.refill_period_s.saturating_mul(1000)
    }

    pub fn validate(&self, field: &str) -> Result<(), PolicyError> {
        if self.capacity == 0 || self.capacity > MAX_AMOUNT {
            return Err(err(field, format!("capacity must be 1..={MAX_AMOUNT}")));
        }
        if self.refill_tokens == 0 || self.refill_tokens > MAX_REFILL_TOKENS {
            return Err(err(
                field,
                format!("refill_tokens must be 1..={MAX_REFILL_TOKENS}"),
            ));
        }
        if self.refill_period_s == 0 || self.refill_period_s > MAX_PERIOD_S {
            return Err(err(
                field,
                format!("refill_period_s must be 1..={MAX_PERIOD_S}"),
            ));
        }
        if u128::from(self.capacity) * u128::from(self.period_ms()) > u128::from(MAX_SCALED) {
            return Err(err(
                field,
                "capacity x refill_period_s is too large (keep capacity * period_ms below 2^53)",
            ));
        }
        Ok(())
    }
}

impl Quota {
    pub fn validate(&self, field: &str) -> Result<(), PolicyError> {
        if self.limit > MAX_AMOUNT {
            return Err(err(field, format!("limit must be 0..={MAX_AMOUNT}")));
        }
        match (self.policy, &self.throttle) {
            (OveragePolicy::Throttle, Some(b)) => b.validate(&format!("{field}.throttle")),
            (OveragePolicy::Throttle, None) => Err(err(
                field,
                "policy \"throttle\" needs a throttle = { capacity, refill_tokens, refill_period_s }",
            )),
            (_, Some(_)) => Err(err(field, "throttle is only allowed with policy \"throttle\"")),
            (_, None) => Ok(()),
        }
    }
}

impl Policy {
    pub fn validate(&self, field: &str) -> Result<(), PolicyError> {
        if let Setting::On(b) = &self.limit {
            b.validate(&format!("{field}.limit"))?;
        }
        if let Setting::On(q) = &self.daily {
            q.validate(&format!("{field}.daily"))?;
        }
        if let Setting::On(q) = &self.monthly {
            q.validate(&format!("{field}.monthly"))?;
        }
        Ok(())
    }
}

impl Override {
    pub fn validate(&self) -> Result<(), PolicyError> {
        if let Some(t) = &self.tier {
            validate_name("tier", t)?;
        }
        if let Some(Setting::On(b)) = &self.limit {
            b.validate("limit")?;
        }
        if let Some(Setting::On(q)) = &self.daily {
            q.validate("daily")?;
        }
        if let Some(Setting::On(q)) = &self.monthly {
            q.validate("monthly")?;
        }
        Ok(())
    }
}

/// Longest client id, tier or route name accepted.
pub const MAX_NAME_BYTES: usize = 256;

/// Names are printable ASCII without spaces: they end up in store keys, headers and logs.
pub fn validate_name(field: &str, s: &str) -> Result<(), PolicyError> {
    if s.is_empty() || s.len() > MAX_NAME_BYTES {
        return Err(err(field, format!("must be 1..={MAX_NAME_BYTES} bytes")));
    }
    if !s.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err(err(field, "must be printable ASCII without spaces"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(c: u64, r: u64, p: u64) -> Bucket {
        Bucket {
            capacity: c,
            refill_tokens: r,
            refill_period_s: p,
        }
    }

    #[test]
    fn bucket_bounds() {
        assert!(b(10, 1, 60).validate("x").is_ok());
        assert!(b(0, 1, 60).validate("x").is_err());
        assert!(b(10, 0, 60).validate("x").is_err());
        assert!(b(10, 1, 0).validate("x").is_err());
        // capacity * period_ms over 2^53 would make the script's math inexact.
        let e = b(MAX_AMOUNT, 1, 86_400)
            .validate("tiers.pro.limit")
            .unwrap_err();
        assert_eq!(e.field, "tiers.pro.limit");
    }

    #[test]
    fn throttle_needs_its_bucket() {
        let q = Quota {
            limit: 5,
            policy: OveragePolicy::Throttle,
            throttle: None,
        };
        assert!(q.validate("daily").is_err());
        let q = Quota {
            limit: 5,
            policy: OveragePolicy::HardStop,
            throttle: Some(b(1, 1, 1)),
        };
        assert!(q.validate("daily").is_err());
    }

    #[test]
    fn settings_parse_unlimited_or_table() {
        let p: Policy =
            serde_json::from_str(r#"{"limit":"unlimited","daily":{"limit":3,"policy":"overage"}}"#)
                .unwrap();
        assert_eq!(p.limit, Setting::Off(Keyword::Unlimited));
        assert_eq!(p.daily.get().map(|q| q.limit), Some(3));
        assert_eq!(p.monthly, Setting::Off(Keyword::Unlimited));
        assert!(serde_json::from_str::<Policy>(r#"{"limit":"unlimted"}"#).is_err());
        assert!(serde_json::from_str::<Policy>(r#"{"daly":{"limit":3}}"#).is_err());
    }

    #[test]
    fn override_fields_replace_the_tier() {
        let base = Policy {
            limit: Setting::On(b(10, 10, 60)),
            daily: Setting::On(Quota {
                limit: 100,
                policy: OveragePolicy::HardStop,
                throttle: None,
            }),
            monthly: Setting::default(),
        };
        let o = Override {
            daily: Some(Setting::Off(Keyword::Unlimited)),
            ..Default::default()
        };
        let (tier, p) = o.apply("free", &base);
        assert_eq!(tier, "free");
        assert_eq!(p.limit, base.limit);
        assert!(p.daily.get().is_none());
    }

    #[test]
    fn names_are_bounded_printable() {
        assert!(validate_name("client", "acme-prod").is_ok());
        assert!(validate_name("client", "").is_err());
        assert!(validate_name("client", "a b").is_err());
        assert!(validate_name("client", "é").is_err());
        assert!(validate_name("client", &"a".repeat(257)).is_err());
    }
}
