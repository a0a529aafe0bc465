# rwid_nb workspace. Two commands set everything up on a fresh machine:
#   make demo   - create .venv if missing, install, run the whole job on the bundled phantom cohort
#   make test   - create .venv if missing, install, check export sync + clean notebooks, nbdev-test, pytest
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rwid-installed
# Tests and demos never reach a model hub: weights come from installed packages or local folders.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline

.PHONY: demo test venv lab export sync-check clean-check nbtest pytest bench wheel clean

venv: $(STAMP)

# torch first and exactly: a CPU build of 2.13.0 lies on this machine; anything looser pulls a CUDA build.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rwid demo

test: $(STAMP) sync-check clean-check nbtest pytest

# Regenerating the package from the notebooks must change nothing under rwid_nb/.
sync-check: $(STAMP)
	@tmp=$$(mktemp -d); cp -a rwid_nb "$$tmp/before"; \
	$(BIN)/nbdev-export; \
	if ! diff -r -q -x __pycache__ "$$tmp/before" rwid_nb; then \
	  echo "rwid_nb/ was out of sync with nbs/: nbdev-export regenerated it (see above). Review and commit."; rm -rf "$$tmp"; exit 1; fi; \
	rm -rf "$$tmp"; echo "export-sync check: rwid_nb/ matches nbs/"

# Notebooks are committed clean: nbdev-clean must change nothing.
clean-check: $(STAMP)
	@tmp=$$(mktemp -d); cp -a nbs "$$tmp/before"; \
	$(BIN)/nbdev-clean; \
	if ! diff -r -q -x .ipynb_checkpoints "$$tmp/before" nbs; then \
	  echo "notebooks were not clean: nbdev-clean changed them (see above). Review and commit."; rm -rf "$$tmp"; exit 1; fi; \
	rm -rf "$$tmp"; echo "clean-notebook check: nbs/ is clean"

nbtest: $(STAMP)
	$(BIN)/nbdev-test --n-workers 2

pytest: $(STAMP)
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

wheel: $(STAMP)
	$(BIN)/python -m build --wheel --outdir dist .

# JupyterLab on the loopback interface only, with a token (printed in the URL it logs).
lab: $(STAMP)
	$(BIN)/jupyter lab --ip=127.0.0.1 --no-browser $$([ "$$(id -u)" = 0 ] && echo --allow-root) \
	  --IdentityProvider.token="$${RWID_LAB_TOKEN:-$$($(BIN)/python -c 'import secrets; print(secrets.token_hex(24))')}"

export: $(STAMP)
	$(BIN)/nbdev-export

clean:
	rm -rf build dist *.egg-info .pytest_cache
