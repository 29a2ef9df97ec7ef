"""The package's imports point one way (docs/DESIGN.md, "Rooms"): the import graph of
``peft_vit/**``, read with ``ast`` (imports inside functions count; ``if TYPE_CHECKING:`` ones
do not), has no circle, and no room imports a room above it in :data:`ROOMS`."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "peft_vit"

# The rooms, bottom first; each names the rooms below it that it may import. A module belongs
# to the longest room that prefixes its name ("peft_vit" alone is the package's public API:
# build_model, count_parameters, merge).
ROOMS: List[Tuple[str, Tuple[str, ...]]] = [
    ("peft_vit.errors", ()),
    ("peft_vit.precision", ()),
    ("peft_vit.config", ()),
    ("peft_vit.record", ()),
    ("peft_vit.fingerprint", ("peft_vit.config",)),
    ("peft_vit.backbone", ()),
    ("peft_vit.data", ("peft_vit.config",)),
    ("peft_vit.methods", ("peft_vit.backbone", "peft_vit.precision")),
    ("peft_vit", ("peft_vit.backbone", "peft_vit.methods")),
    # the report reads records and the data registries through the data package's interface
    ("peft_vit.report", ("peft_vit.record", "peft_vit.fingerprint", "peft_vit.data")),
    ("peft_vit.engine", ("peft_vit.record", "peft_vit.fingerprint", "peft_vit.config", "peft_vit.backbone",
                         "peft_vit.data", "peft_vit.methods", "peft_vit", "peft_vit.precision")),
]
# interfaces a room offers: a room listed here may be imported only as these modules
INTERFACES: Dict[str, Set[str]] = {"peft_vit.data": {"peft_vit.data"}}
# the rooms that may reach past a room's interface: the loop, where everything meets, builds
# its batches with data.loader
REACH_IN: Set[Tuple[str, str]] = {("peft_vit.engine", "peft_vit.data")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.AST) -> Set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def import_graph() -> Dict[str, Set[str]]:
    """``module -> the package modules it imports``, for every module of ``peft_vit``."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: Dict[str, Set[str]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_only(tree)
        out: Set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name.split(".")[0] == "peft_vit")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "peft_vit":
                    continue
                for a in node.names:  # `from . import x` names a submodule when one exists
                    sub = f"{target}.{a.name}"
                    out.add(sub if sub in files else target)
        out.discard(name)
        graph[name] = {m for m in out if m in files}
    return graph


def room(module: str) -> str:
    return max((r for r, _ in ROOMS if module == r or module.startswith(r + ".")), key=len)


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


# the project's errors (peft_vit/errors.py), at the bottom: every room may raise them
ANYWHERE = {"peft_vit.errors"}


def upward(graph: Dict[str, Set[str]]) -> List[str]:
    """Every import of a room not below the importer's (or past a room's interface)."""
    allowed = {r: set(below) | (ANYWHERE - {r}) for r, below in ROOMS}
    bad = []
    for src in sorted(graph):
        for dst in sorted(graph[src]):
            a, b = room(src), room(dst)
            if a == b:
                continue
            if b not in allowed[a]:
                bad.append(f"{src} -> {dst} ({a} may import {', '.join(allowed[a]) or 'nothing'})")
            elif b in INTERFACES and dst not in INTERFACES[b] and (a, b) not in REACH_IN:
                bad.append(f"{src} -> {dst} (past {b}'s interface {', '.join(sorted(INTERFACES[b]))})")
    return bad


def test_rooms_are_a_layer_order():
    names = [r for r, _ in ROOMS]
    for i, (r, below) in enumerate(ROOMS):
        assert set(below) <= set(names[:i]), f"{r} may import a room not below it: {set(below) - set(names[:i])}"


def test_graph_sees_the_imports():
    graph = import_graph()
    assert "peft_vit.engine.loop" in graph and "peft_vit.record" in graph["peft_vit.engine.loop"]
    assert "peft_vit.data" in graph["peft_vit.engine.loop"]


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_no_import_upward():
    assert upward(import_graph()) == []


if __name__ == "__main__":  # the graph's state, for a report
    g = import_graph()
    print("modules", len(g), "imports", sum(map(len, g.values())))
    print("circles", cycles(g))
    print("upward", *upward(g), sep="\n  ")
