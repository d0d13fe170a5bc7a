#!/usr/bin/env bash
# Rate limit service case of `make bench` (loopback only, bounded):
#   1. ShouldRateLimit decisions/s and p50/p99 over gRPC, in-memory store and Redis, beside
#      POST /v1/check on the same service (same store, same load shape: 16 connections);
#   2. one Envoy (1 worker), one listener per case, all forwarding to the same upstream (a
#      second Envoy answering 200 itself, as bench/bench.py does):
#        plain     no rate limit filter at all (the baseline);
#        rl        Envoy's NATIVE envoy.filters.http.ratelimit, route rate_limits with two
#                  descriptors, against the service's ShouldRateLimit on Redis;
#        ag-wasm   api-guard (.wasm) with "quota": true, against the service's /v1/check on
#        ag-module the same Redis; and the same through the dynamic module (.so). Each only
#                  when its artifact is built.
#      wrk -t1 -c16, interleaved rounds; the figure is each case's req/s over plain's.
# Needs: target/release/api-guard-quota, target/release/examples/{rls_load,check_load},
# Envoy (.tools or $ENVOY_BIN), redis-server, wrk; optionally the .wasm and libapi_guard.so.
# BENCH_SECS seconds per run (default 5), BENCH_ROUNDS rounds (default 2).
# `--json FILE` also writes the figures as JSON (bench.py --add-rls FILE puts them in
# docs/benchmarks.md).
#
# The upstream is an Envoy answering itself, as in bench.py. (This bench once used
# `api-guard demo-upstream`, which then wrote a keep-alive answer in two writes without
# TCP_NODELAY: Nagle held the body until Envoy's delayed ACK, ~40 ms, so every case measured
# 16 connections / 44 ms ≈ 360 req/s. src/echo.rs now writes once, with TCP_NODELAY.)
set -euo pipefail
cd "$(dirname "$0")/.."
JSON_OUT=""
if [ "${1:-}" = "--json" ]; then JSON_OUT="$2"; fi
ENVOY_BIN="${ENVOY_BIN:-$PWD/.tools/envoy/envoy/_bin/envoy}"
SECS="${BENCH_SECS:-5}"
ROUNDS="${BENCH_ROUNDS:-2}"
WASM="$PWD/target/wasm32-wasip1/release/api_guard.wasm"
MODULE="$PWD/target/release/libapi_guard.so"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT INT TERM
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

for f in target/release/api-guard-quota target/release/examples/rls_load target/release/examples/check_load; do
  [ -x "$f" ] || { echo "missing $f: cargo build --release -p api-guard-quota --bins --examples" >&2; exit 1; }
done
[ -x "$ENVOY_BIN" ] || { echo "missing Envoy ($ENVOY_BIN): scripts/tools.sh envoy" >&2; exit 1; }
command -v wrk >/dev/null || { echo "missing wrk: scripts/tools.sh wrk" >&2; exit 1; }
load_before=$(loadavg)
started=$(date -u '+%Y-%m-%d %H:%M UTC')

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
[tiers.anonymous]
limit = { capacity = 100000000, refill_tokens = 100000000, refill_period_s = 1 }
daily = { limit = 1000000000000, policy = "overage" }
[tiers.bench]
limit = { capacity = 100000000, refill_tokens = 100000000, refill_period_s = 1 }
daily = { limit = 1000000000000, policy = "overage" }
TOML
RP=$(port); MH=$(port); MG=$(port); RH=$(port); RG=$(port); UP=$(port); UA=$(port); AP=$(port)
P_PLAIN=$(port); P_RL=$(port); P_AGW=$(port); P_AGM=$(port)
redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no >"$work/redis.log" 2>&1 & pids+=($!)
target/release/api-guard-quota --config "$work/quota.toml" --listen "127.0.0.1:$MH" \
  --rls-listen "127.0.0.1:$MG" --rls-config "$work/rls" >"$work/qm.log" 2>&1 & pids+=($!)
wait_port "$RP"
target/release/api-guard-quota --config "$work/quota.toml" --listen "127.0.0.1:$RH" \
  --rls-listen "127.0.0.1:$RG" --rls-config "$work/rls" --redis "redis://127.0.0.1:$RP" >"$work/qr.log" 2>&1 & pids+=($!)
wait_port "$MG"; wait_port "$RG"; wait_port "$MH"; wait_port "$RH"

