# One entry point for people and CI: `make run` sets up and starts edged, `make test` checks everything.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= smollm2-135m-instruct

.PHONY: setup models run test lint clean bench

# The virtual environment with edged and its build tools. torch is installed first and alone:
# `pip install torch==2.13.0` takes the CPU wheel (see README, "Models").
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[build,dev]'
	touch $@

setup: $(BIN)/.installed

# The default model and the fp32 reference its quality is measured against (cached after the first build).
models: setup
	$(BIN)/edged model build $(MODEL)
	$(BIN)/edged model build $(MODEL) --quant fp32

# Serves on MQTT; with no broker configured, a private Mosquitto on 127.0.0.1:1883 (needs `mosquitto`).
run: setup
	$(BIN)/edged model build $(MODEL)
	$(BIN)/edged serve --model $(MODEL)

lint: setup
	$(BIN)/ruff check edged tests
	$(BIN)/ruff format --check edged tests
	$(BIN)/mypy

test: models lint
	$(BIN)/python -m pytest -q

bench: models
	$(BIN)/edged bench

clean:
	rm -rf $(VENV) models/*/
