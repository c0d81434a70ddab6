"""Published weight files read into numpy: the one reader of PyTorch files in the project.

`read_tensors(path)` reads `.safetensors` (bfloat16 through torch), `.npz`, a PyTorch state dict
(`torch.load(weights_only=True)`: tensors only, nothing arbitrary is unpickled), or a
TorchScript archive (OpenAI's CLIP `RN50.pt`, through `torch.jit.load`, whose restricted
unpickler builds only tensors and TorchScript code). A state dict nested under one of
`WRAPPER_KEYS` is unwrapped and DataParallel's `module.` prefixes are dropped; floating tensors
come back as float32, other entries (epoch counters, names) are ignored.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import warnings
import zipfile
from typing import Any, Iterable, Mapping

import numpy as np

from fluxir_jax.errors import UserError

# Keys a state dict may be nested under (checked in this order, up to three levels deep).
WRAPPER_KEYS = ("state_dict", "params", "params_ema", "model", "net", "module")


def torch_module():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a test/convert dependency
        raise UserError("reading PyTorch weight files needs PyTorch (pip install torch)") from e
    return torch


def _is_torchscript(path: pathlib.Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _unwrap(obj: Any, path: pathlib.Path) -> Mapping[str, Any]:
    """A state dict, possibly nested under a conventional key, with DataParallel prefixes removed."""
    for _ in range(3):
        if isinstance(obj, Mapping) and not any(hasattr(v, "shape") for v in obj.values()):
            for key in WRAPPER_KEYS:
                if key in obj and isinstance(obj[key], Mapping):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, Mapping):
        raise UserError(f"{path}: not a state dict (found {type(obj).__name__})")
    out = {}
    for k, v in obj.items():
        if not hasattr(v, "shape"):
            continue
        k = str(k)
        if k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    return out


def _to_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):
        v = v.detach().cpu()
        if v.dtype.is_floating_point:
            v = v.float()
        return v.numpy()
    a = np.asarray(v)
    return a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Flat {name: float32/int ndarray} of one file (see the module docstring)."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise UserError(f"weight file not found: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors import safe_open

            # bf16 tensors need a framework that has them: torch when installed
            framework = "pt" if importlib.util.find_spec("torch") is not None else "numpy"
            with safe_open(str(p), framework=framework) as f:
                return {k: _to_numpy(f.get_tensor(k)) for k in f.keys()}
        if suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                return {k: _to_numpy(z[k]) for k in z.files}
        torch = torch_module()
        if _is_torchscript(p):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sd = torch.jit.load(str(p), map_location="cpu").state_dict()
        else:
            try:
                sd = torch.load(str(p), map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unpickling refusal is a user-file problem
                raise UserError(f"{p}: not a plain tensor checkpoint readable with torch.load(weights_only=True) "
                                f"(a pickled full model must be re-saved as model.state_dict()): "
                                f"{str(e).splitlines()[0][:200]}") from None
        return {k: _to_numpy(v) for k, v in _unwrap(sd, p).items()}
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{p}: unreadable weight file ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def read_merged(paths: Iterable[str | os.PathLike]) -> dict[str, np.ndarray]:
    """`read_tensors` of several files merged; a key in two files with different values is an error."""
    out: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for p in paths:
        for k, v in read_tensors(p).items():
            if k in out and (out[k].shape != v.shape or not np.array_equal(out[k], v)):
                raise UserError(f"key {k!r} is in both {origin[k]} and {p} with different values")
            out[k], origin[k] = v, str(p)
    if not out:
        raise UserError("no weights file given")
    return out
