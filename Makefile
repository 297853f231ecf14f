# Two entry points for a fresh clone: `make study` (set up, run the default study) and
# `make test` (set up, check formatting and lint with ruff, run the test suite). Setup is idempotent and re-runs when
# pyproject.toml changes. TORCH_SPEC pins the CPU wheel used here; GPU users can pass
# e.g. `make study TORCH_SPEC=torch` to get their CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STUDY ?= studies/timestep_ablation.yaml

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

study: setup
	$(VENV)/bin/harness run $(STUDY)

# matplotlib's font cache is per version, not per install: a test venv that is later deleted
# (a CI clone) left a cache without the bundled STIX/cm fonts in ~/.cache, and every report
# then logged ~20 "findfont" lines. The tests keep theirs in the venv.
test: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	MPLCONFIGDIR=$(abspath $(VENV))/mplconfig $(PY) -m pytest -q --durations=20

.PHONY: setup study test
