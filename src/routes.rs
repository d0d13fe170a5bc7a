//! Path normalization and route matching (SPEC section 2, `routes`).
//!
//! Matching runs on a normalized path so that `/api/./orders`, `/api//orders` and
//! `/api/%6Frders` cannot dodge a policy written for `/api/orders`. The filter forwards the
//! raw path, so every path whose meaning differs between common backends is refused outright
//! (400), never guessed at: the rule is "what we authorized is what any backend serves".
//! Refused: `%2F`, `%5C` and a raw `\` (servers disagree on segment boundaries); `;` raw or
//! as `%3B` (Tomcat, Jetty and Spring drop `;` path parameters, so `/public/..;/api` is
//! `/api` to them); `%25` (a double-encoded path decodes a second time in some stacks);
//! control characters raw or encoded (`%00`, `%09`: truncation and trimming); bytes that do
//! not decode to valid UTF-8, overlong forms included (`%c0%ae` is `.` to lax decoders); and
//! characters that Unicode normalization folds to `.`, `/` or `\` (fullwidth `．`, ...).

use std::fmt;

/// Why a request path was refused (400 `invalid_request`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    NotAbsolute,
    EncodedSlash,
    Backslash,
    BadPercentEncoding,
    ControlCharacter,
    AboveRoot,
    Semicolon,
    EncodedPercent,
    InvalidUtf8,
    Lookalike,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::NotAbsolute => "the path must start with '/'",
            PathError::EncodedSlash => "the path contains an encoded '/' or '\\' (%2F, %5C)",
            PathError::Backslash => "the path contains a '\\'",
            PathError::BadPercentEncoding => "the path contains a malformed percent-encoding",
            PathError::ControlCharacter => "the path contains a control character",
            PathError::AboveRoot => "the path climbs above the root with '..'",
            PathError::Semicolon => {
                "the path contains ';' (or %3B): path parameters mean different paths to different backends"
            }
            PathError::EncodedPercent => "the path contains an encoded '%' (%25): double encoding",
            PathError::InvalidUtf8 => "the path does not decode to valid UTF-8",
            PathError::Lookalike => {
                "the path contains a character that some backends fold to '.', '/' or '\\'"
            }
        })
    }
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Normalizes the path part of a `:path` value: drops the query and fragment, decodes
/// percent-encoded unreserved characters (upper-casing the hex of the rest), merges `//`,
/// resolves `.` and `..`, and drops a trailing `/` (so `/login/` matches a rule for `/login`).
///
/// Returns the path unchanged (borrowed) when it is already normal, the common case.
pub fn normalize(raw: &str) -> Result<std::borrow::Cow<'_, str>, PathError> {
    let path = match raw.find(['?', '#']) {
        Some(i) => &raw[..i],
        None => raw,
    };
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // Fast path: nothing to decode, no empty or dot segments, no trailing slash.
    let mut simple = true;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'%' | 0x80.. => simple = false,
            b'\\' => return Err(PathError::Backslash),
            b';' => return Err(PathError::Semicolon),
            0..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
            b'/' if i > 0 && bytes[i - 1] == b'/' => simple = false,
            b'.' if bytes[i - 1] == b'/' => simple = false,
            _ => {}
        }
    }
    if simple && (bytes.len() == 1 || bytes[bytes.len() - 1] != b'/') {
        return Ok(std::borrow::Cow::Borrowed(path));
    }

    // Decode unreserved characters first so `%2e%2e` is resolved as `..`. `full` is the path
    // with everything decoded, kept only to check what non-ASCII bytes decode to.
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut full: Vec<u8> = Vec::new();
    let mut non_ascii = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (h, l) = match (bytes.get(i + 1), bytes.get(i + 2)) {
                (Some(&h), Some(&l)) => (h, l),
                _ => return Err(PathError::BadPercentEncoding),
            };
            let v = match (hex_val(h), hex_val(l)) {
                (Some(h), Some(l)) => (h << 4) | l,
                _ => return Err(PathError::BadPercentEncoding),
            };
            match v {
                b'/' | b'\\' => return Err(PathError::EncodedSlash),
                b'%' => return Err(PathError::EncodedPercent),
                b';' => return Err(PathError::Semicolon),
                0..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
                0x80.. => non_ascii = true,
                _ => {}
            }
            full.push(v);
            if is_unreserved(v) {
                decoded.push(v);
            } else {
                decoded.push(b'%');
                decoded.push(h.to_ascii_uppercase());
                decoded.push(l.to_ascii_uppercase());
            }
            i += 3;
        } else {
            non_ascii |= b >= 0x80;
            full.push(b);
            decoded.push(b);
            i += 1;
        }
    }
    if non_ascii {
        // Strict UTF-8 (std refuses overlong forms and surrogates), then look-alikes.
        let text = std::str::from_utf8(&full).map_err(|_| PathError::InvalidUtf8)?;
        // U+FFFD: the host boundary replaced raw bytes that were not UTF-8 (`utf8_headers`).
        if text.contains('\u{FFFD}') {
            return Err(PathError::InvalidUtf8);
        }
        if text.chars().any(is_lookalike) {
            return Err(PathError::Lookalike);
        }
    }

    let mut segments: Vec<&[u8]> = Vec::new();
    for seg in decoded.split(|&b| b == b'/') {
        match seg {
            b"" | b"." => {}
            b".." => {
                if segments.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    if segments.is_empty() {
        out.push('/');
    }
    for s in segments {
        out.push('/');
        // Only ASCII bytes were decoded, so UTF-8 validity is unchanged from the input.
        out.push_str(std::str::from_utf8(s).map_err(|_| PathError::BadPercentEncoding)?);
    }
    Ok(std::borrow::Cow::Owned(out))
}

/// Characters that NFKC or a lax "best fit" mapping turns into `.`, `/` or `\\` (so into a
/// dot segment or a segment boundary the filter never saw).
fn is_lookalike(c: char) -> bool {
    matches!(
        c,
        '\u{2024}' // one dot leader
            | '\u{2025}' // two dot leader
            | '\u{2026}' // horizontal ellipsis
            | '\u{FE52}' // small full stop
            | '\u{FF0E}' // fullwidth full stop
            | '\u{3002}' // ideographic full stop
            | '\u{FF61}' // halfwidth ideographic full stop
            | '\u{2044}' // fraction slash
            | '\u{2215}' // division slash
            | '\u{29F8}' // big solidus
            | '\u{FF0F}' // fullwidth solidus
            | '\u{29F5}' // reverse solidus operator
            | '\u{29F9}' // big reverse solidus
            | '\u{FE68}' // small reverse solidus
            | '\u{FF3C}' // fullwidth reverse solidus
    )
}

/// How a route selects requests, compiled from `match`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    /// Segment-aware prefix, stored without a trailing `/`; `/` matches everything.
    Prefix(String),
    Template(Vec<TemplateSegment>),
    RouteName(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateSegment {
    Literal(String),
    /// `{name}`: exactly one non-empty segment.
    Param,
}

/// A compiled `match`: methods (upper-case, `None` = any) and a path rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matcher {
    pub methods: Option<Vec<String>>,
    pub path: PathMatch,
}

impl Matcher {
    /// `path` must already be normalized; `route_name` is the Envoy route's name, if known.
    pub fn matches(&self, method: &str, path: &str, route_name: Option<&str>) -> bool {
        if let Some(methods) = &self.methods {
            if !methods.iter().any(|m| m.eq_ignore_ascii_case(method)) {
                return false;
            }
        }
        match &self.path {
            PathMatch::Exact(p) => p == path,
            PathMatch::Prefix(p) => {
                p == "/"
                    || (path.starts_with(p.as_str())
                        && matches!(path.as_bytes().get(p.len()), None | Some(b'/')))
            }
            PathMatch::Template(segs) => {
                let mut parts = path.split('/').skip(1);
                for seg in segs {
                    match (seg, parts.next()) {
                        (TemplateSegment::Literal(l), Some(p)) if l == p => {}
                        (TemplateSegment::Param, Some(p)) if !p.is_empty() => {}
                        _ => return false,
                    }
                }
                parts.next().is_none()
            }
            PathMatch::RouteName(n) => route_name == Some(n.as_str()),
        }
    }
}

/// Compiles a `template` such as `/api/orders/{id}`; the error says what is wrong.
pub fn compile_template(t: &str) -> Result<Vec<TemplateSegment>, String> {
    if !t.starts_with('/') {
        return Err("must start with '/'".into());
    }
    let mut out = Vec::new();
    for seg in t.split('/').skip(1) {
        if seg.starts_with('{') && seg.ends_with('}') && seg.len() > 2 {
            let name = &seg[1..seg.len() - 1];
            if !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(format!("parameter name '{name}' must be alphanumeric"));
            }
            out.push(TemplateSegment::Param);
        } else if seg.contains(['{', '}']) {
            return Err(format!(
                "segment '{seg}': a parameter must be a whole segment"
            ));
        } else if seg.is_empty() || seg == "." || seg == ".." {
            return Err("must be a normalized path (no empty, '.' or '..' segments)".into());
        } else {
            out.push(TemplateSegment::Literal(seg.to_string()));
        }
    }
    Ok(out)
}

/// Checks a configured `path`/`prefix` is already in normal form, so that it can match at all.
pub fn check_config_path(p: &str) -> Result<String, String> {
    match normalize(p) {
        Ok(n) if n == p || (p.len() > 1 && p.ends_with('/') && n == p[..p.len() - 1]) => {
            Ok(n.into_owned())
        }
        Ok(n) => Err(format!(
            "'{p}' is not a normalized path (requests are matched on '{n}')"
        )),
        Err(e) => Err(format!("'{p}': {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize(p).map(|c| c.into_owned())
    }

    #[test]
    fn normalizes_dot_segments_slashes_and_unreserved_encodings() {
        assert_eq!(n("/").unwrap(), "/");
        assert_eq!(n("/api/orders?x=1").unwrap(), "/api/orders");
        assert_eq!(n("/api//orders").unwrap(), "/api/orders");
        assert_eq!(n("/api/./orders/").unwrap(), "/api/orders");
        assert_eq!(n("/api/x/../orders").unwrap(), "/api/orders");
        assert_eq!(n("/api/%6Frders").unwrap(), "/api/orders");
        assert_eq!(n("/api/%2e%2e/admin").unwrap(), "/admin");
        assert_eq!(n("/a%20b").unwrap(), "/a%20b");
        assert_eq!(n("/a%2fb").unwrap_err(), PathError::EncodedSlash);
        assert_eq!(n("/a%2Fb").unwrap_err(), PathError::EncodedSlash);
        assert_eq!(n("/a%5cb").unwrap_err(), PathError::EncodedSlash);
        assert_eq!(n("/a\\b").unwrap_err(), PathError::Backslash);
        assert_eq!(n("/..").unwrap_err(), PathError::AboveRoot);
        assert_eq!(n("/a/../../b").unwrap_err(), PathError::AboveRoot);
        assert_eq!(n("/%2e%2e/x").unwrap_err(), PathError::AboveRoot);
        assert_eq!(n("/a%zz").unwrap_err(), PathError::BadPercentEncoding);
        assert_eq!(n("/a%4").unwrap_err(), PathError::BadPercentEncoding);
        assert_eq!(n("api").unwrap_err(), PathError::NotAbsolute);
        assert_eq!(n("*").unwrap_err(), PathError::NotAbsolute);
        assert_eq!(n("/a\u{1}").unwrap_err(), PathError::ControlCharacter);
        assert_eq!(n("/a/..").unwrap(), "/");
        assert_eq!(n("/a/.").unwrap(), "/a");
        assert_eq!(n("/a/b?../..").unwrap(), "/a/b");
        assert_eq!(n("/caf\u{e9}/%41").unwrap(), "/caf\u{e9}/A");
    }

    #[test]
    fn paths_that_backends_read_differently_are_refused() {
        use PathError::*;
        // Each reached a protected `/api/orders` through a public `/public` prefix on a
        // permissive backend (issue 14, item 7).
        for (p, e) in [
            ("/public/..;/api/orders", Semicolon),
            ("/public/..;x=1/api/orders", Semicolon),
            ("/public/%2e%2e;/api/orders", Semicolon),
            ("/public/..%3b/api/orders", Semicolon),
            ("/public/..%3B/api/orders", Semicolon),
            ("/api/orders;jsessionid=1", Semicolon),
            ("/public/%252e%252e/api/orders", EncodedPercent),
            ("/public/..%252f/api/orders", EncodedPercent),
            ("/public/%c0%ae%c0%ae/api/orders", InvalidUtf8),
            ("/public/%e0%80%ae/api", InvalidUtf8),
            ("/public/%ff/api", InvalidUtf8),
            ("/public/\u{FFFD}/api", InvalidUtf8),
            ("/public/%ef%bc%8e%ef%bc%8e/api/orders", Lookalike),
            ("/public/\u{FF0E}\u{FF0E}/api/orders", Lookalike),
            ("/public/\u{2025}/api/orders", Lookalike),
            ("/public/..%ef%bc%8f/api/orders", Lookalike),
            ("/public/x/..%00/api", ControlCharacter),
            ("/public/%09../api/orders", ControlCharacter),
            ("/public/%7f", ControlCharacter),
            ("/public/%0d%0a", ControlCharacter),
        ] {
            assert_eq!(n(p).unwrap_err(), e, "{p}");
        }
        // Legitimate non-ASCII and encoded reserved characters still pass.
        assert_eq!(n("/caf%C3%A9").unwrap(), "/caf%C3%A9");
        assert_eq!(n("/a%20b/%3F").unwrap(), "/a%20b/%3F");
        // `;` in the query is not part of the path.
        assert_eq!(n("/a?x=1;y=2").unwrap(), "/a");
    }

    #[test]
    fn normal_paths_are_not_copied() {
        assert!(matches!(
            normalize("/api/orders/7?q=1"),
            Ok(std::borrow::Cow::Borrowed("/api/orders/7"))
        ));
    }

    fn m(methods: Option<&[&str]>, path: PathMatch) -> Matcher {
        Matcher {
            methods: methods.map(|m| m.iter().map(|s| s.to_string()).collect()),
            path,
        }
    }

    #[test]
    fn prefix_is_segment_aware() {
        let r = m(None, PathMatch::Prefix("/api/orders".into()));
        assert!(r.matches("GET", "/api/orders", None));
        assert!(r.matches("GET", "/api/orders/7", None));
        assert!(!r.matches("GET", "/api/ordersX", None));
        assert!(!r.matches("GET", "/api", None));
        assert!(m(None, PathMatch::Prefix("/".into())).matches("GET", "/x", None));
    }

    #[test]
    fn methods_exact_template_and_route_name() {
        let r = m(Some(&["POST"]), PathMatch::Exact("/auth/login".into()));
        assert!(r.matches("POST", "/auth/login", None));
        assert!(!r.matches("GET", "/auth/login", None));
        assert!(!r.matches("POST", "/auth/login2", None));

        let t = m(
            None,
            PathMatch::Template(compile_template("/api/orders/{id}").unwrap()),
        );
        assert!(t.matches("GET", "/api/orders/7", None));
        assert!(!t.matches("GET", "/api/orders", None));
        assert!(!t.matches("GET", "/api/orders/7/items", None));

        let n = m(None, PathMatch::RouteName("r1".into()));
        assert!(n.matches("GET", "/x", Some("r1")));
        assert!(!n.matches("GET", "/x", Some("r2")));
        assert!(!n.matches("GET", "/x", None));
    }

    #[test]
    fn template_and_config_path_validation() {
        assert!(compile_template("api/{id}").is_err());
        assert!(compile_template("/api/x{id}").is_err());
        assert!(compile_template("/api//{id}").is_err());
        assert!(compile_template("/api/{}").is_err());
        assert_eq!(check_config_path("/api/").unwrap(), "/api");
        assert!(check_config_path("/api/../x").is_err());
        assert!(check_config_path("/api%2fx").is_err());
    }
}
