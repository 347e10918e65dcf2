"""Variance propagation from Bayesian layers to the neurons they feed (Method page, sections 2-3).

A Bayesian layer returns its mean as a :class:`VarianceTensor`, a tensor subclass that
carries the local-reparameterisation variance (:func:`attach_variance`). Between the
layer and the spike function, real models apply pooling, flattening, dropout,
normalisation, residual sums and, inside the host library's neuron, the membrane update
itself. The subclass is one mechanism for all of them: its ``__torch_function__``, for
every torch operation whose inputs carry a variance, applies the rule of that operation
to the variance:

============================  ===============================================
operation                      variance of the output
============================  ===============================================
``a + b``, ``a - b``           ``var(a) + var(b)`` (independent noise)
``c * a``, ``a / c``           ``c^2 var(a)``, ``var(a) / c^2`` (``c`` noise-free)
reshape / view / index / cat   the same operation applied to ``var``
``avg_pool`` over ``k``        ``sum(var) / k^2``
``adaptive_avg_pool``          ``sum(var) / D^2`` over each window of size ``D``
``max_pool``, adaptive too     ``var`` at the element the max selected
``mean`` / ``sum`` over ``n``  ``sum(var) / n^2`` / ``sum(var)``
dropout (mask ``m``)           ``var * m^2 / (1 - p)^2``
batch norm (scale ``g/s``)     ``var * (g / s)^2``
group / layer / instance /     ``var * (g / s)^2``, ``s`` the statistic of the
RMS norm                       mean signal (held fixed, as for batch norm)
interpolate (weights ``A``)    ``A^2 var`` (nearest: moved; linear, bilinear,
                               bicubic, trilinear, area: squared weights)
pixel (un)shuffle, ``pad``     moved; a constant padding has variance 0
conv_transpose (weights ``w``) ``conv_transpose(var, w^2)`` (noise-free ``w``)
============================  ===============================================

Because the neuron's own update is made of these operations, the variance follows the
neuron's dynamics automatically: snnTorch ``Leaky`` gives ``V_t = beta^2 V_{t-1} + var_t``
and SpikingJelly ``LIFNode(decay_input=True)`` gives
``V_t = (1 - 1/tau)^2 V_{t-1} + var_t / tau^2``, the recurrence of the Method page, section 3.

With a per-layer std (the paper's scalar ``s``) a Bayesian layer's variance is
``s^2 F``, where ``F`` (the receptive-field sum of ``x^2``) is noise-free. Every rule above
is linear in the variance, so the flow keeps the two factors apart
(:class:`ScaledVariance`): the rules act on ``F`` alone, outside autograd, and the product
with ``s^2`` is formed once, where the variance is read (:func:`get_variance`, the spike
function, :class:`~sbnn_addons.LIF`). The gradient is the same; the graph has one node per
read instead of one per operation. Variances of different layers meeting in one
operation (a residual sum) are multiplied out first.

An operation without a rule does not guess: its output is marked with
:class:`UnknownVariance`, and a spike function that receives such an input raises an
error that names the operation. The same holds for a sum whose operands share a layer's
draw (``a + 0.5 * a``, ``a - a.mean(-1)``): the sum rule assumes independent operands, so
the flow follows which draws each tensor is made of (:class:`NoiseSet`) and marks such a
sum unknown. A sum, mean or average pool over a tensor that holds one draw's element
several times (``expand`` / ``repeat``, ``cat`` of the same draw) is marked unknown too:
its elements are not independent.

The check does not depend on the evaluation mode. In ``mean`` mode a Bayesian layer
attaches no variance (its noise is off), but :func:`track_variance` marks its output as
*noisy in principle* (a probe, no tensor); the flow carries the probe through every
operation that has a rule, at the cost of one attribute per tensor, and turns it into an
:class:`UnknownVariance` at an operation without one, so that the neuron it reaches
raises the same :class:`VarianceFlowError` as in ``sample`` mode. Right after a
conversion, :func:`check_variance_flow` runs one such forward and reports.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import sys
import types
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (
    SBNNModule,
    _raise_user_error,
    assert_finite,
    cached_tensor_test,
    check_finite,
    check_flag,
    check_input,
    check_module,
    check_variance,
    compiled_wrapped,
    concrete_shape,
    eager_calls,
    is_exporting,
    noisy_membrane_behind,
    raise_error,
    refuse_data_dependent_shape,
    share_posterior,
    variance_dtype,
)
from .functional import box_sum
from .tensors import broadcasts_to, leaf_values

__all__ = [
    "NoiseSet",
    "ScaledVariance",
    "UnknownVariance",
    "VarianceFlowError",
    "attach_variance",
    "get_variance",
    "raw_variance",
    "VarianceTensor",
    "plain",
    "variance_flow",
    "no_variance_flow",
    "track_variance",
    "untrack_variance",
    "register_variance_rule",
    "check_model_input",
    "check_variance_flow",
    "VarianceFlowReport",
    "register_variance_passthrough",
]



class VarianceFlowError(RuntimeError):
    """A spike function received an input whose variance cannot be propagated."""


class UnknownVariance:
    """Marker attached to the output of an operation that has no variance rule."""

    __slots__ = ("op",)

    def __init__(self, op: str) -> None:
        self.op = op

    def __repr__(self) -> str:
        return f"UnknownVariance(op={self.op!r})"


class ScaledVariance:
    """A variance kept as two factors, ``scale * base`` (see the module doc).

    ``scale`` is a 0-dim tensor (a layer's ``s^2``, usually requiring grad) and ``base``
    a tensor broadcastable to the mean it belongs to. The variance rules act on ``base``;
    :meth:`value` forms the product, once per grad mode.

    Args:
        base: the unscaled variance, e.g. the receptive-field sum of ``x^2``.
        scale: 0-dim tensor multiplying it.
    """

    __slots__ = ("base", "scale", "_value")

    def __init__(self, base: Tensor, scale: Tensor) -> None:
        for name, value in (("base", base), ("scale", scale)):
            if not isinstance(value, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if scale.dim() != 0:
            raise ValueError(f"scale must be a 0-dim tensor, got shape {tuple(scale.shape)}")
        self.base = base
        self.scale = scale
        self._value: tuple[bool, Tensor] | None = None

    def value(self) -> Tensor:
        """``scale * base``, differentiable in both (cached for the current grad mode)."""
        grad = torch.is_grad_enabled()
        if self._value is None or self._value[0] != grad:
            self._value = (grad, self.base * self.scale)
        return self._value[1]

    def __repr__(self) -> str:
        return (f"ScaledVariance(base={tuple(self.base.shape)}, "
                f"scale={float(self.scale.detach()):g})")


class NoiseSet:
    """Which layer draws a variance is made of: the noise *identity* behind the rules.

    Every Bayesian layer output (every :func:`attach_variance` result, once an operation
    reads it) is a draw of its own, a leaf with a fresh token; an operation on several
    noisy tensors gets the union of their sets. The rules of the module doc assume that
    two summed operands carry independent noise; two operands whose sets share a draw
    (``a + 0.5 * a``, ``a - a.mean(-1)``, ``a + a.clone()``) are correlated, and their sum
    gets an :class:`UnknownVariance` instead of a wrong variance.

    A union node is built in O(1); :meth:`shares` descends only where the token intervals
    of the two sets overlap (a membrane's set and the next step's input, whose tokens are
    newer, are told apart by their intervals alone). Eager mode only: a compiled graph does
    not track it.

    ``repeated`` marks a tensor that holds one draw's element several times (``expand``
    or ``repeat`` to more elements, ``cat`` / ``stack`` of operands that share a draw):
    its elements are not independent, so a sum or an average pool over them, whose rule
    adds their variances, gets an :class:`UnknownVariance` (a neuron fed by it raises).
    Elementwise operations keep the mark; a neuron reads one element per unit, so a
    repeated tensor feeds neurons as it is (a static layer output repeated over time).
    """

    __slots__ = ("lo", "hi", "parts", "repeated")

    def __init__(self, lo: int, hi: int, parts: tuple[NoiseSet, NoiseSet] | None,
                 repeated: bool = False) -> None:
        self.lo, self.hi, self.parts, self.repeated = lo, hi, parts, repeated

    @staticmethod
    def leaf() -> NoiseSet:
        token = next(_NOISE_TOKENS)
        return NoiseSet(token, token, None)

    def union(self, other: NoiseSet) -> NoiseSet:
        if other is self:
            return self
        return NoiseSet(min(self.lo, other.lo), max(self.hi, other.hi), (self, other),
                        self.repeated or other.repeated)

    def as_repeated(self) -> NoiseSet:
        """The same draws, marked as held several times in one tensor."""
        return self if self.repeated else NoiseSet(self.lo, self.hi, self.parts, True)

    def shares(self, other: NoiseSet) -> bool:
        """Whether the two sets have a draw in common."""
        stack = [(self, other)]
        while stack:
            a, b = stack.pop()
            if a is b:
                return True
            if a.hi < b.lo or b.hi < a.lo:
                continue
            if a.parts is None and b.parts is None:
                if a.lo == b.lo:
                    return True
                continue
            if a.parts is None or (b.parts is not None and b.hi - b.lo > a.hi - a.lo):
                a, b = b, a  # split the wider one
            stack.append((a.parts[0], b))
            stack.append((a.parts[1], b))
        return False


_NOISE_TOKENS = itertools.count()

#: The last Bayesian layer's output (eager mode): a weak reference and its version.
_LAST_DRAW: list = [(lambda: None, None)]


def new_draw(out: Tensor, layer: nn.Module, compiling: bool | None = None) -> Tensor:
    """Give a Bayesian layer's output ``out`` a :class:`NoiseSet` leaf of its own and
    remember its token on ``layer`` (so that a variance reaching a model's output can name
    the layers it came from). Eager mode only; returns ``out``. ``compiling``: whether a
    graph is traced, where the caller knows it."""
    if type(out) is VarianceTensor and not (
            torch.compiler.is_compiling() if compiling is None else compiling):
        token = next(_NOISE_TOKENS)  # NoiseSet.leaf(), inline
        leaf = NoiseSet(token, token, None)
        out.__dict__["noise"] = leaf
        layer.__dict__["_sbnn_draw"] = token
        with torch._C.DisableTorchFunctionSubclass():  # (no version: inference mode)
            _LAST_DRAW[0] = (weakref.ref(out), None if out.is_inference() else out._version)
        if _OPEN_FLOWS and out.variance is not None:
            # for _check_dropped_noise (with the torch.func level the layer ran at; the
            # mean's autograd node, None without gradients; _functorch_level(), inline)
            level = (0 if not torch._C._are_functorch_transforms_active()
                     else torch._C._functorch.maybe_current_level() or 0)
            _DRAWN.append((layer, token, out.grad_fn, level))
    return out


#: Within the tracked forwards now running (eager, grad mode): the draws of the Bayesian
#: layers ``(layer, token, grad_fn of the mean)``, the noise sets whose variance was read
#: (a spike function, a neuron: :func:`get_variance`, :func:`raw_variance`, or dropped on
#: purpose with :func:`plain`), and those taken out of the flow (``.data``, ``.tolist()``,
#: ``.numpy()``, DLPack). :func:`_check_dropped_noise` reads them; cleared per forward.
_DRAWN: list = []
_CONSUMED: list = []
_ESCAPED: list = []
#: Operations that take a tensor's values out of the variance flow.
_ESCAPES = frozenset({"tolist", "numpy", "__array__", "__dlpack__"})


def _functorch_level() -> int:
    """The nesting depth of the ``torch.func`` transforms (``vmap``, ``grad``) running now
    (0: none)."""
    if not torch._C._are_functorch_transforms_active():
        return 0
    return torch._C._functorch.maybe_current_level() or 0


def _note_read(tensor, into: list, compiling: bool | None = None) -> None:
    """Remember the noise set of carrier ``tensor`` in ``into`` (a tracked eager forward).
    ``compiling``: whether a graph is traced, where the caller knows it."""
    if _OPEN_FLOWS and type(tensor) is VarianceTensor and not (
            torch.compiler.is_compiling() if compiling is None else compiling):
        nset = tensor.__dict__.get("noise")
        if nset is not None:
            into.append(nset)


def _leaf_tokens(nset: NoiseSet) -> set[int]:
    tokens, stack = set(), [nset]
    while stack:
        node = stack.pop()
        if node.parts is None:
            tokens.add(node.lo)
        else:
            stack.extend(node.parts)
    return tokens


def _noise_of(x, compiling: bool | None = None) -> NoiseSet | None:
    """The noise set of a carrier with a variance (a new leaf the first time it is read);
    ``None`` for anything else and in a compiled graph (``compiling``: whether one is
    traced, where the caller knows it)."""
    if type(x) is not VarianceTensor or (x.variance is None and not x.probe):
        return None
    if torch.compiler.is_compiling() if compiling is None else compiling:
        return None
    found = x.__dict__.get("noise")
    if found is None:
        found = x.__dict__["noise"] = NoiseSet.leaf()
    return found


#: The attributes of a compiled step's membranes (:class:`VarianceTensor`'s docstring):
#: not copied or pickled with the carrier.
_COMPILED_STEP_MARKS = frozenset({"emitted", "emitter", "derived", "edited", "viewed"})


class VarianceTensor(Tensor):
    """A mean tensor that carries its posterior variance: the variance flow's carrier.

    A Bayesian layer returns its output mean as a ``VarianceTensor`` whose
    :attr:`variance` is the local-reparameterisation variance (``None`` in ``mean`` mode).
    Every torch operation on it goes through :meth:`__torch_function__`, which computes the
    operation on the plain mean and applies the operation's variance rule (module doc) to
    the variance; the result is a ``VarianceTensor`` again, or a plain tensor where the
    output is noise-free. An operation without a rule returns a ``VarianceTensor`` whose
    variance is an :class:`UnknownVariance` naming it, so that a neuron it reaches raises.

    The state is an ordinary attribute of a declared tensor subclass, so ``torch.compile``
    (Dynamo traces ``__torch_function__``), ``deepcopy``, ``pickle`` and ``torch.save`` see
    it and carry it. Autograd is the mean's own: the subclass is an alias of the mean
    (``as_subclass``), and the variance is a separate tensor with its own graph.

    Attributes:
        variance: a tensor broadcastable to the mean, a :class:`ScaledVariance`, an
            :class:`UnknownVariance`, or ``None`` (no noise now).
        probe: ``True`` where the noise is off (``mean`` mode) but would be on in
            ``sample`` mode (see :func:`check_variance_flow`).
        noise: in eager mode, the :class:`NoiseSet` of the draws its variance is made of
            (set once an operation reads a layer's output; not set in a compiled graph).
        emitted: on a converted snnTorch neuron's membrane in a compiled step, the spikes
            that membrane emitted (its reset, where one neuron steps on the membranes of
            several layers); not set otherwise, and not passed on by operations.
        emitter: with :attr:`emitted`, the neuron that stepped that membrane: another
            neuron given it, or a carrier derived from it, takes it for a new membrane
            (as eager mode does, which keeps the variance with the neuron).
        derived: on a carrier of a membrane's rank that a compiled step computed from
            such a membrane (one with :attr:`emitted`, or one derived from it:
            ``mem * mask``, ``mem.detach()``, a slice ``mem[:, :8]``, or
            ``torch.cat`` of such slices), that membrane: a converted neuron given it
            as its membrane takes it for a copy of the membrane (its values, checked in
            the graph) or refuses it as an edit, as eager mode does (an edit without a
            graph back to it, ``mem.detach() * mask``, is a new membrane); not set
            otherwise.
        edited: on such a membrane changed in place in a compiled step
            (``mem.mul_(mask)``, or through a view of it: ``mem[i].zero_()``), the
            operation's name: a converted neuron given it, or a copy of it, raises eager
            mode's error; not set otherwise.
        viewed: on a carrier that a compiled step computed as a view of such a membrane
            (``mem[i]``, ``mem.detach()``, ``mem.view(-1)``), that membrane; not set
            otherwise.

    ``derived``, ``edited`` and ``viewed`` are also set by eager code between two
    compiled calls, on the membranes the first returned (``0.5 * mem``,
    ``mem.detach().mul_(mask)``): the second call refuses such an edit as eager mode
    does.

    ``emitted``, ``emitter``, ``derived``, ``edited`` and ``viewed`` belong to the compiled
    step that set them: a deep copy, ``pickle`` and ``torch.save`` leave them out.
    """

    variance: Tensor | ScaledVariance | UnknownVariance | None
    probe: bool
    noise: NoiseSet
    emitted: Tensor
    emitter: torch.nn.Module
    derived: VarianceTensor
    edited: str
    viewed: VarianceTensor

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if len(args) == 2 and args[1] is None and func in _NONE_COMPARISONS:
            return func is Tensor.__ne__  # `mem == None` (snnTorch): Python's answer
        compiling = torch.compiler.is_compiling()  # once per call: the helpers take it
        if len(args) == 1 and _name(func, compiling) == "__get__":
            # an attribute (x.shape): no noise
            if _OPEN_FLOWS and func.__self__.__name__ == "data":
                _note_read(args[0], _ESCAPED)  # x.data: the values without the variance
            with torch._C.DisableTorchFunctionSubclass():
                return getattr(args[0], func.__self__.__name__)
        if type(func) is torch._ops.OpOverload and func.namespace == "sbnn_addons":
            # the library's own operators, called with a carrier by a compiled graph's
            # code (a graph input passed straight to them, e.g. after a graph break): the
            # graph traced them on the means, and PyTorch's first-call analysis refuses a
            # Python subclass among a custom operator's inputs
            with torch._C.DisableTorchFunctionSubclass():
                return func(*_plain_args(args), **_plain_args(kwargs or {}))
        if type(func) is torch._ops.OpOverload and not compiling and _in_graph_analysis():
            # an aten operator of a compiled graph's first run, on a carrier that entered
            # the graph as an input (a graph break before or after a neuron): the graph
            # traced the flow on the means, and AOTAutograd's first-run analysis mode
            # refuses a Python subclass ("Multiple dispatch failed")
            with torch._C.DisableTorchFunctionSubclass():
                return func(*_plain_args(args), **_plain_args(kwargs or {}))
        if func in _AUTOGRAD_CALLS:
            # the backward on the plain means, with the flow on: a recomputation inside it
            # (torch.utils.checkpoint) runs its variance flow as the forward did
            # (the outputs and their gradients as plain aliases; `inputs=` stay as given)
            kwargs = {k: (_plain_args(v) if k in ("gradient", "grad_tensors") else v)
                      for k, v in (kwargs or {}).items()}
            return func(*_plain_args(args[:2]), *args[2:], **kwargs)
        return _flow(func, args, kwargs or {}, compiling)

    def __coerce_same_metadata_as_tangent__(self, expected_meta, expected_type=None):
        """A gradient that reaches a compiled graph's backward as a carrier (computed by
        the backward of a later graph, after a graph break, from the carriers it saved):
        its plain values, the tangent the graph was traced with."""
        if expected_type is None or expected_type is Tensor:
            return self.as_subclass(Tensor)
        return None

    def __reduce_ex__(self, proto):
        # pickle / torch.save: without the attributes of a compiled step's membranes
        # (_COMPILED_STEP_MARKS), which name that step's tensors and neuron,
        # as a deepcopy leaves them (pickling them took the whole model along)
        rebuild, args = super().__reduce_ex__(proto)
        if rebuild is torch._tensor._rebuild_from_type_v2 and isinstance(args[-1], dict):
            state = {k: v for k, v in args[-1].items() if k not in _COMPILED_STEP_MARKS}
            args = (*args[:-1], state)
        return rebuild, args

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        mean = leaf_values(self, "the VarianceTensor")
        var = self.variance
        if isinstance(var, Tensor):
            var = copy.deepcopy(var, memo) if var.is_leaf else var.detach().clone()
        else:
            var = copy.deepcopy(var, memo)
        new = _wrap(mean, var, self.probe)
        new.requires_grad_(self.requires_grad)
        memo[id(self)] = new
        return new

    def __repr__(self, *, tensor_contents=None) -> str:
        with torch._C.DisableTorchFunctionSubclass():
            text = Tensor.__repr__(self)
        var = self.variance
        what = ("probe" if self.probe else "None") if var is None else (
            repr(var) if not isinstance(var, Tensor) else f"shape {tuple(var.shape)}")
        return f"{text} (variance: {what})"


_NONE_COMPARISONS = (Tensor.__eq__, Tensor.__ne__)
_AUTOGRAD_CALLS = (Tensor.backward, torch.autograd.backward)


def _in_graph_analysis() -> bool:
    """Whether AOTAutograd's first run of a compiled graph is analysing its custom
    operators (a dispatch mode that refuses tensor subclasses)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    mode = _get_current_dispatch_mode()
    return mode is not None and type(mode).__name__ == "_AnalyzeCustomOpInputOutputMode"


