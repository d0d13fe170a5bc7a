//! JWT (JWS compact serialization) verification, cheapest checks first.
//!
//! `decode` checks size, structure, strict base64url, the header (`alg` allowed, no `crit`,
//! `kid` a string) and the types of the registered claims; `check_claims` checks `iss`, `aud`
//! and the time claims against `now`; only then does `verify_signature` do public-key work.
//! A forged token thus costs a base64 decode and two small JSON parses unless it carries
//! plausible claims for this provider and a key it names exists. Nothing here trusts a claim
//! before the signature is checked: callers only act on a token `verify_signature` accepted.

use super::jwks::{b64url_decode, Alg, AlgSet, KeySet, SelectError};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::fmt;

/// What a provider accepts; compiled from `jwt_providers.<name>`.
#[derive(Debug, Clone)]
pub struct Rules {
    pub issuer: Option<String>,
    pub audiences: Vec<String>,
    pub algorithms: AlgSet,
    pub clock_skew_s: u64,
    pub require_exp: bool,
    pub max_token_bytes: usize,
}

/// Why a token was refused. Every variant is a 401 `invalid_token`; the text is for the
/// response body and the log, and never echoes token content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtError {
    TooLarge,
    /// Not three non-empty base64url segments, or a segment does not decode.
    Malformed(&'static str),
    /// `alg` is `none` (in any letter case).
    AlgNone,
    /// `alg` is missing, not a string, or not an algorithm this verifier implements.
    BadAlg,
    /// `alg` is implemented but not in the provider's `algorithms`.
    AlgNotAllowed,
    /// The header lists `crit` extensions (none are understood) or uses `b64`/`zip`.
    UnsupportedHeader(&'static str),
    /// A header or claim member has the wrong JSON type or range.
    BadMember(&'static str),
    WrongIssuer,
    WrongAudience,
    MissingExp,
    /// The token has neither `sub` nor `client_id`, so there is no client to identify.
    MissingSubject,
    Expired,
    NotYetValid,
    IssuedInFuture,
    /// No key has the token's `kid`.
    UnknownKid,
    /// No key of the token's `alg` (with its `kid`): key confusion, or a wrong `alg`.
    NoKeyForAlg,
    /// The provider's keys have not been fetched yet (remote JWKS), or the fetch failed.
    KeysUnavailable,
    BadSignature,
}

impl fmt::Display for JwtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            JwtError::TooLarge => "token is larger than max_token_bytes",
            JwtError::Malformed(what) => what,
            JwtError::AlgNone => "alg \"none\" is never accepted",
            JwtError::BadAlg => "token alg is missing or not supported",
            JwtError::AlgNotAllowed => "token alg is not allowed for this issuer",
            JwtError::UnsupportedHeader(what) => what,
            JwtError::BadMember(what) => what,
            JwtError::WrongIssuer => "token issuer is not accepted",
            JwtError::WrongAudience => "token audience is not accepted",
            JwtError::MissingExp => "token has no exp claim",
            JwtError::MissingSubject => "token has no sub claim",
            JwtError::Expired => "token has expired",
            JwtError::NotYetValid => "token is not valid yet (nbf)",
            JwtError::IssuedInFuture => "token iat is in the future",
            JwtError::UnknownKid => "no signing key matches the token kid",
            JwtError::NoKeyForAlg => "no signing key of the token alg matches",
            JwtError::KeysUnavailable => "signing keys are not available",
            JwtError::BadSignature => "token signature is invalid",
        };
        f.write_str(s)
    }
}

impl std::error::Error for JwtError {}

/// A structurally valid token whose registered claims have the right types. Not yet trusted.
#[derive(Debug, Clone)]
pub struct Token<'a> {
    pub alg: Alg,
    pub kid: Option<String>,
    pub claims: Map<String, Value>,
    pub iss: Option<String>,
    pub sub: Option<String>,
    pub exp: Option<u64>,
    pub nbf: Option<u64>,
    pub iat: Option<u64>,
    /// `header.payload`, the bytes the signature covers, exactly as transmitted.
    pub signing_input: &'a str,
    /// The third segment, decoded only when a signature check is needed.
    pub signature_b64: &'a str,
}

/// A JSON object whose members are unique. Duplicate names are refused because two parsers
/// may disagree on which value wins (`{"alg":"HS256","alg":"none"}`).
struct UniqueObject(Map<String, Value>);

impl<'de> Deserialize<'de> for UniqueObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = UniqueObject;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<UniqueObject, A::Error> {
                let mut out = Map::new();
                while let Some(k) = m.next_key::<String>()? {
                    let v: Value = m.next_value()?;
                    if out.insert(k, v).is_some() {
                        return Err(de::Error::custom("duplicate member"));
                    }
                }
                Ok(UniqueObject(out))
            }
        }
        d.deserialize_map(V)
    }
}

