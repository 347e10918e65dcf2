"""``SpikeMonitor`` counts every spike, also on the paths the fused kernels serve
(``LIF.run`` sequences, one ``LIF`` step, SpikingJelly multi-step nodes)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sbnn_addons as sb
from sbnn_addons.metrics import SpikeMonitor


def test_counts_lif_sequence_and_step():
    torch.manual_seed(0)
    lif, fc = sb.LIF(), sb.BayesLinear(6, 40)
    model = nn.ModuleList([lif, fc])
    x = torch.rand(8, 4, 6) * 6
    with SpikeMonitor(model) as mon:
        seq = lif.run(fc(x.flatten(0, 1)).reshape(8, 4, 40))
        step, _ = lif(fc(x[0]))
    total = float(seq.sum() + step.sum())
    assert total > 0 and float(mon.counts["0.spike_fn"]) == total
    assert mon.units["0.spike_fn"] == seq.numel() + step.numel()
    assert "fire" not in lif.spike_fn.__dict__  # restored on exit


@pytest.mark.parametrize("step_mode", ["m", "s"])
def test_counts_spikingjelly_nodes(step_mode):
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import functional, layer, neuron

    from sbnn_addons.spikingjelly import to_sbnn

    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(6, 40), neuron.LIFNode())
    functional.set_step_mode(net, step_mode)
    model = to_sbnn(net)
    functional.reset_net(model)
    x = torch.rand(8, 4, 6) * 3
    with SpikeMonitor(model) as mon, torch.no_grad():
        out = model(x) if step_mode == "m" else torch.stack([model(x[t]) for t in range(8)])
    assert float(out.sum()) > 0
    assert float(mon.counts["1.surrogate_function"]) == float(out.sum())


@pytest.mark.parametrize("padding_mode", ["zeros", "circular", "reflect", "replicate"])
def test_layer_synops_counts_the_inputs_a_padding_copies(padding_mode):
    """SynOps by brute force: each non-zero input times the output positions that read it
    (a circular / reflect / replicate padding reads border inputs more than once)."""
    from sbnn_addons.metrics import layer_synops

    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode=padding_mode)
    x = (torch.rand(2, 2, 5, 6) < 0.4).float()
    # brute force: the padded input's non-zeros seen by every 3x3 window
    mode = "constant" if padding_mode == "zeros" else padding_mode
    padded = nn.functional.pad(x, (1, 1, 1, 1), mode=mode)
    windows = padded.unfold(2, 3, 1).unfold(3, 3, 1)  # [N, C, H, W, 3, 3]
    expected = float(windows.sum()) * conv.out_channels
    assert float(layer_synops(conv, x)) == expected


def test_monitors_nest_and_one_monitor_is_not_entered_twice():
    """An outer monitor keeps counting after an inner one (mc_predict runs its own) exits;
    it lost its wrapper, and counted nothing more, silently. Entering one monitor twice
    would count each spike twice: it raises."""
    torch.manual_seed(0)
    model = sb.track_variance(nn.Sequential(sb.BayesLinear(6, 30, std=0.4),
                                            sb.IWSTSpike("st", std=0.2), nn.Linear(30, 4)))
    x = torch.rand(5, 6) * 3
    with torch.no_grad(), SpikeMonitor(model) as outer:
        model(x)
        first = outer.total_spikes()
        with SpikeMonitor(model) as inner:
            model(x)
        assert inner.total_spikes() > 0
        sb.mc_predict(model, x, 2)  # its own monitor inside
        before = outer.total_spikes()
        model(x)
        assert outer.total_spikes() > before  # still counting
        assert outer.units["1"] == 5 * 30 * 5  # 1 + 1 + 2 + 1 forwards of 5 x 30 units
    assert first > 0 and "fire" not in model[1].__dict__
    mon = SpikeMonitor(model)
    with mon, pytest.raises(RuntimeError, match="already active"):
        with mon:
            pass
    assert "fire" not in model[1].__dict__
    with mon:  # usable again after the error
        model(x)
    assert mon.units["1"] == 150


def test_layer_synops_refuses_an_input_of_another_layer():
    """An input with the wrong number of features / channels was counted silently."""
    from sbnn_addons.metrics import layer_synops

    with pytest.raises(ValueError, match="in_features=3"):
        layer_synops(nn.Linear(3, 2), torch.ones(4, 5))
    with pytest.raises(ValueError, match=r"in_channels=3: expected \[\*, 3, H, W\]"):
        layer_synops(nn.Conv2d(3, 2, 3), torch.ones(1, 4, 5, 5))
    with pytest.raises(ValueError, match=r"in_channels=2: expected \[\*, 2, L\]"):
        layer_synops(nn.Conv1d(2, 2, 3), torch.ones(7))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer_synops(nn.Linear(3, 2), [1.0, 0.0, 1.0])
    assert float(layer_synops(nn.Conv1d(2, 4, 3), torch.ones(2, 6))) == 2 * 3 * 4 * 4
    assert float(layer_synops(nn.Linear(3, 2), torch.tensor([[1.0, 0.0, 1.0]]))) == 4


@pytest.mark.parametrize("kind", ["converted", "drop-in"])
def test_counts_the_spikes_an_inhibition_neuron_emits(kind):
    """A snnTorch neuron with ``inhibition=True`` keeps only its largest membrane's spike
    after the spike function fired; the monitor counted every unit above threshold (the
    suppressed spikes too), silently. Nested monitors count the same."""
    import warnings

    import snntorch as snn

    from sbnn_addons.snntorch import spike_grad, to_sbnn

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # snnTorch: inhibition is an unstable feature
        if kind == "converted":
            net = to_sbnn(nn.Sequential(
                nn.Linear(8, 6), snn.Leaky(beta=0.9, init_hidden=True, inhibition=True)))
        else:
            net = nn.Sequential(nn.Linear(8, 6), snn.Leaky(
                beta=0.9, init_hidden=True, inhibition=True, spike_grad=spike_grad()))
    with torch.no_grad():
        net[0].bias.fill_(5.0)  # every unit above threshold: the inhibition keeps one per row
    x = torch.ones(4, 8) * 3
    emitted = 0.0
    with torch.no_grad(), SpikeMonitor(net) as outer:
        with SpikeMonitor(net) as inner:
            for _ in range(3):
                emitted += float(net(x).sum())
    assert emitted == 4 * 3  # one spike per example and step
    for mon in (outer, inner):
        assert float(mon.counts["1.spike_grad"]) == emitted
        assert mon.units["1.spike_grad"] == 4 * 6 * 3
    assert "fire_inhibition" not in net[1].__dict__ and "fire" not in net[1].spike_grad.__dict__


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_spikes_are_counted_exactly(dtype):
    """A bfloat16 / float16 model's spikes are counted exactly: the sum of ~9400 spikes was
    formed in the spikes' dtype (bfloat16 integers are exact up to 256 only: 9408 for
    9387), and so mc_predict's spike counts."""
    torch.manual_seed(0)
    model = nn.Sequential(sb.BayesLinear(20, 300), sb.IWSTSpike(std=0.5)).to(dtype)
    x = torch.rand(64, 20, dtype=dtype)
    with torch.no_grad(), SpikeMonitor(model) as mon:
        out = model(x)
    assert float(mon.counts["1"]) == float(out.double().sum()) > 1000
    pred = sb.mc_predict(nn.Sequential(model, sb.BayesLinear(300, 3).to(dtype)), x, 2, seed=0)
    with torch.no_grad(), sb.mode(model, "mc"):
        sb.seed_spikes(model, 0)
        want = float(model(x).double().sum())
    assert float(pred.layer_spike_counts["0.1"][0]) == want


