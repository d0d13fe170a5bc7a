//! Fuzz target logic (docs/FUZZING.md): one function per parser or decision that reads
//! outside input, each asserting invariants with an independent oracle, not only "no panic".
//! The libFuzzer targets in `fuzz/` call these, and `tests/fuzz_replay.rs` feeds them the
//! committed corpora on every `cargo test`, so both run exactly the same checks.
//!
//! Inputs are raw bytes; targets that need several values split them on `\n` (text) or read a
//! few leading bytes as choices, so seeds stay readable and libFuzzer can still mutate them.

use crate::auth::jwks::{self, Alg, AlgSet, KeySet, Source};
use crate::auth::jwt::{self, JwtError, Rules};
use crate::config::{Secret, WebhookConfig};
use crate::routes::{self, Matcher, PathMatch};
use crate::store::MemoryStore;
use crate::webhook::WebhookError;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::OnceLock;

/// A target: takes any bytes, panics when an invariant breaks.
pub type Target = fn(&[u8]);

/// Every target, by the name its `fuzz/fuzz_targets/<name>.rs` and `fuzz/corpus/<name>/` use.
pub const TARGETS: [(&str, Target); 10] = [
    ("config", config),
    ("jwt", jwt),
    ("jwks", jwks),
    ("routes", routes),
    ("cors", cors),
    ("client_ip", client_ip),
    ("webhook", webhook),
    ("quota_answer", quota_answer),
    ("lease_answer", lease_answer),
    ("json_body", json_body),
];

fn text(data: &[u8]) -> std::borrow::Cow<'_, str> {
    // The hosts hand the filter UTF-8-lossy header values, so this is what it can be given.
    String::from_utf8_lossy(data)
}

fn hmac256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

// ------------------------------------------------------------------------------ config

/// The filter config: JSON → parse → validate → compile. An error names a path and says
/// something; an accepted config explains itself, matches only on normalized paths, and
/// parses the same way twice.
pub fn config(data: &[u8]) {
    let env = |name: &str| {
        (name == "FUZZ_SECRET").then(|| "fuzz-secret-value-0123456789abcdef".to_string())
    };
    match crate::config::parse(data, &env) {
        Err(e) => {
            assert!(!e.message.is_empty(), "config error without a message");
            let _ = e.to_string();
        }
        Ok((cfg, warnings)) => {
            for w in &warnings {
                assert!(!w.message.is_empty(), "empty warning {w:?}");
            }
            for r in &cfg.routes {
                match &r.matcher.path {
                    PathMatch::Exact(p) | PathMatch::Prefix(p) => {
                        let n = routes::normalize(p).expect("a configured path normalizes");
                        assert_eq!(n, p.as_str(), "configured path is not in normal form");
                    }
                    PathMatch::Template(_) | PathMatch::RouteName(_) => {}
                }
            }
            let _ = crate::explain::explain(&cfg);
            let again = crate::config::parse(data, &env).expect("parse is deterministic");
            assert_eq!(again.0.routes.len(), cfg.routes.len());
        }
    }
}

// ------------------------------------------------------------------------------ JWT

const NOW_S: u64 = 1_700_000_000;
const HS_SECRET: &[u8] = b"fuzz-hmac-secret-of-32-bytes-ok!";
const ED_SEED: [u8; 32] = [7; 32];
const ISSUER: &str = "https://issuer.fuzz";

struct JwtFixture {
    keys: KeySet,
    rules: Rules,
    ed: ed25519_compact::KeyPair,
}

fn jwt_fixture() -> &'static JwtFixture {
    static F: OnceLock<JwtFixture> = OnceLock::new();
    F.get_or_init(|| {
        let ed = ed25519_compact::KeyPair::from_seed(ed25519_compact::Seed::new(ED_SEED));
        let doc = serde_json::json!({"keys": [
            {"kty": "oct", "kid": "hs", "alg": "HS256", "k": URL_SAFE_NO_PAD.encode(HS_SECRET)},
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": URL_SAFE_NO_PAD.encode(*ed.pk)},
        ]});
        let algorithms = AlgSet::of(&[Alg::HS256, Alg::EdDSA]);
        let keys = jwks::parse(&doc, algorithms, Source::Local(&|_| None))
            .expect("the fixed key set parses")
            .keys;
        let rules = Rules {
            issuer: Some(ISSUER.into()),
            audiences: vec!["api".into()],
            algorithms,
            clock_skew_s: 60,
            require_exp: true,
            max_token_bytes: 8192,
        };
        JwtFixture { keys, rules, ed }
    })
}

/// What an independent verifier says about a token's signature under the fixed keys.
fn jwt_signature_valid(token: &str, f: &JwtFixture) -> bool {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let Some(header) = URL_SAFE_NO_PAD
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
    else {
        return false;
    };
    let Ok(sig) = URL_SAFE_NO_PAD.decode(s) else {
        return false;
    };
    let input = format!("{h}.{p}");
    match header.get("alg").and_then(Value::as_str) {
        Some("HS256") => hmac256(HS_SECRET, &[input.as_bytes()])[..] == sig[..],
        Some("EdDSA") => ed25519_compact::Signature::from_slice(&sig)
            .is_ok_and(|sig| f.ed.pk.verify(input.as_bytes(), &sig).is_ok()),
        _ => false,
    }
}

