"""The layout of the epcli.report package: the module map in its docstring is the real one (every module listed,
each importing only modules listed above it), every public name of a module is reachable from epcli.report,
and importing the package loads none of the heavy libraries (torch, matplotlib, rich, numpy): those are
imported where a report draws or prints."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import epcli.report as R

PACKAGE = Path(R.__file__).parent


def module_map() -> list[str]:
    """The module names of the package docstring's map, in its order."""
    doc = R.__doc__.split("The modules, each importing only those above it:")[1]
    return re.findall(r"^    ([a-z_]+)\s{2,}\S", doc, flags=re.M)


def imports_of(name: str) -> set[str]:
    """The package modules a module imports (by its source: the code, not a docstring's word for it)."""
    tree = ast.parse((PACKAGE / f"{name}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("epcli.report."):
            out.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[2] for a in node.names if a.name.startswith("epcli.report."))
    return out


def test_module_map_lists_every_module_in_import_order():
    order = module_map()
    files = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert sorted(order) == files
    for i, name in enumerate(order):
        later = imports_of(name) - set(order[:i])
        assert not later, f"{name} imports {sorted(later)}, listed after it (or not at all) in the module map"


def test_every_public_name_is_reachable_from_the_package():
    for name in module_map():
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        defined = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        defined += [t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                    if isinstance(t, ast.Name)]
        module = sys.modules[f"epcli.report.{name}"]
        for attr in (a for a in defined if not a.startswith("_")):
            assert getattr(R, attr, None) is getattr(module, attr), f"epcli.report.{attr} (from {name}.py)"
            assert attr in R.__all__, attr


def test_importing_the_package_loads_no_heavy_library():
    code = ("import sys, epcli.report; "
            "print(sorted(m for m in ('torch', 'matplotlib', 'rich', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
