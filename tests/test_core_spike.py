"""``IWSTSpike``: the drop-in stochastic spike module (Method page, sections 1, 4, 7)."""

from __future__ import annotations

import contextlib
import copy
import io
import math
import pickle
import re
import warnings

import pytest
import torch
from _kernel import needs_kernel

import sbnn_addons as sb
from sbnn_addons import BayesLinear, IWSTSpike, VarianceFlowError, attach_variance, seed_spikes


def test_mean_mode_is_deterministic_threshold():
    u = torch.linspace(-1, 1, 21)
    u = attach_variance(u, torch.full_like(u, 4.0))
    spike = IWSTSpike("agr", std=1.0)
    with sb.mode(spike, "mean"):
        for _ in range(3):
            assert torch.equal(spike(u), (u > 0).float())
    spike_z = IWSTSpike(std=1.0, at_zero=True)
    sb.set_mode(spike_z, "mean")
    assert torch.equal(spike_z(torch.zeros(3)), torch.ones(3))


def test_sampling_uses_attached_plus_own_variance():
    """sigma^2 = V(u) + s_n^2: the firing rate over 200k units equals Phi(u / sigma).
    Tolerance: 4 standard errors of a proportion."""
    n = 200_000
    u = torch.full((n,), -0.5)
    u = attach_variance(u, torch.full((n,), 0.09))
    spike = IWSTSpike(std=0.4)  # sigma = sqrt(0.09 + 0.16) = 0.5 -> P = Phi(-1)
    spike.manual_seed(0)
    var = spike.noise_variance(u)
    torch.testing.assert_close(var, torch.full((n,), 0.25), rtol=1e-6, atol=0)
    rate = float(spike(u).mean())
    p = float(torch.special.ndtr(torch.tensor(-1.0)))
    assert abs(rate - p) <= 4 * math.sqrt(p * (1 - p) / n)
    # use_input_variance=False ignores the attached variance: sigma = 0.4
    spike2 = IWSTSpike(std=0.4, use_input_variance=False)
    torch.testing.assert_close(spike2.noise_variance(u), torch.tensor(0.16), rtol=1e-6, atol=0)


def test_no_noise_fires_deterministically():
    u = torch.tensor([-0.1, 0.0, 0.1])
    spike = IWSTSpike()
    assert spike.noise_variance(u) is None
    assert torch.equal(spike(u), torch.tensor([0.0, 0.0, 1.0]))


def test_fire_explicit_variance_and_gradient():
    """fire(u, var) samples with sigma = sqrt(var) and backpropagates J(h) to u and, through
    sigma, to the variance; equals BernoulliSpike with the same eps (exact). PyTorch path;
    the fused kernel is checked in test_kernels.py."""
    with sb.kernels.use_kernels(False):
        _check_fire_explicit_variance()


def _check_fire_explicit_variance():
    u = torch.tensor([0.3, -0.2, 1.0], requires_grad=True)
    var = torch.tensor([0.5, 1.0, 2.0], requires_grad=True)
    spike = IWSTSpike("iwst(0.5)")
    spike.manual_seed(3)
    h = spike.fire(u, var)
    eps = torch.randn(3, generator=torch.Generator().manual_seed(3))
    u2 = u.detach().clone().requires_grad_(True)
    s2 = var.detach().sqrt().requires_grad_(True)
    h2 = sb.BernoulliSpike.apply(u2, s2, eps, sb.IWST(0.5), False)
    assert torch.equal(h, h2)
    h.sum().backward()
    h2.sum().backward()
    torch.testing.assert_close(u.grad, u2.grad, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.grad, s2.grad / (2 * s2.detach()), rtol=1e-6, atol=0)


def test_learnable_std_gets_gradient():
    spike = IWSTSpike("st", std=0.5, learn_std=True)
    assert isinstance(spike.std_rho, torch.nn.Parameter)
    torch.testing.assert_close(spike.std, torch.tensor(0.5), rtol=1e-6, atol=0)
    spike.manual_seed(0)
    u = torch.linspace(-1, 1, 50)
    (spike(u) * torch.linspace(-2, 1, 50)).sum().backward()
    assert spike.std_rho.grad is not None and spike.std_rho.grad.abs() > 0
    per_neuron = IWSTSpike(std=0.3, learn_std=True, std_shape=(4,))
    per_neuron(torch.randn(8, 4)).sum().backward()
    assert per_neuron.std_rho.grad.shape == (4,) and (per_neuron.std_rho.grad != 0).any()


