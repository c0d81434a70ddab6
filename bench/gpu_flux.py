"""Accelerator benchmark parts run by bench/gpu.sh, each in its own process (JAX and PyTorch must
not share the GPU's memory):

    python bench/gpu_flux.py jax       # FLUX forward in JAX (cudnn attention when FluxConfig has it)
    python bench/gpu_flux.py torch     # the same forward in diffusers (SDPA attention)
    python bench/gpu_flux.py adapter   # FluxIR adapter forward + backward (adapter gradients)
    python bench/gpu_flux.py summary   # ratio, achieved TFLOP/s, MFU; appends bench/results/gpu.jsonl

Random weights (bf16 on GPU), batch 1, no files read. Parts write JSON into $FLUXIR_BENCH_PARTS;
`summary` appends one record to $FLUXIR_BENCH_RESULTS/gpu.jsonl (or bench/results/gpu.jsonl).
Environment (defaults are the flux-dev figures; a tiny preset runs the same code on CPU):
  FLUXIR_BENCH_PRESET   model preset (flux-dev)           FLUXIR_BENCH_RES        forward image side (1024)
  FLUXIR_BENCH_TRAIN_RES  adapter image side (512)       FLUXIR_BENCH_TEXT_LEN   text tokens (512)
  FLUXIR_BENCH_REPEATS  timed calls (10)                   FLUXIR_BENCH_DTYPE      bfloat16 (GPU) / float32 (CPU)
  FLUXIR_BENCH_ATTENTION  JAX attention kernel (cudnn on GPU, xla elsewhere)
  FLUXIR_BENCH_PEAK_TFLOPS  dense bf16 peak per device for MFU (default: H100/H200 989, A100 312)
FLOPs are counted analytically (matmuls and attention; `forward_flops`, `adapter_step_flops`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0}  # dense bf16, per device


def env(name: str, default: str) -> str:
    return os.environ.get(f"FLUXIR_BENCH_{name}", default)


def settings() -> dict:
    return dict(preset=env("PRESET", "flux-dev"), res=int(env("RES", "1024")), train_res=int(env("TRAIN_RES", "512")),
                text_len=int(env("TEXT_LEN", "512")), repeats=int(env("REPEATS", "10")))


def parts_dir() -> pathlib.Path:
    d = pathlib.Path(env("PARTS", str(ROOT / "bench" / "results" / "gpu_parts")))
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_part(name: str, rec: dict) -> None:
    print(json.dumps(rec), flush=True)
    (parts_dir() / f"{name}.json").write_text(json.dumps(rec) + "\n")


# ----------------------------------------------------------------------------- FLOP counts


def forward_flops(cfg, img_tokens: int, txt_tokens: int, batch: int = 1) -> float:
    """Matmul + attention FLOPs of one transformer forward (2 per multiply-add).

    Per token and block: double blocks 2*(3D + D + 2*mlp)*D per stream (qkv, proj, MLP), single
    blocks 2*(3D + mlp + (D + mlp))*D (linear1 -> qkv + MLP in, linear2); attention 4*S^2*D per
    block (QK^T and AV) over S = img + txt tokens; plus the token embedders, the final layer and the
    per-sample modulation/vector MLPs.
    """
    d, s, mlp = cfg.hidden_size, img_tokens + txt_tokens, int(cfg.hidden_size * cfg.mlp_ratio)
    per_token_double = 2 * (3 * d + d + 2 * mlp) * d
    per_token_single = 2 * (3 * d + mlp + (d + mlp)) * d
    attn = 4 * s * s * d
    blocks = cfg.depth * (per_token_double * s + attn) + cfg.depth_single_blocks * (per_token_single * s + attn)
    tokens = 2 * img_tokens * cfg.in_channels * d + 2 * txt_tokens * cfg.context_in_dim * d + 2 * img_tokens * d * cfg.out_channels
    per_sample = 2 * d * (cfg.depth * 12 * d + cfg.depth_single_blocks * 3 * d + 2 * d)  # adaLN modulations
    per_sample += 2 * (256 * d + d * d) * (2 + cfg.guidance_embed) + 2 * (cfg.vec_in_dim - 256) * d  # time/guidance/vector MLPs
    return float(batch * (blocks + tokens + per_sample))


def adapter_step_flops(cfg, img_tokens: int, txt_tokens: int, batch: int = 1) -> float:
    """FLOPs of base + adapter forward, then the backward to the adapter's parameters (control of all blocks).

    The frozen base is differentiated only with respect to its activations, and only where they
    depend on the adapter: from the output back to the first control residual (added after double
    block 0), so every block but the first costs 1x its forward matmuls and 2x its attention,
    plus the final layer's input gradient. The adapter's double block costs 2x its forward in the
    backward (inputs and weights); `lq_in` gets a weight gradient, `txt_in` (applied to theta_p)
    an input gradient. Per-sample vector work is left out (tiny).
    """
    d, s, mlp = cfg.hidden_size, img_tokens + txt_tokens, int(cfg.hidden_size * cfg.mlp_ratio)
    attn = 4 * s * s * d
    double = 2 * (3 * d + d + 2 * mlp) * d * s
    single = 2 * (3 * d + mlp + (d + mlp)) * d * s
    base_fwd = forward_flops(cfg, img_tokens, txt_tokens, 1)
    base_bwd = (cfg.depth - 1) * (double + 2 * attn) + cfg.depth_single_blocks * (single + 2 * attn) + 2 * img_tokens * d * cfg.out_channels
    embed = 2 * img_tokens * cfg.in_channels * d  # one of img_in / lq_in
    text_in = 2 * txt_tokens * cfg.context_in_dim * d
    adapter_fwd = double + attn + 2 * embed + text_in
    adapter_bwd = 2 * double + 2 * attn + embed + text_in
    return float(batch * (base_fwd + base_bwd + adapter_fwd + adapter_bwd))


# ----------------------------------------------------------------------------- JAX parts


def jax_setup():
    import jax

    from fluxir_jax.models import presets
    from fluxir_jax.models.flux import FluxConfig

    s = settings()
    gpu = jax.default_backend() == "gpu"
    dtype = env("DTYPE", "bfloat16" if gpu else "float32")
    extra = dict(dtype=dtype, param_dtype=dtype)
    note = "xla"  # a FluxConfig without an `attention` field always runs jax.nn.dot_product_attention's XLA path
    if "attention" in {f.name for f in dataclasses.fields(FluxConfig)}:
        extra["attention"] = note = env("ATTENTION", "cudnn" if gpu else "xla")
    return s, presets.get(s["preset"], **extra), note


def random_state(abstract_state, seed: int):
    """Random normal * 0.02 of every leaf, created on the device inside one jit (never on the host)."""
    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree.flatten(abstract_state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    @jax.jit
    def init(keys):
        return jax.tree.unflatten(treedef, [(0.02 * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
                                            for k, x in zip(keys, leaves)])

    return init(keys)


def jax_inputs(cfg, res: int, text_len: int):
    import jax.numpy as jnp
    import numpy as np

    h = w = res // 16
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1], ids[..., 2] = np.arange(h)[:, None], np.arange(w)[None]
    rng = np.random.default_rng(0)
    dt = jnp.dtype(cfg.dtype)
    return dict(
        img=jnp.asarray(rng.standard_normal((1, h * w, cfg.in_channels)), dt), img_ids=jnp.asarray(ids.reshape(1, h * w, 3)),
        txt=jnp.asarray(rng.standard_normal((1, text_len, cfg.context_in_dim)), dt), txt_ids=jnp.zeros((1, text_len, 3), jnp.float32),
        t=jnp.full((1,), 0.5, jnp.float32), y=jnp.asarray(rng.standard_normal((1, cfg.vec_in_dim)), dt),
        g=jnp.full((1,), 3.5, jnp.float32) if cfg.guidance_embed else None,
    )


def _time_jax(fn, repeats: int) -> tuple[float, float]:
    """(seconds of the first call, median seconds of `repeats` calls after two warm-ups)."""
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    for _ in range(2):
        jax.block_until_ready(fn())
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return first, statistics.median(ts)


def part_jax() -> None:
    import jax
    from flax import nnx

    from fluxir_jax.models.flux import Flux

    s, cfg, note = jax_setup()
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Flux(cfg, rngs=nnx.Rngs(0))))
    state = random_state(abstract, 0)
    x = jax_inputs(cfg, s["res"], s["text_len"])

    @jax.jit
    def fwd(state, x):
        return nnx.merge(graphdef, state)(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["y"], x["g"])

    first, med = _time_jax(lambda: fwd(state, x), s["repeats"])
    tokens = (s["res"] // 16) ** 2
    save_part("jax", dict(s, dtype=cfg.dtype, note=note, first_call_s=round(first, 2), median_s=med, img_tokens=tokens,
                          flops=forward_flops(cfg, tokens, s["text_len"]), device=jax.devices()[0].device_kind,
                          backend=jax.default_backend(), jax=jax.__version__))


def part_adapter() -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from fluxir_jax.models.adapter import FluxIR, FluxIRConfig, fluxir_forward
    from fluxir_jax.models.flux import Flux

    s, cfg, note = jax_setup()
    base_graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Flux(cfg, rngs=nnx.Rngs(0))))
    base_state = random_state(abstract, 0)
    ad_cfg = FluxIRConfig(text_len=s["text_len"])
    ad_graphdef, ad_abstract = nnx.split(nnx.eval_shape(lambda: FluxIR(ad_cfg, cfg, rngs=nnx.Rngs(1))))
    ad_state = random_state(ad_abstract, 1)  # gates random too, so every path carries signal
    x = jax_inputs(cfg, s["train_res"], s["text_len"])
    x["lq"] = x["img"][:, ::-1]
    x["target"] = x["img"] * 0.5

    def loss(ad_state, base_state, x):
        base = nnx.merge(base_graphdef, jax.lax.stop_gradient(base_state))
        adapter = nnx.merge(ad_graphdef, ad_state)
        v = fluxir_forward(base, adapter, x["img"], x["lq"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["y"], x["g"])
        return jnp.mean((v.astype(jnp.float32) - x["target"].astype(jnp.float32)) ** 2)

    step = jax.jit(jax.value_and_grad(loss))
    first, med = _time_jax(lambda: step(ad_state, base_state, x), s["repeats"])
    tokens = (s["train_res"] // 16) ** 2
    n_params = sum(a.size for a in jax.tree.leaves(ad_state))
    save_part("adapter", dict(s, dtype=cfg.dtype, note=note, first_call_s=round(first, 2), median_s=med, img_tokens=tokens,
                              adapter_params=int(n_params), flops=adapter_step_flops(cfg, tokens, s["text_len"]),
                              device=jax.devices()[0].device_kind, jax=jax.__version__))


# ----------------------------------------------------------------------------- PyTorch part


def part_torch() -> None:
    import numpy as np
    import torch
    from diffusers import FluxTransformer2DModel

    from fluxir_jax.models import presets

    s = settings()
    cfg = presets.get(s["preset"])
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, env("DTYPE", "bfloat16" if cuda else "float32"))
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the benchmark dtype: no float32 copy of a 12B model
    with dev:
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=cfg.in_channels, num_layers=cfg.depth, num_single_layers=cfg.depth_single_blocks,
            attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_in_dim,
            pooled_projection_dim=cfg.vec_in_dim, guidance_embeds=cfg.guidance_embed, axes_dims_rope=tuple(cfg.axes_dim),
        ).to(dtype).eval()
    torch.set_default_dtype(default_dtype)
    h = w = s["res"] // 16
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1], ids[..., 2] = np.arange(h)[:, None], np.arange(w)[None]
    T = s["text_len"]
    args = dict(hidden_states=torch.randn(1, h * w, cfg.in_channels, device=dev, dtype=dtype),
                encoder_hidden_states=torch.randn(1, T, cfg.context_in_dim, device=dev, dtype=dtype),
                pooled_projections=torch.randn(1, cfg.vec_in_dim, device=dev, dtype=dtype),
                timestep=torch.full((1,), 0.5, device=dev, dtype=dtype),
                img_ids=torch.from_numpy(ids.reshape(h * w, 3)).to(dev), txt_ids=torch.zeros(T, 3, device=dev),
                guidance=torch.full((1,), 3.5, device=dev, dtype=dtype) if cfg.guidance_embed else None, return_dict=False)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    ts = []
    with torch.inference_mode():
        for _ in range(3):
            model(**args)
        sync()
        for _ in range(s["repeats"]):
            t0 = time.perf_counter()
            model(**args)
            sync()
            ts.append(time.perf_counter() - t0)
    save_part("torch", dict(s, dtype=str(dtype).replace("torch.", ""), median_s=statistics.median(ts), img_tokens=h * w,
                            flops=forward_flops(cfg, h * w, T), attention="SDPA (diffusers default processor)",
                            device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__))


# ----------------------------------------------------------------------------- summary


def peak_tflops(device: str) -> float | None:
    if env("PEAK_TFLOPS", ""):
        return float(env("PEAK_TFLOPS", ""))
    for name, peak in PEAK_TFLOPS.items():
        if name in device.upper():
            return peak
    return None


def part_summary() -> None:
    from bench.common import RESULTS, append_record, cpu_name

    parts = {p.stem: json.loads(p.read_text()) for p in sorted(parts_dir().glob("*.json"))}
    if not parts:
        raise SystemExit("gpu_flux summary: no parts were measured")
    any_part = next(iter(parts.values()))
    device = any_part.get("device", "unknown")
    peak = peak_tflops(device)
    figures, lines = [], []

    def add(figure, value, unit, repeats=None):
        figures.append(dict(figure=figure, value=value, unit=unit, repeats=repeats if repeats is not None else any_part["repeats"]))
        lines.append(f"  {figure}: {value:.4g} {unit}")

    def throughput(name, p, what):
        ms = 1e3 * p["median_s"]
        tflops = p["flops"] / p["median_s"] / 1e12
        add(f"{what}: {name} ms per step", ms, "ms")
        add(f"{what}: {name} achieved TFLOP/s", tflops, "TFLOP/s")
        if peak:
            add(f"{what}: {name} MFU (peak {peak:g} TFLOP/s)", 100 * tflops / peak, "%")

    fwd = None
    if "jax" in parts:
        p = parts["jax"]
        fwd = f"{p['preset']} forward {p['res']}² ({p['img_tokens']} + {p['text_len']} tokens), batch 1, {p['dtype']}"
        throughput(f"JAX ({p['note']} attention)", p, fwd)
    if "torch" in parts:
        p = parts["torch"]
        fwd = fwd or f"{p['preset']} forward {p['res']}² ({p['img_tokens']} + {p['text_len']} tokens), batch 1, {p['dtype']}"
        throughput("PyTorch diffusers (SDPA)", p, fwd)
    if "jax" in parts and "torch" in parts:
        add(f"{fwd}: PyTorch time / JAX time", parts["torch"]["median_s"] / parts["jax"]["median_s"], "x")
    if "adapter" in parts:
        p = parts["adapter"]
        what = (f"{p['preset']} + FluxIR adapter ({p['adapter_params'] / 1e6:.3g}M params) forward + backward {p['train_res']}² "
                f"({p['img_tokens']} + {p['text_len']} tokens), batch 1, {p['dtype']}")
        throughput(f"JAX ({p['note']} attention)", p, what)
    rec = dict(benchmark=f"gpu ({any_part['preset']})", device=device, cpu=cpu_name(), cores=os.cpu_count(),
               host=platform.node(), flops="analytic (bench/gpu_flux.py)", parts=parts, figures=figures,
               date=time.strftime("%Y-%m-%d"))
    print(f"{device}:")
    print("\n".join(lines))
    append_record("gpu.jsonl", rec)
    print(f"-> {RESULTS / 'gpu.jsonl'}")


PARTS = {"jax": part_jax, "torch": part_torch, "adapter": part_adapter, "summary": part_summary}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in PARTS:
        raise SystemExit(f"usage: python bench/gpu_flux.py {{{'|'.join(PARTS)}}}")
    PARTS[sys.argv[1]]()
