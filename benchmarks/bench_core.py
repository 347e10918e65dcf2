"""Training-step cost of the core SBNN layers against deterministic + atan twins.

Measures, in one run, the median training-step time (forward, loss, backward) of each
configuration interleaved with its baseline (a pairwise A/B), and the bytes of tensors
saved for backward (the activation memory that dominates training memory on CPU,
measured with ``saved_tensors_hooks``: the storages the step allocates, each once) of:

* an MLP spiking net (784-256-10, T=25, batch 128) and
* a small conv spiking net (2x32x32 -> conv16 -> avgpool -> conv32 -> avgpool -> fc10,
  T=8, batch 32), run step by step, and the same net with time folded into the batch
  (``conv_seq``: each layer once on ``[T*B, ...]``, then the neurons over the sequence,
  with ``sbnn_addons.LIF.run`` in the SBNN net),

each built with ``BayesLinear``/``BayesConv2d`` (per-layer or per-weight std) and
``IWSTSpike``, against the same network with ``nn.Linear``/``nn.Conv2d`` and snnTorch's
atan surrogate; and the spike function alone against atan. Results are ratios
(SBNN / baseline), printed as a Markdown table and optionally written as JSON.

Each round (``--repeat``) runs in a fresh process, and ratios are the median over
rounds: a process's heap history moves both arms' times (glibc maps and trims memory
adaptively, and memory taken back from the system is zero-filled page by page on first
touch), so one process is one sample. The minor page faults per training step are
reported next to each ratio. ``--no-trim`` keeps freed memory in the process for both
arms (glibc ``mallopt``: no trimming of the heap, no ``mmap`` below 32 MiB), which
removes most page faults and with them most of the run-to-run spread.

Usage::

    python benchmarks/bench_core.py --reps 30 --repeat 5 --json runs/bench_core.json
    python benchmarks/bench_core.py --reps 30 --repeat 5 --no-trim
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import multiprocessing
import platform
import resource
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import sbnn_addons as sb

#: Input shape (without time) and number of steps of each network.
SHAPES = {"mlp": ((128, 784), 25), "conv": ((32, 2, 32, 32), 8),
          "conv_seq": ((32, 2, 32, 32), 8)}


class AtanSpike(torch.autograd.Function):
    """snnTorch's default surrogate: Heaviside forward, ``alpha/2 / (1 + (pi/2 alpha u)^2)``."""

    @staticmethod
    def forward(ctx, u, alpha=2.0):
        ctx.save_for_backward(u)
        ctx.alpha = alpha
        return (u > 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        a = ctx.alpha
        return grad * (a / 2) / (1 + (math.pi / 2 * a * u) ** 2), None


def atan_spike(u, variance=None):
    return AtanSpike.apply(u)


class SpikingNet(nn.Module):
    """LIF network ``layer_i -> [pool] -> LIF`` with soft reset, readout = summed membrane.

    ``atan_spikes=True`` keeps the Bayesian layers and their variances but fires with the
    atan surrogate (an ablation: the cost of the layers alone)."""

    def __init__(self, kind: str, bayes: str | None, beta: float = 0.9,
                 atan_spikes: bool = False) -> None:
        super().__init__()
        self.kind, self.beta = kind, beta
        kw = {} if bayes is None else {"std_mode": bayes}
        lin = nn.Linear if bayes is None else sb.BayesLinear
        conv = nn.Conv2d if bayes is None else sb.BayesConv2d
        if kind == "mlp":
            self.layers = nn.ModuleList([lin(784, 256, **kw), lin(256, 10, **kw)])
        else:
            self.layers = nn.ModuleList(
                [conv(2, 16, 3, padding=1, **kw), conv(16, 32, 3, padding=1, **kw),
                 lin(32 * 8 * 8, 10, **kw)]
            )
        self.spikes = nn.ModuleList(
            [sb.IWSTSpike("st") for _ in self.layers] if bayes is not None else []
        )
        self.bayes = bayes is not None and not atan_spikes
        self.lifs = nn.ModuleList(  # the library's neuron in the SBNN networks
            [sb.LIF(beta, 1.0, spike, reset="subtract") for spike in self.spikes[:-1]]
            if self.bayes else []
        )

    def _spike(self, i, u, var):
        if not self.bayes:
            return atan_spike(u)
        return self.spikes[i].fire(u, var)

    def forward(self, x):  # x: [T, B, ...]
        # one forward pass over T steps: each Bayesian layer computes s^2 once
        with sb.share_posterior():
            return self._forward_folded(x) if self.kind == "conv_seq" else self._forward(x)

    def _forward_folded(self, x):
        """The conv network with time folded into the batch: each layer runs once on
        ``[T*B, ...]``, then its neurons run the whole sequence (``LIF.run`` for the SBNN
        network, the written-out atan LIF for the baseline)."""
        steps, batch = x.shape[:2]
        h = x.flatten(0, 1)
        for i, layer in enumerate(self.layers[:-1]):
            with sb.variance_flow():  # carries the variance through the pooling
                cur = F.avg_pool2d(layer(h), 2)
            var = sb.get_variance(cur)
            seq = cur.view(steps, batch, *cur.shape[1:])
            if self.lifs:
                spikes = self.lifs[i].run(sb.attach_variance(
                    seq, var.view(steps, batch, *var.shape[1:])))
            else:
                mem, out = None, []
                for t in range(steps):
                    mem = seq[t] if mem is None else self.beta * mem + seq[t]
                    spike = self._spike(i, mem - 1.0, None)
                    mem = mem - spike
                    out.append(spike)
                spikes = torch.stack(out)
            h = spikes.flatten(0, 1)
        cur = self.layers[-1](h.flatten(1)).view(steps, batch, -1)
        mem, out = None, 0.0
        for t in range(steps):  # the readout's membrane, summed over time
            mem = cur[t] if mem is None else self.beta * mem + cur[t]
            out = out + mem
        return out

    def _forward(self, x):
        """Step by step: the SBNN network's hidden neurons are ``sbnn_addons.LIF``; the
        baseline (and the atan ablation) write the same LIF out."""
        mems = [None] * len(self.layers)
        vars_ = [None] * len(self.layers)
        states = [None] * len(self.layers)
        out = 0.0
        for t in range(x.shape[0]):
            h = x[t]
            for i, layer in enumerate(self.layers):
                if i == len(self.layers) - 1 and self.kind == "conv":
                    h = h.flatten(1)
                cur = layer(h)
                if self.kind == "conv" and i < 2:
                    with sb.variance_flow():  # carries the variance through the pooling
                        cur = F.avg_pool2d(cur, 2)
                if i == len(self.layers) - 1:  # the readout: membrane summed over time
                    mems[i] = cur if mems[i] is None else self.beta * mems[i] + cur
                    out = out + mems[i]
                    break
                if self.lifs:
                    h, states[i] = self.lifs[i](cur, states[i])
                    continue
                var = sb.get_variance(cur)
                mems[i] = cur if mems[i] is None else self.beta * mems[i] + cur
                if var is not None:
                    vars_[i] = var if vars_[i] is None else self.beta**2 * vars_[i] + var
                h = self._spike(i, mems[i] - 1.0, vars_[i])
                mems[i] = mems[i] - h
        return out


def _step_fn(net, x, y):
    def step():
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()

    return step


def _live_storages() -> set[int]:
    """Addresses of the storages of every tensor alive now (parameters, inputs, state)."""
    found = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and not obj.is_meta and obj.layout == torch.strided:
                try:
                    found.add(obj.untyped_storage().data_ptr())
                except RuntimeError:  # no data (a compiler's fake tensor)
                    continue
    return found


def _saved_bytes(step) -> int:
    """Bytes of the tensors one call of ``step`` saves for its backward and allocates
    itself: the storages that ``torch.autograd.graph.saved_tensors_hooks`` sees, each
    counted once, without those that existed before the step (parameters, the input
    batch, state carried over). The storages are held until the count is made, so no
    address is reused by another one within the step."""
    gc.collect()
    before, saved = _live_storages(), {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in before:
            saved.setdefault(storage.data_ptr(), storage)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(s.nbytes() for s in saved.values())


def peak_bytes(step, device: torch.device | str = "cpu") -> float:
    """Peak memory one call of ``step`` allocates above what was allocated when it started
    (its forward's graph, the backward's temporaries, the gradients), in bytes.

    On CUDA, ``torch.cuda.max_memory_allocated``; on the CPU, the allocator's events in
    ``torch.profiler`` (``profile_memory=True``): every allocation and release in the
    step, in order, summed, in the second of two profiled calls (the profiler knows the
    size of a block it saw allocated: the first call's releases of earlier blocks, such as
    the last step's gradients, would be left out). Compiled steps are measured alike."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - start)
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):  # the second: its frees of blocks the first allocated have sizes
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return float(peak)


def _spike_alone(kind: str):
    u0 = torch.randn(128, 256)
    var = torch.full((128, 256), 0.25)
    spike = sb.IWSTSpike(kind)

    def base():
        u = u0.clone().requires_grad_()
        atan_spike(u).sum().backward()

    def sbnn():
        u = u0.clone().requires_grad_()
        spike.fire(u, var).sum().backward()

    return base, sbnn


def _median_ratio(fns: dict, reps: int) -> dict:
    times = {k: [] for k in fns}
    for f in fns.values():  # warm-up
        for _ in range(3):
            f()
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def learns(model: nn.Module, step, steps: int, window: int = 3) -> tuple[float, float]:
    """The mean loss of the first and of the last ``window`` of ``steps`` Adam steps of
    ``step()`` (a training step on one fixed batch, returning its loss; ``model``'s
    gradients set by it). A benchmark quotes no time for a network whose loss does not
    fall: an SBNN's loss is a noisy sample, one step's value against another's can go
    either way while the trend falls, so the windows' means are compared."""
    opt = torch.optim.Adam(sb.param_groups(model, lr=2e-3))
    losses = []
    for _ in range(steps):
        loss = step()
        opt.step()
        losses.append(float(loss.detach()))
    window = max(1, min(window, steps // 2))
    return sum(losses[:window]) / window, sum(losses[-window:]) / window


def repeated(fns: dict, reps: int, repeat: int) -> tuple[dict, dict]:
    """``repeat`` rounds of :func:`_median_ratio`: the median over rounds of each
    function's time, and the ``(median, min, max)`` over rounds of its ratio to
    ``fns``' first entry (the baseline)."""
    rounds = [_median_ratio(fns, reps) for _ in range(repeat)]
    base = next(iter(fns))
    times = {k: statistics.median(r[k] for r in rounds) for k in fns}
    ratios = {}
    for k in fns:
        values = [r[k] / r[base] for r in rounds]
        ratios[k] = (statistics.median(values), min(values), max(values))
    return times, ratios


def keep_freed_memory() -> bool:
    """glibc only: keep freed memory in the process (no heap trimming, no ``mmap`` for
    blocks below 32 MiB, the largest threshold glibc allows), so that freed blocks are
    reused without page faults. Returns whether both settings were applied."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_trim_threshold, 1 << 30)) and bool(
        mallopt(m_mmap_threshold, 32 << 20))


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _pair(fns: dict, reps: int) -> dict:
    """One interleaved A/B: median time of each function and page faults per call."""
    before = _faults()
    times = _median_ratio(fns, reps)
    faults = (_faults() - before) / (reps + 3) / len(fns)  # both arms together
    return {"times": times, "faults": faults}


def _round(reps: int, threads: int, seed: int, ablate: bool, no_trim: bool) -> list[dict]:
    """One round, meant for a fresh process: every configuration against its own
    interleaved baseline (a pairwise A/B that the other configurations' allocations, the
    per-weight nets', do not disturb)."""
    if no_trim and not keep_freed_memory():
        raise RuntimeError("--no-trim needs glibc's mallopt")
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rows = []
    for kind, (shape, steps) in SHAPES.items():
        x = (torch.rand(steps, *shape) < 0.2).float()
        y = torch.randint(0, 10, (shape[0],))
        nets = {name: SpikingNet(kind, b) for name, b in
                (("baseline", None), ("layer", "layer"), ("weight", "weight"))}
        if ablate and kind != "conv_seq":
            nets["layer, atan spikes"] = SpikingNet(kind, "layer", atan_spikes=True)
        steps_fn = {k: _step_fn(n, x, y) for k, n in nets.items()}
        mem = {k: _saved_bytes(f) for k, f in steps_fn.items()}
        for key in list(nets)[1:]:
            pair = _pair({"baseline": steps_fn["baseline"], key: steps_fn[key]}, reps)
            config = f"per-{key} std" if key in ("layer", "weight") else "per-layer std, atan spike"
            rows.append({"network": kind, "config": config, **pair,
                         "memory_ratio": mem[key] / mem["baseline"], "key": key})
    for est in ("st", "agr"):
        base, sbnn = _spike_alone(est)
        pair = _pair({"baseline": base, "sbnn": sbnn}, reps * 5)
        rows.append({"network": "spike function [128, 256]",
                     "config": f"IWSTSpike({est}) vs atan", **pair,
                     "memory_ratio": float("nan"), "key": "sbnn"})
    return rows


def run(reps: int = 30, threads: int = 2, seed: int = 0, repeat: int = 1,
        ablate: bool = False, no_trim: bool = False) -> list[dict]:
    """``repeat`` rounds, each in a fresh (spawned) process; per configuration the median
    over rounds of the time ratio (with its range), the median times and page faults."""
    spawn = multiprocessing.get_context("spawn")
    rounds = []
    for _ in range(repeat):
        with spawn.Pool(1) as pool:
            rounds.append(pool.apply(_round, (reps, threads, seed, ablate, no_trim)))
    rows = []
    for i, first in enumerate(rounds[0]):
        samples = [r[i] for r in rounds]
        key = first["key"]
        ratios = [s["times"][key] / s["times"]["baseline"] for s in samples]
        rows.append({
            "network": first["network"], "config": first["config"],
            "baseline_ms": 1e3 * statistics.median(s["times"]["baseline"] for s in samples),
            "sbnn_ms": 1e3 * statistics.median(s["times"][key] for s in samples),
            "time_ratio": statistics.median(ratios),
            "ratio_range": f"{min(ratios):.2f}-{max(ratios):.2f}",
            "page_faults_per_step": statistics.median(s["faults"] for s in samples),
            "memory_ratio": first["memory_ratio"],
        })
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of --reps repetitions, each in a fresh process; ratios "
                             "are the median over rounds, with their range")
    parser.add_argument("--ablate-spike", action="store_true",
                        help="also time the per-layer networks with atan spikes (Bayesian "
                             "layers kept): the cost of the layers alone")
    parser.add_argument("--no-trim", action="store_true",
                        help="keep freed memory in the process, for both arms (glibc "
                             "mallopt): fewer page faults, less spread")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    if min(args.reps, args.threads, args.repeat) < 1:
        parser.error("--reps, --threads and --repeat must be >= 1")
    rows = run(args.reps, args.threads, repeat=args.repeat, ablate=args.ablate_spike,
               no_trim=args.no_trim)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, {args.repeat} process(es) of {args.reps} interleaved "
          f"repetitions (medians); allocator: "
          f"{'freed memory kept (--no-trim)' if args.no_trim else 'glibc defaults'}\n")
    print_rows(rows, ("network", "config", "baseline_ms", "sbnn_ms", "time_ratio",
                      "ratio_range", "page_faults_per_step", "memory_ratio"), args.json)


def print_rows(rows: list[dict], keys: tuple[str, ...], json_path: str | None) -> None:
    """Print ``rows`` as a Markdown table of ``keys`` and optionally dump them as JSON."""
    print("| " + " | ".join(k.replace("_", " ") for k in keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        cells = [f"{r[k]:.2f}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        print("| " + " | ".join(cells) + " |")
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(rows, fh, indent=2)

if __name__ == "__main__":
    main()
