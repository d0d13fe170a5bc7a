#!/usr/bin/env bash
# `make run`: the demo upstream, then Envoy with the api-guard filter; Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
ENVOY_BIN="${ENVOY_BIN:-$PWD/.tools/envoy/envoy/_bin/envoy}"
mkdir -p .run
pids=()
cleanup() {
  trap - EXIT INT TERM
  echo
  echo "==> stopping the demo"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

for port in 8080 8081 9901; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "error: 127.0.0.1:$port is already in use (another demo running?)" >&2
    exit 1
  fi
done

echo "==> starting the demo upstream on 127.0.0.1:8081"
target/release/api-guard demo-upstream --listen 127.0.0.1:8081 >.run/upstream.log 2>&1 &
pids+=($!)

echo "==> starting Envoy on 127.0.0.1:8080 (log: .run/envoy.log, admin: 127.0.0.1:9901)"
"$ENVOY_BIN" -c envoy/demo.yaml --concurrency 2 --disable-hot-restart >.run/envoy.log 2>&1 &
envoy_pid=$!
pids+=("$envoy_pid")

deadline=$((SECONDS + 60))
until curl -fsS --noproxy '*' -o /dev/null http://127.0.0.1:9901/ready 2>/dev/null; do
  if ! kill -0 "$envoy_pid" 2>/dev/null; then
    echo "error: Envoy exited; last log lines:" >&2
    tail -20 .run/envoy.log >&2
    exit 1
  fi
  if [ $SECONDS -ge $deadline ]; then echo "error: Envoy not ready after 60 s" >&2; exit 1; fi
  sleep 0.2
done

cat <<'TXT'

api-guard demo is ready. Try (copy-paste):

  # a public route: proxied, with security headers added
  curl -i http://127.0.0.1:8080/healthz

  # an ambiguous path: refused with 400 and a JSON error
  curl -i 'http://127.0.0.1:8080/api/orders%2F..%2Fadmin'

  # identity headers sent by a client are stripped before the upstream sees them
  curl -s http://127.0.0.1:8080/public/x -H 'x-auth-subject: admin'

  # the filter's counters
  curl -s http://127.0.0.1:9901/stats | grep api_guard

Press Ctrl-C to stop.
TXT
wait "$envoy_pid"