/// Whether independent claim checks accept a payload (issuer, audience, time, subject).
fn jwt_claims_valid(claims: &Value) -> bool {
    let date = |n: &str| claims.get(n).and_then(Value::as_f64);
    let skew = 60.0;
    let now = NOW_S as f64;
    claims.get("iss").and_then(Value::as_str) == Some(ISSUER)
        && match claims.get("aud") {
            Some(Value::String(a)) => a == "api",
            Some(Value::Array(l)) => l.iter().any(|a| a.as_str() == Some("api")),
            _ => false,
        }
        && date("exp").is_some_and(|e| now < e.trunc() + skew)
        && date("nbf").is_none_or(|n| now >= n.trunc() - skew)
        && date("iat").is_none_or(|i| i.trunc() <= now + skew)
}

/// JWT decode + claim checks + signature verification against a fixed key set (HS256 and
/// EdDSA). Byte 0 picks the mode: a raw token (accepted only if an independent check of the
/// signature passes), or claims the target signs itself (a good signature is never refused
/// as bad, an accepted token has valid claims, and a flipped signature bit is refused).
pub fn jwt(data: &[u8]) {
    let f = jwt_fixture();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let token = text(rest);
        if jwt::verify(&token, &f.rules, &f.keys, NOW_S).is_ok() {
            assert!(
                jwt_signature_valid(&token, f),
                "token accepted without a valid signature"
            );
        }
        let _ = jwt::peek_issuer(&token);
        return;
    }
    // Signed mode: byte 1 picks alg and kid, byte 2 which signature bit to flip.
    let (Some(&choice), Some(&flip)) = (rest.first(), rest.get(1)) else {
        return;
    };
    let payload = &rest[2..];
    let ed = choice & 1 == 1;
    let kid = match (choice >> 1) % 3 {
        0 => None,
        1 => Some(if ed { "ed" } else { "hs" }),
        _ => Some("other"),
    };
    let mut header = serde_json::json!({"alg": if ed { "EdDSA" } else { "HS256" }});
    if let Some(k) = kid {
        header["kid"] = k.into();
    }
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let sig: Vec<u8> = if ed {
        f.ed.sk.sign(input.as_bytes(), None).to_vec()
    } else {
        hmac256(HS_SECRET, &[input.as_bytes()]).to_vec()
    };
    let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(&sig));
    match jwt::verify(&token, &f.rules, &f.keys, NOW_S) {
        Ok(t) => {
            assert_ne!(kid, Some("other"), "accepted with an unknown kid");
            let claims: Value = serde_json::from_slice(payload).expect("accepted claims are JSON");
            assert!(
                jwt_claims_valid(&claims),
                "accepted invalid claims: {claims}"
            );
            assert_eq!(t.iss.as_deref(), Some(ISSUER));
        }
        Err(JwtError::UnknownKid) => assert_eq!(kid, Some("other"), "own kid unknown"),
        Err(e @ (JwtError::BadSignature | JwtError::NoKeyForAlg)) => {
            panic!("a token signed with the fixed key was refused: {e:?}")
        }
        Err(_) => {}
    }
    let mut bad = sig.clone();
    let bit = usize::from(flip) % (bad.len() * 8);
    bad[bit / 8] ^= 1 << (bit % 8);
    let forged = format!("{input}.{}", URL_SAFE_NO_PAD.encode(&bad));
    assert!(
        jwt::verify(&forged, &f.rules, &f.keys, NOW_S).is_err(),
        "a token with a flipped signature bit was accepted"
    );
}

// ------------------------------------------------------------------------------ JWKS

/// A fetched JWKS document (`Source::Remote`): unusable keys are skipped, never fatal unless
/// nothing is left; every kept key verifies only algorithms that were allowed; the same
/// document gives the same fingerprint. Byte 0 is the allowed-algorithm mask.
pub fn jwks(data: &[u8]) {
    let Some((&mask, rest)) = data.split_first() else {
        return;
    };
    let Ok(doc) = serde_json::from_slice::<Value>(rest) else {
        return;
    };
    // Two bytes of mask would be nicer; one covers the common families (HS, RS, PS, ES, Ed).
    let allowed = if mask == 0xff {
        AlgSet::of(&Alg::ALL)
    } else {
        AlgSet::of(
            &Alg::ALL
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << (i % 8)) != 0)
                .map(|(_, a)| *a)
                .collect::<Vec<_>>(),
        )
    };
    let listed = doc.get("keys").and_then(Value::as_array).map(Vec::len);
    match jwks::parse(&doc, allowed, Source::Remote) {
        Err(_) => {}
        Ok(parsed) => {
            let n = listed.expect("an accepted JWKS has a keys array");
            assert!(n <= jwks::MAX_KEYS);
            assert_eq!(
                parsed.keys.len() + parsed.skipped.len(),
                n,
                "keys lost or invented"
            );
            assert!(
                n == 0 || !parsed.keys.is_empty(),
                "accepted with no usable key"
            );
            for k in parsed.keys.keys() {
                assert!(!k.algs.is_empty(), "a key with no algorithm");
                assert_eq!(
                    k.algs.intersect(allowed),
                    k.algs,
                    "a key verifies a disallowed alg"
                );
            }
            for (i, k) in parsed.keys.keys().iter().take(4).enumerate() {
                for alg in Alg::ALL {
                    // Garbage never verifies, and a key never verifies outside its algs.
                    assert!(!k.verify(alg, b"fuzz.input", &[i as u8; 64]));
                }
            }
            let again = jwks::parse(&doc, allowed, Source::Remote).expect("deterministic");
            assert_eq!(again.keys.fingerprint(), parsed.keys.fingerprint());
        }
    }
}

