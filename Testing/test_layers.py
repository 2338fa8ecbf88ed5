"""The import layering of the shipped code, read from the source (ast; nothing is imported).

Rules (docs/design.md):
- the library never imports training, slicer, qt, ctk or the Slicer module's packages;
- models/ imports, of this project, only errors, vocab and other models/ (pure torch code);
- io/, vocab, weights/ and evaluation/ do not import torch at module load, not even through another module;
- nothing but the console entry point (`CTFoundationLib/__main__.py`) and cli/ itself imports cli/;
- the library's subpackages (and top-level modules) import each other without cycles.
Each rule is also shown to fire on a planted violation.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = "CTFoundationLib"
SHIPPED = ("CTFoundationLib", "CTFoundation", "training")  # folders whose code ships or runs outside the tests
NEVER_IN_LIBRARY = ("training", "slicer", "qt", "ctk", "CTFoundation", "CTFoundationMRML", "CTFoundationChat",
                    "CTFoundationSimilar", "CTFoundationTesting", "vtk")
MODELS_MAY_USE = ("CTFoundationLib.errors", "CTFoundationLib.vocab", "CTFoundationLib.models")
TORCH_FREE = ("CTFoundationLib.io", "CTFoundationLib.vocab", "CTFoundationLib.weights", "CTFoundationLib.evaluation")
HEAVY = ("torch",)
CLI = "CTFoundationLib.cli"
CLI_ENTRY = "CTFoundationLib.__main__"


@dataclass(frozen=True)
class Import:
    module: str  # absolute dotted name as written (for `from X import name`: X.name when that is a module)
    at_load: bool  # at module level (runs on import), not inside a function


def module_name(path: Path) -> str:
    parts = list(path.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if parts[0] == "CTFoundation":
        parts = parts[1:]  # the module and its helper packages sit on Slicer's path as top-level names
    return ".".join(parts)


def read_sources(root: Path = REPO) -> dict[str, str]:
    """Module name -> source of every shipped Python file."""
    sources = {}
    for folder in SHIPPED:
        for path in sorted((root / folder).rglob("*.py")):
            relative = path.relative_to(root)
            sources[module_name(relative)] = path.read_text(encoding="utf-8")
    return sources


def imports_of(name: str, source: str, is_package: bool) -> list[Import]:
    """Every import in a module, relative ones made absolute; `at_load` for those outside function bodies."""
    found: list[Import] = []
    package = name if is_package else name.rpartition(".")[0]

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(alias.name, not in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                found.append(Import(base, not in_function))
                found.extend(Import(f"{base}.{alias.name}", not in_function) for alias in child.names)
            visit(child, inside)

    visit(ast.parse(source), False)
    return found


def resolve(module: str, known: set[str]) -> str | None:
    """The project module an import names (the longest known prefix), or None for third-party code."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def unit(module: str) -> str:
    """The layer a library module belongs to: its subpackage, or itself for a top-level module."""
    parts = module.split(".")
    return ".".join(parts[:2])


def within(module: str, prefixes: tuple[str, ...] | str) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def violations(sources: dict[str, str]) -> list[str]:
    """Every broken rule, one line each."""
    known = set(sources)
    graph = {name: imports_of(name, source, name in PACKAGES) for name, source in sources.items()}
    problems: list[str] = []
    for name, imports in graph.items():
        for imported in imports:
            target = resolve(imported.module, known) or imported.module
            if within(name, LIBRARY) and within(target, NEVER_IN_LIBRARY):
                problems.append(f"{name} imports {target}: the library never imports training or Slicer code")
            if within(name, f"{LIBRARY}.models") and within(target, LIBRARY) and not within(target, MODELS_MAY_USE):
                problems.append(f"{name} imports {target}: models/ may use only errors, vocab and other models/")
            if within(target, CLI) and not within(name, (CLI, CLI_ENTRY)) and resolve(imported.module, known):
                problems.append(f"{name} imports {target}: only the console entry point imports cli/")
    problems += torch_at_load(graph, known)
    problems += cycles(graph, known)
    return sorted(set(problems))


