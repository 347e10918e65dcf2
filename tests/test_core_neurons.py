"""Framework-free ``LIF`` against a hand-written loop of Method page, section 3."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _kernel import needs_kernel
from torch import nn

import sbnn_addons as sb
from sbnn_addons import LIF, BayesLinear, IWSTSpike, LIFState, attach_variance, get_variance

T, B, N = 6, 4, 5


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    current = torch.rand(T, B, N, generator=gen) * 1.2
    var = torch.rand(T, B, N, generator=gen) * 0.3
    return current, var


def _reference(current, var, beta, theta, own_std, eps=None, reset="subtract"):
    """Method page, section 3 recurrences written out: u = beta u + I, V = beta^2 V + var,
    h = 1[u - theta + sqrt(V + s_n^2) eps > 0], u -= theta h."""
    u = torch.zeros_like(current[0])
    v = torch.zeros_like(current[0])
    spikes, vs = [], []
    for t in range(current.shape[0]):
        u = beta * u + current[t]
        v = beta * beta * v + var[t]
        sigma = torch.sqrt(v + own_std**2)
        drive = u - theta
        noisy = drive if eps is None else drive + sigma * eps[t]
        h = (noisy > 0).float()
        if reset == "subtract":
            u = u - theta * h
        elif reset == "zero":
            u = u * (1 - h)
        spikes.append(h)
        vs.append(v)
    return torch.stack(spikes), torch.stack(vs), u


def _run(lif, current, var):
    state, out, vs = None, [], []
    for t in range(current.shape[0]):
        c = attach_variance(current[t].clone(), var[t])
        h, state = lif(c, state)
        out.append(h)
        vs.append(state.variance)
    return torch.stack(out), torch.stack(vs), state.membrane


@pytest.mark.parametrize("reset", ["subtract", "zero", "none"])
def test_mean_mode_matches_reference_exactly(reset):
    current, var = _inputs()
    lif = LIF(beta=0.905, threshold=1.0, spike_fn=IWSTSpike(std=0.3), reset=reset)
    sb.set_mode(lif, "mean")
    h, v, u = _run(lif, current, var)
    h_ref, v_ref, u_ref = _reference(current, var, 0.905, 1.0, 0.3, reset=reset)
    assert torch.equal(h, h_ref) and torch.equal(v, v_ref) and torch.equal(u, u_ref)
    assert 0 < h.mean() < 1


def test_sample_mode_seeded_matches_reference_exactly():
    """Same eps stream (generator seeded 7, one randn per step): identical spikes, V and u
    (exact equality), and different from the noise-free pass. PyTorch path (the fused
    kernel draws from its own Philox stream, checked in test_kernels.py)."""
    current, var = _inputs(1)
    spike = IWSTSpike("iwst(0.5)", std=0.2)
    spike.manual_seed(7)
    lif = LIF(beta=0.8, threshold=1.0, spike_fn=spike)
    with sb.kernels.use_kernels(False):
        h, v, u = _run(lif, current, var)
    gen = torch.Generator().manual_seed(7)
    eps = torch.stack([torch.randn(B, N, generator=gen) for _ in range(T)])
    h_ref, v_ref, u_ref = _reference(current, var, 0.8, 1.0, 0.2, eps=eps)
    assert torch.equal(h, h_ref) and torch.equal(v, v_ref)
    torch.testing.assert_close(u, u_ref, rtol=0, atol=0)
    # and the sample differs from the mean-mode pass (noise matters)
    assert not torch.equal(h_ref, _reference(current, var, 0.8, 1.0, 0.2)[0])


def test_variance_accumulates_beta_squared():
    """V_t = beta^2 V_{t-1} + var_t: constant var c gives c (1 - beta^(2t)) / (1 - beta^2)."""
    beta, c = 0.9, 0.25
    lif = LIF(beta=beta, spike_fn=IWSTSpike())
    current = attach_variance(torch.zeros(8, 3), torch.full((8, 3), c))
    state = None
    for t in range(1, 9):
        cur = attach_variance(torch.zeros(3), torch.full((3,), c))
        _, state = lif(cur, state)
        want = c * (1 - beta ** (2 * t)) / (1 - beta**2)
        torch.testing.assert_close(state.variance, torch.full((3,), want), rtol=1e-6, atol=0)
    assert lif.run(current).shape == (8, 3)


def test_run_equals_stepping_and_reads_sequence_variance():
    current, var = _inputs(2)
    spike = IWSTSpike("agr", std=0.1)
    lif = LIF(spike_fn=spike)
    spike.manual_seed(3)
    h_step, _, _ = _run(lif, current, var)
    spike.manual_seed(3)
    h_run = lif.run(attach_variance(current.clone(), var))
    assert torch.equal(h_run, h_step)


def test_binary_special_case():
    """T = 1, theta = 0, beta = 0: h = 1[I + sqrt(var) eps > 0], firing rate Phi(I/sigma)
    (200k units, tolerance 4 standard errors); mean mode is 1[I > 0]."""
    n = 200_000
    lif = LIF(beta=0.0, threshold=0.0, spike_fn=IWSTSpike())
    cur = attach_variance(torch.full((n,), 0.3), torch.full((n,), 0.36))
    torch.manual_seed(0)
    h, state = lif(cur)
    p = float(torch.special.ndtr(torch.tensor(0.5)))
    assert abs(float(h.mean()) - p) <= 4 * math.sqrt(p * (1 - p) / n)
    sb.set_mode(lif, "mean")
    x = torch.linspace(-1, 1, 11)
    assert torch.equal(lif(attach_variance(x.clone(), torch.ones(11)))[0], (x > 0).float())


def test_bptt_reaches_std_and_flow_not_double_counted():
    """Gradients reach the Bayesian layer's std through V; running inside variance_flow()
    (needed when pooling sits before the neuron) gives the same spikes and V as without."""
    torch.manual_seed(0)
    layer = BayesLinear(3, 4, std=0.4)
    x = torch.rand(T, 2, 3)
    outs = {}
    for flow in (False, True):
        spike = IWSTSpike("iwst(0.5)", std=0.1)
        spike.manual_seed(1)
        lif = LIF(spike_fn=spike)
        layer.zero_grad()
        ctx = sb.variance_flow() if flow else torch.enable_grad()
        with ctx:
            state, hs = None, []
            for t in range(T):
                h, state = lif(layer(x[t]), state)
                hs.append(h)
        torch.stack(hs).sum().backward()
        outs[flow] = (torch.stack(hs), state.variance.detach(), layer.std_rho.grad.clone())
    assert outs[False][2].abs() > 0
    assert torch.equal(outs[False][0], outs[True][0])
    torch.testing.assert_close(outs[False][1], outs[True][1], rtol=1e-6, atol=0)
    torch.testing.assert_close(outs[False][2], outs[True][2], rtol=1e-5, atol=0)
    assert get_variance(state.membrane) is None


@pytest.mark.parametrize(
    "call, exc, word",
    [
        (lambda: LIF(beta=1.5), ValueError, "beta"),
        (lambda: LIF(reset="hard"), ValueError, "reset"),
        (lambda: LIF()(torch.ones(3, dtype=torch.long)), TypeError, "current"),
        (lambda: LIF()(torch.ones(3), (torch.zeros(4), torch.zeros(4))), ValueError, "state"),
    ],
)
def test_bad_input(call, exc, word):
    with pytest.raises(exc, match=rf"\b{word}\b"):
        call()


@needs_kernel
@pytest.mark.parametrize("reset", ["subtract", "zero", "none"])
@pytest.mark.parametrize("extra", [None, "own noise", "aux loss"])
def test_fused_lif_run_equals_the_step_loop(reset, extra, monkeypatch):
    """With the kernel, LIF.run runs the sequence as kernels.lif_sequence, and a step
    runs as kernels.fused_lif_step: spikes equal those of the step-by-step PyTorch
    operations around the spike kernel (lif_fire) bitwise (same Philox keys), and the
    gradients of the layer's weights and std, the spike's own learned std and the
    auxiliary loss agree to rtol 1e-5."""
    torch.manual_seed(0)
    layer = BayesLinear(7, N, std=0.3)
    with torch.no_grad():
        layer.weight.mul_(3.0)
    x = torch.rand(T, B, 7)
    spike = IWSTSpike("agr(0.5)", std=0.2 if extra == "own noise" else None,
                      learn_std=extra == "own noise")
    lif = LIF(beta=0.85, spike_fn=spike, reset=reset)
    if extra == "aux loss":
        sb.enable_aux_loss(lif)
    loop = copy.deepcopy((layer, lif))
    loop[1]._fused = lambda *args: None  # step by step, each step fused
    plain = copy.deepcopy(loop)
    plain[1]._fused_step = lambda *args: None  # the step-by-step PyTorch reference
    calls, fire = [], IWSTSpike.fire
    monkeypatch.setattr(IWSTSpike, "fire",  # a class-level spy: the kernels still serve
                        lambda self, *a, **k: calls.append(1) or fire(self, *a, **k))
    results = []
    for lay, neuron in ((layer, lif), loop, plain):
        torch.manual_seed(4)
        spikes = neuron.run(lay(x))
        if neuron is lif:
            assert not calls  # the fused sequence never calls fire
        loss = (spikes * torch.linspace(-1, 2, N)).sum()
        if extra == "aux loss":
            aux = sb.aux_loss(neuron)
            assert aux is not None and aux > 0
            loss = loss + 0.1 * aux
        loss.backward()
        params = list(lay.named_parameters()) + list(neuron.named_parameters())
        results.append((spikes.detach(), {n: p.grad.clone() for n, p in params}))
    (s_l, g_l) = results[2]
    assert 0.05 < float(s_l.mean()) < 0.95
    for s_f, g_f in results[:2]:
        assert torch.equal(s_f, s_l)
        assert g_f.keys() == g_l.keys()
        for name in g_f:
            torch.testing.assert_close(g_f[name], g_l[name], rtol=1e-5, atol=1e-6, msg=name)


@needs_kernel
def test_fused_lif_run_saves_its_tensors_through_autograd():
    """Everything the fused sequence keeps for its backward goes through
    save_for_backward (so saved-tensor hooks, and activation checkpointing, see it): per
    step the drive (float32), the spikes as bytes and the compact variance."""
    torch.manual_seed(0)
    currents = torch.rand(T, B, N, requires_grad=True)
    var = torch.rand(T, B, 1) * 0.2
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t,
                                                  lambda t: t):
        spikes = LIF(spike_fn=IWSTSpike("st")).run(attach_variance(currents, var))
    kinds = [(t.dtype, tuple(t.shape)) for t in packed]
    assert kinds.count((torch.float32, (B, N))) >= T  # the drives
    assert kinds.count((torch.uint8, (B, N))) == T  # the spikes as bytes
    assert kinds.count((torch.float32, (B, 1))) >= T  # the variances, compact
    spikes.sum().backward()
    assert currents.grad is not None and currents.grad.abs().sum() > 0


def _graph_size(t: torch.Tensor) -> int:
    """Autograd nodes reachable from ``t``."""
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return len(seen)


def _std_pair():
    torch.manual_seed(0)
    layer = BayesLinear(3, 4, std=0.4)
    channel = BayesLinear(3, 4, std=0.4, std_mode="channel")
    channel.load_state_dict({**layer.state_dict(),
                             "std_rho": layer.std_rho.detach().expand(4).clone()})
    return layer, channel


@pytest.mark.parametrize("modify_state", [False, True])
def test_factored_variance_runs_the_recurrence_on_f(modify_state):
    """With a per-layer std, var(I_t) = s^2 F_t and V_t = s^2 G_t, G_t = beta^2 G_{t-1} + F_t:
    the same spikes, V and std gradient as the per-channel layer with equal stds (a tensor
    variance), and a graph for V_T that does not grow with T. A state whose V was changed
    in place goes back to the tensor recurrence (same results)."""
    layer, channel = _std_pair()
    x = torch.rand(T, 2, 3)
    outs = {}
    for name, lin in (("layer", layer), ("channel", channel)):
        spike = IWSTSpike("agr", std=0.1)
        spike.manual_seed(1)
        lif = LIF(spike_fn=spike)
        state, hs = None, []
        with sb.share_posterior():
            for t in range(T):
                h, state = lif(lin(x[t]), state)
                if modify_state and t == 2:
                    state.variance.mul_(1.5)
                hs.append(h)
        sizes = _graph_size(state.variance)
        torch.stack(hs).sum().backward()
        outs[name] = (torch.stack(hs), state.variance.detach(), lin.std_rho.grad.sum(), sizes)
    assert torch.equal(outs["layer"][0], outs["channel"][0])
    torch.testing.assert_close(outs["layer"][1].expand_as(outs["channel"][1]),
                               outs["channel"][1], rtol=1e-6, atol=0)
    assert outs["layer"][2].abs() > 0
    torch.testing.assert_close(outs["layer"][2], outs["channel"][2], rtol=1e-5, atol=0)
    if not modify_state:
        assert outs["layer"][3] <= 5 < 2 * T <= outs["channel"][3]


@needs_kernel
def test_a_step_is_one_kernel_node_and_falls_back_where_it_must():
    """A float32 CPU step runs as one LIFStep node (spikes and membrane); float64, the
    mean mode and a broadcast membrane take the PyTorch operations, with the same
    spikes in the mean mode."""
    torch.manual_seed(0)
    layer = BayesLinear(6, N, std=0.3)
    x = torch.rand(B, 6)
    lif = LIF(beta=0.9, spike_fn=IWSTSpike("st"))
    spikes, state = lif(layer(x), LIFState(torch.rand(B, N), torch.zeros(())))
    assert spikes.grad_fn is state.membrane.grad_fn
    assert type(spikes.grad_fn).__name__ == "LIFStepBackward"
    spikes, state = lif(layer(x), LIFState(torch.zeros(()), torch.zeros(())))  # broadcast
    assert type(spikes.grad_fn).__name__ != "LIFStepBackward"
    double = copy.deepcopy((layer, lif))
    double[0].double()
    spikes, _ = double[1](double[0](x.double()))
    assert spikes.dtype == torch.float64
    assert type(spikes.grad_fn).__name__ != "LIFStepBackward"
    sb.set_mode(lif, "mean")
    mean, _ = lif(layer(x))
    assert torch.equal(mean, (layer(x) > 1.0).float())


def test_lif_refuses_nan_threshold_and_beta_outside_the_unit_interval():
    """A NaN threshold never fires (silently); an infinite one is a membrane readout, with
    a reset that keeps the membrane finite (test_bad_input has its values)."""
    with pytest.raises(ValueError, match="threshold"):
        sb.LIF(threshold=float("nan"))
    with pytest.raises(ValueError, match="beta"):
        sb.LIF(beta=1.5)
    assert sb.LIF(threshold=float("inf"), reset="none").threshold == float("inf")


def test_lif_refuses_a_learnable_beta_or_threshold():
    """The core LIF's decay and threshold are fixed numbers: an ``nn.Parameter`` passed
    for them was read as a float (never learned, silently), and one assigned after
    construction was registered as a parameter whose gradient stayed 0."""
    learnable = torch.nn.Parameter(torch.tensor(0.9))
    for name in ("beta", "threshold"):
        with pytest.raises(TypeError, match=f"{name}.*fixed number.*learned"):
            sb.LIF(**{name: learnable})
        lif = sb.LIF()
        with pytest.raises(TypeError, match=f"{name}.*fixed number.*learned"):
            setattr(lif, name, learnable)
        assert not list(lif.parameters())
    assert sb.LIF(beta=torch.tensor(0.5)).beta == 0.5  # a plain tensor: its value


def test_lif_checks_beta_and_threshold_assigned_after_construction():
    """``lif.beta = 1.5`` (a growing membrane) or ``lif.threshold = nan`` (never fires)
    assigned after construction were taken as they were; they are refused as at
    construction, and a valid value is stored as a float."""
    lif = sb.LIF()
    with pytest.raises(ValueError, match="beta"):
        lif.beta = 1.5
    with pytest.raises(ValueError, match="threshold"):
        lif.threshold = float("nan")
    with pytest.raises(ValueError, match="reset='none'"):
        lif.threshold = math.inf  # with the subtract reset: a NaN membrane
    lif.beta, lif.threshold = torch.tensor(0.5), 2
    assert (lif.beta, lif.threshold) == (0.5, 2.0)
    assert type(lif.beta) is float and type(lif.threshold) is float


def test_run_with_a_frozen_layer_in_front_pulls_as_the_steps_do():
    """``LIF.run`` with the auxiliary pull and currents that need no gradient (the layer in
    front frozen, only noise scales trained): the pull still acts where the steps one by
    one apply it (later membranes need a gradient through the reset's spike), so the
    std's gradient is the unfrozen model's, seeded."""
    torch.manual_seed(0)
    fc = BayesLinear(8, 16)
    with torch.no_grad():
        fc.weight.mul_(3.0)
    lif = LIF(spike_fn=IWSTSpike("st", std=0.2, learn_std=True, aux_pull=1e-2))
    x = torch.rand(6, 5, 8)
    grads = []
    for frozen in (False, True):
        fc.weight.requires_grad_(not frozen)
        fc.bias.requires_grad_(not frozen)
        fc.zero_grad(set_to_none=True)
        lif.zero_grad(set_to_none=True)
        sb.seed_spikes(lif, 0)
        (lif.run(fc(x)).sum(0) - 2).pow(2).mean().backward()
        grads.append((fc.std_rho.grad, lif.spike_fn.std_rho.grad))
    for a, b in zip(*grads):
        assert a.abs().sum() > 0
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-9)


def test_run_on_channels_last_currents_equals_contiguous():
    """``LIF.run`` of a channels_last conv output (time folded in the batch): its zero
    membrane is made like the input, and the fused sequence paired the drive (memory
    order) with the variances (logical order) wrongly. Same seed: the same spikes and
    gradients as the contiguous currents."""
    torch.manual_seed(0)
    conv = sb.BayesConv2d(3, 6, 3, padding=1, std=0.3, std_mode="channel")
    lif = sb.LIF(spike_fn=sb.IWSTSpike(std=0.1))
    x = (torch.rand(5 * 4, 3, 8, 8) < 0.5).float()
    runs = []
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        sb.seed_spikes(lif, 0)
        conv.zero_grad()
        currents = conv(inp).reshape(5, 4, 6, 8, 8)
        spikes = lif.run(currents)
        (spikes * torch.linspace(-1, 1, 6).view(6, 1, 1)).sum().backward()
        runs.append((spikes, conv.weight.grad.clone(), conv.std_rho.grad.clone()))
    assert runs[0][0].sum() > 0
    assert torch.equal(runs[0][0], runs[1][0])
    for want, got in zip(runs[0][1:], runs[1][1:]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kernel", [True, False])
def test_threshold_assigned_after_construction_reaches_the_aux_terms(kernel):
    """``lif.threshold = inf`` set after construction (a membrane readout) leaves the
    readout out of the auxiliary loss, as one built with it: the spike function kept the
    old threshold, and the loss was ``inf``; an assigned finite threshold centres ``z``
    (``aux_center="zero"``) as one built with it."""
    torch.manual_seed(0)
    fc = BayesLinear(6, 3, std=0.3)
    x = torch.rand(3, 4, 6) * 2
    for threshold, centre in ((math.inf, "threshold"), (0.5, "zero")):
        losses = []
        for assign in (False, True):
            lif = LIF(threshold=1.0 if assign else threshold, reset="none",
                      spike_fn=IWSTSpike("st", std=0.2, aux_center=centre))
            if assign:
                lif.threshold = threshold
            sb.enable_aux_loss(lif)
            torch.manual_seed(1)
            with sb.kernels.use_kernels(kernel):
                state = None
                for t in range(len(x)):
                    _, state = lif(fc(x[t]), state)
            losses.append(sb.aux_loss(lif))
        assert torch.isfinite(losses[1])
        torch.testing.assert_close(losses[1], losses[0])


def test_threshold_assigned_after_construction_reaches_the_spike_function():
    """``lif.threshold = 2.0`` after construction: the spike function, whose auxiliary
    loss centres ``z`` on the threshold (``aux_center="zero"``) and which skips the aux
    terms of an infinite one, kept the threshold of the constructor."""
    lif = sb.LIF(threshold=1.0, reset="none")
    lif.threshold = 2.0
    assert lif.spike_fn.threshold == 2.0
    lif.threshold = math.inf
    assert lif.spike_fn.threshold == math.inf and not lif.spike_fn.threshold_finite


_SPIKE_WEIGHTS = torch.randn(4, 4, 5, generator=torch.Generator().manual_seed(1))


def _loss_through_spikes(model, x):
    """A loss on the spikes of ``model`` (a Sequential ending in a core LIF or an
    IWSTSpike) over the steps of ``x [T, B, F]``, with fixed random weights."""
    weights = _SPIKE_WEIGHTS[:len(x), :x.shape[1]]
    if isinstance(model[-1], LIF):
        spikes = model[-1].run(model[0](x))
    else:
        spikes = model(x)
    return (spikes * weights).sum()


@pytest.mark.parametrize("alone", [False, True], ids=["LIF", "IWSTSpike"])
def test_a_gradient_through_noiseless_spikes_is_refused(alone):
    """Spikes drawn without any noise (no Bayesian layer in front, and a spike function
    with no std of its own: the core LIF's default) fire deterministically and their
    gradient is 0: a loss on them trained nothing before the neuron, without an error.
    The backward names the cause and the fix; a pass without gradient runs, and with
    noise of its own the layer gets its gradient."""
    layer = nn.Linear(6, 5)
    model = nn.Sequential(layer, IWSTSpike() if alone else LIF())
    x = torch.rand(4, 3, 6, generator=torch.Generator().manual_seed(0)) * 2
    with pytest.raises(sb.VarianceFlowError,
                       match=r"(?s)no noise of its own.*BayesLinear.*std=0.4"):
        _loss_through_spikes(model, x).backward()
    with torch.no_grad():
        _loss_through_spikes(model, x)
    model[1] = IWSTSpike(std=0.4) if alone else LIF(spike_fn=IWSTSpike(std=0.4))
    _loss_through_spikes(model, x).backward()
    assert layer.weight.grad.abs().sum() > 0


def test_mean_mode_gives_the_deterministic_networks_gradient_and_warns_when_trained():
    """``mean`` mode is the deterministic network, whose exact gradient through a spike
    without noise of its own is 0: a backward runs (as for any deterministic model). An
    optimiser step in that mode warns, naming the zero gradient and ``sample`` mode."""
    layer = BayesLinear(6, 5, std=0.3)
    model = nn.Sequential(layer, LIF())
    sb.set_mode(model, "mean")
    x = torch.rand(4, 3, 6, generator=torch.Generator().manual_seed(0)) * 4
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _loss_through_spikes(model, x).backward()
    assert not layer.weight.grad.any()
    opt.step()
    with pytest.warns(UserWarning, match=r"(?s)'mean' mode.*zero gradient.*'sample'"):
        _loss_through_spikes(model, x)


def test_a_lif_whose_membrane_has_variance_from_earlier_steps_passes_the_gradient():
    """A step whose current carries no variance still draws with the membrane variance
    of the steps before it: its spikes have noise, and their gradient is not refused."""
    lif = LIF()
    x = torch.rand(3, 5, requires_grad=True)
    state = None
    spikes, state = lif(attach_variance(x, torch.full_like(x, 0.2)), state)
    spikes2, state = lif(x * 1.5, state)  # no variance on this current
    (spikes + spikes2).sum().backward()
    assert x.grad.abs().sum() > 0


def test_a_compiled_step_through_noiseless_spikes_fails_its_backward():
    """Under ``torch.compile`` (fullgraph) the check is an assertion in the backward: a
    core LIF behind a plain layer fails, naming the fix; behind a Bayesian layer it
    trains."""
    x = torch.rand(3, 4, 6, generator=torch.Generator().manual_seed(0)) * 2
    for layer, fails in ((nn.Linear(6, 5), True), (BayesLinear(6, 5, std=0.3), False)):
        model = nn.Sequential(layer, LIF())
        step = torch.compile(lambda x, model=model: _loss_through_spikes(model, x),
                             fullgraph=True, backend="aot_eager")
        if fails:
            with pytest.raises(RuntimeError, match="(?s)no noise of its own.*BayesLinear"):
                step(x).backward()
        else:
            step(x).backward()
            assert layer.weight.grad.abs().sum() > 0
