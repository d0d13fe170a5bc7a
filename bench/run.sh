#!/usr/bin/env bash
# `make bench`: api-guard beside Envoy's native filters, on loopback, a few minutes.
# Expects `make build` done (the Makefile's bench target does it). Installs what it needs:
# wrk (Debian), matplotlib (PyPI, into .tools/py), and builds the two bench helpers
# (a no-op wasm filter, a JWT minting tool) into target/bench.
# Arguments go to bench/bench.py (e.g. --only plain,ag-cors,native-cors --seconds 2);
# BENCH_SECONDS, BENCH_ROUNDS, BENCH_FR_ROUNDS, BENCH_RATE, BENCH_ONLY, BENCH_NICE too.
# Then bench/quota.sh (the quota service's /v1/check against memory and Redis; BENCH_SECS
# seconds per run, BENCH_QUOTA=0 skips it), whose figures join the report, and bench/rls.sh
# (ShouldRateLimit over gRPC, and Envoy's native ratelimit filter against the service beside
# the same Envoy without it; target/bench/rls.json, merged into the report too), and
# bench/memory.py (Envoy's RSS under 1M client IPs and 100k clients; BENCH_MEMORY=0 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

scripts/tools.sh wasm envoy wrk redis
command -v openssl >/dev/null || { echo "openssl is needed (apt-get install openssl)" >&2; exit 1; }

PY="$PWD/.tools/py"
if ! PYTHONPATH="$PY" python3 -c 'import matplotlib' 2>/dev/null; then
  say "installing matplotlib (PyPI) into .tools/py"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    --target "$PY" matplotlib
fi

if [ ! -f target/wasm32-wasip1/release/api_guard.wasm ]; then
  say "building the filter"
  cargo build --release --target wasm32-wasip1 --lib --config 'profile.release.panic="abort"'
fi
if [ ! -f target/release/libapi_guard.so ]; then
  say "building the dynamic module"
  cargo build --release --lib
fi
say "building the bench helpers (no-op wasm filter, bench-tokens)"
CARGO_TARGET_DIR="$PWD/target/bench" cargo build --quiet --release \
  --manifest-path bench/noop-filter/Cargo.toml --target wasm32-wasip1
CARGO_TARGET_DIR="$PWD/target/bench" cargo build --quiet --release \
  --manifest-path bench/tokens/Cargo.toml
if [ "${BENCH_QUOTA:-1}" != 0 ]; then
  say "building the quota service and its load generator"
  cargo build --quiet --release --workspace --bins
  cargo build --quiet --release -p api-guard-quota --example check_load --example rls_load
fi

say "running the benchmark"
# BENCH_NICE=-10 (as root) keeps other jobs on a shared machine from preempting the runs.
nice -n "${BENCH_NICE:-0}" python3 bench/bench.py "$@"
if [ "${BENCH_QUOTA:-1}" != 0 ]; then
  say "running the quota service bench (bench/quota.sh)"
  mkdir -p target/bench
  nice -n "${BENCH_NICE:-0}" bench/quota.sh --json target/bench/quota.json
  # --out follows bench.py's own (docs/ unless given).
  out=docs; prev=""
  for arg in "$@"; do [ "$prev" = --out ] && out="$arg"; prev="$arg"; done
  python3 bench/bench.py --out "$out" --add-quota target/bench/quota.json
  say "running the rate limit service bench (bench/rls.sh)"
  nice -n "${BENCH_NICE:-0}" bench/rls.sh --json target/bench/rls.json
  python3 bench/bench.py --out "$out" --add-rls target/bench/rls.json
fi
if [ "${BENCH_MEMORY:-1}" != 0 ]; then
  say "measuring Envoy's memory under 1M client IPs and 100k clients (bench/memory.py)"
  out=docs; prev=""
  for arg in "$@"; do [ "$prev" = --out ] && out="$arg"; prev="$arg"; done
  mkdir -p target/bench
  nice -n "${BENCH_NICE:-0}" python3 bench/memory.py --json target/bench/memory.json
  python3 bench/bench.py --out "$out" --add-memory target/bench/memory.json
fi
say "drawing docs/benchmarks.png"
PYTHONPATH="$PY" python3 bench/plot.py docs/benchmarks.json docs/benchmarks.png
say "done: docs/benchmarks.md, docs/benchmarks.png"
