"""Module surgery shared by the adapters: replace submodules of a model in place."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["replace_modules"]


def replace_modules(root: nn.Module, fn: Callable[[str, nn.Module], nn.Module | None]) -> None:
    """Replace every submodule ``m`` of ``root`` for which ``fn(name, m)`` returns a module.

    ``name`` is the qualified name (``"features.0"``). Children of a replaced module are
    not visited; a module shared under several names is decided once and replaced by the
    same new module everywhere.
    """
    decided: dict[int, nn.Module | None] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            full = f"{prefix}.{name}" if prefix else name
            if id(child) not in decided:
                decided[id(child)] = fn(full, child)
                if decided[id(child)] is None:
                    visit(child, full)
            new = decided[id(child)]
            if new is not None:
                module._modules[name] = new

    visit(root, "")
