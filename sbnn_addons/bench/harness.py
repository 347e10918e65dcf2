"""Grid runner: tasks x methods x seeds, with the same model, data and recipe for all.

Baselines are snnTorch (or SpikingJelly) models with their own surrogate; the SBNN
methods are the same models converted with :func:`sbnn_addons.snntorch.to_sbnn` (or
:func:`sbnn_addons.spikingjelly.to_sbnn`). Every method sees the same encoded data,
optimiser (Adam, two learning rates, cosine decay) and evaluation inputs.

Runs scale out with ``torchrun --nproc_per_node=N``: each process trains on its shard of
every epoch's permutation inside ``DistributedDataParallel`` (gloo on CPU, nccl on GPU),
evaluation is sharded and gathered, and every process returns the same rows.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import aux_loss, sbnn_objective
from ..metrics import classification_metrics
from ..modes import mc_predict, mode
from ..spike import seed_spikes
from .nets import (
    ConvNet,
    MLPNet,
    SJConvNet,
    SJMLPNet,
    sj_surrogate,
    snntorch_surrogate,
)

__all__ = ["Method", "Task", "METHODS", "TASKS", "PRESETS", "run_one", "run_grid",
           "apply_preset", "dist_info"]


# --------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """A training method: a host surrogate baseline or an SBNN estimator.

    ``framework`` is ``"snntorch"`` or ``"spikingjelly"``; ``bn`` builds the task's
    "with BatchNorm" variant; ``kl_weight > 0`` trains with the KL term of
    :func:`sbnn_addons.sbnn_objective` (``N`` = training-set size).
    """

    name: str
    surrogate: str = "atan"
    estimator: str | None = None  # None: baseline
    aux_weight: float = 0.0
    learn_std: bool = True
    framework: str = "snntorch"
    bn: bool = False
    kl_weight: float = 0.0
    help: str = ""

    @property
    def is_sbnn(self) -> bool:
        return self.estimator is not None


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("snntorch-atan", surrogate="atan", help="snnTorch, atan surrogate"),
        Method("snntorch-fast-sigmoid", surrogate="fast_sigmoid",
               help="snnTorch, fast-sigmoid surrogate"),
        Method("snntorch-gaussian", surrogate="gaussian",
               help="snnTorch, reference Gaussian surrogate phi(u/0.4)/0.4"),
        Method("snntorch-atan-bn", surrogate="atan", bn=True,
               help="snnTorch atan with per-step BatchNorm (cifar10, dvs-gesture, shd)"),
        Method("snntorch-gaussian-bn", surrogate="gaussian", bn=True,
               help="snnTorch Gaussian surrogate with per-step BatchNorm"),
        Method("sj-lif-sigmoid", surrogate="sigmoid", framework="spikingjelly",
               help="SpikingJelly LIFNode (multi-step), surrogate.Sigmoid()"),
        Method("sj-lif-atan", surrogate="atan", framework="spikingjelly",
               help="SpikingJelly LIFNode (multi-step), surrogate.ATan()"),
        Method("sj-lif-atan-bn", surrogate="atan", framework="spikingjelly", bn=True,
               help="SpikingJelly ATan with per-step BatchNorm"),
        Method("sbnn-st", estimator="st", help="SBNN, straight-through (IW-ST p=0)"),
        Method("sbnn-iwst", estimator="iwst(0.5)", help="SBNN, IW-ST p=0.5"),
        Method("sbnn-agr", estimator="agr", help="SBNN, AGR estimator"),
        Method("sbnn-agr-aux", estimator="agr", aux_weight=1e-4,
               help="SBNN AGR + bias-minimising aux loss"),
        Method("sbnn-agr-kl", estimator="agr", kl_weight=1.0,
               help="SBNN AGR + KL (sbnn_objective, kl_weight=1, N = train size)"),
        Method("sbnn-st-fixed-std", estimator="st", learn_std=False,
               help="SBNN ST with fixed (not learned) weight std"),
        Method("sbnn-sj-st", estimator="st", framework="spikingjelly",
               help="SpikingJelly model converted by sbnn_addons.spikingjelly, ST"),
        Method("sbnn-sj-agr", estimator="agr", framework="spikingjelly",
               help="SpikingJelly model converted by sbnn_addons.spikingjelly, AGR"),
        Method("ep", estimator=None, framework="ep",
               help="expectation propagation (ADF form, sbnn_addons.ep), 3 passes; digits, "
               "randman"),
        Method("ep-binary", estimator=None, framework="ep",
               help="EP with binary +-1 weights (Bernoulli posteriors), 3 passes; digits, "
               "randman"),
    )
}

#: Passes over the training set of the ``ep`` method (its learning rule needs few).
EP_PASSES = 3


# --------------------------------------------------------------------------- tasks
@dataclass
class Task:
    """A classification task: data loading, input encoding and the networks.

    ``build(cfg, spike_grad, bn)`` returns the snnTorch network; ``build_sj(cfg,
    surrogate_function, bn)`` its SpikingJelly twin (``None``: not offered);
    ``reference(cfg)`` the paper's reference network from :mod:`sbnn_addons.models` (used by
    ``--preset paper`` when that package is importable). ``presets`` maps a preset name to
    the config defaults it sets for this task.
    """

    name: str
    load: Callable[[dict], tuple[Tensor, Tensor, Tensor, Tensor]]
    encode: Callable[[Tensor, int, torch.Generator], Tensor]
    build: Callable[[dict, object, bool], nn.Module]
    defaults: dict = field(default_factory=dict)
    build_sj: Callable[[dict, object, bool], nn.Module] | None = None
    has_bn: bool = False
    reference: Callable[[dict, Method], nn.Module] | None = None
    presets: dict = field(default_factory=dict)
    help: str = ""


def _need_dir(cfg: dict, task: str, layout: str) -> Path:
    d = cfg.get("data_dir")
    if not d:
        raise ValueError(f"task {task!r} needs --data-dir: {layout}; nothing is downloaded")
    path = Path(d)
    if not path.is_dir():
        raise FileNotFoundError(f"--data-dir {path} is not a folder; task {task!r}: {layout}")
    return path


# digits ---------------------------------------------------------------------------------
def _load_digits(cfg):
    from ..data.digits import load_digits_split

    return load_digits_split(seed=cfg.get("split_seed", 0))


def _encode_digits(x, num_steps, gen):
    from ..data.digits import rate_code

    return rate_code(x, num_steps, gen)


# dvs-gesture ----------------------------------------------------------------------------
def _load_dvs(cfg):
    from ..data.dvs_gesture import LAYOUT, load_dvs_gesture_32

    root = _need_dir(cfg, "dvs-gesture", LAYOUT)
    stride, frames = cfg.get("frame_stride", 3), cfg.get("num_steps")
    xtr, ytr = load_dvs_gesture_32(root, "train", stride, frames)
    xte, yte = load_dvs_gesture_32(root, "test", stride, frames)
    if frames is not None and xtr.shape[1] < frames:
        raise ValueError(
            f"dvs-gesture: {frames} frames requested but --frame-stride {stride} leaves "
            f"{xtr.shape[1]}; lower --frame-stride or --num-steps"
        )
    n = cfg.get("max_samples")
    if n is not None:
        xtr, ytr, xte, yte = xtr[:n], ytr[:n], xte[:n], yte[:n]
    scale = cfg.get("input_scale", 0.25)
    return xtr * scale, ytr, xte * scale, yte


def _encode_frames(x, num_steps, gen):
    return x.transpose(0, 1)  # [B, T, ...] -> [T, B, ...] (cast to float per batch)


# shd ------------------------------------------------------------------------------------
SHD_LAYOUT = ("expected tonic's SHD layout: <data-dir>/SHD/shd_train.h5 and shd_test.h5 (plus "
              "empty shd_*.h5.zip placeholders), or --data-dir pointing at that SHD/ folder")


def _load_shd(cfg):
    from ..data.shd import SHDBinned

    root = _need_dir(cfg, "shd", SHD_LAYOUT)
    if (root / "shd_train.h5").is_file() and not (root / "SHD").is_dir():
        root = root.parent  # pointed at the SHD/ folder itself
    out = []
    for split in ("train", "test"):
        ds = SHDBinned(root, split, num_bins=cfg["num_steps"], bin_ms=cfg.get("bin_ms", 14.0))
        n = len(ds) if cfg.get("max_samples") is None else min(cfg["max_samples"], len(ds))
        # spike counts per 14 ms bin are small integers: store compactly, decode per batch
        x = torch.empty((n, cfg["num_steps"], 700), dtype=torch.uint8)
        y = torch.empty(n, dtype=torch.int64)
        for i in range(n):
            frames, label = ds[i]
            x[i] = frames.clamp_max(255).to(torch.uint8)
            y[i] = label
        out += [x, y]
    return tuple(out)


# randman --------------------------------------------------------------------------------
def _load_randman(cfg):
    from ..data.randman import randman_split

    return randman_split(
        num_classes=cfg["randman_classes"], num_units=cfg["randman_units"],
        num_steps=cfg["num_steps"], samples_per_class=cfg["randman_samples"],
        manifold_dim=cfg["randman_dim"], alpha=cfg["randman_alpha"],
        seed=cfg.get("split_seed", 0),
    )


# cifar10 --------------------------------------------------------------------------------
def _load_cifar(cfg):
    from ..data.cifar10 import LAYOUT, load_cifar10

    root = _need_dir(cfg, "cifar10", LAYOUT)
    n = cfg.get("max_samples")
    xtr, ytr = load_cifar10(root, "train", max_samples=n)
    xte, yte = load_cifar10(root, "test", max_samples=n)
    return xtr, ytr, xte, yte


def _encode_direct(x, num_steps, gen):
    return x.unsqueeze(0).expand(num_steps, *x.shape)  # the same image at every step


# reference networks (sbnn_addons.models, when available) ---------------------------------
class _StepZero(nn.Module):
    """Feed ``x[0]`` of time-major ``[1, B, ...]`` input to a ``[B, ...]`` network (T = 1)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] != 1:
            raise ValueError(f"the CIFAR-10 reference network has T = 1, got T = {x.shape[0]}; "
                             "use --num-steps 1")
        return self.net(x[0])


