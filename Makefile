# boxvol: `make demo` and `make test` each set up what they need on a fresh Debian 12.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := .stamps

# Debian packages: FUSE and libvirt headers to build pyfuse3 and libvirt-python, podman and
# hyperfine for the CLI start-up benchmark, systemd for `systemd-analyze verify` of our units,
# systemd-container and debootstrap for the tests under a real systemd (tests/systemd),
# fio for the FUSE benchmark, e2fsprogs and util-linux (mkfs.ext4, fsfreeze) for FUSE tests;
# QEMU's virtiofsd, libvirt, and a Debian kernel + busybox for the test guest (guest/).
APT_PACKAGES := fuse3 libfuse3-dev pkg-config libvirt-dev gcc python3-dev podman hyperfine systemd \
	systemd-container debootstrap \
	fio e2fsprogs util-linux qemu-system-common qemu-system-x86 qemu-utils \
	libvirt-daemon-system linux-image-amd64 busybox-static cpio

.PHONY: setup services test lint typecheck unit integration demo bench openapi install clean

setup: $(STAMP)/venv

$(STAMP)/apt: Makefile
	@mkdir -p $(STAMP)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	  | grep -q '^install ok installed$$' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@touch $@

$(STAMP)/venv: $(STAMP)/apt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

lint: setup
	$(BIN)/ruff check volumed vmdriver cli tests bench demo guest
	$(BIN)/ruff format --check volumed vmdriver cli tests bench demo guest

typecheck: setup
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest -q tests/unit

integration: setup
	$(BIN)/pytest -q tests/integration

# libvirtd and virtlogd, started by hand where systemd is not PID 1 (CI, containers).
services: setup
	@pgrep -x virtlogd >/dev/null || virtlogd -d
	@pgrep -x libvirtd >/dev/null || libvirtd -d
	@for i in $$(seq 1 50); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done

test: setup services
	$(BIN)/ruff check volumed vmdriver cli tests bench demo guest
	$(BIN)/mypy
	$(BIN)/python -m volumed.openapi --check docs/openapi.json
	$(BIN)/pytest -q

demo: setup
	$(BIN)/python demo/run.py

bench: setup
	$(BIN)/python bench/control_plane.py
	$(BIN)/python bench/cli_startup.py
	$(BIN)/python bench/fuse.py
	$(BIN)/python bench/virtiofs.py
	$(BIN)/python bench/storage.py

# The operator's install (docs/operator.md): a virtual environment in $(PREFIX), the package,
# then boxvol-install (units, the boxvol group, an example config, /usr/local/bin links).
PREFIX ?= /opt/boxvol
install:
	$(PYTHON) -m venv $(PREFIX)
	$(PREFIX)/bin/pip install -q .
	$(PREFIX)/bin/boxvol-install

openapi: setup
	$(BIN)/python -m volumed.openapi --write docs/openapi.json

clean:
	rm -rf $(VENV) $(STAMP) .mypy_cache .pytest_cache .ruff_cache
