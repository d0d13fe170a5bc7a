//! Authentication and authorization (SPEC sections 2-3): which credential a route accepts,
//! verifying it, the identity it yields, and the scope/role checks after it.
//!
//! Two stages for the pipeline: [`Authenticator::authenticate`] (credentials -> identity) and
//! [`Authenticator::authorize`] (scopes and roles). Both are pure: the request facts, the time
//! and the shared store come in as arguments; errors map to the SPEC's status, error code and
//! `www-authenticate` header through [`AuthError`]'s methods.

pub mod api_key;
pub mod claims;
pub mod jwks;
pub mod jwt;
#[cfg(not(target_arch = "wasm32"))]
pub mod mint;
pub mod remote_jwks;
pub mod stage;
pub mod token_cache;
pub mod worker_cache;

use crate::config::{AuthConfig, ConfigError, RawConfig, RemoteJwksConfig};
use crate::identity::{AuthMethod, Identity, AUTHENTICATED_TIER};
use crate::store::SharedStore;
use api_key::ApiKeys;
use jwks::{Alg, AlgSet, KeySet, Source};
use jwt::{JwtError, Rules};
use std::fmt;
use token_cache::{CacheKey, TokenCache};
use worker_cache::{Expect, KeySetIds, Validity, Verified, WorkerTokenCache};

/// One `jwt_providers` entry, compiled.
#[derive(Debug, Clone)]
pub struct Provider {
    pub name: String,
    pub rules: Rules,
    /// `local_jwks`, parsed at config time.
    pub local: Option<KeySet>,
    /// `remote_jwks`: fetched by the glue, handed in through [`RemoteKeys`].
    pub remote: Option<RemoteJwksConfig>,
    /// Shared-data key prefix of the fetched set (see `remote_jwks`).
    pub remote_prefix: Option<String>,
    pub scope_claims: Vec<String>,
    pub roles_claim: Option<String>,
    pub tier_claim: Option<String>,
    /// (claim, upstream header) pairs.
    pub forward_claims: Vec<(String, String)>,
    pub keep_authorization: bool,
}

/// The key sets fetched from `remote_jwks`, by provider index. The glue keeps one per worker.
pub trait RemoteKeys {
    fn keys(&self, provider: usize) -> Option<&KeySet>;
}

/// For configs (and tests) without remote key sets.
pub struct NoRemoteKeys;

impl RemoteKeys for NoRemoteKeys {
    fn keys(&self, _provider: usize) -> Option<&KeySet> {
        None
    }
}

/// The credentials of a request, as the glue read them from the header map (read once).
#[derive(Debug, Clone, Copy, Default)]
pub struct Credentials<'a> {
    /// The `authorization` header (Envoy joins repeated headers with commas).
    pub authorization: Option<&'a str>,
    /// The configured API key header (`api_keys.header`).
    pub api_key: Option<&'a str>,
    /// The query string (after `?`), to refuse tokens sent in it.
    pub query: Option<&'a str>,
}

/// Why a request was refused. `status`, `code`, `message` and `www_authenticate` give the
/// local reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// 400: duplicate `authorization` headers, or a token in the query string.
    InvalidRequest(&'static str),
    /// 401: the route requires a credential and none was presented.
    MissingCredentials { bearer: bool },
    /// 401: a JWT failed verification. `provider` indexes [`Authenticator::providers`].
    InvalidToken { provider: usize, error: JwtError },
    /// 401: an API key that is not configured.
    InvalidApiKey,
    /// 403: scopes or roles do not satisfy the route.
    InsufficientScope {
        scope: Option<String>,
        message: String,
    },
}

impl AuthError {
    pub fn status(&self) -> u16 {
        match self {
            AuthError::InvalidRequest(_) => 400,
            AuthError::MissingCredentials { .. }
            | AuthError::InvalidToken { .. }
            | AuthError::InvalidApiKey => 401,
            AuthError::InsufficientScope { .. } => 403,
        }
    }

