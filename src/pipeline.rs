//! The request path (SPEC section 3), as pure logic the glue drives.
//!
//! Order: route → path checks → CORS preflight → request hygiene (declared body size, content
//! type) → adaptive tightening (`adaptive`: the route's rate against its baseline) →
//! per-IP/route limits → credentials → scopes → key sharing (`abuse`) → per-client
//! limits → quota → webhook body check → body size of a body of unknown length and the
//! `json_schema` check → backend ceiling → forward.
//!
//! The glue reads the request once into a [`Request`], keeps an [`Exchange`] per request and
//! calls [`on_request_headers`]. A stage that needs the host to do something asynchronous (an
//! HTTP callout, the body) returns [`Step::Wait`]; the glue does it, stores the result in the
//! `Exchange` and calls [`run`] again, which re-enters the same stage.

use crate::client_ip;
use crate::config::{Config, Policy};
use crate::hygiene::stage as hygiene_stage;
use crate::identity::Identity;
use crate::reply::{ErrorCode, LocalReply};
use crate::routes;
use crate::store::SharedStore;
use crate::webhook::stage::{self as webhook_stage, BodyStep, WebhookState};

/// The request as the glue read it (header names lower-case, as Envoy gives them).
pub struct Request<'a> {
    pub method: &'a str,
    /// The raw `:path`, query included.
    pub path: &'a str,
    pub headers: &'a [(String, String)],
    /// Envoy property `source.address` (`ip:port`).
    pub source_address: Option<&'a str>,
    /// Envoy property `xds.route_name`, read only when a route matches on it.
    pub route_name: Option<&'a str>,
}

impl<'a> Request<'a> {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// How many times a header appears in the map.
    pub fn header_count(&self, name: &str) -> usize {
        self.headers.iter().filter(|(k, _)| k == name).count()
    }
}

/// What the host gives the logic: the time and the shared store.
pub struct Env<'a> {
    /// Unix time in milliseconds, from the host clock.
    pub now_ms: u64,
    pub store: &'a dyn SharedStore,
}

/// Which policy the request got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Matched {
    /// No route matched and there is no `default_route`.
    #[default]
    None,
    Route(usize),
    Default,
}

/// Where [`run`] continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord)]
pub enum Stage {
    #[default]
    Cors,
    Hygiene,
    Adaptive,
    PreAuthLimits,
    Credentials,
    Scopes,
    KeySharing,
    ClientLimits,
    Quota,
    Webhook,
    Body,
    Ceiling,
    Forward,
    Done,
}

/// Something the glue must do before the pipeline can go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    /// Hold the request and feed its body to [`on_request_body`] as it arrives (webhook
    /// signatures cover the body; a body of unknown length is counted against
    /// `max_body_bytes`; a `json_schema` route's body is checked whole); forward nothing
    /// until that says so.
    Body,
    /// Fetch the remote JWKS of `jwt_providers[provider]` (index in `cfg.auth.providers`),
    /// store it with `auth::remote_jwks::store_result`, set `Exchange::jwks_fetched`, re-run.
    /// `waiter`: the request fetches because no set was loaded yet (counted per worker, see
    /// `Authenticator::waiter_fetch_done`), not for an unknown `kid`.
    Jwks { provider: usize, waiter: bool },
    /// Call the quota service; store the result in `Exchange::quota` and run again.
    Quota(crate::quota_client::QuotaCall),
}

/// A successful local answer that is not a denial (the CORS preflight's 204): no body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u32,
    pub headers: Vec<(String, String)>,
}

/// The result of one stage.
pub enum Step {
    Next,
    Reply(LocalReply),
    Answer(Answer),
    Wait(Wait),
}

/// Changes to the request before it goes upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamEdits {
    pub remove: Vec<String>,
    pub set: Vec<(String, String)>,
}

/// What the glue does with the request.
#[derive(Debug)]
pub enum Verdict {
    Forward(UpstreamEdits),
    Reply(LocalReply),
    Answer(Answer),
    Wait(Wait),
}

