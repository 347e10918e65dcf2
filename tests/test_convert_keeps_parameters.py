"""A conversion keeps the model's own weight and bias objects as the posterior means: an
optimizer (or parameter group, hook, decay list) built before ``to_sbnn(model,
inplace=True)`` still trains the converted model's means, as in snnTorch / SpikingJelly
code where the optimizer is built with the model."""

from __future__ import annotations

import snntorch as snn
import torch
from _snntorch_nets import LoopLeaky, seq_conv
from snntorch import utils as snn_utils
from torch import nn

import sbnn_addons as sb
from sbnn_addons import snntorch as sbnn_snn

T = 8


def _weights(model: nn.Module) -> list[nn.Parameter]:
    return [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def test_snntorch_optimizer_built_before_an_inplace_conversion_trains_the_means():
    torch.manual_seed(0)
    net = seq_conv()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    before = [w.detach().clone() for w in _weights(net)]
    ids = [id(w) for w in _weights(net)]
    sbnn_snn.to_sbnn(net, inplace=True)
    assert [id(m.weight) for m in net.modules() if sb.layers.is_bayesian(m)] == ids
    x = torch.rand(T, 4, 1, 8, 8) * 2
    snn_utils.reset(net)
    out = torch.stack([net(x_t)[0] for x_t in x]).sum(0)
    nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    assert all(not torch.equal(w, b) for w, b in zip(_weights(net), before))


def test_snntorch_copy_conversion_leaves_the_original_alone_and_ties_stay_tied():
    torch.manual_seed(0)
    net = LoopLeaky()
    net.fc2.weight = nn.Parameter(torch.randn(10, 32))
    frozen = net.fc1.bias.requires_grad_(False)
    copy = sbnn_snn.to_sbnn(net)  # default: a copy
    assert copy.fc1.weight is not net.fc1.weight
    torch.testing.assert_close(copy.fc1.weight, net.fc1.weight)
    assert not copy.fc1.bias.requires_grad and not frozen.requires_grad
    tied = nn.Sequential(nn.Linear(6, 6), snn.Leaky(beta=0.9, init_hidden=True),
                         nn.Linear(6, 6), snn.Leaky(beta=0.9, init_hidden=True))
    tied[2].weight = tied[0].weight
    sbnn_snn.to_sbnn(tied, inplace=True)
    assert tied[2].weight is tied[0].weight


def test_spikingjelly_optimizer_built_before_an_inplace_conversion_trains_the_means():
    from spikingjelly.activation_based import functional, layer, neuron

    from sbnn_addons import spikingjelly as sbnn_sj

    torch.manual_seed(0)
    net = nn.Sequential(layer.Conv2d(1, 8, 3, padding=1), layer.BatchNorm2d(8),
                        neuron.LIFNode(), layer.Flatten(), layer.Linear(8 * 8 * 8, 4),
                        neuron.LIFNode())
    functional.set_step_mode(net, "m")
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    w0, w1 = net[0].weight, net[4].weight
    before = (w0.detach().clone(), w1.detach().clone())
    sbnn_sj.to_sbnn(net, inplace=True)
    assert net[0].weight is w0 and net[4].weight is w1
    x = torch.rand(T, 4, 1, 8, 8) * 3
    functional.reset_net(net)
    out = net(x).mean(0)
    nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    assert not torch.equal(w0, before[0]) and not torch.equal(w1, before[1])
