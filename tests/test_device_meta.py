"""Every public layer, neuron, model, converter and loss runs on the ``meta`` device.

A meta tensor has a shape, a dtype and a device but no values: a code path that reaches
a CPU-only branch (the C kernels, a ``.cpu()``, a tensor created without ``device=``) or
reads a value on the host (``.item()``, ``bool(t)``) fails here. So a CUDA user cannot hit
such a branch either: these tests prove the device-agnostic path on a CPU-only machine.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sbnn_addons as sb
from sbnn_addons.models import cifar_resnet25, dvs_resnet19, shd_recurrent

META = torch.device("meta")


def _backward_reaches(model: nn.Module, out: torch.Tensor) -> None:
    assert out.device.type == "meta"
    out.float().sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.device.type == "meta" for g in grads)
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert all(w.grad is not None for w in weights)


@pytest.mark.parametrize("std_mode, estimator",
                         [("layer", "st"), ("channel", "iwst(0.5)"), ("weight", "agr")])
def test_core_layers_and_lif_on_meta(std_mode, estimator):
    conv = sb.BayesConv2d(2, 3, 3, padding=1, std_mode=std_mode, bias_std=0.1, device=META)
    fc = sb.BayesLinear(3 * 8 * 8, 4, std_mode=std_mode, device=META)
    lif1 = sb.LIF(spike_fn=sb.IWSTSpike(estimator, std=0.2, learn_std=True)).to(META)
    lif2 = sb.LIF(spike_fn=sb.IWSTSpike(estimator)).to(META)
    net = nn.ModuleList([conv, fc, lif1, lif2])
    sb.enable_aux_loss(net)
    x = torch.rand(5, 2, 2, 8, 8, device=META)
    h1 = lif1.run(conv(x.flatten(0, 1)).reshape(5, 2, 3, 8, 8))
    h2 = lif2.run(fc(h1.flatten(2).flatten(0, 1)).reshape(5, 2, 4))
    loss = sb.sbnn_objective(h2.mean(), net, 100, kl_weight=1.0, aux_weight=0.1)
    _backward_reaches(net, loss)


def test_conv1d_affine_and_step_lif_on_meta():
    conv = sb.BayesConv1d(2, 3, 3, padding=1, device=META)
    affine = sb.ChannelAffine(3).to(META)
    lif = sb.LIF().to(META)
    state = None
    for _ in range(3):
        spikes, state = lif(affine(conv(torch.rand(4, 2, 10, device=META))), state)
    assert spikes.shape == (4, 3, 10)
    _backward_reaches(nn.ModuleList([conv, affine]), spikes)


@pytest.mark.parametrize("mode", ["sample", "mean"])
def test_reference_networks_on_meta(mode):
    nets = [
        (dvs_resnet19(widths=(4, 4, 4), blocks=1, num_steps=2), torch.rand(2, 2, 2, 8, 8)),
        (shd_recurrent(in_features=6, hidden=(5,), num_classes=3, num_steps=3),
         torch.rand(3, 2, 6)),
        (cifar_resnet25(widths=(4, 4, 4, 4), blocks=1), torch.rand(2, 3, 8, 8)),
    ]
    for net, x in nets:
        net = net.to(META)
        sb.set_mode(net, mode)
        _backward_reaches(net, net(x.to(META)))


def test_converted_snntorch_model_on_meta():
    snn = pytest.importorskip("snntorch")
    from sbnn_addons.snntorch import reset, to_sbnn

    net = nn.Sequential(nn.Linear(6, 5), snn.Leaky(beta=0.9, init_hidden=True),
                        nn.Linear(5, 3), snn.Leaky(beta=0.9, init_hidden=True, output=True))
    model = to_sbnn(net).to(META)
    reset(model)
    out = sum(model(torch.rand(2, 6, device=META))[1] for _ in range(3))
    _backward_reaches(model, out)


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_converted_spikingjelly_model_on_meta(step_mode):
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import functional, layer, neuron

    from sbnn_addons.spikingjelly import to_sbnn

    net = nn.Sequential(layer.Linear(6, 5), neuron.LIFNode(), layer.Linear(5, 3),
                        neuron.LIFNode())
    functional.set_step_mode(net, step_mode)
    model = to_sbnn(net).to(META)
    functional.reset_net(model)
    x = torch.rand(3, 2, 6, device=META)
    out = model(x) if step_mode == "m" else torch.stack([model(x[t]) for t in range(3)])
    _backward_reaches(model, out)


def test_kernels_never_serve_a_non_cpu_tensor():
    x = torch.rand(4, 3, device=META)
    assert not sb.kernels.can_fuse(x, torch.zeros((), device=META))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_conversion_keeps_the_model_dtype(dtype):
    """Every parameter a conversion adds (noise scales, folded affines) takes the
    model's float dtype: a float64 or bfloat16 model stays one model of one dtype."""
    import snntorch as snn
    from spikingjelly.activation_based import layer, neuron

    from sbnn_addons import snntorch as sbnn_snn
    from sbnn_addons import spikingjelly as sbnn_sj

    net = nn.Sequential(nn.Linear(10, 16), snn.Leaky(beta=0.9, init_hidden=True)).to(dtype)
    models = [sbnn_snn.to_sbnn(net)]
    sj = nn.Sequential(layer.Conv2d(2, 4, 3, step_mode="m"), layer.BatchNorm2d(4, step_mode="m"),
                       neuron.LIFNode(step_mode="m")).to(dtype)
    models += [sbnn_sj.to_sbnn(sj), sbnn_sj.to_sbnn(sj, batchnorm="affine")]
    for model in models:
        assert {p.dtype for p in model.parameters()} == {dtype}
    x = torch.rand(3, 2, 2, 6, 6, dtype=dtype)
    assert models[2](x).dtype == dtype


