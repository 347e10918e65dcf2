"""snnTorch adapter: four failures that used to be silent, each now exact or a named error.

1. One drop-in ``spike_grad()`` shared by more neurons than it remembered draws: the reset
   is still each neuron's emitted spike (as with one ``spike_grad()`` per neuron).
2. A membrane edited out of place in an explicit loop (``mem = 0.5 * mem``) keeps its
   (scaled) noise variance; an edit without a variance rule (``clamp``) raises.
3. A plain ``snn.Leaky`` fed by a Bayesian layer after the conversion raises instead of
   dropping the variance.
4. ``surrogate_disable=True`` is refused at conversion (it would be ignored).
5. A membrane an explicit loop feeds to a Bayesian layer, or into another neuron's input
   current, raises instead of being taken as noise-free (the membrane a step returns is a
   plain tensor; the neuron keeps its noise variance).

Also: a one-state neuron with the drop-in ``spike_grad()`` whose own update makes a
Bayesian layer's noise variance unknown (reset to zero in ``RLeaky`` / ``Lapicque``,
``reset_delay=False``, ``state_quant``) names the option and its fix.

Real snnTorch models and utilities only.
"""

from __future__ import annotations

import pytest
import snntorch as snn
import snntorch.utils as sutils
import torch
from _snntorch_nets import BETA, LoopLeaky, MembraneFedLoop
from torch import nn

import sbnn_addons
from sbnn_addons import kernels
from sbnn_addons.snntorch import spike_grad, to_sbnn, to_snntorch

N_SHARED = 20  # more neurons than SnnTorchSpike.MEMORY = 16 remembered draws


# --------------------------------------------------------------------------- 1. shared spike_grad
def _leaky_stack(shared: bool, n: int = N_SHARED):
    """``n`` Leaky neurons, one shared ``spike_grad()`` (the tutorials' pattern) or one
    each; their drives come from a fixed random projection, so that they all spike."""
    sg = spike_grad() if shared else None
    return [snn.Leaky(beta=BETA, spike_grad=sg if shared else spike_grad()) for _ in range(n)]


