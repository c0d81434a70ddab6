"""FluxIR adapter weights on disk: Orbax checkpoints (ours) and safetensors export (for everyone).

Orbax adapter checkpoint: a directory with `adapter.json` (the FluxIRConfig and the base
FluxConfig it was built for) and `params/` (Orbax, the adapter's NNX params).

Safetensors export, stable key names in PyTorch layout (Linear weights [out, in]):

    lq_in.{weight,bias}                      M_i: packed LQ latent (64) -> hidden
    block.<BFL double-block key>             the control block, e.g. block.img_attn.qkv.weight
    theta_p [T, context], theta_y [vec]      learnable text embeddings (T5 / CLIP-pooled space)
    se_img.double_blocks.{k}.{down,up}.{weight,bias}, se_img.double_blocks.{k}.gamma
    se_img.single_blocks.{k}.…, se_txt.…    SE layers per controlled base block k

The header metadata holds `fluxir_config` and `base_config` as JSON, so an import can refuse
an adapter built for a different base.
"""
from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
from flax import nnx

from fluxir_jax import config as config_io
from fluxir_jax import fileio, treeutil
from fluxir_jax.errors import UserError
from fluxir_jax.models.adapter import FluxIR, FluxIRConfig, check_compatible
from fluxir_jax.models.flux import FluxConfig

FORMAT = "fluxir-adapter/1"


def _flat(adapter: FluxIR) -> dict[tuple, np.ndarray]:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(adapter, nnx.Param))}


def to_named_tensors(adapter: FluxIR) -> dict[str, np.ndarray]:
    """The adapter's parameters under the documented export names (PyTorch layout)."""
    d_idx, s_idx = adapter.config.controlled(adapter.base_config)
    rows = [("double_blocks", k) for k in d_idx] + [("single_blocks", k) for k in s_idx]
    out = {}
    for path, x in _flat(adapter).items():
        head, leaf = path[0], path[-1]
        if head in ("se_img", "se_txt"):
            for row, (kind, k) in enumerate(rows):
                if leaf == "gamma":
                    out[f"{head}.{kind}.{k}.gamma"] = x[row]
                else:  # ('se_img', 'down'|'up', 'kernel'|'bias')
                    out[f"{head}.{kind}.{k}.{path[1]}.{'weight' if leaf == 'kernel' else 'bias'}"] = x[row].T if leaf == "kernel" else x[row]
            continue
        names = [str(p) for p in path]
        if leaf == "kernel":
            names[-1], x = "weight", x.T
        out[".".join(names)] = x
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def from_named_tensors(adapter: FluxIR, tensors: dict[str, np.ndarray]) -> None:
    """Load export-named tensors into `adapter`, strictly (missing/unexpected/shape -> UserError)."""
    expected = to_named_tensors(adapter)
    unexpected = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unexpected:
        raise UserError(f"adapter file has an unexpected tensor {unexpected[0]}")
    if missing:
        raise UserError(f"adapter file lacks tensor {missing[0]}")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise UserError(f"adapter tensor {k} has shape {list(v.shape)}, expected {list(expected[k].shape)}")
    d_idx, s_idx = adapter.config.controlled(adapter.base_config)
    rows = [("double_blocks", k) for k in d_idx] + [("single_blocks", k) for k in s_idx]
    flat = {}
    for path, _ in nnx.to_flat_state(nnx.state(adapter, nnx.Param)):
        head, leaf = path[0], path[-1]
        if head in ("se_img", "se_txt"):
            if leaf == "gamma":
                parts = [tensors[f"{head}.{kind}.{k}.gamma"] for kind, k in rows]
            else:
                name = "weight" if leaf == "kernel" else "bias"
                parts = [tensors[f"{head}.{kind}.{k}.{path[1]}.{name}"] for kind, k in rows]
                parts = [p.T for p in parts] if leaf == "kernel" else parts
            value = np.stack(parts)
        else:
            names = [str(p) for p in path]
            if leaf == "kernel":
                names[-1] = "weight"
            value = tensors[".".join(names)]
            value = value.T if leaf == "kernel" else value
        flat[path] = value
    _, params, _ = treeutil.fill_state(adapter, flat, "adapter file", var_filter=nnx.Param)
    nnx.update(adapter, params)


