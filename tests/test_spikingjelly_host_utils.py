"""SpikingJelly's own utilities on converted models (issue 15): the noise variance is
the neuron's registered memory (reset_net, detach_net, copies mid-sequence), include /
exclude names, validation before an inplace conversion changes anything, the original
surrogate back on export. Real SpikingJelly models only (parametric_lif_net zoo)."""

from __future__ import annotations

import copy
import functools
import pickle
import warnings

import pytest
import torch
from _copies import HOW, copy_by
from _sj_helpers import initial_membrane_net, run_steps
from torch import nn

import sbnn_addons
from sbnn_addons import spikingjelly as sbnn_sj
from sbnn_addons.moments import VarianceFlowError

pytest.importorskip("spikingjelly")
from spikingjelly.activation_based import functional, layer, neuron, surrogate  # noqa: E402
from spikingjelly.activation_based.model import parametric_lif_net  # noqa: E402

T = 4


def _mnist_net(sm="m", **kw):
    """SpikingJelly's zoo MNISTNet (conv, BatchNorm, max-pool, dropout, linear, voting)."""
    torch.manual_seed(0)
    kw.setdefault("surrogate_function", surrogate.ATan(alpha=3.0))
    net = parametric_lif_net.MNISTNet(channels=2, spiking_neuron=neuron.LIFNode, **kw)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(4.0)
    functional.set_step_mode(net, sm)
    return net.eval()


def _x(steps=T, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(steps, batch, 1, 28, 28, generator=g) < 0.3).float()


def _run(model, x, sm):
    if sm == "m":
        return model(x)
    return torch.stack([model(xt) for xt in x])


def _nodes(model):
    return [m for m in model.modules() if isinstance(m, neuron.LIFNode)]


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("sm", ["s", "m"])
def test_copy_mid_sequence_carries_the_variance(how, sm):
    model = sbnn_sj.to_sbnn(_mnist_net(sm))
    x = _x(steps=2 * T)
    with torch.no_grad():
        functional.reset_net(model)
        _run(model, x[:T], sm)
        assert all(isinstance(n.sbnn_var, torch.Tensor) for n in _nodes(model))
        dup = copy_by(model, how)
        sbnn_addons.seed_spikes(model, 11)
        sbnn_addons.seed_spikes(dup, 11)
        a = _run(model, x[T:], sm)
        b = _run(dup, x[T:], sm)
    assert torch.equal(a, b)
    for n, m in zip(_nodes(model), _nodes(dup)):
        assert torch.equal(n.sbnn_var, m.sbnn_var)


def test_variance_is_a_registered_memory_reset_and_detached_by_spikingjelly():
    model = sbnn_sj.to_sbnn(_mnist_net("m"))
    x = _x()
    model(x)
    node = _nodes(model)[0]
    assert "sbnn_var" in dict(node.named_memories())
    assert node.sbnn_var.requires_grad  # through the layers' std
    functional.detach_net(model)
    assert all(not n.sbnn_var.requires_grad for n in _nodes(model))
    functional.reset_net(model)
    assert all(n.sbnn_var is None for n in _nodes(model))
    # a fresh sequence after reset_net equals the first one (same noise)
    sbnn_addons.seed_spikes(model, 2)
    first = model(x)
    functional.reset_net(model)
    sbnn_addons.seed_spikes(model, 2)
    assert torch.equal(model(x), first)


def test_set_step_mode_after_conversion_keeps_the_sequence():
    model = sbnn_sj.to_sbnn(_mnist_net("m"))
    x = _x()
    with torch.no_grad(), sbnn_addons.mode(model, "mean"):
        functional.reset_net(model)
        multi = model(x)
        functional.set_step_mode(model, "s")
        functional.reset_net(model)
        single = _run(model, x, "s")
    assert torch.equal(multi, single)


def test_export_restores_the_original_surrogate():
    model = sbnn_sj.to_sbnn(_mnist_net("m"))
    for plain in (sbnn_sj.to_spikingjelly(model),
                  sbnn_sj.to_spikingjelly(pickle.loads(pickle.dumps(model)))):
        for node in _nodes(plain):
            assert type(node.surrogate_function) is surrogate.ATan
            assert node.surrogate_function.alpha == 3.0
            assert "sbnn_var" not in dict(node.named_memories())
    plain = sbnn_sj.to_spikingjelly(model, surrogate_function=surrogate.Sigmoid(alpha=2.0))
    assert all(type(n.surrogate_function) is surrogate.Sigmoid for n in _nodes(plain))



def _atan_function(x):
    """A surrogate given as a plain function (SpikingJelly keeps it as a plain attribute)."""
    return surrogate.ATan(alpha=3.0)(x)


def test_export_restores_or_sets_a_plain_function_surrogate_and_names_a_class():
    """A neuron built with a plain function as its surrogate (SpikingJelly accepts one)
    exports with it (it raised torch's 'cannot assign ... as child module'), so does a
    function given to to_spikingjelly; a surrogate class instead of an instance, or a
    non-callable, is named before anything is copied."""
    host = _mnist_net("m", surrogate_function=_atan_function)
    x = _x()
    functional.reset_net(host)
    want = host(x)
    model = sbnn_sj.to_sbnn(host)
    for given in (None, _atan_function):
        plain = sbnn_sj.to_spikingjelly(model, surrogate_function=given)
        assert all(n.surrogate_function is _atan_function for n in _nodes(plain))
        assert all("surrogate_function" not in n._modules for n in _nodes(plain))
        functional.reset_net(plain)
        assert torch.equal(plain(x), want)
    with pytest.raises(TypeError, match=r"surrogate\.ATan\(\), got the class ATan"):
        sbnn_sj.to_spikingjelly(model, surrogate_function=surrogate.ATan)
    with pytest.raises(TypeError, match="got str"):
        sbnn_sj.to_spikingjelly(model, surrogate_function="atan")


# --------------------------------------------------------------------------- include / exclude
@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_legacy_weight_norm_layer_stays_deterministic_and_is_named(norm):
    """A ``layer.Linear`` under the legacy ``torch.nn.utils.weight_norm`` /
    ``spectral_norm`` was converted with the weight it had, its normalisation dropped
    silently: it stays as it is (hook and all) and the warning names the fix."""
    import warnings

    net = nn.Sequential(layer.Linear(8, 4), neuron.LIFNode(), layer.Linear(4, 2),
                        neuron.LIFNode())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # weight_norm is deprecated
        getattr(torch.nn.utils, norm)(net[0])
    with pytest.warns(UserWarning, match=rf"'0' \(Linear with torch.nn.utils.{norm}\).*"
                                         rf"remove_{norm}"):
        model = sbnn_sj.to_sbnn(net)
    assert type(model[0]) is layer.Linear and sbnn_addons.is_bayesian(model[2])
    assert sbnn_addons.layers.legacy_weight_norm(model[0]) == norm
    model(torch.rand(3, 8)).sum().backward()
    assert all(p.grad is not None for p in model[0].parameters())
    with pytest.raises(ValueError, match=r"include pattern '0' matches no .*\['2'\]"):
        sbnn_sj.to_sbnn(net, include=["0", "2"])  # named, not left deterministic silently


def test_single_string_include_exclude_is_one_name():
    net = _mnist_net()
    model = sbnn_sj.to_sbnn(net, exclude="conv_fc.0")
    assert not sbnn_addons.is_bayesian(model.conv_fc[0])
    assert sbnn_addons.is_bayesian(model.conv_fc[4]) and sbnn_addons.is_bayesian(model.conv_fc[10])
    model = sbnn_sj.to_sbnn(net, include="conv_fc.13")
    bayes = [n for n, m in model.named_modules() if sbnn_addons.is_bayesian(m)]
    assert bayes == ["conv_fc.13"]


@pytest.mark.parametrize("kw, name", [({"include": "conv_fc.9"}, "conv_fc.9"),
                                      ({"exclude": "conv_fc.99"}, "conv_fc.99"),
                                      ({"include": ["conv_fc.0", "fc*"]}, "fc*")])
def test_unknown_name_is_named(kw, name):
    with pytest.raises(ValueError, match=name.replace("*", r"\*")):
        sbnn_sj.to_sbnn(_mnist_net(), **kw)


def test_exclude_keeps_an_unsupported_neuron_and_refuses_its_variance():
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(8, 6), neuron.LIFNode(), layer.Linear(6, 4),
                        neuron.QIFNode())
    with pytest.raises(TypeError, match=r"'3'.*QIFNode.*exclude=\['3'"):
        sbnn_sj.to_sbnn(net)
    model = sbnn_sj.to_sbnn(net, exclude=["2", "3"])
    assert type(model[3]) is neuron.QIFNode and sbnn_addons.is_bayesian(model[0])
    assert model(torch.rand(5, 8)).shape == (5, 4)
    bad = sbnn_sj.to_sbnn(net, exclude="3")  # the layer feeding it is still Bayesian
    with pytest.raises(VarianceFlowError, match="QIFNode was excluded.*feeding it"):
        bad(torch.rand(5, 8))


@pytest.mark.parametrize("make", [
    lambda: neuron.PSN(T=4),  # not a MemoryModule
    lambda: neuron.ILCLIFNode(act_dim=2, dec_pop_dim=3),  # not a MemoryModule, has a Conv1d
    lambda: neuron.DSRIFNode(step_mode="m"),  # no surrogate_function
    lambda: neuron.DSRLIFNode(step_mode="m"),
])
def test_every_spikingjelly_neuron_class_is_checked(make):
    """Any neuron of SpikingJelly's neuron package that is not supported is named at
    conversion, whatever its base class (a DSRIFNode in front of which the layer noise
    vanished silently); excluded with the layer feeding it, it converts, runs, and the
    export leaves no hook behind."""
    net = nn.Sequential(layer.Linear(8, 6, step_mode="m"), make(),
                        layer.Linear(6, 4, step_mode="m"), neuron.LIFNode(step_mode="m"))
    name = type(net[1]).__name__
    with pytest.raises(TypeError, match=rf"'1' \({name}\).*not supported.*exclude="):
        sbnn_sj.to_sbnn(net)
    model = sbnn_sj.to_sbnn(net, exclude=["0", "1"])
    assert not sbnn_addons.is_bayesian(model[0]) and sbnn_addons.is_bayesian(model[2])
    sbnn_sj.reset(model)
    assert model(torch.rand(4, 3, 8)).shape == (4, 3, 4)
    back = sbnn_sj.to_spikingjelly(model)
    hooks = [h for m in back.modules() for h in (*m._forward_pre_hooks.values(),
                                                 *m._forward_hooks.values())]
    assert not [h for h in hooks if h.__module__.startswith("sbnn_addons")]