def _explicit_loop(layers, steps: int = 6):
    """snnTorch tutorial-5 style: ``spk, mem = lif(cur, mem)`` for each neuron and step;
    spikes, membranes and each step's reset, seeded."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(steps, 8, 12, generator=g) * 1.6
    mems = [lif.init_leaky() for lif in layers]
    torch.manual_seed(2)
    spikes, membranes, resets = [], [], []
    for t in range(steps):
        for i, lif in enumerate(layers):
            spk, mems[i] = lif(x[t], mems[i])
            spikes.append(spk.detach().clone())
            membranes.append(mems[i].detach().clone())
            resets.append(lif.reset.clone())
    return spikes, membranes, resets


def test_one_spike_grad_shared_by_many_neurons_resets_with_each_emitted_spike():
    """Twenty Leaky neurons share one spike_grad(): every reset is the spike that neuron
    emitted at the step before (no fall-back to a deterministic 1[u > 0] once more than
    MEMORY draws happened in between), and the run equals one with a spike_grad() each."""
    torch.manual_seed(0)
    shared = _explicit_loop(_leaky_stack(True))
    torch.manual_seed(0)
    own = _explicit_loop(_leaky_stack(False))
    spikes, membranes, resets = shared
    n = N_SHARED
    for k in range(n, len(spikes)):  # step t's reset is step t-1's spike, per neuron
        assert torch.equal(resets[k], spikes[k - n]), k
    assert all(not r.any() for r in resets[:n])  # the initial membranes emitted nothing
    assert 0.05 < float(torch.stack(spikes).mean()) < 0.95
    for a, b in zip(shared[0] + shared[1], own[0] + own[1]):
        assert torch.equal(a, b)


def _sequential(shared: bool, n: int = N_SHARED) -> nn.Sequential:
    """snnTorch tutorial-6 style: ``init_hidden`` neurons in a Sequential."""
    torch.manual_seed(0)
    sg = spike_grad()
    layers = []
    for i in range(n):
        layers.append(nn.Linear(10, 10))
        layers.append(snn.Leaky(beta=BETA, init_hidden=True, output=i == n - 1,
                                spike_grad=sg if shared else spike_grad()))
    net = nn.Sequential(*layers)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(3.0)
                m.bias.fill_(0.3)
    return net


def _run_sequential(net: nn.Sequential, sequences: int = 2, steps: int = 5):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(sequences, steps, 4, 10, generator=g)
    torch.manual_seed(4)
    out, resets = [], []
    neurons = [m for m in net if isinstance(m, snn.Leaky)]
    for seq in x:
        sutils.reset(net)
        for xt in seq:
            spk, mem = net(xt)
            out += [spk.detach().clone(), mem.detach().clone()]
            resets.append([n.reset.clone() for n in neurons])
    return out, resets


def test_shared_spike_grad_in_a_deep_sequential_matches_one_per_neuron():
    """Tutorial-6 Sequential of twenty layers sharing one spike_grad(), two sequences
    with snntorch.utils.reset between them: the same spikes and membranes as with one
    spike_grad() per layer, and no reset at the first step of a sequence."""
    shared, resets = _run_sequential(_sequential(True))
    own, _ = _run_sequential(_sequential(False))
    for a, b in zip(shared, own):
        assert torch.equal(a, b)
    assert not any(r.any() for r in resets[0]) and not any(r.any() for r in resets[5])
    assert any(r.any() for step in resets for r in step)


# --------------------------------------------------------------------------- 2. edited membranes
class _EditLoop(nn.Module):
    """Tutorial-5 loop whose membrane is edited out of place before it is passed back."""

    def __init__(self, edit=None):
        super().__init__()
        self.fc = nn.Linear(10, 16)
        self.lif = snn.Leaky(beta=BETA)
        self.edit = edit

    def forward(self, x):
        mem = self.lif.init_leaky()
        spk_rec, mem_rec = [], []
        for t in range(x.shape[0]):
            if t and self.edit is not None:
                mem = self.edit(mem)
            spk, mem = self.lif(self.fc(x[t]), mem)
            spk_rec.append(spk)
            mem_rec.append(mem)
        return torch.stack(spk_rec), torch.stack(mem_rec)


def _x(steps=6, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(steps, batch, 10, generator=g) * 2


SCALE = torch.linspace(0.2, 1.4, 16)
LINEAR_EDITS = {
    "0.5 * mem": (lambda m: 0.5 * m, torch.tensor(0.25)),
    "mem * c": (lambda m: m * SCALE, SCALE**2),
    "mem + c": (lambda m: m + 0.3, torch.tensor(1.0)),
    "mem / 2 - c": (lambda m: m / 2 - 0.1, torch.tensor(0.25)),
}


EDITS = {**{name: edit for name, (edit, _) in LINEAR_EDITS.items()},
         "clamp": lambda m: m.clamp(-1.0, 1.0), "tanh": torch.tanh}


@pytest.mark.parametrize("name", sorted(EDITS))
def test_out_of_place_membrane_edit_raises_a_named_error(name):
    """``mem = edit(mem)`` between two steps of a training loop: the neuron follows the
    variance of the membranes its steps return, not of an edit of one; instead of
    restarting the variance silently (the earlier steps' noise dropped), the next step
    raises and names the fix."""
    torch.manual_seed(0)
    model = to_sbnn(_EditLoop(EDITS[name]))
    with pytest.raises(sbnn_addons.VarianceFlowError,
                       match=r"(?s)computed from its last membrane out of place.*init_leaky"):
        model(_x())
    model.edit = None  # the same loop without the edit runs
    spk, _ = model(_x())
    spk.sum().backward()
    assert model.fc.std_rho.grad is not None


@pytest.mark.parametrize("edit, linear", [(lambda m: 0.5 * m, True),
                                          (lambda m: m * SCALE - 0.2, True),
                                          (lambda m: m.clamp(-1.0, 1.0), False)])
def test_mean_mode_with_edited_membranes_equals_the_host_model(edit, linear):
    """Mean mode of the converted loop equals the host snnTorch model with the same
    edits (linear ones; a zero-std conversion also for clamp, which then carries no
    variance): the reset of an edited membrane is computed from it, as in snnTorch."""
    torch.manual_seed(0)
    host = _EditLoop(edit)
    with torch.no_grad():
        host.fc.weight.mul_(3.0)
    x = _x()
    with torch.no_grad():
        want = host(x)
    noisy = to_sbnn(host)
    exported = to_snntorch(noisy)
    quiet = to_sbnn(host, std=0.0, learn_std=False, spike_std=None)
    models = [noisy, quiet] if linear else [quiet]
    for model in models:
        with torch.no_grad(), sbnn_addons.mode(model, "mean"):
            got = model(x)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert 0 < float(want[0].mean()) < 1
    assert all(torch.equal(a, b) for a, b in zip(exported(x), want))


def test_returned_membrane_and_records_behave_as_before():
    """The membrane a step returns, passed back as it is, detached, or cloned, and
    recorded and stacked into a loss: the run equals the plain loop's (same spikes with
    the same seed) and the loss trains the std."""
    def run(pass_back):
        torch.manual_seed(0)
        model = to_sbnn(LoopLeaky(num_inputs=10))
        x = _x()
        torch.manual_seed(1)
        mem, spk_rec, mem_rec = model.lif1.init_leaky(), [], []
        for t in range(x.shape[0]):
            spk, mem = model.lif1(model.fc1(x[t]), pass_back(mem))
            spk_rec.append(spk)
            mem_rec.append(mem)
        loss = torch.stack(mem_rec).pow(2).mean() + torch.stack(spk_rec).mean()
        loss.backward()
        return torch.stack(spk_rec).detach(), model.fc1.std_rho.grad

    ref = run(lambda m: m)
    assert ref[1] is not None and ref[1].abs() > 0
    for fn in (lambda m: m.detach(), lambda m: m.clone()):
        assert torch.equal(run(fn)[0], ref[0])


# --------------------------------------------------------------------------- 3. host neurons
@pytest.mark.parametrize("mode", ["sample", "mean"])
def test_plain_leaky_added_after_conversion_raises(mode):
    """A fresh snn.Leaky in a new Sequential with a converted (Bayesian) layer: it would
    drop the variance (the std would get no gradient) so it raises, naming both fixes."""
    net = to_sbnn(nn.Sequential(nn.Linear(10, 16), snn.Leaky(beta=BETA, init_hidden=True)))
    mixed = nn.Sequential(net[0], snn.Leaky(beta=BETA, init_hidden=True))
    with sbnn_addons.mode(mixed, mode), pytest.raises(
            sbnn_addons.VarianceFlowError, match="(?s)not converted.*to_sbnn.*spike_grad\\(\\)"):
        mixed(_x()[0])


class _Extended(nn.Module):
    """A converted model extended afterwards: ``net.extra`` reuses its Bayesian layer
    and adds a plain neuron (explicit loop, ``init_hidden=False``)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.extra = snn.Synaptic(alpha=0.8, beta=BETA)

    def forward(self, x):
        syn, mem = self.extra.init_synaptic()
        for t in range(x.shape[0]):
            spk, syn, mem = self.extra(self.net.fc(x[t]), syn, mem)
        return spk