// ------------------------------------------------------------------------------ routes

/// Path normalization and route matching. A normalized path is absolute, has no empty, `.`
/// or `..` segment, no trailing `/`, no query, no `\`, `;` or encoded separator, and is a
/// fixed point; a match agrees with an independent segment comparison. Lines: the path,
/// then an optional template or prefix to match it against.
pub fn routes(data: &[u8]) {
    let s = text(data);
    let mut lines = s.splitn(3, '\n');
    let raw = lines.next().unwrap_or("");
    let rule = lines.next();
    let Ok(n) = routes::normalize(raw) else {
        return;
    };
    let n: &str = &n;
    assert!(n.starts_with('/'), "not absolute: {n:?}");
    assert!(!n.contains("//"), "empty segment: {n:?}");
    assert!(n == "/" || !n.ends_with('/'), "trailing slash: {n:?}");
    assert!(
        !n.contains(['?', '#', '\\', ';']),
        "forbidden character: {n:?}"
    );
    for seg in n.split('/').skip(1) {
        assert!(seg != "." && seg != "..", "dot segment in {n:?}");
    }
    let upper = n.to_ascii_uppercase();
    for enc in ["%2F", "%5C", "%25", "%3B", "%2E"] {
        assert!(!upper.contains(enc), "{enc} survived in {n:?}");
    }
    match routes::normalize(n) {
        Ok(again) => assert_eq!(again, n, "normalize is not idempotent"),
        Err(e) => panic!("a normalized path is refused: {n:?}: {e}"),
    }
    assert!(routes::check_config_path(n).is_ok());

    let Some(rule) = rule else {
        return;
    };
    let segs: Vec<&str> = n.split('/').skip(1).collect();
    if let Ok(template) = routes::compile_template(rule) {
        let m = Matcher {
            methods: None,
            path: PathMatch::Template(template),
        };
        let want: Vec<&str> = rule.split('/').skip(1).collect();
        let oracle = want.len() == segs.len()
            && want.iter().zip(&segs).all(|(w, s)| {
                if w.starts_with('{') && w.ends_with('}') && w.len() > 2 {
                    !s.is_empty()
                } else {
                    w == s
                }
            });
        assert_eq!(
            m.matches("GET", n, None),
            oracle,
            "template {rule:?} on {n:?}"
        );
    }
    if let Ok(p) = routes::check_config_path(rule) {
        let m = Matcher {
            methods: Some(vec!["GET".into()]),
            path: PathMatch::Prefix(p.clone()),
        };
        let oracle = p == "/" || n == p || n.starts_with(&format!("{p}/"));
        assert_eq!(m.matches("get", n, None), oracle, "prefix {p:?} on {n:?}");
        assert!(!m.matches("POST", n, None), "method ignored");
    }
}

// ------------------------------------------------------------------------------ CORS

/// An origin as an independent, lenient reader sees it: (scheme, host, effective port).
#[derive(PartialEq, Debug)]
enum OracleHost {
    Name(String),
    V6(Ipv6Addr),
}

fn oracle_origin(s: &str) -> Option<(String, OracleHost, Option<u16>)> {
    let (scheme, rest) = s.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let (host, port) = if let Some(after) = rest.strip_prefix('[') {
        let (inside, tail) = after.split_once(']')?;
        (OracleHost::V6(inside.parse().ok()?), tail.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (OracleHost::Name(h.to_ascii_lowercase()), Some(p)),
            None => (OracleHost::Name(rest.to_ascii_lowercase()), None),
        }
    };
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok()?),
        None => match scheme.as_str() {
            "https" | "wss" => Some(443),
            "http" | "ws" => Some(80),
            _ => None,
        },
    };
    Some((scheme, host, port))
}

