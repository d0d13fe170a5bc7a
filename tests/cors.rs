//! CORS through a real Envoy: preflights answered locally (204 or 403 with no
//! `access-control-*` headers, never reaching the upstream), strict origin matching, headers
//! on actual responses and local replies, `vary: origin` always, and config lint.

mod common;

use common::*;

/// Exact origins, and a pattern on another domain so the two kinds of rule are told apart.
/// The default route needs credentials: a preflight must be answered without any.
const CORS: &str = r#"{
  "api_keys": {"header": "x-api-key", "keys": []},
  "cors": {
    "allow_origins": ["https://app.example.com", "http://localhost:3000"],
    "allow_origin_patterns": ["https://*.partner.example.org"],
    "allow_methods": ["GET", "POST", "PUT", "DELETE"],
    "allow_headers": ["authorization", "content-type", "x-api-key"],
    "expose_headers": ["ratelimit", "retry-after", "x-request-id"],
    "allow_credentials": true,
    "max_age_s": 3600
  },
  "routes": [{"name": "public", "match": {"prefix": "/public"}, "auth": {"mode": "none"}}],
  "default_route": {"auth": {"mode": "required", "methods": ["api_key"]}}
}"#;

fn preflight(envoy: &Envoy, origin: &str, method: &str, headers: Option<&str>) -> Resp {
    let mut r = envoy
        .req("OPTIONS", "/api/orders")
        .header("origin", origin)
        .header("access-control-request-method", method);
    if let Some(h) = headers {
        r = r.header("access-control-request-headers", h);
    }
    r.send()
}

fn cors_headers(r: &Resp) -> Vec<(String, String)> {
    r.headers
        .iter()
        .filter(|(k, _)| k.starts_with("access-control-"))
        .cloned()
        .collect()
}

fn assert_vary_origin(r: &Resp) {
    let vary = r.header_all("vary").join(", ");
    assert!(
        vary.split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("origin")),
        "vary should name origin, got {vary:?} (status {})",
        r.status
    );
}

fn assert_refused(r: &Resp, what: &str) {
    let body = r.assert_error(403, "cors_rejected");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(
        cors_headers(r).is_empty(),
        "{what}: a refused preflight carries no access-control-* header: {:?}",
        r.headers
    );
    assert_vary_origin(r);
}

#[test]
fn an_allowed_preflight_is_answered_by_the_filter_without_credentials() {
    let envoy = Envoy::start(CORS);
    let r = preflight(
        &envoy,
        "https://app.example.com",
        "PUT",
        Some("Content-Type, X-API-Key"),
    );
    assert_eq!(r.status, 204, "{:?} {}", r.headers, r.text());
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(
        r.header("access-control-allow-methods"),
        Some("GET, POST, PUT, DELETE")
    );
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("authorization, content-type, x-api-key")
    );
    assert_eq!(r.header("access-control-max-age"), Some("3600"));
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(r.header("access-control-expose-headers"), None);
    assert_eq!(r.header_all("access-control-allow-origin").len(), 1);
    assert_vary_origin(&r);
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert!(r.body.is_empty());

    // A pattern origin, and a preflight asking for no headers.
    let r = preflight(&envoy, "https://shop.partner.example.org", "GET", None);
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://shop.partner.example.org")
    );

    assert!(
        envoy.received().is_empty(),
        "preflights must never reach the upstream"
    );
    assert_eq!(envoy.stat("wasmcustom.api_guard.answered"), 2);
}

