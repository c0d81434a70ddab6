"""The FluxIR adapter: identity at init, control reaching every block, gradients, size, export."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fluxir_jax import cli, sampling
from fluxir_jax.errors import UserError
from fluxir_jax.models import adapter_io, presets
from fluxir_jax.models.adapter import FluxIR, FluxIRConfig, FluxIRVelocity, count_params, fluxir_forward
from fluxir_jax.models.flux import Flux
from tests.models.flux_reference import rel_err

BASE = presets.get("tiny", depth=2, depth_single_blocks=3)
B, H, W, T = 2, 4, 6, 5  # latent 4x6 -> 6 image tokens, 5 text tokens


def make(cfg=FluxIRConfig(text_len=T), seed=0, randomize=False):
    base = Flux(BASE, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    empty_txt = rng.standard_normal((T, BASE.context_in_dim)).astype(np.float32)
    empty_y = rng.standard_normal((BASE.vec_in_dim,)).astype(np.float32)
    adapter = FluxIR(cfg, BASE, rngs=nnx.Rngs(seed + 1))
    adapter.init_from_base(base, jnp.asarray(empty_txt), jnp.asarray(empty_y))
    if randomize:
        randomize_zero_inits(adapter, seed)
    x = dict(
        img=jnp.asarray(rng.standard_normal((B, H * W // 4, 64)), jnp.float32),
        lq=jnp.asarray(rng.standard_normal((B, H * W // 4, 64)), jnp.float32),
        img_ids=sampling.img_ids(B, H, W),
        txt=jnp.broadcast_to(jnp.asarray(empty_txt), (B, T, BASE.context_in_dim)),
        txt_ids=sampling.txt_ids(B, T),
        t=jnp.array([0.3, 0.8], jnp.float32),
        y=jnp.broadcast_to(jnp.asarray(empty_y), (B, BASE.vec_in_dim)),
        guidance=jnp.array([3.5, 2.0], jnp.float32),
    )
    return base, adapter, x


def randomize_zero_inits(adapter, seed):
    rng = np.random.default_rng(seed + 100)
    for mod in (adapter.lq_in,):
        mod.kernel.set_value(jnp.asarray(rng.standard_normal(mod.kernel.shape) * 0.1, jnp.float32))
        mod.bias.set_value(jnp.asarray(rng.standard_normal(mod.bias.shape) * 0.1, jnp.float32))
    for se in (adapter.se_img, adapter.se_txt):
        if se is not None:
            se.gamma.set_value(jnp.asarray(rng.standard_normal(se.gamma.shape) * 0.5, jnp.float32))


def run(base, adapter, x):
    return fluxir_forward(base, adapter, x["img"], x["lq"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["y"], x["guidance"])


def run_base(base, x):
    return base(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["y"], x["guidance"])


def test_parameter_count_flux_dev_in_band():
    n = count_params(FluxIRConfig(), "flux-dev")
    assert 0.35e9 <= n <= 0.45e9, n


def test_info_prints_adapter_count(capsys):
    assert cli.main(["info", "--model", "flux-dev"]) == 0
    assert "FluxIR adapter" in capsys.readouterr().out


def test_fresh_adapter_leaves_base_output_bit_for_bit_unchanged():
    base, adapter, x = make()
    bg, bs = nnx.split(base)
    ag, as_ = nnx.split(adapter)
    plain = jax.jit(lambda s: run_base(nnx.merge(bg, s), x))(bs)
    with_adapter = jax.jit(lambda s, a: run(nnx.merge(bg, s), nnx.merge(ag, a), x))(bs, as_)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(with_adapter))


def test_control_block_is_a_copy_of_base_double_block_0():
    base, adapter, _ = make()
    src = nnx.state(base.double_blocks, nnx.Param)
    dst = nnx.state(adapter.block, nnx.Param)
    for a, b in zip(jax.tree.leaves(src), jax.tree.leaves(dst)):
        np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(b))


def test_control_reaches_every_block_and_only_the_perturbed_one():
    """Perturbing SE layer k changes nothing before base block k and changes block k's stream."""
    base, adapter, x = make(randomize=True)
    n_double = BASE.depth

    def trace(adapter):
        control = adapter(base, x["img"], x["lq"], x["img_ids"], x["t"], x["guidance"])
        _, inter = base.forward(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["y"], x["guidance"], control, intermediates=True)
        # block outputs in order: double (img, txt) then single (txt+img)
        outs = [(inter["double_img"][k], inter["double_txt"][k]) for k in range(n_double)]
        outs += [(inter["single"][k][:, T:], inter["single"][k][:, :T]) for k in range(BASE.depth_single_blocks)]
        return outs

    with jax.default_matmul_precision("highest"):
        ref = trace(adapter)
        for k in range(BASE.depth + BASE.depth_single_blocks):
            for stream, se in enumerate((adapter.se_img, adapter.se_txt)):
                gamma = se.gamma[...]
                se.gamma.set_value(gamma.at[k].add(0.25))
                got = trace(adapter)
                se.gamma.set_value(gamma)
                for j in range(k):  # blocks before k: bit-for-bit unchanged
                    np.testing.assert_array_equal(np.asarray(got[j][0]), np.asarray(ref[j][0]))
                    np.testing.assert_array_equal(np.asarray(got[j][1]), np.asarray(ref[j][1]))
                # block k: the perturbed stream changed
                assert rel_err(got[k][stream], ref[k][stream]) > 1e-4, (k, stream)