@pytest.mark.parametrize("spiking_inputs_only", [True, False])
def test_the_monitor_waits_for_no_device(spiking_inputs_only):
    """On an accelerator the counters stay on the device: no host sync per spike call or
    per weight-layer call (each was one on a GPU, in every mc_predict pass). The meta
    device, which has no values, stands in for the GPU: any host read of a count raises
    there. On the CPU the counts are the exact ones."""
    torch.manual_seed(0)
    net = nn.Sequential(sb.BayesLinear(6, 5), sb.IWSTSpike("st"), sb.BayesLinear(5, 4),
                        sb.IWSTSpike("st"))
    x = (torch.rand(3, 6) > 0.5).float()
    hidden = []
    net[1].register_forward_hook(lambda m, a, out: hidden.append(out.detach()))
    with SpikeMonitor(net, spiking_inputs_only=spiking_inputs_only) as mon:
        out = net(x)
    assert float(mon.counts["1"]) == float(hidden[0].sum())
    assert float(mon.counts["3"]) == float(out.sum())
    assert float(mon.synops["0"]) > 0 and float(mon.synops["2"]) >= 0
    meta = nn.Sequential(sb.BayesLinear(6, 5), sb.IWSTSpike("st"), sb.BayesLinear(5, 4),
                         sb.IWSTSpike("st")).to("meta")
    with SpikeMonitor(meta, spiking_inputs_only=spiking_inputs_only) as mon:
        meta(torch.empty(3, 6, device="meta"))
    assert all(c.device.type == "meta" for c in mon.counts.values())
    assert all(c.device.type == "meta" for c in mon.synops.values())
    assert mon.units["1"] == 15 and mon.units["3"] == 12


