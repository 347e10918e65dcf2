"""The fused CPU spike kernel (sbnn_addons.kernels) against independent references:
a NumPy Philox4x32-10 for the draws, the PyTorch estimators for the backward, the
binomial law for the firing frequencies."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from _kernel import needs_kernel

import sbnn_addons as sb
from sbnn_addons import IWSTSpike, kernels, seed_spikes
from sbnn_addons.functional import SIGMA_MIN

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler on this machine")

ESTIMATORS = [sb.ST(), sb.IWST(0.0), sb.IWST(0.5), sb.IWST(1.0), sb.AGR(0.0), sb.AGR(0.3),
              sb.AGR(2.0)]


def _philox(counters: np.ndarray, seed: int) -> np.ndarray:
    """Philox4x32-10 (Salmon et al. 2011) in NumPy: the 4 words of each counter."""
    x0, x1 = counters & 0xFFFFFFFF, counters >> np.uint64(32)
    x2 = np.zeros_like(x0)
    x3 = np.zeros_like(x0)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    mask = np.uint64(0xFFFFFFFF)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * x0
        p1 = np.uint64(0xCD9E8D57) * x2
        x0, x1, x2, x3 = ((p1 >> np.uint64(32)) ^ x1 ^ k0, p1 & mask,
                          (p0 >> np.uint64(32)) ^ x3 ^ k1, p0 & mask)
        k0 = (k0 + np.uint64(0x9E3779B9)) & mask
        k1 = (k1 + np.uint64(0xBB67AE85)) & mask
    return np.stack([x0, x1, x2, x3], axis=1)


def _philox_uniforms(seed: int, n: int) -> np.ndarray:
    """The kernel's U_i = (B_i + V_i) / 256, formed in full: B_i byte i % 16 of block
    i // 16, V_i word i % 4 of block 2^62 + i // 4 (kernel: spike.c)."""
    i = np.arange(n, dtype=np.uint64)
    words = _philox(np.arange((n + 15) // 16, dtype=np.uint64), seed).reshape(-1)
    byte = (words[i // np.uint64(4)] >> (np.uint64(8) * (i % np.uint64(4)))) & np.uint64(255)
    v_words = _philox(np.uint64(1 << 62) + np.arange((n + 3) // 4, dtype=np.uint64), seed)
    v = (v_words.reshape(-1)[:n].astype(np.float64) + 0.5) * 2.0**-32
    return (byte.astype(np.float64) + v) / 256.0


def test_draws_match_numpy_philox_reference():
    """h_i = 1[U_i < Phi(u_i / sigma_i)] with the full U_i from an independent Philox
    implementation (the kernel draws V_i only where the byte does not decide), for every
    element whose U is not within 1e-6 of Phi (float rounding of the cdf)."""
    torch.manual_seed(11)
    u = torch.randn(1001) * 2
    var = torch.rand(1001) + 0.01
    var[::7] = 0.0  # deterministic units
    torch.manual_seed(5)
    h = kernels.fused_spike(u, var, sb.ST())
    torch.manual_seed(5)
    seed = kernels._seed(None)
    U = _philox_uniforms(seed, 1001)
    p = torch.special.ndtr(u.double() / var.double().clamp_min(1e-300).sqrt()).numpy()
    assert np.abs(U - p).min() < 2e-3  # some units needed V: the exact path is exercised
    expected = np.where(var.numpy() > 0, U < p, u.numpy() > 0)
    clear = (np.abs(U - p) > 1e-6) | (var.numpy() == 0)
    assert clear.sum() > 990
    np.testing.assert_array_equal(h.numpy()[clear], expected[clear])


def test_byte_thresholds_are_the_normal_quantiles_plus_margin():
    """Byte B fires for sure above t = Phi^-1((B + 1)/256 + 4e-6) and stays silent below
    Phi^-1(B/256 - 4e-6); the tables hold t |t| in float32."""
    fire, silent = kernels._thresholds()
    b = torch.arange(256, dtype=torch.float64)

    def quantile(signed_square):
        return signed_square.sign() * signed_square.abs().sqrt()

    assert torch.allclose(torch.special.ndtr(quantile(fire[:255])), (b[:255] + 1) / 256 + 4e-6,
                          rtol=0, atol=1e-7)
    assert torch.allclose(torch.special.ndtr(quantile(silent[1:])), b[1:] / 256 - 4e-6,
                          rtol=0, atol=1e-7)


def test_draws_at_the_byte_cell_boundaries_are_exact():
    """Each unit's Phi(z) is put within 1e-5 of an edge of its own draw's byte cell, where
    the byte decision is closest to being wrong: every spike equals 1[U < Phi(z)] of the
    reference draw."""
    n = 4096
    torch.manual_seed(8)
    U = _philox_uniforms(kernels._seed(None), n)
    gen = torch.Generator().manual_seed(3)
    byte = torch.from_numpy(np.floor(U * 256))
    edge = (byte + torch.randint(0, 2, (n,), generator=gen)) / 256
    offset = (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * 1e-5
    var = torch.rand(n, generator=gen, dtype=torch.float64) * 4 + 1e-3
    u = (torch.special.ndtri((edge + offset).clamp(1e-9, 1 - 1e-9)) * var.sqrt()).float()
    var = var.float()
    torch.manual_seed(8)
    h = kernels.fused_spike(u, var, sb.ST())
    p = torch.special.ndtr(u.double() / var.double().sqrt()).numpy()
    clear = np.abs(U - p) > 1e-12
    assert clear.sum() > n - 5
    np.testing.assert_array_equal(h.numpy()[clear], (U < p)[clear])


def test_firing_frequency_is_phi_z():
    """2000 seeded passes over 4096 units: the z-scores of the frequencies against
    Phi(u/sigma) have mean 0 and std 1 within 0.05, max below 5.5."""
    torch.manual_seed(0)
    u = torch.randn(4096) * 1.5
    var = torch.rand(4096) + 0.05
    reps = 2000
    counts = torch.zeros(4096, dtype=torch.float64)
    for _ in range(reps):
        counts += kernels.fused_spike(u, var, sb.ST())
    p = torch.special.ndtr(u.double() / var.double().sqrt())
    keep = (p > 0.01) & (p < 0.99)
    z = ((counts / reps - p) / (p * (1 - p) / reps).sqrt())[keep]
    assert keep.sum() > 2500
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05 and z.abs().max() < 5.5


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=str)
def test_backward_equals_pytorch_estimator(estimator):
    """Given the same spikes, grad_u and grad_var equal BernoulliSpike + sqrt (rtol 1e-4),
    over z in [-40, 40] and sigma from 1e-12 to 10, with var = 0 giving zero gradients."""
    torch.manual_seed(1)
    u = torch.linspace(-8, 8, 4001)
    var = torch.logspace(-24, 2, 4001)[torch.randperm(4001)]
    var[::50] = 0.0
    u = torch.cat([u, torch.tensor([-40.0, 40.0, -12.0, 12.0])])
    var = torch.cat([var, torch.ones(4)])
    uk, vk = u.clone().requires_grad_(), var.clone().requires_grad_()
    h = kernels.fused_spike(uk, vk, estimator)
    g = torch.randn_like(u)
    h.backward(g)
    ur, vr = u.clone().requires_grad_(), var.clone().requires_grad_()
    sigma = sb.functional.safe_sqrt(vr)
    eps = torch.where(h.bool(), 1e30, -1e30)  # replays the kernel's spikes
    h_ref = sb.BernoulliSpike.apply(ur, sigma, eps, estimator, False)
    assert torch.equal(h, torch.where(var > 0, h_ref, (u > 0).float()))
    h_ref.backward(g)
    for got, ref in ((uk.grad, ur.grad), (vk.grad, vr.grad)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-30 + 1e-6 * ref.abs().max())
    assert (uk.grad[var == 0] == 0).all() and (vk.grad[var == 0] == 0).all()
    big = var > (SIGMA_MIN * 10) ** 2
    assert (uk.grad[big] != 0).any()


def test_scalar_variance_gradient_is_the_sum():
    torch.manual_seed(2)
    u = torch.randn(64, 32, requires_grad=True)
    var = torch.tensor(0.3, requires_grad=True)
    torch.manual_seed(3)
    kernels.fused_spike(u, var, sb.AGR(0.0)).sum().backward()
    full = var.detach().expand(64, 32).clone().requires_grad_()
    u2 = u.detach().clone().requires_grad_()
    torch.manual_seed(3)
    kernels.fused_spike(u2, full, sb.AGR(0.0)).sum().backward()
    torch.testing.assert_close(var.grad, full.grad.sum(), rtol=1e-5, atol=0)
    torch.testing.assert_close(u.grad, u2.grad, rtol=1e-5, atol=0)


def test_replay_generator_and_thread_independence():
    u = torch.randn(300_000)
    var = torch.rand(300_000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.manual_seed(4)
        one = kernels.fused_spike(u, var, sb.ST())
        torch.set_num_threads(2)
        torch.manual_seed(4)
        two = kernels.fused_spike(u, var, sb.ST())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    gen = torch.Generator().manual_seed(9)
    a = kernels.fused_spike(u, var, sb.ST(), generator=gen)
    b = kernels.fused_spike(u, var, sb.ST(), generator=gen)
    gen.manual_seed(9)
    assert torch.equal(a, kernels.fused_spike(u, var, sb.ST(), generator=gen))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("var_shape", [(64, 15, 20), (64, 1, 1), (64, 1, 20), ()])
def test_gradients_do_not_depend_on_the_thread_count(var_shape):
    """Full, per-example ([N, 1, 1]) and per-position ([N, 1, W]) variances (both summed
    in the kernel) and a scalar one: spikes and both gradients are bitwise the same with 1
    and 2 threads."""
    u0 = torch.randn(64, 15, 20)
    var0 = torch.rand(var_shape) + 0.05
    g = torch.randn(64, 15, 20)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            u, var = u0.clone().requires_grad_(), var0.clone().requires_grad_()
            torch.manual_seed(2)
            h = kernels.fused_spike(u, var, sb.AGR(0.3))
            h.backward(g)
            results.append((h, u.grad, var.grad))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_kernel
def test_iwst_spike_uses_kernel_and_seed_spikes_replays():
    """IWSTSpike takes the kernel for float32 CPU input (and seed_spikes replays it), and
    the PyTorch path for float64 and under use_kernels(False); both fire at Phi(z)."""
    layer = sb.BayesLinear(20, 30, std=0.3)
    spike = IWSTSpike("agr")
    x = torch.rand(256, 20)
    seed_spikes(spike, 1)
    a = spike(layer(x) - 0.2)
    seed_spikes(spike, 1)
    assert torch.equal(a, spike(layer(x) - 0.2))
    assert type(a.grad_fn).__name__.startswith("FusedSpike")
    with kernels.use_kernels(False):
        b = spike(layer(x) - 0.2)
        assert type(b.grad_fn).__name__.startswith("BernoulliSpike")
    assert type(spike(layer.double()(x.double()) - 0.2).grad_fn).__name__.startswith(
        "BernoulliSpike")


def test_vmap_takes_the_pytorch_path():
    spike = IWSTSpike("st", std=0.5)
    spike.manual_seed(0)
    out = torch.func.vmap(spike, randomness="different")(torch.randn(3, 5))
    assert out.shape == (3, 5)


def test_loading_keeps_denormals():
    """Linking with -ffast-math would switch the process to flush-to-zero; the kernel is
    linked without it."""
    assert kernels.available()
    tiny = torch.tensor(1e-40)
    assert (tiny * 1.0).item() > 0


def test_no_compiler_falls_back_with_a_warning(tmp_path):
    """With CC pointing at a failing compiler and an empty cache, loading fails with a
    RuntimeWarning that names the fix, and IWSTSpike still works (PyTorch path)."""
    code = textwrap.dedent("""
        import warnings, torch
        import sbnn_addons as sb
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not sb.kernels.available()
        msg = str(caught[0].message)
        assert "C compiler" in msg and "SBNN_ADDONS_KERNELS=0" in msg, msg
        out = sb.IWSTSpike("st", std=0.5)(torch.randn(8, requires_grad=True))
        assert type(out.grad_fn).__name__.startswith("BernoulliSpike")
        print("ok")
    """)
    env = dict(os.environ, CC="/bin/false", SBNN_ADDONS_CACHE=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_no_compiler_a_first_compiled_call_takes_the_pytorch_path(tmp_path):
    """Without a C compiler, a compiled spike as the process's first use of the kernel
    traces the PyTorch path (the kernel is loaded while the graph is traced) and trains,
    with the warning, instead of failing when the graph calls the operator."""
    code = textwrap.dedent("""
        import warnings, torch
        import sbnn_addons as sb
        spike = sb.IWSTSpike("st", std=0.5)
        step = torch.compile(lambda u: spike(u).sum(), fullgraph=True)
        u = torch.randn(64, requires_grad=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step(u).backward()
        assert any("C compiler" in str(w.message) for w in caught)
        assert not sb.kernels.available() and u.grad.abs().sum() > 0
        print("ok")
    """)
    env = dict(os.environ, CC="/bin/false", SBNN_ADDONS_CACHE=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=str)
def test_backward_with_improbable_spikes_matches_the_log_space_estimator(estimator):
    """Spikes forced against the odds (P(h) down to Phi(-40)), where the PyTorch path
    needs log space: the kernel's cancelled erfcx form of Phi(c y) / Phi(y) gives the same
    Jacobian (rtol 1e-4) and stays finite; sigma = 0 and 1e-12 give zero gradients."""
    z = torch.cat([torch.linspace(-40, 40, 801), torch.tensor([-13.0, -12.5, -12.0, -11.5])])
    sigma = torch.full_like(z, 0.7)
    u = z * sigma
    h = (z < 0).float()  # every spike is the improbable outcome
    grad = torch.ones_like(z)
    gu, gv = kernels.spike_backward(grad, u, sigma**2, h, estimator)
    ref = sb.functional.estimator_jacobian(u.double(), sigma.double(), h.double(),
                                           estimator.kind, estimator.p, estimator.tau,
                                           estimator.max_weight)
    assert torch.isfinite(gu).all() and torch.isfinite(gv).all()
    torch.testing.assert_close(gu.double(), ref, rtol=1e-4, atol=1e-30)
    torch.testing.assert_close(gv.double(), -z.double() * ref / (2 * 0.7), rtol=1e-4,
                               atol=1e-30)
    zero = torch.tensor([0.0, 1e-24])
    gu0, gv0 = kernels.spike_backward(torch.ones(2), torch.tensor([0.3, -0.3]), zero,
                                      torch.ones(2), estimator)
    assert torch.isfinite(gu0).all() and torch.isfinite(gv0).all()
    assert gu0[0] == 0 and gv0[0] == 0


def _per_unit_backward(g, u, variance, h, estimator, g_aux, offset, pull):
    """The spike backward's formulas unit by unit in float64 (``spike_backward``'s
    docstring, the auxiliary terms with ``aux_var``, the pull of weight ``pull``), each
    term 0 where it does not apply, summed to the variance's shape at the end."""
    g, u = g.double(), u.double()
    var = variance.double().expand(u.shape)
    sigma = var.clamp_min(0).sqrt()
    sig, noisy = sigma.clamp_min(SIGMA_MIN), sigma > 0
    jac = sb.functional.estimator_jacobian(u, sigma, h.double(), estimator.kind, estimator.p,
                                           estimator.tau, estimator.max_weight)
    z = u / sig
    pull_u = 2 * pull * g.abs().mean() * z.clamp(-3, 3) / sig
    grad_u = g * jac + torch.where(noisy, pull_u, 0.0)
    grad_var = torch.where(jac != 0, -z * g * jac / (2 * sigma), 0.0)
    if g_aux is not None:
        grad_u = grad_u + torch.where(noisy, 2 * g_aux * (u + offset) / sig**2, 0.0)
        grad_var = grad_var + torch.where(sigma >= SIGMA_MIN,
                                          -g_aux * ((u + offset) / sig) ** 2 / var, 0.0)
    return grad_u, grad_var.sum_to_size(variance.shape)


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=str)
@pytest.mark.parametrize("var_shape", [(2, 3, 2, 2), (2, 1, 1, 1), (2, 1, 2, 2), ()], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_torch_spike_backward_equals_the_per_unit_formulas(estimator, var_shape, dtype):
    """The PyTorch-operations spike backward (compiled graphs, the "torch" sequence
    backend) forms the variance's factors in its compact shape and applies dL/dvar's
    after the sum; it equals the per-unit formulas in float64 and (float32) the C kernel,
    with the pull and the auxiliary terms, for variances 0, below SIGMA_MIN^2 and
    ordinary, and gives no NaN where the drive is infinite (0 * inf): no noise, no term."""
    from sbnn_addons.kernels import _EstimatorArgs, _torch_spike_backward

    gen = torch.Generator().manual_seed(3)
    shape = (2, 3, 2, 2)
    g = torch.randn(shape, generator=gen, dtype=dtype)
    u = torch.randn(shape, generator=gen, dtype=dtype) * 1.5
    u[0, 0, 0, 0] = u[1, 2, 1, 1] = -float("inf")  # where sigma = 0 and sigma < SIGMA_MIN
    h = (torch.rand(shape, generator=gen) < 0.5) & (u > -float("inf"))
    est = _EstimatorArgs(estimator.kind, estimator.p, estimator.tau, estimator.max_weight)
    if var_shape:
        variance = torch.rand(var_shape, generator=gen, dtype=dtype) + 0.05
        variance.view(-1)[0], variance.view(-1)[-1] = 0.0, 3e-13
        variances = [variance]
    else:
        variances = [torch.tensor(v, dtype=dtype) for v in (0.0, 3e-13, 0.5)]
    for variance, g_aux, pull in itertools.product(variances, (None, 0.37), (0.0, 1e-3)):
        offset = 0.0 if g_aux is None else 0.25
        gu, gv = _torch_spike_backward(
            g, u, variance, h, est, None if g_aux is None else torch.tensor(g_aux, dtype=dtype),
            offset, True, pull)
        want_u, want_v = _per_unit_backward(g, u, variance, h, estimator, g_aux, offset,
                                            pull)
        tol = {"rtol": 2e-5, "atol": 1e-6} if dtype == torch.float32 else {}
        torch.testing.assert_close(gu.double(), want_u, **tol)
        torch.testing.assert_close(gv.double(), want_v, **tol)
        if dtype == torch.float32 and kernels.available() and kernels.enabled():
            var, mid, inner = kernels._layout(u, variance)
            cu, cv = kernels._backward_raw(g, u, var, mid, inner, h.float(), estimator,
                                           g_aux or 0.0, offset, variance.shape, True, pull)
            torch.testing.assert_close(gu, cu, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(gv, cv, rtol=1e-4, atol=1e-5)


def test_erfcx_polynomial_is_accurate():
    """The backward's erfcx (a fitted polynomial in t = 1 / (1 + x/2)) is within 6e-7
    relative of torch.special.erfcx on [0, 30], the range it serves (|z| <= 40)."""
    x = torch.linspace(0, 30, 1_000_001).double()
    got = kernels._erfcx(x).double()
    ref = torch.special.erfcx(x)
    assert ((got - ref) / ref).abs().max() < 6e-7  # 5.1e-7 measured on an AVX2 CPU


@pytest.mark.parametrize(("var_shape", "layout"), [
    ((4, 1, 5, 6), (3, 30)),       # per-layer conv variance [N, 1, H, W]
    ((5, 1), None),                # [H, 1]: broadcast over N, C and W, not one block
    ((4, 3, 1, 1), (30, 1)),       # one value per channel map
    ((), (360, 1)),                # one element
    ((4, 3, 5, 6), (1, 1)),        # full shape
    ((1, 3, 1, 6), None),          # two separate broadcast blocks: expanded
])
def test_broadcast_variance_is_read_in_place(var_shape, layout):
    """A variance broadcast over one block of dimensions is read compactly by the kernel
    (and its gradient summed there): same spikes (same seed) and the same gradients, up to
    float rounding, as with the expanded variance; its gradient has its own shape."""
    shape = (4, 3, 5, 6)
    assert kernels.broadcast_layout(torch.Size(var_shape), torch.Size(shape)) == layout
    torch.manual_seed(0)
    u = torch.randn(shape, requires_grad=True)
    var = (torch.rand(var_shape) + 0.1).requires_grad_()
    full = var.detach().expand(shape).contiguous().requires_grad_()
    u2 = u.detach().clone().requires_grad_()
    g = torch.randn(shape)
    torch.manual_seed(1)
    h = kernels.fused_spike(u, var, sb.AGR(0.5))
    torch.manual_seed(1)
    h2 = kernels.fused_spike(u2, full, sb.AGR(0.5))
    assert torch.equal(h, h2)
    h.backward(g)
    h2.backward(g)
    assert var.grad.shape == var.shape
    # the vector loops split differently into vector body and scalar tail: rounding only
    torch.testing.assert_close(u.grad, u2.grad, rtol=1e-5, atol=0)
    # a sum of n float32 terms in another order: within n eps of the sum of their magnitudes
    # (a compact gradient with cancelling terms differs in more than its relative 1e-5:
    # 1.8e-7 of 1.9e-3 on an AVX2 CPU)
    n = full.numel() // var.numel()
    bound = n * torch.finfo(torch.float32).eps * full.grad.abs().sum_to_size(var_shape)
    assert ((var.grad - full.grad.sum_to_size(var_shape)).abs() <= bound).all()


def test_spikes_are_kept_once_and_shared_with_the_layer_they_feed():
    """The spike function saves the drive, the variance in its compact shape and the
    spikes themselves; a Bayesian layer fed by them saves that same tensor (one copy of
    the spikes for both backwards, no uint8 conversion), with the same gradients as an
    unmarked copy."""
    torch.manual_seed(0)
    u = torch.randn(8, 16, 4, 4, requires_grad=True)
    var = torch.rand(8, 1, 4, 4, requires_grad=True)
    layer = sb.BayesConv2d(16, 4, 3, padding=1, std=0.2)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        spikes = kernels.fused_spike(u, var, sb.ST())
        n_spike = len(saved)
        out = layer(spikes)
    assert [t.dtype for t in saved[:n_spike]] == [torch.float32] * 3
    assert saved[1].shape == (8, 1, 4, 4) and saved[2] is spikes
    assert sb.functional.is_kept(spikes)
    layer_ptrs = {t.untyped_storage().data_ptr() for t in saved[n_spike:]}
    assert spikes.untyped_storage().data_ptr() in layer_ptrs
    assert not any(t.dtype == torch.uint8 for t in saved[n_spike:])
    weights = torch.randn_like(out)
    grads = []
    for x in (spikes, spikes.detach().clone().requires_grad_()):
        layer.zero_grad()
        (layer(x) * weights).sum().backward()
        grads.append([layer.weight.grad.clone(), layer.bias.grad.clone()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_spikes_of_an_unrecorded_pass_are_not_kept():
    """Spikes drawn without an autograd node (the drive needs no gradient, or no_grad)
    were not saved by the kernel: they are marked binary but not kept, so a layer keeps
    its usual byte copy of them."""
    u, var = torch.randn(4, 8), torch.full((4, 1), 0.3)
    for spikes in (kernels.fused_spike(u, var, sb.ST()),
                   kernels.fused_lif_step(u, None, var, sb.ST(), 0.9)[0]):
        assert sb.functional.is_binary(spikes) and not sb.functional.is_kept(spikes)
    with torch.no_grad():
        spikes = kernels.fused_spike(u.requires_grad_(), var, sb.ST())
    assert sb.functional.is_binary(spikes) and not sb.functional.is_kept(spikes)


@pytest.mark.parametrize("std_grad", [True, False])
@pytest.mark.parametrize("centre", ["threshold", "zero"])
def test_aux_sum_and_its_gradient_match_the_pytorch_path(centre, std_grad):
    """The auxiliary z^2 sum computed in the kernel's pass equals the PyTorch formula, and
    so do its gradients to the drive and to the (broadcast) variance (rtol 1e-4);
    units with var = 0 contribute nothing. Without ``aux_std_grad`` the variance gets
    no gradient from it (sigma held constant), the drive the same one."""
    torch.manual_seed(3)
    u0 = torch.randn(6, 4, 5, 5)
    var0 = torch.rand(6, 1, 5, 5) + 0.05
    var0[0] = 0.0
    results = []
    for fused in (True, False):
        u, var = u0.clone().requires_grad_(), var0.clone().requires_grad_()
        spike = IWSTSpike("agr", threshold=1.0, aux_center=centre, aux_std_grad=std_grad)
        spike.collect_aux = True
        with kernels.use_kernels(fused):
            h = spike.fire(u, var)
        assert type(h.grad_fn).__name__.startswith("Fused" if fused else "Bernoulli")
        aux = spike.pop_aux()[0]
        aux.backward()
        var_grad = torch.zeros_like(var) if var.grad is None else var.grad
        results.append((aux.detach(), u.grad, var_grad))
    for got, ref in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    assert (results[0][2].abs().sum() > 0) == std_grad


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc")
def test_kernel_shares_torchs_openmp_runtime():
    """The kernel's OpenMP threads are torch's: one libgomp.so.1 is mapped, not a second
    copy from the system (other packages may map their own, differently named, copies)."""
    assert kernels.available()
    with open("/proc/self/maps") as fh:
        gomp = {line.split()[-1] for line in fh if line.rstrip().endswith("/libgomp.so.1")}
    assert len(gomp) <= 1, gomp


def test_bad_input_to_the_kernel_functions_is_named():
    u = torch.randn(4, 5)
    with pytest.raises(TypeError, match="u must be a torch.float32 CPU tensor"):
        kernels.spike_forward(u.double(), torch.ones(()), 1)
    with pytest.raises(TypeError, match="variance must be"):
        kernels.spike_forward(u, torch.ones((), dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="does not broadcast"):
        kernels.spike_forward(u, torch.ones(3), 1)
    with pytest.raises(ValueError, match="enlarge"):
        kernels.spike_forward(u, torch.ones(2, 4, 5), 1)
    with pytest.raises(ValueError, match="must have the shape of u"):
        kernels.spike_backward(torch.ones(4, 4), u, torch.ones(()), torch.ones(4, 5), sb.ST())


def _operator(implementation: str):
    """``sbnn_addons::spike_forward`` served by its C++ kernel (``"cpp"``, installed as a
    compiled graph's trace does) or its Python implementation (the fallback)."""
    if implementation == "python":
        return kernels._spike_forward_impl
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine")
    assert kernels._install_operator(), kernels._operator_error
    return torch.ops.sbnn_addons.spike_forward.default


@pytest.mark.parametrize("implementation", ["cpp", "python"])
@pytest.mark.parametrize("u_shape, var_shape", [((6, 40), (6, 40)), ((6, 40), (6, 1)),
                                                ((6, 40), ()), ((6, 40), (1, 40)),
                                                ((6, 2, 20), (1, 2, 1)), ((3, 4, 5), (4, 1))])
def test_spike_forward_operator_equals_the_kernel_function(u_shape, var_shape, implementation):
    """The custom operator of compiled graphs (``sbnn_addons::spike_forward``), by its C++
    kernel and by its Python implementation, gives the spikes (as bytes) and the auxiliary
    sum of :func:`kernels.spike_forward` for the key it draws from the global RNG, for every
    variance layout (full, per row, one element, one block, expanded), and 0 without an
    auxiliary offset."""
    op = _operator(implementation)
    u = torch.randn(u_shape)
    var = torch.rand(var_shape) + 0.05
    for offset in (None, 0.5):
        for _ in range(2):  # the second call reads the cached layout
            torch.manual_seed(4)
            h, aux, token = op(u, var, False, offset)
            torch.manual_seed(4)
            ref, _, ref_aux = kernels.spike_forward(u, var, kernels._seed(None),
                                                    aux_offset=offset)
            assert h.dtype == torch.uint8
            assert torch.equal(h.float(), ref) and 0 < h.sum() < h.numel()
            assert aux.dtype == torch.float32 and aux.shape == ()
            assert float(aux) == (0.0 if offset is None else pytest.approx(ref_aux, rel=1e-6))
            # the ordering output, which a compiled graph passes to its next call
            assert token.numel() == 0
            torch.manual_seed(4)
            assert torch.equal(op(u, var, False, offset, after=token)[0], h)


@pytest.mark.parametrize("implementation", ["cpp", "python"])
def test_spike_forward_operator_names_bad_input(implementation):
    op = _operator(implementation)
    u = torch.randn(4, 5)
    with pytest.raises(TypeError, match=re.escape(
            "u must be a torch.float32 CPU tensor for the fused kernel, got torch.float64 "
            "on cpu; use sbnn_addons.IWSTSpike")):
        op(u.double(), torch.ones(()), False, None)
    with pytest.raises(TypeError, match="variance must be .* got torch.int64 on cpu"):
        op(u, torch.ones((), dtype=torch.int64), False, None)
    for _ in range(2):  # not cached as a layout
        with pytest.raises(ValueError, match=re.escape(
                "variance of shape (3,) does not broadcast to the drive u of shape (4, 5)")):
            op(u, torch.ones(3), False, None)
        with pytest.raises(ValueError, match=re.escape("variance of shape (2, 4, 5) does")):
            op(u, torch.ones(2, 4, 5), False, None)


def test_spike_forward_operator_passes_opcheck():
    """PyTorch's own check of a custom operator (schema, fake implementation against the
    real one, dispatch) on the C++ kernel."""
    _operator("cpp")
    u, var = torch.randn(6, 40), torch.rand(6, 1) + 0.05
    for offset in (None, 0.5):
        torch.library.opcheck(torch.ops.sbnn_addons.spike_forward.default,
                              (u, var, False, offset),
                              test_utils=("test_schema", "test_faketensor"))


def test_spike_forward_operator_keeps_its_python_implementation_without_a_cxx_compiler(
        tmp_path):
    """Where the C++ kernel cannot be built (no C++ compiler), installing it leaves the
    Python implementation serving the operator, with the reason kept, and the operator
    gives the same spikes."""
    code = textwrap.dedent("""
        import torch
        from sbnn_addons import kernels
        assert kernels._ready_for_graphs()
        assert kernels._operator is None and "compiler" in kernels._operator_error, \
            kernels._operator_error
        u, var = torch.randn(6, 40), torch.rand(6, 1) + 0.05
        torch.manual_seed(3)
        h = torch.ops.sbnn_addons.spike_forward.default(u, var, False, None)[0]
        torch.manual_seed(3)
        ref = kernels.spike_forward(u, var, kernels._seed(None))[0]
        assert torch.equal(h.float(), ref)
        print("python implementation")
    """)
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "python implementation" in out.stdout


def _loop_reference(x, q, v0, s0, tau, decay_input, v_reset, detach, estimator,
                    backend="kernel"):
    """The recurrence of kernels.LIFSequence step by step with autograd: SpikingJelly's
    charge and reset operations, one spike per step: fused_spike (the same Philox keys)
    for the kernel, the PyTorch path's sample_spikes (the same Gaussian draws) for the
    "torch" backend."""
    v, state, out = v0, s0, []
    beta2 = 1.0 if tau is None else (1 - 1 / tau) ** 2
    for t in range(x.shape[0]):
        if tau is None:
            h = v + x[t]
        elif decay_input:
            h = v + (x[t] - (v - (v_reset or 0.0))) / tau
        else:
            h = v - (v - (v_reset or 0.0)) / tau + x[t]
        state = q[t] if state is None else q[t].add(state, alpha=beta2)
        if backend == "kernel":
            spike = kernels.fused_spike(h - 1.0, state, estimator, at_zero=True)
        else:
            spike = sb.sample_spikes(h - 1.0, sb.functional.safe_sqrt(state).expand_as(h),
                                     estimator, at_zero=True)
        s_reset = spike.detach() if detach else spike
        if v_reset is None:
            v = h - s_reset * 1.0
        else:
            v = s_reset * v_reset + (1.0 - s_reset) * h
            state = state.masked_fill(spike.detach() > 0, 0.0)
        out.append(spike)
    return torch.stack(out), v, state


_SEQUENCE_CASES = [
    (None, True, 0.0, False, (6, 3, 1)),
    (None, True, None, True, (6, 3, 5)),
    (2.0, True, 0.0, False, (6, 3, 1)),
    (2.0, True, -0.3, True, (6, 1, 5)),
    (3.0, False, None, False, (6, 3, 1)),
    (1.5, True, None, False, (6, 3, 5)),
]


@pytest.mark.parametrize("backend, dtype", [
    pytest.param("kernel", torch.float32, marks=needs_kernel),
    ("torch", torch.float32), ("torch", torch.float64)])
@pytest.mark.parametrize("tau, decay_input, v_reset, detach, q_shape", _SEQUENCE_CASES)
def test_lif_sequence_equals_the_step_loop(tau, decay_input, v_reset, detach, q_shape,
                                           backend, dtype):
    """LIFSequence on either backend: the same spikes, final membrane and variance state as
    the per-step loop (bitwise: the same Philox keys for the kernel, the same Gaussian
    draws for PyTorch operations), and the same gradients for x, Q, V_0 and S'_0 (rtol
    1e-5), with a loss on the spikes and on the final states."""
    torch.manual_seed(0)
    x = (torch.rand(6, 3, 5, dtype=dtype) * 1.5).requires_grad_()
    q = (torch.rand(q_shape, dtype=dtype) * 0.4).requires_grad_()
    v0 = (torch.rand(3, 5, dtype=dtype) * 0.5).requires_grad_()
    s0 = (torch.rand(3, 1, dtype=dtype) * 0.2).requires_grad_()
    weights = torch.randn(6, 3, 5, dtype=dtype)
    est = sb.AGR(0.5)
    results = []
    for run in ("loop", "fused"):
        for t in (x, q, v0, s0):
            t.grad = None
        torch.manual_seed(7)
        with kernels.use_kernels(backend == "kernel"):
            if run == "loop":
                spikes, v, state = _loop_reference(x, q, v0, s0, tau, decay_input, v_reset,
                                                   detach, est, backend)
            else:
                charge = "if" if tau is None else ("lif" if decay_input else "lif_nodecay")
                dyn = kernels.Dynamics(charge, 1.0 if tau is None else 1 - 1 / tau, tau, 1.0,
                                       "subtract" if v_reset is None else "hard",
                                       v_reset or 0.0, reset_variance=v_reset is not None,
                                       detach_reset=detach)
                assert kernels.sequence_backend(x, q) == backend
                spikes, v, state = kernels.lif_sequence(x, q, v0, s0, dyn, est, at_zero=True)
        ((spikes * weights).sum() + (v * v).sum() + 2 * state.sum()).backward()
        results.append((spikes.detach(), v.detach(), state.detach(),
                        [t.grad.clone() for t in (x, q, v0, s0)]))
    (s_a, v_a, st_a, g_a), (s_b, v_b, st_b, g_b) = results
    assert 0.05 < float(s_a.mean()) < 0.95
    assert torch.equal(s_a, s_b) and torch.equal(v_a, v_b)
    assert torch.equal(st_a.expand(3, 5), st_b.expand(3, 5))
    for name, a, b in zip(("x", "q", "v0", "s0"), g_a, g_b):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)



@pytest.mark.parametrize("backend", [pytest.param("kernel", marks=needs_kernel), "torch"])
def test_lif_sequence_gradient_is_exact_under_a_threshold_far_above_the_membrane(backend):
    """LIF.run as one sequence: its backward takes the charged membrane H_t itself, not
    u_t + theta, which in float32 loses H_t's low bits under theta = 1e6 (a zero reset's
    dV/dh = -H, here the only route of the auxiliary pull): the gradient equals the steps
    one by one (it was 0.8 % off)."""
    grads = []
    for own in (False, True):
        spike = IWSTSpike("st", std=0.3, aux_pull=0.1)
        if own:
            spike.fire = spike.fire  # the steps one by one
        lif = sb.LIF(beta=0.905, threshold=1e6, spike_fn=spike, reset="zero")
        x = torch.full((3, 2, 2), 0.5, requires_grad=True)
        currents = sb.moments.attach_variance(x * 1.0, torch.zeros(3, 2, 2))
        torch.manual_seed(0)
        with kernels.use_kernels(backend == "kernel"):
            spikes = lif.run(currents)
        (spikes * torch.arange(12.0).reshape(3, 2, 2)).sum().backward()
        grads.append(x.grad)
    assert bool(grads[1].abs().min() > 1.0)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=0)

def test_lif_sequence_bad_input_is_named():
    x, q, v0 = torch.rand(4, 2, 3), torch.rand(4, 2, 1), torch.zeros(2, 3)
    dyn = kernels.Dynamics("lif", 0.5, 2.0, 1.0, "hard")
    with pytest.raises(TypeError, match="float32 or float64 tensors of one dtype"):
        kernels.lif_sequence(x.double(), q, v0, None, dyn, sb.ST())
    with pytest.raises(ValueError, match="T steps"):
        kernels.lif_sequence(x, q[:3], v0, None, dyn, sb.ST())
    with pytest.raises(ValueError, match="v0 of shape"):
        kernels.lif_sequence(x, q, torch.zeros(5), None, dyn, sb.ST())
    with pytest.raises(ValueError, match="T >= 1"):
        kernels.lif_sequence(x[:0], q[:0], v0, None, dyn, sb.ST())
    with pytest.raises(ValueError, match="tau must be >= 1"):
        kernels.lif_sequence(x, q, v0, None, dyn._replace(tau=0.5), sb.ST())
    with pytest.raises(ValueError, match="reset one of"):
        kernels.lif_sequence(x, q, v0, None, dyn._replace(reset="soft"), sb.ST())


def _step_reference(x, m, var, estimator, beta, theta, reset, aux_offset):
    """One LIF step as separate PyTorch operations around one fused_spike call (the same
    Philox key): functional.lif_fire with the kernel's spike."""
    def spike_fn(drive, variance):
        out = kernels.fused_spike(drive, variance, estimator, aux_offset=aux_offset)
        if aux_offset is None:
            return out
        aux.append(out[1])
        return out[0]

    aux = []
    spikes, membrane = sb.functional.lif_fire(x, m, var, spike_fn, beta, theta, reset)
    return (spikes, membrane) if aux_offset is None else (spikes, membrane, aux[0])


@pytest.mark.parametrize("reset", ["subtract", "zero", "none"])
@pytest.mark.parametrize("first, theta, var_shape, estimator, aux", [
    (False, 1.0, (4, 1, 3, 3), sb.ST(), False),
    (True, 1.0, (4, 1, 3, 3), sb.AGR(0.5), True),
    (False, 0.7, (4, 6, 3, 3), sb.IWST(0.5), False),
    (False, 1.0, (), sb.AGR(0.0), True),
])
def test_fused_lif_step_equals_the_pytorch_operations(reset, first, theta, var_shape,
                                                      estimator, aux):
    """kernels.fused_lif_step: spikes and membrane equal the PyTorch operations around
    fused_spike bitwise (same key, same float operations), and the gradients of x, the
    previous membrane and the variance agree to rtol 1e-5, for a loss on the spikes, the
    new membrane and the auxiliary sum."""
    torch.manual_seed(0)
    x = (torch.rand(4, 6, 3, 3) * 2.0).requires_grad_()
    m = (torch.rand(4, 6, 3, 3) * 0.8).requires_grad_()
    var = (torch.rand(var_shape) * 0.4 + 0.01).requires_grad_()
    weights, m_weights = torch.randn(4, 6, 3, 3), torch.randn(4, 6, 3, 3)
    offset = 0.3 if aux else None
    results = []
    for fn in (_step_reference, None):
        for t in (x, m, var):
            t.grad = None
        torch.manual_seed(5)
        args = (x, None if first else m, var, estimator, 0.85, theta, reset)
        if fn is None:
            out = kernels.fused_lif_step(*args, aux_offset=offset)
            assert sb.functional.is_binary(out[0])
        else:
            out = fn(*args, offset)
        loss = (out[0] * weights).sum() + (out[1] * m_weights).sum()
        if aux:
            loss = loss + 0.2 * out[2]
        loss.backward()
        results.append((out[0].detach(), out[1].detach(),
                        [None if t.grad is None else t.grad.clone() for t in (x, m, var)]))
    (s_a, m_a, g_a), (s_b, m_b, g_b) = results
    assert 0.05 < float(s_a.mean()) < 0.95
    assert torch.equal(s_a, s_b) and torch.equal(m_a, m_b)
    for name, a, b in zip(("x", "m", "var"), g_a, g_b):
        if a is None:
            assert b is None and name == "m" and first
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_fused_lif_step_gradient_of_only_the_membrane_or_only_the_spikes():
    """A loss on one output only (the other's gradient is None in the backward): the
    same gradients as the PyTorch operations."""
    torch.manual_seed(1)
    x = (torch.rand(3, 50) * 2.0).requires_grad_()
    m = torch.rand(3, 50).requires_grad_()
    var = torch.full((3, 1), 0.3)
    for pick in (0, 1):
        grads = []
        for fn in (_step_reference, kernels.fused_lif_step):
            x.grad = m.grad = None
            torch.manual_seed(2)
            out = fn(x, m, var, sb.ST(), 0.9, 1.0, "subtract", *([None] if fn is
                                                                  _step_reference else []))
            (out[pick] * torch.linspace(-1, 1, 50)).sum().backward()
            grads.append((x.grad.clone(), m.grad.clone()))
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_fused_lif_step_bad_input_is_named():
    x, var = torch.rand(2, 3), torch.ones(2, 1)
    with pytest.raises(TypeError, match="x must be a torch.float32"):
        kernels.fused_lif_step(x.double(), None, var, sb.ST(), 0.9)
    with pytest.raises(TypeError, match="membrane must be a torch.float32"):
        kernels.fused_lif_step(x, torch.zeros(2, 3, dtype=torch.int32), var, sb.ST(), 0.9)
    with pytest.raises(ValueError, match="membrane of shape"):
        kernels.fused_lif_step(x, torch.zeros(3), var, sb.ST(), 0.9)
    with pytest.raises(ValueError, match="does not broadcast"):
        kernels.fused_lif_step(x, None, torch.ones(4), sb.ST(), 0.9)
    with pytest.raises(ValueError, match="reset must be one of"):
        kernels.fused_lif_step(x, None, var, sb.ST(), 0.9, reset="hard")


WINDOWS = [  # shape [M, C, *dims], kernel, stride, padding
    ((2, 3, 9, 11), (3, 3), (1, 1), (1, 1)), ((2, 1, 9, 11), (3, 2), (2, 3), (1, 0)),
    ((3, 1, 10), (5,), (2,), (2,)), ((2, 4, 8, 8), (2, 2), (2, 2), (0, 0)),
    ((1, 2, 7, 7), (4, 4), (3, 3), (2, 2)), ((2, 5, 6, 9), (3, 5), (1, 2), (2, 3)),
    ((2, 16, 16, 16), (3, 3), (1, 1), (1, 1)),
]


@pytest.mark.parametrize("shape, kernel, stride, padding", WINDOWS)
@pytest.mark.parametrize("square", [False, True])
def test_window_sum_is_the_ones_convolution(shape, kernel, stride, padding, square):
    """kernels.window_sum summed over the channels (of x or x^2) and scaled equals a
    float64 convolution with an all-ones [1, C, *k] kernel (rtol 1e-6); per channel
    (channels = 1) it equals the grouped one."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    conv = torch.nn.functional.conv2d if len(kernel) == 2 else torch.nn.functional.conv1d
    x64 = x.double() ** 2 if square else x.double()
    ones = torch.ones((1, shape[1], *kernel), dtype=torch.float64)
    want = conv(x64, ones, stride=stride, padding=padding) * 0.25
    got = kernels.window_sum(x, kernel, stride, padding, channels=shape[1], square=square,
                             scale=0.25)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)
    per_channel = conv(x64, ones.view(shape[1], 1, *kernel)[:, :, ...], stride=stride,
                       padding=padding, groups=shape[1])
    got = kernels.window_sum(x ** 2 if square else x, kernel, stride, padding)
    torch.testing.assert_close(got.double(), per_channel, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("shape, kernel, stride, padding", WINDOWS)
def test_window_sum_backward_is_the_transposed_sum(shape, kernel, stride, padding):
    """The kernel's transposed window sum equals the float64 autograd gradient of the
    grouped ones-convolution, and box_sum's two paths (kernel, shifted adds) agree in
    value and gradient, with a scale."""
    from sbnn_addons.functional import box_sum

    torch.manual_seed(1)
    x = torch.rand(shape, requires_grad=True)
    out = box_sum(x, kernel, stride, padding, scale=0.5)
    g = torch.randn(out.shape)
    (gx,) = torch.autograd.grad(out, x, g)
    x64 = x.detach().double().requires_grad_()
    conv = torch.nn.functional.conv2d if len(kernel) == 2 else torch.nn.functional.conv1d
    ones = torch.ones((shape[1], 1, *kernel), dtype=torch.float64)
    ref = conv(x64, ones, stride=stride, padding=padding, groups=shape[1]) * 0.5
    (want,) = torch.autograd.grad(ref, x64, g.double())
    torch.testing.assert_close(gx.double(), want, rtol=1e-6, atol=1e-5)
    with kernels.use_kernels(False):
        out_torch = box_sum(x, kernel, stride, padding, scale=0.5)
        (gx_torch,) = torch.autograd.grad(out_torch, x, g)
    torch.testing.assert_close(out, out_torch, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, gx_torch, rtol=1e-6, atol=1e-6)


def test_window_sum_allocation_failure_is_named():
    """The kernel reports a failed work-buffer allocation; Python raises MemoryError
    naming the size and the way around it."""
    with pytest.raises(MemoryError, match="use_kernels\\(False\\)"):
        kernels._check_allocation(1, 30, 40, 1, 2)
    kernels._check_allocation(0, 30, 40, 1, 2)  # success: no error


def test_window_sum_bad_input_is_named():
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(TypeError, match="x must be a torch.float32"):
        kernels.window_sum(x.double(), (3, 3), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="kernel 11 must be in"):
        kernels.window_sum(x, (11, 3), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="channels = 4"):
        kernels.window_sum(x, (3, 3), (1, 1), (1, 1), channels=4)
    with pytest.raises(ValueError, match="1 or 2 window dimensions"):
        kernels.window_sum(torch.rand(2, 3, 4, 4, 4), (2, 2, 2), (1, 1, 1), (0, 0, 0))


@needs_kernel
def test_second_order_gradients_raise_on_the_kernel_and_work_on_the_pytorch_path():
    """A gradient penalty (``create_graph=True``): the kernels' backward is not
    differentiable, so it raises and names the PyTorch path, which differentiates twice."""
    torch.manual_seed(0)
    fc = sb.BayesLinear(8, 6, std=0.2)
    spk = sb.IWSTSpike("st", std=0.3)
    lif = sb.LIF(spike_fn=sb.IWSTSpike("st", std=0.3))
    x = torch.rand(4, 8, requires_grad=True)
    for fire in (lambda c: spk(c - 0.3), lambda c: lif(c)[0]):
        h = fire(fc(x))
        with pytest.raises(RuntimeError, match="not differentiable.*use_kernels\\(False\\)"):
            torch.autograd.grad(h.sum(), x, create_graph=True)
        with kernels.use_kernels(False):
            h = fire(fc(x))
            g, = torch.autograd.grad(h.sum(), x, create_graph=True)
            g.pow(2).sum().backward()
        assert fc.std_rho.grad is not None and fc.weight.grad.abs().sum() > 0
        fc.zero_grad()


def test_use_kernels_called_without_with_sets_the_flag():
    """``kernels.use_kernels(False)`` as a statement turns the kernel off (as
    ``torch.set_grad_enabled`` does); it built a context manager never entered, which
    changed nothing. As a ``with`` block it restores the previous value."""
    before = kernels.enabled()
    try:
        kernels.use_kernels(False)
        assert not kernels.enabled()
        with kernels.use_kernels(True):
            assert kernels.enabled()
        assert not kernels.enabled()
    finally:
        kernels.use_kernels(before)
    assert kernels.enabled() == before


@needs_kernel
@pytest.mark.parametrize("estimator", ["st", "iwst(0.5)", "agr(1.0)"])
def test_backward_of_a_nan_drive_is_nan_as_on_the_pytorch_path(estimator):
    """The kernel's backward clamped ``z = u / sigma`` with fminf / fmaxf, which return
    the bound for a NaN: a NaN drive got a finite gradient (0 or a bound's), so a NaN
    inside a converted model trained on silently, where the PyTorch path and the hosts'
    surrogates give NaN. It gives NaN too (only there)."""
    u = torch.tensor([[0.3, float("nan"), -0.2, 1.5]])
    grads = []
    for fused in (True, False):
        spike = IWSTSpike(estimator, std=0.5)
        x = u.clone().requires_grad_()
        seed_spikes(spike, 0)
        with sb.check_finite(False), kernels.use_kernels(fused):
            (g,) = torch.autograd.grad(spike(x).sum(), x)
        grads.append(g)
    for g in grads:  # (the two paths draw different spikes: IW-ST / AGR weights differ)
        assert torch.isnan(g[0, 1]) and torch.isfinite(g[0, [0, 2, 3]]).all()
