"""Variational weight layers with the local reparameterisation (Method page, section 2).

Each layer subclasses its ``torch.nn`` counterpart, so ``.weight`` is the posterior mean
and tools that look for ``nn.Linear`` / ``nn.Conv2d`` keep working. The forward returns
the **mean** pre-activation and attaches its variance (see :mod:`sbnn_addons.moments`):

.. code-block:: text

    mean(a) = sum_i m_i x_i + b
    var(a)  = sum_i s_i^2 x_i^2  (+ s_b^2 with bias noise)

Weights are never sampled; the neuron that consumes ``a`` samples its spike.
The posterior std ``s`` is ``softplus(rho)`` with one ``rho`` per layer (the paper's
scalar, initialised to ``0.5 / sqrt(fan_in)``), per output channel, or per weight.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .base import (
    SBNNModule,
    as_int,
    assert_finite,
    cached_tensor_test,
    check_device,
    check_finite,
    check_flag,
    check_input,
    check_layer_output,
    check_std,
    computed_std,
    concrete_shape,
    eager_calls,
    inverse_softplus,
    noise_scale,
    raise_error,
    refuse_data_dependent_shape,
    share_posterior,
    shared_square,
    square,
)
from .functional import (
    apply_function,
    box_sum,
    check_float,
    gaussian_kl,
    is_binary,
    is_kept,
    mark_binary,
)
from .moments import (
    _REPORTS,
    ScaledVariance,
    VarianceFlowError,
    VarianceTensor,
    _noisy_in_sample_mode,
    _restore,
    _snapshot,
    attach_computed_variance,
    check_finite_once,
    check_noise_scales,
    in_checked_model,
    new_draw,
    no_variance_flow,
    noise_sources,
    raw_variance,
    refuse_membrane_input,
)
from .optim import register_noise_owner

__all__ = [
    "share_posterior",  # re-exported from .base
    "BayesLinear",
    "BayesConv1d",
    "BayesConv2d",
    "ChannelAffine",
    "GaussianPrior",
    "scale_mixture_prior",
    "is_bayesian",
    "CONVERTED_STD_FRACTION",
    "converted_std",
    "converted_layer_kwargs",
    "folded_batchnorm_scale",
    "batchnorm_after",
    "batchnorm_call_pairs",
    "check_batchnorm_pairing",
    "remove_batchnorm_pairing_check",
    "affine_batchnorm_plan",
    "fold_batchnorms",
    "keep_ties",
    "fold_channel_std",
    "warn_deterministic_layers",
    "legacy_weight_norm",
]

STD_MODES = ("layer", "channel", "weight")

#: The missing-keys list of the last load_state_dict call that warned of a checkpoint
#: without noise scales (one warning per call, not one per layer).
_LOAD_WARNED: list = [None]
#: The missing-keys list of the last load_state_dict call that loaded a Bayesian layer's
#: noise scale (a checkpoint of a converted model), and of the last that warned of a
#: ``batchnorm="keep"`` checkpoint loaded into a ChannelAffine.
_LOADED_NOISE: list = [None]
_LOAD_WARNED_KEEP: list = [None]

#: Spike inputs with at least this many elements are kept as uint8 for the backward;
#: below it the memory saved is small and the extra autograd node costs more time.
COMPACT_INPUT_MIN = 1 << 16


class GaussianPrior:
    """Zero-mean Gaussian prior ``N(0, std^2)`` on every weight (closed-form KL)."""

    def __init__(self, std: float = 1.0) -> None:
        self.std = check_std("prior std", std, allow_zero=False)

    def __repr__(self) -> str:
        return f"GaussianPrior(std={self.std:g})"


def scale_mixture_prior(pi: float = 0.5, std1: float = 1.0, std2: float = 1e-3):
    """Scale-mixture prior ``pi N(0, std1^2) + (1 - pi) N(0, std2^2)`` (Blundell et al.).

    Returned as a ``torch.distributions.MixtureSameFamily``; its KL is Monte Carlo. Its
    parameters follow the weights' device in the KL (a model on CUDA takes the prior as
    built); another distribution must hold its tensors on the weights' device.
    """
    if not 0.0 < pi < 1.0:
        raise ValueError(f"pi must be in (0, 1), got {pi}")
    std1 = check_std("std1", std1, allow_zero=False)
    std2 = check_std("std2", std2, allow_zero=False)
    return _ScaleMixturePrior(pi, std1, std2)


class _ScaleMixturePrior(torch.distributions.MixtureSameFamily):
    """The prior of :func:`scale_mixture_prior`. Built without knowing the weights'
    device (its parameters on the CPU), it follows them in the KL: :meth:`on` gives the
    same prior on a layer's device (a CPU mixture against CUDA weights raised "Expected
    all tensors to be on the same device")."""

    def __init__(self, pi: float, std1: float, std2: float,
                 device: torch.device | str | None = None) -> None:
        # a meta tensor has no values to validate (a CPU or CUDA one is checked)
        check = False if torch.device(device or "cpu").type == "meta" else None
        mix = torch.distributions.Categorical(torch.tensor([pi, 1.0 - pi], device=device),
                                              validate_args=check)
        comp = torch.distributions.Normal(torch.zeros(2, device=device),
                                          torch.tensor([std1, std2], device=device),
                                          validate_args=check)
        super().__init__(mix, comp, validate_args=check)
        self._args = (pi, std1, std2)
        self._on: dict[torch.device, _ScaleMixturePrior] = {}

    def on(self, device: torch.device) -> torch.distributions.MixtureSameFamily:
        """The same prior with its parameters on ``device`` (``self`` where they are)."""
        if self.mixture_distribution.probs.device == device:
            return self
        if device not in self._on:
            self._on[device] = _ScaleMixturePrior(*self._args, device=device)
        return self._on[device]


