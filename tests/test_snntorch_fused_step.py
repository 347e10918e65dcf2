"""A converted ``snn.Leaky`` step as one kernel call (``SBNNLeaky._fused_step``).

Each case runs the same converted model twice under the same seed: once with the fused
step and once through snnTorch's own ``Leaky.forward`` (the variance written out beside
it, the spike function called as a module). Spikes, membranes, auxiliary losses and every
gradient must be bitwise equal, and the fused step must actually have run.
"""

from __future__ import annotations

import copy

import pytest
import snntorch as snn
import torch
import torch.nn.functional as F
from _snntorch_nets import make, run
from snntorch import utils
from torch import nn

import sbnn_addons as sb
import sbnn_addons.snntorch as sst
from sbnn_addons import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs the C kernel")


@pytest.fixture
def fused_calls(monkeypatch):
    """How many steps ran fused / fell back, counted per run."""
    counts = {"fused": 0, "fallback": 0}
    original = sst.SBNNLeaky._fused_step

    def counted(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        counts["fallback" if out is None else "fused"] += 1
        return out

    monkeypatch.setattr(sst.SBNNLeaky, "_fused_step", counted)
    yield counts
    sst._FUSED_STEP[0] = True


def _train_steps(model, x, y, fused: bool, aux: bool, steps: int = 2):
    """``steps`` optimiser steps from a copy of ``model``; what each produced."""
    sst._FUSED_STEP[0] = fused
    model = copy.deepcopy(model)
    if aux:
        sb.enable_aux_loss(model)
    opt = torch.optim.Adam(sb.param_groups(model, lr=1e-2, noise_lr=1e-2))
    torch.manual_seed(123)
    record = []
    for _ in range(steps):
        opt.zero_grad()
        spk, mem = run(model, x)
        loss = F.cross_entropy(mem.sum(0), y)
        if aux:
            loss = loss + 1e-3 * sb.aux_loss(model)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        record.append((spk.detach(), mem.detach(), loss.detach(), grads))
        opt.step()
    return record, model


def _assert_same(a, b):
    for (spk_a, mem_a, loss_a, g_a), (spk_b, mem_b, loss_b, g_b) in zip(a, b, strict=True):
        assert torch.equal(spk_a, spk_b)
        assert torch.equal(mem_a, mem_b)
        assert torch.equal(loss_a, loss_b)
        assert g_a.keys() == g_b.keys() and g_a
        for name in g_a:
            assert torch.equal(g_a[name], g_b[name]), name


@pytest.mark.parametrize("name", ["seq_leaky", "loop_leaky", "seq_conv", "tutorial_conv"])
@pytest.mark.parametrize("estimator", ["st", "agr"])
@pytest.mark.parametrize("aux", [False, True])
def test_fused_step_equals_snntorch_steps(name, estimator, aux, fused_calls):
    net, x = make(name)
    y = torch.randint(0, 10, (x.shape[1],), generator=torch.Generator().manual_seed(1))
    model = sst.to_sbnn(net, estimator=estimator)
    fused, _ = _train_steps(model, x, y, True, aux)
    assert fused_calls["fused"] > fused_calls["fallback"] > 0  # the first step of each sequence
    fused_calls.update(fused=0, fallback=0)
    slow, _ = _train_steps(model, x, y, False, aux)
    assert fused_calls["fused"] == 0
    _assert_same(fused, slow)


@pytest.mark.parametrize("reset_mechanism", ["subtract", "none", "zero"])
def test_fused_step_follows_the_reset_mechanism(reset_mechanism, fused_calls):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(64, 32), snn.Leaky(beta=0.8, init_hidden=True, reset_mechanism=reset_mechanism),
        nn.Linear(32, 10),
        snn.Leaky(beta=0.8, init_hidden=True, output=True, reset_mechanism=reset_mechanism))
    with torch.no_grad():
        net[0].weight.mul_(3)
    x = (torch.rand(10, 6, 64) < 0.4).float()
    y = torch.randint(0, 10, (6,))
    model = sst.to_sbnn(net)
    fused, _ = _train_steps(model, x, y, True, aux=True)
    # "zero" resets through the neuron's own steps
    assert (fused_calls["fused"] > 0) == (reset_mechanism != "zero")
    slow, _ = _train_steps(model, x, y, False, aux=True)
    _assert_same(fused, slow)


