//! The decision as the pipeline sees it: config -> Authenticator, request facts -> identity or
//! the SPEC's status/code/header.

use super::*;
use crate::auth::mint::SigningKey;
use crate::config;
use crate::store::MemoryStore;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

const NOW_S: u64 = 1_700_000_000;
const NOW_MS: u64 = NOW_S * 1000;

fn no_env(_: &str) -> Option<String> {
    None
}

fn sha_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

struct Fixture {
    auth: Authenticator,
    es: SigningKey,
    hs: SigningKey,
}

fn fixture() -> Fixture {
    let es = SigningKey::generate("ES256", "es-1").unwrap();
    let hs = SigningKey::generate("HS256", "hs-1").unwrap();
    let cfg = json!({
        "api_keys": {"keys": [
            {"id": "acme-prod", "sha256": sha_hex("acme-key"), "tier": "pro", "scopes": ["read:orders"]},
            {"id": "plain", "sha256": sha_hex("plain-key")}
        ]},
        "jwt_providers": {
            "main": {
                "issuer": "https://auth.example.com",
                "audiences": ["https://api.example.com"],
                "algorithms": ["ES256"],
                "local_jwks": {"keys": [es.jwk()]},
                "roles_claim": "roles",
                "tier_claim": "plan",
                "forward_claims": {"tenant_id": "x-tenant-id"},
                "keep_authorization": false
            },
            "partner": {
                "issuer": "https://partner.example.com",
                "algorithms": ["HS256"],
                "local_jwks": {"keys": [hs.jwk()]}
            }
        },
        "rate_limits": {"per-tenant": {"key": ["claim:tenant_id"], "capacity": 1, "refill_tokens": 1, "refill_period_s": 1}}
    });
    let raw: config::RawConfig = serde_json::from_value(cfg).unwrap();
    Fixture {
        auth: Authenticator::compile(&raw, &no_env).unwrap(),
        es,
        hs,
    }
}

fn route(mode: &str, methods: &[&str]) -> AuthConfig {
    AuthConfig {
        mode: mode.into(),
        methods: methods.iter().map(|s| s.to_string()).collect(),
        scopes_all: vec![],
        scopes_any: vec![],
        roles_any: vec![],
    }
}

fn main_claims(extra: Value) -> Map<String, Value> {
    let mut m = json!({"iss": "https://auth.example.com", "aud": "https://api.example.com",
                       "sub": "user-1", "exp": NOW_S + 600, "scope": "read:orders profile",
                       "roles": ["admin"], "plan": "free", "tenant_id": "t-9"})
    .as_object()
    .cloned()
    .unwrap();
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        if v.is_null() {
            m.remove(&k);
        } else {
            m.insert(k, v);
        }
    }
    m
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

fn run(
    f: &Fixture,
    r: &AuthConfig,
    creds: Credentials<'_>,
    store: &MemoryStore,
) -> Result<Option<Identity>, AuthError> {
    f.auth.authenticate(r, &creds, &NoRemoteKeys, NOW_MS, store)
}

#[test]
fn jwt_identity_comes_from_verified_claims() {
    let f = fixture();
    let s = MemoryStore::new();
    let token = f.es.sign(&main_claims(json!({}))).unwrap();
    let h = bearer(&token);
    let id = run(
        &f,
        &route("required", &["jwt:main", "api_key"]),
        Credentials {
            authorization: Some(&h),
            ..Default::default()
        },
        &s,
    )
    .unwrap()
    .unwrap();
    assert_eq!(id.method, AuthMethod::Jwt("main".into()));
    assert_eq!(
        (id.subject.as_str(), id.client.as_str(), id.tier.as_str()),
        ("user-1", "user-1", "free")
    );
    assert_eq!(id.scopes, ["read:orders", "profile"]);
    assert_eq!(id.roles, ["admin"]);
    assert_eq!(
        id.forwarded,
        [("x-tenant-id".to_string(), "t-9".to_string())]
    );
    assert_eq!(id.claims, [("tenant_id".to_string(), "t-9".to_string())]);
    assert!(id.strip_authorization);
    // Without the tier claim: "authenticated".
    let token = f.es.sign(&main_claims(json!({"plan": null}))).unwrap();
    let h = bearer(&token);
    let id = run(
        &f,
        &route("required", &["jwt:main"]),
        Credentials {
            authorization: Some(&h),
            ..Default::default()
        },
        &s,
    )
    .unwrap()
    .unwrap();
    assert_eq!(id.tier, "authenticated");
}