    /// The `error` field of the JSON body (SPEC section 3).
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::InvalidRequest(_) => "invalid_request",
            AuthError::MissingCredentials { .. } => "missing_credentials",
            AuthError::InvalidToken { .. } => "invalid_token",
            AuthError::InvalidApiKey => "invalid_api_key",
            AuthError::InsufficientScope { .. } => "insufficient_scope",
        }
    }

    /// The `message` field of the JSON body.
    pub fn message(&self) -> String {
        self.to_string()
    }

    /// The `www-authenticate` header value, when the SPEC gives one (RFC 6750 section 3).
    pub fn www_authenticate(&self) -> Option<String> {
        match self {
            AuthError::MissingCredentials { bearer: true } => Some("Bearer".into()),
            AuthError::InvalidToken { .. } => Some("Bearer error=\"invalid_token\"".into()),
            AuthError::InsufficientScope { scope: Some(s), .. } => Some(format!(
                "Bearer error=\"insufficient_scope\", scope=\"{s}\""
            )),
            AuthError::InsufficientScope { scope: None, .. } => {
                Some("Bearer error=\"insufficient_scope\"".into())
            }
            _ => None,
        }
    }

    /// The provider whose remote key set should be (re)fetched before giving up: its keys are
    /// not loaded yet, or the token names a `kid` the loaded set lacks (a rotation).
    pub fn wants_keys(&self) -> Option<usize> {
        match self {
            AuthError::InvalidToken {
                provider,
                error: JwtError::KeysUnavailable | JwtError::UnknownKid,
            } => Some(*provider),
            _ => None,
        }
    }
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::InvalidRequest(why) => f.write_str(why),
            AuthError::MissingCredentials { .. } => f.write_str("credentials are required"),
            AuthError::InvalidToken { error, .. } => write!(f, "{error}"),
            AuthError::InvalidApiKey => f.write_str("API key is not valid"),
            AuthError::InsufficientScope { message, .. } => f.write_str(message),
        }
    }
}

impl std::error::Error for AuthError {}

/// Everything authentication needs from the config.
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    /// Sorted by name (the config's map order); errors refer to them by index.
    pub providers: Vec<Provider>,
    pub api_keys: Option<ApiKeys>,
    pub cache: TokenCache,
    /// This worker's verified tokens, in front of `cache` (see `worker_cache`).
    pub worker_cache: WorkerTokenCache,
    /// Claim names some rate-limit key uses (`claim:<name>`): copied into the identity.
    pub limit_claims: Vec<String>,
    /// This worker's parsed copies of the remote key sets.
    pub remote: remote_jwks::RemoteCache,
}

enum Mode {
    None,
    Optional,
    Required,
}

fn mode(a: &AuthConfig) -> Mode {
    match a.mode.as_str() {
        "required" => Mode::Required,
        "optional" => Mode::Optional,
        // Validation allows only these three; anything else authenticates nothing.
        _ => Mode::None,
    }
}

/// `Bearer <token>`: the scheme is case-insensitive (RFC 7235), the token is the rest.
fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, rest) = authorization.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    Some(rest.trim_matches(' '))
}

/// Whether the query string carries `access_token` (RFC 6750 section 2.3), which leaks tokens
/// into logs and caches; refused rather than ignored so clients notice.
fn query_has_token(query: &str) -> bool {
    query.split('&').any(|pair| {
        let name = pair.split_once('=').map_or(pair, |(n, _)| n);
        name == "access_token" || name.eq_ignore_ascii_case("access%5Ftoken")
    })
}

