"""Monte Carlo prediction and predictive uncertainty (Method page, section 7, ``mc(K)``).

:func:`mc_predict` is the one Monte Carlo API of the library, for models built from the
core and for converted snnTorch and SpikingJelly models alike (``sbnn_addons.mc_predict``
is the same function; :func:`predict` is a documented alias of it):

.. code-block:: python

    import sbnn_addons

    pred = sbnn_addons.mc_predict(model, x, num_samples=20, seed=0)  # K passes, "mc" mode
    pred.probs               # [B, C]  mean predictive distribution
    pred.entropy             # [B]     total uncertainty  H[p]
    pred.mutual_information  # [B]     epistemic part     H[p] - mean_k H[p_k]
    pred.spike_counts        # [K]     spikes emitted in each pass (all layers)
    pred.synops              # [K]     synaptic operations of each pass

Every pass runs under ``torch.no_grad()`` (no graph is built) from a freshly reset neuron
state. With ``p_k = softmax(f_k(x))`` the prediction of the ``k``-th stochastic pass:

.. code-block:: text

    p(y|x)   = 1/K sum_k p_k                         (mean predictive distribution)
    H[p]     = - sum_c p_c log p_c                   (predictive entropy, nats)
    E[H]     = 1/K sum_k H[p_k]                      (expected entropy: aleatoric part)
    MI       = H[p] - E[H] >= 0                      (mutual information: epistemic part)

The plot helpers at the end need matplotlib (``pip install "sbnn_addons[plot]"``) and write
PNG files with the ``Agg`` backend.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import numbers
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .base import (
    MODES,
    SBNNModule,
    as_int,
    check_flag,
    check_input,
    check_module,
    raise_error,
)
from .metrics import (
    SpikeMonitor,
    _at_least_float32,
    _check_bins,
    _has_values,
    _require,
    _rows_sum_to_one,
    check_probabilities,
    expected_calibration_error,
    negative_log_likelihood,
)
from .moments import plain
from .spike import IWSTSpike, check_seed, seed_spikes

__all__ = [
    "Prediction",
    "mc_predict",
    "predict",
    "time_as_samples",
    "from_sample_probs",
    "entropy",
    "default_reset",
    "metrics_vs_samples",
    "plot_reliability",
    "plot_entropy_histograms",
    "plot_metrics_vs_samples",
]

_TINY = 1e-12


@dataclass
class Prediction:
    """Result of :func:`predict` / :func:`time_as_samples`.

    Attributes:
        probs: mean predictive distribution ``[B, C]``.
        entropy: predictive entropy ``H[p]`` in nats ``[B]``.
        expected_entropy: ``1/K sum_k H[p_k]`` (aleatoric part) ``[B]``.
        mutual_information: ``H[p] - E[H]`` (epistemic part, clamped at 0) ``[B]``.
        sample_probs: per-sample probabilities ``[K, B, C]`` (``None`` unless requested).
        num_samples: ``K``.
        spike_counts: spikes emitted in each pass, all layers, whole batch ``[K]``
            (``None`` when not counted).
        layer_spike_counts: per ``IWSTSpike`` (qualified module name): ``[K]``.
        layer_units: per ``IWSTSpike``: unit-steps evaluated in one pass (batch included),
            the denominator of the spike rate.
        synops: synaptic operations of each pass ``[K]`` (see
            :func:`sbnn_addons.metrics.layer_synops`), ``None`` when not counted.
        layer_synops: per weight layer: ``[K]``.
    """

    probs: Tensor
    entropy: Tensor
    expected_entropy: Tensor
    mutual_information: Tensor
    sample_probs: Tensor | None
    num_samples: int
    spike_counts: Tensor | None = None
    layer_spike_counts: dict[str, Tensor] = field(default_factory=dict)
    layer_units: dict[str, int] = field(default_factory=dict)
    synops: Tensor | None = None
    layer_synops: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        """``B``."""
        return self.probs.shape[0]

    def spike_rates(self) -> dict[str, float]:
        """Per layer: mean spikes per unit and time step over the K passes.

        Raises:
            ValueError: the spikes were not counted (``mc_predict(count_spikes=False)``,
                or a prediction built from probabilities).
        """
        if self.spike_counts is None:
            raise ValueError(
                "this prediction has no spike counts (mc_predict(..., count_spikes=False), "
                "or built from probabilities); call mc_predict with count_spikes=True")
        return {n: float(c.sum()) / (self.layer_units[n] * self.num_samples)
                if self.layer_units.get(n) else 0.0
                for n, c in self.layer_spike_counts.items()}

    def synops_per_example(self) -> float:
        """SynOps of the whole ``mc(K)`` prediction per input example: ``sum_k SynOps_k / B``
        (K times the cost of one pass).

        Raises:
            ValueError: the SynOps were not counted (``mc_predict(count_spikes=False)`` or
                ``synops=False``, or a prediction built from probabilities): a NaN would
                pass for a cost.
        """
        if self.synops is None:
            raise ValueError(
                "this prediction has no SynOps counts (mc_predict(..., count_spikes=False) "
                "or synops=False, or built from probabilities); call mc_predict with "
                "count_spikes=True, synops=True")
        return float(self.synops.sum()) / max(self.batch_size, 1)


# --------------------------------------------------------------------------- maths
def entropy(probs: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy ``-sum p log p`` in nats along ``dim`` (``0 log 0 = 0``, in every
    floating dtype). Half-precision probabilities are read in float32 (the entropy is
    float32): a bfloat16 sum is off in the third digit. For the mutual information use
    :func:`from_sample_probs`, not ``entropy(p) - entropy(samples).mean(0)``: that
    difference of two nearly equal float32 entropies loses a confident prediction's MI.

    Raises:
        TypeError: ``probs`` is not a floating-point tensor.
        ValueError: entries outside ``[0, 1]`` or NaN (logits give a meaningless,
            possibly negative, "entropy": pass ``softmax(logits)``), or values that do not
            sum to 1 along ``dim`` (within 1e-2, or the dtype's rounding over its terms,
            whichever is larger): another axis than the classes'
            (``entropy(sample_probs, dim=0)`` sums over the samples), or per-class
            sigmoid outputs.
        RuntimeError: in a ``torch.compile`` graph, where eager mode raises that
            ``ValueError``: its message (less the values), when the graph runs.
    """
    probs = _probabilities(probs, "entropy: probs")
    terms = probs.shape[dim] if probs.dim() else 1
    # loose: half-precision probabilities read in float64 miss 1 by a few 1e-3; a wrong
    # axis or sigmoid outputs miss it by far more
    atol = max(1e-2, terms * torch.finfo(probs.dtype).eps)
    probs = _at_least_float32(probs)  # a bfloat16 sum keeps three digits
    sums = probs.sum(dim) if _has_values(probs) else None
    _require(probs, lambda: ((sums - 1).abs() <= atol).all(),
             f"entropy: probs must sum to 1 along dim={dim} (the classes' axis, of size "
             f"{terms}){{got}}; pass dim= the classes' axis (e.g. -1 for [K, B, C] samples), "
             "and probabilities from a softmax, not per-class sigmoids",
             got=lambda: f", got sums in [{float(sums.min()):.3g}, {float(sums.max()):.3g}]")
    tiny = max(_TINY, torch.finfo(probs.dtype).tiny)
    return -(probs * probs.clamp_min(tiny).log()).sum(dim)


