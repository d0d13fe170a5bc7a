//! Filter configuration: parsing, validation (errors name the JSON path) and compilation into
//! the form the request path uses. The same code runs in the filter and in `api-guard check`.

pub mod types;

use crate::routes::{self, Matcher, PathMatch};
use std::fmt;
pub use types::*;

/// A config problem, located by its JSON path (`routes[1].match.prefix`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() || self.path == "." {
            write!(f, "config: {}", self.message)
        } else {
            write!(f, "config at `{}`: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Something legal but probably not what the user meant; `api-guard check` prints these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub path: String,
    pub message: String,
}

/// The security headers set on every response unless the upstream set them (SPEC section 3).
pub const DEFAULT_SECURITY_HEADERS: [(&str, &str); 5] = [
    (
        "strict-transport-security",
        "max-age=31536000; includeSubDomains",
    ),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "strict-origin-when-cross-origin"),
    (
        "permissions-policy",
        "geolocation=(), camera=(), microphone=(), payment=()",
    ),
];

/// What a route applies once matched.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub auth: Option<AuthConfig>,
    pub rate_limits: Vec<String>,
    pub cost: u64,
    pub quota: bool,
    pub webhook: Option<String>,
    /// `rate_limits` resolved and split into pre-auth / post-auth stages.
    pub limits: crate::ratelimit::RoutePlan,
    /// `max_body_bytes`, `content_types`, `json_schema`, `backend_ceiling`; `None` when none
    /// is set.
    pub hygiene: Option<crate::hygiene::Hygiene>,
    /// Adaptive tightening (`adaptive`); its `prepare` must run in `on_configure`.
    pub adaptive: Option<crate::abuse::adaptive::Adaptive>,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub matcher: Matcher,
    pub policy: Policy,
}

/// The validated, compiled configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub client_ip: ClientIpConfig,
    pub identity_headers: IdentityHeaders,
    pub routes: Vec<Route>,
    pub default_route: Option<Policy>,
    /// Final list of (lower-case name, value) security headers to set when absent.
    pub security_headers: Vec<(String, String)>,
    /// Whether any route matches on the Envoy route name (saves a host call when none does).
    pub needs_route_name: bool,
    /// Every header name the filter strips from client requests: identity and forwarded-claim
    /// headers, the API key header unless `api_keys.forward`, method-override headers.
    pub stripped_request_headers: Vec<String>,
    /// The compiled `cors` section; `None` when CORS is off.
    pub cors: Option<crate::cors::CorsPolicy>,
    /// Compiled `webhooks` entries (keys decoded, replay tables sized).
    pub webhooks: crate::webhook::Webhooks,
    /// Compiled `rate_limits`; its `prepare` must run in `on_configure`.
    pub rate_limiter: crate::ratelimit::RateLimiter,
    /// Compiled `abuse`; its `prepare` must run in `on_configure`.
    pub abuse: crate::abuse::Abuse,
    /// Compiled `jwt_providers` and `api_keys` (validated here so bad keys fail the config).
    pub auth: crate::auth::Authenticator,
    pub raw: RawConfig,
}

/// Looks up `{"env": "NAME"}` secrets; the filter passes the VM environment.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Resolves a secret, naming its path when the variable is missing or empty.
pub fn resolve_secret(s: &Secret, path: &str, env: EnvLookup<'_>) -> Result<String, ConfigError> {
    match s {
        Secret::Literal(v) if v.is_empty() => Err(ConfigError::new(path, "secret is empty")),
        Secret::Literal(v) => Ok(v.clone()),
        Secret::Env(name) => match env(name) {
            Some(v) if !v.is_empty() => Ok(v),
            Some(_) => Err(ConfigError::new(
                path,
                format!("environment variable {name} is empty"),
            )),
            None => Err(ConfigError::new(
                path,
                format!(
                    "environment variable {name} is not set (wasm filter: list it in vm_config.environment_variables; dynamic module: set it in Envoy's environment)"
                ),
            )),
        },
    }
}

/// Parses and validates a config document. Returns the compiled config and warnings.
pub fn parse(json: &[u8], env: EnvLookup<'_>) -> Result<(Config, Vec<Warning>), ConfigError> {
    let de = &mut serde_json::Deserializer::from_slice(json);
    let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // serde_json appends " at line L column C"; keep it, it helps with long configs.
        ConfigError::new(path, inner.to_string())
    })?;
    compile(raw, env)
}

fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(b, b'-' | b'_' | b'.' | b'!' | b'#' | b'$' | b'%' | b'&')
                || matches!(b, b'\'' | b'*' | b'+' | b'^' | b'`' | b'|' | b'~')
        })
}

fn check_header_name(path: &str, name: &str) -> Result<(), ConfigError> {
    if is_header_name(name) {
        Ok(())
    } else {
        Err(ConfigError::new(
            path,
            format!("'{name}' is not a valid lower-case HTTP header name"),
        ))
    }
}

/// Refuses a scope or role rule that no credential the route accepts can ever satisfy: the
/// route would answer 403 to every request, and a config that looks protective but only
/// denies is a trap (an operator "fixes" it by loosening something else).
fn check_satisfiable(raw: &RawConfig, ap: &str, a: &AuthConfig) -> Result<(), ConfigError> {
    fn jwt<'a>(raw: &'a RawConfig, m: &'a str) -> Option<(&'a str, &'a JwtProviderConfig)> {
        m.strip_prefix("jwt:")
            .and_then(|p| raw.jwt_providers.get(p).map(|c| (p, c)))
    }
    if !a.roles_any.is_empty() {
        // Only JWTs carry roles (API keys have scopes and a tier, no roles).
        let carriers = a
            .methods
            .iter()
            .filter_map(|m| jwt(raw, m))
            .filter(|(_, c)| c.roles_claim.is_some())
            .count();
        if carriers == 0 {
            let hint = match a.methods.iter().find_map(|m| jwt(raw, m)) {
                Some((p, _)) => format!(
                    "set jwt_providers.{p}.roles_claim (e.g. \"roles\") to the claim that holds them"
                ),
                None => "accept a JWT provider that sets roles_claim (API keys carry no roles)"
                    .to_string(),
            };
            return Err(ConfigError::new(
                format!("{ap}.roles_any"),
                format!(
                    "no credential this route accepts can carry roles, so every request would get \
                     403: {hint}"
                ),
            ));
        }
    }
    let wanted: Vec<&String> = a.scopes_all.iter().chain(&a.scopes_any).collect();
    if !wanted.is_empty() {
        let jwt_carries = a
            .methods
            .iter()
            .filter_map(|m| jwt(raw, m))
            .any(|(_, c)| !c.scope_claims.is_empty());
        // An API key passes only if some configured key holds the scopes the rule needs.
        let key_carries = a.methods.iter().any(|m| m == "api_key")
            && raw.api_keys.as_ref().is_some_and(|k| {
                k.keys.iter().any(|key| {
                    a.scopes_all.iter().all(|s| key.scopes.contains(s))
                        && (a.scopes_any.is_empty()
                            || a.scopes_any.iter().any(|s| key.scopes.contains(s)))
                })
            });
        if !jwt_carries && !key_carries {
            let field = if a.scopes_all.is_empty() {
                "scopes_any"
            } else {
                "scopes_all"
            };
            return Err(ConfigError::new(
                format!("{ap}.{field}"),
                "no credential this route accepts can satisfy it, so every request would get \
                 403: accept a JWT provider whose scope_claims is not empty, or give an API key \
                 the scopes",
            ));
        }
    }
    Ok(())
}

