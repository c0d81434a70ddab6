#!/usr/bin/env bash
# Prepared accelerator benchmark (run through the device tool; never from tests).
# flux-dev-shaped transformer with random bf16 weights: compile time and one-step latency at
# 1024x1024 (4096 image tokens + 512 text tokens), batch 1 and 4. Results land in $OUT (or
# bench/results) as JSONL; copy them into bench/results/ and the closing note.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python - <<'PY' 2>&1 | tee "$OUT_DIR/gpu_flux_step.txt"
import json, os, statistics, time
import jax, jax.numpy as jnp
from flax import nnx
from fluxir_jax.models import configs
from fluxir_jax.models.flux import Flux
cfg = configs.get("flux-dev")
graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Flux(cfg, rngs=nnx.Rngs(0))))
# random bf16 weights materialised on device (never on host)
leaves, treedef = jax.tree.flatten(abstract)
keys = jax.random.split(jax.random.key(0), len(leaves))
@jax.jit
def init(keys):
    return jax.tree.unflatten(treedef, [(0.02 * jax.random.normal(k, l.shape, jnp.float32)).astype(l.dtype) for k, l in zip(keys, leaves)])
state = init(keys)
def step(state, *a):
    return nnx.merge(graphdef, state)(*a)
for b in (1, 4):
    L, T = 4096, 512
    args = (jnp.zeros((b, L, 64), jnp.bfloat16), jnp.zeros((b, L, 3)), jnp.zeros((b, T, 4096), jnp.bfloat16), jnp.zeros((b, T, 3)),
            jnp.full((b,), 0.5), jnp.zeros((b, 768), jnp.bfloat16), jnp.full((b,), 3.5))
    t0 = time.perf_counter(); c = jax.jit(step).lower(state, *args).compile(); tc = time.perf_counter() - t0
    c(state, *args).block_until_ready()
    ts = []
    for _ in range(10):
        t0 = time.perf_counter(); c(state, *args).block_until_ready(); ts.append(time.perf_counter() - t0)
    flops = 2 * 8.6e9 * (L + T) * b  # matmul FLOPs per forward (our estimate, excl. attention)
    rec = dict(bench="flux-dev step 1024^2", batch=b, compile_s=round(tc, 2), median_s=round(statistics.median(ts), 4),
               approx_tflops=round(flops / statistics.median(ts) / 1e12, 1), device=jax.devices()[0].device_kind, jax=jax.__version__)
    print(json.dumps(rec))
PY
