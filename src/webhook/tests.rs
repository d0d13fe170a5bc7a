//! Unit tests for webhook verification, driven by public vectors where they exist
//! (`tests/vectors/`: GitHub's documented example, RFC 4231, Wycheproof HMAC-SHA256, the
//! Standard Webhooks library cases) and by the schemes' documentation otherwise.

use super::*;
use crate::config::{parse, Secret};
use crate::store::MemoryStore;
use serde_json::Value;

const GITHUB_VECTORS: &str =
    include_str!("../../tests/vectors/webhooks/github_x_hub_signature_256.json");
const STANDARD_VECTORS: &str = include_str!("../../tests/vectors/webhooks/standard_webhooks.json");
const RFC4231: &str = include_str!("../../tests/vectors/rfc/rfc4231_hmac_sha256.json");
const WYCHEPROOF_HMAC: &str =
    include_str!("../../tests/vectors/wycheproof/hmac_sha256_test.tag256.json");

fn no_env(_: &str) -> Option<String> {
    None
}

pub(crate) fn hook(scheme: &str, secrets: &[&str], tolerance_s: u64, max_body: usize) -> Webhook {
    let cfg = WebhookConfig {
        scheme: scheme.into(),
        secrets: secrets
            .iter()
            .map(|s| Secret::Literal(s.to_string()))
            .collect(),
        tolerance_s,
        max_body_bytes: max_body,
        replay_capacity: 1024,
    };
    compile_one("test", &cfg, &no_env, &mut Vec::new()).expect("valid test webhook")
}

/// Runs one delivery through begin/update/finish with the body in `chunk`-byte pieces.
fn deliver(
    w: &Webhook,
    headers: &[(&str, &str)],
    body: &[u8],
    chunk: usize,
    now_s: u64,
    store: &MemoryStore,
) -> Result<Verified, WebhookError> {
    let mut v = w.begin(headers, now_s * 1000)?;
    for piece in body.chunks(chunk.max(1)) {
        v.update(piece)?;
    }
    v.finish(now_s * 1000, store)
}

fn hmac_hex(key: &[u8], parts: &[&[u8]]) -> String {
    let mut m = HmacSha256::new_from_slice(key).unwrap();
    for p in parts {
        m.update(p);
    }
    hex::encode(m.finalize().into_bytes())
}

fn hmac_b64(key: &[u8], parts: &[&[u8]]) -> String {
    let mut m = HmacSha256::new_from_slice(key).unwrap();
    for p in parts {
        m.update(p);
    }
    base64::engine::general_purpose::STANDARD.encode(m.finalize().into_bytes())
}

// ---------------------------------------------------------------- primitives

#[test]
fn rfc4231_vectors_through_prekeyed_streamed_macs() {
    let doc: Value = serde_json::from_str(RFC4231).unwrap();
    let mut checked = 0;
    for t in doc["tests"].as_array().unwrap() {
        let key = hex::decode(t["key_hex"].as_str().unwrap()).unwrap();
        let data = hex::decode(t["data_hex"].as_str().unwrap()).unwrap();
        let want = hex::decode(t["hmac_sha256_hex"].as_str().unwrap()).unwrap();
        // Same path as a delivery: key schedule once at compile, clone, stream in pieces.
        let keyed = new_mac(&key, "x").unwrap();
        for chunk in [1, 7, 64, usize::MAX] {
            let mut m = keyed.clone();
            for piece in data.chunks(chunk.min(data.len().max(1))) {
                m.update(piece);
            }
            let tag = m.finalize().into_bytes();
            assert_eq!(&tag[..want.len()], &want[..], "case {}", t["test_case"]);
        }
        if want.len() == 32 {
            let sig: [u8; 32] = want.clone().try_into().unwrap();
            let mut m = keyed.clone();
            m.update(&data);
            assert!(compare_macs(vec![m], &[sig]).0);
            let mut bad = sig;
            bad[31] ^= 1;
            let mut m = keyed.clone();
            m.update(&data);
            assert!(!compare_macs(vec![m], &[bad]).0);
        }
        checked += 1;
    }
    assert_eq!(checked, 7);
}

#[test]
fn rfc4231_vectors_as_github_deliveries_where_the_key_is_text() {
    let doc: Value = serde_json::from_str(RFC4231).unwrap();
    let mut checked = 0;
    for t in doc["tests"].as_array().unwrap() {
        if !t["truncated_to_bits"].is_null() {
            continue;
        }
        let key = hex::decode(t["key_hex"].as_str().unwrap()).unwrap();
        // GitHub secrets are strings; only keys that are valid UTF-8 can be configured.
        let Ok(secret) = String::from_utf8(key) else {
            continue;
        };
        let data = hex::decode(t["data_hex"].as_str().unwrap()).unwrap();
        let sig = format!("sha256={}", t["hmac_sha256_hex"].as_str().unwrap());
        let w = hook("github", &[&secret], 300, 1 << 20);
        let store = MemoryStore::new();
        let h = [("x-hub-signature-256", sig.as_str())];
        assert!(
            deliver(&w, &h, &data, 5, 1000, &store).is_ok(),
            "case {}",
            t["test_case"]
        );
        checked += 1;
    }
    assert_eq!(checked, 3, "cases 1, 2 and 4 have text keys");
}

