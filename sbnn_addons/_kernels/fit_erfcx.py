"""Refit the erfcx polynomial of ``spike.c`` (a maintainer's tool, not used at run time).

``erfcx(x) = exp(x^2) erfc(x)`` for ``0 <= x <= 30`` is written as ``t Q(t)`` with
``t = 1 / (1 + x/2)`` and ``Q`` a polynomial of degree 10. This script fits ``Q`` to
``torch.special.erfcx`` (float64) by least squares on the relative error, with a few
reweighting rounds towards the worst points, on 4000 Chebyshev nodes of ``t`` in
``[1/16, 1]``, and prints the coefficients (constant term first) and the maximal relative
error of the float32 Horner evaluation. ``tests/test_kernels.py`` checks the kernel's
polynomial against ``torch.special.erfcx``.

Usage::

    python sbnn_addons/_kernels/fit_erfcx.py
"""

from __future__ import annotations

import numpy as np
import torch

DEGREE, T_LOW, NODES = 10, 1.0 / 16.0, 4000


def target(t: np.ndarray) -> np.ndarray:
    """``erfcx(x) / t`` at ``x = 2 (1/t - 1)``."""
    x = 2.0 * (1.0 / t - 1.0)
    return torch.special.erfcx(torch.from_numpy(x)).numpy() / t


def fit() -> np.ndarray:
    k = np.arange(NODES)
    t = (np.cos(np.pi * (k + 0.5) / NODES) + 1.0) / 2.0 * (1.0 - T_LOW) + T_LOW
    f = target(t)
    vander = np.vander(t, DEGREE + 1, increasing=True)
    weight = 1.0 / f
    for _ in range(30):
        coef, *_ = np.linalg.lstsq(vander * weight[:, None], f * weight, rcond=None)
        rel = (vander @ coef - f) / f
        weight = weight * (1.0 + 5.0 * np.abs(rel) / np.abs(rel).max())
    return coef


def float32_error(coef: np.ndarray) -> float:
    t = np.linspace(T_LOW, 1.0, 200_001)
    acc = np.zeros_like(t, dtype=np.float32)
    for c in coef.astype(np.float32)[::-1]:
        acc = acc * t.astype(np.float32) + c
    return float(np.abs((acc.astype(np.float64) - target(t)) / target(t)).max())


if __name__ == "__main__":
    coef = fit()
    print(", ".join(f"{c:.9e}" for c in coef))
    print(f"max relative error (float32 Horner): {float32_error(coef):.2e}")