def test_gradients_reach_every_adapter_leaf_and_no_base_leaf():
    base, adapter, x = make(randomize=True)
    bg, bs = nnx.split(base)
    ag, as_ = nnx.split(adapter)
    velocity = FluxIRVelocity(bg, ag)
    cond = sampling.Conditioning(img_ids=x["img_ids"], txt=x["txt"], txt_ids=x["txt_ids"], y=x["y"], guidance=x["guidance"], extra={"lq": x["lq"]})

    def loss(base_state, adapter_state):
        v = velocity((base_state, adapter_state), x["img"], x["t"], cond)
        return jnp.mean(jnp.square(v - 1.0))

    g_base, g_adapter = jax.jit(jax.grad(loss, argnums=(0, 1)))(bs, as_)
    for path, leaf in nnx.to_flat_state(g_adapter):
        arr = np.asarray(leaf.get_value())
        assert np.isfinite(arr).all(), path
        assert np.abs(arr).max() > 0, path
    assert all(not np.asarray(v).any() for v in jax.tree.leaves(g_base))
    # the optimizer only ever sees the adapter pytree: its state mirrors adapter shapes only
    opt = optax.adamw(1e-4)
    opt_state = opt.init(as_)
    n_adapter = sum(v.size for v in jax.tree.leaves(as_))
    n_opt = sum(v.size for v in jax.tree.leaves(opt_state) if hasattr(v, "size") and v.ndim > 0)
    assert n_opt == 2 * n_adapter


def test_options_image_only_double_only_every_n_and_base_consumes_theta():
    for opts in (dict(image_only=True), dict(control_blocks="double"), dict(control_blocks="every_n", control_every=2),
                 dict(base_consumes_theta=True)):
        base, adapter, x = make(FluxIRConfig(text_len=T, **opts), randomize=True)
        control = adapter(base, x["img"], x["lq"], x["img_ids"], x["t"], x["guidance"])
        if opts.get("image_only"):
            assert control.double.txt is None and adapter.se_txt is None
        if opts.get("control_blocks") == "double":
            assert control.single is None
        if opts.get("control_blocks") == "every_n":
            gates = np.concatenate([np.asarray(control.double.img_gate), np.asarray(control.single.img_gate)])
            assert [k for k in range(5) if np.abs(gates[k]).max() > 0] == [0, 2, 4]
        out = run(base, adapter, x)
        assert np.isfinite(np.asarray(out)).all() and rel_err(out, run_base(base, x)) > 1e-4
    # base_consumes_theta: a fresh adapter whose theta differs from the base text changes the base output
    base, adapter, x = make(FluxIRConfig(text_len=T, base_consumes_theta=True))
    adapter.theta_p.set_value(adapter.theta_p[...] + 0.5)
    assert rel_err(run(base, adapter, x), run_base(base, x)) > 1e-4


def test_tiny_forward_and_backward_run():
    base, adapter, x = make(randomize=True)
    ag, as_ = nnx.split(adapter)
    loss = lambda a: jnp.mean(run(base, nnx.merge(ag, a), x) ** 2)  # noqa: E731
    value, grads = jax.jit(jax.value_and_grad(loss))(as_)
    assert np.isfinite(float(value)) and len(jax.tree.leaves(grads)) == len(jax.tree.leaves(as_))


