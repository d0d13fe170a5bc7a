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
#   make soak    SOAK_SECONDS (default 600) of mixed traffic and faults (quota service killed,
#                Redis restarted, Envoy hot restart) through both deliveries, then checks:
#                no client over its limit, no panic/crash, RSS bound, webhooks forwarded
#                exactly once (not part of `make test`; docs/soak.md, bench/soak.py)
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

.PHONY: all build wasm module native tools test test-unit test-e2e run lint bench soak fuzz clean

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

# Loopback only, bounded: stops by itself after SOAK_SECONDS (plus setup), and stops every
# process it started, also on Ctrl-C. SOAK_DELIVERY=wasm|native|both (default both, each for
# half the time). matplotlib (for docs/soak.png) goes into .tools/py, as for `make bench`.
SOAK_SECONDS ?= 600
SOAK_DELIVERY ?= both
soak: tools build
	@scripts/tools.sh wrk redis
	@if ! PYTHONPATH=.tools/py python3 -c 'import matplotlib' 2>/dev/null; then \
	  echo "==> installing matplotlib (PyPI) into .tools/py"; \
	  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
	    --target .tools/py matplotlib; fi
	@python3 bench/soak.py --self-test
	@echo "==> soak: $(SOAK_SECONDS) s, delivery $(SOAK_DELIVERY) (bench/soak.py)"
	PYTHONPATH=$(CURDIR)/.tools/py python3 bench/soak.py --seconds $(SOAK_SECONDS) \
	  --delivery $(SOAK_DELIVERY)

clean:
	$(CARGO) clean
