"""Port snnTorch tutorial networks to SBNNs and compare them on rate-coded digits.

Trains, from the same initial weights, (a) the original snnTorch model with its default
atan surrogate and (b) the model converted by ``sbnn_addons.snntorch.to_sbnn``, for an
FC network (snnTorch tutorial 5) and a small conv network (tutorial 7 style, digits as
1x8x8), then prints test accuracy (SBNN in ``mean`` and ``sample`` mode) and training time.

    python examples/snntorch_port_digits.py --epochs 3 --num-steps 10
"""

from __future__ import annotations

import argparse
import time

import snntorch as snn
import torch
import torch.nn.functional as F
from torch import nn

import sbnn_addons
from sbnn_addons.data import load_digits_split, rate_code
from sbnn_addons.snntorch import to_sbnn

BETA = 0.9


class FCNet(nn.Module):
    """snnTorch tutorial 5: Linear -> Leaky -> Linear -> Leaky, loop inside forward."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.lif1 = snn.Leaky(beta=BETA)
        self.fc2 = nn.Linear(hidden, 10)
        self.lif2 = snn.Leaky(beta=BETA)

    def forward(self, x):  # x [T, B, 64]
        mem1, mem2 = self.lif1.init_leaky(), self.lif2.init_leaky()
        spk_rec, mem_rec = [], []
        for step in range(x.shape[0]):
            spk1, mem1 = self.lif1(self.fc1(x[step]), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            spk_rec.append(spk2)
            mem_rec.append(mem2)
        return torch.stack(spk_rec), torch.stack(mem_rec)


class ConvNet(nn.Module):
    """snnTorch tutorial 7 style: Conv -> max-pool -> Leaky (x2) -> Linear -> Leaky."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 12, 3, padding=1)
        self.lif1 = snn.Leaky(beta=BETA)
        self.conv2 = nn.Conv2d(12, 32, 3, padding=1)
        self.lif2 = snn.Leaky(beta=BETA)
        self.fc1 = nn.Linear(32 * 2 * 2, 10)
        self.lif3 = snn.Leaky(beta=BETA)

    def forward(self, x):  # x [T, B, 64] -> digits as 1x8x8
        x = x.view(x.shape[0], x.shape[1], 1, 8, 8)
        mem1, mem2, mem3 = self.lif1.reset_mem(), self.lif2.reset_mem(), self.lif3.reset_mem()
        spk_rec, mem_rec = [], []
        for step in range(x.shape[0]):
            spk1, mem1 = self.lif1(F.max_pool2d(self.conv1(x[step]), 2), mem1)
            spk2, mem2 = self.lif2(F.max_pool2d(self.conv2(spk1), 2), mem2)
            spk3, mem3 = self.lif3(self.fc1(spk2.flatten(1)), mem3)
            spk_rec.append(spk3)
            mem_rec.append(mem3)
        return torch.stack(spk_rec), torch.stack(mem_rec)


def train(model, data, args, seed):
    x_tr, y_tr = data
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    start = time.perf_counter()
    for _ in range(args.epochs):
        perm = torch.randperm(len(y_tr), generator=g)
        for i in range(0, len(y_tr), args.batch_size):
            idx = perm[i:i + args.batch_size]
            _, mem = model(rate_code(x_tr[idx], args.num_steps, g))
            loss = F.cross_entropy(mem.mean(0), y_tr[idx])  # time-averaged membrane readout
            opt.zero_grad()
            loss.backward()
            opt.step()
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model, data, args):
    x_te, y_te = data
    g = torch.Generator().manual_seed(123)
    spk, mem = model(rate_code(x_te, args.num_steps, g))
    return (mem.mean(0).argmax(1) == y_te).float().mean().item()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--num-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--estimator", default="iwst(0.5)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    for name in ("epochs", "num_steps", "batch_size",):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    x_tr, y_tr, x_te, y_te = load_digits_split(seed=args.seed)
    rows = []
    for name, factory in (("fc", FCNet), ("conv", ConvNet)):
        torch.manual_seed(args.seed)
        original = factory()
        sbnn = to_sbnn(original, estimator=args.estimator)  # same initial weights (copy)
        sbnn_addons.seed_spikes(sbnn, args.seed)
        t_orig = train(original, (x_tr, y_tr), args, args.seed)
        t_sbnn = train(sbnn, (x_tr, y_tr), args, args.seed)
        acc_orig = accuracy(original, (x_te, y_te), args)
        with sbnn_addons.mode(sbnn, "mean"):
            acc_mean = accuracy(sbnn, (x_te, y_te), args)
        acc_sample = accuracy(sbnn, (x_te, y_te), args)
        rows.append((name, "snnTorch (atan)", acc_orig, float("nan"), t_orig))
        rows.append((name, f"SBNN ({args.estimator})", acc_mean, acc_sample, t_sbnn))

    print(f"digits, {args.epochs} epochs, T={args.num_steps}, torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'net':<5} {'model':<18} {'acc (mean)':>10} {'acc (sample)':>12} {'train s':>8}")
    for net, model, acc, acc_s, secs in rows:
        sample = "-" if acc_s != acc_s else f"{acc_s:.3f}"
        print(f"{net:<5} {model:<18} {acc:>10.3f} {sample:>12} {secs:>8.1f}")


if __name__ == "__main__":
    main()