class _TruncatedLoop(nn.Module):
    """Truncated BPTT in an explicit loop: the membrane detached every few steps, and
    snnTorch's ``detach_hidden`` on an ``init_hidden`` neuron."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.lif1 = snn.Leaky(beta=0.9)
        self.fc2 = nn.Linear(32, 10)
        self.lif2 = snn.Leaky(beta=0.9, init_hidden=True)

    def forward(self, x):
        mem1 = self.lif1.init_leaky()
        out = 0
        for t in range(x.shape[0]):
            if t % 4 == 3:
                mem1 = mem1.detach()
                self.lif2.mem.detach_()
            spk1, mem1 = self.lif1(self.fc1(x[t]), mem1)
            out = out + self.lif2(self.fc2(spk1))
        return out


def test_fused_step_keeps_truncated_bptt(fused_calls):
    torch.manual_seed(0)
    net = _TruncatedLoop()
    with torch.no_grad():
        net.fc1.weight.mul_(3)
    x = (torch.rand(12, 5, 64) < 0.4).float()
    y = torch.randint(0, 10, (5,))
    model = sst.to_sbnn(net)
    grads = []
    for fused in (True, False):
        sst._FUSED_STEP[0] = fused
        m = copy.deepcopy(model)
        torch.manual_seed(7)
        utils.reset(m)
        F.cross_entropy(m(x), y).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert fused_calls["fused"] > 0
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_fused_step_continues_across_utils_reset_and_mean_mode(fused_calls):
    """snnTorch's reset between batches starts a new sequence; ``mean`` mode and
    ``no_grad`` evaluation between training batches do not disturb the next batch."""
    net, x = make("seq_leaky")
    model = sst.to_sbnn(net)
    outs = []
    for fused in (True, False):
        sst._FUSED_STEP[0] = fused
        m = copy.deepcopy(model)
        torch.manual_seed(3)
        first = run(m, x)[1]
        with sb.mode(m, "mean"), torch.no_grad():
            evaluated = run(m, x)[1]
        second = run(m, x)[1]
        outs.append((first.detach(), evaluated, second.detach()))
    assert fused_calls["fused"] > 0
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("host_kw", [dict(learn_beta=True), dict(learn_threshold=True),
                                     dict(graded_spikes_factor=2.0)])
def test_steps_the_kernel_cannot_take_fall_back(host_kw, fused_calls):
    """A learned beta or threshold (their gradients) and graded spikes go through
    snnTorch's steps, and still train."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), snn.Leaky(beta=0.9, init_hidden=True, **host_kw),
                        nn.Linear(32, 10), snn.Leaky(beta=0.9, init_hidden=True, output=True))
    with torch.no_grad():
        net[0].weight.mul_(3)
    model = sst.to_sbnn(net)
    x = (torch.rand(8, 4, 64) < 0.4).float()
    utils.reset(model)
    out = sum(model(x[t])[1] for t in range(x.shape[0]))
    out.sum().backward()
    assert fused_calls["fused"] > 0  # the last neuron
    lif = model[1]
    learned = [p for n, p in lif.named_parameters() if n in ("beta", "threshold")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learned)


def test_an_observed_spike_function_steps_through_snntorch(fused_calls):
    """A SpikeMonitor counts what the spike function emits: the steps it watches call it."""
    net, x = make("loop_leaky")
    model = sst.to_sbnn(net)
    with sb.metrics.SpikeMonitor(model) as monitor:
        model(x)
    assert fused_calls["fused"] == 0
    assert sum(float(c) for c in monitor.counts.values()) > 0  # it counted


@pytest.mark.parametrize("hook", ["full_backward", "full_backward_pre"])
def test_a_spike_function_with_backward_hooks_steps_through_snntorch(hook, fused_calls):
    """A backward hook on the spike function watches its gradients: the steps call it,
    as snnTorch's steps do (the fused step, which does not call it, would skip it)."""
    net, x = make("loop_leaky")
    model = sst.to_sbnn(net)
    spike = model.lif2.spike_grad
    getattr(spike, f"register_{hook}_hook")(lambda *args: None)
    runs = []
    for fused in (True, False):
        sst._FUSED_STEP[0] = fused
        m = copy.deepcopy(model)
        torch.manual_seed(2)
        spk, mem = m(x)
        (spk.sum() + mem.sum()).backward()
        runs.append((spk, mem, {n: p.grad for n, p in m.named_parameters()}))
    assert fused_calls["fused"] == x.shape[0] - 1  # the first neuron's
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert runs[0][2].keys() == runs[1][2].keys()
    for name, grad in runs[0][2].items():
        assert (grad is None) == (runs[1][2][name] is None), name
        assert grad is None or torch.equal(grad, runs[1][2][name]), name


def _explicit_run(model, x, seed, edit=None):
    """The tutorial loop, step by step from outside: ``edit(t, model)`` before step t."""
    torch.manual_seed(seed)
    mem1, mem2 = model.lif1.init_leaky(), model.lif2.init_leaky()
    outs = []
    for t in range(x.shape[0]):
        if edit is not None:
            edit(t, model)
        spk1, mem1 = model.lif1(model.fc1(x[t]), mem1)
        spk2, mem2 = model.lif2(model.fc2(spk1), mem2)
        outs.append((spk1, mem1, spk2, mem2))
    return outs


def _loop_model():
    net, x = make("loop_leaky")
    with torch.no_grad():
        net.fc2.weight.mul_(3)
    return sst.to_sbnn(net), x


