"""A readout's noise (a Bayesian layer whose output reaches the model's output without a
spike) does not act and its std gets no gradient: the first training forward warns and
names it, ``check_variance_flow`` reports it, and ``bench.compare`` leaves it
deterministic. Real host models: SpikingJelly's zoo SEW-ResNet-18 (readout ``fc``) and an
snnTorch ``nn.Sequential`` ending in ``nn.Linear``."""

from __future__ import annotations

import warnings

import pytest
import snntorch as snn
import torch
from _sj_helpers import import_zoo
from spikingjelly.activation_based import functional, neuron, surrogate
from torch import nn

import sbnn_addons as sb
from sbnn_addons import snntorch as sbnn_snn
from sbnn_addons import spikingjelly as sbnn_sj


def _sew_resnet18() -> nn.Module:
    torch.manual_seed(0)
    net = import_zoo("sew_resnet").sew_resnet18(
        spiking_neuron=neuron.IFNode, surrogate_function=surrogate.ATan(), detach_reset=True,
        num_classes=10, cnf="ADD")
    functional.set_step_mode(net, "m")
    return net


def test_zoo_resnet_readout_warns_once_and_names_fc():
    model = sbnn_sj.to_sbnn(_sew_resnet18())
    x = torch.rand(2, 2, 3, 16, 16) * 4
    with pytest.warns(UserWarning, match=r"\('fc'\).*exclude=\['fc'\]"):
        model(x).mean(0).sum().backward()
    assert model.fc.std_rho.grad is None  # what the warning is about
    functional.reset_net(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per model
        model(x).mean(0).sum().backward()
    report = sb.check_variance_flow(model, x)
    assert report.readouts == ["fc"]

    fixed = sbnn_sj.to_sbnn(_sew_resnet18(), exclude="fc")
    assert not sb.layers.is_bayesian(fixed.fc)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fixed(x).mean(0).sum().backward()
    assert sb.check_variance_flow(fixed, x).readouts == []
    assert fixed.conv1.std_rho.grad is not None


def test_no_warning_in_evaluation_or_for_spiking_outputs():
    model = sbnn_sj.to_sbnn(_sew_resnet18())
    x = torch.rand(2, 2, 3, 16, 16) * 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(x)
        model.eval()
        model(x)
    seq = sbnn_snn.to_sbnn(nn.Sequential(
        nn.Linear(12, 16), snn.Leaky(beta=0.9, init_hidden=True),
        nn.Linear(16, 4), snn.Leaky(beta=0.9, init_hidden=True)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.stack([seq(x_t) for x_t in torch.rand(3, 5, 12)]).sum().backward()


def test_snntorch_linear_readout_warns_and_compare_excludes_it():
    def make_net():
        return nn.Sequential(nn.Linear(12, 16), snn.Leaky(beta=0.9, init_hidden=True),
                             nn.Linear(16, 4))

    seq = sbnn_snn.to_sbnn(make_net())
    with pytest.warns(UserWarning, match=r"\('2'\)"):
        torch.stack([seq(x_t) for x_t in torch.rand(3, 5, 12)]).sum().backward()

    from sbnn_addons.bench import compare

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(40, 4, 12, generator=g) < 0.4).float()
    y = torch.arange(40) % 4
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(seed|class|samples).*")
        res = compare(make_net, (x, y), (x, y), layout="BT", methods=["sbnn-st"],
                      epochs=1, batch_size=20, mc_samples=2, keep_models=True)
    model = res.rows[0]["_model"]
    assert not sb.layers.is_bayesian(model[2]) and sb.layers.is_bayesian(model[0])