def _plain_args(value):
    """``value`` with every :class:`VarianceTensor` (also inside lists, tuples and dict
    values) replaced by a plain alias of its mean."""
    if type(value) is VarianceTensor:
        return value.as_subclass(Tensor)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain_args(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain_args(v) for k, v in value.items()}
    return value


def _wrap(out: Tensor, variance, probe: bool = False, noise: NoiseSet | None = None,
          compiling: bool | None = None) -> Tensor:
    """``out`` as a :class:`VarianceTensor` carrying ``variance`` (a plain tensor where it
    carries nothing).

    Eager: ``out`` itself becomes the carrier (its class is set, no alias and no autograd
    node) and gets the noise set ``noise`` (``None``: a draw of its own, a new leaf when
    read). Under ``torch.compile`` (which traces ``as_subclass``, not a class change): a
    new carrier aliasing ``out``. ``compiling``: whether a graph is traced, where the
    caller knows it.
    """
    if variance is None and not probe:
        return _plain(out, in_place=True, compiling=compiling)
    # torch.export: the deterministic network only (is_exporting reads export's own flag: a
    # compiled sample-mode step of PyTorch < 2.13 is no export)
    if is_exporting():
        if variance is None:  # mean mode's probe: nothing to check in an exported graph
            return _plain(out, in_place=True, compiling=compiling)
        raise VarianceFlowError(
            "torch.export captures the deterministic network only: export the posterior "
            "mean network, `with sbnn_addons.mode(model, 'mean'): torch.export.export(model, "
            "args)`, or export the plain host model (sbnn_addons.snntorch.to_snntorch / "
            "sbnn_addons.spikingjelly.to_spikingjelly); sample mode draws spikes from the "
            "posterior, which an exported graph does not carry"
        )
    if torch.compiler.is_compiling() if compiling is None else compiling:
        new = out.as_subclass(VarianceTensor) if type(out) is not VarianceTensor else out
    else:
        if type(out) is not VarianceTensor:
            out.__class__ = VarianceTensor
        if noise is None:  # _set_noise(out, noise), inline
            out.__dict__.pop("noise", None)
        else:
            out.__dict__["noise"] = noise
        new = out
    new.variance = variance
    new.probe = probe
    return new


def _set_noise(t: Tensor, noise: NoiseSet | None) -> None:
    """Eager: give carrier ``t`` the noise set ``noise`` (``None``: forget it, so that a
    new leaf is made when it is read)."""
    if noise is None:
        t.__dict__.pop("noise", None)
    else:
        t.__dict__["noise"] = noise


def _plain(t: Tensor, in_place: bool = False, compiling: bool | None = None) -> Tensor:
    """``t`` without its variance: a plain tensor (``t`` itself when ``in_place``, eager;
    else an alias). ``compiling``: whether a graph is traced, where the caller knows it."""
    if type(t) is not VarianceTensor:
        return t
    if torch.compiler.is_compiling() if compiling is None else compiling:
        with torch._C.DisableTorchFunctionSubclass():
            return t.view_as(t)
    if in_place:
        t.__class__ = Tensor
        t.__dict__.pop("variance", None)
        t.__dict__.pop("probe", None)
        t.__dict__.pop("noise", None)
        return t
    return t.as_subclass(Tensor)


def plain_in_place(t: Tensor, compiling: bool | None = None) -> Tensor:
    """``t`` as a plain tensor: ``t`` itself in eager mode (it drops its variance), an
    alias under ``torch.compile`` (``compiling``: whether a graph is traced, where the
    caller knows it)."""
    if _OPEN_FLOWS and type(t) is VarianceTensor:  # dropped on purpose: not reported
        _note_read(t, _CONSUMED, compiling)
    return _plain(t, in_place=True, compiling=compiling)


def plain(t: Tensor) -> Tensor:
    """The mean of ``t`` as a plain tensor (``t`` itself if it carries no variance; else an
    alias, ``t`` keeps its variance)."""
    if _OPEN_FLOWS:  # dropped on purpose (a readout): not reported
        _note_read(t, _CONSUMED)
    return _plain(t)


def attach_variance(mean: Tensor,
                    variance: Tensor | ScaledVariance | UnknownVariance | None,
                    *, compiling: bool | None = None) -> Tensor:
    """``mean`` carrying ``variance`` (broadcastable to ``mean``): a :class:`VarianceTensor`.

    In eager mode ``mean`` itself becomes the carrier (``None`` turns it back into a plain
    tensor) and is returned; under ``torch.compile`` the result is a new tensor that aliases
    ``mean``. Use the returned tensor, which is right in both. ``compiling`` (optional):
    whether a graph is traced, where the caller knows it (else asked).

    The variance's values are checked (finite and >= 0; both factors of a
    :class:`ScaledVariance`) unless :class:`~sbnn_addons.check_finite` is off: one
    reduction, a device synchronisation on a GPU in eager mode, a runtime assert under
    ``torch.compile``.

    Raises:
        TypeError: ``mean`` is not a tensor, or ``variance`` is none of the above.
        ValueError: a tensor variance (or a :class:`ScaledVariance`'s base) that does not
            broadcast to ``mean``'s shape (found at the spike, far from its cause, before);
            a negative, NaN or inf variance (the spike's noise std ``sqrt(max(v, 0))``
            would be 0 or NaN, silently).
    """
    factors = ((variance.base, variance.scale) if isinstance(variance, ScaledVariance)
               else (variance,))
    for factor in factors:  # (before mean becomes a carrier)
        check_variance(factor, "attach_variance")
    return attach_computed_variance(mean, variance, compiling=compiling)


def attach_computed_variance(
        mean: Tensor, variance: Tensor | ScaledVariance | UnknownVariance | None,
        *, compiling: bool | None = None) -> Tensor:
    """:func:`attach_variance` without the test of the variance's values, for variances
    the library computes (non-negative by construction), every layer and step.

    In eager mode ``mean`` itself becomes the carrier (``None`` turns it back into a plain
    tensor) and is returned; under ``torch.compile`` the result is a new tensor that aliases
    ``mean``. Use the returned tensor, which is right in both. ``compiling`` (optional):
    whether a graph is traced, where the caller knows it (else asked).

    Raises:
        TypeError: ``mean`` is not a tensor, or ``variance`` is none of the above.
        ValueError: a tensor variance (or a :class:`ScaledVariance`'s base) that does not
            broadcast to ``mean``'s shape (found at the spike, far from its cause, before).
    """
    if not isinstance(mean, Tensor):
        raise TypeError(f"mean must be a torch.Tensor, got {type(mean).__name__}")
    if not (variance is None or isinstance(variance, (Tensor, ScaledVariance, UnknownVariance))):
        raise TypeError("variance must be a torch.Tensor, a ScaledVariance, an UnknownVariance "
                        f"or None, got {type(variance).__name__}")
    shaped = variance.base if isinstance(variance, ScaledVariance) else variance
    if isinstance(shaped, Tensor) and not broadcasts_to(shaped.shape, mean.shape, compiling):
        what = "ScaledVariance base" if shaped is not variance else "variance"
        raise ValueError(
            f"the {what} of shape {tuple(shaped.shape)} does not broadcast to the mean of "
            f"shape {tuple(mean.shape)}: give it the mean's shape, or one with size-1 "
            "dimensions where it is the same for every entry (e.g. [N, 1] for a per-example "
            "variance of an [N, C] mean)")
    return _wrap(mean, variance, compiling=compiling)


def attach_derived_variance(mean: Tensor, variance: Tensor | ScaledVariance,
                            source: Tensor, compiling: bool | None = None) -> Tensor:
    """``mean`` carrying ``variance``, computed from carrier ``source`` by code that writes
    an operation's variance out itself (a neuron's moment update) instead of leaving it to
    the rules: the result keeps ``source``'s noise identity (:class:`NoiseSet`, the draws
    it is made of), as the rules' result would.

    Args:
        mean: the operation's output mean (a plain tensor; eager: it becomes the carrier).
        variance: its variance, broadcastable to ``mean``.
        source: the :class:`VarianceTensor` it was computed from.
        compiling: whether a graph is traced, where the caller knows it.

    Returns:
        The carrier (``mean`` itself in eager mode, an alias under ``torch.compile``).
    """
    if compiling is None:
        compiling = torch.compiler.is_compiling()
    noise = None  # _noise_of(source, compiling), inline
    if (type(source) is VarianceTensor and (source.variance is not None or source.probe)
            and not compiling):
        noise = source.__dict__.get("noise")
        if noise is None:
            noise = source.__dict__["noise"] = NoiseSet.leaf()
    return _wrap(mean, variance, noise=noise, compiling=compiling)


def get_variance(tensor: Tensor, *,
                 compiling: bool | None = None) -> Tensor | UnknownVariance | None:
    """The variance carried by ``tensor``, an :class:`UnknownVariance`, or ``None``.

    A factored variance (:class:`ScaledVariance`) is returned as its product, a tensor.
    ``compiling`` (optional): whether a graph is traced, where the caller knows it (else
    asked).

    Raises:
        TypeError: ``tensor`` is not a tensor: ``None`` read as "no variance" for the
            ``(spk, mem)`` tuple of an snnTorch neuron built with ``output=True``, or a
            list of per-step outputs.
    """
    if type(tensor) is not VarianceTensor:
        if not isinstance(tensor, Tensor):
            raise TypeError(
                f"get_variance reads one tensor, got {type(tensor).__name__}: pass a single "
                "tensor (a converted snnTorch neuron's membrane variance is "
                "sbnn_addons.snntorch.membrane_variance(neuron))")
        return None
    if _OPEN_FLOWS and not (torch.compiler.is_compiling() if compiling is None else compiling):
        nset = tensor.__dict__.get("noise")  # _note_read(tensor, _CONSUMED), inline
        if nset is not None:
            _CONSUMED.append(nset)
    if torch.compiler.is_compiling() if compiling is None else compiling:
        var = _traced_variance(tensor)
    else:
        var = tensor.variance
    return var.value() if isinstance(var, ScaledVariance) else var


_NO_VARIANCE = object()


def _traced_variance(tensor: VarianceTensor):
    """The variance of a carrier in a graph being traced.

    Raises:
        RuntimeError: (a Dynamo ``UserError``) the carrier has none: Dynamo built it
            without calling its ``__torch_function__``, which it does for the items of a
            carrier iterated over (``for x_t in x_seq``); Dynamo failed on it with an
            internal error ("builtin isinstance() cannot determine type of argument").
    """
    var = getattr(tensor, "variance", _NO_VARIANCE)
    if var is _NO_VARIANCE:
        raise_error(
            "a tensor carrying a Bayesian layer's posterior variance was iterated over "
            "(`for x_t in x_seq`) in a step that torch.compile traces, which builds the "
            "items without their variance. Index it "
            "(`x_seq[t] for t in range(x_seq.shape[0])`) or unbind it (`x_seq.unbind(0)`), "
            "which keep the variance")
    return var


def raw_variance(tensor: Tensor) -> Tensor | ScaledVariance | UnknownVariance | None:
    """The variance carried by ``tensor`` as stored: a factored one stays a
    :class:`ScaledVariance` (for code that passes it on, or keeps it factored)."""
    if type(tensor) is not VarianceTensor:
        return None
    if _OPEN_FLOWS:
        _note_read(tensor, _CONSUMED)
    return tensor.variance


# --------------------------------------------------------------------------- rules
# A rule gets (func, args, kwargs, out, var_of) and returns the output variance,
# None (noise-free output) or an UnknownVariance. ``var_of(x)`` returns the variance of
# an argument (None for noise-free values).

Rule = Callable[..., "Tensor | UnknownVariance | None"]
_RULES: dict[str, Rule] = {}
_FACTORED: set[str] = set()  # rules that may act on the base of a ScaledVariance


def register_variance_rule(*names: str) -> Callable[[Rule], Rule]:
    """Register a rule for torch operations by name (``func.__name__``).

    Raises:
        TypeError: no name, or a name that is not a non-empty string (the rule itself, as
            ``@register_variance_rule`` without its names; a function such as
            ``torch.cumsum`` instead of its name), which no lookup would find; a rule
            that is not callable.
    """
    if not names:
        raise TypeError("register_variance_rule needs at least one operation name, e.g. "
                        "@register_variance_rule('cumsum')")
    for name in names:
        if isinstance(name, str) and name:
            continue
        if callable(name) and getattr(name, "__name__", None) and (
                getattr(name, "__module__", "") or "").startswith("torch"):
            raise TypeError(
                f"register_variance_rule takes operation names, got the function "
                f"{name.__name__}: rules are looked up by name; use "
                f"register_variance_rule({name.__name__!r})")
        raise TypeError(
            f"register_variance_rule takes operation names (strings such as 'cumsum'), got "
            f"{name!r}; as a decorator it needs them: @register_variance_rule('cumsum')")

    def deco(rule: Rule) -> Rule:
        if not callable(rule):
            raise TypeError(f"rule must be a callable rule(func, args, kwargs, out, var_of), "
                            f"got {type(rule).__name__}")
        for name in names:
            _RULES[name] = rule
            _FACTORED.discard(name)  # only the built-in rules are known to be linear
        return rule

    return deco


