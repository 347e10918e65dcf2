"""Variance flow between Bayesian layers and neurons (Method page, section 2, ``moments.py``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sbnn_addons as sb
from sbnn_addons import (
    BayesConv2d,
    ChannelAffine,
    IWSTSpike,
    attach_variance,
    get_variance,
    moments,
)
from sbnn_addons.moments import (
    ScaledVariance,
    UnknownVariance,
    VarianceFlowError,
    no_variance_flow,
    raw_variance,
    register_variance_rule,
    track_variance,
    untrack_variance,
    variance_flow,
)

F64 = torch.float64


def _noisy(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=F64)
    v = torch.rand(shape, generator=gen, dtype=F64) + 0.1
    return attach_variance(x, v), v


def _pooling_weights_variance(func, shape, var, **kw):
    """Exact variance of a linear pooling: its weights W by pooling basis vectors, then
    var_out = W^2 var."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=F64).view(n, *shape[1:])
    weights = func(basis, **kw).reshape(n, -1).t()
    return ((weights**2) @ var.reshape(-1)).view(func(torch.zeros(shape, dtype=F64), **kw).shape)


_POOL_CASES = [
    (func, shape, dict(kernel_size=k, stride=s, padding=p, ceil_mode=c, count_include_pad=i))
    for func, shape in ((F.avg_pool1d, (1, 1, 9)), (F.avg_pool2d, (1, 1, 7, 8)))
    for k in (2, 3) for s in (1, 2, 3) for p in (0, 1) for c in (False, True)
    for i in (True, False) if 2 * p <= k
] + [(F.avg_pool2d, (1, 1, 7, 8), dict(kernel_size=3, stride=2, padding=1, divisor_override=d))
     for d in (1, 5)]


@pytest.mark.parametrize("func, shape, kw", _POOL_CASES)
def test_avg_pool_variance_is_exact_for_every_window_mode(func, shape, kw):
    """sum over each window of var / D_j^2 with PyTorch's own divisor D_j: constant
    windows (separable sum), ceil mode and count_include_pad=False (per-window divisors)
    and divisor_override all equal the pooling's weights squared applied to var."""
    x, v = _noisy(shape)
    with variance_flow():
        y = func(x, **kw)
    want = _pooling_weights_variance(func, shape, v, **kw)
    torch.testing.assert_close(get_variance(y), want, rtol=1e-12, atol=1e-14)


def test_avg_pool_sum_var_over_k2_matches_monte_carlo():
    """avg_pool over k = 4 gives sum(var)/k^2 exactly; and equals the variance of pooled
    Gaussian samples (40k samples, tolerance 5 standard errors var sqrt(2/(S-1)))."""
    x, v = _noisy((2, 3, 4, 4))
    with variance_flow():
        y = F.avg_pool2d(x, 2)
        y_mod = nn.AvgPool2d(2)(x)
    want = F.avg_pool2d(v, 2) * 4 / 16  # sum over the 4 elements / 4^2
    torch.testing.assert_close(get_variance(y), want, rtol=1e-12, atol=0)
    torch.testing.assert_close(get_variance(y_mod), want, rtol=1e-12, atol=0)
    S = 40_000
    gen = torch.Generator().manual_seed(1)
    samples = x + v.sqrt() * torch.randn((S, *x.shape), generator=gen, dtype=F64)
    pooled = F.avg_pool2d(samples.flatten(0, 1), 2).view(S, *y.shape)
    assert torch.all((pooled.var(0) - want).abs() <= 5 * want * math.sqrt(2 / (S - 1)))
    with variance_flow():
        y1 = F.avg_pool1d(x.flatten(2), 4)
    torch.testing.assert_close(get_variance(y1), F.avg_pool1d(v.flatten(2), 4) / 4, rtol=1e-12,
                               atol=0)


def test_max_pool_takes_variance_at_argmax():
    x, v = _noisy((2, 3, 4, 4))
    with variance_flow():
        y = nn.MaxPool2d(2)(x)
        y_f = F.max_pool2d(x, kernel_size=2, stride=2)
    _, idx = F.max_pool2d(x, 2, return_indices=True)
    want = v.flatten(2).gather(2, idx.flatten(2)).view_as(idx)
    assert torch.equal(get_variance(y), want)
    # a plain tensor (it was a carrier marked unknown, from the indices taken on the carrier)
    assert type(get_variance(y)) is torch.Tensor and type(get_variance(y_f)) is torch.Tensor
    # adaptive max pooling (no rule before): the same, also with windows of varying size
    assert torch.equal(get_variance(nn.AdaptiveMaxPool2d(2)(x)), want)
    x5, v5 = _noisy((2, 3, 5, 5))
    y5 = F.adaptive_max_pool2d(x5, (3, 2))
    _, idx5 = F.adaptive_max_pool2d(moments.plain(x5), (3, 2), return_indices=True)
    assert torch.equal(get_variance(y5), v5.flatten(2).gather(2, idx5.flatten(2)).view_as(idx5))
    assert type(get_variance(y5)) is torch.Tensor
    assert torch.equal(get_variance(y_f), want)
    assert not torch.equal(want, F.max_pool2d(v, 2))  # the test distinguishes argmax of var


def test_reshape_flatten_index_move_variance():
    x, v = _noisy((2, 3, 4))
    with variance_flow():
        f = x.flatten(1)
        r = x.reshape(6, 4)
        p = x.permute(2, 0, 1)
        i = x[:, 1]
        c = torch.cat([x, x * 2.0], dim=1)
    assert torch.equal(get_variance(f), v.flatten(1))
    assert torch.equal(get_variance(r), v.reshape(6, 4))
    assert torch.equal(get_variance(p), v.permute(2, 0, 1))
    assert torch.equal(get_variance(i), v[:, 1])
    assert torch.equal(get_variance(c), torch.cat([v, 4 * v], 1))


@pytest.mark.parametrize("std_mode", ["layer", "weight"])
def test_a_view_of_a_layer_output_keeps_its_variance(std_mode):
    """``view`` of a Bayesian layer's output that merges its dimensions
    (``fc(x).view(-1)``, ``view_as``): with a per-layer std the variance is one value per
    row broadcast over the features, which cannot be viewed so, and the view failed with
    PyTorch's "view size is not compatible with input tensor's size and stride ... Use
    .reshape(...)" on a contiguous output. The variance is reshaped, the output's own
    view's values."""
    torch.manual_seed(0)
    layer = sb.BayesLinear(4, 6, std_mode=std_mode)
    out = layer(torch.rand(2, 4))
    want = get_variance(out).expand(2, 6).reshape(12)
    for view in (out.view(-1), out.view(size=(12,)), out.view_as(torch.zeros(12))):
        assert view.shape == (12,)
        assert torch.equal(get_variance(view), want)


