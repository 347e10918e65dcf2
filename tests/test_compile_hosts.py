"""``torch.compile(fullgraph=True)`` on host models as users write them (the tutorials'
training and evaluation loops), beyond the paths of ``test_compile.py``."""

from __future__ import annotations

import copy
import gc
import shutil

import pytest
import snntorch as snn
import snntorch.utils as sutils
import torch
from snntorch import functional as SF
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import sbnn_addons as sb
import sbnn_addons.snntorch as sbnn_snn
import sbnn_addons.spikingjelly as sbnn_sj

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                       reason="inductor needs a C++ compiler on the CPU"),
]


def test_snntorch_training_step_after_an_inference_mode_evaluation():
    """A compiled tutorial step (``utils.reset`` inside, ``SF.ce_rate_loss``) run under
    ``torch.inference_mode()`` for an evaluation leaves the neurons' last spikes as
    inference tensors; the next compiled training step took them as graph inputs for the
    reset of its first step, and the partitioner saved them to recompute the membrane in
    the backward: "Inference tensors cannot be saved for backward". The training step
    after the evaluation runs as the first one did."""
    gc.collect()
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = sbnn_snn.to_sbnn(nn.Sequential(
        nn.Linear(6, 4), snn.Leaky(beta=0.5, init_hidden=True, output=True)))
    loss_fn = SF.ce_rate_loss()
    x, y = torch.rand(3, 6) * 3, torch.randint(0, 4, (3,))

    def step(x, y):
        sutils.reset(net)
        return loss_fn(torch.stack([net(x)[0] for _ in range(2)]), y)

    sutils.reset(net)  # once eagerly: snnTorch's reset defines its module globals
    sb.set_mode(net, "mean")
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager_decomp_partition")
    try:
        first = compiled(x, y)
        first.backward()
        with torch.inference_mode():
            compiled(x, y)
        again = compiled(x, y)
        again.backward()
    finally:
        torch._dynamo.reset()
    assert torch.equal(again.detach(), first.detach())


def test_drop_in_spike_grad_draws_afresh_when_a_compiled_step_sees_the_same_input_again():
    """The drop-in ``spike_grad()`` in an unconverted snnTorch model, a compiled step
    (``utils.reset`` inside) called twice on the same batch (Monte Carlo samples, an
    evaluation repeated): the firing calls of the second call matched the remembered
    drives of the first and took their spikes, a constant without gradient, for their
    own draws: the same spikes at every call, and a zero gradient for the weights."""
    gc.collect()
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 40), snn.Leaky(beta=0.5, spike_grad=sbnn_snn.spike_grad(),
                                                    init_hidden=True, output=True))
    x = torch.rand(2, 4, 6) * 3

    def step(x):
        sutils.reset(net)
        return torch.stack([net(x[t])[0] for t in range(x.shape[0])])

    sutils.reset(net)  # once eagerly: snnTorch's reset defines its module globals
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    spikes, grads = [], []
    try:
        for _ in range(2):
            net.zero_grad()
            out = compiled(x)
            out.sum().backward()
            spikes.append(out.detach())
            grads.append(net[0].weight.grad.abs().sum())
    finally:
        torch._dynamo.reset()
    assert all(g > 0 for g in grads)
    assert not torch.equal(spikes[1], spikes[0])


@pytest.mark.parametrize("where", ["step", "forward", "forward conv"])
def test_spikegen_rate_inside_a_compiled_step_is_named(where):
    """``snntorch.spikegen.rate`` inside a compiled step (tutorial 3's input encoding)
    builds its repeat sizes from ``Tensor.tolist()``, so the spike trains' sizes are
    data-dependent (unbacked) in the graph. The host model compiles; a converted one
    failed inside a Bayesian layer's feature check with Dynamo's "Could not guard on
    data-dependent expression". It raises an error naming the cause and the fix: the
    spike trains generated outside the compiled step, which then compiles."""
    from snntorch import spikegen

    torch._dynamo.reset()
    torch.manual_seed(0)

    class Net(nn.Module):  # an explicit time loop that encodes its own input
        def __init__(self):
            super().__init__()
            self.fc = nn.Conv1d(1, 2, 3) if "conv" in where else nn.Linear(6, 4)
            self.lif = snn.Leaky(beta=0.8)

        def forward(self, x):
            mem, out = self.lif.init_leaky(), []
            data = spikegen.rate(x, num_steps=2) if "forward" in where else x
            for t in range(data.shape[0]):
                spk, mem = self.lif(self.fc(data[t]), mem)
                out.append(spk)
            return torch.stack(out)

    net = sbnn_snn.to_sbnn(Net())

    def step(x):
        return net(spikegen.rate(x, num_steps=2) if where == "step" else x).sum()

    x = torch.rand(3, 1, 6) if "conv" in where else torch.rand(3, 6)
    try:
        with pytest.raises(RuntimeError, match=r"data-dependent.*spikegen.*outside the "
                                               r"compiled step"):
            torch.compile(step, fullgraph=True, backend="eager")(x)
        torch._dynamo.reset()
        if where == "step":  # the fix: the spike trains as the compiled step's input
            data = spikegen.rate(x, num_steps=2)
            torch.compile(lambda d: net(d).sum(), fullgraph=True, backend="eager")(data)
    finally:
        torch._dynamo.reset()