def _zero_if_none(var, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if var is None else var


@register_variance_rule(
    "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "permute",
    "transpose", "t", "swapdims", "swapaxes", "contiguous", "clone", "expand", "expand_as",
    "__getitem__", "narrow", "select", "flip", "roll", "movedim", "view_as", "reshape_as",
    "repeat", "float", "double", "half", "bfloat16", "to", "type_as", "detach",
    "squeeze_", "unsqueeze_", "detach_", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle",
)
def _same_op(func, args, kwargs, out, var_of):
    var = var_of(args[0])
    if var is None:
        return None
    name = func.__name__
    if (name in ("view_as", "reshape_as", "expand_as") and isinstance(args[1], Tensor)
            and args[1].shape == args[0].shape):
        # an alias of the same shape: the variance as it is. Autograd makes one of each
        # input an identity Function returns (PyTorch's BackwardHookFunction, behind every
        # full backward hook) with grad mode off, where a new variance would lose its graph
        # (the layer's std got no gradient)
        return var
    if name in ("detach", "detach_"):
        # the same values: a compact variance stays compact (e.g. [N, 1] for a per-layer
        # std), as the step after it keeps it; expanded, a membrane detached between
        # truncated-BPTT chunks changed layout after the first, and a compiled chunk
        # compiled again for it
        return var.detach()
    if isinstance(out, Tensor) and var.shape != args[0].shape:
        var = var.expand_as(args[0])
    if name in ("to", "type_as", "float", "double", "half", "bfloat16"):
        # to float16: float32, as a float16 layer forms it (a small variance underflows)
        return var.to(dtype=variance_dtype(out.dtype), device=out.device)
    if name in ("view", "view_as") and isinstance(out, Tensor) and out.dtype == args[0].dtype:
        # the variance need not be a view: it may be broadcast (a per-row variance
        # expanded to the mean's shape), which view(-1) cannot merge
        return var.reshape(out.shape)
    if name in ("view_as", "reshape_as", "expand_as"):
        return getattr(var, name)(args[1])
    return _c_level(func)(var, *args[1:], **kwargs)


def _linear_combination():
    def rule(func, args, kwargs, out, var_of):
        a = args[0]
        b = args[1] if len(args) > 1 else kwargs.get("other")
        alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1.0)
        va, vb = var_of(a), var_of(b)
        if va is None and vb is None:
            return None
        if a is b:  # one noise, not two independent ones: o + o = 2 o, o - o = 0
            sign = -1.0 if "sub" in func.__name__ else 1.0
            return va * (1.0 + sign * alpha) ** 2
        if va is not None and vb is not None and _correlated(a, b):
            return UnknownVariance(_correlated_reason(func.__name__))
        if vb is not None and alpha != 1:
            vb = vb * (alpha * alpha)
        total = vb if va is None else (va if vb is None else va + vb)
        return total  # broadcastable to out; kept compact (e.g. [N, 1] for a per-layer std)

    return rule


_ADDS = ("add", "add_", "__add__", "__radd__", "__iadd__")
_SUBS = ("sub", "sub_", "__sub__", "__rsub__", "__isub__")
_SUMS = frozenset(_ADDS + _SUBS)
_add_rule = register_variance_rule(*_ADDS)(_linear_combination())
_sub_rule = register_variance_rule(*_SUBS)(_linear_combination())


def _correlated(a, b) -> bool:
    """Whether two noisy operands share a layer draw (:class:`NoiseSet`)."""
    na, nb = _noise_of(a), _noise_of(b)
    return na is not None and nb is not None and na.shares(nb)


def _correlated_reason(name: str) -> str:
    return (f"{name} of two tensors that share one Bayesian layer's noise (correlated, e.g. "
            "a + 0.5 * a or a - a.mean(); write the combination as one scaling of the "
            "tensor, e.g. 1.5 * a, or apply it before the Bayesian layer)")


@register_variance_rule("mul", "mul_", "__mul__", "__rmul__", "__imul__", "mul_.Tensor")
def _mul(func, args, kwargs, out, var_of):
    a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
    va, vb = var_of(a), var_of(b)
    if va is not None and vb is not None:
        return UnknownVariance("product of two noisy tensors")
    var, coef = (va, b) if va is not None else (vb, a)
    return scale_variance(var, coef)


def scale_variance(var: Tensor, coef: Tensor | float,
                   compiling: bool | None = None) -> Tensor:
    """The variance of ``coef * x`` for a noise-free ``coef``: ``var(x) * coef^2``.

    Args:
        var: ``var(x)``, a tensor broadcastable to ``x``.
        coef: a number or a tensor broadcastable to ``x`` (e.g. snnTorch's ``beta``).
        compiling: whether a graph is traced, where the caller knows it.

    Returns:
        ``var * coef^2``; a constant CPU scalar ``coef`` is read as a number (one
        operation, no device sync).
    """
    if isinstance(coef, Tensor):
        if ((torch.compiler.is_compiling() if compiling is None else compiling)
                or coef.dim() or coef.requires_grad
                or coef.device.type != "cpu"):
            return var * (coef * coef)
        coef = coef.item()
    return var * float(coef) ** 2


@register_variance_rule("div", "div_", "__truediv__", "__itruediv__", "true_divide")
def _div(func, args, kwargs, out, var_of):
    a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
    if var_of(b) is not None or kwargs.get("rounding_mode") is not None:
        return UnknownVariance(f"{func.__name__} by a noisy tensor or with rounding")
    return var_of(a) / (b * b) if isinstance(b, Tensor) else var_of(a) / float(b) ** 2


@register_variance_rule("neg", "__neg__", "positive")
def _neg(func, args, kwargs, out, var_of):
    return var_of(args[0])


@register_variance_rule("cat", "concat", "concatenate", "stack")
def _cat(func, args, kwargs, out, var_of):
    tensors = args[0]
    vars_ = [_zero_if_none(var_of(t), t).expand_as(t) for t in tensors]
    return _c_level(func)(vars_, *args[1:], **kwargs)


@register_variance_rule("where")
def _where(func, args, kwargs, out, var_of):
    cond, a, b = args[0], args[1], args[2]
    if var_of(cond) is not None:
        return UnknownVariance("where on a noisy condition")
    va = _zero_if_none(var_of(a), out) if isinstance(a, Tensor) else torch.zeros_like(out)
    vb = _zero_if_none(var_of(b), out) if isinstance(b, Tensor) else torch.zeros_like(out)
    return torch.where(cond, va, vb)


@register_variance_rule("sum", "mean")
def _reduce(func, args, kwargs, out, var_of):
    x = args[0]
    var = var_of(x).expand_as(x)
    rest = {k: v for k, v in kwargs.items() if k != "dtype"}
    total = var.sum(*args[1:], **rest)
    if func.__name__ == "mean":
        n = x.numel() // max(out.numel(), 1) if x.numel() else 1
        total = total / (n * n)
    return total


def _pool_arg(args, kwargs, index, name, default=None):
    return args[index] if len(args) > index else kwargs.get(name, default)


def _spatial_dims(func) -> int:
    """The number of spatial dims of a pooling, from its name (or the name itself)."""
    return int((func if isinstance(func, str) else func.__name__)[-2])


@register_variance_rule("avg_pool1d", "avg_pool2d", "avg_pool3d")
def _avg_pool(func, args, kwargs, out, var_of):
    # out_j = sum_{i in W_j} x_i / D_j, so var_out_j = sum_{i in W_j} var_i / D_j^2
    x, var = args[0], var_of(args[0])
    if var.dim() != x.dim():  # pooling acts on the trailing dims; size-1 dims broadcast
        var = var.expand_as(x)
    n = _spatial_dims(func)
    names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
             "divisor_override")
    params = dict(zip(names, args[1:]))
    params.update(kwargs)
    kernel = _per_dim(params["kernel_size"], n)
    stride = _per_dim(params.get("stride") or kernel, n)
    padding = _per_dim(params.get("padding", 0), n)
    override = params.get("divisor_override")
    if not params.get("ceil_mode", False) and (params.get("count_include_pad", True)
                                                 or not any(padding)):
        divisor = override or math.prod(kernel)  # the same for every window
        return box_sum(var, kernel, stride, padding, scale=1.0 / float(divisor) ** 2)
    # ceil mode, or padding left out of the count: D_j varies with the window. With the
    # indicator e of in-bounds elements, avg(e)_j = n_j / D_j, where n_j (in-bounds
    # elements of window j) is the same pooling with divisor 1.
    ones = torch.ones_like(var)
    ceil = params.get("ceil_mode", False)
    if n == 1:  # avg_pool1d has no divisor_override: count in 2-d
        counts = F.avg_pool2d(ones.unsqueeze(-2), (1, *kernel), (1, *stride), (0, *padding),
                              ceil, True, 1).squeeze(-2)
    else:
        pool = F.avg_pool2d if n == 2 else F.avg_pool3d
        counts = pool(ones, kernel, stride, padding, ceil, True, 1)
    inv_divisor = func(ones, *args[1:], **kwargs) / counts.clamp_min(1)
    return func(var, *args[1:], **kwargs) * inv_divisor


@register_variance_rule("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d")
def _adaptive_avg_pool(func, args, kwargs, out, var_of):
    # window j of each pooled dim (length L -> O) is [floor(jL/O), ceil((j+1)L/O)), of
    # size D_j: out_j = sum_{i in W_j} x_i / D_j, var_out_j = avg_pool(var)_j / D_j
    x, var = args[0], var_of(args[0])
    if var.dim() != x.dim():
        var = var.expand_as(x)
    n = _spatial_dims(func)
    sizes = torch.ones((1,) * n, dtype=var.dtype, device=var.device)
    for d, (length, pooled) in enumerate(zip(x.shape[-n:], out.shape[-n:])):
        j = torch.arange(pooled, device=var.device)
        size = ((j + 1) * length + pooled - 1) // pooled - (j * length) // pooled
        shape = [1] * n
        shape[d] = pooled
        sizes = sizes * size.to(var.dtype).view(shape)
    return func(var, *args[1:], **kwargs) / sizes


