"""Uncertainty (mc(K) prediction), calibration / OOD / spike metrics and plots."""

from __future__ import annotations

import math
import re

import pytest
import snntorch as snn
import torch
from torch import nn

import sbnn_addons
from sbnn_addons import metrics
from sbnn_addons.snntorch import to_sbnn
from sbnn_addons.uncertainty import (
    Prediction,
    entropy,
    from_sample_probs,
    metrics_vs_samples,
    plot_entropy_histograms,
    plot_metrics_vs_samples,
    plot_reliability,
    predict,
    time_as_samples,
)

T, B = 8, 6


# --------------------------------------------------------------------------- models
class TutorialNet(nn.Module):
    """snnTorch tutorial 5 network (time loop inside forward), returns (spk, mem) records."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 24)
        self.lif1 = snn.Leaky(beta=0.9)
        self.fc2 = nn.Linear(24, 5)
        self.lif2 = snn.Leaky(beta=0.9)

    def forward(self, x):
        mem1, mem2 = self.lif1.init_leaky(), self.lif2.init_leaky()
        spk_rec, mem_rec = [], []
        for step in range(x.shape[0]):
            spk1, mem1 = self.lif1(self.fc1(x[step]), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            spk_rec.append(spk2)
            mem_rec.append(mem2)
        return torch.stack(spk_rec), torch.stack(mem_rec)


def readout(m, x):
    return m(x)[1].mean(0)  # time-averaged output membrane = logits


def snn_model(**kw):
    torch.manual_seed(0)
    net = TutorialNet()
    with torch.no_grad():
        net.fc1.weight.mul_(3)
    return to_sbnn(net, **kw)


def spikes_in():
    g = torch.Generator().manual_seed(1)
    return (torch.rand(T, B, 16, generator=g) < 0.4).float()


class CoreNet(nn.Module):
    """Core-only model: Bayesian layers + IWSTSpike, static input [B, 16]."""

    def __init__(self, std=0.3):
        super().__init__()
        self.fc1 = sbnn_addons.BayesLinear(16, 32, std=std, learn_std=False)
        self.spk = sbnn_addons.IWSTSpike("agr", std=0.2)
        self.fc2 = sbnn_addons.BayesLinear(32, 4, std=std, learn_std=False)

    def forward(self, x):
        return self.fc2(self.spk(self.fc1(x)))


def core_model(std=0.3):
    torch.manual_seed(0)
    return sbnn_addons.track_variance(CoreNet(std))


# --------------------------------------------------------------------------- metrics
PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
TARGETS = torch.tensor([0, 2])


def test_basic_metrics_hand_values():
    out = metrics.classification_metrics(PROBS, TARGETS)
    assert out["accuracy"] == 0.5
    assert out["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2, abs=1e-6)
    # (0.3^2 + 0.2^2 + 0.1^2 + 0.1^2 + 0.6^2 + 0.7^2) / 2
    assert out["brier"] == pytest.approx(0.5, abs=1e-6)


def _two_class(confs, correct):
    """Two-class predictions with confidence c for class 0; target 0 iff correct."""
    c = torch.tensor(confs, dtype=torch.float64)
    probs = torch.stack([c, 1 - c], 1)
    targets = torch.tensor([0 if k else 1 for k in correct])
    return probs, targets


def test_ece_hand_value():
    # bin of 0.9: acc 1/2, bin of 0.62: acc 1 -> 0.5*0.4 + 0.5*0.38
    probs, targets = _two_class([0.9, 0.9, 0.62, 0.62], [1, 0, 1, 1])
    assert float(metrics.expected_calibration_error(probs, targets)) == pytest.approx(
        0.39, abs=1e-6)


def test_ece_and_ace_zero_when_perfectly_calibrated():
    # confidence 5/8 on 8 examples with 5 correct; 7/8 on 8 examples with 7 correct
    probs, targets = _two_class([5 / 8] * 8 + [7 / 8] * 8, [1] * 5 + [0] * 3 + [1] * 7 + [0])
    assert float(metrics.expected_calibration_error(probs, targets)) == pytest.approx(0, abs=1e-7)
    assert float(metrics.adaptive_calibration_error(probs, targets, n_bins=2)) == pytest.approx(
        0, abs=1e-12)


def test_adaptive_ece_hand_value():
    # sorted confidences 0.6, 0.7 | 0.8, 0.9 (2 equal-mass bins); correct: 0, 1 | 1, 1
    probs, targets = _two_class([0.9, 0.6, 0.8, 0.7], [1, 0, 1, 1])
    ace = float(metrics.adaptive_calibration_error(probs, targets, n_bins=2))
    expected = 0.5 * abs(0.5 - 0.65) + 0.5 * abs(1.0 - 0.85)
    assert ace == pytest.approx(expected, abs=1e-12)


def test_adaptive_ece_does_not_depend_on_the_order_of_tied_examples():
    # four examples of confidence 0.5, two correct, two bins: the tie group was split by
    # input order (ACE 0.5 in one order, 0 in another); each bin gets the group's accuracy
    probs, targets = _two_class([0.5] * 4 + [0.9] * 2, [1, 1, 0, 0, 1, 1])
    for perm in ([0, 1, 2, 3, 4, 5], [0, 2, 1, 3, 5, 4], [3, 2, 1, 0, 4, 5]):
        ace = float(metrics.adaptive_calibration_error(probs[perm], targets[perm], n_bins=3))
        assert ace == pytest.approx(2 * 0.1 / 6, abs=1e-7)  # only the 0.9 bin is off
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randint(0, 3, (500, 4), generator=g).float(), -1)  # ties
    targets = torch.randint(0, 4, (500,), generator=g)
    ref = float(_ace64(probs.double(), targets, 7))
    for _ in range(3):
        perm = torch.randperm(500, generator=g)
        assert float(metrics.adaptive_calibration_error(probs[perm], targets[perm], 7)) == (
            pytest.approx(ref, abs=1e-6))


def test_ood_metrics_toy_scores():
    s_in = torch.tensor([0.1, 0.2, 0.3, 0.4])
    s_out = torch.tensor([0.35, 0.5, 0.6, 0.7])
    m = metrics.ood_metrics(s_in, s_out)
    assert m["auroc"] == pytest.approx(15 / 16, abs=1e-6)   # 15 of 16 pairs ordered
    assert m["fpr95"] == pytest.approx(1 / 4, abs=1e-6)     # keeping all in also keeps 0.35
    perfect = metrics.ood_metrics(s_in, s_in + 1)
    assert perfect == {"auroc": pytest.approx(1.0), "fpr95": pytest.approx(0.0)}
    tied = metrics.ood_metrics(torch.ones(5), torch.ones(5))
    assert tied["auroc"] == pytest.approx(0.5) and tied["fpr95"] == pytest.approx(1.0)


def test_metric_bad_input():
    with pytest.raises(ValueError, match="targets"):
        metrics.expected_calibration_error(PROBS, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="sum to one"):
        metrics.adaptive_calibration_error(PROBS * 2, TARGETS)
    with pytest.raises(ValueError, match="n_bins"):
        metrics.adaptive_calibration_error(PROBS, TARGETS, n_bins=0)
    with pytest.raises(ValueError, match="scores_out"):
        metrics.ood_metrics(torch.ones(3), torch.ones(0))
    with pytest.raises(ValueError, match="scores_in"):
        metrics.ood_metrics(torch.ones(3, 2), torch.ones(3))
    with pytest.raises(ValueError, match="sum to one"):
        from_sample_probs(torch.rand(3, 2, 4))
    with pytest.raises(ValueError, match=r"\[K, B, C\]"):
        from_sample_probs(torch.rand(2, 4))
    with pytest.raises(ValueError, match=r"\[T, B, C\]"):
        time_as_samples(torch.rand(2, 4))


def test_layer_synops_linear_and_conv_borders():
    lin = nn.Linear(5, 7)
    x = torch.tensor([[1.0, 0, 1, 0, 0], [0, 0, 0, 0, 1]])
    assert float(metrics.layer_synops(lin, x)) == 3 * 7
    conv = nn.Conv2d(2, 4, 3, padding=1)
    x = torch.zeros(1, 2, 5, 5)
    x[0, 0, 2, 2] = 1  # interior spike: reaches 3x3 positions x 4 channels
    assert float(metrics.layer_synops(conv, x)) == 9 * 4
    x[0, 1, 0, 0] = 1  # corner spike: 2x2 positions
    assert float(metrics.layer_synops(conv, x)) == (9 + 4) * 4
    steps = torch.stack([x, torch.zeros_like(x), x])  # [T, N, C, H, W] (multi-step)
    assert float(metrics.layer_synops(conv, steps)) == 2 * (9 + 4) * 4


def test_mc_predict_on_a_multistep_spikingjelly_conv_network():
    """Default mc_predict (spike counts and SynOps on) on a converted multi-step
    SpikingJelly network whose second conv gets [T, N, C, H, W] spikes."""
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import layer, neuron

    from sbnn_addons.spikingjelly import to_sbnn as sj_to_sbnn

    torch.manual_seed(0)
    net = nn.Sequential(
        layer.Conv2d(2, 4, 3, padding=1, step_mode="m"), neuron.LIFNode(step_mode="m"),
        layer.Conv2d(4, 4, 3, padding=1, step_mode="m"), neuron.LIFNode(step_mode="m"),
        layer.Flatten(step_mode="m"), layer.Linear(4 * 8 * 8, 3, step_mode="m"))
    model = sj_to_sbnn(net)
    pred = sbnn_addons.mc_predict(model, torch.rand(4, 2, 2, 8, 8) * 3, num_samples=2,
                                  forward=lambda m, x: m(x).mean(0), seed=0)
    assert pred.probs.shape == (2, 3) and pred.synops.shape == (2,)
    assert (pred.synops > 0).all()
    # the readout (a Bayesian layer) carries a variance: the prediction is plain tensors
    for value in (pred.probs, pred.sample_probs, pred.entropy, pred.mutual_information):
        assert type(value) is torch.Tensor


# --------------------------------------------------------------------------- predict
def test_predict_snntorch_shapes_and_uncertainty():
    model, x, k = snn_model(std=0.3), spikes_in(), 5
    pred = predict(model, x, num_samples=k, forward=readout, seed=3)
    assert isinstance(pred, Prediction) and pred.num_samples == k
    assert pred.probs.shape == (B, 5) and pred.sample_probs.shape == (k, B, 5)
    assert pred.entropy.shape == pred.mutual_information.shape == (B,)
    torch.testing.assert_close(pred.probs.sum(-1), torch.ones(B))
    assert (pred.mutual_information >= 0).all()
    assert pred.mutual_information.max() > 1e-4  # noise does produce disagreement
    assert (pred.entropy >= pred.mutual_information).all()
    assert set(pred.layer_spike_counts) == {"lif1.spike_grad", "lif2.spike_grad"}
    assert pred.spike_counts.shape == (k,) and (pred.spike_counts > 0).all()
    assert pred.layer_units["lif1.spike_grad"] == T * B * 24
    assert all(0 < r < 1 for r in pred.spike_rates().values())
    # SynOps: fc1 (binary input) and fc2 (spikes of lif1), fan-outs 24 and 5
    assert set(pred.layer_synops) == {"fc1", "fc2"}
    torch.testing.assert_close(pred.layer_synops["fc2"],
                               pred.layer_spike_counts["lif1.spike_grad"] * 5)
    assert pred.synops_per_example() == pytest.approx(float(pred.synops.sum()) / B)


def test_predict_chunked_equals_unchunked_with_seed():
    model, x = snn_model(std=0.3), spikes_in()
    a = predict(model, x, num_samples=6, forward=readout, seed=7)
    b = predict(model, x, num_samples=6, forward=readout, seed=7, chunk_size=4)
    torch.testing.assert_close(a.sample_probs, b.sample_probs, rtol=0, atol=0)
    torch.testing.assert_close(a.spike_counts, b.spike_counts, rtol=0, atol=0)
    # folded: a replay with the same seed is exact, chunked folding is valid too
    f1 = predict(model, x, num_samples=6, forward=readout, seed=7, fold=True, batch_dim=1)
    f2 = predict(model, x, num_samples=6, forward=readout, seed=7, fold=True, batch_dim=1)
    torch.testing.assert_close(f1.sample_probs, f2.sample_probs, rtol=0, atol=0)
    f3 = predict(model, x, num_samples=6, forward=readout, seed=7, fold=True, batch_dim=1,
                 chunk_size=4)
    assert f3.sample_probs.shape == (6, B, 5)
    torch.testing.assert_close(f3.probs.sum(-1), torch.ones(B))


def test_predict_mean_mode_and_zero_std_give_zero_mi():
    x = spikes_in()
    pred = predict(snn_model(std=0.3), x, num_samples=4, forward=readout, eval_mode="mean")
    torch.testing.assert_close(pred.mutual_information, torch.zeros(B), rtol=0, atol=1e-6)
    silent = snn_model(std=0.0, learn_std=False, spike_std=None)  # no weight or spike noise
    a = predict(silent, x, num_samples=4, forward=readout)
    torch.testing.assert_close(a.mutual_information, torch.zeros(B), rtol=0, atol=1e-6)
    # without noise folding changes nothing
    f = predict(silent, x, num_samples=4, forward=readout, fold=True, batch_dim=1)
    torch.testing.assert_close(f.sample_probs, a.sample_probs, rtol=1e-5, atol=1e-6)


def test_predict_sequential_snntorch_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 24), snn.Leaky(beta=0.9, init_hidden=True),
                        nn.Linear(24, 5), snn.Leaky(beta=0.9, init_hidden=True, output=True))
    model = to_sbnn(net, std=0.3)

    def step_loop(m, x):
        return torch.stack([m(x[t])[1] for t in range(x.shape[0])]).mean(0)

    pred = predict(model, spikes_in(), num_samples=3, forward=step_loop, seed=0)
    assert pred.probs.shape == (B, 5)
    assert set(pred.layer_spike_counts) == {"1.spike_grad", "3.spike_grad"}


def test_predict_core_model():
    model = core_model()
    x = torch.randn(B, 16)
    pred = predict(model, x, num_samples=8, seed=0)  # default forward: model(x)
    assert pred.probs.shape == (B, 4)
    torch.testing.assert_close(pred.probs.sum(-1), torch.ones(B))
    assert (pred.mutual_information >= 0).all() and pred.mutual_information.max() > 0
    chunked = predict(model, x, num_samples=8, seed=0, chunk_size=3)
    torch.testing.assert_close(chunked.sample_probs, pred.sample_probs, rtol=0, atol=0)
    assert float(pred.layer_synops["fc1"].sum()) == 0  # analogue input: MACs, not SynOps
    torch.testing.assert_close(pred.layer_synops["fc2"], pred.layer_spike_counts["spk"] * 4)
    folded = predict(model, x, num_samples=8, seed=0, fold=True, chunk_size=4)
    assert folded.sample_probs.shape == (8, B, 4)
    mean = predict(model, x, num_samples=3, eval_mode="mean")
    torch.testing.assert_close(mean.mutual_information, torch.zeros(B), rtol=0, atol=1e-6)


def test_predict_bad_input():
    model, x = core_model(), torch.randn(B, 16)
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_samples"):
            predict(model, x, num_samples=k)
    with pytest.raises(ValueError, match="chunk_size"):
        predict(model, x, num_samples=2, chunk_size=0)
    with pytest.raises(TypeError, match="forward="):
        predict(snn_model(), spikes_in(), num_samples=2)  # returns (spk, mem)
    with pytest.raises(ValueError, match=r"logits \[B, C\]"):
        predict(snn_model(), spikes_in(), num_samples=2, forward=lambda m, x: m(x)[1])


def test_time_as_samples():
    logits = torch.randn(T, B, 5)
    pred = time_as_samples(logits)
    assert pred.num_samples == T and pred.sample_probs.shape == (T, B, 5)
    torch.testing.assert_close(pred.probs, torch.softmax(logits, -1).mean(0))
    assert (pred.mutual_information >= 0).all()
    same = time_as_samples(logits[:1].expand(T, -1, -1))
    torch.testing.assert_close(same.mutual_information, torch.zeros(B), rtol=0, atol=1e-6)


def test_metrics_vs_samples_and_plots(tmp_path):
    model, x = core_model(), torch.randn(40, 16)
    y = torch.randint(4, (40,), generator=torch.Generator().manual_seed(0))
    pred = predict(model, x, num_samples=8, seed=0)
    sweep = metrics_vs_samples(pred, y)
    assert sweep["k"] == [1, 2, 4, 8]
    assert sweep["accuracy"][-1] == float((pred.probs.argmax(-1) == y).float().mean())
    with pytest.raises(ValueError, match="k must be"):
        metrics_vs_samples(pred, y, ks=[9])
    paths = [
        plot_reliability(pred.probs, y, tmp_path / "rel.png"),
        plot_entropy_histograms(pred.entropy, pred.entropy + 0.5, tmp_path / "ent.png"),
        plot_metrics_vs_samples(sweep, tmp_path / "k.png"),
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_targets_out_of_range_int32_and_half_probs():
    """Out-of-range targets raise for every metric (ECE scored them silently); int32
    targets and float16 softmax outputs (rows off by its rounding) are accepted."""
    for fn in (metrics.expected_calibration_error, metrics.adaptive_calibration_error,
               metrics.negative_log_likelihood, metrics.brier_score):
        with pytest.raises(ValueError, match=r"\[0, 3\)"):
            fn(PROBS, TARGETS + 3)
        with pytest.raises(ValueError, match=r"\[0, 3\)"):
            fn(PROBS, TARGETS - 1)
    want = metrics.classification_metrics(PROBS, TARGETS)
    assert metrics.classification_metrics(PROBS, TARGETS.int()) == want
    half = torch.softmax(torch.randn(64, 10), -1).half()
    metrics.classification_metrics(half, torch.randint(0, 10, (64,)))


def test_ood_metrics_depend_on_the_order_of_any_scores():
    """Scores of any range (energies, distances, negated scores): AUROC / FPR95 from their
    order, as sklearn's; torchmetrics alone ties every score above ~37 through a sigmoid."""
    from sklearn.metrics import roc_auc_score

    s_in, s_out = torch.arange(40.0, 45.0), torch.arange(45.0, 50.0)
    assert metrics.ood_metrics(s_in, s_out) == {"auroc": 1.0, "fpr95": 0.0}
    assert metrics.ood_metrics(-s_out, -s_in) == {"auroc": 1.0, "fpr95": 0.0}
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=g) * 100, torch.randn(40, generator=g) * 100 + 30
    labels = [0] * 50 + [1] * 40
    assert math.isclose(metrics.ood_metrics(a, b)["auroc"],
                        roc_auc_score(labels, torch.cat([a, b]).numpy()), rel_tol=1e-6)