class _RNNNet(nn.Module):
    """A SpikingJelly spiking RNN (``rnn.SpikingLSTM`` / ``SpikingGRU`` /
    ``SpikingVanillaRNN``, or one of its cells stepped by hand) read out by a converted
    layer and neuron."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        from spikingjelly.activation_based import rnn

        self.cell = kind.endswith("Cell")
        self.rnn = getattr(rnn, kind)(8, 6) if self.cell else getattr(rnn, kind)(8, 6, 1)
        self.fc = layer.Linear(6, 3, step_mode="m")
        self.sn = neuron.LIFNode(step_mode="m")

    def forward(self, x):
        if self.cell:
            state, hs = None, []
            for xt in x:
                state = self.rnn(xt, state)
                hs.append(state[0] if isinstance(state, tuple) else state)
            y = torch.stack(hs)
        else:
            y = self.rnn(x)[0]
        return self.sn(self.fc(y))


@pytest.mark.parametrize("decode", ["last_mem", "mean-mem", "max-mem", "max-abs-mem"])
def test_a_membrane_readout_of_a_bayesian_layer_is_named(decode):
    """SpikingJelly's membrane readout NonSpikingLIFNode fed by a converted layer: its
    noise reaches no spike (the layer's std gets no gradient). The membrane sums the
    layer's draws of all steps, which the flow cannot tell apart (an unknown variance):
    the forward warned for none of the decodings, or (max-mem, whose max lost the draws)
    raised a VarianceFlowError blaming a `.data`. Every decoding warns, naming the layer
    and the exclude; with that exclude the model runs without a word."""
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(8, 6, step_mode="m"), neuron.LIFNode(step_mode="m"),
                        layer.Linear(6, 4, step_mode="m"),
                        neuron.NonSpikingLIFNode(tau=2.0, decode=decode))
    x = torch.rand(T, 3, 8) * 3
    model = sbnn_sj.to_sbnn(net)
    with pytest.warns(UserWarning, match=r"feed no spiking neuron.*exclude=\['2'\]"):
        out = model(x)
    assert out.shape == (3, 4)
    model = sbnn_sj.to_sbnn(net, exclude="2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sbnn_sj.reset(model)
        model(x).sum().backward()
    assert model[0].std_rho.grad is not None

@pytest.mark.parametrize("kind", ["SpikingLSTM", "SpikingGRU", "SpikingVanillaRNN",
                                  "SpikingLSTMCell"])
def test_a_spiking_rnn_is_named_at_conversion_with_the_exclude_that_keeps_it(kind):
    """SpikingJelly's spiking RNNs apply its surrogates to their nn.Linear outputs
    directly, without a neuron: to_sbnn made those layers Bayesian and the first forward
    raised a VarianceFlowError asking to convert "the neuron" (there is none, and the
    model was converted). The conversion names the RNN and the exclude that keeps it
    deterministic, before an inplace conversion changes anything; with that exclude the
    model converts, runs and trains the rest."""
    torch.manual_seed(0)
    net = _RNNNet(kind)
    before = _snapshot(net)
    with pytest.raises(TypeError, match=rf"'rnn' \({kind}\).*exclude=\['rnn'"):
        sbnn_sj.to_sbnn(net, inplace=True)
    after = _snapshot(net)
    assert before[1:] == after[1:]
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    model = sbnn_sj.to_sbnn(net, exclude="rnn")
    assert sbnn_addons.is_bayesian(model.fc)
    assert not any(sbnn_addons.is_bayesian(m) for m in model.rnn.modules())
    sbnn_sj.reset(model)
    model(torch.rand(4, 2, 8) * 2).sum().backward()
    assert model.fc.weight.grad is not None and model.fc.std_rho.grad is not None
    # an include that leaves the RNN's layers out converts too
    assert sbnn_addons.is_bayesian(sbnn_sj.to_sbnn(net, include="fc").fc)


# --------------------------------------------------------------------------- validation
def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [type(m) for m in model.modules()],
            [type(n.surrogate_function) for n in _nodes(model)])


@pytest.mark.parametrize("kwargs, match", [
    ({"estimator": "iwts"}, "iwts"),
    ({"std": -1.0}, "std"),
    ({"std_mode": "neuron"}, "std_mode"),
    ({"bias_std": float("inf")}, "bias_std"),
    ({"spike_std": -0.5}, "std"),
    ({"batchnorm": "fold"}, "batchnorm"),
    ({"include": "conv_fc.9"}, "conv_fc.9"),
    ({"exclude": ["conv_fc.0", "nope"]}, "nope"),
    ({"exclude": 5}, "exclude"),
])
def test_failed_inplace_conversion_leaves_model_untouched(kwargs, match):
    net = _mnist_net()
    before = _snapshot(net)
    with pytest.raises((ValueError, TypeError), match=match):
        sbnn_sj.to_sbnn(net, inplace=True, **kwargs)
    after = _snapshot(net)
    assert before[1:] == after[1:]
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert not any(n._forward_pre_hooks for n in _nodes(net))


def test_batchnorm_that_cannot_fold_fails_before_an_inplace_conversion_changes_anything():
    """batchnorm="affine" folds every BatchNorm before the model changes: one that cannot
    be folded (a weight of the wrong size) gives an error that names it, and the layers
    before it stay unconverted (they were converted before the raw error)."""
    torch.manual_seed(0)
    net = nn.Sequential(layer.Conv2d(2, 4, 3, padding=1), neuron.IFNode(),
                        layer.Conv2d(4, 4, 3, padding=1), layer.BatchNorm2d(4), neuron.IFNode())
    net[3].weight = nn.Parameter(torch.ones(3))
    before = ({k: v.clone() for k, v in net.state_dict().items()},
              [type(m) for m in net.modules()])
    with pytest.raises(ValueError, match=r"cannot fold BatchNorm '3'.*exclude=\['3'\]"):
        sbnn_sj.to_sbnn(net, batchnorm="affine", inplace=True)
    assert [type(m) for m in net.modules()] == before[1]
    assert all(torch.equal(v, before[0][k]) for k, v in net.state_dict().items())
    assert not any(n._forward_pre_hooks for n in net.modules())


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_batchnorm_after_a_neuron_does_not_fold_into_the_layer_before_the_neuron(step_mode):
    """batchnorm="affine" folds a BatchNorm's scale into the std of the layer whose outputs
    it normalises. A BatchNorm after a neuron (conv -> LIF -> BN -> conv) normalises the
    spikes: its scale was folded into the convolution before the neuron anyway (the last
    weight layer in module order), so that layer's initial noise came out scaled by
    ``weight / sqrt(running_var)`` (30x here), silently. It is folded only into a layer
    it directly follows."""
    torch.manual_seed(0)
    net = nn.Sequential(layer.Conv2d(2, 4, 3, padding=1), neuron.LIFNode(),
                        layer.BatchNorm2d(4), layer.Conv2d(4, 4, 3, padding=1),
                        layer.BatchNorm2d(4), neuron.LIFNode())
    functional.set_step_mode(net, step_mode)
    with torch.no_grad():
        net[2].running_var.fill_(0.01)
        net[2].weight.fill_(3.0)
        net[4].running_var.fill_(4.0)
        net[2].num_batches_tracked += 1
        net[4].num_batches_tracked += 1
    keep = sbnn_sj.to_sbnn(net, batchnorm="keep")
    affine = sbnn_sj.to_sbnn(net, batchnorm="affine")
    assert torch.equal(affine[0].std, keep[0].std)  # the BatchNorm reads spikes
    torch.testing.assert_close(affine[3].std, keep[3].std / 2)  # 1 / sqrt(4): folded
    assert isinstance(affine[2], sbnn_sj.ChannelAffine)


class _GroupedNet(nn.Module):
    """Layers declared grouped by type (conv1, conv2, bn1, bn2), run conv1 -> bn1 -> LIF
    -> conv2 -> bn2 -> LIF."""

    def __init__(self):
        super().__init__()
        self.conv1 = layer.Conv2d(2, 4, 3, padding=1)
        self.conv2 = layer.Conv2d(4, 4, 3, padding=1)
        self.bn1 = layer.BatchNorm2d(4)
        self.bn2 = layer.BatchNorm2d(4)
        self.sn1 = neuron.LIFNode()
        self.sn2 = neuron.LIFNode()
        with torch.no_grad():
            self.bn1.running_var.fill_(0.01)
            self.bn2.running_var.fill_(4.0)
            self.bn1.num_batches_tracked += 1
            self.bn2.num_batches_tracked += 1

    def forward(self, x):
        return self.sn2(self.bn2(self.conv2(self.sn1(self.bn1(self.conv1(x))))))


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_batchnorm_scale_folds_into_the_layer_the_forward_calls_it_after(step_mode):
    """batchnorm="affine" folds a BatchNorm's scale into the std of the layer it follows.
    A model declaring its layers grouped by type (conv1, conv2, bn1, bn2) and running
    conv1 -> bn1 -> LIF -> conv2 -> bn2 had bn1's scale folded into conv2 (10x its noise)
    and none into conv1, silently: the pairing read the declaration order. With
    example_input the pairing is the call order; without it, the first forward checks
    the declared pairs and raises, naming the BatchNorm, the layer and the fix; a model
    declared in call order (the zoo's) runs as before, the check's hooks gone after it."""
    torch.manual_seed(0)
    net = _GroupedNet()
    functional.set_step_mode(net, step_mode)
    x = torch.rand(*((T,) if step_mode == "m" else ()), 2, 2, 5, 5)
    s1, s2 = (0.01 + 1e-5) ** -0.5, (4.0 + 1e-5) ** -0.5
    state = {k: v.clone() for k, v in net.state_dict().items()}
    keep = sbnn_sj.to_sbnn(net, batchnorm="keep")
    affine = sbnn_sj.to_sbnn(net, batchnorm="affine", example_input=x)
    torch.testing.assert_close(affine.conv1.std, keep.conv1.std * s1)
    torch.testing.assert_close(affine.conv2.std, keep.conv2.std * s2)
    for k, v in net.state_dict().items():  # the model's state is left as it was
        assert torch.equal(v, state[k]), k
    assert net.sn1.v == 0.0 and net.training
    affine(x)
    declared = sbnn_sj.to_sbnn(net, batchnorm="affine")
    with pytest.raises(ValueError, match=r"'bn1'.*'conv2'.*'conv1'.*example_input=x"):
        declared(x)
    ordered = nn.Sequential(net.conv1, net.bn1, net.sn1, net.conv2, net.bn2, net.sn2)
    model = sbnn_sj.to_sbnn(ordered, batchnorm="affine")
    torch.testing.assert_close(model[0].std, keep.conv1.std * s1)
    torch.testing.assert_close(model[3].std, keep.conv2.std * s2)

    def hooks(m):
        return sum(len(n._forward_pre_hooks) + len(n._forward_hooks) for n in m.modules())

    armed = hooks(model)
    model(x)
    functional.reset_net(model)
    assert hooks(model) < armed
    assert hooks(model) == hooks(sbnn_sj.to_sbnn(ordered, batchnorm="affine", example_input=x))


def test_spikingjelly_monitor_records_a_converted_models_spikes():
    """SpikingJelly's monitor (which imports tensorboard, listed in the spikingjelly
    extra) records a converted neuron's spikes."""
    monitor = pytest.importorskip("spikingjelly.activation_based.monitor",
                                  exc_type=ImportError)
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(6, 5, step_mode="m"), neuron.IFNode(step_mode="m"))
    sbnn = sbnn_sj.to_sbnn(net)
    mon = monitor.OutputMonitor(sbnn, neuron.IFNode)
    try:
        out = sbnn(torch.rand(T, 3, 6) * 2)
        assert mon.monitored_layers == ["1"] and torch.equal(mon.records[0], out)
    finally:
        mon.remove_hooks()


