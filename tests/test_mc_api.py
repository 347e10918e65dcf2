"""One Monte Carlo API (issue 15, item 6): ``sbnn_addons.mc_predict`` and its alias
``sbnn_addons.uncertainty.predict`` run the same code, without gradients, from a reset
neuron state before every pass, with the same signature for the core and both hosts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import snntorch as snn
import torch
from torch import nn

import sbnn_addons as sb
from sbnn_addons import snntorch as sbnn_snn
from sbnn_addons import uncertainty

pytest.importorskip("spikingjelly")
from spikingjelly.activation_based import functional, layer, neuron  # noqa: E402

from sbnn_addons import spikingjelly as sbnn_sj  # noqa: E402

T, B = 6, 5


def _rate(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g) < 0.4).float()


# --------------------------------------------------------------------------- models
def core_model() -> nn.Module:
    torch.manual_seed(0)
    return sb.track_variance(nn.Sequential(
        sb.BayesLinear(12, 16, std=0.4), sb.IWSTSpike("st", std=0.2),
        sb.BayesLinear(16, 4, std=0.4)))


def snntorch_seq() -> nn.Module:
    """snnTorch tutorial style: ``nn.Sequential`` of ``init_hidden=True`` neurons."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 20), snn.Leaky(beta=0.9, init_hidden=True),
                        nn.Linear(20, 4), snn.Leaky(beta=0.9, init_hidden=True, output=True))
    with torch.no_grad():
        net[0].weight.mul_(3)
    return sbnn_snn.to_sbnn(net, std=0.3)


def snn_loop(m, x):
    """The time loop of an ``init_hidden`` Sequential: logits = time-mean output membrane."""
    return torch.stack([m(x_t)[1] for x_t in x]).mean(0)


def spikingjelly_multistep() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(12, 20), neuron.LIFNode(tau=2.0),
                        layer.Linear(20, 4), neuron.LIFNode(tau=2.0))
    functional.set_step_mode(net, "m")
    with torch.no_grad():
        net[2].weight.mul_(4)
    return sbnn_sj.to_sbnn(net)


def sj_rate(m, x):
    return m(x).mean(0)  # [T, B, C] -> firing rate [B, C]


CASES = {
    "core": (core_model, None, (B, 12)),
    "snntorch": (snntorch_seq, snn_loop, (T, B, 12)),
    "spikingjelly": (spikingjelly_multistep, sj_rate, (T, B, 12)),
}


# --------------------------------------------------------------------------- one API
def test_one_function_three_names():
    from sbnn_addons.modes import mc_predict as via_modes

    assert sb.mc_predict is uncertainty.mc_predict is uncertainty.predict is via_modes


@pytest.mark.parametrize("host", list(CASES))
def test_both_entry_points_give_the_same_result_with_the_same_seed(host):
    make, fwd, shape = CASES[host]
    model, x = make(), _rate(shape)
    a = sb.mc_predict(model, x, 4, seed=3, forward=fwd)
    b = uncertainty.predict(model, x, num_samples=4, seed=3, forward=fwd)
    assert isinstance(a, sb.Prediction) and a.probs.shape == (B, 4)
    torch.testing.assert_close(a.sample_probs, b.sample_probs, rtol=0, atol=0)
    torch.testing.assert_close(a.mutual_information, b.mutual_information, rtol=0, atol=0)
    assert a.sample_probs.std(0).max() > 0  # the passes are stochastic draws