fn compile_policy(
    raw: &RawConfig,
    path: &str,
    auth: &Option<AuthConfig>,
    rate_limits: &[String],
    cost: Option<u64>,
    quota: bool,
    webhook: &Option<String>,
) -> Result<Policy, ConfigError> {
    if let Some(a) = auth {
        let ap = format!("{path}.auth");
        if !matches!(a.mode.as_str(), "none" | "optional" | "required") {
            return Err(ConfigError::new(
                format!("{ap}.mode"),
                format!(
                    "'{}' is not one of \"none\", \"optional\", \"required\"",
                    a.mode
                ),
            ));
        }
        if a.mode != "none" && a.methods.is_empty() {
            return Err(ConfigError::new(
                format!("{ap}.methods"),
                "must list at least one of \"jwt:<provider>\" or \"api_key\" when mode is not \"none\"",
            ));
        }
        for (i, m) in a.methods.iter().enumerate() {
            let mp = format!("{ap}.methods[{i}]");
            if m == "api_key" {
                if raw.api_keys.is_none() {
                    return Err(ConfigError::new(
                        mp,
                        "\"api_key\" needs an `api_keys` section",
                    ));
                }
            } else if let Some(p) = m.strip_prefix("jwt:") {
                if !raw.jwt_providers.contains_key(p) {
                    return Err(ConfigError::new(
                        mp,
                        format!("no jwt_providers entry named '{p}'"),
                    ));
                }
            } else {
                return Err(ConfigError::new(
                    mp,
                    format!("'{m}' is not \"api_key\" or \"jwt:<provider>\""),
                ));
            }
        }
        // Scopes are echoed in `www-authenticate: Bearer ..., scope="..."`: a quote, a
        // backslash or a control character there would break (or split) that header. And a
        // name with a space can never match, since token scopes are space-delimited.
        for (field, list, quoted) in [
            ("scopes_all", &a.scopes_all, true),
            ("scopes_any", &a.scopes_any, true),
            ("roles_any", &a.roles_any, false),
        ] {
            for (j, s) in list.iter().enumerate() {
                let ok = !s.is_empty()
                    && s.len() <= 256
                    && s.bytes()
                        .all(|b| b.is_ascii_graphic() && !(quoted && matches!(b, b'"' | b'\\')));
                if !ok {
                    return Err(ConfigError::new(
                        format!("{ap}.{field}[{j}]"),
                        if quoted {
                            "a scope is 1-256 visible ASCII characters, without spaces, '\"' or '\\'"
                        } else {
                            "a role is 1-256 visible ASCII characters, without spaces"
                        },
                    ));
                }
            }
        }
        check_satisfiable(raw, &ap, a)?;
        if a.mode == "none"
            && !(a.scopes_all.is_empty() && a.scopes_any.is_empty() && a.roles_any.is_empty())
        {
            return Err(ConfigError::new(
                ap,
                "scopes_all/scopes_any/roles_any need mode \"optional\" or \"required\"",
            ));
        }
    }
    for (i, name) in rate_limits.iter().enumerate() {
        if !raw.rate_limits.contains_key(name) {
            return Err(ConfigError::new(
                format!("{path}.rate_limits[{i}]"),
                format!("no rate_limits entry named '{name}'"),
            ));
        }
    }
    if cost == Some(0) {
        return Err(ConfigError::new(
            format!("{path}.cost"),
            "must be at least 1",
        ));
    }
    if quota && raw.quota.is_none() {
        return Err(ConfigError::new(
            format!("{path}.quota"),
            "needs a top-level `quota` section naming the quota service cluster",
        ));
    }
    if let Some(w) = webhook {
        if !raw.webhooks.contains_key(w) {
            return Err(ConfigError::new(
                format!("{path}.webhook"),
                format!("no webhooks entry named '{w}'"),
            ));
        }
    }
    Ok(Policy {
        auth: auth.clone(),
        rate_limits: rate_limits.to_vec(),
        cost: cost.unwrap_or(1),
        quota,
        webhook: webhook.clone(),
        limits: Default::default(),
        hygiene: None,
        adaptive: None,
    })
}

fn compile_matcher(path: &str, m: &MatchConfig) -> Result<Matcher, ConfigError> {
    let methods = match &m.methods {
        None => None,
        Some(list) if list.is_empty() => {
            return Err(ConfigError::new(
                format!("{path}.methods"),
                "must not be empty (leave it out to match any method)",
            ))
        }
        Some(list) => {
            for (i, meth) in list.iter().enumerate() {
                if meth.is_empty() || !meth.bytes().all(|b| b.is_ascii_uppercase()) {
                    return Err(ConfigError::new(
                        format!("{path}.methods[{i}]"),
                        format!("'{meth}' is not an upper-case HTTP method"),
                    ));
                }
            }
            Some(list.clone())
        }
    };
    let given = [&m.path, &m.prefix, &m.template, &m.route_name]
        .iter()
        .filter(|x| x.is_some())
        .count();
    if given != 1 {
        return Err(ConfigError::new(
            path,
            "needs exactly one of `path`, `prefix`, `template`, `route_name`",
        ));
    }
    let rule = if let Some(p) = &m.path {
        PathMatch::Exact(
            routes::check_config_path(p)
                .map_err(|e| ConfigError::new(format!("{path}.path"), e))?,
        )
    } else if let Some(p) = &m.prefix {
        PathMatch::Prefix(
            routes::check_config_path(p)
                .map_err(|e| ConfigError::new(format!("{path}.prefix"), e))?,
        )
    } else if let Some(t) = &m.template {
        PathMatch::Template(
            routes::compile_template(t)
                .map_err(|e| ConfigError::new(format!("{path}.template"), e))?,
        )
    } else {
        let n = m.route_name.clone().unwrap_or_default();
        if n.is_empty() {
            return Err(ConfigError::new(
                format!("{path}.route_name"),
                "must not be empty",
            ));
        }
        PathMatch::RouteName(n)
    };
    Ok(Matcher {
        methods,
        path: rule,
    })
}

