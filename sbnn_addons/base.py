"""Shared base of every SBNN module: the evaluation mode and softplus parameters."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

__all__ = ["SBNNModule", "MODES", "inverse_softplus", "check_std", "share_posterior"]

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


def cached_tensor_test(owner: object, name: str, tensor: Tensor,
                       test: Callable[[Tensor], bool]) -> bool:
    """``test(tensor)``, cached in ``owner.__dict__[name]`` until the tensor's storage or
    version changes: a per-step check on a buffer without a device sync at every step."""
    key = (tensor.data_ptr(), tensor._version)
    cached = owner.__dict__.get(name)
    if cached is None or cached[0] != key:
        cached = owner.__dict__[name] = (key, bool(test(tensor)))
    return cached[1]


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


_SHARED: list[dict | None] = [None]


@contextlib.contextmanager
def share_posterior() -> Iterator[None]:
    """Inside the block, each Bayesian layer computes ``s^2`` once and reuses it.

    A time loop calls every layer ``T`` times per forward pass; with a per-weight std,
    ``softplus(rho)^2`` over the whole weight and its backward are then repeated ``T``
    times. Wrap **one** forward pass (the whole time loop) in this block to compute it
    once; autograd accumulates the gradient of every use into the one node, so the
    gradients are unchanged (tested). Do not keep a block open across backward passes or
    optimiser steps: the cache is dropped when the block ends (and a changed parameter
    is recomputed).

    Example::

        with sbnn_addons.share_posterior():
            for t in range(T):
                spikes, state = lif(fc(x[t]), state)
    """
    previous = _SHARED[0]
    _SHARED[0] = {} if previous is None else previous
    try:
        yield
    finally:
        _SHARED[0] = previous
