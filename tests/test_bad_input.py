"""Bad input is named (issue 15): NaN / inf input, T = 0 and batch 0 on every entry
point (core layers and LIF, converted snnTorch and SpikingJelly models), operations with
no variance rule between a Bayesian layer and a host neuron."""

from __future__ import annotations

import contextlib
import math

import pytest
import snntorch as snn
import torch
from _snntorch_nets import LoopLeaky
from torch import nn

import sbnn_addons as sb
from sbnn_addons import base as base_mod
from sbnn_addons import check_finite
from sbnn_addons import snntorch as sbnn_snn
from sbnn_addons import spikingjelly as sbnn_sj
from sbnn_addons.moments import VarianceFlowError
from sbnn_addons.neurons import LIFState

pytest.importorskip("spikingjelly")
from spikingjelly.activation_based import functional, layer, neuron  # noqa: E402

NONFINITE = [math.nan, math.inf, -math.inf]


def _poison(x, value):
    x = x.clone()
    x.view(-1)[1] = value
    return x


# --------------------------------------------------------------------------- core layers
@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize("make, shape", [
    (lambda: sb.BayesLinear(6, 3), (4, 6)),
    (lambda: sb.BayesConv1d(2, 3, 3), (4, 2, 8)),
    (lambda: sb.BayesConv2d(2, 3, 3), (4, 2, 6, 6)),
    (lambda: sb.ChannelAffine(2), (4, 2, 6)),  # passed NaN on, silently
])
def test_core_layer_names_nonfinite_input(make, shape, value):
    layer_ = make()
    with pytest.raises(ValueError, match=r"NaN.*inf.*check_finite\(False\)"):
        layer_(_poison(torch.rand(shape), value))


@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize("name", ["weight", "bias"])
def test_channel_affine_alone_names_a_nonfinite_gamma_or_beta(name, value):
    """A ChannelAffine used on its own with a NaN / inf gamma or beta (after a NaN
    gradient step) turned every output of its channel NaN / inf, silently; inside a
    converted model its parameters are checked at the model's entry."""
    affine, x = sb.ChannelAffine(3), torch.rand(4, 3, 5)
    affine(x)  # found finite (tested again only after a change)
    with torch.no_grad():
        getattr(affine, name)[1] = value
    with pytest.raises(ValueError, match=rf"ChannelAffine\.{name}.*NaN.*inf.*"
                                         r"check_finite\(False\)"):
        affine(x)
    with check_finite(False):
        assert not torch.isfinite(affine(x)[:, 1]).all()  # the documented switch
    net = nn.Sequential(layer.Conv1d(2, 3, 3), layer.BatchNorm1d(3), neuron.LIFNode())
    net[1](net[0](torch.rand(4, 2, 8)))  # statistics learned: the affine folds them
    model = sbnn_sj.to_sbnn(net, batchnorm="affine")
    with torch.no_grad():
        getattr(model[1], name)[1] = value
    with pytest.raises(ValueError, match=rf"'1\.{name}' of the converted model"):
        model(torch.rand(4, 2, 8))


def test_check_finite_switch_as_context_and_global():
    fc = sb.BayesLinear(6, 3)
    bad = _poison(torch.rand(2, 6), math.nan)
    assert check_finite.enabled()
    with check_finite(False):
        assert torch.isnan(fc(bad)).any()  # the check is off: NaN passes through
    assert check_finite.enabled()
    with pytest.raises(ValueError, match="1 NaN"):
        fc(bad)
    try:
        check_finite(False)
        assert not check_finite.enabled()
        fc(bad)
    finally:
        check_finite(True)
    with pytest.raises(TypeError, match="True or False"):
        check_finite("no")


def test_finite_input_is_checked_once_per_version():
    fc = sb.BayesLinear(6, 3)
    x = torch.rand(2, 6)
    fc(x)
    x[0, 0] = math.inf  # an in-place change voids the mark
    with pytest.raises(ValueError, match="1 inf"):
        fc(x)


def test_steps_of_a_sequence_are_checked_through_their_base(monkeypatch):
    """A snnTorch loop feeds ``x[t]``, a view of the sequence: the sequence is tested
    once (one sum, one device sync on a GPU) instead of each step; a non-finite value in
    a step the model does not read raises nothing, one in a step it reads is named, and
    an in-place change of the sequence is seen."""
    from sbnn_addons import base

    sums = []
    real_test = base._sum_is_finite
    monkeypatch.setattr(base, "_sum_is_finite", lambda t: sums.append(t.shape) or
                        real_test(t))
    model = sbnn_snn.to_sbnn(_snn_seq())
    x = torch.rand(6, 3, 16)
    sbnn_snn.reset(model)
    for step in x:
        model(step)
    assert len(sums) == 1  # the whole sequence, once
    x[4, 1, 2] = math.nan  # in place: the mark is void, the base no longer finite
    sbnn_snn.reset(model)
    for step in x[:4]:
        model(step)  # the steps read are finite (each tested exactly)
    with pytest.raises(ValueError, match="1 NaN"):
        model(x[4])


def test_interleaved_sequences_each_keep_their_finite_check():
    """The base last found finite is remembered for the next step: steps of two
    sequences interleaved, one changed in place, still name the NaN of the changed one."""
    model = sbnn_snn.to_sbnn(_snn_seq())
    a, b = torch.rand(4, 3, 16), torch.rand(4, 3, 16)
    sbnn_snn.reset(model)
    for t in range(2):
        model(a[t])
        model(b[t])
    b[2, 0, 0] = math.nan
    model(a[2])
    with pytest.raises(ValueError, match="1 NaN"):
        model(b[2])


def test_check_input_accepts_inference_tensors():
    from sbnn_addons.base import check_input

    with torch.inference_mode():
        check_input(torch.rand(2, 6), "here")
        with pytest.raises(ValueError, match="the input of here contains 1 NaN"):
            check_input(_poison(torch.rand(2, 6), math.nan), "here")


@pytest.mark.parametrize("shape", [(0, 6), (0, 3, 6)])
def test_core_layer_empty_batch_gives_empty_output(shape):
    out = sb.BayesLinear(6, 3)(torch.rand(shape))
    assert out.shape == (*shape[:-1], 3)


# --------------------------------------------------------------------------- core LIF
@pytest.mark.parametrize("shape", [(0, 4, 5), (3, 0, 5), (0, 0, 5)])
@pytest.mark.parametrize("bayes", [False, True])
def test_lif_run_empty_sequence_or_batch(shape, bayes):
    lif = sb.LIF()
    currents = torch.rand(shape)
    if bayes:
        currents = sb.BayesLinear(5, 5)(currents)
    out = lif.run(currents)
    assert out.shape == shape


@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize("call", ["step", "run", "run_bayes", "run_unfused"])
def test_lif_names_nonfinite_input(call, value):
    """A NaN / inf current gave no spikes (and NaN gradients) silently; the core LIF
    checks its input as the layers do, a sequence once (its steps are not checked again)."""
    lif = sb.LIF()
    if call == "run_unfused":  # a wrapped fire: the step-by-step path
        lif.spike_fn.__dict__["fire"] = lif.spike_fn.fire
    currents = _poison(torch.rand(3, 2, 5), value)
    where = "LIF" if call == "step" else "LIF.run"
    with pytest.raises(ValueError, match=rf"input of {where} contains.*check_finite\(False\)"):
        if call == "step":
            lif(currents[0])
        elif call == "run_bayes":
            lif.run(sb.BayesLinear(5, 5)(torch.rand(3, 2, 5)) * currents)
        else:
            lif.run(currents)
    with check_finite(False):
        lif.run(currents)  # the documented switch


def test_lif_names_a_nonfinite_membrane_passed_positionally_or_by_keyword(monkeypatch):
    """A NaN membrane in the state passed to the core LIF fired no spike (and gave NaN
    gradients) silently, whether passed as lif(x, state) or lif(x, state=state); a state
    the LIF returned is not checked again."""
    lif = sb.LIF()
    current = torch.rand(2, 5)
    _, state = lif(current)
    bad = LIFState(_poison(state.membrane, math.nan), state.variance)
    for call in (lambda: lif(current, bad), lambda: lif(current, state=bad)):
        with pytest.raises(ValueError, match=r"LIF, its state.*NaN.*check_finite\(False\)"):
            call()
    calls = []
    real = base_mod._sum_is_finite
    monkeypatch.setattr(base_mod, "_sum_is_finite", lambda x: calls.append(x) or real(x))
    for _ in range(3):
        _, state = lif(current, state=state)
    assert calls == []  # the current was checked at its first step, the states are its own
    with check_finite(False):
        lif(current, state=bad)


# --------------------------------------------------------------------------- snnTorch
def _snn_seq():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 8), snn.Leaky(beta=0.9, init_hidden=True),
                         nn.Linear(8, 4), snn.Leaky(beta=0.9, init_hidden=True, output=True))


@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize("exclude", [None, "0"])
def test_snntorch_converted_sequential_names_nonfinite_input(value, exclude):
    model = sbnn_snn.to_sbnn(_snn_seq(), exclude=exclude)
    sbnn_snn.reset(model)
    with pytest.raises(ValueError, match=r"converted model.*NaN.*check_finite"):
        model(_poison(torch.rand(3, 16), value))
    with check_finite(False):
        model(_poison(torch.rand(3, 16), value))  # documented switch: no check


@pytest.mark.parametrize("value", NONFINITE)
def test_snntorch_converted_loop_names_nonfinite_input(value):
    model = sbnn_snn.to_sbnn(LoopLeaky())
    with pytest.raises(ValueError, match="NaN"):
        model(_poison(torch.rand(5, 3, 64), value))