#[test]
fn api_key_identity_and_failures() {
    let f = fixture();
    let s = MemoryStore::new();
    let r = route("required", &["jwt:main", "api_key"]);
    let id = run(
        &f,
        &r,
        Credentials {
            api_key: Some("acme-key"),
            ..Default::default()
        },
        &s,
    )
    .unwrap()
    .unwrap();
    assert_eq!((id.client.as_str(), id.tier.as_str()), ("acme-prod", "pro"));
    assert_eq!(id.scopes, ["read:orders"]);
    let id = run(
        &f,
        &r,
        Credentials {
            api_key: Some("plain-key"),
            ..Default::default()
        },
        &s,
    )
    .unwrap()
    .unwrap();
    assert_eq!(id.tier, "authenticated");
    let e = run(
        &f,
        &r,
        Credentials {
            api_key: Some("nope"),
            ..Default::default()
        },
        &s,
    )
    .unwrap_err();
    assert_eq!(
        (e.status(), e.code(), e.www_authenticate()),
        (401, "invalid_api_key", None)
    );
}

#[test]
fn modes_and_missing_credentials() {
    let f = fixture();
    let s = MemoryStore::new();
    let none = Credentials::default();
    assert_eq!(run(&f, &route("none", &[]), none, &s), Ok(None));
    assert_eq!(
        run(&f, &route("optional", &["jwt:main"]), none, &s),
        Ok(None)
    );
    let e = run(&f, &route("required", &["jwt:main"]), none, &s).unwrap_err();
    assert_eq!((e.status(), e.code()), (401, "missing_credentials"));
    assert_eq!(e.www_authenticate().as_deref(), Some("Bearer"));
    let e = run(&f, &route("required", &["api_key"]), none, &s).unwrap_err();
    assert_eq!(e.www_authenticate(), None);
    // A bad credential on an optional route is still 401.
    let e = run(
        &f,
        &route("optional", &["api_key"]),
        Credentials {
            api_key: Some("x"),
            ..none
        },
        &s,
    )
    .unwrap_err();
    assert_eq!(e.code(), "invalid_api_key");
    // Mode none never looks at credentials, even hostile ones.
    let c = Credentials {
        authorization: Some("Bearer a,Bearer b"),
        query: Some("access_token=x"),
        api_key: Some("x"),
    };
    assert_eq!(run(&f, &route("none", &[]), c, &s), Ok(None));
    // A non-Bearer authorization is not a JWT credential.
    let c = Credentials {
        authorization: Some("Basic dXNlcjpwYXNz"),
        ..none
    };
    assert_eq!(run(&f, &route("optional", &["jwt:main"]), c, &s), Ok(None));
}

#[test]
fn first_present_method_wins() {
    let f = fixture();
    let s = MemoryStore::new();
    let token = f.es.sign(&main_claims(json!({}))).unwrap();
    let h = bearer(&token);
    let both = Credentials {
        authorization: Some(&h),
        api_key: Some("acme-key"),
        query: None,
    };
    let id = run(&f, &route("required", &["api_key", "jwt:main"]), both, &s)
        .unwrap()
        .unwrap();
    assert_eq!(id.method, AuthMethod::ApiKey);
    let id = run(&f, &route("required", &["jwt:main", "api_key"]), both, &s)
        .unwrap()
        .unwrap();
    assert_eq!(id.method, AuthMethod::Jwt("main".into()));
}

#[test]
fn invalid_requests_are_400() {
    let f = fixture();
    let s = MemoryStore::new();
    let token = f.es.sign(&main_claims(json!({}))).unwrap();
    let r = route("required", &["jwt:main"]);
    let dup = format!("Bearer {token},Bearer {token}");
    for c in [
        Credentials {
            authorization: Some(&dup),
            ..Default::default()
        },
        Credentials {
            query: Some("a=1&access_token=abc"),
            ..Default::default()
        },
        Credentials {
            query: Some("access_token"),
            ..Default::default()
        },
        Credentials {
            query: Some("access%5ftoken=x"),
            ..Default::default()
        },
    ] {
        let e = run(&f, &r, c, &s).unwrap_err();
        assert_eq!((e.status(), e.code()), (400, "invalid_request"), "{c:?}");
    }
    // A similar name is not a token.
    let h = bearer(&token);
    let c = Credentials {
        authorization: Some(&h),
        query: Some("my_access_token=1&x=access_token"),
        ..Default::default()
    };
    assert!(run(&f, &r, c, &s).is_ok());
}

