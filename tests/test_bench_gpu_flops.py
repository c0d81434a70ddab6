"""bench/gpu_flux.py: the analytic FLOP counts used for TFLOP/s and MFU agree with XLA's count.

XLA's cost analysis counts a scanned loop body once, so the model is built unrolled
(`scan_layers=False`); it also counts elementwise work, which this width keeps to about 1%.
It would also count rope's pair swap, a permutation written as a matmul (data movement, not model
work; 6% at this head dim), so XLA counts the program with BFL's paired rope, which is bitwise the same
math without that matmul (tests/models/test_layers.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from bench.gpu_flux import adapter_step_flops, forward_flops
from fluxir_jax.models.adapter import FluxIR, FluxIRConfig, fluxir_forward
from fluxir_jax.models import layers
from fluxir_jax.models.flux import Flux, FluxConfig
from tests.models.test_layers import _paired_rope

CFG = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=64, context_in_dim=256, hidden_size=256, num_heads=4,
                 depth=2, depth_single_blocks=3, axes_dim=(16, 24, 24), scan_layers=False)
L, T = 64, 32
S = jax.ShapeDtypeStruct
F32 = jnp.float32
ARGS = (S((1, L, 64), F32), S((1, L, 3), F32), S((1, T, 256), F32), S((1, T, 3), F32), S((1,), F32), S((1, 64), F32), S((1,), F32))


@pytest.fixture(autouse=True)
def paired_rope(monkeypatch):
    monkeypatch.setattr(layers, "apply_rope", lambda q, k, pe, heads_first=False: (
        _paired_rope(q, pe, heads_first), _paired_rope(k, pe, heads_first)))


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def test_forward_flops_match_xla_within_3_percent():
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Flux(CFG, rngs=nnx.Rngs(0))))
    xla = _xla_flops(lambda st, *a: nnx.merge(graphdef, st)(*a), state, *ARGS)
    ours = forward_flops(CFG, L, T)
    assert abs(xla / ours - 1) < 0.03, (xla, ours)


def test_adapter_step_flops_match_xla_within_5_percent():
    base_gd, base_st = nnx.split(nnx.eval_shape(lambda: Flux(CFG, rngs=nnx.Rngs(0))))
    ad_gd, ad_st = nnx.split(nnx.eval_shape(lambda: FluxIR(FluxIRConfig(text_len=T), CFG, rngs=nnx.Rngs(1))))

    def loss(ad, base, img, img_ids, txt, txt_ids, t, y, g):
        v = fluxir_forward(nnx.merge(base_gd, jax.lax.stop_gradient(base)), nnx.merge(ad_gd, ad), img, img, img_ids, txt,
                           txt_ids, t, y, g)
        return jnp.mean(v**2)

    xla = _xla_flops(jax.value_and_grad(loss), ad_st, base_st, *ARGS)
    ours = adapter_step_flops(CFG, L, T)
    assert abs(xla / ours - 1) < 0.05, (xla, ours)


@pytest.mark.slow  # ~15 s on an idle 2-core machine; minutes when it is shared
def test_gpu_benchmark_parts_run_on_cpu_with_the_tiny_preset(tmp_path, monkeypatch):
    """bench/gpu.sh's Python parts end to end on CPU: every part measured, figures in gpu.jsonl."""
    import json

    from bench import common, gpu_flux

    for k, v in dict(PRESET="tiny", RES="64", TRAIN_RES="32", TEXT_LEN="8", REPEATS="2", PARTS=str(tmp_path / "parts")).items():
        monkeypatch.setenv(f"FLUXIR_BENCH_{k}", v)
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    for part in ("jax", "torch", "adapter", "summary"):
        gpu_flux.PARTS[part]()
    rec = json.loads((tmp_path / "results" / "gpu.jsonl").read_text())
    assert set(rec["parts"]) == {"jax", "torch", "adapter"} and rec["device"] == "cpu"
    figs = {f["figure"]: f["value"] for f in rec["figures"]}
    fwd = "tiny forward 64² (16 + 8 tokens), batch 1, float32"
    assert figs[f"{fwd}: PyTorch time / JAX time"] == rec["parts"]["torch"]["median_s"] / rec["parts"]["jax"]["median_s"]
    assert figs[f"{fwd}: JAX (xla attention) ms per step"] > 0
    assert any(f.startswith("tiny + FluxIR adapter") and f.endswith("achieved TFLOP/s") for f in figs)
    assert not any("MFU" in f for f in figs)  # no peak known for a CPU