def test_probabilities_outside_the_unit_interval_are_named():
    """A row with a tiny negative entry sums to one, and torchmetrics would take the whole
    tensor for logits (a softmax over it): the metrics refuse it."""
    probs = torch.tensor([[0.9, 0.1 + 1e-7, -1e-7], [0.2, 0.5, 0.3]])
    with pytest.raises(ValueError, match=r"\[0, 1\].*clamp"):
        metrics.expected_calibration_error(probs, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        metrics.expected_calibration_error(torch.full((2, 3), float("nan")), torch.tensor([0, 1]))


def test_nll_of_a_confident_error_in_float64():
    """A probability that underflows counts as the dtype's smallest normal number: a
    float64 softmax keeps the NLL of a confident error exact up to ~708 nats."""
    from sbnn_addons.metrics import negative_log_likelihood

    logits = torch.tensor([[0.0, -106.0]], dtype=torch.float64)
    nll = negative_log_likelihood(torch.softmax(logits, -1), torch.tensor([1]))
    torch.testing.assert_close(nll, torch.nn.functional.cross_entropy(logits, torch.tensor([1])))


METRIC_FNS = [metrics.expected_calibration_error, metrics.adaptive_calibration_error,
              metrics.negative_log_likelihood, metrics.brier_score,
              metrics.classification_metrics]


@pytest.mark.parametrize("fn", METRIC_FNS, ids=lambda f: f.__name__)
def test_metrics_refuse_an_empty_set_and_non_tensors(fn):
    """N = 0 examples gave NaN (ACE 0) silently; numpy arrays / lists an AttributeError."""
    with pytest.raises(ValueError, match=r"no examples \(N = 0\)"):
        fn(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(TypeError, match="probs must be a torch.Tensor.*torch.as_tensor"):
        fn(PROBS.numpy(), TARGETS)
    with pytest.raises(TypeError, match="targets must be a torch.Tensor"):
        fn(PROBS, [0, 2])


@pytest.mark.parametrize("fn", [metrics.expected_calibration_error,
                                metrics.adaptive_calibration_error], ids=lambda f: f.__name__)
@pytest.mark.parametrize("n_bins", [0, 2.5, True])
def test_calibration_n_bins_is_checked(fn, n_bins):
    with pytest.raises(ValueError, match="n_bins must be an integer >= 1"):
        fn(PROBS, TARGETS, n_bins=n_bins)


def test_metrics_on_a_graph_tensor_do_not_warn():
    probs = torch.softmax(torch.randn(4, 3, requires_grad=True), -1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics.classification_metrics(probs, torch.tensor([0, 1, 2, 0]))
    metrics.negative_log_likelihood(probs, torch.tensor([0, 1, 2, 0])).backward()  # graph kept


def test_entropy_and_from_sample_probs_refuse_logits():
    """Logits passed as probabilities: entropy() returned negative "entropies", and
    from_sample_probs accepted rows with negative entries that sum to one."""
    from sbnn_addons.uncertainty import entropy

    with pytest.raises(ValueError, match=r"\[0, 1\].*softmax\(logits\)"):
        entropy(torch.tensor([[2.0, -1.0, 0.5]]))
    with pytest.raises(TypeError, match="floating-point"):
        entropy(torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match=r"sample_probs must be probabilities in \[0, 1\]"):
        from_sample_probs(torch.tensor([[[1.2, -0.2], [0.5, 0.5]]]))
    with pytest.raises(ValueError, match="no NaN"):
        from_sample_probs(torch.full((1, 2, 2), math.nan))
    assert float(entropy(torch.tensor([0.5, 0.5]))) == pytest.approx(math.log(2))


def test_metrics_vs_samples_and_plots_bad_arguments(tmp_path):
    sp = torch.softmax(torch.randn(4, 5, 3), -1)
    y = torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(ValueError, match="ks is empty"):
        metrics_vs_samples(sp, y, ks=[])  # returned empty lists
    with pytest.raises(ValueError, match=r"K >= 1"):
        metrics_vs_samples(sp[:0], y)  # a math domain error
    with pytest.raises(TypeError, match="Prediction or a tensor"):
        metrics_vs_samples(sp.numpy(), y)
    with pytest.raises(ValueError, match="n_bins"):
        metrics_vs_samples(sp, y, n_bins=0)
    assert metrics_vs_samples(sp, y, ks=iter([1, 4]))["k"] == [1, 4]
    with pytest.raises(ValueError, match="n_bins"):
        plot_reliability(sp[0], y, tmp_path / "r.png", n_bins=0)  # a bincount error
    with pytest.raises(ValueError, match="bins must be"):  # an empty plot
        plot_entropy_histograms(torch.rand(5), torch.rand(5), tmp_path / "e.png", bins=0)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_entropy_of_a_zero_probability_is_finite_in_every_dtype(dtype):
    # 1e-12 rounds to 0 in float16: the clamp let 0 * log 0 through as NaN
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=dtype)
    h = sbnn_addons.uncertainty.entropy(probs)
    assert torch.allclose(h.float(), torch.tensor([0.0, math.log(2)]), atol=1e-2)
    pred = from_sample_probs(probs[None])
    assert torch.isfinite(pred.entropy).all() and torch.isfinite(pred.mutual_information).all()


def test_time_as_samples_keeps_float64_like_mc_predict():
    # float64 logits were softmaxed in float32: a confident error's NLL read 87.3, not 106
    logits = torch.tensor([[[0.0, -106.0]]], dtype=torch.float64).repeat(3, 1, 1)
    pred = time_as_samples(logits)
    assert pred.probs.dtype == torch.float64
    nll = metrics.negative_log_likelihood(pred.probs, torch.tensor([1]))
    torch.testing.assert_close(nll, torch.tensor(106.0, dtype=torch.float64))


def test_from_sample_probs_takes_a_float16_softmax():
    # its rows miss 1 by ~3e-4 (float16 rounding over 10 terms): they were refused as
    # "not softmax probabilities", though check_probabilities takes the same tensor
    probs = torch.randn(4, 64, 10, generator=torch.Generator().manual_seed(0)).softmax(-1)
    pred = from_sample_probs(probs.half())
    metrics.check_probabilities(pred.probs, torch.zeros(64, dtype=torch.long))
    torch.testing.assert_close(pred.probs.float(), probs.mean(0), atol=2e-3, rtol=0)


def test_metrics_of_a_single_class():
    # ECE failed inside torchmetrics ("num_classes ... larger than 1"), naming an argument
    # the caller never passed; one class is always predicted right with confidence 1
    probs, targets = torch.ones(5, 1), torch.zeros(5, dtype=torch.long)
    out = metrics.classification_metrics(probs, targets)
    assert out == {"accuracy": 1.0, "nll": 0.0, "brier": 0.0, "ece": 0.0}
    assert float(metrics.adaptive_calibration_error(probs, targets)) == 0.0


def test_reliability_bars_bin_confidences_as_the_ece(tmp_path, monkeypatch):
    # a confidence on a bin edge (0.5: a tie; 0.75) was drawn in the bin below it, so the
    # bars disagreed with the ECE in the title (torchmetrics bins [lo, hi))
    import sbnn_addons.uncertainty as unc

    figs = []
    monkeypatch.setattr(unc, "_save", lambda fig, path: figs.append(fig) or path)
    probs = torch.tensor([[0.5, 0.5], [0.75, 0.25]])
    targets = torch.tensor([0, 1])
    plot_reliability(probs, targets, tmp_path / "r.png", n_bins=4)
    bars = figs[0].axes[0].containers[0]  # accuracy bars
    centers = sorted(b.get_x() + b.get_width() / 2 for b in bars)
    assert centers == pytest.approx([0.625, 0.875])
    heights = {round(b.get_x() + b.get_width() / 2, 3): b.get_height() for b in bars}
    gap = sum(abs(h - c) * 0.5 for c, h in zip((0.5, 0.75), (heights[0.625], heights[0.875])))
    assert gap == pytest.approx(float(metrics.expected_calibration_error(probs, targets, 4)))


def test_nll_of_a_small_float16_probability():
    # 6e-6 is a float16 subnormal: the default eps (float16's smallest normal, 6.1e-5)
    # clamped it, and the NLL read 9.7 nats instead of 12
    logits = torch.tensor([[0.0, -12.0]])
    probs = torch.softmax(logits, -1).half()
    assert 0 < float(probs[0, 1]) < torch.finfo(torch.float16).tiny
    nll = metrics.negative_log_likelihood(probs, torch.tensor([1]))
    assert float(nll) == pytest.approx(12.0, abs=0.01)


def _brier64(p, y):
    return ((p - torch.nn.functional.one_hot(y, p.shape[1])) ** 2).sum(-1).mean()


def _ace64(p, y, n_bins=15):
    """Equal-mass bins over the sorted confidences; a tie group that a bin edge splits
    puts its share of examples in each bin at the group's accuracy (plain loops)."""
    conf, pred = p.max(-1)
    pairs = sorted(zip(conf.tolist(), (pred == y).tolist()))
    acc = {}
    for c, ok in pairs:
        acc.setdefault(c, []).append(ok)
    acc = {c: sum(v) / len(v) for c, v in acc.items()}
    n = len(pairs)
    sizes = [n // n_bins + (1 if b < n % n_bins else 0) for b in range(min(n_bins, n))]
    total, start = 0.0, 0
    for size in sizes:
        part = pairs[start:start + size]
        total += abs(sum(acc[c] for c, _ in part) - sum(c for c, _ in part))
        start += size
    return torch.tensor(total / n)


@pytest.mark.parametrize("fn,ref", [(metrics.adaptive_calibration_error, _ace64),
                                    (metrics.brier_score, _brier64)], ids=["ace", "brier"])
def test_half_precision_metrics_are_computed_in_float32(fn, ref):
    # bfloat16 bin sums of hundreds of examples lost the metric's third decimal
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(3000, 10, generator=g), -1).bfloat16()
    targets = torch.randint(0, 10, (3000,), generator=g)
    assert float(fn(probs, targets)) == pytest.approx(float(ref(probs.double(), targets)),
                                                      abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sample_probs_give_float32_uncertainty(dtype):
    """bfloat16 / float16 softmax samples: the entropies and the mutual information are
    computed in float32, to the float64 values of the same numbers (MI, a small difference
    of two entropies, was off by up to 0.01 for a mean of 0.023 in bfloat16)."""
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(1, 200, 10, generator=g) + 0.3 * torch.randn(8, 200, 10,
                                                                          generator=g)
    probs = torch.softmax(logits, -1).to(dtype)
    ref = from_sample_probs(probs.double() / probs.double().sum(-1, keepdim=True))
    got = from_sample_probs(probs)
    for name in ("probs", "entropy", "expected_entropy", "mutual_information"):
        value = getattr(got, name)
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value.double(), getattr(ref, name), rtol=0, atol=2e-4)
    h = sbnn_addons.uncertainty.entropy(probs)
    assert h.dtype == torch.float32
    torch.testing.assert_close(h.double(), sbnn_addons.uncertainty.entropy(probs.double()),
                               rtol=0, atol=1e-5)


def test_metrics_vs_samples_averages_half_precision_samples_in_float32():
    """bfloat16 samples are averaged in float32 (rows renormalised, as from_sample_probs
    reads them): the NLL of mc(k) equals the float64 one of the same numbers (the bfloat16
    mean was off in the fourth digit)."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(8, 300, 10, generator=g), -1).bfloat16()
    targets = torch.randint(0, 10, (300,), generator=g)
    ref = probs.double() / probs.double().sum(-1, keepdim=True)
    got, want = metrics_vs_samples(probs, targets), metrics_vs_samples(ref, targets)
    for k, a, b in zip(want["k"], got["nll"], want["nll"]):
        assert abs(a - b) < 2e-5, (k, a, b)
    with pytest.raises(ValueError, match="sum to one"):  # not renormalised into probs
        metrics_vs_samples(probs * 2, targets)


def test_mutual_information_of_confident_float32_samples_keeps_its_digits():
    # float32 softmax samples of confident predictions (as mc_predict returns them): the
    # MI is a difference of two nearly equal entropies; from float32 sums it was off by
    # up to 4e-7 for true values of 1e-9 to 1e-3, some clamped to 0, the order wrong
    g = torch.Generator().manual_seed(0)
    base = torch.randn(200, 10, generator=g) * 2
    base[:, 0] += torch.linspace(2, 14, 200)  # from unsure to very confident
    logits = base + 0.05 * torch.randn(16, 200, 10, generator=g)
    for pred in (from_sample_probs(torch.softmax(logits, -1)), time_as_samples(logits)):
        p64 = pred.sample_probs.double()  # the exact MI of these float32 probabilities
        mean = p64.mean(0)
        h = -(mean * mean.log()).sum(-1)
        mi = h - (-(p64 * p64.log()).sum(-1)).mean(0)
        assert float(mi.min()) > 0
        assert pred.mutual_information.dtype == torch.float32
        torch.testing.assert_close(pred.mutual_information.double(), mi, rtol=1e-6, atol=0)
        torch.testing.assert_close(pred.entropy.double(), h, rtol=1e-6, atol=0)
        torch.testing.assert_close(pred.probs.double(), mean, rtol=1e-6, atol=0)


def test_entropy_refuses_values_that_are_not_distributions_along_dim():
    """entropy(sample_probs, dim=0) (the samples' axis, not the classes') or per-class
    sigmoid outputs: entries in [0, 1] whose sums along ``dim`` are not 1 gave a number
    that is no entropy, silently; the error names the dim and the fix."""
    from sbnn_addons.uncertainty import entropy

    sp = torch.softmax(torch.randn(5, 3, 4), -1)  # [K, B, C]
    with pytest.raises(ValueError, match=r"sum to 1 along dim=0"):
        entropy(sp, dim=0)
    with pytest.raises(ValueError, match=r"sum to 1 along dim=-1.*softmax"):
        entropy(torch.sigmoid(torch.randn(3, 4)))
    torch.testing.assert_close(entropy(sp.transpose(0, 2), dim=0), entropy(sp).T)
    # a bfloat16 softmax misses 1 by its rounding over C terms: accepted
    probs = torch.softmax(3 * torch.randn(64, 10), -1).to(torch.bfloat16)
    entropy(probs)


def test_time_as_samples_warns_for_probabilities_as_mc_predict_does():
    """Per-step softmax outputs passed to time_as_samples got a second softmax (a flattened
    distribution, inflated entropy) without a word, where mc_predict warns for the same
    mistake."""
    logits = 3 * torch.randn(6, 4, 5)
    with pytest.warns(UserWarning, match=r"already a probability vector.*softmax"):
        twice = time_as_samples(torch.softmax(logits, -1))
    assert twice.entropy.mean() > time_as_samples(logits).entropy.mean()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        time_as_samples(logits)


# --------------------------------------------------------------------------- torch.compile
_P = torch.softmax(torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0)), -1)
_Y = torch.tensor([0, 1, 2, 3, 0])
_CASES = {  # function, good arguments, bad arguments, message
    "range": (lambda p: from_sample_probs(p).entropy, (_P,), (_P * 2 - 0.5,),
              "sample_probs must be probabilities in [0, 1] (no NaN)"),
    "nan": (entropy, (_P,), (_P.index_fill(1, torch.tensor([2]), float("nan")),),
            "entropy: probs must be probabilities in [0, 1] (no NaN)"),
    "sums": (lambda p: from_sample_probs(p).entropy, (_P,), (_P * 0.9,),
             "sample_probs rows must sum to one"),
    "axis": (lambda p: entropy(p, dim=0), (_P.softmax(0),), (_P,),
             "entropy: probs must sum to 1 along dim=0"),
    "targets": (metrics.negative_log_likelihood, (_P[0], _Y), (_P[0], _Y + 1),
                "targets must be class indices in [0, 4) for probs of 4 classes"),
    "metric_sums": (metrics.brier_score, (_P[0], _Y), (_P[0] * 0.9, _Y),
                    "probs rows must sum to one"),
    "logits": (lambda p: time_as_samples(p).entropy, (_P.log(),),
               (_P.log().index_fill(2, torch.tensor([1]), float("inf")),),
               "per_step_logits holds NaN or inf logits"),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_compiled_value_checks_raise_with_their_message(case):
    """In a graph, values that the eager check refuses raise when the graph runs, with the
    eager message (less the values it quotes), never silently."""
    fn, good, bad, message = _CASES[case]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*good), fn(*good), rtol=0, atol=0)
    with pytest.raises(ValueError, match=re.escape(message)):
        fn(*bad)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        compiled(*bad)


def test_compiled_argument_errors_reach_the_caller_with_their_message():
    """A wrong shape or dtype in a graph: Dynamo reported `Observed exception`, with the
    library's message in its debug context only; it comes first."""
    torch._dynamo.reset()
    cases = [
        (lambda p: from_sample_probs(p).entropy, (_P[0],), "sample_probs must be [K, B, C]"),
        (lambda p: time_as_samples(p).entropy, (_P[0],), "per_step_logits must be a tensor"),
        (metrics.brier_score, (_P[0], _Y.float()), "targets must be integer class indices"),
        (metrics.negative_log_likelihood, (_P[0], _Y[:3]), "probs must be [N, C] and targets"),
    ]
    for fn, args, message in cases:
        with pytest.raises((ValueError, TypeError), match=re.escape(message)):
            fn(*args)
        with pytest.raises(RuntimeError, match="^" + re.escape(message)):
            torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
