//! Authentication and authorization through a real Envoy (2 workers) and the real filter:
//! every algorithm, the attack list of issue 4, scopes/roles, API keys, identity headers, and
//! remote JWKS (first fetch, rotation, IdP outage, rate-limited refetch) against a JWKS
//! server run by the test.

mod common;

use api_guard::auth::mint::SigningKey;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use common::*;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const ISS: &str = "https://auth.example.com";
const AUD: &str = "https://api.example.com";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

fn sha_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Claims a valid token carries; `extra` overrides (null removes).
fn claims(extra: Value) -> Map<String, Value> {
    let mut m = json!({"iss": ISS, "aud": AUD, "sub": "user-1", "exp": now() + 600,
                       "iat": now(), "scope": "read:orders", "roles": ["viewer"],
                       "plan": "pro", "tenant_id": "t-42"})
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

/// The fixed RSA key of the vectors (RSA generation is slow in debug builds).
fn rsa_private_jwk() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/vectors/wycheproof/json_web_signature_test.subset.json"
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["testGroups"][2]["private"].clone()
}

struct Keys {
    hs: SigningKey,
    rs: SigningKey,
    ps: SigningKey,
    es: SigningKey,
    ed: SigningKey,
}

fn keys() -> Keys {
    let rsa = rsa_private_jwk();
    Keys {
        hs: SigningKey::generate("HS256", "hs").unwrap(),
        rs: SigningKey::rsa_from_jwk("RS256", &rsa, "rsa").unwrap(),
        ps: SigningKey::rsa_from_jwk("PS256", &rsa, "rsa").unwrap(),
        es: SigningKey::generate("ES256", "es").unwrap(),
        ed: SigningKey::generate("EdDSA", "ed").unwrap(),
    }
}

fn local_config(k: &Keys) -> String {
    // One RSA JWK without `alg` serves RS256 and PS256.
    let mut rsa = k.rs.jwk();
    rsa.as_object_mut().unwrap().remove("alg");
    json!({
        "api_keys": {"keys": [
            {"id": "acme-prod", "sha256": sha_hex("acme-secret-key"), "tier": "free", "scopes": ["read:orders"]},
            {"id": "no-scopes", "sha256": sha_hex("other-secret-key")}
        ]},
        "jwt_providers": {"main": {
            "issuer": ISS, "audiences": [AUD],
            "algorithms": ["HS256", "RS256", "PS256", "ES256", "EdDSA"],
            "local_jwks": {"keys": [k.hs.jwk(), rsa, k.es.jwk(), k.ed.jwk()]},
            "clock_skew_s": 30,
            "max_token_bytes": 4096,
            "roles_claim": "roles",
            "tier_claim": "plan",
            "forward_claims": {"tenant_id": "x-tenant-id"},
            "keep_authorization": false
        }},
        "routes": [
            {"name": "orders", "match": {"prefix": "/api/orders"},
             "auth": {"mode": "required", "methods": ["jwt:main", "api_key"], "scopes_all": ["read:orders"]}},
            {"name": "admin", "match": {"prefix": "/admin"},
             "auth": {"mode": "required", "methods": ["jwt:main"], "roles_any": ["admin"]}},
            {"name": "open", "match": {"prefix": "/open"},
             "auth": {"mode": "optional", "methods": ["jwt:main", "api_key"]}},
            {"name": "public", "match": {"prefix": "/public"}, "auth": {"mode": "none"}}
        ],
        "default_route": {"auth": {"mode": "required", "methods": ["jwt:main"]}}
    })
    .to_string()
}

fn get(envoy: &Envoy, path: &str, token: &str) -> Resp {
    envoy
        .req("GET", path)
        .header("authorization", &format!("Bearer {token}"))
        .send()
}

fn assert_invalid_token(r: &Resp, why: &str) {
    assert_eq!(r.status, 401, "{why}: {}", r.text());
    r.assert_error(401, "invalid_token");
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer error=\"invalid_token\""),
        "{why}"
    );
}

