//! CORS: origin matching, preflight decisions and response headers (SPEC section 3, CORS).
//!
//! Decisions made here, and why:
//! - An origin is parsed as the RFC 6454 serialization `scheme "://" host [":" port]` and
//!   compared by its parts: scheme and host case-insensitively, the port after defaulting
//!   (`https` 443, `http` 80). Anything else (a path, even a lone trailing `/`, a query,
//!   userinfo, whitespace, a trailing dot, non-ASCII) is malformed and never allowed. Browsers
//!   send IDN hosts in punycode (`xn--...`), so a raw Unicode host is garbage, not an alias.
//!   A hand-written parser rather than the `url` crate: `url` is lenient by design (it
//!   accepts and rewrites paths, Unicode hosts, odd IPv4 forms) and allocates, while an
//!   `Origin` header has one strict grammar and is read on every request.
//! - `allow_origin_patterns`: `*` is exactly one whole leftmost DNS label
//!   (`https://*.example.com` admits `https://a.example.com`, not `https://a.b.example.com`,
//!   `https://example.com` or `https://evilexample.com`). Never prefix, suffix or substring
//!   matching.
//! - `null` is never allowed, not even by `*` (sandboxed iframes and `file:` pages send it).
//! - The preflight's method must be listed in `allow_methods`, simple methods included: the
//!   operator's list is the whole truth (the default list is `GET, HEAD, POST`).
//! - Every requested header must be in `allow_headers` (case-insensitive); the list in
//!   `access-control-request-headers` is split on commas, surrounding spaces/tabs and empty
//!   items are ignored. Wildcards (`*`) in methods and headers are not supported: they mean
//!   nothing with credentials (Fetch treats them as literal names) and hide what is allowed.
//! - `access-control-allow-origin` always echoes the request's (validated) origin, never `*`,
//!   so one code path serves credentialed and non-credentialed configs; `vary: origin` goes on
//!   every response (merged into the upstream's `vary` by `headers::response_ops`).
//! - `access-control-max-age` is always sent, `max_age_s` or 600 s by default.
//!
//! The request path allocates nothing: the header values are rendered once at compile time
//! and the decisions hand out borrowed strings.

use crate::config::{Config, ConfigError, CorsConfig, Warning};
use crate::headers::is_token;
use crate::pipeline::{Answer, Exchange, Request, Step};
use crate::reply::{ErrorCode, LocalReply};
use std::fmt;
use std::net::Ipv6Addr;

/// `access-control-max-age` when the config sets none.
pub const DEFAULT_MAX_AGE_S: u64 = 600;

/// Longest `Origin` value looked at: scheme, `://`, a 253-byte host, a port; more is garbage.
const MAX_ORIGIN_LEN: usize = 512;

pub const ALLOW_ORIGIN: &str = "access-control-allow-origin";
pub const ALLOW_CREDENTIALS: &str = "access-control-allow-credentials";
pub const ALLOW_METHODS: &str = "access-control-allow-methods";
pub const ALLOW_HEADERS: &str = "access-control-allow-headers";
pub const MAX_AGE: &str = "access-control-max-age";
pub const EXPOSE_HEADERS: &str = "access-control-expose-headers";
pub const REQUEST_METHOD: &str = "access-control-request-method";
pub const REQUEST_HEADERS: &str = "access-control-request-headers";

/// Why an `Origin` value is not an origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginError {
    Null,
    TooLong,
    NonAscii,
    MissingScheme,
    BadScheme,
    BadHost,
    BadPort,
    /// Something after the host/port: a path (a trailing `/` too), query, fragment, userinfo.
    NotAnOrigin,
}

impl fmt::Display for OriginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OriginError::Null => "`null` is never an allowed origin",
            OriginError::TooLong => "the origin is too long",
            OriginError::NonAscii => {
                "the origin contains non-ASCII characters (write IDN hosts in punycode, xn--...)"
            }
            OriginError::MissingScheme => "the origin has no `scheme://`",
            OriginError::BadScheme => "the origin's scheme is not valid",
            OriginError::BadHost => {
                "the origin's host is not a valid DNS name, IPv4 address or [IPv6] address"
            }
            OriginError::BadPort => "the origin's port is not a number from 1 to 65535",
            OriginError::NotAnOrigin => {
                "an origin is only scheme://host[:port]: no path (not even a trailing '/'), query or userinfo"
            }
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Host<'a> {
    Name(&'a str),
    V6(Ipv6Addr),
}

/// A parsed origin borrowing from the header value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OriginRef<'a> {
    scheme: &'a str,
    host: Host<'a>,
    /// The effective port: explicit, else the scheme's default, else none.
    port: Option<u16>,
}

fn default_port(scheme: &str) -> Option<u16> {
    if scheme.eq_ignore_ascii_case("https") || scheme.eq_ignore_ascii_case("wss") {
        Some(443)
    } else if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("ws") {
        Some(80)
    } else {
        None
    }
}

fn valid_scheme(s: &str) -> bool {
    let b = s.as_bytes();
    match b.first() {
        Some(c) if c.is_ascii_alphabetic() => {}
        _ => return false,
    }
    b.len() <= 32
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.'))
}

/// A DNS name (or dotted IPv4, which has the same shape): labels of 1..=63 letters, digits,
/// `-` or `_`, 253 bytes at most, no empty label (so no leading, trailing or double dot).
fn valid_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        })
}

fn parse_port(s: &str) -> Result<u16, OriginError> {
    // Digits only, canonical (no leading zero), 1..=65535.
    if s.is_empty() || s.len() > 5 || s.starts_with('0') || !s.bytes().all(|c| c.is_ascii_digit()) {
        return Err(OriginError::BadPort);
    }
    s.parse::<u16>().map_err(|_| OriginError::BadPort)
}