def test_linear_combinations():
    a, va = _noisy((3, 4), 0)
    b, vb = _noisy((3, 4), 1)
    c = torch.randn(3, 4, dtype=F64)
    with variance_flow():
        s = a + b
        d = a - 2.0 * b
        m = a * 3.0
        mt = c * a
        q = a / 4.0
        mean = a.mean(1)
        tot = a.sum()
        n = -a
    torch.testing.assert_close(get_variance(s), va + vb, rtol=1e-12, atol=0)
    torch.testing.assert_close(get_variance(d), va + 4 * vb, rtol=1e-12, atol=0)
    torch.testing.assert_close(get_variance(m), 9 * va, rtol=1e-12, atol=0)
    torch.testing.assert_close(get_variance(mt), c * c * va, rtol=1e-12, atol=0)
    torch.testing.assert_close(get_variance(q), va / 16, rtol=1e-12, atol=0)
    torch.testing.assert_close(get_variance(mean), va.sum(1) / 16, rtol=1e-12, atol=0)
    torch.testing.assert_close(get_variance(tot), va.sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(get_variance(n), va, rtol=1e-12, atol=0)
    with variance_flow():
        prod = a * b
    assert isinstance(get_variance(prod), UnknownVariance)


def test_batch_norm_eval_scales_variance():
    """Eval-mode batch_norm: var * (gamma / sqrt(running_var + eps))^2 (rtol 1e-12)."""
    x, v = _noisy((4, 3, 2, 2))
    bn = nn.BatchNorm2d(3).double().eval()
    bn.running_var.copy_(torch.tensor([0.5, 2.0, 4.0]))
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
    with variance_flow():
        y = bn(x)
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().view(1, 3, 1, 1)
    torch.testing.assert_close(get_variance(y), v * scale**2, rtol=1e-12, atol=0)


@pytest.mark.parametrize("factored", [False, True])
def test_batch_norm_training_variance_is_a_plain_tensor(factored):
    """Training-mode batch_norm: var / (batch var of the mean + eps) * gamma^2, the
    batch statistic taken from the mean alone, so that the output's variance is a plain
    tensor (it was itself a carrier with an unknown variance, from `var` on the input)."""
    x, v = _noisy((4, 3, 2, 2))
    if factored:
        x = attach_variance(moments.plain(x), ScaledVariance(v, torch.tensor(0.3,
                                                                    dtype=v.dtype)))
    bn = nn.BatchNorm2d(3).double().train()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
    y = bn(x)
    raw = raw_variance(y)
    stored = raw.base if factored else raw
    assert type(stored) is torch.Tensor
    stat = moments.plain(x).var(dim=(0, 2, 3), unbiased=False)
    scale = (bn.weight.detach() ** 2 / (stat + bn.eps)).view(1, 3, 1, 1)
    want = v * scale * (0.3 if factored else 1.0)
    torch.testing.assert_close(get_variance(y), want, rtol=1e-12, atol=0)


def test_dropout_and_pad():
    x, v = _noisy((4, 8))
    torch.manual_seed(0)
    with variance_flow():
        y = F.dropout(x, 0.5, training=True)
        z = F.dropout(x, 0.5, training=False)
        pd = F.pad(x, (1, 2))
    kept = (y != 0).double()
    torch.testing.assert_close(get_variance(y), v * kept * 4, rtol=1e-12, atol=0)
    assert torch.equal(get_variance(z), v)
    assert torch.equal(get_variance(pd), F.pad(v, (1, 2)))


@pytest.mark.parametrize("drop", ["dropout", "dropout2d", "inplace", "torch.dropout"])
def test_dropout_drops_the_variance_of_a_dropped_element_whose_mean_is_zero(drop):
    """The dropout rule read the dropped elements from the output (``out == 0``) and kept
    the variance wherever the mean was exactly 0 (a Bayesian layer fed zeros, whose
    noise is its bias std): a dropped element kept its noise, which the spike function
    then drew. The flow runs a dropout as the product with its mask (the same draws and
    values): the variance of every dropped element is 0, of every kept one ``v / (1-p)^2``."""
    x, v = _noisy((4, 6, 3))
    x = moments.plain(x)
    x[:, ::2] = 0.0  # means exactly 0, with a variance
    x = attach_variance(x, v)
    calls = {"dropout": lambda t: F.dropout(t, 0.5, training=True),
             "dropout2d": lambda t: F.dropout2d(t, 0.5, training=True),
             "inplace": lambda t: nn.Dropout(0.5, inplace=True)(t.clone()),
             "torch.dropout": lambda t: torch.dropout(t, 0.5, True)}
    like = "dropout2d" if drop == "dropout2d" else "dropout"
    torch.manual_seed(0)
    mask = getattr(F, like)(torch.ones_like(moments.plain(x)), 0.5, training=True)
    torch.manual_seed(0)
    with variance_flow():
        y = calls[drop](x)
    assert ((mask == 0) & (x == 0)).any() and ((mask != 0) & (x == 0)).any()
    assert torch.equal(moments.plain(y), moments.plain(x) * mask)
    torch.testing.assert_close(get_variance(y), v * mask**2, rtol=1e-12, atol=0)


def test_dropout_after_a_bayesian_layer_fed_zeros_drops_the_bias_noise():
    """nn.Dropout between a Bayesian layer with a bias std and a neuron, on zero inputs
    (the means are exactly the bias, here 0): the dropped elements kept the bias's
    variance, and the neuron drew noise for inputs the dropout had set to 0."""
    fc = sb.BayesLinear(4, 64, bias_std=0.5)
    with torch.no_grad():
        fc.bias.zero_()
    drop = nn.Dropout(0.5).train()
    torch.manual_seed(3)
    with variance_flow():
        y = drop(fc(torch.zeros(8, 4)))
    var = get_variance(y)
    dropped = var == 0
    assert dropped.any() and (~dropped).any()
    torch.testing.assert_close(var[~dropped], torch.full_like(var[~dropped], 4 * 0.25))


def test_channel_affine_leaves_variance_inside_flow():
    x, v = _noisy((2, 3, 4))
    aff = ChannelAffine(3).double()
    with torch.no_grad():
        aff.weight.fill_(3.0)
    with variance_flow():
        y = aff(x)
    assert torch.equal(get_variance(y), v)


def test_unknown_op_raises_naming_op():
    x, _ = _noisy((2, 5))
    spike = IWSTSpike()
    with variance_flow():
        y = torch.tanh(x)
        assert isinstance(get_variance(y), UnknownVariance)
        with pytest.raises(VarianceFlowError, match="tanh"):
            spike(y - 1.0)  # unknown propagates through later ops too
        with pytest.raises(VarianceFlowError, match="sigmoid"):
            spike(torch.sigmoid(x))


def test_no_variance_flow_and_plain_ops_drop_variance():
    x, v = _noisy((2, 5))
    torch.testing.assert_close(get_variance(x * 2.0), 4.0 * v)  # the carrier flows anywhere
    with no_variance_flow():
        y = x * 2.0
        assert get_variance(y) is None and type(y) is torch.Tensor
    assert type(sb.moments.plain(x)) is torch.Tensor and torch.equal(sb.moments.plain(x), x)


def test_track_variance_model_end_to_end():
    """BayesConv2d -> AvgPool2d -> flatten -> IWSTSpike under track_variance: the spike
    sees sum(var)/k^2 of the LRT variance (checked through noise_variance)."""
    torch.manual_seed(0)
    conv = BayesConv2d(2, 3, 3, padding=1, std=0.2)
    seen = []

    class Probe(IWSTSpike):
        def fire(self, u, variance):
            seen.append(variance)
            return super().fire(u, variance)

    model = nn.Sequential(conv, nn.AvgPool2d(2), nn.Flatten(), Probe())
    track_variance(model)
    x = torch.rand(2, 2, 4, 4)
    model(x)
    want = (F.avg_pool2d(conv.output_variance(x), 2) / 4).flatten(1)
    torch.testing.assert_close(seen[0], want, rtol=1e-5, atol=0)
    untrack_variance(model)
    model(x)  # the hooks only add checks: the variance flows without them
    torch.testing.assert_close(seen[1], want, rtol=1e-5, atol=0)
    model2 = track_variance(nn.Sequential(conv, nn.AvgPool2d(2), nn.Tanh(), IWSTSpike()))
    with pytest.raises(VarianceFlowError, match="tanh"):
        model2(x)


# ----------------------------------------------------------------- factored variances
def _std_pair(seed=0):
    """A per-layer-std conv (its variance kept factored, s^2 F) and a per-channel one
    with the same means and equal stds (its variance a plain tensor)."""
    torch.manual_seed(seed)
    layer = BayesConv2d(2, 3, 3, padding=1, std=0.3)
    channel = BayesConv2d(2, 3, 3, padding=1, std=0.3, std_mode="channel")
    channel.load_state_dict({**layer.state_dict(),
                             "std_rho": layer.std_rho.detach().expand(3).clone()})
    return layer, channel


def _flow_ops(layer, x):
    with variance_flow():
        y = F.avg_pool2d(layer(x), 2)
        return (0.5 * y.flatten(1) - 1.0)[:, 2:]


def test_factored_variance_through_the_flow_equals_the_tensor_variance():
    """pool, flatten, scale, shift and index act on F alone; the variance read at the end
    and its gradient with respect to the std equal the per-channel layer's."""
    layer, channel = _std_pair()
    x = torch.rand(4, 2, 8, 8)
    y_layer, y_channel = _flow_ops(layer, x), _flow_ops(channel, x)
    assert isinstance(raw_variance(y_layer), ScaledVariance)
    assert not isinstance(raw_variance(y_channel), ScaledVariance)
    v_layer, v_channel = get_variance(y_layer), get_variance(y_channel)
    torch.testing.assert_close(v_layer.expand_as(y_layer), v_channel, rtol=1e-6, atol=0)
    (v_layer.expand_as(y_layer) * torch.arange(y_layer.shape[1])).sum().backward()
    (v_channel * torch.arange(y_layer.shape[1])).sum().backward()
    assert layer.std_rho.grad.abs() > 0
    torch.testing.assert_close(layer.std_rho.grad, channel.std_rho.grad.sum(), rtol=1e-5,
                               atol=0)


def test_factored_variances_of_two_layers_are_multiplied_out():
    """A residual sum of two layers (two scales) gives a tensor variance, their sum; one
    layer used twice in a share_posterior block (one scale) stays factored."""
    torch.manual_seed(0)
    a, b = BayesConv2d(2, 3, 3, padding=1), BayesConv2d(2, 3, 3, padding=1, std=0.2)
    x, x2 = torch.rand(2, 2, 5, 5), torch.rand(2, 2, 5, 5)
    with variance_flow():
        ya, yb = a(x), b(x)
        mixed = ya + yb
        with sb.share_posterior():
            same = a(x) + a(x2)
    assert isinstance(raw_variance(mixed), torch.Tensor)
    torch.testing.assert_close(get_variance(mixed), get_variance(ya) + get_variance(yb))
    assert isinstance(raw_variance(same), ScaledVariance)
    with no_variance_flow():
        want = get_variance(a(x)) + get_variance(a(x2))
    torch.testing.assert_close(get_variance(same), want)


def test_scaled_variance_value_follows_the_grad_mode_and_checks_its_scale():
    scale = torch.tensor(0.5, requires_grad=True)
    var = ScaledVariance(torch.ones(3), scale)
    with torch.no_grad():
        assert var.value().grad_fn is None
    assert var.value().grad_fn is not None and var.value() is var.value()
    torch.testing.assert_close(var.value().detach(), torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="scale must be a 0-dim"):
        ScaledVariance(torch.ones(3), torch.ones(3))
    with pytest.raises(TypeError, match="scale must be a torch.Tensor"):
        ScaledVariance(torch.ones(3), 0.5)


@pytest.mark.parametrize("bad, what", [(-1.0, "1 negative"), (math.nan, "1 NaN"),
                                       (math.inf, "1 inf")])
def test_attach_variance_refuses_a_negative_or_non_finite_variance(bad, what):
    """A negative or NaN variance was attached silently: the spike's noise std
    sqrt(max(v, 0)) made it 0 (or NaN), with no error."""
    mean = torch.zeros(4, 3)
    var = torch.ones(4, 3)
    var[1, 2] = bad
    with no_variance_flow():
        with pytest.raises(ValueError, match=rf"variance must be finite and >= 0.*{what}.*"
                                             r"check_finite\(False\)"):
            attach_variance(mean.clone(), var)
        with pytest.raises(ValueError, match="variance must be finite and >= 0"):
            attach_variance(mean.clone(), ScaledVariance(var, torch.tensor(0.5)))
        with pytest.raises(ValueError, match="variance must be finite and >= 0"):
            attach_variance(mean.clone(), ScaledVariance(torch.ones(3), torch.tensor(bad)))
        with sb.check_finite(False):  # the finite-input check's switch turns it off
            attach_variance(mean.clone(), var)
        attach_variance(mean.clone(), torch.zeros(4, 3))  # 0 is a variance


def test_attach_variance_refuses_a_variance_that_does_not_broadcast_to_the_mean():
    """A variance of another shape was attached silently and failed only at the spike,
    far from its cause; broadcastable ones ([N, 1], a scalar) are kept."""
    mean = torch.zeros(4, 3)
    with no_variance_flow():
        with pytest.raises(ValueError, match=r"variance of shape \(4, 2\).*mean of shape "
                                             r"\(4, 3\)"):
            attach_variance(mean.clone(), torch.ones(4, 2))
        with pytest.raises(ValueError, match=r"\(2, 4, 3\) does not broadcast"):
            attach_variance(mean.clone(), torch.ones(2, 4, 3))
        with pytest.raises(ValueError, match=r"ScaledVariance base of shape \(3, 4\)"):
            attach_variance(mean.clone(), ScaledVariance(torch.ones(3, 4), torch.tensor(0.5)))
        for var in (torch.ones(4, 1), torch.ones(()), torch.ones(3), torch.ones(4, 3),
                    ScaledVariance(torch.ones(4, 1), torch.tensor(0.5)),
                    UnknownVariance("op"), None):
            attach_variance(mean.clone(), var)


def test_a_registered_rule_gets_the_variance_multiplied_out():
    """Only the built-in rules are known to be linear; a rule registered over one of
    them receives the product s^2 F."""
    seen = []

    def rule(func, args, kwargs, out, var_of):
        seen.append(var_of(args[0]))
        return var_of(args[0]) * 4.0

    saved = moments._RULES["neg"], set(moments._FACTORED)
    try:
        register_variance_rule("neg")(rule)
        layer, _ = _std_pair()
        x = torch.rand(1, 2, 4, 4)
        with variance_flow():
            y = layer(x)
            z = -y
        assert not isinstance(raw_variance(z), ScaledVariance)
        torch.testing.assert_close(seen[0], get_variance(y))
        torch.testing.assert_close(get_variance(z), 4.0 * get_variance(y))
    finally:
        moments._RULES["neg"], moments._FACTORED = saved[0], saved[1]


# --------------------------------------------------------------------------- multi-output ops
@pytest.mark.parametrize("op", [
    lambda y: y.chunk(3, dim=-1),
    lambda y: torch.chunk(y, 2, dim=0),
    lambda y: y.split(2, dim=-1),
    lambda y: torch.split(y, [1, 5], dim=-1),
    lambda y: y.unbind(0),
    lambda y: torch.tensor_split(y, 3, dim=-1),
])
def test_split_ops_carry_the_variance_to_each_output(op):
    x, v = _noisy((4, 6))
    with variance_flow():
        parts = op(x)
    expected = op(v)
    assert len(parts) == len(expected)
    for part, ref in zip(parts, expected):
        torch.testing.assert_close(get_variance(part).expand_as(part), ref)


@pytest.mark.parametrize("std_mode", ["layer", "weight"])
def test_chunk_of_a_bayesian_layer_reaches_each_neuron(std_mode):
    torch.manual_seed(0)
    fc = sb.BayesLinear(5, 8, std_mode=std_mode, std=0.3)
    x = torch.rand(3, 5)
    with variance_flow():
        a, b = fc(x).chunk(2, dim=-1)
    full = fc.output_variance(x)
    torch.testing.assert_close(get_variance(a).expand_as(a), full[:, :4])
    torch.testing.assert_close(get_variance(b).expand_as(b), full[:, 4:])
    # the layer's std gets a gradient through both halves
    sb.IWSTSpike("st")(b).sum().backward()
    assert fc.std_rho.grad is not None and fc.std_rho.grad.abs().sum() > 0


@pytest.mark.parametrize("rnn, name", [(nn.GRU, "gru"), (nn.LSTM, "lstm"), (nn.RNN, "rnn")])
def test_recurrent_torch_module_between_layer_and_neuron_raises(rnn, name):
    fc, cell, lif = sb.BayesLinear(4, 6), rnn(6, 6), sb.LIF()
    with variance_flow():
        out = cell(fc(torch.rand(2, 3, 4)))[0]
    with pytest.raises(VarianceFlowError, match=name):
        lif.run(out)


# --------------------------------------------------------------------------- mean mode
class _Between(nn.Module):
    """``BayesLinear -> op -> IWSTSpike`` (tracked): ``op`` sits between layer and neuron."""

    def __init__(self, op, std=0.3, learn_std=True, affine=False):
        super().__init__()
        torch.manual_seed(0)
        self.fc = sb.BayesLinear(8, 6, std=std, learn_std=learn_std)
        self.affine = ChannelAffine(6) if affine else nn.Identity()
        self.op = op
        self.spk = IWSTSpike("st", std=0.1)
        track_variance(self)

    def forward(self, x):
        return self.spk(self.op(self.affine(self.fc(x))))


def _raises_in(model, x, mode):
    with torch.no_grad(), sb.mode(model, mode):
        try:
            model(x)
        except VarianceFlowError as err:
            return str(err)
    return None


UNRULED = [
    ("tanh", torch.tanh),
    ("softplus", F.softplus),
    ("product of two noisy tensors", lambda v: v * v),
    ("div", lambda v: v / v),
    ("max_pool1d_with_indices",
     lambda v: F.max_pool1d(v[:, None], 2, return_indices=True)[0].repeat(1, 1, 2)[:, 0]),
    ("lp_pool1d", lambda v: F.lp_pool1d(v[:, None], 2, 1)[:, 0]),
    ("gru", lambda v: nn.GRU(6, 6, batch_first=True)(v[:, None])[0][:, 0]),
]


@pytest.mark.parametrize("name, op", UNRULED, ids=[n for n, _ in UNRULED])
def test_op_without_rule_raises_the_same_error_in_mean_and_sample_mode(name, op):
    model, x = _Between(op), torch.rand(4, 8)
    msg_sample, msg_mean = _raises_in(model, x, "sample"), _raises_in(model, x, "mean")
    assert msg_sample is not None and name in msg_sample
    assert msg_mean == msg_sample
    # after a ChannelAffine (a pass-through that attaches the variance itself) as well
    assert _raises_in(_Between(op, affine=True), x, "mean") == msg_sample


RULED = [
    ("flatten / view", lambda v: v.flatten(1).view(v.shape)),
    ("chunk + cat", lambda v: torch.cat(v.chunk(2, -1), -1)),
    ("avg_pool", lambda v: F.avg_pool1d(v[:, None], 1)[:, 0]),
    ("max_pool", lambda v: F.max_pool1d(v[:, None], 1)[:, 0]),
    ("adaptive_max_pool", lambda v: F.adaptive_max_pool1d(v[:, None], 6)[:, 0]),
    ("dropout", lambda v: F.dropout(v, 0.5, training=True)),
    ("batch_norm", lambda v: F.batch_norm(v, None, None, training=True)),
    ("affine", lambda v: 2.0 * v - 1.0),
    ("pad", lambda v: F.pad(v, (1, 1))[:, 1:-1]),
    ("reflect pad", lambda v: F.pad(v[:, None], (1, 1), mode="reflect")[:, 0, 1:-1]),
    ("group_norm", lambda v: F.group_norm(v, 2)),
    ("layer_norm", lambda v: F.layer_norm(v, (6,))),
    ("instance_norm", lambda v: F.instance_norm(v[:, None])[:, 0]),
    ("interpolate", lambda v: F.interpolate(v[:, None], size=3, mode="linear")[:, 0]),
    ("pixel_shuffle", lambda v: torch.cat([F.pixel_shuffle(v[:, :4, None, None], 2).flatten(1),
                                           v[:, 4:]], 1)),
    ("conv_transpose", lambda v: F.conv_transpose1d(v[:, None], torch.ones(1, 1, 2))[:, 0]),
]


@pytest.mark.parametrize("name, op", RULED, ids=[n for n, _ in RULED])
def test_ops_with_rules_pass_in_mean_mode_and_outputs_are_unchanged(name, op):
    model, x = _Between(op), torch.rand(4, 8)
    assert _raises_in(model, x, "mean") is None and _raises_in(model, x, "sample") is None
    plain = _Between(op)
    untrack_variance(plain)  # no flow, no probe: the mean-mode values are the same
    with torch.no_grad(), sb.mode(model, "mean"), sb.mode(plain, "mean"):
        torch.manual_seed(1)
        a = model(x)
        torch.manual_seed(1)
        assert torch.equal(a, plain(x))


def test_probe_only_where_sample_mode_carries_noise():
    x = torch.rand(4, 8)
    silent = _Between(torch.tanh, std=0.0, learn_std=False)  # a layer without noise
    assert _raises_in(silent, x, "sample") is None and _raises_in(silent, x, "mean") is None

    class AfterSpike(nn.Module):  # spikes carry no noise: any op may follow them
        def __init__(self):
            super().__init__()
            self.fc, self.spk1 = sb.BayesLinear(8, 6, std=0.3), IWSTSpike("st", std=0.1)
            self.spk2 = IWSTSpike("st", std=0.1)
            track_variance(self)

        def forward(self, v):
            return self.spk2(torch.tanh(self.spk1(self.fc(v))) - 0.5)

    model = AfterSpike()
    assert _raises_in(model, x, "sample") is None and _raises_in(model, x, "mean") is None


def test_mean_mode_probe_through_a_registered_passthrough():
    class Scale(nn.Module):  # attaches the variance itself, outside the flow
        def forward(self, v):
            var = raw_variance(v)
            with no_variance_flow():
                out = 3.0 * v
            return attach_variance(out, var)

    x = torch.rand(4, 8)
    assert _raises_in(_Between(nn.Sequential(Scale(), nn.Tanh())), x, "mean") is None
    moments.register_variance_passthrough(Scale)
    try:
        assert "tanh" in _raises_in(_Between(nn.Sequential(Scale(), nn.Tanh())), x, "mean")
    finally:
        moments._PASSTHROUGH.discard(f"{Scale.__module__}.{Scale.__qualname__}")
    with pytest.raises(TypeError, match="nn.Module subclass"):
        moments.register_variance_passthrough(int)


# --------------------------------------------------------------------------- check
def test_check_variance_flow_core_model():
    model, x = _Between(torch.tanh), torch.rand(4, 8)
    with pytest.raises(VarianceFlowError, match=r"'tanh'.*check_variance_flow"):
        sb.check_variance_flow(model, x)
    report = sb.check_variance_flow(_Between(lambda v: v.flatten(1) * 2.0), x)
    assert report.ops == {"flatten": 1, "mul": 1} and report.unknown == {}
    assert report.tracked and report.bayesian_layers == 1
    with pytest.raises(TypeError, match="nn.Module"):
        sb.check_variance_flow(lambda v: v, x)


def test_check_variance_flow_refuses_an_unconverted_model():
    """An snnTorch / SpikingJelly model not converted has no noise to follow: the check
    returned an empty report, as for a model whose flow is sound, silently."""
    snn = pytest.importorskip("snntorch")
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import layer, neuron

    snn_net = nn.Sequential(nn.Linear(8, 6), snn.Leaky(beta=0.9, init_hidden=True))
    sj_net = nn.Sequential(layer.Linear(8, 6), neuron.LIFNode())
    for net, adapter in ((snn_net, "snntorch"), (sj_net, "spikingjelly")):
        with pytest.raises(ValueError, match=r"no SBNN layer or spike function.*"
                                             rf"sbnn_addons\.{adapter}\.to_sbnn"):
            sb.check_variance_flow(net, torch.rand(2, 8))
    from sbnn_addons.snntorch import to_sbnn

    assert sb.check_variance_flow(to_sbnn(snn_net), torch.rand(2, 8)).bayesian_layers == 1


def test_check_variance_flow_untracked_model_is_left_untracked():
    model = nn.Sequential(sb.BayesLinear(8, 6, std=0.3), nn.Flatten(), nn.Tanh(),
                          IWSTSpike("st", std=0.1))
    hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks)  # noqa: E731
                        for m in model.modules())
    with pytest.raises(VarianceFlowError, match="'tanh'"):
        sb.check_variance_flow(model, torch.rand(4, 8))
    assert hooks() == 0 and not hasattr(model, "_sbnn_flow_handles")
    report = sb.check_variance_flow(model[:2], torch.rand(4, 8))
    assert not report.tracked and report.ops == {"flatten": 1}


