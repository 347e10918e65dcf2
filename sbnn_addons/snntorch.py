"""snnTorch adapter: convert an existing snnTorch model into a Spiking Bayesian network.

.. code-block:: python

    import snntorch as snn
    from sbnn_addons.snntorch import to_sbnn, to_snntorch, reset

    sbnn = to_sbnn(net)            # Linear/Conv -> Bayes*, spike_grad -> IWSTSpike, reset fix
    ...train sbnn as the original...
    plain = to_snntorch(sbnn)      # back to plain snnTorch (posterior means, original surrogate)

What the conversion does (Method page, sections 2-3):

* ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` (including ``RLeaky.recurrent``) become
  :class:`~sbnn_addons.BayesLinear` / ``BayesConv1d`` / ``BayesConv2d`` whose ``.weight`` is
  the original weight (posterior mean). They attach the local-reparameterisation variance
  ``var(a) = s^2 sum_i x_i^2`` to their output.
* Every ``snn.Leaky`` / ``snn.RLeaky`` gets an :class:`~sbnn_addons.IWSTSpike` as
  ``spike_grad``. The neuron's own update ``U_t = beta U_{t-1} + I_t - S_{t-1} theta``
  takes a :class:`~sbnn_addons.moments.VarianceTensor` current, and the spike function
  sees ``V_t = beta^2 V_{t-1} + var_t`` (``+ var`` of the recurrent current for
  ``RLeaky``).
* The reset uses **the emitted spike**: snnTorch computes the reset by calling
  ``spike_grad`` a second time, which for a stochastic spike would be an independent
  draw. The neurons are switched to :class:`SBNNLeaky` / :class:`SBNNRLeaky`, which cache
  the spike together with the membrane it came from and return it as the reset.

This module imports snnTorch; ``import sbnn_addons`` does not import it.
"""

from __future__ import annotations

import copy
import functools
import sys
from collections.abc import Sequence

import snntorch as snn
import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from . import kernels
from . import moments as _moments
from .base import (
    HostObject,
    _raise_user_error,
    assert_finite,
    cached_tensor_test,
    check_finite,
    check_flag,
    check_heaviside_forward,
    check_include_overlap,
    check_input,
    check_module,
    check_neuron_constants,
    check_std,
    compiled_wrapped,
    drop_state,
    functorch_values,
    host_neurons,
    note_noisy_membrane,
    note_spikes,
    raise_error,
    read_state,
    refuse_other_host_export,
    refuse_other_host_reset,
    refuse_unconverted_export,
    set_state,
    storage_view,
    threshold_value,
    traced_in_torch_checkpoint,
    variance_dtype,
)
from .base import aliases as _aliases
from .base import computed_from as _computed_from
from .base import copy_of as _copy_of
from .base import equal as _equal
from .base import holds_copy as _holds_copy
from .base import match_name as _match
from .base import name_patterns as _patterns
from .base import same_layout as _same_layout
from .base import version_of as _version_of
from .estimators import Estimator
from .layers import (
    BayesConv1d,
    BayesConv2d,
    BayesLinear,
    ChannelAffine,
    affine_batchnorm_plan,
    check_batchnorm_pairing,
    converted_layer_kwargs,
    fold_batchnorms,
    fold_channel_std,
    is_bayesian,
    keep_ties,
    legacy_weight_norm,
    remove_batchnorm_pairing_check,
    warn_deterministic_layers,
)
from .losses import enable_aux_loss
from .moments import (
    IN_PLACE_CAUSES,
    ScaledVariance,
    UnknownVariance,
    VarianceFlowError,
    VarianceTensor,
    attach_computed_variance,
    attach_derived_variance,
    check_variance_flow,
    get_variance,
    in_checked_model,
    noise_sources,
    plain,
    plain_in_place,
    raw_variance,
    refuse_membrane_input,
    refuse_variance,
    scale_variance,
    track_variance,
    untrack_variance,
)
from .optim import register_converted_copy
from .spike import (
    _RECOMPUTING,
    CONVERTED_SPIKE_STD,
    DEFAULT_AUX_PULL,
    DEFAULT_SPIKE_STD,
    IWSTSpike,
    check_aux_pull,
    in_checkpoint_forward,
    in_torch_checkpoint,
    relative_spike_std,
)
from .surgery import replace_modules
from .tensors import SpikeTensor

__all__ = [
    "membrane_variance",
    "spike_grad",
    "SnnTorchSpike",
    "to_sbnn",
    "to_snntorch",
    "reset",
    "SBNNLeaky",
    "SBNNRLeaky",
    "SUPPORTED_NEURONS",
]

#: Names of the snnTorch neurons :func:`to_sbnn` converts.
SUPPORTED_NEURONS = ("Leaky", "RLeaky")

_CACHE = "_sbnn_fire_cache"  # (membrane fired from, its spikes, _fire_mark[, original])
_STATE = "_sbnn_state"  # (membrane, its variance, whether it required grad, its _version)
_HOST_SPIKE = "_sbnn_host_spike_grad"  # HostObject: the neuron's original spike_grad
_BN_KIND = "_sbnn_batchnorm_kind"
# WeakIdKeyDictionary: a membrane's storage -> {its view: the records of its step}
_HISTORY = "_sbnn_history"
# (membrane, its records in _HISTORY) from the step's fire to its store (eager): the
# store finds them without a second weak-dictionary lookup
_LAST_RECORD = "_sbnn_last_record"
# a membrane assigned to the neuron's buffer (lif.mem = 0.5 * lif.mem) that eager mode
# found computed from its kept one: see _note_membrane_edit
_EDITED = "_sbnn_edited_membrane"
# the spikes a membrane emitted, on the carrier of that membrane that a compiled step's
# fire returns (as it carries its variance): the reset of a neuron that steps on several
# membranes in turn (one snn.Leaky shared by the layers of an explicit loop), which
# keeps the last one only in _CACHE, where a graph has no per-membrane records
_EMITTED = "emitted"  # VarianceTensor.emitted
# the neuron that stepped that membrane (VarianceTensor.emitter): another neuron given it
# (an encoder's membrane as a decoder's first one) takes it for a new membrane
_EMITTER = "emitter"
# the membrane a carrier was computed from in a compiled step (VarianceTensor.derived)
_DERIVED = "derived"
# the in-place operation that changed a membrane in a compiled step (VarianceTensor.edited)
_EDITED_IN_PLACE = "edited"
#: Whether a converted ``snn.Leaky`` step may run as one kernel call
#: (:meth:`SBNNLeaky._fused_step`); off only to compare it with snnTorch's own steps.
_FUSED_STEP = [True]
# the neuron's buffers hold tensors of a torch.func transform (a step under vmap / grad):
# left in the buffers when the transform ends, see _EmittedSpikeReset._note_transform_state
_TRANSFORMED = "_sbnn_transform_state"
_DDP_SYNC = "_sbnn_ddp_sync"  # DDP's buffer list at the neuron's last step (a sync marker)
# version entries of a pickled _STATE: the copy adopts its membrane's counter / the
# membrane was changed in place before the copy (its variance is unknown)
_ADOPT_VERSION = "adopt"
_CHANGED_VERSION = -1


def _host_spike_dtype(spikes: Tensor) -> Tensor:
    """Spikes of a half-precision drive under ``torch.autocast`` as float32, as snnTorch's
    surrogates return them (``(mem > 0).float()``): the membrane then accumulates in
    float32, as in the host model. Otherwise (a model cast to bfloat16 / float16, or
    float32 and float64 spikes) they keep their dtype, so the next layer, of the model's
    dtype, takes them."""
    with torch._C.DisableTorchFunctionSubclass():  # an attribute read: no subclass call
        dtype = spikes.dtype
    if (dtype in (torch.float16, torch.bfloat16)
            and torch.is_autocast_enabled(spikes.device.type)):
        return spikes.float()
    return spikes


def _neuron_spike_dtype(spikes: Tensor, thr) -> Tensor:
    """Spikes of a converted neuron in the dtype snnTorch's neuron emits: float32 under
    ``torch.autocast`` (:func:`_host_spike_dtype`), else the neuron's dtype, its
    threshold's, where a membrane of another dtype gave them a wider one (a float32 model
    fed a float64 membrane, ``torch.from_numpy(np.zeros(...))``): snnTorch's are float32
    there, and the next layer, of the model's dtype, takes them. Unchanged where the
    threshold is not a floating-point tensor."""
    spikes = _host_spike_dtype(spikes)
    with torch._C.DisableTorchFunctionSubclass():  # attribute reads: no subclass call
        dtype = spikes.dtype
        want = thr.dtype if isinstance(thr, Tensor) and thr.is_floating_point() else dtype
    if (dtype == want or torch.promote_types(dtype, want) != dtype
            or torch.is_autocast_enabled(spikes.device.type)):
        return spikes
    return spikes.to(want)


class SnnTorchSpike(IWSTSpike):
    """:class:`~sbnn_addons.IWSTSpike` for a hand-built ``snn.Leaky(spike_grad=...)``:
    the reset reuses the emitted spike.

    snnTorch computes a neuron's reset by calling ``spike_grad`` a second time, on the
    membrane of the previous step (``mem_reset``). A stochastic spike would draw again, and
    the reset would disagree with the spike the neuron emitted. This spike function
    remembers each draw with the membrane it fired from (the calling neuron's ``mem``, held
    weakly: the record lives as long as that membrane). The reset call (recognised by its
    caller, snnTorch's ``mem_reset``) of that membrane, or of a ``detach()`` of it, returns
    those spikes and draws nothing; failing that, a reset call of a non-zero membrane whose
    drive equals one of the last :attr:`MEMORY` draws (same shape and values:
    ``mem.clone()``) returns that draw's spikes, once. So the reset is the emitted spike
    however many neurons share the function (snnTorch tutorials pass one ``spike_grad`` to
    every layer): it behaves as one function per neuron. Every firing call draws afresh,
    also when its drive equals an earlier one (another neuron sharing this function with the
    same drive gets its own draw). The reset call of a membrane it did not fire from, the
    zero initial state of a new sequence (or a membrane changed since), returns ``1[u > 0]``
    (no spike for a positive threshold): that membrane emitted none.

    Under ``torch.compile`` the reset call is recognised by its values only, among the
    last :attr:`MEMORY` calls of the function (two per neuron and step), so the reset of
    a sequence's initial membrane is a draw there (a neuron that never fired may lose its
    threshold once, with probability ``Phi(-threshold / std)``), and a function shared by
    more than ``MEMORY / 2`` neurons in one compiled step would lose draws: give each
    neuron its own ``spike_grad()`` there. A call whose drive is equal at every element
    (a new sequence's zero membrane, after ``snntorch.utils.reset`` or ``init_leaky()``)
    forgets the remembered calls of its shape, so that a compiled step given the same
    input again draws afresh instead of taking an earlier call's spikes; neurons of the
    same shape that share one function then lose the first reset of a sequence (a draw),
    another reason for one ``spike_grad()`` per neuron. The reset call fires there too, so a
    :class:`~sbnn_addons.metrics.SpikeMonitor` (and :func:`~sbnn_addons.mc_predict`'s
    spike counts) counts its spikes as emitted: up to twice eager mode's counts.
    Converted models (:func:`to_sbnn`) do not have these limits.
    """

    #: How many recent calls are remembered by value (eager: for membranes that are value
    #: copies of the one fired from; compiled: for every reset).
    MEMORY = 16

    def forward(self, u: Tensor) -> Tensor:
        if (torch.compiler.is_compiling() and self.use_input_variance
                and type(u) is VarianceTensor):
            _refuse_traced_unknown_state()  # (eager mode: the neuron's buffer hook)
        if self.deterministic:
            if not torch.compiler.is_compiling() and _snntorch_caller(u)[0]:
                # the reset call: the spike that membrane emitted in this mode, computed
                # without firing (a second fire per step would count as spikes emitted
                # for SpikeMonitor / mc_predict, doubling the spike counts)
                return self._noiseless_spikes(u.detach())
            return self._host_dtype(super().forward(u))
        compiling = torch.compiler.is_compiling()
        recent = read_state(self, "_sbnn_recent", compiling)
        if recent is None:
            recent = []
            set_state(self, _sbnn_recent=recent)
        # the values only: a drive's variance is the spike function's to read, and a
        # memory holding carriers (a membrane passed back with its variance) or plain
        # drives by turns is a new guard of a compiled step each time (a truncated-BPTT
        # chunk compiled again when the carried membrane came back)
        key = plain(u).detach()
        if compiling:
            return self._compiled_forward(u, key, recent)
        resetting, membrane = _snntorch_caller(key)
        if resetting:
            spikes = self._remembered(membrane, key, recent)
            if spikes is not None:
                return spikes
            # the reset of a membrane this function did not fire from: the initial state
            # of a sequence (init_leaky, utils.reset), which emitted no spike. A draw here
            # would subtract the threshold from neurons that never fired.
            return self._noiseless_spikes(key)
        out = self._host_dtype(super().forward(u))
        spikes = out.detach().clone()
        recent.append((key, spikes))
        if len(recent) > self.MEMORY:
            del recent[0]
        if membrane is not None:
            draws = self.__dict__.get("_sbnn_draws")
            if draws is None:
                draws = self.__dict__["_sbnn_draws"] = WeakIdKeyDictionary()
            draws[membrane] = (key, spikes, _version_of(membrane))
        return out

    def _host_dtype(self, spikes: Tensor) -> Tensor:
        """``spikes`` in the dtype the host's neuron emits (:func:`_host_spike_dtype`), and
        no wider than this function's own (its std's: the model's, as it is cast with the
        neuron), where a membrane of a wider dtype was passed in
        (:func:`_neuron_spike_dtype`)."""
        own = self._parameters.get("std_rho")
        if own is None:
            own = self._buffers.get("fixed_std")
        return _neuron_spike_dtype(spikes, own)

    def _noiseless_spikes(self, key: Tensor) -> Tensor:
        """``1[u > 0]`` (``1[u >= 0]`` with ``at_zero``) of a detached drive, as snnTorch's
        surrogates return it: what the deterministic spike function emits for ``u``."""
        key = plain(key)  # a membrane's noise variance (or mean mode's probe) is not read
        fired = key >= 0 if self.at_zero else key > 0
        return self._host_dtype(fired.to(key.dtype))

    def _remembered(self, membrane: Tensor | None, key: Tensor, recent: list) -> Tensor | None:
        """The spikes emitted from the membrane of a reset call (drive ``key``), or
        ``None``: the draw recorded with that membrane (or one it is a ``detach()`` of),
        unless the membrane was changed in place since; else, for a non-zero membrane, the
        oldest of the last :attr:`MEMORY` draws with the same drive values (consumed)."""
        draws = self.__dict__.get("_sbnn_draws")
        found = None
        if membrane is not None and draws:
            found = draws.get(membrane)
            if found is None:
                found = next((rec for m, rec in list(draws.items())
                              if _aliases(membrane, m)), None)
        if found is not None:
            prev, spikes, version = found
            unchanged = version is not None and _version_of(membrane) == version
            if unchanged or _equal(prev, key):
                for i, entry in enumerate(recent):
                    if entry[1] is spikes:
                        del recent[i]
                        break
                return spikes
        if membrane is not None and (membrane.is_meta or not bool(membrane.any())):
            # a zero membrane not fired from: a new sequence's initial state, never a copy
            # (a value match would hand it the spikes of a draw from an earlier zero one);
            # a meta one has no values to match
            return None
        for i, entry in enumerate(recent):  # oldest first
            if _equal(entry[0], key) and (len(entry) < 3 or bool(entry[2])):
                del recent[i]
                return entry[1]
        return None

    def _compiled_forward(self, u: Tensor, key: Tensor, recent: list) -> Tensor:
        """The same rule in a compiled graph, without a data-dependent branch: a fresh draw,
        replaced by the spikes of the latest remembered call with equal values
        (``torch.where`` on a 0-dim condition).

        A drive equal at every element is the reset call of a new sequence's zero membrane
        (``snntorch.utils.reset``, ``init_leaky()``): the calls remembered before it with
        its shape (an earlier compiled call's, which a step given the same input again
        would match, and take their spikes, without gradient, for its own draws) are
        forgotten (each entry's third item, a 0-dim flag in the graph)."""
        if len(recent) < self.MEMORY:
            # a list of one length: Dynamo guards on it, and a list growing by one entry
            # per call recompiled the step at every call until it was full (past the
            # recompile limit); entries that never match (flag False) fill it first, each
            # its own tensors (Dynamo guards on which entries alias each other too)
            recent[:0] = [(torch.zeros_like(key), torch.zeros_like(key),
                           torch.zeros((), dtype=torch.bool))
                          for _ in range(self.MEMORY - len(recent))]
        out = self._host_dtype(super().forward(u))
        if key.numel() > 1:
            flat = key.reshape(-1)
            new_sequence = (flat == flat[0]).all()
            for i, entry in enumerate(recent):
                if entry[0].shape == key.shape and entry[0].dtype == key.dtype:
                    alive = entry[2] if len(entry) > 2 else torch.ones((), dtype=torch.bool)
                    recent[i] = (entry[0], entry[1], alive & ~new_sequence)
        for entry in recent:  # oldest first: the latest match wins
            prev, spikes = entry[0], entry[1]
            if prev.shape == key.shape and prev.dtype == key.dtype:
                match = (prev == key).all()
                if len(entry) > 2:
                    match = match & entry[2]
                # (a padding entry's spikes are of the drive's dtype)
                out = torch.where(match, spikes.to(out.dtype), out)
        recent.append((key, out.detach().clone(), torch.ones((), dtype=torch.bool)))
        if len(recent) > self.MEMORY:
            del recent[0]
        return out

    def __getstate__(self):
        # a copy keeps the recent draws (values: a copied model's membranes are value
        # copies, so its next reset call finds the spikes they emitted); the per-membrane
        # records hold the original's membranes, which the copy does not have
        state = super().__getstate__()
        state.pop("_sbnn_draws", None)
        return state