/// Per-request state the glue keeps between callbacks.
#[derive(Debug, Default)]
pub struct Exchange {
    pub matched: Matched,
    pub stage: Stage,
    /// The normalized path (query dropped).
    pub path: String,
    pub client_ip: Option<String>,
    pub identity: Option<Identity>,
    pub request_id: Option<String>,
    /// Headers added to whatever response the client gets (rate-limit, CORS, quota).
    pub response_headers: Vec<(String, String)>,
    /// Tokens merged into the response's `vary`.
    pub vary: Vec<&'static str>,
    /// Set once a local reply was sent, so the response callback does not redo it.
    pub replied: bool,
    /// The webhook signature check (SPEC section 4).
    pub webhook: WebhookState,
    /// Rate-limit bookkeeping between the two limit stages, and events for stats.
    pub ratelimit: crate::ratelimit::stage::LimitState,
    /// The request already waited for a JWKS fetch (it waits at most once).
    pub jwks_fetched: bool,
    /// The quota callout's result, set by the glue before re-running the quota stage.
    pub quota: Option<crate::quota_client::QuotaOutcome>,
    /// Structured event lines (`events::EventLine`) for the glue to log.
    pub events: Vec<String>,
    /// What the abuse stage saw, for counters.
    pub abuse: crate::abuse::AbuseState,
    /// `abuse.key_sharing` with `tighten` applies: the per-client limits cost more.
    pub tightened: bool,
    /// The route's `adaptive` tightening applies: each of its limits costs this many times
    /// the route's cost (0 = not tightened).
    pub adaptive_factor: u64,
    /// The adaptive switches this request made, for counters.
    pub adaptive: crate::abuse::AdaptiveState,
    /// The request body has ended (with the headers, or a later body callback). Set by the
    /// glue; `false` (a body may follow) is the safe default.
    pub body_ended: bool,
    /// Request hygiene: body size count, the ceiling's in-flight admission.
    pub hygiene: crate::hygiene::stage::HygieneState,
}

impl Exchange {
    /// The matched route's name, or `default` / `none`, for logs.
    pub fn route_name<'c>(&self, cfg: &'c Config) -> &'c str {
        match self.matched {
            Matched::Route(i) => cfg.routes.get(i).map(|r| r.name.as_str()).unwrap_or("none"),
            Matched::Default => "default",
            Matched::None => "none",
        }
    }

    /// The policy in force, if any.
    pub fn policy<'c>(&self, cfg: &'c Config) -> Option<&'c Policy> {
        match self.matched {
            Matched::Route(i) => cfg.routes.get(i).map(|r| &r.policy),
            Matched::Default => cfg.default_route.as_ref(),
            Matched::None => None,
        }
    }

    /// The client identity for limits and logs: verified client id, else the IP.
    pub fn client_key(&self) -> Option<&str> {
        self.identity
            .as_ref()
            .map(|i| i.client.as_str())
            .or(self.client_ip.as_deref())
    }
}

/// Entry point for request headers: route, path checks, client IP, then the stages.
pub fn on_request_headers(cfg: &Config, req: &Request, ex: &mut Exchange, env: &Env) -> Verdict {
    ex.client_ip = client_ip::resolve(
        cfg.client_ip.xff_trusted_hops,
        // Validation requires it whenever hops > 0; with 0 it is not read.
        cfg.client_ip.use_remote_address.unwrap_or(false),
        req.header("x-forwarded-for"),
        req.source_address,
    )
    .map(str::to_string);
    ex.request_id = req.header("x-request-id").map(str::to_string);
    // Before anything can answer, so every reply (a 400 too) carries the CORS headers.
    crate::cors::annotate(cfg, req, ex);

    let path = match routes::normalize(req.path) {
        Ok(p) => p,
        Err(e) => {
            // As for every other reply: the request is finished (the glue's body callbacks
            // look at the stage).
            ex.stage = Stage::Done;
            return Verdict::Reply(LocalReply::new(
                ErrorCode::InvalidRequest,
                format!("invalid path: {e}"),
            ));
        }
    };
    ex.matched = cfg
        .routes
        .iter()
        .position(|r| r.matcher.matches(req.method, &path, req.route_name))
        .map(Matched::Route)
        .unwrap_or(if cfg.default_route.is_some() {
            Matched::Default
        } else {
            Matched::None
        });
    ex.path = path.into_owned();
    ex.stage = Stage::Cors;
    run(cfg, req, ex, env)
}

/// Runs the stages from `ex.stage` until one replies or waits, or the request is forwarded.
pub fn run(cfg: &Config, req: &Request, ex: &mut Exchange, env: &Env) -> Verdict {
    loop {
        let step = match ex.stage {
            Stage::Cors => crate::cors::stage(cfg, req, ex),
            Stage::Hygiene => hygiene_stage::headers(cfg, req, ex, env),
            Stage::Adaptive => crate::abuse::adaptive_stage(cfg, req, ex, env),
            Stage::PreAuthLimits => crate::ratelimit::stage::pre_auth(cfg, req, ex, env),
            Stage::Credentials => crate::auth::stage::credentials(cfg, req, ex, env),
            Stage::Scopes => crate::auth::stage::scopes(cfg, req, ex, env),
            Stage::KeySharing => crate::abuse::stage(cfg, req, ex, env),
            Stage::ClientLimits => crate::ratelimit::stage::client(cfg, req, ex, env),
            Stage::Quota => crate::quota_client::stage(cfg, req, ex, env),
            Stage::Webhook => webhook_stage::run(cfg, req, ex, env),
            Stage::Body => hygiene_stage::body(cfg, req, ex, env),
            Stage::Ceiling => hygiene_stage::ceiling(cfg, req, ex, env),
            Stage::Forward | Stage::Done => {
                ex.stage = Stage::Done;
                return Verdict::Forward(upstream_edits(cfg, req, ex, env));
            }
        };
        match step {
            Step::Next => ex.stage = next(ex.stage),
            Step::Reply(r) => {
                ex.stage = Stage::Done;
                // 401s and 429s feed the route's adaptive denial rate.
                crate::abuse::adaptive_denial(cfg, ex, env, r.code);
                return Verdict::Reply(r);
            }
            Step::Answer(a) => {
                ex.stage = Stage::Done;
                return Verdict::Answer(a);
            }
            Step::Wait(w) => return Verdict::Wait(w),
        }
    }
}

/// Whether the pipeline waits for the request body (after [`Wait::Body`]).
pub fn waits_for_body(ex: &Exchange) -> bool {
    webhook_stage::waits_for_body(ex) || ex.hygiene.waiting
}

/// The most body bytes the glue should copy out of the host for the next
/// [`on_request_body`] call: a body check needs at most one byte past its limit to refuse
/// it, so a client's oversized body is never copied into the VM. Counting a body's size
/// needs no bytes at all (0).
pub fn body_read_limit(ex: &Exchange) -> usize {
    // A `json_schema` route copies every byte any body check reads (up to its limit).
    let copy = hygiene_stage::schema_read_limit(ex);
    if webhook_stage::waits_for_body(ex) {
        let hook = webhook_stage::body_read_limit(ex);
        copy.map_or(hook, |c| c.min(hook))
    } else if ex.hygiene.waiting {
        copy.unwrap_or(0)
    } else {
        usize::MAX
    }
}

/// What the glue does after [`on_request_body`].
#[derive(Debug)]
pub enum BodyVerdict {
    /// Keep holding and buffering the request; more body is expected.
    More,
    /// The body check passed: call [`run`] to go on (it may forward, reply or wait again).
    Continue,
    Reply(LocalReply),
}

/// Feeds body bytes that arrived since the last call (`chunk` may be empty) to the stage
/// waiting for the body; `end_of_stream` finishes the check. The running total is the
/// bytes fed so far: see [`on_request_body_total`] when the glue copies only part of them.
pub fn on_request_body(
    ex: &mut Exchange,
    chunk: &[u8],
    end_of_stream: bool,
    env: &Env,
) -> BodyVerdict {
    let total = ex.hygiene.received.saturating_add(chunk.len());
    on_request_body_total(ex, total, chunk, end_of_stream, env)
}

/// [`on_request_body`] with the body's running total given by the host (`total`): `chunk`
/// holds the new bytes the glue read (at most [`body_read_limit`], possibly none). The route's
/// `max_body_bytes` is checked first, whatever stage holds the request.
pub fn on_request_body_total(
    ex: &mut Exchange,
    total: usize,
    chunk: &[u8],
    end_of_stream: bool,
    env: &Env,
) -> BodyVerdict {
    if let Some(r) = hygiene_stage::on_body(ex, total, end_of_stream) {
        ex.stage = Stage::Done;
        return BodyVerdict::Reply(r);
    }
    hygiene_stage::copy_body(ex, chunk);
    if ex.hygiene.waiting && !webhook_stage::waits_for_body(ex) {
        if !ex.body_ended {
            return BodyVerdict::More;
        }
        ex.hygiene.waiting = false;
        if hygiene_stage::copy_incomplete(ex) {
            // The host reported bytes it did not hand over: the body stage would wait for
            // them forever. Refuse rather than forward an unchecked body.
            ex.stage = Stage::Done;
            return BodyVerdict::Reply(LocalReply::new(
                ErrorCode::InternalError,
                "the request body could not be read for its json_schema check",
            ));
        }
        return BodyVerdict::Continue;
    }
    match webhook_stage::on_body(ex, chunk, end_of_stream, env) {
        BodyStep::More => BodyVerdict::More,
        // The stage sees `Verified` when `run` re-enters it.
        BodyStep::Continue => BodyVerdict::Continue,
        BodyStep::Reply(r) => {
            ex.stage = Stage::Done;
            BodyVerdict::Reply(r)
        }
    }
}