def test_seed_spikes_replays():
    model = torch.nn.Sequential(IWSTSpike(std=1.0), IWSTSpike(std=1.0))
    u = torch.zeros(1000)
    seed_spikes(model, 5)
    a = [model[0](u), model[1](u)]
    seed_spikes(model, 5)
    b = [model[0](u), model[1](u)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], a[1])  # each spike function has a stream of its own
    seed_spikes(model, 6)
    assert not torch.equal(model[0](u), a[0])


def test_seed_spikes_adjacent_seeds_share_no_stream():
    # Monte Carlo passes seeded 0, 1, 2, ... must be independent in every layer: the
    # first layer of seed 1 must not replay the second layer of seed 0.
    model = torch.nn.Sequential(IWSTSpike(std=1.0), IWSTSpike(std=1.0), IWSTSpike(std=1.0))
    u = torch.zeros(2000)
    draws = set()
    for seed in range(4):
        seed_spikes(model, seed)
        for layer in model:
            draws.add(tuple(layer(u).tolist()))
    assert len(draws) == 12


@pytest.mark.parametrize("seed", [0, None])
def test_seed_spikes_on_a_model_without_spike_functions_is_named(seed):
    """An unconverted snnTorch model (or a model with Bayesian layers only) has nothing to
    seed: seed_spikes did nothing, silently, and its spikes stayed on the global RNG."""
    import snntorch as snn

    plain = torch.nn.Sequential(torch.nn.Linear(4, 3), snn.Leaky(beta=0.9, init_hidden=True))
    with pytest.raises(ValueError, match=r"Sequential contains no SBNN spike function.*"
                                         r"sbnn_addons\.snntorch\.to_sbnn"):
        seed_spikes(plain, seed)
    with pytest.raises(ValueError, match="no SBNN spike function"):
        seed_spikes(torch.nn.Sequential(BayesLinear(4, 3)), seed)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernel-or-fallback", "pytorch"])
@pytest.mark.parametrize("seed", [3 + 2**32, -1, 2**63])
def test_a_seed_the_generator_would_truncate_is_named(kernels, seed):
    """PyTorch's CPU generator keeps the low 32 bits of a seed: seeds 2**32 apart (and -1
    and 2**32 - 1) drew the same spikes, on the kernel and the PyTorch path alike."""
    call = (lambda s: seed_spikes(torch.nn.Sequential(IWSTSpike(std=1.0)), s),
            lambda s: IWSTSpike(std=1.0).manual_seed(s),
            lambda s: sb.mc_predict(torch.nn.Sequential(BayesLinear(4, 3)), torch.rand(2, 4), 2,
                                    seed=s))
    with sb.kernels.use_kernels(kernels):
        for fn in call:
            with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*32\).*low 32 "
                                                 r"bits.*modulo 2\*\*32"):
                fn(seed)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernel-or-fallback", "pytorch"])
def test_seeds_of_the_honoured_range_draw_streams_of_their_own(kernels):
    u = torch.zeros(2000)
    with sb.kernels.use_kernels(kernels):
        draws = set()
        for seed in (0, 1, 2**31, 2**32 - 1):
            model = torch.nn.Sequential(IWSTSpike(std=1.0), IWSTSpike(std=1.0))
            seed_spikes(model, seed)
            draws.update(tuple(layer(u).tolist()) for layer in model)
        assert len(draws) == 8
    assert all(0 <= sb.spike_seed(s, i) < 2**32 for s in (0, 2**32 - 1) for i in range(3))


