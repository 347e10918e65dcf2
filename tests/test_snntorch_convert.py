"""snnTorch adapter: exact equivalence, variance flow and reset consistency."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _snntorch_nets import BETA, MODELS, EditedLoop, make, run

import sbnn_addons
from sbnn_addons import get_variance
from sbnn_addons.snntorch import SBNNLeaky, SBNNRLeaky, reset, to_sbnn

ALL = sorted(MODELS)


@pytest.mark.parametrize("name", ALL)
def test_mean_mode_equals_original_exactly(name):
    net, x = make(name)
    ref_spk, ref_mem = run(net, x)
    assert ref_spk.sum() > 0, "the test model must spike"
    sbnn = to_sbnn(net, std=0.0, learn_std=False, spike_std=None)
    with sbnn_addons.mode(sbnn, "mean"):
        spk, mem = run(sbnn, x)
    assert torch.equal(spk, ref_spk)
    assert torch.equal(mem, ref_mem)
    # the original is untouched (conversion works on a copy)
    assert not any(isinstance(m, (SBNNLeaky, SBNNRLeaky)) for m in net.modules())


@pytest.mark.parametrize("name", ALL)
def test_zero_std_sample_mode_is_also_deterministic(name):
    net, x = make(name)
    ref_spk, _ = run(net, x)
    sbnn = to_sbnn(net, std=0.0, learn_std=False, spike_std=None)
    spk, _ = run(sbnn, x)  # sample mode, sigma = 0 -> 1[u > 0]
    assert torch.equal(spk, ref_spk)


def _record_variance(neuron):
    seen = []
    neuron.spike_grad.register_forward_pre_hook(
        lambda mod, args: seen.append(get_variance(args[0]).detach().clone())
    )
    return seen


def _record_spikes(neuron):
    out = []

    def hook(mod, args, output):
        spk = output[0] if isinstance(output, tuple) else output
        out.append(spk.detach().clone())

    neuron.register_forward_hook(hook)
    return out


@pytest.mark.parametrize("name", ["seq_leaky", "loop_leaky", "seq_rleaky", "loop_rleaky"])
def test_variance_follows_leaky_recurrence(name):
    net, x = make(name)
    sbnn = to_sbnn(net, std=0.3, learn_std=False)
    sbnn_addons.seed_spikes(sbnn, 1)
    if name.startswith("seq"):
        fc, lif = sbnn[0], sbnn[1]
    else:
        fc, lif = sbnn.fc1, sbnn.lif1
    seen = _record_variance(lif)
    spikes = _record_spikes(lif)
    run(sbnn, x)
    assert len(seen) == x.shape[0]
    recurrent = getattr(lif, "recurrent", None)
    expected = torch.zeros(())
    prev_spk = torch.zeros_like(spikes[0])
    for t in range(x.shape[0]):
        var_t = fc.output_variance(x[t])
        if recurrent is not None:  # the converted RLeaky.recurrent adds its own LRT variance
            var_t = var_t + recurrent.output_variance(prev_spk)
        expected = BETA**2 * expected + var_t
        torch.testing.assert_close(seen[t].expand_as(expected), expected, rtol=1e-5, atol=1e-7)
        prev_spk = spikes[t]
    assert float(expected.min()) > 0


_MOMENT_OPTIONS = {
    "reset subtract": dict(),
    "reset zero": dict(reset_mechanism="zero"),
    "reset none": dict(reset_mechanism="none"),
    "learn_beta": dict(learn_beta=True),
    "per-neuron beta": dict(beta=torch.linspace(0.5, 0.95, 32)),
}


def _leaky_net(**options) -> torch.nn.Sequential:
    """Sequential(Linear(64, 32), Leaky(**options), Linear(32, 10), Leaky(output=True)) with
    init_hidden, seeded, the first layer scaled so that the first neuron fires often."""
    import snntorch as snn

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 32), snn.Leaky(init_hidden=True, **{"beta": BETA, **options}),
        torch.nn.Linear(32, 10), snn.Leaky(beta=BETA, init_hidden=True, output=True))
    with torch.no_grad():
        net[0].weight.mul_(3)
    return net


def _leaky_step_trace(option: str, monkeypatch=None):
    """Spikes, membranes, the variances at the spike function and the gradients of a
    converted Sequential(Linear, Leaky(**option), Linear, Leaky) over 8 seeded steps;
    with ``monkeypatch``, the neuron's variance update left to the variance rules."""
    from snntorch import utils

    from sbnn_addons import snntorch as adapter

    if monkeypatch is not None:
        monkeypatch.setattr(adapter, "_MOMENT_FORMS", {})
    sbnn = sbnn_addons.seed_spikes(to_sbnn(_leaky_net(**_MOMENT_OPTIONS[option])), 3)
    seen, spikes = _record_variance(sbnn[1]), _record_spikes(sbnn[1])
    x = (torch.rand(8, 4, 64) < 0.3).float()
    utils.reset(sbnn)
    mems, loss = [], 0.0
    for t in range(x.shape[0]):
        _, mem = sbnn(x[t])
        mems.append(sbnn[1].mem.detach().clone())
        loss = loss + mem.sum()
    loss.backward()
    grads = [p.grad.clone() for p in sbnn.parameters() if p.grad is not None]
    return sbnn, x, (seen, spikes, mems), grads


@pytest.mark.parametrize("option", sorted(_MOMENT_OPTIONS))
def test_leaky_variance_recurrence_written_out_equals_the_rules(option, monkeypatch):
    """A converted snn.Leaky writes its variance update out (V_t = beta^2 (1 - r)^2
    V_{t-1} + var(I_t), r = 0 unless it resets to zero) instead of tracing snnTorch's
    operations through the variance rules: the variances equal an independent loop, and
    spikes, membranes and variances equal the rules' own path bitwise, the gradients to
    rounding."""
    sbnn, x, trace, grads = _leaky_step_trace(option)
    seen, spikes, _ = trace
    fc, lif = sbnn[0], sbnn[1]
    beta = lif.beta.detach().clamp(0, 1)
    zero = _MOMENT_OPTIONS[option].get("reset_mechanism") == "zero"
    expected = torch.zeros(())
    for t in range(x.shape[0]):
        if zero and t:  # reset to zero by the spike the last step emitted
            expected = expected * (1 - spikes[t - 1]) ** 2
        expected = beta**2 * expected + fc.output_variance(x[t])
        torch.testing.assert_close(seen[t].expand_as(expected), expected,
                                   rtol=1e-5, atol=1e-7)
    assert 0 < float(torch.cat(spikes).mean()) < 1
    _, _, trace_rules, grads_rules = _leaky_step_trace(option, monkeypatch)
    for a, b in zip(trace, trace_rules):
        for x_a, x_b in zip(a, b):
            assert torch.equal(x_a.expand_as(x_b), x_b.expand_as(x_a))
    assert len(grads) == len(grads_rules) > 0
    for a, b in zip(grads, grads_rules):  # a learned beta: its two uses summed in turn
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["seq_conv", "tutorial_conv"])
def test_conv_maxpool_variance_is_gathered_at_argmax(name):
    net, x = make(name)
    sbnn = to_sbnn(net, std=0.3, learn_std=False, std_mode="weight")
    conv, lif = (sbnn[0], sbnn[2]) if name == "seq_conv" else (sbnn.conv1, sbnn.lif1)
    seen = _record_variance(lif)
    run(sbnn, x)
    expected = None
    for t in range(x.shape[0]):
        with sbnn_addons.moments.no_variance_flow():
            mean = F.conv2d(x[t], conv.weight, conv.bias, padding=1)
            _, idx = F.max_pool2d(mean, 2, return_indices=True)
        var = conv.output_variance(x[t]).flatten(2).gather(2, idx.flatten(2)).view_as(idx)
        # the neuron's variance is not the pooled maximum of the variance
        expected = var if expected is None else BETA**2 * expected + var
        torch.testing.assert_close(seen[t], expected, rtol=1e-5, atol=1e-7)
    full = conv.output_variance(x[0])
    assert not torch.allclose(F.max_pool2d(full, 2), seen[0])