class _MemNet(nn.Module):
    """An snnTorch network that takes its membrane as an argument."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)
        self.lif = snn.Leaky(beta=0.9)

    def forward(self, x, mem=None):
        mem = self.lif.init_leaky() if mem is None else mem
        return self.lif(self.fc(x), mem)


@pytest.mark.parametrize("make", [_MemNet, lambda: snn.Leaky(beta=0.9)])
def test_snntorch_converted_model_names_a_nan_membrane_passed_by_keyword(make):
    """A NaN membrane passed to a converted model by keyword (net(x, mem=mem), a converted
    neuron's lif(x, mem=mem)) is refused as one passed positionally: the spike functions
    inside a converted model skip their own check."""
    torch.manual_seed(0)
    model = sbnn_snn.to_sbnn(make())
    x = torch.rand(3, 16) if isinstance(model, _MemNet) else torch.rand(3, 8)
    bad = _poison(torch.zeros(3, 8), math.nan)
    for call, where in ((lambda: model(x, bad), "argument 1"),
                        (lambda: model(x, mem=bad), "argument 'mem'")):
        with pytest.raises(ValueError, match=rf"converted model.*{where}.*NaN"):
            call()
    model(x, mem=torch.zeros(3, 8))


@pytest.mark.parametrize("shape", [(0, 16), (0, 3, 16)])
def test_snntorch_converted_sequential_empty_batch(shape):
    model = sbnn_snn.to_sbnn(_snn_seq())
    with pytest.raises(ValueError, match="zero-size dimension"):
        model(torch.rand(shape))


@pytest.mark.parametrize("shape", [(0, 3, 64), (5, 0, 64)])
def test_snntorch_converted_loop_empty_sequence(shape):
    model = sbnn_snn.to_sbnn(LoopLeaky())
    with pytest.raises(ValueError, match=r"T = 0 steps or a batch of 0"):
        model(torch.rand(shape))


class _SnnGRU(nn.Module):
    """A recurrent torch layer between a weight layer and an snnTorch neuron."""

    def __init__(self, rnn):
        super().__init__()
        self.fc = nn.Linear(8, 6)
        self.rnn = rnn(6, 6, batch_first=True)
        self.lif = snn.Leaky(beta=0.9, init_hidden=True)

    def forward(self, x):
        return self.lif(self.rnn(self.fc(x))[0])


@pytest.mark.parametrize("rnn, name", [(nn.GRU, "gru"), (nn.LSTM, "lstm")])
def test_snntorch_recurrent_op_before_neuron_is_named(rnn, name):
    model = sbnn_snn.to_sbnn(_SnnGRU(rnn))
    with pytest.raises(VarianceFlowError, match=f"'{name}'"):
        model(torch.rand(2, 3, 8))


def test_snntorch_op_without_a_rule_names_the_neuron_and_the_layer():
    """An operation without a variance rule between a Bayesian layer and a converted
    snnTorch neuron was named with "this spike function" and "exclude the layer": in a
    deep model, neither which neuron nor which layer."""
    model = sbnn_snn.to_sbnn(nn.Sequential(
        nn.Linear(8, 6), snn.Leaky(beta=0.9, init_hidden=True), nn.Linear(6, 4), nn.Tanh(),
        snn.Leaky(beta=0.9, init_hidden=True, output=True)))
    with pytest.raises(VarianceFlowError, match=r"went through 'tanh'.*neuron "
                                                r"'4', fed by the Bayesian "
                                                r"layer\(s\) '2'.*exclude=\['2'\]"):
        model(torch.rand(2, 8))


def test_snntorch_chunk_before_two_neurons_keeps_variance():
    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 12)
            self.a = snn.Leaky(beta=0.9, init_hidden=True)
            self.b = snn.Leaky(beta=0.9, init_hidden=True)

        def forward(self, x):
            left, right = self.fc(x).chunk(2, dim=-1)
            return self.a(left), self.b(right)

    torch.manual_seed(0)
    model = sbnn_snn.to_sbnn(Split(), std=0.5)
    model(torch.rand(4, 8))
    for lif in (model.a, model.b):
        var = sbnn_snn.membrane_variance(lif)
        assert var is not None  # the membrane carries the layer's noise


# --------------------------------------------------------------------------- SpikingJelly
def _sj_net(sm):
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(10, 8), neuron.LIFNode(), layer.Linear(8, 4),
                        neuron.LIFNode())
    functional.set_step_mode(net, sm)
    return net


@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize("sm, shape", [("s", (3, 10)), ("m", (4, 3, 10))])
def test_spikingjelly_converted_names_nonfinite_input(sm, shape, value):
    model = sbnn_sj.to_sbnn(_sj_net(sm))
    with pytest.raises(ValueError, match=r"NaN.*check_finite\(False\)"):
        model(_poison(torch.rand(shape), value))


@pytest.mark.parametrize("sm, shape", [("m", (0, 3, 10)), ("m", (4, 0, 10)), ("s", (0, 10))])
def test_spikingjelly_converted_empty_input(sm, shape):
    model = sbnn_sj.to_sbnn(_sj_net(sm))
    with pytest.raises(ValueError, match="zero-size dimension"):
        model(torch.rand(shape))


@pytest.mark.parametrize("bayes", [False, True])
def test_spikingjelly_linked_multistep_node_with_no_steps(bayes):
    model = sbnn_sj.to_sbnn(_sj_net("m"))
    x = torch.rand(0, 3, 10)
    current = model[0](x) if bayes else torch.rand(0, 3, 8)
    out = model[1](current)
    assert out.shape == (0, 3, 8)
    out = model[1](model[0](torch.rand(2, 3, 10)))  # and it still runs afterwards
    assert out.shape == (2, 3, 8)


@pytest.mark.parametrize("rnn, name", [(nn.GRU, "gru"), (nn.LSTM, "lstm")])
def test_spikingjelly_recurrent_op_before_neuron_is_named(rnn, name):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = layer.Linear(8, 6, step_mode="m")
            self.rnn = rnn(6, 6)
            self.lif = neuron.LIFNode(step_mode="m")

        def forward(self, x):
            return self.lif(self.rnn(self.fc(x))[0])

    model = sbnn_sj.to_sbnn(Net())
    with pytest.raises(VarianceFlowError, match=f"'{name}'"):
        model(torch.rand(3, 2, 8))


def test_spikingjelly_chunk_reaches_each_neuron():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = layer.Linear(8, 12, step_mode="m")
            self.a = neuron.LIFNode(step_mode="m")
            self.b = neuron.LIFNode(step_mode="m")

        def forward(self, x):
            left, right = self.fc(x).chunk(2, dim=-1)
            return self.a(left) + self.b(right)

    torch.manual_seed(0)
    model = sbnn_sj.to_sbnn(Net(), std=0.5)
    model(torch.rand(3, 2, 8))
    assert isinstance(model.a.sbnn_var, torch.Tensor) and isinstance(model.b.sbnn_var,
                                                                     torch.Tensor)


@pytest.mark.parametrize("op", [torch.tanh, torch.sigmoid, torch.relu])
def test_core_op_without_rule_raises_without_track_variance(op):
    """A plain core network (no converter, no track_variance): an operation without a
    variance rule between a Bayesian layer and the neuron is named, not dropped."""
    fc = sb.BayesLinear(4, 3, std=0.3)
    lif = sb.LIF(spike_fn=sb.IWSTSpike("st"))
    with pytest.raises(sb.VarianceFlowError, match=op.__name__):
        lif(op(fc(torch.rand(2, 4))))
    with pytest.raises(sb.VarianceFlowError, match=op.__name__):
        sb.IWSTSpike("st")(op(fc(torch.rand(2, 4))) - 0.5)


def test_attach_variance_names_a_wrong_argument():
    with pytest.raises(TypeError, match="mean must be a torch.Tensor"):
        sb.attach_variance([1.0, 2.0], torch.ones(2))
    with pytest.raises(TypeError, match="variance must be"):
        sb.attach_variance(torch.ones(2), 0.5)


def test_compiled_spike_names_a_wrong_dtype():
    if not sb.kernels.available():
        pytest.skip("no C compiler on this machine")
    with pytest.raises(TypeError, match="u must be a torch.float32 CPU tensor"):
        sb.kernels.compiled_spike(torch.zeros(4, dtype=torch.float64), torch.ones(4),
                                  sb.get_estimator("st"))


# ------------------------------------------------- two weight layers with no neuron between
def test_core_layer_refuses_an_input_that_carries_a_variance():
    """A Bayesian layer fed by another one (no neuron between) would replace the first
    layer's variance by its own: it raises, naming the fix."""
    first = sb.BayesLinear(6, 5, std=0.3)
    for second, x in [(sb.BayesLinear(5, 3), torch.rand(4, 6)),
                      (sb.BayesConv1d(5, 3, 1), torch.rand(4, 2, 6))]:
        h = first(x)
        if isinstance(second, sb.BayesConv1d):
            h = h.transpose(1, 2)
        with pytest.raises(VarianceFlowError, match="neuron between them"):
            second(h)
    with sb.mode(first, "mean"):  # no variance in mean mode: nothing to refuse
        sb.BayesLinear(5, 3)(first(torch.rand(4, 6)))


def test_snntorch_stacked_linears_raise_at_conversion_and_call():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 32), nn.Linear(32, 16),
                        snn.Leaky(beta=0.9, init_hidden=True, output=True))
    x = torch.rand(4, 10)
    with pytest.raises(VarianceFlowError, match="neuron between them"):
        sbnn_snn.to_sbnn(net, example_input=x)
    model = sbnn_snn.to_sbnn(net)
    with pytest.raises(VarianceFlowError, match="neuron between them"):
        model(x)
    kept = sbnn_snn.to_sbnn(net, exclude="0")  # the earlier layer deterministic: trains
    spk, _ = kept(x)
    spk.sum().backward()
    assert kept[1].std_rho.grad is not None


def test_spikingjelly_conv_flatten_linear_raises_at_conversion():
    net = nn.Sequential(layer.Conv2d(2, 4, 3, step_mode="m"), layer.Flatten(step_mode="m"),
                        layer.Linear(4 * 6 * 6, 5, step_mode="m"), neuron.LIFNode(step_mode="m"))
    with pytest.raises(VarianceFlowError, match="neuron between them"):
        sbnn_sj.to_sbnn(net, example_input=torch.rand(3, 2, 2, 8, 8))
    model = sbnn_sj.to_sbnn(net, exclude="0")
    functional.reset_net(model)
    model(torch.rand(3, 2, 2, 8, 8)).sum().backward()
    assert model[2].std_rho.grad is not None


