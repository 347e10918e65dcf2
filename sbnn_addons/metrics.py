"""Classification and calibration metrics of a predictive distribution.

ECE uses torchmetrics' ``multiclass_calibration_error`` (15 equal-width bins, L1).
Adaptive ECE (equal-mass bins), OOD AUROC / FPR@95%TPR (torchmetrics ROC) and spike /
SynOps counting (:class:`SpikeMonitor`) serve :mod:`sbnn_addons.uncertainty`.
"""

from __future__ import annotations

import math
import types
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .base import as_float, as_int, check_flag, check_module, compiled_wrapped, raise_error
from .tensors import is_binary

__all__ = ["check_probabilities", "negative_log_likelihood", "brier_score",
           "expected_calibration_error", "classification_metrics",
           "adaptive_calibration_error", "ood_metrics", "layer_synops", "SpikeMonitor"]


def check_probabilities(probs: Tensor, targets: Tensor, atol: float = 1e-4) -> None:
    """Validate ``probs [N, C]`` (rows sum to one) against integer ``targets [N]``.

    Raises:
        TypeError: ``probs`` / ``targets`` not tensors, non-float ``probs`` or non-integer
            ``targets``.
        ValueError: shapes that do not match, no examples (``N = 0``: every metric would
            be NaN), targets outside ``[0, C)``, or rows that do not sum to one (within
            ``atol``, or the dtype's rounding over ``C`` terms), or an ``atol`` that is not
            a finite number >= 0.
        RuntimeError: in a ``torch.compile`` graph (the metrics compile with
            ``fullgraph=True``), where eager mode raises a ``ValueError`` for the values
            of ``probs`` or ``targets``: its message (less the values), when the graph
            runs.
    """
    if (tolerance := as_float(atol)) is None or not 0 <= tolerance < math.inf:
        raise_error(f"atol must be a finite number >= 0, got {atol!r}", ValueError)
    atol = tolerance
    for name, value in (("probs", probs), ("targets", targets)):
        if not isinstance(value, Tensor):
            raise_error(f"{name} must be a torch.Tensor, got {type(value).__name__}; "
                        "convert it with torch.as_tensor", TypeError)
    if not probs.is_floating_point():
        raise_error(f"probs must be floating point, got {probs.dtype}", TypeError)
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise_error(f"targets must be integer class indices, got {targets.dtype}", TypeError)
    if probs.dim() != 2 or targets.shape != probs.shape[:1]:
        raise_error(
            f"probs must be [N, C] and targets [N]; got {tuple(probs.shape)} and "
            f"{tuple(targets.shape)}", ValueError)
    if probs.shape[0] == 0:
        raise_error(
            f"probs of shape {tuple(probs.shape)} hold no examples (N = 0): the metric "
            "would be NaN; skip empty evaluation sets", ValueError)
    # each value check: eager, a ValueError naming the values; while torch.compile traces
    # (no data-dependent branch in a graph), a runtime assert with the same message
    classes = probs.shape[1]
    _require(targets, lambda: (targets.min() >= 0) & (targets.max() < classes),
             f"targets must be class indices in [0, {classes}) for probs of {classes} "
             "classes{got}",
             got=lambda: f", got values in [{int(targets.min())}, {int(targets.max())}]")
    probs = probs.detach()  # the checks read values only (no warning for a graph tensor)
    sums = probs.sum(-1)
    atol = max(atol, probs.shape[1] * torch.finfo(probs.dtype).eps)  # float16: rounding
    _require(probs, lambda: torch.isfinite(probs).all(),
             "probs contain NaN or inf (a diverged model's outputs?)")
    _require(probs, lambda: _rows_sum_to_one(sums, atol),
             "probs rows must sum to one (pass softmax probabilities, not logits)")
    # torchmetrics would take such a tensor for logits and softmax it again
    _require(probs, lambda: (probs.min() >= 0) & (probs.max() <= 1),
             "probs must lie in [0, 1]{got}; clamp rounding errors (probs.clamp(0, 1)) or "
             "pass softmax probabilities",
             got=lambda: f", got values in [{float(probs.min()):.3g}, "
                         f"{float(probs.max()):.3g}]")


