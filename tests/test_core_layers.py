"""Bayesian layers: local reparameterisation, KL, conversion (Method page, sections 2 and 6)."""

from __future__ import annotations

import contextlib
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sbnn_addons as sb
from sbnn_addons import (
    BayesConv1d,
    BayesConv2d,
    BayesLinear,
    ChannelAffine,
    GaussianPrior,
    get_variance,
    scale_mixture_prior,
)

F64 = torch.float64
S = 4000  # Monte Carlo weight samples


def _make(kind, std_mode, bias_noise, groups, padding):
    kw = dict(std=0.3, std_mode=std_mode, bias_std=0.2 if bias_noise else None, dtype=F64)
    if kind == "linear":
        return BayesLinear(6, 4, **kw), torch.rand(3, 6, dtype=F64)
    if kind == "conv1d":
        return (BayesConv1d(4, 6, 3, padding=padding, groups=groups, **kw),
                torch.rand(2, 4, 7, dtype=F64))
    return (BayesConv2d(4, 6, 3, padding=padding, groups=groups, **kw),
            torch.rand(2, 4, 5, 5, dtype=F64))


def _randomise_std(layer, gen):
    """Make per-channel / per-weight stds really differ (so the modes are distinguishable)."""
    with torch.no_grad():
        layer.std_rho.add_(0.5 * torch.randn(layer.std_rho.shape, generator=gen, dtype=F64))


CASES = [("linear", m, b, 1, 0) for m in ("layer", "channel", "weight") for b in (False, True)]
CASES += [(k, m, b, g, pad) for k in ("conv1d", "conv2d") for m in ("layer", "channel", "weight")
          for b in (False, True) for g, pad in ((1, 0), (2, 1))]


@pytest.mark.parametrize("kind, std_mode, bias_noise, groups, padding", CASES)
def test_lrt_moments_match_weight_sampling(kind, std_mode, bias_noise, groups, padding):
    """Mean and attached variance of the output equal the moments of the output under
    sampled weights w ~ N(m, s^2) (and b ~ N(b, s_b^2) with bias noise): 4000 samples,
    float64. Tolerance: 5 standard errors (mean: sd/sqrt(S); variance: var sqrt(2/(S-1)),
    the outputs are exactly Gaussian)."""
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(0)
    layer, x = _make(kind, std_mode, bias_noise, groups, padding)
    _randomise_std(layer, gen)
    mean = layer(x)
    var = get_variance(mean)
    # the attached variance broadcasts to the mean (per-layer std: one shared channel)
    assert var is not None and torch.broadcast_shapes(var.shape, mean.shape) == mean.shape
    var = var.expand_as(mean)
    torch.testing.assert_close(layer.output_variance(x), var, rtol=1e-12, atol=0)
    # posterior-mean forward is the plain layer with .weight
    plain = layer.to_module()
    torch.testing.assert_close(mean, plain(x), rtol=1e-12, atol=1e-14)

    std = layer.std.detach().expand(layer.weight.shape) if std_mode != "channel" else (
        layer.std.detach().view(-1, *([1] * (layer.weight.dim() - 1))).expand_as(layer.weight))
    w = layer.weight.detach() + std * torch.randn((S, *layer.weight.shape), generator=gen,
                                                  dtype=F64)
    b = layer.bias.detach().expand(S, -1)
    if bias_noise:
        b = b + layer.bias_std.detach() * torch.randn(b.shape, generator=gen, dtype=F64)
    if kind == "linear":
        outs = torch.einsum("bi,soi->sbo", x, w) + b[:, None, :]
    else:
        conv = F.conv1d if kind == "conv1d" else F.conv2d
        outs = torch.func.vmap(
            lambda wi, bi: conv(x, wi, bi, padding=padding, groups=groups))(w, b)
    m_hat, v_hat = outs.mean(0), outs.var(0)
    v = var.detach()
    assert torch.all((m_hat - mean.detach()).abs() <= 5 * torch.sqrt(v / S))
    assert torch.all((v_hat - v).abs() <= 5 * v * math.sqrt(2 / (S - 1)))


@pytest.mark.parametrize("conv, kernel, stride, padding, dilation", [
    (BayesConv2d, 3, 1, 1, 1), (BayesConv2d, (3, 2), (2, 3), (1, 0), 1),
    (BayesConv2d, 3, 2, 2, 1), (BayesConv2d, 4, 3, 0, 1), (BayesConv2d, 3, 1, 1, 2),
    (BayesConv1d, 5, 2, 3, 1), (BayesConv1d, 1, 1, 0, 1),
])
def test_per_layer_conv_variance_is_the_ones_kernel_convolution(conv, kernel, stride, padding,
                                                               dilation):
    """var = s^2 conv(x^2, ones[1, C, *k]) exactly (float64), for the separable window
    sum (any zero padding, strides, rectangular kernels) and the convolution fallback
    (dilation)."""
    torch.manual_seed(0)
    layer = conv(3, 5, kernel, stride=stride, padding=padding, dilation=dilation, std=0.3,
                 dtype=F64)
    x = torch.rand((2, 3, 11, 9) if conv is BayesConv2d else (2, 3, 13), dtype=F64)
    ones = torch.ones((1, *layer.weight.shape[1:]), dtype=F64)
    field = (F.conv2d if conv is BayesConv2d else F.conv1d)(
        x * x, ones, stride=stride, padding=padding, dilation=dilation)
    var = sb.get_variance(layer(x))
    torch.testing.assert_close(var, field * layer.std**2, rtol=1e-12, atol=1e-14)


def test_std_modes_shapes_and_defaults():
    layer = BayesLinear(16, 3)
    torch.testing.assert_close(layer.std, torch.tensor(0.5 / math.sqrt(16)), rtol=1e-6, atol=0)
    assert BayesLinear(4, 3, std_mode="channel").std.shape == (3,)
    assert BayesConv2d(2, 5, 3, std_mode="weight").std.shape == (5, 2, 3, 3)
    conv = BayesConv2d(2, 5, 3)
    torch.testing.assert_close(conv.std, torch.tensor(0.5 / math.sqrt(18)), rtol=1e-6, atol=0)
    assert isinstance(conv, nn.Conv2d) and isinstance(layer, nn.Linear)
    assert sb.is_bayesian(conv) and not sb.is_bayesian(nn.Linear(2, 2))


@pytest.mark.parametrize("make", [
    lambda std: BayesLinear(3, 2, std=std),
    lambda std: BayesLinear(3, 2, bias_std=std),
    lambda std: BayesConv2d(3, 2, 3, std=std, std_mode="channel"),
    lambda std: sb.IWSTSpike("st", std=std),
    lambda std: sb.GaussianPrior(std),
])
def test_std_arguments_refuse_a_trained_or_per_channel_tensor(make):
    """A std argument is one number: an ``nn.Parameter`` was read once as a float (an
    ``IWSTSpike``'s std then stayed fixed, never trained, silently), and a per-channel
    tensor failed with torch's bare "only one element tensors can be converted"."""
    with pytest.raises(TypeError, match="std.*never trained.*float"):
        make(torch.nn.Parameter(torch.tensor(0.3)))
    with pytest.raises(TypeError, match="std.*one number.*shape"):
        make(torch.full((2,), 0.3))
    make(torch.tensor(0.3))  # a one-element tensor without grad: its value


def test_zero_std_fixed_is_noise_free_and_mean_mode_drops_variance():
    layer = BayesLinear(3, 2, std=0.0, learn_std=False)
    out = layer(torch.rand(4, 3))
    assert get_variance(out) is None
    layer = BayesLinear(3, 2)
    with sb.mode(layer, "mean"):
        assert get_variance(layer(torch.rand(4, 3))) is None
    assert get_variance(layer(torch.rand(4, 3))) is not None


def test_variance_path_detaches_input_by_default():
    x = torch.rand(4, 3, requires_grad=True)
    layer = BayesLinear(3, 2)
    get_variance(layer(x)).sum().backward()
    assert x.grad is None and layer.std_rho.grad is not None
    layer2 = BayesLinear(3, 2, detach_input_variance=False)
    get_variance(layer2(x)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("make", [
    lambda: nn.Linear(5, 3),
    lambda: nn.Linear(5, 3, bias=False),
    lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2),
    lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, bias=False),
])
def test_from_module_keeps_weights_and_to_module_roundtrip(make):
    torch.manual_seed(0)
    plain = make()
    cls = {nn.Linear: BayesLinear, nn.Conv1d: BayesConv1d, nn.Conv2d: BayesConv2d}[type(plain)]
    bayes = cls.from_module(plain, std=0.1, std_mode="channel")
    assert torch.equal(bayes.weight, plain.weight)
    assert (bayes.bias is None) == (plain.bias is None)
    if plain.bias is not None:
        assert torch.equal(bayes.bias, plain.bias)
    x = torch.rand(2, 5) if isinstance(plain, nn.Linear) else torch.rand(
        (2, 4, 9) if isinstance(plain, nn.Conv1d) else (2, 4, 9, 9))
    assert torch.equal(bayes(x), plain(x))
    back = bayes.to_module()
    assert type(back) is type(plain)
    assert torch.equal(back.weight, plain.weight)
    assert torch.equal(back(x), plain(x))
    with pytest.raises(TypeError, match="expected"):
        cls.from_module(nn.Identity())