@pytest.mark.parametrize("name", ALL)
def test_reset_equals_emitted_spike(name):
    net, x = make(name)
    sbnn = to_sbnn(net, spike_std=0.4, std=0.3)
    sbnn_addons.seed_spikes(sbnn, 3)
    neurons = [m for m in sbnn.modules() if isinstance(m, (SBNNLeaky, SBNNRLeaky))]
    records = {id(n): [] for n in neurons}

    def hook(mod, args, output):
        spk = output[0] if isinstance(output, tuple) else output
        records[id(mod)].append((spk.detach().clone(), mod.reset.clone()))

    for n in neurons:
        n.register_forward_hook(hook)
    spk, _ = run(sbnn, x)
    with sbnn_addons.mode(sbnn, "mean"):
        mean_spk, _ = run(sbnn, x)
    assert not torch.equal(spk, mean_spk), "the spikes must be stochastic for this test"
    for n in neurons:
        rec = records[id(n)][: x.shape[0]]
        assert len(rec) == x.shape[0]
        assert not rec[0][1].any()  # first step after reset: no reset
        for t in range(1, len(rec)):
            assert torch.equal(rec[t][1], rec[t - 1][0]), f"step {t}"


def _converted_fc_leaky():
    """``fc`` (Linear 6 -> 8) and ``lif`` (snn.Leaky, beta 0.9, explicit state) as
    attributes of a module, converted with std 0.3 under seed 0."""
    import snntorch as snn
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 8)
            self.lif = snn.Leaky(beta=0.9)

    torch.manual_seed(0)
    return to_sbnn(Net(), std=0.3)


def test_spikes_are_marked_binary_and_the_reset_is_a_private_copy():
    """With graded_spikes_factor 1 the neuron returns the spike tensor itself, marked 0/1
    (a Bayesian layer fed by it skips x * x); changing it in place afterwards does not
    change the next step's reset, which is the emitted spike."""
    from sbnn_addons.functional import is_binary

    sbnn = _converted_fc_leaky()
    lif = sbnn.lif
    cur = sbnn.fc(torch.rand(4, 6) * 3)
    spk, mem = lif(cur, lif.init_leaky())
    assert is_binary(spk) and spk.any()
    emitted = spk.detach().clone()
    spk.detach().mul_(0)  # the caller changes its spikes in place
    lif(sbnn.fc(torch.rand(4, 6)), mem)
    assert torch.equal(lif.reset, emitted)


def test_edits_of_spike_factor_and_beta_through_data_are_seen_at_the_next_step():
    """The neuron reads its scalar graded_spikes_factor and beta at every step (no cache
    keyed on the version counter, which an edit through .data does not bump): the next
    step emits spikes times the new factor and scales the membrane variance by the new
    beta^2."""
    from sbnn_addons.snntorch import membrane_variance

    sbnn = _converted_fc_leaky()
    lif = sbnn.lif
    x = torch.rand(4, 6) * 3
    spk, mem = lif(sbnn.fc(x), lif.init_leaky())
    assert torch.equal(spk.unique().sort().values[-1:], torch.ones(1))
    v_prev = membrane_variance(lif).detach().clone()
    lif.graded_spikes_factor.data.fill_(2.0)
    lif.beta.data.fill_(0.5)
    cur = sbnn.fc(x)
    v_in = get_variance(cur).detach().clone()
    spk, mem = lif(cur, mem)
    assert spk.any() and set(spk.unique().tolist()) <= {0.0, 2.0}
    torch.testing.assert_close(membrane_variance(lif), 0.25 * v_prev + v_in)


def test_reset_clears_nested_and_copied_states():
    import copy

    net, x = make("seq_leaky")
    outer = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Sequential(*net))
    sbnn = to_sbnn(outer)
    for t in range(3):
        sbnn(x[t])
    assert sbnn[1][1].mem.abs().sum() > 0
    dup = copy.deepcopy(reset(sbnn))
    for t in range(3):
        dup(x[t])
    reset(dup)
    assert dup[1][1].mem.abs().sum() == 0 and dup[1][3].mem.abs().sum() == 0


def test_include_exclude_and_recurrent():
    net, _ = make("seq_rleaky")
    sbnn = to_sbnn(net, exclude=["2", "*.recurrent"])
    kinds = {n: type(m).__name__ for n, m in sbnn.named_modules()}
    assert kinds["0"] == "BayesLinear" and kinds["2"] == "Linear"
    assert kinds["1.recurrent"] == "Linear"
    sbnn = to_sbnn(net, include="1.*")
    kinds = {n: type(m).__name__ for n, m in sbnn.named_modules()}
    assert kinds["0"] == "Linear" and kinds["1.recurrent"] == "BayesLinear"
    with pytest.raises(ValueError, match="matches no"):
        to_sbnn(net, include="fc9")


def test_batchnorm_affine_and_keep():
    import snntorch as snn
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16),
                        snn.Leaky(beta=BETA, init_hidden=True, output=True))
    net[1].running_mean.normal_()
    net[1].running_var.uniform_(0.5, 2.0)
    net.eval()
    x = (torch.rand(5, 4, 64) < 0.5).float()
    ref = run(net, x)
    affine = to_sbnn(net, std=0.0, learn_std=False, spike_std=None, batchnorm="affine")
    assert type(affine[1]).__name__ == "ChannelAffine"
    with sbnn_addons.mode(affine, "mean"):
        out = run(affine, x)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-5)
    kept = to_sbnn(net, std=0.2, learn_std=False, batchnorm="keep")
    assert isinstance(kept[1], nn.BatchNorm1d)
    seen = _record_variance(kept[2])
    run(kept, x)
    scale = kept[1].weight**2 / (kept[1].running_var + kept[1].eps)
    torch.testing.assert_close(seen[0], kept[0].output_variance(x[0]) * scale)


