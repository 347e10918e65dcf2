"""Evaluation modes ``sample``, ``mean`` and ``mc(K)`` (Method page, section 7)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from .base import MODES, SBNNModule

__all__ = ["set_mode", "get_mode", "mode", "mc_predict"]


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Set the evaluation mode of every SBNN module in ``model``.

    Args:
        model: any module.
        mode: ``"sample"`` (one stochastic pass), ``"mean"`` (deterministic
            ``1[mu > theta]``, posterior-mean weights: the deployable network) or
            ``"mc"`` (stochastic passes for :func:`mc_predict`).

    Returns:
        ``model``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for m in model.modules():
        if isinstance(m, SBNNModule):
            m.sbnn_mode = mode
    return model


def get_mode(model: nn.Module) -> str | None:
    """The mode of the first SBNN module in ``model`` (``None`` if it has none)."""
    for m in model.modules():
        if isinstance(m, SBNNModule):
            return m.sbnn_mode
    return None


@contextlib.contextmanager
def mode(model: nn.Module, value: str) -> Iterator[nn.Module]:
    """Context manager: run ``model`` in mode ``value``, then restore each module's mode."""
    saved = [(m, m.sbnn_mode) for m in model.modules() if isinstance(m, SBNNModule)]
    set_mode(model, value)
    try:
        yield model
    finally:
        for m, old in saved:
            m.sbnn_mode = old


def mc_predict(
    forward: Callable[[], Tensor],
    model: nn.Module,
    num_samples: int,
) -> Tensor:
    """Monte Carlo predictive distribution: mean of ``softmax(logits)`` over K passes.

    .. code-block:: text

        p(y | x) = 1/K sum_k softmax(f_k(x)),   f_k: a stochastic pass

    Args:
        forward: zero-argument callable that runs one pass (including any state reset)
            and returns logits ``[B, C]``.
        model: the SBNN model (run in ``mc`` mode during the passes).
        num_samples: ``K >= 1``.

    Returns:
        Probabilities ``[B, C]``.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples (K) must be an integer >= 1, got {num_samples!r}")
    with mode(model, "mc"):
        total = None
        for _ in range(num_samples):
            probs = torch.softmax(forward(), dim=-1)
            total = probs if total is None else total + probs
    return total / num_samples
