"""Eager, C kernel and ``torch.compile``: what each costs per training step, against the host.

In one run, interleaved, for the reference shape of ``bench_adapters.py`` (784-256-10 MLP,
T=25, batch 128, Bernoulli(0.2) input), for snnTorch (tutorial explicit loop, atan
surrogate) and SpikingJelly (multi-step ``LIFNode``, ``ATan``):

* ``host eager`` (the baseline, ratio 1) and ``host compiled``: the original model (on
  CUDA, SpikingJelly runs its own CUDA or Triton neuron here; the script prints which);
* ``sbnn eager, C kernel``: the converted model (per-layer std, ST) with the fused CPU kernel;
* ``sbnn eager, PyTorch``: the same without the kernel (``use_kernels(False)``), the path a
  CUDA tensor takes;
* ``sbnn compiled, PyTorch``: ``torch.compile(fullgraph=True)`` of the forward and loss with
  the kernel off: inductor fuses the PyTorch path (the backward is compiled by
  AOTAutograd);
* ``sbnn compiled``: the same with the kernel on, called as ``torch.library`` custom ops;
* ``sbnn compiled, aux_pull=0``: the same without the auxiliary pull (what it costs
  compiled);
* ``sbnn compiled, free draw (bound)`` (``--draw-bound``): the compiled SBNN step with each
  spike drawn as ``1[u + sigma eps > 0]`` from Gaussian noise ``eps`` computed before the
  step, in the graph's own element-wise kernels (:class:`PresetNoiseDraw`). No random
  numbers are generated in the step and no operator splits a neuron's kernel: with the
  rest of the step left to inductor, a lower bound on the compiled SBNN step for any way
  of placing the draw (a custom operator, the noise drawn ahead, inductor's own random
  numbers).

A step is state reset, forward, cross-entropy and backward (the compiled variants compile
the forward and the loss). Reports the median step time as a ratio to ``host eager`` and to
``host compiled``, the bytes saved for backward as a ratio to the host's (eager variants;
:func:`bench_core._saved_bytes`), the peak memory a step allocates as a ratio to the host's
eager step (every variant; :func:`bench_core.peak_bytes`: the allocator's events on the CPU,
``torch.cuda.max_memory_allocated`` on CUDA), and, so that no time is quoted for a
network that does not learn, the loss before and after ``--train-steps`` Adam steps on one
fixed batch for every variant (the mean of the last three must be below the mean of the
first three). ``first_call_s`` is the wall time of each variant's first step: for a
compiled variant its compile time (Dynamo, AOTAutograd, inductor) and one step, with
inductor's and AOTAutograd's on-disk caches off, so that every run compiles afresh.

On CUDA each step ends with a device synchronisation (the time of the kernels, not of their
launch), the C-kernel variants are left out (the kernel serves CPU tensors only: ``sbnn
eager`` is the PyTorch path). ``--batch`` changes the batch (128: the reference shape).

Usage::

    python benchmarks/bench_compile.py --reps 20 --repeat 3
    python benchmarks/bench_compile.py --device cuda --reps 50 --repeat 3   # GPU (see docs)
    python benchmarks/bench_compile.py --device cuda --reps 50 --repeat 3 --batch 2048
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import time
import types

import torch
import torch.nn.functional as F
from bench_adapters import B, T, snntorch_models, spikingjelly_models
from bench_core import _saved_bytes, learns, peak_bytes, print_rows, repeated

import sbnn_addons as sb


def _variants(host: str, device: str, draw_bound: bool = False):
    factory = snntorch_models if host == "snntorch" else spikingjelly_models
    models, reset = factory()
    original, sbnn = models["original"], models["sbnn ST"]
    if torch.device(device).type != "cpu":  # the C kernel serves CPU tensors only
        return {
            "host eager": (original, reset, False, None),
            "host compiled": (copy.deepcopy(original), reset, True, None),
            "sbnn eager": (sbnn, reset, False, True),
            "sbnn compiled": (copy.deepcopy(sbnn), reset, True, True),
            "sbnn compiled, aux_pull=0": (models["sbnn ST, aux_pull=0"], reset, True, True),
        }
    variants = {
        "host eager": (original, reset, False, None),
        "host compiled": (copy.deepcopy(original), reset, True, None),
        "sbnn eager, C kernel": (sbnn, reset, False, True),
        "sbnn eager, PyTorch": (copy.deepcopy(sbnn), reset, False, False),
        "sbnn compiled, PyTorch": (copy.deepcopy(sbnn), reset, True, False),
        "sbnn compiled": (copy.deepcopy(sbnn), reset, True, True),
        "sbnn compiled, aux_pull=0": (models["sbnn ST, aux_pull=0"], reset, True, True),
    }
    if draw_bound:
        variants[BOUND] = (copy.deepcopy(sbnn), reset, True, "bound")
    return variants


BOUND = "sbnn compiled, free draw (bound)"


class _PresetNoiseSpike(sb.kernels._CompiledSpike):
    """The compiled spike (``kernels._CompiledSpike``: its outputs, saved tensors and
    backward) with the draw ``1[u + sigma eps > 0]`` from given noise ``eps``, passed in
    the constants' last slot (the operator's ordering input there): element-wise
    operations that inductor fuses into the neuron's kernel."""

    @staticmethod
    def forward(u, variance, constants):
        at_zero, _estimator, aux_offset, _aux_var, _aux_pull, eps = constants
        sigma = variance.clamp_min(0).sqrt()
        drive = u + sigma * eps
        fired = drive >= 0 if at_zero else drive > 0
        z2 = u.new_zeros(())
        if aux_offset is not None:
            z = sb.kernels._aux_z(u, sigma.clamp_min(1e-6), aux_offset)
            z2 = torch.where(sigma > 0, z * z, 0.0).sum()
        return (fired.to(u.dtype), z2, fired.to(torch.uint8),
                u.new_empty(0, dtype=torch.uint8))


