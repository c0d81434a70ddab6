"""LPIPS and DISTS weights: the published layouts -> our parameter pytrees, and the loaders.

`load_lpips(weights, net)` / `load_dists(weights)` take a file converted by `fluxir convert-iqa
lpips|lpips-vgg|dists` or the published tensors saved as `.safetensors`/`.npz` (several files
may be given; their keys are merged). Published PyTorch pickles are refused with the convert-iqa
command that converts them (see `fluxir_jax.iqa.weights`). Accepted layouts:

LPIPS (`net` = "alex" or "vgg"):
  * the v0.1 linear heads as the `lpips` package ships them (`weights/v0.1/alex.pth`, `vgg.pth`):
    `lin{k}.model.1.weight`, shape (1, C_k, 1, 1), k = 0..4;
  * the backbone as a torchvision state dict (`alexnet-owt-*.pth`, `vgg16-*.pth`):
    `features.{i}.weight|bias` (`classifier.*` is ignored);
  * or one full `lpips.LPIPS` module state dict: `net.slice{s}.{i}.weight|bias`, `lin{k}.model.1.weight`,
    `lins.{k}.model.1.weight` (duplicates of lin{k}), `scaling_layer.shift|scale`.
DISTS:
  * alpha/beta as DISTS_pytorch ships them (`weights.pt`): `alpha`, `beta`, shape (1, 1475, 1, 1);
  * the torchvision VGG16 state dict (`features.{i}.weight|bias`, `classifier.*` ignored);
  * or one full DISTS module state dict: `stage{s}.{i}.weight|bias`, L2-pool buffers
    `stage{s}.{i}.filter`, `mean`, `std`, `alpha`, `beta`.

Buffers (scaling layer, mean/std, L2-pool filters) are fixed by the architecture: they are checked
against the architecture's values, not loaded. Anything else raises UserError naming the first
bad key (unexpected name, wrong shape, missing key).
"""
from __future__ import annotations

import os
import re
from typing import Iterable, Sequence

import numpy as np

from fluxir_jax.errors import UserError
from fluxir_jax.iqa import dists as _dists
from fluxir_jax.iqa import lpips as _lpips
from fluxir_jax.iqa import weights as _weights

WeightsArg = str | os.PathLike | Sequence[str | os.PathLike]


# ------------------------------------------------------------------ shared helpers
def _conv(weight: np.ndarray) -> np.ndarray:
    """torch OIHW -> flax HWIO."""
    return np.ascontiguousarray(np.transpose(weight, (2, 3, 1, 0)), dtype=np.float32)


def _expect_shape(key: str, arr: np.ndarray, shape: tuple, what: str) -> None:
    if tuple(arr.shape) != tuple(shape):
        raise UserError(f"weights do not fit {what}: first bad key {key!r} has shape {tuple(arr.shape)}, "
                        f"expected {tuple(shape)}")


def _expect_value(key: str, arr: np.ndarray, value: np.ndarray, what: str) -> None:
    _expect_shape(key, arr, value.shape, what)
    if not np.allclose(arr, value, rtol=1e-5, atol=1e-6):
        raise UserError(f"weights do not fit {what}: first bad key {key!r} holds values that differ from "
                        f"the architecture's fixed buffer")


def _bad_key(key: str, what: str):
    return UserError(f"weights do not fit {what}: first bad key {key!r} (unexpected name)")


def _missing(key: str, what: str, hint: str):
    return UserError(f"weights do not fit {what}: missing key {key!r} ({hint})")


def _slice_of(i: int, bounds: Iterable[int]) -> int:
    """1-based slice number of torchvision feature index i for slice upper bounds `bounds`."""
    for s, hi in enumerate(bounds, start=1):
        if i < hi:
            return s
    return -1


def _backbone_convs(net: str) -> dict[int, tuple]:
    """torchvision index -> OIHW weight shape."""
    if net == "alex":
        return {i: (cout, cin, k, k) for i, (cin, cout, k, _, _) in _lpips.ALEX_CONVS.items()}
    return {i: (cout, cin, 3, 3) for i, (cin, cout) in _lpips.VGG16_CONVS.items()}


