"""Where a training step's time goes: kernel launches, device time, syncs, graphs.

For the variants of ``bench_compile.py`` (the reference shape: 784-256-10 MLP, T=25,
Bernoulli(0.2) input), on one device, after warm-up steps, ``torch.profiler`` over
``--steps`` steps. Per step it reports the wall time, the device kernels launched and
their total time (CUDA), the host-device synchronisations the step waits on (CUDA), and
the operators with the most host time; for the compiled variants, the graphs Dynamo
compiled and its graph breaks. ``--cudagraphs`` adds the compiled variants with
``mode="reduce-overhead"`` (CUDA graphs), where a step's launches are replayed as one.

``--kernel-profile`` names each kernel inductor generated in the operator table (the
C++ kernels of the compiled CPU graphs, as ``graph_<n>_cpp_fused_...``), so that a
compiled step's time splits into its fused kernels, the custom spike operator and the
matrix products; ``--threads`` sets torch's intra-op threads (default: torch's).

``--counts`` prints, for the eager variants, two machine-independent counts per training
step that explain an eager step's host time: the ATen operators dispatched (each one a
kernel launch on a GPU) and the Python function calls (builtins excluded), counted over
one step after warm-up.

Usage::

    python benchmarks/profile_step.py --device cuda --hosts snntorch spikingjelly
    python benchmarks/profile_step.py --device cpu --hosts spikingjelly --steps 2
    python benchmarks/profile_step.py --device cpu --counts
    python benchmarks/profile_step.py --device cpu --hosts snntorch --threads 1 --kernel-profile
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import Counter

import torch
import torch.nn.functional as F
from bench_adapters import T
from bench_compile import _variants, graphs_compiled, own_code
from torch.utils._python_dispatch import TorchDispatchMode

import sbnn_addons as sb

_SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
                "cudaMemcpy", "cudaMemcpyAsync")


def _step_fn(model, reset, compiled: bool, mode: str | None, fullgraph: bool, x, y):
    @own_code  # a Dynamo cache of its own (bench_compile.own_code)
    def loss_fn(x, y):
        return F.cross_entropy(model(x), y)

    fn = torch.compile(loss_fn, fullgraph=fullgraph, mode=mode) if compiled else loss_fn

    def step():
        model.zero_grad(set_to_none=True)
        reset(model)
        loss = fn(x, y)
        loss.backward()
        return loss

    return step


def profile(name: str, step, device: torch.device, steps: int, top: int) -> dict:
    graphs = graphs_compiled()
    for _ in range(3):  # warm-up: compilation, caches, CUDA graph recording
        step()
    if "compiled" in name and graphs_compiled() == graphs:
        raise RuntimeError("Dynamo compiled no graph: the step ran eagerly")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    wall = (time.perf_counter() - start) / steps
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                         "cudaLaunchKernelExC",
                                                         "cudaGraphLaunch"))
    syncs = Counter({e.key: e.count for e in events if e.key in _SYNC_EVENTS})
    device_us = sum(getattr(e, "self_device_time_total", 0.0) for e in events
                    if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
    print(f"\n## {name}: {1e3 * wall:.2f} ms per step (under the profiler)")
    if device.type == "cuda":
        print(f"kernel launches per step {launches / steps:.0f}, device kernel time per step "
              f"{device_us / steps / 1e3:.2f} ms, syncs per step "
              f"{ {k: v / steps for k, v in syncs.items()} }")
    rows = sorted((e for e in events if e.key not in _SYNC_EVENTS),
                  key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    print("| op | calls per step | host us per step |")
    print("|---|---|---|")
    for e in rows:
        print(f"| {e.key[:60]} | {e.count / steps:.0f} | {e.self_cpu_time_total / steps:.0f} |")
    return {"name": name, "ms": 1e3 * wall, "launches": launches / steps}


class _OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched while active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def step_counts(step, warmup: int = 2) -> dict:
    """``{"aten_ops": ..., "python_calls": ...}`` of one call of ``step`` (after
    ``warmup`` calls): the ATen operators it dispatches and the Python functions it calls
    (``sys.setprofile`` "call" events; builtins are not counted)."""
    for _ in range(warmup):
        step()
    with _OpCounter() as ops:
        step()
    calls = [0]

    def count(_frame, event, _arg):
        if event == "call":
            calls[0] += 1

    sys.setprofile(count)
    try:
        step()
    finally:
        sys.setprofile(None)
    return {"aten_ops": ops.count, "python_calls": calls[0]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hosts", nargs="+", choices=("snntorch", "spikingjelly"),
                        default=["snntorch", "spikingjelly"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--cudagraphs", action="store_true",
                        help="also the compiled variants with mode='reduce-overhead'")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's intra-op threads (default: torch's own)")
    parser.add_argument("--kernel-profile", action="store_true",
                        help="name inductor's generated CPU kernels in the operator table")
    parser.add_argument("--counts", action="store_true",
                        help="only count ATen operators and Python calls per eager step")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch._dynamo.config.recompile_limit = 64
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.kernel_profile:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True
    print(f"torch {torch.__version__}, device {device}, batch {args.batch}, T={T}, "
          f"threads {torch.get_num_threads()}")
    for host in args.hosts:
        torch.manual_seed(0)
        x = (torch.rand(T, args.batch, 784) < 0.2).float().to(device)
        y = torch.randint(0, 10, (args.batch,)).to(device)
        variants = _variants(host, args.device)
        if args.counts:
            _print_counts(host, variants, device, x, y)
            continue
        todo = []
        for name, (model, reset, compiled, kernels) in variants.items():
            if kernels is False or "C kernel" in name or "aux_pull" in name:
                continue  # the CPU kernel's and the pull's variants: bench_compile.py
            model.to(device)
            full = kernels is not None  # the host compiles as its users do (bench_compile)
            todo.append((name, _step_fn(model, reset, compiled, None, full, x, y)))
            if compiled and args.cudagraphs and device.type == "cuda":
                todo.append((f"{name}, reduce-overhead",
                             _step_fn(model, reset, True, "reduce-overhead", full, x, y)))
        for name, step in todo:
            try:
                profile(f"{host} / {name}", step, device, args.steps, args.top)
            except Exception as exc:  # noqa: BLE001 - a variant that fails is named
                print(f"\n## {host} / {name}: FAILED: {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}")
                continue
            breaks = dict(torch._dynamo.utils.counters["graph_break"])
            if "compiled" in name:
                print(f"graphs compiled so far {graphs_compiled()}, graph breaks so far "
                      f"{sum(breaks.values())} {list(breaks)[:3]}")


def _print_counts(host: str, variants: dict, device: torch.device, x, y) -> None:
    print(f"\n## {host}: per eager training step (T={T})")
    print("| variant | ATen operators | per neuron and step | Python calls |")
    print("|---|---|---|---|")
    for name, (model, reset, compiled, kernels) in variants.items():
        if compiled or "aux_pull" in name:
            continue
        model.to(device)
        with contextlib.nullcontext() if kernels is not False else sb.kernels.use_kernels(False):
            counts = step_counts(_step_fn(model, reset, False, None, False, x, y))
        print(f"| {name} | {counts['aten_ops']} | {counts['aten_ops'] / (2 * T):.1f} | "
              f"{counts['python_calls']} |")


if __name__ == "__main__":
    main()