def _per_dim(value, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


@register_variance_rule("max_pool1d", "max_pool2d", "max_pool3d")
def _max_pool(func, args, kwargs, out, var_of):
    x, var = args[0], var_of(args[0]).expand_as(args[0])
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    params = dict(zip(names, args[1:]))
    params.update(kwargs)
    if params.pop("return_indices", False):
        return UnknownVariance(f"{func.__name__} with return_indices")
    with torch._C.DisableTorchFunctionSubclass():  # the indices of the mean: a plain tensor
        _, idx = func(x.detach(), return_indices=True, **params)
    return _variance_at(var, idx, _spatial_dims(func))


def _variance_at(var: Tensor, idx: Tensor, d: int) -> Tensor:
    """The variance at the elements a max pooling over ``d`` spatial dims selected
    (``idx``: its flat indices per channel, as ``return_indices`` gives them)."""
    picked = var.flatten(start_dim=-d).gather(-1, idx.flatten(start_dim=-d))
    return picked.view_as(idx)


@register_variance_rule("adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d")
def _adaptive_max_pool(func, args, kwargs, out, var_of):
    # as max_pool: the variance of the element the max selected in each window
    x, var = args[0], var_of(args[0]).expand_as(args[0])
    if _pool_arg(args, kwargs, 2, "return_indices", False):
        return UnknownVariance(f"{func.__name__} with return_indices")
    size = _pool_arg(args, kwargs, 1, "output_size")
    with torch._C.DisableTorchFunctionSubclass():  # the indices of the mean: a plain tensor
        _, idx = func(x.detach(), size, return_indices=True)
    return _variance_at(var, idx, _spatial_dims(func))


@register_variance_rule("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout")
def _dropout(func, args, kwargs, out, var_of):
    # a dropout that drops runs as the product with its mask (_dropout_mask): here, one
    # that drops nothing, alpha dropout, or a dropout function the flow does not know
    var = var_of(args[0])
    if not _dropout_drops(args, kwargs):
        return var
    return UnknownVariance(func.__name__)


#: The dropout functions the variance flow runs as ``x * mask`` (:func:`_dropout_mask`).
_DROPOUTS = frozenset({F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.dropout})
#: The in-place product an in-place dropout runs as (rule: ``mul``).
_IN_PLACE_PRODUCT = torch.ops.aten.mul_.Tensor


def _dropout_drops(args, kwargs) -> bool:
    """Whether a dropout call (``F.dropout(input, p, training)``, ``torch.dropout(input,
    p, train)``) drops elements: in training, with ``p > 0``."""
    training = _pool_arg(args, kwargs, 2, "training", kwargs.get("train", True))
    return bool(training) and _pool_arg(args, kwargs, 1, "p", 0.5) != 0


def _dropout_mask(args, kwargs, func) -> Tensor | None:
    """The mask of a dropout ``func`` of :data:`_DROPOUTS` that drops elements, ``None``
    for one that does not (evaluation mode, ``p = 0``).

    The dropout of a ones tensor like the input, ``m``: 0 at the dropped elements,
    ``1 / (1 - p)`` at the kept ones (a feature dropout's per channel), from the same
    draws as ``func(input)``, and ``input * m`` equals ``func(input)`` (PyTorch's kernels
    multiply by the mask). The flow runs the dropout as that product: its rule,
    ``var * m^2``, knows the dropped elements also where the mean is 0 (the output
    cannot tell them), in place as well, and in a compiled graph.
    """
    if not _dropout_drops(args, kwargs):
        return None
    x = _pool_arg(args, kwargs, 0, "input")
    rest = {k: v for k, v in kwargs.items() if k not in ("input", "inplace")}
    with torch._C.DisableTorchFunctionSubclass():
        return func(torch.ones_like(x), *args[1:3], **rest)


@register_variance_rule("batch_norm")
def _batch_norm(func, args, kwargs, out, var_of):
    names = (
        "input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"
    )
    bound = dict(zip(names, args))
    bound.update(kwargs)
    x = bound["input"]
    var = var_of(x)
    shape = [1, -1] + [1] * (x.dim() - 2)
    if bound.get("training", False) or bound.get("running_var") is None:
        dims = [d for d in range(x.dim()) if d != 1]
        # the batch statistic of the mean alone: on the carrier, `var` (no rule) would
        # build a carrier with an unknown variance, which the result then carried itself
        stat = _norm_stat(x).var(dim=dims, unbiased=False)
    else:
        stat = bound["running_var"]
    return var * _norm_scale(stat, bound.get("eps", 1e-5), bound.get("weight"),
                             (-1,)).view(shape)


@register_variance_rule("pad")
def _pad(func, args, kwargs, out, var_of):
    # a constant padding has no variance; reflect / replicate / circular copy elements of
    # the input, with their variance (the copies are marked repeated: see _repeats)
    var = var_of(args[0]).expand_as(args[0])
    mode = _pool_arg(args, kwargs, 2, "mode", "constant")
    pad = _pool_arg(args, kwargs, 1, "pad")
    if mode != "constant":
        return F.pad(var, pad, mode=mode)
    return F.pad(var, pad, mode="constant", value=0.0)


def _norm_scale(stat: Tensor, eps: float, weight: Tensor | None, weight_shape) -> Tensor:
    """``(weight / sqrt(stat + eps))^2``: the square of a normalisation's scale, with its
    statistic ``stat`` (of the mean signal) treated as a constant. Formed in
    :func:`~sbnn_addons.base.variance_dtype` (float32 for float16, as the variance it
    scales: a silent channel's ``1 / (0 + 1e-5)`` is above float16's 65504)."""
    dtype = variance_dtype(stat.dtype)
    scale = 1.0 / (stat.to(dtype) + eps)
    if weight is not None:
        weight = weight.to(dtype)
        scale = scale * (weight * weight).view(weight_shape)
    return scale


def _norm_stat(mean: Tensor) -> Tensor:
    """The mean signal of a normalisation, detached, in which its statistic is taken:
    float32 for float16 (a float16 variance overflows above a spread of 256, and its
    scale would then be 0: the noise would vanish)."""
    mean = _plain(mean).detach()
    return mean.to(variance_dtype(mean.dtype))


@register_variance_rule("group_norm")
def _group_norm(func, args, kwargs, out, var_of):
    """``y = (x - mu_g) / sqrt(s_g^2 + eps) * w_c + b_c`` over each group ``g`` of channels.

    As in the ``batch_norm`` rule (BatchNorm kept by the converters), the statistics are
    those of the mean signal, held fixed: the mean network is normalised as in the host
    model and its noise is scaled by the same factor,
    ``var(y) = var(x) * (w_c / sqrt(s_g^2 + eps))^2``. (Statistics recomputed on each
    noisy draw would absorb part of the noise: a smaller variance where a group holds few
    elements or the noise is large next to the spread of the signal.)
    """
    names = ("input", "num_groups", "weight", "bias", "eps")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    x, groups = bound["input"], bound["num_groups"]
    n, c, extra = x.shape[0], x.shape[1], x.dim() - 2
    stat = _norm_stat(x).reshape(n, groups, -1).var(-1, unbiased=False)
    stat = stat.repeat_interleave(c // groups, dim=1).view(n, c, *(1,) * extra)
    return var_of(x) * _norm_scale(stat, bound.get("eps", 1e-5), bound.get("weight"),
                                   (c,) + (1,) * extra)


@register_variance_rule("instance_norm")
def _instance_norm(func, args, kwargs, out, var_of):
    """``batch_norm`` per example: the statistics of each (example, channel) of the mean
    signal (``use_input_stats``, the default) or the running ones, held fixed as in
    :func:`_group_norm`: ``var(y) = var(x) * (w_c / sqrt(s^2 + eps))^2``."""
    names = ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats",
             "momentum", "eps")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    x = bound["input"]
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    if bound.get("use_input_stats", True) or bound.get("running_var") is None:
        dims = tuple(range(2, x.dim()))
        stat = _norm_stat(x).var(dim=dims, unbiased=False, keepdim=True)
    else:
        stat = bound["running_var"].view(shape)
    return var_of(x) * _norm_scale(stat, bound.get("eps", 1e-5), bound.get("weight"), shape)


@register_variance_rule("layer_norm", "rms_norm")
def _layer_norm(func, args, kwargs, out, var_of):
    """``y = (x - mu) / sqrt(s^2 + eps) * w + b`` over the trailing ``normalized_shape``
    dims (``rms_norm``: ``x / sqrt(mean(x^2) + eps) * w``), the statistics of the mean
    signal held fixed as in :func:`_group_norm`: ``var(y) = var(x) * w^2 / (s^2 + eps)``."""
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    if func.__name__ == "rms_norm":
        names = ("input", "normalized_shape", "weight", "eps")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    x, shape = bound["input"], bound["normalized_shape"]
    k = 1 if isinstance(shape, int) else len(shape)
    dims = tuple(range(x.dim() - k, x.dim()))
    mean = _norm_stat(x)
    if func.__name__ == "rms_norm":
        stat = (mean * mean).mean(dim=dims, keepdim=True)
        eps = bound.get("eps")
        eps = torch.finfo(x.dtype).eps if eps is None else eps
    else:
        stat = mean.var(dim=dims, unbiased=False, keepdim=True)
        eps = bound.get("eps", 1e-5)
    weight = bound.get("weight")
    return var_of(x) * _norm_scale(stat, eps, weight,
                                   None if weight is None else weight.shape)


_NEAREST = ("nearest", "nearest-exact")


@register_variance_rule("interpolate")
def _interpolate(func, args, kwargs, out, var_of):
    """Every mode is a separable linear map, ``out = (A_1 x A_2 x ...) x`` along the
    spatial dims, so ``var(out) = (A_1^2 x A_2^2 x ...) var`` for independent inputs:
    nearest moves the variance (0/1 weights); linear, bilinear, bicubic, trilinear, area
    and antialias get the squared weights ``A_d^2``, read from the interpolation of the
    basis vectors of each dim (constant along the others, which the weights, summing to 1
    there, leave unchanged)."""
    x, var = args[0], var_of(args[0])
    if var.dim() != x.dim() or var.shape[2:] != x.shape[2:]:
        var = var.expand_as(x)
    rest = {k: v for k, v in kwargs.items() if k != "input"}
    if _pool_arg(args, kwargs, 3, "mode", "nearest") in _NEAREST:
        return _c_level(func)(var, *args[1:], **rest)
    spatial = tuple(x.shape[2:])
    for d, length in enumerate(spatial):
        basis = torch.eye(length, dtype=var.dtype, device=var.device)
        view = [length, 1] + [1] * len(spatial)
        view[2 + d] = length
        basis = basis.view(view).expand(length, 1, *spatial[:d], length, *spatial[d + 1:])
        weights = _c_level(func)(basis, *args[1:], **rest)  # [L, 1, *out]: A_d^T
        index = [slice(None), 0] + [0] * len(spatial)
        index[2 + d] = slice(None)
        squared = weights[tuple(index)] ** 2  # [L_d, O_d]
        var = (var.movedim(2 + d, -1) @ squared).movedim(-1, 2 + d)
    return var


@register_variance_rule("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def _conv_transpose(func, args, kwargs, out, var_of):
    """A noise-free (deterministic) transposed convolution after a Bayesian layer:
    ``out_o = sum_i w_oi x_i + b``, so ``var(out_o) = sum_i w_oi^2 var(x_i)``, the same
    transposed convolution of ``var`` with the squared weights, without bias."""
    names = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups",
             "dilation")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    x, weight = bound.pop("input"), bound.pop("weight")
    if var_of(weight) is not None:
        return UnknownVariance(f"{func.__name__} with noisy weights")
    bound.pop("bias", None)
    var = var_of(x).expand_as(x)
    return _c_level(func)(var, _plain(weight) * _plain(weight), None, **bound)


# Every built-in rule is linear in the variance, so it may act on the base of a
# ScaledVariance; conversions of dtype and device, and detach, multiply it out first.
_FACTORED.update(set(_RULES) - {"to", "type_as", "float", "double", "half", "bfloat16",
                                "detach", "detach_"})


# Operations that never carry noise forward (their outputs are noise-free by design).
_NOISE_FREE = frozenset(
    {"__get__", "__set__", "size", "dim", "numel", "__len__", "__bool__", "zeros_like",
     "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "gt", "ge", "lt", "le",
     "eq", "ne", "__gt__", "__ge__", "__lt__", "__le__", "__eq__", "__ne__", "sign",
     "heaviside", "argmax", "argmin", "isfinite", "isnan", "any", "all", "item", "tolist",
     "__format__", "__repr__", "numpy", "data_ptr", "requires_grad_", "retain_grad",
     "register_hook", "__hash__", "backward", "grad", "new_zeros", "new_ones", "new_empty",
     "new_full", "new_tensor"}
)


def _var_of(x):
    """The variance of an argument as a tensor (a factored one multiplied out)."""
    if type(x) is VarianceTensor:
        var = x.variance
        return var.value() if isinstance(var, ScaledVariance) else var
    return None


def _base_of(x):
    """The base of an argument's factored variance (all of them share one scale)."""
    if type(x) is VarianceTensor:
        var = x.variance
        return None if var is None else var.base
    return None


def _scan(args, kwargs, compiling: bool | None = None):
    """One pass over the (possibly nested) arguments: ``(noise, scale, probe, nset)``.

    ``noise`` is ``None`` if no argument carries a variance, else the first
    :class:`UnknownVariance` among them, else ``True``. ``scale`` is the scale tensor
    shared by all of them when every one is a :class:`ScaledVariance`, else ``None``.
    ``probe`` is ``True`` if an argument without a variance carries the ``mean``-mode probe.
    ``nset`` is the union of the carriers' :class:`NoiseSet` (eager mode; else ``None``),
    also past an unknown variance (its draws name the layers in a neuron's error).
    ``compiling``: whether a graph is traced, where the caller knows it.
    """
    noisy, scale, probe, nset, unknown = None, None, False, None, None
    eager = not (torch.compiler.is_compiling() if compiling is None else compiling)
    for group in (args, kwargs.values()) if kwargs else (args,):
        for a in group:
            if isinstance(a, Tensor):
                items = (a,)
            elif isinstance(a, (list, tuple)):
                items = a
            else:
                continue
            for b in items:
                if type(b) is not VarianceTensor:
                    continue
                var = b.variance if eager else _traced_variance(b)
                if var is None:
                    if b.probe:
                        probe = True
                        if eager:
                            mine = _noise_of(b, False)
                            nset = mine if nset is None else nset.union(mine)
                    continue
                if eager:
                    mine = _noise_of(b, False)
                    nset = mine if nset is None else nset.union(mine)
                if isinstance(var, UnknownVariance):
                    unknown = var if unknown is None else unknown
                    continue
                if isinstance(var, ScaledVariance):
                    if noisy is None:
                        scale = var.scale
                    elif scale is not var.scale:
                        scale = None
                else:
                    scale = None
                noisy = True
    if unknown is not None:
        return unknown, None, False, nset
    return noisy, scale, probe, nset


_NAMES: dict = {}


def _name(func, compiling: bool | None = None) -> str:
    """``func.__name__`` (cached per function object in eager mode; a graph reads the
    name directly, so that it does not guard on the cache, which eager calls grow).
    ``compiling``: whether a graph is traced, where the caller knows it."""
    if torch.compiler.is_compiling() if compiling is None else compiling:
        return getattr(func, "__name__", str(func))
    try:
        return _NAMES[func]
    except (KeyError, TypeError):
        name = getattr(func, "__name__", str(func))
        try:
            _NAMES[func] = name
        except TypeError:  # unhashable callable
            pass
        return name


#: Operations that split one tensor into several views (``torch.chunk``, ``split``,
#: ``unbind``, ...): the variance is split the same way, each output gets its part.
_SPLITS = frozenset(
    {"split", "chunk", "unbind", "tensor_split", "split_with_sizes", "unsafe_split",
     "unsafe_chunk", "unsafe_split_with_sizes", "hsplit", "vsplit", "dsplit"}
)


def _attach_each(name, func, args, kwargs, out, noise, scale, nset=None):
    """The outputs of a multi-tensor result ``out``, each with its variance (a split gives
    each part its part of the variance; any other operation, e.g. ``nn.GRU`` / ``nn.LSTM``,
    marks every tensor output unknown, so that a neuron fed by it raises)."""
    tensors = [t for t in out if isinstance(t, Tensor)]
    if not tensors:
        return out
    # (an unknown variance keeps the draws it carries: a neuron's error names their
    # layers, and a readout's output still shows whose noise reached no spike)
    if noise is not True:  # an input's variance is already unknown
        return _remake(out, [noise] * len(out), noise=nset)
    if name not in _SPLITS or not isinstance(args[0], Tensor) or len(tensors) != len(out):
        return _remake(out, [UnknownVariance(name)] * len(out), noise=nset)
    x = args[0]
    if scale is not None:  # split the base of a factored variance
        base = x.variance.base.expand_as(x)
        parts = _c_level(func)(base, *args[1:], **kwargs)
        return _remake(out, [ScaledVariance(part, scale) for part in parts], noise=nset)
    var = _var_of(x)
    if var is None:  # the noise is in another argument (e.g. a split size): unknown
        return _remake(out, [UnknownVariance(name)] * len(out), noise=nset)
    return _remake(out, list(_c_level(func)(var.expand_as(x), *args[1:], **kwargs)),
                   noise=nset)


def _remake(out, variances, probe: bool = False, noise: NoiseSet | None = None):
    """``out`` (a tuple or list) with each tensor carrying its entry of ``variances`` (and
    the noise set ``noise``)."""
    items = [_wrap(t, v, probe, noise) if isinstance(t, Tensor) else t
             for t, v in zip(out, variances)]
    if isinstance(out, list):
        return items
    if type(out) is tuple:
        return tuple(items)
    try:  # a named tuple (torch.return_types, e.g. max_pool with indices)
        return type(out)(items)
    except TypeError:
        return tuple(items)


@dataclass
class VarianceFlowReport:
    """What :func:`check_variance_flow` saw in one forward.

    Attributes:
        ops: operations the (probed) noise of a Bayesian layer went through, with a rule,
            and how often: ``{name: count}``.
        unknown: operations without a rule that the noise reached, ``{name: count}``. They
            are harmless where their output reaches no neuron (a loss, a readout); one that
            reaches a neuron makes the check raise instead.
        tracked: whether the model had the variance flow installed
            (:func:`track_variance`); the check installs it for its own forward if not.
        bayesian_layers: Bayesian layers found (whose noise was followed).
        readouts: qualified names of the Bayesian layers whose noise reaches the output
            without a spiking neuron (readouts: their noise would not act, leave them
            deterministic with the converter's ``exclude=``).
    """

    ops: dict[str, int] = field(default_factory=dict)
    unknown: dict[str, int] = field(default_factory=dict)
    tracked: bool = True
    bayesian_layers: int = 0
    readouts: list[str] = field(default_factory=list)

    def note(self, name: str, known: bool) -> None:
        table = self.ops if known else self.unknown
        table[name] = table.get(name, 0) + 1


#: Reports being filled (a stack: :func:`check_variance_flow` calls may nest).
_REPORTS: list[VarianceFlowReport] = []

#: Modules that pass the variance of their input on to their output explicitly (they read
#: it with :func:`raw_variance` and attach it again, outside the flow), by qualified class
#: name; :func:`track_variance` passes the ``mean``-mode probe through them as well.
_PASSTHROUGH: set[str] = {"sbnn_addons.layers.ChannelAffine",
                          "sbnn_addons.models._common.StepAffine"}


def register_variance_passthrough(cls: type) -> type:
    """Declare a module class that passes its input's variance on to its output itself
    (``attach_variance(out, raw_variance(x))`` with the flow off, like
    :class:`~sbnn_addons.ChannelAffine`), so that :func:`track_variance` carries the
    ``mean``-mode probe through it too. Usable as a class decorator; returns ``cls``."""
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_variance_passthrough expects an nn.Module subclass, "
                        f"got {cls!r}")
    _PASSTHROUGH.add(f"{cls.__module__}.{cls.__qualname__}")
    return cls


def _is_passthrough(m: nn.Module) -> bool:
    return any(f"{c.__module__}.{c.__qualname__}" in _PASSTHROUGH for c in type(m).__mro__)


#: Host modules whose effect on the variance the flow cannot follow, by qualified class
#: name, with the reason (and the fix) that names them where a neuron they feed raises
#: (:func:`track_variance` marks their output with it); their own operations would give
#: an error about a correlated sum inside them instead.
_OPAQUE: dict[str, str] = {
    "spikingjelly.activation_based.layer.misc.SynapseFilter": (
        "spikingjelly layer.SynapseFilter (its current I_t = I_{t-1} - (1 - x_t) I_{t-1} / "
        "tau + x_t multiplies the input by the filter's own state and carries the noise of "
        "every earlier step, which the neuron's membrane carries too: the noise of "
        "successive steps is correlated, which the variance flow of independent draws "
        "cannot follow; put the SynapseFilter after the neuron, on spikes, or keep the layer "
        "feeding it deterministic with exclude= in to_sbnn)"),
}


def _opaque_reason(m: nn.Module) -> str | None:
    for c in type(m).__mro__:
        reason = _OPAQUE.get(f"{c.__module__}.{c.__qualname__}")
        if reason is not None:
            return reason
    return None


def _opaque_output(module, args, output):
    """Forward hook of a module in ``_OPAQUE``: an output computed from a noisy (or
    probed) input gets an :class:`UnknownVariance` naming the module."""
    x = args[0] if args else None
    if (isinstance(output, Tensor) and type(x) is VarianceTensor
            and (x.variance is not None or x.probe)):
        return _wrap(output, UnknownVariance(_opaque_reason(module)))
    return None


def _is_bayesian_layer(m: nn.Module) -> bool:
    """A Bayesian layer (the source of a variance), recognised without importing
    :mod:`sbnn_addons.layers` (which imports this module)."""
    return isinstance(m, SBNNModule) and callable(getattr(type(m), "_noise_free", None))


def _noisy_in_sample_mode(layer: nn.Module) -> bool:
    """Whether ``layer`` attaches a variance in ``sample`` mode (a learnable std, bias
    noise or a non-zero fixed std), the fixed std's test cached per buffer version."""
    if getattr(layer, "learn_std", True) or getattr(layer, "bias_noise", False):
        return True
    std = getattr(layer, "fixed_std", None)
    if not isinstance(std, Tensor):
        return True
    return cached_tensor_test(layer, "_sbnn_probe_std", std, lambda t: (t != 0).any())


def _probed(x) -> bool:
    return type(x) is VarianceTensor


_ADAPTIVE_MAX_POOLS = frozenset({"adaptive_max_pool1d", "adaptive_max_pool2d",
                                 "adaptive_max_pool3d"})
_CONV_TRANSPOSES = frozenset({"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"})


