"""The whole Flax FLUX transformer against diffusers' FluxTransformer2DModel (every weight random)."""
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from fluxir_jax.models import presets
from fluxir_jax.models.flux import Control, ControlStream, Flux, FluxConfig
from tests.models.flux_reference import (
    flax_from_diffusers,
    inputs,
    rel_err,
    run_diffusers,
    run_flax,
    tiny_diffusers,
)

PARITY_TOL = 1e-5  # ||flax - torch|| / ||torch||, float32, highest matmul precision
BF16_TOL = 2e-2  # bfloat16 activations vs the float32 model


@pytest.mark.parametrize("guidance", [True, False])
def test_matches_diffusers(guidance):
    dm = tiny_diffusers(guidance, seed=1 if guidance else 2)
    model = flax_from_diffusers(dm)
    x = inputs(batch=2, h=3, w=5, t=7)  # non-square 3x5 token grid, text length 7
    ref = run_diffusers(dm, x, guidance)
    with jax.default_matmul_precision("highest"):
        out = run_flax(model, x, guidance)
    err = rel_err(out, ref)
    print(f"flux vs diffusers (guidance={guidance}): rel err {err:.2e}")
    assert out.shape == ref.shape == (2, 15, 64)
    assert err <= PARITY_TOL


def test_every_weight_was_randomized():
    """Guards the parity test: no diffusers parameter may keep its constructor value."""
    from diffusers import FluxTransformer2DModel

    from tests.models.flux_reference import TINY_DIFFUSERS

    torch.manual_seed(0)
    fresh = FluxTransformer2DModel(guidance_embeds=True, **TINY_DIFFUSERS).state_dict()
    randomized = tiny_diffusers(True, seed=1).state_dict()
    same = [k for k in fresh if torch.equal(fresh[k], randomized[k])]
    assert not same


def test_control_residuals_match_diffusers_controlnet_injection():
    """Image-stream residuals after every double and single block == diffusers' controlnet samples."""
    dm = tiny_diffusers(True, seed=3)
    model = flax_from_diffusers(dm)
    x = inputs(batch=2, h=4, w=3, t=5, seed=3)
    rng = np.random.default_rng(7)
    d = rng.standard_normal((2, 2, 12, 32)).astype(np.float32) * 0.3  # [depth, B, L, C]
    s = rng.standard_normal((3, 2, 12, 32)).astype(np.float32) * 0.3
    ref = run_diffusers(
        dm, x, controlnet_block_samples=[torch.from_numpy(a) for a in d],
        controlnet_single_block_samples=[torch.from_numpy(a) for a in s],
    )
    control = Control(double=ControlStream(img=jnp.asarray(d)), single=ControlStream(img=jnp.asarray(s)))
    with jax.default_matmul_precision("highest"):
        out = run_flax(model, x, control=control)
        plain = run_flax(model, x)
    assert rel_err(out, ref) <= PARITY_TOL
    assert rel_err(plain, ref) > 1e-3  # the residuals really changed the output


def test_shared_features_with_gates_equal_per_block_residuals():
    """The factored control form (features [B,N,C] x gates [n,B,C]) equals explicit per-block residuals, txt included."""
    model = Flux(presets.get("tiny", depth=2, depth_single_blocks=3), rngs=nnx.Rngs(0))
    x = inputs(batch=2, h=2, w=3, t=4, ctx=32, vec=32)
    rng = np.random.default_rng(0)
    f_img, f_txt = rng.standard_normal((2, 6, 64)), rng.standard_normal((2, 4, 64))
    g = {k: rng.standard_normal((n, 2, 64)) for k, n in (("di", 2), ("dt", 2), ("si", 3), ("st", 3))}
    a = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    factored = Control(
        double=ControlStream(a(f_img), a(f_txt), a(g["di"]), a(g["dt"])),
        single=ControlStream(a(f_img), a(f_txt), a(g["si"]), a(g["st"])),
    )
    per_block = Control(
        double=ControlStream(a(f_img[None] * g["di"][:, :, None]), a(f_txt[None] * g["dt"][:, :, None])),
        single=ControlStream(a(f_img[None] * g["si"][:, :, None]), a(f_txt[None] * g["st"][:, :, None])),
    )
    with jax.default_matmul_precision("highest"):
        out_f = run_flax(model, x, control=factored)
        out_p = run_flax(model, x, control=per_block)
        plain = run_flax(model, x)
        zero = run_flax(model, x, control=Control(single=ControlStream(txt=jnp.zeros((3, 2, 4, 64)))))
    assert rel_err(out_f, out_p) <= 1e-6
    assert rel_err(out_f, plain) > 1e-3
    np.testing.assert_array_equal(np.asarray(zero), np.asarray(plain))


