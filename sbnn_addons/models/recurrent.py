"""Recurrent LIF network of the SHD reference experiment (Method page, section 8)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import check_flag, mark_checked
from ..layers import BayesLinear, _check_source, _copy_means, keep_ties
from ..moments import attach_computed_variance, get_variance, no_variance_flow
from ..spike import IWSTSpike
from ._common import (
    PAPER_BETA,
    ReferenceNet,
    StepAffine,
    StepBatchNorm,
    reshape_with_variance,
    softplus_value,
)

__all__ = ["ZeroDiagLinear", "ZeroDiagBayesLinear", "SHDRecurrentNet", "shd_recurrent"]


def _zero_diagonal(layer: nn.Linear) -> None:
    """(Re)build ``layer.diag_mask = 1 - I`` and zero the weight's diagonal with it."""
    with torch.no_grad():
        eye = torch.eye(layer.weight.shape[0], device=layer.weight.device,
                        dtype=layer.weight.dtype)
        layer.diag_mask.copy_(1.0 - eye)
        layer.weight.mul_(layer.diag_mask)


class ZeroDiagLinear(nn.Linear):
    """Square ``nn.Linear`` without self-connections: ``y = (W * (1 - I)) x``.

    Shapes:
        ``[*, n] -> [*, n]``.
    """

    def __init__(self, features: int, bias: bool = False, device=None, dtype=None) -> None:
        super().__init__(features, features, bias, device=device, dtype=dtype)
        self.register_buffer("diag_mask", torch.empty_like(self.weight))
        _zero_diagonal(self)

    def reset_parameters(self) -> None:
        """Re-initialise as ``nn.Linear`` does, then rebuild the diagonal mask (a buffer
        that ``to_empty()`` after a ``meta``-device build leaves uninitialised)."""
        super().reset_parameters()
        if "diag_mask" in self._buffers:  # not while nn.Linear.__init__ calls it
            _zero_diagonal(self)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.diag_mask, self.bias)


class ZeroDiagBayesLinear(BayesLinear):
    """Recurrent :class:`~sbnn_addons.BayesLinear` with the diagonal masked on the mean.

    .. code-block:: text

        mean_i = sum_{j != i} m_ij h_j (+ b_i)
        var_i  = sum_j s_ij^2 h_j^2                 (s_ij = s_rec for the per-layer std)

    The released SHD network masks the mean only: the variance sums over all units, the
    unit's own spike included (Method page, section 8.1). ``mask_variance=True`` masks it too,
    and leaves the diagonal out of :meth:`kl_divergence` (no random variable then).

    Args:
        features: number of units ``n``.
        bias: learn a bias.
        **kwargs: posterior arguments of :class:`~sbnn_addons.BayesLinear` (``std``,
            ``std_mode``, ``learn_std``, ``bias_std``, ...).

    Shapes:
        ``[*, n] -> [*, n]`` (mean, variance attached).
    """

    def __init__(self, features: int, bias: bool = False, *, mask_variance: bool = False,
                 **kwargs) -> None:
        super().__init__(features, features, bias, **kwargs)
        self.register_buffer("diag_mask", torch.empty_like(self.weight))
        self.mask_variance = check_flag("mask_variance", mask_variance)
        _zero_diagonal(self)

    def reset_parameters(self) -> None:
        """Re-initialise the weights and noise scales as :class:`~sbnn_addons.BayesLinear`
        does, then rebuild the diagonal mask (a buffer that ``to_empty()`` after a
        ``meta``-device build leaves uninitialised)."""
        super().reset_parameters()
        if "diag_mask" in self._buffers:  # not while nn.Linear.__init__ calls it
            _zero_diagonal(self)

    def _mean(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.diag_mask, self.bias)

    def _output_variance(self, x2: Tensor, s2: Tensor) -> Tensor:
        if not self.mask_variance:
            return super()._output_variance(x2, s2)
        if s2 is None:  # the per-layer std's unscaled field F
            s2 = torch.ones((), dtype=x2.dtype, device=x2.device)
        elif self.std_mode == "channel":
            s2 = s2.view(-1, 1)
        return F.linear(x2, s2.expand_as(self.weight) * self.diag_mask)

    @classmethod
    def from_module(cls, module: nn.Linear, **kwargs) -> ZeroDiagBayesLinear:
        """Build from a square ``nn.Linear`` (a :class:`ZeroDiagLinear` too), keeping its
        weight and bias as posterior means (the diagonal masked on the mean) and its
        pruning; ``kwargs``: the posterior arguments of ``__init__``.

        Raises:
            TypeError: ``module`` is not an ``nn.Linear``, or is Bayesian already.
            ValueError: ``module`` is not square (``in_features != out_features``).
        """
        if not isinstance(module, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(module).__name__}")
        _check_source(cls, module)
        if module.in_features != module.out_features:
            raise ValueError(
                f"{cls.__name__} is a recurrent layer, n -> n: got an nn.Linear with "
                f"{module.in_features} inputs and {module.out_features} outputs; use "
                "sbnn_addons.BayesLinear.from_module for a non-square layer")
        w = module.weight
        layer = cls(module.in_features, module.bias is not None, device=w.device,
                    dtype=w.dtype, **kwargs)
        _copy_means(layer, module)
        return keep_ties(layer, module, {})  # a pruned module's mask (torch.nn.utils.prune)

    def to_module(self) -> ZeroDiagLinear:
        """The deterministic layer with the posterior means: a :class:`ZeroDiagLinear`
        (an ``nn.Linear`` that masks the diagonal, as this layer's mean does and the
        deterministic twin does), pruned as this layer is. A plain ``nn.Linear`` would
        use the diagonal means, which the KL of a sampled prior moves off zero while the
        forward never reads them."""
        w = self.weight
        plain = ZeroDiagLinear(self.in_features, self.bias is not None, device=w.device,
                               dtype=w.dtype)
        _copy_means(plain, self)
        return keep_ties(plain, self, {})  # a pruned layer's mask (torch.nn.utils.prune)

    def _kl_mask(self) -> Tensor | None:
        """With ``mask_variance`` the diagonal is absent from the mean and the variance:
        no random variable, so out of the KL (as a pruned weight)."""
        mask = super()._kl_mask()
        if not self.mask_variance:
            return mask
        return self.diag_mask if mask is None else mask * self.diag_mask

    def _masked_variance(self, x: Tensor, binary: bool, s2: Tensor, mask: Tensor) -> Tensor:
        """The pruned layer's variance (``torch.nn.utils.prune``), which does not go
        through :meth:`_output_variance`: with ``mask_variance`` the diagonal is masked
        as one more pruned weight."""
        if self.mask_variance:
            mask = mask * self.diag_mask
        return super()._masked_variance(x, binary, s2, mask)


