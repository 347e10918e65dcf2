"""Defaults that train: drop-in spike functions and converted host models (real snnTorch
and SpikingJelly models and utilities, no mocks)."""

from __future__ import annotations

import math

import pytest
import snntorch as snn
import torch
import torch.nn.functional as F
from _sj_helpers import import_zoo
from snntorch import surrogate as snn_surrogate
from snntorch import utils as snn_utils
from spikingjelly.activation_based import functional, layer, neuron
from spikingjelly.activation_based import surrogate as sj_surrogate
from torch import nn

import sbnn_addons
from sbnn_addons import snntorch as sbnn_snn
from sbnn_addons import spikingjelly as sbnn_sj
from sbnn_addons.data.digits import load_digits_split
from sbnn_addons.layers import CONVERTED_STD_FRACTION, converted_std
from sbnn_addons.spike import CONVERTED_SPIKE_STD, DEFAULT_AUX_PULL, DEFAULT_SPIKE_STD


@pytest.fixture(scope="module")
def digits():
    x, y, _, _ = load_digits_split()
    return x[:256], y[:256]


def _surrogate_peak(fn) -> float:
    u = torch.zeros(1, requires_grad=True)
    fn(u).sum().backward()
    return float(u.grad)


# --------------------------------------------------------------------------- identity
def test_default_std_gives_the_hosts_surrogate_peak():
    """ST with own noise s: dh/du = phi(u/s)/s (the expectation over the noise, here
    exact per draw); at the default s its peak is 1, as the hosts' default surrogates.
    The default auxiliary pull adds aux_pull * mean|dL/dh| * 2 clamp(z, -3, 3) / s (here
    dL/dh = 1)."""
    assert DEFAULT_SPIKE_STD == pytest.approx(1 / math.sqrt(2 * math.pi))
    assert _surrogate_peak(snn_surrogate.atan()) == pytest.approx(1.0)
    assert _surrogate_peak(sj_surrogate.Sigmoid()) == pytest.approx(1.0)
    assert _surrogate_peak(sj_surrogate.ATan()) == pytest.approx(1.0)
    for fn in (sbnn_snn.spike_grad(), sbnn_sj.surrogate_function()):
        assert fn.learn_std and float(fn.std.detach()) == pytest.approx(DEFAULT_SPIKE_STD)
        u = torch.linspace(-1.5, 1.5, 31, requires_grad=True)
        fn(u).sum().backward()
        s = DEFAULT_SPIKE_STD
        expected = torch.exp(-0.5 * (u.detach() / s) ** 2) / math.sqrt(2 * math.pi) / s
        pull = DEFAULT_AUX_PULL * 2 * (u.detach() / s).clamp(-3, 3) / s
        torch.testing.assert_close(u.grad, expected + pull)
        assert float(u.grad[15]) == pytest.approx(1.0)


def test_expected_gradient_is_a_gaussian_surrogate_for_agr():
    """The identity holds in expectation for every IW-ST member (here AGR(0))."""
    torch.manual_seed(0)
    fn = sbnn_snn.spike_grad("agr(0)", std=0.5)
    u = torch.full((200_000,), 0.3, requires_grad=True)
    fn(u).sum().backward()
    expected = math.exp(-0.5 * 0.6**2) / math.sqrt(2 * math.pi) / 0.5
    assert float(u.grad.mean()) == pytest.approx(expected, rel=0.02)


def test_no_own_noise_is_still_available():
    """Without own noise a drop-in function takes only the variance of Bayesian layers;
    with none, its gradient would be 0, which it refuses (naming the fix)."""
    for fn in (sbnn_snn.spike_grad(std=None), sbnn_sj.surrogate_function(std=0)):
        assert not fn.learn_std
        u = torch.randn(8, requires_grad=True)
        with pytest.raises(sbnn_addons.VarianceFlowError, match="no noise of its own"):
            fn(u).sum().backward()
    fn = sbnn_snn.spike_grad(std=None)  # the variance a Bayesian layer attaches
    u = torch.randn(8, requires_grad=True)
    fn(sbnn_addons.attach_variance(u, torch.full_like(u, 0.25))).sum().backward()
    assert u.grad.any()