def _synops_by_jacobian(layer: nn.Module, x: torch.Tensor, **kwargs) -> float:
    """SynOps by brute force: for every non-zero input, the outputs that read it through a
    weight (non-zero entries of its Jacobian column, with every weight 1), summed."""
    ones = layer
    saved = ones.weight.detach().clone()
    with torch.no_grad():
        ones.weight.fill_(1.0)
    try:
        jac = torch.autograd.functional.jacobian(lambda v: ones(v, **kwargs),
                                                 torch.ones_like(x))
    finally:
        with torch.no_grad():
            ones.weight.copy_(saved)
    jac = jac.reshape(-1, x.numel()) != 0  # [outputs, inputs]
    return float(jac.sum(0)[x.flatten() != 0].sum())


@pytest.mark.parametrize("make", [
    lambda: nn.Conv3d(2, 4, (2, 3, 3), padding=(0, 1, 1), stride=(1, 2, 1)),
    lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
    lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1),
    lambda: nn.ConvTranspose2d(4, 4, (2, 3), stride=(1, 2), dilation=(2, 1), groups=4),
    lambda: nn.ConvTranspose3d(2, 2, 2, stride=2),
], ids=["conv3d", "convT1d-groups", "convT2d", "convT2d-dilation-depthwise", "convT3d"])
def test_layer_synops_of_conv3d_and_transposed_convolutions(make):
    """SynOps of Conv3d and ConvTranspose1d/2d/3d layers (a spiking U-Net's decoder, a
    SpikingJelly layer.Conv3d) equal the brute-force count; they were left out of every
    count (mc_predict's synops, SpikeMonitor) without a word."""
    from sbnn_addons.metrics import layer_synops

    torch.manual_seed(0)
    layer = make()
    spatial = layer.weight.dim() - 2
    x = (torch.rand(2, layer.in_channels, *[5] * spatial) < 0.4).float()
    expected = _synops_by_jacobian(layer, x)
    assert expected > 0
    assert float(layer_synops(layer, x)) == expected
    steps = torch.stack([x, torch.zeros_like(x), x])  # [T, N, C, ...] (multi-step)
    assert float(layer_synops(layer, steps)) == 2 * expected
    model = nn.Sequential(layer)
    with SpikeMonitor(model) as mon, torch.no_grad():
        model(x)
    assert float(mon.synops["0"]) == expected


def test_spike_monitor_warns_for_weight_layers_it_cannot_count():
    """A recurrent or bilinear layer's synaptic operations are not counted: the monitor
    says so (the SynOps total would be short of them), naming the layers."""
    model = nn.ModuleDict({"fc": nn.Linear(4, 4), "rnn": nn.LSTMCell(4, 4),
                           "bil": nn.Bilinear(4, 4, 2)})
    with pytest.warns(UserWarning, match=r"\['rnn', 'bil'\].*not counted.*synops=False"):
        SpikeMonitor(model)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SpikeMonitor(model, synops=False)
        SpikeMonitor(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))


def test_synops_of_a_transposed_convolution_called_with_output_size():
    """ConvTranspose2d(x, output_size=...) (a U-Net decoder matching its skip's size) adds
    output rows that the layer's own output_padding does not: counted as called, by the
    monitor (positional or keyword) and by layer_synops(output_size=)."""
    from sbnn_addons.metrics import layer_synops

    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1)
    x = (torch.rand(2, 2, 5, 5) < 0.5).float()
    size = [10, 10]  # output_padding 1 in both dimensions (the layer's is 0)
    expected = _synops_by_jacobian(layer, x, output_size=size)
    assert expected != _synops_by_jacobian(layer, x)
    assert float(layer_synops(layer, x, output_size=size)) == expected

    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = layer

        def forward(self, v):
            return self.up(v, size) + self.up(v, output_size=size)

    model = Up()
    with SpikeMonitor(model) as mon, torch.no_grad():
        model(x)
    assert float(mon.synops["up"]) == 2 * expected


