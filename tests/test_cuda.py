"""The library on a CUDA device, against the CPU: run where a GPU is present, skipped elsewhere.

``test_device_meta.py`` proves on the ``meta`` device that no path reaches a CPU-only
branch; these tests run the real arithmetic on the accelerator and compare it with the CPU:

* ``mean`` mode is deterministic: outputs and every gradient equal the CPU's (float64, so
  that a different summation order cannot flip a spike at the threshold);
* ``sample`` mode draws on the device: the firing frequency is ``Phi(u / sigma)``, the
  noise is there (two seeds differ, the noise scales get a gradient), a seed replays;
* host models (snnTorch tutorial nets in both styles, SpikingJelly in both step modes,
  where SpikingJelly's own CUDA neurons take over for its built-in surrogates), compiled
  steps, bfloat16 autocast, the reference networks, ``mc_predict`` and the metrics.

``SBNN_TEST_DEVICE=cpu`` runs the same tests on the CPU against itself (a check of the
tests, not of a device)::

    SBNN_TEST_DEVICE=cpu python -m pytest tests/test_cuda.py
"""

from __future__ import annotations

import copy
import os

import pytest
import snntorch as snn
import snntorch.utils as sutils
import torch
import torch.nn.functional as F
from _snntorch_nets import LoopLeaky, TutorialConv, inputs, seq_conv, seq_leaky
from torch import nn

import sbnn_addons as sb
import sbnn_addons.snntorch as sbnn_snn
import sbnn_addons.spikingjelly as sbnn_sj
from sbnn_addons.metrics import SpikeMonitor, classification_metrics
from sbnn_addons.models import cifar_resnet25, dvs_resnet19, shd_recurrent

DEVICE = torch.device(os.environ.get("SBNN_TEST_DEVICE", "cuda"))