def _reference(builder: str):
    """Builder of the reference network ``sbnn_addons.models.<builder>`` for a method.

    SBNN methods get ``bayes=True`` and their estimator; baselines the deterministic twin
    (``bayes=False``) with the method's surrogate, and ``norm="bn"`` (one BatchNorm per
    step) for the ``-bn`` methods.
    """

    def build(cfg: dict, method: Method) -> nn.Module:
        from .. import models

        kwargs = dict(cfg.get("reference_kwargs") or {})
        kwargs["bayes"] = method.is_sbnn
        if method.is_sbnn:
            kwargs["estimator"] = method.estimator
        else:
            kwargs["surrogate"] = method.surrogate
            kwargs.pop("bias_std", None)
        if method.bn:
            kwargs["norm"] = "bn"
        if builder != "cifar_resnet25":
            kwargs["num_steps"] = cfg["num_steps"]
        if cfg.get("width") and builder != "shd_recurrent":
            kwargs.setdefault("width_mult", cfg["width"] / (32 if "dvs" in builder else 64))
        elif cfg.get("width"):
            kwargs.setdefault("hidden", (cfg["width"], cfg["width"]))
        net = getattr(models, builder)(**kwargs)
        return _StepZero(net) if builder == "cifar_resnet25" else net

    return build