/// Origin parsing and CORS decisions. Lines: the request origin, the requested method, the
/// requested headers, then config entries (`*`-patterns go to `allow_origin_patterns`). An
/// allowed origin is always one the config names (exactly, modulo case and default port) or
/// matches with one whole label under a pattern; a preflight is allowed only for an allowed
/// origin, method and headers, and echoes the origin, never `*`.
pub fn cors(data: &[u8]) {
    let s = text(data);
    let mut lines = s.split('\n');
    let origin = lines.next().unwrap_or("");
    let method = lines.next().unwrap_or("GET");
    let req_headers = lines.next().filter(|h| !h.is_empty());
    let mut c = crate::config::CorsConfig {
        allow_origins: Vec::new(),
        allow_origin_patterns: Vec::new(),
        allow_methods: vec!["GET".into(), "POST".into(), "PUT".into()],
        allow_headers: vec!["content-type".into(), "x-api-key".into()],
        expose_headers: vec![],
        allow_credentials: false,
        max_age_s: None,
    };
    for l in lines.take(16) {
        match l.strip_prefix("credentials") {
            Some(_) => c.allow_credentials = true,
            None if l.contains('*') && l != "*" => c.allow_origin_patterns.push(l.to_string()),
            None => c.allow_origins.push(l.to_string()),
        }
    }
    let Ok(policy) = crate::cors::compile(&c, &mut Vec::new()) else {
        return;
    };
    let allowed = policy.origin_allowed(origin);
    if allowed && !c.allow_origins.iter().any(|o| o == "*") {
        let o = oracle_origin(origin).expect("an allowed origin is readable");
        let exact = c
            .allow_origins
            .iter()
            .filter_map(|a| oracle_origin(a))
            .any(|a| a == o);
        let pattern = c.allow_origin_patterns.iter().any(|p| {
            let Some((scheme, rest)) = p.split_once("://") else {
                return false;
            };
            let Some(base) = rest.strip_prefix("*.") else {
                return false;
            };
            let Some((ps, OracleHost::Name(suffix), pp)) =
                oracle_origin(&format!("{scheme}://{base}"))
            else {
                return false;
            };
            match &o {
                (s, OracleHost::Name(h), port) => {
                    *s == ps
                        && *port == pp
                        && h.split_once('.')
                            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix)
                }
                _ => false,
            }
        });
        assert!(
            exact || pattern,
            "origin {origin:?} allowed outside the config {c:?}"
        );
    }
    if allowed {
        assert!(!c.allow_origins.is_empty() || !c.allow_origin_patterns.is_empty());
    }
    let actual = crate::cors::actual_response_headers(&policy, Some(origin));
    assert_eq!(actual.is_empty(), !allowed);
    for (name, value) in actual.iter() {
        if name == crate::cors::ALLOW_ORIGIN {
            assert_eq!(value, origin, "allow-origin does not echo the origin");
        }
    }
    match crate::cors::preflight(&policy, origin, method, req_headers) {
        crate::cors::Preflight::Allowed(h) => {
            assert!(allowed, "preflight allowed for a refused origin");
            assert!(c
                .allow_methods
                .iter()
                .any(|m| m == method.trim_matches([' ', '\t'])));
            if let Some(list) = req_headers {
                for h in list.split(',').map(|h| h.trim_matches([' ', '\t'])) {
                    assert!(
                        h.is_empty() || c.allow_headers.iter().any(|a| a.eq_ignore_ascii_case(h)),
                        "header {h:?} allowed"
                    );
                }
            }
            let mut saw = false;
            for (name, value) in h.iter() {
                if name == crate::cors::ALLOW_ORIGIN {
                    assert_eq!(value, origin);
                    assert_ne!(value, "*");
                    saw = true;
                }
                if name == crate::cors::ALLOW_CREDENTIALS {
                    assert!(c.allow_credentials);
                }
            }
            assert!(saw, "an allowed preflight without allow-origin");
        }
        crate::cors::Preflight::Rejected(_) => {}
    }
}

// ------------------------------------------------------------------------------ client IP

/// `x-forwarded-for` walking. Byte 0: trusted hops (low 3 bits; 7 = a huge count), whether
/// Envoy appended, and whether the peer is a well-formed address; then `peer\nxff`. The
/// answer equals an independent right-to-left walk, and with a well-formed peer it is always
/// an IP address.
pub fn client_ip(data: &[u8]) {
    let Some((&b, rest)) = data.split_first() else {
        return;
    };
    let hops = match b & 7 {
        7 => u32::MAX,
        n => u32::from(n),
    };
    let appended = b & 8 != 0;
    let s = text(rest);
    let (peer_raw, xff) = match s.split_once('\n') {
        Some((p, x)) => (p, Some(x)),
        None => (s.as_ref(), None),
    };
    let valid_peer = b & 16 != 0;
    let peer: String = if valid_peer {
        // A peer as Envoy formats source.address: ip:port, [v6]:port.
        let h = peer_raw
            .bytes()
            .fold(0u64, |a, c| a.wrapping_mul(31).wrapping_add(c.into()));
        if h & 1 == 0 {
            format!(
                "{}:{}",
                std::net::Ipv4Addr::from((h >> 8) as u32),
                h % 65536
            )
        } else {
            format!(
                "[{}]:{}",
                Ipv6Addr::from(u128::from(h) << 64 | u128::from(h)),
                h % 65536
            )
        }
    } else {
        peer_raw.to_string()
    };
    let got = crate::client_ip::resolve(hops, appended, xff, Some(&peer));

    let peer_ip = Some(crate::client_ip::strip_port(&peer)).filter(|p| !p.is_empty());
    let want = if hops == 0 {
        peer_ip
    } else {
        match xff {
            None => peer_ip,
            Some(x) => {
                let mut entries: Vec<&str> = x.split(',').map(str::trim).collect();
                if appended {
                    entries.pop();
                }
                let idx = (hops - 1) as usize;
                match entries.len().checked_sub(idx + 1).map(|i| entries[i]) {
                    Some(e) if e.parse::<IpAddr>().is_ok() => Some(e),
                    _ => peer_ip,
                }
            }
        }
    };
    assert_eq!(got, want, "client ip");
    if valid_peer {
        let ip = got.expect("a well-formed peer always gives an address");
        assert!(ip.parse::<IpAddr>().is_ok(), "{ip:?} is not an IP address");
    }
}

// ------------------------------------------------------------------------------ webhooks

const WEBHOOK_NOW_S: u64 = 1_700_000_000;
const TOLERANCE_S: u64 = 300;

fn scheme_headers(scheme: &str) -> &'static [&'static str] {
    match scheme {
        "github" => &["x-hub-signature-256", "x-github-delivery"],
        "stripe" => &["stripe-signature"],
        "standard" => &["webhook-id", "webhook-timestamp", "webhook-signature"],
        _ => &["x-slack-request-timestamp", "x-slack-signature"],
    }
}

