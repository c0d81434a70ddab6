"""Parallel modes of the inference engine give the same restorations (float32, <= 1e-5 relative)."""
import numpy as np
import pytest

from fluxir_jax import infer
from fluxir_jax.errors import UserError
from fluxir_jax.restore import Restorer
from tests.restore import fixtures


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.slow  # three engines, two compilations (~40 s on the shared 2-core machine)
def test_pmap_sharded_and_one_device_agree_on_an_uneven_batch(tiny_models):
    ckpt, adapter = tiny_models
    lq = [fixtures.textured_image(16, 16, seed=i) for i in range(3)]  # 3 images over 8 devices: padded
    lq_f = [x.astype(np.float32) / 255 for x in lq]
    seeds = [11, 12, 13]
    results = {}
    for name, opts in {"pmap": dict(parallel="pmap"), "sharded": dict(parallel="sharded"),
                       "one": dict(parallel="pmap", devices=1)}.items():
        r = Restorer(ckpt, adapter, steps=2, **opts)
        assert r.engine.mode == opts["parallel"]
        qkv = r.engine.params["base"]["double_blocks"]["img_attn"]["qkv"]["kernel"][...]
        if name == "sharded":  # read straight into FSDP shards: each device holds 1/8 of the weight
            assert "fsdp" in qkv.sharding.spec and qkv.addressable_shards[0].data.size * 8 == qkv.size
        else:  # one full replica per device
            assert len(qkv.addressable_shards) == len(r.engine.devices) and qkv.addressable_shards[0].data.shape[1:] == qkv.shape[1:]
        results[name] = r.restore_float(lq_f, seeds)
    assert results["pmap"][0].shape == (64, 64, 3)
    for name in ("sharded", "one"):
        for a, b in zip(results[name], results["pmap"]):
            assert rel(a, b) <= 1e-5, name
    # sharded gathers each layer's weights before using them (models/weight_gather.py), so every device
    # runs pmap's per-image arithmetic: the same bytes, not merely within the bound
    for a, b in zip(results["sharded"], results["pmap"]):
        np.testing.assert_array_equal(a, b)
    # per-image seeds: a different seed gives a different image, the same seed the same one
    assert rel(results["pmap"][0], results["pmap"][1]) > 0.01