def test_conversion_does_not_touch_the_original_state():
    net = _mnist_net()
    with torch.no_grad():
        net(_x())
    v = [n.v.clone() for n in _nodes(net)]
    sbnn_sj.to_sbnn(net)  # a copy: the original keeps its membranes
    assert all(torch.equal(a, n.v) for a, n in zip(v, _nodes(net)))


def test_conversion_and_export_after_a_training_forward_with_v_seq():
    """A model whose state holds a graph outside the neuron memories (store_v_seq=True
    keeps v_seq) converts and exports after a forward with gradients."""
    net = nn.Sequential(layer.Linear(6, 5, step_mode="m"),
                        neuron.LIFNode(step_mode="m", store_v_seq=True))
    net(torch.rand(4, 3, 6)).sum().backward()
    model = sbnn_sj.to_sbnn(net)
    model(torch.rand(4, 3, 6)).sum().backward()
    plain = sbnn_sj.to_spikingjelly(model)
    assert type(plain[1]) is neuron.LIFNode


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_conversion_after_a_training_forward_with_a_delay_queue(step_mode):
    """layer.Delay keeps its last inputs as a list memory: after a forward with gradients
    (the last training batch) the list holds graph tensors, and to_sbnn failed in its
    deepcopy ("Only Tensors created explicitly by the user ... support the deepcopy
    protocol"); it converts, and the copy starts from an empty queue."""
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(6, 5), layer.Delay(2), neuron.LIFNode())
    functional.set_step_mode(net, step_mode)
    x = torch.rand(4, 3, 6)
    _run(net, x, step_mode).sum().backward()
    assert any(t.grad_fn is not None for t in net[1].queue)
    model = sbnn_sj.to_sbnn(net)
    assert model[1].queue == [] and len(net[1].queue) == 2
    _run(model, x, step_mode).sum().backward()
    assert model[0].std_rho.grad is not None


@pytest.mark.parametrize("exclude", [None, "0.0"])
@pytest.mark.parametrize("wrap", ["block", "neuron"])
def test_spikingjelly_memopt_checkpoint_is_refused_naming_the_way_out(wrap, exclude):
    """SpikingJelly's memopt.checkpoint_module runs a neuron through its functional
    forward, past the hooks that carry the noise variance: it failed with a misleading
    VarianceFlowError ("sub of two tensors that share one Bayesian layer's noise") or,
    without a Bayesian layer in front, with SpikingJelly's "Memory length mismatch". It is
    refused naming sbnn_addons.checkpoint.checkpoint; the exported model checkpoints."""
    from spikingjelly.activation_based import memopt

    torch.manual_seed(0)
    net = nn.Sequential(nn.Sequential(layer.Linear(6, 8), neuron.LIFNode()),
                        layer.Linear(8, 4), neuron.LIFNode())
    functional.set_step_mode(net, "m")
    model = sbnn_sj.to_sbnn(net, exclude=exclude)
    if wrap == "block":
        model[0] = memopt.checkpoint_module(model[0])
    else:
        model[0][1] = memopt.checkpoint_module(model[0][1])
    functional.reset_net(model)
    with pytest.raises(RuntimeError,
                       match=r"functional forward of a converted LIFNode.*memopt.*"
                             r"sbnn_addons\.checkpoint\.checkpoint"):
        model(torch.rand(3, 2, 6))
    plain = sbnn_sj.to_spikingjelly(sbnn_sj.to_sbnn(net, exclude=exclude))
    plain[0] = memopt.checkpoint_module(plain[0])
    functional.reset_net(plain)
    plain(torch.rand(3, 2, 6)).sum().backward()


def test_stub_torchvision_lets_the_model_zoo_import():
    """SpikingJelly's sew_resnet imports torchvision only for pretrained weights: the zoo
    imports inside the stub's block (a nested block changes nothing), the stub is gone
    after it, and the zoo model builds."""
    import sys

    from sbnn_addons.spikingjelly import stub_torchvision

    with stub_torchvision() as installed:
        assert "torchvision" in sys.modules
        with stub_torchvision() as again:
            assert again is False  # already there: nothing changes
        assert "torchvision" in sys.modules
        from spikingjelly.activation_based.model import sew_resnet
    assert "torchvision" not in sys.modules or not installed

    net = sew_resnet.sew_resnet18(cnf="ADD", num_classes=3, spiking_neuron=neuron.IFNode)
    assert sum(p.numel() for p in net.parameters()) > 0