# --------------------------------------------------------------------------- snnTorch drop-in
def _snn_tutorial_net(make_grad):
    """snnTorch tutorial 5 network (Sequential, init_hidden) with one spike_grad per layer."""
    return nn.Sequential(
        nn.Linear(64, 64), snn.Leaky(beta=0.9, spike_grad=make_grad(), init_hidden=True),
        nn.Linear(64, 10),
        snn.Leaky(beta=0.9, spike_grad=make_grad(), init_hidden=True, output=True),
    )


def _snn_rate_logits(net, x, steps=8):
    snn_utils.reset(net)
    return torch.stack([net(x)[0] for _ in range(steps)]).mean(0)


def test_snntorch_drop_in_trains_at_defaults(digits):
    x, y = digits
    torch.manual_seed(0)
    net = _snn_tutorial_net(sbnn_snn.spike_grad)
    assert "1.spike_grad.std_rho" in dict(net.named_parameters())  # one std per layer
    out = _snn_rate_logits(net, x)
    F.cross_entropy(out * 10, y).backward()
    assert net[0].weight.grad.abs().sum() > 0 and net[2].weight.grad.abs().sum() > 0
    assert net[1].spike_grad.std_rho.grad is not None
    # the same model with std=None would have no gradient at all (what the default fixes)
    torch.manual_seed(0)
    silent = _snn_tutorial_net(lambda: sbnn_snn.spike_grad(std=None))
    with pytest.raises(sbnn_addons.VarianceFlowError, match="no noise of its own"):
        F.cross_entropy(_snn_rate_logits(silent, x) * 10, y).backward()

    opt = torch.optim.Adam(sbnn_addons.param_groups(net, lr=5e-3))
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(_snn_rate_logits(net, x) * 10, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_snntorch_drop_in_reset_is_the_emitted_spike():
    """snnTorch's mem_reset calls spike_grad again: it gets back the emitted spike."""
    torch.manual_seed(0)
    shared = sbnn_snn.spike_grad()  # shared by both layers, as in the tutorials
    lif1 = snn.Leaky(beta=0.9, spike_grad=shared)
    lif2 = snn.Leaky(beta=0.9, spike_grad=shared)
    mem1, mem2 = lif1.init_leaky(), lif2.init_leaky()
    x = torch.rand(64, 32) * 0.6 + 0.5
    prev1 = prev2 = None
    for _ in range(10):
        spk1, mem1 = lif1(x, mem1)
        spk2, mem2 = lif2(spk1, mem2)
        if prev1 is not None:
            assert torch.equal(lif1.reset, prev1) and torch.equal(lif2.reset, prev2)
        else:  # the initial membranes emitted nothing: no reset (not a fresh draw)
            assert not lif1.reset.any() and not lif2.reset.any()
        prev1, prev2 = spk1.detach(), spk2.detach()
    assert 0 < float(prev1.mean()) < 1


def test_snntorch_drop_in_shared_by_neurons_with_equal_drives_draws_for_each():
    """One spike_grad() shared by two neurons whose drives are exactly equal in a step
    (the same input, the same state): each firing call draws its own spikes (not the
    other neuron's), and each neuron's reset is the spike it emitted."""
    torch.manual_seed(0)
    shared = sbnn_snn.spike_grad()
    lif_a = snn.Leaky(beta=0.9, spike_grad=shared)
    lif_b = snn.Leaky(beta=0.9, spike_grad=shared)
    mem_a, mem_b = lif_a.init_leaky(), lif_b.init_leaky()
    x = torch.full((4000, 4), 1.0)  # u = 0 at the first step: spikes with probability 1/2
    spk_a, mem_a = lif_a(x, mem_a)
    spk_b, mem_b = lif_b(x, mem_b)
    assert not torch.equal(spk_a, spk_b)  # two draws
    assert abs(float((spk_a == spk_b).float().mean()) - 0.5) < 0.05  # independent
    prev_a, prev_b = spk_a.detach(), spk_b.detach()
    lif_a(x, mem_a)
    lif_b(x, mem_b)
    assert torch.equal(lif_a.reset, prev_a) and torch.equal(lif_b.reset, prev_b)


def test_snntorch_drop_in_new_sequence_does_not_take_the_last_sequence_spikes():
    """A sequence that ends with spikes drawn from a zero membrane (a silent input, no
    bias): the next sequence's first reset, from its own zero initial membrane (equal in
    value to that last drive), resets nothing; it took the old spikes before, silently."""
    torch.manual_seed(0)
    lif = snn.Leaky(beta=0.9, threshold=0.5, spike_grad=sbnn_snn.spike_grad())
    x = torch.zeros(1000, 8)
    mem = lif.init_leaky()
    spk, mem = lif(x, mem)  # fires from the zero membrane with Phi(-0.5 / 0.4) = 11 %
    assert spk.any() and not mem.any()
    snn_utils.reset(lif)
    mem = lif.init_leaky()
    spk, mem = lif(x, mem)
    assert not lif.reset.any()
    assert not mem.any()


@pytest.mark.parametrize("make", [
    lambda sg: snn.Leaky(beta=0.9, threshold=0.5, spike_grad=sg),
    lambda sg: snn.Synaptic(alpha=0.8, beta=0.9, threshold=0.5, spike_grad=sg),
])
def test_snntorch_drop_in_first_step_resets_nothing(make):
    """The first step's reset is computed from the initial (zero) membrane, which never
    fired: no neuron loses its threshold, after init and after snntorch.utils.reset (a draw
    there would reset Phi(-0.5 / 0.4) = 11 % of them)."""
    torch.manual_seed(0)
    lif = make(sbnn_snn.spike_grad())
    x = torch.zeros(1000, 8)
    for _ in range(2):  # a fresh neuron, then after snnTorch's own reset
        state = lif.init_synaptic() if isinstance(lif, snn.Synaptic) else (lif.init_leaky(),)
        out = lif(x, *state)
        assert not lif.reset.any()
        assert torch.equal(out[-1], torch.zeros_like(out[-1]))  # the membrane stays 0
        for _ in range(3):  # the sequence goes on
            out = lif(torch.rand(1000, 8), *out[1:])
        snn_utils.reset(lif)


# --------------------------------------------------------------------------- SJ drop-in
@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_spikingjelly_drop_in_trains_at_defaults(digits, step_mode):
    x, y = digits
    torch.manual_seed(0)
    net = nn.Sequential(
        layer.Linear(64, 64), neuron.LIFNode(surrogate_function=sbnn_sj.surrogate_function()),
        layer.Linear(64, 10), neuron.LIFNode(surrogate_function=sbnn_sj.surrogate_function()),
    )
    functional.set_step_mode(net, step_mode)
    x_seq = x.unsqueeze(0).repeat(6, 1, 1)

    def rate():
        functional.reset_net(net)
        if step_mode == "m":
            return net(x_seq).mean(0)
        return torch.stack([net(xt) for xt in x_seq]).mean(0)

    F.mse_loss(rate(), F.one_hot(y, 10).float()).backward()
    assert net[0].weight.grad.abs().sum() > 0
    opt = torch.optim.Adam(sbnn_addons.param_groups(net, lr=1e-2))
    losses = []
    for _ in range(25):
        loss = F.mse_loss(rate(), F.one_hot(y, 10).float())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5


# --------------------------------------------------------------------------- converters
def _snn_csnn():
    """snnTorch tutorial 7 CSNN, scaled to 8x8 digits (fresh: its deep layers are silent)."""
    sg = snn_surrogate.fast_sigmoid(slope=25)
    return nn.Sequential(
        nn.Conv2d(1, 12, 3), nn.MaxPool2d(2), snn.Leaky(beta=0.5, spike_grad=sg, init_hidden=True),
        nn.Conv2d(12, 32, 3), snn.Leaky(beta=0.5, spike_grad=sg, init_hidden=True),
        nn.Flatten(), nn.Linear(32, 10),
        snn.Leaky(beta=0.5, spike_grad=sg, init_hidden=True, output=True),
    )


def test_converted_silent_snntorch_csnn_has_gradient_and_learns(digits):
    x, y = digits
    x = x.view(-1, 1, 8, 8)
    torch.manual_seed(0)
    net = _snn_csnn()
    model = sbnn_snn.to_sbnn(net)
    with sbnn_addons.mode(model, "mean"):
        assert float(_snn_rate_logits(model, x).sum()) == 0  # a silent output layer
    for spike in (m.spike_grad for m in model.modules() if hasattr(m, "spike_grad")):
        assert spike.learn_std and float(spike.std.detach()) == pytest.approx(CONVERTED_SPIKE_STD)
    F.cross_entropy(_snn_rate_logits(model, x), y).backward()
    for i in (0, 3, 6):
        assert model[i].weight.grad.abs().sum() > 0, f"layer {i} has no gradient"
    opt = torch.optim.Adam(sbnn_addons.param_groups(model, lr=1e-2))
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(_snn_rate_logits(model, x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert sum(losses[-3:]) / 3 < math.log(10) - 0.1


def test_converted_std_is_relative_to_the_ported_weights():
    torch.manual_seed(0)
    net = _snn_csnn()
    with torch.no_grad():
        net[6].weight.mul_(10.0)
    model = sbnn_snn.to_sbnn(net)
    for i in (0, 3, 6):
        rms = float(net[i].weight.pow(2).mean().sqrt())
        assert float(model[i].std) == pytest.approx(CONVERTED_STD_FRACTION * rms, rel=1e-5)
    assert float(sbnn_snn.to_sbnn(net, std=0.05)[6].std) == pytest.approx(0.05)


def test_affine_batchnorm_scale_is_folded_into_the_std():
    """batchnorm='affine' scales the mean by gamma/sqrt(var+eps) but not the variance:
    the scale is folded into the initial std, so the signal-to-noise ratio is kept."""
    torch.manual_seed(0)
    net = nn.Sequential(layer.Conv2d(2, 8, 3, bias=False), layer.BatchNorm2d(8),
                        neuron.LIFNode())
    with torch.no_grad():
        net[1].running_var.fill_(1 / 36.0)  # folded scale 6
        net[1].num_batches_tracked += 1
    model = sbnn_sj.to_sbnn(net, batchnorm="affine")
    assert isinstance(model[1], sbnn_addons.ChannelAffine)
    rms = float(net[0].weight.pow(2).mean().sqrt())
    scale = float(model[1].weight.mean())
    assert scale == pytest.approx(6.0, rel=1e-3)
    assert float(model[0].std) == pytest.approx(CONVERTED_STD_FRACTION * rms * scale, rel=1e-3)
    kept = sbnn_sj.to_sbnn(net)  # default: the BatchNorm stays (it scales the variance)
    assert isinstance(kept[1], nn.BatchNorm2d)
    assert float(kept[0].std) == pytest.approx(CONVERTED_STD_FRACTION * rms, rel=1e-5)
    assert converted_std(torch.zeros(4, 9)) == pytest.approx(0.5 / 3)


@pytest.mark.parametrize("std_mode", ["channel", "weight"])
@pytest.mark.parametrize("host", ["spikingjelly", "snntorch"])
def test_affine_batchnorm_folds_each_channels_scale(std_mode, host):
    """With one std per channel (or weight), batchnorm='affine' folds each channel's
    BatchNorm scale into that channel's std: the neuron sees, channel by channel, the
    noise a kept BatchNorm gives in eval mode (the layer-wide fold gave channels with a
    small scale relatively more noise). reset_parameters() draws new weights and sizes
    these stds from them by the same rule."""
    torch.manual_seed(0)
    if host == "spikingjelly":
        net = nn.Sequential(layer.Conv2d(2, 4, 3, bias=False), layer.BatchNorm2d(4),
                            neuron.LIFNode())
        convert = sbnn_sj.to_sbnn
    else:
        import snntorch as snn

        net = nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4),
                            snn.Leaky(beta=0.9, init_hidden=True))
        convert = sbnn_snn.to_sbnn
    bn = net[1]
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 3.0, 0.5, -2.0]))
        bn.running_var.copy_(torch.tensor([0.8, 1.3, 0.6, 2.0]))
        bn.num_batches_tracked += 1
    net.eval()
    affine = convert(net, std_mode=std_mode, batchnorm="affine").eval()
    kept = convert(net, std_mode=std_mode).eval()
    x = torch.rand(3, 2, 6, 6)

    def variance_at_neuron(model):
        conv, norm = model[0], model[1]
        with sbnn_addons.mode(model, "sample"):
            return sbnn_addons.get_variance(norm(conv(x)))

    torch.testing.assert_close(variance_at_neuron(affine), variance_at_neuron(kept))
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).abs().detach()
    rms = float(net[0].weight.pow(2).mean().sqrt())
    std = affine[0].std.detach().reshape(4, -1)
    torch.testing.assert_close(std, (scale * CONVERTED_STD_FRACTION * rms)[:, None].expand_as(std))
    with torch.no_grad():
        affine[0].std_rho.zero_()
    affine[0].reset_parameters()  # new weights: the stds follow them by the same rule
    rms = float(affine[0].weight.detach().pow(2).mean().sqrt())
    torch.testing.assert_close(affine[0].std.detach().reshape(4, -1),
                               (scale * CONVERTED_STD_FRACTION * rms)[:, None].expand_as(std))


