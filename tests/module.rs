//! What only the native delivery (the dynamic module) has to prove: a panic inside the
//! module never reaches Envoy. The request whose handling panicked gets 500
//! `internal_error` in the SPEC's JSON shape and is counted; the proxy serves the next one.
//!
//! A panic is forced with the debug build's probe (`API_GUARD_DEBUG_PANIC_PATH`: a request
//! to that path panics inside the driver while it reads the request, a response carrying
//! `x-api-guard-debug-panic` while it reads the response); the probe is not compiled into
//! release builds, which the last test checks against the shipped `.so`.
//! Both load the module explicitly, so they run whenever the native delivery is asked for
//! (API_GUARD_DELIVERY=native or both); the wasm filter has no in-process panic to guard
//! (its VM aborts).

mod common;
use common::*;

const CFG: &str = r#"{
  "routes": [
    {"name": "open", "match": {"prefix": "/"}, "auth": {"mode": "none"}}
  ],
  "default_route": {"auth": {"mode": "none"}}
}"#;

const PROBE: &str = "/__api_guard_panic_probe";

fn native_only() -> bool {
    if !native_requested() {
        eprintln!("skipped: API_GUARD_DELIVERY=wasm");
        return false;
    }
    true
}

#[test]
fn a_panic_answers_500_internal_error_and_the_proxy_serves_the_next_request() {
    if !native_only() {
        return;
    }
    let envoy = Envoy::builder(CFG)
        .module(debug_module_path())
        .env("API_GUARD_DEBUG_PANIC_PATH", PROBE)
        .start();
    assert_eq!(envoy.get("/before").status, 200);
    // Several panics, interleaved with normal requests over fresh connections (both
    // workers): every panic is answered, none takes a worker or the process down.
    for i in 0..6 {
        let r = envoy.get(PROBE);
        let body = r.assert_error(500, "internal_error");
        assert_eq!(body["message"], "the filter failed on this request");
        // The usual local-reply headers, security headers included.
        assert_eq!(
            r.header("x-content-type-options"),
            Some("nosniff"),
            "{:?}",
            r.headers
        );
        let ok = envoy.get(&format!("/after/{i}"));
        assert_eq!(ok.status, 200, "request after panic #{i}: {}", ok.text());
    }
    assert!(
        envoy.received().iter().all(|r| r.path != PROBE),
        "a request whose handling panicked reached the upstream"
    );
    assert_eq!(envoy.stat("wasmcustom.api_guard.denied.internal_error"), 6);
    assert_eq!(envoy.stat("wasmcustom.api_guard.allowed"), 7);
    let logs = envoy.logs();
    assert!(
        logs.contains("api-guard: panic in a Request hook"),
        "no panic log line"
    );
    assert!(
        logs.contains(r#""reason":"internal_error""#),
        "no deny log line for the panic"
    );
}

#[test]
fn a_panic_on_the_response_path_resets_that_stream_only() {
    if !native_only() {
        return;
    }
    let envoy = Envoy::builder(CFG)
        .module(debug_module_path())
        .env("API_GUARD_DEBUG_PANIC_PATH", PROBE)
        .start();
    // The upstream's answer carries the response probe: the module panics while adding its
    // response headers, after the request went upstream. The response may be on its way, so
    // the stream is reset rather than answered: the client gets no 200.
    let r = envoy
        .req("GET", "/answer")
        .header("x-echo-header", "x-api-guard-debug-panic: 1")
        .timeout(std::time::Duration::from_secs(5))
        .send_opt();
    assert!(
        r.as_ref().is_none_or(|r| r.status != 200),
        "a response whose handling panicked was delivered: {r:?}"
    );
    assert!(envoy.received().iter().any(|r| r.path == "/answer"));
    for i in 0..3 {
        let ok = envoy.get(&format!("/next/{i}"));
        assert_eq!(ok.status, 200, "{}", ok.text());
        assert_eq!(ok.header("x-content-type-options"), Some("nosniff"));
    }
    assert_eq!(envoy.stat("wasmcustom.api_guard.denied.internal_error"), 1);
    assert!(
        envoy.logs().contains("api-guard: panic in a Response hook"),
        "no panic log line"
    );
}

#[test]
fn release_module_has_no_panic_probe() {
    if !native_only() {
        return;
    }
    // The shipped .so with the probe's variable set: the path is an ordinary request.
    let envoy = Envoy::builder(CFG)
        .module(module_path())
        .env("API_GUARD_DEBUG_PANIC_PATH", PROBE)
        .start();
    let r = envoy.get(PROBE);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(envoy.received().iter().any(|r| r.path == PROBE));
    let r = envoy
        .req("GET", "/answer")
        .header("x-echo-header", "x-api-guard-debug-panic: 1")
        .send();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(envoy.stat("wasmcustom.api_guard.denied.internal_error"), 0);
}