def test_bfloat16_activations_close_to_float32():
    dm = tiny_diffusers(True, seed=4)
    x = inputs(seed=4)
    with jax.default_matmul_precision("highest"):
        ref = run_flax(flax_from_diffusers(dm), x)
    out = run_flax(flax_from_diffusers(dm, dtype="bfloat16"), x)
    err = rel_err(np.asarray(out, np.float32), ref)
    print(f"bf16 vs f32: rel err {err:.2e}")
    assert out.dtype == jnp.bfloat16
    assert err <= BF16_TOL


def _loss_and_grad(model, x):
    """Jitted (loss, (d loss / d params, d loss / d img)) of `model` on inputs `x`."""
    graphdef, params = nnx.split(model)

    def loss(p, img):
        out = run_flax(nnx.merge(graphdef, p), dict(x, img=img))
        return jnp.mean(out**2)

    with jax.default_matmul_precision("highest"):
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, jnp.asarray(x["img"]))


@pytest.fixture(scope="module")
def variants_base():
    """(diffusers model, inputs, loss and gradients of the default scanned no-remat model): computed once."""
    dm = tiny_diffusers(True, seed=5)
    x = inputs(seed=5)
    return dm, x, _loss_and_grad(flax_from_diffusers(dm), x)


@pytest.mark.parametrize("variant", [dict(scan_layers=False), dict(scan_unroll=2), dict(scan_unroll_single=2), dict(remat_policy="full"), dict(remat_policy="save_attention"), dict(remat_policy="save_qkv_attention"),
                                     dict(scan_group_single=3), dict(scan_group_single=3, remat_policy="save_attention")])
def test_scan_and_remat_variants_give_the_same_output_and_gradients(variants_base, variant):
    dm, x, (l0, (gp0, gi0)) = variants_base
    l1, (gp1, gi1) = _loss_and_grad(flax_from_diffusers(dm, **variant), x)
    assert abs(float(l0) - float(l1)) <= 1e-6 * abs(float(l0))
    assert rel_err(gi1, gi0) <= 1e-5
    for a, b in zip(jax.tree.leaves(gp1), jax.tree.leaves(gp0)):
        assert rel_err(a, b) <= 1e-4 or np.linalg.norm(np.asarray(b)) < 1e-12


def test_grouped_loops_give_every_blocks_output_and_check_the_group_divides_the_depth():
    """scan_group: a loop body of several blocks written out gives the same per-block outputs
    (intermediates) as one block per body; a group that does not divide a loop's depth is an error."""
    cfg = dict(dataclasses.asdict(presets.get("tiny")), depth=2, depth_single_blocks=4)
    x = {k: jnp.asarray(v) for k, v in inputs(batch=2, h=2, w=3, t=3).items()}
    ids = lambda a: jnp.broadcast_to(a, (2, *a.shape))  # noqa: E731
    args = (x["img"], ids(x["img_ids"]), x["txt"], ids(x["txt_ids"]), x["timesteps"], x["y"], x["guidance"])
    outs = []
    for group in ({}, dict(scan_group=2), dict(scan_group=2, scan_group_single=4)):
        model = Flux(FluxConfig(**{**cfg, **group}), rngs=nnx.Rngs(3))
        graphdef, state = nnx.split(model)
        with jax.default_matmul_precision("highest"):
            outs.append(jax.jit(lambda s, g=graphdef: nnx.merge(g, s).forward(*args, intermediates=True))(state))
    (out0, inter0), *rest = outs
    assert {k: v.shape[0] for k, v in inter0.items() if v is not None} == {"double_img": 2, "double_txt": 2, "single": 4}
    for out, inter in rest:
        assert rel_err(out, out0) <= 1e-6
        for k, v in inter0.items():
            assert (v is None) == (inter[k] is None) and (v is None or rel_err(inter[k], v) <= 1e-6), k
    with pytest.raises(ValueError, match="scan_group_single 3 does not divide the loop's 4 blocks"):
        FluxConfig(**{**cfg, "scan_group_single": 3})
    with pytest.raises(ValueError, match="scan_group must be >= 1, got 0"):
        FluxConfig(**{**cfg, "scan_group": 0})


def test_jit_of_split_model_matches_eager():
    model = Flux(presets.get("tiny"), rngs=nnx.Rngs(0))
    x = inputs(batch=1, h=2, w=2, t=3, ctx=32, vec=32)
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda s: run_flax(nnx.merge(graphdef, s), x))(state)
    eager = run_flax(model, x)
    assert rel_err(jitted, eager) <= 1e-5