impl Authenticator {
    /// Validates `jwt_providers` and `api_keys` and compiles them. The same code runs in the
    /// filter's `on_configure` and in `api-guard check`.
    pub fn compile(
        raw: &RawConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Authenticator, ConfigError> {
        let mut providers = Vec::with_capacity(raw.jwt_providers.len());
        for (name, p) in &raw.jwt_providers {
            let path = format!("jwt_providers.{name}");
            if name.is_empty() {
                return Err(ConfigError::new(
                    "jwt_providers",
                    "provider names must not be empty",
                ));
            }
            if p.algorithms.is_empty() {
                return Err(ConfigError::new(
                    format!("{path}.algorithms"),
                    "must list at least one algorithm",
                ));
            }
            let mut algorithms = AlgSet::EMPTY;
            for (i, a) in p.algorithms.iter().enumerate() {
                let ap = format!("{path}.algorithms[{i}]");
                if a.eq_ignore_ascii_case("none") {
                    return Err(ConfigError::new(ap, "\"none\" is never accepted"));
                }
                match Alg::parse(a) {
                    Some(alg) => algorithms.insert(alg),
                    None => {
                        return Err(ConfigError::new(
                            ap,
                            format!(
                                "'{a}' is not one of {} (names are case-sensitive)",
                                AlgSet::of(&Alg::ALL).names()
                            ),
                        ))
                    }
                }
            }
            if let Some(iss) = &p.issuer {
                if iss.is_empty() {
                    return Err(ConfigError::new(
                        format!("{path}.issuer"),
                        "must not be empty",
                    ));
                }
            }
            if p.local_jwks.is_none() && p.remote_jwks.is_none() {
                return Err(ConfigError::new(
                    path.as_str(),
                    "needs local_jwks or remote_jwks (where the verification keys come from)",
                ));
            }
            let local = match &p.local_jwks {
                None => None,
                Some(doc) => {
                    let parsed = jwks::parse(doc, algorithms, Source::Local(env)).map_err(|e| {
                        let sub = e.path();
                        let at = if sub.is_empty() {
                            format!("{path}.local_jwks")
                        } else {
                            format!("{path}.local_jwks.{sub}")
                        };
                        ConfigError::new(at, e.message)
                    })?;
                    if parsed.keys.is_empty() && p.remote_jwks.is_none() {
                        return Err(ConfigError::new(
                            format!("{path}.local_jwks.keys"),
                            "is empty and there is no remote_jwks: no token could ever verify",
                        ));
                    }
                    Some(parsed.keys)
                }
            };
            if let Some(r) = &p.remote_jwks {
                let rp = format!("{path}.remote_jwks");
                if r.cluster.is_empty() {
                    return Err(ConfigError::new(
                        format!("{rp}.cluster"),
                        "must not be empty",
                    ));
                }
                if !r.path.starts_with('/') {
                    return Err(ConfigError::new(
                        format!("{rp}.path"),
                        "must start with '/'",
                    ));
                }
                if r.refresh_s == 0 || r.refresh_s > 86_400 {
                    return Err(ConfigError::new(
                        format!("{rp}.refresh_s"),
                        "must be between 1 and 86400",
                    ));
                }
                if r.timeout_ms == 0 || r.timeout_ms > 60_000 {
                    return Err(ConfigError::new(
                        format!("{rp}.timeout_ms"),
                        "must be between 1 and 60000",
                    ));
                }
            }
            if p.clock_skew_s > 3600 {
                return Err(ConfigError::new(
                    format!("{path}.clock_skew_s"),
                    "must be at most 3600 (an hour of skew defeats exp)",
                ));
            }
            if !(256..=65_536).contains(&p.max_token_bytes) {
                return Err(ConfigError::new(
                    format!("{path}.max_token_bytes"),
                    "must be between 256 and 65536",
                ));
            }
            for (i, c) in p.scope_claims.iter().enumerate() {
                if c.is_empty() {
                    return Err(ConfigError::new(
                        format!("{path}.scope_claims[{i}]"),
                        "must not be empty",
                    ));
                }
            }
            providers.push(Provider {
                name: name.clone(),
                rules: Rules {
                    issuer: p.issuer.clone(),
                    audiences: p.audiences.clone(),
                    algorithms,
                    clock_skew_s: p.clock_skew_s,
                    require_exp: p.require_exp,
                    max_token_bytes: p.max_token_bytes,
                },
                local,
                remote: p.remote_jwks.clone(),
                remote_prefix: p.remote_jwks.as_ref().map(|r| {
                    remote_jwks::prefix(name, &r.cluster, r.authority.as_deref(), &r.path)
                }),
                scope_claims: p.scope_claims.clone(),
                roles_claim: p.roles_claim.clone(),
                tier_claim: p.tier_claim.clone(),
                forward_claims: p
                    .forward_claims
                    .iter()
                    .map(|(c, h)| (c.clone(), h.clone()))
                    .collect(),
                keep_authorization: p.keep_authorization,
            });
        }
        let api_keys = match &raw.api_keys {
            Some(a) => Some(ApiKeys::compile(a)?),
            None => None,
        };
        let mut limit_claims: Vec<String> = Vec::new();
        for l in raw.rate_limits.values() {
            for part in &l.key {
                if let Some(c) = part.strip_prefix("claim:") {
                    if !limit_claims.iter().any(|x| x == c) {
                        limit_claims.push(c.to_string());
                    }
                }
            }
        }
        Ok(Authenticator {
            providers,
            api_keys,
            cache: TokenCache::default(),
            worker_cache: WorkerTokenCache::default(),
            limit_claims,
            remote: remote_jwks::RemoteCache::default(),
        })
    }

    pub fn provider_index(&self, name: &str) -> Option<usize> {
        self.providers.iter().position(|p| p.name == name)
    }

    /// The header the glue should read API keys from, when API keys are configured.
    pub fn api_key_header(&self) -> Option<&str> {
        self.api_keys.as_ref().map(|k| k.header.as_str())
    }

    /// The credentials stage: `Ok(None)` for an anonymous request the route admits,
    /// `Ok(Some(identity))` for a verified credential, or the refusal.
    pub fn authenticate(
        &self,
        auth: &AuthConfig,
        creds: &Credentials<'_>,
        remote: &dyn RemoteKeys,
        now_ms: u64,
        store: &dyn SharedStore,
    ) -> Result<Option<Identity>, AuthError> {
        let required = match mode(auth) {
            Mode::None => return Ok(None),
            Mode::Optional => false,
            Mode::Required => true,
        };
        if creds.query.is_some_and(query_has_token) {
            return Err(AuthError::InvalidRequest(
                "tokens must not be sent in the query string; use the authorization header",
            ));
        }
        if creds.authorization.is_some_and(|a| a.contains(',')) {
            return Err(AuthError::InvalidRequest(
                "more than one authorization header",
            ));
        }
        let jwt_providers: Vec<usize> = auth
            .methods
            .iter()
            .filter_map(|m| m.strip_prefix("jwt:"))
            .filter_map(|name| self.provider_index(name))
            .collect();
        let bearer = creds.authorization.and_then(bearer_token);
        for m in &auth.methods {
            if m == "api_key" {
                if let (Some(keys), Some(presented)) = (&self.api_keys, creds.api_key) {
                    let key = keys
                        .lookup(presented.trim())
                        .ok_or(AuthError::InvalidApiKey)?;
                    return Ok(Some(Identity {
                        method: AuthMethod::ApiKey,
                        subject: key.id.clone(),
                        client: key.id.clone(),
                        tier: key
                            .tier
                            .clone()
                            .unwrap_or_else(|| AUTHENTICATED_TIER.into()),
                        scopes: key.scopes.clone(),
                        roles: Vec::new(),
                        forwarded: Vec::new(),
                        claims: Vec::new(),
                        strip_authorization: false,
                    }));
                }
            } else if m.starts_with("jwt:") {
                if let Some(token) = bearer {
                    return self
                        .verify_jwt(&jwt_providers, token, remote, now_ms / 1000, store)
                        .map(Some);
                }
            }
        }
        if required {
            Err(AuthError::MissingCredentials {
                bearer: !jwt_providers.is_empty(),
            })
        } else {
            Ok(None)
        }
    }

    /// The scopes stage. An anonymous request on a route with requirements is asked to
    /// authenticate (401) rather than told it lacks scopes.
    pub fn authorize(
        &self,
        auth: &AuthConfig,
        identity: Option<&Identity>,
    ) -> Result<(), AuthError> {
        let req = claims::Requirements {
            scopes_all: &auth.scopes_all,
            scopes_any: &auth.scopes_any,
            roles_any: &auth.roles_any,
        };
        let needs =
            !(req.scopes_all.is_empty() && req.scopes_any.is_empty() && req.roles_any.is_empty());
        match identity {
            None if needs => Err(AuthError::MissingCredentials {
                bearer: auth.methods.iter().any(|m| m.starts_with("jwt:")),
            }),
            None => Ok(()),
            Some(id) => claims::authorize(id, req).map_err(|e| AuthError::InsufficientScope {
                scope: e.scope,
                message: e.message,
            }),
        }
    }

    /// The provider a token is checked by among the route's: the first whose `issuer` equals
    /// the token's (unverified) `iss`, else the first listed.
    fn choose_provider(&self, candidates: &[usize], first: usize, iss: Option<&str>) -> usize {
        candidates
            .iter()
            .copied()
            .find(|i| {
                self.providers
                    .get(*i)
                    .and_then(|p| p.rules.issuer.as_deref())
                    .is_some_and(|want| iss == Some(want))
            })
            .unwrap_or(first)
    }

    /// The key sets a provider verifies with: its local set, then its fetched remote set.
    fn key_sets<'s>(&'s self, pi: usize, remote: &'s dyn RemoteKeys) -> Vec<&'s KeySet> {
        let mut sets: Vec<&KeySet> = Vec::with_capacity(2);
        if let Some(l) = self.providers.get(pi).and_then(|p| p.local.as_ref()) {
            sets.push(l);
        }
        if let Some(r) = remote.keys(pi) {
            sets.push(r);
        }
        sets
    }

    fn key_set_ids(sets: &[&KeySet]) -> Option<KeySetIds> {
        let mut fps: [&[u8; 16]; 2] = [&[0; 16]; 2];
        if sets.len() > fps.len() {
            return None;
        }
        for (slot, s) in fps.iter_mut().zip(sets) {
            *slot = s.fingerprint();
        }
        KeySetIds::new(&fps[..sets.len()])
    }

    /// [`Self::key_set_ids`] of [`Self::key_sets`] without building the list (per request).
    fn current_key_set_ids(&self, pi: usize, remote: &dyn RemoteKeys) -> Option<KeySetIds> {
        let local = self.providers.get(pi)?.local.as_ref();
        match (local, remote.keys(pi)) {
            (Some(l), Some(r)) => KeySetIds::new(&[l.fingerprint(), r.fingerprint()]),
            (Some(only), None) | (None, Some(only)) => KeySetIds::new(&[only.fingerprint()]),
            (None, None) => KeySetIds::new(&[]),
        }
    }

    /// Picks the provider for a token among the route's (see [`Self::choose_provider`]).
    /// A token this worker verified before answers from [`WorkerTokenCache`] when the same
    /// provider and key sets would check it now and its time window holds; otherwise cheap
    /// checks, key selection, the shared cache, then the signature.
    fn verify_jwt(
        &self,
        candidates: &[usize],
        token: &str,
        remote: &dyn RemoteKeys,
        now_s: u64,
        store: &dyn SharedStore,
    ) -> Result<Identity, AuthError> {
        let first = *candidates
            .first()
            .ok_or(AuthError::MissingCredentials { bearer: true })?;
        let cached = self.worker_cache.get(token, now_s, |probe| {
            let pi = self.choose_provider(candidates, first, probe.iss);
            let keys = self.current_key_set_ids(pi, remote)?;
            Some(Expect { provider: pi, keys })
        });
        if let Some(identity) = cached {
            return Ok(identity);
        }

        let fail =
            |provider: usize| move |error: JwtError| AuthError::InvalidToken { provider, error };
        let pi = if candidates.len() > 1 {
            let iss = jwt::peek_issuer(token);
            self.choose_provider(candidates, first, iss.as_deref())
        } else {
            first
        };
        let p = self
            .providers
            .get(pi)
            .ok_or(AuthError::MissingCredentials { bearer: true })?;
        let t = jwt::decode(token, &p.rules).map_err(fail(pi))?;
        jwt::check_claims(&t, &p.rules, now_s).map_err(fail(pi))?;

        // Everything the identity needs is read (and type-checked) before the signature, so a
        // badly typed claim costs no key work; nothing is returned unless the signature holds.
        let subject = t
            .sub
            .clone()
            .or_else(|| {
                t.claims
                    .get("client_id")
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
            })
            .filter(|s| !s.is_empty() && claims::is_header_safe(s))
            .ok_or(fail(pi)(JwtError::MissingSubject))?;
        let scopes = claims::scopes(&t.claims, &p.scope_claims).map_err(fail(pi))?;
        let roles = claims::roles(&t.claims, p.roles_claim.as_deref()).map_err(fail(pi))?;
        let tier = claims::tier(&t.claims, p.tier_claim.as_deref()).map_err(fail(pi))?;

        let sets = self.key_sets(pi, remote);
        if sets.is_empty() {
            return Err(fail(pi)(JwtError::KeysUnavailable));
        }
        jwt::check_key_exists(&t, &sets).map_err(|e| match e {
            // A rotation the glue has not seen yet looks like an unknown kid; with remote keys
            // not loaded at all, say so instead.
            JwtError::UnknownKid if p.remote.is_some() && remote.keys(pi).is_none() => {
                fail(pi)(JwtError::KeysUnavailable)
            }
            other => fail(pi)(other),
        })?;
        let fingerprints: Vec<&[u8; 16]> = sets.iter().map(|s| s.fingerprint()).collect();
        let key = CacheKey::new(&p.name, &fingerprints, token);
        let validity = Validity::of(t.exp, t.nbf, t.iat, p.rules.clock_skew_s, now_s);
        if !self.cache.contains(store, &key, now_s) {
            jwt::verify_signature(&t, &sets).map_err(fail(pi))?;
            self.cache.insert(store, &key, validity.until_s, now_s);
        }

        let identity = Identity {
            method: AuthMethod::Jwt(p.name.clone()),
            client: subject.clone(),
            subject,
            tier: tier.unwrap_or_else(|| AUTHENTICATED_TIER.into()),
            scopes,
            roles,
            forwarded: claims::forwarded(&t.claims, &p.forward_claims),
            claims: claims::named(&t.claims, &self.limit_claims),
            strip_authorization: !p.keep_authorization,
        };
        if let Some(keys) = Self::key_set_ids(&sets) {
            self.worker_cache.insert(
                token,
                Verified {
                    provider: pi,
                    keys,
                    iss: t.iss.as_deref(),
                    validity,
                    identity: &identity,
                },
                now_s,
            );
        }
        Ok(identity)
    }
}

#[cfg(test)]
mod tests;
