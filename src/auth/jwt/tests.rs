//! Verifier tests: public vectors (RFC 7515 appendix A, Wycheproof, Envoy's jwt_verify_lib)
//! and every attack of issue 4 at unit level. Tokens are minted with jwt-simple (see `mint`).

use super::*;
use crate::auth::jwks::{self, Alg, AlgSet, Source};
use crate::auth::mint::SigningKey;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

const NOW: u64 = 1_700_000_000;

fn vectors(name: &str) -> Value {
    let path = format!("{}/tests/vectors/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn no_env(_: &str) -> Option<String> {
    None
}

fn all_algs() -> AlgSet {
    AlgSet::of(&Alg::ALL)
}

fn keyset(doc: Value) -> KeySet {
    jwks::parse(&doc, all_algs(), Source::Local(&no_env))
        .unwrap()
        .keys
}

fn rules() -> Rules {
    Rules {
        issuer: Some("https://issuer.test".into()),
        audiences: vec!["api".into()],
        algorithms: all_algs(),
        clock_skew_s: 30,
        require_exp: true,
        max_token_bytes: 8192,
    }
}

fn claims(extra: Value) -> Map<String, Value> {
    let mut m =
        json!({"iss": "https://issuer.test", "aud": "api", "sub": "alice", "exp": NOW + 600})
            .as_object()
            .cloned()
            .unwrap();
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        if v.is_null() {
            m.remove(&k);
        } else {
            m.insert(k, v);
        }
    }
    m
}

/// The private RSA key of Wycheproof's JWS rs256 group (key generation in tests is slow).
fn rsa_private_jwk() -> Value {
    let v = vectors("wycheproof/json_web_signature_test.subset.json");
    v["testGroups"][2]["private"].clone()
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// HS256 over arbitrary header and payload text: for header-level attacks jwt-simple won't
/// produce.
fn hs256_raw(header: &str, payload: &str, key: &[u8]) -> String {
    let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap();
    mac.update(input.as_bytes());
    format!("{input}.{}", b64(&mac.finalize().into_bytes()))
}

const HS_KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

fn hs_keys() -> KeySet {
    keyset(json!({"keys": [{"kty": "oct", "kid": "h1", "k": b64(HS_KEY)}]}))
}

fn hs(header: Value, extra: Value) -> String {
    hs256_raw(
        &header.to_string(),
        &Value::Object(claims(extra)).to_string(),
        HS_KEY,
    )
}

fn check(token: &str, keys: &KeySet) -> Result<(), JwtError> {
    verify(token, &rules(), keys, NOW).map(|_| ())
}

// ---- valid tokens of every algorithm ----

#[test]
fn every_algorithm_verifies_tokens_minted_by_jwt_simple() {
    let rsa = rsa_private_jwk();
    let mut signers = Vec::new();
    for alg in ["HS256", "HS384", "HS512", "ES256", "ES384", "EdDSA"] {
        signers.push((alg, SigningKey::generate(alg, "k-1").unwrap()));
    }
    for alg in ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"] {
        signers.push((alg, SigningKey::rsa_from_jwk(alg, &rsa, "k-1").unwrap()));
    }
    for (alg, key) in &signers {
        let keys = keyset(json!({ "keys": [key.jwk()] }));
        let token = key.sign(&claims(json!({}))).unwrap();
        let t = verify(&token, &rules(), &keys, NOW).unwrap_or_else(|e| panic!("{alg}: {e}"));
        assert_eq!(t.alg.name(), *alg);
        assert_eq!(t.sub.as_deref(), Some("alice"));
        // The same token fails once its payload changes.
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = b64(Value::Object(claims(json!({"sub": "mallory"})))
            .to_string()
            .as_bytes());
        parts[1] = &forged;
        assert_eq!(
            check(&parts.join("."), &keys),
            Err(JwtError::BadSignature),
            "{alg}"
        );
    }
}

