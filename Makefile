# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-fast bench lint clean publish live-check

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is needed"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## The whole pipeline offline: replica + local S3, dvc repro, push, pull, metrics (scratch workspace).
demo: $(STAMP)
	$(PY) -m emdata.offline.demo $(DEMO_ARGS)

## Lint, then the whole test suite, slow tests included (network tests deselected; `make live-check` runs those).
test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

## The quick loop while developing: everything but the tests marked slow (demo, clusters, notebooks, kills).
test-fast: lint
	$(PY) -m pytest -m "not slow and not network" $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check src tests bench stages
	$(PY) -m mypy src

## The maintainer's live run: dvc repro against the live sources, dvc push, then the files to commit.
## Refuses replica-made data. Needs the internet and the remote's credentials (AWS environment or .dvc/config.local).
publish: $(STAMP)
	$(PY) -m emdata.publish $(STAGES)

## The maintainer's check of the replica against the live sources (needs the internet; a few small requests each):
## a table of agreements and differences. LIVE_CHECK_ARGS e.g. --replica-profile full, --json rows.json.
live-check: $(STAMP)
	$(PY) -m emdata.offline.livecheck $(LIVE_CHECK_ARGS)

## Benchmarks (see bench/README.md): all of them, a summary of ratios, bench/RESULTS.md (~17-19 min on 2 cores).
## A smoke run of a few minutes (results to bench/out/RESULTS.quick.md): make bench BENCH_ARGS=--quick
bench: $(STAMP)
	$(PY) bench/bench_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .emdata .pytest_cache
