"""Nested dicts <-> flat {path: leaf} dicts, and strict loading of flat arrays into NNX models.

Every loader of weights into a model goes through `fill_state` / `load_into`: a key the model
does not have, a model parameter the weights do not provide, or a shape mismatch raises
`UserError` naming the key (in the source's own naming when `name` is given).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import numpy as np

from fluxir_jax.errors import UserError

Path = tuple[Any, ...]


def path_str(path: Path, sep: str = ".") -> str:
    return sep.join(str(p) for p in path)


def flatten(tree: Mapping, prefix: Path = ()) -> Iterator[tuple[Path, Any]]:
    """(path tuple, leaf) of every non-dict value of a nested dict, in insertion order."""
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def unflatten(flat: Mapping[Path | str, Any], sep: str = ".") -> dict:
    """Nested dict from {path tuple or `sep`-joined string: leaf}."""
    tree: dict = {}
    for key, leaf in flat.items():
        path = tuple(key.split(sep)) if isinstance(key, str) else tuple(key)
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"key {key!r} nests under a leaf")
        node[path[-1]] = leaf
    return tree


def fill_state(model: Any, flat: Mapping[Path | str, Any], source: str = "weights", *, var_filter: Any = ...,
               name: Callable[[Path], str] | None = None):
    """(graphdef, state) of `model` (abstract from nnx.eval_shape, or concrete) with the variables
    selected by `var_filter` (default: all) taken from `flat` and cast to each variable's dtype.

    `flat` is keyed by path tuples or dotted strings (`visual.layer1.0.conv1.kernel`). Scalars
    stored as one-element arrays are accepted. `name(path)` spells a key in error messages.
    """
    import jax.numpy as jnp
    from flax import nnx

    if var_filter is ...:
        (graphdef, state), rest = nnx.split(model), []
    else:
        graphdef, state, *rest = nnx.split(model, var_filter, ...)
    spell = name or path_str
    by_str = {(k if isinstance(k, str) else path_str(k)): v for k, v in flat.items()}
    out, seen = [], set()
    for path, var in nnx.to_flat_state(state):
        key = path_str(path)
        want = var.get_value()
        if key not in by_str:
            raise UserError(f"{source}: missing key {spell(tuple(path))!r}")
        arr = np.asarray(by_str[key])
        if want.shape == () and arr.size == 1:
            arr = arr.reshape(())
        if tuple(arr.shape) != tuple(want.shape):
            raise UserError(f"{source}: key {spell(tuple(path))!r} has shape {list(arr.shape)}, "
                            f"expected {list(want.shape)}")
        out.append((path, var.replace(jnp.asarray(arr, dtype=want.dtype))))
        seen.add(key)
    extra = [k for k in by_str if k not in seen]
    if extra:
        k = next(key for key in flat if (key if isinstance(key, str) else path_str(key)) == extra[0])
        raise UserError(f"{source}: unexpected key {spell(tuple(k.split('.')) if isinstance(k, str) else k)!r}")
    return (graphdef, nnx.from_flat_state(out), *rest)


def load_into(model: Any, flat: Mapping[Path | str, Any], source: str = "weights", *,
              name: Callable[[Path], str] | None = None) -> Any:
    """A concrete model equal to `model` with every `nnx.Param` from `flat` (see `fill_state`);
    other variables (RNG state, buffers) are kept from `model`."""
    from flax import nnx

    graphdef, params, rest = fill_state(model, flat, source, var_filter=nnx.Param, name=name)
    return nnx.merge(graphdef, params, rest)