echo "== ShouldRateLimit (gRPC, 2 descriptors) vs POST /v1/check, 16 connections, ${SECS}s each"
rls_mem=$(target/release/examples/rls_load "127.0.0.1:$MG" "$SECS" 16)
echo "memory store, ShouldRateLimit: $rls_mem"
chk_mem=$(target/release/examples/check_load "http://127.0.0.1:$MH" "$SECS" 16)
echo "memory store, /v1/check:       $chk_mem"
rls_redis=$(target/release/examples/rls_load "127.0.0.1:$RG" "$SECS" 16)
echo "redis store,  ShouldRateLimit: $rls_redis"
chk_redis=$(target/release/examples/check_load "http://127.0.0.1:$RH" "$SECS" 16)
echo "redis store,  /v1/check:       $chk_redis"

cases="plain rl"
[ -f "$WASM" ] && cases="$cases ag-wasm" || echo "(no $WASM: api-guard wasm case skipped)"
[ -f "$MODULE" ] && cases="$cases ag-module" || echo "(no $MODULE: api-guard module case skipped)"
python3 - "$work" "$UP" "$UA" "$AP" "$RG" "$RH" "$WASM" "$P_PLAIN" "$P_RL" "$P_AGW" "$P_AGM" "$cases" <<'PY'
import json, os, sys
work, up, ua, ap, rg, rh, wasm, p_plain, p_rl, p_agw, p_agm, cases = sys.argv[1:]
cases = cases.split()
def addr(port):
    return {"socket_address": {"address": "127.0.0.1", "port_value": int(port)}}
def cluster(name, port, h2=False):
    c = {"name": name, "type": "STATIC", "connect_timeout": "1s",
         "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
             "address": addr(port)}}]}]}}
    if h2:  # gRPC: HTTP/2 to the rate limit service
        c["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}
    return c
router = {"name": "envoy.filters.http.router", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
def listener(name, port, filters, route):
    return {"name": name, "address": addr(port), "filter_chains": [{"filters": [{
        "name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": name, "use_remote_address": True,
            "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                {"match": {"prefix": "/"}, **route}]}]},
            "http_filters": filters + [router]}}]}]}
# The upstream: answers 200 itself (bench.py's upstream).
upstream = {"admin": {"address": addr(ua)}, "static_resources": {"listeners": [
    listener("up", up, [], {"direct_response": {"status": 200, "body": {"inline_string": "{\"ok\":true}\n"}}})]}}
json.dump(upstream, open(os.path.join(work, "upstream.json"), "w"))

to_upstream = {"route": {"cluster": "upstream", "timeout": "5s"}}
rate_limits = [{"actions": [{"remote_address": {}}]},
               {"actions": [{"generic_key": {"descriptor_value": "api"}}]}]
native_rl = {"name": "envoy.filters.http.ratelimit", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
    # Deny on a service error or timeout, so a broken call shows as non-2xx, not as speed.
    "domain": "bench", "failure_mode_deny": True, "timeout": "1s",
    "rate_limit_service": {"transport_api_version": "V3",
                           "grpc_service": {"envoy_grpc": {"cluster_name": "rls"}}}}}
guard = json.dumps({"quota": {"cluster": "quota", "timeout_ms": 1000, "failure_mode": "deny"},
                    "default_route": {"quota": True}})
ag_wasm = {"name": "envoy.filters.http.wasm", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
    "config": {"name": "api_guard", "root_id": "api_guard",
               "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": guard},
               "vm_config": {"vm_id": "api_guard", "runtime": "envoy.wasm.runtime.v8",
                             "code": {"local": {"filename": wasm}}}}}}
ag_module = {"name": "envoy.filters.http.dynamic_modules", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
    "dynamic_module_config": {"name": "api_guard", "do_not_close": True},
    "filter_name": "api_guard",
    "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": guard}}}
listeners = [listener("plain", p_plain, [], to_upstream),
             listener("rl", p_rl, [native_rl],
                      {"route": dict(to_upstream["route"], rate_limits=rate_limits)})]
if "ag-wasm" in cases:
    listeners.append(listener("agwasm", p_agw, [ag_wasm], to_upstream))
if "ag-module" in cases:
    listeners.append(listener("agmodule", p_agm, [ag_module], to_upstream))
proxy = {"admin": {"address": addr(ap)}, "static_resources": {"listeners": listeners,
    "clusters": [cluster("upstream", up), cluster("rls", rg, h2=True), cluster("quota", rh)]}}
json.dump(proxy, open(os.path.join(work, "proxy.json"), "w"))
PY
"$ENVOY_BIN" -c "$work/upstream.json" --concurrency 1 --disable-hot-restart -l warning >"$work/upstream.log" 2>&1 & pids+=($!)
ENVOY_DYNAMIC_MODULES_SEARCH_PATH="$(dirname "$MODULE")" "$ENVOY_BIN" -c "$work/proxy.json" \
  --concurrency 1 --disable-hot-restart -l warning >"$work/proxy.log" 2>&1 & pids+=($!)