@pytest.mark.parametrize("host", list(CASES))
def test_equals_a_hand_written_reference_loop_with_the_same_seed(host):
    """mc_predict against the loop a user writes: seed_spikes, then per pass the host's
    reset and one forward in "mc" mode; bitwise, also after a forward that left state of
    another batch size behind, and with fold=False chunks."""
    make, fwd, shape = CASES[host]
    fwd = fwd or (lambda m, x: m(x))
    model, x = make(), _rate(shape)
    with torch.no_grad():
        fwd(model, _rate((*shape[:-2], 2, shape[-1]), seed=7))  # state of batch 2 left
    pred = sb.mc_predict(model, x, 4, seed=5, forward=fwd, chunk_size=3)
    reset = uncertainty.default_reset(model)
    sb.seed_spikes(model, 5)
    with torch.no_grad(), sb.mode(model, "mc"):
        ref = []
        for _ in range(4):
            reset(model)
            ref.append(torch.softmax(fwd(model, x).float(), -1))
    torch.testing.assert_close(pred.sample_probs, torch.stack(ref), rtol=0, atol=0)


@pytest.mark.parametrize("host", list(CASES))
def test_no_graph_is_built(host):
    make, fwd, shape = CASES[host]
    model, x = make(), _rate(shape)
    assert any(p.requires_grad for p in model.parameters())
    seen = []

    def forward(m, inputs):
        seen.append(torch.is_grad_enabled())
        return (fwd or (lambda m_, x_: m_(x_)))(m, inputs)

    pred = sb.mc_predict(model, x, 3, forward=forward)
    assert seen == [False, False, False]
    for t in (pred.probs, pred.sample_probs, pred.entropy, pred.mutual_information):
        assert not t.requires_grad and t.grad_fn is None
    assert torch.is_grad_enabled()  # restored


def _membranes(model):
    return [m.mem.clone() for m in model.modules() if isinstance(m, snn.Leaky)]


def test_snntorch_state_is_reset_between_passes():
    model, x = snntorch_seq(), _rate((T, B, 12))
    with torch.no_grad():
        for x_t in 3 * x:  # a forward that leaves a large membrane behind
            model(x_t)
    assert max(float(m.abs().max()) for m in _membranes(model)) > 1
    a = sb.mc_predict(model, x, 3, seed=0, forward=snn_loop)
    with torch.no_grad():
        model(3 * x[0])  # state left again
    b = sb.mc_predict(model, x, 3, seed=0, forward=snn_loop)
    torch.testing.assert_close(a.sample_probs, b.sample_probs, rtol=0, atol=0)
    # the same as on a freshly converted model (zero state)
    fresh = sb.mc_predict(snntorch_seq(), x, 3, seed=0, forward=snn_loop)
    torch.testing.assert_close(a.sample_probs, fresh.sample_probs, rtol=0, atol=0)
    # state reset after the passes too: what snntorch.utils.reset leaves
    assert all(float(m.abs().max()) == 0 for m in _membranes(model))
    # one pass is one sequence from a zero state: the same as a manual host reset + loop
    sb.seed_spikes(model, 5)
    manual = []
    with torch.no_grad(), sb.mode(model, "mc"):
        for _ in range(2):
            import snntorch.utils

            snntorch.utils.reset(model)
            manual.append(torch.softmax(snn_loop(model, x), -1))
    pred = sb.mc_predict(model, x, 2, seed=5, forward=snn_loop)
    torch.testing.assert_close(pred.sample_probs, torch.stack(manual), rtol=0, atol=0)


def test_spikingjelly_state_is_reset_between_passes():
    model, x = spikingjelly_multistep(), _rate((T, B, 12))
    with torch.no_grad():
        model(3 * x)  # leaves membranes behind
    nodes = [m for m in model.modules() if isinstance(m, neuron.LIFNode)]
    assert any(isinstance(n.v, torch.Tensor) and float(n.v.abs().max()) > 0 for n in nodes)
    a = sb.mc_predict(model, x, 3, seed=0, forward=sj_rate)
    with torch.no_grad():
        model(3 * x)
    b = sb.mc_predict(model, x, 3, seed=0, forward=sj_rate)
    torch.testing.assert_close(a.sample_probs, b.sample_probs, rtol=0, atol=0)
    fresh = sb.mc_predict(spikingjelly_multistep(), x, 3, seed=0, forward=sj_rate)
    torch.testing.assert_close(a.sample_probs, fresh.sample_probs, rtol=0, atol=0)
    # and the same as the host's own reset before each pass
    sb.seed_spikes(model, 5)
    manual = []
    with torch.no_grad(), sb.mode(model, "mc"):
        for _ in range(2):
            functional.reset_net(model)
            manual.append(torch.softmax(sj_rate(model, x), -1))
    pred = sb.mc_predict(model, x, 2, seed=5, forward=sj_rate)
    torch.testing.assert_close(pred.sample_probs, torch.stack(manual), rtol=0, atol=0)