def test_reset_parameters_after_to_empty_leaves_no_uninitialised_tensor():
    """The meta-device recipe ``to_empty()`` then ``reset_parameters()`` on every module
    that has it (as for a BatchNorm) re-initialises the mean-only affines (identity) and
    the recurrent layers' diagonal masks: they had no ``reset_parameters`` and kept the
    uninitialised memory (here 7.0), a silently wrong affine or mask."""
    from sbnn_addons.models import StepAffine, ZeroDiagBayesLinear, ZeroDiagLinear
    from sbnn_addons.spikingjelly import ChannelAffine as SJChannelAffine

    makers = [lambda: sb.ChannelAffine(4), lambda: SJChannelAffine(4, step_mode="m"),
              lambda: StepAffine(4, num_steps=3), lambda: ZeroDiagLinear(5),
              lambda: ZeroDiagBayesLinear(5, std=0.1),
              lambda: shd_recurrent(in_features=6, hidden=(5,), num_classes=3, num_steps=3),
              lambda: dvs_resnet19(widths=(4, 4, 4), blocks=1, num_steps=2)]
    for make in makers:
        torch.manual_seed(0)
        fresh = make()
        with torch.device(META):
            model = make()
        model.to_empty(device="cpu")
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                t.fill_(7.0)
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        want = dict([*fresh.named_parameters(), *fresh.named_buffers()])
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            assert not (t == 7.0).all(), (type(model).__name__, name)
            if name.endswith("diag_mask") or "norm" in name or isinstance(
                    model, (sb.ChannelAffine, StepAffine)):
                assert torch.equal(t, want[name]), (type(model).__name__, name)
            if name.endswith("weight") and hasattr(model, "diag_mask"):
                assert not t.diagonal().any()


@pytest.mark.parametrize("std_mode", ["layer", "channel"])
def test_spikingjelly_model_built_on_meta_converts_and_loads_a_checkpoint(std_mode):
    """A SpikingJelly model built on the ``meta`` device (as the host allows) converts:
    the converted stds, sized from the weights' RMS, raised "Tensor.item() cannot be
    called on meta tensors" (with a folded BatchNorm, as a BatchNorm that "cannot fold").
    After ``to_empty()`` a converted checkpoint loads and runs as the saved model, and
    ``reset_parameters()`` sizes each std from the drawn weights."""
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import functional, layer, neuron

    from sbnn_addons.layers import converted_std
    from sbnn_addons.spikingjelly import to_sbnn

    def host():
        net = nn.Sequential(layer.Conv2d(1, 4, 3, padding=1), layer.BatchNorm2d(4),
                            neuron.LIFNode(), layer.Flatten(), layer.Linear(4 * 36, 3),
                            neuron.LIFNode())
        return functional.set_step_mode(net, "m") or net

    torch.manual_seed(0)
    saved = to_sbnn(host(), batchnorm="affine", std_mode=std_mode)
    with torch.device(META):
        model = to_sbnn(host(), batchnorm="affine", std_mode=std_mode)
    model.to_empty(device="cpu")
    model.load_state_dict(saved.state_dict())
    x = (torch.rand(4, 2, 1, 6, 6) < 0.5).float()
    with torch.no_grad():
        for m in (saved, model):
            sb.seed_spikes(m, 1)
            functional.reset_net(m)
        assert torch.equal(model(x), saved(x))
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    for name in ("0", "4"):
        fc = model.get_submodule(name)
        torch.testing.assert_close(fc.std, torch.full_like(fc.std, converted_std(fc.weight)))


