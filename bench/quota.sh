#!/usr/bin/env bash
# Quota case of `make bench` (loopback only, bounded):
#   1. decisions/s and p50/p99 of POST /v1/check, in-memory store and Redis;
#   2. the filter's added latency per request with the callout: wrk through Envoy on a route
#      with `"quota": true` vs the same route without it.
# Needs: target/release/{api-guard,api-guard-quota}, target/release/examples/check_load,
# the .wasm, Envoy (.tools or $ENVOY_BIN), redis-server, wrk. `make bench` builds/installs them.
# `--json FILE` also writes the figures as JSON (bench/run.sh merges them into
# docs/benchmarks.json and the report with `bench.py --add-quota FILE`).
set -euo pipefail
cd "$(dirname "$0")/.."
JSON_OUT=""
if [ "${1:-}" = "--json" ]; then JSON_OUT="$2"; fi
ENVOY_BIN="${ENVOY_BIN:-$PWD/.tools/envoy/envoy/_bin/envoy}"
SECS="${BENCH_SECS:-5}"
WASM="$PWD/target/wasm32-wasip1/release/api_guard.wasm"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT INT TERM
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

cat >"$work/quota.toml" <<'TOML'
[tiers.anonymous]
limit = { capacity = 100000000, refill_tokens = 100000000, refill_period_s = 1 }
daily = { limit = 1000000000000, policy = "overage" }
[tiers.bench]
limit = { capacity = 100000000, refill_tokens = 100000000, refill_period_s = 1 }
daily = { limit = 1000000000000, policy = "overage" }
TOML
RP=$(port); MP=$(port); QP=$(port); UP=$(port); EP=$(port); AP=$(port)
redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no >"$work/redis.log" 2>&1 & pids+=($!)
target/release/api-guard-quota --config "$work/quota.toml" --listen "127.0.0.1:$MP" >"$work/qm.log" 2>&1 & pids+=($!)
wait_port "$RP"
target/release/api-guard-quota --config "$work/quota.toml" --listen "127.0.0.1:$QP" --redis "redis://127.0.0.1:$RP" >"$work/qr.log" 2>&1 & pids+=($!)
target/release/api-guard demo-upstream --listen "127.0.0.1:$UP" >"$work/up.log" 2>&1 & pids+=($!)
wait_port "$MP"; wait_port "$QP"; wait_port "$UP"

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
echo "== /v1/check, 16 connections, ${SECS}s (load generator on the same cores)"
mem_line=$(target/release/examples/check_load "http://127.0.0.1:$MP" "$SECS" 16)
echo "memory store: $mem_line"
redis_line=$(target/release/examples/check_load "http://127.0.0.1:$QP" "$SECS" 16)
echo "redis store:  $redis_line"
# The services' resident memory after the load (pids: redis, memory-store service, Redis-backed one).
mem_rss=$(rss_kib "${pids[1]}"); redis_svc_rss=$(rss_kib "${pids[2]}"); redis_rss=$(rss_kib "${pids[0]}")

filter=$(python3 - <<PY
import json
print(json.dumps({"quota": {"cluster": "quota", "timeout_ms": 200, "failure_mode": "allow"},
  "routes": [{"name": "q", "match": {"prefix": "/q"}, "quota": True},
             {"name": "p", "match": {"prefix": "/p"}}]}))
PY
)
python3 - "$work/envoy.json" "$EP" "$AP" "$UP" "$QP" "$WASM" "$filter" <<'PY'
import json, sys
out, ep, ap, up, qp, wasm, filt = sys.argv[1:]
def cluster(name, port):
    return {"name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": int(port)}}}}]}]}}