def test_batchnorm_affine_loads_a_host_checkpoint_folded():
    """A host checkpoint loaded into a `batchnorm="affine"` model (the port tutorial's
    `load_state_dict(..., strict=False)`) folds each BatchNorm's running statistics into
    the affine: mean mode equals the trained host model, and the only missing keys are
    the noise scales (the raw gamma / beta were copied before, silently)."""
    import snntorch as snn
    from torch import nn

    def host():
        return nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16),
                             snn.Leaky(beta=BETA, init_hidden=True, output=True))

    torch.manual_seed(0)
    trained = host()
    with torch.no_grad():
        trained[1].running_mean.normal_()
        trained[1].running_var.uniform_(0.05, 0.5)
        trained[1].weight.uniform_(0.5, 2.0)
        trained[1].bias.normal_()
    trained.eval()
    x = (torch.rand(5, 4, 64) < 0.5).float()
    ref = run(trained, x)
    model = to_sbnn(host(), batchnorm="affine").eval()
    with pytest.warns(UserWarning, match="before converting"):  # the stds stay as they were
        result = model.load_state_dict(trained.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all("std" in k or "rho" in k for k in result.missing_keys), result.missing_keys
    with sbnn_addons.mode(model, "mean"):
        out = run(model, x)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-5)
    # the converted model's own checkpoint loads unchanged
    again = to_sbnn(host(), batchnorm="affine")
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(again[1].weight, model[1].weight)


def test_integer_threshold_converts_like_a_float_one():
    """`snn.Leaky(threshold=1)` keeps an int64 threshold buffer (the host runs on it):
    conversion crashed in a `mean()` of it; now the model equals the float-threshold one."""
    import snntorch as snn
    from torch import nn

    def net(threshold):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 8), snn.Leaky(beta=BETA, threshold=threshold,
                                                         init_hidden=True, output=True))

    x = torch.rand(4, 3, 16) * 4
    outs = []
    for threshold in (1, 1.0):
        model = to_sbnn(net(threshold))
        with sbnn_addons.mode(model, "mean"):
            outs.append(run(model, x))
    assert outs[0][0].any()
    torch.testing.assert_close(outs[0], outs[1])


def _synaptic_head_net():
    import snntorch as snn
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), snn.Leaky(beta=0.9, init_hidden=True),
        nn.Linear(16, 4),
        snn.Synaptic(alpha=0.8, beta=0.9, init_hidden=True, output=True))


def test_exclude_keeps_a_neuron_and_its_surrogate():
    """``exclude=`` leaves a neuron as it is (even an unsupported ``snn.Synaptic``, whose
    type check is skipped) with its own surrogate; the excluded head with its deterministic
    layer trains behind an SBNN body, snnTorch's ``utils.reset`` resets both, and the
    export keeps the excluded neuron."""
    from snntorch import utils

    from sbnn_addons.snntorch import to_snntorch

    net = _synaptic_head_net()
    with pytest.raises(TypeError, match="Synaptic"):
        to_sbnn(net)
    sbnn = to_sbnn(net, exclude=["2", "3"])
    assert isinstance(sbnn[1], SBNNLeaky) and type(sbnn[3]) is type(net[3])
    assert type(sbnn[2]) is torch.nn.Linear
    assert sbnn[3].spike_grad is not None and not isinstance(sbnn[3].spike_grad,
                                                             sbnn_addons.IWSTSpike)
    x = torch.rand(5, 8)
    utils.reset(sbnn)
    loss = sum(sbnn(x)[1].sum() for _ in range(4))  # the Synaptic membrane over 4 steps
    loss.backward()
    assert sbnn[0].weight.grad.abs().sum() > 0
    utils.reset(sbnn)
    assert float(sbnn[3].mem.abs().sum()) == 0.0 and float(sbnn[1].mem.abs().sum()) == 0.0
    back = to_snntorch(sbnn)
    assert type(back[3]) is type(net[3]) and type(back[1]) is type(net[1])
    hooks = [h for m in back.modules() for h in (*m._forward_pre_hooks.values(),
                                                 *m._forward_hooks.values())]
    assert not [h for h in hooks if h.__module__.startswith("sbnn_addons")]  # no hook left


def test_excluded_neuron_fed_by_a_bayesian_layer_raises():
    """An excluded neuron whose input carries a posterior variance would drop it: its
    call raises a named error (sample and mean mode), and so does the conversion with an
    example input."""
    from snntorch import utils

    net = _synaptic_head_net()
    sbnn = to_sbnn(net, exclude="3")
    for mode in ("sample", "mean"):
        utils.reset(sbnn)
        with sbnn_addons.mode(sbnn, mode), pytest.raises(
                sbnn_addons.VarianceFlowError, match="exclude the layers feeding it"):
            sbnn(torch.rand(5, 8))
    with pytest.raises(sbnn_addons.VarianceFlowError, match="Synaptic was excluded"):
        to_sbnn(net, exclude="3", example_input=torch.rand(5, 8))


_LEAKY_OPTIONS = {
    "reset zero": dict(reset_mechanism="zero"),
    "reset none": dict(reset_mechanism="none"),
    "learn_beta": dict(learn_beta=True),
    "learn_threshold": dict(learn_threshold=True),
    "per-neuron beta": dict(beta=torch.linspace(0.5, 0.95, 32)),
    "per-neuron threshold": dict(threshold=torch.linspace(0.5, 1.5, 32)),
    "learned graded spikes": dict(graded_spikes_factor=2.0, learn_graded_spikes_factor=True),
}


@pytest.mark.parametrize("option", sorted(_LEAKY_OPTIONS))
def test_leaky_options_convert_exactly_and_train(option, recwarn):
    """The options of snnTorch's Leaky: `mean` mode equals the original over a sequence,
    the conversion warns about nothing, and a `sample`-mode step has finite, non-zero
    gradients for the weights and the neuron's own learned parameters."""
    from snntorch import utils

    net = _leaky_net(**_LEAKY_OPTIONS[option])
    x = (torch.rand(T := 8, 4, 64) < 0.3).float()
    sbnn = to_sbnn(net)
    ours = [str(w.message) for w in recwarn if "sbnn_addons" in w.filename]
    assert not ours, ours
    utils.reset(net)
    utils.reset(sbnn)
    with sbnn_addons.mode(sbnn, "mean"):
        for t in range(T):
            ref, got = net(x[t]), sbnn(x[t])
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    utils.reset(sbnn)
    loss = sum(sbnn(x[t])[1].sum() for t in range(T))
    loss.backward()
    learned = [p for n, p in sbnn.named_parameters() if n.startswith(("0.", "1."))]
    for p in learned:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert sbnn[0].weight.grad.abs().sum() > 0
    for name in ("beta", "threshold", "graded_spikes_factor"):
        p = getattr(sbnn[1], name)
        if isinstance(p, torch.nn.Parameter):
            assert p.grad.abs().sum() > 0, name