/// Whether a body event may be over the route's `max_body_bytes` while no stage waits for
/// the body (a callout pending): the glue then feeds the total to [`on_request_body_total`]
/// at once rather than buffering on.
pub fn counts_body(ex: &Exchange) -> bool {
    ex.hygiene.body_limit.is_some() && ex.stage != Stage::Done
}

/// Checks the body's running total against the route's `max_body_bytes` while the request
/// is held for something else; `Some` reply (the request is then finished) when over it.
pub fn check_body_size(ex: &mut Exchange, total: usize, end_of_stream: bool) -> Option<LocalReply> {
    let r = hygiene_stage::on_body(ex, total, end_of_stream)?;
    ex.stage = Stage::Done;
    Some(r)
}

/// The stream is over, however it ended (normal end, reset, local reply, timeout): gives
/// back what the request held in shared state (the backend ceiling's in-flight admission).
pub fn on_stream_end(cfg: &Config, ex: &mut Exchange, env: &Env) {
    hygiene_stage::release(cfg, ex, env);
}

fn next(s: Stage) -> Stage {
    match s {
        Stage::Cors => Stage::Hygiene,
        Stage::Hygiene => Stage::Adaptive,
        Stage::Adaptive => Stage::PreAuthLimits,
        Stage::PreAuthLimits => Stage::Credentials,
        Stage::Credentials => Stage::Scopes,
        Stage::Scopes => Stage::KeySharing,
        Stage::KeySharing => Stage::ClientLimits,
        Stage::ClientLimits => Stage::Quota,
        Stage::Quota => Stage::Webhook,
        Stage::Webhook => Stage::Body,
        Stage::Body => Stage::Ceiling,
        Stage::Ceiling => Stage::Forward,
        Stage::Forward | Stage::Done => Stage::Done,
    }
}

/// Identity headers are always stripped from the client's request and set only from a
/// verified identity; `x-request-id` is added when absent.
fn upstream_edits(cfg: &Config, req: &Request, ex: &mut Exchange, env: &Env) -> UpstreamEdits {
    let mut edits = UpstreamEdits::default();
    for name in &cfg.stripped_request_headers {
        if req.header(name).is_some() {
            edits.remove.push(name.clone());
        }
    }
    if let Some(id) = &ex.identity {
        let ih = &cfg.identity_headers;
        edits.set.push((ih.subject.clone(), id.subject.clone()));
        edits.set.push((ih.client.clone(), id.client.clone()));
        edits.set.push((ih.tier.clone(), id.tier.clone()));
        if !id.scopes.is_empty() {
            edits.set.push((ih.scopes.clone(), id.scopes.join(" ")));
        }
        for (h, v) in &id.forwarded {
            edits.set.push((h.clone(), v.clone()));
        }
        if id.strip_authorization && req.header("authorization").is_some() {
            edits.remove.push("authorization".into());
        }
    }
    if ex.request_id.is_none() {
        let id = new_request_id(env.now_ms);
        edits.set.push(("x-request-id".into(), id.clone()));
        ex.request_id = Some(id);
    }
    edits
}

