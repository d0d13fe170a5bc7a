//! Webhook signature verification through a real Envoy with 2 workers (SPEC section 4):
//! every scheme, rotation, tampering, time window, replay across workers, body limits,
//! chunked bodies, and the upstream receiving exactly the signed body.

mod common;

use base64::Engine as _;
use common::*;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const GH_SECRET: &str = "gh-current-secret";
const GH_OLD: &str = "gh-previous-secret";
const STRIPE_S1: &str = "whsec_stripe_secret_one";
const STRIPE_S2: &str = "whsec_stripe_secret_two";
const STD_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// RFC 8032 section 7.1 test 1 key pair (seed and public key).
const ED_SEED: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
const ED_PK: &str = "whpk_11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";
const SLACK_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
const SMALL_LIMIT: usize = 64 * 1024;

fn config() -> String {
    format!(
        r#"{{
  "webhooks": {{
    "github": {{ "scheme": "github", "secrets": [{{ "env": "GITHUB_WEBHOOK_SECRET" }}, "{GH_OLD}"] }},
    "stripe": {{ "scheme": "stripe", "secrets": ["{STRIPE_S1}", "{STRIPE_S2}"], "tolerance_s": 300 }},
    "standard": {{ "scheme": "standard", "secrets": ["{STD_SECRET}", "{ED_PK}"] }},
    "slack": {{ "scheme": "slack", "secrets": ["{SLACK_SECRET}"] }},
    "small": {{ "scheme": "github", "secrets": ["{GH_SECRET}"], "max_body_bytes": {SMALL_LIMIT} }}
  }},
  "routes": [
    {{ "name": "github-hook", "match": {{ "methods": ["POST"], "path": "/webhooks/github" }}, "auth": {{ "mode": "none" }}, "webhook": "github" }},
    {{ "name": "stripe-hook", "match": {{ "methods": ["POST"], "path": "/webhooks/stripe" }}, "auth": {{ "mode": "none" }}, "webhook": "stripe" }},
    {{ "name": "standard-hook", "match": {{ "path": "/webhooks/standard" }}, "auth": {{ "mode": "none" }}, "webhook": "standard" }},
    {{ "name": "slack-hook", "match": {{ "methods": ["POST"], "path": "/webhooks/slack" }}, "auth": {{ "mode": "none" }}, "webhook": "slack" }},
    {{ "name": "small-hook", "match": {{ "methods": ["POST"], "path": "/webhooks/small" }}, "auth": {{ "mode": "none" }}, "webhook": "small" }}
  ],
  "default_route": {{ "auth": {{ "mode": "none" }} }}
}}"#
    )
}

fn start() -> Envoy {
    Envoy::builder(&config())
        .env("GITHUB_WEBHOOK_SECRET", GH_SECRET)
        .concurrency(2)
        .start()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn mac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap();
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn github_sig(secret: &str, body: &[u8]) -> String {
    format!("sha256={}", hex::encode(mac(secret.as_bytes(), &[body])))
}

fn stripe_header(secrets: &[&str], t: u64, body: &[u8]) -> String {
    let ts = t.to_string();
    let mut h = format!("t={ts}");
    for s in secrets {
        let sig = hex::encode(mac(s.as_bytes(), &[ts.as_bytes(), b".", body]));
        h.push_str(&format!(",v1={sig}"));
    }
    h
}

fn standard_v1(id: &str, t: u64, body: &[u8]) -> String {
    let key = base64::engine::general_purpose::STANDARD
        .decode(&STD_SECRET["whsec_".len()..])
        .unwrap();
    let ts = t.to_string();
    format!(
        "v1,{}",
        b64(&mac(
            &key,
            &[id.as_bytes(), b".", ts.as_bytes(), b".", body]
        ))
    )
}

fn standard_v1a(id: &str, t: u64, body: &[u8]) -> String {
    let seed: [u8; 32] = hex::decode(ED_SEED).unwrap().try_into().unwrap();
    let kp = ed25519_compact::KeyPair::from_seed(ed25519_compact::Seed::new(seed));
    let mut msg = format!("{id}.{t}.").into_bytes();
    msg.extend_from_slice(body);
    format!("v1a,{}", b64(kp.sk.sign(&msg, None).as_ref()))
}

fn slack_sig(t: u64, body: &[u8]) -> String {
    let ts = t.to_string();
    format!(
        "v0={}",
        hex::encode(mac(
            SLACK_SECRET.as_bytes(),
            &[b"v0:", ts.as_bytes(), b":", body]
        ))
    )
}

/// A body with every byte value, CR/LF and NUL included: the upstream must get it unchanged.
fn binary_body(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 256) as u8).collect()
}