def test_check_variance_flow_reports_unknown_ops_that_reach_no_neuron():
    class Readout(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = sb.BayesLinear(8, 3, std=0.3)
            track_variance(self)

        def forward(self, v):
            return torch.log_softmax(self.fc(v), -1)

    report = sb.check_variance_flow(Readout(), torch.rand(4, 8))
    assert report.unknown == {"log_softmax": 1}


def test_check_variance_flow_restores_state_snntorch():
    snn = pytest.importorskip("snntorch")
    from sbnn_addons.snntorch import to_sbnn

    net = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), snn.Leaky(beta=0.9, init_hidden=True),
                        nn.Linear(6, 3), snn.Leaky(beta=0.9, init_hidden=True, output=True))
    model = to_sbnn(net, batchnorm="keep")
    model.train()
    sb.set_mode(model, "sample")
    with torch.no_grad():
        model(torch.rand(4, 8) * 3)  # mid-sequence: a membrane is left behind
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mems = [m.mem for m in model.modules() if isinstance(m, snn.Leaky)]
    report = sb.check_variance_flow(model, torch.rand(4, 8))
    assert report.ops and report.unknown == {}
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN stats, membranes
    assert [m.mem for m in model.modules() if isinstance(m, snn.Leaky)] == mems
    assert model.training and sb.get_mode(model) == "sample"


