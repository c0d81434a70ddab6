"""Attention kernels: splash (Pallas, interpret mode on CPU) equals the XLA path; kernel selection and errors."""
import jax
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

from fluxir_jax import config
from fluxir_jax.errors import UserError
from fluxir_jax.models import attention
from fluxir_jax.models.attention import AttentionSpec
from fluxir_jax.models.flux import FluxConfig
from tests.models import tiny_flux

TOL = 1e-5  # ||splash - xla|| / ||xla||, float32, highest matmul precision, forward and every gradient leaf


def _compare(batch: int, mesh=None):
    # 3x5 image tokens + 7 text tokens = 22: padded to one 128 block, the padding masked out.
    x = tiny_flux.inputs(batch=batch, h=3, w=5, t=7)
    state = tiny_flux.random_state(tiny_flux.config())
    with jax.default_matmul_precision("highest"):
        ref = tiny_flux.forward_and_grads(tiny_flux.graphdef(tiny_flux.config()), state, x)
        gdef = tiny_flux.graphdef(tiny_flux.config(attention="splash"))
        if mesh is None:
            out = tiny_flux.forward_and_grads(gdef, state, x)
        else:
            with jax.set_mesh(mesh):
                out = tiny_flux.forward_and_grads(gdef, state, x)
    names = ("forward", "param grads", "img grad")
    errs = {n: tiny_flux.worst_leaf_err(o, r) for n, o, r in zip(names, out, ref)}
    print("splash vs xla:", {n: f"{e:.1e}" for n, e in errs.items()})
    assert max(errs.values()) <= TOL, errs
    assert tiny_flux.rel_err(out[0], ref[0] * 1.01) > TOL  # the comparison can fail


def test_splash_equals_xla_unsharded():
    _compare(batch=2)


def test_splash_equals_xla_on_8_device_mesh():
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    _compare(batch=4, mesh=mesh)


