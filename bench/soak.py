#!/usr/bin/env python3
"""Soak: api-guard under mixed traffic and faults for a bounded time (`make soak`, issue 16).

One run per delivery (the .wasm, then the dynamic module .so), each for half of
--seconds (SOAK_SECONDS, default 600): Envoy with 2 workers, hot restart enabled, in front of
a counting upstream (this file, --serve-upstream) and the quota service (api-guard-quota, on
Redis). wrk instances with Lua scripts send, at the same time:

* api:     valid JWTs (HS256, a `tier` claim) of clients that change every few seconds, forged
           JWTs, valid and unknown API keys, on a route with `quota: true` (leases,
           failure_mode deny): clients run into their global limits all the time;
* webhook: GitHub-signed deliveries, each with a unique delivery id, and forged ones;
* public:  one new client IP per request (trusted x-forwarded-for; 1M over the default run)
           through per-IP limits, and CORS preflights (allowed and refused).

Faults, each once per delivery: the quota service killed (-9) and started again, Redis
stopped and started (AOF on, so its counts survive), and an Envoy hot restart (a second
process, --restart-epoch N+1, takes over the listener).

Checks (exit 1 if one fails, naming it):
1. limits: no client admitted over its limit, counted at the upstream (per client: the
   `capped` tier's bucket over the run, the `daily` tier's hard-stop quota per UTC day);
   forged credentials and client-set identity headers never reach the upstream.
2. logs: no panic, VM failure or crash in any Envoy log, no wasm VM reload or 500
   internal_error in Envoy's counters; no Envoy exited unexpectedly.
3. memory: every Envoy's VmRSS below --rss-bound-mib.
4. webhooks: every delivery answered 2xx reached the upstream exactly once, none answered
   otherwise reached it (connection resets leave the outcome unknown: counted, excluded).
5. traffic: every kind was admitted (a soak where nothing passes proves nothing), every
   fault happened, no answer was a 500 or a 503 other than the filter's quota_unavailable.

Writes target/soak/soak.json, docs/soak.md and docs/soak.png (--out). Always stops what it
started, also on Ctrl-C or failure.

  python3 bench/soak.py [--seconds 600] [--delivery wasm|native|both] [--out docs]
"""

import argparse
import asyncio
import base64
import hashlib
import hmac
import http.client
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (paths, Envoy filter config builders, HTTP helpers)

REPO = bench.REPO
JWT_SECRET = b"soak-hs256-secret-0123456789abcdef0123"
FORGED_SECRET = b"not-the-soak-secret-0123456789abcdef0"
WEBHOOK_SECRET = "soak-webhook-secret"
ORIGIN = bench.ORIGIN

# Global limits served by the quota service. `capped`: a bucket that refills one unit per
# hour, so over a run of T seconds a client gets at most CAPPED_CAP + floor(T / 3600).
# `daily`: a hard-stop quota of DAILY_LIMIT per UTC day (its bucket never binds).
CAPPED_CAP = 50
DAILY_LIMIT = 30
QUOTA_TOML = f"""
[tiers.capped]
limit = {{ capacity = {CAPPED_CAP}, refill_tokens = 1, refill_period_s = 3600 }}

[tiers.daily]
limit = {{ capacity = 1000000, refill_tokens = 1000000, refill_period_s = 1 }}
daily = {{ limit = {DAILY_LIMIT}, policy = "hard_stop" }}
"""
ROTATE_S = 5          # JWT clients change every ROTATE_S seconds ...
PER_EPOCH = 20        # ... PER_EPOCH at a time, half of each tier
N_API_KEYS = 4        # per delivery, half of each tier
WEBHOOK_PACE_MS = 2   # pause between deliveries per connection (bounds the id pool)
HOOK_THREADS = 2      # one connection each: the Lua script pairs each answer with its id
DRAIN_S = 2           # Envoy hot restart: --drain-time-s
PARENT_SHUTDOWN_S = 5  # ... and --parent-shutdown-time-s

# What a panic, a VM failure or a crash looks like in Envoy's log: the module's panic guard
# (src/module/guard.rs, hooks.rs: "api-guard: panic in ..."), the Rust panic message the
# wasm's panic hook logs ("panicked at"), V8 traps after the wasm aborts, Envoy's VM
# failure/reload messages, and Envoy's own crash handler.
LOG_PATTERNS = [
    r"panicked", r"api-guard: panic in", r"caught panic", r"Uncaught RuntimeError",
    r"VM failed", r"Wasm VM failed", r"restarting VM", r"wasm.*panic",
    r"Segmentation fault", r"Caught Segmentation", r"Caught Aborted", r"Backtrace",
    r"std::terminate",
]


def log(msg):
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def b64u(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


# ---------------------------------------------------------------------------------------------
# The counting upstream (a separate process: `soak.py --serve-upstream PORT`)


class Counts:
    """What reached the upstream: admitted requests per (client, tier, UTC day), admitted
    requests per second, and each webhook delivery id with the number of times it came."""

    def __init__(self):
        self.api = {}
        self.per_sec = {}
        self.hooks = {}

    def api_request(self, headers):
        now = time.time()
        day = time.strftime("%Y-%m-%d", time.gmtime(now))
        key = (headers.get("x-auth-client", "(none)"), headers.get("x-auth-tier", "(none)"), day)
        self.api[key] = self.api.get(key, 0) + 1
        self.per_sec[int(now)] = self.per_sec.get(int(now), 0) + 1

    def hook_request(self, body):
        m = re.search(rb'"delivery":"([^"]*)"', body)
        did = m.group(1).decode() if m else "(no id)"
        self.hooks[did] = self.hooks.get(did, 0) + 1
        return did

    def json(self):
        return json.dumps({
            "api": [[c, t, d, n] for (c, t, d), n in self.api.items()],
            "per_sec": self.per_sec,
            "hooks": self.hooks,
        }).encode()


class UpstreamConn(asyncio.Protocol):
    """HTTP/1.1 with keep-alive, as much as Envoy sends: content-length or chunked bodies."""

    counts = Counts()

    def connection_made(self, transport):
        self.tr = transport
        self.buf = b""

    def data_received(self, data):
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buf[:end].decode("latin-1").split("\r\n")
            method, target = lines[0].split(" ")[:2]
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            rest = self.buf[end + 4:]
            if "chunked" in headers.get("transfer-encoding", "").lower():
                body, used = dechunk(rest)
                if body is None:
                    return
            else:
                used = int(headers.get("content-length", "0"))
                if len(rest) < used:
                    return
                body = rest[:used]
            self.buf = rest[used:]
            self.tr.write(self.answer(method, target, headers, body))

    def answer(self, method, target, headers, body):
        c = self.counts
        if target.startswith("/__soak/counts"):
            out = c.json()
        elif target.startswith("/webhooks/"):
            out = b'{"delivery":"' + c.hook_request(body).encode() + b'"}'
        else:
            c.api_request(headers)
            out = b'{"ok":true}'
        return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                + str(len(out)).encode() + b"\r\n\r\n" + out)


def dechunk(data):
    """(body, bytes used) of a complete chunked body at the start of `data`, else (None, 0)."""
    body = b""
    pos = 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return None, 0
        size = int(data[pos:eol].split(b";")[0], 16)
        if size == 0:
            end = data.find(b"\r\n\r\n", eol)  # optional trailers, then the empty line
            if data[eol:eol + 4] == b"\r\n\r\n":
                return body, eol + 4
            return (None, 0) if end < 0 else (body, end + 4)
        if len(data) < eol + 2 + size + 2:
            return None, 0
        body += data[eol + 2:eol + 2 + size]
        pos = eol + 2 + size + 2


def serve_upstream(port):
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(
        loop.create_server(UpstreamConn, "127.0.0.1", port, backlog=1024))
    print("ready", flush=True)
    # Through the loop's wakeup fd: a plain signal.signal handler would not wake select().
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, loop.stop)
    try:
        loop.run_forever()
    finally:
        server.close()


# ---------------------------------------------------------------------------------------------
# Processes: Redis, the quota service, the upstream, Envoy with hot restart