class _BinaryInputOp(torch.autograd.Function):
    """``layer._plain_op(x, weight, bias)`` for a 0/1 input ``x`` (spikes), keeping ``x``
    as uint8 for the backward instead of float32: the saved input, usually the largest
    activation a spiking layer keeps, takes a quarter of the memory. Same gradients."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, layer) -> Tensor:
        return layer._plain_op(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, layer = inputs
        ctx.layer, ctx.has_bias = layer, bias is not None
        # the dtype the op ran in: autocast's (x and weight cast to it), else theirs
        ctx.dtype = output.dtype
        ctx.x_graph = x.requires_grad
        ctx.save_for_backward(x.to(torch.uint8), weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # differentiable in grad and weight (create_graph=True), not in the saved bytes
        if torch.is_grad_enabled() and ctx.x_graph:
            raise RuntimeError(
                f"a second-order gradient (create_graph=True) through "
                f"{type(ctx.layer).__name__}: its 0/1 spike input (>= COMPACT_INPUT_MIN = "
                f"{COMPACT_INPUT_MIN} elements) was kept as uint8 for the backward, without "
                "the spikes' graph, so the second-order terms through them would be lost. "
                "Keep such inputs as they are before the forward: "
                "sbnn_addons.layers.COMPACT_INPUT_MIN = math.inf (4x the memory for them)")
        x_bytes, weight = ctx.saved_tensors
        needs = (*ctx.needs_input_grad[:2], ctx.has_bias and ctx.needs_input_grad[2])
        # the backward in the forward's dtype, as autocast's own op (a bfloat16 gradient
        # against the float32 weight failed); autograd casts each gradient to its input's
        dtype = ctx.dtype
        gx, gw, gb = ctx.layer._op_backward(grad.to(dtype), x_bytes.to(dtype),
                                            weight.to(dtype), needs)
        return gx, gw, gb, None


class _BayesMixin(SBNNModule):
    """Posterior std parameters, the LRT variance and the KL shared by all layers."""

    weight: Tensor
    bias: Tensor | None

    def _init_posterior(
        self,
        std: float | None,
        std_mode: str,
        learn_std: bool,
        bias_std: float | None,
        detach_input_variance: bool,
    ) -> None:
        if std_mode not in STD_MODES:
            raise ValueError(f"std_mode must be one of {STD_MODES}, got {std_mode!r}")
        if self.weight.numel() == 0:
            raise ValueError(
                f"{type(self).__name__} has a weight of shape {tuple(self.weight.shape)}: "
                "no synapses (0 input or output features / channels); give every size >= 1")
        fan_in = self.weight[0].numel()
        learn_std = check_flag("learn_std", learn_std)
        detach_input_variance = check_flag("detach_input_variance", detach_input_variance)
        std = 0.5 / math.sqrt(fan_in) if std is None else std
        std = check_std("std", std, allow_zero=not learn_std)
        shape = {"layer": (), "channel": (self.weight.shape[0],), "weight": self.weight.shape}
        init = torch.full(shape[std_mode], 1.0, device=self.weight.device, dtype=self.weight.dtype)
        self.std_mode = std_mode
        self.learn_std = learn_std
        if self.learn_std:
            self.std_rho = nn.Parameter(init * inverse_softplus(std))
        else:
            self.register_buffer("fixed_std", init * std)
        self.bias_noise = bias_std is not None
        if self.bias_noise:
            if self.bias is None:
                raise ValueError(
                    "bias_std is the posterior std of the bias, but the layer has none "
                    "(bias=False): build it with bias=True, or leave bias_std=None (noise at "
                    "the spike itself is the spike function's own std, IWSTSpike(std=...))"
                )
            bias_std = check_std("bias_std", bias_std, allow_zero=False)
            self.bias_std_rho = nn.Parameter(
                torch.tensor(
                    inverse_softplus(bias_std), device=self.weight.device, dtype=self.weight.dtype
                )
            )
        self.detach_input_variance = detach_input_variance
        self._init_stds = (std, bias_std)
        register_noise_owner(self)

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        register_noise_owner(self)  # a copy's or a loaded model's noise scales too

    def reset_parameters(self) -> None:
        """Re-initialise the weights and bias (as ``nn.Linear`` / ``nn.ConvNd`` do) and the
        posterior stds (to the values the layer was built with), e.g. after building on the
        ``meta`` device and ``to_empty()``. A converted layer whose std was sized from its
        weights (:func:`converted_std`, :func:`fold_channel_std`) sizes it from the new
        weights by the same rule."""
        super().reset_parameters()
        if "_init_stds" in self.__dict__:  # not while nn.Linear.__init__ calls it
            rule = self.__dict__.get(_CONVERTED_STD)
            if rule is not None:  # a converted layer's std is sized from its weights
                # those of the next forward: a pruned layer's weight_orig (PyTorch's reset
                # draws into the computed weight, which the next forward recomputes)
                weight = self._parameters.get("weight_orig", self.weight)
                self._init_stds = (_converted_init_std(weight, *rule,
                                                       mask=self._pruning_mask()),
                                   self._init_stds[1])
            self._reset_posterior()

    def _reset_posterior(self) -> None:
        std, bias_std = self._init_stds
        with torch.no_grad():
            if isinstance(std, Tensor):  # per output channel (a folded BatchNorm's scale)
                target = self.std_rho if self.learn_std else self.fixed_std
                per_out = std.to(target).view(-1, *([1] * (target.dim() - 1)))
                value = inverse_softplus(per_out) if self.learn_std else per_out
                target.copy_(value.expand_as(target))
            elif self.learn_std:
                self.std_rho.fill_(inverse_softplus(std))
            else:
                self.fixed_std.fill_(std)
            if self.bias_noise:
                self.bias_std_rho.fill_(inverse_softplus(bias_std))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        """PyTorch's load, with the two ways a checkpoint's noise scales can fail to match
        named: a std of another ``std_mode`` (an error that names both modes, instead of a
        bare size mismatch) and a checkpoint with the weight but no std (a host model's:
        a warning, since a non-strict load would leave the std at its current value)."""
        own = "std_rho" if self.learn_std else "fixed_std"
        key = prefix + own
        saved = state_dict.get(key)
        target = getattr(self, own)
        mismatch = None
        if saved is not None:  # a converted model's checkpoint (see _fold_batchnorm_entries)
            _LOADED_NOISE[0] = missing_keys
        if isinstance(saved, Tensor) and saved.shape != target.shape:
            shapes = {(): "layer", (self.weight.shape[0],): "channel",
                      tuple(self.weight.shape): "weight"}
            mode = shapes.get(tuple(saved.shape))
            if mode is not None and mode != self.std_mode:
                mismatch = (
                    f"size mismatch for {key}: the checkpoint's noise scale has shape "
                    f"{tuple(saved.shape)}, that of a layer built with std_mode={mode!r}, but "
                    f"this {type(self).__name__} has std_mode={self.std_mode!r} (shape "
                    f"{tuple(target.shape)}): build the model with std_mode={mode!r} "
                    f"(to_sbnn(..., std_mode={mode!r}) for a converted model) to load it")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        if mismatch is not None:
            bare = f"size mismatch for {key}:"
            error_msgs[:] = [m for m in error_msgs if not m.startswith(bare)]
            error_msgs.append(mismatch)
        has_weight = prefix + "weight" in state_dict or prefix + "weight_orig" in state_dict
        if (saved is None and has_weight  # weight_orig: a pruned layer's (prune)
                and _LOAD_WARNED[0] is not missing_keys):
            _LOAD_WARNED[0] = missing_keys  # the list this load_state_dict call shares
            other = "fixed_std" if self.learn_std else "std_rho"
            name = prefix.rstrip(".") or type(self).__name__
            form = (f" (it holds {prefix + other}: a layer built with learn_std="
                    f"{not self.learn_std})" if prefix + other in state_dict else
                    " (a checkpoint of the host model, or of a model without noise scales)")
            warnings.warn(
                f"load_state_dict: the state dict holds the weight of the Bayesian layer "
                f"{name!r} but not its noise scale {key!r}{form}, and the same may hold "
                "for other layers (the missing keys are in load_state_dict's result): "
                "loaded with strict=False, their stds keep the values they had (in a "
                "converted model: sized from the weights it had at conversion, not from "
                "these). Load a host checkpoint into the host model before converting it "
                "(to_sbnn), or load a checkpoint of the converted model", UserWarning,
                stacklevel=4 + prefix.count("."))  # the caller of load_state_dict

    def _std_squared(self, compiling: bool | None = None) -> Tensor:
        """``s^2``, computed once per :func:`share_posterior` block (else at every call).
        ``compiling``: whether a graph is traced, where the caller knows it."""
        if self.learn_std:  # read from _parameters, without nn.Module.__getattr__
            params = self._parameters
            param = params["std_rho"] if "std_rho" in params else self.std_rho
        else:
            param = self.fixed_std
        return shared_square(self, param, self._std, compiling)

    @property
    def std(self) -> Tensor:
        """Posterior std ``s``: shape ``()``, ``[out]`` or the weight shape."""
        return computed_std(self, "std_rho") if self.learn_std else self.fixed_std

    @property
    def bias_std(self) -> Tensor | None:
        """Std ``s_b`` of the bias noise, or ``None``."""
        return computed_std(self, "bias_std_rho") if self.bias_noise else None

    def _std(self) -> Tensor:
        """:attr:`std` as the layer computes with it (a plain tensor)."""
        return noise_scale(self, "std_rho") if self.learn_std else self.fixed_std

    def _noise_free(self) -> bool:
        return self.deterministic or (
            not self.learn_std and not self.bias_noise
            and not cached_tensor_test(self, "_sbnn_noisy", self.fixed_std,
                                       lambda std: std.any(), assume=True)
        )

    def _compact_ok(self) -> bool:
        return True

    def _op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The plain linear / convolution; a spike input is kept as bytes for the backward,
        unless its producer keeps it (then it is saved as it is, shared)."""
        if (x.numel() >= COMPACT_INPUT_MIN and is_binary(x) and not is_kept(x)
                and torch.is_grad_enabled()
                and self._compact_ok() and not torch._C._are_functorch_transforms_active()):
            return apply_function(_BinaryInputOp, x, weight, bias, self)
        return self._plain_op(x, weight, bias)

    def _check_mean_mode_training(self, compiling: bool | None = None) -> None:
        """Warn (once per layer) when an optimiser steps the weight in ``mean`` mode: there
        is no noise, so ``std_rho`` gets no gradient, and the network trains as a
        deterministic one; the mode is pickled with the model, so a model saved in
        ``mean`` mode resumes training in it.

        A training forward (grad enabled) records the weight's and ``std_rho``'s version
        counters; the next one finds the weight changed in place (a step) while
        ``std_rho`` did not. A few integer comparisons; nothing under ``torch.compile``.
        (An optimiser that steps the weight but not ``std_rho``, which has a gradient in
        ``sample`` mode, is warned about by the optimiser step hook,
        :func:`~sbnn_addons.optim.check_noise_trained`, for every noise scale at once.)
        ``compiling``: whether a graph is traced, where the caller knows it.
        """
        if (not self.learn_std or not self.training or not torch.is_grad_enabled()
                or (torch.compiler.is_compiling() if compiling is None else compiling)
                or "_sbnn_std_warned" in self.__dict__):
            return
        # the stepped tensor: a pruned or weight-normed weight is recomputed at every
        # forward, a new tensor each time (parameters read from _parameters, without
        # nn.Module.__getattr__, where they are there)
        weight = _stepped_weight(self)
        params = self._parameters
        rho = params["std_rho"] if "std_rho" in params else self.std_rho
        if not rho.requires_grad or rho.is_inference() or weight.is_inference():
            return
        now = (id(weight), weight._version, id(rho), rho._version)
        last = self.__dict__.get("_sbnn_versions")
        self.__dict__["_sbnn_versions"] = now
        if (last is None or last[0] != now[0] or last[2] != now[2]  # other tensors
                or last[1] == now[1] or last[3] != now[3]):
            return
        if not self.deterministic:  # a std the optimiser misses: check_noise_trained
            return
        self.__dict__["_sbnn_std_warned"] = True
        name = noise_sources(weight, self)[0]
        which = f"{type(self).__name__} {name!r}" if name else type(self).__name__
        warnings.warn(
            f"{which}: an optimiser stepped its weight between two training forwards "
            "in 'mean' mode, where the noise is off and its noise scale std_rho gets "
            "no gradient: the network trains as a deterministic one, and only through "
            "spike functions with noise of their own (one without, such as the core "
            "LIF's default, passes a zero gradient there). The mode is kept "
            "by torch.save / copy.deepcopy, so a model saved in 'mean' mode resumes in "
            "it; call sbnn_addons.set_mode(model, 'sample') before training (and "
            "evaluate with the context manager sbnn_addons.mode(model, 'mean'), which "
            "restores the mode)", UserWarning, stacklevel=4)

    def register_forward_hook(self, hook, *args, **kwargs):
        """``nn.Module.register_forward_hook``; then :func:`_variance_kept` is made the
        last hook again (:meth:`_guard_forward_hooks`), here rather than at the next
        forward, which a compiled model cannot register a hook in."""
        handle = super().register_forward_hook(hook, *args, **kwargs)
        if hook is not _variance_kept:
            self._guard_forward_hooks()
        return handle

    def _guard_forward_hooks(self, compiling: bool | None = None) -> None:
        """Where the layer has forward hooks of its user (not the variance flow's own, a
        global one of ``register_module_forward_hook`` included), make
        :func:`_variance_kept` the last of them, so that it sees the output every hook
        left. Run where a hook is registered, and in the forward: the hooks run after it
        (eager mode only). ``compiling``: whether a graph is traced, where the caller knows it."""
        if torch.compiler.is_compiling() if compiling is None else compiling:
            return
        hooks = self._forward_hooks
        global_hooks = torch.nn.modules.module._global_forward_hooks
        if not hooks and not global_hooks:
            return
        key = self.__dict__.get("_variance_guard_key")
        if key is not None and key in hooks:
            if next(reversed(hooks)) != key:
                hooks.move_to_end(key)
            return
        if not global_hooks:
            for h in hooks.values():  # a loop, not all(...): no generator per forward
                if getattr(h, "__module__", None) != "sbnn_addons.moments":
                    break
            else:  # only the variance flow's own hooks
                return
        self.__dict__["_variance_guard_key"] = self.register_forward_hook(_variance_kept).id

    def _attach(self, mean: Tensor, x: Tensor) -> Tensor:
        compiling = torch.compiler.is_compiling()  # once: the helpers take it
        if compiling:  # the input's finite check, on the output (check_input(affine=True))
            check_layer_output(mean, type(self).__name__)
        self._check_mean_mode_training(compiling)
        self._guard_forward_hooks(compiling)
        if self._noise_free():
            return attach_computed_variance(mean, None, compiling=compiling)
        binary = is_binary(x, compiling)
        x_in = x.detach() if self.detach_input_variance else x
        if binary and x_in is not x:  # the detached view holds the same spikes
            mark_binary(x_in, is_kept(x))
        # x^2 = x holds for the values of spikes, not for their gradient (2x): spikes whose
        # gradient flows through the variance path (detach_input_variance=False) are squared
        binary = binary and not (x_in.requires_grad and torch.is_grad_enabled())
        s2 = self._std_squared(compiling)
        mask = self._pruning_mask()
        if mask is not None:  # torch.nn.utils.prune: a removed weight has no noise either
            with _no_half_autocast(x_in):
                var = self._masked_variance(x_in, binary, s2, mask)
            if self.bias_noise:
                var = var + self._bias_variance()
            return new_draw(attach_computed_variance(mean, var, compiling=compiling), self,
                            compiling)
        if self._factored():  # s^2 F kept factored through the variance flow
            field = self._input_variance(x_in, binary, None)
            return new_draw(attach_computed_variance(mean, ScaledVariance(field, s2),
                                                     compiling=compiling), self, compiling)
        var = self._input_variance(x_in, binary, s2)
        if self.bias_noise:
            var = var + self._bias_variance()
        # broadcastable to the mean (e.g. [N, 1, H, W] with a per-layer std): consumers
        # broadcast it, and channel-independent ops (avg-pool) stay C times cheaper
        return new_draw(attach_computed_variance(mean, var, compiling=compiling), self, compiling)

    def _bias_variance(self) -> Tensor:
        """``s_b^2`` of the bias noise, per output where ``torch.nn.utils.prune`` prunes
        the bias (a ``bias_mask`` buffer): the bias is then ``m * b`` with
        ``b ~ N(mu_b, s_b^2)``, so a pruned bias adds no noise, as it adds no mean."""
        var = square(noise_scale(self, "bias_std_rho"))
        mask = self._bias_mask()
        if mask is None:
            return var
        per_out = mask.to(var.dtype).square().view(-1, *([1] * (self.weight.dim() - 2)))
        return var * per_out

    def _pruning_mask(self, name: str = "weight") -> Tensor | None:
        """The mask ``torch.nn.utils.prune`` applies to the weight (its ``weight_mask``
        buffer, next to the parameter ``weight_orig``), or ``None`` when not pruned."""
        mask = self._buffers.get(name + "_mask")
        if mask is None or name + "_orig" not in self._parameters:
            return None
        return mask

    def _kl_mask(self) -> Tensor | None:
        """The weights the KL sums over (nonzero), ``None`` for all: the kept ones of a
        pruned layer (a removed weight is no random variable)."""
        return self._pruning_mask()

    def _bias_mask(self) -> Tensor | None:
        """The pruning mask of the bias (``bias_mask``), or ``None`` when not pruned."""
        return self._pruning_mask("bias")

    def _masked_variance(self, x: Tensor, binary: bool, s2: Tensor, mask: Tensor) -> Tensor:
        """LRT variance of a pruned layer, ``sum_i m_i^2 s_i^2 x_i^2`` (no bias noise): the
        weight is ``m * w`` with ``w ~ N(mu, s^2)``, so a pruned synapse (``m = 0``) adds no
        noise, as it adds no mean."""
        x, s2 = _variance_precision(x, s2)
        x2 = x if binary else x * x
        if self.std_mode == "channel":
            s2 = s2.view(-1, *([1] * (self.weight.dim() - 1)))
        per_weight = s2.expand(self.weight.shape) * mask.to(s2.dtype).square()
        return self._op(x2, per_weight, None)

    def _factored(self) -> bool:
        """Whether the variance is ``s^2 F`` with one scalar ``s^2`` (per-layer std, no
        bias noise, the library's own variance formula)."""
        return (self.std_mode == "layer" and not self.bias_noise
                and type(self)._output_variance in _SCALAR_STD_FORMULAS)

    def _input_variance(self, x: Tensor, binary: bool, s2: Tensor | None) -> Tensor:
        """LRT variance without bias noise (``s2=None``: the per-layer std's unscaled
        field ``F``); for spikes ``x^2 = x`` (no extra pass, and nothing extra saved for
        the backward). A float16 input is squared and summed in float32, whose range the
        variance needs (``x^2`` overflows float16 above 256)."""
        with _no_half_autocast(x):
            x, s2 = _variance_precision(x, s2)
            x2 = x if binary else x * x  # a spike input is marked (x^2 = x, kept as it is)
            return self._output_variance(x2, s2)

    def output_variance(self, x: Tensor) -> Tensor:
        """LRT variance ``var(a) = sum_i s_i^2 x_i^2 (+ s_b^2)`` of the output, full shape."""
        with no_variance_flow():
            mean = self._mean(x)
            with _no_half_autocast(x):
                x, s2 = _variance_precision(x, self._std_squared())
                mask = self._pruning_mask()
                var = (self._output_variance(x * x, s2) if mask is None
                       else self._masked_variance(x, False, s2, mask))
            if self.bias_noise:
                var = var + self._bias_variance()
            return var.expand_as(mean)

    def kl_divergence(self, prior=None, num_samples: int = 16) -> Tensor:
        """``KL(q(W) || p(W))`` summed over every weight (and the bias if it is noisy).

        A weight or bias removed by ``torch.nn.utils.prune`` is no random variable (it
        adds neither mean nor noise): the sum runs over the kept ones.

        Args:
            prior: ``None`` (``N(0, 1)``), a float std, a :class:`GaussianPrior`, or any
                ``torch.distributions.Distribution`` broadcastable to the weights.
                Pairs known to ``torch.distributions.kl_divergence`` are closed form;
                others (e.g. :func:`scale_mixture_prior`) use ``num_samples`` Monte Carlo
                samples with the reparameterisation trick.
            num_samples: Monte Carlo samples for priors without a closed form.

        Returns:
            Scalar tensor (float32 for a float16 or bfloat16 layer, whose terms are
            summed in float32).

        Raises:
            ValueError: a posterior std is 0 (a deterministic weight has an infinite KL
                to any Gaussian prior), ``num_samples`` is not an integer >= 1, or a
                distribution ``prior`` whose shape does not fit the weight (or the noisy
                bias) element by element.
        """
        num_samples = check_kl_samples(num_samples)
        std = self._std()
        if (not self.learn_std and not torch.compiler.is_compiling() and not std.is_meta
                and bool((std == 0).any())):
            raise ValueError(
                f"{type(self).__name__} has a zero posterior std (a deterministic weight), "
                "whose KL to a Gaussian prior is infinite; give it a std > 0, or leave the "
                "layer deterministic (a plain layer, exclude= at conversion) and out of the KL")
        if self.std_mode == "channel":  # [out] -> [out, 1, ...] to broadcast over the weight
            std = std.view(-1, *([1] * (self.weight.dim() - 1)))
        # a weight or bias removed by torch.nn.utils.prune is no random variable: no KL
        params = [(self.weight, std, self._kl_mask())]
        if self.bias_noise and self.bias is not None:
            params.append((self.bias, noise_scale(self, "bias_std_rho"), self._bias_mask()))
        # half precision in float32: a float16 sum overflows at 65504, and a bfloat16 one
        # keeps three digits
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        total = self.weight.new_zeros((), dtype=dtype)
        for mean, std, mask in params:
            total = total + _kl(mean.to(dtype), std.to(dtype), prior, num_samples, mask)
        return total


