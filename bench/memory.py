#!/usr/bin/env python3
"""Envoy's memory under many distinct clients (issue 12's bound, `make bench` runs it).

One Envoy per delivery (wasm, dynamic module), 2 workers, the abuse-defence config: a
sliding-window and a token-bucket limit per client IP, a fixed daily window per client, and
the key-sharing table. wrk sends N_IPS requests, each from a new client address (trusted
`x-forwarded-for`) and with one of N_CLIENTS JWTs (HS256, one `sub` each), so every limit
table and the key-sharing table see 1M distinct IPs and 100k distinct keys. Envoy's RSS
(VmRSS) is sampled before, during and after; the report compares the growth with what the
tables were sized to take (docs/CONFIG.md, "Memory"), which does not depend on the number of
clients. Writes a JSON summary (--json) that `bench.py --add-memory` puts into
docs/benchmarks.md.

  python3 bench/memory.py --json target/bench/memory.json [--ips 1000000 --clients 100000]
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the Envoy launcher and config builders)

SECRET = b"memory-bench-hs256-secret-0123456789abcdef"
BIG = 1000000000


def b64u(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def hs256_tokens(n):
    head = b64u(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "mem"}).encode())
    out = []
    for i in range(n):
        body = b64u(json.dumps({"iss": bench.ISS, "aud": bench.AUD, "exp": bench.EXP,
                                "sub": f"client-{i:06d}"}).encode())
        mac = hmac.new(SECRET, f"{head}.{body}".encode(), hashlib.sha256).digest()
        out.append(f"{head}.{body}.{b64u(mac)}")
    return out


def config(slots, tracked):
    return {
        "client_ip": {"xff_trusted_hops": 1, "use_remote_address": True},
        "jwt_providers": {"main": {
            "issuer": bench.ISS, "audiences": [bench.AUD], "algorithms": ["HS256"],
            "local_jwks": {"keys": [{"kty": "oct", "kid": "mem", "alg": "HS256",
                                     "k": b64u(SECRET)}]}}},
        "rate_limit_table": {"slots": slots},
        "rate_limits": {
            "per-ip-sliding": {"key": ["ip"], "algorithm": "sliding_window", "limit": BIG,
                               "window_s": 60},
            "per-ip-bucket": {"key": ["ip"], "capacity": BIG, "refill_tokens": BIG,
                              "refill_period_s": 1},
            "per-client-day": {"key": ["client"], "algorithm": "fixed_window", "limit": BIG,
                               "window_s": 86400},
        },
        "abuse": {"key_sharing": {"max_distinct_ips": 20, "action": "log",
                                  "tracked_clients": tracked}},
        "default_route": {"auth": {"mode": "required", "methods": ["jwt:main"]},
                          "rate_limits": ["per-ip-sliding", "per-ip-bucket", "per-client-day"]},
    }


def bootstrap_2_workers(filters, upstream_port):
    return bench.bootstrap(filters, upstream_port=upstream_port)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def lua(tokens_path, ips):
    """wrk script: request k gets address 11.0.0.0 + k (11/8 is outside every exempt list)
    and token k mod N; each of wrk's threads takes its own residue class."""
    return f"""
tokens = {{}}
k = 0
step = 1
sent = 0
limit = {ips}
local threads = {{}}
local counter = 0
function setup(thread)
  thread:set("first", counter)
  counter = counter + 1
  table.insert(threads, thread)
end
function init(args)
  for l in io.lines("{tokens_path}") do tokens[#tokens + 1] = l end
  k = first
  step = {{STEP}}
end
function request()
  local a = 184549376 + (k % 16777216)
  local ip = string.format("%d.%d.%d.%d", math.floor(a / 16777216), math.floor(a / 65536) % 256,
                           math.floor(a / 256) % 256, a % 256)
  wrk.headers["x-forwarded-for"] = ip
  wrk.headers["authorization"] = "Bearer " .. tokens[(k % #tokens) + 1]
  k = k + step
  sent = sent + 1
  return wrk.format()
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('\\nMEM_JSON {{"requests":%d,"duration_us":%d,"errors":%d,"status_errors":%d}}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status))
end
"""


def guard_stats(admin):
    """The filter's counters that say whether the tables kept up (by name without Envoy's
    `wasmcustom.` / `dynamicmodulescustom.` prefix)."""
    body = bench.get_body(admin, "/stats?format=json&filter=api_guard")
    out = {}
    for s in json.loads(body).get("stats", []):
        name = s.get("name", "")
        if "value" in s and "api_guard." in name and name.endswith(
                (".allowed", ".untracked", ".contention", ".slot_pressure", ".over")):
            out[name[name.index("api_guard."):]] = s["value"]
    return out


def denied_total(admin):
    """Every `api_guard.denied.<code>` counter summed (absent counters count 0)."""
    body = bench.get_body(admin, "/stats?format=json&filter=api_guard.denied")
    return sum(s.get("value", 0) for s in json.loads(body).get("stats", [])
               if "api_guard.denied." in s.get("name", ""))


PROFILES = {"default": (16384, 4096), "sized": (1 << 20, 131072)}


