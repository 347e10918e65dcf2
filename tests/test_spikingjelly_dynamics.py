"""Variance dynamics, stochastic reset consistency, training and real-data smoke tests
of the SpikingJelly adapter (real SpikingJelly neurons, fixed seeds)."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _sj_helpers import record_spikes, run_sequence, run_steps
from torch import nn

import sbnn_addons
from sbnn_addons import kernels
from sbnn_addons import spikingjelly as sbnn_sj
from sbnn_addons.data import load_digits_split, load_dvs_gesture_32, rate_code

pytest.importorskip("spikingjelly")
from _kernel import needs_kernel
from spikingjelly.activation_based import functional, layer, neuron  # noqa: E402

DVS_DIR = Path("/work/shared/data/dvs_gesture_32")

NEURONS = {
    "if_hard": (lambda sm: neuron.IFNode(v_threshold=2.0, step_mode=sm), None),
    "lif_decay_hard": (lambda sm: neuron.LIFNode(tau=2.0, step_mode=sm), None),
    "lif_decay_soft": (lambda sm: neuron.LIFNode(tau=4.0, v_reset=None, step_mode=sm), None),
    "lif_nodecay_soft": (
        lambda sm: neuron.LIFNode(tau=3.0, decay_input=False, v_reset=None, step_mode=sm),
        None,
    ),
    "plif_hard": (lambda sm: neuron.ParametricLIFNode(init_tau=3.0, step_mode=sm), None),
}


def _beta_c(node):
    if isinstance(node, neuron.ParametricLIFNode):
        q = float(node.w.detach().sigmoid())
        return 1 - q, (q if node.decay_input else 1.0)
    if isinstance(node, neuron.LIFNode):
        return 1 - 1 / node.tau, (1 / node.tau if node.decay_input else 1.0)
    return 1.0, 1.0


def _record_fire(spike):
    """Record the variance handed to the spike function at every step."""
    seen = []
    original = spike.fire

    def fire(u, variance):
        out = original(u, variance)
        seen.append((None if variance is None else variance.detach().clone(),
                     out.detach().clone()))
        return out

    spike.fire = fire
    return seen


def _own_loop(model):
    """A copy of a converted model whose linked nodes run SpikingJelly's own per-step
    loop in multi-step mode, and its own step in single-step mode (one spike-function
    call per step), instead of the fused sequence."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        m.__dict__.pop("multi_step_forward", None)
        m.__dict__.pop("single_step_forward", None)
    return twin


def _expected(var_in, spikes, beta, c, hard):
    expected, state = [], None
    for var_t, s_t in zip(var_in, spikes):
        state = c * c * var_t if state is None else beta * beta * state + c * c * var_t
        expected.append(state)
        if hard:
            state = state * (1 - s_t)
    return expected


@pytest.mark.parametrize("sm", ["s", "m"])
@pytest.mark.parametrize("kind", list(NEURONS))
def test_variance_follows_node_dynamics(kind, sm):
    """V_t = beta^2 V_{t-1} + c^2 var_t (x (1 - s_t) after a hard reset), rtol 1e-5."""
    torch.manual_seed(0)
    make, _ = NEURONS[kind]
    net = nn.Sequential(layer.Linear(12, 7, step_mode=sm), make(sm))
    sbnn = _own_loop(sbnn_sj.to_sbnn(net, std=0.3, learn_std=False, spike_std=None))  # per-step
    lin, node = sbnn[0], sbnn[1]
    x = torch.rand(8, 4, 12) * 2
    seen = _record_fire(node.surrogate_function)
    for _ in range(2):  # a second sequence after reset must start from zero again
        seen.clear()
        run_sequence(sbnn, x, sm)
        assert len(seen) == x.shape[0]
        var_in = [lin.output_variance(xt) for xt in x]
        spikes = [s for _, s in seen]
        beta, c = _beta_c(node)
        expected = _expected(var_in, spikes, beta, c, node.v_reset is not None)
        for (got, _), want in zip(seen, expected):
            torch.testing.assert_close(got.expand_as(want), want, rtol=1e-5, atol=1e-7)
    assert torch.stack(spikes).float().mean() > 0.01  # the hard-reset branch is exercised


SEQUENCE_NEURONS = {
    **NEURONS,
    "lif_detach_reset": (lambda sm: neuron.LIFNode(tau=2.0, detach_reset=True, step_mode=sm),
                         None),
    "if_reset_below_zero": (lambda sm: neuron.IFNode(v_reset=-0.5, step_mode=sm), None),
    "if_soft_detach": (lambda sm: neuron.IFNode(v_reset=None, detach_reset=True,
                                                step_mode=sm), None),
    "plif_nodecay_soft": (lambda sm: neuron.ParametricLIFNode(
        init_tau=2.5, decay_input=False, v_reset=None, step_mode=sm), None),
}


@pytest.mark.parametrize("backend", [pytest.param("kernel", marks=needs_kernel), "torch"])
@pytest.mark.parametrize("estimator, extra", [("st", None), ("agr(0.5)", None),
                                              ("st", "own noise"), ("agr(0.5)", "aux loss")])
@pytest.mark.parametrize("sm", ["m", "s"])
@pytest.mark.parametrize("kind", list(SEQUENCE_NEURONS))
def test_fused_sequence_equals_the_nodes_own_loop(kind, estimator, extra, backend, sm,
                                                  monkeypatch):
    """LIFNode / IFNode run as fused sequences (kernels.lif_sequence, on the C kernel or
    on PyTorch operations, the path of CUDA tensors): a multi-step call as one sequence, a
    single-step call as a sequence of one step. The spikes, outputs, membranes and
    variance states equal the node's own loop (or step) bitwise, and all gradients
    (weights, posterior std, the spike's own learned std, the auxiliary loss,
    ParametricLIFNode's learned time constant, through two sequences chained without a
    reset) agree to rtol 1e-5."""
    with kernels.use_kernels(backend == "kernel"):
        _fused_sequence_equals_the_nodes_own_loop(kind, estimator, extra, backend,
                                                  monkeypatch, sm)


