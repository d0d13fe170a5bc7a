#!/usr/bin/env python3
"""Hot-path micro-benchmark for api-guard (a developer tool, not `make bench`).

Runs Envoy (`--concurrency 1`, a `direct_response` route, loopback only) under
`wrk -t1 -c16 -dNs` for a few configurations, interleaved A B C A B C so machine drift hits
all of them, and prints req/s per case and round plus the per-request cost over plain Envoy.

    python3 examples/hotpath_bench.py [--rounds 3] [--duration 5] [--cases plain,empty,full]
        [--wasm target/wasm32-wasip1/release/api_guard.wasm] [--label NAME]

Cases: plain (router only), noop (a wasm filter reading one header, --noop-wasm), empty (api-guard with `{}`), full (api-guard: RS256 JWT with the
same token every request, one per-client rate limit, the default security headers),
cold (as full, a distinct valid token per request: every request verifies a signature),
coldhs (the same with HS256 tokens: cheap signatures, so the caches' own costs show),
native (cors + jwt_authn RS256 with jwt_cache_config + local_ratelimit + header_mutation),
native-nocache (the same without jwt_cache_config), jwt (full without the limit), rl (full
without the JWT, the limit keyed by IP). A case suffixed '@b' runs the --wasm-b build.
Needs: Envoy in .tools (scripts/tools.sh envoy), wrk, python3 `cryptography`.
"""
import argparse
import base64
import hashlib
import hmac
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENVOY = os.environ.get("ENVOY_BIN", os.path.join(ROOT, ".tools/envoy/envoy/_bin/envoy"))
ISS = "https://auth.example.com"
AUD = "https://api.example.com"
ORIGIN = "https://app.example.com"
SECURITY_HEADERS = [
    ("strict-transport-security", "max-age=31536000; includeSubDomains"),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "strict-origin-when-cross-origin"),
    ("permissions-policy", "geolocation=(), camera=(), microphone=(), payment=()"),
]


def b64u(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


class Keys:
    def __init__(self):
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        n = self.key.public_key().public_numbers()
        self.jwk = {"kty": "RSA", "kid": "bench", "alg": "RS256", "use": "sig",
                    "n": b64u(n.n.to_bytes(256, "big")), "e": b64u(n.e.to_bytes(3, "big"))}
        self.secret = os.urandom(32)
        self.hs_jwk = {"kty": "oct", "kid": "bench", "alg": "HS256", "k": b64u(self.secret)}

    def mint(self, i, alg="RS256"):
        now = int(time.time())
        header = b64u(json.dumps({"alg": alg, "typ": "JWT", "kid": "bench"}).encode())
        payload = b64u(json.dumps({"iss": ISS, "aud": AUD, "sub": f"user-{i}", "iat": now,
                                   "exp": now + 7200, "scope": "read:orders write:orders",
                                   "jti": f"j{i}"}).encode())
        si = f"{header}.{payload}".encode()
        if alg == "HS256":
            sig = hmac.new(self.secret, si, hashlib.sha256).digest()
        else:
            sig = self.key.sign(si, padding.PKCS1v15(), hashes.SHA256())
        return f"{header}.{payload}.{b64u(sig)}"


def wasm_filter(wasm, cfg):
    return {"name": "envoy.filters.http.wasm", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "config": {"name": "api_guard", "root_id": "api_guard",
                   "allow_on_headers_stop_iteration": True,
                   "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                     "value": json.dumps(cfg)},
                   "vm_config": {"vm_id": "api_guard", "runtime": "envoy.wasm.runtime.v8",
                                 "code": {"local": {"filename": wasm}}}}}}


