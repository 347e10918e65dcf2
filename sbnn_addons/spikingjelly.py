"""SpikingJelly 2.0 adapter: turn an existing ``spikingjelly.activation_based`` model into an
SBNN, and back.

.. code-block:: python

    from sbnn_addons import spikingjelly as sbnn_sj

    sbnn = sbnn_sj.to_sbnn(model, "st")          # Bayesian layers + stochastic spikes
    ...                                          # train as usual, reset between batches
    plain = sbnn_sj.to_spikingjelly(sbnn)        # posterior-mean SpikingJelly model

What :func:`to_sbnn` does (Method page, sections 2-3):

* ``layer.Linear`` / ``layer.Conv1d`` / ``layer.Conv2d`` (SpikingJelly's stateless
  wrappers, both step modes)
  and plain ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` (e.g. inside
  ``layer.SeqToANNContainer``) become Bayesian layers whose ``.weight`` is the old weight
  (the posterior mean). They return the mean and attach the local-reparameterisation
  variance ``var(a) = s^2 sum x^2``.
* ``IFNode``, ``LIFNode`` and ``ParametricLIFNode`` get an :class:`SJSpike` (an
  :class:`~sbnn_addons.IWSTSpike`) as ``surrogate_function``, with ``at_zero=True``
  because SpikingJelly's Heaviside is ``x >= 0``. The neuron is *linked*: a forward
  pre-hook takes the variance of its input ``X_t`` and the spike function integrates it
  with the neuron's own linear dynamics

  .. code-block:: text

      H_t = beta * V_{t-1} + c * X_t           (mean: SpikingJelly's own update)
      S_t = beta^2 S_{t-1} + c^2 var(X_t)      (variance, tracked by the spike function)
      sigma_t^2 = S_t + s_n^2,   spike = 1[H_t - v_th + sigma_t eps >= 0]
      hard reset: S_t <- S_t (1 - spike);  soft reset: S_t unchanged

  with ``LIFNode(decay_input=True)``: ``beta = 1 - 1/tau``, ``c = 1/tau``;
  ``decay_input=False``: ``c = 1``; ``IFNode``: ``beta = c = 1``; ``ParametricLIFNode``:
  ``1/tau = sigmoid(w)``. (SpikingJelly's update ``V + (X - (V - V_reset)) / tau`` uses
  ``V`` twice, so the generic variance flow, which treats the terms of a sum as
  independent, cannot follow it; the link does it exactly.) ``S`` is the neuron's own
  memory ``sbnn_var`` (``register_memory``): ``functional.reset_net`` resets it with the
  membrane, ``detach_net`` detaches it, and copies of the model carry it. The memory
  ``sbnn_v`` holds the membrane it belongs to: a ``v`` set by the user since (a learned
  initial membrane ``node.v = h0(x[0])``) is a new membrane, without it.
* A ``layer.TLastSeqToANNContainer`` (or a subclass keeping its forward) runs its
  layers on the ``T * N`` slices at once (``seq_to_ann_forward``) instead of under
  ``torch.vmap``, whose output would drop the variance.
* BatchNorm becomes a mean-only :class:`~sbnn_addons.ChannelAffine` (``batchnorm="affine"``,
  equal to the BatchNorm in eval mode) or is kept (``"keep"``).

A linked multi-step node runs its whole sequence in one
:func:`~sbnn_addons.kernels.lif_sequence` call (SpikingJelly's own charge and reset
operations, one autograd node); elsewhere the node runs SpikingJelly's Python reference
path, which calls the spike function once per time step. Only SpikingJelly's own
built-in surrogates use its fused GPU kernels.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import numbers
import sys
from collections.abc import Iterable, Iterator

import torch
from spikingjelly.activation_based import base, functional, layer, neuron, surrogate
from torch import Tensor, nn

from . import kernels
from . import layers as _layers
from .base import (
    HostObject,
    SBNNModule,
    aliases,
    call_eagerly,
    check_flag,
    check_heaviside_forward,
    check_include_overlap,
    check_module,
    check_neuron_constants,
    check_std,
    compiled_wrapped,
    computed_from,
    concrete_shape,
    copy_of,
    drop_state,
    holds_copy,
    host_neurons,
    match_name,
    name_patterns,
    note_noisy_membrane,
    note_spikes,
    raise_error,
    read_state,
    refuse_other_host_export,
    refuse_other_host_reset,
    refuse_unconverted_export,
    same_layout,
    set_state,
    threshold_value,
    version_of,
)
from .functional import compact_broadcast, mark_binary
from .losses import enable_aux_loss
from .moments import (
    UnknownVariance,
    VarianceFlowError,
    VarianceTensor,
    check_noise_scales,
    check_variance_flow,
    get_variance,
    no_variance_flow,
    noise_sources,
    refuse_membrane_input,
    track_variance,
    untrack_variance,
)
from .moments import refuse_variance as _refuse_variance
from .optim import register_converted_copy
from .spike import (
    CONVERTED_SPIKE_STD,
    DEFAULT_AUX_PULL,
    DEFAULT_SPIKE_STD,
    IWSTSpike,
    check_aux_pull,
    checkpoint_restores_state,
    in_checkpoint_forward,
    in_torch_checkpoint,
    refuse_gradient_without_noise,
    relative_spike_std,
)
from .surgery import replace_modules

__all__ = [
    "SJSpike",
    "BayesLinear",
    "BayesConv1d",
    "BayesConv2d",
    "ChannelAffine",
    "SUPPORTED_NEURONS",
    "surrogate_function",
    "link_neuron",
    "to_sbnn",
    "to_spikingjelly",
    "reset",
    "stub_torchvision",
]

#: Name of the memory (``register_memory``) holding a linked neuron's noise variance.
VAR_MEMORY = "sbnn_var"
#: Name of the memory holding the membrane (the neuron's ``v`` after its last call) that
#: the variance in :data:`VAR_MEMORY` belongs to: a ``v`` set by the user since (a learned
#: initial membrane) is a new membrane, without that variance.
MEMBRANE_MEMORY = "sbnn_v"
#: Key of a converted neuron's original surrogate in its ``__dict__`` (a HostObject).
_HOST_SURROGATE = "_sbnn_host_surrogate"
#: Key of ``(id, Tensor._version)`` of the membrane in :data:`MEMBRANE_MEMORY` when the
#: neuron's last eager call left it, in the neuron's ``__dict__``.
_KEPT_VERSION = "_sbnn_kept_version"

#: Neuron classes whose dynamics the adapter follows exactly (exact type match).
SUPPORTED_NEURONS: tuple[type, ...] = (
    neuron.IFNode,
    neuron.LIFNode,
    neuron.ParametricLIFNode,
)


# --------------------------------------------------------------------------- spike
class SJSpike(IWSTSpike):
    """:class:`~sbnn_addons.IWSTSpike` for SpikingJelly neurons (``surrogate_function``).

    Defaults to ``at_zero=True`` (SpikingJelly fires at ``H - v_th >= 0``) and
    ``batch_dim=0``: SpikingJelly's reference path calls the surrogate once per time step
    with ``u = H_t - v_th`` of shape ``[N, *]`` in both step modes. The parallel spiking
    neurons (``neuron.PSN``, ``MaskedPSN``, ``SlidingPSN``) call it on the whole sequence
    (``[T, N * C]`` or ``[T, N, C]``) or on a flattened step (``[N * C]``): for them
    :func:`~sbnn_addons.enable_aux_loss` hooks the neuron, which hands the spike function
    the number of examples ``N`` of its input, so that the auxiliary loss is averaged over
    the examples, not over the steps or units.

    When linked to its neuron (:func:`link_neuron`, done by :func:`to_sbnn`), it tracks the
    variance of the membrane with the neuron's dynamics (module doc). Unlinked, it adds
    only its own noise ``std``: SpikingJelly's update does not carry a Bayesian layer's
    variance to the surrogate correctly, so link the neuron (an unlinked surrogate that
    does receive a variance raises ``ValueError``).
    """

    def __init__(self, estimator="st", **kwargs) -> None:
        kwargs.setdefault("at_zero", True)
        kwargs.setdefault("batch_dim", 0)
        super().__init__(estimator, **kwargs)
        self._linked = False
        self._clear_link_state()

    def _clear_link_state(self) -> None:
        self._var_state: Tensor | None = None  # membrane variance S after the last step
        self._pending: Tensor | None = None  # c^2 var(X): [N, *] or, multi-step, [T, N, *]
        self._steps: tuple[Tensor, ...] | None = None  # _pending unbound over T
        self._multi = False
        self._step = 0
        self._coeffs: tuple = (1.0, 1.0, False)
        self._in_call = False  # between the neuron's pre-hook and its forward hook
        self._input: Tensor | None = None  # the input the pre-hook took the variance of

    # The per-step state below is written to __dict__ directly: it holds no parameters,
    # buffers or modules, and nn.Module.__setattr__ costs a few microseconds per call.
    def _begin(self, node: nn.Module, var, multi: bool, x: Tensor) -> None:
        """Called by the neuron's pre-hook before each neuron call on input ``x``."""
        state = self.__dict__
        # the variance is the neuron's own state (register_memory): reset with it by
        # reset_net, detached by detach_net, copied and pickled with the neuron
        var_state = node._memories.get(VAR_MEMORY)
        v = node._memories.get("v")
        if (var_state is not None and isinstance(v, Tensor)
                and v.shape != (x.shape[1:] if multi else x.shape)):
            # SpikingJelly starts a new membrane when the input's shape changes (a new
            # batch size without reset_net, materialize_states): so does the variance
            var_state = None
        if var_state is not None and isinstance(v, Tensor):
            var_state = _variance_of_membrane(node, v, node._memories.get(MEMBRANE_MEMORY),
                                              var_state)
        state["_var_state"] = var_state
        threshold = node.v_threshold
        if isinstance(threshold, Tensor):  # a learned one (nn.Parameter): its value now
            threshold = threshold_value(threshold)
        if isinstance(threshold, numbers.Real) and float(threshold) != self.threshold:
            # v_threshold changed after the conversion (e.g. set to inf for a membrane
            # readout, an optimiser's step of a learned one): the auxiliary terms' centre
            # and their finite-threshold test read it
            self.threshold = float(threshold)
        coeffs = _dynamics(node)
        if isinstance(var, Tensor):
            var = var * (coeffs[1] * coeffs[1])  # c^2 var(X_t), for all steps at once
            if multi:  # the time dimension first (a view)
                var = _per_step_variance(var, x)
        set_state(self, _pending=var, _steps=None, _multi=multi, _step=0, _coeffs=coeffs,
                  _in_call=True, _input=None)

    def _end(self) -> None:
        """Called by the neuron's forward hook after each neuron call: the per-call state
        (input variances, the dynamics' coefficients, which hold a graph for a learned
        decay) is dropped, so that a trained model deep-copies; the membrane variance
        lives on as the neuron's memory."""
        set_state(self, _var_state=None, _pending=None, _steps=None,
                  _coeffs=(1.0, 1.0, False), _in_call=False, _input=None)

    def _next_input_variance(self, u: Tensor) -> Tensor | None:
        var = self._pending
        if var is None:
            return None
        if self._multi:
            if self._steps is None:  # the T steps' terms (one graph node for all of them)
                self.__dict__["_steps"] = var.unbind(0)
            if self._step >= len(self._steps):
                raise RuntimeError("SJSpike was called more often than the sequence length")
            var = self._steps[self._step]
        self.__dict__["_step"] = self._step + 1
        return var  # c^2 var(X_t), broadcastable to u; compact (e.g. [N, 1], per-layer std)

    def forward(self, u: Tensor) -> Tensor:
        """Sample spikes for ``u = H_t - v_threshold`` (shape ``[N, *]``)."""
        if self._seeded_in_graph():
            return call_eagerly(self.forward, u)  # see IWSTSpike._seeded_in_graph
        if not self._linked:
            var = get_variance(u)
            if isinstance(var, Tensor):
                raise ValueError(
                    "this SpikingJelly surrogate received an input carrying a posterior "
                    "variance but is not linked to its neuron (e.g. one put in as "
                    "node.surrogate_function after the conversion); call "
                    "sbnn_addons.spikingjelly.link_neuron(node), or convert the model with "
                    "sbnn_addons.spikingjelly.to_sbnn"
                )
            return super().forward(u)
        if not self._in_call and get_variance(u) is not None:
            raise_error(self._bypassed_hooks_message(u), VarianceFlowError)
        with no_variance_flow():
            beta, _c, hard = self._coeffs
            state = self._next_input_variance(u)  # c^2 var_t
            if self._var_state is not None:  # S_t = beta^2 S_{t-1} + c^2 var_t, one op
                decay = beta * beta
                if state is None:
                    state = self._var_state * decay
                elif isinstance(decay, Tensor):  # ParametricLIFNode: learned beta
                    state = torch.addcmul(state, self._var_state, decay)
                elif torch.compiler.is_compiling():
                    # a tau changed between compiled steps makes decay a symbolic float,
                    # which inductor specialises as `alpha=` with a guard in another
                    # rounding than the value's: Dynamo failed its own guard (an
                    # internal AssertionError); a product is kept symbolic
                    state = state + self._var_state * decay
                else:
                    state = state.add(self._var_state, alpha=decay)
            total = self.noise_variance(u)
            if state is not None:
                total = state if total is None else state + total
            spikes = self.fire(u, total)
            if not torch.compiler.is_compiling():  # (see _mark_spikes)
                note_spikes(spikes)
            # no noise at all: a gradient reaching these spikes (a loss on them, or on the
            # membrane through the reset) would be 0 (compiled: no input variance, and the
            # graph tests the fixed std, whose value a trace cannot read)
            if (total is None if not torch.compiler.is_compiling()
                    else state is None and not self.learn_std):
                spikes = refuse_gradient_without_noise(
                    self, spikes, f"SpikingJelly {self.__dict__.get('_node_type', 'neuron')}",
                    "SpikingJelly", _RESET_NOTE)
            if state is not None and hard:  # S_t (1 - spike)
                state = state.masked_fill(spikes.detach() > 0, 0.0)
            if state is not None:
                self.__dict__["_var_state"] = state
            return spikes

    _in_call = False  # what a spike function pickled before the flag existed reads
    _input = None
    _examples = None  # the examples of a parallel spiking neuron's call (_note_examples)

    def _batch_size(self, u: Tensor) -> int:
        examples = read_state(self, "_examples")
        return examples if examples is not None else super()._batch_size(u)

    def _collects_in(self, host: nn.Module) -> None:
        """A parallel spiking neuron ``host`` (``neuron.PSN``, ...) calls this spike
        function on a whole (flattened) sequence or a flattened step: hook it to hand over
        the number of examples of its input (:meth:`_batch_size`)."""
        if (_calls_on_sequences(host) and host._modules.get("surrogate_function") is self
                and _note_examples not in host._forward_pre_hooks.values()):
            host.register_forward_pre_hook(_note_examples)
            host.register_forward_hook(_forget_examples)

    def _bypassed_hooks_message(self, u: Tensor) -> str:
        """The error message for a linked spike function called outside a call of its
        neuron module on an input carrying a Bayesian layer's noise: the neuron was run
        through one of its own methods (``sn.multi_step_forward(x)``, ...), which skip
        its forward hooks."""
        name = noise_sources(u, self)[0]  # the spike function's qualified name
        suffix = ".surrogate_function"
        node = name[: -len(suffix)] if name and name.endswith(suffix) else None
        kind = self.__dict__.get("_node_type", "neuron")
        where = f"{kind} {node!r}" if node else kind
        call = node.rsplit(".", 1)[-1] if node else "node"
        return (
            f"the converted SpikingJelly {where} got an input carrying a Bayesian layer's "
            "noise outside a call of the neuron module: it was run through one of its own "
            f"methods ({call}.multi_step_forward(x), {call}.single_step_forward(x) or "
            f"{call}.forward(x)), which skip the neuron's forward hooks that hand the "
            "variance of its input to the spike function with the neuron's dynamics and "
            f"keep its noise state. Call the module itself, {call}(x) (its step_mode picks "
            "the single- or multi-step forward)")

    def __getstate__(self):
        state = super().__getstate__()
        for key in ("_var_state", "_pending", "_steps", "_input", "_examples"):
            state[key] = None
        return state


