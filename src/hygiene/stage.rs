//! The hygiene stages of the request pipeline.
//!
//! - [`headers`] (`Stage::Hygiene`, right after the CORS preflight): a declared
//!   `content-length` over `max_body_bytes` is refused at once (413, nothing read); the
//!   content type is checked against `content_types` (415).
//! - [`body`] (`Stage::Body`, after the webhook check): a body of unknown length (chunked,
//!   HTTP/2 without `content-length`) is held and counted as it arrives, and refused (413) as
//!   soon as the running total passes the limit, before any byte is forwarded. Only the
//!   count is needed, so nothing is copied out of the host. A declared length within the
//!   limit is not held: Envoy's codecs never pass more body than `content-length` says.
//!   On a `json_schema` route every body is held to its end and copied (at most the limit:
//!   the route always has one) into [`HygieneState::schema_body`], then checked whole (400).
//!   The copy is filled by whatever stage reads the body, the webhook check included, so a
//!   body is read from the host once.
//! - [`ceiling`] (`Stage::Ceiling`, the last before forwarding): the backend ceiling; an
//!   admission counted in flight is released by [`release`] at the stream's end.

use super::ceiling::{Admission, Lease};
use super::{media_type, Hygiene};
use crate::config::Config;
use crate::pipeline::{Env, Exchange, Request, Step, Wait};
use crate::reply::{ErrorCode, LocalReply};

/// Per-request hygiene state (kept in the `Exchange`).
#[derive(Debug, Default)]
pub struct HygieneState {
    /// The route's `max_body_bytes`, set once the route is known: every body event checks
    /// the running total against it, whatever stage holds the request.
    pub body_limit: Option<usize>,
    /// Body bytes received so far (the host's running total).
    pub received: usize,
    /// The body stage holds the request until the body has ended.
    pub waiting: bool,
    /// A `json_schema` route's body as read so far (`Some` from the request headers on, for
    /// a request with a body); taken when checked.
    pub schema_body: Option<Vec<u8>>,
    /// The ceiling's in-flight admission, released at the stream's end.
    pub lease: Option<Lease>,
}

fn policy_hygiene<'c>(cfg: &'c Config, ex: &Exchange) -> Option<&'c Hygiene> {
    ex.policy(cfg).and_then(|p| p.hygiene.as_ref())
}

fn too_large(limit: usize, what: String) -> LocalReply {
    LocalReply::new(
        ErrorCode::PayloadTooLarge,
        format!("request body {what} is over this route's limit of {limit} bytes"),
    )
    .with_policy("max_body_bytes")
}

/// The declared `content-length`, when there is exactly one readable value.
fn content_length(req: &Request) -> Option<u64> {
    if req.header_count("content-length") != 1 {
        return None;
    }
    req.header("content-length")
        .and_then(|v| v.trim().parse().ok())
}

/// Whether the request carries a body: a positive `content-length`, a `transfer-encoding`,
/// or (no length given) a stream that did not end with the headers.
fn has_body(req: &Request, ex: &Exchange) -> bool {
    match content_length(req) {
        Some(n) => n > 0,
        None => req.header("transfer-encoding").is_some() || !ex.body_ended,
    }
}

