"""`fluxir convert` and the checkpoint loaders on tiny random diffusers models.

Tolerances: converted models agree with the PyTorch modules they came from within 1e-5
relative error (‖flax − torch‖ / ‖torch‖, float32, JAX "highest" matmul precision); the BFL
and diffusers routes give bit-identical parameters.
"""
from __future__ import annotations

import contextlib
import io
import json
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from fluxir_jax import checkpoint, cli
from tests.models import flux_reference as fr

TINY_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=16, norm_num_groups=4,
    use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
)


# ----------------------------------------------------------------------------- helpers (also used by test_compare)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


def tiny_vae(seed: int = 1):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**TINY_VAE).eval()
    fr.randomize_torch_(vae, seed)
    return vae


def build_pipeline(root: pathlib.Path, *, sharded: bool = False, seed: int = 0):
    """diffusers `transformer/` + `vae/` folders of tiny random models; returns (transformer, vae)."""
    dm = fr.tiny_diffusers(True, seed=seed)
    vae = tiny_vae(seed + 1)
    dm.save_pretrained(root / "transformer", max_shard_size="200KB" if sharded else "10GB")
    vae.save_pretrained(root / "vae")
    return dm, vae


def numpy_state(module) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy().copy() for k, v in module.state_dict().items()}


def bfl_transformer_sd(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """diffusers FluxTransformer2DModel -> BFL flux1-*.safetensors keys, written out independently of flux_map."""
    out = {}
    top = {
        "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    }
    for d, b in top.items():
        for p in ("weight", "bias"):
            if f"{d}.{p}" in sd:
                out[f"{b}.{p}"] = sd[f"{d}.{p}"]
    for p in ("weight", "bias"):  # diffusers (scale, shift) -> BFL (shift, scale)
        scale, shift = np.split(sd[f"norm_out.linear.{p}"], 2)
        out[f"final_layer.adaLN_modulation.1.{p}"] = np.concatenate([shift, scale])
    double = {i for k in sd if (m := re.match(r"transformer_blocks\.(\d+)\.", k)) for i in [int(m.group(1))]}
    single = {i for k in sd if (m := re.match(r"single_transformer_blocks\.(\d+)\.", k)) for i in [int(m.group(1))]}
    for i in sorted(double):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for p in ("weight", "bias"):
            out[b + f"img_attn.qkv.{p}"] = np.concatenate([sd[d + f"attn.to_{x}.{p}"] for x in "qkv"])
            out[b + f"txt_attn.qkv.{p}"] = np.concatenate([sd[d + f"attn.add_{x}_proj.{p}"] for x in "qkv"])
            for dn, bn in (("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin"),
                           ("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
                           ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                           ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2")):
                out[b + f"{bn}.{p}"] = sd[d + f"{dn}.{p}"]
        for dn, bn in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                       ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):
            out[b + f"{bn}.scale"] = sd[d + f"attn.{dn}.weight"]
    for i in sorted(single):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for p in ("weight", "bias"):
            out[b + f"linear1.{p}"] = np.concatenate([sd[d + f"attn.to_{x}.{p}"] for x in "qkv"] + [sd[d + f"proj_mlp.{p}"]])
            out[b + f"linear2.{p}"] = sd[d + f"proj_out.{p}"]
            out[b + f"modulation.lin.{p}"] = sd[d + f"norm.linear.{p}"]
        out[b + "norm.query_norm.scale"] = sd[d + "attn.norm_q.weight"]
        out[b + "norm.key_norm.scale"] = sd[d + "attn.norm_k.weight"]
    assert sum(x.size for x in out.values()) == sum(x.size for x in sd.values())
    return out


def bfl_vae_sd(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """diffusers AutoencoderKL -> BFL ae.safetensors keys, written out independently of vae_map."""
    levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    subs = [
        (r"decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}."),
        (r"down_blocks\.", "down."), (r"resnets\.", "block."), (r"conv_shortcut", "nin_shortcut"),
        (r"downsamplers\.0\.", "downsample."), (r"upsamplers\.0\.", "upsample."), (r"conv_norm_out", "norm_out"),
        (r"mid_block\.block\.0\.", "mid.block_1."), (r"mid_block\.block\.1\.", "mid.block_2."),
        (r"mid_block\.attentions\.0\.group_norm", "mid.attn_1.norm"), (r"mid_block\.attentions\.0\.to_out\.0", "mid.attn_1.proj_out"),
        (r"mid_block\.attentions\.0\.to_([qkv])", r"mid.attn_1.\1"),
    ]
    out = {}
    for k, x in sd.items():
        for pat, rep in subs:
            k = re.sub(pat, rep, k)
        if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", k):
            x = x[:, :, None, None]
        out[k] = x
    return out


def write_bfl(root: pathlib.Path, dm, vae, *, prefix: str = "model.diffusion_model.") -> tuple[pathlib.Path, pathlib.Path]:
    root.mkdir(parents=True, exist_ok=True)
    flux, ae = root / "flux1-tiny.safetensors", root / "ae.safetensors"
    save_file({prefix + k: np.ascontiguousarray(v) for k, v in bfl_transformer_sd(numpy_state(dm)).items()}, flux)
    save_file({k: np.ascontiguousarray(v) for k, v in bfl_vae_sd(numpy_state(vae)).items()}, ae)
    return flux, ae


def raw_item(ckpt: pathlib.Path, item: str) -> dict[str, np.ndarray]:
    """A checkpoint item restored with plain Orbax (no target): {'a/b/c': numpy array}."""
    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointer().restore(ckpt / item)
    return {"/".join(k): np.asarray(v) for k, v in checkpoint._flat_items(tree)}


def vae_outputs(vae, ae, seed=3):
    """(diffusers, flax) encodings of a random image and decodings of a random latent."""
    rng = np.random.default_rng(seed)
    img = rng.uniform(-1, 1, (2, 3, 32, 40)).astype(np.float32)
    lat = rng.standard_normal((2, 16, 4, 5)).astype(np.float32)
    with torch.no_grad():
        enc_t = ((vae.encode(torch.from_numpy(img)).latent_dist.mean - 0.1159) * 0.3611).numpy()
        dec_t = vae.decode(torch.from_numpy(lat) / 0.3611 + 0.1159).sample.numpy()
    with jax.default_matmul_precision("highest"):
        enc_j = np.asarray(ae.encode(jnp.asarray(img.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
        dec_j = np.asarray(ae.decode(jnp.asarray(lat.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
    return (enc_t, dec_t), (enc_j, dec_j)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A sharded diffusers transformer + VAE, converted once."""
    root = tmp_path_factory.mktemp("pipe")
    dm, vae = build_pipeline(root, sharded=True)
    shards = sorted((root / "transformer").glob("*.safetensors"))
    assert len(shards) > 1 and (root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    out = root.parent / (root.name + "_ckpt")
    rc, stdout, err = run_cli(["convert", str(root), "-o", str(out), "--no-progress"])
    assert rc == 0, err
    return dict(root=root, dm=dm, vae=vae, ckpt=out, stdout=stdout)


# ----------------------------------------------------------------------------- tests


def test_diffusers_folders_convert_and_match_torch(converted):
    ckpt, dm = converted["ckpt"], converted["dm"]
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["items"] == ["transformer", "vae"]
    t = cfg["transformer"]
    assert (t["hidden_size"], t["num_heads"], t["depth"], t["depth_single_blocks"]) == (32, 2, 2, 3)
    assert (t["axes_dim"], t["guidance_embed"], t["param_dtype"]) == ([4, 6, 6], True, "float32")
    assert cfg["vae"]["norm_groups"] == 4 and cfg["vae"]["ch_mult"] == [1, 2, 2, 2]
    src = {s["component"]: s for s in cfg["sources"]}
    files = sorted(p.name for p in (converted["root"] / "transformer").glob("*.safetensors"))
    assert [f["name"] for f in src["transformer"]["files"]] == files
    assert all(f["size"] == (converted["root"] / "transformer" / f["name"]).stat().st_size for f in src["transformer"]["files"])
    # no encoders given: zeros of the model's text shapes, and said so
    assert cfg["text"]["empty"]["computed"] is False and "zeros" in converted["stdout"]
    text = checkpoint.load_text_embeddings(ckpt)
    assert text["txt"].shape == (512, 32) and text["y"].shape == (32,) and not text["txt"].any()

    model = checkpoint.load_flux(ckpt)
    x = fr.inputs()
    want = fr.run_diffusers(dm, x)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(fr.run_flax(model, x))
    assert fr.rel_err(got, want) < 1e-5

    ae = checkpoint.load_autoencoder(ckpt)
    (enc_t, dec_t), (enc_j, dec_j) = vae_outputs(converted["vae"], ae)
    assert fr.rel_err(enc_j, enc_t) < 1e-5
    assert fr.rel_err(dec_j, dec_t) < 1e-5


def test_bfl_files_give_identical_params(converted, tmp_path):
    flux, ae = write_bfl(tmp_path / "bfl", converted["dm"], converted["vae"])
    out = tmp_path / "ckpt"
    rc, _, err = run_cli(["convert", str(flux), str(ae), "-o", str(out), "--axes-dim", "4,6,6",
                          "--vae-norm-groups", "4", "--no-progress"])
    assert rc == 0, err
    a, b = (json.loads((p / "config.json").read_text()) for p in (converted["ckpt"], out))
    assert a["transformer"] == b["transformer"] and a["vae"] == b["vae"]
    for item in ("transformer", "vae"):
        from_diffusers, from_bfl = raw_item(converted["ckpt"], item), raw_item(out, item)
        assert sorted(from_diffusers) == sorted(from_bfl)
        for k, v in from_diffusers.items():
            assert v.dtype == from_bfl[k].dtype and np.array_equal(v, from_bfl[k]), k


def test_restore_into_shardings(converted):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("fsdp", "data"))

    def rule(path, shape):
        return P("fsdp") if path[0] in ("double_blocks",) else P()

    model = checkpoint.load_flux(converted["ckpt"], mesh=mesh, sharding=rule)
    qkv = model.double_blocks.img_attn.qkv.kernel[...]
    assert isinstance(qkv.sharding, NamedSharding) and qkv.sharding.spec == P("fsdp")
    assert {s.data.shape for s in qkv.addressable_shards} == {(1, 32, 96)}
    assert model.img_in.kernel[...].sharding.spec == P()
    x = fr.inputs()
    with jax.default_matmul_precision("highest"):
        got = np.asarray(fr.run_flax(model, x))
    assert fr.rel_err(got, fr.run_diffusers(converted["dm"], x)) < 1e-5


def test_dtype_bf16_and_truncated_load(converted, tmp_path):
    out = tmp_path / "bf16"
    rc, _, err = run_cli(["convert", str(converted["root"] / "transformer"), "-o", str(out), "--dtype", "bf16",
                          "--no-progress"])
    assert rc == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["transformer"]["param_dtype"] == "bfloat16" and cfg["vae"] is None
    model = checkpoint.load_flux(out)
    kernel = np.asarray(model.double_blocks.img_mlp[0].kernel[...])
    assert kernel.dtype == jnp.bfloat16
    full = checkpoint.load_flux(converted["ckpt"])
    want = np.asarray(full.double_blocks.img_mlp[0].kernel[...]).astype(jnp.bfloat16)
    assert np.array_equal(kernel.view(np.uint16), want.view(np.uint16))
    # only the first layers of stacked parameters are read when the config asks for fewer blocks
    one = checkpoint.load_flux(converted["ckpt"], depth=1, depth_single_blocks=2)
    assert one.single_blocks.linear1.kernel[...].shape[0] == 2
    assert np.array_equal(np.asarray(one.single_blocks.linear1.kernel[...]),
                          np.asarray(full.single_blocks.linear1.kernel[...])[:2])
    with pytest.raises(checkpoint.UserError, match="no vae"):
        checkpoint.load_autoencoder(out)


# ----------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def bfl_files(converted, tmp_path_factory):
    d = tmp_path_factory.mktemp("bfl_src")
    flux, ae = write_bfl(d, converted["dm"], converted["vae"], prefix="")
    return dict(dir=d, flux=flux, ae=ae, sd=bfl_transformer_sd(numpy_state(converted["dm"])))


def _write(path: pathlib.Path, sd: dict) -> pathlib.Path:
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, path)
    return path


def _bad_truncated(d, f):
    p = d / "truncated.safetensors"
    data = f["flux"].read_bytes()
    p.write_bytes(data[: len(data) - 1000])
    return [p], "truncated"


def _bad_missing(d, f):
    sd = dict(f["sd"])
    del sd["double_blocks.1.img_attn.proj.bias"]
    return [_write(d / "missing.safetensors", sd)], "missing key 'double_blocks.1.img_attn.proj.bias'"


def _bad_unexpected(d, f):
    sd = dict(f["sd"], **{"double_blocks.0.img_attn.extra.weight": np.zeros((4, 4), np.float32)})
    return [_write(d / "unexpected.safetensors", sd)], "unexpected key 'double_blocks.0.img_attn.extra.weight'"


def _bad_shape(d, f):
    sd = dict(f["sd"], **{"single_blocks.2.linear2.weight": np.zeros((32, 150), np.float32)})
    return [_write(d / "shape.safetensors", sd)], "single_blocks.2.linear2.weight' has shape [32, 150], expected [32, 160]"


def _bad_pt(d, f):
    p = d / "model.pt"
    torch.save({"img_in.weight": torch.zeros(2, 2)}, p)
    return [p], "pickles and are refused"


def _bad_bin_folder(d, f):
    folder = d / "transformer_bin"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    torch.save({"x_embedder.weight": torch.zeros(2, 2)}, folder / "diffusion_pytorch_model.bin")
    return [folder], "only pickle weights"


def _bad_disguised_pickle(d, f):
    p = d / "disguised.safetensors"
    torch.save({"img_in.weight": torch.zeros(2, 2)}, p)
    return [p], "not safetensors"


def _bad_index(d, f, converted=None):
    folder = d / "sharded"
    shutil.copytree(converted["root"] / "transformer", folder)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["transformer_blocks.0.attn.to_q.extra"] = next(iter(data["weight_map"].values()))
    index.write_text(json.dumps(data))
    return [folder], "missing key 'transformer_blocks.0.attn.to_q.extra'"


def _bad_diffusers_missing(d, f, converted=None):
    folder = d / "diffusers_missing"
    folder.mkdir()
    sd = numpy_state(converted["dm"])
    del sd["single_transformer_blocks.1.proj_out.weight"]
    _write(folder / "diffusion_pytorch_model.safetensors", sd)
    shutil.copy(converted["root"] / "transformer" / "config.json", folder)
    return [folder], "missing key 'single_transformer_blocks.1.proj_out.weight'"


@pytest.mark.parametrize("case", [_bad_truncated, _bad_missing, _bad_unexpected, _bad_shape, _bad_pt, _bad_bin_folder,
                                  _bad_disguised_pickle, _bad_index, _bad_diffusers_missing],
                         ids=lambda c: c.__name__[5:])
def test_bad_inputs_exit_2_and_leave_nothing(case, bfl_files, converted, tmp_path):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    kwargs = {"converted": converted} if "converted" in case.__code__.co_varnames else {}
    sources, expect = case(src_dir, bfl_files, **kwargs)
    rc, _, err = run_cli(["convert", *map(str, sources), "-o", str(out_parent / "ckpt"), "--axes-dim", "4,6,6",
                          "--no-progress"])
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], err
    assert list(out_parent.iterdir()) == []


def test_existing_output_needs_overwrite(bfl_files, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old.txt").write_text("keep me unless --overwrite")
    args = ["convert", str(bfl_files["flux"]), "-o", str(out), "--axes-dim", "4,6,6", "--no-progress"]
    rc, _, err = run_cli(args)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "already exists" in err
    assert (out / "old.txt").is_file()
    rc, _, err = run_cli(args + ["--overwrite"])
    assert rc == 0, err
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_failure_while_writing_leaves_nothing(bfl_files, tmp_path, monkeypatch):
    from fluxir_convert import formats

    calls = {"n": 0}
    real = formats.read_into

    def flaky(info, out):
        calls["n"] += 1
        if calls["n"] > 20:
            raise checkpoint.UserError(f"{info.file}: I/O error while reading {info.key!r}")
        return real(info, out)

    monkeypatch.setattr(formats, "read_into", flaky)
    out_parent = tmp_path / "outputs"
    rc, _, err = run_cli(["convert", str(bfl_files["flux"]), "-o", str(out_parent / "deep" / "ckpt"),
                          "--axes-dim", "4,6,6", "--no-progress"])
    assert rc == 2 and "I/O error" in err
    assert calls["n"] > 20
    assert not out_parent.exists()