def _variance_of_membrane(node: nn.Module, v: Tensor, kept, var: Tensor) -> Tensor | None:
    """The noise variance of membrane ``v`` that a linked neuron starts a call from:
    ``var``, kept with the membrane ``kept`` that its last call left, while ``v`` is that
    membrane; else ``v`` was set by the user (``node.v = ...``) since:

    * a tensor with a graph (a learned initial membrane ``h0(x[0])``, set instead of
      ``functional.reset_net``) is a new membrane: no variance yet (``var``'s graph
      belongs to an earlier call, freed by its backward);
    * a tensor without one is the kept membrane detached by hand (``node.v =
      node.v.detach()`` or ``.detach().clone()``, truncated BPTT: ``var`` without its
      graph, as after ``functional.detach_net``) where it views the kept one's memory or
      has its (non-zero) values (compiled: checked in the graph), else a new membrane.

    ``kept`` is ``None`` for a neuron linked before this memory existed (a pickled
    model): ``var`` as it is.

    Raises:
        VarianceFlowError: ``v`` is the kept membrane changed in place since
            (``node.v.zero_()``: eager mode, which reads its version counter), or ``v``
            was computed from the kept membrane out of place (``node.v = 0.5 * node.v``:
            eager mode, which can walk the autograd graph); its variance is unknown.
    """
    if not isinstance(kept, Tensor):
        return var
    if v is kept:
        # (the id: a copy of the model holds another tensor, with a version of its own;
        # None: a compiled call left it, which cannot read it)
        kept_id, version = node.__dict__.get(_KEPT_VERSION, (None, None))
        if (version is not None and not torch.compiler.is_compiling() and kept_id == id(v)
                and version_of(v, False) not in (None, version)):
            name = type(node).__name__
            raise VarianceFlowError(
                f"the membrane v of this converted SpikingJelly {name} was changed in place "
                "since its last call (e.g. node.v.zero_(), node.v.mul_(mask)), so its noise "
                "variance is unknown: the neuron would go on with the variance of the old "
                "values, silently. Start a new sequence with functional.reset_net(net) "
                "(then set node.v to another initial membrane if needed, a new membrane), "
                "or set node.v to an edited copy without a graph (node.v = "
                "node.v.detach() * mask: a new membrane, without the variance)")
        return var
    if v.requires_grad:
        if computed_from(v, kept):
            name = type(node).__name__
            raise VarianceFlowError(
                f"the membrane v of this converted SpikingJelly {name} was set to a tensor "
                "computed from its last membrane (e.g. node.v = 0.5 * node.v): the neuron "
                "follows the noise variance of the membranes its calls leave, not of an "
                "edit of one, and would restart it silently. Apply the change to the "
                "neuron's input instead, or start a new sequence "
                "(functional.reset_net(net), then set node.v to the new membrane)")
        return None
    if not same_layout(v, kept):
        return None
    if not torch.compiler.is_compiling():
        return var.detach() if aliases(v, kept) or copy_of(v, kept) else None
    return torch.where(holds_copy(v, kept), var.detach(), 0.0)


#: SpikingJelly's parallel spiking neurons: they call the surrogate on a whole sequence
#: (``[T, N * C]``, ``[T, N, C]``) or on a flattened step (``[N * C]``), not on ``[N, *]``.
_SEQUENCE_NODES = ("PSN", "MaskedPSN", "SlidingPSN")


def _calls_on_sequences(node: nn.Module) -> bool:
    return any(c.__name__ in _SEQUENCE_NODES and c.__module__.startswith(_NEURON_MODULE)
               for c in type(node).__mro__)


def _note_examples(node: nn.Module, args) -> None:
    """Forward pre-hook of a parallel spiking neuron: hand its spike function the number
    of examples of the input (``[T, N, *]`` in multi-step mode, the only one of
    ``neuron.PSN``; ``[N, *]`` in single-step mode)."""
    spike = node._modules.get("surrogate_function")
    if not isinstance(spike, SJSpike) or not args or not isinstance(args[0], Tensor):
        return
    x, dim = args[0], 1 if getattr(node, "step_mode", "m") == "m" else 0
    set_state(spike, _examples=x.shape[dim] if x.dim() > dim else 1)


def _forget_examples(node: nn.Module, args, output) -> None:
    spike = node._modules.get("surrogate_function")
    if isinstance(spike, SJSpike):
        # under torch.compile set to None, not deleted: a graph replays its deletion at
        # every call, and one traced where a copy of the model held None failed with a
        # KeyError at its next call
        drop_state(spike, "_examples")


_RESET_NOTE = (" (a gradient reaches them from a loss on them, and from one on the "
               "membrane through the reset unless the neuron has detach_reset=True)")