fn standard_req(envoy: &Envoy, id: &str, t: u64, sig: &str, body: &[u8]) -> Resp {
    envoy
        .req("POST", "/webhooks/standard")
        .header("webhook-id", id)
        .header("webhook-timestamp", &t.to_string())
        .header("webhook-signature", sig)
        .body(body.to_vec())
        .send()
}

/// Asserts the delivery was forwarded and the upstream got exactly `body`.
fn assert_forwarded(envoy: &Envoy, r: &Resp, body: &[u8], what: &str) {
    assert_eq!(r.status, 200, "{what}: {}", r.text());
    assert_eq!(r.json()["body_len"], body.len(), "{what}");
    let got = envoy.received();
    let last = got.last().expect("upstream received the request");
    assert!(last.body == body, "{what}: the upstream body differs");
}

#[test]
fn each_scheme_accepts_a_valid_delivery_and_the_upstream_gets_the_exact_body() {
    let envoy = start();
    let t = now();
    let body = binary_body(3000);

    let r = envoy
        .req("POST", "/webhooks/github")
        .header("x-hub-signature-256", &github_sig(GH_SECRET, &body))
        .header("x-github-delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958")
        .body(body.clone())
        .send();
    assert_forwarded(&envoy, &r, &body, "github (secret from the VM environment)");
    // The signature headers go upstream untouched too.
    assert_eq!(
        r.upstream_header("x-hub-signature-256"),
        Some(github_sig(GH_SECRET, &body))
    );

    let r = envoy
        .req("POST", "/webhooks/stripe")
        .header("stripe-signature", &stripe_header(&[STRIPE_S1], t, &body))
        .body(body.clone())
        .send();
    assert_forwarded(&envoy, &r, &body, "stripe");

    let r = standard_req(
        &envoy,
        "msg_ok_v1",
        t,
        &standard_v1("msg_ok_v1", t, &body),
        &body,
    );
    assert_forwarded(&envoy, &r, &body, "standard v1");

    let r = standard_req(
        &envoy,
        "msg_ok_v1a",
        t,
        &standard_v1a("msg_ok_v1a", t, &body),
        &body,
    );
    assert_forwarded(&envoy, &r, &body, "standard v1a (Ed25519)");

    let r = envoy
        .req("POST", "/webhooks/slack")
        .header("x-slack-request-timestamp", &t.to_string())
        .header("x-slack-signature", &slack_sig(t, &body))
        .body(body.clone())
        .send();
    assert_forwarded(&envoy, &r, &body, "slack");

    // No body at all (end of stream with the headers): verified over the empty body.
    let r = envoy
        .req("GET", "/webhooks/standard")
        .header("webhook-id", "msg_empty")
        .header("webhook-timestamp", &t.to_string())
        .header("webhook-signature", &standard_v1("msg_empty", t, b""))
        .send();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(envoy.received().len(), 6);
    assert_eq!(envoy.stat("wasmcustom.api_guard.allowed"), 6);
}