def _rows_sum_to_one(sums: Tensor, atol: float) -> Tensor:
    """``torch.allclose(sums, 1, atol=atol)`` as a 0-d bool tensor (no sync, no
    data-dependent branch: it compiles into a graph)."""
    return ((sums - 1).abs() <= atol + 1e-5).all()  # allclose's rtol 1e-5 times |1|


def _require(t: Tensor, ok: Callable[[], Tensor], message: str, *,
             got: Callable[[], str] | None = None, error: type[Exception] = ValueError,
             ) -> None:
    """A value check of ``t`` (skipped without values: empty, or on the ``meta`` device).

    ``ok()`` is a 0-d bool tensor, true where the values pass. Eager mode: raise
    ``error(message)`` where it is false, with ``{got}`` in ``message`` replaced by
    ``got()`` (the offending values, read from the tensors). While ``torch.compile``
    traces (no data-dependent branch in a graph): a runtime assert in the graph, which
    raises a ``RuntimeError`` with the message (``{got}`` left out: a graph's message is
    a constant) when the compiled code runs on values that fail.
    """
    if not _has_values(t):
        return
    if torch.compiler.is_compiling():
        torch._assert_async(ok(), message.replace("{got}", ""))
    elif not bool(ok()):
        raise error(message.replace("{got}", got() if got is not None else ""))


def _class_indices(targets: Tensor, probs: Tensor) -> Tensor:
    """Checked ``targets`` as int64 indices. While ``torch.compile`` traces, clamped into
    ``[0, C)``: the graph's assert of :func:`check_probabilities` raises for a target
    outside it, and an indexing kernel's own bounds check must not raise first, with a
    message that names neither the targets nor the fix."""
    targets = targets.long()
    if torch.compiler.is_compiling():
        return targets.clamp(0, probs.shape[1] - 1)
    return targets


def _has_values(t: Tensor) -> bool:
    """Whether a check can read ``t``'s values: not empty, and not on the ``meta`` device
    (a shape without values: its checks are skipped, as :func:`~sbnn_addons.check_finite`
    skips them, and the computation itself runs)."""
    return bool(t.numel()) and not t.is_meta


def _check_bins(name: str, value) -> int:
    """``value`` (a number of histogram or calibration bins) as an int; ``ValueError``
    unless it is an integer >= 1."""
    count = as_int(value)
    if count is None or count < 1:
        raise_error(f"{name} must be an integer >= 1, got {value!r}", ValueError)
    return count


def _at_least_float32(probs: Tensor) -> Tensor:
    """Half-precision probabilities as float32 (as torchmetrics reads them for the ECE):
    a bfloat16 sum over a bin of hundreds of examples, or a float16 log, loses the
    metric's third decimal."""
    return probs.float() if probs.dtype in (torch.float16, torch.bfloat16) else probs


def negative_log_likelihood(probs: Tensor, targets: Tensor, eps: float | None = None) -> Tensor:
    """``-mean log p(y_n | x_n)``; a probability of 0 counts as ``eps`` (default: the
    smallest normal number of ``probs``' dtype, so a float32 softmax's 0 counts 87.3
    nats, a float64 one's 708), not as an infinite loss. Half-precision probabilities
    are read in float32 (as float32 ones: a float16 probability below 6.1e-5 is kept,
    not counted as 6.1e-5)."""
    check_probabilities(probs, targets)
    probs = _at_least_float32(probs)
    if eps is None:
        eps = torch.finfo(probs.dtype).tiny
    elif (floor := as_float(eps)) is None or not 0 < floor < 1:
        # eps <= 0 clamped nothing: a probability of 0 gave an infinite NLL
        raise_error(f"eps must be a number in (0, 1) (what a probability of 0 counts "
                    f"as) or None, got {eps!r}", ValueError)
    else:
        eps = floor
    return -probs.gather(1, _class_indices(targets, probs)[:, None]).clamp_min(eps).log().mean()


def brier_score(probs: Tensor, targets: Tensor) -> Tensor:
    """``mean_n sum_c (p_nc - 1[y_n = c])^2`` (half precision computed in float32)."""
    check_probabilities(probs, targets)
    probs = _at_least_float32(probs)
    onehot = torch.nn.functional.one_hot(_class_indices(targets, probs),
                                         probs.shape[1]).to(probs.dtype)
    return ((probs - onehot) ** 2).sum(-1).mean()