def _fused_sequence_equals_the_nodes_own_loop(kind, estimator, extra, backend, monkeypatch,
                                              sm="m"):
    torch.manual_seed(3)
    make, _ = SEQUENCE_NEURONS[kind]
    net = nn.Sequential(layer.Linear(12, 9, step_mode=sm), make(sm),
                        layer.Linear(9, 5, step_mode=sm), make(sm))
    with torch.no_grad():  # strong enough weights for both layers to spike often
        net[0].weight.mul_(2.5)
        net[2].weight.mul_(4.0)
        net[2].bias.fill_(0.9)
    fused = sbnn_sj.to_sbnn(net, estimator, std=0.4,
                            spike_std=0.3 if extra == "own noise" else None)
    if extra == "aux loss":
        sbnn_addons.enable_aux_loss(fused)
    own = _own_loop(fused)
    calls, fire = [], sbnn_addons.IWSTSpike.fire
    monkeypatch.setattr(sbnn_addons.IWSTSpike, "fire",  # a class-level spy: fusion stays on
                        lambda self, *a, **k: calls.append(1) or fire(self, *a, **k))
    fired, _ = record_spikes(fused)
    sequences = []
    monkeypatch.setattr(sbnn_sj.kernels, "lif_sequence",  # a spy: which backend ran
                        lambda x_seq, q_seq, *a, _run=sbnn_sj.kernels.lif_sequence, **k:
                        sequences.append(kernels.sequence_backend(x_seq, q_seq))
                        or _run(x_seq, q_seq, *a, **k))
    x = torch.rand(2, 6, 4, 12) * 2.0
    results = []
    for model in (fused, own):
        torch.manual_seed(11)
        functional.reset_net(model)
        # the second sequence continues the state
        outs = [run_steps(model, x[0], sm), run_steps(model, x[1], sm)]
        loss = sum(o.sum() for o in outs) + outs[1][-1, :, 0].sum() * 3
        if extra == "aux loss":
            aux = sbnn_addons.aux_loss(model)
            assert aux > 0
            loss = loss + 0.1 * aux
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        states = [(m.v, getattr(m, sbnn_sj.VAR_MEMORY)) for m in (model[1], model[3])]
        results.append((outs, grads, states))
        if model is fused:
            assert not calls  # the fused path ran (no per-step fire calls)
            assert sequences and set(sequences) == {backend}
    (out_f, grad_f, state_f), (out_o, grad_o, state_o) = results
    for a, b in zip(out_f, out_o):
        assert torch.equal(a, b)
    if sm == "s":  # a record per layer and step: the rates of each layer's steps
        fired = [torch.stack(fired[i::2]) for i in range(2)]
    rates = [float(f.mean()) for f in fired]
    assert all(0.02 < r < 0.98 for r in rates), rates  # both layers fire, not always
    for (v_f, s_f), (v_o, s_o) in zip(state_f, state_o):
        assert torch.equal(v_f, v_o)
        assert torch.equal(s_f.expand_as(v_f), s_o.expand_as(v_o))
    assert grad_f.keys() == grad_o.keys()
    for name in grad_f:
        torch.testing.assert_close(grad_f[name], grad_o[name], rtol=1e-5, atol=1e-6,
                                   msg=name)
    assert any(name.endswith("std_rho") and bool(grad_f[name].abs().sum() > 0)
               for name in grad_f)



@pytest.mark.parametrize("backend", [pytest.param("kernel", marks=needs_kernel), "torch"])
def test_fused_sequence_gradient_is_exact_under_a_threshold_far_above_the_membrane(backend):
    """ParametricLIFNode(v_threshold=1e6) as one fused sequence: the backward takes the
    membranes H_t themselves (dH_t/dq needs V_{t-1}), not u_t + theta, which in float32
    loses their low bits: the gradients equal the node's own loop (w's was 3 % off)."""
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(4, 3, step_mode="m"),
                        neuron.ParametricLIFNode(v_threshold=1e6, step_mode="m"))
    fused = sbnn_sj.to_sbnn(net, std=0.1, spike_std=None)  # (relative: 4e5 at 1e6)
    own = copy.deepcopy(fused)
    own[1].surrogate_function.fire = own[1].surrogate_function.fire  # the steps one by one
    x = torch.rand(4, 2, 4)
    grads = []
    for model in (fused, own):
        torch.manual_seed(1)
        functional.reset_net(model)
        with kernels.use_kernels(backend == "kernel"):
            out = model(x)
        (out * torch.arange(24.0).reshape(out.shape)).sum().backward()
        grads.append(model[1].w.grad)
    assert bool(grads[1].abs() > 1.0)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=0)


