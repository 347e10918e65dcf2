"""``torch.compile(fullgraph=True)`` on every path: the core network, converted snnTorch models
(Sequential with ``init_hidden`` and an explicit time loop) and converted SpikingJelly models
(single- and multi-step), each against eager.

With inductor's ``fallback_random`` the compiled graph draws the same random numbers as eager
PyTorch, so ``sample`` mode must match exactly (the C kernel is turned off for most of these
comparisons; separate tests check that the kernel's compiled calls draw eager mode's spikes
too); ``mean`` mode must match in any case. A separate test checks the law of the compiled
draw with inductor's own random numbers.
"""

from __future__ import annotations

import copy
import gc
import math
import pickle
import re
import shutil

import pytest
import snntorch as snn
import snntorch.utils as sutils
import torch
import torch.nn.functional as F
from _kernel import needs_kernel
from _sj_helpers import initial_membrane_net, run_steps
from _snntorch_nets import EditedLoop, HandoffLoop, MembraneFedLoop, ShrinkingLoop
from torch import nn

import sbnn_addons as sb
import sbnn_addons.snntorch as sbnn_snn
import sbnn_addons.spikingjelly as sbnn_sj
from sbnn_addons.moments import VarianceFlowError, VarianceTensor

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                       reason="inductor needs a C++ compiler on the CPU"),
]

# two steps: each step unrolls into the traced graph (tracing costs about a second per
# neuron and step), and two cover a membrane carried from one step to the next
T = 2


@pytest.fixture
def same_random_stream():
    import torch._inductor.config as inductor_config

    old = inductor_config.fallback_random
    inductor_config.fallback_random = True
    torch._dynamo.reset()
    with sb.kernels.use_kernels(False):
        yield
    inductor_config.fallback_random = old
    torch._dynamo.reset()


def _step(net: nn.Module, loss_fn, x, y):
    torch.manual_seed(1)
    net.zero_grad()
    loss = loss_fn(x, y)
    loss.backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
             for p in net.parameters()]
    return loss.detach(), grads


def _check_like_eager(net: nn.Module, loss_fn, x, y):
    """Eager, then compiled (fullgraph), in sample and mean mode: same loss and gradients."""
    # SpikingJelly's reset_net (traced in some of these steps) keeps a weak table of the
    # models it has reset; a model of an earlier test freed while Dynamo builds its guards
    # on that table fails inside Dynamo (docs/performance.md): free them first
    gc.collect()
    for mode in ("sample", "mean"):
        sb.set_mode(net, mode)
        eager = _step(net, loss_fn, x, y)
        compiled = _step(net, torch.compile(loss_fn, fullgraph=True), x, y)
        # the same spikes: one spike more or less moves the loss by far more than the
        # rounding of a sum that inductor reorders
        torch.testing.assert_close(compiled[0], eager[0], rtol=1e-6, atol=1e-6,
                                   msg=f"{mode} mode")
        if mode == "sample":
            assert any(g.abs().sum() > 0 for g in eager[1])
        for a, b in zip(eager[1], compiled[1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    sb.set_mode(net, "sample")


class CoreNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = sb.BayesLinear(12, 16, std=0.3)
        self.lif1 = sb.LIF(spike_fn=sb.IWSTSpike("iwst(0.5)"))
        self.fc2 = sb.BayesLinear(16, 5, std=0.3)
        self.lif2 = sb.LIF(spike_fn=sb.IWSTSpike("st"))

    def forward(self, x):
        s1 = s2 = None
        out = 0
        for t in range(x.shape[0]):
            h, s1 = self.lif1(self.fc1(x[t]), s1)
            o, s2 = self.lif2(self.fc2(h), s2)
            out = out + o
        return out


def test_core_network_compiles_like_eager(same_random_stream):
    torch.manual_seed(0)
    net = CoreNet()
    x, y = torch.rand(T, 6, 12) * 2, torch.randint(0, 5, (6,))
    _check_like_eager(net, lambda x, y: F.cross_entropy(net(x), y), x, y)


def test_snntorch_sequential_compiles_like_eager(same_random_stream):
    """The tutorial-6 loop with snntorch.utils.reset inside the compiled step, after eager
    steps (membranes from an earlier call are graph inputs)."""
    torch.manual_seed(0)
    host = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2),
        snn.Leaky(beta=0.9, init_hidden=True),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 5),
        snn.Leaky(beta=0.9, init_hidden=True, output=True),
    )
    net = sbnn_snn.to_sbnn(host)
    x, y = torch.rand(T, 6, 1, 8, 8) * 3, torch.randint(0, 5, (6,))
    _check_like_eager(net, _sequential_rate_loss(net), x, y)


def _sequential_rate_loss(net: nn.Module):
    """The tutorial-6 step of an ``init_hidden`` Sequential: ``snntorch.utils.reset``,
    then the spike count over the steps into a cross-entropy."""
    def loss_fn(x, y):
        sutils.reset(net)
        out = 0
        for t in range(x.shape[0]):
            spk, _mem = net(x[t])
            out = out + spk
        return F.cross_entropy(out, y)

    return loss_fn


class LoopNet(nn.Module):
    """snnTorch tutorial 5: explicit time loop, membranes passed back in."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.lif1 = snn.Leaky(beta=0.9)
        self.fc2 = nn.Linear(16, 5)
        self.lif2 = snn.Leaky(beta=0.9)

    def forward(self, x):
        mem1, mem2 = self.lif1.init_leaky(), self.lif2.init_leaky()
        out = []
        for t in range(x.shape[0]):
            spk1, mem1 = self.lif1(self.fc1(x[t]), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            out.append(spk2)
        return torch.stack(out)


def test_snntorch_explicit_loop_compiles_like_eager(same_random_stream):
    torch.manual_seed(0)
    net = sbnn_snn.to_sbnn(LoopNet())
    x, y = torch.rand(T, 6, 12) * 3, torch.randint(0, 5, (6,))
    _check_like_eager(net, lambda x, y: F.cross_entropy(net(x).sum(0), y), x, y)


class SharedLeakyNet(nn.Module):
    """One ``snn.Leaky`` called on the membranes of three layers in turn (valid in snnTorch,
    see ``test_one_leaky_shared_by_two_layers_keeps_each_membrane_state``)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 5)
        self.lif = snn.Leaky(beta=0.9)

    def forward(self, x):
        mem1, mem2, mem3 = self.lif.init_leaky(), self.lif.init_leaky(), self.lif.init_leaky()
        out = 0
        for t in range(x.shape[0]):
            spk1, mem1 = self.lif(self.fc1(x[t]), mem1)
            spk2, mem2 = self.lif(self.fc2(spk1), mem2)
            spk3, mem3 = self.lif(self.fc3(spk2), mem3)
            out = out + spk3
        return out


def test_snntorch_explicit_loop_with_one_leaky_shared_by_layers_compiles_like_eager(
        same_random_stream):
    """A compiled step kept only the last membrane the shared neuron fired from, so each
    layer's reset after the first step was ``1[mem > threshold]`` instead of the spikes that
    membrane emitted (eager mode's): other spikes and gradients in ``sample`` mode, silently.
    The membrane a compiled step returns carries its spikes, as it carries its variance."""
    torch.manual_seed(0)
    host = SharedLeakyNet()
    with torch.no_grad():
        for fc in (host.fc1, host.fc2, host.fc3):
            fc.weight.mul_(3)
    net = sbnn_snn.to_sbnn(host)
    x, y = torch.rand(3, 6, 12) * 3, torch.randint(0, 5, (6,))
    _check_like_eager(net, lambda x, y: F.cross_entropy(net(x), y), x, y)


class SharedLeakyChunks(SharedLeakyNet):
    """``SharedLeakyNet`` run in chunks (truncated BPTT): the membranes come in and go
    out. ``shared=False``: one ``snn.Leaky`` per layer instead."""

    def __init__(self, shared: bool = True):
        super().__init__()
        self.lifs = nn.ModuleList([self.lif] * 3 if shared
                                  else [snn.Leaky(beta=0.9) for _ in range(3)])

    def chunk(self, x, mem1, mem2, mem3):
        out = []
        for t in range(x.shape[0]):
            spk1, mem1 = self.lifs[0](self.fc1(x[t]), mem1)
            spk2, mem2 = self.lifs[1](self.fc2(spk1), mem2)
            spk3, mem3 = self.lifs[2](self.fc3(spk2), mem3)
            out.append(torch.cat([spk1, spk2, spk3], 1))
        return torch.stack(out), mem1, mem2, mem3


def test_snntorch_leaky_shared_by_layers_across_detached_chunks_goes_on_like_one_per_layer(
        same_random_stream):
    """One ``snn.Leaky`` shared by three layers, run in chunks that pass the membranes on
    detached (``mem = mem.detach()``). The neuron kept the spikes and variance of each
    layer's membrane only while that membrane object lived: in eager mode the next
    chunk went on from them where the loop still held the replaced membranes, and
    restarted every layer but the last (reset by ``1[mem > threshold]``, variance 0) where
    it did not, silently; a compiled chunk restarted them always. The records follow
    the membrane's storage, which the detached copy shares: the same spikes and
    gradients in the three runs, and as with one neuron per layer."""
    x = torch.rand(6, 8, 12) * 3
    runs = []
    for how in ("one per layer", "eager, references kept", "eager", "compiled"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        host = SharedLeakyChunks(shared=how != "one per layer")
        with torch.no_grad():
            for fc in (host.fc1, host.fc2, host.fc3):
                fc.weight.mul_(3)
        net = sbnn_snn.to_sbnn(host)
        step = (torch.compile(net.chunk, fullgraph=True, backend="aot_eager")
                if how == "compiled" else net.chunk)
        mems, kept, spikes = [lif.init_leaky() for lif in net.lifs], [], []
        torch.manual_seed(1)
        for part in x.split(2):
            spk, *mems = step(part, *mems)
            spk.sum().backward()
            spikes.append(spk.detach())
            if how == "eager, references kept":
                kept.append(mems)
            mems = [m.detach() for m in mems]
        runs.append([torch.cat(spikes)] + [p.grad.clone() for fc in (net.fc1, net.fc2, net.fc3)
                                           for p in fc.parameters()])
    for run in runs[1:]:
        for want, got in zip(runs[0], run):
            torch.testing.assert_close(got, want)


class MaskedLoopNet(LoopNet):
    """An explicit loop that zeroes some examples' membranes in place between steps (an
    episode ended: ``mem.mul_(mask)``), which ``mean`` mode follows as snnTorch does."""

    def forward(self, x, mask):
        mem1, mem2 = self.lif1.init_leaky(), self.lif2.init_leaky()
        out = 0
        for t in range(x.shape[0]):
            spk1, mem1 = self.lif1(self.fc1(x[t]), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            mem1.mul_(mask[t])
            out = out + spk2
        return out


def test_snntorch_membrane_changed_in_place_in_a_compiled_mean_mode_loop_resets_like_eager():
    """A membrane changed in place after it fired (``mem.mul_(mask)``) inside a compiled
    ``mean``-mode step: the compiled step reset it by the spikes of its old values (a
    graph reads no version counter), eager mode and snnTorch by its new ones: another
    loss and other gradients, silently. In ``mean`` mode the reset is the spike of the
    membrane's current values."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    host = MaskedLoopNet()
    with torch.no_grad():
        host.fc1.weight.mul_(3)
        host.fc2.weight.mul_(3)
    net = sb.set_mode(sbnn_snn.to_sbnn(host), "mean")
    x, y = torch.rand(4, 6, 12) * 3, torch.randint(0, 5, (6,))
    mask = (torch.rand(4, 6, 1) > 0.5).float()

    def loss_fn(x, y, mask):
        return F.cross_entropy(net(x, mask), y)

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend="aot_eager")):
        net.zero_grad()
        loss = fn(x, y, mask)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in net.parameters()
                                        if p.grad is not None]))
    torch._dynamo.reset()
    torch.testing.assert_close(results[1][0], results[0][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(b, a)
    # the host model itself, which converted mean mode runs exactly
    torch.testing.assert_close(F.cross_entropy(host(x, mask), y), results[0][0])


def _mul_mask_in_place(mem, t):
    return mem.mul_((torch.arange(mem.shape[0]) % (t + 2) != 0).to(mem.dtype)[:, None])


_MEMBRANE_EDITS = {
    "in place": _mul_mask_in_place,
    "out of place": lambda mem, t: mem * 0.5,
    "no rule": lambda mem, t: mem.clamp(max=0.5),
    "edited copy": lambda mem, t: mem.clone().mul_(0.5),
    # an edit of some units, put together from slices (none of the membrane's shape)
    "concatenated slices": lambda mem, t: torch.cat([0.5 * mem[:, :8], mem[:, 8:]], 1),
}


def _edited_through(view):
    def edit(mem, t):
        view(mem).mul_(0.5)  # an edit of the membrane through a view of it
        return mem
    return edit


#: In-place edits of the membrane through a view of it (the view shares its version counter in eager
#: mode): the compiled step ran on silently where eager mode raises.
_EDITS_THROUGH_VIEWS = {
    "a row": _edited_through(lambda mem: mem[0]),
    "a detached alias": _edited_through(lambda mem: mem.detach()),
    "a flat view": _edited_through(lambda mem: mem.view(-1)),
}


@pytest.mark.parametrize(("edit", "backend"), [
    *((edit, backend) for edit in _MEMBRANE_EDITS for backend in ("aot_eager", "inductor")),
    *((edit, "aot_eager") for edit in _EDITS_THROUGH_VIEWS)])
def test_snntorch_membrane_edited_inside_a_compiled_sample_mode_loop_raises_like_eager(
        edit, backend):
    """A membrane edited inside a compiled ``sample``-mode explicit loop, in place
    (``mem.mul_(mask)``: an episode ended; through a view, ``mem[0].mul_(0.5)``) or out of
    place (``mem = 0.5 * mem``), then passed back: eager mode refuses it (the neuron's
    variance and reset follow the membranes its steps return), while the compiled step
    reset it by ``1[mem > theta]`` of the edited mean values instead of the spikes it
    emitted (loss 1.7352 compiled), silently. The compiled step raises eager mode's
    error."""
    torch.manual_seed(0)
    _assert_edited_loop_raises_like_eager({**_MEMBRANE_EDITS, **_EDITS_THROUGH_VIEWS}[edit],
                                          backend)


def _assert_edited_loop_raises_like_eager(edit, backend: str, net=EditedLoop,
                                          match: str = "") -> None:
    """Assert that a training step of ``net(edit)`` raises a ``VarianceFlowError`` in eager
    mode and eager mode's error (a ``RuntimeError``) compiled with ``fullgraph``."""
    net = sbnn_snn.to_sbnn(net(edit))
    x, y = torch.rand(4, 6, 12) * 3, torch.randint(0, 5, (6,))

    def loss_fn(x, y):
        return F.cross_entropy(net(x), y)

    with pytest.raises(sb.VarianceFlowError, match=f"membrane.*{match}"):
        loss_fn(x, y)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match=f"^the membrane (of|passed to) .*{match}"):
        torch.compile(loss_fn, fullgraph=True, backend=backend)(x, y).backward()
    torch._dynamo.reset()


class MeanMembraneReadout(LoopNet):
    """An explicit loop whose readout is the last membrane scaled in place, never passed
    back: ``mem2.div_(T)``."""

    def forward(self, x):
        mem1, mem2 = self.lif1.init_leaky(), self.lif2.init_leaky()
        for t in range(x.shape[0]):
            spk1, mem1 = self.lif1(self.fc1(x[t]), mem1)
            _, mem2 = self.lif2(self.fc2(spk1), mem2)
        return mem2.div_(x.shape[0])


def test_snntorch_membrane_changed_in_place_for_a_readout_in_a_compiled_step_runs(
        same_random_stream):
    """An in-place edit of a membrane that no neuron is given again (a readout,
    ``mem2.div_(T)``) is no edit of a sequence: eager mode runs it, and so does a compiled
    step (it refused the edit while it was traced, where the membrane might be passed
    back), with eager mode's loss."""
    torch.manual_seed(0)
    net = sbnn_snn.to_sbnn(MeanMembraneReadout())
    x, y = torch.rand(4, 6, 12) * 3, torch.randint(0, 5, (6,))

    def loss_fn(x, y):
        return F.cross_entropy(net(x), y)

    losses = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True)):
        torch.manual_seed(1)
        loss = fn(x, y)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0])


