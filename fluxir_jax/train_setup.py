"""Models for training, created or restored straight into their shardings (or only as shapes).

`base` in the train config is a converted checkpoint directory (`fluxir convert` / `fluxir
init`) or a preset name (random weights, for --compile-only and benchmarks). Every parameter
state is handled as a pure dict (nested dicts of arrays) so it can cross `jax.jit`, optax and
Orbax untouched; `train.merge_pure` rebuilds modules inside the step.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fluxir_jax import checkpoint, parallel
from fluxir_jax.errors import UserError
from fluxir_jax.models import presets
from fluxir_jax.models.adapter import FluxIR, check_compatible
from fluxir_jax.models.autoencoder import AE_PRESETS, AutoEncoder, AutoEncoderConfig
from fluxir_jax.models.flux import Flux, FluxConfig
from fluxir_jax.train_config import TrainConfig


@dataclasses.dataclass
class Models:
    """Graphdefs, abstract states and (unless abstract) the pure-dict states of base, VAE and adapter."""

    base_config: FluxConfig
    vae_config: AutoEncoderConfig
    base_graphdef: Any
    vae_graphdef: Any
    adapter_graphdef: Any
    base_abstract: Any  # nnx.State of ShapeDtypeStructs
    vae_abstract: Any
    adapter_abstract: Any
    base_sh: Any  # pure-dict shardings
    vae_sh: Any
    adapter_sh: Any
    random_weights: bool
    text_len: int
    base: Any = None  # pure dicts of arrays (None when abstract)
    vae: Any = None
    adapter: Any = None
    txt: Any = None
    y: Any = None


def is_preset(base: str) -> bool:
    return base in presets.FLUX_PRESETS


def resolve_configs(cfg: TrainConfig) -> tuple[FluxConfig, AutoEncoderConfig, int, bool]:
    """(base config, VAE config, stored text length, random weights?) without reading weights."""
    m = cfg.model
    over = dict(dtype=m.dtype, param_dtype=m.dtype, remat_policy=m.remat_policy, keep_gelu_grad=m.keep_gelu_grad,
                attention=m.attention)
    try:
        if is_preset(cfg.base):
            base = presets.get(cfg.base, **over)
            vae = AE_PRESETS["flux" if cfg.base.startswith("flux-") else "tiny"]
            vae = dataclasses.replace(vae, dtype=m.vae_dtype, param_dtype=m.vae_dtype)
            return base, vae, cfg.adapter.text_len, True
        path = pathlib.Path(cfg.base)
        if not path.is_dir():
            raise UserError(f"base: {cfg.base} is neither a checkpoint directory nor a preset "
                            f"({', '.join(presets.names())})")
        base = checkpoint.flux_config(path, **over)
        vae = checkpoint.autoencoder_config(path, dtype=m.vae_dtype, param_dtype=m.vae_dtype)
    except (ValueError, TypeError) as e:
        raise UserError(f"model: {e}") from None
    meta = checkpoint.read_config(path).get("text", {}).get("empty", {})
    text_file = path / meta.get("file", "text/empty.npz")
    if not text_file.is_file():
        raise UserError(f"base: {path} has no empty-prompt text embeddings ({text_file.name})")
    with np.load(text_file) as z:
        text_len = int(z["txt"].shape[0])
    return base, vae, text_len, False


def _pure_shardings(abstract_state, mesh, logical_rules=parallel.LOGICAL_RULES):
    """Pure-dict shardings of an abstract nnx.State, from the rules table."""
    sh = parallel.state_shardings(abstract_state, mesh, logical_rules=logical_rules)
    flat = {tuple(p): s for p, s in nnx.to_flat_state(sh)}
    pure = nnx.to_pure_dict(abstract_state)
    return jax.tree_util.tree_map_with_path(lambda path, _: flat[tuple(k.key for k in path)], pure)


def frozen_rules(m) -> dict:
    """Logical-axis rules of the frozen base and VAE weights (`model.frozen_sharding`)."""
    try:
        return parallel.FROZEN_SHARDINGS[m.frozen_sharding]
    except KeyError:
        raise UserError(f"model.frozen_sharding: {m.frozen_sharding!r} is not one of "
                        f"{', '.join(parallel.FROZEN_SHARDINGS)}") from None


def base_shardings(base_abs, mesh, m) -> Any:
    """Pure-dict shardings of the frozen base: `model.frozen_sharding`'s rules, and the replicated ones
    for the parameters that a `model.frozen_replicated` regex finds in their path (`a/b/kernel`)."""
    out = _pure_shardings(base_abs, mesh, frozen_rules(m))
    if not m.frozen_replicated:
        return out
    try:
        patterns = [re.compile(r) for r in m.frozen_replicated]
    except re.error as e:
        raise UserError(f"model.frozen_replicated: {e.pattern!r} is not a regex ({e})") from None
    whole = _pure_shardings(base_abs, mesh, parallel.REPLICATED_OVER_FSDP)
    names = [_path(path) for path, _ in jax.tree_util.tree_flatten_with_path(out)[0]]
    for r, pat in zip(m.frozen_replicated, patterns):
        if not any(pat.search(n) for n in names):
            raise UserError(f"model.frozen_replicated: {r!r} matches no parameter of the base "
                            f"(paths look like {names[0]!r})")
    return jax.tree_util.tree_map_with_path(
        lambda path, sh, w: w if any(p.search(_path(path)) for p in patterns) else sh, out, whole)


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _rule(pure_shardings):
    """A `(path, shape) -> Sharding` rule for `checkpoint.load_*(..., sharding=)`: the stored weights
    are restored straight into the models' shardings."""
    table = {_path(path): sh for path, sh in jax.tree_util.tree_flatten_with_path(pure_shardings)[0]}
    return lambda path, shape: table["/".join(str(p) for p in path)]