#[test]
fn wycheproof_hmac_sha256_valid_and_modified_tags() {
    let doc: Value = serde_json::from_str(WYCHEPROOF_HMAC).unwrap();
    let (mut valid, mut invalid) = (0, 0);
    for g in doc["testGroups"].as_array().unwrap() {
        for t in g["tests"].as_array().unwrap() {
            let key = hex::decode(t["key"].as_str().unwrap()).unwrap();
            let msg = hex::decode(t["msg"].as_str().unwrap()).unwrap();
            let tag: [u8; 32] = hex::decode(t["tag"].as_str().unwrap())
                .unwrap()
                .try_into()
                .unwrap();
            let mut m = new_mac(&key, "x").unwrap();
            for piece in msg.chunks(13) {
                m.update(piece);
            }
            let ok = compare_macs(vec![m], &[tag]).0;
            match t["result"].as_str().unwrap() {
                "valid" => {
                    assert!(ok, "tcId {}", t["tcId"]);
                    valid += 1;
                }
                _ => {
                    assert!(!ok, "tcId {}", t["tcId"]);
                    invalid += 1;
                }
            }
        }
    }
    assert_eq!(valid + invalid, doc["numberOfTests"].as_u64().unwrap());
    assert!(valid > 0 && invalid > 0);
}

#[test]
fn any_key_matching_any_signature_passes() {
    let sig = |k: &[u8]| -> [u8; 32] {
        hex::decode(hmac_hex(k, &[b"m"]))
            .unwrap()
            .try_into()
            .unwrap()
    };
    let keyed = |k: &[u8]| {
        let mut m = new_mac(k, "x").unwrap();
        m.update(b"m");
        m
    };
    let (ok, first) = compare_macs(vec![keyed(b"a"), keyed(b"b")], &[[0; 32], sig(b"b")]);
    assert!(ok);
    assert_eq!(
        first,
        Some(sig(b"a")),
        "the first key's MAC names the delivery"
    );
    assert!(!compare_macs(vec![keyed(b"a")], &[sig(b"b")]).0);
    assert!(!compare_macs(vec![], &[sig(b"b")]).0);
}

#[test]
fn strict_decoders() {
    let h = "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
    assert!(decode_hex32(h).is_some());
    assert_eq!(decode_hex32(&h.to_uppercase()), decode_hex32(h));
    for bad in [
        "",
        &h[..63],
        &format!("{h}0"),
        &format!("{}g", &h[..63]),
        &format!(" {}", &h[1..]),
    ] {
        assert!(decode_hex32(bad).is_none(), "{bad:?}");
    }
    let b = "K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4=";
    assert!(decode_b64::<32>(b).is_some());
    // Missing padding, non-canonical trailing bits, URL alphabet, junk, wrong length.
    for bad in [
        "K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4",
        "K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI5=",
        "K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN_H_pI4=",
        "K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4=!!",
        "K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/",
        "",
    ] {
        assert!(decode_b64::<32>(bad).is_none(), "{bad:?}");
    }
    for ok in ["0", "1614265330", "0001"] {
        assert!(parse_timestamp("h", ok).is_ok());
    }
    for bad in [
        "",
        "+1",
        "-1",
        " 1",
        "1 ",
        "1.5",
        "1e9",
        "99999999999999999999",
        "١٢",
    ] {
        assert!(parse_timestamp("h", bad).is_err(), "{bad:?}");
    }
}

// ---------------------------------------------------------------- github

#[test]
fn github_documented_example_and_variants() {
    let doc: Value = serde_json::from_str(GITHUB_VECTORS).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for c in cases {
        let w = hook("github", &[c["secret"].as_str().unwrap()], 300, 1 << 20);
        let store = MemoryStore::new();
        let h = [(
            "x-hub-signature-256",
            c["x_hub_signature_256"].as_str().unwrap(),
        )];
        let body = c["payload"].as_str().unwrap().as_bytes();
        let got = deliver(&w, &h, body, 4, 1_700_000_000, &store);
        let want = c["expected"].as_str().unwrap() == "accept";
        assert_eq!(got.is_ok(), want, "{}: {got:?}", c["name"]);
        if let Err(e) = got {
            assert_eq!(e.status(), 401);
            assert_eq!(e.code(), "invalid_signature");
        }
    }
}

const GH_SIG: &str = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
const GH_SECRET: &str = "It's a Secret to Everybody";