def _assert_edited_loop_runs_like_eager(edit, backend: str = "inductor", nan: bool = False,
                                        no_grad: bool = False, net=EditedLoop) -> None:
    """Train-step ``net(edit)`` (first layer's weights x3, ``nan``: one NaN weight,
    with ``check_finite(False)``) in eager mode and compiled (``fullgraph``) under the same
    seed, and assert the same loss and gradients (``no_grad``: the loss only, under
    ``torch.no_grad()``)."""
    torch.manual_seed(0)
    host = net(edit)
    with torch.no_grad():
        host.fc1.weight.mul_(3)
        if nan:
            host.fc1.weight[0, 0] = float("nan")
    net = sbnn_snn.to_sbnn(host)
    x, y = torch.rand(4, 6, 12) * 3, torch.randint(0, 5, (6,))

    def loss_fn(x, y):
        return F.cross_entropy(net(x), y)

    results = []
    with sb.check_finite(not nan):
        for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend=backend)):
            torch.manual_seed(1)
            net.zero_grad()
            if no_grad or nan:
                with torch.no_grad():
                    loss = fn(x, y)
            else:
                loss = fn(x, y)
                loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in net.parameters()
                                            if p.grad is not None]))
    torch.testing.assert_close(results[1][0], results[0][0], equal_nan=nan)
    assert len(results[1][1]) == len(results[0][1])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("copy", ["detach", "clone"])
def test_snntorch_membrane_copied_inside_a_compiled_sample_mode_loop_runs_like_eager(
        copy, same_random_stream):
    """A copy of the membrane passed back inside a compiled loop (``mem.detach()``:
    truncated BPTT within one graph; ``mem.clone()``) is no edit: the same spikes, loss
    and gradients as eager mode under the same seed."""
    _assert_edited_loop_runs_like_eager(
        (lambda mem, t: mem.detach() if t % 2 else mem) if copy == "detach"
        else (lambda mem, t: mem.clone()))


def _mask_detached(mem, t):
    return mem.detach() * (torch.arange(mem.shape[0]) % (t + 2) != 0).to(mem.dtype)[:, None]


def _slices_detached(mem, t):
    return torch.cat([0.5 * mem[:, :8], mem[:, 8:]], 1).detach()


_EDITS_WITHOUT_GRAPH = {
    "detached edit": (_mask_detached, False),
    "edit without gradients": (lambda mem, t: 0.5 * mem, True),
    "detached concatenated slices": (_slices_detached, False),
}


@pytest.mark.parametrize("edit", list(_EDITS_WITHOUT_GRAPH))
def test_snntorch_membrane_edited_without_a_graph_inside_a_compiled_loop_runs_like_eager(
        edit, same_random_stream):
    """An edit of the membrane without a graph back to it, passed back inside a compiled
    ``sample``-mode loop: ``mem.detach() * mask`` (truncated BPTT with episodes that end),
    or ``0.5 * mem`` under ``torch.no_grad()`` (an evaluation). Eager mode refuses an edit
    only where it has a graph, and takes this one for a new membrane (its reset is
    ``1[mem > threshold]`` of the values passed, as in snnTorch). The compiled step raised
    "the membrane ... was computed from its last membrane out of place" for the first two,
    and kept the slices' variance for one put together from edited slices and detached
    (``torch.cat([...]).detach()``: other gradients, silently). It now runs as eager mode:
    the same loss and gradients under the same seed."""
    fn, no_grad = _EDITS_WITHOUT_GRAPH[edit]
    _assert_edited_loop_runs_like_eager(fn, backend="aot_eager", no_grad=no_grad)


def test_snntorch_nan_membrane_detached_inside_a_compiled_loop_runs_like_eager(
        same_random_stream):
    """With ``check_finite(False)``, a membrane holding NaN values (a NaN weight) passed
    back as ``mem.detach()`` inside a compiled ``sample``-mode loop is a copy, as in eager
    mode: the graph's check that it holds the membrane's values took NaN for a changed
    value and raised "the membrane ... was computed from its last membrane out of
    place", where eager mode runs."""
    _assert_edited_loop_runs_like_eager(lambda mem, t: mem.detach() if t % 2 else mem,
                                        backend="aot_eager", nan=True)


def test_snntorch_membrane_copy_edited_inside_a_compiled_loop_runs_like_eager(
        same_random_stream):
    """An in-place edit of a copy that indexing makes (``mem[mem > 0.5].mul_(0.5)``:
    a boolean mask selects a copy) leaves the membrane as it is: it runs as in eager
    mode, not refused as an edit through a view."""
    _assert_edited_loop_runs_like_eager(_edited_through(lambda mem: mem[mem > 0.5]),
                                        backend="aot_eager")


_HANDOFFS = {
    "as it is": lambda mem, t: mem,
    "scaled": lambda mem, t: 0.5 * mem,
    "detached": lambda mem, t: mem.detach(),
    "cloned": lambda mem, t: mem.clone(),
    "changed in place": lambda mem, t: mem.mul_(0.5),
    "concatenated slices": lambda mem, t: torch.cat([0.5 * mem[:, :8], mem[:, 8:]], 1),
}


@pytest.mark.parametrize(("handoff", "backend"), [
    *((handoff, "aot_eager") for handoff in _HANDOFFS), ("as it is", "inductor"),
    ("scaled", "inductor")])
def test_snntorch_membrane_of_another_neuron_inside_a_compiled_loop_runs_like_eager(
        handoff, backend, same_random_stream):
    """An encoder neuron's last membrane passed as a decoder neuron's first one, inside a
    compiled ``sample``-mode loop (``HandoffLoop``): eager mode keeps a membrane's
    variance and emitted spikes with the neuron that stepped it, so the decoder starts a
    new membrane. The compiled step reset the decoder by the encoder's emitted spikes and
    kept the encoder's variance (another loss, silently), and refused ``0.5 * mem_enc``
    as an edit of the decoder's own membrane. Same loss and gradients as eager mode."""
    _assert_edited_loop_runs_like_eager(_HANDOFFS[handoff], backend=backend, net=HandoffLoop)


def test_snntorch_membrane_cut_to_fewer_examples_inside_a_compiled_loop_raises_like_eager():
    """Membranes cut to the first half of the batch inside a compiled ``sample``-mode loop
    (``mem = mem[:half]``, ``ShrinkingLoop``): eager mode refuses a membrane computed from
    the last one with a graph, while the compiled step took the slice for a new membrane
    and ran on (another loss), silently. The compiled step raises eager mode's error."""
    _assert_edited_loop_raises_like_eager(lambda mem, half: mem[:half], "aot_eager",
                                          net=ShrinkingLoop, match="out of place")


def test_snntorch_membrane_cut_and_detached_inside_a_compiled_loop_runs_like_eager(
        same_random_stream):
    """Membranes cut to the first half of the batch and detached (``mem[:half].detach()``)
    inside a compiled ``sample``-mode loop: a new membrane in both modes (reset by
    ``1[mem > threshold]``, variance 0); the same loss and gradients under one seed."""
    _assert_edited_loop_runs_like_eager(lambda mem, half: mem[:half].detach(),
                                        backend="aot_eager", net=ShrinkingLoop)


@pytest.mark.parametrize("feed", [lambda net, spk, mem: net.fc2(mem),
                                  lambda net, spk, mem: net.fc2(0.5 * mem)],
                         ids=["fc2(mem)", "fc2(0.5 * mem)"])
def test_snntorch_bayesian_layer_fed_by_a_membrane_raises_in_both_modes(feed):
    """A Bayesian layer fed by the first neuron's membrane in an explicit ``sample``-mode
    loop: eager mode refuses the membrane (a plain tensor whose noise variance the neuron
    keeps), a compiled step the variance the membrane carries; neither drops it."""
    torch.manual_seed(0)
    net = sbnn_snn.to_sbnn(MembraneFedLoop(feed))
    x = torch.rand(4, 6, 12) * 3
    with pytest.raises(sb.VarianceFlowError, match="the input of BayesLinear .*membrane"):
        net(x)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="^the input of BayesLinear .*posterior variance"):
        torch.compile(net, fullgraph=True, backend="aot_eager")(x)
    torch._dynamo.reset()


_NO_OP_CONVERSIONS = {
    "contiguous": lambda mem, t: mem.contiguous(),
    "to": lambda mem, t: mem.to(torch.float32),
    "float": lambda mem, t: mem.float(),
}


@pytest.mark.parametrize("conversion", list(_NO_OP_CONVERSIONS))
def test_snntorch_membrane_converted_to_itself_inside_a_compiled_loop_runs_like_eager(
        conversion, same_random_stream):
    """A conversion that returns the membrane itself (``mem.contiguous()``,
    ``mem.to(torch.float32)``, ``mem.float()`` of a float32 one: the same tensor) inside
    a compiled ``sample``-mode loop changes nothing, as in eager mode: it raised "the
    membrane ... was changed in place ('contiguous')", taken for an in-place edit
    because the operation returns its input."""
    _assert_edited_loop_runs_like_eager(_NO_OP_CONVERSIONS[conversion], backend="aot_eager")