pytestmark = [
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                       reason="no CUDA device (SBNN_TEST_DEVICE=cpu runs these on the CPU)"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


@pytest.fixture(autouse=True)
def _exact_device_arithmetic():
    """No TF32 in the comparisons (cuDNN convolutions use it by default)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().cpu() for n, p in model.named_parameters()
            if p.grad is not None}


def _mean_pass(model, run, x):
    """Output and gradients of one ``mean``-mode pass (float64)."""
    model.zero_grad(set_to_none=True)
    with sb.mode(model, "mean"):
        out = run(model, x)
        out.float().square().sum().backward()
    return out.detach().cpu(), _grads(model)


def _assert_mean_mode_matches_cpu(model: nn.Module, run, x: torch.Tensor) -> None:
    cpu = copy.deepcopy(model).double()  # copies before a forward leaves state behind
    dev = copy.deepcopy(cpu).to(DEVICE)
    ref_out, ref_grads = _mean_pass(cpu, run, x.double())
    out, grads = _mean_pass(dev, run, x.double().to(DEVICE))
    assert ref_out.abs().sum() > 0, "silent network: the comparison would be empty"
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-9)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-7, atol=1e-9,
                                   msg=name)


def _assert_sample_mode_is_noisy(model: nn.Module, run, x: torch.Tensor) -> None:
    """``model`` moved to the device in float32: finite loss, a gradient on every noise
    scale, and two draws that differ (the noise did not vanish on the device's path)."""
    model = model.float().to(DEVICE)
    x = x.float().to(DEVICE)
    outs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model.zero_grad(set_to_none=True)
        out = run(model, x)
        out.float().square().sum().backward()
        outs.append(out.detach())
        noise = [(n, p) for n, p in model.named_parameters() if n.endswith("std_rho")]
        assert noise, "no noise scales"
        for name, p in noise:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert any(p.grad.abs().sum() > 0 for _, p in noise)
    assert not torch.equal(outs[0], outs[1]), "two seeds drew the same spikes"


# --- the spike function ---------------------------------------------------------------


@pytest.mark.parametrize("compiled", [False, True])
def test_spike_fires_with_the_law_of_the_method_on_the_device(compiled):
    torch._dynamo.reset()
    spike = sb.IWSTSpike("st", std=None).to(DEVICE)
    levels = torch.tensor([-1.0, -0.3, 0.0, 0.4, 1.2], device=DEVICE)
    u = levels.repeat_interleave(40000)
    var = torch.full_like(u, 0.49)

    def draw(u):
        return spike(sb.attach_variance(u, var))

    leaf = u.clone().requires_grad_(True)
    torch.manual_seed(0)
    h = (torch.compile(draw, fullgraph=True) if compiled else draw)(leaf)
    h.sum().backward()
    assert h.device.type == DEVICE.type
    freq = h.detach().view(5, -1).mean(1)
    p = torch.special.ndtr(levels / 0.7)
    assert (freq - p).abs().max() < 5 * (0.25 / 40000) ** 0.5
    z = u / 0.7  # ST: the gradient is phi(z) / sigma whatever was drawn
    torch.testing.assert_close(leaf.grad, torch.exp(-0.5 * z * z) / (2 * torch.pi) ** 0.5 / 0.7)


# --- the core layers ------------------------------------------------------------------


class CoreNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = sb.BayesConv2d(1, 4, 3, padding=1, std=0.3, bias_std=0.05)
        self.lif1 = sb.LIF(spike_fn=sb.IWSTSpike("iwst(0.5)"))
        self.fc = sb.BayesLinear(4 * 4 * 4, 5, std=0.3)
        self.lif2 = sb.LIF(spike_fn=sb.IWSTSpike("agr"))

    def forward(self, x):  # x [T, B, 1, 8, 8]
        s1 = s2 = None
        out = 0
        for t in range(x.shape[0]):
            h, s1 = self.lif1(F.avg_pool2d(self.conv(x[t]), 2), s1)
            o, s2 = self.lif2(self.fc(h.flatten(1)), s2)
            out = out + o
        return out


def _call(model, x):
    return model(x)


def test_core_network_on_the_device():
    torch.manual_seed(0)
    net = CoreNet()
    with torch.no_grad():
        net.conv.weight.mul_(3)
        net.fc.weight.mul_(3)
    sb.enable_aux_loss(net)
    x = inputs("conv") * 2
    _assert_mean_mode_matches_cpu(net, _call, x)
    _assert_sample_mode_is_noisy(net, _call, x)


# --- snnTorch -------------------------------------------------------------------------


def _snntorch_run(model, x, reset: bool = True):
    if isinstance(model, nn.Sequential) and reset:
        sutils.reset(model)  # the host's own utility
        return torch.stack([model(xt)[0] for xt in x])
    return model(x)[0]


@pytest.mark.parametrize("build, kind", [(seq_leaky, "mlp"), (seq_conv, "conv"),
                                         (LoopLeaky, "mlp"), (TutorialConv, "conv")])
def test_converted_snntorch_models_on_the_device(build, kind):
    torch.manual_seed(0)
    host = build()
    if isinstance(host, (LoopLeaky, TutorialConv)):
        with torch.no_grad():
            for m in host.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    m.weight.mul_(3)
    model = sbnn_snn.to_sbnn(host, inplace=isinstance(host, nn.Sequential))
    x = inputs(kind)
    _assert_mean_mode_matches_cpu(model, _snntorch_run, x)
    dev = copy.deepcopy(model).float().to(DEVICE)
    _assert_sample_mode_is_noisy(model, _snntorch_run, x)
    # export back on the device: the host model's own forward, the posterior means
    back = sbnn_snn.to_snntorch(dev)
    with torch.no_grad(), sb.mode(dev, "mean"):
        torch.testing.assert_close(_snntorch_run(back, x.to(DEVICE)),
                                   _snntorch_run(dev, x.to(DEVICE)))


def test_drop_in_snntorch_spike_grad_on_the_device():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), snn.Leaky(beta=0.9, init_hidden=True,
                                                     spike_grad=sbnn_snn.spike_grad()),
                        nn.Linear(32, 10), snn.Leaky(beta=0.9, init_hidden=True, output=True,
                                                     spike_grad=sbnn_snn.spike_grad()))
    _assert_sample_mode_is_noisy(net, _snntorch_run, inputs("mlp"))


# --- SpikingJelly ---------------------------------------------------------------------