def _check_unit_interval(p: Tensor, what: str) -> None:
    """``p`` a floating-point tensor with every entry in ``[0, 1]`` (a rounding of 1e-4
    above 1 accepted), no NaN."""
    if not isinstance(p, Tensor) or not p.is_floating_point():
        kind = p.dtype if isinstance(p, Tensor) else type(p).__name__
        raise_error(f"{what} must be a floating-point tensor of probabilities, got {kind}",
                    TypeError)
    _require(p, lambda: ((p >= 0) & (p <= 1 + 1e-4)).all(),
             f"{what} must be probabilities in [0, 1] (no NaN){{got}}; pass softmax(logits), "
             "not logits",
             got=lambda: f", got values in [{float(p.min()):.3g}, {float(p.max()):.3g}]")


def _probabilities(p: Tensor, what: str) -> Tensor:
    """``p`` checked (:func:`_check_unit_interval`), as a plain tensor: the softmax of a
    Bayesian readout's output carries a variance, which the entropies do not propagate
    (and a graph would trace their every operation through the variance flow)."""
    if isinstance(p, Tensor):
        p = plain(p)
    _check_unit_interval(p, what)
    return p


def _float32_rows(probs: Tensor) -> Tensor:
    """Half-precision probabilities in float32, each row renormalised (it misses 1 by the
    dtype's rounding over its terms); other dtypes unchanged.

    Raises:
        ValueError: half-precision rows that miss 1 by more than that rounding (they are
            not renormalised into probabilities).
    """
    if probs.dtype not in (torch.float16, torch.bfloat16):
        return probs
    sums = probs.float().sum(-1)
    atol = max(1e-4, probs.shape[-1] * torch.finfo(probs.dtype).eps)
    _require(probs, lambda: _rows_sum_to_one(sums, atol),
             "sample_probs rows must sum to one (pass softmax probabilities)")
    probs = probs.float()
    return probs / probs.sum(-1, keepdim=True)


def from_sample_probs(sample_probs: Tensor, *, keep_samples: bool = True) -> Prediction:
    """Build a :class:`Prediction` from per-sample probabilities ``[K, B, C]``.

    Half-precision samples are read in float32, each row renormalised (its rounding):
    the prediction's tensors are float32. The mean and the entropies are accumulated in
    float64 (the mutual information, a difference of two nearly equal entropies, keeps
    its digits for confident predictions) and returned in the samples' dtype.

    Raises:
        TypeError: not a floating-point tensor.
        ValueError: not 3-D, ``K < 1``, entries outside ``[0, 1]`` or NaN, or rows that
            do not sum to one.
        RuntimeError: in a ``torch.compile`` graph, where eager mode raises that
            ``ValueError`` for the values: its message (less the values), when the graph
            runs.
    """
    if not isinstance(sample_probs, Tensor) or not sample_probs.is_floating_point():
        raise_error("sample_probs must be a floating-point tensor [K, B, C]", TypeError)
    if sample_probs.dim() != 3:
        raise_error(f"sample_probs must be [K, B, C], got shape "
                    f"{tuple(sample_probs.shape)}", ValueError)
    if sample_probs.shape[0] < 1:
        raise_error("sample_probs needs K >= 1 samples (dimension 0 is empty)", ValueError)
    sample_probs = _probabilities(sample_probs, "sample_probs")
    keep_samples = check_flag("keep_samples", keep_samples)
    sums = sample_probs.sum(-1)
    # as check_probabilities: a float16 softmax's rows miss 1 by its rounding over C terms
    atol = max(1e-4, sample_probs.shape[-1] * torch.finfo(sample_probs.dtype).eps)
    _require(sample_probs, lambda: _rows_sum_to_one(sums, atol),
             "sample_probs rows must sum to one (pass softmax probabilities)")
    # the mutual information, a small difference of two entropies, was off by up to 0.01
    # (of 0.02) in bfloat16
    sample_probs = _float32_rows(sample_probs)
    probs, h, eh, mi = _mean_and_entropies(sample_probs)
    return Prediction(probs=probs, entropy=h, expected_entropy=eh, mutual_information=mi,
                      sample_probs=sample_probs if keep_samples else None,
                      num_samples=sample_probs.shape[0])