#: How many frames above the spike function :func:`_snntorch_caller` looks for snnTorch's.
_CALLER_DEPTH = 24


def _snntorch_caller(drive: Tensor) -> tuple[bool, Tensor | None]:
    """Who called the spike function (eager mode: the calling frames): whether it is
    snnTorch's ``mem_reset`` (the reset of the previous step), and the membrane the call
    is about (the reset's argument; for a firing call, the calling neuron's ``mem``), or
    ``None`` where no snnTorch neuron called it or its membrane is not shaped like the
    drive (a neuron that fires from a pooled membrane). The first snnTorch frame within
    :data:`_CALLER_DEPTH` frames decides: the spike function may sit in a user's wrapper
    module, each call of which (with hooks) adds up to four frames of torch's own."""
    frame = sys._getframe(2)
    for _ in range(_CALLER_DEPTH):
        if frame is None:
            return False, None
        module = frame.f_globals.get("__name__", "")
        if module == "snntorch" or module.startswith("snntorch."):  # not "snntorch_*"
            local = frame.f_locals
            neuron = local.get("self")
            if not isinstance(neuron, nn.Module):
                return False, None
            resetting = frame.f_code.co_name == "mem_reset"
            mem = local.get("mem") if resetting else neuron._buffers.get("mem")
            if not isinstance(mem, Tensor) or mem.shape != drive.shape:
                mem = None
            return resetting, mem
        frame = frame.f_back
    return False, None


def spike_grad(
    estimator: str | Estimator = "st",
    *,
    std: float | None = DEFAULT_SPIKE_STD,
    learn_std: bool | None = None,
    aux_pull: float = DEFAULT_AUX_PULL,
    **kw,
) -> IWSTSpike:
    """A stochastic spike function to pass as ``snn.Leaky(spike_grad=...)``.

    .. code-block:: text

        h = 1[u + sigma eps > 0],  u = mem - threshold,  sigma^2 = V(u) + std^2
        E[dh/du] = phi(u / std) / std       (ST, no Bayesian layer in front: V = 0)

    Used alone in an otherwise unchanged model it trains by default: its own noise std
    starts at ``1/sqrt(2 pi) = 0.399`` and is learned (one per spike function, so give
    each layer its own ``spike_grad()`` for one std per layer). In expectation over the
    noise, the ST gradient is a Gaussian surrogate of width ``std``; at this ``std`` its
    peak ``phi(0)/std`` is 1, the peak of snnTorch's default ``atan(alpha=2)``.

    Args:
        estimator: ``"st"``, ``"iwst(p)"``, ``"agr(tau)"`` or an Estimator.
        std: the spike function's own noise std, in the membrane's units (default
            :data:`~sbnn_addons.spike.DEFAULT_SPIKE_STD`, for snnTorch's default
            ``threshold=1``; for another threshold scale it with it, e.g.
            ``std=0.399 * threshold``, as :func:`to_sbnn` does; ``None`` or 0: only the
            variance attached by Bayesian layers, and a zero gradient without them).
        learn_std: learn ``std`` through ``softplus(rho)`` (default: when ``std > 0``).
        aux_pull: the auxiliary loss applied through the gradient
            (:class:`~sbnn_addons.IWSTSpike`; 0: off), which lets a neuron pushed far
            below its threshold recover.
        **kw: further :class:`~sbnn_addons.IWSTSpike` arguments.

    Returns:
        A :class:`SnnTorchSpike`: snnTorch's second call for the reset gets back the
        spike the neuron emitted, not a second draw.
    """
    if learn_std is None:
        learn_std = bool(std)
    return SnnTorchSpike(estimator, std=std, learn_std=learn_std, aux_pull=aux_pull, **kw)


