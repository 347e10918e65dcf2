"""IW-ST estimators through ``BernoulliSpike`` (Method page, sections 1 and 4).

Every stochastic test uses a fixed seed and states its tolerance. Exact checks (no
sampling) are done in float64 by enumerating the spike states.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings

import pytest
import torch

from sbnn_addons import AGR, IWST, ST, BernoulliSpike, Estimator, get_estimator, sample_spikes

F64 = torch.float64
ESTIMATORS = [ST(), IWST(0.0), IWST(0.3), IWST(0.7), IWST(1.0), AGR(0.0), AGR(0.5), AGR(2.0)]
IDS = [str(e) for e in ESTIMATORS]


def phi(z):
    return torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def Phi(z):
    return torch.special.ndtr(z)


def forced_eps(h, big=1e3):
    """Noise that realises the spike state ``h`` for any drive with |u| < big * sigma."""
    return (2.0 * h - 1.0) * big


def expected_jacobian(est: Estimator, z: torch.Tensor, sigma: float) -> torch.Tensor:
    """Analytic ``E[dh/du]``: exact ``phi(z)/sigma`` for ST / IW-ST, ``phi(z/r)/(r sigma)`` AGR."""
    if est.kind == "agr":
        r = math.sqrt(1.0 + est.tau**2)
        return phi(z / r) / r / sigma
    return phi(z) / sigma


# ----------------------------------------------------------------- Monte Carlo, linear loss
@pytest.mark.parametrize("est", ESTIMATORS, ids=IDS)
def test_expected_gradient_linear_loss_monte_carlo(est):
    """E[dL/du] = c phi(z)/sigma, E[dL/dsigma] = -z c phi(z)/sigma (AGR: phi(z/r)/r).

    200k samples of eps per z, float64. Tolerance: 4 standard errors of the MC mean
    (+1e-12 for the zero-variance ST case).
    """
    gen = torch.Generator().manual_seed(1234)
    sigma, c, n = 0.7, -1.3, 200_000
    z = torch.tensor([-3.0, -2.0, -1.0, -0.3, 0.0, 0.4, 1.0, 2.0, 3.0], dtype=F64)
    u = (z * sigma).expand(n, -1).clone().requires_grad_(True)
    s = torch.full_like(u, sigma).requires_grad_(True)
    eps = torch.randn(u.shape, generator=gen, dtype=F64)
    h = BernoulliSpike.apply(u, s, eps, est, False)
    (c * h).sum().backward()
    want_u = c * expected_jacobian(est, z, sigma)
    want_s = -z * want_u
    for g, want in ((u.grad, want_u), (s.grad, want_s)):
        mean = g.mean(0)
        se = g.std(0) / math.sqrt(n)
        err = (mean - want).abs()
        assert torch.all(err <= 4 * se + 1e-12), (est, mean, want, se)
    # the empirical firing rate is Phi(z) (4 standard errors of a proportion)
    rate = h.detach().mean(0)
    se = torch.sqrt(Phi(z) * (1 - Phi(z)) / n) + 1e-12
    assert torch.all((rate - Phi(z)).abs() <= 4 * se)


# ----------------------------------------------------------------- exact identities
@pytest.mark.parametrize("est", ESTIMATORS, ids=IDS)
def test_expected_jacobian_exact_by_enumeration(est):
    """sum_h P(h) J(h) equals the analytic expectation exactly (float64, rtol 1e-10),
    with J taken from BernoulliSpike's backward for each forced state, on z in [-4, 4].

    The default weight bound max_weight = 1e4 (Method page: weights bounded) is active
    for |z| > ~3.7 (1/(2 Phi(-4)) = 1.6e4), so the identity is checked with the bound lifted
    to 1e8; the bound itself is tested in test_weight_bound_is_applied."""
    est = dataclasses.replace(est, max_weight=1e8)
    sigma = 1.3
    z = torch.linspace(-4, 4, 41, dtype=F64)
    total = torch.zeros_like(z)
    for hv in (0.0, 1.0):
        u = (z * sigma).requires_grad_(True)
        h = torch.full_like(z, hv)
        out = BernoulliSpike.apply(u, torch.full_like(z, sigma), forced_eps(h), est, False)
        assert torch.equal(out, h)
        out.sum().backward()
        prob = Phi(z) if hv else 1 - Phi(z)
        total = total + prob * u.grad
    torch.testing.assert_close(total, expected_jacobian(est, z, sigma), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("sigma", [0.5, 2.0])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.7, 1.0])
def test_quadratic_loss_single_unit_bias_exact(p, sigma):
    """Method page, section 4, single unit, f(h) = (h - y)^2 (curved): exact expected estimator
    gradient (enumeration of h) minus the exact gradient phi(z)/sigma (f(1) - f(0)) equals
    phi(z)/sigma (q(1) - 1/2) (f'(1) - f'(0)), with q(1) = (1-p) Phi(z) + p/2, i.e. (1-p)
    times the ST bias. p = 1 (= AGR(0)) is exactly unbiased. Tolerance 1e-12 (float64)."""
    y = 0.2
    z = torch.linspace(-3, 3, 25, dtype=F64)
    for est in (IWST(p), AGR(0.0) if p == 1.0 else IWST(p), ST() if p == 0.0 else IWST(p)):
        mean_grad = torch.zeros_like(z)
        for hv in (0.0, 1.0):
            u = (z * sigma).requires_grad_(True)
            h = torch.full_like(z, hv)
            out = BernoulliSpike.apply(u, torch.full_like(z, sigma), forced_eps(h), est, False)
            ((out - y) ** 2).sum().backward()
            mean_grad = mean_grad + (Phi(z) if hv else 1 - Phi(z)) * u.grad
        f0, f1 = y**2, (1 - y) ** 2
        exact = phi(z) / sigma * (f1 - f0)
        q1 = (1 - p) * Phi(z) + p / 2
        bias = phi(z) / sigma * (q1 - 0.5) * (2 * (1 - y) - 2 * (0 - y))
        torch.testing.assert_close(mean_grad - exact, bias, rtol=0, atol=1e-12)
        if p == 1.0:
            assert (mean_grad - exact).abs().max() < 1e-12
        else:
            assert (mean_grad - exact).abs().max() > 1e-3  # ST-like members are biased


# ----------------------------------------------------------------- exact network
SIZES = (4, 6, 3, 1)  # 4 inputs -> 6 -> 3 -> 1 Bernoulli output: 10 stochastic units
SIGMA = 1.0


def _network(seed: int = 3, weight_scale: float = 0.8):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for n_in, n_out in zip(SIZES[:-1], SIZES[1:]):
        w = torch.randn(n_out, n_in, generator=gen, dtype=F64) * weight_scale / math.sqrt(n_in)
        b = torch.randn(n_out, generator=gen, dtype=F64) * 0.3
        params += [w.requires_grad_(True), b.requires_grad_(True)]
    x = torch.rand(3, SIZES[0], generator=gen, dtype=F64)  # 3 examples
    return params, x


def _configs():
    n = sum(SIZES[1:])
    states = torch.tensor(list(itertools.product((0.0, 1.0), repeat=n)), dtype=F64)
    return torch.split(states, list(SIZES[1:]), dim=1)  # [C, 6], [C, 3], [C, 1]


def _loss(h_out, y=0.25):
    return ((h_out - y) ** 2).sum(-1)


def _exact_expected_loss(params, x):
    """E[f] = sum over the 2^10 states of prod_i P(h_i | parents) f(h_out), per example."""
    states = _configs()
    total = 0.0
    for xb in x:
        prev = xb.expand(states[0].shape[0], -1)
        prob = torch.ones(states[0].shape[0], dtype=F64)
        for (w, b), h in zip(zip(params[::2], params[1::2]), states):
            p1 = Phi((prev @ w.T + b) / SIGMA)
            prob = prob * torch.where(h > 0, p1, 1 - p1).prod(-1)
            prev = h
        total = total + (prob * _loss(states[-1])).sum()
    return total / x.shape[0]


def _estimator_expected_loss(params, x, est):
    """Surrogate whose gradient is the estimator's exact expected gradient:
    sum over states of P(state) (detached) times the loss of a BernoulliSpike pass in which
    eps is chosen to realise that state."""
    states = _configs()
    total = 0.0
    for xb in x:
        prev = xb.expand(states[0].shape[0], -1)
        prob = torch.ones(states[0].shape[0], dtype=F64)
        for (w, b), h in zip(zip(params[::2], params[1::2]), states):
            a = prev @ w.T + b
            p1 = Phi(a.detach() / SIGMA)
            prob = prob * torch.where(h > 0, p1, 1 - p1).prod(-1)
            out = BernoulliSpike.apply(a, torch.full_like(a, SIGMA), forced_eps(h), est, False)
            assert torch.equal(out, h)
            prev = out
        total = total + (prob * _loss(prev)).sum()
    return total / x.shape[0]


def _flat_grad(value, params):
    return torch.cat([g.flatten() for g in torch.autograd.grad(value, params)])


def test_network_exact_enumeration_bias_ordering():
    """Exact (enumerated, 2^10 states) expected gradient of each estimator against the exact
    gradient of the expected loss, in float64 (no sampling, tolerance 1e-12 on identities).

    Setting: 4 -> 6 -> 3 -> 1 Bernoulli units, sigma = 1, weights N(0, 0.8^2 / fan_in),
    biases N(0, 0.3^2) (seed 3), inputs U(0, 1), 3 examples, loss (h_out - 0.25)^2; every
    pre-activation has |z| < 2.5 (checked). In this moderate-|z| setting the bias norm of
    IW-ST(p) decreases strictly as p goes 0 -> 0.5 -> 1 and ST (= IW-ST(0)) has the largest.
    """
    params, x = _network()
    exact_value = _exact_expected_loss(params, x)
    exact = _flat_grad(exact_value, params)
    # moderate |z| in every unit of every state
    states = _configs()
    zmax = 0.0
    for xb in x:
        prev = xb.expand(states[0].shape[0], -1)
        for (w, b), h in zip(zip(params[::2], params[1::2]), states):
            zmax = max(zmax, float(((prev @ w.T + b) / SIGMA).abs().max().detach()))
            prev = h
    assert zmax < 2.5
    bias = {}
    for est in (ST(), IWST(0.0), IWST(0.5), IWST(1.0), AGR(0.0)):
        value = _estimator_expected_loss(params, x, est)
        torch.testing.assert_close(value, exact_value, rtol=1e-12, atol=0)  # same expectation
        bias[str(est)] = float((_flat_grad(value, params) - exact).norm())
    assert bias["ST"] == pytest.approx(bias["IW-ST(0)"], rel=1e-12)
    assert bias["IW-ST(1)"] == pytest.approx(bias["AGR(0)"], rel=1e-10)
    assert bias["IW-ST(0)"] > bias["IW-ST(0.5)"] > bias["IW-ST(1)"], bias
    assert bias["ST"] == max(bias.values())
    assert bias["ST"] > 1e-3  # the estimators are biased in a curved multi-layer network


def test_network_single_stochastic_output_agr0_unbiased():
    """With one stochastic unit left (deterministic 1[a>0] hidden units via sigma -> the
    enumeration of the last unit only), the quadratic loss gives AGR(0) exactly unbiased:
    checked on the output unit of the network above, for every weight of the last layer."""
    params, x = _network()
    w, b = params[-2], params[-1]
    prev = torch.rand(5, SIZES[-2], dtype=F64, generator=torch.Generator().manual_seed(0))
    a = prev @ w.T + b
    exact = torch.autograd.grad(
        (Phi(a / SIGMA) * _loss(torch.ones(1, dtype=F64)).item()
         + (1 - Phi(a / SIGMA)) * _loss(torch.zeros(1, dtype=F64)).item()).sum(), (w, b))
    got = [torch.zeros_like(w), torch.zeros_like(b)]
    for hv in (0.0, 1.0):
        a = prev @ w.T + b
        h = torch.full_like(a, hv)
        out = BernoulliSpike.apply(a, torch.full_like(a, SIGMA), forced_eps(h), AGR(0.0), False)
        prob = (Phi(a / SIGMA) if hv else 1 - Phi(a / SIGMA)).detach()
        for acc, g in zip(got, torch.autograd.grad((prob * _loss(out)[:, None]).sum(), (w, b))):
            acc += g
    for g, e in zip(got, exact):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)


def test_weight_bound_is_applied():
    """At z = -6 the IW-ST(1) weight of h = 1 is 1/(2 Phi(-6)) ~ 5e8: it is clamped to
    max_weight exactly (float64, rtol 1e-12)."""
    z = torch.tensor([-6.0], dtype=F64)
    for est in (IWST(1.0), AGR(0.0), Estimator("iwst", p=1.0, max_weight=50.0)):
        u = z.clone().requires_grad_(True)
        BernoulliSpike.apply(u, torch.ones_like(z), torch.full_like(z, 1e3), est, False).backward()
        torch.testing.assert_close(u.grad, est.max_weight * phi(z), rtol=1e-12, atol=0)


# ----------------------------------------------------------------- BernoulliSpike forward
def test_forward_is_threshold_of_noisy_drive():
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(50, generator=gen)
    sigma = torch.rand(50, generator=gen)
    eps = torch.randn(50, generator=gen)
    h = BernoulliSpike.apply(u, sigma, eps, ST(), False)
    assert torch.equal(h, (u + sigma * eps > 0).float())
    zero = torch.zeros(3)
    assert torch.equal(BernoulliSpike.apply(zero, zero, zero, ST(), False), zero)
    assert torch.equal(BernoulliSpike.apply(zero, zero, zero, ST(), True), torch.ones(3))


def test_sample_spikes_deterministic_and_generator_replay():
    u = torch.linspace(-1, 1, 11)
    sigma = torch.full_like(u, 5.0)
    assert torch.equal(sample_spikes(u, sigma, deterministic=True), (u > 0).float())
    a = sample_spikes(u, sigma, "agr", generator=torch.Generator().manual_seed(7))
    b = sample_spikes(u, sigma, "agr", generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    # scalar sigma broadcasts
    assert sample_spikes(u, torch.tensor(0.0)).shape == u.shape


def test_sigma_zero_is_deterministic_with_zero_gradient():
    u = torch.tensor([-0.5, 0.0, 0.5], requires_grad=True)
    sigma = torch.zeros(3, requires_grad=True)
    for est in ESTIMATORS:
        u.grad = sigma.grad = None
        h = sample_spikes(u, sigma, est, generator=torch.Generator().manual_seed(0))
        assert torch.equal(h, torch.tensor([0.0, 0.0, 1.0]))
        h.sum().backward()
        assert torch.equal(u.grad, torch.zeros(3)) and torch.equal(sigma.grad, torch.zeros(3))


# ----------------------------------------------------------------- robustness
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("est", ESTIMATORS, ids=IDS)
def test_extreme_z_rare_states_are_finite(est, dtype):
    """|z| up to 40 with the *rare* state forced through eps: outputs and gradients finite."""
    z = torch.tensor([-40.0, -20.0, -9.0, -5.0, 0.0, 5.0, 9.0, 20.0, 40.0])
    sigma = torch.full_like(z, 0.5)
    rare = (z < 0).float()  # fire when firing is improbable, stay silent when it is likely
    u = (z * sigma).to(dtype).requires_grad_(True)
    s = sigma.to(dtype).requires_grad_(True)
    eps = forced_eps(rare, big=100.0).to(dtype)
    h = BernoulliSpike.apply(u, s, eps, est, False)
    assert h.dtype == dtype and torch.equal(h.float(), rare)
    (h * torch.linspace(-1, 1, 9, dtype=dtype)).sum().backward()
    assert torch.isfinite(u.grad).all() and torch.isfinite(s.grad).all()
    assert u.grad.dtype == dtype and s.grad.dtype == dtype
    # importance weights stay bounded by max_weight: |J| <= max_weight * phi(0) / sigma
    assert float(u.grad.float().abs().max()) <= est.max_weight * phi(torch.tensor(0.0)) / 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sigma", [0.0, 1e-12])
def test_tiny_sigma_finite(sigma, dtype):
    u = torch.tensor([-1.0, 0.0, 1e-8, 1.0], dtype=dtype, requires_grad=True)
    s = torch.full((4,), sigma, dtype=dtype, requires_grad=True)
    for est in ESTIMATORS:
        u.grad = s.grad = None
        h = sample_spikes(u, s, est, generator=torch.Generator().manual_seed(0))
        h.sum().backward()
        assert torch.isfinite(h).all()
        assert torch.isfinite(u.grad).all() and torch.isfinite(s.grad).all()


def test_empty_batch():
    u = torch.zeros(0, 5, requires_grad=True)
    for est in ESTIMATORS:
        h = sample_spikes(u, torch.ones(0, 5), est)
        assert h.shape == (0, 5)
        h.sum().backward()
        assert u.grad.shape == (0, 5)


# ----------------------------------------------------------------- vmap / grad
@pytest.mark.parametrize("est", ESTIMATORS, ids=IDS)
def test_vmap_of_grad_matches_loop(est):
    """torch.func.vmap(torch.func.grad(f)) through BernoulliSpike equals a per-example loop
    (exactly, float64), including the far tail |z| = 12 where the log-space ratio is used."""
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(4, 6, generator=gen, dtype=F64)
    u[0, 0], u[1, 1] = -12.0, 12.0
    eps = torch.randn(4, 6, generator=gen, dtype=F64)
    eps[0, 0], eps[1, 1] = 100.0, -100.0  # rare states
    weights = torch.linspace(-1, 2, 6, dtype=F64)

    def f(ui, ei):
        h = BernoulliSpike.apply(ui, torch.ones_like(ui), ei, est, False)
        return (weights * h).sum() + (h.sum() - 2.0) ** 2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # functorch fallback performance notice
        batched = torch.func.vmap(torch.func.grad(f))(u, eps)
    loop = torch.stack([torch.func.grad(f)(u[i], eps[i]) for i in range(4)])
    torch.testing.assert_close(batched, loop, rtol=1e-12, atol=0)
    assert torch.isfinite(batched).all()


# ----------------------------------------------------------------- construction / parsing
def test_get_estimator_parsing():
    assert get_estimator("st") == ST()
    assert get_estimator("ST") == ST()
    assert get_estimator("iwst(0.5)") == IWST(0.5)
    assert get_estimator("IW-ST(0.3)") == IWST(0.3)
    assert get_estimator("agr") == AGR(0.0)
    assert get_estimator("agr(0.3)") == AGR(0.3)
    est = IWST(0.7)
    assert get_estimator(est) is est
    assert str(IWST(0.5)) == "IW-ST(0.5)" and str(AGR(2)) == "AGR(2)" and str(ST()) == "ST"


@pytest.mark.parametrize(
    "call, exc, word",
    [
        (lambda: IWST(1.5), ValueError, "p"),
        (lambda: IWST(-0.1), ValueError, "p"),
        (lambda: IWST(float("nan")), ValueError, "p"),
        (lambda: AGR(-0.5), ValueError, "tau"),
        (lambda: AGR(float("inf")), ValueError, "tau"),
        (lambda: Estimator("foo"), ValueError, "kind"),
        (lambda: Estimator("iwst", p=0.5, max_weight=0.5), ValueError, "max_weight"),
        (lambda: get_estimator("foo"), ValueError, "estimator"),
        (lambda: get_estimator("iwst"), ValueError, "estimator"),
        (lambda: get_estimator("iwst(1.5)"), ValueError, "p"),
        (lambda: get_estimator("agr(-1)"), ValueError, "tau"),
        (lambda: get_estimator(3), TypeError, "estimator"),
        (lambda: sample_spikes(torch.ones(3, dtype=torch.long), torch.ones(3)), TypeError, "u"),
        (lambda: sample_spikes(torch.ones(3), -torch.ones(3)), ValueError, "sigma"),
        (lambda: sample_spikes(torch.ones(3), torch.tensor([float("nan")] * 3)), ValueError,
         "sigma"),
        (lambda: sample_spikes(torch.ones(3), torch.ones(4)), ValueError, "sigma"),
    ],
)
def test_bad_input_raises_naming_argument(call, exc, word):
    with pytest.raises(exc, match=rf"\b{word}\b"):
        call()


@pytest.mark.parametrize("kind", ["st", "iwst", "agr"])
def test_the_pull_inside_the_spike_node_is_the_aux_pull_gradient(kind):
    """``BernoulliSpike(..., pull=w)`` adds :func:`aux_pull_gradient` of the incoming
    gradient to ``dL/du`` in its own backward (one node, what the PyTorch path runs),
    and leaves ``dL/dsigma`` to the estimator alone (sigma held constant in the pull);
    float64, exact to rounding, with a unit whose sigma is 0 (no pull there)."""
    from sbnn_addons.tensors import aux_pull_gradient

    est = {"st": ST(), "iwst": IWST(0.5), "agr": AGR(0.5)}[kind]
    torch.manual_seed(0)
    u = (torch.randn(32, 8, dtype=F64) * 2).requires_grad_()
    sig = (torch.rand(1, 8, dtype=F64) * 0.5)
    sig[0, 3] = 0.0
    sig.requires_grad_()
    eps = torch.randn(32, 8, dtype=F64)
    g = torch.randn(32, 8, dtype=F64)
    plain = torch.autograd.grad(BernoulliSpike.apply(u, sig.expand_as(u), eps, est, False),
                                (u, sig), g)
    pulled = torch.autograd.grad(
        BernoulliSpike.apply(u, sig.expand_as(u), eps, est, False, 0.3), (u, sig), g)
    want = plain[0] + aux_pull_gradient(g, u.detach(), sig.detach(), 0.3)
    torch.testing.assert_close(pulled[0], want, rtol=1e-12, atol=0)
    torch.testing.assert_close(pulled[1], plain[1], rtol=0, atol=0)
    assert torch.equal(pulled[0][:, 3], plain[0][:, 3])  # sigma 0: no pull