/// Method-override headers (Rails, Express method-override, Spring, ASP.NET, Google APIs):
/// always removed from the upstream request, since authorization ran on `:method`.
pub const METHOD_OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-method-override",
    "x-http-method",
];

/// Validates a parsed config and compiles it.
pub fn compile(raw: RawConfig, env: EnvLookup<'_>) -> Result<(Config, Vec<Warning>), ConfigError> {
    let mut warnings = Vec::new();

    let ih = &raw.identity_headers;
    for (field, v) in [
        ("subject", &ih.subject),
        ("client", &ih.client),
        ("tier", &ih.tier),
        ("scopes", &ih.scopes),
    ] {
        check_header_name(&format!("identity_headers.{field}"), v)?;
    }
    let mut stripped = vec![
        ih.subject.clone(),
        ih.client.clone(),
        ih.tier.clone(),
        ih.scopes.clone(),
    ];
    for (name, p) in &raw.jwt_providers {
        for (claim, header) in &p.forward_claims {
            check_header_name(
                &format!("jwt_providers.{name}.forward_claims.{claim}"),
                header,
            )?;
            if !stripped.contains(header) {
                stripped.push(header.clone());
            }
        }
    }

    let cip = &raw.client_ip;
    if cip.xff_trusted_hops > 0 && cip.use_remote_address.is_none() {
        // A guess here is a bypass either way: the filter cannot see the connection manager.
        return Err(ConfigError::new(
            "client_ip.use_remote_address",
            format!(
                "must be set when xff_trusted_hops is {} (> 0): true if the connection manager \
                 sets use_remote_address: true (Envoy then appends the peer to x-forwarded-for \
                 and the filter skips that entry), false if it keeps Envoy's default (false). \
                 A wrong value keys per-IP limits on an address the client wrote. Simplest safe \
                 setup: let Envoy resolve the client (use_remote_address: true and \
                 xff_num_trusted_hops: {} on the connection manager) and keep \
                 client_ip.xff_trusted_hops at 0",
                cip.xff_trusted_hops, cip.xff_trusted_hops
            ),
        ));
    }

    if let Some(k) = &raw.api_keys {
        // Envoy hands the filter lower-case names: an upper-case or malformed name here
        // would silently never match, failing every API-key request as "missing".
        check_header_name("api_keys.header", &k.header)?;
        if !k.forward && !stripped.contains(&k.header) {
            stripped.push(k.header.clone());
        }
    }
    // A backend framework that honours these runs a method the filter never authorized
    // (a DELETE authorized as a GET): they never reach the upstream.
    for h in METHOD_OVERRIDE_HEADERS {
        stripped.push(h.to_string());
    }

    let mut security_headers: Vec<(String, String)> = DEFAULT_SECURITY_HEADERS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (name, value) in &raw.security_headers {
        let path = format!("security_headers.{name}");
        check_header_name(&path, name)?;
        match value {
            None => security_headers.retain(|(k, _)| k != name),
            Some(v) => {
                if v.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f) {
                    return Err(ConfigError::new(path, "value contains a control character"));
                }
                match security_headers.iter_mut().find(|(k, _)| k == name) {
                    Some(slot) => slot.1 = v.clone(),
                    None => security_headers.push((name.clone(), v.clone())),
                }
            }
        }
    }

    let cors = match &raw.cors {
        Some(c) => Some(crate::cors::compile(c, &mut warnings)?),
        None => None,
    };

    if let Some(q) = &raw.quota {
        if !matches!(q.failure_mode.as_str(), "allow" | "deny") {
            return Err(ConfigError::new(
                "quota.failure_mode",
                format!("'{}' is not \"allow\" or \"deny\"", q.failure_mode),
            ));
        }
        if !matches!(q.mode.as_str(), "lease" | "check") {
            return Err(ConfigError::new(
                "quota.mode",
                format!("'{}' is not \"lease\" or \"check\"", q.mode),
            ));
        }
        if q.cluster.is_empty() {
            return Err(ConfigError::new("quota.cluster", "must not be empty"));
        }
        if q.timeout_ms == 0 {
            return Err(ConfigError::new("quota.timeout_ms", "must be at least 1"));
        }
        if q.breaker.failures == 0 {
            return Err(ConfigError::new(
                "quota.breaker.failures",
                "must be at least 1",
            ));
        }
        if q.breaker.open_ms == 0 || q.breaker.open_ms > 3_600_000 {
            return Err(ConfigError::new(
                "quota.breaker.open_ms",
                "must be 1..=3600000",
            ));
        }
    }

    let (webhooks, webhook_warnings) = crate::webhook::compile(&raw.webhooks, env)?;
    warnings.extend(webhook_warnings);

    let rate_limiter = crate::ratelimit::RateLimiter::compile(&raw, &mut warnings)?;

    let abuse = crate::abuse::Abuse::compile(&raw)?;
    let auth = crate::auth::Authenticator::compile(&raw, env)?;

    let mut routes_out = Vec::with_capacity(raw.routes.len());
    let mut needs_route_name = false;
    for (i, r) in raw.routes.iter().enumerate() {
        let path = format!("routes[{i}]");
        if r.name.is_empty() {
            return Err(ConfigError::new(
                format!("{path}.name"),
                "must not be empty",
            ));
        }
        if raw.routes[..i].iter().any(|o| o.name == r.name) {
            return Err(ConfigError::new(
                format!("{path}.name"),
                format!("route name '{}' is used twice", r.name),
            ));
        }
        let matcher = compile_matcher(&format!("{path}.match"), &r.matcher)?;
        needs_route_name |= matches!(matcher.path, PathMatch::RouteName(_));
        let mut policy = compile_policy(
            &raw,
            &path,
            &r.auth,
            &r.rate_limits,
            r.cost,
            r.quota,
            &r.webhook,
        )?;
        policy.limits = rate_limiter.plan(&path, &policy.rate_limits, policy.cost, &r.exempt)?;
        policy.hygiene = crate::hygiene::compile(
            &path,
            &format!("ag:ceil:r:{}", r.name),
            r.max_body_bytes,
            r.content_types.as_deref(),
            r.json_schema.as_ref(),
            r.backend_ceiling.as_ref(),
        )?;
        policy.adaptive = r
            .adaptive
            .as_ref()
            .map(|a| {
                crate::abuse::compile_adaptive(
                    &format!("{path}.adaptive"),
                    &format!("ag:adapt:r:{}", r.name),
                    a,
                    &policy,
                    &mut warnings,
                )
            })
            .transpose()?;
        routes_out.push(Route {
            name: r.name.clone(),
            matcher,
            policy,
        });
    }
    let default_route = match &raw.default_route {
        Some(d) => {
            let mut policy = compile_policy(
                &raw,
                "default_route",
                &d.auth,
                &d.rate_limits,
                d.cost,
                d.quota,
                &d.webhook,
            )?;
            policy.limits =
                rate_limiter.plan("default_route", &policy.rate_limits, policy.cost, &d.exempt)?;
            policy.hygiene = crate::hygiene::compile(
                "default_route",
                "ag:ceil:d",
                d.max_body_bytes,
                d.content_types.as_deref(),
                d.json_schema.as_ref(),
                d.backend_ceiling.as_ref(),
            )?;
            policy.adaptive = d
                .adaptive
                .as_ref()
                .map(|a| {
                    crate::abuse::compile_adaptive(
                        "default_route.adaptive",
                        "ag:adapt:d",
                        a,
                        &policy,
                        &mut warnings,
                    )
                })
                .transpose()?;
            Some(policy)
        }
        None => {
            warnings.push(Warning {
                path: "default_route".into(),
                message: "no default_route: requests matching no route pass with only security headers, CORS and path checks (no auth, no rate limit); add a default_route".into(),
            });
            None
        }
    };

    Ok((
        Config {
            client_ip: raw.client_ip.clone(),
            identity_headers: raw.identity_headers.clone(),
            routes: routes_out,
            default_route,
            security_headers,
            needs_route_name,
            stripped_request_headers: stripped,
            cors,
            webhooks,
            rate_limiter,
            abuse,
            auth,
            raw,
        },
        warnings,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn err(json: &str) -> ConfigError {
        parse(json.as_bytes(), &no_env).unwrap_err()
    }

    #[test]
    fn empty_config_is_valid_and_warns_about_default_route() {
        let (c, w) = parse(b"{}", &no_env).unwrap();
        assert_eq!(c.security_headers.len(), 5);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].path, "default_route");
    }

    #[test]
    fn unknown_fields_are_errors_with_their_path() {
        let e = err(
            r#"{"routes":[{"name":"a","match":{"path":"/a"},"auth":{"mode":"none","scope_all":[]}}]}"#,
        );
        assert_eq!(e.path, "routes[0].auth.scope_all");
        assert!(e.message.contains("scope_all"), "{e}");
        let e = err(r#"{"cors_typo": {}}"#);
        assert!(e.message.contains("cors_typo"), "{e}");
        // Issue 14, item 1: with trusted hops the filter must be told whether Envoy
        // appended an entry; a guess lets a client choose its own address.
        let e = err(r#"{"client_ip":{"xff_trusted_hops":1}}"#);
        assert_eq!(e.path, "client_ip.use_remote_address");
        assert!(e.message.contains("xff_num_trusted_hops"), "{e}");
        for ura in ["true", "false"] {
            let doc =
                format!(r#"{{"client_ip":{{"xff_trusted_hops":2,"use_remote_address":{ura}}}}}"#);
            assert!(parse(doc.as_bytes(), &no_env).is_ok());
        }
        assert!(parse(br#"{"client_ip":{"xff_trusted_hops":0}}"#, &no_env).is_ok());
        let e = err(r#"{"client_ip":{"xff_trusted_hops":-1}}"#);
        assert_eq!(e.path, "client_ip.xff_trusted_hops");
    }

    #[test]
    fn route_rules_are_checked() {
        assert_eq!(
            err(r#"{"routes":[{"name":"a","match":{"path":"/a","prefix":"/b"}}]}"#).path,
            "routes[0].match"
        );
        assert_eq!(
            err(r#"{"routes":[{"name":"a","match":{}}]}"#).path,
            "routes[0].match"
        );
        assert_eq!(
            err(r#"{"routes":[{"name":"a","match":{"prefix":"/a/../b"}}]}"#).path,
            "routes[0].match.prefix"
        );
        assert_eq!(
            err(r#"{"routes":[{"name":"a","match":{"methods":["get"],"path":"/a"}}]}"#).path,
            "routes[0].match.methods[0]"
        );
        assert_eq!(
            err(r#"{"routes":[{"name":"a","match":{"path":"/a"}},{"name":"a","match":{"path":"/b"}}]}"#).path,
            "routes[1].name"
        );
        assert_eq!(
            err(r#"{"routes":[{"name":"a","match":{"path":"/a"},"rate_limits":["nope"]}]}"#).path,
            "routes[0].rate_limits[0]"
        );
        assert_eq!(
            err(r#"{"routes":[{"name":"a","match":{"path":"/a"},"auth":{"mode":"required","methods":["jwt:x"]}}]}"#).path,
            "routes[0].auth.methods[0]"
        );
        assert_eq!(
            err(r#"{"routes":[{"name":"a","match":{"path":"/a"},"auth":{"mode":"sometimes"}}]}"#)
                .path,
            "routes[0].auth.mode"
        );
        assert_eq!(
            err(r#"{"default_route":{"quota":true}}"#).path,
            "default_route.quota"
        );
    }

    #[test]
    fn scopes_roles_and_the_api_key_header_are_checked() {
        let route = |auth: &str| {
            format!(
                r#"{{"api_keys":{{"keys":[]}},"routes":[{{"name":"a","match":{{"path":"/a"}},"auth":{auth}}}]}}"#
            )
        };
        // A quote would end the quoted scope in `www-authenticate`; CR/LF would split it.
        for (auth, path) in [
            (
                r#"{"mode":"required","methods":["api_key"],"scopes_all":["a\"b"]}"#,
                "routes[0].auth.scopes_all[0]",
            ),
            (
                r#"{"mode":"required","methods":["api_key"],"scopes_any":["ok","x\r\nset-cookie: a"]}"#,
                "routes[0].auth.scopes_any[1]",
            ),
            (
                r#"{"mode":"required","methods":["api_key"],"scopes_all":["a b"]}"#,
                "routes[0].auth.scopes_all[0]",
            ),
            (
                r#"{"mode":"required","methods":["api_key"],"roles_any":[""]}"#,
                "routes[0].auth.roles_any[0]",
            ),
        ] {
            assert_eq!(err(&route(auth)).path, path, "{auth}");
        }
        // A rule some accepted credential can satisfy is fine.
        let satisfiable = |auth: &str, roles_claim: &str, scope_claims: &str| {
            format!(
                r#"{{"api_keys":{{"keys":[{{"id":"k","sha256":"{}","scopes":["read:orders"]}}]}},
                    "jwt_providers":{{"main":{{"algorithms":["HS256"],
                        "local_jwks":{{"keys":[{{"kty":"oct","alg":"HS256","k":"{}"}}]}}
                        {roles_claim} {scope_claims}}}}},
                    "routes":[{{"name":"a","match":{{"path":"/a"}},"auth":{auth}}}]}}"#,
                "0".repeat(64),
                "A".repeat(43)
            )
        };
        let both = r#"{"mode":"required","methods":["jwt:main","api_key"],"scopes_all":["read:orders"],"roles_any":["admin"]}"#;
        assert!(parse(
            satisfiable(both, r#","roles_claim":"roles""#, "").as_bytes(),
            &no_env
        )
        .is_ok());
        // Issue 14, item 2: a rule no accepted credential can satisfy is refused, naming
        // the field and what to set.
        let e = parse(satisfiable(both, "", "").as_bytes(), &no_env).unwrap_err();
        assert_eq!(e.path, "routes[0].auth.roles_any");
        assert!(e.message.contains("jwt_providers.main.roles_claim"), "{e}");
        let e = err(&route(
            r#"{"mode":"required","methods":["api_key"],"roles_any":["admin"]}"#,
        ));
        assert_eq!(e.path, "routes[0].auth.roles_any");
        let jwt_only = r#"{"mode":"required","methods":["jwt:main"],"scopes_any":["x"]}"#;
        assert!(parse(satisfiable(jwt_only, "", "").as_bytes(), &no_env).is_ok());
        let e = parse(
            satisfiable(jwt_only, "", r#","scope_claims":[]"#).as_bytes(),
            &no_env,
        )
        .unwrap_err();
        assert_eq!(e.path, "routes[0].auth.scopes_any");
        // API keys alone: some key must hold the scopes.
        let keys_only = |scopes: &str| {
            satisfiable(
                &format!(r#"{{"mode":"required","methods":["api_key"],"scopes_all":{scopes}}}"#),
                "",
                "",
            )
        };
        assert!(parse(keys_only(r#"["read:orders"]"#).as_bytes(), &no_env).is_ok());
        let e = parse(keys_only(r#"["admin"]"#).as_bytes(), &no_env).unwrap_err();
        assert_eq!(e.path, "routes[0].auth.scopes_all");
        assert_eq!(
            err(r#"{"api_keys":{"header":"X-Api-Key","keys":[]}}"#).path,
            "api_keys.header"
        );
        assert_eq!(
            err(r#"{"api_keys":{"header":"","keys":[]}}"#).path,
            "api_keys.header"
        );
    }

    #[test]
    fn security_headers_override_and_remove() {
        let (c, _) = parse(
            br#"{"security_headers":{"x-frame-options":"SAMEORIGIN","referrer-policy":null,"content-security-policy":"default-src 'none'"}}"#,
            &no_env,
        )
        .unwrap();
        let get = |n: &str| {
            c.security_headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("x-frame-options"), Some("SAMEORIGIN"));
        assert_eq!(get("referrer-policy"), None);
        assert_eq!(get("content-security-policy"), Some("default-src 'none'"));
        assert_eq!(
            err(r#"{"security_headers":{"X-Bad":"1"}}"#).path,
            "security_headers.X-Bad"
        );
    }

    #[test]
    fn env_secrets_resolve_or_name_the_path() {
        let cfg = r#"{"webhooks":{"gh":{"scheme":"github","secrets":[{"env":"GH_SECRET"}]}}}"#;
        let e = err(cfg);
        assert_eq!(e.path, "webhooks.gh.secrets[0]");
        assert!(e.message.contains("GH_SECRET"));
        let env = |n: &str| (n == "GH_SECRET").then(|| "s3cret".to_string());
        assert!(parse(cfg.as_bytes(), &env).is_ok());
        assert_eq!(
            err(r#"{"webhooks":{"gh":{"scheme":"github","secrets":[{"env":"A","x":1}]}}}"#).path,
            "webhooks.gh.secrets[0]"
        );
    }

    #[test]
    fn tier_limits_parse_unlimited_or_bucket() {
        let (c, _) = parse(
            br#"{"rate_limits":{"p":{"key":["client"],"tiers":{"internal":"unlimited","free":{"capacity":1,"refill_tokens":1,"refill_period_s":1}}}}}"#,
            &no_env,
        )
        .unwrap();
        let tiers = c.raw.rate_limits["p"].tiers.as_ref().unwrap();
        assert_eq!(tiers["internal"], TierLimit::Unlimited);
        assert!(matches!(tiers["free"], TierLimit::Bucket(_)));
        assert_eq!(
            err(r#"{"rate_limits":{"p":{"key":["client"],"tiers":{"x":"lots"}}}}"#).path,
            "rate_limits.p.tiers.x"
        );
    }

    #[test]
    fn rate_limits_are_validated_and_planned_per_route() {
        let limits = r#""rate_limits":{"ip":{"key":["ip"],"capacity":5,"refill_tokens":5,"refill_period_s":60},
            "c":{"key":["client"],"capacity":2,"refill_tokens":1,"refill_period_s":60}}"#;
        let doc = format!(
            r#"{{{limits},"routes":[{{"name":"a","match":{{"path":"/a"}},"rate_limits":["c","ip"]}}],
                "default_route":{{"rate_limits":["ip"],"cost":5}}}}"#
        );
        let (c, _) = parse(doc.as_bytes(), &no_env).unwrap();
        let plan = &c.routes[0].policy.limits;
        assert_eq!(c.rate_limiter.limits[plan.pre_auth[0]].name, "ip");
        assert_eq!(c.rate_limiter.limits[plan.post_auth[0]].name, "c");
        assert_eq!(c.default_route.as_ref().unwrap().limits.cost, 5);
        let e = err(&format!(
            r#"{{{limits},"routes":[{{"name":"a","match":{{"path":"/a"}},"rate_limits":["c"],"cost":3}}]}}"#
        ));
        assert_eq!(e.path, "routes[0].cost");
        assert_eq!(
            err(r#"{"rate_limits":{"x":{"key":["ip"],"capacity":0,"refill_tokens":1,"refill_period_s":1}}}"#).path,
            "rate_limits.x.capacity"
        );
        assert_eq!(
            err(r#"{"rate_limits":{"x":{"key":["nope"],"capacity":1,"refill_tokens":1,"refill_period_s":1}}}"#).path,
            "rate_limits.x.key[0]"
        );
    }

    #[test]
    fn hostile_documents_error_without_panicking() {
        for doc in [
            "",
            "null",
            "[]",
            "{",
            "{\"routes\":{}}",
            "{\"routes\":[null]}",
            "{\"routes\":[{\"name\":1}]}",
            "\u{0}",
            "{\"quota\":{\"cluster\":\"q\",\"failure_mode\":\"maybe\"}}",
            "{\"quota\":{\"cluster\":\"q\",\"mode\":\"sometimes\"}}",
        ] {
            assert!(parse(doc.as_bytes(), &no_env).is_err(), "{doc:?}");
        }
        let deep = "[".repeat(100_000);
        assert!(parse(deep.as_bytes(), &no_env).is_err());
    }
}
