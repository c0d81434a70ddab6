"""Each FLUX building block against an independent float64 PyTorch statement of the BFL formula.

The references below are written from the formulas in BFL's `flux/math.py` and
`flux/modules/layers.py`; all weights come from randomly initialised Flax modules whose every
parameter (norm scales and biases included) was overwritten with random values.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from fluxir_convert.flux_map import flax_to_bfl
from fluxir_jax import aot
from fluxir_jax.models import layers as L
from tests.models.flux_reference import rel_err

TOL = 1e-5  # relative error, float32 Flax (highest precision) vs float64 torch
T = lambda a: torch.from_numpy(np.asarray(a, np.float64))  # noqa: E731


# ----------------------------------------------------------------------------- references


def ref_timestep_embedding(t, dim, max_period=10000, time_factor=1000.0):
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def ref_rope(pos, dim, theta):
    scale = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    omega = 1.0 / theta**scale
    out = pos[..., None] * omega
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return out.reshape(*out.shape[:-1], 2, 2)


def ref_pe(ids, axes_dim, theta):
    return torch.cat([ref_rope(ids[..., i], d, theta) for i, d in enumerate(axes_dim)], dim=-3)


def ref_apply_rope(x, pe):  # x [B, H, L, D], pe [B, 1, L, D/2, 2, 2]
    x_ = x.reshape(*x.shape[:-1], -1, 1, 2)
    out = pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]
    return out.reshape(x.shape)


def ref_attention(q, k, v, pe):  # [B, H, L, D]
    q, k = ref_apply_rope(q, pe), ref_apply_rope(k, pe)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    out = w @ v
    return out.permute(0, 2, 1, 3).reshape(out.shape[0], out.shape[2], -1)


def ref_rms(x, scale):
    return x * torch.rsqrt(torch.mean(x**2, dim=-1, keepdim=True) + 1e-6) * scale


def ref_ln(x):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6)


def lin(w, p, x):
    return x @ w[f"{p}.weight"].T + w[f"{p}.bias"]


def gelu(x):
    return torch.nn.functional.gelu(x, approximate="tanh")


def ref_mod(w, p, vec, n):
    return lin(w, p, torch.nn.functional.silu(vec))[:, None, :].chunk(n, dim=-1)


def split_heads(qkv, heads):  # "B L (K H D) -> K B H L D"
    b, l, _ = qkv.shape
    return qkv.reshape(b, l, 3, heads, -1).permute(2, 0, 3, 1, 4)


def ref_double(w, img, txt, vec, pe, heads):
    ish, isc, ig, ish2, isc2, ig2 = ref_mod(w, "img_mod.lin", vec, 6)
    tsh, tsc, tg, tsh2, tsc2, tg2 = ref_mod(w, "txt_mod.lin", vec, 6)
    iq, ik, iv = split_heads(lin(w, "img_attn.qkv", (1 + isc) * ref_ln(img) + ish), heads)
    tq, tk, tv = split_heads(lin(w, "txt_attn.qkv", (1 + tsc) * ref_ln(txt) + tsh), heads)
    iq, ik = ref_rms(iq, w["img_attn.norm.query_norm.scale"]), ref_rms(ik, w["img_attn.norm.key_norm.scale"])
    tq, tk = ref_rms(tq, w["txt_attn.norm.query_norm.scale"]), ref_rms(tk, w["txt_attn.norm.key_norm.scale"])
    attn = ref_attention(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2), pe)
    ta, ia = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]
    img = img + ig * lin(w, "img_attn.proj", ia)
    img = img + ig2 * lin(w, "img_mlp.2", gelu(lin(w, "img_mlp.0", (1 + isc2) * ref_ln(img) + ish2)))
    txt = txt + tg * lin(w, "txt_attn.proj", ta)
    txt = txt + tg2 * lin(w, "txt_mlp.2", gelu(lin(w, "txt_mlp.0", (1 + tsc2) * ref_ln(txt) + tsh2)))
    return img, txt


def ref_single(w, x, vec, pe, heads, hidden):
    sh, sc, g = ref_mod(w, "modulation.lin", vec, 3)
    h = lin(w, "linear1", (1 + sc) * ref_ln(x) + sh)
    q, k, v = split_heads(h[..., : 3 * hidden], heads)
    q, k = ref_rms(q, w["norm.query_norm.scale"]), ref_rms(k, w["norm.key_norm.scale"])
    attn = ref_attention(q, k, v, pe)
    return x + g * lin(w, "linear2", torch.cat([attn, gelu(h[..., 3 * hidden:])], dim=-1))


def ref_last(w, x, vec):
    shift, scale = lin(w, "adaLN_modulation.1", torch.nn.functional.silu(vec)).chunk(2, dim=-1)
    return lin(w, "linear", (1 + scale[:, None]) * ref_ln(x) + shift[:, None])


# ----------------------------------------------------------------------------- helpers


def randomize(module, seed):
    """Overwrite every parameter of an NNX module with random values; return BFL-named float64 tensors."""
    rng = np.random.default_rng(seed)
    state = nnx.state(module, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    weights = {}
    for path, var in flat.items():
        shape = var.shape
        if path[-1] == "kernel":
            value = rng.standard_normal(shape) / math.sqrt(shape[0])
        elif path[-1] == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            value = 0.1 * rng.standard_normal(shape)
        var.set_value(jnp.asarray(value, jnp.float32))
        name, arr = flax_to_bfl(path, value)
        weights[name] = T(arr)
    nnx.update(module, state)
    return weights


def pe_pair(b, n, axes_dim, theta=10_000, seed=0):
    ids = np.random.default_rng(seed).integers(0, 40, size=(b, n, len(axes_dim))).astype(np.float32)
    return L.embed_nd(jnp.asarray(ids), axes_dim, theta), ref_pe(T(ids), axes_dim, theta)[:, None]


DIMS = L.BlockDims(hidden_size=64, num_heads=4, mlp_ratio=4.0)
AXES = (4, 6, 6)


# ----------------------------------------------------------------------------- tests


def test_timestep_embedding():
    t = np.array([0.0, 0.013, 0.5, 0.999, 1.0], np.float32)
    for dim in (256, 7):
        out = L.timestep_embedding(jnp.asarray(t), dim)
        ref = ref_timestep_embedding(T(t), dim)
        if dim % 2:
            ref = torch.cat([ref, torch.zeros_like(ref[:, :1])], dim=-1)
        assert out.dtype == jnp.float32 and out.shape == (5, dim)
        assert rel_err(out, ref) <= TOL


def test_timestep_embedding_is_float32_for_bf16_input():
    out = L.timestep_embedding(jnp.asarray([0.3], jnp.bfloat16), 16)
    assert out.dtype == jnp.float32


def test_rope_tables_reach_float64_accuracy_at_large_positions():
    pos = np.array([[0, 1, 7, 63, 255, 1023, 4095]], np.float32)
    for dim, theta in ((16, 10_000), (56, 10_000), (6, 10_000)):
        out = np.asarray(L.rope(jnp.asarray(pos), dim, theta))
        ref = ref_rope(T(pos), dim, theta).numpy()
        assert out.dtype == np.float32
        assert np.abs(out - ref).max() <= 2e-6  # float32 without the hi/lo split is ~3e-4 here


def test_apply_rope_and_attention():
    b, n, h, d = 2, 9, 3, 16
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((b, n, h, d)).astype(np.float32) for _ in range(3))
    pe, pe_ref = pe_pair(b, n, AXES)
    heads_first = lambda a: jnp.asarray(a.transpose(0, 2, 1, 3))  # noqa: E731  [B, H, L, D], as the blocks pass them
    with jax.default_matmul_precision("highest"):
        out = L.attention(heads_first(q), heads_first(k), heads_first(v), pe)
        rq, rk = L.apply_rope(jnp.asarray(q), jnp.asarray(k), pe)
        hq, hk = L.apply_rope(heads_first(q), heads_first(k), pe, heads_first=True)
    perm = lambda a: T(a).permute(0, 2, 1, 3)  # noqa: E731
    assert out.shape == (b, h, n, d)
    assert rel_err(np.asarray(out).transpose(0, 2, 1, 3).reshape(b, n, h * d),
                   ref_attention(perm(q), perm(k), perm(v), pe_ref)) <= TOL
    assert rel_err(np.asarray(rq).transpose(0, 2, 1, 3), ref_apply_rope(perm(q), pe_ref)) <= TOL
    assert rel_err(np.asarray(rk).transpose(0, 2, 1, 3), ref_apply_rope(perm(k), pe_ref)) <= TOL
    np.testing.assert_array_equal(np.asarray(hq), np.asarray(rq).transpose(0, 2, 1, 3))
    np.testing.assert_array_equal(np.asarray(hk), np.asarray(rk).transpose(0, 2, 1, 3))


def _paired_rope(x, pe, heads_first=False):
    """BFL's paired form: x [B, L, H, D] (or [B, H, L, D]) as [..., D/2, 1, 2] times the 2x2 rotations,
    float32 inside."""
    x2 = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 1, 2)
    p = pe[:, None] if heads_first else pe[:, :, None]
    return (p[..., 0] * x2[..., 0] + p[..., 1] * x2[..., 1]).reshape(x.shape).astype(x.dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lane_dense_rope_is_bitwise_the_paired_rotation_with_gradients(dtype):
    # apply_rope swaps pairs with a permutation matmul (no minor axis of 2 for TPUs to pad): the
    # same two float32 products summed, so equal bit for bit, at default matmul precision too
    b, n, h, d = 2, 11, 3, 128
    rng = np.random.default_rng(4)
    q, k = (jnp.asarray(rng.standard_normal((b, n, h, d)) * 300.0, dtype) for _ in range(2))
    ids = rng.integers(0, 4096, (b, n, 3)).astype(np.float32)
    pe = L.embed_nd(jnp.asarray(ids), (16, 56, 56), 10_000)
    rq, rk = L.apply_rope(q, k, pe)
    assert rq.dtype == dtype and rk.dtype == dtype
    np.testing.assert_array_equal(np.asarray(rq, np.float32), np.asarray(_paired_rope(q, pe), np.float32))
    np.testing.assert_array_equal(np.asarray(rk, np.float32), np.asarray(_paired_rope(k, pe), np.float32))
    g = jnp.asarray(rng.standard_normal((b, n, h, d)), dtype)
    vjp = lambda f: jax.vjp(f, q)[1](g)[0]  # noqa: E731
    np.testing.assert_array_equal(np.asarray(vjp(lambda x: L.apply_rope(x, x, pe)[0]), np.float32),
                                  np.asarray(vjp(lambda x: _paired_rope(x, pe)), np.float32))
    # the tables' cotangent too (nothing differentiates rope tables today; it must still be right)
    pe_vjp = lambda f: jax.vjp(f, pe)[1](g)[0]  # noqa: E731
    np.testing.assert_allclose(pe_vjp(lambda p: L.apply_rope(q, q, p)[0]), pe_vjp(lambda p: _paired_rope(q, p)),
                               rtol=1e-6, atol=1e-6 * float(jnp.abs(q.astype(jnp.float32)).max()))


def test_rmsnorm():
    norm = L.RMSNorm(16)
    w = randomize(norm, 2)
    x = np.random.default_rng(2).standard_normal((3, 5, 16)).astype(np.float32) * 3
    assert rel_err(norm(jnp.asarray(x)), ref_rms(T(x), w["scale"])) <= TOL


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
def test_recomputed_functions_have_the_gradients_of_their_autodiff(name, dtype):
    """`recomputed_in_backward` keeps only the inputs and runs fn's own VJP in the backward pass:
    outputs and input gradients bitwise those of plain autodiff (same ops on the same values)."""
    fn = getattr(L, name)
    plain = fn.fun  # the function custom_vjp wraps
    rng = np.random.default_rng(7)
    args = [jnp.asarray(rng.standard_normal((3, 5, 32)) * 2, dtype)]
    if name == "rms_norm":
        args.append(jnp.asarray(1 + 0.1 * rng.standard_normal(32), dtype))
    g = jnp.asarray(rng.standard_normal((3, 5, 32)), dtype)
    run = jax.jit(lambda f, *a: (lambda out, vjp: (out, vjp(g)))(*jax.vjp(f, *a)), static_argnums=0)
    (out, grads), (ref_out, ref_grads) = run(fn, *args), run(plain, *args)
    for a, b in zip((out, *grads), (ref_out, *ref_grads)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gelu_tanh_and_its_kept_derivative_against_torch(dtype):
    """`gelu_tanh` computes in float32 and its VJP multiplies by the derivative its forward computed
    (the `gelu_grad` residual). float32: output and input gradient within 1e-6 relative of float64
    torch. bf16: against torch's bf16 GELU (float32 math, one rounding), the output within one bf16
    ulp and the gradient (the derivative is rounded to bf16 before the product) within two, or, in
    the far negative tail where both compute 1 + tanh ~ 0 in float32, within 2^-20 (output) and
    2^-15 |g| (gradient) absolute."""
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.standard_normal(4000) * 3, [-12.0, -5.0, -0.5, 0.0, 0.5, 5.0, 12.0]]).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    xj, gj = jnp.asarray(x, dtype), jnp.asarray(g, dtype)
    out, vjp = jax.vjp(L.gelu_tanh, xj)
    (dx,) = vjp(gj)
    assert out.dtype == dx.dtype == jnp.dtype(dtype)
    tdt = torch.float64 if dtype == "float32" else torch.bfloat16
    tx = torch.from_numpy(np.asarray(xj.astype(jnp.float32))).to(tdt).requires_grad_()
    ref = torch.nn.functional.gelu(tx, approximate="tanh")
    ref.backward(torch.from_numpy(np.asarray(gj.astype(jnp.float32))).to(tdt))
    ref, ref_dx = ref.detach().double().numpy(), tx.grad.double().numpy()
    if dtype == "float32":
        assert rel_err(out, ref) <= 1e-6 and rel_err(dx, ref_dx) <= 1e-6
    else:
        ulp = lambda a: 2.0 ** (np.floor(np.log2(np.maximum(np.abs(a), 1e-30))) - 7)  # noqa: E731  bf16 spacing at a
        assert np.all(np.abs(np.asarray(out, np.float64) - ref) <= np.maximum(ulp(ref), 2.0 ** -20))
        assert np.all(np.abs(np.asarray(dx, np.float64) - ref_dx) <= np.maximum(2 * ulp(ref_dx), 2.0 ** -15 * np.abs(g)))


@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("equation,x_shape,k_shape,view,f32_out", [
    ("blc,ckhd->kbhld", (2, 5, 8), (8, 14), lambda k: k[:, :12].reshape(8, 3, 2, 2), False),  # single-block qkv
    ("bhld,hdc->blc", (2, 2, 5, 4), (10, 8), lambda k: k[:8].reshape(2, 4, 8), True),  # linear2, attention rows
    ("blm,mc->blc", (2, 5, 6), (14, 8), lambda k: k[8:], True),  # linear2, MLP rows
])
def test_projection_of_a_kernel_view_has_the_gradients_of_autodiff(equation, x_shape, k_shape, view, f32_out, frozen):
    """`project(view=...)` keeps neither the view nor (with a frozen kernel) x: outputs and gradients
    bitwise those of autodiff of the einsum of the view, float32."""
    rng = np.random.default_rng(11)
    x, k = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (x_shape, k_shape))
    out_shape = jax.eval_shape(lambda: jnp.einsum(equation, x, view(k))).shape
    b = jnp.asarray(rng.standard_normal(out_shape[-1:]), jnp.float32)
    g = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)

    def grads(f):
        args = (x, b) if frozen else (x, k, b)
        fn = (lambda x, b: f(x, k, b)) if frozen else f
        out, vjp = jax.vjp(fn, *args)
        return (out, *vjp(g))

    viewed = lambda x, k, b: L.project(equation, x, k, b, "float32", f32_out, view=view)  # noqa: E731
    plain = lambda x, k, b: L.project(equation, x, view(k), b, "float32", f32_out)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        got, want = jax.jit(lambda: grads(viewed))(), jax.jit(lambda: grads(plain))()
    for a, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(w))
    # and no forward product computed again in the backward pass: the jaxpr's matmul FLOPs (aot.py's
    # model FLOPs) are autodiff's
    assert aot.analytic_flops(lambda: grads(viewed)) == aot.analytic_flops(lambda: grads(plain))


def test_layer_norm_two_pass_matches_torch():
    x = (np.random.default_rng(3).standard_normal((4, 256)) * 0.1 + 10.0).astype(np.float32)
    # a mean 100x the std: one-pass E[x^2]-E[x]^2 in float32 is off by ~1e-3 here, two-pass by ~1e-6
    assert rel_err(L.layer_norm(jnp.asarray(x)), ref_ln(T(x))) <= 1e-5


def test_double_stream_block():
    blk = L.DoubleStreamBlock(DIMS, rngs=nnx.Rngs(0))
    w = randomize(blk, 4)
    rng = np.random.default_rng(4)
    img, txt, vec = (rng.standard_normal(s).astype(np.float32) for s in ((2, 6, 64), (2, 5, 64), (2, 64)))
    pe, pe_ref = pe_pair(2, 11, AXES, seed=4)
    with jax.default_matmul_precision("highest"):
        oi, ot = blk(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(vec), pe)
    ri, rt = ref_double(w, T(img), T(txt), T(vec), pe_ref, DIMS.num_heads)
    assert rel_err(oi, ri) <= TOL and rel_err(ot, rt) <= TOL


def test_single_stream_block():
    blk = L.SingleStreamBlock(DIMS, rngs=nnx.Rngs(0))
    w = randomize(blk, 5)
    rng = np.random.default_rng(5)
    x, vec = rng.standard_normal((2, 11, 64)).astype(np.float32), rng.standard_normal((2, 64)).astype(np.float32)
    pe, pe_ref = pe_pair(2, 11, AXES, seed=5)
    with jax.default_matmul_precision("highest"):
        out = blk(jnp.asarray(x), jnp.asarray(vec), pe)
    assert rel_err(out, ref_single(w, T(x), T(vec), pe_ref, DIMS.num_heads, 64)) <= TOL


def test_last_layer():
    layer = L.LastLayer(64, 48, rngs=nnx.Rngs(0))
    w = randomize(layer, 6)
    rng = np.random.default_rng(6)
    x, vec = rng.standard_normal((2, 7, 64)).astype(np.float32), rng.standard_normal((2, 64)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        out = layer(jnp.asarray(x), jnp.asarray(vec))
    assert out.shape == (2, 7, 48)
    assert rel_err(out, ref_last(w, T(x), T(vec))) <= TOL


def test_mlp_embedder_and_modulation():
    emb = L.MLPEmbedder(24, 64, rngs=nnx.Rngs(0))
    w = randomize(emb, 7)
    x = np.random.default_rng(7).standard_normal((3, 24)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        out = emb(jnp.asarray(x))
    ref = lin(w, "out_layer", torch.nn.functional.silu(lin(w, "in_layer", T(x))))
    assert rel_err(out, ref) <= TOL


@pytest.mark.parametrize("dim,theta", [(5, 10_000)])
def test_rope_rejects_odd_dim(dim, theta):
    with pytest.raises(ValueError, match="even"):
        L.rope(jnp.zeros((1, 3)), dim, theta)


def test_flop_counts_leave_out_ropes_pair_swap_matmuls():
    # the swap is a permutation written as a matmul: data movement, so it must not inflate model FLOPs (MFU)
    from fluxir_jax import aot

    q = jax.ShapeDtypeStruct((2, 16, 3, 128), jnp.bfloat16)
    pe = L.embed_nd(jnp.zeros((2, 16, 3)), (16, 56, 56), 10_000)
    fwd = lambda q: L.apply_rope(q, q, pe)[0].astype(jnp.float32).sum()  # noqa: E731
    assert aot.analytic_flops(fwd, q) == 0
    assert aot.analytic_flops(jax.grad(fwd), q) == 0
    qkv = lambda q: (L.apply_rope(q, q, pe)[0].reshape(2, 16, 384) @ jnp.ones((384, 8), q.dtype)).sum()  # noqa: E731
    assert aot.analytic_flops(qkv, q) == 2 * 2 * 16 * 384 * 8  # other matmuls still count