def test_metrics_import_torchmetrics_after_the_stub():
    """After the stub's block, torchmetrics (behind sbnn_addons.metrics) imports: a stub
    left in sys.modules made its torchvision probe fail (fresh process: import order)."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from sbnn_addons.spikingjelly import stub_torchvision\n"
        "with stub_torchvision():\n"
        "    from spikingjelly.activation_based.model import sew_resnet\n"
        "from sbnn_addons import metrics\n"
        "p = torch.tensor([[0.7, 0.3], [0.2, 0.8]])\n"
        "print(float(metrics.expected_calibration_error(p, torch.tensor([0, 0]))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_new_batch_size_without_reset_starts_the_variance_afresh(step_mode):
    """SpikingJelly starts a new membrane when the input's shape changes (no reset_net):
    the noise variance starts afresh with it, so the second sequence equals a fresh run."""
    from _sj_helpers import run_sequence

    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(6, 8, step_mode=step_mode),
                        neuron.IFNode(v_reset=None, step_mode=step_mode))  # soft reset
    model = sbnn_sj.to_sbnn(net, std=1.0)
    fresh = copy.deepcopy(model)

    def run(x):  # no reset between sequences
        return model(x) if step_mode == "m" else torch.stack([model(xt) for xt in x])

    run(torch.rand(4, 1, 6) * 2)
    x = torch.rand(4, 3, 6) * 2
    torch.manual_seed(5)
    got, var = run(x), getattr(model[1], sbnn_sj.VAR_MEMORY).clone()
    torch.manual_seed(5)
    want = run_sequence(fresh, x, step_mode)
    assert torch.equal(got, want)
    torch.testing.assert_close(var, getattr(fresh[1], sbnn_sj.VAR_MEMORY))


@pytest.mark.parametrize("order", ["assign", "reset_between"])
def test_reset_net_of_a_parent_resets_a_converted_submodule(order):
    """``net.body = to_sbnn(net.body)`` after ``functional.reset_net(net)`` cached the
    parent's module list: the parent's next ``reset_net`` resets the new neurons (their
    membranes and noise variances), also when the parent was reset between the
    conversion and the assignment; two equal batches give equal outputs."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(layer.Linear(5, 8, step_mode="m"),
                                      neuron.LIFNode(step_mode="m"))
            self.head = nn.Sequential(layer.Linear(8, 3, step_mode="m"),
                                      neuron.LIFNode(step_mode="m"))

        def forward(self, x):
            return self.head(self.body(x))

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.body[0].weight.mul_(4.0)
    x = torch.rand(T, 3, 5) * 3
    functional.reset_net(net)
    net(x)  # the host loop ran: the parent's list is cached
    keep = net.body  # the original still referenced (a teacher, an EMA copy)
    body = sbnn_sj.to_sbnn(net.body)
    if order == "reset_between":
        functional.reset_net(net)
    net.body = body
    outs = []
    for _ in range(2):
        functional.reset_net(net)
        with sbnn_addons.mode(net, "sample"):
            sbnn_addons.seed_spikes(net, 0)
            outs.append(net(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    functional.reset_net(net)
    assert float(torch.as_tensor(net.body[1].v).abs().sum()) == 0.0
    assert keep is not net.body


def test_two_weight_layers_without_a_neuron_name_both_layers():
    """SpikingJelly's own ``LinearRecurrentContainer`` feeds a weight layer from another
    with no neuron between them: the error names both layers and the ``exclude=`` that
    fixes it, which then converts and runs."""
    from spikingjelly.activation_based.layer import LinearRecurrentContainer

    torch.manual_seed(0)
    net = LinearRecurrentContainer(nn.Sequential(nn.Linear(4, 2), neuron.LIFNode()), 4, 2)
    with pytest.raises(VarianceFlowError,
                       match=r"\('sub_module\.0'\).*layer 'rc'.*exclude=\['rc'\]"):
        sbnn_sj.to_sbnn(net, example_input=torch.rand(2, 4))
    model = sbnn_sj.to_sbnn(net, exclude="rc")
    functional.reset_net(model)
    for _ in range(3):
        out = model(torch.rand(2, 4))
    assert out.shape == (2, 2)



@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_two_convolutions_without_a_neuron_are_refused_in_both_step_modes(step_mode):
    """Two ``layer.Conv2d`` with no neuron between them: in multi-step mode too the second
    refuses the first's variance and names it (the multi-step convolution flattened its
    input without the variance flow, and the first layer's noise vanished silently). The
    multi-step output keeps its draw and the variance of each step's single-step call."""
    from sbnn_addons.moments import get_variance, noisy_output_layers

    torch.manual_seed(0)
    net = nn.Sequential(layer.Conv2d(2, 3, 3, padding=1), layer.Conv2d(3, 3, 3, padding=1),
                        neuron.LIFNode())
    functional.set_step_mode(net, step_mode)
    model = sbnn_sj.to_sbnn(net)
    x = torch.rand(3, 2, 2, 5, 5)
    with pytest.raises(VarianceFlowError, match=r"\('1'\).*layer '0'.*exclude=\['0'\]"):
        model(x if step_mode == "m" else x[0])
    if step_mode == "m":
        conv = model[0]
        out = conv(x)
        assert noisy_output_layers(model, out) == ["0"]
        conv.step_mode = "s"
        per_step = torch.stack([get_variance(conv(xt)).expand(2, 3, 5, 5) for xt in x])
        torch.testing.assert_close(get_variance(out).expand_as(out), per_step)


class _OwnSurrogate(nn.Module):
    """A user's own surrogate: a comparison in the user's code, no SpikingJelly function."""

    def forward(self, x):
        soft = torch.sigmoid(4 * x)
        return (x >= 0).to(x) + soft - soft.detach()


def _lif_with_own_surrogate():
    return neuron.LIFNode(surrogate_function=_OwnSurrogate())


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("mode", ["sample", "mean"])
@pytest.mark.parametrize("make", [neuron.LIFNode, neuron.IFNode, neuron.ParametricLIFNode,
                                  _lif_with_own_surrogate])
def test_a_neuron_that_is_not_converted_refuses_a_bayesian_layers_variance(step_mode, mode,
                                                                           make):
    """A SpikingJelly neuron added after the conversion (or in a new model around a
    converted layer) would fire from the mean and drop the layer's variance (its std got
    no gradient): it raises and names the fix, in both step and evaluation modes, also
    with a surrogate of the user's own. A host neuron fed by a converted neuron's spikes
    runs as before."""
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(5, 8), neuron.LIFNode(), layer.Linear(8, 4))
    functional.set_step_mode(net, step_mode)
    model = sbnn_sj.to_sbnn(net, exclude="2")
    x = torch.rand(T, 3, 5) * 3 if step_mode == "m" else torch.rand(3, 5) * 3
    wrapped = nn.Sequential(model[0], make())
    functional.set_step_mode(wrapped, step_mode)
    with sbnn_addons.mode(wrapped, mode), pytest.raises(
            VarianceFlowError, match="SpikingJelly neuron that is not converted.*to_sbnn"):
        wrapped(x)
    model.append(make())  # after the deterministic readout: fed by spikes, no variance
    functional.set_step_mode(model, step_mode)
    functional.reset_net(model)
    with sbnn_addons.mode(model, mode):
        model(x).sum().backward()
    assert (model[0].std_rho.grad is not None) == (mode == "sample")


class _DirectSpike(nn.Module):
    """A user's module that fires through a SpikingJelly surrogate directly, no neuron."""

    def __init__(self) -> None:
        super().__init__()
        self.sg = surrogate.ATan()

    def forward(self, x):
        return self.sg(x - 1.0)


def test_a_surrogate_called_by_a_module_that_is_not_a_neuron_is_named():
    """A SpikingJelly surrogate that a module of the user's calls on a Bayesian layer's
    output (no neuron) raised asking to convert "the neuron" with to_sbnn, the call that
    made the model (or to put in sbnn_addons' surrogate, which refuses an unlinked
    variance): the error names the module and the exclude that keeps the layer feeding
    it deterministic, with which the model runs."""
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(5, 8), _DirectSpike(), layer.Linear(8, 4),
                        neuron.LIFNode())
    model = sbnn_sj.to_sbnn(net)
    with pytest.raises(VarianceFlowError,
                       match=r"called by _DirectSpike.*not a SpikingJelly neuron.*exclude="):
        model(torch.rand(3, 5))
    model = sbnn_sj.to_sbnn(net, exclude="0")
    model(torch.rand(3, 5)).sum().backward()
    assert model[2].std_rho.grad is not None


def test_pruned_layer_converts_with_its_mask_multi_step():
    """A SpikingJelly layer pruned with ``torch.nn.utils.prune`` converts (multi-step)
    with the same mask: mean mode equals the host exactly, and the export keeps it."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    net = nn.Sequential(layer.Conv2d(2, 4, 3, padding=1), neuron.LIFNode(), layer.Flatten(),
                        layer.Linear(100, 3), neuron.LIFNode())
    functional.set_step_mode(net, "m")
    prune.l1_unstructured(net[0], "weight", 0.5)
    x = torch.rand(3, 2, 2, 5, 5) * 4
    model = sbnn_sj.to_sbnn(net, example_input=x)
    assert torch.equal(model[0].weight_mask, net[0].weight_mask)
    with sbnn_addons.mode(model, "mean"):
        functional.reset_net(model)
        functional.reset_net(net)
        assert torch.equal(model(x), net(x))
    plain = sbnn_sj.to_spikingjelly(model)
    assert torch.equal(plain[0].weight_mask, net[0].weight_mask)


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("prepend", [True, False])
def test_a_lif_node_pre_hook_that_strips_the_variance_raises(step_mode, prepend):
    from spikingjelly.activation_based import functional, layer, neuron

    from sbnn_addons.spikingjelly import to_sbnn

    net = to_sbnn(nn.Sequential(layer.Linear(8, 6), neuron.LIFNode()))
    functional.set_step_mode(net, step_mode)
    net.train()
    net[1].register_forward_pre_hook(
        lambda mod, args: (args[0].as_subclass(torch.Tensor), *args[1:]), prepend=prepend)
    functional.reset_net(net)
    x = torch.rand(4, 8) if step_mode == "s" else torch.rand(3, 4, 8)
    if not prepend:  # after the converted neuron's own pre-hook: the variance is taken
        net(x).sum().backward()
        assert net[0].std_rho.grad.abs().sum() > 0
        return
    with pytest.raises(sbnn_addons.VarianceFlowError, match=r"'0'.*reached no spiking neuron"):
        net(x)


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_spikingjelly_monitors_find_the_converted_weight_layers(step_mode):
    """A monitor of SpikingJelly's weight layers (``OutputMonitor(net, layer.Conv2d)``)
    records the converted layers as it does the host's (they were no ``layer.Conv2d`` /
    ``layer.Linear`` instances: the monitor watched nothing, silently), with the host's
    values in ``mean`` mode; ``isinstance`` checks of user code find them too."""
    monitor = pytest.importorskip("spikingjelly.activation_based.monitor",
                                  exc_type=ImportError)
    host = _mnist_net(step_mode)
    model = sbnn_sj.to_sbnn(host)
    kinds = (layer.Conv2d, layer.Linear)
    names = [n for n, m in host.named_modules() if isinstance(m, kinds)]
    assert names and names == [n for n, m in model.named_modules() if isinstance(m, kinds)]
    records = []
    for net in (host, model):
        mon = monitor.OutputMonitor(net, kinds)
        try:
            with torch.no_grad(), sbnn_addons.mode(model, "mean"):
                functional.reset_net(net)
                _run(net, _x(), step_mode)
            assert mon.monitored_layers == names
            records.append(mon.records)
        finally:
            mon.remove_hooks()
    assert len(records[0]) == len(records[1]) > 0
    for a, b in zip(*records):
        torch.testing.assert_close(b, a)


def test_a_surrogate_in_non_spiking_mode_is_refused_at_conversion():
    """``surrogate.ATan(spiking=False)``: the host neuron outputs the surrogate's smooth
    primitive function (graded values). The stochastic spike function would replace it
    with binary spikes (mean mode gave 0 where the host gave 0.06, silently): the
    conversion refuses it, naming the neuron and the ways out, and an inplace conversion
    leaves the model as it was; excluded with the layer feeding it, it runs as the host."""
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(6, 5, step_mode="m"), neuron.IFNode(step_mode="m"),
                        layer.Linear(5, 4, step_mode="m"),
                        neuron.LIFNode(surrogate_function=surrogate.ATan(spiking=False),
                                       step_mode="m"))
    x = torch.rand(T, 3, 6) * 2
    with pytest.raises(ValueError, match=r"(?s)'3'.*spiking=False.*spiking=True.*exclude"):
        sbnn_sj.to_sbnn(net, inplace=True)
    assert not any(sbnn_addons.is_bayesian(m) for m in net.modules())
    ref, got = _host_and_excluded_conversion(net, x)
    assert not torch.equal(ref, (ref > 0).to(ref.dtype))  # graded, not spikes
    torch.testing.assert_close(got, ref)


def _host_and_excluded_conversion(net: nn.Module, x: torch.Tensor) -> tuple:
    """``net(x)`` and the ``mean``-mode output of ``net`` converted with its last layer
    and neuron (``'2'``, ``'3'``) excluded, each from a reset state."""
    model = sbnn_sj.to_sbnn(net, exclude=["2", "3"])
    with torch.no_grad(), sbnn_addons.mode(model, "mean"):
        functional.reset_net(net)
        sbnn_sj.reset(model)
        return net(x), model(x)


class _SoftSurrogate(nn.Module):
    """A user's surrogate whose forward is a sigmoid (graded), not a Heaviside."""

    def forward(self, x):
        return torch.sigmoid(4 * x)