def test_check_variance_flow_spikingjelly_multistep():
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import functional, layer, neuron

    from sbnn_addons.spikingjelly import to_sbnn

    class Net(nn.Module):
        def __init__(self, between):
            super().__init__()
            self.fc = layer.Linear(8, 6, step_mode="m")
            self.between = between
            self.lif = neuron.LIFNode(step_mode="m")

        def forward(self, x):
            return self.lif(self.between(self.fc(x)))

    x = torch.rand(3, 4, 8)
    ok = to_sbnn(Net(nn.Identity()))
    with torch.no_grad():
        ok(x)
    v = [n.v for n in ok.modules() if isinstance(n, neuron.LIFNode)]
    report = sb.check_variance_flow(ok, x)
    assert report.bayesian_layers == 1 and report.unknown == {}
    assert [n.v for n in ok.modules() if isinstance(n, neuron.LIFNode)] == v  # memories kept
    bad = to_sbnn(Net(nn.Tanh()))
    with pytest.raises(VarianceFlowError, match="'tanh'"):
        sb.check_variance_flow(bad, x)
    with torch.no_grad(), sb.mode(bad, "mean"), pytest.raises(VarianceFlowError, match="'tanh'"):
        functional.reset_net(bad)
        bad(x)  # and in mean mode itself, not only in sample mode


def test_converters_check_the_variance_flow_with_example_input():
    snn = pytest.importorskip("snntorch")
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import layer, neuron

    from sbnn_addons import snntorch as sbnn_snn
    from sbnn_addons import spikingjelly as sbnn_sj

    def snn_net(between):
        return nn.Sequential(nn.Linear(8, 6), between, snn.Leaky(beta=0.9, init_hidden=True))

    x = torch.rand(4, 8)
    sbnn_snn.to_sbnn(snn_net(nn.Dropout(0.2)), example_input=x)  # ruled ops: no error
    original = snn_net(nn.Tanh())
    with pytest.raises(VarianceFlowError, match="'tanh'.*check_variance_flow"):
        sbnn_snn.to_sbnn(original, example_input=x)
    assert not any(sb.layers.is_bayesian(m) for m in original.modules())  # a copy failed
    sbnn_snn.to_sbnn(snn_net(nn.Tanh()))  # without example_input: found at the first call

    def sj_net(between):
        return nn.Sequential(layer.Linear(8, 6, step_mode="m"), between,
                             neuron.LIFNode(step_mode="m"))

    xs = torch.rand(3, 4, 8)
    model = sbnn_sj.to_sbnn(sj_net(nn.Identity()), example_input=xs)
    assert all(n.v == 0.0 for n in model.modules() if isinstance(n, neuron.LIFNode))
    with pytest.raises(VarianceFlowError, match="'tanh'"):
        sbnn_sj.to_sbnn(sj_net(nn.Tanh()), example_input=xs)


def test_an_operand_combined_with_itself_is_one_noise():
    """``o + o`` is ``2 o`` (variance x4, as ``2 * o``), ``o - o`` is exactly 0 (variance
    0), not two independent draws; the per-layer std's factored variance too."""
    torch.manual_seed(0)
    for std_mode in ("layer", "weight"):
        layer = sb.BayesLinear(6, 4, std=0.3, std_mode=std_mode)
        o = layer(torch.rand(3, 6))
        var = get_variance(o)
        torch.testing.assert_close(get_variance(o + o), 4 * var)
        torch.testing.assert_close(get_variance(o.add(o, alpha=2.0)), 9 * var)
        torch.testing.assert_close(get_variance(o - o), torch.zeros_like(var))
        for combined in (o + o.clone(), o + 0.5 * o, o - o.mean(-1, keepdim=True)):
            assert isinstance(get_variance(combined), UnknownVariance)