@pytest.mark.parametrize("host", ["snntorch", "spikingjelly"])
def test_a_seed_replays_dropout_in_training_mode(host):
    """Monte Carlo dropout on top of the weight noise: a dropout layer left in training
    mode (snnTorch: ``nn.Dropout``; SpikingJelly: ``layer.Dropout``, one mask per sequence)
    draws from PyTorch's global generator, which the seed now covers too: two calls with
    the same seed give the same result (they differed), another seed differs, and the
    global generator is left as it was."""
    torch.manual_seed(0)
    if host == "snntorch":
        net = nn.Sequential(nn.Linear(12, 20), snn.Leaky(beta=0.9, init_hidden=True),
                            nn.Dropout(0.5), nn.Linear(20, 4),
                            snn.Leaky(beta=0.9, init_hidden=True, output=True))
        model, fwd = sbnn_snn.to_sbnn(net, std=0.3), snn_loop
    else:
        net = nn.Sequential(layer.Linear(12, 20), neuron.LIFNode(tau=2.0),
                            layer.Dropout(0.5), layer.Linear(20, 4), neuron.LIFNode(tau=2.0))
        functional.set_step_mode(net, "m")
        model, fwd = sbnn_sj.to_sbnn(net), sj_rate
    with torch.no_grad():
        model[0].weight.mul_(8)
        model[3].weight.mul_(4)
    model.train()
    x = _rate((T, B, 12))
    state = torch.get_rng_state()
    a = sb.mc_predict(model, x, 4, seed=3, forward=fwd)
    assert torch.equal(torch.get_rng_state(), state)
    b = sb.mc_predict(model, x, 4, seed=3, forward=fwd)
    other = sb.mc_predict(model, x, 4, seed=4, forward=fwd)
    assert torch.equal(a.sample_probs, b.sample_probs)
    assert not torch.equal(a.sample_probs, other.sample_probs)
    with sb.mode(model, "mean"):  # the dropout alone makes the passes differ
        assert sb.mc_predict(model, x, 4, seed=3, forward=fwd,
                             eval_mode="mean").mutual_information.sum() > 0


def test_default_forward_errors_name_the_forward_hook():
    with pytest.raises(TypeError, match="forward="):  # snnTorch Sequential: (spk, mem)
        sb.mc_predict(snntorch_seq(), _rate((T, B, 12)), 2)
    with pytest.raises(ValueError, match=r"m\(x\)\.mean\(0\) for this multi-step"):
        sb.mc_predict(spikingjelly_multistep(), _rate((T, B, 12)), 2)  # [T, B, C]


def test_a_single_step_model_is_told_to_loop_over_the_steps():
    """A single-step SpikingJelly model returns [T, B, C] for a [T, B, F] input (it takes T
    for the batch): the message shows the loop over the steps, not ``m(x).mean(0)``, which
    would silently treat the whole sequence as one step; the loop it shows works."""
    model = spikingjelly_multistep()
    functional.set_step_mode(model, "s")
    x = _rate((T, B, 12))
    with pytest.raises(ValueError, match=r"x_t in x\]\)\.mean\(0\) for this single-step"):
        sb.mc_predict(model, x, 2)
    pred = sb.mc_predict(model, x, 2, seed=0,
                         forward=lambda m, x: torch.stack([m(x_t) for x_t in x]).mean(0))
    functional.set_step_mode(model, "m")
    ref = sb.mc_predict(model, x, 2, seed=0, forward=sj_rate)
    torch.testing.assert_close(pred.probs, ref.probs)