#[test]
fn valid_tokens_of_every_algorithm_pass_and_identity_reaches_the_upstream() {
    let k = keys();
    let envoy = Envoy::start(&local_config(&k));
    for (alg, key) in [
        ("HS256", &k.hs),
        ("RS256", &k.rs),
        ("PS256", &k.ps),
        ("ES256", &k.es),
        ("EdDSA", &k.ed),
    ] {
        let token = key.sign(&claims(json!({}))).unwrap();
        let r = envoy
            .req("GET", "/api/orders/1")
            .header("authorization", &format!("Bearer {token}"))
            .header("x-auth-subject", "forged")
            .header("x-tenant-id", "forged")
            .send();
        assert_eq!(r.status, 200, "{alg}: {}", r.text());
        assert_eq!(
            r.upstream_header("x-auth-subject").as_deref(),
            Some("user-1"),
            "{alg}"
        );
        assert_eq!(
            r.upstream_header("x-auth-client").as_deref(),
            Some("user-1")
        );
        assert_eq!(r.upstream_header("x-auth-tier").as_deref(), Some("pro"));
        assert_eq!(
            r.upstream_header("x-auth-scopes").as_deref(),
            Some("read:orders")
        );
        assert_eq!(r.upstream_header("x-tenant-id").as_deref(), Some("t-42"));
        // keep_authorization: false
        assert_eq!(r.upstream_header("authorization"), None, "{alg}");
    }
}

#[test]
fn every_attack_is_401_and_the_filter_keeps_serving() {
    let k = keys();
    let envoy = Envoy::start(&local_config(&k));
    let t = now();
    let good = k.es.sign(&claims(json!({}))).unwrap();
    let (input, sig) = good.rsplit_once('.').unwrap();
    let (h, p) = input.split_once('.').unwrap();
    let payload = |c: Map<String, Value>| b64(Value::Object(c).to_string().as_bytes());
    // RS256 -> HS256 confusion: HMAC keyed with the RSA public key's modulus.
    let n = URL_SAFE_NO_PAD
        .decode(k.rs.jwk()["n"].as_str().unwrap())
        .unwrap();
    let confused = {
        use hmac::{Hmac, Mac};
        let head = b64(br#"{"alg":"HS256","kid":"rsa"}"#);
        let si = format!("{head}.{}", payload(claims(json!({}))));
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&n).unwrap();
        mac.update(si.as_bytes());
        format!("{si}.{}", b64(&mac.finalize().into_bytes()))
    };
    let other_es = SigningKey::generate("ES256", "es").unwrap();
    let mut cases: Vec<(String, String)> = vec![
        (
            "expired".into(),
            k.es.sign(&claims(json!({"exp": t - 120}))).unwrap(),
        ),
        (
            "nbf in the future".into(),
            k.es.sign(&claims(json!({"nbf": t + 600}))).unwrap(),
        ),
        (
            "iat in the future".into(),
            k.es.sign(&claims(json!({"iat": t + 600}))).unwrap(),
        ),
        (
            "wrong iss".into(),
            k.es.sign(&claims(json!({"iss": "https://evil.example"})))
                .unwrap(),
        ),
        (
            "wrong aud".into(),
            k.es.sign(&claims(json!({"aud": ["https://other.example"]})))
                .unwrap(),
        ),
        (
            "missing exp".into(),
            k.es.sign(&claims(json!({"exp": null}))).unwrap(),
        ),
        ("RS256->HS256 key confusion".into(), confused),
        ("ECDSA r=s=0".into(), format!("{input}.{}", b64(&[0u8; 64]))),
        (
            "tampered payload".into(),
            format!("{h}.{}.{sig}", payload(claims(json!({"sub": "admin"})))),
        ),
        ("stripped signature".into(), format!("{input}.")),
        (
            "unknown kid".into(),
            SigningKey::generate("ES256", "nope")
                .unwrap()
                .sign(&claims(json!({})))
                .unwrap(),
        ),
        (
            "other key under a known kid".into(),
            other_es.sign(&claims(json!({}))).unwrap(),
        ),
        (
            "oversized".into(),
            format!("{h}.{}.{sig}", "A".repeat(5000)),
        ),
        ("bad base64".into(), format!("{h}.{p}!.{sig}")),
        ("padded base64".into(), format!("{h}.{p}.{sig}=")),
        ("appended signature character".into(), format!("{good}A")),
        (
            "non-object JSON".into(),
            format!("{h}.{}.{sig}", b64(b"[1,2,3]")),
        ),
        (
            "wrong claim type".into(),
            k.es.sign(&claims(json!({"exp": "tomorrow"}))).unwrap(),
        ),
        ("two segments".into(), input.to_string()),
        ("garbage".into(), "x".into()),
    ];
    for alg in ["none", "None", "NONE", "nOnE"] {
        let head = b64(json!({ "alg": alg }).to_string().as_bytes());
        cases.push((format!("alg {alg}"), format!("{head}.{p}.")));
        cases.push((
            format!("alg {alg} with signature"),
            format!("{head}.{p}.{sig}"),
        ));
    }
    for (why, token) in &cases {
        let r = get(&envoy, "/api/orders", token);
        assert_invalid_token(&r, why);
    }
    // Within skew: 10 s past exp still passes (skew 30).
    let r = get(
        &envoy,
        "/api/orders",
        &k.es.sign(&claims(json!({"exp": t - 10}))).unwrap(),
    );
    assert_eq!(r.status, 200, "expired within skew: {}", r.text());
    // Nothing refused reached the upstream, and the filter still serves.
    assert_eq!(envoy.received().len(), 1);
    assert_eq!(get(&envoy, "/api/orders", &good).status, 200);
    assert_eq!(
        envoy.stat("wasmcustom.api_guard.denied.invalid_token"),
        cases.len() as u64
    );
}