#[test]
fn disallowed_origins_are_refused() {
    let envoy = Envoy::start(CORS);
    for origin in [
        "https://app.example.com.evil.com",
        "https://evilapp.example.com",
        "https://a.b.partner.example.org",
        "https://partner.example.org",
        "https://evilpartner.example.org",
        "http://app.example.com",
        "https://app.example.com:8443",
        "http://localhost:3001",
        "https://localhost:3000",
        "null",
        "https://app.example.com/",
        "https://app.example.com.",
        "https://user@app.example.com",
        "app.example.com",
        "https://xn--pp-8kc.example.com",
        "https://app.exa%6Dple.com",
        "https://app.example.com, https://evil.com",
    ] {
        assert_refused(&preflight(&envoy, origin, "GET", None), origin);
    }
    // Raw bytes no HTTP library would send: a non-ASCII host.
    let raw = "OPTIONS /api HTTP/1.1\r\nhost: x\r\nconnection: close\r\norigin: https://app.ex\u{e4}mple.com\r\naccess-control-request-method: GET\r\n\r\n";
    let r = send_raw(
        envoy.port,
        raw.as_bytes(),
        std::time::Duration::from_secs(20),
    )
    .expect("a response");
    // Envoy itself may refuse the bytes (400); the filter must never allow them.
    assert!(r.status == 403 || r.status == 400, "status {}", r.status);
    assert!(cors_headers(&r).is_empty());

    assert!(envoy.received().is_empty());
    assert!(envoy.stat("wasmcustom.api_guard.denied.cors_rejected") >= 17);
    let logs = envoy.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("api_guard.deny") && l.contains("cors_rejected"))
        .expect("a deny log line");
    let json = &line[line.find('{').unwrap()..];
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(v["status"], 403);
    assert_eq!(v["policy"], "cors");
}

#[test]
fn case_and_default_port_do_not_change_the_origin() {
    let envoy = Envoy::start(CORS);
    for origin in [
        "https://APP.Example.com",
        "https://app.example.com:443",
        "https://Shop.Partner.Example.org",
    ] {
        let r = preflight(&envoy, origin, "GET", None);
        assert_eq!(r.status, 204, "{origin}");
        // The echo is the request's own origin, as browsers compare it byte for byte.
        assert_eq!(r.header("access-control-allow-origin"), Some(origin));
    }
}

#[test]
fn disallowed_methods_and_headers_are_refused() {
    let envoy = Envoy::start(CORS);
    let o = "https://app.example.com";
    assert_refused(&preflight(&envoy, o, "PATCH", None), "PATCH");
    assert_refused(&preflight(&envoy, o, "put", None), "lower-case put");
    assert_refused(&preflight(&envoy, o, "HEAD", None), "HEAD, not listed");
    assert_refused(
        &preflight(&envoy, o, "GET", Some("content-type, x-admin")),
        "x-admin",
    );
    assert_refused(
        &preflight(&envoy, o, "GET", Some("content-type x-api-key")),
        "space-separated",
    );
    // Split over two header lines: every line is checked.
    let r = envoy
        .req("OPTIONS", "/api")
        .header("origin", o)
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "content-type")
        .header("access-control-request-headers", "x-admin")
        .send();
    assert_refused(&r, "second header line");
    // Tolerant list parsing: case, spaces, empty items.
    let r = preflight(&envoy, o, "POST", Some(" Authorization ,, content-type,"));
    assert_eq!(r.status, 204);
    assert!(envoy.received().is_empty());
}

#[test]
fn actual_requests_get_cors_headers_only_from_allowed_origins() {
    let envoy = Envoy::start(CORS);
    let r = envoy
        .req("GET", "/public/x")
        .header("origin", "https://app.example.com")
        .send();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(
        r.header("access-control-expose-headers"),
        Some("ratelimit, retry-after, x-request-id")
    );
    assert_eq!(r.header("access-control-allow-methods"), None);
    assert_vary_origin(&r);

    for origin in [
        Some("https://evil.example.com"),
        Some("null"),
        Some("https://app.example.com/"),
        None,
    ] {
        let mut q = envoy.req("GET", "/public/x");
        if let Some(o) = origin {
            q = q.header("origin", o);
        }
        let r = q.send();
        assert_eq!(r.status, 200, "{origin:?}: actual requests are not refused");
        assert!(cors_headers(&r).is_empty(), "{origin:?}: {:?}", r.headers);
        assert_vary_origin(&r);
    }
    assert_eq!(envoy.received().len(), 5);
}

