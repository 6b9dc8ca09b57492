"""The layering rules of ../shared/ARCHITECTURE.md, checked on the source.

Every folder (or top-level module) of the package has a layer in :data:`LAYERS`; a module
may import modules of its own layer or below, never above. ``ray`` is imported in
``execution/`` only, no two modules import each other (directly or around a loop), argparse
lives in ``cli.py`` only, ``jobs`` runs the driver (not the CLI), ``import soupsearch`` loads no
strategy, Ray, MLflow or Optuna, the package's top holds at most 8 modules, and plugin
folders keep their machinery in ``_``-prefixed files."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "soupsearch"
MAX_LINES = 450

# folder (or top-level module) -> layer; a module imports its own layer or lower ones only
LAYERS = {
    "errors": 0, "util": 0,                      # the root exception; file, name and log guards
    "data": 1, "models": 1, "ingredients": 1,    # what goes in: datasets, architectures, checkpoints
    "merging": 2, "evaluation": 2,               # pure torch: recipes and methods; scoring a shard
    "strategies": 3,                             # propose recipes through the SearchContext protocol
    "config": 4,                                 # validation reads the strategies' metadata
    "execution": 5,                              # Ray: pools, holders, planning, store, cluster
    "search": 6, "tracking": 6, "reporting": 6,  # the driver and what it writes and shows
    "sweeps": 6, "config_data": 4,
    "cli": 7, "jobs": 7, "__init__": 7,          # entry points and the public API
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _files() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


MODULES = {_module_name(p): p for p in _files()}


def _imports(path: Path, module: str | None = None) -> tuple[set[str], set[str]]:
    """``(soupsearch modules, other top-level packages)`` imported anywhere in ``path`` (the
    module ``module``, default: its place in the package), function bodies included; a name
    imported from a package that is a module counts as that module."""
    tree = ast.parse(path.read_text())
    module = module or _module_name(path)
    me = module.split(".")
    pkg = me if path.name == "__init__.py" else me[:-1]
    mods, ext = set(), set()

    def add(name: str, names=()):
        if name == "soupsearch" or name.startswith("soupsearch."):
            rest = name.split(".")[1:]
            base = ".".join(rest)
            for n in names:
                sub = f"{base}.{n}" if base else n
                if sub in MODULES:
                    mods.add(sub)
                    continue
                mods.add(base or "__init__")
            if not names:
                mods.add(base or "__init__")
        else:
            ext.add(name.split(".")[0])

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)]
                name = ".".join(["soupsearch", *base, *(node.module.split(".") if node.module else [])])
            else:
                name = node.module or ""
            add(name, [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
    return mods - {module}, ext


def _layer(module: str) -> int:
    top = module.split(".")[0]
    assert top in LAYERS, f"soupsearch/{top} has no layer in LAYERS: add it"
    return LAYERS[top]


def test_every_folder_has_a_layer():
    tops = {p.relative_to(PKG).parts[0].removesuffix(".py") for p in _files()}
    assert tops <= set(LAYERS), f"no layer for {sorted(tops - set(LAYERS))}"


def _violations(name: str, f: Path) -> list[str]:
    mine = _layer(name)
    return [f"{name} (layer {mine}) imports soupsearch.{imp} (layer {_layer(imp)})"
            for imp in sorted(_imports(f, name)[0]) if _layer(imp) > mine]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(v, stack):
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                cycles.append(stack[stack.index(w):] + [w])
            elif w not in state:
                visit(w, stack)
        stack.pop()
        state[v] = 2

    for v in sorted(graph):
        if v not in state:
            visit(v, [])
    return cycles


def test_no_module_imports_a_layer_above_it():
    bad = [v for name, f in MODULES.items() for v in _violations(name, f)]
    assert not bad, "\n".join(bad)


def test_ray_only_in_execution():
    users = sorted(str(f.relative_to(PKG)) for f in _files() if "ray" in _imports(f)[1])
    assert users and all(u.startswith("execution/") for u in users), users


def test_no_import_cycles():
    graph = {name: {m for m in _imports(f)[0] if m in MODULES} for name, f in MODULES.items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_see_a_violation_and_a_cycle(tmp_path):
    """The checks above can fail: an upward import (lazy, inside a function), a relative one,
    ``ray`` outside execution/ and a two-module loop are all reported."""
    bad = tmp_path / "fake.py"
    bad.write_text("def f():\n    from soupsearch.search.driver import run_search\n    import ray\n"
                   "from ..reporting import tables\n")
    found = _violations("util.fake", bad)
    assert any("search.driver" in v for v in found) and any("reporting.tables" in v for v in found), found
    assert "ray" in _imports(bad, "util.fake")[1]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_at_most_eight_modules_at_the_top():
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= 8, top


def test_plugin_machinery_files_start_with_an_underscore():
    """In plugin folders every module is a plugin except the ``_``-prefixed machinery, which the
    registries skip: each public module registers at least one plugin."""
    from soupsearch.merging.methods import _REGISTRY as methods
    from soupsearch.merging.methods import list_methods
    from soupsearch.strategies import _REGISTRY as strategies
    from soupsearch.strategies import list_strategies

    list_methods(), list_strategies()
    for folder, registry in (("merging/methods", methods), ("strategies", strategies)):
        owners = {cls.__module__.rsplit(".", 1)[-1] for cls in registry.values()}
        public = {p.stem for p in (PKG / folder).glob("*.py") if not p.name.startswith("_")}
        assert public == owners, f"{folder}: modules without a plugin {sorted(public - owners)}"
        assert not any(o.startswith("_") for o in owners), owners


def test_strategies_see_only_the_context_protocol():
    """No strategy imports the driver, the execution layer or MLflow."""
    bad = []
    for f in (PKG / "strategies").rglob("*.py"):
        mods, ext = _imports(f)
        hit = {m for m in mods if _layer(m) > LAYERS["strategies"]} | (ext & {"ray", "mlflow"})
        if hit:
            bad.append(f"{f.relative_to(PKG)} imports {sorted(hit)}")
    assert not bad, "\n".join(bad)


def test_argparse_only_in_cli_and_jobs_does_not_import_cli():
    users = [f.relative_to(PKG).as_posix() for f in _files() if "argparse" in _imports(f)[1]]
    assert users == ["cli.py"], users
    assert "cli" not in _imports(PKG / "jobs.py")[0]


def test_modules_stay_small():
    big = {f.relative_to(PKG).as_posix(): n for f in _files() if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"
    assert len((PKG / "search" / "driver.py").read_text().splitlines()) <= 350


def test_import_soupsearch_loads_no_strategy_and_no_ray():
    code = ("import soupsearch, sys; print(sorted(m for m in sys.modules if m.startswith('soupsearch.strategies') "
            "or m == 'ray' or m == 'mlflow' or m == 'optuna'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


@pytest.mark.parametrize("path", ["errors.py"])
def test_exceptions_declare_their_fields(path):
    """No exception gets attributes attached after it was created (``err.x = ...``)."""
    bad = []
    for f in _files():
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    if (isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in ("err", "e", "exc")
                            and not (isinstance(node.value, ast.Constant))):
                        bad.append(f"{f.relative_to(PKG)}:{node.lineno} sets {t.value.id}.{t.attr}")
    assert not bad, "\n".join(bad)