@pytest.mark.parametrize("cls", [BayesLinear, BayesConv1d, BayesConv2d])
def test_from_module_refuses_a_bayesian_layer(cls):
    """``from_module`` of a layer that is Bayesian already built a new one at the default
    std and ``std_mode``, silently dropping the trained noise scales."""
    layer = cls(4, 3) if cls is BayesLinear else cls(4, 3, 3)
    with pytest.raises(TypeError, match="already Bayesian.*copy.deepcopy"):
        cls.from_module(layer)


@pytest.mark.parametrize("make", [lambda: nn.LazyLinear(3), lambda: nn.LazyConv1d(4, 3),
                                  lambda: nn.LazyConv2d(4, 3)])
def test_from_module_of_an_uninitialised_lazy_layer_names_the_fix(make):
    """``from_module`` of a lazy layer before its first forward failed with "no synapses
    (0 input features), give every size >= 1", which the user never gave."""
    plain = make()
    cls = {nn.Linear: BayesLinear, nn.Conv1d: BayesConv1d, nn.Conv2d: BayesConv2d}[
        plain.cls_to_become]
    with pytest.raises(ValueError, match="lazy.*forward"):
        cls.from_module(plain)
    plain(torch.rand(2, 5) if cls is BayesLinear else torch.rand(
        (2, 5, 9) if cls is BayesConv1d else (2, 5, 9, 9)))
    assert cls.from_module(plain).weight.shape == plain.weight.shape  # initialised: fine


@pytest.mark.parametrize("norm", ["parametrizations.weight_norm",
                                  "parametrizations.spectral_norm", "weight_norm",
                                  "spectral_norm"])
@pytest.mark.parametrize("make", [lambda: nn.Linear(5, 3), lambda: nn.Conv2d(2, 3, 3)])
def test_from_module_refuses_a_weight_normalised_layer(norm, make):
    """``from_module`` of a layer with ``weight_norm`` / ``spectral_norm`` (a
    parametrization or the legacy hook) kept the weight it computed and dropped the
    normalisation, silently (the converters leave such a layer deterministic and name the
    fix): it raises, naming the way to bake the weight in."""
    import functools

    plain = make()
    functools.reduce(getattr, norm.split("."), torch.nn.utils)(plain)
    cls = BayesLinear if isinstance(plain, nn.Linear) else BayesConv2d
    fix = "remove_parametrizations" if norm.startswith("parametrizations") else "remove_"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the legacy weight_norm's
        with pytest.raises(ValueError, match=f"normalisation.*{fix}"):
            cls.from_module(plain)


@pytest.mark.parametrize("make", [
    lambda: nn.Linear(6, 3),
    lambda: nn.Conv2d(2, 4, 3, padding=1),
])
def test_from_module_and_to_module_keep_the_pruning(make):
    """``from_module`` of a layer pruned with ``torch.nn.utils.prune`` (and ``to_module``
    of a pruned Bayesian layer) keeps the mask, as the converters do: it was dropped, so
    the removed synapses got noise (a larger variance, silently) and trained again."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    plain = make()
    prune.l1_unstructured(plain, "weight", 0.5)
    prune.l1_unstructured(plain, "bias", 0.5)
    cls = BayesLinear if isinstance(plain, nn.Linear) else BayesConv2d
    bayes = cls.from_module(plain, std=0.2)
    assert torch.equal(bayes.weight_mask, plain.weight_mask)
    assert torch.equal(bayes.bias_mask, plain.bias_mask)
    assert torch.equal(bayes.weight_orig, plain.weight_orig)
    x = torch.rand(4, 6) if isinstance(plain, nn.Linear) else torch.rand(2, 2, 5, 5)
    with sb.mode(bayes, "mean"):
        torch.testing.assert_close(bayes(x), plain(x))
    expected = F.linear(x * x, 0.04 * plain.weight_mask) if isinstance(plain, nn.Linear) \
        else F.conv2d(x * x, 0.04 * plain.weight_mask, padding=1)
    torch.testing.assert_close(bayes.output_variance(x), expected)
    back = bayes.to_module()
    assert torch.equal(back.weight_mask, plain.weight_mask)
    assert torch.equal(back.weight_orig, plain.weight_orig)
    torch.testing.assert_close(back(x), plain(x))


# ----------------------------------------------------------------------------- KL
@pytest.mark.parametrize("std_mode", ["layer", "channel", "weight"])
def test_kl_closed_form(std_mode):
    """layer.kl_divergence(prior) == torch.distributions KL summed (rtol 1e-12, float64)
    and, with the per-layer scalar std, the formula of the Method page
    n log(s0/s) + (n s^2 + ||m||^2) / (2 s0^2) - n/2."""
    torch.manual_seed(0)
    layer = BayesConv2d(3, 4, 3, std=0.2, std_mode=std_mode, dtype=F64)
    _randomise_std(layer, torch.Generator().manual_seed(1))
    s0 = 0.7
    q = torch.distributions.Normal(layer.weight, layer.std.view(
        -1, 1, 1, 1).expand_as(layer.weight) if std_mode == "channel" else
        layer.std.expand_as(layer.weight))
    prior = torch.distributions.Normal(torch.tensor(0.0, dtype=F64), torch.tensor(s0, dtype=F64))
    want = torch.distributions.kl_divergence(q, prior).sum()
    for p in (s0, GaussianPrior(s0), prior):
        torch.testing.assert_close(layer.kl_divergence(p), want, rtol=1e-12, atol=0)
    if std_mode == "layer":
        n, s = layer.weight.numel(), float(layer.std.detach())
        m2 = float((layer.weight**2).sum().detach())
        spec = n * math.log(s0 / s) + (n * s * s + m2) / (2 * s0 * s0) - n / 2
        assert float(layer.kl_divergence(s0).detach()) == pytest.approx(spec, rel=1e-12)
    # default prior N(0, 1)
    unit = torch.distributions.kl_divergence(q, torch.distributions.Normal(
        torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64))).sum()
    torch.testing.assert_close(layer.kl_divergence(), unit, rtol=1e-12, atol=0)
    layer.kl_divergence(s0).backward()
    assert layer.std_rho.grad is not None and layer.weight.grad is not None


def test_kl_includes_noisy_bias_and_model_sum():
    torch.manual_seed(0)
    layer = BayesLinear(4, 3, bias_std=0.1, dtype=F64)
    q_b = torch.distributions.Normal(layer.bias, layer.bias_std.expand_as(layer.bias))
    q_w = torch.distributions.Normal(layer.weight, layer.std.expand_as(layer.weight))
    p = torch.distributions.Normal(torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64))
    want = (torch.distributions.kl_divergence(q_w, p).sum()
            + torch.distributions.kl_divergence(q_b, p).sum())
    torch.testing.assert_close(layer.kl_divergence(), want, rtol=1e-12, atol=0)
    model = nn.Sequential(layer, nn.ReLU(), BayesConv1d(3, 2, 1, dtype=F64), nn.Linear(2, 2))
    total = sb.kl_divergence(model, 0.5)
    torch.testing.assert_close(total, layer.kl_divergence(0.5) + model[2].kl_divergence(0.5),
                               rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="Bayesian"):
        sb.kl_divergence(nn.Linear(2, 2))


@pytest.mark.parametrize("std_mode", ["layer", "weight"])
def test_kl_of_a_pruned_layer_sums_the_kept_weights(std_mode):
    """``torch.nn.utils.prune`` removes a weight (and a bias) from the network: it is no
    random variable, so it has no KL. The KL counted each removed one as ``N(0, s^2)``
    against the prior (the sum of the whole layer's terms); it equals the KL of the kept
    weights and biases, for the closed form, a Gaussian distribution prior and a Monte
    Carlo prior, and the pruned weights get no gradient from it."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    layer = BayesLinear(6, 4, std_mode=std_mode, bias_std=0.1, dtype=F64)
    _randomise_std(layer, torch.Generator().manual_seed(1))
    mask = (torch.rand(4, 6, generator=torch.Generator().manual_seed(2)) < 0.5).to(F64)
    bias_mask = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=F64)
    keep, keep_b = mask.bool(), bias_mask.bool()
    std = layer.std.detach().expand(4, 6)
    q_w = torch.distributions.Normal(layer.weight.detach()[keep], std[keep])
    q_b = torch.distributions.Normal(layer.bias.detach()[keep_b],
                                     layer.bias_std.detach().expand(4)[keep_b])
    prune.custom_from_mask(layer, "weight", mask)
    prune.custom_from_mask(layer, "bias", bias_mask)
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=F64), torch.tensor(0.5, dtype=F64))
    want = (torch.distributions.kl_divergence(q_w, normal).sum()
            + torch.distributions.kl_divergence(q_b, normal).sum())
    for prior in (0.5, normal):
        torch.testing.assert_close(layer.kl_divergence(prior), want, rtol=1e-12, atol=0)
    mixture = scale_mixture_prior(0.5, 1.0, 0.1)
    torch.manual_seed(3)
    got = layer.kl_divergence(mixture, num_samples=2)
    torch.manual_seed(3)  # the same draws, kept terms only
    w = torch.distributions.Normal(layer.weight, std).rsample((2,))
    terms = (torch.distributions.Normal(layer.weight, std).log_prob(w)
             - mixture.log_prob(w)).mean(0)
    b = torch.distributions.Normal(layer.bias, layer.bias_std.expand(4)).rsample((2,))
    terms_b = (torch.distributions.Normal(layer.bias, layer.bias_std.expand(4)).log_prob(b)
               - mixture.log_prob(b)).mean(0)
    torch.testing.assert_close(got, terms[keep].sum() + terms_b[keep_b].sum(), rtol=1e-12, atol=0)
    layer.kl_divergence(0.5).backward()
    assert torch.all(layer.weight_orig.grad[~keep] == 0)
    if std_mode == "weight":
        assert torch.all(layer.std_rho.grad[~keep] == 0)


