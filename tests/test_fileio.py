"""fluxir_jax.fileio (atomic writes, the one image reader) and fluxir_jax.treeutil (strict loading)."""
import io
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from fluxir_jax import fileio, treeutil
from fluxir_jax.errors import UserError

BABOON = pathlib.Path(__file__).parent / "data" / "baboon.png"


# ----------------------------------------------------------------------------- atomic writes
def test_atomic_file_replaces_only_when_complete(tmp_path):
    target = tmp_path / "a.json"
    fileio.write_json(target, {"x": 1})
    assert json.loads(target.read_text()) == {"x": 1}
    with pytest.raises(RuntimeError, match="boom"):
        with fileio.atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert json.loads(target.read_text()) == {"x": 1}          # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]   # no temporary left
    with pytest.raises(UserError, match="already exists"):
        fileio.write_text(target, "new", overwrite=False)
    with pytest.raises(UserError, match="does not exist"):
        fileio.write_bytes(tmp_path / "nowhere" / "b.bin", b"x")
    fileio.write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"


def test_atomic_dir(tmp_path):
    out = tmp_path / "out"
    with fileio.atomic_dir(out) as tmp:
        (tmp / "f.txt").write_text("1")
        assert not out.exists() and fileio.is_temp(tmp.name)
    assert (out / "f.txt").read_text() == "1"
    with pytest.raises(UserError, match="already exists"):
        with fileio.atomic_dir(out):
            pass
    with pytest.raises(ValueError):
        with fileio.atomic_dir(out, overwrite=True) as tmp:
            (tmp / "g.txt").write_text("2")
            raise ValueError
    assert sorted(p.name for p in out.iterdir()) == ["f.txt"]       # failure: the old one stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with fileio.atomic_dir(out, overwrite=True) as tmp:
        (tmp / "g.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["g.txt"]       # success: replaced whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ----------------------------------------------------------------------------- images
def test_read_image_8bit_rgb_is_exact(tmp_path):
    rgb = np.asarray(Image.open(BABOON).convert("RGB"))
    img = fileio.read_image(BABOON)
    assert img.dtype == np.uint8 and img.shape == (480, 492, 3)
    np.testing.assert_array_equal(img, rgb)
    f = fileio.read_image_float(BABOON)
    assert f.dtype == np.float64 and np.array_equal(f * 255, rgb.astype(np.float64))


def test_read_image_16bit_rule(tmp_path):
    """16-bit x -> round(x / 257): 0 -> 0, 257 -> 1, 385 -> 1 (1.498), 386 -> 2 (1.502), 65535 -> 255."""
    values = np.array([[0, 128, 129, 257, 385, 386, 32896, 65535]], np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)                   # mode I;16
    assert Image.open(path).mode.startswith("I")
    notes = []
    got = fileio.read_image(path, notes)
    assert got.shape == (1, 8, 3) and (got[..., 0] == got[..., 2]).all()
    assert got[0, :, 0].tolist() == [0, 0, 1, 1, 1, 2, 128, 255]
    assert np.array_equal(got[0, :, 0], np.round(values[0] / 257).astype(np.uint8))
    assert any("16-bit" in n for n in notes)
    # float variant: the same 8-bit values / 255
    np.testing.assert_array_equal(fileio.read_image_float(path) * 255, got.astype(np.float64))


def test_read_image_modes_to_rgb(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "l.png")
    np.testing.assert_array_equal(fileio.read_image(tmp_path / "l.png"), np.repeat(gray[..., None], 3, 2))
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    np.testing.assert_array_equal(fileio.read_image(tmp_path / "p.png"),
                                  np.asarray(Image.open(tmp_path / "p.png").convert("RGB")))
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    assert fileio.read_image(tmp_path / "c.jpg").shape == (6, 5, 3)
    # RGBA: opaque alpha dropped; transparency composited on white
    rgba = np.concatenate([rgb, np.full((6, 5, 1), 255, np.uint8)], axis=2)
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    np.testing.assert_array_equal(fileio.read_image(tmp_path / "opaque.png"), rgb)
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "hole.png")
    notes = []
    got = fileio.read_image(tmp_path / "hole.png", notes)
    assert got[0, 0].tolist() == [255, 255, 255] and np.array_equal(got[1:], rgb[1:])
    assert any("white" in n for n in notes)
    # the same pixels from bytes
    np.testing.assert_array_equal(fileio.decode_image((tmp_path / "hole.png").read_bytes()), got)