def test_fused_sequence_keeps_a_channels_last_layout():
    """A channels_last multi-step input on the PyTorch backend (what a CUDA tensor takes):
    the fused nodes return their spikes and membranes in that layout, as their own loop
    does, so the layers after them see the same tensors. (A contiguous copy changed the
    next convolution's layout, its results in the last bits, and on a GPU cost a layout
    conversion per layer.)"""
    torch.manual_seed(3)
    net = nn.Sequential(layer.Conv2d(2, 4, 3, padding=1, step_mode="m"),
                        neuron.LIFNode(tau=2.0, step_mode="m"),
                        layer.Conv2d(4, 3, 3, padding=1, step_mode="m"),
                        neuron.IFNode(v_reset=None, step_mode="m")).double()
    fused = sbnn_sj.to_sbnn(net, std=0.4)
    own = _own_loop(fused)
    x = torch.rand(6, 2, 2, 5, 5, dtype=torch.float64) * 2
    x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (6, 2))
    results = []
    for model in (fused, own):
        torch.manual_seed(1)
        functional.reset_net(model)
        with kernels.use_kernels(False):
            hidden = model[1](model[0](x))
            out = model[3](model[2](hidden))
        results.append((hidden, out, model[1].v, model[3].v))
    for a, b in zip(*results):
        assert a.stride() == b.stride()
        assert torch.equal(a, b)
    assert results[0][2].is_contiguous(memory_format=torch.channels_last)

def test_fused_sequence_falls_back_where_it_does_not_apply():
    """store_v_seq and mean mode run the node's own loop (the spike function is called
    once per step)."""
    torch.manual_seed(0)
    x = torch.rand(5, 3, 12)
    cases = {"store_v_seq": dict(store=True), "mean mode": dict(mode="mean")}
    for name, case in cases.items():
        node = neuron.LIFNode(tau=2.0, step_mode="m", store_v_seq=case.get("store", False))
        net = nn.Sequential(layer.Linear(12, 7, step_mode="m"), node)
        sbnn = sbnn_sj.to_sbnn(net, std=0.3)
        if case.get("mode"):
            sbnn_addons.set_mode(sbnn, case["mode"])
        calls = _record_fire(sbnn[1].surrogate_function)
        functional.reset_net(sbnn)
        sbnn(x)
        assert len(calls) == x.shape[0], name


@pytest.mark.parametrize("sm", ["s", "m"])
def test_node_output_is_marked_binary_and_unmarked_after_export(sm):
    """A linked node's output (its spikes) is marked 0/1, so the next Bayesian layer skips
    x * x; the export removes the marking hook with the variance link."""
    from sbnn_addons.functional import is_binary

    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(12, 7, step_mode=sm),
                        neuron.LIFNode(tau=2.0, step_mode=sm))
    sbnn = sbnn_sj.to_sbnn(net, std=0.3)
    x = torch.rand(3, 4, 12) * 2 if sm == "m" else torch.rand(4, 12) * 2
    out = sbnn(x)
    assert is_binary(out) and set(out.unique().tolist()) <= {0.0, 1.0}
    plain = sbnn_sj.to_spikingjelly(sbnn)
    functional.reset_net(plain)
    assert not is_binary(plain(x)) and not plain[1]._forward_hooks
    assert "multi_step_forward" in sbnn[1].__dict__  # the fused sequence, linked nodes only
    assert "multi_step_forward" not in plain[1].__dict__


@pytest.mark.parametrize("sm", ["s", "m"])
@pytest.mark.parametrize("inplace", [False, True])
def test_a_neuron_forward_hook_that_changes_the_spikes_is_not_marked_binary(sm, inplace):
    """A forward hook on a neuron, registered before the conversion (the copy keeps it),
    that changes its output (graded spikes, 0 or 0.5): the converted node's marking hook
    ran after it and marked the hook's 0 / 0.5 as spikes, so the next Bayesian layer took
    x for x * x and its output variance was twice the true one, silently. The marking
    runs first now: it marks the spikes, the hook's new tensor stays unmarked, and the
    next layer's variance is s^2 sum x^2 of what it receives."""
    from sbnn_addons.functional import is_binary

    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(6, 8, step_mode=sm), neuron.LIFNode(step_mode=sm),
                        layer.Linear(8, 4, step_mode=sm),
                        neuron.IFNode(v_threshold=1e9, step_mode=sm))
    with torch.no_grad():
        net[0].weight.add_(0.5)  # about half of the first neuron's units fire
    net[1].register_forward_hook(lambda module, args, out: out * 0.5)
    seen = []
    net[2].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    sbnn = sbnn_sj.to_sbnn(net, std=0.1, learn_std=False, spike_std=None, inplace=inplace)
    x = torch.rand(1, 3, 6) * 3
    functional.reset_net(sbnn)
    with torch.no_grad():
        sbnn(x) if sm == "m" else sbnn(x[0])
    h = seen[-1].as_subclass(torch.Tensor)
    assert set(h.unique().tolist()) == {0.0, 0.5} and not is_binary(seen[-1])
    want = 0.1**2 * (h * h).sum(-1, keepdim=True)  # [N, 1] ('s') or [1, N, 1] ('m')
    got = sbnn[3].sbnn_var
    torch.testing.assert_close(got, want.reshape(-1, 1).expand_as(got))


