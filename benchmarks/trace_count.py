"""Bytecode instructions that Dynamo traces per time step: a converted snnTorch model against
the host's own, the part of compile time that grows with the number of steps.

``torch.compile(fullgraph=True)`` unrolls a time loop: Dynamo interprets the Python of every
neuron step, the host's and the library's, one bytecode instruction at a time. This script
counts the instructions Dynamo steps through (``InstructionTranslatorBase.step``) for a loss
over T = 2 and T = 3 steps of a two-neuron snnTorch ``Sequential`` (``init_hidden``), with
the ``eager`` backend (no AOTAutograd, no inductor), and prints the difference: the count per
time step. The count depends on the code and on the torch / snnTorch versions (it prints
them), not on the machine. ``--top N`` lists the N
functions that add the most per step.

Usage::

    python benchmarks/trace_count.py --top 10
"""

from __future__ import annotations

import argparse
import collections

import snntorch as snn
import snntorch.utils as sutils
import torch
import torch._dynamo.symbolic_convert as symbolic_convert
from torch import nn

import sbnn_addons as sb
import sbnn_addons.snntorch as sbnn_snn

_COUNTS: collections.Counter = collections.Counter()
_STEP = symbolic_convert.InstructionTranslatorBase.step


def _counting_step(self):
    code = self.f_code
    _COUNTS[f"{code.co_filename.rsplit('site-packages/', 1)[-1]}:{code.co_name}"] += 1
    return _STEP(self)


def count(converted: bool, steps: int) -> collections.Counter:
    """Instructions Dynamo traces for one compiled loss over ``steps`` time steps."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), snn.Leaky(beta=0.9, init_hidden=True),
                          nn.Linear(6, 3), snn.Leaky(beta=0.9, init_hidden=True, output=True))
    if converted:
        model = sbnn_snn.to_sbnn(model, aux_loss=True)
    sutils.reset(model)

    def loss_fn(x):
        sutils.reset(model)
        mems = torch.stack([model(x[t])[1] for t in range(x.shape[0])])
        return mems.sum() + (0.1 * sb.aux_loss(model) if converted else 0.0)

    _COUNTS.clear()
    symbolic_convert.InstructionTranslatorBase.step = _counting_step
    try:
        torch.compile(loss_fn, fullgraph=True, backend="eager")(torch.rand(steps, 3, 8) * 2)
    finally:
        symbolic_convert.InstructionTranslatorBase.step = _STEP
    return collections.Counter(_COUNTS)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--top", type=int, default=0, help="list the N costliest functions")
    args = parser.parse_args(argv)
    if args.top < 0:
        parser.error(f"--top must be >= 0, got {args.top}")
    print(f"torch {torch.__version__}, snntorch {snn.__version__}: bytecode instructions "
          "Dynamo traces per time step")
    for name, converted in (("snntorch host", False), ("sbnn converted", True)):
        per_step = count(converted, 3)
        per_step.subtract(count(converted, 2))
        print(f"{name}: {sum(per_step.values())}")
        for fn, n in per_step.most_common(args.top):
            print(f"    {n:6d}  {fn}")


if __name__ == "__main__":
    main()