class ChunkNet(LoopNet):
    """The explicit loop run in chunks (truncated BPTT): the membranes come in and go out."""

    def chunk(self, x, mem1, mem2):
        out = []
        for t in range(x.shape[0]):
            spk1, mem1 = self.lif1(self.fc1(x[t]), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            out.append(spk1)
        return torch.stack(out), mem1, mem2


def test_snntorch_explicit_loop_tbptt_chunks_compile_like_eager(same_random_stream):
    """Compiled chunks of an explicit loop, each given back the last membranes detached
    (``mem = mem.detach()``): a chunk's first reset is the spikes the membrane emitted, as
    in eager mode, not ``1[mem > threshold]``."""
    x = torch.rand(4, 32, 12) * 3
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        net = sbnn_snn.to_sbnn(ChunkNet())
        step = torch.compile(net.chunk, fullgraph=True) if compiled else net.chunk
        mem1, mem2 = net.lif1.init_leaky(), net.lif2.init_leaky()
        torch.manual_seed(1)
        spikes = []
        for part in x.split(2):
            spk, mem1, mem2 = step(part, mem1, mem2)
            spk.sum().backward()
            spikes.append(spk.detach())
            mem1, mem2 = mem1.detach(), mem2.detach()
        results.append((torch.cat(spikes), mem1.as_subclass(torch.Tensor)))
    (eager_spk, eager_mem), (comp_spk, comp_mem) = results
    assert torch.equal(comp_spk, eager_spk)
    torch.testing.assert_close(comp_mem, eager_mem)


def test_snntorch_explicit_loop_chunk_compiled_after_an_eager_chunk_keeps_the_variance(
        same_random_stream):
    """Truncated BPTT whose first chunk ran eagerly (a first batch, a debugging step) and the
    next compiled: the eager chunk returns a plain membrane whose noise variance the neuron
    keeps, and the compiled chunk, given ``mem.detach()``, restarted that variance from 0
    (it cannot tell a detached alias from a new membrane), silently. It takes the kept
    variance where the membrane has the kept one's values, as eager mode does."""
    x = torch.rand(4, 32, 12) * 3
    results = []
    for order in ("ee", "ec"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        net = sbnn_snn.to_sbnn(ChunkNet())
        compiled = torch.compile(net.chunk, fullgraph=True)
        mem1, mem2 = net.lif1.init_leaky(), net.lif2.init_leaky()
        torch.manual_seed(1)
        spikes = []
        for part, how in zip(x.split(2), order):
            spk, mem1, mem2 = (net.chunk if how == "e" else compiled)(part, mem1, mem2)
            spikes.append(spk.detach())
            mem1, mem2 = mem1.detach(), mem2.detach()
        var = sb.get_variance(mem1)
        var = sbnn_snn.membrane_variance(net.lif1) if var is None else var
        results.append((torch.cat(spikes), var.detach().expand(32, 16)))
    (eager_spk, eager_var), (mixed_spk, mixed_var) = results
    assert torch.equal(mixed_spk, eager_spk)
    torch.testing.assert_close(mixed_var, eager_var)


def test_snntorch_learned_initial_membrane_trains_in_compiled_chunks_like_eager(
        same_random_stream):
    """Each compiled chunk starts from a learned initial membrane (``h0(x[0])``, a plain
    tensor with a graph, not the membrane the neuron kept): the second call failed in its
    backward with "Trying to backward through the graph a second time", as the graph
    compared it with the kept membrane and took the kept variance (the first call's graph,
    freed) where the values matched. It is a new membrane, as in eager mode: the same
    losses and gradients."""
    x = torch.rand(2, 2, 32, 12) * 3
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        net, h0 = sbnn_snn.to_sbnn(ChunkNet()), nn.Linear(12, 16)
        step = torch.compile(net.chunk, fullgraph=True, backend="aot_eager") if compiled \
            else net.chunk
        torch.manual_seed(1)
        for part in x:
            net.zero_grad()
            spk, _, mem2 = step(part, h0(part[0]), net.lif2.init_leaky())
            (spk.sum() + mem2.sum()).backward()
            results.append([spk.detach()] + [  # (compiled: zeros where eager has None)
                torch.zeros_like(p) if p.grad is None else p.grad.clone()
                for p in net.parameters()])
    for eager, comp in zip(results[:2], results[2:]):
        for a, b in zip(eager, comp):
            torch.testing.assert_close(b, a)


def test_snntorch_membrane_copied_with_a_graph_into_a_compiled_chunk_is_refused(
        same_random_stream):
    """``mem.clone()`` of an eager chunk's membrane (with its graph) passed to a compiled
    chunk: the compiled step cannot follow the kept variance's graph into the earlier
    call, and would lose its gradient: it raises, naming the fix."""
    torch.manual_seed(0)
    net = sbnn_snn.to_sbnn(ChunkNet())
    x = torch.rand(4, 32, 12) * 3
    _, mem1, mem2 = net.chunk(x[:2], net.lif1.init_leaky(), net.lif2.init_leaky())
    step = torch.compile(net.chunk, fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match=r"copy with a graph \(e\.g\. mem\.clone\(\)\)"):
        step(x[2:], mem1.clone(), mem2)


_EDITS_BETWEEN_CHUNKS = {
    "in place through a detached alias": lambda mem: mem.detach().mul_(0.5),
    "out of place": lambda mem: 0.5 * mem,
}


@pytest.mark.parametrize("edit", list(_EDITS_BETWEEN_CHUNKS))
def test_snntorch_membrane_edited_between_compiled_chunks_raises_like_eager(edit):
    """A membrane that a compiled chunk returned, edited before the next compiled chunk
    (eager code between two calls) after a backward: eager mode raises. In place through a
    detached alias (``mem.detach().mul_(0.5)``) the next chunk ran on silently (the
    reset by the kept membrane's values, the variance scaled); out of place
    (``0.5 * mem``) its backward failed with "Trying to backward through the graph a
    second time". Both raise eager mode's error now, naming the fix."""
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        net = sbnn_snn.to_sbnn(ChunkNet())
        step = torch.compile(net.chunk, fullgraph=True, backend="aot_eager") if compiled \
            else net.chunk
        x = torch.rand(4, 32, 12) * 3
        spk, mem1, mem2 = step(x[:2], net.lif1.init_leaky(), net.lif2.init_leaky())
        spk.sum().backward()
        with pytest.raises(RuntimeError, match="^the membrane (of|passed to) this SBNNLeaky"):
            spk, _, _ = step(x[2:], _EDITS_BETWEEN_CHUNKS[edit](mem1), mem2.detach())
            spk.sum().backward()


def test_a_membrane_returned_by_a_compiled_chunk_pickles_with_its_variance(tmp_path):
    """``pickle`` and ``torch.save`` of the membrane a compiled chunk returned (a
    checkpoint of the state mid-sequence): it carries the compiled step's marks, which
    name the neuron that stepped it, and pickling took the model along and loaded a
    ``VarianceTensor`` without its variance (any operation on it then failed with
    "'VarianceTensor' object has no attribute 'variance'"). The marks stay behind; the
    values and the variance round-trip."""
    torch.manual_seed(0)
    net = sbnn_snn.to_sbnn(ChunkNet())
    step = torch.compile(net.chunk, fullgraph=True, backend="aot_eager")
    _, mem1, _ = step(torch.rand(2, 32, 12) * 3, net.lif1.init_leaky(), net.lif2.init_leaky())
    assert getattr(mem1, "emitter", None) is net.lif1  # (what the round trips leave out)
    path = tmp_path / "mem.pt"
    torch.save(mem1, path)
    for loaded in (pickle.loads(pickle.dumps(mem1)), torch.load(path, weights_only=False)):
        assert type(loaded) is VarianceTensor
        assert set(vars(loaded)) <= {"variance", "probe", "noise"}
        torch.testing.assert_close(loaded.as_subclass(torch.Tensor),
                                   mem1.detach().as_subclass(torch.Tensor))
        torch.testing.assert_close(sb.get_variance(loaded), sb.get_variance(mem1).detach())


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("between", ["nothing", "v.detach()"])
def test_spikingjelly_membrane_set_by_the_user_in_compiled_steps_is_a_new_membrane(
        same_random_stream, step_mode, between):
    """A compiled step that sets ``node.v = h0(x[0])`` (a learned initial membrane)
    instead of calling ``functional.reset_net`` (the neuron is the model's only state),
    called three times with a backward each: the second call's backward failed through
    the first call's freed variance graph (and, after a detach, the new sequence drew
    with the last one's variance, silently). It is a new membrane: the losses and
    gradients of eager steps that reset first. A detach set back by hand between the
    calls (``node.v = node.v.detach()``) changes nothing there."""
    from spikingjelly.activation_based import functional

    x = torch.rand(3, 3, 6, 12) * 3
    y = torch.randint(0, 5, (3, 6))
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        net, h0 = initial_membrane_net(step_mode)

        def step(x, y, net=net, h0=h0, compiled=compiled):
            if not compiled:
                functional.reset_net(net)
            net[1].v = h0(x[0])
            return F.cross_entropy(run_steps(net, x, step_mode).sum(0), y)

        if compiled:
            step = torch.compile(step, fullgraph=True, backend="aot_eager")
        runs.append([])
        for i in range(len(x)):
            net.zero_grad()
            h0.zero_grad()
            torch.manual_seed(i)
            loss = step(x[i], y[i])
            loss.backward()
            runs[-1].append([loss.detach()] + [p.grad.clone() for p in
                                               [*net.parameters(), *h0.parameters()]])
            if between == "v.detach()":
                net[1].v = net[1].v.detach()
    for want, got in zip(*runs):
        for a, b in zip(want, got):
            torch.testing.assert_close(b, a)


def _sj_chunks_from_a_reset(net: nn.Module, step_mode: str, compiled: bool):
    """``functional.reset_net(net)``, then a function that runs a chunk of the sequence
    through ``net`` in its step mode (compiled: ``fullgraph``, ``aot_eager``)."""
    from spikingjelly.activation_based import functional

    def chunk(x):
        return run_steps(net, x, step_mode)

    functional.reset_net(net)
    return torch.compile(chunk, fullgraph=True, backend="aot_eager") if compiled else chunk


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_spikingjelly_membrane_detached_by_hand_between_compiled_chunks_keeps_its_variance(
        same_random_stream, step_mode):
    """``node.v = node.v.detach()`` between two compiled chunks of one sequence
    (truncated BPTT by hand): the second chunk goes on with the kept variance, without
    its graph, as after ``functional.detach_net`` (eager chunks; its backward failed
    through the first chunk's freed graph)."""
    from spikingjelly.activation_based import functional

    x = torch.rand(4, 6, 12) * 3
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        net, _ = initial_membrane_net(step_mode)
        chunk = _sj_chunks_from_a_reset(net, step_mode, compiled)
        torch.manual_seed(0)
        runs.append([])
        for part in (x[:2], x[2:]):
            net.zero_grad()
            out = chunk(part)
            out.sum().backward()
            runs[-1].append([out.detach()] + [p.grad.clone() for p in net.parameters()])
            if compiled:
                net[1].v = net[1].v.detach()
            else:
                functional.detach_net(net)
        assert net[1].sbnn_var is not None
    for want, got in zip(*runs):
        for a, b in zip(want, got):
            torch.testing.assert_close(b, a)


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_spikingjelly_compiled_chunks_of_one_sequence_keep_the_variance(same_random_stream,
                                                                       step_mode):
    """Two compiled chunks of one sequence, one backward through both (no detach): the
    membrane a compiled call leaves is the one its variance belongs to (the memory
    ``sbnn_v`` is that very tensor), so the second chunk goes on with the variance, as in
    eager mode (had the graph returned two tensors, the second chunk would have taken the
    membrane for a user's new one and dropped the variance, silently)."""
    from spikingjelly.activation_based import functional, layer, neuron

    x = torch.rand(4, 6, 12) * 3
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        host = nn.Sequential(layer.Linear(12, 16), neuron.LIFNode(tau=2.0),
                             layer.Linear(16, 5), neuron.LIFNode(tau=2.0))
        with torch.no_grad():
            host[0].weight.mul_(3.0)
            host[2].weight.mul_(3.0)
        functional.set_step_mode(host, step_mode)
        net = sbnn_sj.to_sbnn(host)
        chunk = _sj_chunks_from_a_reset(net, step_mode, compiled)
        torch.manual_seed(1)
        first = chunk(x[:2])
        assert all(net[i].v is net[i].sbnn_v for i in (1, 3))
        second = chunk(x[2:])
        (first.sum() + second.sum()).backward()
        runs.append([first.detach(), second.detach()] + [p.grad.clone()
                                                         for p in net.parameters()])
    for want, got in zip(*runs):
        torch.testing.assert_close(got, want)


def test_snntorch_init_hidden_membrane_replaced_by_a_detach_keeps_its_variance_compiled(
        same_random_stream):
    """Truncated BPTT with ``init_hidden`` neurons that detaches by replacing the buffer
    (``lif.mem = lif.mem.detach()``) between compiled chunks: the compiled step took the
    detached membrane for a new one and restarted its noise variance from 0 (eager mode
    keeps it). It takes the kept variance where the membrane has the kept one's values."""
    x = torch.rand(4, 32, 12) * 3
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        net = sbnn_snn.to_sbnn(nn.Sequential(
            nn.Linear(12, 16), snn.Leaky(beta=0.9, init_hidden=True),
            nn.Linear(16, 5), snn.Leaky(beta=0.9, init_hidden=True, output=True)))

        def chunk(xs, net=net):
            return torch.stack([net(xs[t])[0] for t in range(xs.shape[0])])

        step = torch.compile(chunk, fullgraph=True) if compiled else chunk
        sutils.reset(net)
        torch.manual_seed(1)
        spikes = []
        for part in x.split(2):
            spk = step(part)
            spk.sum().backward()
            spikes.append(spk.detach())
            for lif in (net[1], net[3]):
                lif.mem = lif.mem.detach()
        results.append((torch.cat(spikes),
                        sbnn_snn.membrane_variance(net[1]).detach().expand(32, 16)))
    (eager_spk, eager_var), (comp_spk, comp_var) = results
    assert torch.equal(comp_spk, eager_spk)
    torch.testing.assert_close(comp_var, eager_var)


def test_init_hidden_membrane_rescaled_between_compiled_steps_is_named():
    """``lif.mem = 0.5 * lif.mem`` between compiled steps of an ``init_hidden`` neuron:
    eager mode refuses the edited membrane at the next step (its noise variance is
    unknown); a compiled step took it for a new membrane and restarted its variance from
    0, silently. It raises eager mode's message. A membrane edited without a graph
    (``lif.mem.detach()``) is a new one, and a reset after the edit starts a new
    sequence, in both."""
    torch.manual_seed(0)
    model = sbnn_snn.to_sbnn(nn.Sequential(
        nn.Linear(4, 5), snn.Leaky(beta=0.9, init_hidden=True), nn.Linear(5, 2)))
    lif, x = model[1], torch.rand(3, 4) * 2
    message = ("the membrane passed to this SBNNLeaky was computed from its last membrane "
               "out of place (e.g. mem = 0.5 * mem")
    torch._dynamo.reset()
    try:
        for step in (model, torch.compile(lambda a: model(a), fullgraph=True,
                                          backend="aot_eager")):
            sutils.reset(model)
            step(x)
            step(x)
            lif.mem = 0.5 * lif.mem
            with pytest.raises((VarianceFlowError, RuntimeError)) as err:
                step(x)
            assert str(err.value).startswith(message)
            sutils.reset(model)  # a new sequence after the edit
            step(x)
            lif.mem = 0.5 * lif.mem.detach()  # without a graph: a new membrane
            step(x)
    finally:
        torch._dynamo.reset()


def test_nan_membrane_passed_to_a_compiled_method_of_a_converted_model_is_named():
    """A NaN membrane passed back into a compiled chunk (``torch.compile(net.chunk)``, a
    method of the converted model other than its call): eager mode's spike function
    refuses it; compiled, the spike function took the chunk's ``self`` (the converted
    model) for a checked model call and skipped its check, and the chunk ran on, with no
    spikes and NaN membranes, silently. Only a call of the model checks its input."""
    torch.manual_seed(0)
    net = sbnn_snn.to_sbnn(ChunkNet())
    x = torch.rand(2, 4, 12) * 3
    mem1, mem2 = torch.full((4, 16), math.nan), net.lif2.init_leaky()
    with pytest.raises(ValueError, match="contains NaN values"):
        net.chunk(x, mem1, mem2)
    torch._dynamo.reset()
    step = torch.compile(net.chunk, fullgraph=True)
    with pytest.raises(RuntimeError, match="contains NaN values"):
        step(x, mem1, mem2)
    spk, mem1, _ = step(x, net.lif1.init_leaky(), mem2)  # a finite membrane runs
    assert torch.isfinite(mem1).all()


def _spike_checks_in_graph(step, *args) -> int:
    """The NaN checks of spike functions (``_assert_async`` naming one) in the graphs
    ``torch.compile`` builds for ``step(*args)``."""
    found = []

    def backend(gm, example_inputs):
        found.extend(node for node in gm.graph.nodes
                     if node.target is torch._assert_async and len(node.args) > 1
                     and "input of the spike function" in str(node.args[1]))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(step, backend=backend)(*args)
    return len(found)


def test_compiled_converted_model_checks_its_input_once():
    """``torch.compile(net)`` traces ``net.forward`` first, its call (whose pre-hook checks
    the input) left to Python: the spike functions took it for a method call of the
    model (``net.chunk``) and added a NaN check of their drive at every step, each a
    reduction in the graph, on top of the model's own. ``torch.compile(net.forward)``
    runs no hook: there the spike functions check."""
    net = sbnn_snn.to_sbnn(ChunkNet())
    x = torch.rand(T, 4, 12)
    assert _spike_checks_in_graph(net, x) == 0
    assert _spike_checks_in_graph(lambda a: net(a), x) == 0
    assert _spike_checks_in_graph(net.forward, x) > 0
    mems = (net.lif1.init_leaky(), net.lif2.init_leaky())
    assert _spike_checks_in_graph(net.chunk, x, *mems) > 0


def test_snntorch_rleaky_compiled_step_after_an_eager_step(same_random_stream):
    """An init_hidden RLeaky's spike buffer after an eager step is a plain tensor (a graph
    input: AOTAutograd rejects the eager spikes' subclass), and the compiled step that
    follows matches an eager one."""
    x = torch.rand(2, 4, 6) * 2
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        net = sbnn_snn.to_sbnn(nn.Sequential(
            nn.Linear(6, 5), snn.RLeaky(beta=0.9, linear_features=5, init_hidden=True)))
        sutils.reset(net)
        assert type(net(x[0])) is not torch.Tensor  # eager: marked spikes
        step = torch.compile(net, fullgraph=True) if compiled else net
        spk = step(x[1])
        spk.sum().backward()
        results.append((spk.detach(), net[1].mem.detach().clone()))
    assert torch.equal(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_spikingjelly_compiles_like_eager(same_random_stream, step_mode):
    from spikingjelly.activation_based import functional, layer, neuron, surrogate

    torch.manual_seed(0)
    host = nn.Sequential(
        layer.Conv2d(1, 4, 3, padding=1), layer.MaxPool2d(2),
        neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan()),
        layer.Flatten(), layer.Linear(4 * 4 * 4, 5),
        neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan()),
    )
    functional.set_step_mode(host, step_mode)
    net = sbnn_sj.to_sbnn(host)

    def loss_fn(x, y):
        functional.reset_net(net)
        if step_mode == "m":
            out = net(x).sum(0)
        else:
            out = sum(net(x[t]) for t in range(x.shape[0]))
        return F.cross_entropy(out, y)

    x, y = torch.rand(T, 6, 1, 8, 8) * 3, torch.randint(0, 5, (6,))
    _check_like_eager(net, loss_fn, x, y)


def _snntorch_conv_sequential() -> nn.Module:
    return sbnn_snn.to_sbnn(nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2),
        snn.Leaky(beta=0.9, init_hidden=True),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 5),
        snn.Leaky(beta=0.9, init_hidden=True, output=True)))


def _spikingjelly_multi_step() -> nn.Module:
    from spikingjelly.activation_based import functional, layer, neuron

    host = nn.Sequential(layer.Linear(12, 16), neuron.LIFNode(tau=2.0),
                         layer.Linear(16, 5), neuron.LIFNode(tau=2.0))
    functional.set_step_mode(host, "m")
    return sbnn_sj.to_sbnn(host)


@needs_kernel
@pytest.mark.parametrize("name", ["core", "snntorch", "spikingjelly"])
def test_kernel_op_in_a_compiled_network_draws_eagers_spikes(name):
    """With the kernel on (the default CPU path) and inductor's own scheduling, a compiled
    training step of a network gets eager mode's very spikes under the same seed: each
    call of the spike operator draws its Philox key from the global generator, and the
    calls run in eager mode's order (inductor would otherwise run one layer's calls of
    every time step before the next layer's, and each would get another call's key).
    Where a C++ compiler is found, the operator's C++ kernel serves these calls (installed
    while the graph is traced)."""
    if not sb.kernels.available():
        pytest.skip("no C compiler on this machine")
    from spikingjelly.activation_based import functional

    torch._dynamo.reset()
    gc.collect()
    torch.manual_seed(0)
    if name == "core":
        net = CoreNet()
        x = torch.rand(3, 6, 12) * 2

        def loss_fn(x, y):
            return F.cross_entropy(net(x), y)
    elif name == "snntorch":
        net = _snntorch_conv_sequential()
        x = torch.rand(3, 6, 1, 8, 8) * 3
        loss_fn = _sequential_rate_loss(net)
    else:
        net = _spikingjelly_multi_step()
        x = torch.rand(3, 6, 12) * 3

        def loss_fn(x, y):
            functional.reset_net(net)
            return F.cross_entropy(net(x).sum(0), y)
    y = torch.randint(0, 5, (6,))
    _check_like_eager(net, loss_fn, x, y)
    if shutil.which("c++") or shutil.which("g++"):
        assert sb.kernels._operator == "cpp", sb.kernels._operator_error


def test_compiled_draw_has_the_law_of_the_method():
    """With inductor's own random numbers the compiled spike still fires with
    P = Phi(u / sigma), and its expected ST gradient is phi(z) / sigma."""
    torch._dynamo.reset()
    spike = sb.IWSTSpike("st", std=None)
    u = torch.tensor([-1.0, -0.3, 0.0, 0.4, 1.2]).repeat_interleave(20000)
    var = torch.full_like(u, 0.49)

    def draw(u):
        return spike(sb.attach_variance(u, var))

    leaf = u.clone().requires_grad_(True)
    h = torch.compile(draw, fullgraph=True)(leaf)
    h.sum().backward()
    freq = h.detach().view(5, -1).mean(1)
    p = torch.special.ndtr(u.view(5, -1)[:, 0] / 0.7)
    assert (freq - p).abs().max() < 4 * (0.25 / 20000) ** 0.5
    z = u / 0.7
    torch.testing.assert_close(leaf.grad, torch.exp(-0.5 * z * z) / (2 * torch.pi) ** 0.5 / 0.7)


def test_variance_survives_copies():
    x = sb.attach_variance(torch.randn(3, 4), torch.rand(3, 4))
    for dup in (copy.deepcopy(x), pickle.loads(pickle.dumps(x))):
        assert type(dup) is VarianceTensor
        assert torch.equal(dup, x) and torch.equal(dup.variance, x.variance)


@needs_kernel
def test_kernel_op_in_a_compiled_graph_matches_the_eager_kernel():
    """With the kernel on, a compiled graph calls it as a custom op
    (``sbnn_addons::spike_forward``; the backward is its formulas in PyTorch operations):
    one spike call gives the eager kernel's spikes (same Philox key from the global RNG)
    and gradients."""
    if not sb.kernels.available():
        pytest.skip("no C compiler on this machine")
    torch._dynamo.reset()
    torch.manual_seed(0)
    fc = sb.BayesLinear(20, 30, std=0.3)
    spike = sb.IWSTSpike("agr", std=0.2, learn_std=True)
    x = torch.rand(8, 20)

    def f(x):
        return spike(fc(x) - 1.0)

    grads = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        fc.zero_grad()
        spike.zero_grad()
        torch.manual_seed(3)
        h = fn(x)
        (h * torch.arange(30.0)).sum().backward()
        grads.append((h.detach(), fc.weight.grad.clone(), fc.std_rho.grad.clone(),
                      spike.std_rho.grad.clone()))
    assert grads[0][0].sum() > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@needs_kernel
def test_a_compiled_multi_step_model_keeps_the_kernels_spikes_as_bytes():
    """For the backward, a compiled graph of a converted multi-step SpikingJelly model keeps
    the kernel op's spikes of every step as bytes (a quarter of float32's memory); whether
    it also keeps the float spikes the next layer's weight gradient reads, or rebuilds them
    from the bytes, is the partitioner's choice."""
    from spikingjelly.activation_based import functional, layer, neuron

    if not sb.kernels.available():
        pytest.skip("no C compiler on this machine")
    torch._dynamo.reset()
    gc.collect()
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(20, 30), neuron.LIFNode(), layer.Linear(30, 4))
    functional.set_step_mode(net, "m")
    net = sbnn_sj.to_sbnn(net)
    x = torch.rand(3, 8, 20)

    def loss_fn(x):
        return net(x).square().sum()

    step = torch.compile(loss_fn, fullgraph=True)
    functional.reset_net(net)
    step(x).backward()  # compiled
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    functional.reset_net(net)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step(x)
    loss.backward()
    assert saved.count(((8, 30), torch.uint8)) == 3, str(saved)