def test_a_spike_function_alone_checks_its_drive():
    """A NaN drive fired nothing, silently: the spike function alone now applies the
    library's finite-input check, with its switch; an infinite drive is a readout's
    (threshold=inf) and fires as its sign says."""
    u = torch.tensor([math.nan, 0.5, -0.5])
    spike = IWSTSpike(std=0.5)
    with pytest.raises(ValueError, match=r"the input of the spike function \(IWSTSpike\) "
                                         r"contains NaN.*check_finite\(False\).*1 of them"):
        spike(u)
    with sb.check_finite(False):
        assert spike(u).shape == (3,)
    assert torch.equal(spike(torch.tensor([-math.inf, math.inf])), torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("batch_dim, shape", [(1, (6,)), (1, ()), (2, (4, 3)), (-3, (4, 3))])
def test_aux_loss_names_a_batch_dim_the_drive_lacks(batch_dim, shape):
    """batch_dim=1 (for [T, B, ...]) on a drive without that dimension averaged the
    auxiliary loss over a batch of 1 (a sum over the examples, silently)."""
    spike = sb.enable_aux_loss(IWSTSpike(std=0.5, batch_dim=batch_dim))
    u = torch.randn(shape, requires_grad=True)
    with pytest.raises(ValueError, match=rf"batch_dim={batch_dim}.*shape {re.escape(str(shape))}"):
        spike(u)
    spike.pop_aux()


@pytest.mark.parametrize("batch_dim, shape, batch", [(0, (), 1), (0, (5,), 5), (1, (3, 5), 5),
                                                     (-1, (3, 5), 5)])
def test_aux_loss_averages_over_batch_dim(batch_dim, shape, batch):
    """A 0-d drive is one example (as for batch_dim=0 before); the aux term is averaged
    over the batch_dim's size."""
    spike = sb.enable_aux_loss(IWSTSpike(std=0.5, batch_dim=batch_dim))
    u = torch.randn(shape, requires_grad=True)
    spike(u)
    total, units = spike.pop_aux()
    assert units == u.numel() // batch


def _roundtrip_pickle(m):
    return pickle.loads(pickle.dumps(m))


@pytest.mark.parametrize("kernels", [True, False])
def test_estimator_assignment_is_parsed_and_checked(kernels):
    """``spike.estimator = "agr(0.5)"`` (what the constructor takes) failed at the next
    forward with "'str' object has no attribute 'kind'"; it is parsed, and a bad one is
    named at the assignment. A spike function pickled with the plain attribute loads."""
    spike = IWSTSpike("st", std=0.5)
    u = torch.randn(64, requires_grad=True)
    spike.estimator = "agr(0.5)"
    assert spike.estimator == sb.get_estimator("agr(0.5)")
    with sb.kernels.use_kernels(kernels):
        spike(u).sum().backward()
    assert u.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown estimator 'bogus'"):
        spike.estimator = "bogus"
    assert spike.estimator == sb.get_estimator("agr(0.5)")
    old = spike.__getstate__()
    old["estimator"] = old.pop("_estimator")  # the state of an earlier release
    clone = IWSTSpike.__new__(IWSTSpike)
    clone.__setstate__(old)
    assert clone.estimator == spike.estimator and "estimator" not in clone.__dict__


def test_pickle_deepcopy_to_float64():
    spike = IWSTSpike("agr(0.3)", std=0.5, learn_std=True, std_shape=(3,))
    spike.manual_seed(4)
    spike(torch.zeros(2, 3))  # creates the private generator
    for clone in (_roundtrip_pickle(spike), copy.deepcopy(spike)):
        assert clone.estimator == spike.estimator
        torch.testing.assert_close(clone.std, spike.std)
        clone.manual_seed(4)
        spike.manual_seed(4)
        u = torch.zeros(10, 3)
        assert torch.equal(clone(u), spike(u))
    s64 = copy.deepcopy(spike).to(torch.float64)
    assert s64.std.dtype == torch.float64
    u = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    out = s64(u)
    out.sum().backward()
    assert out.dtype == torch.float64 and u.grad.dtype == torch.float64


def test_unpickled_spike_function_watches_optimiser_steps():
    """A spike function loaded (torch.load) in a process that built none did not register
    the optimiser-step hook, which marks auxiliary terms never consumed as stale: a
    compiled step (which cannot register it) then let them pile up with their graphs."""
    from sbnn_addons import spike as spike_module

    data = pickle.dumps(IWSTSpike("st", std=0.5, learn_std=True))
    steps = spike_module._OPTIMIZER_STEPS
    if steps[1] is not None:  # as in a fresh process: no hook yet
        steps[1].remove()
        steps[1] = None
    try:
        spike = pickle.loads(data)
        assert steps[1] is not None
        spike._aux_terms = [(torch.ones(()), 1)]  # a term held across the step below
        torch.optim.SGD(spike.parameters(), lr=0.1).step()
        assert spike._aux_stale
    finally:
        spike_module._watch_optimizer_steps()  # registered for the other tests


@pytest.mark.parametrize("std_shape", [(), (2, 3)])
def test_state_dict_roundtrip(std_shape):
    a = IWSTSpike(std=0.5, learn_std=True, std_shape=std_shape)
    with torch.no_grad():
        a.std_rho.add_(torch.randn(std_shape, generator=torch.Generator().manual_seed(0)))
    b = IWSTSpike(std=0.1, learn_std=True, std_shape=std_shape)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    assert torch.equal(a.std, b.std)
    fixed = IWSTSpike(std=0.2, std_shape=std_shape)
    fixed2 = IWSTSpike(std=0.7, std_shape=std_shape)
    fixed2.load_state_dict(fixed.state_dict())
    assert torch.equal(fixed.std, fixed2.std)


def test_vmap_grad_through_spike_module_functional():
    """torch.func.vmap(torch.func.grad(.)) through the module in mean mode equals a loop."""
    spike = IWSTSpike("iwst(0.5)", std=0.5)
    sb.set_mode(spike, "mean")
    u = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))

    def f(x):
        return (spike(x) * torch.arange(5.0)).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # functorch fallback performance notice
        batched = torch.func.vmap(torch.func.grad(f))(u)
    loop = torch.stack([torch.func.grad(f)(u[i]) for i in range(4)])
    torch.testing.assert_close(batched, loop, rtol=1e-6, atol=0)
    assert batched.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    spike = IWSTSpike("agr", std=0.5)
    spike.manual_seed(0)
    leaf = (torch.linspace(-20, 20, 41)).to(dtype).requires_grad_(True)
    u = attach_variance(leaf, torch.full((41,), 1e-3, dtype=dtype))
    out = spike(u)
    out.sum().backward()
    assert out.dtype == dtype and torch.isfinite(leaf.grad).all()