@pytest.mark.parametrize("when", ["built", "set after the conversion"])
@pytest.mark.parametrize("estimator", ["st", "iwst(0.5)", "agr"])
@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "pytorch-path"])
@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_infinite_threshold_readout_keeps_the_aux_loss_finite(step_mode, kernel, estimator,
                                                              when):
    """SpikingJelly's membrane readout (LIFNode(v_threshold=inf)) never fires: its z is
    -inf, so it collects no auxiliary term; the loss and every gradient stay finite, for
    every estimator, with the kernel and on the PyTorch path (CUDA tensors), also where
    the threshold is set after the conversion. Seen NaN: the noise gradient
    -z J = -inf * 0 (PyTorch path), and the fused sequence's backward, which recomputed
    H = u + theta = -inf + inf (kernel, multi-step, IW-ST and AGR); a threshold set after
    the conversion left the spike function's copy at 1.0 (aux loss inf, the std's
    gradient NaN on the PyTorch path)."""
    with contextlib.nullcontext() if kernel else sb.kernels.use_kernels(False):
        _infinite_threshold_readout(step_mode, estimator, when == "built")


def _infinite_threshold_readout(step_mode, estimator, built=True):
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(4, 8, step_mode=step_mode),
                        neuron.LIFNode(step_mode=step_mode),
                        layer.Linear(8, 3, step_mode=step_mode),
                        neuron.LIFNode(step_mode=step_mode,
                                       v_threshold=math.inf if built else 1.0))
    model = sbnn_sj.to_sbnn(net, aux_loss=True, estimator=estimator)
    if not built:
        model[3].v_threshold = math.inf
    x = torch.rand(6, 5, 4) * 3
    functional.reset_net(model)
    if step_mode == "m":
        model(x)
        logits = model[3].v
    else:
        for t in range(6):
            model(x[t])
        logits = model[3].v
    aux = sb.aux_loss(model)
    assert torch.isfinite(aux) and aux > 0  # the hidden layer's terms
    (logits.sum() + 0.1 * aux).backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("estimator", ["st", "iwst(0.5)", "agr"])
@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "pytorch-path"])
@pytest.mark.parametrize("reset", ["zero", "none"])
def test_core_lif_membrane_readout_with_an_infinite_threshold(reset, kernel, estimator):
    """A core LIF that never fires (threshold=inf, reset 'none' or 'zero'): finite
    membranes and gradients step by step and in run(); with the subtract reset the
    membrane would be V - inf * 0 = NaN: refused, naming the readout resets."""
    with pytest.raises(ValueError, match="reset='none'"):
        sb.LIF(threshold=math.inf)
    torch.manual_seed(0)
    fc = sb.BayesLinear(4, 3)
    lif = sb.LIF(threshold=math.inf, reset=reset, spike_fn=sb.IWSTSpike(estimator))
    x = torch.rand(6, 5, 4)
    with contextlib.nullcontext() if kernel else sb.kernels.use_kernels(False):
        spikes = lif.run(fc(x))
        s1, state = lif(fc(x[0]))
        s2, state = lif(fc(x[1]), state)
        assert torch.isfinite(state.membrane).all() and state.membrane.abs().sum() > 0
        (spikes.sum() + s2.sum() + state.membrane.sum()).backward()
    assert spikes.sum() == 0 and s2.sum() == 0
    for name, p in fc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_bias_std_needs_a_bias_and_converters_skip_bias_free_layers():
    """bias_std without a bias would add noise no KL term covers: it raises; the
    converters give bias noise only to layers that have a bias."""
    with pytest.raises(ValueError, match="bias=False"):
        sb.BayesLinear(3, 2, bias=False, bias_std=0.1)
    with pytest.raises(ValueError, match="bias=False"):
        sb.BayesConv2d(3, 2, 3, bias=False, bias_std=0.1)
    net = nn.Sequential(nn.Linear(4, 5, bias=False), snn.Leaky(beta=0.9, init_hidden=True),
                        nn.Linear(5, 3), snn.Leaky(beta=0.9, init_hidden=True, output=True))
    model = sbnn_snn.to_sbnn(net, bias_std=0.1)
    assert not model[0].bias_noise and model[2].bias_noise
    sj = nn.Sequential(layer.Conv2d(2, 4, 3, bias=False, step_mode="m"),
                       neuron.LIFNode(step_mode="m"))
    assert not sbnn_sj.to_sbnn(sj, bias_std=0.1)[0].bias_noise


@pytest.mark.parametrize("make", [
    lambda s: sb.BayesLinear(4, 3, std=s),
    lambda s: sb.BayesConv2d(1, 2, 3, std=s),
    lambda s: sb.BayesLinear(4, 3, bias_std=s),
    lambda s: sb.IWSTSpike("st", std=s),
])
def test_a_std_whose_square_overflows_float32_is_named(make):
    # std = 1e30: variance inf, every spike a coin flip, every gradient exactly 0
    with pytest.raises(ValueError, match="too large.*overflows float32"):
        make(1e30)
    make(1e3)  # large but representable: accepted