def torch_at_load(graph: dict[str, list[Import]], known: set[str]) -> list[str]:
    """Modules of the torch-free layers that import torch when they are imported (directly or through others)."""
    problems = []
    for name in graph:
        if not within(name, TORCH_FREE):
            continue
        seen, stack, chain = {name}, [name], {name: [name]}
        while stack:
            current = stack.pop()
            for imported in graph[current]:
                if not imported.at_load:
                    continue
                target = resolve(imported.module, known)
                if target is None:
                    if imported.module.split(".")[0] in HEAVY:
                        path = " -> ".join([*chain[current], imported.module])
                        problems.append(f"{name} imports torch at module load ({path})")
                    continue
                if target not in seen:
                    seen.add(target)
                    chain[target] = [*chain[current], target]
                    stack.append(target)
    return problems


def cycles(graph: dict[str, list[Import]], known: set[str]) -> list[str]:
    """Import cycles between the library's subpackages and top-level modules (lazy imports count too)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for name, imports in graph.items():
        if not within(name, LIBRARY) or name == LIBRARY:
            continue
        for imported in imports:
            target = resolve(imported.module, known)
            if target and within(target, LIBRARY) and target != LIBRARY and unit(target) != unit(name):
                edges[unit(name)].add(unit(target))
    problems = []
    for start in sorted(edges):
        path = find_path(edges, start, start)
        if path:
            problems.append("import cycle between subpackages: " + " -> ".join(path))
    return problems


def find_path(edges: dict[str, set[str]], start: str, goal: str) -> list[str] | None:
    """A path start -> ... -> goal of at least one edge (breadth first), or None."""
    frontier, parents = [start], {}
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(edges.get(node, ())):
                if target == goal:
                    path = [target, node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return path[::-1]
                if target not in parents and target != start:
                    parents[target] = node
                    following.append(target)
        frontier = following
    return None


def package_names(root: Path = REPO) -> set[str]:
    return {module_name(p.relative_to(root)) for folder in SHIPPED for p in (root / folder).rglob("__init__.py")}


PACKAGES = package_names()
SOURCES = read_sources()


def test_the_shipped_code_keeps_its_layers():
    assert [name for name in SOURCES if within(name, LIBRARY)], "no library sources found"
    assert violations(SOURCES) == []


PLANTED = {
    "library imports training": ("CTFoundationLib.io.volume", "from training.trainer import Trainer\n",
                                 "the library never imports training"),
    "library imports slicer": ("CTFoundationLib.retrieval", "def f():\n    import slicer\n",
                               "the library never imports training or Slicer"),
    "models import the runtime": ("CTFoundationLib.models.fvlm", "from CTFoundationLib.inference.common import x\n",
                                  "models/ may use only"),
    "io imports torch": ("CTFoundationLib.io.tables", "import torch\n", "imports torch at module load"),
    "weights import torch through a model": ("CTFoundationLib.weights.cache",
                                             "from CTFoundationLib.models.ctclip import CTCLIP\n",
                                             "weights.cache imports torch at module load"),
    "the worker imports the CLI": ("CTFoundationLib.host.worker", "from CTFoundationLib.cli.ctclip import f\n",
                                   "only the console entry point imports cli/"),
    "training imports the CLI": ("training.run", "from CTFoundationLib.cli import main\n",
                                 "only the console entry point imports cli/"),
    "a cycle": ("CTFoundationLib.io.cases", "def f():\n    from CTFoundationLib.report import batch\n",
                "import cycle between subpackages"),
}


@pytest.mark.parametrize("case", sorted(PLANTED))
def test_a_planted_violation_is_found(case):
    module, line, message = PLANTED[case]
    planted = dict(SOURCES, **{module: SOURCES[module] + "\n" + line})
    found = violations(planted)
    assert any(message in problem and (module in problem or unit(module) in problem) for problem in found), found


def test_lazy_torch_imports_in_torch_free_layers_are_allowed():
    planted = dict(SOURCES, **{"CTFoundationLib.io.tables": SOURCES["CTFoundationLib.io.tables"]
                               + "\ndef f():\n    import torch\n"})
    assert violations(planted) == []


if __name__ == "__main__":
    sys.exit(print("\n".join(violations(SOURCES)) or "no violations"))
