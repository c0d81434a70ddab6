"""The configuration reference, `docs/config.md`, generated from the config dataclasses.

    python -m fluxir_jax.config_docs --check    # exit 1 if docs/config.md differs from the dataclasses
    python -m fluxir_jax.config_docs --write    # regenerate it

`REGISTRY` lists, in order, every config dataclass a user sets (one `Section` each: title,
dataclass, where it is set). Nested dataclass fields are expanded as dotted keys
(`stage1.kernel.sigma_range`), exactly the keys a YAML file or a `key.sub=value` override uses.

A field's meaning is read from the class source; all of these that exist are joined with "; ":
  1. an entry in the class docstring: a line starting with the field name (or several names
     separated by commas) followed by two or more spaces and the text, or by the text on the
     following, further-indented lines:
         dtype          activation / compute dtype
         splash_block_q, splash_block_kv
                        splash tile sizes
  2. a string literal right after the field (attribute docstring);
  3. comment lines directly above the field;
  4. a trailing comment on the field's line:            `seed: int = 0  # base seed`
A field with none of these is an error (`UndocumentedFields`): documenting it is part of adding it.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import math
import pathlib
import re
import sys
import textwrap
import tokenize
import types
import typing
from typing import Any, NamedTuple

DOC_PATH = pathlib.Path(__file__).resolve().parents[1] / "docs" / "config.md"


class Section(NamedTuple):
    title: str
    cls: type
    where: str  # the YAML file(s) / command(s) that set it, markdown


def registry() -> list[Section]:
    """Every user-facing config dataclass, in the order of the reference. Add one line per new config."""
    from fluxir_jax.data.degrade import DegradationConfig
    from fluxir_jax.data.degrade_folder import DegradeFolderConfig
    from fluxir_jax.data.pipeline import PipelineConfig
    from fluxir_jax.fluxgen_config import GenConfig
    from fluxir_jax.models.adapter import FluxIRConfig
    from fluxir_jax.models.autoencoder import AutoEncoderConfig
    from fluxir_jax.models.flux import FluxConfig
    from fluxir_jax.restore import RestoreConfig
    from fluxir_jax.train_config import TrainConfig

    return [
        Section("FLUX transformer", FluxConfig,
                "`configs/models/*.yaml` (presets `flux-dev`, `flux-schnell`, `small`, `tiny`; the defaults below are "
                "flux-dev's shape in float32); stored in every checkpoint's `config.json`; "
                "`fluxir_jax.config.load(FluxConfig, path, overrides)`"),
        Section("FLUX VAE", AutoEncoderConfig,
                "stored in every checkpoint's `config.json` (presets `flux`, `small`, `tiny`); "
                "the tiling fields can be changed when a checkpoint is loaded"),
        Section("FluxIR adapter", FluxIRConfig,
                "stored with every adapter (`fluxir export-adapter` reads it back); set by the training config"),
        Section("Degradation (FluxGen LQ synthesis)", DegradationConfig,
                "`configs/degrade/*.yaml`; `fluxir degrade --config FILE` under `degradation:`; "
                "overrides `key=value` or `degradation.key=value`"),
        Section("`fluxir degrade` job", DegradeFolderConfig,
                "`fluxir degrade --config FILE` (top-level keys); overrides `key=value`"),
        Section("Training input pipeline", PipelineConfig, "`fluxir_jax.data.pipeline` (set by the training job)"),
        Section("`fluxir gen` job (FluxGen)", GenConfig,
                "`configs/gen/*.yaml` (`fluxgen-dev.yaml`: the paper's run; `tiny.yaml`: tests and demo); "
                "`fluxir gen CONFIG [key=value ...]`; `fluxir gen select OUT [key=value ...]` re-reads `select.*` "
                "and `degrade.*`"),
        Section("`fluxir train` job", TrainConfig,
                "`configs/train/*.yaml` (`fluxir-dev.yaml`: the paper's run; `tiny.yaml`: tests and demo); "
                "`fluxir train CONFIG [key=value ...]`; the resolved config is saved as `run_dir/config.yaml`"),
        Section("`fluxir restore` job", RestoreConfig,
                "`configs/restore/default.yaml`; `fluxir restore ... [--config FILE] [key=value ...]`; "
                "`Restorer(checkpoint, adapter, **options)`"),
    ]


class UndocumentedFields(Exception):
    """Config fields without a meaning in their class source."""


# ----------------------------------------------------------------------------- reading the source


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """{field name: meaning} for the fields `cls` itself annotates (inherited ones: see `field_doc`)."""
    src = textwrap.dedent(inspect.getsource(cls))
    node = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef))
    lines = src.splitlines()
    comments: dict[int, tuple[str, bool]] = {}  # line -> (comment text, whole line is the comment)
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            comments[row] = (tok.string.lstrip("#").strip(), not lines[row - 1][:col].strip())
    docstring_entries = _docstring_entries(ast.get_docstring(node) or "")
    out: dict[str, str] = {}
    body = node.body
    for i, stmt in enumerate(body):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        name = stmt.target.id
        found = [docstring_entries.get(name, "")]
        if i + 1 < len(body):
            nxt = body[i + 1]
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                found.append(" ".join(inspect.cleandoc(nxt.value.value).split()))
        above, r = [], stmt.lineno - 1
        while r in comments and comments[r][1]:
            above.insert(0, comments[r][0])
            r -= 1
        found.append(" ".join(above))
        found += [comments[r][0] for r in range(stmt.lineno, stmt.end_lineno + 1) if r in comments and not comments[r][1]]
        text = "; ".join(t for t in found if t)
        if text:
            out[name] = text
    return out


_ENTRY = re.compile(r"^(\s*)([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*)(?:\s{2,}(\S.*))?$")


def _docstring_entries(doc: str) -> dict[str, str]:
    """Field entries of a class docstring (`name   text` lines and their indented continuations)."""
    out: dict[str, str] = {}
    lines = doc.splitlines()
    i = 0
    while i < len(lines):
        m = _ENTRY.match(lines[i])
        if not m or (m.group(3) is None and "," not in m.group(2) and not _continues(lines, i, len(m.group(1)))):
            i += 1
            continue
        indent = len(m.group(1))
        parts = [m.group(3)] if m.group(3) else []
        j = i + 1
        while j < len(lines) and lines[j].strip() and len(lines[j]) - len(lines[j].lstrip()) > indent:
            parts.append(lines[j].strip())
            j += 1
        if parts:
            for name in re.split(r"\s*,\s*", m.group(2)):
                out.setdefault(name, " ".join(parts))
        i = j
    return out


def _continues(lines: list[str], i: int, indent: int) -> bool:
    nxt = lines[i + 1] if i + 1 < len(lines) else ""
    return bool(nxt.strip()) and len(nxt) - len(nxt.lstrip()) > indent


def field_doc(cls: type, name: str) -> str:
    """The meaning of field `name` of `cls`, looked up through the classes that define fields."""
    for klass in cls.__mro__:
        if name in vars(klass).get("__annotations__", {}):
            text = field_docs(klass).get(name, "")
            if text:
                return text
    return ""


# ----------------------------------------------------------------------------- rendering


class Row(NamedTuple):
    key: str
    type: str
    default: str
    meaning: str


def type_name(tp: Any) -> str:
    """A readable annotation: `int`, `tuple[float, float]`, `int | None`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "None"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{name}[{inner}]" if args else name
    return getattr(tp, "__name__", str(tp))


