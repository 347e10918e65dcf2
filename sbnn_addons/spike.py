"""Drop-in stochastic spike function with an IW-ST backward.

:class:`IWSTSpike` has the contract of snnTorch's ``spike_grad`` and SpikingJelly's
``surrogate_function``: ``forward(u) -> spikes`` with ``u = membrane - threshold``.
Its noise variance is the sum of

* the variance attached to ``u`` by a linked Bayesian layer (propagated through the
  neuron's own dynamics by :mod:`sbnn_addons.moments`), and
* its own noise std ``s_n`` (fixed, or learnable with a softplus parameter per layer or
  per neuron), added at every step and not accumulated: ``sigma^2 = V_t + s_n^2``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import operator
import warnings
import weakref
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from . import kernels
from . import moments as _moments
from .base import (
    SBNNModule,
    as_float,
    as_int,
    cached_tensor_test,
    call_eagerly,
    check_device,
    check_finite,
    check_flag,
    check_input,
    check_module,
    check_std,
    checkpoint_hooks_active,
    checkpoint_recomputing,
    checkpoint_without_rng_replay,
    computed_std,
    concrete_shape,
    forward_ad_active,
    graph_breaks_allowed,
    in_reentrant_recomputation,
    inverse_softplus,
    noise_scale,
    raise_error,
    shared_square,
    tracks_grad,
    variance_dtype,
)
from .estimators import BernoulliSpike, Estimator, _standard_normal, get_estimator
from .functional import (
    SIGMA_MIN,
    apply_function,
    check_float,
    mark_binary,
    safe_sqrt,
)
from .moments import (
    UnknownVariance,
    VarianceFlowError,
    attach_computed_variance,
    check_noise_scales,
    get_variance,
    in_checked_model,
)
from .optim import register_noise_owner
from .tensors import AUX_PULL_Z_MAX, aux_pull_gradient, broadcasts_to

__all__ = ["IWSTSpike", "seed_spikes", "recomputing_forward", "DEFAULT_SPIKE_STD",
           "CONVERTED_SPIKE_STD", "DEFAULT_AUX_PULL", "AUX_PULL_Z_MAX", "aux_pull_gradient"]

#: Default own noise std of a drop-in spike function, ``1 / sqrt(2 pi) = 0.3989...``.
#: With own noise ``s`` and the ST estimator the expected gradient is
#: ``dE[h]/du = phi(u / s) / s``, a Gaussian surrogate of width ``s`` in expectation; its
#: peak ``phi(0) / s`` is 1 at this ``s``, the peak of the hosts' default surrogates
#: (snnTorch ``atan(alpha=2)``, SpikingJelly ``Sigmoid(alpha=4)`` and ``ATan(alpha=2)``).
DEFAULT_SPIKE_STD = 1.0 / math.sqrt(2.0 * math.pi)

#: Default own noise std of the spike functions of a converted model (learned, one per
#: neuron layer), the drop-in default: a floor under the posterior noise,
#: ``sigma^2 = V + s_n^2``, so that a neuron whose inputs are silent (``V = 0``) still
#: passes a gradient and can recover, with at least the peak of the hosts' surrogates.
CONVERTED_SPIKE_STD = DEFAULT_SPIKE_STD

#: Default :attr:`IWSTSpike.aux_pull` of drop-in spike functions and converted models: the
#: auxiliary loss's gradient at this fraction of the gradient reaching the spikes
#: (measured on the hosts' tutorial models, see the training page).
DEFAULT_AUX_PULL = 1e-3

_RECOMPUTING = [0]  # depth of recomputations (activation checkpointing) in progress
#: The sbnn_addons.checkpoint forwards in progress, innermost last: per forward, the ids
#: of the seeded spike functions whose draws its recomputation replays and the ids of the
#: modules whose state (a ``_memories`` dict) it puts back
_CHECKPOINT_FORWARDS: list[tuple[set[int], set[int]]] = []
#: The missing-keys list of the last load_state_dict call that warned of a spike noise
#: std of another form (one warning per call).
_LOAD_WARNED: list = [None]
_OPTIMIZER_STEPS: list = [0, None]  # torch.optim steps taken, the hook's handle
_SPIKE_FUNCTIONS: weakref.WeakSet = weakref.WeakSet()  # every IWSTSpike (the hook's view)

_STALE_AUX_MESSAGE = (
    "auxiliary loss terms collected before the last optimiser step (or another change of "
    "the parameters: load_state_dict, DistributedDataParallel's broadcast when it wraps "
    "the model) were never used: add sbnn_addons.aux_loss(model) to the loss (or pass "
    "aux_weight to sbnn_objective), run forwards that train nothing under torch.no_grad() "
    "or model.eval(), or stop collecting them with "
    "sbnn_addons.enable_aux_loss(model, False) (to_sbnn(..., aux_loss=False))")


_FORWARD_AD_MESSAGE = (
    "forward-mode AD (torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad) "
    "reached an SBNN spike function, whose IW-ST gradient is defined for the backward "
    "pass only: use reverse mode (torch.func.grad, vjp, jacrev, or .backward())")


def _refuse_tangents(*tensors: Tensor | None) -> None:
    """Raise :data:`_FORWARD_AD_MESSAGE` where a tensor carries a forward-mode tangent
    (inside a ``torch.func.jvp`` or a ``torch.autograd.forward_ad`` dual level)."""
    unpack = torch.autograd.forward_ad.unpack_dual
    if any(t is not None and unpack(t).tangent is not None for t in tensors):
        raise NotImplementedError(_FORWARD_AD_MESSAGE)


def check_aux_pull(value) -> float:
    """``value`` as a float ``>= 0``.

    Raises:
        TypeError: not a real number.
        ValueError: negative or not finite.
    """
    if (number := as_float(value)) is None:
        raise TypeError(f"aux_pull must be a number >= 0, got {type(value).__name__}")
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(f"aux_pull must be a finite number >= 0, got {number}")
    return number


def relative_spike_std(spike_std: float | None, threshold: float) -> float | None:
    """A converter's ``spike_std`` (in units of the neuron's threshold) as a std:
    ``spike_std * |threshold|``, a threshold of 0 (or not finite) counting as 1."""
    if not spike_std:
        return spike_std
    scale = abs(float(threshold))
    return spike_std * (scale if 0.0 < scale < math.inf else 1.0)


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    """``torch.optim`` step post-hook: count the step, and mark the auxiliary terms still
    held by a spike function as stale (a compiled step reads the mark: it cannot read the
    count without recompiling at every step)."""
    _OPTIMIZER_STEPS[0] += 1
    for spike in list(_SPIKE_FUNCTIONS):
        if spike.__dict__.get("_aux_terms"):
            spike._aux_stale = True


def _watch_optimizer_steps() -> None:
    """Register :func:`_count_optimizer_step` (once)."""
    if _OPTIMIZER_STEPS[1] is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _OPTIMIZER_STEPS[1] = register_optimizer_step_post_hook(_count_optimizer_step)


@torch.compiler.assume_constant_result
def _drop_stale_aux_terms() -> bool:
    """Drop the terms of every spike function marked stale (run in Python also while
    tracing: the compiled step raises next, so it would not apply them)."""
    for spike in list(_SPIKE_FUNCTIONS):
        if spike.__dict__.get("_aux_stale"):
            spike._aux_terms = []
            spike._aux_stale = False
    return True


class _AuxPull(torch.autograd.Function):
    """``spikes`` unchanged in the forward; in the backward the drive ``u`` also gets
    :func:`aux_pull_gradient` of the gradient reaching the spikes. Under ``torch.func``
    (where it runs, see :meth:`IWSTSpike.fire`) its generated vmap rule maps the backward
    too: each mapped slice (an ensemble's member, a per-sample gradient's example) is
    pulled with its own ``mean|dL/dh|``, as the slice alone in eager mode."""

    generate_vmap_rule = True

    @staticmethod
    def forward(spikes: Tensor, u: Tensor, sigma: Tensor, weight: float) -> Tensor:
        # a copy, not a view (which a custom function's output could not be changed in
        # place as), of the values only (the caller marks it binary again)
        return torch.empty_like(spikes, memory_format=torch.preserve_format).copy_(spikes)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, u, sigma, weight = inputs
        ctx.save_for_backward(u, sigma)
        ctx.weight = weight

    @staticmethod
    def backward(ctx, grad: Tensor):
        u, sigma = ctx.saved_tensors
        return grad, aux_pull_gradient(grad, u, sigma, ctx.weight), None, None


@contextlib.contextmanager
def checkpointed_forward(spikes: Sequence[IWSTSpike] = (),
                         stateful: Sequence[nn.Module] = ()) -> Iterator[None]:
    """Mark the first forward of an :func:`sbnn_addons.checkpoint.checkpoint` region: the
    seeded ``spikes`` (the region's ``modules=``) may draw there, since the recomputation
    replays their generators; another seeded spike function raises. ``stateful``: the
    modules whose ``_memories`` the recomputation puts back (see
    :func:`checkpoint_restores_state`)."""
    _CHECKPOINT_FORWARDS.append(({id(m) for m in spikes}, {id(m) for m in stateful}))
    try:
        yield
    finally:
        _CHECKPOINT_FORWARDS.pop()


def in_checkpoint_forward() -> bool:
    """Whether this call runs in the first forward of an
    :func:`sbnn_addons.checkpoint.checkpoint` region (not its recomputation), whose
    recomputation in the backward runs it again (with gradients: without, nothing is
    recomputed). Eager mode only."""
    return (bool(_CHECKPOINT_FORWARDS) and not _RECOMPUTING[0] and torch.is_grad_enabled()
            and not torch.compiler.is_compiling())


def checkpoint_restores_state(module: nn.Module) -> bool:
    """Whether the innermost :func:`sbnn_addons.checkpoint.checkpoint` forward puts
    ``module``'s state back for its recomputation (``module`` is in its ``modules=``)."""
    return bool(_CHECKPOINT_FORWARDS) and id(module) in _CHECKPOINT_FORWARDS[-1][1]


@contextlib.contextmanager
def recomputing_forward() -> Iterator[None]:
    """Mark a forward as a recomputation for activation checkpointing: spike functions
    draw as usual but do not collect the auxiliary loss terms a second time."""
    _RECOMPUTING[0] += 1
    try:
        yield
    finally:
        _RECOMPUTING[0] -= 1


def in_torch_checkpoint() -> bool:
    """Whether this call runs in a region of ``torch.utils.checkpoint`` other than
    :func:`sbnn_addons.checkpoint.checkpoint`'s: the forward or recomputation of a
    non-reentrant one (its saved-tensor hooks), or the recomputation of a reentrant one
    (``use_reentrant=True``, the default, whose forward runs without gradients and cannot
    be told from an evaluation), which runs inside its backward node. Eager mode only."""
    if _CHECKPOINT_FORWARDS or _RECOMPUTING[0] or torch.compiler.is_compiling():
        return False
    return checkpoint_hooks_active() or in_reentrant_recomputation(False)


class IWSTSpike(SBNNModule, nn.Module):
    """Stochastic spike ``h = 1[u + sigma eps > 0]`` with an IW-ST gradient.

    .. code-block:: text

        sigma^2 = V(u) + s_n^2          V(u): variance attached to u by Bayesian layers
        h       = 1[u + sigma * eps > 0],  eps ~ N(0, 1)
        dh/du   = w(h) phi(z) / sigma,  dh/dsigma = -z dh/du,  z = u / sigma

    Args:
        estimator: ``"st"``, ``"iwst(p)"``, ``"agr(tau)"`` or an
            :class:`~sbnn_addons.estimators.Estimator`.
        std: the spike function's own noise std ``s_n`` (``None`` or 0: none).
        learn_std: learn ``s_n`` through ``softplus(rho)`` (requires ``std > 0``).
        std_shape: shape of the learnable std: ``()`` per layer, or the neuron shape
            without the batch dimension (e.g. ``(C, H, W)``) per neuron.
        use_input_variance: read the variance attached to ``u`` (default ``True``).
        at_zero: fire when the noisy drive equals 0 (SpikingJelly's ``>=`` convention).
        threshold: threshold of the host neuron, used by ``aux_center="zero"`` only.
        aux_center: ``"threshold"`` (``z = u / sigma``, default) or ``"zero"``
            (``z = (u + threshold) / sigma``, the reference code's centring).
        aux_std_grad: let the auxiliary loss's gradient reach ``sigma`` (the variance, so
            the layers' and this function's stds), as the released code does. Default
            ``False``: ``sigma`` is held constant in ``z``, so the loss pulls membranes
            towards the threshold (a silent unit gets a gradient back) instead of
            growing the noise: with a learned std at a weight of 1e-3 .. 1, the released
            form lowers ``z^2`` mostly by inflating ``sigma`` until the noise drowns the
            signal.
        batch_dim: dimension of ``u`` that indexes examples (1 for ``[T, B, ...]`` input),
            over which the auxiliary loss is averaged; a drive without that dimension
            raises ``ValueError`` when the loss is collected (a 0-d drive with
            ``batch_dim=0`` is one example).
        aux_pull: apply the auxiliary loss through the gradient, at this fraction of the
            gradient that reaches the spikes (0: off). In training mode with gradients
            on, the backward adds to the drive's gradient

            .. code-block:: text

                aux_pull * mean(|dL/dh|) * 2 clamp(z, -3, 3) / sigma

            (the mean over this call's spikes, per step of a fused sequence; ``sigma``
            held constant; :func:`aux_pull_gradient`): the gradient of
            ``aux_pull * mean(|dL/dh|) * sum huber(z)`` (``z^2`` within 3, linear beyond)
            with the mean held constant. A unit far below its threshold, where the
            estimator's gradient ``phi(z) / sigma`` vanishes, is pulled back: a silent
            neuron recovers in a training loop that does not add
            :func:`sbnn_addons.aux_loss` to its loss. Scaled by the task's own gradient,
            it needs no tuning to the loss's scale; the printed loss is the task's. The
            clamp bounds how much of a later call's pull (through a reset or a deeper
            layer, part of ``dL/dh``) one call passes on. Drop-in spike functions and
            converted models use :data:`DEFAULT_AUX_PULL`.

    Shapes:
        ``u``: ``[*]``; output: ``[*]``, same dtype, values in {0, 1}.
    """

    def __init__(
        self,
        estimator: str | Estimator = "st",
        *,
        std: float | None = None,
        learn_std: bool = False,
        std_shape: Sequence[int] = (),
        use_input_variance: bool = True,
        at_zero: bool = False,
        threshold: float = 1.0,
        aux_center: str = "threshold",
        aux_std_grad: bool = False,
        batch_dim: int = 0,
        aux_pull: float = 0.0,
    ) -> None:
        super().__init__()
        self.estimator = get_estimator(estimator)
        learn_std = check_flag("learn_std", learn_std)
        if not isinstance(std_shape, Sequence) or isinstance(std_shape, str) or not all(
                isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1
                for n in std_shape):
            raise TypeError(f"std_shape must be a sequence of sizes >= 1: the neuron shape "
                            f"without the batch dimension ((C,) for [B, C] input, (C, H, W) "
                            f"for [B, C, H, W]), or () for one std; got {std_shape!r}")
        use_input_variance = check_flag("use_input_variance", use_input_variance)
        at_zero = check_flag("at_zero", at_zero)
        std = check_std("std", 0.0 if std is None else std, allow_zero=not learn_std)
        if aux_center not in ("threshold", "zero"):
            raise ValueError(f"aux_center must be 'threshold' or 'zero', got {aux_center!r}")
        if not isinstance(aux_std_grad, bool):
            raise TypeError(f"aux_std_grad must be a bool, got {type(aux_std_grad).__name__}")
        aux_pull = check_aux_pull(aux_pull)
        if (isinstance(threshold, bool) or not isinstance(threshold, (numbers.Real, Tensor))
                or (isinstance(threshold, Tensor) and threshold.numel() != 1)
                or math.isnan(float(threshold))):
            raise ValueError(f"threshold must be a number (not NaN), got {threshold!r}")
        if isinstance(batch_dim, bool) or not isinstance(batch_dim, numbers.Integral):
            raise TypeError(f"batch_dim must be an int (the dimension of u that indexes "
                            f"examples, 1 for [T, B, ...]), got {batch_dim!r}")
        self.learn_std = bool(learn_std)
        if self.learn_std:
            self.std_rho = nn.Parameter(torch.full(tuple(std_shape), inverse_softplus(std)))
        else:
            self.register_buffer("fixed_std", torch.full(tuple(std_shape), std))
        self._init_std = std
        self.use_input_variance = use_input_variance
        self.at_zero = at_zero
        self.threshold = float(threshold)
        self.aux_center = aux_center
        self.aux_std_grad = aux_std_grad
        self.batch_dim = int(batch_dim)
        self.collect_aux = False
        self._aux_pull = aux_pull
        self._aux_terms: list[Tensor] = []
        self._aux_version: int | None = None
        self._aux_stale = False  # terms held at an optimiser step (set by its hook)
        self._aux_read = False  # terms read (pop_aux) and none collected since
        self._seed: int | None = None
        self._generator: torch.Generator | None = None
        _SPIKE_FUNCTIONS.add(self)
        register_noise_owner(self)
        _watch_optimizer_steps()

    #: ``(neuron, host)`` of the converted neuron that owns this function (set by the
    #: converters), which the error of a gradient through noiseless spikes names
    #: (:func:`refuse_gradient_without_noise`); ``None``: the function's own class.
    noiseless_owner: tuple[str, str] | None = None
    _aux_pull = 0.0  # what a spike function pickled before the pull existed reads
    _aux_stale = False  # and before the stale mark existed
    _aux_read = False  # and before the read mark existed

    @property
    def threshold(self) -> float:
        """The host neuron's threshold (a float; assigning checks it and sets
        :attr:`threshold_finite`)."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        try:
            if isinstance(value, (bool, str, bytes)):
                raise TypeError
            value = float(value)
        except (TypeError, ValueError, RuntimeError):  # a string, None, a list, a tensor
            raise TypeError(f"threshold must be a number (the host neuron's threshold), got "
                            f"{value!r} ({type(value).__name__})") from None
        if math.isnan(value):
            raise_error("threshold must be a number (not NaN), got nan", ValueError)
        self._threshold = value
        # A bool next to the float: what decides whether auxiliary terms and the pull
        # apply. A compiled graph guards a bool attribute as a constant, where a
        # comparison of a float that Dynamo made symbolic (after it changed between
        # calls) is not guarded, and a graph traced for a finite threshold would run
        # for an infinite one.
        self._threshold_finite = math.isfinite(value)

    @property
    def threshold_finite(self) -> bool:
        """Whether :attr:`threshold` is finite (an infinite one: a membrane readout that
        never fires, which collects no auxiliary terms and gets no pull)."""
        return self._threshold_finite

    @property
    def estimator(self) -> Estimator:
        """The gradient estimator (an :class:`~sbnn_addons.estimators.Estimator`);
        assigning takes what the constructor takes (``"st"``, ``"iwst(p)"``,
        ``"agr(tau)"`` or an ``Estimator``) and checks it."""
        return self._estimator

    @estimator.setter
    def estimator(self, value: str | Estimator) -> None:
        self._estimator = get_estimator(value)

    @property
    def aux_pull(self) -> float:
        """The auxiliary pull's weight (class docstring; 0: off); assigning checks it."""
        return self._aux_pull

    @aux_pull.setter
    def aux_pull(self, value: float) -> None:
        self._aux_pull = check_aux_pull(value)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        """PyTorch's load, naming a checkpoint's own std of another form: a learned std
        (``std_rho``) where this one is fixed (``fixed_std``) or the reverse warns (with
        ``strict=False`` it would be dropped), and one of another ``std_shape`` raises an
        error that names both shapes."""
        own, other = ("std_rho", "fixed_std") if self.learn_std else ("fixed_std", "std_rho")
        key = prefix + own
        saved = state_dict.get(key)
        target = getattr(self, own)
        mismatch = None
        if isinstance(saved, Tensor) and saved.shape != target.shape:
            mismatch = (
                f"size mismatch for {key}: the checkpoint's spike noise std has shape "
                f"{tuple(saved.shape)}, that of a spike function built with std_shape="
                f"{tuple(saved.shape)}, but this {type(self).__name__} has std_shape="
                f"{tuple(target.shape)}: build it with std_shape={tuple(saved.shape)} to "
                "load it")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        if mismatch is not None:
            bare = f"size mismatch for {key}:"
            error_msgs[:] = [m for m in error_msgs if not m.startswith(bare)]
            error_msgs.append(mismatch)
        if (saved is None and prefix + other in state_dict
                and _LOAD_WARNED[0] is not missing_keys):
            _LOAD_WARNED[0] = missing_keys  # one warning per load_state_dict call
            warnings.warn(
                f"load_state_dict: the state dict holds the spike noise std "
                f"{prefix + other!r} of a spike function built with learn_std="
                f"{not self.learn_std}, but this {type(self).__name__} has learn_std="
                f"{self.learn_std} ({key!r}), and the same may hold for other spike "
                "functions: loaded with strict=False, those stds are dropped and these keep "
                "their values. Build the model as the saved one (a "
                "converter's spike_std=None gives a fixed std of 0)", UserWarning,
                stacklevel=4 + prefix.count("."))

    def reset_parameters(self) -> None:
        """Set the noise std back to its initial value (e.g. after building on the ``meta``
        device and ``to_empty()``)."""
        with torch.no_grad():
            if self.learn_std:
                self.std_rho.fill_(inverse_softplus(self._init_std))
            else:
                self.fixed_std.fill_(self._init_std)

    # ------------------------------------------------------------------ noise
    @property
    def std(self) -> Tensor:
        """The spike function's own noise std ``s_n`` (shape ``std_shape``)."""
        return computed_std(self, "std_rho") if self.learn_std else self.fixed_std

    def noise_variance(self, u: Tensor) -> Tensor | None:
        """Total noise variance ``V(u) + s_n^2`` for drive ``u`` (``None`` if zero).

        Raises:
            VarianceFlowError: the variance attached to ``u`` went through an operation
                without a variance rule.
        """
        var = get_variance(u) if self.use_input_variance else None
        if isinstance(var, UnknownVariance):
            raise_error(
                f"the input of this spike function went through '{var.op}', whose effect on "
                "the posterior variance is unknown. Use a supported operation between the "
                "Bayesian layer and the neuron (see sbnn_addons.moments), register a rule "
                "with sbnn_addons.moments.register_variance_rule, or exclude the layer.",
                VarianceFlowError)
        with torch._C.DisableTorchFunctionSubclass():  # reads of u's device and dtype
            ref = self._parameters.get("std_rho", self._buffers.get("fixed_std"))
            if ref is not None and u.device != ref.device:  # check_device's test first
                check_device(u, ref, type(self).__name__, "its noise std")
            if ref is not None and ref.dim() and u.dim() - ref.dim() > 2:
                # outside the std: the batch (and the time of a multi-step drive) only; a
                # shorter std_shape broadcasts along the last dimensions, silently where
                # their sizes agree (std_shape=(C,) on [B, C, H, W] with C == W: per W)
                raise_error(
                    f"{type(self).__name__} has a per-neuron std of shape "
                    f"{tuple(ref.shape)}, which would cover the last {ref.dim()} "
                    f"dimension(s) of its drive of shape {concrete_shape(u)}: std_shape is the "
                    "neuron shape without the batch dimension (and the time dimension of a "
                    "multi-step drive): (C, H, W) for [B, C, H, W] per neuron, or (C, 1, 1) "
                    "for one std per channel", ValueError)
            dtype = u.dtype
        own_var = self.own_noise_variance()
        if own_var is not None:
            own_var = own_var.to(variance_dtype(dtype))
            var = own_var if var is None else var + own_var
        return var

    def own_noise_variance(self) -> Tensor | None:
        """The spike function's own noise variance ``s_n^2`` (``None`` if it is zero),
        computed once per :func:`~sbnn_addons.share_posterior` block."""
        if self.learn_std:  # read from _parameters, without nn.Module.__getattr__
            params = self._parameters
            rho = params["std_rho"] if "std_rho" in params else self.std_rho
            return shared_square(self, rho, lambda: noise_scale(self, "std_rho"))
        if self._fixed_std_nonzero():
            return shared_square(self, self.fixed_std, lambda: self.fixed_std)
        return None

    def _fixed_std_nonzero(self) -> bool:
        """Whether the fixed std is non-zero (checked once per value of the buffer)."""
        return cached_tensor_test(self, "_sbnn_nonzero", self.fixed_std,
                                  lambda std: (std != 0).any())

    def fire_overridden(self) -> bool:
        """Whether :meth:`fire` is replaced (by a subclass or on this instance, e.g. by
        :class:`~sbnn_addons.metrics.SpikeMonitor`): the fused neuron kernels, which draw
        without calling it, then step through :meth:`fire` instead."""
        return type(self).fire is not IWSTSpike.fire or "fire" in self.__dict__

    # ------------------------------------------------------------------ forward
    def forward(self, u: Tensor) -> Tensor:
        """Sample spikes for drive ``u = membrane - threshold``.

        Raises:
            ValueError: ``u`` holds a NaN (it fires no spike, silently), unless
                :class:`~sbnn_addons.check_finite` is off; not checked again inside a
                converted model, whose input is checked. (An infinite drive is a
                readout's, ``threshold=inf``.)
        """
        if self._seed is not None and self._seeded_in_graph():  # (False without a seed)
            return call_eagerly(self.forward, u)
        with torch._C.DisableTorchFunctionSubclass():  # a dtype check: no variance flow
            check_float("u", u)
        if check_finite.enabled() and not in_checked_model():
            check_input(u, f"the spike function ({type(self).__name__})", nan_only=True)
            check_noise_scales(self)
        elif torch.compiler.is_compiling():  # a converted model's entry checks in eager only
            check_noise_scales(self)
        variance = self.noise_variance(u)
        compiling = torch.compiler.is_compiling()
        if _moments._OPEN_FLOWS:  # plain(u), inline: read on purpose (not reported)
            _moments._note_read(u, _moments._CONSUMED, compiling)
        # no noise at all (under compile: no variance on the drive, and a fixed std whose
        # value the trace cannot read): a gradient reaching the spikes would be 0
        noiseless = (variance is None if not compiling else not self.learn_std and (
            not self.use_input_variance or get_variance(u, compiling=True) is None))
        with torch._C.DisableTorchFunctionSubclass():  # no_variance_flow(), inline
            # the drive as a plain tensor: the kernel's autograd function runs its own
            # operations with torch functions enabled (no carrier overhead in them)
            spikes = self.fire(_moments._plain(u, compiling=compiling), variance)
        if noiseless:
            spikes = refuse_gradient_without_noise(
                self, spikes, *(self.noiseless_owner or (f"this {type(self).__name__}", None)))
        return spikes

    def fire(self, u: Tensor, variance: Tensor | None) -> Tensor:
        """Sample spikes for drive ``u`` with an explicit noise ``variance`` (or ``None``).

        Args:
            u: drive ``mu - theta``, shape ``[*]``.
            variance: noise variance broadcastable to ``u``, or ``None`` for zero noise.
        """
        if self._seed is not None and self._seeded_in_graph():  # (False without a seed)
            return call_eagerly(self.fire, u, variance)
        compiling = torch.compiler.is_compiling()
        if not compiling and forward_ad_active():
            _refuse_tangents(u, variance)
        if (variance is not None and variance.shape != u.shape
                and not broadcasts_to(variance.shape, u.shape, compiling)):
            raise ValueError(
                f"the variance of shape {tuple(variance.shape)} does not broadcast "
                f"to the drive u of shape {tuple(u.shape)}"
            )
        if not self.deterministic:
            # the variance as the fused kernel takes it (float32, broadcastable to u), or
            # None where the kernel cannot serve u
            if u.dtype != torch.float32 or not u.is_cpu:
                fused_var = None
            elif variance is None:
                fused_var = torch.zeros((), dtype=u.dtype)
            else:
                fused_var = variance.to(u.dtype)
            # in a compiled graph the kernel runs as custom ops (the global RNG)
            compiled = (compiling and fused_var is not None
                        and self._seed is None and kernels.can_fuse_compiled(u, fused_var))
            if compiled or (fused_var is not None
                            and kernels.can_fuse(u, fused_var, compiling)):
                aux = variance is not None and self._aux_wanted()
                offset = self._aux_offset(self.threshold) if aux else None
                pull = self._pull_wanted(u)
                if compiled:  # the backward adds the pull too (from its own 1 / sigma)
                    spikes, z2 = kernels.compiled_spike(u, fused_var, self.estimator,
                                                        self.at_zero, aux_offset=offset,
                                                        aux_var=self.aux_std_grad,
                                                        aux_pull=self.aux_pull if pull else 0.0)
                else:  # the kernel's backward adds the pull itself
                    out = kernels.fused_spike(u, fused_var, self.estimator, self.at_zero,
                                              self._generator_for(u, compiling),
                                              aux_offset=offset,
                                              aux_var=self.aux_std_grad,
                                              aux_pull=self.aux_pull if pull else 0.0,
                                              compiling=compiling)
                    spikes, z2 = out if aux else (out, None)
                if aux:
                    self._collect(z2, u)
                return mark_binary(attach_computed_variance(spikes, None), compiling=compiling)
        if variance is None:
            sigma = torch.zeros((), dtype=u.dtype, device=u.device)
        else:
            dtype = torch.promote_types(u.dtype, torch.float32)  # half -> float32
            sigma = safe_sqrt(variance.to(dtype)).to(u.dtype)
        if self.deterministic:
            eps = torch.zeros_like(u)
        else:
            eps = _standard_normal(u, self._generator_for(u, compiling))
        pull = variance is not None and self._pull_wanted(u)
        # the pull inside the spike's own node (one node and a few operations per step
        # fewer: what a GPU step launches); under torch.func, where a vmapped backward's
        # mean|dL/dh| would be per sample, as its own node
        own_node = pull and torch._C._are_functorch_transforms_active()
        spikes = apply_function(
            BernoulliSpike, u, sigma.expand_as(u), eps, self.estimator, self.at_zero,
            self.aux_pull if pull and not own_node else 0.0
        )
        if variance is not None and self._aux_wanted():
            self._collect(self._z_squared(u, sigma), u)
        if own_node:
            spikes = _AuxPull.apply(spikes, u, sigma.detach(), self.aux_pull)
        return mark_binary(attach_computed_variance(spikes, None))

    def _z_squared(self, u: Tensor, sigma: Tensor) -> Tensor:
        """``sum of z^2`` over the batch and the units (Method page, section 5); ``sigma``
        held constant unless :attr:`aux_std_grad`."""
        centre = u + self.threshold if self.aux_center == "zero" else u
        sigma = self._aux_sigma(sigma).expand_as(u)
        dtype = torch.promote_types(u.dtype, torch.float32)  # half -> float32, float64 kept
        z = centre.to(dtype) / sigma.to(dtype).clamp_min(SIGMA_MIN)
        z2 = torch.where(sigma > 0, z * z, 0.0)
        return z2.sum()

    def _aux_wanted(self) -> bool:
        """Whether this call collects auxiliary terms: collection on, training mode
        (``model.eval()`` passes, e.g. a validation forward with gradients on, collect
        nothing that a training step would then consume), gradients on, and a finite
        threshold (a neuron with an infinite threshold, e.g. a membrane readout,
        never fires: its ``z`` is ``-inf`` and it has nothing to pull towards)."""
        return (self.collect_aux and self.training and torch.is_grad_enabled()
                and self._threshold_finite)

    def _aux_offset(self, threshold: float) -> float:
        """What the kernels add to the drive ``u = mu - threshold`` to centre ``z``:
        ``threshold`` for ``aux_center="zero"``, else 0."""
        return threshold if self.aux_center == "zero" else 0.0

    def _aux_sigma(self, sigma: Tensor) -> Tensor:
        """``sigma`` as the auxiliary loss's ``z`` sees it: held constant (detached)
        unless :attr:`aux_std_grad`."""
        return sigma if self.aux_std_grad else sigma.detach()

    def _pull_wanted(self, u: Tensor) -> bool:
        """Whether this call applies the auxiliary pull (:attr:`aux_pull`): on, training
        mode, gradients on and reaching the drive ``u``, a finite threshold."""
        return (self.aux_pull > 0 and self.training and torch.is_grad_enabled()
                and tracks_grad(u) and self._threshold_finite)

    def _sequence_pull_wanted(self, *inputs: Tensor | None) -> bool:
        """Whether a fused sequence applies the auxiliary pull: as :meth:`_pull_wanted`,
        where any of its ``inputs`` (currents, initial membrane, variances, own noise)
        needs a gradient. A later step's drive needs one through the reset's spike, whose
        gradient reaches the variances, even where the currents need none (a frozen layer
        in front): the steps one by one apply the pull there."""
        return any(isinstance(t, Tensor) and self._pull_wanted(t) for t in inputs)

    def _collect(self, z2_sum: Tensor, step: Tensor, steps: int = 1) -> None:
        """Keep an aux term: ``z2_sum`` (``z^2`` summed over batch, units and ``steps``
        steps shaped like ``step``, whose batch dimension is ``batch_dim``) averaged over
        the batch, with the unit-steps it covers per example. Not in a checkpoint's
        recomputation (computed there too, so that the recomputation saves the same
        tensors, but already collected).

        Raises:
            RuntimeError: terms collected before the last optimiser step (the learned
                std changed since) were never consumed by :func:`sbnn_addons.aux_loss`:
                they would pile up with their graphs every step. Under ``torch.compile``
                (a ``torch._dynamo.exc.UserError``, a ``RuntimeError``): terms held at the
                last ``torch.optim`` step.
        """
        if _RECOMPUTING[0] or checkpoint_recomputing():  # torch.utils.checkpoint's too
            return
        if z2_sum.dim():  # one sum per step of a fused sequence
            z2_sum = z2_sum.sum()
        version = self._step_marker()
        if (self._aux_terms and version is not None
                and version != getattr(self, "_aux_version", version)):
            self._aux_terms = []
            self._aux_stale = False
            raise RuntimeError(_STALE_AUX_MESSAGE)
        if self._aux_terms and torch.compiler.is_compiling() and self._aux_stale:
            # held at a torch.optim step (the hook's mark; a change recompiles the step)
            _drop_stale_aux_terms()
            raise_error(_STALE_AUX_MESSAGE)
        if not self._aux_terms:
            self._aux_version = version
            self._aux_stale = False
            self._aux_read = False
        batch = max(self._batch_size(step), 1)
        self._aux_terms.append((z2_sum / batch, step.numel() // batch * steps))

    def _step_marker(self) -> tuple | None:
        """What changes at an optimiser step: the count of ``torch.optim`` steps taken
        (a global step hook, registered at the first collection) and the learned std's
        version counter (other optimisers); ``None`` under ``torch.compile``."""
        if torch.compiler.is_compiling():
            return None
        _watch_optimizer_steps()
        return (_OPTIMIZER_STEPS[0], self._std_version())

    def _std_version(self) -> int | None:
        """Version counter of the learned std (changes at each optimiser step), or
        ``None`` where there is none to read (fixed std, inference tensor, compiling)."""
        if (not self.learn_std or torch.compiler.is_compiling()
                or self.std_rho.is_inference()):
            return None
        return self.std_rho._version

    def _batch_size(self, u: Tensor) -> int:
        """The number of examples in ``u``: its size along :attr:`batch_dim` (a 0-d
        ``u`` with ``batch_dim=0`` is one example).

        Raises:
            ValueError: ``u`` has no dimension ``batch_dim`` (the auxiliary loss would be
                averaged over a batch of 1, i.e. summed over the examples, silently).
        """
        if -u.dim() <= self.batch_dim < u.dim():
            return u.shape[self.batch_dim]
        if u.dim() == 0 and self.batch_dim == 0:
            return 1
        raise_error(
            f"{type(self).__name__}: batch_dim={self.batch_dim} (the dimension of the drive "
            "that indexes the examples, over which the auxiliary loss is averaged) is not a "
            f"dimension of its drive of shape {concrete_shape(u)}: the loss would be averaged "
            "over a batch of 1, silently. Build the spike function with the batch_dim of the "
            "drive it gets (0 for [B, ...], 1 for [T, B, ...])", ValueError)

    def _collects_in(self, host: nn.Module) -> None:
        """Called by :func:`~sbnn_addons.enable_aux_loss` for the module ``host`` holding
        this spike function as a direct child: a host adapter whose neurons call it on a
        shape that does not show the batch (a whole flattened sequence) hooks ``host``
        here to learn it."""

    def pop_aux(self) -> tuple[Tensor, int] | None:
        """``(sum of the collected z^2 terms, unit-steps they cover per example)`` since
        the last call (then cleared); ``None`` if nothing was collected."""
        if not self._aux_terms:
            return None
        total = torch.stack([term for term, _ in self._aux_terms]).sum()
        units = sum(n for _, n in self._aux_terms)
        self._aux_terms = []
        self._aux_stale = False
        self._aux_read = True
        return total, units

    # ------------------------------------------------------------------ seeding
    def manual_seed(self, seed: int | None) -> None:
        """Use a private generator seeded with ``seed`` (``None``: the global RNG).

        Raises:
            TypeError: ``seed`` is not an integer or ``None`` (a float such as 1.5 was
                truncated, silently giving the stream of another seed).
            ValueError: ``seed`` outside ``[0, 2**32)`` (see :func:`check_seed`).
        """
        self._seed = check_seed(seed)
        self._generator = None

    def _seeded_in_graph(self) -> bool:
        """Whether this seeded spike function is about to draw while ``torch.compile``
        traces: the draw then runs eagerly, from the private generator as in eager mode
        (a graph break, taken before the drive becomes a graph output that aliases the
        carrier it came from, which AOTAutograd's first run cannot replay).

        Raises:
            RuntimeError: the tracing may not break the graph (``fullgraph=True``).
        """
        if self._seed is None or self.deterministic or not torch.compiler.is_compiling():
            return False
        if not graph_breaks_allowed():
            raise_error(_SEEDED_UNDER_COMPILE)
        return True

    def _generator_for(self, u: Tensor,
                       compiling: bool | None = None) -> torch.Generator | None:
        if self.deterministic:
            return None
        if in_reentrant_recomputation(compiling):
            raise RuntimeError(
                "a spike function draws in the recomputation of torch.utils.checkpoint with "
                "use_reentrant=True, whose forward ran without gradients: a seeded spike "
                "function would draw other spikes, the auxiliary loss terms of the region "
                "would miss the loss, and a neuron's noise variance carried between calls "
                "would get no gradient (wrong gradients, without an error); pass "
                "use_reentrant=False (spike functions on the global generator), or "
                + _CHECKPOINT_FIX
            )
        if compiling is None:
            compiling = torch.compiler.is_compiling()
        if not _RECOMPUTING[0] and not compiling and checkpoint_without_rng_replay():
            raise RuntimeError(
                "a spike function draws inside torch.utils.checkpoint with "
                "preserve_rng_state=False: the recomputation in the backward would draw "
                "other spikes than the forward (the global generator is not restored), so "
                "the gradients would be those of other spikes, without an error; pass "
                "preserve_rng_state=True (the default), or " + _CHECKPOINT_FIX
            )
        if self._seed is None:
            return None
        if compiling:
            raise_error(_SEEDED_UNDER_COMPILE)
        hooks = (not _RECOMPUTING[0]
                 and torch._C._autograd._top_saved_tensors_default_hooks(False) is not None)
        if hooks and _CHECKPOINT_FORWARDS and not any(id(self) in replayed
                                                      for replayed, _ in _CHECKPOINT_FORWARDS):
            raise RuntimeError(
                "this spike function is seeded (sbnn_addons.seed_spikes) and draws inside "
                "sbnn_addons.checkpoint.checkpoint, but is not part of its modules=: its "
                "generator is not replayed, so the recomputation in the backward would draw "
                "other spikes and the gradients would be wrong; pass modules= the module "
                "(or an nn.ModuleList of the modules) that fn runs, every spike function "
                "included")
        if hooks and not _CHECKPOINT_FORWARDS:
            raise RuntimeError(
                "this spike function is seeded (sbnn_addons.seed_spikes) and draws inside "
                "saved-tensor hooks (torch.utils.checkpoint): the recomputation in the "
                "backward would draw other spikes from the private generator (PyTorch "
                "restores the global one only) and the gradients would be wrong; use "
                "sbnn_addons.checkpoint.checkpoint(fn, *args, modules=model), which replays "
                "them, or sbnn_addons.seed_spikes(model, None) and seed the global generator"
            )
        if u.is_meta:  # no generator there (and no values to draw): the checks above ran
            return None
        if self._generator is None or self._generator.device != u.device:
            self._generator = torch.Generator(device=u.device).manual_seed(self._seed)
        return self._generator

    def __getstate__(self):
        state = self.__dict__.copy()
        generator = state.pop("_generator", None)  # a copy continues the stream
        state["_generator"] = None
        if generator is not None:
            state["_generator_state"] = (generator.device.type, generator.get_state())
        state["_aux_terms"] = []
        state["_aux_stale"] = False
        state["_aux_read"] = False
        return state

    def __setstate__(self, state) -> None:
        saved = state.pop("_generator_state", None)
        if "threshold" in state:  # pickled when the threshold was a plain attribute
            threshold = state.pop("threshold")
            state["_threshold"] = threshold
            state["_threshold_finite"] = math.isfinite(threshold)
        if "estimator" in state:  # pickled when the estimator was a plain attribute
            state["_estimator"] = state.pop("estimator")
        super().__setstate__(state)
        _SPIKE_FUNCTIONS.add(self)
        register_noise_owner(self)
        _watch_optimizer_steps()  # as __init__: a model loaded in a fresh process too
        if saved is not None:
            device, rng_state = saved
            self._generator = torch.Generator(device=device)
            self._generator.set_state(rng_state)

    def extra_repr(self) -> str:
        own = ("learned" if self.learn_std else "meta" if self.fixed_std.is_meta
               else f"{float(self.fixed_std.max()):g}")
        return f"estimator={self.estimator}, std={own}, mode={self.sbnn_mode}"


_SEEDED_UNDER_COMPILE = (
    "this spike function is seeded (sbnn_addons.seed_spikes, or mc_predict's seed=), and "
    "torch.compile(fullgraph=True) cannot trace its private generator: for mc_predict on a "
    "compiled model, drop seed= and call torch.manual_seed(seed) just before it; otherwise "
    "call sbnn_addons.seed_spikes(model, None) before the compiled call and seed the global "
    "generator (torch.manual_seed) instead, or compile without fullgraph=True (the seeded "
    "draws then run eagerly, between graphs)"
)


#: Seeds are honoured in ``[0, SEED_LIMIT)``: PyTorch's CPU generator (a Mersenne
#: Twister) keeps the low 32 bits of the seed it is given.
SEED_LIMIT = 1 << 32
#: The end of the errors for a spike drawn where torch.utils.checkpoint cannot replay it.
_CHECKPOINT_FIX = ("use sbnn_addons.checkpoint.checkpoint(fn, *args, modules=block), which "
                   "also replays seeded spikes")


def refuse_gradient_without_noise(spike: IWSTSpike, spikes: Tensor, neuron: str,
                                  host: str | None, note: str = "",
                                  noise: tuple[Tensor, ...] = ()) -> Tensor:
    """Make a gradient that reaches the ``spikes`` a neuron's ``spike`` function drew
    without any noise raise (the caller has found that the drive carries no variance
    tensor; here the spike function's own fixed std and ``noise`` are tested: read in
    eager mode, asserted in the backward under ``torch.compile``).

    Without noise (a drive that carries no posterior variance: no Bayesian layer in
    front, a layer left deterministic by ``include`` / ``exclude`` or with a fixed zero
    std; and a spike function without noise of its own: ``std=None`` or 0) the
    stochastic spike fires deterministically and its gradient is 0: a loss on those
    spikes would train nothing before the neuron, without an error. Not concerned: spikes
    that no gradient reaches (a membrane readout; the check runs in the backward),
    ``mean`` mode (the deterministic network, whose exact gradient through a spike is 0;
    an optimiser step in it warns), an infinite threshold (a readout that never fires), a
    pass without gradient.

    Args:
        spike: the spike function that drew ``spikes``.
        spikes: its output.
        neuron: the neuron, for the message (``"snn.Leaky"``, ``"LIF"``).
        host: the host library of a converted neuron, whose surrogate the neuron can keep
            (``"snnTorch"``); ``None`` for a neuron or spike function of this library's
            own (a core :class:`~sbnn_addons.LIF`, a drop-in spike function).
        note: a further sentence of the message (where a gradient comes from).
        noise: further noise variances of the drive (a core LIF's membrane variance): the
            check fails only where they are 0 too.

    Returns:
        ``spikes`` (eager: with a hook that raises); under ``torch.compile``, where a
        tensor hook cannot be registered and the std's value cannot be read, the spikes
        through :class:`_NoiselessGradientCheck`, whose backward fails in the graph
        where the spike function's fixed std and ``noise`` are 0 and a non-zero gradient
        arrives.
    """
    if (spike.deterministic or spike.learn_std or not spike.threshold_finite
            or not torch.is_grad_enabled()):
        return spikes
    with torch._C.DisableTorchFunctionSubclass():  # attribute reads, no variance flow
        if not spikes.requires_grad:
            return spikes
        if torch.compiler.is_compiling():
            return _NoiselessGradientCheck.apply(
                spikes, _noiseless_message(neuron, host, note), spike.fixed_std, *noise)
        # eager: the same test now (a value read only on this path, a drive without
        # variance)
        if spike._fixed_std_nonzero() or any(bool((t != 0).any()) for t in noise):
            return spikes
        spikes.register_hook(functools.partial(_noiseless_gradient_error,
                                               _noiseless_message(neuron, host, note)))
    return spikes


class _NoiselessGradientCheck(torch.autograd.Function):
    """The identity on spikes drawn without input variance, whose backward fails (an
    assertion in the compiled graph) where the spike function's own fixed ``std`` and the
    further ``noise`` variances are 0 and a non-zero gradient reaches them:
    :func:`refuse_gradient_without_noise` under ``torch.compile``."""

    @staticmethod
    def forward(ctx, spikes: Tensor, message: str, *noise: Tensor) -> Tensor:
        ctx.save_for_backward(*noise)
        ctx.message = message
        return spikes.view_as(spikes)

    @staticmethod
    def backward(ctx, grad: Tensor):
        noisy = [(t != 0).any() for t in ctx.saved_tensors]
        torch._assert_async(functools.reduce(torch.logical_or, noisy, (grad == 0).all()),
                            ctx.message)
        return (grad, None) + (None,) * len(ctx.saved_tensors)


def _noiseless_gradient_error(message: str, _grad: Tensor) -> None:
    """Backward hook of :func:`refuse_gradient_without_noise`.

    Raises:
        VarianceFlowError: ``message``, naming the neuron and the fixes.
    """
    raise VarianceFlowError(message)


def _noiseless_message(neuron: str, host: str | None, note: str) -> str:
    """The error of :func:`refuse_gradient_without_noise`."""
    zero = ("so it fires deterministically and passes a zero gradient: nothing before it "
            f"would train through its spikes{note}.")
    if host is None:
        return (
            f"a gradient reached the spikes of {neuron}, which has no noise: its drive "
            "carries no posterior variance (no Bayesian layer feeds it, e.g. a plain "
            "nn.Linear, or the layer has a fixed zero std) and its spike function has no "
            f"noise of its own (std=None or 0), {zero} Feed it from a Bayesian layer "
            "(sbnn_addons.BayesLinear, BayesConv2d), or give its spike function noise of "
            "its own: IWSTSpike('st', std=0.4), sbnn_addons.snntorch.spike_grad() (a std by "
            "default)")
    return (
        f"a gradient reached the spikes of a converted {neuron} that has no noise: its "
        "input carries no posterior variance (the layer feeding it is deterministic: left "
        "out by include / exclude, or a fixed zero std) and its spike function has no "
        f"noise of its own (to_sbnn(..., spike_std=None or 0)), {zero} Convert with "
        "spike_std > 0 (the default), convert the layer feeding it, or keep the neuron with "
        f"its {host} surrogate: exclude=[<the neuron>, <the layer feeding it>]")


def check_seed(seed, name: str = "seed", *, allow_none: bool = True) -> int | None:
    """``seed`` as a Python int (``None`` kept where ``allow_none``).

    Raises:
        TypeError: ``seed`` is a bool, a float, a string or anything else that is not an
            integer (``int``, a numpy integer, a 0-d integer tensor), or ``None`` where
            not ``allow_none``.
        ValueError: an integer outside ``[0, 2**32)``: PyTorch's CPU generator keeps the
            low 32 bits of a seed, so seeds that differ by a multiple of ``2**32`` (and a
            negative seed, taken modulo ``2**64``) would draw the same noise, silently.
    """
    if seed is None and allow_none:
        return None
    if not isinstance(seed, bool):
        try:
            value = operator.index(seed)
        except TypeError:
            pass
        else:
            if not 0 <= value < SEED_LIMIT:
                raise ValueError(
                    f"{name} must be in [0, 2**32), got {value}: PyTorch's CPU generator "
                    "keeps the low 32 bits of a seed, so seeds that differ by a multiple of "
                    "2**32 (or a negative one and its value modulo 2**64) would draw the "
                    "same noise; pass a seed in that range (e.g. the seed modulo 2**32)")
            return value
    raise TypeError(f"{name} must be an integer{' or None' if allow_none else ''}, got "
                    f"{seed!r} ({type(seed).__name__}); pass an int such as "
                    f"{name.split()[-1]}=0")


def seed_spikes(model: nn.Module, seed: int | None) -> nn.Module:
    """Seed every :class:`IWSTSpike` in ``model``, each with a stream of its own.

    The i-th spike function gets the seed :func:`spike_seed` ``(seed, i)``, a SplitMix64
    mix of the pair: no two (seed, i) pairs share a stream (but by a ``2^-32`` chance), so
    ``seed_spikes(model, 1)`` is independent of ``seed_spikes(model, 0)`` in every layer
    (with ``seed + i``, the first layer of seed 1 would replay the second layer of seed
    0). Calling it again with the same seed replays the same spike noise exactly.
    ``None`` returns them to the global RNG. Returns ``model``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``seed`` is neither an integer nor
            ``None``.
        ValueError: ``seed`` outside ``[0, 2**32)`` (see :func:`check_seed`); ``model``
            contains no :class:`IWSTSpike` (an unconverted model, or one with Bayesian
            layers only): there would be nothing to seed, and its noise would stay on
            the global RNG, silently.
    """
    check_module(model, "seed_spikes")
    seed = check_seed(seed)
    spikes = [m for m in model.modules() if isinstance(m, IWSTSpike)]
    if not spikes:
        raise ValueError(
            f"seed_spikes: {type(model).__name__} contains no SBNN spike function "
            "(IWSTSpike), so there is nothing to seed and its noise would stay on the "
            "global RNG; convert the model first (sbnn_addons.snntorch.to_sbnn or "
            "sbnn_addons.spikingjelly.to_sbnn), or seed the global RNG with "
            "torch.manual_seed(seed) for the noise of Bayesian layers alone")
    for i, m in enumerate(spikes):
        m.manual_seed(None if seed is None else spike_seed(seed, i))
    return model


def spike_seed(seed: int, index: int) -> int:
    """The seed :func:`seed_spikes` gives the ``index``-th spike function: a 32-bit mix.

    SplitMix64's finaliser applied to ``seed * 2^32 + index`` (a bijection of 64-bit
    words: distinct pairs with ``0 <= seed < 2^32`` and ``0 <= index < 2^32`` give
    distinct mixes), keeping bits 1 to 32 of it, the part of a seed that PyTorch's CPU
    generator honours: two pairs share a stream with a chance of ``2^-32`` per pair.

    Raises:
        TypeError: ``seed`` is not an integer.
        ValueError: ``seed`` outside ``[0, 2**32)``, or ``index`` not an integer in it.
    """
    seed = check_seed(seed)
    if seed is None:
        raise TypeError("spike_seed(seed, index) needs an integer seed, got None")
    if (value := as_int(index)) is None or not 0 <= value < SEED_LIMIT:
        raise ValueError(f"index must be an integer in [0, 2**32), got {index!r}")
    index = value
    mask = (1 << 64) - 1
    z = ((seed << 32) + index + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return ((z ^ (z >> 31)) >> 1) & (SEED_LIMIT - 1)
