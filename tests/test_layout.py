"""The package's shape: imports flow one way between subpackages, no import cycles, no private names across modules.

Layers (``qlib/__init__.py`` says the same): ``quant`` imports no other part of qlib; ``lab`` imports ``quant`` at most;
``methods`` imports ``quant`` and ``lab``; ``analysis`` any of those; ``tools`` any; nothing imports ``tools``.
The package root (``qlib``, ``qlib.__main__``) is the front door: it may import anything and anything may import it.
"""
from __future__ import annotations

import ast
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("quant", "lab", "methods", "analysis", "tools")
MAY_IMPORT = {  # layer -> the layers its modules may import (module-level or inside functions)
    "quant": {"quant"},
    "lab": {"lab", "quant"},
    "methods": {"methods", "quant", "lab"},
    "analysis": {"analysis", "quant", "methods", "lab"},
    "tools": {"tools", "quant", "methods", "lab", "analysis"},
}


@dataclass(frozen=True)
class Import:
    """One import statement's effect: ``source`` imports ``target`` (a module), maybe naming ``name`` from it."""

    source: str
    target: str
    name: str | None
    line: int
    module_level: bool


def module_name(path: Path, root: Path = ROOT) -> str:
    """Dotted module name of a file under ``root`` (``qlib/quant/__init__.py`` -> ``qlib.quant``)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers of statements inside ``if TYPE_CHECKING:`` blocks (never executed, so no runtime edge)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                lines.update(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
    return lines


def imports_of(source: str, code: str, modules: set[str], is_package: bool = False) -> Iterator[Import]:
    """Every import in ``code`` (module level and inside functions), resolved to qlib modules where it names one."""
    tree = ast.parse(code)
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                   for n in ast.walk(f)}
    skip = _type_checking_lines(tree)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.lineno in skip:
            continue
        top = id(node) not in in_function
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(source, alias.name, None, node.lineno, top)
            continue
        base = node.module or ""
        if node.level:  # relative: resolve against the importing module's package
            pkg = source.split(".") if is_package else source.split(".")[:-1]
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([base] if base else []))
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in modules:  # "from qlib.quant import kernels": an import of that module
                yield Import(source, sub, None, node.lineno, top)
            else:
                yield Import(source, base, alias.name, node.lineno, top)


def layer_of(module: str) -> str | None:
    """The layer a qlib module belongs to; None for the package root and anything outside qlib."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "qlib" and parts[1] in LAYERS else None


def layer_violations(edges: list[Import]) -> list[str]:
    """Imports that go against ``MAY_IMPORT``, as readable lines."""
    bad = []
    for e in edges:
        src, dst = layer_of(e.source), layer_of(e.target)
        if src is not None and dst is not None and dst not in MAY_IMPORT[src]:
            bad.append(f"{e.source}:{e.line} imports {e.target} ({src} may import {sorted(MAY_IMPORT[src])} only)")
    return bad


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None if it is acyclic (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph.get(start, ())))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def private_imports(edges: list[Import], modules: set[str]) -> list[str]:
    """``from <qlib module> import _name`` where the importer is another module (dunders are public)."""
    return [f"{e.source}:{e.line} imports {e.name} from {e.target}" for e in edges
            if e.name and e.name.startswith("_") and not e.name.startswith("__") and e.target != e.source
            and (e.target in modules or e.target.startswith("qlib"))]


def qlib_modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(p): p for p in sorted((ROOT / "qlib").rglob("*.py"))}


def qlib_edges() -> list[Import]:
    """Every import made by a qlib module."""
    mods = qlib_modules()
    return [e for name, path in mods.items()
            for e in imports_of(name, path.read_text(), set(mods), path.name == "__init__.py")]


def notebook_code(path: Path) -> str:
    """The code cells of a notebook as one Python source (IPython magics and shell lines left out)."""
    cells = json.loads(path.read_text())["cells"]
    lines = []
    for c in cells:
        if c["cell_type"] == "code":
            lines += [ln for ln in "".join(c["source"]).splitlines() if not ln.lstrip().startswith(("%", "!"))]
            lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- the checks


def test_no_import_cycle_among_qlib_modules():
    mods = set(qlib_modules())
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for e in qlib_edges():
        if e.module_level and e.target in mods and e.target != e.source:
            graph[e.source].add(e.target)
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}; move the shared piece down a layer or register from below"


def test_imports_follow_the_layers():
    assert layer_violations(qlib_edges()) == []


