//! Safe by default (issue 14), through a real Envoy with 2 workers and an upstream that reports
//! what it received: the client IP is never chosen by the client, a rule no request can
//! satisfy is refused at load, API keys stay at the edge, and a path or method that a
//! permissive backend reads differently from us never reaches it.

mod common;

use common::*;
use sha2::{Digest, Sha256};

fn sha_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The demo's shape: a public prefix beside a protected one.
fn demo_like(forward: Option<bool>) -> String {
    let forward = forward
        .map(|f| format!(r#", "forward": {f}"#))
        .unwrap_or_default();
    format!(
        r#"{{
      "api_keys": {{ "header": "x-api-key"{forward},
        "keys": [ {{ "id": "acme", "sha256": "{}", "scopes": ["read:orders"] }} ] }},
      "routes": [
        {{ "name": "public", "match": {{ "prefix": "/public" }}, "auth": {{ "mode": "none" }} }},
        {{ "name": "orders", "match": {{ "prefix": "/api/orders" }},
          "auth": {{ "mode": "required", "methods": ["api_key"], "scopes_all": ["read:orders"] }} }}
      ],
      "default_route": {{ "auth": {{ "mode": "required", "methods": ["api_key"] }} }}
    }}"#,
        sha_hex("acme-secret")
    )
}

// ---- 1. client IP --------------------------------------------------------------------------

#[test]
fn a_trusted_hop_count_without_saying_who_appended_is_refused_at_load() {
    let cfg = r#"{
      "client_ip": { "xff_trusted_hops": 1 },
      "default_route": { "auth": { "mode": "none" } }
    }"#;
    let Err(err) = Envoy::builder(cfg).try_start() else {
        panic!("a config that lets the client pick its IP must not load");
    };
    assert!(
        err.contains("client_ip.use_remote_address"),
        "the log names the setting to add:\n{err}"
    );
}

const PER_IP: &str = r#""rate_limits": { "per-ip": { "key": ["ip"], "capacity": 1, "refill_tokens": 1, "refill_period_s": 600 } },
      "default_route": { "auth": { "mode": "none" }, "rate_limits": ["per-ip"] }"#;

/// Sends from "client" 203.0.113.7 behind one trusted proxy, each time with a different
/// forged entry in front; returns the statuses.
fn forged_left_entries(envoy: &Envoy) -> Vec<u16> {
    ["1.1.1.1", "2.2.2.2", "3.3.3.3"]
        .iter()
        .map(|forged| {
            envoy
                .req("GET", "/x")
                .header("x-forwarded-for", &format!("{forged}, 203.0.113.7"))
                .send()
                .status
        })
        .collect()
}

#[test]
fn the_recommended_setup_lets_envoy_resolve_the_client_and_ignores_forged_entries() {
    // Envoy's connection manager resolves the client (use_remote_address + one trusted hop);
    // the filter reads source.address (xff_trusted_hops 0).
    let cfg = format!(r#"{{ "client_ip": {{ "xff_trusted_hops": 0 }}, {PER_IP} }}"#);
    let envoy = Envoy::builder(&cfg)
        .use_remote_address(true)
        .xff_num_trusted_hops(1)
        .start();
    assert_eq!(forged_left_entries(&envoy), vec![200, 429, 429]);
    let other = envoy
        .req("GET", "/x")
        .header("x-forwarded-for", "203.0.113.8")
        .send();
    assert_eq!(other.status, 200, "another client has its own bucket");
}

#[test]
fn envoys_default_connection_manager_with_the_filter_told_so_keys_on_the_trusted_hop() {
    // The connection manager at Envoy's default (use_remote_address: false) appends nothing;
    // the filter, told so, takes the last entry. The old default (true) took the forged one.
    let cfg = format!(
        r#"{{ "client_ip": {{ "xff_trusted_hops": 1, "use_remote_address": false }}, {PER_IP} }}"#
    );
    let envoy = Envoy::builder(&cfg).use_remote_address(false).start();
    assert_eq!(forged_left_entries(&envoy), vec![200, 429, 429]);
}

// ---- 2. rules no request can satisfy ---------------------------------------------------------

#[test]
fn a_role_rule_whose_providers_read_no_roles_is_refused_at_load() {
    let cfg = r#"{
      "jwt_providers": { "idp": { "issuer": "https://idp", "algorithms": ["ES256"],
        "local_jwks": { "keys": [ { "kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256",
          "x": "ybh8l0WlnHOEVpDnvnBFSAlmuZsuMamrObBqEuEbqRc",
          "y": "kNtUTlZ7zuOTOcCiQ8xtof7PXsHY8nlW8URSf6XJdP8" } ] } } },
      "routes": [ { "name": "admin", "match": { "prefix": "/admin" },
        "auth": { "mode": "required", "methods": ["jwt:idp"], "roles_any": ["admin"] } } ],
      "default_route": { "auth": { "mode": "none" } }
    }"#;
    let Err(err) = Envoy::builder(cfg).try_start() else {
        panic!("a role rule no token can pass must not load");
    };
    assert!(err.contains("roles_any"), "{err}");
    assert!(
        err.contains("roles_claim"),
        "the log says what to add:\n{err}"
    );
}