def value_text(v: Any) -> str:
    """A default as YAML-ish text; long floats shortened to 6 significant digits."""
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    if isinstance(v, float):
        r = repr(v)
        return r if len(r) <= 8 or not math.isfinite(v) else format(v, ".6g")
    if isinstance(v, str):
        return f'"{v}"' if v == "" else v
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(value_text(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {value_text(x)}" for k, x in v.items()) + "}"
    return str(v)


def _default_instance(cls: type):
    try:
        return cls()
    except TypeError:
        return None  # required fields: defaults are read per field


def rows(cls: type, instance: Any = None, prefix: str = "") -> tuple[list[Row], list[str]]:
    """(table rows, undocumented `Class.field` names) of `cls`, nested dataclasses expanded."""
    instance = _default_instance(cls) if instance is None else instance
    hints = typing.get_type_hints(cls)
    out, missing = [], []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = prefix + f.name
        meaning = field_doc(cls, f.name)
        if not meaning:
            missing.append(f"{cls.__name__}.{f.name}")
        if instance is not None:
            value = getattr(instance, f.name)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = dataclasses.MISSING
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            out.append(Row(key, tp.__name__, "", meaning))
            sub_rows, sub_missing = rows(tp, None if value is dataclasses.MISSING else value, key + ".")
            out += sub_rows
            missing += sub_missing
        else:
            out.append(Row(key, type_name(tp), "(required)" if value is dataclasses.MISSING else value_text(value), meaning))
    return out, missing


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(sections: list[Section] | None = None) -> str:
    """The whole reference as markdown. Raises `UndocumentedFields` naming every undocumented field."""
    sections = registry() if sections is None else sections
    parts = [
        "# Configuration reference",
        "",
        "Generated from the config dataclasses by `python -m fluxir_jax.config_docs --write`; do not edit by hand "
        "(`make test` fails when this file and the dataclasses differ). Keys are the YAML keys; nested settings use "
        "dotted keys, which is also how a `key.sub=value` override on the command line names them.",
        "",
    ]
    parts += [f"- [{s.title}](#{_anchor(s.title)})" for s in sections]
    all_missing = []
    for s in sections:
        table, missing = rows(s.cls)
        all_missing += missing
        summary = (inspect.getdoc(s.cls) or "").split("\n\n")[0]
        parts += ["", f"## {s.title}", "", f"`{s.cls.__module__}.{s.cls.__qualname__}`: {' '.join(summary.split())}", "",
                  f"Set in: {s.where}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for r in table:
            default = f"`{_cell(r.default)}`" if r.default else ""
            parts.append(f"| `{r.key}` | `{_cell(r.type)}` | {default} | {_cell(r.meaning)} |")
    if all_missing:
        raise UndocumentedFields("config fields without documentation (add a trailing `# comment` or a docstring "
                                 "entry): " + ", ".join(dict.fromkeys(all_missing)))
    return "\n".join(parts) + "\n"


def _anchor(title: str) -> str:
    return re.sub(r"[^\w\- ]", "", title.lower()).strip().replace(" ", "-")


# ----------------------------------------------------------------------------- command


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fluxir_jax.config_docs", description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 if the file differs from the dataclasses")
    mode.add_argument("--write", action="store_true", help="regenerate the file")
    ap.add_argument("--path", type=pathlib.Path, default=DOC_PATH, help=f"the reference file (default {DOC_PATH})")
    args = ap.parse_args(argv)
    try:
        text = render()
    except UndocumentedFields as e:
        print(f"config_docs: error: {e}", file=sys.stderr)
        return 2
    if args.write:
        args.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.path.with_name(args.path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.path)
        print(f"wrote {args.path}")
        return 0
    current = args.path.read_text() if args.path.is_file() else None
    if current != text:
        print(f"config_docs: {args.path} is out of date with the config dataclasses; "
              "run: python -m fluxir_jax.config_docs --write", file=sys.stderr)
        return 1
    print(f"{args.path} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
