"""Random-manifold spike-timing task ("randman", Zenke & Vogels 2021), generated offline.

Each class ``c`` is a smooth random ``D``-dimensional manifold embedded in the space of
firing times of ``num_units`` input channels. A point ``x ~ U[0, 1]^D`` on the manifold
gives every channel ``j`` one spike at a time determined by a smooth random function:

.. code-block:: text

    g_{cjd}(x_d) = sum_{k=0}^{K-1} a_{cjdk} / (k + 1)^alpha * sin(2 pi (k x_d b_{cjdk} + c_{cjdk}))
    f_{cj}(x)    = prod_{d < D} g_{cjd}(x_d)
    tau_{cj}(x)  = (f_{cj}(x) - min_x f_{cj}) / (max_x f_{cj} - min_x f_{cj} + 1e-7)   in [0, 1]
    spike of channel j at step  floor(tau_{cj}(x) * num_steps * step_frac)  (clipped to T-1)

with ``a, b, c ~ U[0, 1]`` drawn per class, channel, manifold dimension and frequency
(``a_{cjd0} = 0``: no constant term), ``K = min(ceil(prec^(-1/alpha)), 1000)`` frequencies
(32 for ``alpha = 2``), and the min/max taken over the class's samples. Larger ``alpha``
gives smoother manifolds; larger ``D`` gives harder tasks. This follows the reference
``randman`` package (``Randman.eval_manifold`` + ``make_spiking_dataset``), re-implemented
with a seeded :class:`torch.Generator`, so the same seed always gives the same dataset.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ..base import check_flag

__all__ = ["make_randman", "randman_split", "TASK_DEFAULTS"]

#: Defaults of the ``randman`` benchmark task, in the keys of its config (``sbnn-bench
#: --task randman`` and :func:`sbnn_addons.ep.bench_task` both read them from here):
#: ``num_steps`` is ``T``; the ``randman_*`` keys are the ``num_classes``, ``num_units``,
#: ``samples_per_class``, ``manifold_dim`` and ``alpha`` of :func:`randman_split`.
TASK_DEFAULTS = {"num_steps": 50, "randman_classes": 10, "randman_units": 100,
                 "randman_samples": 250, "randman_dim": 1, "randman_alpha": 2.0}


def _check_positive(**values) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")


def make_randman(
    num_classes: int = 10,
    num_units: int = 100,
    num_steps: int = 100,
    samples_per_class: int = 1000,
    manifold_dim: int = 2,
    alpha: float = 2.0,
    *,
    step_frac: float = 1.0,
    prec: float = 1e-3,
    seed: int = 0,
    shuffle: bool = True,
) -> tuple[Tensor, Tensor]:
    """Generate a randman spike-timing dataset (see the module docstring for the maths).

    Args:
        num_classes: number of manifolds (classes) ``C``.
        num_units: input channels (embedding dimension).
        num_steps: time steps ``T`` of the raster.
        samples_per_class: points sampled per manifold.
        manifold_dim: intrinsic dimension ``D`` of each manifold.
        alpha: spectral decay ``1/(k+1)^alpha`` (smoothness), finite and ``> 0``.
        step_frac: fraction of the ``T`` steps the spike times spread over, in ``(0, 1]``.
        prec: precision that sets the number of frequencies ``ceil(prec^(-1/alpha))``.
        seed: integer seed of the :class:`torch.Generator` (the dataset is a function
            of it).
        shuffle: shuffle the samples (otherwise ordered by class).

    Returns:
        ``(spikes, labels)``: spikes ``[C * samples_per_class, T, num_units]`` float32 with
        exactly one spike per channel and sample; labels int64 in ``[0, C)``.
    """
    _check_positive(num_classes=num_classes, num_units=num_units, num_steps=num_steps,
                    samples_per_class=samples_per_class, manifold_dim=manifold_dim)
    if (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
            or not 0 < alpha < math.inf):  # inf left one (zero) frequency: all spikes at t = 0
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):  # 1.2 gave seed 1
        raise ValueError(f"seed must be an integer, got {seed!r}")
    shuffle = check_flag("shuffle", shuffle)  # shuffle="no" shuffled
    if not 0 < step_frac <= 1:
        raise ValueError(f"step_frac must be in (0, 1], got {step_frac}")
    if not 0 < prec < 1:
        raise ValueError(f"prec must be in (0, 1), got {prec}")
    gen = torch.Generator().manual_seed(int(seed))
    k_max = int(min(math.ceil(prec ** (-1.0 / alpha)), 1000))
    k = torch.arange(k_max, dtype=torch.float64)
    spect = 1.0 / (k + 1.0) ** alpha
    spikes, labels = [], []
    for c in range(num_classes):
        x = torch.rand(samples_per_class, manifold_dim, generator=gen, dtype=torch.float64)
        a, b, ph = torch.rand(3, num_units, manifold_dim, k_max, generator=gen,
                              dtype=torch.float64)
        a[..., 0] = 0.0
        # arg [N, U, D, K] = k * x_d * b + c
        arg = k * x[:, None, :, None] * b[None] + ph[None]
        g = (a * spect)[None] * torch.sin(2 * math.pi * arg)
        f = g.sum(-1).prod(-1)  # [N, U]
        lo, hi = f.min(0).values, f.max(0).values
        tau = (f - lo) / (hi - lo + 1e-7)
        steps = torch.clamp((tau * num_steps * step_frac).long(), 0, num_steps - 1)
        raster = torch.zeros(samples_per_class, num_steps, num_units)
        raster.scatter_(1, steps[:, None, :], 1.0)
        spikes.append(raster)
        labels.append(torch.full((samples_per_class,), c, dtype=torch.int64))
    x_all, y_all = torch.cat(spikes), torch.cat(labels)
    if shuffle:
        perm = torch.randperm(len(y_all), generator=gen)
        x_all, y_all = x_all[perm], y_all[perm]
    return x_all, y_all


def randman_split(test_fraction: float = 0.2, **kwargs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`make_randman` split into ``(x_train, y_train, x_test, y_test)``.

    The generated samples are shuffled; the last ``round(test_fraction * N)`` are the
    test set. ``kwargs`` go to :func:`make_randman` (``shuffle`` is forced on).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    kwargs["shuffle"] = True
    x, y = make_randman(**kwargs)
    n_test = int(round(test_fraction * len(y)))
    if n_test < 1 or n_test >= len(y):
        raise ValueError(
            f"test_fraction={test_fraction} leaves an empty split of {len(y)} samples; "
            "raise samples_per_class"
        )
    return x[:-n_test], y[:-n_test], x[-n_test:], y[-n_test:]
