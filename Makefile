# One entry point for people and CI: `make run` sets up and starts edged, `make test` checks everything.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= smollm2-135m-instruct

.PHONY: setup system models run test lint clean bench peers

# Debian packages: the broker (the daemon's private one and the tests'), its clients (mosquitto_rr in the
# tests), systemd-analyze (unit tests), and Chromium with its WebDriver (the kiosk page's test). Installed with
# apt when missing, as root or through sudo.
APT_PACKAGES = mosquitto mosquitto-clients systemd chromium chromium-driver
system:
	@if ! command -v mosquitto_rr >/dev/null || ! { command -v mosquitto || test -x /usr/sbin/mosquitto; } >/dev/null \
	    || ! command -v systemd-analyze >/dev/null || ! command -v chromium >/dev/null \
	    || ! command -v chromedriver >/dev/null; then \
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
	$(BIN)/pip install --quiet -e '.[build,dev,bench]'
	touch $@

setup: system $(BIN)/.installed

# The default model, the fp32 reference its quality is measured against (cached after the first build), and
# the example knowledge base the field-advisor profile reads.
models: setup
	$(BIN)/edged model build $(MODEL)
	$(BIN)/edged model build $(MODEL) --quant fp32
	$(BIN)/edged kb build examples/crops -o crops

# Serves on MQTT; with no broker configured, a private Mosquitto on 127.0.0.1:1883.
run: setup
	$(BIN)/edged model build $(MODEL)
	$(BIN)/edged kb build examples/crops -o crops
	$(BIN)/edged serve --model $(MODEL)

lint: setup
	$(BIN)/ruff check edged tests
	$(BIN)/ruff format --check edged tests
	$(BIN)/mypy

test: models lint
	$(BIN)/python -m pytest -q

bench: models
	$(BIN)/edged bench

# The peers `edged bench` measures edged against: optimum's generate on the recipe's optimum export (the
# build extra has optimum) and llama.cpp on the recipe's GGUF. Not part of `make test`
# or CI: llama-cpp-python compiles llama.cpp from source, 5-10 minutes on 2 cores. The native build dies
# with SIGILL at the first token on these Xeons (AMX advertised, not allowed by the VM), so the CPU features
# are named instead of detected.
LLAMA_CPP_VERSION = 0.3.36
LLAMA_CMAKE_ARGS = -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
  -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_BF16=ON \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
peers: models
	$(BIN)/edged model build $(MODEL) --graph optimum
	@if $(BIN)/python -c 'import importlib.metadata as m, sys; sys.exit(m.version("llama-cpp-python") != "$(LLAMA_CPP_VERSION)")' 2>/dev/null; then \
	  echo "llama-cpp-python $(LLAMA_CPP_VERSION) already installed"; \
	else \
	  echo "building llama-cpp-python $(LLAMA_CPP_VERSION) (5-10 minutes on 2 cores)"; \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --no-cache-dir --no-binary llama-cpp-python \
	    llama-cpp-python==$(LLAMA_CPP_VERSION); \
	fi

clean:
	rm -rf $(VENV) models/*/