@pytest.mark.parametrize("sm", ["s", "m"])
def test_a_pre_hook_registered_after_the_conversion_that_changes_the_input_raises(sm):
    """A forward pre-hook registered on a converted neuron (after the link's own, which
    takes the variance of the input) that changes the input (``x * 2``): the spikes were
    drawn with the variance of the unchanged input, a quarter of the true one, silently.
    It raises now, naming the neuron and the fix; registered with ``prepend=True`` (before
    the link's hook) the same hook runs and the variance follows it; hooks that pass the
    same values on (``x.as_subclass(torch.Tensor)``, ``x.double()``) still run."""
    from sbnn_addons.moments import VarianceFlowError

    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(6, 5, step_mode=sm),
                        neuron.IFNode(v_threshold=1e9, step_mode=sm))
    x = torch.rand(1, 3, 6) * 3

    def run(model):
        functional.reset_net(model)
        return model(x) if sm == "m" else model(x[0])

    def double(module, args):
        return (args[0] * 2, *args[1:])

    sbnn = sbnn_sj.to_sbnn(net, std=0.1, learn_std=False, spike_std=None)
    handle = sbnn[1].register_forward_pre_hook(double)
    with pytest.raises(VarianceFlowError, match=r"IFNode '1'.*pre-hook.*prepend=True"):
        run(sbnn)
    handle.remove()
    sbnn[1].register_forward_pre_hook(double, prepend=True)
    with torch.no_grad():
        run(sbnn)
    want = 4 * sbnn[0].output_variance(x[0])
    torch.testing.assert_close(sbnn[1].sbnn_var, want.expand_as(sbnn[1].sbnn_var))
    sbnn = sbnn_sj.to_sbnn(net, std=0.1, learn_std=False, spike_std=None)
    sbnn[1].register_forward_pre_hook(
        lambda module, args: (args[0].as_subclass(torch.Tensor), *args[1:]))
    sbnn[1].register_forward_pre_hook(lambda module, args: (args[0].double(), *args[1:]))
    with torch.no_grad():
        run(sbnn)
    torch.testing.assert_close(sbnn[1].sbnn_var, (want / 4).expand_as(sbnn[1].sbnn_var))