def test_compiled_model_under_a_monitor_compiles_once():
    """A monitor around a compiled snnTorch model (a training loop that logs rates) counts
    every call without a recompilation per call (Dynamo guards on Python ints: a unit
    counter kept as one recompiled the graph at every call, then ran it eagerly)."""
    snn = pytest.importorskip("snntorch")
    from snntorch import utils as sutils

    from sbnn_addons.snntorch import to_sbnn

    torch.manual_seed(0)
    net = to_sbnn(nn.Sequential(
        nn.Linear(20, 16), snn.Leaky(beta=0.9, init_hidden=True),
        nn.Linear(16, 4), snn.Leaky(beta=0.9, init_hidden=True, output=True)))
    x = (torch.rand(5, 8, 20) < 0.5).float() * 2

    def forward(x):
        out = 0
        for x_t in x:
            spk, _ = net(x_t)
            out = out + spk
        return out

    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    sutils.reset(net)
    compiled(x)  # snnTorch's first call sees the initial membrane, of another rank
    emitted = 0.0
    with SpikeMonitor(net) as mon:
        for call in range(4):  # the monitor's wrappers: one compilation, then none
            sutils.reset(net)
            with torch._dynamo.config.patch(error_on_recompile=call > 0):
                emitted += float(compiled(x).sum())
    assert mon.units == {"1.spike_grad": 4 * 5 * 8 * 16, "3.spike_grad": 4 * 5 * 8 * 4}
    assert float(mon.counts["3.spike_grad"]) == emitted > 0
    assert mon.spike_rates()["3.spike_grad"] == emitted / (4 * 5 * 8 * 4)


def test_monitor_entered_after_a_compiled_model_was_traced_counts_its_synops():
    """A plain snnTorch baseline compiled per step, traced before any monitor: a monitor
    entered afterwards counts its SynOps as in eager mode (Dynamo does not guard a
    module's hooks, so hooks added after the trace never ran and the SynOps stayed 0),
    and a monitor that exited counts nothing more."""
    snn = pytest.importorskip("snntorch")
    from snntorch import utils as sutils

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 6), snn.Leaky(beta=0.9, init_hidden=True))
    x = (torch.rand(3, 4, 10) < 0.5).float()
    step = torch.compile(net, fullgraph=True, backend="eager")
    torch._dynamo.reset()

    def run(f):
        sutils.reset(net)
        for x_t in x:
            f(x_t)

    with torch.no_grad():
        run(step)  # traced without a monitor
        with SpikeMonitor(net) as eager:
            run(net)
        expected = float(eager.synops["0"])
        assert expected > 0
        with SpikeMonitor(net) as first:
            run(step)
        run(step)  # after the exit: not counted
        with SpikeMonitor(net) as second:
            run(step)
    assert float(first.synops["0"]) == expected
    assert float(second.synops["0"]) == expected


def test_a_copy_made_inside_a_monitor_runs_as_its_own_model():
    """``copy.deepcopy(model)`` inside a monitor (the best model of a training loop that
    logs rates): the copy computes with its own weights, mode and spike functions, also
    after the monitor exited, not through the monitored model's methods (its spike
    functions fired through the monitored model's, in that model's mode)."""
    import copy

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = sb.BayesLinear(8, 6, std=0.3)
            self.lif = sb.LIF(spike_fn=sb.IWSTSpike("st", std=0.5))

        def forward(self, x):
            return self.lif(self.fc(x))[0]

    torch.manual_seed(0)
    net = Net()
    x = (torch.rand(64, 8) < 0.5).float()
    reference = copy.deepcopy(net)  # the same weights, copied outside a monitor
    with torch.no_grad():
        with SpikeMonitor(net) as mon:
            net(x)
            best = copy.deepcopy(net)
        counted = float(mon.total_synops())
        net.fc.weight.add_(1.0)  # the monitored model trains on
        sb.set_mode(net, "mean")  # and is evaluated in mean mode
        for mode in ("sample", "mean"):
            sb.set_mode(best, mode)
            sb.set_mode(reference, mode)
            torch.manual_seed(1)
            got = best(x)
            torch.manual_seed(1)
            assert torch.equal(got, reference(x)), mode
        assert float(mon.total_synops()) == counted


