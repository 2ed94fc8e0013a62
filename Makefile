# pcscbridge: `make demo` runs the bridge, `make test` passes the tests, `make bench` measures.
# Every target does its own set-up on a fresh Debian 12 machine (as root): apt packages, then .venv.
SHELL := /bin/bash
VENV := .venv
PYTHON ?= python3
APT_PACKAGES := pcscd libpcsclite-dev pcsc-tools vsmartcard-vpcd opensc openssh-server socat \
	gcc python3-dev python3-venv iproute2 util-linux

.PHONY: deps venv test demo bench lint clean

deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	@[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	@touch $@

venv: deps $(VENV)/.installed

test: venv
	$(VENV)/bin/pytest -q

demo: venv
	$(VENV)/bin/pcscbridge demo

bench: venv
	@$(VENV)/bin/python -c 'import matplotlib' 2>/dev/null || $(VENV)/bin/pip install -q -e '.[bench]'
	$(VENV)/bin/python -m bench $(BENCH_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Long adversarial runs on the real rig (not in make test; figures in README "Robustness").
# make fuzz FUZZ_ARGS="--cases 100000 --seed 7"; make soak SOAK_ARGS="--duration 600"
.PHONY: fuzz soak
FUZZ_ARGS ?=
SOAK_ARGS ?= --duration 300

fuzz: venv
	$(VENV)/bin/python -m stress fuzz-guest $(FUZZ_ARGS)
	$(VENV)/bin/python -m stress fuzz-link $(FUZZ_ARGS)

soak: venv
	$(VENV)/bin/python -m stress soak $(SOAK_ARGS)