def expected_calibration_error(probs: Tensor, targets: Tensor, n_bins: int = 15) -> Tensor:
    """ECE with ``n_bins`` equal-width confidence bins (torchmetrics, L1 norm); 0 for one
    class (every prediction right with confidence 1)."""
    check_probabilities(probs, targets)
    n_bins = _check_bins("n_bins", n_bins)
    if probs.shape[1] == 1:  # confidence 1, always right (torchmetrics refuses one class)
        return torch.zeros((), dtype=torch.float32, device=probs.device)
    if torch.compiler.is_compiling():
        # torchmetrics' entry point branches on the values (its logits test), which a
        # graph cannot: its computation after that test, on probabilities checked above
        from torchmetrics.functional.classification.calibration_error import _ce_compute

        confidences, predictions = probs.max(dim=1)
        accuracies = predictions.eq(targets)
        return _ce_compute(confidences.float(), accuracies.float(), n_bins, "l1")
    from torchmetrics.functional.classification import multiclass_calibration_error

    return multiclass_calibration_error(probs, targets.long(), num_classes=probs.shape[1],
                                        n_bins=n_bins, norm="l1")


def classification_metrics(probs: Tensor, targets: Tensor) -> dict[str, float]:
    """``accuracy``, ``nll``, ``brier`` and ``ece`` (15 bins) as Python floats."""
    check_probabilities(probs, targets)
    probs = probs.detach()  # Python floats: no graph
    return {
        "accuracy": float((probs.argmax(-1) == targets).float().mean()),
        "nll": float(negative_log_likelihood(probs, targets)),
        "brier": float(brier_score(probs, targets)),
        "ece": float(expected_calibration_error(probs, targets)),
    }


# --------------------------------------------------------------------------- calibration
def adaptive_calibration_error(probs: Tensor, targets: Tensor, n_bins: int = 15) -> Tensor:
    """Adaptive ECE: equal-mass confidence bins (torchmetrics has only equal-width bins).

    .. code-block:: text

        sort the N examples by confidence c_n = max_c p_nc, split them into n_bins bins of
        (nearly) equal size (sizes differ by at most one),
        ACE = sum_b |B_b| / N * | acc(B_b) - mean conf(B_b) |

    Examples of equal confidence cannot be ordered, so a group of ties that a bin edge
    splits counts in each of its bins with the group's accuracy (each example's
    correctness replaced by its tie group's mean): the ACE does not depend on the order of
    the examples (``mc(K)`` and spike-count outputs take few distinct confidences).

    Args:
        probs: predictive probabilities ``[N, C]`` (rows sum to one).
        targets: integer labels ``[N]``.
        n_bins: number of bins ``>= 1`` (bins are never empty: at most ``N`` are used).

    Returns:
        Scalar tensor (float32 for half-precision ``probs``).
    """
    check_probabilities(probs, targets)
    n_bins = _check_bins("n_bins", n_bins)
    probs = _at_least_float32(probs)
    n = probs.shape[0]
    conf, pred = probs.max(-1)
    correct = (pred == targets).to(probs.dtype)
    order = torch.argsort(conf, stable=True)
    # ties: every example of a tie group gets the group's accuracy (order-independent)
    _, group, size = torch.unique_consecutive(conf[order], return_inverse=True,
                                              return_counts=True)
    hits = correct.new_zeros(size.shape).index_add_(0, group, correct[order])
    correct = torch.empty_like(correct).index_copy_(0, order, (hits / size)[group])
    total = probs.new_zeros(())
    for idx in torch.tensor_split(order, min(n_bins, n)):
        total = total + (correct[idx].sum() - conf[idx].sum()).abs()
    return total / n