def _width(cfg: dict, default: int) -> int:
    return int(cfg.get("width") or default)


TASKS: dict[str, Task] = {
    "digits": Task(
        "digits", _load_digits, _encode_digits,
        lambda cfg, sg, bn: MLPNet(64, _width(cfg, 128), 10, sg, bn=bn),
        {"num_steps": 16, "epochs": 25, "batch_size": 64},
        build_sj=lambda cfg, sg, bn: SJMLPNet(64, _width(cfg, 128), 10, sg, bn=bn),
        help="scikit-learn 8x8 digits, rate-coded (embedded, no download)",
    ),
    "randman": Task(
        "randman", _load_randman, _encode_frames,
        lambda cfg, sg, bn: MLPNet(cfg["randman_units"], _width(cfg, 128),
                                   cfg["randman_classes"], sg, bn=bn),
        {"num_steps": 50, "epochs": 20, "batch_size": 64, "randman_classes": 10,
         "randman_units": 100, "randman_samples": 250, "randman_dim": 1,
         "randman_alpha": 2.0},
        build_sj=lambda cfg, sg, bn: SJMLPNet(cfg["randman_units"], _width(cfg, 128),
                                              cfg["randman_classes"], sg, bn=bn),
        help="random-manifold spike-timing task (generated, seeded)",
    ),
    "shd": Task(
        "shd", _load_shd, _encode_frames,
        lambda cfg, sg, bn: MLPNet(700, _width(cfg, 128), 20, sg,
                                   recurrent=cfg.get("recurrent", True), bn=bn),
        {"num_steps": 100, "epochs": 10, "batch_size": 32, "recurrent": True},
        build_sj=lambda cfg, sg, bn: SJMLPNet(700, _width(cfg, 128), 20, sg, bn=bn),
        has_bn=True, reference=_reference("shd_recurrent"),
        presets={"paper": {"epochs": 30, "batch_size": 32, "num_steps": 100,
                           "aux_weight": 1e-6}},
        help="Spiking Heidelberg Digits, tonic .h5 in --data-dir (100 bins x 14 ms x 700)",
    ),
    "cifar10": Task(
        "cifar10", _load_cifar, _encode_direct,
        lambda cfg, sg, bn: ConvNet(3, 10, _width(cfg, 16), sg, bn=bn),
        {"num_steps": 1, "epochs": 10, "batch_size": 64},
        build_sj=lambda cfg, sg, bn: SJConvNet(3, 10, _width(cfg, 16), sg, bn=bn),
        has_bn=True, reference=_reference("cifar_resnet25"),
        presets={"paper": {"epochs": 200, "batch_size": 256, "num_steps": 1,
                           "aux_weight": 1e-8}},
        help="CIFAR-10 python pickle batches in --data-dir, normalised RGB, direct input",
    ),
    "dvs-gesture": Task(
        "dvs-gesture", _load_dvs, _encode_frames,
        lambda cfg, sg, bn: ConvNet(2, 11, _width(cfg, 16), sg, bn=bn),
        {"num_steps": 16, "epochs": 10, "batch_size": 16, "frame_stride": 3},
        build_sj=lambda cfg, sg, bn: SJConvNet(2, 11, _width(cfg, 16), sg, bn=bn),
        has_bn=True, reference=_reference("dvs_resnet19"),
        presets={
            "paper": {"epochs": 70, "batch_size": 16, "num_steps": 49, "frame_stride": 1,
                      "aux_weight": 1e-10},
            "cpu": {"epochs": 30, "batch_size": 16, "num_steps": 16, "frame_stride": 3,
                    "width": 16, "mc_samples": 4},
        },
        help="DVS128 Gesture frames (dvs_gesture_32 layout) in --data-dir",
    ),
}