def test_neuron_added_to_a_converted_model_raises_also_in_check_variance_flow():
    net = to_sbnn(_EditLoop())
    model = _Extended(net)
    # the fixes named are the ones that work for a Synaptic (neither converting it nor
    # the drop-in spike function does: its two states carry correlated noise)
    with pytest.raises(sbnn_addons.VarianceFlowError,
                       match="snn.Synaptic is not converted.*exclude= them") as err:
        model(_x())
    assert "spike_grad()" not in str(err.value) and "to_sbnn(model" not in str(err.value)
    with pytest.raises(sbnn_addons.VarianceFlowError, match="check_variance_flow"):
        sbnn_addons.check_variance_flow(model, _x(steps=2, batch=1))


def test_host_neurons_that_get_no_variance_or_read_it_still_run():
    """Not refused: a host neuron after a converted neuron's spikes (they carry no
    variance), a neuron with the drop-in spike_grad() after a Bayesian layer, and a
    neuron converted on its own with to_sbnn (the fix the error names); the latter two
    pass a gradient to the layer's std."""
    torch.manual_seed(0)
    net = to_sbnn(nn.Sequential(nn.Linear(10, 16), snn.Leaky(beta=BETA, init_hidden=True)))
    after_spikes = nn.Sequential(net, nn.Linear(16, 4), snn.Leaky(beta=BETA, init_hidden=True))
    after_spikes(_x()[0])
    for neuron in (snn.Leaky(beta=BETA, init_hidden=True, spike_grad=spike_grad()),
                   to_sbnn(snn.Leaky(beta=BETA, init_hidden=True))):
        net[0].std_rho.grad = None
        model = nn.Sequential(net[0], neuron)
        sutils.reset(model)
        sum(model(xt).sum() for xt in _x() * 3).backward()
        assert net[0].std_rho.grad is not None and net[0].std_rho.grad.abs() > 0


def test_excluded_neuron_keeps_its_own_error():
    """A neuron excluded at conversion and fed by a Bayesian layer still raises the
    conversion's own message (exclude the layers feeding it)."""
    model = to_sbnn(LoopLeaky(num_inputs=10), exclude="lif2")
    with pytest.raises(sbnn_addons.VarianceFlowError, match="exclude the layers feeding it"):
        model(_x())


@pytest.mark.parametrize("make", [
    lambda: snn.Synaptic(alpha=0.8, beta=BETA, init_hidden=True, spike_grad=spike_grad()),
    lambda: snn.RSynaptic(alpha=0.8, beta=BETA, linear_features=16, init_hidden=True,
                          spike_grad=spike_grad()),
    lambda: snn.Alpha(alpha=0.8, beta=0.7, init_hidden=True, spike_grad=spike_grad()),
])
@pytest.mark.parametrize("mode", ["sample", "mean"])
def test_two_state_neuron_with_the_drop_in_spike_grad_names_its_correlated_noise(make, mode):
    """A neuron with a synaptic state built with the drop-in ``spike_grad()`` behind a
    Bayesian layer (a model built by hand): its two states carry the same weight noise,
    correlated, which no spike function can track. The error names the neuron and the
    fixes that work for it, not an ``add`` the user did not write."""
    torch.manual_seed(0)
    model = nn.Sequential(sbnn_addons.BayesLinear(10, 16, std=0.2), make())
    sbnn_addons.track_variance(model)
    sbnn_addons.set_mode(model, mode)
    sutils.reset(model)
    with pytest.raises(sbnn_addons.VarianceFlowError,
                       match=f"(?s)snn.{type(model[1]).__name__} has a variance-aware spike "
                             "function.*correlated.*deterministic.*snn.Leaky") as err:
        for xt in _x():
            model(xt)
    assert "add of two tensors" not in str(err.value)