def ag_full(keys, alg="RS256"):
    return {
        "jwt_providers": {"main": {"issuer": ISS, "audiences": [AUD], "algorithms": [alg],
                                   "local_jwks": {"keys": [keys.hs_jwk if alg == "HS256"
                                                           else keys.jwk]}}},
        "rate_limits": {"per-client": {"key": ["client"], "capacity": 1000000000,
                                       "refill_tokens": 1000000000, "refill_period_s": 1}},
        "default_route": {"auth": {"mode": "required", "methods": ["jwt:main"]},
                          "rate_limits": ["per-client"]},
    }


def native_chain(keys, cache):
    provider = {"issuer": ISS, "audiences": [AUD],
                "local_jwks": {"inline_string": json.dumps({"keys": [keys.jwk]})},
                "claim_to_headers": [{"header_name": "x-auth-subject", "claim_name": "sub"}]}
    if cache:
        provider["jwt_cache_config"] = {"jwt_cache_size": 1000}
    always = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}
    return [
        {"name": "envoy.filters.http.cors", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}},
        {"name": "envoy.filters.http.jwt_authn", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"main": provider},
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "main"}}]}},
        {"name": "envoy.filters.http.local_ratelimit", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": "rl",
            "token_bucket": {"max_tokens": 1000000000, "tokens_per_fill": 1000000000,
                             "fill_interval": "1s"},
            "filter_enabled": dict(always, runtime_key="rl_enabled"),
            "filter_enforced": dict(always, runtime_key="rl_enforced"),
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03"}},
        {"name": "envoy.filters.http.header_mutation", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"response_mutations": [
                {"append": {"header": {"key": k, "value": v}, "append_action": "ADD_IF_ABSENT"}}
                for k, v in SECURITY_HEADERS]}}},
    ]


CORS_POLICY = {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
    "allow_origin_string_match": [{"exact": ORIGIN}],
    "allow_methods": "GET, POST", "allow_headers": "authorization, content-type",
    "max_age": "86400", "allow_credentials": True,
}


