"""RestoreConfig, host-side image preparation and the engine's sharding rule (no model runs)."""
import pathlib

import numpy as np
import pytest

from fluxir_jax import infer
from fluxir_jax.errors import UserError
from fluxir_jax.restore import RestoreConfig, as_rgb_float, load_config, output_size, pad_to, padded

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_default_yaml_is_the_dataclass_defaults_and_overrides_apply():
    assert load_config(ROOT / "configs" / "restore" / "default.yaml") == RestoreConfig()
    cfg = load_config(None, ["steps=8", "tile.size=512", "color_fix=adain", "mesh.fsdp=4"], guidance=2.0, tile={"sigma": 0.5})
    assert (cfg.steps, cfg.tile.size, cfg.tile.sigma, cfg.color_fix, cfg.mesh.fsdp, cfg.guidance) == (8, 512, 0.5, "adain", 4, 2.0)
    for bad in (["color_fix=sepia"], ["tile.size=100"], ["tile.overlap=0.5"], ["parallel_mode=pmap"], ["format=gif"]):
        with pytest.raises(UserError):
            load_config(None, bad)
    with pytest.raises(UserError, match="unknown restore option"):
        load_config(None, (), tiles=3)


def test_output_size_scale_target_and_padding():
    assert output_size(12, 20, RestoreConfig()) == (48, 80)
    assert output_size(1, 1, RestoreConfig()) == (4, 4)
    assert output_size(300, 200, RestoreConfig(target_size=1200)) == (1200, 800)
    assert output_size(10, 10, RestoreConfig(scale=2.5)) == (25, 25)
    assert (padded(48), padded(49), padded(4)) == (48, 64, 16)
    x = np.arange(3 * 5 * 3, dtype=np.float32).reshape(3, 5, 3)
    p = pad_to(x, (16, 16))
    assert p.shape == (16, 16, 3) and np.array_equal(p[:3, :5], x) and np.array_equal(p[3, :5], x[1])  # reflect
    assert (pad_to(x[:1, :1], (16, 16)) == x[0, 0]).all()  # a 1x1 image pads by copies


def test_as_rgb_float_accepts_gray_rgba_and_float():
    gray = np.full((4, 4), 255, np.uint8)
    assert as_rgb_float(gray).shape == (4, 4, 3) and as_rgb_float(gray).min() == 1.0
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black -> white
    assert np.allclose(as_rgb_float(rgba), 1.0)
    with pytest.raises(UserError):
        as_rgb_float(np.zeros((4, 4, 2), np.uint8))


def test_sharded_engine_places_parameters_by_the_one_rules_table():
    """infer.Engine (sharded) and the checkpoint loaders it guides use parallel.PARAM_RULES / LOGICAL_RULES."""
    from flax import nnx

    from fluxir_jax import parallel
    from fluxir_jax.models import presets
    from fluxir_jax.models.flux import Flux

    _, abstract = nnx.split(nnx.eval_shape(lambda: Flux(presets.get("tiny"), rngs=nnx.Rngs(0))))
    engine = infer.Engine({"base": abstract}, parallel="sharded", mesh=infer.MeshShape(fsdp=4, tensor=2))
    rule = engine.load_sharding("base")
    want = {path: s for path, s in nnx.to_flat_state(parallel.state_shardings(abstract, engine._mesh))}
    specs = {}
    for path, var in nnx.to_flat_state(abstract):
        got = rule(path, var.shape)
        assert got == want[path], path
        specs["/".join(map(str, path))] = got.spec
    assert "fsdp" in specs["img_in/kernel"]
    stacked = {k: v for k, v in specs.items() if k.startswith(("double_blocks/", "single_blocks/"))}
    assert stacked and all(len(v) == 0 or v[0] is None for v in stacked.values())  # the layer axis never
    assert any("fsdp" in v for v in stacked.values()) and any("tensor" in v for v in stacked.values())
    assert infer.MeshShape(data=2).resolve(8) == (2, 4, 1)
    with pytest.raises(UserError):
        infer.MeshShape(data=3).resolve(8)


def test_save_image_formats_and_inputs_exclude_the_output_folder(tmp_path):
    from PIL import Image

    from fluxir_jax.restore_folder import list_inputs, save_image

    img = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    save_image(img, tmp_path / "in" / "a.png", RestoreConfig())
    save_image(img, tmp_path / "in" / "out" / "b.jpg", RestoreConfig(format="jpeg", jpeg_quality=90))
    with Image.open(tmp_path / "in" / "a.png") as im:
        assert im.format == "PNG" and np.array_equal(np.asarray(im), img)
    with Image.open(tmp_path / "in" / "out" / "b.jpg") as im:
        assert im.format == "JPEG" and im.size == (12, 8)
    assert not list((tmp_path / "in").rglob("*.tmp"))
    root, rels = list_inputs(tmp_path / "in", tmp_path / "in" / "out")
    assert rels == ["a.png"]
    assert list_inputs(tmp_path / "in")[1] == ["a.png", "out/b.jpg"]
    with pytest.raises(UserError, match="no such file"):
        list_inputs(tmp_path / "missing")
