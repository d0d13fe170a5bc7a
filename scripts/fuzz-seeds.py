#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (fuzz/corpus/<target>/) from the project's test
vectors (tests/vectors), the config reference's examples (docs/CONFIG.md) and the example
configs. Idempotent: file names are content hashes. Run it after adding vectors, then commit
fuzz/corpus/. Input formats are documented on each target in src/fuzzing.rs and
quota/src/fuzzing.rs."""
import base64
import glob
import hashlib
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = os.path.join(ROOT, "tests", "vectors")
OUT = os.path.join(ROOT, "fuzz", "corpus")
MAX_SEEDS = 40
MAX_BYTES = 4096


def load(p):
    with open(os.path.join(V, p)) as f:
        return json.load(f)


seeds = {}


def add(target, data):
    if isinstance(data, str):
        data = data.encode()
    if len(data) > MAX_BYTES:
        return
    s = seeds.setdefault(target, [])
    if data not in s and len(s) < MAX_SEEDS:
        s.append(data)


# config: the JSON examples of docs/CONFIG.md and the demo config.
for md in [os.path.join(ROOT, "docs", "CONFIG.md"), os.path.join(ROOT, "docs", "WEBHOOKS.md")]:
    text = open(md).read()
    for block in re.findall(r"```json\n(.*?)```", text, re.S):
        try:
            if isinstance(json.loads(block), dict):
                add("config", block)
        except ValueError:
            pass
add("config", open(os.path.join(ROOT, "envoy", "demo-filter.json")).read())
# ... and whole configs the tests use (raw strings that are JSON objects with routes or
# limits), which cover abuse, exempt, windows, hygiene, webhooks and CORS.
for rs in sorted(glob.glob(os.path.join(ROOT, "tests", "*.rs")) + glob.glob(os.path.join(ROOT, "src", "**", "*.rs"), recursive=True)):
    for block in re.findall(r'r#"(\{.*?\})"#', open(rs).read(), re.S):
        try:
            doc = json.loads(block)
        except ValueError:
            continue
        if isinstance(doc, dict) and set(doc) & {"routes", "rate_limits", "abuse", "default_route"}:
            add("config", block)

# jwt: raw tokens (mode byte 0) from every vector file; signed-mode claims (mode byte 1).
jvl = load("jwt_verify_lib_cases.json")
for c in jvl["parse_cases"]:
    if isinstance(c["jwt"], str):
        add("jwt", b"\x00" + c["jwt"].encode())
for t in load("rfc/rfc7515_rfc7519_jws.json")["tests"]:
    if "jws" in t:
        add("jwt", b"\x00" + t["jws"].encode())
for g in load("wycheproof/json_web_signature_test.subset.json")["testGroups"]:
    for t in g["tests"][:4]:
        if isinstance(t.get("jws"), str):
            add("jwt", b"\x00" + t["jws"].encode())
claims = [
    {"iss": "https://issuer.fuzz", "aud": "api", "sub": "u1", "exp": 1700000100},
    {"iss": "https://issuer.fuzz", "aud": ["x", "api"], "sub": "u1", "exp": 1700000100.5,
     "nbf": 1699999999, "iat": 1699999990},
    {"iss": "https://issuer.fuzz", "aud": "api", "exp": 1699999000},
    {"iss": "other", "aud": "api", "exp": 1700000100},
]
for i, c in enumerate(claims):
    add("jwt", bytes([1, i % 6, 37]) + json.dumps(c).encode())

# jwks: every JWKS document in the vectors, with all algorithms allowed (mask 0xff).
for c in jvl["verify_cases"]:
    if isinstance(c.get("jwks"), dict):
        add("jwks", b"\xff" + json.dumps(c["jwks"]).encode())
for t in load("rfc/rfc7515_rfc7519_jws.json")["tests"]:
    if "jwk" in t:
        add("jwks", b"\xff" + json.dumps({"keys": [t["jwk"]]}).encode())
for g in load("wycheproof/json_web_signature_test.subset.json")["testGroups"]:
    for k in ("public", "private"):
        if isinstance(g.get(k), dict):
            add("jwks", b"\xff" + json.dumps({"keys": [g[k]]}).encode())

# routes: paths and the rules they are matched against.
for p in ["/api/orders\n/api/orders/{id}", "/api/./orders//1/\n/api", "/api/%6Frders/7\n/api/orders/{id}",
          "/a/b/../c?x=1#f\n/a/c", "/%2e%2e/x", "/public/..;/api", "/a%2Fb", "/x/%C3%A9t%C3%A9\n/x",
          "/\n/", "/a/b/c/\n/a/b", "/%c0%ae%c0%ae/etc", "/\uff0e\uff0e/x", "/a%25b", "/a\\b"]:
    add("routes", p)

# cors: origin, method, requested headers, config lines.
for s in ["https://app.example.com\nGET\ncontent-type\nhttps://app.example.com",
          "https://a.example.com:8443\nPUT\n\nhttps://*.example.com:8443\ncredentials",
          "http://[::1]:8080\nPOST\nx-api-key, content-type\nhttp://[0:0::1]:8080",
          "HTTPS://APP.EXAMPLE.COM:443\nGET\n\nhttps://app.example.com", "null\nGET\n\n*",
          "https://evil.com.example.org\nGET\n\nhttps://*.example.com",
          "https://x.y.example.com\nGET\n\nhttps://*.example.com", "https://app.example.com/\nGET\n\n*"]:
    add("cors", s)

# client_ip: flags byte (hops | appended << 3 | valid peer << 4), peer, x-forwarded-for.
for b, s in [(0x19, "p\n6.6.6.6, 1.1.1.1, 10.0.0.1"), (0x1a, "p\n6.6.6.6,1.1.1.1,192.0.2.2"),
             (0x01, "10.0.0.1:5555\n1.1.1.1"), (0x1f, "p\n1.1.1.1, 2.2.2.2"),
             (0x12, "p\nnot-an-ip, ::1, 10.0.0.1"), (0x03, "[::1]:80\n , ,2001:db8::1")]:
    add("client_ip", bytes([b]) + s.encode())

# webhook: scheme byte (0 github, 1 stripe, 2 standard, 3 slack; +4 Ed25519 for standard),
# key length, key, header values and body, one per line.
for c in load("webhooks/github_x_hub_signature_256.json")["cases"]:
    key = c["secret"].encode()[:47]
    add("webhook", bytes([0, len(key)]) + key + (c["x_hub_signature_256"] + "\nid-1\n" + c["payload"]).encode())
for c in load("webhooks/standard_webhooks.json")["cases"]:
    h = c.get("headers") or {}
    key = c["secret"].encode()[:47]
    vals = [h.get("webhook-id", ""), h.get("webhook-timestamp", ""), h.get("webhook-signature", "")]
    add("webhook", bytes([2, len(key)]) + key + ("\n".join(vals) + "\n" + c["payload"]).encode())
add("webhook", bytes([1, 8]) + b"whsec_ab" + b"t=1700000000,v1=" + b"0" * 64 + b"\n{\"id\":\"evt\"}")
add("webhook", bytes([3, 8]) + b"slacksec" + b"1700000000\nv0=" + b"a" * 64 + b"\ntoken=x&team_id=T1")
add("webhook", bytes([6, 32]) + bytes(range(32)) + b"msg_1\n1700000000\nv1a," + b"A" * 86 + b"==\nbody")

# quota_answer: status byte (< 240 means HTTP 200), then the answer body.
for a in [{"allowed": True, "remaining": 4, "headers": {"x-quota-remaining": "4", "ratelimit": "\"q\";r=4;t=60"}},
          {"allowed": False, "status": 429, "error": "rate_limit_exceeded", "retry_after_s": 0},
          {"allowed": False, "status": 402, "error": "quota_exceeded", "reset_at": "2026-12-03T00:00:00Z",
           "message": "daily quota used"},
          {"allowed": True, "headers": {"strict-transport-security": "max-age=0", "set-cookie": "a=b"}},
          {"allowed": False, "status": 403}]:
    add("quota_answer", b"\x00" + json.dumps(a).encode())
add("quota_answer", b"\xf0{}")

# quota_api: endpoint byte (0 check, 1 PUT client, 2 GET, 3 DELETE, 4 usage), auth byte
# (0 admin token, 1 wrong, 2 none), then `id\nbody`.
for ep, auth, s in [(0, 2, '\n{"client":"c1","tier":"free","route":"r","cost":1}'),
                    (0, 2, '\n{"client":"c1","tier":"pro","cost":2000000}'), (0, 2, '\n{"client":""}'),
                    (0, 2, '\nnot json'), (1, 0, 'c1\n{"tier":"free","daily":{"limit":3,"policy":"hard_stop"}}'),
                    (1, 0, 'c1\n{"alert_webhook":{"url":"https://h.example/a","secret":"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}}'),
                    (1, 1, 'c1\n{}'), (2, 0, 'c1\n'), (3, 0, 'c1\n'), (4, 0, 'c1\nfree'), (4, 2, 'c/1\n')]:
    add("quota_api", bytes([ep, auth]) + s.encode())

# quota_config: the example config and variations.
add("quota_config", open(os.path.join(ROOT, "quota", "quota.example.toml")).read())
add("quota_config", 'admin_token = { env = "FUZZ_TOKEN" }\n[alerts]\nthresholds = [100, 80, 80]\n'
    '[tiers.free]\nlimit = { capacity = 1, refill_tokens = 1, refill_period_s = 1 }\n')
add("quota_config", '[tiers.x]\nlimit = "unlimited"\nmonthly = { limit = 1, policy = "overage" }\n')

# rls_config: the example rate limit service configs, with descriptors to look up.
for p in sorted(glob.glob(os.path.join(ROOT, "envoy", "ratelimit", "*.yaml"))):
    y = open(p).read()
    add("rls_config", y)
    for d in ["generic_key=api", "remote_address=1.2.3.4", "header_match=x\npath=/a"]:
        add("rls_config", y + "\n#descriptor\n" + d)
add("rls_config", "domain: d\ndescriptors:\n  - key: a\n    value: x\n    rate_limit: {unit: minute, requests_per_unit: 5}\n"
    "  - key: a\n    descriptors:\n      - key: b\n        rate_limit: {unit: day, requests_per_unit: 7, name: daily}\n"
    "\n#descriptor\na=y\nb=z")
add("rls_config", "domain: d\ndescriptors:\n  - key: k\n    value: pre*\n    share_threshold: true\n"
    "    rate_limit: {unit: second, requests_per_unit: 1}\n\n#descriptor\nk=prefix")

# lease_answer: cost byte (1 + b % 4), step byte (ms between requests / 50), then the
# `/v1/lease` answer body.
for cost, step, a in [(0, 4, {"allowed": True, "remaining": 90, "granted": 10, "lease_id": "l-1",
                               "expires_at_ms": 1700000005000, "headers": {"x-quota-remaining": "90"}}),
                      (3, 40, {"allowed": True, "granted": 7, "lease_id": "l-2", "expires_at_ms": 1700000001000}),
                      (1, 255, {"allowed": True, "granted": 1, "lease_id": "l-3", "expires_at_ms": 1699999999000}),
                      (0, 1, {"allowed": True, "granted": 18446744073709551615, "lease_id": "l-4",
                              "expires_at_ms": 18446744073709551615}),
                      (2, 10, {"allowed": True, "granted": 100, "lease_id": "x", "expires_at_ms": 0}),
                      (0, 0, {"allowed": False, "status": 429, "error": "rate_limit_exceeded", "retry_after_s": 3})]:
    add("lease_answer", bytes([cost, step]) + json.dumps(a).encode())


# rls_request: a ShouldRateLimit request in protobuf bytes, as Envoy sends it
# (envoy.service.ratelimit.v3.RateLimitRequest), against the configs in quota/tests/rls_configs.
def varint(n):
    out = b""
    while True:
        b = n & 0x7f
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(num, payload):
    if isinstance(payload, int):
        return varint(num << 3) + varint(payload)
    if isinstance(payload, str):
        payload = payload.encode()
    return varint(num << 3 | 2) + varint(len(payload)) + payload


def rls(domain, descriptors, hits=None):
    out = field(1, domain)
    for d in descriptors:
        entries, over, dh = (d + (None, None))[:3] if isinstance(d, tuple) else (d, None, None)
        body = b"".join(field(1, field(1, k) + field(2, v)) for k, v in entries)
        if over:
            body += field(2, field(1, over[0]) + field(2, over[1]))
        if dh is not None:
            body += field(3, field(1, dh))
        out += field(2, body)
    if hits is not None:
        out += field(3, hits)
    return out


for req in [rls("mongo_cps", [[("database", "users")]]),
            rls("messaging", [[("message_type", "marketing"), ("to_number", "2061234567")]], 3),
            rls("edge_proxy_per_ip", [[("remote_address", "50.0.0.5")], [("remote_address", "1.2.3.4")]]),
            rls("example4", [[("key", "value"), ("subkey", "subvalue")]]),
            rls("example5", [[("key1", "value1")], [("key2", "value2")]], 1000),
            rls("internal", [[("ldap", "x")], [("azure", "y")]]),
            rls("example7", [[("key1", "value1"), ("user", "alice")], [("user", "admin")]]),
            rls("example8", [[("path", "/foo/baz")], [("path", "/foo/bar")]]),
            rls("example9", [[("files", "/files/a")], [("files", "/docs/b")]]),
            rls("mongo_cps", [([("database", "users")], (3, 1), 0)]),
            rls("nowhere", [([("k", "v")], (1, 2))]),
            rls("mongo_cps", []),
            rls("", [[("database", "users")]])]:
    add("rls_request", req)

for target, items in seeds.items():
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    for data in items:
        with open(os.path.join(d, "seed-" + hashlib.sha1(data).hexdigest()[:16]), "wb") as f:
            f.write(data)
    print(f"{target}: {len(items)} seeds")
