"""Grid runner: tasks x methods x seeds, with the same model, data and recipe for all.

Baselines are snnTorch models with their own surrogate; the SBNN methods are the same
models converted with :func:`sbnn_addons.snntorch.to_sbnn`. Every method sees the same
rate-coded / framed data, optimiser (Adam, two learning rates, cosine decay) and
evaluation inputs.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import aux_loss
from ..metrics import classification_metrics
from ..modes import mc_predict, mode
from ..spike import seed_spikes

__all__ = ["Method", "Task", "METHODS", "TASKS", "run_one", "run_grid"]


@dataclass(frozen=True)
class Method:
    """A training method: a host surrogate baseline or an SBNN estimator."""

    name: str
    surrogate: str = "atan"
    estimator: str | None = None  # None: baseline
    aux_weight: float = 0.0
    learn_std: bool = True

    @property
    def is_sbnn(self) -> bool:
        return self.estimator is not None


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("snntorch-atan", surrogate="atan"),
        Method("snntorch-fast-sigmoid", surrogate="fast_sigmoid"),
        Method("sbnn-st", estimator="st"),
        Method("sbnn-iwst", estimator="iwst(0.5)"),
        Method("sbnn-agr", estimator="agr"),
        Method("sbnn-agr-aux", estimator="agr", aux_weight=1e-4),
        Method("sbnn-st-fixed-std", estimator="st", learn_std=False),
    )
}


def _surrogate(name: str):
    from snntorch import surrogate

    if name == "atan":
        return surrogate.atan()
    if name == "fast_sigmoid":
        return surrogate.fast_sigmoid()
    raise ValueError(f"unknown surrogate {name!r}; expected 'atan' or 'fast_sigmoid'")


class DigitsNet(nn.Module):
    """snnTorch tutorial-style FC network, ``64 -> hidden -> 10``; logits = time average."""

    def __init__(self, hidden: int = 128, beta: float = 0.9, spike_grad=None) -> None:
        super().__init__()
        import snntorch as snn

        self.fc1 = nn.Linear(64, hidden)
        self.lif1 = snn.Leaky(beta=beta, spike_grad=spike_grad)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:  # [T, B, 64] -> [B, 10]
        mem = self.lif1.init_leaky()
        logits = 0.0
        for t in range(x.shape[0]):
            spk, mem = self.lif1(self.fc1(x[t]), mem)
            logits = logits + self.fc2(spk)
        return logits / x.shape[0]


class DVSNet(nn.Module):
    """snnTorch tutorial-style conv network for 2x32x32 frames, no normalisation."""

    def __init__(self, width: int = 16, beta: float = 0.9, spike_grad=None) -> None:
        super().__init__()
        import snntorch as snn

        self.conv1 = nn.Conv2d(2, width, 3, padding=1)
        self.lif1 = snn.Leaky(beta=beta, spike_grad=spike_grad)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.lif2 = snn.Leaky(beta=beta, spike_grad=spike_grad)
        self.fc = nn.Linear(2 * width * 8 * 8, 11)

    def forward(self, x: Tensor) -> Tensor:  # [T, B, 2, 32, 32] -> [B, 11]
        mem1, mem2 = self.lif1.init_leaky(), self.lif2.init_leaky()
        logits = 0.0
        for t in range(x.shape[0]):
            spk1, mem1 = self.lif1(F.max_pool2d(self.conv1(x[t]), 2), mem1)
            spk2, mem2 = self.lif2(F.max_pool2d(self.conv2(spk1), 2), mem2)
            logits = logits + self.fc(spk2.flatten(1))
        return logits / x.shape[0]


@dataclass
class Task:
    """A classification task: data loading, input encoding and the network."""

    name: str
    load: Callable[[dict], tuple[Tensor, Tensor, Tensor, Tensor]]
    encode: Callable[[Tensor, int, torch.Generator], Tensor]
    build: Callable[[dict, object], nn.Module]
    defaults: dict = field(default_factory=dict)


def _load_digits(cfg):
    from ..data.digits import load_digits_split

    return load_digits_split(seed=cfg.get("split_seed", 0))


def _encode_digits(x, num_steps, gen):
    from ..data.digits import rate_code

    return rate_code(x, num_steps, gen)


def _load_dvs(cfg):
    from ..data.dvs_gesture import load_dvs_gesture_32

    if not cfg.get("data_dir"):
        raise ValueError(
            "task 'dvs-gesture' needs --data-dir pointing at a folder in the dvs_gesture_32 "
            "layout (train.npz, validation.npz, test.npz)"
        )
    stride, frames = cfg.get("frame_stride", 3), cfg.get("num_steps")
    xtr, ytr = load_dvs_gesture_32(cfg["data_dir"], "train", stride, frames)
    xte, yte = load_dvs_gesture_32(cfg["data_dir"], "test", stride, frames)
    scale = cfg.get("input_scale", 0.25)
    return xtr * scale, ytr, xte * scale, yte


def _encode_frames(x, num_steps, gen):
    return x.transpose(0, 1)  # [B, T, ...] -> [T, B, ...]


TASKS: dict[str, Task] = {
    "digits": Task(
        "digits", _load_digits, _encode_digits,
        lambda cfg, sg: DigitsNet(cfg.get("width", 128), spike_grad=sg),
        {"num_steps": 16, "epochs": 25, "batch_size": 64},
    ),
    "dvs-gesture": Task(
        "dvs-gesture", _load_dvs, _encode_frames,
        lambda cfg, sg: DVSNet(cfg.get("width", 16), spike_grad=sg),
        {"num_steps": 16, "epochs": 10, "batch_size": 16},
    ),
}


def build_model(task: Task, method: Method, cfg: dict) -> nn.Module:
    """The task's network with the method's surrogate, converted for SBNN methods."""
    model = task.build(cfg, _surrogate(method.surrogate))
    if method.is_sbnn:
        from ..snntorch import to_sbnn

        model = to_sbnn(
            model, estimator=method.estimator, learn_std=method.learn_std,
            aux_loss=method.aux_weight > 0, inplace=True,
        )
    return model


def _optimizer(model: nn.Module, lr: float, noise_lr: float, total_steps: int):
    noise = [p for n, p in model.named_parameters() if n.endswith("std_rho")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("std_rho")]
    groups = [{"params": rest, "lr": lr}]
    if noise:
        groups.append({"params": noise, "lr": noise_lr})
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    return opt, sched


@torch.no_grad()
def _predict(model, method, x_enc, batch_size, mc_samples, eval_mode):
    probs = []
    for i in range(0, x_enc.shape[1], batch_size):
        xb = x_enc[:, i:i + batch_size]
        if method.is_sbnn and eval_mode == "mc":
            probs.append(mc_predict(lambda xb=xb: model(xb), model, mc_samples))
        elif method.is_sbnn:
            with mode(model, eval_mode):
                probs.append(torch.softmax(model(xb), -1))
        else:
            probs.append(torch.softmax(model(xb), -1))
    return torch.cat(probs)


def run_one(task_name: str, method_name: str, seed: int, cfg: dict, progress=None) -> dict:
    """Train and evaluate one (task, method, seed); returns a result row with curves."""
    task, method = TASKS[task_name], METHODS[method_name]
    cfg = {**task.defaults, **{k: v for k, v in cfg.items() if v is not None}}
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = task.load(cfg)
    model = build_model(task, method, cfg)
    seed_spikes(model, seed)
    steps_per_epoch = math.ceil(len(ytr) / cfg["batch_size"])
    opt, sched = _optimizer(model, cfg["lr"], cfg["noise_lr"], cfg["epochs"] * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    test_gen = torch.Generator().manual_seed(12345)  # identical test encoding for all methods
    x_test = task.encode(xte, cfg["num_steps"], test_gen)
    curve, train_time = [], 0.0
    for epoch in range(cfg["epochs"]):
        model.train()
        perm = torch.randperm(len(ytr), generator=gen)
        total, count = 0.0, 0
        t0 = time.perf_counter()
        for i in range(0, len(ytr), cfg["batch_size"]):
            idx = perm[i:i + cfg["batch_size"]]
            xb = task.encode(xtr[idx], cfg["num_steps"], gen)
            loss = F.cross_entropy(model(xb), ytr[idx])
            if method.aux_weight > 0:
                loss = loss + method.aux_weight * aux_loss(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            count += len(idx)
        train_time += time.perf_counter() - t0
        model.eval()
        quick = _predict(model, method, x_test, 256, 1, "mean" if method.is_sbnn else "n/a")
        curve.append({"epoch": epoch + 1, "train_loss": total / count,
                      "test_accuracy": float((quick.argmax(-1) == yte).float().mean())})
        if progress is not None:
            progress.update(1)
    model.eval()
    probs = _predict(model, method, x_test, 256, cfg["mc_samples"], "mc")
    row = {"task": task_name, "method": method_name, "seed": seed,
           "epochs": cfg["epochs"], "num_steps": cfg["num_steps"],
           "train_time_s": train_time,
           **classification_metrics(probs, yte)}
    if method.is_sbnn:
        mean_probs = _predict(model, method, x_test, 256, 1, "mean")
        row["accuracy_mean_mode"] = float((mean_probs.argmax(-1) == yte).float().mean())
        row["eval"] = f"mc({cfg['mc_samples']})"
    else:
        row["accuracy_mean_mode"] = row["accuracy"]
        row["eval"] = "deterministic"
    row["curve"] = curve
    row["_probs"] = probs
    row["_targets"] = yte
    return row


def run_grid(tasks, methods, seeds, cfg: dict, progress_factory=None) -> list[dict]:
    """Run every (task, method, seed); ``progress_factory(total)`` makes a progress bar."""
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; choose from {sorted(TASKS)}")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {sorted(METHODS)}")
    total = sum({**TASKS[t].defaults, **{k: v for k, v in cfg.items() if v is not None}}["epochs"]
                for t in tasks) * len(methods) * len(seeds)
    bar = progress_factory(total) if progress_factory else None
    rows = []
    try:
        for t in tasks:
            for m in methods:
                for s in seeds:
                    rows.append(run_one(t, m, s, copy.deepcopy(cfg), bar))
    finally:
        if bar is not None:
            bar.close()
    return rows
