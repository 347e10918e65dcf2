"""Framework-free SBNN LIF neuron with moment-tracked noise (Method page, section 3).

The reference networks (:mod:`sbnn_addons.models`) are built from :class:`LIF`.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from . import kernels
from .base import (
    call_eagerly,
    check_device,
    check_input,
    concrete_shape,
    mark_checked,
    raise_error,
)
from .functional import (
    LIF_RESETS,
    _variance_update,
    broadcasts_to,
    check_float,
    compact_broadcast,
    is_binary,
    lif_fire,
    mark_binary,
)
from .moments import (
    ScaledVariance,
    UnknownVariance,
    VarianceFlowError,
    attach_computed_variance,
    check_noise_scales,
    get_variance,
    no_variance_flow,
    plain,
    raw_variance,
)
from .spike import IWSTSpike, refuse_gradient_without_noise

__all__ = ["LIF", "LIFState"]

def _known(variance, what: str):
    """``variance`` itself, unless the input went through an operation without a rule."""
    if isinstance(variance, UnknownVariance):
        raise_error(f"the {what} went through '{variance.op}', whose effect on the "
                    "variance is unknown", VarianceFlowError)
    return variance


_ZERO = "zero"  # the factors of the initial state's V = 0 (any scale may follow)


def _zero_variance(like: Tensor) -> Tensor:
    """The initial ``V = 0``: one element (it broadcasts to any input variance)."""
    with no_variance_flow():
        return like.new_zeros(())


#: Where a gradient reaches a LIF's spikes (the error of a noiseless draw's gradient).
_RESET_NOTE = (" (a gradient reaches them from a loss on them, and from one on the membrane "
               "through the reset unless reset='none')")


class LIFState(tuple):
    """``(membrane, variance)``: the noise-free membrane ``u`` and its noise variance ``V``.

    Attributes:
        factors: with a per-layer std inside a :func:`~sbnn_addons.share_posterior` block,
            ``V = s^2 G`` kept factored (:class:`~sbnn_addons.moments.ScaledVariance`),
            with the version of ``variance`` it belongs to, so that the next step runs
            the recurrence ``G_t = beta^2 G_{t-1} + F_t`` on ``G`` outside autograd (one
            graph node per step for ``V``); ``None`` otherwise. A ``variance`` changed in
            place since, or a new state, takes the tensor recurrence (same values).
    """

    def __new__(cls, membrane: Tensor, variance: Tensor, factors=None):
        state = super().__new__(cls, (membrane, variance))
        state.factors = factors
        return state

    def __getnewargs__(self):
        return (self[0], self[1])

    @property
    def membrane(self) -> Tensor:
        return self[0]

    @property
    def variance(self) -> Tensor:
        return self[1]


def _scalar(name: str, value) -> float:
    """``value`` (a real number or a one-element tensor) as a float.

    Raises:
        TypeError: a string, a bool, a sequence or a tensor of several elements (the core
            LIF has one decay and one threshold per layer), or a tensor that requires grad
            (the core LIF learns neither).
    """
    if isinstance(value, Tensor) and value.requires_grad:
        raise TypeError(
            f"{name} of the core LIF is a fixed number, not learned: a tensor that requires "
            f"grad (an nn.Parameter) would be read as a float and never trained, silently; "
            f"pass a float (for a learned {name} use a host neuron, e.g. snnTorch's "
            f"Leaky(learn_{'beta' if name == 'beta' else 'threshold'}=True) converted with "
            "sbnn_addons.snntorch.to_sbnn)")
    if isinstance(value, Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (one per layer), got {value!r}")
    return float(value)


class LIF(nn.Module):
    """Leaky integrate-and-fire neuron whose spikes are Bernoulli draws.

    .. code-block:: text

        u_t = beta * u_{t-1} + I_t
        V_t = beta^2 * V_{t-1} + var(I_t)
        h_t = 1[u_t - theta + sqrt(V_t + s_n^2) eps_t > 0]
        u_t = u_t - theta * h_t                         (reset="subtract")

    ``var(I_t)`` is the variance attached to the input by a Bayesian layer (0 if none),
    ``s_n`` the spike function's own noise std. ``V`` restarts with the state; it has the
    shape of ``var(I_t)``, which broadcasts to the membrane. Where ``var(I_t) = s^2 F_t``
    (a per-layer std, see :class:`~sbnn_addons.moments.ScaledVariance`), the recurrence
    runs on ``F``, outside autograd, and ``V_t = s^2 G_t`` with
    ``G_t = beta^2 G_{t-1} + F_t``: one autograd node per step instead of two.
    Defaults are the reference values rounded: ``beta = 0.905`` (the released decay is
    ``exp(-1 / softplus(10)) = 0.9048378``, ``sbnn_addons.models.PAPER_BETA``),
    ``theta = 1``, soft reset.
    A binary (non-spiking) unit is ``LIF(beta=0, threshold=0)`` run for one step; a
    membrane readout that never fires is ``LIF(threshold=math.inf, reset="none")``.

    Args:
        beta: membrane decay in [0, 1].
        threshold: firing threshold ``theta``.
        spike_fn: an :class:`~sbnn_addons.IWSTSpike` (default ``IWSTSpike("st")``).
        reset: ``"subtract"``, ``"zero"`` or ``"none"``.

    Raises:
        TypeError: ``beta`` / ``threshold`` not a real number (a string, a list, a tensor
            of several elements), a tensor that requires grad (an ``nn.Parameter``: the
            core LIF learns neither), or a ``spike_fn`` without the spike-function
            interface.
        ValueError: ``beta`` outside ``[0, 1]``, an unknown ``reset``, a NaN threshold, or
            an infinite one with the subtract reset (also when assigned after
            construction, ``lif.beta = ...``).

    Shapes:
        ``forward(I [B, *], state) -> (spikes [B, *], LIFState)``;
        ``run(I [T, B, *]) -> spikes [T, B, *]``.
    """

    def __init__(
        self,
        beta: float = 0.905,
        threshold: float = 1.0,
        spike_fn: IWSTSpike | None = None,
        reset: str = "subtract",
    ) -> None:
        super().__init__()
        if spike_fn is not None and not (isinstance(spike_fn, nn.Module) and all(
                callable(getattr(spike_fn, name, None)) for name in ("fire", "noise_variance"))):
            raise TypeError(
                "spike_fn must be an IWSTSpike (or a module with its interface, fire(drive, "
                "variance) and noise_variance(u), such as sbnn_addons.models.SurrogateSpike), "
                f"got {type(spike_fn).__name__}")
        self.reset = reset  # checked by __setattr__, as an assignment after construction
        self.beta = beta  # checked by __setattr__, as an assignment after construction
        self.threshold = threshold
        self.spike_fn = spike_fn if spike_fn is not None else IWSTSpike("st")  # takes threshold

    def __setattr__(self, name: str, value) -> None:
        """``beta`` and ``threshold`` checked (at construction and when assigned later) and
        stored as floats: an assigned ``nn.Parameter`` was registered as a parameter that
        the step never differentiated (its gradient stayed 0), and ``beta = 1.5`` or
        ``threshold = nan`` were taken as they were; ``reset`` is checked too."""
        if name == "reset":
            if not isinstance(value, str) or value not in LIF_RESETS:
                raise ValueError(f"reset must be one of {LIF_RESETS}, got {value!r}")
            if value == "subtract" and math.isinf(self.__dict__.get("threshold", 0.0)):
                raise ValueError(
                    f"threshold={self.__dict__['threshold']} with reset='subtract' makes the "
                    "membrane NaN (V - theta * h = V - inf * 0); for a membrane readout that "
                    "never fires use reset='none' (or 'zero')")
        elif name == "beta":
            value = _scalar("beta", value)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"beta must be in [0, 1], got {value}")
        elif name == "threshold":
            value = _scalar("threshold", value)
            if math.isnan(value):
                raise ValueError("threshold must be a number, got nan")
            if math.isinf(value) and self.__dict__.get("reset") == "subtract":
                raise ValueError(
                    f"threshold={value} with reset='subtract' makes the membrane NaN "
                    "(V - theta * h = V - inf * 0); for a membrane readout that never fires "
                    "use reset='none' (or 'zero')")
        super().__setattr__(name, value)
        # the spike function centres its auxiliary z on the threshold and skips an infinite
        # one: it follows the neuron's threshold, also one assigned later
        spike_fn = self._modules.get("spike_fn") if "_modules" in self.__dict__ else None
        if name in ("threshold", "spike_fn") and spike_fn is not None and (
                "threshold" in self.__dict__):
            spike_fn.threshold = self.__dict__["threshold"]

    def initial_state(self, current: Tensor) -> LIFState:
        """Zero membrane shaped like ``current`` and a zero variance.

        The variance starts as one element, so that ``V_t`` keeps the shape of the input
        variance, which broadcasts to the membrane: with a per-layer std a convolution's
        variance is ``[N, 1, H, W]``, C times smaller than the membrane, and the spike
        kernel reads it in place (:mod:`sbnn_addons.kernels`).
        """
        return LIFState(torch.zeros_like(current), _zero_variance(current))

    def _variance_step(self, variance: Tensor, var_in, factors) -> tuple[Tensor, tuple | None]:
        """``V_t = beta^2 V_{t-1} + var(I_t)`` and its factors (see :class:`LIFState`):
        factored where ``V_{t-1}`` and ``var(I_t)`` share their scale ``s^2`` (or
        ``V_{t-1}`` is the initial 0), eager mode only."""
        if (isinstance(var_in, ScaledVariance) and factors is not None
                and not torch.compiler.is_compiling() and not variance.is_inference()
                and factors[1] == variance._version):
            prev = factors[0]
            if prev is _ZERO or (isinstance(prev, ScaledVariance)
                                 and prev.scale is var_in.scale):
                base = var_in.base if prev is _ZERO else torch.add(
                    var_in.base, prev.base, alpha=self.beta * self.beta)
                scaled = ScaledVariance(base, var_in.scale)
                out = scaled.value()
                return out, (scaled, out._version)
        if isinstance(var_in, ScaledVariance):
            var_in = var_in.value()
        return _variance_update(variance, var_in, self.beta), None

    def _sync_threshold(self) -> None:
        """Give the spike function this neuron's threshold, which its auxiliary terms read
        (their centre, and the finite-threshold test that leaves a readout out): one
        assigned after construction (``lif.threshold = math.inf`` for a membrane readout)
        was left out, and the auxiliary loss of such a readout was ``inf``."""
        spike = self.spike_fn
        if isinstance(spike, IWSTSpike) and spike.threshold != self.threshold:
            spike.threshold = float(self.threshold)

    def _fire(self, drive: Tensor, variance: Tensor) -> Tensor:
        own = self.spike_fn.noise_variance(drive.detach())  # own std only: drive is clean
        return self.spike_fn.fire(drive, variance if own is None else variance + own)

    def forward(self, current: Tensor, state: LIFState | None = None) -> tuple[Tensor, LIFState]:
        """One step: ``(spikes, new state)`` for input current ``current [B, *]``.

        Raises:
            TypeError: ``current`` is not a floating-point tensor.
            ValueError: ``current`` or the membrane of ``state`` (positional or keyword)
                holds NaN / inf (unless :class:`~sbnn_addons.check_finite` is off: they
                would give no spikes and NaN gradients; a state this LIF returned is not
                checked again), or ``state`` does not match its shape.
        """
        if isinstance(self.spike_fn, IWSTSpike) and self.spike_fn._seeded_in_graph():
            return call_eagerly(self.forward, current, state)  # see _seeded_in_graph
        check_float("current", current)
        check_input(current, "LIF")
        check_noise_scales(self.spike_fn)
        self._sync_threshold()
        var_in = _known(raw_variance(current), "input current")
        current = plain(current)  # the kernels' autograd functions see a plain tensor
        if state is None:  # a zero membrane, left out of the first update
            membrane, variance = None, _zero_variance(current)
            factors = (None if torch.compiler.is_compiling() or variance.is_inference()
                       else (_ZERO, variance._version))
        else:
            membrane, variance = state
            factors = getattr(state, "factors", None)
        if (membrane is not None and membrane.shape != current.shape
                and membrane.numel() != 1):
            raise_error(
                f"state of shape {concrete_shape(membrane)} does not match the input "
                f"current of shape {concrete_shape(current)}; pass state=None at the start of a "
                "sequence", ValueError)
        if membrane is not None:
            check_device(current, membrane, "LIF", "its state (the membrane passed in)")
            check_input(membrane, "LIF, its state (the membrane passed in),")
        with no_variance_flow():  # V is tracked explicitly; the flow would count it twice
            variance, factors = self._variance_step(variance, var_in, factors)
            fused = self._fused_step(current, membrane, variance)
            if fused is None:
                spikes, membrane = lif_fire(current, membrane, variance, self._fire,
                                            self.beta, self.threshold, self.reset)
            else:
                spikes, membrane = fused
        if var_in is None and isinstance(self.spike_fn, IWSTSpike):
            # no variance on this current: noiseless where V and the own std are 0 too
            spikes = refuse_gradient_without_noise(self.spike_fn, spikes, "this LIF", None,
                                                   _RESET_NOTE, noise=(variance,))
        mark_checked(membrane)  # from a checked current and membrane: not checked again
        return spikes, LIFState(membrane, variance, factors)

    def _fused_step(self, current: Tensor, membrane: Tensor | None,
                    variance: Tensor) -> tuple[Tensor, Tensor] | None:
        """One step as :func:`~sbnn_addons.kernels.fused_lif_step`: the spikes and
        membrane of :func:`~sbnn_addons.functional.lif_fire` with the spike kernel, in one
        kernel pass and one autograd node. ``None`` where the kernel does not serve it."""
        spike = self.spike_fn
        if (not isinstance(spike, IWSTSpike) or spike.fire_overridden()
                or spike.deterministic
                or not kernels.can_fuse(current, variance)
                # (after can_fuse: False in a graph, where the threshold may be symbolic)
                or not math.isfinite(self.threshold)  # the backward needs H = u + theta
                or (membrane is not None and (membrane.shape != current.shape
                                              or membrane.dtype != torch.float32))
                or not broadcasts_to(variance.shape, current.shape)):
            return None
        own = spike.own_noise_variance()
        total = variance if own is None else variance + own.to(variance.dtype)
        aux = spike._aux_wanted()
        offset = spike._aux_offset(self.threshold) if aux else None
        pull = spike._pull_wanted(current) or (
            membrane is not None and spike._pull_wanted(membrane))
        out = kernels._fused_lif_step(
            current, membrane, total, kernels._seed(spike._generator_for(current)),
            (spike.estimator, self.beta, self.threshold, self.reset, spike.at_zero, offset,
             spike.aux_std_grad, spike.aux_pull if pull else 0.0))
        if aux:
            spike._collect(out[2], current)
        return attach_computed_variance(out[0], None), out[1]

    def _fused(self, currents: Tensor, var_seq: Tensor, membrane: Tensor,
               variance: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """Steps ``currents [T, B, *]`` (input variances ``var_seq [T, *]``) in one
        :func:`~sbnn_addons.kernels.lif_sequence` call: the same spikes and states as
        :func:`~sbnn_addons.functional.lif_step` step by step, in one autograd node.
        ``None`` where it does not serve them (then the steps run one by one). Used by
        :meth:`run`; a single step gains nothing from it (its fixed cost is about that of
        the autograd nodes it saves)."""
        spike = self.spike_fn
        step = currents.shape[1:]
        if (not isinstance(spike, IWSTSpike) or spike.fire_overridden()
                or spike.deterministic
                or kernels.sequence_backend(currents, var_seq) is None
                # (after sequence_backend: None in a graph, where the threshold may be
                # symbolic)
                or not math.isfinite(self.threshold)  # a readout: the steps are exact
                or not broadcasts_to(var_seq.shape[1:], step)
                or not broadcasts_to(membrane.shape, step)
                or not broadcasts_to(variance.shape, step)
                or membrane.dtype != currents.dtype or variance.dtype != currents.dtype
                or membrane.device != currents.device or variance.device != currents.device):
            return None
        own = spike.own_noise_variance()
        own = None if own is None else own.to(currents.dtype)
        aux = spike._aux_wanted()
        pull = spike._sequence_pull_wanted(currents, var_seq, membrane, variance, own)
        dyn = kernels.Dynamics("leaky", self.beta, None, self.threshold, self.reset)
        out = kernels.lif_sequence(
            currents, var_seq, membrane, variance, dyn, spike.estimator,
            own_var=own, at_zero=spike.at_zero,
            aux_offset=spike._aux_offset(self.threshold) if aux else None,
            aux_var=spike.aux_std_grad, aux_pull=spike.aux_pull if pull else 0.0,
            generator=spike._generator_for(currents))
        if aux:
            spike._collect(out[3], currents[0], len(currents))
        return out[0], out[1], out[2]

    def run(self, currents: Tensor) -> Tensor:
        """Run a whole sequence ``[T, B, *]`` from a zero state; returns spikes ``[T, B, *]``.

        An empty sequence (``T = 0``) or batch (``B = 0``) gives empty spikes of the same
        shape.

        Raises:
            TypeError: ``currents`` is not a floating-point tensor.
            ValueError: ``currents`` is 0-d (no time dimension), or holds NaN / inf (unless
                :class:`~sbnn_addons.check_finite` is off).
        """
        check_float("currents", currents)
        if currents.dim() == 0:
            raise_error("LIF.run: currents must be a sequence [T, ...] (time first, e.g. "
                        "[T, B, features]), got a 0-d tensor; for one step call lif(current)",
                        ValueError)
        check_input(currents, "LIF.run")
        check_noise_scales(self.spike_fn)
        self._sync_threshold()
        var_seq = _known(get_variance(currents), "input currents")
        currents = plain(currents)
        if currents.numel() == 0:  # T = 0 or B = 0: nothing to run
            return mark_binary(currents.new_zeros(currents.shape))
        state = None
        out = []
        if isinstance(var_seq, Tensor) and currents.dim() >= 2:
            if var_seq.dim() != currents.dim() or var_seq.shape[0] != currents.shape[0]:
                var_seq = var_seq.expand_as(currents)
            var_seq = compact_broadcast(var_seq)  # an expanded view: back to its own size
            with no_variance_flow():
                fused = self._fused(currents, var_seq, *self.initial_state(currents[0]))
            if fused is not None:
                return fused[0]  # marked binary
        # unbind, not currents[t]: the backward of T selects would zero-fill T full-size
        # gradients (quadratic in T); unbind's backward is one stack
        steps = currents.unbind(0)
        var_steps = var_seq.expand_as(currents).unbind(0) if isinstance(var_seq, Tensor) else None
        for t, current in enumerate(steps):
            if var_steps is not None:
                current = attach_computed_variance(current, var_steps[t])
            mark_checked(current)  # checked as part of currents
            spikes, state = self(current, state)
            out.append(spikes)
        spikes = torch.stack(out)
        return mark_binary(spikes) if all(map(is_binary, out)) else spikes

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}, threshold={self.threshold:g}, reset={self.reset}"