def _variance_kept(module: _BayesMixin, args, output) -> None:
    """The last forward hook of a Bayesian layer that has hooks of its user: a hook that
    replaced the output by a tensor without its variance (``output.data``,
    ``output.as_subclass(torch.Tensor)``, ``torch.tensor(...)``) would make the layer's
    noise vanish silently, with no gradient for its std. A layer that a conversion with
    ``inplace=True`` replaced shares the converted one's hooks (:func:`_adopt_hooks`):
    it is a plain layer, for which this does nothing."""
    if (type(output) is VarianceTensor or not isinstance(output, Tensor)
            or not isinstance(module, _BayesMixin)):
        return
    # mean mode: the layer's noise is off, but check_variance_flow follows it as a probe
    if module._noise_free() and not (module.deterministic and _REPORTS
                                     and _noisy_in_sample_mode(module)):
        return
    name = noise_sources(output, module)[0]
    which = f"{type(module).__name__}{f' {name!r}' if name else ''}"
    raise_error(
        f"a forward hook of {which} returned a tensor without the posterior variance the "
        "layer attached to its output (a new tensor, .data, .as_subclass(torch.Tensor)), "
        "so the layer's noise would vanish silently and its std get no gradient; return "
        "an expression of the output instead (output * mask, output.clone(), None to keep "
        "it), or register the hook on the module after the layer", VarianceFlowError)


def check_kl_samples(num_samples) -> int:
    """``num_samples`` of a Monte Carlo KL as an int: an integer >= 1 (0 samples gave a
    reshape error, a float a ``torch.Size`` error)."""
    value = as_int(num_samples)
    if value is None or value < 1:
        raise ValueError(f"num_samples (Monte Carlo samples of the KL) must be an integer "
                         f">= 1, got {num_samples!r}")
    return value


def _prior_tensors(dist: torch.distributions.Distribution, depth: int = 3) -> list[Tensor]:
    """The tensors a distribution holds (those of the distributions it is built from, as
    a mixture's, included)."""
    found = []
    for value in vars(dist).values():
        if isinstance(value, Tensor):
            found.append(value)
        elif isinstance(value, torch.distributions.Distribution) and depth:
            found += _prior_tensors(value, depth - 1)
    return found


def _prior_on(prior: torch.distributions.Distribution,
              like: Tensor) -> torch.distributions.Distribution:
    """``prior`` for the weights ``like``: :func:`scale_mixture_prior` on their device.

    Raises:
        ValueError: another distribution holds a tensor (not a 0-dim one, which PyTorch
            moves with the other operand) on another device than the weights.
    """
    if isinstance(prior, _ScaleMixturePrior):
        return prior.on(like.device)
    stray = next((t.device for t in _prior_tensors(prior)
                  if t.dim() and t.device != like.device), None)
    if stray is not None:
        raise ValueError(
            f"the prior {type(prior).__name__} holds its parameters on {stray}, but the "
            f"layer's weights are on {like.device}: build the prior's tensors on the "
            "weights' device (e.g. torch.distributions.Laplace(torch.zeros(n, "
            "device=device), ...)), or pass a float std, GaussianPrior or "
            "sbnn_addons.scale_mixture_prior(...), which follow the weights' device")
    return prior


def _kl(mean: Tensor, std: Tensor, prior, num_samples: int,
        mask: Tensor | None = None) -> Tensor:
    """``KL(N(mean, std^2) || prior)`` summed over the elements; with a pruning ``mask``
    (``torch.nn.utils.prune``) over the kept ones only."""
    keep = None if mask is None else mask != 0
    if prior is None or isinstance(prior, (int, float, GaussianPrior)):
        prior_std = 1.0 if prior is None else getattr(prior, "std", prior)
        prior_std = check_std("prior std", prior_std, allow_zero=False)
        if keep is not None:  # N(0, s0^2) in place of a removed weight: a KL of exactly 0
            std = torch.where(keep, std.expand_as(mean), prior_std)
            mean = torch.where(keep, mean, 0.0)
        return gaussian_kl(mean, std, prior_std)
    if not isinstance(prior, torch.distributions.Distribution):
        raise TypeError(
            "prior must be None, a float std, GaussianPrior or a torch.distributions "
            f"Distribution, got {type(prior).__name__}"
        )
    prior = _prior_on(prior, mean)
    _check_prior_shape(prior, mean)
    # a meta tensor has no values to validate
    q = torch.distributions.Normal(mean, std.expand_as(mean),
                                   validate_args=False if mean.is_meta else None)
    try:
        terms = torch.distributions.kl_divergence(q, prior)
    except NotImplementedError:
        w = q.rsample((num_samples,))
        terms = (q.log_prob(w) - prior.log_prob(w)).mean(0)
    return terms.sum() if keep is None else torch.where(keep, terms, 0.0).sum()


def _check_prior_shape(prior: torch.distributions.Distribution, param: Tensor) -> None:
    """Raise ``ValueError`` unless ``prior`` is per element of ``param``: no event shape,
    and a batch shape that broadcasts to ``param``'s without enlarging it. A larger one
    broadcast the KL terms and summed them, silently (a ``[out, in]`` prior counted a
    noisy bias ``out`` times, a ``[2, out, in]`` one the KL twice)."""
    try:
        fits = (prior.event_shape == ()
                and torch.broadcast_shapes(prior.batch_shape, param.shape) == param.shape)
    except RuntimeError:  # not broadcastable
        fits = False
    if not fits:
        raise ValueError(
            f"the prior {type(prior).__name__} has batch shape {tuple(prior.batch_shape)} "
            f"and event shape {tuple(prior.event_shape)}, which do not fit a parameter of "
            f"shape {tuple(param.shape)} element by element (the KL would be summed over "
            "the broadcast shape, or over events); pass a prior with scalar parameters "
            "(e.g. torch.distributions.Laplace(0.0, 1.0)), which applies to every weight and "
            "to a noisy bias alike, or one of the weight's exact shape for a layer without "
            "bias noise")


def _refuse_noisy_input(x: Tensor, layer: str, module: nn.Module | None = None) -> None:
    """A Bayesian layer's input must not carry a posterior variance (or, in ``mean``
    mode, the variance flow's probe): the layer's output variance ``s^2 sum_i x_i^2``
    would replace it, and the first layer's noise would vanish silently. The message
    names both layers where a converted model's forward is running."""
    if type(x) is VarianceTensor:
        this, earlier = noise_sources(x, module) if module is not None else (None, [])
        where = f" ({this!r})" if this else ""
        which = f"layer {', '.join(repr(n) for n in earlier)}" if earlier else "layer"
        fix = repr(earlier) if earlier else "its name"
        raise_error(
            f"the input of {layer}{where} carries the posterior variance of an earlier "
            f"Bayesian {which} (two weight layers with no spiking neuron between them), "
            "which this layer would drop: put a neuron between them, or keep the earlier "
            f"layer deterministic (exclude={fix} in to_sbnn, or use a plain nn.Linear / "
            "nn.Conv)", VarianceFlowError)


def _check_like_weight(x: Tensor, module: nn.Module, layer: str) -> None:
    """The input must be on the weights' device and (outside ``torch.autocast``) of their
    dtype: torch's own errors ("mat1 and mat2 must have the same dtype", "Tensor on device
    cpu is not on the expected device meta!") name neither the layer nor the fix. A
    parametrized weight is not computed here (torch's error remains)."""
    weight = module._parameters.get("weight")
    if weight is None:
        return
    if x.device != weight.device:  # check_device's own test first: no call where equal
        check_device(x, weight, layer, "its weights")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise_error(
            f"{layer} has {weight.dtype} weights but its input is {x.dtype}: convert the "
            f"input (x.to({weight.dtype})), cast the model (model.to(dtype)), or run under "
            "torch.autocast", TypeError)


def _check_features(x: Tensor, expected: int, dim: int, layer: str,
                    module: nn.Module | None = None) -> None:
    check_float("input", x)
    if module is not None:
        _check_like_weight(x, module, layer)
    if type(x) is VarianceTensor:  # _refuse_noisy_input's own test first
        _refuse_noisy_input(x, layer, module)
    elif module is not None and type(x) is Tensor:  # (spikes are what a layer takes)
        refuse_membrane_input(x, module, "the input")
    check_input(x, layer, affine=module is not None)
    if module is not None:
        check_noise_scales(module, means=True)
    refuse_data_dependent_shape(x, layer)
    if x.dim() == 0 or x.shape[dim] != expected:
        raise_error(
            f"{layer} expects {expected} input features in dimension {dim}, got input of "
            f"shape {concrete_shape(x)}", ValueError)


