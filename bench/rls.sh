#!/usr/bin/env bash
# Rate limit service case of `make bench` (loopback only, bounded):
#   1. ShouldRateLimit decisions/s and p50/p99 over gRPC, in-memory store and Redis, beside
#      POST /v1/check on the same service (same store, same load shape: 16 connections);
#   2. Envoy (1 worker) with its NATIVE envoy.filters.http.ratelimit filter against the
#      service on Redis vs the same route without rate_limits: req/s and latency (wrk).
# Needs: target/release/api-guard-quota, target/release/examples/{rls_load,check_load},
# target/release/api-guard (demo upstream), Envoy (.tools or $ENVOY_BIN), redis-server, wrk.
# BENCH_SECS seconds per run (default 5). `--json FILE` also writes the figures as JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
JSON_OUT=""
if [ "${1:-}" = "--json" ]; then JSON_OUT="$2"; fi
ENVOY_BIN="${ENVOY_BIN:-$PWD/.tools/envoy/envoy/_bin/envoy}"
SECS="${BENCH_SECS:-5}"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT INT TERM
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

for f in target/release/api-guard-quota target/release/api-guard target/release/examples/rls_load target/release/examples/check_load; do
  [ -x "$f" ] || { echo "missing $f: cargo build --release --workspace --bins && cargo build --release -p api-guard-quota --example rls_load --example check_load" >&2; exit 1; }
done

# Limits far above what the load reaches, so every call does the full decision (store
# round trip, script) and none is short-circuited by a denial.
mkdir -p "$work/rls"
cat >"$work/rls/bench.yaml" <<'YAML'
domain: bench
descriptors:
  - key: remote_address
    rate_limit: {unit: second, requests_per_unit: 1000000000}
  - key: generic_key
    value: api
    rate_limit: {unit: minute, requests_per_unit: 1000000000000}
YAML
cat >"$work/quota.toml" <<'TOML'
[tiers.bench]
limit = { capacity = 100000000, refill_tokens = 100000000, refill_period_s = 1 }
daily = { limit = 1000000000000, policy = "overage" }
TOML
RP=$(port); MH=$(port); MG=$(port); RH=$(port); RG=$(port); UP=$(port); EP=$(port); AP=$(port)
redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no >"$work/redis.log" 2>&1 & pids+=($!)
target/release/api-guard-quota --config "$work/quota.toml" --listen "127.0.0.1:$MH" \
  --rls-listen "127.0.0.1:$MG" --rls-config "$work/rls" >"$work/qm.log" 2>&1 & pids+=($!)
wait_port "$RP"
target/release/api-guard-quota --config "$work/quota.toml" --listen "127.0.0.1:$RH" \
  --rls-listen "127.0.0.1:$RG" --rls-config "$work/rls" --redis "redis://127.0.0.1:$RP" >"$work/qr.log" 2>&1 & pids+=($!)
target/release/api-guard demo-upstream --listen "127.0.0.1:$UP" >"$work/up.log" 2>&1 & pids+=($!)
wait_port "$MG"; wait_port "$RG"; wait_port "$UP"

echo "== ShouldRateLimit (gRPC, 2 descriptors) vs POST /v1/check, 16 connections, ${SECS}s each"
rls_mem=$(target/release/examples/rls_load "127.0.0.1:$MG" "$SECS" 16)
echo "memory store, ShouldRateLimit: $rls_mem"
chk_mem=$(target/release/examples/check_load "http://127.0.0.1:$MH" "$SECS" 16)
echo "memory store, /v1/check:       $chk_mem"
rls_redis=$(target/release/examples/rls_load "127.0.0.1:$RG" "$SECS" 16)
echo "redis store,  ShouldRateLimit: $rls_redis"
chk_redis=$(target/release/examples/check_load "http://127.0.0.1:$RH" "$SECS" 16)
echo "redis store,  /v1/check:       $chk_redis"