# --------------------------------------------------------------------------- neurons
class _EmittedSpikeReset:
    """Mixin of the converted neurons: reset = emitted spike.

    The input current is a :class:`~sbnn_addons.moments.VarianceTensor`; the membrane the
    step computes holds ``V_t = beta^2 V_{t-1} + var(I_t)`` (``+ var`` of the recurrent
    current for ``RLeaky``): for ``snn.Leaky`` written out beside snnTorch's own state
    function on the plain values (:meth:`_sbnn_moments`), for ``RLeaky`` (whose state
    function also runs its recurrent layer) by the variance rules through snnTorch's
    operations.

    Between calls the membrane buffer is a plain tensor (what ``torch.compile`` takes as a
    graph input) and its variance is the neuron's state ``_sbnn_state = (membrane, V,
    had_grad)``, valid while ``self.mem`` is that very membrane: ``snntorch.utils.reset``
    (a new zero membrane) resets ``V`` with it, ``detach_hidden`` (``mem.detach_()``)
    detaches it, and a membrane passed back by an explicit time loop
    (``spk, mem = lif(cur, mem)``) finds its own ``V``.

    A membrane passed back as a step returned it (detached or cloned too) finds its ``V``.
    An edit of it has no known ``V``: one computed out of place (``0.5 * mem``) raises
    where it has a graph, one changed in place (``mem.mul_(mask)``) where a ``V`` is
    stored (``sample`` mode). Without a variance (``mean`` mode, a neuron without a
    Bayesian input) an edited membrane goes on as in snnTorch: its reset is computed from
    its values, not taken from the spikes it emitted before the edit.
    """

    def forward(self, *args, **kwargs):
        compiling = torch.compiler.is_compiling()
        if compiling:  # (the converted model's entry checks it in eager mode only)
            self._assert_finite_beta()
            if ((self.init_hidden or getattr(self.spike_grad, "sbnn_mode", "mean") != "mean")
                    and traced_in_torch_checkpoint()):
                raise_error(self._compiled_checkpoint_message())
        else:
            if self._left_by_transform():
                self._leave_transform_state(args, kwargs)
            ddp_type = _DDP_TYPE[0] if _DDP_TYPE else _ddp_type()
            if ddp_type is None or ddp_type._get_active_ddp_module() is None:
                self.__dict__[_DDP_SYNC] = None  # _check_ddp_buffer_sync without DDP
            else:
                _check_ddp_buffer_sync(self)
            if ((self.init_hidden or _state_from_module(self, args, kwargs))
                    and (in_torch_checkpoint() or in_checkpoint_forward())):
                raise RuntimeError(self._hidden_state_checkpoint_message(args))
            if args and type(args[0]) is VarianceTensor:
                _check_input_current(self, args[0])
            if args and isinstance(args[0], Tensor) and type(args[0]) is not SpikeTensor:
                refuse_membrane_input(args[0], self, "the input current")
            # (kernel off: the PyTorch path, which CUDA tensors take, runs snnTorch's steps)
            if (type(self) is SBNNLeaky and _FUSED_STEP[0] and kernels._enabled and args
                    and type(args[0]) is VarianceTensor):
                out = self._fused_step(*args, **kwargs)
                if out is not None:
                    return out
        out = super().forward(*args, **kwargs)
        self._sbnn_store(compiling)
        return out

    def _assert_finite_beta(self) -> None:
        """While ``torch.compile`` traces: a runtime assert that ``beta`` (a constant
        buffer or a learned parameter) holds no NaN / inf, which eager mode refuses at the
        converted model's entry (a check cached by version, which a graph cannot read): a
        NaN decay makes the membrane NaN, so the neuron never fires (spikes 0, gradients
        NaN) without an error. One reduction of the small tensor and an assert per
        step (:func:`~sbnn_addons.base.assert_finite`)."""
        p, b = self._parameters, self._buffers  # without nn.Module.__getattr__
        beta = p["beta"] if "beta" in p else b.get("beta")
        if isinstance(beta, Tensor):
            host = next((c.__name__ for c in type(self).__mro__
                         if c.__module__.startswith("snntorch")), type(self).__name__)
            assert_finite(beta, (
                f"{host}.beta (the membrane decay) holds NaN / inf values: a NaN one "
                "makes the membrane NaN, so the neuron never fires (spikes 0, gradients "
                "NaN), and an infinite one is clamped to 1 (no decay), silently. Restore "
                "it (a checkpoint, or a number: lif.beta.fill_(0.9) under "
                "torch.no_grad()) and remove the cause (a NaN "
                "loss or gradient of a learned beta: clip the gradients, lower the "
                "learning rate); to skip this check for speed use "
                "sbnn_addons.check_finite(False)"))

    def _hidden_state_checkpoint_message(self, args: tuple) -> str:
        """The error for a step with ``init_hidden=True`` inside ``torch.utils.checkpoint``:
        its membrane is module state, so the recomputation in the backward would start
        from the membrane the module holds then (the one at the end of the sequence), not
        from the step's own: gradients 40-120 % off, without an error."""
        x = args[0] if args and isinstance(args[0], Tensor) else torch.empty(0)
        name = noise_sources(x, self)[0]
        host = next((c.__name__ for c in type(self).__mro__
                     if c.__module__.startswith("snntorch")), type(self).__name__)
        which = f"{host}{f' {name!r}' if name else ''}"
        if self.init_hidden:
            what = "has init_hidden=True"
        else:
            what = ("is called without its membrane (spk, mem = lif(cur)), or an RLeaky "
                    "without its spikes: snnTorch then takes the state the module keeps")
        return (
            f"the converted snnTorch {which} {what} and runs inside "
            "torch.utils.checkpoint (or sbnn_addons.checkpoint.checkpoint): its membrane is "
            "module state, so the recomputation in "
            "the backward would start from the membrane the module holds then (the one at "
            "the end of the sequence), not from this step's, and the gradients would be "
            "wrong, without an error. Pass the membrane explicitly in the region "
            "(init_hidden=False: spk, mem = lif(cur, mem); an RLeaky's: spk, mem = "
            "lif(cur, spk, mem)), which torch.utils.checkpoint "
            "(use_reentrant=False) and sbnn_addons.checkpoint.checkpoint recompute "
            "exactly, or leave the neuron outside the checkpointed region")

    def _compiled_checkpoint_message(self) -> str:
        """The error for a step traced by ``torch.compile`` inside ``torch.utils.checkpoint``
        (which Dynamo traces only with ``skip_fwd_side_effects_in_bwd_under_checkpoint``):
        the noise variance that the neuron carries to the next step as its state loses
        its gradient in the graph (``std_rho``'s gradients 97 % off, without an error)."""
        host = next((c.__name__ for c in type(self).__mro__
                     if c.__module__.startswith("snntorch")), type(self).__name__)
        if self.init_hidden:  # (mean mode too: Dynamo fails on its state, an internal error)
            why = ("with init_hidden=True runs in a torch.utils.checkpoint region of a "
                   "compiled step, whose membrane kept in the module Dynamo cannot carry out "
                   "of the region (an internal error)")
        else:
            why = ("runs in a torch.utils.checkpoint region of a compiled step: the "
                   "membrane's noise variance, which the neuron carries to the next step as "
                   "its state, would lose its gradient in the compiled graph, and the "
                   "gradients would be wrong, without an error")
        return (
            f"a converted snnTorch {host} {why}. Inside a compiled step use "
            "sbnn_addons.checkpoint.checkpoint(fn, *args, modules=model) (the compiler "
            "then chooses what to recompute), or checkpoint outside the compiled "
            "function (torch.compile without fullgraph=True runs such a region eagerly); "
            "mean mode (no variance) may use torch.utils.checkpoint with the membrane "
            "passed explicitly")

    def _sbnn_store(self, compiling: bool | None = None) -> None:
        """After a step: the membrane buffer as a plain tensor, its variance as state; the
        spike buffer (``RLeaky``) as a plain tensor too. ``compiling``: whether a graph
        is traced, where the caller knows it."""
        if compiling is None:
            compiling = torch.compiler.is_compiling()
        if not compiling and torch._C._are_functorch_transforms_active():
            self._note_transform_state()
        if self._buffers.get("spk") is not None:  # an RLeaky's spikes
            self._sbnn_store_plain_spikes(compiling)
        mem = self._buffers.get("mem")
        if type(mem) is not VarianceTensor:
            drop_state(self, _STATE)
            return
        var = get_variance(mem, compiling=compiling)  # a factored one multiplied out
        # eager: this object (a caller's too); compiled: an alias
        plain_mem = plain_in_place(mem, compiling)
        if compiling:
            # not a view: snnTorch's detach_hidden() detaches the buffer in place
            plain_mem = plain_mem.clone()
        if plain_mem is not mem:
            self._buffers["mem"] = plain_mem
            cached = read_state(self, _CACHE, compiling)
            if cached is not None and cached[0] is mem:  # either membrane may come back
                self.__dict__[_CACHE] = (plain_mem, *cached[1:3], mem)
        self._store_state(plain_mem, var, compiling)

    def _store_state(self, mem: Tensor, var, compiling: bool) -> None:
        """Keep the plain membrane ``mem`` a step returned with its variance ``var`` as
        the neuron's state, and (eager mode) in the records of ``mem``'s step."""
        version = _version_of(mem, compiling)
        self.__dict__[_STATE] = (mem, var, mem.requires_grad, version)
        if read_state(self, _EDITED, compiling) is not None:  # a step went on from another
            drop_state(self, _EDITED)
        if not compiling:  # steps are recorded per membrane in eager mode only
            last = self.__dict__.pop(_LAST_RECORD, None)  # the records the fire found
            record = (last[1] if last is not None and last[0] is mem
                      else _step_record(self, mem))
            record["state"] = (var, mem.requires_grad, version)
            if var is not None:  # a layer or neuron it is fed to would drop V: they refuse
                note_noisy_membrane(mem, self)

    def _sbnn_store_plain_spikes(self, compiling: bool | None = None) -> None:
        """An ``RLeaky``'s ``spk`` buffer as a plain tensor: in eager mode the spikes are
        a marked :class:`~sbnn_addons.tensors.SpikeTensor`, which a compiled step would
        take as a graph input (AOTAutograd rejects a tensor subclass there). A plain copy
        (not an alias: ``detach_hidden()`` detaches the buffer in place); the spikes
        returned keep their mark. ``compiling``: whether a graph is traced, where the
        caller knows it."""
        spk = self._buffers.get("spk")
        if (spk is not None and type(spk) not in (Tensor, VarianceTensor)
                and not (torch.compiler.is_compiling() if compiling is None else compiling)):
            with torch._C.DisableTorchFunctionSubclass():
                self._buffers["spk"] = spk.clone()

    def _sbnn_state_update(self, input_: Tensor) -> Tensor:
        mem = self._buffers.get("mem")
        compiling = torch.compiler.is_compiling()
        foreign = type(mem) is VarianceTensor and compiling and _stepped_by_another(self, mem)
        if foreign:
            # another neuron's membrane in the graph, or computed from one (an encoder's
            # last membrane as a decoder's first): eager mode keeps its variance with the
            # neuron that stepped it, so this one starts it as a new membrane
            mem = self._buffers["mem"] = plain_in_place(mem, True)
        if type(mem) is VarianceTensor:  # a membrane passed with a variance of its own
            _check_passed_membrane(self, mem)
            source = getattr(mem, _DERIVED, None)
            if source is not None and not mem.requires_grad and compiling:
                # computed in the graph without a graph back to the membrane of an earlier
                # step (mem.detach() * mask, an edit under no_grad): a copy keeps its
                # variance, an edit is a new membrane without one, as eager mode takes it
                var = get_variance(mem, compiling=True)
                if isinstance(var, Tensor):
                    var = (torch.where(_same_values(mem, source), var, 0.0)
                           if mem.shape == source.shape else torch.zeros_like(var))
                    self._buffers["mem"] = attach_computed_variance(
                        plain_in_place(mem, True), var, compiling=True)
        if type(mem) is not VarianceTensor:
            var = None if foreign else _stored_variance(self, detached=True,
                                                        compiling=compiling)
            current_var = input_.variance if type(input_) is VarianceTensor else None
            zero_reset = _MOMENT_FORMS.get(getattr(self._sbnn_host_state, "__func__", None))
            if (zero_reset is not None and isinstance(current_var, (Tensor, ScaledVariance))
                    and (var is None or isinstance(var, Tensor))):
                return self._sbnn_moments(input_, var, current_var, zero_reset, compiling)
            if var is not None:
                # an alias carries it (the same values and graph): the caller's membrane
                # (an explicit loop's `mem`, a `mem_rec` entry) stays a plain tensor
                if compiling:
                    self._buffers["mem"] = attach_computed_variance(mem, var)
                else:
                    alias = mem.as_subclass(VarianceTensor)
                    self._buffers["mem"] = attach_computed_variance(alias, var)
        return self._sbnn_host_state(input_)

    def _sbnn_moments(self, input_: VarianceTensor, var: Tensor | None,
                      current_var: Tensor | ScaledVariance, zero_reset: bool,
                      compiling: bool | None = None) -> Tensor:
        """The step's membrane mean by the host's own state function (on the plain
        values), its variance written out (SPEC section 3):

        .. code-block:: text

            V_t = beta^2 V_{t-1} + var(I_t)                  (reset by subtraction, none)
            V_t = beta^2 (1 - r_t)^2 V_{t-1} + var(I_t)      (reset to zero, r_t the reset)

        the values the variance rules give for snnTorch's operations (``V_{t-1} = None``:
        a new membrane, no variance yet), in a handful of operations.

        Args:
            input_: the input current ``I_t``, a carrier of ``var(I_t)``.
            var: ``V_{t-1}`` of the membrane in the buffer, or ``None``.
            current_var: ``var(I_t)`` as the input carries it.
            zero_reset: whether the state function is snnTorch's reset to zero.
            compiling: whether a graph is traced, where the caller knows it.

        Returns:
            The membrane ``u_t`` carrying ``V_t`` and the input's noise set.
        """
        if compiling is None:
            compiling = torch.compiler.is_compiling()
        if var is not None:
            if zero_reset:  # _base_zero scales the membrane by 1 - reset first
                var = scale_variance(var, 1 - self.reset, compiling)
            p, b = self._parameters, self._buffers  # without nn.Module.__getattr__
            beta = p["beta"] if "beta" in p else b["beta"] if "beta" in b else self.beta
            if (not compiling and isinstance(beta, Tensor) and beta.is_cpu
                    and not beta.dim() and not beta.requires_grad):
                # a constant CPU scalar (the default): clamped as a number, one read and
                # one operation (scale_variance reads a clamped tensor the same way)
                var = scale_variance(var, min(max(beta.item(), 0.0), 1.0), compiling)
            else:
                var = scale_variance(var, beta.clamp(0, 1), compiling)
            if isinstance(current_var, ScaledVariance):
                current_var = current_var.value()
            current_var = var + current_var
        with torch._C.DisableTorchFunctionSubclass():
            mean = self._sbnn_host_state(input_)
        return attach_derived_variance(mean, current_var, input_, compiling)

    def __getstate__(self):
        # a copy's membrane starts a version counter of its own: record whether the
        # membrane is still the one its variance belongs to, and let the copy adopt it
        if self._left_by_transform():
            # a torch.func transform's states cannot be copied: emptied (in the model's
            # own dicts, which other entries of a copied model share), a fresh copy
            self._empty_transform_state()
        state = super().__getstate__()  # nn.Module's: a copy of __dict__
        state.pop(_TRANSFORMED, None)
        state.pop(_HISTORY, None)  # earlier steps' records: a copy continues from the last
        state.pop(_LAST_RECORD, None)
        state.pop(_DDP_SYNC, None)
        stored = state.get(_STATE)
        if stored is not None and stored[3] is not None:
            mem = self._buffers.get("mem")
            current = mem is not None and (mem is stored[0] or _aliases(mem, stored[0]))
            if current and _version_of(mem) == stored[3]:
                state[_STATE] = (mem, stored[1], stored[2], _ADOPT_VERSION)
            else:  # replaced (a new sequence) or changed in place: the copy behaves alike
                state[_STATE] = (stored[0], stored[1], stored[2],
                                 None if not current else _CHANGED_VERSION)
        cached = state.get(_CACHE)
        if cached is not None and isinstance(cached[2], int):  # the copy's membrane adopts it
            version = _ADOPT_VERSION if _unchanged(cached[0], cached[2]) else _CHANGED_VERSION
            state[_CACHE] = (*cached[:2], version, *cached[3:])
        mem = self._buffers.get("mem")
        if mem is None or mem.grad_fn is None:
            # the membrane holds no graph (snntorch.utils.reset, detach_hidden): neither
            # does the copy's state, which keeps the last step's variance and spikes with
            # their graph (copy.deepcopy, AveragedModel refuse a tensor inside a graph)
            for key in (_STATE, _CACHE):
                kept = state.get(key)
                if kept is not None:
                    state[key] = tuple(_without_graph(t) for t in kept)
        return state

    def __setstate__(self, state) -> None:
        # deepcopy / pickle / torch.load build the copy without __init__, so snnTorch's
        # class-level registry (read by snntorch.utils.reset) would not know it
        super().__setstate__(state)
        stored = self.__dict__.get(_STATE)
        if stored is not None and stored[3] == _ADOPT_VERSION:  # unpickled: equal, not identical
            self.__dict__[_STATE] = (*stored[:3], _version_of(stored[0]))
        cached = self.__dict__.get(_CACHE)
        if cached is not None and isinstance(cached[2], str):  # _ADOPT_VERSION
            self.__dict__[_CACHE] = (*cached[:2], _version_of(cached[0]), *cached[3:])
        _register(self)

    def fire(self, mem: Tensor) -> Tensor:
        compiling = torch.compiler.is_compiling()  # once: the helpers take it
        self._sync_spike_threshold(compiling)
        # threshold and spike function read from the module's dicts, without
        # nn.Module.__getattr__, where they are there
        p, b, m = self._parameters, self._buffers, self._modules
        thr = (p["threshold"] if "threshold" in p
               else b["threshold"] if "threshold" in b else self.threshold)
        u = _drive(mem, thr, compiling)
        spike = m["spike_grad"] if "spike_grad" in m else self.spike_grad
        raw = _neuron_spike_dtype(spike(u), thr)  # (spike refuses a noiseless draw's gradient)
        self._keep_reset(mem, raw, compiling)
        if not compiling:  # (a fused step's spikes share the membrane's autograd node)
            note_spikes(raw)
        if self._unit_spike_factor(compiling):
            return raw  # the same values, and the spikes keep their binary mark (cheaper layers)
        return raw * self.graded_spikes_factor

    def _keep_reset(self, mem: Tensor, raw: Tensor, compiling: bool | None = None) -> None:
        """Keep the spikes ``raw`` that membrane ``mem`` emitted as its reset (a copy taken
        now: the spikes returned may be changed in place), also for a recomputation, with
        the membrane's :func:`_fire_mark`: once it is changed in place
        (``mem.mul_(mask)``), they are not its reset any more. ``compiling``: whether a
        graph is traced, where the caller knows it."""
        if compiling is None:
            compiling = torch.compiler.is_compiling()
        kind = type(raw)
        if kind is SpikeTensor or (kind is Tensor and not compiling):
            with torch._C.DisableTorchFunctionSubclass():  # a SpikeTensor's: without the call
                if compiling:
                    spikes = raw.detach().clone()
                else:  # the copy taken without gradients: one operation, no detach() first
                    grad = torch.is_grad_enabled()
                    torch._C._set_grad_enabled(False)
                    try:
                        spikes = raw.clone()
                    finally:
                        torch._C._set_grad_enabled(grad)
        else:
            spikes = raw.detach().clone()
        mark = _fire_mark(mem, compiling)
        self.__dict__[_CACHE] = (mem, spikes, mark)
        if compiling and type(mem) is VarianceTensor:
            setattr(mem, _EMITTED, spikes)  # (eager mode: the records of mem's step)
            setattr(mem, _EMITTER, self)
            # a step's own membrane, no copy of an earlier one (nor a chain back to it)
            setattr(mem, _DERIVED, None)
        if not compiling:  # steps are recorded per membrane in eager mode only
            record = _step_record(self, mem)
            record["spikes"] = (spikes, mark)
            self.__dict__[_LAST_RECORD] = (mem, record)  # for the step's _sbnn_store

    def _unit_spike_factor(self, compiling: bool | None = None) -> bool:
        """Whether ``graded_spikes_factor`` is a constant 1 (checked once per value of the
        buffer, not at every step). ``compiling``: whether a graph is traced, where the
        caller knows it."""
        p, b = self._parameters, self._buffers  # without nn.Module.__getattr__
        factor = (p["graded_spikes_factor"] if "graded_spikes_factor" in p
                  else b["graded_spikes_factor"] if "graded_spikes_factor" in b
                  else self.graded_spikes_factor)
        if not isinstance(factor, Tensor):
            return factor == 1.0
        if factor.requires_grad:
            return False
        if (factor.is_cpu and factor.dim() == 0
                and not (torch.compiler.is_compiling() if compiling is None else compiling)
                and not torch._C._functorch.is_functorch_wrapped_tensor(factor)):
            # snnTorch's scalar buffer on the CPU, read at every step (an edit through
            # .data is seen): one read instead of cached_tensor_test's (f == 1).all()
            return factor.item() == 1
        return cached_tensor_test(self, "_sbnn_unit", factor, lambda f: (f == 1).all(),
                                  assume=False, compiling=compiling)

    def _sync_spike_threshold(self, compiling: bool | None = None) -> None:
        """Give the spike function the neuron's threshold (the mean of a per-neuron or
        learned one), which centres its auxiliary terms and decides whether it collects
        any (an infinite threshold, a membrane readout, collects none), where the
        threshold was changed since the conversion (e.g. ``lif.threshold.fill_(inf)``, a
        new tensor, an optimiser's step of a learned one). Read once per change of the
        buffer (its storage and version counter: an edit through ``.data`` is not seen).
        Eager mode, at each step and at ``reset_mem()``
        (:func:`sbnn_addons.snntorch.reset`); a compiled graph cannot read the value, so
        it checks it: see
        :meth:`_check_compiled_threshold`. ``compiling``: whether a graph is traced,
        where the caller knows it."""
        modules = self._modules  # without nn.Module.__getattr__ where it is there
        spike = modules["spike_grad"] if "spike_grad" in modules else self.spike_grad
        if not isinstance(spike, IWSTSpike):
            return
        p, b = self._parameters, self._buffers
        thr = (p["threshold"] if "threshold" in p
               else b["threshold"] if "threshold" in b else self.threshold)
        if torch.compiler.is_compiling() if compiling is None else compiling:
            self._check_compiled_threshold(spike, thr)
            return
        if not isinstance(thr, Tensor):
            value = float(thr)
        elif thr.is_meta:
            return
        elif thr.is_inference():  # no version counter
            value = _thr(self)
        elif torch._C._functorch.is_functorch_wrapped_tensor(thr):  # no storage to key on
            if torch._C._functorch.is_batchedtensor(thr):
                raise RuntimeError(
                    f"the threshold of this converted snnTorch {type(self).__name__} is "
                    "mapped by a torch.func transform (torch.vmap over stacked buffers, "
                    "e.g. functional_call(model, (params, buffers), ...) with the "
                    "buffers of stack_module_state): its spike function reads the "
                    "threshold as one number, which a mapped tensor is not; map the "
                    "parameters only (functional_call(model, params, ...), in_dims=None "
                    "for the buffers), so that the members share the model's thresholds")
            value = _thr(self)
        else:
            key = (thr.data_ptr(), thr._version)
            cached = self.__dict__.get("_sbnn_threshold")
            if cached is None or cached[0] != key:
                cached = self.__dict__["_sbnn_threshold"] = (key, _thr(self))
            value = cached[1]
        if value != spike.threshold:
            spike.threshold = value

    def _check_compiled_threshold(self, spike: IWSTSpike, thr: Tensor | float) -> None:
        """In a compiled graph: check that the threshold ``thr`` is the one the spike
        function was given in eager mode (the graph was traced with it), as far as the
        spike function reads it: finite or not (a membrane readout collects no auxiliary
        term and gets no pull), and its value where the auxiliary terms are centred on it
        (``aux_center="zero"``, a threshold that is not learned). A threshold changed in
        place since (``lif.threshold.fill_(inf)`` after the conversion) would otherwise
        give an infinite auxiliary loss and NaN gradients, silently. One check of a
        small buffer per step, in the graph (no wait for the device).

        Raises:
            RuntimeError: the threshold changed (when the graph runs), naming the fix.
        """
        if not isinstance(thr, Tensor) or thr.is_meta:
            return  # a number: a constant of the graph, guarded by Dynamo
        known = spike.threshold
        value = thr.detach().float().mean()
        if not spike.threshold_finite:  # a bool: guarded by Dynamo
            ok = value == known
        else:
            ok = torch.isfinite(value)
            if spike.aux_center == "zero" and spike.collect_aux and not thr.requires_grad:
                ok = ok & ((value - known).abs() <= 1e-6 * max(1.0, abs(known)))
        torch._assert_async(
            ok, f"the threshold of this converted snnTorch {type(self).__name__} was changed "
            "in place (e.g. lif.threshold.fill_(inf)) since its spike function last read it, "
            "and a compiled step cannot read it: its auxiliary loss and pull would use the "
            "old threshold (an infinite one's terms are inf, NaN gradients). After changing "
            "a threshold, call sbnn_addons.snntorch.reset(model) once outside the compiled "
            "step (snntorch.utils.reset does not call the neurons' reset_mem()), or run one "
            "step eagerly: the compiled step then recompiles for the new threshold")

    def fire_inhibition(self, batch_size: int, mem: Tensor) -> Tensor:
        self._sync_spike_threshold()
        mem_shift = _drive(mem, self.threshold)
        index = torch.argmax(mem_shift, dim=1)
        raw = _neuron_spike_dtype(self.spike_grad(mem_shift), self.threshold)
        self._keep_reset(mem, raw)  # snnTorch's reset ignores the inhibition mask: kept so
        mask = torch.zeros_like(raw)
        mask[torch.arange(batch_size), index] = 1
        return raw * mask

    def mem_reset(self, mem: Tensor) -> Tensor:
        compiling = torch.compiler.is_compiling()
        own = compiling and type(mem) is VarianceTensor and not _stepped_by_another(self, mem)
        if own:
            self._refuse_edited_in_place(mem)
        spike = self._modules.get("spike_grad")
        if compiling and isinstance(spike, IWSTSpike) and spike.deterministic:
            # mean mode: the spikes a membrane emitted are 1[mem > threshold] of the values
            # it fired from. A graph reads no version counter, so a kept copy would miss a
            # change in place since (mem.mul_(mask)), which snnTorch's reset follows
            return _host_spike_dtype((mem.detach() - self.threshold > 0).to(mem.dtype))
        cached = read_state(self, _CACHE, compiling)
        if cached is not None and not _unchanged(cached[0], cached[2], compiling):
            # changed in place since it fired (mem.mul_(mask)): the reset is computed from
            # its new values, as snnTorch computes it, not the spikes of the old ones
            cached = None
        found = None
        if cached is not None and (cached[0] is mem or (len(cached) > 3 and cached[3] is mem)
                                   or (not compiling and (_aliases(mem, cached[0])  # detach()
                                                          or _copy_of(mem, cached[0])))):
            found = cached[1:3]
        elif not compiling:  # an earlier step's membrane (a recomputation)
            record = _find_step_record(self, mem).get("spikes")
            if record is not None and _unchanged(mem, record[1], False):
                found = record
        if found is not None and not isinstance(found[1], Tensor):
            return found[0]
        fresh = _host_spike_dtype((mem.detach() - self.threshold > 0).to(mem.dtype))
        if own and found is None:
            emitted = getattr(mem, _EMITTED, None)
            if isinstance(emitted, Tensor):  # a membrane of another step in the graph
                return emitted
            source = getattr(mem, _DERIVED, None)
            if source is not None:  # computed in the graph from a membrane of a step
                return self._derived_reset(mem, source, fresh)
        if found is not None:
            # an inference tensor (no version counter): its values when it fired decide,
            # in the graph (no wait for the device)
            return torch.where((mem.detach() == found[1]).all(), found[0], fresh)
        if compiling and cached is not None:
            # a compiled step cannot compare storages: the first step of a compiled call
            # given back the last membrane detached (truncated BPTT) or copied
            return _compiled_copy_reset(mem, cached[0], cached[1], fresh)
        return fresh

    def _refuse_edited_in_place(self, mem: VarianceTensor) -> None:
        """In a compiled step: raise eager mode's error where the membrane ``mem``, or the
        membrane it is a copy of, was changed in place since its step
        (:attr:`~sbnn_addons.moments.VarianceTensor.edited`; a graph reads no version
        counter).

        Raises:
            RuntimeError: naming the fix (a Dynamo ``UserError`` while traced).
        """
        source = getattr(mem, _DERIVED, None)
        for t in (mem, source):
            if t is not None and getattr(t, _EDITED_IN_PLACE, None) is not None:
                raise_error(str(_changed_in_place_error(self)), VarianceFlowError)

    def _derived_reset(self, mem: Tensor, source: Tensor, fresh: Tensor) -> Tensor:
        """The reset, in a compiled ``sample``-mode step, of membrane ``mem`` that the graph
        computed from the membrane ``source`` of an earlier step: the spikes ``source``
        emitted where ``mem`` is a copy of it (``mem.detach()``, ``mem.clone()``: its
        values), as in eager mode. An edit with a graph (``mem = 0.5 * mem``,
        ``mem * mask``) raises eager mode's error (asserted in the graph): the reset would
        otherwise be the spikes of the edited mean values, not the ones the neuron
        emitted, silently. An edit without one (``mem.detach() * mask``, an edit under
        ``torch.no_grad()``) is a new membrane, as eager mode takes it: ``fresh``.

        Raises:
            RuntimeError: ``mem`` is an edit of ``source`` with a graph (when the graph
                runs; while it is traced for another shape), naming the fix.
        """
        message = str(_edited_membrane_error(self))
        if mem.shape != source.shape:  # (a slice of it): no copy
            if not mem.requires_grad:
                return fresh
            raise_error(message, VarianceFlowError)
        same = _same_values(mem, source)
        if not mem.requires_grad:  # eager mode refuses an edit only where it has a graph
            return torch.where(same, getattr(source, _EMITTED).to(fresh.dtype), fresh)
        torch._assert_async(same, message)
        return getattr(source, _EMITTED)

    def _left_by_transform(self) -> bool:
        """Whether the buffers hold a ``torch.func`` transform's tensors (see
        :meth:`_note_transform_state`) and that transform has ended."""
        return (_TRANSFORMED in self.__dict__
                and not torch._C._are_functorch_transforms_active())

    def _note_transform_state(self) -> None:
        """After a step under a ``torch.func`` transform (``vmap``, ``grad``, e.g. an
        ensemble through ``functional_call``): where the buffers now hold the transform's
        tensors, which outlive it (unusable after it: PyTorch fails on them with an
        internal assert), mark the neuron and take it out of snnTorch's instance lists, so
        that ``snntorch.utils.reset`` of any other model does not fail on them; the next
        reset (:meth:`reset_mem`) or eager step with its states passed brings it back."""
        wrapped = torch._C._functorch.is_functorch_wrapped_tensor
        if any(b is not None and wrapped(b)
               for b in (self._buffers.get("mem"), self._buffers.get("spk"))):
            if _TRANSFORMED not in self.__dict__:
                self.__dict__[_TRANSFORMED] = True
                for lst in _instance_lists(type(self)):
                    lst[:] = [x for x in lst if x is not self]

    def _empty_transform_state(self) -> None:
        """Replace the tensors a ``torch.func`` transform left (see
        :meth:`_note_transform_state`) with empty plain ones, as a new neuron holds (its
        next step starts from zero): the ``mem`` / ``spk`` buffers and snnTorch's per-step
        attributes (``reset``); drop the variance state and spike cache kept with them."""
        wrapped = torch._C._functorch.is_functorch_wrapped_tensor
        for store, names in ((self._buffers, ("mem", "spk")), (self.__dict__, None)):
            for name, t in list(store.items()):
                if ((names is None or name in names) and isinstance(t, Tensor)
                        and wrapped(t)):
                    values = functorch_values(t)
                    store[name] = torch.zeros(0, dtype=values.dtype, device=values.device)
        drop_state(self, _STATE, _CACHE)

    def _apply(self, fn, recurse=True):
        # model.to(...), .double(), .cuda(): a transform's states cannot be converted;
        # empty ones are (an eager step that would continue them still raises)
        if self._left_by_transform():
            self._empty_transform_state()
        return super()._apply(fn, recurse)

    def _drop_transform_state(self) -> None:
        """Empty the tensors a ``torch.func`` transform left (:meth:`_empty_transform_state`)
        and register the neuron with snnTorch again."""
        self._empty_transform_state()
        self.__dict__.pop(_TRANSFORMED, None)
        _register(self)

    def _leave_transform_state(self, args: tuple, kwargs: dict) -> None:
        """An eager step after a ``torch.func`` transform left this neuron's buffers (see
        :meth:`_note_transform_state`): with its states passed (``lif(cur, mem)``) the
        buffers are dropped; a step that would continue the transform's membrane raises."""
        states = ("spk", "mem") if "spk" in self._buffers else ("mem",)
        passed = len(args) > len(states) or all(
            (kwargs.get(n) if n in kwargs else args[i + 1] if len(args) > i + 1 else None)
            is not None for i, n in enumerate(states))
        if not passed:
            raise RuntimeError(
                f"this converted snnTorch {type(self).__name__} last stepped inside a "
                "torch.func transform (vmap, grad, functional_call under them), and its "
                "membrane is the transform's, which cannot be continued after it: start a "
                "new sequence with sbnn_addons.snntorch.reset(model) (snntorch.utils.reset "
                "does not reach a neuron in this state)")
        self._drop_transform_state()

    def reset_mem(self):
        if _TRANSFORMED in self.__dict__:
            self._drop_transform_state()
        drop_state(self, _CACHE)
        # a threshold changed in place since the last step reaches the spike function
        # here too: a compiled step that follows reads it (see _check_compiled_threshold)
        self._sync_spike_threshold()
        return super().reset_mem()


