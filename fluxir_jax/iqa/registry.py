"""Registry of image-quality metrics: `get_metric(name, weights=...)` -> batched jitted scorer.

Using a metric
--------------
    from fluxir_jax.iqa.registry import get_metric
    lp = get_metric("lpips", weights="lpips_alex.safetensors")   # made by `fluxir convert-iqa lpips`
    d = lp(pred, gt)              # NHWC float in [0, 1], (N, H, W, 3) each -> (N,) scores
    ni = get_metric("niqe")       # no-reference: ni(pred) -> (N,)

`get_metric` returns a `Metric`: call it with (pred, gt) for full-reference metrics (kind "fr") and
with (pred) for no-reference ones (kind "nr"); `.lower_better`, `.kind`, `.name` describe it.
A metric whose weights are missing raises `MetricUnavailable` (a UserError); wrong weights raise
UserError naming the first bad key; both exit 2 in the CLI.

Registering a metric (for metric modules in this package)
--------------------------------------------------------
    from fluxir_jax.iqa.registry import register_metric
    register_metric("musiq", _make_musiq, kind="nr", needs_weights=True, lower_better=False,
                    description="MUSIQ (KonIQ), 0-100")

`factory(weights, **options) -> fn` is called by `get_metric`. `weights` is None, one path, or a
list of paths, exactly as the user passed them; options are keyword arguments the factory declares
(the eval CLI passes `convention` and `crop_border` only to factories that accept them). `fn` takes
NHWC float [0, 1] arrays, (pred, gt) for "fr" and (pred,) for "nr", any batch size, and returns
(N,) scores (a jax or numpy array); it should be jitted over its parameters (pure function of
(graphdef, state)). Factories raise `MetricUnavailable` when something the metric needs was not
given, UserError when a given file is wrong.

Modules named in `OPTIONAL_MODULES` (fluxir_jax.iqa.clipiqa, .musiq, .maniqa) are imported on first
use of the registry if they exist, and register their metrics at import time; an import failure is
kept and reported when one of their metrics is asked for.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import os
from typing import Any, Callable, Sequence

import numpy as np
import jax
import jax.numpy as jnp

from fluxir_jax.errors import UserError

OPTIONAL_MODULES = ["clipiqa", "musiq", "maniqa"]
KINDS = ("fr", "nr")
DTYPES = ("auto", "float32", "float64")

WeightsArg = str | os.PathLike | Sequence[str | os.PathLike] | None


class MetricUnavailable(UserError):
    """The metric cannot run with what was given (no weights, no reference images ...)."""


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    name: str
    factory: Callable[..., Callable]
    kind: str
    needs_weights: bool
    lower_better: bool
    description: str

    def accepts(self, option: str) -> bool:
        """Whether the factory takes keyword `option` (explicitly or through **kwargs)."""
        params = inspect.signature(self.factory).parameters
        return option in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@dataclasses.dataclass(frozen=True)
class Metric:
    """A ready scorer. `metric(pred, gt)` (fr) or `metric(pred)` (nr) -> (N,) numpy float64."""
    spec: MetricSpec
    fn: Callable

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def lower_better(self) -> bool:
        return self.spec.lower_better

    def __call__(self, pred, gt=None) -> np.ndarray:
        pred = _check_images(pred, "pred")
        if self.kind == "fr":
            if gt is None:
                raise UserError(f"{self.name} is a full-reference metric: it needs reference images")
            gt = _check_images(gt, "gt")
            if pred.shape != gt.shape:
                raise UserError(f"{self.name}: prediction shape {pred.shape} differs from reference shape {gt.shape}")
            out = self.fn(pred, gt)
        else:
            if gt is not None:
                raise UserError(f"{self.name} is a no-reference metric: pass only the images to score")
            out = self.fn(pred)
        return np.asarray(out, np.float64).reshape(pred.shape[0])


def _check_images(x, what: str):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = np.asarray(x)
    if len(x.shape) != 4 or x.shape[-1] not in (1, 3):
        raise UserError(f"{what}: expected NHWC images with 1 or 3 channels, got shape {tuple(x.shape)}")
    if not np.issubdtype(np.dtype(x.dtype), np.floating):
        raise UserError(f"{what}: metrics take float images in [0, 1], got dtype {x.dtype}")
    return x


_REGISTRY: dict[str, MetricSpec] = {}
_IMPORT_ERRORS: dict[str, str] = {}
_loaded_optional = False


def register_metric(name: str, factory: Callable[..., Callable], kind: str = "nr", needs_weights: bool = True,
                    *, lower_better: bool = False, description: str = "", replace: bool = False) -> None:
    """Add metric `name`. See the module docstring for the factory contract."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not name or name != name.strip().lower() or "," in name or "=" in name:
        raise ValueError(f"metric names are lower-case without ',' or '=': {name!r}")
    if name in _REGISTRY and not replace and _REGISTRY[name].factory is not factory:
        raise ValueError(f"metric {name!r} is already registered")
    _REGISTRY[name] = MetricSpec(name, factory, kind, needs_weights, lower_better, description)