def _sj_csnn(c=8):
    """SpikingJelly's conv_fashion_mnist CSNN (fresh BatchNorm), for 8x8 input."""
    net = nn.Sequential(
        layer.Conv2d(1, c, 3, padding=1, bias=False), layer.BatchNorm2d(c),
        neuron.IFNode(surrogate_function=sj_surrogate.ATan()), layer.MaxPool2d(2, 2),
        layer.Conv2d(c, c, 3, padding=1, bias=False), layer.BatchNorm2d(c),
        neuron.IFNode(surrogate_function=sj_surrogate.ATan()), layer.MaxPool2d(2, 2),
        layer.Flatten(), layer.Linear(c * 4, 10, bias=False),
        neuron.IFNode(surrogate_function=sj_surrogate.ATan()),
    )
    functional.set_step_mode(net, "m")
    return net


def _rates(net, x_seq):
    store = []
    hooks = [m.register_forward_hook(lambda mod, a, o: store.append(float(o.mean())))
             for m in net.modules() if isinstance(m, neuron.IFNode)]
    functional.reset_net(net)
    with torch.no_grad():
        net(x_seq)
    for h in hooks:
        h.remove()
    return store


def test_fresh_batchnorm_is_not_frozen(digits):
    """An untrained BatchNorm keeps learning its statistics: the converted model fires
    like the original in mean mode (exactly) and in sample mode (about)."""
    x, _ = digits
    x_seq = x.view(-1, 1, 8, 8).unsqueeze(0).repeat(4, 1, 1, 1, 1)
    torch.manual_seed(0)
    net = _sj_csnn()
    ref = _rates(net, x_seq)
    model = sbnn_sj.to_sbnn(net)
    with sbnn_addons.mode(model, "mean"):
        assert _rates(model, x_seq) == pytest.approx(ref, abs=1e-6)
    sample = _rates(model, x_seq)
    assert sample[0] == pytest.approx(ref[0], abs=0.05) and sample[1] > 0.5 * ref[1]
    frozen = _rates(sbnn_sj.to_sbnn(net, batchnorm="affine"), x_seq)  # what 'keep' avoids
    assert frozen[1] < 0.5 * ref[1]