#[test]
fn invalid_tokens_are_401_with_bearer_error() {
    let f = fixture();
    let s = MemoryStore::new();
    let r = route("required", &["jwt:main"]);
    let other = SigningKey::generate("ES256", "es-1").unwrap();
    for (why, token) in [
        (
            "expired",
            f.es.sign(&main_claims(json!({"exp": NOW_S - 120})))
                .unwrap(),
        ),
        (
            "wrong aud",
            f.es.sign(&main_claims(json!({"aud": "https://other"})))
                .unwrap(),
        ),
        (
            "wrong iss",
            f.es.sign(&main_claims(json!({"iss": "https://evil"})))
                .unwrap(),
        ),
        (
            "no sub",
            f.es.sign(&main_claims(json!({"sub": null}))).unwrap(),
        ),
        (
            "bad scope type",
            f.es.sign(&main_claims(json!({"scope": 7}))).unwrap(),
        ),
        (
            "bad tier type",
            f.es.sign(&main_claims(json!({"plan": ["x"]}))).unwrap(),
        ),
        ("other key", other.sign(&main_claims(json!({}))).unwrap()),
        (
            "HS256 to an ES256-only provider",
            f.hs.sign(&main_claims(json!({}))).unwrap(),
        ),
        ("garbage", "not.a.jwt".to_string()),
        ("empty", String::new()),
    ] {
        let h = bearer(&token);
        let e = run(
            &f,
            &r,
            Credentials {
                authorization: Some(&h),
                ..Default::default()
            },
            &s,
        )
        .unwrap_err();
        assert_eq!((e.status(), e.code()), (401, "invalid_token"), "{why}: {e}");
        assert_eq!(
            e.www_authenticate().as_deref(),
            Some("Bearer error=\"invalid_token\""),
            "{why}"
        );
    }
}

#[test]
fn route_providers_are_chosen_by_issuer() {
    let f = fixture();
    let s = MemoryStore::new();
    let r = route("required", &["jwt:main", "jwt:partner"]);
    let partner =
        f.hs.sign(
            &json!({"iss": "https://partner.example.com", "sub": "p-1", "exp": NOW_S + 60})
                .as_object()
                .cloned()
                .unwrap(),
        )
        .unwrap();
    let h = bearer(&partner);
    let id = run(
        &f,
        &r,
        Credentials {
            authorization: Some(&h),
            ..Default::default()
        },
        &s,
    )
    .unwrap()
    .unwrap();
    assert_eq!(id.method, AuthMethod::Jwt("partner".into()));
    // The partner token is not good for a route that only takes "main".
    let e = run(
        &f,
        &route("required", &["jwt:main"]),
        Credentials {
            authorization: Some(&h),
            ..Default::default()
        },
        &s,
    )
    .unwrap_err();
    assert_eq!(e.code(), "invalid_token");
}

#[test]
fn verified_tokens_are_cached_by_whole_token_and_keys() {
    let f = fixture();
    let s = MemoryStore::new();
    let r = route("required", &["jwt:main"]);
    let token = f.es.sign(&main_claims(json!({}))).unwrap();
    let h = bearer(&token);
    let c = Credentials {
        authorization: Some(&h),
        ..Default::default()
    };
    assert!(run(&f, &r, c, &s).is_ok());
    assert_eq!(s.len(), 1, "one cache entry");
    assert!(run(&f, &r, c, &s).is_ok());
    assert_eq!(s.len(), 1);

    // The entry is what lets the second request skip the signature: a token whose entry is
    // present passes the signature stage (here a forged one, planted by hand).
    let p = &f.auth.providers[f.auth.provider_index("main").unwrap()];
    let forged = format!("{}.{}", token.rsplit_once('.').unwrap().0, "A".repeat(86));
    let fh = bearer(&forged);
    let fc = Credentials {
        authorization: Some(&fh),
        ..Default::default()
    };
    assert!(run(&f, &r, fc, &s).is_err());
    let fps = [p.local.as_ref().unwrap().fingerprint()];
    f.auth.cache.insert(
        &s,
        &CacheKey::new("main", &fps, &forged),
        NOW_S + 600,
        NOW_S,
    );
    assert!(run(&f, &r, fc, &s).is_ok());
    // ...but never skips the time checks.
    let later = f
        .auth
        .authenticate(&r, &c, &NoRemoteKeys, (NOW_S + 700) * 1000, &s)
        .unwrap_err();
    assert!(
        matches!(
            later,
            AuthError::InvalidToken {
                error: JwtError::Expired,
                ..
            }
        ),
        "{later:?}"
    );
}

