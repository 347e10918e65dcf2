"""``param_groups`` / ``noise_parameters``: the two learning rates of an SBNN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sbnn_addons as sb


def _net() -> nn.Module:
    return nn.Sequential(sb.BayesLinear(4, 3, bias_std=0.1), sb.LIF(
        spike_fn=sb.IWSTSpike(std=0.3, learn_std=True)), nn.Linear(3, 2))


def test_groups_split_noise_scales_from_weights():
    net = _net()
    groups = sb.param_groups(net, lr=1e-3)
    assert [g["name"] for g in groups] == ["weights", "noise"]
    assert groups[0]["lr"] == 1e-3 and groups[1]["lr"] == 1e-3  # default: noise_lr = lr
    names = {id(p): n for n, p in net.named_parameters()}
    noise = {names[id(p)] for p in groups[1]["params"]}
    assert noise == {"0.std_rho", "0.bias_std_rho", "1.spike_fn.std_rho"}
    assert noise == {names[id(p)] for p in sb.noise_parameters(net)}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(net.parameters()))
    torch.optim.Adam(groups).step()  # a valid optimiser argument


def test_plain_model_has_one_group_and_frozen_parameters_are_left_out():
    net = nn.Linear(3, 2)
    net.bias.requires_grad_(False)
    groups = sb.param_groups(net, lr=0.1, noise_lr=0.5)
    assert [g["name"] for g in groups] == ["weights"] and len(groups[0]["params"]) == 1


@pytest.mark.parametrize("kwargs, word", [
    (dict(lr=0.0), "lr"), (dict(lr=-1e-3), "lr"), (dict(lr=float("nan")), "lr"),
    (dict(lr=float("inf")), "lr"), (dict(lr=True), "lr"), (dict(lr="1e-3"), "lr"),
    (dict(lr=1e-3, noise_lr=0.0), "noise_lr"),
])
def test_bad_learning_rates_are_named(kwargs, word):
    with pytest.raises(ValueError, match=word):
        sb.param_groups(_net(), **kwargs)


def test_model_without_trainable_parameters_raises():
    net = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        sb.param_groups(net, lr=1e-3)