def test_sigma_tiny_and_empty_batch():
    u = torch.tensor([-1.0, 0.0, 1.0], requires_grad=True)
    spike = IWSTSpike("agr", std=1e-12)
    spike(u).sum().backward()
    assert torch.isfinite(u.grad).all()
    with pytest.raises(VarianceFlowError, match="no noise"):  # std 0: a zero gradient
        IWSTSpike("agr", std=0.0)(u).sum().backward()
    spike = IWSTSpike(std=0.5, learn_std=True)
    spike.collect_aux = True
    u = torch.zeros(0, 5, requires_grad=True)
    out = spike(u)
    out.sum().backward()
    assert out.shape == (0, 5)
    assert float(spike.pop_aux()[0].detach()) == 0.0


def test_bf16_bayes_linear_into_spike():
    torch.manual_seed(0)
    layer = BayesLinear(5, 3).to(torch.bfloat16)
    spike = IWSTSpike("iwst(0.5)")
    x = torch.rand(4, 5, dtype=torch.bfloat16)
    out = spike(layer(x))
    out.sum().backward()
    assert out.dtype == torch.bfloat16
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    assert layer.std_rho.grad is not None


@pytest.mark.parametrize(
    "call, exc, word",
    [
        (lambda: IWSTSpike(std=-1), ValueError, "std"),
        (lambda: IWSTSpike(std=float("inf")), ValueError, "std"),
        (lambda: IWSTSpike(std=0, learn_std=True), ValueError, "std"),
        (lambda: IWSTSpike(std="a"), TypeError, "std"),
        (lambda: IWSTSpike("foo"), ValueError, "estimator"),
        (lambda: IWSTSpike("iwst(1.5)"), ValueError, "p"),
        (lambda: IWSTSpike(aux_center="middle"), ValueError, "aux_center"),
        (lambda: IWSTSpike(aux_std_grad="no"), TypeError, "aux_std_grad"),
        (lambda: IWSTSpike()(torch.ones(3, dtype=torch.long)), TypeError, "u"),
        (lambda: IWSTSpike().fire(torch.ones(4, 5), torch.ones(4, 3)), ValueError, "variance"),
        (lambda: IWSTSpike().fire(torch.ones(3), torch.ones(2, 3)), ValueError, "variance"),
    ],
)
def test_bad_input(call, exc, word):
    with pytest.raises(exc, match=rf"\b{word}\b"):
        call()


@pytest.mark.parametrize("learn_std", [True, False])
def test_share_posterior_computes_own_noise_once_with_identical_gradients(learn_std):
    """Inside share_posterior a spike function squares its own std once per block (one
    node, whatever the number of steps); spikes and the std's gradient are those of the
    unshared loop, and the cache does not outlive the block."""
    spike = IWSTSpike("st", std=0.3, learn_std=learn_std)
    u = torch.randn(5, 4, 6, requires_grad=True)
    results = []
    for shared in (False, True):
        spike.zero_grad()
        u.grad = None
        with sb.share_posterior() if shared else contextlib.nullcontext():
            torch.manual_seed(1)
            out = torch.stack([spike(u[t]) for t in range(5)])
            if shared:
                assert spike.own_noise_variance() is spike.own_noise_variance()
        (out * torch.arange(6.0)).sum().backward()
        grad = spike.std_rho.grad.clone() if learn_std else None
        results.append((out.detach(), u.grad.clone(), grad))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    if learn_std:
        torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-5, atol=1e-8)
    assert spike.own_noise_variance() is not spike.own_noise_variance()