_ONE_STATE_OPTIONS = {
    "RLeaky reset to zero": (
        lambda: snn.RLeaky(beta=BETA, linear_features=16, reset_mechanism="zero",
                           init_hidden=True, spike_grad=spike_grad()),
        r"(?s)snn.RLeaky.*reset_mechanism='zero'.*reset_mechanism='subtract'.*to_sbnn"),
    "RLeaky one-to-one reset to zero": (  # to_sbnn refuses all_to_all=False: not offered
        lambda: snn.RLeaky(beta=BETA, all_to_all=False, reset_mechanism="zero",
                           init_hidden=True, spike_grad=spike_grad()),
        r"(?s)snn.RLeaky.*reset_mechanism='zero'.*reset_mechanism='subtract'"
        r"(?!.*convert it with)"),
    "Lapicque reset to zero": (
        lambda: snn.Lapicque(beta=BETA, reset_mechanism="zero", init_hidden=True,
                             spike_grad=spike_grad()),
        r"(?s)snn.Lapicque.*reset_mechanism='zero'.*reset_mechanism='subtract'"),
    "Leaky reset to zero without reset delay": (
        lambda: snn.Leaky(beta=BETA, reset_mechanism="zero", reset_delay=False,
                          init_hidden=True, spike_grad=spike_grad()),
        r"(?s)snn.Leaky.*reset_delay=False.*reset_mechanism='zero'.*reset_delay=True"),
    "Leaky state_quant": (
        lambda: snn.Leaky(beta=BETA, init_hidden=True, spike_grad=spike_grad(),
                          state_quant=_state_quant()),
        r"(?s)snn.Leaky.*state_quant.*remove state_quant"),
}


def _state_quant():
    from snntorch.functional import quant

    return quant.state_quant(num_bits=4, uniform=True)


@pytest.mark.parametrize("option", sorted(_ONE_STATE_OPTIONS))
@pytest.mark.parametrize("mode", ["sample", "mean"])
def test_drop_in_spike_grad_behind_a_bayesian_layer_names_the_neuron_option(option, mode):
    """A one-state snnTorch neuron with the drop-in ``spike_grad()`` behind a Bayesian
    layer (a model built by hand), whose own state update combines the noisy membrane
    with itself (``base - reset * base`` of RLeaky / Lapicque resetting to zero, the
    same-step reset ``mem - do_reset * mem``) or quantises it (``state_quant``): the
    noise variance is unknown. The error names the neuron, the option and the fix, not
    a ``sub`` or ``abs`` the user did not write."""
    make, match = _ONE_STATE_OPTIONS[option]
    torch.manual_seed(0)
    model = nn.Sequential(sbnn_addons.BayesLinear(10, 16, std=0.2), make())
    sbnn_addons.track_variance(model)
    sbnn_addons.set_mode(model, mode)
    sutils.reset(model)
    with pytest.raises(sbnn_addons.VarianceFlowError, match=match) as err:
        for xt in _x() * 3:
            model(xt)
    assert "of two tensors" not in str(err.value) and "'abs'" not in str(err.value)


# --------------------------------------------------------------------------- 4. surrogate_disable
@pytest.mark.parametrize("make", [
    lambda: snn.Leaky(beta=BETA, surrogate_disable=True),
    lambda: snn.RLeaky(beta=BETA, linear_features=16, surrogate_disable=True),
])
def test_surrogate_disable_is_refused_at_conversion(make):
    """surrogate_disable=True (a plain Heaviside, no surrogate gradient) would be replaced
    by the stochastic spike function silently: the conversion refuses it, naming the
    flag and the fixes, and an inplace conversion leaves the model as it was."""
    net = _EditLoop()
    net.lif = make()
    with pytest.raises(ValueError, match="(?s)'lif'.*surrogate_disable=True.*exclude"):
        to_sbnn(net, inplace=True)
    assert type(net.lif) in (snn.Leaky, snn.RLeaky) and not sbnn_addons.is_bayesian(net.fc)


