//! The webhook stage of the request pipeline: holds the request until the body is verified.
//!
//! At the `Webhook` stage the headers are checked ([`super::Webhook::begin`]) and the pipeline
//! waits for the body (`Wait::Body`); the glue then feeds every body chunk through
//! [`on_body`] while Envoy buffers it, and nothing is forwarded until the end of the stream
//! has been verified. A failure is a local reply: 413 `payload_too_large` or
//! 401 `invalid_signature`.

use super::{Verifier, WebhookError};
use crate::config::Config;
use crate::pipeline::{Env, Exchange, Request, Step, Wait};
use crate::reply::{ErrorCode, LocalReply};

/// Where the webhook check of one request stands (kept in the `Exchange`).
#[derive(Debug, Default)]
pub enum WebhookState {
    #[default]
    NotStarted,
    /// Headers accepted; the body is being streamed into the verifier.
    Streaming(Box<Verifier>),
    Verified,
    Failed,
}

/// What the glue does after feeding a body chunk.
#[derive(Debug)]
pub enum BodyStep {
    /// Keep buffering: more body is expected.
    More,
    /// The body is verified (or no webhook check is pending): run the pipeline on.
    Continue,
    Reply(LocalReply),
}

fn reply(webhook: &str, e: WebhookError) -> LocalReply {
    let code = match e {
        WebhookError::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
        _ => ErrorCode::InvalidSignature,
    };
    LocalReply::new(code, e.to_string()).with_policy(webhook)
}

/// The pipeline stage: starts the check for a route with `webhook`, or passes.
pub fn run(cfg: &Config, req: &Request, ex: &mut Exchange, env: &Env) -> Step {
    let Some(name) = ex.policy(cfg).and_then(|p| p.webhook.as_deref()) else {
        return Step::Next;
    };
    match ex.webhook {
        WebhookState::Verified => return Step::Next,
        WebhookState::Streaming(_) => return Step::Wait(Wait::Body),
        WebhookState::Failed | WebhookState::NotStarted => {}
    }
    // Config validation guarantees the name exists; refuse rather than pass if it does not.
    let Some(hook) = cfg.webhooks.get(name) else {
        ex.webhook = WebhookState::Failed;
        return Step::Reply(
            LocalReply::new(ErrorCode::InvalidSignature, "webhook is not configured")
                .with_policy(name),
        );
    };
    match hook.begin(req.headers, env.now_ms) {
        Ok(v) => {
            ex.webhook = WebhookState::Streaming(Box::new(v));
            Step::Wait(Wait::Body)
        }
        Err(e) => {
            ex.webhook = WebhookState::Failed;
            Step::Reply(reply(name, e))
        }
    }
}

/// Whether the pipeline is parked waiting for the request body.
pub fn waits_for_body(ex: &Exchange) -> bool {
    matches!(ex.webhook, WebhookState::Streaming(_))
}

/// How many body bytes the glue should read for the next [`on_body`] call (see
/// [`Verifier::read_limit`]); unbounded when no body check is streaming.
pub fn body_read_limit(ex: &Exchange) -> usize {
    match &ex.webhook {
        WebhookState::Streaming(v) => v.read_limit(),
        _ => usize::MAX,
    }
}

