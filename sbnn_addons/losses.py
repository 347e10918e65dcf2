"""The SBNN objective: auxiliary bias loss, KL and their combination (Method page, sections 5-6)."""

from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import Tensor, nn

from .base import (
    check_finite,
    check_flag,
    check_module,
    concrete_shape,
    functorch_values,
    raise_error,
)
from .layers import check_kl_samples, is_bayesian
from .spike import IWSTSpike

__all__ = ["enable_aux_loss", "aux_loss", "kl_divergence", "sbnn_objective", "REFERENCE_AUX_WEIGHT"]

#: Reference values of ``lambda`` (Method page, section 5).
REFERENCE_AUX_WEIGHT = {"cifar10": 1e-8, "dvs-gesture": 1e-10, "shd": 1e-6}


def _modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` (each once), in ``model.modules()`` order. Walks
    ``_modules`` itself: under ``torch.compile`` a module whose state the traced step has
    changed (a converted neuron, a host neuron) refuses method lookups such as
    ``named_modules`` (a graph break inside the loss)."""
    found: list[nn.Module] = []
    seen: set[int] = set()
    stack = [model]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        found.append(m)
        stack.extend(c for c in reversed(list(m._modules.values())) if c is not None)
    return found


def _spikes(model: nn.Module) -> list[IWSTSpike]:
    """The :class:`~sbnn_addons.IWSTSpike` modules of ``model`` (each once), in
    ``model.modules()`` order (:func:`_modules`: also inside a compiled step)."""
    check_module(model, "the auxiliary loss")
    return [m for m in _modules(model) if isinstance(m, IWSTSpike)]


def _discard_aux(model: nn.Module) -> None:
    """Drop the auxiliary terms the spike functions of ``model`` collected, unused."""
    for m in _spikes(model):
        m.pop_aux()


def enable_aux_loss(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Collect ``z^2`` in every :class:`~sbnn_addons.IWSTSpike` of ``model`` during
    forward passes in training mode with gradients enabled; read (and clear) it with
    :func:`aux_loss`."""
    enabled = check_flag("enabled", enabled)
    for m in _spikes(model):
        m.collect_aux = enabled
        m._aux_terms = []
        m._aux_stale = False
        m._aux_read = False
    if enabled:
        for host in _modules(model):
            for child in host._modules.values():
                if isinstance(child, IWSTSpike):
                    child._collects_in(host)
    return model


AUX_REDUCTIONS = ("mean", "sum")


def aux_loss(model: nn.Module, reduction: str = "mean") -> Tensor:
    """Collected auxiliary bias loss (without its weight), then cleared (Method page,
    section 5).

    .. code-block:: text

        "mean": mean over layers' units and steps of mean over batch (z^2)   (scale-free)
        "sum":  sum over layers and steps of mean over batch (sum over units z^2)
                (the paper's form, used with its tiny lambda: 1e-10 on DVS Gesture)

    ``z^2 / 2`` is ``KL(N(mu, sigma^2) || N(theta, sigma^2))``: the loss keeps units
    out of the saturated, high-bias regime. The ``"mean"`` form does not grow with the
    width, depth or number of steps, so a weight of 1e-3 .. 1 is meaningful for any model
    and the loss stays readable; ``"sum"`` is the released configuration's form.

    Args:
        model: a model with :class:`~sbnn_addons.IWSTSpike` spike functions after
            :func:`enable_aux_loss`.
        reduction: ``"mean"`` (default) or ``"sum"``.

    Returns:
        A scalar (0 if nothing was collected).

    Raises:
        ValueError: no spike function of ``model`` collects (:func:`enable_aux_loss` was
            not called): the loss would be 0 whatever the weight (inside a compiled
            step: a ``RuntimeError`` with the same message, see ``base.raise_error``).
    """
    if reduction not in AUX_REDUCTIONS:
        raise ValueError(f"reduction must be one of {AUX_REDUCTIONS}, got {reduction!r}")
    spikes = _spikes(model)
    if not any(m.collect_aux for m in spikes):
        raise_error(  # also from a compiled step (not Dynamo's "Observed exception")
            "aux_loss: the model collects no auxiliary terms (no IWSTSpike with collection "
            "on), so the loss would be 0: call sbnn_addons.enable_aux_loss(model) (or "
            "convert with to_sbnn(..., aux_loss=True)) before the forward pass", ValueError)
    parts = [t for t in (m.pop_aux() for m in spikes) if t is not None]
    if not parts and not torch.compiler.is_compiling() and torch.is_grad_enabled():
        if any(m.collect_aux and not m.training for m in spikes):
            warnings.warn(
                "aux_loss: nothing was collected because the model is in eval mode (terms "
                "are collected by training-mode forwards only); call model.train() before "
                "a training step", stacklevel=2)
        elif any(m.collect_aux and m._aux_read for m in spikes):
            warnings.warn(
                "aux_loss: the terms of the last forward pass were already read (aux_loss "
                "and sbnn_objective clear the terms they read), so this call returns 0, "
                "and a loss built from it has no auxiliary term: read them "
                "once per forward pass and keep the value (aux = sbnn_addons.aux_loss(model)"
                "; loss = nll + w * aux; log aux.item()), or let sbnn_objective(..., "
                "aux_weight=w) read them and do not call aux_loss as well", stacklevel=2)
    if not parts:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    total = torch.stack([term for term, _ in parts]).sum()
    if reduction == "sum":
        return total
    return total / max(sum(units for _, units in parts), 1)


def kl_divergence(model: nn.Module, prior=None, num_samples: int = 16) -> Tensor:
    """``KL(q(W) || p(W))`` **summed** over every weight of every Bayesian layer.

    Args:
        model: any module containing :class:`~sbnn_addons.BayesLinear` /
            ``BayesConv*`` layers.
        prior: see :meth:`sbnn_addons.BayesLinear.kl_divergence`.
        num_samples: Monte Carlo samples for priors without a closed-form KL.
    """
    check_module(model, "kl_divergence")
    num_samples = check_kl_samples(num_samples)
    layers = [m for m in _modules(model) if is_bayesian(m)]  # also after a compiled forward
    if not layers:
        raise ValueError("model contains no Bayesian layer; convert it first")
    return torch.stack([m.kl_divergence(prior, num_samples) for m in layers]).sum()


def sbnn_objective(
    nll: Tensor,
    model: nn.Module,
    num_data: int | None = None,
    *,
    kl_weight: float = 0.0,
    aux_weight: float = 0.0,
    aux_reduction: str = "mean",
    prior=None,
) -> Tensor:
    """Full SBNN training loss per example (Method page, section 6).

    .. code-block:: text

        loss = NLL_mean + kl_weight * KL(q(W) || p(W)) / N + aux_weight * L_aux

    ``NLL_mean`` is the batch-mean negative log-likelihood; the KL is summed over all
    weights and divided by the number of training examples ``N`` (so that the sum over an
    epoch of mini-batches is the negative ELBO per example when ``kl_weight = 1``).
    The released experiments use ``kl_weight = 0`` (the parity default) and the summed
    auxiliary loss (``aux_reduction="sum"``) with ``aux_weight`` from
    :data:`REFERENCE_AUX_WEIGHT`; with the default scale-free ``"mean"`` form a weight of
    1e-3 .. 1 is meaningful.

    Args:
        nll: scalar batch-mean NLL (e.g. ``F.cross_entropy``, or snnTorch's
            ``ce_rate_loss()``, whose shape ``(1,)`` is accepted).
        model: the SBNN model (its collected aux terms are consumed).
        num_data: training-set size ``N``; required when ``kl_weight > 0``.
        kl_weight: ``beta_kl >= 0``.
        aux_weight: ``lambda >= 0``.
        aux_reduction: ``"mean"`` or ``"sum"`` (see :func:`aux_loss`).
        prior: prior passed to :func:`kl_divergence`.

    Raises:
        TypeError: ``nll`` is not a floating-point tensor (inside a compiled step, an
            integer one: a ``RuntimeError`` with the same message).
        ValueError: ``nll`` is not a scalar, a weight that is not a finite number
            ``>= 0``, an unknown ``aux_reduction``, a ``num_data`` that is not an integer
            ``>= 1``, or ``kl_weight > 0`` without ``num_data`` (a non-scalar ``nll`` and
            the last two inside a compiled step: a ``RuntimeError`` with the same
            message); the NLL, the auxiliary term or the KL term is NaN or inf (unless
            :class:`~sbnn_addons.check_finite` is off; the message names the term and
            what to check): a NaN loss would train on and the optimiser would write
            NaN into the weights. The check reads the loss once (on an accelerator, a
            device synchronisation); inside a compiled step it is a runtime assert.
    """
    for name, value in (("kl_weight", kl_weight), ("aux_weight", aux_weight)):
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"{name} must be one number, got a tensor of shape "
                                 f"{tuple(value.shape)}")
            value = value.detach()  # read for the check only (no warning for a graph)
        if not isinstance(value, (numbers.Real, Tensor)) or not (
                math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if aux_reduction not in AUX_REDUCTIONS:
        raise ValueError(f"aux_reduction must be one of {AUX_REDUCTIONS}, got {aux_reduction!r}")
    if not isinstance(nll, torch.Tensor):
        raise TypeError(f"nll must be a scalar tensor (the batch-mean loss, e.g. "
                        f"F.cross_entropy(logits, y)), got {type(nll).__name__}")
    if nll.numel() != 1:
        raise_error(f"nll must be a scalar (batch mean), got shape {concrete_shape(nll)}",
                    ValueError)
    if not nll.is_floating_point():
        raise_error(f"nll must be a floating-point scalar (the batch-mean loss, e.g. "
                    f"F.cross_entropy(logits, y)), got dtype {nll.dtype}, which carries no "
                    "gradient", TypeError)
    if num_data is not None and (isinstance(num_data, bool)
                                 or not isinstance(num_data, numbers.Integral) or num_data < 1):
        raise_error("num_data (the training-set size N) must be an integer >= 1 (or None "
                    f"without a KL term), got {num_data!r}", ValueError)
    nll = nll.reshape(())  # snnTorch's losses (ce_rate_loss, ...) return shape (1,)
    loss = nll
    terms = [("nll", nll)]
    if aux_weight > 0:
        terms.append(("aux", aux_weight * aux_loss(model, aux_reduction)))
        loss = loss + terms[-1][1]
    else:  # weight 0 (e.g. the start of a warm-up): the collected terms are used up too
        _discard_aux(model)
    if kl_weight > 0:
        if num_data is None:
            raise_error("num_data (the training-set size N) must be an integer >= 1 "
                        f"when kl_weight > 0, got {num_data!r}", ValueError)
        terms.append(("kl", kl_weight * kl_divergence(model, prior) / num_data))
        loss = loss + terms[-1][1]
    _check_objective(loss, terms)
    return loss


#: What each term of :func:`sbnn_objective` is, and what to check when it is not finite.
_TERM_HELP = {
    "nll": ("the NLL (nll)", "check the model's output and the loss function (a log of 0: "
            "use F.cross_entropy on the logits, not the log of a softmax) and the data; a "
            "loss that grew step by step diverged: lower the learning rate or clip the "
            "gradients"),
    "aux": ("the auxiliary loss (aux_weight * aux_loss)", "z = u / sigma overflowed: a "
            "membrane far from the threshold with a tiny noise std; normalise the input, "
            "raise the noise std (std=, spike_std=) or lower aux_weight"),
    "kl": ("the KL term (kl_weight * KL / num_data)", "KL(q(W) || p(W)) overflowed: huge "
           "weights, a zero or tiny posterior std, or a prior that does not fit them; check "
           "the weights, the layers' std and the prior"),
}


def _check_objective(loss: Tensor, terms: list[tuple[str, Tensor]]) -> None:
    """Raise ``ValueError`` naming the non-finite terms of ``loss`` (unless
    :class:`~sbnn_addons.check_finite` is off): a NaN / inf objective trains on, and the
    optimiser writes NaN into the weights, silently. One read of ``loss`` (a device sync
    on an accelerator), the terms only when it is not finite; a runtime assert while
    ``torch.compile`` traces."""
    if not check_finite.enabled():
        return
    with torch._C.DisableTorchFunctionSubclass():  # plain reads (no variance flow)
        value = loss.detach()
        if value.is_meta:  # a shape without values
            return
        if torch.compiler.is_compiling():  # no data-dependent branch in a graph
            torch._assert_async(
                torch.isfinite(value),
                "sbnn_objective: the loss is NaN or inf (its NLL, auxiliary or KL term); "
                "to skip this check for speed use sbnn_addons.check_finite(False)")
            return
        if _is_finite(value):
            return
        bad = [(name, _read(term)) for name, term in terms if not _is_finite(term.detach())]
        if not bad:  # finite terms whose sum overflowed
            bad = [("sum", _read(loss))]
    parts = []
    for name, number in bad:
        what, fix = _TERM_HELP.get(name, ("the sum of its terms", "the terms are finite but "
                                          "their sum overflows: lower the weights"))
        parts.append(f"{what} is {number} ({fix})")
    raise ValueError(
        f"sbnn_objective: {'; '.join(parts)}. A NaN / inf loss trains on and the optimiser "
        "writes NaN into the weights, silently. To skip this check for speed use "
        "sbnn_addons.check_finite(False)")


def _is_finite(t: Tensor) -> bool:
    """Whether ``t`` (a scalar, or a ``vmap`` batch of them) holds no NaN / inf."""
    return math.isfinite(float(functorch_values(t).sum()))


def _read(t: Tensor) -> str:
    """``t``'s value for a message: ``nan``, ``inf`` or ``-inf``."""
    t = functorch_values(t.detach()).reshape(-1)
    if bool(torch.isnan(t).any()):
        return "NaN"
    bad = t[~torch.isfinite(t)]
    return str(float(bad[0] if bad.numel() else t[0]))
