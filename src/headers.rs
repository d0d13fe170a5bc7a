//! Response headers: security defaults, `vary` merging, and the headers of local replies.
//!
//! Processing is idempotent (set-if-absent, replace, merge-if-missing) because a local reply
//! may pass through the filter's own response callback as well.

use crate::config::Config;
use crate::pipeline::Answer;
use crate::reply::LocalReply;
use std::borrow::Cow;

/// One change to make to the response header map. Borrowed from the config and the
/// exchange: this runs on every response, and each copy is an allocation in the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderOp<'a> {
    /// Add a header that is not present.
    Add(Cow<'a, str>, Cow<'a, str>),
    /// Replace (or add) a header.
    Set(Cow<'a, str>, Cow<'a, str>),
    /// Drop a header (every value of it).
    Remove(Cow<'a, str>),
}

fn find<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Whether a comma-separated header value already lists `token` (case-insensitive).
pub fn list_contains(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token) || t.trim() == "*")
}

/// The ops that turn an upstream (or local) response into what the client gets.
///
/// `extra` are the request's own response headers (rate-limit, CORS, quota); they replace
/// upstream values of the same name. `vary` lists tokens to merge into `vary`.
pub fn response_ops<'a>(
    cfg: &'a Config,
    existing: &[(String, String)],
    extra: &'a [(String, String)],
    vary: &[&str],
) -> Vec<HeaderOp<'a>> {
    let mut ops = Vec::with_capacity(cfg.security_headers.len() + extra.len() + 1);
    for (name, value) in &cfg.security_headers {
        if find(existing, name).is_none() {
            ops.push(HeaderOp::Add(name.into(), value.into()));
        }
    }
    for (name, value) in extra {
        ops.push(HeaderOp::Set(name.into(), value.into()));
    }
    if cfg.cors.is_some() {
        // The filter's CORS policy is the only one: an upstream's own
        // `access-control-allow-origin: *` must not widen it.
        for (name, _) in existing {
            if crate::cors::is_cors_response_header(name)
                && !extra.iter().any(|(k, _)| k.eq_ignore_ascii_case(name))
                && !ops
                    .iter()
                    .any(|o| matches!(o, HeaderOp::Remove(k) if k == name))
            {
                ops.push(HeaderOp::Remove(Cow::Owned(name.clone())));
            }
        }
    }
    if !vary.is_empty() {
        // An upstream may send `vary` on several lines; `Set` replaces them all, so keep
        // every line's tokens.
        let mut lines = existing
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("vary"))
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty());
        let current: Option<String> = lines.next().map(|first| {
            lines.fold(first.to_string(), |mut acc, v| {
                acc.push_str(", ");
                acc.push_str(v);
                acc
            })
        });
        let missing: Vec<&str> = vary
            .iter()
            .copied()
            .filter(|t| !current.as_deref().is_some_and(|c| list_contains(c, t)))
            .collect();
        if !missing.is_empty() {
            let mut v = current.unwrap_or_default();
            for t in missing {
                if !v.is_empty() {
                    v.push_str(", ");
                }
                v.push_str(t);
            }
            ops.push(HeaderOp::Set("vary".into(), v.into()));
        }
    }
    ops
}

/// The full header list of a local reply: JSON, no-store, security headers, the reply's own
/// headers and the request's response headers.
pub fn local_reply_headers(
    cfg: &Config,
    reply: &LocalReply,
    extra: &[(String, String)],
    vary: &[&str],
) -> Vec<(String, String)> {
    local_headers(cfg, Some("application/json"), &reply.headers, extra, vary)
}

/// The headers of a local answer that is not a denial (CORS preflight 204): no body, so no
/// content type; otherwise as a local reply.
pub fn answer_headers(
    cfg: &Config,
    answer: &Answer,
    extra: &[(String, String)],
    vary: &[&str],
) -> Vec<(String, String)> {
    local_headers(cfg, None, &answer.headers, extra, vary)
}

/// What every response the filter writes itself carries: `cache-control: no-store`, the
/// security headers, the request's response headers and the reply's own (those win).
fn local_headers(
    cfg: &Config,
    content_type: Option<&str>,
    own: &[(String, String)],
    extra: &[(String, String)],
    vary: &[&str],
) -> Vec<(String, String)> {
    let mut h: Vec<(String, String)> =
        Vec::with_capacity(8 + cfg.security_headers.len() + own.len() + extra.len());
    if let Some(ct) = content_type {
        h.push(("content-type".into(), ct.into()));
    }
    h.push(("cache-control".into(), "no-store".into()));
    for (k, v) in &cfg.security_headers {
        h.push((k.clone(), v.clone()));
    }
    for (k, v) in extra.iter().chain(own.iter()) {
        match h.iter_mut().find(|(hk, _)| hk == k) {
            Some(slot) => slot.1 = v.clone(),
            None => h.push((k.clone(), v.clone())),
        }
    }
    if !vary.is_empty() {
        h.push(("vary".into(), vary.join(", ")));
    }
    h
}

/// RFC 9110 `token` (header names, media types, CORS method and header lists).
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

/// Escapes a string for a JSON log line without allocating a serde value.
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Facts for the one-line JSON deny log.
pub struct DenyLog<'a> {
    pub reply: &'a LocalReply,
    pub route: &'a str,
    pub client: Option<&'a str>,
    pub ip: Option<&'a str>,
    pub request_id: Option<&'a str>,
    pub method: &'a str,
    pub path: &'a str,
}