def test_spikes_deep_copy_with_their_mark():
    """Spikes made under no_grad are a SpikeTensor; deepcopy gives an equal tensor,
    still marked binary (not kept), and copying an in-place-changed one drops the mark."""
    spike = IWSTSpike("st", std=0.3)
    with torch.no_grad():
        out = spike(torch.randn(4, 5))
    assert sb.functional.is_binary(out)
    new = copy.deepcopy({"a": out, "b": out})
    assert new["a"] is new["b"] and torch.equal(new["a"], out)
    assert sb.functional.is_binary(new["a"]) and not sb.functional.is_kept(new["a"])
    out.mul_(2)
    assert not sb.functional.is_binary(copy.deepcopy(out))



def test_saved_spikes_load_with_torch_load_defaults():
    """Spikes a model returns under no_grad (a converted SpikingJelly multi-step model's
    whole output, a step of an snnTorch one) are a SpikeTensor: ``torch.save(out)`` wrote
    the library's class, which ``torch.load``'s default ``weights_only=True`` refused
    (UnpicklingError naming sbnn_addons.tensors.SpikeTensor), and which a process without
    ``sbnn_addons`` could not load at all. They are saved as a plain tensor of the same
    values; the mark (a hint for the layers) stays with the spikes in memory."""
    import io

    spike = IWSTSpike("st", std=0.3)
    with torch.no_grad():
        out = spike(torch.randn(4, 5))
    assert sb.functional.is_binary(out)
    buf = io.BytesIO()
    torch.save({"spikes": out, "again": out}, buf)
    buf.seek(0)
    back = torch.load(buf)  # weights_only=True, the default
    assert type(back["spikes"]) is torch.Tensor and back["spikes"] is back["again"]
    assert torch.equal(back["spikes"], out.as_subclass(torch.Tensor))
    assert b"sbnn_addons" not in pickle.dumps(out)
    assert sb.functional.is_binary(out)  # the spikes in memory keep their mark

def test_a_copy_of_a_seeded_spike_function_continues_its_stream():
    """deepcopy / pickle / torch.save of a seeded spike function mid-stream: the copy
    draws what the original draws next (not the stream from its seed again)."""
    import copy
    import io
    import pickle

    spk = sb.IWSTSpike("st", std=0.5)
    sb.seed_spikes(spk, 7)
    u = torch.zeros(64)
    spk(u)  # the stream has moved on
    buf = io.BytesIO()
    torch.save(spk, buf)
    buf.seek(0)
    copies = [copy.deepcopy(spk), pickle.loads(pickle.dumps(spk)),
              torch.load(buf, weights_only=False)]
    expected = spk(u)
    for dup in copies:
        assert torch.equal(dup(u), expected)


# --------------------------------------------------------------------------- aux pull
@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("estimator", ["st", "agr(0.5)"])
def test_aux_pull_adds_the_auxiliary_gradient(kernels, estimator):
    """With `aux_pull = w` the drive's gradient gains w * mean|dL/dh| * 2 clamp(z, -3, 3)
    / sigma (sigma held constant), the same draws otherwise: as if w * mean|dL/dh| *
    sum huber(z) were in the loss. Kernel and PyTorch paths, spikes unchanged."""
    torch.manual_seed(0)
    u0 = torch.randn(8, 16) * 2 - 1
    var = torch.rand(8, 1) * 0.3
    g = torch.randn(8, 16)
    grads, outs = [], []
    with sb.kernels.use_kernels(kernels):
        for pull in (0.0, 0.05):
            spike = IWSTSpike(estimator, std=0.4, learn_std=True, aux_pull=pull)
            spike.manual_seed(7)
            u = u0.clone().requires_grad_()
            h = spike(attach_variance(u, var))
            (h * g).sum().backward()
            grads.append(u.grad)
            outs.append(h.detach())
    assert torch.equal(outs[0], outs[1])
    sigma = (var + 0.16).sqrt()
    z = u0 / sigma
    assert float(z.abs().max()) > 3  # the clamp is exercised
    pull = 0.05 * g.abs().mean() * 2 * z.clamp(-3, 3) / sigma
    torch.testing.assert_close(grads[1] - grads[0], pull, rtol=1e-4, atol=1e-6)


def test_aux_pull_revives_a_silent_unit_and_only_in_training():
    """A unit 8 sigma below its threshold: the estimator's gradient is ~0; the pull's
    points towards the threshold. Nothing in eval mode or without gradients."""
    spike = IWSTSpike(std=0.5, aux_pull=1e-3)
    u = torch.full((4, 3), -4.0, requires_grad=True)
    spike(u).sum().backward()
    assert (u.grad < -1e-4).all()  # descent raises u
    spike.eval()
    u.grad = None
    spike(u).sum().backward()
    assert float(u.grad.abs().max()) < 1e-10
    spike.train()
    with torch.no_grad():
        assert spike(u).grad_fn is None
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="aux_pull"):
            IWSTSpike(aux_pull=bad)
    with pytest.raises(TypeError, match="aux_pull"):
        IWSTSpike(aux_pull=True)