def test_surrogate_disable_neuron_can_be_kept_with_exclude():
    """The documented alternative: exclude the neuron with the layers feeding it; it
    keeps snnTorch's surrogate-free Heaviside (no gradient through its spikes)."""
    torch.manual_seed(0)
    net = LoopLeaky(num_inputs=10)
    net.lif2 = snn.Leaky(beta=BETA, surrogate_disable=True)
    model = to_sbnn(net, exclude=["lif2", "fc2"])
    assert model.lif2.spike_grad == model.lif2._surrogate_bypass
    spk, mem = model(_x() * 3)
    assert not spk.requires_grad and mem.requires_grad  # as in snnTorch


class _SoftSpike(torch.autograd.Function):
    """A user's spike function whose forward is a sigmoid (graded), not a Heaviside."""

    @staticmethod
    def forward(ctx, u):
        return torch.sigmoid(4 * u)

    @staticmethod
    def backward(ctx, grad):
        return grad


def _at_or_above(u):
    """A Heaviside that fires at ``u >= 0`` (SpikingJelly's), where snnTorch's fire at
    ``u > 0``."""
    return (u >= 0).to(u.dtype)


@pytest.mark.parametrize("fn", [_SoftSpike.apply, _at_or_above])
def test_a_spike_grad_whose_forward_is_not_heaviside_is_refused_at_conversion(fn):
    """A neuron whose ``spike_grad`` forward is not snnTorch's Heaviside ``1[u > 0]`` (a
    user's graded sigmoid, a step at ``u >= 0``): the stochastic spike function would
    replace it with binary spikes, and mean mode would differ from the host model,
    silently. The conversion refuses it, naming the neuron and the ways out, and an
    inplace conversion leaves the model as it was; kept with ``exclude``, together with
    the layer feeding it, the model runs as the host's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 16), snn.Leaky(beta=BETA, init_hidden=True),
                        nn.Linear(16, 4),
                        snn.Leaky(beta=BETA, init_hidden=True, output=True, spike_grad=fn))
    with pytest.raises(ValueError, match=r"(?s)'3'.*spike_grad.*not snnTorch's Heaviside"
                                         r".*surrogate.atan\(\).*exclude"):
        to_sbnn(net, inplace=True)
    assert type(net[3]) is snn.Leaky and not sbnn_addons.is_bayesian(net[2])
    model = to_sbnn(net, exclude=["2", "3"])
    x = _x() * 3
    sutils.reset(net)
    sutils.reset(model)
    with torch.no_grad(), sbnn_addons.mode(model, "mean"):
        for xt in x:
            ref, got = net(xt), model(xt)
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("factory", ["atan", "fast_sigmoid", "sigmoid", "triangular",
                                     "spike_rate_escape", "straight_through_estimator",
                                     "heaviside", "SSO", "SFS"])
def test_every_snntorch_surrogate_converts(factory):
    """snnTorch's own surrogates (all a Heaviside ``1[u > 0]`` forward) are not refused."""
    from snntorch import surrogate

    net = nn.Sequential(nn.Linear(10, 16),
                        snn.Leaky(beta=BETA, init_hidden=True,
                                  spike_grad=getattr(surrogate, factory)()))
    model = to_sbnn(net)
    assert isinstance(model[1].spike_grad, sbnn_addons.IWSTSpike)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_drop_in_spike_grad_copied_mid_sequence_resets_with_the_emitted_spike(how):
    """A model with the drop-in ``spike_grad()`` copied mid-sequence: the copy's next
    step resets each neuron by the spike it emitted (the copy's membrane is a value copy;
    the spike function's recent draws travel with it), as the original does."""
    from _copies import copy_by

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 30),
                        snn.Leaky(beta=BETA, spike_grad=spike_grad(), init_hidden=True))
    x = torch.rand(6, 16, 10) * 0.5
    with torch.no_grad():
        sutils.reset(net)
        for t in range(4):
            emitted = net(x[t]).clone()
        copy = copy_by(net, how)
        net(x[4])
        copy(x[4])
    assert torch.equal(net[1].reset, emitted)
    assert torch.equal(copy[1].reset, emitted)


def test_init_hidden_membrane_edited_out_of_place_raises():
    """``lif.mem = 0.5 * lif.mem`` between two steps of an ``init_hidden=True`` model:
    the next training step raises instead of restarting the noise variance."""
    torch.manual_seed(0)
    model = to_sbnn(nn.Sequential(nn.Linear(10, 16),
                                  snn.Leaky(beta=BETA, init_hidden=True)))
    sutils.reset(model)
    x = _x()
    model(x[0])
    model(x[1])
    model[1].mem = 0.5 * model[1].mem
    with pytest.raises(sbnn_addons.VarianceFlowError, match="computed from its last membrane"):
        model(x[2])


