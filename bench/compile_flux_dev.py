"""AOT lower + compile of one full flux-dev step from abstract shapes (no weights allocated).

Run with the persistent compilation cache OFF so the figure is a real compile:
    .venv/bin/python bench/compile_flux_dev.py [--res 1024] [--batch 1] [--grad]
Prints lower and compile seconds and XLA's memory analysis; appends to bench/results/compile.jsonl.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import append_record, cpu_name  # noqa: E402
from fluxir_jax.models import presets  # noqa: E402
from fluxir_jax.models.flux import Flux  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="flux-dev")
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--grad", action="store_true", help="compile a backward pass w.r.t. the input instead")
    ap.add_argument("--remat", default="none")
    args = ap.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)

    cfg = presets.get(args.model, remat_policy=args.remat)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Flux(cfg, rngs=nnx.Rngs(0))))
    b, L, T = args.batch, (args.res // 16) ** 2, 512
    S, bf, f32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32
    shapes = (S((b, L, 64), bf), S((b, L, 3), f32), S((b, T, 4096), bf), S((b, T, 3), f32), S((b,), f32), S((b, 768), bf), S((b,), f32))

    def step(state, img, *rest):
        return nnx.merge(graphdef, state)(img, *rest)

    fn = step
    if args.grad:
        fn = jax.grad(lambda s, img, *r: jnp.mean(step(s, img, *r).astype(f32) ** 2), argnums=1)
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(state, *shapes)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    rec = dict(
        model=args.model, res=args.res, batch=b, grad=args.grad, remat=args.remat,
        lower_s=round(t1 - t0, 2), compile_s=round(t2 - t1, 2),
        temp_bytes=getattr(mem, "temp_size_in_bytes", None), argument_bytes=getattr(mem, "argument_size_in_bytes", None),
        backend=jax.default_backend(), device=str(jax.devices()[0].device_kind), cpu=cpu_name(), cores=os.cpu_count(),
        jax=jax.__version__, date=time.strftime("%Y-%m-%d"),
    )
    append_record("compile.jsonl", rec)


if __name__ == "__main__":
    main()