@pytest.mark.parametrize("prior, bias_std", [
    (lambda: torch.distributions.Normal(torch.zeros(4, 5), 1.0), 0.1),  # bias [4] too
    (lambda: torch.distributions.Normal(torch.zeros(2, 4, 5), 1.0), None),  # twice
    (lambda: torch.distributions.Laplace(torch.zeros(3), 1.0), None),  # no broadcast
    (lambda: torch.distributions.Independent(
        torch.distributions.Laplace(torch.zeros(4, 5), 1.0), 2), None),  # event shape
])
def test_kl_refuses_a_prior_whose_shape_does_not_fit(prior, bias_std):
    """A prior with a batch shape other than the parameter's broadcast the KL terms to a
    larger shape and summed them, silently: a ``[out, in]`` prior counted a noisy bias
    ``out`` times, a ``[2, out, in]`` one the whole KL twice (or an unclear size error,
    or a log-density over an event instead of per weight)."""
    layer = BayesLinear(5, 4, std=0.2, bias_std=bias_std)
    with pytest.raises(ValueError, match="prior.*shape.*scalar"):
        layer.kl_divergence(prior())


def test_kl_of_a_per_weight_prior_of_the_weight_shape():
    """A prior of the weight's own shape is per weight: the same KL as the scalar one."""
    layer = BayesLinear(5, 4, std=0.2)
    per_weight = torch.distributions.Normal(torch.zeros(4, 5), 1.0)
    torch.testing.assert_close(layer.kl_divergence(per_weight), layer.kl_divergence(1.0))


def test_kl_scale_mixture_monte_carlo():
    """MC KL to a scale-mixture prior (4000 samples) matches an independent 200k-sample
    estimate of E_q[log q(w) - log p(w)]. Tolerance: 5 standard errors of the 4000-sample
    estimate."""
    torch.manual_seed(0)
    layer = BayesLinear(4, 3, std=0.3)
    prior = scale_mixture_prior(0.5, 1.0, 0.1)
    torch.manual_seed(1)
    got = float(layer.kl_divergence(prior, num_samples=4000).detach())
    with torch.no_grad():
        q = torch.distributions.Normal(layer.weight, layer.std.expand_as(layer.weight))
        w = q.sample((200_000,))
        per_sample = (q.log_prob(w) - prior.log_prob(w)).sum((1, 2)).double()
    want, sd = float(per_sample.mean()), float(per_sample.std())
    assert abs(got - want) <= 5 * sd / math.sqrt(4000)
    # closed-form Gaussian prior differs from the mixture (the test can tell them apart)
    assert abs(float(layer.kl_divergence(1.0).detach()) - want) > 10 * sd / math.sqrt(4000)


# ----------------------------------------------------------------------------- ChannelAffine
def test_channel_affine_mean_only():
    torch.manual_seed(0)
    aff = ChannelAffine(3)
    with torch.no_grad():
        aff.weight.copy_(torch.tensor([2.0, -1.0, 0.5]))
        aff.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    x = torch.rand(2, 3, 4)
    var = torch.rand(2, 3, 4)
    x = sb.attach_variance(x, var)
    out = aff(x)
    torch.testing.assert_close(out, x * aff.weight.view(1, 3, 1) + aff.bias.view(1, 3, 1))
    assert get_variance(out) is var
    bn = nn.BatchNorm2d(3)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    bn.eval()
    folded = ChannelAffine.from_batchnorm(bn)
    y = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(folded(y), bn(y), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="channels"):
        aff(torch.rand(2, 4))


def test_channel_affine_from_a_batchnorm_without_running_statistics_raises():
    """``ChannelAffine.from_batchnorm`` of a BatchNorm built with
    ``track_running_stats=False`` (which normalises every batch by its own statistics,
    in eval mode too) folded only its affine: a layer that no longer normalises, silently
    (the converters refuse it)."""
    bn = nn.BatchNorm1d(3, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="track_running_stats=False.*batch"):
        ChannelAffine.from_batchnorm(bn)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call, exc, word",
    [
        (lambda: BayesLinear(3, 2, std=-1.0), ValueError, "std"),
        (lambda: BayesLinear(3, 2, std=float("nan")), ValueError, "std"),
        (lambda: BayesLinear(3, 2, std=0.0), ValueError, "std"),  # learn_std=True default
        (lambda: BayesLinear(3, 2, std=0.0, learn_std=True), ValueError, "learn_std"),
        (lambda: BayesLinear(3, 2, bias_std=-0.1), ValueError, "bias_std"),
        (lambda: BayesLinear(3, 2, std_mode="neuron"), ValueError, "std_mode"),
        (lambda: BayesConv2d(3, 2, 3, std=float("inf")), ValueError, "std"),
        (lambda: BayesLinear(3, 2)(torch.ones(4, 3, dtype=torch.long)), TypeError, "input"),
        (lambda: BayesLinear(3, 2)(torch.ones(4, 5)), ValueError, "features"),
        (lambda: BayesConv2d(3, 2, 3)(torch.ones(1, 4, 8, 8)), ValueError, "BayesConv2d"),
        (lambda: BayesConv2d(3, 2, 3)(torch.ones(8, 8)), ValueError, "BayesConv2d"),
        (lambda: BayesConv2d(3, 2, 3)(torch.ones(1, 3, 8, 8, dtype=torch.int32)), TypeError,
         "input"),
        (lambda: BayesLinear(3, 2).kl_divergence(-1.0), ValueError, "prior"),
        (lambda: BayesLinear(3, 2).kl_divergence("x"), TypeError, "prior"),
        (lambda: scale_mixture_prior(1.5), ValueError, "pi"),
    ],
)
def test_bad_input(call, exc, word):
    with pytest.raises(exc, match=rf"\b{word}\b"):
        call()