class BayesLinear(_BayesMixin, nn.Linear):
    """``nn.Linear`` with a Gaussian weight posterior (mean ``.weight``, std ``.std``).

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: learn an additive (posterior-mean) bias.
        std: initial posterior std; default ``0.5 / sqrt(in_features)``.
        std_mode: ``"layer"`` (one scalar, the paper's), ``"channel"`` or ``"weight"``.
        learn_std: learn the std through ``softplus(rho)``; ``False`` keeps it fixed
            (and allows ``std=0``).
        bias_std: initial std ``s_b`` of the bias posterior (``None``: no bias noise;
            needs ``bias=True``).
        detach_input_variance: detach ``x`` in the variance path (reference default).

    Shapes:
        input ``[*, in_features]`` -> output ``[*, out_features]`` (the mean, with its
        variance attached).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        std: float | None = None,
        std_mode: str = "layer",
        learn_std: bool = True,
        bias_std: float | None = None,
        detach_input_variance: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        _check_sizes(type(self).__name__, in_features=in_features, out_features=out_features)
        # nn.Linear's own (as the convolutions): a host's Linear subclass may follow in the
        # MRO of a subclass (SpikingJelly's layer.Linear), whose __init__ takes no device
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._init_posterior(std, std_mode, learn_std, bias_std, detach_input_variance)

    def _mean(self, x: Tensor) -> Tensor:
        params = self._parameters  # without nn.Module.__getattr__ where they are there
        weight = params["weight"] if "weight" in params else self.weight
        bias = params["bias"] if "bias" in params else self.bias
        return self._op(x, weight, bias)

    def _output_variance(self, x2: Tensor, s2: Tensor | None) -> Tensor:
        if self.std_mode == "weight":
            return self._op(x2, s2, None)
        field = x2.sum(-1, keepdim=True)
        return field if s2 is None else field * s2

    def _input_variance(self, x: Tensor, binary: bool, s2: Tensor | None) -> Tensor:
        if (self.std_mode == "weight" or binary
                or type(self)._output_variance is not BayesLinear._output_variance):
            return super()._input_variance(x, binary, s2)
        # sum_i x_i^2 in one pass, without an x^2 temporary (as large as the input)
        x, s2 = _variance_precision(x, s2)
        field = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square()
        return field if s2 is None else field * s2

    @staticmethod
    def _plain_op(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def _op_backward(grad: Tensor, x: Tensor, weight: Tensor, needs) -> tuple:
        g2 = grad.reshape(-1, grad.shape[-1])
        gx = grad @ weight if needs[0] else None
        gw = g2.t() @ x.reshape(-1, x.shape[-1]) if needs[1] else None
        gb = g2.sum(0) if needs[2] else None
        return gx, gw, gb

    def forward(self, x: Tensor) -> Tensor:
        with torch._C.DisableTorchFunctionSubclass():  # no_variance_flow(), inline
            _check_features(x, self.in_features, -1, "BayesLinear", self)
            return self._attach(self._mean(x), x)

    @classmethod
    def from_module(cls, module: nn.Linear, **kwargs) -> BayesLinear:
        """Build from an ``nn.Linear``, keeping its weight and bias as posterior means (and
        the pruning of a layer pruned with ``torch.nn.utils.prune``: a removed weight
        stays removed, without noise)."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(module).__name__}")
        _check_source(cls, module)
        w = module.weight
        layer = cls(
            module.in_features, module.out_features, module.bias is not None,
            device=w.device, dtype=w.dtype, **kwargs,
        )
        _copy_means(layer, module)
        return keep_ties(layer, module, {})  # a pruned module's mask (torch.nn.utils.prune)

    def to_module(self) -> nn.Linear:
        """Plain ``nn.Linear`` with the posterior means (the deployable layer), pruned as
        this layer is (``torch.nn.utils.prune``)."""
        w = self.weight
        plain = nn.Linear(
            self.in_features, self.out_features, self.bias is not None,
            device=w.device, dtype=w.dtype,
        )
        _copy_means(plain, self)
        return keep_ties(plain, self, {})  # a pruned layer's mask (torch.nn.utils.prune)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, std_mode={self.std_mode}, bias_noise={self.bias_noise}"


class _BayesConv(_BayesMixin):
    """Shared forward of the convolutional layers."""

    _plain: type[nn.modules.conv._ConvNd]

    def _mean(self, x: Tensor) -> Tensor:
        params = self._parameters  # without nn.Module.__getattr__ where they are there
        weight = params["weight"] if "weight" in params else self.weight
        bias = params["bias"] if "bias" in params else self.bias
        return self._op(x, weight, bias)

    def _output_variance(self, x2: Tensor, s2: Tensor | None) -> Tensor:
        if self.std_mode == "weight":
            return self._op(x2, s2, None)
        if self.groups != 1:
            if s2 is None:  # the per-layer std's unscaled field
                s2 = torch.ones((), dtype=x2.dtype, device=x2.device)
            per_out = s2.view(-1, *([1] * (self.weight.dim() - 1))) if s2.dim() else s2
            return self._conv_forward(x2, per_out.expand_as(self.weight), None)
        field = self._receptive_field_sum(x2)
        if s2 is None:
            return field
        if self.std_mode == "channel":  # [out] -> [out, 1, ...]: batched or unbatched
            return field * s2.view(-1, *([1] * (self.weight.dim() - 2)))
        return field * s2

    def _window_padding(self) -> tuple[int, ...] | None:
        """The zero padding per dimension where the receptive field is a plain window
        (zero padding, no dilation), else ``None``."""
        n = self.weight.dim() - 2
        pad = (0,) * n if self.padding == "valid" else self.padding
        if (self.padding_mode != "zeros" or isinstance(pad, str)
                or any(d != 1 for d in self.dilation)):
            return None
        return tuple(pad)

    def _receptive_field_sum(self, x2: Tensor) -> Tensor:
        """``sum_{i in field(j)} x2_i`` over channels and kernel window, one channel.

        Equals a convolution with an all-ones ``[1, C_in, *k]`` kernel. Where the layer
        allows it (no dilation, zero padding) it is computed as a channel sum followed by
        a separable window sum (:func:`~sbnn_addons.functional.box_sum`), which is cheaper
        on CPU.
        """
        n = self.weight.dim() - 2
        pad = self._window_padding()
        if pad is None:
            ones = torch.ones((1, *self.weight.shape[1:]), dtype=x2.dtype, device=x2.device)
            return self._conv_forward(x2, ones, None)
        return box_sum(x2.sum(dim=-n - 1, keepdim=True), self.kernel_size, self.stride, pad)

    def _input_variance(self, x: Tensor, binary: bool, s2: Tensor | None) -> Tensor:
        n = self.weight.dim() - 2
        pad = self._window_padding()
        if (self.std_mode == "weight" or self.groups != 1 or pad is None
                or x.dim() != n + 2 or (x.requires_grad and torch.is_grad_enabled())
                or type(self)._output_variance is not _BayesConv._output_variance
                or not kernels.can_window_sum(x, n)):
            return super()._input_variance(x, binary, s2)
        # channel sum, squares (unless x is 0/1) and window sum in one compiled pass
        field = kernels._window_sum(x, self.kernel_size, self.stride, pad,  # checked shapes
                                    channels=self.in_channels, square=not binary)
        if s2 is None:
            return field
        if self.std_mode == "channel":
            s2 = s2.view(1, -1, *([1] * n))
        return field * s2

    def _plain_op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self._conv_forward(x, weight, bias)

    def _compact_ok(self) -> bool:
        return self.padding_mode == "zeros" and not isinstance(self.padding, str)

    def _op_backward(self, grad: Tensor, x: Tensor, weight: Tensor, needs) -> tuple:
        n = weight.dim() - 2
        unbatched = x.dim() == n + 1
        if unbatched:
            x, grad = x.unsqueeze(0), grad.unsqueeze(0)
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]] if needs[2] else None, self.stride,
            self.padding, self.dilation, False, [0] * n, self.groups, list(needs),
        )
        return (gx.squeeze(0) if unbatched and gx is not None else gx), gw, gb

    def forward(self, x: Tensor) -> Tensor:
        with no_variance_flow():
            return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        n = self.weight.dim() - 2
        check_float("input", x)
        _check_like_weight(x, self, type(self).__name__)
        if type(x) is VarianceTensor:
            _refuse_noisy_input(x, type(self).__name__, self)
        elif type(x) is Tensor:  # (spikes are what a layer takes)
            refuse_membrane_input(x, self, "the input")
        check_input(x, type(self).__name__, affine=True)
        check_noise_scales(self, means=True)
        refuse_data_dependent_shape(x, type(self).__name__)
        if x.dim() not in (n + 1, n + 2) or x.shape[-n - 1] != self.in_channels:
            raise_error(
                f"{type(self).__name__} expects input [N, {self.in_channels}, ...] with "
                f"{n + 2} dimensions (or {n + 1} unbatched), got shape {concrete_shape(x)}",
                ValueError)
        return self._attach(self._mean(x), x)

    @classmethod
    def from_module(cls, module, **kwargs):
        """Build from a plain convolution, keeping its weight and bias as means (and the
        pruning of a layer pruned with ``torch.nn.utils.prune``)."""
        if type(module) is not cls._plain and not isinstance(module, cls._plain):
            raise TypeError(f"expected an {cls._plain.__name__}, got {type(module).__name__}")
        _check_source(cls, module)
        w = module.weight
        layer = cls(
            module.in_channels, module.out_channels, module.kernel_size,
            stride=module.stride, padding=module.padding, dilation=module.dilation,
            groups=module.groups, bias=module.bias is not None,
            padding_mode=module.padding_mode, device=w.device, dtype=w.dtype, **kwargs,
        )
        _copy_means(layer, module)
        return keep_ties(layer, module, {})  # a pruned module's mask (torch.nn.utils.prune)

    def to_module(self):
        """Plain convolution with the posterior means (the deployable layer), pruned as
        this layer is (``torch.nn.utils.prune``)."""
        w = self.weight
        plain = self._plain(
            self.in_channels, self.out_channels, self.kernel_size,
            stride=self.stride, padding=self.padding, dilation=self.dilation,
            groups=self.groups, bias=self.bias is not None, padding_mode=self.padding_mode,
            device=w.device, dtype=w.dtype,
        )
        _copy_means(plain, self)
        return keep_ties(plain, self, {})  # a pruned layer's mask (torch.nn.utils.prune)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, std_mode={self.std_mode}, bias_noise={self.bias_noise}"


def _check_source(cls: type, module: nn.Module) -> None:
    """Refuse what ``cls.from_module`` cannot rebuild faithfully: a lazy layer before its
    first forward (its input size unknown), a layer that is Bayesian
    already (a new one would drop its trained noise scales and ``std_mode``) and a weight
    computed by ``weight_norm`` / ``spectral_norm`` (the normalisation would be dropped,
    silently; the converters leave such a layer deterministic).

    Raises:
        TypeError: ``module`` is a Bayesian layer.
        ValueError: ``module`` is an uninitialised lazy layer, or its weight is normalised.
    """
    from torch.nn.parameter import is_lazy
    from torch.nn.utils import parametrize

    if is_lazy(module.weight):
        raise ValueError(
            f"{cls.__name__}.from_module: the {type(module).__name__} is lazy and not "
            "initialised yet (its input size is unknown); run one forward pass through it "
            "(or the model) first, then convert it")
    if is_bayesian(module):
        raise TypeError(
            f"{cls.__name__}.from_module: {type(module).__name__} is already Bayesian; a "
            "new layer would drop its noise scales (std, std_mode): copy it with "
            "copy.deepcopy, or pass its plain layer (layer.to_module())")
    kind = legacy_weight_norm(module)
    if kind is not None:
        fix = f"torch.nn.utils.remove_{kind}(layer)"
    elif parametrize.is_parametrized(module, "weight"):
        kind = "a parametrization (weight_norm, spectral_norm, ...)"
        fix = "torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight')"
    else:
        return
    raise ValueError(
        f"{cls.__name__}.from_module: the weight of this {type(module).__name__} is "
        f"computed by {kind}, a normalisation the Bayesian layer would drop (its posterior "
        f"mean is a plain weight); bake the weight in first, {fix}, to train it without "
        "the normalisation")


#: the library's variance formulas, which give ``s^2 F`` for a per-layer std
_SCALAR_STD_FORMULAS = (BayesLinear._output_variance, _BayesConv._output_variance)


def _check_sizes(layer: str, *, positive: tuple[str, ...] = (), **sizes) -> None:
    """Raise ``ValueError`` for a size that is not a non-negative integer (or a tuple of
    them), or not >= 1 for the names in ``positive``: torch failed with "Trying to create
    tensor with negative dimension" or "empty(): argument 'size' failed to unpack", naming
    neither the layer nor the argument (a size of 0 is named as "no synapses"), and a
    negative ``padding`` or a ``dilation`` of 0 only at the first forward."""
    for name, value in sizes.items():
        low = 1 if name in positive else 0
        values = value if isinstance(value, tuple) else (value,)
        if not values or any(isinstance(v, bool) or not isinstance(v, numbers.Integral)
                             or v < low for v in values):
            tuples = (" (or a tuple of them)"
                      if name in ("kernel_size", "stride", "padding", "dilation") else "")
            least = 0 if name == "padding" else 1  # a size of 0 is named as no synapses
            raise ValueError(f"{layer}: {name} must be an integer >= {least}{tuples}, got "
                             f"{value!r}")


