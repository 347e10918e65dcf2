"""Deterministic surrogate-gradient spike for the same-layout twins of the reference networks.

The reference scripts train a baseline with the same networks and no noise: Heaviside
forward and a Gaussian surrogate derivative. :class:`SurrogateSpike` has the interface of
:class:`~sbnn_addons.IWSTSpike` used by :class:`~sbnn_addons.LIF` (``fire(u, variance)``,
``noise_variance(u)``, ``forward(u)``), so ``LIF(spike_fn=SurrogateSpike())`` is the twin
neuron.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..functional import check_float

__all__ = ["SurrogateSpike", "SURROGATES"]

#: Names accepted by :class:`SurrogateSpike`.
SURROGATES = ("gaussian", "atan", "sigmoid")


def _surrogate_grad(u: Tensor, kind: str, width: float, alpha: float, slope: float) -> Tensor:
    if kind == "gaussian":
        x = u / width
        return torch.exp(-0.5 * x * x) / (math.sqrt(2.0 * math.pi) * width)
    if kind == "atan":
        return (alpha / 2.0) / (1.0 + (math.pi / 2.0 * alpha * u) ** 2)
    s = torch.sigmoid(slope * u)
    return slope * s * (1.0 - s)


class _HeavisideSurrogate(torch.autograd.Function):
    @staticmethod
    def forward(u: Tensor, kind: str, width: float, alpha: float, slope: float) -> Tensor:
        return (u > 0).to(u.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        u, kind, width, alpha, slope = inputs
        ctx.save_for_backward(u)
        ctx.params = (kind, width, alpha, slope)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (u,) = ctx.saved_tensors
        return grad_out * _surrogate_grad(u, *ctx.params), None, None, None, None


class SurrogateSpike(nn.Module):
    """Heaviside spike ``h = 1[u > 0]`` with a surrogate derivative (no noise).

    .. code-block:: text

        forward:   h = 1[u > 0]                                  u = membrane - theta
        gaussian:  dh/du := phi(u / w) / w                       (reference, w = 0.4)
        atan:      dh/du := (alpha/2) / (1 + (pi/2 * alpha * u)^2)   (snnTorch, alpha = 2)
        sigmoid:   dh/du := k * sig(k u) * (1 - sig(k u))           (snnTorch, k = 25)

    Args:
        kind: ``"gaussian"``, ``"atan"`` or ``"sigmoid"``.
        width: std ``w`` of the Gaussian surrogate (> 0).
        alpha: ``alpha`` of the arctan surrogate (> 0).
        slope: slope ``k`` of the sigmoid surrogate (> 0).

    Shapes:
        ``u``: ``[*]``; output ``[*]`` with values in {0, 1}, same dtype.
    """

    def __init__(
        self, kind: str = "gaussian", width: float = 0.4, *, alpha: float = 2.0, slope: float = 25.0
    ) -> None:
        super().__init__()
        if kind not in SURROGATES:
            raise ValueError(f"kind must be one of {SURROGATES}, got {kind!r}")
        for name, value in (("width", width), ("alpha", alpha), ("slope", slope)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        self.kind = kind
        self.width = float(width)
        self.alpha = float(alpha)
        self.slope = float(slope)
        self.threshold = 1.0  # set by LIF; unused (u is already membrane - threshold)

    def noise_variance(self, u: Tensor) -> None:
        """The twin has no noise: always ``None``."""
        return None

    def fire(self, u: Tensor, variance: Tensor | None = None) -> Tensor:
        """Spikes for drive ``u``; ``variance`` is ignored (deterministic twin)."""
        return _HeavisideSurrogate.apply(u, self.kind, self.width, self.alpha, self.slope)

    def forward(self, u: Tensor) -> Tensor:
        """Spikes ``1[u > 0]`` for drive ``u = membrane - threshold``."""
        check_float("u", u)
        return self.fire(u)

    def extra_repr(self) -> str:
        param = {"gaussian": f"width={self.width:g}", "atan": f"alpha={self.alpha:g}",
                 "sigmoid": f"slope={self.slope:g}"}[self.kind]
        return f"kind={self.kind}, {param}"