def test_splash_pads_a_batch_the_mesh_does_not_divide():
    """4 val images on 8 chips (fsdp 8): zero examples fill the batch shards and are cut off again."""
    mesh = jax.make_mesh((1, 8, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    _compare(batch=3, mesh=mesh)


def test_splash_runs_under_shard_map_over_batch_and_heads():
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    q = k = v = jax.ShapeDtypeStruct((4, 22, 4, 16), np.float32)
    spec = AttentionSpec("splash")
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(lambda q, k, v: attention.dot_product_attention(q, k, v, spec))(q, k, v)
    text = str(jaxpr)
    assert "shard_map" in text
    assert "('data', 'fsdp')" in text and "tensor" in text
    unsharded = str(jax.make_jaxpr(lambda q, k, v: attention.dot_product_attention(q, k, v, spec))(q, k, v))
    assert "shard_map" not in unsharded


def test_splash_mesh_divisibility_is_a_user_error():
    mesh = jax.make_mesh((2, 1, 4), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    q = jax.ShapeDtypeStruct((2, 22, 2, 16), np.float32)  # 2 heads over tensor=4
    with jax.set_mesh(mesh), pytest.raises(UserError, match="heads"):
        jax.eval_shape(lambda q: attention.dot_product_attention(q, q, q, AttentionSpec("splash")), q)


@pytest.mark.parametrize(
    "padded, blocks, want",
    [(128, 512, 128), (1536, 512, 512), (4608, 512, 512), (4352, 512, 256), (4608, 1024, 768), (640, 512, 128)],
)
def test_splash_blocks_divide_the_padded_length(padded, blocks, want):
    sizes = attention.splash_block_sizes(AttentionSpec("splash", blocks, blocks, blocks, fused_bwd=False), padded)
    assert sizes.block_q == sizes.block_kv == sizes.block_q_dkv == sizes.block_kv_dq == want
    assert padded % sizes.block_q == 0 and sizes.block_kv % sizes.block_kv_compute == 0
    assert not sizes.use_fused_bwd_kernel


@pytest.mark.parametrize("padded, bwd, want", [(1536, 4608, 1536), (4608, 4608, 4608), (16896, 4608, 4224), (1536, None, 512)])
def test_fused_backward_walks_the_keys_in_its_own_tiles(padded, bwd, want):
    sizes = attention.splash_block_sizes(AttentionSpec("splash", block_kv_bwd=bwd), padded)
    assert sizes.use_fused_bwd_kernel and sizes.block_q_dq is None and sizes.block_kv_dq is None
    assert (sizes.block_kv, sizes.block_kv_dkv) == (512, want)
    assert padded % sizes.block_kv_dkv == 0 and sizes.block_kv_dkv % sizes.block_kv_dkv_compute == 0


@pytest.mark.parametrize("spec", [AttentionSpec("splash", 128, 128, 128, fused_bwd=False),
                                  AttentionSpec("splash", 128, 128, 128, block_kv_bwd=4608),
                                  AttentionSpec("splash", 128, 256, 128, block_kv_bwd=128)],
                         ids=["two kernels", "fused, one key tile", "fused, 3 key tiles (partial dq summed)"])
def test_splash_backward_variants_equal_xla(spec):
    """Forward and (dq, dk, dv) of splash in interpret mode against XLA attention, float32, 3 tiles of 128
    queries (330 tokens padded to 384, the padding masked out)."""
    rng = np.random.default_rng(3)
    q, k, v = (jax.numpy.asarray(rng.standard_normal((2, 330, 2, 64)), np.float32) for _ in range(3))
    w = jax.numpy.asarray(rng.standard_normal((2, 330, 2, 64)), np.float32)

    def loss(spec):
        return lambda q, k, v: (attention.splash_attention(q, k, v, spec, interpret=True) if spec.kind == "splash"
                                else attention.dot_product_attention(q, k, v, spec)) * w

    with jax.default_matmul_precision("highest"):
        ref, ref_vjp = jax.vjp(loss(AttentionSpec("xla")), q, k, v)
        out, out_vjp = jax.vjp(loss(spec), q, k, v)
        pairs = [(out, ref)] + list(zip(out_vjp(w), ref_vjp(w)))
    errs = [tiny_flux.rel_err(a, b) for a, b in pairs]
    assert max(errs) <= TOL, errs
    assert tiny_flux.rel_err(pairs[1][0], pairs[1][1] * 1.01) > TOL  # the comparison can fail


def test_kernel_choice_by_backend():
    assert attention.resolve_kind("auto", "tpu", "bfloat16") == "splash"
    assert attention.resolve_kind("auto", "gpu", "bfloat16") == "cudnn"
    assert attention.resolve_kind("auto", "gpu", "float32") == "xla"
    assert attention.resolve_kind("auto", "cpu", "bfloat16") == "xla"
    assert attention.resolve_kind("splash", "cpu", "float32") == "splash"  # interpret mode
    with pytest.raises(UserError, match="splash is a TPU kernel"):
        attention.resolve_kind("splash", "gpu", "bfloat16")
    with pytest.raises(UserError, match="bfloat16 or float16"):
        attention.resolve_kind("cudnn", "gpu", "float32")


def test_cudnn_on_cpu_is_one_line_user_error():
    x = tiny_flux.inputs(batch=1, h=2, w=2, t=3)
    cfg = tiny_flux.config(attention="cudnn", dtype="bfloat16")
    with pytest.raises(UserError) as err:
        tiny_flux.forward(tiny_flux.graphdef(cfg), tiny_flux.random_state(cfg), x)
    assert "attention=cudnn needs an NVIDIA GPU" in str(err.value) and "\n" not in str(err.value)


def test_auto_on_cpu_is_the_xla_path():
    x = tiny_flux.inputs(batch=1, h=2, w=2, t=3)
    state = tiny_flux.random_state(tiny_flux.config())
    a = tiny_flux.forward(tiny_flux.graphdef(tiny_flux.config(attention="auto")), state, x)
    b = tiny_flux.forward(tiny_flux.graphdef(tiny_flux.config()), state, x)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("override, match", [("attention=flash", "attention 'flash'"), ("splash_block_q=100", "multiple of 128")])
def test_bad_attention_config_is_user_error(override, match):
    with pytest.raises(UserError, match=match):
        config.load(FluxConfig, None, overrides=[override], base=FluxConfig())


def test_flop_count_sees_the_work_inside_splash_kernels():
    """The analytic FLOP count (`aot.flop_counts`) multiplies a Pallas kernel's body by its grid: splash's
    forward is exactly XLA attention's two matmuls; its two-kernel backward recomputes QK^T and dO V^T in
    both the dq and the dkv kernel (7 matmuls to XLA's 4), the fused backward (the default) once (5
    matmuls), whether its key tiles cover the sequence or not. All of splash's work is kernel work, none
    of XLA's."""
    from fluxir_jax import aot

    b, length, heads, dim = 2, 384, 4, 64
    q = jax.ShapeDtypeStruct((b, length, heads, dim), np.float32)
    one_matmul = 2.0 * b * heads * length * length * dim
    counts = {}
    two_kernels = dict(fused_bwd=False)
    for name, spec in [("xla", AttentionSpec("xla")), ("splash", AttentionSpec("splash", **two_kernels)),
                       ("splash tiled", AttentionSpec("splash", block_q=128, block_kv=256, block_kv_compute=128, **two_kernels)),
                       ("fused", AttentionSpec("splash")),
                       ("fused tiled", AttentionSpec("splash", block_q=128, block_kv=256, block_kv_compute=128, block_kv_bwd=128))]:
        def loss(q, k, v, spec=spec):
            if spec.kind == "splash":
                return attention.splash_attention(q, k, v, spec, interpret=True).sum()
            return attention.dot_product_attention(q, k, v, spec).sum()

        counts[name] = (aot.flop_counts(loss, q, q, q), aot.flop_counts(jax.grad(loss, argnums=(0, 1, 2)), q, q, q))
    (xla_fwd, xla_fwd_k), (xla_all, xla_all_k) = counts["xla"]
    assert (xla_fwd, xla_all) == (2 * one_matmul, 6 * one_matmul) and xla_fwd_k == xla_all_k == 0
    for name, matmuls in [("splash", 9), ("splash tiled", 9), ("fused", 7), ("fused tiled", 7)]:
        # grid (batch, head, 1, 1), and (batch, head, 3, 3) tiles of 128 x 128
        (fwd, fwd_k), (both, both_k) = counts[name]
        assert fwd == fwd_k == 2 * one_matmul, name
        assert both_k == matmuls * one_matmul and both - both_k < 0.01 * one_matmul, name
    # under a (2, 2, 2) mesh splash runs in a shard_map on local shapes: its body counts once per shard
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    q4 = jax.ShapeDtypeStruct((4, length, 4, dim), np.float32)
    with jax.set_mesh(mesh):
        sharded = aot.flop_counts(lambda q, k, v: attention.dot_product_attention(q, k, v, AttentionSpec("splash")), q4, q4, q4)
    assert sharded == (4 * one_matmul, 4 * one_matmul)  # twice the batch of the unsharded count


def test_fused_backward_in_bfloat16_matches_the_two_kernels():
    """In bfloat16 the fused backward with one tile of keys gives the two-kernel backward's dk and dv bit
    for bit and its dq up to the order of float32 summation (measured 1.8e-5 relative at these shapes);
    several tiles of keys round a partial dq per tile to bfloat16 (measured 2.9e-3 with 5 tiles), which is
    why the default tile covers the sequence."""
    rng = np.random.default_rng(0)
    q, k, v, w = (jax.numpy.asarray(rng.standard_normal((2, 640, 2, 128)), jax.numpy.bfloat16) for _ in range(4))

    def grads(spec):
        loss = lambda q, k, v: (attention.splash_attention(q, k, v, spec, interpret=True).astype(np.float32) * w).sum()  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    two = grads(AttentionSpec("splash", 128, 128, 128, fused_bwd=False))
    one = grads(AttentionSpec("splash", 128, 128, 128, block_kv_bwd=4608))
    five = grads(AttentionSpec("splash", 128, 128, 128, block_kv_bwd=128))
    np.testing.assert_array_equal(np.asarray(one[1]), np.asarray(two[1]))
    np.testing.assert_array_equal(np.asarray(one[2]), np.asarray(two[2]))
    assert 0 < tiny_flux.rel_err(one[0], two[0]) < 1e-4
    assert tiny_flux.rel_err(five[0], two[0]) > 10 * tiny_flux.rel_err(one[0], two[0])