@pytest.mark.parametrize("mode", ["sample", "mean"])
def test_drop_in_spike_grad_counts_each_emitted_spike_once(mode):
    """snnTorch calls ``spike_grad`` a second time for the reset: in ``mean`` mode that
    call used to fire again, so ``SpikeMonitor`` / ``mc_predict(eval_mode="mean")``
    counted every spike twice (the step's and the previous step's). The counts are the
    spikes the neurons emit, in both modes; ``mean`` mode still equals the host model."""
    from sbnn_addons.metrics import SpikeMonitor

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(20, 16), snn.Leaky(beta=BETA, init_hidden=True, spike_grad=spike_grad()),
        nn.Linear(16, 5),
        snn.Leaky(beta=BETA, init_hidden=True, output=True, spike_grad=spike_grad()))
    with torch.no_grad():
        net[0].weight.mul_(4)
        net[2].weight.mul_(4)
    host = nn.Sequential(nn.Linear(20, 16), snn.Leaky(beta=BETA, init_hidden=True),
                         nn.Linear(16, 5), snn.Leaky(beta=BETA, init_hidden=True, output=True))
    host.load_state_dict(net.state_dict(), strict=False)
    x = (torch.rand(8, 6, 20) < 0.4).float()
    emitted = {"1.spike_grad": 0.0, "3.spike_grad": 0.0}
    net[1].register_forward_hook(
        lambda m, a, out: emitted.__setitem__("1.spike_grad", emitted["1.spike_grad"]
                                              + float(out.sum())))
    sutils.reset(net)
    sutils.reset(host)
    with torch.no_grad(), sbnn_addons.mode(net, mode), SpikeMonitor(net) as mon:
        for t in range(8):
            spk, mem = net(x[t])
            emitted["3.spike_grad"] += float(spk.sum())
            if mode == "mean":
                ref = host(x[t])
                assert torch.equal(spk, ref[0]) and torch.equal(mem, ref[1])
    assert emitted["1.spike_grad"] > 0 and emitted["3.spike_grad"] > 0
    assert {n: float(c) for n, c in mon.counts.items()} == emitted
    assert mon.units == {"1.spike_grad": 8 * 6 * 16, "3.spike_grad": 8 * 6 * 5}
    total = sum(emitted.values())
    forward = lambda m, x: torch.stack([m(x_t)[1] for x_t in x]).mean(0)  # noqa: E731
    pred = sbnn_addons.mc_predict(net, x, 2, forward=forward, eval_mode=mode, seed=0)
    if mode == "mean":  # two identical passes, each emitting what the loop above did
        assert pred.spike_counts.tolist() == [total] * 2



class _Unmark(nn.Module):
    """``s * 1``: the same spikes as a plain tensor (any operation drops the binary mark)."""

    def forward(self, s):
        return s * 1.0


@pytest.mark.parametrize("conv", [False, True])
def test_spikes_into_a_layer_without_detached_input_variance_get_the_gradient_of_x_squared(
        conv):
    """A converted model whose Bayesian layers are switched to
    ``detach_input_variance=False`` (the gradient also reaches the layer's input through
    the variance ``s^2 sum x^2``): the spikes of a converted neuron get ``2 s^2 x`` there.
    They used to get ``s^2`` at every unit, since they come marked binary (``x^2 = x``
    holds for the values, not the derivative), so the same network trained differently
    with a ``* 1`` after the neuron."""
    def build(unmark: bool):
        torch.manual_seed(0)
        first = nn.Conv2d(1, 4, 3, padding=1) if conv else nn.Linear(12, 16)
        second = nn.Conv2d(4, 4, 3, padding=1) if conv else nn.Linear(16, 8)
        with torch.no_grad():
            first.weight.mul_(3)
        net = nn.Sequential(first, snn.Leaky(beta=BETA, init_hidden=True),
                            *([_Unmark()] if unmark else []), second,
                            snn.Leaky(beta=BETA, init_hidden=True, output=True))
        model = to_sbnn(net, std=0.3)
        for m in model.modules():
            if hasattr(m, "detach_input_variance"):
                m.detach_input_variance = False
        return model

    x = torch.rand(4, 6, 1, 6, 6) if conv else torch.rand(4, 6, 12)
    grads = []
    for unmark in (False, True):
        model = build(unmark)
        sbnn_addons.seed_spikes(model, 3)
        sutils.reset(model)
        outs = [model(x[t]) for t in range(x.shape[0])]
        loss = sum(3 * spk.sum() + mem.square().sum() for spk, mem in outs)
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    assert float(grads[0][0].abs().sum()) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


class _Logged(nn.Module):
    """A user's wrapper around the drop-in spike function, with forward hooks on both
    (each hooked call adds frames of torch's own between snnTorch and the function)."""

    def __init__(self):
        super().__init__()
        self.fn = spike_grad()
        self.calls = 0
        for m in (self, self.fn):
            m.register_forward_hook(self._count)

    def _count(self, module, args, out):
        self.calls += module is self

    def forward(self, u):
        return self.fn(u)


