"""Mean-mode equivalence of converted SpikingJelly models with the originals (exact).

With ``std=0, learn_std=False`` and ``mean`` mode every converted model must emit exactly
the same spikes as the original SpikingJelly model over a whole sequence (torch.equal):
the spike function fires at ``u >= 0`` (``at_zero=True``), like SpikingJelly's Heaviside.
"""

from __future__ import annotations

import pytest
import torch
from _sj_helpers import import_zoo, record_spikes, run_sequence
from torch import nn

import sbnn_addons
from sbnn_addons import spikingjelly as sbnn_sj

pytest.importorskip("spikingjelly")
from spikingjelly.activation_based import functional, layer, neuron, surrogate  # noqa: E402

NEURONS = {
    "if": lambda sm: neuron.IFNode(step_mode=sm),
    "lif": lambda sm: neuron.LIFNode(tau=2.0, step_mode=sm),
    "lif_nodecay_soft": lambda sm: neuron.LIFNode(
        tau=3.0, decay_input=False, v_reset=None, step_mode=sm
    ),
    "plif": lambda sm: neuron.ParametricLIFNode(init_tau=2.5, step_mode=sm),
}


def _conv_net(node, sm):
    return nn.Sequential(
        layer.Conv2d(2, 6, 3, padding=1, step_mode=sm),
        layer.BatchNorm2d(6, step_mode=sm),
        node(sm),
        layer.MaxPool2d(2, 2, step_mode=sm),
        layer.Flatten(step_mode=sm),
        layer.Linear(6 * 4 * 4, 10, step_mode=sm),
        node(sm),
    )


def _seq_net(node, sm):
    # plain torch layers inside SeqToANNContainer (multi-step only)
    return nn.Sequential(
        layer.SeqToANNContainer(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6)),
        node("m"),
        layer.SeqToANNContainer(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(6 * 4 * 4, 10)),
        node("m"),
    )


def _randomise_bn(net: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 1.0)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)


def _boost(net: nn.Module, gain: float = 3.0) -> None:
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(gain)


def _assert_same_spikes(net, x, sm, batchnorm="affine"):
    net.eval()
    ref_store, hs = record_spikes(net)
    ref = run_sequence(net, x, sm)
    for h in hs:
        h.remove()
    sbnn = sbnn_sj.to_sbnn(net, std=0.0, learn_std=False, spike_std=None, batchnorm=batchnorm)
    sbnn.eval()
    store, hs = record_spikes(sbnn)
    with sbnn_addons.mode(sbnn, "mean"):
        out = run_sequence(sbnn, x, sm)
    assert torch.equal(ref, out)
    assert len(store) == len(ref_store) > 0
    for a, b in zip(ref_store, store):
        assert torch.equal(a, b)
    total = torch.stack([s.sum() for s in ref_store]).sum()
    assert total > 0, "no spikes at all: the comparison would be vacuous"
    return ref_store


@pytest.mark.parametrize("sm", ["s", "m"])
@pytest.mark.parametrize("kind", list(NEURONS))
def test_wrapper_layers_exact(kind, sm):
    torch.manual_seed(0)
    net = _conv_net(NEURONS[kind], sm)
    _randomise_bn(net)
    _boost(net)
    x = (torch.rand(6, 3, 2, 8, 8) < 0.4).float()
    spikes = _assert_same_spikes(net, x, sm)
    # the first layer's neurons are really active (non-trivial)
    rate = torch.stack([s.float().mean() for s in spikes if s.shape[-1] == 8]).mean()
    assert 0 < rate < 1


@pytest.mark.parametrize("kind", list(NEURONS))
def test_seq_to_ann_container_exact(kind):
    torch.manual_seed(1)
    net = _seq_net(NEURONS[kind], "m")
    _randomise_bn(net)
    _boost(net)
    x = (torch.rand(6, 3, 2, 8, 8) < 0.4).float()
    _assert_same_spikes(net, x, "m")


@pytest.mark.parametrize("batchnorm", ["keep", "affine"])
def test_batchnorm_modes_exact_in_eval(batchnorm):
    torch.manual_seed(2)
    net = _conv_net(NEURONS["lif"], "m")
    _randomise_bn(net)
    _boost(net)
    x = (torch.rand(5, 2, 2, 8, 8) < 0.4).float()
    _assert_same_spikes(net, x, "m", batchnorm=batchnorm)


def test_keep_batchnorm_exact_in_train_mode():
    """With batchnorm='keep' the means are unchanged even with batch statistics."""
    torch.manual_seed(4)
    net = _conv_net(NEURONS["lif"], "m")
    _boost(net)
    x = (torch.rand(5, 4, 2, 8, 8) < 0.4).float()
    sbnn = sbnn_sj.to_sbnn(net, std=0.0, learn_std=False, spike_std=None, batchnorm="keep")
    net.train()
    sbnn.train()
    ref = run_sequence(net, x, "m")
    with sbnn_addons.mode(sbnn, "mean"):
        out = run_sequence(sbnn, x, "m")
    assert torch.equal(ref, out)


def test_dvs_gesture_net_exact():
    from spikingjelly.activation_based.model import parametric_lif_net

    torch.manual_seed(0)
    net = parametric_lif_net.DVSGestureNet(
        channels=4, spiking_neuron=neuron.ParametricLIFNode,
        surrogate_function=surrogate.ATan(), detach_reset=True,
    )
    functional.set_step_mode(net, "m")
    _randomise_bn(net)
    _boost(net, 4.0)
    x = (torch.rand(2, 1, 2, 128, 128) < 0.3).float()
    _assert_same_spikes(net, x, "m")


@pytest.mark.parametrize("arch", ["sew_resnet18", "spiking_resnet18"])
def test_resnet_zoo_exact(arch):
    sew_resnet, spiking_resnet = import_zoo("sew_resnet"), import_zoo("spiking_resnet")

    torch.manual_seed(0)
    kw = dict(spiking_neuron=neuron.IFNode, surrogate_function=surrogate.ATan(),
              detach_reset=True, num_classes=10)
    if arch == "sew_resnet18":
        net = sew_resnet.sew_resnet18(cnf="ADD", **kw)
    else:
        net = spiking_resnet.spiking_resnet18(**kw)
    functional.set_step_mode(net, "m")
    _randomise_bn(net)
    x = torch.rand(2, 1, 3, 16, 16) * 4
    for bn in ("keep", "affine"):
        _assert_same_spikes(net, x, "m", batchnorm=bn)
