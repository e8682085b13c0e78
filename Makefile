# The README's two commands:  make serve   and   make test
# Each creates its own virtual environment on first use (re-created when pyproject.toml changes).

PYTHON ?= python3
SERVE_VENV := .venv-serve
DEV_VENV := .venv
PEERS_VENV := .venv-peers
SERVE_ARGS ?=

# Debian packages the tests use: Docker + compose + debootstrap for the container test,
# Fashion-MNIST for the generator and classifier, Chromium and its driver for the console
# tests, OSMesa for rendering the MuJoCo robots offscreen (`play --record`, its test), wrk for the
# peer benchmark's test. Installed when running as root.
SYSTEM_PACKAGES := docker.io docker-compose debootstrap dataset-fashion-mnist chromium chromium-driver prometheus libosmesa6 wrk

.PHONY: serve test system-packages train-policies train-robots play benchmark peers peers-venv wrk clean-venvs

## Serve every model in models/ (policy :3001, generator :3002, classifier :3003); Ctrl-C stops.
serve: $(SERVE_VENV)/.installed
	$(SERVE_VENV)/bin/python -m services $(SERVE_ARGS)

## Run the whole test suite (real servers, real training, real ONNX export).
test: system-packages $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/python -m pytest $(PYTEST_ARGS)

system-packages:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else \
		echo "not root: cannot apt-get install $$missing; the tests that need them will skip and say so"; \
	fi

## Benchmark the services against raw onnxruntime and a bare BentoML floor (writes BENCHMARKS.md);
## wrk drives the load (apt-get installed when root). BENCHMARK_ARGS="--services policy" etc.
benchmark: $(DEV_VENV)/.installed wrk
	$(DEV_VENV)/bin/python -m loadtests.benchmark $(BENCHMARK_ARGS)

# The load generator of the benchmarks (apt-get installed when root).
wrk:
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; } \
		|| { echo "wrk is missing: apt-get install wrk"; exit 1; }

## Our services against LitServe, Ray Serve, Mosec, Triton (PyTriton) and TorchServe on the same
## ONNX files (writes benchmarks/peers.md); the peers run in their own environment, .venv-peers.
peers: $(DEV_VENV)/.installed peers-venv wrk
	$(DEV_VENV)/bin/python -m loadtests.peers $(PEERS_ARGS)

# TorchServe's worker imports torch (no model here uses it): the CPU wheel where one is on disk
# (/opt/wheels on the project's machines), else the registry's. Java 17 for TorchServe when root.
peers-venv: $(PEERS_VENV)/.installed
$(PEERS_VENV)/.installed: loadtests/peers/requirements.txt
	@command -v java >/dev/null || { [ "$$(id -u)" = 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null; } || true
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/pip install --quiet -r loadtests/peers/requirements.txt
	$(PEERS_VENV)/bin/pip install --quiet --find-links /opt/wheels "torch==2.13.0+cpu" 2>/dev/null \
		|| $(PEERS_VENV)/bin/pip install --quiet "torch==2.14.1"
	touch $@

## Reproduce the shipped policies (writes a new version under models/).
train-policies: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/python -m training policy --env CartPole-v1 --name cartpole --seed 0 --min-return 475
	$(DEV_VENV)/bin/python -m training policy --env LunarLander-v3 --name lunarlander --seed 0 --min-return 200

## Reproduce the shipped robots (soft actor-critic, one core each; the cards give the measured time).
train-robots: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/python -m training robot --env HalfCheetah-v5
	$(DEV_VENV)/bin/python -m training robot --env Ant-v5

## Drive CartPole-v1 with the served policy over HTTP.
play: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/python -m training play --env CartPole-v1 --url http://127.0.0.1:3001 --episodes 10

# Serving only: no torch, as in the container image.
$(SERVE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install --quiet --upgrade pip
	$(SERVE_VENV)/bin/pip install --quiet -e .
	touch $@

# Everything: serving, training (torch), load testing, tests.
$(DEV_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DEV_VENV)
	$(DEV_VENV)/bin/pip install --quiet --upgrade pip
	$(DEV_VENV)/bin/pip install --quiet -e ".[train,loadtest,dev]"
	touch $@

clean-venvs:
	rm -rf $(SERVE_VENV) $(DEV_VENV) $(PEERS_VENV)
