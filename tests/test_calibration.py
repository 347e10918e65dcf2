"""calibrate_spike_std: the spike noise of a converted trained model sized to its data."""

from __future__ import annotations

import pytest
import snntorch as snn
import torch
from snntorch import utils as snn_utils
from spikingjelly.activation_based import functional, layer, neuron, surrogate
from torch import nn

import sbnn_addons
from sbnn_addons import calibrate_spike_std
from sbnn_addons.calibration import RATE_FLOOR
from sbnn_addons.metrics import SpikeMonitor
from sbnn_addons.snntorch import to_sbnn as snn_to_sbnn
from sbnn_addons.spike import IWSTSpike
from sbnn_addons.spikingjelly import to_sbnn as sj_to_sbnn

T, B = 8, 6


def _trained_like_sj(bias: float = 0.85) -> nn.Module:
    """A SpikingJelly multi-step MLP whose membranes settle just below the threshold (a
    trained sparse network's situation): LIF with tau 2 settles at its input, the bias."""
    torch.manual_seed(0)
    net = nn.Sequential(
        layer.Linear(12, 16), neuron.LIFNode(surrogate_function=surrogate.ATan()),
        layer.Linear(16, 5), neuron.LIFNode(surrogate_function=surrogate.ATan()))
    with torch.no_grad():
        for lin in (net[0], net[2]):
            lin.weight.mul_(0.05)
            lin.bias.fill_(bias)
    functional.set_step_mode(net, "m")
    return net


def _sample_rates(model, x, seed, forward):
    functional.reset_net(model)
    sbnn_addons.seed_spikes(model, seed)
    with (torch.no_grad(), sbnn_addons.mode(model, "sample"), torch.random.fork_rng(),
          SpikeMonitor(model, synops=False) as mon):
        torch.manual_seed(seed)
        forward(model, x)
    sbnn_addons.seed_spikes(model, None)
    functional.reset_net(model)
    return mon.spike_rates()


def test_shrinks_the_spike_noise_of_a_network_near_threshold_until_rates_match():
    net = sj_to_sbnn(_trained_like_sj())
    x = torch.rand(T, B, 12)
    spikes = [m for m in net.modules() if isinstance(m, IWSTSpike)]
    before = [m.std.detach().clone() for m in spikes]
    modes = [m.sbnn_mode for m in spikes]
    cal = calibrate_spike_std(net, x)

    assert cal.factor < 1
    # one factor for every layer, a power of 2^-1/2
    k = round(torch.log2(torch.tensor(cal.factor)).item() * -2)
    assert cal.factor == pytest.approx(2 ** (-k / 2), rel=1e-12)
    for m, s in zip(spikes, before):
        torch.testing.assert_close(m.std.detach(), s * cal.factor)
    # mean mode does not fire (membranes settle at 0.85 < 1): the full noise did, the
    # calibrated one stays within the floor
    assert all(r == 0 for r in cal.mean_rates.values())
    assert max(cal.initial_rates.values()) > 0.05
    assert all(r <= RATE_FLOOR for r in cal.sample_rates.values())
    # the reported rates are those of a sample-mode pass replayed independently
    assert _sample_rates(net, x, 0, lambda m, x: m(x)) == pytest.approx(cal.sample_rates)
    # the next larger factor was refused: some layer fired above the bound there
    for m, s in zip(spikes, before):
        with torch.no_grad():
            m.std_rho.copy_(sbnn_addons.base.inverse_softplus(s * cal.factor * 2 ** 0.5))
    larger = _sample_rates(net, x, 0, lambda m, x: m(x))
    assert any(larger[n] > 1.25 * cal.mean_rates[n] + RATE_FLOOR for n in larger)
    # modes, streams and state as they were
    assert [m.sbnn_mode for m in spikes] == modes
    assert all(m._seed is None and m._generator is None for m in spikes)
    assert all(float(torch.as_tensor(n.v).abs().sum()) == 0
               for n in net.modules() if isinstance(n, neuron.LIFNode))


def test_keeps_the_noise_of_a_network_whose_rates_it_does_not_raise():
    # far below threshold: the default noise adds no spike
    net = sj_to_sbnn(_trained_like_sj(bias=-3.0))
    spikes = [m for m in net.modules() if isinstance(m, IWSTSpike)]
    before = [m.std.detach().clone() for m in spikes]
    rhos = [m.std_rho.detach().clone() for m in spikes]
    cal = calibrate_spike_std(net, torch.rand(T, B, 12))
    assert cal.factor == 1.0 and cal.sample_rates == cal.initial_rates
    for m, s, rho in zip(spikes, before, rhos):
        torch.testing.assert_close(m.std.detach(), s)
        assert torch.equal(m.std_rho, rho)  # exactly as it was


def test_snntorch_sequential_with_init_hidden_and_the_host_reset():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(12, 16), snn.Leaky(beta=0.5, init_hidden=True),
        nn.Linear(16, 5), snn.Leaky(beta=0.5, init_hidden=True, output=True))
    with torch.no_grad():  # membranes settle at bias / (1 - beta) = 0.8 < 1
        for lin in (net[0], net[2]):
            lin.weight.mul_(0.05)
            lin.bias.fill_(0.4)
    net = snn_to_sbnn(net)
    x = torch.rand(T, B, 12)
    cal = calibrate_spike_std(net, x, forward=lambda m, x: [m(x_t) for x_t in x])
    assert cal.factor < 1
    assert all(cal.sample_rates[n] <= 1.25 * cal.mean_rates[n] + RATE_FLOOR
               for n in cal.sample_rates)
    snn_utils.reset(net)  # the host's reset still reaches the converted model
    assert all(float(m.mem.abs().sum()) == 0 for m in net.modules()
               if isinstance(m, snn.Leaky))