def _conv_init(self, plain, args, kwargs):
    post = {k: kwargs.pop(k) for k in
            ("std", "std_mode", "learn_std", "bias_std", "detach_input_variance") if k in kwargs}
    try:
        bound = inspect.signature(plain.__init__).bind(self, *args, **kwargs).arguments
    except TypeError:
        bound = {}  # a missing or unknown argument: the host's own error below
    _check_sizes(type(self).__name__, positive=("stride", "dilation"), **{
        k: bound[k] for k in ("in_channels", "out_channels", "kernel_size", "stride",
                              "dilation", "padding")
        if k in bound and not (k == "padding" and isinstance(bound[k], str))})
    plain.__init__(self, *args, **kwargs)
    self._init_posterior(
        post.get("std"), post.get("std_mode", "layer"), post.get("learn_std", True),
        post.get("bias_std"), post.get("detach_input_variance", True),
    )


class BayesConv1d(_BayesConv, nn.Conv1d):
    """``nn.Conv1d`` with a Gaussian weight posterior; arguments as :class:`BayesLinear`
    plus those of ``nn.Conv1d``. Input ``[N, C_in, L]`` -> mean ``[N, C_out, L_out]``."""

    _plain = nn.Conv1d

    def __init__(self, *args, **kwargs) -> None:
        _conv_init(self, nn.Conv1d, args, kwargs)


class BayesConv2d(_BayesConv, nn.Conv2d):
    """``nn.Conv2d`` with a Gaussian weight posterior; arguments as :class:`BayesLinear`
    plus those of ``nn.Conv2d``. Input ``[N, C_in, H, W]`` -> mean ``[N, C_out, H', W']``.

    With the per-layer std the variance is one ones-kernel convolution producing a single
    channel, ``s^2 * sum over the receptive field of x^2``, shared by all output channels.
    """

    _plain = nn.Conv2d

    def __init__(self, *args, **kwargs) -> None:
        _conv_init(self, nn.Conv2d, args, kwargs)


def _half_autocast(x: Tensor) -> bool:
    """Whether ``torch.autocast`` with float16 (CUDA's default AMP dtype) is on for ``x``'s
    device: it would run the variance's linear maps and convolutions in float16."""
    device = x.device.type
    if device == "meta":  # autocast knows no meta device (and a meta tensor has no values)
        return False
    return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16


def _no_half_autocast(x: Tensor):
    """A context with float16 autocast off for the variance path (a float16 ``s^2`` is 0
    below a std of 2.4e-4, and ``x^2`` sums overflow at 65504: the noise vanished or
    became inf under AMP); a no-op otherwise (bfloat16 has float32's range)."""
    if _half_autocast(x):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def _variance_precision(x: Tensor, s2: Tensor | None):
    """``(x, s2)`` in float32 where ``x`` is a float16 input (its ``x^2`` and
    receptive-field sums overflow float16's 65504, and ``s^2``, already float32, would
    underflow there), spikes too; unchanged otherwise."""
    if x.dtype is not torch.float16:
        return x, s2
    return x.float(), (s2.float() if isinstance(s2, Tensor) else s2)


def current_tensor(module: nn.Module, name: str = "weight") -> Tensor:
    """The ``weight`` (or ``bias``) that ``module``'s next forward computes with.

    ``torch.nn.utils.prune`` and the hook-based ``torch.nn.utils.weight_norm`` /
    ``spectral_norm`` recompute the attribute in a forward pre-hook (from ``<name>_orig``
    and ``<name>_mask``, or ``<name>_g`` and ``<name>_v``): between an optimiser step and
    the next forward the attribute still holds the value from before the step. This
    computes it from the trained tensors instead (a spectral norm without a power
    iteration, as in eval mode)."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    with torch.no_grad():
        for hook in module._forward_pre_hooks.values():
            if getattr(hook, "name", None) != name:
                continue
            if isinstance(hook, WeightNorm):
                return hook.compute_weight(module)
            if isinstance(hook, SpectralNorm):
                return hook.compute_weight(module, do_power_iteration=False)
        mask, orig = module._buffers.get(name + "_mask"), module._parameters.get(name + "_orig")
        if mask is not None and orig is not None:
            return orig * mask
    return getattr(module, name)


def _stepped_weight(module: nn.Module) -> Tensor:
    """The parameter an optimiser steps for ``module.weight``: ``weight_orig``
    (``torch.nn.utils.prune``, the hook-based ``spectral_norm``), ``weight_v`` (the
    hook-based ``weight_norm``), a parametrization's first original, else the weight."""
    params = module._parameters
    for key in ("weight_orig", "weight_v"):
        if params.get(key) is not None:
            return params[key]
    plists = module.__dict__.get("_modules", {}).get("parametrizations")
    if plists is not None and "weight" in plists:
        plist = plists["weight"]
        return plist.original if hasattr(plist, "original") else plist.original0
    return module.weight