def test_read_image_refusals(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:60])
    for name, why in (("empty.png", "empty file"), ("junk.png", "not a recognised image"),
                      ("cut.png", "truncated|corrupt"), ("absent.png", "cannot read file")):
        with pytest.raises(fileio.ImageReadError, match=why) as e:
            fileio.read_image(tmp_path / name)
        assert isinstance(e.value, UserError) and name in str(e.value)


def test_write_png_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    fileio.write_png(tmp_path / "u8.png", u8)
    np.testing.assert_array_equal(fileio.read_image(tmp_path / "u8.png"), u8)
    f = np.array([[[-0.5, 0.5, 1.5], [1 / 255, 0.4999 / 255, 1.0]]])
    fileio.write_png(tmp_path / "f.png", f)
    assert fileio.read_image(tmp_path / "f.png").tolist() == [[[0, 128, 255], [1, 0, 255]]]
    with pytest.raises(ValueError, match="HWC RGB"):
        fileio.write_png(tmp_path / "bad.png", np.zeros((4, 4), np.uint8))
    assert not (tmp_path / "bad.png").exists()


# ----------------------------------------------------------------------------- trees and strict loading
def test_flatten_unflatten():
    tree = {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
    flat = dict(treeutil.flatten(tree))
    assert flat == {("a", "b"): 1, ("a", "c", "d"): 2, ("e",): 3}
    assert treeutil.unflatten(flat) == tree
    assert treeutil.unflatten({"a.b": 1, "a.c.d": 2, "e": 3}) == tree
    with pytest.raises(ValueError, match="nests under a leaf"):
        treeutil.unflatten({"a": 1, "a.b": 2})


class _Tiny(nnx.Module):
    def __init__(self):
        self.lin = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
        self.scale = nnx.Param(jnp.ones((2,)))


def test_load_into_is_strict_and_exact():
    model = nnx.eval_shape(_Tiny)
    rng = np.random.default_rng(2)
    flat = {("lin", "kernel"): rng.standard_normal((3, 2)).astype(np.float32),
            "lin.bias": rng.standard_normal(2).astype(np.float32), ("scale",): np.array([2.0, 3.0], np.float32)}
    loaded = treeutil.load_into(model, flat, "w.safetensors")
    np.testing.assert_array_equal(np.asarray(loaded.lin.kernel[...]), flat[("lin", "kernel")])
    np.testing.assert_array_equal(np.asarray(loaded.lin.bias[...]), flat["lin.bias"])
    np.testing.assert_array_equal(np.asarray(loaded.scale[...]), [2.0, 3.0])
    with pytest.raises(UserError, match=r"w.safetensors: missing key 'scale'"):
        treeutil.load_into(model, {k: v for k, v in flat.items() if k != ("scale",)}, "w.safetensors")
    with pytest.raises(UserError, match=r"unexpected key 'extra.w'"):
        treeutil.load_into(model, {**flat, "extra.w": np.zeros(1)}, "w.safetensors")
    with pytest.raises(UserError, match=r"key 'lin\.kernel' has shape \[2, 3\], expected \[3, 2\]"):
        treeutil.load_into(model, {**flat, ("lin", "kernel"): np.zeros((2, 3))}, "w.safetensors")
    with pytest.raises(UserError, match=r"missing key 'LIN/BIAS'"):
        treeutil.load_into(model, {k: v for k, v in flat.items() if k != "lin.bias"}, "w",
                           name=lambda p: "/".join(map(str, p)).upper())