def test_finite_check_works_under_torch_func_transforms():
    """Per-sample gradients (vmap over grad of functional_call) run with the input check
    on, and a NaN in one example of the vmapped batch is still named."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    net = nn.Sequential(sb.BayesLinear(16, 8), sb.IWSTSpike("st", std=0.3, learn_std=True))
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p, xi):
        return functional_call(net, p, (xi.unsqueeze(0),)).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0), randomness="different")
    x = torch.rand(5, 16)
    assert per_sample(params, x)["0.weight"].shape == (5, 8, 16)
    x[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        per_sample(params, x)


# ------------------------------------------------------- constructor and objective arguments
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("make, match", [
    (lambda: sb.BayesLinear(0, 3), "no synapses"),  # a ZeroDivisionError
    (lambda: sb.BayesLinear(3, 0), "no synapses"),  # an IndexError
    (lambda: sb.BayesConv2d(2, 0, 3), "no synapses"),
    (lambda: sb.BayesLinear(6, -1), "BayesLinear: out_features must be an integer >= 1"),
    (lambda: sb.BayesLinear(6.0, 3), "BayesLinear: in_features must be an integer >= 1"),
    (lambda: sb.BayesLinear(True, 3), "in_features must be an integer"),  # taken as 1
    (lambda: sb.BayesConv2d(2, -1, 3), "BayesConv2d: out_channels must be an integer"),
    (lambda: sb.BayesConv2d("2", 3, 3), "in_channels must be an integer"),
    (lambda: sb.BayesConv1d(2, 3, 3.0), r"kernel_size must be an integer >= 1 \(or a tuple"),
    (lambda: sb.BayesConv2d(2, 3, 3, stride=0), "stride must be an integer >= 1"),  # forward
    (lambda: sb.BayesConv2d(2, 3, 3, padding=-1), "padding must be an integer >= 0"),
    (lambda: sb.BayesConv1d(2, 3, 3, padding=1.5), "padding must be an integer >= 0"),
    (lambda: sb.BayesConv2d(2, 3, 3, dilation=0), "dilation must be an integer >= 1"),
    (lambda: sb.BayesConv2d(2, 3, 3, dilation=(1, 0)), "dilation must be an integer >= 1"),
    (lambda: sb.ChannelAffine(0), "num_features must be an integer >= 1"),  # accepted
    (lambda: sb.ChannelAffine(3, eps=-1e-5), "eps must be a finite number >= 0"),  # accepted
    (lambda: sb.ChannelAffine(3, channel_dim=1.0), "channel_dim must be an integer"),
    (lambda: sb.IWSTSpike("st", threshold=math.nan), r"threshold must be a number \(not NaN"),
    (lambda: sb.IWSTSpike("st", threshold="1"), "threshold must be a number"),
])
def test_bad_constructor_arguments_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_kl_monte_carlo_samples_are_checked(k):
    """num_samples=0 gave a reshape error (a float, a torch.Size error) from the prior's
    Monte Carlo KL; it is named on the model and on the layer."""
    fc = sb.BayesLinear(4, 3)
    with pytest.raises(ValueError, match="num_samples .* must be an integer >= 1"):
        sb.kl_divergence(fc, sb.scale_mixture_prior(), num_samples=k)
    with pytest.raises(ValueError, match="num_samples"):
        fc.kl_divergence(sb.scale_mixture_prior(), num_samples=k)


def test_sbnn_objective_arguments_are_named():
    import numpy as np

    fc, nll = sb.BayesLinear(4, 3), torch.tensor(1.0)
    with pytest.raises(TypeError, match=r"nll must be a scalar tensor.*F.cross_entropy"):
        sb.sbnn_objective(1.0, fc)  # an AttributeError
    with pytest.raises(ValueError, match="num_data .* must be an integer >= 1.*10.5"):
        sb.sbnn_objective(nll, fc, 10.5, kl_weight=1.0)  # divided by 10.5 silently
    with pytest.raises(ValueError, match=r"kl_weight must be a finite number >= 0, got '1'"):
        sb.sbnn_objective(nll, fc, 10, kl_weight="1")
    loss = sb.sbnn_objective(nll, fc, np.int64(10), kl_weight=1.0)  # numpy ints count
    torch.testing.assert_close(loss, nll + sb.kl_divergence(fc) / 10)


def _snn_net_4_3():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), snn.Leaky(beta=0.9, init_hidden=True),
                         nn.Linear(6, 3), snn.Leaky(beta=0.9, init_hidden=True, output=True))


def test_sbnn_objective_names_a_nonfinite_term():
    """A NaN / inf NLL, auxiliary loss or KL made a NaN / inf objective that trained on
    (the optimiser then writes NaN into the weights), silently: the objective names the
    term, after consuming the collected auxiliary terms; check_finite(False) lets it pass."""
    import torch.nn.functional as F

    y = torch.zeros(5, dtype=torch.long)
    # no layer noise and a small own spike noise: z = u / sigma overflows on a huge input
    model = sbnn_snn.to_sbnn(_snn_net_4_3(), std=0.0, learn_std=False, spike_std=1e-3,
                             aux_loss=True)
    model.train()
    nll = F.cross_entropy(model(torch.rand(5, 4))[0], y)
    with pytest.raises(ValueError, match=r"sbnn_objective: the NLL \(nll\) is NaN.*"
                                         r"check_finite\(False\)"):
        sb.sbnn_objective(nll * math.nan, model, aux_weight=0.1)
    nll = F.cross_entropy(model(torch.rand(5, 4) * 1e18)[0], y)
    with pytest.raises(ValueError, match=r"sbnn_objective: the auxiliary loss .* is inf"):
        sb.sbnn_objective(nll, model, aux_weight=0.1)
    nll = F.cross_entropy(model(torch.rand(5, 4))[0], y)
    with check_finite(False):
        assert math.isnan(sb.sbnn_objective(nll * math.nan, model, aux_weight=0.1).item())
    bayes = sbnn_snn.to_sbnn(_snn_net_4_3())
    with torch.no_grad():
        bayes[0].weight.mul_(1e25)  # mu^2 / prior^2 overflows float32
    with pytest.raises(ValueError, match=r"sbnn_objective: the KL term .* is inf"):
        sb.sbnn_objective(torch.tensor(1.0), bayes, 10, kl_weight=1.0, prior=0.5)
    loss = sb.sbnn_objective(torch.tensor(1.0), bayes, 10)  # kl_weight 0: no KL computed
    assert float(loss) == 1.0


def _models():
    import sbnn_addons.models

    return sbnn_addons.models


def _data():
    import sbnn_addons.data

    return sbnn_addons.data


def _ep():
    import sbnn_addons.ep

    return sbnn_addons.ep


def _paper_recipe(*args, **kwargs):
    from sbnn_addons.models import paper_recipe

    return paper_recipe(*args, **kwargs)


@pytest.mark.parametrize("call, who", [
    (lambda m: sb.set_mode(m, "mc"), "set_mode"), (sb.get_mode, "get_mode"),
    (lambda m: sb.mode(m, "mean").__enter__(), "mode"),
    (lambda m: sb.param_groups(m, 1e-3), "param_groups"),
    (sb.enable_aux_loss, "auxiliary loss"), (sb.aux_loss, "auxiliary loss"),
    (sb.kl_divergence, "kl_divergence"),
    (lambda m: sb.sbnn_objective(torch.tensor(1.0), m), "auxiliary loss"),
    (sb.metrics.SpikeMonitor, "SpikeMonitor"),
    (lambda m: sb.mc_predict(m, torch.zeros(2, 3), 2), "mc_predict"),
    (lambda m: sb.moments.check_variance_flow(m, torch.zeros(2, 3)), "check_variance_flow"),
    (sbnn_snn.to_sbnn, "snntorch.to_sbnn"), (sbnn_sj.to_sbnn, "spikingjelly.to_sbnn"),
    (sbnn_snn.to_snntorch, "to_snntorch"), (sbnn_sj.to_spikingjelly, "to_spikingjelly"),
    (sbnn_snn.reset, "snntorch.reset"), (sbnn_sj.reset, "spikingjelly.reset"),
    (lambda m: list(sb.noise_parameters(m)), "noise_parameters"),
    (lambda m: _paper_recipe(m, "shd", 5), "paper_recipe"),
    (sb.track_variance, "track_variance"),
    (sb.uncertainty.default_reset, "default_reset"),
])
def test_model_functions_name_a_model_that_is_not_a_module(call, who):
    """model.parameters() (or a state dict) in place of the model: an AttributeError."""
    params = sb.BayesLinear(3, 2).parameters()
    with pytest.raises(TypeError, match=f"{who}.*must be an nn.Module, got generator"):
        call(params)


def _convert_snntorch(**kw):
    import snntorch as snn

    from sbnn_addons.snntorch import to_sbnn

    return to_sbnn(nn.Sequential(nn.Linear(4, 3), snn.Leaky(beta=0.9, init_hidden=True)), **kw)


def _convert_spikingjelly(**kw):
    from spikingjelly.activation_based import layer, neuron

    from sbnn_addons.spikingjelly import to_sbnn

    return to_sbnn(nn.Sequential(layer.Linear(4, 3), neuron.IFNode()), **kw)


@pytest.mark.parametrize("call, name", [
    (lambda v: sb.BayesLinear(3, 2, learn_std=v), "learn_std"),
    (lambda v: sb.BayesConv2d(1, 2, 3, learn_std=v), "learn_std"),
    (lambda v: sb.BayesLinear(3, 2, detach_input_variance=v), "detach_input_variance"),
    (lambda v: sb.BayesConv1d(1, 2, 3, detach_input_variance=v), "detach_input_variance"),
    (lambda v: sb.IWSTSpike("st", std=0.1, learn_std=v), "learn_std"),
    (lambda v: sb.IWSTSpike("st", at_zero=v), "at_zero"),
    (lambda v: sb.IWSTSpike("st", use_input_variance=v), "use_input_variance"),
    (lambda v: sb.enable_aux_loss(sb.IWSTSpike("st"), v), "enabled"),
    (lambda v: sb.kernels.use_kernels(v).__enter__(), r"use_kernels\(flag\)"),
    (lambda v: sb.mc_predict(nn.Linear(4, 3), torch.rand(2, 4), 2, count_spikes=v),
     "count_spikes"),
    (lambda v: sb.mc_predict(nn.Linear(4, 3), torch.rand(2, 4), 2, fold=v), "fold"),
    (lambda v: sb.metrics.SpikeMonitor(nn.Linear(4, 3), synops=v), "synops"),
    (lambda v: sb.uncertainty.from_sample_probs(torch.full((1, 2, 2), 0.5), keep_samples=v),
     "keep_samples"),
    (lambda v: _convert_snntorch(learn_std=v), "learn_std"),
    (lambda v: _convert_snntorch(inplace=v), "inplace"),
    (lambda v: _convert_spikingjelly(learn_std=v), "learn_std"),
    (lambda v: _convert_spikingjelly(aux_loss=v), "aux_loss"),
    (lambda v: sb.track_variance(nn.Sequential(sb.BayesLinear(3, 2)), check_inputs=v),
     "check_inputs"),
    (lambda v: _models().shd_recurrent(in_features=4, hidden=(3,), num_classes=2,
                                       num_steps=2, bayes=v), "bayes"),
    (lambda v: _models().SpikingResNet(2, 3, widths=(4,), bayes=v), "bayes"),
    (lambda v: _models().SpikingResNet(2, 3, widths=(4,), readout_noise=v), "readout_noise"),
    (lambda v: _models().ZeroDiagBayesLinear(3, mask_variance=v), "mask_variance"),
    (lambda v: _data().make_randman(num_classes=2, num_units=3, num_steps=4,
                                    samples_per_class=2, shuffle=v), "shuffle"),
    (lambda v: _data().load_cifar10("/nonexistent", normalize=v), "normalize"),
    (lambda v: _models().SpikingResNet(2, 3, widths=(4,), checkpoint=v), "checkpoint"),
    (lambda v: _ep().EPNetwork([4, 3], bias=v), "bias"),
])
@pytest.mark.parametrize("value", ["no", "False", 0])
def test_a_flag_that_is_not_a_bool_is_named(call, name, value):
    """learn_std="no" (a string from a config file) was truthy: the std was learned."""
    kernels_on = sb.kernels.enabled()
    with pytest.raises(TypeError, match=f"{name} must be True or False"):
        call(value)
    assert sb.kernels.enabled() == kernels_on  # left as it was


def test_numpy_and_torch_bools_are_flags():
    import numpy as np

    assert sb.BayesLinear(3, 2, learn_std=np.bool_(False)).learn_std is False
    assert sb.IWSTSpike("st", at_zero=torch.tensor(True)).at_zero is True


def _diagnostics():
    from sbnn_addons import diagnostics

    return diagnostics


def _counts_net():
    torch.manual_seed(0)
    return nn.Sequential(sb.BayesLinear(4, 3), sb.IWSTSpike("st", std=0.3), nn.Linear(3, 2))


@pytest.mark.parametrize("call", [
    lambda n: sb.mc_predict(_counts_net(), torch.rand(2, 4), n),
    lambda n: sb.mc_predict(_counts_net(), torch.rand(2, 4), 2, chunk_size=n),
    lambda n: sb.mc_predict(_counts_net(), torch.rand(2, 4), 2, fold=True, batch_dim=n - 2),
    lambda n: sb.uncertainty.metrics_vs_samples(torch.full((2, 2, 2), 0.5),
                                                torch.tensor([0, 1]), [n]),
    lambda n: sb.uncertainty.metrics_vs_samples(torch.full((2, 2, 2), 0.5),
                                                torch.tensor([0, 1]), n_bins=n),
    lambda n: sb.metrics.expected_calibration_error(torch.full((2, 2), 0.5),
                                                   torch.tensor([0, 1]), n_bins=n),
    lambda n: sb.metrics.adaptive_calibration_error(torch.full((2, 2), 0.5),
                                                    torch.tensor([0, 1]), n_bins=n),
    lambda n: sb.BayesLinear(3, 2).kl_divergence(sb.scale_mixture_prior(), num_samples=n),
    lambda n: sb.spike_seed(0, n),
    lambda n: _diagnostics().make_network([2, n, 2]),
    lambda n: _diagnostics().make_network([2, 2, 2], neuron="lif", steps=n),
    lambda n: _diagnostics().make_inputs(_diagnostics().make_network([2, 2, 2]), batch=n),
    lambda n: _ep().EPNetwork([4, n]),
    lambda n: _ep().EPTrainer(_ep().EPNetwork([4, 2]), batch_size=n),
])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.filterwarnings("ignore:mc_predict. the 2 passes gave identical")
def test_numpy_and_torch_integers_are_counts(call, kind):
    """A count from NumPy or a 0-d integer tensor (``for k in np.arange(1, 5)``) was
    refused with "must be an integer >= 1, got np.int64(2)", an error naming an integer
    as not one."""
    import numpy as np

    call(np.int64(2) if kind == "numpy" else torch.tensor(2))


@pytest.mark.parametrize("value", [True, 2.0, torch.tensor(2.0), torch.tensor([2]),
                                   torch.tensor(True)])
def test_a_count_that_is_not_an_integer_is_still_named(value):
    with pytest.raises(ValueError, match=r"num_samples \(K\) must be an integer >= 1"):
        sb.mc_predict(_counts_net(), torch.rand(2, 4), value)


def _counts_calibration():
    torch.manual_seed(0)
    return nn.Sequential(sb.BayesLinear(4, 3), sb.IWSTSpike("st", std=0.3))


@pytest.mark.parametrize("call", [
    lambda v: sb.BayesLinear(3, 2, std=v),
    lambda v: sb.BayesConv2d(1, 2, 3, std=v, learn_std=False),
    lambda v: sb.IWSTSpike("st", std=v),
    lambda v: sb.IWSTSpike("st", aux_pull=v),
    lambda v: sb.param_groups(sb.BayesLinear(3, 2), lr=v, noise_lr=v),
    lambda v: sb.metrics.check_probabilities(torch.full((2, 2), 0.5), torch.tensor([0, 1]),
                                             atol=v),
    lambda v: sb.metrics.negative_log_likelihood(torch.full((2, 2), 0.5),
                                                 torch.tensor([0, 1]), eps=v),
    lambda v: sb.calibrate_spike_std(_counts_calibration(), torch.rand(2, 4),
                                     max_rate_increase=v, min_factor=v),
    lambda v: _ep().EPTrainer(_ep().EPNetwork([4, 2]), damping=v, var_floor=v),
])
@pytest.mark.filterwarnings("ignore:calibrate_spike_std. at the smallest factor")
def test_numpy_reals_are_numbers(call):
    """A float32 from NumPy (a hyper-parameter read from an array) was refused with "std
    must be a real number, got float32", an error naming a real number as not one."""
    import numpy as np

    call(np.float32(0.25))