def _watched(model: nn.Module) -> list[tuple[str, str]]:
    """The monitor's methods set on the modules of ``model`` (module name, attribute)."""
    return [(n, a) for n, m in model.named_modules()
            for a in ("fire", "fire_inhibition", "forward", "__reduce_ex__")
            if a in m.__dict__]


def _snntorch_model() -> nn.Module:
    import snntorch as snn

    from sbnn_addons.snntorch import to_sbnn

    torch.manual_seed(0)
    return to_sbnn(nn.Sequential(nn.Linear(8, 20), snn.Leaky(beta=0.9, init_hidden=True),
                                 nn.Linear(20, 4),
                                 snn.Leaky(beta=0.9, init_hidden=True, output=True)))


def test_a_copy_made_inside_a_monitor_carries_none_of_its_methods():
    """copy.deepcopy of a watched snnTorch model inside the block kept the monitor's
    `fire` / `forward` on the copy (bound to it, holding the monitor and the watched
    model) after the block, and a compiled copy traced through them; torch.save wrote
    them too."""
    import copy
    import io

    import sbnn_addons.snntorch as sbnn_snn

    model = _snntorch_model()
    x = (torch.rand(6, 8) < 0.5).float()
    with torch.no_grad(), SpikeMonitor(model) as mon:
        model(x)
        best = copy.deepcopy(model)
        assert _watched(best) == [] and _watched(model) != []
        counted = mon.total_spikes()
        sbnn_snn.reset(best)
        best(x)  # the copy runs as its own model: not counted
        assert mon.total_spikes() == counted
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert _watched(loaded) == []
    assert _watched(model) == [] and _watched(best) == []


def test_monitors_exited_out_of_order_leave_nothing_behind():
    """Two monitors closed in the wrong order (or exited by hand): the inner one's exit put
    the outer one's wrappers back, which kept counting after its block, silently, and
    stayed on the model."""
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import functional, layer, neuron

    from sbnn_addons.spikingjelly import to_sbnn

    torch.manual_seed(0)
    model = to_sbnn(nn.Sequential(layer.Linear(6, 40), neuron.LIFNode()))
    x = (torch.rand(4, 6) < 0.5).float() * 3

    def run():
        functional.reset_net(model)
        torch.manual_seed(1)  # the same spikes at each run
        with torch.no_grad():
            return float(model(x).sum())

    outer, inner = SpikeMonitor(model).__enter__(), SpikeMonitor(model).__enter__()
    spikes = run()
    assert spikes > 0
    outer.__exit__(None, None, None)  # first: inner is still open
    run()
    assert outer.total_spikes() == spikes  # no longer counts
    assert inner.total_spikes() == 2 * spikes  # still counts, once per spike
    inner.__exit__(None, None, None)
    assert _watched(model) == []
    run()
    assert outer.total_spikes() == spikes and inner.total_spikes() == 2 * spikes
    with outer:  # the monitors are usable again and count each spike once
        with inner:
            run()
    assert outer.total_spikes() == 2 * spikes and inner.total_spikes() == 3 * spikes
    assert _watched(model) == []


def test_a_compiled_wrapper_is_counted_under_its_models_names():
    """``SpikeMonitor(torch.compile(net))`` and ``mc_predict`` on it named every layer
    by the wrapper's path (``_orig_mod.lif1.spike_grad``), so code reading a layer's
    counts or rates by the model's names raised a ``KeyError`` once the model was compiled:
    the names are the model's own, as for the eager model."""
    snn = pytest.importorskip("snntorch")
    from sbnn_addons.snntorch import to_sbnn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.lif1 = nn.Linear(10, 6), snn.Leaky(beta=0.9)

        def forward(self, x):
            mem, out = self.lif1.init_leaky(), 0
            for x_t in x:
                spk, mem = self.lif1(self.fc1(x_t), mem)
                out = out + spk
            return out

    torch.manual_seed(0)
    net = to_sbnn(Net()).eval()
    x = torch.rand(3, 4, 10) * 3
    compiled = torch.compile(net, fullgraph=True, backend="eager")
    torch._dynamo.reset()
    with torch.no_grad(), SpikeMonitor(compiled) as mon:
        compiled(x)
    assert list(mon.counts) == ["lif1.spike_grad"] and list(mon.synops) == ["fc1"]
    pred = sb.mc_predict(compiled, x, 2)
    assert list(pred.layer_spike_counts) == ["lif1.spike_grad"]
    assert list(pred.layer_synops) == ["fc1"]
    assert set(pred.spike_rates()) == {"lif1.spike_grad"}
