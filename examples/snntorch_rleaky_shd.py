"""Recurrent snnTorch ``RLeaky`` network on SHD, original vs converted SBNN.

Reads tonic-format SHD files from ``--data-dir`` (``<dir>/SHD/shd_{train,test}.h5`` plus
``.h5.zip`` placeholders; nothing is downloaded); a ``--data-dir`` without them is an
error. Without ``--data-dir`` it writes a small synthetic SHD-format dataset to a
temporary folder (``make_synthetic_shd``) instead, so the script runs anywhere; numbers on
the synthetic data only show that the pipeline works.

    python examples/snntorch_rleaky_shd.py --data-dir /path/to/data --epochs 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import snntorch as snn
import torch
import torch.nn.functional as F
from torch import nn

import sbnn_addons
from sbnn_addons.data.shd import SHD_CHANNELS, load_shd, make_synthetic_shd
from sbnn_addons.snntorch import to_sbnn

BETA = 0.905  # exp(-1/10) rounded: a membrane decay close to the reference (Method page, section 3)


class RecurrentSNN(nn.Module):
    """700 -> RLeaky(hidden, all-to-all recurrent Linear) -> Linear -> Leaky(20)."""

    def __init__(self, hidden: int = 128, classes: int = 20):
        super().__init__()
        self.fc1 = nn.Linear(SHD_CHANNELS, hidden)
        self.rlif1 = snn.RLeaky(beta=BETA, linear_features=hidden)
        self.fc2 = nn.Linear(hidden, classes)
        self.lif2 = snn.Leaky(beta=BETA)

    def forward(self, x):  # x [T, B, 700]
        spk1, mem1 = self.rlif1.init_rleaky()
        mem2 = self.lif2.init_leaky()
        mem_rec = []
        for step in range(x.shape[0]):
            spk1, mem1 = self.rlif1(self.fc1(x[step]), spk1, mem1)
            _, mem2 = self.lif2(self.fc2(spk1), mem2)
            mem_rec.append(mem2)
        return torch.stack(mem_rec)


def train(model, x, y, args, seed):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    start = time.perf_counter()
    for _ in range(args.epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), args.batch_size):
            idx = perm[i:i + args.batch_size]
            loss = F.cross_entropy(model(x[:, idx]).mean(0), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model, x, y):
    return (model(x).mean(0).argmax(1) == y).float().mean().item()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--num-bins", type=int, default=100)
    p.add_argument("--bin-ms", type=float, default=14.0)
    p.add_argument("--max-samples", type=int, default=256)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    for name in ("epochs", "num_bins", "max_samples", "hidden", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    tmp = None
    root = args.data_dir
    if root is not None and root.name == "SHD" and (root / "shd_train.h5").is_file():
        root = root.parent  # the SHD folder itself
    if root is None:
        tmp = tempfile.TemporaryDirectory()
        root = Path(tmp.name)
        make_synthetic_shd(root, num_train=128, num_test=64, seed=args.seed)
        print(f"no --data-dir: synthetic SHD-format data in {root} (not SHD results)")
    elif not (root / "SHD" / "shd_train.h5").is_file():
        p.error(f"--data-dir {root} holds no SHD/shd_train.h5 (tonic's layout: "
                "<dir>/SHD/shd_train.h5, shd_test.h5); leave --data-dir out to run on "
                "synthetic data")
    kw = dict(num_bins=args.num_bins, bin_ms=args.bin_ms, max_samples=args.max_samples)
    x_tr, y_tr = load_shd(root, "train", **kw)
    x_te, y_te = load_shd(root, "test", **kw)

    torch.manual_seed(args.seed)
    original = RecurrentSNN(args.hidden)
    sbnn = to_sbnn(original, estimator="iwst(0.5)")  # fc1, rlif1.recurrent, fc2 -> Bayes
    sbnn_addons.seed_spikes(sbnn, args.seed)
    t_orig = train(original, x_tr, y_tr, args, args.seed)
    t_sbnn = train(sbnn, x_tr, y_tr, args, args.seed)
    acc_orig = accuracy(original, x_te, y_te)
    with sbnn_addons.mode(sbnn, "mean"):
        acc_mean = accuracy(sbnn, x_te, y_te)
    acc_sample = accuracy(sbnn, x_te, y_te)
    if tmp is not None:
        tmp.cleanup()

    print(f"SHD ({len(y_tr)} train / {len(y_te)} test), {args.epochs} epochs, "
          f"T={args.num_bins} x {args.bin_ms} ms")
    print(f"{'model':<18} {'acc (mean)':>10} {'acc (sample)':>12} {'train s':>8}")
    print(f"{'snnTorch (atan)':<18} {acc_orig:>10.3f} {'-':>12} {t_orig:>8.1f}")
    print(f"{'SBNN (iwst(0.5))':<18} {acc_mean:>10.3f} {acc_sample:>12.3f} {t_sbnn:>8.1f}")


if __name__ == "__main__":
    main()
