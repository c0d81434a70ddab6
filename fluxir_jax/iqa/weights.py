"""Metric weights on disk: the converted format, numpy-readable published files, state building.

The metrics read only what numpy can read: `.safetensors` and `.npz` files, either converted by
`fluxir convert-iqa` (one `.safetensors` whose keys are our NNX state paths and whose metadata
holds the metric name and its architecture config) or, where the published layout is numpy
readable, the published file itself (MUSIQ's Flax `.npz`, LPIPS/DISTS/MANIQA state dicts saved
as `.safetensors`). A PyTorch pickle (`.pt`, `.pth`, `.bin`, TorchScript) is refused with the
`fluxir convert-iqa` command that makes it usable; that command (package `fluxir_convert`)
holds everything that needs PyTorch.

Wrong weights (a missing key, an unexpected key, a shape mismatch) raise `UserError` naming the
first bad key.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fluxir_jax.errors import UserError

FORMAT_KEY = "fluxir_metric"
NUMPY_SUFFIXES = (".safetensors", ".npz")

# metric family -> (published files, the convert-iqa command line that converts them)
CONVERT_COMMANDS = {
    "lpips": ("the LPIPS v0.1 heads alex.pth and torchvision's alexnet-owt-7be5be79.pth",
              "fluxir convert-iqa lpips alex.pth alexnet-owt-7be5be79.pth -o lpips_alex.safetensors"),
    "lpips-vgg": ("the LPIPS v0.1 heads vgg.pth and torchvision's vgg16-397923af.pth",
                  "fluxir convert-iqa lpips-vgg vgg.pth vgg16-397923af.pth -o lpips_vgg.safetensors"),
    "dists": ("DISTS_pytorch's weights.pt and torchvision's vgg16-397923af.pth",
              "fluxir convert-iqa dists weights.pt vgg16-397923af.pth -o dists.safetensors"),
    "clipiqa": ("OpenAI CLIP RN50.pt (or an open_clip RN50 state dict)",
                "fluxir convert-iqa clipiqa RN50.pt -o clipiqa_rn50.safetensors"),
    "musiq": ("google-research/musiq koniq_ckpt.npz",
              "fluxir convert-iqa musiq koniq_ckpt.npz -o musiq_koniq.safetensors"),
    "maniqa": ("IIGROUP/MANIQA ckpt_koniq10k.pt",
               "fluxir convert-iqa maniqa ckpt_koniq10k.pt -o maniqa_koniq.safetensors"),
}


def convert_hint(metric: str) -> str:
    files, command = CONVERT_COMMANDS[metric]
    return f"convert {files} once with `{command}`"


def _as_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[pathlib.Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = [pathlib.Path(p) for p in paths]
    if not out:
        raise UserError("no weights file given")
    return out


def read_tensors(path: str | os.PathLike, metric: str) -> dict[str, np.ndarray]:
    """{name: array} of a `.safetensors` or `.npz` file (floating tensors as float32)."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise UserError(f"weights file not found: {p}")
    if p.suffix.lower() not in NUMPY_SUFFIXES:
        raise UserError(f"{p}: the metrics read .safetensors/.npz weights, not PyTorch files; "
                        f"{convert_hint(metric)}")
    try:
        if p.suffix.lower() == ".npz":
            with np.load(p, allow_pickle=False) as z:
                raw = {k: z[k] for k in z.files}
        else:
            from safetensors.numpy import load_file

            raw = dict(load_file(str(p)))
    except Exception as e:  # noqa: BLE001 - any decoding failure is a problem with the user's file
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"{p}: unreadable weights file ({msg}); {convert_hint(metric)}") from None
    return {k: (v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v) for k, v in raw.items()}


def read_state_dict(paths: str | os.PathLike | Sequence[str | os.PathLike], metric: str) -> dict[str, np.ndarray]:
    """Merge one or more weight files into one flat dict ('module.' prefixes dropped). A key present
    in two files with different values is an error."""
    out: dict[str, np.ndarray] = {}
    origin: dict[str, pathlib.Path] = {}
    for p in _as_paths(paths):
        for k, v in read_tensors(p, metric).items():
            k = k[len("module."):] if k.startswith("module.") else k
            if k in out and (out[k].shape != v.shape or not np.array_equal(out[k], v)):
                raise UserError(f"key {k!r} is in both {origin[k]} and {p} with different values")
            out[k], origin[k] = v, p
    return out


# ----------------------------------------------------------------------------- converted files
def save_converted(path: str | os.PathLike, metric: str, config: Mapping[str, Any],
                   flat: Mapping[str, np.ndarray], overwrite: bool = True) -> None:
    """Write {our state path: array} + metadata (metric, config as JSON) to `path`, atomically."""
    from safetensors.numpy import save_file

    from fluxir_jax import fileio

    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flat.items()}
    with fileio.atomic_file(path, overwrite) as tmp:
        save_file(arrays, str(tmp), metadata={FORMAT_KEY: metric, "config": json.dumps(dict(config))})