python3 - "$work/envoy.json" "$EP" "$AP" "$UP" "$RG" <<'PY'
import json, sys
out, ep, ap, up, rg = sys.argv[1:]
def cluster(name, port, h2=False):
    c = {"name": name, "type": "STATIC", "connect_timeout": "1s",
         "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
             "address": {"socket_address": {"address": "127.0.0.1", "port_value": int(port)}}}}]}]}}
    if h2:
        c["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}
    return c
limits = [{"actions": [{"remote_address": {}}]},
          {"actions": [{"generic_key": {"descriptor_value": "api"}}]}]
cfg = {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": int(ap)}}},
  "static_resources": {"listeners": [{"name": "in", "address": {"socket_address": {"address": "127.0.0.1", "port_value": int(ep)}},
    "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
      "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
      "stat_prefix": "in", "use_remote_address": True,
      "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
          {"match": {"prefix": "/rl"}, "route": {"cluster": "upstream", "rate_limits": limits}},
          {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}]}]},
      "http_filters": [
        {"name": "envoy.filters.http.ratelimit", "typed_config": {
          "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
          "domain": "bench", "failure_mode_deny": False, "timeout": "1s",
          "rate_limit_service": {"transport_api_version": "V3",
                                 "grpc_service": {"envoy_grpc": {"cluster_name": "rls"}}}}},
        {"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]}],
    "clusters": [cluster("upstream", up), cluster("rls", rg, True)]}}
json.dump(cfg, open(out, "w"))
PY
"$ENVOY_BIN" -c "$work/envoy.json" --concurrency 1 --disable-hot-restart -l warning >"$work/envoy.log" 2>&1 & pids+=($!)
wait_port "$EP"
for _ in $(seq 1 100); do curl -fsS -o /dev/null "http://127.0.0.1:$AP/ready" 2>/dev/null && break; sleep 0.1; done

echo "== Envoy (1 worker) + native ratelimit filter -> api-guard-quota (Redis), wrk -t1 -c16 -d${SECS}s, two rounds"
rounds=()
for round in 1 2; do
  for path in /plain /rl; do
    r=$(wrk -t1 -c16 -d"${SECS}s" --latency "http://127.0.0.1:$EP$path" 2>&1)
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$r")
    p50=$(awk '$1=="50%" {print $2}' <<<"$r"); p99=$(awk '$1=="99%" {print $2}' <<<"$r")
    non2xx=$(awk '/Non-2xx/ {print $4}' <<<"$r")
    label=$([ "$path" = /rl ] && echo "with rate limit service" || echo "without rate limits    ")
    echo "round $round $label: $rps req/s  p50 $p50  p99 $p99  non-2xx ${non2xx:-0}"
    rounds+=("$round $path $rps $p50 $p99")
  done
done
# The filter really called the service (not failure_mode_deny=false letting everything by).
errs=$(curl -fsS "http://127.0.0.1:$AP/stats" | awk -F': ' '/ratelimit.error:/ {s+=$2} END {print s+0}')
oks=$(curl -fsS "http://127.0.0.1:$AP/stats" | awk -F': ' '/ratelimit.ok:/ {s+=$2} END {print s+0}')
echo "envoy ratelimit.ok $oks, ratelimit.error $errs"

if [ -n "$JSON_OUT" ]; then
  printf '%s\n' "${rounds[@]}" >"$work/rounds.txt"
  python3 - "$JSON_OUT" "$SECS" "$rls_mem" "$chk_mem" "$rls_redis" "$chk_redis" "$work/rounds.txt" "$oks" "$errs" <<'PY'
import json, re, sys
out, secs, rls_mem, chk_mem, rls_redis, chk_redis, rounds, oks, errs = sys.argv[1:]
def load(line):
    num = lambda pat: int(float(re.search(pat, line).group(1)))
    return {"decisions_per_s": num(r"decisions/s ([\d.]+)"), "p50_us": num(r"p50 (\d+) us"),
            "p99_us": num(r"p99 (\d+) us"), "errors": num(r"(\d+) errors")}
envoy = []
for line in open(rounds).read().split("\n"):
    if line.strip():
        rnd, path, rps, p50, p99 = (line.split() + [""] * 5)[:5]
        envoy.append({"round": int(rnd), "rate_limited_route": path == "/rl", "rps": float(rps or 0),
                      "p50": p50, "p99": p99})
json.dump({"seconds": int(secs),
           "memory": {"should_rate_limit": load(rls_mem), "v1_check": load(chk_mem)},
           "redis": {"should_rate_limit": load(rls_redis), "v1_check": load(chk_redis)},
           "envoy_native_filter": envoy, "envoy_ratelimit_ok": int(oks), "envoy_ratelimit_error": int(errs)},
          open(out, "w"), indent=1)
PY
  echo "wrote $JSON_OUT"
fi