def _state_from_module(neuron: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether a step of ``neuron`` (``init_hidden=False``) takes a state from the module:
    snnTorch's ``forward(input_, mem=None)`` (``RLeaky``'s ``(input_, spk=None,
    mem=None)``) uses the membrane (spikes) it keeps where one is not passed."""
    names = ("spk", "mem") if isinstance(neuron, snn.RLeaky) else ("mem",)
    given = dict(zip(names, args[1:]))
    given.update((k, v) for k, v in kwargs.items() if k in names)
    return any(given.get(n) is None for n in names)


def _drive(mem: Tensor, threshold: Tensor | float, compiling: bool | None = None) -> Tensor:
    """The spike function's input ``mem - threshold``, carrying the membrane's variance
    (a factored one multiplied out). ``compiling``: whether a graph is traced, where the
    caller knows it."""
    var = get_variance(mem, compiling=compiling)
    if not isinstance(var, Tensor):  # none, mean mode's probe, or unknown: the rules' way
        return attach_computed_variance(mem - threshold, var, compiling=compiling)
    with torch._C.DisableTorchFunctionSubclass():
        u = mem - threshold
    return attach_derived_variance(u, var, mem, compiling)


def _same_values(mem: Tensor, source: Tensor) -> Tensor:
    """Whether ``mem`` holds the values of ``source`` (NaN for NaN, which
    ``check_finite(False)`` lets through): a 0-dim tensor, for a choice in the graph."""
    values, kept = mem.detach(), source.detach()
    return ((values == kept) | ((values != values) & (kept != kept))).all()


def _compiled_copy_reset(mem: Tensor, stored: Tensor, spikes: Tensor,
                         fresh: Tensor) -> Tensor:
    """The reset of membrane ``mem`` in a compiled graph: the ``spikes`` that the stored
    membrane emitted where ``mem`` is a value copy of it (:func:`_copy_of`, which eager
    mode uses, here without a data-dependent branch: ``torch.where`` on a 0-dim
    condition), else ``fresh`` (``1[mem > threshold]``: a new membrane emitted no spike).

    Args:
        mem: the membrane of the reset call (a graph input, e.g. ``mem.detach()`` passed
            back by an explicit time loop between compiled chunks).
        stored: the membrane the neuron fired from at its last step.
        spikes: the spikes it emitted then.
        fresh: the reset of a membrane that emitted no spike.

    Returns:
        ``spikes`` or ``fresh``, chosen in the graph.
    """
    if not _same_layout(mem, stored) or spikes.shape != fresh.shape:
        return fresh
    if torch.is_grad_enabled() and (_is_inference(stored) or _is_inference(spikes)):
        # kept by a step under torch.inference_mode(): a graph input that the compiled
        # backward may save (to recompute the membrane), which autograd refuses for an
        # inference tensor. A membrane of such a step is no training step's to continue
        return fresh
    return torch.where(_holds_copy(mem, stored), spikes.to(fresh.dtype), fresh)


def _compiled_copy_variance(mem: Tensor, stored: Tensor, var) -> Tensor | None:
    """The noise variance of membrane ``mem`` in a compiled graph: the ``var`` of the
    stored membrane where ``mem`` has its values (a ``detach()`` passed back by an explicit
    time loop, e.g. from an eager chunk into a compiled one), else 0 (a new membrane), as
    :func:`_compiled_copy_reset` chooses the reset; ``None`` where no choice is possible
    (no variance tensor, another layout, a stored state of an inference step) and for a
    membrane with a graph (a new one: a learned initial membrane).

    Raises:
        RuntimeError: ``mem`` has a graph and the stored membrane's values (a copy,
            ``mem.clone()``, from an earlier call; when the graph runs), naming the fix.
    """
    if not isinstance(var, Tensor) or not _same_layout(mem, stored):
        return None
    if torch.is_grad_enabled() and (_is_inference(stored) or _is_inference(var)):
        return None  # see _compiled_copy_reset
    same = _holds_copy(mem, stored)
    if mem.requires_grad:
        # a membrane with a graph that is not the kept one: computed in this call (a
        # learned initial membrane) it is a new membrane, and ``var``'s graph belongs to an
        # earlier call (freed by its backward: a where() on it would fail there). A copy
        # with a graph (mem.clone() between calls) would need that graph: refused
        torch._assert_async(~same, _COPY_WITH_GRAPH_ERROR)
        return None
    return torch.where(same, var, 0.0)


_COPY_WITH_GRAPH_ERROR = (
    "the membrane passed to this compiled step is a copy with a graph (e.g. mem.clone()) of "
    "the membrane a converted snnTorch neuron kept from an earlier call: a compiled step "
    "cannot follow its noise variance's graph into that call. Pass the membrane the step "
    "returned as it is (backpropagation through both calls), or detach it "
    "(mem = mem.detach(), truncated BPTT)")


@torch.compiler.assume_constant_result
def _is_inference(t: Tensor) -> bool:
    """Whether ``t`` was made under ``torch.inference_mode()``, also in a graph being
    traced (where Dynamo cannot call ``Tensor.is_inference``): read once per compile, which
    the graph's guard on its inputs' dispatch keys (an inference tensor's differ) renews."""
    return t.is_inference()


def _check_input_current(neuron: nn.Module, x: Tensor) -> None:
    """Raise where the input current of a converted neuron went through an operation
    without a variance rule, naming the neuron and the Bayesian layers whose noise it
    carries (eager mode; the spike function, which raises in a compiled step, knows
    neither).

    Raises:
        VarianceFlowError: naming the operation, the neuron, the layers and the fix.
    """
    var = raw_variance(x)
    if not isinstance(var, UnknownVariance):
        return
    this, layers = noise_sources(x, neuron)
    where = f"neuron {this!r}" if this else f"this {type(neuron).__name__}"
    fed = f", fed by the Bayesian layer(s) {', '.join(map(repr, layers))}" if layers else ""
    fix = (f"keep those layers deterministic (exclude={layers!r} in to_sbnn)" if layers
           else "keep the layer in front deterministic (exclude= in to_sbnn)")
    raise VarianceFlowError(
        f"the input of this spike function went through '{var.op}', whose effect on the "
        f"posterior variance is unknown ({where}{fed}). Use a supported operation between "
        "the Bayesian layer and the neuron (see sbnn_addons.moments), register a rule with "
        f"sbnn_addons.moments.register_variance_rule, or {fix}.")


def _stepped_by_another(neuron: nn.Module, mem: VarianceTensor) -> bool:
    """In a compiled step: whether the carrier ``mem`` is the membrane of a step of
    another converted neuron (:attr:`~sbnn_addons.moments.VarianceTensor.emitter`), or
    was computed from one (``0.5 * mem_enc``). Eager mode keeps a membrane's variance
    and emitted spikes with the neuron that stepped it: to another neuron it is a new
    membrane."""
    source = _moments._membrane_behind(mem, _DERIVED)
    return source is not None and getattr(source, _EMITTER, None) is not neuron


def _check_passed_membrane(neuron: nn.Module, mem: Tensor) -> None:
    """Check a membrane passed to a converted neuron that carries a variance of its own
    (a tensor computed from a Bayesian layer's output).

    Raises:
        VarianceFlowError: its variance is unknown (an operation without a variance rule
            changed it).
    """
    var = raw_variance(mem)
    name = type(neuron).__name__
    if isinstance(var, UnknownVariance):
        what = f"the membrane passed to this {name} went through"
        raise_error(
            f"{what} '{var.op}', which has no variance rule, so its noise variance is "
            "unknown (the neuron would restart it silently). Edit the "
            "membrane only with operations that have one (a scaling or a shift: "
            "mem = 0.5 * mem, mem * c, mem + c), register a rule with "
            "sbnn_addons.moments.register_variance_rule, or start a new sequence with a new "
            "membrane (mem = lif.init_leaky()) instead of changing it", VarianceFlowError)



def _step_records(neuron: nn.Module) -> WeakIdKeyDictionary:
    """Per membrane this neuron computed and that is still alive (it or an alias of it:
    :func:`_record_key`): its variance state and
    the spikes it emitted (its reset). The neuron's own state holds its last step; these
    serve a step on another membrane: one neuron called on several membranes in turn
    (one ``snn.Leaky`` shared by several layers of an explicit loop), and a step replayed
    on an earlier membrane (``torch.utils.checkpoint`` recomputing a step in the
    backward). Eager mode only; a copy of the neuron does not carry them."""
    records = neuron.__dict__.get(_HISTORY)
    if records is None:
        records = neuron.__dict__[_HISTORY] = WeakIdKeyDictionary()
    return records


def _record_key(mem: Tensor) -> tuple:
    """Where the records of ``mem``'s step are kept: its storage, which lives as long as
    any alias of the membrane lives (``mem.detach()``, kept by a loop that replaced the
    membrane itself: truncated BPTT), and its view of it; ``mem`` itself for a tensor
    without a storage of its own (a ``torch.func`` transform's)."""
    key = storage_view(mem)
    return (mem, None) if key is None else key


def _find_step_record(neuron: nn.Module, mem: Tensor) -> dict:
    """The records of ``mem``'s step: ``mem`` itself, or an alias of it (a detach, what a
    recomputation gets back from autograd's saved tensors); ``{}`` if none."""
    key, view = _record_key(mem)
    return _step_records(neuron).get(key, {}).get(view, {})


def _step_record(neuron: nn.Module, mem: Tensor) -> dict:
    records = neuron.__dict__.get(_HISTORY)  # _step_records(neuron), inline
    if records is None:
        records = neuron.__dict__[_HISTORY] = WeakIdKeyDictionary()
    key, view = _record_key(mem)
    return records.setdefault(key, {}).setdefault(view, {})


def _check_ddp_buffer_sync(neuron: nn.Module) -> None:
    """Refuse a step that continues a membrane which ``DistributedDataParallel`` overwrote
    since the neuron's last step: with buffer synchronisation on (its default), DDP
    copies every buffer from rank 0 at the start of each forward call, the membrane
    included, and keeps its version counter, so the other ranks would continue rank 0's
    membrane with their own inputs and noise variance (wrong results and gradients,
    without an error). A model converted by :func:`to_sbnn` and wrapped directly is
    spared (it names its neuron states to DDP as buffers to leave alone)."""
    ddp_type = _DDP_TYPE[0] if _DDP_TYPE else _ddp_type()
    ddp = None if ddp_type is None else ddp_type._get_active_ddp_module()
    synced = None
    mem = neuron._buffers.get("mem")
    if (ddp is not None and mem is not None and ddp.will_sync_module_buffers()
            and any(b is mem for b in ddp.modules_buffers)):
        synced = ddp.modules_buffers  # a new list at every forward call's synchronisation
    stored = neuron.__dict__.get(_STATE)
    continuing = stored is not None and mem is not None and mem is stored[0] and bool(mem.numel())
    if synced is not None and continuing and neuron.__dict__.get(_DDP_SYNC) is not synced:
        raise RuntimeError(
            f"this converted snnTorch {type(neuron).__name__} continues its membrane in a new "
            "forward call of DistributedDataParallel, which has just overwritten it with "
            "rank 0's (DDP synchronises every buffer at the start of a forward call, the "
            "neuron states included): the other ranks would continue rank 0's membrane "
            "(wrong results and gradients). Wrap the converted model itself in DDP (to_sbnn "
            "names its neuron states to DDP as buffers to leave alone), or pass "
            "broadcast_buffers=False (forward_sync_buffers=False) to "
            "DistributedDataParallel"
        )
    neuron.__dict__[_DDP_SYNC] = synced


def _ddp_type():
    """``DistributedDataParallel`` where ``torch.distributed`` is available, else ``None``
    (looked up once)."""
    if not _DDP_TYPE:
        found = None
        if torch.distributed.is_available():
            from torch.nn.parallel import DistributedDataParallel as found
        _DDP_TYPE.append(found)
    return _DDP_TYPE[0]


_DDP_TYPE: list = []


def _state_buffer_names(model: nn.Module) -> list[str]:
    """The names (as in ``model.named_buffers()``) of the converted neurons' states:
    the membranes (and an ``RLeaky``'s spikes), which are per process, not model
    parameters to synchronise."""
    names = []
    for prefix, m in model.named_modules():
        if isinstance(m, _EmittedSpikeReset):
            for b in ("mem", "spk"):
                if b in m._buffers:
                    names.append(f"{prefix}.{b}" if prefix else b)
    return names


def _name_states_for_ddp(model: nn.Module) -> None:
    """Name the converted neurons' states to ``DistributedDataParallel`` as buffers to
    leave alone, so that ``DistributedDataParallel(model)`` keeps them per process. The
    list lives on the model under ``torch.compile``'s wrapper and holds each name twice:
    as the model names it (``1.mem``) and as the compiled wrapper does
    (``_orig_mod.1.mem``), since DDP reads the list through the wrapper but takes the
    wrapper's names; with the plain names only, DDP around ``torch.compile(model)``
    copied rank 0's membranes into every rank at each forward call, and a compiled step
    cannot check that."""
    model = compiled_wrapped(model)  # a compiled host model converted
    names = _state_buffer_names(model)
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    model._ddp_params_and_buffers_to_ignore = ignored + [
        n for n in names + [f"_orig_mod.{n}" for n in names] if n not in ignored]


def _without_graph(t):
    """``t`` detached where it is a tensor inside an autograd graph, else ``t``."""
    return t.detach() if isinstance(t, Tensor) and t.grad_fn is not None else t


def _fire_mark(mem: Tensor, compiling: bool | None = None) -> int | Tensor | None:
    """What tells whether a membrane is changed in place after it fired: its ``_version``;
    for an inference tensor (``torch.inference_mode()``, no version counter) a copy of its
    values; ``None`` in a compiled graph. ``compiling``: whether a graph is traced, where
    the caller knows it."""
    if torch.compiler.is_compiling() if compiling is None else compiling:
        return None
    with torch._C.DisableTorchFunctionSubclass():  # two attribute reads: no variance flow
        inference = mem.is_inference()
        if not inference:
            return mem._version
    return mem.detach().clone()


def _unchanged(t: Tensor, mark: int | Tensor | None, compiling: bool | None = None) -> bool:
    """Whether ``t`` is unchanged in place since it had the :func:`_fire_mark` ``mark``
    (``None``, or values to compare: taken as unchanged here). ``compiling``: whether a
    graph is traced, where the caller knows it."""
    return not isinstance(mark, int) or _version_of(t, compiling) in (None, mark)


def _stored_variance(neuron: nn.Module, detached: bool = False,
                     compiling: bool | None = None):
    """The variance of a neuron's plain membrane buffer: the stored ``V`` while ``mem`` is
    the membrane it belongs to (that tensor, or a ``detach()`` of it: truncated BPTT in
    an explicit loop), else ``None`` (a new membrane, e.g. ``init_leaky()``).
    ``detached``: without its graph where the membrane was detached since.
    ``compiling``: whether a graph is traced, where the caller knows it.

    Raises:
        VarianceFlowError: the membrane was changed in place since the step that computed
            it (its variance is unknown).
    """
    mem = neuron._buffers.get("mem")
    if compiling is None:
        compiling = torch.compiler.is_compiling()
    state = read_state(neuron, _STATE, compiling)
    if state is None or mem is None:
        return None
    stored, var, had_grad, version = state
    if compiling:
        # an edit assigned between compiled steps (a graph cannot walk autograd's graph,
        # which _computed_from reads: _note_membrane_edit did when it was assigned)
        edited = read_state(neuron, _EDITED, compiling)
        if edited is not None and mem is edited:
            raise_error(str(_edited_membrane_error(neuron)), VarianceFlowError)
    if mem is not stored:
        # a detach() of the stored membrane (checked in eager mode: a graph cannot compare
        # storages), also of one that a compiled step stored
        if compiling:
            # (eager mode's test of a detach or a copy, by value in the graph)
            var = _compiled_copy_variance(mem, stored, var)
            if var is None:
                return None
        elif _copy_of(mem, stored):  # mem.clone(), mem + 0, a copy's own membrane
            # with the kept variance's graph where the copy has one (mem.clone()), as an
            # alias keeps it: only a copy without a graph (mem.detach().clone()) drops it
            if detached and had_grad and not mem.requires_grad and isinstance(var, Tensor):
                return var.detach()
            return var
        elif not _aliases(mem, stored):
            # an earlier step's membrane: a recomputation (activation checkpointing)
            record = _find_step_record(neuron, mem).get("state")
            if record is None:
                if var is not None and _computed_from(mem, stored):
                    raise _edited_membrane_error(neuron)
                return None
            var, had_grad, version = record
    if (var is not None and version is not None
            and _version_of(mem, compiling) not in (None, version)):
        # (without a variance, mean mode's included, there is none to lose: the step goes
        # on from the changed values, as in snnTorch)
        raise _changed_in_place_error(neuron)
    if detached and had_grad and not mem.requires_grad and isinstance(var, Tensor):
        var = var.detach()
    return var


def _note_membrane_edit(neuron: nn.Module, value) -> None:
    """When ``value`` is assigned to a converted neuron's membrane buffer in eager Python
    (``lif.mem = 0.5 * lif.mem`` between compiled steps): keep it as the neuron's edited
    membrane where it was computed from the kept membrane out of place while that one has
    a variance (:func:`_computed_from`, as eager mode's next step tests it), else forget
    any. A compiled step, which cannot walk autograd's graph, then refuses that membrane
    (:func:`_stored_variance`) instead of taking it for a new one and restarting its
    variance from 0, silently. Nothing while a graph is traced (a compiled step's own
    assignments do not run this hook)."""
    if torch.compiler.is_compiling():
        return
    d = neuron.__dict__
    state = d.get(_STATE)
    if (type(value) is Tensor and state is not None and isinstance(state[1], Tensor)
            and value is not state[0] and _computed_from(value, state[0])):
        d[_EDITED] = value
    elif d.get(_EDITED) is not None:
        del d[_EDITED]


def _changed_in_place_error(neuron: nn.Module) -> VarianceFlowError:
    return VarianceFlowError(
        f"the membrane of this {type(neuron).__name__} was changed in place since its "
        "last step, so its noise variance is unknown; start a new sequence with a new "
        "membrane (mem = lif.init_leaky(), or snntorch.utils.reset(model)) instead of "
        "changing it in place"
    )


def _edited_membrane_error(neuron: nn.Module) -> VarianceFlowError:
    name = type(neuron).__name__
    return VarianceFlowError(
        f"the membrane passed to this {name} was computed from its last membrane out of "
        "place (e.g. mem = 0.5 * mem, mem.clamp(...)): the neuron follows the noise "
        "variance of the membranes its steps return, not of an edit of one, and would "
        "restart it silently. Pass the membrane back as the step returned it (apply the "
        "change to the input current instead), or start a new sequence with a new "
        "membrane (mem = lif.init_leaky())"
    )


def membrane_variance(neuron: nn.Module) -> Tensor | None:
    """The noise variance ``V`` of a converted neuron's current membrane, or ``None``
    (no noise yet, or reset with the membrane; always for a neuron left out by ``exclude`` from
    the conversion).

    Args:
        neuron: a neuron of a model converted by :func:`to_sbnn` (or one built with
            ``spike_grad=spike_grad()``).

    Raises:
        TypeError: ``neuron`` is not an snnTorch neuron, or one that was not converted
            (e.g. of the original model: :func:`to_sbnn` converts a copy).
    """
    if not isinstance(neuron, nn.Module) or not _is_snn_neuron(neuron):
        raise TypeError(f"membrane_variance takes an snnTorch neuron (e.g. model.lif1) of a "
                        f"converted model, got {type(neuron).__name__}")
    converted = (isinstance(neuron, _EmittedSpikeReset)
                 or isinstance(neuron.__dict__.get("spike_grad",
                                                   neuron._modules.get("spike_grad")),
                               IWSTSpike)
                 or refuse_variance in neuron._forward_pre_hooks.values())  # excluded
    if not converted:
        raise TypeError(
            f"this snn.{type(neuron).__name__} is not converted, so it carries no noise "
            "variance: pass a neuron of the model to_sbnn returned (to_sbnn converts a "
            "copy unless inplace=True: model = to_sbnn(net))")
    mem = neuron._buffers.get("mem")
    if type(mem) is VarianceTensor:
        return get_variance(mem)
    return _stored_variance(neuron)


def _instance_lists(neuron_type: type | None = None) -> list[list]:
    """The lists snnTorch's class-level ``reset_hidden`` / ``detach_hidden`` iterate over
    (``SpikingNeuron.instances``; a subclass's own list where ``clear_instances`` made one),
    those of ``neuron_type``'s classes included."""
    from snntorch._neurons.neurons import SpikingNeuron

    lists: dict[int, list] = {}
    extra = neuron_type.__mro__ if neuron_type is not None else ()
    for cls in (SpikingNeuron, snn.Leaky, snn.RLeaky, *extra):
        lst = getattr(cls, "instances", None)
        if isinstance(lst, list):
            lists.setdefault(id(lst), lst)
    return list(lists.values())


def _register(m: nn.Module) -> None:
    """Register a neuron made without ``__init__`` (a copy) in snnTorch's instance lists,
    so that ``snntorch.utils.reset`` / ``detach_hidden`` reach it."""
    for lst in _instance_lists(type(m)):
        if not any(x is m for x in lst):
            lst.append(m)


def _link_state_update(m: nn.Module) -> None:
    """Route the neuron's bound ``state_function`` through ``_sbnn_state_update``."""
    fn = m.__dict__.get("_sbnn_host_state") or m.state_function
    m._sbnn_host_state = getattr(m, fn.__func__.__name__)  # re-bound through the subclass
    m.state_function = m._sbnn_state_update


def _unlink_state_update(m: nn.Module) -> None:
    host = m.__dict__.pop("_sbnn_host_state", None)
    if host is not None:
        m.state_function = getattr(m, host.__func__.__name__)


class SBNNLeaky(_EmittedSpikeReset, snn.Leaky):
    """``snn.Leaky`` whose reset is the emitted spike (set by :func:`to_sbnn`).

    A step that continues its membrane in ``sample`` mode (eager, float32 on the CPU with
    the fused kernel, reset by subtraction or none) runs as one kernel call
    (:func:`~sbnn_addons.kernels.LIFStep`): the same membrane, spikes (same draws),
    variance, auxiliary terms and gradients as snnTorch's own steps through the methods
    below, without their dozen operations. Any other step takes those methods.
    """

    def _fused_step(self, input_: VarianceTensor, mem: Tensor | None = None,
                    *extra, **kwargs) -> Tensor | tuple[Tensor, Tensor] | None:
        """One step of snnTorch's ``Leaky.forward`` (reset by subtraction or none) as one
        kernel call, where it applies; else ``None`` (nothing changed: the caller takes
        snnTorch's steps).

        .. code-block:: text

            r_t = h_{t-1}                          (the spikes emitted, kept)
            m_t = (beta m_{t-1} + I_t) - r_t theta  ("subtract"; "none": no r_t term)
            V_t = beta^2 V_{t-1} + var(I_t)
            h_t = 1[U < Phi((m_t - theta) / sqrt(V_t + s_n^2))]

        It applies where the membrane (passed, or the buffer with ``init_hidden``) is the
        one this neuron's last step returned, unchanged, with its variance and spikes,
        the input carries a variance tensor, the spike function holds the neuron's
        threshold, nothing observes the spike function (forward or backward hooks,
        :class:`~sbnn_addons.metrics.SpikeMonitor`), and no
        saved-tensor hooks are active (activation checkpointing: its recomputation must
        save what the forward saved).

        Args:
            input_: the input current ``I_t`` (a carrier of ``var(I_t)``), ``[B, *]``.
            mem: the membrane ``m_{t-1}`` of an explicit loop, or ``None``.

        Returns:
            What ``snn.Leaky.forward`` returns (``spk`` or ``(spk, mem)``), or ``None``.
        """
        d, buffers = self.__dict__, self._buffers
        if (extra or kwargs or self.state_quant or self.inhibition or not self.reset_delay
                or "fire" in d or "mem_reset" in d or "threshold" in self._parameters
                or "beta" in self._parameters or "reset" in buffers
                or (mem is not None and self.init_hidden)):
            return None
        host = getattr(d.get("_sbnn_host_state"), "__func__", None)
        if (host not in _FUSED_STATE_FUNCTIONS
                or getattr(d.get("state_function"), "__func__", None)
                is not _EmittedSpikeReset._sbnn_state_update):
            return None
        spike = self._modules.get("spike_grad")
        if type(spike) is not IWSTSpike or torch.is_inference_mode_enabled():
            return None
        self._sync_spike_threshold(False)  # a threshold changed in place since: read now
        if (spike.deterministic or not spike.use_input_variance
                or not spike._threshold_finite or "fire" in spike.__dict__
                or spike._forward_hooks or spike._forward_pre_hooks
                or spike._backward_hooks or spike._backward_pre_hooks
                or nn.modules.module._global_forward_hooks
                or nn.modules.module._global_forward_pre_hooks
                or nn.modules.module._global_backward_hooks
                or nn.modules.module._global_backward_pre_hooks or _RECOMPUTING[0]
                or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None):
            # (saved-tensor hooks: an activation checkpointing region, whose recomputation
            # in the backward, of other membranes, takes snnTorch's steps and must save
            # the tensors the forward saved)
            return None
        membrane = buffers.get("mem") if mem is None else mem
        state, cached = d.get(_STATE), d.get(_CACHE)
        if (type(membrane) is not Tensor or state is None or state[0] is not membrane
                or cached is None or cached[0] is not membrane
                or membrane.shape != input_.shape or membrane.dtype != torch.float32
                or not membrane.is_cpu):
            return None
        var_prev, had_grad, version = state[1], state[2], state[3]
        if (type(var_prev) is not Tensor or not isinstance(version, int)
                or membrane._version != version or cached[2] != version):
            return None
        current_var = input_.variance
        if type(current_var) is ScaledVariance:
            current_var = current_var.value()
        elif type(current_var) is not Tensor:
            return None
        beta, thr = buffers.get("beta"), buffers.get("threshold")
        if (type(beta) is not Tensor or beta.dim() or not beta.is_cpu or beta.requires_grad
                or type(thr) is not Tensor or thr.dim() or thr.requires_grad
                or not thr.is_cpu or thr.item() != spike.threshold
                or not self._unit_spike_factor(False)):
            # (a threshold edited through .data since the spike function read it: snnTorch's
            # steps drive and reset with the new value, its auxiliary terms with the old)
            return None
        with torch._C.DisableTorchFunctionSubclass():
            x = input_.as_subclass(Tensor)  # an alias: input_ keeps its variance
        if not kernels.can_fuse(x, current_var, False):
            return None
        # the variance as _sbnn_moments and IWSTSpike.noise_variance compute it
        if had_grad and not membrane.requires_grad and var_prev.requires_grad:
            var_prev = var_prev.detach()  # detach_hidden() since the last step
        decay = min(max(beta.item(), 0.0), 1.0)  # snnTorch's beta.clamp(0, 1)
        var = scale_variance(var_prev, decay, False) + current_var
        own_var = spike.own_noise_variance()
        total = var if own_var is None else var + own_var.to(variance_dtype(torch.float32))
        generator = spike._generator_for(x, False)
        aux = spike._aux_wanted()
        pull = (spike.aux_pull > 0 and spike.training and torch.is_grad_enabled()
                and (x.requires_grad or membrane.requires_grad))
        config = (spike.estimator, decay, spike.threshold, "none",
                  spike.at_zero, spike._aux_offset(spike.threshold) if aux else None,
                  bool(spike.aux_std_grad), spike.aux_pull if pull else 0.0)
        reset = cached[1]
        out = kernels._fused_lif_step(x, membrane, total, kernels._seed(generator), config,
                                      subtracted=reset if host is snn.Leaky._base_sub
                                      else None)
        spikes, new_mem = out[0], out[1]
        if check_finite.enabled() and not in_checked_model():
            # the spike function's own check of its drive (a converted model checks its
            # input instead): a NaN in H_t is one in u_t = H_t - theta (theta finite)
            check_input(new_mem, f"the spike function ({type(spike).__name__})",
                        nan_only=True)
        if _moments._OPEN_FLOWS:  # the input's draws consumed here (the flow's check)
            nset = _moments._noise_of(input_, False)
            if nset is not None:
                _moments._CONSUMED.append(nset)
        if aux:
            spike._collect(out[2], new_mem)
        buffers["mem"] = new_mem
        d["reset"] = reset
        self._keep_reset(new_mem, spikes, False)
        self._store_state(new_mem, var, False)
        if self.output or not self.init_hidden:
            return spikes, new_mem
        return spikes


#: The host state functions :meth:`SBNNLeaky._fused_step` runs as one kernel call.
_FUSED_STATE_FUNCTIONS = (snn.Leaky._base_sub, snn.Leaky._base_int)

#: The host state functions whose variance :meth:`_EmittedSpikeReset._sbnn_moments`
#: writes out (``snn.Leaky``'s own; ``RLeaky``'s also runs its recurrent layer, a
#: subclass's own override is left to the rules), with whether each resets to zero.
_MOMENT_FORMS = {snn.Leaky._base_sub: False, snn.Leaky._base_int: False,
                 snn.Leaky._base_zero: True}


class SBNNRLeaky(_EmittedSpikeReset, snn.RLeaky):
    """``snn.RLeaky`` whose reset is the emitted spike (set by :func:`to_sbnn`).

    Reset-to-zero is computed as ``(1 - reset) * base`` (same value as snnTorch's
    ``base - reset * base``) so that the variance flow sees one noisy term.
    """

    def _base_zero(self, input_):
        return (1 - self.reset) * self._base_state_function(input_)


_TO_SBNN = {snn.Leaky: SBNNLeaky, snn.RLeaky: SBNNRLeaky}
_TO_PLAIN = {v: k for k, v in _TO_SBNN.items()}


def _is_snn_neuron(m: nn.Module) -> bool:
    from snntorch._neurons.neurons import SpikingNeuron

    return (
        isinstance(m, SpikingNeuron)
        or type(m).__module__.startswith("snntorch._neurons")
        or (hasattr(m, "spike_grad") and type(m).__module__.startswith("snntorch"))
    )


def _refuse_host_variance(module: nn.Module, name: str, value) -> None:
    """Global buffer hook (``torch.nn.modules.module.register_module_buffer_registration_hook``,
    which ``nn.Module.__setattr__`` also calls when a buffer is assigned): an snnTorch
    neuron that is not converted, and whose spike function is not a drop-in
    :func:`spike_grad`, must not store a state (``mem``, ``syn``) that carries a Bayesian
    layer's variance (or, in ``mean`` mode, the variance flow's probe): its surrogate would
    drop the variance silently, and the layer's std would get no gradient. One check for
    every host neuron, wherever it sits (added to a model after :func:`to_sbnn`, or in a
    new model built around a converted layer); a neuron fed by a converted neuron's spikes
    gets no variance and is not concerned.

    A neuron with a synaptic state (``snn.Synaptic``, ``snn.RSynaptic``, ``snn.Alpha``) is
    refused also with the drop-in spike function: its two states carry the same noise,
    correlated, which neither the variance flow nor the spike function can track.

    Raises:
        VarianceFlowError: naming the neuron and the fixes that work for it.
    """
    if type(value) is not VarianceTensor:
        if name == "mem" and isinstance(module, _EmittedSpikeReset):
            _note_membrane_edit(module, value)
        return None
    message = _host_variance_message(module, name, value)
    if message is not None:
        raise_error(message, VarianceFlowError)
    return None


def _host_variance_message(module: nn.Module, name: str,
                           value: Tensor | None = None) -> str | None:
    """The error of :func:`_refuse_host_variance` for ``module`` storing a Bayesian
    layer's variance in its state ``name`` (``value``, where known), or ``None`` where the
    neuron takes it (a converted one, or a one-state neuron with the drop-in spike
    function whose state update keeps the variance known)."""
    if isinstance(module, _EmittedSpikeReset) or not _is_snn_neuron(module):
        return None
    two_states = hasattr(module, "syn") or hasattr(module, "syn_exc")
    spike = module.__dict__.get("spike_grad", module._modules.get("spike_grad"))
    drop_in_fn = isinstance(spike, IWSTSpike)
    if drop_in_fn and not two_states:
        # the drop-in spike function reads the variance itself, where it is known
        if value is None or not spike.use_input_variance:
            return None
        return _unknown_state_message(module, name, raw_variance(value))
    what = type(module).__name__
    if drop_in_fn:
        problem = (
            f"this snn.{what} has a variance-aware spike function, but its input carries "
            f"the posterior variance of a Bayesian layer (in its state '{name}'), which "
            "its synaptic and membrane states would both carry: their noise is correlated, "
            "and the variance reaching the spike function would be wrong. ")
    else:
        problem = (
            f"this snn.{what} is not converted, but its input carries the posterior variance "
            f"of a Bayesian layer (its state '{name}' would carry it to a surrogate that "
            "drops it silently: the layer's std would get no gradient). ")
    drop_in = ("give it a variance-aware spike function: "
               f"snn.{what}(..., spike_grad=sbnn_addons.snntorch.spike_grad())")
    if what in SUPPORTED_NEURONS:
        fix = ("Convert the neuron, e.g. model.lif = sbnn_addons.snntorch.to_sbnn(model.lif) "
               f"(or add it before converting the model), or {drop_in}")
    elif two_states:
        fix = (f"snn.{what} cannot take a Bayesian layer's noise (its synaptic and membrane "
               "states carry the same noise, correlated, which the variance flow does not "
               "track): keep the layers that feed it deterministic (exclude= them from "
               "to_sbnn, or plain nn.Linear / nn.Conv2d layers in a model built by hand), "
               "or use snn.Leaky / snn.RLeaky there")
    else:
        fix = f"to_sbnn does not convert snn.{what}; {drop_in}, or use snn.Leaky there"
    return problem + fix


def _unknown_state_message(module: nn.Module, name: str, var) -> str | None:
    """The error for a one-state snnTorch neuron with the drop-in spike function whose own
    state update made the variance of a Bayesian layer's noise in its state ``name``
    unknown (``var``, an :class:`~sbnn_addons.moments.UnknownVariance`; else ``None``):
    the neuron options that do so, named with their fixes, instead of the operation
    inside snnTorch that the spike function would name.

    * reset to zero computed as ``base - reset * base`` (``snn.RLeaky``,
      ``snn.Lapicque``), or as the same-step reset ``mem - do_reset * mem``
      (``reset_delay=False``): two terms that carry the same noise;
    * ``state_quant``: a rounding of the membrane.
    """
    if not isinstance(var, UnknownVariance):
        return None
    return _unknown_state_message_of(module, name, var.op)


def _unknown_state_message_of(module: nn.Module, name: str, op: str | None) -> str | None:
    """:func:`_unknown_state_message` from the neuron's options; ``op``: the operation
    that made the variance unknown, for a neuron without such an option (``None``: no
    message there, as a compiled graph knows no such operation)."""
    what = type(module).__name__
    mechanism = module._buffers.get("reset_mechanism_val")
    zero = isinstance(mechanism, Tensor) and mechanism.numel() == 1 and int(mechanism) == 1
    causes, fixes = [], []
    if zero and not getattr(module, "reset_delay", True):
        causes.append("reset_delay=False with reset_mechanism='zero' applies its same-step "
                      "reset as mem - do_reset * mem, two terms that carry the same noise")
        fixes.append("use reset_delay=True (the default) or reset_mechanism='subtract'")
    if zero and isinstance(module, (snn.RLeaky, snn.Lapicque)):
        causes.append(f"snn.{what}(reset_mechanism='zero') resets as base - reset * base, "
                      "two terms that carry the same noise")
        fixes.append("use reset_mechanism='subtract' (or 'none')")
        if isinstance(module, snn.RLeaky) and getattr(module, "all_to_all", False):
            fixes.append("build the model with snnTorch surrogates and plain nn.Linear / "
                         "nn.Conv2d layers and convert it with sbnn_addons.snntorch.to_sbnn, "
                         "whose converted RLeaky resets to zero with the variance tracked")
    if getattr(module, "state_quant", False):
        causes.append("its state_quant quantises the membrane, a rounding whose effect on "
                      "the noise variance is not defined")
        fixes.append("remove state_quant (quantise the trained model instead)")
    if not causes:
        if op is None:
            return None
        causes.append(f"its state update passes it through '{op}', whose effect on the "
                      "noise variance is unknown")
        fixes.append("use snn.Leaky there")
    return (
        f"this snn.{what} has a variance-aware spike function, but the posterior variance "
        f"of a Bayesian layer in its state '{name}' is unknown: {'; '.join(causes)}. "
        f"Fix: {'; or '.join(fixes)}; or keep the layers that feed it deterministic "
        "(plain nn.Linear / nn.Conv2d layers, or exclude= them from to_sbnn)")


@torch.compiler.assume_constant_result
def _refuse_traced_unknown_state() -> None:
    """While ``torch.compile`` traces a drop-in spike function (:func:`spike_grad`)
    whose drive carries a Bayesian layer's variance: refuse a calling snnTorch neuron
    whose options make that variance unknown (a reset to zero of ``RLeaky`` /
    ``Lapicque``, the same-step reset of ``reset_delay=False``, ``state_quant``), with
    eager mode's message (:func:`_unknown_state_message`). Eager mode sees it in the
    variance of the membrane stored (two terms that share one noise); a graph does not
    track which noise a term carries, so the spike function would draw with a wrong
    variance, silently. Run in Python (a constant of the graph: no operation in it)."""
    for module in _moments._traced_modules():
        if _is_snn_neuron(module) and not isinstance(module, _EmittedSpikeReset):
            if hasattr(module, "syn") or hasattr(module, "syn_exc"):
                return  # refused with or without such an option (_host_variance_message)
            message = _unknown_state_message_of(module, "mem", None)
            if message is not None:
                _raise_user_error(message)
            return


def _in_place_cause(module: nn.Module) -> str | None:
    """:data:`~sbnn_addons.moments.IN_PLACE_CAUSES` entry: an in-place sum refused under
    ``torch.compile`` in a snnTorch neuron's state update (``syn -= ...`` of
    ``snn.Synaptic`` / ``snn.Alpha``) means that the neuron's input carries a Bayesian
    layer's variance; eager mode refuses it where the first state is stored, after the
    sum: the same message, naming that state."""
    state = next((b for b in ("syn_exc", "syn", "mem") if b in module._buffers), "mem")
    return _host_variance_message(module, state)


IN_PLACE_CAUSES.append(_in_place_cause)


_HOST_HOOK = torch.nn.modules.module.register_module_buffer_registration_hook(
    _refuse_host_variance)


def _check_neuron(name: str, m: nn.Module) -> None:
    cls = type(m)
    if cls in _TO_SBNN:
        check_neuron_constants(name, m, ("beta", "threshold"),
                               spike_scales=("graded_spikes_factor",))
        if not m.reset_delay:
            raise ValueError(
                f"module '{name}' uses reset_delay=False, which to_sbnn does not support (its "
                "same-step correction is applied outside the state update, so the tracked "
                "variance would be lost); build the neuron with the default reset_delay=True"
            )
        if m.state_quant:
            raise ValueError(
                f"module '{name}' uses state_quant, which to_sbnn does not support (the effect "
                "of quantising the membrane on its noise variance is not defined); remove "
                "state_quant before converting"
            )
        if getattr(m, "surrogate_disable", False):
            raise ValueError(
                f"module '{name}' uses surrogate_disable=True (a plain Heaviside, no gradient "
                "through its spikes), which to_sbnn would override: a converted neuron fires "
                "stochastically and its spike function is the gradient estimator. Build the "
                "neuron with surrogate_disable=False (e.g. "
                f"snn.Leaky(..., spike_grad=surrogate.atan())) before converting, or keep it "
                f"as it is with exclude=['{name}', ...] together with the layers feeding it"
            )
        check_heaviside_forward(name, m, m.spike_grad, at_zero=False, host="snnTorch",
                                attr="spike_grad", example="surrogate.atan()")
        return
    supported = ", ".join(f"snn.{n}" for n in SUPPORTED_NEURONS)
    keep = (f"or keep it with its surrogate: exclude=['{name}', ...] with the layers "
            "feeding it, which then stay deterministic")
    if cls.__name__ == "RecurrentOneToOne":
        raise TypeError(
            f"module '{name}' is the one-to-one recurrence of snn.RLeaky(all_to_all=False), "
            "which to_sbnn does not support; use all_to_all=True, or keep this recurrence "
            f"deterministic with exclude='{name}'"
        )
    if cls is snn.Synaptic:
        raise TypeError(
            f"module '{name}' is snn.Synaptic, which to_sbnn does not support: its two states "
            "(syn, mem) carry the same weight noise, so their noise is correlated and the "
            "independent-variance flow cannot track it exactly. Supported neurons: "
            f"{supported}. Replace it with snn.Leaky before converting, {keep}."
        )
    raise TypeError(
        f"module '{name}' is {cls.__module__}.{cls.__name__}, which to_sbnn does not support. "
        f"Supported neurons: {supported}. Replace it, {keep}."
    )


# --------------------------------------------------------------------------- helpers
def _already_converted(model: nn.Module) -> bool:
    return any(
        is_bayesian(m) or isinstance(m, IWSTSpike) or type(m) in _TO_PLAIN
        for m in model.modules()
    )


def _state_tensors(m: nn.Module) -> list[Tensor]:
    out = [b for n, b in m._buffers.items() if n in m._non_persistent_buffers_set]
    for key in ("reset", _CACHE, _STATE):
        val = m.__dict__.get(key)
        if isinstance(val, Tensor):
            out.append(val)
        elif isinstance(val, tuple):
            out.extend(v for v in val if isinstance(v, Tensor))
    return [t for t in out if t is not None]


def _safe_deepcopy(model: nn.Module) -> nn.Module:
    """``deepcopy`` that also works while neuron states still hold an autograd graph.

    Non-leaf state tensors are copied as detached clones (with their attached variance),
    and so is a weight pruned with ``torch.nn.utils.prune`` (its hook recomputes it).
    """
    memo: dict[int, object] = {}
    keep = []
    for m in model.modules():
        for value in m.__dict__.values():  # a pruned weight (torch.nn.utils.prune)
            if isinstance(value, Tensor) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
        if not _is_snn_neuron(m):
            continue
        for t in _state_tensors(m):
            if t.grad_fn is not None and id(t) not in memo:
                new = t.detach().clone()
                var = get_variance(t)
                if isinstance(var, Tensor):
                    attach_computed_variance(new, var.detach().clone())
                memo[id(t)] = new
                keep.append(t)
    return copy.deepcopy(model, memo)


def _thr(m: nn.Module) -> float:
    """The neuron's threshold as a float (the mean of a per-neuron or learned one); 1.0
    (snnTorch's default) for one on the ``meta`` device, which has no value: the spike
    function reads the neuron's threshold once it has one (``_sync_spike_threshold``)."""
    thr = m.threshold
    if isinstance(thr, Tensor) and thr.is_meta:
        return 1.0
    return threshold_value(thr)


_LAYERS = {nn.Linear: BayesLinear, nn.Conv1d: BayesConv1d, nn.Conv2d: BayesConv2d}
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d)