/// `Stage::Hygiene`: the checks the request headers decide.
pub fn headers(cfg: &Config, req: &Request, ex: &mut Exchange, _env: &Env) -> Step {
    let Some(h) = policy_hygiene(cfg, ex) else {
        return Step::Next;
    };
    ex.hygiene.body_limit = h.max_body_bytes;
    if let Some(limit) = h.max_body_bytes {
        if let Some(n) = content_length(req).filter(|n| *n > limit as u64) {
            return Step::Reply(too_large(limit, format!("of {n} bytes")));
        }
    }
    // Any stream that did not end with its headers, whatever it declares (a body the
    // headers deny must not slip through unchecked): from the first body byte on, whichever
    // stage reads it (see the module doc).
    if h.json_schema.is_some() && (has_body(req, ex) || !ex.body_ended) {
        ex.hygiene.schema_body = Some(Vec::new());
    }
    if h.content_types.is_empty() || !has_body(req, ex) {
        return Step::Next;
    }
    let accepted = || {
        h.content_types
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let refuse = |what: &str| {
        Step::Reply(
            LocalReply::new(
                ErrorCode::UnsupportedMediaType,
                format!("{what}; this route accepts: {}", accepted()),
            )
            .with_policy("content_types"),
        )
    };
    match req.header_count("content-type") {
        0 => return refuse("a request with a body needs a content-type"),
        1 => {}
        // Two values: the backend might read the other one.
        _ => return refuse("more than one content-type header"),
    }
    let value = req.header("content-type").unwrap_or("");
    match media_type(value) {
        None => refuse("the content-type is not a media type"),
        Some((ty, sub)) if h.content_types.iter().any(|r| r.matches(ty, sub)) => Step::Next,
        Some((ty, sub)) => {
            // The client's own value, bounded (it is echoed in the body).
            let shown: String = format!("{ty}/{sub}").chars().take(100).collect();
            refuse(&format!("content type '{shown}' is not accepted"))
        }
    }
}

/// `Stage::Body`: holds a body of unknown length until it has ended within the limit, and
/// a `json_schema` route's body until it can be checked whole.
pub fn body(cfg: &Config, req: &Request, ex: &mut Exchange, _env: &Env) -> Step {
    let Some(h) = policy_hygiene(cfg, ex) else {
        return Step::Next;
    };
    let Some(limit) = h.max_body_bytes else {
        return Step::Next;
    };
    if ex.body_ended {
        // Already counted to the end (e.g. by the webhook check).
        ex.hygiene.waiting = false;
        if ex.hygiene.received > limit {
            return Step::Reply(too_large(
                limit,
                format!("of {} bytes", ex.hygiene.received),
            ));
        }
        let Some(copied) = ex.hygiene.schema_body.as_ref().map(Vec::len) else {
            return Step::Next;
        };
        if copied < ex.hygiene.received {
            // The body arrived while a callout was pending: the host holds what is not
            // copied yet.
            ex.hygiene.waiting = true;
            return Step::Wait(Wait::Body);
        }
        let body = ex.hygiene.schema_body.take().unwrap_or_default();
        return match &h.json_schema {
            Some(schema) => check_schema(schema, &body),
            None => Step::Next,
        };
    }
    if content_length(req).is_some() && ex.hygiene.schema_body.is_none() {
        // Within the limit (checked at the headers), and enforced by Envoy's codec.
        return Step::Next;
    }
    ex.hygiene.waiting = true;
    Step::Wait(Wait::Body)
}

/// The schema check of a whole body. An empty body (a chunked body of no bytes) is treated
/// as no body: not checked, as for `content_types`.
fn check_schema(schema: &super::JsonSchema, body: &[u8]) -> Step {
    if body.is_empty() {
        return Step::Next;
    }
    match schema.check(body) {
        Ok(()) => Step::Next,
        Err(r) => {
            let mut reply =
                LocalReply::new(ErrorCode::InvalidRequest, r.message).with_policy("json_schema");
            if let Some(p) = r.pointer {
                reply = reply.with_field("pointer", p);
            }
            if let Some(k) = r.keyword {
                reply = reply.with_field("keyword", k);
            }
            Step::Reply(reply)
        }
    }
}

/// How many more body bytes a `json_schema` route's copy may take: up to one past its limit
/// (the limit refuses the body before that). `None`: nothing is being copied.
pub fn schema_read_limit(ex: &Exchange) -> Option<usize> {
    let copied = ex.hygiene.schema_body.as_ref()?.len();
    let limit = ex.hygiene.body_limit.unwrap_or(0);
    Some(limit.saturating_add(1).saturating_sub(copied))
}

/// Adds body bytes just read from the host to a `json_schema` route's copy.
pub fn copy_body(ex: &mut Exchange, chunk: &[u8]) {
    if let Some(buf) = ex.hygiene.schema_body.as_mut() {
        buf.extend_from_slice(chunk);
    }
}

/// Whether a `json_schema` route's copy lacks body bytes the host reported.
pub fn copy_incomplete(ex: &Exchange) -> bool {
    ex.hygiene
        .schema_body
        .as_ref()
        .is_some_and(|b| b.len() < ex.hygiene.received)
}

/// Body progress, from any stage: `total` is the running body length. `Some` reply when it
/// passed the route's limit.
pub fn on_body(ex: &mut Exchange, total: usize, end_of_stream: bool) -> Option<LocalReply> {
    ex.hygiene.received = ex.hygiene.received.max(total);
    ex.body_ended |= end_of_stream;
    let limit = ex.hygiene.body_limit?;
    (ex.hygiene.received > limit).then(|| {
        ex.hygiene.waiting = false;
        too_large(limit, "passed".to_string())
    })
}

/// `Stage::Ceiling`: the backend ceiling, after every cheaper check.
pub fn ceiling(cfg: &Config, _req: &Request, ex: &mut Exchange, env: &Env) -> Step {
    let Some(c) = policy_hygiene(cfg, ex).and_then(|h| h.ceiling.as_ref()) else {
        return Step::Next;
    };
    if ex.hygiene.lease.is_some() {
        return Step::Next;
    }
    let (limit, retry_after_s) = match c.admit(env.store, env.now_ms) {
        Ok(Admission::Admitted(lease)) => {
            ex.hygiene.lease = lease;
            return Step::Next;
        }
        Ok(Admission::Denied {
            limit,
            retry_after_s,
        }) => (limit, retry_after_s),
        // Other workers kept winning the CAS race: the route is flooded, which is what the
        // ceiling is for. A store that refuses writes is a host fault: pass, loudly.
        Err(crate::store::StoreError::CasMismatch) => ("contention", 1),
        Err(crate::store::StoreError::Failed) => {
            log::warn!(
                "api-guard: backend_ceiling of route '{}': shared data refused a write, \
                 request admitted uncounted",
                ex.route_name(cfg)
            );
            return Step::Next;
        }
    };
    Step::Reply(
        LocalReply::new(
            ErrorCode::BackendOverloaded,
            format!("this route's backend is at its ceiling ({limit}); retry in {retry_after_s} s"),
        )
        .with_field("retry_after", retry_after_s)
        .with_header("retry-after", retry_after_s.to_string())
        .with_policy(format!("backend_ceiling.{limit}")),
    )
}

/// The stream is over (normal end, reset, local reply, timeout): gives back the ceiling's
/// in-flight admission, once.
pub fn release(cfg: &Config, ex: &mut Exchange, env: &Env) {
    let Some(lease) = ex.hygiene.lease.take() else {
        return;
    };
    let Some(c) = policy_hygiene(cfg, ex).and_then(|h| h.ceiling.as_ref()) else {
        return;
    };
    if let Err(e) = c.release(env.store, lease) {
        log::warn!(
            "api-guard: backend_ceiling of route '{}': release failed ({e:?}); the admission \
             expires by itself",
            ex.route_name(cfg)
        );
    }
}
