//! Defenses against distributed abuse, through a real Envoy with 2 workers (both deliveries):
//! window algorithms per limit (fixed and sliding, with the same headers as buckets),
//! "per minute and per day on one key", exemptions by CIDR (IPv4 and IPv6) on a limit and on
//! a route, counted, and one API key used from more addresses than `abuse.key_sharing` allows.

mod common;

use common::*;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Client IPs come from the trusted `x-forwarded-for` hop, so one Envoy sees many clients.
const CONFIG: &str = r#"{
  "client_ip": { "xff_trusted_hops": 1, "use_remote_address": true },
  "api_keys": { "header": "x-api-key", "keys": [
    { "id": "acme", "sha256": "6f0f8db1716f1a7909f09fef4ef9730dbcaa99df6f63e5f832f2122b27af2335" } ] },
  "abuse": { "key_sharing": { "max_distinct_ips": 3, "window_s": 3600, "prefix_v6": 64, "action": "deny" } },
  "rate_limits": {
    "fixed-hour":   { "key": ["ip"], "algorithm": "fixed_window",   "limit": 3, "window_s": 3600 },
    "sliding-hour": { "key": ["ip"], "algorithm": "sliding_window", "limit": 3, "window_s": 3600 },
    "per-minute":   { "key": ["ip"], "algorithm": "sliding_window", "limit": 4, "window_s": 60 },
    "per-day":      { "key": ["ip"], "algorithm": "fixed_window",   "limit": 6, "window_s": 86400 },
    "partners":     { "key": ["ip"], "capacity": 1, "refill_tokens": 1, "refill_period_s": 3600,
                      "exempt": { "cidrs": ["10.9.0.0/16", "2001:db8::/32"] } },
    "tight":        { "key": ["ip"], "capacity": 1, "refill_tokens": 1, "refill_period_s": 3600 }
  },
  "routes": [
    { "name": "fixed", "match": { "prefix": "/fixed" }, "rate_limits": ["fixed-hour"] },
    { "name": "sliding", "match": { "prefix": "/sliding" }, "rate_limits": ["sliding-hour"] },
    { "name": "both", "match": { "prefix": "/both" }, "rate_limits": ["per-minute", "per-day"] },
    { "name": "partners", "match": { "prefix": "/partners" }, "rate_limits": ["partners"] },
    { "name": "internal", "match": { "prefix": "/internal" }, "rate_limits": ["tight"],
      "exempt": { "cidrs": ["198.51.100.0/24"] } },
    { "name": "keyed", "match": { "prefix": "/keyed" },
      "auth": { "mode": "required", "methods": ["api_key"] } }
  ],
  "default_route": { "auth": { "mode": "none" } }
}"#;

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Waits out the last seconds of a UTC-aligned window so a test never straddles its edge.
fn clear_of_window_edge(window_s: u64) {
    let left = window_s - now_s() % window_s;
    if left < 20 {
        std::thread::sleep(Duration::from_secs(left + 1));
    }
}

fn from(envoy: &Envoy, path: &str, ip: &str) -> Resp {
    envoy.req("GET", path).header("x-forwarded-for", ip).send()
}

#[test]
fn windows_exemptions_and_stacked_limits() {
    clear_of_window_edge(3600);
    let envoy = Envoy::start(CONFIG);

    // Fixed window: 3 per UTC hour, the headers say so, the 4th waits for the hour's end.
    for want in (0..3).rev() {
        let r = from(&envoy, "/fixed", "203.0.113.1");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.header("ratelimit-policy"),
            Some("\"fixed-hour\";q=3;w=3600")
        );
        assert_eq!(
            r.header("x-ratelimit-remaining"),
            Some(want.to_string().as_str())
        );
        let reset: u64 = r.header("x-ratelimit-reset").unwrap().parse().unwrap();
        assert_eq!(
            reset % 3600,
            0,
            "resets at the end of the UTC hour: {reset}"
        );
        assert!(reset > now_s() && reset <= now_s() + 3600, "{reset}");
    }
    let r = from(&envoy, "/fixed", "203.0.113.1");
    let body = r.assert_error(429, "rate_limit_exceeded");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    let to_hour = 3600 - now_s() % 3600;
    assert!(
        retry.abs_diff(to_hour) <= 2,
        "retry-after {retry}, hour ends in {to_hour}"
    );
    assert_eq!(body["retry_after"], retry);
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    // Another client has its own window.
    assert_eq!(from(&envoy, "/fixed", "203.0.113.2").status, 200);

    // Sliding window: 3 per trailing hour; the 4th is refused with a retry-after within it.
    for _ in 0..3 {
        let r = from(&envoy, "/sliding", "203.0.113.3");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.header("ratelimit-policy"),
            Some("\"sliding-hour\";q=3;w=3600")
        );
    }
    let r = from(&envoy, "/sliding", "203.0.113.3");
    r.assert_error(429, "rate_limit_exceeded");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=7200).contains(&retry), "{retry}");
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));

    // Per minute and per day on one key: the headers show the tighter, and both count.
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let r = from(&envoy, "/both", "203.0.113.4");
        statuses.push(r.status);
        if r.status == 200 {
            assert!(
                r.header("ratelimit").unwrap().starts_with("\"per-minute\""),
                "{:?}",
                r.header("ratelimit")
            );
        }
    }
    assert_eq!(statuses, [200, 200, 200, 200, 429]);
    assert_eq!(
        envoy.stat("wasmcustom.api_guard.ratelimit.per-day.allowed"),
        4,
        "the day counts what the minute admitted, and nothing it refused"
    );

    // Exempt CIDRs on a limit: the partner ranges (v4 and v6) pass a limit of 1, others don't.
    for ip in [
        "10.9.1.1",
        "10.9.200.7",
        "2001:db8::5",
        "10.9.1.1",
        "2001:db8::5",
    ] {
        let r = from(&envoy, "/partners", ip);
        assert_eq!(r.status, 200, "{ip}: {}", r.text());
        assert_eq!(
            r.header("ratelimit"),
            None,
            "an exempt request shows no limit"
        );
    }
    assert_eq!(from(&envoy, "/partners", "192.0.2.50").status, 200);
    from(&envoy, "/partners", "192.0.2.50").assert_error(429, "rate_limit_exceeded");
    // Outside 10.9/16: limited like anyone.
    assert_eq!(from(&envoy, "/partners", "10.10.0.1").status, 200);
    from(&envoy, "/partners", "10.10.0.1").assert_error(429, "rate_limit_exceeded");

    // Exempt CIDR on a route.
    for _ in 0..3 {
        assert_eq!(from(&envoy, "/internal", "198.51.100.9").status, 200);
    }
    assert_eq!(from(&envoy, "/internal", "203.0.113.9").status, 200);
    from(&envoy, "/internal", "203.0.113.9").assert_error(429, "rate_limit_exceeded");

    // Each exempt key shows up once as an event (not once per request): 3 partner addresses
    // and 1 internal one.
    let exempt_events = envoy.events("exempt");
    assert_eq!(exempt_events.len(), 4, "{exempt_events:?}");
    assert!(exempt_events
        .iter()
        .any(|e| e["policy"] == "tight" && e["ip"] == "198.51.100.9"));
    // Every bypass is counted, in total and per limit: 5 partners + 3 internal.
    assert_eq!(envoy.stat("wasmcustom.api_guard.exempt"), 8);
    assert_eq!(
        envoy.stat("wasmcustom.api_guard.ratelimit.partners.exempt"),
        5
    );
    assert_eq!(envoy.stat("wasmcustom.api_guard.ratelimit.tight.exempt"), 3);
    assert_eq!(
        envoy.stat("wasmcustom.api_guard.ratelimit.partners.denied"),
        2
    );
}