# --------------------------------------------------------------------------- OOD
def _check_scores(name: str, scores: Tensor) -> Tensor:
    if not isinstance(scores, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor [N], got {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError(f"{name} contains NaN or inf scores")
    return scores.detach().double()


def ood_metrics(scores_in: Tensor, scores_out: Tensor) -> dict[str, float]:
    """Out-of-distribution detection quality of an uncertainty score.

    Convention: a **higher** score means "more likely out-of-distribution" (predictive
    entropy, mutual information). In-distribution examples are the positives of the
    FPR@95%TPR (the usual OOD convention, Hendrycks & Gimpel 2017): the threshold keeps
    95 % of the in-distribution examples, and ``fpr95`` is the fraction of
    out-of-distribution examples that it also keeps.

    .. code-block:: text

        auroc = P(score_out > score_in) + P(tie) / 2       (torchmetrics binary_auroc)
        fpr95 = min { FPR(t) : TPR(t) >= 0.95 }             (torchmetrics binary_roc)

    Args:
        scores_in: scores of in-distribution examples ``[N_in]``.
        scores_out: scores of out-of-distribution examples ``[N_out]``.

    Returns:
        ``{"auroc": float, "fpr95": float}``; AUROC 1 and FPR95 0 are perfect.
    """
    from torchmetrics.functional.classification import binary_auroc, binary_roc

    s_in, s_out = _check_scores("scores_in", scores_in), _check_scores("scores_out", scores_out)
    scores = torch.cat([s_in, s_out])
    # ranks in [0, 1] (ties kept): both metrics depend on the order only, and torchmetrics
    # puts scores outside [0, 1] through a sigmoid, which ties every score above ~37
    _, rank = torch.unique(scores, sorted=True, return_inverse=True)
    scores = rank.double() / max(int(rank.max()), 1)
    is_out = torch.cat([torch.zeros_like(s_in), torch.ones_like(s_out)]).long()
    auroc = binary_auroc(scores, is_out)
    # in-distribution positives, ranked by -score ("more in-distribution")
    fpr, tpr, _ = binary_roc(-scores, 1 - is_out)
    fpr95 = fpr[tpr >= 0.95 - 1e-12].min()
    return {"auroc": float(auroc), "fpr95": float(fpr95)}


# --------------------------------------------------------------------------- spikes, SynOps
_CONVS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d,
          torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
_WEIGHT_LAYERS = (torch.nn.Linear, *_CONVS)
#: layers with synapses whose operations :func:`layer_synops` does not count
_UNCOUNTED_LAYERS = (torch.nn.RNNBase, torch.nn.RNNCellBase, torch.nn.Bilinear)


def layer_synops(layer: torch.nn.Module, x: Tensor, *,
                 output_size: Sequence[int] | None = None) -> Tensor:
    """Synaptic operations of one weight-layer call: one per (non-zero input, synapse).

    .. code-block:: text

        Linear:  SynOps = nnz(x) * out_features
        Conv:    SynOps = sum over output positions of nnz(x in the receptive field)
                          * out_channels / groups    (exact at the borders; a
                          circular / reflect / replicate padding counts the inputs it
                          copies)
        ConvTranspose: the same sum over the output positions each input reaches (those
                          that the padding crops are not counted)

    For binary spike inputs this is ``sum over spikes of the spike's fan-out``.

    Args:
        layer: ``nn.Linear``, ``nn.Conv1d`` / ``Conv2d`` / ``Conv3d`` or
            ``nn.ConvTranspose1d`` / ``2d`` / ``3d`` (or a subclass, e.g. SpikingJelly's
            ``layer.Conv3d``).
        x: the layer's input (``[*, in_features]``, or ``[*, N, C, *spatial]`` with any
            leading dimensions, e.g. the steps of a SpikingJelly multi-step layer).
        output_size: a transposed convolution's ``output_size`` argument, where the call
            passed one (it sets the output padding); ignored by the other layers.

    Returns:
        Scalar float64 tensor.

    Raises:
        TypeError: ``x`` is not a tensor, or ``layer`` is none of these layers.
        ValueError: ``x`` does not fit the layer (its features or channels).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor (the layer's input), got "
                        f"{type(x).__name__}")
    if isinstance(layer, torch.nn.Linear):
        if x.dim() == 0 or x.shape[-1] != layer.in_features:
            raise ValueError(
                f"x of shape {tuple(x.shape)} is not an input of {type(layer).__name__} "
                f"with in_features={layer.in_features} (its last dimension)")
        return (x.detach() != 0).sum().double() * layer.out_features
    if not isinstance(layer, _CONVS):
        raise TypeError("layer must be Linear, Conv1d/2d/3d or ConvTranspose1d/2d/3d, got "
                        f"{type(layer).__name__}")
    spatial = len(layer.kernel_size)
    if x.dim() < spatial + 1 or x.shape[-spatial - 1] != layer.in_channels:
        raise ValueError(
            f"x of shape {tuple(x.shape)} is not an input of {type(layer).__name__} with "
            f"in_channels={layer.in_channels}: expected [*, {layer.in_channels}, "
            f"{', '.join('DHW'[3 - spatial:]) if spatial > 1 else 'L'}]")
    nz = (x.detach() != 0).to(torch.float32)
    if nz.dim() == spatial + 1:  # unbatched
        nz = nz.unsqueeze(0)
    elif nz.dim() > spatial + 2:  # leading step dimensions (SpikingJelly multi-step)
        nz = nz.flatten(0, nz.dim() - spatial - 2)
    g = layer.groups
    nz = nz.unflatten(1, (g, nz.shape[1] // g)).sum(2)  # [N, groups, *spatial]
    ones = nz.new_ones((g, 1, *layer.kernel_size))
    if layer.transposed:  # each output position: the non-zero inputs that reach it
        conv_t = getattr(torch.nn.functional, f"conv_transpose{spatial}d")
        output_padding = layer._output_padding(
            nz, None if output_size is None else list(output_size), list(layer.stride),
            list(layer.padding), list(layer.kernel_size), spatial, list(layer.dilation))
        counts = conv_t(nz, ones, stride=layer.stride, padding=layer.padding,
                        output_padding=tuple(output_padding), groups=g,
                        dilation=layer.dilation)
        return counts.sum(dtype=torch.float64) * (layer.out_channels // g)
    conv = getattr(torch.nn.functional, f"conv{spatial}d")
    padding = layer.padding if isinstance(layer.padding, str) else tuple(layer.padding)
    if layer.padding_mode != "zeros":  # border inputs are read again by the padding
        nz = torch.nn.functional.pad(nz, layer._reversed_padding_repeated_twice,
                                     mode=layer.padding_mode)
        padding = 0
    counts = conv(nz, ones, stride=layer.stride, padding=padding, dilation=layer.dilation,
                  groups=g)
    return counts.sum(dtype=torch.float64) * (layer.out_channels // g)


def _next_method(module: torch.nn.Module, attr: str):
    """What method ``attr`` of ``module`` runs now, as a function of the module: the
    class's, or the wrapper of an enclosing :class:`SpikeMonitor`."""
    previous = module.__dict__.get(attr)
    if previous is None:
        return getattr(type(module), attr)
    if isinstance(previous, types.MethodType) and previous.__self__ is module:
        return previous.__func__
    return lambda _mod, *args, **kwargs: previous(*args, **kwargs)  # set by its user


def _shadow(module: torch.nn.Module, attr: str, method, monitor: SpikeMonitor,
            session: object, previous) -> None:
    """Make ``method`` (a function of the module) ``module.<attr>``: an instance attribute,
    bound to ``module``, that shadows the class's method. ``torch.compile`` guards the
    attribute (not a module's hooks): a graph traced before it was set, or after it was
    removed, is traced again. The function is marked with the monitor's ``session`` (one
    ``with`` block) and the entry it shadows, ``previous`` (see :func:`_unmonitored`)."""
    method._sbnn_monitor = (monitor, session, previous)
    module.__dict__[attr] = types.MethodType(method, module)


def _monitor_mark(entry) -> tuple | None:
    """``(monitor, session, previous entry)`` where ``entry`` (a module's instance
    attribute) is a :class:`SpikeMonitor`'s wrapper, else ``None``."""
    if isinstance(entry, types.MethodType):
        return getattr(entry.__func__, "_sbnn_monitor", None)
    return None


def _unmonitored(entry, exited_only: bool = False):
    """The entry under the monitors' wrappers in ``entry``'s chain (``None``: the class's
    method); with ``exited_only``, under those of the monitors' blocks that have exited
    only (it stops at the wrapper of an open block)."""
    while (mark := _monitor_mark(entry)) is not None:
        monitor, session, previous = mark
        if exited_only and monitor._session is session:
            break
        entry = previous
    return entry


#: The instance attributes that a :class:`SpikeMonitor` sets on the modules it watches.
_MONITORED = ("fire", "fire_inhibition", "forward", "__reduce_ex__")


def _reduce_unmonitored(module: torch.nn.Module, protocol: int):
    """``module.__reduce_ex__(protocol)`` (what ``copy.deepcopy``, ``pickle`` and
    ``torch.save`` read) of a module that a :class:`SpikeMonitor` watches, as outside the
    monitor's block: its state without the monitors' wrappers (a copy kept them, bound to
    it, after the block, holding the monitor and the watched model; a pickled one could
    not be loaded)."""
    rv = type(module).__reduce_ex__(module, protocol)
    if not isinstance(rv, tuple) or len(rv) < 3 or not isinstance(rv[2], dict):
        return rv
    state = dict(rv[2])
    for attr in _MONITORED:
        entry = _unmonitored(state.get(attr))
        if entry is None:
            state.pop(attr, None)
        else:  # set by its user: copied or pickled as it is
            state[attr] = entry
    return (*rv[:2], state, *rv[3:])


class SpikeMonitor:
    """Count the spikes of every :class:`~sbnn_addons.IWSTSpike` and the SynOps of every
    weight layer while a model runs.

    Used as a context manager; the counters accumulate over every call inside it::

        with SpikeMonitor(model) as mon:
            model(x)
        mon.counts     # {layer name: spikes emitted}       (float64 scalars, on the
                       #  model's device: read them once, e.g. spike_rates())
        mon.units      # {layer name: unit-steps evaluated} (ints, batch included)
        mon.synops     # {weight-layer name: SynOps}

    Spikes are counted at :meth:`IWSTSpike.fire`, which every entry point of the spike
    function goes through (``forward``, snnTorch / SpikingJelly neurons, and the
    framework-free :class:`~sbnn_addons.LIF`, which calls ``fire`` directly and would
    escape a forward hook); the monitor wraps that method on the instances and restores
    it on exit. A snnTorch neuron built with ``inhibition=True`` keeps only the spike of
    its largest membrane after its spike function fired: its spikes are counted at its
    ``fire_inhibition``, which returns the spikes it emits. A weight layer's SynOps are
    counted at its ``forward``, wrapped on the instance in the same way (after the
    layer's forward pre-hooks: the input it computes on). The wrappers are attributes,
    which ``torch.compile`` guards: a compiled model traced before the monitor was
    entered is traced again, and counts. Monitors nest (an outer one, e.g. around
    :func:`~sbnn_addons.mc_predict`, which runs its own, keeps counting after the inner
    one exits); one monitor cannot be entered twice at once. Blocks may close in any
    order (or ``__exit__`` be called by hand): a monitor counts only while its own block
    is open, and once every block has closed the model holds none of the wrappers. A
    ``copy.deepcopy`` of the model (or of a module in it) taken inside the block is a
    copy without the wrappers, as one taken outside it, and so is what ``pickle`` and
    ``torch.save`` write (the monitor sets the watched modules' ``__reduce_ex__`` for
    the block).

    Args:
        model: any module containing ``IWSTSpike`` modules and/or weight layers (a
            compiled wrapper ``torch.compile(net)`` is counted under ``net``'s names).
        synops: count SynOps at ``nn.Linear``, ``nn.Conv1d/2d/3d`` and
            ``nn.ConvTranspose1d/2d/3d`` layers (Bayesian layers included).
        spiking_inputs_only: count SynOps only for calls whose input is binary (spikes);
            a layer fed with analogue values (e.g. the encoder layer) performs MACs, not
            SynOps, and is skipped (so is one fed with the graded spikes of an snnTorch
            neuron whose ``graded_spikes_factor`` is not 1: their values are not 0/1).

    Warns:
        UserWarning: with ``synops``, the model holds layers with synapses whose
            operations are not counted (recurrent ``nn.RNN`` / ``LSTM`` / ``GRU`` layers
            and cells, ``nn.Bilinear``, e.g. inside snnTorch's ``SLSTM``): the SynOps
            total leaves them out.
    """

    def __init__(self, model: torch.nn.Module, *, synops: bool = True,
                 spiking_inputs_only: bool = True) -> None:
        from .spike import IWSTSpike

        check_module(model, "SpikeMonitor")
        synops = check_flag("synops", synops)
        self.model = model
        self.count_synops = synops
        self.spiking_inputs_only = check_flag("spiking_inputs_only", spiking_inputs_only)
        # a compiled wrapper (torch.compile(net)): the names of the model it wraps, not
        # '_orig_mod.'-prefixed ones (the model's own counts and mc_predict's are keyed
        # by them)
        net = compiled_wrapped(model)
        named = list(net.named_modules())
        self._spikes = [(n, m) for n, m in named if isinstance(m, IWSTSpike)]
        self._inhibitors = _inhibition_neurons(net, self._spikes)
        self._quiet: dict[str, int] = {}  # per spike function: inside an inhibition neuron
        self._layers = [(n, m) for n, m in named if synops and isinstance(m, _WEIGHT_LAYERS)]
        uncounted = [n for n, m in named if synops and isinstance(m, _UNCOUNTED_LAYERS)]
        if uncounted:
            warnings.warn(
                f"SpikeMonitor: the SynOps of the layers {uncounted[:6]} (recurrent or "
                "bilinear) are not counted: the library cannot count their synaptic "
                "operations, so the SynOps total leaves them out; pass synops=False "
                "(mc_predict(..., synops=False)) if you do not read SynOps", stacklevel=2)
        # (module, method name, the instance's entry before entering)
        self._saved: list = []
        self._active = False
        self._session: object | None = None  # one per `with` block, None outside it
        self._entered = False  # read before any `with` block: nothing was counted
        self.reset()

    def reset(self) -> None:
        """Zero every counter."""
        self.counts: dict[str, Tensor] = {n: torch.zeros((), dtype=torch.float64)
                                          for n, _ in self._spikes}
        # int64 scalars, not Python ints: in a compiled model Dynamo specialises on an
        # int it reads, so a count kept as one recompiled the graph at every call
        self._unit_counts: dict[str, Tensor] = {n: torch.zeros((), dtype=torch.int64)
                                                for n, _ in self._spikes}
        self.synops: dict[str, Tensor] = {n: torch.zeros((), dtype=torch.float64)
                                          for n, _ in self._layers}

    def __enter__(self) -> SpikeMonitor:
        if self._active:
            raise RuntimeError(
                "this SpikeMonitor is already active (a nested `with mon:` on the same "
                "monitor would count every spike twice); keep one `with` block, or use a "
                "second SpikeMonitor(model)")
        self._active = True
        self._entered = True
        session = self._session = object()
        counted = [(name, m, attr, make) for attr, make, pairs in (
            ("fire", self._counting_fire, self._spikes),
            ("fire_inhibition", self._counting_inhibition, self._inhibitors),
            ("forward", self._counting_forward, self._layers)) for name, m in pairs]
        watched = {id(m): m for _, m, _, _ in counted}.values()
        self._saved = [(m, attr, m.__dict__.get(attr)) for _, m, attr, _ in counted]
        self._saved += [(m, "__reduce_ex__", m.__dict__.get("__reduce_ex__"))
                        for m in watched]
        self._quiet = {name: 0 for name, _ in self._inhibitors}
        # (each module's entry is wrapped once: its method below is the saved one)
        methods = [make(name, m, _next_method(m, attr), session)
                   for name, m, attr, make in counted]
        methods += [_reduce_hook() for _ in watched]
        for (m, attr, previous), method in zip(self._saved, methods, strict=True):
            _shadow(m, attr, method, self, session, previous)
        return self

    # The wrappers take the module they are called on: a copy of a monitored module
    # (copy.deepcopy rebinds a bound method to the copy) runs its own methods, uncounted.
    # A wrapper counts while its own block is open (`session`): one left under another
    # monitor's wrapper by a block exited out of order passes the calls on, uncounted.
    def _counting_fire(self, name: str, owner, call, session):
        def fire(mod, u, variance):
            out = call(mod, u, variance)
            # an inhibition neuron counts what it emits
            if mod is owner and self._session is session and not self._quiet.get(name):
                self._count(name, out)
            return out

        return fire

    def _counting_inhibition(self, name: str, owner, call, session):
        def fire_inhibition(mod, batch_size, mem):
            if mod is not owner or self._session is not session:
                return call(mod, batch_size, mem)
            self._quiet[name] += 1  # the spike function's draws before the inhibition
            try:
                out = call(mod, batch_size, mem)
            finally:
                self._quiet[name] -= 1
            self._count(name, out != 0)  # the spikes the neuron emits
            return out

        return fire_inhibition

    def _counting_forward(self, name: str, owner, call, session):
        def forward(mod, *args, **kwargs):
            x = args[0] if args else kwargs.get("input")
            if mod is owner and self._session is session and isinstance(x, Tensor):
                # a transposed convolution's output_size (its output padding)
                size = args[1] if len(args) > 1 else kwargs.get("output_size")
                self._count_synops(name, mod, x, size)
            return call(mod, *args, **kwargs)

        return forward

    def _count_synops(self, name: str, mod: torch.nn.Module, x: Tensor, size) -> None:
        """Add the SynOps of the input ``x`` of weight layer ``mod`` to ``name``'s counter
        (none for an analogue input where ``spiking_inputs_only``)."""
        if not self.spiking_inputs_only or is_binary(x):  # marked spikes: binary
            ops = layer_synops(mod, x, output_size=size)
        elif x.is_cpu and not torch.compiler.is_compiling():
            if not bool(((x == 0) | (x == 1)).all()):
                return  # analogue input: MACs, not SynOps (and none computed)
            ops = layer_synops(mod, x, output_size=size)
        else:  # a graph, or an accelerator: no data-dependent branch, no sync
            ops = layer_synops(mod, x, output_size=size)
            ops = torch.where(((x == 0) | (x == 1)).all(), ops, ops.new_zeros(()))
        # a CPU scalar plus a device one stays on the device: no sync per call
        self.synops[name] = self.synops[name] + ops

    def __exit__(self, *exc) -> None:
        # put back what was there (an enclosing monitor's wrapper keeps counting after an
        # inner one, e.g. mc_predict's, exits), less the wrappers of monitors whose blocks
        # exited out of order; where a monitor entered later is still open, its wrapper
        # stays and calls this one's, which counts no more (that monitor's exit skips it)
        session, self._session = self._session, None
        for m, attr, previous in reversed(self._saved):
            mark = _monitor_mark(m.__dict__.get(attr))
            if mark is None or mark[0] is not self or mark[1] is not session:
                continue
            previous = _unmonitored(previous, exited_only=True)
            if previous is None:
                m.__dict__.pop(attr, None)
            else:
                m.__dict__[attr] = previous
        self._saved = []
        self._active = False

    def _count(self, name: str, out: Tensor) -> None:
        """Add the spikes ``out`` (0/1 per unit-step) to layer ``name``'s counters."""
        # summed in float64: a bfloat16 sum is exact up to 256 only, a float32 one 2^24
        # on the device of the spikes (a CPU scalar plus a device one): no sync per call
        self.counts[name] = self.counts[name] + out.detach().sum(dtype=torch.float64)
        self._unit_counts[name] = self._unit_counts[name] + out.numel()

    def _check_entered(self) -> None:
        if not self._entered:
            raise RuntimeError(
                "SpikeMonitor: the monitor was never entered, so it counted nothing (every "
                "rate would read 0): run the model inside the monitor's block, "
                "`with SpikeMonitor(model) as mon: model(x)`, then read mon.spike_rates()")

    @property
    def units(self) -> dict[str, int]:
        """Per spike layer: the unit-steps evaluated (batch included)."""
        self._check_entered()
        return {n: int(c) for n, c in self._unit_counts.items()}

    def total_spikes(self) -> float:
        """Spikes of all layers."""
        self._check_entered()
        return float(sum(self.counts.values())) if self.counts else 0.0

    def total_synops(self) -> float:
        """SynOps of all weight layers."""
        self._check_entered()
        return float(sum(self.synops.values())) if self.synops else 0.0

    def spike_rates(self) -> dict[str, float]:
        """Per layer: spikes / unit-steps (the firing probability per unit and step)."""
        units = self.units
        return {n: float(self.counts[n]) / units[n] if units[n] else 0.0 for n in self.counts}


def _reduce_hook():
    """A new ``__reduce_ex__`` function for a watched module (a function object of its
    own: :func:`_shadow` marks it)."""
    def __reduce_ex__(mod, protocol):
        return _reduce_unmonitored(mod, protocol)

    return __reduce_ex__


def _inhibition_neurons(model: torch.nn.Module, spikes: list) -> list:
    """``(name of the spike function, neuron)`` for every snnTorch neuron of ``model``
    built with ``inhibition=True`` whose ``spike_grad`` is one of ``spikes``: its spike
    function fires every unit above threshold, and the neuron's ``fire_inhibition`` then
    keeps the largest membrane's spike only."""
    names = {id(m): n for n, m in spikes}
    found = []
    for h in model.modules():
        if not getattr(h, "inhibition", False) or not callable(
                getattr(h, "fire_inhibition", None)):
            continue
        fn = h._modules.get("spike_grad", h.__dict__.get("spike_grad"))
        if id(fn) in names:
            found.append((names[id(fn)], h))
    return found