@pytest.mark.parametrize("learn_std", [True, False])
def test_kl_to_a_scale_mixture_prior_follows_the_weights_device(learn_std):
    """``scale_mixture_prior()`` is built without knowing the weights' device (on the
    CPU): its Monte Carlo KL against weights on another device raised "Tensor on device
    cpu is not on the expected device meta!" (on CUDA: "Expected all tensors to be on the
    same device"), and a fixed std's zero check read it on the host."""
    prior = sb.scale_mixture_prior(0.5, 1.0, 1e-3)
    model = nn.Sequential(
        sb.BayesLinear(4, 3, std_mode="weight", bias_std=0.1, learn_std=learn_std,
                       device=META),
        sb.BayesConv2d(2, 3, 3, std_mode="channel", learn_std=learn_std, device=META))
    kl = sb.kl_divergence(model, prior, num_samples=2)
    assert kl.device.type == "meta" and kl.shape == ()
    kl.backward()
    assert all(p.grad.device.type == "meta" for p in model.parameters()
               if p.grad is not None)
    assert prior.on(torch.device("cpu")) is prior  # a CPU model: the prior as built
    # a user's distribution with parameters on another device: an error naming the fix
    laplace = torch.distributions.Laplace(torch.zeros(3, 4), torch.ones(3, 4))
    with pytest.raises(ValueError, match="build the prior's tensors on the weights' device"):
        model[0].kl_divergence(laplace)


@pytest.mark.parametrize("estimator", ["st", "iwst(0.5)", "agr"])
def test_spike_functions_and_sampler_on_meta(estimator):
    """The spike functions on their own (fixed, learned and zero std, an attached
    variance), :func:`sample_spikes` and the reference networks' surrogate spikes."""
    from sbnn_addons.models import SURROGATES, SurrogateSpike

    spikes = [sb.IWSTSpike(estimator), sb.IWSTSpike(estimator, std=0.3, learn_std=True),
              sb.IWSTSpike(estimator, std=0.0), *(SurrogateSpike(s) for s in SURROGATES)]
    for spike in spikes:
        spike = spike.to(META)
        u = torch.randn(4, 5, device=META, requires_grad=True)
        out = spike(u)
        assert out.device.type == "meta"
        out.sum().backward()
        assert u.grad.device.type == "meta"
    u = torch.randn(4, 5, device=META, requires_grad=True)
    noisy = sb.attach_variance(u * 1.0, torch.full((4, 5), 0.1, device=META))
    sb.IWSTSpike(estimator).to(META)(noisy).sum().backward()
    sigma = torch.full((4, 5), 0.3, device=META, requires_grad=True)
    sb.sample_spikes(u, sigma, sb.get_estimator(estimator)).sum().backward()
    assert sigma.grad.device.type == "meta"