def _above(x):
    """A Heaviside that fires at ``x > 0`` (snnTorch's), where SpikingJelly's fire at
    ``x >= 0``."""
    return (x > 0).to(x.dtype)


@pytest.mark.parametrize("make", [_SoftSurrogate, lambda: _above])
def test_a_surrogate_whose_forward_is_not_heaviside_is_refused_at_conversion(make):
    """A neuron whose surrogate's forward is not SpikingJelly's Heaviside ``1[x >= 0]`` (a
    user's graded sigmoid, a step at ``x > 0``) and that has no ``spiking`` flag: the
    stochastic spike function would replace it with binary spikes (mean mode differed from
    the host, silently). The conversion refuses it, naming the neuron and the ways out,
    and an inplace conversion leaves the model as it was; excluded with the layer
    feeding it, it runs as the host."""
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(6, 5, step_mode="m"), neuron.IFNode(step_mode="m"),
                        layer.Linear(5, 4, step_mode="m"),
                        neuron.IFNode(surrogate_function=make(), step_mode="m"))
    x = torch.rand(T, 3, 6) * 2
    with pytest.raises(ValueError, match=r"(?s)'3'.*not SpikingJelly's Heaviside"
                                         r".*surrogate.ATan\(\).*exclude"):
        sbnn_sj.to_sbnn(net, inplace=True)
    assert not any(sbnn_addons.is_bayesian(m) for m in net.modules())
    ref, got = _host_and_excluded_conversion(net, x)
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("name", ["ATan", "Sigmoid", "Erf", "PiecewiseQuadratic",
                                  "PiecewiseExp", "SoftSign", "SuperSpike", "Rect",
                                  "QPseudoSpike", "LeakyKReLU", "PiecewiseLeakyReLU",
                                  "S2NN", "LogTailedReLU", "SquarewaveFourierSeries",
                                  "NonzeroSignLogAbs", "DeterministicPass",
                                  "FakeNumericalGradient"])
def test_every_spiking_surrogate_converts(name):
    """SpikingJelly's own surrogates in spiking mode (a Heaviside ``1[x >= 0]`` forward)
    are not refused, and the probe of the host's surrogate leaves no trace on the host
    model (a hook on it records no call)."""
    net = nn.Sequential(layer.Linear(6, 5),
                        neuron.LIFNode(surrogate_function=getattr(surrogate, name)()))
    calls = []
    net[1].surrogate_function.register_forward_hook(lambda *args: calls.append(args))
    model = sbnn_sj.to_sbnn(net)
    assert isinstance(model[1].surrogate_function, sbnn_sj.SJSpike)
    assert not calls


@pytest.mark.parametrize("inplace", [True, False])
def test_a_monitor_registered_before_the_conversion_keeps_recording_the_layers(inplace):
    """Monitors built on the host model before ``to_sbnn(..., inplace=True)``: the
    converted layers keep the replaced layers' forward and backward hooks (the neurons,
    converted in place, always kept theirs; the layers lost them, so the monitor went on
    recording the neurons only, silently), the hooks' handles still remove them, and a
    pruned layer keeps exactly one pruning hook. A copy (``inplace=False``) carries the
    copied hooks on its layers as on its neurons (``deepcopy`` copies a module's hooks;
    the monitor's handles then remove those of the original only)."""
    monitor = pytest.importorskip("spikingjelly.activation_based.monitor",
                                  exc_type=ImportError)
    from torch.nn.utils import prune

    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(6, 5, step_mode="m"), neuron.IFNode(step_mode="m"),
                        layer.Linear(5, 4, step_mode="m"), neuron.IFNode(step_mode="m"))
    prune.l1_unstructured(net[2], "weight", amount=0.5)
    out_mon = monitor.OutputMonitor(net, (layer.Linear, neuron.IFNode))
    grad_mon = monitor.GradInputMonitor(net, layer.Linear)
    model = sbnn_sj.to_sbnn(net, inplace=inplace)
    try:
        x = (torch.rand(T, 3, 6) * 2).requires_grad_()
        model(x).sum().backward()
        assert [type(r).__name__ for r in out_mon.records] == [
            "VarianceTensor", "SpikeTensor", "VarianceTensor", "SpikeTensor"]
        assert len(grad_mon.records) == 2
        pruning = [h for h in model[2]._forward_pre_hooks.values()
                   if isinstance(h, prune.BasePruningMethod)]
        assert len(pruning) == 1
    finally:
        out_mon.remove_hooks()
        grad_mon.remove_hooks()
    if inplace:  # removed from the converted layers too
        sbnn_sj.reset(model)
        model(x)
        assert len(out_mon.records) == 4
        assert not model[0]._backward_hooks
        assert all(h.__module__.startswith("sbnn_addons")
                   for h in model[0]._forward_hooks.values())
    # the hook of a hook-based reparametrisation (it reads weight_orig) is not taken over
    net = nn.Sequential(nn.utils.spectral_norm(layer.Linear(6, 5, step_mode="m")),
                        neuron.IFNode(step_mode="m"))
    seen = []
    net[0].register_forward_hook(lambda m, args, out: seen.append(out.shape))
    sbnn_sj.to_sbnn(net, inplace=inplace)(x)
    assert seen == [(T, 3, 5)]


class _SpikeSkip(nn.Module):
    """A SEW-style skip written spikes first: ``sn2(sn1(fc1(x)) + fc2(x))``."""

    def __init__(self):
        super().__init__()
        self.fc1 = layer.Linear(4, 6, step_mode="m")
        self.sn1 = neuron.LIFNode(tau=2.0, step_mode="m")
        self.fc2 = layer.Linear(4, 6, step_mode="m")
        self.sn2 = neuron.LIFNode(tau=2.0, step_mode="m")

    def forward(self, x):
        return self.sn2(self.sn1(self.fc1(x)) + self.fc2(x))


def test_spikes_plus_a_bayesian_layer_output_keeps_its_noise():
    """A neuron's spikes first in a sum with a Bayesian layer's output: the sum carries
    that layer's variance to the next neuron and its std gets a gradient. The spikes'
    own tensor type used to take the call and drop the variance silently (fc2's std got
    a zero gradient in sample mode, and sn2 fired with sn1's noise only)."""
    torch.manual_seed(0)
    net = _SpikeSkip()
    with torch.no_grad():
        for m in (net.fc1, net.fc2):
            m.weight.mul_(3.0)
    sbnn = sbnn_sj.to_sbnn(net, spike_std=None)
    x = torch.rand(T, 3, 4)
    functional.reset_net(sbnn)
    sbnn(x).sum().backward()
    assert sbnn.fc2.std_rho.grad is not None and sbnn.fc2.std_rho.grad.abs().sum() > 0
    # the spikes after a sum that reached sn2: its variance memory holds fc2's noise
    assert isinstance(sbnn.sn2.sbnn_var, torch.Tensor) and sbnn.sn2.sbnn_var.sum() > 0


@pytest.mark.parametrize("check", [True, False], ids=["example_input", "sample"])
def test_zoo_unknown_variance_error_names_the_neuron_and_the_layers(check):
    """SpikingJelly's MS-ResNet adds its blocks to a membrane shortcut, a stream of
    BatchNorm outputs that its downsampling 1x1 convolutions read. Left deterministic
    (exclude=), such a convolution of the noisy stream has no variance rule, and the
    neuron it feeds raises. The error used to say only "the input of LIFNode went
    through 'conv2d'": it names the neuron and the Bayesian layers whose noise the
    stream carries (the exclude= that makes it run), in the conversion's check as in a
    sample-mode forward."""
    from _sj_helpers import import_zoo

    ms_resnet = import_zoo("ms_resnet")
    torch.manual_seed(0)
    net = ms_resnet.MSResNet(T=2, layers=(1, 1, 1), base_channels=4, num_classes=5,
                             stem_kernel_size=3, stem_stride=1)
    x = torch.rand(2, 2, 3, 8, 8) * 4
    with pytest.raises(VarianceFlowError) as info:
        if check:
            sbnn_sj.to_sbnn(net, exclude="*downsample*", example_input=x)
        else:
            sbnn = sbnn_sj.to_sbnn(net, exclude="*downsample*")
            functional.reset_net(sbnn)
            sbnn(x)
    msg = str(info.value)
    assert "LIFNode 'layer2.0.spike1'" in msg and "'conv2d'" in msg
    assert "exclude=['stem.0', 'layer1.0.conv2']" in msg


def test_a_layer_replaced_by_an_inplace_conversion_still_runs_as_a_plain_layer():
    """As for snnTorch: the variance flow's hooks, added to the hook dictionaries the
    converted layer shares with the replaced one, raised AttributeError on the replaced
    layer the user still held."""
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(6, 5, step_mode="m"), neuron.IFNode(step_mode="m"))
    old = net[0]
    x = torch.rand(T, 3, 6)
    ref = old(x)
    sbnn_sj.to_sbnn(net, inplace=True)
    assert net[0] is not old and sbnn_addons.is_bayesian(net[0])
    out = old(x)
    assert type(out) is torch.Tensor
    torch.testing.assert_close(out, ref)