fn parse_object(bytes: &[u8]) -> Option<Map<String, Value>> {
    serde_json::from_slice::<UniqueObject>(bytes)
        .ok()
        .map(|o| o.0)
}

/// A NumericDate (RFC 7519): a non-negative number of seconds. Fractions are truncated, as
/// Envoy's jwt_verify_lib does; negative or absurd values are refused.
fn numeric_date(v: &Value) -> Option<u64> {
    let n = v.as_number()?;
    if let Some(u) = n.as_u64() {
        return Some(u);
    }
    let f = n.as_f64()?;
    // Non-negative and inside u64 (2^63 is exact in f64; NaN and infinities fall outside).
    if (0.0..9_223_372_036_854_775_808.0).contains(&f) {
        Some(f as u64)
    } else {
        None
    }
}

fn opt_string(
    claims: &Map<String, Value>,
    name: &str,
    err: &'static str,
) -> Result<Option<String>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(JwtError::BadMember(err)),
    }
}

fn opt_date(
    claims: &Map<String, Value>,
    name: &str,
    err: &'static str,
) -> Result<Option<u64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => numeric_date(v).map(Some).ok_or(JwtError::BadMember(err)),
    }
}

/// The three segments of a compact JWS. The header and signature must be non-empty.
fn split(token: &str) -> Result<(&str, &str, &str), JwtError> {
    let mut parts = token.splitn(4, '.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(""), Some(_), Some(_), None) => Err(JwtError::Malformed("token header is empty")),
        (Some(_), Some(_), Some(""), None) => Err(JwtError::Malformed("token has no signature")),
        (Some(h), Some(p), Some(s), None) => Ok((h, p, s)),
        _ => Err(JwtError::Malformed(
            "token is not three dot-separated segments",
        )),
    }
}

/// The protected header members this verifier acts on.
struct Header {
    alg: Alg,
    kid: Option<String>,
}

fn decode_header(h: &str, algorithms: AlgSet) -> Result<Header, JwtError> {
    let header_bytes =
        b64url_decode(h).ok_or(JwtError::Malformed("token header is not base64url"))?;
    let header = parse_object(&header_bytes)
        .ok_or(JwtError::Malformed("token header is not a JSON object"))?;
    let alg = match header.get("alg") {
        Some(Value::String(name)) => {
            if name.eq_ignore_ascii_case("none") {
                return Err(JwtError::AlgNone);
            }
            Alg::parse(name).ok_or(JwtError::BadAlg)?
        }
        _ => return Err(JwtError::BadAlg),
    };
    if !algorithms.contains(alg) {
        return Err(JwtError::AlgNotAllowed);
    }
    // RFC 7515 4.1.11: a recipient must reject `crit` names it does not understand; this
    // verifier understands none, and an empty `crit` is invalid too.
    if header.contains_key("crit") {
        return Err(JwtError::UnsupportedHeader(
            "token header lists crit extensions, none of which are supported",
        ));
    }
    if header.contains_key("b64") || header.contains_key("zip") || header.contains_key("enc") {
        return Err(JwtError::UnsupportedHeader(
            "token header uses b64, zip or enc, which a signed JWT does not",
        ));
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(JwtError::BadMember("token kid is not a string")),
    };
    // `jku`, `x5u`, `jwk` and `x5c` are deliberately ignored: keys come from the config only.
    Ok(Header { alg, kid })
}

/// Structure, header and claim types. No key material is touched.
pub fn decode<'a>(token: &'a str, rules: &Rules) -> Result<Token<'a>, JwtError> {
    if token.len() > rules.max_token_bytes {
        return Err(JwtError::TooLarge);
    }
    let (h, p, s) = split(token)?;
    let Header { alg, kid } = decode_header(h, rules.algorithms)?;
    let payload_bytes =
        b64url_decode(p).ok_or(JwtError::Malformed("token payload is not base64url"))?;
    let claims = parse_object(&payload_bytes)
        .ok_or(JwtError::Malformed("token payload is not a JSON object"))?;
    let iss = opt_string(&claims, "iss", "iss claim is not a string")?;
    let sub = opt_string(&claims, "sub", "sub claim is not a string")?;
    opt_string(&claims, "jti", "jti claim is not a string")?;
    match claims.get("aud") {
        None | Some(Value::String(_)) => {}
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {}
        Some(_) => {
            return Err(JwtError::BadMember(
                "aud claim is not a string or an array of strings",
            ))
        }
    }
    let exp = opt_date(
        &claims,
        "exp",
        "exp claim is not a non-negative NumericDate",
    )?;
    let nbf = opt_date(
        &claims,
        "nbf",
        "nbf claim is not a non-negative NumericDate",
    )?;
    let iat = opt_date(
        &claims,
        "iat",
        "iat claim is not a non-negative NumericDate",
    )?;

    Ok(Token {
        alg,
        kid,
        claims,
        iss,
        sub,
        exp,
        nbf,
        iat,
        signing_input: &token[..h.len() + 1 + p.len()],
        signature_b64: s,
    })
}