def _abstract(make):
    graphdef, state = nnx.split(nnx.eval_shape(make))
    return graphdef, state


def with_shardings(abstract_state, shardings):
    """Pure dict of ShapeDtypeStructs carrying their shardings."""
    pure = nnx.to_pure_dict(abstract_state)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), pure, shardings)


def build(cfg: TrainConfig, mesh, *, abstract: bool = False, log=print, base_config: FluxConfig | None = None) -> Models:
    """Base, VAE, text conditioning and a fresh adapter (from base double block 0 and the empty prompt).

    `base_config` replaces the resolved base config (abstract variants for FLOP counting only).
    """
    base_cfg, vae_cfg, text_len, random_weights = resolve_configs(cfg)
    if base_config is not None:
        if not abstract:
            raise ValueError("build: base_config overrides are for abstract models only")
        base_cfg = base_config
    adapter_make = lambda: FluxIR(cfg.adapter, base_cfg, rngs=nnx.Rngs(cfg.seed))  # noqa: E731
    base_gd, base_abs = _abstract(lambda: Flux(base_cfg, rngs=nnx.Rngs(cfg.seed)))
    vae_gd, vae_abs = _abstract(lambda: AutoEncoder(vae_cfg, rngs=nnx.Rngs(cfg.seed + 1)))
    adapter_gd, adapter_abs = _abstract(adapter_make)
    check_compatible(nnx.eval_shape(adapter_make), base_cfg, text_len)
    models = Models(base_cfg, vae_cfg, base_gd, vae_gd, adapter_gd, base_abs, vae_abs, adapter_abs,
                    base_shardings(base_abs, mesh, cfg.model), _pure_shardings(vae_abs, mesh, frozen_rules(cfg.model)),
                    _pure_shardings(adapter_abs, mesh),
                    random_weights, text_len)
    if abstract:
        return models
    rep = parallel.replicated(mesh)
    if random_weights:
        log(f"base: preset {cfg.base!r} with RANDOM weights (seed {cfg.seed})")
        base = jax.jit(lambda: nnx.to_pure_dict(nnx.split(Flux(base_cfg, rngs=nnx.Rngs(cfg.seed)))[1]),
                       out_shardings=models.base_sh)()
        vae = jax.jit(lambda: nnx.to_pure_dict(nnx.split(AutoEncoder(vae_cfg, rngs=nnx.Rngs(cfg.seed + 1)))[1]),
                      out_shardings=models.vae_sh)()
        k1, k2 = jax.random.split(jax.random.key(cfg.seed + 2))
        txt = jax.device_put(jax.random.normal(k1, (text_len, base_cfg.context_in_dim), jnp.float32), rep)
        y = jax.device_put(jax.random.normal(k2, (base_cfg.vec_in_dim,), jnp.float32), rep)
    else:
        over = dict(dtype=base_cfg.dtype, param_dtype=base_cfg.param_dtype, remat_policy=base_cfg.remat_policy,
                    keep_gelu_grad=base_cfg.keep_gelu_grad, attention=base_cfg.attention)
        base = nnx.to_pure_dict(nnx.split(checkpoint.load_flux(cfg.base, mesh=mesh, sharding=_rule(models.base_sh),
                                                                **over))[1])
        vae = nnx.to_pure_dict(nnx.split(checkpoint.load_autoencoder(
            cfg.base, mesh=mesh, sharding=_rule(models.vae_sh), dtype=vae_cfg.dtype, param_dtype=vae_cfg.param_dtype))[1])
        text = checkpoint.load_text_embeddings(cfg.base)
        if not text["computed"]:
            log(f"base: {cfg.base} stores no computed empty-prompt embeddings (zeros / random)")
        txt = jax.device_put(jnp.asarray(text["txt"], jnp.float32), rep)
        y = jax.device_put(jnp.asarray(text["y"], jnp.float32), rep)

    from fluxir_jax.train import merge_pure

    def make_adapter(base_pure, txt, y):
        base_mod = merge_pure(base_gd, base_abs, base_pure)
        adapter = adapter_make()
        adapter.init_from_base(base_mod, txt, y)
        return nnx.to_pure_dict(nnx.split(adapter)[1])

    adapter = jax.jit(make_adapter, out_shardings=models.adapter_sh)(base, txt, y)
    models.base, models.vae, models.adapter, models.txt, models.y = base, vae, adapter, txt, y
    return models

