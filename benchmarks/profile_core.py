"""Operator counts and page faults of one training step of bench_core's networks.

For each network of :mod:`bench_core` (``--kinds``), the deterministic + atan baseline
and the per-layer-std SBNN network, after a warm-up: the torch operators recorded per
training step by ``torch.profiler`` (every ``aten::`` call and autograd node), and the
minor page faults per step (``getrusage``). Counts, not times: they do not move with the
VM's speed.

Usage::

    python benchmarks/profile_core.py --kinds conv mlp --steps 10
"""

from __future__ import annotations

import argparse
import resource

import torch
from bench_core import SHAPES, SpikingNet, _step_fn, print_rows
from torch.profiler import ProfilerActivity, profile


def measure(kind: str, bayes: str | None, steps: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    shape, num_steps = SHAPES[kind]
    x = (torch.rand(num_steps, *shape) < 0.2).float()
    y = torch.randint(0, 10, (shape[0],))
    step = _step_fn(SpikingNet(kind, bayes), x, y)
    for _ in range(3):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    ops = sum(e.count for e in prof.key_averages())
    return {"network": kind, "config": "baseline" if bayes is None else f"per-{bayes} std",
            "operators_per_step": ops / steps, "page_faults_per_step": faults / steps}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", nargs="+", default=["conv", "mlp"], choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(kind, bayes, args.steps) for kind in args.kinds
            for bayes in (None, "layer")]
    print(f"torch {torch.__version__}, {args.threads} threads, {args.steps} steps\n")
    print_rows(rows, ("network", "config", "operators_per_step", "page_faults_per_step"),
               args.json)


if __name__ == "__main__":
    main()
