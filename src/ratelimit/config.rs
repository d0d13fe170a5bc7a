//! Semantic validation of `rate_limits` / `rate_limit_table` and compilation into the form the
//! request path uses. Errors name the JSON path, like the rest of config validation.

use super::bucket::{Algorithm, BucketParams, MAX_TOKENS};
use super::exempt::Exempt;
use super::table::{Table, WhenFull, DEFAULT_SLOTS, MAX_SLOTS, MIN_SLOTS};
use crate::config::{
    BucketConfig, ConfigError, ExemptConfig, RateLimitConfig, RawConfig, TierLimit, Warning,
};
use crate::identity::{ANONYMOUS_TIER, AUTHENTICATED_TIER};

/// Most limits one route may name (the per-request bookkeeping is a fixed array).
pub const MAX_LIMITS_PER_ROUTE: usize = 8;
/// Most parts in one limit's key.
pub const MAX_KEY_PARTS: usize = 8;
/// Longest limit name (it appears in shared-data keys, stats names and headers).
pub const MAX_NAME_LEN: usize = 64;
/// Prefix of every shared-data key of the rate limiter.
pub const KEY_PREFIX: &str = "ag:rl:";

/// One part of a bucket key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPart {
    /// The client IP (`client_ip`).
    Ip,
    /// The verified client identity; the IP when there is none.
    Client,
    /// The api-guard route name.
    Route,
    /// The client's tier (`anonymous` without identity).
    Tier,
    /// A request header (lower-case name); the IP when the header is absent.
    Header(String),
    /// A claim of the verified identity; the IP when absent.
    Claim(String),
}

impl KeyPart {
    /// Whether the part can be computed before credentials are verified.
    pub fn is_pre_auth(&self) -> bool {
        matches!(self, KeyPart::Ip | KeyPart::Route | KeyPart::Header(_))
    }

    fn parse(s: &str) -> Result<KeyPart, String> {
        match s {
            "ip" => Ok(KeyPart::Ip),
            "client" => Ok(KeyPart::Client),
            "route" => Ok(KeyPart::Route),
            "tier" => Ok(KeyPart::Tier),
            _ => {
                if let Some(h) = s.strip_prefix("header:") {
                    if !is_header_name(h) {
                        return Err(format!("'{h}' is not a valid lower-case HTTP header name"));
                    }
                    Ok(KeyPart::Header(h.to_string()))
                } else if let Some(c) = s.strip_prefix("claim:") {
                    if c.is_empty() || c.len() > 128 || c.chars().any(char::is_control) {
                        return Err("a claim name must be 1 to 128 printable characters".into());
                    }
                    Ok(KeyPart::Claim(c.to_string()))
                } else {
                    Err(format!(
                        "'{s}' is not one of \"ip\", \"client\", \"route\", \"tier\", \"header:<name>\", \"claim:<name>\""
                    ))
                }
            }
        }
    }
}

fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(b, b'-' | b'_' | b'.' | b'!' | b'#' | b'$' | b'%' | b'&')
                || matches!(b, b'\'' | b'*' | b'+' | b'^' | b'`' | b'|' | b'~')
        })
}

/// The bucket a tier gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TierRule {
    Unlimited,
    Bucket(BucketParams),
}

/// The numbers of a limit: one bucket for everyone, or one per tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitRule {
    Fixed(BucketParams),
    Tiered {
        tiers: Vec<(String, TierRule)>,
        default: Option<TierRule>,
    },
}

impl LimitRule {
    /// The bucket for `tier`; `None` when the tier is unlimited or not covered.
    pub fn params_for(&self, tier: &str) -> Option<BucketParams> {
        let rule = match self {
            LimitRule::Fixed(p) => return Some(*p),
            LimitRule::Tiered { tiers, default } => tiers
                .iter()
                .find(|(t, _)| t == tier)
                .map(|(_, r)| *r)
                .or(*default),
        };
        match rule {
            Some(TierRule::Bucket(p)) => Some(p),
            Some(TierRule::Unlimited) | None => None,
        }
    }