def test_one_leaky_shared_by_two_layers_keeps_each_membrane_state():
    """One `snn.Leaky` called on two membranes in turn (a neuron shared by two layers of an
    explicit loop, valid in snnTorch): each membrane keeps its own variance recurrence
    and resets by the spike it emitted, as with two neurons."""
    import snntorch as snn
    from torch import nn

    from sbnn_addons.snntorch import membrane_variance

    class Net(nn.Module):
        def __init__(self, shared: bool):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 6), nn.Linear(6, 6)
            self.lif1 = snn.Leaky(beta=0.9)
            self.lif2 = self.lif1 if shared else snn.Leaky(beta=0.9)

        def forward(self, x):
            m1, m2 = self.lif1.init_leaky(), self.lif2.init_leaky()
            record = []
            for t in range(x.shape[0]):
                prev1, prev2 = m1, m2
                s1, m1 = self.lif1(self.fc1(x[t]), m1)
                v1 = membrane_variance(self.lif1)
                s2, m2 = self.lif2(self.fc2(s1), m2)
                v2 = membrane_variance(self.lif2)
                record.append((prev1, s1, m1, v1, prev2, s2, m2, v2))
            return record

    torch.manual_seed(0)
    separate = Net(shared=False)
    with torch.no_grad():
        separate.fc1.weight.mul_(4)
        separate.fc2.weight.mul_(4)
    shared = Net(shared=True)
    shared.load_state_dict(separate.state_dict())
    x = torch.rand(8, 16, 8)
    runs = []
    for net in (separate, shared):
        model = to_sbnn(net, std=0.2, learn_std=False, spike_std=0.3)
        torch.manual_seed(1)
        with torch.no_grad():
            runs.append(model(x))
    fired = 0
    for a, b in zip(*runs):
        # each layer's membrane variance, spikes and membrane (so its reset by the spike
        # it emitted) as with two neurons: the same draws in the same order
        for i in range(8):
            torch.testing.assert_close(b[i], a[i])
        fired += int(b[1].sum() + b[5].sum())
    assert fired > 0


def test_batchnorm_affine_respects_include_exclude_and_needs_running_statistics():
    """`batchnorm="affine"` replaces only the BatchNorms the selection converts: an
    excluded BatchNorm (or one inside an excluded module) stays a BatchNorm and is not
    folded into its layer's std; with `include`, only the BatchNorms after converted
    layers change. A BatchNorm without running statistics, or one that cannot be folded,
    cannot become a fixed affine: named error, and an `inplace=True` conversion leaves the
    model as it was."""
    import snntorch as snn
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), snn.Leaky(beta=BETA, init_hidden=True),
                        nn.Linear(6, 4), nn.BatchNorm1d(4),
                        snn.Leaky(beta=BETA, init_hidden=True, output=True))
    with torch.no_grad():
        net[1].running_var.fill_(0.01)  # a folded scale of 10
        net[4].running_var.fill_(0.04)
    plain = to_sbnn(net, batchnorm="keep")
    folded = to_sbnn(net, batchnorm="affine")
    assert type(folded[1]).__name__ == "ChannelAffine" == type(folded[4]).__name__
    assert float(folded[0].std.detach()) > 5 * float(plain[0].std.detach())  # the fold
    kept = to_sbnn(net, batchnorm="affine", exclude="1")
    assert isinstance(kept[1], nn.BatchNorm1d) and type(kept[4]).__name__ == "ChannelAffine"
    torch.testing.assert_close(kept[0].std, plain[0].std)  # nothing folded
    only = to_sbnn(net, batchnorm="affine", include="3")
    assert isinstance(only[1], nn.BatchNorm1d) and type(only[4]).__name__ == "ChannelAffine"
    assert isinstance(only[0], nn.Linear)
    net[4] = nn.BatchNorm1d(4, track_running_stats=False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"BatchNorm '4'.*track_running_stats=False"):
        to_sbnn(net, batchnorm="affine", inplace=True)
    assert all(type(m).__module__.startswith(("torch", "snntorch")) for m in net.modules())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    to_sbnn(net, batchnorm="affine", exclude="4")  # left out: fine
    # one that cannot be folded (a weight of the wrong size): named before anything changes
    net[4] = nn.BatchNorm1d(4)
    net[4].weight = nn.Parameter(torch.ones(3))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot fold BatchNorm '4'.*exclude=\['4'\]"):
        to_sbnn(net, batchnorm="affine", inplace=True)
    assert all(type(m).__module__.startswith(("torch", "snntorch")) for m in net.modules())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())

def test_batchnorm_affine_names_the_batchnorms_it_leaves_as_they_are():
    """`batchnorm="affine"` replaces BatchNorm1d/2d only: an `nn.SyncBatchNorm` (or
    `BatchNorm3d`) stayed as it was, normalising by batch statistics in training mode,
    without a word. The conversion warns, naming it; its exclude is knowing and silent,
    and with `include` only the BatchNorms after the converted layers are named."""
    import warnings

    import snntorch as snn
    from torch import nn

    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.SyncBatchNorm(4),
                        snn.Leaky(beta=BETA, init_hidden=True), nn.Flatten(),
                        nn.Linear(4 * 16, 3), snn.Leaky(beta=BETA, init_hidden=True, output=True))
    with pytest.warns(UserWarning, match=r"batchnorm='affine'.*'1' \(SyncBatchNorm\).*exclude="):
        model = to_sbnn(net, batchnorm="affine")
    assert type(model[1]) is nn.SyncBatchNorm
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_sbnn(net, batchnorm="affine", exclude="1")
        to_sbnn(net, batchnorm="affine", include="4")