def _probe_unknown(name: str, args, kwargs) -> str | None:
    """For an operation with a rule: the reason its rule would return an
    :class:`UnknownVariance` for these (probed) arguments, or ``None``. Mirrors the
    conditions of the built-in rules (a product of two noisy tensors, a division by one,
    ``where`` on a noisy condition, ``return_indices``, ``alpha_dropout``, a transposed
    convolution with noisy weights), without computing any variance."""
    if name in ("mul", "mul_", "__mul__", "__rmul__", "__imul__"):
        other = args[1] if len(args) > 1 else kwargs.get("other")
        if _probed(args[0]) and _probed(other):
            return "product of two noisy tensors"
    elif name in _SUMS:
        other = args[1] if len(args) > 1 else kwargs.get("other")
        if (args[0] is not other and _probed(args[0]) and _probed(other)
                and _correlated(args[0], other)):
            return _correlated_reason(name)
    elif name in ("div", "div_", "__truediv__", "__itruediv__", "true_divide"):
        other = args[1] if len(args) > 1 else kwargs.get("other")
        if _probed(other) or kwargs.get("rounding_mode") is not None:
            return f"{name} by a noisy tensor or with rounding"
    elif name == "where":
        if _probed(args[0]):
            return "where on a noisy condition"
    elif name in ("max_pool1d", "max_pool2d", "max_pool3d"):
        if (args[6] if len(args) > 6 else kwargs.get("return_indices", False)):
            return f"{name} with return_indices"
    elif name in _ADAPTIVE_MAX_POOLS:  # (membership: Dynamo traces no str.startswith here)
        if _pool_arg(args, kwargs, 2, "return_indices", False):
            return f"{name} with return_indices"
    elif name == "alpha_dropout":
        p = _pool_arg(args, kwargs, 1, "p", 0.5)
        if _pool_arg(args, kwargs, 2, "training", True) and p != 0:
            return "alpha_dropout"
    elif name in _CONV_TRANSPOSES:
        if _probed(args[1] if len(args) > 1 else kwargs.get("weight")):
            return f"{name} with noisy weights"
    return None


def _carry_probe(name: str, args, kwargs, out, nset: NoiseSet | None = None,
                 in_place: bool = False):
    """The ``mean``-mode counterpart of the rules: an operation with a rule passes the probe
    on to its output(s); one without a rule marks them with an :class:`UnknownVariance`
    (as in ``sample`` mode), so that a neuron fed by it raises. Returns the output(s).
    ``in_place``: a compiled in-place operation on the carrier ``args[0]``, run on an
    alias of it (:func:`_compiled_in_place`)."""
    if name in _NOISE_FREE:
        return out
    if isinstance(out, Tensor):
        why = _probe_unknown(name, args, kwargs) if name in _RULES else name
        if why is None:
            why, nset = _repeat_check(name, args, kwargs, out, nset)
        if _REPORTS:
            _REPORTS[-1].note(name, why is None)
        if in_place or _in_place(args, out):
            _mark_in_place(args[0], None if why is None else UnknownVariance(why), name,
                           probe=why is None, noise=nset)
            return args[0]
        if why is None:
            return _wrap(out, None, True, nset)
        return _wrap(out, UnknownVariance(why), noise=nset)  # (the draws, for messages)
    if isinstance(out, (tuple, list)):
        tensors = [t for t in out if isinstance(t, Tensor)]
        if not tensors:
            return out
        split = (name in _SPLITS and len(tensors) == len(out) and args
                 and type(args[0]) is VarianceTensor and args[0].probe)
        if _REPORTS:
            _REPORTS[-1].note(name, bool(split))
        if split:
            return _remake(out, [None] * len(out), True, nset)
        return _remake(out, [UnknownVariance(name)] * len(out))
    if name in ("__setitem__", "index_put_") and args and isinstance(args[0], Tensor):
        if _REPORTS:
            _REPORTS[-1].note(name, False)
        _mark_in_place(args[0], UnknownVariance(name), name)
    return out


def _in_place(args, out) -> bool:
    """Whether ``out`` is the (noisy) first argument itself: an in-place operation."""
    return bool(args) and out is args[0] and type(out) is VarianceTensor


#: In-place operations that change a tensor's metadata (shape, strides, autograd state),
#: not its values: on an alias, the alias would take the change instead of the tensor.
_IN_PLACE_METADATA = frozenset({
    "squeeze_", "unsqueeze_", "transpose_", "t_", "swapdims_", "swapaxes_", "as_strided_",
    "resize_", "resize_as_", "set_", "detach_", "requires_grad_", "share_memory_",
})
#: Python's in-place operators on a tensor, and the item assignment.
_IN_PLACE_DUNDERS = frozenset({
    "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
    "__ipow__", "__imatmul__", "__iand__", "__ior__", "__ixor__", "__ilshift__",
    "__irshift__", "__setitem__",
})


def _compiled_in_place(func, args) -> bool:
    """Under ``torch.compile``: whether ``func`` writes the values of the carrier
    ``args[0]`` in place (``t.mul_(m)``, ``t.copy_(s)``, ``t.masked_fill_(mask, 0)``,
    ``t.clamp_(...)``, ``t *= c``, ``t[idx] = v``: a name with a trailing ``_``, or an
    in-place operator).

    PyTorch 2.13's Dynamo re-reads the type of a tensor that an in-place Tensor method
    with a tensor argument mutated from its fake value (a plain tensor: the carrier
    target became one), and gives the method's result a variable of its own
    (``out is args[0]`` is false): the rule's variance reached neither the target nor,
    for a statement ``t.mul_(m)``, anything the code reads, and the variance was lost
    silently. The flow runs such an operation on a plain alias of the target (a view:
    the graph writes the target's values through it, as eager mode writes the target),
    so that the target stays a carrier and takes the rule's variance, as in eager mode.
    Aten's in-place operators (``torch.ops.aten.mul_.Tensor``, run by an in-place
    dropout) and the metadata changes (``unsqueeze_``, ``detach_``: an alias would take
    them instead of the target) run on the target itself.
    """
    if (not args or type(args[0]) is not VarianceTensor
            or type(func) is torch._ops.OpOverload):
        return False
    name = getattr(func, "__name__", None)
    if not isinstance(name, str):
        return False
    if name in _IN_PLACE_DUNDERS:
        return True
    return (name[-1:] == "_" and name[:1] != "_" and name not in _IN_PLACE_METADATA
            and name not in _NOISE_FREE)


def _mark_in_place(target, variance, name: str, probe: bool = False,
                   noise: NoiseSet | None = None) -> None:
    """Give ``target``, changed in place by ``name``, the variance ``variance``.

    A plain tensor that receives noise in place (a metric's running count, a slice
    assignment) becomes a carrier in eager mode, so that a neuron it reaches still sees
    the variance (or raises for an unknown one); under ``torch.compile`` it stays plain.
    """
    if type(target) is VarianceTensor:
        target.variance = variance
        target.probe = probe
        if not torch.compiler.is_compiling():
            _set_noise(target, noise)
    elif isinstance(target, Tensor) and not torch.compiler.is_compiling():
        _wrap(target, variance, probe, noise)


_C_LEVEL: dict = {}


def _c_level(func, compiling: bool | None = None):
    """The C method behind a Python-level ``Tensor`` method (``unflatten``, ``split``, ...,
    which call ``super()``: Dynamo cannot trace that on a subclass); ``func`` otherwise.
    Cached in eager mode; a graph does not read the cache (it would guard on it).
    ``compiling``: whether a graph is traced, where the caller knows it."""
    if compiling is None:
        compiling = torch.compiler.is_compiling()
    if not compiling:
        try:
            return _C_LEVEL[func]
        except (KeyError, TypeError):
            pass
    target = func
    if getattr(func, "__module__", None) == "torch._tensor":
        name = getattr(func, "__name__", "")
        if not name.startswith("__"):  # torch.unflatten etc., never a module's dunder
            builtin = getattr(torch._C._VariableFunctions, name, None)
            if isinstance(builtin, types.BuiltinFunctionType):
                target = builtin
    if not compiling:  # no global side effect inside a graph
        try:
            _C_LEVEL[func] = target
        except TypeError:
            pass
    return target


def _flow(func, args, kwargs, compiling: bool | None = None):
    """The body of :meth:`VarianceTensor.__torch_function__`: the operation on the plain
    means, then its variance rule (module doc). ``compiling``: whether a graph is traced,
    where the caller knows it."""
    if compiling is None:
        compiling = torch.compiler.is_compiling()
    try:
        dropout = func in _DROPOUTS
    except TypeError:  # an unhashable callable
        dropout = False
    if dropout:
        mask = _dropout_mask(args, kwargs, func)
        if mask is not None:  # the product with the mask, whose rule knows the dropped ones
            # (in place: aten's product, after which a compiled graph keeps the target a
            # carrier, which it does not after Tensor.mul_)
            product = (_IN_PLACE_PRODUCT if _pool_arg(args, kwargs, 3, "inplace", False)
                       else torch.mul)
            return _flow(product, (_pool_arg(args, kwargs, 0, "input"), mask), {}, compiling)
    if args and type(args[0]) is VarianceTensor:
        reshape = _IN_PLACE_RESHAPES.get(getattr(func, "__name__", None))
        if reshape is not None:
            return _reshape_in_place(reshape, func, args, kwargs, compiling)
    # under torch.compile, an in-place method on a carrier runs on a plain alias of it
    # (_compiled_in_place): Dynamo then keeps the target a carrier, which the rule updates
    in_place = compiling and _compiled_in_place(func, args)
    if compiling and _name(func, compiling) == "detach_" and _noisy_operand(args[:1]):
        _refuse_compiled_detach()
    with torch._C.DisableTorchFunctionSubclass():
        if in_place:
            out = _c_level(func, compiling)(args[0].view_as(args[0]), *args[1:], **kwargs)
        else:
            out = _c_level(func, compiling)(*args, **kwargs)
    noise, scale, probe, nset = _scan(args, kwargs, compiling)
    if noise is None:
        if probe:
            name = _name(func, compiling)
            if name in _COMPARISONS or type(func) is torch._ops.OpOverload:
                _refuse_host_neuron(func, name)
            return _carry_probe(name, args, kwargs, out, nset, in_place)
        return out
    name = _name(func, compiling)
    if name in _COMPARISONS or type(func) is torch._ops.OpOverload:
        _refuse_host_neuron(func, name)
    if name in _NOISE_FREE:
        if name in _ESCAPES and _OPEN_FLOWS:
            _note_read(args[0], _ESCAPED)
        return out
    if not isinstance(out, Tensor):
        if name in ("__setitem__", "index_put_") and isinstance(args[0], Tensor):
            _mark_in_place(args[0], UnknownVariance(name), name)
        elif isinstance(out, (tuple, list)):
            return _attach_each(name, func, args, kwargs, out, noise, scale, nset)
        return out
    if noise is not True:  # an input's variance is already unknown
        var = noise
    else:
        rule = _RULES.get(name)
        if rule is None:
            var = UnknownVariance(name)
        elif scale is not None and name in _FACTORED:  # the rule is linear: act on the bases
            var = rule(func, args, kwargs, out, _base_of)
            if isinstance(var, Tensor):
                var = ScaledVariance(var, scale)
        else:
            var = rule(func, args, kwargs, out, _var_of)
    why, nset = _repeat_check(name, args, kwargs, out, nset)
    if why is not None and not isinstance(var, UnknownVariance):
        var = UnknownVariance(why)
    if in_place or (out is args[0] if args else False):  # the target carries the result
        if compiling and name in _SUMS and _noisy_operand(args[1:]):
            _refuse_compiled_in_place_sum(name)
        # (an edit: not a conversion that returns the membrane itself, mem.contiguous(),
        # mem.to(torch.float32), which eager mode lets pass)
        if (type(args[0]) is VarianceTensor
                and (in_place or name[-1:] == "_" or type(func) is torch._ops.OpOverload)):
            # a graph reads no version counter at the next step: the edit is named on
            # the membrane (or the membrane a view of it shows: mem[i].zero_(),
            # mem.detach().mul_(mask)), which a converted neuron given it refuses (also
            # an eager edit between compiled calls of a membrane a compiled step returned)
            viewed = getattr(args[0], "viewed", None)
            if viewed is not None:  # (and the view, which may be passed back itself)
                viewed.edited = args[0].edited = name
            elif getattr(args[0], "emitted", None) is not None:
                args[0].edited = name
        _mark_in_place(args[0], var, name, noise=nset)
        return args[0]
    new = _wrap(out, var, noise=nset, compiling=compiling)
    if type(new) is VarianceTensor:  # (eager: between compiled calls, see above)
        source = _membrane_source(args)
        # (a loss or a readout of another rank is no membrane; a slice is marked, so that
        # a membrane put together from edited slices, torch.cat, is seen as an edit)
        if source is not None and new.dim() == source.dim():
            new.derived = source
        viewed = _viewed_membrane(name, args)
        if viewed is not None:
            new.viewed = viewed
    return new


#: Operations whose result is a view of their first argument (``__getitem__`` with basic
#: indices only): an in-place edit of the result changes that argument.
_VIEWS = frozenset({
    "__getitem__", "detach", "view", "view_as", "narrow", "select", "transpose", "t",
    "permute", "squeeze", "unsqueeze", "expand", "expand_as", "unflatten", "flatten",
    "reshape", "reshape_as", "as_strided", "diagonal", "movedim", "moveaxis", "swapaxes",
    "swapdims", "unfold", "T", "mT", "alias"})


def _viewed_membrane(name: str, args) -> VarianceTensor | None:
    """The membrane (a carrier with :attr:`VarianceTensor.emitted`) that the result of the
    operation ``name`` on ``args`` is a view of (directly or through earlier views), else
    ``None``: the result's :attr:`VarianceTensor.viewed`."""
    if name not in _VIEWS or type(args[0]) is not VarianceTensor:
        return None
    if name == "__getitem__" and _advanced_index(args[1]):
        return None  # a copy (mem[mask]): an edit of it leaves the membrane as it is
    return _membrane_behind(args[0], "viewed")


def _advanced_index(index) -> bool:
    """Whether a ``__getitem__`` index selects by tensors, lists or bools (a copy)."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, (Tensor, list, bool)) for p in parts)


def _membrane_source(args) -> VarianceTensor | None:
    """The membrane (a carrier with :attr:`VarianceTensor.emitted`) that an operation on
    ``args`` computes from, directly or through earlier operations, else ``None``: the
    result's :attr:`VarianceTensor.derived`."""
    for arg in args:
        for item in arg if isinstance(arg, (list, tuple)) else (arg,):  # torch.cat([...])
            if type(item) is VarianceTensor:
                source = _membrane_behind(item, "derived")
                if source is not None:
                    return source
    return None


def _membrane_behind(carrier: VarianceTensor, mark: str) -> VarianceTensor | None:
    """The membrane of a compiled step (a carrier with :attr:`VarianceTensor.emitted`)
    that ``carrier`` is, or that its ``mark`` (``"derived"`` or ``"viewed"``) names; else
    ``None``."""
    if getattr(carrier, "emitted", None) is not None:
        return carrier
    return getattr(carrier, mark, None)


#: In-place reshapes of a tensor's metadata, with their out-of-place forms.
_IN_PLACE_RESHAPES = {"squeeze_": Tensor.squeeze, "unsqueeze_": Tensor.unsqueeze,
                      "t_": Tensor.t, "transpose_": Tensor.transpose,
                      "swapdims_": Tensor.swapdims, "swapaxes_": Tensor.swapaxes}


def _reshape_in_place(reshape, func, args, kwargs, compiling: bool) -> Tensor:
    """An in-place reshape of carrier ``args[0]`` (``h.unsqueeze_(0)``, ``h.t_()``): the
    variance is the out-of-place ``reshape``'s (its rule sees the target's shape before
    the change, which a compact variance needs: after it, ``unsqueeze_`` was applied to
    the variance twice and ``t_`` had no rule), then ``func`` reshapes the mean in place."""
    result = _flow(reshape, args, kwargs, compiling)
    with torch._C.DisableTorchFunctionSubclass():
        _c_level(func, compiling)(*args, **kwargs)
    if type(result) is VarianceTensor:
        _mark_in_place(args[0], result.variance, func.__name__, probe=result.probe,
                       noise=None if compiling else result.__dict__.get("noise"))
    else:  # the operation left no noise
        _mark_in_place(args[0], None, func.__name__)
    return args[0]


def _noisy_operand(args) -> bool:
    """Whether one of ``args`` carries a Bayesian layer's variance."""
    return any(type(a) is VarianceTensor and a.variance is not None for a in args)