def _sj_host(step_mode: str, batchnorm: bool) -> nn.Module:
    from spikingjelly.activation_based import functional, layer, neuron, surrogate

    net = nn.Sequential(
        layer.Conv2d(1, 8, 3, padding=1),
        *([layer.BatchNorm2d(8)] if batchnorm else []),
        neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan()), layer.MaxPool2d(2),
        layer.Flatten(), layer.Linear(8 * 4 * 4, 10),
        neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan()),
    )
    functional.set_step_mode(net, step_mode)
    return net


def _sj_run(model, x, reset: bool = True):
    from spikingjelly.activation_based import functional

    if reset:
        functional.reset_net(model)  # the host's own utility
    if model[0].step_mode == "m":
        return model(x)
    return torch.stack([model(xt) for xt in x])


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("batchnorm", [False, True])
def test_converted_spikingjelly_models_on_the_device(step_mode, batchnorm):
    torch.manual_seed(0)
    host = _sj_host(step_mode, batchnorm)
    with torch.no_grad():
        for m in host.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(3)
    if batchnorm:  # statistics of the data, as after training
        host.train()
        _sj_run(host, inputs("conv") * 2)
    host.eval()
    model = sbnn_sj.to_sbnn(host).train()
    x = inputs("conv") * 2
    _assert_mean_mode_matches_cpu(model, _sj_run, x)
    dev = copy.deepcopy(model).float().to(DEVICE).eval()
    _assert_sample_mode_is_noisy(model, _sj_run, x)
    back = sbnn_sj.to_spikingjelly(dev)
    with torch.no_grad(), sb.mode(dev, "mean"):
        torch.testing.assert_close(_sj_run(back, x.to(DEVICE)), _sj_run(dev, x.to(DEVICE)))


def test_drop_in_spikingjelly_surrogate_on_the_device():
    from spikingjelly.activation_based import functional, layer, neuron

    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(64, 32), neuron.LIFNode(
        surrogate_function=sbnn_sj.surrogate_function()), layer.Linear(32, 10),
        neuron.LIFNode(surrogate_function=sbnn_sj.surrogate_function()))
    functional.set_step_mode(net, "m")

    def run(model, x):
        functional.reset_net(model)
        return model(x * 3)

    _assert_sample_mode_is_noisy(net, run, inputs("mlp"))


# --- compiled, autocast, seeds --------------------------------------------------------


def _compiles_whole(fn, *args) -> bool:
    """Whether ``fn(*args)`` compiles with ``fullgraph=True`` on this PyTorch."""
    try:
        torch.compile(fn, fullgraph=True)(*args)
    except Exception:  # noqa: BLE001 - any Dynamo error means "not whole"
        return False
    finally:
        torch._dynamo.reset()
    return True


def _snntorch_compiles_whole() -> bool:
    """Whether snnTorch's own ``Leaky`` compiles whole (PyTorch 2.11 stops at its
    ``mem == None``: the host's limit, not the library's)."""
    lif = snn.Leaky(beta=0.9)
    return _compiles_whole(lambda x, m: lif(x, m), torch.rand(2, 3), torch.zeros(3))


def _spikingjelly_reset_compiles_whole() -> bool:
    """Whether SpikingJelly's own ``functional.reset_net`` compiles whole: its
    ``MemoryModule.reset`` deep-copies each reset value, which PyTorch 2.11's Dynamo does
    not trace (the host's limit, not the library's)."""
    return _compiles_whole(lambda x: x + copy.deepcopy(0.0), torch.rand(2))


