"""`fluxir init`: random checkpoints of the presets in the `fluxir convert` format."""
from __future__ import annotations

import contextlib
import io
import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from fluxir_jax import checkpoint, cli, init_checkpoint, sampling
from fluxir_jax.errors import UserError
from fluxir_jax.models import presets
from fluxir_jax.models.autoencoder import AE_PRESETS, AutoEncoder
from fluxir_jax.models.flux import Flux


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(autouse=True)
def fresh_notices(monkeypatch):
    monkeypatch.setattr(checkpoint, "_RANDOM_NOTICED", set())


def _shapes(model) -> dict:
    return {tuple(str(p) for p in path): tuple(v.shape) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _values(model) -> dict:
    return {tuple(str(p) for p in path): np.asarray(v.get_value())
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _init(tmp_path, name, *extra):
    out = tmp_path / name
    rc, stdout, err = run_cli(["init", *extra, "-o", str(out), "--no-progress"])
    assert rc == 0, err
    return out, stdout, err


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_init_loads_runs_and_says_random_once(preset, tmp_path):
    out, stdout, _ = _init(tmp_path, "ck", preset, "--text-len", "8")
    assert f"wrote {out}: preset {preset} with RANDOM weights and text embeddings (seed 0)" in stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == checkpoint.CHECKPOINT_FORMAT and cfg["format_version"] == checkpoint.CHECKPOINT_VERSION
    assert cfg["random"]["weights"] and cfg["random"]["text"] and cfg["text"]["empty"]["random"]
    assert cfg["items"] == ["transformer", "vae"]

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        flux = checkpoint.load_flux(out)
        ae = checkpoint.load_autoencoder(out)
        text = checkpoint.load_text_embeddings(out)
        cond = sampling.empty_conditioning(out, 1, 32, 32, guidance=3.5)
    notice = f"fluxir: note: {out} holds RANDOM weights and text embeddings (fluxir init {preset} --seed 0)"
    assert err.getvalue().count(notice) == 1, err.getvalue()

    fcfg, acfg = presets.get(preset), AE_PRESETS[init_checkpoint.VAE_FOR_PRESET[preset]]
    assert flux.config == fcfg and ae.config == acfg
    assert _shapes(flux) == _shapes(nnx.eval_shape(lambda: Flux(fcfg, rngs=nnx.Rngs(0))))
    assert _shapes(ae) == _shapes(nnx.eval_shape(lambda: AutoEncoder(acfg, rngs=nnx.Rngs(0))))
    assert text["txt"].shape == (8, fcfg.context_in_dim) and text["y"].shape == (fcfg.vec_in_dim,)
    assert text["random"] and not text["computed"] and 0.9 < text["txt"].std() < 1.1  # random, not zeros
    np.testing.assert_array_equal(np.asarray(cond.txt[0]), text["txt"])

    # the kernels have the documented scale: std 1/sqrt(fan_in)
    k = _values(flux)[("double_blocks", "img_mlp", "0", "kernel")]
    assert abs(k.std() * np.sqrt(fcfg.hidden_size) - 1) < 0.05

    graphdef, state = nnx.split(flux)
    lat = sampling.sample(sampling.FluxVelocity(graphdef), state, jnp.array([0]), 32, 32, cond, num_steps=2)
    assert lat.shape == (1, 4, 4, 16) and bool(jnp.isfinite(lat).all())
    img = ae.decode(lat)
    assert img.shape == (1, 4 * acfg.downsample_factor, 4 * acfg.downsample_factor, 3)
    assert bool(jnp.isfinite(img).all())


def test_same_seed_same_values_other_seed_other_values(tmp_path):
    a, _, _ = _init(tmp_path, "a", "tiny", "--seed", "3", "--text-len", "4")
    b, _, _ = _init(tmp_path, "b", "tiny", "--seed", "3", "--text-len", "4")
    c, _, _ = _init(tmp_path, "c", "tiny", "--seed", "4", "--text-len", "4")
    va, vb, vc = (_values(checkpoint.load_flux(d)) | {("vae",) + k: v for k, v in _values(checkpoint.load_autoencoder(d)).items()}
                  for d in (a, b, c))
    assert va.keys() == vb.keys() == vc.keys()
    for key in va:
        assert va[key].tobytes() == vb[key].tobytes(), key
        assert va[key].tobytes() != vc[key].tobytes(), key
    ta, tb, tc = (checkpoint.load_text_embeddings(d) for d in (a, b, c))
    assert ta["txt"].tobytes() == tb["txt"].tobytes() and ta["y"].tobytes() == tb["y"].tobytes()
    assert ta["txt"].tobytes() != tc["txt"].tobytes()
    assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()


def test_existing_output_and_bad_arguments(tmp_path):
    out, _, _ = _init(tmp_path, "ck", "tiny", "--text-len", "4")
    rc, _, err = run_cli(["init", "tiny", "-o", str(out), "--no-progress"])
    assert rc == 2 and f"fluxir init: error: output {out} already exists (pass --overwrite to replace it)" in err
    rc, _, err = run_cli(["init", "tiny", "-o", str(out), "--seed", "1", "--text-len", "4", "--no-progress",
                          "--overwrite"])
    assert rc == 0, err
    assert json.loads((out / "config.json").read_text())["random"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    rc, _, err = run_cli(["init", "tiny", "-o", str(tmp_path / "x"), "--seed", "-1"])
    assert rc == 2 and "--seed must be >= 0, got -1" in err
    rc, _, err = run_cli(["init", "tiny", "-o", str(tmp_path / "x"), "--text-len", "0"])
    assert rc == 2 and "--text-len must be positive, got 0" in err
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(io.StringIO()) as msg:
        cli.main(["init", "huge", "-o", str(tmp_path / "x")])
    assert e.value.code == 2 and "invalid choice: 'huge'" in msg.getvalue()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = init_checkpoint.random_piece

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] > 10:
            raise OSError("disk full")
        return real(*args)

    monkeypatch.setattr(init_checkpoint, "random_piece", flaky)
    with pytest.raises(OSError, match="disk full"):
        init_checkpoint.init_checkpoint("tiny", tmp_path / "deep" / "ck", text_len=4, progress=False, log=lambda s: None)
    assert calls["n"] > 10 and list(tmp_path.iterdir()) == []


def test_zero_text_still_refused_but_random_text_accepted(tmp_path):
    out, _, _ = _init(tmp_path, "ck", "tiny", "--text-len", "4")
    cfg = json.loads((out / "config.json").read_text())
    with np.load(out / "text/empty.npz") as z:
        arrays = dict(z)
    np.savez(out / "text/empty.npz", txt=np.zeros_like(arrays["txt"]), y=np.zeros_like(arrays["y"]),
             computed=np.array(False))  # as `fluxir convert` without encoders writes it
    cfg.pop("random")
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="the empty-prompt embeddings were not computed"):
        sampling.empty_conditioning(out, 1, 32, 32)


def test_bfloat16_rounding_matches_ml_dtypes():
    n = (1 << 22) + 12_345  # more than one conversion chunk
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32) * np.float32(10.0) ** np.linspace(
        -20, 20, n, dtype=np.float32)
    x[:4] = [0.0, -0.0, 1.00390625, 1.01171875]  # ties: round half to even
    want = x.astype(ml_dtypes.bfloat16)
    got = init_checkpoint._to_dtype(x.copy(), np.dtype(ml_dtypes.bfloat16))
    assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("preset", ["flux-dev", "flux-schnell"])
