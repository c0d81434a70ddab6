"""parallel.py: mesh sizes, the rules table, and shardings of real model states."""
import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from fluxir_jax import parallel
from fluxir_jax.errors import UserError
from fluxir_jax.models import presets
from fluxir_jax.models.adapter import FluxIR, FluxIRConfig
from fluxir_jax.models.flux import Flux


def test_mesh_sizes_fill_and_errors():
    assert parallel.resolve_sizes(parallel.MeshConfig(data=2, fsdp=-1), 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert parallel.resolve_sizes(parallel.MeshConfig(data=1, fsdp=4, tensor=2), 8) == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(UserError, match="mesh"):
        parallel.resolve_sizes(parallel.MeshConfig(data=3, fsdp=1), 8)
    with pytest.raises(UserError, match="mesh.fsdp=-1"):
        parallel.resolve_sizes(parallel.MeshConfig(data=-1, fsdp=-1), 8)
    with pytest.raises(UserError, match="dcn_data"):
        parallel.resolve_sizes(parallel.MeshConfig(dcn_data=3), 8)
    mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=4))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1} and parallel.batch_divisor(mesh) == 8


def test_rules_shard_weight_dims_never_the_layer_axis():
    mesh = parallel.make_mesh(parallel.MeshConfig(data=1, fsdp=4, tensor=2))
    base_cfg = presets.get("tiny")
    for make in (lambda: Flux(base_cfg, rngs=nnx.Rngs(0)),
                 lambda: FluxIR(FluxIRConfig(text_len=8, se_reduction=8), base_cfg, rngs=nnx.Rngs(0))):
        _, state = nnx.split(nnx.eval_shape(make))
        sh = parallel.state_shardings(state, mesh)
        specs = {parallel.path_str(p): s.spec for p, s in nnx.to_flat_state(sh)}
        shapes = {parallel.path_str(p): v.shape for p, v in nnx.to_flat_state(state)}
        for name, spec in specs.items():
            if name.startswith(("double_blocks", "single_blocks", "se_")):
                assert spec[0] is None, name  # the scanned / stacked axis stays whole
            for dim, ax in zip(shapes[name], spec):
                if ax is not None:
                    assert dim % mesh.shape[ax] == 0, (name, dim, ax)
        if "img_in/kernel" in specs:
            assert specs["double_blocks/img_mlp/0/kernel"] == P(None, "fsdp", "tensor")
            assert specs["double_blocks/img_mlp/2/kernel"] == P(None, "tensor", "fsdp")
            assert specs["img_in/kernel"] == P("fsdp", "tensor")
            assert specs["double_blocks/img_attn/norm/query_norm/scale"] == P(None, None)
        else:
            assert specs["theta_p"] == P(None, "fsdp")
            assert specs["se_img/down/kernel"] == P(None, "fsdp", "tensor")
            assert specs["block/img_attn/qkv/kernel"] == P("fsdp", "tensor")


def test_mesh_axis_dropped_where_it_does_not_divide():
    mesh = parallel.make_mesh(parallel.MeshConfig(data=1, fsdp=8))
    assert parallel.spec_for((12, 64), ("embed", "mlp"), mesh) == P(None, None)
    assert parallel.spec_for((16, 64), ("embed", "mlp"), mesh) == P("fsdp", None)
    assert parallel.spec_for((16,), ("batch",), mesh) == P("fsdp")
    assert jax.device_count() == 8