def _metadata(adapter: FluxIR) -> dict:
    """What an adapter file records about itself: `adapter.json` holds it as is; the safetensors
    header (string values only) holds the two configs as JSON text."""
    return {
        "format": FORMAT,
        "fluxir_config": config_io.to_dict(adapter.config),
        "base_config": config_io.to_dict(adapter.base_config),
    }


def _header(adapter: FluxIR) -> dict[str, str]:
    return {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in _metadata(adapter).items()}


def _configs_from(meta: dict, where: str) -> tuple[FluxIRConfig, FluxConfig]:
    if meta.get("format") != FORMAT:
        raise UserError(f"{where} is not a FluxIR adapter (format {meta.get('format')!r}, expected {FORMAT!r})")
    def obj(key):
        v = meta[key]
        return json.loads(v) if isinstance(v, str) else v   # JSON text in a safetensors header

    try:
        return (config_io.from_dict(FluxIRConfig, obj("fluxir_config")), config_io.from_dict(FluxConfig, obj("base_config")))
    except (KeyError, json.JSONDecodeError) as e:
        raise UserError(f"{where}: damaged adapter metadata ({e})") from None


def export_safetensors(adapter: FluxIR, path: str | pathlib.Path) -> None:
    """Write the adapter to a .safetensors file (atomically)."""
    from safetensors.numpy import save_file

    with fileio.atomic_file(path) as tmp:
        save_file(to_named_tensors(adapter), str(tmp), metadata=_header(adapter))


def import_safetensors(path: str | pathlib.Path, base_config: FluxConfig | None = None) -> FluxIR:
    """Read an exported adapter; with `base_config`, refuse one built for a different base."""
    from safetensors import SafetensorError, safe_open

    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from None
    cfg, base_cfg = _configs_from(meta, str(path))
    adapter = nnx.eval_shape(lambda: FluxIR(cfg, base_cfg, rngs=nnx.Rngs(0)))
    adapter = _materialize(adapter)
    if base_config is not None:
        check_compatible(adapter, base_config)
    from_named_tensors(adapter, tensors)
    return adapter


def _materialize(abstract: FluxIR) -> FluxIR:
    """Zero-filled concrete adapter with the structure of an abstract one."""
    graphdef, state = nnx.split(abstract)
    state = jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), state)
    return nnx.merge(graphdef, state)


def save_adapter(adapter: FluxIR, directory: str | pathlib.Path, overwrite: bool = False) -> None:
    """Orbax adapter checkpoint: `adapter.json` + `params/` (written to a temp dir, then renamed).

    Written by the calling process alone (in a multi-process job, e.g. process 0 of `fluxir
    train`, the others do not take part); the adapter's arrays must be whole on this process.
    """
    import orbax.checkpoint as ocp

    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    with fileio.atomic_dir(directory, overwrite) as tmp:
        fileio.write_json(tmp / "adapter.json", _metadata(adapter))
        with ocp.StandardCheckpointer(multiprocessing_options=alone) as ckpt:
            ckpt.save(tmp / "params", nnx.state(adapter, nnx.Param))


def load_adapter(directory: str | pathlib.Path, base_config: FluxConfig | None = None) -> FluxIR:
    """Restore an Orbax adapter checkpoint; with `base_config`, refuse a mismatched base."""
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).absolute()
    meta_file = directory / "adapter.json"
    if not meta_file.is_file():
        raise UserError(f"{directory} is not a FluxIR adapter checkpoint (no adapter.json)")
    cfg, base_cfg = _configs_from(json.loads(meta_file.read_text()), str(directory))
    abstract = nnx.eval_shape(lambda: FluxIR(cfg, base_cfg, rngs=nnx.Rngs(0)))
    if base_config is not None:
        check_compatible(abstract, base_config)
    graphdef, abstract_state = nnx.split(abstract)  # the adapter holds Params only
    with ocp.StandardCheckpointer() as ckpt:
        params = ckpt.restore(directory / "params", abstract_state)
    return nnx.merge(graphdef, params)