/// The key material of a webhook under test: the configured secret string and what the
/// signatures are computed with.
struct WebhookKey {
    secret: String,
    hmac_key: Vec<u8>,
    ed: Option<ed25519_compact::KeyPair>,
}

fn webhook_key(scheme: &str, key: &[u8], ed: bool) -> WebhookKey {
    match scheme {
        "standard" if ed => {
            let mut seed = [0u8; 32];
            for (i, b) in key.iter().enumerate() {
                seed[i % 32] ^= b;
            }
            // ed25519-compact refuses (panics on) an all-zero seed; any other seed is a key.
            seed[31] |= 1;
            let kp = ed25519_compact::KeyPair::from_seed(ed25519_compact::Seed::new(seed));
            WebhookKey {
                secret: format!("whpk_{}", STANDARD.encode(*kp.pk)),
                hmac_key: Vec::new(),
                ed: Some(kp),
            }
        }
        "standard" => {
            let k = if key.is_empty() {
                vec![0]
            } else {
                key.to_vec()
            };
            WebhookKey {
                secret: format!("whsec_{}", STANDARD.encode(&k)),
                hmac_key: k,
                ed: None,
            }
        }
        _ => {
            let secret = format!("s_{}", hex::encode(key));
            WebhookKey {
                hmac_key: secret.clone().into_bytes(),
                secret,
                ed: None,
            }
        }
    }
}

/// Whether an independent reading of the headers finds a correct signature over `body`.
fn webhook_oracle(scheme: &str, k: &WebhookKey, values: &[Option<&str>], body: &[u8]) -> bool {
    let v = |i: usize| values.get(i).copied().flatten().unwrap_or("");
    match scheme {
        "github" => v(0)
            .strip_prefix("sha256=")
            .is_some_and(|h| h.eq_ignore_ascii_case(&hex::encode(hmac256(&k.hmac_key, &[body])))),
        "slack" => {
            let mac = hmac256(&k.hmac_key, &[b"v0:", v(0).as_bytes(), b":", body]);
            v(1).strip_prefix("v0=")
                .is_some_and(|h| h.eq_ignore_ascii_case(&hex::encode(mac)))
        }
        "stripe" => {
            let Some(t) = v(0).split(',').find_map(|e| e.strip_prefix("t=")) else {
                return false;
            };
            let mac = hex::encode(hmac256(&k.hmac_key, &[t.as_bytes(), b".", body]));
            v(0).split(',')
                .filter_map(|e| e.strip_prefix("v1="))
                .any(|h| h.eq_ignore_ascii_case(&mac))
        }
        _ => {
            let signed = [v(0).as_bytes(), b".", v(1).as_bytes(), b".", body].concat();
            v(2).split(' ').any(|e| match e.split_once(',') {
                Some(("v1", b)) => {
                    !k.hmac_key.is_empty() && b == STANDARD.encode(hmac256(&k.hmac_key, &[&signed]))
                }
                Some(("v1a", b)) => k.ed.as_ref().is_some_and(|kp| {
                    STANDARD
                        .decode(b)
                        .ok()
                        .and_then(|s| ed25519_compact::Signature::from_slice(&s).ok())
                        .is_some_and(|s| kp.pk.verify(&signed, &s).is_ok())
                }),
                _ => false,
            })
        }
    }
}

/// Header values a correct sender would send for `body` at `ts`.
fn webhook_sign(scheme: &str, k: &WebhookKey, ts: u64, id: &str, body: &[u8]) -> Vec<String> {
    let t = ts.to_string();
    match scheme {
        "github" => vec![
            format!("sha256={}", hex::encode(hmac256(&k.hmac_key, &[body]))),
            id.into(),
        ],
        "slack" => {
            let mac = hmac256(&k.hmac_key, &[b"v0:", t.as_bytes(), b":", body]);
            vec![t, format!("v0={}", hex::encode(mac))]
        }
        "stripe" => {
            let mac = hmac256(&k.hmac_key, &[t.as_bytes(), b".", body]);
            vec![format!("t={t},v1={}", hex::encode(mac))]
        }
        _ => {
            let signed = [id.as_bytes(), b".", t.as_bytes(), b".", body].concat();
            let sig = match &k.ed {
                Some(kp) => format!("v1a,{}", STANDARD.encode(*kp.sk.sign(&signed, None))),
                None => format!("v1,{}", STANDARD.encode(hmac256(&k.hmac_key, &[&signed]))),
            };
            vec![id.into(), t, sig]
        }
    }
}

fn run_webhook(
    w: &crate::webhook::Webhook,
    headers: &[(String, String)],
    body: &[u8],
    store: &MemoryStore,
) -> Result<(), WebhookError> {
    let now_ms = WEBHOOK_NOW_S * 1000;
    let mut v = w.begin(headers, now_ms)?;
    // Two chunks: streaming must not change the verdict.
    let (a, b) = body.split_at(body.len() / 2);
    v.update(a)?;
    v.update(b)?;
    v.finish(now_ms, store).map(|_| ())
}

