//! Foundation behaviour through a real Envoy: security headers, local replies, path checks,
//! identity-header stripping, route matching, config refusal, stats and deny logs, the CLI.

mod common;

use common::*;

const PLAIN: &str = r#"{
  "security_headers": {"content-security-policy": "default-src 'none'", "permissions-policy": null},
  "routes": [
    {"name": "orders", "match": {"methods": ["GET"], "prefix": "/api/orders"}, "auth": {"mode": "none"}},
    {"name": "by-envoy-route", "match": {"route_name": "special"}, "auth": {"mode": "none"}}
  ],
  "default_route": {"auth": {"mode": "none"}}
}"#;

fn assert_security_headers(r: &Resp) {
    assert_eq!(
        r.header("strict-transport-security"),
        Some("max-age=31536000; includeSubDomains")
    );
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(
        r.header("referrer-policy"),
        Some("strict-origin-when-cross-origin")
    );
    assert_eq!(
        r.header("content-security-policy"),
        Some("default-src 'none'")
    );
    // `null` in security_headers removes a default.
    assert_eq!(r.header("permissions-policy"), None);
}

#[test]
fn proxied_and_local_replies_carry_security_headers() {
    let envoy = Envoy::start(PLAIN);
    let ok = envoy.get("/api/orders/7");
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_security_headers(&ok);
    assert_eq!(ok.header("x-frame-options"), Some("DENY"));
    assert_eq!(ok.header_all("x-frame-options").len(), 1);

    let bad = envoy.get("/api/orders%2F7");
    bad.assert_error(400, "invalid_request");
    assert_security_headers(&bad);
    assert_eq!(bad.header("x-frame-options"), Some("DENY"));
    assert_eq!(
        bad.header_all("x-content-type-options").len(),
        1,
        "no duplicates on local replies"
    );
}

#[test]
fn upstreams_own_security_header_is_kept() {
    let envoy = Envoy::start(PLAIN);
    let r = envoy
        .req("GET", "/x")
        .header("x-echo-header", "x-frame-options: SAMEORIGIN")
        .send();
    assert_eq!(r.status, 200);
    assert_eq!(r.header_all("x-frame-options"), vec!["SAMEORIGIN"]);
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
}

#[test]
fn identity_headers_from_clients_never_reach_the_upstream() {
    let envoy = Envoy::start(PLAIN);
    let r = envoy
        .req("GET", "/api/orders")
        .header("x-auth-subject", "admin")
        .header("X-Auth-Client", "root")
        .header("x-auth-tier", "internal")
        .header("x-auth-scopes", "admin:all")
        .header("x-auth-scopes", "again")
        .send();
    assert_eq!(r.status, 200);
    for h in [
        "x-auth-subject",
        "x-auth-client",
        "x-auth-tier",
        "x-auth-scopes",
    ] {
        assert_eq!(r.upstream_header(h), None, "{h} leaked upstream");
    }
    let got = envoy.received();
    let last = got.last().expect("upstream saw the request");
    assert!(last.header("x-auth-scopes").is_none());
    assert!(last.header("x-request-id").is_some_and(|v| !v.is_empty()));
}

#[test]
fn ambiguous_paths_are_refused_with_400_and_never_forwarded() {
    let envoy = Envoy::start(PLAIN);
    for p in [
        "/api%2forders",
        "/api%2Forders",
        "/api%5corders",
        "/api\\orders",
        "/..",
        "/../etc/passwd",
        "/a/../../b",
        "/a/%2e%2e/%2E%2E/b",
        "/a%zz",
        "/a%",
    ] {
        let r = envoy.get(p);
        r.assert_error(400, "invalid_request");
        assert_security_headers(&r);
    }
    assert!(
        envoy.received().is_empty(),
        "a refused path reached the upstream"
    );
    assert_eq!(
        envoy.stat("wasmcustom.api_guard.denied.invalid_request"),
        10
    );
}

#[test]
fn normalized_paths_still_match_their_route() {
    let cfg = r#"{
      "routes": [
        {"name": "orders", "match": {"prefix": "/api/orders"}, "auth": {"mode": "none"}}
      ],
      "default_route": {"auth": {"mode": "required", "methods": ["api_key"]}},
      "api_keys": {"keys": []}
    }"#;
    let envoy = Envoy::start(cfg);
    // Each of these is /api/orders/... after normalization and must get the orders policy;
    // the deny log names the route for denied ones, the allowed counter counts the rest.
    for p in [
        "/api/orders",
        "/api//orders/1",
        "/api/./orders/",
        "/api/x/../orders",
        "/api/%6Frders?x=1",
    ] {
        let r = envoy.get(p);
        assert_ne!(r.status, 400, "{p}: {}", r.text());
    }
    assert_eq!(envoy.stat("wasmcustom.api_guard.allowed"), 5);
}

