"""DVS Gesture uncertainty: calibration vs. samples and held-out-class OOD detection.

Trains the bench's ``cpu`` recipe for ``dvs-gesture`` (ConvNet width 16, 16 frames at
frame stride 3, inputs x 0.25, batch 16, Adam lr 5e-3 / noise lr 5e-2, cosine decay) for
the surrogate baseline ``snntorch-atan`` and the SBNN ``sbnn-agr``, with the ``--holdout``
gesture classes removed from training. The classifier keeps the bench's 11 outputs (the
held-out labels are simply never targets). On the real test set it reports:

* accuracy, NLL and ECE on the in-distribution test classes: SBNN in ``sample``,
  ``mean`` and ``mc(K)`` modes for every ``K`` in ``--mc`` (one ``mc_predict`` call with
  ``K = max(--mc)``, swept by ``metrics_vs_samples``); the baseline is deterministic
  (one row);
* OOD detection of the held-out classes (AUROC, FPR@95%TPR) scored by predictive entropy
  and, for the SBNN, by mutual information (for every ``K`` in ``--mc``), plus the
  one-pass "time as samples" scores (per-step readout of the time loop) for both methods.

Training and the network come from :mod:`sbnn_addons.bench.harness` (``run_task``, i.e.
:func:`sbnn_addons.bench.compare`, on a task registered here that loads only the
in-distribution classes: all methods of a seed start from the same weights and see the
same batches); Monte Carlo predictions from :func:`sbnn_addons.mc_predict`; the
uncertainty scores from :mod:`sbnn_addons.uncertainty`; metrics from
:mod:`sbnn_addons.metrics`.

Usage (from the repository root)::

    .venv/bin/python benchmarks/dvs_uncertainty.py --data-dir /work/shared/data/dvs_gesture_32
    .venv/bin/python benchmarks/dvs_uncertainty.py --data-dir /work/shared/data/dvs_gesture_32 \\
        --epochs 30 --seeds 0 1 2 --holdout 9 10 --mc 1 2 4 8 16 \\
        --out runs/dvs_uncertainty.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from sbnn_addons import mc_predict
from sbnn_addons.bench import harness
from sbnn_addons.data.dvs_gesture import load_dvs_gesture_32
from sbnn_addons.metrics import classification_metrics, ood_metrics
from sbnn_addons.uncertainty import from_sample_probs, metrics_vs_samples, time_as_samples

NUM_CLASSES = 11
BASELINE, SBNN = "snntorch-atan", "sbnn-agr"
TASK = "dvs-gesture-holdout"


def _load(data_dir, split, classes, cfg):
    x, y = load_dvs_gesture_32(data_dir, split, frame_stride=cfg["frame_stride"],
                               num_frames=cfg["num_steps"], classes=tuple(classes))
    return x * cfg.get("input_scale", 0.25), y


def register_task(in_classes: list[int]) -> None:
    """Register the bench's ``dvs-gesture`` task restricted to ``in_classes``.

    The network keeps its 11 outputs; ``num_classes=None`` so that the bench checks the
    subsets and the training set against the classes present, not against all 11.
    """

    def load(cfg):
        root = cfg["data_dir"]
        xtr, ytr = _load(root, "train", in_classes, cfg)
        xte, yte = _load(root, "test", in_classes, cfg)
        return xtr, ytr, xte, yte

    harness.TASKS[TASK] = dataclasses.replace(harness.TASKS["dvs-gesture"], name=TASK,
                                              load=load, num_classes=None)


def train(methods: list[str], seed: int, cfg: dict) -> list[tuple[dict, torch.nn.Module]]:
    """``harness.run_task`` on the hold-out task (the methods interleaved epoch by epoch);
    returns ``(row, trained model)`` per method, in the order of ``methods``."""
    res = harness.run_task(TASK, list(methods), [seed], dict(cfg), keep_models=True)
    return [(row, row.pop("_model")) for row in res.rows]


def _batched(model, x_enc, batch, **kwargs):
    """``mc_predict`` over ``[T, N, ...]`` in batches; returns sample probs ``[K, N, C]``."""
    parts = []
    for i in range(0, x_enc.shape[1], batch):
        xb = x_enc[:, i:i + batch].float()
        parts.append(mc_predict(model, xb, count_spikes=False, **kwargs).sample_probs)
    return torch.cat(parts, 1)


def _time_samples(model, x_enc, batch, eval_mode):
    """Per-step readout logits of one pass (hook on ``fc``) -> ``time_as_samples``."""
    steps: list[torch.Tensor] = []
    handle = model.fc.register_forward_hook(lambda m, i, o: steps.append(o.detach()))
    parts = []
    try:
        for i in range(0, x_enc.shape[1], batch):
            steps.clear()
            mc_predict(model, x_enc[:, i:i + batch].float(), num_samples=1,
                       eval_mode=eval_mode, count_spikes=False)
            parts.append(torch.stack(steps))
    finally:
        handle.remove()
    return time_as_samples(torch.cat(parts, 1))


def evaluate(method: str, model, x_in, y_in, x_out, mcs: list[int], seed: int,
             batch: int = 64) -> tuple[list[dict], list[dict]]:
    """Calibration rows (in-distribution) and OOD rows for one trained model."""
    model.eval()
    is_sbnn = harness.METHODS[method].is_sbnn
    cal, ood = [], []

    def ood_row(eval_name, score, s_in, s_out):
        ood.append({"method": method, "eval": eval_name, "score": score,
                    **ood_metrics(s_in, s_out)})

    if not is_sbnn:
        p_in = _batched(model, x_in, batch, num_samples=1)
        p_out = _batched(model, x_out, batch, num_samples=1)
        cal.append({"method": method, "eval": "deterministic",
                    **classification_metrics(p_in[0], y_in)})
        ood_row("deterministic", "entropy", from_sample_probs(p_in).entropy,
                from_sample_probs(p_out).entropy)
        tas_mode = "mean"
    else:
        for ev in ("sample", "mean"):
            p_in = _batched(model, x_in, batch, num_samples=1, eval_mode=ev, seed=seed)
            p_out = _batched(model, x_out, batch, num_samples=1, eval_mode=ev, seed=seed + 1)
            cal.append({"method": method, "eval": ev, **classification_metrics(p_in[0], y_in)})
            ood_row(ev, "entropy", from_sample_probs(p_in).entropy,
                    from_sample_probs(p_out).entropy)
        big_k = max(mcs)
        s_in = _batched(model, x_in, batch, num_samples=big_k, eval_mode="mc", seed=seed + 2)
        s_out = _batched(model, x_out, batch, num_samples=big_k, eval_mode="mc", seed=seed + 3)
        sweep = metrics_vs_samples(s_in, y_in, ks=mcs)
        for j, k in enumerate(sweep["k"]):
            cal.append({"method": method, "eval": f"mc({k})", "accuracy": sweep["accuracy"][j],
                        "nll": sweep["nll"][j], "ece": sweep["ece"][j]})
            pin, pout = from_sample_probs(s_in[:k]), from_sample_probs(s_out[:k])
            ood_row(f"mc({k})", "entropy", pin.entropy, pout.entropy)
            if k > 1:
                ood_row(f"mc({k})", "mutual_information", pin.mutual_information,
                        pout.mutual_information)
        tas_mode = "sample"
    t_in = _time_samples(model, x_in, batch, tas_mode)
    t_out = _time_samples(model, x_out, batch, tas_mode)
    ev = f"time-as-samples ({tas_mode if is_sbnn else 'deterministic'}, 1 pass)"
    ood_row(ev, "entropy", t_in.entropy, t_out.entropy)
    ood_row(ev, "mutual_information", t_in.mutual_information, t_out.mutual_information)
    return cal, ood


def _aggregate(rows: list[dict], keys: tuple[str, ...], values: tuple[str, ...]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, rs in groups.items():
        agg = dict(zip(keys, key))
        for v in values:
            xs = [r[v] for r in rs]
            agg[v] = statistics.fmean(xs)
            agg[v + "_std"] = statistics.stdev(xs) if len(xs) > 1 else 0.0
        agg["n_seeds"] = len(rs)
        out.append(agg)
    return out


def _table(rows: list[dict], keys: tuple[str, ...], values: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(keys + values) + " |",
             "|" + "---|" * (len(keys) + len(values))]
    for r in rows:
        cells = [str(r[k]) for k in keys]
        for v in values:
            cells.append(f"{r[v]:.4f}" + (f" ± {r[v + '_std']:.4f}" if r["n_seeds"] > 1 else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True, help="folder in the dvs_gesture_32 layout")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--holdout", type=int, nargs="+", default=[9, 10],
                    help="gesture classes removed from training and scored as OOD")
    ap.add_argument("--mc", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--methods", nargs="+", default=[BASELINE, SBNN])
    ap.add_argument("--out", default="runs/dvs_uncertainty.json")
    args = ap.parse_args(argv)

    holdout = sorted(set(args.holdout))
    if not holdout or not all(0 <= c < NUM_CLASSES for c in holdout):
        ap.error(f"--holdout classes must be in [0, {NUM_CLASSES})")
    in_classes = [c for c in range(NUM_CLASSES) if c not in holdout]
    mcs = sorted(set(args.mc))
    register_task(in_classes)
    cfg = harness.apply_preset("dvs-gesture", "cpu",
                               {"data_dir": args.data_dir, "epochs": args.epochs})
    x_in, y_in = _load(args.data_dir, "test", in_classes, cfg)
    x_out, _ = _load(args.data_dir, "test", holdout, cfg)
    enc = harness.TASKS[TASK].encode
    x_in_enc = enc(x_in, cfg["num_steps"], None)
    x_out_enc = enc(x_out, cfg["num_steps"], None)
    print(f"# in-distribution classes {in_classes} ({len(y_in)} test), OOD {holdout} "
          f"({len(x_out)} test); {NUM_CLASSES} outputs; cfg {cfg}", flush=True)

    cal_rows, ood_rows, runs = [], [], []
    t_start = time.perf_counter()
    for seed in args.seeds:
        t0 = time.perf_counter()
        trained = train(args.methods, seed, cfg)
        print(f"# seed {seed}: trained {', '.join(args.methods)} in "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
        for row, model in trained:
            method = row["method"]
            t1 = time.perf_counter()
            cal, ood = evaluate(method, model, x_in_enc, y_in, x_out_enc, mcs, seed)
            for r in cal + ood:
                r["seed"] = seed
            cal_rows += cal
            ood_rows += ood
            runs.append({"method": method, "seed": seed, "train_s": row["train_s"],
                         "train_s_per_epoch": row["train_s_per_epoch"],
                         "train_s_per_epoch_std": row["train_s_per_epoch_std"],
                         "eval_time_s": time.perf_counter() - t1,
                         "bench_accuracy_mean": row["accuracy_mean"],
                         "bench_accuracy_mc": row["accuracy_mc"],
                         "bench_mc_samples": row["mc_samples"], "curve": row["curve"]})
            print(f"# {method} seed {seed}: train {row['train_s']:.0f}s "
                  f"({row['train_s_per_epoch']:.1f}s per epoch), final-epoch test acc "
                  f"(mean mode) {row['curve'][-1]['test_accuracy']:.3f}, eval "
                  f"{time.perf_counter() - t1:.0f}s", flush=True)

    cal_agg = _aggregate(cal_rows, ("method", "eval"), ("accuracy", "nll", "ece"))
    ood_agg = _aggregate(ood_rows, ("method", "eval", "score"), ("auroc", "fpr95"))
    print(f"\n## In-distribution test classes (seeds {args.seeds}, {args.epochs} epochs)\n")
    print(_table(cal_agg, ("method", "eval"), ("accuracy", "nll", "ece")))
    print(f"\n## OOD detection: held-out classes {holdout} vs in-distribution test\n")
    print(_table(ood_agg, ("method", "eval", "score"), ("auroc", "fpr95")))
    print(f"\n# total wall time {time.perf_counter() - t_start:.0f}s")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "config": {**{k: v for k, v in cfg.items() if k != "data_dir"},
                   "data_dir": str(args.data_dir), "holdout": holdout,
                   "in_classes": in_classes, "num_outputs": NUM_CLASSES, "mc": mcs,
                   "seeds": args.seeds, "methods": args.methods},
        "calibration": cal_agg, "ood": ood_agg,
        "per_seed": {"calibration": cal_rows, "ood": ood_rows}, "runs": runs,
    }, indent=2))
    print(f"# wrote {out}")


if __name__ == "__main__":
    main()
