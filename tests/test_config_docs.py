"""docs/config.md is generated from the config dataclasses, and every field is documented."""
from __future__ import annotations

import dataclasses
import pathlib

import pytest

from fluxir_jax import config_docs as cd

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class _Inner:
    """Inner part.

    depth          how deep
    lo, hi
                   the two ends of a range,
                   over two lines
    """

    depth: int = 2
    lo: float = 0.5
    hi: float = 1.0 / 3.0  # exclusive


@dataclasses.dataclass
class _Outer:
    """Outer settings."""

    name: str = ""  # a trailing comment
    # a comment above
    # on two lines
    size: int | None = None
    mode: tuple[str, ...] = ("a", "b")
    """An attribute docstring."""
    inner: _Inner = dataclasses.field(default_factory=lambda: _Inner(depth=5))  # the inner part


@dataclasses.dataclass
class _Undocumented:
    """Has a field without a meaning."""

    ok: int = 1  # documented
    bare: int = 2
    flag: bool = False


def test_every_registered_field_is_documented():
    for section in cd.registry():
        table, missing = cd.rows(section.cls)
        assert table and not missing, (section.title, missing)


def _leaf_keys(cfg, prefix: str = "") -> list[str]:
    """Dotted keys of a config's values (a nested dataclass is a section; a dict field is one value)."""
    import dataclasses

    out = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out += _leaf_keys(v, f"{prefix}{f.name}.") if dataclasses.is_dataclass(v) else [prefix + f.name]
    return out


@pytest.mark.parametrize("module, name", [("fluxir_jax.train_config", "TrainConfig"),
                                          ("fluxir_jax.fluxgen_config", "GenConfig"),
                                          ("fluxir_jax.restore", "RestoreConfig")])
def test_job_configs_list_every_override_key(module, name):
    """Each job's config is registered, and its table has exactly the keys a `key.sub=value` override accepts."""
    import importlib

    cls = getattr(importlib.import_module(module), name)
    section = next(s for s in cd.registry() if s.cls is cls)
    table, missing = cd.rows(section.cls)
    assert not missing
    leaves = [r.key for r in table if r.default]  # nested-dataclass header rows have no default
    assert leaves == _leaf_keys(cls())
    text = cd.render([section])
    for key in leaves:
        assert f"| `{key}` |" in text
    # the default shown is the dataclass default (a changed default is a drift)
    row = {r.key: r for r in table}
    first = leaves[-1]
    value = cls()
    for part in first.split("."):
        value = getattr(value, part)
    assert row[first].default == cd.value_text(value)


def test_docs_config_md_matches_the_dataclasses():
    expected = cd.render()
    current = (ROOT / "docs" / "config.md").read_text()
    assert current == expected, "docs/config.md is stale: run `python -m fluxir_jax.config_docs --write`"


def test_every_source_of_meaning_is_read_and_nested_fields_are_dotted():
    table, missing = cd.rows(_Outer)
    assert not missing
    got = {r.key: r for r in table}
    assert list(got) == ["name", "size", "mode", "inner", "inner.depth", "inner.lo", "inner.hi"]
    assert got["name"] == cd.Row("name", "str", '""', "a trailing comment")
    assert got["size"] == cd.Row("size", "int | None", "null", "a comment above on two lines")
    assert got["mode"] == cd.Row("mode", "tuple[str, ...]", "[a, b]", "An attribute docstring.")
    assert got["inner"].type == "_Inner" and got["inner"].meaning == "the inner part"
    assert got["inner.depth"].default == "5"  # the outer default instance's value, not _Inner's own
    assert got["inner.lo"].meaning == "the two ends of a range, over two lines"
    # docstring entry and trailing comment are both kept; long floats shortened
    assert got["inner.hi"] == cd.Row("inner.hi", "float", "0.333333", "the two ends of a range, over two lines; exclusive")


def test_undocumented_field_fails_and_names_every_one():
    with pytest.raises(cd.UndocumentedFields, match=r"_Undocumented\.bare, _Undocumented\.flag$"):
        cd.render([cd.Section("x", _Undocumented, "nowhere")])


def test_rendered_table_escapes_pipes():
    text = cd.render([cd.Section("Outer", _Outer, "`here`")])
    assert "| `size` | `int \\| None` | `null` | a comment above on two lines |" in text
    assert "## Outer" in text and "Set in: `here`" in text


def test_check_and_write_commands(tmp_path, capsys):
    path = tmp_path / "config.md"
    assert cd.main(["--check", "--path", str(path)]) == 1  # missing
    assert cd.main(["--write", "--path", str(path)]) == 0
    assert cd.main(["--check", "--path", str(path)]) == 0
    path.write_text(path.read_text().replace("| `depth` |", "| `depth_x` |"))
    assert cd.main(["--check", "--path", str(path)]) == 1
    assert "out of date" in capsys.readouterr().err


def test_paper_md_names_only_real_config_keys():
    """docs/paper.md names the field behind every choice; each `key` that looks like one must exist."""
    import re

    keys = set()
    for section in cd.registry():
        for r in cd.rows(section.cls)[0]:
            parts = r.key.split(".")
            keys |= {".".join(parts[i:]) for i in range(len(parts))}  # `optim.lr`, `lr`, nested suffixes
    text = (ROOT / "docs/paper.md").read_text()
    named = {t for t in re.findall(r"`([a-z][a-z0-9_.]*)(?:=[^`]*)?`", text) if "." in t or "_" in t}
    assert len(named) > 40
    assert not sorted(named - keys)