def test_std_shape_and_nll_eps_are_checked():
    """std_shape=5 failed with "'int' object is not iterable"; an eps <= 0 in the NLL
    clamped nothing (a probability of 0 gave an infinite loss)."""
    from sbnn_addons.metrics import negative_log_likelihood

    with pytest.raises(TypeError, match=r"std_shape must be a sequence.*\(C,\)"):
        sb.IWSTSpike("st", std=0.1, std_shape=5)
    with pytest.raises(TypeError, match="std_shape"):
        sb.IWSTSpike("st", std=0.1, std_shape=(0,))
    assert sb.IWSTSpike("st", std=0.1, std_shape=torch.Size([3])).std.shape == (3,)
    probs, y = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    for eps in (-1.0, 0, 1.5, "1e-8"):
        with pytest.raises(ValueError, match=r"eps must be a number in \(0, 1\)"):
            negative_log_likelihood(probs, y, eps=eps)
    assert torch.isfinite(negative_log_likelihood(probs, y, eps=1e-8))


class _Boom(nn.Module):
    fail = False

    def forward(self, x):
        if self.fail:
            raise KeyError("boom")
        return x


@pytest.mark.parametrize("host", ["core", "snntorch"])
def test_a_forward_that_raised_leaves_no_aux_terms_behind(host):
    """The spike functions' aux terms of a forward that raised (caught, the batch skipped)
    were added to the next step's aux_loss, silently: they are dropped."""
    torch.manual_seed(0)
    boom = _Boom()
    if host == "core":
        net = sb.track_variance(nn.Sequential(sb.BayesLinear(4, 8, std=0.3),
                                              sb.IWSTSpike("st", std=0.2), nn.Linear(8, 3),
                                              boom))
    else:
        net = sbnn_snn.to_sbnn(nn.Sequential(nn.Linear(4, 8),
                                             snn.Leaky(beta=0.9, init_hidden=True), boom),
                               aux_loss=True)
        boom = net[-1]  # the converted copy's
    sb.enable_aux_loss(net)
    x = torch.rand(5, 4) * 3

    def step(inputs):
        if host == "snntorch":
            sbnn_snn.reset(net)
        net(inputs)

    sb.seed_spikes(net, 0)
    step(x)
    clean = float(sb.aux_loss(net, "sum"))
    boom.fail = True
    with pytest.raises(KeyError):
        step(x * 10)  # collects its terms, then raises
    boom.fail = False
    sb.seed_spikes(net, 0)
    step(x)
    assert float(sb.aux_loss(net, "sum")) == pytest.approx(clean)


def test_forward_hook_that_drops_the_variance_raises():
    """A forward hook of a Bayesian layer that returns a tensor without the layer's
    variance (``.data``, ``as_subclass``, a new tensor) made the layer's noise vanish
    silently; it raises, naming the hook and the fix, also for a hook added after the
    first forward, and in check_variance_flow (mean mode). A hook that returns an
    expression of the output keeps the variance (scaled by its rule)."""
    torch.manual_seed(0)
    fc, x = sb.BayesLinear(4, 3), torch.rand(2, 4)
    ref = sb.get_variance(fc(x))
    handle = fc.register_forward_hook(lambda m, i, o: o * 2.0)
    torch.testing.assert_close(sb.get_variance(fc(x)), 4 * ref)
    fc.register_forward_hook(lambda m, i, o: None)
    assert len(fc._forward_hooks) == 3  # the two hooks and the check, once
    late = fc.register_forward_hook(lambda m, i, o: o.as_subclass(torch.Tensor))
    with pytest.raises(VarianceFlowError, match=r"forward hook of BayesLinear.*"
                       r"noise would vanish.*expression of the output"):
        fc(x)
    with sb.mode(fc, "mean"):
        assert type(fc(x)) is torch.Tensor  # no noise to lose
    late.remove()
    handle.remove()
    assert sb.get_variance(fc(x)) is not None
    other = sb.BayesLinear(4, 3)
    glob = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: o.as_subclass(torch.Tensor) if isinstance(m, sb.BayesLinear) else None)
    try:
        with pytest.raises(VarianceFlowError, match="forward hook of BayesLinear"):
            other(x)
    finally:
        glob.remove()
    assert sb.get_variance(other(x)) is not None
    net = nn.Sequential(nn.Linear(4, 5), snn.Leaky(beta=0.9, init_hidden=True),
                        nn.Linear(5, 2), snn.Leaky(beta=0.9, init_hidden=True, output=True))
    model = sbnn_snn.to_sbnn(net)
    model[2].register_forward_hook(lambda m, i, o: o.data)
    for _ in range(2):  # the check does not pile up guards
        with pytest.raises(VarianceFlowError, match=r"BayesLinear '2'.*check_variance_flow"):
            sb.check_variance_flow(model, x)
    assert len(model[2]._forward_hooks) == 3  # the flow's probe, the hook, the check


def test_pruned_noise_scale_raises():
    """A global pruning over every parameter (``prune.global_unstructured``) also prunes
    the noise scales ``rho``: a pruned ``rho = 0`` is a std of ``softplus(0) = 0.69``,
    more noise, silently. It raises, naming the parameter and the fix; pruning only the
    weights (noise scales left out by name) runs."""
    from torch.nn.utils import prune

    from sbnn_addons.optim import is_noise_parameter

    def net():
        torch.manual_seed(0)
        return nn.Sequential(sb.BayesLinear(4, 3, std_mode="weight", bias_std=0.1),
                             sb.LIF(spike_fn=sb.IWSTSpike(std=0.2, learn_std=True)))

    x = torch.rand(2, 4)
    for skip in ("std_rho", "bias_std_rho"):  # each noise scale raises on its own
        model = net()
        params = [(m, n) for m in model.modules() for n, _ in m.named_parameters(recurse=False)
                  if n == skip or not is_noise_parameter(n)]
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.3)
        with pytest.raises(ValueError, match=rf"\.{skip} is pruned.*softplus\(rho\).*"
                                             r"prune only the weights"):
            model(x)
    spike = sb.IWSTSpike(std=0.2, learn_std=True, std_shape=(3,))
    prune.l1_unstructured(spike, "std_rho", amount=1)
    with pytest.raises(ValueError, match=r"IWSTSpike\.std_rho is pruned"):
        spike(torch.rand(2, 3))
    model = net()
    params = [(m, n) for m in model.modules() for n, _ in m.named_parameters(recurse=False)
              if not is_noise_parameter(n)]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.3)
    model(x)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "pytorch-path"])
def test_snntorch_threshold_changed_after_the_conversion_reaches_the_aux_terms(kernel):
    """A converted snnTorch readout whose threshold is set to inf after the conversion
    (reset 'none': a membrane readout) collects no auxiliary term, as one built with it:
    its spike function had kept the threshold of the conversion (aux loss inf)."""
    from snntorch import utils

    def aux_after(built_inf: bool):
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Linear(8, 6), snn.Leaky(beta=0.9, init_hidden=True),
            nn.Linear(6, 3), snn.Leaky(beta=0.9, init_hidden=True, output=True,
                                       reset_mechanism="none",
                                       threshold=math.inf if built_inf else 1.0))
        model = sbnn_snn.to_sbnn(net, aux_loss=True)
        if not built_inf:
            model[3].threshold.fill_(math.inf)
        utils.reset(model)
        x = torch.rand(5, 4, 8) * 2
        mems = [model(x[t])[1] for t in range(5)]
        aux = sb.aux_loss(model)
        (torch.stack(mems).sum() + 0.1 * aux).backward()
        for name, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), name
        return aux.detach()

    with contextlib.nullcontext() if kernel else sb.kernels.use_kernels(False):
        built, changed = aux_after(True), aux_after(False)
    assert torch.isfinite(changed) and torch.equal(changed, built)