#[test]
fn missing_duplicate_and_query_credentials() {
    let k = keys();
    let envoy = Envoy::start(&local_config(&k));
    let r = envoy.get("/api/orders");
    r.assert_error(401, "missing_credentials");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let token = k.hs.sign(&claims(json!({}))).unwrap();
    let r = envoy
        .req("GET", "/api/orders")
        .header("authorization", &format!("Bearer {token}"))
        .header("authorization", &format!("Bearer {token}"))
        .send();
    r.assert_error(400, "invalid_request");
    let r = envoy
        .req("GET", &format!("/api/orders?access_token={token}"))
        .send();
    r.assert_error(400, "invalid_request");
    // Optional: anonymous passes without identity headers; a bad credential is still 401.
    let r = envoy.get("/open/x");
    assert_eq!(r.status, 200);
    assert_eq!(r.upstream_header("x-auth-client"), None);
    get(&envoy, "/open/x", "bad.token.here").assert_error(401, "invalid_token");
    // None: credentials are not looked at.
    assert_eq!(get(&envoy, "/public", "garbage").status, 200);
}

#[test]
fn scopes_roles_and_api_keys() {
    let k = keys();
    let envoy = Envoy::start(&local_config(&k));
    // Scope missing: 403 naming it.
    let t = k.hs.sign(&claims(json!({"scope": "profile"}))).unwrap();
    let r = get(&envoy, "/api/orders", &t);
    r.assert_error(403, "insufficient_scope");
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer error=\"insufficient_scope\", scope=\"read:orders\"")
    );
    // scp as an array works too.
    let t =
        k.hs.sign(&claims(json!({"scope": null, "scp": ["read:orders"]})))
            .unwrap();
    assert_eq!(get(&envoy, "/api/orders", &t).status, 200);
    // Roles.
    let t = k.hs.sign(&claims(json!({}))).unwrap();
    get(&envoy, "/admin", &t).assert_error(403, "insufficient_scope");
    let t = k.hs.sign(&claims(json!({"roles": ["admin"]}))).unwrap();
    assert_eq!(get(&envoy, "/admin", &t).status, 200);
    // API keys.
    let r = envoy
        .req("GET", "/api/orders")
        .header("x-api-key", "acme-secret-key")
        .send();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.upstream_header("x-auth-client").as_deref(),
        Some("acme-prod")
    );
    assert_eq!(r.upstream_header("x-auth-tier").as_deref(), Some("free"));
    let r = envoy
        .req("GET", "/api/orders")
        .header("x-api-key", "wrong")
        .send();
    r.assert_error(401, "invalid_api_key");
    let r = envoy
        .req("GET", "/api/orders")
        .header("x-api-key", "other-secret-key")
        .send();
    r.assert_error(403, "insufficient_scope");
    let r = envoy
        .req("GET", "/open")
        .header("x-api-key", "other-secret-key")
        .send();
    assert_eq!(
        r.upstream_header("x-auth-tier").as_deref(),
        Some("authenticated")
    );
}