#[test]
fn route_name_matching_uses_the_envoy_route() {
    let envoy = Envoy::builder(
        r#"{"routes":[{"name":"special-route","match":{"route_name":"special"},"auth":{"mode":"none"}}]}"#,
    )
    .routes(vec![
        serde_json::json!({"name": "special", "match": {"prefix": "/special"}, "route": {"cluster": "upstream"}}),
        serde_json::json!({"name": "other", "match": {"prefix": "/"}, "route": {"cluster": "upstream"}}),
    ])
    .start();
    let r = envoy.req("GET", "/special%2Fx").send();
    r.assert_error(400, "invalid_request");
    let logs = envoy.logs();
    assert!(
        logs.contains("\"event\":\"api_guard.deny\""),
        "no deny log line"
    );
    assert_eq!(envoy.get("/special/a").status, 200);
}

#[test]
fn deny_log_is_one_json_line_with_reason_route_ip_and_request_id() {
    let envoy = Envoy::start(PLAIN);
    envoy
        .req("GET", "/api/orders/%2e%2e/%2e%2e/%2e%2e")
        .header("x-request-id", "req-123")
        .send();
    let logs = envoy.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("api_guard.deny"))
        .expect("deny log line");
    let json = &line[line.find('{').unwrap()..];
    let v: serde_json::Value = serde_json::from_str(json).expect("deny log is JSON");
    assert_eq!(v["reason"], "invalid_request");
    assert_eq!(v["status"], 400);
    assert_eq!(v["ip"], "127.0.0.1");
    assert!(v["request_id"].is_string());
    assert!(v.get("route").is_some() && v.get("client").is_some() && v.get("policy").is_some());
}

#[test]
fn invalid_filter_config_makes_envoy_refuse_to_start() {
    let err = Envoy::builder(r#"{"routes":[{"name":"a","match":{"path":"/a"},"auth":{"mode":"none","scope_all":["x"]}}]}"#)
        .try_start()
        .err()
        .expect("Envoy must not start with an invalid filter config");
    assert!(
        err.contains("routes[0].auth.scope_all"),
        "Envoy's log should name the JSON path:\n{err}"
    );
    let err = Envoy::builder(
        r#"{"webhooks":{"gh":{"scheme":"github","secrets":[{"env":"MISSING_SECRET"}]}}}"#,
    )
    .try_start()
    .err()
    .expect("a missing env secret must stop Envoy");
    assert!(err.contains("MISSING_SECRET"), "{err}");
}

#[test]
fn env_secrets_come_from_the_vm_environment() {
    let envoy = Envoy::builder(
        r#"{"webhooks":{"gh":{"scheme":"github","secrets":[{"env":"GH_SECRET"}]}},"default_route":{}}"#,
    )
    .env("GH_SECRET", "s3cret")
    .start();
    assert_eq!(envoy.get("/").status, 200);
}

#[test]
fn xff_trusted_hops_picks_the_client_ip_and_ignores_spoofed_entries() {
    let envoy = Envoy::start(
        r#"{"client_ip":{"xff_trusted_hops":1,"use_remote_address":true},"default_route":{}}"#,
    );
    // Spoofed left-hand entry, real client added by the one trusted proxy; Envoy appends its
    // own entry (use_remote_address: true), which the filter skips.
    envoy
        .req("GET", "/%2F")
        .header("x-forwarded-for", "6.6.6.6, 203.0.113.7")
        .send()
        .assert_error(400, "invalid_request");
    let logs = envoy.logs();
    let line = logs.lines().find(|l| l.contains("api_guard.deny")).unwrap();
    assert!(line.contains("\"ip\":\"203.0.113.7\""), "{line}");
}

#[test]
fn cli_check_accepts_good_and_rejects_bad_configs() {
    let good = write_temp("good.json", PLAIN);
    let out = cli().arg("check").arg(&good).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok:"));

    let no_default = write_temp("nodefault.json", r#"{"routes":[]}"#);
    let out = cli().arg("check").arg(&no_default).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("warning: `default_route`"));

    let bad = write_temp(
        "bad.json",
        r#"{"routes":[{"name":"a","match":{"prefix":"/a","path":"/b"}}]}"#,
    );
    let out = cli().arg("check").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("routes[0].match"));

    let out = cli()
        .arg("check")
        .arg("/nonexistent.json")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn shipped_envoy_configs_validate_and_match_their_json() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut checked = 0;
    let mut native_checked = false;
    for entry in std::fs::read_dir(repo.join("envoy")).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        // docker-compose.yml and the Istio manifest are not Envoy bootstrap configs.
        if !(name.ends_with(".yaml") || name.ends_with(".yml"))
            || name.starts_with("docker-compose")
            || name.contains("istio")
        {
            continue;
        }
        // Validate mode opens the .wasm: point configs written for a container
        // (/etc/envoy/api_guard.wasm) at the one this build produced.
        let text = std::fs::read_to_string(&p).unwrap();
        let wasm = wasm_path();
        let text = text
            .lines()
            .map(|l| match l.find("filename:") {
                Some(i) if l.trim_end().ends_with("api_guard.wasm") => {
                    format!("{}filename: {}", &l[..i], wasm.display())
                }
                _ => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        let copy = write_temp(&name, &text);
        let mut validate = std::process::Command::new(envoy_bin());
        validate
            .args(["--mode", "validate", "-c"])
            .arg(&copy)
            .current_dir(repo);
        if text.contains("envoy.filters.http.dynamic_modules") {
            // Validate mode loads the module and runs its config hook: the .so must be
            // found, and the demo's env secret set, as `make run DELIVERY=native` does.
            let so = module_path();
            validate
                .env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", so.parent().unwrap())
                .env("DEMO_GITHUB_WEBHOOK_SECRET", "demo-webhook-secret");
            native_checked = true;
        }
        let out = validate.output().unwrap();
        assert!(
            out.status.success(),
            "{name} does not validate:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert!(
        checked >= 2,
        "expected demo.yaml and compose-envoy.yaml in envoy/, checked {checked}"
    );

    assert!(
        native_checked,
        "envoy/demo-native.yaml (dynamic module) was not validated"
    );

    // The demo filter config inline in demo.yaml and demo-native.yaml is the same document
    // as demo-filter.json.
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo.join("envoy/demo-filter.json")).unwrap())
            .unwrap();
    for demo in ["envoy/demo.yaml", "envoy/demo-native.yaml"] {
        let yaml = std::fs::read_to_string(repo.join(demo)).unwrap();
        let inline: serde_json::Value =
            serde_json::from_str(&block_scalar(&yaml, "value: |")).unwrap();
        assert_eq!(inline, file, "{demo} and envoy/demo-filter.json differ");
    }
    let out = cli()
        .arg("check")
        .arg(repo.join("envoy/demo-filter.json"))
        .env("DEMO_GITHUB_WEBHOOK_SECRET", "demo-webhook-secret")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn istio_wasmplugin_carries_the_demo_config() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let yaml = std::fs::read_to_string(repo.join("envoy/istio-wasmplugin.yaml")).unwrap();
    assert!(yaml.contains("kind: WasmPlugin"));
    let start = yaml.find("pluginConfig:").unwrap() + "pluginConfig:".len();
    let plugin: serde_json::Value = serde_json::from_str(yaml[start..].trim()).unwrap();
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo.join("envoy/demo-filter.json")).unwrap())
            .unwrap();
    assert_eq!(
        plugin, file,
        "envoy/istio-wasmplugin.yaml and envoy/demo-filter.json differ"
    );
}