@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_lif_resets_modes_checkpoint_and_optimiser_on_meta(reset):
    """The LIF's resets, the evaluation modes, :func:`sbnn_addons.checkpoint.checkpoint`,
    the KL to a Gaussian prior and an optimiser step on the noise groups."""
    from sbnn_addons.checkpoint import checkpoint

    fc = sb.BayesLinear(4, 3, std_mode="weight", bias_std=0.1, device=META)
    lif = sb.LIF(reset=reset, spike_fn=sb.IWSTSpike("iwst(0.5)", std=0.2, learn_std=True)).to(META)
    net = nn.ModuleList([fc, lif])
    for m in ("mean", "mc", "sample"):
        sb.set_mode(net, m)
        assert lif.run(fc(torch.rand(3, 2, 4, device=META))).device.type == "meta"
    with sb.mode(net, "mean"):
        lif.run(fc(torch.rand(3, 2, 4, device=META)))
    x = torch.rand(3, 2, 4, device=META, requires_grad=True)
    out = checkpoint(lambda v: lif.run(fc(v)), x, modules=net)
    loss = out.sum() + sb.kl_divergence(net, sb.GaussianPrior(0.5))
    opt = torch.optim.Adam(sb.param_groups(net, 1e-3))
    _backward_reaches(net, loss)
    opt.step()
    assert all(p.device.type == "meta" for p in sb.noise_parameters(net))


def test_metrics_spike_monitor_and_synops_on_meta():
    """:class:`SpikeMonitor` counts on the device of the spikes, and
    :func:`~sbnn_addons.metrics.layer_synops` of every weight layer stays there."""
    from sbnn_addons.metrics import SpikeMonitor, layer_synops

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = sb.BayesConv2d(2, 3, 3, padding=1)
            self.fc = sb.BayesLinear(3 * 6 * 6, 4)
            self.lif1, self.lif2 = sb.LIF(), sb.LIF()

        def forward(self, x):
            h = self.lif1.run(self.conv(x.flatten(0, 1)).unflatten(0, x.shape[:2]))
            return self.lif2.run(self.fc(h.flatten(2))).sum(0)

    net = Net().to(META)
    with SpikeMonitor(net) as mon:
        net((torch.rand(3, 2, 2, 6, 6, device=META) < 0.5).float())
    assert {t.device.type for t in [*mon.counts.values(), *mon.synops.values()]} == {"meta"}
    for layer, x in [(net.fc, torch.rand(2, 108, device=META)),
                     (net.conv, torch.rand(2, 2, 6, 6, device=META)),
                     (nn.Conv1d(2, 3, 3).to(META), torch.rand(2, 2, 6, device=META))]:
        assert layer_synops(layer, x).device.type == "meta"


@pytest.mark.parametrize("batchnorm", ["affine", "keep"])
@pytest.mark.filterwarnings("ignore:batchnorm=.affine. folds")
@pytest.mark.filterwarnings("ignore:Inhibition is an unstable feature")
def test_converted_snntorch_neurons_and_round_trip_on_meta(batchnorm):
    """Every supported snnTorch neuron (``Leaky``, ``RLeaky``, with ``inhibition``,
    without ``init_hidden``) after ``to_sbnn``, and ``to_snntorch`` back."""
    snn = pytest.importorskip("snntorch")
    from sbnn_addons.snntorch import membrane_variance, reset, to_sbnn, to_snntorch

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)
            self.lif1 = snn.Leaky(beta=0.9, reset_mechanism="zero")
            self.fc = nn.Linear(4 * 16, 5)
            self.lif2 = snn.RLeaky(beta=0.9, linear_features=5)
            self.fc2 = nn.Linear(5, 3)
            self.lif3 = snn.Leaky(beta=0.9, inhibition=True)

        def forward(self, x):
            mem1, (spk2, mem2), mem3 = (self.lif1.init_leaky(), self.lif2.init_rleaky(),
                                        self.lif3.init_leaky())
            out = []
            for t in range(x.shape[0]):
                spk1, mem1 = self.lif1(self.bn(self.conv(x[t])), mem1)
                spk2, mem2 = self.lif2(self.fc(spk1.flatten(1)), spk2, mem2)
                spk3, mem3 = self.lif3(self.fc2(spk2), mem3)
                out.append(spk3)
            return torch.stack(out)

    hidden = nn.Sequential(nn.Linear(6, 5),
                           snn.RLeaky(beta=0.9, linear_features=5, init_hidden=True),
                           nn.Linear(5, 3),
                           snn.Leaky(beta=0.9, init_hidden=True, inhibition=True, output=True))
    model = to_sbnn(hidden, batchnorm=batchnorm).to(META)
    reset(model)
    out = sum(model(torch.rand(2, 6, device=META))[0] for _ in range(3))
    assert membrane_variance(model[1]).device.type == "meta"
    _backward_reaches(model, out)
    model = to_sbnn(Loop(), batchnorm=batchnorm).to(META)
    _backward_reaches(model, model(torch.rand(3, 2, 1, 6, 6, device=META)))
    back = to_snntorch(model)
    assert {p.device.type for p in back.parameters()} == {"meta"}