// ---- 5. API keys stay at the edge ------------------------------------------------------------

#[test]
fn the_api_key_is_not_forwarded_upstream_unless_asked() {
    let envoy = Envoy::start(&demo_like(None));
    let r = envoy
        .req("GET", "/api/orders")
        .header("x-api-key", "acme-secret")
        .send();
    assert_eq!(r.status, 200);
    let got = envoy.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].header("x-api-key"), None, "the credential is hidden");
    assert_eq!(
        got[0].header("x-auth-client"),
        Some("acme"),
        "the verified identity is"
    );
    drop(envoy);

    let envoy = Envoy::start(&demo_like(Some(true)));
    let r = envoy
        .req("GET", "/api/orders")
        .header("x-api-key", "acme-secret")
        .send();
    assert_eq!(r.status, 200);
    assert_eq!(envoy.received()[0].header("x-api-key"), Some("acme-secret"));
}

// ---- 7. authorized path = forwarded path ------------------------------------------------------

const CONFUSING_PATHS: &[&str] = &[
    "/public/..;/api/orders",
    "/public/..;x=1/api/orders",
    "/public/%2e%2e;/api/orders",
    "/public/..%3b/api/orders",
    "/public/..%3B/api/orders",
    "/public;/../api/orders",
    "/public/%252e%252e/api/orders",
    "/public/..%252f/api/orders",
    "/public/%c0%ae%c0%ae/api/orders",
    "/public/%ef%bc%8e%ef%bc%8e/api/orders",
    "/public/%e2%80%a4%e2%80%a4/api/orders",
    "/public/x/..%00/api",
    "/public/%09../api/orders",
    "/public/%0d%0a/api/orders",
    "/public/%7f/api/orders",
    "/public/%ff/api/orders",
    "/public/%ef%bc%8f..%ef%bc%8fapi/orders",
];

#[test]
fn paths_that_backends_read_differently_are_refused_before_the_upstream() {
    let envoy = Envoy::start(&demo_like(None));
    for path in CONFUSING_PATHS {
        let r = envoy.req("GET", path).send();
        let v = r.assert_error(400, "invalid_request");
        assert!(
            v["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{path}: the body says why"
        );
    }
    assert!(
        envoy.received().is_empty(),
        "nothing reached the upstream: {:?}",
        envoy
            .received()
            .iter()
            .map(|r| r.path.clone())
            .collect::<Vec<_>>()
    );
    // The ordinary spellings still work.
    for path in [
        "/public/a",
        "/public/a%20b",
        "/public/caf%c3%a9",
        "/public/a/../b",
    ] {
        assert_eq!(envoy.req("GET", path).send().status, 200, "{path}");
    }
    assert_eq!(envoy.received().len(), 4);
}

#[test]
fn method_override_headers_never_reach_the_upstream() {
    let envoy = Envoy::start(&demo_like(None));
    let r = envoy
        .req("GET", "/api/orders")
        .header("x-api-key", "acme-secret")
        .header("x-http-method-override", "DELETE")
        .header("x-method-override", "DELETE")
        .header("x-http-method", "DELETE")
        .send();
    assert_eq!(r.status, 200);
    let got = envoy.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].method, "GET");
    for h in [
        "x-http-method-override",
        "x-method-override",
        "x-http-method",
    ] {
        assert_eq!(got[0].header(h), None, "{h} was stripped");
    }
}

