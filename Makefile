# Two commands matter: `make run` and `make test`. Each builds .venv from scratch
# when it is missing or when pyproject.toml changed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench docs loadtest install clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned, so nothing later can resolve a different (CUDA) build
	$(BIN)/pip install --quiet torch==2.13.0
	# [hub]: ModelScope's downloader, so the default hub model can be fetched where the network allows
	$(BIN)/pip install --quiet -e '.[test,cluster,hub]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/m2fp serve

test: $(STAMP)
	scripts/ensure-test-services.sh
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/m2fp bench

loadtest: $(STAMP)
	$(BIN)/python scripts/loadtest.py

docs: $(STAMP)
	$(BIN)/python -m m2fp_api.api.docs > openapi.md

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