#[test]
fn plain_options_is_an_ordinary_request() {
    let envoy = Envoy::start(CORS);
    // No preflight headers at all: routed and authenticated like any request.
    let r = envoy.req("OPTIONS", "/public/x").send();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["method"], "OPTIONS");
    // An origin but no access-control-request-method: an actual request.
    let r = envoy
        .req("OPTIONS", "/public/x")
        .header("origin", "https://app.example.com")
        .send();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    // access-control-request-method without an origin: not a preflight either.
    let r = envoy
        .req("OPTIONS", "/public/x")
        .header("access-control-request-method", "DELETE")
        .send();
    assert_eq!(r.status, 200);
    assert_eq!(envoy.received().len(), 3);
}

#[test]
fn vary_is_merged_with_the_upstreams_and_upstream_cors_headers_do_not_leak() {
    let envoy = Envoy::start(CORS);
    let r = envoy
        .req("GET", "/public/x")
        .header("origin", "https://app.example.com")
        .header("x-echo-header", "vary: Accept-Encoding")
        .send();
    assert_eq!(r.header_all("vary").join(", "), "Accept-Encoding, origin");

    let r = envoy
        .req("GET", "/public/x")
        .header("x-echo-header", "vary: Origin")
        .send();
    assert_eq!(r.header_all("vary"), vec!["Origin"], "no duplicate token");

    // An upstream that answers `*` for everyone cannot widen the filter's policy...
    let r = envoy
        .req("GET", "/public/x")
        .header("origin", "https://evil.example.com")
        .header("x-echo-header", "access-control-allow-origin: *")
        .send();
    assert_eq!(r.status, 200);
    assert!(cors_headers(&r).is_empty(), "{:?}", r.headers);
    // ...and for an allowed origin the filter's value replaces the upstream's.
    let r = envoy
        .req("GET", "/public/x")
        .header("origin", "https://app.example.com")
        .header("x-echo-header", "access-control-allow-origin: *")
        .send();
    assert_eq!(
        r.header_all("access-control-allow-origin"),
        vec!["https://app.example.com"]
    );
}

#[test]
fn local_replies_carry_cors_headers() {
    let envoy = Envoy::start(CORS);
    // 400 from the path checks, before any other stage.
    let r = envoy
        .req("GET", "/public/a%2Fb")
        .header("origin", "https://app.example.com")
        .send();
    r.assert_error(400, "invalid_request");
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(
        r.header("access-control-expose-headers"),
        Some("ratelimit, retry-after, x-request-id")
    );
    assert_vary_origin(&r);
    let r = envoy
        .req("GET", "/public/a%2Fb")
        .header("origin", "https://evil.example.com")
        .send();
    r.assert_error(400, "invalid_request");
    assert!(cors_headers(&r).is_empty());
    assert_vary_origin(&r);
}

