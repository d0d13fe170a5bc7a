//! Request hygiene (SPEC section 2, per route): `max_body_bytes` (413), `content_types`
//! (415), `json_schema` (400) and `backend_ceiling` (503). Compiled here from the route's
//! fields; the stages that apply them are in [`stage`], the schema in [`schema`], the
//! cross-worker ceiling counters in [`ceiling`].
//!
//! Where they run (pipeline order): the header checks (a declared `content-length` over the
//! limit, the content type) right after the CORS preflight, before any limit or credential
//! work; the body stage after the webhook check holds a body of unknown length (chunked) and
//! counts it, and holds and validates the body of a `json_schema` route; then the ceiling,
//! the last check before forwarding.

pub mod ceiling;
pub mod schema;
pub mod stage;

use crate::config::{BackendCeilingConfig, ConfigError};
use crate::headers::is_token;

pub use ceiling::Ceiling;
pub use schema::JsonSchema;

/// Largest `max_body_bytes` accepted: 1 GiB. Envoy never holds more than its buffer limit
/// anyway (`per_connection_buffer_limit_bytes`), and a 32-bit wasm `usize` must hold it.
pub const MAX_BODY_LIMIT: u64 = 1 << 30;

/// A route's compiled hygiene checks; `None` in the policy when it has none.
#[derive(Debug, Clone, Default)]
pub struct Hygiene {
    /// The route's `max_body_bytes`; for a `json_schema` route without one,
    /// [`schema::DEFAULT_BODY_LIMIT`] (its body is read whole, so it is always bounded).
    pub max_body_bytes: Option<usize>,
    /// Accepted media ranges (lower-case `type/subtype`, `type/*` or `*/*`); empty = no check.
    pub content_types: Vec<MediaRange>,
    /// Every non-empty request body must be JSON satisfying it.
    pub json_schema: Option<JsonSchema>,
    pub ceiling: Option<Ceiling>,
}

/// One `content_types` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaRange {
    /// Lower-case; `*` only in `*/*`.
    pub ty: String,
    /// Lower-case; `*` for any subtype.
    pub sub: String,
}

impl MediaRange {
    /// Whether a request's media type (`type`, `subtype`, any case) is in this range.
    pub fn matches(&self, ty: &str, sub: &str) -> bool {
        (self.ty == "*" || self.ty.eq_ignore_ascii_case(ty))
            && (self.sub == "*" || self.sub.eq_ignore_ascii_case(sub))
    }
}

impl std::fmt::Display for MediaRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.ty, self.sub)
    }
}

/// The media type of a `content-type` value without its parameters (`; charset=utf-8`),
/// as (`type`, `subtype`), or `None` when it is not `token/token`.
pub fn media_type(value: &str) -> Option<(&str, &str)> {
    let essence = value.split(';').next()?.trim_matches([' ', '\t']);
    let (ty, sub) = essence.split_once('/')?;
    (is_token(ty) && is_token(sub)).then_some((ty, sub))
}

fn compile_range(path: &str, s: &str) -> Result<MediaRange, ConfigError> {
    let bad = |why: &str| ConfigError::new(path, format!("'{s}' {why}"));
    if s.contains(';') {
        return Err(bad(
            "has parameters: give the bare media type (parameters such as charset are ignored \
             when matching)",
        ));
    }
    let Some((ty, sub)) = s.split_once('/') else {
        return Err(bad("is not a media type such as \"application/json\""));
    };
    if !is_token(ty) || !is_token(sub) {
        return Err(bad("is not a media type such as \"application/json\""));
    }
    if (ty.contains('*') && (ty != "*" || sub != "*")) || (sub.contains('*') && sub != "*") {
        return Err(bad(
            "uses '*' wrongly: only \"type/*\" or \"*/*\" are wildcards",
        ));
    }
    Ok(MediaRange {
        ty: ty.to_ascii_lowercase(),
        sub: sub.to_ascii_lowercase(),
    })
}

/// Pre-creates every route's ceiling key (call from `Worker::configure`, before traffic).
pub fn prepare(cfg: &crate::config::Config, store: &dyn crate::store::SharedStore) {
    let policies = cfg
        .routes
        .iter()
        .map(|r| &r.policy)
        .chain(cfg.default_route.as_ref());
    for p in policies {
        if let Some(c) = p.hygiene.as_ref().and_then(|h| h.ceiling.as_ref()) {
            c.prepare(store);
        }
    }
}

