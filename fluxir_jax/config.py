"""Typed configs: dataclasses filled from YAML files, plus `key.sub=value` overrides.

Configs are data: a YAML file (or dict) is validated into a (possibly nested) dataclass, unknown
keys are errors, values are coerced to the annotated field types, and the resolved config can
be written back beside any output (`dump`).

    cfg = load(FluxConfig, "configs/models/flux-dev.yaml", overrides=["depth=2"])
"""
from __future__ import annotations

import dataclasses
import pathlib
import types
import typing
from typing import Any, Mapping, Sequence, TypeVar

import yaml

from fluxir_jax.errors import UserError

T = TypeVar("T")


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Coerce `value` to the annotated type `tp` (dataclass, tuple, list, Optional, scalars)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except (UserError, TypeError, ValueError):
                continue
        raise UserError(f"config field {where}: {value!r} does not fit {tp}")
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, Mapping):
            raise UserError(f"config field {where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, _prefix=f"{where}.")
    if origin in (tuple, list, Sequence) or tp in (tuple, list):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config field {where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise UserError(f"config field {where}: expected {len(args)} items, got {len(value)}")
            out = [_coerce(a, v, where) for a, v in zip(args, value)]
        else:
            elt = args[0] if args else Any
            out = [_coerce(elt, v, where) for v in value]
        return tuple(out) if (origin is tuple or tp is tuple) else list(out)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise UserError(f"config field {where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"config field {where}: {value!r} is not one of {list(args)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"config field {where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise UserError(f"config field {where}: expected {tp.__name__}, got {value!r}")
        try:
            v = tp(value) if not isinstance(value, str) else tp(yaml.safe_load(value))
        except (TypeError, ValueError):
            raise UserError(f"config field {where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != int(value):
            raise UserError(f"config field {where}: expected an integer, got {value!r}")
        return v
    if tp is str:
        return str(value)
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], _prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys raise `UserError`."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"unknown config key {_prefix}{unknown[0]} for {cls.__name__} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(hints[k], v, f"{_prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise UserError(f"config {cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> dict:
    """A plain, YAML-serialisable dict (tuples become lists, dtypes become names)."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def apply_overrides(cfg: T, overrides: Sequence[str]) -> T:
    """Return a copy of `cfg` with `key.sub=value` overrides applied (values parsed as YAML)."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for i, p in enumerate(parts[:-1]):
            if not isinstance(node, dict) or p not in node:
                raise UserError(f"unknown config key {'.'.join(parts[: i + 1])} in override {item!r}")
            node = node[p]
        if not isinstance(node, dict) or parts[-1] not in node:
            raise UserError(f"unknown config key {key} in override {item!r}")
        node[parts[-1]] = yaml.safe_load(raw)
    return from_dict(type(cfg), data)


def read_yaml(path: str | pathlib.Path) -> dict:
    """The mapping in a YAML config file (UserError if missing, invalid, or not a mapping)."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, Mapping):
        raise UserError(f"config file {p} must hold a mapping at the top level")
    return dict(data)


def load(cls: type[T], path: str | pathlib.Path | None = None, overrides: Sequence[str] = (), base: T | None = None) -> T:
    """Load `cls` from a YAML file (or start from `base`/defaults), then apply overrides."""
    if path is not None:
        cfg = from_dict(cls, read_yaml(path))
    elif base is not None:
        cfg = base
    else:
        cfg = cls()
    return apply_overrides(cfg, overrides) if overrides else cfg


def dump(cfg: Any, path: str | pathlib.Path) -> None:
    """Write the resolved config as YAML (atomically: temp file, then rename)."""
    from fluxir_jax import fileio

    fileio.write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