def test_drop_in_spike_grad_compiled_per_step_stops_recompiling():
    """A host snnTorch model with the drop-in ``spike_grad`` compiled as a module and
    called once per time step: the spike function's list of recent draws grew by one
    entry per call up to its size, and Dynamo, which guards on a list's length,
    recompiled the step at every call until the recompile limit (then it ran eagerly).
    The list has one length in a compiled graph: no new graph after the first sequence."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(6, 5), snn.Leaky(beta=0.9, init_hidden=True, spike_grad=sbnn_snn.spike_grad()),
        nn.Linear(5, 3),
        snn.Leaky(beta=0.9, init_hidden=True, output=True, spike_grad=sbnn_snn.spike_grad()))
    compiled = torch.compile(net, backend="aot_eager")
    x = torch.rand(4, 2, 6) * 3
    graphs = []
    for _ in range(3):
        sutils.reset(net)
        out = torch.stack([compiled(x_t)[1] for x_t in x])
        graphs.append(counters["stats"]["unique_graphs"])
    assert torch.isfinite(out).all()
    assert graphs[2] == graphs[1] <= 4, graphs


@pytest.mark.parametrize(("kind", "step_mode"), [("PSN", "m"), ("SlidingPSN", "s")])
def test_copy_of_a_parallel_spiking_neuron_compiled_with_the_aux_loss_steps_again(kind,
                                                                                  step_mode):
    """A SpikingJelly parallel spiking neuron with the drop-in surrogate and the auxiliary
    loss on, deep-copied (a copy of the model, a checkpoint loaded whole) and compiled: its
    second compiled call failed inside Dynamo with ``KeyError: '_examples'`` (the graph
    deleted, at every call, the number of examples that its hooks hand the spike function
    and that the copy had kept as ``None``). Every compiled call collects the terms of an
    eager call."""
    from spikingjelly.activation_based import functional, layer, neuron

    torch._dynamo.reset()
    torch.manual_seed(0)
    spike = sbnn_sj.surrogate_function(std=0.5, learn_std=False)
    node = (neuron.PSN(T=3, surrogate_function=spike) if kind == "PSN"
            else neuron.SlidingPSN(k=2, surrogate_function=spike, step_mode=step_mode))
    net = copy.deepcopy(sb.enable_aux_loss(
        nn.Sequential(layer.Linear(6, 8, step_mode=step_mode), node)))
    x = torch.rand(3, 4, 6) * 2

    def run(model):
        functional.reset_net(net)
        return model(x) if step_mode == "m" else torch.stack([model(x_t) for x_t in x])

    compiled = torch.compile(net, fullgraph=True, backend="eager")
    terms = []
    try:
        for _ in range(2):
            run(compiled)
            terms.append(net[1].surrogate_function.pop_aux())
    finally:
        torch._dynamo.reset()
    run(net)
    expected = net[1].surrogate_function.pop_aux()
    for total, units in terms:
        assert units == expected[1]
        torch.testing.assert_close(total, expected[0])


def _readout_host() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), snn.Leaky(beta=0.9, init_hidden=True), nn.Linear(8, 3))


@pytest.mark.parametrize("how", ["wrapper", "compile()"])
def test_check_variance_flow_of_a_compiled_model_checks_the_model_it_wraps(how):
    """``check_variance_flow`` on a compiled model (``torch.compile(net)``, or
    ``net.compile()``) ran the compiled forward, where the layers' probes do not run: its
    report's ``readouts`` was empty for a model whose readout's noise reaches the output
    (silently), and an operation without a variance rule raised Dynamo's ``UserError``
    instead of the documented ``VarianceFlowError`` naming the layers. It checks the model
    eagerly, as the plain one."""
    x = torch.rand(2, 6)
    net = sbnn_snn.to_sbnn(_readout_host())
    expected = sb.check_variance_flow(net, x)
    assert expected.readouts == ["2"]
    compiled = torch.compile(net, backend="eager") if how == "wrapper" else net
    if how == "compile()":
        net.compile(backend="eager")
    try:
        report = sb.check_variance_flow(compiled, x)
        assert report.readouts == expected.readouts and report.ops == expected.ops
        assert how == "wrapper" or net._compiled_call_impl is not None  # still compiled
        torch.manual_seed(0)
        bad = sbnn_snn.to_sbnn(nn.Sequential(nn.Linear(6, 8), nn.Tanh(),
                                             snn.Leaky(beta=0.9, init_hidden=True)))
        with pytest.raises(sb.VarianceFlowError, match=r"'tanh'.*fed by the Bayesian layer"):
            sb.check_variance_flow(torch.compile(bad, backend="eager"), x)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("host", ["snntorch", "spikingjelly"])
def test_model_compiled_then_converted_keeps_its_variance_flow_in_copies_and_exports(host):
    """``to_sbnn(torch.compile(host))`` installed the variance flow's hooks on the compiled
    wrapper, which a copy (``copy.deepcopy``, ``torch.save``) rebuilds from the model it
    wraps without them, while the record of the hooks went to that model: a copy lost its
    input checks, and the export of the converted model (``to_snntorch`` /
    ``to_spikingjelly``) kept the stale record, so that converting the export again failed
    inside ``copy.deepcopy`` ("cannot create weak reference to 'NoneType' object"). The
    flow is the wrapped model's, as for a model converted then compiled."""
    from spikingjelly.activation_based import layer, neuron

    torch.manual_seed(0)
    if host == "snntorch":
        to_sbnn, export = sbnn_snn.to_sbnn, sbnn_snn.to_snntorch
        model = nn.Sequential(nn.Linear(6, 8), snn.Leaky(beta=0.9, init_hidden=True))
    else:
        to_sbnn, export = sbnn_sj.to_sbnn, sbnn_sj.to_spikingjelly
        model = nn.Sequential(layer.Linear(6, 8), neuron.LIFNode())
    converted = to_sbnn(torch.compile(model, backend="eager"))
    bad = torch.full((2, 6), float("nan"))
    try:
        with pytest.raises(ValueError, match="input of the converted model"):
            copy.deepcopy(converted)._orig_mod(bad)
        again = to_sbnn(export(converted))  # (the export is the plain model it wraps)
        with pytest.raises(ValueError, match="input of the converted model"):
            again(bad)
    finally:
        torch._dynamo.reset()