def test_export_import_round_trip_is_exact(tmp_path):
    base, adapter, x = make(randomize=True)
    path = tmp_path / "adapter.safetensors"
    adapter_io.export_safetensors(adapter, path)
    back = adapter_io.import_safetensors(path, BASE)
    for (p1, a), (p2, b) in zip(nnx.to_flat_state(nnx.state(adapter, nnx.Param)), nnx.to_flat_state(nnx.state(back, nnx.Param))):
        assert p1 == p2
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))
    np.testing.assert_array_equal(np.asarray(run(base, adapter, x)), np.asarray(run(base, back, x)))
    names = set(adapter_io.to_named_tensors(adapter))
    assert {"lq_in.weight", "theta_p", "theta_y", "block.img_attn.qkv.weight", "se_img.double_blocks.1.down.weight",
            "se_txt.single_blocks.2.gamma"} <= names


def test_orbax_checkpoint_and_cli_export(tmp_path, capsys):
    _, adapter, _ = make(randomize=True)
    adapter_io.save_adapter(adapter, tmp_path / "ckpt")
    out = tmp_path / "a.safetensors"
    assert cli.main(["export-adapter", str(tmp_path / "ckpt"), "--out", str(out)]) == 0
    back = adapter_io.import_safetensors(out)
    for a, b in zip(jax.tree.leaves(nnx.state(adapter, nnx.Param)), jax.tree.leaves(nnx.state(back, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert cli.main(["export-adapter", str(tmp_path / "ckpt"), "--out", str(out)]) == 2  # exists


@pytest.mark.parametrize("change", [dict(hidden_size=128, num_heads=8), dict(depth=3), dict(depth_single_blocks=1)])
def test_mismatched_base_is_refused(tmp_path, change):
    _, adapter, _ = make()
    path = tmp_path / "a.safetensors"
    adapter_io.export_safetensors(adapter, path)
    other = presets.get("tiny", **{"depth": 2, "depth_single_blocks": 3, **change})
    field = next(iter(change))
    with pytest.raises(UserError, match=f"adapter was built for base {field}="):
        adapter_io.import_safetensors(path, other)


def test_mismatched_text_length_is_refused():
    base = Flux(BASE, rngs=nnx.Rngs(0))
    adapter = FluxIR(FluxIRConfig(text_len=T), BASE, rngs=nnx.Rngs(1))
    with pytest.raises(UserError, match="empty-prompt embeddings have shapes"):
        adapter.init_from_base(base, jnp.zeros((T + 1, BASE.context_in_dim)), jnp.zeros((BASE.vec_in_dim,)))


def test_cli_refuses_a_non_adapter_directory(tmp_path, capsys):
    assert cli.main(["export-adapter", str(tmp_path), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "not a FluxIR adapter checkpoint" in capsys.readouterr().err


def test_cli_refuses_a_mismatched_base_with_exit_2(tmp_path, capsys):
    _, adapter, _ = make()
    adapter_io.save_adapter(adapter, tmp_path / "ckpt")
    out = tmp_path / "a.safetensors"
    assert cli.main(["export-adapter", str(tmp_path / "ckpt"), "--out", str(out), "--base", "flux-dev"]) == 2
    err = capsys.readouterr().err.strip()
    assert "adapter was built for base hidden_size=64, the loaded base has hidden_size=3072" in err and "\n" not in err
    assert not out.exists()
    assert cli.main(["export-adapter", str(tmp_path / "ckpt"), "--out", str(out), "--text-len", "512"]) == 2
    assert "text length 5, not 512" in capsys.readouterr().err and not out.exists()
    config_file = tmp_path / "base.yaml"
    from fluxir_jax import config as config_io

    config_io.dump(BASE, config_file)
    assert cli.main(["export-adapter", str(tmp_path / "ckpt"), "--out", str(out), "--base", str(config_file), "--text-len", "7"]) == 2
    assert "text length 5" in capsys.readouterr().err
    assert cli.main(["export-adapter", str(tmp_path / "ckpt"), "--out", str(out), "--base", str(config_file), "--text-len", "5"]) == 0