#[test]
fn forged_tampered_and_malformed_deliveries_get_401_and_never_reach_the_upstream() {
    let envoy = start();
    let t = now();
    let body = b"{\"event\":\"paid\",\"amount\":100}".to_vec();
    let changed = b"{\"event\":\"paid\",\"amount\":999}".to_vec();

    let cases: Vec<(&str, Req)> = vec![
        (
            "github wrong secret",
            envoy
                .req("POST", "/webhooks/github")
                .header("x-hub-signature-256", &github_sig("not-the-secret", &body))
                .body(body.clone()),
        ),
        (
            "github body changed",
            envoy
                .req("POST", "/webhooks/github")
                .header("x-hub-signature-256", &github_sig(GH_SECRET, &body))
                .body(changed.clone()),
        ),
        (
            "github header missing",
            envoy.req("POST", "/webhooks/github").body(body.clone()),
        ),
        (
            "github header garbled",
            envoy
                .req("POST", "/webhooks/github")
                .header("x-hub-signature-256", "sha256=zz-not-hex")
                .body(body.clone()),
        ),
        (
            "stripe wrong secret",
            envoy
                .req("POST", "/webhooks/stripe")
                .header(
                    "stripe-signature",
                    &stripe_header(&["whsec_other"], t, &body),
                )
                .body(body.clone()),
        ),
        (
            "stripe body changed",
            envoy
                .req("POST", "/webhooks/stripe")
                .header("stripe-signature", &stripe_header(&[STRIPE_S1], t, &body))
                .body(changed.clone()),
        ),
        (
            "stripe garbled header",
            envoy
                .req("POST", "/webhooks/stripe")
                .header("stripe-signature", "t=,v1=")
                .body(body.clone()),
        ),
        (
            "standard wrong key",
            envoy
                .req("POST", "/webhooks/standard")
                .header("webhook-id", "msg_1")
                .header("webhook-timestamp", &t.to_string())
                .header(
                    "webhook-signature",
                    "v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4=",
                )
                .body(body.clone()),
        ),
        (
            "standard body changed (v1a)",
            envoy
                .req("POST", "/webhooks/standard")
                .header("webhook-id", "msg_2")
                .header("webhook-timestamp", &t.to_string())
                .header("webhook-signature", &standard_v1a("msg_2", t, &body))
                .body(changed.clone()),
        ),
        (
            "standard id changed",
            envoy
                .req("POST", "/webhooks/standard")
                .header("webhook-id", "msg_3x")
                .header("webhook-timestamp", &t.to_string())
                .header("webhook-signature", &standard_v1("msg_3", t, &body))
                .body(body.clone()),
        ),
        (
            "standard id missing",
            envoy
                .req("POST", "/webhooks/standard")
                .header("webhook-timestamp", &t.to_string())
                .header("webhook-signature", &standard_v1("msg_4", t, &body))
                .body(body.clone()),
        ),
        (
            "slack wrong signature",
            envoy
                .req("POST", "/webhooks/slack")
                .header("x-slack-request-timestamp", &t.to_string())
                .header("x-slack-signature", &slack_sig(t + 1, &body))
                .body(body.clone()),
        ),
        (
            "slack timestamp garbled",
            envoy
                .req("POST", "/webhooks/slack")
                .header("x-slack-request-timestamp", "yesterday")
                .header("x-slack-signature", &slack_sig(t, &body))
                .body(body.clone()),
        ),
    ];
    let n = cases.len() as u64;
    for (what, req) in cases {
        let r = req.send();
        let v = r.assert_error(401, "invalid_signature");
        assert!(!v["message"].as_str().unwrap().is_empty(), "{what}");
    }
    assert!(
        envoy.received().is_empty(),
        "nothing may reach the upstream before the check passes"
    );
    assert_eq!(
        envoy.stat("wasmcustom.api_guard.denied.invalid_signature"),
        n
    );
    let logs = envoy.logs();
    assert!(
        logs.contains("\"policy\":\"stripe\"") && logs.contains("\"route\":\"slack-hook\""),
        "deny log names the webhook and route"
    );
}