class PresetNoiseDraw:
    """A context (reusable) within which compiled spikes are drawn from one fixed Gaussian
    noise tensor of ``numel`` elements (its first ``u.numel()``), computed once, outside
    any step."""

    def __init__(self, numel: int, device: str):
        self.eps = torch.randn(numel, device=device)
        self.original = sb.kernels.compiled_spike

    def compiled_spike(self, u, variance, estimator, at_zero=False, aux_offset=None,
                       aux_var=True, aux_pull=0.0):
        if u.numel() > self.eps.numel():
            sb.base.raise_error(  # (traced: a Dynamo UserError with this message)
                f"PresetNoiseDraw(numel={self.eps.numel()}) holds too little noise for a "
                f"drive of {u.numel()} elements: make numel at least the largest layer's "
                "batch x units", ValueError)
        spikes, z2, _, _ = _PresetNoiseSpike.apply(
            u, variance, (at_zero, estimator.spec, aux_offset, bool(aux_var),
                          float(aux_pull), self.eps[:u.numel()].view(u.shape)))
        return spikes, z2

    def __enter__(self):
        sb.kernels.compiled_spike = self.compiled_spike

    def __exit__(self, *exc):
        sb.kernels.compiled_spike = self.original


def own_code(fn):
    """``fn`` with a code object of its own. Dynamo keeps compiled code per code object:
    every variant's ``loss_fn`` shares one, so a model of the host's class could run the
    host's cache entry. Seen on torch 2.11 with CUDA: the host's graph broke at snnTorch's
    ``mem == None``, the converted model (same class) matched that entry's guards and ran
    eagerly under ``sbnn compiled``."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                              fn.__defaults__, fn.__closure__)


def graphs_compiled() -> int:
    """Graphs Dynamo has compiled in this process so far."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _make_step(model, reset, compiled: bool, kernels: bool, x, y):
    @own_code
    def loss_fn(x, y):
        return F.cross_entropy(model(x), y)

    # the library's claim is fullgraph; the host compiles as its users compile it (some
    # snnTorch / PyTorch pairs break the graph at snnTorch's `mem == None`)
    fn = torch.compile(loss_fn, fullgraph=kernels is not None) if compiled else loss_fn

    draw = PresetNoiseDraw(x.shape[1] * 1024, x.device.type) if kernels == "bound" else None

    def step():
        model.zero_grad(set_to_none=True)
        # eager for every variant: SpikingJelly's reset_net caches modules in a global
        # table, on which a compiled step would guard (a recompile per new model)
        reset(model)
        if kernels is False:
            context = sb.kernels.use_kernels(False)
        elif kernels == "bound":
            context = draw
        else:
            context = contextlib.nullcontext()
        with context:
            loss = fn(x, y)
            loss.backward()
        if x.is_cuda:  # the step's kernels have run when the timer stops
            torch.cuda.synchronize(x.device)
        return loss

    return step


