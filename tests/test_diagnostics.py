"""Gradient diagnostics: enumeration is exact, IW-ST members are unbiased for linear losses,
bias / variance ordering, CLI."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from sbnn_addons import diagnostics as D
from sbnn_addons.estimators import AGR, IWST, ST

Phi = torch.special.ndtr


def _phi(z):
    return torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def test_single_unit_matches_analytic_gradient():
    # x -> one noisy binary unit h -> logits V h + c -> CE
    net = D.make_network((3, 1, 2), seed=1)
    x, y = D.make_inputs(net, 5, seed=0)
    grads, _ = D.exact_gradient(net, x, y)
    w, b, v, c = net.parameters()
    xs = x[:, 0]
    u = xs @ w[0] + b[0]                      # [B]
    z = u / net.sigma
    f1 = torch.nn.functional.cross_entropy((v[:, 0] + c).expand(len(y), -1), y,
                                           reduction="none")
    f0 = torch.nn.functional.cross_entropy(c.expand(len(y), -1), y, reduction="none")
    d_u = _phi(z) / net.sigma * (f1 - f0)     # Method page, section 1, per example
    torch.testing.assert_close(grads[0][0], (d_u[:, None] * xs).mean(0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads[1][0], d_u.mean(), rtol=1e-12, atol=1e-14)
    # readout: E[dCE/dlogits * h] and E[dCE/dlogits]
    onehot = torch.nn.functional.one_hot(y, 2).double()
    p1, p0 = torch.softmax(v[:, 0] + c, -1), torch.softmax(c, -1)
    g_v = (Phi(z)[:, None] * (p1 - onehot)).mean(0)
    g_c = (Phi(z)[:, None] * (p1 - onehot) + (1 - Phi(z))[:, None] * (p0 - onehot)).mean(0)
    torch.testing.assert_close(grads[2][:, 0], g_v, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads[3], g_c, rtol=1e-12, atol=1e-14)


def test_two_layer_chain_matches_closed_form_expectation():
    # x -> h1 -> h2 -> readout, written out as a four-term sum and differentiated
    net = D.make_network((2, 1, 1, 3), seed=4, weight_scale=2.0)
    x, y = D.make_inputs(net, 3, seed=1)
    grads, _ = D.exact_gradient(net, x, y)
    params = [p.clone().requires_grad_() for p in net.parameters()]
    w1, b1, w2, b2, v, c = params
    p1 = Phi((x[:, 0] @ w1[0] + b1[0]) / net.sigma)
    total = 0.0
    for h1 in (0.0, 1.0):
        q1 = p1 if h1 else 1 - p1
        p2 = Phi((w2[0, 0] * h1 + b2[0]) / net.sigma)
        for h2 in (0.0, 1.0):
            q2 = p2 if h2 else 1 - p2
            loss = torch.nn.functional.cross_entropy((v[:, 0] * h2 + c).expand(len(y), -1),
                                                     y, reduction="none")
            total = total + q1 * q2 * loss
    ref = torch.autograd.grad(total.mean(), params)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("neuron", ["binary", "lif"])
def test_configuration_probabilities_sum_to_one(neuron):
    net = D.make_network((3, 2, 2, 2), neuron=neuron, steps=2 if neuron == "lif" else None)
    x, y = D.make_inputs(net, 3)
    m = 2 ** net.num_units
    bits = D._bits(net.num_units, 0, m, x.dtype).repeat_interleave(3, 0)
    _, logp, _ = D._config_run(net, net.parameters(), x.repeat(m, 1, 1), y.repeat(m), bits,
                               None)
    torch.testing.assert_close(logp.exp().view(m, 3).sum(0), torch.ones(3, dtype=x.dtype))


IWST_FAMILY = [ST(), IWST(0.25), IWST(0.5), IWST(0.75), AGR(0.0)]


@pytest.mark.parametrize("est", IWST_FAMILY, ids=str)
def test_iwst_unbiased_for_linear_loss(est):
    """One hidden layer + linear loss: every IW-ST member is exact in expectation.

    Enumerated expectation: equal to 1e-12. Monte Carlo mean of 4000 single-sample
    estimates through BernoulliSpike: within 4.5 standard errors in every coordinate.
    """
    net = D.make_network((4, 5, 3), loss="linear", seed=2)
    x, y = D.make_inputs(net, 3)
    g = D.flatten(D.exact_gradient(net, x, y)[0])
    mean, _ = D.estimator_moments(net, x, y, D.estimator_rule(est))
    torch.testing.assert_close(mean, g, rtol=1e-10, atol=1e-12)
    n = 4000
    samples = D.sample_gradients(net, x, y, est, n, torch.Generator().manual_seed(0))
    se = samples.std(0) / math.sqrt(n)
    varying = se > 1e-12
    assert varying.any()
    assert ((samples.mean(0) - g)[varying].abs() <= 4.5 * se[varying]).all()
    assert torch.allclose(samples.mean(0)[~varying], g[~varying], atol=1e-12)


def test_mc_matches_enumerated_moments_for_curved_loss():
    """The enumerated E[g_hat] and trace(Cov) agree with the library's sampled backward."""
    net = D.make_network((4, 3, 3, 2), seed=3)
    x, y = D.make_inputs(net, 2)
    mean, var = D.estimator_moments(net, x, y, D.estimator_rule(AGR(0.5)))
    n = 4000
    s = D.sample_gradients(net, x, y, AGR(0.5), n, torch.Generator().manual_seed(1))
    se = s.std(0) / math.sqrt(n)
    assert ((s.mean(0) - mean).abs() <= 4.5 * se + 1e-12).all()
    assert float(s.var(0).sum()) == pytest.approx(var["all"], rel=0.1)