def test_weight_layers_without_a_bayesian_version_are_named():
    """A weight layer the converter has no Bayesian version of (ConvTranspose2d, Conv3d,
    Embedding) stays deterministic: a warning names it, unless it is excluded."""
    import snntorch as snn
    from torch import nn

    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ConvTranspose2d(4, 4, 3),
                        snn.Leaky(beta=0.9, init_hidden=True, output=True))
    with pytest.warns(UserWarning, match=r"1 weight layer\(s\) stay deterministic.*'1' "
                                         r"\(ConvTranspose2d\)"):
        to_sbnn(net, exclude=None)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_sbnn(net, exclude="1")
        to_sbnn(net, include="0")


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_parametrized_weight_layer_left_deterministic_is_named(norm):
    """A Linear under ``torch.nn.utils.parametrizations.weight_norm`` / ``spectral_norm``
    (another class, ``ParametrizedLinear``, whose weight is computed) is not converted:
    it used to stay deterministic without a word. The warning names it and the fix
    (``remove_parametrizations``), after which it converts."""
    import warnings

    import snntorch as snn
    from torch import nn
    from torch.nn.utils import parametrizations, parametrize

    from sbnn_addons import BayesLinear

    torch.manual_seed(0)
    net = nn.Sequential(getattr(parametrizations, norm)(nn.Linear(8, 6)),
                        snn.Leaky(beta=0.9, init_hidden=True, output=True))
    with pytest.warns(UserWarning, match=r"'0' \(Linear with a parametrized weight\).*"
                                         r"remove_parametrizations"):
        model = to_sbnn(net)
    assert not isinstance(model[0], BayesLinear)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_sbnn(net, exclude="0")
    parametrize.remove_parametrizations(net[0], "weight")
    assert isinstance(to_sbnn(net)[0], BayesLinear)


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_legacy_weight_norm_layer_left_deterministic_is_named(norm):
    """A Linear under the legacy ``torch.nn.utils.weight_norm`` / ``spectral_norm`` (a
    forward pre-hook computing ``weight`` from ``weight_g``, ``weight_v`` or
    ``weight_orig``) was converted into a BayesLinear whose mean was the weight at
    conversion, trained directly: the normalisation was dropped without a word. It stays
    deterministic with its hook, as a parametrized layer, and the warning names the fix
    (``remove_weight_norm``), after which it converts."""
    import warnings

    import snntorch as snn
    from torch import nn

    from sbnn_addons import BayesLinear

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 6), snn.Leaky(beta=0.9, init_hidden=True, output=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # weight_norm is deprecated
        getattr(torch.nn.utils, norm)(net[0])
    x = torch.rand(3, 8)
    with pytest.warns(UserWarning, match=rf"'0' \(Linear with torch.nn.utils.{norm}\).*"
                                         rf"remove_{norm}"):
        model = to_sbnn(net)
    assert not isinstance(model[0], BayesLinear)
    assert sbnn_addons.layers.legacy_weight_norm(model[0]) == norm
    model(x)[0].sum().backward()  # the normalised layer still trains through its hook
    assert all(p.grad is not None for p in model[0].parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_sbnn(net, exclude="0")
    with pytest.raises(ValueError, match=r"include pattern '0' matches no"):
        to_sbnn(net, include="0")  # named, not left deterministic silently
    getattr(torch.nn.utils, f"remove_{norm}")(net[0])
    assert isinstance(to_sbnn(net)[0], BayesLinear)


@pytest.mark.parametrize("inplace", [False, True])
def test_pruned_host_layer_stays_pruned(inplace):
    """A host layer pruned with ``torch.nn.utils.prune`` converts (the copy raised
    PyTorch's deepcopy error about non-leaf tensors) into a Bayesian layer with the same
    mask: the removed weights stay 0 through an optimiser step (they trained again from
    0) and add no noise; ``inplace=True`` adopts ``weight_orig`` itself; the export keeps
    the pruning."""
    import snntorch as snn
    from torch import nn
    from torch.nn.utils import prune

    from sbnn_addons.snntorch import to_snntorch

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), snn.Leaky(beta=0.9, init_hidden=True),
                        nn.Linear(5, 3), snn.Leaky(beta=0.9, init_hidden=True, output=True))
    prune.l1_unstructured(net[0], "weight", amount=0.5)
    mask, orig, x = net[0].weight_mask.clone(), net[0].weight_orig, torch.rand(4, 6)
    sb = to_sbnn(net, inplace=inplace)
    layer = sb[0]
    assert torch.equal(layer.weight_mask, mask) and torch.equal(layer.weight, orig * mask)
    assert (layer.weight_orig is orig) == inplace
    var = get_variance(layer(x))
    torch.testing.assert_close(var, (x * x) @ mask.t() * layer.std ** 2)
    opt = torch.optim.SGD(sb.parameters(), lr=0.5)
    reset(sb)
    sum(o.sum() for o in sb(x)).backward()
    opt.step()
    assert torch.all(layer.weight[mask == 0] == 0)
    plain = to_snntorch(sb)  # the weights after the step, not those of the last forward
    assert torch.equal(plain[0].weight_mask, mask)
    assert torch.equal(plain[0].weight_orig, layer.weight_orig)
    assert torch.equal(plain[0].weight, layer.weight_orig * mask)


@pytest.mark.parametrize("std_mode", ["layer", "channel"])
def test_converted_std_of_a_pruned_layer_is_sized_from_its_kept_weights(std_mode):
    """The converted std is 0.1 of the weights' RMS, so that the noise is 0.1 of the
    signal's spread. A pruned host layer's zeros counted in that RMS, though a pruned
    weight carries neither signal nor noise: with 75 % pruned the kept synapses got half
    the noise the rule gives. The RMS is that of the kept weights (with a folded
    BatchNorm's scale, per channel too)."""
    import snntorch as snn
    from torch import nn
    from torch.nn.utils import prune

    from sbnn_addons.layers import folded_batchnorm_scale

    torch.manual_seed(0)
    host = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4),
                         snn.Leaky(beta=BETA, init_hidden=True))
    with torch.no_grad():
        host[1].weight.uniform_(0.5, 2.0)
        host[1].running_var.uniform_(0.5, 2.0)
    host.eval()
    prune.l1_unstructured(host[0], "weight", amount=0.75)
    keep = host[0].weight_mask.bool()
    scale = folded_batchnorm_scale(host[1])
    model = to_sbnn(host, std_mode=std_mode, batchnorm="affine")
    w = host[0].weight_orig.detach()
    if std_mode == "layer":
        want = 0.1 * (w * scale.view(-1, 1, 1, 1))[keep].pow(2).mean().sqrt()
    else:
        want = scale.abs() * 0.1 * w[keep].pow(2).mean().sqrt()
    torch.testing.assert_close(model[0].std.detach(), want, rtol=1e-5, atol=0)
    assert torch.equal(model[0].weight_mask, keep.float())
    # reset_parameters() of a pruned layer draws into the computed weight, which the next
    # forward recomputes from weight_orig (PyTorch's pruning): the std follows the weights
    # the layer computes with, not the discarded draw
    model[0].reset_parameters()
    torch.testing.assert_close(model[0].std.detach(), want, rtol=1e-5, atol=0)


def test_batchnorm_after_a_neuron_does_not_fold_into_the_layer_before_the_neuron():
    """batchnorm="affine" folded the scale of a BatchNorm after a neuron (conv -> Leaky
    -> BN -> conv), which normalises spikes, into the convolution before the neuron: that
    layer's initial noise came out 30x too large here, silently. A BatchNorm is folded
    only into a layer it directly follows; the same for a layer of another kind between
    them (a transposed convolution, whose outputs the BatchNorm then normalises)."""
    import snntorch as snn
    from torch import nn

    from sbnn_addons.layers import batchnorm_after

    torch.manual_seed(0)
    host = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), snn.Leaky(beta=BETA, init_hidden=True),
                         nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4),
                         snn.Leaky(beta=BETA, init_hidden=True))
    with torch.no_grad():
        host[2].running_var.fill_(0.01)
        host[2].weight.fill_(3.0)
        host[4].running_var.fill_(4.0)
        host[2].num_batches_tracked += 1
        host[4].num_batches_tracked += 1
    keep = to_sbnn(host, batchnorm="keep")
    affine = to_sbnn(host, batchnorm="affine")
    assert torch.equal(affine[0].std, keep[0].std)  # the BatchNorm reads spikes
    torch.testing.assert_close(affine[3].std, keep[3].std / 2)  # 1 / sqrt(4): folded
    between = nn.Sequential(nn.Conv2d(2, 4, 1), nn.ConvTranspose2d(4, 4, 1), nn.BatchNorm2d(4))
    assert batchnorm_after(between, (nn.Conv2d,)) == {}
    assert batchnorm_after(nn.Sequential(nn.Conv2d(2, 4, 1), nn.MaxPool2d(2), nn.Dropout(),
                                         nn.BatchNorm2d(4)), (nn.Conv2d,)) == {"0": "3"}


