"""``sbnn-bench``: compare SBNN training with surrogate-gradient baselines.

With no arguments it runs the embedded default: the ``digits`` task (scikit-learn's
bundled 8x8 digits, rate-coded, no download) with the snnTorch atan baseline, SBNN(ST)
and SBNN(AGR), one seed, and writes ``results.csv``, ``results.json`` and PNG plots to
``--out-dir`` (default ``runs/bench``). Other tasks: ``randman`` (generated), ``shd``,
``cifar10`` and ``dvs-gesture`` (read from ``--data-dir``); ``--list`` shows them all.
Launched by ``torchrun --nproc_per_node=N`` it trains with DistributedDataParallel.
``sbnn-bench diagnostics`` runs the exact-enumeration gradient diagnostics instead.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

from .harness import METHODS, PRESET_METHODS, PRESETS, TASKS, init_distributed, run_grid

DEFAULT_METHODS = ["snntorch-atan", "sbnn-st", "sbnn-agr"]
COLUMNS = ["task", "method", "seed", "eval", "accuracy", "accuracy_mean_mode", "nll", "ece",
           "brier", "train_time_s", "epochs", "num_steps"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sbnn-bench", description=__doc__.split("\n")[0],
                                epilog="Scale out: torchrun --nproc_per_node=N -m "
                                "sbnn_addons.bench ... (DistributedDataParallel). Gradient "
                                "diagnostics: sbnn-bench diagnostics --help.")
    p.add_argument("--list", action="store_true", help="print the tasks and methods, exit")
    p.add_argument("--task", nargs="+", default=["digits"], choices=sorted(TASKS))
    p.add_argument("--methods", nargs="+", default=None, choices=sorted(METHODS),
                   help=f"default: {' '.join(DEFAULT_METHODS)} (or the preset's)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="paper: reference recipe (SPEC section 8); cpu: dvs-gesture sized "
                   "for 2 CPU cores. Presets only set defaults; explicit flags win")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", type=int, default=None, help="default: per task")
    p.add_argument("--batch-size", type=int, default=None, help="per process")
    p.add_argument("--num-steps", type=int, default=None,
                   help="time steps T / frames / SHD bins (default per task)")
    p.add_argument("--width", type=int, default=None, help="hidden width / conv channels")
    p.add_argument("--lr", type=float, default=None, help="weights' learning rate (5e-3)")
    p.add_argument("--noise-lr", type=float, default=None, help="stds' learning rate (5e-2)")
    p.add_argument("--aux-weight", type=float, default=None,
                   help="lambda of the aux-loss methods (default 1e-4; paper preset: per task)")
    p.add_argument("--mc-samples", type=int, default=None, help="K for mc(K) evaluation (10)")
    p.add_argument("--data-dir", nargs="+", default=None, metavar="[TASK=]DIR",
                   help="dataset folder (dvs-gesture, shd, cifar10), never downloaded; "
                   "with several data tasks give TASK=DIR per task")
    p.add_argument("--max-samples", type=int, default=None,
                   help="shd / cifar10 / dvs-gesture: only the first N samples of each split")
    p.add_argument("--no-reference", action="store_true",
                   help="--preset paper: keep the small benchmark networks instead of the "
                   "reference networks of sbnn_addons.models")
    p.add_argument("--frame-stride", type=int, default=None,
                   help="dvs-gesture: keep every n-th of the 49 frames (default 3)")
    p.add_argument("--feedforward", action="store_true",
                   help="shd: snn.Leaky hidden layer instead of recurrent snn.RLeaky")
    g = p.add_argument_group("randman task")
    g.add_argument("--randman-classes", type=int, default=None, help="default 10")
    g.add_argument("--randman-units", type=int, default=None, help="input channels (100)")
    g.add_argument("--randman-samples", type=int, default=None, help="per class (250)")
    g.add_argument("--randman-dim", type=int, default=None, help="manifold dimension (1)")
    g.add_argument("--randman-alpha", type=float, default=None, help="smoothness (2.0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                   help="cpu (default), cuda, or auto (cuda when available)")
    p.add_argument("--find-unused-parameters", action="store_true",
                   help="DistributedDataParallel(find_unused_parameters=True)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out-dir", default="runs/bench")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _data_dirs(values: list[str] | None, tasks: list[str]) -> str | dict | None:
    """``DIR`` (every task) or ``TASK=DIR`` entries (a dict task -> DIR)."""
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        return values[0]
    out = {}
    for v in values:
        task, sep, path = v.partition("=")
        if not sep or task not in TASKS:
            raise SystemExit(f"sbnn-bench: --data-dir {v!r}: with several entries each must "
                             f"be TASK=DIR with TASK one of {sorted(TASKS)}")
        out[task] = path
    return out


def list_choices() -> str:
    """The tasks, methods and presets as text (``--list``)."""
    lines = ["tasks:"]
    for name, t in TASKS.items():
        extra = f" [presets: {', '.join(sorted(t.presets))}]" if t.presets else ""
        lines.append(f"  {name:<22} {t.help}{extra}")
    lines.append("methods:")
    for name, m in METHODS.items():
        lines.append(f"  {name:<22} {m.help}")
    lines.append("presets:")
    for name, methods in PRESET_METHODS.items():
        lines.append(f"  {name:<22} default methods: {' '.join(methods)}")
    return "\n".join(lines)


def _progress(quiet: bool):
    if quiet:
        return None
    from tqdm.auto import tqdm

    return lambda total: tqdm(total=total, desc="epochs", unit="epoch", file=sys.stderr)


def write_results(rows: list[dict], out_dir: Path, extra_meta: dict | None = None) -> None:
    """``results.csv`` (one row per run) and ``results.json`` (with learning curves)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    meta = {"torch": torch.__version__, "machine": platform.machine(),
            "processor": platform.processor(), "threads": torch.get_num_threads(),
            **(extra_meta or {})}
    with open(out_dir / "results.json", "w") as fh:
        json.dump({"meta": meta, "runs": public}, fh, indent=2)