/// Parses a serialized origin without allocating.
fn parse_origin(s: &str) -> Result<OriginRef<'_>, OriginError> {
    if s.len() > MAX_ORIGIN_LEN {
        return Err(OriginError::TooLong);
    }
    if s.eq_ignore_ascii_case("null") {
        return Err(OriginError::Null);
    }
    if !s.is_ascii() {
        return Err(OriginError::NonAscii);
    }
    let (scheme, rest) = s.split_once("://").ok_or(OriginError::MissingScheme)?;
    if !valid_scheme(scheme) {
        return Err(OriginError::BadScheme);
    }
    let (host, port_str) = if let Some(after) = rest.strip_prefix('[') {
        let (inside, tail) = after.split_once(']').ok_or(OriginError::BadHost)?;
        let ip: Ipv6Addr = inside.parse().map_err(|_| OriginError::BadHost)?;
        let port = match tail {
            "" => None,
            t => match t.strip_prefix(':') {
                Some(p) => Some(p),
                None => return Err(OriginError::NotAnOrigin),
            },
        };
        (Host::V6(ip), port)
    } else {
        // A host name holds none of these; any of them means a path, query, userinfo, ...
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
            .unwrap_or(rest.len());
        let (name, tail) = rest.split_at(end);
        if !valid_dns_name(name) {
            return Err(
                if name.is_empty() && !tail.is_empty() && !tail.starts_with(':') {
                    OriginError::NotAnOrigin
                } else {
                    OriginError::BadHost
                },
            );
        }
        let port = match tail {
            "" => None,
            t => match t.strip_prefix(':') {
                Some(p) => Some(p),
                None => return Err(OriginError::NotAnOrigin),
            },
        };
        (Host::Name(name), port)
    };
    let port = match port_str {
        None => default_port(scheme),
        Some(p) => {
            // "host:443/x" reaches here as "443/x": a path after the port.
            let digits_end = p.find(|c: char| !c.is_ascii_digit()).unwrap_or(p.len());
            if digits_end < p.len() && digits_end > 0 {
                return Err(OriginError::NotAnOrigin);
            }
            Some(parse_port(p)?)
        }
    };
    Ok(OriginRef { scheme, host, port })
}

/// An owned, normalized origin from the config (scheme and host lower-cased, port defaulted).
#[derive(Debug, Clone, PartialEq, Eq)]
struct AllowedOrigin {
    scheme: String,
    host: OwnedHost,
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum OwnedHost {
    Name(String),
    V6(Ipv6Addr),
}

impl AllowedOrigin {
    fn from_ref(o: &OriginRef<'_>) -> Self {
        AllowedOrigin {
            scheme: o.scheme.to_ascii_lowercase(),
            host: match o.host {
                Host::Name(n) => OwnedHost::Name(n.to_ascii_lowercase()),
                Host::V6(ip) => OwnedHost::V6(ip),
            },
            port: o.port,
        }
    }

    fn matches(&self, o: &OriginRef<'_>) -> bool {
        self.port == o.port
            && self.scheme.eq_ignore_ascii_case(o.scheme)
            && match (&self.host, o.host) {
                (OwnedHost::Name(a), Host::Name(b)) => a.eq_ignore_ascii_case(b),
                (OwnedHost::V6(a), Host::V6(b)) => *a == b,
                _ => false,
            }
    }
}

/// `scheme://*.<suffix>[:port]`: the `*` is exactly one DNS label.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OriginPattern {
    scheme: String,
    /// Lower-case, at least two labels, no leading dot.
    suffix: String,
    port: Option<u16>,
}

impl OriginPattern {
    fn matches(&self, o: &OriginRef<'_>) -> bool {
        if self.port != o.port || !self.scheme.eq_ignore_ascii_case(o.scheme) {
            return false;
        }
        let Host::Name(host) = o.host else {
            return false;
        };
        // Split off the first label: the rest must be the suffix, whole. Labels are never
        // empty (checked by the parser), so the `*` stands for exactly one label.
        match host.split_once('.') {
            Some((_label, rest)) => rest.eq_ignore_ascii_case(&self.suffix),
            None => false,
        }
    }
}

/// The compiled `cors` section.
#[derive(Debug, Clone)]
pub struct CorsPolicy {
    any_origin: bool,
    origins: Vec<AllowedOrigin>,
    patterns: Vec<OriginPattern>,
    methods: Vec<String>,
    /// Lower-case header names.
    headers: Vec<String>,
    credentials: bool,
    allow_methods_value: String,
    /// Empty when no header is allowed (the header is then left out).
    allow_headers_value: String,
    /// Empty when nothing is exposed (the header is then left out).
    expose_headers_value: String,
    max_age_value: String,
}

fn check_header_names(path: &str, names: &[String]) -> Result<Vec<String>, ConfigError> {
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for (i, n) in names.iter().enumerate() {
        let p = format!("{path}[{i}]");
        if n == "*" {
            return Err(ConfigError::new(
                p,
                "wildcards are not supported: list the header names",
            ));
        }
        if !is_token(n) || n.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(ConfigError::new(
                p,
                format!("'{n}' is not a valid lower-case HTTP header name"),
            ));
        }
        if !out.contains(n) {
            out.push(n.clone());
        }
    }
    Ok(out)
}

/// Validates the `cors` section and renders its response header values.
pub fn compile(c: &CorsConfig, warnings: &mut Vec<Warning>) -> Result<CorsPolicy, ConfigError> {
    let mut any_origin = false;
    let mut origins = Vec::with_capacity(c.allow_origins.len());
    for (i, s) in c.allow_origins.iter().enumerate() {
        let path = format!("cors.allow_origins[{i}]");
        if s == "*" {
            if c.allow_credentials {
                return Err(ConfigError::new(
                    path,
                    "`*` cannot be combined with allow_credentials: true (browsers refuse it, and it would trust every site with users' cookies); list the origins",
                ));
            }
            any_origin = true;
            continue;
        }
        if s.contains('*') {
            return Err(ConfigError::new(
                path,
                format!("'{s}' is a pattern: put it in cors.allow_origin_patterns"),
            ));
        }
        let o = parse_origin(s).map_err(|e| ConfigError::new(&path, format!("'{s}': {e}")))?;
        let o = AllowedOrigin::from_ref(&o);
        if !origins.contains(&o) {
            origins.push(o);
        }
    }

    let mut patterns = Vec::with_capacity(c.allow_origin_patterns.len());
    for (i, s) in c.allow_origin_patterns.iter().enumerate() {
        let path = format!("cors.allow_origin_patterns[{i}]");
        patterns
            .push(compile_pattern(s).map_err(|m| ConfigError::new(path, format!("'{s}': {m}")))?);
    }
    if !any_origin && origins.is_empty() && patterns.is_empty() {
        warnings.push(Warning {
            path: "cors".into(),
            message: "no allow_origins or allow_origin_patterns: every preflight is refused and no response gets CORS headers".into(),
        });
    }

    if c.allow_methods.is_empty() {
        return Err(ConfigError::new(
            "cors.allow_methods",
            "must list at least one method (leave it out for GET, HEAD, POST)",
        ));
    }
    let mut methods: Vec<String> = Vec::with_capacity(c.allow_methods.len());
    for (i, m) in c.allow_methods.iter().enumerate() {
        let path = format!("cors.allow_methods[{i}]");
        if m == "*" {
            return Err(ConfigError::new(
                path,
                "wildcards are not supported: list the methods",
            ));
        }
        if !is_token(m) || m.bytes().any(|b| b.is_ascii_lowercase()) {
            return Err(ConfigError::new(
                path,
                format!("'{m}' is not an upper-case HTTP method"),
            ));
        }
        if !methods.contains(m) {
            methods.push(m.clone());
        }
    }
    let headers = check_header_names("cors.allow_headers", &c.allow_headers)?;
    let expose = check_header_names("cors.expose_headers", &c.expose_headers)?;

    let max_age = c.max_age_s.unwrap_or(DEFAULT_MAX_AGE_S);
    if max_age > 86_400 {
        warnings.push(Warning {
            path: "cors.max_age_s".into(),
            message: "browsers cap preflight caching (Firefox 86400 s, Chromium 7200 s); larger values have no effect".into(),
        });
    }

    Ok(CorsPolicy {
        any_origin,
        origins,
        patterns,
        allow_methods_value: methods.join(", "),
        allow_headers_value: headers.join(", "),
        expose_headers_value: expose.join(", "),
        methods,
        headers,
        credentials: c.allow_credentials,
        max_age_value: max_age.to_string(),
    })
}

