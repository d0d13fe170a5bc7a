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