def test_fixed_spike_noise_is_scaled_too():
    net = sj_to_sbnn(_trained_like_sj(), learn_std=False)
    spikes = [m for m in net.modules() if isinstance(m, IWSTSpike)]
    before = [m.fixed_std.clone() for m in spikes]
    cal = calibrate_spike_std(net, torch.rand(T, B, 12))
    assert cal.factor < 1
    for m, s in zip(spikes, before):
        torch.testing.assert_close(m.fixed_std, s * cal.factor)


def test_warns_at_the_smallest_factor():
    net = sj_to_sbnn(_trained_like_sj())
    with pytest.warns(UserWarning, match="smallest factor"):
        cal = calibrate_spike_std(net, torch.rand(T, B, 12), min_factor=1.0)
    assert cal.factor == 1.0


def test_a_state_not_reset_between_passes_is_named():
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(12, 16), neuron.IFNode(surrogate_function=surrogate.ATan()))
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.fill_(0.3)  # an IF membrane fires every few steps: the phase carries
    functional.set_step_mode(net, "m")
    net = sj_to_sbnn(net)
    with pytest.raises(ValueError, match="not reset between passes"):
        calibrate_spike_std(net, torch.rand(3, B, 12), reset=lambda m: None)


def test_bad_calls_are_named():
    net = sj_to_sbnn(_trained_like_sj())
    x = torch.rand(T, B, 12)
    with pytest.raises(ValueError, match="nothing to calibrate"):
        calibrate_spike_std(sj_to_sbnn(_trained_like_sj(), spike_std=None), x)
    with pytest.raises(ValueError, match="max_rate_increase"):
        calibrate_spike_std(net, x, max_rate_increase=-0.1)
    with pytest.raises(ValueError, match="min_factor"):
        calibrate_spike_std(net, x, min_factor=0.0)
    with pytest.raises(TypeError, match="forward"):
        calibrate_spike_std(net, x, forward="model")
    with pytest.raises(ValueError, match="zero-size"):
        calibrate_spike_std(net, x[:0])
    with pytest.raises(ValueError, match="NaN|non-finite|inf"):
        calibrate_spike_std(net, torch.full_like(x, float("nan")))
    with pytest.raises(TypeError):
        calibrate_spike_std("net", x)
    bn = nn.Sequential(layer.Linear(12, 16), layer.BatchNorm1d(16),
                       neuron.LIFNode(surrogate_function=surrogate.ATan()))
    functional.set_step_mode(bn, "m")
    bn = sj_to_sbnn(bn)
    with pytest.raises(ValueError, match="training mode.*model.eval"):
        calibrate_spike_std(bn, x)
    stats = bn[1].running_mean.clone()
    calibrate_spike_std(bn.eval(), x)
    torch.testing.assert_close(bn[1].running_mean, stats)


def _snn_sequential():
    torch.manual_seed(0)
    return snn_to_sbnn(nn.Sequential(
        nn.Linear(12, 16), snn.Leaky(beta=0.5, init_hidden=True),
        nn.Linear(16, 5), snn.Leaky(beta=0.5, init_hidden=True, output=True)))


def _sj_single_step():
    net = sj_to_sbnn(_trained_like_sj())
    functional.set_step_mode(net, "s")
    return net


@pytest.mark.parametrize("make", [_snn_sequential, _sj_single_step])
def test_a_single_step_model_without_a_forward_is_named(make):
    """model(inputs) on a model that runs one time step per call (an nn.Sequential of
    snnTorch init_hidden neurons, as in the README; a SpikingJelly model in step_mode 's')
    took the sequence's T steps for a batch and sized the noise to one step: a factor of
    0.35 where the loop over the steps gave 1, silently."""
    net, x = make(), torch.rand(T, B, 12)
    with pytest.raises(ValueError, match=r"one time step per call.*"
                                         r"forward=lambda m, x: \[m\(x_t\) for x_t in x\]"):
        calibrate_spike_std(net, x)
    calibrate_spike_std(net, x, forward=lambda m, x: [m(x_t) for x_t in x])
    calibrate_spike_std(net, x[0], forward=lambda m, x: m(x))  # a model of one step


def test_a_compiled_model_is_calibrated_under_its_models_names():
    """A compiled wrapper (``torch.compile(net)``; without ``fullgraph`` its seeded
    steps run eagerly) is measured and reported under the names of the model it wraps,
    as ``SpikeMonitor`` counts it, not the wrapper's ``_orig_mod.`` paths."""
    net = sj_to_sbnn(_trained_like_sj()).eval()
    x = torch.rand(T, B, 12)
    torch._dynamo.reset()
    result = calibrate_spike_std(torch.compile(net, backend="eager"), x)
    torch._dynamo.reset()
    names = {"1.surrogate_function", "3.surrogate_function"}
    assert set(result.mean_rates) == set(result.sample_rates) == names
