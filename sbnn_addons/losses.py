"""The SBNN objective: auxiliary bias loss, KL and their combination (Method page, sections 5-6)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .layers import is_bayesian
from .spike import IWSTSpike

__all__ = ["enable_aux_loss", "aux_loss", "kl_divergence", "sbnn_objective", "REFERENCE_AUX_WEIGHT"]

#: Reference values of ``lambda`` (Method page, section 5).
REFERENCE_AUX_WEIGHT = {"cifar10": 1e-8, "dvs-gesture": 1e-10, "shd": 1e-6}


def _spikes(model: nn.Module) -> list[IWSTSpike]:
    return [m for m in model.modules() if isinstance(m, IWSTSpike)]


def enable_aux_loss(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Collect ``z^2`` in every :class:`~sbnn_addons.IWSTSpike` of ``model`` during
    forward passes with gradients enabled; read (and clear) it with :func:`aux_loss`."""
    for m in _spikes(model):
        m.collect_aux = enabled
        m._aux_terms = []
    return model


def aux_loss(model: nn.Module) -> Tensor:
    """Collected auxiliary bias loss (without ``lambda``), then cleared (Method page, section 5).

    .. code-block:: text

        L_aux / lambda = sum over layers and steps of mean over batch (sum over units z^2)

    ``z^2 / 2`` is ``KL(N(mu, sigma^2) || N(theta, sigma^2))``: the loss keeps units
    out of the saturated, high-bias regime. Returns a scalar (0 if nothing was collected).
    """
    terms = [t for t in (m.pop_aux() for m in _spikes(model)) if t is not None]
    if not terms:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return torch.stack(terms).sum()


def kl_divergence(model: nn.Module, prior=None, num_samples: int = 16) -> Tensor:
    """``KL(q(W) || p(W))`` **summed** over every weight of every Bayesian layer.

    Args:
        model: any module containing :class:`~sbnn_addons.BayesLinear` /
            ``BayesConv*`` layers.
        prior: see :meth:`sbnn_addons.BayesLinear.kl_divergence`.
        num_samples: Monte Carlo samples for priors without a closed-form KL.
    """
    layers = [m for m in model.modules() if is_bayesian(m)]
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
    prior=None,
) -> Tensor:
    """Full SBNN training loss per example (Method page, section 6).

    .. code-block:: text

        loss = NLL_mean + kl_weight * KL(q(W) || p(W)) / N + aux_weight * L_aux

    ``NLL_mean`` is the batch-mean negative log-likelihood; the KL is summed over all
    weights and divided by the number of training examples ``N`` (so that the sum over an
    epoch of mini-batches is the negative ELBO per example when ``kl_weight = 1``).
    The released experiments use ``kl_weight = 0`` (the parity default) and
    ``aux_weight`` from :data:`REFERENCE_AUX_WEIGHT`.

    Args:
        nll: scalar batch-mean NLL (e.g. ``F.cross_entropy``).
        model: the SBNN model (its collected aux terms are consumed).
        num_data: training-set size ``N``; required when ``kl_weight > 0``.
        kl_weight: ``beta_kl >= 0``.
        aux_weight: ``lambda >= 0``.
        prior: prior passed to :func:`kl_divergence`.
    """
    for name, value in (("kl_weight", kl_weight), ("aux_weight", aux_weight)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    if nll.dim() != 0:
        raise ValueError(f"nll must be a scalar (batch mean), got shape {tuple(nll.shape)}")
    loss = nll
    if aux_weight > 0:
        loss = loss + aux_weight * aux_loss(model)
    if kl_weight > 0:
        if not num_data or num_data < 1:
            raise ValueError("num_data (the training-set size N) must be >= 1 when kl_weight > 0")
        loss = loss + kl_weight * kl_divergence(model, prior) / num_data
    return loss