# ------------------------------------------- a wrong dtype / device, a number or a list
@pytest.mark.parametrize("make, shape", [
    (lambda: sb.BayesLinear(6, 3), (4, 6)),
    (lambda: sb.BayesConv1d(2, 3, 3), (4, 2, 8)),
    (lambda: sb.BayesConv2d(2, 3, 3), (4, 2, 6, 6)),
])
def test_core_layer_names_an_input_of_another_dtype_or_device(make, shape):
    """A float64 / float16 input of a float32 layer failed inside torch ("mat1 and mat2
    must have the same dtype", "Input type (double) and bias type (float)"), an input on
    another device with "Tensor on device cpu is not on the expected device meta!"."""
    torch.manual_seed(0)
    layer_, x = make(), torch.rand(shape)
    name = type(layer_).__name__
    for dtype in (torch.float64, torch.float16):
        with pytest.raises(TypeError, match=rf"{name} has torch.float32 weights but its "
                                            rf"input is {dtype}.*x.to\(torch.float32\)"):
            layer_(x.to(dtype))
    with pytest.raises(ValueError, match=rf"{name} has its weights on cpu but its input is "
                                         r"on meta.*model.to\(device\)"):
        layer_(x.to("meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts: no error
        assert layer_(x.bfloat16()).dtype == torch.bfloat16
    assert make().to(torch.float64)(x.double()).dtype == torch.float64


@pytest.mark.parametrize("make, match", [
    (lambda: sb.LIF(beta="0.9"), "beta must be a real number"),  # taken as 0.9
    (lambda: sb.LIF(beta=[0.9, 0.8]), "beta must be a real number"),  # float() error
    (lambda: sb.LIF(beta=torch.tensor([0.9, 0.8])), "beta must be a real number"),
    (lambda: sb.LIF(threshold="1"), "threshold must be a real number"),
    (lambda: sb.LIF(spike_fn="st"), "spike_fn must be an IWSTSpike"),  # AttributeError
    (lambda: sb.LIF(spike_fn=nn.ReLU()), "spike_fn must be an IWSTSpike"),  # at forward
    (lambda: sb.IWSTSpike(batch_dim="1"), "batch_dim must be an int"),  # at aux_loss
    (lambda: sb.IWSTSpike(batch_dim=1.0), "batch_dim must be an int"),
    (lambda: sb.IWSTSpike(batch_dim=True), "batch_dim must be an int"),
])
def test_neuron_and_spike_arguments_of_a_wrong_type_are_named(make, match):
    with pytest.raises(TypeError, match=match):
        make()


def test_neuron_and_spike_accept_scalar_tensors_and_numpy_numbers():
    import numpy as np

    from sbnn_addons.models import SurrogateSpike

    lif = sb.LIF(beta=torch.tensor(0.5), threshold=np.float32(2.0), spike_fn=SurrogateSpike())
    assert (lif.beta, lif.threshold) == (0.5, 2.0)
    assert sb.IWSTSpike(batch_dim=np.int64(1)).batch_dim == 1


def test_paper_recipe_rates_and_cosine_are_checked():
    """paper_recipe(lr=-1e-3) trained by gradient ascent (Adam checks only its default
    rate, not a group's), noise_lr=nan made every noise scale NaN; paper_lr_factor with
    floor 2 raised the rate, with epochs=0 divided by zero."""
    from sbnn_addons.models import paper_lr_factor, paper_recipe, shd_recurrent

    net = shd_recurrent(in_features=8, hidden=(4,), num_classes=3, num_steps=5)
    for kw, name in [({"lr": -1e-3}, "lr"), ({"lr": 0}, "lr"), ({"noise_lr": math.nan},
                     "noise_lr"), ({"noise_lr": "5e-2"}, "noise_lr")]:
        with pytest.raises(ValueError, match=f"^{name} must be a finite number > 0"):
            paper_recipe(net, "shd", 5, **kw)
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        paper_lr_factor(0, 0, 0.1)
    for floor in (-0.1, 2.0, "0.1"):
        with pytest.raises(ValueError, match=r"floor must be a number in \[0, 1\]"):
            paper_lr_factor(1, 10, floor)
    assert paper_lr_factor(10, 10, 0.1) == pytest.approx(0.1)
    opt, _ = paper_recipe(net, "shd", 5, lr=1e-3, noise_lr=1e-2)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-2]


@pytest.mark.parametrize("kw, match", [
    ({"num_steps": 0}, "num_steps must be a positive int"),  # ZeroDivisionError at forward
    ({"num_steps": 2.0}, "num_steps must be a positive int"),
    ({"dims": 3}, "dims must be 1"),  # built BatchNorm1d silently
])
def test_step_batch_norm_arguments_are_checked(kw, match):
    from sbnn_addons.models import StepBatchNorm

    with pytest.raises(ValueError, match=match):
        StepBatchNorm(3, **{"num_steps": 2, **kw})


def test_a_single_number_where_a_collection_belongs_is_named():
    """ks=4 / classes=3 failed with "'int' object is not iterable"."""
    from sbnn_addons.data import load_dvs_gesture_32

    probs = torch.full((4, 2, 2), 0.5)
    with pytest.raises(TypeError, match=r"ks must be a sequence.*for one count pass \[4\]"):
        sb.uncertainty.metrics_vs_samples(probs, torch.tensor([0, 1]), ks=4)
    assert sb.uncertainty.metrics_vs_samples(probs, torch.tensor([0, 1]), ks=[4])["k"] == [4]
    with pytest.raises(TypeError, match=r"classes must be a collection.*pass \(3,\)"):
        load_dvs_gesture_32("/nonexistent", classes=3)


@pytest.mark.parametrize("call", [
    lambda seed: sb.IWSTSpike(std=0.5).manual_seed(seed),
    lambda seed: sb.seed_spikes(nn.Sequential(sb.IWSTSpike(std=0.5)), seed),
    lambda seed: sb.mc_predict(nn.Sequential(sb.BayesLinear(4, 3)), torch.rand(2, 4), 2,
                               seed=seed),
])
@pytest.mark.parametrize("seed", [2**64, -2**63 - 1, 2**70])
def test_a_seed_out_of_the_generator_range_is_named(call, seed):
    """A seed a torch.Generator cannot take failed at the first draw ("Overflow when
    unpacking long long") or in mc_predict's torch.manual_seed."""
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*32\)"):
        call(seed)


def test_seeds_at_the_ends_of_the_generator_range_draw():
    spike = sb.IWSTSpike(std=0.5)
    for seed in (2**32 - 1, 0):
        spike.manual_seed(seed)
        assert spike(torch.zeros(8)).shape == (8,)


@pytest.mark.parametrize("kw, match", [
    ({"duration_s": math.nan}, "duration_s must be a finite number > 0"),  # numpy Overflow
    ({"duration_s": 0}, "duration_s must be a finite number > 0"),  # every event at t = 0
    ({"events_per_sample": 0}, "events_per_sample must be an integer >= 1"),
])
def test_synthetic_shd_arguments_are_checked(tmp_path, kw, match):
    from sbnn_addons.data import make_synthetic_shd

    with pytest.raises(ValueError, match=match):
        make_synthetic_shd(tmp_path, num_train=2, num_test=2, **kw)


def test_metric_tolerance_and_sweep_plot_arguments_are_checked(tmp_path):
    """check_probabilities(atol=nan) failed in torch.allclose, atol="1e-4" with "'>' not
    supported"; plot_metrics_vs_samples({}) with a KeyError 'k'."""
    from sbnn_addons.metrics import check_probabilities
    from sbnn_addons.uncertainty import plot_metrics_vs_samples

    probs, y = torch.tensor([[0.7, 0.3], [0.2, 0.8]]), torch.tensor([0, 1])
    for atol in (math.nan, math.inf, -1.0, "1e-4"):
        with pytest.raises(ValueError, match="atol must be a finite number >= 0"):
            check_probabilities(probs, y, atol=atol)
    check_probabilities(probs, y, atol=0)
    for sweep in ({}, {"k": [1, 2], "accuracy": [0.5], "ece": [0.1, 0.1]}, [1, 2]):
        with pytest.raises(TypeError, match="sweep must be the dict metrics_vs_samples"):
            plot_metrics_vs_samples(sweep, tmp_path / "sweep.png")


def test_empty_input_is_an_exact_no_op_for_the_core_parts():
    """The documented behaviour (Training page, "Catching problems early"): empty outputs
    of the right shape and no auxiliary term; the reference models give empty logits for
    a batch of 0."""
    from sbnn_addons.models import shd_recurrent

    torch.manual_seed(0)
    net = nn.Sequential(sb.BayesConv2d(2, 3, 3), sb.ChannelAffine(3), sb.IWSTSpike(std=0.3))
    sb.enable_aux_loss(sb.track_variance(net))
    assert net(torch.rand(0, 2, 6, 6)).shape == (0, 3, 4, 4)
    assert float(sb.aux_loss(net)) == 0.0
    spikes, state = sb.LIF()(torch.rand(0, 5))
    assert spikes.shape == state.membrane.shape == (0, 5)
    model = shd_recurrent(in_features=8, hidden=(4,), num_classes=3, num_steps=5)
    assert model(torch.rand(5, 0, 8)).shape == (0, 3)
    with pytest.raises(ValueError, match="T = 0"):
        model(torch.rand(0, 2, 8))


@pytest.mark.parametrize("convert, make", [
    (sbnn_snn.to_sbnn, _snn_seq),
    (sbnn_sj.to_sbnn, lambda: _sj_net("s")),
])
def test_include_and_exclude_that_cancel_are_named(convert, make):
    """include="0", exclude="0": no layer became Bayesian (the neurons alone were
    converted), silently, as an empty include does."""
    with pytest.raises(ValueError, match=r"include pattern '0' selects only layers that "
                                         r"exclude also names \(\['0'\]\)"):
        convert(make(), include="0", exclude="0")
    with pytest.raises(ValueError, match="include pattern '\\*' selects only"):
        convert(make(), include="*", exclude=["0", "2"])
    model = convert(make(), include="*", exclude="0")  # a partial overlap: layer 2 converts
    assert sb.is_bayesian(model[2]) and not sb.is_bayesian(model[0])


def test_snntorch_exclude_of_everything_is_named():
    """Every neuron and layer excluded: the copy came back unconverted, silently (the
    SpikingJelly converter raised "nothing to convert")."""
    with pytest.raises(ValueError, match="nothing to convert: exclude names every neuron"):
        sbnn_snn.to_sbnn(_snn_seq(), exclude=["0", "1", "2", "3"])
    with pytest.raises(ValueError, match="nothing to convert"):
        sbnn_sj.to_sbnn(_sj_net("s"), exclude=["0", "1", "2", "3"])
    model = sbnn_snn.to_sbnn(_snn_seq(), exclude=["0", "2"])  # neurons only: converted
    assert isinstance(model[1].spike_grad, sb.IWSTSpike)


@pytest.mark.parametrize("kw", [
    {"widths": 4},  # "'int' object is not iterable"
    {"blocks": "3"},  # "'<' not supported between instances of 'str' and 'int'"
    {"width_mult": math.nan},  # "cannot convert float NaN to integer"
    {"width_mult": "2"},
])
def test_resnet_stage_arguments_are_named(kw):
    from sbnn_addons.models import SpikingResNet

    name = next(iter(kw))
    with pytest.raises(ValueError, match=f"{name} must be"):
        SpikingResNet(2, 3, **{"widths": (4,), **kw})


def test_get_variance_names_a_value_that_is_not_a_tensor():
    """get_variance of an snnTorch neuron's (spk, mem) tuple returned None, read as "no
    variance flows"."""
    model = sbnn_snn.to_sbnn(_snn_seq())
    out = model(torch.rand(3, 16))
    assert isinstance(out, tuple)
    with pytest.raises(TypeError, match="get_variance reads one tensor, got tuple"):
        sb.get_variance(out)
    assert sb.get_variance(torch.ones(2)) is None  # a plain tensor: no variance