def _per_step_variance(var: Tensor, x_seq: Tensor) -> Tensor:
    """The variance of a multi-step input ``x_seq`` ``[T, N, *]`` with its time dimension
    first: ``var`` broadcast over the leading dimensions it lacks and over ``T`` (an
    expanded view, no copy), its other dimensions kept as compact as they are.

    A variance only broadcasts to its mean: a static Bayesian layer output ``[N, C]``
    repeated over time by a broadcasting sum (``y + zeros(T, N, C)``,
    ``y.unsqueeze(0) + zeros(T, 1, 1)``) carries a variance ``[N, 1]`` or ``[1, N, C]``,
    whose first dimension is not the time dimension.

    Raises:
        ValueError: ``var`` does not broadcast to ``x_seq``.
    """
    shape, steps = tuple(var.shape), x_seq.shape[0] if x_seq.dim() else 1
    try:
        fits = torch.broadcast_shapes(shape, tuple(x_seq.shape)) == x_seq.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise_error(
            f"the variance of shape {concrete_shape(var)} attached to a multi-step neuron's "
            f"input of shape {concrete_shape(x_seq)} does not broadcast to it; attach a "
            "variance of the input's shape (or one broadcastable to it)", ValueError)
    if x_seq.dim() == 0 or (var.dim() == x_seq.dim() and shape[0] == steps):
        return var
    var = var.reshape((1,) * (x_seq.dim() - var.dim()) + shape)
    return var.expand(steps, *var.shape[1:])


def surrogate_function(
    estimator="st", *, std: float | None = DEFAULT_SPIKE_STD, learn_std: bool | None = None,
    aux_pull: float = DEFAULT_AUX_PULL, **kw
) -> SJSpike:
    """Stochastic IW-ST spike usable as ``neuron.LIFNode(surrogate_function=...)``.

    ``h = 1[u + sigma eps >= 0]`` with ``u = H - v_threshold`` of shape ``[N, *]``
    (one call per time step in both step modes), ``sigma = std`` (plus the linked
    posterior variance after :func:`to_sbnn`). In ``mean`` mode it equals SpikingJelly's
    Heaviside exactly.

    Used alone in an otherwise unchanged model it trains by default: its own noise std
    starts at ``1/sqrt(2 pi) = 0.399`` and is learned (one per spike function: give each
    neuron its own). With the ST estimator the expected gradient is
    ``E[dh/du] = phi(u / std) / std``, a Gaussian surrogate of width ``std``; at this
    ``std`` its peak is 1, the peak of SpikingJelly's ``Sigmoid(alpha=4)`` (the default)
    and ``ATan(alpha=2)``.

    Args:
        estimator: ``"st"``, ``"iwst(p)"``, ``"agr(tau)"`` or an Estimator.
        std: the spike's own noise std, in the membrane's units (default
            :data:`~sbnn_addons.spike.DEFAULT_SPIKE_STD`, for SpikingJelly's default
            ``v_threshold=1``; for another threshold scale it with it, e.g.
            ``std=0.399 * v_threshold``, as :func:`to_sbnn` does; ``None`` or 0: no own
            noise, and a zero gradient without a linked Bayesian layer).
        learn_std: learn it through ``softplus(rho)`` (default: when ``std > 0``).
        aux_pull: the auxiliary loss applied through the gradient
            (:class:`~sbnn_addons.IWSTSpike`; 0: off), which lets a neuron pushed far
            below its threshold recover.
        **kw: further :class:`~sbnn_addons.IWSTSpike` arguments (``threshold``,
            ``aux_center``, ``std_shape``, ...); ``at_zero=True`` and ``batch_dim=0``
            are the defaults.
    """
    if learn_std is None:
        learn_std = bool(std)
    return SJSpike(estimator, std=std, learn_std=learn_std, aux_pull=aux_pull, **kw)


def _dynamics(node: nn.Module) -> tuple:
    """``(beta, c, hard_reset)`` of ``H = beta V + c X`` for a supported neuron."""
    hard = node.v_reset is not None
    if type(node) is neuron.ParametricLIFNode:
        q = node.w.sigmoid()
        return 1.0 - q, (q if node.decay_input else 1.0), hard
    if type(node) is neuron.LIFNode:
        inv = 1.0 / node.tau
        return 1.0 - inv, (inv if node.decay_input else 1.0), hard
    if type(node) is neuron.IFNode:
        return 1.0, 1.0, hard
    raise _unsupported(node)


def _unsupported(node: nn.Module, name: str = "") -> TypeError:
    names = ", ".join(f"neuron.{c.__name__}" for c in SUPPORTED_NEURONS)
    where = f"module '{name}' ({type(node).__name__})" if name else type(node).__name__
    hint = (f"exclude=['{name}', <the layers feeding it>]" if name
            else "exclude=[<its name>, <the layers feeding it>]")
    return TypeError(
        f"{where} is not supported by sbnn_addons.spikingjelly (its membrane variance "
        f"dynamics are unknown); supported neurons: {names}. Replace it, or keep it and the "
        f"layers feeding it deterministic with {hint}"
    )


def _neuron_pre_hook(node: nn.Module, args):
    spike = node.surrogate_function
    if (not isinstance(spike, SJSpike) or not spike._linked or not args
            or not isinstance(args[0], Tensor)):
        # (an SJSpike put in after the conversion, not linked: the input keeps its
        # variance, which the spike function then refuses, naming link_neuron)
        return None
    x = args[0]
    # Python floats (a learned one is a parameter, checked with the model's parameters):
    # no device read; while compiling a runtime assert (a float that changed between
    # calls is symbolic in the graph, which math.isnan cannot read)
    compiling = torch.compiler.is_compiling()
    if compiling:  # its noise scale (a converted model's entry checks it in eager mode only)
        check_noise_scales(spike)
    for attr in ("tau", "v_reset"):
        value = node.__dict__.get(attr)
        if not isinstance(value, float):
            continue
        message = (
            f"the converted SpikingJelly {type(node).__name__} has {attr!r} = NaN (set "
            "after the conversion): its membrane would be NaN and it would never fire "
            f"(spikes 0, gradients NaN), silently; give {attr} a number")
        if compiling:
            torch._assert_async(~torch.isnan(torch.scalar_tensor(value)), message)
        elif math.isnan(value):
            raise ValueError(message)
    if in_torch_checkpoint():
        raise RuntimeError(
            f"a converted SpikingJelly {type(node).__name__} runs inside "
            "torch.utils.checkpoint: the recomputation in the backward would start from "
            "the neuron's state (membrane, noise variance) at the end of the sequence, not "
            "at the region's entry, and the gradients would be wrong; use "
            "sbnn_addons.checkpoint.checkpoint(fn, *args, modules=block), which puts the "
            "state back for the recomputation"
        )
    if in_checkpoint_forward() and not checkpoint_restores_state(node):
        name = noise_sources(x, node)[0]
        raise RuntimeError(
            f"a converted SpikingJelly {type(node).__name__}{f' {name!r}' if name else ''} "
            "runs inside sbnn_addons.checkpoint.checkpoint but is not part of its modules=: "
            "its state (membrane, noise variance) is not put back for the recomputation in "
            "the backward, which would start from the state at the end of the sequence, and "
            "the gradients would be wrong; pass modules= the module that fn runs "
            "(checkpoint(fn, *args, modules=model)), or an nn.ModuleList of all of them"
        )
    var = get_variance(x)
    if isinstance(var, UnknownVariance):
        raise_error(_unknown_variance_message(node, x, var), VarianceFlowError)
    if type(x) is Tensor and not compiling:  # (spikes, a Bayesian layer's output: taken)
        refuse_membrane_input(x, node, "the input current")
    spike._begin(node, var, node.step_mode == "m", x)
    if type(x) is not VarianceTensor:
        return None
    with no_variance_flow():
        # same values and graph, no variance: the spike tracks it. A graph that Dynamo
        # makes of this hook alone (a graph break elsewhere in the model) must not return
        # an alias of its carrier input: AOTAutograd's first run of that graph detaches
        # the input under a dispatch mode that refuses the subclass (a TypeError,
        # "Multiple dispatch failed for aten.detach"); a copy, which a larger graph fuses
        stripped = x.clone() if torch.compiler.is_compiling() else x.view_as(x)
    spike.__dict__["_input"] = stripped  # _mark_spikes: did the node run on it?
    return (stripped, *args[1:])


def _unknown_variance_message(node: nn.Module, x: Tensor, var: UnknownVariance) -> str:
    """The error message for a linked neuron whose input ``x`` carries a variance that an
    operation without a rule made unknown: it names the neuron and the Bayesian layers
    whose noise ``x`` carries (eager mode, in a tracked forward), and the ways out."""
    name, layers = noise_sources(x, node)
    where = f"{type(node).__name__} {name!r}" if name else type(node).__name__
    which, fix = "a Bayesian layer", "exclude=[<the layers feeding it>]"
    if layers:
        which = f"the Bayesian layer(s) {', '.join(repr(n) for n in layers)}"
        fix = f"exclude={layers}"
    return (
        f"the input of {where} carries the noise of {which} through '{var.op}', whose "
        "effect on the posterior variance is unknown. Use a supported operation between "
        f"the Bayesian layer and the neuron, keep those layers deterministic ({fix} in "
        "to_sbnn), or register a rule with sbnn_addons.moments.register_variance_rule."
    )


_NEURON_MODULE = "spikingjelly.activation_based.neuron"


def _is_spiking_node(m: nn.Module) -> bool:
    """A spiking neuron: a supported one; any class of SpikingJelly's ``neuron`` package
    or derived from one (``PSN`` and ``ILCLIFNode`` are not ``MemoryModule`` s,
    ``DSRIFNode`` has no ``surrogate_function``), except its non-spiking readouts
    (``NonSpikingLIFNode``, ...); or a user's ``MemoryModule`` with a
    ``surrogate_function``."""
    cls = type(m)
    if cls in SUPPORTED_NEURONS:
        return True
    mro = cls.__mro__
    if any(c.__module__.startswith(_NEURON_MODULE) for c in mro):
        return not any("NonSpiking" in c.__name__ for c in mro)
    return isinstance(m, base.MemoryModule) and hasattr(m, "surrogate_function")


