"""The sharded train step: mesh equality, frozen base, optimizer contents, loss decrease, skipped steps."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fluxir_jax import parallel, train, train_config
from fluxir_jax.train_loop import Trainer, _checkpoint_manager, _data_iterator, _restore, _save
from tests.train.helpers import TINY, write_pairs


def _cfg(tmp, **over):
    items = [f"data.train={tmp / 'pairs'}", f"run_dir={tmp / 'run'}", "optim.warmup_steps=0"]
    items += [f"{k}={v}" for k, v in over.items()]
    return train_config.load(str(TINY), items)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    write_pairs(d / "pairs", 8)
    return d


def _batches(cfg, n):
    it = _data_iterator(cfg, parallel.make_mesh(cfg.mesh), 0)
    return [next(it) for _ in range(n)]


def _global(batch, mesh):
    return parallel.put_global({"hq": batch["hq"], "lq_up": batch["lq_up"]}, mesh)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def sharded(tmp):
    """A Trainer on mesh (data=2, fsdp=4) and its initial state (host copies)."""
    cfg = _cfg(tmp, **{"mesh.data": 2, "mesh.fsdp": 4})
    mesh = parallel.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        tr = Trainer(cfg, mesh, log=lambda *a: None)
    return cfg, mesh, tr


def _with_gates(params, seed=7):
    """Host params with random nonzero SE gates (zero gates would leave most gradients at zero)."""
    params = jax.tree.map(np.array, params)
    rng = np.random.default_rng(seed)
    for se in ("se_img", "se_txt"):
        g = params[se]["gamma"]
        params[se]["gamma"] = (0.5 * rng.standard_normal(g.shape)).astype(g.dtype)
    return params


def test_one_step_on_mesh_equals_one_device(tmp, sharded):
    """One step on one device, on mesh (2, 4), and on mesh (2, 4) with the frozen weights replicated."""
    cfg8, mesh8, tr8 = sharded
    batch = _batches(cfg8, 1)[0]
    p_init = _with_gates(jax.device_get(tr8.state.params))
    # Adam's first update is lr * g / (|g| + eps): with eps = 1e-8 an element whose gradient is
    # ~1e-8 turns float32 rounding of g into an O(1) change of its update, on any two devices
    # counts alike. eps = 1e-3 keeps the update a smooth function of the gradient.
    cfg1 = _cfg(tmp, **{"mesh.data": 1, "mesh.fsdp": 1, "optim.eps": 1e-3})
    cfg8 = _cfg(tmp, **{"mesh.data": 2, "mesh.fsdp": 4, "optim.eps": 1e-3})
    cfg8r = _cfg(tmp, **{"mesh.data": 2, "mesh.fsdp": 4, "optim.eps": 1e-3, "model.frozen_sharding": "replicated"})
    cfg8m = _cfg(tmp, **{"mesh.data": 2, "mesh.fsdp": 4, "optim.eps": 1e-3,
                         "model.frozen_replicated": "[^single_blocks/, final_layer/linear]"})
    mesh1 = parallel.make_mesh(cfg1.mesh, jax.devices()[:1])
    results, trainers = [], []
    for cfg, mesh in ((cfg1, mesh1), (cfg8, mesh8), (cfg8r, mesh8), (cfg8m, mesh8)):
        with jax.set_mesh(mesh), jax.default_matmul_precision("highest"):
            tr = Trainer(cfg, mesh, log=lambda *a: None)
            state = jax.tree.map(jnp.copy, tr.state)
            state.params = jax.device_put(p_init, tr.state_sh.params)
            new, metrics = tr.jitted(state, tr.frozen, _global(batch, mesh))
            results.append((jax.device_get(new.params), jax.device_get(metrics)))
            trainers.append(tr)
    (p1, m1), *sharded_results = results
    f1, f0 = _flat(p1), _flat(p_init)
    # the step really moved every adapter leaf (otherwise equality would be trivial)
    assert bool(m1["finite"]) and all(not np.array_equal(f1[k], f0[k]) for k in f1)
    for p8, m8 in sharded_results:
        assert bool(m8["finite"])
        # float32 everywhere; bound 1e-5 relative for the loss and every adapter parameter
        assert abs(float(m1["loss"]) - float(m8["loss"])) <= 1e-5 * abs(float(m1["loss"]))
        f8 = _flat(p8)
        assert f1.keys() == f8.keys()
        for k in f1:
            assert _rel(f8[k], f1[k]) < 1e-5, k
    _, tr8, tr8r, tr8m = trainers
    # the frozen base is sharded over fsdp on the (2, 4) mesh
    kernel = tr8.frozen.base["double_blocks"]["img_attn"]["qkv"]["kernel"]  # [layers, C, 3C]
    assert kernel.sharding.spec[0] is None and kernel.sharding.spec[1] == "fsdp"
    assert kernel.addressable_shards[0].data.shape[1] == kernel.shape[1] // 4
    single = tr8.frozen.base["single_blocks"]["linear1"]["kernel"]
    assert single.sharding.spec[1] == "fsdp"
    # ... and whole on every chip with model.frozen_sharding=replicated, the adapter still over fsdp
    for frozen in (tr8r.frozen.base, tr8r.frozen.vae):
        for leaf in jax.tree.leaves(frozen):
            assert "fsdp" not in jax.tree.leaves(tuple(leaf.sharding.spec)), leaf.shape
            assert leaf.addressable_shards[0].data.shape == leaf.shape
    assert tr8r.state.params["block"]["img_attn"]["qkv"]["kernel"].sharding.spec[0] == "fsdp"
    # ... and with model.frozen_replicated, whole only where a pattern finds the path
    whole = {"/".join(str(k.key) for k in path): "fsdp" not in jax.tree.leaves(tuple(leaf.sharding.spec))
             for path, leaf in jax.tree_util.tree_flatten_with_path(tr8m.frozen.base)[0]}
    assert all(v for k, v in whole.items() if k.startswith("single_blocks/") or "final_layer/linear" in k)
    assert not whole["double_blocks/img_attn/qkv/kernel"] and not whole["final_layer/adaLN_modulation/1/kernel"]
    assert tr8m.frozen.base["single_blocks"]["linear1"]["kernel"].addressable_shards[0].data.shape == \
        tr8m.frozen.base["single_blocks"]["linear1"]["kernel"].shape


def test_unknown_frozen_sharding_is_a_user_error(tmp):
    from fluxir_jax.errors import UserError

    cfg = _cfg(tmp, **{"model.frozen_sharding": "tensor"})
    with pytest.raises(UserError, match="model.frozen_sharding: 'tensor' is not one of fsdp, replicated"):
        Trainer(cfg, parallel.make_mesh(cfg.mesh), log=lambda *a: None)


def test_frozen_weights_load_into_their_shardings(tmp):
    """A converted checkpoint is restored straight into the shardings the step was compiled for, also
    where model.frozen_replicated keeps some weights whole."""
    from fluxir_jax.init_checkpoint import init_checkpoint

    ckpt = tmp / "ckpt"
    if not ckpt.exists():
        init_checkpoint("tiny", ckpt, seed=0, text_len=6, progress=False)
    cfg = _cfg(tmp, **{"base": ckpt, "adapter.text_len": 6, "mesh.data": 2, "mesh.fsdp": 4,
                       "model.frozen_replicated": "[^single_blocks/]"})
    tr = Trainer(cfg, parallel.make_mesh(cfg.mesh), log=lambda *a: None)
    for frozen, want in ((tr.frozen.base, tr.models.base_sh), (tr.frozen.vae, tr.models.vae_sh)):
        got = jax.tree.map(lambda a: a.sharding, frozen)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert g.is_equivalent_to(w, 3) and g.spec == w.spec
    specs = {leaf.sharding.spec for leaf in jax.tree.leaves(tr.frozen.base["double_blocks"])}
    assert any("fsdp" in jax.tree.leaves(tuple(s)) for s in specs)
    assert all("fsdp" not in jax.tree.leaves(tuple(leaf.sharding.spec))
               for leaf in jax.tree.leaves(tr.frozen.base["single_blocks"]))


@pytest.mark.parametrize("patterns, match", [
    ("[single_block/]", "'single_block/' matches no parameter of the base"),
    ("['(']", "'\\(' is not a regex"),
])
def test_bad_frozen_replicated_is_a_user_error(tmp, patterns, match):
    from fluxir_jax.errors import UserError

    cfg = _cfg(tmp, **{"model.frozen_replicated": patterns})
    with pytest.raises(UserError, match="model.frozen_replicated: " + match):
        Trainer(cfg, parallel.make_mesh(cfg.mesh), abstract=True, log=lambda *a: None)


@pytest.mark.slow
def test_only_adapter_trains_and_loss_falls(tmp, sharded):
    cfg, mesh, tr = sharded
    base_before = _flat(jax.device_get(tr.frozen.base))
    vae_before = _flat(jax.device_get(tr.frozen.vae))
    eval_batch = _global(_batches(cfg, 1)[0], mesh)

    @jax.jit
    def eval_loss(params):  # fixed t, noise and crops: a deterministic measure of the fit
        m = tr.models
        key = jax.random.key(123)
        t, noise, off = train.draw_inputs(key, cfg.batch_size, (cfg.crop_size // 8,) * 2, 16, cfg.loss)
        t = jnp.linspace(0.1, 0.9, cfg.batch_size)
        base = train.merge_pure(m.base_graphdef, m.base_abstract, tr.frozen.base)
        vae = train.merge_pure(m.vae_graphdef, m.vae_abstract, tr.frozen.vae)
        adapter = train.merge_pure(m.adapter_graphdef, m.adapter_abstract, params)
        loss, _ = train.fluxir_loss(base, adapter, vae, eval_batch["hq"], eval_batch["lq_up"], tr.frozen.txt,
                                    tr.frozen.y, t, noise, off, pixel_crop=cfg.loss.pixel_crop,
                                    guidance=cfg.loss.guidance)
        return loss

    with jax.set_mesh(mesh):
        state = jax.tree.map(jnp.copy, tr.state)
        p0 = _flat(jax.device_get(state.params))
        before = float(eval_loss(state.params))
        it = _data_iterator(cfg, parallel.make_mesh(cfg.mesh), 0)
        losses = []
        for _ in range(50):
            state, metrics = tr.jitted(state, tr.frozen, _global(next(it), mesh))
            losses.append(float(metrics["loss"]))
        after = float(eval_loss(state.params))
    assert np.all(np.isfinite(losses))
    assert after < 0.9 * before, (before, after)
    assert np.mean(losses[-10:]) < np.mean(losses[:10]), losses
    # the frozen base and VAE are bit-identical after training
    for k, v in _flat(jax.device_get(tr.frozen.base)).items():
        assert np.array_equal(v, base_before[k]), k
    for k, v in _flat(jax.device_get(tr.frozen.vae)).items():
        assert np.array_equal(v, vae_before[k]), k
    # adapter leaves changed; the optimizer holds moments for adapter leaves only
    p1 = _flat(jax.device_get(state.params))
    assert sum(not np.array_equal(p1[k], p0[k]) for k in p0) > len(p0) // 2
    n_adapter = sum(v.size for v in p0.values())
    n_opt = sum(np.size(x) for x in jax.tree.leaves(state.opt_state))
    assert n_adapter * 2 <= n_opt <= n_adapter * 2 + 16
    n_base = sum(v.size for v in base_before.values())
    assert n_base > 0
    mu = state.opt_state[1][0].mu
    assert set(mu) == set(state.params) == {"lq_in", "block", "theta_p", "theta_y", "se_img", "se_txt"}


def test_non_finite_batch_is_skipped_and_never_checkpointed(tmp, sharded):
    cfg, mesh, tr = sharded
    batches = _batches(cfg, 2)
    bad = dict(batches[0])
    bad["hq"] = bad["hq"].copy()
    bad["hq"][0, 0, 0, 0] = np.nan
    run = tmp / "nan_run"
    with jax.set_mesh(mesh):
        state = jax.tree.map(jnp.copy, tr.state)
        before = _flat(jax.device_get(state.params))
        opt_before = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.opt_state))]
        state, m = tr.jitted(state, tr.frozen, _global(bad, mesh))
        assert not bool(m["finite"])
        assert int(state.skipped) == 1 and int(state.bad_run) == 1 and int(state.step) == 1
        after = _flat(jax.device_get(state.params))
        assert all(np.array_equal(after[k], before[k]) for k in before)
        assert all(np.array_equal(a, b) for a, b in
                   zip(jax.tree.leaves(jax.device_get(state.opt_state)), opt_before))
        # a checkpoint written now holds only finite, unchanged values
        mgr = _checkpoint_manager(run, cfg)
        _save(mgr, 1, state)
        mgr.wait_until_finished()
        step, restored = _restore(mgr, tr)
        mgr.close()
        assert step == 1
        got = _flat(jax.device_get(restored.params))
        assert all(np.array_equal(got[k], before[k]) and np.all(np.isfinite(got[k])) for k in before)
        state, m = tr.jitted(state, tr.frozen, _global(batches[1], mesh))
        assert bool(m["finite"]) and int(state.bad_run) == 0 and int(state.skipped) == 1


def _random_lpips_weights(path):
    """LPIPS-alex weights in the `fluxir convert-iqa` format with every weight random (heads >= 0)."""
    from flax import nnx

    from fluxir_jax.iqa import lpips, weights

    _, state = nnx.split(lpips.LPIPS("alex", rngs=nnx.Rngs(3)))
    flat = weights.flat_params(nnx.to_pure_dict(state))
    rng = np.random.default_rng(3)
    flat = {k: (np.abs(rng.normal(0, 0.1, v.shape)) if k.startswith("lin") else rng.normal(0, 0.05, v.shape)
                if k.endswith("bias") else np.asarray(v)).astype(np.float32) for k, v in flat.items()}
    weights.save_converted(path, "lpips", {"net": "alex"}, flat)
    return path


def test_validation_metrics_follow_the_config(tmp):
    from fluxir_jax.train_val import metrics, scores

    cfg = _cfg(tmp)
    assert set(metrics(cfg.val)) == {"val_psnr", "val_ssim"}  # no LPIPS weights: no LPIPS
    lpips_file = _random_lpips_weights(tmp / "lpips_alex_unit.safetensors")
    m = metrics(dataclasses.replace(cfg.val, lpips_weights=str(lpips_file)))
    assert set(m) == {"val_psnr", "val_ssim", "val_lpips"}
    rng = np.random.default_rng(0)
    a, b = rng.random((2, 64, 64, 3), np.float32), rng.random((2, 64, 64, 3), np.float32)
    rec = scores(m, a, b)
    assert rec["val_lpips"] > 1e-3 and abs(scores(m, a, a)["val_lpips"]) < 1e-6
    assert rec["val_psnr"] == float(np.mean(m["val_psnr"](a, b)))


@pytest.mark.slow
def test_validation_writes_a_sample_grid_and_scores(tmp, sharded):
    from PIL import Image

    from fluxir_jax.train_val import Validator

    from fluxir_jax.iqa.registry import get_metric

    cfg, mesh, tr = sharded
    lpips_file = _random_lpips_weights(tmp / "lpips_alex.safetensors")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val=str(tmp / "pairs"), val_count=2),
                              val=dataclasses.replace(cfg.val, steps=2, lpips_weights=str(lpips_file)))
    with jax.set_mesh(mesh):
        v = Validator(cfg, tr, tmp / "val_run")
        rec = v.run(tr.state.params, 7)
        restored = v.images(tr.state.params)
    assert set(rec) == {"val_psnr", "val_ssim", "val_lpips"}
    assert np.isfinite(rec["val_psnr"]) and -1 <= rec["val_ssim"] <= 1
    # LPIPS of the restored images against the HQ crops with the given weights (heads >= 0: a distance > 0)
    want = float(np.mean(get_metric("lpips", weights=lpips_file)(restored, v.hq)))
    assert want > 0 and abs(rec["val_lpips"] - want) <= 1e-6 * want
    assert abs(float(np.mean(get_metric("psnr")(restored, v.hq))) - rec["val_psnr"]) <= 1e-9 * rec["val_psnr"]
    grid = np.asarray(Image.open(tmp / "val_run" / "samples" / "step_000007.png"))
    c = cfg.crop_size
    assert grid.shape == (2 * c, 3 * c, 3)
    # rows are LQ (upsampled) | restored | HQ: the HQ column is the val crop itself
    np.testing.assert_allclose(grid[:c, 2 * c:] / 255.0, v.hq[0], atol=1 / 255 + 1e-6)