@needs_kernel
@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_kernel_op_with_the_auxiliary_pull_compiles_like_eager(backend):
    """A converted snnTorch model with the converters' default ``aux_pull`` (and the
    auxiliary loss) and the kernel on: the compiled step's spike op adds the pull inside
    its own backward, the eager kernel in C; same spikes (one Philox key from the global
    RNG), loss and gradients. The pull changes the gradients, so a compiled step that
    dropped or doubled it would differ."""
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    net = sbnn_snn.to_sbnn(nn.Sequential(
        nn.Linear(16, 20), snn.Leaky(beta=0.9, init_hidden=True),
        nn.Linear(20, 5), snn.Leaky(beta=0.9, init_hidden=True, output=True)), aux_loss=True)
    spikes = [m for m in net.modules() if isinstance(m, sb.IWSTSpike)]
    assert spikes and all(m.aux_pull > 0 for m in spikes)
    x, y = torch.rand(T, 6, 16) * 2, torch.randint(0, 5, (6,))

    def loss_fn(x, y):
        sutils.reset(net)
        out = sum(spk + 0.1 * mem for spk, mem in (net(x[t]) for t in range(x.shape[0])))
        return F.cross_entropy(out, y) + 0.1 * sb.aux_loss(net)

    old = inductor_config.fallback_random
    inductor_config.fallback_random = True  # the layers' weight noise as in eager
    gc.collect()
    torch._dynamo.reset()
    try:
        with sb.kernels.use_kernels(True):
            eager = _step(net, loss_fn, x, y)
            compiled = _step(net, torch.compile(loss_fn, fullgraph=True, backend=backend), x, y)
            for m in spikes:
                m.aux_pull = 0.0
            unpulled = _step(net, loss_fn, x, y)
    finally:
        inductor_config.fallback_random = old
        torch._dynamo.reset()
    torch.testing.assert_close(compiled[0], eager[0])
    for a, b in zip(eager[1], compiled[1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert not all(torch.allclose(a, b, rtol=1e-3, atol=1e-5)
                   for a, b in zip(eager[1], unpulled[1]))


def test_drop_in_spike_functions_compile():
    """The drop-in spike functions in unconverted host models, fullgraph: snnTorch's second
    call (the reset) still gets the emitted spike; gradients reach the weights and the
    spike function's own std."""
    from spikingjelly.activation_based import functional, layer, neuron

    torch._dynamo.reset()
    torch.manual_seed(0)
    snn_net = nn.Sequential(
        nn.Linear(12, 16), snn.Leaky(beta=0.9, init_hidden=True, spike_grad=sbnn_snn.spike_grad()),
        nn.Linear(16, 5),
        snn.Leaky(beta=0.9, init_hidden=True, output=True, spike_grad=sbnn_snn.spike_grad()),
    )
    sj_net = nn.Sequential(
        layer.Linear(12, 16), neuron.LIFNode(surrogate_function=sbnn_sj.surrogate_function()),
        layer.Linear(16, 5), neuron.LIFNode(surrogate_function=sbnn_sj.surrogate_function()),
    )
    x = torch.rand(T, 6, 12) * 3
    sutils.reset(snn_net)  # once eagerly: snnTorch's reset defines its module globals

    def snn_loss(x):
        sutils.reset(snn_net)
        return sum(snn_net(x[t])[0] for t in range(x.shape[0])).sum()

    def sj_loss(x):
        functional.reset_net(sj_net)
        return sum(sj_net(x[t]) for t in range(x.shape[0])).sum()

    for net, loss_fn in ((snn_net, snn_loss), (sj_net, sj_loss)):
        loss = torch.compile(loss_fn, fullgraph=True)(x)
        loss.backward()
        assert net[0].weight.grad.abs().sum() > 0
        spike = next(m for m in net.modules() if isinstance(m, sb.IWSTSpike))
        assert spike.std_rho.grad is not None and spike.std_rho.grad.abs() > 0


@pytest.mark.parametrize("name", ["dvs", "shd", "cifar"])
def test_reference_networks_compile_like_eager(same_random_stream, name):
    """The paper's reference networks (small widths), sample mode, fullgraph."""
    from test_models import cifar_input, dvs_input, shd_input, tiny_cifar, tiny_dvs, tiny_shd

    make, inp = {"dvs": (tiny_dvs, dvs_input), "shd": (tiny_shd, shd_input),
                 "cifar": (tiny_cifar, cifar_input)}[name]
    torch.manual_seed(0)
    net, x = make(), inp()

    def loss_fn(x, y):
        return F.cross_entropy(net(x), y)

    y = torch.zeros(net(x).shape[0], dtype=torch.long)
    eager = _step(net, loss_fn, x, y)
    compiled = _step(net, torch.compile(loss_fn, fullgraph=True), x, y)
    assert torch.equal(eager[0], compiled[0])
    for a, b in zip(eager[1], compiled[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------- compile usability (guards)
def test_share_posterior_inside_a_compiled_step():
    """share_posterior may sit inside the compiled function (the graph computes s^2 once
    anyway)."""
    torch.manual_seed(0)
    layer, lif = sb.BayesLinear(6, 5, std=0.3), sb.LIF()

    def loss_fn(x):
        state, out = None, 0
        with sb.share_posterior():
            for t in range(x.shape[0]):
                h, state = lif(layer(x[t]), state)
                out = out + h
        return out.sum()

    torch._dynamo.reset()
    torch.compile(loss_fn, fullgraph=True)(torch.rand(3, 4, 6)).backward()
    assert layer.std_rho.grad is not None


def test_eager_ops_on_noisy_tensors_do_not_recompile_a_converted_model():
    """Eager operations on variance-carrying tensors between compiled steps (inspecting
    an activation) do not grow anything a graph guards on: no recompiles."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    net = sbnn_snn.to_sbnn(nn.Sequential(
        nn.Linear(10, 12), snn.Leaky(beta=0.9, init_hidden=True),
        nn.Linear(12, 5), snn.Leaky(beta=0.9, init_hidden=True, output=True)))
    sutils.reset(net)
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(_sequential_rate_loss(net), fullgraph=True)
    x, y = torch.rand(3, 4, 10) * 2, torch.randint(0, 5, (4,))
    step(x, y).backward()
    sutils.reset(net)
    step(x, y).backward()
    frames = counters["stats"]["unique_graphs"]
    for op in (torch.sigmoid, torch.exp, torch.sin):
        with torch.no_grad():
            op(net[0](x[0]))  # an eager look at a noisy current, with a new operation
        sutils.reset(net)  # each call from the same (reset) state, as the first
        step(x, y).backward()
    assert counters["stats"]["unique_graphs"] == frames


def test_seeded_spikes_raise_a_named_error_under_compile_and_mc_predict_restores_seeds():
    net = nn.Sequential(sb.BayesLinear(4, 3, std=0.3), sb.LIF())
    x = torch.rand(2, 4)
    sb.mc_predict(net, x[None].expand(2, 2, 4), 2, seed=3,
                  forward=lambda m, s: torch.stack([m(t)[0] for t in s]).mean(0))
    assert net[1].spike_fn._seed is None  # the model's own stream, as before the call
    sb.seed_spikes(net, 1)
    torch._dynamo.reset()
    step = torch.compile(lambda v: net(v)[0].sum(), fullgraph=True)
    with pytest.raises(RuntimeError, match="seed_spikes\\(model, None\\)") as err:
        step(x)
    assert str(err.value).startswith("this spike function is seeded")  # not Dynamo's
    sb.seed_spikes(net, None)
    step(x)


def test_seeded_spikes_draw_eagerly_under_a_compile_that_may_break_the_graph():
    """Without ``fullgraph=True`` a seeded spike function draws between graphs, from its
    private generator: the compiled model (a converted snnTorch Conv2d -> Leaky, a core
    LIF, which calls ``fire`` directly) gives eager's spikes and gradients for each seed.
    (Its graph break came after the drive was made a plain alias of the carrier: the
    first compiled call failed in AOTAutograd with "Multiple dispatch failed for
    aten.detach".)"""
    torch.manual_seed(0)
    snn_net = sbnn_snn.to_sbnn(nn.Sequential(
        nn.Conv2d(1, 2, 3), snn.Leaky(beta=0.9, init_hidden=True, output=True)))
    core = nn.Sequential(sb.BayesLinear(36, 4, std=0.3), sb.LIF())
    x = torch.rand(2, 1, 6, 6) * 2
    for net, run in ((snn_net, lambda m: m(x)[0]), (core, lambda m: m(x.flatten(1))[0])):
        torch._dynamo.reset()
        compiled = torch.compile(net)
        for seed in (1, 2):
            results = []
            for model in (net, compiled):
                sb.seed_spikes(net, seed)
                sutils.reset(net)
                net.zero_grad()
                out = run(model)
                out.sum().backward()
                results.append((out.detach(), net[0].weight.grad.clone()))
            (eager, eager_grad), (comp, comp_grad) = results
            assert torch.equal(comp, eager), seed
            torch.testing.assert_close(comp_grad, eager_grad)
    sb.seed_spikes(core, 1)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="without fullgraph=True"):
        torch.compile(core, fullgraph=True)(x.flatten(1))


class _GraphBreak(nn.Module):
    """A user module Dynamo does not trace through (e.g. a print() of an activation)."""

    def forward(self, x):
        torch._dynamo.graph_break()
        return x


def test_spikingjelly_model_with_a_graph_break_compiles_and_seeded_spikes_draw_eagerly():
    """A converted SpikingJelly model that Dynamo splits into several graphs (a graph break
    in a user module of the Sequential; seeded spikes) runs as in eager mode: the
    neuron's pre-hook, then compiled on its own, returned an alias of its carrier input
    and the first call failed with "Multiple dispatch failed for aten.detach"."""
    from spikingjelly.activation_based import functional, layer, neuron

    torch.manual_seed(0)
    host = nn.Sequential(layer.Linear(6, 4), _GraphBreak(), neuron.LIFNode())
    host[0].weight.data.abs_()
    net = sbnn_sj.to_sbnn(host)
    seeded = nn.Sequential(layer.Linear(6, 4), neuron.LIFNode())
    functional.set_step_mode(seeded, "m")
    seeded = sbnn_sj.to_sbnn(seeded)
    x = torch.rand(3, 2, 6) * 8
    gc.collect()
    torch._dynamo.reset()
    with sb.mode(net, "mean"):
        functional.reset_net(net)
        eager = net(x[0])
        functional.reset_net(net)
        assert torch.equal(torch.compile(net)(x[0]), eager) and eager.sum() > 0
    compiled = torch.compile(seeded)
    for seed in (1, 2):
        results = []
        for model in (seeded, compiled):
            sb.seed_spikes(seeded, seed)
            functional.reset_net(seeded)
            results.append(model(x).detach())
        assert torch.equal(results[1], results[0]), seed


def test_unused_aux_terms_raise_under_compile_as_in_eager():
    """Auxiliary terms never consumed by aux_loss and held across an optimiser step raise
    the same named error in a compiled step as in eager mode (they piled up, with their
    graphs, at every compiled call), and are dropped; used, they raise nothing."""
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        net = sb.enable_aux_loss(nn.Sequential(sb.BayesLinear(4, 3, std=0.3), sb.LIF()))
        opt = torch.optim.SGD(net.parameters(), lr=0.01)

        def loss_fn(x, use_aux, net=net):
            loss = net(x)[0].sum()
            return loss + sb.aux_loss(net) if use_aux else loss

        step = torch.compile(loss_fn, fullgraph=True) if compiled else loss_fn
        x = torch.rand(5, 4) * 2
        for use_aux in (True, True, False):
            opt.zero_grad()
            step(x, use_aux).backward()
            opt.step()
        with pytest.raises(RuntimeError, match=r"never used: add sbnn_addons\.aux_loss\(model\)"):
            step(x, False)
        assert not net[1].spike_fn._aux_terms, compiled
        step(x, True).backward()


def test_mc_predict_with_spike_counts_on_a_fullgraph_compiled_model():
    from spikingjelly.activation_based import functional, layer, neuron

    torch.manual_seed(0)
    host = nn.Sequential(layer.Linear(10, 12), neuron.LIFNode(), layer.Linear(12, 5),
                         neuron.LIFNode())
    functional.set_step_mode(host, "m")
    net = sbnn_sj.to_sbnn(host).eval()
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True)
    x = (torch.rand(3, 4, 10) < 0.5).float()
    pred = sb.mc_predict(compiled, x, 2, forward=lambda m, v: m(v).mean(0))
    eager = sb.mc_predict(net, x, 2, forward=lambda m, v: m(v).mean(0))
    assert pred.probs.shape == (4, 5) and pred.synops.shape == (2,)
    assert (pred.synops > 0).all() and (eager.synops > 0).all()


def test_truncated_bptt_with_detach_hidden_after_compiled_steps():
    """snnTorch's TBPTT idiom for init_hidden models (the neuron classes'
    detach_hidden(), an in-place detach of the membrane buffers) works after a compiled
    step, and the noise variance carries over, as in eager mode."""
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        net = sbnn_snn.to_sbnn(nn.Sequential(
            nn.Linear(10, 6), snn.Leaky(beta=0.9, init_hidden=True, output=True)))
        sutils.reset(net)

        def run(x, net=net):
            for t in range(x.shape[0]):
                spk, _ = net(x[t])
            return spk

        step = torch.compile(run, fullgraph=True) if compiled else run
        x = torch.rand(3, 4, 10) * 2
        variances = []
        with sb.kernels.use_kernels(False):
            for _ in range(2):
                step(x).sum().backward()
                net[1].detach_hidden()  # in place
                variances.append(sbnn_snn.membrane_variance(net[1]).detach().clone())
        results.append(variances)
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager)


def test_one_compiled_step_serves_many_converted_models():
    """A compiled step reused across freshly converted models (a sweep, a notebook)
    compiles once, as for the host models: nothing per model is guarded on."""
    from spikingjelly.activation_based import functional, layer, neuron
    from torch._dynamo.utils import counters

    def make():
        host = nn.Sequential(layer.Linear(10, 12), neuron.LIFNode(), layer.Linear(12, 5),
                             neuron.LIFNode())
        functional.set_step_mode(host, "m")
        return sbnn_sj.to_sbnn(host)

    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(lambda net, x: net(x).sum(0), fullgraph=True)
    x = torch.rand(3, 4, 10) * 3
    for _ in range(3):
        net = make()
        functional.reset_net(net)
        step(net, x).sum().backward()
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("name,kernel", [("core", False), ("snntorch", True),
                                         ("spikingjelly", True)])
def test_dynamic_shapes_compile(name, kernel):
    """``torch.compile(dynamic=True)``: neurons that step several times in one graph (the
    spike's backward traced with symbolic shapes), the auxiliary loss inside the step, two
    batch sizes, the kernel's custom ops and the PyTorch path; with the kernel, ``mean``
    mode equals eager. (Linear layers: a plain ``nn.Conv2d`` model fails under
    ``dynamic=True`` in PyTorch 2.13's CPU inductor itself.)"""
    from spikingjelly.activation_based import functional, layer, neuron

    torch.manual_seed(0)
    if name == "core":
        net = sb.enable_aux_loss(CoreNet())
    elif name == "snntorch":
        net = sbnn_snn.to_sbnn(nn.Sequential(
            nn.Linear(12, 16), snn.Leaky(beta=0.9, init_hidden=True),
            nn.Linear(16, 5), snn.Leaky(beta=0.9, init_hidden=True, output=True)), aux_loss=True)
        sutils.reset(net)  # snnTorch defines its module globals on a first eager call
    else:
        sj = nn.Sequential(layer.Linear(12, 16), neuron.LIFNode(tau=2.0),
                           layer.Linear(16, 5), neuron.LIFNode(tau=2.0))
        functional.set_step_mode(sj, "m")
        net = sbnn_sj.to_sbnn(sj, aux_loss=True)

    def loss_fn(x, y):
        if name == "core":
            out = net(x)
        elif name == "spikingjelly":
            functional.reset_net(net)
            out = net(x).sum(0)
        else:
            sutils.reset(net)
            out = sum(net(x[t])[0] for t in range(x.shape[0]))
        return F.cross_entropy(out, y) + 0.1 * sb.aux_loss(net)

    gc.collect()
    torch._dynamo.reset()
    step = torch.compile(loss_fn, fullgraph=True, dynamic=True)
    with sb.kernels.use_kernels(kernel):
        for batch in (6, 3):
            x, y = torch.rand(T, batch, 12) * 3, torch.randint(0, 5, (batch,))
            net.zero_grad()
            loss = step(x, y)
            loss.backward()
            assert torch.isfinite(loss)
            assert all(p.grad is not None and p.grad.abs().sum() > 0
                       for n, p in net.named_parameters() if "fc1" in n or n.startswith("0."))
        if kernel:
            sb.set_mode(net, "mean")
            with torch.no_grad():
                assert torch.equal(step(x, y), loss_fn(x, y))
            sb.set_mode(net, "sample")
    torch._dynamo.reset()


def test_torch_export_captures_the_mean_network_and_names_sample_mode():
    """``torch.export`` of the deterministic network (``mean`` mode) works and computes
    it; in ``sample`` mode it raises a named error instead of an internal one."""
    torch.manual_seed(0)
    core = nn.Sequential(sb.BayesLinear(16, 8, std=0.3), sb.IWSTSpike("st", std=0.2),
                         sb.BayesLinear(8, 4, std=0.3))
    host = nn.Sequential(nn.Linear(16, 8), snn.Leaky(beta=0.9, init_hidden=True),
                         nn.Linear(8, 4), snn.Leaky(beta=0.9, init_hidden=True, output=True))
    converted = sbnn_snn.to_sbnn(host)
    x = torch.rand(5, 16) * 2
    for model in (core, converted):
        with sb.mode(model, "mean"):
            sutils.reset(model)
            program = torch.export.export(model, (x,))
            sutils.reset(model)
            expected = model(x)
        sutils.reset(model)
        got = program.module()(x)
        if isinstance(expected, tuple):
            expected, got = expected[1], got[1]  # snnTorch: (spk, mem) of the output layer
        torch.testing.assert_close(got, expected.detach())
        with sb.mode(model, "sample"), pytest.raises(sb.VarianceFlowError,
                                                     match="torch.export.*mean"):
            torch.export.export(model, (x,))


@needs_kernel
def test_export_of_a_drawing_spike_leaves_later_compiled_calls_working():
    """A spike function with noise of its own (no Bayesian layer) exports in ``sample``
    mode, its draw in the graph. Export traces with fake tensors: a fake tensor left in
    the ordering chain of the spike operator's calls made every later compiled call fail
    ("Cannot access data pointer of Tensor"). The exported program runs, and a compiled
    call afterwards draws eager mode's spikes."""
    if not sb.kernels.available():
        pytest.skip("no C compiler on this machine")
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), sb.IWSTSpike("st", std=0.3))
    x = torch.rand(4, 6)
    program = torch.export.export(net, (x,))
    assert program.module()(x).shape == (4, 8)
    torch.manual_seed(1)
    eager = net(x)
    torch.manual_seed(1)
    assert torch.equal(torch.compile(net, fullgraph=True)(x), eager)
    torch._dynamo.reset()