def test_batchnorm_after_an_rleaky_does_not_fold_into_its_recurrent_layer():
    """A BatchNorm after an ``snn.RLeaky`` normalises its spikes; in module order the
    neuron's own ``recurrent`` layer came right before it, so batchnorm="affine" folded
    the BatchNorm's scale into the recurrent layer's initial noise (10x here). The parts
    of a neuron run inside it: a BatchNorm after the neuron folds into none."""
    import snntorch as snn
    from torch import nn

    from sbnn_addons.layers import batchnorm_after

    torch.manual_seed(0)
    host = nn.Sequential(nn.Linear(3, 4), snn.RLeaky(beta=BETA, linear_features=4,
                                                     init_hidden=True),
                         nn.BatchNorm1d(4), nn.Linear(4, 2), snn.Leaky(beta=BETA,
                                                                      init_hidden=True))
    with torch.no_grad():
        host[2].running_var.fill_(0.01)
        host[2].num_batches_tracked += 1
    assert batchnorm_after(host, (nn.Linear,)) == {}
    keep = to_sbnn(host, batchnorm="keep")
    for affine in (to_sbnn(host, batchnorm="affine"),
                   to_sbnn(host, batchnorm="affine", example_input=torch.rand(2, 3))):
        assert torch.equal(affine[1].recurrent.std, keep[1].recurrent.std)
        affine(torch.rand(2, 3))  # the first forward finds the pairs as declared


_S1, _S2 = (0.01 + 1e-5) ** -0.5, (4.0 + 1e-5) ** -0.5  # the BatchNorms' scales


class _GroupedNet(torch.nn.Module):
    """Layers declared grouped by type (conv1, conv2, bn1, bn2), run conv1 -> bn1 -> lif
    -> conv2 -> bn2 -> lif; with ``swap`` the neuron of the first block is declared
    between conv1 and bn1 but runs after bn1."""

    def __init__(self, swap: bool = False):
        import snntorch as snn
        from torch import nn

        super().__init__()
        if swap:
            self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
            self.lif1 = snn.Leaky(beta=BETA, init_hidden=True)
            self.bn1 = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(4)
        else:
            self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(4)
            self.bn2 = nn.BatchNorm2d(4)
            self.lif1 = snn.Leaky(beta=BETA, init_hidden=True)
        self.lif2 = snn.Leaky(beta=BETA, init_hidden=True)
        with torch.no_grad():
            self.bn1.running_var.fill_(0.01)  # scale 10
            self.bn2.running_var.fill_(4.0)  # scale 1/2
            self.bn1.num_batches_tracked += 1
            self.bn2.num_batches_tracked += 1

    def forward(self, x):
        x = self.lif1(self.bn1(self.conv1(x)))
        return self.lif2(self.bn2(self.conv2(x)))


def test_batchnorm_scale_folds_into_the_layer_the_forward_calls_it_after():
    """batchnorm="affine" folds a BatchNorm's scale into the std of the layer it follows.
    A model declaring its layers grouped by type (conv1, conv2, bn1, bn2) and running
    conv1 -> bn1 -> lif -> conv2 -> bn2 had bn1's scale folded into conv2 (10x its noise)
    and none into conv1, silently: the pairing read the declaration order. With
    example_input the pairing is the call order; without it, the first forward checks the
    declared pairs and raises, naming the BatchNorm, the layer and the fix."""
    torch.manual_seed(0)
    host = _GroupedNet()
    x = torch.rand(3, 2, 5, 5)
    state = {k: v.clone() for k, v in host.state_dict().items()}
    mem = host.lif1.mem.clone()
    for std_mode in ("layer", "channel"):
        keep = to_sbnn(host, batchnorm="keep", std_mode=std_mode)
        affine = to_sbnn(host, batchnorm="affine", std_mode=std_mode, example_input=x)
        torch.testing.assert_close(affine.conv1.std, keep.conv1.std * _S1)
        torch.testing.assert_close(affine.conv2.std, keep.conv2.std * _S2)
        affine(x)  # nothing to check at the first forward: paired by the calls
    for k, v in host.state_dict().items():  # the model's state is left as it was
        assert torch.equal(v, state[k]), k
    assert host.training and torch.equal(host.lif1.mem, mem)
    declared = to_sbnn(host, batchnorm="affine")
    with pytest.raises(ValueError, match=r"'bn1'.*'conv2'.*'conv1'.*example_input=x"):
        declared(x)
    with pytest.raises(ValueError, match="'bn1'"):  # still armed
        declared(x)
    swapped = _GroupedNet(swap=True)  # declared conv1, lif1, bn1: a fold missed
    with pytest.raises(ValueError, match=r"'bn1'.*no layer.*'conv1'.*example_input=x"):
        to_sbnn(swapped, batchnorm="affine")(x)
    fixed = to_sbnn(swapped, batchnorm="affine", example_input=x)
    torch.testing.assert_close(fixed.conv1.std, to_sbnn(swapped).conv1.std * _S1)


def test_batchnorm_pairing_check_leaves_a_model_declared_in_call_order_as_it_was():
    """A model declaring its layers in the order it calls them converts with
    batchnorm="affine" as before; the first forward's check of the pairs leaves no hook
    behind (no cost afterwards), and a std given explicitly folds nothing to check."""
    import snntorch as snn
    from torch import nn

    torch.manual_seed(0)
    host = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4),
                         snn.Leaky(beta=BETA, init_hidden=True), nn.Conv2d(4, 4, 3, padding=1),
                         nn.MaxPool2d(2), nn.BatchNorm2d(4),
                         snn.Leaky(beta=BETA, init_hidden=True))
    with torch.no_grad():
        host[1].running_var.fill_(0.01)
        host[5].running_var.fill_(4.0)
        host[1].num_batches_tracked += 1
        host[5].num_batches_tracked += 1
    x = torch.rand(3, 2, 6, 6)
    keep = to_sbnn(host, batchnorm="keep")
    model = to_sbnn(host, batchnorm="affine")
    paired = to_sbnn(host, batchnorm="affine", example_input=x)
    for m in (model, paired):
        torch.testing.assert_close(m[0].std, keep[0].std * _S1)
        torch.testing.assert_close(m[3].std, keep[3].std * _S2)

    def hooks(m):
        return sum(len(n._forward_pre_hooks) + len(n._forward_hooks) for n in m.modules())

    armed = hooks(model)
    assert armed > hooks(paired)
    with sbnn_addons.mode(model, "mean"), sbnn_addons.mode(paired, "mean"):
        assert torch.equal(model(x), paired(x))
        assert hooks(model) == hooks(paired)
        model(x)
    assert hooks(to_sbnn(host, batchnorm="affine", std=0.1)) == hooks(paired)