def test_empty_batch_and_bf16():
    layer = BayesLinear(5, 3)
    x = torch.zeros(0, 5, requires_grad=True)
    out = layer(x)
    assert out.shape == (0, 3) and get_variance(out).expand_as(out).shape == (0, 3)
    (out.sum() + get_variance(out).sum()).backward()
    layer16 = BayesLinear(5, 3).to(torch.bfloat16)
    y = layer16(torch.rand(4, 5, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(get_variance(y)).all()


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_spike_input_kept_as_bytes_under_bfloat16_autocast(kind, monkeypatch):
    """Under ``torch.autocast`` (bfloat16), a large spike input kept as uint8 for the
    backward: the backward ran the bfloat16 gradient against the float32 weight, and a
    BayesLinear failed ("expected m1 and m2 to have the same dtype"). It runs in the
    forward's dtype, as autocast's own op: every gradient equals the unmarked path's."""
    import sbnn_addons.layers as layers_mod

    grads = []
    for limit in (1, math.inf):  # kept as bytes, then as it is
        monkeypatch.setattr(layers_mod, "COMPACT_INPUT_MIN", limit)
        torch.manual_seed(0)
        if kind == "linear":
            first, layer, x = BayesLinear(6, 16), BayesLinear(16, 3, bias_std=0.1), torch.rand(8, 6)
        else:
            first, layer = BayesConv2d(2, 4, 3, padding=1), BayesConv2d(4, 3, 3, padding=1)
            x = torch.rand(2, 2, 6, 6)
        spike = sb.IWSTSpike("st", std=0.3, learn_std=True)
        spike.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(spike(first(x) * 3))
        assert out.dtype == torch.bfloat16
        (out.float().square().sum() + get_variance(out).sum()).backward()
        params = [*first.parameters(), *layer.parameters(), spike.std_rho]
        grads.append([p.grad for p in params])
        assert all(p.grad.dtype == torch.float32 for p in params)
    for kept, plain_grad in zip(*grads):
        torch.testing.assert_close(kept, plain_grad, rtol=0, atol=0)


@pytest.mark.parametrize("make", [
    lambda: sb.BayesLinear(12, 5, std=0.2),
    lambda: sb.BayesLinear(12, 5, std=0.2, std_mode="weight", bias=False),
    lambda: sb.BayesConv1d(3, 4, 3, std=0.2, padding=1),
    lambda: sb.BayesConv2d(3, 4, 3, std=0.2, stride=2, padding=1),
    lambda: sb.BayesConv2d(3, 4, 3, std=0.2, std_mode="weight", dilation=2, groups=1),
], ids=["linear", "linear-weight-std", "conv1d", "conv2d-stride", "conv2d-weight-std"])
def test_spike_input_kept_as_bytes_gives_identical_gradients(make, monkeypatch):
    """A marked 0/1 input is saved as uint8 (a quarter of the bytes) by the mean (and the
    per-weight variance) operation, and a marked input that its producer keeps is saved
    as it is (the same storage, nothing extra); outputs are identical, and variances and
    every gradient equal within float rounding, to those of an unmarked copy."""
    from sbnn_addons.functional import mark_binary

    monkeypatch.setattr(sb.layers, "COMPACT_INPUT_MIN", 1)
    torch.manual_seed(0)
    layer = make()
    shape = {sb.BayesLinear: (7, 12), sb.BayesConv1d: (2, 3, 9), sb.BayesConv2d: (2, 3, 9, 9)}
    x0 = (torch.rand(shape[type(layer)]) < 0.4).float()
    results, saved_bytes, shares = [], [], []
    for marked in ("kept", True, False):
        layer.zero_grad()
        x = x0.clone().requires_grad_()
        inp = x * 1.0
        if marked:
            mark_binary(inp, kept=marked == "kept")
        seen = {}

        def pack(t, seen=seen):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mean = layer(inp)
            var = sb.get_variance(mean)
        (mean * torch.linspace(-1, 1, mean.numel()).view_as(mean)).sum().backward(
            retain_graph=True)
        var.sum().backward()
        grads = [x.grad] + [p.grad for p in layer.parameters()]
        results.append((mean.detach(), var.detach(), grads))
        saved_bytes.append(sum(seen.values()))
        shares.append(inp.untyped_storage().data_ptr() in seen)
    (m0, v0, g0), (m1, v1, g1), (m2, v2, g2) = results
    assert torch.equal(m0, m1) and torch.equal(v0, v1)
    assert torch.equal(m1, m2)
    # an unmarked input's sum of squares is one fused reduction (vector_norm^2): rounding
    torch.testing.assert_close(v1, v2, rtol=1e-6, atol=0)
    for a, b, c in zip(g0, g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(b, c, rtol=1e-6, atol=1e-7)
    # a kept input is saved as it is (its producer keeps that storage anyway); a marked
    # one as bytes, in place of the float input
    assert shares[0] and not shares[1]
    assert saved_bytes[1] < saved_bytes[2] and saved_bytes[0] <= saved_bytes[2]


@pytest.mark.parametrize("std_mode", ["weight", "layer"])
def test_share_posterior_reuses_s2_with_identical_gradients(std_mode):
    """In a 6-step loop, share_posterior computes softplus(rho)^2 once per layer (one node
    in the graph); outputs are equal and gradients equal within float rounding; a
    no-grad call inside the block does not hand a graph-less s^2 to a grad call."""
    torch.manual_seed(0)
    layer = sb.BayesLinear(7, 5, std=0.2, std_mode=std_mode)
    xs = torch.rand(6, 3, 7)
    results = []
    before = sb.base._SHARED[0]
    for shared in (False, True):
        layer.zero_grad()
        block = sb.share_posterior() if shared else contextlib.nullcontext()
        with block:
            with torch.no_grad():
                layer(xs[0])
            outs = [sb.get_variance(layer(x)) for x in xs]
            if shared:
                nodes = {id(layer._std_squared())}
                assert len(nodes) == 1
        torch.stack(outs).sum().backward()
        results.append((torch.stack(outs).detach(), layer.std_rho.grad.clone()))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-8)
    assert sb.base._SHARED[0] is before  # the block restored what it found


def test_share_posterior_shares_under_other_saved_tensor_hooks_not_in_checkpoints():
    """s^2 is shared under saved-tensor hooks that are not activation checkpointing's
    (save_on_cpu, a memory probe: the probe measured one s^2 per step), and computed per
    call inside torch.utils.checkpoint (whose recomputation runs outside the block)."""
    import torch.utils.checkpoint as torch_checkpoint

    layer = sb.BayesLinear(7, 5, std=0.2, std_mode="weight")
    xs = torch.rand(4, 3, 7)
    with sb.share_posterior():
        with torch.autograd.graph.save_on_cpu():
            assert layer._std_squared() is layer._std_squared()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            assert layer._std_squared() is layer._std_squared()
        seen = []

        def region(x):
            seen.append(layer._std_squared())
            seen.append(layer._std_squared())
            return sb.get_variance(layer(x))

        out = torch_checkpoint.checkpoint(region, xs[0], use_reentrant=False)
        assert seen[0] is not seen[1]
        out.sum().backward()
    assert layer.std_rho.grad is not None


def test_a_forward_that_raises_leaves_no_shared_block_open():
    """A tracked model's forward opens a share_posterior block in a pre-hook and closes it
    in a forward hook, which does not run when the forward raises: the next forward of
    any tracked model closes the stale block, so no later forward shares its s^2 cache."""
    from torch import nn

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = sb.BayesLinear(4, 3)

        def forward(self, x):
            self.fc(x)
            raise RuntimeError("boom")

    broken = sb.track_variance(Broken())
    other = sb.track_variance(nn.Sequential(sb.BayesLinear(4, 3)))
    with pytest.raises(RuntimeError, match="boom"):
        broken(torch.rand(2, 4))
    assert sb.base._SHARED[0] is not None  # left open by the raise
    other(torch.rand(2, 4))
    assert sb.base._SHARED[0] is None and not sb.moments._OPEN_FLOWS
    with pytest.raises(RuntimeError, match="boom"):
        broken(torch.rand(2, 4))
    with pytest.raises(RuntimeError, match="boom"):
        broken(torch.rand(2, 4))  # its own stale block closed at its next call
    assert len(sb.moments._OPEN_FLOWS) == 1
    other(torch.rand(2, 4))
    assert sb.base._SHARED[0] is None and not sb.moments._OPEN_FLOWS
    # while a stale block is open, a layer used outside any tracked forward may share
    # its s^2, but never one whose graph a backward has freed (gradient accumulation)
    with pytest.raises(RuntimeError, match="boom"):
        broken(torch.rand(2, 4))
    layer = sb.BayesLinear(4, 3, std=0.2, std_mode="weight")
    for _ in range(2):
        sb.get_variance(layer(torch.rand(2, 4))).sum().backward()
    assert layer.std_rho.grad is not None



def test_layers_and_lif_run_under_inference_mode():
    """torch.inference_mode tensors have no version counter: spikes are not marked there,
    and the layers fall back to x * x (same values)."""
    layer = BayesConv2d(2, 4, 3, padding=1, std=0.2)
    lif = sb.LIF()
    x = (torch.rand(3, 2, 2, 8, 8) < 0.3).float()
    with sb.mode(lif, "mean"):
        want = lif.run(layer(x.flatten(0, 1)).reshape(3, 2, 4, 8, 8))
        with torch.inference_mode():
            got = lif.run(layer(x.flatten(0, 1)).reshape(3, 2, 4, 8, 8))
    assert torch.equal(got, want)
    with torch.inference_mode():
        spikes = lif.run(layer(x.flatten(0, 1)).reshape(3, 2, 4, 8, 8))
        assert spikes.shape == (3, 2, 4, 8, 8)
        assert BayesLinear(8, 3)(spikes.flatten(0, 1).flatten(2)[..., :8]).shape == (6, 4, 3)


def test_spikes_after_inference_mode_in_a_fresh_thread():
    """State created lazily inside inference_mode (the kernel's key-draw tensor) stays
    usable outside it."""
    import threading

    errors = []

    def work():
        try:
            with torch.inference_mode():
                sb.IWSTSpike(std=0.3)(torch.rand(4, 5))
            sb.IWSTSpike(std=0.3)(torch.rand(4, 5, requires_grad=True)).sum().backward()
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert not errors, errors


@pytest.mark.parametrize("std_mode", ["layer", "channel", "weight"])
@pytest.mark.parametrize("make, shape", [
    (lambda m: BayesConv2d(3, 4, 3, std_mode=m, std=0.3), (3, 6, 4)),
    (lambda m: BayesConv2d(3, 4, 3, std_mode=m, std=0.3), (3, 6, 6)),  # H_out = C_out
    (lambda m: sb.BayesConv1d(3, 4, 3, std_mode=m, std=0.3), (3, 9)),
])
def test_unbatched_conv_variance_equals_the_batched_one(make, shape, std_mode):
    """An unbatched input [C, *spatial] gets the variance of the batched call's row, per
    output channel (a per-channel std must not broadcast over a spatial axis)."""
    torch.manual_seed(0)
    layer = make(std_mode)
    if std_mode == "channel":
        with torch.no_grad():
            layer.std_rho.copy_(torch.linspace(-3.0, 1.0, 4))
    x = torch.rand(*shape) * 2
    one = sb.get_variance(layer(x))
    want = sb.get_variance(layer(x.unsqueeze(0)))
    out_shape = layer(x.unsqueeze(0)).shape[1:]
    torch.testing.assert_close(one.expand(out_shape), want.expand(1, *out_shape)[0])


def test_converted_layer_kwargs():
    """The converters' per-layer arguments: bias noise only with a bias; the std from the
    weights' RMS (a folded BatchNorm's scale included) where none is given."""
    from sbnn_addons.layers import converted_layer_kwargs, converted_std, folded_batchnorm_scale

    posterior = dict(std=None, std_mode="layer", learn_std=True, bias_std=0.1)
    plain = nn.Linear(6, 4, bias=False)
    kw = converted_layer_kwargs(plain, posterior)
    assert kw["bias_std"] is None and kw["std"] == converted_std(plain.weight)
    conv, bn = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_var.fill_(0.25)
    kw = converted_layer_kwargs(conv, posterior, bn)
    assert kw["bias_std"] == 0.1
    assert kw["std"] == converted_std(conv.weight, scale=folded_batchnorm_scale(bn))
    assert converted_layer_kwargs(conv, {**posterior, "std": 0.3})["std"] == 0.3
    assert posterior["bias_std"] == 0.1  # the caller's dict is not changed


@pytest.mark.parametrize("make", [
    lambda: sb.BayesLinear(16, 8, bias_std=0.05),
    lambda: sb.BayesConv2d(2, 4, 3, std=0.2, std_mode="channel"),
    lambda: sb.BayesLinear(16, 8, std=0.1, learn_std=False),
    lambda: sb.IWSTSpike("st", std=0.3, learn_std=True),
    lambda: sb.IWSTSpike("st", std=0.2),
])
def test_reset_parameters_restores_the_initial_posterior(make):
    """``reset_parameters()`` re-initialises the noise scales too: after a meta-device
    build and ``to_empty()`` (uninitialised memory) and after training changed them."""
    torch.manual_seed(0)
    ref = make()
    stds = {n: t.clone() for n, t in ref.named_parameters() if "std" in n}
    stds.update({n: t.clone() for n, t in ref.named_buffers() if "std" in n})
    assert stds
    with torch.device("meta"):
        built = make()
    built.to_empty(device="cpu")
    with torch.no_grad():  # what to_empty may leave, or what training did
        for t in [*built.parameters(), *built.buffers()]:
            t.fill_(7.0)
    built.reset_parameters()
    for name, t in [*built.named_parameters(), *built.named_buffers()]:
        if name in stds:
            torch.testing.assert_close(t, stds[name])
        else:
            assert not (t == 7.0).all()  # weights and bias re-drawn by the host's init


def test_vmap_ensemble_with_fixed_stds():
    """``torch.func`` ensembles (stack_module_state + functional_call under vmap) with a
    fixed layer std and a fixed spike std: in ``mean`` mode each member equals its own
    model, in ``sample`` mode each member draws its own spikes."""
    import copy

    from torch.func import functional_call, stack_module_state, vmap

    torch.manual_seed(0)
    models = [nn.Sequential(sb.BayesLinear(16, 8, std=0.1, learn_std=False),
                            sb.IWSTSpike("st", std=0.2)) for _ in range(3)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.rand(4, 16) * 0.2
    run = vmap(lambda p, b, x: functional_call(base, (p, b), (x,)), in_dims=(0, 0, None),
               randomness="different")
    out = run(params, buffers, x)
    assert out.shape == (3, 4, 8) and 0 < float(out.detach().mean()) < 1
    for m in (*models, base):
        sb.set_mode(m, "mean")
    with torch.no_grad():
        torch.testing.assert_close(run(params, buffers, x), torch.stack([m(x) for m in models]))


def test_edits_through_data_are_seen():
    """A fixed std or a spike factor edited through ``.data`` (no version bump) takes
    effect at the next call."""
    spk = sb.IWSTSpike("st", std=0.0)
    u = torch.zeros(20000)
    assert float(spk(u).mean()) == 0.0  # no noise: u = 0 does not fire
    spk.fixed_std.data.fill_(1.0)
    assert 0.45 < float(spk(u).mean()) < 0.55  # Phi(0) = 1/2
    layer = sb.BayesLinear(4, 3, std=0.0, learn_std=False)
    assert sb.moments.get_variance(layer(torch.rand(2, 4))) is None
    layer.fixed_std.data.fill_(0.3)
    assert sb.moments.get_variance(layer(torch.rand(2, 4))) is not None


def test_shared_s2_is_never_taken_from_a_freed_layer_with_the_same_id():
    """Inside a share_posterior block (also one left open by a forward that raised), the
    cached s^2 belongs to its layer, not to its id: an entry left by a freed layer whose
    id a new layer reuses (planted here under the new layer's id) is not used."""
    import weakref

    from sbnn_addons import base

    x = torch.rand(3, 4)
    with sb.share_posterior():
        old = sb.BayesLinear(4, 2, std=0.5)
        old(x)
        stale = base._SHARED[0][id(old)]
        new = sb.BayesLinear(4, 2, std=0.01)
        dead = weakref.ref(sb.BayesLinear(1, 1))  # a freed module's reference
        base._SHARED[0][id(new)] = (dead, *stale[1:])  # what an id reuse would leave
        var = sb.moments.get_variance(new(x))
    expected = 0.01 ** 2 * (x * x).sum(-1, keepdim=True)
    torch.testing.assert_close(var.expand(3, 2), expected.expand(3, 2), rtol=1e-4, atol=0)


def test_share_posterior_recomputes_s2_for_a_swapped_parameter():
    """torch.func.functional_call with another std_rho inside a share_posterior block: the
    layer's cached s^2 is not reused for it (the variance and the gradient belong to
    the tensor passed in)."""
    from torch.func import functional_call

    torch.manual_seed(0)
    fc = sb.BayesLinear(6, 4, std=0.2)
    x = torch.rand(3, 6)
    rho = torch.tensor(1.0, requires_grad=True)
    want = sb.get_variance(functional_call(fc, {"std_rho": rho}, (x,)))
    with sb.share_posterior():
        fc(x)
        got = sb.get_variance(functional_call(fc, {"std_rho": rho}, (x,)))
    torch.testing.assert_close(got, want)
    (grad,) = torch.autograd.grad(got.sum(), rho)
    assert float(grad) > 0


@pytest.mark.parametrize("std_mode", ["layer", "channel", "weight"])
def test_float16_layer_variance_does_not_overflow(std_mode):
    """A float16 layer on raw, unnormalised input (event counts, pixel values): ``x^2`` and
    its receptive-field sums exceed float16's 65504, so the variance is formed in float32
    (it was ``inf``, and the spikes coin flips); it equals the float32 layer's."""
    torch.manual_seed(0)
    for layer, x in ((sb.BayesConv2d(3, 8, 3, padding=1, std_mode=std_mode),
                      torch.rand(2, 3, 8, 8) * 255),
                     (sb.BayesLinear(4096, 4, std_mode=std_mode), torch.randn(3, 4096) * 4)):
        want = sb.get_variance(layer(x)).expand(layer(x).shape)
        half = copy.deepcopy(layer).half()
        got = sb.get_variance(half(x.half()))
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float().expand_as(want), want, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("std_mode", ["layer", "channel", "weight"])
@pytest.mark.parametrize("spikes", [False, True])
def test_float16_small_std_variance_does_not_underflow(std_mode, spikes):
    """A float16 layer with a small posterior std (a wide layer's 0.5 / sqrt(fan_in), or a
    learned std that shrank): ``s^2`` is squared in float32 (in float16 it was subnormal
    below s = 7.8e-3 and 0 below 2.4e-4, so the noise vanished), bias noise and
    ``output_variance`` included; the variance equals the float64 layer's."""
    torch.manual_seed(0)
    for layer, x in ((sb.BayesConv2d(3, 4, 3, padding=1, std=1e-4, std_mode=std_mode,
                                     bias_std=1e-4), torch.rand(2, 3, 6, 6)),
                     (sb.BayesLinear(16, 4, std=1e-4, std_mode=std_mode, bias_std=2e-4),
                      torch.rand(3, 16))):
        if spikes:
            x = (x > 0.5).float()
        want = sb.get_variance(copy.deepcopy(layer).double()(x.double()))
        half = copy.deepcopy(layer).half()
        y = half(x.half())
        got = sb.get_variance(y)
        torch.testing.assert_close(got.double().expand_as(y), want.expand_as(y),
                                   rtol=2e-3, atol=0)
        torch.testing.assert_close(half.output_variance(x.half()).double(),
                                   want.expand_as(y), rtol=2e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prior", [None, 0.1, torch.distributions.Normal(0.0, 0.5)])
def test_half_precision_kl_is_float32(dtype, prior):
    """The KL of a half-precision layer is summed in float32: in float16 the sum of a
    2048 x 64 layer's terms (~5e5) overflowed to inf (inf loss, -inf std gradient); in
    bfloat16 it was off in the third digit. It equals the float64 KL of the same values,
    and so do the gradients of KL / N (to the dtype's rounding)."""
    torch.manual_seed(0)
    half = sb.BayesLinear(2048, 64, bias_std=0.1).to(dtype)
    ref = copy.deepcopy(half).double()
    kl = half.kl_divergence(prior)
    want = ref.kl_divergence(prior)
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl.double(), want, rtol=1e-4, atol=0)
    (kl / 1000).backward()  # per example, as sbnn_objective divides it (N = 1000)
    (want / 1000).backward()
    for p, q in zip(half.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("std_mode", ["layer", "channel", "weight"])
def test_float16_autocast_variance_is_float32(std_mode):
    """Under ``torch.autocast`` with float16 (CUDA's AMP default), the variance's linear
    maps and convolutions ran in float16: a per-weight ``s^2`` of 1e-8 was 0 (no noise),
    and raw pixel values' ``x^2`` sums overflowed to inf. The variance is formed in
    float32 and equals the float64 layer's; the mean is float16 as autocast makes it."""
    torch.manual_seed(0)
    layers = ((sb.BayesConv2d(3, 4, 3, padding=2, dilation=2, std=1e-4, std_mode=std_mode),
               torch.rand(2, 3, 8, 8) * 255),
              (sb.BayesConv2d(4, 4, 3, padding=1, groups=2, std=1e-4, std_mode=std_mode),
               torch.rand(2, 4, 6, 6) * 255),
              (sb.BayesLinear(64, 4, std=1e-4, std_mode=std_mode), torch.rand(3, 64) * 255))
    for layer, x in layers:
        want = sb.get_variance(copy.deepcopy(layer).double()(x.double()))
        for inp in (x, x.half()):
            with torch.autocast("cpu", dtype=torch.float16):
                y = layer(inp)
                direct = layer.output_variance(inp)
            got = sb.get_variance(y)
            assert y.dtype == torch.float16 and got.dtype == torch.float32
            torch.testing.assert_close(got.double().expand_as(y), want.expand_as(y),
                                       rtol=2e-3, atol=0)
            torch.testing.assert_close(direct.double(), want.expand_as(y), rtol=2e-3, atol=0)


def _train_steps(model, opt, x, steps=3, forward=None):
    """``steps`` optimiser steps on ``model(x).sum()``; the warnings they raised."""
    import warnings

    forward = forward or (lambda: model(x))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            opt.zero_grad()
            out = forward()
            (out[0] if isinstance(out, tuple) else out).float().sum().backward()
            opt.step()
    return [str(w.message) for w in caught if "noise scale" in str(w.message)]


def _warnings_by_optimiser_order(build, to_sbnn, reset, x, step_wise: bool) -> dict:
    """The std-not-stepped warnings of a few training steps of ``build()`` converted by
    ``to_sbnn(net, inplace=True)``, with the Adam optimiser built ``"before"`` and
    ``"after"`` the conversion; ``reset`` before each sequence ``x [T, B, ...]``, fed step
    by step (``step_wise``) or whole."""
    found = {}
    for when in ("before", "after"):
        torch.manual_seed(0)
        net = build()
        if when == "before":
            opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        to_sbnn(net, inplace=True)
        if when == "after":
            opt = torch.optim.Adam(net.parameters(), lr=1e-2)

        def forward(net=net):
            reset(net)
            return torch.stack([net(xt) for xt in x]) if step_wise else net(x)

        found[when] = _train_steps(net, opt, x, forward=forward)
    return found


@pytest.mark.parametrize("host", ["snntorch", "spikingjelly"])
def test_warns_when_the_optimiser_was_built_before_an_inplace_conversion(host):
    """An optimiser built before ``to_sbnn(model, inplace=True)`` holds the weights but not
    the new noise scales ``std_rho``, which never trained, silently. Built after: quiet."""
    if host == "snntorch":
        import snntorch as snn

        from sbnn_addons.snntorch import reset, to_sbnn

        def build():
            return nn.Sequential(nn.Linear(8, 6), snn.Leaky(beta=0.9, init_hidden=True))
    else:
        from spikingjelly.activation_based import functional, layer, neuron

        from sbnn_addons.spikingjelly import to_sbnn

        def build():
            net = nn.Sequential(layer.Linear(8, 6), neuron.LIFNode())
            functional.set_step_mode(net, "m")
            return net

        def reset(net):
            functional.reset_net(net)

    x = torch.rand(3, 4, 8) * 3
    step_wise = host == "snntorch"
    found = _warnings_by_optimiser_order(build, to_sbnn, reset, x, step_wise)
    assert len(found["before"]) == 1  # once per optimiser (sbnn_addons.optim's step hook)
    assert "BayesLinear.std_rho" in found["before"][0]
    assert "Build the optimiser after the conversion" in found["before"][0]
    assert found["after"] == []


def test_warns_for_a_pruned_layer_whose_std_the_optimiser_misses():
    """A pruned host layer (``torch.nn.utils.prune``) converted in place after its
    optimiser was built: the check compared the weight tensor of two forwards, and a
    pruned weight is a new tensor at every forward, so it never warned. It follows the
    stepped ``weight_orig``; an optimiser built after the conversion stays quiet."""
    import snntorch as snn
    from torch.nn.utils import prune

    from sbnn_addons.snntorch import reset, to_sbnn

    def build():
        net = nn.Sequential(nn.Linear(8, 6), snn.Leaky(beta=0.9, init_hidden=True))
        prune.l1_unstructured(net[0], "weight", amount=0.3)
        return net

    found = _warnings_by_optimiser_order(build, to_sbnn, reset, torch.rand(3, 4, 8) * 3,
                                         step_wise=True)
    assert len(found["before"]) == 1 and "BayesLinear.std_rho" in found["before"][0]
    assert found["after"] == []


@pytest.mark.parametrize("norm", ["parametrizations", "hook"])
def test_warns_for_a_weight_normed_layer_whose_std_the_optimiser_misses(norm):
    """``weight_norm`` on a converted layer computes ``.weight`` at every forward (a
    parametrization or the hook-based one), a new tensor each time, so the check never
    warned about an optimiser that misses the layer's std. It follows the stepped
    parameters; an optimiser with the std stays quiet."""
    import snntorch as snn

    from sbnn_addons.snntorch import reset, to_sbnn

    x = torch.rand(3, 4, 8) * 3
    for with_std in (False, True):
        torch.manual_seed(0)
        net = to_sbnn(nn.Sequential(nn.Linear(8, 6), snn.Leaky(beta=0.9, init_hidden=True)))
        if norm == "hook":
            torch.nn.utils.weight_norm(net[0])
        else:
            torch.nn.utils.parametrizations.weight_norm(net[0])
        params = [p for n, p in net.named_parameters() if with_std or "std_rho" not in n]

        def forward(net=net):
            reset(net)
            return torch.stack([net(x_t) for x_t in x])

        found = _train_steps(net, torch.optim.Adam(params, lr=1e-2), x, forward=forward)
        assert len(found) == (0 if with_std else 1), found


def test_std_check_raises_no_false_alarm():
    """No warning for a frozen std, a std in a group with lr=0, gradient accumulation
    over several forwards, evaluation forwards between steps, or zero_grad(set_to_none);
    an optimiser without the std warns once."""
    torch.manual_seed(0)
    x = torch.rand(5, 4) * 3

    def fresh():
        return sb.track_variance(nn.Sequential(BayesLinear(4, 3, std=0.3),
                                               sb.IWSTSpike("st", std=0.2)))

    def weights(net):
        return [net[0].weight, net[0].bias]

    net = fresh()
    net[0].std_rho.requires_grad_(False)
    assert _train_steps(net, torch.optim.SGD(weights(net), lr=0.1), x) == []
    net = fresh()
    opt = torch.optim.Adam([{"params": weights(net)},
                            {"params": [net[0].std_rho], "lr": 0.0}], lr=0.1)
    assert _train_steps(net, opt, x) == []
    net = fresh()
    opt = torch.optim.SGD(sb.param_groups(net, lr=0.1, noise_lr=1e-3), lr=0.1)

    def accumulate_and_evaluate():
        net(x).sum().backward()  # accumulated: no step in between
        with torch.no_grad():
            net(x)
        net.eval()
        net(x)
        net.train()
        return net(x)

    assert _train_steps(net, opt, x, forward=accumulate_and_evaluate) == []
    assert net[0].std_rho.grad is not None  # the std does get a gradient here
    # without the std: gradients accumulated over forwards (no step) are not warned about,
    # the steps are, once
    net = fresh()
    opt = torch.optim.SGD(weights(net), lr=0.1)
    with warnings_recorded() as caught:
        for _ in range(3):
            net(x).sum().backward()
    assert caught == []
    found = _train_steps(net, opt, x, steps=3)
    assert len(found) == 1
    # a std left out on purpose (fine-tuning the means): the message names the freeze
    assert "requires_grad_(False)" in found[0]


@contextlib.contextmanager
def warnings_recorded():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


@pytest.mark.parametrize("kind, std_mode, bias_noise", [
    ("linear", "layer", False), ("linear", "channel", True), ("linear", "weight", False),
    ("conv2d", "layer", False), ("conv2d", "weight", True)])
def test_pruned_weights_carry_no_noise(kind, std_mode, bias_noise):
    """``torch.nn.utils.prune`` on ``weight``: the pruned weight is ``m * w`` with
    ``w ~ N(mu, s^2)``, so a removed synapse adds neither mean nor noise. The attached
    variance is ``sum_i m_i s_i^2 x_i^2`` exactly (it kept every removed synapse's
    noise), and matches weight sampling (4000 samples, float64, 5 standard errors); a
    fully pruned output unit is noise-free and the std's gradient comes from the kept
    synapses only."""
    from torch.nn.utils import prune

    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    layer, x = _make(kind, std_mode, bias_noise, 1, 1)
    _randomise_std(layer, gen)
    prune.random_unstructured(layer, "weight", amount=0.5)
    with torch.no_grad():
        layer.weight_mask[0] = 0  # output unit 0 has no synapse left
    mask = layer.weight_mask
    std = layer.std.detach()
    std = (std.view(-1, *([1] * (mask.dim() - 1))) if std_mode == "channel" else std)
    s2 = std.expand(mask.shape) ** 2 * mask
    op = ((lambda v, w: F.linear(v, w)) if kind == "linear"
          else (lambda v, w: F.conv2d(v, w, padding=1)))
    expected = op(x * x, s2) + (layer.bias_std.detach() ** 2 if bias_noise else 0)
    mean = layer(x)
    var = get_variance(mean).expand_as(mean)
    torch.testing.assert_close(var, expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(layer.output_variance(x), expected, rtol=1e-12, atol=1e-15)
    if not bias_noise:
        assert torch.all(var[:, 0] == 0)
    w = mask * (layer.weight_orig.detach() + std.expand(mask.shape) * torch.randn(
        (S, *mask.shape), generator=gen, dtype=F64))
    b = layer.bias.detach().expand(S, -1)
    if bias_noise:
        b = b + layer.bias_std.detach() * torch.randn(b.shape, generator=gen, dtype=F64)
    if kind == "linear":
        outs = torch.einsum("bi,soi->sbo", x, w) + b[:, None, :]
    else:
        outs = torch.func.vmap(lambda wi, bi: F.conv2d(x, wi, bi, padding=1))(w, b)
    v = var.detach()
    assert torch.all((outs.var(0) - v).abs() <= 5 * v * math.sqrt(2 / (S - 1)) + 1e-15)
    if std_mode == "layer":
        var.sum().backward()
        grad = (op(x * x, mask).sum() * 2 * layer.std * torch.sigmoid(layer.std_rho)).detach()
        torch.testing.assert_close(layer.std_rho.grad, grad, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind, std_mode", [("linear", "layer"), ("linear", "weight"),
                                             ("conv2d", "layer"), ("conv2d", "channel")])
def test_pruned_bias_carries_no_noise(kind, std_mode):
    """``torch.nn.utils.prune`` on ``bias`` (a global pruning over weights and biases):
    the bias is ``m * b`` with ``b ~ N(mu_b, s_b^2)``, so a removed bias adds no noise,
    as a removed weight: its ``s_b^2`` (0.04 here) was added to every output all the
    same. The variance is the unpruned one minus ``s_b^2`` on the pruned outputs, in the
    forward and in ``output_variance``, with a pruned weight too."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    layer, x = _make(kind, std_mode, True, 1, 1)
    full = layer.output_variance(x)
    keep = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0][:layer.bias.shape[0]], dtype=F64)
    prune.custom_from_mask(layer, "bias", keep)
    per_out = keep.view(-1, *([1] * (full.dim() - 2))) if kind == "conv2d" else keep
    want = full - (1 - per_out) * layer.bias_std.detach() ** 2
    mean = layer(x)
    torch.testing.assert_close(get_variance(mean).expand_as(mean), want, rtol=1e-12, atol=0)
    torch.testing.assert_close(layer.output_variance(x), want, rtol=1e-12, atol=0)
    prune.custom_from_mask(layer, "weight", torch.ones_like(layer.weight))  # both pruned
    torch.testing.assert_close(layer.output_variance(x), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_second_order_gradient_through_compact_spike_input(kind, monkeypatch):
    """A Bayesian layer keeps a large 0/1 spike input as uint8 for the backward. A
    second-order gradient (create_graph=True, a gradient penalty) through it lost the
    terms through the spikes silently (None / 0 for the layer before); it raises, naming
    the switch, and with the switch it equals the plain path. Spikes without a graph
    (data) give exact second-order gradients in the weights."""
    import sbnn_addons.layers as layers_mod

    def penalty(fc0, fc, x):
        h = sb.IWSTSpike()(fc0(x))
        g = torch.autograd.grad(fc(h).pow(2).sum(), fc.weight, create_graph=True)[0]
        return g.pow(2).sum()

    torch.manual_seed(0)
    if kind == "linear":
        fc0, fc, x = BayesLinear(8, 64), BayesLinear(64, 3), torch.rand(1100, 8)
    else:
        fc0, fc = BayesConv2d(1, 16, 3, padding=1), BayesConv2d(16, 2, 3, padding=1)
        x = torch.rand(16, 1, 16, 16)
    with pytest.raises(RuntimeError, match=r"second-order gradient.*COMPACT_INPUT_MIN = "
                                           r"math\.inf"):
        torch.manual_seed(1)
        penalty(fc0, fc, x)
    monkeypatch.setattr(layers_mod, "COMPACT_INPUT_MIN", math.inf)
    torch.manual_seed(1)
    ref = torch.autograd.grad(penalty(fc0, fc, x), fc0.weight)[0]
    assert ref.abs().sum() > 0
    monkeypatch.undo()
    spikes = sb.IWSTSpike()(torch.randn((1100, 64) if kind == "linear" else (16, 16, 16, 16)))
    assert "BinaryInputOp" in type(fc(spikes).grad_fn).__name__  # the compact path

    def data_penalty():
        g = torch.autograd.grad(fc(spikes).pow(2).sum(), fc.weight, create_graph=True)[0]
        return torch.autograd.grad(g.pow(2).sum(), fc.weight)[0]

    compact = data_penalty()
    monkeypatch.setattr(layers_mod, "COMPACT_INPUT_MIN", math.inf)
    torch.testing.assert_close(compact, data_penalty(), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("saved, loaded", [("channel", "layer"), ("layer", "channel"),
                                           ("weight", "channel")])
def test_state_dict_of_another_std_mode_names_it(saved, loaded):
    """A checkpoint of a layer with another ``std_mode`` raised PyTorch's bare size
    mismatch of ``std_rho``; the error now names both std modes and the fix."""
    torch.manual_seed(0)
    src = nn.Sequential(BayesConv2d(2, 4, 3, std_mode=saved))
    dst = nn.Sequential(BayesConv2d(2, 4, 3, std_mode=loaded))
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=rf"0\.std_rho.*std_mode='{saved}'.*"
                                               rf"std_mode='{loaded}'.*std_mode='{saved}'"):
            dst.load_state_dict(src.state_dict(), strict=strict)
    with torch.device("meta"):  # built on the meta device, loaded with assign=True
        empty = nn.Sequential(BayesConv2d(2, 4, 3, std_mode=loaded))
    with pytest.raises(RuntimeError, match=rf"std_mode='{saved}'"):
        empty.load_state_dict(src.state_dict(), assign=True)


def test_loading_weights_without_noise_scales_warns():
    """A state dict with a Bayesian layer's weight but not its noise scale (a host
    model's checkpoint, loaded with strict=False) left the std at its initial value
    silently; it now warns, once per load, naming the layer and the key."""
    model = nn.Sequential(BayesLinear(4, 3), nn.ReLU(), BayesLinear(3, 2))
    host = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.warns(UserWarning, match=r"'0'.*std_rho.*before") as record:
        result = model.load_state_dict(host.state_dict(), strict=False)
    assert len([w for w in record if "std_rho" in str(w.message)]) == 1
    assert result.missing_keys == ["0.std_rho", "2.std_rho"]
    assert torch.equal(model[0].weight, host[0].weight)
    with warnings.catch_warnings():  # a full checkpoint loads silently
        warnings.simplefilter("error")
        model.load_state_dict(nn.Sequential(BayesLinear(4, 3), nn.ReLU(),
                                            BayesLinear(3, 2)).state_dict())
        # a state dict without the layer at all (another sub-model's) is not this case
        model.load_state_dict({}, strict=False)


def test_loading_a_pruned_host_checkpoint_without_noise_scales_warns():
    """The same for a pruned layer, whose state dict holds ``weight_orig`` (and
    ``weight_mask``), not ``weight``: the warning did not fire, and the std kept its
    initial value silently."""
    from torch.nn.utils import prune

    host = nn.Sequential(nn.Linear(4, 3))
    prune.l1_unstructured(host[0], "weight", 0.5)
    model = nn.Sequential(BayesLinear.from_module(host[0]))
    with pytest.warns(UserWarning, match=r"'0'.*std_rho"):
        result = model.load_state_dict(host.state_dict(), strict=False)
    assert result.missing_keys == ["0.std_rho"]


def test_channel_affine_on_meta_loads_a_batchnorm_checkpoint_with_assign():
    """A ChannelAffine built on the meta device and given a BatchNorm's state dict with
    ``assign=True`` folded the entries onto the meta device: its parameters stayed meta
    ("All keys matched successfully"); they now hold the folded values."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 2.0)
    with torch.device("meta"):
        affine = nn.Sequential(ChannelAffine(3))
    affine.load_state_dict(nn.Sequential(bn).state_dict(), assign=True)
    ref = ChannelAffine.from_batchnorm(bn)
    assert not affine[0].weight.is_meta and not affine[0].bias.is_meta
    torch.testing.assert_close(affine[0].weight, ref.weight)
    torch.testing.assert_close(affine[0].bias, ref.bias)


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("name", ["weight", "bias"])
@pytest.mark.parametrize("make, shape", [
    (lambda: BayesLinear(4, 3), (2, 4)),
    (lambda: BayesConv1d(2, 3, 3), (1, 2, 5)),
    (lambda: BayesConv2d(2, 3, 3), (1, 2, 5, 5)),
])
def test_a_nonfinite_posterior_mean_is_named(make, shape, name, value):
    """A NaN / inf weight or bias mean of a layer used alone (stepped in by an optimiser,
    loaded from a corrupt checkpoint) passed NaN through, silently: it is named at the
    next call, tested again only when the parameter changed; check_finite(False) skips."""
    layer, x = make(), torch.rand(shape)
    layer(x)
    with torch.no_grad():
        getattr(layer, name).view(-1)[0] = value
    with pytest.raises(ValueError, match=rf"{type(layer).__name__}\.{name} \(the posterior "
                                         r"mean\) holds .*check_finite\(False\)"):
        layer(x)
    with sb.check_finite(False):
        layer(x)


def test_a_posterior_mean_or_noise_scale_replaced_through_data_is_checked():
    """``param.data = tensor`` (and ``model.to(...)``, which assigns ``.data``) moves no
    version counter: the replaced tensor is checked all the same (the key holds its
    storage)."""
    layer, x = BayesLinear(4, 3), torch.rand(2, 4)
    layer(x)
    layer.weight.data = torch.full_like(layer.weight, math.nan)
    with pytest.raises(ValueError, match=r"BayesLinear\.weight \(the posterior mean\)"):
        layer(x)
    layer.reset_parameters()
    layer(x)
    layer.std_rho.data = torch.full_like(layer.std_rho, math.nan)
    with pytest.raises(ValueError, match=r"BayesLinear\.std_rho \(a noise scale\)"):
        layer(x)


def test_batchnorm_call_pairs_follow_the_forward_and_leave_the_model_as_it_was():
    """batchnorm_call_pairs pairs each BatchNorm with the weight layer one forward calls
    right before it (pooling in between does not count, a neuron does), whatever order
    the model declares them in; a BatchNorm called after two different layers folds into
    none, with a warning naming it. The forward leaves the model as it was."""
    import snntorch as snn

    from sbnn_addons.layers import batchnorm_call_pairs

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.shared = nn.BatchNorm2d(4)
            self.conv2, self.conv1, self.conv3 = (nn.Conv2d(4, 4, 1), nn.Conv2d(2, 4, 1),
                                                  nn.Conv2d(4, 4, 1))
            self.pool = nn.MaxPool2d(2)
            self.lif = snn.Leaky(beta=0.9, init_hidden=True)

        def forward(self, x):
            x = self.lif(self.bn(self.pool(self.conv1(x))))
            x = self.lif(self.shared(self.conv2(x)))
            return self.lif(self.shared(self.conv3(x)))

    net = Net().train()
    state = copy.deepcopy(net.state_dict())
    with pytest.warns(UserWarning, match="'shared' into no layer"):
        pairs = batchnorm_call_pairs(net, torch.rand(2, 2, 4, 4), (nn.Conv2d,))
    assert pairs == {"conv1": "bn"}
    assert net.training and all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in net.modules())


@pytest.mark.parametrize("owner, attr", [
    (lambda: sb.BayesLinear(4, 3), "std"),
    (lambda: sb.BayesConv2d(2, 3, 3, std_mode="channel"), "std"),
    (lambda: sb.BayesLinear(4, 3, bias_std=0.1), "bias_std"),
    (lambda: sb.IWSTSpike("st", std=0.3, learn_std=True), "std"),
])
def test_an_in_place_edit_of_a_learned_std_is_named(owner, attr):
    """``.std`` of a learned std is computed from ``std_rho`` at every read: an in-place
    edit of it (``nn.init.constant_(layer.std, 0.05)`` in an init function, ``.mul_(0.5)``
    to quieten a trained model) changed a temporary and nothing else, silently. It raises,
    naming std_rho; reading and differentiating ``.std`` work as before."""
    module = owner()
    before = getattr(module, attr).detach().clone()
    edits = [lambda s: nn.init.constant_(s, 0.05), lambda s: s.mul_(0.5),
             lambda s: s.copy_(torch.zeros_like(s)), lambda s: s.data.fill_(0.0),
             lambda s: s.__setitem__(..., 0.0), lambda s: s.view(-1)[0].fill_(0.0),
             lambda s: s.reshape(-1).unbind(0)[0].zero_()]
    for edit in edits:
        with torch.no_grad(), pytest.raises(RuntimeError, match="std_rho"):
            edit(getattr(module, attr))
        with pytest.raises(RuntimeError, match="std_rho"):  # with gradients on too
            edit(getattr(module, attr))
    std = getattr(module, attr)
    assert torch.equal(std.detach(), before)
    assert type(std * 2) is torch.Tensor and float(std.detach().max()) == float(before.max())
    assert type(std.detach()) is torch.Tensor and type(std.clone()) is torch.Tensor
    with torch.no_grad():  # a copy (no module's std) and a saved one are plain tensors
        kept = copy.deepcopy(getattr(module, attr))
    assert type(kept) is torch.Tensor and torch.equal(kept, before)
    assert not getattr(module, attr).__dict__  # nothing kept on the tensor itself
    std.sum().backward()  # a regulariser on the std trains std_rho
    assert any(p.grad is not None for n, p in module.named_parameters() if "std_rho" in n)
    fixed = sb.BayesLinear(4, 3, learn_std=False, std=0.1)
    with torch.no_grad():
        fixed.std.fill_(0.2)  # the buffer itself: edited, as documented
    assert torch.all(fixed.std == 0.2)