_LPIPS_SLICE_BOUNDS = {"alex": (2, 5, 8, 10, 12), "vgg": (4, 9, 16, 23, 30)}
_DISTS_STAGE_BOUNDS = (4, 9, 16, 23, 30)
_RE_FEATURES = re.compile(r"features\.(\d+)\.(weight|bias)")
_RE_CLASSIFIER = re.compile(r"classifier\.\d+\.(weight|bias)")


def _take_backbone(key: str, arr: np.ndarray, i: int, kind: str, convs: dict, what: str, params: dict,
                   source: dict) -> None:
    if i not in convs:
        raise _bad_key(key, what)
    shape = convs[i] if kind == "weight" else (convs[i][0],)
    _expect_shape(key, arr, shape, what)
    name = f"conv{i}"
    leaf = "kernel" if kind == "weight" else "bias"
    value = _conv(arr) if kind == "weight" else np.asarray(arr, np.float32)
    slot = params.setdefault(name, {})
    if leaf in slot and not np.array_equal(slot[leaf], value):
        raise UserError(f"weights do not fit {what}: {key!r} conflicts with {source[(name, leaf)]!r}")
    slot[leaf] = value
    source[(name, leaf)] = key


# ------------------------------------------------------------------ LPIPS
def lpips_params_from_state_dict(sd: dict[str, np.ndarray], net: str = "alex") -> dict:
    """Flat published-layout state dict -> pure-dict params of `fluxir_jax.iqa.lpips.LPIPS(net)`."""
    if net not in _lpips.NETS:
        raise UserError(f"unknown LPIPS network {net!r}; use one of {', '.join(_lpips.NETS)}")
    what = f"LPIPS-{net} (v0.1)"
    convs = _backbone_convs(net)
    chans = _lpips.CHANNELS[net]
    backbone: dict = {}
    source: dict = {}
    heads: dict[int, np.ndarray] = {}
    head_src: dict[int, str] = {}
    re_slice = re.compile(r"net\.slice(\d)\.(\d+)\.(weight|bias)")
    re_head = re.compile(r"(?:lin(\d)|lins\.(\d))\.model\.1\.weight")
    for key, arr in sd.items():
        if m := _RE_FEATURES.fullmatch(key):
            _take_backbone(key, arr, int(m[1]), m[2], convs, what, backbone, source)
        elif m := re_slice.fullmatch(key):
            i = int(m[2])
            if _slice_of(i, _LPIPS_SLICE_BOUNDS[net]) != int(m[1]):
                raise _bad_key(key, what)
            _take_backbone(key, arr, i, m[3], convs, what, backbone, source)
        elif m := re_head.fullmatch(key):
            k = int(m[1] if m[1] is not None else m[2])
            if k >= len(chans):
                raise _bad_key(key, what)
            _expect_shape(key, arr, (1, chans[k], 1, 1), what)
            if k in heads and not np.array_equal(heads[k], arr):
                raise UserError(f"weights do not fit {what}: {key!r} conflicts with {head_src[k]!r}")
            heads[k], head_src[k] = np.asarray(arr, np.float32), key
        elif key == "scaling_layer.shift":
            _expect_value(key, arr, np.asarray(_lpips.SHIFT, np.float32).reshape(1, 3, 1, 1), what)
        elif key == "scaling_layer.scale":
            _expect_value(key, arr, np.asarray(_lpips.SCALE, np.float32).reshape(1, 3, 1, 1), what)
        elif _RE_CLASSIFIER.fullmatch(key):
            continue   # torchvision's fully connected layers: not used by LPIPS
        else:
            raise _bad_key(key, what)
    for k in range(len(chans)):
        if k not in heads:
            raise _missing(f"lin{k}.model.1.weight", what, "pass the v0.1 linear-head file")
    net_name = "AlexNet" if net == "alex" else "VGG16"
    for i in convs:
        for leaf, kind in (("kernel", "weight"), ("bias", "bias")):
            if leaf not in backbone.get(f"conv{i}", {}):
                raise _missing(f"features.{i}.{kind}", what, f"pass the torchvision {net_name} state dict too")
    params = {"backbone": backbone}
    for k in range(len(chans)):
        params[f"lin{k}"] = {"kernel": _conv(heads[k])}
    return params


