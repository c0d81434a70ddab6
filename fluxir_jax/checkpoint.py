"""Read converted FLUX checkpoints (written by `fluxir convert`) into ready NNX models.

A converted checkpoint is an Orbax composite directory: items `transformer` and/or `vae`
(PyTree items, OCDBT + zarr3, keys = NNX Param paths with digits as strings), a
`config.json` holding the resolved model configs, and `text/empty.npz`. Both `fluxir convert`
and `fluxir init` (random weights) write it through `fluxir_jax.checkpoint_writer`; a random
one has `"random": {...}` in config.json, and reading it prints a notice on stderr, once per
process and checkpoint.

    flux = load_flux(ckpt)                                   # default device, stored dtype
    flux = load_flux(ckpt, mesh=mesh, sharding=rule)         # restored straight into shardings
    ae = load_autoencoder(ckpt, dtype="float32")
    text = load_text_embeddings(ckpt)    # {"txt": [text_len, 4096], "y": [768], "computed": bool}

`sharding` may be a `jax.sharding.Sharding` for every parameter, or a callable
`(path, shape) -> Sharding | PartitionSpec | None` (a PartitionSpec needs `mesh`; None means
replicated over `mesh`). With a mesh and no rule, parameters are replicated over the mesh.
Each parameter is read by Orbax directly into its target sharding (each host reads only its
shards), never assembled on one host first.

Model-config fields can be overridden at load time (`dtype`, `param_dtype`, `remat_policy`,
...); a stored dtype different from `param_dtype` is cast while reading. Overriding `depth` /
`depth_single_blocks` with smaller values loads only the first blocks (reads only those
layers), which `fluxir compare --layers N` uses.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import sys
from typing import Any, Callable, Union

import numpy as np

from fluxir_jax.errors import UserError

ShardingRule = Union[None, Any, Callable[[tuple, tuple], Any]]

# config.json's "format" and "format_version": written by `fluxir convert`, checked on every read.
CHECKPOINT_FORMAT = "fluxir-checkpoint"
CHECKPOINT_VERSION = 1


_RANDOM_NOTICED: set[str] = set()


def is_random(config: dict) -> bool:
    """Whether a checkpoint's config.json describes random weights (`fluxir init`)."""
    return bool((config.get("random") or {}).get("weights"))


def _notice_random(directory, config: dict) -> None:
    key = str(pathlib.Path(directory).resolve())
    if not is_random(config) or key in _RANDOM_NOTICED:
        return
    _RANDOM_NOTICED.add(key)
    how = config["random"].get("command", "fluxir init")
    print(f"fluxir: note: {directory} holds RANDOM weights and text embeddings ({how}); "
          "its outputs are noise, not images", file=sys.stderr)


def read_config(directory: str | os.PathLike) -> dict:
    """The checkpoint's config.json (UserError if `directory` is not a converted checkpoint)."""
    path = pathlib.Path(directory) / "config.json"
    if not path.is_file():
        raise UserError(f"{directory}: not a converted checkpoint (no config.json)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e.msg})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a fluxir checkpoint config (no \"format\": \"{CHECKPOINT_FORMAT}\")")
    version = cfg.get("format_version")
    if version != CHECKPOINT_VERSION:
        raise UserError(f"{path}: checkpoint format version {version!r} is not supported (this fluxir-jax reads "
                        f"version {CHECKPOINT_VERSION}); convert the checkpoint again with this version")
    _notice_random(directory, cfg)
    return cfg


def _config(cls, data: dict | None, item: str, directory, overrides: dict):
    from fluxir_jax.config import from_dict

    if data is None:
        raise UserError(f"{directory}: this checkpoint holds no {item}")
    fields = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise UserError(f"unknown {cls.__name__} field {bad[0]!r}")
    return from_dict(cls, {**data, **overrides})


def _sharding_for(path: tuple, shape: tuple, mesh, sharding: ShardingRule):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    rule = sharding(path, shape) if callable(sharding) and not isinstance(sharding, jax.sharding.Sharding) else sharding
    if rule is None:
        if mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return NamedSharding(mesh, PartitionSpec())
    if isinstance(rule, PartitionSpec):
        if mesh is None:
            raise ValueError("a PartitionSpec sharding rule needs a mesh")
        return NamedSharding(mesh, rule)
    return rule