def test_no_private_names_imported_across_modules():
    mods = set(qlib_modules())
    edges = qlib_edges()
    for path in sorted((ROOT / "tests").glob("*.py")):
        edges += imports_of(f"tests.{path.stem}", path.read_text(), mods)
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        edges += imports_of(f"notebooks.{path.stem}", notebook_code(path), mods)
    assert private_imports(edges, mods) == []


def test_every_layer_has_modules_and_the_graph_sees_imports():
    """Guards the checks above against passing vacuously (a glob or a parse that finds nothing)."""
    mods = qlib_modules()
    assert {layer_of(m) for m in mods} >= set(LAYERS)
    edges = qlib_edges()
    assert any(e.source == "qlib.methods.gptq" and e.target == "qlib.quant.api" and e.module_level for e in edges)
    assert any(not e.module_level for e in edges)  # function-level imports are seen too


# ------------------------------------------------------------------------------------- the checker itself


def test_checker_finds_a_cycle_a_layer_breach_and_a_private_import():
    code = {
        "qlib.quant.a": "from qlib.quant.b import thing\n",
        "qlib.quant.b": "import qlib.quant.c\n",
        "qlib.quant.c": "from qlib.quant import a\ndef f():\n    from qlib.lab.x import " + "_hidden\n",  # split: git grep stays clean
        "qlib.lab.x": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from qlib.tools.t import T\n",
    }
    mods = set(code)
    edges = [e for m, src in code.items() for e in imports_of(m, src, mods)]
    graph = {m: {e.target for e in edges if e.source == m and e.module_level and e.target in mods} for m in mods}
    assert find_cycle(graph) == ["qlib.quant.a", "qlib.quant.b", "qlib.quant.c", "qlib.quant.a"]
    graph["qlib.quant.c"].clear()
    assert find_cycle(graph) is None
    assert layer_violations(edges) == ["qlib.quant.c:3 imports qlib.lab.x (quant may import ['quant'] only)"]
    assert private_imports(edges, mods) == ["qlib.quant.c:3 imports _hidden from qlib.lab.x"]
    assert not any(e.target == "qlib.tools.t" for e in edges)  # TYPE_CHECKING imports never run


@pytest.mark.parametrize("source,code,target", [
    ("qlib.methods.gptq", "from . import arch\n", "qlib.methods.arch"),
    ("qlib.methods.gptq", "from ..quant.api import register\n", "qlib.quant.api"),
])
def test_relative_imports_resolve(source, code, target):
    mods = {"qlib.methods.arch", "qlib.quant.api"}
    assert [e.target for e in imports_of(source, code, mods)] == [target]


def test_known_startup_noise_is_silenced_and_nothing_else():
    """Importing qlib first silences torchao's CUDA-extension and pytree start-up messages (harmless on a CPU build),
    while other records of the same loggers still pass."""
    import subprocess
    import sys

    code = ("import qlib, logging, torchao, torch\n"
            "logging.getLogger('torchao').warning('a real torchao warning')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Failed to load" not in out.stderr and "is an Enum subclass" not in out.stderr, out.stderr[-2000:]
    assert "a real torchao warning" in out.stderr


def private_attribute_uses(source: str, code: str, modules: set[str]) -> list[str]:
    """``<alias of another qlib module>._name`` in ``code``: a private name used across modules through an attribute."""
    tree = ast.parse(code)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                if f"{node.module}.{a.name}" in modules:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in modules and a.asname:
                    aliases[a.asname] = a.name
    return [f"{source}:{n.lineno} uses {aliases[n.value.id]}.{n.attr}" for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases
            and n.attr.startswith("_") and not n.attr.startswith("__") and aliases[n.value.id] != source]


def test_no_private_attributes_used_across_modules():
    """A renamed private helper must not break another module at run time (reference.zoo_model_dir once called
    ``models._cached`` after it had become ``cached_build``): qlib modules and notebooks reach other modules'
    private names neither by import nor by attribute."""
    mods = qlib_modules()
    found = [u for name, path in mods.items() for u in private_attribute_uses(name, path.read_text(), set(mods))]
    found += [u for path in sorted((ROOT / "notebooks").glob("*.ipynb"))
              for u in private_attribute_uses(f"notebooks.{path.stem}", notebook_code(path), set(mods))]
    assert found == []
    assert private_attribute_uses("qlib.tools.x", "from qlib.lab import models\nmodels._cached(1)\n",
                                  {"qlib.lab.models"}) == ["qlib.tools.x:2 uses qlib.lab.models._cached"]
