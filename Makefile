# Every target makes .venv first (torch is installed before anything else so no CUDA build is pulled).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.cache/jax
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 0

.PHONY: venv test demo bench clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q torch==2.13.0
	# tpu-compile = libtpu: tests compile for TPU topologies (compile-only devices) on this CPU machine.
	$(BIN)/pip install -q -c constraints.txt "jax[cpu]" -e ".[test,tpu-compile]"
	# open_clip: its CLIP BPE vocabulary (CLIP-IQA conversion) and its ModifiedResNet (test
	# reference). --no-deps: its declared deps pull torchvision, i.e. a CUDA torch build.
	$(BIN)/pip install -q --no-deps -c constraints.txt open-clip-torch
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	@echo "make demo: the end-to-end restoration demo arrives with the restoration/demo issue."

bench: $(STAMP)
	$(BIN)/python bench/flux_forward.py

clean:
	rm -rf $(VENV) .cache build *.egg-info