def link_neuron(node: nn.Module, spike: SJSpike | None = None) -> nn.Module:
    """Link a supported SpikingJelly neuron to an :class:`SJSpike` (its surrogate).

    Installs a forward pre-hook that hands the variance of the neuron's input to the
    spike function, which then follows the neuron's dynamics (module doc).

    Raises:
        TypeError: the neuron is not exactly ``IFNode``, ``LIFNode`` or
            ``ParametricLIFNode``.
    """
    if type(node) not in SUPPORTED_NEURONS:
        raise _unsupported(node)
    if spike is not None:
        node.surrogate_function = spike
    if not isinstance(node.surrogate_function, SJSpike):
        raise TypeError(
            "node.surrogate_function must be an SJSpike (sbnn_addons.spikingjelly."
            f"surrogate_function(...)), got {type(node.surrogate_function).__name__}"
        )
    node.surrogate_function.threshold = threshold_value(node.v_threshold)
    node.surrogate_function._linked = True
    node.surrogate_function._node_type = type(node).__name__  # for messages
    if VAR_MEMORY not in node._memories:
        node.register_memory(VAR_MEMORY, None)
    if MEMBRANE_MEMORY not in node._memories:
        node.register_memory(MEMBRANE_MEMORY, None)
    if _neuron_pre_hook not in node._forward_pre_hooks.values():
        node.register_forward_pre_hook(_neuron_pre_hook)
    if _mark_spikes not in node._forward_hooks.values():
        # first: the node's own output is the spikes; a hook of the user's that runs
        # before it and changes them (graded values) would have its result marked 0/1
        node.register_forward_hook(_mark_spikes, prepend=True)
    # instance attributes shadow the class methods (removed again by _unlink)
    node.__dict__["multi_step_forward"] = functools.partial(_linked_multi_step_forward, node)
    node.__dict__["single_step_forward"] = functools.partial(_linked_single_step_forward, node)
    node.__dict__["functional_forward"] = functools.partial(_linked_functional_forward, node)
    return node


def _refuse_a_call_past_the_hooks(node: nn.Module, x) -> None:
    """Refuse a linked node run through one of its own methods (``node.multi_step_forward(x)``,
    ``node.single_step_forward(x)``, ``node.forward(x)``), outside a call of the module,
    on an input carrying a Bayesian layer's noise: its hooks, which hand the input's
    variance to the spike function, did not run. Raised before SpikingJelly's loop, which
    iterates over the input (``for x in x_seq``): a graph being traced builds those items
    without their variance, and Dynamo failed with an internal error ("builtin
    isinstance() cannot determine type of argument") instead of this one.

    Raises:
        VarianceFlowError: naming the neuron and the fix (eager mode; a Dynamo
            ``UserError`` while compiling).
    """
    spike = node._modules.get("surrogate_function")
    if (isinstance(spike, SJSpike) and spike._linked and not spike._in_call
            and isinstance(x, Tensor) and get_variance(x) is not None):
        raise_error(spike._bypassed_hooks_message(x), VarianceFlowError)


def _linked_single_step_forward(node: nn.Module, x: Tensor, *args, **kwargs):
    """A linked node's ``single_step_forward``: a call in single-step mode runs as a fused
    sequence of one step (:func:`_fused_sequence`: the same spikes and membrane as the
    node's own step, in one autograd node), else the node's own, after
    :func:`_refuse_a_call_past_the_hooks`."""
    _refuse_a_call_past_the_hooks(node, x)
    spike = node.surrogate_function
    if (not args and not kwargs and isinstance(x, Tensor) and x.dim()
            and isinstance(spike, SJSpike) and spike._linked and not spike._multi):
        spikes = _fused_sequence(node, spike, x.unsqueeze(0), multi=False)
        if spikes is not None:
            return spikes[0]
    return type(node).single_step_forward(node, x, *args, **kwargs)


def _linked_functional_forward(node: nn.Module, inputs, states, **kwargs):
    """A linked node's ``functional_forward``, SpikingJelly's explicit-state call that
    ``base.to_functional_forward`` (and so ``memopt.checkpoint_module`` and
    ``memopt.optimize_memory``) use: refused. It runs the node without its hooks, so the
    noise variance of its input and membrane would be lost (and the states it returns
    lack the variance memory, which SpikingJelly then refuses with a "Memory length
    mismatch").

    Raises:
        RuntimeError: always, naming the way out.
    """
    raise RuntimeError(
        f"SpikingJelly's functional forward of a converted {type(node).__name__} (used by "
        "memopt.checkpoint_module, memopt.optimize_memory and base.to_functional_forward) "
        "is not supported: it runs the neuron without the hooks that carry the noise "
        "variance of its input and membrane. To checkpoint a region of a converted model, "
        "use sbnn_addons.checkpoint.checkpoint(fn, *args, modules=block), which puts the "
        "neurons' state back for the recomputation")


#: The constants of a SpikingJelly node the fused sequence reads as numbers.
_NODE_CONSTANTS = ("v_threshold", "v_reset", "tau")


def _sequence_dynamics(node: nn.Module, spike: SJSpike, x_seq: Tensor, var,
                       multi: bool):
    """The :class:`~sbnn_addons.kernels.Dynamics` of this call of a linked node on
    ``x_seq`` (a multi-step call, or with ``multi=False`` a single-step call as a sequence
    of one step) with the input variance term ``var`` (``[T, *]``), or ``None`` where the
    fused sequence does not serve it (then the node runs its own step or loop): float32 or
    float64 (on the C kernel for float32 on the CPU, else on PyTorch operations:
    :func:`~sbnn_addons.kernels.sequence_backend`), eager, a stochastic mode, no
    ``store_v_seq``, a finite threshold, some noise where a gradient may follow."""
    kind = type(node)
    if (
        kind not in SUPPORTED_NEURONS
        or spike._step != 0
        or spike._multi != multi
        or spike.deterministic
        or spike.fire_overridden()
        or node.store_v_seq
        or node._neuron_precision is not None
        # without any noise, where a gradient may follow: the node's loop, whose spike
        # function refuses a gradient reaching its spikes (their gradient would be 0)
        or (var is None and spike._var_state is None and not spike.learn_std
            and torch.is_grad_enabled() and not spike._fixed_std_nonzero())
        or x_seq.dim() < 2
        # a learned threshold, reset potential or time constant (an nn.Parameter): the
        # sequence reads them as numbers, the node's loop differentiates them
        or any(isinstance(getattr(node, a, None), Tensor) for a in _NODE_CONSTANTS)
        or (isinstance(var, Tensor) and (var.dim() != x_seq.dim()
                                         or var.shape[0] != x_seq.shape[0]))
        or kernels.sequence_backend(x_seq, var if isinstance(var, Tensor) else None) is None
        # (after sequence_backend, None in a graph, where the threshold may be symbolic)
        # an infinite threshold (the membrane readout LIFNode(v_threshold=inf)) runs the
        # node's own loop, which is exact there (u = H - theta is -inf)
        or not math.isfinite(node.v_threshold)
    ):
        return None
    beta, _c, hard = spike._coeffs  # _dynamics(node), taken by the pre-hook for this call
    if kind is neuron.LIFNode:
        tau, charge = float(node.tau), ("lif" if node.decay_input else "lif_nodecay")
    elif kind is neuron.ParametricLIFNode:  # beta = 1 - sigmoid(w), given as the rate
        tau, charge, beta = None, ("plif" if node.decay_input else "plif_nodecay"), 0.0
    else:
        tau, charge = None, "if"
    return kernels.Dynamics(charge, beta, tau, float(node.v_threshold),
                            "hard" if hard else "subtract",
                            float(node.v_reset) if hard else 0.0, reset_variance=hard,
                            detach_reset=bool(node.detach_reset))


def _linked_multi_step_forward(node: nn.Module, x_seq: Tensor, *args, **kwargs):
    """A linked node's ``multi_step_forward``: the whole sequence in one
    :func:`~sbnn_addons.kernels.lif_sequence` call (the same spikes and membranes as the
    node's own loop, which calls the spike function once per step; one autograd node
    instead of about ten per step), else the node's own method."""
    _refuse_a_call_past_the_hooks(node, x_seq)
    spike = node.surrogate_function
    if isinstance(x_seq, Tensor) and x_seq.dim() and x_seq.shape[0] == 0:
        return x_seq.new_zeros(x_seq.shape)  # T = 0: no steps, no spikes, state unchanged
    if not args and not kwargs and isinstance(spike, SJSpike) and spike._linked:
        spikes = _fused_sequence(node, spike, x_seq, multi=True)
        if spikes is not None:
            return spikes
    return type(node).multi_step_forward(node, x_seq, *args, **kwargs)


def _fused_sequence(node: nn.Module, spike: SJSpike, x_seq: Tensor, multi: bool):
    """Run linked ``node`` on ``x_seq`` ``[T, *]`` as one
    :func:`~sbnn_addons.kernels.lif_sequence` call, keeping its membrane and noise state
    as the node's own steps would; ``None`` (nothing run) where the fused sequence does not
    serve this call (:func:`_sequence_dynamics`). ``multi=False``: a single-step call,
    ``x_seq`` its input with a time dimension of 1."""
    var = spike._pending
    if not multi and isinstance(var, Tensor):
        var = var.unsqueeze(0)  # c^2 var(X): the step's term, as a sequence's [1, *]
    dyn = _sequence_dynamics(node, spike, x_seq, var, multi)
    if dyn is None:
        return None
    (v0,) = node.materialize_states((x_seq,), tuple(node._memories.values()), "m")[:1]
    if isinstance(var, Tensor):
        var = compact_broadcast(var)
        if var.shape[0] != x_seq.shape[0]:  # constant over time: lif_sequence takes T terms
            var = var.expand(x_seq.shape[0], *var.shape[1:])
    else:
        var = None
    own = spike.noise_variance(x_seq.new_zeros(()))  # the spike's own noise only
    noisy = var is not None or spike._var_state is not None or own is not None
    aux = noisy and spike._aux_wanted()  # as the node's loop
    rate = node.w.sigmoid() if dyn.charge.startswith("plif") else None
    pull = noisy and spike._sequence_pull_wanted(x_seq, v0, var, spike._var_state, own, rate)
    out = kernels.lif_sequence(
        x_seq, var, v0, spike._var_state, dyn, spike.estimator, rate=rate, own_var=own,
        at_zero=spike.at_zero,
        aux_offset=spike._aux_offset(spike.threshold) if aux else None,
        aux_var=spike.aux_std_grad, aux_pull=spike.aux_pull if pull else 0.0,
        generator=spike._generator_for(x_seq))
    spikes, v, state = out[:3]
    if aux:
        spike._collect(out[3], x_seq[0], x_seq.shape[0])
    node._memories["v"] = v
    if multi:
        node.v_seq = None
    set_state(spike, _var_state=state if var is not None or spike._var_state is not None
              else None, _step=x_seq.shape[0])
    return spikes