# --------------------------------------------------------------------------- noiseless neurons
def _noiseless_net(step_mode: str, path: str = "", **last) -> nn.Sequential:
    """Two linear layers and two LIF nodes; ``path="loop"``: the multi-step nodes run
    SpikingJelly's own loop (``store_v_seq``) instead of the fused sequence."""
    torch.manual_seed(0)
    loop = dict(store_v_seq=True) if path == "loop" else {}
    net = nn.Sequential(layer.Linear(8, 16), neuron.LIFNode(**loop), layer.Linear(16, 4),
                        neuron.LIFNode(**loop, **last))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(3.0)
    functional.set_step_mode(net, step_mode)
    return net


@pytest.mark.parametrize("kw", [dict(include="0", spike_std=None),
                                dict(exclude="2", spike_std=0.0)])
@pytest.mark.parametrize("sm,path", [("s", ""), ("m", ""), ("m", "loop")])
def test_a_converted_neuron_without_noise_refuses_a_gradient_through_its_spikes(sm, path, kw):
    """A converted neuron whose drive carries no variance (the layer feeding it left
    deterministic by include / exclude) and whose spike function has no noise of its own
    (``spike_std=None`` or 0) fires deterministically, and the stochastic spike's gradient
    is then 0: a loss on its spikes trained nothing before it (every weight gradient was
    0, without an error), in both step modes and on the fused sequence. The backward
    names the neuron and the fixes; a membrane readout that sends no gradient through its
    spikes trains; ``mean`` mode and no-grad passes run."""
    x = torch.rand(T, 3, 8) * 2
    model = sbnn_sj.to_sbnn(_noiseless_net(sm, path), **kw)
    sbnn_sj.reset(model)
    loss = _run(model, x, sm).sum()
    with pytest.raises(VarianceFlowError,
                       match=r"(?s)LIFNode.*no noise.*spike_std.*exclude"):
        loss.backward()
    with torch.no_grad():
        sbnn_sj.reset(model)
        _run(model, x, sm)
    with sbnn_addons.mode(model, "mean"):
        sbnn_sj.reset(model)
        _run(model, x, sm).sum().backward()
    for last in (dict(detach_reset=True), dict(v_threshold=float("inf"))):
        model = sbnn_sj.to_sbnn(_noiseless_net(sm, path, **last), **kw)
        sbnn_sj.reset(model)
        _run(model, x, sm)
        model[3].v.sum().backward()  # membrane readout: the first neuron has noise
        assert model[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("sm", ["s", "m"])
def test_a_converted_neuron_with_noise_of_its_own_passes_the_gradient(sm):
    """With the default ``spike_std`` a neuron fed by a deterministic layer has its own
    noise: the gradient of a loss on its spikes reaches every layer before it."""
    x = torch.rand(T, 3, 8) * 2
    model = sbnn_sj.to_sbnn(_noiseless_net(sm), include="0")
    sbnn_sj.reset(model)
    _run(model, x, sm).sum().backward()
    assert model[0].weight.grad.abs().sum() > 0 and model[2].weight.grad.abs().sum() > 0


class _BypassedNeuron(nn.Module):
    """A user's model that runs its neuron through one of the neuron's own methods
    (``sn.multi_step_forward(h)``, ``sn.single_step_forward(h_t)``, ``sn.forward(h)``)
    instead of calling the module, which skips its forward hooks."""

    def __init__(self, how: str, step_mode: str) -> None:
        super().__init__()
        self.how = how
        self.fc = layer.Linear(6, 5, step_mode=step_mode)
        self.sn = neuron.LIFNode(step_mode=step_mode)

    def forward(self, x):
        h = self.fc(x)
        if self.how == "single_step_forward":
            return self.sn.single_step_forward(h)
        return getattr(self.sn, self.how)(h)


@pytest.mark.parametrize(("how", "step_mode"), [
    ("multi_step_forward", "m"), ("forward", "m"), ("single_step_forward", "s"),
    ("forward", "s")])
@pytest.mark.parametrize("steps", [1, T])
def test_a_converted_neuron_run_past_its_hooks_is_named(how, step_mode, steps):
    """A converted neuron run through ``sn.multi_step_forward(h)`` (or
    ``single_step_forward`` / ``forward``) skips the forward hooks that hand its input's
    variance to the spike function with the neuron's dynamics: the second step raised a
    VarianceFlowError blaming a 'sub of two tensors that share one Bayesian layer's noise'
    and asking for a variance rule, and a single step ran with the variance that
    SpikingJelly's arithmetic happened to carry, never stored as the neuron's noise
    state. The error now names the neuron and the fix (call the module), whatever the
    number of steps; called as a module, the same model trains."""
    torch.manual_seed(0)
    model = sbnn_sj.to_sbnn(_BypassedNeuron(how, step_mode))
    x = torch.rand(steps, 3, 6) * 3

    def run():
        functional.reset_net(model)
        return model(x) if step_mode == "m" else torch.stack([model(xt) for xt in x])

    with pytest.raises(VarianceFlowError,
                       match=rf"LIFNode 'sn'.*{how}.*forward hooks.*sn\(x\)"):
        run()
    model.how = "__call__"
    run().sum().backward()
    assert model.fc.std_rho.grad.abs().sum() > 0


@pytest.mark.parametrize(("make", "fix"), [
    (lambda: layer.Linear(4, 3), r"sbnn_addons\.spikingjelly\.BayesLinear\.from_module"),
    (lambda: layer.Conv2d(2, 3, 3, step_mode="m"),
     r"sbnn_addons\.spikingjelly\.BayesConv2d\.from_module"),
    (lambda: nn.Linear(4, 3), r"sbnn_addons\.BayesLinear\.from_module"),
    (lambda: nn.Conv1d(2, 3, 3), r"sbnn_addons\.BayesConv1d\.from_module")])
def test_a_single_weight_layer_given_as_the_model_is_named(make, fix):
    """``to_sbnn(layer.Linear(4, 3))`` said "the model has no layer.Linear/..." of a model
    that is one: the conversion replaces the layers inside a network, never the model
    itself. The error now says so and names the call that makes the Bayesian layer."""
    m = make()
    kind = ("layer." if type(m).__module__.startswith("spikingjelly") else "nn.") + \
        type(m).__name__
    with pytest.raises(ValueError, match=rf"model is itself a {kind}.*{fix}"):
        sbnn_sj.to_sbnn(m)


def _container_net(kind: str, sm: str) -> nn.Module:
    """Small models around SpikingJelly's containers and stateful layers that the other
    tests use little (input ``[T, 3, 6]``)."""
    lif = functools.partial(neuron.LIFNode, surrogate_function=surrogate.ATan())
    if kind == "step_mode_container":
        return nn.Sequential(layer.Linear(6, 8, step_mode=sm),
                             layer.StepModeContainer(True, sm, lif()),
                             layer.StepModeContainer(False, sm, nn.Linear(8, 4)),
                             lif(step_mode=sm))
    if kind == "element_wise_recurrent":
        return nn.Sequential(
            layer.Linear(6, 8, step_mode=sm),
            layer.ElementWiseRecurrentContainer(lif(), lambda y, x: x + y, step_mode=sm),
            layer.Linear(8, 4, step_mode=sm), lif(step_mode=sm))
    if kind == "linear_recurrent":
        return nn.Sequential(layer.LinearRecurrentContainer(lif(), 6, 6, step_mode=sm),
                             layer.Linear(6, 4, step_mode=sm), lif(step_mode=sm))
    if kind == "dropout_voting":  # the mask is kept over the steps until reset_net
        return nn.Sequential(layer.Linear(6, 8, step_mode=sm), layer.Dropout(0.5, step_mode=sm),
                             lif(step_mode=sm), layer.Linear(8, 4, step_mode=sm),
                             lif(step_mode=sm), layer.VotingLayer(2, step_mode=sm))
    if kind == "batchnorm_through_time":
        return nn.Sequential(layer.Linear(6, 8, step_mode=sm),
                             layer.BatchNormThroughTime1d(T, 8, step_mode=sm), lif(step_mode=sm),
                             layer.Linear(8, 4, step_mode=sm), lif(step_mode=sm))
    raise ValueError(kind)


@pytest.mark.parametrize("sm", ["s", "m"])
@pytest.mark.parametrize("kind", ["step_mode_container", "element_wise_recurrent",
                                  "linear_recurrent", "dropout_voting",
                                  "batchnorm_through_time"])
def test_spikingjelly_containers_convert_reset_copy_and_export(kind, sm):
    """SpikingJelly's StepModeContainer, ElementWiseRecurrentContainer,
    LinearRecurrentContainer, Dropout (its mask kept over the steps), VotingLayer and
    BatchNormThroughTime1d (a BatchNorm per step), in training mode: mean mode equals the
    original under the same seed, the weight noise reaches the spikes (every layer's std
    gets a finite, non-zero gradient), reset_net starts a new sequence as a fresh copy
    does, a copy made mid-sequence goes on as the original, and the export has the
    original's module classes."""
    torch.manual_seed(0)
    net = _container_net(kind, sm).train()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear):  # drives near the threshold: 17 to 52 % spikes
                m.weight.add_(0.3)
            if isinstance(m, nn.BatchNorm1d):
                m.weight.fill_(3.0)
    torch.manual_seed(1)
    x = torch.rand(T, 3, 6) * 2
    model = sbnn_sj.to_sbnn(net).train()
    with torch.no_grad(), sbnn_addons.mode(model, "mean"):
        for m in (net, model):
            functional.reset_net(m)
            torch.manual_seed(5)
            out = _run(m, x, sm)
            if m is net:
                want = out
        assert torch.equal(out, want) and 0 < want.mean() < 1
    functional.reset_net(model)
    _run(model, x, sm).sum().backward()
    stds = [p.grad for n, p in model.named_parameters() if n.endswith("std_rho")
            and "surrogate" not in n]
    assert stds and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
                        for g in stds)
    with torch.no_grad():
        functional.reset_net(model)
        fresh = copy.deepcopy(model)
        _run(model, x, sm)  # a first sequence, then reset: as the fresh copy
        functional.reset_net(model)
        outs = []
        for m in (model, fresh):
            torch.manual_seed(7)
            outs.append(_run(m, x, sm))
        assert torch.equal(*outs)
        functional.reset_net(model)
        _run(model, x[:2], sm)
        dup = copy.deepcopy(model)  # mid-sequence
        outs = []
        for m in (model, dup):
            torch.manual_seed(9)
            outs.append(_run(m, x[2:], sm))
        assert torch.equal(*outs)
    back = sbnn_sj.to_spikingjelly(model)
    kinds = [type(m) for _, m in net.named_modules(remove_duplicate=False)]
    assert [type(m) for _, m in back.named_modules(remove_duplicate=False)] == kinds


