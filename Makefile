# Two commands for a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt pyproject.toml | cksum | cut -d' ' -f1)
PYTEST := $(PY) -m pytest

.PHONY: run test test-fast test-browser test-faults test-postgres lint bench bench-quick soak stop clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { echo "Python venv missing: apt-get install python3-venv"; exit 1; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

## make run: the console with Redis, a Celery worker and beat, four demo host agents and the demo fleet.
##           HOSTS=qemu runs the demo hosts with the QEMU driver (needs QEMU >= 10 and `make guest-image`).
run: $(STAMP)
	$(PY) scripts/run_console.py --hosts $(or $(HOSTS),simulated)

## make test: every test (SQLite), then the database-constraint tests again on PostgreSQL.
test: $(STAMP)
	$(PY) scripts/ensure_redis.py
	$(PYTEST)
	$(PY) scripts/run_postgres_tests.py

test-fast: $(STAMP)
	$(PY) scripts/ensure_redis.py
	$(PYTEST) -m "not browser and not faults and not qemu and not bench"

test-browser: $(STAMP)
	$(PY) scripts/ensure_redis.py
	$(PYTEST) -m browser

test-faults: $(STAMP)
	$(PY) scripts/ensure_redis.py
	$(PYTEST) -m faults

test-postgres: $(STAMP)
	$(PY) scripts/run_postgres_tests.py

## make lint: ruff (lint and format) over the tree, mypy (settings in pyproject.toml) over the console's apps.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

guest-image:
	bash scripts/build_test_guest.sh

bench: $(STAMP)
	$(PY) scripts/ensure_redis.py
	@for script in bench/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

## make bench-quick: every benchmark with --quick (seconds each: does it still run?); `make test` runs it too.
bench-quick: $(STAMP)
	$(PY) scripts/ensure_redis.py
	$(PYTEST) tests/test_benchmarks.py

## make soak RUNS=20 SEED=1: seeded migrations with one fault each (kills, Redis restart, data-plane cut or
##           stall, SIGSTOP, cancel, none) on a private stack; ends "N runs, K invariant violations", non-zero if K > 0.
##           DRIVER=qemu: two QEMU hosts with real test guests (needs QEMU >= 10 and guest-images/).
##           ONLY=kill-source,cancel: only the seeds of those fault kinds.
soak: $(STAMP)
	$(PY) bench/soak.py --runs $(or $(RUNS),20) --seed $(or $(SEED),1) --driver $(or $(DRIVER),simulated) \
		$(if $(ONLY),--only $(ONLY))

stop:
	-@test -f var/redis.pid && kill $$(cat var/redis.pid) && rm -f var/redis.pid

clean: stop
	rm -rf var test-artifacts
