//! From verified claims to what policies use: scopes, roles, tier, forwarded claim headers;
//! and the `scopes_all` / `scopes_any` / `roles_any` checks.

use super::jwt::JwtError;
use crate::identity::Identity;
use serde_json::{Map, Value};

/// Longest claim value copied into an upstream header; longer ones are not forwarded.
pub const MAX_HEADER_VALUE: usize = 4096;
/// Most scopes or roles one token may carry (bounds per-request work and memory).
pub const MAX_ENTRIES: usize = 256;

/// Splits a space-delimited list (RFC 6749 `scope`) or takes an array of strings.
fn string_list(v: &Value, what: &'static str, out: &mut Vec<String>) -> Result<(), JwtError> {
    let bad = JwtError::BadMember(what);
    match v {
        Value::String(s) => {
            for part in s.split(' ').filter(|p| !p.is_empty()) {
                out.push(part.to_string());
            }
        }
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::String(s) if !s.is_empty() && !s.contains(' ') => out.push(s.clone()),
                    _ => return Err(bad),
                }
            }
        }
        _ => return Err(bad),
    }
    if out.len() > MAX_ENTRIES || out.iter().any(|s| !is_header_safe(s)) {
        return Err(bad);
    }
    Ok(())
}

/// Scopes from every listed claim present (`scope`, `scp`, ...), deduplicated in order.
pub fn scopes(
    claims: &Map<String, Value>,
    scope_claims: &[String],
) -> Result<Vec<String>, JwtError> {
    let mut out = Vec::new();
    for name in scope_claims {
        if let Some(v) = claims.get(name) {
            string_list(
                v,
                "scope claim is not a space-delimited string or an array of strings",
                &mut out,
            )?;
        }
    }
    dedup(&mut out);
    Ok(out)
}

pub fn roles(
    claims: &Map<String, Value>,
    roles_claim: Option<&str>,
) -> Result<Vec<String>, JwtError> {
    let mut out = Vec::new();
    if let Some(v) = roles_claim.and_then(|n| claims.get(n)) {
        string_list(
            v,
            "roles claim is not a space-delimited string or an array of strings",
            &mut out,
        )?;
    }
    dedup(&mut out);
    Ok(out)
}

/// The tier named by `tier_claim`, when present. It must be a short visible-ASCII string:
/// it selects rate limits and is sent upstream.
pub fn tier(
    claims: &Map<String, Value>,
    tier_claim: Option<&str>,
) -> Result<Option<String>, JwtError> {
    match tier_claim.and_then(|n| claims.get(n)) {
        None => Ok(None),
        Some(Value::String(s)) if super::api_key::is_token_text(s) => Ok(Some(s.clone())),
        Some(_) => Err(JwtError::BadMember(
            "tier claim is not a short visible-ASCII string",
        )),
    }
}

fn dedup(v: &mut Vec<String>) {
    let mut seen = 0;
    for i in 0..v.len() {
        if !v[..seen].contains(&v[i]) {
            v.swap(seen, i);
            seen += 1;
        }
    }
    v.truncate(seen);
}

/// Whether a string can be a header value as is: no control characters (CR/LF would split
/// headers), bounded length.
pub fn is_header_safe(s: &str) -> bool {
    s.len() <= MAX_HEADER_VALUE && !s.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f)
}

/// A claim as header text: strings as they are, numbers and booleans as JSON, arrays of
/// strings space-joined, anything else (objects, nested arrays) as compact JSON. `None` when
/// the result is not header-safe.
pub fn header_value(v: &Value) -> Option<String> {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Null => return None,
        Value::Bool(_) | Value::Number(_) => v.to_string(),
        Value::Array(items) if items.iter().all(Value::is_string) => items
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" "),
        _ => v.to_string(),
    };
    is_header_safe(&s).then_some(s)
}

/// The (header, value) pairs of `forward_claims` present in the token.
pub fn forwarded(
    claims: &Map<String, Value>,
    forward: &[(String, String)],
) -> Vec<(String, String)> {
    forward
        .iter()
        .filter_map(|(claim, header)| {
            claims
                .get(claim)
                .and_then(header_value)
                .map(|v| (header.clone(), v))
        })
        .collect()
}

/// The claims a rate-limit key names (`claim:<name>`), as text.
pub fn named(claims: &Map<String, Value>, names: &[String]) -> Vec<(String, String)> {
    names
        .iter()
        .filter_map(|n| claims.get(n).and_then(header_value).map(|v| (n.clone(), v)))
        .collect()
}

/// What a route requires after authentication.
#[derive(Debug, Clone, Copy)]
pub struct Requirements<'a> {
    pub scopes_all: &'a [String],
    pub scopes_any: &'a [String],
    pub roles_any: &'a [String],
}

/// A failed requirement: the scopes to name in `www-authenticate` (`None` for roles, which are
/// not OAuth scopes) and a message for the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insufficient {
    pub scope: Option<String>,
    pub message: String,
}