/// Each webhook scheme's headers and body. Byte 0: scheme and key kind; byte 1: key length;
/// then the key, then `\n`-separated header values and the body. A delivery is accepted only
/// if an independent MAC (or Ed25519) check of the headers passes; a delivery signed by the
/// target is accepted once, refused as a replay the second time, and refused with one
/// signature character or one body byte changed.
pub fn webhook(data: &[u8]) {
    let (Some(&sel), Some(&klen)) = (data.first(), data.get(1)) else {
        return;
    };
    let scheme = ["github", "stripe", "standard", "slack"][usize::from(sel % 4)];
    let ed = sel & 4 != 0;
    let rest = &data[2..];
    let klen = usize::from(klen % 48).min(rest.len());
    let (key, rest) = rest.split_at(klen);
    let k = webhook_key(scheme, key, ed);
    let cfg = WebhookConfig {
        scheme: scheme.into(),
        secrets: vec![Secret::Literal(k.secret.clone())],
        tolerance_s: TOLERANCE_S,
        max_body_bytes: 4096,
        replay_capacity: 64,
    };
    let (hooks, _) = crate::webhook::compile(&BTreeMap::from([("w".to_string(), cfg)]), &|_| None)
        .expect("a generated webhook config compiles");
    let w = hooks.get("w").expect("compiled");
    let names = scheme_headers(scheme);

    // Hostile: header values and body straight from the input.
    let mut parts = rest.splitn(names.len() + 1, |&b| b == b'\n');
    let values: Vec<Option<String>> = names
        .iter()
        .map(|_| parts.next().map(|v| text(v).into_owned()))
        .collect();
    let body = parts.next().unwrap_or(b"");
    let headers: Vec<(String, String)> = names
        .iter()
        .zip(&values)
        .filter_map(|(n, v)| v.as_ref().map(|v| (n.to_string(), v.clone())))
        .collect();
    if run_webhook(w, &headers, body, &MemoryStore::new()).is_ok() {
        let refs: Vec<Option<&str>> = values.iter().map(|v| v.as_deref()).collect();
        assert!(
            webhook_oracle(scheme, &k, &refs, body),
            "{scheme}: accepted without a valid MAC"
        );
    }

    // Signed by the target: valid, then replayed, then mutated.
    if body.len() > 4096 {
        return;
    }
    let ts = WEBHOOK_NOW_S - u64::from(sel >> 3) % 30 * 10;
    let id = format!("msg_{}", hex::encode(&key[..key.len().min(8)]));
    let good = webhook_sign(scheme, &k, ts, &id, body);
    let with = |vals: &[String]| -> Vec<(String, String)> {
        names
            .iter()
            .zip(vals)
            .map(|(n, v)| (n.to_string(), v.clone()))
            .collect()
    };
    let store = MemoryStore::new();
    if let Err(e) = run_webhook(w, &with(&good), body, &store) {
        panic!("{scheme}: a correctly signed delivery was refused: {e:?}");
    }
    assert_eq!(
        run_webhook(w, &with(&good), body, &store),
        Err(WebhookError::Replayed),
        "{scheme}: a replay was not caught"
    );
    // Change one character of the signature itself (after its `sha256=`/`v1,`/... prefix).
    let sig_at = names
        .iter()
        .position(|n| n.ends_with("signature") || *n == "x-hub-signature-256");
    let sig_at = sig_at.expect("every scheme has a signature header");
    let sig = &good[sig_at];
    // Standard Webhooks' base64 may end in `=` padding: its value starts after `v1,`/`v1a,`.
    let start = match scheme {
        "standard" => sig.find(','),
        _ => sig.rfind('='),
    }
    .map_or(0, |i| i + 1);
    let pos = start + klen % (sig.len() - start);
    let mut bad = good.clone();
    let mut chars: Vec<u8> = sig.clone().into_bytes();
    chars[pos] = match chars[pos] {
        b'0'..=b'8' => chars[pos] + 1,
        b'9' => b'a',
        b'a'..=b'e' | b'A'..=b'Y' => chars[pos] + 1,
        b'f' => b'0',
        _ => b'A',
    };
    bad[sig_at] = String::from_utf8(chars).expect("ASCII");
    assert!(
        run_webhook(w, &with(&bad), body, &MemoryStore::new()).is_err(),
        "{scheme}: a changed signature was accepted"
    );
    if !body.is_empty() {
        let mut tampered = body.to_vec();
        tampered[usize::from(sel) % body.len()] ^= 0x20;
        assert!(
            run_webhook(w, &with(&good), &tampered, &MemoryStore::new()).is_err(),
            "{scheme}: a changed body was accepted"
        );
    }
}

// ------------------------------------------------------------------------------ quota answer