/// Validates and compiles a route's hygiene fields. `path` is the route's JSON path;
/// `store_key` names the route's ceiling counters in shared data.
pub fn compile(
    path: &str,
    store_key: &str,
    max_body_bytes: Option<u64>,
    content_types: Option<&[String]>,
    json_schema: Option<&serde_json::Value>,
    ceiling: Option<&BackendCeilingConfig>,
) -> Result<Option<Hygiene>, ConfigError> {
    if max_body_bytes.is_none()
        && content_types.is_none()
        && json_schema.is_none()
        && ceiling.is_none()
    {
        return Ok(None);
    }
    let max_body_bytes = match max_body_bytes {
        None => None,
        Some(0) => {
            return Err(ConfigError::new(
                format!("{path}.max_body_bytes"),
                "must be at least 1 (a route that takes no body: use content_types or methods)",
            ))
        }
        Some(n) if n > MAX_BODY_LIMIT => {
            return Err(ConfigError::new(
                format!("{path}.max_body_bytes"),
                format!("must be at most {MAX_BODY_LIMIT}"),
            ))
        }
        Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
    };
    let json_schema = json_schema
        .map(|v| JsonSchema::compile(&format!("{path}.json_schema"), v))
        .transpose()?;
    let max_body_bytes = match (max_body_bytes, &json_schema) {
        (None, Some(_)) => Some(schema::DEFAULT_BODY_LIMIT as usize),
        (n, _) => n,
    };
    let mut ranges = Vec::new();
    if let Some(list) = content_types {
        if list.is_empty() {
            return Err(ConfigError::new(
                format!("{path}.content_types"),
                "must not be empty (leave it out to accept any content type)",
            ));
        }
        for (i, s) in list.iter().enumerate() {
            let r = compile_range(&format!("{path}.content_types[{i}]"), s)?;
            if !ranges.contains(&r) {
                ranges.push(r);
            }
        }
    }
    let ceiling = match ceiling {
        None => None,
        Some(c) => Some(Ceiling::compile(
            &format!("{path}.backend_ceiling"),
            store_key,
            c,
        )?),
    };
    Ok(Some(Hygiene {
        max_body_bytes,
        content_types: ranges,
        json_schema,
        ceiling,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_ignore_parameters_and_case() {
        assert_eq!(
            media_type("Application/JSON; charset=utf-8"),
            Some(("Application", "JSON"))
        );
        assert_eq!(media_type(" text/plain "), Some(("text", "plain")));
        assert_eq!(
            media_type("application/json;"),
            Some(("application", "json"))
        );
        for bad in [
            "",
            "json",
            "/json",
            "application/",
            "a/b/c",
            "a b/c",
            "a/j,x/y",
        ] {
            assert_eq!(media_type(bad), None, "{bad}");
        }
        let r = compile_range("p", "application/json").unwrap();
        assert!(r.matches("APPLICATION", "Json"));
        assert!(!r.matches("application", "jsonx"));
        let r = compile_range("p", "Text/*").unwrap();
        assert_eq!(r.to_string(), "text/*");
        assert!(r.matches("text", "csv") && !r.matches("image", "png"));
        assert!(compile_range("p", "*/*").unwrap().matches("a", "b"));
    }

    #[test]
    fn bad_fields_are_config_errors_naming_the_path() {
        let err = |mb, ct: Option<&[String]>, c: Option<&BackendCeilingConfig>| {
            compile("routes[0]", "k", mb, ct, None, c).unwrap_err()
        };
        assert_eq!(err(Some(0), None, None).path, "routes[0].max_body_bytes");
        assert_eq!(
            err(Some(MAX_BODY_LIMIT + 1), None, None).path,
            "routes[0].max_body_bytes"
        );
        assert_eq!(err(None, Some(&[]), None).path, "routes[0].content_types");
        for bad in [
            "json",
            "application/json; charset=utf-8",
            "*/json",
            "app*/json",
            "a/b*",
            "a b/c",
            "",
        ] {
            let e = err(None, Some(&[bad.to_string()]), None);
            assert_eq!(e.path, "routes[0].content_types[0]", "{bad}");
        }
        let ok = compile(
            "routes[0]",
            "k",
            Some(10),
            Some(&["application/json".into(), "APPLICATION/JSON".into()]),
            None,
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(ok.max_body_bytes, Some(10));
        assert_eq!(ok.content_types.len(), 1, "duplicates folded");
        assert!(compile("r", "k", None, None, None, None).unwrap().is_none());
    }

    #[test]
    fn a_json_schema_route_always_has_a_body_limit() {
        let schema = serde_json::json!({"type": "object"});
        let h = compile("routes[1]", "k", None, None, Some(&schema), None)
            .unwrap()
            .unwrap();
        assert_eq!(h.max_body_bytes, Some(1 << 20));
        assert!(h.json_schema.is_some());
        let h = compile("routes[1]", "k", Some(100), None, Some(&schema), None)
            .unwrap()
            .unwrap();
        assert_eq!(h.max_body_bytes, Some(100), "the route's own limit wins");
        let bad = serde_json::json!({"type": 5});
        let e = compile("routes[1]", "k", None, None, Some(&bad), None).unwrap_err();
        assert_eq!(e.path, "routes[1].json_schema");
    }
}