/// A UUIDv4-shaped id from the host's random source (WASI `random_get` in Envoy).
fn new_request_id(now_ms: u64) -> String {
    let mut b = [0u8; 16];
    if getrandom::getrandom(&mut b).is_err() {
        // No randomness: time-based, still unique enough for log correlation.
        b[..8].copy_from_slice(&now_ms.to_be_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut s = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push(char::from_digit((byte >> 4) as u32, 16).unwrap_or('0'));
        s.push(char::from_digit((byte & 0xf) as u32, 16).unwrap_or('0'));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::AuthMethod;
    use crate::store::MemoryStore;

    fn cfg(json: &str) -> Config {
        crate::config::parse(json.as_bytes(), &|_| None).unwrap().0
    }

    fn hdrs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn go(
        c: &Config,
        method: &str,
        path: &str,
        headers: &[(String, String)],
    ) -> (Verdict, Exchange) {
        let store = MemoryStore::new();
        let env = Env {
            now_ms: 1_700_000_000_000,
            store: &store,
        };
        let req = Request {
            method,
            path,
            headers,
            source_address: Some("10.0.0.1:4000"),
            route_name: Some("envoy-route"),
        };
        let mut ex = Exchange::default();
        let v = on_request_headers(c, &req, &mut ex, &env);
        (v, ex)
    }

    #[test]
    fn bad_paths_get_400() {
        let c = cfg("{}");
        for p in ["/a%2Fb", "/a%5c", "/../x", "/a/%2e%2e/%2e%2e", "/a%zz"] {
            match go(&c, "GET", p, &[]) {
                (Verdict::Reply(r), ex) => {
                    assert_eq!(r.code, ErrorCode::InvalidRequest, "{p}");
                    assert_eq!(ex.stage, Stage::Done, "{p}");
                }
                (v, _) => panic!("{p}: {v:?}"),
            }
        }
    }

    #[test]
    fn first_matching_route_wins_then_default() {
        let c = cfg(r#"{"routes":[
                {"name":"a","match":{"methods":["POST"],"path":"/auth/login"}},
                {"name":"b","match":{"prefix":"/api"}},
                {"name":"c","match":{"route_name":"envoy-route"}}],
              "default_route":{}}"#);
        assert_eq!(
            go(&c, "POST", "/auth/login/?x", &[]).1.matched,
            Matched::Route(0)
        );
        assert_eq!(
            go(&c, "GET", "/auth/login", &[]).1.matched,
            Matched::Route(2)
        );
        assert_eq!(
            go(&c, "GET", "/api//x/../y", &[]).1.matched,
            Matched::Route(1)
        );
        let c = cfg(r#"{"routes":[{"name":"b","match":{"prefix":"/api"}}],"default_route":{}}"#);
        assert_eq!(go(&c, "GET", "/apix", &[]).1.matched, Matched::Default);
        let c = cfg(r#"{"routes":[{"name":"b","match":{"prefix":"/api"}}]}"#);
        assert_eq!(go(&c, "GET", "/apix", &[]).1.matched, Matched::None);
    }

    #[test]
    fn identity_headers_are_stripped_and_request_id_added() {
        let c = cfg("{}");
        let h = hdrs(&[
            ("x-auth-subject", "admin"),
            ("x-auth-scopes", "all"),
            ("accept", "*/*"),
        ]);
        match go(&c, "GET", "/x", &h).0 {
            Verdict::Forward(e) => {
                assert_eq!(
                    e.remove,
                    vec!["x-auth-subject".to_string(), "x-auth-scopes".to_string()]
                );
                let id = &e.set.iter().find(|(k, _)| k == "x-request-id").unwrap().1;
                assert_eq!(id.len(), 36);
                assert_eq!(id.as_bytes()[14], b'4');
            }
            v => panic!("{v:?}"),
        }
        let h = hdrs(&[("x-request-id", "abc")]);
        match go(&c, "GET", "/x", &h).0 {
            Verdict::Forward(e) => assert!(e.set.is_empty()),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn verified_identity_is_forwarded() {
        let c = cfg("{}");
        let store = MemoryStore::new();
        let env = Env {
            now_ms: 0,
            store: &store,
        };
        let h = hdrs(&[("x-request-id", "r"), ("authorization", "Bearer t")]);
        let req = Request {
            method: "GET",
            path: "/",
            headers: &h,
            source_address: None,
            route_name: None,
        };
        let mut ex = Exchange {
            identity: Some(Identity {
                method: AuthMethod::ApiKey,
                subject: "acme".into(),
                client: "acme".into(),
                tier: "pro".into(),
                scopes: vec!["read".into(), "write".into()],
                roles: vec![],
                forwarded: vec![("x-tenant-id".into(), "t1".into())],
                claims: vec![],
                strip_authorization: true,
            }),
            request_id: Some("r".into()),
            ..Default::default()
        };
        let e = upstream_edits(&c, &req, &mut ex, &env);
        assert!(e
            .set
            .contains(&("x-auth-scopes".into(), "read write".into())));
        assert!(e.set.contains(&("x-auth-tier".into(), "pro".into())));
        assert!(e.set.contains(&("x-tenant-id".into(), "t1".into())));
        assert!(e.remove.contains(&"authorization".to_string()));
    }
}