def wait_for(what, ok, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if ok():
                return
        except (OSError, http.client.HTTPException, ValueError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready within {timeout} s")


def port_open(port):
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def die_with_parent():
    """In the child before exec: SIGKILL it if the soak itself dies (even by SIGKILL), so no
    Envoy, Redis or wrk outlives it."""
    import ctypes
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Proc:
    """A child process we own; stop() always ends it (SIGTERM, then SIGKILL)."""

    def __init__(self, args, log_path, quiet_stdout=False, env=None):
        """stderr (and stdout unless quiet_stdout) appended to log_path."""
        self.args = args
        self.log_path = log_path
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL if quiet_stdout else out, stderr=out, env=env,
                preexec_fn=die_with_parent)

    def alive(self):
        return self.proc.poll() is None

    def kill9(self):
        if self.alive():
            self.proc.kill()
        self.proc.wait()

    def stop(self, timeout=10):
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Redis:
    """redis-server with AOF (fsync every second; a stop is a clean SIGTERM shutdown, which
    writes everything), so a restart keeps the counts, as quota/README.md asks of production."""

    def __init__(self, work):
        self.port = bench.free_port()
        self.dir = os.path.join(work, "redis")
        os.makedirs(self.dir, exist_ok=True)
        self.p = None
        self.start()

    def start(self):
        self.p = Proc([shutil.which("redis-server") or "redis-server", "--port", str(self.port),
                       "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                       "--appendfsync", "everysec", "--protected-mode", "no",
                       "--dir", self.dir], os.path.join(self.dir, "redis.log"))
        wait_for("redis-server", lambda: port_open(self.port))

    def stop(self):
        if self.p:
            self.p.stop()

    def url(self):
        return f"redis://127.0.0.1:{self.port}"


class Quota:
    """api-guard-quota (release build) on a fixed port, so Envoy's cluster finds it again."""

    def __init__(self, work, redis_url):
        self.port = bench.free_port()
        self.cfg = os.path.join(work, "quota.toml")
        self.log = os.path.join(work, "quota.log")
        self.redis_url = redis_url
        with open(self.cfg, "w") as f:
            f.write(QUOTA_TOML)
        self.p = None
        self.start()

    def start(self):
        self.p = Proc([bench.QUOTA_BIN, "--config", self.cfg, "--listen",
                       f"127.0.0.1:{self.port}", "--redis", self.redis_url,
                       "--redis-timeout-ms", "250"], self.log, quiet_stdout=True,
                      env=dict(os.environ, RUST_LOG="warn"))
        wait_for("api-guard-quota", lambda: bench.get_status(self.port, "/healthz") == 200)

    def ready(self):
        return bench.get_status(self.port, "/readyz") == 200


class Upstream:
    def __init__(self, work):
        self.port = bench.free_port()
        self.p = Proc([sys.executable, os.path.abspath(__file__), "--serve-upstream",
                       str(self.port)], os.path.join(work, "upstream.log"))
        wait_for("the counting upstream", lambda: port_open(self.port))

    def counts(self):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            c.request("GET", "/__soak/counts")
            return json.loads(c.getresponse().read())
        finally:
            c.close()


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class HotEnvoy:
    """Envoy with hot restart: epoch 0 picks a free base id (--use-dynamic-base-id, so runs
    never clash), each hot_restart() starts epoch N+1 with that base id; the new process
    takes the listener over and the old one drains and exits by itself."""

    def __init__(self, name, config, work, port):
        self.name = name
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir, exist_ok=True)
        self.cfg = os.path.join(self.dir, "envoy.json")
        with open(self.cfg, "w") as f:
            json.dump(config, f)
        self.port = port
        self.base_id = None
        self.epochs = []   # dicts: epoch, proc, log, admin, superseded
        self.admin = None
        self._start(0)

    def _start(self, epoch):
        logp = os.path.join(self.dir, f"envoy-{epoch}.log")
        admin_path = os.path.join(self.dir, f"admin-{epoch}.txt")
        args = [bench.ENVOY, "-c", self.cfg, "--concurrency", "2", "-l", "warning",
                "--admin-address-path", admin_path, "--restart-epoch", str(epoch),
                "--drain-time-s", str(DRAIN_S), "--parent-shutdown-time-s",
                str(PARENT_SHUTDOWN_S)]
        base_path = os.path.join(self.dir, "base-id.txt")
        if epoch == 0:
            args += ["--use-dynamic-base-id", "--base-id-path", base_path]
        else:
            args += ["--base-id", str(self.base_id)]
        p = Proc(args, logp, env=dict(os.environ,
                                      ENVOY_DYNAMIC_MODULES_SEARCH_PATH=bench.MODULE_DIR))
        e = {"epoch": epoch, "proc": p, "log": logp, "admin": None, "superseded": False,
             "started": time.time()}
        self.epochs.append(e)

        def ready():
            if not p.alive():
                raise RuntimeError(f"{self.name} epoch {epoch} exited with "
                                   f"{p.proc.returncode}: {tail(logp)}")
            txt = open(admin_path).read().strip() if os.path.exists(admin_path) else ""
            if not txt:
                return False
            admin = int(txt.rsplit(":", 1)[1])
            if bench.get_status(admin, "/ready") != 200:
                return False
            e["admin"] = admin
            return True
        try:
            wait_for(f"Envoy {self.name} epoch {epoch}", ready, timeout=60)
        except Exception:
            p.stop()
            e["stopped"] = True
            raise
        if epoch == 0:
            self.base_id = int(open(base_path).read().strip())
        self.admin = e["admin"]

    def hot_restart(self):
        old = self.epochs[-1]
        # Counters are per process (the child does not inherit the filter's or the quota
        # cluster's): read the parent's now; what it counts while draining is not seen.
        old["stats"] = guard_stats(old["admin"])
        self._start(old["epoch"] + 1)
        old["superseded"] = True
        return old

    def stop(self):
        for e in self.epochs:
            e["proc"].stop()
        # Envoy leaves its hot-restart shared memory behind when the last epoch is not 0.
        if self.base_id is not None:
            shm = f"/dev/shm/envoy_shared_memory_{self.base_id * 10}"
            if os.path.exists(shm):
                os.unlink(shm)

    def unexpected_exits(self):
        """Processes that ended on their own, except superseded parents ending cleanly."""
        out = []
        for e in self.epochs:
            rc = e["proc"].proc.poll()
            if rc is not None and not (e["superseded"] and rc == 0) and not e.get("stopped"):
                out.append(f"{self.name} epoch {e['epoch']} exited with {rc}")
        return out


def tail(path, n=15):
    try:
        return "\n".join(open(path, errors="replace").read().splitlines()[-n:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# Configuration


def filter_config(phase, api_keys, failure_mode="deny"):
    big = 1000000000
    return {
        "client_ip": {"xff_trusted_hops": 1, "use_remote_address": True},
        "jwt_providers": {"main": {
            "issuer": bench.ISS, "audiences": [bench.AUD], "algorithms": ["HS256"],
            "tier_claim": "tier",
            "local_jwks": {"keys": [{"kty": "oct", "kid": "soak", "alg": "HS256",
                                     "k": b64u(JWT_SECRET)}]}}},
        "api_keys": {"header": "x-api-key", "keys": [
            {"id": kid, "sha256": hashlib.sha256(key.encode()).hexdigest(), "tier": tier}
            for kid, key, tier in api_keys]},
        "cors": bench.AG_CORS,
        # Sized above the deliveries of one tolerance window (300 s), so no live id is evicted.
        "webhooks": {"github": {"scheme": "github", "secrets": [WEBHOOK_SECRET],
                                "replay_capacity": 262144}},
        # Leases (the default mode) and fail closed: the route's promise is "never over the
        # limit", also while the service or Redis is down.
        "quota": {"cluster": "quota", "authority": "quota", "timeout_ms": 250,
                  "failure_mode": failure_mode, "mode": "lease",
                  "breaker": {"failures": 5, "open_ms": 1000}},
        "rate_limits": {
            "per-ip-sliding": {"key": ["ip"], "algorithm": "sliding_window", "limit": big,
                               "window_s": 60},
            "per-ip-bucket": {"key": ["ip"], "capacity": big, "refill_tokens": big,
                              "refill_period_s": 1},
        },
        "routes": [
            {"name": "metered", "match": {"prefix": "/api"},
             "auth": {"mode": "required", "methods": ["jwt:main", "api_key"]}, "quota": True},
            {"name": "hook", "match": {"methods": ["POST"], "path": "/webhooks/github"},
             "auth": {"mode": "none"}, "webhook": "github"},
            {"name": "public", "match": {"prefix": "/ip"}, "auth": {"mode": "none"},
             "rate_limits": ["per-ip-sliding", "per-ip-bucket"]},
        ],
        "default_route": {"auth": {"mode": "required", "methods": ["jwt:main"]}},
    }


def envoy_config(filt, port, upstream_port, quota_port):
    """A listener on a fixed port (hot restart hands it over by address); /ip answered by
    Envoy itself (the filter runs first), everything else to the counting upstream."""
    cfg = bench.bootstrap([filt], upstream_port=upstream_port,
                          extra_clusters=[("quota", quota_port)])
    lst = cfg["static_resources"]["listeners"][0]
    lst["address"]["socket_address"]["port_value"] = port
    hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["stat_prefix"] = "soak"
    vhost = hcm["route_config"]["virtual_hosts"][0]
    vhost["routes"] = [
        {"name": "public", "match": {"prefix": "/ip"},
         "direct_response": {"status": 200, "body": {"inline_string": "{\"ok\":true}\n"}}},
        {"name": "upstream", "match": {"prefix": "/"},
         "route": {"cluster": "upstream", "timeout": "5s"}},
    ]
    for c in cfg["static_resources"]["clusters"]:
        if c["name"] == "quota":
            c["connect_timeout"] = "0.25s"  # fail fast: failure_mode takes over
    return cfg


# ---------------------------------------------------------------------------------------------
# Traffic: credentials, webhook pools, wrk scripts


def jwt(secret, claims):
    head = b64u(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "soak"}).encode())
    body = b64u(json.dumps(claims).encode())
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64u(mac)}"