def _load_optional() -> None:
    global _loaded_optional
    if _loaded_optional:
        return
    _loaded_optional = True
    for mod in OPTIONAL_MODULES:
        full = f"{__package__}.{mod}"
        try:
            if importlib.util.find_spec(full) is None:
                continue
            importlib.import_module(full)
        except Exception as e:  # noqa: BLE001 -- kept and reported when one of its metrics is requested
            _IMPORT_ERRORS[mod] = f"{type(e).__name__}: {e}"


def list_metrics() -> list[str]:
    """Names of all registered metrics, sorted."""
    _load_optional()
    return sorted(_REGISTRY)


def metric_spec(name: str) -> MetricSpec:
    _load_optional()
    if name not in _REGISTRY:
        extra = "".join(f"; fluxir_jax.iqa.{m} failed to import ({err})" for m, err in _IMPORT_ERRORS.items())
        raise UserError(f"unknown metric {name!r}; known: {', '.join(sorted(_REGISTRY))}{extra}")
    return _REGISTRY[name]


def get_metric(name: str, weights: WeightsArg = None, **options: Any) -> Metric:
    """The scorer for metric `name`. `weights`: a path or list of paths (see each metric); options
    go to the metric's factory (e.g. convention="pyiqa", crop_border=4 for psnr/ssim/niqe)."""
    spec = metric_spec(name)
    if spec.needs_weights and not weights:
        raise MetricUnavailable(f"{name} needs weights: pass them (fluxir eval --weights {name}=PATH)")
    for opt in options:
        if not spec.accepts(opt):
            raise UserError(f"metric {name!r} takes no option {opt!r}")
    return Metric(spec, spec.factory(weights, **options))


# ---------------------------------------------------------------------------- built-in metrics
def _float_dtype(dtype: str):
    """'auto' = float64 where the backend has it natively (CPU, GPU), else float32."""
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "tpu" else "float64"
    return dtype


def _run_in(dtype: str, fn: Callable, *arrays):
    if dtype == "float64":
        with jax.enable_x64(True):
            return np.asarray(fn(*(jnp.asarray(np.asarray(a), jnp.float64) for a in arrays)))
    return np.asarray(fn(*(jnp.asarray(a, jnp.float32) for a in arrays)))


def single_path(name: str, weights: WeightsArg):
    """The one weight file a metric takes (None stays None); a list of several is a UserError."""
    if weights is None or isinstance(weights, (str, os.PathLike)):
        return weights
    weights = list(weights)
    if len(weights) != 1:
        raise UserError(f"{name} takes one weight file, got {len(weights)}")
    return weights[0]


def as_rgb(images: Any) -> jax.Array:
    """float32 NHWC images with gray (1 channel) repeated to RGB."""
    x = jnp.asarray(images, jnp.float32)
    return jnp.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def _model_call(graphdef, state, images):
    from flax import nnx

    return nnx.merge(graphdef, state)(images)