envoy_pid=$!
wait_port "$UP"; wait_port "$P_PLAIN"
for _ in $(seq 1 100); do curl -fsS -o /dev/null "http://127.0.0.1:$AP/ready" 2>/dev/null && break; sleep 0.1; done

case_port() { case "$1" in plain) echo "$P_PLAIN" ;; rl) echo "$P_RL" ;; ag-wasm) echo "$P_AGW" ;; ag-module) echo "$P_AGM" ;; esac; }
case_label() {
  case "$1" in
    plain) echo "Envoy, no rate limit filter        " ;;
    rl) echo "native ratelimit -> ShouldRateLimit" ;;
    ag-wasm) echo "api-guard wasm quota -> /v1/check  " ;;
    ag-module) echo "api-guard module quota -> /v1/check" ;;
  esac
}
# Each case must do its work before it is timed: a 200 through it, and the calls it makes
# counted by Envoy (below, after the runs).
for c in $cases; do
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$(case_port "$c")/bench")
  [ "$code" = 200 ] || { echo "case $c answered $code before the runs; proxy log:" >&2; tail -20 "$work/proxy.log" >&2; exit 1; }
  wrk -t1 -c16 -d1s "http://127.0.0.1:$(case_port "$c")/bench" >/dev/null 2>&1 # warm-up (V8 tiers up, pools fill)
done

echo "== Envoy (1 worker) -> upstream Envoy, store Redis, wrk -t1 -c16 -d${SECS}s, $ROUNDS interleaved rounds"
: >"$work/rounds.txt"
cpu_ticks() { awk '{print $14 + $15}' "/proc/$envoy_pid/stat"; }
for round in $(seq 1 "$ROUNDS"); do
  for c in $cases; do
    t0=$(cpu_ticks)
    r=$(wrk -t1 -c16 -d"${SECS}s" --timeout 5s --latency "http://127.0.0.1:$(case_port "$c")/bench" 2>&1)
    t1=$(cpu_ticks)
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$r")
    total=$(awk '/requests in/ {print $1}' <<<"$r")
    p50=$(awk '$1=="50%" {print $2}' <<<"$r"); p99=$(awk '$1=="99%" {print $2}' <<<"$r")
    non2xx=$(awk '/Non-2xx/ {print $4}' <<<"$r"); sockerr=$(grep -c 'Socket errors' <<<"$r" || true)
    echo "round $round $(case_label "$c"): $rps req/s  p50 $p50  p99 $p99  non-2xx ${non2xx:-0}$([ "$sockerr" = 0 ] || echo "  $(grep 'Socket errors' <<<"$r")")"
    echo "$round $c $rps $p50 $p99 ${non2xx:-0} $total $((t1 - t0))" >>"$work/rounds.txt"
  done
done
load_after=$(loadavg)
curl -fsS "http://127.0.0.1:$AP/stats" >"$work/stats.txt"
envoy_stat() { awk -F': ' -v k="$1" '$1==k {print $2; f=1} END {if (!f) print 0}' "$work/stats.txt"; }

python3 - "$work" "$SECS" "$rls_mem" "$chk_mem" "$rls_redis" "$chk_redis" "$load_before" "$load_after" \
  "$started" "$(getconf CLK_TCK)" "$(envoy_stat cluster.rls.upstream_rq_total)" "$(envoy_stat cluster.upstream.ratelimit.ok)" \
  "$(envoy_stat cluster.upstream.ratelimit.error)" "$(envoy_stat cluster.upstream.ratelimit.over_limit)" \
  "$(envoy_stat cluster.upstream.ratelimit.failure_mode_allowed)" "$(envoy_stat http.rl.downstream_rq_completed)" \
  "$(envoy_stat cluster.quota.upstream_rq_2xx)" "$(envoy_stat http.agwasm.downstream_rq_completed)" \
  "$(envoy_stat http.agmodule.downstream_rq_completed)" "$(redis-server --version | awk '{print $3}')" \
  "${JSON_OUT:-}" "$(nice)" "$(envoy_stat cluster.rls.upstream_cx_total)" <<'PY'
import json, os, re, statistics, sys
(work, secs, rls_mem, chk_mem, rls_redis, chk_redis, load_before, load_after, started, clk,
 rls_calls, rl_ok, rl_err, rl_over, rl_allowed, rl_reqs, quota_2xx, agw_reqs, agm_reqs,
 redis_ver, json_out, nice, rls_conns) = sys.argv[1:]
def load(line):
    num = lambda pat: int(float(re.search(pat, line).group(1)))
    return {"decisions_per_s": num(r"decisions/s ([\d.]+)"), "p50_us": num(r"p50 (\d+) us"),
            "p99_us": num(r"p99 (\d+) us"), "max_us": num(r"max (\d+) us"),
            "errors": num(r"(\d+) errors"), "connections": num(r"(\d+) connections")}