@pytest.mark.parametrize("context", ["inference_mode", "no_grad"])
def test_fused_step_in_evaluation_contexts(context, fused_calls):
    """Steps under ``torch.inference_mode()`` (whose tensors have no version counter) and
    ``no_grad`` give what snnTorch's steps give."""
    model, x = _loop_model()
    runs = []
    for fused in (True, False):
        sst._FUSED_STEP[0] = fused
        with torch.inference_mode() if context == "inference_mode" else torch.no_grad():
            runs.append(_explicit_run(model, x, seed=5))
    for a, b in zip(*runs, strict=True):
        for u, v in zip(a, b, strict=True):
            assert torch.equal(u, v)


@pytest.mark.parametrize("through_data", [False, True])
def test_fused_step_reads_a_threshold_changed_in_place(through_data, fused_calls):
    """``lif.threshold.fill_(...)`` mid-sequence: the next step uses it, with its
    auxiliary terms and pull, as snnTorch's steps do. An edit through ``.data`` (which
    the version counter does not see): the drive and the reset use the new threshold, as
    in snnTorch's steps."""
    model, x = _loop_model()
    sb.enable_aux_loss(model)

    def edit(t, m):
        if t == 4:
            (m.lif2.threshold.data if through_data else m.lif2.threshold).fill_(1.6)
        if t == 7:
            (m.lif1.threshold.data if through_data else m.lif1.threshold).fill_(0.7)

    grads = []
    for fused in (True, False):
        sst._FUSED_STEP[0] = fused
        m = copy.deepcopy(model)
        outs = _explicit_run(m, x, seed=9, edit=edit)
        loss = sum(o[3].sum() + o[0].sum() for o in outs) + 0.01 * sb.aux_loss(m)
        loss.backward()
        grads.append((outs, {n: p.grad for n, p in m.named_parameters()}))
    assert fused_calls["fused"] > 0
    (outs_f, g_f), (outs_s, g_s) = grads
    for a, b in zip(outs_f, outs_s, strict=True):
        for u, v in zip(a, b, strict=True):
            assert torch.equal(u, v)
    for name in g_f:
        assert torch.equal(g_f[name], g_s[name]), name


def test_a_copy_taken_mid_sequence_continues_as_the_original(fused_calls):
    """``copy.deepcopy`` of a converted Sequential between two steps (run without a graph,
    which deepcopy refuses): both continue from the same membrane, variance and reset, so
    under the same seed they step alike."""
    net, x = make("seq_leaky")
    model = sst.to_sbnn(net)
    utils.reset(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for t in range(4):
            model(x[t])
    twin = copy.deepcopy(model)
    outs = []
    for m in (model, twin):
        torch.manual_seed(21)
        outs.append([m(x[t]) for t in range(4, x.shape[0])])
    assert fused_calls["fused"] > 0
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_fused_step_refuses_a_nan_drive_outside_a_converted_model(fused_calls):
    """A neuron called outside its converted model's forward (no input check at the
    model's entry) checks its drive, as the spike function does in snnTorch's steps."""
    model, x = _loop_model()
    mem = model.lif1.init_leaky()
    _, mem = model.lif1(model.fc1(x[0]), mem)
    cur = model.fc1(x[1])
    cur = cur + torch.where(torch.arange(cur.shape[-1]) == 3, float("nan"), 0.0)
    with pytest.raises(ValueError, match="contains NaN") as raised:
        model.lif1(cur, mem)
    assert any(entry.name == "_fused_step" for entry in raised.traceback)


@pytest.mark.parametrize("region", ["sbnn_addons", "torch"])
def test_checkpointed_steps_equal_snntorch_steps(region, fused_calls):
    """Steps of an explicit loop inside ``sbnn_addons.checkpoint.checkpoint`` or
    ``torch.utils.checkpoint(use_reentrant=False)``: the recomputation in the backward
    saves the tensors the forward saved (no ``CheckpointError``), and the gradients are
    snnTorch's steps'."""
    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    from sbnn_addons.checkpoint import checkpoint

    model, x = _loop_model()
    sb.enable_aux_loss(model)
    runs = []
    for fused in (True, False):
        sst._FUSED_STEP[0] = fused
        m = copy.deepcopy(model)

        def step(xt, mem1, mem2, m=m):
            spk1, mem1 = m.lif1(m.fc1(xt), mem1)
            spk2, mem2 = m.lif2(m.fc2(spk1), mem2)
            return spk2, mem1, mem2

        torch.manual_seed(13)
        mem1, mem2 = m.lif1.init_leaky(), m.lif2.init_leaky()
        outs = []
        for t in range(x.shape[0]):
            if region == "torch":
                spk2, mem1, mem2 = torch_checkpoint(step, x[t], mem1, mem2, use_reentrant=False)
            else:
                spk2, mem1, mem2 = checkpoint(step, x[t], mem1, mem2, modules=m)
            outs.append((spk2, mem2))
        loss = sum(s.sum() + v.sum() for s, v in outs) + 0.01 * sb.aux_loss(m)
        loss.backward()
        runs.append(([(s.detach(), v.detach()) for s, v in outs],
                     {n: p.grad for n, p in m.named_parameters()}))
    (outs_f, g_f), (outs_s, g_s) = runs
    for a, b in zip(outs_f, outs_s, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for name in g_f:
        assert torch.equal(g_f[name], g_s[name]), name
