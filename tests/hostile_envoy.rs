//! Hostile input through the real Envoy and the real `.wasm`: the cases whose fix lives in
//! the glue or only shows at the host (natively they are covered by `hostile_input.rs`).

mod common;
use common::*;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const ISS: &str = "https://idp.example.com";
const SECRET: [u8; 32] = [0x5a; 32];

fn hs256_token(kid: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let h = URL_SAFE_NO_PAD.encode(json!({"alg": "HS256", "kid": kid}).to_string());
    let p =
        URL_SAFE_NO_PAD.encode(json!({"iss": ISS, "sub": "user-1", "exp": now + 600}).to_string());
    let mut mac = Hmac::<Sha256>::new_from_slice(&SECRET).unwrap();
    mac.update(format!("{h}.{p}").as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{h}.{p}.{sig}")
}

/// Serves whatever body is current to every request, on 127.0.0.1; stops on drop.
struct BodyServer {
    port: u16,
    body: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
}

impl BodyServer {
    fn start(body: Vec<u8>) -> BodyServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let body = Arc::new(Mutex::new(body));
        let stop = Arc::new(AtomicBool::new(false));
        let (b2, s2) = (body.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s2.load(Ordering::SeqCst) {
                let Ok((mut conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let b3 = b2.clone();
                std::thread::spawn(move || {
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut req = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let body = b3.lock().unwrap().clone();
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = conn.write_all(head.as_bytes());
                    let _ = conn.write_all(&body);
                });
            }
        });
        BodyServer { port, body, stop }
    }

    fn set(&self, body: Vec<u8>) {
        *self.body.lock().unwrap() = body;
    }
}

impl Drop for BodyServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn bearer(envoy: &Envoy, token: &str) -> Resp {
    envoy
        .req("GET", "/x")
        .header("authorization", &format!("Bearer {token}"))
        .send()
}

#[test]
fn an_oversized_jwks_response_is_refused_unread_and_the_filter_recovers() {
    let key =
        json!({"kty": "oct", "kid": "k", "alg": "HS256", "k": URL_SAFE_NO_PAD.encode(SECRET)});
    // A usable key, padded past the 256 KiB JWKS limit: the filter must not copy it in.
    let padded =
        serde_json::to_vec(&json!({"keys": [key], "pad": "p".repeat(300 * 1024)})).unwrap();
    let server = BodyServer::start(padded);
    let cfg = json!({
        "jwt_providers": {"idp": {
            "issuer": ISS, "algorithms": ["HS256"],
            "remote_jwks": {"cluster": "idp", "path": "/jwks", "refresh_s": 1, "timeout_ms": 1000}
        }},
        "default_route": {"auth": {"mode": "required", "methods": ["jwt:idp"]}}
    })
    .to_string();
    let envoy = Envoy::builder(&cfg).cluster("idp", server.port).start();
    let token = hs256_token("k");

    let r = bearer(&envoy, &token);
    r.assert_error(401, "invalid_token");
    let end = Instant::now() + Duration::from_secs(10);
    while !envoy.logs().contains("byte limit") {
        assert!(
            Instant::now() < end,
            "no log of the refused body:\n{}",
            envoy.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        envoy.logs().contains("262144-byte limit"),
        "{}",
        envoy.logs()
    );

    // The IdP fixes its document: the next refresh loads it and the same token passes.
    server.set(serde_json::to_vec(&json!({"keys": [key]})).unwrap());
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        let r = bearer(&envoy, &token);
        if r.status == 200 {
            break;
        }
        assert!(
            Instant::now() < end,
            "never recovered: {} {}",
            r.status,
            r.text()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_huge_xff_trusted_hops_costs_nothing_per_request() {
    // Used to walk `xff_trusted_hops` times per request whatever the header held.
    let cfg = json!({
        "client_ip": {"xff_trusted_hops": u32::MAX, "use_remote_address": true},
        "rate_limits": {"ip": {"key": ["ip"], "capacity": 1000, "refill_tokens": 1000,
                               "refill_period_s": 1}},
        "default_route": {"rate_limits": ["ip"]}
    })
    .to_string();
    let envoy = Envoy::start(&cfg);
    for _ in 0..5 {
        let t = Instant::now();
        let r = envoy
            .req("GET", "/x")
            .header("x-forwarded-for", "1.1.1.1, 2.2.2.2")
            .timeout(Duration::from_secs(5))
            .send();
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "one request took {:?}",
            t.elapsed()
        );
    }
}

#[test]
fn a_repeated_api_key_header_is_refused() {
    let cfg = json!({
        "api_keys": {"keys": [{"id": "a", "sha256": hex::encode(Sha256::digest(b"good"))}]},
        "default_route": {"auth": {"mode": "required", "methods": ["api_key"]}}
    })
    .to_string();
    let envoy = Envoy::start(&cfg);
    assert_eq!(
        envoy
            .req("GET", "/x")
            .header("x-api-key", "good")
            .send()
            .status,
        200
    );
    let r = envoy
        .req("GET", "/x")
        .header("x-api-key", "good")
        .header("x-api-key", "other")
        .send();
    r.assert_error(400, "invalid_request");
    assert_eq!(
        envoy.received().len(),
        1,
        "only the single-key request went upstream"
    );
}
