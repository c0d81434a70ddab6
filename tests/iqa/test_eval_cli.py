"""`fluxir eval` end to end on small folders, and the metric registry's plug-in points."""
import argparse
import csv
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from skimage import data

from fluxir_convert.iqa import convert_iqa
from fluxir_jax.errors import UserError
from fluxir_jax.iqa import eval_cli, niqe, registry
from fluxir_jax.iqa.registry import get_metric
from tests.iqa.test_lpips_dists import TorchLPIPS

PARAMS = niqe.PACKAGE_DEFAULT          # shipped in the package (BasicSR's niqe_pris_params.npz)
SIZE = 200


def run_cli(argv, capsys):
    """What `fluxir eval ...` does: the subcommand's parser, UserError -> one line and exit 2."""
    parser = argparse.ArgumentParser(prog="fluxir")
    sub = parser.add_subparsers(dest="command")
    eval_cli.register(sub)
    args = parser.parse_args(["eval"] + [str(a) for a in argv])
    try:
        rc = args.func(args)
    except UserError as e:
        print(f"fluxir eval: error: {e}", file=sys.stderr)
        rc = e.exit_code
    out = capsys.readouterr()
    return rc, out.out, out.err


def _save(path, arr01):
    Image.fromarray(np.round(np.clip(arr01, 0, 1) * 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    gt, pred = root / "gt", root / "pred"
    gt.mkdir()
    pred.mkdir()
    rng = np.random.default_rng(11)
    sources = {"a": data.astronaut()[100:100 + SIZE, 100:100 + SIZE],
               "b": data.coffee()[100:100 + SIZE, 200:200 + SIZE],
               "c": data.chelsea()[50:50 + SIZE, 150:150 + SIZE]}
    for i, (name, img) in enumerate(sources.items()):
        x = img.astype(np.float64) / 255.0
        _save(gt / f"{name}.png", x)
        y = ndimage.gaussian_filter(x, (0.7 + i, 0.7 + i, 0)) + rng.normal(0, 0.02, x.shape)
        _save(pred / (f"{name}.png" if name != "c" else "c.bmp"), y)       # c pairs by stem
    (pred / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")   # unreadable, has a reference
    _save(gt / "broken.png", np.zeros((SIZE, SIZE, 3)))
    _save(pred / "extra.png", np.zeros((SIZE, SIZE, 3)))                  # no reference
    torch.manual_seed(1)
    ref = TorchLPIPS("alex").eval()
    torch.save(ref.heads_state_dict(), root / "alex.pth")
    torch.save(ref.backbone_state_dict(), root / "alexnet.pth")
    convert_iqa("lpips", [root / "alex.pth", root / "alexnet.pth"], root / "lpips_alex.safetensors")
    vgg_heads = TorchLPIPS("vgg").heads_state_dict()
    torch.save(vgg_heads, root / "vgg.pth")
    return root


def _load(folder, names):
    return np.stack([np.asarray(Image.open(folder / n).convert("RGB"), np.float64) / 255.0 for n in names])


def test_full_reference_folders(folders, capsys):
    root = folders
    out_csv, out_json = root / "scores.csv", root / "scores.json"
    common = ["--pred", root / "pred", "--gt", root / "gt", "--metrics", "psnr,ssim,lpips,dists,niqe",
              "--crop-border", "4", "--weights", f"lpips={root / 'lpips_alex.safetensors'}",
              "--weights", f"niqe={PARAMS}"]
    rc, out, err = run_cli(common + ["--out", out_csv], capsys)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["metric", "mean", "std", "n", "better"]
    rows = {ln.split()[0]: ln.split() for ln in lines[1:6]}
    assert rows["psnr"][-1] == "higher" and rows["lpips"][-1] == "lower" and rows["niqe"][-1] == "lower"
    assert rows["dists"][1] == "unavailable" and "needs weights" in out
    assert "broken.png: cannot read image" in out and "extra.png: no reference image" in out

    with open(out_csv, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["image"] for r in table] == ["a.png", "b.png", "c.bmp"]
    assert table[2]["reference"] == "c.png"
    assert "dists" not in table[0]

    # per-image numbers are what the registry gives for the same arrays
    pred = _load(root / "pred", ["a.png", "b.png", "c.bmp"])
    gt = _load(root / "gt", ["a.png", "b.png", "c.png"])
    expect = {
        "psnr": get_metric("psnr", crop_border=4)(pred, gt),
        "ssim": get_metric("ssim", crop_border=4)(pred, gt),
        "lpips": get_metric("lpips", weights=root / "lpips_alex.safetensors")(pred, gt),
        "niqe": get_metric("niqe", weights=PARAMS, crop_border=4)(pred),
    }
    for name, want in expect.items():
        got = np.array([float(r[name]) for r in table])
        np.testing.assert_allclose(got, want, rtol=1e-8, err_msg=name)
        assert float(rows[name][1]) == pytest.approx(np.mean(want), abs=1e-4)
        assert float(rows[name][2]) == pytest.approx(np.std(want), abs=1e-4)
    # the pairing is right: matched pairs score > 20 dB, a shuffled pairing far lower
    assert np.all(expect["psnr"] > 20) and np.all(get_metric("psnr")(pred, gt[[1, 2, 0]]) < 16)

    rc, out, err = run_cli(common + ["--out", out_json], capsys)
    assert rc == 0, err
    res = json.loads(out_json.read_text())
    assert res["summary"]["psnr"]["mean"] == pytest.approx(np.mean(expect["psnr"]))
    assert res["summary"]["lpips"]["lower_better"] is True
    assert set(res["unavailable"]) == {"dists"}
    assert {s["file"].split("/")[-1] for s in res["skipped"]} == {"broken.png", "extra.png"}
    assert [r["image"] for r in res["per_image"]] == ["a.png", "b.png", "c.bmp"]


def test_no_reference_without_gt(folders, capsys):
    root = folders
    out_json = root / "nr.json"
    rc, out, err = run_cli(["--pred", root / "pred", "--metrics", "niqe,psnr", "--weights", f"niqe={PARAMS}",
                            "--out", out_json], capsys)
    assert rc == 0, err
    res = json.loads(out_json.read_text())
    assert res["unavailable"] == {"psnr": "full-reference metric: needs --gt"}
    assert [r["image"] for r in res["per_image"]] == ["a.png", "b.png", "c.bmp", "extra.png"]
    flat = [r["niqe"] for r in res["per_image"] if r["image"] == "extra.png"][0]
    assert flat is None or np.isfinite(flat)       # a flat image: NaN features are tolerated
    assert res["summary"]["niqe"]["n"] >= 3
    assert [s["file"].split("/")[-1] for s in res["skipped"]] == ["broken.png"]
    assert res["skipped"][0]["reason"].startswith("cannot read image")


def test_user_mistakes_exit_2(folders, tmp_path, capsys):
    root = folders
    small = tmp_path / "small"
    small.mkdir()
    _save(small / "a.png", np.zeros((SIZE, SIZE - 8, 3)))
    rc, _, err = run_cli(["--pred", small, "--gt", root / "gt", "--metrics", "psnr"], capsys)
    assert rc == 2 and "size mismatch" in err and "a.png" in err and str(root / "gt" / "a.png") in err
    assert len(err.strip().splitlines()) == 1

    rc, _, err = run_cli(["--pred", root / "pred", "--gt", root / "gt", "--metrics", "lpips",
                          "--weights", f"lpips={root / 'vgg.pth'}", "--weights", f"lpips={root / 'alexnet.pth'}"],
                         capsys)
    assert rc == 2 and "fluxir convert-iqa lpips alex.pth alexnet-owt-7be5be79.pth -o" in err
    assert len(err.strip().splitlines()) == 1
    vgg_heads = tmp_path / "vgg_heads.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in torch.load(root / "vgg.pth").items()}, str(vgg_heads))
    alexnet = tmp_path / "alexnet.safetensors"
    save_file({k: v.contiguous() for k, v in torch.load(root / "alexnet.pth").items()}, str(alexnet))
    rc, _, err = run_cli(["--pred", root / "pred", "--gt", root / "gt", "--metrics", "lpips",
                          "--weights", f"lpips={vgg_heads}", "--weights", f"lpips={alexnet}"], capsys)
    assert rc == 2 and "first bad key 'lin1.model.1.weight'" in err

    rc, _, err = run_cli(["--pred", root / "pred", "--metrics", "psnr,nosuch"], capsys)
    assert rc == 2 and "unknown metric 'nosuch'" in err
    rc, _, err = run_cli(["--pred", root / "pred", "--metrics", "psnr", "--gt", root / "gt", "--out", tmp_path / "x.txt"],
                         capsys)
    assert rc == 2 and ".csv or .json" in err
    rc, _, err = run_cli(["--pred", tmp_path / "absent", "--metrics", "niqe", "--weights", f"niqe={PARAMS}"], capsys)
    assert rc == 2 and "folder not found" in err
    rc, _, err = run_cli(["--pred", root / "pred", "--metrics", "lpips"], capsys)
    assert rc == 2 and "none of the requested metrics can run" in err
    rc, _, err = run_cli(["--pred", root / "pred", "--metrics", "niqe", "--weights", f"lpips={root / 'alex.pth'}"],
                         capsys)
    assert rc == 2 and "not among --metrics" in err


def test_optional_modules_register_lazily(tmp_path, monkeypatch, folders, capsys):
    """Metric modules listed in OPTIONAL_MODULES are imported on first use if they exist, register
    through register_metric, and then work in `fluxir eval`; a module that fails to import is named."""
    import fluxir_jax.iqa as iqa_pkg

    (tmp_path / "fakeiqa.py").write_text(
        "import numpy as np\n"
        "from fluxir_jax.iqa.registry import register_metric\n"
        "def _factory(weights, *, gain: float = 1.0):\n"
        "    return lambda pred: gain * np.asarray(pred).mean(axis=(1, 2, 3))\n"
        "register_metric('fake-brightness', _factory, kind='nr', needs_weights=False, description='test')\n")
    (tmp_path / "brokeniqa.py").write_text("raise ImportError('needs a package that is not installed')\n")
    monkeypatch.setattr(iqa_pkg, "__path__", list(iqa_pkg.__path__) + [str(tmp_path)])
    monkeypatch.setattr(registry, "OPTIONAL_MODULES", ["fakeiqa", "absentiqa", "brokeniqa"])
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_IMPORT_ERRORS", {})
    monkeypatch.setattr(registry, "_loaded_optional", False)
    try:
        assert "fake-brightness" in registry.list_metrics()
        m = get_metric("fake-brightness", gain=2.0)
        assert m.kind == "nr" and not m.lower_better
        np.testing.assert_allclose(m(np.full((2, 8, 8, 3), 0.25)), [0.5, 0.5])
        with pytest.raises(UserError, match="brokeniqa failed to import"):
            get_metric("nosuchmetric")
        rc, out, err = run_cli(["--pred", folders / "pred", "--metrics", "fake-brightness"], capsys)
        assert rc == 0 and out.splitlines()[1].split()[0] == "fake-brightness"
        with pytest.raises(ValueError, match="already registered"):
            registry.register_metric("psnr", lambda w: None, kind="fr", needs_weights=False)
    finally:
        sys.modules.pop("fluxir_jax.iqa.fakeiqa", None)
        sys.modules.pop("fluxir_jax.iqa.brokeniqa", None)