// ---- 6. `api-guard check` on the whole Envoy config -------------------------------------------

/// Each trap config under tests/configs/, with what `check` must say about it: exit code,
/// and a line (error or warning) containing each needle.
const TRAPS: &[(&str, i32, &[&str])] = &[
    (
        "trap-client-ip.yaml",
        1,
        &[
            "error: `static_resources.listeners[0].filter_chains[0].filters[0].typed_config.http_filters[0].typed_config.config.configuration.value (client_ip.use_remote_address)`",
            "warning: `static_resources.listeners[0].filter_chains[0].filters[0].typed_config.use_remote_address`",
        ],
    ),
    (
        "trap-webhook-hang.yaml",
        1,
        &["error: `static_resources.listeners[0].filter_chains[0].filters[0].typed_config.http_filters[0].typed_config.config.allow_on_headers_stop_iteration`"],
    ),
    ("trap-roles-claim.yaml", 1, &["`routes[0].auth.roles_any`", "roles_claim"]),
    ("trap-missing-cluster.yaml", 1, &["(quota.cluster)`: cluster `quota` is not defined"]),
    ("trap-after-router.yaml", 1, &["after the router"]),
    (
        "trap-fail-open.yaml",
        0,
        &["warning: `static_resources.listeners[0].filter_chains[0].filters[0].typed_config.http_filters[0].typed_config.config.failure_policy`: FAIL_OPEN"],
    ),
];

#[test]
fn check_finds_every_trap_in_a_whole_envoy_config_and_names_its_path() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/configs");
    for (file, code, needles) in TRAPS {
        let out = cli().arg("check").arg(dir.join(file)).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(*code), "{file}:\n{text}");
        assert!(
            text.contains("found: api-guard wasm filter"),
            "{file}:\n{text}"
        );
        for n in *needles {
            assert!(text.contains(n), "{file}: missing {n:?} in:\n{text}");
        }
    }
    // The shipped configs pass clean (each trap above is absent from them).
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = cli()
        .arg("check")
        .arg(repo.join("envoy/demo.yaml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("0 warnings"), "{text}");
    // The native demo too (its secret comes from Envoy's environment, as `make run` sets it).
    let out = cli()
        .arg("check")
        .arg(repo.join("envoy/demo-native.yaml"))
        .env("DEMO_GITHUB_WEBHOOK_SECRET", "demo-webhook-secret")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("found: api-guard dynamic module"), "{text}");
    assert!(text.contains("0 warnings"), "{text}");
}

#[test]
fn envoy_itself_loads_the_trap_configs_that_check_refuses() {
    // Without `check`, nothing stops these: Envoy's own validation accepts them. Two
    // exceptions: the filter itself now refuses the role rule when Envoy loads it, and Envoy
    // refuses a filter after the router (check says so too, without needing Envoy).
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/configs");
    let wasm = wasm_path();
    for (file, _, _) in TRAPS {
        let text = std::fs::read_to_string(dir.join(file))
            .unwrap()
            .replace("/etc/envoy/api_guard.wasm", &wasm.display().to_string());
        let copy = write_temp(file, &text);
        let out = std::process::Command::new(envoy_bin())
            .args(["--mode", "validate", "-c"])
            .arg(&copy)
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        let refused_because = match *file {
            "trap-roles-claim.yaml" => Some("roles_claim"),
            "trap-after-router.yaml" => Some("must be the last filter"),
            _ => None,
        };
        if let Some(why) = refused_because {
            assert!(!out.status.success(), "{file}: Envoy loaded it");
            assert!(log.contains(why), "{file}:\n{log}");
        } else {
            assert!(out.status.success(), "{file}: Envoy refused it:\n{log}");
        }
    }
}