# --------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("k", [0, -2, 2.0, True, None, "4"])
def test_bad_num_samples(k):
    with pytest.raises(ValueError, match="num_samples"):
        sb.mc_predict(core_model(), _rate((B, 12)), k)


@pytest.mark.parametrize("bad", [[[0.0] * 12] * B, np.zeros((B, 12), np.float32), 3.0, None])
def test_non_tensor_input(bad):
    with pytest.raises(TypeError, match="inputs must be a torch.Tensor"):
        sb.mc_predict(core_model(), bad, 2)


@pytest.mark.parametrize("host", list(CASES))
def test_empty_batch_and_empty_sequence(host):
    make, fwd, shape = CASES[host]
    empties = [(*shape[:-2], 0, shape[-1])]  # batch 0
    if len(shape) == 3:
        empties.append((0, *shape[1:]))  # T = 0
    for s in empties:
        with pytest.raises(ValueError, match="zero-size dimension"):
            sb.mc_predict(make(), torch.zeros(s), 2, forward=fwd)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_input(value):
    x = _rate((B, 12))
    x[0, 3] = value
    with pytest.raises(ValueError, match="NaN"):
        sb.mc_predict(core_model(), x, 2)
    with sb.check_finite(False):  # the documented switch
        sb.mc_predict(core_model(), x, 1)


def test_other_bad_arguments():
    model, x = core_model(), _rate((B, 12))
    with pytest.raises(TypeError, match="nn.Module"):
        sb.mc_predict(object(), x, 2)
    with pytest.raises(ValueError, match="eval_mode"):
        sb.mc_predict(model, x, 2, eval_mode="deploy")
    with pytest.raises(ValueError, match="chunk_size"):
        sb.mc_predict(model, x, 2, chunk_size=0)
    with pytest.raises(ValueError, match="batch_dim"):
        sb.mc_predict(model, x, 2, fold=True, batch_dim=4)
    assert sb.get_mode(model) == "sample"
    # a custom forward may take several tensors; each is checked
    pred = sb.mc_predict(model, (x, x), 2, forward=lambda m, xs: m(xs[0] + xs[1]))
    assert pred.probs.shape == (B, 4)
    with pytest.raises(ValueError, match="zero-size"):
        sb.mc_predict(model, (x, x[:0]), 2, forward=lambda m, xs: m(xs[0]))


def test_output_probs_and_log_probs_are_not_softmaxed_again():
    # a model that ends in a softmax: its probabilities are used as they are; as logits
    # they get a second softmax (flattened), which warns
    model = core_model()
    x = torch.rand(B, 12)
    with_softmax = nn.Sequential(model, nn.Softmax(-1))
    with_log_softmax = nn.Sequential(model, nn.LogSoftmax(-1))
    ref = sb.mc_predict(model, x, 4, seed=3)
    probs = sb.mc_predict(with_softmax, x, 4, seed=3, output="probs")
    logp = sb.mc_predict(with_log_softmax, x, 4, seed=3, output="log_probs")
    torch.testing.assert_close(probs.probs, ref.probs)
    torch.testing.assert_close(logp.probs, ref.probs)
    with pytest.warns(UserWarning, match="already a probability vector.*output='probs'"):
        twice = sb.mc_predict(with_softmax, x, 4, seed=3)
    assert twice.entropy.mean() > ref.entropy.mean()  # flattened
    with pytest.raises(ValueError, match="must return probabilities.*output='logits'"):
        sb.mc_predict(model, x, 2, output="probs")  # logits given as probabilities
    with pytest.raises(ValueError, match="output must be one of"):
        sb.mc_predict(model, x, 2, output="softmax")
    # fold=True goes the same way
    folded = sb.mc_predict(with_softmax, x, 4, output="probs", fold=True)
    assert torch.allclose(folded.probs.sum(-1), torch.ones(B))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_probs_and_log_probs_outputs(dtype):
    """A bfloat16 / float16 model ending in a softmax: its rows miss 1 by the dtype's
    rounding over C terms (a few 1e-3 in bfloat16), which output="probs" / "log_probs"
    refused as "not probabilities"; they are accepted within that rounding and
    renormalised in float32, and equal the prediction from the same model's logits."""
    model = core_model().to(dtype)
    x = (torch.rand(64, 12) * 4).to(dtype)
    ref = sb.mc_predict(model, x, 4, seed=3)
    for head, output in ((nn.Softmax(-1), "probs"), (nn.LogSoftmax(-1), "log_probs")):
        pred = sb.mc_predict(nn.Sequential(model, head), x, 4, seed=3, output=output)
        assert pred.probs.dtype == torch.float32
        torch.testing.assert_close(pred.sample_probs.sum(-1), torch.ones(4, 64))
        torch.testing.assert_close(pred.probs, ref.probs, rtol=0, atol=2e-2)