def test_drop_in_spike_grad_in_a_hooked_wrapper_still_resets_with_the_emitted_spike():
    """``snn.Leaky(spike_grad=Wrapper(spike_grad()))`` with forward hooks: snnTorch's reset
    call sat too many frames above the spike function to be recognised, so it drew anew
    (the reset was not the emitted spike) and counted as emitted spikes. The reset is
    each step's emitted spike and the counts are the spikes emitted."""
    from sbnn_addons.metrics import SpikeMonitor

    torch.manual_seed(0)
    wrapper = _Logged()
    lif = snn.Leaky(beta=BETA, spike_grad=wrapper, init_hidden=True)
    x = torch.rand(8, 8, 12) * 1.5
    sutils.reset(lif)
    emitted, prev = 0.0, None
    with torch.no_grad(), SpikeMonitor(lif) as mon:
        for t in range(x.shape[0]):
            spk = lif(x[t])
            if prev is not None:
                assert torch.equal(lif.reset, prev), t
            prev = spk.clone()
            emitted += float(spk.sum())
    assert emitted > 0 and wrapper.calls == 2 * x.shape[0]  # snnTorch's two calls a step
    assert mon.total_spikes() == emitted


# --------------------------------------------------------------------------- noiseless neurons
def _two_layer_net(**options) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), snn.Leaky(beta=BETA, init_hidden=True, **options),
                        nn.Linear(8, 4), snn.Leaky(beta=BETA, init_hidden=True, output=True))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(3.0)
    return net


@pytest.mark.parametrize("kw", [dict(include="0", spike_std=None),
                                dict(exclude="2", spike_std=0.0),
                                dict(std=0.0, learn_std=False, spike_std=None)])