def _refuse_compiled_in_place_sum(name: str) -> None:
    """An in-place sum whose added operand carries a variance, in a graph that
    ``torch.compile`` traces (``h += g``, ``h.add_(g)``): PyTorch 2.13's Dynamo leaves the
    target a plain tensor (a carrier target is replaced by one), so the variance would be
    lost silently (the layers' stds would get no gradient).

    Where the sum runs in a host library's code (the state update of a snnTorch neuron
    that is not converted), an adapter's :data:`IN_PLACE_CAUSES` entry names the misuse
    instead, with the message eager mode raises for it.

    Raises:
        RuntimeError: naming the out-of-place form that works, or the misuse.
    """
    message = (
        f"an in-place sum ('{name}': h += g, h.add_(g)) where g carries a Bayesian "
        "layer's posterior variance, inside torch.compile: the compiled graph would drop "
        "the variance (the layers' stds would get no gradient). Write it out of place, "
        "h = h + g (e.g. out = out + identity in a residual block)")
    if torch.compiler.is_compiling():
        _raise_compiled_in_place_error(message)
    raise VarianceFlowError(message)


def _refuse_compiled_detach() -> None:
    """``h.detach_()`` on a tensor that carries a Bayesian layer's variance, in a graph that
    ``torch.compile`` traces: PyTorch 2.13's Dynamo makes the target a plain tensor (a
    metadata change, which an alias of the target cannot take for it), so its variance
    would be lost silently, where eager mode keeps it (detached).

    Raises:
        RuntimeError: naming the out-of-place form, which keeps the variance.
    """
    _raise_compiled_in_place_error(
        "an in-place detach ('detach_': h.detach_()) of a tensor that carries a Bayesian "
        "layer's posterior variance, inside torch.compile: the compiled graph would drop "
        "the variance (the neurons it feeds would draw no weight noise). Write it out of "
        "place, h = h.detach(), or detach between compiled steps")


#: Functions that name the misuse behind an in-place sum refused under ``torch.compile``
#: where the sum runs in a host library's code: each takes a module whose method the sum
#: runs in (innermost first) and returns the message eager mode raises for that misuse,
#: or ``None``. The adapters register theirs (a snnTorch neuron that is not converted).
IN_PLACE_CAUSES: list[Callable[[nn.Module], str | None]] = []


# The frames of nn.Module's call machinery, which runs a module's forward hooks (a
# tracked root's input check among them); any other method of the module runs none.
_MODULE_CALL_FRAMES = frozenset({"_wrapped_call_impl", "_call_impl"})


def _called_eagerly(module: nn.Module) -> bool:
    """Whether Python's own stack holds a call of ``module`` (its ``_call_impl``, which
    ran its hooks) below the frame that ``torch.compile`` traces: ``torch.compile(net)``
    traces ``net.forward`` as its first frame, called by ``net``'s call machinery, which
    Dynamo leaves to Python; ``torch.compile(net.forward)`` or ``net.chunk`` has no
    such caller."""
    frame = sys._getframe(1)
    while frame is not None:
        if (frame.f_code.co_name in _MODULE_CALL_FRAMES
                and frame.f_locals.get("self") is module):
            return True
        frame = frame.f_back
    return False


def _traced_modules(calls_only: bool = False) -> list[nn.Module]:
    """While ``torch.compile`` traces: the modules whose methods are being traced,
    innermost first, read from Dynamo's instruction translators (empty where a PyTorch
    version keeps them elsewhere: the caller then keeps its own message).

    Args:
        calls_only: only the modules being called (``module(x)``, which runs its hooks),
            not those of which another method is traced (``module.chunk(x)``).
    """
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx().output.current_tx
        found: list[nn.Module] = []
        while tx is not None:
            value = getattr(tx.symbolic_locals.get("self"), "value", None)
            parent = getattr(tx, "parent", None)
            if (isinstance(value, nn.Module) and not any(value is m for m in found)
                    and (not calls_only or tx.f_code.co_name in _MODULE_CALL_FRAMES
                         or (parent is None and _called_eagerly(value)))):
                found.append(value)
            tx = parent
        return found
    except (AttributeError, ImportError, RuntimeError, TypeError):
        return []


@torch.compiler.assume_constant_result
def _raise_compiled_in_place_error(message: str) -> None:
    """Run in Python while tracing (a constant-result function, as
    :func:`~sbnn_addons.base.raise_error`'s): raise the message of the misuse an
    :data:`IN_PLACE_CAUSES` entry names for a traced module, else ``message``, as a
    Dynamo ``UserError``."""
    for module in _traced_modules():
        for cause in IN_PLACE_CAUSES:
            named = cause(module)
            if named is not None:
                _raise_user_error(named)
    _raise_user_error(message)


#: Operations whose rule adds the variances of several elements of one tensor.
_ADDS_UP = frozenset({"sum", "mean", "avg_pool1d", "avg_pool2d", "avg_pool3d",
                      "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d"})
#: Operations that can put one element into several places of their result.
_REPEATS = frozenset({"expand", "expand_as", "broadcast_to", "repeat", "cat", "concat",
                      "concatenate", "stack", "interpolate", "pad", "conv_transpose1d",
                      "conv_transpose2d", "conv_transpose3d"})
#: Poolings whose windows may overlap (an element in several windows).
_POOLS = frozenset({"avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d",
                    "max_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                    "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
                    "adaptive_max_pool3d"})


def _repeat_check(name: str, args, kwargs, out: Tensor,
                  nset: NoiseSet | None) -> tuple[str | None, NoiseSet | None]:
    """``(reason, noise set)`` of an operation on noisy (or probed) arguments with the
    union ``nset`` of their noise sets: the reason its rule's variance is wrong (a sum
    over repeated elements; else ``None``), and the output's noise set (marked repeated
    where the operation repeats an element). Eager mode only (``nset`` is ``None`` in a
    compiled graph)."""
    if nset is None:
        return None, None
    if nset.repeated and (name in _ADDS_UP or name.startswith("conv_transpose") or (
            name == "interpolate"
            and _pool_arg(args, kwargs, 3, "mode", "nearest") not in _NEAREST)):
        return _repeated_reason(name), nset
    if name in _REPEATS and _repeats(name, args, kwargs, out):
        return None, nset.as_repeated()
    if name in _POOLS and _windows_overlap(name, args, kwargs, out):
        return None, nset.as_repeated()
    return None, nset


def _windows_overlap(name: str, args, kwargs, out: Tensor) -> bool:
    """Whether the windows of a pooling overlap, so that its outputs share elements: a
    stride below the window's extent, or an adaptive pooling whose output length does not
    divide the input length."""
    n = _spatial_dims(name)
    x = args[0]
    if name.startswith("adaptive"):
        return any(length % pooled for length, pooled in zip(x.shape[-n:], out.shape[-n:]))
    kernel = _per_dim(_pool_arg(args, kwargs, 1, "kernel_size"), n)
    stride = _per_dim(_pool_arg(args, kwargs, 2, "stride") or kernel, n)
    dilation = (_per_dim(_pool_arg(args, kwargs, 4, "dilation", 1), n)
                if name.startswith("max") else (1,) * n)
    return any(s < d * (k - 1) + 1 for k, s, d in zip(kernel, stride, dilation))


def _repeats(name: str, args, kwargs, out: Tensor) -> bool:
    """Whether ``out`` holds an element of a noisy input more than once: an ``expand`` or
    ``repeat`` to more elements, a ``cat`` / ``stack`` of operands sharing a draw, a
    nearest interpolation that enlarges a dim; or whether its elements share inputs
    otherwise: any other interpolation (its windows may overlap), a transposed convolution."""
    if name == "interpolate":
        return (_pool_arg(args, kwargs, 3, "mode", "nearest") not in _NEAREST
                or any(o > i for o, i in zip(out.shape[2:], args[0].shape[2:])))
    if name.startswith("conv_transpose"):
        return True
    if name == "pad":  # reflect, replicate, circular: copies of border elements
        return _pool_arg(args, kwargs, 2, "mode", "constant") != "constant"
    if name in ("cat", "concat", "concatenate", "stack"):
        noisy = [t for t in (args[0] if args else kwargs.get("tensors", ()))
                 if _noise_of(t) is not None]
        return any(_correlated(a, b) for i, a in enumerate(noisy) for b in noisy[i + 1:])
    return isinstance(args[0], Tensor) and out.numel() > args[0].numel()


def _repeated_reason(name: str) -> str:
    return (f"{name} over a tensor that holds one Bayesian layer draw several times (after "
            "expand / repeat, cat / stack of the same tensor, an interpolation, a "
            "transposed convolution or a pooling with overlapping windows): its elements are "
            "not independent, so their variances do not add; reduce before repeating (e.g. "
            "x.sum() * k instead of x.repeat(k).sum()), or repeat after the neuron")


_COMPARISONS = frozenset({"gt", "ge", "__gt__", "__ge__", "heaviside", "sign", "lt", "le",
                          "__lt__", "__le__"})
#: Modules whose spike (surrogate) functions compare the membrane with the threshold.
_HOST_SURROGATES = ("spikingjelly.activation_based.surrogate", "snntorch.surrogate",
                    "snntorch._neurons")


def _refuse_host_neuron(func, name: str) -> None:
    """A host library's spike computation on a variance-carrying tensor: one of
    SpikingJelly's neuron kernels (``torch.library`` ops ``sj_lif::forward``, ...), or a
    comparison made by a SpikingJelly / snnTorch surrogate or neuron itself (eager mode:
    the comparison's caller). Such a neuron is not converted: it fires from the mean of a
    Bayesian layer's output and drops its variance (the layer's std would get no
    gradient).

    Raises:
        VarianceFlowError: naming the fixes.
    """
    if type(func) is torch._ops.OpOverload:
        if func.namespace[:3] != "sj_":  # (Dynamo traces no startswith on an op's namespace)
            return
        _raise_host_neuron_error("SpikingJelly", f"{func.namespace}::{name}")
    if torch.compiler.is_compiling():  # no frames to walk in a graph being traced
        return
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame = frame.f_back
    module = frame.f_globals.get("__name__", "") if frame is not None else ""
    if module.startswith(_HOST_SURROGATES):  # the comparison's own caller
        host = "SpikingJelly" if module.startswith("spikingjelly") else "snnTorch"
        owner = _surrogate_owner(frame) if host == "SpikingJelly" else None
        if owner is not None:
            _raise_surrogate_outside_neuron_error(owner, f"{name} in {module}")
        _raise_host_neuron_error(host, f"{name} in {module}")
    for _ in range(_NEURON_FRAMES):  # a surrogate of the user's own, in a host neuron
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        kind = type(owner).__module__ if isinstance(owner, nn.Module) else ""
        if kind.startswith(_HOST_NEURONS) and any(
                "NonSpiking" in c.__name__ for c in type(owner).__mro__):
            break  # a membrane readout (NonSpikingLIFNode's decoding): it fires nothing
        if kind.startswith(_HOST_NEURONS):
            _raise_host_neuron_error(
                "SpikingJelly" if kind.startswith("spikingjelly") else "snnTorch",
                f"{name} in {module or 'a function'} called by {type(owner).__name__}")
        frame = frame.f_back


#: Where the host libraries' neuron classes live (a converted neuron's class does not).
_HOST_NEURONS = ("spikingjelly.activation_based.neuron", "snntorch._neurons")
#: How many calling frames are searched for a host neuron (its fire method, the surrogate
#: module's call machinery, the user's surrogate).
_NEURON_FRAMES = 12


def _surrogate_owner(frame) -> nn.Module | None:
    """The module that called a SpikingJelly surrogate, from the surrogate's frame
    ``frame`` up: ``None`` for a SpikingJelly neuron (or where no calling module is
    found within :data:`_NEURON_FRAMES` frames), else that module (a user's module or a
    SpikingJelly one that is not a neuron, e.g. a spiking RNN cell)."""
    for _ in range(_NEURON_FRAMES):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module):
            kind = type(owner).__module__
            if not kind.startswith(_HOST_SURROGATES):  # (not the surrogate itself)
                return None if kind.startswith(_HOST_NEURONS) else owner
        frame = frame.f_back
    return None


def _raise_surrogate_outside_neuron_error(owner: nn.Module, where: str):
    raise_error(
        f"a SpikingJelly surrogate called by {type(owner).__name__} ({where}), which is "
        "not a SpikingJelly neuron, fires from an input that carries a Bayesian layer's "
        "posterior variance: it would drop the variance silently and the layer's std "
        "would get no gradient. sbnn_addons.spikingjelly converts only the surrogates of "
        "IFNode, LIFNode and ParametricLIFNode: keep the layers feeding this module "
        "deterministic (exclude= in to_sbnn), or fire through a neuron",
        VarianceFlowError)


def _raise_host_neuron_error(host: str, where: str):
    fix = ("sbnn_addons.spikingjelly.to_sbnn(model) (or surrogate_function="
           "sbnn_addons.spikingjelly.surrogate_function())" if host == "SpikingJelly"
           else "sbnn_addons.snntorch.to_sbnn(model) (or spike_grad="
           "sbnn_addons.snntorch.spike_grad())")
    raise_error(
        f"a {host} neuron that is not converted fires from an input that carries a "
        f"Bayesian layer's posterior variance ({where}): it would drop the variance "
        "silently and the layer's std would get no gradient. Convert the neuron with "
        f"{fix}, e.g. after adding it to a converted model; or keep the layers feeding it "
        "deterministic (exclude= in to_sbnn)", VarianceFlowError)


def variance_flow() -> contextlib.AbstractContextManager:
    """Context manager kept for existing code: a no-op. The variance flows wherever a
    :class:`VarianceTensor` goes, with or without it."""
    return contextlib.nullcontext()


def no_variance_flow() -> contextlib.AbstractContextManager:
    """Context manager: inside the block, operations on a :class:`VarianceTensor` act on
    its mean alone and return plain tensors (code that tracks a variance explicitly)."""
    return torch._C.DisableTorchFunctionSubclass()


_FLOW_STATE = "_sbnn_flow"  # per tracked root: {"check_inputs": bool}


# Module-level functions, the same objects for every tracked model: a compiled step that
# is reused across models guards on its hooks' identity and would recompile per model.
def _flow_enter(module, args, kwargs=None):
    """Pre-hook of a tracked root module (``with_kwargs``: a membrane passed by keyword
    is checked too; ``kwargs`` is ``None`` for a model pickled with the hook registered
    without it): input checks and one :func:`share_posterior` block per call (module
    doc)."""
    state = module.__dict__[_FLOW_STATE]
    if state["check_inputs"]:
        check_model_input(module, args, kwargs)
    if torch.compiler.is_compiling():  # the cache is eager-only; a graph shares s^2 itself
        return
    if state["check_inputs"] and check_finite.enabled():
        check_model_parameters(module, state)
    if _OPEN_FLOWS:
        _close_stale_flows(module)
    if not _OPEN_FLOWS:  # an outermost forward: what earlier ones recorded is done with
        _clear_draw_records()
    state["marks"] = (len(_DRAWN), len(_CONSUMED), len(_ESCAPED), _functorch_level())
    # one forward of the root module is one share_posterior block: a time loop in the
    # model's forward computes each layer's s^2 once
    share = share_posterior()
    share.__enter__()
    _OPEN_FLOWS.append((weakref.ref(module), share))


def _flow_leave(module, args, output):
    if torch.compiler.is_compiling():
        return
    # spikes drawn without a layer's noise are wrong with or without gradients
    _check_dropped_noise(module, output)
    if module.training and torch.is_grad_enabled():
        _check_unused_noise(module, output)
    if not _OPEN_FLOWS:
        return
    ref, share = _OPEN_FLOWS[-1]
    if ref() is module:
        _OPEN_FLOWS.pop()
        share.__exit__(None, None, None)
        if not _OPEN_FLOWS:
            _clear_draw_records()


def _clear_draw_records() -> None:
    _DRAWN.clear()
    _CONSUMED.clear()
    _ESCAPED.clear()


def _tensors_in(output) -> list[Tensor]:
    """The tensors of a forward's output (a tensor, or nested tuples / lists / dicts)."""
    found, stack = [], [output]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
        elif isinstance(item, Tensor):
            found.append(item)
    return found


def _drop_found(pending: dict, nsets) -> None:
    """Remove from ``pending`` (token -> record) the tokens the noise sets ``nsets`` hold
    (a walk pruned by the tokens' interval)."""
    for nset in nsets:
        if not pending:
            return
        lo, hi = min(pending), max(pending)
        stack = [nset]
        while stack:
            node = stack.pop()
            if node.hi < lo or node.lo > hi:
                continue
            if node.parts is None:
                pending.pop(node.lo, None)
            else:
                stack.extend(node.parts)


def _reaches(outputs: list[Tensor], targets: set) -> set:
    """The autograd nodes among ``targets`` that the graphs of ``outputs`` contain."""
    seen, hit = set(), set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack and len(hit) < len(targets):
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in targets:
            hit.add(node)
        stack.extend(fn for fn, _ in node.next_functions)
    return hit