#[test]
fn github_rotation_wrong_secret_and_missing_header() {
    let store = MemoryStore::new();
    let rotated = hook("github", &["new-secret", GH_SECRET], 300, 1 << 20);
    let h = [("x-hub-signature-256", GH_SIG)];
    assert!(deliver(&rotated, &h, b"Hello, World!", 100, 1, &store).is_ok());
    let wrong = hook("github", &["new-secret"], 300, 1 << 20);
    assert_eq!(
        deliver(&wrong, &h, b"Hello, World!", 100, 1, &store),
        Err(WebhookError::SignatureMismatch)
    );
    assert_eq!(
        deliver(
            &wrong,
            &[("x-other", "1")],
            b"Hello, World!",
            100,
            1,
            &store
        ),
        Err(WebhookError::MissingHeader("x-hub-signature-256"))
    );
}

#[test]
fn github_replay_is_caught_by_body_mac_and_by_delivery_id() {
    let w = hook("github", &[GH_SECRET], 300, 1 << 20);
    let store = MemoryStore::new();
    let h1 = [
        ("x-hub-signature-256", GH_SIG),
        ("x-github-delivery", "d-1"),
    ];
    assert!(deliver(&w, &h1, b"Hello, World!", 100, 1000, &store).is_ok());
    // The delivery id is not signed: changing it does not make a replay fresh.
    let h2 = [
        ("x-hub-signature-256", GH_SIG),
        ("x-github-delivery", "d-2"),
    ];
    assert_eq!(
        deliver(&w, &h2, b"Hello, World!", 100, 1000, &store),
        Err(WebhookError::Replayed)
    );
    let h3 = [("x-hub-signature-256", GH_SIG)];
    assert_eq!(
        deliver(&w, &h3, b"Hello, World!", 100, 1299, &store),
        Err(WebhookError::Replayed)
    );
    // After the window it is accepted again.
    assert!(deliver(&w, &h3, b"Hello, World!", 100, 1301, &store).is_ok());
    // A differently signed body reusing a remembered delivery id is a replay too.
    let body = b"another event";
    let sig = format!("sha256={}", hmac_hex(GH_SECRET.as_bytes(), &[body]));
    let h4 = [
        ("x-hub-signature-256", sig.as_str()),
        ("x-github-delivery", "d-1"),
    ];
    assert_eq!(
        deliver(&w, &h4, body, 100, 1200, &store),
        Err(WebhookError::Replayed)
    );
}

// ---------------------------------------------------------------- standard

