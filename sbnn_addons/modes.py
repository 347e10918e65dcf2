"""Evaluation modes ``sample``, ``mean`` and ``mc(K)`` (Method page, section 7).

The ``mc(K)`` prediction itself is :func:`sbnn_addons.mc_predict` (defined in
:mod:`sbnn_addons.uncertainty`, also reachable as ``sbnn_addons.modes.mc_predict``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .base import MODES, SBNNModule, SettingSwitch, check_module

__all__ = ["set_mode", "get_mode", "mode"]


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Set the evaluation mode of every SBNN module in ``model``.

    Args:
        model: a module containing SBNN modules (a converted or core model).
        mode: ``"sample"`` (one stochastic pass), ``"mean"`` (deterministic
            ``1[mu > theta]``, posterior-mean weights: the deployable network) or
            ``"mc"`` (stochastic passes of :func:`sbnn_addons.mc_predict`).

    Returns:
        ``model``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: an unknown mode, or a model without SBNN modules (an unconverted host
            model: the mode would change nothing).
    """
    check_module(model, "set_mode")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    modules = [m for m in model.modules() if isinstance(m, SBNNModule)]
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no SBNN module (no Bayesian layer or spike "
            f"function), so mode {mode!r} would change nothing: convert the model first "
            "(sbnn_addons.snntorch.to_sbnn / sbnn_addons.spikingjelly.to_sbnn)")
    for m in modules:
        m.sbnn_mode = mode
    return model


def get_mode(model: nn.Module) -> str | None:
    """The mode of the first SBNN module in ``model`` (``None`` if it has none)."""
    check_module(model, "get_mode")
    for m in model.modules():
        if isinstance(m, SBNNModule):
            return m.sbnn_mode
    return None


class mode(SettingSwitch):
    """Set the mode of every SBNN module in ``model`` to ``value`` now; used as a context
    manager, restore each module's mode when the block ends (also when it raises).

    Like ``torch.set_grad_enabled``, it works both ways: ``with sbnn_addons.mode(model,
    "mean"): ...`` runs the block in ``mean`` mode and restores the modes after it, and
    ``sbnn_addons.mode(model, "mean")`` as a statement sets the mode for good (as
    :func:`set_mode` does). Entering the returned object again applies the mode again.
    Raises as :func:`set_mode`.
    """

    def __init__(self, model: nn.Module, value: str) -> None:
        check_module(model, "mode")
        self._model = model
        self._value = value
        super().__init__()

    def _apply(self) -> Callable[[], None]:
        saved = [(m, m.sbnn_mode) for m in self._model.modules() if isinstance(m, SBNNModule)]
        set_mode(self._model, self._value)  # raises before anything is saved

        def restore() -> None:
            for m, old in saved:
                m.sbnn_mode = old

        return restore

    def __enter__(self) -> nn.Module:
        super().__enter__()
        return self._model


def __getattr__(name: str):
    """``sbnn_addons.modes.mc_predict``: the Monte Carlo API lives in
    :mod:`sbnn_addons.uncertainty` (imported on first use, which avoids an import cycle)."""
    if name == "mc_predict":
        from .uncertainty import mc_predict

        return mc_predict
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