/// The quota service's `/v1/check` answer, as the filter reads it. Byte 0 picks the HTTP
/// status (mostly 200). Only documented headers pass, with printable bounded values; a
/// denial is a 402 with a reset time or a 429 with a retry delay; the verdict agrees with
/// the answer's `allowed`.
pub fn quota_answer(data: &[u8]) {
    use crate::quota_client::{parse_answer, Answer};
    let Some((&b, body)) = data.split_first() else {
        return;
    };
    let status = if b < 240 { 200 } else { u32::from(b) + 200 };
    let Ok(answer) = parse_answer(status, body) else {
        return;
    };
    assert_eq!(status, 200);
    assert!(
        std::str::from_utf8(body).is_ok(),
        "an accepted answer is UTF-8"
    );
    // Only `allowed`, read on its own: unknown members may hold numbers serde_json's `Value`
    // cannot hold (`1e400`), which is still JSON.
    #[derive(serde::Deserialize)]
    struct AllowedOnly {
        allowed: bool,
    }
    let allowed = serde_json::from_slice::<AllowedOnly>(body)
        .expect("an accepted answer has a boolean `allowed`")
        .allowed;
    let headers = match &answer {
        Answer::Allow { headers, .. } => {
            assert!(allowed);
            headers
        }
        Answer::Deny {
            status,
            retry_after_s,
            reset_at,
            message,
            headers,
            ..
        } => {
            assert!(!allowed);
            match status {
                429 => assert!(retry_after_s.is_some_and(|s| s >= 1)),
                402 => assert!(reset_at
                    .as_ref()
                    .is_some_and(|r| !r.is_empty() && r.bytes().all(|c| c.is_ascii_graphic()))),
                s => panic!("denial with status {s}"),
            }
            assert!(!message.trim().is_empty() && message.len() <= 512);
            headers
        }
    };
    assert!(headers.len() <= 16);
    for (name, value) in headers {
        let documented = [
            "ratelimit-policy",
            "ratelimit",
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
        ]
        .contains(&name.as_str())
            || name.strip_prefix("x-quota-").is_some_and(|r| {
                !r.is_empty()
                    && r.bytes()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
            });
        assert!(documented, "header {name:?} passed");
        assert!(value.len() <= 512 && value.bytes().all(|c| (0x20..0x7f).contains(&c)));
    }
}

// ------------------------------------------------------------------------------ lease answer

/// The quota service's `/v1/lease` answer, then the lease spent the way the filter spends it
/// (`quota_lease`: install, takes across time, expiry sweep). Byte 0 picks the request's cost,
/// byte 1 the time between requests; the rest is the answer. Whatever the answer says, no
/// unit is spent after the lease ends (or after the filter's own maximum life), and every
/// granted unit is either spent once or released once: spent + released = granted.
pub fn lease_answer(data: &[u8]) {
    use crate::quota_client::{parse_answer, Answer};
    use crate::quota_lease::{self, Job, Owner, Take, MAX_LIFE_MS, SLOTS};
    let (Some(&b0), Some(&b1)) = (data.first(), data.get(1)) else {
        return;
    };
    let cost = 1 + u64::from(b0 % 4);
    let step = u64::from(b1) * 50;
    let Ok(Answer::Allow {
        lease: Some(g),
        headers,
        ..
    }) = parse_answer(200, &data[2..])
    else {
        return;
    };
    // `check_lease_answer` refuses a lease smaller than the asking request's cost.
    if g.granted < cost {
        return;
    }
    assert!(!g.id.is_empty() && g.id.len() <= 128);
    let store = MemoryStore::new();
    quota_lease::prepare(&store);
    let who = Owner {
        client: "fuzz-client",
        tier: "t",
        route: "r",
    };
    let t0: u64 = 1_700_000_000_000;
    let released_of = |jobs: Vec<Job>| -> u64 {
        jobs.iter()
            .map(|j| match j {
                Job::Release { id, units, .. } => {
                    assert_eq!(id, &g.id, "a release of a lease never granted");
                    *units
                }
                Job::Refresh { want, .. } => {
                    assert!(*want >= cost);
                    0
                }
            })
            .sum()
    };
    // The asking request spent `cost` of it.
    let out = quota_lease::install(&store, who, &g, cost, &headers, t0);
    assert!(out.len() <= 16 + 4);
    let mut spent = u128::from(cost);
    let mut released = 0u128;
    let mut now = t0;
    for _ in 0..64 {
        now += step;
        match quota_lease::take(&store, who, cost, now) {
            Take::Taken { .. } => {
                assert!(
                    now < g.expires_at_ms && now < t0 + MAX_LIFE_MS,
                    "a unit spent after its lease ended"
                );
                spent += u128::from(cost);
            }
            Take::Need { want } => assert!(want >= cost),
        }
        released += u128::from(released_of(quota_lease::take_jobs(&store)));
    }
    // Past every possible end: the sweep gives back whatever is still held.
    quota_lease::sweep(&store, 0, SLOTS, t0 + MAX_LIFE_MS + now + 1);
    released += u128::from(released_of(quota_lease::take_jobs(&store)));
    assert_eq!(
        spent + released,
        u128::from(g.granted),
        "granted units lost or counted twice (spent {spent}, released {released})"
    );
}

// ------------------------------------------------------------------------------ json body

/// The schema `json_body` checks against, with [`json_body_oracle`] its independent reading.
const JSON_BODY_SCHEMA: &str = r#"{
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object", "required": ["a"],
    "properties": {"a": {"type": "integer", "minimum": 0},
                   "b": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
    "additionalProperties": {"type": "boolean"}
}"#;

/// [`JSON_BODY_SCHEMA`] by hand: an object with an integer `a` >= 0 (1.0 is an integer), an
/// optional `b` of at most 3 strings, and booleans for any other key.
fn json_body_oracle(v: &Value) -> bool {
    let Some(o) = v.as_object() else {
        return false;
    };
    let a_ok = o.get("a").and_then(Value::as_f64).is_some_and(|a| {
        let n = &o["a"];
        (n.is_i64() || n.is_u64() || a.fract() == 0.0) && a >= 0.0
    });
    let b_ok = o.get("b").is_none_or(|b| {
        b.as_array()
            .is_some_and(|items| items.len() <= 3 && items.iter().all(Value::is_string))
    });
    let rest_ok = o
        .iter()
        .filter(|(k, _)| *k != "a" && *k != "b")
        .all(|(_, v)| v.is_boolean());
    a_ok && b_ok && rest_ok
}

