# pcscbridge: `make demo` runs the bridge, `make test` passes the tests, `make bench` measures.
# Every target does its own set-up on a fresh Debian 12 machine (as root): apt packages, then .venv.
SHELL := /bin/bash
VENV := .venv
PYTHON ?= python3
APT_PACKAGES := pcscd libpcsclite-dev pcsc-tools vsmartcard-vpcd opensc openssh-server socat systemd \
	gcc python3-dev python3-venv iproute2 util-linux scdaemon
# The QEMU tests' tiny guest: QEMU and what its initramfs is built from (rig/qemu_guest.py),
# and libvirt's schema check for contrib/libvirt;
# without Recommends (qemu-system-x86's would pull in a GUI).
APT_PACKAGES_BARE := qemu-system-x86 busybox-static libccid cpio libvirt-clients libxml2-utils

# $(call apt_install,PACKAGES,APT_OPTIONS): install those of PACKAGES that are missing
define apt_install
	@missing=$$(for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) $$missing; \
	fi
endef

.PHONY: deps venv test demo bench lint clean dist man completions

deps:
	$(call apt_install,$(APT_PACKAGES))
	$(call apt_install,$(APT_PACKAGES_BARE),--no-install-recommends)

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

# Packaging: a wheel and an sdist; the man page and shell completions, made from the parser.
DIST_DIR ?= dist
MAN_DIR ?= build/man
COMPLETIONS_DIR ?= build/completions
# Defaults that depend on the machine are shown by name, not with this machine's values.
FROM_PARSER := XDG_RUNTIME_DIR='$$XDG_RUNTIME_DIR'

dist: venv
	$(VENV)/bin/python -m build --outdir $(DIST_DIR) .

man: venv
	@mkdir -p $(MAN_DIR)
	$(FROM_PARSER) $(VENV)/bin/argparse-manpage --module pcscbridge.cli --function build_parser \
		--prog pcscbridge --project-name pcscbridge --manual-title "pcscbridge manual" \
		--version "$$($(VENV)/bin/pcscbridge --version | cut -d' ' -f2)" \
		--description "the host's smart card readers for VMs, containers and sandboxes" \
		--include docs/pcscbridge.1.include --output $(MAN_DIR)/pcscbridge.1

completions: venv
	@mkdir -p $(COMPLETIONS_DIR)
	$(FROM_PARSER) $(VENV)/bin/shtab --shell=bash -u pcscbridge.cli.build_parser \
		> $(COMPLETIONS_DIR)/pcscbridge.bash
	$(FROM_PARSER) $(VENV)/bin/shtab --shell=zsh -u pcscbridge.cli.build_parser \
		> $(COMPLETIONS_DIR)/_pcscbridge

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist

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