def reset(model: nn.Module) -> nn.Module:
    """Reset every neuron state in ``model`` (nested modules and copies included).

    Calls ``reset_mem()`` on every module that has it and clears the emitted-spike
    caches. Unlike ``snntorch.utils.reset`` it walks the whole module tree and touches
    only this model's neurons (works on ``deepcopy`` / ``torch.load`` copies). Returns
    ``model``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or it holds SpikingJelly neurons and
            no snnTorch one (use :func:`sbnn_addons.spikingjelly.reset`).
    """
    check_module(model, "snntorch.reset")
    refuse_other_host_reset(model, "snntorch", "spikingjelly")
    for m in model.modules():
        if m.__dict__.get(_CACHE) is not None or m.__dict__.get(_STATE) is not None:
            drop_state(m, _CACHE, _STATE)
        fn = getattr(m, "reset_mem", None)
        if callable(fn):
            fn()
    return model


# --------------------------------------------------------------------------- to_sbnn
def to_sbnn(
    model: nn.Module,
    estimator: str | Estimator = "st",
    *,
    std: float | None = None,
    std_mode: str = "layer",
    learn_std: bool = True,
    bias_std: float | None = None,
    spike_std: float | None = CONVERTED_SPIKE_STD,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    batchnorm: str = "keep",
    aux_loss: bool = False,
    aux_pull: float = DEFAULT_AUX_PULL,
    inplace: bool = False,
    example_input=None,
) -> nn.Module:
    """Convert an snnTorch model into a Spiking Bayesian network (Method page, sections 2-3).

    Serves both snnTorch styles: ``nn.Sequential`` with ``init_hidden=True`` neurons (time
    loop outside the model; the membrane keeps its attached variance between calls) and
    explicit time loops inside ``forward`` (``spk, mem = lif(fc(x), mem)``).

    .. code-block:: text

        a   = W_mean x + b,   var(a) = s^2 sum_i x_i^2 (+ s_b^2)     Bayesian layer
        U_t = beta U_{t-1} + a_t - S_{t-1} theta                       host neuron (mean)
        V_t = beta^2 V_{t-1} + var(a_t)                                variance flow
        S_t = 1[U_t - theta + sqrt(V_t + spike_std^2) eps > 0]         IWSTSpike
        reset at t+1 = S_t                                             emitted spike

    The defaults train out of the box: each layer's posterior std starts at a tenth of the RMS
    of its ported weights (the noise is a tenth of the spread of the signal, whatever the
    weights' scale), each neuron has a learned own noise std (``spike_std = 0.399``), a
    floor under the posterior noise so that a neuron whose inputs are silent still passes
    a gradient, and BatchNorm stays a BatchNorm (an untrained one keeps learning its
    statistics, and it scales the noise with the signal).

    Args:
        model: an snnTorch model with ``snn.Leaky`` / ``snn.RLeaky`` neurons.
        estimator: gradient estimator of the spikes (``"st"``, ``"iwst(p)"``, ``"agr"``).
        std: initial posterior std of the weight layers (``None``: a fraction
            :data:`~sbnn_addons.layers.CONVERTED_STD_FRACTION` = 0.1 of the RMS of each
            layer's weights, times the scale of a BatchNorm folded after it, see
            :func:`~sbnn_addons.layers.converted_std`).
        std_mode: ``"layer"``, ``"channel"`` or ``"weight"``.
        learn_std: learn the posterior stds (``False`` keeps them fixed, allows 0).
        bias_std: initial posterior std of the biases (``None``: none; layers without a
            bias get none).
        spike_std: the spike functions' own noise std in units of the neuron's threshold,
            ``sigma^2 = V + (spike_std |theta|)^2`` (default
            :data:`~sbnn_addons.spike.CONVERTED_SPIKE_STD` = 0.399, one per neuron layer;
            a per-neuron threshold counts by its mean, a threshold of 0 as 1; ``None`` or
            0: none, then a neuron fed only by silent inputs has a zero gradient, and a
            gradient reaching the spikes of a neuron without any noise, fed by a layer
            left deterministic, raises :class:`~sbnn_addons.moments.VarianceFlowError`).
            Relative, so that a network whose weights and thresholds are scaled together
            converts to the same noise level. Learned when ``learn_std`` is true and
            ``spike_std > 0``. Sized for a fresh network; after converting a trained
            one, size it to the data with :func:`sbnn_addons.calibrate_spike_std`.
        include: an ``fnmatch`` pattern (one string is one name) or a list of them, of
            qualified module names (``"fc*"``, ``"lif1.recurrent"``) of the weight layers
            to convert or of modules containing them; ``None``: all.
        exclude: patterns of modules to leave as they are: weight layers stay
            deterministic, neurons keep their surrogate (any neuron type, a
            ``snn.Synaptic`` included). An excluded neuron must not be fed by a Bayesian
            layer (it raises at its call, since it would drop the variance), so exclude
            the layers feeding it too. Each pattern must match a module.
        batchnorm: ``"keep"`` (default) keeps ``BatchNorm1d/2d`` (the variance is
            scaled like the mean by the flow's batch-norm rule, and in training mode the
            statistics keep learning, as in the original); ``"affine"`` replaces them by
            a mean-only :class:`~sbnn_addons.ChannelAffine` folded from the running
            statistics (the released configuration; the BatchNorm's scale is folded into
            the initial posterior std of the layer it directly follows (none after a
            neuron): with ``example_input`` the layer the forward calls right before it,
            otherwise the one declared right before it, which the converted model's first
            forward checks (a ``ValueError`` where the forward calls them in another
            order, see :func:`~sbnn_addons.layers.check_batchnorm_pairing`); channel by
            channel with
            ``std_mode="channel"`` / ``"weight"`` (layer-wide with a per-layer std),
            which keeps the signal-to-noise ratio; it freezes the statistics, so use it on trained
            models; another BatchNorm, e.g. ``nn.BatchNorm3d``, stays as it is, with a
            warning naming it).
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
        The converted model, with its variance flow installed (``track_variance``) and
        its neuron states reset.

    Every argument is checked before the model changes: with ``inplace=True`` a failed
    conversion leaves the model as it was. The converted model's neurons (copies
    included) are registered with snnTorch, so ``snntorch.utils.reset`` resets them and
    their noise variance; it checks its input at each call (no zero-size dimension; no
    NaN / inf unless :class:`sbnn_addons.check_finite` is off).

    In an explicit time loop a converted neuron follows the noise variance ``V`` of the
    membranes its steps return (passed back as returned, detached or cloned). A membrane
    computed from the last one out of place (``mem = 0.5 * mem``, ``mem.clamp(...)``)
    makes the next training step raise :class:`~sbnn_addons.moments.VarianceFlowError`
    (eager mode, where the membrane has a graph) instead of restarting ``V`` silently, and
    so does a membrane changed in place (``mem.mul_(mask)``, with or without a graph);
    ``mean`` mode, which carries no variance, runs such edits as snnTorch does (the reset
    is computed from the edited membrane).

    ``surrogate_disable=True`` (snnTorch: a plain Heaviside without a surrogate gradient)
    is refused rather than silently replaced by the stochastic spike function and its
    gradient estimator: build the neuron without it, or ``exclude`` it. A snnTorch neuron
    that is not converted (added after the conversion, or outside the converted model)
    and whose input carries a Bayesian layer's variance raises
    :class:`~sbnn_addons.moments.VarianceFlowError` at its call instead of dropping the
    variance: convert it (``to_sbnn`` on the neuron, e.g. ``net.lif = to_sbnn(net.lif)``)
    or give it ``spike_grad=sbnn_addons.snntorch.spike_grad()``.

    Raises:
        ValueError: the model is already converted (contains a Bayesian layer, an
            ``IWSTSpike`` or an SBNN neuron: ``"already converted"``); there is nothing to
            convert (no snnTorch neuron; a SpikingJelly model is named); an
            ``include`` pattern matches no layer or an ``exclude`` pattern no module; a
            bad ``estimator``, ``std``, ``std_mode``, ``bias_std``, ``spike_std`` or
            ``batchnorm``; a neuron to convert uses
            ``reset_delay=False``, ``state_quant`` or ``surrogate_disable=True``, has a
            NaN ``beta`` / ``threshold`` or a NaN or infinite ``graded_spikes_factor``,
            or a ``spike_grad`` whose forward is not snnTorch's Heaviside ``1[u > 0]``.
        TypeError: an unsupported neuron (``snn.Synaptic``: its correlated two-state
            noise; anything other than ``Leaky`` / ``RLeaky``; a SpikingJelly neuron),
            not excluded.
    """
    # every argument is validated before anything changes: a failed inplace=True
    # conversion leaves the model as it was
    check_module(model, "snntorch.to_sbnn")
    learn_std, aux_loss, inplace = (check_flag(n, v) for n, v in (
        ("learn_std", learn_std), ("aux_loss", aux_loss), ("inplace", inplace)))
    if batchnorm not in ("affine", "keep"):
        raise ValueError(f"batchnorm must be 'affine' or 'keep', got {batchnorm!r}")
    inc, exc = _patterns("include", include), _patterns("exclude", exclude)
    if _already_converted(model):
        if not any(is_bayesian(m) or type(m) in _TO_PLAIN for m in model.modules()):
            raise ValueError(
                "model's neurons use sbnn_addons spike functions (spike_grad()), so it "
                "trains as it is; to_sbnn converts a model with snnTorch surrogates: build "
                "the neurons with a snnTorch surrogate (e.g. spike_grad=surrogate.atan()), "
                "load the trained weights, then convert")
        raise ValueError(
            "model is already converted (it contains a Bayesian layer, an IWSTSpike or an "
            "SBNN neuron); convert the original snnTorch model, or to_snntorch(model) first"
        )
    neurons = [(n, m) for n, m in model.named_modules() if _is_snn_neuron(m)]
    for name, m in neurons:
        if not (exc and _match(name, exc)):  # an excluded neuron is left as it is
            _check_neuron(name or type(m).__name__, m)
    if not neurons:
        sj = host_neurons(model, "spikingjelly")
        hint = (f"; module '{sj[0][0]}' ({type(sj[0][1]).__name__}) is a SpikingJelly "
                "neuron: convert a SpikingJelly model with sbnn_addons.spikingjelly.to_sbnn"
                if sj else "")
        raise ValueError(
            "nothing to convert: model contains no snnTorch neuron "
            f"({', '.join('snn.' + n for n in SUPPORTED_NEURONS)}){hint}"
        )
    for name, m in host_neurons(model, "spikingjelly"):
        if not (exc and _match(name, exc)):
            raise TypeError(
                f"module '{name}' ({type(m).__name__}) is a SpikingJelly neuron, which "
                "sbnn_addons.snntorch.to_sbnn does not convert (it would drop the noise of "
                "the layers feeding it): convert a SpikingJelly model with "
                "sbnn_addons.spikingjelly.to_sbnn, or keep this neuron as it is with "
                f"exclude=['{name}', <the layers feeding it>]")
    layer_kw = dict(std=std, std_mode=std_mode, learn_std=learn_std, bias_std=bias_std)
    spike_learn = bool(learn_std and spike_std)
    _validate_arguments(model, estimator, layer_kw, spike_std, spike_learn, inc, exc)
    aux_pull = check_aux_pull(aux_pull)

    def name_selected(name: str) -> bool:
        return (inc is None or _match(name, inc)) and not _match(name, exc)

    # with example_input, each BatchNorm pairs with the layer the forward calls before it
    folds, affine_bns = ({}, set()) if batchnorm != "affine" else affine_batchnorm_plan(
        model, tuple(_LAYERS), _BNS, name_selected, lambda n: _match(n, exc), inc is not None,
        example_input)
    affines = fold_batchnorms(model, folds, affine_bns, layer_kw)

    out = model if inplace else _safe_deepcopy(model)

    # qualified names of every module (shared modules have several)
    names: dict[int, list[str]] = {}
    for n, m in out.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(n)
    modules = dict(out.named_modules())

    def excluded(m: nn.Module) -> bool:
        return bool(exc) and any(_match(n, exc) for n in names.get(id(m), []))

    def selected(m: nn.Module) -> bool:
        if inc is not None and not any(_match(n, inc) for n in names.get(id(m), [])):
            return False
        return not excluded(m)

    def convert(_name: str, child: nn.Module) -> nn.Module | None:
        new = None
        if type(child) in _LAYERS and selected(child) and not legacy_weight_norm(child):
            folded = next((folds[n] for n in names.get(id(child), []) if n in folds), None)
            kw = converted_layer_kwargs(child, layer_kw, modules.get(folded))
            new = _LAYERS[type(child)].from_module(child, **kw)
            new = keep_ties(new, child, ties, adopt=True)  # (a pruned layer's mask first)
            fold_channel_std(new, modules.get(folded), layer_kw)
        elif any(n in affines for n in names.get(id(child), [])):
            new = next(affines[n] for n in names[id(child)] if n in affines)
            new.__dict__[_BN_KIND] = type(child).__name__
        if new is not None:
            new.train(child.training)
        return new

    ties: dict[int, nn.Parameter] = {}
    replace_modules(out, convert)

    for m in out.modules():
        if _is_snn_neuron(m) and excluded(m):
            # excluded: kept as it is, and must get no variance
            if refuse_variance not in m._forward_pre_hooks.values():
                m.register_forward_pre_hook(refuse_variance)
            _register(m)  # a copy is not in snnTorch's instance lists (utils.reset)
            continue
        if type(m) in _TO_SBNN:
            host_fn = m.spike_grad  # kept for to_snntorch (an instance attribute or a module)
            m.__class__ = _TO_SBNN[type(m)]
            fn = IWSTSpike(estimator, std=relative_spike_std(spike_std, _thr(m)),
                           learn_std=spike_learn, threshold=_thr(m), aux_pull=aux_pull)
            thr = m.threshold
            if isinstance(thr, Tensor):  # the neuron's device and float dtype
                fn = fn.to(device=thr.device,
                           dtype=thr.dtype if thr.is_floating_point() else None)
            # the neuron's training mode: a model converted in eval mode stays in it (no
            # auxiliary terms or pull in its validation forwards with gradients on)
            fn.train(m.training)
            fn.noiseless_owner = (f"snn.{type(m).__name__.removeprefix('SBNN')}", "snnTorch")
            m.__dict__.pop("spike_grad", None)
            m.spike_grad = fn
            m.__dict__[_HOST_SPIKE] = HostObject(host_fn)
            _link_state_update(m)
            _register(m)  # a copy is not in snnTorch's instance lists (utils.reset)
    if inc is None:
        warn_deterministic_layers(out, lambda n: _match(n, exc), "snnTorch")
    reset(out)
    _name_states_for_ddp(out)
    track_variance(out, check_inputs=True)
    if aux_loss:
        enable_aux_loss(out)
    if example_input is None and std is None:  # paired by declaration order: checked
        check_batchnorm_pairing(out, folds, affine_bns, "snntorch")  # at the first call
    if example_input is not None:
        check_variance_flow(out, example_input)
    if not inplace:  # an optimiser of the original warns at its steps
        register_converted_copy(model, out)
    return out