#[test]
fn scopes_and_roles_are_403_naming_the_scope() {
    let f = fixture();
    let s = MemoryStore::new();
    let mut r = route("required", &["jwt:main", "api_key"]);
    r.scopes_all = vec!["read:orders".into()];
    let id = run(
        &f,
        &r,
        Credentials {
            api_key: Some("acme-key"),
            ..Default::default()
        },
        &s,
    )
    .unwrap();
    assert_eq!(f.auth.authorize(&r, id.as_ref()), Ok(()));
    let id = run(
        &f,
        &r,
        Credentials {
            api_key: Some("plain-key"),
            ..Default::default()
        },
        &s,
    )
    .unwrap();
    let e = f.auth.authorize(&r, id.as_ref()).unwrap_err();
    assert_eq!((e.status(), e.code()), (403, "insufficient_scope"));
    assert_eq!(
        e.www_authenticate().as_deref(),
        Some("Bearer error=\"insufficient_scope\", scope=\"read:orders\"")
    );
    assert!(e.message().contains("read:orders"));
    r.scopes_all.clear();
    r.roles_any = vec!["admin".into()];
    let token = f.es.sign(&main_claims(json!({}))).unwrap();
    let h = bearer(&token);
    let id = run(
        &f,
        &r,
        Credentials {
            authorization: Some(&h),
            ..Default::default()
        },
        &s,
    )
    .unwrap();
    assert_eq!(f.auth.authorize(&r, id.as_ref()), Ok(()));
    let token = f.es.sign(&main_claims(json!({"roles": ["user"]}))).unwrap();
    let h = bearer(&token);
    let id = run(
        &f,
        &r,
        Credentials {
            authorization: Some(&h),
            ..Default::default()
        },
        &s,
    )
    .unwrap();
    assert_eq!(
        f.auth.authorize(&r, id.as_ref()).unwrap_err().code(),
        "insufficient_scope"
    );
    // Anonymous on an optional route with requirements: asked to authenticate.
    r.mode = "optional".into();
    assert_eq!(
        f.auth.authorize(&r, None).unwrap_err().code(),
        "missing_credentials"
    );
}

struct Remote(Option<KeySet>);
impl RemoteKeys for Remote {
    fn keys(&self, _: usize) -> Option<&KeySet> {
        self.0.as_ref()
    }
}

