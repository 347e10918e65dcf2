"""How the weight gradient of a converted deep network grows with depth, against its original.

For a SpikingJelly zoo ResNet (``spiking_resnet18``: plain blocks with BatchNorm;
``sew_resnet18``: SEW blocks with ``ADD``), multi-step ``IFNode`` with ``ATan`` and
``detach_reset=True``, at initialisation: one batch (uniform frames, ``T=4``, 16 samples
of 3 x 32 x 32, 10 classes, cross-entropy of the mean output), the norm of every
convolution's and the classifier's weight gradient of ``to_sbnn(original, spike_std=s)``
(one ``sample``-mode pass) divided by the original's. Each neuron layer multiplies the
gradient flowing back through it by a gain; where the converted spike's gain exceeds the
surrogate's, the ratio grows towards the input, and plain SGD at the original's learning
rate takes the first layers' steps that many times larger.

Usage::

    python benchmarks/gradient_depth.py --model spiking_resnet18 --spike-std 0.3 0.399 0.45 0.5
"""

from __future__ import annotations

import argparse
import math
import warnings

import torch
import torch.nn.functional as F


def _build(name: str):
    from spikingjelly.activation_based import functional, neuron, surrogate

    from sbnn_addons.spikingjelly import stub_torchvision

    with stub_torchvision():
        from spikingjelly.activation_based.model import sew_resnet, spiking_resnet
    kw = dict(pretrained=False, spiking_neuron=neuron.IFNode,
              surrogate_function=surrogate.ATan(), detach_reset=True, num_classes=10)
    net = (sew_resnet.sew_resnet18(cnf="ADD", **kw) if name == "sew_resnet18"
           else spiking_resnet.spiking_resnet18(**kw))
    functional.set_step_mode(net, "m")
    return net


def weight_gradients(model, x, y, seed: int = 1) -> dict[str, float]:
    """The norm of each convolution's and the classifier's weight gradient, one pass."""
    from spikingjelly.activation_based import functional

    functional.reset_net(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    F.cross_entropy(model(x).mean(0), y).backward()
    return {n: p.grad.norm().item() for n, p in model.named_parameters()
            if p.grad is not None and n.endswith("weight") and p.dim() > 1}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("spiking_resnet18", "sew_resnet18"),
                        default="spiking_resnet18")
    parser.add_argument("--spike-std", type=float, nargs="+",
                        default=[1 / math.sqrt(2 * math.pi)])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # the converter's notes (BatchNorm, readout noise)
    from sbnn_addons.spikingjelly import to_sbnn

    torch.manual_seed(0)
    original = _build(args.model)
    x, y = torch.rand(4, 16, 3, 32, 32), torch.randint(0, 10, (16,))
    reference = weight_gradients(original, x, y)
    ratios = {}
    for std in args.spike_std:
        converted = to_sbnn(original, spike_std=std)
        grads = weight_gradients(converted, x, y)
        ratios[std] = {n: grads[n] / reference[n] for n in reference}
    print(f"{args.model}, T=4, batch 16: weight gradient norm, converted / original")
    print("| layer | " + " | ".join(f"spike_std={s:.3g}" for s in args.spike_std) + " |")
    print("|---|" + "---|" * len(args.spike_std))
    for name in reference:
        print(f"| {name} | " + " | ".join(f"{ratios[s][name]:.2f}" for s in args.spike_std)
              + " |")


if __name__ == "__main__":
    main()
