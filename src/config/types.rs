//! The filter configuration as users write it (SPEC section 2): serde types only.
//!
//! Every struct denies unknown fields: a typo such as `scope_all` must fail loudly instead of
//! silently disabling a check. Defaults live here so the whole contract is in one file.

use serde::de::{self, Deserializer};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub client_ip: ClientIpConfig,
    #[serde(default)]
    pub identity_headers: IdentityHeaders,
    pub api_keys: Option<ApiKeysConfig>,
    #[serde(default)]
    pub jwt_providers: BTreeMap<String, JwtProviderConfig>,
    #[serde(default)]
    pub rate_limits: BTreeMap<String, RateLimitConfig>,
    /// Extension: sizing of the shared-data slot tables behind rate limits.
    pub rate_limit_table: Option<RateLimitTableConfig>,
    pub cors: Option<CorsConfig>,
    /// Header name -> value; `null` removes a default header.
    #[serde(default)]
    pub security_headers: BTreeMap<String, Option<String>>,
    #[serde(default)]
    pub webhooks: BTreeMap<String, WebhookConfig>,
    pub quota: Option<QuotaConfig>,
    /// Defenses against distributed abuse (SPEC section 2, `abuse`).
    pub abuse: Option<AbuseConfig>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    pub default_route: Option<PolicyConfig>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientIpConfig {
    #[serde(default)]
    pub xff_trusted_hops: u32,
    /// Extension: mirrors the connection manager's `use_remote_address`: when true Envoy
    /// appends one `x-forwarded-for` entry that is not a client hop. No default: the filter
    /// cannot see the connection manager, and a wrong guess lets clients pick their own IP,
    /// so it must be given whenever `xff_trusted_hops > 0` (validated in `config::compile`).
    pub use_remote_address: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityHeaders {
    #[serde(default = "d_subject")]
    pub subject: String,
    #[serde(default = "d_client")]
    pub client: String,
    #[serde(default = "d_tier")]
    pub tier: String,
    #[serde(default = "d_scopes")]
    pub scopes: String,
}
fn d_subject() -> String {
    "x-auth-subject".into()
}
fn d_client() -> String {
    "x-auth-client".into()
}
fn d_tier() -> String {
    "x-auth-tier".into()
}
fn d_scopes() -> String {
    "x-auth-scopes".into()
}
impl Default for IdentityHeaders {
    fn default() -> Self {
        Self {
            subject: d_subject(),
            client: d_client(),
            tier: d_tier(),
            scopes: d_scopes(),
        }
    }
}

/// A secret given literally or as `{"env": "NAME"}` (read from the VM's environment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Secret {
    Literal(String),
    Env(String),
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct EnvRef {
            env: String,
        }
        let v = serde_json::Value::deserialize(d)?;
        match v {
            serde_json::Value::String(s) => Ok(Secret::Literal(s)),
            serde_json::Value::Object(_) => serde_json::from_value::<EnvRef>(v)
                .map(|e| Secret::Env(e.env))
                .map_err(de::Error::custom),
            _ => Err(de::Error::custom(
                "expected a string or {\"env\": \"NAME\"}",
            )),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeysConfig {
    #[serde(default = "d_api_key_header")]
    pub header: String,
    #[serde(default)]
    pub keys: Vec<ApiKeyConfig>,
    /// Whether the client's API key header reaches the upstream. Default false: the verified
    /// identity headers say who the client is; the credential itself stays at the edge (as
    /// Kong's `hide_credentials`), so an upstream log or a compromised upstream cannot leak it.
    #[serde(default)]
    pub forward: bool,
}
fn d_api_key_header() -> String {
    "x-api-key".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    pub id: String,
    /// Hex SHA-256 of the key; the key itself never appears in config.
    pub sha256: String,
    pub tier: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtProviderConfig {
    pub issuer: Option<String>,
    #[serde(default)]
    pub audiences: Vec<String>,
    pub algorithms: Vec<String>,
    pub local_jwks: Option<serde_json::Value>,
    pub remote_jwks: Option<RemoteJwksConfig>,
    #[serde(default = "d_clock_skew")]
    pub clock_skew_s: u64,
    #[serde(default = "d_true")]
    pub require_exp: bool,
    #[serde(default = "d_max_token_bytes")]
    pub max_token_bytes: usize,
    #[serde(default = "d_scope_claims")]
    pub scope_claims: Vec<String>,
    pub roles_claim: Option<String>,
    pub tier_claim: Option<String>,
    /// Claim name -> upstream header name.
    #[serde(default)]
    pub forward_claims: BTreeMap<String, String>,
    #[serde(default = "d_true")]
    pub keep_authorization: bool,
}
fn d_clock_skew() -> u64 {
    60
}
fn d_true() -> bool {
    true
}
fn d_max_token_bytes() -> usize {
    8192
}
fn d_scope_claims() -> Vec<String> {
    vec!["scope".into(), "scp".into()]
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteJwksConfig {
    pub cluster: String,
    pub authority: Option<String>,
    pub path: String,
    #[serde(default = "d_refresh_s")]
    pub refresh_s: u64,
    #[serde(default = "d_jwks_timeout_ms")]
    pub timeout_ms: u64,
}
fn d_refresh_s() -> u64 {
    600
}
fn d_jwks_timeout_ms() -> u64 {
    2000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub key: Vec<String>,
    /// `token_bucket` (default), `fixed_window` or `sliding_window`.
    pub algorithm: Option<String>,
    pub capacity: Option<u64>,
    pub refill_tokens: Option<u64>,
    pub refill_period_s: Option<u64>,
    /// Window algorithms: requests per window.
    pub limit: Option<u64>,
    pub window_s: Option<u64>,
    pub tiers: Option<BTreeMap<String, TierLimit>>,
    #[serde(default)]
    pub shadow: bool,
    pub exempt: Option<ExemptConfig>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AbuseConfig {
    pub key_sharing: Option<KeySharingConfig>,
    /// Share of a limit at which a key's first crossing is logged (`near_miss`); default 0.8.
    pub near_miss_ratio: Option<f64>,
}

/// Per route `adaptive`: tighten the route's limits while its request rate surges.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveConfig {
    #[serde(default = "d_surge_factor")]
    pub surge_factor: f64,
    #[serde(default = "d_baseline_s")]
    pub baseline_s: u64,
    #[serde(default = "d_tighten_to")]
    pub tighten_to: f64,
    #[serde(default = "d_cooldown_s")]
    pub cooldown_s: u64,
    /// Extension: the baseline's floor in requests per second (an idle route is not
    /// "surging" on a handful of requests); default 1.
    #[serde(default = "d_min_rps")]
    pub min_rps: f64,
}

fn d_surge_factor() -> f64 {
    10.0
}
fn d_baseline_s() -> u64 {
    600
}
fn d_tighten_to() -> f64 {
    0.5
}
fn d_cooldown_s() -> u64 {
    300
}
fn d_min_rps() -> f64 {
    1.0
}

/// `abuse.key_sharing`: distinct client addresses per authenticated client and window.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySharingConfig {
    #[serde(default = "d_max_distinct_ips")]
    pub max_distinct_ips: u32,
    #[serde(default = "d_key_sharing_window_s")]
    pub window_s: u64,
    #[serde(default = "d_prefix_v4")]
    pub prefix_v4: u8,
    #[serde(default = "d_prefix_v6")]
    pub prefix_v6: u8,
    /// `log` (default), `deny` or `tighten`.
    #[serde(default = "d_key_sharing_action")]
    pub action: String,
    /// Extension: how many clients the shared table tracks at once.
    #[serde(default = "d_tracked_clients")]
    pub tracked_clients: u32,
}

fn d_max_distinct_ips() -> u32 {
    20
}
fn d_key_sharing_window_s() -> u64 {
    600
}
fn d_prefix_v4() -> u8 {
    32
}
fn d_prefix_v6() -> u8 {
    64
}
fn d_key_sharing_action() -> String {
    "log".into()
}
fn d_tracked_clients() -> u32 {
    4096
}

/// Requests that bypass a limit (or every limit of a route), counted as `exempt`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExemptConfig {
    /// Client IP ranges (`10.0.0.0/8`, `2001:db8::/32`; a bare address is one host).
    #[serde(default)]
    pub cidrs: Vec<String>,
    /// Verified client identities (API key `id`, JWT `sub`).
    #[serde(default)]
    pub clients: Vec<String>,
    /// Client tiers (API key `tier`, JWT `tier_claim`).
    #[serde(default)]
    pub tiers: Vec<String>,
}

/// Limits of one tier: a bucket, or `"unlimited"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TierLimit {
    Unlimited,
    Bucket(BucketConfig),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketConfig {
    pub capacity: Option<u64>,
    pub refill_tokens: Option<u64>,
    pub refill_period_s: Option<u64>,
    pub limit: Option<u64>,
    pub window_s: Option<u64>,
}

impl<'de> Deserialize<'de> for TierLimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        match v {
            serde_json::Value::String(s) if s == "unlimited" => Ok(TierLimit::Unlimited),
            serde_json::Value::Object(_) => serde_json::from_value::<BucketConfig>(v)
                .map(TierLimit::Bucket)
                .map_err(de::Error::custom),
            _ => Err(de::Error::custom(
                "expected \"unlimited\" or {\"capacity\", \"refill_tokens\", \"refill_period_s\"} (windows: {\"limit\", \"window_s\"})",
            )),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitTableConfig {
    /// Slots per limit in shared data (each holds one bucket).
    pub slots: Option<u32>,
    /// What to do when every candidate slot for a new key is busy: `deny` or `allow`.
    pub when_full: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    #[serde(default)]
    pub allow_origins: Vec<String>,
    #[serde(default)]
    pub allow_origin_patterns: Vec<String>,
    #[serde(default = "d_cors_methods")]
    pub allow_methods: Vec<String>,
    #[serde(default)]
    pub allow_headers: Vec<String>,
    #[serde(default)]
    pub expose_headers: Vec<String>,
    #[serde(default)]
    pub allow_credentials: bool,
    pub max_age_s: Option<u64>,
}
fn d_cors_methods() -> Vec<String> {
    ["GET", "HEAD", "POST"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub scheme: String,
    pub secrets: Vec<Secret>,
    #[serde(default = "d_tolerance")]
    pub tolerance_s: u64,
    #[serde(default = "d_max_body")]
    pub max_body_bytes: usize,
    /// Extension: how many verified deliveries the replay memory holds (shared by all workers).
    #[serde(default = "d_replay_capacity")]
    pub replay_capacity: u32,
}
fn d_tolerance() -> u64 {
    300
}
fn d_max_body() -> usize {
    1_048_576
}
fn d_replay_capacity() -> u32 {
    4096
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    pub cluster: String,
    pub authority: Option<String>,
    #[serde(default = "d_quota_timeout")]
    pub timeout_ms: u64,
    #[serde(default = "d_failure_mode")]
    pub failure_mode: String,
    /// `lease` (default: pre-granted units shared by the workers, refreshed in the
    /// background) or `check` (one `/v1/check` callout per request).
    #[serde(default = "d_quota_mode")]
    pub mode: String,
    /// Extension: the circuit breaker in front of the callout.
    #[serde(default)]
    pub breaker: BreakerConfig,
}

/// After `failures` consecutive failed callouts (per worker), skip the service for `open_ms`
/// and apply `failure_mode` at once; then let one probe through.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    #[serde(default = "d_breaker_failures")]
    pub failures: u32,
    #[serde(default = "d_breaker_open_ms")]
    pub open_ms: u64,
}
fn d_breaker_failures() -> u32 {
    3
}
fn d_breaker_open_ms() -> u64 {
    5000
}
impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures: d_breaker_failures(),
            open_ms: d_breaker_open_ms(),
        }
    }
}
fn d_quota_timeout() -> u64 {
    100
}
fn d_failure_mode() -> String {
    "allow".into()
}
fn d_quota_mode() -> String {
    "lease".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: MatchConfig,
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    #[serde(default)]
    pub rate_limits: Vec<String>,
    pub cost: Option<u64>,
    #[serde(default)]
    pub quota: bool,
    pub webhook: Option<String>,
    /// Requests that bypass every rate limit of the route.
    pub exempt: Option<ExemptConfig>,
    /// Request hygiene: the largest request body accepted (413 `payload_too_large`).
    pub max_body_bytes: Option<u64>,
    /// Request hygiene: media types a request body may have (415 `unsupported_media_type`).
    pub content_types: Option<Vec<String>>,
    /// Request hygiene: a JSON Schema every request body must satisfy (400
    /// `invalid_request`); kept as JSON, compiled by `hygiene::schema`.
    pub json_schema: Option<serde_json::Value>,
    /// Request hygiene: a cap on the backend's load (503 `backend_overloaded`).
    pub backend_ceiling: Option<BackendCeilingConfig>,
    /// Adaptive tightening while the route's request rate surges.
    pub adaptive: Option<AdaptiveConfig>,
}