#[test]
fn rotated_secrets_pass_and_timestamps_outside_tolerance_fail_both_ways() {
    let envoy = start();
    let t = now();
    let body = b"rotation".to_vec();

    // GitHub signed with the previous secret (second in the list).
    let r = envoy
        .req("POST", "/webhooks/github")
        .header("x-hub-signature-256", &github_sig(GH_OLD, &body))
        .body(body.clone())
        .send();
    assert_eq!(r.status, 200, "{}", r.text());
    // Stripe during a roll sends one v1 per secret; each alone passes too.
    for (i, secrets) in [vec![STRIPE_S2], vec!["whsec_retired", STRIPE_S2]]
        .iter()
        .enumerate()
    {
        let r = envoy
            .req("POST", "/webhooks/stripe")
            .header(
                "stripe-signature",
                &stripe_header(secrets, t + i as u64, &body),
            )
            .body(body.clone())
            .send();
        assert_eq!(r.status, 200, "{secrets:?}: {}", r.text());
    }

    for (what, ts) in [("stale", t - 400), ("future", t + 400)] {
        let r = envoy
            .req("POST", "/webhooks/stripe")
            .header("stripe-signature", &stripe_header(&[STRIPE_S1], ts, &body))
            .body(body.clone())
            .send();
        r.assert_error(401, "invalid_signature");
        let id = format!("msg_{what}");
        standard_req(&envoy, &id, ts, &standard_v1(&id, ts, &body), &body)
            .assert_error(401, "invalid_signature");
        let r = envoy
            .req("POST", "/webhooks/slack")
            .header("x-slack-request-timestamp", &ts.to_string())
            .header("x-slack-signature", &slack_sig(ts, &body))
            .body(body.clone())
            .send();
        let v = r.assert_error(401, "invalid_signature");
        assert!(v["message"].as_str().unwrap().contains("300 s"), "{v}");
    }
    assert_eq!(envoy.received().len(), 3);
}

fn worker_connections(envoy: &Envoy) -> Vec<u64> {
    let stats = envoy.stats();
    (0..2)
        .map(|w| {
            let suffix = format!(".worker_{w}.downstream_cx_total: ");
            stats
                .lines()
                .filter(|l| l.starts_with("listener.127.0.0.1_") && l.contains(&suffix))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum()
        })
        .collect()
}

#[test]
fn replays_are_refused_on_every_worker_and_concurrent_duplicates_pass_once() {
    let envoy = start();
    let t = now();
    let body = b"{\"id\":\"evt_replay\"}".to_vec();
    let stripe = stripe_header(&[STRIPE_S1, STRIPE_S2], t, &body);
    let github = github_sig(GH_SECRET, &body);
    let std_sig = standard_v1("msg_replay", t, &body);
    let slack = slack_sig(t, &body);
    let send = |kind: &str, sig: &str| -> Resp {
        match kind {
            "stripe" => envoy
                .req("POST", "/webhooks/stripe")
                .header("stripe-signature", sig)
                .body(body.clone())
                .send(),
            "github" => envoy
                .req("POST", "/webhooks/github")
                .header("x-hub-signature-256", sig)
                .header("x-github-delivery", "d-1")
                .body(body.clone())
                .send(),
            "slack" => envoy
                .req("POST", "/webhooks/slack")
                .header("x-slack-request-timestamp", &t.to_string())
                .header("x-slack-signature", sig)
                .body(body.clone())
                .send(),
            _ => standard_req(&envoy, "msg_replay", t, sig, &body),
        }
    };
    let kinds = [
        ("stripe", stripe.as_str()),
        ("github", github.as_str()),
        ("standard", std_sig.as_str()),
        ("slack", slack.as_str()),
    ];
    for (kind, sig) in kinds {
        assert_eq!(send(kind, sig).status, 200, "{kind} first delivery");
    }
    // Every request is its own connection; Envoy spreads connections over both workers, so
    // replays land on the worker that did not see the original too.
    for round in 0..6 {
        for (kind, sig) in kinds {
            let r = send(kind, sig);
            let v = r.assert_error(401, "invalid_signature");
            assert!(
                v["message"].as_str().unwrap().contains("already accepted"),
                "{kind} round {round}: {v}"
            );
        }
    }
    // A Stripe replay that drops one of the rotated signatures is still the same delivery.
    let only_second = stripe_header(&[STRIPE_S2], t, &body);
    send("stripe", &only_second).assert_error(401, "invalid_signature");
    let per_worker = worker_connections(&envoy);
    assert!(
        per_worker.iter().all(|n| *n > 0),
        "both workers took connections: {per_worker:?}"
    );
    assert_eq!(envoy.received().len(), 4);

    // The same fresh delivery sent at once on 8 connections: exactly one is accepted.
    let t2 = now();
    let sig = standard_v1("msg_race", t2, &body);
    let port = envoy.port;
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (sig, body) = (sig.clone(), body.clone());
            std::thread::spawn(move || {
                http(port, "POST", "/webhooks/standard")
                    .header("webhook-id", "msg_race")
                    .header("webhook-timestamp", &t2.to_string())
                    .header("webhook-signature", &sig)
                    .body(body)
                    .send()
                    .status
            })
        })
        .collect();
    let statuses: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 401).count(), 7);
    assert_eq!(envoy.received().len(), 5);
}