def _check_dropped_noise(model: nn.Module, output) -> None:
    """After a tracked forward: raise where a Bayesian layer drew noise in it
    whose variance no spike function (nor any reader of the variance) received and the
    output does not carry, while the layer's values went on: its mean reached the output
    without the variance (``x.as_subclass(torch.Tensor)``, ``torch.Tensor(x)``, a forward
    pre-hook of the neuron returning such a tensor), or they left the flow by ``.data``,
    ``.tolist()``, ``.numpy()`` or DLPack, or through the end of a ``torch.vmap`` (or other
    ``torch.func`` transform) run inside the forward, whose output is a plain tensor
    (SpikingJelly's ``t_last_seq_to_ann_forward``). A layer whose output nothing used (an
    unused branch) is not reported. The layer's last draw in the forward is checked.
    Without gradients (a ``sample``-mode evaluation) the escapes and transforms are found,
    a mean that reached the output as a plain tensor is not (no graph to follow).

    Raises:
        VarianceFlowError: naming the layers and the fix.
    """
    marks = model.__dict__.get(_FLOW_STATE, {}).get("marks")
    if marks is None or len(_DRAWN) <= marks[0]:
        return
    pending = {}
    for layer, token, grad_fn, level in _DRAWN[marks[0]:]:
        pending[id(layer)] = (token, layer, grad_fn, level)  # the layer's last draw
    pending = {token: (layer, grad_fn, level)
               for token, layer, grad_fn, level in pending.values()}
    _drop_found(pending, reversed(_CONSUMED[marks[1]:]))
    if not pending:
        return
    outputs = _tensors_in(output)
    _drop_found(pending, [t.__dict__["noise"] for t in outputs
                          if type(t) is VarianceTensor and "noise" in t.__dict__])
    if not pending:
        return
    escaped = dict(pending)
    _drop_found(escaped, _ESCAPED[marks[2]:])  # what is left did not escape
    hit = _reaches(outputs, {g for _, g, _ in pending.values() if g is not None})
    why = {
        "escaped": "its values left the variance flow by .data, .tolist(), .numpy() or DLPack",
        "transform": "it ran inside a torch.vmap / torch.func transform, whose output is a "
                     "plain tensor (e.g. SpikingJelly's t_last_seq_to_ann_forward)",
        "plain": "its mean reached the output without its variance",
    }
    dropped = []
    for token, (layer, grad_fn, level) in pending.items():
        if token not in escaped:
            dropped.append((layer, "escaped"))
        elif level > marks[3]:  # a transform inside the forward ended: its values go on
            dropped.append((layer, "transform"))
        elif grad_fn in hit:
            dropped.append((layer, "plain"))
    if not dropped:
        return
    names = {id(m): n for n, m in model.named_modules()}
    which = ", ".join(f"{names.get(id(layer), type(layer).__name__)!r} ({why[reason]})"
                      for layer, reason in dropped)
    raise VarianceFlowError(
        f"in this forward of {type(model).__name__}, the weight noise of the "
        f"Bayesian layer(s) {which} reached no spiking neuron: something between the layer "
        "and the neuron made a plain tensor of its output (x.as_subclass(torch.Tensor), "
        "torch.Tensor(x), x.data, torch.tensor(x.tolist()), a numpy round trip, e.g. in a "
        "forward pre-hook of the neuron; torch.vmap), or set it as a neuron's membrane "
        "(node.v = layer(x): a converted SpikingJelly neuron starts a membrane set by hand "
        "without variance), so the neuron fired without the noise "
        "and the layer's std_rho would get no gradient. Pass the layer's output on as a "
        "tensor (torch operations on it keep its variance: x.detach() too; run the layer "
        "outside torch.vmap, or the vmap over the neuron too); to leave a layer's "
        "noise out on purpose, make it deterministic (exclude= in to_sbnn) or drop it with "
        "sbnn_addons.moments.plain(x)")


def noisy_output_layers(model: nn.Module, output, *, unknown: bool = False) -> list[str]:
    """Qualified names of ``model``'s Bayesian layers whose noise (a variance, or the
    ``mean``-mode probe) the output of its last forward still carries: readouts, whose
    noise reaches no spiking neuron. ``output``: a tensor, or a (nested) tuple / list /
    dict of them; ``unknown``: count an :class:`UnknownVariance` too. Eager mode (the
    layers remember their last draw)."""
    kinds = (Tensor, ScaledVariance, UnknownVariance) if unknown else (Tensor, ScaledVariance)
    tokens: set[int] = set()
    for item in _tensors_in(output):
        if type(item) is VarianceTensor and (item.probe or isinstance(item.variance, kinds)):
            nset = item.__dict__.get("noise")
            if nset is not None:
                tokens |= _leaf_tokens(nset)
    if not tokens:
        return []
    return [n for n, m in model.named_modules()
            if _is_bayesian_layer(m) and m.__dict__.get("_sbnn_draw") in tokens]


def _running_root() -> nn.Module | None:
    """The tracked model whose eager forward is running, innermost; ``None`` while a
    graph is traced (a compiled forward opens no flow: an entry left by an eager forward
    that raised belongs to another call, and reading its modules would break the
    graph)."""
    if torch.compiler.is_compiling() or not _OPEN_FLOWS:
        return None
    return _OPEN_FLOWS[-1][0]()


def noise_sources(x: Tensor, module: nn.Module) -> tuple[str | None, list[str]]:
    """For error messages: the qualified name of ``module`` in the tracked model whose
    forward is running, and the names of the Bayesian layers whose draws ``x`` carries
    (eager mode; ``(None, [])`` where no tracked forward is running), also where that
    variance became unknown on the way."""
    root = _running_root()
    if root is None:
        return None, []
    names = {id(m): n for n, m in root.named_modules()}
    return names.get(id(module)), noisy_output_layers(root, x, unknown=True)


def refuse_membrane_input(x: Tensor, consumer: nn.Module, what: str) -> None:
    """Refuse ``x`` as the input of ``consumer`` (a Bayesian layer, or a neuron's input
    current) where it is a noisy membrane that a neuron returned in eager mode, or was
    computed from one (:func:`~sbnn_addons.base.noisy_membrane_behind`): that membrane
    is a plain tensor whose noise variance the neuron keeps, so ``consumer`` would take
    it as noise-free (a compiled step carries the variance on the membrane, and refuses
    it at a Bayesian layer).

    Args:
        x: the input.
        consumer: the module it is given to.
        what: what ``x`` is to ``consumer``, for the message (``"the input"``).

    Raises:
        VarianceFlowError: naming both modules and the fix.
    """
    last, version = _LAST_DRAW[0]
    if last() is x:
        with torch._C.DisableTorchFunctionSubclass():
            if version is None or x._version == version:  # a layer's output as it is:
                return  # its input was checked
    neuron = noisy_membrane_behind(x)
    if neuron is None:
        return
    root = _running_root()
    names = {} if root is None else {id(m): n for n, m in root.named_modules()}
    this, source = names.get(id(consumer)), names.get(id(neuron))
    where = f" ({this!r})" if this else ""
    which = f"neuron {source!r}" if source else f"a {type(neuron).__name__}"
    raise VarianceFlowError(
        f"{what} of {type(consumer).__name__}{where} is the membrane of {which}, or was "
        "computed from it: a neuron's membrane (returned by a step, or kept as node.v) "
        "is a plain tensor whose noise variance (of the Bayesian layers feeding that "
        "neuron) the neuron keeps, so "
        f"{type(consumer).__name__} would take it as noise-free and the noise would vanish "
        "silently. Feed it the neuron's spikes instead, or keep the layers feeding "
        f"{which} deterministic (exclude= in to_sbnn)")


def _check_unused_noise(model: nn.Module, output) -> None:
    """Warn (once per model) when a training forward's output still carries the variance
    of a Bayesian layer's draw directly: that noise reached no spiking neuron (a readout
    feeding the loss), so it does not act and its std gets no gradient. A membrane a
    neuron returns carries a variance of its own (the neuron's state, whose noise its
    spikes used): not warned about."""
    state = model.__dict__.get(_FLOW_STATE)
    if state is None or state.get("warned_readout"):
        return
    items = output if isinstance(output, (tuple, list)) else (output,)
    # an unknown variance too: a membrane readout sums a multi-step layer's one draw over
    # the steps (NonSpikingLIFNode), which the flow cannot follow
    noisy = [t for t in items if type(t) is VarianceTensor and isinstance(
        t.variance, (Tensor, ScaledVariance, UnknownVariance))]
    if not noisy:
        return
    names = noisy_output_layers(model, noisy, unknown=True)
    if not names:  # a neuron's state (a membrane record): its noise did meet a spike
        return
    state["warned_readout"] = True
    which = f" ({', '.join(repr(n) for n in names)})"
    fix = repr(names)
    warnings.warn(
        f"the output of {type(model).__name__} carries the weight noise of Bayesian "
        f"layers{which} that feed no spiking neuron (a readout whose output goes to the loss "
        "as it is): there the noise does not act (the output is its mean) and its std gets "
        "no gradient. Leave the "
        f"readout deterministic, to_sbnn(model, exclude={fix}) (the released "
        "configuration's readouts are deterministic)",
        UserWarning, stacklevel=3)


#: The open share_posterior blocks of tracked roots, innermost last: (root, block).
_OPEN_FLOWS: list = []
_CALL_CODES = (nn.Module._call_impl.__code__, nn.Module._wrapped_call_impl.__code__)


def _close_stale_flows(entering: nn.Module) -> None:
    """Close the blocks left open by forwards that raised (the hook after a forward does
    not run then): those of ``entering`` (whose forward starts now) and of roots whose
    forward is no longer on the call stack. Until closed, such a block would share its
    ``s^2`` cache with every later forward of any model. The auxiliary terms such a root
    collected are dropped too (:func:`_drop_aborted_aux_terms`)."""
    running = set()
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in _CALL_CODES:
            running.add(id(frame.f_locals.get("self")))
        frame = frame.f_back
    while _OPEN_FLOWS:
        root = _OPEN_FLOWS[-1][0]()
        if root is not None and root is not entering and id(root) in running:
            break
        _OPEN_FLOWS.pop()[1].__exit__(None, None, None)
        if root is not None:
            _drop_aborted_aux_terms(root)
    if not _OPEN_FLOWS:
        _clear_draw_records()


def _drop_aborted_aux_terms(root: nn.Module) -> None:
    """Drop the auxiliary terms the spike functions of ``root`` hold after one of its
    forwards raised: they belong to the aborted step (its inputs, its graph) and would
    be added to the next step's :func:`~sbnn_addons.aux_loss`, silently."""
    for m in root.modules():
        if m.__dict__.get("_aux_terms"):
            m._aux_terms = []
            m._aux_stale = False


def _probe_source(module, args, output):
    """Forward hook of a Bayesian layer: in ``mean`` mode its output carries no variance;
    mark it with the probe if the layer is noisy in ``sample`` mode. A layer that a
    conversion with ``inplace=True`` replaced shares the converted one's hooks (see
    ``sbnn_addons.layers._adopt_hooks``): it is a plain layer, for which this does
    nothing."""
    if (isinstance(output, Tensor) and type(output) is not VarianceTensor
            and _is_bayesian_layer(module) and module.deterministic
            and _noisy_in_sample_mode(module)):
        return new_draw(_wrap(output, None, True), module)
    return None


def _probe_pass(module, args, output):
    """Forward hook of a pass-through module: the probe of its input goes on."""
    if (isinstance(output, Tensor) and args and type(args[0]) is VarianceTensor
            and args[0].probe and type(output) is not VarianceTensor):
        return _wrap(output, None, True)
    return None