model_scorer = jax.jit(_model_call, static_argnums=0)
"""model_scorer(graphdef, state, images) -> the NNX model's scores, jitted once per graphdef."""


def _psnr_ssim_factory(which: str):
    """Factory of PSNR (`which`="psnr") or SSIM: both take the same convention options."""
    def factory(weights=None, *, convention: str = "basicsr", crop_border: int = 0, y_channel: bool = True,
                color_space: str | None = None, dtype: str = "auto"):
        from fluxir_jax.iqa import psnr_ssim
        psnr_ssim.resolve_color_space(convention, color_space)
        dt = _float_dtype(dtype)
        fn = getattr(psnr_ssim, f"{which}_jit")
        kw = dict(convention=convention, crop_border=int(crop_border), y_channel=bool(y_channel), color_space=color_space)
        return lambda pred, gt: _run_in(dt, lambda a, b: fn(a, b, **kw), pred, gt)
    return factory


def _niqe_factory(weights=None, *, convention: str = "basicsr", crop_border: int = 0, dtype: str = "auto"):
    from fluxir_jax.iqa import niqe as niqe_mod
    from fluxir_jax.iqa.psnr_ssim import resolve_color_space
    resolve_color_space(convention, None)
    path = single_path("niqe", weights)
    try:
        mu, cov, window = niqe_mod.load_params(path)
    except UserError as e:
        if path is None:
            raise MetricUnavailable(str(e)) from None
        raise
    dt = _float_dtype(dtype)

    def features(a):   # one image at a time: compiled once per image size, not per batch size
        return niqe_mod.niqe_features(a, window, convention=convention, crop_border=int(crop_border))

    def fn(pred):
        feats = np.concatenate([_run_in(dt, features, pred[i:i + 1]) for i in range(pred.shape[0])])
        return niqe_mod.niqe_from_features(feats, mu, cov)
    return fn


def _lpips_factory(net: str):
    def factory(weights):
        from fluxir_jax.iqa import classic_weights, lpips
        scorer = lpips.make_scorer(classic_weights.load_lpips(weights, net))
        return lambda pred, gt: scorer(jnp.asarray(pred, jnp.float32), jnp.asarray(gt, jnp.float32))
    return factory


def _dists_factory(weights):
    from fluxir_jax.iqa import classic_weights, lpips
    scorer = lpips.make_scorer(classic_weights.load_dists(weights))
    return lambda pred, gt: scorer(jnp.asarray(pred, jnp.float32), jnp.asarray(gt, jnp.float32))


register_metric("psnr", _psnr_ssim_factory("psnr"), kind="fr", needs_weights=False, lower_better=False,
                description="PSNR in dB on Y (basicsr: YCbCr +16, 255 scale; pyiqa: YIQ, 1 scale)")
register_metric("ssim", _psnr_ssim_factory("ssim"), kind="fr", needs_weights=False, lower_better=False,
                description="SSIM, 11x11 Gaussian sigma 1.5, valid window (pyiqa: rounded Y, relu(cs))")
register_metric("niqe", _niqe_factory, kind="nr", needs_weights=False, lower_better=True,
                description="NIQE (MATLAB-compatible); weights = niqe_pris_params.npz or $FLUXIR_NIQE_PARAMS")
register_metric("lpips", _lpips_factory("alex"), kind="fr", needs_weights=True, lower_better=True,
                description="LPIPS v0.1 AlexNet; weights = `fluxir convert-iqa lpips` output")
register_metric("lpips-vgg", _lpips_factory("vgg"), kind="fr", needs_weights=True, lower_better=True,
                description="LPIPS v0.1 VGG16; weights = `fluxir convert-iqa lpips-vgg` output")
register_metric("dists", _dists_factory, kind="fr", needs_weights=True, lower_better=True,
                description="DISTS; weights = `fluxir convert-iqa dists` output")
