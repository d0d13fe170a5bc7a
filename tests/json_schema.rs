//! `json_schema` request-body validation (issue 13, SPEC section 2 request hygiene) through a
//! real Envoy with 2 workers, for the delivery under test (the harness runs the other one
//! too): the wasm delivery loads `api_guard_full.wasm` (the base `api_guard.wasm` has no
//! validator and must refuse such a config), the native one `libapi_guard.so`.
//!
//! A valid body reaches the upstream byte for byte (plain, chunked in one go, chunked across
//! several callbacks); an invalid one gets the SPEC's JSON error (400 `invalid_request`
//! naming the JSON pointer and keyword) with the security headers, and the upstream never
//! sees the request; the check runs after credentials and the webhook signature, and a body
//! that arrived while a quota callout held the request is read from Envoy's buffer after it.

mod common;

use common::*;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const GH_SECRET: &str = "s3cret-for-the-hook";
const API_KEY: &str = "acme-key-123";

fn config() -> String {
    let order = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "required": ["sku", "qty"],
        "properties": {
            "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]+$"},
            "qty": {"type": "integer", "minimum": 1},
            "items": {"type": "array", "items": {"$ref": "#/$defs/item"}}
        },
        "additionalProperties": false,
        "$defs": {"item": {"type": "object", "required": ["id"]}}
    });
    let d7 = json!({
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "required": ["id"],
        "properties": {"id": {"type": "integer"}}
    });
    json!({
        "api_keys": {"keys": [{"id": "acme", "sha256": hex::encode(Sha256::digest(API_KEY))}]},
        "webhooks": {"gh": {"scheme": "github", "secrets": [GH_SECRET]}},
        "routes": [
            {"name": "orders", "match": {"path": "/orders"}, "auth": {"mode": "none"},
             "json_schema": order},
            {"name": "d7", "match": {"path": "/d7"}, "auth": {"mode": "none"},
             "max_body_bytes": 64, "content_types": ["application/json"], "json_schema": d7},
            {"name": "secure", "match": {"path": "/secure"},
             "auth": {"mode": "required", "methods": ["api_key"]}, "json_schema": d7},
            {"name": "hook", "match": {"path": "/hook"}, "auth": {"mode": "none"},
             "webhook": "gh", "json_schema": d7}
        ],
        "default_route": {"auth": {"mode": "none"}}
    })
    .to_string()
}

fn start() -> Envoy {
    Envoy::builder(&config()).full_wasm().start()
}

/// The SPEC's JSON error body plus the security headers every local reply carries.
fn assert_refused(r: &Resp, status: u16, error: &str) -> Value {
    let v = r.assert_error(status, error);
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(
        r.header("strict-transport-security"),
        Some("max-age=31536000; includeSubDomains")
    );
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
    v
}

/// A 400 for a body that fails the schema: names the pointer and keyword.
fn assert_schema_refusal(r: &Resp, pointer: &str, keyword: &str) {
    let v = assert_refused(r, 400, "invalid_request");
    assert_eq!(v["pointer"], pointer, "{v}");
    assert_eq!(v["keyword"], keyword, "{v}");
    let m = v["message"].as_str().unwrap_or("");
    assert!(m.contains(&format!("(keyword {keyword})")), "{m}");
    if !pointer.is_empty() {
        assert!(m.contains(&format!("'{pointer}'")), "{m}");
    }
}

fn upstream_requests(envoy: &Envoy) -> u64 {
    envoy.stat("cluster.upstream.upstream_rq_total")
}

fn received_on(envoy: &Envoy, path: &str) -> Vec<Vec<u8>> {
    envoy
        .received()
        .into_iter()
        .filter(|r| r.path == path)
        .map(|r| r.body)
        .collect()
}

fn github_sig(body: &[u8]) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(GH_SECRET.as_bytes()).unwrap();
    m.update(body);
    format!("sha256={}", hex::encode(m.finalize().into_bytes()))
}