#: default methods of each preset (explicit --methods override)
PRESET_METHODS = {
    "paper": ["snntorch-gaussian", "sbnn-st", "sbnn-agr"],
    "cpu": ["snntorch-atan", "sbnn-agr"],
}
#: recipe shared by every task under a preset (task presets add to it)
PRESETS = {"paper": {"lr": 5e-3, "noise_lr": 5e-2, "use_reference": True},
           "cpu": {}}


def apply_preset(task_name: str, preset: str | None, cfg: dict) -> dict:
    """``cfg`` with the preset's defaults filled in where ``cfg`` has ``None``.

    Presets only set defaults; values given explicitly (not ``None``) win.

    Raises:
        ValueError: unknown preset, or a preset the task does not offer (``cpu`` is
            for ``dvs-gesture``).
    """
    if preset is None:
        return dict(cfg)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    task = TASKS[task_name]
    if preset != "paper" and preset not in task.presets:
        offered = sorted(t for t, tk in TASKS.items() if preset in tk.presets)
        raise ValueError(f"preset {preset!r} is not defined for task {task_name!r}; "
                         f"it exists for {offered}")
    out = dict(cfg)
    for k, v in {**PRESETS[preset], **task.presets.get(preset, {})}.items():
        if out.get(k) is None:
            out[k] = v
    return out


