"""Package structure: the library never imports the converter, no import cycles, the converter's
installed name, and a repository that needs nothing outside itself."""
from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {"fluxir_jax": ROOT / "fluxir_jax", "fluxir_convert": ROOT / "convert"}   # import name -> folder
CONVERTER = ("fluxir_convert", "convert")       # its installed name, and the folder name it must not be imported by


def _module_name(package: str, folder: pathlib.Path, path: pathlib.Path) -> str:
    parts = list(path.relative_to(folder).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(pkg, folder, p): p for pkg, folder in PACKAGES.items() for p in sorted(folder.rglob("*.py"))}


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """Every module `name` imports anywhere in its file (top level, inside functions, under
    TYPE_CHECKING): absolute names, relative imports resolved."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)   # `from pkg import module`
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = {d for d in _imports(name, path) if d in modules and d != name}
        # importing a.b.c also runs a/__init__ and a/b/__init__, which import nothing here (checked below)
        graph[name] = deps
    return graph


def test_library_never_imports_the_converter():
    bad = []
    for name, path in _modules().items():
        if not name.startswith("fluxir_jax"):
            continue
        for dep in _imports(name, path):
            if dep.split(".")[0] in CONVERTER:
                bad.append(f"{name} imports {dep}")
    assert not bad, bad
    # and nothing names the converter by its folder name (it is installed as fluxir_convert)
    for name, path in _modules().items():
        assert not [d for d in _imports(name, path) if d.split(".")[0] == "convert"], name


def test_no_import_cycles():
    graph = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):                                 # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, cycles
    assert len(graph) > 40          # the walk saw the packages


# A leaf that must run before JAX starts (libtpu's environment); it imports nothing of ours.
INIT_ALLOWED = {"fluxir_jax.libtpu_env"}


def test_package_inits_import_nothing_of_ours():
    modules = _modules()
    for name in INIT_ALLOWED:
        assert not [d for d in _imports(name, modules[name]) if d.split(".")[0] in PACKAGES], name
    for name, path in modules.items():
        if path.name == "__init__.py":
            assert not [d for d in _imports(name, path) if d.split(".")[0] in PACKAGES and not any(d == a or d.startswith(a + ".") for a in INIT_ALLOWED)], name


def test_converter_installs_under_its_own_name(tmp_path):
    """`convert` is a name taken on PyPI: outside the repository it must not import; fluxir_convert does."""
    def run(code):
        return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)

    r = run("import convert")
    assert r.returncode != 0 and "No module named 'convert'" in r.stderr, r.stderr
    r = run("import fluxir_convert.cli, fluxir_convert.iqa, fluxir_convert.convert; print(fluxir_convert.__file__)")
    assert r.returncode == 0, r.stderr
    assert pathlib.Path(r.stdout.strip()).parent == ROOT / "convert"


def test_repository_needs_nothing_outside_itself():
    """No test, package module, config or document points at the scratch folder beside the repository."""
    pattern = re.compile(r"\.\./" + "shared|" + "shared" + "/")
    files = [p for top in ("tests", "fluxir_jax", "convert", "configs", "bench") for p in (ROOT / top).rglob("*")
             if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".yml", ".txt", ".cfg", ".toml", ".sh")]
    files += [ROOT / n for n in ("README.md", "Makefile", "setup.cfg", "pyproject.toml")]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert not hits, hits
    assert len(files) > 50
    # nor names the project's notes kept beside the repository
    notes = re.compile(r"(?<!docs/)\b(paper|design|env)\.md\b")  # docs/paper.md is ours
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files if p.suffix == ".py" and p.name != "test_layering.py"
            for i, line in enumerate(p.read_text().splitlines(), 1) if notes.search(line)]
    assert not hits, hits