impl DenyLog<'_> {
    pub fn line(&self) -> String {
        let mut s = String::with_capacity(256);
        s.push_str("{\"event\":\"api_guard.deny\",\"status\":");
        s.push_str(&self.reply.status.to_string());
        s.push_str(",\"reason\":");
        json_str(&mut s, self.reply.code.as_str());
        s.push_str(",\"message\":");
        json_str(&mut s, &self.reply.message);
        s.push_str(",\"route\":");
        json_str(&mut s, self.route);
        for (k, v) in [
            ("policy", self.reply.policy.as_deref()),
            ("key", self.reply.key.as_deref()),
            ("client", self.client),
            ("ip", self.ip),
            ("request_id", self.request_id),
        ] {
            s.push_str(",\"");
            s.push_str(k);
            s.push_str("\":");
            match v {
                Some(v) => json_str(&mut s, v),
                None => s.push_str("null"),
            }
        }
        s.push_str(",\"method\":");
        json_str(&mut s, self.method);
        s.push_str(",\"path\":");
        // Paths are attacker-controlled: cap what reaches the log.
        let p = match self.path.char_indices().nth(512) {
            Some((i, _)) => &self.path[..i],
            None => self.path,
        };
        json_str(&mut s, p);
        s.push('}');
        s
    }
}

/// The log line of a `shadow` rate limit that would have denied (the request went on).
pub struct ShadowDenyLog<'a> {
    pub limit: &'a str,
    pub key: &'a str,
    pub route: &'a str,
    pub ip: Option<&'a str>,
    pub request_id: Option<&'a str>,
}

impl ShadowDenyLog<'_> {
    pub fn line(&self) -> String {
        let mut s = String::with_capacity(160);
        s.push_str(
            "{\"event\":\"api_guard.shadow_deny\",\"reason\":\"rate_limit_exceeded\",\"policy\":",
        );
        json_str(&mut s, self.limit);
        s.push_str(",\"key\":");
        json_str(&mut s, self.key);
        s.push_str(",\"route\":");
        json_str(&mut s, self.route);
        for (k, v) in [("ip", self.ip), ("request_id", self.request_id)] {
            s.push_str(",\"");
            s.push_str(k);
            s.push_str("\":");
            match v {
                Some(v) => json_str(&mut s, v),
                None => s.push_str("null"),
            }
        }
        s.push('}');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::ErrorCode;

    fn cfg(json: &str) -> Config {
        crate::config::parse(json.as_bytes(), &|_| None).unwrap().0
    }

    #[test]
    fn security_headers_added_only_when_absent() {
        let c = cfg("{}");
        let existing = vec![("x-frame-options".to_string(), "SAMEORIGIN".to_string())];
        let ops = response_ops(&c, &existing, &[], &[]);
        assert_eq!(ops.len(), 4);
        assert!(!ops
            .iter()
            .any(|o| matches!(o, HeaderOp::Add(k, _) if k == "x-frame-options")));
    }

    #[test]
    fn vary_merges_once() {
        let c = cfg("{}");
        let existing = vec![("vary".to_string(), "Accept-Encoding".to_string())];
        let ops = response_ops(&c, &existing, &[], &["origin"]);
        assert!(ops.contains(&HeaderOp::Set(
            "vary".into(),
            "Accept-Encoding, origin".into()
        )));
        let existing = vec![
            ("vary".to_string(), "accept-encoding".to_string()),
            ("vary".to_string(), "accept-language".to_string()),
        ];
        let ops = response_ops(&c, &existing, &[], &["origin"]);
        assert!(ops.contains(&HeaderOp::Set(
            "vary".into(),
            "accept-encoding, accept-language, origin".into()
        )));
        let existing = vec![
            ("vary".to_string(), "accept".to_string()),
            ("vary".to_string(), "Origin".to_string()),
        ];
        let ops = response_ops(&c, &existing, &[], &["origin"]);
        assert!(!ops
            .iter()
            .any(|o| matches!(o, HeaderOp::Set(k, _) if k == "vary")));
        let existing = vec![("vary".to_string(), "Origin, accept".to_string())];
        let ops = response_ops(&c, &existing, &[], &["origin"]);
        assert!(!ops
            .iter()
            .any(|o| matches!(o, HeaderOp::Set(k, _) if k == "vary")));
    }

    #[test]
    fn deny_log_is_valid_json_even_for_hostile_values() {
        let r = LocalReply::new(ErrorCode::InvalidRequest, "bad \"path\"");
        let path = format!("/a\"\\\u{1}{}", "x".repeat(2000));
        let line = DenyLog {
            reply: &r,
            route: "r",
            client: None,
            ip: Some("1.2.3.4"),
            request_id: Some("id"),
            method: "GET",
            path: &path,
        }
        .line();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["reason"], "invalid_request");
        assert_eq!(v["client"], serde_json::Value::Null);
        assert!(v["path"].as_str().unwrap().len() <= 520);
    }

    #[test]
    fn local_reply_headers_are_json_no_store_and_secure() {
        let c = cfg("{}");
        let r = LocalReply::new(ErrorCode::InvalidToken, "x")
            .with_header("www-authenticate", "Bearer error=\"invalid_token\"");
        let h = local_reply_headers(&c, &r, &[], &["origin"]);
        let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("content-type"), Some("application/json"));
        assert_eq!(get("cache-control"), Some("no-store"));
        assert_eq!(get("x-content-type-options"), Some("nosniff"));
        assert_eq!(
            get("www-authenticate"),
            Some("Bearer error=\"invalid_token\"")
        );
        assert_eq!(get("vary"), Some("origin"));
    }
}