# ------------------------------------------------------------------ DISTS
def _l2pool_filter(c: int) -> np.ndarray:
    g = np.hanning(5)[1:-1]
    k = np.outer(g, g)
    k = k / k.sum()
    return np.broadcast_to(k[None, None], (c, 1, 3, 3)).astype(np.float32)


_DISTS_POOL_CHANNELS = {4: 64, 9: 128, 16: 256, 23: 512}


def dists_params_from_state_dict(sd: dict[str, np.ndarray]) -> dict:
    """Flat published-layout state dict -> pure-dict params of `fluxir_jax.iqa.dists.DISTS`."""
    what = "DISTS"
    convs = _backbone_convs("vgg")
    backbone: dict = {}
    source: dict = {}
    ab: dict[str, np.ndarray] = {}
    re_stage = re.compile(r"stage(\d)\.(\d+)\.(weight|bias|filter)")
    for key, arr in sd.items():
        if m := _RE_FEATURES.fullmatch(key):
            _take_backbone(key, arr, int(m[1]), m[2], convs, what, backbone, source)
        elif m := re_stage.fullmatch(key):
            i = int(m[2])
            if _slice_of(i, _DISTS_STAGE_BOUNDS) != int(m[1]):
                raise _bad_key(key, what)
            if m[3] == "filter":
                if i not in _DISTS_POOL_CHANNELS:
                    raise _bad_key(key, what)
                _expect_value(key, arr, _l2pool_filter(_DISTS_POOL_CHANNELS[i]), what)
            else:
                _take_backbone(key, arr, i, m[3], convs, what, backbone, source)
        elif key in ("alpha", "beta"):
            if arr.size != _dists.TOTAL or arr.shape not in ((1, _dists.TOTAL, 1, 1), (_dists.TOTAL,)):
                _expect_shape(key, arr, (1, _dists.TOTAL, 1, 1), what)
            ab[key] = np.asarray(arr, np.float32).reshape(-1)
        elif key == "mean":
            _expect_value(key, arr, np.asarray(_dists.MEAN, np.float32).reshape(1, 3, 1, 1), what)
        elif key == "std":
            _expect_value(key, arr, np.asarray(_dists.STD, np.float32).reshape(1, 3, 1, 1), what)
        elif _RE_CLASSIFIER.fullmatch(key):
            continue
        else:
            raise _bad_key(key, what)
    for key in ("alpha", "beta"):
        if key not in ab:
            raise _missing(key, what, "pass the DISTS alpha/beta file (weights.pt)")
    for i in convs:
        for leaf, kind in (("kernel", "weight"), ("bias", "bias")):
            if leaf not in backbone.get(f"conv{i}", {}):
                raise _missing(f"features.{i}.{kind}", what, "pass the torchvision VGG16 state dict too")
    return {"backbone": backbone, "alpha": ab["alpha"], "beta": ab["beta"]}


# ------------------------------------------------------------------ loaders
def load_lpips_params(weights: WeightsArg, net: str = "alex") -> dict:
    """Pure-dict LPIPS(net) params from a converted file or published-layout tensors."""
    metric = "lpips" if net == "alex" else "lpips-vgg"

    def published(sd, source):
        return {"net": net}, _weights.flat_params(lpips_params_from_state_dict(sd, net))

    cfg, flat = _weights.load_flat(metric, weights, published)
    if cfg.get("net", net) != net:
        raise UserError(f"{weights}: holds LPIPS-{cfg.get('net')} weights, not LPIPS-{net}")
    return _weights.nested_params(flat)


def load_lpips(weights: WeightsArg, net: str = "alex") -> "_lpips.LPIPS":
    """LPIPS(net) holding the given weights (see the module docstring)."""
    return _lpips.lpips_from_params(load_lpips_params(weights, net), net)


def load_dists_params(weights: WeightsArg) -> dict:
    """Pure-dict DISTS params from a converted file or published-layout tensors."""
    cfg, flat = _weights.load_flat("dists", weights,
                                   lambda sd, source: ({}, _weights.flat_params(dists_params_from_state_dict(sd))))
    return _weights.nested_params(flat)


def load_dists(weights: WeightsArg) -> "_dists.DISTS":
    """DISTS holding the given weights (see the module docstring)."""
    return _dists.dists_from_params(load_dists_params(weights))