def refuse_variance(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a host neuron left out of a conversion (``exclude``): a Bayesian
    layer's variance (or, in ``mean`` mode, its probe) must not reach it, since the neuron
    would drop it silently.

    Raises:
        VarianceFlowError: the neuron's input carries a variance; the message says to
            exclude the layers feeding it as well.
    """
    x = args[0] if args else None
    if type(x) is VarianceTensor:
        raise_error(
            f"{type(module).__name__} was excluded from the conversion but its input comes "
            "from a Bayesian layer (it carries a posterior variance that this neuron would "
            "drop); exclude the layers feeding it as well", VarianceFlowError)


def in_checked_model() -> bool:
    """Whether the caller runs inside a call of a model whose input is checked at its entry
    (:func:`track_variance` with ``check_inputs=True``: a converted model), so that a
    module inside it need not check its own input again. Eager mode: an open variance
    flow; while ``torch.compile`` traces: a traced module (read at trace time)."""
    if torch.compiler.is_compiling():
        return _traced_in_checked_model()
    for ref, _share in _OPEN_FLOWS:
        root = ref()
        if root is not None and root.__dict__.get(_FLOW_STATE, {}).get("check_inputs"):
            return True
    return False


@torch.compiler.assume_constant_result
def _traced_in_checked_model() -> bool:
    """:func:`in_checked_model` while tracing (run in Python, a constant of the graph): a
    converted model is being called, whose pre-hook checked its input (another of its
    methods, e.g. a compiled ``net.chunk``, checks nothing: the callee checks, as in
    eager mode)."""
    _note_traced(_traced_modules())
    return any(m.__dict__.get(_FLOW_STATE, {}).get("check_inputs")
               for m in _traced_modules(calls_only=True))


#: module -> the code object of the outermost frame of a graph traced with a method of the
#: module in it (its hooks as they were then; see :func:`track_variance`)
_TRACED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _note_traced(modules: list[nn.Module]) -> None:
    """While ``torch.compile`` traces (in Python): remember that methods of ``modules``
    are traced into the graph, with the code of its outermost frame."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx().output.current_tx
        while getattr(tx, "parent", None) is not None:
            tx = tx.parent
        code = tx.f_code
    except (AttributeError, ImportError, RuntimeError, TypeError):
        return
    for m in modules:
        _TRACED[m] = code


def _traced_before(module: nn.Module) -> bool:
    """Whether a graph that Dynamo still holds was traced with a method of ``module`` in
    it (``torch._dynamo.reset()`` forgets every graph)."""
    code = _TRACED.get(module)
    if code is None:
        return False
    try:
        from torch._dynamo import convert_frame

        return code in convert_frame.input_codes
    except (AttributeError, ImportError, TypeError):  # another PyTorch: assume it is held
        return True


#: The noise scales of a Bayesian layer or spike function (a parameter or a buffer).
_NOISE_SCALES = ("std_rho", "fixed_std", "bias_std_rho")
#: The posterior means of a Bayesian layer (``*_orig``: those of a layer pruned with
#: ``torch.nn.utils.prune``, whose ``weight`` is recomputed from it at each call).
_MEANS = ("weight", "bias", "weight_orig", "bias_orig")


def check_noise_scales(module: nn.Module, *, means: bool = False) -> None:
    """Raise if a noise scale of ``module`` (a Bayesian layer's or a spike function's
    ``std_rho``, ``fixed_std``, ``bias_std_rho``) holds NaN / inf: its variance would be
    NaN, and the spikes drawn with it at random or never, silently. With ``means``, the
    posterior means (a Bayesian layer's ``weight`` and ``bias``) too: every output they
    reach would be NaN / inf. Skipped where :class:`~sbnn_addons.check_finite` is off,
    and inside a converted model (:func:`check_model_parameters` checks them at its
    entry, in eager mode). While ``torch.compile`` traces, the noise scales are runtime
    asserts in the graph, inside a converted model too (a
    ``RuntimeError``; the means are left to the layer's output assert). Each tensor is
    tested again only when its version or storage changed (an optimiser step,
    ``load_state_dict``, an in-place edit, ``param.data = ...``; an in-place edit of
    ``param.data`` is not seen): on an accelerator one read-back per change.

    Raises:
        ValueError: naming the module, the tensor and the fix.
    """
    if not check_finite.enabled():
        return
    params, buffers = module._parameters, module._buffers
    if torch.compiler.is_compiling():  # runtime asserts (a layer's output covers its means)
        # (inside a converted model too: its entry's check of its parameters is eager-only;
        # no test of id(module): a graph would be specialised to the module)
        for name in _NOISE_SCALES:
            scale = params[name] if name in params else buffers.get(name)
            if scale is not None:  # (the message is traced at every call: only where used)
                assert_finite(scale, f"{type(module).__name__}.{name} (a noise scale) holds "
                                     f"NaN / inf values: {_NOISE_FIX}")
        return
    if in_checked_model():
        return
    names = _NOISE_SCALES + _MEANS if means else _NOISE_SCALES
    check_finite_once(
        module, [(n, params[n] if n in params else buffers.get(n)) for n in names
                 if n in params or n in buffers], "_sbnn_noise_checked",
        lambda name, nan, inf: (
            f"{type(module).__name__}.{name} "
            f"({'the posterior mean' if name in _MEANS else 'a noise scale'}) holds NaN / "
            f"inf values ({nan} NaN, {inf} inf): "
            + ("every output it reaches would be NaN / inf and train on into NaN "
               "gradients, silently. " + _RESTORE if name in _MEANS else _NOISE_FIX)))


_RESTORE = ("Restore it (a checkpoint, or module.reset_parameters()) and remove the "
            "cause (a NaN loss or gradient: clip the gradients, lower the learning rate); "
            "to skip this check for speed use sbnn_addons.check_finite(False)")
_NOISE_FIX = ("the noise variance would be NaN and the spikes drawn with it at random or "
              "never, silently. " + _RESTORE)


def check_finite_once(module: nn.Module, tensors: list[tuple[str, Tensor | None]],
                      cache: str, message: Callable[[str, int, int], str]) -> None:
    """Raise ``ValueError(message(name, n_nan, n_inf))`` for the first of ``tensors``
    (``(name, tensor)`` pairs of ``module``'s; ``None``, meta and ``torch.func``-wrapped
    tensors skipped) that holds NaN / inf. Tested again only when a tensor's version (or
    identity) changed since the last passing check, which ``module.__dict__[cache]``
    remembers: one read-back (for all of them) per optimiser step, ``load_state_dict``,
    in-place edit or new storage (``param.data = ...``, ``module.to(...)``); an in-place
    edit of ``param.data`` bumps no version and is not seen."""
    tensors = [(n, t) for n, t in tensors if t is not None and not t.is_meta
               and not torch._C._functorch.is_functorch_wrapped_tensor(t)]
    key = tuple((id(t), t.data_ptr(), None if t.is_inference() else t._version)
                for _, t in tensors)
    if not tensors or module.__dict__.get(cache) == key:
        return
    found = _first_nonfinite(tensors)
    if found is not None:
        name, t = found
        raise ValueError(message(name, int(torch.isnan(t).sum()), int(torch.isinf(t).sum())))
    module.__dict__[cache] = key


def _first_nonfinite(tensors: list[tuple], nan_only: Callable[[str], bool] | None = None):
    """The first entry ``(name, tensor, ...)`` of ``tensors`` whose tensor holds NaN / inf
    (NaN alone where ``nan_only(name)``), or ``None``: one reduction per tensor, stacked,
    so one read-back (on an accelerator, one device sync) for all of them."""
    with torch.no_grad():
        device = tensors[0][1].device
        flags = torch.stack([
            (~torch.isnan(t).any() if nan_only is not None and nan_only(n)
             else torch.isfinite(t).all()).to(device) for n, t, *_ in tensors])
        if bool(flags.all()):
            return None
        return next(nt for nt, ok in zip(tensors, flags.tolist()) if not ok)


def check_model_input(model: nn.Module, args: tuple, kwargs: dict | None = None) -> None:
    """Check the arguments of a converted model's call: the first tensor (positional,
    else the first passed by keyword) has no zero-size dimension (``T = 0`` or a batch of
    0) and, unless :class:`~sbnn_addons.check_finite` is off, no NaN / inf; every other
    tensor (a membrane passed in, ``net(x, mem1, mem2)`` or ``net(x, mem=mem)``) no NaN,
    since the spike functions inside the model skip their own check.

    Raises:
        ValueError: naming the problem.
    """
    tensors = [(i, a) for i, a in enumerate(args) if isinstance(a, Tensor)]
    tensors += [(repr(k), a) for k, a in (kwargs or {}).items() if isinstance(a, Tensor)]
    if not tensors:
        return
    where = f"the converted model ({type(model).__name__})"
    x = tensors[0][1]
    refuse_data_dependent_shape(x, where)
    if x.dim() and 0 in x.shape:
        raise_error(
            f"the input of {where} has shape {concrete_shape(x)}, with a zero-size dimension "
            "(a sequence of T = 0 steps or a batch of 0 examples); there is nothing to run: "
            "skip empty inputs before calling the model", ValueError)
    check_input(x, where)
    for i, a in tensors[1:]:
        check_input(a, f"{where}, its argument {i},", nan_only=True)


#: Buffers whose values are constants of the model (not a neuron's state, which changes
#: at every step): checked for NaN / inf with the parameters.
_CONSTANT_BUFFERS = frozenset(("fixed_std", "beta", "threshold", "graded_spikes_factor",
                               "running_mean", "running_var"))


def _checked_tensors(model: nn.Module) -> list[tuple[str, Tensor, dict, str]]:
    """``(name, tensor, the dict of its module that holds it, its name there)`` for each
    floating parameter and constant buffer of ``model`` (a shared one once; one on the
    ``meta`` device too, never tested, so that its replacement is seen)."""
    out, seen = [], set()
    for prefix, module in model.named_modules():
        for store, constants_only in ((module._parameters, False), (module._buffers, True)):
            for local, t in store.items():
                if (t is None or id(t) in seen
                        or (constants_only and local not in _CONSTANT_BUFFERS)
                        or type(t) not in (Tensor, nn.Parameter) or not t.is_floating_point()
                        or t.is_inference()
                        or torch._C._functorch.is_functorch_wrapped_tensor(t)):
                    continue
                seen.add(id(t))
                out.append((f"{prefix}.{local}" if prefix else local, t, store, local))
    return out


def _finite_key(tensors: list[tuple[str, Tensor, dict, str]]) -> tuple | None:
    """What tells whether the tensors changed: each one's version and storage (an
    assignment ``param.data = ...``, as ``model.to(...)`` makes, moves no version
    counter); ``None`` where one of them is no longer its module's (replaced by
    ``load_state_dict(..., assign=True)`` or a new ``nn.Parameter`` assigned)."""
    key = tuple((t._version, t.data_ptr()) if store.get(local) is t else None
                for _, t, store, local in tensors)
    return None if None in key else key


def check_model_parameters(model: nn.Module, state: dict) -> None:
    """Raise if a floating parameter (or a constant buffer: a fixed noise std, a neuron's
    ``beta`` / ``threshold``, BatchNorm statistics) of a converted model holds NaN / inf
    (NaN only for a threshold: an infinite one is a readout that never fires):
    a NaN weight or noise scale fires no spike and trains on into NaN gradients while the
    model's input and output stay finite. The tensors are tested again only when one's
    version or storage changed (an optimiser step, ``load_state_dict``, an in-place edit,
    ``param.data = ...``; an in-place edit of ``param.data`` is not seen): one
    reduction per tensor and, on an accelerator, one read-back per such call. The model's
    tensors are listed again after each ``torch.optim`` step and where one of them was
    replaced (``load_state_dict(..., assign=True)``, a new ``nn.Parameter`` assigned).
    ``state``: the model's flow state (the list and the versions found finite are kept
    there).

    Raises:
        ValueError: naming the first non-finite tensor, the count and the fix.
    """
    from .optim import OPTIMIZER_STEPS

    entry = state.get("finite")
    versions = None
    if entry is not None and entry[0] == OPTIMIZER_STEPS[0]:
        versions = _finite_key(entry[1])
    if versions is None:  # first call, an optimiser step, or a tensor replaced
        entry = state["finite"] = [OPTIMIZER_STEPS[0], _checked_tensors(model), None]
        versions = _finite_key(entry[1])
    if versions == entry[2]:
        return
    tensors = entry[1]
    if entry[2] is not None:
        tensors = [nt for nt, old, new in zip(tensors, entry[2], versions) if old != new]
    tensors = [nt for nt in tensors if not nt[1].is_meta]  # no values to test
    if tensors:
        # an infinite threshold is a membrane readout that never fires: NaN only
        found = _first_nonfinite(tensors, lambda n: n.rsplit(".", 1)[-1] == "threshold")
        if found is not None:
            name, t, *_ = found
            _nonfinite_parameter(model, name, t)
    entry[2] = versions


def _nonfinite_parameter(model: nn.Module, name: str, t: Tensor) -> NoReturn:
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    kind = "parameter" if isinstance(t, nn.Parameter) else "buffer"
    raise ValueError(
        f"the {kind} {name!r} of the converted model ({type(model).__name__}) contains "
        f"{nan} NaN and {inf} inf values (shape {tuple(t.shape)}): its neurons would fire "
        "no spike (or at random) and train on into NaN gradients, silently. Restore it (a "
        "checkpoint) and remove the cause (a NaN loss or gradient: clip the gradients, "
        "lower the learning rate); to skip this check for speed use "
        "sbnn_addons.check_finite(False)")


_FLOW_HOOKS = (_flow_enter, _flow_leave, _probe_source, _probe_pass, _opaque_output)


def track_variance(model: nn.Module, opaque=(), *, check_inputs: bool = False) -> nn.Module:
    """Install the variance flow's forward hooks on ``model``.

    The variance itself flows wherever a :class:`VarianceTensor` goes; the hooks add, per
    call of ``model``: the input checks, one :func:`~sbnn_addons.base.share_posterior`
    block (each layer's ``s^2`` computed once per forward in eager mode), and the
    ``mean``-mode probe of :func:`check_variance_flow` at every Bayesian layer and
    pass-through module.

    Args:
        model: the root module.
        opaque: accepted for compatibility and ignored (a neuron that tracks its variance
            explicitly runs its own update with :func:`no_variance_flow`).
        check_inputs: check the input of each (outermost) call with
            :func:`check_model_input` (empty shapes, and NaN / inf unless
            :class:`~sbnn_addons.check_finite` is off); the adapters turn it on.

    Idempotent; the adapters call it on the converted model. A compiled model
    (``torch.compile(net)``) gets the hooks on the model it wraps, where a copy keeps them.
    Returns ``model``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``check_inputs`` is not a bool (a
            string such as ``"no"`` turned the checks on).
        RuntimeError: ``check_inputs=True`` for a model without the hooks that a graph
            ``torch.compile`` still holds has already traced (``torch.compile(net)``
            called, or a compiled step calling ``net``): that graph would run without
            the checks, silently. Install them before the first compiled call.
    """
    check_module(model, "track_variance")
    check_inputs = check_flag("check_inputs", check_inputs)
    root = compiled_wrapped(model)
    if getattr(root, "_sbnn_flow_handles", None):
        return model
    if check_inputs and _traced_before(root):
        raise RuntimeError(
            f"track_variance(check_inputs=True): torch.compile has already traced "
            f"{type(root).__name__} without the input checks, and a compiled graph does not "
            "see forward hooks added after it was traced (Dynamo does not guard on module "
            "hooks), so its calls would skip the checks silently. Call track_variance "
            "before the first compiled call (right after building the model), or run "
            "torch._dynamo.reset() first, which makes every graph trace again")
    root.__dict__[_FLOW_STATE] = {"check_inputs": check_inputs}
    handles = [
        root.register_forward_pre_hook(_flow_enter, with_kwargs=True),
        # not always_call: that registry is keyed by global hook ids, which a compiled
        # step would guard on (one recompile per model); _flow_enter closes a block left
        # open by a forward that raised
        root.register_forward_hook(_flow_leave),
    ]
    for m in root.modules():  # the mean-mode probe (see the module doc)
        if _is_bayesian_layer(m):
            handles.append(m.register_forward_hook(_probe_source))
        elif _is_passthrough(m):
            handles.append(m.register_forward_hook(_probe_pass))
        elif _opaque_reason(m) is not None:
            handles.append(m.register_forward_hook(_opaque_output))
    root._sbnn_flow_handles = tuple(handles)
    return model


def untrack_variance(model: nn.Module) -> nn.Module:
    """Remove the hooks installed by :func:`track_variance` (from every submodule)."""
    check_module(model, "untrack_variance")
    for m in model.modules():
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for key in [k for k, h in hooks.items() if h in _FLOW_HOOKS]:
                del hooks[key]
                m._forward_hooks_always_called.pop(key, None)
                m._forward_pre_hooks_with_kwargs.pop(key, None)
        m.__dict__.pop(_FLOW_STATE, None)
    model.__dict__.pop("_sbnn_flow_handles", None)
    compiled_wrapped(model).__dict__.pop("_sbnn_flow_handles", None)
    return model


def _snapshot(model: nn.Module) -> list[tuple[nn.Module, dict, dict | None, dict, bool]]:
    """Each module's buffers (snnTorch membranes, BatchNorm statistics), SpikingJelly
    memories, ``_sbnn*`` instance state and train flag, by reference."""
    out = []
    for m in model.modules():
        memories = getattr(m, "_memories", None)
        out.append((m, dict(m._buffers),
                    dict(memories) if isinstance(memories, dict) else None,
                    {k: v for k, v in m.__dict__.items() if k.startswith("_sbnn")},
                    m.training))
    return out


def _restore(snapshot) -> None:
    for m, buffers, memories, own, training in snapshot:
        m._buffers.clear()
        m._buffers.update(buffers)
        if memories is not None and isinstance(getattr(m, "_memories", None), dict):
            m._memories.clear()
            m._memories.update(memories)
        for k in [k for k in m.__dict__ if k.startswith("_sbnn") and k not in own]:
            del m.__dict__[k]
        m.__dict__.update(own)
        m.training = training


def check_variance_flow(
    model: nn.Module,
    example_input,
    *,
    forward: Callable[[nn.Module, object], object] | None = None,
) -> VarianceFlowReport:
    """Check, right after a conversion, that every operation between a Bayesian layer and
    a neuron has a variance rule.

    Runs one forward ``forward(model, example_input)`` (default ``model(example_input)``)
    under ``torch.no_grad()`` in ``mean`` mode with ``model.eval()``: the noise of every
    Bayesian layer is followed as a probe (see the module doc), so the check costs about
    one deterministic forward and draws no random numbers. An operation without a rule
    whose output reaches a neuron makes that neuron raise, exactly as it would in
    ``sample`` mode at the first training step. Afterwards the model is as before: its
    modes, train flags, buffers (neuron membranes, BatchNorm statistics) and SpikingJelly
    memories are restored, and a model without the flow (:func:`track_variance`) has it
    only for the check.

    Args:
        model: a converted model, or any model with Bayesian layers.
        example_input: what one call of the model takes: ``[B, ...]`` for one step of a
            step-wise model (an snnTorch ``nn.Sequential`` with ``init_hidden=True``, a
            SpikingJelly single-step model), ``[T, B, ...]`` for a model that loops over
            time itself or runs multi-step. A batch of one is enough.
        forward: ``(model, example_input) -> anything``, for a model whose call is not
            ``model(example_input)``.

    A compiled model (``torch.compile(net)``, ``net.compile()``) is checked on the model
    it wraps, called eagerly (``forward`` gets that model): the probes do not run in a
    compiled graph.

    Returns:
        :class:`VarianceFlowReport`: the operations the noise went through (with a rule)
        and those without a rule that reached no neuron.

    Raises:
        VarianceFlowError: an operation without a variance rule feeds a neuron; the
            message names it.
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``model`` has no SBNN part (no Bayesian layer, no
            :class:`~sbnn_addons.IWSTSpike`): a host model not converted yet.
    """
    check_module(model, "check_variance_flow")
    if not any(isinstance(m, SBNNModule) for m in model.modules()):
        raise ValueError(
            f"check_variance_flow: {type(model).__name__} has no SBNN layer or spike "
            "function (no Bayesian layer, no IWSTSpike), so there is no noise to follow and "
            "the check would pass without checking anything. Convert the model first with "
            "sbnn_addons.snntorch.to_sbnn(model) or sbnn_addons.spikingjelly.to_sbnn(model) "
            "(or build it from sbnn_addons' layers), then check the converted model")
    with eager_calls(model) as net:  # a compiled model: the probes run in eager calls
        return _check_flow(net, example_input, forward)


def _check_flow(model: nn.Module, example_input, forward) -> VarianceFlowReport:
    """:func:`check_variance_flow` on a model whose calls run eagerly."""
    call = forward if forward is not None else (lambda m, x: m(x))
    tracked = bool(getattr(model, "_sbnn_flow_handles", None))
    report = VarianceFlowReport(
        tracked=tracked,
        bayesian_layers=sum(1 for m in model.modules() if _is_bayesian_layer(m)))
    modes = [(m, m.sbnn_mode) for m in model.modules() if isinstance(m, SBNNModule)]
    snapshot = _snapshot(model)
    try:
        if not tracked:
            track_variance(model)
        for m, _ in modes:
            m.sbnn_mode = "mean"
        model.eval()
        _REPORTS.append(report)
        with torch.no_grad():
            out = call(model, example_input)
        report.readouts = noisy_output_layers(model, out)
    except VarianceFlowError as err:
        raise VarianceFlowError(
            f"{err} [found by sbnn_addons.check_variance_flow on {type(model).__name__}]"
        ) from err
    finally:
        if _REPORTS and _REPORTS[-1] is report:
            _REPORTS.pop()
        if not tracked:
            untrack_variance(model)
        for m, old in modes:
            m.sbnn_mode = old
        _restore(snapshot)
    return report