def read_converted(path: str | os.PathLike) -> tuple[str, dict[str, Any], dict[str, np.ndarray]] | None:
    """(metric, config, flat) if `path` is a file written by `save_converted`, else None."""
    p = pathlib.Path(path)
    if p.suffix.lower() != ".safetensors" or not p.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="numpy") as f:
            meta = f.metadata() or {}
            if FORMAT_KEY not in meta:
                return None
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{p}: unreadable safetensors file ({type(e).__name__})") from None
    return meta[FORMAT_KEY], json.loads(meta.get("config", "{}")), flat


def load_flat(metric: str, paths: str | os.PathLike | Sequence[str | os.PathLike],
              from_published: Callable[[dict[str, np.ndarray], str], tuple[dict, dict]]) -> tuple[dict, dict]:
    """(config, flat) from a converted file of `metric`, or from numpy-readable published file(s)
    mapped by `from_published(state_dict, source)`."""
    files = _as_paths(paths)
    if len(files) == 1:
        conv = read_converted(files[0])
        if conv is not None:
            name, cfg, flat = conv
            if name != metric:
                raise UserError(f"{files[0]}: holds converted {name!r} weights, not {metric!r}")
            return cfg, flat
    return from_published(read_state_dict(files, metric), ", ".join(str(f) for f in files))


# ----------------------------------------------------------------------------- NNX state assembly
def build_state(abstract_model: Any, flat: Mapping[str, np.ndarray], source: str = "weights"):
    """(graphdef, state) of `abstract_model` filled from {dotted path: array}, strictly."""
    from fluxir_jax.treeutil import fill_state

    return fill_state(abstract_model, flat, source)


def abstract_shapes(abstract_model: Any) -> dict[str, tuple[tuple[Any, ...], tuple[int, ...]]]:
    """{our key: (path, shape)} of an abstract NNX model, in state order."""
    from flax import nnx

    from fluxir_jax.treeutil import path_str

    _, st = nnx.split(abstract_model)
    return {path_str(p): (tuple(p), tuple(v.get_value().shape)) for p, v in nnx.to_flat_state(st)}


_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def torch_to_ours(sd: Mapping[str, np.ndarray], ours: Mapping[str, tuple[tuple[Any, ...], tuple[int, ...]]],
                  source: str, prefix: str = "", rename: Callable[[str], str] | None = None,
                  ignore: Callable[[str], bool] = lambda k: False) -> dict[str, np.ndarray]:
    """Mechanical torch -> NNX key walk: conv OIHW -> HWIO, Linear W -> W.T, BN/LN weight -> scale.

    `ours` is {our key: (path, shape)}; the torch key of each is `prefix` + the path with the
    leaf renamed (kernel/scale -> weight, mean -> running_mean, var -> running_var), optionally
    passed through `rename`. Keys are checked in the file's order: the first unexpected key
    (not `ignore`d) or shape mismatch raises; then the first missing key.
    """
    wanted: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    for key, (path, shape) in ours.items():
        leaf = str(path[-1])
        tkey = (prefix + ".".join(str(p) for p in path[:-1]) + "." + _TORCH_LEAF.get(leaf, leaf)).lstrip(".")
        if rename is not None:
            tkey = rename(tkey)
        wanted[tkey] = (key, leaf, tuple(shape))
    out = {}
    for tkey, v in sd.items():
        if tkey not in wanted:
            if not ignore(tkey) and not tkey.endswith("num_batches_tracked"):
                raise UserError(f"{source}: unexpected key {tkey!r} (wrong architecture?)")
            continue
        key, leaf, shape = wanted[tkey]
        a = np.asarray(v, np.float32)
        if leaf == "kernel" and a.ndim == 4:
            a = a.transpose(2, 3, 1, 0)
        elif leaf == "kernel" and a.ndim == 2:
            a = a.T
        if tuple(a.shape) != shape:
            raise UserError(f"{source}: key {tkey!r} has shape {tuple(np.shape(v))}, "
                            f"which does not fit {shape} (wrong architecture?)")
        out[key] = a
    for tkey, (key, _, _) in wanted.items():
        if key not in out:
            raise UserError(f"{source}: missing key {tkey!r} (wrong architecture?)")
    return {k: out[k] for k in ours}


def config_dict(x: Any) -> dict[str, Any]:
    """A config dataclass as a JSON-ready dict (tuples as lists)."""
    import dataclasses

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(x).items()}


def flat_params(params: Mapping) -> dict[str, np.ndarray]:
    """Nested params dict -> {dotted path: array}."""
    from fluxir_jax.treeutil import flatten, path_str

    return {path_str(p): np.asarray(v) for p, v in flatten(params)}


def nested_params(flat: Mapping[str, np.ndarray]) -> dict:
    from fluxir_jax.treeutil import unflatten

    return unflatten(dict(flat))

