# api-guard — build, test, run and benchmark.
#   make build   the filter (.wasm), the filter as a dynamic module (.so) and the native binaries
#   make test    every test: unit, and end-to-end through a real Envoy with both deliveries
#                (installs what it needs)
#   make run     the demo stack on 127.0.0.1:8080, with ready-to-paste curl commands
#                (DELIVERY=native: the dynamic module instead of the .wasm)
#   make lint    rustfmt + clippy, warnings are errors
#   make fuzz    every fuzz target for FUZZ_SECONDS each (default 60; not part of `make test`,
#                which replays the committed corpora instead; docs/FUZZING.md)
#   make bench   api-guard side by side with Envoy's native filters (not part of `make test`)
SHELL := /bin/bash
CARGO ?= cargo
WASM := target/wasm32-wasip1/release/api_guard.wasm
# The same filter with the JSON Schema validator (`json_schema` routes; docs/CONFIG.md):
# cargo feature `json-schema`, which more than doubles the .wasm, so it is a second artifact.
WASM_FULL := target/wasm32-wasip1/release/api_guard_full.wasm
MODULE := target/release/libapi_guard.so
# The release profile unwinds (the native module catches panics at every hook and answers
# 500); the wasm aborts instead: the VM is its sandbox, and unwinding tables only cost size.
WASM_FLAGS := --config 'profile.release.panic="abort"'
DELIVERY ?= wasm
ENVOY_BIN := $(CURDIR)/.tools/envoy/envoy/_bin/envoy
export ENVOY_BIN

.PHONY: all build wasm module native tools test test-unit test-e2e run lint bench fuzz clean

all: build

tools:
	@scripts/tools.sh wasm clang envoy redis promtool

# Both .wasm files: cargo writes either build to $(WASM), so the full one is built first and
# copied aside. Switching features recompiles only the api-guard crate itself (a cdylib's
# output is not kept per feature set), not its dependencies.
wasm:
	@scripts/tools.sh wasm clang
	@echo "==> building the filter with the JSON Schema validator ($(WASM_FULL))"
	$(CARGO) build --release --target wasm32-wasip1 --lib --features json-schema $(WASM_FLAGS)
	cp $(WASM) $(WASM_FULL)
	@echo "==> building the filter ($(WASM))"
	$(CARGO) build --release --target wasm32-wasip1 --lib $(WASM_FLAGS)

# The dynamic module alone: what the e2e tests load (they use the debug binaries cargo test
# builds for everything else, so `make test` skips the release CLI and quota service).
module:
	@echo "==> building the dynamic module ($(MODULE))"
	$(CARGO) build --release --lib

native:
	@echo "==> building the dynamic module ($(MODULE)) and the native binaries (api-guard CLI, api-guard-quota)"
	$(CARGO) build --release --workspace --lib --bins

build: wasm native

# Unit tests need nothing installed; end-to-end tests need Envoy (and Redis for the quota
# service). The .wasm and the .so are built first so the e2e harness does not have to; the
# harness runs every e2e test against both (API_GUARD_DELIVERY=both, tests/common/mod.rs).
test: tools wasm module
	@echo "==> running unit and end-to-end tests (wasm filter and dynamic module)"
	API_GUARD_SKIP_WASM_BUILD=1 API_GUARD_DELIVERY=both $(CARGO) test --workspace --all-targets

test-unit:
	$(CARGO) test --workspace --lib --bins

run: tools build
	@DELIVERY=$(DELIVERY) scripts/run-demo.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy --release --target wasm32-wasip1 --lib $(WASM_FLAGS) -- -D warnings
	$(CARGO) clippy --release --target wasm32-wasip1 --lib --features json-schema $(WASM_FLAGS) -- -D warnings

fuzz:
	@scripts/fuzz.sh

bench: tools build
	@scripts/tools.sh wrk
	@if [ -x bench/run.sh ]; then bench/run.sh; else echo "bench/run.sh not present yet"; exit 1; fi

clean:
	$(CARGO) clean
