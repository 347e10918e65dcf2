"""Converted host models at the converters' defaults against their surrogate originals.

For each host model, the surrogate original and ``to_sbnn(original)`` (defaults, no
tuning) start from the same weights and see the same mini-batches in the same order, at
the learning rate and with the loss of the host library's own tutorial. Per epoch the
script prints the mean training loss and the test accuracy (the original: its surrogate
network; the converted model: ``sample`` mode, one stochastic pass, and ``mean`` mode).
By default the converted model trains on the host's loss alone, in the host's own loop
(the converters' default auxiliary pull acts in the backward). ``--aux-fraction f`` adds
``w`` times the scale-free auxiliary loss (``sbnn_addons.aux_loss``, sigma held
constant) with ``w = f`` times the host's loss of the first batch at initialisation, or
``--aux-weight w`` an explicit weight; ``--convert-kw '{"aux_pull": 0}'`` turns the pull
off. The loss printed is the host's loss in both columns.

The converted model's training loss and ``sample`` accuracy are one noisy pass per
example, the original's its deterministic pass. ``--mc K`` (default 16; 0: off) adds its
Monte Carlo evaluation per epoch: ``sbnn_addons.mc_predict`` runs ``K`` stochastic passes
of each test batch (``mc`` mode, neuron state reset before every pass, no gradients,
seeded spike noise); the columns are the test loss of the expected output (the host's
loss applied to the output averaged over the passes: spike trains, firing rates) beside
the original's test loss of its deterministic pass, and the ``mc(K)`` test accuracy (the
argmax of ``mc_predict``'s mean predictive distribution). The passes draw from forked
random generators (``torch.random.fork_rng``), so every other column is the same with
any ``--mc``.

Models:

* ``snntorch-csnn``: snnTorch tutorial 7's CSNN (Conv2d(1,12,5)-MaxPool-Leaky-
  Conv2d(12,64,5)-MaxPool-Leaky-Linear-Leaky, ``init_hidden`` Sequential, beta 0.5,
  ``fast_sigmoid(slope=25)``), ``SF.ce_rate_loss``, Adam; scikit-learn's digits
  upsampled to 28 x 28 and fed directly at every step.
* ``snntorch-csnn-spike-grad``: the same network with snnTorch's surrogate against the
  same weights with ``sbnn_addons.snntorch.spike_grad()`` in every ``Leaky`` (the
  drop-in spike function alone, no Bayesian layer).
* ``sj-csnn``: SpikingJelly's ``conv_fashion_mnist`` CSNN (Conv-BN-IF-pool twice, two
  Linear-IF, multi-step, ATan), MSE of the firing rate against one-hot, SGD 0.1 with
  momentum 0.9 as the example's command; the same digits.
* ``sj-dvsgesture``: SpikingJelly's zoo ``parametric_lif_net.DVSGestureNet(channels=16)``
  with ``LIFNode(surrogate_function=ATan(), detach_reset=True)`` in multi-step mode (the
  ``classify_dvsg`` example), Adam 1e-3, MSE of the firing rate; the real DVS128 Gesture
  frames (``dvs_gesture_32``), upsampled 4x (nearest) to the 128 x 128 the network
  expects.

Usage::

    python benchmarks/bench_dropin.py --models snntorch-csnn sj-csnn \
        --dvs-dir ../shared/data/dvs_gesture_32 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch
import torch.nn.functional as F
from torch import nn

import sbnn_addons


# --------------------------------------------------------------------------- data
def digits_28(n_train: int | None, n_test: int | None, seed: int = 0):
    """Digits ``[N, 1, 28, 28]`` in [0, 1] (bilinear upsampling of the 8 x 8 images)."""
    from sbnn_addons.data.digits import load_digits_split

    xtr, ytr, xte, yte = load_digits_split(seed=seed)

    def up(x):
        return F.interpolate(x.view(-1, 1, 8, 8), size=(28, 28), mode="bilinear",
                             align_corners=False).clamp(0, 1)

    return up(xtr[:n_train]), ytr[:n_train], up(xte[:n_test]), yte[:n_test]


def dvs_frames(data_dir: str, n_train: int, n_test: int, num_frames: int, stride: int):
    from sbnn_addons.data.dvs_gesture import load_dvs_gesture_32

    xtr, ytr = load_dvs_gesture_32(data_dir, "train", frame_stride=stride,
                                   num_frames=num_frames)
    xte, yte = load_dvs_gesture_32(data_dir, "test", frame_stride=stride,
                                   num_frames=num_frames)
    g = torch.Generator().manual_seed(0)
    tr = torch.randperm(len(ytr), generator=g)[:n_train]
    te = torch.randperm(len(yte), generator=g)[:n_test]
    return xtr[tr], ytr[tr], xte[te], yte[te]


# --------------------------------------------------------------------------- models
#: the converted model's aux weight: [fraction of the initial host loss, explicit weight]
AUX = [0.0, None]
#: noise scales' learning rate over the weights' (--noise-lr-ratio)
NOISE_LR_RATIO = [1.0]
#: training examples on which the converted model's spike noise is calibrated (--calibrate)
CALIBRATE = [0]
#: stochastic passes of the converted model's Monte Carlo evaluation (--mc; 0: none)
MC = [16]

class SnnTorchTask:
    """snnTorch tutorial 7: static image at every step, ``ce_rate_loss``."""

    name = "snntorch-csnn"

    def __init__(self, num_steps: int, lr: float, convert_kw: dict | None = None):
        self.num_steps, self.lr, self.convert_kw = num_steps, lr, convert_kw or {}

    def build(self) -> nn.Module:
        import snntorch as snn
        from snntorch import surrogate

        sg = surrogate.fast_sigmoid(slope=25)
        beta = 0.5
        return nn.Sequential(
            nn.Conv2d(1, 12, 5), nn.MaxPool2d(2),
            snn.Leaky(beta=beta, spike_grad=sg, init_hidden=True),
            nn.Conv2d(12, 64, 5), nn.MaxPool2d(2),
            snn.Leaky(beta=beta, spike_grad=sg, init_hidden=True),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 10),
            snn.Leaky(beta=beta, spike_grad=sg, init_hidden=True, output=True),
        )

    def convert(self, net: nn.Module) -> nn.Module:
        from sbnn_addons.snntorch import to_sbnn

        return to_sbnn(net, **self.convert_kw)

    def forward(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Output spikes ``[T, B, 10]``."""
        from snntorch import utils

        utils.reset(net)
        return torch.stack([net(x)[0] for _ in range(self.num_steps)])

    def loss(self, spk: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from snntorch import functional as SF

        return SF.ce_rate_loss()(spk, y)

    def scores(self, spk: torch.Tensor) -> torch.Tensor:
        """The class scores ``[B, 10]`` the prediction is the argmax of: spike counts."""
        return spk.sum(0)

    def predict(self, spk: torch.Tensor) -> torch.Tensor:
        return self.scores(spk).argmax(-1)

    def optimizer(self, net: nn.Module, sbnn: bool):
        params = sbnn_addons.param_groups(net, lr=self.lr, noise_lr=NOISE_LR_RATIO[0] * self.lr)
        return torch.optim.Adam(params, lr=self.lr, betas=(0.9, 0.999))


class SnnTorchSpikeGradTask(SnnTorchTask):
    """snnTorch tutorial 7 with the drop-in spike function: the same network (same
    weights), each ``Leaky``'s ``spike_grad`` replaced by its own
    ``sbnn_addons.snntorch.spike_grad()`` (no Bayesian layer)."""

    name = "snntorch-csnn-spike-grad"

    def convert(self, net: nn.Module) -> nn.Module:
        import snntorch as snn

        from sbnn_addons.snntorch import spike_grad

        out = self.build()  # built, not deep-copied: snntorch.utils.reset knows its neurons
        out.load_state_dict(net.state_dict())
        for m in out.modules():
            if isinstance(m, snn.Leaky):
                m.spike_grad = spike_grad(**self.convert_kw)
        return out


class SJTask:
    """SpikingJelly examples: multi-step net, firing rate, MSE against one-hot."""

    def __init__(self, name: str, lr: float, T: int, opt: str, channels: int,
                 convert_kw: dict | None = None):
        self.name, self.lr, self.T, self.opt, self.channels = name, lr, T, opt, channels
        self.convert_kw = convert_kw or {}

    def build(self) -> nn.Module:
        from spikingjelly.activation_based import functional, layer, neuron, surrogate

        if self.name == "sj-csnn":
            c = self.channels
            net = nn.Sequential(
                layer.Conv2d(1, c, kernel_size=3, padding=1, bias=False),
                layer.BatchNorm2d(c),
                neuron.IFNode(surrogate_function=surrogate.ATan()),
                layer.MaxPool2d(2, 2),
                layer.Conv2d(c, c, kernel_size=3, padding=1, bias=False),
                layer.BatchNorm2d(c),
                neuron.IFNode(surrogate_function=surrogate.ATan()),
                layer.MaxPool2d(2, 2),
                layer.Flatten(),
                layer.Linear(c * 7 * 7, c * 4 * 4, bias=False),
                neuron.IFNode(surrogate_function=surrogate.ATan()),
                layer.Linear(c * 4 * 4, 10, bias=False),
                neuron.IFNode(surrogate_function=surrogate.ATan()),
            )
        else:
            from sbnn_addons.spikingjelly import stub_torchvision

            with stub_torchvision():  # the zoo imports torchvision for pretrained weights
                from spikingjelly.activation_based.model import parametric_lif_net

            net = parametric_lif_net.DVSGestureNet(
                channels=self.channels, spiking_neuron=neuron.LIFNode,
                surrogate_function=surrogate.ATan(), detach_reset=True)
        functional.set_step_mode(net, "m")
        return net

    def convert(self, net: nn.Module) -> nn.Module:
        from sbnn_addons.spikingjelly import to_sbnn

        return to_sbnn(net, **self.convert_kw)

    def forward(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Firing rate of the output ``[B, C]``; ``x``: images or ``[B, T, 2, 32, 32]``."""
        from spikingjelly.activation_based import functional

        functional.reset_net(net)
        if self.name == "sj-csnn":
            x_seq = x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)
        else:
            x_seq = x.transpose(0, 1)  # [T, B, 2, 32, 32]
            x_seq = F.interpolate(x_seq.flatten(0, 1), scale_factor=4, mode="nearest")
            x_seq = x_seq.unflatten(0, x.shape[1::-1])
        out = net(x_seq)
        return out.mean(0)

    def loss(self, fr: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(fr, F.one_hot(y, fr.shape[-1]).to(fr.dtype))

    def scores(self, fr: torch.Tensor) -> torch.Tensor:
        """The class scores ``[B, C]`` the prediction is the argmax of: firing rates."""
        return fr

    def predict(self, fr: torch.Tensor) -> torch.Tensor:
        return self.scores(fr).argmax(-1)

    def optimizer(self, net: nn.Module, sbnn: bool):
        params = sbnn_addons.param_groups(net, lr=self.lr, noise_lr=NOISE_LR_RATIO[0] * self.lr)
        if self.opt == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        return torch.optim.Adam(params, lr=self.lr)


# --------------------------------------------------------------------------- runs
def evaluate(task, net, x, y, batch: int, mode: str | None) -> float:
    net.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            if mode is None:
                out = task.forward(net, x[i:i + batch])
            else:
                with sbnn_addons.mode(net, mode):
                    out = task.forward(net, x[i:i + batch])
            correct += int((task.predict(out) == y[i:i + batch]).sum())
    net.train()
    return correct / max(len(y), 1)


def expected_eval(task, net, x, y, batch: int, k: int, seed: int) -> dict:
    """Test loss of the expected output, and the accuracy of the Monte Carlo prediction.

    ``k = 0``: the network's own (deterministic) pass, for the original. ``k > 0``: ``k``
    stochastic passes per test batch through ``sbnn_addons.mc_predict`` (``mc`` mode,
    neuron state reset before every pass, no gradients, spike noise seeded with
    ``seed``); the host's loss is applied to the output averaged over the passes (spike
    trains / firing rates), the prediction is the argmax of ``mc_predict``'s mean
    predictive distribution (the softmax of the class scores, averaged over the passes).
    Runs inside ``torch.random.fork_rng``: the training run draws the same random numbers
    with or without it.
    """
    net.eval()
    total, correct = 0.0, 0
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for i in range(0, len(y), batch):
            xb, yb = x[i:i + batch], y[i:i + batch]
            if k:
                outs = []

                def forward(m, inputs, outs=outs):
                    out = task.forward(m, inputs)
                    outs.append(out)
                    return task.scores(out)

                pred = sbnn_addons.mc_predict(net, xb, k, seed=seed + i, forward=forward,
                                              return_samples=False, count_spikes=False)
                out = torch.stack(outs).mean(0)
                correct += int((pred.probs.argmax(-1) == yb).sum())
            else:
                out = task.forward(net, xb)
                correct += int((task.predict(out) == yb).sum())
            total += float(task.loss(out, yb)) * len(yb)
    net.train()
    n = max(len(y), 1)
    return dict(test_loss=total / n, acc_mc=correct / n)


def train(task, net, data, epochs: int, batch: int, sbnn: bool, seed: int,
          aux_weight: float = 0.0):
    xtr, ytr, xte, yte = data
    opt = task.optimizer(net, sbnn)
    if aux_weight:
        sbnn_addons.enable_aux_loss(net)
    order = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    rows = []
    for epoch in range(epochs):
        perm = torch.randperm(len(ytr), generator=order)
        t0, total, count = time.perf_counter(), 0.0, 0
        for i in range(0, len(ytr), batch):
            idx = perm[i:i + batch]
            out = task.forward(net, xtr[idx])
            loss = task.loss(out, ytr[idx])
            objective = loss + aux_weight * sbnn_addons.aux_loss(net) if aux_weight else loss
            opt.zero_grad()
            objective.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        seconds = time.perf_counter() - t0
        acc = evaluate(task, net, xte, yte, 256, "sample" if sbnn else None)
        acc_mean = evaluate(task, net, xte, yte, 256, "mean") if sbnn else float("nan")
        expected = (expected_eval(task, net, xte, yte, 256, MC[0] if sbnn else 0, seed)
                    if MC[0] else dict(test_loss=float("nan"), acc_mc=float("nan")))
        rows.append(dict(epoch=epoch + 1, loss=total / count, acc=acc, acc_mean=acc_mean,
                         seconds=seconds, **expected))
        mc = (f" test loss {expected['test_loss']:.4f}"
              + (f" mc({MC[0]}) acc {expected['acc_mc']:.3f}" if sbnn else "")
              if MC[0] else "")
        print(f"  {'sbnn' if sbnn else 'orig'} epoch {epoch + 1}: loss {total / count:.4f} "
              f"acc {acc:.3f} mean-mode {acc_mean:.3f}{mc} ({seconds:.0f} s)", flush=True)
    return rows


def initial_stats(task, net, x, y) -> dict:
    """Loss and weight-gradient norm on one batch at initialisation, and the output rate."""
    net.train()
    out = task.forward(net, x)
    loss = task.loss(out, y)
    grads = torch.autograd.grad(loss, [p for n, p in net.named_parameters()
                                       if "std_rho" not in n and p.requires_grad],
                                allow_unused=True)
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))
    return dict(loss=float(loss.detach()), grad=norm, out_rate=float(out.detach().float().mean()))


def run_task(task, data, epochs: int, batch: int, seed: int, pretrain: int = 0) -> dict:
    """Train the original and its conversion side by side; with ``pretrain`` epochs, the
    original is trained first and converted then (a user's trained model)."""
    torch.manual_seed(seed)
    original = task.build()
    start = None
    if pretrain:
        train(task, original, data, pretrain, batch, False, seed + 1000)
        xte, yte = data[2], data[3]
        start = {"orig": evaluate(task, original, xte, yte, 256, None)}
    converted = task.convert(original)  # a copy: the same (initial or trained) weights
    factor = None
    if CALIBRATE[0]:
        converted.eval()
        cal = sbnn_addons.calibrate_spike_std(converted, data[0][:CALIBRATE[0]],
                                              forward=task.forward)
        converted.train()
        factor = cal.factor
        rates = {n.rsplit(".", 1)[0]: (round(cal.mean_rates[n], 4),
                                       round(cal.initial_rates[n], 4),
                                       round(cal.sample_rates[n], 4)) for n in cal.mean_rates}
        print(f"{task.name}: spike noise calibrated, factor {factor:.3g}; firing rates "
              f"(mean mode, sample mode before, after): {rates}", flush=True)
    if pretrain:
        start["sbnn"] = evaluate(task, converted, xte, yte, 256, "sample")
        start["sbnn_mean"] = evaluate(task, converted, xte, yte, 256, "mean")
        if MC[0]:
            start["sbnn_mc"] = expected_eval(task, converted, xte, yte, 256, MC[0],
                                             seed)["acc_mc"]
    x0, y0 = data[0][:batch], data[1][:batch]
    torch.manual_seed(seed)
    init = {"orig": initial_stats(task, original, x0, y0),
            "sbnn": initial_stats(task, converted, x0, y0)}
    print(f"{task.name}: init {init}", flush=True)
    fraction, weight = AUX
    aux_weight = weight if weight is not None else fraction * init["orig"]["loss"]
    result = {"init": init, "aux_weight": aux_weight, "pretrain": pretrain, "start": start,
              "factor": factor}
    for label, net in (("orig", original), ("sbnn", converted)):
        result[label] = train(task, net, data, epochs, batch, label == "sbnn", seed,
                              aux_weight if label == "sbnn" else 0.0)
    return result


def table(name: str, result: dict) -> str:
    lines = [f"**{name}** (at the start: weight-gradient norm "
             f"{result['init']['orig']['grad']:.3g} original, "
             f"{result['init']['sbnn']['grad']:.3g} converted; aux weight "
             f"{result['aux_weight']:.3g})", ""]
    if result.get("start"):
        st = result["start"]
        lines[0] += (f". Original trained {result['pretrain']} epochs first; test accuracy at "
                     f"conversion: original {st['orig']:.3f}, converted {st['sbnn']:.3f} "
                     f"(sample) / {st['sbnn_mean']:.3f} (mean)")
        if "sbnn_mc" in st:
            lines[0] += f" / {st['sbnn_mc']:.3f} (mc {MC[0]})"
    if result.get("factor") is not None:
        lines[0] += (f"; spike noise calibrated on {CALIBRATE[0]} training examples "
                     f"(calibrate_spike_std): factor {result['factor']:.3g}")
    head = ("| epoch | original loss | converted loss | original acc | converted acc "
            "(sample) | converted acc (mean) |")
    if MC[0]:
        head += (f" original test loss | converted test loss (mc {MC[0]}) | converted acc "
                 f"(mc {MC[0]}) |")
    lines += [head, "|---" * (head.count("|") - 1) + "|"]
    for o, s in zip(result["orig"], result["sbnn"]):
        line = (f"| {o['epoch']} | {o['loss']:.4f} | {s['loss']:.4f} | {o['acc']:.3f} "
                f"| {s['acc']:.3f} | {s['acc_mean']:.3f} |")
        if MC[0]:
            line += f" {o['test_loss']:.4f} | {s['test_loss']:.4f} | {s['acc_mc']:.3f} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+",
                   default=["snntorch-csnn", "snntorch-csnn-spike-grad", "sj-csnn",
                            "sj-dvsgesture"],
                   choices=["snntorch-csnn", "snntorch-csnn-spike-grad", "sj-csnn",
                            "sj-dvsgesture"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--snntorch-lr", type=float, nargs="+", default=[1e-2, 5e-4])
    p.add_argument("--snntorch-steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=32, help="digits mini-batch size")
    p.add_argument("--digits-train", type=int, default=512)
    p.add_argument("--digits-test", type=int, default=256)
    p.add_argument("--sj-channels", type=int, default=16)
    p.add_argument("--dvs-dir", default=None)
    p.add_argument("--dvs-train", type=int, default=128)
    p.add_argument("--dvs-test", type=int, default=64)
    p.add_argument("--dvs-frames", type=int, default=8)
    p.add_argument("--dvs-stride", type=int, default=6)
    p.add_argument("--dvs-channels", type=int, default=16)
    p.add_argument("--noise-lr-ratio", type=float, default=1.0,
                   help="noise scales' learning rate / the weights' (param_groups default 1)")
    p.add_argument("--pretrain-epochs", type=int, default=0,
                   help="train the original this many epochs first, then convert it")
    p.add_argument("--aux-fraction", type=float, default=0.0,
                   help="aux weight as a fraction of the host loss at initialisation")
    p.add_argument("--aux-weight", type=float, default=None,
                   help="explicit aux weight (overrides --aux-fraction; 0: none)")
    p.add_argument("--calibrate", type=int, default=0, metavar="N",
                   help="after the conversion, calibrate_spike_std on the first N training "
                        "examples (a model converted from a trained one; 0: no)")
    p.add_argument("--mc", type=int, default=16, metavar="K",
                   help="each epoch, also evaluate the converted model with K Monte Carlo "
                        "passes (mc_predict): the test loss of the output averaged over the "
                        "passes and the mc(K) accuracy, beside the original's test loss "
                        "(0: no)")
    p.add_argument("--convert-kw", type=json.loads, default={},
                   help='to_sbnn keyword arguments as JSON (ablations; default: none)')
    args = p.parse_args(argv)
    NOISE_LR_RATIO[0] = args.noise_lr_ratio
    for name in ("aux_fraction", "aux_weight", "pretrain_epochs", "calibrate", "mc"):
        if getattr(args, name) is not None and not getattr(args, name) >= 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    AUX[:] = [args.aux_fraction, args.aux_weight]
    CALIBRATE[0] = args.calibrate
    MC[0] = args.mc
    kw = args.convert_kw
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, aux fraction {args.aux_fraction:g}, "
          f"aux weight {args.aux_weight}, "
          f"noise lr ratio {args.noise_lr_ratio:g}")
    out = []
    for name in args.models:
        if name in ("snntorch-csnn", "snntorch-csnn-spike-grad"):
            data = digits_28(args.digits_train, args.digits_test, args.seed)
            cls = SnnTorchTask if name == "snntorch-csnn" else SnnTorchSpikeGradTask
            what = "" if name == "snntorch-csnn" else ", spike_grad() in every Leaky"
            for lr in args.snntorch_lr:
                task = cls(args.snntorch_steps, lr, kw)
                res = run_task(task, data, args.epochs, args.batch, args.seed,
                               args.pretrain_epochs)
                out.append(table(f"snnTorch tutorial CSNN{what}, Adam lr {lr:g}", res))
        elif name == "sj-csnn":
            data = digits_28(args.digits_train, args.digits_test, args.seed)
            task = SJTask(name, 0.1, 4, "sgd", args.sj_channels, kw)
            res = run_task(task, data, args.epochs, args.batch, args.seed,
                               args.pretrain_epochs)
            out.append(table(f"SpikingJelly tutorial CSNN (channels {args.sj_channels}), "
                             "SGD lr 0.1", res))
        else:
            if args.dvs_dir is None:
                p.error("sj-dvsgesture needs --dvs-dir")
            data = dvs_frames(args.dvs_dir, args.dvs_train, args.dvs_test, args.dvs_frames,
                              args.dvs_stride)
            task = SJTask(name, 1e-3, args.dvs_frames, "adam", args.dvs_channels, kw)
            out.append(table(f"SpikingJelly DVSGestureNet (channels {args.dvs_channels}), "
                             "Adam lr 0.001", run_task(task, data, args.epochs, 16, args.seed,
                                                  args.pretrain_epochs)))
    print()
    print("\n\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