@pytest.mark.filterwarnings("ignore:batchnorm=.affine. folds")
@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("batchnorm", ["affine", "keep"])
def test_converted_spikingjelly_neurons_and_round_trip_on_meta(step_mode, batchnorm):
    """Every supported SpikingJelly neuron (``IFNode``, ``LIFNode``,
    ``ParametricLIFNode``) with a convolution and a BatchNorm after ``to_sbnn``, and
    ``to_spikingjelly`` back."""
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import functional, layer, neuron

    from sbnn_addons.spikingjelly import to_sbnn, to_spikingjelly

    for node in (neuron.IFNode(), neuron.ParametricLIFNode()):
        net = nn.Sequential(layer.Conv2d(1, 4, 3), layer.BatchNorm2d(4), node,
                            layer.Flatten(), layer.Linear(4 * 16, 3), neuron.LIFNode())
        functional.set_step_mode(net, step_mode)
        model = to_sbnn(net, batchnorm=batchnorm).to(META)
        functional.reset_net(model)
        x = torch.rand(3, 2, 1, 6, 6, device=META)
        out = model(x) if step_mode == "m" else torch.stack([model(x[t]) for t in range(3)])
        _backward_reaches(model, out)
        back = to_spikingjelly(model)
        assert {p.device.type for p in back.parameters()} == {"meta"}


def test_spikingjelly_drop_in_parts_on_meta():
    """The drop-in surrogate (with :func:`link_neuron`) and the step-mode layers."""
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import neuron

    from sbnn_addons import spikingjelly as sj

    layers = nn.ModuleList([sj.BayesLinear(6, 5, step_mode="m"),
                            sj.BayesConv1d(2, 3, 3, padding=1, step_mode="m"),
                            sj.BayesConv2d(2, 3, 3, padding=1, step_mode="m"),
                            sj.ChannelAffine(3, step_mode="m")]).to(META)
    node = sj.link_neuron(neuron.LIFNode(surrogate_function=sj.surrogate_function("iwst(0.5)"),
                                         step_mode="m").to(META))
    outs = [node(layers[0](torch.rand(3, 2, 6, device=META))),
            layers[3](layers[1](torch.rand(3, 2, 2, 7, device=META))),
            layers[3](layers[2](torch.rand(3, 2, 2, 5, 5, device=META)))]
    _backward_reaches(layers, sum(o.sum() for o in outs))


@pytest.mark.parametrize("bayes", [True, False])
def test_reference_network_variants_on_meta(bayes):
    """The reference networks with their other options: deterministic (surrogate
    spikes), BatchNorm per step, readout noise, checkpointed blocks."""
    from sbnn_addons.models import SpikingResNet, paper_recipe

    nets = [
        (SpikingResNet(2, 3, (4, 4), blocks=1, bayes=bayes, num_steps=2,
                       norm="affine" if bayes else "bn", readout_noise=bayes,
                       checkpoint=True, stem_pool=True),
         torch.rand(2, 2, 2, 8, 8)),
        (shd_recurrent(in_features=6, hidden=(5, 4), num_classes=3, num_steps=3,
                       bayes=bayes), torch.rand(3, 2, 6)),
    ]
    for net, x in nets:
        net = net.to(META)
        _backward_reaches(net, net(x.to(META)))
    opt, schedule = paper_recipe(net, "shd", epochs=2)  # the SHD network's recipe
    opt.step()
    schedule.step()