def test_variance_through_seq_to_ann_container():
    """The variance of a plain Bayesian conv inside SeqToANNContainer flows through its
    flatten/view ops to the neuron (LIF, decay_input)."""
    torch.manual_seed(1)
    net = nn.Sequential(
        layer.SeqToANNContainer(nn.Conv2d(2, 3, 3, padding=1), nn.AvgPool2d(2)),
        neuron.LIFNode(tau=2.0, v_reset=None, step_mode="m"),
    )
    sbnn = sbnn_sj.to_sbnn(net, std=0.2, learn_std=False, spike_std=None)
    conv, node = sbnn[0][0], sbnn[1]
    x = torch.rand(5, 2, 2, 6, 6)
    seen = _record_fire(node.surrogate_function)
    run_sequence(sbnn, x, "m")
    var_in = [conv.output_variance(xt) for xt in x]
    var_in = [F.avg_pool2d(v, 2) / 4 for v in var_in]  # avg over k=4: sum(var)/k^2
    expected = _expected(var_in, [s for _, s in seen], 0.5, 0.5, False)
    for (got, _), want in zip(seen, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_variance_through_t_last_seq_to_ann_container():
    """SpikingJelly's time-last containers (``[N, *, T]``): TLastSeqToANNContainer runs its
    layers under torch.vmap, whose plain output dropped the variance of a Bayesian layer
    inside, or of a noisy input, silently (the neuron fired without the weight noise,
    std_rho got no gradient). The converted containers pass it on: the neuron receives the
    layer's variance at every step, mean mode equals the original, and the export runs
    SpikingJelly's forward."""
    torch.manual_seed(1)
    net = nn.Sequential(
        layer.TLastSeqToANNContainer(nn.Linear(6, 5)),
        layer.TLastSeqToANNContainer(nn.Unflatten(1, (5, 1)), nn.Flatten(1)),  # no weights
        layer.TLastMultiStepContainer(neuron.LIFNode(tau=2.0, v_reset=None)),
    )
    with torch.no_grad():
        net[0][0].weight.mul_(4.0)
    x = torch.rand(3, 6, 4) * 2  # [N, C, T]
    sbnn = sbnn_sj.to_sbnn(net, std=0.2, spike_std=None)
    fc, node = sbnn[0][0], sbnn[2][0]
    seen = _record_fire(node.surrogate_function)
    functional.reset_net(sbnn)
    out = sbnn(x)
    var_in = [fc.output_variance(x[..., t]) for t in range(x.shape[-1])]
    expected = _expected(var_in, [s for _, s in seen], 0.5, 0.5, False)
    assert len(seen) == x.shape[-1]
    for (got, _), want in zip(seen, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    out.sum().backward()
    assert fc.std_rho.grad.abs().sum() > 0
    with torch.no_grad(), sbnn_addons.mode(sbnn, "mean"):
        functional.reset_net(sbnn)
        functional.reset_net(net)
        assert torch.equal(sbnn(x), net(x))
        back = sbnn_sj.to_spikingjelly(sbnn)
        functional.reset_net(back)
        functional.reset_net(net)
        assert not {"forward"} & (back[0].__dict__.keys() | back[1].__dict__.keys())
        assert torch.equal(back(x), net(x))


class _TimeLast(layer.TLastSeqToANNContainer):
    """A user's subclass of the time-last container that keeps SpikingJelly's forward."""


def test_variance_through_a_subclass_of_the_t_last_seq_to_ann_container():
    """A subclass of ``layer.TLastSeqToANNContainer`` that keeps its forward (torch.vmap
    over time) kept running it: the first training forward raised that the Bayesian
    layer inside ran under torch.vmap, with no way to change that but rewriting the
    container. It converts as the container does: the weight noise reaches the neuron,
    mean mode equals the original, and the export runs SpikingJelly's forward again."""
    torch.manual_seed(1)
    net = nn.Sequential(_TimeLast(nn.Linear(6, 5)),
                        layer.TLastMultiStepContainer(neuron.LIFNode(tau=2.0)))
    with torch.no_grad():
        net[0][0].weight.mul_(4.0)
    x = torch.rand(3, 6, 4) * 2  # [N, C, T]
    sbnn = sbnn_sj.to_sbnn(net)
    functional.reset_net(sbnn)
    sbnn(x).sum().backward()
    assert sbnn[0][0].std_rho.grad.abs().sum() > 0
    with torch.no_grad(), sbnn_addons.mode(sbnn, "mean"):
        functional.reset_net(sbnn)
        functional.reset_net(net)
        assert torch.equal(sbnn(x), net(x))
        back = sbnn_sj.to_spikingjelly(sbnn)
        assert "forward" not in back[0].__dict__
        functional.reset_net(back)
        functional.reset_net(net)
        assert torch.equal(back(x), net(x))


@pytest.mark.parametrize("kind", ["lif_decay_soft", "lif_nodecay_soft", "if_soft"])
def test_stochastic_soft_reset_uses_emitted_spike(kind):
    """With noise, v_after = H - v_th * spike at every step, for the emitted spike."""
    torch.manual_seed(2)
    make = {
        "lif_decay_soft": lambda: neuron.LIFNode(tau=2.0, v_reset=None),
        "lif_nodecay_soft": lambda: neuron.LIFNode(tau=2.0, decay_input=False, v_reset=None),
        "if_soft": lambda: neuron.IFNode(v_reset=None),
    }[kind]
    net = nn.Sequential(layer.Linear(10, 16), make())
    sbnn = sbnn_sj.to_sbnn(net, std=0.5, learn_std=False, spike_std=0.3)
    sbnn_addons.seed_spikes(sbnn, 0)
    lin, node = sbnn[0], sbnn[1]
    beta, c = _beta_c(node)
    x = torch.rand(12, 8, 10)
    functional.reset_net(sbnn)
    v = torch.zeros(8, 16)
    disagreements = 0
    with torch.no_grad():
        for xt in x:
            h = beta * v + c * lin(xt) if not isinstance(node, neuron.IFNode) else v + lin(xt)
            s = sbnn(xt)
            torch.testing.assert_close(node.v, h - node.v_threshold * s, rtol=0, atol=1e-6)
            disagreements += int(((h - node.v_threshold >= 0).float() != s).sum())
            v = node.v.clone()
    assert disagreements > 0  # the spikes really are stochastic


@pytest.fixture
def one_thread():
    """Tiny nets run faster on one thread (and are not slowed by a loaded machine)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_training_digits_lif_multistep(one_thread):
    """A converted layer.Linear + LIFNode net learns rate-coded digits quickly (< 20 s)."""
    t0 = time.perf_counter()
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = load_digits_split(0.25, seed=0)
    net = nn.Sequential(
        layer.Linear(64, 64, step_mode="m"),
        neuron.LIFNode(tau=2.0, v_reset=None, step_mode="m"),
        layer.Linear(64, 10, step_mode="m"),
    )
    sbnn = sbnn_sj.to_sbnn(net, "st", aux_loss=True)
    opt = torch.optim.Adam(sbnn.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _step in range(40):
        idx = torch.randint(0, len(x_tr), (64,), generator=g)
        xs = rate_code(x_tr[idx], 8, generator=g)
        functional.reset_net(sbnn)
        logits = sbnn(xs).mean(0)
        loss = F.cross_entropy(logits, y_tr[idx]) + 1e-6 * sbnn_addons.aux_loss(sbnn)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad(), sbnn_addons.mode(sbnn, "mean"):
        functional.reset_net(sbnn)
        pred = sbnn(rate_code(x_te, 8, generator=g)).mean(0).argmax(-1)
    acc = (pred == y_te).float().mean().item()
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert acc >= 0.30, acc
    assert time.perf_counter() - t0 < 20


@pytest.mark.skipif(not DVS_DIR.is_dir(), reason="DVS Gesture frames not available")
def test_real_dvs_gesture_smoke():
    """A small converted conv net on real DVS Gesture frames: finite outputs and grads."""
    frames, labels = load_dvs_gesture_32(DVS_DIR, "test", frame_stride=8)
    x = torch.as_tensor(frames[:4]).float().transpose(0, 1)  # [T, N, 2, 32, 32]
    y = torch.as_tensor(labels[:4])
    torch.manual_seed(0)
    net = nn.Sequential(
        layer.Conv2d(2, 8, 3, padding=1, bias=False, step_mode="m"),
        layer.BatchNorm2d(8, step_mode="m"),
        neuron.ParametricLIFNode(step_mode="m", detach_reset=True),
        layer.MaxPool2d(4, 4, step_mode="m"),
        layer.Flatten(step_mode="m"),
        layer.Linear(8 * 8 * 8, 11, step_mode="m"),
        neuron.LIFNode(tau=2.0, step_mode="m"),
    )
    sbnn = sbnn_sj.to_sbnn(net, "iwst(0.5)", aux_loss=True)
    functional.reset_net(sbnn)
    out = sbnn(x).mean(0)
    loss = F.cross_entropy(out, y) + 1e-10 * sbnn_addons.aux_loss(sbnn)
    loss.backward()
    assert torch.isfinite(out).all() and torch.isfinite(loss)
    grads = [p.grad for p in sbnn.parameters() if p.requires_grad]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    stds = [m.std_rho.grad for m in sbnn.modules() if sbnn_addons.is_bayesian(m)]
    assert any(float(gr.abs().sum()) > 0 for gr in stds)


def test_fused_sequence_aux_loss_with_own_noise_only():
    """A linked node fed by a layer kept deterministic (exclude=...) fires with its own
    noise only; the fused sequence collects the same auxiliary loss as the node's loop."""
    torch.manual_seed(2)
    net = nn.Sequential(layer.Linear(12, 7, step_mode="m"),
                        neuron.LIFNode(tau=2.0, step_mode="m"))
    fused = sbnn_sj.to_sbnn(net, spike_std=0.3, exclude=["0*"])
    sbnn_addons.enable_aux_loss(fused)
    own = _own_loop(fused)
    x = torch.rand(5, 3, 12) * 2
    aux = []
    for model in (fused, own):
        torch.manual_seed(9)
        functional.reset_net(model)
        out = model(x)
        aux.append(sbnn_addons.aux_loss(model))
        assert aux[-1] is not None, "no auxiliary loss collected"
        assert 0 < float(out.detach().mean()) < 1
    torch.testing.assert_close(aux[0], aux[1], rtol=1e-5, atol=0)


class _StaticInput(nn.Module):
    """A Bayesian layer on a static input ``[N, in]``, its output repeated over ``T``
    steps by ``how`` and fed to a multi-step neuron (or, in single-step mode, step by
    step: the reference)."""

    def __init__(self, how: str, steps: int) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.lif = neuron.LIFNode(tau=2.0, v_reset=None, step_mode="m")
        self.how, self.steps = how, steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        t = self.steps
        if self.how == "unsqueeze_add":  # variance [1, N, C]
            z = y.unsqueeze(0) + torch.zeros(t, 1, 1)
        elif self.how == "broadcast_add":  # variance [N, 1] (per-layer std)
            z = y + torch.zeros(t, *y.shape)
        elif self.how == "repeat":
            z = y.unsqueeze(0).repeat(t, 1, 1)
        else:
            z = y.unsqueeze(0).expand(t, -1, -1)
        if self.lif.step_mode == "m":
            return self.lif(z)
        return torch.stack([self.lif(z_t) for z_t in z])


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("how", ["unsqueeze_add", "broadcast_add", "repeat", "expand"])
def test_static_input_broadcast_over_time_keeps_per_step_variance(how, fused):
    """A static Bayesian layer output broadcast over time carries a variance without the
    time dimension (``[N, 1]``, ``[1, N, C]``): the multi-step neuron broadcasts it over
    time, not along the batch. Its membrane variance is the analytic
    ``sum_t beta^(2(T-1-t)) c^2 s^2 sum x^2`` (soft reset), and its spikes and the std's
    gradient equal the single-step loop's under one seed. N = T: the batch dimension
    split as the time dimension raised no error."""
    steps = batch = 4
    torch.manual_seed(0)
    sbnn = sbnn_sj.to_sbnn(_StaticInput(how, steps), std=0.5, spike_std=None)
    if not fused:
        sbnn = _own_loop(sbnn)
    x = torch.randn(batch, 5) * 2
    results = {}
    for sm in ("m", "s"):
        functional.set_step_mode(sbnn, sm)
        functional.reset_net(sbnn)
        sbnn.zero_grad()
        torch.manual_seed(1)
        out = sbnn(x)
        out.sum().backward()
        results[sm] = (out, getattr(sbnn.lif, sbnn_sj.VAR_MEMORY).detach(),
                       sbnn.fc.std_rho.grad.clone())
    var = 0.25 * x.pow(2).sum(1, keepdim=True)  # s^2 sum x^2, [N, 1]
    beta, c = 0.5, 0.5
    want = sum(beta ** (2 * (steps - 1 - t)) * c * c * var for t in range(steps))
    for sm, (_, state, _) in results.items():
        torch.testing.assert_close(state.expand(batch, 6), want.expand(batch, 6),
                                   rtol=1e-5, atol=0, msg=sm)
    assert torch.equal(results["m"][0], results["s"][0])
    assert 0 < float(results["m"][0].detach().mean()) < 1
    torch.testing.assert_close(results["m"][2], results["s"][2], rtol=1e-5, atol=1e-7)


def test_multi_step_variance_that_does_not_broadcast_is_named():
    """A variance attached by hand that does not broadcast to the multi-step input gives
    an error naming both shapes (not a wrong split or a step-count error), as it is
    attached (before: at the neuron)."""
    with pytest.raises(ValueError, match=r"\(5, 1\).*\(4, 3, 6\)"):
        sbnn_addons.attach_variance(torch.rand(4, 3, 6), torch.ones(5, 1))


@pytest.mark.parametrize("kind", ["lif_decay_hard", "if_hard", "plif_hard"])
def test_multistep_pull_with_a_frozen_first_layer_matches_the_steps(kind):
    """Noise scales trained with the first layer frozen (a fine-tune): the fused
    multi-step node applies the auxiliary pull where the steps one by one do (a later
    step's membrane needs a gradient through the reset's spike, whose gradient reaches
    the variance), so ``std_rho`` gets the gradient of the single-step node and of the
    unfrozen model (it was about 0.5 % off, seeded)."""
    make = NEURONS[kind][0]
    torch.manual_seed(1)
    net = nn.Sequential(layer.Linear(8, 16), make("s"), layer.Linear(16, 4), make("s"))
    with torch.no_grad():
        net[0].weight.mul_(3.0)
    x = torch.rand(6, 5, 8)
    grads = {}
    for step_mode in ("s", "m"):
        model = sbnn_sj.to_sbnn(net)
        functional.set_step_mode(model, step_mode)
        for frozen in (False, True):
            model[0].weight.requires_grad_(not frozen)
            model[0].bias.requires_grad_(not frozen)
            model.zero_grad(set_to_none=True)
            sbnn_addons.seed_spikes(model, 0)
            out = run_sequence(model, x, step_mode).sum(0)
            (out - 2).pow(2).mean().backward()
            grads[step_mode, frozen] = {n: p.grad for n, p in model.named_parameters()
                                        if "std_rho" in n}
    ref = grads["s", False]
    assert all(g.abs().sum() > 0 for g in ref.values())
    for key, got in grads.items():
        for name, g in got.items():
            torch.testing.assert_close(g, ref[name], rtol=1e-5, atol=1e-9, msg=f"{key} {name}")


def test_channels_last_frames_give_the_spikes_and_gradients_of_contiguous_ones():
    """A multi-step conv model fed ``channels_last`` frames: the node's state is
    materialised like the input (channels_last), and the fused sequence read the drive in
    memory order against the variances in logical order, so the spikes landed on other
    channels and pixels (per-channel rates 0.0016 and 0.0130 came out 0.0054 and 0.0054),
    silently. Under the same seed the spikes and gradients are those of contiguous frames."""
    torch.manual_seed(0)
    net = nn.Sequential(layer.Conv2d(3, 6, 3, padding=1), neuron.LIFNode(tau=2.0),
                        layer.Conv2d(6, 4, 3, padding=1), neuron.LIFNode(tau=2.0))
    functional.set_step_mode(net, "m")
    model = sbnn_sj.to_sbnn(net, std_mode="channel")
    x = (torch.rand(5, 4, 3, 8, 8) < 0.5).float()
    frames = torch.stack([xt.contiguous(memory_format=torch.channels_last) for xt in x])
    assert frames[0].is_contiguous(memory_format=torch.channels_last)
    runs = []
    for inp in (x, frames):
        sbnn_addons.seed_spikes(model, 0)
        model.zero_grad()
        out = run_sequence(model, inp, "m")
        (out * torch.linspace(-1, 1, 4).view(4, 1, 1)).sum().backward()
        runs.append((out, [p.grad.clone() for p in model.parameters()]))
    assert runs[0][0].sum() > 0
    assert torch.equal(runs[0][0], runs[1][0])
    for want, got in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", [pytest.param("kernel", marks=needs_kernel), "torch"])
def test_fused_sequence_after_a_pooling_equals_the_nodes_own_loop(backend):
    """A pooling between the Bayesian convolution and the node: the input variance the
    sequence receives is itself computed by a variance rule (a carrier); the sequence runs
    plain operations on it (the PyTorch-operations backend ran them through the variance
    flow and raised, naming a host neuron)."""
    torch.manual_seed(0)
    host = nn.Sequential(layer.Conv2d(1, 4, 3, padding=1, step_mode="m"),
                         layer.MaxPool2d(2, step_mode="m"),
                         neuron.LIFNode(tau=2.0, step_mode="m"))
    model = sbnn_sj.to_sbnn(host, std=0.3)
    x = torch.rand(4, 3, 1, 8, 8) * 3
    results = []
    with kernels.use_kernels(backend == "kernel"):
        for own_loop in (False, True):
            if own_loop:
                model[2].surrogate_function.fire = model[2].surrogate_function.fire
            model.zero_grad()
            functional.reset_net(model)
            torch.manual_seed(5)
            out = model(x)
            out.sum().backward()
            results.append((out.detach(), model[0].std_rho.grad.clone()))
    (out_f, g_f), (out_o, g_o) = results
    assert torch.equal(out_f, out_o) and 0 < float(out_f.mean()) < 1
    torch.testing.assert_close(g_f, g_o, rtol=1e-5, atol=1e-7)


def test_groupnorm_pixelshuffle_upsample_before_lif_give_the_exact_variance():
    """Multi-step layer.Conv2d -> layer.GroupNorm -> SeqToANNContainer(PixelShuffle,
    Upsample(bilinear), ConstantPad2d) -> LIFNode raised ('group_norm' had no variance
    rule). Converted, the node receives at every step the conv's LRT variance scaled by the
    GroupNorm's (w / sqrt(s^2 + eps))^2 (statistics of the mean signal of that step),
    moved by the shuffle, mapped by the squared bilinear weights, zero in the padding,
    through the node's dynamics; the conv's std gets a gradient."""
    torch.manual_seed(0)
    net = nn.Sequential(
        layer.Conv2d(1, 8, 3, padding=1, step_mode="m"),
        layer.GroupNorm(4, 8, step_mode="m"),
        layer.SeqToANNContainer(nn.PixelShuffle(2), nn.Upsample(scale_factor=2, mode="bilinear"),
                                nn.ConstantPad2d(1, 0.25)),
        neuron.LIFNode(tau=2.0, v_reset=None, step_mode="m"),
    )
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 2.0)
    x = torch.rand(3, 2, 1, 4, 4) * 2
    sbnn = _own_loop(sbnn_sj.to_sbnn(net, std=0.3, spike_std=None, example_input=x))
    conv, gn, node = sbnn[0], sbnn[1], sbnn[3]
    seen = _record_fire(node.surrogate_function)
    functional.reset_net(sbnn)
    out = sbnn(x)
    n = 64
    basis = torch.eye(n).view(n, 1, 8, 8)
    squared = F.interpolate(basis, scale_factor=2, mode="bilinear").view(n, -1).t() ** 2
    var_in = []
    for xt in x:
        with sbnn_addons.moments.no_variance_flow():
            mean = F.conv2d(xt, conv.weight, conv.bias, padding=1)
        s2 = mean.view(2, 4, -1).var(-1, unbiased=False).repeat_interleave(2, 1)
        scale = (gn.weight / torch.sqrt(s2 + gn.eps)) ** 2
        var = F.pixel_shuffle(conv.output_variance(xt) * scale.view(2, 8, 1, 1), 2)
        var_in.append(F.pad((var.reshape(2, 2, n) @ squared.t()).view(2, 2, 16, 16),
                            (1, 1, 1, 1)))
    expected = _expected(var_in, [s for _, s in seen], 0.5, 0.5, False)
    assert len(seen) == x.shape[0]
    for (got, _), want in zip(seen, expected):
        torch.testing.assert_close(got.expand_as(want), want, rtol=1e-5, atol=1e-7)
    out.sum().backward()
    assert conv.std_rho.grad.abs() > 0


def test_synapse_filter_fed_by_a_bayesian_layer_raises_naming_it():
    """layer.SynapseFilter between a Bayesian layer and a neuron: its current multiplies
    the input by its own state and carries every earlier step's noise, which the neuron's
    membrane carries too (correlated across steps); the conversion check raises naming the
    SynapseFilter and the fix (before: an error about a correlated 'add' inside it), in
    sample and mean mode. After the neuron, on spikes, it runs."""
    def net(after):
        filt = layer.SynapseFilter(tau=5.0, step_mode="m")
        mods = [layer.Linear(8, 6, step_mode="m"), neuron.LIFNode(step_mode="m")]
        mods.insert(2 if after else 1, filt)
        return nn.Sequential(*mods)

    x = torch.rand(4, 2, 8)
    with pytest.raises(sbnn_addons.VarianceFlowError, match="SynapseFilter.*after the neuron"):
        sbnn_sj.to_sbnn(net(False), example_input=x)
    model = sbnn_sj.to_sbnn(net(False))
    for mode in ("sample", "mean"):
        functional.reset_net(model)
        with sbnn_addons.mode(model, mode), pytest.raises(
                sbnn_addons.VarianceFlowError, match="SynapseFilter.*exclude="):
            model(x)
    ok = sbnn_sj.to_sbnn(net(True), example_input=x)
    functional.reset_net(ok)
    ok(x).sum().backward()
    assert ok[0].std_rho.grad.abs() > 0


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "pytorch-path"])
def test_both_step_modes_draw_every_step_independently_at_phi_z(kernel):
    """Single-step and multi-step mode, each a valid independent draw per step (fixed
    seed, 20k neurons, 4 standard errors). An IFNode (hard reset to 0) driven by 1.25 each
    step, own noise std 0.5, no weight noise: the first step fires with Phi(0.5); a neuron
    that fired is back at 0, so its second step fires with Phi(0.5) again, independently
    of the first (a draw reused across steps would fire it again for sure); one that did
    not holds 1.25 and fires with Phi(3). With the spike functions seeded
    (``seed_spikes``) the two modes draw the same spikes; from the global generator they
    draw in another order (docs: port-spikingjelly, step modes)."""
    import contextlib
    import math

    n = 20_000
    p, q = (0.5 * math.erfc(-z / math.sqrt(2.0)) for z in (0.5, 3.0))
    model = sbnn_sj.to_sbnn(nn.Sequential(neuron.IFNode()), spike_std=0.5, learn_std=False)
    x = torch.full((2, n), 1.25)

    def near(got: torch.Tensor, prob: float) -> None:
        rate, m = float(got.float().mean()), got.numel()
        assert abs(rate - prob) <= 4 * math.sqrt(prob * (1 - prob) / m), (rate, prob, m)

    spikes = {}
    for mode in ("s", "m"):
        functional.reset_net(model)
        functional.set_step_mode(model, mode)
        sbnn_addons.seed_spikes(model, 0)
        with torch.no_grad(), (contextlib.nullcontext() if kernel
                               else kernels.use_kernels(False)):
            out = model(x) if mode == "m" else torch.stack([model(x[t]) for t in range(2)])
        first, second = out[0].bool(), out[1].bool()
        near(first, p)
        near(second[first], p)  # independent of the first step's draw
        near(second[~first], q)
        near(first & second, p * p)
        spikes[mode] = out
    assert torch.equal(spikes["s"], spikes["m"])


