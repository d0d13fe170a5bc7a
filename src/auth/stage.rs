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
    // The same ambiguity for the API key header (Envoy keeps repeats of non-inline headers
    // as separate entries): the filter would authenticate the first while the upstream may
    // read another, so refuse rather than pick one.
    if let Some(h) = a.api_key_header() {
        if auth.methods.iter().any(|m| m == "api_key") && req.header_count(h) > 1 {
            return Step::Reply(reply(
                cfg,
                &AuthError::InvalidRequest("more than one API key header"),
            ));
        }
    }
    let creds = Credentials {
        authorization: req.header("authorization"),
        api_key: a.api_key_header().and_then(|h| req.header(h)),
        query: req.path.split_once('?').map(|(_, q)| q),
    };
    let remote = a.remote_keys(env.store, env.now_ms, ex.jwks_fetched);
    let mut outcome = a.authenticate(auth, &creds, &remote, env.now_ms, env.store);
    if let Err(e) = &outcome {
        // This worker re-reads the shared set at most every CHECK_MS, so another worker may
        // have fetched a rotated key since: look now, before refusing or asking for a fetch
        // (the refetch is rate-limited across workers, so asking could be refused, and with
        // the IdP down it would fail, while the set in shared data already has the key).
        if let Some(provider) = e.wants_keys().filter(|_| !ex.jwks_fetched) {
            let before = a.remote_generation(provider);
            let fresh = a.remote_keys(env.store, env.now_ms, true);
            if a.remote_generation(provider) != before {
                outcome = a.authenticate(auth, &creds, &fresh, env.now_ms, env.store);
            }
        }
    }
    match outcome {
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

#[cfg(test)]
mod tests {
    use crate::pipeline::{on_request_headers, Env, Exchange, Request, Verdict};
    use crate::reply::ErrorCode;
    use crate::store::MemoryStore;
    use sha2::{Digest, Sha256};

    #[test]
    fn a_repeated_api_key_header_is_refused_not_guessed_at() {
        let doc = format!(
            r#"{{"api_keys":{{"keys":[{{"id":"a","sha256":"{}"}}]}},
                "routes":[{{"name":"k","match":{{"prefix":"/"}},
                            "auth":{{"mode":"required","methods":["api_key"]}}}}]}}"#,
            hex::encode(Sha256::digest(b"good"))
        );
        let cfg = crate::config::parse(doc.as_bytes(), &|_| None).unwrap().0;
        let store = MemoryStore::new();
        let env = Env {
            now_ms: 1_700_000_000_000,
            store: &store,
        };
        let go = |keys: &[&str]| {
            let headers: Vec<(String, String)> = keys
                .iter()
                .map(|k| ("x-api-key".to_string(), k.to_string()))
                .collect();
            let req = Request {
                method: "GET",
                path: "/x",
                headers: &headers,
                source_address: Some("10.0.0.1:1"),
                route_name: None,
            };
            on_request_headers(&cfg, &req, &mut Exchange::default(), &env)
        };
        assert!(matches!(go(&["good"]), Verdict::Forward(_)));
        for keys in [
            &["good", "other"][..],
            &["other", "good"],
            &["good", "good"],
        ] {
            match go(keys) {
                Verdict::Reply(r) => assert_eq!(r.code, ErrorCode::InvalidRequest, "{keys:?}"),
                v => panic!("{keys:?}: {v:?}"),
            }
        }
    }
}