def test_metrics_and_uncertainty_on_meta():
    """The tensor metrics and the Monte Carlo uncertainty run on the device of their
    input: their value checks (rows summing to one, targets in range, NaN) read the
    values on the host, and on the ``meta`` device, which has none, they raised "Tensor.item()
    cannot be called on meta tensors" instead of being skipped (as ``check_finite``
    skips them). Python-float results (``classification_metrics``, ``ood_metrics``,
    ``mc_predict``'s spike counts) need values; the ACE's ``unique_consecutive`` has no
    meta kernel."""
    from sbnn_addons import metrics, uncertainty

    probs = torch.rand(8, 4, device=META)
    targets = torch.randint(0, 4, (8,), device=META)
    metrics.check_probabilities(probs, targets)
    for fn in (metrics.negative_log_likelihood, metrics.brier_score,
               metrics.expected_calibration_error):
        assert fn(probs, targets).device.type == "meta", fn.__name__
    assert uncertainty.entropy(probs).device.type == "meta"
    for pred in (uncertainty.from_sample_probs(torch.rand(3, 8, 4, device=META)),
                 uncertainty.from_sample_probs(torch.rand(3, 8, 4, device=META,
                                                          dtype=torch.bfloat16)),
                 uncertainty.time_as_samples(torch.rand(3, 8, 4, device=META))):
        assert {t.device.type for t in (pred.probs, pred.entropy, pred.mutual_information,
                                        pred.expected_entropy)} == {"meta"}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.lif = sb.BayesLinear(4, 3), sb.LIF()

        def forward(self, x):
            return self.lif.run(self.fc(x)).sum(0)

    net = Net().to(META)
    x = torch.rand(3, 2, 4, device=META)
    for kw in ({}, {"chunk_size": 2}, {"fold": True, "batch_dim": 1}):
        pred = sb.mc_predict(net, x, num_samples=3, count_spikes=False, **kw)
        assert pred.probs.shape == (2, 3) and pred.probs.device.type == "meta"
    pred = sb.mc_predict(net, x, num_samples=2, count_spikes=False, output="probs",
                         forward=lambda m, v: torch.softmax(m(v), -1))
    assert pred.sample_probs.device.type == "meta"


@pytest.mark.parametrize("reset_mechanism", ["subtract", "zero"])
def test_snntorch_drop_in_spike_grad_on_meta(reset_mechanism):
    """``snn.Leaky(spike_grad=sbnn_addons.snntorch.spike_grad(...))`` without conversion:
    the reset call's lookup of the spikes its membrane emitted compared values
    (``membrane.any()``, ``torch.equal``) and raised "Tensor.item() cannot be called on
    meta tensors"; a membrane without values matches none (the record kept with the
    membrane itself still does)."""
    snn = pytest.importorskip("snntorch")
    from sbnn_addons.snntorch import spike_grad

    fc = nn.Linear(6, 5).to(META)
    lif = snn.Leaky(beta=0.9, spike_grad=spike_grad("iwst(0.5)"),
                    reset_mechanism=reset_mechanism).to(META)
    hidden = snn.Leaky(beta=0.9, spike_grad=spike_grad("agr"), init_hidden=True,
                       reset_mechanism=reset_mechanism, output=True).to(META)
    mem, out = lif.init_leaky(), 0
    for _ in range(3):
        spk, mem = lif(fc(torch.rand(2, 6, device=META)), mem)
        out = out + spk + hidden(fc(torch.rand(2, 6, device=META)))[0]
    _backward_reaches(fc, out)