def test_kl_objective_inside_a_compiled_step_after_the_forward():
    """``sbnn_objective`` with ``kl_weight > 0`` after the forward, inside a fullgraph
    step: the KL's walk over the layers does not ask a neuron that the step changed for
    ``modules()`` (Dynamo refuses that lookup: a graph break inside the library), and the
    loss and gradients are eager's (``mean`` mode)."""
    torch.manual_seed(0)
    net = sbnn_snn.to_sbnn(nn.Sequential(
        nn.Linear(6, 5), snn.Leaky(beta=0.9, init_hidden=True, output=True)))
    sutils.reset(net)
    x, y = torch.rand(3, 4, 6) * 2, torch.randint(0, 5, (4,))

    def loss_fn(x, y):
        sutils.reset(net)
        out = sum(net(x[t])[0] for t in range(x.shape[0]))
        return sb.sbnn_objective(F.cross_entropy(out, y), net, num_data=10, kl_weight=1.0)

    torch._dynamo.reset()
    with sb.mode(net, "mean"):
        eager = _step(net, loss_fn, x, y)
        compiled = _step(net, torch.compile(loss_fn, fullgraph=True), x, y)
    torch.testing.assert_close(compiled[0], eager[0])
    assert net[0].std_rho.grad.abs().sum() > 0  # the KL's gradient
    for a, b in zip(eager[1], compiled[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_objective_errors_are_named_inside_a_compiled_step():
    """The objective's own errors (aux_loss without enable_aux_loss, kl_weight without
    num_data, an unreduced NLL) reach a fullgraph step's caller with the library's message,
    not Dynamo's "Observed exception"."""
    net = nn.Sequential(sb.BayesLinear(4, 3, std=0.3), sb.LIF())
    x = torch.rand(2, 4)
    cases = [(dict(aux_weight=0.1), False, "enable_aux_loss"),
             (dict(kl_weight=1.0), False, "num_data"), ({}, True, "nll must be a scalar")]
    for kwargs, unreduced, message in cases:
        def loss_fn(x, kwargs=kwargs, unreduced=unreduced):
            out = net(x)[0]
            return sb.sbnn_objective(out.sum(1) if unreduced else out.sum(), net, **kwargs)

        torch._dynamo.reset()
        with pytest.raises(RuntimeError, match=message) as err:
            torch.compile(loss_fn, fullgraph=True)(x)
        assert not str(err.value).startswith("Observed exception")


def test_training_step_compiles_after_mc_predict_on_the_compiled_model():
    """mc_predict on ``torch.compile(net)`` resets the model it wraps: SpikingJelly's table
    of reset networks then does not hold the wrapper too, and a training step traced
    afterwards with ``reset_net(net)`` inside compiles (Dynamo failed on the model reached
    twice: "already tracked for mutation")."""
    from spikingjelly.activation_based import functional, layer, neuron

    torch.manual_seed(0)
    host = nn.Sequential(layer.Linear(6, 5), neuron.LIFNode())
    functional.set_step_mode(host, "m")
    net = sbnn_sj.to_sbnn(host)
    gc.collect()
    torch._dynamo.reset()
    x = torch.rand(3, 4, 6) * 3
    net.eval()
    sb.mc_predict(torch.compile(net, fullgraph=True), x, 2, forward=lambda m, v: m(v).mean(0))
    net.train()

    def loss_fn(x):
        functional.reset_net(net)
        return net(x).sum()

    torch.compile(loss_fn, fullgraph=True)(x).backward()
    assert net[0].std_rho.grad is not None


def test_checkpointed_region_inside_a_compiled_step(same_random_stream):
    """``sbnn_addons.checkpoint.checkpoint`` inside a fullgraph step (Dynamo cannot trace
    its ``context_fn``: an internal error) runs the region plainly, with eager's
    checkpointed loss and gradients."""
    from sbnn_addons.checkpoint import checkpoint

    torch.manual_seed(0)
    fc, lif = sb.BayesLinear(6, 5, std=0.3), sb.LIF(spike_fn=sb.IWSTSpike("st"))
    net = nn.ModuleList([fc, lif])
    x, y = torch.rand(3, 4, 6) * 3, torch.randint(0, 5, (4,))

    def loss_fn(x, y):
        state, out = None, 0
        for t in range(x.shape[0]):
            h, state = checkpoint(lambda v, s: lif(fc(v), s), x[t], state, modules=net)
            out = out + h
        return F.cross_entropy(out, y)

    eager = _step(net, loss_fn, x, y)
    compiled = _step(net, torch.compile(loss_fn, fullgraph=True), x, y)
    torch.testing.assert_close(compiled[0], eager[0])
    assert fc.weight.grad.abs().sum() > 0
    for a, b in zip(eager[1], compiled[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _checkpointed_loop_loss(net: nn.Module, checkpointed):
    """The cross-entropy of a converted :class:`LoopNet` whose every time step runs as
    ``checkpointed(step, x_t, mem1, mem2)``."""

    def step(x_t, mem1, mem2):
        spk1, mem1 = net.lif1(net.fc1(x_t), mem1)
        spk2, mem2 = net.lif2(net.fc2(spk1), mem2)
        return spk2, mem1, mem2

    def loss_fn(x, y):
        mem1, mem2 = net.lif1.init_leaky(), net.lif2.init_leaky()
        out = 0
        for t in range(x.shape[0]):
            spk2, mem1, mem2 = checkpointed(step, x[t], mem1, mem2)
            out = out + spk2
        return F.cross_entropy(out, y)

    return loss_fn


def test_library_checkpoint_of_a_converted_snntorch_step_inside_a_fullgraph_step(
        same_random_stream):
    """``sbnn_addons.checkpoint.checkpoint`` around each step of a converted snnTorch loop
    inside a fullgraph step: its ``modules=`` search read the neurons that the step before
    had changed, which Dynamo refused (``Unsupported: getattr() on nn.Module with pending
    mutation``, nothing named). It compiles, with eager's loss and gradients."""
    from sbnn_addons.checkpoint import checkpoint

    torch.manual_seed(0)
    net = sbnn_snn.to_sbnn(LoopNet())
    x, y = torch.rand(T, 6, 12) * 3, torch.randint(0, 5, (6,))
    loss_fn = _checkpointed_loop_loss(
        net, lambda step, *args: checkpoint(step, *args, modules=net))

    eager = _step(net, loss_fn, x, y)
    compiled = _step(net, torch.compile(loss_fn, fullgraph=True, backend="aot_eager"), x, y)
    torch.testing.assert_close(compiled[0], eager[0])
    assert net.fc1.weight.grad.abs().sum() > 0
    for a, b in zip(eager[1], compiled[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_torch_checkpoint_of_a_converted_snntorch_step_in_a_compiled_step_is_named():
    """``torch.utils.checkpoint`` around each step of a converted snnTorch loop in a
    compiled step, with the Dynamo setting that its own error suggests for the neuron's
    state (``skip_fwd_side_effects_in_bwd_under_checkpoint``): the membrane's noise
    variance, which the neuron carries to the next step, lost its gradient in the graph
    (``std_rho``'s gradients 97 % off, no error). ``sample`` mode raises under
    ``fullgraph=True``, naming ``sbnn_addons.checkpoint.checkpoint``, and runs the region
    eagerly without it; ``mean`` mode (no variance) compiles as eager."""
    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    torch.manual_seed(0)
    net = sbnn_snn.to_sbnn(LoopNet())
    x, y = torch.rand(T, 6, 12) * 3, torch.randint(0, 5, (6,))
    loss_fn = _checkpointed_loop_loss(
        net, lambda step, *args: torch_checkpoint(step, *args, use_reentrant=False))

    torch._dynamo.reset()
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        with pytest.raises(RuntimeError, match=r"Leaky.*torch.utils.checkpoint.*compiled.*"
                                               r"sbnn_addons.checkpoint.checkpoint"):
            _step(net, torch.compile(loss_fn, fullgraph=True, backend="aot_eager"), x, y)
        torch._dynamo.reset()  # without fullgraph: the region runs eagerly, as eager's
        eager = _step(net, loss_fn, x, y)
        compiled = _step(net, torch.compile(loss_fn, backend="aot_eager"), x, y)
        assert torch.equal(compiled[0], eager[0])
        for a, b in zip(eager[1], compiled[1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        torch._dynamo.reset()
        with sb.mode(net, "mean"):
            eager = _step(net, loss_fn, x, y)
            compiled = _step(net, torch.compile(loss_fn, fullgraph=True, backend="aot_eager"),
                             x, y)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled[0], eager[0])
    for a, b in zip(eager[1], compiled[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_torch_checkpoint_of_an_init_hidden_snntorch_model_in_a_compiled_step_is_named():
    """The quick start's ``init_hidden`` Sequential in ``torch.utils.checkpoint`` inside a
    fullgraph step (with Dynamo's ``skip_fwd_side_effects_in_bwd_under_checkpoint``), in
    ``mean`` mode: Dynamo failed on the neuron's kept state with an internal error
    ("does not belong to this Graph"), where the host model compiles. Named, with the
    helper as the fix."""
    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    torch.manual_seed(0)
    net = sbnn_snn.to_sbnn(nn.Sequential(
        nn.Linear(12, 16), snn.Leaky(beta=0.9, init_hidden=True), nn.Linear(16, 5),
        snn.Leaky(beta=0.9, init_hidden=True, output=True)))
    sb.set_mode(net, "mean")
    x, y = torch.rand(T, 6, 12) * 3, torch.randint(0, 5, (6,))

    def loss_fn(x, y):
        sutils.reset(net)
        out = 0
        for t in range(x.shape[0]):
            spk, mem = torch_checkpoint(net, x[t], use_reentrant=False)
            out = out + spk + mem
        return F.cross_entropy(out, y)

    sutils.reset(net)  # (once eagerly: Dynamo misses the global that its first call sets)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        with pytest.raises(RuntimeError, match=r"Leaky with init_hidden=True.*"
                                               r"sbnn_addons.checkpoint.checkpoint"):
            _step(net, torch.compile(loss_fn, fullgraph=True, backend="aot_eager"), x, y)
    torch._dynamo.reset()


def test_sample_mode_compiles_where_dynamo_reports_every_compile_as_an_export(monkeypatch):
    """Dynamo before PyTorch 2.13 answers ``torch.compiler.is_exporting()`` with ``True``
    under every ``torch.compile`` (seen on torch 2.11 with CUDA: every compiled
    ``sample``-mode step raised the export error). Emulated here: the library reads the
    flag that export sets, so a compiled ``sample`` step runs and an export is still
    named."""
    def is_exporting_before_2_13() -> bool:
        return torch.compiler.is_compiling()

    monkeypatch.setattr(torch.compiler, "is_exporting", is_exporting_before_2_13)
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = nn.Sequential(sb.BayesLinear(16, 8, std=0.3), sb.IWSTSpike("st", std=0.2),
                        sb.BayesLinear(8, 4, std=0.3))
    x, y = torch.rand(5, 16) * 2, torch.randint(0, 4, (5,))

    @torch.compile(fullgraph=True)
    def loss_fn(x, y):
        return F.cross_entropy(net(x), y)

    loss = loss_fn(x, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert net[0].std_rho.grad is not None and torch.isfinite(net[0].std_rho.grad).all()
    with sb.mode(net, "sample"), pytest.raises(sb.VarianceFlowError, match="torch.export"):
        torch.export.export(net, (x,))
    torch._dynamo.reset()


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_spikes_returned_at_a_graph_break_do_not_change_in_the_backward(step_mode):
    """A converted SpikingJelly model compiled with a graph break after a neuron (a user
    module Dynamo cannot trace): the graph ends at the neuron's spikes, which the forward
    also saves (the reset's backward). Inductor's backward reused that saved buffer in
    place, and the spikes the caller holds turned into gradient values."""
    from spikingjelly.activation_based import functional, layer, neuron

    torch.manual_seed(0)
    net = sbnn_sj.to_sbnn(nn.Sequential(layer.Linear(6, 4), _GraphBreak(), neuron.LIFNode()))
    functional.set_step_mode(net, step_mode)
    x = torch.rand(2, 6) * 2 if step_mode == "s" else torch.rand(3, 2, 6) * 2
    compiled = torch.compile(net)
    functional.reset_net(net)
    out = compiled(x)
    before = out.detach().clone()
    out.sum().backward()
    assert torch.equal(out.detach(), before)
    assert set(before.unique().tolist()) <= {0.0, 1.0}


def test_unconverted_spikingjelly_neuron_after_a_bayesian_layer_raises_under_compile():
    """An unconverted SpikingJelly neuron fed by a Bayesian layer raises in a fullgraph
    step as in eager mode, naming the fix: compiled, it fired from the mean and the
    layer's std got no gradient, without an error."""
    from spikingjelly.activation_based import neuron

    torch.manual_seed(0)
    for node in (neuron.LIFNode(), neuron.ParametricLIFNode()):
        net = nn.Sequential(sb.BayesLinear(4, 5, std=0.3), node)
        torch._dynamo.reset()
        step = torch.compile(lambda x, net=net: net(x).sum(), fullgraph=True)
        with pytest.raises(RuntimeError, match="not converted.*spikingjelly.to_sbnn") as err:
            step(torch.rand(3, 4))
        assert str(err.value).startswith("a SpikingJelly neuron that is not converted")


@pytest.mark.parametrize(("how", "step_mode"), [
    ("multi_step_forward", "m"), ("forward", "m"), ("single_step_forward", "s")])
def test_a_converted_neuron_run_past_its_hooks_is_named_in_a_compiled_step(how, step_mode):
    """A converted SpikingJelly neuron run through one of its own methods
    (``sn.multi_step_forward(h)``, ``sn.forward(h)``, ``sn.single_step_forward(h)``)
    skips the hooks that hand its input's variance to the spike function: eager mode
    names it, and a fullgraph step raised Dynamo's "builtin isinstance() cannot determine
    type of argument ... likely a Dynamo bug" instead (SpikingJelly's loop iterates over
    the input, ``for x in x_seq``, whose items Dynamo builds without their variance)."""
    from spikingjelly.activation_based import functional, layer, neuron

    class Bypassed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = layer.Linear(6, 5, step_mode=step_mode)
            self.sn = neuron.LIFNode(step_mode=step_mode)

        def forward(self, x):
            return getattr(self.sn, how)(self.fc(x))

    torch.manual_seed(0)
    model = sbnn_sj.to_sbnn(Bypassed())
    x = torch.rand(2, 3, 6) * 3 if step_mode == "m" else torch.rand(3, 6) * 3

    def step(x):
        functional.reset_net(model)
        return model(x).sum()

    gc.collect()
    torch._dynamo.reset()
    named = rf"SpikingJelly LIFNode.*outside a call of the neuron module.*{how}.*Call the module"
    with pytest.raises(RuntimeError, match=named):
        torch.compile(step, fullgraph=True)(x)


def test_a_bayesian_output_iterated_over_in_a_compiled_step_is_named():
    """A user's time loop that iterates over a multi-step Bayesian layer's output
    (``for h_t in fc(x_seq)``) into a single-step neuron: Dynamo builds the items without
    their variance, and a fullgraph step failed with its internal "builtin isinstance()
    cannot determine type of argument ... likely a Dynamo bug". It names the fix;
    indexing or ``unbind`` compile as in eager mode."""
    from spikingjelly.activation_based import functional, layer, neuron

    torch.manual_seed(0)
    net = sbnn_sj.to_sbnn(nn.Sequential(layer.Linear(6, 5, step_mode="m"),
                                        neuron.LIFNode(step_mode="s")))
    fc, sn = net[0], net[1]

    def iterated(x):
        functional.reset_net(net)
        return torch.stack([sn(h) for h in fc(x)]).sum()

    def indexed(x):
        functional.reset_net(net)
        h = fc(x)
        return torch.stack([sn(h[t]) for t in range(h.shape[0])]).sum()

    x = torch.rand(2, 3, 6) * 3
    gc.collect()
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match=r"iterated over.*Index it.*unbind"):
        torch.compile(iterated, fullgraph=True, backend="aot_eager")(x)
    with sb.mode(net, "mean"):
        assert torch.equal(torch.compile(indexed, fullgraph=True, backend="aot_eager")(x),
                           iterated(x))


def test_forward_hook_that_drops_the_variance_raises_in_a_first_compiled_call():
    """A user's forward hook on a converted layer that returns ``output.data`` raises the
    named error in a fullgraph step that runs before any eager forward (the layer's check
    was added at the first eager forward: compiled first, that layer's noise vanished and
    its std got no gradient, without an error); a hook that keeps the variance compiles."""
    torch.manual_seed(0)
    host = nn.Sequential(nn.Linear(4, 5), snn.Leaky(beta=0.9, init_hidden=True),
                         nn.Linear(5, 2), snn.Leaky(beta=0.9, init_hidden=True, output=True))
    host[0].weight.data.abs_().mul_(3)  # spikes into the hooked layer
    host[2].register_forward_hook(lambda m, i, o: o * 2.0)  # adopted by the conversion
    net = sbnn_snn.to_sbnn(host)
    sutils.reset(net)
    step = torch.compile(lambda x: net(x)[0].sum(), fullgraph=True)
    x = torch.rand(3, 4) * 3
    torch._dynamo.reset()
    step(x).backward()
    assert net[2].std_rho.grad.abs().sum() > 0
    net[2].register_forward_hook(lambda m, i, o: o.data)
    sutils.reset(net)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="forward hook of BayesLinear.*expression of the"):
        step(x)


def _bad_models():
    """Misuses that eager mode names, each as (model, input, start of the message)."""
    from spikingjelly.activation_based import layer, neuron

    class TanhLeaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.lif = nn.Linear(4, 3), snn.Leaky(beta=0.9, init_hidden=True)

        def forward(self, x):
            return self.lif(torch.tanh(self.fc(x)))

    snn_pair = nn.Sequential(nn.Linear(4, 5), snn.Leaky(beta=0.9, init_hidden=True),
                             nn.Linear(5, 2), snn.Leaky(beta=0.9, init_hidden=True, output=True))
    x = torch.rand(2, 4)
    return {
        "unconverted snnTorch neuron": (
            nn.Sequential(sb.BayesLinear(4, 3, std=0.3), snn.Leaky(beta=0.9, init_hidden=True)),
            x, "this snn.Leaky is not converted"),
        "unconverted snnTorch neuron with a synaptic state": (  # (an in-place sum inside)
            nn.Sequential(sb.BayesLinear(4, 3, std=0.3),
                          snn.Alpha(alpha=0.9, beta=0.8, init_hidden=True)),
            x, "this snn.Alpha is not converted, but its input carries the posterior variance "
               "of a Bayesian layer (its state 'syn_exc' would carry it"),
        "snnTorch neuron with a synaptic state and the drop-in spike_grad": (
            nn.Sequential(sb.BayesLinear(4, 3, std=0.3),
                          snn.Synaptic(alpha=0.8, beta=0.9, init_hidden=True,
                                       spike_grad=sbnn_snn.spike_grad())),
            x, "this snn.Synaptic has a variance-aware spike function, but its input carries "
               "the posterior variance of a Bayesian layer (in its state 'syn')"),
        # (compiled, these ran on with a wrong variance, silently: a graph does not track
        # which noise two terms share; the same-step reset was Dynamo's data-dependent
        # branching error)
        "drop-in spike_grad, RLeaky reset to zero": (
            nn.Sequential(sb.BayesLinear(4, 3, std=0.3),
                          snn.RLeaky(beta=0.9, linear_features=3, init_hidden=True,
                                     reset_mechanism="zero", spike_grad=sbnn_snn.spike_grad())),
            x, "this snn.RLeaky has a variance-aware spike function, but the posterior "
               "variance of a Bayesian layer in its state 'mem' is unknown: "
               "snn.RLeaky(reset_mechanism='zero') resets as base - reset * base"),
        "drop-in spike_grad, Lapicque reset to zero": (
            nn.Sequential(sb.BayesLinear(4, 3, std=0.3),
                          snn.Lapicque(beta=0.9, init_hidden=True, reset_mechanism="zero",
                                       spike_grad=sbnn_snn.spike_grad())),
            x, "this snn.Lapicque has a variance-aware spike function, but the posterior "
               "variance of a Bayesian layer in its state 'mem' is unknown: "
               "snn.Lapicque(reset_mechanism='zero') resets as base - reset * base"),
        "drop-in spike_grad, same-step reset to zero": (
            nn.Sequential(sb.BayesLinear(4, 3, std=0.3),
                          snn.Leaky(beta=0.9, init_hidden=True, reset_mechanism="zero",
                                    reset_delay=False, spike_grad=sbnn_snn.spike_grad())),
            x, "this snn.Leaky has a variance-aware spike function, but the posterior "
               "variance of a Bayesian layer in its state 'mem' is unknown: reset_delay=False "
               "with reset_mechanism='zero' applies its same-step reset"),
        "op without a rule, snnTorch": (sbnn_snn.to_sbnn(TanhLeaky()), x,
                                        "the input of this spike function went through 'tanh'"),
        "op without a rule, SpikingJelly": (
            sbnn_sj.to_sbnn(nn.Sequential(layer.Linear(4, 3), nn.Tanh(), neuron.LIFNode())),
            x, "the input of LIFNode"),  # (eager mode names the layers too)
        "op without a rule, core LIF": (
            nn.Sequential(sb.BayesLinear(4, 3, std=0.3), nn.Tanh(), sb.LIF()), x,
            "the input current went through 'tanh'"),
        "stacked Bayesian layers": (
            nn.Sequential(sb.BayesLinear(4, 3, std=0.3), sb.BayesLinear(3, 2)), x,
            "the input of BayesLinear carries the posterior variance of an earlier"),
        "excluded neuron": (sbnn_snn.to_sbnn(snn_pair, exclude="3"), x,
                            "Leaky was excluded from the conversion"),
        "empty input": (sbnn_snn.to_sbnn(snn_pair), torch.rand(0, 4),
                        "the input of the converted model (Sequential) has shape (0, 4)"),
        # a wrong dtype or shape (eager mode: TypeError / ValueError; compiled, these were
        # Dynamo's "Observed exception", the library's message in its debug context only)
        "float64 input, snnTorch": (sbnn_snn.to_sbnn(snn_pair), x.double(),
                                    "BayesLinear has torch.float32 weights but its input is "
                                    "torch.float64: convert the input"),
        "float16 input, SpikingJelly": (
            sbnn_sj.to_sbnn(nn.Sequential(layer.Linear(4, 3), neuron.LIFNode())), x.half(),
            "BayesLinear has torch.float32 weights but its input is torch.float16"),
        "integer input, core": (nn.Sequential(sb.BayesLinear(4, 3, std=0.3), sb.LIF()),
                                (x > 0.5).long(), "input must be a floating-point tensor"),
        "wrong number of features": (
            sbnn_sj.to_sbnn(nn.Sequential(layer.Linear(4, 3), neuron.LIFNode())),
            torch.rand(2, 5), "BayesLinear expects 4 input features in dimension -1"),
        "wrong number of channels": (
            nn.Sequential(sb.BayesConv2d(2, 3, 3, std=0.3), sb.IWSTSpike("st")),
            torch.rand(2, 1, 6, 6), "BayesConv2d expects input [N, 2, ...] with 4 dimensions"),
        "integer current, core LIF": (sb.LIF(), torch.ones(2, 4, dtype=torch.long),
                                      "current must be a floating-point tensor"),
        # (compiled, Dynamo's "Observed exception")
        "one step to a multi-step conv, SpikingJelly": (
            sbnn_sj.to_sbnn(nn.Sequential(layer.Conv2d(1, 2, 3, step_mode="m"),
                                          neuron.LIFNode(step_mode="m"))),
            torch.rand(2, 1, 5, 5), "BayesConv2d in step_mode='m' expects x of shape "
                                    "[T, N, C, H, W], got (2, 1, 5, 5)"),
        "wrong number of channels, BatchNorm made affine": (
            sbnn_sj.to_sbnn(nn.Sequential(layer.BatchNorm2d(1), layer.Conv2d(1, 2, 3),
                                          neuron.LIFNode()), batchnorm="affine"),
            torch.rand(2, 3, 5, 5), "ChannelAffine expects 1 channels in dimension 1, got "
                                    "shape (2, 3, 5, 5)"),
    }


@pytest.mark.parametrize("case", list(_bad_models()))
def test_misuses_are_named_in_a_fullgraph_step(case):
    """What eager mode refuses with a named error is refused with the same message in a
    fullgraph step (a ``RuntimeError``), not with Dynamo's "Observed exception" that
    hides it in a debug context."""
    torch.manual_seed(0)
    model, x, message = _bad_models()[case]
    with pytest.raises(Exception, match=re.escape(message)):
        model(x)  # eager mode's error
    model, x, message = _bad_models()[case]  # anew: the failed step left its state
    torch._dynamo.reset()
    with pytest.raises(RuntimeError) as err:
        torch.compile(model, fullgraph=True)(x)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("bad", ["empty sequence", "wrong number of features"])
def test_misuses_are_named_in_a_fullgraph_step_after_a_new_batch_size(bad):
    """A compiled multi-step SpikingJelly model called with a second batch size makes that
    dimension symbolic (Dynamo's automatic dynamic shapes); a misuse after it (an empty
    sequence ``[0, B, ...]``, a wrong number of features) was refused with Dynamo's
    "assume_constant_result argument conversion failed": the message held the symbolic
    shape. It names the problem with the input's shape, as in eager mode."""
    from spikingjelly.activation_based import functional, layer, neuron

    gc.collect()
    torch._dynamo.reset()
    net = sbnn_sj.to_sbnn(nn.Sequential(layer.Linear(6, 4), neuron.LIFNode()))
    functional.set_step_mode(net, "m")
    step = torch.compile(net, fullgraph=True)
    try:
        for batch in (4, 5):
            sbnn_sj.reset(net)
            step(torch.rand(3, batch, 6))
        sbnn_sj.reset(net)
        x, message = {
            "empty sequence": (torch.rand(0, 5, 6), "the input of the converted model "
                               "(Sequential) has shape (0, 5, 6), with a zero-size dimension"),
            "wrong number of features": (torch.rand(3, 5, 7), "BayesLinear expects 6 input "
                                         "features in dimension -1, got input of shape (3, 5, 7)"),
        }[bad]
        with pytest.raises(RuntimeError) as err:
            step(x)
    finally:
        torch._dynamo.reset()
    assert str(err.value).startswith(message)


def test_in_place_sum_of_two_noisy_tensors_raises_in_a_compiled_step():
    """``h += g`` with both operands carrying a Bayesian layer's variance (a residual
    block's ``out += identity`` after a downsampling layer): a compiled graph made the
    target a plain tensor, so both layers' noise vanished (no std gradient) without an
    error. It raises, naming the out-of-place sum, which compiles as in eager mode."""
    torch.manual_seed(0)
    fc, fc2 = sb.BayesLinear(4, 6, std=0.5), sb.BayesLinear(4, 6, std=0.5)
    spike = sb.IWSTSpike("st")
    x = torch.rand(8, 4) * 2

    def in_place(x):
        h = fc(x)
        h += fc2(x)
        return spike(h - 1.0).sum()

    def out_of_place(x):
        return spike(fc(x) + fc2(x) - 1.0).sum()

    torch._dynamo.reset()
    in_place(x).backward()  # eager mode: fine
    assert fc.std_rho.grad is not None
    with pytest.raises(RuntimeError, match=r"in-place sum .*h = h \+ g") as err:
        torch.compile(in_place, fullgraph=True)(x)
    assert str(err.value).startswith("an in-place sum")
    fc.zero_grad()
    torch.compile(out_of_place, fullgraph=True)(x).backward()
    assert fc.std_rho.grad.abs() > 0 and fc2.std_rho.grad.abs() > 0


# In-place methods on a Bayesian layer's output ``h`` (``m``: a plain tensor > 0 of one
# row's shape), each returning the target. Those of the first table have a variance rule
# (eager mode updates the target's variance by it); those of the second have none (eager
# mode marks the target unknown, and the neuron it reaches raises, naming the operation).
def _mul_(h, m):
    h.mul_(m)
    return h


def _mul_number(h, m):
    h.mul_(2.0)
    return h


def _div_(h, m):
    h.div_(m)
    return h


def _add_(h, m):
    h.add_(m)
    return h


def _sub_(h, m):
    h.sub_(m, alpha=0.5)
    return h


def _imul(h, m):
    h *= m
    return h


def _itruediv(h, m):
    h /= m
    return h


def _iadd(h, m):
    h += m
    return h


def _copy_(h, m):
    h.copy_(m.expand_as(h))
    return h


def _masked_fill_(h, m):
    h.masked_fill_(m > 1.0, 0.0)
    return h


def _clamp_(h, m):
    h.clamp_(min=-1.0, max=1.0)
    return h


def _clamp_tensor(h, m):
    h.clamp_(max=m)
    return h


def _setitem(h, m):
    h[:, 0] = 0.0
    return h


def _setitem_tensor(h, m):
    h[:, 1:] = m[1:]
    return h


def _zero_(h, m):
    h.zero_()
    return h


_IN_PLACE_RULED = {"mul_": _mul_, "mul_ by a number": _mul_number, "div_": _div_,
                   "add_": _add_, "sub_": _sub_, "*=": _imul, "/=": _itruediv, "+=": _iadd}
_IN_PLACE_UNRULED = {"copy_": _copy_, "masked_fill_": _masked_fill_, "clamp_": _clamp_,
                     "clamp_ by a tensor": _clamp_tensor, "__setitem__": _setitem,
                     "__setitem__ of a tensor": _setitem_tensor, "zero_": _zero_}


def _in_place_net(change):
    """A Bayesian layer, ``change`` in place on its output, a core LIF: the net (for the
    parameters) and the loss of a run over ``x`` [T, 8, 4]."""
    torch.manual_seed(0)
    fc = sb.BayesLinear(4, 6, std=0.5)
    lif = sb.LIF(spike_fn=sb.IWSTSpike("st"))

    def loss_fn(x, m):
        state, out = None, 0
        for t in range(x.shape[0]):
            spk, state = lif(change(fc(x[t]), m), state)
            out = out + spk.sum()
        return out

    return nn.ModuleList([fc, lif]), loss_fn


@pytest.mark.parametrize("op", list(_IN_PLACE_RULED))
def test_in_place_method_on_a_carrier_keeps_its_variance_in_a_compiled_step(
        same_random_stream, op):
    """``h.mul_(m)``, ``h.div_(m)``, ``h.add_(c)``, ``h *= m``, ... on a Bayesian layer's
    output inside ``torch.compile(fullgraph=True)``: the compiled graph turned the target
    into a plain tensor, so the neuron after it drew no weight noise and the layer's std
    got no gradient, without an error. The target keeps the variance of the operation's
    rule, as in eager mode: the same variance reaches the neuron, and the same loss and
    gradients in sample and mean mode."""
    change = _IN_PLACE_RULED[op]
    net, loss_fn = _in_place_net(change)
    fc = net[0]
    x, m = torch.rand(T, 8, 4) * 2, torch.rand(6) + 0.5

    def reaching(x, m):
        return sb.get_variance(change(fc(x), m))

    torch._dynamo.reset()
    eager = reaching(x[0], m)
    assert isinstance(eager, torch.Tensor)
    torch.testing.assert_close(torch.compile(reaching, fullgraph=True)(x[0], m), eager)
    _check_like_eager(net, loss_fn, x, m)
    compiled = torch.compile(loss_fn, fullgraph=True)
    _step(net, compiled, x, m)
    assert fc.std_rho.grad.abs().sum() > 0


@pytest.mark.parametrize("op", list(_IN_PLACE_UNRULED))
def test_in_place_method_without_a_rule_on_a_carrier_raises_in_a_compiled_step(
        same_random_stream, op):
    """``h.copy_(s)``, ``h.masked_fill_(mask, 0)``, ``h.clamp_(...)``, ``h[idx] = v``
    on a Bayesian layer's output: eager mode marks the target's variance unknown and the
    neuron it reaches raises, naming the operation; a compiled step dropped the variance
    and ran without an error. It raises the same message (a ``RuntimeError``); mean mode
    (no variance) runs as in eager mode."""
    net, loss_fn = _in_place_net(_IN_PLACE_UNRULED[op])
    x, m = torch.rand(T, 8, 4) * 2, torch.rand(6) + 0.5
    name = op.split(" ")[0]
    with pytest.raises(sb.VarianceFlowError, match=re.escape(f"'{name}'")) as eager:
        loss_fn(x, m)
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    with pytest.raises(RuntimeError) as err:
        compiled(x, m)
    assert str(err.value).startswith(str(eager.value)[:80])
    sb.set_mode(net, "mean")
    assert torch.equal(compiled(x, m), loss_fn(x, m))


def test_in_place_detach_of_a_carrier_raises_in_a_compiled_step():
    """``h.detach_()`` on a Bayesian layer's output inside a compiled step: the graph made
    the target a plain tensor, so its variance vanished, where eager mode keeps it
    (detached). It raises, naming ``h = h.detach()``, which compiles as in eager mode."""
    torch.manual_seed(0)
    fc = sb.BayesLinear(4, 6, std=0.5)

    def in_place(x):
        h = fc(x)
        h.detach_()
        return sb.get_variance(h)

    def out_of_place(x):
        return sb.get_variance(fc(x).detach())

    x = torch.rand(8, 4) * 2
    assert isinstance(in_place(x), torch.Tensor)  # eager mode: kept
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match=r"in-place detach .*h = h\.detach\(\)"):
        torch.compile(in_place, fullgraph=True)(x)
    torch.testing.assert_close(torch.compile(out_of_place, fullgraph=True)(x), in_place(x))


def test_threshold_changed_in_place_reaches_a_compiled_step(same_random_stream):
    """A converted snnTorch readout whose threshold is set to inf after the conversion
    (reset 'none': a membrane readout): a compiled step traced with the threshold of the
    conversion gave an infinite auxiliary loss and NaN gradients, without an error. It
    raises, naming the fix; after ``sbnn_addons.snntorch.reset(model)`` outside the step
    (which gives the spike function the new threshold) the compiled step computes what
    it computes for a readout built with ``threshold=inf``: no auxiliary term for it."""
    def make(changed: bool):
        torch.manual_seed(0)
        model = sbnn_snn.to_sbnn(nn.Sequential(
            nn.Linear(8, 6), snn.Leaky(beta=0.9, init_hidden=True),
            nn.Linear(6, 3), snn.Leaky(beta=0.9, init_hidden=True, output=True,
                                       reset_mechanism="none",
                                       threshold=1.0 if changed else math.inf)),
            aux_loss=True)
        if changed:
            model[3].threshold.fill_(math.inf)
        sutils.reset(model)  # eagerly, once: snnTorch defines its module globals
        return model

    def loss_of(model):
        def loss_fn(x, y=None):
            sutils.reset(model)
            mems = torch.stack([model(x[t])[1] for t in range(x.shape[0])])
            return mems.sum() + 0.1 * sb.aux_loss(model)
        return loss_fn

    x = torch.rand(2, 4, 8) * 2
    built, model = make(False), make(True)
    # aot_eager: the check is in the traced graph (Dynamo's and AOTAutograd's), which
    # inductor's C++ code generation adds nothing to but a minute of compiling
    expected = _step(built, torch.compile(loss_of(built), fullgraph=True,
                                          backend="aot_eager"), x, None)
    torch._dynamo.reset()
    step = torch.compile(loss_of(model), fullgraph=True, backend="aot_eager")
    fix = r"threshold .*sbnn_addons\.snntorch\.reset\(model\)"
    with pytest.raises(RuntimeError, match=fix):
        step(x)
    sbnn_snn.reset(model)
    compiled = _step(model, step, x, None)
    assert torch.isfinite(compiled[0])
    torch.testing.assert_close(compiled[0], expected[0])
    for a, b in zip(expected[1], compiled[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    model[3].threshold.fill_(1.0)  # between compiled steps: the graph cannot read it
    with pytest.raises(RuntimeError, match=fix):
        step(x)


def test_threshold_made_symbolic_then_infinite_recompiles(same_random_stream):
    """Thresholds that change between compiled steps (each after
    ``sbnn_addons.snntorch.reset``) make Dynamo trace the float as a symbolic input; a
    later infinite threshold then reused the graph traced for a finite one (Dynamo
    guards no comparison of a symbolic float with inf): auxiliary terms and the pull for
    a readout that never fires. The finite test is a bool attribute, which Dynamo guards:
    every compiled step equals the eager step for its threshold. (``aot_eager``: the
    guards are Dynamo's; inductor may draw the readout's noise, which feeds nothing in
    the forward pass, after a later step's: the same law, other draws.)"""
    torch.manual_seed(0)
    model = sbnn_snn.to_sbnn(nn.Sequential(
        nn.Linear(8, 6), snn.Leaky(beta=0.9, init_hidden=True),
        nn.Linear(6, 3), snn.Leaky(beta=0.9, init_hidden=True, output=True,
                                   reset_mechanism="none")), aux_loss=True)
    sutils.reset(model)

    def loss_fn(x, y=None):
        sutils.reset(model)
        mems = torch.stack([model(x[t])[1] for t in range(x.shape[0])])
        return mems.sum() + 0.1 * sb.aux_loss(model)

    x = torch.rand(2, 3, 8) * 2
    torch._dynamo.reset()
    step = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    for threshold in (1.0, 2.0, 3.0, math.inf, 0.5, math.inf):
        model[3].threshold.fill_(threshold)
        sbnn_snn.reset(model)
        eager = _step(model, loss_fn, x, None)
        compiled = _step(model, step, x, None)
        assert torch.isfinite(compiled[0])
        torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
        for a, b in zip(eager[1], compiled[1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("inplace", [False, True])
def test_compiled_dropout_drops_the_variance_of_the_dropped_elements(same_random_stream,
                                                                     inplace):
    """As in eager (test_core_moments): a dropout in a compiled graph drops the variance
    of exactly the elements it drops, also where the mean is 0 (the rule read them from
    the output, and an in-place dropout kept the variance of every element)."""
    gen = torch.Generator().manual_seed(0)
    x, v = torch.randn(4, 6, 3, generator=gen), torch.rand(4, 6, 3, generator=gen) + 0.1
    x[:, ::2] = 0.0
    drop = nn.Dropout(0.5, inplace=inplace)

    def step(t):
        y = drop(t * 1.0)
        return sb.moments.plain(y) * 1.0, sb.get_variance(y)

    torch.manual_seed(0)
    mask = F.dropout(torch.ones_like(x), 0.5)
    with sb.moments.variance_flow():
        torch.manual_seed(0)
        out, var = torch.compile(step, fullgraph=True)(sb.attach_variance(x.clone(), v))
    assert ((mask == 0) & (x == 0)).any()
    assert torch.equal(out, x * mask)
    torch.testing.assert_close(var, v * mask**2)


def _noiseless_models():
    """A two-layer snnTorch Sequential and a SpikingJelly twin, converted with the first
    layer only and no own spike noise: the second neuron's drive has no noise at all."""
    from spikingjelly.activation_based import layer, neuron

    torch.manual_seed(0)
    nets = {
        "snntorch": nn.Sequential(nn.Linear(6, 8), snn.Leaky(beta=0.9, init_hidden=True),
                                  nn.Linear(8, 4),
                                  snn.Leaky(beta=0.9, init_hidden=True, output=True)),
        "spikingjelly": nn.Sequential(layer.Linear(6, 8), neuron.LIFNode(),
                                      layer.Linear(8, 4), neuron.LIFNode()),
    }
    for net in nets.values():
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, nn.Linear):
                    m.weight.mul_(3.0)
    return {"snntorch": sbnn_snn.to_sbnn(nets["snntorch"], include="0", spike_std=None),
            "spikingjelly": sbnn_sj.to_sbnn(nets["spikingjelly"], include="0",
                                            spike_std=None)}


@pytest.mark.parametrize("host", ["snntorch", "spikingjelly"])
def test_a_compiled_step_refuses_a_gradient_through_noiseless_spikes(host):
    """As in eager mode, a gradient reaching the spikes of a converted neuron without any
    noise (every weight gradient before it would be 0, silently) fails in the compiled
    backward, naming the fix; a membrane readout, which sends no gradient through them,
    trains."""
    model = _noiseless_models()[host]
    reset = sutils.reset if host == "snntorch" else sbnn_sj.reset
    spikes_of = (lambda out: out[0]) if host == "snntorch" else (lambda out: out)
    step = torch.compile(lambda xt: model(xt), fullgraph=True)
    x = torch.rand(T, 3, 6) * 2
    reset(model)
    loss = sum(spikes_of(step(x[t])).sum() for t in range(T))
    with pytest.raises(RuntimeError, match=r"(?s)no noise.*spike_std"):
        loss.backward()
    if host == "snntorch":  # the readout: the membrane of the last neuron
        reset(model)
        model.zero_grad()
        sum(step(x[t])[1].sum() for t in range(T)).backward()
        assert model[0].weight.grad.abs().sum() > 0


def test_settings_changed_after_compiling_reach_the_compiled_step(same_random_stream):
    """What a user changes between compiled steps (the estimator, assigned as a string as
    the constructor takes it, the auxiliary pull, a fixed spike std, a layer's std, the
    mode) is what the next compiled step computes: eager's loss and gradients each time,
    not the constants of the first trace."""
    torch.manual_seed(0)
    fc = sb.BayesLinear(6, 5, std=0.3)
    spike = sb.IWSTSpike("st", std=0.2, aux_pull=0.1)
    net = nn.ModuleList([fc, spike])
    x, y = torch.rand(8, 6) * 2, torch.randint(0, 5, (8,))

    def loss_fn(x, y):
        return F.cross_entropy(spike(fc(x) - 0.5) * 3.0, y)

    compiled = torch.compile(loss_fn, fullgraph=True)
    changes = [lambda: None, lambda: setattr(spike, "estimator", "agr(0.5)"),
               lambda: setattr(spike, "aux_pull", 0.0), lambda: spike.fixed_std.fill_(0.6),
               lambda: fc.std_rho.data.fill_(-3.0), lambda: sb.set_mode(net, "mean")]
    for i, change in enumerate(changes):
        change()
        eager, comp = _step(net, loss_fn, x, y), _step(net, compiled, x, y)
        torch.testing.assert_close(comp[0], eager[0], msg=f"change {i}")
        for a, b in zip(eager[1], comp[1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)



def test_time_constant_changed_between_compiled_steps_of_a_spikingjelly_model(
        same_random_stream):
    """A converted SpikingJelly ``LIFNode`` whose ``tau`` changes between compiled steps
    (Dynamo then makes it a symbolic float): the next compiled step computes eager's loss
    and gradients. The membrane variance's decay ``beta^2`` was an ``alpha=`` that
    inductor specialised with a guard of another rounding, and Dynamo failed its own
    guard (an internal ``AssertionError``, "Guard failed on the same frame")."""
    from spikingjelly.activation_based import functional, layer, neuron

    torch.manual_seed(0)
    host = nn.Sequential(layer.Linear(8, 6), neuron.LIFNode(tau=2.0))
    functional.set_step_mode(host, "m")
    net = sbnn_sj.to_sbnn(host)
    x, y = torch.rand(3, 5, 8) * 3, torch.randint(0, 6, (5,))

    def loss_fn(x, y):
        functional.reset_net(net)
        return F.cross_entropy(net(x).sum(0), y)

    gc.collect()
    compiled = torch.compile(loss_fn)
    for tau in (2.0, 5.0):
        net[1].tau = tau
        eager, comp = _step(net, loss_fn, x, y), _step(net, compiled, x, y)
        torch.testing.assert_close(comp[0], eager[0], msg=f"tau {tau}")
        assert net[0].std_rho.grad.abs().sum() > 0
        for a, b in zip(eager[1], comp[1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("layer", "mode", "bad"), [
    ("linear", "sample", math.nan), ("conv", "sample", math.inf), ("conv", "mean", math.nan),
    ("linear weight std", "sample", math.inf), ("pruned", "sample", math.nan),
])
def test_a_compiled_layer_names_a_nan_or_inf_input(layer, mode, bad):
    """Under ``torch.compile`` a layer's input check is a runtime assert in the graph: a
    ``RuntimeError`` naming the layer and the fix, as eager mode's ``ValueError`` does, in
    both modes and for each variance formula (per-layer, per-weight, pruned)."""
    torch.manual_seed(0)
    if layer.startswith("conv"):
        net, x = sb.BayesConv2d(2, 3, 3), torch.rand(4, 2, 6, 6)
    else:
        net = sb.BayesLinear(8, 5, std_mode="weight" if "weight" in layer else "layer")
        x = torch.rand(4, 8)
    if layer == "pruned":
        torch.nn.utils.prune.l1_unstructured(net, "weight", amount=0.5)
    x.view(-1)[x.numel() // 2] = bad
    step = torch.compile(lambda a: net(a).sum(), fullgraph=True)
    torch._dynamo.reset()
    with sb.mode(net, mode):
        with pytest.raises(ValueError, match="contains 1 NaN|contains 0 NaN and 1 inf"):
            net(x)
        with pytest.raises(RuntimeError, match=rf"input of {type(net).__name__} contains NaN "
                                               r"or inf.*check_finite\(False\)"):
            step(x)
        with sb.check_finite(False):
            step(x)  # the documented switch turns the check off
        step(torch.rand_like(x))



@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_a_compiled_layer_checks_its_output_and_not_each_steps_input(layer):
    """Under ``torch.compile`` a Bayesian layer's finite check is an assert on its output,
    not on its input: fed a step ``x[t]`` of a sequence (a view at a new offset each
    step), an assert on the input compiled to a generated kernel per step (23 of the 43
    C++ kernels of the compiled benchmark MLP at T = 25); the output is a buffer of its own,
    one kernel for every step. Each step still has its assert, on that step's output."""
    torch.manual_seed(0)
    if layer == "conv":
        net, x = sb.BayesConv2d(2, 3, 3), torch.rand(3, 4, 2, 6, 6)
    else:
        net, x = sb.BayesLinear(6, 4), torch.rand(3, 2, 6)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(lambda a: sum(net(a[t]).sum() for t in range(3)), backend=backend,
                  fullgraph=True)(x)
    (gm,) = graphs
    checks = [n for n in gm.graph.nodes
              if n.target is torch._assert_async and "NaN or inf" in str(n.args[1:])]
    assert len(checks) == 3
    for node in checks:  # back through isfinite, sum and detach to the tested tensor
        tested = node.args[0]
        while tested.op != "placeholder" and (
                getattr(tested.target, "__name__", tested.target)
                in ("isfinite", "sum", "detach")):
            tested = tested.args[0]
        name = getattr(tested.target, "__name__", str(tested.target))
        assert name in ("linear", "conv2d"), f"the assert tests {tested.format_node()}"


def test_a_shape_error_is_named_once_the_batch_dimension_is_dynamic():
    """A converted model compiled for one batch size, then called with another (the last,
    smaller batch of an epoch: Dynamo makes the batch dimension symbolic), then with the
    wrong number of features: the layer's message holds the input's symbolic shape,
    which the named error could not carry, and the call failed inside Dynamo with
    "assume_constant_result argument conversion failed". It is eager mode's message, with
    the input's actual shape."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = sbnn_snn.to_sbnn(nn.Sequential(nn.Linear(6, 4),
                                         snn.Leaky(beta=0.8, init_hidden=True, output=True)))
    step = torch.compile(lambda x: net(x)[0].sum(), fullgraph=True, backend="eager")
    try:
        step(torch.rand(4, 6))
        step(torch.rand(3, 6))  # a new batch size: recompiled with a symbolic batch
        with pytest.raises(RuntimeError, match=re.escape(
                "BayesLinear expects 6 input features in dimension -1, got input of "
                "shape (3, 5)")):
            step(torch.rand(3, 5))
    finally:
        torch._dynamo.reset()


def _compiled_leaky_pair() -> tuple[nn.Module, nn.Module]:
    """A converted two-layer snnTorch ``Sequential`` (``init_hidden=True`` Leaky neurons,
    seeded) and ``torch.compile`` of it, called once per time step."""
    torch.manual_seed(0)
    net = sbnn_snn.to_sbnn(nn.Sequential(
        nn.Linear(6, 5), snn.Leaky(beta=0.9, init_hidden=True),
        nn.Linear(5, 3), snn.Leaky(beta=0.9, init_hidden=True, output=True)))
    return net, torch.compile(net)


def test_a_compiled_snntorch_model_called_per_step_resets_by_its_kept_spikes(
        same_random_stream):
    """``torch.compile(net)`` called once per time step (the loop outside the compiled
    model), reset with ``sbnn_addons.snntorch.reset`` between sequences: the graph traced
    at a sequence's first step (no spikes kept yet: the reset from the membrane) was
    reused for the next steps, whose reset is the sampled spikes the neuron emitted,
    since Dynamo does not guard on a read of a module's ``__dict__``: other spikes than
    eager's in ``sample`` mode, silently. Also ``mc_predict`` on the compiled model,
    seeded: eager's samples."""
    net, compiled = _compiled_leaky_pair()
    x = torch.rand(4, 2, 6) * 3

    def run(model):
        return torch.stack([model(x_t)[1] for x_t in x])

    for _ in range(2):  # two sequences, each from a reset
        outs = []
        for model in (net, compiled):
            sbnn_snn.reset(net)
            torch.manual_seed(3)
            outs.append(run(model))
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    forward = lambda m, s: run(m).sum(0)  # noqa: E731
    eager = sb.mc_predict(net, x, 2, seed=0, forward=forward).sample_probs
    comp = sb.mc_predict(compiled, x, 2, seed=0, forward=forward).sample_probs
    torch.testing.assert_close(comp, eager, rtol=0, atol=0)


@needs_kernel
def test_mc_predict_on_a_compiled_model_unseeded_after_seeded():
    """A seeded ``mc_predict`` draws its spikes between graphs, and the graphs of the
    unseeded call that follows take a tensor carrying a variance as an input, which went
    straight to the spike operator: PyTorch's first-call analysis refused it ("Multiple
    dispatch failed for 'sbnn_addons.spike_forward'"). The operator takes the mean."""
    torch._dynamo.reset()
    net, compiled = _compiled_leaky_pair()
    x = torch.rand(3, 2, 6) * 3

    def forward(model, s):
        return torch.stack([model(x_t)[1] for x_t in s]).sum(0)

    sb.mc_predict(compiled, x, 2, seed=0, forward=forward)
    probs = sb.mc_predict(compiled, x, 2, forward=forward).sample_probs
    assert probs.shape == (2, 2, 3) and torch.isfinite(probs).all()



def _nonfinite_parameter_cases():
    """A NaN / inf parameter that eager mode names, each as (a model with it, its input,
    how eager mode's message starts, where a compiled step's differs: and how that one
    starts). The model ran once before the change, as after an optimiser
    step that stepped a NaN gradient in."""
    from spikingjelly.activation_based import layer, neuron

    def poisoned(model, owner, name, value, x, reset=None):
        model(x)
        if reset is not None:
            reset(model)
        with torch.no_grad():
            getattr(owner(model), name).view(-1)[0] = value
        return model

    def snn_pair(learn_beta=False):
        torch.manual_seed(0)
        return sbnn_snn.to_sbnn(nn.Sequential(
            nn.Linear(4, 5), snn.Leaky(beta=0.9, learn_beta=learn_beta, init_hidden=True),
            nn.Linear(5, 2), snn.Leaky(beta=0.9, init_hidden=True, output=True)))

    def sj_affine():
        torch.manual_seed(0)
        net = nn.Sequential(layer.Conv1d(2, 3, 3), layer.BatchNorm1d(3), neuron.LIFNode())
        net[1](net[0](torch.rand(4, 2, 8)))
        return sbnn_sj.to_sbnn(net, batchnorm="affine")

    x, x3 = torch.rand(2, 4), torch.rand(4, 2, 8)
    return {
        "beta of a converted snnTorch neuron": (
            poisoned(snn_pair(), lambda m: m[1], "beta", math.nan, x, sbnn_snn.reset), x,
            ("the buffer '1.beta' of the converted model (Sequential) contains",
             "Leaky.beta (the membrane decay) holds NaN / inf values")),
        "learned beta of a converted snnTorch neuron": (
            poisoned(snn_pair(learn_beta=True), lambda m: m[1], "beta", math.inf, x,
                     sbnn_snn.reset), x,
            ("the parameter '1.beta' of the converted model (Sequential) contains",
             "Leaky.beta (the membrane decay) holds NaN / inf values")),
        "noise scale of a converted snnTorch layer": (
            poisoned(snn_pair(), lambda m: m[2], "std_rho", math.nan, x, sbnn_snn.reset), x,
            ("the parameter '2.std_rho' of the converted model (Sequential) contains",
             "BayesLinear.std_rho (a noise scale) holds NaN / inf values")),
        "spike std of a converted snnTorch neuron": (
            poisoned(snn_pair(), lambda m: m[1].spike_grad, "std_rho", math.inf, x,
                     sbnn_snn.reset), x,
            ("the parameter '1.spike_grad.std_rho' of the converted model (Sequential) "
             "contains", "IWSTSpike.std_rho (a noise scale) holds NaN / inf values")),
        "beta of a BatchNorm made affine, SpikingJelly": (
            poisoned(sj_affine(), lambda m: m[1], "bias", math.nan, x3, sbnn_sj.reset), x3,
            ("the parameter '1.bias' of the converted model (Sequential) contains",
             "ChannelAffine.bias (beta) holds NaN / inf values")),
        "spike std of a converted SpikingJelly neuron": (
            poisoned(sj_affine(), lambda m: m[2].surrogate_function, "std_rho", math.nan, x3,
                     sbnn_sj.reset), x3,
            ("the parameter '2.surrogate_function.std_rho' of the converted model "
             "(Sequential) contains", "SJSpike.std_rho (a noise scale) holds NaN / inf values")),
        "noise scale of a core layer": (
            poisoned(sb.BayesLinear(4, 3), lambda m: m, "std_rho", math.nan, x), x,
            "BayesLinear.std_rho (a noise scale) holds NaN / inf values"),
        "fixed std of a core spike function": (
            poisoned(sb.IWSTSpike(std=0.3), lambda m: m, "fixed_std", math.inf, x - 0.5),
            x - 0.5, "IWSTSpike.fixed_std (a noise scale) holds NaN / inf values"),
        "spike std of a core LIF": (
            poisoned(sb.LIF(spike_fn=sb.IWSTSpike(std=0.3, learn_std=True)),
                     lambda m: m.spike_fn, "std_rho", math.nan, x), x,
            "IWSTSpike.std_rho (a noise scale) holds NaN / inf values"),
        "gamma of a ChannelAffine alone": (
            poisoned(sb.ChannelAffine(2), lambda m: m, "weight", math.nan, x3), x3,
            "ChannelAffine.weight (gamma) holds"),
    }


@pytest.mark.parametrize("case", list(_nonfinite_parameter_cases()))
def test_a_nonfinite_parameter_is_named_in_a_compiled_step(case):
    """A NaN / inf noise scale (a layer's ``std_rho``, a spike function's std), a
    ``ChannelAffine``'s gamma / beta or a converted snnTorch neuron's ``beta`` (a
    constant or learned), which eager mode names at the next call: a
    fullgraph step skipped those checks and ran on, drawing the spikes at random or never
    (or returning NaN), without an error. It raises, naming the tensor and the fix (a
    ``RuntimeError``, without the counts; in a converted model the module's own check,
    as its entry's check of its parameters is eager-only); ``check_finite(False)`` turns
    it off."""
    model, x, message = _nonfinite_parameter_cases()[case]
    eager, message = message if isinstance(message, tuple) else (message, message)
    with pytest.raises(ValueError, match=re.escape(eager)):
        model(x)
    torch._dynamo.reset()
    step = torch.compile(lambda a: model(a), fullgraph=True, backend="aot_eager")
    try:
        with pytest.raises(RuntimeError) as err:
            step(x)
        assert str(err.value).startswith(message)
        assert "NaN" in str(err.value) and "check_finite(False)" in str(err.value)
        with sb.check_finite(False):
            step(x)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_a_nan_time_constant_set_between_compiled_steps_is_named(step_mode):
    """``LIFNode.tau = nan`` set after the conversion, which eager mode names: a compiled
    step skipped the check and ran on with NaN membranes and no spikes, without an error
    (also after a change of ``tau``, which makes it a symbolic float in the graph)."""
    from spikingjelly.activation_based import functional, layer, neuron

    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(4, 3), neuron.LIFNode())
    functional.set_step_mode(net, step_mode)
    model = sbnn_sj.to_sbnn(net)
    x = torch.rand(2, 3, 4) if step_mode == "m" else torch.rand(3, 4)
    torch._dynamo.reset()
    step = torch.compile(lambda a: model(a), fullgraph=True, backend="aot_eager")
    try:
        for tau in (2.0, 3.0):  # a second value: a symbolic float
            model[1].tau = tau
            sbnn_sj.reset(model)
            step(x)
        model[1].tau = math.nan
        sbnn_sj.reset(model)
        with pytest.raises(RuntimeError, match=re.escape(
                "the converted SpikingJelly LIFNode has 'tau' = NaN (set after the "
                "conversion)")):
            step(x)
    finally:
        torch._dynamo.reset()


def test_more_misuses_are_named_in_a_fullgraph_step():
    """Eager mode's ``ValueError`` raised in traced code reached a fullgraph step's caller
    as Dynamo's "Observed exception" (the message in its debug context only): a pruned
    noise scale, ``LIF.run`` of one step, a NaN threshold set on a converted SpikingJelly
    neuron. Each is eager mode's message (a ``RuntimeError``)."""
    from spikingjelly.activation_based import layer, neuron
    from torch.nn.utils import prune

    pruned = sb.BayesLinear(4, 3, std_mode="weight")
    prune.l1_unstructured(pruned, "std_rho", amount=0.3)
    lif = sb.LIF()
    sj = sbnn_sj.to_sbnn(nn.Sequential(layer.Linear(4, 3), neuron.LIFNode()))
    sj[1].v_threshold = math.nan
    cases = [(pruned, torch.rand(2, 4), "BayesLinear.std_rho is pruned"),
             (lif.run, torch.tensor(1.0), "LIF.run: currents must be a sequence [T, ...]"),
             (sj, torch.rand(2, 4), "threshold must be a number (not NaN)")]
    for call, x, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            call(x)
        torch._dynamo.reset()
        with pytest.raises(RuntimeError) as err:
            torch.compile(lambda a, call=call: call(a), fullgraph=True, backend="eager")(x)
        assert str(err.value).startswith(message)
    torch._dynamo.reset()


_GENERATOR = torch.Generator()
_SAMPLE_SPIKES_MISUSES = {
    "negative sigma": (lambda u, s: sb.sample_spikes(u, -s), r"must be finite and >= 0"),
    "infinite sigma": (lambda u, s: sb.sample_spikes(u, s / 0.0), r"must be finite and >= 0"),
    "sigma shape": (lambda u, s: sb.sample_spikes(u, s[:, :3]),
                    r"sigma of shape \(4, 3\) does not broadcast to the drive u of shape"),
    "estimator": (lambda u, s: sb.sample_spikes(u, s, "iwst"), r"unknown estimator 'iwst'"),
    "generator": (lambda u, s: sb.sample_spikes(u, s, generator=_GENERATOR),
                  r"generator=.*torch\.manual_seed"),
}


@pytest.mark.parametrize("case", list(_SAMPLE_SPIKES_MISUSES))
def test_sample_spikes_misuses_are_named_in_a_fullgraph_step(case):
    """``sample_spikes`` in a compiled step: a negative or infinite ``sigma``, which eager
    mode refuses, drew spikes silently (the check read values, which a graph skipped); a
    ``sigma`` that does not broadcast, an unknown estimator and a ``generator`` failed
    inside Dynamo ("RuntimeError when making fake tensor call", "Observed exception",
    "Failed to convert args/kwargs to proxy"). Each raises a ``RuntimeError`` with the
    library's message (the generator's names the fix: the global generator)."""
    fn, message = _SAMPLE_SPIKES_MISUSES[case]
    u, s = torch.randn(4, 10), torch.full((4, 10), 0.5)
    if case != "generator":
        with pytest.raises((ValueError, TypeError), match=message):
            fn(u, s)
    torch._dynamo.reset()
    try:
        with pytest.raises(RuntimeError, match=message) as err:
            torch.compile(fn, fullgraph=True, backend="eager")(u, s)
    finally:
        torch._dynamo.reset()
    assert str(err.value).lstrip().startswith(("sigma", "unknown", "sample_spikes")), err.value
    torch.manual_seed(0)  # the fix of the generator's case compiles: the global generator
    expected = sb.sample_spikes(u, s)
    torch.manual_seed(0)
    torch.testing.assert_close(torch.compile(lambda u, s: sb.sample_spikes(u, s), fullgraph=True,
                                             backend="aot_eager")(u, s), expected)
    torch._dynamo.reset()


@pytest.mark.parametrize("call", ["sample_spikes", "deterministic", "BernoulliSpike.apply"])
def test_sample_spikes_compiles_without_autograd(call):
    """``sample_spikes`` (and the documented five-argument ``BernoulliSpike.apply``) in a
    fullgraph step whose inputs need no gradient (an evaluation, ``torch.no_grad``) failed
    inside Dynamo ("'Function' object has no attribute 'dtype'": Dynamo passed a context
    to a forward that takes none when an optional argument was left out). It draws eager
    mode's spikes for the seed."""
    u, s, eps = torch.randn(4, 10), torch.full((4, 10), 0.5), torch.randn(4, 10)

    def fn(u, s):
        if call == "BernoulliSpike.apply":
            return sb.BernoulliSpike.apply(u, s, eps, sb.ST(), False)
        return sb.sample_spikes(u, s, deterministic=call == "deterministic")

    torch._dynamo.reset()
    try:
        for grad in (False, True):
            x = u.clone().requires_grad_(grad)
            torch.manual_seed(0)
            expected = fn(x, s)
            torch.manual_seed(0)
            out = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, s)
            torch.testing.assert_close(out, expected)
        with torch.no_grad():
            torch.compile(fn, fullgraph=True, backend="aot_eager")(u.requires_grad_(), s)
    finally:
        torch._dynamo.reset()


def test_an_mc_evaluation_step_compiles_fullgraph_and_matches_eager(same_random_stream):
    """An evaluation step with mc(K) sampling and the uncertainty functions and metrics in
    it: entropy, from_sample_probs, time_as_samples and the metrics stopped Dynamo under
    fullgraph=True at their value checks (a data-dependent branch)."""
    from sbnn_addons import metrics
    from sbnn_addons.uncertainty import entropy, from_sample_probs, time_as_samples

    torch.manual_seed(0)
    model = sb.track_variance(nn.Sequential(
        sb.BayesLinear(16, 32, std=0.3), sb.IWSTSpike("agr", std=0.2),
        sb.BayesLinear(32, 4, std=0.3)))
    x, y = torch.randn(12, 16), torch.randint(0, 4, (12,))

    def step(x, y):
        sample_probs = torch.stack([torch.softmax(model(x), -1) for _ in range(3)])
        pred = from_sample_probs(sample_probs)
        return (pred.probs, pred.entropy, pred.mutual_information, entropy(pred.probs),
                time_as_samples(sample_probs.log()).mutual_information,
                metrics.negative_log_likelihood(sample_probs[0], y),  # carries a variance
                metrics.brier_score(pred.probs, y),
                metrics.expected_calibration_error(pred.probs, y))

    compiled = torch.compile(step, fullgraph=True)
    with torch.no_grad():
        torch.manual_seed(3)
        got = compiled(x, y)
        torch.manual_seed(3)
        want = step(x, y)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("where", ["model input", "layer output"])
def test_float16_input_whose_sum_overflows_passes_the_compiled_finite_check(where):
    """A compiled float16 step (``model.half()`` of a converted snnTorch model, or a core
    layer under float16 ``torch.autocast``) whose input or layer output is finite but
    sums above float16's 65504 (6000 x 12 ones; a CIFAR batch of 64 images sums to about
    1e5): the compiled finite check summed in float16, overflowed, and raised "contains
    NaN or inf values", where eager mode runs. The sum is taken in float32: the compiled
    step runs and returns eager mode's spikes; a real inf is still named."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    if where == "model input":
        net = sbnn_snn.to_sbnn(nn.Sequential(
            nn.Linear(12, 6), snn.Leaky(beta=0.9, init_hidden=True))).half()
        sb.set_mode(net, "mean")

        def step(x):
            sutils.reset(net)
            return net(x)

        sutils.reset(net)  # once eagerly: snnTorch's reset defines its module globals
        x = torch.ones(6000, 12, dtype=torch.float16)
        ctx = torch.autocast("cpu", enabled=False)
    else:
        fc, lif = sb.BayesLinear(12, 6), sb.LIF()
        with torch.no_grad():
            fc.weight.fill_(1.0)  # each output 12 + bias: the output sums to about 4e5
        sb.set_mode(lif, "mean")

        def step(x):
            return lif(fc(x))[0]

        x = torch.ones(6000, 12)
        ctx = torch.autocast("cpu", dtype=torch.float16)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    try:
        with ctx:
            want = step(x)
            got = compiled(x)
            if where == "layer output":  # a real inf is still named
                bad = x.clone()
                bad[0, 0] = math.inf
                with pytest.raises(RuntimeError, match="NaN or inf"):
                    compiled(bad)
    finally:
        torch._dynamo.reset()
    assert got.dtype == want.dtype
    assert torch.equal(got, want)
