#!/usr/bin/env bash
# GPU benchmark (NVIDIA; JAX, PyTorch and diffusers preinstalled; no network), under 8 minutes:
#   1. flux-dev-shaped forward (random bf16 weights, 1024x1024 = 4096 + 512 tokens, batch 1) in JAX
#      with cudnn attention (when FluxConfig has an `attention` field) and in diffusers with SDPA:
#      ms per step, PyTorch/JAX ratio, achieved TFLOP/s (analytic count) and MFU;
#   2. FluxIR adapter forward + backward at 512x512 on the same base (JAX).
# Each part runs in its own process with its own time limit; a part that fails or times out is
# reported and the others still run. Extra wheels (e.g. flax, optax) come from an ignored .whl/
# folder: pip install --no-index --find-links .whl. Results: $OUT/gpu.jsonl (or bench/results/),
# one record whose `figures` bench/results_table.py shows. Settings: FLUXIR_BENCH_* (bench/gpu_flux.py);
# FLUXIR_BENCH_PRESET=tiny FLUXIR_BENCH_RES=128 ... runs the same code on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export FLUXIR_BENCH_RESULTS=${FLUXIR_BENCH_RESULTS:-${OUT:-$PWD/bench/results}}
mkdir -p "$FLUXIR_BENCH_RESULTS"
PARTS_DIR=$(mktemp -d)
trap 'rm -rf "$PARTS_DIR"' EXIT
export FLUXIR_BENCH_PARTS=$PARTS_DIR
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}

if compgen -G ".whl/*.whl" > /dev/null; then
  echo "== installing wheels from .whl/"
  "$PY" -m pip install -q --no-index --find-links .whl .whl/*.whl || echo "gpu.sh: some wheels did not install" >&2
fi
if ! "$PY" -c "import jax, flax, torch, diffusers" 2>/dev/null; then
  echo "gpu.sh: needs jax, flax, torch and diffusers (put missing wheels in .whl/)" >&2
  "$PY" -c "import jax, flax, torch, diffusers"
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
"$PY" -c "import jax, torch, diffusers, flax; print('jax', jax.__version__, jax.devices()[0].device_kind, '| flax', flax.__version__, '| torch', torch.__version__, '| diffusers', diffusers.__version__)"

failed=0
part() {  # part NAME SECONDS
  echo "== $1 (limit $2 s)"
  local t0=$SECONDS
  if timeout "$2" "$PY" bench/gpu_flux.py "$1"; then
    echo "== $1: done in $((SECONDS - t0)) s"
  else
    echo "== $1: FAILED or timed out after $((SECONDS - t0)) s" >&2
    failed=1
  fi
}
part jax "${FLUXIR_BENCH_LIMIT_JAX:-160}"
part torch "${FLUXIR_BENCH_LIMIT_TORCH:-110}"
if "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('fluxir_jax.models.adapter') is None)"; then
  part adapter "${FLUXIR_BENCH_LIMIT_ADAPTER:-160}"
else
  echo "== adapter: skipped (this checkout has no fluxir_jax.models.adapter)"
fi
"$PY" bench/gpu_flux.py summary || failed=1
exit $failed