_PSNS = {
    "PSN": lambda s, sm: neuron.PSN(T=T, surrogate_function=s),
    "MaskedPSN": lambda s, sm: neuron.MaskedPSN(k=2, T=T, lambda_init=1.0,
                                                surrogate_function=s, step_mode=sm),
    "SlidingPSN": lambda s, sm: neuron.SlidingPSN(k=2, surrogate_function=s, step_mode=sm),
}


@pytest.mark.parametrize(("kind", "sm"), [("PSN", "m"), ("MaskedPSN", "m"), ("MaskedPSN", "s"),
                                          ("SlidingPSN", "m"), ("SlidingPSN", "s")])
def test_drop_in_surrogate_of_a_parallel_spiking_neuron_averages_aux_over_examples(kind, sm):
    """SpikingJelly's parallel spiking neurons call the surrogate on the whole sequence
    ([T, B * N] or [T, B, N]) or on a flattened step ([B * N]): the auxiliary loss still
    sums z^2 over the units and steps of each example and averages over the examples."""
    torch.manual_seed(0)
    batch, units = 6, 5
    spike = sbnn_sj.surrogate_function(std=0.5, learn_std=False)
    net = nn.Sequential(layer.Linear(3, units, step_mode=sm), _PSNS[kind](spike, sm))
    drives = []
    spike.register_forward_pre_hook(lambda _m, args: drives.append(args[0].detach()))
    sbnn_addons.enable_aux_loss(net)
    x = torch.rand(T, batch, 3)
    out = _run(net, x, sm)
    assert out.shape == (T, batch, units)
    z2 = sum(float(((u / 0.5) ** 2).sum()) for u in drives)
    assert float(sbnn_addons.aux_loss(net, "sum").detach()) == pytest.approx(z2 / batch, rel=1e-5)
    functional.reset_net(net)
    _run(net, x, sm)
    total, per_example = spike.pop_aux()
    assert per_example == T * units and float(total.detach()) == pytest.approx(z2 / batch, rel=1e-5)


def test_aux_loss_of_a_parallel_spiking_neuron_next_to_a_lif_node_weighs_units_alike():
    """The "mean" reduction of a model with a PSN and a LIF node weighs each unit-step of
    both alike (the PSN's terms counted per example, as the LIF node's)."""
    torch.manual_seed(0)
    psn_spike, lif_spike = (sbnn_sj.surrogate_function(std=0.5, learn_std=False)
                            for _ in range(2))
    net = nn.Sequential(layer.Linear(3, 5, step_mode="m"),
                        neuron.PSN(T=T, surrogate_function=psn_spike),
                        layer.Linear(5, 2, step_mode="m"),
                        neuron.IFNode(surrogate_function=lif_spike, step_mode="m"))
    drives = {psn_spike: [], lif_spike: []}
    for s in drives:
        s.register_forward_pre_hook(lambda m, args: drives[m].append(args[0].detach()))
    sbnn_addons.enable_aux_loss(net)
    net(torch.rand(T, 6, 3))
    z2 = sum(float(((u / 0.5) ** 2).sum()) for us in drives.values() for u in us)
    assert float(sbnn_addons.aux_loss(net).detach()) == pytest.approx(
        z2 / (6 * T * (5 + 2)), rel=1e-5)


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("where", ["prepend", "global"])
def test_a_pre_hook_that_runs_before_the_conversions_own_rescales_the_variance(step_mode,
                                                                              where):
    """A forward pre-hook of a converted neuron registered with prepend=True, or a global
    one (torch's register_module_forward_pre_hook), runs before the conversion's own and
    changes the input carrying the variance: a rescaling scales the variance with it
    (x * 2: the variance times 4), an operation without a rule raises."""
    from torch.nn.modules.module import register_module_forward_pre_hook

    torch.manual_seed(0)
    net = sbnn_sj.to_sbnn(nn.Sequential(layer.Linear(8, 6), neuron.LIFNode()))
    functional.set_step_mode(net, step_mode)
    node, taken = net[1], []
    node.register_forward_pre_hook(  # after the conversion's: what the spike function got
        lambda m, args: taken.append(m.surrogate_function._pending))
    x = torch.rand(4, 8) if step_mode == "s" else torch.rand(3, 4, 8)
    fn = {"op": lambda t: t * 2}

    def hook(m, args):
        return (fn["op"](args[0]), *args[1:]) if m is node else None

    net(x)
    functional.reset_net(net)
    handle = (node.register_forward_pre_hook(hook, prepend=True) if where == "prepend"
              else register_module_forward_pre_hook(hook))
    try:
        net(x)
        torch.testing.assert_close(taken[1], taken[0] * 4)
        fn["op"] = torch.tanh
        functional.reset_net(net)
        with pytest.raises(VarianceFlowError, match=r"LIFNode '1'.*through 'tanh'"):
            net(x)
    finally:
        handle.remove()


def test_a_numpy_threshold_set_after_the_conversion_reaches_the_spike_function():
    """``node.v_threshold = np.float32(0.5)`` after the conversion (SpikingJelly runs with
    it) was ignored by the spike function, whose auxiliary terms stayed centred on the
    threshold at conversion, silently."""
    import numpy as np

    net = sbnn_sj.to_sbnn(nn.Sequential(layer.Linear(8, 6), neuron.LIFNode(),
                                        layer.Linear(6, 3), neuron.LIFNode()))
    net[1].v_threshold = np.float32(0.5)
    net(torch.rand(2, 8))
    assert net[1].surrogate_function.threshold == 0.5


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_conversion_keeps_the_models_training_mode(inplace, training):
    """A model converted in eval mode (a pretrained model, evaluated before fine-tuning)
    is in eval mode all through, new surrogates included: its validation forwards with
    gradients on collect no auxiliary terms (and apply no pull), as after
    ``model.eval()``."""
    net = _mnist_net("m").train(training)
    model = sbnn_sj.to_sbnn(net, aux_loss=True, inplace=inplace)
    assert {m.training for m in model.modules()} == {training}
    functional.reset_net(model)
    model(_x(steps=2, batch=2))  # gradients on
    if training:
        assert sbnn_addons.aux_loss(model) > 0
    else:
        with pytest.warns(UserWarning, match="eval mode"):
            assert sbnn_addons.aux_loss(model) == 0


def initial_membrane_step(net, h0, step_mode: str, how: str):
    """One training step that starts the neuron from ``h0(x[0])`` set as ``node.v``:
    after ``reset_net`` ("reset"), or instead of it ("set")."""
    def step(x, y):
        if how == "reset":
            functional.reset_net(net)
        net[1].v = h0(x[0])
        return torch.nn.functional.cross_entropy(run_steps(net, x, step_mode).sum(0), y)
    return step


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("between", ["nothing", "detach_net", "v.detach()"])
def test_membrane_set_by_the_user_is_a_new_membrane(step_mode, between):
    """``node.v = h0(x[0])`` (a learned initial membrane) set before each sequence
    instead of ``functional.reset_net`` (the neuron is the model's only state; the
    unconverted model trains so): the neuron kept the noise variance of the last
    sequence's membrane for the new one. Without a detach, the second backward failed
    through the first one's freed graph ("Trying to backward through the graph a second
    time"); after ``detach_net``, the new sequence was drawn with that stale variance,
    silently. The set membrane is a new one (no variance yet), as after ``reset_net``.
    A detach of the kept membrane set back by hand (``node.v = node.v.detach()``,
    truncated BPTT) keeps its variance, as ``detach_net`` does."""
    x = torch.rand(3, 3, 6, 12) * 3
    y = torch.randint(0, 5, (3, 6))
    runs = {}
    for how in ("reset", "set"):
        net, h0 = initial_membrane_net(step_mode)
        step = initial_membrane_step(net, h0, step_mode, how)
        runs[how] = []
        for i in range(len(x)):
            net.zero_grad()
            h0.zero_grad()
            sbnn_addons.seed_spikes(net, i)
            loss = step(x[i], y[i])
            loss.backward()
            runs[how].append([loss.detach()] + [p.grad.clone() for p in
                                                [*net.parameters(), *h0.parameters()]])
            if between == "detach_net":
                functional.detach_net(net)
            elif between == "v.detach()":
                net[1].v = net[1].v.detach()
    for want, got in zip(runs["reset"], runs["set"]):
        for a, b in zip(want, got):
            torch.testing.assert_close(b, a)


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("how", ["v.detach()", "v.detach().clone()"])
def test_membrane_detached_by_hand_keeps_its_variance(step_mode, how):
    """``node.v = node.v.detach()`` (or a copy of it) between two chunks of one sequence
    (truncated BPTT by hand): the next chunk goes on with the kept variance, without its
    graph, exactly as after ``functional.detach_net`` (the second backward failed
    through the first chunk's freed graph)."""
    x = torch.rand(4, 6, 12) * 3
    results = []
    for by_hand in (False, True):
        net, _ = initial_membrane_net(step_mode)
        functional.reset_net(net)
        sbnn_addons.seed_spikes(net, 0)
        outs = []
        for chunk in (x[:2], x[2:]):
            net.zero_grad()
            out = run_steps(net, chunk, step_mode)
            out.sum().backward()
            outs.append([out.detach()] + [p.grad.clone() for p in net.parameters()])
            if not by_hand:
                functional.detach_net(net)
            elif how == "v.detach()":
                net[1].v = net[1].v.detach()
            else:
                net[1].v = net[1].v.detach().clone()
        assert net[1].sbnn_var is not None
        results.append(outs)
    for want, got in zip(*results):
        for a, b in zip(want, got):
            torch.testing.assert_close(b, a)


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_membrane_edited_by_the_user_is_named(step_mode):
    """``node.v = 0.5 * node.v`` between two calls of one sequence: the variance of the
    edited membrane is unknown (it went on with the unscaled variance, silently): a
    ``VarianceFlowError`` names the edit and the fixes. A detached edit (no graph back
    to the membrane) is a new membrane, as a value set by the user."""
    net, _ = initial_membrane_net(step_mode)
    x = torch.rand(4, 6, 12) * 3

    run = functools.partial(run_steps, net, step_mode=step_mode)

    functional.reset_net(net)
    run(x[:2])
    net[1].v = 0.5 * net[1].v
    with pytest.raises(VarianceFlowError, match=r"computed from its last membrane"):
        run(x[2:])
    functional.reset_net(net)
    run(x[:2])
    net[1].v = 0.5 * net[1].v.detach()
    run(x[2:]).sum().backward()


