"""``sbnn-bench``: compare SBNN training with surrogate-gradient baselines.

With no arguments it runs the embedded default: the ``digits`` task (scikit-learn's
bundled 8x8 digits, rate-coded, no download) with the snnTorch atan baseline, SBNN(ST)
and SBNN(AGR), one seed, and writes ``results.csv``, ``results.json`` and PNG plots to
``--out-dir`` (default ``runs/bench``).
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

from .harness import METHODS, TASKS, run_grid

DEFAULT_METHODS = ["snntorch-atan", "sbnn-st", "sbnn-agr"]
COLUMNS = ["task", "method", "seed", "eval", "accuracy", "accuracy_mean_mode", "nll", "ece",
           "brier", "train_time_s", "epochs", "num_steps"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sbnn-bench", description=__doc__.split("\n")[0])
    p.add_argument("--task", nargs="+", default=["digits"], choices=sorted(TASKS))
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=sorted(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", type=int, default=None, help="default: per task")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--num-steps", type=int, default=None, help="time steps T (default per task)")
    p.add_argument("--width", type=int, default=None, help="hidden width / conv channels")
    p.add_argument("--lr", type=float, default=5e-3, help="learning rate of the weights")
    p.add_argument("--noise-lr", type=float, default=5e-2, help="learning rate of the stds")
    p.add_argument("--mc-samples", type=int, default=10, help="K for mc(K) evaluation")
    p.add_argument("--data-dir", default=None, help="dataset folder (dvs-gesture)")
    p.add_argument("--frame-stride", type=int, default=3, help="dvs-gesture: keep every n-th")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out-dir", default="runs/bench")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _progress(quiet: bool):
    if quiet:
        return None
    from tqdm.auto import tqdm

    return lambda total: tqdm(total=total, desc="epochs", unit="epoch", file=sys.stderr)


def write_results(rows: list[dict], out_dir: Path) -> None:
    """``results.csv`` (one row per run) and ``results.json`` (with learning curves)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    meta = {"torch": torch.__version__, "machine": platform.machine(),
            "processor": platform.processor(), "threads": torch.get_num_threads()}
    with open(out_dir / "results.json", "w") as fh:
        json.dump({"meta": meta, "runs": public}, fh, indent=2)


def summarise(rows: list[dict]) -> str:
    """Markdown table: mean (and std over seeds) per task and method."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["method"]), []).append(r)
    lines = ["| task | method | seeds | eval | accuracy | NLL | ECE | train s |",
             "|---|---|---|---|---|---|---|---|"]

    def fmt(vals, scale=1.0, digits=2):
        m = statistics.mean(vals) * scale
        if len(vals) > 1:
            return f"{m:.{digits}f} ± {statistics.stdev(vals) * scale:.{digits}f}"
        return f"{m:.{digits}f}"

    for (task, method), rs in groups.items():
        lines.append(
            f"| {task} | {method} | {len(rs)} | {rs[0]['eval']} | "
            f"{fmt([r['accuracy'] for r in rs], 100, 1)} % | {fmt([r['nll'] for r in rs], 1, 3)} "
            f"| {fmt([r['ece'] for r in rs], 1, 3)} "
            f"| {fmt([r['train_time_s'] for r in rs], 1, 1)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Console entry point of ``sbnn-bench``."""
    run(argv)


def run(argv: list[str] | None = None) -> list[dict]:
    """Parse ``argv``, run the grid, write the outputs and print the summary; return rows."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = {"epochs": args.epochs, "batch_size": args.batch_size, "num_steps": args.num_steps,
           "width": args.width, "lr": args.lr, "noise_lr": args.noise_lr,
           "mc_samples": args.mc_samples, "data_dir": args.data_dir,
           "frame_stride": args.frame_stride}
    rows = run_grid(args.task, args.methods, args.seeds, cfg, _progress(args.quiet))
    out_dir = Path(args.out_dir)
    write_results(rows, out_dir)
    if not args.no_plots:
        from .plots import save_plots

        save_plots(rows, out_dir)
    print(summarise(rows))
    print(f"\nwrote {out_dir / 'results.csv'}, {out_dir / 'results.json'}"
          + ("" if args.no_plots else " and PNG plots"))
    return rows


if __name__ == "__main__":
    main()