def test_time_major_input_errors_name_the_fix():
    """A model on time-major input [T, B, ...]: fold=True with the default batch_dim=0
    repeats the time axis, and the error names batch_dim=1; an output that keeps its time
    axis [T, B, C] gets the time-reduction hint without a wrong batch size."""
    from torch import nn

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.lif, self.out = sb.BayesLinear(12, 8), sb.LIF(), nn.Linear(8, 4)

        def forward(self, x):  # [T, B, 12] -> [T, B, 4]
            return self.out(self.lif.run(self.fc(x)))

    model, x = Seq(), _rate((T, B, 12))
    readout = lambda m, xs: m(xs).mean(0)  # noqa: E731
    with pytest.raises(ValueError, match=r"fold=True.*batch_dim=1 for time-major"):
        sb.mc_predict(model, x, 3, forward=readout, fold=True)
    pred = sb.mc_predict(model, x, 3, forward=readout, fold=True, batch_dim=1)
    assert pred.probs.shape == (B, 4)
    with pytest.raises(ValueError, match=r"must return logits \[B, C\], got shape \(6, 5, 4\)"):
        sb.mc_predict(model, x, 2)


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_a_batchnorm_in_training_mode_is_refused_and_left_unchanged(step_mode):
    """A converted SpikingJelly CSNN with its BatchNorm kept (the converters' default),
    still in training mode after training: mc_predict would normalise by the evaluation
    batch and write its statistics into the running averages. It raises and names
    model.eval(); the running statistics are untouched; after eval() it predicts."""
    torch.manual_seed(0)
    net = nn.Sequential(
        layer.Conv2d(1, 4, 3, padding=1), layer.BatchNorm2d(4), neuron.LIFNode(),
        layer.Flatten(), layer.Linear(4 * 8 * 8, 3), neuron.LIFNode())
    functional.set_step_mode(net, step_mode)
    model = sbnn_sj.to_sbnn(net)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    x = torch.rand(T, B, 1, 8, 8) * 3
    forward = (lambda m, x: torch.stack([m(x_t) for x_t in x]).mean(0)) if step_mode == "s" \
        else (lambda m, x: m(x).mean(0))
    with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)"):
        sb.mc_predict(model, x, 4, forward=forward)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2]
    model.eval()
    pred = sb.mc_predict(model, x, 4, forward=forward)
    assert pred.probs.shape == (B, 3)
    assert torch.equal(bn.running_mean, before[0])


