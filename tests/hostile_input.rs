//! Hostile input through the whole request path, natively (no Envoy): generated requests —
//! garbled paths, header maps with repeated/missing/huge/odd values, tokens with mutated
//! segments, webhook deliveries, bodies in random chunkings — driven through
//! `pipeline::on_request_headers` / `run` / `on_request_body` exactly as `filter/http.rs`
//! drives them, against a `MemoryStore` and a realistic config (the demo's shape plus JWT
//! providers with local and remote JWKS, a webhook route of each scheme, tiered limits).
//! And mutated configs through `config::parse`.
//!
//! What must hold, whatever the input: no panic (a panic aborts the wasm VM); every local
//! reply is a row of the SPEC's error table with its JSON body and headers; nothing that
//! should be refused is forwarded (a required route never forwards without a credential this
//! test itself signed, a webhook never forwards a delivery it did not sign for exactly that
//! body, nor the same delivery twice); every header the filter would set is header-safe.
//!
//! Deterministic: a fixed seed and fixed case counts, so CI sees the same cases every run.
//! Each case is a tape of numbers the generators read choices from, so proptest shrinks a
//! failure toward the simplest choices (0 = the plain, valid option).

use api_guard::auth::mint::SigningKey;
use api_guard::config::{self, Config, ConfigError};
use api_guard::headers::{self, DenyLog};
use api_guard::identity::{AuthMethod, Identity};
use api_guard::pipeline::{self, BodyVerdict, Env, Exchange, Matched, Request, Verdict, Wait};
use api_guard::quota_client::{parse_answer, Answer as QuotaAnswer, Breaker, Permit, QuotaOutcome};
use api_guard::reply::{ErrorCode, LocalReply};
use api_guard::store::MemoryStore;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, RngAlgorithm, TestCaseError, TestRng};
use proptest::test_runner::{TestError, TestRunner};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::time::Instant;

/// Fixed seed: the same cases on every run and every machine.
const SEED: [u8; 32] = *b"api-guard hostile input, seed 1.";
const REQUEST_CASES: u32 = 900;
const CONFIG_CASES: u32 = 500;

const T0_MS: u64 = 1_700_000_000_000;
const ISS: &str = "https://auth.example.com";
const AUD: &str = "https://api.example.com";
const PARTNER_ISS: &str = "https://partner.example.com";
const IDP_ISS: &str = "https://idp.example.com";
const HS_MAIN: [u8; 32] = [0x11; 32];
const HS_PARTNER: [u8; 32] = [0x22; 32];
const HS_IDP: [u8; 32] = [0x33; 32];
const HS_WRONG: [u8; 32] = [0x44; 32];
const STD_KEY: [u8; 32] = [0x55; 32];
const GITHUB_SECRETS: [&str; 2] = ["gh-secret-1", "gh-secret-2"];
const STRIPE_SECRET: &str = "whsec_stripe-secret";
const SLACK_SECRET: &str = "slack-signing-secret";
const API_KEYS: [(&str, &str); 3] = [
    ("demo-pro-key", "demo-pro"),
    ("demo-free-key", "demo-free"),
    ("ops-key", "ops"),
];
const IDENTITY_HEADERS: [&str; 5] = [
    "x-auth-subject",
    "x-auth-client",
    "x-auth-tier",
    "x-auth-scopes",
    "x-tenant-id",
];

// ---------------------------------------------------------------------------------------
// Choices read from a tape of numbers (shrinks toward 0 = the simplest option).

struct Tape<'a> {
    data: &'a [u32],
    pos: usize,
}

