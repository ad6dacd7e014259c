# Two commands for a new user: `make demo` and `make test`. Everything else is optional.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DATA ?=
RUN_DIR ?= var/run
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test bench up down nightly lint clean

setup: $(VENV)/.installed  ## create the virtualenv and install everything (idempotent)

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH, or run: make PYTHON=/path/to/python3.11"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned, so nothing else pulls another (CUDA) build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,ray]"  # ray: the Ray engine and its tests (tests/test_ray_engine.py)
	@touch $@

demo: setup  ## start everything on built-in synthetic data and show real /recall answers
	$(PY) -m scripts.demo

test: setup  ## the whole test suite against a private real Redis
	$(PY) -m pytest -q

bench: setup  ## benchmarks (quality on ml-100k, nightly timings, serving latency); see docs/benchmarks.md
	$(PY) -m scripts.bench

up: setup  ## local Redis (unless REDIS_URL), nightly if nothing is published, the three services
	$(PY) -m scripts.stack up $(if $(DATA),--data $(DATA),)

down:  ## stop exactly what `make up` started
	@test -x $(PY) && $(PY) -m scripts.stack down || true

nightly: setup  ## the nightly job on DATA (default: built-in synthetic data)
	$(PY) -m scripts.stack nightly $(if $(DATA),--data $(DATA),)

lint: setup
	$(VENV)/bin/ruff check .

clean: down
	rm -rf var