#[test]
fn pss_and_pkcs1_keys_are_not_interchangeable_when_the_jwk_says_so() {
    let rsa = rsa_private_jwk();
    let ps = SigningKey::rsa_from_jwk("PS256", &rsa, "k").unwrap();
    let rs_only =
        keyset(json!({"keys": [SigningKey::rsa_from_jwk("RS256", &rsa, "k").unwrap().jwk()]}));
    let token = ps.sign(&claims(json!({}))).unwrap();
    assert_eq!(check(&token, &rs_only), Err(JwtError::NoKeyForAlg));
}

// ---- the attack list of issue 4 ----

#[test]
fn alg_none_is_refused_in_any_letter_case() {
    let keys = hs_keys();
    for alg in ["none", "None", "NONE", "nOnE"] {
        let body = b64(Value::Object(claims(json!({}))).to_string().as_bytes());
        let head = b64(json!({ "alg": alg }).to_string().as_bytes());
        for token in [format!("{head}.{body}."), format!("{head}.{body}.AAAA")] {
            let e = check(&token, &keys).unwrap_err();
            assert!(
                matches!(e, JwtError::AlgNone | JwtError::Malformed(_)),
                "{alg}: {e:?}"
            );
        }
        let with_sig = format!("{head}.{body}.AAAA");
        assert_eq!(check(&with_sig, &keys), Err(JwtError::AlgNone));
    }
}

#[test]
fn rs256_to_hs256_key_confusion_is_refused() {
    let rsa = rsa_private_jwk();
    let rs = SigningKey::rsa_from_jwk("RS256", &rsa, "k").unwrap();
    let jwk = rs.jwk();
    let keys = keyset(json!({ "keys": [jwk.clone()] }));
    // The attacker MACs with the public key bytes (the modulus, the JWK text...).
    let n = jwks::b64url_decode(jwk["n"].as_str().unwrap()).unwrap();
    for secret in [n.clone(), jwk.to_string().into_bytes()] {
        let header = json!({"alg": "HS256", "kid": "k"}).to_string();
        let token = hs256_raw(
            &header,
            &Value::Object(claims(json!({}))).to_string(),
            &secret,
        );
        assert_eq!(check(&token, &keys), Err(JwtError::NoKeyForAlg));
        // With HS256 outside the allow-list it never gets that far.
        let mut r = rules();
        r.algorithms = AlgSet::of(&[Alg::RS256]);
        assert_eq!(
            verify(&token, &r, &keys, NOW).err(),
            Some(JwtError::AlgNotAllowed)
        );
    }
}

#[test]
fn ecdsa_psychic_signature_is_refused() {
    let es = SigningKey::generate("ES256", "e").unwrap();
    let keys = keyset(json!({ "keys": [es.jwk()] }));
    let token = es.sign(&claims(json!({}))).unwrap();
    let input = token.rsplit_once('.').unwrap().0;
    for sig in [vec![0u8; 64], vec![], vec![0u8; 1], vec![0u8; 65]] {
        let forged = format!("{input}.{}", b64(&sig));
        assert!(check(&forged, &keys).is_err(), "{sig:?}");
    }
    assert_eq!(
        check(&format!("{input}.{}", b64(&[0u8; 64])), &keys),
        Err(JwtError::BadSignature)
    );
    // (r, n - s) also verifies (ECDSA is malleable): why the token cache never keys on
    // signature bytes. Here: the valid token itself passes.
    assert_eq!(check(&token, &keys), Ok(()));
}

#[test]
fn stripped_and_tampered_signatures_are_refused() {
    let keys = hs_keys();
    let token = hs(json!({"alg": "HS256", "kid": "h1"}), json!({}));
    assert_eq!(check(&token, &keys), Ok(()));
    let input = token.rsplit_once('.').unwrap().0;
    assert!(matches!(
        check(&format!("{input}."), &keys),
        Err(JwtError::Malformed(_))
    ));
    assert!(matches!(check(input, &keys), Err(JwtError::Malformed(_))));
    // Every single-bit flip and every truncation of the MAC fails (jwt_verify_lib's fuzz).
    let sig = jwks::b64url_decode(token.rsplit_once('.').unwrap().1).unwrap();
    for i in 0..sig.len() * 8 {
        let mut s = sig.clone();
        s[i / 8] ^= 1 << (i % 8);
        assert_eq!(
            check(&format!("{input}.{}", b64(&s)), &keys),
            Err(JwtError::BadSignature)
        );
    }
    for len in 1..sig.len() {
        assert_eq!(
            check(&format!("{input}.{}", b64(&sig[..len])), &keys),
            Err(JwtError::BadSignature)
        );
    }
    // A non-canonical encoding of the same MAC (extra trailing character or bits) fails.
    let s = token.rsplit_once('.').unwrap().1;
    assert!(check(&format!("{input}.{s}A"), &keys).is_err());
    assert!(check(&format!("{input}.{s}="), &keys).is_err());
}

