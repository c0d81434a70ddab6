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
    txt = rng.standard_normal((T, BASE.context_in_dim)).astype(np.float32)   # the empty prompt's embeddings
    y = rng.standard_normal((BASE.vec_in_dim,)).astype(np.float32)
    adapter = FluxIR(cfg, BASE, rngs=nnx.Rngs(seed + 1))
    adapter.init_from_base(base, jnp.asarray(txt), jnp.asarray(y))
    if randomize:
        randomize_zero_inits(adapter, seed)
    x = dict(
        img=jnp.asarray(rng.standard_normal((B, H * W // 4, 64)), jnp.float32),
        lq=jnp.asarray(rng.standard_normal((B, H * W // 4, 64)), jnp.float32),
        img_ids=sampling.img_ids(B, H, W),
        txt=jnp.broadcast_to(jnp.asarray(txt), (B, T, BASE.context_in_dim)),
        txt_ids=sampling.txt_ids(B, T),
        t=jnp.array([0.3, 0.8], jnp.float32),
        y=jnp.broadcast_to(jnp.asarray(y), (B, BASE.vec_in_dim)),
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


def _adapter_params_by_hand(c: int, mlp: int, head_dim: int, context: int, vec: int, in_ch: int, text_len: int,
                            n_controlled: int, reduction: int, streams: int) -> int:
    """The adapter's size from its definition: M_i, one double block, theta_p/theta_y, SE layers."""
    per_stream = (c * 6 * c + 6 * c) + (c * 3 * c + 3 * c) + 2 * head_dim + (c * c + c) + (c * mlp + mlp) + (mlp * c + c)
    r = c // reduction
    se = n_controlled * ((c * r + r) + (r * c + c) + c)      # down, up, gamma per controlled block
    return (in_ch * c + c) + 2 * per_stream + text_len * context + vec + streams * se


def test_parameter_count_flux_dev_exact():
    """0.35-0.45 B is the acceptance band; the exact count follows from the definition."""
    n = count_params(FluxIRConfig(), "flux-dev")
    assert n == 410_080_192 == _adapter_params_by_hand(3072, 12288, 128, 4096, 768, 64, 512, 57, 32, 2)
    assert 0.35e9 <= n <= 0.45e9
    # schnell: text length 256; double-only control; image-only control (no SE_p)
    assert count_params(FluxIRConfig(text_len=256), "flux-schnell") == 409_031_616
    assert count_params(FluxIRConfig(control_blocks="double"), "flux-dev") == \
        _adapter_params_by_hand(3072, 12288, 128, 4096, 768, 64, 512, 19, 32, 2)
    assert count_params(FluxIRConfig(image_only=True), "flux-dev") == \
        _adapter_params_by_hand(3072, 12288, 128, 4096, 768, 64, 512, 57, 32, 1)


def test_flux_parameter_counts_exact():
    """BFL's flux1-dev.safetensors holds 11,901,408,320 parameters; schnell lacks guidance_in."""
    from fluxir_jax.info import count_flux_params

    dev, schnell = count_flux_params(presets.get("flux-dev")), count_flux_params(presets.get("flux-schnell"))
    assert dev == 11_901_408_320
    guidance_in = (256 * 3072 + 3072) + (3072 * 3072 + 3072)   # MLPEmbedder(256, 3072)
    assert dev - schnell == guidance_in


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _np_se_gates(se, c):
    """numpy re-statement of SqueezeExcite: gamma_k * sigmoid(up_k(silu(down_k(mean_tokens(c)))))."""
    p = {k: np.asarray(v, np.float64) for k, v in (("wd", se.down.kernel[...]), ("bd", se.down.bias[...]),
                                                   ("wu", se.up.kernel[...]), ("bu", se.up.bias[...]),
                                                   ("g", se.gamma[...]))}
    sq = np.asarray(c, np.float64).mean(axis=1)                        # [B, D]
    out = []
    for k in range(p["g"].shape[0]):
        h = sq @ p["wd"][k] + p["bd"][k]
        h = h * _np_sigmoid(h)                                          # silu
        out.append(p["g"][k] * _np_sigmoid(h @ p["wu"][k] + p["bu"][k]))
    return np.stack(out)                                                # [n, B, D]


@pytest.mark.parametrize("opts", [dict(), dict(control_blocks="every_n", control_every=2, control_scale=0.7),
                                  dict(control_blocks="double"), dict(image_only=True)])
def test_se_gates_and_control_assembly_match_numpy(opts):
    """Every SE weight random (gamma included): gates and the assembled Control equal a numpy
    re-statement; block k's residual is features * gate_k, zero for blocks without control."""
    cfg = FluxIRConfig(text_len=T, **opts)
    base, adapter, x = make(cfg, seed=5)
    rng = np.random.default_rng(7)
    for se in (adapter.se_img, adapter.se_txt):
        if se is not None:
            se.gamma.set_value(jnp.asarray(rng.standard_normal(se.gamma.shape), jnp.float32))
            se.up.bias.set_value(jnp.asarray(rng.standard_normal(se.up.bias.shape), jnp.float32))
    c_img = rng.standard_normal((B, H * W // 4, BASE.hidden_size)).astype(np.float32)
    c_txt = rng.standard_normal((B, T, BASE.hidden_size)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        control = adapter._control(jnp.asarray(c_img), jnp.asarray(c_txt))
    d_idx, s_idx = cfg.controlled(BASE)
    scale = cfg.control_scale
    for stream, se, feats in (("img", adapter.se_img, c_img), ("txt", adapter.se_txt, c_txt)):
        if se is None:
            assert getattr(control.double, stream) is None and getattr(control.double, f"{stream}_gate") is None
            continue
        rows = _np_se_gates(se, feats)                                   # one row per controlled block
        assert rows.shape[0] == len(d_idx) + len(s_idx)
        want_d = np.zeros((BASE.depth, B, BASE.hidden_size))
        want_d[list(d_idx)] = rows[: len(d_idx)]
        got_d = np.asarray(getattr(control.double, f"{stream}_gate"), np.float64)
        assert rel_err(got_d, want_d) <= 1e-5, rel_err(got_d, want_d)   # float32 vs float64 reference
        np.testing.assert_allclose(np.asarray(getattr(control.double, stream)), feats * scale, rtol=1e-6)
        if s_idx:
            want_s = np.zeros((BASE.depth_single_blocks, B, BASE.hidden_size))
            want_s[list(s_idx)] = rows[len(d_idx):]
            got_s = np.asarray(getattr(control.single, f"{stream}_gate"), np.float64)
            assert rel_err(got_s, want_s) <= 1e-5
            np.testing.assert_array_equal(got_s[[k for k in range(BASE.depth_single_blocks) if k not in s_idx]], 0)
        else:
            assert control.single is None
        # the residual of double block k as the base applies it: features * gate_k, per token
        k = d_idx[-1]
        residual = np.asarray(getattr(control.double, stream))[:, :, :] * np.asarray(got_d[k])[:, None, :]
        np.testing.assert_allclose(residual, feats * scale * want_d[k][:, None, :], rtol=1e-4, atol=1e-6)
    assert np.abs(rows).max() > 0.05                                    # non-trivial gates were compared


def test_adapter_input_is_base_img_in_plus_lq_in_numpy():
    """x = img_in(z_t) + M_i(z_lq) with M_i randomized: the control equals the control block applied
    to that x (numpy-built) and to p = txt_in(theta_p)."""
    base, adapter, x = make(randomize=True)
    np64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    xi = np64(x["img"]) @ np64(base.img_in.kernel[...]) + np64(base.img_in.bias[...]) \
        + np64(x["lq"]) @ np64(adapter.lq_in.kernel[...]) + np64(adapter.lq_in.bias[...])
    p = np64(adapter.theta_p[...]) @ np64(base.txt_in.kernel[...]) + np64(base.txt_in.bias[...])
    with jax.default_matmul_precision("highest"):
        control = adapter(base, x["img"], x["lq"], x["img_ids"], x["t"], x["guidance"])
        theta_y = jnp.broadcast_to(adapter.theta_y[...], (B, BASE.vec_in_dim))
        vec = base.embed_vec(x["t"], theta_y, x["guidance"])
        txt_ids = jnp.zeros((B, T, 3), jnp.float32)
        c_img, c_txt = adapter.block(jnp.asarray(xi, jnp.float32), jnp.broadcast_to(jnp.asarray(p, jnp.float32), (B, T, BASE.hidden_size)),
                                     vec, base.pos_embed(txt_ids, x["img_ids"]))
        want = adapter._control(c_img, c_txt)
    assert rel_err(control.double.img, want.double.img) <= 1e-5
    assert rel_err(control.double.txt_gate, want.double.txt_gate) <= 1e-5
    assert rel_err(xi, np64(base.img_in(x["img"]))) > 1e-3            # M_i(z_lq) really contributed


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


def _converted_checkpoint_dir(path, base_cfg, text_len):
    """A converted checkpoint's config.json (what `--base DIR` reads; no weights needed)."""
    import json

    from fluxir_jax import checkpoint
    from fluxir_jax import config as config_io

    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "format": checkpoint.CHECKPOINT_FORMAT, "format_version": checkpoint.CHECKPOINT_VERSION,
        "items": ["transformer"], "transformer": config_io.to_dict(base_cfg), "vae": None,
        "text": {"empty": {"computed": True, "text_len": text_len}}}))
    return path


def test_export_base_may_be_a_converted_checkpoint(tmp_path, capsys):
    _, adapter, _ = make()
    adapter_io.save_adapter(adapter, tmp_path / "ckpt")
    out = tmp_path / "a.safetensors"
    good = _converted_checkpoint_dir(tmp_path / "base_ok", BASE, T)
    assert cli.main(["export-adapter", str(tmp_path / "ckpt"), "-o", str(out), "--base", str(good)]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "MiB" in printed and "GiB" not in printed
    other_len = _converted_checkpoint_dir(tmp_path / "base_len", BASE, T + 3)
    assert cli.main(["export-adapter", str(tmp_path / "ckpt"), "-o", str(tmp_path / "b.safetensors"),
                     "--base", str(other_len)]) == 2
    assert f"text length {T}, the base's text embeddings have length {T + 3}" in capsys.readouterr().err
    wider = _converted_checkpoint_dir(tmp_path / "base_wide", presets.get("tiny", depth=3, depth_single_blocks=3), T)
    assert cli.main(["export-adapter", str(tmp_path / "ckpt"), "-o", str(tmp_path / "c.safetensors"),
                     "--base", str(wider)]) == 2
    assert "adapter was built for base depth=2, the loaded base has depth=3" in capsys.readouterr().err


def test_adapter_json_holds_configs_as_objects(tmp_path):
    import json

    _, adapter, _ = make(FluxIRConfig(text_len=T, se_reduction=8))
    adapter_io.save_adapter(adapter, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "adapter.json").read_text())
    assert meta["format"] == adapter_io.FORMAT
    assert meta["fluxir_config"]["se_reduction"] == 8 and meta["fluxir_config"]["text_len"] == T
    assert meta["base_config"]["hidden_size"] == BASE.hidden_size and meta["base_config"]["axes_dim"] == list(BASE.axes_dim)
    assert adapter_io.load_adapter(tmp_path / "ckpt").config == adapter.config
