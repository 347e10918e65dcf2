"""The reference optimiser of the Method page, section 8."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PAPER_CONFIGS", "paper_recipe"]

#: Released configuration per task: epochs, batch size, auxiliary-loss weight (Method page,
#: sections 5 and 8).
PAPER_CONFIGS: dict[str, dict[str, float]] = {
    "cifar10": {"epochs": 200, "batch_size": 256, "aux_weight": 1e-8},
    "dvs_gesture": {"epochs": 70, "batch_size": 16, "aux_weight": 1e-10},
    "shd": {"epochs": 30, "batch_size": 32, "aux_weight": 1e-6},
}

_NOISE_SUFFIX = "std_rho"


def paper_recipe(
    model: nn.Module,
    task: str,
    total_steps: int | None = None,
    *,
    steps_per_epoch: int | None = None,
    lr: float = 5e-3,
    noise_lr: float = 5e-2,
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.CosineAnnealingLR]:
    """Adam with two learning rates and cosine decay (the released configuration).

    .. code-block:: text

        lr = 5e-3  for weights, biases, affine parameters
        lr = 5e-2  for noise scales (parameters named ``*std_rho``: s_l, s_rec, s_b, s_n)
        lr_k = lr_0 * (1 + cos(pi * k / total_steps)) / 2     (stepped once per batch)

    No weight decay and no KL (the parity default of the Method page, section 6).

    Args:
        model: the network.
        task: ``"cifar10"``, ``"dvs_gesture"`` or ``"shd"`` (selects the epoch count used
            when ``total_steps`` is not given; see :data:`PAPER_CONFIGS`).
        total_steps: number of optimiser steps of the whole run (scheduler horizon).
        steps_per_epoch: used with the task's epoch count when ``total_steps`` is ``None``.
        lr: learning rate of the weights.
        noise_lr: learning rate of the noise scales.

    Returns:
        ``(optimizer, scheduler)``; call ``scheduler.step()`` after every ``optimizer.step()``.
    """
    if task not in PAPER_CONFIGS:
        raise ValueError(f"task must be one of {tuple(PAPER_CONFIGS)}, got {task!r}")
    if total_steps is None:
        if steps_per_epoch is None:
            raise ValueError("pass total_steps, or steps_per_epoch (times the task's epochs)")
        total_steps = int(PAPER_CONFIGS[task]["epochs"]) * int(steps_per_epoch)
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    noise, weights = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (noise if name.endswith(_NOISE_SUFFIX) else weights).append(p)
    groups = [{"params": weights, "lr": lr, "name": "weights"}]
    if noise:
        groups.append({"params": noise, "lr": noise_lr, "name": "noise"})
    optimizer = torch.optim.Adam(groups)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return optimizer, scheduler