impl Tape<'_> {
    fn next(&mut self) -> u32 {
        let v = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        v
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            self.next() as usize % n
        }
    }
    fn pick<'b, T>(&mut self, xs: &'b [T]) -> &'b T {
        &xs[self.below(xs.len())]
    }
    /// True with about `percent` % probability; a 0 on the tape is false.
    fn chance(&mut self, percent: u32) -> bool {
        let v = self.next() % 100;
        v != 0 && v <= percent
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn tapes(len: usize) -> impl Strategy<Value = Vec<u32>> {
    vec(any::<u32>(), 0..len)
}

fn runner(cases: u32) -> TestRunner {
    let cfg = RunnerConfig {
        cases,
        failure_persistence: None,
        // Shrinking is bounded too, so a failure reports in reasonable time.
        max_shrink_iters: 2_000,
        ..RunnerConfig::default()
    };
    TestRunner::new_with_rng(cfg, TestRng::from_seed(RngAlgorithm::ChaCha, &SEED))
}

fn report<T: std::fmt::Debug>(r: Result<(), TestError<T>>) {
    if let Err(e) = r {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------------------
// Signing helpers (the test is its own, independent signer).

fn hmac256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn b64u(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

fn sha_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

// ---------------------------------------------------------------------------------------
// The world: one config, its keys, and what the test signed.

struct World {
    doc: Value,
    cfg: Config,
    es: SigningKey,
    ed: ed25519_compact::KeyPair,
    flavor: Flavor,
}

/// The worlds the requests run in: the base config, and the same with a `cors` section and
/// the quota callout on some routes (two ways: credentials + exact origins + `failure_mode`
/// deny; any origin without credentials + `failure_mode` allow). `quota.mode` `check`: the
/// model checks each callout and answer (lease mode: `quota_lease`, driver unit tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavor {
    Plain,
    CorsCreds,
    CorsAny,
}

const FLAVORS: [Flavor; 3] = [Flavor::Plain, Flavor::CorsCreds, Flavor::CorsAny];
/// Routes that ask the quota service in the CORS flavors (and `default_route`).
const QUOTA_ROUTES: [&str; 4] = ["public", "orders-read", "orders-write", "open"];
const CREDS_EXPOSE: &str = "ratelimit, ratelimit-policy, retry-after, x-request-id";

/// What the CORS section of a flavor allows: (methods, headers, credentials, expose value).
fn cors_rules(
    f: Flavor,
) -> Option<(
    &'static [&'static str],
    &'static [&'static str],
    bool,
    &'static str,
)> {
    match f {
        Flavor::Plain => None,
        Flavor::CorsCreds => Some((
            &["GET", "POST", "PUT", "DELETE"],
            &["authorization", "content-type", "x-api-key"],
            true,
            CREDS_EXPOSE,
        )),
        // The defaults: GET, HEAD, POST; nothing exposed.
        Flavor::CorsAny => Some((&["GET", "HEAD", "POST"], &["content-type"], false, "")),
    }
}

fn add_flavor(doc: &mut Value, flavor: Flavor) {
    let (cors, quota) = match flavor {
        Flavor::Plain => return,
        Flavor::CorsCreds => (
            json!({
                "allow_origins": ["https://app.example.com", "http://localhost:3000",
                                  "http://[::1]:8080"],
                "allow_origin_patterns": ["https://*.example.com"],
                "allow_methods": ["GET", "POST", "PUT", "DELETE"],
                "allow_headers": ["authorization", "content-type", "x-api-key"],
                "expose_headers": ["ratelimit", "ratelimit-policy", "retry-after", "x-request-id"],
                "allow_credentials": true, "max_age_s": 86400
            }),
            json!({"cluster": "quota", "authority": "quota.internal", "timeout_ms": 100,
                   "failure_mode": "deny", "mode": "check",
                   "breaker": {"failures": 2, "open_ms": 5000}}),
        ),
        Flavor::CorsAny => (
            json!({"allow_origins": ["*"], "allow_headers": ["content-type"]}),
            json!({"cluster": "quota", "timeout_ms": 50, "failure_mode": "allow",
                   "mode": "check", "breaker": {"failures": 3, "open_ms": 2000}}),
        ),
    };
    doc["cors"] = cors;
    doc["quota"] = quota;
    if let Some(routes) = doc["routes"].as_array_mut() {
        for r in routes {
            if r["name"]
                .as_str()
                .is_some_and(|n| QUOTA_ROUTES.contains(&n))
            {
                r["quota"] = true.into();
            }
        }
    }
    doc["default_route"]["quota"] = true.into();
}

fn world_doc(es: &SigningKey, ed: &ed25519_compact::KeyPair) -> Value {
    let bucket =
        |c: u64, r: u64, p: u64| json!({"capacity": c, "refill_tokens": r, "refill_period_s": p});
    json!({
        "client_ip": {"xff_trusted_hops": 1, "use_remote_address": true},
        "api_keys": {"header": "x-api-key", "keys": [
            {"id": "demo-pro", "sha256": sha_hex(API_KEYS[0].0), "tier": "pro",
             "scopes": ["read:orders", "write:orders"]},
            {"id": "demo-free", "sha256": sha_hex(API_KEYS[1].0), "tier": "free",
             "scopes": ["read:orders"]},
            {"id": "ops", "sha256": sha_hex(API_KEYS[2].0), "tier": "internal", "scopes": ["admin"]}
        ]},
        "jwt_providers": {
            "main": {
                "issuer": ISS, "audiences": [AUD], "algorithms": ["HS256", "ES256"],
                "local_jwks": {"keys": [
                    {"kty": "oct", "kid": "hs-main", "alg": "HS256", "k": b64u(&HS_MAIN)},
                    es.jwk()
                ]},
                "clock_skew_s": 30, "roles_claim": "roles", "tier_claim": "plan",
                "forward_claims": {"tenant_id": "x-tenant-id"}, "keep_authorization": false
            },
            "partner": {
                "issuer": PARTNER_ISS, "algorithms": ["HS256"], "require_exp": false,
                "max_token_bytes": 1024,
                "local_jwks": {"keys": [{"kty": "oct", "k": b64u(&HS_PARTNER)}]}
            },
            "idp": {
                "issuer": IDP_ISS, "algorithms": ["HS256"],
                "remote_jwks": {"cluster": "idp", "path": "/jwks.json", "refresh_s": 60,
                                "timeout_ms": 500}
            }
        },
        "rate_limit_table": {"slots": 64},
        "rate_limits": {
            "login-per-ip": {"key": ["ip"], "capacity": 5, "refill_tokens": 5, "refill_period_s": 60},
            "per-client": {"key": ["client"], "tiers": {
                "anonymous": bucket(15, 10, 60), "free": bucket(100, 60, 60),
                "pro": bucket(500, 300, 60), "internal": "unlimited",
                "default": bucket(100, 60, 60)}},
            "by-user": {"key": ["header:x-user", "route"], "capacity": 3, "refill_tokens": 1,
                        "refill_period_s": 10},
            "per-tenant": {"key": ["claim:tenant_id"], "capacity": 50, "refill_tokens": 50,
                           "refill_period_s": 60, "shadow": true},
            "hooks": {"key": ["ip"], "capacity": 1000, "refill_tokens": 1000, "refill_period_s": 1}
        },
        "security_headers": {"content-security-policy": "default-src 'none'"},
        "webhooks": {
            "github": {"scheme": "github", "secrets": GITHUB_SECRETS, "max_body_bytes": 2048,
                       "replay_capacity": 64},
            "stripe": {"scheme": "stripe", "secrets": [STRIPE_SECRET], "max_body_bytes": 2048,
                       "replay_capacity": 64},
            "standard": {"scheme": "standard", "max_body_bytes": 2048, "replay_capacity": 64,
                         "secrets": [format!("whsec_{}", STANDARD.encode(STD_KEY)),
                                     format!("whpk_{}", STANDARD.encode(*ed.pk))]},
            "slack": {"scheme": "slack", "secrets": [SLACK_SECRET], "max_body_bytes": 2048,
                      "replay_capacity": 64}
        },
        "routes": [
            {"name": "health", "match": {"methods": ["GET"], "path": "/healthz"},
             "auth": {"mode": "none"}, "backend_ceiling": {"max_rps": 1}},
            {"name": "login", "match": {"methods": ["POST"], "path": "/auth/login"},
             "auth": {"mode": "none"}, "rate_limits": ["login-per-ip"]},
            {"name": "public", "match": {"prefix": "/public"}, "auth": {"mode": "none"},
             "rate_limits": ["per-client", "by-user"]},
            {"name": "orders-read", "match": {"methods": ["GET"], "prefix": "/api/orders"},
             "auth": {"mode": "required", "methods": ["jwt:main", "api_key"],
                      "scopes_all": ["read:orders"]},
             "rate_limits": ["per-client", "per-tenant"]},
            {"name": "orders-write",
             "match": {"methods": ["POST", "PUT", "DELETE"], "template": "/api/orders/{id}"},
             "auth": {"mode": "required", "methods": ["api_key", "jwt:main"],
                      "scopes_any": ["write:orders", "admin"]},
             "rate_limits": ["per-client"], "cost": 2},
            {"name": "admin", "match": {"prefix": "/admin"},
             "auth": {"mode": "required", "methods": ["jwt:main"], "roles_any": ["admin"]}},
            {"name": "partner", "match": {"prefix": "/partner"},
             "auth": {"mode": "required", "methods": ["jwt:partner", "jwt:main"]},
             "rate_limits": ["by-user"]},
            {"name": "remote", "match": {"prefix": "/remote"},
             "auth": {"mode": "required", "methods": ["jwt:idp"]}},
            {"name": "open", "match": {"prefix": "/open"},
             "auth": {"mode": "optional", "methods": ["jwt:main", "api_key"]},
             "rate_limits": ["per-client"],
             "max_body_bytes": 64, "content_types": ["application/json", "text/*"],
             "backend_ceiling": {"max_rps": 1, "max_in_flight": 2}},
            {"name": "schema", "match": {"prefix": "/schema"}, "auth": {"mode": "none"},
             "max_body_bytes": 128,
             "json_schema": {"type": "object", "required": ["id"],
                             "properties": {"id": {"type": "integer"}}}},
            {"name": "legacy", "match": {"route_name": "legacy"},
             "auth": {"mode": "required", "methods": ["api_key"]}},
            {"name": "gh", "match": {"methods": ["POST"], "path": "/webhooks/github"},
             "auth": {"mode": "none"}, "webhook": "github", "rate_limits": ["hooks"],
             "max_body_bytes": 150},
            {"name": "stripe", "match": {"methods": ["POST"], "path": "/webhooks/stripe"},
             "webhook": "stripe"},
            {"name": "std", "match": {"methods": ["POST"], "path": "/webhooks/standard"},
             "webhook": "standard"},
            {"name": "slack", "match": {"methods": ["POST"], "path": "/webhooks/slack"},
             "webhook": "slack"}
        ],
        "default_route": {"auth": {"mode": "required", "methods": ["api_key"]},
                          "rate_limits": ["per-client"]}
    })
}

fn world(flavor: Flavor) -> World {
    // A fixed P-256 key (Wycheproof's JWS test key), so every run sees the same config.
    let es = SigningKey::from_private_jwk(&json!({
        "kty": "EC", "crv": "P-256", "alg": "ES256", "kid": "es-main",
        "x": "04N0xi21hshyvBp7I167sbE_bXqyqkAPfefdklMO7wY",
        "y": "UI8exy-C06a7DUnjIdENkxeFtHM4-l_41LqEw9nVgmw",
        "d": "yy49oPcINGK2ps0LmtxpB6UTEOiITghHBif6wDqmJ3c"
    }))
    .expect("ES256 key");
    let ed = ed25519_compact::KeyPair::from_seed(ed25519_compact::Seed::new([9; 32]));
    let mut doc = world_doc(&es, &ed);
    add_flavor(&mut doc, flavor);
    let bytes = serde_json::to_vec(&doc).expect("serializable");
    let (cfg, _warnings) =
        config::parse(&bytes, &|_| None).unwrap_or_else(|e| panic!("the test config: {e}"));
    World {
        doc,
        cfg,
        es,
        ed,
        flavor,
    }
}

fn fresh_store(cfg: &Config) -> MemoryStore {
    let store = MemoryStore::new();
    cfg.rate_limiter.prepare(&store).expect("rate-limit tables");
    cfg.webhooks.prepare(&store);
    api_guard::auth::remote_jwks::prepare(&cfg.auth, &store);
    api_guard::hygiene::prepare(cfg, &store);
    store
}

/// (webhook route, the scheme's signed headers, sorted, body).
type Delivery = (String, Vec<(String, String)>, Vec<u8>);

/// A token the test signed with its provider's real key.
struct TokenFacts {
    provider: &'static str,
    /// The protected header is one the SPEC accepts (right `alg`, known or no `kid`, no
    /// `crit`/`b64`, a JSON object).
    header_ok: bool,
    /// The payload, when it is JSON.
    claims: Option<Value>,
}

/// What the test signed with the real keys, so the oracles know what may be admitted.
#[derive(Default)]
struct Signed {
    /// Token -> (provider, `sub` claim if it is a string).
    tokens: HashMap<String, TokenFacts>,
    /// (webhook route, the scheme's header values in request order, body).
    deliveries: HashSet<Delivery>,
}

// ---------------------------------------------------------------------------------------
// Generators.

const WEIRD_STRINGS: &[&str] = &[
    "",
    " ",
    "null",
    "\u{0}",
    "\u{7f}",
    "\t",
    "é",
    "\u{feff}",
    "\u{202e}",
    "%00",
    "\"",
    "\\",
    ",",
    ";",
    "=",
    "a,b",
    "\u{fffd}\u{fffd}",
    "\u{1}\u{2}\u{1f}",
    "x\r\ny: z",
];

fn weird_string(t: &mut Tape) -> String {
    match t.below(6) {
        0 => t.pick(WEIRD_STRINGS).to_string(),
        1 => "A".repeat(t.pick(&[1, 100, 5_000, 70_000]).to_owned()),
        2 => String::from_utf8_lossy(&t.bytes(64)).into_owned(),
        3 => (0..t.below(40))
            .map(|_| char::from_u32(t.next() % 0x11_0000).unwrap_or('\u{fffd}'))
            .collect(),
        4 => format!("{}", t.next() as i64 - (1 << 31)),
        _ => t.pick(WEIRD_STRINGS).repeat(t.below(500) + 1),
    }
}

const SEGMENTS: &[&str] = &[
    "api", "orders", "7", "webhooks", "github", "stripe", "standard", "slack", "public", "auth",
    "login", "healthz", "admin", "partner", "remote", "open", ".", "..", "%2e%2e", "%2E", "",
    "%2F", "%2f", "%5C", "%5c", "\\", "%", "%zz", "%4", "%6Frders", "%41", "é", "\u{1}", "\u{7f}",
    "a;b", "%00", "%FF", "%C3%A9", "{id}", "*", "~", "%7E", ".%2e", "%2e.",
];

const ROUTE_PATHS: &[&str] = &[
    "/api/orders",
    "/api/orders/7",
    "/webhooks/github",
    "/webhooks/stripe",
    "/webhooks/standard",
    "/webhooks/slack",
    "/public/x",
    "/auth/login",
    "/healthz",
    "/admin",
    "/partner/p",
    "/remote/r",
    "/remote/r2",
    "/partner/p2",
    "/open/o",
    "/schema/s",
    "/",
    "/unmatched",
];

const QUERIES: &[&str] = &[
    "?x=1",
    "?access_token=abc",
    "?a=1&access_token",
    "?ACCESS%5FTOKEN=1",
    "?access%5ftoken=1",
    "#frag",
    "?..%2f..",
    "?",
    "?%zz",
    "?x=1?y=2#z",
];

fn path(t: &mut Tape) -> String {
    if t.chance(3) {
        return match t.below(4) {
            0 => "/a".repeat(50_000),
            1 => "/..".repeat(10_000),
            2 => format!("/{}", "%41".repeat(30_000)),
            _ => format!("/api/orders/{}", "x/".repeat(20_000)),
        };
    }
    let mut p = if t.chance(90) || t.next().is_multiple_of(2) {
        t.pick(ROUTE_PATHS).to_string()
    } else {
        t.pick(&["", "api", "*", "http://x/y", "//", "?q"])
            .to_string()
    };
    if t.chance(30) {
        for _ in 0..=t.below(5) {
            p.push_str(if t.chance(20) { "//" } else { "/" });
            p.push_str(t.pick::<&str>(SEGMENTS));
        }
    }
    if t.chance(8) {
        p.push_str(&weird_string(t));
    }
    if t.chance(25) {
        p.push_str(t.pick::<&str>(QUERIES));
    }
    p
}

fn method(t: &mut Tape, p: &str) -> String {
    let natural = if p.starts_with("/webhooks") || p.starts_with("/auth") {
        "POST"
    } else {
        "GET"
    };
    if !t.chance(30) {
        return natural.to_string();
    }
    t.pick(&[
        "GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH", "CONNECT", "get", "post", "",
        "G\u{0}ET", "GET ", "ПОСТ",
    ])
    .to_string()
}

/// `(token, valid)`: `valid` when the signature is the provider's real key over exactly the
/// transmitted header and payload (the claims may still be wrong).
fn token(t: &mut Tape, w: &World, path: &str, now_s: u64, signed: &mut Signed) -> String {
    // Mostly the provider the path's route accepts, sometimes another one.
    let natural = if path.starts_with("/remote") {
        "idp"
    } else if path.starts_with("/partner") {
        "partner"
    } else {
        "main"
    };
    let provider: &'static str = if t.chance(20) {
        t.pick::<&str>(&["main", "partner", "idp"])
    } else {
        natural
    };
    // A few valid ES256 tokens (cold ES256 verification is slow in a debug build).
    if provider == "main" && t.chance(3) {
        let mut c = Map::new();
        c.insert("iss".into(), ISS.into());
        c.insert("aud".into(), AUD.into());
        c.insert("sub".into(), "es-user".into());
        c.insert("exp".into(), (now_s + 600).into());
        c.insert("scope".into(), "read:orders".into());
        let tok = w.es.sign(&c).expect("ES256 signs");
        signed.tokens.insert(
            tok.clone(),
            TokenFacts {
                provider: "main",
                header_ok: true,
                claims: Some(Value::Object(c)),
            },
        );
        return tok;
    }
    let (iss, kid, key) = match provider {
        "main" => (ISS, Some("hs-main"), &HS_MAIN),
        "partner" => (PARTNER_ISS, None, &HS_PARTNER),
        _ => (IDP_ISS, Some("r1"), &HS_IDP),
    };
    let mut header = json!({"alg": "HS256", "typ": "JWT"});
    if let Some(k) = kid {
        header["kid"] = k.into();
    }
    let sub = t.pick(&["user-1", "user-2", "svc"]).to_string();
    let mut claims = json!({
        "iss": iss, "aud": AUD, "sub": sub, "exp": now_s + 600, "iat": now_s.saturating_sub(10),
        "scope": "read:orders write:orders", "roles": ["admin"], "plan": "pro", "tenant_id": "t-1"
    });
    let mut raw_header: Option<Vec<u8>> = None;
    // Header changes the SPEC tolerates (ignored members, no kid) keep it acceptable.
    let mut header_ok = true;
    let mut raw_payload: Option<Vec<u8>> = None;
    if t.chance(25) {
        let m = t.below(16);
        // jku/jwk are ignored, and without a kid every key of the alg is tried. A key that
        // has no kid (the partner's) is tried for any kid too (`jwks::select`, as Envoy's
        // jwt_verify_lib), so an unknown kid is refused only by providers whose keys have one.
        header_ok = matches!(m, 9 | 10 | 13) || (m == 6 && kid.is_none());
        match m {
            0 => header["alg"] = "none".into(),
            1 => header["alg"] = "NoNe".into(),
            2 => header["alg"] = "HS512".into(),
            3 => header["alg"] = "RS256".into(),
            4 => {
                if let Some(h) = header.as_object_mut() {
                    h.remove("alg");
                }
            }
            5 => header["alg"] = 5.into(),
            6 => header["kid"] = "unknown-kid".into(),
            7 => header["kid"] = 7.into(),
            8 => header["crit"] = json!(["exp"]),
            9 => header["jku"] = "https://evil.example/jwks".into(),
            10 => header["jwk"] = json!({"kty": "oct", "k": b64u(&HS_WRONG)}),
            11 => header["b64"] = false.into(),
            12 => header["alg"] = "ES256".into(),
            13 => {
                if let Some(h) = header.as_object_mut() {
                    h.remove("kid");
                }
            }
            _ => {
                raw_header = Some(
                    t.pick(&[
                        &b"[]"[..],
                        b"\"x\"",
                        b"1",
                        b"null",
                        b"{",
                        b"{\"alg\":\"HS256\",\"alg\":\"none\"}",
                        b"\xff\xfe{}",
                    ])
                    .to_vec(),
                )
            }
        }
    }
    if t.chance(25) {
        // Hostile values in claims the filter copies into headers, rate-limit keys and the
        // identity, on an otherwise valid token.
        let name = *t.pick(&["sub", "tenant_id", "plan", "scope", "roles"]);
        let v = weird_string(t);
        claims[name] = if name == "roles" && t.chance(50) {
            json!([v])
        } else {
            json!(v)
        };
    }
    if t.chance(25) {
        // Time claims around the skew boundaries (30 s for main, 60 s for the others).
        let name = *t.pick(&["exp", "nbf", "iat"]);
        let skew = *t.pick(&[0i64, 29, 30, 31, 59, 60, 61, 3600]);
        let v = if t.chance(50) {
            now_s as i64 + skew
        } else {
            now_s as i64 - skew
        };
        claims[name] = json!(v);
    }
    for _ in 0..3 {
        if !t.chance(12) {
            continue;
        }
        let c = claims.as_object_mut().expect("object");
        let huge_nest = |depth: usize| -> Value {
            let text = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
            serde_json::from_str(&text).unwrap_or(Value::Null)
        };
        match t.below(24) {
            0 => {
                c.remove("exp");
            }
            1 => {
                c.insert("exp".into(), json!(now_s.saturating_sub(3600)));
            }
            2 => {
                c.insert("exp".into(), json!(1e300));
            }
            3 => {
                c.insert("exp".into(), json!(u64::MAX));
            }
            4 => {
                c.insert("exp".into(), json!(-1));
            }
            5 => {
                c.insert("exp".into(), json!("soon"));
            }
            6 => {
                c.insert("exp".into(), json!(now_s as f64 + 0.5));
            }
            7 => {
                c.insert("nbf".into(), json!(now_s + 3600));
            }
            8 => {
                c.insert("iat".into(), json!(now_s + 3600));
            }
            9 => {
                c.insert("iss".into(), json!(t.pick(&[ISS, PARTNER_ISS, "evil"])));
            }
            10 => {
                c.insert("aud".into(), json!([AUD, 1]));
            }
            11 => {
                c.insert("aud".into(), json!(["other", AUD]));
            }
            12 => {
                c.insert("aud".into(), json!("other"));
            }
            13 => {
                c.remove("sub");
            }
            14 => {
                c.insert("sub".into(), json!(weird_string(t)));
            }
            15 => {
                c.insert("sub".into(), json!(5));
            }
            16 => {
                let v = match t.below(5) {
                    0 => json!(5),
                    1 => json!(["read:orders", 1]),
                    2 => json!("admin"),
                    3 => json!((0..300)
                        .map(|i| format!("s{i}"))
                        .collect::<Vec<_>>()
                        .join(" ")),
                    _ => json!("read:orders\nx"),
                };
                c.insert("scope".into(), v);
            }
            17 => {
                c.insert(
                    "roles".into(),
                    json!(t.pick(&[json!("admin"), json!({}), json!(["a b"])])),
                );
            }
            18 => {
                c.insert(
                    "plan".into(),
                    t.pick(&[
                        json!("free"),
                        json!("internal"),
                        json!("has space"),
                        json!(7),
                        json!(""),
                    ])
                    .clone(),
                );
            }
            19 => {
                c.insert("tenant_id".into(), huge_nest(100));
            }
            20 => {
                c.insert("tenant_id".into(), json!(weird_string(t)));
            }
            21 => {
                c.insert(
                    "tenant_id".into(),
                    json!({"nested": {"deep": [1, 2, {"x": null}]}}),
                );
            }
            22 => {
                c.insert("pad".into(), json!("p".repeat(70_000)));
            }
            _ => {
                raw_payload = Some(
                    t.pick(&[
                        &b"[]"[..],
                        b"null",
                        b"1",
                        b"\"str\"",
                        b"\xff\xfe",
                        b"{\"sub\":\"a\",\"sub\":\"admin\"}",
                        b"{\"exp\":18446744073709551616,\"sub\":\"x\"}",
                        b"{\"exp\":1e400}",
                    ])
                    .to_vec(),
                );
                if t.chance(30) {
                    // Beyond serde_json's recursion limit.
                    raw_payload =
                        Some(format!("{}{}", "[".repeat(300), "]".repeat(300)).into_bytes());
                }
            }
        }
    }
    header_ok &= raw_header.is_none();
    let hb = raw_header.unwrap_or_else(|| serde_json::to_vec(&header).expect("json"));
    let pb = raw_payload.unwrap_or_else(|| serde_json::to_vec(&claims).expect("json"));
    let signing_input = format!("{}.{}", b64u(&hb), b64u(&pb));
    let good_sig = b64u(&hmac256(key, &[signing_input.as_bytes()]));
    let (sig, valid) = if t.chance(75) || t.next().is_multiple_of(3) {
        (good_sig, true)
    } else {
        let s = match t.below(10) {
            0 => b64u(&hmac256(&HS_WRONG, &[signing_input.as_bytes()])),
            1 => String::new(),
            2 => good_sig[..good_sig.len() - 1].to_string(),
            3 => format!("{good_sig}A"),
            4 => format!("{good_sig}="),
            5 => good_sig.replace('-', "+").replace('_', "/") + "+",
            6 => {
                // Flip the unused low bits of the last character (non-canonical encoding).
                let mut s = good_sig.clone();
                let last = s.pop().unwrap_or('A');
                let idx = URL_ALPHABET.find(last).unwrap_or(0);
                s.push(URL_ALPHABET.as_bytes()[(idx ^ 1) % 64] as char);
                s
            }
            7 => {
                let mut s = good_sig.clone().into_bytes();
                let i = t.below(s.len());
                s[i] = if s[i] == b'A' { b'B' } else { b'A' };
                String::from_utf8(s).unwrap_or_default()
            }
            // Another provider's real key (key confusion across providers).
            8 => {
                let other = if provider == "partner" {
                    &HS_MAIN
                } else {
                    &HS_PARTNER
                };
                b64u(&hmac256(other, &[signing_input.as_bytes()]))
            }
            _ => weird_string(t),
        };
        (s, false)
    };
    let mut tok = format!("{signing_input}.{sig}");
    let mut valid = valid && tok.split('.').count() == 3;
    if t.chance(10) {
        let m = t.below(8);
        // A leading space is the same token once `Bearer` and its spaces are read.
        valid &= m == 6;
        tok = match m {
            0 => format!("{tok}."),
            1 => signing_input.clone(),
            2 => format!("{tok}.extra"),
            3 => tok.to_lowercase(),
            4 => format!("{tok},{tok}"),
            5 => tok.replacen('.', "..", 1),
            6 => format!(" {tok}"),
            _ => weird_string(t),
        };
    }
    if valid {
        let claims = serde_json::from_slice::<Value>(&pb).ok();
        signed.tokens.insert(
            tok.trim_start_matches(' ').to_string(),
            TokenFacts {
                provider,
                header_ok,
                claims,
            },
        );
    }
    tok
}