def us(v):  # wrk latencies: "512.00us", "1.23ms", "2.00s"
    m = re.match(r"([\d.]+)(us|ms|s)$", v or "")
    return float(m.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6}[m.group(2)] if m else None
runs = []
for line in open(os.path.join(work, "rounds.txt")):
    rnd, case, rps, p50, p99, non2xx, total, ticks = line.split()
    total = int(total or 0)
    runs.append({"round": int(rnd), "case": case, "rps": float(rps or 0), "p50_us": us(p50),
                 "p99_us": us(p99), "non_2xx": int(non2xx), "requests": total,
                 "cpu_us_per_req": int(ticks) * 1e6 / int(clk) / total if total else None})
cases = list(dict.fromkeys(r["case"] for r in runs))
summary = {}
for c in cases:
    rs = [r for r in runs if r["case"] == c]
    med = lambda k: statistics.median([r[k] for r in rs if r[k] is not None] or [0])
    summary[c] = {"rps": med("rps"), "p50_us": med("p50_us"), "p99_us": med("p99_us"),
                  "cpu_us_per_req": med("cpu_us_per_req"),
                  "rps_min": min(r["rps"] for r in rs), "rps_max": max(r["rps"] for r in rs)}
base = summary.get("plain", {})
for c in cases:
    if c != "plain" and base.get("rps"):
        s = summary[c]
        # Per round too: the rounds are interleaved, so a round's ratio shares its load.
        s["ratio_per_round"] = [round(r["rps"] / b["rps"], 3) for r in runs if r["case"] == c
                                for b in runs if b["case"] == "plain" and b["round"] == r["round"] and b["rps"]]
        s["ratio"] = round(s["rps"] / base["rps"], 3)
        s["added_p50_us"] = s["p50_us"] - base["p50_us"]
        s["added_cpu_us_per_req"] = (s["cpu_us_per_req"] - base["cpu_us_per_req"]
                                     if s["cpu_us_per_req"] and base.get("cpu_us_per_req") else None)
        print(f"{c}: {s['rps']:.0f} req/s = {s['ratio']:.2f}x plain Envoy's {base['rps']:.0f} "
              f"(rounds: {', '.join(f'{x:.2f}' for x in s['ratio_per_round'])}), "
              f"p50 +{s['added_p50_us']:.0f} us"
              + (f", proxy CPU +{s['added_cpu_us_per_req']:.0f} us/request"
                 if s["added_cpu_us_per_req"] is not None else ""))
checks = {"rls_calls": int(rls_calls), "rls_connections": int(rls_conns), "ratelimit_ok": int(rl_ok), "ratelimit_error": int(rl_err),
          "ratelimit_over_limit": int(rl_over), "ratelimit_failure_mode_allowed": int(rl_allowed),
          "rl_requests": int(rl_reqs), "quota_2xx": int(quota_2xx),
          "ag_requests": int(agw_reqs) + int(agm_reqs)}
print(f"checks: native filter {checks['ratelimit_ok']} ok / {checks['ratelimit_error']} error / "
      f"{checks['ratelimit_over_limit']} over limit for {checks['rl_requests']} requests on its listener "
      f"({checks['rls_calls']} calls on {checks['rls_connections']} HTTP/2 connection(s) to the service); api-guard {checks['quota_2xx']} quota "
      f"callouts answered 2xx for {checks['ag_requests']} requests")
bad = [r for r in runs if r["non_2xx"]]
valid = True
# Requests still in flight when wrk stops (16 per run) may be counted on one side only.
slack = 16 * (max(r["round"] for r in runs) + 2)
if bad or checks["ratelimit_error"] or checks["ratelimit_ok"] + slack < checks["rl_requests"] \
        or (checks["ag_requests"] and checks["quota_2xx"] + slack < checks["ag_requests"]):
    valid = False
    print("WARNING: some requests were not decided by the service (see above): the figures "
          "do not measure what they claim", file=sys.stderr)
res = {"started": started, "seconds": int(secs), "rounds": max(r["round"] for r in runs),
       "redis": redis_ver.removeprefix("v="), "loadavg_before": load_before,
       "loadavg_after": load_after, "nice": int(nice), "cores": os.cpu_count(),
       "memory": {"should_rate_limit": load(rls_mem), "v1_check": load(chk_mem)},
       "redis_store": {"should_rate_limit": load(rls_redis), "v1_check": load(chk_redis)},
       "envoy": {"runs": runs, "summary": summary, "checks": checks, "valid": valid}}
if json_out:
    with open(json_out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {json_out}")
PY
