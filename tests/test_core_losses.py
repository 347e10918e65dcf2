"""Auxiliary bias loss and the SBNN objective (Method page, sections 5 and 6)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sbnn_addons as sb
from sbnn_addons import LIF, BayesLinear, IWSTSpike, aux_loss, enable_aux_loss, sbnn_objective

T, B = 4, 3


class Net(nn.Module):
    def __init__(self, center):
        super().__init__()
        self.fc1 = BayesLinear(5, 6, std=0.3)
        self.lif1 = LIF(threshold=1.0, spike_fn=IWSTSpike("st", std=0.2, aux_center=center))
        self.fc2 = BayesLinear(6, 2, std=0.3)
        self.lif2 = LIF(threshold=0.5, spike_fn=IWSTSpike("st", std=0.1, aux_center=center))


def _hand(net, x, center):
    """sum over layers and steps of mean over batch (sum over units z^2), from the Method page
    recurrences with the same seeded noise; z = (u - theta)/sigma or u/sigma ("zero")."""
    total, s1, s2 = 0.0, None, None
    for t in range(T):
        a1 = net.fc1(x[t])
        v1 = sb.get_variance(a1)
        m1 = (0.0 if s1 is None else net.lif1.beta * s1[0]) + a1
        V1 = (0.0 if s1 is None else net.lif1.beta**2 * s1[1]) + v1
        sig1 = torch.sqrt(V1 + 0.2**2)
        h1, st1 = net.lif1(sb.attach_variance(a1.detach().clone(), v1.detach()), s1)
        z1 = (m1 - (1.0 if center == "threshold" else 0.0)) / sig1
        a2 = net.fc2(h1)
        v2 = sb.get_variance(a2)
        m2 = (0.0 if s2 is None else net.lif2.beta * s2[0]) + a2
        V2 = (0.0 if s2 is None else net.lif2.beta**2 * s2[1]) + v2
        sig2 = torch.sqrt(V2 + 0.1**2)
        h2, st2 = net.lif2(sb.attach_variance(a2.detach().clone(), v2.detach()), s2)
        z2 = (m2 - (0.5 if center == "threshold" else 0.0)) / sig2
        total = total + (z1**2).sum(-1).mean() + (z2**2).sum(-1).mean()
        s1, s2 = st1, st2
    return total


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("center", ["threshold", "zero"])
def test_aux_loss_equals_hand_computation(center, reduction):
    """aux_loss == hand-computed sum_t mean_batch sum_units z^2 (rtol 1e-5, float32),
    with identical spikes (both passes seeded); the scale-free "mean" form divides it by
    the unit-steps per example, T * (6 + 2)."""
    torch.manual_seed(0)
    net = Net(center)
    x = torch.rand(T, B, 5)
    enable_aux_loss(net)
    sb.seed_spikes(net, 3)
    s1 = s2 = None
    for t in range(T):
        h1, s1 = net.lif1(net.fc1(x[t]), s1)
        _, s2 = net.lif2(net.fc2(h1), s2)
    got = aux_loss(net, reduction)
    enable_aux_loss(net, False)
    sb.seed_spikes(net, 3)
    with torch.no_grad():
        want = _hand(net, x, center)
        if reduction == "mean":
            want = want / (T * (6 + 2))
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=0)
    assert float(got.detach()) > 0
    got.backward()
    assert net.fc1.std_rho.grad is not None  # the aux loss trains the noise scales
    enable_aux_loss(net)
    assert float(aux_loss(net)) == 0.0  # cleared after reading
    enable_aux_loss(net, False)
    with pytest.raises(ValueError, match="collects no auxiliary terms.*enable_aux_loss"):
        aux_loss(net)  # collection off: the loss would always be 0
    with pytest.raises(ValueError, match="collects no auxiliary terms"):
        sbnn_objective(torch.tensor(1.0), net, aux_weight=0.1)


def test_aux_loss_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="reduction"):
        aux_loss(Net("zero"), "max")
    with pytest.raises(ValueError, match="aux_reduction"):
        sbnn_objective(torch.tensor(1.0), Net("zero"), aux_weight=1.0, aux_reduction="max")


def test_aux_loss_not_collected_without_grad_or_flag():
    net = Net("threshold")
    x = torch.rand(B, 5)
    net.lif1(net.fc1(x))
    with pytest.raises(ValueError, match="collects no auxiliary terms"):
        aux_loss(net)  # without the flag: named, not a silent 0
    enable_aux_loss(net)
    with torch.no_grad():
        net.lif1(net.fc1(x))
    assert float(aux_loss(net)) == 0.0


def test_sbnn_objective_combines_terms():
    """loss = NLL + kl_weight KL / N + aux_weight aux (rtol 1e-6)."""
    torch.manual_seed(0)
    net = Net("threshold")
    x = torch.rand(B, 5)
    nll = torch.tensor(0.7)
    enable_aux_loss(net)
    sb.seed_spikes(net, 1)
    net.lif1(net.fc1(x))
    aux = aux_loss(net).detach()
    sb.seed_spikes(net, 1)
    net.lif1(net.fc1(x))
    kl = sb.kl_divergence(net, 0.5).detach()
    loss = sbnn_objective(nll, net, 1000, kl_weight=0.3, aux_weight=1e-2, prior=0.5)
    torch.testing.assert_close(loss.detach(), nll + 0.3 * kl / 1000 + 1e-2 * aux, rtol=1e-6,
                               atol=0)
    assert float(sbnn_objective(nll, net)) == pytest.approx(0.7)  # parity default: NLL only
    # snnTorch's losses (snntorch.functional.ce_rate_loss()) return shape (1,)
    assert sbnn_objective(nll.reshape(1), net).shape == ()


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(kl_weight=-1.0, num_data=10), "kl_weight"),
        (dict(aux_weight=-0.1), "aux_weight"),
        (dict(aux_weight=float("nan")), "aux_weight"),
        (dict(kl_weight=1.0), "num_data"),
    ],
)
def test_objective_bad_input(kwargs, word):
    net = Net("threshold")
    with pytest.raises(ValueError, match=rf"\b{word}\b"):
        sbnn_objective(torch.tensor(1.0), net, **kwargs)
    with pytest.raises(ValueError, match="nll"):
        sbnn_objective(torch.ones(3), net)


def test_objective_weights_given_as_tensors():
    """A weight given as a tensor of several elements failed with torch's bare "only one
    element tensors can be converted"; a one-element tensor (a schedule's value, also
    one that requires grad) is one number, read without torch's warning."""
    model = nn.Sequential(BayesLinear(4, 3), LIF())
    nll = torch.tensor(1.0)
    for name in ("kl_weight", "aux_weight"):
        with pytest.raises(ValueError, match=f"{name} must be one number.*shape"):
            sbnn_objective(nll, model, 10, **{name: torch.tensor([0.1, 0.2])})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = sbnn_objective(nll, model, 10, kl_weight=torch.tensor(0.5, requires_grad=True))
    torch.testing.assert_close(loss.detach(), 1.0 + 0.5 * sb.kl_divergence(model).detach() / 10)


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("path", ["spike", "lif_step", "lif_run"])
def test_aux_gradient_reaches_the_stds_only_with_aux_std_grad(path, kernel):
    """By default the auxiliary loss holds sigma constant in z: an aux-only loss gives the
    layer's and the spike's stds no gradient, and the drive (the layer's weight) one
    pulling towards the threshold. ``aux_std_grad=True`` (the released form) lets it reach
    the stds too. The same on the kernel and PyTorch paths, for a spike, a LIF step and a
    fused LIF sequence (one step: over more, the spikes' own sigma-gradient reaches later
    membranes through the reset); the weight's gradient does not depend on the flag."""
    from sbnn_addons import kernels

    grads = {}
    for std_grad in (False, True):
        torch.manual_seed(0)
        fc = BayesLinear(12, 6)
        spike = IWSTSpike("st", std=0.3, learn_std=True, aux_std_grad=std_grad)
        enable_aux_loss(spike)
        x = torch.rand(4, 12)
        with kernels.use_kernels(kernel):
            if path == "spike":
                spike(fc(x) - 1.0)
            elif path == "lif_step":
                LIF(0.9, 1.0, spike)(fc(x))
            else:
                LIF(0.9, 1.0, spike).run(fc(x).unsqueeze(0))
        aux_loss(spike).backward()
        grads[std_grad] = (fc.weight.grad.clone(), fc.std_rho.grad, spike.std_rho.grad)
    weight, layer_std, spike_std = grads[False]
    assert weight.abs().sum() > 0
    for g in (layer_std, spike_std):
        assert g is None or float(g.abs().sum()) == 0.0
    torch.testing.assert_close(grads[True][0], weight, rtol=1e-5, atol=1e-7)
    assert float(grads[True][1].abs()) > 0 and float(grads[True][2].abs()) > 0