/// What a matched route (or the default route) applies.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    #[serde(default)]
    pub rate_limits: Vec<String>,
    pub cost: Option<u64>,
    #[serde(default)]
    pub quota: bool,
    pub webhook: Option<String>,
    pub exempt: Option<ExemptConfig>,
    /// Request hygiene: the largest request body accepted (413 `payload_too_large`).
    pub max_body_bytes: Option<u64>,
    /// Request hygiene: media types a request body may have (415 `unsupported_media_type`).
    pub content_types: Option<Vec<String>>,
    /// Request hygiene: a JSON Schema every request body must satisfy (400
    /// `invalid_request`); kept as JSON, compiled by `hygiene::schema`.
    pub json_schema: Option<serde_json::Value>,
    /// Request hygiene: a cap on the backend's load (503 `backend_overloaded`).
    pub backend_ceiling: Option<BackendCeilingConfig>,
    /// Adaptive tightening while the route's request rate surges.
    pub adaptive: Option<AdaptiveConfig>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    pub methods: Option<Vec<String>>,
    pub path: Option<String>,
    pub prefix: Option<String>,
    pub template: Option<String>,
    pub route_name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub mode: String,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub scopes_all: Vec<String>,
    #[serde(default)]
    pub scopes_any: Vec<String>,
    #[serde(default)]
    pub roles_any: Vec<String>,
}

/// Per route, across all workers and clients: requests admitted per second and/or requests
/// in flight at once; over either, 503 `backend_overloaded` with `retry-after`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendCeilingConfig {
    pub max_rps: Option<u64>,
    pub max_in_flight: Option<u64>,
    /// Extension: how long an admitted request counts in flight at most, in seconds. A
    /// request whose stream end never reaches the filter (a worker that crashed, a native
    /// stream dropped after a caught panic) stops counting after this; so does a request that
    /// really runs longer. Default 300.
    pub in_flight_expiry_s: Option<u64>,
}
