# The two commands a newcomer needs are `make run` and `make test`; the rest are for day-to-day work.
# Every target installs what it needs (nats-server 2.15.1 and Postgres, through infra/stack.sh).

CARGO ?= cargo
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
COCOON = $(TARGET_DIR)/debug/cocoon

.PHONY: run test lint bench stack-up stack-down clean-stack ton-local-deps browser-deps

## run: start the embedded stack, provision the streams and migrate, then run the pool: the projector, an allocator
## (admitting unattested workers: development only) and node agents (simulated GPUs without an NVIDIA GPU) take a
## sample workload through allocation, execution and results, then stop
run: stack-up ton-local-deps
	$(CARGO) build -p cocoon -p projector -p allocator -p node-agent -p settler
	$(COCOON) dev up
	$(COCOON) dev pool

## test: start the stack and run the whole test suite against real nats-server, Postgres, the TVM (the local
## TON server over @ton/sandbox, installed from npm) and headless Chromium (Debian's package, for the operator page);
## first the deploy manifests and dashboards are checked against their schemas and the code (infra/check.sh)
test: stack-up ton-local-deps browser-deps
	@command -v cargo-nextest >/dev/null 2>&1 || $(CARGO) install cargo-nextest --locked
	npm test --prefix infra/ton-local
	infra/check.sh
	$(CARGO) nextest run --workspace --profile $${NEXTEST_PROFILE:-default}

## lint: formatting and clippy, as CI runs them
lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## bench: publisher throughput benchmark (release build); record results in load-tests/RESULTS.md
bench:
	infra/stack.sh install
	$(CARGO) run --release -p load-tests -- publish

stack-up:
	infra/stack.sh up

## browser-deps: install Debian's chromium for the operator page's browser test (apt; sudo when not root)
browser-deps:
	infra/chromium.sh install

## ton-local-deps: install the local TON server's npm packages (pinned by its package-lock.json)
ton-local-deps: infra/ton-local/node_modules/.package-lock.json

infra/ton-local/node_modules/.package-lock.json: infra/ton-local/package-lock.json
	npm ci --prefix infra/ton-local --no-audit --no-fund

stack-down:
	infra/stack.sh down