@pytest.mark.parametrize("convert, make, attr", [
    (sbnn_snn.to_sbnn, lambda: snn.Leaky(beta=math.nan, init_hidden=True), "beta"),
    (sbnn_snn.to_sbnn, lambda: snn.Leaky(beta=torch.tensor([0.9, math.nan, 0.9]),
                                         init_hidden=True), "beta"),
    (sbnn_snn.to_sbnn, lambda: snn.Leaky(beta=0.9, threshold=math.nan, init_hidden=True),
     "threshold"),
    (sbnn_sj.to_sbnn, lambda: neuron.IFNode(v_threshold=math.nan), "v_threshold"),
    (sbnn_sj.to_sbnn, lambda: neuron.LIFNode(v_reset=math.nan), "v_reset"),
])
def test_a_neuron_with_a_nan_constant_is_named_at_conversion(convert, make, attr):
    """snn.Leaky(beta=nan) converted ran with a NaN membrane and no spikes, IFNode with a
    NaN threshold never fired: the input check passes, nothing named it."""
    linear = nn.Linear if convert is sbnn_snn.to_sbnn else layer.Linear
    with pytest.raises(ValueError, match=rf"module '1' .* has {attr} = NaN"):
        convert(nn.Sequential(linear(4, 3), make()))


def _rleaky_with_spike_factor(value: float) -> nn.Module:
    lif = snn.RLeaky(beta=0.9, linear_features=3, init_hidden=True, output=True)
    lif.graded_spikes_factor.fill_(value)  # RLeaky takes no argument for it
    return lif


@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize("make", [
    lambda v: snn.Leaky(beta=0.9, graded_spikes_factor=v, init_hidden=True, output=True),
    lambda v: snn.Leaky(beta=0.9, graded_spikes_factor=torch.tensor([1.0, v, 1.0]),
                        learn_graded_spikes_factor=True, init_hidden=True, output=True),
    _rleaky_with_spike_factor,
])
def test_a_snntorch_neuron_with_a_nonfinite_spike_factor_is_named_at_conversion(make, value):
    """snn.Leaky(graded_spikes_factor=nan or inf) converted emitted NaN spikes (an
    infinite factor times the 0 of a neuron that did not fire is NaN), silently where the
    neuron is the model's output; before the next Bayesian layer the error named the
    data ("clean or normalise the data"), not the neuron."""
    net = nn.Sequential(nn.Linear(4, 3), make(value))
    with pytest.raises(ValueError, match=r"module '1' \((Leaky|RLeaky)\) has "
                                         r"graded_spikes_factor = (nan|inf|-inf): its "
                                         r"spikes would be NaN"):
        sbnn_snn.to_sbnn(net)


@pytest.mark.parametrize("call, who", [
    (lambda: sb.IWSTSpike(std=0.3, learn_std=True)(torch.rand(2, 3, device="meta")),
     "IWSTSpike has its noise std on cpu"),
    (lambda: sb.ChannelAffine(3)(torch.rand(2, 3, device="meta")),
     "ChannelAffine has its parameters on cpu"),
    (lambda: sb.LIF()(torch.rand(2, 3), sb.LIFState(torch.zeros(2, 3, device="meta"),
                                                    torch.zeros(1, device="meta"))),
     r"LIF has its state \(the membrane passed in\) on meta"),
])
def test_an_input_on_another_device_is_named(call, who):
    """torch's "Tensor on device cpu is not on the expected device meta!" named neither
    the module nor the fix."""
    with pytest.raises(ValueError, match=rf"{who} but its input is on .*model.to\(device\)"):
        call()


def test_sample_spikes_and_estimator_arguments_are_named():
    """sample_spikes(deterministic="no") drew no noise (a truthy string), generator=0
    failed inside torch.randn; Estimator(p=True) was taken as p = 1, max_weight="1e4"
    failed in a comparison."""
    u, sigma = torch.zeros(4), torch.ones(4)
    for flag in ("deterministic", "at_zero"):
        with pytest.raises(TypeError, match=f"{flag} must be True or False"):
            sb.sample_spikes(u, sigma, **{flag: "no"})
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        sb.sample_spikes(u, sigma, generator=0)
    with pytest.raises(ValueError, match=r"p must be a number in \[0, 1\], got True"):
        sb.Estimator("iwst", p=True)
    with pytest.raises(ValueError, match="max_weight must be a finite number >= 1"):
        sb.Estimator("iwst", p=0.5, max_weight="1e4")
    import numpy as np

    assert sb.Estimator("iwst", p=np.float32(0.5)).spec == sb.IWST(0.5).spec


class _StateNet(nn.Module):
    """A truncated-BPTT style snnTorch loop: the membranes come in with the input."""

    def __init__(self):
        super().__init__()
        self.fc1, self.lif1 = nn.Linear(12, 16), snn.Leaky(beta=0.9)
        self.fc2, self.lif2 = nn.Linear(16, 4), snn.Leaky(beta=0.9)

    def forward(self, x, mem1, mem2):
        out = []
        for x_t in x:
            spk1, mem1 = self.lif1(self.fc1(x_t), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            out.append(spk2)
        return torch.stack(out), mem1, mem2


def test_a_nan_membrane_passed_to_a_converted_model_is_named():
    """``net(x, mem1, mem2)`` with a NaN membrane (e.g. carried over from a chunk that
    diverged): the model's entry checked its first argument only, and the spike
    functions inside it skip their own check, so it ran on silently with no spikes and
    NaN membranes (a compiled ``net.chunk`` and the spike function alone raise)."""
    torch.manual_seed(0)
    net = sbnn_snn.to_sbnn(_StateNet())
    x = torch.rand(3, 4, 12)
    nan = torch.full((4, 16), math.nan)
    with pytest.raises(ValueError, match=r"converted model \(_StateNet\).*argument 1.*NaN"):
        net(x, nan, net.lif2.init_leaky())
    spk, mem1, mem2 = net(x, net.lif1.init_leaky(), net.lif2.init_leaky())
    assert torch.isfinite(mem1).all()
    with check_finite(False):
        net(x, nan, mem2)  # the documented switch: no check


# ------------------------------------------------------------------ calibrate_spike_std
def _calibration_model(**kw):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8), snn.Leaky(beta=0.9, init_hidden=True),
                        nn.Linear(8, 4), snn.Leaky(beta=0.9, init_hidden=True, output=True))
    return sbnn_snn.to_sbnn(net, **kw)


def _steps(m, x):
    return [m(x_t) for x_t in x]


@pytest.mark.parametrize("kw, error, match", [
    ({"seed": 1.5}, TypeError,
     r"calibrate_spike_std: seed must be an integer, got 1\.5 \(float\); pass an int such "
     r"as seed=0"),  # (None is refused: not "an integer or None")
    ({"seed": "0"}, TypeError, "calibrate_spike_std: seed must be an integer"),
    ({"seed": True}, TypeError, "calibrate_spike_std: seed must be an integer"),
    ({"seed": None}, TypeError, r"seed must be an integer.*same draws at every factor"),
    ({"seed": -1}, ValueError, r"calibrate_spike_std: seed must be in \[0, 2\*\*32\)"),
    ({"max_rate_increase": True}, ValueError, "max_rate_increase must be a finite number"),
    ({"min_factor": True}, ValueError, r"min_factor must be in \(0, 1\]"),
])
def test_calibration_arguments_of_a_wrong_type_are_named(kw, error, match):
    """A float / str / bool seed failed after the mean-mode passes with PyTorch's
    "manual_seed expected a long"; seed=None drew other noise at every factor; a bool
    max_rate_increase / min_factor was taken as 1."""
    with pytest.raises(error, match=match):
        sb.calibrate_spike_std(_calibration_model(), torch.rand(3, 2, 16), forward=_steps, **kw)


@pytest.mark.parametrize("forward, match", [
    (lambda m, x: None, r"never reached the spike functions \['1.spike_grad', "
                        r"'3.spike_grad'\].*whole model"),
    (lambda m, x: [m[1](m[0](x_t)) for x_t in x], r"never reached the spike functions "
                                                  r"\['3.spike_grad'\] \(of 2\)"),
])
def test_calibration_names_spike_functions_its_forward_never_reaches(forward, match):
    """A forward that does not run the model (or only part of it) measured a rate of 0 for
    the spike functions it never reached and kept (or scaled) their noise, silently."""
    with pytest.raises(ValueError, match=match):
        sb.calibrate_spike_std(_calibration_model(), torch.rand(3, 2, 16), forward=forward)


@pytest.mark.parametrize("value", NONFINITE)
def test_calibration_names_a_nonfinite_spike_std(value):
    """A NaN / inf own std was scaled by the factors (staying NaN / inf) and reported as
    calibrated, with a warning blaming the weight noise."""
    model = _calibration_model(learn_std=False)
    spike = model[3].spike_grad
    spike.fixed_std.fill_(value)
    before = spike.fixed_std.clone()
    with pytest.raises(ValueError, match=r"'3.spike_grad' has a non-finite noise std"):
        sb.calibrate_spike_std(model, torch.rand(3, 2, 16), forward=_steps)
    assert torch.equal(spike.fixed_std.isnan(), before.isnan())


def test_calibration_names_a_model_on_the_meta_device():
    model = _calibration_model().to("meta")
    with pytest.raises(ValueError, match=r"meta device.*no values.*to_empty"):
        sb.calibrate_spike_std(model, torch.rand(3, 2, 16, device="meta"), forward=_steps)


def test_lif_reset_assigned_after_construction_is_checked():
    """lif.reset = "subtact" (a typo) was taken as it was, and so was reset="subtract"
    assigned to a readout with an infinite threshold (NaN membranes, no spikes)."""
    lif = sb.LIF()
    with pytest.raises(ValueError, match=r"reset must be one of \('subtract', 'zero', "
                                         r"'none'\), got 'subtact'"):
        lif.reset = "subtact"
    assert lif.reset == "subtract"
    readout = sb.LIF(threshold=math.inf, reset="none")
    with pytest.raises(ValueError, match=r"threshold=inf with reset='subtract'"):
        readout.reset = "subtract"
    readout.reset = "zero"
    assert readout.run(torch.rand(3, 2, 4)).sum() == 0


