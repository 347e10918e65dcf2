"""``param_groups`` / ``noise_parameters``: the two learning rates of an SBNN."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import sbnn_addons as sb
from sbnn_addons.optim import is_noise_parameter


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


@pytest.mark.parametrize("host", ["snntorch", "spikingjelly"])
def test_sgd_training_noise_scales_with_the_weights_warns_once(host):
    """``SGD(model.parameters(), lr=0.1, momentum=0.9)`` (SpikingJelly's ImageNet recipe)
    on a converted model trains each shared noise scale at the weights' learning rate,
    though its gradient sums over every unit of its layer: a SEW-ResNet-18's stds drifted
    and training diverged, without a word. The first step warns (once per optimiser),
    naming ``param_groups``; noise scales in a group of their own, Adam, ``lr=0`` and
    frozen stds do not warn."""
    import warnings

    build, forward, to_sbnn = _host(host)
    torch.manual_seed(0)
    model = to_sbnn(build())
    x = torch.rand(3, 4, 8)

    def step(opt, m=model):
        opt.zero_grad()
        forward(m, x).sum().backward()
        opt.step()

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.warns(UserWarning, match=r"SGD group 0 trains \d+ noise scale\(s\) .*"
                                         r"lr=0\.1.*sum over.*param_groups\(model"):
        step(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(opt)  # once per optimiser
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        step(opt)
        scheduler.step()
        step(opt)  # also after a scheduler changed its learning rate
        step(torch.optim.SGD(sb.param_groups(model, lr=0.1, noise_lr=1e-4), lr=0.1,
                             momentum=0.9))
        step(torch.optim.Adam(model.parameters(), lr=1e-3))
        step(torch.optim.SGD(model.parameters(), lr=0.0))
        for p in sb.noise_parameters(model):
            p.requires_grad_(False)
            p.grad = None
        step(torch.optim.SGD(model.parameters(), lr=0.1))


def _steps(model, opt, x, forward, steps=3, extra=None) -> list[str]:
    """``steps`` training steps (``extra()`` after each ``opt.step()``); the messages of
    the left-out-noise warnings they raised."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            opt.zero_grad()
            forward(model, x).sum().backward()
            opt.step()
            if extra is not None:
                extra()
    return [str(w.message) for w in caught if "never train" in str(w.message)]


def _host(host: str):
    """``(build, forward, to_sbnn)`` of a small host network of ``host``."""
    if host == "snntorch":
        import snntorch as snn
        from snntorch import utils

        from sbnn_addons.snntorch import to_sbnn

        def build():
            return nn.Sequential(nn.Linear(8, 6), snn.Leaky(beta=0.9, init_hidden=True),
                                 nn.Linear(6, 4), snn.Leaky(beta=0.9, init_hidden=True))

        def forward(net, x):
            utils.reset(net)
            return torch.stack([net(x_t) for x_t in x])
    else:
        from spikingjelly.activation_based import functional, layer, neuron

        from sbnn_addons.spikingjelly import to_sbnn

        def build():
            net = nn.Sequential(layer.Linear(8, 6), neuron.LIFNode(), layer.Linear(6, 4),
                                neuron.LIFNode())
            functional.set_step_mode(net, "m")
            return net

        def forward(net, x):
            functional.reset_net(net)
            return net(x)
    return build, forward, to_sbnn


@pytest.mark.parametrize("host", ["snntorch", "spikingjelly"])
def test_optimiser_built_before_an_inplace_conversion_warns(host):
    """``opt = Adam(net.parameters()); to_sbnn(net, inplace=True)``: the converted weights
    are the same parameters, so training ran, but the new noise scales (the layers'
    ``std_rho`` and the neurons' spike stds) were in no optimiser: they got gradients
    and never moved, silently. The optimiser warns once, with the number left out and
    the fix; built after the conversion (or from ``param_groups``), it is quiet."""
    build, forward, to_sbnn = _host(host)
    x = torch.rand(3, 4, 8) * 3
    torch.manual_seed(0)
    net = build()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    to_sbnn(net, inplace=True)
    stds = {n: p.detach().clone() for n, p in net.named_parameters()
            if is_noise_parameter(n)}
    found = _steps(net, opt, x, forward, steps=4)
    with_grad = [n for n, p in net.named_parameters() if n in stds and p.grad is not None]
    assert len(found) == 1, found  # once per optimiser
    assert f"Adam steps the weights of a Bayesian model but not {len(with_grad)} " in found[0]
    assert len(with_grad) >= 2 and any("spike" in n or "surrogate" in n for n in with_grad)
    assert "param_groups(model, lr=..., noise_lr=...)" in found[0]
    assert "add_param_group" in found[0] and "requires_grad_(False)" in found[0]
    assert all(torch.equal(p, stds[n]) for n, p in net.named_parameters() if n in stds)
    for make in (lambda m: m.parameters(), lambda m: sb.param_groups(m, lr=1e-2)):
        torch.manual_seed(0)
        net = to_sbnn(build())
        assert _steps(net, torch.optim.Adam(make(net), lr=1e-2), x, forward) == []


@pytest.mark.parametrize("host", ["snntorch", "spikingjelly"])
def test_optimiser_of_the_model_a_conversion_copied_warns(host):
    """``opt = Adam(net.parameters()); net = to_sbnn(net)`` (the line a host training
    script gets to port it): ``to_sbnn`` converts a copy, so the optimiser holds the
    original's parameters, which get no gradient, and the converted model never trained
    (neither its weights nor its noise scales), silently. The optimiser warns once,
    naming the fix; the original trained beside the converted model (each with its own
    optimiser, also one stepped without a backward) is quiet."""
    import warnings

    build, forward, to_sbnn = _host(host)
    x = torch.rand(3, 4, 8) * 3
    torch.manual_seed(0)
    net = build()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net = to_sbnn(net)
    before = [p.detach().clone() for p in net.parameters()]
    found = _steps(net, opt, x, forward, steps=4)
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))  # untrained
    assert len(found) == 1, found  # once per optimiser
    assert "Adam steps the parameters of the model that to_sbnn converted a copy of" in found[0]
    assert "param_groups(model" in found[0] and "inplace=True" in found[0]

    torch.manual_seed(0)
    host_net = build()
    model = to_sbnn(host_net)
    host_opt = torch.optim.Adam(host_net.parameters(), lr=1e-2)
    opt = torch.optim.Adam(sb.param_groups(model, lr=1e-2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            for m, o in ((host_net, host_opt), (model, opt)):
                o.zero_grad()
                forward(m, x).sum().backward()
                o.step()
        host_opt.zero_grad()
        host_opt.step()  # a step without a backward: nothing was trained wrongly
    assert not [w for w in caught if "never train" in str(w.message)]


def test_optimiser_of_a_weights_filter_warns_for_core_layers():
    """``Adam([p for n, p in model.named_parameters() if 'weight' in n])`` on a core
    model: the layer's ``std_rho`` and ``bias_std_rho`` and the spike function's std
    are left out; the warning counts all three."""
    torch.manual_seed(0)
    model = sb.track_variance(nn.Sequential(
        sb.BayesLinear(4, 3, std=0.3, bias_std=0.1), sb.IWSTSpike("st", std=0.3,
                                                                   learn_std=True)))
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if "weight" in n])
    found = _steps(model, opt, torch.rand(5, 4) * 3, lambda m, x: m(x))
    assert len(found) == 1 and "not 3 of its noise scale" in found[0], found
    assert "BayesLinear.bias_std_rho" in found[0] and "IWSTSpike.std_rho" in found[0]