/// Sends a request head, then the body in pieces with pauses, so Envoy delivers it to the
/// filter in several callbacks. Returns the status and body of the response.
fn send_in_pieces(port: u16, head: &str, pieces: &[Vec<u8>], chunked: bool) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    for p in pieces {
        std::thread::sleep(Duration::from_millis(20));
        let ok = if chunked {
            s.write_all(format!("{:x}\r\n", p.len()).as_bytes())
                .and_then(|_| s.write_all(p))
                .and_then(|_| s.write_all(b"\r\n"))
        } else {
            s.write_all(p)
        };
        if ok.is_err() {
            break; // Envoy answered early and closed.
        }
    }
    if chunked {
        let _ = s.write_all(b"0\r\n\r\n");
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn pieces(body: &[u8], sizes: &[usize]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < body.len() {
        let n = sizes[i % sizes.len()].min(body.len() - at);
        out.push(body[at..at + n].to_vec());
        at += n;
        i += 1;
    }
    out
}

#[test]
fn chunked_and_streamed_bodies_are_verified_and_forwarded_exactly() {
    let envoy = start();
    let t = now();
    let body = binary_body(200 * 1024);

    // Chunked, in many chunks of uneven sizes, arriving over time.
    let sig = standard_v1("msg_chunked", t, &body);
    let head = format!(
        "POST /webhooks/standard HTTP/1.1\r\nhost: x\r\nconnection: close\r\nwebhook-id: msg_chunked\r\nwebhook-timestamp: {t}\r\nwebhook-signature: {sig}\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    let (status, text) = send_in_pieces(
        envoy.port,
        &head,
        &pieces(&body, &[1, 7000, 33333, 4096]),
        true,
    );
    assert_eq!(status, 200, "{text}");
    let got = envoy.received();
    assert_eq!(got.len(), 1);
    assert!(got[0].body == body, "upstream body differs");

    // The same with one byte changed in the middle: refused, nothing forwarded.
    let mut changed = body.clone();
    changed[150_000] ^= 1;
    let sig = standard_v1("msg_chunked_2", t, &body);
    let head = head
        .replace("msg_chunked", "msg_chunked_2")
        .replace(&standard_v1("msg_chunked", t, &body), &sig);
    let (status, text) = send_in_pieces(envoy.port, &head, &pieces(&changed, &[50_000]), true);
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("invalid_signature"), "{text}");

    // Content-length body streamed in pieces (Ed25519, which streams too).
    let sig = standard_v1a("msg_streamed", t, &body);
    let head = format!(
        "POST /webhooks/standard HTTP/1.1\r\nhost: x\r\nconnection: close\r\nwebhook-id: msg_streamed\r\nwebhook-timestamp: {t}\r\nwebhook-signature: {sig}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let (status, text) = send_in_pieces(envoy.port, &head, &pieces(&body, &[65_536, 1]), false);
    assert_eq!(status, 200, "{text}");
    let got = envoy.received();
    assert_eq!(got.len(), 2);
    assert!(got[1].body == body, "upstream body differs");
}

#[test]
fn bodies_over_max_body_bytes_get_413_also_when_chunked() {
    let envoy = start();
    let at_limit = binary_body(SMALL_LIMIT);
    let r = envoy
        .req("POST", "/webhooks/small")
        .header("x-hub-signature-256", &github_sig(GH_SECRET, &at_limit))
        .body(at_limit.clone())
        .send();
    assert_forwarded(&envoy, &r, &at_limit, "exactly max_body_bytes");

    // Declared too large: refused from the headers, before any body.
    let over = binary_body(SMALL_LIMIT + 1);
    let r = envoy
        .req("POST", "/webhooks/small")
        .header("x-hub-signature-256", &github_sig(GH_SECRET, &over))
        .body(over.clone())
        .send();
    let v = r.assert_error(413, "payload_too_large");
    assert!(v["message"].as_str().unwrap().contains("65536"), "{v}");

    // Chunked (no content-length), over the limit: refused while streaming.
    let big = binary_body(3 * SMALL_LIMIT);
    let r = envoy
        .req("POST", "/webhooks/small")
        .header("x-hub-signature-256", &github_sig(GH_SECRET, &big))
        .chunked(pieces(&big, &[10_000]))
        .send();
    r.assert_error(413, "payload_too_large");
    let head = format!(
        "POST /webhooks/small HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-hub-signature-256: {}\r\ntransfer-encoding: chunked\r\n\r\n",
        github_sig(GH_SECRET, &big)
    );
    let (status, text) = send_in_pieces(envoy.port, &head, &pieces(&big, &[16_384]), true);
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("payload_too_large"), "{text}");

    // The default limit (1 MiB) applies where max_body_bytes is not set.
    let huge = binary_body(1_048_577);
    let r = envoy
        .req("POST", "/webhooks/github")
        .header("x-hub-signature-256", &github_sig(GH_SECRET, &huge))
        .body(huge.clone())
        .send();
    r.assert_error(413, "payload_too_large");
    // Chunked past the default limit, which is also Envoy's default buffer limit.
    let head = format!(
        "POST /webhooks/github HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-hub-signature-256: {}\r\ntransfer-encoding: chunked\r\n\r\n",
        github_sig(GH_SECRET, &huge)
    );
    let (status, text) = send_in_pieces(envoy.port, &head, &pieces(&huge, &[65_536]), true);
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("payload_too_large"), "{text}");

    assert_eq!(envoy.received().len(), 1, "only the delivery at the limit");
    assert_eq!(
        envoy.stat("wasmcustom.api_guard.denied.payload_too_large"),
        5
    );
}

