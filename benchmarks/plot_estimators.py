"""Plot the replacement Jacobians of the IW-ST family against z (sigma = 1).

For each estimator the figure shows the per-state Jacobians ``J(1)`` and ``J(0)`` (the
value of ``dh/du`` when the sampled spike is 1 or 0) and their expectation under the
noise, ``E[J] = Phi(z) J(1) + (1 - Phi(z)) J(0)``, next to the exact gradient of the
firing probability, ``phi(z)``. An estimator whose ``E[J]`` lies on ``phi(z)`` is exact
for a loss linear in ``h``; the gap between ``J(1)`` and ``J(0)`` is what drives its
variance.

Usage::

    python benchmarks/plot_estimators.py [OUTPUT.png]

The default output is ``docs/img/estimator_gradients.png``. Pure computation, no data,
no randomness: the figure is a deterministic function of the library's code.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from sbnn_addons import AGR, IWST, ST  # noqa: E402

DEFAULT_OUTPUT = Path("docs/img/estimator_gradients.png")
MEMBERS = [
    ("ST", ST()),
    ("IW-ST(0.5)", IWST(0.5)),
    ("AGR(0) = IW-ST(1)", AGR(0.0)),
    ("AGR(0.5)", AGR(0.5)),
]


def curves(estimator, z: torch.Tensor) -> dict[str, torch.Tensor]:
    """``J(1)``, ``J(0)``, ``E[J]`` and the exact ``phi(z)`` on the grid ``z`` (sigma = 1)."""
    sigma = torch.ones_like(z)
    j1 = estimator.jacobian(z, sigma, torch.ones_like(z))
    j0 = estimator.jacobian(z, sigma, torch.zeros_like(z))
    p1 = torch.special.ndtr(z)
    return {
        "J(1)": j1,
        "J(0)": j0,
        "E[J]": p1 * j1 + (1.0 - p1) * j0,
        "exact": torch.exp(-0.5 * z * z) / (2.0 * torch.pi) ** 0.5,
    }


def plot(output: Path) -> Path:
    z = torch.linspace(-4.0, 4.0, 801, dtype=torch.float64)
    fig, grid = plt.subplots(2, 2, figsize=(9.0, 6.6), sharex=True, sharey=True)
    axes = grid.ravel()
    for ax, (name, est) in zip(axes, MEMBERS):
        c = curves(est, z)
        ax.plot(z, c["exact"], color="0.6", lw=4, alpha=0.6, label=r"exact $\varphi(z)$")
        ax.plot(z, c["E[J]"], color="k", lw=1.6, label=r"$E[J]$")
        ax.plot(z, c["J(1)"], color="tab:red", lw=1.2, ls="--", label=r"$J(1)$ (spike)")
        ax.plot(z, c["J(0)"], color="tab:blue", lw=1.2, ls=":", label=r"$J(0)$ (no spike)")
        ax.set_title(name)
        ax.set_ylim(0.0, 1.6)
        ax.grid(alpha=0.3)
    for ax in grid[1]:
        ax.set_xlabel(r"$z = (\mu - \theta) / \sigma$")
    for ax in grid[:, 0]:
        ax.set_ylabel(r"$dh/du$ at $\sigma = 1$")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", type=Path, default=DEFAULT_OUTPUT,
                        help=f"PNG path (default {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    print(plot(args.output))


if __name__ == "__main__":
    main()