def test_left_out_noise_check_raises_no_false_alarm():
    """Quiet: the noise scales in a second optimiser (stepped before or after the
    first, or made later than the first); frozen stds; a group with ``lr=0``; stds
    stepped by hand; a parametrized std in ``param_groups``; the stale gradient of
    another model; gradient accumulation (no step)."""
    import copy

    from torch.nn.utils import parametrize

    from sbnn_addons.snntorch import to_sbnn

    build, forward, _ = _host("snntorch")
    x = torch.rand(3, 4, 8) * 3

    def fresh():
        torch.manual_seed(0)
        return to_sbnn(build())

    def weights(m):
        return [p for n, p in m.named_parameters() if not is_noise_parameter(n)]

    for first in (True, False):  # the noise optimiser stepped after / before the other
        net = fresh()
        opts = [torch.optim.Adam(weights(net)),
                torch.optim.Adam(sb.noise_parameters(net), lr=1e-2)]
        opt, other = opts if first else opts[::-1]
        assert _steps(net, opt, x, forward, extra=other.step) == []
        assert opts[1].state  # the noise scales did train
    net = fresh()
    later = []  # the noise optimiser made after the first step of the other
    assert _steps(net, torch.optim.Adam(weights(net)), x, forward, extra=lambda: (
        later or later.append(torch.optim.SGD(sb.noise_parameters(net), lr=1e-2)),
        later[0].step())) == []
    net = fresh()
    for p in sb.noise_parameters(net):
        p.requires_grad_(False)
    assert _steps(net, torch.optim.Adam(weights(net)), x, forward) == []
    net = fresh()
    opt = torch.optim.SGD([{"params": weights(net)},
                           {"params": list(sb.noise_parameters(net)), "lr": 0.0}], lr=0.1)
    assert _steps(net, opt, x, forward) == []

    def by_hand(m):
        with torch.no_grad():
            for p in sb.noise_parameters(m):
                if p.grad is not None:
                    p -= 1e-3 * p.grad

    net = fresh()
    assert _steps(net, torch.optim.Adam(weights(net)), x, forward,
                  extra=lambda: by_hand(net)) == []

    class Same(nn.Module):
        def forward(self, rho):
            return rho

    net = fresh()
    parametrize.register_parametrization(net[0], "std_rho", Same())
    assert _steps(net, torch.optim.Adam(sb.param_groups(net, lr=1e-3)), x, forward) == []
    net = fresh()
    stale = copy.deepcopy(net)  # a gradient once, then never again: not trained along
    forward(stale, x).sum().backward()
    assert _steps(net, torch.optim.Adam(net.parameters()), x, forward) == []
    net = fresh()
    opt = torch.optim.Adam(net.parameters())
    for _ in range(3):  # accumulation: no step of any optimiser, nothing to check
        forward(net, x).sum().backward()
    assert _steps(net, opt, x, forward) == []