def _validate_arguments(model, estimator, layer_kw, spike_std, spike_learn, inc, exc) -> None:
    """Raise for any bad argument of :func:`to_sbnn` before the model is touched."""
    check_std("spike_std", 0.0 if spike_std is None else spike_std, allow_zero=True)
    IWSTSpike(estimator, std=spike_std, learn_std=spike_learn)  # the spike's own noise
    BayesLinear(1, 1, **layer_kw)  # std, std_mode, learn_std, bias_std
    names = [n for n, _ in model.named_modules(remove_duplicate=False)]
    layer_names = [n for n, m in model.named_modules(remove_duplicate=False)
                   if type(m) in _LAYERS and not legacy_weight_norm(m)]
    for p in inc or ():
        if not any(_match(n, (p,)) for n in layer_names):
            raise ValueError(
                f"include pattern {p!r} matches no Linear/Conv1d/Conv2d layer (nor a module "
                f"containing one); layers are: {layer_names}"
            )
    for p in exc or ():
        if not any(_match(n, (p,)) for n in names if n):
            raise ValueError(
                f"exclude pattern {p!r} matches no module of the model; modules are: "
                f"{[n for n in names if n]}"
            )
    check_include_overlap(inc, exc, layer_names)
    neurons = [n for n, m in model.named_modules() if _is_snn_neuron(m)]
    if all(_match(n, exc) for n in neurons) and not any(
            (inc is None or _match(n, inc)) and not _match(n, exc) for n in layer_names):
        raise ValueError(
            "nothing to convert: exclude names every neuron and leaves no Linear/Conv1d/"
            f"Conv2d layer (include={inc!r}, exclude={exc!r}); the model would stay as it "
            "was")