@contextlib.contextmanager
def quiet_orbax():
    """Silence Orbax's absl warnings that do not apply here (e.g. per-item step metadata)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def restore_params(directory, item: str, model, *, mesh=None, sharding: ShardingRule = None):
    """Restore checkpoint item `item` into the Params of (abstract or concrete) NNX `model`.

    Strict: every model parameter must be stored with the model's shape and every stored
    parameter must belong to the model, except that stacked block parameters may hold more
    layers than the model has (only the first ones are read). Returns a new model
    (`nnx.merge(graphdef, restored_params, rest)`).
    """
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    directory = pathlib.Path(directory).absolute()
    if not (directory / item).is_dir():
        raise UserError(f"{directory}: no {item!r} item in this checkpoint")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat = list(nnx.to_flat_state(params))
    target: dict = {}
    for path, var in flat:
        node = target
        for p in path[:-1]:
            node = node.setdefault(str(p), {})
        node[str(path[-1])] = jax.ShapeDtypeStruct(var.shape, var.dtype,
                                                   sharding=_sharding_for(tuple(path), tuple(var.shape), mesh, sharding))
    with quiet_orbax():
        stored = dict(_flat_items(ocp.PyTreeCheckpointHandler().metadata(directory / item).tree))
    wanted = dict(_flat_items(target))
    for key in sorted(set(stored) - set(wanted)):
        raise UserError(f"{directory}/{item}: unexpected parameter {'/'.join(key)} (checkpoint and model config disagree)")
    truncate = set()
    for key, want in wanted.items():
        if key not in stored:
            raise UserError(f"{directory}/{item}: parameter {'/'.join(key)} is missing (checkpoint and model config disagree)")
        got, need = tuple(stored[key].shape), tuple(want.shape)
        truncated = key[0] in _STACKED and len(got) == len(need) and got[1:] == need[1:] and got[0] >= need[0]
        if got != need and not truncated:
            raise UserError(f"{directory}/{item}: parameter {'/'.join(key)} has shape {list(got)}, "
                            f"the model expects {list(need)}")
        if got != need:
            truncate.add(key)
    restore_args = _unflatten({
        key: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype, strict=key not in truncate)
        for key, s in wanted.items()})
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        with quiet_orbax():
            restored = checkpointer.restore(directory, ocp.args.Composite(
                **{item: ocp.args.PyTreeRestore(item=target, restore_args=restore_args)}))[item]
    finally:
        checkpointer.close()
    for path, var in flat:
        node = restored
        for p in path:
            node = node[str(p)]
        var.set_value(node)
    return nnx.merge(graphdef, params, rest)


_STACKED = ("double_blocks", "single_blocks")


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for key, leaf in flat.items():
        node = tree
        for k in key[:-1]:
            node = node.setdefault(k, {})
        node[key[-1]] = leaf
    return tree


def _flat_items(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat_items(v, prefix + (str(k),))
    else:
        yield prefix, tree


def load_flux(directory, *, mesh=None, sharding: ShardingRule = None, **overrides):
    """The converted transformer as a ready `Flux` (config from config.json, with overrides)."""
    from flax import nnx

    from fluxir_jax.models.flux import Flux, FluxConfig

    cfg = _config(FluxConfig, read_config(directory).get("transformer"), "transformer", directory, overrides)
    abstract = nnx.eval_shape(lambda: Flux(cfg, rngs=nnx.Rngs(0)))
    return restore_params(directory, "transformer", abstract, mesh=mesh, sharding=sharding)


def load_autoencoder(directory, *, mesh=None, sharding: ShardingRule = None, **overrides):
    """The converted VAE as a ready `AutoEncoder` (config from config.json, with overrides)."""
    from flax import nnx

    from fluxir_jax.models.autoencoder import AutoEncoder, AutoEncoderConfig

    cfg = _config(AutoEncoderConfig, read_config(directory).get("vae"), "vae", directory, overrides)
    abstract = nnx.eval_shape(lambda: AutoEncoder(cfg, rngs=nnx.Rngs(0)))
    return restore_params(directory, "vae", abstract, mesh=mesh, sharding=sharding)


def flux_config(directory, **overrides):
    from fluxir_jax.models.flux import FluxConfig

    return _config(FluxConfig, read_config(directory).get("transformer"), "transformer", directory, overrides)


def autoencoder_config(directory, **overrides):
    from fluxir_jax.models.autoencoder import AutoEncoderConfig

    return _config(AutoEncoderConfig, read_config(directory).get("vae"), "vae", directory, overrides)


def load_text_embeddings(directory) -> dict[str, np.ndarray | bool]:
    """{"txt": [text_len, d] (T5), "y": [d] (CLIP pooled), "computed": bool, "random": bool} for the
    empty prompt. computed: encoded by T5/CLIP at conversion; otherwise zeros (converted without
    encoders) or, with random, random values (`fluxir init`)."""
    meta = read_config(directory).get("text", {}).get("empty", {})
    path = pathlib.Path(directory) / meta.get("file", "text/empty.npz")
    if not path.is_file():
        raise UserError(f"{directory}: no text embeddings ({path.name} missing)")
    with np.load(path) as z:
        if "txt" not in z.files or "y" not in z.files:
            raise UserError(f"{path}: expected arrays 'txt' and 'y', found {', '.join(z.files)}")
        return {"txt": z["txt"], "y": z["y"], "computed": bool(z["computed"]),
                "random": bool(z["random"]) if "random" in z.files else False}