/// Feeds the next body bytes (`chunk` may be empty) and, at the end of the stream, finishes
/// the verification.
pub fn on_body(ex: &mut Exchange, chunk: &[u8], end_of_stream: bool, env: &Env) -> BodyStep {
    let WebhookState::Streaming(v) = &mut ex.webhook else {
        return BodyStep::Continue;
    };
    if let Err(e) = v.update(chunk) {
        let r = reply(v.webhook_name(), e);
        ex.webhook = WebhookState::Failed;
        return BodyStep::Reply(r);
    }
    if !end_of_stream {
        return BodyStep::More;
    }
    let WebhookState::Streaming(v) = std::mem::replace(&mut ex.webhook, WebhookState::Failed)
    else {
        return BodyStep::Continue;
    };
    let name = v.webhook_name().to_string();
    match v.finish(env.now_ms, env.store) {
        Ok(done) => {
            if done.replay_evicted {
                log::warn!(
                    "api-guard: webhook '{name}': replay memory full, a remembered delivery was forgotten early; raise webhooks.{name}.replay_capacity"
                );
            }
            ex.webhook = WebhookState::Verified;
            BodyStep::Continue
        }
        Err(e) => BodyStep::Reply(reply(&name, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{self, BodyVerdict, Verdict};
    use crate::store::MemoryStore;
    use hmac::{Hmac, Mac};
    use sha2::Sha256;

    const CFG: &str = r#"{
        "webhooks": {"gh": {"scheme": "github", "secrets": ["s3cret"], "max_body_bytes": 10}},
        "routes": [{"name": "hook", "match": {"path": "/hook"}, "webhook": "gh"}],
        "default_route": {}
    }"#;

    fn sig(body: &[u8]) -> String {
        let mut m = Hmac::<Sha256>::new_from_slice(b"s3cret").unwrap();
        m.update(body);
        format!("sha256={}", hex::encode(m.finalize().into_bytes()))
    }

    struct Run {
        cfg: Config,
        store: MemoryStore,
        headers: Vec<(String, String)>,
        path: &'static str,
    }

    impl Run {
        fn new(path: &'static str, headers: &[(&str, &str)]) -> Self {
            Self {
                cfg: crate::config::parse(CFG.as_bytes(), &|_| None).unwrap().0,
                store: MemoryStore::new(),
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                path,
            }
        }

        /// Headers, then the body chunks; returns the final verdict.
        fn go(&self, chunks: &[&[u8]]) -> Verdict {
            let env = Env {
                now_ms: 1_700_000_000_000,
                store: &self.store,
            };
            let req = Request {
                method: "POST",
                path: self.path,
                headers: &self.headers,
                source_address: Some("10.0.0.1:1"),
                route_name: None,
            };
            let mut ex = Exchange::default();
            let mut v = pipeline::on_request_headers(&self.cfg, &req, &mut ex, &env);
            for (i, c) in chunks.iter().enumerate() {
                if !matches!(v, Verdict::Wait(Wait::Body)) {
                    return v;
                }
                assert!(pipeline::waits_for_body(&ex));
                v = match pipeline::on_request_body(&mut ex, c, i + 1 == chunks.len(), &env) {
                    BodyVerdict::More => Verdict::Wait(Wait::Body),
                    BodyVerdict::Reply(r) => Verdict::Reply(r),
                    BodyVerdict::Continue => pipeline::run(&self.cfg, &req, &mut ex, &env),
                };
            }
            v
        }
    }

    #[test]
    fn a_webhook_route_waits_for_the_body_then_forwards() {
        let s = sig(b"hello world");
        let run = Run::new("/hook", &[("x-hub-signature-256", &s)]);
        let env = Env {
            now_ms: 0,
            store: &run.store,
        };
        let req = Request {
            method: "POST",
            path: "/hook",
            headers: &run.headers,
            source_address: None,
            route_name: None,
        };
        let mut ex = Exchange::default();
        assert!(matches!(
            pipeline::on_request_headers(&run.cfg, &req, &mut ex, &env),
            Verdict::Wait(Wait::Body)
        ));
        // Nothing is forwarded while the body streams.
        assert!(matches!(
            pipeline::on_request_body(&mut ex, b"hello", false, &env),
            BodyVerdict::More
        ));
        // 11 bytes > max_body_bytes 10.
        match pipeline::on_request_body(&mut ex, b" world", true, &env) {
            BodyVerdict::Reply(r) => {
                assert_eq!((r.status, r.code), (413, ErrorCode::PayloadTooLarge));
                assert_eq!(r.policy.as_deref(), Some("gh"));
            }
            v => panic!("{v:?}"),
        }
        assert_eq!(ex.stage, pipeline::Stage::Done);

        let s = sig(b"hello");
        let run = Run::new("/hook", &[("x-hub-signature-256", &s)]);
        assert!(matches!(run.go(&[b"he", b"", b"llo"]), Verdict::Forward(_)));
        // The same delivery again is a replay.
        match run.go(&[b"hello"]) {
            Verdict::Reply(r) => assert_eq!(r.code, ErrorCode::InvalidSignature),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn bad_headers_reply_before_any_body_and_other_routes_pass() {
        let run = Run::new("/hook", &[("x-hub-signature-256", "sha256=00")]);
        match run.go(&[b"never read"]) {
            Verdict::Reply(r) => {
                assert_eq!((r.status, r.code), (401, ErrorCode::InvalidSignature));
                assert!(r.message.contains("x-hub-signature-256"), "{}", r.message);
            }
            v => panic!("{v:?}"),
        }
        let run = Run::new("/hook", &[("content-length", "11")]);
        assert!(matches!(run.go(&[]), Verdict::Reply(r) if r.code == ErrorCode::PayloadTooLarge));
        let run = Run::new("/other", &[]);
        assert!(matches!(run.go(&[]), Verdict::Forward(_)));
    }

    #[test]
    fn the_glue_never_needs_to_read_more_than_one_byte_past_the_limit() {
        let s = sig(b"hello");
        let run = Run::new("/hook", &[("x-hub-signature-256", &s)]);
        let env = Env {
            now_ms: 1_700_000_000_000,
            store: &run.store,
        };
        let req = Request {
            method: "POST",
            path: "/hook",
            headers: &run.headers,
            source_address: None,
            route_name: None,
        };
        let mut ex = Exchange::default();
        assert_eq!(
            pipeline::body_read_limit(&ex),
            usize::MAX,
            "no check streaming"
        );
        pipeline::on_request_headers(&run.cfg, &req, &mut ex, &env);
        assert_eq!(pipeline::body_read_limit(&ex), 11); // max_body_bytes 10, plus one
        pipeline::on_request_body(&mut ex, b"hell", false, &env);
        assert_eq!(pipeline::body_read_limit(&ex), 7);
        // A client sending a megabyte: the glue copies 7 bytes, and that is already a 413.
        match pipeline::on_request_body(&mut ex, &[b'x'; 7], false, &env) {
            BodyVerdict::Reply(r) => assert_eq!(r.code, ErrorCode::PayloadTooLarge),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn a_wrong_body_is_refused_at_the_end_of_the_stream() {
        let s = sig(b"hello");
        let run = Run::new("/hook", &[("x-hub-signature-256", &s)]);
        match run.go(&[b"hell", b"0"]) {
            Verdict::Reply(r) => assert_eq!(r.code, ErrorCode::InvalidSignature),
            v => panic!("{v:?}"),
        }
        assert!(run.store.is_empty(), "a forged delivery records nothing");
    }
}