def run_one(label, wrap, profile, args, work, upstream_port, tokens_path):
    slots, tracked = PROFILES[profile]
    cfg = bootstrap_2_workers([wrap(config(slots, tracked))], upstream_port)
    e = bench.Envoy(f"{label}-{profile}", cfg, work, concurrency=2)
    if e.error:
        raise RuntimeError(f"{label}: Envoy did not start: {e.error}")
    try:
        # One authenticated request first: every table exists once the filter has run.
        tok = open(tokens_path).readline().strip()
        for _ in range(4):
            bench.send(e.port, bench.Request(headers={"x-forwarded-for": "10.1.2.3"}), tok)
        time.sleep(1)
        start = rss_kib(e.proc.pid)
        samples = [(0.0, start)]
        stop = threading.Event()
        t0 = time.time()

        def sampler():
            while not stop.wait(1.0):
                samples.append((time.time() - t0, rss_kib(e.proc.pid)))
        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        threads = 2
        script = os.path.join(work, f"{label}.lua")
        with open(script, "w") as f:
            f.write(lua(tokens_path, args.ips).replace("{STEP}", str(threads)))
        # wrk has no request count: run for the time N requests take at the first second's
        # rate, in chunks, until N were sent.
        sent = 0
        errors = 0
        bad = 0
        chunk = 0
        while sent < args.ips:
            secs = 10
            out = subprocess.run(
                ["wrk", f"-t{threads}", f"-c{args.conns}", f"-d{secs}s", "--timeout", "5s",
                 "-s", script, f"http://127.0.0.1:{e.port}{bench.PATH}"],
                capture_output=True, text=True, timeout=secs + 60).stdout
            line = next((l for l in out.splitlines() if l.startswith("MEM_JSON ")), None)
            if line is None:
                raise RuntimeError(f"{label}: wrk gave no summary:\n{out}")
            r = json.loads(line[len("MEM_JSON "):])
            sent += r["requests"]
            errors += r["errors"]
            bad += r["status_errors"]
            chunk += 1
            # Next chunk continues past this one's addresses.
            with open(script, "w") as f:
                f.write(lua(tokens_path, args.ips).replace("{STEP}", str(threads))
                        .replace("k = first", f"k = first + {sent + threads * args.conns}"))
            bench.log(f"  {label}: {sent:,} requests, RSS {rss_kib(e.proc.pid) / 1024:.1f} MiB")
        elapsed = time.time() - t0
        stop.set()
        th.join()
        time.sleep(2)
        end = rss_kib(e.proc.pid)
        samples.append((time.time() - t0, end))
        res = {
            "label": label,
            "profile": profile,
            "slots": slots,
            "tracked": tracked,
            "requests": sent,
            "seconds": round(elapsed, 1),
            "socket_errors": errors,
            "non_2xx": bad,
            "rss_before_kib": start,
            "rss_peak_kib": max(s[1] for s in samples),
            "rss_after_kib": end,
            "samples": samples,
            "stats": guard_stats(e.admin),
            # api-guard's own denials, so a non-2xx is not mistaken for one (or missed).
            "denied": denied_total(e.admin),
        }
        if e.proc.poll() is not None:
            raise RuntimeError(f"{label}: Envoy exited during the run: {e.log_tail()}")
        return res
    finally:
        e.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ips", type=int, default=1000000, help="requests = distinct client IPs")
    ap.add_argument("--clients", type=int, default=100000, help="distinct JWT subjects")
    ap.add_argument("--profiles", default="default,sized",
                    help="default: the default table sizes (16384 slots per limit, 4096 "
                         "tracked clients); sized: tables sized for the run (1048576 slots, "
                         "131072 tracked clients)")
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--only", default="wasm,module")
    ap.add_argument("--json", default="target/bench/memory.json")
    a = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk not found: scripts/tools.sh wrk")
    work = tempfile.mkdtemp(prefix="api-guard-memory-")
    upstream = None

    def cleanup(*_):
        if upstream:
            upstream.stop()
        shutil.rmtree(work, ignore_errors=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        bench.log(f"minting {a.clients:,} HS256 tokens")
        tokens_path = os.path.join(work, "tokens.txt")
        with open(tokens_path, "w") as f:
            f.write("\n".join(hs256_tokens(a.clients)) + "\n")
        upstream = bench.Envoy("upstream", bench.upstream_bootstrap(), work)
        if upstream.error:
            sys.exit(f"upstream Envoy: {upstream.error}")
        runs = []
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        load0 = open("/proc/loadavg").read().split()[:3]
        for profile in a.profiles.split(","):
            for label, wrap in [("wasm", bench.api_guard), ("module", bench.api_guard_module)]:
                if label not in a.only.split(","):
                    continue
                bench.log(f"{label}, {profile} tables: {a.ips:,} requests from distinct IPs, "
                          f"{a.clients:,} clients")
                runs.append(run_one(label, wrap, profile, a, work, upstream.port, tokens_path))
        out = {"started": started, "loadavg_before": load0,
               "ips": a.ips, "clients": a.clients, "limits": 3, "loadavg": open("/proc/loadavg").read().split()[:3], "runs": runs}
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
        for r in runs:
            grow = (r["rss_after_kib"] - r["rss_before_kib"]) / 1024
            bench.log(f"{r['label']} ({r['profile']}): {r['requests']:,} requests in {r['seconds']} s, RSS "
                      f"{r['rss_before_kib'] / 1024:.1f} → {r['rss_after_kib'] / 1024:.1f} MiB "
                      f"(peak {r['rss_peak_kib'] / 1024:.1f}, {grow:+.1f} MiB), "
                      f"{r['non_2xx']} non-2xx, {r['socket_errors']} socket errors")
    finally:
        cleanup()


if __name__ == "__main__":
    main()