def test_agr0_least_biased_and_st_lowest_variance_binary():
    """Binary nets (4-3-3-2, CE loss), moderate |z| (weight scales 1 and 2), averaged over 4
    random networks: AGR(0) has the smallest hidden-layer bias of all rules (surrogates
    included); ST the smallest variance along the IW-ST(p) line p in {0, .25, .5, .75, 1}."""
    rows = D.sweep_noise((1.0, 2.0), networks=4, batch=4, seed=0)
    for scale in (1.0, 2.0):
        sel = {r["estimator"]: r for r in rows
               if r["layer"] == "hidden" and r["weight_scale"] == scale}
        assert 0.3 < sel["ST"]["mean_abs_z"] < 2.0
        assert min(sel, key=lambda k: sel[k]["bias"]) == "AGR(0)"
        line = [str(e) for e in IWST_FAMILY]
        assert min(line, key=lambda k: sel[k]["variance"]) == "ST"
        variances = [sel[k]["variance"] for k in line]
        assert variances == sorted(variances)  # variance grows with p
    readout = [r for r in rows if r["layer"] == "readout"]
    assert max(r["bias"] for r in readout) < 1e-12  # readout sees the sampled spikes


def test_lif_network_runs_and_readout_exact():
    net = D.make_network((3, 2, 2, 2), neuron="lif", steps=3, seed=0)
    x, y = D.make_inputs(net, 3)
    rows = D.compare(net, x, y, {"ST": D.estimator_rule(ST()), **D.SURROGATES})
    names = {r["estimator"] for r in rows}
    assert names == {"ST", "atan(2)", "fast_sigmoid(25)", "sj_sigmoid(4)"}
    layers = {r["layer"] for r in rows}
    assert layers == {"layer1", "layer2", "readout", "hidden", "all"}
    for r in rows:
        assert r["variance"] >= -1e-12 and math.isfinite(r["bias"])
        if r["layer"] == "readout":
            assert r["bias"] < 1e-12


def test_surrogate_formulas():
    u = torch.tensor([-1.0, 0.0, 0.5], dtype=torch.float64)
    s, h = torch.ones_like(u), torch.zeros_like(u)
    torch.testing.assert_close(D.SURROGATES["atan(2)"](u, s, h),
                               1 / (1 + (math.pi * u) ** 2))
    torch.testing.assert_close(D.SURROGATES["fast_sigmoid(25)"](u, s, h),
                               1 / (1 + 25 * u.abs()) ** 2)
    sig = torch.sigmoid(4 * u)
    torch.testing.assert_close(D.SURROGATES["sj_sigmoid(4)"](u, s, h), 4 * sig * (1 - sig))


