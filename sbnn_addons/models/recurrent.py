"""Recurrent LIF network of the SHD reference experiment (Method page, section 8)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import BayesLinear
from ..moments import attach_variance, get_variance
from ._common import ReferenceNet, reshape_with_variance, softplus_value

__all__ = ["ZeroDiagLinear", "ZeroDiagBayesLinear", "SHDRecurrentNet", "shd_recurrent"]


class ZeroDiagLinear(nn.Linear):
    """Square ``nn.Linear`` without self-connections: ``y = (W * (1 - I)) x``.

    Shapes:
        ``[*, n] -> [*, n]``.
    """

    def __init__(self, features: int, bias: bool = False, device=None, dtype=None) -> None:
        super().__init__(features, features, bias, device=device, dtype=dtype)
        eye = torch.eye(features, device=device, dtype=self.weight.dtype)
        self.register_buffer("diag_mask", 1.0 - eye)
        with torch.no_grad():
            self.weight.mul_(self.diag_mask)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.diag_mask, self.bias)


class ZeroDiagBayesLinear(BayesLinear):
    """Recurrent :class:`~sbnn_addons.BayesLinear` with the diagonal masked in mean and variance.

    .. code-block:: text

        mean_i = sum_{j != i} m_ij h_j (+ b_i)
        var_i  = sum_{j != i} s_ij^2 h_j^2          (s_ij = s_rec for the per-layer std)

    Args:
        features: number of units ``n``.
        bias: learn a bias.
        **kwargs: posterior arguments of :class:`~sbnn_addons.BayesLinear` (``std``,
            ``std_mode``, ``learn_std``, ``bias_std``, ...).

    Shapes:
        ``[*, n] -> [*, n]`` (mean, variance attached).
    """

    def __init__(self, features: int, bias: bool = False, **kwargs) -> None:
        super().__init__(features, features, bias, **kwargs)
        eye = torch.eye(features, device=self.weight.device, dtype=self.weight.dtype)
        self.register_buffer("diag_mask", 1.0 - eye)
        with torch.no_grad():
            self.weight.mul_(self.diag_mask)

    def _mean(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.diag_mask, self.bias)

    def _output_variance(self, x2: Tensor, s2: Tensor) -> Tensor:
        if self.std_mode == "channel":
            s2 = s2.view(-1, 1)
        return F.linear(x2, s2 * self.diag_mask)


class SHDRecurrentNet(ReferenceNet):
    """Recurrent LIF network 700-256-256-20 for the Spiking Heidelberg Digits.

    Per hidden layer ``l`` (Method page, section 3 with a recurrent term):

    .. code-block:: text

        I_t = W_l x_t + R_l h_{t-1} (+ b),         R_l zero-diagonal
        var(I_t) = s_l^2 sum x_t^2 + sum_{j != i} s_rec^2 h_{t-1,j}^2 + s_b^2
        (u_t, V_t, h_t) = LIF(I_t, var(I_t))      beta = 0.905, theta = 1, soft reset

    Logits are the time average of the last linear layer (no neuron).

    Args:
        in_features: input channels (700).
        hidden: sizes of the recurrent LIF layers (256, 256).
        num_classes: outputs (20).
        bayes: Bayesian network (``True``) or the surrogate twin (``False``).
        estimator: spike estimator of the Bayesian network.
        std: initial per-layer std of the feed-forward weights (default
            ``0.5 / sqrt(fan_in)``).
        rec_std: initial per-layer std of the recurrent weights (same default).
        bias_std: initial bias-noise std of the feed-forward layers (``softplus(-2)``).
        norm: ``"none"`` (default), ``"affine"`` (mean-only, on the feed-forward current)
            or, for the twin only, ``"bn"`` (one BatchNorm1d per time step).
        num_steps: ``T`` (100 bins in the reference); fixed only with ``norm="bn"``.
        beta: LIF decay.
        threshold: firing threshold ``theta``.
        readout_noise: sample the readout ``mean + sqrt(var) eps`` in sample mode.
        surrogate: surrogate of the twin (``"gaussian"``, ``"atan"``, ``"sigmoid"``).
        surrogate_width: width of the Gaussian surrogate.

    Shapes:
        ``forward(x [T, B, in_features]) -> logits [B, num_classes]``.
    """

    def __init__(
        self,
        in_features: int = 700,
        hidden: Sequence[int] = (256, 256),
        num_classes: int = 20,
        *,
        bayes: bool = True,
        estimator: str = "st",
        std: float | None = None,
        rec_std: float | None = None,
        bias_std: float | None = softplus_value(-2.0),
        norm: str = "none",
        num_steps: int = 100,
        beta: float = 0.905,
        threshold: float = 1.0,
        readout_noise: bool = True,
        surrogate: str = "gaussian",
        surrogate_width: float = 0.4,
    ) -> None:
        super().__init__()
        config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        config.pop("rec_std")
        factory = self._setup(
            config, bayes=bayes, readout_noise=readout_noise, num_steps=num_steps, norm=norm,
            estimator=estimator, std=std, bias_std=bias_std, beta=beta, threshold=threshold,
            surrogate=surrogate, surrogate_width=surrogate_width,
        )
        self.in_features = in_features
        self.ff = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.rec = nn.ModuleList()
        self.lifs = nn.ModuleList()
        fin = in_features
        for n in hidden:
            self.ff.append(factory.linear(fin, n))
            self.norms.append(factory.norm(n, dims=1))
            self.rec.append(
                ZeroDiagBayesLinear(n, std=rec_std) if self.bayes else ZeroDiagLinear(n)
            )
            self.lifs.append(factory.lif())
            fin = n
        self.readout = factory.linear(fin, num_classes)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"SHDRecurrentNet expects input x of shape [T, B, {self.in_features}], "
                f"got {tuple(x.shape)}"
            )
        if self.per_step_norm and x.shape[0] != self.num_steps:
            raise ValueError(
                f"SHDRecurrentNet with per-step BatchNorm expects x of shape "
                f"[T={self.num_steps}, B, {self.in_features}], got {tuple(x.shape)}"
            )

    def _layer(self, ff: nn.Module, norm: nn.Module, rec: nn.Module, lif: nn.Module,
               x: Tensor) -> Tensor:
        T, B = x.shape[:2]
        cur = norm(ff(x.flatten(0, 1)))  # [T*B, n]; ChannelAffine keeps the variance
        cur = reshape_with_variance(cur, T, B, cur.shape[-1])
        var_ff = get_variance(cur)
        # unbind rather than cur[t]: one stack in backward instead of T zero-filled grads
        var_ff = None if var_ff is None else var_ff.expand_as(cur).unbind(0)
        h = cur.new_zeros(cur.shape[1:])
        state = None
        out = []
        for t, cur_t in enumerate(cur.unbind(0)):
            r = rec(h)
            current = cur_t + r
            var_r = get_variance(r)
            var = var_r if var_ff is None else (var_ff[t] if var_r is None else var_ff[t] + var_r)
            attach_variance(current, var)
            h, state = lif(current, state)
            out.append(h)
        return torch.stack(out)

    def forward_steps(self, x: Tensor) -> Tensor:
        """Readout per time step, ``[T, B, num_classes]`` (readout noise included)."""
        self._check_input(x)
        h = x
        for ff, norm, rec, lif in zip(self.ff, self.norms, self.rec, self.lifs):
            h = self._layer(ff, norm, rec, lif, h)
        T, B = h.shape[:2]
        out = self.readout(h.flatten(0, 1))
        return self.sample_readout(reshape_with_variance(out, T, B, out.shape[-1]))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_steps(x).mean(0)


def shd_recurrent(**kwargs) -> SHDRecurrentNet:
    """The SHD reference network (:class:`SHDRecurrentNet` with its defaults)."""
    return SHDRecurrentNet(**kwargs)
