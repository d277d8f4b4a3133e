# The README's commands. Everything installs what it needs, so each works on a fresh Debian.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEB_PACKAGES := softhsm2 p11-kit-modules opensc openssl nghttp2-client
CONFIG ?= hsm_config/dev.toml
# make run LISTEN=127.0.0.1:50052: another address than the config's (say, 50051 is taken)
LISTEN ?=

.PHONY: run test test-unit test-integration test-compat lint bench bench-long soak bench-unwrap bench-audit protos check-protos deps deb venv dev-token clean-dev-token

## run: install, create the SoftHSM2 dev token and its demo key, start hsmsignd in the foreground
run: deps dev-token
	$(BIN)/hsmsignd --config $(CONFIG) serve $(if $(LISTEN),--listen $(LISTEN))

## test: install, then run the whole suite (unit, integration on real SoftHSM2 tokens, compat)
test: deps
	$(BIN)/pytest -q

## test-unit: the fast lane (in-process, seconds): tests/unit only
test-unit: venv
	$(BIN)/pytest -q tests/unit

## test-integration: real SoftHSM2 tokens and real daemons
test-integration: deps
	$(BIN)/pytest -q tests/integration

## test-compat: the pinned Capgo CLI as a peer (needs node/npm; `make deps` installs them)
test-compat: deps
	$(BIN)/pytest -q tests/compat

## lint: ruff and mypy --strict on server/, hsmsign/, tests/ and bench/; the stubs drift check
lint: deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(MAKE) --no-print-directory check-protos

## bench: side-by-side throughput/latency ratios (see bench/README.md)
bench: deps
	$(BIN)/python -m bench.run

bench-long: deps
	$(BIN)/python -m bench.long_run

## soak: 64 callers, 100,000 calls mixed over every operation, each verified; RSS growth < 20 MB
soak: deps
	$(BIN)/python -m bench.soak

## bench-audit: audit trail off vs on, unary and batch, and the group commit
bench-audit: deps
	$(BIN)/python -m bench.bench_audit

## bench-unwrap: timing of valid vs invalid PKCS#1 v1.5 unwraps (implicit rejection)
bench-unwrap: deps
	$(BIN)/python -m bench.bench_unwrap_timing

deps: deb venv

deb:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	command -v npm >/dev/null || missing="$$missing nodejs npm"; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[server,dev]'
	touch $@

## dev-token: the isolated SoftHSM2 token under softhsm/dev/ (idempotent) and its demo key
dev-token: deps
	softhsm/dev-token.sh
	$(BIN)/hsmsignd --config $(CONFIG) keys ensure demo --purpose sign --algorithm rsa-2048

clean-dev-token:
	rm -rf softhsm/dev

## protos: regenerate hsmsign/v1 from proto/ (checked in)
protos:
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m grpc_tools.protoc -Iproto \
	  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. \
	  proto/hsmsign/v1/hsmsign.proto

check-protos:
	@tmp=$$(mktemp -d); trap 'rm -rf $$tmp' EXIT; \
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m grpc_tools.protoc -Iproto \
	  --python_out=$$tmp --grpc_python_out=$$tmp --mypy_out=$$tmp --mypy_grpc_out=$$tmp \
	  proto/hsmsign/v1/hsmsign.proto; \
	for f in hsmsign_pb2.py hsmsign_pb2.pyi hsmsign_pb2_grpc.py hsmsign_pb2_grpc.pyi; do \
	  cmp -s $$tmp/hsmsign/v1/$$f hsmsign/v1/$$f || { echo "hsmsign/v1/$$f is stale: run 'make protos'"; exit 1; }; \
	done; echo "generated stubs are up to date"