#[test]
fn non_utf8_header_bytes_do_not_crash_the_filter() {
    let envoy = Envoy::start(PLAIN);
    let mut raw = b"GET /api/orders HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\nx-weird: \xff\xfe\x80 ok\r\nauthorization: Bearer \xc3\x28\r\n\r\n".to_vec();
    let r = send_raw(envoy.port, &raw, std::time::Duration::from_secs(10));
    // Envoy may refuse the bytes itself (400) or pass them; either way the filter must live.
    if let Some(r) = r {
        assert!(r.status == 200 || r.status == 400, "status {}", r.status);
    }
    raw.clear();
    for _ in 0..5 {
        let ok = envoy.get("/api/orders/1");
        assert_eq!(ok.status, 200, "filter stopped serving: {}", ok.text());
        assert_eq!(ok.header("x-content-type-options"), Some("nosniff"));
    }
    // A response header from the upstream with such bytes goes through the response path.
    let r = envoy
        .req("GET", "/x")
        .header("x-echo-header", "x-up: caf\u{e9}")
        .send();
    assert_eq!(r.status, 200);
    assert!(!envoy.logs().contains("panicked"), "the wasm VM panicked");
}

/// The text of the YAML block scalar introduced by `key` (`value: |`): the following lines
/// indented deeper than the key's line.
fn block_scalar(yaml: &str, key: &str) -> String {
    let mut lines = yaml.lines().skip_while(|l| !l.trim_end().ends_with(key));
    let key_line = lines.next().expect("block scalar key");
    let key_indent = key_line.len() - key_line.trim_start().len();
    lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > key_indent)
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn prometheus_names_are_the_same_for_both_deliveries() {
    // /stats names differ by the delivery's namespace (wasmcustom / dynamicmodulescustom);
    // /stats/prometheus must show the same names for both, as dashboards rely on them.
    let envoy = Envoy::start(PLAIN);
    assert_eq!(envoy.get("/api/orders").status, 200);
    assert_eq!(envoy.get("/a%2fb").status, 400);
    let prom = envoy.prometheus();
    let value = |name: &str| {
        prom.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k.split('{').next()? == name).then(|| v.trim().parse::<u64>().ok())?
            })
            .unwrap_or_else(|| panic!("{name} not in /stats/prometheus:\n{prom}"))
    };
    assert_eq!(value("api_guard_allowed"), 1);
    assert_eq!(value("api_guard_denied_invalid_request"), 1);
    assert!(
        !prom.contains("dynamicmodulescustom"),
        "namespace leaked into Prometheus"
    );
}