@pytest.mark.parametrize("kind", ["lif", "plif", "if"])
def test_learned_threshold_and_reset_get_their_gradient_in_multi_step_mode(kind):
    """A ``v_threshold`` / ``v_reset`` made an ``nn.Parameter`` (a learned threshold): the
    fused sequence reads the node's constants as numbers, so such a node runs its own loop
    in multi-step mode, and both get the gradient single-step mode gives them (one layer,
    so both modes draw in the same order)."""
    make = {"lif": lambda sm: neuron.LIFNode(tau=2.0, step_mode=sm),
            "plif": lambda sm: neuron.ParametricLIFNode(init_tau=2.0, step_mode=sm),
            "if": lambda sm: neuron.IFNode(step_mode=sm)}[kind]
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(12, 9, step_mode="m"), make("m"))
    net[1].v_threshold = nn.Parameter(torch.tensor(1.0))
    net[1].v_reset = nn.Parameter(torch.tensor(0.1))
    with torch.no_grad():
        net[0].weight.mul_(3.0)
    sbnn = sbnn_sj.to_sbnn(net, std=0.4)
    x = (torch.rand(8, 5, 12) < 0.5).float()
    grads = {}
    for sm in ("m", "s"):
        functional.set_step_mode(sbnn, sm)
        functional.reset_net(sbnn)
        sbnn.zero_grad()
        torch.manual_seed(1)
        out = sbnn(x) if sm == "m" else torch.stack([sbnn(xt) for xt in x])
        (out * torch.linspace(0.5, 1.5, 9)).sum().backward()
        grads[sm] = {n: p.grad for n, p in sbnn[1].named_parameters()
                     if n in ("v_threshold", "v_reset")}
    assert set(grads["m"]) == {"v_threshold", "v_reset"}
    for name, g in grads["m"].items():
        assert g is not None and g.abs() > 0, name
        torch.testing.assert_close(g, grads["s"][name], rtol=1e-5, atol=1e-6, msg=name)
