# Every target makes .venv first (torch is installed before anything else so no CUDA build is pulled).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.cache/jax
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 0

.PHONY: venv test test-fast bench clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[cpu,test]"
	# The `clip` extra (open-clip-torch: CLIP's BPE vocabulary and the test reference ResNet),
	# without its declared deps, which pull torchvision, i.e. a CUDA torch build.
	$(BIN)/pip install -q --no-deps -c constraints.txt "open-clip-torch>=3"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Everything but the tests marked slow (the multi-GB conversion, full-size compiles).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/flux_forward.py

clean:
	rm -rf $(VENV) .cache build *.egg-info
