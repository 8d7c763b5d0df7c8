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
# The test suite runs the quick benchmarks, so their peers are test packages too;
# systemd brings systemd-analyze and openssl makes the certificate for the
# checks of contrib/ (tests/e2e/test_contrib.py); the web page's test drives
# chromium (tests/e2e/test_web.py), through Playwright's driver, a node binary
# that needs libatomic1.  Ceph's monitor, OSD and RADOS Gateway run the
# storage conformance suite against a second S3 implementation
# (tests/e2e/ceph.py).
TEST_APT := skopeo umoci containerd runc podman conmon fuse-overlayfs uidmap gzip \
	nginx-light wrk docker-registry docker.io qemu-user-static binfmt-support zstd \
	systemd openssl chromium libatomic1 curl ceph-mon ceph-osd radosgw ceph-common
# The demo package set's aarch64 payload (see nix/demo/default.nix).
DEMO_ARM64_DIR := nix/demo/arm64
DEMO_ARM64_BUSYBOX := $(DEMO_ARM64_DIR)/bin/busybox

.PHONY: help serve test bench lint system-deps test-system-deps demo-arm64 clean

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

# Debian's static busybox for arm64, unpacked from its .deb and never
# installed: the demo package set ships it as the payload of its aarch64
# packages, which are all built on this machine. Adding the architecture
# only lets apt see arm64 packages; nothing arm64 gets installed.
$(DEMO_ARM64_BUSYBOX):
	@dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
	apt-get update -q
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  (cd "$$tmp" && apt-get download -q -o APT::Sandbox::User=root busybox-static:arm64) && \
	  dpkg-deb -x "$$tmp"/busybox-static_*_arm64.deb "$$tmp/root" && \
	  mkdir -p $(@D) && cp "$$tmp/root/bin/busybox" $@.tmp && mv $@.tmp $@

demo-arm64: $(DEMO_ARM64_BUSYBOX)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

serve: system-deps $(DEMO_ARM64_BUSYBOX) $(VENV)/.installed
	$(VENV)/bin/nixery-trio serve --listen $(LISTEN) --pkgs-path nix/demo \
	  --storage-path $(STORAGE) --popularity-url nix/demo/popularity.json

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check nixery_trio tests $(wildcard benchmarks)
	$(VENV)/bin/mypy

test: test-system-deps $(DEMO_ARM64_BUSYBOX) $(VENV)/.installed lint
	$(VENV)/bin/pytest -q -p no:cacheprovider

$(VENV)/.bench-installed: $(VENV)/.installed pyproject.toml
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	touch $@

bench: test-system-deps $(VENV)/.bench-installed
	$(VENV)/bin/python -m benchmarks

clean:
	rm -rf $(VENV) $(STORAGE) $(DEMO_ARM64_DIR)
