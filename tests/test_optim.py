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


def test_weight_decay_never_touches_the_noise_scales():
    """AdamW / SGD weight decay would pull rho towards 0, i.e. every small std towards
    softplus(0) = 0.69: the noise group has weight_decay 0 (the weights keep theirs)."""
    import sbnn_addons as sb

    model = torch.nn.Sequential(sb.BayesLinear(8, 4, std=0.01), sb.IWSTSpike("st", std=0.4,
                                                                            learn_std=True))
    stds = [float(model[0].std), float(model[1].std)]
    weight = model[0].weight.detach().clone()
    opt = torch.optim.AdamW(sb.param_groups(model, lr=1e-2), weight_decay=0.5)
    for _ in range(50):  # no gradient: only the decay acts
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    assert [float(model[0].std), float(model[1].std)] == pytest.approx(stds)
    assert model[0].weight.abs().sum() < weight.abs().sum()  # the weights did decay


def test_parametrized_noise_scale_stays_in_the_noise_group():
    """``torch.nn.utils.parametrize`` on ``std_rho`` renames the parameter
    ``parametrizations.std_rho.original``: it is still a noise scale (it went to the
    weights' group at the weights' learning rate, and ``noise_parameters`` missed it)."""
    from torch.nn.utils import parametrize

    class Same(nn.Module):
        def forward(self, rho):
            return rho

    net = _net()
    parametrize.register_parametrization(net[0], "std_rho", Same())
    parametrize.register_parametrization(net[0], "weight", Same())
    names = {id(p): n for n, p in net.named_parameters()}
    groups = sb.param_groups(net, lr=1e-3, noise_lr=1e-2)
    noise = {names[id(p)] for p in groups[1]["params"]}
    assert noise == {"0.parametrizations.std_rho.original", "0.bias_std_rho",
                     "1.spike_fn.std_rho"}
    assert "0.parametrizations.weight.original" in {names[id(p)] for p in groups[0]["params"]}
    assert noise == {names[id(p)] for p in sb.noise_parameters(net)}


def test_weight_decay_on_the_noise_scales_warns_once():
    """``AdamW(model.parameters())`` (``weight_decay=0.01`` by default) or SGD with weight
    decay puts the noise scales in a decayed group: every ``rho`` was pulled towards 0,
    every small std up towards ``softplus(0) = 0.69``, without a word. The first step of
    such an optimiser warns (once), naming ``param_groups``; the groups of
    ``param_groups``, a decay-free optimiser and a model's deep copy behave as they
    should."""
    import copy
    import warnings

    import snntorch as snn

    from sbnn_addons.snntorch import reset, to_sbnn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), snn.Leaky(beta=0.9, init_hidden=True),
                        nn.Linear(5, 3), snn.Leaky(beta=0.9, init_hidden=True, output=True))
    model = to_sbnn(net)
    x = torch.rand(4, 6)

    def step(opt, m=model):
        reset(m)
        m(x)[1].sum().backward()
        opt.step()
        opt.zero_grad()

    # (2: the readout's std and the output neuron's get no gradient, so no decay, here)
    with pytest.warns(UserWarning, match=r"AdamW group 0 applies weight_decay=0\.01 to 2 "
                                         r"noise scale.*softplus\(0\).*param_groups"):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        step(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(opt)  # once per optimiser
        step(torch.optim.AdamW(sb.param_groups(model, lr=1e-3), weight_decay=0.1))
        step(torch.optim.Adam(model.parameters(), lr=1e-3))
        reset(model)
        frozen = copy.deepcopy(model)
        for p in sb.noise_parameters(frozen):
            p.requires_grad_(False)  # frozen stds get no gradient and no decay
        step(torch.optim.AdamW(frozen.parameters(), lr=1e-3), frozen)
    with pytest.warns(UserWarning, match=r"SGD group 0 applies weight_decay"):
        reset(model)
        dup = copy.deepcopy(model)  # a copy's noise scales too
        step(torch.optim.SGD(dup.parameters(), lr=1e-3, weight_decay=1e-4), dup)
