"""PNG plots of a benchmark run: learning curves, accuracy / ECE bars, reliability diagrams.

One set per task (``curves.png``, ``accuracy_ece.png``, ``reliability.png``; with several
tasks the task name is appended: ``curves-shd.png``). Every figure names the task, the
epochs and the evaluation mode.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["reliability_curve", "save_plots"]


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("plots need matplotlib: pip install 'sbnn_addons[plot]'") from err
    return plt


def reliability_curve(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15):
    """Per-bin ``(mean confidence, accuracy, count)``, each ``[n_bins]``, over ``n_bins``
    equal-width confidence bins, binned as the ECE in the figure's title
    (:func:`sbnn_addons.uncertainty.plot_reliability`'s bins: ``[lo, hi)``, a confidence of
    1 in the last bin)."""
    from ..uncertainty import _reliability_bins

    _edges, count, acc, mean_conf = _reliability_bins(probs, targets, n_bins)
    return mean_conf, acc, count


def _mean_std(vals: list[float]) -> tuple[float, float]:
    t = torch.tensor(vals, dtype=torch.float64)
    return float(t.mean()), (float(t.std()) if len(vals) > 1 else 0.0)


def save_plots(results, out_dir: Path) -> list[Path]:
    """Write the figures of ``results`` (a :class:`BenchResults` or its rows); return paths."""
    all_rows = list(results.rows if hasattr(results, "rows") else results)
    plt = _plt()
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = list(dict.fromkeys(r["task"] for r in all_rows))
    paths = []
    for task in tasks:
        rows = [r for r in all_rows if r["task"] == task]
        suffix = "" if len(tasks) == 1 else f"-{task}"
        methods = list(dict.fromkeys(r["method"] for r in rows))
        by_m = {m: [r for r in rows if r["method"] == m] for m in methods}
        epochs = rows[0]["epochs"]
        seeds = len(by_m[methods[0]])
        k = next((r["mc_samples"] for r in rows if r.get("mc_samples")), None)
        colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
        seed_txt = f"{seeds} seed{'s' if seeds > 1 else ''}"

        # learning curves: one line per method (mean over seeds, band = min..max)
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for m in methods:
            curves = [r["curve"] for r in by_m[m]]
            n = min(len(c) for c in curves)
            ep = [c["epoch"] for c in curves[0][:n]]
            for ax, key, scale in ((axes[0], "train_loss", 1.0),
                                   (axes[1], "test_accuracy", 100.0)):
                vals = torch.tensor([[c[key] * scale for c in cur[:n]] for cur in curves])
                ax.plot(ep, vals.mean(0).tolist(), marker="o", color=colors[m], label=m)
                if len(curves) > 1:
                    ax.fill_between(ep, vals.min(0).values.tolist(), vals.max(0).values.tolist(),
                                    color=colors[m], alpha=0.15)
        axes[0].set(xlabel="epoch", ylabel="training loss (task loss)",
                    title=f"{task}: training loss ({seed_txt})")
        axes[1].set(xlabel="epoch", ylabel="test accuracy (%)",
                    title=f"{task}: test accuracy, mean mode ({seed_txt})")
        for ax in axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlim(0.5, max(epochs, 1) + 0.5)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out_dir / f"curves{suffix}.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

        # accuracy / ECE bars: mean mode for every method, mc(K) next to it for SBNN
        fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(methods) + 4), 4.2))
        xs = torch.arange(len(methods)).tolist()
        w = 0.38
        for ax, col, scale, label in ((axes[0], "accuracy", 100.0, "accuracy (%)"),
                                      (axes[1], "ece", 1.0, "ECE (15 bins)")):
            mc_labelled = False
            for i, m in enumerate(methods):
                mean, sd = _mean_std([r[f"{col}_mean"] * scale for r in by_m[m]])
                ax.bar(i - w / 2, mean, w, yerr=sd if seeds > 1 else None, color=colors[m],
                       edgecolor="k", label="mean mode" if i == 0 else None, capsize=3)
                ax.annotate(f"{mean:.1f}" if scale > 1 else f"{mean:.3f}", (i - w / 2, mean),
                            ha="center", va="bottom", fontsize=7)
                if by_m[m][0].get(f"{col}_mc") is not None:
                    mean, sd = _mean_std([r[f"{col}_mc"] * scale for r in by_m[m]])
                    ax.bar(i + w / 2, mean, w, yerr=sd if seeds > 1 else None,
                           color=colors[m], hatch="//", edgecolor="k", alpha=0.6, capsize=3,
                           label=None if mc_labelled else f"mc({k})")
                    mc_labelled = True
                    ax.annotate(f"{mean:.1f}" if scale > 1 else f"{mean:.3f}",
                                (i + w / 2, mean), ha="center", va="bottom", fontsize=7)
            ax.set_xticks(xs, methods, rotation=30, ha="right", fontsize=8)
            ax.set_ylabel(label)
            handles = [Patch(facecolor="lightgray", edgecolor="k", label="mean mode")]
            if mc_labelled:
                handles.append(Patch(facecolor="lightgray", edgecolor="k", hatch="//",
                                     label=f"mc({k})"))
            ax.legend(handles=handles, fontsize=8)
        axes[0].set_title(f"{task}: accuracy after {epochs} epoch{'s' if epochs > 1 else ''}\n"
                          f"mean mode (all), mc({k}) hatched (SBNN); {seed_txt}", fontsize=10)
        axes[1].set_title(f"{task}: ECE after {epochs} epoch{'s' if epochs > 1 else ''}\n"
                          f"mean mode (all), mc({k}) hatched (SBNN); {seed_txt}", fontsize=10)
        fig.tight_layout()
        paths.append(out_dir / f"accuracy_ece{suffix}.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

        # reliability: one panel per method, pooled over seeds; bars mean mode, line mc(K)
        n = len(methods)
        fig, axes = plt.subplots(2, n, figsize=(3.3 * n, 5.8), squeeze=False,
                                 gridspec_kw={"height_ratios": [3, 1]})
        centres = ((torch.arange(15) + 0.5) / 15).tolist()
        for i, m in enumerate(methods):
            tg = torch.cat([r["_targets"] for r in by_m[m]])
            pm = torch.cat([r["_probs"]["mean"] for r in by_m[m]])
            conf, acc, count = reliability_curve(pm, tg)
            axes[0, i].bar(centres, acc.tolist(), width=1 / 15, edgecolor="k", alpha=0.7,
                           color=colors[m], label="mean mode")
            ece = _mean_std([r["ece_mean"] for r in by_m[m]])[0]
            title = f"{m}\nECE mean {ece:.3f}"
            if "mc" in by_m[m][0]["_probs"]:
                pmc = torch.cat([r["_probs"]["mc"] for r in by_m[m]])
                _, acc_mc, count_mc = reliability_curve(pmc, tg)
                keep = count_mc > 0
                axes[0, i].plot(torch.tensor(centres)[keep].tolist(), acc_mc[keep].tolist(),
                                "s-", color="k", ms=3, lw=1, label=f"mc({k})")
                title += f", mc {_mean_std([r['ece_mc'] for r in by_m[m]])[0]:.3f}"
            axes[0, i].plot([0, 1], [0, 1], "k--", lw=1)
            axes[0, i].set(title=title, xlim=(0, 1), ylim=(0, 1), xlabel="confidence",
                           ylabel="accuracy")
            axes[0, i].legend(fontsize=7, loc="upper left")
            axes[1, i].bar(centres, (count / count.sum()).tolist(), width=1 / 15,
                           color="tab:gray")
            axes[1, i].set(xlim=(0, 1), xlabel="confidence (mean mode)", ylabel="fraction")
        fig.suptitle(f"{task}: reliability after {epochs} epoch{'s' if epochs > 1 else ''}, "
                     f"test set pooled over {seed_txt}", fontsize=10)
        fig.tight_layout()
        paths.append(out_dir / f"reliability{suffix}.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