def _correlated_cases():
    return {
        "a + 0.5 a": lambda a, b: a + 0.5 * a,
        "a + a.clone()": lambda a, b: a + a.clone(),
        "a - a.detach()": lambda a, b: a - a.detach(),
        "a - a.mean(-1)": lambda a, b: a - a.mean(-1, keepdim=True),
        "(a + b) - b": lambda a, b: (a + b) - b,
        "a + chunk of a": lambda a, b: a[:, :2] + a.chunk(2, dim=1)[1],
        "in place a2 += a": lambda a, b: (2 * a).add_(a),
        "cat then add": lambda a, b: torch.cat([a, b], 1)[:, :4] + a,
    }


def _repeated_cases():
    return {
        "cat([a, a]).sum": lambda a: torch.cat([a, a], 1).sum(1, keepdim=True).expand_as(a),
        "stack([a, 2a]).sum": lambda a: torch.stack([a, 2 * a]).sum(0),
        "repeat.mean": lambda a: a.repeat(1, 3).mean(1, keepdim=True) + 0 * a.detach(),
        "expand over time.mean": lambda a: a.unsqueeze(0).expand(4, *a.shape).mean(0),
        "repeat.avg_pool": lambda a: F.avg_pool1d(a.repeat(1, 2).unsqueeze(1), 2)
                                                  .squeeze(1),
        "nearest upsample.sum": lambda a: F.interpolate(a[:, None], scale_factor=2).sum(-1)
                                          + 0 * a.detach(),
        "linear upsample.avg_pool": lambda a: F.avg_pool1d(
            F.interpolate(a[:, None], scale_factor=2, mode="linear"), 2)[:, 0],
        "linear interpolation twice": lambda a: F.interpolate(
            F.interpolate(a[:, None], size=6, mode="linear"), size=4, mode="linear")[:, 0],
        "conv_transpose.mean": lambda a: F.conv_transpose1d(a[:, None], torch.ones(1, 1, 2))
                                         .mean(-1) + 0 * a.detach(),
        "overlapping avg_pool.avg_pool": lambda a: F.avg_pool1d(
            F.avg_pool1d(a[:, None], 3, 1, 1), 2)[:, 0],
        "overlapping max_pool.mean": lambda a: F.max_pool1d(a[:, None], 3, 1).mean(-1)
                                               + 0 * a.detach(),
        "adaptive 4 -> 3.sum": lambda a: F.adaptive_avg_pool1d(a[:, None], 3).sum(-1)
                                         + 0 * a.detach(),
        "reflect pad.sum": lambda a: F.pad(a[:, None], (1, 1), mode="reflect").sum(-1)
                                     + 0 * a.detach(),
    }


@pytest.mark.parametrize("case", sorted(_repeated_cases()))
@pytest.mark.parametrize("mode", ["sample", "mean"])
def test_a_sum_over_repeated_elements_is_unknown_and_raises_at_the_neuron(case, mode):
    """A tensor that holds one draw's element several times (cat / stack of the same
    tensor, repeat, expand) has dependent elements: the sum / average rule would add their
    variances (``cat([a, a]).sum()``: 2 var instead of 4 var). The neuron it reaches
    raises, in ``sample`` and ``mean`` mode; a repeated tensor that feeds the neuron
    element by element (a static output repeated over time) keeps its variance."""
    fn = _repeated_cases()[case]

    class Net(nn.Module):
        def __init__(self, f):
            super().__init__()
            self.fa, self.f = sb.BayesLinear(5, 4), f
            self.spike = IWSTSpike("st")

        def forward(self, x):
            return self.spike(self.f(self.fa(x)))

    net = track_variance(Net(fn))
    with sb.mode(net, mode), pytest.raises(VarianceFlowError, match="several times"):
        net(torch.rand(3, 5))
    ok = track_variance(Net(lambda a: a.unsqueeze(0).repeat(3, 1, 1) * 2))
    with sb.mode(ok, mode):
        ok(torch.rand(3, 5))
    o = ok.fa(torch.rand(3, 5))
    torch.testing.assert_close(get_variance(torch.cat([o, o], 1)),
                               torch.cat([get_variance(o).expand_as(o)] * 2, 1))


@pytest.mark.parametrize("case", sorted(_correlated_cases()))
@pytest.mark.parametrize("mode", ["sample", "mean"])
def test_a_sum_of_correlated_tensors_is_unknown_and_raises_at_the_neuron(case, mode):
    """Two summed tensors that share one layer's draw are correlated: the independent-sum
    rule would give a wrong variance (``a + 0.5 a``: 1.25 var instead of 2.25 var). Their
    sum carries an UnknownVariance, and the spike function it reaches raises, in ``sample``
    mode and (through the probe of a tracked model) in ``mean`` mode."""
    fn = _correlated_cases()[case]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fa, self.fb = sb.BayesLinear(5, 4), sb.BayesLinear(5, 4)
            self.spike = IWSTSpike("st")

        def forward(self, x):
            return self.spike(fn(self.fa(x), self.fb(x)))

    net = track_variance(Net())
    with sb.mode(net, mode), pytest.raises(VarianceFlowError, match="share one Bayesian"):
        net(torch.rand(3, 5))


def test_independent_draws_still_add_and_the_membrane_recurrence_is_exact():
    """Sums of independent draws keep their rule; a recurrence ``v = beta v + I_t`` over
    fresh layer outputs is exact (Monte Carlo over the weight posterior, fixed seed)."""
    torch.manual_seed(0)
    layer = sb.BayesLinear(4, 3, std=0.4, std_mode="weight").double()
    x = torch.rand(6, 2, 4, dtype=F64)
    v = torch.zeros(2, 3, dtype=F64)
    for t in range(6):
        v = 0.8 * v + layer(x[t])
    # independent reference: per step a fresh weight sample, 200k draws
    n = 200_000
    with torch.no_grad():
        w = layer.weight + layer.std * torch.randn(6, n, 3, 4, dtype=F64)
        b = layer.bias
    ref = torch.zeros(n, 2, 3, dtype=F64)
    for t in range(6):
        ref = 0.8 * ref + torch.einsum("nok,bk->nbo", w[t], x[t]) + b
    torch.testing.assert_close(get_variance(v), ref.var(0), rtol=0.02, atol=1e-4)
    torch.testing.assert_close(get_variance(layer(x[0]) + layer(x[0])),
                               2 * get_variance(layer(x[0])))


@pytest.mark.parametrize("func, shape, size", [
    (F.adaptive_avg_pool1d, (2, 3, 9), 4),
    (F.adaptive_avg_pool2d, (2, 3, 7, 5), (3, 2)),
    (F.adaptive_avg_pool2d, (2, 3, 8, 8), 1),
    (F.adaptive_avg_pool2d, (2, 3, 6, 6), (None, 4)),
    (F.adaptive_avg_pool3d, (1, 2, 5, 4, 3), (2, 3, 2)),
])
def test_adaptive_avg_pool_variance_is_exact(func, shape, size):
    """Adaptive average pooling (windows of varying size where the lengths do not
    divide): the variance equals the exact ``W^2 var`` of the pooling's weights, also
    through nn.AdaptiveAvgPool2d in front of a spike function."""
    x, var = _noisy(shape)
    got = get_variance(func(x, size))
    want = _pooling_weights_variance(lambda t, output_size: func(t, output_size),
                                     (1, *shape[1:]), var[:1], output_size=size)
    torch.testing.assert_close(got[:1], want)
    if func is F.adaptive_avg_pool2d:
        spike = IWSTSpike("st")
        spike(nn.AdaptiveAvgPool2d(size)(x))  # a rule: no VarianceFlowError