fn compile_pattern(s: &str) -> Result<OriginPattern, String> {
    const SHAPE: &str = "a pattern is scheme://*.domain[:port], `*` being one whole leftmost label (https://*.example.com)";
    if s.eq_ignore_ascii_case("null") {
        return Err(OriginError::Null.to_string());
    }
    let Some((scheme, rest)) = s.split_once("://") else {
        return Err(SHAPE.into());
    };
    let Some(base) = rest.strip_prefix("*.") else {
        return Err(if rest.contains('*') || scheme.contains('*') {
            SHAPE.into()
        } else {
            format!("no `*`: put exact origins in cors.allow_origins ({SHAPE})")
        });
    };
    if base.contains('*') || scheme.contains('*') {
        return Err(SHAPE.into());
    }
    // Parse what follows the `*.` as an origin of its own, so the suffix obeys the same
    // grammar as any origin.
    let probe = format!("{scheme}://{base}");
    let o = parse_origin(&probe).map_err(|e| e.to_string())?;
    let Host::Name(suffix) = o.host else {
        return Err("`*` needs a DNS name after it, not an IP address".into());
    };
    let labels = suffix.split('.').count();
    let last = suffix.rsplit('.').next().unwrap_or("");
    if labels < 2 {
        return Err(format!(
            "too broad: `*` must sit under a registrable domain (like https://*.example.com), not a top-level domain; {SHAPE}"
        ));
    }
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return Err("`*` needs a DNS name after it, not an IP address".into());
    }
    Ok(OriginPattern {
        scheme: o.scheme.to_ascii_lowercase(),
        suffix: suffix.to_ascii_lowercase(),
        port: o.port,
    })
}

impl CorsPolicy {
    /// Whether a request's `Origin` value is allowed. Malformed and `null` origins never are.
    pub fn origin_allowed(&self, origin: &str) -> bool {
        match parse_origin(origin) {
            Ok(o) => {
                self.any_origin
                    || self.origins.iter().any(|a| a.matches(&o))
                    || self.patterns.iter().any(|p| p.matches(&o))
            }
            Err(_) => false,
        }
    }

    pub fn allow_credentials(&self) -> bool {
        self.credentials
    }

    fn method_allowed(&self, method: &str) -> bool {
        self.methods.iter().any(|m| m == method)
    }

    /// Checks a comma-separated `access-control-request-headers` list.
    pub fn headers_allowed(&self, list: &str) -> bool {
        list.split(',')
            .map(|h| h.trim_matches([' ', '\t']))
            .filter(|h| !h.is_empty())
            .all(|h| is_token(h) && self.headers.iter().any(|a| a.eq_ignore_ascii_case(h)))
    }
}

/// A preflight is `OPTIONS` carrying both `origin` and `access-control-request-method`;
/// a plain `OPTIONS` is an ordinary request.
pub fn is_preflight(method: &str, origin: Option<&str>, request_method: Option<&str>) -> bool {
    method == "OPTIONS" && origin.is_some() && request_method.is_some()
}

/// Why a preflight was refused (for the denial log; the reply itself says only
/// `cors_rejected`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    Origin(OriginError),
    OriginNotAllowed,
    Method,
    Header,
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RejectReason::Origin(e) => write!(f, "malformed origin: {e}"),
            RejectReason::OriginNotAllowed => f.write_str("origin not allowed"),
            RejectReason::Method => f.write_str("requested method not allowed"),
            RejectReason::Header => f.write_str("a requested header is not allowed"),
        }
    }
}

/// The outcome of a preflight.
#[derive(Debug, Clone)]
pub enum Preflight<'a> {
    /// Answer 204 with these headers (plus `vary: origin`, which every response gets).
    Allowed(PreflightHeaders<'a>),
    /// Answer 403 `cors_rejected` with no `access-control-*` header.
    Rejected(RejectReason),
}

/// Headers of an allowed preflight's 204, borrowed from the policy and the request.
#[derive(Debug, Clone)]
pub struct PreflightHeaders<'a> {
    origin: &'a str,
    policy: &'a CorsPolicy,
}

impl<'a> PreflightHeaders<'a> {
    /// `(name, value)` pairs, names lower-case.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &'a str)> + '_ {
        let p = self.policy;
        [
            Some((ALLOW_ORIGIN, self.origin)),
            Some((ALLOW_METHODS, p.allow_methods_value.as_str())),
            (!p.allow_headers_value.is_empty())
                .then_some((ALLOW_HEADERS, p.allow_headers_value.as_str())),
            Some((MAX_AGE, p.max_age_value.as_str())),
            p.credentials.then_some((ALLOW_CREDENTIALS, "true")),
        ]
        .into_iter()
        .flatten()
    }
}