def test_a_converted_neuron_without_noise_refuses_a_gradient_through_its_spikes(kw):
    """A converted neuron whose drive carries no variance (the layer feeding it left
    deterministic by include / exclude, or a fixed zero std) and whose spike function has
    no noise of its own (``spike_std=None`` or 0) fires deterministically, and the
    stochastic spike's gradient is then 0: a loss on its spikes trained nothing before it
    (every weight gradient was 0, without an error). The backward names the neuron and
    the fixes; a membrane readout, which takes no gradient through those spikes, trains;
    ``mean`` mode and no-grad passes run."""
    x = torch.rand(5, 3, 6) * 2
    model = to_sbnn(_two_layer_net(), **kw)
    sutils.reset(model)
    loss = sum(model(x[t])[0].sum() for t in range(len(x)))
    with pytest.raises(sbnn_addons.VarianceFlowError,
                       match=r"(?s)Leaky.*no noise.*spike_std.*exclude"):
        loss.backward()
    if kw.get("std") is None:  # the first neuron has its layer's noise
        sutils.reset(model)
        model.zero_grad()
        sum(model(x[t])[1].sum() for t in range(len(x))).backward()  # membrane readout
        assert model[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        sutils.reset(model)
        model(x[0])
    with sbnn_addons.mode(model, "mean"):
        sutils.reset(model)
        model(x[0])[0].sum().backward()


def test_a_converted_neuron_with_noise_of_its_own_passes_the_gradient():
    """With the default ``spike_std`` a neuron fed by a deterministic layer has its own
    noise: the gradient of a loss on its spikes reaches every layer before it."""
    x = torch.rand(5, 3, 6) * 2
    model = to_sbnn(_two_layer_net(), include="0")
    sutils.reset(model)
    sum(model(x[t])[0].sum() for t in range(len(x))).backward()
    assert model[0].weight.grad.abs().sum() > 0 and model[2].weight.grad.abs().sum() > 0


def test_nan_arising_inside_a_converted_model_is_not_trained_on():
    """A NaN made inside the model (here by a module of the user's) reached the fused
    step's kernel, whose backward gave it a finite gradient: the NaN units fired nothing
    and the model trained on, silently (the host's surrogate gives NaN gradients). The
    gradients are NaN, as on the PyTorch path, so the next call names the parameter."""

    class NaNUnit(nn.Module):
        def forward(self, x):
            bad = torch.zeros_like(x)
            bad[..., 0] = float("nan")
            return x + bad

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), NaNUnit(), snn.Leaky(beta=BETA, init_hidden=True),
                        nn.Linear(8, 3), snn.Leaky(beta=BETA, init_hidden=True, output=True))
    model = to_sbnn(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.rand(4, 2, 4)
    sutils.reset(model)
    torch.stack([model(x_t)[0] for x_t in x]).sum().backward()
    assert torch.isnan(model[0].weight.grad).any()
    opt.step()
    sutils.reset(model)
    with pytest.raises(ValueError, match="NaN"):
        model(x[0])


# --------------------------------------------------------------------------- 5. membranes fed on
#: Input currents of the second neuron of ``MembraneFedLoop`` computed from the first
#: neuron's membrane ``mem`` (through its layer ``fc2``, or not).
_MEMBRANE_FEEDS = {
    "fc2(mem)": lambda net, spk, mem: net.fc2(mem),
    "fc2(0.5 * mem)": lambda net, spk, mem: net.fc2(0.5 * mem),
    "fc2(mem.detach())": lambda net, spk, mem: net.fc2(mem.detach()),
    "fc2(mem.flatten(1))": lambda net, spk, mem: net.fc2(mem.flatten(1)),
    "fc2(spk + mem.clamp(0, 1))": lambda net, spk, mem: net.fc2(spk + mem.clamp(0, 1)),
}
_CURRENTS_FROM_MEMBRANES = {
    "fc2(mem)": lambda net, spk, mem: net.fc2(mem),
    "0.5 * mem[:, :5]": lambda net, spk, mem: 0.5 * mem[:, :5],
    "fc2(spk) + mem[:, :5]": lambda net, spk, mem: net.fc2(spk) + mem[:, :5],
}


def _membrane_fed(feed, **convert):
    torch.manual_seed(0)
    return to_sbnn(MembraneFedLoop(feed), **convert), torch.rand(5, 4, 12) * 3


@pytest.mark.parametrize("kernels_on", [True, False])
@pytest.mark.parametrize("feed", list(_MEMBRANE_FEEDS))
def test_a_bayesian_layer_fed_by_a_membrane_in_an_explicit_loop_raises(feed, kernels_on):
    """``fc2(mem1)``: the membrane a step returns is a plain tensor whose noise variance
    the neuron keeps, so the layer took it as noise-free (its output variance
    ``s^2 sum mem^2`` only) and the first layer's noise vanished from the second neuron,
    without an error; a compiled step refuses it (the membrane carries its variance)."""
    net, x = _membrane_fed(_MEMBRANE_FEEDS[feed])
    with kernels.use_kernels(kernels_on), pytest.raises(
            sbnn_addons.VarianceFlowError,
            match=r"the input of BayesLinear \('fc2'\) is the membrane of neuron 'lif1'.*"
                  r"spikes instead.*exclude="):
        net(x).sum().backward()


@pytest.mark.parametrize("feed", ["fc2(mem)", "fc2(mem.detach())"])
def test_a_bayesian_layer_fed_by_a_membrane_raises_without_gradients(feed):
    """Evaluation (``torch.no_grad()``, ``sample`` mode): the membrane itself, or an
    alias of it, is recognised by its storage."""
    net, x = _membrane_fed(_MEMBRANE_FEEDS[feed])
    with torch.no_grad(), pytest.raises(sbnn_addons.VarianceFlowError,
                                        match="is the membrane of neuron 'lif1'"):
        net(x)


@pytest.mark.parametrize("kernels_on", [True, False])
@pytest.mark.parametrize("feed", list(_CURRENTS_FROM_MEMBRANES))
def test_a_neuron_driven_by_another_neurons_membrane_raises(feed, kernels_on):
    """With ``fc2`` left deterministic the second neuron's input current held the first
    neuron's membrane without its noise variance (the neuron took that part as
    noise-free), silently."""
    net, x = _membrane_fed(_CURRENTS_FROM_MEMBRANES[feed], exclude=["fc2"])
    with kernels.use_kernels(kernels_on), pytest.raises(
            sbnn_addons.VarianceFlowError,
            match=r"the input current of SBNNLeaky \('lif2'\) is the membrane of neuron "
                  r"'lif1'"):
        net(x).sum().backward()


@pytest.mark.parametrize("kernels_on", [True, False])
def test_spikes_and_noise_free_membranes_still_feed_layers_and_neurons(kernels_on):
    """Not refused: spikes (also through dropout), a membrane in ``mean`` mode (no noise),
    and a membrane whose neuron is fed by deterministic layers (the fix the error names);
    the noisy layers get a gradient on their std."""
    spikes = [lambda net, spk, mem: net.fc2(spk),
              lambda net, spk, mem: net.fc2(nn.functional.dropout(spk.view(-1, 16), 0.2))]
    with kernels.use_kernels(kernels_on):
        for feed in spikes:
            net, x = _membrane_fed(feed)
            net(x).sum().backward()
            assert net.fc2.std_rho.grad.abs() > 0
        for feed in _MEMBRANE_FEEDS.values():
            net, x = _membrane_fed(feed)
            with sbnn_addons.mode(net, "mean"):
                net(x).sum().backward()
            net, x = _membrane_fed(feed, exclude=["fc1"])
            net(x).sum().backward()
            assert net.fc2.std_rho.grad.abs() > 0
