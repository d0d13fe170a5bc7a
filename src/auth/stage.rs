//! The pipeline's Credentials and Scopes stages: request facts in, a [`Step`] out.

use super::{AuthError, Credentials};
use crate::config::Config;
use crate::pipeline::{Env, Exchange, Request, Step, Wait};
use crate::reply::{ErrorCode, LocalReply};

fn code(e: &AuthError) -> ErrorCode {
    match e {
        AuthError::InvalidRequest(_) => ErrorCode::InvalidRequest,
        AuthError::MissingCredentials { .. } => ErrorCode::MissingCredentials,
        AuthError::InvalidToken { .. } => ErrorCode::InvalidToken,
        AuthError::InvalidApiKey => ErrorCode::InvalidApiKey,
        AuthError::InsufficientScope { .. } => ErrorCode::InsufficientScope,
    }
}

/// The local reply for a refusal: SPEC body, `www-authenticate`, and the policy for the log.
pub fn reply(cfg: &Config, e: &AuthError) -> LocalReply {
    let mut r = LocalReply::new(code(e), e.message());
    if let Some(h) = e.www_authenticate() {
        r = r.with_header("www-authenticate", h);
    }
    let policy = match e {
        AuthError::InvalidToken { provider, .. } => cfg
            .auth
            .providers
            .get(*provider)
            .map(|p| format!("jwt:{}", p.name)),
        AuthError::InvalidApiKey => Some("api_key".to_string()),
        _ => None,
    };
    match policy {
        Some(p) => r.with_policy(p),
        None => r,
    }
}

/// Credentials: verifies the route's accepted credential and records the identity. A JWT
/// whose provider's remote keys are missing (or lack its `kid`) may wait once for a fetch.
pub fn credentials(cfg: &Config, req: &Request, ex: &mut Exchange, env: &Env) -> Step {
    let Some(auth) = ex.policy(cfg).and_then(|p| p.auth.as_ref()) else {
        return Step::Next;
    };
    if auth.mode == "none" {
        return Step::Next;
    }
    let a = &cfg.auth;
    // Envoy folds repeated headers into one comma-joined value; a map with two entries is the
    // same ambiguity.
    if req.header_count("authorization") > 1 {
        return Step::Reply(reply(
            cfg,
            &AuthError::InvalidRequest("more than one authorization header"),
        ));
    }
    let creds = Credentials {
        authorization: req.header("authorization"),
        api_key: a.api_key_header().and_then(|h| req.header(h)),
        query: req.path.split_once('?').map(|(_, q)| q),
    };
    let remote = a.remote_keys(env.store, env.now_ms, ex.jwks_fetched);
    match a.authenticate(auth, &creds, &remote, env.now_ms, env.store) {
        Ok(id) => {
            ex.identity = id;
            Step::Next
        }
        Err(e) => {
            if let Some(provider) = e.wants_keys() {
                if !ex.jwks_fetched && a.should_fetch(provider, &e, env.store, env.now_ms) {
                    let waiter = !matches!(
                        e,
                        AuthError::InvalidToken {
                            error: super::JwtError::UnknownKid,
                            ..
                        }
                    );
                    return Step::Wait(Wait::Jwks { provider, waiter });
                }
            }
            Step::Reply(reply(cfg, &e))
        }
    }
}

/// Scopes: `scopes_all`, `scopes_any`, `roles_any` against the identity.
pub fn scopes(cfg: &Config, _req: &Request, ex: &mut Exchange, _env: &Env) -> Step {
    let Some(auth) = ex.policy(cfg).and_then(|p| p.auth.as_ref()) else {
        return Step::Next;
    };
    if auth.mode == "none" {
        return Step::Next;
    }
    match cfg.auth.authorize(auth, ex.identity.as_ref()) {
        Ok(()) => Step::Next,
        Err(e) => Step::Reply(reply(cfg, &e)),
    }
}