# --------------------------------------------------------------------------- models
def build_model(task: Task, method: Method, cfg: dict) -> nn.Module:
    """The task's network with the method's surrogate, converted for SBNN methods."""
    if method.bn and not task.has_bn:
        raise ValueError(f"method {method.name!r} (with BatchNorm) is offered for tasks with "
                         "normalisation in the reference (cifar10, dvs-gesture, shd), "
                         f"not {task.name!r}")
    if cfg.get("use_reference") and task.reference is not None:
        ref = _try_reference(task, method, cfg)
        if ref is not None:
            if method.is_sbnn and method.aux_weight > 0:
                from ..losses import enable_aux_loss

                enable_aux_loss(ref)
            return ref
    if method.framework == "spikingjelly":
        if task.build_sj is None:
            raise ValueError(f"method {method.name!r} is not offered for task {task.name!r}")
        model = task.build_sj(cfg, sj_surrogate(method.surrogate), method.bn)
        if method.is_sbnn:
            from ..spikingjelly import to_sbnn

            model = to_sbnn(model, estimator=method.estimator, learn_std=method.learn_std,
                            aux_loss=method.aux_weight > 0, inplace=True)
        return model
    sg = snntorch_surrogate("atan" if method.is_sbnn else method.surrogate)
    model = task.build(cfg, sg, method.bn)
    if method.is_sbnn:
        from ..snntorch import to_sbnn

        model = to_sbnn(
            model, estimator=method.estimator, learn_std=method.learn_std,
            aux_loss=method.aux_weight > 0, inplace=True,
        )
    return model


def _try_reference(task: Task, method: Method, cfg: dict) -> nn.Module | None:
    """The paper's reference network from :mod:`sbnn_addons.models`, if importable."""
    if method.framework != "snntorch":
        return None
    try:
        return task.reference(cfg, method)
    except (ImportError, AttributeError, TypeError, ValueError) as err:
        import warnings

        warnings.warn(f"task {task.name!r}: reference network unavailable ({err}); using the "
                      "small benchmark network", stacklevel=2)
        return None


def _optimizer(model: nn.Module, lr: float, noise_lr: float, total_steps: int):
    noise = [p for n, p in model.named_parameters() if n.endswith("std_rho")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("std_rho")]
    groups = [{"params": rest, "lr": lr}]
    if noise:
        groups.append({"params": noise, "lr": noise_lr})
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    return opt, sched


