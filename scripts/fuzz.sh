#!/usr/bin/env bash
# `make fuzz`: runs every cargo-fuzz target (fuzz/fuzz_targets/) for FUZZ_SECONDS each
# (default 60), one after another, and prints per target the executions per second and the
# coverage libFuzzer reached. Exits non-zero if any target crashed; the crashing input is in
# fuzz/artifacts/<target>/ (docs/FUZZING.md says what to do with it).
#   FUZZ_SECONDS=600 make fuzz            ten minutes per target
#   FUZZ_TARGETS="jwt cors" make fuzz     only these targets
#
# The project pins a stable toolchain; cargo-fuzz passes nightly-only flags (-Zsanitizer=...),
# which RUSTC_BOOTSTRAP=1 allows on stable. New inputs libFuzzer finds go to fuzz/target/
# (not committed); the committed seeds in fuzz/corpus/ are only read.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/tools.sh cargo_fuzz
export RUSTC_BOOTSTRAP=1
SECONDS_EACH="${FUZZ_SECONDS:-60}"
targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"

echo "==> building the fuzz targets (cargo fuzz build, address sanitizer)"
cargo fuzz build --features quota

work=fuzz/target/fuzz-work
mkdir -p "$work"
failed=()
rows=()
for t in $targets; do
  echo "==> fuzzing $t for ${SECONDS_EACH}s"
  mkdir -p "$work/corpus/$t" "fuzz/artifacts/$t"
  log="$work/$t.log"
  rc=0
  # First corpus directory: where new inputs are written; the second: the committed seeds.
  cargo fuzz run --features quota "$t" "$work/corpus/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$SECONDS_EACH" -print_final_stats=1 -max_len=8192 -rss_limit_mb=2048 \
    -timeout=10 >"$log" 2>&1 || rc=$?
  execs=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
  total=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 || true)
  secs=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | grep -oE '[0-9]+ second' | grep -o '[0-9]*' || true)
  if [ "$rc" -ne 0 ]; then
    failed+=("$t")
    grep -E 'panicked at|SUMMARY|Test unit written to' "$log" | head -5 || true
    tail -n 30 "$log" >&2
  fi
  rows+=("$(printf '%-14s %10s %12s %-22s %6s  %s' "$t" "${execs:-?}" "${total:-?}" "${cov:-?}" "${secs:-?}" \
    "$([ "$rc" -eq 0 ] && echo ok || echo "CRASH (fuzz/artifacts/$t/)")")")
done

echo
printf '%-14s %10s %12s %-22s %6s  %s\n' target execs/s runs coverage secs result
for r in "${rows[@]}"; do echo "$r"; done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "==> crashes in: ${failed[*]} (inputs in fuzz/artifacts/<target>/; reproduce with" \
    "RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <file>)" >&2
  exit 1
fi
echo "==> no crash"