def test_converted_dvsgesture_net_has_gradient_at_init():
    """SpikingJelly's zoo DVSGestureNet (fresh, BatchNorm, silent output) converted with
    the defaults passes a weight gradient to every layer at initialisation."""
    parametric_lif_net = import_zoo("parametric_lif_net")

    torch.manual_seed(0)
    net = parametric_lif_net.DVSGestureNet(channels=2, spiking_neuron=neuron.LIFNode,
                                           surrogate_function=sj_surrogate.ATan(),
                                           detach_reset=True)
    functional.set_step_mode(net, "m")
    model = sbnn_sj.to_sbnn(net, aux_loss=True)
    x = (torch.rand(3, 4, 2, 128, 128) < 0.05).float()
    y = torch.tensor([0, 3, 5, 7])
    functional.reset_net(model)
    rate = model(x).mean(0)
    aux = sbnn_addons.aux_loss(model)
    assert 0 < float(aux) < 100  # scale-free: readable next to the task loss
    (F.mse_loss(rate, F.one_hot(y, 11).float()) + 0.1 * aux).backward()
    weights = [m for m in model.modules() if sbnn_addons.is_bayesian(m)]
    assert len(weights) == 7
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in weights)


def test_converted_model_trains_with_aux_loss(digits):
    """The converters' aux_loss=True path with a weight in 1e-3..1 trains (the aux loss is
    a mean over unit-steps: weigh it against the task loss, here an MSE of about 0.1)."""
    x, y = digits
    x_seq = x.view(-1, 1, 8, 8).unsqueeze(0).repeat(4, 1, 1, 1, 1)
    torch.manual_seed(0)
    model = sbnn_sj.to_sbnn(_sj_csnn(), aux_loss=True)
    opt = torch.optim.SGD(sbnn_addons.param_groups(model, lr=0.1), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(20):
        functional.reset_net(model)
        task = F.mse_loss(model(x_seq).mean(0), F.one_hot(y, 10).float())
        aux = sbnn_addons.aux_loss(model)
        assert 0 < float(aux) < 100
        loss = task + 1e-3 * aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(task.detach()))
    assert sum(losses[-4:]) / 4 < 0.95 * sum(losses[:4]) / 4