class SHDRecurrentNet(ReferenceNet):
    """Recurrent LIF network 700-256-256-20 for the Spiking Heidelberg Digits.

    Per hidden layer ``l`` and step ``t`` (the released recurrences, Method page, section 8.1):

    .. code-block:: text

        I_t     = (W_l x_t + (R_l * M) h_{t-1}) * gamma_t + beta_t    M = 1 - I (mean only)
        var_t   = s_l^2 sum_i x_{t,i}^2 + s_rec^2 sum_j h_{t-1,j}^2   (all units j)
        u_t     = beta u_{t-1} + I_t,   V_t = beta^2 V_{t-1} + var_t
        h_t     = 1[u_t - theta + sqrt(V_t + s_b^2) eps_t > 0],   u_t -= theta h_t
        z_t     = I_t / sqrt(max(var_t + 2 s_b^2, 1e-6))              (auxiliary loss)

    with ``beta = exp(-1 / softplus(10))``, ``theta = 1``; the bias noise ``s_b`` enters
    once, at the draw. Logits are the time average of a deterministic readout without
    bias (no neuron).

    Args:
        in_features: input channels (700).
        hidden: sizes of the recurrent LIF layers (256, 256).
        num_classes: outputs (20).
        bayes: Bayesian network (``True``) or the surrogate twin (``False``).
        estimator: spike estimator of the Bayesian network.
        std: initial per-layer std of the feed-forward weights (default
            ``0.5 / sqrt(fan_in)``).
        rec_std: initial per-layer std of the recurrent weights (same default).
        bias_std: initial std of the bias noise at the draw (``softplus(-2)``; ``None``:
            none).
        norm: ``"affine"`` (default: mean-only affine on the summed current), ``"none"``
            or, for the twin only, ``"bn"`` (one BatchNorm1d per time step on the summed
            current).
        num_steps: ``T`` (100 bins in the reference); the input must have exactly ``T``
            steps with per-step affines or ``norm="bn"``.
        beta: LIF decay.
        threshold: firing threshold ``theta``.
        readout_noise: a Bayesian readout (with a bias) sampled in sample mode (default
            ``False``: the released deterministic readout without bias); with
            ``bayes=False`` (the twin) a plain readout with a bias.
        surrogate: surrogate of the twin (``"gaussian"``, ``"atan"``, ``"sigmoid"``).
        surrogate_width: width of the Gaussian surrogate.
        affine_per_step: one affine per channel and time step (released); ``False``: one
            per channel.
        aux_form: ``"input"`` (the released SHD form ``z_t`` above) or ``"membrane"``
            (the spike function's ``z = u_t / sigma_t``, as in the DVS network).
        aux_std_grad: the auxiliary loss's gradient reaches ``sigma`` (``True``, the
            released form); ``False`` holds ``sigma`` constant in ``z``
            (:class:`~sbnn_addons.IWSTSpike`).
        mask_rec_variance: also mask the diagonal in the recurrent variance.

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
        norm: str = "affine",
        num_steps: int = 100,
        beta: float = PAPER_BETA,
        threshold: float = 1.0,
        readout_noise: bool = False,
        surrogate: str = "gaussian",
        surrogate_width: float = 0.4,
        affine_per_step: bool = True,
        aux_form: str = "input",
        aux_std_grad: bool = True,
        mask_rec_variance: bool = False,
    ) -> None:
        super().__init__()
        if aux_form not in ("input", "membrane"):
            raise ValueError(f"aux_form must be 'input' or 'membrane', got {aux_form!r}")
        if (not isinstance(hidden, (tuple, list)) or not hidden
                or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in hidden)):
            raise ValueError(f"hidden must be a non-empty sequence of layer sizes >= 1 (e.g. "
                             f"(256, 256), or (8,) for one layer), got {hidden!r}")
        config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        config.pop("rec_std")
        factory = self._setup(
            config, bayes=bayes, readout_noise=readout_noise, num_steps=num_steps, norm=norm,
            estimator=estimator, std=std, bias_std=bias_std, beta=beta, threshold=threshold,
            surrogate=surrogate, surrogate_width=surrogate_width,
            affine_per_step=affine_per_step, aux_std_grad=aux_std_grad,
        )
        self.in_features = in_features
        self.aux_form = aux_form
        self.ff = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.rec = nn.ModuleList()
        self.lifs = nn.ModuleList()
        fin = in_features
        for i, n in enumerate(hidden):
            # the affine's shift is the bias of the summed current (none with norm="none")
            self.ff.append(factory.linear(fin, n, bias=norm == "none", first=i == 0))
            self.norms.append(factory.norm(n, dims=1))
            self.rec.append(
                ZeroDiagBayesLinear(n, std=rec_std, mask_variance=mask_rec_variance)
                if self.bayes else ZeroDiagLinear(n)
            )
            self.lifs.append(factory.lif())
            fin = n
        bayes_readout = self.bayes and self.readout_noise
        # a readout with noise has a bias, in the twin too (bayes=False, the same means)
        self.readout = factory.linear(fin, num_classes, bias=self.readout_noise,
                                      bayes=bayes_readout)

    def _check_input(self, x: Tensor) -> None:
        self._check_dtype(x)
        if x.dim() != 3 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"SHDRecurrentNet expects input x of shape [T, B, {self.in_features}], "
                f"got {tuple(x.shape)}"
            )
        self._check_steps(x)
        self._check_step_count(x, f"B, {self.in_features}")

    @staticmethod
    def _norm_step(norm: nn.Module, current: Tensor, t: int) -> Tensor:
        """The norm of step ``t`` on the summed current ``[B, n]`` (variance passed on)."""
        if isinstance(norm, StepAffine):
            return norm.step(current, t)
        if isinstance(norm, StepBatchNorm):
            return norm.norms[t](current)
        return norm(current)  # ChannelAffine (mean only) or Identity

    def _layer(self, ff: nn.Module, norm: nn.Module, rec: nn.Module, lif: nn.Module,
               x: Tensor) -> Tensor:
        T, B = x.shape[:2]
        cur = ff(x.flatten(0, 1))  # [T*B, n], variance attached
        cur = reshape_with_variance(cur, T, B, cur.shape[-1])
        var_ff = get_variance(cur)
        # unbind rather than cur[t]: one stack in backward instead of T zero-filled grads
        var_ff = None if var_ff is None else var_ff.expand_as(cur).unbind(0)
        spike = lif.spike_fn
        # collected where the spike function would collect (training mode, grads on)
        input_aux = (self.aux_form == "input" and isinstance(spike, IWSTSpike)
                     and spike._aux_wanted())
        h = cur.new_zeros(cur.shape[1:])
        state = None
        out = []
        for t, cur_t in enumerate(cur.unbind(0)):
            r = rec(h)
            var_r = get_variance(r)
            var = var_r if var_ff is None else (var_ff[t] if var_r is None else var_ff[t] + var_r)
            with no_variance_flow():
                current = self._norm_step(norm, attach_computed_variance(cur_t + r, None), t)
            current = attach_computed_variance(current, var)
            mark_checked(current)  # from the checked input: no per-step check (a sync)
            if input_aux:
                self._collect_input_aux(spike, current, var)
                spike.collect_aux = False  # the membrane form is not collected here
                try:
                    h, state = lif(current, state)
                finally:
                    spike.collect_aux = True
            else:
                h, state = lif(current, state)
            out.append(h)
        return torch.stack(out)

    @staticmethod
    def _collect_input_aux(spike: nn.Module, current: Tensor, var: Tensor | None) -> None:
        """``mean over batch of sum over units z^2``, ``z = I_t / sqrt(var_t + 2 s_b^2)``."""
        total = torch.zeros((), dtype=current.dtype, device=current.device)
        if var is not None:
            total = total + var
        own = spike.own_noise_variance()
        if own is not None:
            total = total + 2 * own
        z = current / spike._aux_sigma(total.clamp_min(1e-6).sqrt())
        spike._collect((z * z).sum(), current)

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