/// Checks the requirements against a verified identity.
pub fn authorize(id: &Identity, req: Requirements<'_>) -> Result<(), Insufficient> {
    let missing: Vec<&str> = req
        .scopes_all
        .iter()
        .filter(|s| !id.scopes.contains(s))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(Insufficient {
            scope: Some(req.scopes_all.join(" ")),
            message: format!("missing required scope: {}", missing.join(" ")),
        });
    }
    if !req.scopes_any.is_empty() && !req.scopes_any.iter().any(|s| id.scopes.contains(s)) {
        return Err(Insufficient {
            scope: Some(req.scopes_any.join(" ")),
            message: format!("needs one of the scopes: {}", req.scopes_any.join(" ")),
        });
    }
    if !req.roles_any.is_empty() && !req.roles_any.iter().any(|r| id.roles.contains(r)) {
        return Err(Insufficient {
            scope: None,
            message: format!("needs one of the roles: {}", req.roles_any.join(" ")),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::AuthMethod;
    use serde_json::json;

    fn m(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn scopes_from_strings_and_arrays_across_claims() {
        let c = m(json!({"scope": "read:orders  write:orders", "scp": ["admin", "read:orders"]}));
        let names = vec!["scope".to_string(), "scp".to_string()];
        assert_eq!(
            scopes(&c, &names).unwrap(),
            ["read:orders", "write:orders", "admin"]
        );
        assert_eq!(scopes(&m(json!({})), &names).unwrap(), Vec::<String>::new());
        for bad in [
            json!({"scope": 5}),
            json!({"scp": [1]}),
            json!({"scp": ["a b"]}),
            json!({"scope": "a\nb"}),
        ] {
            assert!(scopes(&m(bad.clone()), &names).is_err(), "{bad}");
        }
        let many = (0..=MAX_ENTRIES)
            .map(|i| format!("s{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        assert!(scopes(&m(json!({ "scope": many })), &names).is_err());
    }

    #[test]
    fn roles_and_tier() {
        let c = m(json!({"roles": ["admin", "ops"], "plan": "pro", "bad": 1, "sp": "a b"}));
        assert_eq!(roles(&c, Some("roles")).unwrap(), ["admin", "ops"]);
        assert!(roles(&c, None).unwrap().is_empty());
        assert!(roles(&c, Some("bad")).is_err());
        assert_eq!(tier(&c, Some("plan")).unwrap().as_deref(), Some("pro"));
        assert_eq!(tier(&c, Some("missing")).unwrap(), None);
        assert!(tier(&c, Some("bad")).is_err());
        assert!(tier(&c, Some("sp")).is_err());
    }

    #[test]
    fn forwarded_claims_are_header_safe() {
        let c = m(
            json!({"tenant": "t-1", "n": 7, "b": true, "list": ["a", "b"],
                         "obj": {"k": 1}, "crlf": "x\r\nx-injected: 1", "nul": null}),
        );
        let fwd = |claim: &str| forwarded(&c, &[(claim.to_string(), "x-h".to_string())]);
        assert_eq!(fwd("tenant"), [("x-h".to_string(), "t-1".to_string())]);
        assert_eq!(fwd("n")[0].1, "7");
        assert_eq!(fwd("b")[0].1, "true");
        assert_eq!(fwd("list")[0].1, "a b");
        assert_eq!(fwd("obj")[0].1, r#"{"k":1}"#);
        assert!(fwd("crlf").is_empty());
        assert!(fwd("nul").is_empty());
        assert!(fwd("absent").is_empty());
    }

    fn id(scopes: &[&str], roles: &[&str]) -> Identity {
        Identity {
            method: AuthMethod::ApiKey,
            subject: "s".into(),
            client: "s".into(),
            tier: "free".into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            roles: roles.iter().map(|s| s.to_string()).collect(),
            forwarded: vec![],
            claims: vec![],
            strip_authorization: false,
        }
    }

    #[test]
    fn requirements() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let (all, any, roles) = (v(&["read", "write"]), v(&["a", "b"]), v(&["admin"]));
        let req = Requirements {
            scopes_all: &all,
            scopes_any: &any,
            roles_any: &roles,
        };
        assert!(authorize(&id(&["read", "write", "b"], &["admin"]), req).is_ok());
        let e = authorize(&id(&["read", "b"], &["admin"]), req).unwrap_err();
        assert_eq!(e.scope.as_deref(), Some("read write"));
        assert!(
            e.message.contains("write") && !e.message.contains("read "),
            "{}",
            e.message
        );
        let e = authorize(&id(&["read", "write"], &["admin"]), req).unwrap_err();
        assert_eq!(e.scope.as_deref(), Some("a b"));
        let e = authorize(&id(&["read", "write", "a"], &["user"]), req).unwrap_err();
        assert_eq!(e.scope, None);
        assert!(e.message.contains("admin"));
        let none: Vec<String> = vec![];
        let empty = Requirements {
            scopes_all: &none,
            scopes_any: &none,
            roles_any: &none,
        };
        assert!(authorize(&id(&[], &[]), empty).is_ok());
    }
}