#[test]
fn ecdsa_signature_with_an_appended_character_is_refused() {
    // Envoy 1.40's jwt_authn accepted this one (PERF-NOTES): strict base64url refuses it.
    let es = SigningKey::generate("ES256", "e").unwrap();
    let keys = keyset(json!({ "keys": [es.jwk()] }));
    let token = es.sign(&claims(json!({}))).unwrap();
    for extra in ["A", "B", "AA", "_"] {
        assert!(check(&format!("{token}{extra}"), &keys).is_err(), "{extra}");
    }
}

#[test]
fn kid_selects_keys_exactly() {
    let a = SigningKey::generate("ES256", "a").unwrap();
    let b = SigningKey::generate("ES256", "b").unwrap();
    let keys = keyset(json!({ "keys": [a.jwk()] }));
    // Unknown kid.
    assert_eq!(
        check(&b.sign(&claims(json!({}))).unwrap(), &keys),
        Err(JwtError::UnknownKid)
    );
    // A different key under a known kid.
    let impostor = SigningKey::generate("ES256", "a").unwrap();
    assert_eq!(
        check(&impostor.sign(&claims(json!({}))).unwrap(), &keys),
        Err(JwtError::BadSignature)
    );
    // Case matters in kid.
    let upper = SigningKey::generate("ES256", "A").unwrap();
    assert_eq!(
        check(&upper.sign(&claims(json!({}))).unwrap(), &keys),
        Err(JwtError::UnknownKid)
    );
}

#[test]
fn embedded_and_remote_key_headers_are_never_followed() {
    // A token carrying its own key (jwk), a key URL (jku/x5u) or chain (x5c), signed with that
    // attacker key: the configured key decides, so it fails.
    let attacker = SigningKey::generate("ES256", "k").unwrap();
    let mine = SigningKey::generate("ES256", "k").unwrap();
    let keys = keyset(json!({ "keys": [mine.jwk()] }));
    let token = attacker.sign(&claims(json!({}))).unwrap();
    assert_eq!(check(&token, &keys), Err(JwtError::BadSignature));
    let k = jwks::b64url_decode(&b64(HS_KEY)).unwrap();
    for extra in [
        json!({"jku": "https://evil.test/jwks.json"}),
        json!({"x5u": "https://evil.test/cert.pem"}),
        json!({"jwk": {"kty": "oct", "k": b64(b"attacker-attacker-attacker-attack")}}),
    ] {
        let mut h = json!({"alg": "HS256", "kid": "h1"});
        h.as_object_mut()
            .unwrap()
            .extend(extra.as_object().cloned().unwrap());
        let other_key = b"attacker-attacker-attacker-attack";
        let token = hs256_raw(
            &h.to_string(),
            &Value::Object(claims(json!({}))).to_string(),
            other_key,
        );
        assert_eq!(check(&token, &hs_keys()), Err(JwtError::BadSignature));
        // The same header signed with the configured key is fine: the members are ignored.
        let token = hs256_raw(
            &h.to_string(),
            &Value::Object(claims(json!({}))).to_string(),
            &k,
        );
        assert_eq!(check(&token, &hs_keys()), Ok(()));
    }
}