    fn buckets(&self) -> impl Iterator<Item = (&str, BucketParams)> {
        let (fixed, tiers, default) = match self {
            LimitRule::Fixed(p) => (Some(("", *p)), &[][..], None),
            LimitRule::Tiered { tiers, default } => (None, &tiers[..], *default),
        };
        let default = match default {
            Some(TierRule::Bucket(p)) => Some(("default", p)),
            _ => None,
        };
        fixed
            .into_iter()
            .chain(tiers.iter().filter_map(|(t, r)| match r {
                TierRule::Bucket(p) => Some((t.as_str(), *p)),
                TierRule::Unlimited => None,
            }))
            .chain(default)
    }
}

/// One compiled limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    pub name: String,
    pub key: Vec<KeyPart>,
    pub rule: LimitRule,
    pub shadow: bool,
    /// Checked before credentials: the key needs no identity, the numbers no tier, and the
    /// exemption (if any) no client or tier.
    pub pre_auth: bool,
    pub exempt: Option<Exempt>,
    pub table: Table,
    /// Shared-data key of the limit's near-miss report table (`near_miss`).
    pub near_miss_key: String,
}

/// Which limits a route applies, split by stage, and its cost.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutePlan {
    pub pre_auth: Vec<usize>,
    pub post_auth: Vec<usize>,
    pub cost: u64,
    /// The route's `exempt`: bypasses every limit of the route.
    pub exempt: Option<Exempt>,
}

impl RoutePlan {
    pub fn is_empty(&self) -> bool {
        self.pre_auth.is_empty() && self.post_auth.is_empty()
    }
}

/// Every limit of the config, ready for the request path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateLimiter {
    pub limits: Vec<Limit>,
    pub when_full: WhenFull,
    /// Header names whose values are hashed, not shown, in deny logs (credentials).
    pub secret_headers: Vec<String>,
    /// `abuse.near_miss_ratio`.
    pub near_miss: super::near_miss::NearMiss,
}

fn param_err(path: &str, e: super::bucket::ParamError) -> ConfigError {
    let field = match e {
        super::bucket::ParamError::Zero(f) | super::bucket::ParamError::TooLarge(f, _) => f,
    };
    ConfigError::new(format!("{path}.{field}"), e.to_string())
}