def summarise(rows: list[dict]) -> str:
    """Markdown table: mean (and std over seeds) per task and method."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["method"]), []).append(r)
    lines = ["| task | method | seeds | passes | eval | accuracy | NLL | ECE | train s |",
             "|---|---|---|---|---|---|---|---|---|"]

    def fmt(vals, scale=1.0, digits=2):
        m = statistics.mean(vals) * scale
        if len(vals) > 1:
            return f"{m:.{digits}f} ± {statistics.stdev(vals) * scale:.{digits}f}"
        return f"{m:.{digits}f}"

    for (task, method), rs in groups.items():
        lines.append(
            f"| {task} | {method} | {len(rs)} | {rs[0]['epochs']} | {rs[0]['eval']} | "
            f"{fmt([r['accuracy'] for r in rs], 100, 1)} % | {fmt([r['nll'] for r in rs], 1, 3)} "
            f"| {fmt([r['ece'] for r in rs], 1, 3)} "
            f"| {fmt([r['train_time_s'] for r in rs], 1, 1)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Console entry point of ``sbnn-bench``.

    ``sbnn-bench diagnostics [...]`` runs the exact gradient diagnostics
    (:func:`sbnn_addons.diagnostics.main`: bias / variance figures of the estimators by
    enumeration); anything else is the training benchmark (:func:`run`).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["diagnostics"]:
        from ..diagnostics import main as diagnostics_main

        raise SystemExit(diagnostics_main(argv[1:], prog="sbnn-bench diagnostics"))
    run(argv)


def run(argv: list[str] | None = None) -> list[dict]:
    """Parse ``argv``, run the grid, write the outputs and print the summary; return rows.

    Under ``torchrun`` every process trains its shard; only rank 0 writes and prints.
    """
    args = build_parser().parse_args(argv)
    if args.list:
        print(list_choices())
        return []
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = args.methods or PRESET_METHODS.get(args.preset, DEFAULT_METHODS)
    data_dir = _data_dirs(args.data_dir, args.task)
    rank, world, device = init_distributed(args.device)
    cfg = {"epochs": args.epochs, "batch_size": args.batch_size, "num_steps": args.num_steps,
           "width": args.width, "lr": args.lr, "noise_lr": args.noise_lr,
           "aux_weight": args.aux_weight, "mc_samples": args.mc_samples,
           "data_dir": data_dir, "max_samples": args.max_samples,
           "frame_stride": args.frame_stride, "recurrent": False if args.feedforward else None,
           "randman_classes": args.randman_classes, "randman_units": args.randman_units,
           "randman_samples": args.randman_samples, "randman_dim": args.randman_dim,
           "randman_alpha": args.randman_alpha, "device": str(device),
           "find_unused_parameters": args.find_unused_parameters or None,
           "use_reference": False if args.no_reference else None}
    try:
        rows = run_grid(args.task, methods, args.seeds, cfg,
                        _progress(args.quiet or rank != 0), preset=args.preset)
        if rank == 0:
            out_dir = Path(args.out_dir)
            write_results(rows, out_dir, extra_meta={"world_size": world,
                                                     "device": str(device),
                                                     "preset": args.preset})
            if not args.no_plots:
                from .plots import save_plots

                save_plots(rows, out_dir)
            print(summarise(rows))
            print(f"\nwrote {out_dir / 'results.csv'}, {out_dir / 'results.json'}"
                  + ("" if args.no_plots else " and PNG plots"))
    finally:
        if world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()
    return rows

if __name__ == "__main__":
    main()
