"""`fluxir compare`: exit 0 on a good conversion, 1 when one converted tensor is perturbed.

Tolerance: the default 1e-4 relative error per row (float32 on both sides); the perturbation
(1% relative noise on one layer of one tensor) is far above it.
"""
from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

from tests.convert.test_convert import build_pipeline, run_cli, write_bfl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    dm, vae = build_pipeline(root / "pipe", seed=5)
    ckpt = root / "ckpt"
    rc, _, err = run_cli(["convert", str(root / "pipe"), "-o", str(ckpt), "--no-progress"])
    assert rc == 0, err
    return dict(root=root, dm=dm, vae=vae, ckpt=ckpt)


def _rows(stdout: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w[\w ]*?\w)\s+([0-9.e+-]+)(?:  > tol)?$", stdout, re.M)}


def test_compare_good_conversion(setup):
    rc, out, err = run_cli(["compare", str(setup["root"] / "pipe"), str(setup["ckpt"])])
    assert rc == 0, out + err
    rows = _rows(out)
    expected = ([f"double {i} {s}" for i in range(2) for s in ("img", "txt")]
                + [f"single {i} {s}" for i in range(3) for s in ("img", "txt")]
                + ["final output", "vae encode", "vae decode"])
    assert sorted(rows) == sorted(expected), out
    assert max(rows.values()) < 1e-4


def test_compare_bfl_source_first_layers(setup, tmp_path):
    """BFL files go through our inverse map to the diffusers reference; --layers 1 truncates both sides."""
    flux, ae = write_bfl(tmp_path / "bfl", setup["dm"], setup["vae"])
    rc, out, err = run_cli(["compare", str(flux), str(ae), str(setup["ckpt"]), "--layers", "1", "--axes-dim", "4,6,6"])
    assert rc == 0, out + err
    rows = _rows(out)
    assert {"double 0 img", "single 0 txt", "final output", "vae decode"} <= set(rows)
    assert not any(k.startswith(("double 1", "single 1")) for k in rows), out


def test_compare_flags_a_perturbed_tensor(setup, tmp_path):
    import orbax.checkpoint as ocp

    bad = tmp_path / "bad"
    shutil.copytree(setup["ckpt"], bad)
    tree = ocp.PyTreeCheckpointer().restore(bad / "transformer")
    kernel = np.array(tree["double_blocks"]["img_attn"]["proj"]["kernel"])
    noise = np.random.default_rng(0).standard_normal(kernel.shape[1:]).astype(kernel.dtype)
    kernel[1] += 0.01 * np.linalg.norm(kernel[1]) / np.linalg.norm(noise) * noise
    tree["double_blocks"]["img_attn"]["proj"]["kernel"] = kernel
    shutil.rmtree(bad / "transformer")
    ocp.PyTreeCheckpointer().save(bad / "transformer", tree)  # plain Orbax rewrite of the item

    rc, out, err = run_cli(["compare", str(setup["root"] / "pipe" / "transformer"), str(bad)])
    assert rc == 1, out + err
    rows = _rows(out)
    assert rows["double 0 img"] < 1e-4 and rows["double 1 img"] > 1e-4 and rows["final output"] > 1e-4
    assert "FAILED" in out and "vae encode" not in rows


def _adapter_for(ckpt, directory, **base_overrides):
    """A random FluxIR adapter (every parameter random, SE gates non-zero) saved as an Orbax folder."""
    from flax import nnx

    from fluxir_jax import checkpoint
    from fluxir_jax.models import adapter_io
    from fluxir_jax.models.adapter import FluxIR, FluxIRConfig
    from tests.restore.fixtures import _random_state

    base_cfg = checkpoint.flux_config(ckpt, **base_overrides)
    text_len = int(checkpoint.load_text_embeddings(ckpt)["t5"].shape[0])
    abstract = nnx.eval_shape(lambda: FluxIR(FluxIRConfig(text_len=text_len), base_cfg, rngs=nnx.Rngs(0)))
    adapter = _random_state(abstract, 3)
    assert float(np.abs(np.asarray(adapter.se_img.gamma[...])).min()) > 0
    adapter_io.save_adapter(adapter, directory)
    return directory


@pytest.mark.slow  # builds both references and compiles a restoration
def test_compare_adapter_rows_within_tolerance(setup, tmp_path):
    adapter = _adapter_for(setup["ckpt"], tmp_path / "adapter")
    rc, out, err = run_cli(["compare", str(setup["root"] / "pipe"), str(setup["ckpt"]), "--adapter", str(adapter),
                            "--adapter-steps", "2"])
    assert rc == 0, out + err
    rows = _rows(out)
    assert rows["adapter step velocity"] <= 1e-4
    restoration = re.search(r"^adapter restoration \(2 steps\)\s+([0-9.e+-]+)$", out, re.M)
    assert restoration and float(restoration.group(1)) <= 1e-3, out
    assert any(k.startswith("adapter step single") for k in rows) and "final output" in rows
    assert "restoration 0.001" in out


def test_compare_adapter_for_another_base_or_partial_sources_exit_2(setup, tmp_path):
    other = _adapter_for(setup["ckpt"], tmp_path / "other", depth=3)
    rc, out, err = run_cli(["compare", str(setup["root"] / "pipe"), str(setup["ckpt"]), "--adapter", str(other)])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "depth" in err, err
    rc, out, err = run_cli(["compare", str(setup["root"] / "pipe" / "transformer"), str(setup["ckpt"]),
                            "--adapter", str(other)])
    assert rc == 2 and "VAE" in err, err
