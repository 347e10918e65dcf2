"""Pure maths of ``sbnn_addons.functional`` (Method page, sections 1, 4, 6). Exact, float64."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import sbnn_addons as sb
from sbnn_addons.functional import (
    estimator_jacobian,
    exact_unit_gradient,
    gaussian_kl,
    normal_cdf_ratio,
    safe_sqrt,
    spike_probability,
)
from sbnn_addons.tensors import scaled_jacobian

F64 = torch.float64
Z = torch.linspace(-4, 4, 81, dtype=F64)
BIG = 1e8  # weight bound lifted so that the identities hold exactly on |z| <= 4


def phi(z):
    return torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def jac(kind, z, h, sigma=1.0, **kw):
    s = torch.full_like(z, sigma)
    return estimator_jacobian(z * sigma, s, torch.full_like(z, h), kind, max_weight=BIG, **kw)


@pytest.mark.parametrize("sigma", [1.0, 0.3])
@pytest.mark.parametrize("tau", [0.0, 0.1, 0.5, 1.0, 2.0, 5.0])
def test_agr_expected_jacobian_identity(tau, sigma):
    """P(1) J(1) + P(0) J(0) = phi(z/r)/r (times 1/sigma), r = sqrt(1 + tau^2), computed
    exactly on z in [-4, 4]. Tolerance: rtol 1e-10 (float64)."""
    P1 = torch.special.ndtr(Z)
    total = P1 * jac("agr", Z, 1.0, sigma, tau=tau) + (1 - P1) * jac("agr", Z, 0.0, sigma, tau=tau)
    r = math.sqrt(1 + tau * tau)
    torch.testing.assert_close(total * sigma, phi(Z / r) / r, rtol=1e-10, atol=1e-300)


def test_agr_tau_to_zero_is_iwst1_and_iwst0_is_st():
    """AGR(0) == IW-ST(1) (rtol 1e-12); AGR(1e-7) -> IW-ST(1) (rtol 1e-6); IW-ST(0) == ST."""
    for h in (0.0, 1.0):
        iw1 = jac("iwst", Z, h, p=1.0)
        torch.testing.assert_close(jac("agr", Z, h, tau=0.0), iw1, rtol=1e-12, atol=0)
        torch.testing.assert_close(jac("agr", Z, h, tau=1e-7), iw1, rtol=1e-6, atol=0)
        torch.testing.assert_close(jac("iwst", Z, h, p=0.0), jac("st", Z, h), rtol=1e-15, atol=0)
        # tau > 0 really differs from the limit
        assert (jac("agr", Z, h, tau=0.5) - iw1).abs().max() > 1e-2


@pytest.mark.parametrize("p", [0.0, 0.3, 0.7, 1.0])
def test_iwst_weight_formula(p):
    """J(h) = ((1 - p) + p / (2 P(h))) phi(z) / sigma; and E[w(h)] = 1 (rtol 1e-12)."""
    sigma = 0.8
    P1 = torch.special.ndtr(Z)
    j1, j0 = jac("iwst", Z, 1.0, sigma, p=p), jac("iwst", Z, 0.0, sigma, p=p)
    torch.testing.assert_close(j1, ((1 - p) + p / (2 * P1)) * phi(Z) / sigma, rtol=1e-12, atol=0)
    torch.testing.assert_close(j0, ((1 - p) + p / (2 * (1 - P1))) * phi(Z) / sigma, rtol=1e-12,
                               atol=0)
    torch.testing.assert_close(P1 * j1 + (1 - P1) * j0, phi(Z) / sigma, rtol=1e-12, atol=0)


def test_finite_differences_of_exact_expectation():
    """E[f(h)] = Phi(z) f(1) + (1 - Phi(z)) f(0): central differences (step 1e-6) in mu and
    sigma agree with exact_unit_gradient. Tolerance: 1e-7 absolute + 1e-6 relative."""
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(50, generator=gen, dtype=F64) * 2
    sigma = torch.rand(50, generator=gen, dtype=F64) + 0.2
    f0, f1 = torch.randn(50, generator=gen, dtype=F64), torch.randn(50, generator=gen, dtype=F64)

    def expect(m, s):
        P = torch.special.ndtr(m / s)
        return P * f1 + (1 - P) * f0

    d = 1e-6
    fd_mu = (expect(mu + d, sigma) - expect(mu - d, sigma)) / (2 * d)
    fd_sigma = (expect(mu, sigma + d) - expect(mu, sigma - d)) / (2 * d)
    g_mu, g_sigma = exact_unit_gradient(mu, sigma, f0, f1)
    torch.testing.assert_close(g_mu, fd_mu, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_sigma, fd_sigma, rtol=1e-6, atol=1e-7)
    assert g_mu.abs().max() > 0.1  # not trivially zero


def test_spike_probability_and_sigma_zero():
    u = torch.tensor([-1.0, 0.0, 2.0], dtype=F64)
    torch.testing.assert_close(spike_probability(u, torch.full_like(u, 2.0)),
                               torch.special.ndtr(u / 2), rtol=1e-15, atol=0)
    assert torch.equal(spike_probability(u, torch.zeros_like(u)), torch.tensor([0.0, 0.0, 1.0],
                                                                                dtype=F64))
    for kind in ("st", "iwst", "agr"):
        j = estimator_jacobian(u, torch.zeros_like(u), torch.ones_like(u), kind, p=0.5, tau=0.5)
        assert torch.equal(j, torch.zeros_like(u))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normal_cdf_ratio_far_tail(dtype):
    """Phi(s x) / Phi(x) for x down to -40 (Phi underflows in float32 below ~-13) matches
    the float64 log-space value: rtol 1e-4 (float32) / 1e-10 (float64), finite wherever the
    true ratio is representable in the dtype (beyond that it overflows to inf, and the
    estimators clamp it at max_weight)."""
    x = torch.tensor([-40.0, -30.0, -15.0, -10.0, -5.0, 0.0, 3.0], dtype=dtype)
    for scale, branchless in itertools.product((0.0, 0.3, 0.9), (False, True)):
        # branchless: the form without a data-dependent branch that accelerators (no
        # device sync per backward), graphs and torch.func take; vmap reaches it on a CPU
        got = (torch.func.vmap(lambda v, s=scale: normal_cdf_ratio(v, s))(x.unsqueeze(1))
               .squeeze(1) if branchless else normal_cdf_ratio(x, scale))
        x64 = x.double()
        log_num = torch.special.log_ndtr(x64 * scale)
        want = torch.exp(log_num - torch.special.log_ndtr(x64))
        finite = want < torch.finfo(dtype).max  # the true value is representable
        assert torch.isfinite(got[finite]).all()
        rtol = 1e-4 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(got[finite].double(), want[finite], rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normal_cdf_ratio_and_jacobians_stay_defined_at_huge_and_infinite_x(dtype):
    """Beyond |x| ~ 1e19 (float32: x^2 overflows) and at +-inf the log-space ratio was
    inf - inf = NaN, which no max_weight clamp removes: the ratio is its limit there (inf
    below, 1 above), and the scaled jacobian of every estimator 0 (phi(z) = 0)."""
    x = torch.tensor([-math.inf, -1e30, -3e19, -1e10, 1e10, 3e19, 1e30, math.inf],
                     dtype=dtype)
    for branchless in (False, True):
        got = (torch.func.vmap(lambda v: normal_cdf_ratio(v, 0.5))(x.unsqueeze(1)).squeeze(1)
               if branchless else normal_cdf_ratio(x, 0.5))
        assert not got.isnan().any()
        assert (got[:4] == math.inf).all() and (got[4:] == 1).all()
    for kind in ("st", "iwst", "agr"):
        for h in (False, True):
            j = scaled_jacobian(x, torch.full(x.shape, h), kind, p=0.5, tau=0.7)
            assert torch.equal(j, torch.zeros_like(j)), (kind, h, j)


@pytest.mark.parametrize("kind", ["st", "iwst", "agr"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_jacobian_extreme_z_finite_and_bounded(kind, dtype):
    z = torch.tensor([-40.0, -20.0, -8.5, 0.0, 8.5, 20.0, 40.0], dtype=dtype)
    for p in (0.0, 0.5, 1.0):
        for h in (0.0, 1.0):
            j = estimator_jacobian(z, torch.ones_like(z), torch.full_like(z, h), kind, p=p,
                                   tau=0.5)
            assert torch.isfinite(j).all()
            assert (j <= 1e4 * phi(torch.tensor(0.0))).all()


def test_gaussian_kl_closed_form():
    """Summed KL equals torch.distributions and the per-layer formula (rtol 1e-12)."""
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(7, 5, generator=gen, dtype=F64)
    s = torch.rand(7, 5, generator=gen, dtype=F64) + 0.1
    want = torch.distributions.kl_divergence(
        torch.distributions.Normal(m, s),
        torch.distributions.Normal(torch.tensor(0.0, dtype=F64), torch.tensor(0.7, dtype=F64)),
    ).sum()
    torch.testing.assert_close(gaussian_kl(m, s, 0.7), want, rtol=1e-12, atol=0)
    s_l, n = torch.tensor(0.3, dtype=F64), m.numel()
    spec = n * math.log(0.7 / 0.3) + (n * 0.09 + (m**2).sum()) / (2 * 0.49) - n / 2
    torch.testing.assert_close(gaussian_kl(m, s_l, 0.7), spec, rtol=1e-12, atol=0)


def test_safe_sqrt_gradient_zero_at_zero():
    v = torch.tensor([0.0, 4.0], requires_grad=True)
    out = safe_sqrt(v)
    out.sum().backward()
    assert torch.equal(out.detach(), torch.tensor([0.0, 2.0]))
    assert torch.equal(v.grad, torch.tensor([0.0, 0.25]))


def test_safe_sqrt_clamps_a_rounding_negative_and_keeps_only_the_std():
    """sqrt(max(v, 0)): a variance that rounding made slightly negative gives std 0 and
    gradient 0 (not NaN), and only the std is kept for the backward (a clamp_min in front
    would keep the variance as well: one more tensor of its size per spike call)."""
    v = torch.tensor([-1e-9, 0.0, 4.0], requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = safe_sqrt(v * 1.0)
    assert len(kept) == 1 and torch.equal(kept[0], out.detach())
    out.sum().backward()
    assert torch.equal(out.detach(), torch.tensor([0.0, 0.0, 2.0]))
    assert torch.equal(v.grad, torch.tensor([0.0, 0.0, 0.25]))


def test_mark_binary_is_voided_by_in_place_changes_and_skips_x_squared(monkeypatch):
    """Spikes are marked binary; an in-place change voids the mark; a Bayesian layer gives
    the same variance for a marked spike input (x^2 = x skipped) as for an unmarked copy,
    and saves nothing extra for it."""
    from sbnn_addons import BayesLinear, IWSTSpike, get_variance
    from sbnn_addons.functional import is_binary, mark_binary

    monkeypatch.setattr(sb.layers, "COMPACT_INPUT_MIN", 1)
    spikes = IWSTSpike("st", std=0.5)(torch.randn(16, 8))
    assert is_binary(spikes)
    plain = spikes.clone()
    assert not is_binary(plain)
    layer = BayesLinear(8, 4, std=0.3, std_mode="weight")
    torch.testing.assert_close(get_variance(layer(spikes)), get_variance(layer(plain)),
                               rtol=0, atol=0)
    saved_bytes = []
    for x in (spikes, plain):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t, saved=saved: saved.append(t) or t, lambda t: t):
            layer(x)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
        saved_bytes.append(sum(storages.values()))
    assert saved_bytes[0] < saved_bytes[1]
    x = mark_binary(torch.ones(3))
    x.mul_(0.5)
    assert not is_binary(x)


def test_lif_run_output_is_marked_binary():
    from sbnn_addons import LIF, BayesLinear
    from sbnn_addons.functional import is_binary

    currents = BayesLinear(5, 6, std=0.2)(torch.rand(4, 3, 5))
    assert is_binary(LIF()(currents[0])[0])
    assert is_binary(LIF().run(currents))


@pytest.mark.parametrize("shape, kernel, stride, padding", [
    ((2, 3, 9, 11), (3, 3), (1, 1), (1, 1)), ((2, 1, 9, 11), (3, 2), (2, 3), (1, 0)),
    ((2, 1, 10), (5,), (2,), (2,)), ((2, 4, 8, 8), (2, 2), (2, 2), (0, 0)),
    ((1, 1, 7, 7), (4, 4), (3, 3), (2, 2)),
])
def test_box_sum_is_the_ones_convolution_and_its_gradient_checks(shape, kernel, stride,
                                                                 padding):
    """box_sum equals a convolution of each channel with an all-ones kernel (float64),
    and its custom backward (the transposed window sum) passes gradcheck."""
    from sbnn_addons.functional import box_sum

    x = torch.rand(shape, dtype=torch.float64, requires_grad=True)
    conv = torch.nn.functional.conv2d if len(kernel) == 2 else torch.nn.functional.conv1d
    ones = torch.ones((shape[1], 1, *kernel), dtype=torch.float64)
    want = conv(x, ones, stride=stride, padding=padding, groups=shape[1])
    torch.testing.assert_close(box_sum(x, kernel, stride, padding), want, rtol=1e-12,
                               atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: box_sum(t, kernel, stride, padding), (x,))


@pytest.mark.parametrize("kernel, stride, padding, word", [
    ((3, 3), (1,), (0, 0), "one entry per window"),
    ((3, 3, 3, 3, 3), (1,) * 5, (0,) * 5, "fewer than"),
    ((9,), (1,), (0,), "kernel 9 must be in"),
    ((0,), (1,), (0,), "kernel 0"),
    ((2,), (0,), (0,), "stride 0"),
])
def test_box_sum_names_bad_windows(kernel, stride, padding, word):
    from sbnn_addons.functional import box_sum

    with pytest.raises(ValueError, match=word):
        box_sum(torch.rand(2, 3, 8), kernel, stride, padding)


@pytest.mark.parametrize("reset", ["subtract", "zero", "none"])
@pytest.mark.parametrize("threshold", [1.0, 0.7])
def test_lif_fire_is_the_membrane_half_of_lif_step(reset, threshold):
    """lif_step = V update + lif_fire; a None membrane is the zero state (one op fewer)
    and threshold 1 subtracts the spikes themselves: the same values either way."""
    from sbnn_addons.functional import lif_fire, lif_step

    gen = torch.Generator().manual_seed(0)
    current, membrane = torch.randn(2, 4, 5, generator=gen)
    var_in, var_prev = torch.rand(2, 4, 5, generator=gen)

    def spike_fn(drive, variance):  # deterministic, reads both arguments
        return (drive + 0.1 * variance > 0).float()

    beta = 0.8
    h, u, v = lif_step(current, var_in, membrane, var_prev, spike_fn, beta, threshold, reset)
    v_want = beta**2 * var_prev + var_in
    u_want = beta * membrane + current
    h_want = spike_fn(u_want - threshold, v_want)
    u_want = {"subtract": u_want - threshold * h_want, "zero": u_want * (1 - h_want),
              "none": u_want}[reset]
    torch.testing.assert_close(v, v_want)
    assert torch.equal(h, h_want)
    torch.testing.assert_close(u, u_want)
    h0, u0 = lif_fire(current, None, var_in, spike_fn, beta, threshold, reset)
    h1, u1 = lif_fire(current, torch.zeros_like(current), var_in, spike_fn, beta, threshold,
                      reset)
    assert torch.equal(h0, h1) and torch.equal(u0, u1)

    with pytest.raises(ValueError, match="reset must be one of"):
        lif_step(current, var_in, membrane, var_prev, spike_fn, beta, threshold, "hard")