def test_bad_input():
    with pytest.raises(ValueError, match="configurations"):
        D.make_network((4, 8, 8, 8, 2))
    with pytest.raises(ValueError, match="neuron"):
        D.make_network(neuron="izhikevich")
    with pytest.raises(ValueError, match="steps"):
        D.make_network(steps=3)  # binary units have one step
    net = D.make_network((4, 3, 2))
    x, y = D.make_inputs(net, 2)
    with pytest.raises(ValueError, match="x must be"):
        D.exact_gradient(net, x[:, :, :3], y)
    with pytest.raises(ValueError, match="y must be"):
        D.exact_gradient(net, x, y[:1])


def test_cli_writes_csv_and_figures(tmp_path, capsys):
    code = D.main(["--out-dir", str(tmp_path), "--scales", "1", "2", "--depths", "1", "2",
                   "--lif-depths", "1", "--steps", "2", "--networks", "1", "--batch", "2"])
    assert code == 0
    with open(tmp_path / "diagnostics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and set(D.COLUMNS) <= set(rows[0])
    assert {r["neuron"] for r in rows} == {"binary", "lif"}
    for name in ("binary_bias_variance_vs_z.png", "binary_bias_variance_vs_depth.png",
                 "lif_bias_variance_vs_z.png", "lif_bias_variance_vs_depth.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert "AGR(0)" in capsys.readouterr().out


@pytest.mark.parametrize("fn", [D.expected_loss, D.exact_gradient,
                                lambda n, x, y: D.sample_gradients(n, x, y, "st", 2)],
                         ids=["expected_loss", "exact_gradient", "sample_gradients"])
@pytest.mark.parametrize("case, error, match", [
    ("nan", ValueError, "NaN or inf"),  # a NaN gradient, silently
    ("empty", ValueError, r"B = 0"),  # a ZeroDivisionError
    ("float32", TypeError, "network's dtype torch.float64"),  # a matmul dtype error
    ("labels", ValueError, r"labels in \[0, 2\)"),  # an IndexError of cross_entropy
    ("float_labels", ValueError, "integer class labels"),
])
def test_diagnostics_name_bad_data(fn, case, error, match):
    net = D.make_network()
    x, y = D.make_inputs(net, batch=2)
    x, y = {"nan": (x * math.nan, y), "empty": (x[:0], y[:0]), "float32": (x.float(), y),
            "labels": (x, y + 2), "float_labels": (x, y.double())}[case]
    with pytest.raises(error, match=match):
        fn(net, x, y)


def test_diagnostics_name_bad_sizes_and_sample_counts():
    with pytest.raises(ValueError, match="every size must be an integer >= 1"):
        D.make_network((4, 0, 2))  # a network with an empty layer was built
    net = D.make_network()
    x, y = D.make_inputs(net, batch=2)
    for k in (0, -1, 2.5):  # a reshape / negative-dimension / repeat() error
        with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
            D.sample_gradients(net, x, y, "st", k)


@pytest.mark.parametrize("kwargs, match", [
    (dict(neuron="lif", steps=2.5), "steps must be an integer"),  # ran 2 steps
    (dict(neuron="lif", steps=True), "steps must be an integer"),  # ran 1 step
    (dict(weight_scale=math.nan), "weight_scale must be a finite number"),  # NaN network
    (dict(weight_scale=math.inf), "weight_scale must be a finite number"),
    (dict(sigma=math.inf), "sigma must be a finite number > 0"),  # every P = 1/2, g = 0
])
def test_make_network_names_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        D.make_network((2, 2, 2), **kwargs)


def test_toy_network_names_mismatched_shapes():
    """A readout of the wrong width or a loss_weights of the wrong length failed inside a
    matmul (or broadcast silently) only when a gradient was computed."""
    net = D.make_network((3, 2, 2))
    w, b = net.weights, net.biases
    with pytest.raises(ValueError, match=r"weights\[1\] must be \[C, 2\]"):
        D.ToyNetwork([w[0], torch.zeros(2, 5, dtype=w[0].dtype)], b)
    with pytest.raises(ValueError, match=r"biases\[0\] must be \[2\]"):
        D.ToyNetwork(w, [torch.zeros(3, dtype=w[0].dtype), b[1]])
    with pytest.raises(ValueError, match=r"loss_weights must be \[2\]"):
        D.ToyNetwork(w, b, loss="linear", loss_weights=torch.ones(5, dtype=w[0].dtype))
    with pytest.raises(ValueError, match="batch must be an integer >= 1"):
        D.make_inputs(net, -1)


def test_sweeps_and_plot_refuse_empty_selections(tmp_path):
    """networks=0 returned no rows, and a misspelt layer drew an empty figure."""
    rules = {"ST": D.estimator_rule("st")}
    with pytest.raises(ValueError, match="networks must be an integer >= 1"):
        D.sweep_noise((1,), networks=0, rules=rules)
    with pytest.raises(ValueError, match="networks must be an integer >= 1"):
        D.sweep_depth((1,), networks=0, rules=rules)
    rows = D.sweep_noise((1,), networks=1, batch=2, rules=rules)
    with pytest.raises(ValueError, match=r"no rows for layer 'hiden'.*'hidden'"):
        D.plot_sweep(rows, "mean_abs_z", tmp_path / "a.png", layer="hiden")
    with pytest.raises(ValueError, match="x_key 'abs_z'"):
        D.plot_sweep(rows, "abs_z", tmp_path / "a.png", layer="hidden")
    assert not (tmp_path / "a.png").exists()


def test_int32_labels_and_mixed_dtypes():
    """int32 labels (integer class labels) failed in cross_entropy; parameters of mixed
    dtypes failed in a matmul, not when the network was built."""
    net = D.make_network((3, 2, 2))
    x, y = D.make_inputs(net, 2)
    torch.testing.assert_close(D.expected_loss(net, x, y.int()), D.expected_loss(net, x, y))
    torch.testing.assert_close(D.exact_gradient(net, x, y.int())[0],
                               D.exact_gradient(net, x, y)[0])
    assert D.sample_gradients(net, x, y.int(), "st", 2).shape[0] == 2
    with pytest.raises(TypeError, match="one floating-point dtype"):
        D.ToyNetwork([net.weights[0], net.weights[1].float()], net.biases)
    with pytest.raises(TypeError, match="one floating-point dtype"):
        D.ToyNetwork(net.weights, net.biases, loss="linear", loss_weights=torch.ones(2))


def test_zero_variance_estimator_reports_zero_not_negative():
    """ST on one hidden layer with a linear loss has a constant gradient: E[g^2] - E[g]^2
    rounded to -5.6e-17, estimator_moments reported a negative variance and compare
    raised a math domain error in sqrt(bias^2 + variance)."""
    net = D.make_network((3, 2, 2), loss="linear", seed=1)
    x, y = D.make_inputs(net, 2)
    _, var = D.estimator_moments(net, x, y, D.estimator_rule(ST()))
    assert 0 <= var["layer1"] < 1e-12 and var["hidden"] == var["layer1"]
    rows = D.compare(net, x, y, {"ST": D.estimator_rule(ST())})
    hidden = next(r for r in rows if r["layer"] == "hidden")
    assert hidden["variance"] >= 0 and math.isfinite(hidden["rel_error"])


@pytest.mark.parametrize("sizes, neuron", [((3, 2, 2, 2), "binary"), ((3, 2, 2), "lif")])
def test_linear_loss_exactness_needs_one_binary_layer(sizes, neuron):
    """The docs' scope of 'exact for a linear loss': a second layer or LIF steps make the
    loss nonlinear in the first spikes, and ST is biased there."""
    net = D.make_network(sizes, neuron=neuron, loss="linear", seed=1,
                         steps=2 if neuron == "lif" else None)
    x, y = D.make_inputs(net, 2)
    row = next(r for r in D.compare(net, x, y, {"ST": D.estimator_rule(ST())})
               if r["layer"] == "hidden")
    assert row["rel_bias"] > 1e-3