/// The unverified `iss` of a token, only to choose among a route's providers (the chosen
/// provider then checks everything). Bounded: larger tokens are not looked into.
pub fn peek_issuer(token: &str) -> Option<String> {
    if token.len() > 65_536 {
        return None;
    }
    let (_, p, _) = split(token).ok()?;
    let claims = parse_object(&b64url_decode(p)?)?;
    match claims.get("iss") {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    }
}

/// The JWS layer alone: structure, header and signature, with the payload opaque (it need
/// not be JSON). The JWT path uses the same pieces; this exists so the signature layer can be
/// checked against JWS test suites whose payloads are not claims.
pub fn verify_jws(token: &str, algorithms: AlgSet, keys: &KeySet) -> Result<(), JwtError> {
    let (h, p, s) = split(token)?;
    let Header { alg, kid } = decode_header(h, algorithms)?;
    b64url_decode(p).ok_or(JwtError::Malformed("token payload is not base64url"))?;
    let t = Token {
        alg,
        kid,
        claims: Map::new(),
        iss: None,
        sub: None,
        exp: None,
        nbf: None,
        iat: None,
        signing_input: &token[..h.len() + 1 + p.len()],
        signature_b64: s,
    };
    verify_signature(&t, &[keys])
}

/// Issuer, audience and time. `now_s` is Unix seconds.
pub fn check_claims(t: &Token<'_>, rules: &Rules, now_s: u64) -> Result<(), JwtError> {
    if let Some(want) = &rules.issuer {
        if t.iss.as_deref() != Some(want.as_str()) {
            return Err(JwtError::WrongIssuer);
        }
    }
    if !rules.audiences.is_empty() && !audience_allowed(t.claims.get("aud"), &rules.audiences) {
        return Err(JwtError::WrongAudience);
    }
    let skew = rules.clock_skew_s;
    match t.exp {
        // Valid while now < exp + skew.
        Some(exp) if now_s >= exp.saturating_add(skew) => return Err(JwtError::Expired),
        None if rules.require_exp => return Err(JwtError::MissingExp),
        _ => {}
    }
    if let Some(nbf) = t.nbf {
        if now_s < nbf.saturating_sub(skew) {
            return Err(JwtError::NotYetValid);
        }
    }
    if let Some(iat) = t.iat {
        if iat > now_s.saturating_add(skew) {
            return Err(JwtError::IssuedInFuture);
        }
    }
    Ok(())
}

/// `aud` (a string or an array of strings) must contain one of `audiences`. Compared exactly
/// (RFC 7519 4.1.3); Envoy's scheme and trailing-slash folding is deliberately not copied.
pub fn audience_allowed(aud: Option<&Value>, audiences: &[String]) -> bool {
    match aud {
        Some(Value::String(a)) => audiences.iter().any(|w| w == a),
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(Value::as_str)
            .any(|a| audiences.iter().any(|w| w == a)),
        _ => false,
    }
}

/// Picks the keys a token may be checked with (no signature work), so an unknown `kid` or a
/// key-type mismatch is known before any cache lookup or public-key operation.
pub fn check_key_exists(t: &Token<'_>, keys: &[&KeySet]) -> Result<(), JwtError> {
    let mut unknown_kid = true;
    for set in keys {
        match set.select(t.kid.as_deref(), t.alg) {
            Ok(_) => return Ok(()),
            Err(SelectError::NoKeyForAlg) => unknown_kid = false,
            Err(SelectError::UnknownKid) => {}
        }
    }
    if keys.is_empty() {
        return Err(JwtError::KeysUnavailable);
    }
    Err(if unknown_kid {
        JwtError::UnknownKid
    } else {
        JwtError::NoKeyForAlg
    })
}

/// The public-key (or HMAC) check, against each candidate key in turn.
pub fn verify_signature(t: &Token<'_>, keys: &[&KeySet]) -> Result<(), JwtError> {
    check_key_exists(t, keys)?;
    let sig = b64url_decode(t.signature_b64)
        .ok_or(JwtError::Malformed("token signature is not base64url"))?;
    for set in keys {
        if let Ok(candidates) = set.select(t.kid.as_deref(), t.alg) {
            for key in candidates {
                if key.verify(t.alg, t.signing_input.as_bytes(), &sig) {
                    return Ok(());
                }
            }
        }
    }
    Err(JwtError::BadSignature)
}

/// All checks in order; for tests and the CLI. The filter calls the steps itself so it can
/// consult the verified-token cache between key selection and the signature.
pub fn verify<'a>(
    token: &'a str,
    rules: &Rules,
    keys: &KeySet,
    now_s: u64,
) -> Result<Token<'a>, JwtError> {
    let t = decode(token, rules)?;
    check_claims(&t, rules, now_s)?;
    verify_signature(&t, &[keys])?;
    Ok(t)
}

#[cfg(test)]
mod tests;
