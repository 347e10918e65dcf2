"""Training-step time and peak memory of the DVS ResNet-19 reference network.

The issue's yardstick is the paper's released DVS network at ``T = 49``, batch 16, on
2 CPU cores: about 17 s per training step and about 17 GB peak memory. This script
measures, at the same size (:func:`sbnn_addons.models.dvs_resnet19` with its defaults:
widths 32/64/128, 19 convs, input ``[49, 16, 2, 32, 32]``):

* the SBNN network (``bayes=True``; ST and AGR estimators, aux loss at the released
  weight 1e-10, Adam with the two learning rates of :func:`~sbnn_addons.models.paper_recipe`);
* its surrogate-gradient twin (``bayes=False``, the reference scripts' Gaussian surrogate
  of width 0.4, no normalisation), with the same optimiser.

Every configuration runs in its own fresh Python process, so that the peak resident set
size (``ru_maxrss``) is that configuration's alone. Processes are interleaved over
``--rounds`` rounds; the step time is the median over all timed steps of all rounds (one
warm-up step per process is not timed). Reported: median step time, peak RSS, and both as
ratios to the surrogate twin and to the paper's 17 s / 17 GB.

Input: the first 16 training samples of ``--data-dir`` (``dvs_gesture_32`` layout) when
given, otherwise Bernoulli(0.05) event counts (the dense convolutions cost the same).

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_reference.py --data-dir ../shared/data/dvs_gesture_32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

PAPER_STEP_S, PAPER_PEAK_GB = 17.0, 17.0
CONFIGS = {
    "surrogate twin (gaussian)": {"bayes": False, "surrogate": "gaussian"},
    "sbnn ST": {"bayes": True, "estimator": "st"},
    "sbnn AGR": {"bayes": True, "estimator": "agr"},
    "sbnn AGR, checkpointed blocks": {"bayes": True, "estimator": "agr", "checkpoint": True},
}


def worker(name: str, steps: int, num_steps: int, batch: int, threads: int,
           data_dir: str | None) -> dict:
    """Build one configuration, run ``1 + steps`` training steps, return timings and RSS."""
    import torch
    import torch.nn.functional as F

    from sbnn_addons import sbnn_objective
    from sbnn_addons.models import PAPER_CONFIGS, dvs_resnet19, paper_recipe

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = CONFIGS[name]
    model = dvs_resnet19(num_steps=num_steps, **cfg)
    opt, _ = paper_recipe(model, "dvs_gesture")  # the first epoch's learning rates
    if data_dir:
        from sbnn_addons.data.dvs_gesture import load_dvs_gesture_32

        x, y = load_dvs_gesture_32(data_dir, "train", num_frames=num_steps)
        x, y = x[:batch].transpose(0, 1).float(), y[:batch]
    else:
        x = torch.bernoulli(torch.full((num_steps, batch, 2, 32, 32), 0.05))
        y = torch.randint(0, 11, (batch,))
    aux = PAPER_CONFIGS["dvs_gesture"]["aux_weight"]

    losses = []

    def step() -> float:
        t0 = time.perf_counter()
        nll = F.cross_entropy(model(x), y)
        losses.append(nll.item())
        loss = (sbnn_objective(nll, model, aux_weight=aux, aux_reduction="sum")
                if cfg["bayes"] else nll)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    step()  # warm-up
    times = [step() for _ in range(steps)]
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # the same batch every step: a network that learns lowers its loss on it
    return {"config": name, "times": times, "peak_rss_gb": peak_kb / 2**20,
            "start_rss_gb": rss_start / 2**20, "losses": losses,
            "loss_fell": losses[-1] < losses[0]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved processes per config")
    ap.add_argument("--num-steps", type=int, default=49, help="T (frames)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=None, help="dvs_gesture_32 folder (optional)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                    help="run the workers with MALLOC_MMAP_THRESHOLD_=BYTES (glibc): blocks "
                         "of this size or more are returned to the system when freed, so "
                         "the peak RSS follows the live tensors rather than the heap's "
                         "retention (default: glibc's adaptive threshold)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.num_steps, args.batch,
                                args.threads, args.data_dir)))
        return
    if min(args.steps, args.rounds, args.num_steps, args.batch, args.threads) < 1:
        ap.error("--steps, --rounds, --num-steps, --batch and --threads must be >= 1")

    results: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for _ in range(args.rounds):
        for name in CONFIGS:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", name,
                   "--steps", str(args.steps), "--num-steps", str(args.num_steps),
                   "--batch", str(args.batch), "--threads", str(args.threads)]
            if args.data_dir:
                cmd += ["--data-dir", args.data_dir]
            env = dict(os.environ)
            if args.malloc_mmap_threshold is not None:
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
            out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                 env=env).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
            print(f"# {name}: {results[name][-1]['times']}", flush=True)

    twin = next(iter(CONFIGS))
    summary = {}
    for name, runs in results.items():
        summary[name] = {
            "step_s": statistics.median(t for r in runs for t in r["times"]),
            "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
            "loss_fell": f"{sum(r['loss_fell'] for r in runs)}/{len(runs)}",
        }
    rows = []
    for name, s in summary.items():
        rows.append({
            "config": name,
            "step_s": s["step_s"],
            "ratio_to_twin": s["step_s"] / summary[twin]["step_s"],
            "speed_up_vs_paper": PAPER_STEP_S / s["step_s"],
            "peak_rss_gb": s["peak_rss_gb"],
            "memory_fraction_of_paper": s["peak_rss_gb"] / PAPER_PEAK_GB,
            "loss_fell": s["loss_fell"],
        })
    print(f"\n# dvs_resnet19, T={args.num_steps}, batch {args.batch}, {args.threads} threads, "
          f"{args.rounds} x {args.steps} timed steps; torch {_torch_version()}; "
          f"MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold or 'glibc default'}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus\n")
    keys = ("config", "step_s", "ratio_to_twin", "speed_up_vs_paper", "peak_rss_gb",
            "memory_fraction_of_paper", "loss_fell")
    print("| " + " | ".join(k.replace("_", " ") for k in keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.2f}" if isinstance(r[k], float) else r[k]
                                for k in keys) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "runs": results, "args": vars(args)}, fh, indent=2)


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main()