@pytest.mark.parametrize("weights", ["gaussian", "binary"])
def test_expectation_propagation_on_meta(weights):
    """:class:`~sbnn_addons.ep.EPNetwork` on the device of its buffers: inference, the
    update and the export. ``to_sbnn_layers()`` built the layers on the CPU and copied
    the posterior into them (a CUDA network exported CPU layers; on ``meta``: "Cannot
    copy out of meta tensor"), and the input and label checks read values."""
    from sbnn_addons import ep

    net = ep.EPNetwork([4, 5, 3], weights=weights).to(META)
    x = torch.rand(6, 4, device=META, dtype=net.mean0.dtype)
    y = torch.randint(0, 3, (6,), device=META)
    outs = [*net.output_moments(x), net.log_evidence(x, y), net.predict_proba(x),
            net.deterministic_logits(x), net.predict(x), net.update(x, y),
            net.log_evidence(x, torch.ones(6, 3, device=META))]
    assert {t.device.type for t in outs} == {"meta"}
    layers = net.to_sbnn_layers()
    assert {t.device.type for t in [*layers.parameters(), *layers.buffers()]} == {"meta"}
    layers(x.float()).sum().backward()
    sb_layers = nn.Sequential(sb.BayesLinear(4, 5, device=META), sb.IWSTSpike("st"),
                              sb.BayesLinear(5, 3, device=META))
    assert ep.from_sbnn_layers(sb_layers).mean0.device.type == "meta"


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.filterwarnings("ignore:batchnorm=.affine. folds")
def test_spikingjelly_model_moved_to_meta_folds_its_batchnorms(affine):
    """A SpikingJelly model on the ``meta`` device (``.to("meta")``, or built there),
    converted outside a ``torch.device("meta")`` block with ``batchnorm="affine"``: the
    step-mode ``ChannelAffine`` was built on the CPU and loaded the folded values from the
    device ("cannot fold BatchNorm '1' ... Cannot copy out of meta tensor"; on CUDA a
    round trip through the CPU)."""
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import functional, layer, neuron

    from sbnn_addons.spikingjelly import ChannelAffine, to_sbnn

    net = nn.Sequential(layer.Conv2d(1, 4, 3), layer.BatchNorm2d(4, affine=affine),
                        neuron.LIFNode(), layer.Flatten(), layer.Linear(4 * 16, 3),
                        neuron.LIFNode()).to(META)
    functional.set_step_mode(net, "m")
    model = to_sbnn(net, batchnorm="affine", std_mode="channel")
    assert isinstance(model[1], ChannelAffine)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    functional.reset_net(model)
    _backward_reaches(model, model(torch.rand(3, 2, 1, 6, 6, device=META)))


def test_spikingjelly_float64_batchnorm_folds_exactly():
    """A float64 SpikingJelly BatchNorm folded by ``batchnorm="affine"`` keeps its float64
    values: the step-mode ``ChannelAffine`` was built in float32, loaded the folded
    values (rounded to float32, errors of 6e-8) and only then cast to float64."""
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import functional, layer, neuron

    from sbnn_addons.spikingjelly import to_sbnn

    torch.manual_seed(0)
    net = nn.Sequential(layer.Conv2d(1, 4, 3), layer.BatchNorm2d(4), neuron.LIFNode()).double()
    with torch.no_grad():
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].running_mean.normal_()
        net[1].num_batches_tracked += 1
    functional.set_step_mode(net, "m")
    want = sb.ChannelAffine.from_batchnorm(net[1])
    got = to_sbnn(net, batchnorm="affine")[1]
    assert got.weight.dtype == torch.float64
    assert torch.equal(got.weight, want.weight) and torch.equal(got.bias, want.bias)


@pytest.mark.parametrize("make, shape", [
    (lambda: shd_recurrent(in_features=6, hidden=(5,), num_classes=3, num_steps=3),
     (3, 2, 6)),
    (lambda: dvs_resnet19(widths=(4, 4, 4), blocks=1, num_steps=2), (2, 2, 2, 8, 8)),
], ids=["shd_recurrent", "dvs_resnet19"])
def test_deterministic_twin_on_the_networks_device_and_dtype(make, shape):
    """``deterministic_twin()`` built the twin on the CPU in float32, loaded the
    network's means into it and moved it to the network's device only: from the ``meta``
    device the load raised ("Cannot copy out of meta tensor"; from CUDA a round trip
    through the CPU), and a float64 network's twin was float32, its means rounded."""
    net = make().to(META)
    twin = net.deterministic_twin()
    assert {t.device.type for t in [*twin.parameters(), *twin.buffers()]} == {"meta"}
    _backward_reaches(twin, twin(torch.rand(shape, device=META)))
    torch.manual_seed(0)
    net = make().double()
    twin = net.deterministic_twin()
    assert {p.dtype for p in twin.parameters()} == {torch.float64}
    means = {k: v for k, v in net.state_dict().items() if k in twin.state_dict()}
    assert means and all(torch.equal(twin.state_dict()[k], v) for k, v in means.items())