def run(reps: int, repeat: int, threads: int, device: str, train_steps: int,
        hosts: tuple[str, ...], seed: int = 0, batch: int = B,
        draw_bound: bool = False) -> list[dict]:
    torch.set_num_threads(threads)
    # the compiled variants share one code object (loss_fn), one cache entry per model
    torch._dynamo.config.recompile_limit = 64
    rows = []
    for host in hosts:
        torch.manual_seed(seed)
        x = (torch.rand(T, batch, 784) < 0.2).float().to(device)
        y = torch.randint(0, 10, (batch,)).to(device)
        variants = _variants(host, device, draw_bound)
        steps, first_call = {}, {}
        for name, (model, reset, compiled, kernels) in list(variants.items()):
            model.to(device)
            steps[name] = _make_step(model, reset, compiled, kernels, x, y)
            graphs = graphs_compiled()
            start = time.perf_counter()
            try:  # a variant that cannot run here is named, the others still measured
                steps[name]()
                first_call[name] = time.perf_counter() - start
            except Exception as exc:  # noqa: BLE001
                if name.startswith("host"):
                    raise
                print(f"{host} / {name}: FAILED, left out: {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0]}")
                del steps[name], variants[name]
                continue
            if compiled and graphs_compiled() == graphs:  # ran eagerly: not a compiled time
                print(f"{host} / {name}: Dynamo compiled no graph, left out")
                del steps[name], variants[name]
        times, ratios = repeated(steps, reps, repeat)
        saved = {k: _saved_bytes(f) for k, f in steps.items() if "compiled" not in k}
        peak = {k: peak_bytes(f, device) for k, f in steps.items()}
        for name, (model, *_rest) in variants.items():
            first, last = learns(model, steps[name], train_steps)
            ratio, low, high = ratios[name]
            rows.append({
                "host": host, "variant": name, "ms": 1e3 * times[name],
                "vs_host_eager": ratio, "range": f"{low:.2f}-{high:.2f}",
                "vs_host_compiled": times[name] / times["host compiled"],
                "saved_bytes_ratio": (saved[name] / saved["host eager"]) if name in saved
                else float("nan"),
                "peak_memory_ratio": peak[name] / peak["host eager"],
                "first_call_s": first_call[name],
                "loss_first": first, "loss_last": last, "learns": last < first,
            })
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=B)
    parser.add_argument("--hosts", nargs="+", choices=("snntorch", "spikingjelly"),
                        default=["snntorch", "spikingjelly"])
    parser.add_argument("--draw-bound", action="store_true",
                        help=f"add the variant '{BOUND}'")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    # no compiled graph from an earlier run (inductor's and AOTAutograd's on-disk caches):
    # a compiled variant's first call is the compile time of a fresh machine
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    rows = run(args.reps, args.repeat, args.threads, args.device, args.train_steps,
               tuple(args.hosts), batch=args.batch, draw_bound=args.draw_bound)
    if "spikingjelly" in args.hosts:  # on CUDA the host uses its own CUDA / Triton neuron
        from spikingjelly.activation_based import functional

        impl = functional.neuron_implementation("lif", torch.device(args.device))
        print(f"SpikingJelly LIF implementation on {args.device}: {impl}")
    print(f"torch {torch.__version__}, {platform.machine()}, device {args.device}, "
          f"{args.threads} threads, {args.repeat} round(s) of {args.reps} interleaved "
          f"repetitions (medians); MLP 784-256-10, T={T}, batch {args.batch}\n")
    columns = ("host", "variant", "ms", "vs_host_eager", "range", "vs_host_compiled",
               "saved_bytes_ratio", "peak_memory_ratio", "first_call_s")
    print_rows(rows, columns + ("loss_first", "loss_last", "learns"), args.json)
    if not all(r["learns"] for r in rows):
        raise SystemExit("a variant's loss did not fall: its time is not meaningful")


if __name__ == "__main__":
    main()
