"""snnTorch adapter: training, round trips, export, errors and the import boundary."""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys

import pytest
import snntorch as snn
import torch
import torch.nn.functional as F
from _snntorch_nets import LoopLeaky, make, run
from torch import nn

import sbnn_addons
from sbnn_addons.data import load_digits_split, rate_code
from sbnn_addons.snntorch import IWSTSpike, reset, spike_grad, to_sbnn, to_snntorch


def _seeded(model, x):
    sbnn_addons.seed_spikes(model, 0)
    return run(model, x)


def test_training_on_rate_coded_digits():
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = load_digits_split(seed=0)
    g = torch.Generator().manual_seed(0)
    num_steps = 8
    model = to_sbnn(LoopLeaky(64, 64, 10), estimator="iwst(0.5)")
    sbnn_addons.seed_spikes(model, 0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _step in range(40):
        idx = torch.randint(0, len(y_tr), (64,), generator=g)
        spk, mem = model(rate_code(x_tr[idx], num_steps, g))
        loss = F.cross_entropy(mem.mean(0), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    with torch.no_grad(), sbnn_addons.mode(model, "mean"):
        spk, mem = model(rate_code(x_te, num_steps, g))
    acc = (mem.mean(0).argmax(1) == y_te).float().mean().item()
    assert acc >= 0.3, acc


def _trained_like(name):
    net, x = make(name)
    model = to_sbnn(net, std=0.2, spike_std=0.1)
    with torch.no_grad():  # move parameters away from their initial values
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model, x


@pytest.mark.parametrize("name", ["seq_rleaky", "loop_leaky", "tutorial_conv"])
def test_state_dict_round_trip(name):
    model, x = _trained_like(name)
    fresh, _ = make(name, seed=5)
    fresh = to_sbnn(fresh, std=0.2, spike_std=0.1)
    fresh.load_state_dict(model.state_dict())
    a, b = _seeded(model, x), _seeded(fresh, x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("name", ["seq_rleaky", "loop_leaky", "seq_conv"])
def test_deepcopy_and_torch_save_round_trip(name, tmp_path):
    model, x = _trained_like(name)
    ref = _seeded(model, x)
    dup = copy.deepcopy(reset(model))
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    for other in (dup, loaded):
        out = _seeded(other, x)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    # the stochastic pass really is stochastic
    sbnn_addons.seed_spikes(model, 7)
    assert not torch.equal(run(model, x)[0], ref[0])


def test_deepcopy_while_state_holds_a_graph():
    model, x = _trained_like("seq_leaky")
    model(x[0])  # state now holds an autograd graph
    dup = to_snntorch(model)  # deep copies internally without failing
    assert isinstance(dup[1], snn.Leaky)


@pytest.mark.parametrize("name", ["seq_leaky", "seq_rleaky", "loop_rleaky", "tutorial_conv"])
def test_to_snntorch_equals_mean_mode(name):
    model, x = _trained_like(name)
    with sbnn_addons.mode(model, "mean"):
        ref = run(model, x)
    plain = to_snntorch(model)
    kinds = {type(m).__module__.split(".")[0] for m in plain.modules()}
    assert "sbnn_addons" not in kinds
    assert all(type(m) in (snn.Leaky, snn.RLeaky) for m in plain.modules()
               if hasattr(m, "spike_grad"))
    if name.startswith("seq"):  # the original surrogate comes back (the same function)
        original, _ = make(name)
        assert plain[1].spike_grad.__code__ is original[1].spike_grad.__code__
    out = run(plain, x)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    # original snnTorch training still works on the export
    out[1].sum().backward()


def test_to_snntorch_of_a_compiled_wrapper_exports_the_model_it_wraps():
    """``to_snntorch(torch.compile(model))`` (a user who trained the compiled wrapper)
    gives the plain snnTorch model, not a compiled wrapper around it: its state dict has
    the host model's keys (no ``_orig_mod.`` prefix) and no module of the library."""
    model, x = _trained_like("seq_leaky")
    with sbnn_addons.mode(model, "mean"):
        ref = run(model, x)
    plain = to_snntorch(torch.compile(model))
    assert not isinstance(plain, torch._dynamo.eval_frame.OptimizedModule)
    assert set(plain.state_dict()) == set(to_snntorch(model).state_dict())
    assert {type(m).__module__.split(".")[0] for m in plain.modules()} == {"torch", "snntorch"}
    out = run(plain, x)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    # the compiled host model itself (not converted) is named, as the host model is
    host, _ = make("seq_leaky")
    with pytest.raises(ValueError, match="nothing to export: Sequential"):
        to_snntorch(torch.compile(host))


def test_to_snntorch_pickles_without_sbnn_addons():
    from snntorch import surrogate

    model, x = _trained_like("seq_rleaky")
    run(model, x)
    plain = to_snntorch(model, spike_grad=surrogate.StraightThroughEstimator.apply)
    blob = pickle.dumps(plain)
    assert b"sbnn_addons" not in blob
    buf = io.BytesIO()
    torch.save(plain, buf)
    assert b"sbnn_addons" not in buf.getvalue()
    assert b"sbnn_addons" not in pickle.dumps(to_snntorch(model).state_dict())


def test_to_snntorch_partial_atan_pickles():
    """An exported model pickles whole with a module-level spike function (snnTorch's own
    atan() is a closure, which neither the original nor the export can pickle)."""
    import functools

    from snntorch import surrogate

    model, x = _trained_like("seq_rleaky")
    run(model, x)
    plain = to_snntorch(model, spike_grad=functools.partial(surrogate.ATan.apply, alpha=2.0))
    u = torch.linspace(-2, 2, 41, requires_grad=True)
    u_ref = u.detach().clone().requires_grad_()
    neuron = next(m for m in plain.modules() if isinstance(m, snn.Leaky | snn.RLeaky))
    neuron.spike_grad(u).sum().backward()
    surrogate.atan()(u_ref).sum().backward()
    torch.testing.assert_close(u.grad, u_ref.grad, rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(plain, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    reset(plain)
    reset(again)
    torch.testing.assert_close(run(again, x)[1], run(plain, x)[1], rtol=0, atol=0)


def test_to_snntorch_after_pickle_refuses_to_replace_a_lost_custom_surrogate():
    """A user's own surrogate closure (snnTorch's `custom_surrogate`) cannot be pickled
    or rebuilt: after `torch.save` / `torch.load` of the converted model, the export
    raises and names `spike_grad=` instead of returning an ATan model silently; snnTorch's
    own factories are rebuilt; an explicit `spike_grad` exports."""
    from snntorch import surrogate

    def my_grad(input_, grad_input, spikes):
        return 0.5 * grad_input

    def make_net(fn):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 4), snn.Leaky(beta=0.9, init_hidden=True,
                                                        output=True, spike_grad=fn))

    def saved_and_loaded(model):
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    custom = surrogate.custom_surrogate(my_grad)
    model = to_sbnn(make_net(custom))
    assert to_snntorch(model)[1].spike_grad is custom  # no pickling: the same function
    again = saved_and_loaded(model)
    with pytest.raises(ValueError, match="spike_grad"):
        to_snntorch(again)
    assert to_snntorch(again, spike_grad=surrogate.atan())[1].spike_grad is not None
    rebuilt = to_snntorch(saved_and_loaded(to_sbnn(make_net(surrogate.fast_sigmoid(25)))))
    assert rebuilt[1].spike_grad.__qualname__.startswith("fast_sigmoid")


def test_to_snntorch_batchnorm_export():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4),
                        snn.Leaky(beta=0.9, init_hidden=True), nn.Flatten(),
                        nn.Linear(4 * 6 * 6, 10), snn.Leaky(beta=0.9, init_hidden=True,
                                                            output=True)).eval()
    model = to_sbnn(net)
    plain = to_snntorch(model).eval()
    assert isinstance(plain[1], nn.BatchNorm2d)
    x = (torch.rand(4, 3, 1, 8, 8) < 0.5).float()
    with sbnn_addons.mode(model, "mean"):
        ref = run(model, x)
    torch.testing.assert_close(run(plain, x)[1], ref[1], rtol=1e-5, atol=1e-5)


def test_spike_grad_factory():
    fn = spike_grad("iwst(0.5)", std=0.2, learn_std=True)
    assert isinstance(fn, IWSTSpike) and fn.learn_std
    lif = snn.Leaky(beta=0.9, spike_grad=fn)
    assert "spike_grad.std_rho" in dict(lif.named_parameters())
    spk, _ = lif(torch.full((3, 4), 2.0))
    assert spk.shape == (3, 4)


# --------------------------------------------------------------------------- errors
def test_synaptic_is_rejected_with_reason():
    net = nn.Sequential(nn.Linear(4, 4), snn.Synaptic(alpha=0.8, beta=0.9, init_hidden=True))
    with pytest.raises(TypeError, match="correlated.*Leaky, snn.RLeaky"):
        to_sbnn(net)


@pytest.mark.parametrize("neuron", [
    lambda: snn.Alpha(alpha=0.9, beta=0.8), lambda: snn.Lapicque(beta=0.9),
    lambda: snn.RSynaptic(alpha=0.8, beta=0.9, linear_features=4),
])
def test_unsupported_neuron(neuron):
    n = neuron()
    net = nn.Sequential(nn.Linear(4, 4), n)
    with pytest.raises(TypeError, match=f"{type(n).__name__}.*Supported neurons: snn.Leaky"):
        to_sbnn(net)


def test_double_conversion_nothing_to_convert_and_bad_batchnorm():
    net, x = make("seq_leaky")
    model = to_sbnn(net)
    with pytest.raises(ValueError, match="already converted"):
        to_sbnn(model)
    dropin = nn.Sequential(nn.Linear(2, 2), snn.Leaky(beta=0.5, spike_grad=spike_grad()))
    with pytest.raises(ValueError, match=r"spike_grad\(\).*surrogate\.atan\(\)"):
        to_sbnn(dropin)  # a drop-in model: build it with a snnTorch surrogate
    with pytest.raises(ValueError, match=r"spike_grad\(\).*surrogate\.atan\(\)"):
        to_snntorch(dropin)
    with pytest.raises(ValueError, match="nothing to convert"):
        to_sbnn(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    with pytest.raises(ValueError, match="batchnorm"):
        to_sbnn(net, batchnorm="fold")
    with pytest.raises(ValueError, match="64 input features"):
        reset(model)
        model(torch.zeros(2, 63))


def test_import_does_not_import_snntorch():
    code = ("import sys, sbnn_addons; "
            "assert 'snntorch' not in sys.modules, 'snntorch imported'; "
            "assert 'tonic' not in sys.modules, 'tonic imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_to_snntorch_of_a_model_that_was_not_converted_raises():
    """``model = to_sbnn(net)``, trained, then ``to_snntorch(net)`` (the original by
    mistake): the export returned a copy of the untrained original, silently. A model
    without any converted part (Bayesian layer, ChannelAffine, converted neuron) now
    raises, naming the fix; the converted model, also with its neurons excluded, exports."""
    net, x = make("seq_leaky")
    model = to_sbnn(net)
    for wrong in (net, nn.Sequential(nn.Linear(3, 3), nn.ReLU())):
        with pytest.raises(ValueError, match=r"nothing to export: Sequential has no Bayesian "
                                             r"layer.*to_sbnn converts a copy"):
            to_snntorch(wrong)
    assert type(to_snntorch(model)[1]) is snn.Leaky
    assert type(to_snntorch(to_sbnn(net, exclude=["1", "3"]))[0]) is nn.Linear


def test_rleaky_model_copies_and_exports_after_an_evaluation_pass():
    """RLeaky(init_hidden) keeps its last spikes (a SpikeTensor under no_grad) as state:
    the model deep-copies and exports after an evaluation forward, as plain snnTorch does."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(10, 16), snn.RLeaky(beta=0.9, linear_features=16,
                                                      init_hidden=True))
    model = to_sbnn(net)
    x = torch.rand(4, 10)
    with torch.no_grad():
        model(x)
    twin = copy.deepcopy(model)
    assert torch.equal(twin[1].spk, model[1].spk)
    plain = to_snntorch(model)
    assert isinstance(plain[1], snn.RLeaky)


def test_unsupported_neuron_errors_name_the_exclude_escape():
    """An unsupported neuron's error names exclude= (keep it with its layers
    deterministic); RLeaky(all_to_all=False)'s one-to-one recurrence is named as such."""
    net = nn.Sequential(nn.Linear(4, 4), snn.Alpha(alpha=0.9, beta=0.8, init_hidden=True))
    with pytest.raises(TypeError, match=r"Alpha.*exclude=\['1'"):
        to_sbnn(net)
    net = nn.Sequential(nn.Linear(4, 4), snn.RLeaky(beta=0.9, all_to_all=False, V=0.5,
                                                    init_hidden=True))
    with pytest.raises(TypeError, match="all_to_all=False.*exclude='1.recurrent'"):
        to_sbnn(net)
    model = to_sbnn(net, exclude="1.recurrent")  # the escape the message names works
    x = torch.rand(3, 4)
    with sbnn_addons.mode(model, "mean"):
        torch.testing.assert_close(model(x)[0], net(x)[0])


def test_frozen_and_tied_parameters_survive_conversion_and_export():
    """A frozen layer (and a frozen BatchNorm folded to an affine) stays frozen, tied
    weights stay one parameter, through to_sbnn and to_snntorch; a training step moves
    neither the frozen weight nor the two tied copies apart."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), snn.Leaky(beta=0.9, init_hidden=True),
                        nn.Linear(6, 6), snn.Leaky(beta=0.9, init_hidden=True, output=True))
    net[3].weight = net[0].weight  # tied
    net[0].bias.requires_grad_(False)
    net[1].requires_grad_(False)
    for batchnorm in ("keep", "affine"):
        model = to_sbnn(net, batchnorm=batchnorm)
        assert model[3].weight is model[0].weight
        assert not model[0].bias.requires_grad and model[0].weight.requires_grad
        assert not any(p.requires_grad for p in model[1].parameters())
        frozen = model[0].bias.detach().clone()
        opt = torch.optim.SGD(sbnn_addons.param_groups(model, lr=0.1), lr=0.1)
        reset(model)
        x = torch.rand(4, 5, 6)
        sum(model(x[t])[0].sum() + model[0].weight.sum() for t in range(4)).backward()
        opt.step()
        assert torch.equal(model[0].bias, frozen)
        plain = to_snntorch(model)
        assert plain[3].weight is plain[0].weight
        assert not plain[0].bias.requires_grad
        assert not any(p.requires_grad for p in plain[1].parameters())


@pytest.mark.parametrize("reparam", ["prune", "weight_norm", "spectral_norm"])
def test_export_after_a_step_of_a_layer_whose_weight_is_recomputed(reparam):
    """``torch.nn.utils.prune`` and the hook-based ``weight_norm`` / ``spectral_norm``
    recompute ``.weight`` in a forward pre-hook, so between an optimiser step and the next
    forward ``.weight`` still holds the weights from before the step. The export read that
    attribute: exported after the last training step it dropped that step (and a pruned
    layer's ``weight_orig`` was the masked old weight), so it no longer equalled the
    ``mean`` mode, silently."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model, x = make("seq_leaky")
    model = to_sbnn(model)
    if reparam == "prune":
        prune.l1_unstructured(model[0], "weight", amount=0.5)
    else:
        getattr(torch.nn.utils, reparam)(model[0])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    run(model, x)[1].sum().backward()
    opt.step()  # the last step: no forward after it
    plain = to_snntorch(model).eval()
    if reparam == "prune":
        assert torch.equal(plain[0].weight_orig, model[0].weight_orig)
    model.eval()
    with torch.no_grad(), sbnn_addons.mode(model, "mean"):
        ref = run(model, x)
        out = run(plain, x)
    assert torch.equal(plain[0].weight, model[0].weight)  # both recomputed by the run
    assert torch.equal(out[1], ref[1])


def test_the_other_hosts_models_name_the_spikingjelly_adapter():
    """A SpikingJelly model given to the snnTorch adapter raised "nothing to convert", and
    a SpikingJelly-converted model given to ``to_snntorch`` an error about a neuron built
    with ``spike_grad()``: both now name the SpikingJelly adapter."""
    from spikingjelly.activation_based import layer, neuron

    from sbnn_addons import spikingjelly as sbnn_sj

    net = nn.Sequential(layer.Linear(8, 6), neuron.LIFNode(), layer.Linear(6, 3),
                        neuron.LIFNode())
    with pytest.raises(ValueError, match=r"SpikingJelly neuron.*"
                                         r"sbnn_addons\.spikingjelly\.to_sbnn"):
        to_sbnn(net)
    with pytest.raises(TypeError, match=r"SpikingJelly.*"
                                        r"sbnn_addons\.spikingjelly\.to_spikingjelly"):
        to_snntorch(sbnn_sj.to_sbnn(net))
    mixed = nn.Sequential(nn.Linear(8, 6), neuron.LIFNode(), nn.Linear(6, 3),
                          snn.Leaky(beta=0.9, init_hidden=True, output=True))
    with pytest.raises(TypeError, match=r"module '1' \(LIFNode\) is a SpikingJelly neuron.*"
                                        r"exclude=\['1'"):
        to_sbnn(mixed)  # it converted fc1 and left the LIFNode to drop its noise
    to_sbnn(mixed, exclude=["0", "1"])


@pytest.mark.parametrize("reparam", ["prune", "weight_norm", "parametrize"])
def test_export_after_a_no_grad_pass_keeps_a_recomputed_weight_trainable(reparam):
    """The export took "is the weight trained" from ``.weight``; for a layer whose weight
    is recomputed (``torch.nn.utils.prune``, the hook-based ``weight_norm``) that is the
    tensor of the last forward, which an evaluation under ``torch.no_grad()`` computes
    without a gradient: the exported layer came out frozen (``weight_orig``
    ``requires_grad=False``) and fine-tuning it in snnTorch left it as it was, silently.
    A parametrized weight exported under ``torch.no_grad()`` did the same. A frozen
    weight stays frozen."""
    from torch.nn.utils import parametrize, prune

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    model, x = make("seq_leaky")
    model = to_sbnn(model)
    if reparam == "prune":
        prune.l1_unstructured(model[0], "weight", amount=0.5)
        prune.l1_unstructured(model[0], "bias", amount=0.3)
    elif reparam == "weight_norm":
        torch.nn.utils.weight_norm(model[0])
    else:
        parametrize.register_parametrization(model[0], "weight", Double())
    with torch.no_grad():
        run(model, x)  # an evaluation
        plain = to_snntorch(model)
    assert len(list(plain[0].parameters())) == 2  # weight(_orig), bias(_orig)
    assert all(p.requires_grad for p in plain[0].parameters())
    model[0].requires_grad_(False)
    with torch.no_grad():
        run(model, x)
    assert not any(p.requires_grad for p in to_snntorch(model)[0].parameters())


def test_to_snntorch_gives_each_neuron_its_own_copy_of_a_module_spike_grad():
    """``to_snntorch(model, spike_grad=module)``: a surrogate that is an ``nn.Module`` (a
    registered submodule, e.g. one with a learned slope) was one object in every exported
    neuron, so its parameters were tied across layers; the original surrogates, and
    SpikingJelly's ``to_spikingjelly(model, surrogate)``, give each neuron a copy."""
    from snntorch import surrogate

    class LearnedATan(nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha = nn.Parameter(torch.tensor(2.0))

        def forward(self, u):
            return surrogate.ATan.apply(u, float(self.alpha))

    model = to_sbnn(make("seq_leaky")[0])
    fn = LearnedATan()
    plain = to_snntorch(model, spike_grad=fn)
    assert isinstance(plain[1].spike_grad, LearnedATan)
    assert plain[1].spike_grad is not plain[3].spike_grad and plain[1].spike_grad is not fn
    assert len(list(plain.parameters())) == len({id(p) for p in plain.parameters()}) == 6


@pytest.mark.parametrize("name", ["seq_rleaky", "loop_leaky"])
def test_export_then_convert_again_needs_the_state_dict_for_the_noise_scales(name):
    """``to_sbnn(to_snntorch(model))``: the export holds the posterior means only, so the
    model converted again has new noise scales (sized from the weights, as any
    conversion), not the learned ones (documented); loading the SBNN's state dict into
    it restores them: its stochastic passes equal the original's."""
    model, x = _trained_like(name)
    again = to_sbnn(to_snntorch(model), std=0.2, spike_std=0.1)
    learned = dict(model.named_parameters())
    new = dict(again.named_parameters())
    assert learned.keys() == new.keys()
    assert not all(torch.equal(learned[k], new[k]) for k in learned if "std_rho" in k)
    again.load_state_dict(model.state_dict())
    a, b = _seeded(model, x), _seeded(again, x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_converted_checkpoint_in_the_host_model():
    """A converted model's state dict loaded into the host model (Training page): strict
    raises on the noise scales; ``strict=False`` loads the posterior means, and the host
    model then runs the mean mode exactly (as ``to_snntorch``'s export)."""
    model, x = _trained_like("seq_rleaky")
    host, _ = make("seq_rleaky", seed=5)
    with pytest.raises(RuntimeError, match="Unexpected key.*std_rho"):
        host.load_state_dict(model.state_dict())
    result = host.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys
    assert result.unexpected_keys and all(k.endswith("std_rho") for k in result.unexpected_keys)
    with torch.no_grad(), sbnn_addons.mode(model, "mean"):
        ref = run(model, x)
    with torch.no_grad():
        out = run(host, x)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