@pytest.mark.parametrize("k", [0.1, 10.0])
def test_converted_noise_is_relative_to_the_threshold(k):
    """A network whose weights and thresholds are scaled together by k spikes alike; its
    conversion too: the spike std is `spike_std` times the threshold (and the layer std
    follows the weights), so `sample`-mode spikes under the same seed agree with those of
    the unscaled network (an absolute spike std: 56 % agreement at k = 0.1). Both hosts
    give the same std; a bad spike_std is named."""
    torch.manual_seed(0)
    x = (torch.rand(8, 16, 20) < 0.4).float()
    base = nn.Sequential(nn.Linear(20, 32), snn.Leaky(beta=0.9, init_hidden=True),
                         nn.Linear(32, 10), snn.Leaky(beta=0.9, init_hidden=True, output=True))
    with torch.no_grad():
        base[0].weight.mul_(3)
        base[2].weight.mul_(4)
    scaled = nn.Sequential(nn.Linear(20, 32), snn.Leaky(beta=0.9, threshold=k, init_hidden=True),
                           nn.Linear(32, 10),
                           snn.Leaky(beta=0.9, threshold=k, init_hidden=True, output=True))
    scaled.load_state_dict({n: v * k if n.startswith(("0.", "2.")) or n.endswith("threshold")
                            else v for n, v in base.state_dict().items()})
    spikes = []
    for net in (base, scaled):
        model = sbnn_snn.to_sbnn(net)
        assert float(model[1].spike_grad.std.detach()) == pytest.approx(
            CONVERTED_SPIKE_STD * float(net[1].threshold), rel=1e-5)
        sbnn_addons.seed_spikes(model, 3)
        snn_utils.reset(model)
        with torch.no_grad():
            spikes.append(torch.stack([model(x[t])[0] for t in range(len(x))]))
    assert spikes[0].mean() > 0.05
    # the same draws on the same z: equal at the first step (later steps drift apart where
    # a rounding difference flipped a spike), equal rates throughout
    assert float((spikes[0][0] == spikes[1][0]).float().mean()) > 0.99
    assert abs(float(spikes[0].mean() - spikes[1].mean())) < 0.02
    sj_net = nn.Sequential(layer.Linear(4, 3), neuron.LIFNode(v_threshold=k))
    sj = sbnn_sj.to_sbnn(sj_net)
    assert float(sj[1].surrogate_function.std.detach()) == pytest.approx(CONVERTED_SPIKE_STD * k,
                                                                         rel=1e-5)
    for convert, net in ((sbnn_snn.to_sbnn, base), (sbnn_sj.to_sbnn, sj_net)):
        with pytest.raises(ValueError, match="spike_std must be"):
            convert(net, spike_std=-0.1)