def trained(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module``'s ``weight`` (or ``bias``) is trained: the parameters it is
    computed from require a gradient (``<name>_orig`` of ``torch.nn.utils.prune`` or the
    hook-based ``spectral_norm``, ``<name>_g`` / ``<name>_v`` of the hook-based
    ``weight_norm``, the originals of a ``torch.nn.utils.parametrize`` parametrization),
    not the computed tensor, which a forward under ``torch.no_grad()`` leaves without a
    gradient."""
    from torch.nn.utils import parametrize

    params = module._parameters
    if params.get(name + "_orig") is not None:
        return params[name + "_orig"].requires_grad
    parts = [params.get(name + "_g"), params.get(name + "_v")]
    if any(p is not None for p in parts):
        return any(p is not None and p.requires_grad for p in parts)
    if parametrize.is_parametrized(module, name):
        return any(p.requires_grad for p in module.parametrizations[name].parameters())
    return getattr(module, name).requires_grad


def _copy_means(dst: nn.Module, src: nn.Module) -> None:
    """Weight and bias values (those of ``src``'s next forward: :func:`current_tensor`),
    and whether they are trained (:func:`trained`: a frozen layer stays frozen)."""
    with torch.no_grad():
        dst.weight.copy_(current_tensor(src, "weight"))
        if src.bias is not None:
            dst.bias.copy_(current_tensor(src, "bias"))
    dst.weight.requires_grad_(trained(src, "weight"))
    if src.bias is not None:
        dst.bias.requires_grad_(trained(src, "bias"))


def legacy_weight_norm(module: nn.Module) -> str | None:
    """``"weight_norm"`` or ``"spectral_norm"`` where ``module``'s weight is computed by
    the legacy ``torch.nn.utils.weight_norm`` / ``torch.nn.utils.spectral_norm`` (a
    forward pre-hook, from ``weight_g`` and ``weight_v`` or ``weight_orig``), else
    ``None``. A converter leaves such a layer deterministic: a Bayesian layer built from
    it would train the weight it had at conversion, the normalisation dropped silently."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, (WeightNorm, SpectralNorm)) and hook.name == "weight":
            return "weight_norm" if isinstance(hook, WeightNorm) else "spectral_norm"
    return None


def warn_deterministic_layers(model: nn.Module, excluded: Callable[[str], bool],
                              host: str) -> None:
    """Warn about weight layers a converter leaves deterministic because it has no
    Bayesian version of them (``nn.Conv3d``, ``nn.ConvTranspose2d``, ``nn.Embedding``,
    ...) or because their weight is parametrized (``weight_norm``, ``spectral_norm``, by
    ``torch.nn.utils.parametrizations`` or the legacy hooks of
    :func:`legacy_weight_norm`): modules with a weight matrix that are neither Bayesian
    nor excluded."""
    from torch.nn.utils import parametrize

    left, parametrized, legacy = [], False, set()
    for name, m in model.named_modules():
        if is_bayesian(m) or excluded(name):
            continue
        kind = legacy_weight_norm(m)
        if kind is not None:
            left.append(f"'{name}' ({type(m).__name__} with torch.nn.utils.{kind})")
            legacy.add(kind)
        elif parametrize.is_parametrized(m, "weight"):
            # a parametrized Linear / Conv is another class (ParametrizedLinear) whose
            # weight is computed: no converter takes it
            cls = type(m).__bases__[0] if type(m).__bases__ else type(m)
            left.append(f"'{name}' ({cls.__name__} with a parametrized weight)")
            parametrized = True
        elif isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() >= 2:
            left.append(f"'{name}' ({type(m).__name__})")
    if left:
        fix = ("; to convert a parametrized layer, bake its weight in first: "
               "torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight')"
               if parametrized else "")
        fix += "".join(f"; to convert a layer with torch.nn.utils.{k}, bake its weight in "
                       f"first: torch.nn.utils.remove_{k}(layer)" for k in sorted(legacy))
        warnings.warn(
            f"{host} to_sbnn: {len(left)} weight layer(s) stay deterministic (no Bayesian "
            f"version of them): {', '.join(left[:8])}{' ...' if len(left) > 8 else ''}; "
            f"pass exclude= with their names to leave them out knowingly{fix}", stacklevel=3)


def keep_ties(new: nn.Module, src: nn.Module, seen: dict[int, nn.Parameter],
              adopt: bool = False) -> nn.Module:
    """Give ``new`` (built from ``src`` by a conversion or an export) the parameter object
    already made for a weight or bias that ``src`` shares with a module converted before
    (tied weights stay tied); ``seen`` maps ``id`` of a source parameter to its new one.

    With ``adopt`` (a conversion), ``new`` takes ``src``'s own weight and bias objects as
    its posterior means (same values, shape, dtype and device): an optimizer, a parameter
    group, a hook or a weight-decay list that holds them keeps working on the converted
    model.

    A ``src`` pruned with ``torch.nn.utils.prune`` (``weight_orig`` and ``weight_mask``,
    and likewise for the bias) gives ``new`` the same pruning
    (``prune.custom_from_mask``): its ``weight_orig`` is ``src``'s (adopted or tied as
    above), so the removed weights and biases stay removed in the converted or exported
    model instead of training again from 0.

    With ``adopt``, ``new`` also takes ``src``'s forward and backward hooks (see
    :func:`_adopt_hooks`): a monitor registered on the layer before an ``inplace``
    conversion keeps recording it. Returns ``new``."""
    masks = {}  # {name: (mask, <name>_orig)} of each pruned tensor
    for name in ("weight", "bias"):
        mask, orig = src._buffers.get(name + "_mask"), src._parameters.get(name + "_orig")
        if mask is not None and isinstance(orig, nn.Parameter):
            masks[name] = (mask, orig)
    if adopt:
        _adopt_hooks(new, src)
    for name in ("weight", "bias"):
        old, made = getattr(src, name, None), getattr(new, name, None)
        slot = name  # where new keeps the parameter
        if name in masks:
            old = masks[name][1]
            if name + "_orig" in new._parameters:  # pruned already (by from_module)
                slot = name + "_orig"
                made = new._parameters[slot]
        if not isinstance(old, nn.Parameter) or not isinstance(made, nn.Parameter):
            continue
        if id(old) in seen:
            setattr(new, slot, seen[id(old)])
        elif adopt and old.shape == made.shape and old.dtype == made.dtype:
            setattr(new, slot, old)
            seen[id(old)] = old
        else:
            if name in masks and made.shape == old.shape:
                with torch.no_grad():  # the pruned weights' values too, as <name>_orig
                    made.copy_(old)
            seen[id(old)] = made
    for name, (mask, _) in masks.items():
        made = getattr(new, name, None)
        if (name + "_orig" not in new._parameters and isinstance(made, nn.Parameter)
                and made.shape == mask.shape):
            from torch.nn.utils import prune

            prune.custom_from_mask(new, name, mask.detach().clone())
    return new


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_backward_pre_hooks", "_backward_hooks")


def _adopt_hooks(new: nn.Module, src: nn.Module) -> None:
    """Give ``new``, which replaces ``src`` in a model, ``src``'s forward and backward hooks
    (a SpikingJelly / snnTorch monitor's, a user's ``register_forward_hook``): the same
    dictionaries, so that the hooks' handles still remove them. The hooks of PyTorch's
    weight reparametrisations (``torch.nn.utils.prune``, whose pruning :func:`keep_ties`
    gives ``new`` itself, and the hook-based ``weight_norm`` / ``spectral_norm``, which
    read parameters ``new`` does not have) are left out; a layer with one gets the other
    forward pre-hooks in a dictionary of its own (``src`` is left as it is), after the
    pruning ``new`` has already (``from_module`` of a pruned layer)."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    reparametrisations = (BasePruningMethod, WeightNorm, SpectralNorm)
    for attr in _HOOK_DICTS:
        hooks = src.__dict__.get(attr)
        if hooks is None:
            continue
        if attr == "_forward_pre_hooks" and any(
                isinstance(h, reparametrisations) for h in hooks.values()):
            # new's own pruning (from_module's, of src's mask) first, then src's others
            own = [(k, h) for k, h in new._forward_pre_hooks.items()
                   if isinstance(h, BasePruningMethod)]
            hooks = type(hooks)(own + [(k, h) for k, h in hooks.items()
                                       if not isinstance(h, reparametrisations)])
        new.__dict__[attr] = hooks
    new._is_full_backward_hook = src._is_full_backward_hook
    if isinstance(new, _BayesMixin):
        new._guard_forward_hooks()


#: Default posterior std of a converted layer, as a fraction of the RMS of its weights.
CONVERTED_STD_FRACTION = 0.1


def folded_batchnorm_scale(bn: nn.modules.batchnorm._BatchNorm) -> Tensor:
    """The per-channel scale a BatchNorm applies in eval mode: ``gamma / sqrt(var + eps)``
    (``gamma`` alone without running statistics, 1 without an affine)."""
    with torch.no_grad():
        if bn.track_running_stats and bn.running_var is not None:
            scale = 1.0 / torch.sqrt(bn.running_var.float() + bn.eps)
        else:
            scale = torch.ones(bn.num_features)
        if bn.affine and bn.weight is not None:  # a removed weight (None) is 1
            scale = scale.to(bn.weight.device) * bn.weight.float()
    return scale


def converted_std(weight: Tensor, fraction: float | None = None,
                  scale: Tensor | None = None, mask: Tensor | None = None) -> float:
    """Initial posterior std of a converted layer: a fraction (default
    :data:`CONVERTED_STD_FRACTION`) of its weights' RMS.

    .. code-block:: text

        s = fraction * RMS(W)                 (scale=None)
        s = fraction * RMS(scale[o] * W[o])   (a folded BatchNorm's scale per output o)

    The noise of the pre-activation is then ``fraction`` times the spread of its signal,
    ``var(a) = s^2 sum x^2`` against ``RMS(W)^2 sum x^2``, whatever the scale of the
    ported weights. A mean-only :class:`ChannelAffine` folded from a BatchNorm multiplies
    the mean by ``scale`` but not the variance, so the scale is folded into ``s`` to keep
    the same signal-to-noise ratio. With a pruning ``mask`` (``torch.nn.utils.prune``) the
    RMS is that of the kept weights: a pruned weight adds neither signal nor noise, so
    counting its zero would shrink the noise of the kept synapses (by ``sqrt(kept
    fraction)``). Weights that are all zero give ``0.5 / sqrt(fan_in)``,
    the layers' own default, and so do weights on the ``meta`` device (a model built
    there has no values: after ``to_empty()``, a converted layer's ``reset_parameters()``
    sizes its std from the weights it draws, and a loaded checkpoint brings its own).
    """
    if weight.is_meta:
        return 0.5 / math.sqrt(max(weight[0].numel(), 1))
    w = weight.detach().float()
    if scale is not None:
        w = w * scale.detach().float().to(w.device).view(-1, *([1] * (w.dim() - 1)))
    if mask is not None:
        w = w[mask.detach().to(w.device) != 0]
    rms = float(w.pow(2).mean().sqrt()) if w.numel() else 0.0
    if not (rms > 0 and math.isfinite(rms)):
        return 0.5 / math.sqrt(max(weight[0].numel(), 1))
    return float(CONVERTED_STD_FRACTION if fraction is None else fraction) * rms


def fold_channel_std(layer: nn.Module, folded_bn: nn.modules.batchnorm._BatchNorm | None,
                     posterior: dict) -> nn.Module:
    """Fold a BatchNorm's per-channel scale into a converted layer's initial std, channel
    by channel, where the std has one value per output channel or weight
    (``std_mode="channel"`` / ``"weight"``) and was not given:

    .. code-block:: text

        s_o = |scale_o| * fraction * RMS(W)

    the noise a BatchNorm kept after the layer (``batchnorm="keep"``) would give channel
    ``o`` in eval mode, since the mean-only :class:`ChannelAffine` that replaces it scales
    the mean by ``scale_o`` but not the variance. A per-layer std keeps the layer-wide fold
    of :func:`converted_std`. A channel whose scale is 0 (constant output) gets a std
    ``1e-6`` times the layer's. Where the std was not given, the layer's
    ``reset_parameters()`` then sizes it from the weights it draws by the same rule (a
    converted std is relative to the weights). A BatchNorm on the ``meta`` device has no
    statistics to fold: its layer keeps the layer-wide rule, the scale of a BatchNorm as
    ``reset_parameters()`` leaves it (1). Returns ``layer``."""
    if posterior.get("std") is not None or not is_bayesian(layer):
        return layer
    scale = None if folded_bn is None else folded_batchnorm_scale(folded_bn).detach()
    if scale is not None and scale.is_meta:
        scale = None
    per_channel = scale is not None and getattr(layer, "std_mode", "layer") != "layer"
    # reset_parameters() sizes the std from the weights it draws, by the same rule
    layer.__dict__[_CONVERTED_STD] = (scale, per_channel)
    if not per_channel:
        return layer
    layer._init_stds = (_converted_init_std(layer.weight, scale, True, layer._pruning_mask()),
                        layer._init_stds[1])
    layer._reset_posterior()
    return layer


_CONVERTED_STD = "_sbnn_converted_std"  # (BatchNorm scale or None, per channel): the rule


def _converted_init_std(weight: Tensor, scale: Tensor | None, per_channel: bool,
                        mask: Tensor | None = None):
    """A converted layer's initial std from its weights (the kept ones of a pruned layer):
    :func:`converted_std` (with a folded BatchNorm's scale), or per channel
    ``|scale_o| * converted_std(W)`` (:func:`fold_channel_std`)."""
    if not per_channel:
        return converted_std(weight, scale=scale, mask=mask)
    base = converted_std(weight, mask=mask)
    return (scale.abs().to(weight.device) * base).clamp_min(1e-6 * base)


def converted_layer_kwargs(module: nn.Module, posterior: dict,
                           folded_bn: nn.modules.batchnorm._BatchNorm | None = None) -> dict:
    """The posterior arguments a converter passes to ``from_module(module, ...)``.

    ``posterior`` (``std``, ``std_mode``, ``learn_std``, ``bias_std``) as given, except:
    bias noise only where ``module`` has a bias (``bias_std=None`` otherwise), and where
    ``std`` is ``None`` the :func:`converted_std` of ``module.weight`` (its kept weights
    where it is pruned), with the scale of ``folded_bn`` (a BatchNorm folded after it)
    included.
    """
    kw = dict(posterior)
    if module.bias is None:
        kw["bias_std"] = None
    if kw.get("std") is None:
        mask = (module._buffers.get("weight_mask") if "weight_orig" in module._parameters
                else None)  # torch.nn.utils.prune
        scale = None if folded_bn is None else folded_batchnorm_scale(folded_bn)
        kw["std"] = converted_std(current_tensor(module), scale=scale, mask=mask)
    return kw


def batchnorm_after(model: nn.Module, weight_types: tuple) -> dict[str, str]:
    """``{layer name: BatchNorm name}`` (qualified names) for each BatchNorm that directly
    follows a weight layer of ``weight_types`` in the model's module order and normalises
    its outputs (as many channels as the layer has outputs): the BatchNorm a converter
    folds into that layer's noise. Parameter-free modules between them (pooling, dropout,
    flattening) leave the pair as it is; a spiking neuron or a module with parameters of
    its own between them breaks it (``conv -> neuron -> BatchNorm`` normalises spikes, not
    the convolution's outputs)."""
    out: dict[str, str] = {}
    last = None
    for name, m in _outside_neurons(model):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if last is not None and last[1].weight.shape[0] == m.num_features:
                out[last[0]] = name
            last = None
        elif type(m) in weight_types:
            last = (name, m)
        elif last is not None and _between_breaks_fold(m):
            last = None
    return out


def _is_neuron(m: nn.Module) -> bool:
    """A spiking neuron: an snnTorch one (a ``spike_grad``), a SpikingJelly one (a
    ``surrogate_function``)."""
    return hasattr(m, "spike_grad") or hasattr(m, "surrogate_function")


def _outside_neurons(model: nn.Module):
    """``model.named_modules()`` without the root and without the parts of a neuron (an
    ``snn.RLeaky``'s ``recurrent`` layer, a surrogate), which run inside the neuron."""
    inside = None
    for name, m in model.named_modules():
        if not name or (inside is not None and name.startswith(inside)):
            continue
        inside = name + "." if _is_neuron(m) else None
        yield name, m


def _between_breaks_fold(m: nn.Module) -> bool:
    """Whether ``m``, met between a weight layer and a BatchNorm in module order, stands
    between the layer's outputs and what the BatchNorm normalises: a spiking neuron (an
    snnTorch one, with a ``spike_grad``; a SpikingJelly one, with a
    ``surrogate_function``; an SBNN spike function or neuron) or a module with parameters
    of its own (another weight layer, a normalisation)."""
    return (isinstance(m, SBNNModule) or _is_neuron(m)
            or next(m.parameters(recurse=False), None) is not None)


class _CallOrder:
    """What the pairing hooks of one model share (names only, so that a copy of the model
    keeps a consistent one): the watched module called last, the output channels of the
    layers a BatchNorm after them folds into, each BatchNorm's channels, the class names
    (for messages), and, when checking, the layer each BatchNorm's scale was folded into
    (``None``: none); when recording, the modules each BatchNorm was called after."""

    error: tuple | None = None  # (what an order pickled before the attribute reads)

    def __init__(self, outs: dict[str, int], features: dict[str, int],
                 kinds: dict[str, str], expected: dict[str, str | None] | None = None,
                 host: str = "") -> None:
        self.last: str | None = None
        self.outs, self.features, self.kinds = outs, features, kinds
        self.expected, self.host = expected, host
        self.follows: dict[str, set] = {}
        self.error: tuple | None = None  # (bn, folded, last): found while compiling

    def folds_into(self, bn: str, before: str | None) -> str | None:
        """The layer a BatchNorm called right after ``before`` folds into: ``before``
        where it is such a layer with one output per channel of the BatchNorm."""
        return before if before is not None and self.outs.get(before) == self.features[bn] \
            else None


class _CallOrderHook:
    """Forward pre-hook of a watched module (and forward hook of one with watched parts
    of its own, ``post``): at a BatchNorm, records (or checks) the module called before
    it; then the module is the last one called."""

    def __init__(self, order: _CallOrder, name: str, post: bool = False) -> None:
        # (module_name, not name: torch's weight_norm / spectral_norm hooks have a name)
        self.order, self.module_name, self.post = order, name, post

    def __call__(self, module, args, *output):
        order, name = self.order, self.module_name
        if torch.compiler.is_compiling():
            # a first call that is compiled checks the pairs while the graph is traced
            # (the call order is the graph's); the recording of example_input is eager
            if order.expected is None:
                return None
            if not self.post and name in order.expected:
                folded = order.expected[name]
                if order.folds_into(name, order.last) != folded and order.error is None:
                    order.error = (name, folded, order.last)  # raised after the call
            order.last = name
            return None
        if not self.post and name in order.features:
            if order.expected is None:
                order.follows.setdefault(name, set()).add(order.last)
            elif name in order.expected:
                folded = order.expected[name]
                if order.folds_into(name, order.last) != folded:
                    raise _pairing_error(order, name, folded)
        order.last = name
        return None


class _PairingRootHook:
    """The root's forward pre-hook (a call starts: nothing called yet) and forward hook
    (the first call ran through: the check is done, its hooks are removed)."""

    def __init__(self, order: _CallOrder, post: bool) -> None:
        self.order, self.post = order, post

    def __call__(self, module, args, *output):
        if torch.compiler.is_compiling():
            # a compiled call checks the pairs (_CallOrderHook) but cannot remove the
            # hooks inside a graph: the first eager call removes them
            order = self.order
            if not self.post:
                order.last, order.error = None, None
            elif order.error is not None:
                name, folded, order.last = order.error  # (the message names it)
                raise_error(str(_pairing_error(order, name, folded)), ValueError)
            return None
        order = self.order
        if self.post:
            if order.error is not None:  # found in a compiled part of this call
                name, folded, order.last = order.error
                raise _pairing_error(order, name, folded)
            remove_batchnorm_pairing_check(module)
        else:
            order.last, order.error = None, None
        return None


def _pairing_error(order: _CallOrder, bn: str, folded: str | None) -> ValueError:
    before = order.last

    def named(n: str) -> str:
        return f"{n!r} ({order.kinds[n]})"

    fold = (f"the initial posterior std of {named(folded)}" if folded is not None else
            "no layer (no weight layer is declared right before it)")
    actual = ("no module (it is the first module the forward calls)" if before is None
              else named(before))
    if order.folds_into(bn, before) is not None:
        actual += ", whose outputs it normalises"
    wrong = " and ".join(repr(n) for n in dict.fromkeys(
        n for n in (folded, order.folds_into(bn, before)) if n is not None))
    host = f"sbnn_addons.{order.host}." if order.host else ""
    return ValueError(
        "batchnorm='affine' paired each BatchNorm with the weight layer declared right "
        f"before it, and folded the scale of BatchNorm {bn!r} into {fold}, but the forward "
        f"calls {bn!r} right after {actual}: the initial noise of {wrong} is off by the "
        "BatchNorm's scale. Convert "
        f"with {host}to_sbnn(model, batchnorm='affine', example_input=x) (x: what one call "
        "of the model takes), which pairs each BatchNorm with the module the forward calls "
        "right before it, or declare the modules in the order the forward calls them")


def _watch(model: nn.Module, order: _CallOrder) -> list:
    """Install the hooks of ``order`` on the modules whose calls decide what a BatchNorm
    follows: weight layers, BatchNorms and their affines, neurons and any other module
    with parameters of its own (outside neurons: the parts of a neuron run inside it).
    Parameter-free modules (pooling, dropout, flattening) are not watched: a BatchNorm
    after them still follows the layer before them. Returns the handles."""
    handles = []
    for name, m in _outside_neurons(model):
        norm = isinstance(m, (nn.modules.batchnorm._BatchNorm, ChannelAffine))
        if not (norm or _between_breaks_fold(m)):
            continue
        order.kinds[name] = type(m).__name__
        handles.append(m.register_forward_pre_hook(_CallOrderHook(order, name)))
        if next(m.children(), None) is not None and not (_is_neuron(m) or is_bayesian(m)):
            # its own watched parts run inside it: after it, it is the last one called
            handles.append(m.register_forward_hook(_CallOrderHook(order, name, post=True)))
    return handles


def batchnorm_call_pairs(model: nn.Module, example_input, weight_types: tuple
                         ) -> dict[str, str]:
    """``{layer name: BatchNorm name}`` like :func:`batchnorm_after`, by the order one
    forward ``model(example_input)`` calls the modules instead of the order the model
    declares them: a BatchNorm called right after a weight layer of ``weight_types`` with
    one output per channel of the BatchNorm folds into it; one called after a neuron or
    another module with parameters of its own folds into nothing. Parameter-free modules
    (pooling, dropout, flattening) called between them leave the pair as it is. The
    forward runs under ``torch.no_grad()`` with ``model.eval()``, with forward pre-hooks
    on the modules that decide the pairs; afterwards the hooks are removed and the
    model's train flags, buffers (neuron membranes, BatchNorm statistics) and SpikingJelly
    memories are as before. A BatchNorm the forward calls after different layers, or
    after a layer other BatchNorms follow too, folds into nothing, with a warning. A
    compiled model (``torch.compile(net)``, ``net.compile()``) runs the model it wraps
    eagerly (:func:`~sbnn_addons.base.eager_calls`): the hooks do nothing in a graph.
    """
    order = _CallOrder({}, {}, {})
    handles = _watch(model, order)
    modules = dict(model.named_modules())
    for name in order.kinds:
        m = modules[name]
        if type(m) in weight_types:
            order.outs[name] = m.weight.shape[0]
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            order.features[name] = m.num_features
    snapshot = _snapshot(model)
    try:
        model.eval()
        # a compiled host: its eager calls (the hooks do nothing in a compiled graph)
        with torch.no_grad(), eager_calls(model) as net:
            net(example_input)
    except Exception as err:
        err.add_note(
            "(raised by the forward model(example_input) that batchnorm='affine' runs on "
            "the model before converting it, to pair each BatchNorm with the layer the "
            "forward calls right before it; example_input is what one call of the model "
            "takes)")
        raise
    finally:
        for h in handles:
            h.remove()
        _restore(snapshot)
    claims: dict[str, list[str]] = {}
    unclear = []
    for bn, before in order.follows.items():
        layers = {order.folds_into(bn, b) for b in before}
        if len(layers) > 1:
            unclear.append(bn)
        elif None not in layers:
            claims.setdefault(layers.pop(), []).append(bn)
    pairs = {}
    for layer_name, bns in claims.items():
        if len(bns) == 1:
            pairs[layer_name] = bns[0]
        else:
            unclear.extend(bns)
    if unclear:
        warnings.warn(
            f"batchnorm='affine' folds the scale of BatchNorm "
            f"{', '.join(repr(n) for n in sorted(unclear))} into no layer: the forward "
            "called it after different modules, or called other BatchNorms after the same "
            "layer; the initial posterior std of such a layer is sized without a "
            "BatchNorm's scale (pass std= to set it)", UserWarning, stacklevel=3)
    return pairs


def check_batchnorm_pairing(model: nn.Module, folds: dict[str, str], affine_bns: set[str],
                            host: str = "") -> nn.Module:
    """Check, at the first forward of a converted ``model``, the pairs that
    ``batchnorm="affine"`` folded by declaration order (:func:`batchnorm_after`):
    each BatchNorm of ``affine_bns`` (now a :class:`ChannelAffine`) must be called right
    after the Bayesian layer its scale was folded into (``folds``, ``{layer: BatchNorm}``),
    and one folded into no layer not right after a Bayesian layer with one output per
    channel. Forward pre-hooks on the modules that decide it (see :func:`_watch`) and the
    root record the call order; the first call of ``model`` that runs through removes
    them (:func:`remove_batchnorm_pairing_check`), so later calls cost nothing. A call
    that finds a pair the forward does not call back to back raises a ``ValueError``
    naming the BatchNorm, the layer its scale was folded into, the module it follows and
    the fix (``example_input=``); the hooks stay, so every later call raises too.
    ``host`` names the converter's module in the message. A model compiled before its
    first eager call is checked while ``torch.compile`` traces its graph (a
    ``RuntimeError`` with the same message); the hooks stay until an eager call runs
    through. Returns ``model``."""
    modules = dict(model.named_modules())
    expected = {bn: None for bn in affine_bns}
    for layer_name, bn in folds.items():
        if bn in expected and is_bayesian(modules.get(layer_name)):
            expected[bn] = layer_name
    if not expected:
        return model
    order = _CallOrder({}, {}, {}, expected, host)
    _watch(model, order)
    for name in order.kinds:
        m = modules[name]
        if is_bayesian(m):
            order.outs[name] = m.weight.shape[0]
        elif name in expected:
            order.features[name] = m.num_features
    model.register_forward_pre_hook(_PairingRootHook(order, post=False))
    model.register_forward_hook(_PairingRootHook(order, post=True))
    return model


def remove_batchnorm_pairing_check(model: nn.Module) -> nn.Module:
    """Remove the hooks of :func:`check_batchnorm_pairing` from ``model`` (every
    submodule). Returns ``model``."""
    for m in model.modules():
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for key in [k for k, h in hooks.items()
                        if isinstance(h, (_CallOrderHook, _PairingRootHook))]:
                del hooks[key]
    return model


def affine_batchnorm_plan(model: nn.Module, weight_types: tuple, batchnorm_types: tuple,
                          layer_selected: Callable[[str], bool],
                          excluded: Callable[[str], bool],
                          only_folded: bool, example_input=None,
                          ) -> tuple[dict[str, str], set[str]]:
    """What a converter's ``batchnorm="affine"`` does to ``model``: the folds
    ``{layer name: BatchNorm name}`` (a BatchNorm directly after a converted layer: with
    ``example_input``, the layer one forward calls right before it, see
    :func:`batchnorm_call_pairs`; else in module order, see :func:`batchnorm_after`,
    which the converter checks at the first call with :func:`check_batchnorm_pairing`)
    and the names of the BatchNorms it replaces by a
    :class:`ChannelAffine`: every BatchNorm not ``excluded`` (a name or a module
    containing it matched by ``exclude``) of ``batchnorm_types``, only those folded into a
    converted layer with ``only_folded`` (an ``include`` list: the BatchNorms of the
    converted layers).

    Raises:
        ValueError: a BatchNorm to replace has no running statistics
            (``track_running_stats=False``: it always normalises by the batch's own
            statistics, which no fixed affine equals).
    """
    types = dict(model.named_modules())
    pairs = (batchnorm_after(model, weight_types) if example_input is None
             else batchnorm_call_pairs(model, example_input, weight_types))
    after = {layer: bn for layer, bn in pairs.items()
             if layer_selected(layer) and not excluded(bn)}
    folds = {layer: bn for layer, bn in after.items() if type(types[bn]) in batchnorm_types}
    _warn_batchnorms_kept(types, batchnorm_types, excluded,
                          set(after.values()) if only_folded else None)
    replaced = set()
    for name, m in model.named_modules():
        if (type(m) not in batchnorm_types or excluded(name)
                or (only_folded and name not in folds.values())):
            continue
        if not m.track_running_stats or m.running_var is None:
            raise ValueError(
                f"batchnorm='affine' needs running statistics, but BatchNorm {name!r} has "
                "none (track_running_stats=False: it normalises every batch by its own "
                "statistics, which no fixed affine equals); keep it with batchnorm='keep' "
                "or leave it out with exclude=")
        replaced.add(name)
    untrained = [name for name in sorted(replaced) if _initial_statistics(types[name])]
    if untrained:
        warnings.warn(
            f"batchnorm='affine' folds the running statistics of BatchNorm "
            f"{', '.join(repr(n) for n in untrained[:8])}{' ...' if len(untrained) > 8 else ''}"
            ", which never ran in training mode (num_batches_tracked = 0, the initial mean 0 "
            "and var 1): the folded affine does not normalise, and the converted network "
            "trains without it. Convert an untrained model with batchnorm='keep' (the "
            "default), or load the trained weights and statistics before converting. "
            "(Building the model only to load a checkpoint of the converted model into "
            "it, load_state_dict(checkpoint), this warning can be ignored: the load "
            "restores the folded affines.)", UserWarning, stacklevel=3)
    return folds, replaced


def _warn_batchnorms_kept(modules: dict[str, nn.Module], batchnorm_types: tuple,
                          excluded: Callable[[str], bool], only: set[str] | None) -> None:
    """Warn about the BatchNorms that ``batchnorm="affine"`` leaves as they are: those of
    another class than ``batchnorm_types`` (``nn.BatchNorm3d``, ``nn.SyncBatchNorm``,
    SpikingJelly's ``ThresholdDependentBatchNorm2d`` / ``TemporalEffectiveBatchNorm2d``,
    ...), not ``excluded``; with ``only`` (an ``include`` list), only those among these
    names. They keep normalising by batch statistics in training mode, as with
    ``batchnorm="keep"``."""
    left = [f"'{name}' ({type(m).__name__})" for name, m in modules.items()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and type(m) not in batchnorm_types and not excluded(name)
            and (only is None or name in only)]
    if left:
        kinds = ", ".join(dict.fromkeys(t.__name__ for t in batchnorm_types))
        warnings.warn(
            f"batchnorm='affine' replaces {kinds} only: {len(left)} BatchNorm(s) stay as "
            f"they are, {', '.join(left[:8])}{' ...' if len(left) > 8 else ''}, and keep "
            "normalising by batch statistics in training mode (as with batchnorm='keep'); "
            "pass exclude= with their names to keep them knowingly", UserWarning,
            stacklevel=4)


def _initial_statistics(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """Whether ``bn`` holds the statistics it was built with: it never ran in training
    mode (``num_batches_tracked = 0``) and nothing set them (mean 0, var 1)."""
    count = getattr(bn, "num_batches_tracked", None)
    if count is None or count.is_meta or bn.running_mean is None or bn.running_var.is_meta:
        return False
    with torch.no_grad():
        return (int(count) == 0 and not bool(bn.running_mean.any())
                and bool((bn.running_var == 1).all()))


def fold_batchnorms(model: nn.Module, folds: dict[str, str], affine_bns: set[str],
                    posterior: dict,
                    make_affine: Callable[[nn.Module], nn.Module] | None = None,
                    ) -> dict[str, nn.Module]:
    """Fold, on the unchanged ``model``, what a converter's plan
    (:func:`affine_batchnorm_plan`) folds: every BatchNorm of ``affine_bns`` into its
    affine, and the scale of every BatchNorm of ``folds`` into its layer's initial std,
    so that a BatchNorm that cannot be folded raises before a converter changes anything
    (a failed ``inplace=True`` conversion leaves the model as it was).

    Args:
        model: the model before conversion.
        folds: ``{layer name: BatchNorm name}``.
        affine_bns: names of the BatchNorms replaced by an affine.
        posterior: the layers' posterior keywords (``std``, ``std_mode``, ...).
        make_affine: builds the affine of a BatchNorm (default
            :meth:`ChannelAffine.from_batchnorm`; a host adapter passes its own).

    Returns:
        ``{BatchNorm name: its affine}`` for ``affine_bns``: new modules with their own
        parameters, for the converted model (also when it is a copy of ``model``).

    Raises:
        ValueError: naming the BatchNorm that cannot be folded, and why.
    """
    make_affine = make_affine or ChannelAffine.from_batchnorm
    modules = dict(model.named_modules())
    affines: dict[str, nn.Module] = {}

    def fold(name: str, fn: Callable[[], object]):
        try:
            return fn()
        except (RuntimeError, TypeError, ValueError) as err:
            raise ValueError(
                f"batchnorm='affine' cannot fold BatchNorm {name!r} "
                f"({type(modules[name]).__name__}): {err}. Check its weight, bias and "
                "running statistics (one value per channel), keep it with "
                f"batchnorm='keep', or leave it out with exclude=[{name!r}]") from err

    for name in sorted(affine_bns):
        affines[name] = fold(name, lambda bn=modules[name]: make_affine(bn))
    for lay, bn in folds.items():
        fold(bn, lambda lay=modules[lay], bn=modules[bn]: converted_layer_kwargs(
            lay, posterior, bn))
    return affines


def is_bayesian(module: nn.Module) -> bool:
    """``True`` for the Bayesian layers of this module."""
    return isinstance(module, _BayesMixin)


class ChannelAffine(nn.Module):
    """Per-channel affine on the **mean only** (replaces BatchNorm, Method page, section 2).

    .. code-block:: text

        y = gamma[c] * x + beta[c],   var(y) = var(x)   (noise left unscaled)

    A BatchNorm's state dict loads into it (``load_state_dict`` of a host checkpoint into a
    converted model): when the entries hold ``running_mean`` / ``running_var``, they are
    folded with the BatchNorm's ``weight`` / ``bias`` (1 / 0 where absent) and ``eps``
    into ``gamma = weight / sqrt(running_var + eps)``, ``beta = bias - running_mean *
    gamma``, as :meth:`from_batchnorm` does, never copied raw.

    Args:
        num_features: number of channels ``C``.
        channel_dim: dimension of ``C`` in the input (1 for ``[N, C, ...]``).
        eps: the BatchNorm's ``eps``, used to fold a BatchNorm state dict on loading.

    Shapes:
        input ``[N, C, *]`` -> output of the same shape.
    """

    def __init__(self, num_features: int, channel_dim: int = 1, eps: float = 1e-5) -> None:
        super().__init__()
        for name, value, low in (("num_features", num_features, 1), ("channel_dim",
                                                                      channel_dim, None)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (
                    low is not None and value < low):
                raise ValueError(f"{name} must be an integer{' >= 1' if low else ''}, got "
                                 f"{value!r}")
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (
                0 <= eps < math.inf):
            raise ValueError(f"eps must be a finite number >= 0 (a BatchNorm's eps), got "
                             f"{eps!r}")
        self.num_features = num_features
        self.channel_dim = channel_dim
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_load_state_dict_pre_hook(_fold_batchnorm_entries)

    def reset_parameters(self) -> None:
        """Set the affine back to the identity (``gamma = 1``, ``beta = 0``), as built and
        as a BatchNorm's ``reset_parameters()`` does, e.g. after building on the ``meta``
        device and ``to_empty()`` (uninitialised memory)."""
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.fill_(0.0)

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm) -> ChannelAffine:
        """Fold a BatchNorm's running statistics and affine into a ChannelAffine.

        A BatchNorm whose ``weight`` or ``bias`` is ``None`` (``affine=True`` with the
        parameter removed, e.g. the per-step BatchNorms of SpikingJelly's
        ``layer.BatchNormThroughTime2d``, which have no bias) is folded with a weight of
        1 and a bias of 0; the ChannelAffine's parameter for it is frozen, as the
        BatchNorm did not learn one. A frozen BatchNorm's affine stays frozen.

        Raises:
            ValueError: the BatchNorm has no running statistics
                (``track_running_stats=False``: it normalises every batch by its own
                statistics, in eval mode too, which no fixed affine equals).
        """
        if not bn.track_running_stats or bn.running_var is None:
            raise ValueError(
                f"ChannelAffine.from_batchnorm needs running statistics, but this "
                f"{type(bn).__name__} has none (track_running_stats=False: it normalises "
                "every batch by its own statistics, in eval mode too, which no fixed affine "
                "equals); keep the BatchNorm, or build it with track_running_stats=True and "
                "train it before folding")
        affine = cls(bn.num_features, eps=bn.eps)
        weight = bn.weight if bn.affine else None
        bias = bn.bias if bn.affine else None
        ref = next((t for t in (weight, bias, bn.running_var) if t is not None), None)
        if ref is not None:  # the BatchNorm's device and dtype (float64, bfloat16, ...)
            affine = affine.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            scale = 1.0 / torch.sqrt(bn.running_var + bn.eps)
            shift = -bn.running_mean * scale
            if weight is not None:
                scale, shift = scale * weight, shift * weight
            if bias is not None:
                shift = shift + bias
            affine.weight.copy_(scale)
            affine.bias.copy_(shift)
        if bn.affine:  # a frozen BatchNorm's affine stays frozen; a missing one is frozen
            affine.weight.requires_grad_(weight is not None and weight.requires_grad)
            affine.bias.requires_grad_(bias is not None and bias.requires_grad)
        return affine

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() <= self.channel_dim or x.shape[self.channel_dim] != self.num_features:
            raise_error(
                f"ChannelAffine expects {self.num_features} channels in dimension "
                f"{self.channel_dim}, got shape {concrete_shape(x)}", ValueError)
        check_device(x, self._parameters.get("weight"), "ChannelAffine")
        if check_finite.enabled() and not in_checked_model():  # a converted model's entry
            check_input(x, "ChannelAffine")  # checks its input and parameters
            _check_affine_parameters(self)
        elif torch.compiler.is_compiling():  # (that of its parameters is eager-only)
            _check_affine_parameters(self)
        var = raw_variance(x)  # passed on as stored (a factored one stays factored)
        with no_variance_flow():
            shape = [1] * x.dim()
            shape[self.channel_dim] = -1
            out = x * self.weight.view(shape) + self.bias.view(shape)
        return attach_computed_variance(out, var)

    def extra_repr(self) -> str:
        return f"{self.num_features}, channel_dim={self.channel_dim}"


def _check_affine_parameters(module: ChannelAffine) -> None:
    """Raise if the ``weight`` (gamma) or ``bias`` (beta) of a :class:`ChannelAffine`
    used outside a converted model holds NaN / inf: every output of its channel would be
    NaN / inf, silently. As :func:`~sbnn_addons.moments.check_noise_scales`: tested again
    only when a version changed (an optimiser step, ``load_state_dict``, an in-place
    edit); while ``torch.compile`` traces, a runtime assert in the graph (a
    ``RuntimeError``)."""

    def message(name: str, what: str) -> str:
        return (
            f"{type(module).__name__}.{name} ({'gamma' if name == 'weight' else 'beta'}) "
            f"holds {what}: every output of its channel would be "
            "NaN / inf and train on into NaN gradients, silently. Restore it (a checkpoint, "
            "or module.reset_parameters()) and remove the cause (a NaN loss or gradient: "
            "clip the gradients, lower the learning rate); to skip this check for speed use "
            "sbnn_addons.check_finite(False)")

    if torch.compiler.is_compiling():
        for name in ("weight", "bias"):
            assert_finite(module._parameters.get(name), message(name, "NaN / inf values"))
        return
    check_finite_once(
        module, [(n, module._parameters.get(n)) for n in ("weight", "bias")],
        "_sbnn_affine_checked",
        lambda name, nan, inf: message(name, f"{nan} NaN and {inf} inf values"))


def _fold_batchnorm_entries(module: ChannelAffine, state_dict: dict, prefix: str,
                            local_metadata, strict, missing_keys, *_: object) -> None:
    """Load-state-dict pre-hook of :class:`ChannelAffine`: fold a BatchNorm's entries.

    ``gamma = weight / sqrt(running_var + eps)``, ``beta = bias - running_mean * gamma``
    (``weight`` 1 and ``bias`` 0 where the BatchNorm had no affine). The running entries
    and ``num_batches_tracked`` are consumed, so a strict load reports only true
    mismatches. A state dict of a ``ChannelAffine`` itself loads unchanged.

    A state dict that also holds the noise scale of a Bayesian layer (loaded before this
    affine, as the layer a BatchNorm follows is) is that of a converted model that kept its
    BatchNorms (``batchnorm="keep"``): they scaled the noise by ``gamma`` per channel,
    which the mean-only affine does not, so the noise its stds were trained for changes by
    ``1 / |gamma|`` per channel. That load warns (once per ``load_state_dict`` call).
    """
    mean_key, var_key = prefix + "running_mean", prefix + "running_var"
    if mean_key not in state_dict and var_key not in state_dict:
        return
    if _LOADED_NOISE[0] is missing_keys and _LOAD_WARNED_KEEP[0] is not missing_keys:
        _LOAD_WARNED_KEEP[0] = missing_keys  # the list this load_state_dict call shares
        warnings.warn(
            f"load_state_dict: the state dict holds noise scales and the BatchNorm entries "
            f"of {prefix.rstrip('.')!r}: a checkpoint of a converted model that kept its "
            "BatchNorms (batchnorm='keep'), which scale the noise per channel by "
            "weight / sqrt(running_var + eps). A ChannelAffine (batchnorm='affine') folds "
            "them into the mean only, so the noise the loaded stds were trained for changes "
            "by 1 / |that scale| per channel. Load it into the model converted with "
            "batchnorm='keep' to run it as trained", UserWarning,
            stacklevel=6 + prefix.count("."))  # load_state_dict's caller (hook wrapped)
    if mean_key not in state_dict or var_key not in state_dict:
        raise ValueError(
            f"ChannelAffine {prefix.rstrip('.')!r}: the state dict holds only one of "
            f"{mean_key!r} and {var_key!r}; a BatchNorm's entries fold into the affine only "
            "with both running statistics")
    def like_module(t: Tensor) -> Tensor:
        # a module on the meta device (loaded with assign=True) takes the checkpoint's
        # values: folded onto the meta device, they would be lost
        return t if module.weight.is_meta else t.to(module.weight)

    running_mean = like_module(state_dict.pop(mean_key))
    running_var = like_module(state_dict.pop(var_key))
    state_dict.pop(prefix + "num_batches_tracked", None)
    weight = state_dict.get(prefix + "weight")
    bias = state_dict.get(prefix + "bias")
    weight = torch.ones_like(running_var) if weight is None else like_module(weight)
    bias = torch.zeros_like(running_mean) if bias is None else like_module(bias)
    gamma = weight / torch.sqrt(running_var + module.eps)
    state_dict[prefix + "weight"] = gamma
    state_dict[prefix + "bias"] = bias - running_mean * gamma
