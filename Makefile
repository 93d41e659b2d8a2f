# Two commands for a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The libvirt driver's binding builds only against libvirt's headers (scripts/install_libvirt.sh): installed when they are.
LIBVIRT_REQ := $(shell pkg-config --exists 'libvirt >= 11' 2>/dev/null && echo hostagent/requirements-libvirt.txt)
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt pyproject.toml $(LIBVIRT_REQ) | cksum | cut -d' ' -f1)
PYTEST := $(PY) -m pytest

.PHONY: run run-cluster test test-fast test-browser test-faults test-postgres test-cluster lint guest-image bench bench-quick soak stop clean agent-bundle

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml $(LIBVIRT_REQ)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { echo "Python venv missing: apt-get install python3-venv"; exit 1; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(if $(LIBVIRT_REQ),$(PY) -m pip install -q -r $(LIBVIRT_REQ))
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

## make run: the console with Redis, a Celery worker and beat, four demo host agents and the demo fleet.
##           HOSTS=qemu runs the demo hosts with the QEMU driver (needs QEMU >= 10 and `make guest-image`).
##           HOSTS=libvirt runs four libvirt daemons on this machine as the demo hosts and their agents with the
##           libvirt driver (needs root, libvirt >= 11: scripts/install_libvirt.sh, and `make guest-image`).
run: $(STAMP)
	$(PY) scripts/run_console.py --hosts $(or $(HOSTS),simulated)

## make run-cluster: the reference deployment on one machine (README "Scaling out"): PostgreSQL, Redis as a master,
##           a replica and three Sentinels, HAProxy on PORT (8000) in front of WEB (3) uvicorn processes, WORKERS (2)
##           Celery workers, beat and the demo agents. Installs Debian's packages for them first when missing.
run-cluster: $(STAMP)
	bash scripts/install_cluster_packages.sh
	$(PY) scripts/run_console.py --cluster --hosts $(or $(HOSTS),simulated) --web $(or $(WEB),3) \
		--workers $(or $(WORKERS),2)

## make test: every test (SQLite), then the database-constraint tests again on PostgreSQL.
test: $(STAMP)
	$(PY) scripts/ensure_redis.py
	$(PYTEST)
	$(PY) scripts/run_postgres_tests.py

test-fast: $(STAMP)
	$(PY) scripts/ensure_redis.py
	$(PYTEST) -m "not browser and not faults and not qemu and not libvirt and not cluster and not bench"

test-browser: $(STAMP)
	$(PY) scripts/ensure_redis.py
	$(PYTEST) -m browser

test-faults: $(STAMP)
	$(PY) scripts/ensure_redis.py
	$(PYTEST) -m faults

test-postgres: $(STAMP)
	$(PY) scripts/run_postgres_tests.py

## make test-cluster: the fault tests against the cluster profile (tests/cluster/, marker `cluster`).
test-cluster: $(STAMP)
	bash scripts/install_cluster_packages.sh
	$(PYTEST) -m cluster

## make lint: ruff (lint and format) over the tree, mypy (settings in pyproject.toml) over the console's apps,
##           and the layer contracts (import-linter, [tool.importlinter] in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

## make agent-bundle: var/hostagent.tar.gz, what a host installs: hostagent/, agentprotocol/, requirements.txt.
agent-bundle:
	$(PYTHON) scripts/agent_bundle.py var/hostagent.tar.gz

## make guest-image: the QEMU guests in guest-images/: the test guest (kernel + initramfs) and the OS image
##           (guest-os.qcow2, a bootable disk). Both idempotent; the OS image is rebuilt only when an input changed.
guest-image:
	bash scripts/build_test_guest.sh
	bash scripts/build_guest_image.sh

bench: $(STAMP)
	$(PY) scripts/ensure_redis.py
	@for script in bench/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

## make bench-quick: every benchmark with --quick (seconds each: does it still run?); `make test` runs it too.
bench-quick: $(STAMP)
	$(PY) scripts/ensure_redis.py
	$(PYTEST) tests/test_benchmarks.py

## make soak RUNS=20 SEED=1: seeded migrations with one fault each (kills, Redis restart, data-plane cut or
##           stall, SIGSTOP, cancel, a target's pool filled, none) on a private stack, many of them mirroring a
##           local disk (needs root for the pools' tmpfs); ends "N runs, K invariant violations", non-zero if K > 0.
##           DRIVER=qemu: two QEMU hosts with real test guests (needs QEMU >= 10 and guest-images/).
##           ONLY=kill-source,cancel: only the seeds of those fault kinds.
soak: $(STAMP)
	$(PY) bench/soak.py --runs $(or $(RUNS),20) --seed $(or $(SEED),1) --driver $(or $(DRIVER),simulated) \
		$(if $(ONLY),--only $(ONLY))

stop:
	-@test -f var/redis.pid && kill $$(cat var/redis.pid) && rm -f var/redis.pid

clean: stop
	rm -rf var test-artifacts