const URL_ALPHABET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn authorization(t: &mut Tape, w: &World, path: &str, now_s: u64, signed: &mut Signed) -> String {
    let tok = token(t, w, path, now_s, signed);
    match t.below(14) {
        0..=6 => format!("Bearer {tok}"),
        7 => format!("bearer {tok}"),
        8 => format!("BEARER  {tok}  "),
        9 => "Bearer".to_string(),
        10 => "Basic dXNlcjpwYXNz".to_string(),
        11 => tok,
        12 => format!("Bearer {tok},Bearer {tok}"),
        _ => weird_string(t),
    }
}

fn api_key_value(t: &mut Tape) -> String {
    match t.below(10) {
        0..=3 => t.pick(&API_KEYS).0.to_string(),
        4 => format!("  {}\t", t.pick(&API_KEYS).0),
        5 => format!("{}x", t.pick(&API_KEYS).0),
        6 => format!("{}\u{0}", t.pick(&API_KEYS).0),
        7 => "k".repeat(5_000),
        _ => weird_string(t),
    }
}

fn xff(t: &mut Tape) -> String {
    match t.below(9) {
        0 => "203.0.113.7".into(),
        1 => "6.6.6.6, 203.0.113.7, 10.0.0.1".into(),
        2 => "not-an-ip, 10.0.0.1".into(),
        3 => ",,,,".into(),
        4 => "1.1.1.1,".repeat(2_000),
        5 => "::1, 2001:db8::1".into(),
        6 => "[::1]:80, 999.1.1.1".into(),
        7 => String::new(),
        _ => weird_string(t),
    }
}

/// A webhook delivery for `route` (one of the webhook routes): headers and body, recorded as
/// signed when its signature is the real one over exactly that body.
fn webhook_delivery(
    t: &mut Tape,
    w: &World,
    route: &str,
    now_s: u64,
    signed: &mut Signed,
) -> (Vec<(String, String)>, Vec<u8>) {
    let body: Vec<u8> = match t.below(5) {
        0 => br#"{"event":"ping","id":1}"#.to_vec(),
        1 => Vec::new(),
        2 => t.bytes(300),
        3 => vec![b'x'; t.pick(&[2048usize, 2049, 3000]).to_owned()],
        _ => format!("{{\"n\":{}}}", t.next()).into_bytes(),
    };
    let ts_num = match t.below(8) {
        0..=4 => now_s.saturating_sub(t.below(200) as u64),
        5 => now_s + 299 + t.below(3) as u64,
        6 => now_s.saturating_sub(301),
        _ => u64::MAX / (1 + t.below(3) as u64),
    };
    let mut ts = ts_num.to_string();
    let mut valid = true;
    if t.chance(8) {
        ts = t
            .pick(&[
                "",
                "12a",
                "-5",
                "99999999999999999999",
                "1e9",
                " 1700000000",
                "+1",
            ])
            .to_string();
    }
    let mut sig_ok = !t.chance(20);
    let mut headers: Vec<(String, String)> = Vec::new();
    match route {
        "gh" => {
            let secret = *t.pick(&GITHUB_SECRETS);
            let key = if sig_ok {
                secret.as_bytes()
            } else {
                b"wrong".as_slice()
            };
            let mut h = format!("sha256={}", hex::encode(hmac256(key, &[&body])));
            match t.below(10) {
                0 => h = h.to_uppercase(),
                1 => {
                    h = h.replace("sha256=", "sha1=");
                    sig_ok = false;
                }
                2 => {
                    h.pop();
                    sig_ok = false;
                }
                3 => h = format!("sha256={}", h["sha256=".len()..].to_uppercase()),
                _ => {}
            }
            if h.starts_with("SHA256=") {
                sig_ok = false;
            }
            headers.push(("x-hub-signature-256".into(), h));
            if t.chance(60) {
                headers.push(("x-github-delivery".into(), format!("d-{}", t.next())));
            }
        }
        "stripe" => {
            let key = if sig_ok {
                STRIPE_SECRET.as_bytes()
            } else {
                b"whsec_wrong".as_slice()
            };
            let mac = hex::encode(hmac256(key, &[ts.as_bytes(), b".", &body]));
            let mut h = format!("t={ts},v1={mac}");
            match t.below(8) {
                0 => h.push_str(",v1=00ff,v0=abc"),
                1 => h = format!("v1={mac},t={ts}"),
                2 => {
                    h = format!("t={ts},t={ts},v1={mac}");
                    sig_ok = false;
                }
                3 => {
                    h.push_str(&",v1=0".repeat(20));
                    sig_ok = false;
                }
                4 => {
                    h = format!("t={ts}");
                    sig_ok = false;
                }
                _ => {}
            }
            headers.push(("stripe-signature".into(), h));
        }
        "std" => {
            let id = match t.below(6) {
                0 => "msg with space".to_string(),
                1 => "m".repeat(300),
                _ => format!("msg_{}", t.next()),
            };
            let msg = [id.as_bytes(), b".", ts.as_bytes(), b".", &body].concat();
            let key = if sig_ok { &STD_KEY } else { &HS_WRONG };
            let v1 = format!("v1,{}", STANDARD.encode(hmac256(key, &[&msg])));
            let signed_msg: &[u8] = if sig_ok { &msg } else { b"something else" };
            let v1a = format!("v1a,{}", STANDARD.encode(*w.ed.sk.sign(signed_msg, None)));
            let sig = match t.below(7) {
                0 => v1a,
                1 => format!("{v1} {v1a}"),
                2 => format!("v2,abc {v1}"),
                3 => {
                    sig_ok = false;
                    format!("v1,{}", STANDARD.encode([0u8; 31]))
                }
                4 => {
                    sig_ok = false;
                    "v1,x ".repeat(20)
                }
                _ => v1,
            };
            if id.contains(' ') || id.len() > 256 {
                sig_ok = false;
            }
            headers.push(("webhook-id".into(), id));
            headers.push(("webhook-timestamp".into(), ts.clone()));
            headers.push(("webhook-signature".into(), sig));
        }
        _ => {
            let key = if sig_ok {
                SLACK_SECRET.as_bytes()
            } else {
                b"wrong".as_slice()
            };
            let mac = hex::encode(hmac256(key, &[b"v0:", ts.as_bytes(), b":", &body]));
            headers.push(("x-slack-request-timestamp".into(), ts.clone()));
            headers.push(("x-slack-signature".into(), format!("v0={mac}")));
        }
    }
    if t.chance(8) {
        // A signature header sent twice must be refused, never guessed at.
        if let Some(h) = headers.first().cloned() {
            headers.push(h);
        }
    }
    if t.chance(8) {
        headers.retain(|_| t.next().is_multiple_of(2));
    }
    valid &= sig_ok;
    if valid {
        signed.deliveries.insert((
            route.to_string(),
            signed_part(route, &headers),
            body.clone(),
        ));
    }
    (headers, body)
}

/// The headers a scheme signs (GitHub's delivery id is not signed, so it is not part of
/// what identifies a signed delivery here).
fn signed_headers(route: &str) -> &'static [&'static str] {
    match route {
        "gh" => &["x-hub-signature-256"],
        "stripe" => &["stripe-signature"],
        "std" => &["webhook-id", "webhook-timestamp", "webhook-signature"],
        "slack" => &["x-slack-request-timestamp", "x-slack-signature"],
        _ => &[],
    }
}

fn signed_part(route: &str, headers: &[(String, String)]) -> Vec<(String, String)> {
    let names = signed_headers(route);
    let mut h: Vec<(String, String)> = headers
        .iter()
        .filter(|(k, _)| names.contains(&k.as_str()))
        .cloned()
        .collect();
    h.sort();
    h
}

const WEBHOOK_HEADERS: &[&str] = &[
    "x-hub-signature-256",
    "x-github-delivery",
    "stripe-signature",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "x-slack-request-timestamp",
    "x-slack-signature",
];

/// One generated request, as the glue would have read it.
#[derive(Clone, Debug)]
struct Req {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    source: Option<String>,
    route_name: Option<String>,
    /// The body as it arrives, chunk by chunk (the last chunk ends the stream).
    chunks: Vec<Vec<u8>>,
    now_ms: u64,
}

