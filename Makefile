# nixery-trio: `make serve` and `make test` do all the set-up on a fresh
# Debian 12 machine as root (apt packages, a .venv with the package).
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PYTHON ?= python3
LISTEN ?= 127.0.0.1:8080
STORAGE ?= var
# Offline: never wait for a binary cache that cannot be reached.
export NIX_CONFIG ?= substituters =

SERVE_APT := nix-bin busybox-static ca-certificates netbase git
# The test suite runs the quick benchmarks, so their peers are test packages too.
TEST_APT := skopeo umoci containerd runc podman conmon fuse-overlayfs uidmap gzip \
	nginx-light wrk docker-registry docker.io

.PHONY: help serve test bench lint system-deps test-system-deps clean

help:
	@echo "make serve   install what is missing, serve nix/demo on $(LISTEN)"
	@echo "make test    install what is missing, run lint and the whole test suite"
	@echo "make bench   run the benchmarks and rewrite docs/benchmarks.md"

# Install Debian packages that are not installed yet (apt-get update first:
# package lists may be stale on a fresh machine).
define apt_install
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	  | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
endef

system-deps:
	$(call apt_install,$(SERVE_APT))
	@$(PYTHON) -c 'import ensurepip, sys; assert sys.version_info >= (3, 11)' 2>/dev/null || { \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3 python3-venv; }

test-system-deps: system-deps
	$(call apt_install,$(TEST_APT))

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

serve: system-deps $(VENV)/.installed
	$(VENV)/bin/nixery-trio serve --listen $(LISTEN) --pkgs-path nix/demo \
	  --storage-path $(STORAGE) --popularity-url nix/demo/popularity.json

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check nixery_trio tests $(wildcard benchmarks)
	$(VENV)/bin/mypy

test: test-system-deps $(VENV)/.installed lint
	$(VENV)/bin/pytest -q -p no:cacheprovider

$(VENV)/.bench-installed: $(VENV)/.installed pyproject.toml
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	touch $@

bench: test-system-deps $(VENV)/.bench-installed
	$(VENV)/bin/python -m benchmarks

clean:
	rm -rf $(VENV) $(STORAGE)
