# Every target makes .venv first (torch is installed before anything else so no CUDA build is pulled).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.cache/jax
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 0

.PHONY: venv demo test test-fast bench docs clean

# --no-compile: pip would byte-compile all ~16k .py files of the environment (~80 CPU s on 2 cores);
# Python compiles the few thousand that are imported, once, on first import.
PIP     := $(BIN)/pip install -q --no-compile

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) -U pip
	$(PIP) torch==2.13.0
	$(PIP) -c constraints.txt -e ".[cpu,test,tpu-compile]"
	# tpu-compile = libtpu: tests compile for TPU topologies (compile-only devices) on this CPU machine.
	# The `clip` extra (open-clip-torch: CLIP's BPE vocabulary and the test reference ResNet),
	# without its declared deps, which pull torchvision, i.e. a CUDA torch build.
	$(PIP) --no-deps -c constraints.txt "open-clip-torch>=3"
	touch $(STAMP)

venv: $(STAMP)

# The whole pipeline on the tiny preset over 8 emulated CPU devices, into demo_out/ (< 10 min on 2
# cores; make demo DEMO_ARGS=--quick: < 2 min). No downloads, no user files.
demo: $(STAMP)
	XLA_FLAGS="$(XLA_FLAGS) --xla_force_host_platform_device_count=8" JAX_PLATFORMS=cpu \
		$(BIN)/fluxir demo -o demo_out --overwrite $(DEMO_ARGS)

# pytest-xdist: TEST_WORKERS processes, one test file per worker at a time (module fixtures are built
# once), the heaviest files first (tests/conftest.py HEAVY_FIRST); they share the compilation cache.
# TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST)

# Everything but the tests marked slow (the multi-GB conversion, full-size compiles).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow"

# make bench BENCH_ARGS=--quick: smoke runs into bench/results/quick/; --table-only: rebuild the README only
bench: $(STAMP)
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

docs: $(STAMP)
	$(BIN)/python -m fluxir_jax.config_docs --write

clean:
	rm -rf $(VENV) .cache build *.egg-info