class _LateBatchNorm(nn.Module):
    """A BatchNorm declared before the layer it follows in the forward."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(8)
        self.fc = nn.Linear(6, 8)
        self.lif = snn.Leaky(beta=0.9, init_hidden=True, output=True)

    def forward(self, x):
        return self.lif(self.bn(self.fc(x)))


@pytest.mark.parametrize("how", ["wrapper", "compile()"])
def test_batchnorm_affine_pairs_a_compiled_host_by_its_calls(how):
    """``to_sbnn(compiled, batchnorm="affine", example_input=x)`` pairs each BatchNorm
    with the layer the forward calls before it by hooks that do nothing in a compiled
    forward: a compiled host (``torch.compile(host)``, ``host.compile()``) folded no
    BatchNorm's scale into its layer's posterior std, silently. Its forward runs eagerly
    for the pairing: the stds of the plain host's conversion."""
    def host():
        torch.manual_seed(0)
        net = _LateBatchNorm()
        with torch.no_grad():
            net.bn.running_var.fill_(4.0)
            net.bn.weight.fill_(3.0)
        return net.eval()

    x = torch.rand(2, 6)
    expected = sbnn_snn.to_sbnn(host(), batchnorm="affine", example_input=x).fc.std
    model = host()
    if how == "wrapper":
        model = torch.compile(model, backend="eager")
    else:
        model.compile(backend="eager")
    try:
        converted = sbnn_snn.to_sbnn(model, batchnorm="affine", example_input=x)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(getattr(converted, "_orig_mod", converted).fc.std, expected)
    assert how == "wrapper" or model._compiled_call_impl is not None  # still compiled


