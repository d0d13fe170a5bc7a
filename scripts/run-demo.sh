#!/usr/bin/env bash
# `make run`: the demo upstream, the quota service (in-memory store), then Envoy with the
# api-guard filter; Ctrl-C stops all three.
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

for port in 8080 8081 8082 9901; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "error: 127.0.0.1:$port is already in use (another demo running?)" >&2
    exit 1
  fi
done

echo "==> starting the demo upstream on 127.0.0.1:8081"
target/release/api-guard demo-upstream --listen 127.0.0.1:8081 >.run/upstream.log 2>&1 &
pids+=($!)

# The example quota config reads its admin token from the environment.
export QUOTA_ADMIN_TOKEN="${QUOTA_ADMIN_TOKEN:-demo-admin-token-change-me}"
echo "==> starting api-guard-quota on 127.0.0.1:8082 (in-memory store, quota/quota.example.toml)"
target/release/api-guard-quota --config quota/quota.example.toml --listen 127.0.0.1:8082 \
  >.run/quota.log 2>&1 &
quota_pid=$!
pids+=("$quota_pid")
deadline=$((SECONDS + 30))
until grep -q "api-guard-quota ready" .run/quota.log 2>/dev/null; do
  if ! kill -0 "$quota_pid" 2>/dev/null; then
    echo "error: api-guard-quota exited; its log:" >&2
    cat .run/quota.log >&2
    exit 1
  fi
  if [ $SECONDS -ge $deadline ]; then echo "error: api-guard-quota not ready after 30 s" >&2; exit 1; fi
  sleep 0.2
done

# DELIVERY=native (`make run DELIVERY=native`): the same filter as a dynamic module.
case "${DELIVERY:-wasm}" in
  native)
    config=envoy/demo-native.yaml
    # Envoy finds libapi_guard.so here; the module reads {"env": ...} secrets from Envoy's
    # own environment (the wasm demo sets them in its vm_config instead).
    export ENVOY_DYNAMIC_MODULES_SEARCH_PATH="$PWD/target/release"
    export DEMO_GITHUB_WEBHOOK_SECRET="${DEMO_GITHUB_WEBHOOK_SECRET:-demo-webhook-secret}"
    ;;
  wasm) config=envoy/demo.yaml ;;
  *) echo "error: DELIVERY must be wasm or native, not '$DELIVERY'" >&2; exit 1 ;;
esac
echo "==> starting Envoy on 127.0.0.1:8080 with $config (log: .run/envoy.log, admin: 127.0.0.1:9901)"
"$ENVOY_BIN" -c "$config" --concurrency 2 --disable-hot-restart >.run/envoy.log 2>&1 &
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

  # 1. A public route: proxied to the echo upstream, security headers added
  curl -i http://127.0.0.1:8080/healthz

  # 2. An ambiguous path: refused with 400 and a JSON error, never forwarded
  curl -i 'http://127.0.0.1:8080/api/orders%2F..%2Fadmin'

  # 3. No credentials on a protected route: 401 missing_credentials
  curl -i http://127.0.0.1:8080/api/orders

  # 4. An API key: the upstream sees the verified identity (x-auth-client: demo-pro)
  curl -s http://127.0.0.1:8080/api/orders -H 'x-api-key: demo-key-pro'

  # 5. A JWT minted with the demo key (demo only: envoy/demo-jwt-key.json is public)
  TOKEN=$(target/release/api-guard token --alg ES256 --key envoy/demo-jwt-key.json \
    --iss https://auth.demo.local --aud https://api.demo.local --scope read:orders \
    --claim tenant_id=t-42)
  curl -s http://127.0.0.1:8080/api/orders -H "authorization: Bearer $TOKEN"
  #    ...the same token may not write: 403 insufficient_scope
  curl -i -X POST http://127.0.0.1:8080/api/orders -H "authorization: Bearer $TOKEN"

  # 6. Rate limiting: 5 logins per minute per IP, then 429 with retry-after
  for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{http_code} ' -X POST http://127.0.0.1:8080/auth/login; done; echo
  curl -si -X POST http://127.0.0.1:8080/auth/login | grep -i -E '^(ratelimit|retry-after)'

  # 7. A signed GitHub webhook (secret: demo-webhook-secret); change the body and it is 401
  BODY='{"zen":"Keep it logically awesome."}'
  SIG=$(printf '%s' "$BODY" | openssl dgst -sha256 -hmac demo-webhook-secret | sed 's/^.* //')
  curl -i http://127.0.0.1:8080/webhooks/github -H "x-hub-signature-256: sha256=$SIG" --data "$BODY"

  # 8. CORS: a preflight from an allowed origin is answered by the filter (204); a look-alike
  #    origin gets 403 cors_rejected with no access-control-* headers.
  curl -si -X OPTIONS http://127.0.0.1:8080/api/orders -H 'origin: http://localhost:3000' \
    -H 'access-control-request-method: GET' -H 'access-control-request-headers: authorization'
  curl -si -X OPTIONS http://127.0.0.1:8080/api/orders -H 'origin: https://shop.example.com.evil.com' \
    -H 'access-control-request-method: GET'

  # 9. Quotas and global limits: /api/orders asks api-guard-quota after the local limits.
  #    Usage per client (admin API), and the service's metrics:
  QUOTA_ADMIN_TOKEN=demo-admin-token-change-me   # make run's default; set it before make run to change
  curl -s http://127.0.0.1:8082/v1/clients/demo-pro/usage -H "authorization: Bearer $QUOTA_ADMIN_TOKEN"
  curl -s http://127.0.0.1:8082/metrics | grep -E '^api_guard_quota_decisions'

  # 10. Counters per outcome, and one JSON log line per denial
  curl -s http://127.0.0.1:9901/stats | grep api_guard
  grep api_guard.deny .run/envoy.log | tail -3

TXT
echo "Press Ctrl-C to stop."
wait "$envoy_pid"
