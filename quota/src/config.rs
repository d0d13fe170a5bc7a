//! The service's TOML config file (documented in `quota/README.md`, example in
//! `quota/quota.example.toml`). Unknown keys are errors: a typo must not silently lift a limit.

use crate::policy::{validate_name, Policy};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// Tier used for requests whose tier is not listed, when present.
pub const DEFAULT_TIER: &str = "default";

/// A secret written literally or as `{ env = "NAME" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SecretSource {
    Literal(String),
    Env { env: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    admin_token: Option<SecretSource>,
    #[serde(default)]
    alerts: RawAlerts,
    #[serde(default)]
    tiers: BTreeMap<String, Policy>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlerts {
    #[serde(default = "d_thresholds")]
    thresholds: Vec<u32>,
    #[serde(default = "d_attempts")]
    max_attempts: u32,
    #[serde(default = "d_backoff")]
    initial_backoff_ms: u64,
    #[serde(default = "d_max_backoff")]
    max_backoff_ms: u64,
    #[serde(default = "d_timeout")]
    timeout_ms: u64,
    #[serde(default = "d_queue")]
    queue: usize,
}
fn d_thresholds() -> Vec<u32> {
    vec![80, 90, 100]
}
fn d_attempts() -> u32 {
    6
}
fn d_backoff() -> u64 {
    500
}
fn d_max_backoff() -> u64 {
    60_000
}
fn d_timeout() -> u64 {
    5_000
}
fn d_queue() -> usize {
    1024
}
impl Default for RawAlerts {
    fn default() -> Self {
        Self {
            thresholds: d_thresholds(),
            max_attempts: d_attempts(),
            initial_backoff_ms: d_backoff(),
            max_backoff_ms: d_max_backoff(),
            timeout_ms: d_timeout(),
            queue: d_queue(),
        }
    }
}

/// How alerts are delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertSettings {
    /// Percentages of a quota, ascending, deduplicated.
    pub thresholds: Vec<u32>,
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub timeout_ms: u64,
    /// Alerts waiting for delivery; more are dropped (and counted), never blocking checks.
    pub queue: usize,
}

impl Default for AlertSettings {
    fn default() -> Self {
        let r = RawAlerts::default();
        Self {
            thresholds: r.thresholds,
            max_attempts: r.max_attempts,
            initial_backoff_ms: r.initial_backoff_ms,
            max_backoff_ms: r.max_backoff_ms,
            timeout_ms: r.timeout_ms,
            queue: r.queue,
        }
    }
}

/// The validated config.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Bearer token for the admin API; `None` disables it.
    pub admin_token: Option<String>,
    pub alerts: AlertSettings,
    pub tiers: BTreeMap<String, Policy>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &|name| std::env::var(name).ok())
    }

    /// Parses and validates; `env` resolves `{ env = "NAME" }` (injected for tests).
    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        let admin_token = match raw.admin_token {
            None => None,
            Some(SecretSource::Literal(s)) => Some(s),
            Some(SecretSource::Env { env: name }) => Some(env(&name).ok_or_else(|| {
                invalid(
                    "admin_token",
                    format!("environment variable {name} is not set"),
                )
            })?),
        };
        if let Some(t) = &admin_token {
            if t.len() < 16 {
                return Err(invalid("admin_token", "must be at least 16 characters"));
            }
        }
        let a = raw.alerts;
        let mut thresholds = a.thresholds;
        thresholds.sort_unstable();
        thresholds.dedup();
        if thresholds.len() > 16 || thresholds.iter().any(|&t| t == 0 || t > 1000) {
            return Err(invalid(
                "alerts.thresholds",
                "up to 16 percentages, each 1..=1000",
            ));
        }
        if a.max_attempts == 0 || a.max_attempts > 50 {
            return Err(invalid("alerts.max_attempts", "must be 1..=50"));
        }
        if a.queue == 0 || a.queue > 1_000_000 {
            return Err(invalid("alerts.queue", "must be 1..=1000000"));
        }
        if a.timeout_ms == 0 {
            return Err(invalid("alerts.timeout_ms", "must be > 0"));
        }
        for (name, policy) in &raw.tiers {
            validate_name(&format!("tiers.{name}"), name)
                .map_err(|e| invalid(e.field, e.message))?;
            policy
                .validate(&format!("tiers.{name}"))
                .map_err(|e| invalid(e.field, e.message))?;
        }
        Ok(Config {
            admin_token,
            alerts: AlertSettings {
                thresholds,
                max_attempts: a.max_attempts,
                initial_backoff_ms: a.initial_backoff_ms,
                max_backoff_ms: a.max_backoff_ms.max(a.initial_backoff_ms),
                timeout_ms: a.timeout_ms,
                queue: a.queue,
            },
            tiers: raw.tiers,
        })
    }

    /// The policy for a tier: its own, else `[tiers.default]`, else no limits at all.
    pub fn tier_policy(&self, tier: &str) -> Policy {
        self.tiers
            .get(tier)
            .or_else(|| self.tiers.get(DEFAULT_TIER))
            .cloned()
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{OveragePolicy, Setting};

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../quota.example.toml");
        let env =
            |n: &str| (n == "QUOTA_ADMIN_TOKEN").then(|| "0123456789abcdef-token".to_string());
        let c = Config::parse(text, &env).unwrap();
        assert_eq!(c.alerts.thresholds, vec![80, 90, 100]);
        let pro = c.tier_policy("pro");
        assert!(pro.limit.get().is_some());
        assert_eq!(
            c.tier_policy("free").monthly.get().map(|q| q.policy),
            Some(OveragePolicy::Throttle)
        );
        assert!(c.admin_token.is_some());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        assert!(Config::parse("tierz = {}", &no_env).is_err());
        let e = Config::parse(
            "[tiers.free]\nlimit = { capacity = 0, refill_tokens = 1, refill_period_s = 1 }",
            &no_env,
        )
        .unwrap_err();
        assert!(e.to_string().contains("tiers.free.limit"), "{e}");
        let e = Config::parse(
            "[tiers.free]\ndaily = { limit = 5, policy = \"throttle\" }",
            &no_env,
        )
        .unwrap_err();
        assert!(e.to_string().contains("tiers.free.daily"), "{e}");
        assert!(Config::parse("admin_token = { env = \"NOPE\" }", &no_env).is_err());
        assert!(Config::parse("admin_token = \"short\"", &no_env).is_err());
        assert!(Config::parse("[alerts]\nthresholds = [0]", &no_env).is_err());
    }

    #[test]
    fn unlisted_tiers_fall_back_to_default_then_unlimited() {
        let c = Config::parse(
            "[tiers.default]\ndaily = { limit = 5, policy = \"hard_stop\" }",
            &no_env,
        )
        .unwrap();
        assert_eq!(c.tier_policy("gold").daily.get().map(|q| q.limit), Some(5));
        let c = Config::parse("", &no_env).unwrap();
        assert_eq!(c.tier_policy("gold").limit, Setting::default());
        assert!(c.admin_token.is_none());
    }
}