/// The numbers of one bucket or window at `path`: exactly the fields `algorithm` uses.
fn params(
    path: &str,
    algorithm: Algorithm,
    b: &BucketConfig,
    what: &str,
) -> Result<BucketParams, ConfigError> {
    let bucket = [
        ("capacity", b.capacity),
        ("refill_tokens", b.refill_tokens),
        ("refill_period_s", b.refill_period_s),
    ];
    let window = [("limit", b.limit), ("window_s", b.window_s)];
    type Fields<'a> = &'a [(&'a str, Option<u64>)];
    let (wanted, other): (Fields, Fields) = match algorithm {
        Algorithm::TokenBucket => (&bucket, &window),
        _ => (&window, &bucket),
    };
    let names = |f: Fields| {
        f.iter()
            .map(|(n, _)| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some((n, _)) = other.iter().find(|(_, v)| v.is_some()) {
        return Err(ConfigError::new(
            format!("{path}.{n}"),
            format!(
                "is not used by algorithm \"{}\", which takes {}",
                algorithm.as_str(),
                names(wanted)
            ),
        ));
    }
    if wanted.iter().all(|(_, v)| v.is_none()) {
        return Err(ConfigError::new(
            path,
            format!("needs {}{what}", names(wanted)),
        ));
    }
    if let Some((n, _)) = wanted.iter().find(|(_, v)| v.is_none()) {
        return Err(ConfigError::new(
            format!("{path}.{n}"),
            format!("is required with {}", names(wanted)),
        ));
    }
    let r = match algorithm {
        Algorithm::TokenBucket => BucketParams::new(
            b.capacity.unwrap_or(0),
            b.refill_tokens.unwrap_or(0),
            b.refill_period_s.unwrap_or(0),
        ),
        _ => BucketParams::window(algorithm, b.limit.unwrap_or(0), b.window_s.unwrap_or(0)),
    };
    r.map_err(|e| param_err(path, e))
}

fn compile_rule(path: &str, l: &RateLimitConfig) -> Result<LimitRule, ConfigError> {
    let algorithm = match &l.algorithm {
        None => Algorithm::TokenBucket,
        Some(a) => Algorithm::parse(a).ok_or_else(|| {
            ConfigError::new(
                format!("{path}.algorithm"),
                format!("'{a}' is not \"token_bucket\", \"sliding_window\" or \"fixed_window\""),
            )
        })?,
    };
    let own = BucketConfig {
        capacity: l.capacity,
        refill_tokens: l.refill_tokens,
        refill_period_s: l.refill_period_s,
        limit: l.limit,
        window_s: l.window_s,
    };
    let given = [
        own.capacity,
        own.refill_tokens,
        own.refill_period_s,
        own.limit,
        own.window_s,
    ]
    .iter()
    .filter(|v| v.is_some())
    .count();
    match &l.tiers {
        Some(_) if given > 0 => Err(ConfigError::new(
            path,
            "set either `tiers` or the limit's own numbers, not both",
        )),
        None => params(path, algorithm, &own, ", or `tiers`").map(LimitRule::Fixed),
        Some(tiers) => {
            if tiers.is_empty() {
                return Err(ConfigError::new(
                    format!("{path}.tiers"),
                    "must name at least one tier",
                ));
            }
            let mut out = Vec::with_capacity(tiers.len());
            let mut default = None;
            for (tier, t) in tiers {
                let tp = format!("{path}.tiers.{tier}");
                if tier.is_empty() || tier.len() > 128 {
                    return Err(ConfigError::new(
                        tp,
                        "a tier name must be 1 to 128 characters",
                    ));
                }
                let rule = match t {
                    TierLimit::Unlimited => TierRule::Unlimited,
                    TierLimit::Bucket(b) => TierRule::Bucket(params(&tp, algorithm, b, "")?),
                };
                if tier == "default" {
                    default = Some(rule);
                } else {
                    out.push((tier.clone(), rule));
                }
            }
            Ok(LimitRule::Tiered {
                tiers: out,
                default,
            })
        }
    }
}

fn compile_exempt(path: &str, e: &Option<ExemptConfig>) -> Result<Option<Exempt>, ConfigError> {
    e.as_ref()
        .map(|e| Exempt::compile(&format!("{path}.exempt"), e))
        .transpose()
}

impl RateLimiter {
    /// Validates `rate_limits` and `rate_limit_table` and compiles them. `identity_headers`
    /// (set by api-guard itself) may not be key parts: `client`/`tier` say that reliably.
    pub fn compile(raw: &RawConfig, warnings: &mut Vec<Warning>) -> Result<Self, ConfigError> {
        let (slots, when_full) = match &raw.rate_limit_table {
            None => (DEFAULT_SLOTS, WhenFull::default()),
            Some(t) => {
                let slots = t.slots.unwrap_or(DEFAULT_SLOTS);
                if !(MIN_SLOTS..=MAX_SLOTS).contains(&slots) {
                    return Err(ConfigError::new(
                        "rate_limit_table.slots",
                        format!("must be between {MIN_SLOTS} and {MAX_SLOTS}"),
                    ));
                }
                let when_full = match &t.when_full {
                    None => WhenFull::default(),
                    Some(s) => WhenFull::parse(s).ok_or_else(|| {
                        ConfigError::new(
                            "rate_limit_table.when_full",
                            format!("'{s}' is not \"allow\" or \"deny\""),
                        )
                    })?,
                };
                (slots, when_full)
            }
        };
        let ih = &raw.identity_headers;
        let own_headers = [&ih.subject, &ih.client, &ih.tier, &ih.scopes];

        let mut limits = Vec::with_capacity(raw.rate_limits.len());
        for (name, l) in &raw.rate_limits {
            let path = format!("rate_limits.{name}");
            if name.is_empty()
                || name.len() > MAX_NAME_LEN
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            {
                return Err(ConfigError::new(
                    path,
                    format!("a limit name must be 1 to {MAX_NAME_LEN} of A-Z a-z 0-9 - _ . (it appears in headers, stats and shared-data keys)"),
                ));
            }
            if l.key.is_empty() || l.key.len() > MAX_KEY_PARTS {
                return Err(ConfigError::new(
                    format!("{path}.key"),
                    format!("must list 1 to {MAX_KEY_PARTS} parts"),
                ));
            }
            let mut key = Vec::with_capacity(l.key.len());
            for (i, part) in l.key.iter().enumerate() {
                let pp = format!("{path}.key[{i}]");
                let part = KeyPart::parse(part).map_err(|m| ConfigError::new(&pp, m))?;
                if let KeyPart::Header(h) = &part {
                    if own_headers.contains(&h) {
                        return Err(ConfigError::new(
                            pp,
                            format!("'{h}' is an identity header api-guard sets itself; use \"client\" or \"tier\""),
                        ));
                    }
                }
                if key.contains(&part) {
                    return Err(ConfigError::new(pp, "is listed twice"));
                }
                key.push(part);
            }
            let rule = compile_rule(&path, l)?;
            if let LimitRule::Tiered {
                tiers,
                default: None,
            } = &rule
            {
                for t in [ANONYMOUS_TIER, AUTHENTICATED_TIER] {
                    if !tiers.iter().any(|(n, _)| n == t) {
                        warnings.push(Warning {
                            path: format!("{path}.tiers"),
                            message: format!("no \"{t}\" tier and no \"default\": requests of tier \"{t}\" are not limited by '{name}'"),
                        });
                    }
                }
            }
            let exempt = compile_exempt(&path, &l.exempt)?;
            let pre_auth = matches!(rule, LimitRule::Fixed(_))
                && key.iter().all(KeyPart::is_pre_auth)
                && !exempt.as_ref().is_some_and(Exempt::needs_identity);
            limits.push(Limit {
                table: Table::new(&format!("{KEY_PREFIX}{name}:"), slots),
                near_miss_key: super::near_miss::table_key(name),
                name: name.clone(),
                key,
                rule,
                shadow: l.shadow,
                pre_auth,
                exempt,
            });
        }
        let mut secret_headers = vec![
            "authorization".to_string(),
            "proxy-authorization".to_string(),
            "cookie".to_string(),
        ];
        if let Some(k) = &raw.api_keys {
            secret_headers.push(k.header.to_ascii_lowercase());
        }
        let near_miss = match raw.abuse.as_ref().and_then(|a| a.near_miss_ratio) {
            None => super::near_miss::NearMiss::default(),
            Some(r) if r > 0.0 && r < 1.0 => super::near_miss::NearMiss::from_ratio(r),
            Some(_) => {
                return Err(ConfigError::new(
                    "abuse.near_miss_ratio",
                    "must be greater than 0 and less than 1",
                ))
            }
        };
        Ok(RateLimiter {
            limits,
            when_full,
            secret_headers,
            near_miss,
        })
    }

    /// Resolves a route's `rate_limits`, `cost` and `exempt` into a plan, checking the cost
    /// fits every bucket it can meet. A route exemption naming clients or tiers moves the
    /// route's limits after credentials (only a verified identity can be exempt).
    pub fn plan(
        &self,
        path: &str,
        names: &[String],
        cost: u64,
        exempt: &Option<ExemptConfig>,
    ) -> Result<RoutePlan, ConfigError> {
        let exempt = compile_exempt(path, exempt)?;
        if exempt.is_some() && names.is_empty() {
            return Err(ConfigError::new(
                format!("{path}.exempt"),
                "the route has no rate_limits to be exempt from",
            ));
        }
        let identity_exempt = exempt.as_ref().is_some_and(Exempt::needs_identity);
        if names.len() > MAX_LIMITS_PER_ROUTE {
            return Err(ConfigError::new(
                format!("{path}.rate_limits"),
                format!("at most {MAX_LIMITS_PER_ROUTE} limits per route"),
            ));
        }
        if cost > MAX_TOKENS {
            return Err(ConfigError::new(
                format!("{path}.cost"),
                format!("must be at most {MAX_TOKENS}"),
            ));
        }
        let mut plan = RoutePlan {
            cost,
            exempt,
            ..RoutePlan::default()
        };
        for (i, name) in names.iter().enumerate() {
            let lp = format!("{path}.rate_limits[{i}]");
            let id = self
                .limits
                .iter()
                .position(|l| &l.name == name)
                .ok_or_else(|| {
                    ConfigError::new(&lp, format!("no rate_limits entry named '{name}'"))
                })?;
            if names[..i].contains(name) {
                return Err(ConfigError::new(lp, "is listed twice"));
            }
            let limit = &self.limits[id];
            for (tier, b) in limit.rule.buckets() {
                if cost > b.capacity() {
                    let which = if tier.is_empty() {
                        String::new()
                    } else {
                        format!(" (tier '{tier}')")
                    };
                    return Err(ConfigError::new(
                        format!("{path}.cost"),
                        format!(
                            "{cost} is more than the capacity {} of limit '{name}'{which}: no request could ever pass",
                            b.capacity()
                        ),
                    ));
                }
            }
            if limit.pre_auth && !identity_exempt {
                plan.pre_auth.push(id);
            } else {
                plan.post_auth.push(id);
            }
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(json: &str) -> Result<(RateLimiter, Vec<Warning>), ConfigError> {
        let raw: RawConfig =
            serde_json::from_str(json).map_err(|e| ConfigError::new("", e.to_string()))?;
        let mut w = Vec::new();
        RateLimiter::compile(&raw, &mut w).map(|r| (r, w))
    }

    fn err(json: &str) -> ConfigError {
        compile(json).unwrap_err()
    }

    #[test]
    fn the_spec_example_compiles_and_splits_by_stage() {
        let (rl, w) = compile(
            r#"{"rate_limits": {
                "login-per-ip": { "key": ["ip"], "capacity": 5, "refill_tokens": 5, "refill_period_s": 60 },
                "per-client": { "key": ["client"], "tiers": {
                    "anonymous": { "capacity": 15,  "refill_tokens": 10,  "refill_period_s": 60 },
                    "free":      { "capacity": 100, "refill_tokens": 60,  "refill_period_s": 60 },
                    "internal":  "unlimited" } },
                "by-header": { "key": ["header:x-tenant", "route"], "capacity": 1, "refill_tokens": 1, "refill_period_s": 1 },
                "ip-tiered": { "key": ["ip"], "tiers": { "default": { "capacity": 3, "refill_tokens": 1, "refill_period_s": 1 } } }
            }}"#,
        )
        .unwrap();
        let by = |n: &str| rl.limits.iter().find(|l| l.name == n).unwrap();
        assert!(by("login-per-ip").pre_auth);
        assert!(by("by-header").pre_auth);
        assert!(!by("per-client").pre_auth);
        assert!(!by("ip-tiered").pre_auth, "tiers need the identity");
        let pc = &by("per-client").rule;
        assert_eq!(pc.params_for("anonymous").unwrap().capacity(), 15);
        assert_eq!(pc.params_for("internal"), None);
        assert_eq!(pc.params_for("pro"), None);
        assert_eq!(
            by("ip-tiered")
                .rule
                .params_for("anything")
                .unwrap()
                .capacity(),
            3
        );
        // per-client has no "authenticated" tier and no default: the user is told.
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].message.contains("authenticated"));
        assert_eq!(by("per-client").table.slots(), u64::from(DEFAULT_SLOTS));

        let plan = rl
            .plan(
                "routes[0]",
                &["per-client".into(), "login-per-ip".into()],
                2,
                &None,
            )
            .unwrap();
        assert_eq!(plan.pre_auth.len(), 1);
        assert_eq!(plan.post_auth.len(), 1);
        assert_eq!(rl.limits[plan.pre_auth[0]].name, "login-per-ip");
        assert_eq!(plan.cost, 2);
    }

    #[test]
    fn bucket_fields_are_all_or_nothing_and_bounded() {
        let base = |body: &str| format!(r#"{{"rate_limits":{{"l":{{"key":["ip"],{body}}}}}}}"#);
        assert_eq!(
            err(&base(r#""capacity":1,"refill_tokens":1"#)).path,
            "rate_limits.l.refill_period_s"
        );
        assert_eq!(err(&base(r#""shadow":true"#)).path, "rate_limits.l");
        assert_eq!(
            err(&base(r#""capacity":1,"tiers":{"a":"unlimited"}"#)).path,
            "rate_limits.l"
        );
        assert_eq!(
            err(&base(
                r#""capacity":0,"refill_tokens":1,"refill_period_s":1"#
            ))
            .path,
            "rate_limits.l.capacity"
        );
        assert_eq!(
            err(&base(
                r#""capacity":1,"refill_tokens":1,"refill_period_s":99999999999"#
            ))
            .path,
            "rate_limits.l.refill_period_s"
        );
        assert_eq!(
            err(&base(
                r#""capacity":18446744073709551615,"refill_tokens":1,"refill_period_s":1"#
            ))
            .path,
            "rate_limits.l.capacity"
        );
        assert_eq!(err(&base(r#""tiers":{}"#)).path, "rate_limits.l.tiers");
        assert_eq!(
            err(&base(
                r#""tiers":{"pro":{"capacity":1,"refill_tokens":0,"refill_period_s":1}}"#
            ))
            .path,
            "rate_limits.l.tiers.pro.refill_tokens"
        );
    }

    #[test]
    fn key_parts_and_names_are_checked() {
        let lim = |name: &str, key: &str| {
            format!(
                r#"{{"rate_limits":{{"{name}":{{"key":{key},"capacity":1,"refill_tokens":1,"refill_period_s":1}}}}}}"#
            )
        };
        assert_eq!(
            err(&lim("l", r#"["ip","cookie"]"#)).path,
            "rate_limits.l.key[1]"
        );
        assert_eq!(
            err(&lim("l", r#"["header:X-Up"]"#)).path,
            "rate_limits.l.key[0]"
        );
        assert_eq!(
            err(&lim("l", r#"["header:"]"#)).path,
            "rate_limits.l.key[0]"
        );
        assert_eq!(err(&lim("l", r#"["claim:"]"#)).path, "rate_limits.l.key[0]");
        assert_eq!(
            err(&lim("l", r#"["ip","ip"]"#)).path,
            "rate_limits.l.key[1]"
        );
        assert_eq!(err(&lim("l", "[]")).path, "rate_limits.l.key");
        let e = err(&lim("l", r#"["header:x-auth-client"]"#));
        assert!(e.message.contains("client"), "{e}");
        assert_eq!(err(&lim("a\\\"b", r#"["ip"]"#)).path, "rate_limits.a\"b");
        assert!(err(&lim(&"n".repeat(65), r#"["ip"]"#))
            .path
            .starts_with("rate_limits.n"));
        assert!(compile(&lim(
            "ok.name_1-x",
            r#"["claim:tenant","header:x-user","tier","route","client"]"#
        ))
        .is_ok());
    }

    #[test]
    fn table_settings_are_checked() {
        assert_eq!(
            err(r#"{"rate_limit_table":{"slots":0}}"#).path,
            "rate_limit_table.slots"
        );
        assert_eq!(
            err(r#"{"rate_limit_table":{"slots":4294967295}}"#).path,
            "rate_limit_table.slots"
        );
        assert_eq!(
            err(r#"{"rate_limit_table":{"when_full":"maybe"}}"#).path,
            "rate_limit_table.when_full"
        );
        let (rl, _) = compile(
            r#"{"rate_limit_table":{"slots":100,"when_full":"deny"},"rate_limits":{"l":{"key":["ip"],"capacity":1,"refill_tokens":1,"refill_period_s":1}}}"#,
        )
        .unwrap();
        assert_eq!(rl.when_full, WhenFull::Deny);
        assert_eq!(rl.limits[0].table.slots(), 104, "rounded up to whole pages");
    }

    #[test]
    fn route_plans_check_cost_and_count() {
        let (rl, _) = compile(
            r#"{"rate_limits":{
                "a":{"key":["ip"],"capacity":5,"refill_tokens":1,"refill_period_s":1},
                "t":{"key":["client"],"tiers":{"free":{"capacity":3,"refill_tokens":1,"refill_period_s":1},"vip":"unlimited"}}}}"#,
        )
        .unwrap();
        assert!(rl
            .plan("routes[0]", &["a".into(), "t".into()], 3, &None)
            .is_ok());
        let e = rl
            .plan("routes[0]", &["a".into(), "t".into()], 4, &None)
            .unwrap_err();
        assert_eq!(e.path, "routes[0].cost");
        assert!(e.message.contains("'free'"), "{e}");
        assert_eq!(
            rl.plan("routes[0]", &["a".into(), "a".into()], 1, &None)
                .unwrap_err()
                .path,
            "routes[0].rate_limits[1]"
        );
        assert_eq!(
            rl.plan("r", &["zz".into()], 1, &None).unwrap_err().path,
            "r.rate_limits[0]"
        );
        let many: Vec<String> = (0..9).map(|_| "a".to_string()).collect();
        assert_eq!(
            rl.plan("r", &many, 1, &None).unwrap_err().path,
            "r.rate_limits"
        );
        assert_eq!(
            rl.plan("r", &[], u64::MAX, &None).unwrap_err().path,
            "r.cost"
        );
    }

    #[test]
    fn window_algorithms_take_limit_and_window_s_only() {
        let (rl, _) = compile(
            r#"{"rate_limits":{
                "m":{"key":["ip"],"algorithm":"sliding_window","limit":100,"window_s":60},
                "d":{"key":["client"],"algorithm":"fixed_window","tiers":{"free":{"limit":1000,"window_s":86400},"default":"unlimited"}}}}"#,
        )
        .unwrap();
        let LimitRule::Fixed(p) = rl.limits[1].rule else {
            panic!("{:?}", rl.limits[1].rule)
        };
        assert_eq!(p.algorithm(), Algorithm::SlidingWindow);
        assert_eq!((p.capacity(), p.refill_period_s()), (100, 60));
        assert!(rl.limits[1].pre_auth);
        let free = rl.limits[0].rule.params_for("free").unwrap();
        assert_eq!(free.algorithm(), Algorithm::FixedWindow);
        assert_eq!((free.capacity(), free.refill_period_s()), (1000, 86400));

        for (json, path) in [
            (
                r#""algorithm":"leaky","limit":1,"window_s":1"#,
                "rate_limits.l.algorithm",
            ),
            (
                r#""algorithm":"fixed_window","capacity":1,"limit":1,"window_s":1"#,
                "rate_limits.l.capacity",
            ),
            (
                r#""algorithm":"fixed_window","limit":1"#,
                "rate_limits.l.window_s",
            ),
            (
                r#""algorithm":"sliding_window","limit":0,"window_s":1"#,
                "rate_limits.l.limit",
            ),
            (
                r#""algorithm":"sliding_window","limit":1,"window_s":40000000"#,
                "rate_limits.l.window_s",
            ),
            (r#""limit":5,"window_s":1"#, "rate_limits.l.limit"),
            (r#""algorithm":"fixed_window""#, "rate_limits.l"),
            (
                r#""algorithm":"fixed_window","tiers":{"a":{"capacity":1,"refill_tokens":1,"refill_period_s":1}}"#,
                "rate_limits.l.tiers.a.capacity",
            ),
        ] {
            let e = err(&format!(
                r#"{{"rate_limits":{{"l":{{"key":["ip"],{json}}}}}}}"#
            ));
            assert_eq!(e.path, path, "{json}: {e}");
        }
    }

    #[test]
    fn exemptions_by_identity_wait_for_credentials() {
        let (rl, _) = compile(
            r#"{"rate_limits":{
                "ipc":{"key":["ip"],"capacity":5,"refill_tokens":1,"refill_period_s":1,"exempt":{"cidrs":["10.0.0.0/8"]}},
                "ipi":{"key":["ip"],"capacity":5,"refill_tokens":1,"refill_period_s":1,"exempt":{"clients":["svc"]}}}}"#,
        )
        .unwrap();
        let by = |n: &str| rl.limits.iter().find(|l| l.name == n).unwrap();
        assert!(by("ipc").pre_auth, "a CIDR is known before credentials");
        assert!(
            !by("ipi").pre_auth,
            "a client exemption needs the verified identity"
        );
        let names = ["ipc".to_string()];
        let tiers = ExemptConfig {
            tiers: vec!["internal".into()],
            ..ExemptConfig::default()
        };
        let plan = rl.plan("r", &names, 1, &Some(tiers)).unwrap();
        assert!(plan.pre_auth.is_empty() && plan.post_auth.len() == 1);
        let cidr = ExemptConfig {
            cidrs: vec!["192.0.2.0/24".into()],
            ..ExemptConfig::default()
        };
        let plan = rl.plan("r", &names, 1, &Some(cidr.clone())).unwrap();
        assert_eq!(plan.pre_auth.len(), 1);
        assert_eq!(
            rl.plan("r", &[], 1, &Some(cidr)).unwrap_err().path,
            "r.exempt"
        );
        assert_eq!(
            err(r#"{"rate_limits":{"l":{"key":["ip"],"capacity":1,"refill_tokens":1,"refill_period_s":1,"exempt":{"cidrs":["nope"]}}}}"#).path,
            "rate_limits.l.exempt.cidrs[0]"
        );
    }
}