def tier_of(j):
    return "capped" if j % 2 == 0 else "daily"


def make_credentials(work, phase, seconds):
    """Token file: PER_EPOCH clients per ROTATE_S seconds of the phase (and a spare epoch);
    forged tokens (wrong key; a payload changed after signing); API keys."""
    epochs = int(seconds // ROTATE_S) + 3
    tokens = []
    for e in range(epochs):
        for j in range(PER_EPOCH):
            tokens.append(jwt(JWT_SECRET, {"iss": bench.ISS, "aud": bench.AUD, "exp": bench.EXP,
                                           "sub": f"{phase}-{tier_of(j)}-{e}-{j}",
                                           "tier": tier_of(j)}))
    forged = []
    for i in range(20):
        claims = {"iss": bench.ISS, "aud": bench.AUD, "exp": bench.EXP,
                  "sub": f"forged-{phase}-{i}", "tier": "capped"}
        if i % 2 == 0:
            forged.append(jwt(FORGED_SECRET, claims))
        else:
            h, _, s = jwt(JWT_SECRET, dict(claims, sub=f"{phase}-capped-0-0")).split(".")
            forged.append(f"{h}.{b64u(json.dumps(claims).encode())}.{s}")
    tok_path = os.path.join(work, f"{phase}-tokens.txt")
    forged_path = os.path.join(work, f"{phase}-forged.txt")
    with open(tok_path, "w") as f:
        f.write("\n".join(tokens) + "\n")
    with open(forged_path, "w") as f:
        f.write("\n".join(forged) + "\n")
    keys = [(f"{phase}-key-{i}", f"soak-{phase}-{i}-{os.urandom(8).hex()}", tier_of(i))
            for i in range(N_API_KEYS)]
    keys_path = os.path.join(work, f"{phase}-keys.txt")
    with open(keys_path, "w") as f:
        f.write("\n".join(k for _, k, _ in keys) + "\n")
    return tok_path, forged_path, keys_path, keys


HOOK_PREFIX = '{"action":"opened","repository":{"full_name":"acme/app"},"delivery":"'
HOOK_SUFFIX = '","pad":"' + "x" * 400 + '"}'


def make_webhook_pool(work, phase, seconds):
    """Deliveries for the whole phase at the paced rate: "<id> <hex MAC>" per line, every
    10th signed with the wrong secret (id "f..."). Ids never repeat (a repeat is a replay)."""
    n = int(seconds * HOOK_THREADS * 1000 / WEBHOOK_PACE_MS) + 1000
    good = WEBHOOK_SECRET.encode()
    bad = b"forged-webhook-secret"
    path = os.path.join(work, f"{phase}-hooks.txt")
    with open(path, "w") as f:
        for i in range(n):
            forged = i % 10 == 9
            did = f"{'f' if forged else 'v'}{phase}-{i}"
            body = (HOOK_PREFIX + did + HOOK_SUFFIX).encode()
            mac = hmac.new(bad if forged else good, body, hashlib.sha256).hexdigest()
            f.write(f"{did} {mac}\n")
    return path


# Shared by every script: per-thread counts of answers by second and status (a flat table,
# which wrk's thread:get copies), printed by done() as "SOAK_STAT <sec>:<status> <n>" lines.
LUA_COMMON = r"""
stats = {}
sent = 0
threads = {}
local counter = 0
function setup(thread)
  thread:set("first", counter)
  counter = counter + 1
  table.insert(threads, thread)
end
function count(status, body)
  -- A 503 is the filter failing closed (quota_unavailable) or something else (Envoy's own
  -- "upstream connect error", backend_overloaded): told apart as "503" and "503x".
  if status == 503 and not string.find(body or "", "quota_unavailable", 1, true) then
    status = "503x"
  end
  local key = os.time() .. ":" .. status
  stats[key] = (stats[key] or 0) + 1
end
function done(summary, latency, requests)
  for _, t in ipairs(threads) do
    for key, n in pairs(t:get("stats")) do io.write("SOAK_STAT " .. key .. " " .. n .. "\n") end
    io.write("SOAK_SENT " .. t:get("sent") .. "\n")
  end
  local e = summary.errors
  io.write(string.format("SOAK_SUMMARY %d %d %d %d %d %d\n", summary.requests, e.connect,
    e.read, e.write, e.timeout, e.status))
end
"""


def lua_api(tok_path, forged_path, keys_path, t0):
    """Of 20 requests: 1 forged JWT, 1 unknown API key, 3 valid API keys, 15 valid JWTs of the
    clients of the current ROTATE_S-second epoch."""
    return LUA_COMMON + f"""
tokens, forged, keys = {{}}, {{}}, {{}}
n = 0
function init(args)
  for l in io.lines("{tok_path}") do tokens[#tokens + 1] = l end
  for l in io.lines("{forged_path}") do forged[#forged + 1] = l end
  for l in io.lines("{keys_path}") do keys[#keys + 1] = l end
  n = first * 7
end
function request()
  n = n + 1
  sent = sent + 1
  local r = n % 20
  -- Identity headers a client must never get to set: the filter strips or overwrites them,
  -- so "spoofed" reaching the upstream fails the limits check.
  local h = {{["x-auth-client"] = "spoofed-" .. (n % 3), ["x-auth-tier"] = "daily"}}
  if r == 0 then
    h["authorization"] = "Bearer " .. forged[(math.floor(n / 20) % #forged) + 1]
  elseif r == 1 then
    h["x-api-key"] = "soak-unknown-" .. n
  elseif r < 5 then
    h["x-api-key"] = keys[(n % #keys) + 1]
  else
    local e = math.floor((os.time() - {int(t0)}) / {ROTATE_S})
    local idx = e * {PER_EPOCH} + (n % {PER_EPOCH}) + 1
    if idx > #tokens then idx = #tokens - {PER_EPOCH} + (n % {PER_EPOCH}) + 1 end
    h["authorization"] = "Bearer " .. tokens[idx]
  end
  return wrk.format("GET", "/api/orders", h)
end
function response(status, headers, body) count(status, body) end
"""


def lua_webhook(pool_path, out_dir):
    """One connection per thread, so each answer belongs to the one pending delivery; a
    request made while one is still pending means that one got no answer (a reset): its
    outcome is unknown ("0"). Each thread takes every HOOK_THREADS-th line of the pool."""
    return LUA_COMMON + f"""
ids, sigs = {{}}, {{}}
pos = 0
pending = nil
prefix = {json.dumps(HOOK_PREFIX)}
suffix = {json.dumps(HOOK_SUFFIX)}
function init(args)
  local i = 0
  for l in io.lines("{pool_path}") do
    if i % {HOOK_THREADS} == first then
      local id, sig = l:match("^(%S+) (%S+)$")
      ids[#ids + 1] = id
      sigs[#sigs + 1] = sig
    end
    i = i + 1
  end
  out = io.open("{out_dir}/hook-" .. first .. ".txt", "w")
  out:setvbuf("line")
end
function request()
  if pending then out:write(pending, " 0\\n") end
  pos = pos + 1
  sent = sent + 1
  local id, sig
  if pos <= #ids then
    id, sig = ids[pos], sigs[pos]
  else
    id, sig = "x" .. first .. "-" .. pos, string.rep("0", 64)  -- pool used up: forged
  end
  pending = id
  return wrk.format("POST", "/webhooks/github", {{["content-type"] = "application/json",
    ["x-github-event"] = "pull_request", ["x-hub-signature-256"] = "sha256=" .. sig}},
    prefix .. id .. suffix)
end
function response(status, headers, body)
  count(status, body)
  if pending then
    if status >= 200 and status < 300 and not string.find(body, pending, 1, true) then
      out:write(pending, " mismatch\\n")
    else
      out:write(pending, " ", status, "\\n")
    end
    pending = nil
  end
end
function delay() return {WEBHOOK_PACE_MS} end
"""


def lua_public(threads, offset):
    """Each request from a new client address (11.0.0.0 + offset + k: no address repeats
    within the run); every 10th is a CORS preflight from the allowed origin, every 10th
    another a preflight from a refused origin."""
    return LUA_COMMON + f"""
k = 0
function init(args) k = first end
function request()
  local a = 184549376 + (({offset} + k) % 16777216)
  k = k + {threads}
  sent = sent + 1
  local ip = string.format("%d.%d.%d.%d", math.floor(a / 16777216), math.floor(a / 65536) % 256,
                           math.floor(a / 256) % 256, a % 256)
  local m = sent % 10
  if m == 3 or m == 7 then
    return wrk.format("OPTIONS", "/ip/orders", {{["x-forwarded-for"] = ip,
      ["origin"] = (m == 3) and "{ORIGIN}" or "https://evil.example.net",
      ["access-control-request-method"] = "PUT",
      ["access-control-request-headers"] = "authorization, content-type"}})
  end
  return wrk.format("GET", "/ip/orders", {{["x-forwarded-for"] = ip, ["origin"] = "{ORIGIN}"}})
end
function response(status, headers, body) count(status, body) end
"""


class Wrk:
    """One wrk instance for one traffic kind, for the whole phase (-d): it reconnects by
    itself when a hot restart closes its connections."""

    def __init__(self, kind, script, work, port, seconds, threads, conns):
        self.kind = kind
        path = os.path.join(work, f"{kind}.lua")
        with open(path, "w") as f:
            f.write(script)
        self.out_path = os.path.join(work, f"{kind}.wrk.txt")
        self.p = Proc(["wrk", f"-t{threads}", f"-c{conns}", f"-d{int(seconds)}s",
                       "--timeout", "5s", "-s", path, f"http://127.0.0.1:{port}/"],
                      self.out_path)

    def result(self):
        self.p.proc.wait()
        per_sec = {}
        sent = 0
        summary = None
        for line in open(self.out_path, errors="replace"):
            if line.startswith("SOAK_STAT "):
                _, key, n = line.split()
                sec, status = key.split(":")
                per_sec.setdefault(int(sec), {})
                per_sec[int(sec)][status] = per_sec[int(sec)].get(status, 0) + int(n)
            elif line.startswith("SOAK_SENT "):
                sent += int(line.split()[1])
            elif line.startswith("SOAK_SUMMARY "):
                r, c, rd, w, t, st = map(int, line.split()[1:])
                summary = {"requests": r, "connect_errors": c, "read_errors": rd,
                           "write_errors": w, "timeouts": t, "non_2xx_3xx": st}
        if summary is None:
            raise RuntimeError(f"wrk ({self.kind}) gave no summary:\n{tail(self.out_path)}")
        return {"kind": self.kind, "sent": sent, "summary": summary, "per_sec": per_sec}


# ---------------------------------------------------------------------------------------------
# One delivery's run


class Sampler(threading.Thread):
    """Every second: VmRSS of every live Envoy process (both during a hot restart)."""

    def __init__(self, t_start):
        super().__init__(daemon=True)
        self.t_start = t_start
        self.samples = []   # [t, delivery, epoch, kib]
        self.envoy = None
        self.delivery = None
        self.stop_ev = threading.Event()

    def run(self):
        while not self.stop_ev.wait(1.0):
            e = self.envoy
            if e is None:
                continue
            for ep in list(e.epochs):
                kib = rss_kib(ep["proc"].proc.pid) if ep["proc"].alive() else None
                if kib:
                    self.samples.append([round(time.time() - self.t_start, 1), self.delivery,
                                         ep["epoch"], kib])


def fault_quota(ctx):
    """kill -9 the quota service, leave it down for 2 s, start it again."""
    ctx["quota"].p.kill9()
    time.sleep(2)
    ctx["quota"].start()
    return "api-guard-quota killed (SIGKILL), down 2 s, started again"


def fault_redis(ctx):
    """Stop Redis (clean shutdown: the AOF keeps every count), 3 s down, start it again, and
    wait until the quota service reaches it again."""
    ctx["redis"].stop()
    time.sleep(3)
    ctx["redis"].start()
    wait_for("quota service back on Redis", ctx["quota"].ready, timeout=30)
    return "redis-server stopped (SIGTERM), down 3 s, started again"


def fault_hot_restart(ctx):
    """A new Envoy epoch takes the listener over; the old one drains and must exit cleanly
    within its parent-shutdown time."""
    env = ctx["envoy"]
    old = env.hot_restart()
    deadline = time.time() + PARENT_SHUTDOWN_S + 15
    while old["proc"].alive() and time.time() < deadline:
        time.sleep(0.2)
    rc = old["proc"].proc.poll()
    if rc is None:
        raise RuntimeError(f"epoch {old['epoch']} still running {PARENT_SHUTDOWN_S + 15} s "
                           "after the hot restart")
    return (f"Envoy hot restart to epoch {env.epochs[-1]['epoch']} (base id {env.base_id}); "
            f"old epoch exited with {rc}")


FAULTS = [("quota_restart", fault_quota), ("redis_restart", fault_redis),
          ("envoy_hot_restart", fault_hot_restart)]
FAULT_CYCLE_S = 120  # one round of the three faults per this many seconds of a delivery


def fault_schedule(seconds):
    """(offset in s, name, fn): rounds of the three faults, evenly spread, each at least once;
    the last ends well before the traffic does (a hot restart takes ~PARENT_SHUTDOWN_S)."""
    rounds = max(1, int(seconds // FAULT_CYCLE_S))
    out = []
    for r in range(rounds):
        for i, (name, fn) in enumerate(FAULTS):
            out.append(((r + (0.2 + 0.25 * i)) / rounds * seconds, name, fn))
    return out


def run_delivery(delivery, seconds, work, ctx, sampler, t_start, ip_offset):
    wrap = bench.api_guard if delivery == "wasm" else bench.api_guard_module
    dwork = os.path.join(work, delivery)
    os.makedirs(dwork, exist_ok=True)
    phase = "w" if delivery == "wasm" else "n"
    log(f"{delivery}: credentials and {seconds:.0f} s of webhook deliveries")
    tok, forged, keysf, keys = make_credentials(dwork, phase, seconds)
    pool = make_webhook_pool(dwork, phase, seconds)
    port = bench.free_port()
    filt = wrap(filter_config(phase, keys, ctx["failure_mode"]))
    cfg = envoy_config(filt, port, ctx["upstream"].port, ctx["quota"].port)
    env = HotEnvoy(f"envoy-{delivery}", cfg, dwork, port)
    ctx["envoy"] = env
    sampler.envoy, sampler.delivery = env, delivery
    res = {"delivery": delivery, "port": port, "base_id": env.base_id, "faults": [],
           "api_keys": [[k, t] for k, _, t in keys]}
    wrks = []
    try:
        t0 = time.time()
        res["t_begin"] = round(t0 - t_start, 1)
        log(f"{delivery}: Envoy ready (base id {env.base_id}), traffic for {seconds:.0f} s")
        wrks = [
            Wrk("api", lua_api(tok, forged, keysf, t0), dwork, port, seconds, 1, 8),
            Wrk("webhook", lua_webhook(pool, dwork), dwork, port, seconds, HOOK_THREADS,
                HOOK_THREADS),
            Wrk("public", lua_public(2, ip_offset), dwork, port, seconds, 2, 8),
        ]
        for at, name, fn in fault_schedule(seconds):
            wait_until = t0 + at
            while time.time() < wait_until:
                time.sleep(0.2)
            fs = time.time()
            log(f"{delivery}: fault {name}")
            try:
                detail, failed = fn(ctx), False
            except Exception as ex:  # recorded and reported: the checks still run
                detail, failed = f"FAILED: {ex}", True
            fe = time.time()
            res["faults"].append({"name": name, "start": round(fs - t_start, 2),
                                  "end": round(fe - t_start, 2), "detail": detail,
                                  "failed": failed})
            log(f"{delivery}: {detail} ({fe - fs:.1f} s)")
        res["traffic"] = [w.result() for w in wrks]
        res["t_end"] = round(time.time() - t_start, 1)
        hook_outcomes = []
        for i in range(HOOK_THREADS):
            p = os.path.join(dwork, f"hook-{i}.txt")
            if os.path.exists(p):
                hook_outcomes += [l.split() for l in open(p) if l.strip()]
        res["hook_outcomes"] = hook_outcomes
        env.epochs[-1]["stats"] = guard_stats(env.admin)
        res["stats"] = {}
        for e in env.epochs:  # summed over the epochs
            for k, v in e.get("stats", {}).items():
                res["stats"][k] = res["stats"].get(k, 0) + v
    finally:
        for w in wrks:
            w.p.stop()
        # A parent that is still draining is expected to end by itself; everything else
        # left is stopped now, and marked so it does not count as a crash.
        res["exits"] = env.unexpected_exits()
        for e in env.epochs:
            e["stopped"] = True
        env.stop()
        sampler.envoy = None
        res["logs"] = [{"epoch": e["epoch"], "path": e["log"],
                        "text": open(e["log"], errors="replace").read()} for e in env.epochs]
    return res


def guard_stats(admin):
    """The filter's counters and those of the `quota` cluster (how the callouts failed:
    timeouts, refused connections, 5xx answers)."""
    out = {}
    for flt in ("api_guard", "^cluster\\.quota\\.upstream_(rq|cx)_"):
        try:
            body = json.loads(bench.get_body(
                admin, "/stats?format=json&filter=" + urllib.parse.quote(flt)))
        except (OSError, ValueError, http.client.HTTPException):
            continue
        out.update({s["name"]: s["value"] for s in body.get("stats", []) if "value" in s})
    return out


def callout_summary(stats):
    """The quota callouts of one delivery in a few numbers (Envoy's cluster stats)."""
    g = lambda k: stats.get(f"cluster.quota.{k}", 0)  # noqa: E731
    unavailable = sum(v for k, v in stats.items() if k.endswith("api_guard.quota.unavailable"))
    return {"requests": g("upstream_rq_total"), "timeouts": g("upstream_rq_timeout"),
            "connect_failures": g("upstream_cx_connect_fail"), "answers_5xx": g("upstream_rq_5xx"),
            "filter_quota_unavailable": unavailable}


# ---------------------------------------------------------------------------------------------
# Checks


def check_limits(runs, counts, run_s):
    """Admitted at the upstream per client against its limit; forged or spoofed identities
    (and requests without one) never."""
    capped_limit = CAPPED_CAP + math.floor(run_s / 3600)
    per_key = {}
    problems = []
    for client, tier, day, n in counts["api"]:
        if client.startswith(("forged", "spoofed")) or tier not in ("capped", "daily"):
            problems.append(f"{n} requests of client {client!r} (tier {tier!r}) reached the "
                            "upstream")
            continue
        key = (client, tier, day if tier == "daily" else "run")
        per_key[key] = per_key.get(key, 0) + n
    rows = []
    for (client, tier, window), n in per_key.items():
        limit = capped_limit if tier == "capped" else DAILY_LIMIT
        rows.append({"client": client, "tier": tier, "window": window, "admitted": n,
                     "limit": limit})
        if n > limit:
            problems.append(f"client {client} ({tier}, window {window}): {n} admitted, "
                            f"limit {limit}")
    by_tier = {}
    for r in rows:
        t = by_tier.setdefault(r["tier"], {"keys": 0, "at_limit": 0, "max_ratio": 0.0,
                                           "admitted": 0, "limit": r["limit"]})
        t["keys"] += 1
        t["admitted"] += r["admitted"]
        t["at_limit"] += r["admitted"] == r["limit"]
        t["max_ratio"] = max(t["max_ratio"], r["admitted"] / r["limit"])
    return {"ok": not problems, "problems": problems[:20], "by_tier": by_tier,
            "max_ratio": max((r["admitted"] / r["limit"] for r in rows), default=0.0)}


def check_logs(runs):
    hits = []
    for r in runs:
        for lg in r["logs"]:
            for line in lg["text"].splitlines():
                if any(re.search(p, line) for p in LOG_PATTERNS):
                    hits.append(f"{r['delivery']} epoch {lg['epoch']}: {line[:300]}")
        hits += [f"{r['delivery']}: {x}" for x in r["exits"]]
        # The same from Envoy's counters: wasm VM reloads (a VM that failed, e.g. after a
        # panic aborted it) and requests the module answered 500 after a caught panic.
        for name, v in r.get("stats", {}).items():
            if v and (name.startswith("wasm.api_guard.vm_reload")
                      or name.endswith("api_guard.denied.internal_error")):
                hits.append(f"{r['delivery']}: counter {name} = {v}")
    # What Envoy did log (level warning and up), each distinct message once, for the report.
    seen = {}
    for r in runs:
        for lg in r["logs"]:
            for line in lg["text"].splitlines():
                msg = re.sub(r"^\[[^]]*\]\[\d+\]", "", line).strip()[:200]
                seen[msg] = seen.get(msg, 0) + 1
    return {"ok": not hits, "problems": hits[:20], "patterns": LOG_PATTERNS,
            "messages": sorted(seen.items(), key=lambda kv: -kv[1])[:10],
            "log_lines": sum(len(lg["text"].splitlines()) for r in runs for lg in r["logs"])}


def check_rss(samples, bound_mib):
    out = {}
    for _, d, _, kib in samples:
        o = out.setdefault(d, {"min_mib": kib / 1024, "max_mib": kib / 1024})
        o["min_mib"] = min(o["min_mib"], kib / 1024)
        o["max_mib"] = max(o["max_mib"], kib / 1024)
    worst = max((o["max_mib"] for o in out.values()), default=0)
    problems = [f"{d}: Envoy RSS reached {o['max_mib']:.1f} MiB > {bound_mib} MiB"
                for d, o in out.items() if o["max_mib"] > bound_mib]
    if not samples:
        problems.append("no RSS sample")
    return {"ok": not problems, "problems": problems, "bound_mib": bound_mib,
            "max_mib": worst, "by_delivery": out}


def check_webhooks(runs, counts):
    seen = counts["hooks"]
    ok_ids, refused, unknown, mismatch = set(), set(), set(), []
    for r in runs:
        for did, outcome in r["hook_outcomes"]:
            if outcome == "0":
                unknown.add(did)
            elif outcome == "mismatch":
                mismatch.append(did)
            elif 200 <= int(outcome) < 300:
                ok_ids.add(did)
            else:
                refused.add(did)
    problems = []
    missing = [i for i in ok_ids if seen.get(i, 0) == 0]
    twice = [i for i, n in seen.items() if n > 1]
    leaked = [i for i in refused if seen.get(i, 0) > 0]
    forged = [i for i in seen if not i.startswith("v")]
    if missing:
        problems.append(f"{len(missing)} deliveries answered 2xx never reached the upstream "
                        f"(e.g. {missing[:3]})")
    if twice:
        problems.append(f"{len(twice)} deliveries reached the upstream more than once "
                        f"(e.g. {twice[:3]})")
    if leaked:
        problems.append(f"{len(leaked)} deliveries answered non-2xx reached the upstream "
                        f"(e.g. {leaked[:3]})")
    if forged:
        problems.append(f"{len(forged)} forged deliveries reached the upstream "
                        f"(e.g. {forged[:3]})")
    if mismatch:
        problems.append(f"{len(mismatch)} 2xx answers carried another delivery's id")
    return {"ok": not problems, "problems": problems, "answered_2xx": len(ok_ids),
            "answered_other": len(refused), "unknown": len(unknown),
            "unknown_reached_upstream": sum(1 for i in unknown if seen.get(i, 0)),
            "upstream_ids": len(seen)}


def check_traffic(runs):
    problems = []
    for r in runs:
        for t in r["traffic"]:
            ok = sum(n for s in t["per_sec"].values() for st, n in s.items()
                     if st.startswith("2"))
            if not ok:
                problems.append(f"{r['delivery']}: no {t['kind']} request was admitted")
            for code, why in (("500", "internal_error: a caught panic"),
                              ("503x", "a 503 that is not the filter's quota_unavailable: "
                                       "e.g. a failed wasm VM failing closed")):
                n = sum(c for s in t["per_sec"].values() for st, c in s.items() if st == code)
                if n:
                    problems.append(f"{r['delivery']}: {n} {t['kind']} requests answered "
                                    f"{code[:3]} ({why})")
        names = [f["name"] for f in r["faults"] if not f["failed"]]
        problems += [f"{r['delivery']}: {f['name']} {f['detail']}" for f in r["faults"]
                     if f["failed"]]
        for name, _ in FAULTS:
            if name not in names:
                problems.append(f"{r['delivery']}: fault {name} did not happen")
    return {"ok": not problems, "problems": problems}


# ---------------------------------------------------------------------------------------------
# Figures, report, chart


def summarize(runs, counts, samples, t_start):
    """Requests by kind and status, refusals (503) inside each fault's window, rates."""
    out = []
    for r in runs:
        kinds = {}
        for t in r["traffic"]:
            st = {}
            for s in t["per_sec"].values():
                for k, n in s.items():
                    st[k] = st.get(k, 0) + n
            s = t["summary"]
            kinds[t["kind"]] = {"sent": t["sent"], "statuses": dict(sorted(st.items())),
                                "socket_errors": s["connect_errors"] + s["read_errors"]
                                + s["write_errors"] + s["timeouts"]}
        for f in r["faults"]:
            # The fault's window: from its start until 3 s after recovery (breaker open_ms 1 s,
            # lease refresh timer, connection pools re-established).
            lo, hi = f["start"], f["end"] + 3
            refused, answers, other = {}, {}, 0
            for t in r["traffic"]:
                for sec, s in t["per_sec"].items():
                    rel = int(sec) - t_start
                    if lo - 1 <= rel <= hi:
                        for k, n in s.items():
                            answers[t["kind"]] = answers.get(t["kind"], 0) + n
                            if k == "503":
                                refused[t["kind"]] = refused.get(t["kind"], 0) + n
                            elif k.startswith("5"):
                                other += n
            f["refused_503"] = refused
            f["answers"] = answers
            f["other_5xx"] = other
        outside = 0
        for t in r["traffic"]:
            for sec, s in t["per_sec"].items():
                rel = int(sec) - t_start
                if not any(f["start"] - 1 <= rel <= f["end"] + 3 for f in r["faults"]):
                    outside += s.get("503", 0)
        out.append({"delivery": r["delivery"], "kinds": kinds, "faults": r["faults"],
                    "callouts": callout_summary(r.get("stats", {})),
                    "refused_503_outside_faults": outside,
                    "seconds": round(r["t_end"] - r["t_begin"], 1)})
    return out


def rates(runs, counts, t_start):
    """Per second, relative to the soak's start: answers by kind, the 503 refusals of all
    kinds, and admissions at the upstream (api). Every second of a delivery's run has a value
    (0 when nothing came); None between deliveries, so a chart does not join them."""
    series = {}
    base = int(t_start)
    for r in runs:
        secs = range(int(r["t_begin"]) + 1, int(r["t_end"]))
        per = {}
        for t in r["traffic"]:
            k = per.setdefault(t["kind"], {})
            ref = per.setdefault("refused (503)", {})
            for sec, st in t["per_sec"].items():
                k[int(sec) - base] = sum(st.values())
                ref[int(sec) - base] = ref.get(int(sec) - base, 0) + st.get("503", 0)
        per["admitted at the upstream (api)"] = {int(sec) - base: n
                                                 for sec, n in counts["per_sec"].items()}
        for name, vals in per.items():
            out = series.setdefault(name, [])
            if out:
                out.append([None, None])
            out += [[x, vals.get(x, 0)] for x in secs]
    return series


def chart(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    for d, color in (("wasm", "#ff7f0e"), ("native", "#d62728")):
        for ep in sorted({s[2] for s in res["rss_samples"] if s[1] == d}):
            pts = [(s[0], s[3] / 1024) for s in res["rss_samples"] if s[1] == d and s[2] == ep]
            if pts:
                ax1.plot(*zip(*pts), color=color, alpha=1.0 if ep == 0 else 0.6,
                         linestyle="-" if ep == 0 else "--",
                         label=f"{'.wasm' if d == 'wasm' else 'module (.so)'} epoch {ep}")
    ax1.axhline(res["checks"]["memory"]["bound_mib"], color="grey", linestyle=":",
                label="bound")
    ax1.set_ylabel("Envoy VmRSS (MiB)")
    ax1.set_ylim(0, res["checks"]["memory"]["bound_mib"] * 1.1)
    ax1.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    colors = {"api": "#1f77b4", "webhook": "#2ca02c", "public": "#9e9e9e",
              "refused (503)": "#d62728", "admitted at the upstream (api)": "black"}
    for name, pts in res["rates"].items():
        xs = [p[0] if p[0] is not None else float("nan") for p in pts]
        ys = [p[1] if p[1] is not None else float("nan") for p in pts]
        label = f"{name} answers" if name in ("api", "webhook", "public") else name
        ax2.plot(xs, ys, label=label, linewidth=0.8, color=colors.get(name))
    ax2.set_ylabel("per second")
    ax2.set_xlabel("seconds since the soak started")
    ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    top = ax1.get_ylim()[1]
    for r in res["runs"]:
        ax1.annotate("wasm filter" if r["delivery"] == "wasm" else "dynamic module",
                     (r["t_begin"], top * 0.55), fontsize=9)
        for f in r["faults"]:
            for ax in (ax1, ax2):
                ax.axvspan(f["start"], f["end"], color="red", alpha=0.15)
            ax1.annotate(f["name"].replace("_", " "), (f["start"], top * 0.97),
                         fontsize=7, rotation=90, va="top")
    fig.suptitle("api-guard soak: Envoy RSS and request rates; faults shaded")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(res, path):
    c = res["checks"]
    ok = "pass" if res["ok"] else "FAIL"
    L = [
        "# Soak test",
        "",
        f"`make soak` (bench/soak.py), {res['started']}, {res['seconds']} s requested "
        f"(`SOAK_SECONDS`), {res['wall_s']:.0f} s wall time, deliveries: "
        f"{', '.join(r['delivery'] for r in res['runs'])}; load average "
        f"{' '.join(res['loadavg_before'])} before, {' '.join(res['loadavg_after'])} after. "
        f"Envoy {res['versions']['envoy']}, api-guard at commit "
        f"`{res['versions']['commit']}`. Result: **{ok}**.",
        "",
        "Per delivery: Envoy with 2 workers and hot restart enabled, the quota service "
        "(api-guard-quota, release build) on Redis (AOF), a counting upstream "
        "(bench/soak.py --serve-upstream). wrk sends at once: *api* (valid HS256 JWTs of "
        f"{PER_EPOCH} clients that change every {ROTATE_S} s, forged JWTs, valid and unknown "
        "API keys; route with `quota: true`, lease mode, "
        f"`failure_mode: {res['failure_mode']}`), *webhook* "
        "(GitHub-signed deliveries with unique ids, every 10th forged) and *public* (a new "
        "client IP per request through two per-IP limits, 1 in 10 a CORS preflight from the "
        "allowed origin, 1 in 10 from a refused one). Global limits (quota service): tier "
        f"`capped` a bucket of {CAPPED_CAP} refilling 1 per hour (limit per client over the "
        f"run: {CAPPED_CAP} + ⌊run/3600 s⌋), tier `daily` a hard-stop quota of "
        f"{DAILY_LIMIT} per UTC day.",
        "",
        "## Checks",
        "",
        "| check | result | detail |",
        "|---|---|---|",
    ]
    lim = c["limits"]
    L.append(f"| 1. no client over its limit (counted at the upstream) | "
             f"{'pass' if lim['ok'] else 'FAIL'} | max admitted ÷ limit "
             f"{lim['max_ratio']:.2f}; " + "; ".join(
                 f"{t}: {v['keys']} clients, {v['at_limit']} at exactly the limit, "
                 f"{v['admitted']:,} admitted" for t, v in sorted(lim["by_tier"].items()))
             + " (a client below its limit lost leased units to a fault: under-admission, "
             "which leases allow) |")
    lg = c["logs"]
    L.append(f"| 2. no panic, VM failure or crash in Envoy's logs, no wasm VM reload or "
             f"internal_error counted; no unexpected exit | "
             f"{'pass' if lg['ok'] else 'FAIL'} | {lg['log_lines']} log lines (level "
             "warning) searched |")
    m = c["memory"]
    L.append(f"| 3. Envoy RSS below {m['bound_mib']:g} MiB | {'pass' if m['ok'] else 'FAIL'} | "
             + "; ".join(f"{d}: {v['min_mib']:.1f}–{v['max_mib']:.1f} MiB"
                         for d, v in m["by_delivery"].items()) + " |")
    w = c["webhooks"]
    L.append(f"| 4. each delivery answered 2xx reached the upstream exactly once, no other "
             f"did | {'pass' if w['ok'] else 'FAIL'} | {w['answered_2xx']:,} answered 2xx, "
             f"{w['answered_other']:,} refused, {w['unknown']} unknown (connection reset; "
             f"{w['unknown_reached_upstream']} of them reached the upstream), "
             f"{w['upstream_ids']:,} ids at the upstream |")
    t = c["traffic"]
    L.append("| 5. every kind admitted, every fault injected, no 500 and no 503 but the "
             f"filter's fail-closed one | {'pass' if t['ok'] else 'FAIL'} | |")
    for name in ("limits", "logs", "memory", "webhooks", "traffic"):
        for p in c[name]["problems"]:
            L.append(f"\n- **{name}**: {p}")
    if lg["messages"]:
        L += ["", "What Envoy logged (warning and up; each distinct message, with its count):",
              ""] + [f"- {n} × `{msg.replace('`', chr(39))}`" for msg, n in lg["messages"]]
    L += ["", "## Requests", "", "| delivery | kind | sent | answers by status | socket "
          "errors |", "|---|---|---|---|---|"]
    for s in res["summary"]:
        for kind, k in s["kinds"].items():
            sts = ", ".join(f"{st}: {n:,}" for st, n in k["statuses"].items())
            L.append(f"| {s['delivery']} | {kind} | {k['sent']:,} | {sts} | "
                     f"{k['socket_errors']} |")
    L += ["", f"Distinct client IPs (public): {res['distinct_ips']:,}.", "",
          "## Faults", "", "Times in seconds since the soak started. While the quota service "
          "or Redis is down, a client's request is admitted only with units its Envoy still "
          "holds in a lease; the others get 503 `quota_unavailable` (fail closed; the breaker "
          "answers at once after 5 failures, for 1 s). *Refused* counts those 503s from the "
          "fault's start to 3 s after it ended, of all answers of that kind in the same "
          "window; *other 5xx* is anything else (Envoy's own 503, a 500).", "",
          "| delivery | fault | start | end | refused (503) | other 5xx | detail |",
          "|---|---|---|---|---|---|---|"]
    for s in res["summary"]:
        for f in s["faults"]:
            ref = ", ".join(f"{k}: {n:,} of {f['answers'].get(k, 0):,}"
                            for k, n in f["refused_503"].items()) or "0"
            L.append(f"| {s['delivery']} | {f['name']} | {f['start']:.1f} | {f['end']:.1f} | "
                     f"{ref} | {f['other_5xx']} | {f['detail']} |")
        L.append(f"| {s['delivery']} | (outside faults) | | | "
                 f"{s['refused_503_outside_faults']:,} | | |")
    L += ["", "Quota callouts as Envoy counted them (cluster `quota`, summed over the epochs, "
          "each read just before it was replaced), and the filter's `quota.unavailable` (failed or "
          "skipped callouts: each is a 503 to a client without a held lease). Refusals "
          "outside the fault windows come from callouts that failed without a fault: on a "
          "loaded machine (see the load average above), callouts over `timeout_ms` (250 ms) "
          "and the breaker they open.", "",
          "| delivery | callouts | timeouts | connect failures | 5xx answers | "
          "quota.unavailable |", "|---|---|---|---|---|---|"]
    for s in res["summary"]:
        c = s["callouts"]
        L.append(f"| {s['delivery']} | {c['requests']:,} | {c['timeouts']:,} | "
                 f"{c['connect_failures']:,} | {c['answers_5xx']:,} | "
                 f"{c['filter_quota_unavailable']:,} |")
    if res["quota_service_errors"]:
        L += ["", "The quota service's failed decisions (its log, all restarts): " + "; ".join(
            f"{n:,} × {k}" for k, n in sorted(res["quota_service_errors"].items(),
                                              key=lambda kv: -kv[1])) + "."]
    L += ["", "## Envoy memory", "", "VmRSS of every Envoy process, sampled each second (a "
          "new epoch starts low and grows to its working size).", "",
          "| delivery | RSS min | RSS max |", "|---|---|---|"]
    for d, v in m["by_delivery"].items():
        L.append(f"| {d} | {v['min_mib']:.1f} MiB | {v['max_mib']:.1f} MiB |")
    L += ["", "![Envoy RSS and request rates over the soak](soak.png)", "",
          "Raw figures: `target/soak/soak.json`."]
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


# ---------------------------------------------------------------------------------------------
# Main


def self_test():
    """Each check on made-up results: passes on clean ones, fails on each kind of breach
    (so a check that can never fail would show here). No process is started."""
    day = "2026-01-01"
    clean_run = {
        "delivery": "wasm", "exits": [], "stats": {"wasm.api_guard.vm_reload": 0},
        "logs": [{"epoch": 0, "text": "[warning][main] caught ENVOY_SIGTERM"}],
        "hook_outcomes": [["vw-0", "200"], ["fw-9", "401"], ["vw-1", "0"]],
        "faults": [{"name": n, "failed": False, "detail": ""} for n, _ in FAULTS],
        "traffic": [{"kind": k, "per_sec": {1: {"200": 5, "503": 2}}}
                    for k in ("api", "webhook", "public")],
    }
    clean_counts = {"api": [["w-capped-0-0", "capped", day, CAPPED_CAP],
                            ["w-daily-0-1", "daily", day, DAILY_LIMIT]],
                    "hooks": {"vw-0": 1}}

    def with_(base, **kw):
        return dict(json.loads(json.dumps(base)), **kw)
    cases = [
        ("clean", True, lambda: check_limits([clean_run], clean_counts, 600)),
        ("over a bucket", False, lambda: check_limits([clean_run], with_(clean_counts, api=[
            ["w-capped-0-0", "capped", day, CAPPED_CAP + 1]]), 600)),
        ("over a daily quota", False, lambda: check_limits([clean_run], with_(
            clean_counts, api=[["w-daily-0-1", "daily", day, DAILY_LIMIT + 1]]), 600)),
        ("forged at the upstream", False, lambda: check_limits([clean_run], with_(
            clean_counts, api=[["forged-w-1", "capped", day, 1]]), 600)),
        ("spoofed at the upstream", False, lambda: check_limits([clean_run], with_(
            clean_counts, api=[["spoofed-1", "daily", day, 1]]), 600)),
        ("clean", True, lambda: check_logs([clean_run])),
        ("panic in the log", False, lambda: check_logs([with_(clean_run, logs=[
            {"epoch": 1, "text": "[critical][wasm] wasm log api_guard: panicked at src/x.rs"}])])),
        ("VM reload counted", False, lambda: check_logs([with_(
            clean_run, stats={"wasm.api_guard.vm_reload": 1})])),
        ("Envoy exited", False, lambda: check_logs([with_(
            clean_run, exits=["envoy-wasm epoch 0 exited with -11"])])),
        ("clean", True, lambda: check_rss([[1, "wasm", 0, 100 * 1024]], 400)),
        ("over the RSS bound", False, lambda: check_rss([[1, "wasm", 0, 401 * 1024]], 400)),
        ("clean", True, lambda: check_webhooks([clean_run], clean_counts)),
        ("2xx delivery missing", False, lambda: check_webhooks([clean_run], with_(
            clean_counts, hooks={}))),
        ("delivery forwarded twice", False, lambda: check_webhooks([clean_run], with_(
            clean_counts, hooks={"vw-0": 2}))),
        ("refused delivery forwarded", False, lambda: check_webhooks([clean_run], with_(
            clean_counts, hooks={"vw-0": 1, "fw-9": 1}))),
        ("clean", True, lambda: check_traffic([clean_run])),
        ("a 500", False, lambda: check_traffic([with_(clean_run, traffic=[
            {"kind": "api", "per_sec": {1: {"200": 1, "500": 1}}}])])),
        ("nothing admitted", False, lambda: check_traffic([with_(clean_run, traffic=[
            {"kind": "api", "per_sec": {1: {"429": 1}}}])])),
        ("a fault missing", False, lambda: check_traffic([with_(clean_run, faults=[])])),
    ]
    bad = [f"{name}: expected {'pass' if want else 'fail'}" for name, want, fn in cases
           if fn()["ok"] != want]
    for b in bad:
        log(f"self-test: {b}")
    log(f"self-test: {len(cases) - len(bad)} of {len(cases)} cases as expected")
    return 1 if bad else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float,
                    default=float(os.environ.get("SOAK_SECONDS", "600")),
                    help="whole soak, split between the deliveries (default SOAK_SECONDS or 600)")
    ap.add_argument("--delivery", choices=["wasm", "native", "both"], default="both")
    ap.add_argument("--rss-bound-mib", type=float,
                    default=float(os.environ.get("SOAK_RSS_BOUND_MIB", "400")),
                    help="Envoy VmRSS bound (default SOAK_RSS_BOUND_MIB or 400; the memory "
                         "bench measured ~130 MiB wasm, ~80 MiB module at default tables)")
    ap.add_argument("--out", default=os.path.join(REPO, "docs"),
                    help="where soak.md and soak.png go")
    ap.add_argument("--json", default=os.path.join(REPO, "target/soak/soak.json"))
    ap.add_argument("--failure-mode", choices=["deny", "allow"], default="deny",
                    help="the route's quota failure_mode; `allow` is a negative control: "
                         "clients then pass their limits while the service is down, and "
                         "the limits check must fail")
    ap.add_argument("--from-json", metavar="SOAK_JSON",
                    help="only write soak.md and soak.png again from a run's JSON")
    ap.add_argument("--self-test", action="store_true",
                    help="run each check on made-up passing and failing results, and exit")
    ap.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve_upstream:
        return serve_upstream(a.serve_upstream)
    if a.self_test:
        return self_test()
    if a.from_json:
        res = json.load(open(a.from_json))
        report(res, os.path.join(a.out, "soak.md"))
        chart(res, os.path.join(a.out, "soak.png"))
        return 0 if res["ok"] else 1
    for need in (bench.ENVOY, bench.QUOTA_BIN):
        if not os.path.exists(need):
            sys.exit(f"{need} missing: `make build` (or `make soak`) builds it")
    for tool in ("wrk", "redis-server"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found: scripts/tools.sh wrk redis")
    deliveries = ["wasm", "native"] if a.delivery == "both" else [a.delivery]
    for d in deliveries:
        need = bench.WASM if d == "wasm" else os.path.join(bench.MODULE_DIR, "libapi_guard.so")
        if not os.path.exists(need):
            sys.exit(f"{need} missing: `make build`")
    per = a.seconds / len(deliveries)
    if per < 30:
        # The three faults take ~15 s (a hot restart alone ~PARENT_SHUTDOWN_S + DRAIN_S).
        sys.exit(f"at least 30 s per delivery, got {per:.0f} s (--seconds / deliveries)")

    work = tempfile.mkdtemp(prefix="api-guard-soak-")
    ctx = {"failure_mode": a.failure_mode}
    # Ctrl-C, SIGTERM, SIGHUP end the run through the finally below (SIGINT set explicitly:
    # a shell starts background jobs with it ignored).
    def interrupted(*_):
        raise KeyboardInterrupt()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    t_start = time.time()
    sampler = Sampler(t_start)
    runs = []
    try:
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        ev = subprocess.run([bench.ENVOY, "--version"], capture_output=True,
                            text=True).stdout.strip().split("version: ")[-1].split("/")
        versions = {
            "envoy": f"{ev[1]} ({ev[0][:9]})" if len(ev) > 1 else "?",
            "commit": subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                                     capture_output=True, text=True).stdout.strip(),
        }
        load0 = open("/proc/loadavg").read().split()[:3]
        ctx["redis"] = Redis(work)
        ctx["quota"] = Quota(work, ctx["redis"].url())
        ctx["upstream"] = Upstream(work)
        sampler.start()
        ip_offset = 0
        for d in deliveries:
            r = run_delivery(d, per, work, ctx, sampler, t_start, ip_offset)
            ip_offset += next(t["sent"] for t in r["traffic"] if t["kind"] == "public") + 64
            runs.append(r)
        counts = ctx["upstream"].counts()
        quota_errors = quota_log_errors(ctx["quota"].log)
        sampler.stop_ev.set()
        wall = time.time() - t_start
        checks = {
            "limits": check_limits(runs, counts, wall),
            "logs": check_logs(runs),
            "memory": check_rss(sampler.samples, a.rss_bound_mib),
            "webhooks": check_webhooks(runs, counts),
            "traffic": check_traffic(runs),
        }
        res = {
            "started": started, "seconds": a.seconds, "wall_s": round(wall, 1),
            "failure_mode": a.failure_mode, "quota_service_errors": quota_errors,
            "versions": versions,
            "loadavg_before": load0, "loadavg_after": open("/proc/loadavg").read().split()[:3],
            "ok": all(c["ok"] for c in checks.values()), "checks": checks,
            "summary": summarize(runs, counts, sampler.samples, t_start),
            "distinct_ips": ip_offset - 64 * len(runs),
            "rss_samples": sampler.samples,
            "rates": rates(runs, counts, t_start),
            "runs": [{k: v for k, v in r.items()
                      if k not in ("logs", "hook_outcomes", "traffic")} | {
                "traffic": [{k: v for k, v in t.items() if k != "per_sec"} | {
                    "per_sec": {int(sec) - int(t_start): st
                                for sec, st in sorted(t["per_sec"].items())}}
                    for t in r["traffic"]]} for r in runs],
        }
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
        os.makedirs(a.out, exist_ok=True)
        report(res, os.path.join(a.out, "soak.md"))
        try:
            chart(res, os.path.join(a.out, "soak.png"))
        except ImportError:
            log("matplotlib missing: no chart (make soak installs it into .tools/py)")
        for name, c in checks.items():
            log(f"check {name}: {'pass' if c['ok'] else 'FAIL'}"
                + "".join(f"\n    {p}" for p in c["problems"]))
        log(f"report: {os.path.join(a.out, 'soak.md')}, raw: {a.json}")
        failed = [n for n, c in checks.items() if not c["ok"]]
        log("soak: PASS" if not failed else f"soak: FAIL ({', '.join(failed)})")
        return 0 if res["ok"] else 1
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        return 130
    finally:
        sampler.stop_ev.set()
        if "envoy" in ctx:
            ctx["envoy"].stop()
        for name in ("upstream", "quota", "redis"):
            if name in ctx:
                (ctx[name].p if name != "redis" else ctx[name]).stop()
        keep_logs(work, os.path.join(os.path.dirname(os.path.abspath(a.json)), "logs"))
        shutil.rmtree(work, ignore_errors=True)


def quota_log_errors(path):
    """The quota service's failed decisions by reason (its log, over all its restarts):
    e.g. "store unavailable: Connection refused" while Redis is down, "store did not answer
    within 250 ms" when Redis is slow."""
    out = {}
    try:
        for line in open(path, errors="replace"):
            m = re.search(r"(lease|check|release) failed .*error=(.*)$", line)
            if m:
                reason = re.sub(r"\(os error \d+\)", "", m.group(2)).strip()
                key = f"{m.group(1)}: {reason}"
                out[key] = out.get(key, 0) + 1
    except OSError:
        pass
    return out


def keep_logs(work, dest):
    """Every process's log (Envoy per delivery and epoch, quota service, Redis, wrk outputs)
    next to the JSON, for a look after a failure."""
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest, exist_ok=True)
    for root, _, files in os.walk(work):
        for f in files:
            if f.endswith((".log", ".wrk.txt")):
                rel = os.path.relpath(os.path.join(root, f), work).replace(os.sep, "-")
                shutil.copy(os.path.join(root, f), os.path.join(dest, rel))


if __name__ == "__main__":
    sys.exit(main())
