//! Request hygiene (issue 13, SPEC section 2) through a real Envoy with 2 workers, for the
//! delivery under test (the harness runs the other one too): `max_body_bytes` (413, chunked
//! bodies included, the upstream never sees a byte of a refused body), `content_types` (415)
//! and `backend_ceiling` (503 with `retry-after`, exact across workers, released on every
//! stream end). One Envoy serves every route, so the whole file costs one Envoy start.

mod common;

use common::*;
use std::io::{BufReader, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

const CONFIG: &str = r#"{
  "routes": [
    { "name": "small", "match": { "path": "/small" }, "auth": { "mode": "none" },
      "max_body_bytes": 16 },
    { "name": "json", "match": { "path": "/json" }, "auth": { "mode": "none" },
      "content_types": ["application/json"] },
    { "name": "slow", "match": { "prefix": "/slow" }, "auth": { "mode": "none" },
      "backend_ceiling": { "max_in_flight": 2 } },
    { "name": "rps", "match": { "prefix": "/rps" }, "auth": { "mode": "none" },
      "backend_ceiling": { "max_rps": 3 } }
  ],
  "default_route": { "auth": { "mode": "none" } }
}"#;

/// The SPEC's JSON error body plus the security headers every local reply carries.
fn assert_refused(r: &Resp, status: u16, error: &str) {
    r.assert_error(status, error);
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(
        r.header("strict-transport-security"),
        Some("max-age=31536000; includeSubDomains")
    );
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
}

/// Requests the upstream started receiving, per Envoy (what the router sent upstream).
fn upstream_requests(envoy: &Envoy) -> u64 {
    envoy.stat("cluster.upstream.upstream_rq_total")
}

fn received_on(envoy: &Envoy, prefix: &str) -> usize {
    envoy
        .received()
        .iter()
        .filter(|r| r.path.starts_with(prefix))
        .count()
}

/// Polls until `f` holds (or the deadline passes: then the caller's assert fails).
fn eventually(deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A GET the echo upstream holds for `delay_ms` before answering; the response is read later
/// (or never: dropping the socket is a client reset).
fn held(port: u16, path: &str, delay_ms: u64) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: localhost\r\nx-echo-delay-ms: {delay_ms}\r\n\
         connection: close\r\n\r\n"
    )
    .expect("send a held request");
    s
}

fn response(s: TcpStream) -> Resp {
    read_response(&mut BufReader::new(s)).expect("a response")
}