def bootstrap(filters, vhost_extra=None):
    vhost = {"name": "all", "domains": ["*"], "routes": [{
        "name": "bench", "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}]}
    vhost.update(vhost_extra or {})
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": [{
            "name": "bench",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "bench", "use_remote_address": True,
                    "route_config": {"name": "local", "virtual_hosts": [vhost]},
                    "http_filters": filters + [{"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                }}]}]}]},
    }


class Envoy:
    def __init__(self, cfg, work):
        self.dir = tempfile.mkdtemp(dir=work)
        path = os.path.join(self.dir, "envoy.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        self.admin_file = os.path.join(self.dir, "admin.txt")
        self.log = open(os.path.join(self.dir, "envoy.log"), "w")
        self.proc = subprocess.Popen(
            [ENVOY, "-c", path, "--concurrency", "1", "--disable-hot-restart",
             "--admin-address-path", self.admin_file, "-l", "warning"],
            stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)
        self.port = self._wait()

    def _get(self, port, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, r.read()

    def _wait(self):
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.flush()
                raise RuntimeError("envoy exited:\n" + open(self.log.name).read()[-3000:])
            try:
                admin = int(open(self.admin_file).read().strip().rsplit(":", 1)[1])
                st, _ = self._get(admin, "/ready")
                if st == 200:
                    _, body = self._get(admin, "/listeners?format=json")
                    ls = json.loads(body)["listener_statuses"]
                    return ls[0]["local_address"]["socket_address"]["port_value"]
            except Exception:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("envoy not ready in 60 s")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def probe(port, headers):
    """One request with curl semantics via the socket: status and response headers."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/orders", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers)


def wrk(port, duration, headers, script=None, script_args=()):
    args = ["wrk", "-t1", "-c16", f"-d{duration}s", "--latency", "--timeout", "5s"]
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    if script:
        args += ["-s", script]
    args.append(f"http://127.0.0.1:{port}/api/orders")
    if script_args:
        args += ["--", *script_args]
    out = subprocess.run(args, capture_output=True, text=True, timeout=duration + 30).stdout
    rps = next(float(l.split()[1]) for l in out.splitlines() if l.startswith("Requests/sec"))
    total = next(int(l.split()[0]) for l in out.splitlines() if " requests in " in l)
    non2xx = [l for l in out.splitlines() if "Non-2xx" in l]
    lat = {l.split()[0]: l.split()[1] for l in out.splitlines()
           if l.strip().startswith(("50%", "99%"))}
    return rps, lat, non2xx, total


def cpu_s(pid):
    """User + system CPU seconds of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--cases", default="plain,empty,full")
    ap.add_argument("--wasm", default=os.path.join(ROOT, "target/wasm32-wasip1/release/api_guard.wasm"))
    ap.add_argument("--wasm-b", help="a second .wasm to compare: cases suffixed '@b' use it")
    ap.add_argument("--noop-wasm", help="a no-op proxy-wasm filter for the 'noop' case")
    ap.add_argument("--cold-tokens", type=int, default=16000)
    args = ap.parse_args()
    for tool in ("wrk", ENVOY):
        if not shutil.which(tool) and not os.path.exists(tool):
            sys.exit(f"missing {tool}")
    work = tempfile.mkdtemp(prefix="ag-hotpath-")
    keys = Keys()
    token = keys.mint(0)
    auth = {"authorization": f"Bearer {token}", "origin": ORIGIN}
    cases = args.cases.split(",")
    scripts = {}

    def pool(alg):
        """A wrk script sending a distinct valid token of `alg` per request."""
        if alg in scripts:
            return scripts[alg]
        t0 = time.time()
        # HMAC tokens verify ~50x faster, so a run needs many more of them.
        n = args.cold_tokens * (5 if alg == "HS256" else 1)
        toks = [keys.mint(i + 1, alg) for i in range(n)]
        tf = os.path.join(work, f"tokens-{alg}.txt")
        with open(tf, "w") as f:
            f.write("\n".join(toks) + "\n")
        script = os.path.join(work, f"rotate-{alg}.lua")
        with open(script, "w") as f:
            f.write(f"""
local toks = {{}}
for line in io.lines("{tf}") do toks[#toks + 1] = line end
local i = 0
init = function(args)
  -- Where in the pool to start: the warm-up run uses the pool's tail, the measured run its
  -- head, so no measured request carries a token the warm-up already had verified.
  i = tonumber(args[1]) or 0
end
request = function()
  i = i + 1
  if i > #toks then i = 1 end
  return wrk.format("GET", "/api/orders", {{["authorization"] = "Bearer " .. toks[i], ["origin"] = "{ORIGIN}"}})
end
""")
        print(f"minted {len(toks)} {alg} tokens in {time.time() - t0:.1f}s", file=sys.stderr)
        scripts[alg] = (script, n)
        return scripts[alg]

    def script_of(case):
        name = case.partition("@")[0]
        return {"cold": lambda: pool("RS256"), "coldhs": lambda: pool("HS256")}.get(
            name, lambda: (None, 0))()

    def config(case):
        name, _, variant = case.partition("@")
        wasm = args.wasm_b if variant == "b" else args.wasm
        if name == "plain":
            return bootstrap([])
        if name == "noop":
            # A wasm filter that reads one header and continues: the floor for any wasm filter.
            if not args.noop_wasm:
                raise SystemExit("the noop case needs --noop-wasm")
            return bootstrap([wasm_filter(args.noop_wasm, {})])
        if name.startswith("calib="):
            # The calibration filter (not shipped): the host calls named after '=' per request.
            return bootstrap([wasm_filter(args.noop_wasm, name[6:].replace("+", ","))])
        if name == "empty":
            return bootstrap([wasm_filter(wasm, {})])
        if name in ("full", "cold"):
            return bootstrap([wasm_filter(wasm, ag_full(keys))])
        if name == "coldhs":
            return bootstrap([wasm_filter(wasm, ag_full(keys, "HS256"))])
        if name == "jwt":
            cfg = ag_full(keys)
            del cfg["rate_limits"], cfg["default_route"]["rate_limits"]
            return bootstrap([wasm_filter(wasm, cfg)])
        if name == "rl":
            cfg = ag_full(keys)
            del cfg["jwt_providers"], cfg["default_route"]["auth"]
            cfg["rate_limits"]["per-client"]["key"] = ["ip"]
            return bootstrap([wasm_filter(wasm, cfg)])
        if name == "native":
            return bootstrap(native_chain(keys, True), {"typed_per_filter_config": {"envoy.filters.http.cors": CORS_POLICY}})
        if name == "native-nocache":
            return bootstrap(native_chain(keys, False), {"typed_per_filter_config": {"envoy.filters.http.cors": CORS_POLICY}})
        raise SystemExit(f"unknown case {case}")

    results = {c: [] for c in cases}
    cpu = {c: [] for c in cases}
    try:
        for rnd in range(args.rounds):
            for case in cases:
                env = Envoy(config(case), work)
                try:
                    st, hdrs = probe(env.port, {"authorization": "Bearer " + keys.mint(0, "HS256"),
                                                "origin": ORIGIN} if case.startswith("coldhs") else auth)
                    if st != 200:
                        raise RuntimeError(f"{case}: probe got {st} {hdrs}")
                    # A short warm-up so V8 has compiled the hot functions.
                    script, n = script_of(case)
                    cold = script is not None
                    # Cold runs: the warm-up takes the pool's last quarter, the measured run
                    # starts at its head; both must stay inside their part.
                    fresh = n - n // 4
                    warm = wrk(env.port, 1, auth, script, [str(fresh)] if cold else ())
                    c0 = cpu_s(env.proc.pid)
                    rps, lat, non2xx, total = wrk(env.port, args.duration, auth, script,
                                                  ["0"] if cold else ())
                    if cold and (total > fresh or warm[3] > n // 4):
                        print(f"  WARNING {case}: {warm[3]} + {total} requests for a pool of {n} "
                              f"tokens: some were seen before; raise --cold-tokens", file=sys.stderr)
                    cpu_us = (cpu_s(env.proc.pid) - c0) * 1e6 / max(total, 1)
                    if non2xx:
                        print(f"  WARNING {case}: {non2xx}", file=sys.stderr)
                finally:
                    env.stop()
                results[case].append(rps)
                cpu[case].append(cpu_us)
                print(f"round {rnd + 1} {case:16s} {rps:9.0f} req/s  Envoy CPU {cpu_us:6.1f} us/req  p50 {lat.get('50%')} p99 {lat.get('99%')}",
                      file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    base = results.get("plain")
    print(f"{'case':16s} {'req/s min-max':>20s} {'median':>7s} {'CPU us/req min-max':>20s} {'median':>7s}  CPU us over plain, per round")
    cbase = cpu.get("plain")
    for c, v in results.items():
        med = sorted(v)[len(v) // 2]
        cv = cpu[c]
        cmed = sorted(cv)[len(cv) // 2]
        extra = ""
        if cbase and c != "plain":
            extra = " ".join(f"{x - b:+.1f}" for x, b in zip(cv, cbase))
        print(f"{c:16s} {min(v):9.0f}-{max(v):<10.0f} {med:7.0f} {min(cv):9.1f}-{max(cv):<10.1f} {cmed:7.1f}  {extra}")
    # Paired: each '@b' case against its base case run next to it in the same round.
    for c in cpu:
        base_case = c.partition("@")[0]
        if c.endswith("@b") and base_case in cpu:
            d = sorted(b - a for a, b in zip(cpu[base_case], cpu[c]))
            print(f"{c} - {base_case}: CPU us/req per round {' '.join(f'{x:+.1f}' for x in d)}"
                  f"  median {d[len(d) // 2]:+.1f}")


if __name__ == "__main__":
    main()
