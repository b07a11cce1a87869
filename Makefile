# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install what is missing (apt + pip) first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.k1rl-installed
SEED ?= 0
# sandbox: bubblewrap (isolation), libseccomp2 (its filter), g++/gcc (C, C++ programs),
# podman + runc + catatonit (the container runner, tested beside bwrap)
APT_PACKAGES := libibverbs1 bubblewrap libseccomp2 g++ gcc podman runc catatonit
# vLLM's PyPI deps pull torchvision/torchaudio/torchcodec builds that do not load
# beside the +cpu torch and break `transformers` imports: they are removed after install.
BROKEN_WITH_CPU_TORCH := torchvision torchaudio torchcodec

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-fast demo bench clean

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

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

demo: $(STAMP)
	$(PY) -m k1rl demo --seed $(SEED)

bench: $(STAMP)
	$(PY) bench/weight_sync.py

clean:
	rm -rf runs artifacts .pytest_cache