/// A chunked POST written chunk by chunk with a pause between them, so the filter sees the
/// body over several callbacks.
fn slow_chunked(port: u16, path: &str, chunks: &[&[u8]]) -> Resp {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(
        format!(
            "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
             transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    for c in chunks {
        std::thread::sleep(Duration::from_millis(150));
        s.write_all(format!("{:x}\r\n", c.len()).as_bytes())
            .unwrap();
        s.write_all(c).unwrap();
        s.write_all(b"\r\n").unwrap();
        s.flush().unwrap();
    }
    s.write_all(b"0\r\n\r\n").unwrap();
    read_response(&mut BufReader::new(s)).expect("a response")
}

#[test]
fn json_schema_bodies_through_envoy() {
    let envoy = start();
    let port = envoy.port;

    // ---- valid bodies reach the upstream byte for byte -------------------------------------
    let body = b"{ \"sku\": \"ABC-12\",\n  \"qty\": 3, \"items\": [{\"id\": 1}] }\n".to_vec();
    let r = envoy
        .req("POST", "/orders")
        .header("content-type", "application/json")
        .body(body.clone())
        .send();
    assert_eq!(r.status, 200, "{}", r.text());
    let r = envoy
        .req("POST", "/orders")
        .header("content-type", "application/json")
        .chunked(vec![
            b"{\"sku\": \"XYZ".to_vec(),
            b"-9\", \"qty\": 1}".to_vec(),
        ])
        .send();
    assert_eq!(r.status, 200, "{}", r.text());
    let r = slow_chunked(
        port,
        "/orders",
        &[b"{\"qty\"", b": 7, \"sku\":", b" \"QQQ-1\"}"],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        received_on(&envoy, "/orders"),
        vec![
            body,
            b"{\"sku\": \"XYZ-9\", \"qty\": 1}".to_vec(),
            b"{\"qty\": 7, \"sku\": \"QQQ-1\"}".to_vec()
        ],
        "the upstream got each body exactly as sent"
    );
    // No body: nothing to check.
    assert_eq!(envoy.get("/orders").status, 200);

    // ---- invalid bodies: 400, the upstream never sees them ----------------------------------
    let before = upstream_requests(&envoy);
    let seen = received_on(&envoy, "/orders").len();
    let post = |b: &[u8]| {
        envoy
            .req("POST", "/orders")
            .header("content-type", "application/json")
            .body(b.to_vec())
            .send()
    };
    assert_schema_refusal(&post(br#"{"sku": "ABC-1", "qty": 0}"#), "/qty", "minimum");
    assert_schema_refusal(&post(br#"{"qty": 1}"#), "", "required");
    assert_schema_refusal(
        &post(br#"{"sku": "ABC-1", "qty": 1, "items": [{"id": 1}, {}]}"#),
        "/items/1",
        "required",
    );
    assert_schema_refusal(
        &post(br#"{"sku": "ABC-1", "qty": 1, "role": "admin"}"#),
        "",
        "additionalProperties",
    );
    // Chunked, invalid in the last chunk, over several callbacks.
    let r = slow_chunked(
        port,
        "/orders",
        &[b"{\"sku\": \"ABC-1\",", b" \"qty\": \"many\"}"],
    );
    assert_schema_refusal(&r, "/qty", "type");
    // Not JSON: whatever the content-type says, the body is checked.
    let r = envoy
        .req("POST", "/orders")
        .header("content-type", "text/plain")
        .body("sku=ABC-1&qty=1")
        .send();
    let v = assert_refused(&r, 400, "invalid_request");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .starts_with("request body is not valid JSON at byte 0: "),
        "{v}"
    );
    // Duplicate keys: the schema would judge one, the backend might read the other.
    let r = post(br#"{"sku": "ABC-1", "qty": 1, "qty": -5}"#);
    let v = assert_refused(&r, 400, "invalid_request");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("duplicate object key"),
        "{v}"
    );
    assert_eq!(
        upstream_requests(&envoy),
        before,
        "the upstream never saw a refused request, not even its headers"
    );
    assert_eq!(received_on(&envoy, "/orders").len(), seen);

    // ---- the size cap: 1 MiB by default, the route's max_body_bytes when set ---------------
    // Declared over the cap: refused at the headers, so the body need not even be sent.
    let r = send_raw(
        port,
        b"POST /orders HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
          content-length: 1048577\r\nconnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .expect("a response");
    assert_refused(&r, 413, "payload_too_large");
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap_or("")
            .contains("1048576 bytes"),
        "the default cap of a json_schema route: {}",
        r.text()
    );
    let r = envoy
        .req("POST", "/d7")
        .header("content-type", "application/json")
        .chunked(vec![
            b"{\"id\": 1, \"pad\": \"".to_vec(),
            vec![b'x'; 60],
            b"\"}".to_vec(),
        ])
        .send();
    assert_refused(&r, 413, "payload_too_large");

    // ---- draft 7, with content_types first (415) --------------------------------------------
    let r = envoy
        .req("POST", "/d7")
        .header("content-type", "text/plain")
        .body("{\"id\": 1}")
        .send();
    assert_refused(&r, 415, "unsupported_media_type");
    let r = envoy
        .req("POST", "/d7")
        .header("content-type", "application/json")
        .body("{\"id\": 1.5}")
        .send();
    assert_schema_refusal(&r, "/id", "type");
    let r = envoy
        .req("POST", "/d7")
        .header("content-type", "application/json")
        .body("{\"id\": 42}")
        .send();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["body"], "{\"id\": 42}");
    assert_eq!(upstream_requests(&envoy), before + 1);

    // ---- order: credentials before the body ------------------------------------------------
    let r = envoy
        .req("POST", "/secure")
        .header("content-type", "application/json")
        .body("not json")
        .send();
    assert_refused(&r, 401, "missing_credentials");
    let r = envoy
        .req("POST", "/secure")
        .header("x-api-key", API_KEY)
        .header("content-type", "application/json")
        .body("{\"id\": \"x\"}")
        .send();
    assert_schema_refusal(&r, "/id", "type");
    let r = envoy
        .req("POST", "/secure")
        .header("x-api-key", API_KEY)
        .header("content-type", "application/json")
        .body("{\"id\": 7}")
        .send();
    assert_eq!(r.status, 200, "{}", r.text());

    // ---- webhook then schema: the body is read once, both checks see all of it -------------
    let hook = |b: &[u8], sig: String| {
        envoy
            .req("POST", "/hook")
            .header("content-type", "application/json")
            .header("x-hub-signature-256", &sig)
            .chunked(b.chunks(3).map(<[u8]>::to_vec).collect())
            .send()
    };
    let good = br#"{"id": 1001}"#;
    let r = hook(good, github_sig(good));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(received_on(&envoy, "/hook"), vec![good.to_vec()]);
    let bad = br#"{"id": "1001"}"#;
    assert_schema_refusal(&hook(bad, github_sig(bad)), "/id", "type");
    assert_refused(&hook(good, github_sig(bad)), 401, "invalid_signature");
    assert_eq!(received_on(&envoy, "/hook").len(), 1);

    // Every refusal above was logged with the policy that refused it.
    let logs = envoy.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("api_guard.deny") && l.contains("json_schema")),
        "deny log names json_schema"
    );
}

/// A stand-in quota service: answers every `/v1/check` with `{"allowed": true}` after
/// `delay`, so a request stays held on its quota callout while its body arrives. Stopped on
/// drop (the accept loop is woken by a last connection).
struct SlowQuota {
    port: u16,
    calls: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl SlowQuota {
    fn start(delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let calls = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, st) = (Arc::clone(&calls), Arc::clone(&stop));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (c, st) = (Arc::clone(&c), Arc::clone(&st));
                std::thread::spawn(move || Self::serve(conn, delay, &c, &st));
            }
        });
        Self { port, calls, stop }
    }

    /// HTTP/1.1 keep-alive: one answer per request until the peer closes.
    fn serve(conn: TcpStream, delay: Duration, calls: &AtomicUsize, stop: &AtomicBool) {
        let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
        let Ok(mut out) = conn.try_clone() else {
            return;
        };
        let mut r = BufReader::new(conn);
        while !stop.load(Ordering::SeqCst) {
            let mut len = 0usize;
            let mut line = String::new();
            loop {
                line.clear();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let l = line.trim_end();
                if l.is_empty() {
                    break;
                }
                if let Some((k, v)) = l.split_once(':') {
                    if k.eq_ignore_ascii_case("content-length") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
            }
            let mut body = vec![0; len];
            if r.read_exact(&mut body).is_err() {
                return;
            }
            calls.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(delay);
            let answer = br#"{"allowed": true}"#;
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                answer.len()
            );
            if out.write_all(head.as_bytes()).is_err() || out.write_all(answer).is_err() {
                return;
            }
        }
    }
}

impl Drop for SlowQuota {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

#[test]
fn a_body_that_arrives_during_a_callout_is_read_and_checked_after_it() {
    let quota = SlowQuota::start(Duration::from_millis(400));
    let cfg = json!({
        "quota": {"cluster": "quota", "mode": "check", "timeout_ms": 5000,
                  "failure_mode": "deny"},
        "routes": [{"name": "q", "match": {"path": "/q"}, "auth": {"mode": "none"},
                    "quota": true,
                    "json_schema": {"type": "object", "required": ["id"],
                                    "properties": {"id": {"type": "integer"}}}}],
        "default_route": {"auth": {"mode": "none"}}
    });
    let envoy = Envoy::builder(&cfg.to_string())
        .full_wasm()
        .cluster("quota", quota.port)
        .start();
    // The whole request is sent at once: its body reaches the filter while the quota
    // callout (400 ms) holds it, and is read from Envoy's buffer once the answer is in.
    let r = envoy
        .req("POST", "/q")
        .header("content-type", "application/json")
        .body("{\"id\": 5}")
        .send();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["body"], "{\"id\": 5}");
    let r = envoy
        .req("POST", "/q")
        .header("content-type", "application/json")
        .body("{\"id\": \"5\"}")
        .send();
    assert_schema_refusal(&r, "/id", "type");
    // Part during the callout, the rest after it.
    let mut s = TcpStream::connect(("127.0.0.1", envoy.port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(
        b"POST /q HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n\
          connection: close\r\n\r\n5\r\n{\"id\"\r\n",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    s.write_all(b"5\r\n: 42}\r\n0\r\n\r\n").unwrap();
    let r = read_response(&mut BufReader::new(s)).expect("a response");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["body"], "{\"id\": 42}");
    assert_eq!(
        quota.calls.load(Ordering::SeqCst),
        3,
        "each request waited on its callout"
    );
    assert_eq!(
        received_bodies(&envoy),
        vec![b"{\"id\": 5}".to_vec(), b"{\"id\": 42}".to_vec()]
    );
}

fn received_bodies(envoy: &Envoy) -> Vec<Vec<u8>> {
    envoy.received().into_iter().map(|r| r.body).collect()
}

#[test]
fn the_base_wasm_refuses_a_json_schema_config() {
    if delivery() != Delivery::Wasm {
        // The dynamic module always validates: the other test covers it.
        return;
    }
    // Both .wasm builds exist before this one loads (building the full one relinks the base).
    let _ = full_wasm_path();
    let Err(err) = Envoy::builder(&config()).try_start() else {
        panic!("api_guard.wasm has no validator: a json_schema config must not load");
    };
    assert!(
        err.contains("routes[0].json_schema"),
        "names the path:\n{err}"
    );
    assert!(
        err.contains("json_schema needs api_guard_full.wasm or the dynamic module"),
        "says what to load instead:\n{err}"
    );
}

#[test]
fn cli_check_validates_the_schema() {
    let good = write_temp("schema-good.json", &config());
    let out = cli().arg("check").arg(&good).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("note: json_schema is set: load api_guard_full.wasm"),
        "{stdout}"
    );

    let out = cli()
        .arg("check")
        .arg("--explain")
        .arg(&good)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("satisfying json_schema (draft 2020-12)")
            && stdout.contains("satisfying json_schema (draft 7)"),
        "{stdout}"
    );

    let bad = write_temp(
        "schema-bad.json",
        r##"{"routes": [{"name": "a", "match": {"prefix": "/a"},
             "json_schema": {"type": "object", "properties": {"x": {"$ref": "#/$defs/nope"}}}}]}"##,
    );
    let out = cli().arg("check").arg(&bad).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("routes[0].json_schema"), "{stderr}");
    assert!(stderr.contains("#/$defs/nope"), "boon's reason: {stderr}");
}