/// Decides a preflight. `origin` and `request_method` are the request's `origin` and
/// `access-control-request-method` values, `request_headers` its
/// `access-control-request-headers` (absent = none requested).
pub fn preflight<'a>(
    policy: &'a CorsPolicy,
    origin: &'a str,
    request_method: &str,
    request_headers: Option<&str>,
) -> Preflight<'a> {
    let o = match parse_origin(origin) {
        Ok(o) => o,
        Err(e) => return Preflight::Rejected(RejectReason::Origin(e)),
    };
    let allowed = policy.any_origin
        || policy.origins.iter().any(|a| a.matches(&o))
        || policy.patterns.iter().any(|p| p.matches(&o));
    if !allowed {
        return Preflight::Rejected(RejectReason::OriginNotAllowed);
    }
    if !policy.method_allowed(request_method.trim_matches([' ', '\t'])) {
        return Preflight::Rejected(RejectReason::Method);
    }
    if let Some(list) = request_headers {
        if !policy.headers_allowed(list) {
            return Preflight::Rejected(RejectReason::Header);
        }
    }
    Preflight::Allowed(PreflightHeaders { origin, policy })
}

/// CORS headers for an actual (non-preflight) response, upstream or local: empty unless the
/// request came from an allowed origin.
#[derive(Debug, Clone, Copy)]
pub struct ActualHeaders<'a> {
    origin: Option<&'a str>,
    credentials: bool,
    expose: &'a str,
}

impl<'a> ActualHeaders<'a> {
    pub fn is_empty(&self) -> bool {
        self.origin.is_none()
    }

    /// `(name, value)` pairs, names lower-case.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &'a str)> + '_ {
        let on = self.origin.is_some();
        [
            self.origin.map(|o| (ALLOW_ORIGIN, o)),
            (on && self.credentials).then_some((ALLOW_CREDENTIALS, "true")),
            (on && !self.expose.is_empty()).then_some((EXPOSE_HEADERS, self.expose)),
        ]
        .into_iter()
        .flatten()
    }
}

/// `access-control-allow-origin`, `-allow-credentials` (when set) and `-expose-headers`
/// (when configured) for a response to a request from `origin`, if that origin is allowed.
pub fn actual_response_headers<'a>(
    policy: &'a CorsPolicy,
    origin: Option<&'a str>,
) -> ActualHeaders<'a> {
    let origin = origin.filter(|o| policy.origin_allowed(o));
    ActualHeaders {
        origin,
        credentials: policy.credentials,
        expose: &policy.expose_headers_value,
    }
}

/// Whether a response header is one this filter owns when CORS is configured; the glue drops
/// upstream copies so an upstream's `access-control-allow-origin: *` cannot widen the policy.
pub fn is_cors_response_header(name: &str) -> bool {
    const PREFIX: &[u8] = b"access-control-";
    name.len() > PREFIX.len()
        && name
            .as_bytes()
            .get(..PREFIX.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(PREFIX))
}

/// The request's origin, if it sent exactly one: a repeated `origin` header is malformed.
fn single_origin<'a>(req: &Request<'a>) -> Option<&'a str> {
    match req.header_count("origin") {
        1 => req.header("origin"),
        _ => None,
    }
}

/// Records the response-side CORS headers of this request in the exchange, before any stage
/// can answer, so local replies (400, 401, 429, ...) carry them as upstream responses do:
/// `vary: origin` always, the `access-control-*` headers for an allowed origin. Preflights get
/// their headers from [`stage`] (a refused one must carry none).
pub fn annotate(cfg: &Config, req: &Request<'_>, ex: &mut Exchange) {
    let Some(policy) = &cfg.cors else {
        return;
    };
    if !ex.vary.contains(&"origin") {
        ex.vary.push("origin");
    }
    if is_preflight(req.method, req.header("origin"), req.header(REQUEST_METHOD)) {
        return;
    }
    for (name, value) in actual_response_headers(policy, single_origin(req)).iter() {
        ex.response_headers
            .push((name.to_string(), value.to_string()));
    }
}