cfg = {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": int(ap)}}},
  "static_resources": {"listeners": [{"name": "in", "address": {"socket_address": {"address": "127.0.0.1", "port_value": int(ep)}},
    "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
      "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
      "stat_prefix": "in", "use_remote_address": True,
      "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
          {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}]}]},
      "http_filters": [
        {"name": "envoy.filters.http.wasm", "typed_config": {
          "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
          "config": {"name": "api_guard", "root_id": "api_guard",
            "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": filt},
            "vm_config": {"vm_id": "api_guard", "runtime": "envoy.wasm.runtime.v8", "code": {"local": {"filename": wasm}}}}}},
        {"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]}],
    "clusters": [cluster("upstream", up), cluster("quota", qp)]}}
json.dump(cfg, open(out, "w"))
PY
"$ENVOY_BIN" -c "$work/envoy.json" --concurrency 1 --disable-hot-restart -l warning >"$work/envoy.log" 2>&1 & pids+=($!)
wait_port "$EP"
for _ in $(seq 1 100); do curl -fsS -o /dev/null "http://127.0.0.1:$AP/ready" 2>/dev/null && break; sleep 0.1; done

echo "== Envoy (1 worker) + api-guard, wrk -t1 -c16 -d${SECS}s, quota service on Redis, two rounds"
rounds=()
for round in 1 2; do
  for path in /p /q; do
    r=$(wrk -t1 -c16 -d"${SECS}s" --latency "http://127.0.0.1:$EP$path" 2>&1)
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$r")
    p50=$(awk '$1=="50%" {print $2}' <<<"$r"); p99=$(awk '$1=="99%" {print $2}' <<<"$r")
    label=$([ "$path" = /q ] && echo "with quota callout" || echo "without quota    ")
    echo "round $round $label: $rps req/s  p50 $p50  p99 $p99"
    rounds+=("$round $path $rps $p50 $p99")
  done
done

if [ -n "$JSON_OUT" ]; then
  printf '%s\n' "${rounds[@]}" >"$work/rounds.txt"
  python3 - "$JSON_OUT" "$SECS" "$mem_line" "$redis_line" "$mem_rss" "$redis_svc_rss" \
      "$redis_rss" "$(redis-server --version | awk '{print $3}')" "$work/rounds.txt" <<'PY'
import json, re, sys
out, secs, mem_line, redis_line, mem_rss, svc_rss, redis_rss, redis_ver, rounds = sys.argv[1:]
redis_ver = redis_ver.removeprefix("v=")

def check(line):
    # check_load: "decisions/s N  p50 N us  p99 N us  max N us  (N ok, N errors, N s, N connections)"
    num = lambda pat: int(float(re.search(pat, line).group(1)))
    return {"decisions_per_s": num(r"decisions/s ([\d.]+)"), "p50_us": num(r"p50 (\d+) us"),
            "p99_us": num(r"p99 (\d+) us"), "max_us": num(r"max (\d+) us"),
            "ok": num(r"\((\d+) ok"), "errors": num(r"(\d+) errors"),
            "connections": num(r"(\d+) connections")}

def us(v):
    # wrk latencies: "512.00us", "1.23ms", "2.00s"
    m = re.match(r"([\d.]+)(us|ms|s)$", v or "")
    if not m:
        return None
    return float(m.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6}[m.group(2)]

envoy = []
for line in open(rounds).read().split("\n"):
    if not line.strip():
        continue
    rnd, path, rps, p50, p99 = (line.split() + [""] * 5)[:5]
    envoy.append({"round": int(rnd), "quota": path == "/q", "rps": float(rps or 0),
                  "p50_us": us(p50), "p99_us": us(p99)})
res = {"seconds": int(secs), "redis": redis_ver,
       "memory": dict(check(mem_line), rss_kib=int(mem_rss or 0)),
       "redis_store": dict(check(redis_line), rss_kib=int(svc_rss or 0),
                           redis_rss_kib=int(redis_rss or 0)),
       "envoy": envoy}
with open(out, "w") as f:
    json.dump(res, f, indent=1)
PY
  echo "wrote $JSON_OUT"
fi
