"""A SEW-ResNet-18 (SpikingJelly model zoo) without BatchNorm, converted to an SBNN.

Trained briefly on rate-coded digits (8x8 images upsampled to 16x16, 3 channels).

SpikingJelly's ``model.sew_resnet`` imports torchvision only to download pretrained
weights; ``with sbnn_addons.spikingjelly.stub_torchvision():`` lets it import without it.
``norm_layer`` is an identity, so the SBNN has no normalisation at all (Method page, section 2).

    python examples/spikingjelly_sew_resnet.py --steps 20
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from spikingjelly.activation_based import functional, neuron, surrogate
from torch import nn

import sbnn_addons
from sbnn_addons import spikingjelly as sbnn_sj
from sbnn_addons.data import load_digits_split, rate_code

with sbnn_sj.stub_torchvision():  # the zoo imports torchvision for pretrained weights only
    from spikingjelly.activation_based.model import sew_resnet


class NoNorm(nn.Identity):
    """Identity accepting BatchNorm's constructor arguments (``norm_layer``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()


def images(x: torch.Tensor, steps: int, g: torch.Generator) -> torch.Tensor:
    """[B, 64] in [0, 1] -> rate-coded [T, B, 3, 16, 16]."""
    spikes = rate_code(x, steps, generator=g).view(steps, -1, 1, 8, 8)
    up = F.interpolate(spikes.flatten(0, 1), scale_factor=2, mode="nearest")
    return up.expand(-1, 3, -1, -1).reshape(steps, -1, 3, 16, 16)


def train_eval(model, data, args, sbnn: bool) -> tuple[float, float]:
    x_tr, y_tr, x_te, y_te = data
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        idx = torch.randint(0, len(y_tr), (args.batch_size,), generator=g)
        functional.reset_net(model)
        loss = F.cross_entropy(model(images(x_tr[idx], args.T, g)).mean(0), y_tr[idx])
        if sbnn:
            loss = loss + 1e-8 * sbnn_addons.aux_loss(model, "sum")
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad(), sbnn_addons.mode(model, "mean"):
        functional.reset_net(model)
        pred = model(images(x_te, args.T, g)).mean(0).argmax(-1)
    return float((pred == y_te).float().mean()), time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--test-samples", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--estimator", default="st")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    for name in ("steps", "T", "batch_size", "test_samples",):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    x_tr, y_tr, x_te, y_te = load_digits_split(0.25, seed=args.seed)
    data = (x_tr, y_tr, x_te[: args.test_samples], y_te[: args.test_samples])
    torch.manual_seed(args.seed)
    net = sew_resnet.sew_resnet18(
        spiking_neuron=neuron.IFNode, surrogate_function=surrogate.ATan(),
        detach_reset=True, num_classes=10, cnf="ADD", norm_layer=NoNorm,
    )
    functional.set_step_mode(net, "m")
    # the readout `fc` feeds no neuron: deterministic, as in the released configuration
    sbnn = sbnn_sj.to_sbnn(net, args.estimator, aux_loss=True, exclude="fc")

    acc, sec = train_eval(net, data, args, sbnn=False)
    print(f"SpikingJelly SEW-ResNet-18 : accuracy {acc:.3f}  time {sec:.1f} s")
    acc, sec = train_eval(sbnn, data, args, sbnn=True)
    print(f"SBNN ({args.estimator:>4})          : accuracy {acc:.3f}  time {sec:.1f} s "
          "(mean-mode evaluation)")


if __name__ == "__main__":
    main()
