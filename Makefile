# One entry point for people and CI: `make run` sets up and starts edged, `make test` checks everything.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= smollm2-135m-instruct

.PHONY: setup system models run test lint clean bench

# Debian packages: the broker (the daemon's private one and the tests'), its clients (mosquitto_rr in the
# tests) and systemd-analyze (unit tests). Installed with apt when missing, as root or through sudo.
APT_PACKAGES = mosquitto mosquitto-clients systemd
system:
	@if ! command -v mosquitto_rr >/dev/null || ! { command -v mosquitto || test -x /usr/sbin/mosquitto; } >/dev/null \
	    || ! command -v systemd-analyze >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing $(APT_PACKAGES)"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi

# The virtual environment with edged and its build tools. torch is installed first and alone:
# `pip install torch==2.13.0` takes the CPU wheel (see README, "Models").
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[build,dev]'
	touch $@

setup: system $(BIN)/.installed

# The default model and the fp32 reference its quality is measured against (cached after the first build).
models: setup
	$(BIN)/edged model build $(MODEL)
	$(BIN)/edged model build $(MODEL) --quant fp32

# Serves on MQTT; with no broker configured, a private Mosquitto on 127.0.0.1:1883.
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