@needs_kernel
@pytest.mark.parametrize("reset", ["subtract", "zero", "none"])
def test_aux_pull_of_fused_lif_equals_the_step_loop(reset):
    """The core LIF with an aux pull: the fused sequence (`run`) and the fused steps give
    the same spikes and gradients; in both the spikes' gradient that scales the pull
    includes the path through the reset (as for a spike function called per step, whose
    output the reset uses; checked against SpikingJelly's own loop in
    test_spikingjelly_dynamics.py), and the pull changes the gradients."""
    torch.manual_seed(0)
    x = torch.randn(6, 5, 8) + 0.8
    results = []
    for how, pull in (("run", 0.02), ("fused step", 0.02), ("run", 0.0)):
        lif = sb.LIF(beta=0.8, reset=reset, spike_fn=IWSTSpike(std=0.5, learn_std=True,
                                                                aux_pull=pull))
        lif.spike_fn.manual_seed(5)
        xs = x.clone().requires_grad_()
        currents = attach_variance(xs * 1.0, torch.full((6, 5, 1), 0.1))  # a layer's output
        if how == "run":
            spikes = lif.run(currents)
            assert type(spikes.grad_fn).__name__ == "LIFSequenceBackward"
        else:
            mem, out = None, []
            for t in range(len(xs)):
                s, mem = lif(currents[t], mem)
                assert type(s.grad_fn).__name__ == "LIFStepBackward"
                out.append(s)
            spikes = torch.stack(out)
        (spikes * torch.linspace(-1, 2, 8)).sum().backward()
        results.append((spikes.detach(), xs.grad, lif.spike_fn.std_rho.grad))
    (run, step, no_pull) = results
    assert torch.equal(step[0], run[0]) and torch.equal(no_pull[0], run[0])
    torch.testing.assert_close(step[1], run[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(step[2], run[2], rtol=1e-5, atol=1e-6)
    assert float((run[1] - no_pull[1]).abs().max()) > 1e-3


@pytest.mark.parametrize("kernels", [True, False])
def test_aux_pull_does_not_build_up_over_steps(kernels):
    """A call's spikes receive the pulls of later steps (through the reset), which scale
    its own pull: with the clamp at |z| = 3 the build-up is a geometric series of ratio
    at most 2 * 3 * w * theta / sigma, so even at a small std over 32 steps the pull on a
    silent unit stays of the order of its one-step size (it grew to ~1e5 without it)."""
    T, B, N, std = 32, 4, 8, 0.1
    torch.manual_seed(0)
    x0 = torch.full((T, B, N), -2.0) + 0.1 * torch.randn(T, B, N)  # silent, far below
    x0[:, :, 0] = 3.0  # one unit fires: the task has a gradient
    w_out = torch.randn(N)
    grads = []
    for pull in (0.0, 1e-3):
        lif = sb.LIF(beta=0.9, spike_fn=IWSTSpike(std=std, aux_pull=pull))
        lif.spike_fn.manual_seed(1)
        x = x0.clone().requires_grad_()
        with sb.kernels.use_kernels(kernels):
            (lif.run(x).sum(0) * w_out).sum().backward()
        grads.append(x.grad)
    added = grads[1] - grads[0]
    assert float(added[:, :, 1:].max()) < 0  # the silent units are pulled up
    assert float(added.abs().max()) < 1.0


def test_aux_pull_assignment_is_checked():
    spike = IWSTSpike(std=0.3)
    spike.aux_pull = 0.01
    assert spike.aux_pull == 0.01
    for bad, err in ((-1.0, ValueError), (math.nan, ValueError), ("0.1", TypeError)):
        with pytest.raises(err, match="aux_pull"):
            spike.aux_pull = bad
    assert spike.aux_pull == 0.01
    assert copy.deepcopy(spike).aux_pull == 0.01
    assert pickle.loads(pickle.dumps(spike)).aux_pull == 0.01


def test_state_dict_of_another_std_form_is_named():
    """A spike function's checkpoint with a learned std (``std_rho``) loaded into one with
    a fixed std (``fixed_std``, e.g. converted with ``spike_std=None``) dropped the learned
    std with ``strict=False``, silently; it now warns. A std of another ``std_shape``
    names both shapes instead of a bare size mismatch."""
    import warnings

    learned = torch.nn.Sequential(IWSTSpike("st", std=0.3, learn_std=True))
    fixed = torch.nn.Sequential(IWSTSpike("st"))
    with pytest.warns(UserWarning, match=r"'0\.std_rho'.*learn_std=True") as record:
        fixed.load_state_dict(learned.state_dict(), strict=False)
    both = torch.nn.Sequential(IWSTSpike("st", std=0.3, learn_std=True),
                               IWSTSpike("st", std=0.3, learn_std=True))
    with pytest.warns(UserWarning, match="learn_std=True") as record:  # once per load
        torch.nn.Sequential(IWSTSpike("st"), IWSTSpike("st")).load_state_dict(
            both.state_dict(), strict=False)
    assert len(record) == 1
    with pytest.warns(UserWarning, match=r"'0\.fixed_std'.*learn_std=False"):
        learned.load_state_dict(fixed.state_dict(), strict=False)
    wide = torch.nn.Sequential(IWSTSpike("st", std=0.3, learn_std=True, std_shape=(4,)))
    with pytest.raises(RuntimeError, match=r"0\.std_rho.*std_shape=\(4,\).*std_shape=\(\)"):
        learned.load_state_dict(wide.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learned.load_state_dict(learned.state_dict())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seeded", [False, True])
def test_half_precision_fires_with_phi(dtype, seeded):
    """A half-precision drive fires with Phi(u / sigma): u = -1/4 and sigma = 1/4 are
    exact in every dtype, so P = Phi(-1). The noise is drawn in float32; drawn in
    bfloat16, eps was rounded to 8 bits and eps == 1 (a whole bin of mass ~ phi(1) 2^-8)
    never fired: the rate was ~0.1577 for 0.1587 (z ~ -6 at this size). Tolerance:
    4 standard errors of a proportion."""
    n = 4_000_000
    spike = IWSTSpike(std=0.25).to(dtype)
    if seeded:
        spike.manual_seed(0)
    else:
        torch.manual_seed(0)
    rate = float(spike(torch.full((n,), -0.25, dtype=dtype)).double().mean())
    p = 0.5 * math.erfc(1 / math.sqrt(2))
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n), (rate, p)


def test_float16_small_own_std_keeps_its_noise():
    """A float16 spike function's own std of 1e-4 (learned, shrunk): ``s_n^2 = 1e-8`` is
    below float16's smallest subnormal; it is squared in float32 (it was 0: no noise, no
    gradient to the std)."""
    spike = IWSTSpike(std=1e-4, learn_std=True).half()
    u = torch.full((4,), 1e-4, dtype=torch.float16)
    var = spike.noise_variance(u)
    torch.testing.assert_close(var.double().expand(4), torch.full((4,), 1e-8, dtype=torch.float64),
                               rtol=2e-3, atol=0)
    u.requires_grad_(True)
    spike(u).sum().backward()
    assert float(spike.std_rho.grad) != 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_aux_pull_is_finite(dtype):
    """The auxiliary pull of a float16 drive with a small noise (sigma = 1e-5, a float32
    variance of 1e-10): ``1 / sigma`` is formed in float32 (in float16 it overflowed, and
    the drive's gradient was NaN / inf); it equals the float32 gradient to the dtype's
    rounding."""
    grads = {}
    for dt in (dtype, torch.float32):
        spike = IWSTSpike(aux_pull=1e-3)
        spike.manual_seed(0)
        u = torch.tensor([0.0, 1e-5, -1e-5, 0.5, -0.5], dtype=dt, requires_grad=True)
        h = spike(attach_variance(u, torch.full((5,), 1e-10)))
        (h * torch.arange(5, dtype=dt)).sum().backward()
        grads[dt] = u.grad
    assert grads[dtype].dtype == dtype
    torch.testing.assert_close(grads[dtype].float(), grads[torch.float32], rtol=1e-2, atol=0)


def test_threshold_is_checked_and_keeps_its_finite_flag():
    """The threshold is a float whose finiteness a bool mirrors (what a compiled graph
    guards); a NaN is refused on assignment too, and a spike function pickled when the
    threshold was a plain attribute loads with both."""
    spike = IWSTSpike("st", threshold=2.0)
    assert spike.threshold == 2.0 and spike.threshold_finite
    spike.threshold = math.inf
    assert not spike.threshold_finite
    with pytest.raises(ValueError, match="threshold must be a number"):
        spike.threshold = math.nan
    assert spike.threshold == math.inf
    state = spike.__getstate__()
    state["threshold"] = -math.inf  # the old form
    del state["_threshold"], state["_threshold_finite"]
    old = IWSTSpike.__new__(IWSTSpike)
    old.__setstate__(state)
    assert old.threshold == -math.inf and not old.threshold_finite
    assert "threshold" not in old.__dict__


def test_a_std_shape_shorter_than_the_neuron_shape_is_named():
    """std_shape=(C,) on a drive [B, C, H, W] with C == W broadcast along W: one std per
    column instead of per channel, silently (C != W failed in a broadcast)."""
    spike = IWSTSpike(std=0.3, learn_std=True, std_shape=(4,))
    with pytest.raises(ValueError, match=r"std of shape \(4,\).*\(2, 4, 4, 4\).*"
                                         r"\(C, H, W\).*\(C, 1, 1\)"):
        spike(torch.rand(2, 4, 4, 4) - 0.5)
    spike(torch.rand(2, 4) - 0.5)  # [B, C]
    spike(torch.rand(3, 2, 4) - 0.5)  # a multi-step drive [T, B, C]
    IWSTSpike(std=0.3, std_shape=(4, 1, 1))(torch.rand(2, 4, 4, 4) - 0.5)  # per channel


@pytest.mark.parametrize("transform", ["vmap(grad)", "grad(vmap)"])
def test_torch_func_transforms_apply_the_auxiliary_pull_per_mapped_slice(transform):
    """``aux_pull`` (on by default in converted models) under ``torch.func``: ``vmap`` of
    ``grad`` (per-sample gradients) raised "You tried to vmap over _AuxPull", naming an
    internal function; ``grad`` of ``vmap`` (an ensemble's loss) dropped the pull without
    an error (the mapped drive does not report ``requires_grad``). Both equal a loop over
    the slices, each pulled with its own ``mean|dL/dh|``, as in eager mode."""
    spike = IWSTSpike("st", std=0.5, aux_pull=0.3)
    sb.set_mode(spike, "mean")
    u = torch.randn(4, 5, generator=torch.Generator().manual_seed(0)) * 0.5
    w = torch.arange(5.0) - 2

    def f(x):
        return (spike(x) * w).sum()

    loop = []
    for i in range(4):
        leaf = u[i].clone().requires_grad_()
        f(leaf).backward()
        loop.append(leaf.grad)
    loop = torch.stack(loop)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # functorch fallback performance notice
        if transform == "vmap(grad)":
            got = torch.func.vmap(torch.func.grad(f))(u)
        else:
            got = torch.func.grad(lambda x: torch.func.vmap(f)(x).sum())(u)
    torch.testing.assert_close(got, loop, rtol=1e-6, atol=1e-7)
    spike.aux_pull = 0.0
    unpulled = torch.func.grad(lambda x: torch.func.vmap(f)(x).sum())(u)
    assert (got - unpulled).abs().max() > 1e-3  # the pull is there


def test_vmap_of_grad_maps_the_pull_of_a_gradient_mapped_where_the_drive_is_not():
    """``vmap(grad(f), in_dims=(None, 0))`` over a downstream weight only: the gradient
    reaching the spikes is mapped, the drive and the noise std are not; the pull is
    formed out of place there (in place it raised vmap's "inplace arithmetic" error)."""
    spike = IWSTSpike("st", std=0.5, aux_pull=0.3)
    sb.set_mode(spike, "mean")
    gen = torch.Generator().manual_seed(1)
    u, weights = torch.randn(5, generator=gen) * 0.5, torch.randn(3, 5, generator=gen)

    def f(x, w):
        return (spike(x) * w).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # functorch fallback performance notice
        got = torch.func.vmap(torch.func.grad(f), in_dims=(None, 0))(u, weights)
    loop = torch.stack([torch.func.grad(f)(u, w) for w in weights])
    torch.testing.assert_close(got, loop, rtol=1e-6, atol=1e-7)


def test_forward_mode_ad_through_a_spike_function_is_named():
    """``torch.func.jvp`` / ``jacfwd`` / ``torch.autograd.forward_ad`` through a spike
    function: PyTorch's "You must implement the jvp function for custom
    autograd.Function" named neither the spike function nor what works instead."""
    spike = IWSTSpike("st", std=0.5)
    u = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    for mode in ("sample", "mean"):
        sb.set_mode(spike, mode)
        with pytest.raises(NotImplementedError,
                           match=r"(?s)forward-mode.*spike function.*torch\.func\.grad"):
            torch.func.jvp(spike, (u,), (torch.ones_like(u),))
    with torch.autograd.forward_ad.dual_level():  # a dual level, no tangent reaching it
        assert spike(u).shape == (3, 4)