#[test]
fn bad_key_configs_refuse_to_start() {
    let cfg = json!({"jwt_providers": {"m": {"algorithms": ["HS256"],
        "local_jwks": {"keys": [{"kty": "oct", "k": b64(b"short")}]}}}})
    .to_string();
    let err = Envoy::builder(&cfg)
        .try_start()
        .err()
        .expect("must not start");
    assert!(err.contains("jwt_providers.m.local_jwks.keys[0]"), "{err}");
    let cfg = json!({"jwt_providers": {"m": {"algorithms": ["none"], "local_jwks": {"keys": []}}}})
        .to_string();
    assert!(Envoy::builder(&cfg).try_start().is_err());
}

// ---------------------------------------------------------------- remote JWKS

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Up,
    /// Closes connections without answering.
    Down,
}

/// A JWKS endpoint on 127.0.0.1 with a swappable document; counts requests.
struct JwksServer {
    port: u16,
    doc: Arc<Mutex<(String, Mode, Duration)>>,
    hits: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
}

impl JwksServer {
    fn start(doc: Value) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new((doc.to_string(), Mode::Up, Duration::ZERO)));
        let hits = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, h2, st2) = (state.clone(), hits.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        let s3 = s2.clone();
                        let h3 = h2.clone();
                        std::thread::spawn(move || {
                            let _ = conn.set_nonblocking(false);
                            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                            let mut buf = [0u8; 4096];
                            let mut req = Vec::new();
                            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                                match conn.read(&mut buf) {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => req.extend_from_slice(&buf[..n]),
                                }
                            }
                            let (body, mode, delay) = s3.lock().unwrap().clone();
                            if mode == Mode::Down {
                                return;
                            }
                            h3.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(delay);
                            let _ = conn.write_all(
                                format!(
                                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
                                    body.len(),
                                    body
                                )
                                .as_bytes(),
                            );
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        JwksServer {
            port,
            doc: state,
            hits,
            stop,
        }
    }

    fn set(&self, doc: Value) {
        self.doc.lock().unwrap().0 = doc.to_string();
    }
    fn mode(&self, m: Mode) {
        self.doc.lock().unwrap().1 = m;
    }
    fn delay(&self, d: Duration) {
        self.doc.lock().unwrap().2 = d;
    }
    fn hits(&self) -> u32 {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn remote_config(refresh_s: u64, timeout_ms: u64) -> String {
    json!({
        "jwt_providers": {"idp": {
            "issuer": ISS, "audiences": [AUD], "algorithms": ["ES256"],
            "remote_jwks": {"cluster": "idp", "path": "/.well-known/jwks.json",
                            "refresh_s": refresh_s, "timeout_ms": timeout_ms}
        }},
        "default_route": {"auth": {"mode": "required", "methods": ["jwt:idp"]}}
    })
    .to_string()
}

fn start_remote(server: &JwksServer, refresh_s: u64, timeout_ms: u64) -> Envoy {
    Envoy::builder(&remote_config(refresh_s, timeout_ms))
        .cluster("idp", server.port)
        .start()
}

fn wait_for(what: &str, deadline: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn remote_jwks_first_fetch_rotation_outage_and_rate_limit() {
    let k1 = SigningKey::generate("ES256", "k1").unwrap();
    let k2 = SigningKey::generate("ES256", "k2").unwrap();
    let k3 = SigningKey::generate("ES256", "k3").unwrap();
    let server = JwksServer::start(json!({"keys": [k1.jwk()]}));
    let envoy = start_remote(&server, 600, 2000);
    let t1 = k1.sign(&claims(json!({}))).unwrap();

    // First fetch: whether the request or a worker's tick fetched it, the token verifies.
    let r = get(&envoy, "/x", &t1);
    assert_eq!(r.status, 200, "{}", r.text());
    // Both workers then verify with the shared set, without more fetches.
    wait_for(
        "the background fetch to settle",
        Duration::from_secs(5),
        || server.hits() >= 1,
    );
    std::thread::sleep(Duration::from_millis(1200));
    let base = server.hits();
    for _ in 0..10 {
        assert_eq!(get(&envoy, "/x", &t1).status, 200);
    }
    assert_eq!(server.hits(), base, "no fetch per request");

    // Rotation: the IdP publishes k2; a k2 token triggers one refetch and passes.
    server.set(json!({"keys": [k1.jwk(), k2.jwk()]}));
    let t2 = k2.sign(&claims(json!({}))).unwrap();
    let r = get(&envoy, "/x", &t2);
    assert_eq!(r.status, 200, "rotation: {}", r.text());
    assert_eq!(server.hits(), base + 1, "one refetch for the unknown kid");

    // Refetch is rate-limited: another unknown kid right away is refused without fetching.
    let t3 = k3.sign(&claims(json!({}))).unwrap();
    for _ in 0..5 {
        assert_invalid_token(&get(&envoy, "/x", &t3), "unknown kid, rate-limited");
    }
    assert_eq!(server.hits(), base + 1, "no refetch within the rate limit");

    // Outage: the server drops connections; cached keys keep working on both workers.
    server.mode(Mode::Down);
    std::thread::sleep(Duration::from_millis(5500));
    assert_invalid_token(&get(&envoy, "/x", &t3), "unknown kid while the IdP is down");
    for t in [&t1, &t2, &t1, &t2] {
        assert_eq!(
            get(&envoy, "/x", t).status,
            200,
            "cached keys during the outage"
        );
    }
}

#[test]
fn remote_jwks_periodic_refresh_and_last_good_set() {
    let k1 = SigningKey::generate("ES256", "k1").unwrap();
    let k2 = SigningKey::generate("ES256", "k2").unwrap();
    let server = JwksServer::start(json!({"keys": [k1.jwk()]}));
    let envoy = start_remote(&server, 2, 1000);
    let t1 = k1.sign(&claims(json!({}))).unwrap();
    assert_eq!(get(&envoy, "/x", &t1).status, 200);
    // A bad document does not replace the good one.
    server.set(json!({"keys": "nope"}));
    let before = server.hits();
    wait_for("a refresh attempt", Duration::from_secs(10), || {
        server.hits() > before + 1
    });
    assert_eq!(get(&envoy, "/x", &t1).status, 200, "last good set kept");
    // The periodic refresh picks up a new key (no unknown-kid refetch needed after it).
    server.set(json!({"keys": [k2.jwk()]}));
    let t2 = k2.sign(&claims(json!({}))).unwrap();
    wait_for("the refresh to publish k2", Duration::from_secs(10), || {
        get(&envoy, "/x", &t2).status == 200
    });
    // k1 was removed by the IdP: once both workers refreshed, its tokens fail.
    wait_for("k1 to be dropped", Duration::from_secs(10), || {
        get(&envoy, "/x", &t1).status == 401 && get(&envoy, "/x", &t1).status == 401
    });
}

#[test]
fn requests_wait_for_the_first_fetch_bounded_by_timeout() {
    let k1 = SigningKey::generate("ES256", "k1").unwrap();
    let t1 = k1.sign(&claims(json!({}))).unwrap();
    // Slow IdP (600 ms) within the 2 s timeout: the first request waits and passes.
    let server = JwksServer::start(json!({"keys": [k1.jwk()]}));
    server.delay(Duration::from_millis(600));
    let envoy = start_remote(&server, 600, 2000);
    let r = get(&envoy, "/x", &t1);
    assert_eq!(r.status, 200, "{}", r.text());

    // An IdP slower than timeout_ms: the request gives up after about timeout_ms with 401.
    let slow = JwksServer::start(json!({"keys": [k1.jwk()]}));
    slow.delay(Duration::from_secs(5));
    let envoy = start_remote(&slow, 600, 300);
    let start = Instant::now();
    let r = get(&envoy, "/x", &t1);
    assert_invalid_token(&r, "keys never arrived");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(r.json()["message"], "signing keys are not available");
}

#[test]
fn cli_token_mints_what_the_filter_accepts() {
    let dir = temp_dir("token");
    for alg in ["HS256", "ES256"] {
        let key = dir.join(format!("{alg}.json"));
        let key = path_str(&key);
        let token = cli()
            .args(["token", "--alg", alg, "--key", &key, "--sub", "cli-user"])
            .args([
                "--iss",
                ISS,
                "--aud",
                AUD,
                "--scope",
                "read:orders",
                "--claim",
                "plan=\"gold\"",
            ])
            .output()
            .unwrap();
        assert!(
            token.status.success(),
            "{}",
            String::from_utf8_lossy(&token.stderr)
        );
        let token = String::from_utf8(token.stdout).unwrap().trim().to_string();
        let jwks = cli()
            .args(["token", "--key", &key, "--jwks"])
            .output()
            .unwrap();
        assert!(jwks.status.success());
        let jwks: Value = serde_json::from_slice(&jwks.stdout).unwrap();
        let cfg = json!({
            "jwt_providers": {"demo": {"issuer": ISS, "audiences": [AUD], "algorithms": [alg],
                                       "local_jwks": jwks, "tier_claim": "plan"}},
            "default_route": {"auth": {"mode": "required", "methods": ["jwt:demo"], "scopes_all": ["read:orders"]}}
        })
        .to_string();
        let envoy = Envoy::start(&cfg);
        let r = get(&envoy, "/x", &token);
        assert_eq!(r.status, 200, "{alg}: {}", r.text());
        assert_eq!(
            r.upstream_header("x-auth-client").as_deref(),
            Some("cli-user")
        );
        assert_eq!(r.upstream_header("x-auth-tier").as_deref(), Some("gold"));
    }
}

/// Issue 14, item 4: after one worker fetched a rotated-in key, the other worker serves a
/// token signed with it at once (inside its re-read interval) and after the IdP went down.
/// Each worker is driven explicitly: two held connections with exact balancing, one each.
#[test]
fn a_rotated_key_fetched_by_one_worker_serves_on_every_worker_through_an_outage() {
    let k1 = SigningKey::generate("ES256", "k1").unwrap();
    let k2 = SigningKey::generate("ES256", "k2").unwrap();
    let server = JwksServer::start(json!({"keys": [k1.jwk()]}));
    let envoy = Envoy::builder(&remote_config(600, 2000))
        .cluster("idp", server.port)
        .exact_balance()
        .start();
    let (t1, t2) = (
        k1.sign(&claims(json!({}))).unwrap(),
        k2.sign(&claims(json!({}))).unwrap(),
    );
    assert_eq!(get(&envoy, "/x", &t1).status, 200, "first fetch");
    let mut conns = [Conn::open(envoy.port), Conn::open(envoy.port)];
    let send = |c: &mut Conn, t: &str| {
        envoy
            .req("GET", "/x")
            .header("authorization", &format!("Bearer {t}"))
            .send_on(c)
    };
    // Both workers serve k1 now (each loads the shared set and notes when it looked).
    for c in conns.iter_mut() {
        assert_eq!(send(c, &t1).status, 200);
    }
    assert_eq!(
        envoy.active_connections_per_worker(),
        [1, 1],
        "one held connection per worker"
    );
    // The IdP rotates k2 in; worker 0 meets it first and fetches.
    server.set(json!({"keys": [k1.jwk(), k2.jwk()]}));
    let r = send(&mut conns[0], &t2);
    assert_eq!(r.status, 200, "worker 0 fetches k2: {}", r.text());
    // The IdP goes down; worker 1 must use the set worker 0 fetched.
    server.mode(Mode::Down);
    let r = send(&mut conns[1], &t2);
    assert_eq!(r.status, 200, "worker 1, right after: {}", r.text());
    // And later, on both workers, with the IdP still down.
    std::thread::sleep(Duration::from_millis(1500));
    for c in conns.iter_mut() {
        for t in [&t1, &t2] {
            assert_eq!(send(c, t).status, 200, "last good set during the outage");
        }
    }
}