@pytest.mark.parametrize("inplace", [False, True])
def test_pruned_host_bias_stays_pruned(inplace):
    """A host layer whose bias is pruned (``torch.nn.utils.prune``, e.g. a global pruning
    over weights and biases) lost the bias mask on conversion: the removed biases trained
    again from 0, silently. The converted layer has the same ``bias_mask`` (its
    ``bias_orig`` adopted with ``inplace=True``), the removed biases stay 0 through an
    optimiser step and carry no bias noise, and the export keeps the pruning."""
    import snntorch as snn
    from torch import nn
    from torch.nn.utils import prune

    from sbnn_addons.snntorch import to_snntorch

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), snn.Leaky(beta=0.9, init_hidden=True),
                        nn.Linear(5, 3), snn.Leaky(beta=0.9, init_hidden=True, output=True))
    prune.l1_unstructured(net[0], "bias", amount=0.4)
    mask, orig, x = net[0].bias_mask.clone(), net[0].bias_orig, torch.rand(4, 6)
    sb = to_sbnn(net, inplace=inplace, bias_std=0.3)
    layer = sb[0]
    assert torch.equal(layer.bias_mask, mask) and torch.equal(layer.bias, orig * mask)
    assert (layer.bias_orig is orig) == inplace
    var = get_variance(layer(x)).expand(4, 5)
    assert torch.all(var[:, mask == 0] < var[:, mask == 1].min() - 0.08)  # no s_b^2 = 0.09
    opt = torch.optim.SGD(sb.parameters(), lr=0.5)
    reset(sb)
    sum(o.sum() for o in sb(x)).backward()
    opt.step()
    assert torch.all(layer.bias[mask == 0] == 0) and torch.any(layer.bias_orig.grad != 0)
    plain = to_snntorch(sb)  # the biases after the step, not those of the last forward
    assert torch.equal(plain[0].bias_mask, mask)
    assert torch.equal(plain[0].bias, layer.bias_orig * mask)


@pytest.mark.parametrize("std_mode", ["layer", "channel"])
def test_reset_parameters_of_a_converted_layer_sizes_the_std_from_the_new_weights(std_mode):
    """A converted layer's std is 0.1 of its weights' RMS (with a folded BatchNorm's
    scale). ``reset_parameters()`` (e.g. ``model.apply(init_fn)``) draws new weights:
    the std kept the value sized from the ported weights, 10x the new weights' RMS
    noise ratio for weights scaled by 10, without an error. It now follows the rule."""
    import snntorch as snn
    from torch import nn

    from sbnn_addons.layers import CONVERTED_STD_FRACTION, folded_batchnorm_scale

    torch.manual_seed(0)
    host = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4),
                         snn.Leaky(beta=BETA, init_hidden=True))
    with torch.no_grad():
        host[0].weight.mul_(10.0)
        host[1].weight.uniform_(0.5, 2.0)
        host[1].running_var.uniform_(0.5, 2.0)
    for batchnorm in ("keep", "affine"):
        model = to_sbnn(host, std_mode=std_mode, batchnorm=batchnorm)
        conv = model[0]
        conv.reset_parameters()
        w = conv.weight.detach()
        rms = float(w.pow(2).mean().sqrt())
        if batchnorm == "keep":
            expected = torch.full((4,), CONVERTED_STD_FRACTION * rms)
        else:
            scale = folded_batchnorm_scale(host[1]).detach()
            if std_mode == "layer":
                folded = float((scale.view(-1, 1, 1, 1) * w).pow(2).mean().sqrt())
                expected = torch.full((4,), CONVERTED_STD_FRACTION * folded)
            else:
                expected = scale.abs() * CONVERTED_STD_FRACTION * rms
        torch.testing.assert_close(conv.std.detach().flatten().expand(4), expected)
        # an explicit std is what the layer was built with, and stays
        given = to_sbnn(host, std=0.05, std_mode=std_mode, batchnorm=batchnorm)[0]
        given.reset_parameters()
        torch.testing.assert_close(given.std.detach().flatten(),
                                   torch.full_like(given.std.detach().flatten(), 0.05))


def _bilinear_x2_squared(length: int) -> torch.Tensor:
    """The squared weights ``W^2`` [(2L)^2, L^2] of a bilinear x2 upsampling of an L x L
    image, from the upsampling of each basis image (independent of the variance rule)."""
    n = length * length
    basis = torch.eye(n).view(n, 1, length, length)
    return F.interpolate(basis, scale_factor=2, mode="bilinear").view(n, -1).t() ** 2


def test_groupnorm_pixelshuffle_upsample_pad_before_leaky_give_the_exact_variance():
    """Conv2d -> GroupNorm -> PixelShuffle -> Upsample(bilinear) -> ZeroPad2d -> Leaky (an
    nn.Sequential with init_hidden) raised at the first step ('group_norm' had no variance
    rule). Converted, the neuron receives at every step the exact variance: the conv's LRT
    variance scaled by the GroupNorm's (w / sqrt(s^2 + eps))^2 (statistics of the mean
    signal), moved by the shuffle, mapped by the squared bilinear weights, zero in the
    padding, accumulated V_t = beta^2 V_{t-1} + var_t; the conv's std gets a gradient."""
    snn = pytest.importorskip("snntorch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.PixelShuffle(2),
        torch.nn.Upsample(scale_factor=2, mode="bilinear"), torch.nn.ZeroPad2d(1),
        snn.Leaky(beta=BETA, init_hidden=True), torch.nn.Flatten(),
        torch.nn.Linear(2 * 18 * 18, 3), snn.Leaky(beta=BETA, init_hidden=True, output=True))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 2.0)
    x = torch.rand(3, 2, 1, 4, 4)
    sbnn = to_sbnn(net, std=0.3, example_input=x[0])
    conv, gn, lif = sbnn[0], sbnn[1], sbnn[5]
    seen = _record_variance(lif)
    spk, mem = run(sbnn, x)
    squared = _bilinear_x2_squared(8)
    expected = None
    for t in range(x.shape[0]):
        with sbnn_addons.moments.no_variance_flow():
            mean = F.conv2d(x[t], conv.weight, conv.bias, padding=1)
        s2 = mean.view(2, 4, -1).var(-1, unbiased=False).repeat_interleave(2, 1)
        scale = (gn.weight / torch.sqrt(s2 + gn.eps)) ** 2
        var = F.pixel_shuffle(conv.output_variance(x[t]) * scale.view(2, 8, 1, 1), 2)
        var = F.pad((var.reshape(2, 2, 64) @ squared.t()).view(2, 2, 16, 16), (1, 1, 1, 1))
        expected = var if expected is None else BETA**2 * expected + var
        torch.testing.assert_close(seen[t].expand_as(expected), expected, rtol=1e-5, atol=1e-7)
    (spk.sum() + mem.sum()).backward()
    assert conv.std_rho.grad is not None and conv.std_rho.grad.abs() > 0


