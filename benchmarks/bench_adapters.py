"""Training-step cost of converted host models against the original models.

In one run, interleaved, for the notes' reference shape (784-256-10 MLP, T=25, batch 128,
Bernoulli(0.2) input):

* snnTorch: ``nn.Linear`` + ``snn.Leaky(beta=0.9)`` with the atan surrogate, explicit time
  loop (the tutorial style), against ``sbnn_addons.snntorch.to_sbnn`` of the same model;
* SpikingJelly: ``layer.Linear`` + ``neuron.LIFNode(tau=2)`` in multi-step mode with
  ``surrogate.ATan()`` (``--sj-node plif``: ``neuron.ParametricLIFNode(init_tau=2)``,
  whose learned rate the fused sequence also differentiates; ``--sj-step-mode s``: the
  same in single-step mode, called once per time step), against
  ``sbnn_addons.spikingjelly.to_sbnn`` of the same model.

Per-layer std (the paper's scalar) with ST and AGR estimators, at the converters'
defaults (the auxiliary pull on), and ST with ``aux_pull=0`` (what the pull costs).
Reports median step time (forward, cross-entropy, backward, state reset), the bytes of
the tensors a step saves for backward (``bench_core._saved_bytes``) and the peak memory a
step allocates (``bench_core.peak_bytes``), each as a ratio to the original model, and,
so that no time is quoted for a network that does not learn, the loss before and after
``--train-steps`` Adam steps on one fixed batch (``bench_core.learns``; the script fails
unless every model's loss falls, the original's too).

Usage::

    python benchmarks/bench_adapters.py --reps 30 --repeat 3
    python benchmarks/bench_adapters.py --reps 30 --repeat 3 --sj-node plif --hosts spikingjelly
    python benchmarks/bench_adapters.py --reps 30 --repeat 3 --sj-step-mode s --hosts spikingjelly
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F
from bench_core import _saved_bytes, learns, peak_bytes, print_rows, repeated
from torch import nn

T, B = 25, 128


def snntorch_models():
    import snntorch as snn
    from snntorch import surrogate

    from sbnn_addons.snntorch import to_sbnn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(784, 256)
            self.lif1 = snn.Leaky(beta=0.9, spike_grad=surrogate.atan())
            self.fc2 = nn.Linear(256, 10)
            self.lif2 = snn.Leaky(beta=0.9, spike_grad=surrogate.atan())

        def forward(self, x):
            mem1, mem2 = self.lif1.init_leaky(), self.lif2.init_leaky()
            out = 0.0
            for t in range(x.shape[0]):
                spk1, mem1 = self.lif1(self.fc1(x[t]), mem1)
                _, mem2 = self.lif2(self.fc2(spk1), mem2)
                out = out + mem2
            return out

    base = Net()
    return {"original": base,
            "sbnn ST": to_sbnn(base, estimator="st"),
            "sbnn AGR": to_sbnn(base, estimator="agr"),
            "sbnn ST, aux_pull=0": to_sbnn(base, estimator="st", aux_pull=0)}, (lambda m: None)


def spikingjelly_models(node: str = "lif", step_mode: str = "m"):
    """The SpikingJelly MLP in ``step_mode``: ``"m"``, one call on the whole sequence
    (a converted node runs it as one fused sequence); ``"s"``, one call per time step (a
    converted node runs each step as a fused sequence of one step)."""
    from spikingjelly.activation_based import functional, layer, neuron, surrogate

    from sbnn_addons.spikingjelly import to_sbnn

    def make_node():
        if node == "plif":
            return neuron.ParametricLIFNode(init_tau=2.0, surrogate_function=surrogate.ATan(),
                                            step_mode=step_mode)
        return neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan(),
                              step_mode=step_mode)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                layer.Linear(784, 256, step_mode=step_mode), make_node(),
                layer.Linear(256, 10, step_mode=step_mode), make_node(),
            )

        def forward(self, x):
            if step_mode == "m":
                return self.net(x).sum(0)
            return sum(self.net(x_t) for x_t in x)

    base = Net()
    return {"original": base,
            "sbnn ST": to_sbnn(base, estimator="st"),
            "sbnn AGR": to_sbnn(base, estimator="agr"),
            "sbnn ST, aux_pull=0": to_sbnn(base, estimator="st", aux_pull=0)}, functional.reset_net


def run(reps: int, threads: int, seed: int = 0, repeat: int = 1, sj_node: str = "lif",
        hosts: tuple[str, ...] = ("snntorch", "spikingjelly"),
        sj_step_mode: str = "m", train_steps: int = 40) -> list[dict]:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    x = (torch.rand(T, B, 784) < 0.2).float()
    y = torch.randint(0, 10, (B,))
    rows = []
    factories = {"snntorch": snntorch_models,
                 "spikingjelly": lambda: spikingjelly_models(sj_node, sj_step_mode)}
    for host in hosts:
        models, reset = factories[host]()

        def make_step(model, reset=reset):
            def step():
                model.zero_grad(set_to_none=True)
                reset(model)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss
            return step

        steps = {k: make_step(m) for k, m in models.items()}
        times, ratios = repeated(steps, reps, repeat)
        mem = {k: _saved_bytes(f) for k, f in steps.items()}
        peak = {k: peak_bytes(f) for k, f in steps.items()}
        trained = {k: learns(m, steps[k], train_steps) for k, m in models.items()}
        for k in models:
            if k == "original":
                continue
            ratio, low, high = ratios[k]
            name = (f"{host} ({sj_node}{', single-step' if sj_step_mode == 's' else ''})"
                    if host == "spikingjelly" else host)
            rows.append({"host": name, "config": f"{k}, per-layer std",
                         "original_ms": 1e3 * times["original"], "sbnn_ms": 1e3 * times[k],
                         "time_ratio": ratio, "ratio_range": f"{low:.2f}-{high:.2f}",
                         "memory_ratio": mem[k] / mem["original"],
                         "peak_memory_ratio": peak[k] / peak["original"],
                         "loss_first": trained[k][0], "loss_last": trained[k][1],
                         "learns": trained[k][1] < trained[k][0],
                         "host_learns": trained["original"][1] < trained["original"][0]})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of --reps repetitions; ratios are the median over rounds, "
                             "with their range")
    parser.add_argument("--sj-node", choices=("lif", "plif"), default="lif",
                        help="SpikingJelly neuron: LIFNode or ParametricLIFNode")
    parser.add_argument("--sj-step-mode", choices=("m", "s"), default="m",
                        help="SpikingJelly step mode: m (one call per sequence) or s (one "
                             "call per time step)")
    parser.add_argument("--hosts", nargs="+", choices=("snntorch", "spikingjelly"),
                        default=["snntorch", "spikingjelly"])
    parser.add_argument("--train-steps", type=int, default=40,
                        help="Adam steps on one fixed batch per model after the timing: the "
                             "script fails unless every model's loss falls")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = run(args.reps, args.threads, repeat=args.repeat, sj_node=args.sj_node,
               hosts=tuple(args.hosts), sj_step_mode=args.sj_step_mode,
               train_steps=args.train_steps)
    print(f"torch {torch.__version__}, {platform.machine()}, {args.threads} threads, "
          f"{args.repeat} round(s) of {args.reps} interleaved repetitions (medians); "
          f"MLP 784-256-10, T={T}, batch {B}\n")
    print_rows(rows, ("host", "config", "original_ms", "sbnn_ms", "time_ratio", "ratio_range",
                      "memory_ratio", "peak_memory_ratio", "loss_first", "loss_last",
                      "learns"), args.json)
    if not all(r["learns"] and r["host_learns"] for r in rows):
        raise SystemExit("a model's loss did not fall: its time is not meaningful")

if __name__ == "__main__":
    main()