# --------------------------------------------------------------------------- distributed
def dist_info() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment (``1`` process if unset)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def init_distributed(device: str = "auto") -> tuple[int, int, torch.device]:
    """Initialise the process group when launched by ``torchrun`` (``WORLD_SIZE > 1``).

    Backend ``nccl`` when the run uses CUDA, ``gloo`` otherwise. Returns ``(rank, world,
    device)``; a single process returns ``(0, 1, device)`` without a process group.
    """
    rank, world, local = dist_info()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    dev = torch.device(f"cuda:{local % max(torch.cuda.device_count(), 1)}" if use_cuda
                       else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, dev


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# --------------------------------------------------------------------------- train / eval
@torch.no_grad()
def _predict(model, method, x_enc, batch_size, mc_samples, eval_mode, device):
    """Class probabilities for the samples of ``x_enc [T, N, ...]``, sharded over ranks."""
    rank, world = _world()
    n = x_enc.shape[1]
    chunk = math.ceil(n / world)
    lo, hi = min(rank * chunk, n), min((rank + 1) * chunk, n)
    probs = []
    for i in range(lo, hi, batch_size):
        xb = x_enc[:, i:min(i + batch_size, hi)].to(device, torch.float32)
        if method.is_sbnn and eval_mode == "mc":
            probs.append(mc_predict(lambda xb=xb: model(xb), model, mc_samples))
        elif method.is_sbnn:
            with mode(model, eval_mode):
                probs.append(torch.softmax(model(xb), -1))
        else:
            probs.append(torch.softmax(model(xb), -1))
    local = torch.cat(probs) if probs else None
    if world == 1:
        return local.cpu()
    # gather: pad every shard to `chunk` rows
    if local is None:
        k = torch.tensor([0], device=device)
    else:
        k = torch.tensor([local.shape[1]], device=device)
    dist.all_reduce(k, op=dist.ReduceOp.MAX)
    padded = torch.zeros(chunk, int(k.item()), device=device)
    if local is not None:
        padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    full = torch.cat([p[:max(0, min((r + 1) * chunk, n) - r * chunk)]
                      for r, p in enumerate(parts)])
    return full.cpu()


def _shard(perm: Tensor, rank: int, world: int) -> Tensor:
    """This rank's part of an epoch permutation (padded by wrap-around to equal lengths)."""
    if world == 1:
        return perm
    pad = (-len(perm)) % world
    return torch.cat([perm, perm[:pad]])[rank::world]


def _forward_params(output: Tensor) -> set[int]:
    """``id`` of every leaf tensor that ``output``'s autograd graph accumulates into."""
    seen, found, stack = set(), set(), [output.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None:
            found.add(id(var))
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return found


def _wrap_ddp(model: nn.Module, device: torch.device, cfg: dict, probe: Tensor):
    """Wrap ``model`` in ``DistributedDataParallel``; returns ``(ddp, ignored_params)``.

    Converted models keep their variance-tracking hooks (TorchFunctionMode) on the inner
    module, which DDP calls, so they work unchanged. Parameters outside the forward graph
    (e.g. the posterior std of the readout layer, whose variance no neuron consumes) are
    found with one probe forward on ``probe`` and left out of DDP: their gradient, when a
    loss term outside the forward gives one (the KL), is all-reduced by
    :func:`_sync_ignored`. Neuron state buffers change shape with the batch, so buffers
    are not synchronised after construction (BatchNorm statistics stay per process; rank
    0's are evaluated).
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    if cfg.get("find_unused_parameters"):
        ignored = []
    else:
        with torch.enable_grad():
            used = _forward_params(model(probe))
        aux_loss(model)  # drop aux terms the probe collected (they hold the probe's graph)
        ignored = [(n, p) for n, p in model.named_parameters()
                   if p.requires_grad and id(p) not in used]
        DDP._set_params_and_buffers_to_ignore_for_model(model, [n for n, _ in ignored])
    kwargs = {"find_unused_parameters": bool(cfg.get("find_unused_parameters", False))}
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        kwargs["forward_sync_buffers"] = False
    else:  # pragma: no cover - older torch
        kwargs["broadcast_buffers"] = False
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **kwargs)
    return ddp, [p for _, p in ignored]


def _sync_ignored(params: list[Tensor]) -> None:
    """Average the gradients of the parameters left out of DDP over the processes."""
    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)


def _check_in_sync(model: nn.Module) -> None:
    """Raise if the processes' parameters differ (DDP keeps them identical)."""
    with torch.no_grad():
        total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    hi, lo = total.clone().reshape(1), total.clone().reshape(1)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    if not torch.isclose(hi, lo, rtol=1e-9, atol=1e-9).all():
        raise RuntimeError(f"parameters differ across processes after training ({hi} vs {lo})")


def run_one(task_name: str, method_name: str, seed: int, cfg: dict, progress=None,
            keep_model: bool = False) -> dict:
    """Train and evaluate one (task, method, seed); returns a result row with curves.

    With ``keep_model=True`` the trained model (in eval mode) is returned under the row's
    private key ``"_model"``, for further evaluation (e.g. ``benchmarks/dvs_uncertainty.py``).

    Inside a ``torchrun`` launch (process group initialised) the training batches are
    sharded over the processes and the model is wrapped in ``DistributedDataParallel``;
    every process returns the same row.
    """
    if task_name not in TASKS:
        raise ValueError(f"unknown task {task_name!r}; choose from {sorted(TASKS)}")
    if method_name not in METHODS:
        raise ValueError(f"unknown method {method_name!r}; choose from {sorted(METHODS)}")
    task, method = TASKS[task_name], METHODS[method_name]
    cfg = {"lr": 5e-3, "noise_lr": 5e-2, "mc_samples": 10, **task.defaults,
           **{k: v for k, v in cfg.items() if v is not None}}
    if method.framework == "ep":
        return _run_ep(task_name, method_name, seed, cfg, progress)
    rank, world = _world()
    device = torch.device(cfg.get("device") or "cpu")
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = task.load(cfg)
    model = build_model(task, method, cfg).to(device)
    seed_spikes(model, seed + 7919 * rank)
    ignored: list[Tensor] = []
    net = model
    if world > 1:
        probe = task.encode(xtr[:2], cfg["num_steps"], torch.Generator().manual_seed(0))
        net, ignored = _wrap_ddp(model, device, cfg, probe.to(device, torch.float32))
    aux_w = (cfg.get("aux_weight") or method.aux_weight) if method.aux_weight > 0 else 0.0
    n_train, bs = len(ytr), cfg["batch_size"]
    steps_per_epoch = math.ceil(math.ceil(n_train / world) / bs)
    opt, sched = _optimizer(model, cfg["lr"], cfg["noise_lr"], cfg["epochs"] * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)  # permutation: identical on every rank
    enc_gen = gen if world == 1 else torch.Generator().manual_seed(seed * 1000 + rank + 1)
    test_gen = torch.Generator().manual_seed(12345)  # identical test encoding for all methods
    x_test = task.encode(xte, cfg["num_steps"], test_gen)
    curve, train_time = [], 0.0
    for epoch in range(cfg["epochs"]):
        model.train()
        idx_all = _shard(torch.randperm(n_train, generator=gen), rank, world)
        total, count = torch.zeros(2, dtype=torch.float64), 0
        t0 = time.perf_counter()
        for i in range(0, len(idx_all), bs):
            idx = idx_all[i:i + bs]
            xb = task.encode(xtr[idx], cfg["num_steps"], enc_gen).to(device, torch.float32)
            yb = ytr[idx].to(device)
            nll = F.cross_entropy(net(xb), yb)
            if method.is_sbnn:
                loss = sbnn_objective(nll, model, n_train, kl_weight=method.kl_weight,
                                      aux_weight=aux_w)
            else:
                loss = nll
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if ignored:
                _sync_ignored(ignored)
            opt.step()
            sched.step()
            total[0] += loss.item() * len(idx)
            count += len(idx)
        total[1] = count
        elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(total)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        train_time += float(elapsed)
        model.eval()
        quick = _predict(model, method, x_test, 256, 1, "mean" if method.is_sbnn else "n/a",
                         device)
        curve.append({"epoch": epoch + 1, "train_loss": float(total[0] / total[1]),
                      "test_accuracy": float((quick.argmax(-1) == yte).float().mean())})
        if progress is not None:
            progress.update(1)
    if world > 1:
        _check_in_sync(model)
    model.eval()
    probs = _predict(model, method, x_test, 256, cfg["mc_samples"], "mc", device)
    row = {"task": task_name, "method": method_name, "seed": seed,
           "epochs": cfg["epochs"], "num_steps": cfg["num_steps"],
           "train_time_s": train_time,
           **classification_metrics(probs, yte)}
    if method.is_sbnn:
        mean_probs = _predict(model, method, x_test, 256, 1, "mean", device)
        row["accuracy_mean_mode"] = float((mean_probs.argmax(-1) == yte).float().mean())
        row["eval"] = f"mc({cfg['mc_samples']})"
    else:
        row["accuracy_mean_mode"] = row["accuracy"]
        row["eval"] = "deterministic"
    row["world_size"] = world
    row["model"] = type(getattr(model, "net", model)).__name__
    row["curve"] = curve
    row["_probs"] = probs
    row["_targets"] = yte
    if keep_model:
        row["_model"] = model
    return row


def _run_ep(task_name: str, method_name: str, seed: int, cfg: dict, progress=None) -> dict:
    """The ``ep`` methods: :func:`sbnn_addons.ep.bench_task` on the task's data and code.

    ``digits``: the same rate code as the other methods, averaged over time; ``randman``:
    the same spike trains, reduced to first-spike latencies. ``--width`` sets the hidden
    width (default 100). ``ep-binary`` uses binary +-1 weights (``weights="binary"``).
    Other tasks raise ``ValueError``.
    """
    from ..ep import BENCH_TASKS, bench_task

    if task_name not in BENCH_TASKS:
        raise ValueError(f"method {method_name!r} supports the tasks {list(BENCH_TASKS)} only, "
                         f"got {task_name!r}")
    if _world()[1] > 1:
        raise ValueError(f"method {method_name!r} runs in a single process; drop torchrun")
    weights = "binary" if method_name == "ep-binary" else "gaussian"
    row = bench_task(task_name, seed, epochs=EP_PASSES, num_steps=cfg["num_steps"],
                     hidden=(_width(cfg, 100),), mc_samples=cfg["mc_samples"],
                     split_seed=cfg.get("split_seed", 0), cfg=cfg, weights=weights)
    row["method"] = method_name
    if progress is not None:
        progress.update(cfg["epochs"])
    return row


def run_grid(tasks, methods, seeds, cfg: dict, progress_factory=None,
             preset: str | None = None) -> list[dict]:
    """Run every (task, method, seed); ``progress_factory(total)`` makes a progress bar.

    ``preset`` (``"paper"``, ``"cpu"``) fills in defaults per task (see
    :func:`apply_preset`); explicit values in ``cfg`` win.
    """
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; choose from {sorted(TASKS)}")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {sorted(METHODS)}")
    cfgs = {t: apply_preset(t, preset, cfg) for t in tasks}
    for t in tasks:  # data_dir may be {task: folder}
        if isinstance(cfgs[t].get("data_dir"), dict):
            cfgs[t]["data_dir"] = cfgs[t]["data_dir"].get(t)
    total = sum({**TASKS[t].defaults, **{k: v for k, v in cfgs[t].items() if v is not None}}
                ["epochs"] for t in tasks) * len(methods) * len(seeds)
    bar = progress_factory(total) if progress_factory else None
    rows = []
    try:
        for t in tasks:
            for m in methods:
                for s in seeds:
                    rows.append(run_one(t, m, s, copy.deepcopy(cfgs[t]), bar))
    finally:
        if bar is not None:
            bar.close()
    return rows