def test_a_layer_replaced_by_an_inplace_conversion_still_runs_as_a_plain_layer():
    """The converted layer shares the replaced layer's hook dictionaries (a user's hook
    handles still remove its hooks), so the variance flow's hooks added to it ran on the
    replaced layer too, which the user may still hold: AttributeError ('Linear' object
    has no attribute 'deterministic'). It runs as the plain layer it is."""
    import snntorch as snn

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), snn.Leaky(beta=BETA, init_hidden=True))
    old = net[0]
    seen = []
    old.register_forward_hook(lambda m, args, out: seen.append(type(m).__name__))
    x = torch.rand(2, 4)
    ref = old(x)
    to_sbnn(net, inplace=True)
    assert net[0] is not old and sbnn_addons.is_bayesian(net[0])
    out = old(x)
    assert type(out) is torch.Tensor
    torch.testing.assert_close(out, ref)
    net(x)
    assert seen == ["Linear", "Linear", "BayesLinear"]  # the user's hook runs on both


def test_affine_batchnorm_of_an_untrained_model_warns():
    """``batchnorm="affine"`` freezes a BatchNorm's running statistics into a fixed
    affine. On a model that never ran in training mode those are the initial mean 0 /
    var 1: the folded network does not normalise at all, and it trained so without a
    word. It warns, naming the BatchNorm and ``batchnorm='keep'``; a BatchNorm with
    statistics (a training-mode pass, a loaded checkpoint) does not."""
    import warnings

    import snntorch as snn
    from torch import nn

    torch.manual_seed(0)
    host = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4),
                         snn.Leaky(beta=BETA, init_hidden=True))
    with pytest.warns(UserWarning, match=r"BatchNorm '1'.*never.*training mode.*"
                                         r"batchnorm='keep'"):
        to_sbnn(host, batchnorm="affine")
    host[1](torch.rand(8, 4, 5, 5))  # one training-mode pass: statistics
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_sbnn(host, batchnorm="affine")
        to_sbnn(host.eval())


def test_affine_batchnorm_warning_names_the_resume_of_a_checkpoint():
    """Resuming a ``batchnorm="affine"`` model (Training page, "Saving and resuming":
    build it as the saved one, then load its checkpoint) converts an untrained host, and
    the warning's advice (convert with 'keep', load the host's statistics first) misled:
    it says that such a build can ignore it, and the load restores the affines."""
    import snntorch as snn
    from torch import nn

    def host():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4),
                             snn.Leaky(beta=BETA, init_hidden=True))

    trained = host()
    trained[1](torch.rand(8, 4, 5, 5).mul(3))  # statistics
    saved = to_sbnn(trained, batchnorm="affine").state_dict()
    with pytest.warns(UserWarning, match=r"load_state_dict\(checkpoint\), this warning can "
                                         r"be ignored"):
        resumed = to_sbnn(host(), batchnorm="affine")
    resumed.load_state_dict(saved)
    for key, value in saved.items():
        assert torch.equal(resumed.state_dict()[key], value)


def test_step_record_handover_is_dropped_by_the_step_and_by_copies():
    """A step's fire hands its records to the step's store (one lookup, not two): after a
    forward nothing is left of it; after a direct fire() call (no store) a copy of the
    neuron does not carry it, and the next forward still records its own membrane."""
    import copy

    import snntorch as snn

    torch.manual_seed(0)
    model = to_sbnn(torch.nn.Sequential(torch.nn.Linear(4, 3),
                                        snn.Leaky(beta=0.9, init_hidden=True)))
    lif = model[1]
    x = torch.rand(2, 4)
    reset(model)
    with torch.no_grad():  # no graph: the neuron can be deep-copied
        model(x)
        assert "_sbnn_last_record" not in lif.__dict__
        lif.fire(lif.mem)  # a fire outside a forward: the handover stays until a store
    assert "_sbnn_last_record" in lif.__dict__
    assert "_sbnn_last_record" not in copy.deepcopy(lif).__dict__
    model(x).sum().backward()
    assert "_sbnn_last_record" not in lif.__dict__
    from sbnn_addons.snntorch import _find_step_record

    assert _find_step_record(lif, lif.mem).keys() == {"spikes", "state"}


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_conversion_keeps_the_models_training_mode(inplace, training):
    """A model converted in eval mode (a pretrained model, evaluated before fine-tuning)
    is in eval mode all through, new spike functions included: its validation forwards
    with gradients on collect no auxiliary terms (and apply no pull), as after
    ``model.eval()``."""
    net, x = make("seq_leaky")
    net.train(training)
    model = to_sbnn(net, aux_loss=True, inplace=inplace)
    assert {m.training for m in model.modules()} == {training}
    run(model, x)  # gradients on
    if training:
        assert sbnn_addons.aux_loss(model) > 0
    else:
        with pytest.warns(UserWarning, match="eval mode"):
            assert sbnn_addons.aux_loss(model) == 0


def test_a_cloned_membrane_keeps_the_variance_gradient():
    """``mem = mem.clone()`` passed back in an explicit loop keeps the graph of the
    membrane, and so of its noise variance: the same gradients as the membrane itself.
    The variance of a copy was detached as for ``mem.detach()``, so the first layer's
    std got another gradient (6e-6 instead of -1.05e-3), silently. A copy without a graph
    (``mem.detach().clone()``) still drops it, as ``mem.detach()`` does."""
    x, y = torch.rand(4, 6, 12) * 3, torch.randint(0, 5, (6,))
    grads = {}
    for name, copy in (("same", lambda m, t: m), ("clone", lambda m, t: m.clone()),
                       ("detach", lambda m, t: m.detach()),
                       ("detached clone", lambda m, t: m.detach().clone())):
        torch.manual_seed(0)
        host = EditedLoop(copy)
        with torch.no_grad():
            host.fc1.weight.mul_(3)
        net = to_sbnn(host)
        torch.manual_seed(1)
        F.cross_entropy(net(x), y).backward()
        grads[name] = {n: p.grad.clone() for n, p in net.named_parameters()}
    for name in grads["same"]:
        torch.testing.assert_close(grads["clone"][name], grads["same"][name])
        torch.testing.assert_close(grads["detached clone"][name], grads["detach"][name])
    assert not torch.allclose(grads["detach"]["fc1.std_rho"], grads["same"]["fc1.std_rho"])
