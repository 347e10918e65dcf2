"""SpikingJelly's own DVSGestureNet (parametric_lif_net) ported to an SBNN on real frames.

Trains the original SpikingJelly model and its SBNN conversion briefly on the preprocessed
DVS128 Gesture frames (32x32, upsampled to the 128x128 the network expects, nearest) and
prints accuracy and time of both.

    python examples/spikingjelly_dvs_gesture.py --data-dir ../shared/data/dvs_gesture_32
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from spikingjelly.activation_based import functional, neuron, surrogate
from spikingjelly.activation_based.model import parametric_lif_net

import sbnn_addons
from sbnn_addons import spikingjelly as sbnn_sj
from sbnn_addons.bench import stratified_subset
from sbnn_addons.data import load_dvs_gesture_32


def upsample(frames: torch.Tensor) -> torch.Tensor:
    """[N, T, 2, 32, 32] -> [T, N, 2, 128, 128] (nearest)."""
    n, t = frames.shape[:2]
    up = F.interpolate(frames.flatten(0, 1), size=(128, 128), mode="nearest")
    return up.view(n, t, 2, 128, 128).transpose(0, 1)


def train_eval(model, data, args, sbnn: bool) -> tuple[float, float]:
    (x_tr, y_tr), (x_te, y_te) = data
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    model.train()
    for _ in range(args.steps):
        idx = torch.randint(0, len(y_tr), (args.batch_size,), generator=g)
        functional.reset_net(model)
        logits = model(upsample(x_tr[idx])).mean(0)
        loss = F.cross_entropy(logits, y_tr[idx])
        if sbnn:
            loss = loss + 1e-10 * sbnn_addons.aux_loss(model, "sum")
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    correct = 0
    with torch.no_grad(), sbnn_addons.mode(model, "mean"):
        for i in range(0, len(y_te), args.batch_size):
            functional.reset_net(model)
            pred = model(upsample(x_te[i:i + args.batch_size])).mean(0).argmax(-1)
            correct += int((pred == y_te[i:i + args.batch_size]).sum())
    return correct / len(y_te), time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="folder with train.npz / test.npz")
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--frame-stride", type=int, default=12, help="keep every k-th frame")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--test-samples", type=int, default=64,
                   help="stratified, seeded test subset (every class in proportion)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--estimator", default="st")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    for name in ("channels", "frame_stride", "steps", "batch_size", "test_samples",):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    x_tr, y_tr = load_dvs_gesture_32(args.data_dir, "train", frame_stride=args.frame_stride)
    x_te, y_te = load_dvs_gesture_32(args.data_dir, "test", frame_stride=args.frame_stride)
    # the split is sorted by label: a stratified seeded subset keeps every gesture
    keep = stratified_subset(y_te, args.test_samples, seed=args.seed)
    data = ((x_tr, y_tr), (x_te[keep], y_te[keep]))
    print(f"train {tuple(x_tr.shape)}, test {tuple(data[1][0].shape)}")

    torch.manual_seed(args.seed)
    net = parametric_lif_net.DVSGestureNet(
        channels=args.channels, spiking_neuron=neuron.ParametricLIFNode,
        surrogate_function=surrogate.ATan(), detach_reset=True,
    )
    functional.set_step_mode(net, "m")
    sbnn = sbnn_sj.to_sbnn(net, args.estimator, aux_loss=True)  # copy, before training

    acc, sec = train_eval(net, data, args, sbnn=False)
    print(f"SpikingJelly DVSGestureNet : accuracy {acc:.3f}  time {sec:.1f} s")
    acc, sec = train_eval(sbnn, data, args, sbnn=True)
    print(f"SBNN ({args.estimator:>4})          : accuracy {acc:.3f}  time {sec:.1f} s "
          "(mean-mode evaluation)")


if __name__ == "__main__":
    main()
