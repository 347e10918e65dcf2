"""Deep residual SNN without normalisation: SBNN vs surrogate twins on real DVS Gesture.

The paper's central claim, put to the test on a CPU: the full-depth DVS ResNet-19
(:func:`sbnn_addons.models.dvs_resnet19`, 19 convs, spike-sum residuals) trained

* ``sbnn``: the SBNN in paper mode (released configuration: per-layer std, bias noise at
  the draw, per-step affines, no normalisation, ST estimator, aux weight 1e-10);
* ``twin``: the same network, deterministic, Gaussian surrogate ``phi(x/0.4)/0.4``, the
  same per-step affines and no normalisation;
* ``twin-bn``: the twin with one BatchNorm per time step instead of the affines;

all with the released recipe (:func:`~sbnn_addons.models.paper_recipe`: Adam, 5e-3 /
5e-2, per-epoch cosine to lr/50), batch 16, on the real frames of ``--data-dir``
(``dvs_gesture_32``: 935 train / 288 test recordings). Every epoch logs the training loss
and the test accuracy in ``mean`` mode (and ``sample`` mode for the SBNN); at the end
the test set is scored in ``mean``, ``sample`` and ``mc(K)`` modes (accuracy, NLL, ECE)
and, with ``--holdout``, the held-out gestures are scored for OOD detection (AUROC of the
predictive entropy, and of the mutual information for the SBNN). ``--kl`` adds the
variational term ``KL / N`` of the objective (``N`` = training-set size).

Each run is checked to learn: the script records whether the last epoch's training loss
is below the first's (``loss_fell``); a step time of a network that does not learn is not
reported without that flag.

One JSON line per (method, seed) is appended to ``--out`` as soon as the run ends, so a
long sweep keeps what it finished; ``--table`` renders the mean +- std over seeds.

CPU protocol (width 16, 16 frames)::

    .venv/bin/python benchmarks/dvs_deep_protocol.py --data-dir ../shared/data/dvs_gesture_32 \\
        --methods sbnn twin twin-bn --seeds 0 1 2 --epochs 8 --out runs/deep_cpu.jsonl
    .venv/bin/python benchmarks/dvs_deep_protocol.py --table runs/deep_cpu.jsonl

GPU, the full paper protocol (49 frames, width 32, 70 epochs)::

    python benchmarks/dvs_deep_protocol.py --data-dir ../shared/data/dvs_gesture_32 \\
        --device cuda --width 32 --frame-stride 1 --frames 49 --epochs 70 \\
        --methods sbnn twin twin-bn --seeds 0 1 2 --out runs/deep_gpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sbnn_addons as sb
from sbnn_addons.base import inverse_softplus
from sbnn_addons.data.dvs_gesture import load_dvs_gesture_32
from sbnn_addons.metrics import classification_metrics, ood_metrics
from sbnn_addons.models import PAPER_CONFIGS, dvs_resnet19, paper_recipe
from sbnn_addons.uncertainty import entropy, from_sample_probs

METHODS = ("sbnn", "twin", "twin-bn")
NUM_CLASSES = 11


def build(method: str, width: int, frames: int, estimator: str,
          std_scale: float = 1.0) -> torch.nn.Module:
    """The network of one method (full depth: 3 blocks per stage, 19 convs).

    ``std_scale`` multiplies the SBNN layers' initial posterior std ``0.5 / sqrt(fan_in)``
    (an ablation of the noise level; 1 is the released initialisation)."""
    kw = {"width_mult": width / 32, "num_steps": frames}
    if method == "sbnn":
        net = dvs_resnet19(estimator=estimator, **kw)
        if std_scale != 1.0:
            with torch.no_grad():
                for m in net.modules():
                    if isinstance(m, sb.BayesConv2d):
                        m.std_rho.fill_(inverse_softplus(float(m.std) * std_scale))
        return net
    if method == "twin":
        return dvs_resnet19(bayes=False, **kw)
    if method == "twin-bn":
        return dvs_resnet19(bayes=False, norm="bn", **kw)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def stratified_subset(labels: torch.Tensor, n: int | None, seed: int) -> torch.Tensor:
    """Indices of a seeded subset with every class in proportion (all if ``n`` is None)."""
    if n is None or n >= len(labels):
        return torch.arange(len(labels))
    gen = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    per_class = max(1, n // len(classes))
    parts = [torch.nonzero(labels == c).flatten() for c in classes]
    idx = torch.cat([p[torch.randperm(len(p), generator=gen)[:per_class]] for p in parts])
    return idx.sort().values


@torch.no_grad()
def probabilities(net, x: torch.Tensor, mode: str, passes: int, batch: int,
                  device: torch.device) -> torch.Tensor:
    """Softmax outputs ``[passes, N, C]`` of ``net`` in ``mode`` (``mean`` or ``sample``)."""
    out = []
    with sb.mode(net, mode):
        for _ in range(passes):
            probs = [F.softmax(net(x[:, i:i + batch].to(device)).float(), -1).cpu()
                     for i in range(0, x.shape[1], batch)]
            out.append(torch.cat(probs))
    return torch.stack(out)


def run(method: str, seed: int, args, data) -> dict:
    xtr, ytr, xte, yte, xood = data
    device = torch.device(args.device)
    torch.manual_seed(seed)
    net = build(method, args.width, args.frames, args.estimator, args.std_scale).to(device)
    epochs = args.epochs
    opt, sched = paper_recipe(net, "dvs_gesture", epochs=epochs)
    bayes = method == "sbnn"
    aux_weight = args.aux_weight if args.aux_weight is not None else (
        PAPER_CONFIGS["dvs_gesture"]["aux_weight"])
    aux_weight = aux_weight if bayes else 0.0
    if bayes and aux_weight > 0:
        sb.enable_aux_loss(net)
    n_train = xtr.shape[1]
    curve = []
    train_time = 0.0
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(n_train, generator=gen)
        t0 = time.perf_counter()
        total, count = 0.0, 0
        for i in range(0, n_train, args.batch):
            idx = perm[i:i + args.batch]
            x, y = xtr[:, idx].to(device), ytr[idx].to(device)
            nll = F.cross_entropy(net(x), y)
            try:
                loss = nll if not bayes else sb.sbnn_objective(
                    nll, net, n_train, kl_weight=args.kl, prior=args.prior_std,
                    aux_weight=aux_weight, aux_reduction="sum")
            except ValueError as err:  # a NaN / inf term, named by sbnn_objective
                raise FloatingPointError(f"{method} seed {seed}, epoch {epoch}: {err}") from err
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{method} seed {seed}: non-finite loss at epoch "
                                         f"{epoch}")
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += nll.item() * len(idx)
            count += len(idx)
        sched.step()
        train_time += time.perf_counter() - t0
        net.eval()
        row = {"epoch": epoch + 1, "train_nll": total / count,
               "test_acc_mean": classification_metrics(
                   probabilities(net, xte, "mean", 1, args.eval_batch, device)[0],
                   yte)["accuracy"]}
        if bayes:
            row["test_acc_sample"] = classification_metrics(
                probabilities(net, xte, "sample", 1, args.eval_batch, device)[0],
                yte)["accuracy"]
        curve.append(row)
        print(f"  {method} seed {seed} epoch {epoch + 1}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in row.items() if k != "epoch"), flush=True)
    net.eval()
    result = {"method": method, "seed": seed, "width": args.width, "frames": args.frames,
              "epochs": epochs, "kl": args.kl if bayes else 0.0,
              "prior_std": args.prior_std if bayes and args.kl else None,
              "estimator": args.estimator if bayes else None,
              "std_scale": args.std_scale if bayes else None,
              "aux_weight": aux_weight if bayes else None, "holdout": list(args.holdout),
              "train_samples": n_train, "curve": curve,
              "train_s_per_epoch": train_time / epochs,
              "loss_fell": curve[-1]["train_nll"] < curve[0]["train_nll"]}
    mean_p = probabilities(net, xte, "mean", 1, args.eval_batch, device)[0]
    result["mean"] = classification_metrics(mean_p, yte)
    samples = None
    if bayes:
        k_max = max(args.mc)
        samples = probabilities(net, xte, "sample", k_max, args.eval_batch, device)
        result["sample"] = classification_metrics(samples[0], yte)
        result["mc"] = {str(k): classification_metrics(samples[:k].mean(0), yte)
                        for k in args.mc}
    if xood is not None:
        if bayes:
            s_in = samples
            s_out = probabilities(net, xood, "sample", k_max, args.eval_batch, device)
            pred_in, pred_out = from_sample_probs(s_in), from_sample_probs(s_out)
            p_in, p_out = pred_in.probs, pred_out.probs
            # accumulated in float64: a float32 difference of the two entropies was
            # off by more than a confident example's MI
            result["ood_mi"] = ood_metrics(pred_in.mutual_information,
                                           pred_out.mutual_information)
        else:
            p_in = mean_p
            p_out = probabilities(net, xood, "mean", 1, args.eval_batch, device)[0]
        result["ood_entropy"] = ood_metrics(entropy(p_in), entropy(p_out))
    return result


def load(args):
    classes = tuple(c for c in range(NUM_CLASSES) if c not in set(args.holdout))

    def split(name, keep):
        x, y = load_dvs_gesture_32(args.data_dir, name, frame_stride=args.frame_stride,
                                   num_frames=args.frames, classes=keep)
        if x.shape[1] != args.frames:
            raise ValueError(f"--frames {args.frames} with --frame-stride "
                             f"{args.frame_stride} leaves {x.shape[1]} frames")
        return x.transpose(0, 1).contiguous(), y  # time-major [T, N, 2, 32, 32]

    xtr, ytr = split("train", classes)
    idx = stratified_subset(ytr, args.max_train, 0)
    xtr, ytr = xtr[:, idx], ytr[idx]
    xte, yte = split("test", classes)
    xood = split("test", tuple(args.holdout))[0] if args.holdout else None
    return xtr, ytr, xte, yte, xood


def _get(row: dict, keys: tuple[str, ...]):
    for k in keys:
        row = row.get(k) if isinstance(row, dict) else None
    return row


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    m = statistics.mean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * m:.1f} ± {100 * s:.1f}" if len(values) > 1 else f"{100 * m:.1f}"


def _label(row: dict) -> str:
    """The method's name, with the ablations that differ from the released SBNN."""
    parts = []
    if row.get("estimator") not in (None, "st"):
        parts.append(row["estimator"])
    if row.get("std_scale") not in (None, 1.0):
        parts.append(f"std x{row['std_scale']:g}")
    aux = row.get("aux_weight")
    if aux is not None and aux != PAPER_CONFIGS["dvs_gesture"]["aux_weight"]:
        parts.append(f"aux {aux:g}")
    return row["method"] + (f" ({', '.join(parts)})" if parts else "")