class TestBadInput:
    model = None

    @classmethod
    def setup_class(cls):
        cls.model = Flux(presets.get("tiny"), rngs=nnx.Rngs(0))
        cls.x = inputs(batch=2, h=2, w=2, t=3)

    def call(self, **changes):
        x = dict(self.x)
        guidance = changes.pop("guidance_on", True)
        x.update({k: np.asarray(v) for k, v in changes.items()})
        return run_flax(self.model, x, guidance)

    @pytest.mark.parametrize(
        "name,value,pattern",
        [
            ("img", np.zeros((2, 4, 16), np.float32), r"`img` must have shape \[\*, \*, 64\]"),
            ("txt", np.zeros((2, 3, 8), np.float32), r"`txt` must have shape \[2, \*, 32\]"),
            ("img_ids", np.zeros((5, 3), np.float32), r"`img_ids` must have shape \[2, 4, 3\]"),
            ("txt_ids", np.zeros((3, 2), np.float32), r"`txt_ids` must have shape \[2, 3, 3\]"),
            ("timesteps", np.zeros((3,), np.float32), r"`timesteps` must have shape \[2\]"),
            ("y", np.zeros((2, 7), np.float32), r"`y` must have shape \[2, 32\]"),
        ],
    )
    def test_shape_errors_name_the_argument(self, name, value, pattern):
        with pytest.raises(ValueError, match=pattern):
            self.call(**{name: value})

    def test_missing_guidance(self):
        with pytest.raises(ValueError, match="`guidance`.*required"):
            self.call(guidance_on=False)

    def test_bad_control_shape(self):
        bad = Control(double=ControlStream(img=jnp.zeros((2, 2, 4, 64))))  # depth is 1
        with pytest.raises(ValueError, match=r"control.double.img` must have shape \[1, 2, 4, 64\]"):
            run_flax(self.model, self.x, control=bad)


def test_presets():
    tiny = presets.get("tiny")
    n = sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: Flux(tiny, rngs=nnx.Rngs(0))), nnx.Param)))
    assert 1e5 <= n <= 1e6
    small = presets.get("small")
    n = sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: Flux(small, rngs=nnx.Rngs(0))), nnx.Param)))
    assert 5e7 <= n <= 1e8
    dev = presets.get("flux-dev")
    n = sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: Flux(dev, rngs=nnx.Rngs(0))), nnx.Param)))
    assert abs(n - 11.9e9) < 0.05e9  # BFL flux1-dev has ~11.9B parameters
    assert presets.get("flux-schnell").guidance_embed is False


@pytest.mark.slow   # compiles the full 12B-parameter graph
def test_full_flux_dev_compiles_from_abstract_shapes():
    """AOT lower + compile of one 1024x1024 flux-dev step (batch 1) with no weights allocated."""
    cfg = presets.get("flux-dev")
    abstract = nnx.eval_shape(lambda: Flux(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    L, T = (1024 // 16) ** 2, 512
    S = jax.ShapeDtypeStruct
    bf = jnp.bfloat16
    args = (S((1, L, 64), bf), S((1, L, 3), jnp.float32), S((1, T, 4096), bf), S((1, T, 3), jnp.float32),
            S((1,), jnp.float32), S((1, 768), bf), S((1,), jnp.float32))

    def step(state, *a):
        return nnx.merge(graphdef, state)(*a)

    t0 = time.perf_counter()
    lowered = jax.jit(step).lower(state, *args)
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    print(f"flux-dev 1024x1024 lower+compile: {seconds:.1f} s")
    out = compiled.out_info
    assert out.shape == (1, L, 64) and out.dtype == bf


def test_intermediates_match_diffusers_blocks():
    """Per-block outputs (what `fluxir compare` tabulates) against forward hooks on diffusers' blocks."""
    dm = tiny_diffusers(True, seed=8)
    model = flax_from_diffusers(dm)
    x = inputs(batch=1, h=2, w=3, t=4, seed=8)
    seen = {"double": [], "single": []}
    hooks = [b.register_forward_hook(lambda m, a, out: seen["double"].append([o.numpy() for o in out])) for b in dm.transformer_blocks]
    hooks += [b.register_forward_hook(lambda m, a, out: seen["single"].append([o.numpy() for o in out])) for b in dm.single_transformer_blocks]
    ref = run_diffusers(dm, x)
    for h in hooks:
        h.remove()
    b = 1
    ids = lambda a: jnp.broadcast_to(jnp.asarray(a), (b, *a.shape))  # noqa: E731
    with jax.default_matmul_precision("highest"):
        out, inter = model.forward(jnp.asarray(x["img"]), ids(x["img_ids"]), jnp.asarray(x["txt"]), ids(x["txt_ids"]),
                                   jnp.asarray(x["timesteps"]), jnp.asarray(x["y"]), jnp.asarray(x["guidance"]), intermediates=True)
    assert rel_err(out, ref) <= PARITY_TOL
    for k, (txt_ref, img_ref) in enumerate(seen["double"]):  # diffusers returns (txt, img)
        assert rel_err(inter["double_img"][k], img_ref) <= PARITY_TOL
        assert rel_err(inter["double_txt"][k], txt_ref) <= PARITY_TOL
    for k, (txt_ref, img_ref) in enumerate(seen["single"]):
        assert rel_err(inter["single"][k], np.concatenate([txt_ref, img_ref], axis=1)) <= PARITY_TOL
    assert inter["double_img"].shape[0] == 2 and inter["single"].shape[0] == 3