#[test]
fn remote_keys_and_refetch_signals() {
    let es = SigningKey::generate("ES256", "r-1").unwrap();
    let raw: config::RawConfig = serde_json::from_value(json!({"jwt_providers": {"idp": {
        "algorithms": ["ES256"],
        "remote_jwks": {"cluster": "idp", "path": "/jwks.json"}}}}))
    .unwrap();
    let auth = Authenticator::compile(&raw, &no_env).unwrap();
    let s = MemoryStore::new();
    let r = route("required", &["jwt:idp"]);
    let token = es
        .sign(
            &json!({"sub": "u", "exp": NOW_S + 60})
                .as_object()
                .cloned()
                .unwrap(),
        )
        .unwrap();
    let h = bearer(&token);
    let c = Credentials {
        authorization: Some(&h),
        ..Default::default()
    };
    // Not fetched yet: the error asks for keys.
    let e = auth
        .authenticate(&r, &c, &Remote(None), NOW_MS, &s)
        .unwrap_err();
    assert_eq!(e.wants_keys(), Some(0));
    assert_eq!(e.code(), "invalid_token");
    // Fetched: verifies.
    let set = jwks::parse(
        &json!({"keys": [es.jwk()]}),
        AlgSet::of(&[Alg::ES256]),
        Source::Remote,
    )
    .unwrap()
    .keys;
    assert!(auth
        .authenticate(&r, &c, &Remote(Some(set.clone())), NOW_MS, &s)
        .is_ok());
    // A rotated key (new kid): unknown kid, which asks for a refetch.
    let next = SigningKey::generate("ES256", "r-2").unwrap();
    let t2 = next
        .sign(
            &json!({"sub": "u", "exp": NOW_S + 60})
                .as_object()
                .cloned()
                .unwrap(),
        )
        .unwrap();
    let h2 = bearer(&t2);
    let e = auth
        .authenticate(
            &r,
            &Credentials {
                authorization: Some(&h2),
                ..Default::default()
            },
            &Remote(Some(set)),
            NOW_MS,
            &s,
        )
        .unwrap_err();
    assert_eq!(e.wants_keys(), Some(0));
    // A bad signature does not.
    let forged = format!("{}.{}", token.rsplit_once('.').unwrap().0, "A".repeat(86));
    let fh = bearer(&forged);
    let set = jwks::parse(
        &json!({"keys": [es.jwk()]}),
        AlgSet::of(&[Alg::ES256]),
        Source::Remote,
    )
    .unwrap()
    .keys;
    let e = auth
        .authenticate(
            &r,
            &Credentials {
                authorization: Some(&fh),
                ..Default::default()
            },
            &Remote(Some(set)),
            NOW_MS,
            &s,
        )
        .unwrap_err();
    assert_eq!(e.wants_keys(), None);
}

/// Shared data that counts reads, to see which requests reach the shared cache.
struct CountingStore {
    inner: MemoryStore,
    gets: std::cell::Cell<usize>,
}

impl CountingStore {
    fn new() -> Self {
        CountingStore {
            inner: MemoryStore::new(),
            gets: std::cell::Cell::new(0),
        }
    }
}

impl SharedStore for CountingStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.gets.set(self.gets.get() + 1);
        self.inner.get(key)
    }
    fn set(
        &self,
        key: &str,
        value: &[u8],
        cas: Option<u32>,
    ) -> Result<(), crate::store::StoreError> {
        self.inner.set(key, value, cas)
    }
}

#[test]
fn a_repeated_token_is_answered_by_the_worker_cache_with_the_same_identity() {
    let f = fixture();
    let s = CountingStore::new();
    let r = route("required", &["jwt:main"]);
    let token = f.es.sign(&main_claims(json!({}))).unwrap();
    let h = bearer(&token);
    let c = Credentials {
        authorization: Some(&h),
        ..Default::default()
    };
    let first = f
        .auth
        .authenticate(&r, &c, &NoRemoteKeys, NOW_MS, &s)
        .unwrap();
    assert_eq!(s.gets.get(), 1, "a miss reads the shared cache");
    let second = f
        .auth
        .authenticate(&r, &c, &NoRemoteKeys, NOW_MS, &s)
        .unwrap();
    assert_eq!(second, first);
    assert_eq!(s.gets.get(), 1, "a hit reads no shared data");
    assert_eq!(f.auth.worker_cache.len(), 1);

    // exp + skew (default 60) is honoured to the second, cached or not.
    let at = |s_: u64| f.auth.authenticate(&r, &c, &NoRemoteKeys, s_ * 1000, &s);
    assert_eq!(at(NOW_S + 659).unwrap(), first);
    let e = at(NOW_S + 660).unwrap_err();
    assert!(
        matches!(
            e,
            AuthError::InvalidToken {
                error: JwtError::Expired,
                ..
            }
        ),
        "{e:?}"
    );
    // A token not yet valid when first seen is not cached as valid, and is refused.
    let early =
        f.es.sign(&main_claims(json!({"nbf": NOW_S + 120})))
            .unwrap();
    let eh = bearer(&early);
    let ec = Credentials {
        authorization: Some(&eh),
        ..Default::default()
    };
    for _ in 0..2 {
        let e = f
            .auth
            .authenticate(&r, &ec, &NoRemoteKeys, NOW_MS, &s)
            .unwrap_err();
        assert!(
            matches!(
                e,
                AuthError::InvalidToken {
                    error: JwtError::NotYetValid,
                    ..
                }
            ),
            "{e:?}"
        );
    }
    // Once valid it verifies, and then a clock step back before nbf - skew refuses it again.
    assert!(f
        .auth
        .authenticate(&r, &ec, &NoRemoteKeys, (NOW_S + 60) * 1000, &s)
        .is_ok());
    assert!(f
        .auth
        .authenticate(&r, &ec, &NoRemoteKeys, (NOW_S + 59) * 1000, &s)
        .is_err());
}