def test_one_class_output_is_refused_and_the_binary_fix_works():
    """One logit per example: the softmax is 1 everywhere, entropy and MI 0, silently.
    It raises; the two-logit form the message shows gives sigmoid(z)."""
    torch.manual_seed(0)
    model = sb.track_variance(nn.Sequential(
        sb.BayesLinear(12, 16, std=0.4), sb.IWSTSpike("st", std=0.2), nn.Linear(16, 1)))
    x = _rate((B, 12))
    for kw in ({}, {"fold": True}, {"output": "probs", "forward": lambda m, x: m(x) * 0 + 1}):
        with pytest.raises(ValueError, match=r"1 class\(es\).*binary classifier"):
            sb.mc_predict(model, x, 2, **kw)
    pred = sb.mc_predict(model, x, 3, seed=0,
                         forward=lambda m, x: torch.cat([torch.zeros_like(z := m(x)), z], -1))
    assert pred.probs.shape == (B, 2) and (pred.entropy > 0).all()
    with torch.no_grad(), sb.mode(model, "mean"):
        want = torch.sigmoid(model(x))[:, 0]
    mean = sb.mc_predict(model, x, 1, eval_mode="mean",
                         forward=lambda m, x: torch.cat([torch.zeros_like(z := m(x)), z], -1))
    torch.testing.assert_close(mean.probs[:, 1], want)


@pytest.mark.parametrize("seed", [1.5, "0", True])
def test_a_seed_that_is_not_an_integer_is_named(seed):
    """seed=1.5 was truncated to 1: the stream of another seed, silently."""
    model, x = core_model(), _rate((B, 12))
    with pytest.raises(TypeError, match="seed must be an integer or None"):
        sb.mc_predict(model, x, 2, seed=seed)
    with pytest.raises(TypeError, match="seed must be an integer or None"):
        sb.seed_spikes(model, seed)
    with pytest.raises(TypeError, match="seed must be an integer or None"):
        sb.IWSTSpike("st").manual_seed(seed)
    a = sb.mc_predict(model, x, 2, seed=np.int64(3))  # numpy integers are integers
    b = sb.mc_predict(model, x, 2, seed=3)
    torch.testing.assert_close(a.sample_probs, b.sample_probs, rtol=0, atol=0)


def test_forward_reset_and_batch_dim_of_the_wrong_type_are_named():
    model, x = core_model(), _rate((B, 12))
    with pytest.raises(TypeError, match="forward must be a callable"):
        sb.mc_predict(model, x, 2, forward=3)
    with pytest.raises(TypeError, match="reset must be a callable"):
        sb.mc_predict(model, x, 2, reset="snntorch")
    with pytest.raises(TypeError, match="batch_dim must be an int"):
        sb.mc_predict(model, x, 2, fold=True, batch_dim="1")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        sb.seed_spikes(object(), 0)


def test_uncounted_spikes_and_synops_are_named_not_nan():
    """synops_per_example() of a prediction without SynOps counts returned NaN, and
    spike_rates() an empty dict, as if the model had no spiking layer."""
    model, x = core_model(), _rate((B, 12))
    counted = sb.mc_predict(model, x, 2)
    assert counted.synops_per_example() > 0 and counted.spike_rates()
    bare = sb.mc_predict(model, x, 2, count_spikes=False)
    with pytest.raises(ValueError, match="no SynOps counts.*count_spikes=True"):
        bare.synops_per_example()
    with pytest.raises(ValueError, match="no spike counts.*count_spikes=True"):
        bare.spike_rates()
    with pytest.raises(ValueError, match="synops=True"):
        sb.mc_predict(model, x, 2, synops=False).synops_per_example()
    no_spikes = sb.mc_predict(nn.Sequential(sb.BayesLinear(12, 4)), x * 0.5, 1)
    assert no_spikes.spike_rates() == {} and no_spikes.synops_per_example() == 0.0