def test_scaled_variance_repr_does_not_warn():
    """The repr of a layer's factored variance (its scale requires grad) printed a
    PyTorch warning about converting a tensor that requires grad to a scalar."""
    import warnings

    var = sb.moments.raw_variance(sb.BayesLinear(4, 3, std=0.5)(torch.rand(2, 4)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert repr(var) == f"ScaledVariance(base=(2, 1), scale={0.25:g})"


def test_cast_to_float16_keeps_a_small_variance():
    """A Bayesian layer's output cast to float16 (``.half()``, ``.to(torch.float16)``):
    its variance goes to float32, as a float16 layer forms it (cast to float16, a
    variance below 6e-8 was 0 and the noise vanished); other casts follow the mean."""
    torch.manual_seed(0)
    fc = sb.BayesLinear(4, 3, std=1e-4)
    y = fc(torch.ones(2, 4))
    want = sb.get_variance(y).expand_as(y)
    for cast in (lambda t: t.half(), lambda t: t.to(torch.float16)):
        var = sb.get_variance(cast(y))
        assert var.dtype == torch.float32
        torch.testing.assert_close(var.expand_as(y), want)
    assert sb.get_variance(y.bfloat16()).dtype == torch.bfloat16
    assert sb.get_variance(y.double()).dtype == torch.float64


class _CoreNet(nn.Module):
    """A Bayesian layer feeding a core LIF over a short time loop."""

    def __init__(self):
        super().__init__()
        self.fc = sb.BayesLinear(8, 6)
        self.lif = sb.LIF(beta=0.9, spike_fn=sb.IWSTSpike("st"))
        self.head = sb.BayesLinear(6, 6)

    def forward(self, x, use_head=True):
        state, out = None, []
        for t in range(x.shape[0]):
            spk, state = self.lif(self.fc(x[t]), state)
            out.append(spk)
        if not use_head:
            self.head(torch.stack(out))  # a branch whose output nothing uses
        return torch.stack(out)


_STRIPS = {
    "as_subclass": lambda x: (x.as_subclass(torch.Tensor),),
    "data": lambda x: (x.data,),
    "tolist": lambda x: (torch.tensor(x.tolist()),),
    "Tensor()": lambda x: (torch.Tensor(x),),
}


@pytest.mark.parametrize("how", list(_STRIPS))
def test_a_neuron_pre_hook_that_strips_the_variance_raises_naming_the_layer(how):
    net = sb.track_variance(_CoreNet()).train()
    net.lif.register_forward_pre_hook(lambda mod, args: _STRIPS[how](args[0]) + args[1:])
    with pytest.raises(VarianceFlowError, match=r"'fc'.*reached no spiking neuron"):
        net(torch.rand(3, 4, 8))


@pytest.mark.parametrize("how", ["data", "tolist"])
def test_an_evaluation_whose_layer_output_escaped_the_flow_raises(how):
    """Without gradients (a sample-mode evaluation, as the Monte Carlo predictions run)
    a layer output taken out of the flow by .data or .tolist() reaches the neuron without
    its variance: the spikes would be drawn without the weight noise."""
    net = sb.track_variance(_CoreNet()).eval()
    net.lif.register_forward_pre_hook(lambda mod, args: _STRIPS[how](args[0]) + args[1:])
    with torch.no_grad(), pytest.raises(VarianceFlowError, match=r"'fc'.*left the variance"):
        net(torch.rand(3, 4, 8))
    with torch.no_grad(), sb.mode(net, "mean"):
        net(torch.rand(3, 4, 8))  # no noise to lose


def test_a_bayesian_layer_run_inside_vmap_raises_naming_the_transform():
    """torch.vmap returns plain tensors: the variance of a Bayesian layer run inside one
    (SpikingJelly's t_last_seq_to_ann_forward) vanished silently, the spikes after it
    fired without the weight noise and std_rho got no gradient, in an evaluation without
    gradients too. A model whose whole forward runs inside the transform keeps its
    variance and is not reported."""

    class TimeLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = sb.BayesLinear(8, 6)
            self.spike = sb.IWSTSpike("st")

        def forward(self, x):  # [N, 8, T]: the layer mapped over the last dimension
            return self.spike(torch.vmap(self.fc, in_dims=-1, out_dims=-1)(x))

    torch.manual_seed(0)
    net = sb.track_variance(TimeLast()).train()
    x = torch.rand(4, 8, 3)
    with pytest.raises(VarianceFlowError, match=r"'fc' \(it ran inside a torch.vmap"):
        net(x)
    with torch.no_grad(), pytest.raises(VarianceFlowError, match="torch.vmap"):
        net(x)  # an evaluation: the spikes would be drawn without the weight noise
    with torch.no_grad(), sb.mode(net, "mean"):
        net(x)  # no noise to lose
    inner = sb.track_variance(nn.Sequential(sb.BayesLinear(8, 6), sb.IWSTSpike("st"))).train()
    out = torch.vmap(inner, in_dims=-1, out_dims=-1, randomness="different")(x)
    assert out.shape == (4, 6, 3)


def test_dropped_noise_check_raises_no_false_alarm():
    net = sb.track_variance(_CoreNet()).train()
    x = torch.rand(3, 4, 8)
    net(x, use_head=False).sum().backward()  # an unused branch
    assert net.fc.std_rho.grad.abs().sum() > 0
    net.lif.register_forward_pre_hook(lambda mod, args: (args[0].detach(), *args[1:]))
    net(x)  # detach keeps the variance (the noise acts, the gradient is stopped)
    net.lif.register_forward_pre_hook(
        lambda mod, args: (args[0].as_subclass(torch.Tensor), *args[1:]))
    with torch.no_grad():
        net(x)
    net.eval()
    net(x)
    with sb.mode(net, "mean"):
        net.train()
        net(x)


def test_a_readout_dropped_with_plain_is_not_reported():
    class Readout(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = sb.BayesLinear(8, 3)

        def forward(self, x):
            return sb.moments.plain(self.fc(x))

    net = sb.track_variance(Readout()).train()
    net(torch.rand(4, 8)).sum().backward()


# ------------------------------------ normalisations, interpolation, shuffles, conv_transpose
def _frozen_norm(kind, mean, weight, bias):
    """The normalisation ``kind`` with the statistics of ``mean`` (the noise-free signal)
    held fixed: the affine map the rules assume, ``(a - mu) * w / sqrt(s^2 + eps) + b``."""
    n, c = mean.shape[:2]
    eps = torch.finfo(mean.dtype).eps if kind == "rms_norm" else 1e-5
    if kind == "group_norm":  # 2 groups
        g = mean.reshape(n, 2, -1)
        mu = g.mean(-1).repeat_interleave(c // 2, 1).view(n, c, 1, 1)
        s2 = g.var(-1, unbiased=False).repeat_interleave(c // 2, 1).view(n, c, 1, 1)
        w, b = weight.view(1, c, 1, 1), bias.view(1, c, 1, 1)
    elif kind == "instance_norm":
        mu, s2 = mean.mean((2, 3), keepdim=True), mean.var((2, 3), unbiased=False, keepdim=True)
        w, b = weight.view(1, c, 1, 1), bias.view(1, c, 1, 1)
    elif kind == "rms_norm":  # over [C, H, W]
        mu, s2 = 0.0, (mean * mean).mean((1, 2, 3), keepdim=True)
        w, b = weight, bias
    else:  # layer_norm over [C, H, W]
        mu = mean.mean((1, 2, 3), keepdim=True)
        s2 = mean.var((1, 2, 3), unbiased=False, keepdim=True)
        w, b = weight, bias
    k = w / torch.sqrt(s2 + eps)  # a batch of draws [S * N, ...] is S copies of [N, ...]
    return lambda a: ((a.view(-1, *mean.shape) - mu) * k + b).view(a.shape)


_AFFINE = torch.Generator().manual_seed(7)
_W_T = torch.randn(4, 3, 2, 3, generator=_AFFINE, dtype=F64)  # conv_transpose2d weight
_GAMMA = torch.randn(4, generator=_AFFINE, dtype=F64)
_BETA = torch.randn(4, generator=_AFFINE, dtype=F64)
_GAMMA_CHW = torch.randn(4, 3, 3, generator=_AFFINE, dtype=F64)
_NEW_OPS = {
    "nearest x2": lambda v: F.interpolate(v, scale_factor=2),
    "nearest-exact to 5x4": lambda v: F.interpolate(v, size=(5, 4), mode="nearest-exact"),
    "bilinear x2": lambda v: F.interpolate(v, scale_factor=2, mode="bilinear"),
    "bilinear aligned to 5x7": lambda v: F.interpolate(v, size=(5, 7), mode="bilinear",
                                                       align_corners=True),
    "bicubic x1.5": lambda v: F.interpolate(v, scale_factor=1.5, mode="bicubic"),
    "bilinear antialias down": lambda v: F.interpolate(v, size=(2, 2), mode="bilinear",
                                                       antialias=True),
    "area to 2x2": lambda v: F.interpolate(v, size=(2, 2), mode="area"),
    "nn.Upsample bilinear": nn.Upsample(scale_factor=2, mode="bilinear"),
    "linear (1-d)": lambda v: F.interpolate(v.flatten(2), scale_factor=2, mode="linear"),
    "pixel_shuffle": nn.PixelShuffle(2),
    "pixel_unshuffle": lambda v: F.pixel_unshuffle(F.pad(v, (0, 1, 0, 1)), 2),
    "ConstantPad2d(0.5)": nn.ConstantPad2d((1, 0, 2, 1), 0.5),
    "ReflectionPad2d": nn.ReflectionPad2d((1, 0, 2, 1)),
    "ReplicationPad2d": nn.ReplicationPad2d(1),
    "circular pad": lambda v: F.pad(v, (2, 1, 1, 0), mode="circular"),
    "conv_transpose2d": lambda v: F.conv_transpose2d(v, _W_T, torch.ones(3, dtype=F64),
                                                      stride=(2, 1), padding=(0, 1)),
    "conv_transpose1d grouped": lambda v: F.conv_transpose1d(
        v.flatten(2), _W_T[:, :1, 0], stride=2, groups=2, output_padding=1),
}


@pytest.mark.parametrize("name", sorted(_NEW_OPS))
def test_linear_op_variance_is_the_op_with_squared_coefficients(name):
    """Interpolation (every mode), pixel (un)shuffle, constant padding and a noise-free
    transposed convolution are linear maps ``y = W x + b`` of the layer output: their
    rule gives ``var(y) = W^2 var(x)`` exactly (W read from the op applied to the basis
    vectors, rtol 1e-12); and on the factored variance of a per-layer std too."""
    op = _NEW_OPS[name]
    shape = (1, 4, 3, 3)
    x, v = _noisy(shape)
    y = op(x)
    n = math.prod(shape)
    basis = torch.eye(n, dtype=F64).view(n, *shape[1:])
    weights = (op(basis) - op(torch.zeros(shape, dtype=F64))).reshape(n, -1).t()
    want = ((weights**2) @ v.reshape(-1)).view(y.shape)
    torch.testing.assert_close(get_variance(y), want, rtol=1e-12, atol=1e-14)
    scale = torch.tensor(0.3, dtype=F64)
    xs = attach_variance(moments.plain(x).clone(), ScaledVariance(v, scale))
    ys = op(xs)
    assert isinstance(raw_variance(ys), ScaledVariance)
    torch.testing.assert_close(get_variance(ys), 0.3 * want, rtol=1e-12, atol=1e-14)


def _monte_carlo(op, sample_op, S=20_000, seed=0):
    """BayesLinear(6, 36) viewed as [3, 4, 3, 3] -> op: the layer, the op's output and the
    empirical variance of ``sample_op(mean)`` (a function of the layer's mean output) over
    S explicit draws of the weights. Each output unit has a weight row of its own, so the
    layer outputs of one example are exactly the independent Gaussians the rules assume."""
    torch.manual_seed(seed)
    fc = sb.BayesLinear(6, 36, std=0.3, std_mode="weight").double()
    x = torch.rand(3, 6, dtype=F64)
    a = fc(x).view(3, 4, 3, 3)
    y = op(a)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        w = fc.weight + fc.std * torch.randn((S, 36, 6), generator=gen, dtype=F64)
        draws = (torch.einsum("bi,soi->sbo", x, w) + fc.bias).reshape(S * 3, 4, 3, 3)
        got = sample_op(moments.plain(a).detach())(draws).reshape(S, *y.shape).var(0)
    return fc, y, got


def _assert_within_5_se(got, want, S=20_000):
    want = want.detach()
    assert torch.all((got - want).abs() <= 5 * want * math.sqrt(2 / (S - 1)) + 1e-12)


@pytest.mark.parametrize("name", ["bilinear x2", "bicubic x1.5", "pixel_shuffle",
                                  "conv_transpose2d", "ConstantPad2d(0.5)", "area to 2x2"])
def test_linear_op_variance_matches_monte_carlo_over_the_weights(name):
    """The propagated variance at the neuron input equals the variance of the op applied
    to explicit weight draws (20k, fixed seed; tolerance 5 standard errors of a Gaussian
    variance, var sqrt(2 / (S - 1)))."""
    op = _NEW_OPS[name]
    _, y, got = _monte_carlo(op, lambda mean: op)
    _assert_within_5_se(got, get_variance(y).expand_as(y))


def _norm_case(name):
    """``(op, kind, weight, bias)`` of a normalisation test case."""
    if name == "nn.GroupNorm":
        gn = nn.GroupNorm(2, 4).double()
        with torch.no_grad():
            gn.weight.copy_(_GAMMA)
            gn.bias.copy_(_BETA)
        return gn, "group_norm", _GAMMA, _BETA
    if name == "layer_norm":
        bias = _BETA.mean() * _GAMMA_CHW
        return (lambda a: F.layer_norm(a, (4, 3, 3), _GAMMA_CHW, bias)), name, _GAMMA_CHW, bias
    if name == "group_norm":
        return (lambda a: F.group_norm(a, 2, _GAMMA, _BETA)), name, _GAMMA, _BETA
    if name == "nn.RMSNorm":
        rms = nn.RMSNorm((4, 3, 3)).double()
        with torch.no_grad():
            rms.weight.copy_(_GAMMA_CHW)
        return rms, "rms_norm", _GAMMA_CHW, torch.zeros_like(_GAMMA_CHW)
    return (lambda a: F.instance_norm(a, weight=_GAMMA, bias=_BETA)), name, _GAMMA, _BETA


@pytest.mark.parametrize("name", ["group_norm", "nn.GroupNorm", "layer_norm", "instance_norm",
                                  "nn.RMSNorm"])
def test_normalisation_scales_the_variance_by_its_scale_from_the_mean_signal(name):
    """GroupNorm / LayerNorm / InstanceNorm / RMSNorm, like BatchNorm in ``"keep"`` mode:
    the statistics are those of the mean signal, held fixed, so the variance is scaled by
    ``(w / sqrt(s^2 + eps))^2``: exactly (rtol 1e-12), and equal to the Monte Carlo
    variance of that fixed-statistics map (whose value at the mean is PyTorch's own
    normalisation) over explicit weight draws; the layer's std gets a gradient."""
    op, kind, weight, bias = _norm_case(name)
    x, v = _noisy((3, 4, 3, 3))
    mean = moments.plain(x)
    frozen = _frozen_norm(kind, mean, weight.detach(), bias.detach())
    torch.testing.assert_close(frozen(mean), op(mean).detach(), rtol=1e-10, atol=1e-12)
    scale = (frozen(mean + 1.0) - frozen(mean)) ** 2  # (w / sqrt(s^2 + eps))^2
    torch.testing.assert_close(get_variance(op(x)), v * scale, rtol=1e-12, atol=0)
    fc, y, got = _monte_carlo(
        op, lambda m: _frozen_norm(kind, m, weight.detach(), bias.detach()))
    _assert_within_5_se(got, get_variance(y).expand_as(y))
    IWSTSpike("st")(y - 0.5).sum().backward()
    assert fc.std_rho.grad.abs().sum() > 0


def test_a_sum_after_overlapping_pooling_windows_raises_and_disjoint_ones_still_add():
    """Pooling windows that overlap (stride below the window, an adaptive pooling whose
    output length does not divide the input) give outputs that share elements: a second
    pooling or a mean over them added their variances as if independent (avg_pool(3, 1, 1)
    then mean over 6x6: 0.0013 instead of the Monte Carlo 0.0096), silently. Now the neuron
    raises; disjoint windows keep their exact variance, and overlapping ones still feed a
    neuron element by element."""
    x, v = _noisy((2, 3, 6, 6))
    spike = IWSTSpike("st")
    for op in (lambda a: F.avg_pool2d(a, 3, 1, 1).mean((2, 3)),
               lambda a: F.avg_pool2d(nn.MaxPool2d(3, 2, 1)(a), 2),
               lambda a: F.adaptive_avg_pool2d(F.adaptive_avg_pool2d(a, 4), 1)):
        with pytest.raises(VarianceFlowError, match="overlapping windows"):
            spike(op(x))
    y = F.avg_pool2d(F.avg_pool2d(x, 2), 3)  # disjoint windows: 1/4 then 1/9 of a sum
    torch.testing.assert_close(get_variance(y), F.avg_pool2d(v, 6) / 36, rtol=1e-12, atol=0)
    z = F.adaptive_avg_pool2d(x, 3).mean((2, 3))
    torch.testing.assert_close(get_variance(z), v.mean((2, 3)) / 36, rtol=1e-12, atol=0)
    spike(F.avg_pool2d(x, 3, 1, 1) - 1.0)
    spike(F.max_pool2d(x, 3, 2, 1) - 1.0)


@pytest.mark.parametrize("norm", [nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.LayerNorm([4, 5, 5])])
def test_a_variance_stripped_after_a_normalisation_raises_naming_the_layer(norm):
    """A Bayesian conv -> normalisation -> something that makes a plain tensor of its
    output -> spike: the layer's noise reaches no neuron. After a training-mode BatchNorm
    this went unreported (its rule read the batch statistic with ``plain``, which records
    the draw as dropped on purpose), so the neuron fired without the noise, silently."""
    class Strip(nn.Module):
        def forward(self, x):
            return x.as_subclass(torch.Tensor)

    torch.manual_seed(0)
    model = track_variance(nn.Sequential(BayesConv2d(2, 4, 3, padding=1), norm, Strip(),
                                         IWSTSpike("st")))
    model.train()
    with pytest.raises(VarianceFlowError, match="reached no spiking neuron"):
        model(torch.rand(2, 2, 5, 5))


def test_instance_norm_with_running_statistics_in_eval_scales_by_them():
    """nn.InstanceNorm2d(track_running_stats=True) in eval mode normalises by its running
    variance: the variance is scaled by (w / sqrt(running_var + eps))^2, as batch_norm's."""
    x, v = _noisy((2, 3, 4, 4))
    norm = nn.InstanceNorm2d(3, affine=True, track_running_stats=True).double().eval()
    norm.running_var.copy_(torch.tensor([0.5, 2.0, 4.0]))
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
    scale = (norm.weight / torch.sqrt(norm.running_var + norm.eps)).detach().view(1, 3, 1, 1)
    torch.testing.assert_close(get_variance(norm(x)), v * scale**2, rtol=1e-12, atol=0)


@pytest.mark.parametrize("op", ["mul", "add", "cat", "where"])
def test_spikes_first_keep_the_variance_of_a_noisy_operand(op):
    """An operation whose first tensor operand is a spike function's output (a marked
    SpikeTensor) and a later one carries a variance: the variance rule runs as with the
    operands swapped. SpikeTensor's own __torch_function__ used to run the call first and
    return a plain tensor: ``spikes * k`` or ``spikes + skip`` dropped the variance
    silently (no error; the layer's std lost that path's gradient)."""
    from sbnn_addons.functional import mark_binary

    x, v = _noisy((3, 4))
    spikes = lambda: mark_binary((torch.arange(12, dtype=F64).reshape(3, 4) % 3 == 0).to(F64))  # noqa: E731
    first, swapped = {
        "mul": (lambda s: s * x, lambda s: x * s),
        "add": (lambda s: s + x, lambda s: x + s),
        "cat": (lambda s: torch.cat([s, x]), lambda s: torch.cat([x, s])),
        "where": (lambda s: torch.where(s > 0, s, x), lambda s: torch.where(s <= 0, x, s)),
    }[op]
    out, ref = first(spikes()), swapped(spikes())
    var, ref_var = get_variance(out), get_variance(ref)
    assert isinstance(ref_var, torch.Tensor)
    assert isinstance(var, torch.Tensor), f"{op}: the variance was dropped"
    if op == "cat":  # the blocks in the other order
        ref_var = torch.cat([ref_var[3:], ref_var[:3]])
    assert torch.equal(out, ref if op != "cat" else torch.cat([ref[3:], ref[:3]]))
    assert torch.equal(torch.broadcast_to(var, out.shape),
                       torch.broadcast_to(ref_var, out.shape))
    assert var.sum() > 0 and v.sum() > 0


@pytest.mark.parametrize("std_mode", ["layer", "weight"])
@pytest.mark.parametrize("ops", [("unsqueeze_", (0,)), ("squeeze_", ()), ("t_", ()),
                                 ("transpose_", (0, 1)), ("swapdims_", (1, 0)),
                                 ("swapaxes_", (0, 1))])
def test_in_place_reshape_of_a_carrier_reshapes_its_variance_once(std_mode, ops):
    """``h.unsqueeze_(0)`` on a Bayesian layer's output gave the variance two new
    dimensions (the rule saw the target already reshaped, expanded the compact variance
    to it, then reshaped again: ``h.squeeze_(0)`` then failed inside expand), and
    ``h.t_()`` had no rule (an unknown variance, a neuron raised). The variance of each
    in-place reshape equals that of its out-of-place form, and so does the mean."""
    name, extra = ops
    torch.manual_seed(0)
    fc = sb.BayesLinear(4, 3, std_mode=std_mode, std=0.3)
    x = torch.randn(2, 4) if name != "squeeze_" else torch.randn(1, 4)
    expected = getattr(fc(x), name[:-1])(*extra)
    h = fc(x)
    assert getattr(h, name)(*extra) is h
    assert h.shape == expected.shape and torch.equal(h.as_subclass(torch.Tensor),
                                                     expected.as_subclass(torch.Tensor))
    var, want = sb.get_variance(h), sb.get_variance(expected)
    assert torch.equal(var.expand(h.shape), want.expand(h.shape))
    if name == "unsqueeze_":
        h.squeeze_(0)
        assert torch.equal(sb.get_variance(h).expand(h.shape),
                           sb.get_variance(fc(x)).expand(h.shape))
    with sb.mode(fc, "mean"):
        h = fc(x)
        getattr(h, name)(*extra)
        assert sb.get_variance(h) is None and h.shape == expected.shape


@pytest.mark.parametrize("where", ["spike function", "all modules"])
def test_full_backward_hooks_keep_the_variance_graph(where):
    """A full backward hook on the spike function (or a global one, as gradient monitors
    register, ``register_module_full_backward_hook``) passes the drive through PyTorch's
    ``BackwardHookFunction``, inside whose forward autograd is off: the variance reached
    the spike function cut from its graph, and the Bayesian layer's std got no gradient,
    silently. With the hook, every gradient equals the one without it."""
    import snntorch as snn

    from sbnn_addons.snntorch import reset, to_sbnn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), snn.Leaky(beta=0.9, init_hidden=True),
                        nn.Linear(5, 3), snn.Leaky(beta=0.9, init_hidden=True, output=True))
    model = to_sbnn(net)
    x = torch.rand(4, 6) * 2

    def grads():
        reset(model)
        model.zero_grad()
        torch.manual_seed(1)
        for _ in range(3):
            spk, mem = model(x)
        (mem.sum() + spk.sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    seen = []
    if where == "spike function":
        handle = model[1].spike_grad.register_full_backward_hook(
            lambda mod, gi, go: seen.append(type(mod)))
    else:
        handle = torch.nn.modules.module.register_module_full_backward_hook(
            lambda mod, gi, go: seen.append(type(mod)))
    try:
        hooked = grads()
    finally:
        handle.remove()
    assert seen  # the hook ran
    assert "0.std_rho" in plain and plain.keys() == hooked.keys()
    for name in plain:
        torch.testing.assert_close(hooked[name], plain[name], msg=name)


def _a_rule(func, args, kwargs, out, var_of):
    return var_of(args[0])


@pytest.mark.parametrize("call, match", [
    (lambda: register_variance_rule(_a_rule), r"operation names.*"
                                              r"@register_variance_rule\('cumsum'\)"),
    (lambda: register_variance_rule(torch.cumsum), r"got the function cumsum.*"
                                                   r"register_variance_rule\('cumsum'\)"),
    (lambda: register_variance_rule(), r"at least one operation name"),
    (lambda: register_variance_rule(""), r"operation names"),
    (lambda: register_variance_rule("cumsum")("not a rule"), r"rule must be a callable"),
])
def test_a_misused_rule_registration_is_named(call, match):
    """``@register_variance_rule`` without its names registered the rule under itself
    (replacing the rule by the decorator), ``register_variance_rule(torch.cumsum)`` under
    the function object, which no lookup by name finds: the operation stayed unknown and
    the registration looked done."""
    saved = dict(moments._RULES)
    try:
        with pytest.raises(TypeError, match=match):
            call()
        assert moments._RULES == saved
    finally:
        moments._RULES.clear()
        moments._RULES.update(saved)


def test_track_variance_refuses_a_model_that_a_graph_has_traced_without_the_checks():
    """track_variance(check_inputs=True) on a compiled model that had already run: the
    graph does not see hooks added later (Dynamo does not guard on module hooks) and ran
    without the input checks, silently (an inf input passed)."""
    torch._dynamo.reset()
    net = nn.Sequential(nn.Linear(8, 6), sb.IWSTSpike("st", std=0.5), nn.Linear(6, 3))
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    x = torch.rand(4, 8)
    bad = x.clone()
    bad[0, 0] = math.inf
    compiled(x)
    with pytest.raises(RuntimeError, match=r"already traced Sequential.*before the first "
                                           r"compiled call.*torch._dynamo.reset\(\)"):
        sb.track_variance(compiled, check_inputs=True)
    sb.track_variance(compiled)  # the other hooks act in eager mode only: installed
    sb.moments.untrack_variance(compiled)
    torch._dynamo.reset()  # the fix the message names: every graph traces again
    sb.track_variance(compiled, check_inputs=True)
    compiled(x)
    with pytest.raises(RuntimeError, match="contains NaN or inf"):
        compiled(bad)


@pytest.mark.parametrize("norm", ["batch train", "batch eval", "group", "instance", "layer"])
def test_float16_normalisation_of_a_silent_channel_keeps_a_finite_variance(norm):
    """A float16 normalisation (``model.half()``, or float16 ``torch.autocast``) of a
    channel whose statistic is 0 (a silent channel: a zero batch variance, or a running
    one that decayed to 0): the noise is scaled by ``gamma^2 / (0 + eps) = 1e5``, above
    float16's 65504. The scale was formed in float16, inf: the variance became inf / NaN,
    and so did the spikes' law and every gradient, silently. It is formed in float32, as
    the variance itself: finite, and equal to the float32 network's."""
    torch.manual_seed(0)
    x32 = torch.randn(4, 2, 3, 3)
    x32[:, 0] = 0.0  # a silent channel: statistic 0
    v32 = torch.rand(4, 2, 3, 3) + 0.1
    if norm.startswith("batch"):
        mod = nn.BatchNorm2d(2).train(norm == "batch train")
        mod.running_var.zero_()
    elif norm == "group":
        mod = nn.GroupNorm(2, 2)
    elif norm == "instance":
        mod = nn.InstanceNorm2d(2)
    else:
        x32[:, 0] = 0.0
        x32 = x32[:, :1]
        v32 = v32[:, :1]
        mod = nn.LayerNorm([1, 3, 3])
    want = get_variance(mod(attach_variance(x32, v32)))
    got = get_variance(mod.half()(attach_variance(x32.half(), v32)))
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=2e-3, atol=0)


@pytest.mark.parametrize("op", ["detach", "detach_"])
def test_detach_keeps_a_compact_variance_compact(op):
    """``h.detach()`` has ``h``'s values: a per-row variance ([N, 1], a per-layer std's)
    stays per row, as the operations around it keep it, with its graph cut."""
    mean = torch.randn(4, 5, requires_grad=True) * 1.0
    var = torch.rand(4, 1, requires_grad=True) + 0.0
    h = attach_variance(mean, var)
    out = getattr(h, op)()
    assert get_variance(out).shape == (4, 1) and not get_variance(out).requires_grad
    torch.testing.assert_close(get_variance(out), var.detach())