/// A request body through a route's `json_schema` check (the whole input is the body). The
/// verdict agrees with an independent reading of the schema; an accepted body is JSON; a
/// "not valid JSON" refusal is of bytes serde_json refuses too, or of an object with a
/// duplicate key, and names a byte inside the body; a schema refusal names a pointer that
/// resolves in the body and a keyword; messages are bounded; the same body, the same answer.
pub fn json_body(data: &[u8]) {
    use crate::hygiene::schema::Refusal;
    use crate::hygiene::JsonSchema;
    static SCHEMA: OnceLock<JsonSchema> = OnceLock::new();
    let schema = SCHEMA.get_or_init(|| {
        let v: Value = serde_json::from_str(JSON_BODY_SCHEMA).expect("the schema is JSON");
        JsonSchema::compile("fuzz", &v).expect("the schema compiles")
    });
    let verdict = schema.check(data);
    assert_eq!(verdict, schema.check(data), "deterministic");
    let parsed = serde_json::from_slice::<Value>(data);
    match verdict {
        Ok(()) => {
            let v = parsed.expect("an accepted body is JSON");
            assert!(json_body_oracle(&v), "accepted against the schema: {v}");
        }
        Err(Refusal {
            message,
            pointer: None,
            keyword,
        }) => {
            assert_eq!(keyword, None);
            let at = message
                .strip_prefix("request body is not valid JSON at byte ")
                .and_then(|r| r.split(':').next())
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or_else(|| panic!("no byte offset: {message}"));
            assert!(at <= data.len(), "{message}");
            if parsed.is_ok() {
                assert!(message.contains("duplicate object key"), "{message}");
            }
            assert!(message.chars().count() <= 401, "{message}");
        }
        Err(Refusal {
            message,
            pointer: Some(pointer),
            keyword,
        }) => {
            let v = parsed.expect("a schema refusal is of JSON");
            assert!(!json_body_oracle(&v), "refused ({message}) but valid: {v}");
            assert!(keyword.is_some_and(|k| !k.is_empty()), "{message}");
            // Pointers are cut at 200 characters (client keys); a whole one resolves.
            if pointer.chars().count() < 200 {
                assert!(v.pointer(&pointer).is_some(), "{pointer} in {v}");
            }
            assert!(message.chars().count() <= 401, "{message}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The oracles must be able to say yes, or "accepted ⇒ oracle" would hold vacuously.

    #[test]
    fn the_jwt_oracles_accept_a_token_the_verifier_accepts() {
        let f = jwt_fixture();
        let claims =
            serde_json::json!({"iss": ISSUER, "aud": "api", "sub": "u", "exp": NOW_S + 10});
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","kid":"hs"}"#),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let token = format!(
            "{input}.{}",
            URL_SAFE_NO_PAD.encode(hmac256(HS_SECRET, &[input.as_bytes()]))
        );
        assert!(jwt::verify(&token, &f.rules, &f.keys, NOW_S).is_ok());
        assert!(jwt_signature_valid(&token, f));
        assert!(jwt_claims_valid(&claims));
        assert!(!jwt_signature_valid(&token.replace(".ey", ".eY"), f));
    }

    #[test]
    fn the_webhook_oracle_accepts_what_a_sender_signs_and_nothing_else() {
        for (scheme, ed) in [
            ("github", false),
            ("stripe", false),
            ("standard", false),
            ("standard", true),
            ("slack", false),
        ] {
            let k = webhook_key(scheme, b"key-bytes", ed);
            let vals = webhook_sign(scheme, &k, WEBHOOK_NOW_S, "msg_1", b"{\"a\":1}");
            let refs: Vec<Option<&str>> = vals.iter().map(|v| Some(v.as_str())).collect();
            assert!(webhook_oracle(scheme, &k, &refs, b"{\"a\":1}"), "{scheme}");
            assert!(!webhook_oracle(scheme, &k, &refs, b"{\"a\":2}"), "{scheme}");
        }
    }

    #[test]
    fn json_body_holds_on_every_one_byte_edit_of_its_seeds() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/json_body");
        let mut seeds = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let seed = std::fs::read(e.unwrap().path()).unwrap();
            seeds += 1;
            for i in 0..=seed.len() {
                for b in b"\"{}[],:1.-e tfn\\\xff" {
                    let mut edit = seed.clone();
                    edit.insert(i, *b);
                    json_body(&edit);
                    if i < seed.len() {
                        edit.remove(i);
                        edit[i] = *b;
                        json_body(&edit);
                        edit.remove(i);
                        json_body(&edit);
                    }
                }
            }
        }
        assert!(seeds >= 5);
    }

    #[test]
    fn the_origin_oracle_reads_origins() {
        assert_eq!(
            oracle_origin("HTTPS://App.Example.com"),
            Some((
                "https".into(),
                OracleHost::Name("app.example.com".into()),
                Some(443)
            ))
        );
        assert_eq!(
            oracle_origin("http://[::1]:8080"),
            Some((
                "http".into(),
                OracleHost::V6(Ipv6Addr::LOCALHOST),
                Some(8080)
            ))
        );
    }
}
