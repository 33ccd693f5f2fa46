# bankvault — the two commands: `make run` and `make test`. Both start with `make setup`,
# which is idempotent: a second run only checks what is already there.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Debian packages the stack and the tests need (the PostgreSQL server provides the pg tools).
DEB_PACKAGES := postgresql postgresql-contrib redis-server gnupg zstd chromium poppler-utils acl openssl
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: setup run test bench check clean-var chaos

setup: $(STAMP)
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# The virtualenv is updated only when a requirements file changes.
$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	@touch $(STAMP)

# Test and benchmark tools, on top of setup.
$(DEV_STAMP): $(STAMP) requirements-dev.txt
	@$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	@touch $(DEV_STAMP)

run: setup
	$(PY) scripts/devstack.py run

test: setup $(DEV_STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

# Soak and chaos (issue 8): kills workers, restarts services; about half an hour, never in `make test`.
chaos: setup $(DEV_STAMP)
	BANKVAULT_CHAOS=1 $(PY) -m pytest -p no:cacheprovider tests/chaos -v $(PYTEST_ARGS)

bench: setup $(DEV_STAMP)
	$(PY) bench/backup_bench.py $(BENCH_ARGS)

check: setup $(DEV_STAMP)
	$(PY) -m ruff check .
	DATABASE_URL=$${DATABASE_URL:-sqlite:///:memory:} $(PY) manage.py check

clean-var:
	$(PY) scripts/devstack.py stop || true
	rm -rf var