def test_membrane_set_from_a_bayesian_layer_names_the_layer_and_the_fix():
    """A learned initial membrane made by a layer the conversion made Bayesian
    (``self.lif.v = self.h0(x[0])``): the neuron starts a membrane set by hand without
    variance, so the layer's noise reaches no neuron. The error named other causes only
    (a plain tensor made of the output); it names this one and ``exclude=``."""

    class InitialMembraneNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.h0, self.fc = layer.Linear(12, 16), layer.Linear(12, 16)
            self.lif, self.out = neuron.LIFNode(tau=2.0), layer.Linear(16, 5)
            functional.set_step_mode(self, "m")

        def forward(self, x):
            functional.reset_net(self)
            self.lif.v = self.h0(x[0])
            return self.out(self.lif(self.fc(x)))

    torch.manual_seed(0)
    net = sbnn_sj.to_sbnn(InitialMembraneNet(), exclude=["out"])
    with pytest.raises(VarianceFlowError, match=r"'h0'.*node\.v = layer\(x\).*exclude="):
        net(torch.rand(3, 6, 12))
    net = sbnn_sj.to_sbnn(InitialMembraneNet(), exclude=["out", "h0"])
    net(torch.rand(3, 6, 12)).sum().backward()  # the fix


@pytest.mark.parametrize("edit", ["zero_", "mul_"])
@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_membrane_changed_in_place_by_the_user_is_named(step_mode, edit):
    """``node.v.zero_()`` (a reset by hand) or ``node.v.mul_(mask)`` between two calls of
    one sequence, after ``functional.detach_net``: the neuron went on with the variance
    of the old values, silently (the same tensor: nothing else tells the change). Its
    version counter does: a ``VarianceFlowError`` names the change and the fixes. An
    unchanged membrane (``detach_net`` detaches it in place without a new version) goes
    on."""
    net, _ = initial_membrane_net(step_mode)
    x = torch.rand(4, 6, 12) * 3

    run = functools.partial(run_steps, net, step_mode=step_mode)

    functional.reset_net(net)
    run(x[:2]).sum().backward()
    functional.detach_net(net)
    run(x[2:3]).sum().backward()  # unchanged: goes on
    functional.detach_net(net)
    v = net[1].v
    v.zero_() if edit == "zero_" else v.mul_((torch.arange(6) % 2).float()[:, None])
    with pytest.raises(VarianceFlowError, match=r"changed in place since its last call"):
        run(x[3:])
    functional.reset_net(net)  # the fix: a new sequence
    run(x[3:]).sum().backward()


# --------------------------------------------------------------------------- membranes fed on
class MembraneFedNet(nn.Module):
    """Linear-LIF-Linear-LIF whose second stage reads the first neuron's membrane,
    ``node.v`` (single-step) or ``node.v_seq`` (multi-step, ``store_v_seq=True``), through
    ``feed(net, spikes, v)`` instead of its spikes."""

    def __init__(self, feed, step_mode: str):
        super().__init__()
        self.fc1 = layer.Linear(12, 16)
        self.lif1 = neuron.LIFNode(tau=2.0, store_v_seq=step_mode == "m")
        self.fc2 = layer.Linear(16, 5)
        self.lif2 = neuron.LIFNode(tau=2.0)
        with torch.no_grad():
            self.fc1.weight.mul_(3.0)
        functional.set_step_mode(self, step_mode)
        self.feed = feed

    def forward(self, x):
        spikes = self.lif1(self.fc1(x))
        v = self.lif1.v_seq if self.lif1.step_mode == "m" else self.lif1.v
        return self.lif2(self.feed(self, spikes, v))


_SJ_MEMBRANE_FEEDS = {
    "fc2(v)": lambda net, spikes, v: net.fc2(v),
    "fc2(0.5 * v)": lambda net, spikes, v: net.fc2(0.5 * v),
    "fc2(v.detach())": lambda net, spikes, v: net.fc2(v.detach()),
    "fc2(spikes + v.clamp(0, 1))": lambda net, spikes, v: net.fc2(spikes + v.clamp(0, 1)),
}
_SJ_CURRENTS_FROM_MEMBRANES = {
    "fc2(v)": lambda net, spikes, v: net.fc2(v),
    "0.5 * v[..., :5]": lambda net, spikes, v: 0.5 * v[..., :5],
}


def _sj_membrane_fed(feed, step_mode, **convert):
    torch.manual_seed(0)
    net = sbnn_sj.to_sbnn(MembraneFedNet(feed, step_mode), **convert)
    return net, torch.rand(4, 6, 12) * 3


@pytest.mark.parametrize("kernels_on", [True, False])
@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("feed", list(_SJ_MEMBRANE_FEEDS))
def test_a_bayesian_layer_fed_by_a_node_membrane_raises(feed, step_mode, kernels_on):
    """``fc2(lif1.v)`` (or ``lif1.v_seq``): the membrane a converted node keeps is a
    plain tensor whose noise variance the node keeps as its own memory, so the layer took
    it as noise-free and the first layer's noise vanished from ``lif2``, silently."""
    net, x = _sj_membrane_fed(_SJ_MEMBRANE_FEEDS[feed], step_mode)
    functional.reset_net(net)
    with sbnn_addons.kernels.use_kernels(kernels_on), pytest.raises(
            VarianceFlowError,
            match=r"the input of BayesLinear \('fc2'\) is the membrane of neuron 'lif1'.*"
                  r"spikes instead.*exclude="):
        run_steps(net, x, step_mode).sum().backward()


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_a_bayesian_layer_fed_by_a_node_membrane_raises_without_gradients(step_mode):
    net, x = _sj_membrane_fed(_SJ_MEMBRANE_FEEDS["fc2(v.detach())"], step_mode)
    functional.reset_net(net)
    with torch.no_grad(), pytest.raises(VarianceFlowError,
                                        match="is the membrane of neuron 'lif1'"):
        run_steps(net, x, step_mode)


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("feed", list(_SJ_CURRENTS_FROM_MEMBRANES))
def test_a_node_driven_by_another_nodes_membrane_raises(feed, step_mode):
    """With ``fc2`` left deterministic, ``lif2`` took the first node's membrane in its
    input current as noise-free, silently."""
    net, x = _sj_membrane_fed(_SJ_CURRENTS_FROM_MEMBRANES[feed], step_mode, exclude=["fc2"])
    functional.reset_net(net)
    with pytest.raises(VarianceFlowError,
                       match=r"the input current of LIFNode \('lif2'\) is the membrane of "
                             r"neuron 'lif1'"):
        run_steps(net, x, step_mode).sum().backward()


@pytest.mark.parametrize("kernels_on", [True, False])
@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_node_spikes_and_noise_free_membranes_still_feed_layers_and_nodes(step_mode,
                                                                         kernels_on):
    """Not refused: spikes, a membrane in ``mean`` mode (no noise), and a membrane whose
    node is fed by deterministic layers (the fix the error names); the noisy layers get
    a gradient on their std."""
    with sbnn_addons.kernels.use_kernels(kernels_on):
        for feed in (lambda net, spikes, v: net.fc2(spikes),
                     lambda net, spikes, v: net.fc2(nn.functional.dropout(spikes, 0.2))):
            net, x = _sj_membrane_fed(feed, step_mode)
            functional.reset_net(net)
            run_steps(net, x, step_mode).sum().backward()
            assert net.fc2.std_rho.grad.abs() > 0
        for feed in _SJ_MEMBRANE_FEEDS.values():
            net, x = _sj_membrane_fed(feed, step_mode)
            functional.reset_net(net)
            with sbnn_addons.mode(net, "mean"):
                run_steps(net, x, step_mode).sum().backward()
            net, x = _sj_membrane_fed(feed, step_mode, exclude=["fc1"])
            functional.reset_net(net)
            run_steps(net, x, step_mode).sum().backward()
            assert net.fc2.std_rho.grad.abs() > 0


@pytest.mark.parametrize("kernels_on", [True, False])
def test_a_classifier_on_the_last_membrane_of_a_multi_step_node_raises(kernels_on):
    """``fc2(lif1.v)`` after a multi-step call (the fused sequence: no ``store_v_seq``),
    a classifier on the last membrane: the layer took it as noise-free, silently."""

    class LastMembraneNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.lif1 = layer.Linear(12, 16), neuron.LIFNode(tau=2.0)
            self.fc2 = nn.Linear(16, 5)
            functional.set_step_mode(self, "m")

        def forward(self, x):
            self.lif1(self.fc1(x))
            return self.fc2(self.lif1.v)

    torch.manual_seed(0)
    net = sbnn_sj.to_sbnn(LastMembraneNet())
    with sbnn_addons.kernels.use_kernels(kernels_on), pytest.raises(
            VarianceFlowError, match=r"BayesLinear \('fc2'\) is the membrane of neuron 'lif1'"):
        net(torch.rand(4, 6, 12) * 3)
    net = sbnn_sj.to_sbnn(LastMembraneNet(), exclude=["fc1"])  # the fix the error names
    net(torch.rand(4, 6, 12) * 3).sum().backward()