def _runs_t_last_vmap(m: nn.Module) -> bool:
    """Whether ``m`` is a ``layer.TLastSeqToANNContainer`` (or a subclass) running
    SpikingJelly's own forward, under ``torch.vmap``: a subclass with a forward of its own
    is left as it is (a Bayesian layer it runs under vmap raises at the first forward)."""
    return (isinstance(m, layer.TLastSeqToANNContainer)
            and type(m).forward is layer.TLastSeqToANNContainer.forward)


def _t_last_seq_to_ann_forward(container: nn.Module, x_seq: Tensor):
    """The forward of a ``layer.TLastSeqToANNContainer`` in a converted model.
    SpikingJelly's own runs the modules under ``torch.vmap`` over the last (time)
    dimension of ``[N, *, T]``, whose output is a plain tensor: the variance of a Bayesian
    layer inside, or of a noisy input, would vanish. This one moves time first and runs
    the modules once on the ``T * N`` examples (``functional.seq_to_ann_forward``): the
    same values for the stateless modules the container is meant for, and the variance
    goes on."""
    y = functional.seq_to_ann_forward(x_seq.movedim(-1, 0),
                                      functools.partial(nn.Sequential.forward, container))
    if isinstance(y, tuple):
        return tuple(item.movedim(0, -1) for item in y)
    return y.movedim(0, -1)


def _mark_spikes(node: nn.Module, args, output):
    """After a linked node's call: store the spike function's membrane variance as the
    node's memory ``sbnn_var``, and mark the output as spikes (0/1), so that a Bayesian
    layer fed by it skips ``x * x`` and keeps it as bytes for the backward unless the
    spike function keeps this tensor already (then the layer shares it)."""
    spike = node.surrogate_function
    if isinstance(spike, SJSpike):
        taken = read_state(spike, "_input")
        if taken is not None and args and args[0] is not taken:
            _check_input_unchanged(node, spike, taken, args[0])
    if isinstance(spike, SJSpike) and VAR_MEMORY in node._memories:
        state = spike._var_state
        if isinstance(state, Tensor) and state._base is not None:
            state = state.clone()  # a view cannot be detached in place (detach_net)
        node._memories[VAR_MEMORY] = state
        if isinstance(state, Tensor) and not torch.compiler.is_compiling():
            # node.v (and v_seq) are plain tensors whose noise variance the node keeps:
            # a Bayesian layer or another node fed by them would take them as noise-free
            for kept in (node._memories.get("v"), node.__dict__.get("v_seq")):
                if isinstance(kept, Tensor):
                    note_noisy_membrane(kept, node)
        if MEMBRANE_MEMORY in node._memories:  # the membrane that variance belongs to
            v = node._memories.get("v")
            node._memories[MEMBRANE_MEMORY] = v if isinstance(state, Tensor) else None
            if isinstance(v, Tensor):  # (eager: a change in place since is refused)
                node.__dict__[_KEPT_VERSION] = ((None, None) if torch.compiler.is_compiling()
                                                else (id(v), version_of(v, False)))
    if isinstance(spike, SJSpike):
        spike._end()
    if isinstance(output, Tensor):
        if torch.compiler.is_compiling():
            # a copy (fused away inside a graph): where the graph ends here (a graph break
            # after the node), inductor's backward may reuse the buffer of a tensor the
            # forward saved (the spikes, for the reset) in place, and the caller's spikes
            # would change in the backward
            return output.clone()
        mark_binary(output)  # a kept mark (the spike function's) stays


def _check_input_unchanged(node: nn.Module, spike: SJSpike, taken: Tensor, x) -> None:
    """Refuse a neuron call whose input ``x`` differs from the one whose variance the
    link's pre-hook took (``taken``): a forward pre-hook registered after the conversion
    (it runs after the link's) changed it, and the spikes were drawn with the variance of
    the input before the change. An equal tensor (another object, or the same values in
    another dtype or on another device) passes.

    Raises:
        VarianceFlowError: naming the neuron and the two ways to register the hook.
    """
    compiling = torch.compiler.is_compiling()
    with torch._C.DisableTorchFunctionSubclass():
        same = isinstance(x, Tensor) and x.shape == taken.shape
        if same and compiling:
            # the values are not known while tracing: a runtime assert in the graph (a
            # NaN passed on counts as unchanged)
            y = x.to(device=taken.device, dtype=taken.dtype)
            torch._assert_async(((y == taken) | (y.isnan() & taken.isnan())).all(),
                                _changed_input_message(node, None))
            return
        same = same and torch.equal(x.to(device=taken.device, dtype=taken.dtype), taken)
    if same:
        return
    spike._end()
    name = noise_sources(taken, node)[0] if not compiling else None
    raise_error(_changed_input_message(node, name), VarianceFlowError)


def _changed_input_message(node: nn.Module, name: str | None) -> str:
    where = f"{type(node).__name__} {name!r}" if name else type(node).__name__
    return (
        f"a forward pre-hook of the converted SpikingJelly {where}, registered after its "
        "conversion, changed the neuron's input after the conversion's own pre-hook had "
        "taken its posterior variance: the spikes were drawn with the variance of the "
        "input before that change. Register the hook before converting, or with "
        "register_forward_pre_hook(hook, prepend=True), which runs it first (the "
        "variance then follows the change)")


def _unlink(node: nn.Module) -> None:
    node.__dict__.pop("multi_step_forward", None)
    node.__dict__.pop("single_step_forward", None)
    node.__dict__.pop("functional_forward", None)
    for memory in (VAR_MEMORY, MEMBRANE_MEMORY):
        if memory in getattr(node, "_memories", {}):
            delattr(node, memory)  # MemoryModule.__delattr__: the memory and its reset value
    for hooks, fn in ((node._forward_pre_hooks, _neuron_pre_hook),
                      (node._forward_pre_hooks, _refuse_variance),
                      (node._forward_hooks, _mark_spikes)):
        for key, hook in list(hooks.items()):
            if hook is fn:
                del hooks[key]