def _sgd_warnings(model, opt, x, forward, steps=1, before=None) -> list[str]:
    """``steps`` SGD steps (``before(i)`` ahead of step ``i``); the messages of the
    noise-scale step warnings they raised."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(steps):
            if before is not None:
                before(i)
            opt.zero_grad()
            forward(model, x).sum().backward()
            opt.step()
    return [str(w.message) for w in caught if "noise scale(s) (*std_rho)" in str(w.message)
            and "trains" in str(w.message) and "SGD" in str(w.message)]


@pytest.mark.parametrize("host", ["snntorch", "spikingjelly"])
def test_sgd_noise_warning_only_where_weights_and_noise_train_together(host):
    """Only the noise scales train (the weights frozen): the group's learning rate is
    theirs alone, no warning (a false alarm before). Noise scales frozen at first and
    unfrozen later (the group unchanged) warn at the first step they train with the
    weights (missed before: the groups were looked at once)."""
    build, forward, to_sbnn = _host(host)
    torch.manual_seed(0)
    x = torch.rand(3, 4, 8)
    model = to_sbnn(build())
    for name, p in model.named_parameters():
        p.requires_grad_(is_noise_parameter(name))
    assert _sgd_warnings(model, torch.optim.SGD(model.parameters(), lr=1e-3), x, forward,
                         steps=2) == []
    model = to_sbnn(build())
    noise = list(sb.noise_parameters(model))
    for p in noise:
        p.requires_grad_(False)

    def unfreeze(i):
        if i == 2:
            for p in noise:
                p.requires_grad_(True)

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    found = _sgd_warnings(model, opt, x, forward, steps=4, before=unfreeze)
    assert len(found) == 1 and f"trains {len(noise)} noise scale(s)" in found[0]


def test_sgd_noise_warning_not_for_per_weight_stds():
    """A mean-field layer (``std_mode="weight"``, a std per weight) shares no std, its
    gradient is a weight's: SGD at the weights' rate is no warning (a false alarm before);
    its ``bias_std`` (one for the whole bias) still is."""
    class Net(nn.Module):
        def __init__(self, **kwargs):
            super().__init__()
            self.fc = sb.BayesLinear(8, 6, std_mode="weight", **kwargs)
            self.lif = sb.LIF(spike_fn=sb.IWSTSpike(std=0.3))
            self.out = nn.Linear(6, 4)

        def forward(self, x):
            return self.out(self.lif(self.fc(x))[0])

    def forward(net, x):
        return net(x)

    x = torch.rand(4, 8)
    net = Net()
    assert net.fc.std_rho.shape == net.fc.weight.shape
    assert _sgd_warnings(net, torch.optim.SGD(net.parameters(), lr=0.1), x, forward) == []
    net = Net(bias_std=0.1)
    found = _sgd_warnings(net, torch.optim.SGD(net.parameters(), lr=0.1), x, forward)
    assert len(found) == 1 and "trains 1 noise scale(s)" in found[0]


def test_sgd_noise_check_does_not_rescan_at_every_scheduler_step(monkeypatch):
    """The recommended setup (noise scales in a group of their own) with a learning rate
    changed at every step (a cosine or one-cycle schedule): the check looked at every
    parameter again at every step, as the learning rate was part of its key."""
    import sbnn_addons.optim as optim

    build, forward, to_sbnn = _host("spikingjelly")
    model = to_sbnn(build())
    opt = torch.optim.SGD(sb.param_groups(model, lr=0.1, noise_lr=1e-4), lr=0.1,
                          momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
    x = torch.rand(3, 4, 8)
    scans, inside = [], []
    real, check = optim.is_noise_parameter, optim.check_noise_step

    def counted(name):
        if inside:
            scans.append(name)
        return real(name)

    def checked(optimizer):
        inside.append(True)
        try:
            check(optimizer)
        finally:
            inside.pop()

    monkeypatch.setattr(optim, "is_noise_parameter", counted)
    monkeypatch.setattr(optim, "check_noise_step", checked)
    seen = []

    def before(i):
        if i:
            scheduler.step()
        seen.append(len(scans))

    assert _sgd_warnings(model, opt, x, forward, steps=5, before=before) == []
    assert len(set(seen[1:] + [len(scans)])) == 1  # the first step's scans, then none


@pytest.mark.parametrize("host", ["snntorch", "spikingjelly"])
def test_sgd_noise_group_as_fast_as_the_weights_warns(host):
    """``SGD(sb.param_groups(model, lr=0.1), momentum=0.9)``: the noise scales have a
    group of their own, but ``noise_lr`` defaults to ``lr``, so they train at the
    weights' rate, as in one group, and drift the same way: not a word before. A rate
    below the weights' is no warning."""
    build, forward, to_sbnn = _host(host)
    torch.manual_seed(0)
    model = to_sbnn(build())
    x = torch.rand(3, 4, 8)
    opt = torch.optim.SGD(sb.param_groups(model, lr=0.1), momentum=0.9)
    found = _sgd_warnings(model, opt, x, forward, steps=2)
    assert len(found) == 1 and re.search(
        r"SGD group 1 trains \d+ noise scale\(s\) .*at lr=0\.1, not below the weights' "
        r"\(group 0, lr=0\.1\).*noise_lr=1e-4", found[0])
    opt = torch.optim.SGD(sb.param_groups(model, lr=0.1, noise_lr=1e-3), momentum=0.9)
    assert _sgd_warnings(model, opt, x, forward, steps=2) == []


