"""The layering rules of ../shared/ARCHITECTURE.md, checked on the source: arrows point down
(cli -> driver -> strategies / pool -> evaluator -> methods, mixing, ingredients, data,
metrics), argparse only in cli.py, jobs runs the driver (not the CLI), ``import soupsearch``
loads no strategy, modules stay a few hundred lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "soupsearch"
MAX_LINES = 450

# top-level names of soupsearch's modules/packages, by layer (higher imports lower only)
ENTRY = {"cli", "jobs", "__main__"}
# config validation reads the strategies' metadata: the config belongs to the driver's layer
DRIVER = {"search", "context", "launch", "planning", "outcome", "report", "tracking", "compare", "plots",
          "preflight", "runlock", "align_sweep", "sanity", "config",
          "demo", "scratch", "multitask_sweep",  # the sweep builders (`soupsearch sweep ...`)
          "multitask"}  # the multi-task driver package (its config, strategies and evaluator inside it)
STRATEGIES = {"strategies"}
POOL = {"pool", "ray_pool", "group_pool", "raysession", "cluster"}
# everything else (evaluator, group, methods, mixing, ingredients, layout, data, metrics, merge, ...) is below


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    return ".".join(rel.parts)


def _imports(path: Path) -> set[str]:
    """Top-level soupsearch modules imported anywhere in ``path`` (functions included)."""
    tree = ast.parse(path.read_text())
    mod = _module_name(path).split(".")
    pkg_parts = mod[:-1] if path.name != "__init__.py" else mod
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - (node.level - 1)] if node.level > 1 else pkg_parts
                parts = base + (node.module.split(".") if node.module else [])
                if not node.module:  # from . import x, y
                    for a in node.names:
                        full = parts + [a.name]
                        out.add(full[0])
                    continue
            elif node.module and (node.module == "soupsearch" or node.module.startswith("soupsearch.")):
                parts = node.module.split(".")[1:]
            else:
                continue
            if parts:
                out.add(parts[0])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("soupsearch."):
                    out.add(a.name.split(".")[1])
    return out


def _files():
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def _layer(top: str) -> int:
    if top in ENTRY:
        return 4
    if top in DRIVER:
        return 3
    if top in STRATEGIES or top in POOL:
        return 2
    return 1


def test_no_module_imports_a_layer_above_it():
    bad = []
    for f in _files():
        top = _module_name(f).split(".")[0]
        if top == "__init__":  # the package's public API re-exports the lower layer only
            top = "api"
        mine = _layer(top)
        for imp in _imports(f) - {top}:
            if _layer(imp) > mine and imp != "progress":
                bad.append(f"{f.relative_to(PKG)} (layer {mine}) imports soupsearch.{imp} (layer {_layer(imp)})")
    assert not bad, "\n".join(bad)


def test_strategies_see_only_the_context_protocol():
    """No strategy imports the driver, the pool, Ray's side or MLflow's."""
    bad = []
    for f in (PKG / "strategies").rglob("*.py"):
        hit = _imports(f) & (DRIVER | POOL | ENTRY)
        if hit:
            bad.append(f"{f.relative_to(PKG)} imports {sorted(hit)}")
    assert not bad, "\n".join(bad)


def test_argparse_only_in_cli_and_jobs_does_not_import_cli():
    users = [f.relative_to(PKG).as_posix() for f in _files() if "argparse" in f.read_text()]
    assert users == ["cli.py"], users
    assert "cli" not in _imports(PKG / "jobs.py")


def test_modules_stay_small():
    big = {f.relative_to(PKG).as_posix(): n for f in _files() if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"
    assert len((PKG / "search.py").read_text().splitlines()) <= 350


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
