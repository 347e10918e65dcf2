"""Shared base of every SBNN module: the evaluation mode and softplus parameters."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["SBNNModule", "MODES", "inverse_softplus", "check_std"]

#: Evaluation modes of SPEC section 7 (``mc`` draws like ``sample`` in each pass).
MODES = ("sample", "mean", "mc")


class SBNNModule:
    """Mixin for modules whose forward depends on the evaluation mode.

    Attributes:
        sbnn_mode: ``"sample"`` (stochastic pass), ``"mean"`` (deterministic
            ``1[mu > theta]`` with posterior-mean weights) or ``"mc"`` (stochastic, used by
            Monte Carlo averaging). Set it for a whole model with
            :func:`sbnn_addons.set_mode` or the :func:`sbnn_addons.mode` context manager.
    """

    sbnn_mode: str = "sample"

    @property
    def deterministic(self) -> bool:
        """``True`` in ``mean`` mode."""
        return self.sbnn_mode == "mean"


def inverse_softplus(value: float) -> float:
    """``rho`` such that ``softplus(rho) = value`` (``value > 0``)."""
    return value + math.log(-math.expm1(-value))


def check_std(name: str, value, *, allow_zero: bool) -> float:
    """Validate a standard deviation hyper-parameter and return it as a float.

    Raises:
        TypeError: not a real number.
        ValueError: negative, non-finite, or zero where ``allow_zero`` is false.
    """
    if isinstance(value, Tensor):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    if value == 0 and not allow_zero:
        raise ValueError(
            f"{name} must be > 0 when it is learned (softplus parameter); "
            "pass learn_std=False for a fixed zero std"
        )
    return value


def softplus(rho: Tensor) -> Tensor:
    """``log(1 + exp(rho))``."""
    return torch.nn.functional.softplus(rho)
