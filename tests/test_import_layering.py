"""The package has no import cycle: every ``from .x import`` / ``from . import x`` between
its modules (at module level or inside functions) forms a directed acyclic graph, with
the host adapters, models and bench on top of the framework-free core."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sbnn_addons"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Package modules imported by ``path`` (package ``__init__`` re-exports excluded)."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        base = package.split(".")
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
        names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
        for name in names:
            file = PACKAGE.parent / Path(*name.split("."))
            if file.with_suffix(".py").exists():
                found.add(name)
            elif (file / "__init__.py").exists():
                found.add(name)
    return found - {me}


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__init__.py":
            continue  # re-exports only
        graph[_module_name(path)] = {m for m in _imports(path) if not m.endswith("__init__")}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:  # a subpackage: its modules are nodes of their own
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_modules():
    cycle = _find_cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


def test_core_imports_no_host_adapter_model_or_bench():
    core = ["functional", "tensors", "kernels", "estimators", "layers", "moments", "spike",
            "neurons", "losses", "modes", "optim", "base", "checkpoint"]
    upper = ("sbnn_addons.snntorch", "sbnn_addons.spikingjelly", "sbnn_addons.models",
             "sbnn_addons.bench", "sbnn_addons.ep")
    graph = _graph()
    for name in core:
        for dep in graph[f"sbnn_addons.{name}"]:
            assert not dep.startswith(upper), f"sbnn_addons.{name} imports {dep}"


def test_ep_trainer_does_not_import_the_bench():
    assert not any(d.startswith("sbnn_addons.bench") for d in _graph()["sbnn_addons.ep"])