@pytest.mark.parametrize("host, name", [
    ("snntorch", "0.weight"), ("snntorch", "2.std_rho"), ("snntorch", "1.spike_grad.std_rho"),
    ("spikingjelly", "0.weight"), ("spikingjelly", "0.std_rho"),
    ("spikingjelly", "3.surrogate_function.std_rho"),
])
def test_a_converted_model_names_a_nan_parameter(host, name):
    """A NaN weight or noise scale (a NaN gradient stepped in, a corrupt checkpoint) made
    its neurons fall silent and trained on, silently, since the input of the converted
    model was finite. It is named at the next call, after an optimiser step too."""
    model = _calibration_model() if host == "snntorch" else sbnn_sj.to_sbnn(_sj_net("m"))
    x = torch.rand(4, 3, 16) if host == "snntorch" else torch.rand(4, 3, 10)
    call = (lambda: [model(x_t) for x_t in x]) if host == "snntorch" else (lambda: model(x))
    reset = sbnn_snn.reset if host == "snntorch" else sbnn_sj.reset
    call()
    reset(model)
    param = dict(model.named_parameters())[name]
    grad = torch.zeros_like(param)
    grad.view(-1)[0] = math.nan
    param.grad = grad
    torch.optim.SGD([param], lr=0.1).step()
    with pytest.raises(ValueError, match=rf"parameter {name!r} of the converted model .*"
                                         r"1 NaN.*check_finite\(False\)"):
        call()
    reset(model)
    with check_finite(False):
        call()  # the documented switch


@pytest.mark.parametrize("name", ["0.weight", "2.std_rho"])
def test_a_converted_models_parameter_replaced_through_data_is_named(name):
    """``param.data = tensor`` (as ``model.to(...)`` does) moves no version counter: a NaN
    tensor put there was never checked and silenced the neurons. The storage is part of
    what the check remembers."""
    model, x = _calibration_model(), torch.rand(4, 3, 16)
    _steps(model, x)
    sbnn_snn.reset(model)
    param = dict(model.named_parameters())[name]
    param.data = torch.full_like(param, math.nan)
    with pytest.raises(ValueError, match=rf"parameter {name!r} of the converted model"):
        _steps(model, x)


@pytest.mark.parametrize("how", ["load_state_dict(assign=True)", "a new nn.Parameter"])
def test_a_converted_models_parameter_replaced_by_another_is_named(how):
    """A parameter object replaced (``load_state_dict(..., assign=True)``, a new
    ``nn.Parameter`` assigned) left the converted model checking the old one, listed at
    the first call: a NaN in the new weight silenced its neurons, silently."""
    model, x = _calibration_model(), torch.rand(4, 3, 16)
    _steps(model, x)
    sbnn_snn.reset(model)
    if how == "a new nn.Parameter":
        model[0].weight = nn.Parameter(torch.full_like(model[0].weight, math.nan))
    else:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["0.weight"][0, 0] = math.nan
        model.load_state_dict(state, assign=True)
    with pytest.raises(ValueError, match=r"parameter '0.weight' of the converted model"):
        _steps(model, x)


def test_a_model_called_on_meta_then_loaded_with_assign_is_checked():
    """A converted model run once on the ``meta`` device (shape inference) and then given
    its weights with ``load_state_dict(..., assign=True)``, the usual way to build a
    large model: its tensors, listed on ``meta`` (which holds no values), were never
    listed again, and a NaN weight loaded this way went unseen."""
    state = sbnn_sj.to_sbnn(_sj_net("s")).state_dict()
    state["0.weight"][0, 0] = math.nan
    model = sbnn_sj.to_sbnn(_sj_net("s")).to("meta")
    model(torch.rand(3, 10, device="meta"))
    model.load_state_dict(state, assign=True)
    sbnn_sj.reset(model)
    with pytest.raises(ValueError, match=r"parameter '0.weight' of the converted model"):
        model(torch.rand(3, 10))


def test_spike_monitor_read_before_it_ran_is_named():
    """A monitor read without a `with` block around the forward reported a rate of 0 for
    every layer (and 0 spikes, 0 SynOps), silently."""
    from sbnn_addons.metrics import SpikeMonitor

    model = sbnn_snn.to_sbnn(_snn_seq())
    mon = SpikeMonitor(model)
    model(torch.rand(3, 16))
    for read in (mon.spike_rates, mon.total_spikes, mon.total_synops, lambda: mon.units):
        with pytest.raises(RuntimeError, match=r"never entered.*with SpikeMonitor\(model\) "
                                               r"as mon:"):
            read()
    with mon:
        model(torch.rand(3, 16))
    assert set(mon.spike_rates()) == {"1.spike_grad", "3.spike_grad"}


@pytest.mark.parametrize("num_data", [0, -5, 10.5, "100", True])
def test_sbnn_objective_names_a_bad_num_data_without_kl(num_data):
    """num_data=0 (or a float, a string) passed with the default kl_weight=0 was ignored
    without a word; it is checked whenever it is given."""
    with pytest.raises(ValueError, match=r"num_data \(the training-set size N\) must be an "
                                         r"integer >= 1"):
        sb.sbnn_objective(torch.tensor(1.0), sb.BayesLinear(4, 3), num_data)


@pytest.mark.parametrize("call, error, match", [
    (lambda: setattr(sb.IWSTSpike(), "threshold", "abc"), TypeError,
     "threshold must be a number"),  # "could not convert string to float"
    (lambda: sb.LIF().run(torch.tensor(1.0)), ValueError,
     r"LIF.run: currents must be a sequence \[T, \.\.\.\]"),  # an IndexError
    (lambda: sb.sbnn_objective(torch.tensor(1), sb.BayesLinear(4, 3)), TypeError,
     "nll must be a floating-point scalar"),  # an integer loss, no gradient
])
def test_small_core_misuses_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("reset, make, other", [
    (sbnn_snn.reset, lambda: sbnn_sj.to_sbnn(_sj_net("m")), "spikingjelly.reset"),
    (sbnn_snn.reset, lambda: _sj_net("m"), "spikingjelly.reset"),
    (sbnn_sj.reset, lambda: sbnn_snn.to_sbnn(_snn_seq()), "snntorch.reset"),
    (sbnn_sj.reset, _snn_seq, "snntorch.reset"),
])
def test_the_other_hosts_reset_is_named(reset, make, other):
    """snntorch.reset on a SpikingJelly model (or the reverse) reset nothing: the neuron
    states carried over to the next sequence, silently."""
    with pytest.raises(TypeError, match=rf"neuron, which this reset leaves as it is.*"
                                        rf"sbnn_addons\.{other}"):
        reset(make())


def test_each_hosts_reset_runs_on_a_model_without_neurons():
    for reset in (sbnn_snn.reset, sbnn_sj.reset):
        reset(nn.Linear(3, 2))  # nothing to reset: an exact no-op


def test_mc_predict_spike_counts_on_meta_are_named():
    """mc_predict on the meta device with the default count_spikes=True failed with
    "Tensor.item() cannot be called on meta tensors"; the fix is named."""
    model = sbnn_snn.to_sbnn(_snn_seq()).to("meta")
    x = torch.rand(5, 3, 16, device="meta")

    def forward(m, v):
        return torch.stack([m(v_t)[1] for v_t in v]).mean(0)

    with pytest.raises(ValueError, match=r"meta device.*count_spikes=False"):
        sb.mc_predict(model, x, 2, forward=forward)
    assert sb.mc_predict(model, x, 2, forward=forward, count_spikes=False).probs.is_meta


@pytest.mark.parametrize("sm, shape", [("s", (3, 10)), ("m", (4, 3, 10))])
@pytest.mark.parametrize("attr", ["tau", "v_reset"])
def test_a_nan_spikingjelly_constant_set_after_the_conversion_is_named(sm, shape, attr):
    """A converted LIFNode whose tau or v_reset is set to NaN after the conversion (as the
    conversion names one before) gave NaN membranes and no spikes, silently."""
    model = sbnn_sj.to_sbnn(_sj_net(sm))
    setattr(model[1], attr, math.nan)
    with pytest.raises(ValueError, match=rf"LIFNode has '{attr}' = NaN.*give {attr} a number"):
        model(torch.rand(shape))


def test_sample_spikes_names_a_nan_drive():
    """sample_spikes(u=NaN) drew no spike, silently (its sigma was checked, not u); an
    infinite drive (a readout that never fires) stays allowed, and check_finite(False)
    skips the check."""
    with pytest.raises(ValueError, match=r"sample_spikes.*NaN.*check_finite\(False\)"):
        sb.sample_spikes(torch.tensor([0.5, math.nan]), torch.ones(2))
    assert sb.sample_spikes(torch.tensor([-math.inf]), torch.ones(1)).sum() == 0
    with check_finite(False):
        sb.sample_spikes(torch.tensor([math.nan]), torch.ones(1))


def _poisoned_noise(module, name, value):
    with torch.no_grad():
        getattr(module, name).view(-1)[0] = value
    return module


@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize("make, name, call", [
    (lambda: sb.BayesLinear(4, 3), "std_rho", lambda m: m(torch.rand(2, 4))),
    (lambda: sb.BayesLinear(4, 3, std_mode="weight", bias_std=0.1), "bias_std_rho",
     lambda m: m(torch.rand(2, 4))),
    (lambda: sb.BayesLinear(4, 3, learn_std=False, std=0.1), "fixed_std",
     lambda m: m(torch.rand(2, 4))),
    (lambda: sb.BayesConv2d(2, 3, 3, std_mode="channel"), "std_rho",
     lambda m: m(torch.rand(1, 2, 5, 5))),
    (lambda: sb.IWSTSpike(std=0.3, learn_std=True), "std_rho",
     lambda m: m(torch.rand(2, 4) - 0.5)),
    (lambda: sb.IWSTSpike(std=0.3), "fixed_std", lambda m: m(torch.rand(2, 4) - 0.5)),
    (lambda: sb.LIF(spike_fn=sb.IWSTSpike(std=0.3, learn_std=True)), "spike_fn.std_rho",
     lambda m: m.run(torch.rand(3, 2, 4))),
    (lambda: sb.LIF(spike_fn=sb.IWSTSpike(std=0.3)), "spike_fn.fixed_std",
     lambda m: m(torch.rand(2, 4))),
])
def test_a_core_part_names_a_nonfinite_noise_scale(make, name, call, value):
    """A NaN / inf noise scale of a core layer or spike function (stepped in by an
    optimiser, or loaded) gave NaN variances: spikes drawn at random or never, silently."""
    module = make()
    call(module)
    owner, attr = (module.spike_fn, name.split(".")[1]) if "." in name else (module, name)
    _poisoned_noise(owner, attr, value)
    with pytest.raises(ValueError, match=rf"{type(owner).__name__}\.{attr} .*NaN / inf.*"
                                         r"check_finite\(False\)"):
        call(module)
    with check_finite(False):
        call(module)
