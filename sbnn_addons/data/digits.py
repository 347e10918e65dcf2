"""scikit-learn's bundled 8x8 digits, rate-coded to spikes (no download)."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

__all__ = ["load_digits_split", "rate_code"]


def load_digits_split(test_fraction: float = 0.25, seed: int = 0):
    """The 1797 digits as ``(x_train, y_train, x_test, y_test)``.

    Pixels are scaled to [0, 1] (``x / 16``), shape ``[N, 64]`` float32; labels int64.
    The split is a seeded random permutation.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer (the split's permutation), got {seed!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(
            "the digits task needs scikit-learn: pip install 'sbnn_addons[data]'"
        ) from err
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    if not 0 < n_test < len(y):
        raise ValueError(f"test_fraction={test_fraction} leaves an empty split of the "
                         f"{len(y)} digits; choose it so that both splits have examples")
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def rate_code(x: Tensor, num_steps: int, generator: torch.Generator | None = None) -> Tensor:
    """Bernoulli rate code: ``s_t ~ Bernoulli(x)`` independently for ``t < num_steps``.

    Args:
        x: intensities in [0, 1], shape ``[B, *]``.
        num_steps: ``T >= 1``.
        generator: optional generator for a replayable code.

    Returns:
        Spikes ``[T, B, *]`` with the dtype of ``x``.
    """
    if (isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral)
            or num_steps < 1):
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError("rate_code expects a floating-point tensor of intensities in [0, 1] "
                        f"(scale an image first, e.g. x.float() / 255), got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.numel() and not bool(((x >= 0) & (x <= 1)).all()):  # NaN fails too
        raise ValueError("rate_code expects intensities in [0, 1] (no NaN)")
    u = torch.rand((num_steps, *x.shape), generator=generator, dtype=x.dtype, device=x.device)
    return (u < x).to(x.dtype)
