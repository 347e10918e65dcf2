"""The released training recipe of the reference experiments (Method page, section 8.1)."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from ..base import check_module
from ..layers import ChannelAffine
from ..optim import _check_lr, is_noise_parameter
from ._common import StepAffine

__all__ = ["PAPER_CONFIGS", "paper_recipe", "paper_lr_factor"]

#: Released configuration per task: epochs, batch size, auxiliary-loss weight, and the
#: learning-rate floor of the per-epoch cosine as a fraction of the initial rate.
PAPER_CONFIGS: dict[str, dict[str, float]] = {
    "cifar10": {"epochs": 200, "batch_size": 256, "aux_weight": 1e-8, "lr_floor": 0.0},
    "dvs_gesture": {"epochs": 70, "batch_size": 16, "aux_weight": 1e-10, "lr_floor": 1 / 50},
    "shd": {"epochs": 30, "batch_size": 32, "aux_weight": 1e-6, "lr_floor": 1 / 10},
}


def paper_lr_factor(epoch: int, epochs: int, floor: float) -> float:
    """Cosine factor of epoch ``e`` from 1 down to ``floor`` over ``E`` epochs.

    .. code-block:: text

        lr_e / lr_0 = floor + (1 - floor) * (1 + cos(pi * e / E)) / 2

    Raises:
        ValueError: ``epochs`` not an integer >= 1 (a division by zero), or ``floor`` not
            in ``[0, 1]`` (a factor above 1 or below 0: a learning rate that grows or
            turns negative, silently).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor <= 1:
        raise ValueError(f"floor must be a number in [0, 1] (a fraction of the initial "
                         f"learning rate), got {floor!r}")
    e = min(max(int(epoch), 0), int(epochs))
    return floor + (1.0 - floor) * (1.0 + math.cos(math.pi * e / epochs)) / 2.0


def paper_recipe(
    model: nn.Module,
    task: str,
    epochs: int | None = None,
    *,
    lr: float = 5e-3,
    noise_lr: float = 5e-2,
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR]:
    """Adam with the released two learning-rate groups and the per-epoch cosine with floor.

    .. code-block:: text

        group "weights": lr_0 = 5e-3   weights, biases (and, on DVS / CIFAR-10, affines)
        group "noise":   lr_0 = 5e-2   noise scales *std_rho (s_l, s_rec, s_n / s_b);
                                      on SHD also the affine scales and shifts
        lr_e = lr_min + (lr_0 - lr_min) (1 + cos(pi e / E)) / 2,  lr_min = floor * lr_0
        floor: 1/50 (DVS Gesture), 1/10 (SHD), 0 (CIFAR-10)

    No weight decay and no KL (the parity default of the Method page, section 6).

    Args:
        model: the network.
        task: ``"cifar10"``, ``"dvs_gesture"`` or ``"shd"`` (see :data:`PAPER_CONFIGS`).
        epochs: ``E``, the length of the cosine (default: the task's released epochs).
        lr: initial learning rate of the weights.
        noise_lr: initial learning rate of the noise scales.

    Returns:
        ``(optimizer, scheduler)``; call ``scheduler.step()`` once at the end of every
        **epoch** (not every batch).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: an unknown ``task``, a reference network of another task, ``epochs``
            not an integer >= 1, ``lr`` / ``noise_lr`` not a finite number > 0 (Adam
            does not check a group's rate: a negative one ascends the loss, NaN makes
            every parameter NaN), or a model without trainable parameters (Adam would
            take an empty group and train nothing).
    """
    check_module(model, "paper_recipe")
    _check_lr("lr", lr)
    _check_lr("noise_lr", noise_lr)
    if task not in PAPER_CONFIGS:
        raise ValueError(f"task must be one of {tuple(PAPER_CONFIGS)}, got {task!r}")
    from .recurrent import SHDRecurrentNet
    from .resnet import BinaryResNet, DVSResNet

    for cls, own in ((SHDRecurrentNet, "shd"), (DVSResNet, "dvs_gesture"),
                     (BinaryResNet, "cifar10")):
        if isinstance(model, cls) and task != own:  # the groups and floor differ per task
            raise ValueError(f"model is a {cls.__name__}, the {own!r} reference network, "
                             f"but task is {task!r}: pass task={own!r}")
    config = PAPER_CONFIGS[task]
    epochs = int(config["epochs"]) if epochs is None else epochs
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    # the released SHD script trains the affine scales and shifts at the noise rate
    affines = {id(p) for m in model.modules() if isinstance(m, (ChannelAffine, StepAffine))
               for p in m.parameters()} if task == "shd" else set()
    noise, weights = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            fast = is_noise_parameter(name) or id(p) in affines
            (noise if fast else weights).append(p)
    if not weights and not noise:  # Adam would take the empty group and train nothing
        raise ValueError("the model has no trainable parameters (all have "
                         "requires_grad=False): unfreeze what should train, e.g. "
                         "model.requires_grad_(True), before paper_recipe(model, ...)")
    groups = [{"params": weights, "lr": lr, "name": "weights"}]
    if noise:
        groups.append({"params": noise, "lr": noise_lr, "name": "noise"})
    optimizer = torch.optim.Adam(groups)
    floor = float(config["lr_floor"])
    # a partial, not a lambda: the scheduler pickles (torch.save of the whole object)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(paper_lr_factor, epochs=epochs, floor=floor))
    return optimizer, scheduler
