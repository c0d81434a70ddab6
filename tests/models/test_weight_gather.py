"""Sharded inference gathers each weight whole before use (models/weight_gather.py): pmap's bytes,
arguments still sharded, the scanned stacks all-gathered one layer at a time."""
import jax
import numpy as np
from flax import nnx

from fluxir_jax.infer import Engine, MeshShape
from fluxir_jax.models import presets
from fluxir_jax.models.adapter import FluxIR, FluxIRConfig, fluxir_forward
from fluxir_jax.models.flux import Flux
from fluxir_jax.models.weight_gather import SCANNED, gathering
from tests.models.tiny_flux import all_gather_shapes

B, L, T = 8, 16, 8


def _setup():
    cfg = presets.get("tiny", depth=2, depth_single_blocks=3)  # stacks of 2 and 3: a whole stack is not one layer
    base = Flux(cfg, rngs=nnx.Rngs(0))
    adapter = FluxIR(FluxIRConfig(text_len=T, se_reduction=8), cfg, rngs=nnx.Rngs(1))
    for path, v in nnx.to_flat_state(nnx.state(adapter, nnx.Param)):  # zero-initialised parts: random
        v.set_value(jax.random.normal(jax.random.key(len(path)), v.shape, v.dtype) * 0.1)
    graphdefs, params = {}, {}
    for name, m in (("base", base), ("adapter", adapter)):
        graphdefs[name], params[name] = nnx.split(m)

    def program(params, batch):
        b, a = nnx.merge(graphdefs["base"], params["base"]), nnx.merge(graphdefs["adapter"], params["adapter"])
        n = batch["img"].shape[0]
        img_ids = np.broadcast_to(np.arange(L * 3, dtype=np.float32).reshape(L, 3) % 5, (n, L, 3))
        return fluxir_forward(b, a, batch["img"], batch["lq"], img_ids, batch["txt"], np.zeros((n, T, 3), np.float32),
                              batch["t"], batch["y"], batch["t"] * 4.0)

    rng = np.random.default_rng(0)
    batch = {"img": rng.normal(size=(B, L, 64)), "lq": rng.normal(size=(B, L, 64)), "txt": rng.normal(size=(B, T, 32)),
             "t": rng.uniform(size=(B,)), "y": rng.normal(size=(B, 32))}
    return params, program, {k: v.astype(np.float32) for k, v in batch.items()}


def _compiled(engine, program, batch):
    """The engine's compiled sharded program for `batch`'s shapes."""
    sds = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
    params = jax.tree.map(lambda v, s: v.replace(sds(v, s)), engine.params, engine._param_shardings,
                          is_leaf=lambda x: isinstance(x, nnx.Variable))
    with gathering(engine._mesh if engine.gather_weights else None):
        return engine._program(program).lower(params, jax.tree.map(lambda x: sds(x, engine._batch_sharding), batch)).compile()


def test_sharded_gathers_one_layer_at_a_time_keeps_arguments_sharded_and_equals_pmap_bitwise():
    params, program, batch = _setup()
    ref = Engine(params, parallel="pmap").run(program, batch)
    engine = Engine(params, parallel="sharded", mesh=MeshShape(fsdp=4, tensor=2))  # weights split over both axes
    assert engine.gather_weights  # the default
    batch = {k: v[:engine.global_batch] for k, v in batch.items()}  # one row per (data, fsdp) shard, as pmap's
    compiled = _compiled(engine, program, batch)
    with gathering(engine._mesh):
        out = compiled(engine.params, jax.device_put(batch, engine._batch_sharding))
    assert np.array_equal(np.asarray(out), ref[:engine.global_batch])  # contractions whole on each device, as pmap
    # the stored parameters stay sharded: the arguments are the per-device shards (and batch rows)
    shard_bytes = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(engine.params))
    assert compiled.memory_analysis().argument_size_in_bytes == shard_bytes + sum(x.nbytes for x in batch.values()) // engine.global_batch
    assert shard_bytes < engine.replica_bytes / 4
    # the scanned stacks are all-gathered one layer at a time inside the scan, never whole
    stacks = {tuple(v.shape) for p, v in nnx.to_flat_state(engine.params["base"])
              if str(p[0]) in SCANNED and v.shape[0] > 1 and not v[...].sharding.is_fully_replicated}
    assert len(stacks) >= 8
    shapes = all_gather_shapes(compiled.as_text())
    assert {(1, *s[1:]) for s in stacks} <= shapes and not stacks & shapes, shapes