@pytest.mark.parametrize("host", ["snntorch", "spikingjelly"])
def test_compiled_training_step_on_the_device(host):
    torch._dynamo.reset()
    torch.manual_seed(0)
    if host == "snntorch" and not _snntorch_compiles_whole():
        pytest.skip(f"snnTorch's own Leaky does not compile whole on torch {torch.__version__}")
    if host == "snntorch":
        model, run, x = sbnn_snn.to_sbnn(seq_leaky()), _snntorch_run, inputs("mlp")
    else:
        model, run, x = sbnn_sj.to_sbnn(_sj_host("m", False)), _sj_run, inputs("conv") * 6
    model = model.to(DEVICE)
    x, y = x.to(DEVICE), torch.arange(x.shape[1], device=DEVICE) % 10
    # where the host's own reset does not compile whole, reset outside the graph, as its
    # users do there
    reset_inside = host == "snntorch" or _spikingjelly_reset_compiles_whole()

    def loss_fn(x, y):
        return F.cross_entropy(run(model, x, reset=reset_inside).sum(0), y)

    graph = torch.compile(loss_fn, fullgraph=True)

    def compiled(x, y, graph=graph):
        if not reset_inside:
            from spikingjelly.activation_based import functional

            functional.reset_net(model)
        return graph(x, y)

    with sb.mode(model, "mean"):
        eager = compiled(x, y, graph=loss_fn)  # the same step, eager
        eager.backward()
        ref = _grads(model)
        model.zero_grad(set_to_none=True)
        loss = compiled(x, y)
        loss.backward()
        torch.testing.assert_close(loss, eager)
        for name, g in _grads(model).items():
            torch.testing.assert_close(g, ref[name], rtol=1e-4, atol=1e-5, msg=name)
    opt = torch.optim.Adam(sb.param_groups(model, lr=5e-3))
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = compiled(x, y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert sum(losses[-3:]) < sum(losses[:3]), losses


@pytest.mark.parametrize("host", ["snntorch", "spikingjelly"])
def test_bfloat16_autocast_step_on_the_device(host):
    torch.manual_seed(0)
    if host == "snntorch":
        model, run, x = sbnn_snn.to_sbnn(seq_conv()), _snntorch_run, inputs("conv")
    else:
        model, run, x = sbnn_sj.to_sbnn(_sj_host("m", False)), _sj_run, inputs("conv") * 6
    model = model.to(DEVICE)
    x, y = x.to(DEVICE), torch.arange(x.shape[1], device=DEVICE) % 10
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = F.cross_entropy(run(model, x).sum(0).float(), y)
    loss.backward()
    assert torch.isfinite(loss)
    grads = _grads(model)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("std_rho"))


def test_seeded_passes_replay_on_the_device():
    torch.manual_seed(0)
    model = sbnn_snn.to_sbnn(seq_leaky()).to(DEVICE).eval()
    x = inputs("mlp").to(DEVICE)

    def forward(m, x):
        return _snntorch_run(m, x).sum(0)

    a = sb.mc_predict(model, x, 4, seed=3, forward=forward, batch_dim=1)
    b = sb.mc_predict(model, x, 4, seed=3, forward=forward, batch_dim=1)
    c = sb.mc_predict(model, x, 4, seed=4, forward=forward, batch_dim=1)
    assert torch.equal(a.sample_probs, b.sample_probs)
    assert not torch.equal(a.sample_probs, c.sample_probs)
    assert a.probs.device.type == DEVICE.type
    assert float(a.spike_counts.sum()) > 0
    y = torch.arange(x.shape[1], device=DEVICE) % 10
    metrics = classification_metrics(a.probs, y)
    assert 0 <= metrics["accuracy"] <= 1 and metrics["nll"] > 0


def test_spike_monitor_counts_on_the_device():
    torch.manual_seed(0)
    model = sbnn_snn.to_sbnn(seq_leaky()).to(DEVICE)
    x = inputs("mlp").to(DEVICE)
    with torch.no_grad(), sb.mode(model, "mean"), SpikeMonitor(model) as mon:
        out = _snntorch_run(model, x)
    assert sum(float(c) for c in mon.counts.values()) > 0
    last = list(mon.counts)[-1]
    assert float(mon.counts[last]) == float(out.sum())


# --- the reference networks -----------------------------------------------------------


@pytest.mark.parametrize("name", ["dvs_resnet19", "shd_recurrent", "cifar_resnet25"])
def test_reference_networks_on_the_device(name):
    torch.manual_seed(0)
    if name == "dvs_resnet19":
        net, x = dvs_resnet19(widths=(4, 4, 4), blocks=1, num_steps=3), torch.rand(3, 2, 2, 8, 8)
    elif name == "shd_recurrent":
        net = shd_recurrent(in_features=6, hidden=(5,), num_classes=3, num_steps=3)
        x = torch.rand(3, 2, 6) * 3
    else:
        net, x = cifar_resnet25(widths=(4, 4, 4, 4), blocks=1), torch.rand(2, 3, 8, 8)
    sb.enable_aux_loss(net)
    _assert_mean_mode_matches_cpu(net, _call, x)
    _assert_sample_mode_is_noisy(net, _call, x)