def test_real_presets_are_planned_without_writing(preset):
    """flux-dev writes 23.8 GB: check the plan (shapes, sizes, dtypes) and a few produced pieces only."""
    from fluxir_jax.checkpoint_writer import iter_leaves
    from fluxir_jax.info import count_flux_params

    p = init_checkpoint.plan(preset, seed=0)
    fcfg = presets.get(preset)
    n_flux = count_flux_params(fcfg)
    assert 11.8e9 < n_flux < 12.0e9
    assert p.vae_config == AE_PRESETS["flux"] and p.dtypes["transformer"] == {"bfloat16": n_flux}
    n_vae = sum(p.dtypes["vae"].values())
    assert 83e6 < n_vae < 84.5e6 and p.dtypes["vae"] == {"float32": n_vae}
    assert p.nbytes == 2 * n_flux + 4 * n_vae
    abstract = nnx.eval_shape(lambda: Flux(fcfg, rngs=nnx.Rngs(0)))
    want = _shapes(abstract)
    tree = p.trees["transformer"]
    got = {}

    def walk(node, prefix=()):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, prefix + (k,))
            else:
                got[prefix + (k,)] = v

    walk(tree)
    assert {k: v.shape for k, v in got.items()} == want
    lin1 = got[("single_blocks", "linear1", "kernel")]
    # one chunk per layer, split 16 ways over `embed` (fsdp) and 8 over `mlp` (tensor): fluxir_jax.chunking
    assert lin1.stacked and len(lin1.pieces) == 38 and lin1.chunk_shape == (1, 3072 // 16, 21504 // 8)
    assert sum(1 for _ in iter_leaves(tree)) == len(want)

    piece = got[("final_layer", "linear", "kernel")].pieces[0]
    a, b = piece.produce(), piece.produce()
    assert a.dtype == ml_dtypes.bfloat16 and a.shape == (3072, 64) and a.tobytes() == b.tobytes()
    assert abs(a.astype(np.float32).std() * np.sqrt(3072) - 1) < 0.05
    norm = got[("double_blocks", "img_attn", "norm", "query_norm", "scale")]
    l0, l1 = norm.pieces[0].produce(), norm.pieces[1].produce()
    assert l0.shape == (128,) and l0.tobytes() != l1.tobytes()
    assert abs(l0.astype(np.float32).mean() - 1) < 0.01
    assert p.text["txt"].shape == ((512 if fcfg.guidance_embed else 256), 4096) and p.text["y"].shape == (768,)


def test_dtype_option_stores_bfloat16(tmp_path):
    out, _, _ = _init(tmp_path, "ck", "tiny", "--dtype", "bf16", "--text-len", "4")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["transformer"]["param_dtype"] == "bfloat16" and set(cfg["stored_dtypes"]["transformer"]) == {"bfloat16"}
    assert cfg["stored_dtypes"]["vae"].keys() == {"float32"}
    flux = checkpoint.load_flux(out)
    leaf = _values(flux)[("img_in", "kernel")]
    assert leaf.dtype == jnp.bfloat16
    # the same values as the float32 checkpoint's, rounded
    f32 = init_checkpoint.random_piece(0, "transformer", ("img_in", "kernel"), None, leaf.shape, np.float32)
    assert leaf.tobytes() == f32.astype(ml_dtypes.bfloat16).tobytes()