/// A body for the `schema` route (`{"id": <integer>}` required): valid, invalid, not JSON,
/// duplicate keys, over its 128-byte limit.
fn schema_body(t: &mut Tape) -> Vec<u8> {
    let fixed: &[&str] = &[
        r#"{"id": 1}"#,
        r#" {"id":-7, "note": "x"} "#,
        r#"{"id": 1.0}"#,
        r#"{"id": 1e3}"#,
        r#"{"id": 18446744073709551616}"#,
        r#"{"id": "1"}"#,
        r#"{"idx": 1}"#,
        r#"[{"id": 1}]"#,
        r#"{"id": 1, "id": "x"}"#,
        r#"{"id": 1}x"#,
        r#"{"id": 1"#,
        "\u{feff}{\"id\": 1}",
        "",
        "null",
    ];
    match t.below(4) {
        0..=1 => t.pick(fixed).as_bytes().to_vec(),
        2 => format!(r#"{{"id": 1, "pad": "{}"}}"#, "p".repeat(t.below(200))).into_bytes(),
        _ => t.bytes(200),
    }
}

fn request(t: &mut Tape, w: &World, now_ms: u64, signed: &mut Signed) -> Req {
    let now_s = now_ms / 1000;
    let path = path(t);
    let mut method = method(t, &path);
    let mut cors = Vec::new();
    cors_headers(t, &mut method, &mut cors);
    let mut headers: Vec<(String, String)> = vec![
        (":method".into(), method.clone()),
        (":path".into(), path.clone()),
        (":authority".into(), "api.example.com".into()),
    ];
    headers.extend(cors);
    let mut body = Vec::new();
    let hook = [
        "/webhooks/github",
        "/webhooks/stripe",
        "/webhooks/standard",
        "/webhooks/slack",
    ]
    .iter()
    .zip(["gh", "stripe", "std", "slack"])
    .find(|(p, _)| path.starts_with(**p))
    .map(|(_, r)| r);
    if let Some(route) = hook.filter(|_| !t.chance(10)) {
        let (h, b) = webhook_delivery(t, w, route, now_s, signed);
        headers.extend(h);
        body = b;
    } else if t.chance(10) {
        let route = *t.pick(&["gh", "stripe", "std", "slack"]);
        let (h, b) = webhook_delivery(t, w, route, now_s, signed);
        headers.extend(h);
        body = b;
    } else if path.starts_with("/schema") && !t.chance(30) {
        body = schema_body(t);
    } else if t.chance(30) {
        body = t.bytes(200);
    }
    if t.chance(60) {
        headers.push((
            "authorization".into(),
            authorization(t, w, &path, now_s, signed),
        ));
        if t.chance(8) {
            headers.push((
                "authorization".into(),
                authorization(t, w, &path, now_s, signed),
            ));
        }
    }
    if t.chance(35) {
        headers.push(("x-api-key".into(), api_key_value(t)));
        if t.chance(8) {
            headers.push(("x-api-key".into(), api_key_value(t)));
        }
    }
    for _ in 0..t.below(6) {
        let name = match t.below(12) {
            0 => "x-forwarded-for".to_string(),
            1 => "x-request-id".to_string(),
            2 => t.pick(&IDENTITY_HEADERS).to_string(),
            3 => "origin".to_string(),
            4 => "content-length".to_string(),
            5 => "x-user".to_string(),
            6 => t.pick(WEBHOOK_HEADERS).to_string(),
            7 => t
                .pick(&[
                    "Authorization",
                    "X-API-KEY",
                    "",
                    "x-\u{0}",
                    "authorization ",
                ])
                .to_string(),
            8 => "h".repeat(t.pick(&[1usize, 300, 10_000]).to_owned()),
            9 => "access-control-request-method".to_string(),
            10 => "content-type".to_string(),
            _ => format!("x-{}", t.next() % 50),
        };
        let value = match name.as_str() {
            "x-forwarded-for" => xff(t),
            "content-length" => t
                .pick(&[
                    "0",
                    "10",
                    "-1",
                    "99999999999999999999",
                    "abc",
                    "2049",
                    " 5 ",
                ])
                .to_string(),
            "x-user" => t.pick(&["alice", "bob", ""]).to_string(),
            "content-type" => t
                .pick(&[
                    "application/json",
                    "Application/JSON; charset=utf-8",
                    "text/plain",
                    "text/csv;",
                    "application/jsonx",
                    "application/x-www-form-urlencoded",
                    "json",
                    "",
                    "*/*",
                    "application/json, text/html",
                ])
                .to_string(),
            _ => weird_string(t),
        };
        headers.push((name, value));
    }
    if t.chance(10) {
        // Shuffle: the map's order is the client's.
        for i in (1..headers.len()).rev() {
            let j = t.below(i + 1);
            headers.swap(i, j);
        }
    }
    let source = match t.below(9) {
        0..=3 => Some(format!("10.0.{}.{}:5000", t.below(4), t.below(4))),
        4 => Some("[::1]:80".into()),
        5 => Some(String::new()),
        6 => None,
        7 => Some(":::".into()),
        _ => Some(weird_string(t)),
    };
    let route_name = match t.below(5) {
        0 => Some("legacy".into()),
        1 => Some("other".into()),
        2 => Some(weird_string(t)),
        _ => None,
    };
    // Random chunking, empty chunks included; the last one ends the stream.
    let mut chunks = Vec::new();
    let mut rest = &body[..];
    while !rest.is_empty() && chunks.len() < 8 {
        let n = if t.chance(20) {
            0
        } else {
            1 + t.below(rest.len())
        };
        chunks.push(rest[..n].to_vec());
        rest = &rest[n..];
    }
    if !rest.is_empty() {
        chunks.push(rest.to_vec());
    }
    if chunks.is_empty() || t.chance(15) {
        chunks.push(Vec::new());
    }
    Req {
        method,
        path,
        headers,
        source,
        route_name,
        chunks,
        now_ms,
    }
}

// ---------------------------------------------------------------------------------------
// CORS: origins with known verdicts, preflight headers.

/// (origin, allowed by the `CorsCreds` policy, allowed by the `CorsAny` policy). Looked up
/// ASCII-case-insensitively (scheme and host compare so); a value not listed has no known
/// verdict and is held only to the shape rules.
const ORIGINS: &[(&str, bool, bool)] = &[
    ("https://app.example.com", true, true),
    ("https://app.example.com:443", true, true),
    ("http://localhost:3000", true, true),
    ("http://[::1]:8080", true, true),
    ("http://[0:0:0:0:0:0:0:1]:8080", true, true),
    ("https://shop.example.com", true, true),
    ("https://xn--pp-8cd.example.com", true, true),
    ("https://shop.example.com:443", true, true),
    // Well-formed, but not in the credentialed list.
    ("http://localhost", false, true),
    ("http://localhost:3001", false, true),
    ("https://localhost:3000", false, true),
    ("https://a.b.example.com", false, true),
    ("https://example.com", false, true),
    ("https://evilexample.com", false, true),
    ("https://app.example.com.evil.com", false, true),
    ("https://app.example.co", false, true),
    ("http://app.example.com", false, true),
    ("http://shop.example.com", false, true),
    ("https://app.example.com:8443", false, true),
    ("https://shop.example.com:444", false, true),
    ("wss://app.example.com", false, true),
    ("https://[::1]", false, true),
    ("https://1.2.3.4", false, true),
    ("https://example.org", false, true),
    ("https://x.y.z.example.com", false, true),
    // Not origins at all.
    ("null", false, false),
    ("", false, false),
    ("*", false, false),
    ("https://*.example.com", false, false),
    ("https://app.example.com/", false, false),
    ("https://app.example.com.", false, false),
    ("https://app.example.com/path", false, false),
    ("https://app.example.com?x", false, false),
    ("https://app.example.com#x", false, false),
    ("https://user@app.example.com", false, false),
    ("https://app.example.com@evil.com", false, false),
    ("https://app.example.com:", false, false),
    ("https://app.example.com:0443", false, false),
    ("https://app.example.com:65536", false, false),
    ("https://app.example.com:443/", false, false),
    (" https://app.example.com", false, false),
    ("https://app.example.com ", false, false),
    ("https://app.example.com, https://evil.com", false, false),
    ("https://app.example.com https://evil.com", false, false),
    ("app.example.com", false, false),
    ("//app.example.com", false, false),
    ("https:/app.example.com", false, false),
    ("https://\u{430}pp.example.com", false, false),
    ("https://app.example.com\u{0}", false, false),
    ("https://app.example.com\r\nx-evil: 1", false, false),
    ("https://app..example.com", false, false),
    ("https://.example.com", false, false),
    ("file://", false, false),
    ("https://", false, false),
    ("https://[::1", false, false),
    ("http://[::1]8080", false, false),
];

fn origin_verdict(flavor: Flavor, origin: &str) -> Option<bool> {
    let (_, creds, any) = ORIGINS
        .iter()
        .find(|(o, _, _)| o.eq_ignore_ascii_case(origin))?;
    match flavor {
        Flavor::Plain => Some(false),
        Flavor::CorsCreds => Some(*creds),
        Flavor::CorsAny => Some(*any),
    }
}

/// What any allowed origin must look like, whatever it is: `scheme://host[:port]`, ASCII,
/// nothing after the host and port.
fn origin_shaped(o: &str) -> bool {
    let Some((scheme, rest)) = o.split_once("://") else {
        return false;
    };
    !o.eq_ignore_ascii_case("null")
        && o.bytes().all(|b| b.is_ascii_graphic())
        && !scheme.is_empty()
        && !rest.is_empty()
        && !rest.ends_with('.')
        && !rest.contains(['/', '?', '#', '@', ',', '*', '\\'])
}

fn origin_value(t: &mut Tape) -> String {
    match t.below(10) {
        // Mostly the allowed ones (the first eight), for preflights to pass, and the
        // well-formed look-alikes after them.
        0..=2 => ORIGINS[t.below(8)].0.to_string(),
        3 | 4 => ORIGINS[8 + t.below(17)].0.to_string(),
        5 => t.pick(ORIGINS).0.to_string(),
        // Case changes keep the verdict.
        6 => t
            .pick(ORIGINS)
            .0
            .chars()
            .map(|c| {
                if t.chance(50) {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect(),
        7 => format!(
            "{}{}",
            t.pick(ORIGINS).0,
            t.pick(&[
                "/",
                ".",
                ":",
                ":443",
                ":80",
                "%2e",
                "@evil.com",
                "\t",
                ",null",
                "\u{0}",
                "é"
            ])
        ),
        8 => format!(
            "{}://{}{}",
            t.pick(&["https", "http", "HTTPS", "ftp", "", "h ttps"]),
            t.pick(&[
                "a.",
                "xn--p1ai.",
                "a-b.",
                "a_b.",
                "-.",
                "",
                "a.b.",
                "*.",
                "A.",
                "é."
            ]),
            t.pick(&[
                "example.com",
                "example.com:443",
                "example.com:99999",
                "[::1]",
                "localhost:3000"
            ])
        ),
        _ => weird_string(t),
    }
}

const REQUEST_METHODS: &[&str] = &[
    "GET",
    "POST",
    "PUT",
    "DELETE",
    "HEAD",
    "PATCH",
    "get",
    " PUT",
    "PUT\t",
    "",
    "GET, POST",
    "*",
    "CONNECT",
];

const REQUEST_HEADER_ITEMS: &[&str] = &[
    "authorization",
    "content-type",
    "x-api-key",
    "Content-Type",
    "X-API-Key",
    "x-custom",
    "cookie",
    "",
    " ",
    "content-type\tx",
    "*",
    "content-type;x",
];

fn request_headers_value(t: &mut Tape) -> String {
    let n = t.below(5);
    let sep = *t.pick(&[",", ", ", " ,\t", ",,"]);
    (0..n)
        .map(|_| {
            if t.chance(10) {
                weird_string(t)
            } else if t.chance(50) {
                t.pick(&["content-type", "Content-Type"]).to_string()
            } else {
                t.pick(REQUEST_HEADER_ITEMS).to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(sep)
}

/// Adds `origin` and, for a preflight, `access-control-request-*` headers; may turn the
/// request into an `OPTIONS`.
fn cors_headers(t: &mut Tape, method: &mut String, headers: &mut Vec<(String, String)>) {
    if !t.chance(50) {
        return;
    }
    headers.push(("origin".into(), origin_value(t)));
    if t.chance(6) {
        headers.push(("origin".into(), origin_value(t)));
    }
    if !t.chance(50) {
        return;
    }
    *method = t
        .pick(&[
            "OPTIONS", "OPTIONS", "OPTIONS", "OPTIONS", "options", "OPTIONS ",
        ])
        .to_string();
    if !t.chance(6) {
        let m = if t.chance(8) {
            weird_string(t)
        } else if t.chance(50) {
            t.pick(&["GET", "POST", "PUT"]).to_string()
        } else {
            t.pick(REQUEST_METHODS).to_string()
        };
        headers.push(("access-control-request-method".into(), m));
        if t.chance(5) {
            headers.push((
                "access-control-request-method".into(),
                t.pick(REQUEST_METHODS).to_string(),
            ));
        }
    }
    if t.chance(60) {
        headers.push((
            "access-control-request-headers".into(),
            request_headers_value(t),
        ));
        if t.chance(12) {
            headers.push((
                "access-control-request-headers".into(),
                request_headers_value(t),
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Quota: the service's answers, faked as the test fakes JWKS fetches.

/// What the filter must make of an answer, by the documented rules (quota/README.md,
/// docs/CONFIG.md), stated independently of `quota_client`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum QuotaExpect {
    Allow,
    Deny {
        status: u32,
        retry_after: Option<u64>,
        reset_at: Option<String>,
    },
    /// Timeout, bad status, unreadable or malformed answer, open breaker: `failure_mode`.
    Fail,
}

/// One faked callout.
struct FakeAnswer {
    /// `None`: no answer within the timeout.
    status: Option<u32>,
    body: Vec<u8>,
    expect: QuotaExpect,
    /// The answer's headers that may reach the client (documented names, printable values).
    copied: Vec<(String, String)>,
    /// How many headers the answer named.
    named: usize,
}

/// What the faked answer was and what should come of it, for the oracles.
#[derive(Clone, Debug)]
struct QuotaRecord {
    expect: QuotaExpect,
    skipped: bool,
    copied: Vec<(String, String)>,
}

const ANSWER_HEADER_NAMES: &[&str] = &[
    "x-quota-limit",
    "x-quota-remaining",
    "x-quota-reset",
    "x-quota-overage",
    "ratelimit",
    "ratelimit-policy",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "retry-after",
    "access-control-allow-origin",
    "access-control-allow-credentials",
    "access-control-expose-headers",
    "strict-transport-security",
    "x-frame-options",
    "x-content-type-options",
    "content-security-policy",
    "referrer-policy",
    "permissions-policy",
    "vary",
    "set-cookie",
    "cache-control",
    "content-type",
    "content-length",
    "transfer-encoding",
    "connection",
    "location",
    "www-authenticate",
    "x-auth-subject",
    "x-auth-client",
    "x-request-id",
    ":status",
    "X-Quota-Remaining",
    "x-quota-",
    "x quota",
    "x-quota-\r\nx-evil",
    "",
    "x-quota-\u{e9}",
];

/// The headers an answer may put on the client's response (quota/README.md): the bucket's
/// rate-limit set and `x-quota-*`.
fn answer_header_allowed(name: &str) -> bool {
    matches!(
        name,
        "ratelimit"
            | "ratelimit-policy"
            | "x-ratelimit-limit"
            | "x-ratelimit-remaining"
            | "x-ratelimit-reset"
    ) || name.strip_prefix("x-quota-").is_some_and(|r| {
        !r.is_empty()
            && r.len() <= 48
            && r.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    })
}

fn answer_header_value(t: &mut Tape) -> Value {
    match t.below(10) {
        0..=3 => json!((t.next() % 100_000).to_string()),
        4 => json!("\"quota-global\";r=1;t=1"),
        5 => json!(weird_string(t)),
        6 => json!("*"),
        7 => json!(5),
        8 => t
            .pick(&[Value::Null, json!({"a": 1}), json!(["x"])])
            .clone(),
        _ => json!("max-age=0"),
    }
}

/// The `headers` object of an answer, and the pairs from it that may be copied.
fn answer_headers(t: &mut Tape) -> (Map<String, Value>, Vec<(String, String)>) {
    let mut m = Map::new();
    let n = if t.chance(10) { 40 } else { t.below(6) };
    for _ in 0..n {
        let name = if t.chance(5) {
            weird_string(t)
        } else {
            t.pick(ANSWER_HEADER_NAMES).to_string()
        };
        let v = answer_header_value(t);
        m.entry(name).or_insert(v);
    }
    let copied = m
        .iter()
        .filter_map(|(k, v)| {
            let v = v.as_str()?;
            (answer_header_allowed(k)
                && v.len() <= 512
                && v.bytes().all(|b| (0x20..0x7f).contains(&b)))
            .then(|| (k.clone(), v.to_string()))
        })
        .collect();
    (m, copied)
}

fn quota_answer(t: &mut Tape) -> FakeAnswer {
    let mut status = Some(200);
    let mut broken = false;
    if t.chance(10) {
        status = *t.pick(&[
            None,
            Some(500),
            Some(503),
            Some(0),
            Some(204),
            Some(302),
            Some(429),
            Some(402),
            Some(404),
        ]);
        broken = true;
    }
    let (headers, copied) = answer_headers(t);
    let named = headers.len();
    let mut obj = Map::new();
    let mut expect;
    let mut raw: Option<Vec<u8>> = None;
    match t.below(10) {
        0..=3 | 9 => {
            obj.insert("allowed".into(), true.into());
            match t.below(8) {
                0..=3 => {
                    obj.insert("remaining".into(), json!(t.pick(&[0u64, 41, u64::MAX])));
                }
                4 => {
                    obj.insert("remaining".into(), Value::Null);
                }
                5 => {
                    obj.insert(
                        "remaining".into(),
                        t.pick(&[json!(-1), json!("5"), json!(1.5), json!(1e300)])
                            .clone(),
                    );
                    broken = true;
                }
                _ => {}
            }
            expect = QuotaExpect::Allow;
        }
        4..=7 => {
            obj.insert("allowed".into(), false.into());
            let st = match t.below(8) {
                0..=2 => Some(429),
                3..=5 => Some(402),
                6 => {
                    obj.insert(
                        "status".into(),
                        t.pick(&[
                            json!(403),
                            json!(500),
                            json!(0),
                            json!(200),
                            json!(4294967296u64),
                        ])
                        .clone(),
                    );
                    broken = true;
                    None
                }
                _ => {
                    if t.chance(50) {
                        obj.insert(
                            "status".into(),
                            t.pick(&[json!("429"), Value::Null, json!(429.5)]).clone(),
                        );
                    }
                    broken = true;
                    None
                }
            };
            if let Some(st) = st {
                obj.insert("status".into(), st.into());
            }
            match t.below(6) {
                0..=3 => {
                    obj.insert(
                        "error".into(),
                        json!(t.pick(&["quota_exceeded", "rate_limit_exceeded", "other"])),
                    );
                }
                4 => {
                    obj.insert("error".into(), json!(5));
                    broken = true;
                }
                _ => {}
            }
            match t.below(7) {
                0..=2 => {
                    obj.insert("message".into(), json!("daily quota of 5 used up"));
                }
                3 => {
                    obj.insert("message".into(), json!(t.pick(&["", " ", "\u{0}\r\n"])));
                }
                4 => {
                    obj.insert("message".into(), json!("m".repeat(600)));
                }
                5 => {
                    obj.insert("message".into(), json!(["m"]));
                    broken = true;
                }
                _ => {}
            }
            let retry = match t.below(7) {
                0..=3 => {
                    let r = *t.pick(&[0u64, 1, 5, 60, 86_400, u64::MAX]);
                    obj.insert("retry_after_s".into(), r.into());
                    Some(r)
                }
                4 => {
                    obj.insert(
                        "retry_after_s".into(),
                        t.pick(&[json!(-1), json!("5"), json!(1.5)]).clone(),
                    );
                    broken = true;
                    None
                }
                5 => {
                    obj.insert("retry_after_s".into(), Value::Null);
                    None
                }
                _ => None,
            };
            let reset = match t.below(9) {
                0..=4 => Some("2024-03-01T00:00:00Z".to_string()),
                5 => Some(
                    t.pick(&[
                        "",
                        "x".repeat(65).as_str(),
                        "2024-03-01T00:00:00Z\r\nx: y",
                        "2024-03-01 00:00:00Z",
                    ])
                    .to_string(),
                ),
                6 => {
                    obj.insert("reset_at".into(), json!(5));
                    broken = true;
                    None
                }
                _ => None,
            };
            if let Some(r) = &reset {
                obj.insert("reset_at".into(), json!(r));
            }
            let reset_ok = reset.filter(|r| {
                !r.is_empty() && r.len() <= 64 && r.bytes().all(|b| (0x21..0x7f).contains(&b))
            });
            expect = match st {
                Some(429) if retry.is_some() => QuotaExpect::Deny {
                    status: 429,
                    retry_after: retry.map(|r| r.max(1)),
                    reset_at: reset_ok,
                },
                Some(402) if reset_ok.is_some() => QuotaExpect::Deny {
                    status: 402,
                    retry_after: retry.map(|r| r.max(1)),
                    reset_at: reset_ok,
                },
                _ => QuotaExpect::Fail,
            };
        }
        _ => {
            expect = QuotaExpect::Fail;
            raw = Some(match t.below(12) {
                0 => t.bytes(100),
                1 => b"null".to_vec(),
                2 => b"[]".to_vec(),
                3 => b"{}".to_vec(),
                4 => br#"{"allowed":"true"}"#.to_vec(),
                5 => br#"{"allowed":1}"#.to_vec(),
                6 => br#"{"allowed":true,"allowed":false}"#.to_vec(),
                7 => br#"{"allowed":true,"headers":[]}"#.to_vec(),
                8 => br#"{"allowed":true,"headers":null}"#.to_vec(),
                9 => br#"{"allowed":true,"headers":{"x-quota-remaining":"1"}"#.to_vec(),
                10 => {
                    // Nested past serde_json's recursion limit, in a field the filter does
                    // not read: skipped without recursion, so still an answer.
                    expect = QuotaExpect::Allow;
                    format!(
                        r#"{{"allowed":true,"x":{}1{}}}"#,
                        "[".repeat(300),
                        "]".repeat(300)
                    )
                    .into_bytes()
                }
                _ => b"\xef\xbb\xbf{\"allowed\":true}".to_vec(),
            });
        }
    }
    if raw.is_none() {
        if t.chance(10) {
            // Fields the filter does not read are ignored, whatever they hold.
            obj.insert("tier".into(), json!(weird_string(t)));
            obj.insert("reset_s".into(), json!([1, {"x": null}]));
            obj.insert(
                "x".into(),
                serde_json::from_str(&format!("{}1{}", "[".repeat(50), "]".repeat(50)))
                    .unwrap_or(Value::Null),
            );
        }
        if t.chance(5) {
            obj.insert(
                "headers".into(),
                t.pick(&[json!([]), json!("x"), Value::Null]).clone(),
            );
            broken = true;
        } else if named > 0 || t.chance(50) {
            obj.insert("headers".into(), Value::Object(headers));
        }
        if t.chance(5) {
            obj.remove("allowed");
            broken = true;
        }
        if t.chance(8) {
            // Around the size limit.
            let target = *t.pick(&[16_000usize, 16_384, 16_385, 100_000, 1 << 20]);
            let base = serde_json::to_vec(&obj).map(|b| b.len()).unwrap_or(0);
            obj.insert(
                "pad".into(),
                json!("p".repeat(target.saturating_sub(base + 10))),
            );
        }
    }
    let body = raw.unwrap_or_else(|| serde_json::to_vec(&obj).expect("json"));
    if broken || body.len() > api_guard::quota_client::MAX_ANSWER_BYTES {
        expect = QuotaExpect::Fail;
    }
    FakeAnswer {
        status,
        body,
        expect,
        copied,
        named,
    }
}

/// The glue's per-VM circuit breaker, and an independent model of its documented behaviour
/// (docs/CONFIG.md: `failures` consecutive failures open it for `open_ms`, then one probe).
struct QuotaSim {
    breaker: Breaker,
    failures_to_open: u32,
    open_ms: u64,
    consecutive: u32,
    open_until: Option<u64>,
}

impl QuotaSim {
    fn new(cfg: &Config) -> Self {
        let bc = cfg
            .raw
            .quota
            .as_ref()
            .map(|q| q.breaker.clone())
            .unwrap_or_default();
        QuotaSim {
            breaker: Breaker::new(&bc),
            failures_to_open: bc.failures.max(1),
            open_ms: bc.open_ms,
            consecutive: 0,
            open_until: None,
        }
    }
    fn model_calls(&self, now: u64) -> bool {
        self.open_until.is_none_or(|u| now >= u)
    }
    fn model_record(&mut self, ok: bool, now: u64) {
        if ok {
            self.consecutive = 0;
            self.open_until = None;
        } else {
            self.consecutive = self.consecutive.saturating_add(1);
            // A failed probe reopens at once.
            if self.open_until.is_some() || self.consecutive >= self.failures_to_open {
                self.open_until = Some(now.saturating_add(self.open_ms));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Driving the pipeline exactly as the glue does.

#[derive(Debug)]
enum Outcome {
    Forward(pipeline::UpstreamEdits),
    Reply(LocalReply),
    /// A local answer that is not a denial (the CORS preflight's 204).
    Answer(pipeline::Answer),
}

struct Run {
    outcome: Outcome,
    ex: Exchange,
    /// The body bytes the pipeline was given.
    fed: Vec<u8>,
    /// The quota callout, when the request made one.
    quota: Option<QuotaRecord>,
}

/// One request through the pipeline, then its stream's end (what it held in shared state,
/// the backend ceiling's in-flight admission, goes back, as the driver's `on_done` does).
fn drive(
    cfg: &Config,
    store: &MemoryStore,
    r: &Req,
    t: &mut Tape,
    sim: &mut QuotaSim,
) -> Result<Run, TestCaseError> {
    let mut run = drive_request(cfg, store, r, t, sim)?;
    let env = Env {
        now_ms: r.now_ms,
        store,
    };
    pipeline::on_stream_end(cfg, &mut run.ex, &env);
    prop_assert!(run.ex.hygiene.lease.is_none());
    Ok(run)
}

fn drive_request(
    cfg: &Config,
    store: &MemoryStore,
    r: &Req,
    t: &mut Tape,
    sim: &mut QuotaSim,
) -> Result<Run, TestCaseError> {
    let env = Env {
        now_ms: r.now_ms,
        store,
    };
    let req = Request {
        method: &r.method,
        path: &r.path,
        headers: &r.headers,
        source_address: r.source.as_deref(),
        route_name: r.route_name.as_deref(),
    };
    // As the glue: a request without body chunks ended with its headers.
    let mut ex = Exchange {
        body_ended: r.chunks.is_empty(),
        ..Default::default()
    };
    let mut fed = Vec::new();
    let mut total = 0usize;
    let mut chunks = r.chunks.iter();
    let mut jwks_waits = 0;
    let mut quota: Option<QuotaRecord> = None;
    let mut v = pipeline::on_request_headers(cfg, &req, &mut ex, &env);
    for _ in 0..64 {
        match v {
            Verdict::Forward(e) => {
                return Ok(Run {
                    outcome: Outcome::Forward(e),
                    ex,
                    fed,
                    quota,
                })
            }
            Verdict::Reply(rep) => {
                prop_assert_eq!(ex.stage, pipeline::Stage::Done);
                return Ok(Run {
                    outcome: Outcome::Reply(rep),
                    ex,
                    fed,
                    quota,
                });
            }
            Verdict::Wait(Wait::Body) => {
                prop_assert!(pipeline::waits_for_body(&ex));
                let Some(chunk) = chunks.next() else {
                    return Err(TestCaseError::fail("waits for a body that has ended"));
                };
                let last = chunks.as_slice().is_empty();
                // The glue copies at most this much out of Envoy's buffer (nothing when only
                // the body's size is counted), and always reports the running total.
                let limit = pipeline::body_read_limit(&ex);
                prop_assert!(limit >= 1 || ex.hygiene.waiting);
                let take = chunk.len().min(limit);
                fed.extend_from_slice(&chunk[..take]);
                total += chunk.len();
                let step =
                    pipeline::on_request_body_total(&mut ex, total, &chunk[..take], last, &env);
                if take < chunk.len() && limit >= 1 {
                    prop_assert!(
                        matches!(&step, BodyVerdict::Reply(r) if r.code == ErrorCode::PayloadTooLarge),
                        "a capped read must end in 413, got {:?}",
                        step
                    );
                }
                v = match step {
                    BodyVerdict::More => Verdict::Wait(Wait::Body),
                    BodyVerdict::Reply(rep) => Verdict::Reply(rep),
                    BodyVerdict::Continue => pipeline::run(cfg, &req, &mut ex, &env),
                };
            }
            Verdict::Wait(Wait::Jwks { provider, waiter }) => {
                jwks_waits += 1;
                prop_assert!(jwks_waits == 1, "a request waits for a JWKS at most once");
                prop_assert!(!ex.jwks_fetched);
                let doc = match t.below(5) {
                    0 | 1 => Some(
                        serde_json::to_vec(&json!({"keys": [
                            {"kty": "oct", "kid": "r1", "alg": "HS256", "k": b64u(&HS_IDP)}]}))
                        .expect("json"),
                    ),
                    2 => Some(t.bytes(100)),
                    3 => Some(match t.below(4) {
                        0 => br#"{"keys":[{"kty":"RSA","n":"AQAB","e":"AQAB"}]}"#.to_vec(),
                        // Over the size limit, nested past the recursion limit, too many keys.
                        1 => {
                            format!(r#"{{"keys":[],"pad":"{}"}}"#, "p".repeat(300_000)).into_bytes()
                        }
                        2 => format!("{}{}", "[".repeat(5_000), "]".repeat(5_000)).into_bytes(),
                        _ => serde_json::to_vec(&json!({"keys": vec![
                            json!({"kty": "oct", "k": b64u(&HS_IDP)}); 65]}))
                        .expect("json"),
                    }),
                    _ => None,
                };
                let _ = cfg
                    .auth
                    .fetch_finished(provider, store, doc.as_deref(), r.now_ms);
                if waiter {
                    cfg.auth.waiter_fetch_done();
                }
                ex.jwks_fetched = true;
                v = pipeline::run(cfg, &req, &mut ex, &env);
            }
            // Only a `cors` section answers, only a `quota` section calls out.
            Verdict::Answer(a) => {
                prop_assert!(
                    cfg.cors.is_some(),
                    "a local answer ({}) without CORS",
                    a.status
                );
                prop_assert_eq!(ex.stage, pipeline::Stage::Done);
                return Ok(Run {
                    outcome: Outcome::Answer(a),
                    ex,
                    fed,
                    quota,
                });
            }
            Verdict::Wait(Wait::Quota(call)) => {
                let Some(qc) = cfg.raw.quota.as_ref() else {
                    return Err(TestCaseError::fail(
                        "a quota callout without a quota section",
                    ));
                };
                let Some(policy) = ex.policy(cfg) else {
                    return Err(TestCaseError::fail("a quota callout without a route"));
                };
                prop_assert!(policy.quota, "a quota callout on a route without quota");
                prop_assert!(
                    quota.is_none(),
                    "a request calls the quota service at most once"
                );
                // The callout itself: cluster, authority, timeout, and what it asks.
                prop_assert_eq!(&call.cluster, &qc.cluster);
                prop_assert_eq!(
                    call.authority.as_str(),
                    qc.authority.as_deref().unwrap_or(&qc.cluster)
                );
                prop_assert_eq!(call.timeout_ms, qc.timeout_ms);
                let asked: Value = serde_json::from_slice(&call.body)
                    .map_err(|e| TestCaseError::fail(format!("callout body: {e}")))?;
                let (client, tier) = match &ex.identity {
                    Some(id) => (id.client.clone(), id.tier.clone()),
                    None => (
                        ex.client_ip.clone().unwrap_or_else(|| "unknown".into()),
                        "anonymous".to_string(),
                    ),
                };
                prop_assert_eq!(
                    &asked,
                    &json!({"client": client, "tier": tier, "route": ex.route_name(cfg),
                            "cost": policy.cost})
                );
                for (k, v) in call.headers() {
                    prop_assert!(header_name_ok(k.trim_start_matches(':')) && header_safe(v));
                }
                // The glue: breaker first, then the callout; its result recorded.
                let permit = sim.breaker.permit(r.now_ms);
                prop_assert_eq!(
                    permit == Permit::Call,
                    sim.model_calls(r.now_ms),
                    "circuit breaker at {} ms",
                    r.now_ms
                );
                let rec = if permit == Permit::Skip {
                    ex.quota = Some(QuotaOutcome::Failed("circuit breaker open".into()));
                    QuotaRecord {
                        expect: QuotaExpect::Fail,
                        skipped: true,
                        copied: Vec::new(),
                    }
                } else {
                    let fake = quota_answer(t);
                    let got = match fake.status {
                        None => Err("no answer within timeout_ms".to_string()),
                        Some(_) if fake.body.len() > api_guard::quota_client::MAX_ANSWER_BYTES => {
                            Err("answer too large".to_string())
                        }
                        Some(st) => parse_answer(st, &fake.body),
                    };
                    // Read independently of the glue's size check too.
                    if let Some(st) = fake.status {
                        prop_assert_eq!(parse_answer(st, &fake.body).is_ok(), got.is_ok());
                    }
                    match (&got, &fake.expect) {
                        (Ok(QuotaAnswer::Allow { headers, .. }), QuotaExpect::Allow) => {
                            let mut want = fake.copied.clone();
                            let mut have = headers.clone();
                            want.sort();
                            have.sort();
                            if fake.named <= 16 {
                                prop_assert_eq!(have, want, "headers copied from an allow");
                            } else {
                                prop_assert!(have.iter().all(|h| want.contains(h)));
                            }
                        }
                        (
                            Ok(QuotaAnswer::Deny {
                                status,
                                retry_after_s,
                                reset_at,
                                headers,
                                ..
                            }),
                            QuotaExpect::Deny {
                                status: s,
                                retry_after,
                                reset_at: at,
                            },
                        ) => {
                            prop_assert_eq!(status, s);
                            prop_assert_eq!(retry_after_s, retry_after);
                            prop_assert_eq!(reset_at, at);
                            prop_assert!(headers.iter().all(|h| fake.copied.contains(h)));
                        }
                        (Err(_), QuotaExpect::Fail) => {}
                        (got, want) => {
                            return Err(TestCaseError::fail(format!(
                                "quota answer {:?} (HTTP {:?}) read as {:?}, expected {:?}",
                                String::from_utf8_lossy(&fake.body[..fake.body.len().min(300)]),
                                fake.status,
                                got,
                                want
                            )))
                        }
                    }
                    sim.breaker.record(got.is_ok(), r.now_ms);
                    sim.model_record(got.is_ok(), r.now_ms);
                    ex.quota = Some(match got {
                        Ok(a) => QuotaOutcome::Answered(a),
                        Err(why) => QuotaOutcome::Failed(why),
                    });
                    QuotaRecord {
                        expect: fake.expect,
                        skipped: false,
                        copied: fake.copied,
                    }
                };
                quota = Some(rec);
                v = pipeline::run(cfg, &req, &mut ex, &env);
            }
        }
    }
    Err(TestCaseError::fail(
        "the pipeline did not settle in 64 steps",
    ))
}

// ---------------------------------------------------------------------------------------
// Oracles.

fn header_safe(v: &str) -> bool {
    !v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0)
}

fn header_name_ok(n: &str) -> bool {
    !n.is_empty()
        && n.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.!#$%&'*+^`|~".contains(&b)
        })
}

fn count(h: &[(String, String)], name: &str) -> usize {
    h.iter().filter(|(k, _)| k == name).count()
}

fn first<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// What the SPEC requires of every local reply, whatever the config.
fn check_reply(cfg: &Config, r: &Req, run: &Run, rep: &LocalReply) -> Result<(), TestCaseError> {
    prop_assert!(ErrorCode::ALL.contains(&rep.code));
    prop_assert_eq!(rep.status, rep.code.status(), "{:?}", rep);
    prop_assert!(!rep.message.is_empty());
    let body: Value = serde_json::from_slice(&rep.body())
        .map_err(|e| TestCaseError::fail(format!("reply body is not JSON: {e}")))?;
    prop_assert_eq!(body["error"].as_str(), Some(rep.code.as_str()));
    prop_assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    let hdrs = headers::local_reply_headers(cfg, rep, &run.ex.response_headers, &run.ex.vary);
    for (k, v) in &hdrs {
        prop_assert!(header_name_ok(k), "reply header name {:?}", k);
        prop_assert!(header_safe(v), "reply header {}: {:?}", k, v);
    }
    prop_assert_eq!(first(&hdrs, "content-type"), Some("application/json"));
    prop_assert_eq!(first(&hdrs, "cache-control"), Some("no-store"));
    match rep.code {
        ErrorCode::RateLimitExceeded | ErrorCode::BackendOverloaded => {
            let secs = body["retry_after"].as_u64().unwrap_or(0);
            prop_assert!(secs >= 1, "{} body needs retry_after: {}", rep.status, body);
            let want = secs.to_string();
            prop_assert_eq!(first(&hdrs, "retry-after"), Some(want.as_str()));
        }
        ErrorCode::QuotaExceeded => {
            prop_assert!(
                body["reset_at"].as_str().is_some_and(|s| !s.is_empty()),
                "402 body needs reset_at: {}",
                body
            );
        }
        ErrorCode::InvalidToken => {
            prop_assert_eq!(
                first(&hdrs, "www-authenticate"),
                Some("Bearer error=\"invalid_token\"")
            );
        }
        ErrorCode::InsufficientScope => {
            prop_assert!(first(&hdrs, "www-authenticate")
                .is_some_and(|v| v.starts_with("Bearer error=\"insufficient_scope\"")));
        }
        _ => {}
    }
    // The deny log line is one valid JSON object, whatever the method and path were.
    let line = DenyLog {
        reply: rep,
        route: run.ex.route_name(cfg),
        client: run.ex.identity.as_ref().map(|i| i.client.as_str()),
        ip: run.ex.client_ip.as_deref(),
        request_id: run.ex.request_id.as_deref(),
        method: &r.method,
        path: &r.path,
    }
    .line();
    prop_assert!(
        serde_json::from_str::<Value>(&line).is_ok(),
        "deny log is not JSON: {}",
        line
    );
    Ok(())
}

/// What the SPEC requires of every forwarded request, whatever the config.
fn check_forward(
    cfg: &Config,
    r: &Req,
    run: &Run,
    e: &pipeline::UpstreamEdits,
) -> Result<(), TestCaseError> {
    for name in &cfg.stripped_request_headers {
        if count(&r.headers, name) > 0 {
            prop_assert!(e.remove.contains(name), "spoofed {} not removed", name);
        }
    }
    for (k, v) in &e.set {
        prop_assert!(header_name_ok(k), "upstream header name {:?}", k);
        prop_assert!(header_safe(v), "upstream header {}: {:?}", k, v);
        if cfg.stripped_request_headers.contains(k) {
            prop_assert!(run.ex.identity.is_some(), "{} set without an identity", k);
        }
    }
    let has_id = count(&r.headers, "x-request-id") > 0;
    prop_assert_eq!(
        e.set.iter().any(|(k, _)| k == "x-request-id"),
        !has_id,
        "x-request-id is added exactly when absent"
    );
    if let Some(id) = &run.ex.identity {
        let ih = &cfg.identity_headers;
        prop_assert!(e.set.contains(&(ih.subject.clone(), id.subject.clone())));
        prop_assert!(e.set.contains(&(ih.client.clone(), id.client.clone())));
        prop_assert!(e.set.contains(&(ih.tier.clone(), id.tier.clone())));
    }
    for (k, v) in &run.ex.response_headers {
        prop_assert!(
            header_name_ok(k) && header_safe(v),
            "response header {}: {:?}",
            k,
            v
        );
    }
    check_hygiene_forward(cfg, r, run)
}

/// A forwarded request on a route with hygiene checks met them: body within
/// `max_body_bytes` (the declared length when there is one: Envoy's codec enforces it),
/// an accepted content type whenever there is a body.
fn check_hygiene_forward(cfg: &Config, r: &Req, run: &Run) -> Result<(), TestCaseError> {
    let Some(h) = run.ex.policy(cfg).and_then(|p| p.hygiene.as_ref()) else {
        return Ok(());
    };
    let declared: Option<u64> = match count(&r.headers, "content-length") {
        1 => first(&r.headers, "content-length").and_then(|v| v.trim().parse().ok()),
        _ => None,
    };
    let actual: usize = r.chunks.iter().map(Vec::len).sum();
    if let Some(limit) = h.max_body_bytes {
        match declared {
            Some(n) => prop_assert!(n <= limit as u64, "declared {} over {}", n, limit),
            None => prop_assert!(actual <= limit, "body of {} over {}", actual, limit),
        }
    }
    // json_schema: a forwarded non-empty body is JSON with an integer "id" (independent of
    // the filter's validator: serde_json and a hand check).
    let body: Vec<u8> = r.chunks.concat();
    if h.json_schema.is_some() && !body.is_empty() {
        let v: Result<Value, _> = serde_json::from_slice(&body);
        prop_assert!(
            v.is_ok(),
            "forwarded a body that is not JSON: {:?} {:?} chunks {:?}",
            body,
            r.headers,
            r.chunks
        );
        let id = v.ok().and_then(|v| v.get("id").cloned());
        let integer = id.as_ref().is_some_and(|n| {
            n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0)
        });
        prop_assert!(integer, "forwarded without an integer id: {:?}", body);
        let text = String::from_utf8_lossy(&body);
        prop_assert!(
            text.matches("\"id\"").count() == 1,
            "forwarded with a repeated key: {:?}",
            text
        );
    }
    let has_body = match declared {
        Some(n) => n > 0,
        None => !r.chunks.is_empty() || count(&r.headers, "transfer-encoding") > 0,
    };
    if !h.content_types.is_empty() && has_body {
        prop_assert_eq!(count(&r.headers, "content-type"), 1);
        let ct = first(&r.headers, "content-type").unwrap_or("");
        let ok = api_guard::hygiene::media_type(ct)
            .is_some_and(|(ty, sub)| h.content_types.iter().any(|m| m.matches(ty, sub)));
        prop_assert!(ok, "forwarded content-type {:?}", ct);
    }
    Ok(())
}

fn values<'a>(h: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    h.iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

type Headers = Vec<(String, String)>;

const ACAO: &str = "access-control-allow-origin";
const ACAC: &str = "access-control-allow-credentials";
const ACEH: &str = "access-control-expose-headers";

/// The response the client gets, as the glue builds it: a local reply's or answer's header
/// list, or for a forwarded request a hostile upstream response with the filter's ops applied
/// (as Envoy applies them). Returns (client response headers, upstream headers).
fn response_of(cfg: &Config, run: &Run, t: &mut Tape) -> Result<(Headers, Headers), TestCaseError> {
    let ex = &run.ex;
    Ok(match &run.outcome {
        Outcome::Reply(rep) => (
            headers::local_reply_headers(cfg, rep, &ex.response_headers, &ex.vary),
            Vec::new(),
        ),
        Outcome::Answer(a) => (
            headers::answer_headers(cfg, a, &ex.response_headers, &ex.vary),
            Vec::new(),
        ),
        Outcome::Forward(_) => {
            let upstream: Vec<(String, String)> = (0..t.below(5))
                .map(|_| {
                    let name = t
                        .pick(&[
                            "vary",
                            "x-frame-options",
                            "ratelimit",
                            "x-other",
                            "access-control-allow-origin",
                            "access-control-allow-credentials",
                            "access-control-max-age",
                            "strict-transport-security",
                        ])
                        .to_string();
                    let value = match t.below(3) {
                        0 => "*".to_string(),
                        1 => "true".to_string(),
                        _ => weird_string(t),
                    };
                    (name, value)
                })
                .collect();
            let mut h = upstream.clone();
            for op in headers::response_ops(cfg, &upstream, &ex.response_headers, &ex.vary) {
                match op {
                    headers::HeaderOp::Add(k, v) | headers::HeaderOp::Set(k, v)
                        if k != "vary" && !header_safe(&v) =>
                    {
                        prop_assert!(false, "response op {}: {:?}", k, v);
                    }
                    // Envoy's add appends; `response_ops` adds only what is absent.
                    headers::HeaderOp::Add(k, v) => h.push((k.into_owned(), v.into_owned())),
                    headers::HeaderOp::Set(k, v) => {
                        h.retain(|(n, _)| !n.eq_ignore_ascii_case(&k));
                        h.push((k.into_owned(), v.into_owned()));
                    }
                    headers::HeaderOp::Remove(k) => h.retain(|(n, _)| !n.eq_ignore_ascii_case(&k)),
                }
            }
            (h, upstream)
        }
    })
}

/// Headers the request path may put on a response (`Exchange::response_headers`): the
/// rate-limit set, the quota service's, CORS.
fn filter_owned(name: &str) -> bool {
    answer_header_allowed(name) || matches!(name, ACAO | ACAC | ACEH | "retry-after")
}

/// What the SPEC requires of every response, whatever the config: security headers never
/// overridden; with CORS, `vary: origin`, `access-control-allow-origin` only as the request's
/// own allowed origin (never `*`), none on a refused preflight, no upstream CORS header
/// widening the policy.
fn check_response(
    cfg: &Config,
    r: &Req,
    run: &Run,
    resp: &[(String, String)],
    upstream: &[(String, String)],
) -> Result<(), TestCaseError> {
    for (k, v) in &run.ex.response_headers {
        prop_assert!(filter_owned(k), "the request path set {}: {:?}", k, v);
    }
    for (k, v) in resp {
        prop_assert!(header_name_ok(k), "response header name {:?}", k);
        prop_assert!(k == "vary" || upstream.iter().any(|(n, _)| n == k) || header_safe(v));
    }
    for (name, value) in &cfg.security_headers {
        if values(upstream, name).is_empty() {
            prop_assert_eq!(
                values(resp, name),
                vec![value.as_str()],
                "security header {}",
                name
            );
        }
    }
    let Some(policy) = &cfg.cors else {
        prop_assert!(
            !run.ex
                .response_headers
                .iter()
                .any(|(k, _)| k.starts_with("access-control-")),
            "CORS headers without a cors section"
        );
        return Ok(());
    };
    let vary = values(resp, "vary").join(",");
    prop_assert!(
        vary.split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("origin") || t.trim() == "*"),
        "no vary: origin on a CORS response: {:?}",
        vary
    );
    // Every access-control-* header on the response is the filter's own.
    let own: Vec<(String, String)> = match &run.outcome {
        Outcome::Answer(a) => a.headers.clone(),
        _ => run.ex.response_headers.clone(),
    };
    for (k, v) in resp {
        if k.to_ascii_lowercase().starts_with("access-control-") {
            prop_assert!(
                own.contains(&(k.clone(), v.clone())),
                "{}: {:?} not set by the filter",
                k,
                v
            );
        }
    }
    let acao = values(resp, ACAO);
    prop_assert!(acao.len() <= 1, "several {}", ACAO);
    match acao.first() {
        Some(a) => {
            prop_assert_ne!(*a, "*");
            prop_assert_eq!(count(&r.headers, "origin"), 1);
            prop_assert_eq!(
                Some(*a),
                first(&r.headers, "origin"),
                "{} echoes the origin",
                ACAO
            );
            prop_assert!(origin_shaped(a), "allowed a malformed origin {:?}", a);
            prop_assert_eq!(
                values(resp, ACAC),
                if policy.allow_credentials() {
                    vec!["true"]
                } else {
                    vec![]
                }
            );
        }
        None => {
            prop_assert!(values(resp, ACAC).is_empty() && values(resp, ACEH).is_empty());
        }
    }
    if let Outcome::Reply(rep) = &run.outcome {
        if rep.code == ErrorCode::CorsRejected {
            prop_assert!(
                !resp.iter().any(|(k, _)| k.starts_with("access-control-")),
                "a refused preflight carries CORS headers: {:?}",
                resp
            );
        }
    }
    Ok(())
}

fn is_preflight(r: &Req) -> bool {
    r.method == "OPTIONS"
        && count(&r.headers, "origin") > 0
        && count(&r.headers, "access-control-request-method") > 0
}

/// The known verdict on a preflight in a CORS flavor: `None` when its origin's is unknown
/// (and nothing else refuses it).
fn preflight_expect(flavor: Flavor, r: &Req) -> Option<bool> {
    let (methods, allowed_headers, _, _) = cors_rules(flavor)?;
    if count(&r.headers, "origin") != 1 || count(&r.headers, "access-control-request-method") != 1 {
        return Some(false);
    }
    let method_ok = first(&r.headers, "access-control-request-method")
        .is_some_and(|m| methods.contains(&m.trim_matches([' ', '\t'])));
    let headers_ok = values(&r.headers, "access-control-request-headers")
        .iter()
        .flat_map(|l| l.split(','))
        .map(|h| h.trim_matches([' ', '\t']))
        .filter(|h| !h.is_empty())
        .all(|h| allowed_headers.iter().any(|a| a.eq_ignore_ascii_case(h)));
    if !method_ok || !headers_ok {
        return Some(false);
    }
    origin_verdict(flavor, first(&r.headers, "origin").unwrap_or(""))
}

/// CORS in the test's own configs: preflights answered exactly when allowed, actual
/// responses carrying `access-control-allow-origin` exactly for allowed origins.
fn check_cors_world(
    w: &World,
    r: &Req,
    run: &Run,
    resp: &[(String, String)],
) -> Result<(), TestCaseError> {
    let Some((methods, allowed_headers, creds, expose)) = cors_rules(w.flavor) else {
        return Ok(());
    };
    let origin = first(&r.headers, "origin");
    if is_preflight(r) {
        let want = preflight_expect(w.flavor, r);
        match &run.outcome {
            Outcome::Answer(a) => {
                prop_assert_eq!(a.status, 204);
                prop_assert_ne!(want, Some(false), "preflight answered 204: {:?}", r.headers);
                prop_assert_eq!(values(resp, ACAO), vec![origin.unwrap_or("")]);
                prop_assert_eq!(
                    values(resp, "access-control-allow-methods"),
                    vec![methods.join(", ")]
                );
                prop_assert_eq!(
                    values(resp, "access-control-allow-headers"),
                    vec![allowed_headers.join(", ")]
                );
                prop_assert_eq!(values(resp, "access-control-max-age").len(), 1);
                prop_assert_eq!(
                    values(resp, ACAC),
                    if creds { vec!["true"] } else { vec![] }
                );
                prop_assert!(values(resp, "content-type").is_empty(), "a 204 has no body");
            }
            // Path checks come before the preflight.
            Outcome::Reply(rep) if rep.code == ErrorCode::InvalidRequest => {}
            Outcome::Reply(rep) => {
                prop_assert_eq!(rep.code, ErrorCode::CorsRejected, "preflight got {:?}", rep);
                prop_assert_ne!(
                    want,
                    Some(true),
                    "allowed preflight refused: {:?}",
                    r.headers
                );
            }
            Outcome::Forward(_) => prop_assert!(false, "a preflight was forwarded"),
        }
        return Ok(());
    }
    let want = match values(&r.headers, "origin").as_slice() {
        [o] => origin_verdict(w.flavor, o),
        _ => Some(false),
    };
    let acao = first(resp, ACAO);
    match want {
        Some(true) => prop_assert_eq!(acao, origin, "allowed origin without {}", ACAO),
        Some(false) => prop_assert_eq!(acao, None, "refused origin got {}", ACAO),
        None => {}
    }
    if acao.is_some() {
        prop_assert_eq!(
            values(resp, ACAC),
            if creds { vec!["true"] } else { vec![] }
        );
        prop_assert_eq!(
            values(resp, ACEH),
            if expose.is_empty() {
                vec![]
            } else {
                vec![expose]
            }
        );
    }
    Ok(())
}

/// The quota callout in the test's own configs: asked exactly on quota routes, its answer
/// applied as documented, failures following `failure_mode`.
fn check_quota_world(w: &World, run: &Run, resp: &[(String, String)]) -> Result<(), TestCaseError> {
    let cfg = &w.cfg;
    let quota_route = cfg.raw.quota.is_some() && run.ex.policy(cfg).is_some_and(|p| p.quota);
    let Some(q) = &run.quota else {
        prop_assert!(
            !(quota_route && matches!(run.outcome, Outcome::Forward(_))),
            "a quota route forwarded without asking the service"
        );
        return Ok(());
    };
    prop_assert!(quota_route);
    let deny_mode = cfg
        .raw
        .quota
        .as_ref()
        .is_some_and(|c| c.failure_mode == "deny");
    match (&q.expect, &run.outcome) {
        (QuotaExpect::Fail, Outcome::Reply(rep)) if deny_mode => {
            prop_assert_eq!(rep.code, ErrorCode::QuotaUnavailable)
        }
        (QuotaExpect::Fail, Outcome::Forward(_)) if !deny_mode => prop_assert!(
            !run.ex
                .response_headers
                .iter()
                .any(|(k, _)| k.starts_with("x-quota-")),
            "a failed callout added quota headers"
        ),
        (QuotaExpect::Allow, Outcome::Forward(_)) => {
            for (k, v) in q.copied.iter().filter(|(k, _)| k.starts_with("x-quota-")) {
                prop_assert_eq!(values(resp, k), vec![v.as_str()], "{} from the answer", k);
            }
        }
        (
            QuotaExpect::Deny {
                status,
                retry_after,
                reset_at,
            },
            Outcome::Reply(rep),
        ) => {
            prop_assert_eq!(rep.status, *status);
            prop_assert_eq!(
                rep.code,
                if *status == 402 {
                    ErrorCode::QuotaExceeded
                } else {
                    ErrorCode::RateLimitExceeded
                }
            );
            let body: Value = serde_json::from_slice(&rep.body())
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(body["retry_after"].as_u64(), *retry_after, "{}", body);
            prop_assert_eq!(body["reset_at"].as_str(), reset_at.as_deref(), "{}", body);
            let ra = retry_after.map(|s| s.to_string());
            prop_assert_eq!(first(resp, "retry-after"), ra.as_deref());
        }
        (e, o) => prop_assert!(false, "quota answer {:?} ended in {:?}", e, o),
    }
    // The rate-limit headers describe one limit: a local limit's pair is never mixed with
    // the service's.
    if let (Some(p), Some(l)) = (first(resp, "ratelimit-policy"), first(resp, "ratelimit")) {
        let local = |v: &str| {
            let name = v.split(';').next().unwrap_or("");
            w.doc["rate_limits"]
                .as_object()
                .is_some_and(|m| m.keys().any(|k| name == format!("\"{k}\"")))
        };
        prop_assert_eq!(local(p), local(l), "mixed rate-limit headers: {:?}", resp);
        if local(p) {
            prop_assert_eq!(p.split(';').next(), l.split(';').next());
        }
    }
    Ok(())
}

/// `Bearer <token>` as the filter reads it (scheme case-insensitive, spaces trimmed).
fn bearer(auth: &str) -> Option<&str> {
    let (scheme, rest) = auth.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim_matches(' '))
}

fn raw_path(p: &str) -> &str {
    p.split(['?', '#']).next().unwrap_or("")
}

/// The contract specific to the test's own config: what may be admitted, and why.
fn check_world(
    w: &World,
    signed: &Signed,
    r: &Req,
    run: &Run,
    resp: &[(String, String)],
) -> Result<(), TestCaseError> {
    let cfg = &w.cfg;
    check_cors_world(w, r, run, resp)?;
    check_quota_world(w, run, resp)?;
    if matches!(run.outcome, Outcome::Answer(_)) {
        // A preflight answer (checked above) admits nothing: it never reaches the upstream.
        return Ok(());
    }
    let p = raw_path(&r.path);
    let lower = p.to_ascii_lowercase();
    let bad_path = !p.starts_with('/')
        || lower.contains("%2f")
        || lower.contains("%5c")
        || p.contains('\\')
        || p.bytes().any(|b| b < 0x20 || b == 0x7f);
    if bad_path {
        match &run.outcome {
            Outcome::Reply(rep) => prop_assert_eq!(rep.code, ErrorCode::InvalidRequest),
            o => prop_assert!(false, "bad path {:?} got {:?}", p, o),
        }
        return Ok(());
    }
    let route = match run.ex.matched {
        Matched::Route(i) => cfg.routes.get(i).map(|r| r.name.as_str()),
        Matched::Default => Some("default"),
        Matched::None => None,
    };
    let policy = run.ex.policy(cfg);
    let auth = policy.and_then(|p| p.auth.as_ref());
    let mode = auth.map_or("none", |a| a.mode.as_str());
    let webhook = policy.and_then(|p| p.webhook.as_deref());
    let hygiene = policy.and_then(|p| p.hygiene.as_ref());

    if let Outcome::Reply(rep) = &run.outcome {
        // Only the stages a route has can refuse it.
        match rep.code {
            ErrorCode::CorsRejected => prop_assert!(
                cfg.cors.is_some() && is_preflight(r),
                "cors_rejected for a non-preflight or without CORS"
            ),
            ErrorCode::QuotaExceeded | ErrorCode::QuotaUnavailable => {
                prop_assert!(
                    run.quota.is_some(),
                    "{:?} without a quota callout",
                    rep.code
                )
            }
            ErrorCode::InvalidSignature => {
                prop_assert!(webhook.is_some(), "{:?} on route {:?}", rep.code, route)
            }
            ErrorCode::PayloadTooLarge => prop_assert!(
                webhook.is_some() || hygiene.is_some_and(|h| h.max_body_bytes.is_some()),
                "413 on route {:?}",
                route
            ),
            ErrorCode::UnsupportedMediaType => prop_assert!(
                hygiene.is_some_and(|h| !h.content_types.is_empty()),
                "415 on route {:?}",
                route
            ),
            ErrorCode::BackendOverloaded => prop_assert!(
                hygiene.is_some_and(|h| h.ceiling.is_some()),
                "backend_overloaded on route {:?}",
                route
            ),
            ErrorCode::MissingCredentials
            | ErrorCode::InvalidToken
            | ErrorCode::InvalidApiKey
            | ErrorCode::InsufficientScope => {
                prop_assert!(mode != "none", "{:?} on route {:?}", rep.code, route)
            }
            ErrorCode::RateLimitExceeded => prop_assert!(
                policy.is_some_and(|p| !p.rate_limits.is_empty()) || run.quota.is_some(),
                "429 on route {:?}",
                route
            ),
            // Only the native module's panic guard answers it; the pipeline never does.
            ErrorCode::InternalError => prop_assert!(false, "internal_error from the pipeline"),
            _ => {}
        }
        return Ok(());
    }

    // Forwarded: was it allowed to be?
    let id: Option<&Identity> = run.ex.identity.as_ref();
    if mode != "none" {
        let authz: Vec<&str> = r
            .headers
            .iter()
            .filter(|(k, _)| k == "authorization")
            .map(|(_, v)| v.as_str())
            .collect();
        prop_assert!(
            authz.len() <= 1 && !authz.iter().any(|a| a.contains(',')),
            "forwarded with duplicate authorization on {:?}",
            route
        );
        let q = r.path.split_once('?').map(|(_, q)| q).unwrap_or("");
        let q = q.split('#').next().unwrap_or(q);
        prop_assert!(
            !q.split('&').any(|kv| {
                let n = kv.split_once('=').map_or(kv, |(n, _)| n);
                n == "access_token" || n.eq_ignore_ascii_case("access%5Ftoken")
            }),
            "forwarded with a token in the query on {:?}",
            route
        );
        let presented_key = first(&r.headers, "x-api-key");
        let presented_bearer = authz.first().and_then(|a| bearer(a));
        match id {
            None => {
                prop_assert!(
                    mode == "optional",
                    "required route {:?} forwarded anonymously",
                    route
                );
                prop_assert!(
                    presented_key.is_none() && presented_bearer.is_none(),
                    "optional route {:?} ignored a presented credential",
                    route
                );
            }
            Some(id) => match &id.method {
                AuthMethod::ApiKey => {
                    prop_assert_eq!(count(&r.headers, "x-api-key"), 1, "repeated API key");
                    let k = presented_key.map(str::trim);
                    let expect = API_KEYS
                        .iter()
                        .find(|(key, _)| Some(*key) == k)
                        .map(|(_, id)| *id);
                    prop_assert_eq!(Some(id.client.as_str()), expect, "API key identity");
                }
                AuthMethod::Jwt(provider) => {
                    let tok = presented_bearer.unwrap_or("");
                    let Some(f) = signed.tokens.get(tok) else {
                        return Err(TestCaseError::fail(format!(
                            "forwarded with a token the test never signed: {tok:?}"
                        )));
                    };
                    prop_assert_eq!(provider.as_str(), f.provider);
                    prop_assert!(
                        f.header_ok,
                        "admitted a token with a refused header: {}",
                        tok
                    );
                    let claims = f.claims.as_ref().and_then(Value::as_object);
                    let Some(claims) = claims else {
                        return Err(TestCaseError::fail(
                            "admitted a token whose payload is not an object",
                        ));
                    };
                    claims_acceptable(f.provider, claims, r.now_ms / 1000)?;
                    prop_assert_eq!(
                        Some(id.subject.as_str()),
                        claims.get("sub").and_then(Value::as_str)
                    );
                    if provider == "main" {
                        prop_assert!(
                            authz.is_empty() || run_removes(run, "authorization"),
                            "keep_authorization: false must drop authorization"
                        );
                    }
                }
            },
        }
        if let Some(a) = auth {
            if let Some(id) = id {
                for s in &a.scopes_all {
                    prop_assert!(id.scopes.contains(s), "scopes_all {} not held", s);
                }
                if !a.scopes_any.is_empty() {
                    prop_assert!(a.scopes_any.iter().any(|s| id.scopes.contains(s)));
                }
                if !a.roles_any.is_empty() {
                    prop_assert!(a.roles_any.iter().any(|s| id.roles.contains(s)));
                }
            } else {
                prop_assert!(
                    a.scopes_all.is_empty() && a.scopes_any.is_empty() && a.roles_any.is_empty()
                );
            }
        }
    } else {
        prop_assert!(id.is_none(), "an identity on a route that checks none");
    }
    if webhook.is_some() {
        let route = route.unwrap_or("").to_string();
        let key = (
            route,
            signed_part(route_of(run, cfg), &r.headers),
            run.fed.clone(),
        );
        prop_assert!(
            signed.deliveries.contains(&key),
            "webhook route {:?} forwarded a delivery the test did not sign: {:?}",
            key.0,
            key.1
        );
    }
    Ok(())
}

/// The SPEC's claim rules for the test's providers, checked independently of the filter.
fn claims_acceptable(
    provider: &str,
    c: &Map<String, Value>,
    now_s: u64,
) -> Result<(), TestCaseError> {
    let (iss, aud, skew, require_exp) = match provider {
        "main" => (ISS, Some(AUD), 30, true),
        "partner" => (PARTNER_ISS, None, 60, false),
        _ => (IDP_ISS, None, 60, true),
    };
    let date = |name: &str| -> Result<Option<u64>, TestCaseError> {
        match c.get(name) {
            None => Ok(None),
            Some(v) => match (v.as_u64(), v.as_f64()) {
                (Some(u), _) => Ok(Some(u)),
                (None, Some(f)) if (0.0..9.2e18).contains(&f) => Ok(Some(f as u64)),
                _ => Err(TestCaseError::fail(format!("admitted a bad {name}: {v}"))),
            },
        }
    };
    prop_assert_eq!(c.get("iss").and_then(Value::as_str), Some(iss), "iss");
    if let Some(aud) = aud {
        let ok = match c.get("aud") {
            Some(Value::String(a)) => a == aud,
            Some(Value::Array(l)) => {
                l.iter().all(Value::is_string) && l.iter().any(|a| a.as_str() == Some(aud))
            }
            _ => false,
        };
        prop_assert!(ok, "admitted aud {:?}", c.get("aud"));
    }
    match date("exp")? {
        Some(exp) => prop_assert!(
            now_s < exp.saturating_add(skew),
            "admitted an expired token"
        ),
        None => prop_assert!(!require_exp, "admitted a token without exp"),
    }
    if let Some(nbf) = date("nbf")? {
        prop_assert!(
            now_s >= nbf.saturating_sub(skew),
            "admitted a token before nbf"
        );
    }
    if let Some(iat) = date("iat")? {
        prop_assert!(
            iat <= now_s.saturating_add(skew),
            "admitted a token issued in the future"
        );
    }
    Ok(())
}

fn route_of<'c>(run: &Run, cfg: &'c Config) -> &'c str {
    run.ex.route_name(cfg)
}

fn run_removes(run: &Run, name: &str) -> bool {
    matches!(&run.outcome, Outcome::Forward(e) if e.remove.iter().any(|n| n == name))
}

/// What identifies an accepted webhook delivery, to catch one accepted twice.
fn delivery_key(cfg: &Config, r: &Req, run: &Run) -> Delivery {
    let route = route_of(run, cfg);
    (
        route.to_string(),
        signed_part(route, &r.headers),
        run.fed.clone(),
    )
}

// ---------------------------------------------------------------------------------------
// The properties.

#[test]
fn hostile_requests_never_panic_and_never_pass_what_they_should_not() {
    let worlds: Vec<World> = FLAVORS.iter().map(|f| world(*f)).collect();
    let started = Instant::now();
    let mut stats: HashMap<String, u32> = HashMap::new();
    let stats_cell = std::cell::RefCell::new(&mut stats);
    let r = runner(REQUEST_CASES).run(&tapes(600), |data| {
        let mut t = Tape {
            data: &data,
            pos: 0,
        };
        let w = &worlds[t.below(worlds.len())];
        let store = fresh_store(&w.cfg);
        let mut sim = QuotaSim::new(&w.cfg);
        let mut signed = Signed::default();
        let mut accepted = HashSet::new();
        let mut now = match t.below(30) {
            0 => 0,
            1 => u64::MAX,
            2 => u64::MAX / 2,
            _ => T0_MS + t.below(1_000) as u64,
        };
        let mut prev: Option<Req> = None;
        // Mostly a few requests; sometimes a burst of one request repeated, to reach limits.
        let burst = t.chance(12);
        let n = if burst { 8 } else { 1 + t.below(4) };
        for _ in 0..n {
            now = now.saturating_add(t.below(3_000) as u64);
            let r = match prev.take() {
                // Replay the previous request (webhook replays, repeated tokens, limits).
                Some(mut p) if burst || t.chance(30) => {
                    p.now_ms = now;
                    p
                }
                _ => request(&mut t, w, now, &mut signed),
            };
            let run = drive(&w.cfg, &store, &r, &mut t, &mut sim)?;
            match &run.outcome {
                Outcome::Reply(rep) => check_reply(&w.cfg, &r, &run, rep)?,
                Outcome::Forward(e) => check_forward(&w.cfg, &r, &run, e)?,
                Outcome::Answer(_) => {}
            }
            let (resp, upstream) = response_of(&w.cfg, &run, &mut t)?;
            check_response(&w.cfg, &r, &run, &resp, &upstream)?;
            check_world(w, &signed, &r, &run, &resp)?;
            if matches!(run.outcome, Outcome::Forward(_))
                && run.ex.policy(&w.cfg).is_some_and(|p| p.webhook.is_some())
            {
                prop_assert!(
                    accepted.insert(delivery_key(&w.cfg, &r, &run)),
                    "a webhook delivery was accepted twice: {}",
                    r.path
                );
            }
            let hook = run.ex.policy(&w.cfg).and_then(|p| p.webhook.as_ref());
            let label = match (&run.outcome, run.ex.identity.as_ref().map(|i| &i.method)) {
                (Outcome::Forward(_), Some(AuthMethod::Jwt(p))) => format!("forward+jwt:{p}"),
                (Outcome::Forward(_), Some(AuthMethod::ApiKey)) => "forward+api_key".to_string(),
                (Outcome::Forward(_), None) if hook.is_some() => "forward+webhook".to_string(),
                (Outcome::Forward(_), None) => "forward".to_string(),
                (Outcome::Reply(rep), _) => rep.code.as_str().to_string(),
                (Outcome::Answer(a), _) => format!("answer {}", a.status),
            };
            let mut more = Vec::new();
            if let Some(q) = &run.quota {
                more.push(match (&q.expect, q.skipped) {
                    (_, true) => "quota: breaker open".to_string(),
                    (QuotaExpect::Allow, _) => "quota: allow".to_string(),
                    (QuotaExpect::Deny { status, .. }, _) => format!("quota: deny {status}"),
                    (QuotaExpect::Fail, _) => format!(
                        "quota: failed, {}",
                        w.cfg
                            .raw
                            .quota
                            .as_ref()
                            .map_or("", |c| c.failure_mode.as_str())
                    ),
                });
            }
            if w.cfg.cors.is_some() && !is_preflight(&r) && first(&resp, ACAO).is_some() {
                more.push("cors: actual allowed".to_string());
            }
            let mut st = stats_cell.borrow_mut();
            *st.entry(label).or_default() += 1;
            for m in more {
                *st.entry(m).or_default() += 1;
            }
            prev = Some(r);
        }
        Ok(())
    });
    let mut seen: Vec<_> = stats.iter().collect();
    seen.sort();
    eprintln!(
        "hostile requests: {REQUEST_CASES} cases in {:.1?}; outcomes: {seen:?}",
        started.elapsed()
    );
    report(r);
    // The generators must reach the interesting outcomes, or the test proves little.
    for must in [
        "forward",
        "forward+jwt:main",
        "forward+jwt:partner",
        "forward+jwt:idp",
        "forward+api_key",
        "forward+webhook",
        "invalid_request",
        "missing_credentials",
        "invalid_token",
        "invalid_api_key",
        "invalid_signature",
        "insufficient_scope",
        "payload_too_large",
        "unsupported_media_type",
        "backend_overloaded",
        "rate_limit_exceeded",
        "answer 204",
        "cors_rejected",
        "cors: actual allowed",
        "quota_exceeded",
        "quota_unavailable",
        "quota: allow",
        "quota: deny 402",
        "quota: deny 429",
        "quota: failed, allow",
        "quota: failed, deny",
        "quota: breaker open",
    ] {
        assert!(stats.contains_key(must), "no case reached {must}: {seen:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Config mutations.

/// Every JSON path in the document, `[]` for array indices.
fn paths(v: &Value, here: &mut Vec<PathPart>, out: &mut Vec<Vec<PathPart>>) {
    out.push(here.clone());
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                here.push(PathPart::Key(k.clone()));
                paths(c, here, out);
                here.pop();
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                here.push(PathPart::Index(i));
                paths(c, here, out);
                here.pop();
            }
        }
        _ => {}
    }
}

#[derive(Clone, Debug)]
enum PathPart {
    Key(String),
    Index(usize),
}

fn at<'a>(v: &'a mut Value, path: &[PathPart]) -> Option<&'a mut Value> {
    let mut cur = v;
    for p in path {
        cur = match p {
            PathPart::Key(k) => cur.get_mut(k.as_str())?,
            PathPart::Index(i) => cur.get_mut(*i)?,
        };
    }
    Some(cur)
}

fn hostile_value(t: &mut Tape) -> Value {
    match t.below(22) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(0),
        3 => json!(-1),
        4 => json!(u64::MAX),
        5 => json!(i64::MIN),
        6 => json!(1e300),
        7 => json!(0.5),
        8 => json!(u32::MAX),
        9 => json!(4097),
        10 => json!(""),
        11 => json!("unlimited"),
        12 => json!([]),
        13 => json!([null]),
        14 => json!({}),
        15 => json!({"unknown_field": 1}),
        16 => json!({"env": "MISSING_VAR"}),
        17 => json!(t
            .pick(&[
                "X-Upper",
                "a b",
                "x\r\n",
                "/a/../b",
                "/a%2Fb",
                "/{}",
                "none",
                "HS256",
                "RS256",
                "whsec_",
                "whpk_AAAA",
                "whsk_x",
                "header:",
                "claim:",
                "jwt:",
                "jwt:nope",
                "api_key",
                "required",
                "optional",
                "deny",
                "allow",
                "*",
                "null",
                "{id}",
                "/x/{id}/{id}",
                "https://*.example.com",
                "\u{0}",
            ])
            .to_string()),
        18 => json!("z".repeat(10_000)),
        19 => {
            // Nested past serde_json's recursion limit.
            let text = format!("{}0{}", "[".repeat(200), "]".repeat(200));
            serde_json::from_str(&text).unwrap_or_else(|_| json!([[[[0]]]]))
        }
        20 => json!([1, "two", {"three": 3}]),
        _ => json!(t.next()),
    }
}

fn mutate(t: &mut Tape, doc: &mut Value) -> Vec<PathPart> {
    let mut all = Vec::new();
    paths(doc, &mut Vec::new(), &mut all);
    let target = all[t.below(all.len())].clone();
    let Some(node) = at(doc, &target) else {
        return target;
    };
    match t.below(6) {
        0 | 1 => *node = hostile_value(t),
        2 => {
            // Drop a member (a required field goes missing).
            if let Value::Object(m) = node {
                if let Some(k) = m.keys().nth(t.below(m.len().max(1))).cloned() {
                    m.remove(&k);
                }
            }
        }
        3 => {
            // A typo'd member name must be an error, not silently ignored.
            if let Value::Object(m) = node {
                if let Some(k) = m.keys().nth(t.below(m.len().max(1))).cloned() {
                    if let Some(v) = m.remove(&k) {
                        m.insert(format!("{k}_"), v);
                    }
                }
            } else {
                *node = hostile_value(t);
            }
        }
        4 => {
            // Duplicate an array element (a route, key or secret listed twice).
            if let Value::Array(a) = node {
                if let Some(x) = a.get(t.below(a.len().max(1))).cloned() {
                    a.push(x);
                }
            } else {
                *node = hostile_value(t);
            }
        }
        _ => {
            if let Value::Object(m) = node {
                m.insert(weird_key(t), hostile_value(t));
            } else if let Value::Array(a) = node {
                a.push(hostile_value(t));
            } else {
                *node = hostile_value(t);
            }
        }
    }
    target
}

fn weird_key(t: &mut Tape) -> String {
    t.pick(&[
        "unknown",
        "",
        "routes",
        "\u{0}",
        "a b",
        "default",
        "anonymous",
        "x-api-key",
    ])
    .to_string()
}

#[test]
fn mutated_configs_are_errors_with_a_path_or_valid_and_safe() {
    let worlds: Vec<World> = FLAVORS.iter().map(|f| world(*f)).collect();
    let started = Instant::now();
    let mut outcomes = [0u32; 3]; // ok, error with path, byte-level garbage
    let counts = std::cell::RefCell::new(&mut outcomes);
    let r = runner(CONFIG_CASES).run(&tapes(200), |data| {
        let mut t = Tape {
            data: &data,
            pos: 0,
        };
        let w = &worlds[t.below(worlds.len())];
        let mut doc = w.doc.clone();
        let mut targets = Vec::new();
        for _ in 0..=t.below(3) {
            targets.push(mutate(&mut t, &mut doc));
        }
        let mut bytes = serde_json::to_vec(&doc).expect("serializable");
        let byte_level = t.chance(15);
        if byte_level {
            for _ in 0..=t.below(4) {
                let i = t.below(bytes.len());
                match t.below(3) {
                    0 => bytes[i] = t.next() as u8,
                    1 => {
                        bytes.insert(i, t.next() as u8);
                    }
                    _ => {
                        bytes.truncate(i);
                    }
                }
            }
        }
        let env = |name: &str| (name == "SET_VAR").then(|| "value".to_string());
        match config::parse(&bytes, &env) {
            Err(ConfigError { path, message }) => {
                prop_assert!(!message.is_empty());
                let e = ConfigError {
                    path: path.clone(),
                    message,
                };
                prop_assert!(!e.to_string().is_empty());
                // A problem inside the document is located by its JSON path.
                if !byte_level && targets.iter().all(|p| !p.is_empty()) {
                    prop_assert!(
                        !path.is_empty() && path != ".",
                        "error without a JSON path for a mutation at {:?}: {}",
                        targets,
                        e
                    );
                }
                counts.borrow_mut()[if byte_level { 2 } else { 1 }] += 1;
            }
            Ok((cfg, _)) => {
                counts.borrow_mut()[0] += 1;
                // Valid but odd: requests through it still obey the generic contract.
                let store = fresh_store(&cfg);
                let mut sim = QuotaSim::new(&cfg);
                let mut signed = Signed::default();
                for i in 0..3 {
                    let r = request(&mut t, w, T0_MS + i * 1000, &mut signed);
                    let run = drive(&cfg, &store, &r, &mut t, &mut sim)?;
                    match &run.outcome {
                        Outcome::Reply(rep) => check_reply(&cfg, &r, &run, rep)?,
                        Outcome::Forward(e) => check_forward(&cfg, &r, &run, e)?,
                        Outcome::Answer(_) => {}
                    }
                    let (resp, upstream) = response_of(&cfg, &run, &mut t)?;
                    check_response(&cfg, &r, &run, &resp, &upstream)?;
                }
            }
        }
        Ok(())
    });
    eprintln!(
        "mutated configs: {CONFIG_CASES} cases in {:.1?}; valid {}, errors with a path {}, byte-level {}",
        started.elapsed(),
        outcomes[0],
        outcomes[1],
        outcomes[2]
    );
    report(r);
    assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
}