/// 401 (webhook signature) and 429 (rate limit) replies carry the CORS headers, so a browser
/// app can read the error; a preflight is answered before any limit and costs no token.
#[test]
fn denials_from_other_stages_carry_cors_headers() {
    let envoy = Envoy::start(
        r#"{
      "cors": {"allow_origins": ["https://app.example.com"], "allow_methods": ["GET", "POST"],
               "expose_headers": ["retry-after"], "allow_credentials": true},
      "rate_limits": {"per-ip": {"key": ["ip"], "capacity": 2, "refill_tokens": 1,
                                 "refill_period_s": 3600}},
      "webhooks": {"gh": {"scheme": "github", "secrets": ["s3cret-for-the-cors-test"]}},
      "routes": [{"name": "hook", "match": {"methods": ["POST"], "path": "/hook"},
                  "auth": {"mode": "none"}, "webhook": "gh"}],
      "default_route": {"rate_limits": ["per-ip"]}
    }"#,
    );
    let o = "https://app.example.com";
    let r = envoy
        .req("POST", "/hook")
        .header("origin", o)
        .header("x-hub-signature-256", "sha256=00")
        .body("{}")
        .send();
    r.assert_error(401, "invalid_signature");
    assert_eq!(r.header("access-control-allow-origin"), Some(o));
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    assert_vary_origin(&r);

    // Preflights first: answered before the per-IP limit, they take none of its 2 tokens.
    for _ in 0..3 {
        assert_eq!(preflight(&envoy, o, "GET", None).status, 204);
    }
    for _ in 0..2 {
        assert_eq!(
            envoy.req("GET", "/x").header("origin", o).send().status,
            200
        );
    }
    let r = envoy.req("GET", "/x").header("origin", o).send();
    r.assert_error(429, "rate_limit_exceeded");
    assert_eq!(r.header("access-control-allow-origin"), Some(o));
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(
        r.header("access-control-expose-headers"),
        Some("retry-after")
    );
    assert!(r.header("retry-after").is_some());
    assert_vary_origin(&r);
    // From a disallowed origin the 429 has no CORS headers, vary all the same.
    let r = envoy
        .req("GET", "/x")
        .header("origin", "https://evil.example.com")
        .send();
    r.assert_error(429, "rate_limit_exceeded");
    assert!(cors_headers(&r).is_empty(), "{:?}", r.headers);
    assert_vary_origin(&r);
}

#[test]
fn without_a_cors_section_preflights_go_upstream_untouched() {
    let envoy = Envoy::start(r#"{"default_route":{"auth":{"mode":"none"}}}"#);
    let r = preflight(&envoy, "https://app.example.com", "PUT", None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["method"], "OPTIONS");
    assert!(cors_headers(&r).is_empty());
    assert!(r.header("vary").is_none());
}

/// Config lint: each bad `cors` section stops Envoy with a log naming its JSON path, and
/// `api-guard check` reports the same path.
#[test]
fn bad_cors_configs_are_refused_by_envoy_and_by_check() {
    let cases = [
        (
            r#"{"cors":{"allow_origins":["*"],"allow_credentials":true}}"#,
            "cors.allow_origins[0]",
        ),
        (
            r#"{"cors":{"allow_origins":["https://a.example.com","null"]}}"#,
            "cors.allow_origins[1]",
        ),
        (
            r#"{"cors":{"allow_origin_patterns":["https://app.*.example.com"]}}"#,
            "cors.allow_origin_patterns[0]",
        ),
        (
            r#"{"cors":{"allow_origin_patterns":["https://*example.com"]}}"#,
            "cors.allow_origin_patterns[0]",
        ),
        (
            r#"{"cors":{"allow_origins":["https://a.example.com/"]}}"#,
            "cors.allow_origins[0]",
        ),
        (
            r#"{"cors":{"allow_origins":["https://a.example.com"],"allow_methods":[]}}"#,
            "cors.allow_methods",
        ),
        (
            r#"{"cors":{"allow_origins":["https://a.example.com"],"allow_headers":["X-Api-Key"]}}"#,
            "cors.allow_headers[0]",
        ),
    ];
    for (cfg, path) in cases {
        let file = write_temp("cors.json", cfg);
        let out = cli().arg("check").arg(&file).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cfg}: {stderr}");
        assert!(stderr.contains(path), "check should name {path}: {stderr}");
    }
    // Envoy: a few representative ones (each start costs a VM load).
    for (cfg, path) in [cases[0], cases[1], cases[2], cases[5]] {
        let err = Envoy::builder(cfg)
            .try_start()
            .err()
            .unwrap_or_else(|| panic!("Envoy must refuse {cfg}"));
        assert!(err.contains(path), "Envoy's log should name {path}:\n{err}");
    }
    // And a good one passes, with its warning-free summary.
    let file = write_temp("cors.json", CORS);
    let out = cli().arg("check").arg(&file).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