# --------------------------------------------------------------------------- to_snntorch
def _check_host_spike_grad(fn, model: nn.Module) -> None:
    """Check a ``spike_grad`` given to :func:`to_snntorch`: a function that maps a
    membrane shift to spikes of its shape, as snnTorch calls it (checked on two values,
    without a graph), so that a wrong one fails here, not at the exported model's first
    step with an unrelated error (``'function' object has no attribute 'clone'``).

    Raises:
        TypeError: naming what was passed and the usual fix.
    """
    hint = ("pass a snnTorch surrogate, called: spike_grad=surrogate.atan() (not the "
            "factory surrogate.atan), or a function u -> spikes")
    if not callable(fn):
        raise TypeError(f"spike_grad must be a spike function, got {type(fn).__name__} "
                        f"{fn!r}; {hint}")
    ref = next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()),
               None)  # the model's device and float dtype
    probe = torch.tensor([-1.0, 1.0], device=None if ref is None else ref.device,
                         dtype=None if ref is None else ref.dtype)
    try:
        with torch.no_grad():
            out = fn(probe)
    except Exception as e:  # noqa: BLE001 - reported with the fix
        raise TypeError(f"spike_grad {fn!r} failed on a membrane shift tensor "
                        f"({type(e).__name__}: {e}); {hint}") from e
    if not isinstance(out, Tensor) or out.shape != probe.shape:
        what = type(out).__name__ if not isinstance(out, Tensor) else f"shape {tuple(out.shape)}"
        raise TypeError(f"spike_grad {fn!r} returned {what} for a membrane shift of shape "
                        f"{tuple(probe.shape)}, not spikes of that shape; {hint}")