def _train(pairs, x, forward, steps, zero):
    """``steps`` steps of each ``(model, optimiser)``: ``zero`` is ``"none"`` (no
    ``zero_grad``), ``"zeros"`` (``set_to_none=False``) or ``"none_grads"`` (default);
    the messages of the warnings about a converted copy."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            for model, opt in pairs:
                if zero != "none":
                    opt.zero_grad(set_to_none=zero == "none_grads")
                forward(model, x).sum().backward()
                opt.step()
    return [str(w.message) for w in caught if "converted a copy of" in str(w.message)]


@pytest.mark.parametrize("zero", ["none", "zeros"])
def test_optimiser_of_a_pretrained_model_a_conversion_copied_warns(zero):
    """The original trained a few steps before ``net = to_sbnn(net)`` with the old
    optimiser kept: its parameters keep a gradient (stale without ``zero_grad``, zeros
    with ``zero_grad(set_to_none=False)``) that no backward reaches any more, while the
    converted model's do. Warned once; the original trained beside its copy in the same
    way (its gradients renewed by each backward) is quiet."""
    import snntorch as snn  # noqa: F401  (the host of _host("snntorch"))

    build, forward, to_sbnn = _host("snntorch")
    x = torch.rand(3, 4, 8) * 3
    torch.manual_seed(0)
    net = build()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    assert _train([(net, opt)], x, forward, 2, zero) == []
    net = to_sbnn(net)
    before = [p.detach().clone() for p in net.parameters()]
    found = _train([(net, opt)], x, forward, 4, zero)
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))  # untrained
    assert len(found) == 1, found
    assert "Adam steps the parameters of the model that to_sbnn converted a copy of" in found[0]

    torch.manual_seed(0)
    host_net = build()
    host_opt = torch.optim.Adam(host_net.parameters(), lr=1e-2)
    assert _train([(host_net, host_opt)], x, forward, 2, zero) == []
    model = to_sbnn(host_net)
    opt = torch.optim.Adam(sb.param_groups(model, lr=1e-2))
    assert _train([(host_net, host_opt), (model, opt)], x, forward, 4, zero) == []


def test_converting_a_model_many_times_keeps_no_dead_copies():
    """Each ``to_sbnn`` of one model records its copy's parameters for the optimiser
    check; copies that are gone are dropped at the next conversion, so that converting in
    a loop (a sweep, a notebook cell run again) does not grow the record."""
    import gc

    from sbnn_addons import optim

    build, _, to_sbnn = _host("snntorch")
    net = build()
    for _ in range(10):
        to_sbnn(net)
    gc.collect()
    kept = to_sbnn(net)
    refs = optim._COPIED[0][net[0].weight]
    assert len(refs) == 1 and refs[0]() is kept[0].weight