/// The pipeline's CORS stage: answers preflights (204 or 403 `cors_rejected`), lets every
/// other request through.
pub fn stage(cfg: &Config, req: &Request<'_>, _ex: &mut Exchange) -> Step {
    let Some(policy) = &cfg.cors else {
        return Step::Next;
    };
    let (origin, method) = match (req.header("origin"), req.header(REQUEST_METHOD)) {
        (Some(o), Some(m)) if req.method == "OPTIONS" => (o, m),
        _ => return Step::Next,
    };
    let refuse = |reason: RejectReason| {
        Step::Reply(
            LocalReply::new(
                ErrorCode::CorsRejected,
                format!("CORS preflight refused: {reason}"),
            )
            .with_policy("cors"),
        )
    };
    if req.header_count("origin") > 1 || req.header_count(REQUEST_METHOD) > 1 {
        return refuse(RejectReason::Origin(OriginError::NotAnOrigin));
    }
    // A repeated `access-control-request-headers` is one list split over lines: every part
    // must pass.
    let mut lists = req
        .headers
        .iter()
        .filter(|(k, _)| k == REQUEST_HEADERS)
        .map(|(_, v)| v.as_str());
    let first = lists.next();
    match preflight(policy, origin, method, first) {
        Preflight::Allowed(h) => {
            if lists.any(|l| !policy.headers_allowed(l)) {
                return refuse(RejectReason::Header);
            }
            Step::Answer(Answer {
                status: 204,
                headers: h
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            })
        }
        Preflight::Rejected(reason) => refuse(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, CorsConfig};

    fn cfg(json: &str) -> CorsConfig {
        serde_json::from_str(json).unwrap()
    }

    fn policy(json: &str) -> CorsPolicy {
        compile(&cfg(json), &mut Vec::new()).unwrap()
    }

    fn compile_err(json: &str) -> ConfigError {
        compile(&cfg(json), &mut Vec::new()).unwrap_err()
    }

    /// The SPEC example.
    fn spec_policy() -> CorsPolicy {
        policy(
            r#"{
            "allow_origins": ["https://app.example.com"],
            "allow_origin_patterns": ["https://*.example.com"],
            "allow_methods": ["GET", "POST", "PUT", "DELETE"],
            "allow_headers": ["authorization", "content-type", "x-api-key"],
            "expose_headers": ["ratelimit", "ratelimit-policy", "retry-after", "x-request-id"],
            "allow_credentials": true,
            "max_age_s": 86400 }"#,
        )
    }

    /// Only an exact origin and a pattern on another domain, to tell the two apart.
    fn exact_policy() -> CorsPolicy {
        policy(
            r#"{ "allow_origins": ["https://app.example.com", "http://localhost:3000", "http://[::1]:8080"],
                 "allow_origin_patterns": ["https://*.partner.example.org"],
                 "allow_credentials": true }"#,
        )
    }

    fn headers_of(p: Preflight<'_>) -> Vec<(String, String)> {
        match p {
            Preflight::Allowed(h) => h
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            Preflight::Rejected(r) => panic!("rejected: {r}"),
        }
    }

    #[test]
    fn allowed_preflight_gets_every_header() {
        let p = spec_policy();
        let h = headers_of(preflight(
            &p,
            "https://app.example.com",
            "PUT",
            Some("Content-Type, X-API-Key"),
        ));
        let want: Vec<(String, String)> = [
            (ALLOW_ORIGIN, "https://app.example.com"),
            (ALLOW_METHODS, "GET, POST, PUT, DELETE"),
            (ALLOW_HEADERS, "authorization, content-type, x-api-key"),
            (MAX_AGE, "86400"),
            (ALLOW_CREDENTIALS, "true"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(h, want);
    }

    #[test]
    fn preflight_without_credentials_or_headers_leaves_them_out() {
        let p = policy(r#"{"allow_origins":["https://a.example.com"]}"#);
        let h = headers_of(preflight(&p, "https://a.example.com", "GET", None));
        let names: Vec<&str> = h.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, [ALLOW_ORIGIN, ALLOW_METHODS, MAX_AGE]);
        assert_eq!(h[1].1, "GET, HEAD, POST");
        assert_eq!(h[2].1, DEFAULT_MAX_AGE_S.to_string());
    }

    #[test]
    fn exact_origins_compare_by_scheme_host_and_port() {
        let p = exact_policy();
        for ok in [
            "https://app.example.com",
            "https://app.example.com:443",
            "https://APP.Example.COM",
            "HTTPS://app.example.com",
            "http://localhost:3000",
            "http://[::1]:8080",
            "http://[0:0:0:0:0:0:0:1]:8080",
        ] {
            assert!(p.origin_allowed(ok), "{ok} should be allowed");
        }
        for bad in [
            "https://app.example.com.evil.com",
            "https://evilapp.example.com",
            "https://app.example.co",
            "https://pp.example.com",
            "http://app.example.com",
            "wss://app.example.com",
            "https://app.example.com:8443",
            "https://app.example.com:80",
            "https://app.example.com/",
            "https://app.example.com/path",
            "https://app.example.com?x",
            "https://app.example.com#x",
            "https://user@app.example.com",
            "https://app.example.com@evil.com",
            "https://app.example.com.",
            "https://app.example.com ",
            " https://app.example.com",
            "https://app.example.com, https://evil.com",
            "https://app.example.com\r\nx: y",
            "http://localhost:3001",
            "http://localhost",
            "https://localhost:3000",
            "http://[::1]:8081",
            "http://[::2]:8080",
            "null",
            "NULL",
            "",
            "app.example.com",
            "//app.example.com",
            "https://",
            "https:///app.example.com",
            "https://app.example.com:",
            "https://app.example.com:0443",
            "https://app.example.com:65536",
            "https://app.example.com:-1",
            "https://app.example.com:443abc",
            "https://app..example.com",
            "https://.app.example.com",
            "https://[::1",
            "https://[zz::1]",
            "https://app.exämple.com",
            "https://аpp.example.com", // Cyrillic a
            "https://xn--pp-8kc.example.com",
            "https://app.example.com\0",
        ] {
            assert!(!p.origin_allowed(bad), "{bad:?} must not be allowed");
        }
    }

    #[test]
    fn a_pattern_star_is_exactly_one_label() {
        let p = exact_policy();
        assert!(p.origin_allowed("https://a.partner.example.org"));
        assert!(p.origin_allowed("https://xn--bcher-kva.partner.example.org"));
        assert!(p.origin_allowed("https://A-1.PARTNER.example.org:443"));
        for bad in [
            "https://partner.example.org",
            "https://a.b.partner.example.org",
            "https://evilpartner.example.org",
            "https://a.partner.example.org.evil.com",
            "https://a.partner.example.org.",
            "https://.partner.example.org",
            "https://..partner.example.org",
            "https://a..partner.example.org",
            "http://a.partner.example.org",
            "https://a.partner.example.org:8443",
            "https://a.xpartner.example.org",
            "https://a-partner.example.org",
        ] {
            assert!(!p.origin_allowed(bad), "{bad:?} must not be allowed");
        }
        // The SPEC's pattern: one label under example.com, the exact origin also listed.
        let s = spec_policy();
        assert!(
            s.origin_allowed("https://evilapp.example.com"),
            "one label under *.example.com is in the pattern"
        );
        assert!(!s.origin_allowed("https://a.b.example.com"));
        assert!(!s.origin_allowed("https://example.com"));
        assert!(!s.origin_allowed("https://app.example.com.evil.com"));
    }

    #[test]
    fn a_pattern_with_a_port_needs_that_port() {
        let p = policy(r#"{"allow_origin_patterns":["http://*.dev.example.com:8080"]}"#);
        assert!(p.origin_allowed("http://a.dev.example.com:8080"));
        assert!(!p.origin_allowed("http://a.dev.example.com"));
        assert!(!p.origin_allowed("http://a.dev.example.com:8081"));
    }

    #[test]
    fn star_allows_any_well_formed_origin_but_never_null() {
        let p = policy(r#"{"allow_origins":["*"]}"#);
        assert!(p.origin_allowed("https://anything.example"));
        assert!(p.origin_allowed("http://127.0.0.1:5173"));
        assert!(!p.origin_allowed("null"));
        assert!(!p.origin_allowed("https://x.example/"));
        assert!(!p.origin_allowed("garbage"));
        // The echo, never `*`.
        let h = headers_of(preflight(&p, "https://anything.example", "GET", None));
        assert_eq!(
            h[0],
            (
                ALLOW_ORIGIN.to_string(),
                "https://anything.example".to_string()
            )
        );
    }

    #[test]
    fn preflight_rejections_say_why() {
        let p = spec_policy();
        let r = |o: &str, m: &str, h: Option<&str>| match preflight(&p, o, m, h) {
            Preflight::Rejected(r) => Some(r),
            Preflight::Allowed(_) => None,
        };
        assert_eq!(
            r("https://app.example.com.evil.com", "GET", None),
            Some(RejectReason::OriginNotAllowed)
        );
        assert_eq!(
            r("null", "GET", None),
            Some(RejectReason::Origin(OriginError::Null))
        );
        assert_eq!(
            r("https://app.example.com/", "GET", None),
            Some(RejectReason::Origin(OriginError::NotAnOrigin))
        );
        assert_eq!(
            r("https://app.exämple.com", "GET", None),
            Some(RejectReason::Origin(OriginError::NonAscii))
        );
        assert_eq!(
            r("https://app.example.com", "PATCH", None),
            Some(RejectReason::Method)
        );
        // Methods are case-sensitive (browsers upper-case the standard ones themselves).
        assert_eq!(
            r("https://app.example.com", "put", None),
            Some(RejectReason::Method)
        );
        assert_eq!(
            r("https://app.example.com", "", None),
            Some(RejectReason::Method)
        );
        // HEAD is a simple method but not in this list: refused all the same.
        assert_eq!(
            r("https://app.example.com", "HEAD", None),
            Some(RejectReason::Method)
        );
        assert_eq!(
            r(
                "https://app.example.com",
                "GET",
                Some("content-type, x-evil")
            ),
            Some(RejectReason::Header)
        );
        assert_eq!(
            r(
                "https://app.example.com",
                "GET",
                Some("content-type x-api-key")
            ),
            Some(RejectReason::Header)
        );
        assert_eq!(
            r("https://app.example.com", "GET", Some("authorization-x")),
            Some(RejectReason::Header)
        );
        assert_eq!(
            r("https://app.example.com", "GET", Some("content-typ")),
            Some(RejectReason::Header)
        );
    }

    #[test]
    fn requested_header_lists_are_parsed_tolerantly() {
        let p = spec_policy();
        for ok in [
            "",
            " ",
            "authorization",
            "AUTHORIZATION",
            "content-type,x-api-key",
            " content-type ,\tx-api-key\t, authorization ",
            "content-type,,x-api-key,",
            "Content-Type, Content-Type",
        ] {
            assert!(
                matches!(
                    preflight(&p, "https://app.example.com", "POST", Some(ok)),
                    Preflight::Allowed(_)
                ),
                "{ok:?} should be allowed"
            );
        }
        // Method value trimmed the same way.
        assert!(matches!(
            preflight(&p, "https://app.example.com", " POST ", None),
            Preflight::Allowed(_)
        ));
    }

    #[test]
    fn preflight_detection_needs_origin_and_request_method() {
        assert!(is_preflight(
            "OPTIONS",
            Some("https://a.example"),
            Some("GET")
        ));
        assert!(!is_preflight("OPTIONS", None, Some("GET")));
        assert!(!is_preflight("OPTIONS", Some("https://a.example"), None));
        assert!(!is_preflight("OPTIONS", None, None));
        assert!(!is_preflight("GET", Some("https://a.example"), Some("GET")));
        assert!(!is_preflight(
            "options",
            Some("https://a.example"),
            Some("GET")
        ));
    }

    #[test]
    fn actual_responses_get_headers_only_for_allowed_origins() {
        let p = spec_policy();
        let h: Vec<_> = actual_response_headers(&p, Some("https://app.example.com"))
            .iter()
            .collect();
        assert_eq!(
            h,
            [
                (ALLOW_ORIGIN, "https://app.example.com"),
                (ALLOW_CREDENTIALS, "true"),
                (
                    EXPOSE_HEADERS,
                    "ratelimit, ratelimit-policy, retry-after, x-request-id"
                ),
            ]
        );
        for origin in [
            None,
            Some("https://evil.com"),
            Some("null"),
            Some("https://app.example.com/"),
        ] {
            let a = actual_response_headers(&p, origin);
            assert!(a.is_empty(), "{origin:?}");
            assert_eq!(a.iter().count(), 0, "{origin:?}");
        }
        let bare = policy(r#"{"allow_origins":["https://a.example.com"]}"#);
        let h: Vec<_> = actual_response_headers(&bare, Some("https://a.example.com"))
            .iter()
            .collect();
        assert_eq!(h, [(ALLOW_ORIGIN, "https://a.example.com")]);
    }

    #[test]
    fn cors_response_headers_are_recognized() {
        assert!(is_cors_response_header("access-control-allow-origin"));
        assert!(is_cors_response_header("Access-Control-Expose-Headers"));
        assert!(!is_cors_response_header("access-control-"));
        assert!(!is_cors_response_header("vary"));
        assert!(!is_cors_response_header("x-access-control-allow-origin"));
    }

    #[test]
    fn config_errors_name_the_path() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"allow_origins":["*"],"allow_credentials":true}"#,
                "cors.allow_origins[0]",
            ),
            (
                r#"{"allow_origins":["https://a.example.com","null"]}"#,
                "cors.allow_origins[1]",
            ),
            (r#"{"allow_origins":["NULL"]}"#, "cors.allow_origins[0]"),
            (
                r#"{"allow_origin_patterns":["null"]}"#,
                "cors.allow_origin_patterns[0]",
            ),
            (
                r#"{"allow_origins":["https://a.example.com/"]}"#,
                "cors.allow_origins[0]",
            ),
            (
                r#"{"allow_origins":["a.example.com"]}"#,
                "cors.allow_origins[0]",
            ),
            (
                r#"{"allow_origins":["https://a.example.com:99999"]}"#,
                "cors.allow_origins[0]",
            ),
            (
                r#"{"allow_origins":["https://bücher.example"]}"#,
                "cors.allow_origins[0]",
            ),
            (
                r#"{"allow_origins":["https://*.example.com"]}"#,
                "cors.allow_origins[0]",
            ),
            (
                r#"{"allow_origin_patterns":["https://*example.com"]}"#,
                "cors.allow_origin_patterns[0]",
            ),
            (
                r#"{"allow_origin_patterns":["https://app.*.com"]}"#,
                "cors.allow_origin_patterns[0]",
            ),
            (
                r#"{"allow_origin_patterns":["https://*.*.example.com"]}"#,
                "cors.allow_origin_patterns[0]",
            ),
            (
                r#"{"allow_origin_patterns":["https://a*.example.com"]}"#,
                "cors.allow_origin_patterns[0]",
            ),
            (
                r#"{"allow_origin_patterns":["https://example.*"]}"#,
                "cors.allow_origin_patterns[0]",
            ),
            (
                r#"{"allow_origin_patterns":["*://app.example.com"]}"#,
                "cors.allow_origin_patterns[0]",
            ),
            (
                r#"{"allow_origin_patterns":["https://*"]}"#,
                "cors.allow_origin_patterns[0]",
            ),
            (
                r#"{"allow_origin_patterns":["https://*."]}"#,
                "cors.allow_origin_patterns[0]",
            ),
            (
                r#"{"allow_origin_patterns":["https://*.com"]}"#,
                "cors.allow_origin_patterns[0]",
            ),
            (
                r#"{"allow_origin_patterns":["*"]}"#,
                "cors.allow_origin_patterns[0]",
            ),
            (
                r#"{"allow_origin_patterns":["https://*.1.2.3"]}"#,
                "cors.allow_origin_patterns[0]",
            ),
            (
                r#"{"allow_origin_patterns":["https://*.[::1]"]}"#,
                "cors.allow_origin_patterns[0]",
            ),
            (
                r#"{"allow_origin_patterns":["https://*.example.com/"]}"#,
                "cors.allow_origin_patterns[0]",
            ),
            (
                r#"{"allow_origin_patterns":["https://app.example.com"]}"#,
                "cors.allow_origin_patterns[0]",
            ),
            (
                r#"{"allow_origin_patterns":["https://*.example.com:*"]}"#,
                "cors.allow_origin_patterns[0]",
            ),
            (r#"{"allow_methods":[]}"#, "cors.allow_methods"),
            (r#"{"allow_methods":["get"]}"#, "cors.allow_methods[0]"),
            (r#"{"allow_methods":["GET","*"]}"#, "cors.allow_methods[1]"),
            (r#"{"allow_methods":["GET POST"]}"#, "cors.allow_methods[0]"),
            (
                r#"{"allow_headers":["content-type","Content Type"]}"#,
                "cors.allow_headers[1]",
            ),
            (
                r#"{"allow_headers":["X-Api-Key"]}"#,
                "cors.allow_headers[0]",
            ),
            (r#"{"allow_headers":["*"]}"#, "cors.allow_headers[0]"),
            (r#"{"allow_headers":[""]}"#, "cors.allow_headers[0]"),
            (r#"{"expose_headers":["a:b"]}"#, "cors.expose_headers[0]"),
        ];
        for (json, path) in cases {
            let e = compile_err(json);
            assert_eq!(e.path, *path, "{json}: {e}");
            assert!(!e.message.is_empty());
        }
        let e = compile_err(r#"{"allow_origins":["*"],"allow_credentials":true}"#);
        assert!(e.message.contains("allow_credentials"), "{e}");
        let e = compile_err(r#"{"allow_origins":["https://a.example.com/"]}"#);
        assert!(e.message.contains("trailing"), "{e}");
    }

    #[test]
    fn config_normalizes_origins_and_warns() {
        let mut w = Vec::new();
        let p = compile(
            &cfg(r#"{"allow_origins":["HTTPS://App.Example.com:443"],"max_age_s":604800}"#),
            &mut w,
        )
        .unwrap();
        assert!(p.origin_allowed("https://app.example.com"));
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].path, "cors.max_age_s");
        let mut w = Vec::new();
        compile(&cfg("{}"), &mut w).unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].path, "cors");
    }

    #[test]
    fn config_compile_runs_cors_validation() {
        let no_env = |_: &str| None;
        let e = config::parse(
            br#"{"cors":{"allow_origins":["*"],"allow_credentials":true}}"#,
            &no_env,
        )
        .unwrap_err();
        assert_eq!(e.path, "cors.allow_origins[0]");
        let (c, _) = config::parse(
            br#"{"cors":{"allow_origins":["https://a.example.com"]}}"#,
            &no_env,
        )
        .unwrap();
        assert!(c
            .cors
            .as_ref()
            .is_some_and(|p| p.origin_allowed("https://a.example.com")));
        let (c, _) = config::parse(b"{}", &no_env).unwrap();
        assert!(c.cors.is_none());
    }

    #[test]
    fn hostile_origins_never_panic() {
        let p = spec_policy();
        let long = format!("https://{}.example.com", "a".repeat(10_000));
        let labels = format!("https://{}example.com", "a.".repeat(200));
        let mut cases: Vec<String> = vec![long, labels];
        for s in [
            "https://[",
            "https://[]",
            "https://[]:1",
            "https://[::1]x",
            "https://[::1]:",
            "https://[::1]:0",
            ":",
            "://",
            ":///",
            "https:",
            "https:/",
            "https://:443",
            "https://a:b:c",
            "https://a:1:2",
            "\u{feff}https://app.example.com",
            "https://app.example.com\u{200b}",
            "ｈttps://app.example.com",
            "https://%61pp.example.com",
            "https://app%2eexample.com",
            "https://app.example.com:４４３",
            "1://a.b",
            "+://a.b",
            "https://a.b:00000",
            "https://a.b:99999999999999999999",
        ] {
            cases.push(s.to_string());
        }
        for c in &cases {
            assert!(!p.origin_allowed(c), "{c:?}");
            assert!(
                matches!(preflight(&p, c, "GET", Some(c)), Preflight::Rejected(_)),
                "{c:?}"
            );
        }
        // Hostile requested-header lists against an allowed origin.
        let many = "content-type,".repeat(10_000);
        assert!(matches!(
            preflight(&p, "https://app.example.com", "GET", Some(&many)),
            Preflight::Allowed(_)
        ));
        for h in ["\u{0}", "content-type\r\nx: y", "ä", "(", "content-type;x"] {
            assert!(
                matches!(
                    preflight(&p, "https://app.example.com", "GET", Some(h)),
                    Preflight::Rejected(RejectReason::Header)
                ),
                "{h:?}"
            );
        }
    }

    mod through_the_pipeline {
        use crate::config::Config;
        use crate::pipeline::{on_request_headers, Env, Exchange, Request, Verdict};
        use crate::reply::ErrorCode;
        use crate::store::MemoryStore;

        const CFG: &str = r#"{"cors":{"allow_origins":["https://app.example.com"],
            "allow_methods":["GET","PUT"],"allow_headers":["authorization"],
            "expose_headers":["x-request-id"],"allow_credentials":true},
            "default_route":{}}"#;

        fn run(cfg: &Config, method: &str, path: &str, h: &[(&str, &str)]) -> (Verdict, Exchange) {
            let headers: Vec<(String, String)> = h
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let store = MemoryStore::new();
            let env = Env {
                now_ms: 0,
                store: &store,
            };
            let req = Request {
                method,
                path,
                headers: &headers,
                source_address: None,
                route_name: None,
            };
            let mut ex = Exchange::default();
            let v = on_request_headers(cfg, &req, &mut ex, &env);
            (v, ex)
        }

        fn cfg(json: &str) -> Config {
            crate::config::parse(json.as_bytes(), &|_| None).unwrap().0
        }

        #[test]
        fn an_allowed_preflight_is_answered_with_204() {
            let c = cfg(CFG);
            let (v, ex) = run(
                &c,
                "OPTIONS",
                "/x",
                &[
                    ("origin", "https://app.example.com"),
                    ("access-control-request-method", "PUT"),
                    ("access-control-request-headers", "authorization"),
                ],
            );
            match v {
                Verdict::Answer(a) => {
                    assert_eq!(a.status, 204);
                    assert!(a.headers.contains(&(
                        "access-control-allow-origin".into(),
                        "https://app.example.com".into()
                    )));
                    assert!(a
                        .headers
                        .contains(&("access-control-allow-credentials".into(), "true".into())));
                }
                v => panic!("{v:?}"),
            }
            assert_eq!(ex.vary, ["origin"]);
            assert!(
                ex.response_headers.is_empty(),
                "a preflight gets only its own headers"
            );
        }

        #[test]
        fn a_refused_preflight_gets_403_and_no_cors_headers() {
            let c = cfg(CFG);
            for h in [
                vec![
                    ("origin", "https://evil.example.com"),
                    ("access-control-request-method", "GET"),
                ],
                vec![
                    ("origin", "https://app.example.com"),
                    ("access-control-request-method", "DELETE"),
                ],
                vec![
                    ("origin", "https://app.example.com"),
                    ("access-control-request-method", "GET"),
                    ("access-control-request-headers", "x-other"),
                ],
                vec![
                    ("origin", "https://app.example.com"),
                    ("access-control-request-method", "GET"),
                    ("access-control-request-headers", "authorization"),
                    ("access-control-request-headers", "x-other"),
                ],
                vec![
                    ("origin", "https://app.example.com"),
                    ("origin", "https://app.example.com"),
                    ("access-control-request-method", "GET"),
                ],
            ] {
                let (v, ex) = run(&c, "OPTIONS", "/x", &h);
                match v {
                    Verdict::Reply(r) => assert_eq!(r.code, ErrorCode::CorsRejected, "{h:?}"),
                    v => panic!("{h:?}: {v:?}"),
                }
                assert!(
                    ex.response_headers
                        .iter()
                        .all(|(k, _)| !k.starts_with("access-control-")),
                    "{h:?}"
                );
                assert_eq!(ex.vary, ["origin"]);
            }
        }

        #[test]
        fn actual_requests_and_plain_options_go_on_with_headers_recorded() {
            let c = cfg(CFG);
            for m in ["GET", "OPTIONS", "DELETE"] {
                let (v, ex) = run(&c, m, "/x", &[("origin", "https://app.example.com")]);
                assert!(matches!(v, Verdict::Forward(_)), "{m}");
                let names: Vec<&str> = ex
                    .response_headers
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .collect();
                assert_eq!(
                    names,
                    [
                        "access-control-allow-origin",
                        "access-control-allow-credentials",
                        "access-control-expose-headers"
                    ]
                );
            }
            // Plain OPTIONS, no preflight headers: an ordinary request.
            let (v, ex) = run(&c, "OPTIONS", "/x", &[]);
            assert!(matches!(v, Verdict::Forward(_)));
            assert!(ex.response_headers.is_empty());
            assert_eq!(ex.vary, ["origin"]);
            // A repeated origin is malformed: no CORS headers.
            let (_, ex) = run(
                &c,
                "GET",
                "/x",
                &[
                    ("origin", "https://app.example.com"),
                    ("origin", "https://app.example.com"),
                ],
            );
            assert!(ex.response_headers.is_empty());
            // A path refused with 400 still carries the CORS headers.
            let (v, ex) = run(
                &c,
                "GET",
                "/a%2Fb",
                &[("origin", "https://app.example.com")],
            );
            assert!(matches!(v, Verdict::Reply(ref r) if r.code == ErrorCode::InvalidRequest));
            assert_eq!(ex.response_headers.len(), 3);
        }

        #[test]
        fn without_cors_nothing_is_added_and_preflights_pass() {
            let c = cfg(r#"{"default_route":{}}"#);
            let (v, ex) = run(
                &c,
                "OPTIONS",
                "/x",
                &[
                    ("origin", "https://app.example.com"),
                    ("access-control-request-method", "PUT"),
                ],
            );
            assert!(matches!(v, Verdict::Forward(_)));
            assert!(ex.vary.is_empty() && ex.response_headers.is_empty());
        }

        #[test]
        fn upstream_cors_headers_are_replaced_or_dropped() {
            use crate::headers::{response_ops, HeaderOp};
            let c = cfg(CFG);
            let upstream = vec![
                ("access-control-allow-origin".to_string(), "*".to_string()),
                ("Access-Control-Allow-Methods".to_string(), "*".to_string()),
                ("vary".to_string(), "accept-encoding".to_string()),
            ];
            let ops = response_ops(&c, &upstream, &[], &["origin"]);
            assert!(ops.contains(&HeaderOp::Remove("access-control-allow-origin".into())));
            assert!(ops.contains(&HeaderOp::Remove("Access-Control-Allow-Methods".into())));
            assert!(ops.contains(&HeaderOp::Set(
                "vary".into(),
                "accept-encoding, origin".into()
            )));
            let ours = vec![(
                "access-control-allow-origin".to_string(),
                "https://app.example.com".to_string(),
            )];
            let ops = response_ops(&c, &upstream, &ours, &["origin"]);
            assert!(!ops.contains(&HeaderOp::Remove("access-control-allow-origin".into())));
            assert!(ops.contains(&HeaderOp::Set(
                "access-control-allow-origin".into(),
                "https://app.example.com".into()
            )));
            // Without a cors section the upstream's headers are its own business.
            let plain = cfg("{}");
            let ops = response_ops(&plain, &upstream, &[], &[]);
            assert!(!ops.iter().any(|o| matches!(o, HeaderOp::Remove(_))));
        }
    }
}