#[test]
fn standard_webhooks_reference_cases() {
    let doc: Value = serde_json::from_str(STANDARD_VECTORS).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for c in cases {
        let w = hook("standard", &[c["secret"].as_str().unwrap()], 300, 1 << 20);
        let store = MemoryStore::new();
        let headers: Vec<(String, String)> = c["headers"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        let body = c["payload"].as_str().unwrap().as_bytes();
        let now = c["now_unix"].as_u64().unwrap();
        let got = w
            .begin(&headers, now * 1000)
            .and_then(|mut v| v.update(body).map(|_| v))
            .and_then(|v| v.finish(now * 1000, &store));
        let want = c["expected"].as_str().unwrap() == "accept";
        assert_eq!(got.is_ok(), want, "{}: {got:?}", c["name"]);
        let expect_err = match c["reference_result"].as_str().unwrap() {
            "TimestampTooOld" => Some(WebhookError::TimestampTooOld { tolerance_s: 300 }),
            "FutureTimestamp" => Some(WebhookError::TimestampInFuture { tolerance_s: 300 }),
            "MissingHeader" => {
                let missing = ["webhook-id", "webhook-timestamp", "webhook-signature"]
                    .into_iter()
                    .find(|h| !c["headers"].as_object().unwrap().contains_key(*h))
                    .unwrap();
                Some(WebhookError::MissingHeader(missing))
            }
            _ => None,
        };
        if let Some(e) = expect_err {
            assert_eq!(got, Err(e), "{}", c["name"]);
        }
    }
}

const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SW_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
const SW_TS: &str = "1614265330";
const SW_BODY: &[u8] = br#"{"test": 2432232314}"#;
const SW_V1: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
/// RFC 8032 section 7.1 test 1 public key, as a Standard Webhooks `whpk_` key.
const RFC8032_PK: &str = "whpk_11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";
/// Ed25519 over `"<SW_ID>.<SW_TS>.<SW_BODY>"` with RFC 8032 test 1's secret key, made with
/// Python `cryptography` (an independent implementation).
const SW_V1A: &str =
    "v1a,fldxM4gAKugP6nnt1hdz3sgGfZ6d99nzrMFnZOELIxbzEHoVmAb2ADpkJK7zgPePmPsle0zV9jSeGlHFG2NVAw==";

fn sw_headers(sig: &str) -> [(&'static str, String); 3] {
    [
        ("webhook-id", SW_ID.to_string()),
        ("webhook-timestamp", SW_TS.to_string()),
        ("webhook-signature", sig.to_string()),
    ]
}

fn sw_deliver(
    w: &Webhook,
    sig: &str,
    body: &[u8],
    now: u64,
    store: &MemoryStore,
) -> Result<Verified, WebhookError> {
    let h = sw_headers(sig);
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    deliver(w, &h, body, 3, now, store)
}

#[test]
fn standard_ed25519_v1a_verifies_streamed() {
    let w = hook("standard", &[RFC8032_PK], 300, 1 << 20);
    let now = 1_614_265_330;
    assert!(sw_deliver(&w, SW_V1A, SW_BODY, now, &MemoryStore::new()).is_ok());
    // Whole-body and 1-byte chunks give the same answer.
    let h = sw_headers(SW_V1A);
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert!(deliver(&w, &h, SW_BODY, 1, now, &MemoryStore::new()).is_ok());
    assert!(deliver(&w, &h, SW_BODY, 1 << 20, now, &MemoryStore::new()).is_ok());
    // Body changed, signature flipped, v1a label on an HMAC, HMAC-only webhook.
    assert_eq!(
        sw_deliver(
            &w,
            SW_V1A,
            br#"{"test": 2432232315}"#,
            now,
            &MemoryStore::new()
        ),
        Err(WebhookError::SignatureMismatch)
    );
    let mut flipped = SW_V1A.to_string();
    flipped.replace_range(10..11, if &SW_V1A[10..11] == "A" { "B" } else { "A" });
    assert!(sw_deliver(&w, &flipped, SW_BODY, now, &MemoryStore::new()).is_err());
    assert!(sw_deliver(&w, SW_V1, SW_BODY, now, &MemoryStore::new()).is_err());
    let hmac_only = hook("standard", &[SW_SECRET], 300, 1 << 20);
    assert!(sw_deliver(&hmac_only, SW_V1A, SW_BODY, now, &MemoryStore::new()).is_err());
}

#[test]
fn standard_mixed_keys_and_signatures_any_match_passes() {
    let now = 1_614_265_330;
    let w = hook(
        "standard",
        &[
            "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
            RFC8032_PK,
            SW_SECRET,
        ],
        300,
        1 << 20,
    );
    let both = format!("v2,xyz {SW_V1} {SW_V1A}");
    assert!(sw_deliver(&w, &both, SW_BODY, now, &MemoryStore::new()).is_ok());
    assert!(sw_deliver(&w, SW_V1, SW_BODY, now, &MemoryStore::new()).is_ok());
    assert!(sw_deliver(&w, SW_V1A, SW_BODY, now, &MemoryStore::new()).is_ok());
    // Extra spaces between entries are tolerated, as the spec's list is space-separated.
    let spaced = format!("  {SW_V1}   v1,garbage ");
    assert!(sw_deliver(&w, &spaced, SW_BODY, now, &MemoryStore::new()).is_ok());
}

#[test]
fn standard_replay_of_a_webhook_id_is_refused_within_the_window() {
    let w = hook("standard", &[SW_SECRET], 300, 1 << 20);
    let store = MemoryStore::new();
    let now = 1_614_265_330;
    assert!(sw_deliver(&w, SW_V1, SW_BODY, now, &store).is_ok());
    assert_eq!(
        sw_deliver(&w, SW_V1, SW_BODY, now + 10, &store),
        Err(WebhookError::Replayed)
    );
    // Same id, re-signed with a new timestamp (a sender retry): still the same delivery.
    let ts2 = (now + 20).to_string();
    let key = base64::engine::general_purpose::STANDARD
        .decode(&SW_SECRET[6..])
        .unwrap();
    let sig = format!(
        "v1,{}",
        hmac_b64(
            &key,
            &[SW_ID.as_bytes(), b".", ts2.as_bytes(), b".", SW_BODY]
        )
    );
    let h = [
        ("webhook-id", SW_ID),
        ("webhook-timestamp", ts2.as_str()),
        ("webhook-signature", sig.as_str()),
    ];
    assert_eq!(
        deliver(&w, &h, SW_BODY, 7, now + 20, &store),
        Err(WebhookError::Replayed)
    );
    // Forged deliveries never reach the store: a wrong signature is not a replay check.
    let versions = |s: &MemoryStore| -> Vec<Option<u32>> {
        (0..w.replay.slots())
            .map(|i| s.get(&w.replay.key(i)).map(|v| v.1))
            .collect()
    };
    let before = versions(&store);
    let forged = sw_deliver(
        &w,
        "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        SW_BODY,
        now,
        &store,
    );
    assert_eq!(forged, Err(WebhookError::SignatureMismatch));
    assert_eq!(versions(&store), before);
}

#[test]
fn standard_config_secrets() {
    let err = |s: &str| {
        let doc = format!(
            r#"{{"webhooks":{{"b":{{"scheme":"standard","secrets":["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw","{s}"]}}}}}}"#
        );
        parse(doc.as_bytes(), &no_env).unwrap_err()
    };
    for bad in [
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "whsec_",
        "whsec_!!!",
        "whpk_AAAA",
        "whsk_abc",
    ] {
        let e = err(bad);
        assert_eq!(e.path, "webhooks.b.secrets[1]", "{bad}: {e}");
    }
    assert!(err("whsk_abc").message.contains("whpk_"));
    // A small-order point is not a usable public key.
    let weak = format!(
        "whpk_{}",
        base64::engine::general_purpose::STANDARD.encode([0u8; 32])
    );
    assert!(err(&weak).message.contains("Ed25519"));
    // Short keys are allowed with a warning.
    let (_, warnings) = parse(
        br#"{"default_route":{},"webhooks":{"b":{"scheme":"standard","secrets":["whsec_c2hvcnQ="]}}}"#,
        &no_env,
    )
    .unwrap();
    assert!(
        warnings.iter().any(|w| w.path == "webhooks.b.secrets[0]"),
        "{warnings:?}"
    );
}

// ---------------------------------------------------------------- stripe

const STRIPE_S1: &str = "whsec_test_secret_one";
const STRIPE_S2: &str = "whsec_test_secret_two";
const STRIPE_T: &str = "1700000000";
const STRIPE_BODY: &[u8] = br#"{"id":"evt_1","object":"event","type":"payment_intent.succeeded"}"#;
/// HMAC-SHA256(key = the whole secret string, "<t>.<body>"), computed with Python's `hmac`.
const STRIPE_V1_S1: &str = "693237eb47c83f51cb66065ac379fac99b4132b429fc6ee1caef881563bd8b4c";
const STRIPE_V1_S2: &str = "f6d01adeaed9155e7cc13090b9cb2bc9739db9034e4dfb24276db819de3b0b5f";

fn stripe(
    header: &str,
    body: &[u8],
    now: u64,
    w: &Webhook,
    store: &MemoryStore,
) -> Result<Verified, WebhookError> {
    deliver(w, &[("stripe-signature", header)], body, 16, now, store)
}

#[test]
fn stripe_scheme_per_its_docs() {
    assert_eq!(
        hmac_hex(
            STRIPE_S1.as_bytes(),
            &[STRIPE_T.as_bytes(), b".", STRIPE_BODY]
        ),
        STRIPE_V1_S1
    );
    let w = hook("stripe", &[STRIPE_S1], 300, 1 << 20);
    let now = 1_700_000_000;
    let ok = format!("t={STRIPE_T},v1={STRIPE_V1_S1}");
    assert!(stripe(&ok, STRIPE_BODY, now, &w, &MemoryStore::new()).is_ok());
    // Extra v1 entries (rolling secrets) and v0 entries (test mode) are fine, in any order.
    let several = format!("v0=6ffbb59b2300aae63f272406069a9788598b792a944a07aba816edb039989a39,v1={STRIPE_V1_S2},t={STRIPE_T},v1={STRIPE_V1_S1}");
    assert!(stripe(&several, STRIPE_BODY, now, &w, &MemoryStore::new()).is_ok());
    // Upper-case hex decodes to the same MAC.
    let upper = format!("t={STRIPE_T},v1={}", STRIPE_V1_S1.to_uppercase());
    assert!(stripe(&upper, STRIPE_BODY, now, &w, &MemoryStore::new()).is_ok());
    // The key is the whole string: without the whsec_ prefix it does not match.
    let stripped = hook("stripe", &[&STRIPE_S1[6..]], 300, 1 << 20);
    assert_eq!(
        stripe(&ok, STRIPE_BODY, now, &stripped, &MemoryStore::new()),
        Err(WebhookError::SignatureMismatch)
    );
    // Body changed, timestamp changed.
    assert_eq!(
        stripe(&ok, b"{}", now, &w, &MemoryStore::new()),
        Err(WebhookError::SignatureMismatch)
    );
    let t2 = format!("t=1700000001,v1={STRIPE_V1_S1}");
    assert_eq!(
        stripe(&t2, STRIPE_BODY, now, &w, &MemoryStore::new()),
        Err(WebhookError::SignatureMismatch)
    );
    // Tolerance, both directions, bounds inclusive.
    assert!(stripe(&ok, STRIPE_BODY, now + 300, &w, &MemoryStore::new()).is_ok());
    assert!(stripe(&ok, STRIPE_BODY, now - 300, &w, &MemoryStore::new()).is_ok());
    assert_eq!(
        stripe(&ok, STRIPE_BODY, now + 301, &w, &MemoryStore::new()),
        Err(WebhookError::TimestampTooOld { tolerance_s: 300 })
    );
    assert_eq!(
        stripe(&ok, STRIPE_BODY, now - 301, &w, &MemoryStore::new()),
        Err(WebhookError::TimestampInFuture { tolerance_s: 300 })
    );
}

#[test]
fn stripe_rotation_and_replay_with_a_dropped_signature() {
    let w = hook("stripe", &[STRIPE_S1, STRIPE_S2], 300, 1 << 20);
    let store = MemoryStore::new();
    let now = 1_700_000_000;
    let both = format!("t={STRIPE_T},v1={STRIPE_V1_S1},v1={STRIPE_V1_S2}");
    assert!(stripe(&both, STRIPE_BODY, now, &w, &store).is_ok());
    for replay in [
        both.clone(),
        format!("t={STRIPE_T},v1={STRIPE_V1_S2}"),
        format!("t={STRIPE_T},v1={STRIPE_V1_S1}"),
    ] {
        assert_eq!(
            stripe(&replay, STRIPE_BODY, now + 5, &w, &store),
            Err(WebhookError::Replayed),
            "{replay}"
        );
    }
    // The old secret alone still verifies a fresh delivery (rotation).
    let only_new = hook("stripe", &[STRIPE_S2], 300, 1 << 20);
    assert!(stripe(&both, STRIPE_BODY, now, &only_new, &MemoryStore::new()).is_ok());
}

#[test]
fn stripe_malformed_headers() {
    let w = hook("stripe", &[STRIPE_S1], 300, 1 << 20);
    let now = 1_700_000_000;
    for bad in [
        "",
        "t=1700000000",
        &format!("v1={STRIPE_V1_S1}"),
        &format!("t=1700000000,t=1700000000,v1={STRIPE_V1_S1}"),
        &format!("t= 1700000000,v1={STRIPE_V1_S1}"),
        &format!("t=1700000000, v1={STRIPE_V1_S1}"),
        &format!("t=1700000000,v1={STRIPE_V1_S1},junk"),
        &format!("t=-1,v1={STRIPE_V1_S1}"),
        "t=1700000000,v1=zz",
        &format!("t=1700000000{}", ",v1=00".repeat(40)),
    ] {
        let got = stripe(bad, STRIPE_BODY, now, &w, &MemoryStore::new());
        assert!(got.is_err(), "{bad:?}");
        assert_eq!(got.unwrap_err().status(), 401);
    }
}

// ---------------------------------------------------------------- slack

const SLACK_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
const SLACK_TS: &str = "1531420618";
const SLACK_BODY: &str = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
/// Slack's documented example ("Verifying requests from Slack").
const SLACK_SIG: &str = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";

#[test]
fn slack_documented_example() {
    let w = hook("slack", &[SLACK_SECRET], 300, 1 << 20);
    let now = 1_531_420_618;
    let h = [
        ("x-slack-request-timestamp", SLACK_TS),
        ("x-slack-signature", SLACK_SIG),
    ];
    let store = MemoryStore::new();
    assert!(deliver(&w, &h, SLACK_BODY.as_bytes(), 50, now, &store).is_ok());
    assert_eq!(
        deliver(&w, &h, SLACK_BODY.as_bytes(), 50, now, &store),
        Err(WebhookError::Replayed)
    );
    let fresh = MemoryStore::new();
    assert_eq!(
        deliver(&w, &h, &SLACK_BODY.as_bytes()[1..], 50, now, &fresh),
        Err(WebhookError::SignatureMismatch)
    );
    let h2 = [
        ("x-slack-request-timestamp", "1531420619"),
        ("x-slack-signature", SLACK_SIG),
    ];
    assert_eq!(
        deliver(&w, &h2, SLACK_BODY.as_bytes(), 50, now, &fresh),
        Err(WebhookError::SignatureMismatch)
    );
    assert_eq!(
        deliver(&w, &h, SLACK_BODY.as_bytes(), 50, now + 301, &fresh),
        Err(WebhookError::TimestampTooOld { tolerance_s: 300 })
    );
    for bad in [
        [
            ("x-slack-request-timestamp", SLACK_TS),
            ("x-slack-signature", &SLACK_SIG[3..]),
        ],
        [
            ("x-slack-request-timestamp", SLACK_TS),
            (
                "x-slack-signature",
                "v1=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503",
            ),
        ],
        [
            ("x-slack-request-timestamp", "now"),
            ("x-slack-signature", SLACK_SIG),
        ],
        [
            ("x-slack-request-timestamp", SLACK_TS),
            ("x-other", SLACK_SIG),
        ],
    ] {
        assert!(
            deliver(&w, &bad, SLACK_BODY.as_bytes(), 50, now, &fresh).is_err(),
            "{bad:?}"
        );
    }
}

// ---------------------------------------------------------------- body handling

#[test]
fn body_limit_is_enforced_while_streaming_and_from_content_length() {
    let body = vec![b'x'; 100];
    let sig = format!("sha256={}", hmac_hex(b"k", &[&body]));
    let w = hook("github", &["k"], 300, 100);
    let h = [("x-hub-signature-256", sig.as_str())];
    assert!(
        deliver(&w, &h, &body, 33, 1, &MemoryStore::new()).is_ok(),
        "exactly the limit passes"
    );
    let mut v = w.begin(&h, 1000).unwrap();
    v.update(&body[..60]).unwrap();
    assert_eq!(
        v.update(&body[..41]),
        Err(WebhookError::PayloadTooLarge { limit: 100 })
    );
    assert_eq!(v.body_len(), 60, "the refused chunk was not counted");
    let e = w
        .begin(
            &[
                ("x-hub-signature-256", sig.as_str()),
                ("content-length", "101"),
            ],
            1000,
        )
        .unwrap_err();
    assert_eq!((e.status(), e.code()), (413, "payload_too_large"));
    // A huge declared length does not overflow anything.
    assert!(w
        .begin(
            &[
                ("x-hub-signature-256", sig.as_str()),
                ("content-length", "99999999999999999999999")
            ],
            1000
        )
        .is_ok());
}

#[test]
fn every_chunking_of_the_body_verifies_the_same() {
    let body: Vec<u8> = (0..5000u32).map(|i| (i * 31 % 251) as u8).collect();
    let secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    let key = base64::engine::general_purpose::STANDARD
        .decode(&secret[6..])
        .unwrap();
    let w = hook("standard", &[secret], 300, 1 << 20);
    for (i, chunk) in [1usize, 2, 63, 64, 65, 4096, 5000, 9999]
        .into_iter()
        .enumerate()
    {
        let id = format!("msg_{i}");
        let sig = format!("v1,{}", hmac_b64(&key, &[id.as_bytes(), b".100.", &body]));
        let h = [
            ("webhook-id", id.as_str()),
            ("webhook-timestamp", "100"),
            ("webhook-signature", sig.as_str()),
        ];
        assert!(
            deliver(&w, &h, &body, chunk, 100, &MemoryStore::new()).is_ok(),
            "chunk {chunk}"
        );
        let mut changed = body.clone();
        changed[4321] ^= 0x20;
        assert_eq!(
            deliver(&w, &h, &changed, chunk, 100, &MemoryStore::new()),
            Err(WebhookError::SignatureMismatch)
        );
    }
}

#[test]
fn a_body_trickled_past_the_window_is_refused() {
    let w = hook("stripe", &[STRIPE_S1], 300, 1 << 20);
    let h = [(
        "stripe-signature",
        format!("t={STRIPE_T},v1={STRIPE_V1_S1}"),
    )];
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut v = w.begin(&h, 1_700_000_000_000).unwrap();
    v.update(STRIPE_BODY).unwrap();
    assert_eq!(
        v.finish(1_700_000_301_000, &MemoryStore::new()),
        Err(WebhookError::TimestampTooOld { tolerance_s: 300 })
    );
}

#[test]
fn an_empty_body_is_verified_too() {
    let sig = format!("sha256={}", hmac_hex(b"k", &[b""]));
    let w = hook("github", &["k"], 300, 10);
    let v = w
        .begin(&[("x-hub-signature-256", sig.as_str())], 0)
        .unwrap();
    assert!(v.finish(0, &MemoryStore::new()).is_ok());
}

// ---------------------------------------------------------------- hostile headers

#[test]
fn duplicate_signature_headers_are_refused() {
    let w = hook("github", &[GH_SECRET], 300, 1 << 20);
    let h = [
        ("x-hub-signature-256", GH_SIG),
        ("X-Hub-Signature-256", GH_SIG),
    ];
    assert!(matches!(
        w.begin(&h, 0),
        Err(WebhookError::MalformedHeader {
            header: "x-hub-signature-256",
            ..
        })
    ));
    // Envoy folds repeated HTTP/1 headers into one comma-joined value: that cannot parse.
    let folded = format!("{GH_SIG},{GH_SIG}");
    assert!(w
        .begin(&[("x-hub-signature-256", folded.as_str())], 0)
        .is_err());
}

/// A small deterministic generator, so the hostile-input test is reproducible.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

#[test]
fn hostile_header_values_error_and_never_panic() {
    let hooks = [
        hook("github", &[GH_SECRET], 300, 1 << 20),
        hook("stripe", &[STRIPE_S1], 300, 1 << 20),
        hook("standard", &[SW_SECRET, RFC8032_PK], 300, 1 << 20),
        hook("slack", &[SLACK_SECRET], 300, 1 << 20),
    ];
    let alphabet: &[u8] = b"v01a=,.t sha256:+/-_whsecpk\x00\xff9fF";
    let mut fixed: Vec<String> = vec![
        String::new(),
        ",".into(),
        "=".into(),
        " ".into(),
        "v1,".into(),
        "v1a,".into(),
        "t=".into(),
        "v0=".into(),
        "sha256=".into(),
        "t=1,v1=".into(),
        "\u{0}".into(),
        "é".repeat(100),
        "v1,".repeat(10_000),
        ",".repeat(10_000),
        "9".repeat(40),
        format!("v1a,{}", "A".repeat(88)),
        format!("v1a,{}==", "A".repeat(86)),
        format!("v1a,{}", "/".repeat(86) + "=="),
    ];
    let mut rng = Lcg(7);
    for _ in 0..3000 {
        let len = (rng.next() % 120) as usize;
        let s: Vec<u8> = (0..len)
            .map(|_| alphabet[(rng.next() as usize) % alphabet.len()])
            .collect();
        fixed.push(String::from_utf8_lossy(&s).into_owned());
    }
    let mut rejected = 0;
    for w in &hooks {
        let names = w.scheme.headers();
        for v in &fixed {
            for target in 0..names.len() {
                // Every other header valid-looking, one hostile.
                let mut h: Vec<(&str, &str)> = names.iter().map(|n| (*n, "1614265330")).collect();
                h[target].1 = v;
                let got = w
                    .begin(&h, 1_614_265_330_000)
                    .and_then(|mut ver| ver.update(b"body").map(|_| ver))
                    .and_then(|ver| ver.finish(1_614_265_330_000, &MemoryStore::new()));
                assert!(got.is_err(), "{} {target} {v:?}", w.scheme.as_str());
                rejected += 1;
            }
        }
    }
    assert!(rejected > 10_000);
}

#[test]
fn standard_ed25519_with_non_canonical_or_small_order_parts_is_refused() {
    let w = hook("standard", &[RFC8032_PK], 300, 1 << 20);
    let now = 1_614_265_330;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&SW_V1A[4..])
        .unwrap();
    // S + L (the group order) is the classic malleability: must not verify.
    let l: [u8; 32] = [
        0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde,
        0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];
    let mut sig = raw.clone();
    let mut carry = 0u16;
    for i in 0..32 {
        let s = u16::from(sig[32 + i]) + u16::from(l[i]) + carry;
        sig[32 + i] = s as u8;
        carry = s >> 8;
    }
    let malleated = format!(
        "v1a,{}",
        base64::engine::general_purpose::STANDARD.encode(&sig)
    );
    assert!(sw_deliver(&w, &malleated, SW_BODY, now, &MemoryStore::new()).is_err());
    // An all-zero signature (identity R, zero S).
    let zero = format!(
        "v1a,{}",
        base64::engine::general_purpose::STANDARD.encode([0u8; 64])
    );
    assert!(sw_deliver(&w, &zero, SW_BODY, now, &MemoryStore::new()).is_err());
}

// ---------------------------------------------------------------- config

#[test]
fn config_errors_name_the_json_path() {
    let err = |doc: &str| parse(doc.as_bytes(), &no_env).unwrap_err();
    let cases = [
        (
            r#"{"webhooks":{"h":{"scheme":"gitlab","secrets":["s"]}}}"#,
            "webhooks.h.scheme",
        ),
        (
            r#"{"webhooks":{"h":{"scheme":"github","secrets":[]}}}"#,
            "webhooks.h.secrets",
        ),
        (
            r#"{"webhooks":{"h":{"scheme":"github","secrets":[""]}}}"#,
            "webhooks.h.secrets[0]",
        ),
        (
            r#"{"webhooks":{"h":{"scheme":"github","secrets":["s","s","s","s","s","s","s","s","s"]}}}"#,
            "webhooks.h.secrets",
        ),
        (
            r#"{"webhooks":{"h":{"scheme":"github","secrets":["s"],"tolerance_s":0}}}"#,
            "webhooks.h.tolerance_s",
        ),
        (
            r#"{"webhooks":{"h":{"scheme":"github","secrets":["s"],"tolerance_s":9999999}}}"#,
            "webhooks.h.tolerance_s",
        ),
        (
            r#"{"webhooks":{"h":{"scheme":"github","secrets":["s"],"max_body_bytes":0}}}"#,
            "webhooks.h.max_body_bytes",
        ),
        (
            r#"{"webhooks":{"h":{"scheme":"github","secrets":["s"],"max_body_bytes":1000000000}}}"#,
            "webhooks.h.max_body_bytes",
        ),
        (
            r#"{"webhooks":{"h":{"scheme":"github","secrets":["s"],"replay_capacity":1}}}"#,
            "webhooks.h.replay_capacity",
        ),
        (
            r#"{"webhooks":{"h":{"scheme":"github","secrets":["s"],"tolerance":5}}}"#,
            "webhooks.h",
        ),
        (
            r#"{"webhooks":{"h":{"scheme":"github","secrets":[{"env":"NOPE"}]}}}"#,
            "webhooks.h.secrets[0]",
        ),
    ];
    for (doc, path) in cases {
        let e = err(doc);
        assert!(
            e.path.starts_with(path),
            "{doc}: {} ({})",
            e.path,
            e.message
        );
    }
}

#[test]
fn config_compiles_webhooks_with_env_secrets_and_defaults() {
    let env = |n: &str| (n == "GH").then(|| GH_SECRET.to_string());
    let (c, _) = parse(
        br#"{"webhooks":{"gh":{"scheme":"github","secrets":[{"env":"GH"}]}},
             "routes":[{"name":"r","match":{"path":"/h"},"webhook":"gh"}]}"#,
        &env,
    )
    .unwrap();
    let w = c.webhooks.get("gh").unwrap();
    assert_eq!(
        (w.tolerance_s(), w.max_body_bytes(), w.scheme()),
        (300, 1_048_576, Scheme::Github)
    );
    assert_eq!(w.replay.slots(), 512);
    assert!(
        !format!("{w:?}").contains("Secret to"),
        "Debug must not print secrets"
    );
    assert!(deliver(
        w,
        &[("x-hub-signature-256", GH_SIG)],
        b"Hello, World!",
        9,
        5,
        &MemoryStore::new()
    )
    .is_ok());
    let store = MemoryStore::new();
    c.webhooks.prepare(&store);
    assert_eq!(store.len(), 512);
}