def test_unused_aux_terms_raise_at_the_next_step():
    """Aux terms collected but never consumed would pile up with their graphs: after an
    optimiser step, the next collection raises a named error. Consuming them every step,
    or accumulating over several forwards before one step, is fine."""
    torch.manual_seed(0)
    net = nn.Sequential(BayesLinear(8, 4), IWSTSpike("st", std=0.3, learn_std=True))
    enable_aux_loss(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.rand(5, 8)
    for _ in range(2):
        loss = net(x).sum() + 0.1 * aux_loss(net)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net(x)
    net(x)  # two forwards, one aux term each, then one step
    (net(x).sum() + aux_loss(net)).backward()
    opt.step()
    loss = net(x).sum()  # the aux term is not used
    opt.zero_grad()
    loss.backward()
    opt.step()
    with pytest.raises(RuntimeError, match=r"never used: add sbnn_addons.aux_loss\(model\)"):
        net(x)
    net(x)  # the stale terms were dropped with the error
    assert aux_loss(net) > 0


@pytest.mark.parametrize("learn_std", [True, False])
def test_unused_aux_terms_raise_with_fixed_stds_too_and_weight_zero_consumes(learn_std):
    """Without a learned std the piling up is caught too (an optimiser step is what tells
    the steps apart); ``sbnn_objective(aux_weight=0)``, the start of a warm-up, uses the
    terms up."""
    from sbnn_addons import sbnn_objective

    torch.manual_seed(0)
    net = nn.Sequential(BayesLinear(8, 4, std=0.1, learn_std=learn_std),
                        IWSTSpike("st", std=0.3, learn_std=learn_std))
    enable_aux_loss(net)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    x = torch.rand(5, 8)
    for weight in (0.0, 0.0, 0.1):  # a warm-up from 0
        loss = sbnn_objective(net(x).sum().reshape(()), net, aux_weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net(x).sum().backward()  # the aux term is not used
    opt.step()
    with pytest.raises(RuntimeError, match="never used"):
        net(x)


def test_unused_aux_terms_name_a_parameter_load_as_a_cause():
    """A training-mode forward whose terms nobody uses, then ``load_state_dict`` (a
    checkpoint restored; DistributedDataParallel's broadcast does the same when it wraps
    the model), then a forward: the error names those changes beside the optimiser step,
    and how to run a forward that trains nothing."""
    torch.manual_seed(0)
    net = nn.Sequential(BayesLinear(8, 4), IWSTSpike("st", std=0.3, learn_std=True))
    enable_aux_loss(net)
    x = torch.rand(5, 8)
    net(x)
    net.load_state_dict(copy.deepcopy(net.state_dict()))
    with pytest.raises(RuntimeError, match=r"(?s)load_state_dict.*DistributedDataParallel"
                                           r".*never used.*torch\.no_grad\(\)"):
        net(x)
    with torch.no_grad():  # collects nothing
        net(x)
    net.load_state_dict(copy.deepcopy(net.state_dict()))
    net(x)


def test_aux_loss_warns_when_an_eval_mode_model_collected_nothing():
    """Terms are collected in training mode only: a training step run in eval mode by
    mistake gets a warning instead of a silent zero auxiliary loss."""
    net = nn.Sequential(BayesLinear(8, 4), IWSTSpike("st", std=0.3, learn_std=True))
    enable_aux_loss(net)
    net.eval()
    net(torch.rand(5, 8))
    with pytest.warns(UserWarning, match="eval mode.*model.train"):
        assert float(aux_loss(net)) == 0.0
    net.train()
    net(torch.rand(5, 8))
    assert float(aux_loss(net)) > 0


def test_kl_of_a_zero_std_layer_is_named():
    """A layer with a fixed zero std has an infinite KL: named error, not an inf loss."""
    layer = sb.BayesLinear(3, 2, std=0.0, learn_std=False)
    with pytest.raises(ValueError, match="zero posterior std"):
        layer.kl_divergence()
    with pytest.raises(ValueError, match="zero posterior std"):
        sbnn_objective(torch.tensor(1.0), nn.Sequential(layer), num_data=10, kl_weight=1.0)


def test_a_second_read_of_the_aux_loss_is_named():
    """aux_loss clears the terms it returns: a second read before the next forward pass
    (``aux_loss(model)`` for a log, then ``sbnn_objective(..., aux_weight=w)``) returned
    0, and the objective trained without its auxiliary term, silently."""
    import warnings

    net = nn.Sequential(BayesLinear(4, 3), IWSTSpike("st", std=0.3))
    enable_aux_loss(net)
    net(torch.rand(2, 4))
    assert aux_loss(net) > 0
    with pytest.warns(UserWarning, match=r"already read .*once per forward pass"):
        assert aux_loss(net) == 0
    net(torch.rand(2, 4))
    aux_loss(net)
    with pytest.warns(UserWarning, match=r"already read"):
        sbnn_objective(torch.tensor(1.0, requires_grad=True), net, aux_weight=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net(torch.rand(2, 4))
        assert aux_loss(net) > 0  # a new forward pass: new terms
        with torch.no_grad():
            assert aux_loss(net) == 0  # an evaluation: nothing to collect