#[test]
fn the_worker_cache_never_lends_an_identity_to_another_provider_or_token() {
    let f = fixture();
    let s = MemoryStore::new();
    let token = f.es.sign(&main_claims(json!({}))).unwrap();
    let h = bearer(&token);
    let c = Credentials {
        authorization: Some(&h),
        ..Default::default()
    };
    let main = route("required", &["jwt:main"]);
    let id = run(&f, &main, c, &s).unwrap().unwrap();
    // A route listing both providers picks "main" by issuer, as the full path does.
    let both = route("required", &["jwt:partner", "jwt:main"]);
    assert_eq!(run(&f, &both, c, &s).unwrap().unwrap(), id);
    // A route that only takes "partner" checks the token as partner's: refused.
    let e = run(&f, &route("required", &["jwt:partner"]), c, &s).unwrap_err();
    assert!(
        matches!(e, AuthError::InvalidToken { provider, .. } if f.auth.providers[provider].name == "partner"),
        "{e:?}"
    );
    // A token differing only in its signature is a different token: verified, and refused.
    let (head, sig) = token.rsplit_once('.').unwrap();
    let mut altered: Vec<u8> = sig.bytes().collect();
    altered[5] = if altered[5] == b'A' { b'B' } else { b'A' };
    let forged = format!("{head}.{}", String::from_utf8(altered).unwrap());
    let fh = bearer(&forged);
    let e = run(
        &f,
        &main,
        Credentials {
            authorization: Some(&fh),
            ..Default::default()
        },
        &s,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            AuthError::InvalidToken {
                error: JwtError::BadSignature,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn a_rotated_remote_key_set_invalidates_worker_cache_entries() {
    let es = SigningKey::generate("ES256", "r-1").unwrap();
    let other = SigningKey::generate("ES256", "r-1").unwrap();
    let raw: config::RawConfig = serde_json::from_value(json!({"jwt_providers": {"idp": {
        "algorithms": ["ES256"],
        "remote_jwks": {"cluster": "idp", "path": "/jwks.json"}}}}))
    .unwrap();
    let auth = Authenticator::compile(&raw, &no_env).unwrap();
    let s = MemoryStore::new();
    let r = route("required", &["jwt:idp"]);
    let token = es
        .sign(
            &json!({"sub": "u", "exp": NOW_S + 60})
                .as_object()
                .cloned()
                .unwrap(),
        )
        .unwrap();
    let h = bearer(&token);
    let c = Credentials {
        authorization: Some(&h),
        ..Default::default()
    };
    let set_of = |k: &SigningKey| {
        jwks::parse(
            &json!({"keys": [k.jwk()]}),
            AlgSet::of(&[Alg::ES256]),
            Source::Remote,
        )
        .unwrap()
        .keys
    };
    assert!(auth
        .authenticate(&r, &c, &Remote(Some(set_of(&es))), NOW_MS, &s)
        .is_ok());
    assert_eq!(auth.worker_cache.len(), 1);
    // The IdP replaced the key under the same kid: the token no longer verifies.
    let e = auth
        .authenticate(&r, &c, &Remote(Some(set_of(&other))), NOW_MS, &s)
        .unwrap_err();
    assert!(
        matches!(
            e,
            AuthError::InvalidToken {
                error: JwtError::BadSignature,
                ..
            }
        ),
        "{e:?}"
    );
    // And with no keys loaded at all, nothing is admitted from the cache either.
    assert!(auth
        .authenticate(&r, &c, &Remote(None), NOW_MS, &s)
        .is_err());
}

fn compile_err(cfg: Value) -> config::ConfigError {
    let raw: config::RawConfig = serde_json::from_value(cfg).unwrap();
    Authenticator::compile(&raw, &no_env).unwrap_err()
}

#[test]
fn config_errors_name_the_json_path() {
    let k = json!({"kty": "oct", "k": "c2hvcnQ"});
    let e = compile_err(
        json!({"jwt_providers": {"m": {"algorithms": ["HS256"], "local_jwks": {"keys": [k]}}}}),
    );
    assert_eq!(e.path, "jwt_providers.m.local_jwks.keys[0]");
    assert!(e.message.contains("at least 32"), "{e}");
    let e = compile_err(
        json!({"jwt_providers": {"m": {"algorithms": ["none"], "local_jwks": {"keys": []}}}}),
    );
    assert_eq!(e.path, "jwt_providers.m.algorithms[0]");
    let e = compile_err(
        json!({"jwt_providers": {"m": {"algorithms": ["rs256"], "local_jwks": {"keys": []}}}}),
    );
    assert!(e.message.contains("case-sensitive"), "{e}");
    let e = compile_err(json!({"jwt_providers": {"m": {"algorithms": ["RS256"]}}}));
    assert_eq!(e.path, "jwt_providers.m");
    let e = compile_err(
        json!({"jwt_providers": {"m": {"algorithms": ["RS256"], "local_jwks": {"keys": []}}}}),
    );
    assert_eq!(e.path, "jwt_providers.m.local_jwks.keys");
    let e = compile_err(
        json!({"jwt_providers": {"m": {"algorithms": ["RS256"], "remote_jwks": {"cluster": "c", "path": "jwks"}}}}),
    );
    assert_eq!(e.path, "jwt_providers.m.remote_jwks.path");
    let e = compile_err(
        json!({"jwt_providers": {"m": {"algorithms": ["RS256"], "max_token_bytes": 10, "remote_jwks": {"cluster": "c", "path": "/j"}}}}),
    );
    assert_eq!(e.path, "jwt_providers.m.max_token_bytes");
    let e = compile_err(json!({"api_keys": {"keys": [{"id": "a", "sha256": "zz"}]}}));
    assert_eq!(e.path, "api_keys.keys[0].sha256");
}

#[test]
fn config_parse_runs_auth_validation() {
    // `config::parse` (what the filter and `api-guard check` call) includes these checks.
    let doc = json!({"jwt_providers": {"m": {"algorithms": ["HS256"], "local_jwks": {"keys": [{"kty": "oct", "k": "c2hvcnQ"}]}}}});
    let e = config::parse(doc.to_string().as_bytes(), &no_env).unwrap_err();
    assert_eq!(e.path, "jwt_providers.m.local_jwks.keys[0]");
}

/// Verification cost per algorithm, natively: cold (decode, claims, signature) and the cached
/// path (the whole `authenticate` with a cache hit). Prints figures; run with
/// `cargo test --release --lib auth::tests::measure -- --ignored --nocapture`.
#[test]
#[ignore]
fn measure_verify_cost() {
    use std::time::Instant;
    let rsa = {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/vectors/wycheproof/json_web_signature_test.subset.json"
        );
        let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        v["testGroups"][2]["private"].clone()
    };
    let keys = [
        SigningKey::generate("HS256", "k").unwrap(),
        SigningKey::rsa_from_jwk("RS256", &rsa, "k").unwrap(),
        SigningKey::rsa_from_jwk("PS256", &rsa, "k").unwrap(),
        SigningKey::generate("ES256", "k").unwrap(),
        SigningKey::generate("ES384", "k").unwrap(),
        SigningKey::generate("EdDSA", "k").unwrap(),
    ];
    for key in &keys {
        let jwk = key.jwk();
        let alg = jwk["alg"].as_str().unwrap_or("?").to_string();
        let raw: config::RawConfig = serde_json::from_value(json!({"jwt_providers": {"p": {
            "issuer": "https://auth.example.com", "audiences": ["https://api.example.com"],
            "algorithms": [alg], "local_jwks": {"keys": [jwk]}}}}))
        .unwrap();
        let a = Authenticator::compile(&raw, &no_env).unwrap();
        let token = key.sign(&main_claims(json!({}))).unwrap();
        let p = &a.providers[0];
        let n = 200;
        let t0 = Instant::now();
        for _ in 0..n {
            jwt::verify(&token, &p.rules, p.local.as_ref().unwrap(), NOW_S).unwrap();
        }
        let cold = t0.elapsed().as_secs_f64() * 1e6 / n as f64;
        let s = MemoryStore::new();
        let h = bearer(&token);
        let c = Credentials {
            authorization: Some(&h),
            ..Default::default()
        };
        let r = route("required", &["jwt:p"]);
        a.authenticate(&r, &c, &NoRemoteKeys, NOW_MS, &s).unwrap();
        let t0 = Instant::now();
        for _ in 0..n * 10 {
            a.authenticate(&r, &c, &NoRemoteKeys, NOW_MS, &s).unwrap();
        }
        let cached = t0.elapsed().as_secs_f64() * 1e6 / (n * 10) as f64;
        println!("{alg}: cold verify {cold:.1} us, cached authenticate {cached:.1} us");
    }
}

/// Issue 14, item 4: a key that one worker fetched is the set every worker uses from then
/// on, even inside the other worker's re-read interval and with the IdP gone.
#[test]
fn a_rotated_key_fetched_by_one_worker_is_seen_by_the_other_at_once() {
    use crate::pipeline::{on_request_headers, run, Env, Exchange, Request, Verdict, Wait};
    let k1 = SigningKey::generate("ES256", "k-1").unwrap();
    let k2 = SigningKey::generate("ES256", "k-2").unwrap();
    let doc = json!({
        "jwt_providers": {"idp": {"algorithms": ["ES256"],
            "remote_jwks": {"cluster": "idp", "path": "/jwks.json", "refresh_s": 600}}},
        "default_route": {"auth": {"mode": "required", "methods": ["jwt:idp"]}}
    })
    .to_string();
    // Two workers: two parsed configs (each with its own per-worker caches), one store.
    let a = config::parse(doc.as_bytes(), &no_env).unwrap().0;
    let b = config::parse(doc.as_bytes(), &no_env).unwrap().0;
    let store = MemoryStore::new();
    remote_jwks::prepare(&a.auth, &store);
    let prefix = a.auth.providers[0].remote_prefix.clone().unwrap();
    let set = |keys: &[&SigningKey]| {
        json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()}).to_string()
    };
    let algs = AlgSet::of(&[Alg::ES256]);
    remote_jwks::store_result(&store, &prefix, algs, Some(set(&[&k1]).as_bytes()), NOW_MS).unwrap();
    let token = |k: &SigningKey| {
        let claims = json!({"sub": "u", "exp": NOW_S + 600});
        bearer(&k.sign(claims.as_object().unwrap()).unwrap())
    };
    let send = |cfg: &config::Config, auth: &str, now_ms: u64, ex: &mut Exchange| {
        let headers = vec![("authorization".to_string(), auth.to_string())];
        let req = Request {
            method: "GET",
            path: "/x",
            headers: &headers,
            source_address: Some("10.0.0.1:1"),
            route_name: None,
        };
        let env = Env {
            now_ms,
            store: &store,
        };
        if ex.jwks_fetched {
            run(cfg, &req, ex, &env)
        } else {
            on_request_headers(cfg, &req, ex, &env)
        }
    };
    // Worker B serves k-1: it now holds generation 1, checked just now.
    let v = send(&b, &token(&k1), NOW_MS, &mut Exchange::default());
    assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
    // The IdP rotates in k-2; worker A sees a k-2 token, fetches (it wins the refetch).
    let mut ex = Exchange::default();
    let v = send(&a, &token(&k2), NOW_MS + 100, &mut ex);
    assert!(matches!(v, Verdict::Wait(Wait::Jwks { .. })), "{v:?}");
    remote_jwks::store_result(
        &store,
        &prefix,
        algs,
        Some(set(&[&k1, &k2]).as_bytes()),
        NOW_MS + 150,
    )
    .unwrap();
    ex.jwks_fetched = true;
    let v = send(&a, &token(&k2), NOW_MS + 150, &mut ex);
    assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
    // The IdP is gone now. Worker B, inside its re-read interval, gets a k-2 token: it must
    // use the set A fetched, not refuse (the refetch is rate-limited and would fail anyway).
    let v = send(&b, &token(&k2), NOW_MS + 200, &mut Exchange::default());
    assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
    // An unknown kid still asks nothing more of shared data than one re-read.
    let k3 = SigningKey::generate("ES256", "k-3").unwrap();
    let v = send(&b, &token(&k3), NOW_MS + 300, &mut Exchange::default());
    assert!(matches!(v, Verdict::Reply(_)), "{v:?}");
}