# --------------------------------------------------------------------------- layers
class BayesLinear(_layers.BayesLinear, layer.Linear):
    """:class:`~sbnn_addons.BayesLinear` with SpikingJelly's ``step_mode``.

    Input ``[N, in]`` (``'s'``) or ``[T, N, in]`` (``'m'``): the linear map acts on the
    last dimension either way. Output: the mean, with its variance attached. An instance
    of ``layer.Linear`` too, as the layer it replaces: SpikingJelly's monitors
    (``monitor.OutputMonitor(net, layer.Linear)``) and a user's ``isinstance`` checks
    find it.
    """

    def __init__(self, *args, step_mode: str = "s", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.step_mode = step_mode

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, step_mode={self.step_mode}"


class _StepConv:
    """SpikingJelly's ``step_mode`` for the Bayesian convolutions: ``'s'``: ``[N, C, *]``;
    ``'m'``: ``[T, N, C, *]``, flattened to ``[T*N, ...]`` for the convolution; the mean
    and its variance are reshaped back to ``[T, N, ...]``."""

    _shape = ""  # the multi-step input, for the message

    def __init__(self, *args, step_mode: str = "s", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.step_mode = step_mode

    def forward(self, x: Tensor) -> Tensor:
        if self.step_mode == "s":
            return super().forward(x)
        if x.dim() != len(self.kernel_size) + 3:
            raise_error(
                f"{type(self).__name__} in step_mode='m' expects x of shape {self._shape}, "
                f"got {concrete_shape(x)}", ValueError)
        # both reshapes go through the variance flow: a noisy input (an earlier Bayesian
        # layer with no neuron between) stays noisy, so the layer refuses it and names
        # the earlier layer, instead of the earlier layer's variance vanishing silently;
        # the output keeps its draw (the layer's name in messages), a factored variance
        # and mean mode's probe
        y = super().forward(x.flatten(0, 1))
        return y.unflatten(0, x.shape[:2])


class BayesConv1d(_StepConv, _layers.BayesConv1d, layer.Conv1d):
    """:class:`~sbnn_addons.BayesConv1d` with SpikingJelly's ``step_mode`` (``'m'``:
    ``[T, N, C, L]``); an instance of ``layer.Conv1d`` too (as :class:`BayesLinear`)."""

    _shape = "[T, N, C, L]"


class BayesConv2d(_StepConv, _layers.BayesConv2d, layer.Conv2d):
    """:class:`~sbnn_addons.BayesConv2d` with SpikingJelly's ``step_mode`` (``'m'``:
    ``[T, N, C, H, W]``); an instance of ``layer.Conv2d`` too (as :class:`BayesLinear`)."""

    _shape = "[T, N, C, H, W]"


class ChannelAffine(_layers.ChannelAffine, base.StepModule):
    """Mean-only :class:`~sbnn_addons.ChannelAffine` replacing SpikingJelly's
    ``layer.BatchNorm1d/2d``: channels in dimension 1 (``'s'``) or 2 (``'m'``,
    ``[T, N, C, ...]``)."""

    def __init__(self, num_features: int, step_mode: str = "s", bn_class: str = "",
                 eps: float = 1e-5) -> None:
        super().__init__(num_features, eps=eps)
        self.step_mode = step_mode
        self.bn_class = bn_class

    def forward(self, x: Tensor) -> Tensor:
        self.channel_dim = 1 if self.step_mode == "s" else 2
        return super().forward(x)


def _float_like(*modules: nn.Module) -> dict:
    """``device`` and ``dtype`` of the first floating-point parameter or buffer of the
    first of ``modules`` that has one (a neuron's own, else the model's), for the
    parameters a conversion adds; ``{}`` where there is none."""
    for module in modules:
        for t in (*module.parameters(), *module.buffers()):
            if t.is_floating_point():
                return {"device": t.device, "dtype": t.dtype}
    return {}


def _affine_from_bn(bn: nn.Module) -> nn.Module:
    plain = _layers.ChannelAffine.from_batchnorm(bn)
    if isinstance(bn, base.StepModule):
        # on the BatchNorm's device before loading: from a meta one nothing can be copied
        # to the CPU (and from CUDA it was a round trip)
        affine = ChannelAffine(bn.num_features, bn.step_mode, type(bn).__name__,
                               eps=plain.eps).to(device=plain.weight.device,
                                                 dtype=plain.weight.dtype)
        affine.load_state_dict(plain.state_dict())
        affine.weight.requires_grad_(plain.weight.requires_grad)  # a frozen one stays frozen
        affine.bias.requires_grad_(plain.bias.requires_grad)
    else:
        affine = plain
        affine.bn_class = type(bn).__name__
    affine.train(bn.training)
    return affine


_SJ_BN = (layer.BatchNorm1d, layer.BatchNorm2d)
_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


@contextlib.contextmanager
def stub_torchvision() -> Iterator[bool]:
    """Let SpikingJelly's model zoo import on a machine without torchvision.

    ``spikingjelly.activation_based.model`` (``sew_resnet``, ``spiking_resnet``,
    ``spiking_vgg``) imports torchvision at import time, only to download pretrained
    weights. Where torchvision is not installed, this block registers a stub module in
    ``sys.modules`` whose one function, ``load_state_dict_from_url``, is
    ``torch.hub.load_state_dict_from_url``; import the zoo inside it::

        with sbnn_addons.spikingjelly.stub_torchvision():
            from spikingjelly.activation_based.model import sew_resnet

    The stub is removed when the block ends: libraries that look for torchvision later
    (torchmetrics, which :mod:`sbnn_addons.metrics` uses) would take it for the real
    package and fail. The zoo modules imported inside keep working. Nothing changes where
    torchvision is installed or already imported.

    Yields:
        ``True`` if the stub was installed by this block.
    """
    import importlib.util
    import sys
    import types

    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        yield False
        return
    stub = types.ModuleType("torchvision")
    utils = types.ModuleType("torchvision._internally_replaced_utils")
    utils.load_state_dict_from_url = torch.hub.load_state_dict_from_url
    stub._internally_replaced_utils = utils
    modules = {"torchvision": stub, "torchvision._internally_replaced_utils": utils}
    sys.modules.update(modules)
    try:
        yield True
    finally:
        for name, module in modules.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


# --------------------------------------------------------------------------- surgery
def _modules_swapped(model: nn.Module) -> None:
    """After a conversion or an export swapped modules of ``model``: drop SpikingJelly's
    cached module lists of *every* network, not only ``model``'s. A parent of ``model``
    (``net.body = to_sbnn(net.body)``) would otherwise keep resetting the old neurons
    with ``functional.reset_net(net)`` while the new ones carry their state from batch to
    batch. Each network rebuilds its list once, at its next ``reset_net``."""
    functional.invalidate_reset_cache(model)
    from spikingjelly.activation_based.functional import net_config

    cache = getattr(net_config, "_RESET_MODULE_CACHE", None)
    if cache is not None:
        cache.clear()


def _clear_reset_caches_on_assignment(module: nn.Module, name: str, submodule):
    """Global module-registration hook (``nn.Module.__setattr__`` calls it): a converted
    model assigned into a parent (``net.body = to_sbnn(net.body)``, whenever the parent's
    module list was cached) drops the cached lists, as :func:`_modules_swapped`."""
    if isinstance(submodule, nn.Module) and submodule.__dict__.get("_sbnn_flow_handles"):
        _modules_swapped(module)


_ASSIGNMENT_HOOK = torch.nn.modules.module.register_module_module_registration_hook(
    _clear_reset_caches_on_assignment)


def reset(model: nn.Module) -> nn.Module:
    """Reset every neuron (and its tracked variance): ``invalidate_reset_cache`` +
    ``reset_net``. Call it between sequences. Returns ``model``.

    A compiled model (``torch.compile(net)``) resets the model it wraps: SpikingJelly's
    table of reset networks would otherwise hold both, and a step that Dynamo traces with
    ``reset_net(net)`` inside fails on the module reached twice (an ``AssertionError``,
    "already tracked for mutation"; see the Performance page).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or it holds snnTorch neurons and no
            SpikingJelly one (use :func:`sbnn_addons.snntorch.reset`).
    """
    check_module(model, "spikingjelly.reset")
    refuse_other_host_reset(model, "spikingjelly", "snntorch")
    net = compiled_wrapped(model)
    functional.invalidate_reset_cache(net)
    functional.reset_net(net)
    return model


def to_sbnn(
    model: nn.Module,
    estimator="st",
    *,
    std: float | None = None,
    std_mode: str = "layer",
    learn_std: bool = True,
    bias_std: float | None = None,
    spike_std: float | None = CONVERTED_SPIKE_STD,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    batchnorm: str = "keep",
    aux_loss: bool = False,
    aux_pull: float = DEFAULT_AUX_PULL,
    inplace: bool = False,
    example_input=None,
) -> nn.Module:
    """Convert a SpikingJelly model into a Spiking Bayesian Neural Network.

    Weight layers become Bayesian (``.weight`` kept as the posterior mean, std ``s``),
    supported neurons get a linked :class:`SJSpike`; BatchNorm is kept (or becomes a
    mean-only affine):

    .. code-block:: text

        a = W_mean x + b,  var(a) = s^2 sum x^2        (Bayesian layer, shapes kept)
        S_t = beta^2 S_{t-1} + c^2 var(X_t)            (neuron H = beta V + c X)
        spike_t = 1[H_t - v_th + sqrt(S_t + s_n^2) eps >= 0]

    The defaults train out of the box: each layer's posterior std starts at a tenth of the RMS
    of its ported weights (the noise is a tenth of the spread of the signal, whatever the
    weights' scale), each neuron has a learned own noise std (``spike_std = 0.399``), a
    floor under the posterior noise so that a neuron whose inputs are silent still passes
    a gradient, and BatchNorm stays a BatchNorm (an untrained one keeps learning its
    statistics, and it scales the noise with the signal).

    Converted: ``layer.Linear`` / ``layer.Conv1d`` / ``layer.Conv2d`` (to
    :class:`BayesLinear` / :class:`BayesConv1d` / :class:`BayesConv2d`, same ``step_mode``)
    and plain ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` (to the core Bayesian layers;
    exact types only: other weight layers, e.g. ``layer.WSConv2d`` or ``layer.Conv3d``,
    stay deterministic, and a variance reaching one of them raises at the neuron it
    feeds). Neurons: exactly ``neuron.IFNode``,
    ``neuron.LIFNode`` (both ``decay_input``, soft or hard reset) and
    ``neuron.ParametricLIFNode``.

    Args:
        model: a SpikingJelly model (any step mode). Input/output shapes are unchanged.
        estimator: spike gradient estimator (``"st"``, ``"iwst(p)"``, ``"agr(tau)"``).
        std: initial posterior std of the weights (``None``: a fraction
            :data:`~sbnn_addons.layers.CONVERTED_STD_FRACTION` = 0.1 of the RMS of each
            layer's weights, times the scale of a BatchNorm folded after it, see
            :func:`~sbnn_addons.layers.converted_std`).
        std_mode: ``"layer"``, ``"channel"`` or ``"weight"``.
        learn_std: learn the weight std (``False``: fixed, allows ``std=0``).
        bias_std: initial posterior std of the biases (``None``: none; layers without a
            bias get none).
        spike_std: each spike function's own noise std in units of the neuron's
            ``v_threshold``, ``sigma^2 = S + (spike_std |v_th|)^2`` (default
            :data:`~sbnn_addons.spike.CONVERTED_SPIKE_STD` = 0.399, one per neuron; a
            threshold of 0 counts as 1; ``None`` or 0: none, then a neuron fed only by
            silent inputs has a zero gradient, and a gradient reaching the spikes of a
            neuron without any noise, fed by a layer left deterministic, raises
            :class:`~sbnn_addons.moments.VarianceFlowError`). Relative, so that a
            network whose weights and thresholds are scaled together converts to the
            same noise level;
            learned when ``learn_std`` and ``spike_std > 0``. Sized for a fresh network;
            after converting a trained one, size it to the data with
            :func:`sbnn_addons.calibrate_spike_std`.
        include: an ``fnmatch`` pattern (one string is one name) or a list of them, of
            qualified module names of weight layers to convert, or of modules containing
            them (``None``: all).
        exclude: patterns of modules to leave as they are: weight layers stay
            deterministic, and a spiking neuron matched here (also an unsupported one) is
            not converted; a neuron left out must not receive a Bayesian layer's output
            (it raises at its call), so exclude the layers feeding it too.
        batchnorm: ``"keep"`` (default: the BatchNorm stays, scales the variance like the
            mean, and in training mode keeps learning its statistics as in the original)
            or ``"affine"`` (BatchNorm1d/2d -> mean-only
            :class:`~sbnn_addons.ChannelAffine` from the running statistics, equal to the
            BatchNorm in eval mode, the released configuration; the BatchNorm's scale is
            folded into the initial posterior std of the layer it directly follows
            (none after a neuron): with ``example_input`` the layer the forward calls
            right before it, otherwise the one declared right before it, which the
            converted model's first forward checks (a ``ValueError`` where the forward
            calls them in another order, see
            :func:`~sbnn_addons.layers.check_batchnorm_pairing`); channel by
            channel with ``std_mode="channel"`` / ``"weight"`` (layer-wide with a
            per-layer std), which keeps the signal-to-noise ratio; it freezes the
            statistics, so use it on trained models; another BatchNorm, e.g.
            ``layer.ThresholdDependentBatchNorm2d``, stays as it is, with a warning
            naming it).
        aux_loss: collect the auxiliary bias loss (:func:`sbnn_addons.aux_loss`), to be
            added to the loss.
        aux_pull: the auxiliary loss applied through the gradient instead, at this
            fraction of the gradient reaching each neuron's spikes (see
            :class:`~sbnn_addons.IWSTSpike`; 0: off): with it a neuron pushed far below
            its threshold recovers in a training loop left as it was.
        inplace: convert ``model`` itself instead of a deep copy.
        example_input: if given, :func:`sbnn_addons.check_variance_flow` runs one
            no-grad ``mean``-mode forward ``model(example_input)`` on the converted model
            (what one call takes, e.g. one step ``[B, ...]`` for a step-wise model) and
            raises :class:`~sbnn_addons.moments.VarianceFlowError` naming any operation
            without a variance rule between a Bayesian layer and a neuron, at conversion
            time instead of at the first training step (with ``inplace=True`` the model
            is converted by then). With ``batchnorm="affine"``, one no-grad forward
            of the original model in eval mode first pairs each BatchNorm with the layer
            the forward calls right before it
            (:func:`~sbnn_addons.layers.batchnorm_call_pairs`). The model's state is left
            as it was.

    Returns:
        The converted model, with :func:`sbnn_addons.track_variance` installed on it.
        Reset it between sequences with :func:`reset` (or ``functional.reset_net``).

    Every argument is checked before the model changes: with ``inplace=True`` a failed
    conversion leaves the model as it was. The converted model checks its input at each
    call (no zero-size dimension; no NaN / inf unless :class:`sbnn_addons.check_finite` is
    off).

    Raises:
        ValueError: ``model`` is already converted, is itself a weight layer (convert
            the network holding it), contains nothing to convert, an
            ``include`` / ``exclude`` pattern matches nothing, a bad ``estimator``,
            ``std``, ``std_mode``, ``bias_std``, ``spike_std`` or ``batchnorm``; a
            neuron to convert has a surrogate in the non-spiking mode (``spiking=False``)
            or one whose forward is not SpikingJelly's Heaviside ``1[x >= 0]``.
        TypeError: ``model`` contains a spiking neuron other than the supported ones,
            or an snnTorch neuron (``sbnn_addons.snntorch.to_sbnn`` converts those), and
            not excluded; or a SpikingJelly spiking RNN (``rnn.SpikingLSTM``, ...) whose
            weight layers would be converted.
    """
    # every argument is validated before anything changes: a failed inplace=True
    # conversion leaves the model as it was
    check_module(model, "spikingjelly.to_sbnn")
    _refuse_a_single_layer(model)
    learn_std, aux_loss, inplace = (check_flag(n, v) for n, v in (
        ("learn_std", learn_std), ("aux_loss", aux_loss), ("inplace", inplace)))
    if batchnorm not in ("affine", "keep"):
        raise ValueError(f"batchnorm must be 'affine' or 'keep', got {batchnorm!r}")
    inc, exc = name_patterns("include", include), name_patterns("exclude", exclude)
    if (not any(_layers.is_bayesian(m) for m in model.modules())
            and any(isinstance(m, IWSTSpike) and not getattr(m, "_linked", False)
                    for m in model.modules())):
        raise ValueError(
            "model's neurons use sbnn_addons spike functions (surrogate_function()), so "
            "it trains as it is; to_sbnn converts a model with SpikingJelly surrogates: "
            "build the neurons with a SpikingJelly surrogate (e.g. surrogate.ATan()), load "
            "the trained weights, then convert")
    if any(_layers.is_bayesian(m) or isinstance(m, IWSTSpike) for m in model.modules()):
        raise ValueError(
            "model is already converted (it contains Bayesian layers or SBNN spike "
            "functions); convert the original model, or use to_spikingjelly first"
        )
    posterior = dict(std=std, std_mode=std_mode, learn_std=learn_std, bias_std=bias_std)
    spike_learn = bool(learn_std and spike_std)
    _validate_arguments(model, estimator, posterior, spike_std, spike_learn, inc, exc)
    aux_pull = check_aux_pull(aux_pull)
    for name, m in host_neurons(model, "snntorch"):
        if not match_name(name, exc):
            raise TypeError(
                f"module '{name}' ({type(m).__name__}) is an snnTorch neuron, which "
                "sbnn_addons.spikingjelly.to_sbnn does not convert: convert an snnTorch "
                "model with sbnn_addons.snntorch.to_sbnn (or keep this neuron as it is "
                f"with exclude=['{name}', <the layers feeding it>])")
    for name, m in model.named_modules():
        if not _is_spiking_node(m) or match_name(name, exc):
            continue
        if type(m) not in SUPPORTED_NEURONS:
            raise _unsupported(m, name)
        _check_spiking_surrogate(name, m)
        check_heaviside_forward(name, m, m.surrogate_function, at_zero=True,
                                host="SpikingJelly", attr="surrogate_function",
                                example="surrogate.ATan()")
        check_neuron_constants(name, m, ("tau", "v_threshold", "v_reset"))
    if not any(_is_spiking_node(m) and not match_name(n, exc)
               for n, m in model.named_modules()):
        raise ValueError(
            "nothing to convert: model contains no SpikingJelly neuron ("
            + ", ".join(f"neuron.{t.__name__}" for t in SUPPORTED_NEURONS)
            + ") outside exclude; a Bayesian layer's noise reaches the loss through the "
            "spikes of the neuron it feeds: convert a spiking model")

    def selected(name: str) -> bool:
        return (inc is None or match_name(name, inc)) and not match_name(name, exc)

    _check_spiking_rnns(model, selected, lambda n: match_name(n, exc))
    # with example_input, each BatchNorm pairs with the layer the forward calls before it
    folds, affine_bns = ({}, set()) if batchnorm != "affine" else _layers.affine_batchnorm_plan(
        model, _WEIGHTS, _SJ_BN + _PLAIN_BN, selected, lambda n: match_name(n, exc),
        inc is not None, example_input)
    affines = _layers.fold_batchnorms(model, folds, affine_bns, posterior, _affine_from_bn)

    source = model  # an optimiser of the original warns at its steps
    model = model if inplace else _safe_deepcopy(model)
    reset(model)  # (the copy's) neuron states: a fresh start
    counts = {"layers": 0, "neurons": 0}
    modules = dict(model.named_modules())

    def convert(name: str, m: nn.Module):
        t = type(m)
        new = None
        if t in _WEIGHTS and selected(name) and not _layers.legacy_weight_norm(m):
            kw = _layers.converted_layer_kwargs(m, posterior, modules.get(folds.get(name)))
            if t is layer.Linear:
                new = BayesLinear.from_module(m, step_mode=m.step_mode, **kw)
            elif t is layer.Conv2d:
                new = BayesConv2d.from_module(m, step_mode=m.step_mode, **kw)
            elif t is layer.Conv1d:
                new = BayesConv1d.from_module(m, step_mode=m.step_mode, **kw)
            elif t is nn.Linear:
                new = _layers.BayesLinear.from_module(m, **kw)
            elif t is nn.Conv1d:
                new = _layers.BayesConv1d.from_module(m, **kw)
            elif t is nn.Conv2d:
                new = _layers.BayesConv2d.from_module(m, **kw)
        if new is not None:
            counts["layers"] += 1
            new = _layers.keep_ties(new, m, ties, adopt=True)  # (a pruned layer's mask first)
            _layers.fold_channel_std(new, modules.get(folds.get(name)), posterior)
            return new.train(m.training)
        if name in affines:
            return affines[name]
        return None

    ties: dict[int, nn.Parameter] = {}
    replace_modules(model, convert)
    _modules_swapped(model)
    for name, m in model.named_modules():
        if not _is_spiking_node(m):
            continue
        if match_name(name, exc):  # excluded: kept as it is, and must get no variance
            if _refuse_variance not in m._forward_pre_hooks.values():
                m.register_forward_pre_hook(_refuse_variance)
            continue
        v_th = m.v_threshold
        v_th = float(v_th.detach().mean()) if isinstance(v_th, Tensor) else float(v_th)
        spike = SJSpike(estimator, std=relative_spike_std(spike_std, v_th),
                        learn_std=spike_learn, aux_pull=aux_pull)
        spike = spike.to(**_float_like(m, model)).train(m.training)  # the neuron's mode
        host = m.surrogate_function
        link_neuron(m, spike)
        m.__dict__[_HOST_SURROGATE] = HostObject(host)
        counts["neurons"] += 1
    if counts["layers"] == 0 and counts["neurons"] == 0:
        raise ValueError(
            "nothing to convert: the model has no layer.Linear/layer.Conv2d/nn.Linear/"
            "nn.Conv1d/nn.Conv2d (check include/exclude) and no supported neuron"
        )
    for m in model.modules():  # (vmap would drop the variance passing through)
        if _runs_t_last_vmap(m):
            m.__dict__["forward"] = functools.partial(_t_last_seq_to_ann_forward, m)
    if inc is None:
        _layers.warn_deterministic_layers(model, lambda n: match_name(n, exc), "SpikingJelly")
    reset(model)
    track_variance(model, check_inputs=True)
    if aux_loss:
        enable_aux_loss(model)
    if example_input is None and std is None:  # paired by declaration order: checked
        _layers.check_batchnorm_pairing(model, folds, affine_bns, "spikingjelly")  # at 1st call
    if example_input is not None:
        check_variance_flow(model, example_input)
    if not inplace:
        register_converted_copy(source, model)
    return model


def _refuse_a_single_layer(model: nn.Module) -> None:
    """Refuse a model that is itself one weight layer (``to_sbnn(layer.Linear(4, 3))``):
    the conversion replaces the layers inside a network, never the model it is given, so
    it found "no layer.Linear" in a layer.Linear.

    Raises:
        ValueError: naming the layer and the call that makes its Bayesian version.
    """
    kind = type(model)
    if kind not in _WEIGHTS:
        return
    if issubclass(kind, base.StepModule):  # SpikingJelly's layer.Linear / Conv1d / Conv2d
        name, fix = (f"layer.{kind.__name__}", f"sbnn_addons.spikingjelly.Bayes{kind.__name__}"
                     ".from_module(layer, step_mode=layer.step_mode)")
    else:
        name, fix = f"nn.{kind.__name__}", f"sbnn_addons.Bayes{kind.__name__}.from_module(layer)"
    raise ValueError(
        f"model is itself a {name}: to_sbnn converts the weight layers and neurons inside a "
        "network, not the model it is given. Convert the network that holds the layer, or "
        f"make its Bayesian version directly with {fix}")


def _check_spiking_rnns(model: nn.Module, selected, excluded) -> None:
    """Refuse a SpikingJelly spiking RNN (``rnn.SpikingLSTM``, ``SpikingGRU``,
    ``SpikingVanillaRNN`` or one of their cells) whose weight layers would be converted:
    its cells apply SpikingJelly surrogates to those layers' outputs directly, without a
    neuron, so the layers' noise would reach no spike function (the first forward raised
    a :class:`~sbnn_addons.moments.VarianceFlowError` asking to convert a neuron that
    does not exist).

    Args:
        model: the model to convert (unchanged).
        selected: whether the weight layer of a qualified name is to be converted.
        excluded: whether a qualified module name is matched by ``exclude``.

    Raises:
        TypeError: naming the RNN, its layers and the ``exclude`` that keeps it
            deterministic.
    """
    rnn = sys.modules.get("spikingjelly.activation_based.rnn")
    if rnn is None:  # not imported: the model holds none of its classes
        return
    kinds = (rnn.SpikingRNNBase, rnn.SpikingRNNCellBase)
    for name, m in model.named_modules():
        if not isinstance(m, kinds) or excluded(name):
            continue
        prefix = f"{name}." if name else ""
        layers = [prefix + n for n, sub in m.named_modules()
                  if n and type(sub) in _WEIGHTS and not _layers.legacy_weight_norm(sub)
                  and selected(prefix + n)]
        if layers:
            where = name or "<the model itself>"
            raise TypeError(
                f"module '{where}' ({type(m).__name__}) is a SpikingJelly spiking RNN: its "
                "cells apply SpikingJelly surrogates to the outputs of their weight layers "
                f"({', '.join(repr(n) for n in layers[:4])}"
                f"{' ...' if len(layers) > 4 else ''}) directly, without a neuron, so "
                "Bayesian versions of those layers would pass their noise to no spike "
                "function. sbnn_addons.spikingjelly does not convert it: keep it "
                f"deterministic with exclude=['{where}'] (or leave its layers out of "
                "include=)")


def _check_spiking_surrogate(name: str, node: nn.Module) -> None:
    """Refuse a neuron whose surrogate is in SpikingJelly's non-spiking mode
    (``surrogate.ATan(spiking=False)``: the neuron outputs the surrogate's smooth primitive
    function, graded values): the stochastic spike function would replace it with binary
    spikes, silently changing what the neuron emits.

    Raises:
        ValueError: naming the neuron and the two ways out.
    """
    if getattr(node.surrogate_function, "spiking", True) is False:
        raise ValueError(
            f"module '{name}' has a surrogate in SpikingJelly's non-spiking mode "
            f"({node.surrogate_function!r}: the neuron outputs its smooth primitive "
            "function, not spikes), which to_sbnn would replace with binary stochastic "
            "spikes. Build the neuron with spiking=True (the default) before converting, or "
            f"keep it as it is with exclude=['{name}', ...] together with the layers "
            "feeding it")


def _validate_arguments(model, estimator, posterior, spike_std, spike_learn, inc, exc) -> None:
    """Raise for any bad argument of :func:`to_sbnn` before the model is touched."""
    check_std("spike_std", 0.0 if spike_std is None else spike_std, allow_zero=True)
    SJSpike(estimator, std=spike_std, learn_std=spike_learn)  # estimator, spike noise
    _layers.BayesLinear(1, 1, **posterior)  # std, std_mode, learn_std, bias_std
    names = [n for n, _ in model.named_modules(remove_duplicate=False) if n]
    layers = [n for n, m in model.named_modules(remove_duplicate=False)
              if type(m) in _WEIGHTS and not _layers.legacy_weight_norm(m)]
    for p in inc or ():
        if not any(match_name(n, (p,)) for n in layers):
            raise ValueError(
                f"include pattern {p!r} matches no layer.Linear/layer.Conv2d/nn.Linear/"
                f"nn.Conv1d/nn.Conv2d (nor a module containing one); those layers are: "
                f"{layers}"
            )
    for p in exc or ():
        if not any(match_name(n, (p,)) for n in names):
            raise ValueError(f"exclude pattern {p!r} matches no module; modules are: {names}")
    check_include_overlap(inc, exc, layers)


_WEIGHTS = (layer.Linear, layer.Conv1d, layer.Conv2d, nn.Linear, nn.Conv1d, nn.Conv2d)


def _safe_deepcopy(model: nn.Module) -> nn.Module:
    """``deepcopy`` that also works while module state holds an autograd graph (neuron
    memories, ``v_seq`` of ``store_v_seq=True``, a ``NonSpikingLIFNode``'s ``v``, the
    list of ``layer.Delay``'s queue: those are copied as detached clones; the copy is
    reset by the converter anyway)."""
    memo: dict[int, object] = {}
    for m in model.modules():
        values = list(m.__dict__.values())
        if isinstance(m, base.MemoryModule):
            values += list(m._memories.values())
        while values:
            value = values.pop()
            if isinstance(value, Tensor) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
            elif isinstance(value, (list, tuple)):  # a memory holding a list of tensors
                values.extend(value)
    return copy.deepcopy(model, memo)


def to_spikingjelly(model: nn.Module, surrogate_function: nn.Module | None = None) -> nn.Module:
    """Export a converted model as a plain SpikingJelly model (posterior means).

    Bayesian layers go back to ``layer.Linear`` / ``layer.Conv2d`` (same ``step_mode``) or
    plain torch layers, each :class:`~sbnn_addons.ChannelAffine` to a BatchNorm equal to it
    in eval mode (``running_mean=0``, ``running_var=1 - eps``, the default ``eps``; it
    fine-tunes in training mode like any BatchNorm), and every neuron gets
    back the surrogate it had before :func:`to_sbnn` (e.g. ``surrogate.ATan(alpha=2)``, a
    copy per neuron), or ``surrogate_function`` where given. The result's forward in eval
    mode equals the SBNN in ``mean`` mode and does not reference ``sbnn_addons`` (it
    pickles without it). Its neurons start reset, whatever state ``model`` was in (an
    export in the middle of a sequence leaves ``model``'s own state as it was).

    The noise scales (``*std_rho``) are not exported: ``to_sbnn`` of the export starts
    new ones, sized from the weights as for any host model. To go on with the learned
    ones, load the SBNN's state dict into it
    (``again = to_sbnn(plain); again.load_state_dict(model.state_dict())``, with the
    conversion's arguments of ``model``).

    Args:
        model: a model returned by :func:`to_sbnn` (not modified), or its compiled
            wrapper ``torch.compile(model)``, which exports the model it wraps (a plain
            module: compile the export again where wanted).
        surrogate_function: SpikingJelly surrogate for every exported neuron (a fresh deep
            copy each); ``None``: each neuron's original surrogate (``surrogate.Sigmoid()``,
            SpikingJelly's default, where none was set).

    Raises:
        ValueError: ``model`` has no Bayesian layer or SBNN spike function (the original
            host model passed instead of the converted one); a neuron's original
            surrogate was lost by pickling (it does not pickle, e.g. a class defined in a
            function) and no ``surrogate_function`` was given.
        TypeError: ``surrogate_function`` is a class (``surrogate.ATan`` instead of
            ``surrogate.ATan()``) or not callable; ``model`` was converted by
            ``sbnn_addons.snntorch.to_sbnn`` (exported by ``to_snntorch``).
    """
    check_module(model, "to_spikingjelly")
    model = compiled_wrapped(model)  # torch.compile(model): the plain model it wraps
    refuse_other_host_export(model, "snntorch", IWSTSpike)
    if isinstance(surrogate_function, type):
        raise TypeError(
            "surrogate_function must be a surrogate instance, e.g. surrogate_function="
            f"surrogate.{surrogate_function.__name__}(), got the class "
            f"{surrogate_function.__name__} itself")
    if surrogate_function is not None and not callable(surrogate_function):
        raise TypeError(
            "surrogate_function must be a SpikingJelly surrogate such as surrogate.ATan() "
            f"(or None: each neuron's original one), got {type(surrogate_function).__name__}")
    refuse_unconverted_export(model, "to_spikingjelly",
                              any(isinstance(m, SBNNModule) for m in model.modules()))
    model = _safe_deepcopy(model)
    reset(model)
    untrack_variance(model)
    _layers.remove_batchnorm_pairing_check(model)
    if "_sbnn_flow_handles" in model.__dict__:
        del model.__dict__["_sbnn_flow_handles"]

    def export(name: str, m: nn.Module):
        if isinstance(m, BayesLinear):
            new = layer.Linear(m.in_features, m.out_features, m.bias is not None,
                               step_mode=m.step_mode)
        elif isinstance(m, (BayesConv1d, BayesConv2d)):
            kind = layer.Conv1d if isinstance(m, BayesConv1d) else layer.Conv2d
            new = kind(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                       m.dilation, m.groups, m.bias is not None, m.padding_mode,
                       step_mode=m.step_mode)
        elif _layers.is_bayesian(m):
            return _layers.keep_ties(m.to_module(), m, ties).train(m.training)
        elif isinstance(m, _layers.ChannelAffine):
            return _bn_from_affine(m)
        else:
            return None
        new = new.to(device=m.weight.device, dtype=m.weight.dtype)
        _layers._copy_means(new, m)
        return _layers.keep_ties(new, m, ties).train(m.training)

    ties: dict[int, nn.Parameter] = {}
    replace_modules(model, export)
    for m in model.modules():
        forward = m.__dict__.get("forward")
        if isinstance(forward, functools.partial) and forward.func is _t_last_seq_to_ann_forward:
            del m.__dict__["forward"]  # SpikingJelly's own (vmap) again
        if not _is_spiking_node(m):
            continue
        _unlink(m)  # excluded neurons too (their hook refusing a variance)
        if hasattr(m, "surrogate_function"):
            host = m.__dict__.pop(_HOST_SURROGATE, None)
            if surrogate_function is not None:
                _set_surrogate(m, copy.deepcopy(surrogate_function))
            elif isinstance(m.surrogate_function, IWSTSpike):
                if isinstance(host, HostObject) and host.lost:
                    raise ValueError(
                        f"cannot restore the original surrogate_function {host.lost!r} of "
                        f"a {type(m).__name__}: it does not pickle and this model went "
                        "through pickle / torch.save since its conversion; pass the "
                        "surrogate to use, e.g. to_spikingjelly(model, "
                        "surrogate_function=surrogate.Sigmoid())")
                original = host.get() if isinstance(host, HostObject) else None
                _set_surrogate(m, surrogate.Sigmoid() if original is None
                               else copy.deepcopy(original))
    for m in model.modules():
        if isinstance(m, SBNNModule):
            raise TypeError(f"cannot export {type(m).__name__} to a plain SpikingJelly model")
    _modules_swapped(model)
    return model


def _set_surrogate(node: nn.Module, fn) -> None:
    """``node.surrogate_function = fn``; a plain function (SpikingJelly neurons accept one
    and keep it as a plain attribute) first removes the child module it replaces, which
    ``nn.Module`` would refuse to overwrite with a non-module."""
    if not isinstance(fn, nn.Module) and "surrogate_function" in node._modules:
        del node.surrogate_function
    node.surrogate_function = fn


def _bn_from_affine(affine: _layers.ChannelAffine) -> nn.Module:
    name = getattr(affine, "bn_class", "") or "BatchNorm1d"
    n = affine.num_features
    if isinstance(affine, ChannelAffine):
        cls = layer.BatchNorm2d if name.endswith("2d") else layer.BatchNorm1d
        bn = cls(n, step_mode=affine.step_mode)
    else:
        bn = (nn.BatchNorm2d if name.endswith("2d") else nn.BatchNorm1d)(n)
    bn = bn.to(device=affine.weight.device, dtype=affine.weight.dtype)
    with torch.no_grad():
        bn.weight.copy_(affine.weight)
        bn.bias.copy_(affine.bias)
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)  # var + eps = 1 (exactly, in float32)
    bn.weight.requires_grad_(affine.weight.requires_grad)
    bn.bias.requires_grad_(affine.bias.requires_grad)
    return bn.train(affine.training)
