"""PNG plots of a benchmark run: learning curves, accuracy / ECE bars, reliability diagrams."""

from __future__ import annotations

from pathlib import Path

import torch


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("plots need matplotlib: pip install 'sbnn_addons[plot]'") from err
    return plt


def reliability_curve(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15):
    """Per-bin (confidence, accuracy, count) over ``n_bins`` equal-width bins."""
    conf, pred = probs.max(-1)
    correct = (pred == targets).float()
    bins = torch.clamp((conf * n_bins).long(), max=n_bins - 1)
    count = torch.bincount(bins, minlength=n_bins).float()
    acc = torch.bincount(bins, correct, minlength=n_bins) / count.clamp_min(1)
    mean_conf = torch.bincount(bins, conf, minlength=n_bins) / count.clamp_min(1)
    return mean_conf, acc, count


def save_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """Write ``curves.png``, ``accuracy_ece.png`` and ``reliability.png``; return the paths."""
    plt = _plt()
    out_dir = Path(out_dir)
    paths = []
    labels = [f"{r['task']}/{r['method']}/s{r['seed']}" for r in rows]

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for r, lab in zip(rows, labels):
        ep = [c["epoch"] for c in r["curve"]]
        axes[0].plot(ep, [c["train_loss"] for c in r["curve"]], label=lab)
        axes[1].plot(ep, [100 * c["test_accuracy"] for c in r["curve"]], label=lab)
    axes[0].set(xlabel="epoch", ylabel="training loss", title="Learning curves")
    axes[1].set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy (mean mode)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "curves.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    xs = range(len(rows))
    axes[0].bar(xs, [100 * r["accuracy"] for r in rows])
    axes[1].bar(xs, [r["ece"] for r in rows], color="tab:orange")
    for ax, title in zip(axes, ("Accuracy (%)", "ECE (15 bins)")):
        ax.set_xticks(list(xs), labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(title)
    fig.tight_layout()
    paths.append(out_dir / "accuracy_ece.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    n = len(rows)
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 5.5), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]})
    for i, (r, lab) in enumerate(zip(rows, labels)):
        conf, acc, count = reliability_curve(r["_probs"], r["_targets"])
        centres = ((torch.arange(15) + 0.5) / 15).tolist()
        axes[0, i].bar(centres, acc.tolist(), width=1 / 15, edgecolor="k", alpha=0.7,
                       label="accuracy")
        axes[0, i].plot([0, 1], [0, 1], "k--", lw=1)
        axes[0, i].set(title=f"{lab}\nECE {r['ece']:.3f}", xlim=(0, 1), ylim=(0, 1),
                       xlabel="confidence", ylabel="accuracy")
        axes[1, i].bar(centres, (count / count.sum()).tolist(), width=1 / 15,
                       color="tab:gray")
        axes[1, i].set(xlim=(0, 1), xlabel="confidence", ylabel="fraction")
    fig.tight_layout()
    paths.append(out_dir / "reliability.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
