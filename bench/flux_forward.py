"""Transformer forward time: our jitted Flax model vs diffusers' PyTorch model, same config and weights.

    .venv/bin/python bench/flux_forward.py [--model small] [--res 256] [--txt 128] [--repeats 7]

`make bench` (bench/run_all.py) runs it for the `tiny` and `small` presets at 256x256.

Both run float32 on the CPU with the same thread count; medians over repeats after a warm-up
(compile time reported separately). On an accelerator pass --dtype bfloat16 (PyTorch is then
skipped unless CUDA is available). Appends a record to bench/results/flux_forward.jsonl.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import append_record, cpu_name, timed  # noqa: E402
from fluxir_jax.models import presets  # noqa: E402
from fluxir_jax.models.flux import Flux  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small", help="model preset (tiny, small, flux-dev, ...)")
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--txt", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls of each model after the first")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()

    cfg = presets.get(args.model, dtype=args.dtype, param_dtype=args.dtype)
    h = w = args.res // 16
    b, L, T = args.batch, h * w, args.txt
    rng = np.random.default_rng(0)
    x = dict(
        img=rng.standard_normal((b, L, cfg.in_channels)).astype(np.float32),
        txt=rng.standard_normal((b, T, cfg.context_in_dim)).astype(np.float32),
        y=rng.standard_normal((b, cfg.vec_in_dim)).astype(np.float32),
        t=np.full((b,), 0.5, np.float32), g=np.full((b,), 3.5, np.float32),
    )
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1], ids[..., 2] = np.arange(h)[:, None], np.arange(w)[None]
    img_ids, txt_ids = ids.reshape(L, 3), np.zeros((T, 3), np.float32)

    model = Flux(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, img, img_ids, txt, txt_ids, t, y, g):
        return nnx.merge(graphdef, state)(img, img_ids, txt, txt_ids, t, y, g)

    bc = lambda a: jnp.broadcast_to(jnp.asarray(a), (b, *a.shape))  # noqa: E731
    jargs = (state, jnp.asarray(x["img"]), bc(img_ids), jnp.asarray(x["txt"]), bc(txt_ids), jnp.asarray(x["t"]), jnp.asarray(x["y"]), jnp.asarray(x["g"]))
    t0 = time.perf_counter()
    fwd(*jargs).block_until_ready()
    compile_s = time.perf_counter() - t0
    timed(lambda: fwd(*jargs).block_until_ready(), args.warmup)
    jax_s, jax_all = timed(lambda: fwd(*jargs).block_until_ready(), args.repeats)

    rec = dict(model=args.model, res=args.res, tokens=L, txt=T, batch=b, dtype=args.dtype, jax_median_s=round(jax_s, 4),
               jax_first_call_s=round(compile_s, 2), backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
               cpu=cpu_name(), cores=os.cpu_count(), repeats=args.repeats,
               warmup=args.warmup)
    if not args.no_torch and args.dtype == "float32":
        import torch

        from bench.torch_twin import diffusers_flux

        torch.set_num_threads(os.cpu_count())
        dm = diffusers_flux(model)  # same weights as `model`
        targs = dict(hidden_states=torch.from_numpy(x["img"]), encoder_hidden_states=torch.from_numpy(x["txt"]),
                     pooled_projections=torch.from_numpy(x["y"]), timestep=torch.from_numpy(x["t"]),
                     img_ids=torch.from_numpy(img_ids), txt_ids=torch.from_numpy(txt_ids), guidance=torch.from_numpy(x["g"]), return_dict=False)
        with torch.inference_mode():
            ref = dm(**targs)[0].numpy()
            timed(lambda: dm(**targs), args.warmup)  # first calls allocate and pick kernels
            torch_s, _ = timed(lambda: dm(**targs), args.repeats)
        out = np.asarray(fwd(*jargs))
        rec.update(torch_median_s=round(torch_s, 4), torch_over_jax=round(torch_s / jax_s, 2),
                   rel_err_vs_torch=float(np.linalg.norm(out - ref) / np.linalg.norm(ref)), torch=torch.__version__)
    rec["date"] = time.strftime("%Y-%m-%d")
    append_record("flux_forward.jsonl", rec)


if __name__ == "__main__":
    main()