@pytest.mark.parametrize("output", ["logits", "probs", "log_probs"])
def test_nan_outputs_are_named_as_the_models(output):
    """A diverged model's NaN logits were reported as "pass softmax(logits), not logits":
    the message names the output; -inf logits (masked classes) stay accepted."""
    model, x = core_model(), _rate((B, 12))
    with pytest.raises(ValueError, match=r"forward pass's output holds NaN or inf.*diverged"):
        sb.mc_predict(model, x, 2, output=output,
                      forward=lambda m, x: torch.full((B, 4), math.nan))
    with pytest.raises(ValueError, match=r"per_step_logits holds NaN or inf logits"):
        uncertainty.time_as_samples(torch.full((T, B, 4), math.nan))
    masked = torch.tensor([[0.0, -math.inf, 1.0]]).expand(B, -1)
    pred = sb.mc_predict(model, x, 1, forward=lambda m, x: masked)
    assert float(pred.probs[0, 1]) == 0.0


@pytest.mark.parametrize("make", [
    lambda: sb.BayesLinear(12, 4),  # a readout alone: its noise never acts
    lambda: nn.Sequential(nn.Linear(12, 8), nn.ReLU(), sb.BayesLinear(8, 4)),
])
def test_identical_passes_of_a_model_whose_noise_never_acts_are_warned_about(make):
    """A model whose only Bayesian layer is a readout (its noise acts at a spike function
    only, and none follows) gave K identical passes and MI 0, with no word of why (the
    unconverted-model warning does not fire: the model has an SBNN module)."""
    model, x = make().eval(), _rate((B, 12))
    with pytest.warns(UserWarning, match=r"3 passes.*identical.*readout.*check_variance_flow"):
        pred = sb.mc_predict(model, x, 3)
    assert float(pred.mutual_information.max()) < 1e-12
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sb.mc_predict(model, x, 1)  # one pass: nothing to compare
        sb.mc_predict(model, x, 3, eval_mode="mean")  # identical by design
        sb.mc_predict(core_model(), x, 3)  # noise that acts: no warning


def test_an_unconverted_model_is_warned_about():
    """K identical passes of a host model gave MI 0 with no word of why."""
    plain, x = nn.Sequential(nn.Linear(12, 4)), _rate((B, 12))
    with pytest.warns(UserWarning, match=r"no SBNN module.*convert the model first"):
        pred = sb.mc_predict(plain, x, 3)
    assert float(pred.mutual_information.max()) == 0.0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sb.mc_predict(core_model(), x, 2)  # a converted / core model: no warning


def test_mc_predict_on_a_compiled_model_names_its_layers_as_the_model_does():
    """``mc_predict`` (and a ``SpikeMonitor``) on a compiled model,
    ``torch.compile(net)``, counted the same spikes as on ``net`` but keyed them
    ``'_orig_mod.2.surrogate_function'`` (the wrapper's attribute): a lookup by the
    model's own layer names failed with a KeyError. The names are the model's."""
    torch.manual_seed(0)
    host = nn.Sequential(layer.Linear(6, 8), neuron.LIFNode(), layer.Linear(8, 3),
                         neuron.LIFNode())
    functional.set_step_mode(host, "m")
    net = sbnn_sj.to_sbnn(host).eval()
    x = torch.rand(3, 4, 6) * 4
    compiled = torch.compile(net, fullgraph=True, backend="eager")
    preds = []
    for model in (net, compiled):
        torch.manual_seed(3)
        preds.append(sb.mc_predict(model, x, 2, forward=lambda m, x: m(x).mean(0)))
    eager, comp = preds
    assert set(eager.layer_spike_counts) == {"1.surrogate_function", "3.surrogate_function"}
    assert comp.layer_spike_counts.keys() == eager.layer_spike_counts.keys()
    assert comp.layer_synops.keys() == eager.layer_synops.keys()
    assert comp.spike_rates() == eager.spike_rates()
    with sb.metrics.SpikeMonitor(compiled) as mon:
        functional.reset_net(net)
        compiled(x)
    assert set(mon.counts) == set(eager.layer_spike_counts)
