"""The package's import graph keeps DESIGN §4's one-way layering: no import cycles (function-level imports
included) and no import from a lower layer to a higher one. Read from the source with ``ast``, so an import
hidden inside a function counts as much as one at the top of a module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "distca"

# Lowest first: a module may import its own package and anything listed before it, never after it.
# ``masks`` (the mask families' definitions) sits below the config, which names a model's per-layer masks.
LAYERS = ["errors", "limits", "masks", "config", "data", "attention", "scheduler", "transport", "server", "runtime",
          "model", "parts", "train", "sim", "demo", "cli"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``module -> modules of distca it imports`` (absolute and relative imports, at any depth)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # `from x import name`: name may be a function
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "distca"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), ignoring a package's edges to its
    own submodules and back (``pkg/__init__`` re-exporting its modules is not a cycle of concern)."""
    def related(a: str, b: str) -> bool:
        return a.startswith(b + ".") or b.startswith(a + ".")

    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if related(v, w):
                continue
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_every_package_has_a_layer(graph):
    unknown = sorted({layer(m) for m in graph} - set(LAYERS) - {"distca"})
    assert not unknown, f"add these to LAYERS (and DESIGN §4): {unknown}"


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_no_import_from_a_lower_layer_to_a_higher_one(graph):
    upward = sorted((a, b) for a, targets in graph.items() for b in targets
                    if layer(a) in LAYERS and layer(b) in LAYERS and LAYERS.index(layer(b)) > LAYERS.index(layer(a)))
    assert upward == []


def test_the_checker_sees_cycles_and_upward_imports():
    """The checks above can fail: a made-up graph with one cycle and one upward edge is caught."""
    fake = {"distca.scheduler.a": {"distca.scheduler.b"}, "distca.scheduler.b": {"distca.scheduler.a"},
            "distca.attention.x": {"distca.train.y"}, "distca.train.y": set()}
    assert cycles(fake) == [["distca.scheduler.a", "distca.scheduler.b"]]
    assert LAYERS.index(layer("distca.train.y")) > LAYERS.index(layer("distca.attention.x"))