def test_compiled_kernel_reads_an_in_place_scatter_result_after_the_scatter():
    """PyTorch 2.13 inductor's CPU backend fused a kernel that reads the result of an
    in-place ``scatter_add`` with a kernel over a channels-last tensor and, recomputing
    the reader's loops for the fusion, lost its dependency on the scatter: the fused
    kernel ran first and read zeros, silently. The backward of ``max_pool2d`` is such a
    scatter (PyTorch 2.13), so a converted SpikingJelly network (convolutions, BatchNorm,
    max pooling; single step, ``T = 2``) compiled to the eager loss and spikes but lost
    one time step's gradient through the pooling for the layers before it. Importing
    ``sbnn_addons`` corrects inductor (``sbnn_addons._inductor_fixes``): the compiled
    function computes eager's values."""
    def f(c, x, index, src):
        a = c * x  # a kernel over the channels-last x
        s = torch.zeros(8, 256).scatter_add(1, index, src).view(2, 4, 16, 16)
        return a, s * c  # the reader of the scatter's result, fused with the kernel above

    gc.collect()
    torch._dynamo.reset()
    torch.manual_seed(0)
    c = torch.rand(2, 4, 16, 16)
    x = torch.rand(2, 4, 16, 16).to(memory_format=torch.channels_last)
    index, src = torch.randint(0, 256, (8, 64)), torch.rand(8, 64)
    try:
        compiled = torch.compile(f, fullgraph=True)(c, x, index, src)
    finally:
        torch._dynamo.reset()
    for got, want in zip(compiled, f(c, x, index, src)):
        torch.testing.assert_close(got, want)


def test_a_pre_hook_changing_a_converted_neurons_input_is_named_in_a_compiled_call():
    """A forward pre-hook registered on a converted SpikingJelly neuron after the
    conversion (after the link's own, which takes the input's variance) that changes the
    input (``x * 2``): eager mode names it, but a compiled call drew the spikes with the
    variance of the unchanged input (a quarter of the true one), silently. The compiled
    call names it too; a hook that passes the input on unchanged still runs."""
    from spikingjelly.activation_based import functional, layer, neuron

    from sbnn_addons.moments import VarianceFlowError

    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(6, 5, step_mode="m"),
                        neuron.IFNode(v_threshold=1e9, step_mode="m"))
    sbnn = sbnn_sj.to_sbnn(net, std=0.1, learn_std=False, spike_std=None)
    x = torch.rand(2, 3, 6) * 3

    def run(a):
        functional.reset_net(sbnn)
        return sbnn(a)

    seen = []
    handle = sbnn[1].register_forward_pre_hook(lambda m, args: seen.append(1))
    gc.collect()
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(run, backend="aot_eager")(x)
        assert seen
        handle.remove()
        sbnn[1].register_forward_pre_hook(lambda m, args: (args[0] * 2, *args[1:]))
        torch._dynamo.reset()
        with pytest.raises((VarianceFlowError, RuntimeError),
                           match=r"IFNode.*pre-hook.*prepend=True"), torch.no_grad():
            torch.compile(run, backend="aot_eager")(x)
    finally:
        torch._dynamo.reset()


def test_batchnorm_affine_pairs_are_checked_in_a_first_compiled_call():
    """``batchnorm="affine"`` without ``example_input`` folds each BatchNorm's scale into
    the layer declared before it, and the first forward checks that the forward calls
    them back to back. A model declaring its layers grouped by type (``conv1, conv2, bn1,
    bn2``), compiled before any eager call, skipped the check: bn1's scale stayed folded
    into conv2 (the wrong layer's noise), silently. The compiled call names it as the
    eager one does; a model declared in call order compiles and runs."""
    from spikingjelly.activation_based import layer, neuron

    class Grouped(nn.Module):
        def __init__(self, grouped: bool):
            super().__init__()
            self.conv1 = layer.Conv2d(2, 4, 3, padding=1)
            if grouped:
                self.conv2 = layer.Conv2d(4, 4, 3, padding=1)
            self.bn1 = layer.BatchNorm2d(4)
            self.sn1 = neuron.LIFNode()
            if not grouped:
                self.conv2 = layer.Conv2d(4, 4, 3, padding=1)
            self.bn2 = layer.BatchNorm2d(4)
            self.sn2 = neuron.LIFNode()

        def forward(self, x):
            return self.sn2(self.bn2(self.conv2(self.sn1(self.bn1(self.conv1(x))))))

    torch.manual_seed(0)
    x = torch.rand(2, 2, 5, 5)
    gc.collect()
    torch._dynamo.reset()
    try:
        declared = sbnn_sj.to_sbnn(Grouped(True), batchnorm="affine")
        with pytest.raises((ValueError, RuntimeError),
                           match=r"'bn1'.*'conv2'.*'conv1'.*example_input=x"):
            torch.compile(declared, backend="aot_eager")(x)
        ordered = sbnn_sj.to_sbnn(Grouped(False), batchnorm="affine")
        torch.compile(ordered, backend="aot_eager")(x)
    finally:
        torch._dynamo.reset()