def _groups(path: Path, sbnn_only: bool = False) -> list[tuple[str, str, list[dict]]]:
    """The JSON lines of ``path`` grouped over seeds: ``(method label, KL label, rows)``,
    sorted; ``sbnn_only``: the rows with ``mc(K)`` results only."""
    groups: dict[tuple, list[dict]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if not sbnn_only or "mc" in r:
                key = (_label(r), r["kl"], r.get("prior_std") or 1.0)
                groups.setdefault(key, []).append(r)
    return [(method, f"{kl:g}{f' (s0 {prior_std:g})' if kl else ''}", rs)
            for (method, kl, prior_std), rs in sorted(groups.items())]


def table(path: Path) -> str:
    """Markdown table (mean ± std over seeds) of the JSON lines in ``path``."""
    lines = ["| method | KL | seeds | epochs | acc mean % | acc sample % | acc mc(max K) % "
             "| NLL (mean / mc) | ECE % (mean / mc) | OOD AUROC % (entropy / MI) "
             "| s/epoch | loss fell |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, kl, rs in _groups(path):
        kmax = max((max(map(int, r["mc"])) for r in rs if "mc" in r), default=None)

        def vals(*keys, rs=rs):
            return [v for v in (_get(r, keys) for r in rs) if v is not None]

        mc = ("mc", str(kmax)) if kmax else None
        nll = f"{statistics.mean(vals('mean', 'nll')):.3f}"
        if mc:
            nll += f" / {statistics.mean(vals(*mc, 'nll')):.3f}"
        ece = _fmt(vals("mean", "ece")) + (f" / {_fmt(vals(*mc, 'ece'))}" if mc else "")
        ood = _fmt(vals("ood_entropy", "auroc"))
        if vals("ood_mi", "auroc"):
            ood += f" / {_fmt(vals('ood_mi', 'auroc'))}"
        lines.append(
            f"| {method} | {kl} | {len(rs)} | {rs[0]['epochs']} | "
            f"{_fmt(vals('mean', 'accuracy'))} | {_fmt(vals('sample', 'accuracy'))} | "
            f"{_fmt(vals(*mc, 'accuracy')) if mc else '-'} | {nll} | {ece} | {ood} | "
            f"{statistics.mean(r['train_s_per_epoch'] for r in rs):.0f} | "
            f"{sum(r['loss_fell'] for r in rs)}/{len(rs)} |")
    return "\n".join(lines)


def mc_table(path: Path) -> str:
    """Markdown table of ``mc(K)`` against ``K`` (mean +- std over seeds) for every SBNN
    row group of ``path``: accuracy, NLL and ECE of the averaged predictive."""
    lines = ["| method | KL | K | acc % | NLL | ECE % |", "|---|---|---|---|---|---|"]
    for method, kl, rs in _groups(path, sbnn_only=True):
        ks = sorted({int(k) for r in rs for k in r["mc"]})
        for k in ks:
            got = [r["mc"][str(k)] for r in rs if str(k) in r["mc"]]
            lines.append(
                f"| {method} | {kl} | {k} | "
                f"{_fmt([g['accuracy'] for g in got])} | "
                f"{statistics.mean(g['nll'] for g in got):.3f} | "
                f"{_fmt([g['ece'] for g in got])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, help="dvs_gesture_32 folder")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--width", type=int, default=16, help="first-stage channels (paper: 32)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--frame-stride", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--eval-batch", type=int, default=48)
    p.add_argument("--estimator", default="st")
    p.add_argument("--std-scale", type=float, default=1.0,
                   help="ablation: scale of the SBNN's initial posterior stds (1: released)")
    p.add_argument("--aux-weight", type=float, default=None,
                   help="ablation: weight lambda of the summed aux loss (default: 1e-10)")
    p.add_argument("--kl", type=float, default=0.0, help="KL weight beta_kl (0: none)")
    p.add_argument("--prior-std", type=float, default=1.0,
                   help="std s0 of the N(0, s0^2) weight prior of the KL term")
    p.add_argument("--mc", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--holdout", nargs="*", type=int, default=[],
                   help="gesture classes left out of training and scored as OOD")
    p.add_argument("--max-train", type=int, default=None,
                   help="stratified training subset (smoke runs)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("runs/dvs_deep_protocol.jsonl"))
    p.add_argument("--table", type=Path, help="print the table of a results file and exit")
    p.add_argument("--mc-table", type=Path,
                   help="print the mc(K)-against-K table of a results file and exit")
    args = p.parse_args(argv)
    for name in ("std_scale", "prior_std"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("kl", "aux_weight"):
        if getattr(args, name) is not None and not getattr(args, name) >= 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.table or args.mc_table:
        print(table(args.table) if args.table else mc_table(args.mc_table))
        return
    if args.data_dir is None:
        p.error("--data-dir is required")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"# {' '.join(sys.argv)}\n# train {data[0].shape[1]}, test {data[2].shape[1]}, "
          f"T={args.frames}, width {args.width}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    for seed in args.seeds:
        for method in args.methods:  # interleaved: every seed runs all methods in turn
            result = run(method, seed, args, data)
            result["command"] = " ".join(sys.argv)
            with args.out.open("a") as f:
                f.write(json.dumps(result) + "\n")
            acc = result["mean"]["accuracy"]
            print(f"{method} seed {seed}: test acc (mean) {acc:.3f}, loss fell "
                  f"{result['loss_fell']}", flush=True)
    print(table(args.out))


if __name__ == "__main__":
    main()