/// The API key of `acme` in [`CONFIG`].
const ACME_KEY: &str = "k-acme-0123456789abcdef";

#[test]
fn one_key_from_too_many_addresses_is_refused_and_reported() {
    clear_of_window_edge(3600);
    let envoy = Envoy::start(CONFIG);
    let keyed = |ip: &str| {
        envoy
            .req("GET", "/keyed")
            .header("x-forwarded-for", ip)
            .header("x-api-key", ACME_KEY)
            .send()
    };
    // Three addresses (two IPv6 in one /64 count once) are the allowance.
    for ip in [
        "192.0.2.10",
        "2001:db8:7:7::1",
        "2001:db8:7:7::2",
        "192.0.2.11",
    ] {
        let r = keyed(ip);
        assert_eq!(r.status, 200, "{ip}: {}", r.text());
        assert_eq!(r.upstream_header("x-auth-client").as_deref(), Some("acme"));
    }
    // A fourth address: 403 credential_abuse, twice; the known ones keep working.
    for ip in ["203.0.113.50", "203.0.113.51"] {
        let r = keyed(ip);
        let body = r.assert_error(403, "credential_abuse");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("more than 3 addresses"),
            "{body}"
        );
        assert_eq!(r.header("x-frame-options"), Some("DENY"));
    }
    assert_eq!(keyed("192.0.2.10").status, 200);
    // Requests without a key are not tracked: they get the usual 401.
    envoy
        .req("GET", "/keyed")
        .header("x-forwarded-for", "203.0.113.52")
        .send()
        .assert_error(401, "missing_credentials");

    assert_eq!(
        envoy.stat("wasmcustom.api_guard.denied.credential_abuse"),
        2
    );
    assert_eq!(envoy.stat("wasmcustom.api_guard.abuse.key_sharing.over"), 2);
    // One structured event for the window, in the deny log's shape.
    let events = envoy.events("credential_abuse");
    assert_eq!(
        events.len(),
        1,
        "{events:?}\n{}",
        envoy
            .logs()
            .lines()
            .filter(|l| l.contains("credential"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let e = &events[0];
    assert_eq!(e["client"], "acme");
    assert_eq!(e["ip"], "203.0.113.50");
    assert_eq!(e["route"], "keyed");
    assert_eq!(e["action"], "deny");
    assert_eq!(e["max_distinct_ips"], 3);
}

#[test]
fn config_errors_name_the_path() {
    for (config, path) in [
        (
            r#"{"rate_limits":{"l":{"key":["ip"],"algorithm":"sliding_window","capacity":5,"limit":5,"window_s":60}}}"#,
            "rate_limits.l.capacity",
        ),
        (
            r#"{"rate_limits":{"l":{"key":["ip"],"capacity":1,"refill_tokens":1,"refill_period_s":1,"exempt":{"cidrs":["10.0.0.1/8"]}}}}"#,
            "rate_limits.l.exempt.cidrs[0]",
        ),
        (
            r#"{"abuse":{"key_sharing":{"max_distinct_ips":500}}}"#,
            "abuse.key_sharing.max_distinct_ips",
        ),
    ] {
        let file = write_temp("abuse-check.json", config);
        let out = cli().arg("check").arg(&file).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{config}: {text}");
        assert!(text.contains(path), "{config}: {text}");
    }
}