class _GraphBreak(nn.Module):
    """A user module that Dynamo cannot trace (a ``print``, a data-dependent branch)."""

    def forward(self, x):
        torch._dynamo.graph_break()
        return x


def test_converted_snntorch_model_with_a_graph_break_compiles_like_eager():
    """``torch.compile`` without ``fullgraph`` splits a converted snnTorch model at a graph
    break (here before a neuron, whose input then carries a Bayesian layer's variance):
    the graph that starts there takes that carrier as an input, and the first call failed
    inside AOTAutograd ("Multiple dispatch failed for 'aten.zeros_like'"; its backward,
    "we guessed its metadata incorrectly"). It runs as in eager mode, values and
    gradients."""
    torch.manual_seed(0)
    layers = [nn.Linear(6, 8), snn.Leaky(beta=0.9, init_hidden=True),
              nn.Linear(8, 3), snn.Leaky(beta=0.9, init_hidden=True, output=True)]
    layers.insert(1, _GraphBreak())
    net = sbnn_snn.to_sbnn(nn.Sequential(*layers))
    x = torch.rand(4, 6) * 3
    compiled = torch.compile(net, backend="aot_eager")
    results = []
    try:
        for model in (net, compiled):
            sbnn_snn.reset(net)
            torch.manual_seed(1)
            out = torch.stack([model(x)[0] for _ in range(3)])
            out.sum().backward()
            results.append((out.detach(), net[0].std_rho.grad.clone()))
            net.zero_grad()
    finally:
        torch._dynamo.reset()
    assert results[0][0].sum() > 0
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)