def _mean_and_entropies(sample_probs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(p, H[p], E[H], MI)`` of checked samples ``[K, B, C]`` (``MI = H[p] - E[H]``
    clamped at 0), accumulated in float64 one sample at a time (no float64 copy of the
    samples) and returned in the samples' dtype.

    The mutual information of a confident prediction is a difference of two nearly equal
    entropies: from float32 sums (the mean ``p`` included) it was off by up to 4e-7, for
    true values down to 1e-9, often clamped to 0, and it misordered the examples that an
    OOD score ranks.
    """
    total = sample_probs.new_zeros(sample_probs.shape[1:], dtype=torch.float64)
    eh = sample_probs.new_zeros(sample_probs.shape[1:-1], dtype=torch.float64)
    for p_k in sample_probs:
        p_k = p_k.double()
        total += p_k
        eh -= torch.xlogy(p_k, p_k).sum(-1)  # 0 log 0 = 0
    probs, eh = total / sample_probs.shape[0], eh / sample_probs.shape[0]
    h = -torch.xlogy(probs, probs).sum(-1)
    mi = (h - eh).clamp_min(0.0)
    dtype = sample_probs.dtype
    return probs.to(dtype), h.to(dtype), eh.to(dtype), mi.to(dtype)


def time_as_samples(per_step_logits: Tensor) -> Prediction:
    """The "time as samples" variant: read the per-step outputs of **one** pass as samples.

    .. code-block:: text

        p_t = softmax(logits_t),  p = 1/T sum_t p_t,  MI = H[p] - 1/T sum_t H[p_t]

    Costs one pass instead of K, but the T samples are correlated through the membrane
    state (and differ also because the input changes over time), so its MI mixes temporal
    variability with epistemic uncertainty.

    Args:
        per_step_logits: ``[T, B, C]`` logits (or membrane potentials) of each time step.

    Returns:
        :class:`Prediction` with ``num_samples = T`` and ``sample_probs [T, B, C]``
        (float32; float64 for float64 logits).

    Raises:
        ValueError: not ``[T, B, C]``, ``T < 1``, or NaN / +inf logits (NaN
            probabilities); in a ``torch.compile`` graph a ``RuntimeError`` with the
            message of the last, when the graph runs.

    Warns:
        UserWarning: every row is already a probability vector (per-step softmax
            outputs): the softmax applied here flattens it (as :func:`mc_predict` warns);
            pass the logits. Eager mode only (a graph cannot warn at run time).
    """
    if not isinstance(per_step_logits, Tensor) or per_step_logits.dim() != 3:
        shape = getattr(per_step_logits, "shape", None)
        raise_error(f"per_step_logits must be a tensor [T, B, C], got shape {shape}",
                    ValueError)
    if per_step_logits.shape[0] < 1:
        raise_error("per_step_logits needs T >= 1 time steps", ValueError)
    logits = plain(per_step_logits)
    _warn_if_probabilities(
        logits.float(), "time_as_samples: every row of per_step_logits",
        "pass the logits (or membrane potentials) of each step, or use from_sample_probs "
        "for per-step probabilities", stacklevel=3)
    # float64 kept, as in mc_predict: a confident error's probability does not underflow
    probs = torch.softmax(logits if logits.dtype == torch.float64 else logits.float(), -1)
    _check_no_nan(probs, "per_step_logits", "logits")
    return from_sample_probs(probs)


def _check_no_nan(probs: Tensor, where: str, kind: str) -> None:
    """Probabilities computed from ``kind`` values are NaN only where those held a NaN or
    a +inf (or a row of -inf): name that, not the probabilities."""
    _require(probs, lambda: ~torch.isnan(probs).any(),
             f"{where} holds NaN or inf {kind} (NaN or +inf entries, or a row of -inf), "
             "which give NaN probabilities: a diverged model, or NaN input with "
             "check_finite(False)?")


# --------------------------------------------------------------------------- predict
def _host_kind(model: nn.Module) -> tuple[bool, bool]:
    """(has snnTorch neurons, has SpikingJelly neurons), without importing either."""
    snn = sj = False
    for m in model.modules():
        for cls in type(m).__mro__:
            mod = cls.__module__
            if mod.startswith("snntorch") or mod == "sbnn_addons.snntorch":
                snn = True
            elif mod.startswith("spikingjelly") or mod == "sbnn_addons.spikingjelly":
                sj = True
    return snn, sj


def default_reset(model: nn.Module) -> Callable[[nn.Module], object]:
    """The neuron-state reset :func:`mc_predict` runs before every pass when none is given.

    * snnTorch neurons: :func:`sbnn_addons.snntorch.reset`, which does what
      ``snntorch.utils.reset`` does (every neuron's ``reset_mem()``: a zero membrane) for
      this model's neurons only, copies included, and leaves other models alone;
    * SpikingJelly modules: :func:`sbnn_addons.spikingjelly.reset`, i.e.
      ``spikingjelly.activation_based.functional.reset_net`` (membrane and noise variance);
    * both when the model has both; a no-op for a core-only model (the core's
      :class:`~sbnn_addons.LIF` keeps its state explicitly, in the caller's loop).

    Detection reads the classes' module names, so neither host library is imported unless
    the model already uses it.
    """
    check_module(model, "default_reset")
    snn, sj = _host_kind(model)
    fns = []
    if snn:
        from .snntorch import reset as snn_reset

        fns.append(snn_reset)
    if sj:
        from .spikingjelly import reset as sj_reset

        fns.append(sj_reset)

    def reset(m: nn.Module) -> None:
        for fn in fns:
            fn(m)

    return reset


def _forward_hint(model: nn.Module) -> str:
    """The ``forward=`` that fits ``model``'s host and step style, for error messages: a
    single-step model (SpikingJelly ``step_mode='s'``, snnTorch) needs the loop over the
    steps, a multi-step one reduces its ``[T, B, C]`` output."""
    snn, sj = _host_kind(model)
    if sj:
        modes = {getattr(m, "step_mode", None) for m in model.modules()} - {None}
        if "s" in modes:
            return ("forward=lambda m, x: torch.stack([m(x_t) for x_t in x]).mean(0) for this "
                    "single-step SpikingJelly model (step_mode='s': one call is one step; "
                    "m(x) on [T, B, ...] would take T for the batch), or "
                    "functional.set_step_mode(model, 'm') and forward=lambda m, x: "
                    "m(x).mean(0)")
        return ("forward=lambda m, x: m(x).mean(0) for this multi-step SpikingJelly model "
                "(its output is [T, B, C])")
    if snn:
        return ("forward=lambda m, x: m(x)[1].mean(0) for an snnTorch model whose forward "
                "loops over time and returns (spk_rec, mem_rec) [T, B, C], or "
                "forward=lambda m, x: torch.stack([m(x_t)[1] for x_t in x]).mean(0) for an "
                "nn.Sequential of init_hidden=True neurons (one call is one step)")
    return ("forward=lambda model, x: ... that returns the logits [B, C] (e.g. "
            "lambda m, x: m(x).mean(0) for a model returning [T, B, C])")


def _check_logits(logits, rows: int, model: nn.Module,
                  folded: tuple[int, int] | None = None) -> Tensor:
    """``logits`` checked as ``[rows, C]``; ``folded``: ``(passes, batch_dim)`` of a folded
    call, whose rows are the passes times the examples along ``batch_dim``; ``model``:
    whose ``forward=`` an error suggests (:func:`_forward_hint`)."""
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"the forward pass returned {type(logits).__name__}, not a logits tensor [B, C]; "
            f"pass {_forward_hint(model)}"
        )
    if logits.dim() != 2:
        raise ValueError(
            f"the forward pass must return logits [B, C], got shape {tuple(logits.shape)}; "
            f"pass {_forward_hint(model)}"
        )
    if logits.shape[1] < 2:
        raise ValueError(
            f"the forward pass returned {logits.shape[1]} class(es) per example (shape "
            f"{tuple(logits.shape)}): a softmax over one class is 1 for every example, so "
            "the prediction and its uncertainty would say nothing; for a binary classifier "
            "with one logit z return both classes' logits, "
            "forward=lambda m, x: torch.cat([torch.zeros_like(z := m(x)), z], -1)")
    if logits.shape[0] != rows:
        if folded is not None:
            reps, batch_dim = folded
            raise ValueError(
                f"fold=True: {reps} passes folded along batch_dim={batch_dim} should give "
                f"{rows} rows of logits, got shape {tuple(logits.shape)}; batch_dim must be "
                "the dimension of inputs that indexes the examples (batch_dim=1 for "
                "time-major [T, B, ...] inputs)")
        raise ValueError(
            f"the forward pass returned {logits.shape[0]} rows of logits, the first pass "
            f"{rows}; every pass must return [B, C] for the same examples")
    return plain(logits)  # a readout's variance is not part of the prediction


#: What the forward pass of :func:`mc_predict` may return (its ``output`` argument).
OUTPUTS = ("logits", "probs", "log_probs")


def _to_probs(out: Tensor, output: str) -> Tensor:
    """One pass's ``[B, C]`` output as probabilities (float32; float64 for a float64
    output, whose probabilities of confident errors do not underflow). Half-precision
    probabilities (``output="probs"`` / ``"log_probs"``) are accepted within their
    rounding over ``C`` terms and renormalised in float32.

    Raises:
        ValueError: ``output="probs"`` / ``"log_probs"`` and the rows are not probability
            vectors.

    Warns:
        UserWarning: ``output="logits"`` and every row is already a probability vector
            (a model that ends in a softmax): a second softmax would flatten it.
    """
    # half-precision probabilities miss 1 by the dtype's rounding over C terms
    half = out.dtype in (torch.float16, torch.bfloat16)
    tol = max(1e-3, out.shape[-1] * torch.finfo(out.dtype).eps) if half else 1e-3
    out = out if out.dtype == torch.float64 else out.float()
    if output == "logits":
        _warn_if_probabilities(out, "mc_predict: every row the forward pass returned",
                               "pass output='probs' if the model ends in a softmax",
                               stacklevel=5)
        probs = torch.softmax(out, -1)
        _check_no_nan(probs, "the forward pass's output", "logits")
        return probs
    probs = out.exp() if output == "log_probs" else out
    _check_no_nan(probs, "the forward pass's output", output.replace("_", "-"))
    if _has_values(probs) and not _is_distribution(probs, tol=tol):
        raise ValueError(
            f"mc_predict(output={output!r}): the forward pass must return "
            f"{'log-' if output == 'log_probs' else ''}probabilities (rows in [0, 1] summing "
            "to 1); pass output='logits' for raw scores")
    # renormalised in float32: the rounding would bias the mean and the entropies
    if half:
        probs = probs.clamp(0, 1)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def _warn_if_probabilities(x: Tensor, what: str, fix: str, stacklevel: int) -> None:
    """Warn where values about to be read as logits (``x [..., C]``) are already
    probability vectors, every row of them: a second softmax would flatten them.
    ``what`` starts the message, ``fix`` ends it."""
    if (x.shape[-1] > 1 and _has_values(x) and not torch.compiler.is_compiling()
            and _is_distribution(x)):
        warnings.warn(
            f"{what} is already a probability vector (entries in [0, 1] summing to 1), and "
            f"it is treated as logits, so a second softmax flattens it; {fix}",
            stacklevel=stacklevel)


def _is_distribution(p: Tensor, tol: float = 1e-4) -> bool:
    return bool(((p >= 0) & (p <= 1 + tol)).all() and ((p.sum(-1) - 1).abs() <= tol).all())


def _check_inputs(inputs, custom_forward: bool) -> None:
    """``inputs`` is a tensor (or, with a custom ``forward``, a tuple / list of tensors)
    without a zero-size dimension and, unless :class:`~sbnn_addons.check_finite` is off,
    without NaN / inf."""
    items = inputs if custom_forward and isinstance(inputs, (tuple, list)) else (inputs,)
    if not items or not all(isinstance(x, Tensor) for x in items):
        kinds = ", ".join(type(x).__name__ for x in items) or "an empty sequence"
        raise TypeError(
            f"mc_predict: inputs must be a torch.Tensor (time-major [T, B, ...] for a "
            f"spiking model, [B, ...] for a static core model), got {kinds}"
            + ("" if custom_forward else
               "; for other inputs pass forward=lambda model, inputs: logits [B, C]")
        )
    for x in items:
        if x.dim() and 0 in x.shape:
            raise ValueError(
                f"mc_predict: inputs of shape {tuple(x.shape)} have a zero-size dimension "
                "(an empty batch or a sequence of T = 0 steps); there is nothing to predict: "
                "skip empty inputs before calling mc_predict"
            )
        check_input(x, "mc_predict")


def _legacy_call(forward_fn: Callable[[], Tensor], model: nn.Module,
                 num_samples) -> Tensor:
    """``mc_predict(forward_fn, model, K)``: the earlier closure form (deprecated)."""
    warnings.warn(
        "mc_predict(forward_fn, model, K) is deprecated: call "
        "mc_predict(model, inputs, K, forward=lambda m, x: logits).probs (the passes "
        "now run without gradients from a reset neuron state)",
        DeprecationWarning, stacklevel=3,
    )
    _check_num_samples(num_samples)
    pred = _run(model, None, num_samples, seed=None, forward=lambda m, x: forward_fn(),
                reset=None, chunk_size=None, fold=False, batch_dim=0, eval_mode="mc",
                return_samples=False, count_spikes=False, synops=False)
    return pred.probs


def _check_num_samples(num_samples) -> int:
    value = as_int(num_samples)
    if value is None or value < 1:
        raise ValueError(f"num_samples (K) must be an integer >= 1, got {num_samples!r}")
    return value


def mc_predict(
    model: nn.Module,
    inputs: Tensor | Sequence[Tensor] | None,
    num_samples: int = 10,
    *,
    seed: int | None = None,
    forward: Callable[[nn.Module, Tensor], Tensor] | None = None,
    reset: Callable[[nn.Module], object] | None = None,
    chunk_size: int | None = None,
    fold: bool = False,
    batch_dim: int = 0,
    eval_mode: str = "mc",
    return_samples: bool = True,
    count_spikes: bool = True,
    synops: bool = True,
    output: str = "logits",
) -> Prediction:
    """Monte Carlo predictive distribution and uncertainty from ``K`` stochastic passes.

    The library's one Monte Carlo API, the same for a core model, a converted snnTorch
    model and a converted SpikingJelly model:

    .. code-block:: text

        for k = 1..K:  reset(model);  p_k = softmax(forward(model, inputs))   # "mc" mode
        p = 1/K sum_k p_k,   H[p] = -sum_c p_c log p_c,   MI = H[p] - 1/K sum_k H[p_k]

    * **No gradients**: every pass runs under ``torch.no_grad()``; no graph is built and
      the returned tensors have ``requires_grad=False``.
    * **State reset before every pass** (and once after the last): the passes are
      independent draws, whatever state an earlier forward left behind. The default
      ``reset`` is the host's own (:func:`default_reset`: ``snntorch.utils.reset``'s
      ``reset_mem()`` for snnTorch neurons, ``functional.reset_net`` for SpikingJelly);
      a core-only model needs none.
    * **Exact replay**: with ``seed``, :func:`~sbnn_addons.seed_spikes` ``(model, seed)``
      runs first, and PyTorch's global generators (which a dropout layer in training
      mode draws from) are seeded for the passes, so two calls with the same seed give
      the same result; afterwards the spike functions draw from the stream they used
      before the call, and the global generators are as they were.
    * The model's ``train()`` / ``eval()`` flag is left as it is (call ``model.eval()``
      first, as for any evaluation; a BatchNorm in training mode is refused, since the
      passes would change its running statistics); its SBNN mode is ``eval_mode`` during
      the passes and restored afterwards.

    **Inputs and the forward hook.** Spiking models take time-major inputs ``[T, B, ...]``
    (step ``t`` is ``inputs[t]``); a static core model takes ``[B, ...]``. By default one
    pass is ``model(inputs)``, which must return logits ``[B, C]``. For any other call or
    output pass ``forward(model, inputs) -> logits [B, C]``, e.g.

    .. code-block:: python

        # snnTorch, explicit time loop returning (spk_rec, mem_rec) records [T, B, C]
        forward = lambda m, x: m(x)[1].mean(0)
        # snnTorch, nn.Sequential with init_hidden=True neurons: the loop over steps
        forward = lambda m, x: torch.stack([m(x_t)[1] for x_t in x]).mean(0)
        # SpikingJelly, multi-step model returning [T, B, C]: the firing rate
        forward = lambda m, x: m(x).mean(0)

    **Memory** stays bounded by ``chunk_size``: the passes are processed ``chunk_size`` at
    a time and only ``[K, B, C]`` probabilities are kept. Without ``fold`` every pass is a
    separate call (``chunk_size`` only groups them; the result does not depend on it).
    With ``fold=True`` the samples of one chunk are folded into the batch: the input is
    repeated ``chunk_size`` times along ``batch_dim`` (default chunk: all ``K``), one call
    evaluates them all, and the output ``[chunk * B, C]`` is split back. Folding is faster
    (larger matrix products) but uses ``chunk_size`` times the activation memory, and the
    random numbers are drawn in a different order, so with a seed it gives other (equally
    distributed) samples than ``fold=False``, and its result depends on ``chunk_size``.
    With ``fold=True`` the per-pass spike and SynOps counts are the chunk's average.

    Args:
        model: converted snnTorch / SpikingJelly model or a core-only module.
        inputs: ``[T, B, ...]`` (spiking model) or ``[B, ...]`` (static core model);
            with a custom ``forward`` also a tuple / list of tensors, passed on as is.
        num_samples: ``K >= 1``.
        seed: if given, seed the spike noise first (:func:`~sbnn_addons.seed_spikes`).
        forward: ``(model, inputs) -> logits [B, C]`` (default ``model(inputs)``).
        reset: ``(model) -> None`` resetting the neuron states before each pass (default:
            :func:`default_reset`).
        chunk_size: passes per chunk (``None``: ``K`` with ``fold``, 1 without).
        fold: fold the samples of a chunk into the batch (see above).
        batch_dim: dimension of ``inputs`` that indexes examples (1 for ``[T, B, ...]``);
            used by ``fold`` only.
        eval_mode: ``"mc"`` (default), or ``"mean"`` (K identical deterministic passes,
            a baseline: MI = 0) or ``"sample"``.
        return_samples: keep ``sample_probs [K, B, C]``.
        count_spikes: record per-pass spike counts of every ``IWSTSpike`` (and SynOps);
            they need values: pass ``False`` on the ``meta`` device.
        synops: count SynOps at the weight layers (needs ``count_spikes``).
        output: what ``forward`` returns: ``"logits"`` (default; a softmax gives the
            probabilities), ``"probs"`` (a model that ends in a softmax: used as they are)
            or ``"log_probs"`` (a log-softmax: exponentiated).

    Returns:
        :class:`Prediction` (``.probs [B, C]``, ``.entropy [B]``,
        ``.mutual_information [B]``, ``.sample_probs [K, B, C]``, ...).

    Warns:
        UserWarning: ``model`` has no SBNN module (an unconverted model: the passes are
            identical unless it draws noise of its own), or the ``K > 1`` passes of a
            model with one gave identical predictions (outside ``eval_mode="mean"``): no
            noise acted (e.g. a Bayesian readout without a spike function after it).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``inputs`` is not a tensor,
            ``forward`` / ``reset`` is not callable, ``seed`` is not an integer, or the
            forward pass does not return a tensor.
        ValueError: a BatchNorm with running statistics in training mode (call
            ``model.eval()`` first), ``num_samples < 1`` or not an integer, an empty
            input (batch 0 or ``T = 0``), NaN / inf in the input, bad ``chunk_size`` /
            ``batch_dim`` / ``eval_mode`` / ``output``, logits of the wrong shape or of
            a single class,
            ``output="probs"`` whose rows are not probability vectors, or
            ``count_spikes=True`` on the ``meta`` device (no values to count).

    .. note::
        The earlier closure form ``mc_predict(forward_fn, model, K)`` still works for one
        release and returns the probabilities ``[B, C]`` as before, now without gradients
        and with the state reset; it warns with a ``DeprecationWarning``.
    """
    if (not isinstance(model, nn.Module) and callable(model)
            and isinstance(inputs, nn.Module)):
        return _legacy_call(model, inputs, num_samples)
    num_samples = _check_num_samples(num_samples)
    check_module(model, "mc_predict")
    for name, fn in (("forward", forward), ("reset", reset)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be a callable ({name}=lambda m, ...: ...) or None, "
                            f"got {type(fn).__name__}")
    seed = check_seed(seed)
    fold, return_samples, count_spikes, synops = (
        check_flag(name, value) for name, value in (
            ("fold", fold), ("return_samples", return_samples),
            ("count_spikes", count_spikes), ("synops", synops)))
    if (index := as_int(batch_dim)) is None:
        raise TypeError(f"batch_dim must be an int, got {batch_dim!r}")
    batch_dim = index
    _check_inputs(inputs, forward is not None)
    if count_spikes and on_meta(model, inputs):
        raise ValueError(
            "mc_predict: the model (or its inputs) is on the meta device, which holds no "
            "values, so there are no spikes to count (count_spikes=True reads them as "
            "Python numbers): pass count_spikes=False there")
    _refuse_training_batchnorm(model)
    if not any(isinstance(m, SBNNModule) for m in model.modules()):
        warnings.warn(
            f"mc_predict: {type(model).__name__} has no SBNN module (no Bayesian layer or "
            "spike function): unless it draws noise of its own (e.g. dropout in training "
            "mode), the passes are identical and the mutual information is 0; convert the "
            "model first (sbnn_addons.snntorch.to_sbnn / sbnn_addons.spikingjelly.to_sbnn)",
            stacklevel=2)
    return _run(model, inputs, num_samples, seed=seed, forward=forward, reset=reset,
                chunk_size=chunk_size, fold=fold, batch_dim=batch_dim, eval_mode=eval_mode,
                return_samples=return_samples, count_spikes=count_spikes, synops=synops,
                output=output)


def on_meta(model: nn.Module, inputs=None) -> bool:
    """Whether a parameter or buffer of ``model``, or a tensor of ``inputs`` (a tensor or
    a tuple / list of them), is on the ``meta`` device (no values)."""
    items = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    return any(isinstance(t, Tensor) and t.is_meta for t in items) or any(
        t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


def _refuse_training_batchnorm(model: nn.Module, who: str = "mc_predict") -> None:
    """Raise if a BatchNorm with running statistics is in training mode: every pass of
    ``who`` would normalise by the evaluation batch's own statistics and write them into
    the model's running averages (the model changed by an evaluation, silently).

    Raises:
        ValueError: names the first such BatchNorm and the fix.
    """
    for name, m in model.named_modules():
        if (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
                and m.track_running_stats and m.running_mean is not None):
            raise ValueError(
                f"BatchNorm {name or type(m).__name__!r} is in training mode: {who}'s "
                "passes would normalise by the evaluation batch's statistics and update its "
                "running averages with the evaluation inputs. Call model.eval() first: the "
                "spikes are still drawn in eval() (only the BatchNorm changes)")


@contextlib.contextmanager
def _mode(model: nn.Module, value: str) -> Iterator[None]:
    """:func:`sbnn_addons.mode` (kept here: :mod:`sbnn_addons.modes` re-exports
    :func:`mc_predict` from this module, so this module does not import that one)."""
    saved = [(m, m.sbnn_mode) for m in model.modules() if isinstance(m, SBNNModule)]
    for m, _ in saved:
        m.sbnn_mode = value
    try:
        yield
    finally:
        for m, old in saved:
            m.sbnn_mode = old


@contextlib.contextmanager
def _seeded_global_rng(seed: int | None) -> Iterator[None]:
    """With a ``seed``: PyTorch's global generators (the CPU one, and those of the CUDA
    devices in use), which noise outside the spike functions draws from (a dropout layer
    in training mode, SpikingJelly's ``layer.Dropout`` mask), seeded with it for the
    passes and restored afterwards; nothing without one."""
    if seed is None:
        yield
        return
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        for d in devices:
            with torch.cuda.device(d):
                torch.cuda.manual_seed(seed)
        yield


def _run(model: nn.Module, inputs, num_samples: int, *, seed, forward, reset, chunk_size,
         fold, batch_dim, eval_mode, return_samples, count_spikes, synops,
         output="logits") -> Prediction:
    """The passes of :func:`mc_predict` (arguments checked by the caller)."""
    if eval_mode not in MODES:
        raise ValueError(f"eval_mode must be one of {MODES}, got {eval_mode!r}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if chunk_size is None:
        chunk_size = num_samples if fold else 1
    if (size := as_int(chunk_size)) is None or size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1 or None, got {chunk_size!r}")
    chunk_size = min(size, num_samples)
    forward = forward if forward is not None else (lambda m, x: m(x))
    reset = reset if reset is not None else default_reset(model)
    if fold:
        if not isinstance(inputs, Tensor):
            raise TypeError("fold=True needs inputs to be a tensor")
        if not -inputs.dim() <= batch_dim < inputs.dim():
            raise ValueError(f"batch_dim={batch_dim} is out of range for inputs of shape "
                             f"{tuple(inputs.shape)}")
        rows = inputs.shape[batch_dim]
    else:
        rows = None
    seeded = []  # (spike function, its seed and generator before the call), restored after
    if seed is not None:
        seeded = [(m, m._seed, m._generator) for m in model.modules()
                  if isinstance(m, IWSTSpike)]
        if seeded:  # (Bayesian layers alone draw from the global RNG, seeded below)
            seed_spikes(model, seed)

    monitor = SpikeMonitor(model, synops=synops) if count_spikes else None
    samples: list[Tensor] = []
    spikes: dict[str, list[float]] = {}
    ops: dict[str, list[float]] = {}
    units: dict[str, int] = {}

    def record(mon: SpikeMonitor, reps: int) -> None:
        for n, c in mon.counts.items():
            spikes.setdefault(n, []).extend([float(c) / reps] * reps)
            units[n] = mon.units[n] // reps
        for n, c in mon.synops.items():
            ops.setdefault(n, []).extend([float(c) / reps] * reps)
        mon.reset()

    with torch.no_grad(), _mode(model, eval_mode), _seeded_global_rng(seed):
        if monitor is not None:
            monitor.__enter__()
        try:
            done = 0
            while done < num_samples:
                reps = min(chunk_size, num_samples - done)
                if fold:
                    reset(model)
                    x = torch.cat([inputs] * reps, dim=batch_dim) if reps > 1 else inputs
                    logits = _check_logits(forward(model, x), reps * rows, model,
                                           (reps, batch_dim))
                    samples.append(_to_probs(logits, output).unflatten(0, (reps, rows)))
                    if monitor is not None:
                        record(monitor, reps)
                else:
                    for _ in range(reps):
                        reset(model)
                        logits = forward(model, inputs)
                        if rows is None:
                            rows = logits.shape[0] if isinstance(logits, Tensor) else -1
                        logits = _check_logits(logits, rows, model)
                        samples.append(_to_probs(logits, output)[None])
                        if monitor is not None:
                            record(monitor, 1)
                done += reps
        finally:
            if monitor is not None:
                monitor.__exit__(None, None, None)
            reset(model)
            for m, m_seed, generator in seeded:  # the model's own noise stream, as before
                m._seed, m._generator = m_seed, generator
    sample_probs = torch.cat(samples)
    if (eval_mode != "mean" and num_samples > 1 and _has_values(sample_probs)
            and bool((sample_probs == sample_probs[:1]).all())
            and any(isinstance(m, SBNNModule) for m in model.modules())):
        warnings.warn(
            f"mc_predict: the {num_samples} passes gave identical predictions, so the "
            "mutual information is 0: no noise acted. A Bayesian layer's noise acts at a "
            "spike function; a readout layer whose output reaches the logits without one "
            "is deterministic (as are fixed stds of 0). sbnn_addons.check_variance_flow("
            "model, inputs) names such readouts", UserWarning, stacklevel=3)
    pred = from_sample_probs(sample_probs, keep_samples=return_samples)
    if monitor is not None:
        pred.layer_spike_counts = {n: torch.tensor(v, dtype=torch.float64)
                                   for n, v in spikes.items()}
        pred.layer_units = units
        pred.spike_counts = (torch.stack(list(pred.layer_spike_counts.values())).sum(0)
                             if spikes else torch.zeros(num_samples, dtype=torch.float64))
        if synops:
            pred.layer_synops = {n: torch.tensor(v, dtype=torch.float64)
                                 for n, v in ops.items()}
            pred.synops = (torch.stack(list(pred.layer_synops.values())).sum(0)
                           if ops else torch.zeros(num_samples, dtype=torch.float64))
    return pred


#: Alias of :func:`mc_predict` (the same function): ``sbnn_addons.uncertainty.predict``.
predict = mc_predict


# --------------------------------------------------------------------------- K sweeps
def metrics_vs_samples(
    sample_probs: Tensor | Prediction,
    targets: Tensor,
    ks: Sequence[int] | None = None,
    n_bins: int = 15,
) -> dict[str, list[float]]:
    """Accuracy, NLL and ECE of ``mc(k)`` for each ``k`` in ``ks``, from one set of samples
    (half-precision samples averaged in float32, rows renormalised).

    Uses the first ``k`` of the ``K`` stored samples, so one :func:`predict` call with
    ``K = max(ks)`` serves the whole sweep.

    Args:
        sample_probs: ``[K, B, C]`` or a :class:`Prediction` with ``sample_probs``.
        targets: integer labels ``[B]``.
        ks: sample counts ``1 <= k <= K`` (default: 1, 2, 4, ... up to K, and K).
        n_bins: ECE bins.

    Returns:
        ``{"k": [...], "accuracy": [...], "nll": [...], "ece": [...]}``.

    Raises:
        TypeError: ``sample_probs`` is neither a :class:`Prediction` nor a tensor, or
            ``ks`` is a single number instead of a sequence.
        ValueError: no samples, an empty ``ks``, a ``k`` outside ``[1, K]``, or targets /
            probabilities that :func:`~sbnn_addons.metrics.check_probabilities` refuses.
    """
    if isinstance(sample_probs, Prediction):
        if sample_probs.sample_probs is None:
            raise ValueError("the Prediction has no sample_probs; call predict(..., "
                             "return_samples=True)")
        sample_probs = sample_probs.sample_probs
    if not isinstance(sample_probs, Tensor):
        raise TypeError("sample_probs must be a Prediction or a tensor [K, B, C], got "
                        f"{type(sample_probs).__name__}")
    if sample_probs.dim() != 3 or sample_probs.shape[0] < 1:
        raise ValueError(f"sample_probs must be [K, B, C] with K >= 1, got "
                         f"{tuple(sample_probs.shape)}")
    big_k = sample_probs.shape[0]
    sample_probs = _float32_rows(sample_probs)
    if isinstance(ks, (numbers.Number, str, Tensor)):
        raise TypeError(f"ks must be a sequence of sample counts such as [1, 2, 4] (or None), "
                        f"got {ks!r}; for one count pass [{ks!r}]")
    if ks is not None and not (ks := list(ks)):
        raise ValueError("ks is empty: nothing to compute; pass sample counts such as "
                         "[1, 2, 4] (or ks=None for 1, 2, 4, ... up to K)")
    if ks is None:
        ks = sorted({2 ** i for i in range(int(math.log2(big_k)) + 1)} | {big_k})
    out: dict[str, list[float]] = {"k": [], "accuracy": [], "nll": [], "ece": []}
    for k in ks:
        if (count := as_int(k)) is None or not 1 <= count <= big_k:
            raise ValueError(f"every k must be an integer in [1, K={big_k}], got {k!r}")
        k = count
        probs = sample_probs[:k].mean(0)
        check_probabilities(probs, targets)
        out["k"].append(k)
        out["accuracy"].append(float((probs.argmax(-1) == targets).float().mean()))
        out["nll"].append(float(negative_log_likelihood(probs, targets)))
        out["ece"].append(float(expected_calibration_error(probs, targets, n_bins)))
    return out


# --------------------------------------------------------------------------- plots
def _pyplot():
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError('plots need matplotlib: pip install "sbnn_addons[plot]"') from err
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def _reliability_bins(probs: Tensor, targets: Tensor, n_bins: int):
    """``(edges, count, accuracy, mean confidence)`` of ``n_bins`` equal-width confidence
    bins, binned as the ECE (torchmetrics: ``[lo, hi)``, a confidence of 1 in the last)."""
    conf, pred = probs.detach().max(-1)
    conf = conf.float()
    correct = (pred == targets).float()
    edges = torch.linspace(0, 1, n_bins + 1, device=conf.device)
    idx = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(idx, minlength=n_bins).float()
    acc = torch.bincount(idx, weights=correct, minlength=n_bins) / count.clamp_min(1)
    mean_conf = torch.bincount(idx, weights=conf, minlength=n_bins) / count.clamp_min(1)
    return edges.cpu(), count.cpu(), acc.cpu(), mean_conf.cpu()


def plot_reliability(probs: Tensor, targets: Tensor, path, n_bins: int = 15,
                     title: str = "Reliability diagram") -> Path:
    """Reliability diagram (accuracy per equal-width confidence bin against the diagonal)
    with the confidence histogram below it; the ECE is printed in the title.

    Args:
        probs: ``[N, C]`` probabilities. targets: ``[N]`` labels.
        path: PNG file to write. n_bins: number of bins.

    Returns:
        The written path.
    """
    check_probabilities(probs, targets)
    n_bins = _check_bins("n_bins", n_bins)
    plt = _pyplot()
    edges, count, acc, mean_conf = _reliability_bins(probs, targets, n_bins)
    ece = float(expected_calibration_error(probs, targets, n_bins))
    centers = ((edges[:-1] + edges[1:]) / 2).numpy()
    have = (count > 0).numpy()
    acc, mean_conf, count = acc.numpy(), mean_conf.numpy(), count.numpy()
    fig, (ax, axh) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(centers[have], acc[have], width=1 / n_bins, edgecolor="k", label="accuracy")
    ax.bar(centers[have], (mean_conf - acc)[have], bottom=acc[have], width=1 / n_bins,
           color="tab:red", alpha=0.35, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{title} (ECE {ece:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    axh.bar(centers, count / probs.shape[0], width=1 / n_bins, edgecolor="k")
    axh.set_xlabel("confidence")
    axh.set_ylabel("fraction")
    axh.set_xlim(0, 1)
    return _save(fig, path)


def plot_entropy_histograms(scores_in: Tensor, scores_out: Tensor, path,
                            label: str = "predictive entropy (nats)", bins: int = 30) -> Path:
    """Overlaid histograms of an uncertainty score for in- and out-of-distribution inputs;
    AUROC and FPR@95%TPR (:func:`sbnn_addons.metrics.ood_metrics`) in the title."""
    from .metrics import ood_metrics

    bins = _check_bins("bins", bins)
    plt = _pyplot()
    m = ood_metrics(scores_in, scores_out)
    a, b = scores_in.detach().double().cpu(), scores_out.detach().double().cpu()
    lo, hi = float(torch.minimum(a.min(), b.min())), float(torch.maximum(a.max(), b.max()))
    edges = torch.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1).numpy()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(a.numpy(), bins=edges, alpha=0.6, density=True, label="in-distribution")
    ax.hist(b.numpy(), bins=edges, alpha=0.6, density=True, label="out-of-distribution")
    ax.set_xlabel(label)
    ax.set_ylabel("density")
    ax.set_title(f"AUROC {m['auroc']:.3f}, FPR@95%TPR {m['fpr95']:.3f}", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_metrics_vs_samples(sweep: dict[str, list[float]], path) -> Path:
    """Accuracy and ECE against K (the output of :func:`metrics_vs_samples`).

    Raises:
        TypeError: ``sweep`` is not a dict with the lists ``"k"``, ``"accuracy"`` and
            ``"ece"`` of equal, non-zero length (a ``KeyError`` or an empty plot).
    """
    keys = ("k", "accuracy", "ece")
    if not (isinstance(sweep, dict)
            and all(isinstance(sweep.get(key), (list, tuple)) and sweep[key] for key in keys)
            and len({len(sweep[key]) for key in keys}) == 1):
        raise TypeError("sweep must be the dict metrics_vs_samples returns (lists 'k', "
                        f"'accuracy' and 'ece' of one non-zero length), got {sweep!r}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(sweep["k"], sweep["accuracy"], "o-", color="tab:blue", label="accuracy")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (Monte Carlo samples)")
    ax.set_ylabel("accuracy", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(sweep["k"], sweep["ece"], "s--", color="tab:red", label="ECE")
    ax2.set_ylabel("ECE (15 bins)", color="tab:red")
    ax.set_title("mc(K): accuracy and calibration")
    return _save(fig, path)