#[test]
fn crit_and_unsupported_header_members_fail() {
    let keys = hs_keys();
    for h in [
        json!({"alg": "HS256", "crit": ["exp"], "exp": 1}),
        json!({"alg": "HS256", "crit": []}),
        json!({"alg": "HS256", "b64": false, "crit": ["b64"]}),
        json!({"alg": "HS256", "zip": "DEF"}),
    ] {
        assert!(
            matches!(
                check(&hs(h.clone(), json!({})), &keys),
                Err(JwtError::UnsupportedHeader(_))
            ),
            "{h}"
        );
    }
}

#[test]
fn header_member_types_and_duplicates() {
    let keys = hs_keys();
    assert_eq!(
        check(&hs(json!({"alg": "HS256", "kid": 7}), json!({})), &keys),
        Err(JwtError::BadMember("token kid is not a string"))
    );
    assert_eq!(
        check(&hs(json!({"alg": 256}), json!({})), &keys),
        Err(JwtError::BadAlg)
    );
    assert_eq!(
        check(&hs(json!({"typ": "JWT"}), json!({})), &keys),
        Err(JwtError::BadAlg)
    );
    assert_eq!(
        check(&hs(json!({"alg": "hs256"}), json!({})), &keys),
        Err(JwtError::BadAlg)
    );
    // Duplicate members: parsers may disagree on which wins, so the token is refused.
    let payload = Value::Object(claims(json!({}))).to_string();
    let t = hs256_raw(r#"{"alg":"HS256","alg":"none"}"#, &payload, HS_KEY);
    assert!(matches!(check(&t, &keys), Err(JwtError::Malformed(_))));
    let t = hs256_raw(
        r#"{"alg":"HS256"}"#,
        r#"{"sub":"a","sub":"b","exp":1800000000,"iss":"https://issuer.test","aud":"api"}"#,
        HS_KEY,
    );
    assert!(matches!(check(&t, &keys), Err(JwtError::Malformed(_))));
}

#[test]
fn malformed_tokens_fail_cheaply_and_without_panicking() {
    let keys = hs_keys();
    let good = hs(json!({"alg": "HS256"}), json!({}));
    let (h, rest) = good.split_once('.').unwrap();
    let (p, s) = rest.split_once('.').unwrap();
    let cases: Vec<String> = vec![
        String::new(),
        ".".into(),
        "..".into(),
        "...".into(),
        "a.b".into(),
        format!("{h}.{p}.{s}.x"),
        format!("{h}.{p}.{s}.x.y"),
        format!("{h}=.{p}.{s}"),
        format!("{h}.{p}=.{s}"),
        format!("{h}.{p}.{s}="),
        format!("{}.{p}.{s}", h.replace('e', "+")),
        format!(" {h}.{p}.{s}"),
        format!("{h}.{p} .{s}"),
        format!("{}.{p}.{s}", b64(b"[1,2]")),
        format!("{}.{p}.{s}", b64(b"\"alg\"")),
        format!("{}.{p}.{s}", b64(b"{\"alg\":\"HS256\"")),
        format!("{h}.{}.{s}", b64(b"[]")),
        format!("{h}.{}.{s}", b64(b"null")),
        format!("{h}.{}.{s}", b64(b"42")),
        format!("{h}.{}.{s}", b64(&[0xff, 0xfe, 0x7b])),
        format!("{h}..{s}"),
        format!(".{p}.{s}"),
        "\u{0}.\u{0}.\u{0}".into(),
        format!("{h}.{p}.{}", "é".repeat(10)),
    ];
    for t in &cases {
        let e = check(t, &keys).unwrap_err();
        assert!(
            matches!(e, JwtError::Malformed(_) | JwtError::BadSignature),
            "{t:?}: {e:?}"
        );
    }
    // Oversized tokens are refused before any parsing.
    let big = format!("{h}.{}.{s}", "A".repeat(9000));
    assert_eq!(check(&big, &keys), Err(JwtError::TooLarge));
    // Deep nesting in claims hits serde_json's recursion limit, not the stack.
    let deep = format!(
        "{h}.{}.{s}",
        b64(format!("{{\"a\":{}1{}}}", "[".repeat(5000), "]".repeat(5000)).as_bytes())
    );
    let mut r = rules();
    r.max_token_bytes = 1 << 20;
    assert!(matches!(
        verify(&deep, &r, &keys, NOW),
        Err(JwtError::Malformed(_))
    ));
}

#[test]
fn registered_claims_with_wrong_types_fail() {
    let keys = hs_keys();
    let h = json!({"alg": "HS256"});
    for (extra, want) in [
        (
            json!({"exp": "1800000000"}),
            "exp claim is not a non-negative NumericDate",
        ),
        (
            json!({"exp": -1}),
            "exp claim is not a non-negative NumericDate",
        ),
        (
            json!({"exp": 2.001e206}),
            "exp claim is not a non-negative NumericDate",
        ),
        (
            json!({"exp": true}),
            "exp claim is not a non-negative NumericDate",
        ),
        (
            json!({"nbf": [1]}),
            "nbf claim is not a non-negative NumericDate",
        ),
        (
            json!({"iat": {}}),
            "iat claim is not a non-negative NumericDate",
        ),
        (json!({"iss": 1}), "iss claim is not a string"),
        (json!({"sub": ["a"]}), "sub claim is not a string"),
        (json!({"jti": 5}), "jti claim is not a string"),
        (
            json!({"aud": 5}),
            "aud claim is not a string or an array of strings",
        ),
        (
            json!({"aud": ["api", 5]}),
            "aud claim is not a string or an array of strings",
        ),
    ] {
        assert_eq!(
            check(&hs(h.clone(), extra.clone()), &keys),
            Err(JwtError::BadMember(want)),
            "{extra}"
        );
    }
    // Fractions are truncated (as jwt_verify_lib does).
    assert_eq!(
        check(
            &hs(h.clone(), json!({"exp": (NOW + 10) as f64 + 0.9})),
            &keys
        ),
        Ok(())
    );
}

#[test]
fn issuer_and_audience() {
    let keys = hs_keys();
    let h = json!({"alg": "HS256"});
    assert_eq!(
        check(&hs(h.clone(), json!({"iss": "https://evil.test"})), &keys),
        Err(JwtError::WrongIssuer)
    );
    assert_eq!(
        check(&hs(h.clone(), json!({"iss": null})), &keys),
        Err(JwtError::WrongIssuer)
    );
    assert_eq!(
        check(&hs(h.clone(), json!({"aud": "other"})), &keys),
        Err(JwtError::WrongAudience)
    );
    assert_eq!(
        check(&hs(h.clone(), json!({"aud": null})), &keys),
        Err(JwtError::WrongAudience)
    );
    assert_eq!(
        check(&hs(h.clone(), json!({"aud": []})), &keys),
        Err(JwtError::WrongAudience)
    );
    assert_eq!(
        check(&hs(h.clone(), json!({"aud": ["x", "api"]})), &keys),
        Ok(())
    );
    // No audiences configured: any (or no) aud passes.
    let mut r = rules();
    r.audiences.clear();
    assert!(verify(&hs(h.clone(), json!({"aud": null})), &r, &keys, NOW).is_ok());
}

#[test]
fn time_claims_with_skew() {
    let keys = hs_keys();
    let h = json!({"alg": "HS256"});
    let at =
        |extra: Value, now: u64| verify(&hs(h.clone(), extra), &rules(), &keys, now).map(|_| ());
    // exp: valid while now < exp + skew (30 s).
    assert_eq!(at(json!({"exp": NOW}), NOW + 29), Ok(()));
    assert_eq!(at(json!({"exp": NOW}), NOW + 30), Err(JwtError::Expired));
    assert_eq!(at(json!({"exp": NOW - 3600}), NOW), Err(JwtError::Expired));
    assert_eq!(at(json!({"exp": 0}), NOW), Err(JwtError::Expired));
    assert_eq!(at(json!({"exp": u64::MAX}), NOW), Ok(()));
    // exp required unless require_exp is false.
    assert_eq!(at(json!({"exp": null}), NOW), Err(JwtError::MissingExp));
    let mut r = rules();
    r.require_exp = false;
    assert!(verify(&hs(h.clone(), json!({"exp": null})), &r, &keys, NOW).is_ok());
    // nbf: not before nbf - skew.
    assert_eq!(at(json!({"nbf": NOW + 30}), NOW), Ok(()));
    assert_eq!(
        at(json!({"nbf": NOW + 31}), NOW),
        Err(JwtError::NotYetValid)
    );
    assert_eq!(
        at(json!({"nbf": u64::MAX}), NOW),
        Err(JwtError::NotYetValid)
    );
    // iat: at most skew in the future.
    assert_eq!(at(json!({"iat": NOW + 30}), NOW), Ok(()));
    assert_eq!(
        at(json!({"iat": NOW + 31}), NOW),
        Err(JwtError::IssuedInFuture)
    );
    assert_eq!(
        at(json!({"iat": u64::MAX}), NOW),
        Err(JwtError::IssuedInFuture)
    );
}

#[test]
fn cheap_checks_run_before_the_signature() {
    // An expired token with a garbage signature reports expiry: no key work was needed.
    let keys = hs_keys();
    let t = hs(json!({"alg": "HS256"}), json!({"exp": 1}));
    let input = t.rsplit_once('.').unwrap().0;
    assert_eq!(
        check(&format!("{input}.AAAA"), &keys),
        Err(JwtError::Expired)
    );
    let t = hs(json!({"alg": "HS256"}), json!({"iss": "x"}));
    assert_eq!(
        check(&format!("{}.AAAA", t.rsplit_once('.').unwrap().0), &keys),
        Err(JwtError::WrongIssuer)
    );
}

// ---- public vectors ----

#[test]
fn rfc7515_appendix_a_examples() {
    let v = vectors("rfc/rfc7515_rfc7519_jws.json");
    let mut checked = 0;
    for t in v["tests"].as_array().unwrap() {
        let id = t["id"].as_str().unwrap();
        let token = t["jws"].as_str().unwrap();
        let r = Rules {
            issuer: Some("joe".into()),
            audiences: vec![],
            algorithms: all_algs(),
            clock_skew_s: 0,
            require_exp: true,
            max_token_bytes: 8192,
        };
        if t["expected"] == "reject" {
            let keys = hs_keys();
            assert_eq!(
                verify(token, &r, &keys, 1_300_000_000).err(),
                Some(JwtError::Malformed("token has no signature")),
                "{id}"
            );
            continue;
        }
        let keys = keyset(json!({ "keys": [t["jwk"].clone()] }));
        // exp is 1300819380 (2011): valid just before, expired at it.
        let ok = verify(token, &r, &keys, 1_300_819_379).unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(ok.claims["http://example.com/is_root"], true, "{id}");
        assert_eq!(
            verify(token, &r, &keys, 1_300_819_380).err(),
            Some(JwtError::Expired),
            "{id}"
        );
        checked += 1;
    }
    assert_eq!(checked, 3);
}

#[test]
fn wycheproof_jws_subset() {
    let v = vectors("wycheproof/json_web_signature_test.subset.json");
    let (mut valid, mut invalid) = (0, 0);
    for g in v["testGroups"].as_array().unwrap() {
        let jwk = if g["public"].is_object() {
            g["public"].clone()
        } else {
            g["private"].clone()
        };
        let parsed = jwks::parse(
            &json!({ "keys": [jwk] }),
            all_algs(),
            Source::Local(&no_env),
        );
        for t in g["tests"].as_array().unwrap() {
            let id = t["tcId"].as_u64().unwrap();
            // Known upstream labelling issues (see the file's _subset.knownIssues).
            if id == 367 || id == 370 {
                continue;
            }
            let strict_reject = id == 372 || id == 373;
            let jws = t["jws"].as_str().unwrap();
            let result = match &parsed {
                Ok(p) => verify_jws(jws, all_algs(), &p.keys),
                // Keys marked for encryption never load, so their tokens cannot verify.
                Err(_) => Err(JwtError::KeysUnavailable),
            };
            if t["result"] == "valid" && !strict_reject {
                assert_eq!(result, Ok(()), "tcId {id} {}", t["comment"]);
                valid += 1;
            } else {
                assert!(result.is_err(), "tcId {id} {} should fail", t["comment"]);
                invalid += 1;
            }
        }
    }
    assert_eq!((valid, invalid), (18, 300));
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

#[test]
fn wycheproof_ecdsa_p256_sha256_p1363() {
    let v = vectors("wycheproof/ecdsa_secp256r1_sha256_p1363_test.json");
    let mut n = 0;
    for g in v["testGroups"].as_array().unwrap() {
        let point = hex(g["publicKey"]["uncompressed"].as_str().unwrap());
        assert_eq!(point.len(), 65);
        let jwk =
            json!({"kty": "EC", "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..])});
        let keys = keyset(json!({ "keys": [jwk] }));
        let key = &keys.keys()[0];
        for t in g["tests"].as_array().unwrap() {
            let ok = key.verify(
                Alg::ES256,
                &hex(t["msg"].as_str().unwrap()),
                &hex(t["sig"].as_str().unwrap()),
            );
            match t["result"].as_str().unwrap() {
                "valid" => assert!(ok, "tcId {}", t["tcId"]),
                "invalid" => assert!(!ok, "tcId {}", t["tcId"]),
                _ => {}
            }
            n += 1;
        }
    }
    assert!(n >= 250, "{n}");
}

#[test]
fn wycheproof_rsa_pkcs1_2048_sha256() {
    let v = vectors("wycheproof/rsa_signature_2048_sha256_test.json");
    let mut n = 0;
    for g in v["testGroups"].as_array().unwrap() {
        let keys = keyset(json!({ "keys": [g["keyJwk"].clone()] }));
        let key = &keys.keys()[0];
        for t in g["tests"].as_array().unwrap() {
            let ok = key.verify(
                Alg::RS256,
                &hex(t["msg"].as_str().unwrap()),
                &hex(t["sig"].as_str().unwrap()),
            );
            match t["result"].as_str().unwrap() {
                "valid" => assert!(ok, "tcId {}", t["tcId"]),
                "invalid" => assert!(!ok, "tcId {}", t["tcId"]),
                _ => {}
            }
            n += 1;
        }
    }
    assert!(n >= 250, "{n}");
}

fn jvl_rules() -> Rules {
    Rules {
        issuer: None,
        audiences: vec![],
        algorithms: all_algs(),
        clock_skew_s: 60,
        require_exp: false,
        max_token_bytes: 16384,
    }
}

#[test]
fn jwt_verify_lib_parse_cases() {
    let v = vectors("jwt_verify_lib_cases.json");
    let mut n = 0;
    for c in v["parse_cases"].as_array().unwrap() {
        let name = c["test"].as_str().unwrap();
        let token = match &c["jwt"] {
            Value::String(s) => s.clone(),
            Value::Object(o) if o.contains_key("generate") => "c".repeat(10240),
            _ => continue, // long tokens the extract omits
        };
        let got = decode(&token, &jvl_rules()).map(|_| ());
        let want = c["expected_status"].as_str().unwrap_or("");
        let ok = match want {
            "Ok" => got.is_ok(),
            "JwtBadFormat" => matches!(got, Err(JwtError::Malformed(_) | JwtError::TooLarge)),
            "JwtHeaderParseErrorBadBase64"
            | "JwtHeaderParseErrorBadJson"
            | "JwtPayloadParseErrorBadBase64"
            | "JwtPayloadParseErrorBadJson" => {
                matches!(got, Err(JwtError::Malformed(_)))
            }
            "JwtHeaderBadAlg" | "JwtHeaderNotImplementedAlg" => got == Err(JwtError::BadAlg),
            w if w.contains("NotString")
                || w.contains("NotInteger")
                || w.contains("OutOfRange")
                || w == "JwtHeaderBadKid" =>
            {
                matches!(got, Err(JwtError::BadMember(_)))
            }
            // Signature problems are found later, by verify_signature.
            "JwtSignatureParseErrorBadBase64" | "JwtVerificationFail" => true,
            other => panic!("{name}: unmapped status {other}"),
        };
        assert!(ok, "{name}: expected {want}, got {got:?}");
        n += 1;
    }
    assert!(n >= 28, "{n}");
}

#[test]
fn jwt_verify_lib_verify_cases() {
    let v = vectors("jwt_verify_lib_cases.json");
    let mut n = 0;
    for file in v["verify_cases"].as_array().unwrap() {
        // Remote mode: the EC set holds a P-521 key this verifier does not implement.
        let keys = jwks::parse(&file["jwks"], all_algs(), Source::Remote)
            .unwrap()
            .keys;
        for c in file["cases"].as_array().unwrap() {
            let token = c["jwt"].as_str().unwrap();
            let now = c["now_unix"].as_u64().unwrap_or(NOW);
            let got = verify(token, &jvl_rules(), &keys, now).map(|_| ());
            let want = c["expected_status"]
                .as_str()
                .or(c["local_crosscheck"].as_str())
                .unwrap();
            let name = c["test"].as_str().unwrap();
            if token.starts_with("eyJhbGciOiJFUzUxMiI") {
                // ES512 is not implemented: refused at the header.
                assert_eq!(got, Err(JwtError::BadAlg), "{name}");
                continue;
            }
            match want {
                "Ok" => assert_eq!(got, Ok(()), "{name}"),
                "JwksKidAlgMismatch" => assert_eq!(got, Err(JwtError::UnknownKid), "{name}"),
                "JwtVerificationFail" => assert_eq!(got, Err(JwtError::BadSignature), "{name}"),
                other => panic!("{name}: unmapped {other}"),
            }
            n += 1;
        }
    }
    assert!(n >= 14, "{n}");
}

#[test]
fn jwt_verify_lib_time_cases() {
    let v = vectors("jwt_verify_lib_cases.json");
    for c in v["time_cases"].as_array().unwrap() {
        let mut r = jvl_rules();
        r.clock_skew_s = c["clock_skew_s"].as_u64().unwrap();
        let t = decode(c["jwt"].as_str().unwrap(), &r).unwrap();
        let got = check_claims(&t, &r, c["now_unix"].as_u64().unwrap());
        let want = match c["expected_status"].as_str().unwrap() {
            "Ok" => Ok(()),
            "JwtExpired" => Err(JwtError::Expired),
            "JwtNotYetValid" => Err(JwtError::NotYetValid),
            o => panic!("{o}"),
        };
        assert_eq!(got, want, "{c}");
    }
}

#[test]
fn jwt_verify_lib_audience_cases_with_exact_matching() {
    // Envoy folds `http(s)://` and one trailing `/`; this verifier compares exactly (RFC 7519),
    // so those cases are refused here. Every other case agrees.
    let v = vectors("jwt_verify_lib_cases.json");
    let norm = |s: &str| {
        let s = s
            .strip_prefix("https://")
            .or_else(|| s.strip_prefix("http://"))
            .unwrap_or(s);
        s.strip_suffix('/').unwrap_or(s).to_string()
    };
    let (mut same, mut folded) = (0, 0);
    for c in v["audience_cases"].as_array().unwrap() {
        let configured: Vec<String> = serde_json::from_value(c["configured"].clone()).unwrap();
        let aud = c["jwt_aud"].clone();
        let ours = configured.is_empty() || audience_allowed(Some(&aud), &configured);
        let exact = aud
            .as_array()
            .unwrap()
            .iter()
            .any(|a| configured.iter().any(|w| Some(w.as_str()) == a.as_str()));
        if c["allowed"] == true && !exact && !configured.is_empty() {
            // Only normalisation explains Envoy's yes.
            assert!(aud.as_array().unwrap().iter().any(|a| configured
                .iter()
                .any(|w| norm(w) == norm(a.as_str().unwrap()))));
            assert!(!ours, "{c}");
            folded += 1;
        } else {
            assert_eq!(ours, c["allowed"] == true, "{c}");
            same += 1;
        }
    }
    assert!(same >= 4 && folded >= 10, "{same} {folded}");
}
