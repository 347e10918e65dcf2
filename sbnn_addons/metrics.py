"""Classification and calibration metrics of a predictive distribution.

ECE uses torchmetrics' ``multiclass_calibration_error`` (15 equal-width bins, L1).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_probabilities", "negative_log_likelihood", "brier_score",
           "expected_calibration_error", "classification_metrics"]


def check_probabilities(probs: Tensor, targets: Tensor, atol: float = 1e-4) -> None:
    """Validate ``probs [N, C]`` (rows sum to one) against integer ``targets [N]``.

    Raises:
        TypeError: non-float ``probs`` or non-integer ``targets``.
        ValueError: shapes that do not match, or rows that do not sum to one.
    """
    if not probs.is_floating_point():
        raise TypeError(f"probs must be floating point, got {probs.dtype}")
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be integer class indices, got {targets.dtype}")
    if probs.dim() != 2 or targets.shape != probs.shape[:1]:
        raise ValueError(
            f"probs must be [N, C] and targets [N]; got {tuple(probs.shape)} and "
            f"{tuple(targets.shape)}"
        )
    sums = probs.sum(-1)
    if probs.numel() and not torch.allclose(sums, torch.ones_like(sums), atol=atol):
        raise ValueError("probs rows must sum to one (pass softmax probabilities, not logits)")


def negative_log_likelihood(probs: Tensor, targets: Tensor, eps: float = 1e-12) -> Tensor:
    """``-mean log p(y_n | x_n)``."""
    check_probabilities(probs, targets)
    return -probs.gather(1, targets[:, None]).clamp_min(eps).log().mean()


def brier_score(probs: Tensor, targets: Tensor) -> Tensor:
    """``mean_n sum_c (p_nc - 1[y_n = c])^2``."""
    check_probabilities(probs, targets)
    onehot = torch.nn.functional.one_hot(targets, probs.shape[1]).to(probs.dtype)
    return ((probs - onehot) ** 2).sum(-1).mean()


def expected_calibration_error(probs: Tensor, targets: Tensor, n_bins: int = 15) -> Tensor:
    """ECE with ``n_bins`` equal-width confidence bins (torchmetrics, L1 norm)."""
    check_probabilities(probs, targets)
    from torchmetrics.functional.classification import multiclass_calibration_error

    return multiclass_calibration_error(probs, targets, num_classes=probs.shape[1],
                                        n_bins=n_bins, norm="l1")


def classification_metrics(probs: Tensor, targets: Tensor) -> dict[str, float]:
    """``accuracy``, ``nll``, ``brier`` and ``ece`` (15 bins) as Python floats."""
    check_probabilities(probs, targets)
    return {
        "accuracy": float((probs.argmax(-1) == targets).float().mean()),
        "nll": float(negative_log_likelihood(probs, targets)),
        "brier": float(brier_score(probs, targets)),
        "ece": float(expected_calibration_error(probs, targets)),
    }