def test_host_compiled_and_run_then_converted_in_place_compiles_like_eager():
    """The order of a user who compiles first: ``net.compile()``, a warm-up call of the
    snnTorch model, then ``to_sbnn(net, inplace=True)``. Dynamo had compiled the host's
    ``Leaky.forward`` as a frame of its own, so the converted model's compiled call split
    there and failed inside AOTAutograd ("Multiple dispatch failed"). It computes eager
    mode's spikes."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), snn.Leaky(beta=0.9, init_hidden=True),
                        nn.Linear(8, 3), snn.Leaky(beta=0.9, init_hidden=True, output=True))
    x = torch.rand(4, 6) * 3
    net.compile(backend="aot_eager")
    try:
        sutils.reset(net)
        net(x)
        sbnn_snn.to_sbnn(net, inplace=True)
        results = []
        for call in (net, net._call_impl):  # compiled, then eager
            sbnn_snn.reset(net)
            torch.manual_seed(1)
            results.append(torch.stack([call(x)[1] for _ in range(3)]).detach())
    finally:
        torch._dynamo.reset()
    assert torch.equal(results[0], results[1])


def test_explicit_loop_with_a_graph_break_compiles_like_eager():
    """An explicit time loop (snnTorch tutorial style, an ``RLeaky`` passing its spikes
    back) that Dynamo splits at a graph break inside the loop: the graph after the break
    takes the marked spikes and the carriers of the step before as inputs, and its first
    call failed inside AOTAutograd ("Multiple dispatch failed for 'aten.add.Tensor'"). It
    computes eager mode's loss and gradients."""

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.lif1 = nn.Linear(6, 8), snn.RLeaky(beta=0.9, linear_features=8)
            self.fc2, self.lif2 = nn.Linear(8, 3), snn.Leaky(beta=0.8, learn_beta=True)

        def forward(self, x):
            spk1, mem1 = self.lif1.init_rleaky()
            mem2 = self.lif2.init_leaky()
            out = []
            for t in range(x.shape[0]):
                spk1, mem1 = self.lif1(self.fc1(x[t]), spk1, mem1)
                if t == 1:
                    torch._dynamo.graph_break()
                spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
                out.append(spk2)
            return torch.stack(out).sum(0) + mem2

    torch.manual_seed(0)
    net = sbnn_snn.to_sbnn(Loop())
    x, y = torch.rand(3, 5, 6) * 6, torch.randint(0, 3, (5,))
    results = []
    try:
        for model in (net, torch.compile(net, backend="aot_eager")):
            torch.manual_seed(1)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in net.parameters()]))
            net.zero_grad()
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(results[1][0], results[0][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


class _ChunkLoop(nn.Module):
    """A truncated-BPTT chunk (snnTorch tutorial loop) that takes and returns the membrane."""

    def __init__(self, fc, lif):
        super().__init__()
        self.fc, self.lif = fc, lif

    def forward(self, x, mem):
        out = []
        for t in range(x.shape[0]):
            spk, mem = self.lif(self.fc(x[t]), mem)
            out.append(spk)
        return torch.stack(out), mem


def _chunk_net(style: str) -> _ChunkLoop:
    """A ``_ChunkLoop`` converted by ``to_sbnn`` (``"converted"``), or built with a
    ``BayesLinear`` and the drop-in ``spike_grad()`` (``"drop-in"``)."""
    if style == "converted":
        return sbnn_snn.to_sbnn(_ChunkLoop(nn.Linear(6, 5), snn.Leaky(beta=0.9)))
    return _ChunkLoop(sb.BayesLinear(6, 5, std=0.3),
                      snn.Leaky(beta=0.9, spike_grad=sbnn_snn.spike_grad()))


@pytest.mark.parametrize("style", ["converted", "drop-in"])
def test_truncated_bptt_chunks_compile_once_for_the_carried_membrane(style):
    """A chunk given back its detached membrane compiles for the carried membrane once,
    after an eager chunk (whose membrane is plain). It compiled again: ``mem.detach()``
    expanded a per-layer std's compact variance ([B, 1]) to [B, 5] with stride 0, and the
    next chunk returned it full, of another layout; the drop-in spike function
    remembered the eager chunk's drives as carriers and the compiled chunk's as plain
    tensors, two types to guard (a compile at every chunk)."""
    torch.manual_seed(0)
    net = _chunk_net(style)
    counter = CompileCounterWithBackend("aot_eager")
    model = torch.compile(net, backend=counter, fullgraph=True)
    x, frames = torch.rand(3, 4, 6) * 3, []
    _, mem = net(x, net.lif.init_leaky())
    mem = mem.detach()
    try:
        for _ in range(4):
            spikes, mem = model(x, mem)
            spikes.sum().backward()
            mem = mem.detach()
            frames.append(counter.frame_count)
    finally:
        torch._dynamo.reset()
    assert sb.moments.get_variance(mem).shape == (4, 1)
    # (the second chunk compiles for a carrier: the eager chunk's membrane is plain)
    assert frames[1:] == [frames[1]] * 3, frames


@pytest.mark.parametrize("backend", ["aot_eager", "aot_eager_decomp_partition"])
@pytest.mark.parametrize("style", ["converted", "drop-in"])
def test_a_carried_membrane_passed_back_into_an_aot_eager_chunk_runs(backend, style):
    """Truncated BPTT with the debugging backends: the membrane a chunk returns (it carries
    its variance) goes back into the next compiled chunk, whose first call checks custom
    operators in AOTAutograd's dispatch mode. A converted model runs as eager mode does
    (spikes, membrane and gradients); the drop-in spike function behind a Bayesian layer
    runs and trains (its compiled draws are not eager mode's: the reset of the initial
    membrane is a draw there, ``SnnTorchSpike``)."""
    torch.manual_seed(0)
    net = _chunk_net(style)
    x = torch.rand(3, 4, 6) * 3
    results = []
    try:
        for model in (net, torch.compile(net, backend=backend, fullgraph=True)):
            torch.manual_seed(1)
            mem, chunks = net.lif.init_leaky(), []
            for _ in range(3):
                spikes, mem = model(x, mem)
                if model is not net:  # a carrier goes back into the compiled chunk
                    assert isinstance(mem, sb.moments.VarianceTensor)
                spikes.sum().backward()
                mem = mem.detach()
                chunks.append(spikes.detach())
            results.append((torch.cat(chunks), mem.as_subclass(torch.Tensor),
                            [p.grad.clone() for p in net.parameters()]))
            net.zero_grad()
    finally:
        torch._dynamo.reset()
    assert results[0][0].sum() > 0 and results[1][0].sum() > 0
    if style == "drop-in":
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in results[1][2])
        return
    assert torch.equal(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])
    for a, b in zip(results[0][2], results[1][2], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
