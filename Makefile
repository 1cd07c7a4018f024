# The front door. `make run` serves the product on the embedded default (SQLite, no Redis);
# `make test` runs the suite against the PostgreSQL and Redis on this machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint format clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,lint]'
	touch $@ $(VENV)/.installed-run

# The LiteLLM integration (integrations/litellm) is a package of its own, so that a reseller
# installs it into their LiteLLM; pip cannot name a local directory in an extra, so it is
# installed here, for its tests (a real LiteLLM proxy), mypy and its benchmark. It brings LiteLLM
# and what LiteLLM's proxy needs (about 450 MB; see README, "Dependencies, and why").
$(VENV)/.installed-litellm: integrations/litellm/pyproject.toml $(VENV)/.installed-dev
	$(BIN)/python -m pip install -q -e './integrations/litellm[test]'
	touch $@

# py-spy is only used by `make bench BENCH_ARGS=--profile`; it is a small self-contained wheel.
$(VENV)/.installed-bench: $(VENV)/.installed-dev
	$(BIN)/python -m pip install -q 'py-spy>=0.4'
	touch $@

run: $(VENV)/.installed-run
	$(BIN)/billing serve

# The customer-page tests drive Debian's headless chromium through Playwright (never
# `playwright install`, which downloads a browser build at test time): installed here if missing.
test: $(VENV)/.installed-dev $(VENV)/.installed-litellm
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)
	$(BIN)/python -m pytest

# The benchmarks: real gunicorn, Celery, PostgreSQL and Redis on this machine; each writes its
# section of BENCHMARKS.md. Usage metering (bench/metering/; BENCH_ARGS=--help for options),
# then authorize against a bare Flask endpoint (bench/authorize.py; AUTHORIZE_ARGS), whose load
# generator is wrk (Debian's package, installed here if missing); then LiteLLM with the
# integration against LiteLLM without it (bench/litellm.py; LITELLM_ARGS).
bench: $(VENV)/.installed-dev $(VENV)/.installed-bench $(VENV)/.installed-litellm
	command -v wrk >/dev/null || (apt-get update && apt-get install -y wrk)
	$(BIN)/python -m bench.metering $(BENCH_ARGS)
	$(BIN)/python -m bench.authorize $(AUTHORIZE_ARGS)
	$(BIN)/python -m bench.litellm $(LITELLM_ARGS)

lint: $(VENV)/.installed-dev $(VENV)/.installed-litellm
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: $(VENV)/.installed-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis
