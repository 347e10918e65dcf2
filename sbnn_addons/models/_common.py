"""Building blocks shared by the reference networks (time folding, norms, layer factory)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import SBNNModule, check_flag
from ..functional import compact_broadcast, safe_sqrt
from ..layers import BayesConv2d, BayesLinear, ChannelAffine
from ..moments import (
    UnknownVariance,
    attach_computed_variance,
    get_variance,
    no_variance_flow,
    raw_variance,
)
from ..neurons import LIF
from ..optim import is_noise_parameter
from ..spike import IWSTSpike
from .surrogate import SurrogateSpike

NORMS = ("affine", "bn", "none")

#: The released membrane decay: ``beta = exp(-1 / softplus(10))`` = 0.9048378 (Method page,
#: section 8.1).
PAPER_BETA = math.exp(-1.0 / math.log1p(math.exp(10.0)))


def softplus_value(rho: float) -> float:
    """``softplus(rho) = log(1 + exp(rho))`` as a float (the reference noise inits)."""
    return math.log1p(math.exp(rho))


def known_variance(x: Tensor) -> Tensor | None:
    var = get_variance(x)
    if isinstance(var, UnknownVariance):  # pragma: no cover - the models only use known ops
        raise RuntimeError(f"variance lost through '{var.op}'")
    return var


def reshape_with_variance(x: Tensor, *shape: int) -> Tensor:
    """``x.reshape(shape)`` carrying the attached variance through the same reshape."""
    var = known_variance(x)
    with no_variance_flow():
        out = x.reshape(*shape)
    if var is not None:  # expanded dimensions stay broadcast (size 1) after the reshape
        var = compact_broadcast(var.expand_as(x).reshape(*shape))
    return attach_computed_variance(out, var)


class StepBatchNorm(nn.Module):
    """One BatchNorm per time step (the baseline's per-step normalisation).

    Args:
        num_features: channels ``C``.
        num_steps: time steps ``T`` (one BatchNorm each).
        dims: 1 (``BatchNorm1d``, input ``[T*B, C]``) or 2 (``BatchNorm2d``,
            input ``[T*B, C, H, W]``).

    Shapes:
        input ``[T*B, C, *]`` (time-major fold) -> same shape.

    Raises:
        ValueError: ``num_steps`` not an integer >= 1 (no norm: a division by zero in the
            forward), or ``dims`` not 1 or 2 (any other value built ``BatchNorm1d``).
    """

    def __init__(self, num_features: int, num_steps: int, dims: int = 2) -> None:
        super().__init__()
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        if dims not in (1, 2) or isinstance(dims, bool):
            raise ValueError(f"dims must be 1 (BatchNorm1d) or 2 (BatchNorm2d), got {dims!r}")
        bn = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
        self.num_steps = num_steps
        self.norms = nn.ModuleList(bn(num_features) for _ in range(num_steps))

    def forward(self, x: Tensor) -> Tensor:
        T = self.num_steps
        if x.shape[0] % T:
            raise ValueError(
                f"StepBatchNorm expects a time-major fold [T*B, ...] with T={T}, got "
                f"leading size {x.shape[0]}"
            )
        steps = x.reshape(T, x.shape[0] // T, *x.shape[1:])
        return torch.cat([norm(s) for norm, s in zip(self.norms, steps)])

    def extra_repr(self) -> str:
        return f"num_steps={self.num_steps}"


class StepAffine(nn.Module):
    """One scale and one shift per channel **and per time step**, on the mean only.

    The released networks' replacement for BatchNorm: no statistics, scale init 1,
    shift init 0; the noise variance passes unscaled (Method page, section 8.1).

    .. code-block:: text

        y[t, b, c, ...] = gamma[t, c] * x[t, b, c, ...] + beta[t, c],   var(y) = var(x)

    Args:
        num_features: channels ``C``.
        num_steps: time steps ``T`` (one scale and shift each).

    Shapes:
        :meth:`forward`: input ``[T*B, C, *]`` (time-major fold) -> same shape;
        :meth:`step`: input ``[B, C, *]`` at step ``t`` -> same shape.
    """

    def __init__(self, num_features: int, num_steps: int) -> None:
        super().__init__()
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        self.num_features = num_features
        self.num_steps = num_steps
        self.weight = nn.Parameter(torch.ones(num_steps, num_features))
        self.bias = nn.Parameter(torch.zeros(num_steps, num_features))

    def reset_parameters(self) -> None:
        """Set every step's affine back to the identity (scale 1, shift 0), as built, e.g.
        after building on the ``meta`` device and ``to_empty()``."""
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.fill_(0.0)

    def _check(self, x: Tensor, folded: bool) -> None:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"StepAffine expects {self.num_features} channels in dimension 1, got shape "
                f"{tuple(x.shape)}"
            )
        if folded and x.shape[0] % self.num_steps:
            raise ValueError(
                f"StepAffine expects a time-major fold [T*B, ...] with T={self.num_steps}, "
                f"got leading size {x.shape[0]}; build the network with num_steps equal to "
                "the number of time steps of its input"
            )

    def forward(self, x: Tensor) -> Tensor:
        self._check(x, folded=True)
        T = self.num_steps
        return self._affine(x.reshape(T, x.shape[0] // T, *x.shape[1:]), x,
                            self.weight, self.bias)

    def step(self, x: Tensor, t: int) -> Tensor:
        """The affine of step ``t`` on ``x [B, C, *]`` (variance passed on)."""
        self._check(x, folded=False)
        if not 0 <= t < self.num_steps:
            raise ValueError(f"step {t} is outside the affine's num_steps={self.num_steps}")
        return self._affine(x, x, self.weight[t], self.bias[t])

    @staticmethod
    def _affine(view: Tensor, x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        """``gamma * view + beta`` with the channels in dimension ``gamma.dim()`` of
        ``view``, shaped back to ``x`` with ``x``'s variance passed on as stored."""
        shape = gamma.shape[:-1] + (1, gamma.shape[-1]) + (1,) * (x.dim() - 2)
        with no_variance_flow():
            out = view * gamma.view(shape) + beta.view(shape)
        return attach_computed_variance(out.reshape(x.shape), raw_variance(x))

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_steps={self.num_steps}"


class LayerFactory:
    """Builds the Bayesian layers or their deterministic twins with the same layout."""

    def __init__(
        self,
        bayes: bool,
        *,
        estimator: str = "st",
        std: float | None = None,
        bias_std: float | None = None,
        norm: str = "affine",
        num_steps: int = 1,
        beta: float = PAPER_BETA,
        threshold: float = 1.0,
        surrogate: str = "gaussian",
        surrogate_width: float = 0.4,
        affine_per_step: bool = True,
        aux_center: str = "zero",
        aux_std_grad: bool = True,
    ) -> None:
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        bayes = check_flag("bayes", bayes)
        affine_per_step = check_flag("affine_per_step", affine_per_step)
        if not isinstance(aux_std_grad, bool):
            raise TypeError(f"aux_std_grad must be a bool, got {type(aux_std_grad).__name__}")
        if bayes and norm == "bn":
            raise ValueError(
                "norm='bn' is for the deterministic twin only (bayes=False); the Bayesian "
                "networks are normalisation-free: use norm='affine' (mean-only) or 'none'"
            )
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        self.bayes = bayes
        self.estimator = estimator
        self.std = std
        self.bias_std = bias_std
        self.norm_kind = norm
        self.num_steps = num_steps
        self.beta = beta
        self.threshold = threshold
        self.surrogate = surrogate
        self.surrogate_width = surrogate_width
        self.affine_per_step = bool(affine_per_step)
        self.aux_center = aux_center
        self.aux_std_grad = aux_std_grad

    def conv(self, cin: int, cout: int, stride: int = 1, first: bool = False) -> nn.Conv2d:
        """3x3 conv without bias; ``first``: the variance path reads the input itself
        (not detached), as the released first layer does."""
        if self.bayes:
            return BayesConv2d(cin, cout, 3, stride=stride, padding=1, bias=False,
                               std=self.std, detach_input_variance=not first)
        return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)

    def linear(self, fin: int, fout: int, bias: bool = True, bayes: bool | None = None,
               first: bool = False) -> nn.Linear:
        """Linear layer: Bayesian in the Bayesian network unless ``bayes=False``."""
        if self.bayes if bayes is None else bayes:
            return BayesLinear(fin, fout, bias, std=self.std,
                               detach_input_variance=not first)
        return nn.Linear(fin, fout, bias)

    def norm(self, channels: int, dims: int = 2) -> nn.Module:
        if self.norm_kind == "affine":
            if self.affine_per_step:
                return StepAffine(channels, self.num_steps)
            return ChannelAffine(channels)
        if self.norm_kind == "bn":
            return StepBatchNorm(channels, self.num_steps, dims)
        return nn.Identity()

    def spike(self) -> nn.Module:
        """The neuron's spike function. ``bias_std`` is noise added where the spike is
        drawn, ``sigma^2 = V_t + s_b^2``, never accumulated by the membrane: it is the
        spike function's own learnable std (:class:`~sbnn_addons.IWSTSpike`'s ``s_n``)."""
        if self.bayes:
            return IWSTSpike(self.estimator, std=self.bias_std,
                             learn_std=self.bias_std is not None,
                             threshold=self.threshold, aux_center=self.aux_center,
                             aux_std_grad=self.aux_std_grad)
        return SurrogateSpike(self.surrogate, self.surrogate_width)

    def lif(self) -> LIF:
        return LIF(beta=self.beta, threshold=self.threshold, spike_fn=self.spike())


class ReferenceNet(SBNNModule, nn.Module):
    """Base of the reference networks: the readout and the twin construction."""

    bayes: bool
    readout_noise: bool
    _config: dict

    def _setup(self, config: dict, *, bayes: bool, readout_noise: bool, num_steps: int,
               norm: str, **layer_kwargs) -> LayerFactory:
        """Store the constructor ``config`` and the shared flags; return the layer factory.

        ``layer_kwargs`` are the other :class:`LayerFactory` arguments (estimator, stds,
        LIF constants, surrogate).
        """
        for name in ("in_features", "in_channels", "num_classes"):
            value = config.get(name)
            if name in config and (isinstance(value, bool) or not isinstance(value, int)
                                   or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self._config = config
        self.bayes = check_flag("bayes", bayes)  # bayes="no" built the Bayesian network
        self.readout_noise = check_flag("readout_noise", readout_noise)
        self.num_steps = num_steps
        # one norm per step: the input must have exactly num_steps steps
        self.per_step_norm = norm == "bn" or (
            norm == "affine" and layer_kwargs.get("affine_per_step", True))
        return LayerFactory(self.bayes, norm=norm, num_steps=num_steps, **layer_kwargs)

    def _check_steps(self, x: Tensor) -> None:
        """A sequence of ``T = 0`` steps has no output to average (it failed in a stack
        or a reshape, or the per-step check named ``num_steps=0`` as the fix)."""
        if x.shape[0] == 0:
            raise ValueError(
                f"{type(self).__name__} got an input of shape {tuple(x.shape)}: T = 0 time "
                "steps, nothing to average over; skip empty sequences")

    def _check_step_count(self, x: Tensor, shape: str) -> None:
        """A network with one norm per step takes exactly ``num_steps`` steps; ``shape``
        is the expected input shape after ``T``, for the message."""
        if not self.per_step_norm or x.shape[0] == self.num_steps:
            return
        fix = ("the time steps come first: for a batch-first input [B, T, ...] pass "
               "x.transpose(0, 1)" if x.dim() > 1 and x.shape[1] == self.num_steps
               else f"build it with num_steps={x.shape[0]}")
        raise ValueError(
            f"{type(self).__name__} has one affine (or BatchNorm) per time step and expects "
            f"x of shape [T={self.num_steps}, {shape}], got {tuple(x.shape)}: {fix}")

    def _check_dtype(self, x: Tensor) -> None:
        """The input's dtype must be the parameters' (outside ``torch.autocast``)."""
        param = next(self.parameters(), None)
        if (param is not None and x.dtype != param.dtype
                and not torch.is_autocast_enabled(x.device.type)):
            raise ValueError(
                f"{type(self).__name__} has {param.dtype} parameters but its input is "
                f"{x.dtype}: convert it with x.to({param.dtype}) (the preprocessed DVS "
                "frames are stored as float16), or cast the network with .to(dtype)"
            )

    def sample_readout(self, out: Tensor) -> Tensor:
        """Readout per step: the mean, plus ``sqrt(var) * eps`` when sampling.

        .. code-block:: text

            y_t = mean_t + sqrt(var_t) * eps_t   (sample / mc mode, readout_noise=True)
            y_t = mean_t                         (mean mode, the twin, readout_noise=False)

        With ``readout_noise=False`` (the released configuration) the readout is a plain
        ``nn.Linear`` and carries no variance.
        """
        var = known_variance(out)
        if var is None or not self.readout_noise or self.deterministic:
            return attach_computed_variance(out, None) if var is not None else out
        # the stream of the network's last spike function: seeded with the spikes
        # (seed_spikes, mc_predict(seed=)), so that a seeded pass replays the readout too
        spike = next((m for m in reversed(list(self.modules())) if isinstance(m, IWSTSpike)),
                     None)
        gen = None if spike is None else spike._generator_for(out)
        with no_variance_flow():
            eps = torch.randn(out.shape, generator=gen, dtype=out.dtype, device=out.device)
            noise = safe_sqrt(var.expand_as(out)) * eps
            return out + noise

    def deterministic_twin(self, **overrides) -> ReferenceNet:
        """The surrogate-gradient twin (``bayes=False``) with this network's posterior means.

        Weights, biases and affine parameters are copied; noise parameters are dropped.
        A weight pruned with ``torch.nn.utils.prune`` is pruned alike in the twin (its
        ``weight_orig`` and mask). With the same weights, the twin's Heaviside forward
        equals this network's ``mean`` mode. The twin is on this network's device and in
        its dtype.

        Args:
            **overrides: constructor arguments to change (e.g. ``surrogate="atan"``).

        Raises:
            ValueError: ``overrides`` change the layout (``norm="bn"`` of an affine
                network): a parameter or buffer of the twin has no counterpart here and
                would keep its initial value, or one of this network's (not a noise
                scale) would be dropped.
        """
        config = {**self._config, "bayes": False, **overrides}
        config.pop("estimator", None)
        config.pop("bias_std", None)
        config.pop("std", None)
        # readout_noise stays: a readout with noise has a bias, and so has its twin's
        ref = next(self.parameters())
        # on this network's device and in its dtype before the load: from a meta network
        # nothing can be copied to the CPU, and float32 would round a float64 one's means
        twin = type(self)(**config).to(device=ref.device, dtype=ref.dtype)
        _prune_alike(twin, self)
        result = twin.load_state_dict(self.state_dict(), strict=False)
        dropped = [k for k in result.unexpected_keys  # noise: learned or fixed stds
                   if not (is_noise_parameter(k) or k.endswith("fixed_std"))]
        if result.missing_keys or dropped:
            changed = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
            what = (f"its {', '.join(map(repr, result.missing_keys[:4]))} would keep their "
                    "initial values" if result.missing_keys else
                    f"this network's {', '.join(map(repr, dropped[:4]))} would be dropped")
            raise ValueError(
                f"deterministic_twin({changed}) builds a twin with another layout: {what} "
                "(not the twin of this network's mean mode). Build that network directly, "
                f"{type(self).__name__}(bayes=False, ...), and load what it shares with "
                "load_state_dict(net.state_dict(), strict=False)")
        return twin


def _prune_alike(twin: nn.Module, net: nn.Module) -> None:
    """Give each module of ``twin`` the ``torch.nn.utils.prune`` reparametrisation
    (``<name>_orig`` and ``<name>_mask``, identity until loaded) of the module of the same
    name in ``net``, so that ``net``'s state dict loads into it, masks included (the
    pruned weights' keys matched nothing: a pruned network had no twin)."""
    from torch.nn.utils import prune

    modules = dict(twin.named_modules())
    for name, module in net.named_modules():
        target = modules.get(name)
        for hook in module._forward_pre_hooks.values():
            tensor = getattr(hook, "_tensor_name", None)
            if (isinstance(hook, prune.BasePruningMethod) and target is not None
                    and isinstance(getattr(target, tensor, None), nn.Parameter)):
                prune.identity(target, tensor)


def channel_pad(x: Tensor, out_channels: int) -> Tensor:
    """Zero-pad the channel dimension (dim 1) of ``x [N, C, H, W]`` to ``out_channels``."""
    extra = out_channels - x.shape[1]
    return F.pad(x, (0, 0, 0, 0, 0, extra)) if extra > 0 else x