def test_the_drop_in_spike_functions_check_their_drive():
    """The drop-ins in host models that are not converted (no input check at a model's
    entry): a NaN membrane fired nothing, silently."""
    x = torch.tensor([[math.nan, 1.0, 0.2]])
    lif = snn.Leaky(beta=0.9, spike_grad=sbnn_snn.spike_grad(), init_hidden=True)
    with pytest.raises(ValueError, match=r"the input of the spike function \(SnnTorchSpike"):
        lif(x)
    node = neuron.LIFNode(surrogate_function=sbnn_sj.surrogate_function())
    with pytest.raises(ValueError, match=r"the input of the spike function \(SJSpike"):
        node(x)
    functional.reset_net(node)
    with sbnn_addons.check_finite(False):
        assert node(x).shape == (1, 3)


def test_a_drop_in_spike_function_without_noise_refuses_a_gradient_it_would_zero():
    """``spike_grad(std=None)`` and ``surrogate_function(std=0)`` (only the variance of
    Bayesian layers) in host snnTorch and SpikingJelly models of plain layers fire
    deterministically: their spikes' gradient is 0, and a loss on them trained nothing,
    without an error. The backward names the cause and the fix."""
    torch.manual_seed(0)
    fc, lif = nn.Linear(6, 5), snn.Leaky(beta=0.9, spike_grad=sbnn_snn.spike_grad(std=None))
    x = torch.rand(4, 3, 6) * 2
    mem, loss = lif.init_leaky(), 0.0
    for t in range(len(x)):
        spk, mem = lif(fc(x[t]), mem)
        loss = loss + spk.sum()
    with pytest.raises(sbnn_addons.VarianceFlowError,
                       match=r"(?s)SnnTorchSpike, which has no noise.*BayesLinear"):
        loss.backward()

    net = nn.Sequential(layer.Linear(6, 5), neuron.LIFNode(
        tau=2.0, surrogate_function=sbnn_sj.surrogate_function(std=0)))
    functional.set_step_mode(net, "m")
    with pytest.raises(sbnn_addons.VarianceFlowError,
                       match=r"(?s)SJSpike, which has no noise.*BayesLinear"):
        net(x).sum().backward()
    functional.reset_net(net)
    net[1].surrogate_function = sbnn_sj.surrogate_function()  # its own noise: trains
    net(x).sum().backward()
    assert net[0].weight.grad.abs().sum() > 0