#[test]
fn request_hygiene_through_envoy() {
    let envoy = Envoy::builder(CONFIG).exact_balance().start();
    let mut overloaded = 0u64;

    // ---- max_body_bytes: 413 ---------------------------------------------------------------
    let before = upstream_requests(&envoy);
    // A declared length over the limit: refused at the headers.
    let r = envoy.req("POST", "/small").body(vec![b'a'; 17]).send();
    assert_refused(&r, 413, "payload_too_large");
    // Chunked, the whole body at once (3 chunks, 40 bytes).
    let r = envoy
        .req("POST", "/small")
        .chunked(vec![vec![b'b'; 10], vec![b'c'; 10], vec![b'd'; 20]])
        .send();
    assert_refused(&r, 413, "payload_too_large");
    // Chunked and still streaming: refused as soon as the running total passes the limit,
    // without waiting for the end of the body.
    let mut s = TcpStream::connect(("127.0.0.1", envoy.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        b"POST /small HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n\r\n\
          a\r\n0123456789\r\na\r\n0123456789\r\n",
    )
    .unwrap();
    let r = response(s);
    assert_refused(&r, 413, "payload_too_large");
    assert_eq!(
        upstream_requests(&envoy),
        before,
        "the upstream never saw a refused body, not even its headers"
    );
    assert_eq!(received_on(&envoy, "/small"), 0);
    // Within the limit, chunked or not: forwarded intact.
    let r = envoy
        .req("POST", "/small")
        .chunked(vec![b"hello ".to_vec(), b"world!".to_vec()])
        .send();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["body"], "hello world!");
    let r = envoy.req("POST", "/small").body(vec![b'e'; 16]).send();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["body_len"], 16);

    // ---- content_types: 415 ----------------------------------------------------------------
    let r = envoy.req("POST", "/json").body("{}").send();
    let v = r.json();
    assert_refused(&r, 415, "unsupported_media_type");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("application/json"),
        "names what is accepted: {v}"
    );
    let r = envoy
        .req("POST", "/json")
        .header("content-type", "text/plain")
        .body("{}")
        .send();
    assert_refused(&r, 415, "unsupported_media_type");
    let r = envoy
        .req("POST", "/json")
        .header("content-type", "Application/JSON; charset=utf-8")
        .body("{}")
        .send();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.upstream_header("content-type").as_deref(),
        Some("Application/JSON; charset=utf-8")
    );
    assert_eq!(envoy.get("/json").status, 200, "no body, nothing to check");

    // ---- backend_ceiling.max_in_flight: 2, across both workers -----------------------------
    // exact_balance: the two held connections land on different workers, so only a count
    // shared by the workers refuses the third.
    let ends_first = held(envoy.port, "/slow/a", 1500);
    let _held = held(envoy.port, "/slow/b", 15_000);
    assert!(
        eventually(Duration::from_secs(5), || received_on(&envoy, "/slow") == 2),
        "both held requests reach the upstream"
    );
    let r = envoy.get("/slow/c");
    assert_refused(&r, 503, "backend_overloaded");
    overloaded += 1;
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["retry_after"], 1);
    // The first one ends normally: its slot comes back.
    assert_eq!(response(ends_first).status, 200);
    assert!(
        eventually(Duration::from_secs(3), || {
            let r = envoy.get("/slow/d");
            overloaded += u64::from(r.status == 503);
            r.status == 200
        }),
        "a new request passes once a held one ended"
    );
    // A client reset of a held request gives its slot back too.
    let reset = held(envoy.port, "/slow/e", 15_000);
    assert!(eventually(Duration::from_secs(5), || received_on(
        &envoy, "/slow/e"
    ) == 1));
    assert_refused(&envoy.get("/slow/f"), 503, "backend_overloaded");
    overloaded += 1;
    reset.shutdown(Shutdown::Both).unwrap();
    drop(reset);
    assert!(
        eventually(Duration::from_secs(3), || {
            let r = envoy.get("/slow/g");
            overloaded += u64::from(r.status == 503);
            r.status == 200
        }),
        "a new request passes once a held one was reset by its client"
    );

    // ---- backend_ceiling.max_rps: 3 --------------------------------------------------------
    let start = Instant::now();
    let statuses: Vec<Resp> = (0..8).map(|_| envoy.get("/rps")).collect();
    let elapsed_ms = start.elapsed().as_millis() as u64;
    let ok = statuses.iter().filter(|r| r.status == 200).count() as u64;
    let denied: Vec<&Resp> = statuses.iter().filter(|r| r.status != 200).collect();
    assert!(
        statuses[..3].iter().all(|r| r.status == 200),
        "a full bucket admits 3"
    );
    assert!(
        ok <= 3 + 1 + elapsed_ms * 3 / 1000,
        "{ok} admitted in {elapsed_ms} ms"
    );
    assert!(!denied.is_empty(), "8 requests in {elapsed_ms} ms");
    for r in &denied {
        assert_refused(r, 503, "backend_overloaded");
        let secs: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!(secs >= 1);
    }
    overloaded += denied.len() as u64;

    // ---- every refusal counted under its code ----------------------------------------------
    assert_eq!(
        envoy.stat("wasmcustom.api_guard.denied.payload_too_large"),
        3
    );
    assert_eq!(
        envoy.stat("wasmcustom.api_guard.denied.unsupported_media_type"),
        2
    );
    assert_eq!(
        envoy.stat("wasmcustom.api_guard.denied.backend_overloaded"),
        overloaded
    );
    let logs = envoy.logs();
    assert!(logs.contains(r#""reason":"unsupported_media_type""#));
    assert!(logs.contains(r#""policy":"backend_ceiling.max_in_flight""#));
}