def _affine_to_batchnorm(a: ChannelAffine) -> nn.Module:
    if a.channel_dim != 1:
        raise ValueError(
            f"cannot export a ChannelAffine with channel_dim={a.channel_dim} to BatchNorm "
            "(needs channel_dim=1)"
        )
    kind = a.__dict__.get(_BN_KIND, "BatchNorm1d")
    cls = nn.BatchNorm2d if kind == "BatchNorm2d" else nn.BatchNorm1d
    w = a.weight
    bn = cls(a.num_features, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        bn.weight.copy_(a.weight)
        bn.bias.copy_(a.bias)
    bn.weight.requires_grad_(a.weight.requires_grad)
    bn.bias.requires_grad_(a.bias.requires_grad)
    with torch.no_grad():
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
    return bn.eval()


def to_snntorch(model: nn.Module, spike_grad=None) -> nn.Module:
    """Export a converted model back to plain snnTorch / torch modules (a deep copy).

    Bayesian layers become their plain layers with the posterior means, ``ChannelAffine``
    becomes an eval-mode ``BatchNorm1d/2d`` with ``running_mean = 0``,
    ``running_var = 1 - eps``, weight ``gamma`` and bias ``beta`` (equivalent in eval mode
    only: keep the exported model in ``.eval()``), neurons become ``snn.Leaky`` /
    ``snn.RLeaky``, and the variance-flow hooks are removed. The result references no
    ``sbnn_addons`` code, so it loads without this package. In eval mode its spikes equal
    the SBNN's ``mean`` mode. Its neurons are registered with snnTorch, so
    ``snntorch.utils.reset`` resets them. Its neuron states start reset, whatever state
    ``model`` was in (an export in the middle of a sequence leaves ``model``'s own
    state as it was).

    The noise scales (``*std_rho``) are not exported: ``to_sbnn`` of the export starts
    new ones, sized from the weights as for any host model. To go on with the learned
    ones, load the SBNN's state dict into it
    (``again = to_sbnn(plain); again.load_state_dict(model.state_dict())``, with the
    conversion's arguments of ``model``).

    Args:
        model: a model returned by :func:`to_sbnn` (not modified), or its compiled
            wrapper ``torch.compile(model)``, which exports the model it wraps (a plain
            module: compile the export again where wanted).
        spike_grad: the exported neurons' spike function (an ``nn.Module``: a copy
            per neuron). ``None`` (default): each
            neuron gets back the surrogate it had before :func:`to_sbnn` (the same
            function, e.g. ``surrogate.fast_sigmoid(slope=25)``; after a pickle round
            trip a closure is rebuilt from its factory with the same arguments, and one
            that cannot be rebuilt, such as a user's own closure, raises). Where none
            was set, snnTorch's arctangent surrogate with ``alpha = 2`` as
            ``functools.partial(surrogate.ATan.apply, alpha=2.0)`` (it pickles, unlike
            the closure ``surrogate.atan()``).

    Raises:
        ValueError: a neuron's original surrogate was lost by pickling (a user's own
            closure cannot be rebuilt) and no ``spike_grad`` was given; ``model`` has no
            converted part (no Bayesian layer, ``ChannelAffine`` or converted neuron:
            e.g. the original given to ``to_sbnn``, which converts a copy).
        TypeError: ``spike_grad`` is not a spike function (``surrogate.atan``, the
            factory, instead of ``surrogate.atan()``; a name; a number); ``model`` was
            converted by ``sbnn_addons.spikingjelly.to_sbnn`` (exported by
            ``to_spikingjelly``).
    """
    from snntorch import surrogate

    check_module(model, "to_snntorch")
    model = compiled_wrapped(model)  # torch.compile(model): the plain model it wraps
    refuse_other_host_export(model, "spikingjelly", IWSTSpike)
    refuse_unconverted_export(model, "to_snntorch", _already_converted(model) or any(
        isinstance(m, ChannelAffine) for m in model.modules()))
    if spike_grad is not None:
        _check_host_spike_grad(spike_grad, model)
    out = _safe_deepcopy(model)
    untrack_variance(out)
    remove_batchnorm_pairing_check(out)
    out.__dict__.pop("_sbnn_flow_handles", None)

    ties: dict[int, nn.Parameter] = {}

    def export(_name: str, child: nn.Module) -> nn.Module | None:
        if is_bayesian(child):
            return keep_ties(child.to_module(), child, ties).train(child.training)
        if isinstance(child, ChannelAffine):
            return _affine_to_batchnorm(child)
        return None

    replace_modules(out, export)
    for m in out.modules():
        for key in [k for k, h in m._forward_pre_hooks.items() if h is refuse_variance]:
            del m._forward_pre_hooks[key]  # of an excluded neuron
        if type(m) in _TO_PLAIN:
            m.__class__ = _TO_PLAIN[type(m)]
            _unlink_state_update(m)
            host = m.__dict__.pop(_HOST_SPIKE, None)
            for key in (_CACHE, _STATE, "_sbnn_unit", _LAST_RECORD, _EDITED):
                m.__dict__.pop(key, None)
            m._modules.pop("spike_grad", None)
            # a module surrogate: a copy per neuron, as the original ones (one object
            # would tie its parameters across the exported neurons)
            fn = copy.deepcopy(spike_grad) if isinstance(spike_grad, nn.Module) else spike_grad
            if fn is None and isinstance(host, HostObject) and host.lost:
                raise ValueError(
                    f"cannot restore the original spike_grad {host.lost!r} of a "
                    f"{type(m).__name__}: it is a function that does not pickle (a "
                    "closure or lambda) and this model went through pickle / torch.save "
                    "since its conversion; pass the surrogate to use, e.g. "
                    "to_snntorch(model, spike_grad=surrogate.atan())")
            if fn is None:
                fn = host.get() if isinstance(host, HostObject) else None
                fn = copy.deepcopy(fn) if isinstance(fn, nn.Module) else fn
            if fn is None:
                fn = functools.partial(surrogate.ATan.apply, alpha=2.0)
            m.spike_grad = fn
            _register(m)
        elif isinstance(m, IWSTSpike):
            raise ValueError(
                "model contains an IWSTSpike outside a converted neuron (a neuron built "
                "with spike_grad()); to_snntorch exports models made by to_sbnn: give that "
                "neuron a snnTorch surrogate (neuron.spike_grad = surrogate.atan()) instead"
            )
    reset(out)
    for m in out.modules():  # drop attached variances left on any state tensor
        for t in _state_tensors(m):
            attach_computed_variance(t, None)
    return out