def test_variance_flow_tools_and_share_posterior_on_meta():
    """The variance rules between a layer and its neuron (scale, shift, pooling, dropout,
    reshapes), :func:`track_variance`, :func:`check_variance_flow` and
    :func:`share_posterior` on the ``meta`` device."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.pool = sb.BayesConv2d(2, 3, 3, padding=1), nn.AvgPool2d(2)
            self.drop, self.lif = nn.Dropout(0.1), sb.LIF()
            self.fc, self.lif2 = sb.BayesLinear(12, 3, std_mode="weight"), sb.LIF()

        def forward(self, x):
            c = self.drop(self.pool(self.conv(x.flatten(0, 1)) * 2.0 + 1.0))
            h = self.lif.run(c.unflatten(0, x.shape[:2]))
            return self.lif2.run(self.fc(h.flatten(2))).sum(0)

    net = Net().to(META)
    x = torch.rand(3, 2, 2, 4, 4, device=META)
    report = sb.check_variance_flow(net, x)
    assert report is not None
    sb.track_variance(net)
    with sb.variance_flow(), sb.share_posterior():
        out = net(x)
    _backward_reaches(net, out)
    carried = sb.attach_variance(x * 1.0, torch.full_like(x, 0.1))
    assert sb.get_variance(carried).device.type == "meta"


@pytest.mark.parametrize("kwargs", [{}, {"spike_std": 0.2, "learn_std": False}])
def test_snntorch_model_on_meta_converts_and_loads_a_checkpoint(kwargs):
    """An snnTorch model moved to the ``meta`` device (snnTorch cannot build one there)
    converts: the converter read each neuron's threshold for its spike function ("Tensor.item()
    cannot be called on meta tensors"). After ``to_empty()`` a converted checkpoint
    (thresholds, spike stds) loads and runs as the saved model; the spike functions read
    the loaded thresholds."""
    snn = pytest.importorskip("snntorch")
    from sbnn_addons.snntorch import reset, to_sbnn

    def host():
        return nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4),
            snn.Leaky(beta=0.9, threshold=2.0, init_hidden=True), nn.Flatten(),
            nn.Linear(4 * 16, 3),
            snn.Leaky(beta=0.8, threshold=0.5, init_hidden=True, output=True))

    torch.manual_seed(0)
    saved = to_sbnn(host(), **kwargs)
    model = to_sbnn(host().to(META), **kwargs)
    reset(model)
    _backward_reaches(model, model(torch.rand(2, 1, 6, 6, device=META))[0])
    model.to_empty(device="cpu")
    model.load_state_dict(saved.state_dict())
    x = torch.rand(4, 2, 1, 6, 6) * 3
    outs = []
    for m in (saved, model):
        sb.seed_spikes(m, 1)
        reset(m)
        with torch.no_grad():
            outs.append(torch.stack([m(x[t])[0] for t in range(4)]))
    assert torch.equal(*outs)
    spikes = [[(s.threshold, float(s.std.mean())) for s in m.modules()
               if isinstance(s, sb.IWSTSpike)] for m in (saved, model)]
    assert spikes[0] == spikes[1] and spikes[0][0][0] == 2.0


def test_seeded_spike_functions_on_meta():
    """Seeded spike functions (:func:`seed_spikes`, ``mc_predict(seed=)``, their replay in
    :func:`sbnn_addons.checkpoint.checkpoint`, the readout noise's stream) on the ``meta``
    device: the private generator was made on the drive's device, which PyTorch refuses
    for ``meta`` ("META device type not an accelerator"); there a seeded draw takes no
    generator (no values to draw), after the same checks."""
    from sbnn_addons.checkpoint import checkpoint

    fc = sb.BayesLinear(4, 3, device=META)
    lif = sb.LIF(spike_fn=sb.IWSTSpike("iwst(0.5)", std=0.2)).to(META)
    net = nn.ModuleList([fc, lif])
    sb.seed_spikes(net, 1)
    x = torch.rand(3, 2, 4, device=META, requires_grad=True)
    _backward_reaches(net, checkpoint(lambda v: lif.run(fc(v)), x, modules=net))
    ref = shd_recurrent(in_features=6, hidden=(5,), num_classes=3, num_steps=3,
                        readout_noise=True).to(META)
    sb.seed_spikes(ref, 2)
    _backward_reaches(ref, ref(torch.rand(3, 2, 6, device=META)))
    pred = sb.mc_predict(ref, torch.rand(3, 2, 6, device=META), num_samples=2, seed=0,
                         count_spikes=False)
    assert pred.probs.device.type == "meta"
