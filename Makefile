# The README's two commands: `make demo` (the main job) and `make test` (the test suite).
# Both create ./.venv on first use and install into it, so they work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
MODEL  ?= edged/models/demo-clinical-int4

.PHONY: demo ask test arm64-check lint bench install install-dev clean

$(VENV)/bin/python:
	@echo "creating $(VENV) with $(PYTHON)..."
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Stamps re-run the install when pyproject.toml changes, and skip it otherwise.
# No --quiet on the heavy steps: pip's lines and progress bars show that the minutes are moving.
$(VENV)/.runtime: pyproject.toml | $(VENV)/bin/python
	@echo "installing edged into $(VENV) (first time: about a minute)..."
	$(PY) -m pip install --progress-bar on -e .
	touch $@

# torch is pinned in the export extra; naming it here too keeps pip from ever choosing a CUDA build.
$(VENV)/.dev: pyproject.toml | $(VENV)/bin/python
	@echo "installing edged and its test dependencies into $(VENV) (first time: about 1-2 minutes)..."
	$(PY) -m pip install --progress-bar on -e '.[export,dev]' 'torch==2.13.0'
	touch $@ $(VENV)/.runtime

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

# A private mosquitto, the daemon on the bundled demo model, simulated wearables (edged demo).
demo: $(VENV)/.runtime
	$(VENV)/bin/edged demo --model $(MODEL)

# One question on the terminal, grounded in a wearer's vitals as the daemon does; no broker.
ask: $(VENV)/.runtime
	$(VENV)/bin/edged ask --model $(MODEL) --max-tokens 120 \
	  --vitals '{"heart_rate": {"mean": 118, "min": 112, "max": 124}, "spo2": 96, "activity": "rest"}' \
	  "My smartwatch says my resting heart rate is 118. Should I worry?"

test: $(VENV)/.dev
	$(PY) -m pytest -q

# The ARM subset under emulated Pi 4 (Cortex-A72) and Pi 5 (Cortex-A76) CPUs; needs root. CI runs
# it after `make test` (.ci/run).
arm64-check:
	tools/arm64_check.sh

# Issue #11's limits: mccabe complexity <= 12 (ruff C901, pyproject.toml) and functions of at most
# 60 lines with the pipeline's import rules (tests/test_architecture.py).
lint: $(VENV)/.dev
	$(VENV)/bin/ruff check edged tools tests
	$(VENV)/bin/ruff format --check edged tools tests
	$(VENV)/bin/mypy edged tools
	$(PY) -m pytest -q tests/test_architecture.py

bench: $(VENV)/.dev
	$(PY) tools/bench_engine.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