/// With Envoy's default `allow_on_headers_stop_iteration: false`, holding the request at its
/// headers also withholds the body from the filter (no body callback ever comes), and the
/// router never sees the request, so even the route timeout never starts: the request hangs
/// until the client gives up (or the connection manager's stream idle timeout, 5 minutes by
/// default). The filter cannot change that, but when the stream ends it says so in Envoy's
/// log, naming the setting. (The dynamic module has no such setting: there the request goes
/// through.)
#[test]
fn without_allow_on_headers_stop_iteration_the_hang_is_logged_with_the_setting_name() {
    let envoy = Envoy::builder(&config())
        .env("GITHUB_WEBHOOK_SECRET", GH_SECRET)
        .allow_on_headers_stop_iteration(false)
        .routes(vec![serde_json::json!({
            "name": "short-timeout",
            "match": {"prefix": "/"},
            "route": {"cluster": "upstream", "timeout": "1s"}
        })])
        .start();
    let body = br#"{"action":"opened"}"#;
    if envoy.delivery == Delivery::Native {
        // The dynamic module has no such setting: a native filter holding the headers still
        // gets the body, so the same request is verified and forwarded.
        let r = envoy
            .req("POST", "/webhooks/github")
            .header("x-hub-signature-256", &github_sig(GH_SECRET, body))
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(envoy.received().len(), 1);
        return;
    }
    let started = std::time::Instant::now();
    let r = envoy
        .req("POST", "/webhooks/github")
        .header("x-hub-signature-256", &github_sig(GH_SECRET, body))
        .header("content-type", "application/json")
        .body(body.to_vec())
        .timeout(Duration::from_secs(3))
        .send_opt();
    // No answer at all, not even the route timeout's 504: the client gave up.
    let status = r.as_ref().map(|r| r.status);
    assert_eq!(status, None, "Envoy answered after {:?}", started.elapsed());
    assert!(envoy.received().is_empty());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let named = |logs: &str| {
        logs.lines().any(|l| {
            l.contains("[error]")
                && l.contains("api-guard")
                && l.contains("allow_on_headers_stop_iteration: true")
        })
    };
    while !named(&envoy.logs()) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(named(&envoy.logs()), "log:\n{}", envoy.logs());
}
