"""Round trips (state_dict, deepcopy, torch.save/load, export) and errors of the
SpikingJelly adapter."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from _sj_helpers import run_sequence
from torch import nn

import sbnn_addons
from sbnn_addons import spikingjelly as sbnn_sj

pytest.importorskip("spikingjelly")
from spikingjelly.activation_based import functional, layer, neuron, surrogate  # noqa: E402


def _net(sm="m"):
    torch.manual_seed(0)
    net = nn.Sequential(
        layer.Conv2d(2, 4, 3, padding=1, step_mode=sm),
        layer.BatchNorm2d(4, step_mode=sm),
        neuron.ParametricLIFNode(step_mode=sm),
        layer.Flatten(step_mode=sm),
        layer.Linear(4 * 6 * 6, 5, step_mode=sm),
        neuron.LIFNode(tau=2.0, v_reset=None, step_mode=sm),
    )
    with torch.no_grad():
        net[0].weight.mul_(3)
        net[4].weight.mul_(3)
        net[4].bias.fill_(0.6)
    return net.eval()


X = (torch.rand(4, 3, 2, 6, 6, generator=torch.Generator().manual_seed(1)) < 0.5).float()


def _sample(model, sm="m"):
    sbnn_addons.seed_spikes(model, 0)
    with torch.no_grad():
        return run_sequence(model, X, sm)


@pytest.fixture
def sbnn():
    model = sbnn_sj.to_sbnn(_net(), spike_std=0.1)
    with torch.no_grad():  # make the converted parameters differ from the initial ones
        for p in model.parameters():
            p.add_(0.01)
    return model.eval()


def test_state_dict_round_trip(sbnn):
    ref = _sample(sbnn)
    other = sbnn_sj.to_sbnn(_net(), spike_std=0.1).eval()
    other.load_state_dict(sbnn.state_dict())
    assert torch.equal(_sample(other), ref)
    assert ref.sum() > 0


def test_deepcopy_after_forward_and_reset(sbnn):
    ref = _sample(sbnn)
    sbnn_sj.reset(sbnn)
    clone = copy.deepcopy(sbnn)
    assert torch.equal(_sample(clone), ref)


def test_torch_save_whole_model(sbnn):
    ref = _sample(sbnn)
    sbnn_sj.reset(sbnn)
    buf = io.BytesIO()
    torch.save(sbnn, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(_sample(loaded), ref)


@pytest.mark.parametrize("sm", ["s", "m"])
def test_export_equals_mean_mode(sm):
    model = sbnn_sj.to_sbnn(_net(sm), spike_std=0.1).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    with sbnn_addons.mode(model, "mean"), torch.no_grad():
        ref = run_sequence(model, X, sm)
    plain = sbnn_sj.to_spikingjelly(model, surrogate.ATan())
    assert type(plain[0]) is layer.Conv2d and plain[0].step_mode == sm
    assert type(plain[1]) is layer.BatchNorm2d and type(plain[4]) is layer.Linear
    assert type(plain[2].surrogate_function) is surrogate.ATan
    assert plain[2].surrogate_function is not plain[5].surrogate_function
    with torch.no_grad():
        out = run_sequence(plain.eval(), X, sm)
    assert torch.equal(out, ref)
    assert b"sbnn_addons" not in pickle.dumps(plain)
    # the default surrogate is a fresh Sigmoid per neuron
    default = sbnn_sj.to_spikingjelly(model)
    assert type(default[2].surrogate_function) is surrogate.Sigmoid
    assert default[2].surrogate_function is not default[5].surrogate_function


def test_export_of_a_compiled_wrapper_is_the_plain_model_it_wraps():
    """``to_spikingjelly(torch.compile(model))`` gives the plain SpikingJelly model, not a
    compiled wrapper around it: the host model's state-dict keys (no ``_orig_mod.``) and
    a pickle without the library."""
    model = sbnn_sj.to_sbnn(_net(), spike_std=0.1).eval()
    with sbnn_addons.mode(model, "mean"), torch.no_grad():
        ref = run_sequence(model, X, "m")
    plain = sbnn_sj.to_spikingjelly(torch.compile(model), surrogate.ATan())
    assert not isinstance(plain, torch._dynamo.eval_frame.OptimizedModule)
    assert set(plain.state_dict()) == set(sbnn_sj.to_spikingjelly(model).state_dict())
    assert b"sbnn_addons" not in pickle.dumps(plain)
    with torch.no_grad():
        assert torch.equal(run_sequence(plain.eval(), X, "m"), ref)
    # the compiled host model itself (not converted) is named, as the host model is
    with pytest.raises(ValueError, match="nothing to export: Sequential"):
        sbnn_sj.to_spikingjelly(torch.compile(_net()))


def test_export_seq_to_ann_container_plain_layers():
    torch.manual_seed(0)
    net = nn.Sequential(
        layer.SeqToANNContainer(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)),
        neuron.IFNode(step_mode="m"),
        layer.SeqToANNContainer(nn.Flatten(), nn.Linear(4 * 6 * 6, 3)),
    ).eval()
    model = sbnn_sj.to_sbnn(net)
    plain = sbnn_sj.to_spikingjelly(model).eval()
    assert type(plain[0][0]) is nn.Conv2d and type(plain[0][1]) is nn.BatchNorm2d
    assert type(plain[2][1]) is nn.Linear
    with sbnn_addons.mode(model, "mean"), torch.no_grad():
        ref = run_sequence(model, X, "m")
    with torch.no_grad():
        assert torch.equal(run_sequence(plain, X, "m"), ref)
    assert b"sbnn_addons" not in pickle.dumps(plain)


def test_surrogate_factory_in_lifnode():
    spike = sbnn_sj.surrogate_function("iwst(0.5)", std=0.2)
    node = neuron.LIFNode(tau=2.0, surrogate_function=spike, step_mode="m")
    x = torch.rand(5, 3, 4) * 2
    out = node(x)
    assert out.shape == x.shape and set(out.unique().tolist()) <= {0.0, 1.0}
    with sbnn_addons.mode(node, "mean"):
        functional.reset_net(node)
        mean = node(x)
    ref = neuron.LIFNode(tau=2.0, step_mode="m")(x)
    assert torch.equal(mean, ref)
    assert spike.at_zero and spike.batch_dim == 0


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("node", [neuron.IzhikevichNode, neuron.QIFNode])
def test_unsupported_neuron(node):
    net = nn.Sequential(layer.Linear(3, 4), node())
    with pytest.raises(TypeError, match=node.__name__ + r".*LIFNode"):
        sbnn_sj.to_sbnn(net)


def test_double_conversion():
    model = sbnn_sj.to_sbnn(_net())
    with pytest.raises(ValueError, match="already converted"):
        sbnn_sj.to_sbnn(model)
    dropin = nn.Sequential(layer.Linear(3, 4),
                           neuron.LIFNode(surrogate_function=sbnn_sj.surrogate_function()))
    with pytest.raises(ValueError, match=r"surrogate_function\(\).*surrogate\.ATan\(\)"):
        sbnn_sj.to_sbnn(dropin)


def test_nothing_to_convert():
    with pytest.raises(ValueError, match="nothing to convert"):
        sbnn_sj.to_sbnn(nn.Sequential(layer.Flatten(), nn.ReLU()))
    with pytest.raises(ValueError, match="nothing to convert"):
        sbnn_sj.to_sbnn(nn.Sequential(layer.Linear(3, 3)), exclude=["*"])


def test_a_model_without_a_neuron_is_named_before_it_changes():
    """Layers and no SpikingJelly neuron (or every neuron excluded): the layers became
    Bayesian, silently, and the first call raised (the snnTorch converter refuses such a
    model). A failed inplace=True conversion leaves the model as it was."""
    ann = nn.Sequential(layer.Linear(3, 4), nn.ReLU(), layer.Linear(4, 2))
    with pytest.raises(ValueError, match="no SpikingJelly neuron .*neuron.LIFNode"):
        sbnn_sj.to_sbnn(ann, inplace=True)
    assert type(ann[0]) is layer.Linear and type(ann[2]) is layer.Linear
    net = nn.Sequential(layer.Linear(3, 4), neuron.LIFNode(), layer.Linear(4, 2))
    with pytest.raises(ValueError, match="outside exclude"):
        sbnn_sj.to_sbnn(net, exclude=["1"])


def test_bad_batchnorm_value():
    with pytest.raises(ValueError, match="batchnorm"):
        sbnn_sj.to_sbnn(_net(), batchnorm="fold")


def test_mismatched_shapes():
    model = sbnn_sj.to_sbnn(_net())
    with pytest.raises(ValueError, match="expects"):
        model(torch.rand(4, 3, 5, 6, 6))  # 5 channels instead of 2
    with pytest.raises(ValueError, match=r"\[T, N, C, H, W\]"):
        model(torch.rand(3, 2, 6, 6))  # single-step input to a multi-step model
    sbnn_sj.reset(model)
    lin = sbnn_sj.to_sbnn(nn.Sequential(layer.Linear(3, 4), neuron.IFNode()))
    with pytest.raises(ValueError, match="3 input features"):
        lin(torch.rand(2, 5))


def test_link_neuron_on_hand_built_model():
    """A hand-built model (core BayesLinear + SJ node with the factory surrogate) gets the
    posterior variance once the neuron is linked; unsupported nodes are refused."""
    torch.manual_seed(0)
    spike = sbnn_sj.surrogate_function(std=None)  # the linked variance only
    net = nn.Sequential(
        sbnn_addons.BayesLinear(3, 4, std=0.5, learn_std=False),
        neuron.LIFNode(tau=2.0, surrogate_function=spike),
    )
    sbnn_addons.track_variance(net)
    sbnn_sj.link_neuron(net[1])
    seen = []
    original = spike.fire
    spike.fire = lambda u, var: (seen.append(var), original(u, var))[1]
    x = torch.rand(2, 3)
    net(x)
    torch.testing.assert_close(seen[0].expand(2, 4), net[0].output_variance(x) / 4)  # c = 1/tau
    with pytest.raises(TypeError, match="QIFNode"):
        sbnn_sj.link_neuron(neuron.QIFNode())


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_a_spike_function_put_in_after_the_conversion_is_named_until_linked(step_mode):
    """A converted neuron given a new surrogate_function() (another estimator) after the
    conversion: the link's hook stripped the Bayesian layer's variance from the input and
    the new, unlinked spike function fired without it (std_rho got no gradient, no word).
    The spike function now sees the variance and names link_neuron, after which the
    variance reaches it again."""
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(6, 8), neuron.LIFNode(), layer.Linear(8, 3),
                        neuron.LIFNode())
    functional.set_step_mode(net, step_mode)
    with torch.no_grad():
        net[0].weight.mul_(4.0)  # drives near the threshold: a gradient for the std
    model = sbnn_sj.to_sbnn(net, spike_std=None).train()
    model[1].surrogate_function = sbnn_sj.surrogate_function("iwst(0.5)", std=None)
    x = torch.rand(4, 2, 6)

    def run():
        functional.reset_net(model)
        out = model(x) if step_mode == "m" else torch.stack([model(xt) for xt in x])
        out.sum().backward()

    with pytest.raises(ValueError, match=r"not linked to its neuron.*link_neuron\(node\)"):
        run()
    sbnn_sj.link_neuron(model[1])
    model.zero_grad()
    run()
    assert model[0].std_rho.grad is not None and model[0].std_rho.grad.abs().sum() > 0


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_trained_plif_model_deep_copies_and_exports(step_mode):
    """After a training forward and backward, a converted ParametricLIFNode model (whose
    spike function used the learned decay, a tensor with a graph) deep-copies and
    exports: the per-call state is dropped after each neuron call."""
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(6, 5, step_mode=step_mode),
                        neuron.ParametricLIFNode(step_mode=step_mode))
    model = sbnn_sj.to_sbnn(net)
    x = torch.rand(4, 3, 6)
    out = model(x) if step_mode == "m" else torch.stack([model(x[t]) for t in range(4)])
    out.sum().backward()
    functional.reset_net(model)
    best = copy.deepcopy(model)
    plain = sbnn_sj.to_spikingjelly(model)
    with sbnn_addons.mode(best, "mean"):
        want = run_sequence(best, x, step_mode)
    torch.testing.assert_close(run_sequence(plain, x, step_mode), want)


def test_exported_affine_batchnorm_fine_tunes():
    """A batchnorm="affine" model exports to a BatchNorm equal to the affine in eval mode
    that also runs (and learns) in training mode."""
    torch.manual_seed(0)
    net = nn.Sequential(layer.Conv2d(2, 4, 3, step_mode="m"), layer.BatchNorm2d(4, step_mode="m"),
                        neuron.LIFNode(step_mode="m"))
    model = sbnn_sj.to_sbnn(net, batchnorm="affine")
    plain = sbnn_sj.to_spikingjelly(model).eval()
    x = torch.rand(3, 2, 2, 6, 6) * 3
    with sbnn_addons.mode(model, "mean"):
        want = run_sequence(model, x, "m")
    assert torch.equal(run_sequence(plain, x, "m"), want)
    plain.train()
    run_sequence(plain, x, "m").sum().backward()
    assert plain[1].weight.grad is not None


def test_export_after_pickle_refuses_to_replace_a_lost_surrogate():
    """A surrogate that does not pickle (a class defined in a function) is lost by
    `torch.save` of the converted model: the export names `surrogate_function=` instead
    of returning a Sigmoid model silently."""

    class LocalSigmoid(surrogate.Sigmoid):
        pass

    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(6, 3), neuron.LIFNode(surrogate_function=LocalSigmoid()))
    model = sbnn_sj.to_sbnn(net)
    assert type(sbnn_sj.to_spikingjelly(model)[1].surrogate_function) is LocalSigmoid
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    with pytest.raises(ValueError, match="surrogate_function="):
        sbnn_sj.to_spikingjelly(again)
    plain = sbnn_sj.to_spikingjelly(again, surrogate_function=surrogate.ATan())
    assert type(plain[1].surrogate_function) is surrogate.ATan


def test_affine_model_loads_a_host_checkpoint_folded():
    """A host checkpoint loaded into a `batchnorm="affine"` model folds the BatchNorm's
    running statistics (eps included) into the affine: mean mode equals the host."""
    trained = _net()
    with torch.no_grad():
        trained[1].running_mean.normal_()
        trained[1].running_var.uniform_(0.05, 0.5)
        trained[1].eps = 1e-3
    fresh = _net()
    fresh[1].eps = 1e-3
    model = sbnn_sj.to_sbnn(fresh, batchnorm="affine")
    with pytest.warns(UserWarning, match="before converting"):  # the stds stay as they were
        result = model.load_state_dict(trained.state_dict(), strict=False)
    assert not result.unexpected_keys
    with torch.no_grad():
        want = run_sequence(trained, X, "m")
        with sbnn_addons.mode(model, "mean"):
            torch.testing.assert_close(run_sequence(model, X, "m"), want)


def test_keep_checkpoint_loaded_into_an_affine_model_warns():
    """A checkpoint of a converted model that kept its BatchNorm (``batchnorm="keep"``,
    which scales the noise by ``gamma / sqrt(var + eps)`` per channel) loaded into a
    ``batchnorm="affine"`` model (mean-only affine) changes every channel's noise by
    ``1 / |scale|`` (in a probe, channels with noise 0.022 and 0.014 got 0.021 each), with
    "All keys matched". The load warns, once; a host checkpoint and an affine model's own
    do not give that warning."""
    import warnings

    trained = _net()
    with torch.no_grad():
        trained[1].running_var.uniform_(0.05, 0.5)
    keep = sbnn_sj.to_sbnn(trained, std_mode="channel")
    model = sbnn_sj.to_sbnn(_net(), std_mode="channel", batchnorm="affine")
    with pytest.warns(UserWarning, match="batchnorm='keep'") as record:
        model.load_state_dict(keep.state_dict())
    assert len([w for w in record if "BatchNorm entries" in str(w.message)]) == 1
    assert record[0].filename == __file__
    own = sbnn_sj.to_sbnn(trained, std_mode="channel", batchnorm="affine").state_dict()
    for state, strict in ((own, True), (trained.state_dict(), False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.load_state_dict(state, strict=strict)
        assert not [w for w in caught if "BatchNorm entries" in str(w.message)]


@pytest.mark.parametrize("sm", ["s", "m"])
def test_layer_conv1d_converts_and_exports(sm):
    """SpikingJelly's ``layer.Conv1d`` (an audio / event-channel net) becomes a Bayesian
    layer like ``layer.Conv2d``: ``mean`` mode equals the original, the posterior std
    trains, and the export is a ``layer.Conv1d`` again."""
    torch.manual_seed(0)
    net = nn.Sequential(layer.Conv1d(2, 4, 3, padding=1, step_mode=sm),
                        neuron.LIFNode(step_mode=sm), layer.Flatten(step_mode=sm),
                        layer.Linear(4 * 8, 3, step_mode=sm), neuron.LIFNode(step_mode=sm))
    with torch.no_grad():
        net[0].weight.mul_(4)
    x = torch.rand(4, 5, 2, 8)
    model = sbnn_sj.to_sbnn(net)
    assert type(model[0]) is sbnn_sj.BayesConv1d and model[0].step_mode == sm
    with torch.no_grad():
        ref = run_sequence(net, x, sm)
        with sbnn_addons.mode(model, "mean"):
            assert torch.equal(run_sequence(model, x, sm), ref)
    run_sequence(model, x, sm).sum().backward()
    assert model[0].std_rho.grad is not None and model[0].std_rho.grad != 0
    plain = sbnn_sj.to_spikingjelly(model)
    assert type(plain[0]) is layer.Conv1d and plain[0].step_mode == sm
    with torch.no_grad():
        assert torch.equal(run_sequence(plain, x, sm), ref)


def test_batchnorm_affine_respects_include_exclude_and_needs_running_statistics():
    """`batchnorm="affine"` replaces only the BatchNorms the selection converts (not an
    excluded one, nor, with `include`, one after a layer left out), folds only those; a
    BatchNorm without running statistics gives a named error before anything changes."""
    net = _net()
    with torch.no_grad():
        net[1].running_var.fill_(0.01)
    plain = sbnn_sj.to_sbnn(net, batchnorm="keep")
    folded = sbnn_sj.to_sbnn(net, batchnorm="affine")
    assert isinstance(folded[1], sbnn_sj.ChannelAffine)
    assert float(folded[0].std.detach()) > 5 * float(plain[0].std.detach())
    for kw in (dict(exclude="1"), dict(include="4")):
        model = sbnn_sj.to_sbnn(net, batchnorm="affine", **kw)
        assert isinstance(model[1], layer.BatchNorm2d), kw
        if "exclude" in kw:
            torch.testing.assert_close(model[0].std, plain[0].std)
    net[1] = layer.BatchNorm2d(4, track_running_stats=False, step_mode="m")
    with pytest.raises(ValueError, match=r"BatchNorm '1'.*track_running_stats=False"):
        sbnn_sj.to_sbnn(net, batchnorm="affine", inplace=True)
    assert not any(sbnn_addons.layers.is_bayesian(m) for m in net.modules())
    sbnn_sj.to_sbnn(net, batchnorm="affine", exclude="1")


@pytest.mark.parametrize("make", [
    lambda: layer.ThresholdDependentBatchNorm2d(alpha=1.0, v_th=1.0, num_features=4),
    lambda: layer.TemporalEffectiveBatchNorm2d(T=3, num_features=4),
    lambda: layer.SeqToANNContainer(nn.SyncBatchNorm(4)),
])
def test_batchnorm_affine_names_the_batchnorms_it_leaves_as_they_are(make):
    """`batchnorm="affine"` replaces BatchNorm1d/2d only: another BatchNorm (SpikingJelly's
    tdBN and TEBN, torch's SyncBatchNorm) stayed as it was, normalising by batch statistics
    in training mode as with "keep", without a word. The conversion warns, naming it; an
    exclude of it is knowing, and silent."""
    net = nn.Sequential(layer.Conv2d(2, 4, 3, padding=1, step_mode="m"), make(),
                        neuron.IFNode(step_mode="m"))
    bn = "1.0" if isinstance(net[1], layer.SeqToANNContainer) else "1"
    kind = type(dict(net.named_modules())[bn]).__name__
    with pytest.warns(UserWarning, match=rf"batchnorm='affine'.*'{bn}' \({kind}\).*exclude="):
        model = sbnn_sj.to_sbnn(net, batchnorm="affine")
    assert type(dict(model.named_modules())[bn]).__name__ == kind
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sbnn_sj.to_sbnn(net, batchnorm="affine", exclude=bn)
        sbnn_sj.to_sbnn(net)  # "keep": nothing to say


@pytest.mark.parametrize("missing", ["bntt_bias", "weight", "bias"])
def test_batchnorm_affine_folds_a_batchnorm_without_weight_or_bias(missing):
    """A BatchNorm whose weight or bias is None (SpikingJelly's BatchNormThroughTime2d
    removes the bias of its per-step BatchNorms) folds into a ChannelAffine with weight 1 /
    bias 0 (it raised a TypeError half-way through an inplace conversion): the converted
    model in mean mode equals the original in eval mode, and the missing parameter is not
    learned."""
    torch.manual_seed(0)
    steps = X.shape[0]
    bn = (layer.BatchNormThroughTime2d(steps, 4, step_mode="m") if missing == "bntt_bias"
          else layer.BatchNorm2d(4, step_mode="m"))
    if missing != "bntt_bias":
        setattr(bn, missing, None)
    net = nn.Sequential(layer.Conv2d(2, 4, 3, padding=1, step_mode="m"), bn,
                        neuron.IFNode(step_mode="m"))
    with torch.no_grad():
        for m in bn.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                for p in m.parameters():
                    p.uniform_(0.5, 1.5)
    net.eval()
    functional.reset_net(net)
    with torch.no_grad():
        want = net[:2](X)
    sbnn_sj.to_sbnn(net, batchnorm="affine", inplace=True)
    affines = [m for m in net.modules() if isinstance(m, sbnn_addons.ChannelAffine)]
    assert len(affines) == (steps if missing == "bntt_bias" else 1)
    attr = "weight" if missing == "weight" else "bias"
    assert all(not getattr(a, attr).requires_grad for a in affines)
    functional.reset_net(net)
    with sbnn_addons.mode(net, "mean"), torch.no_grad():
        got = net[:2](X)
    torch.testing.assert_close(sbnn_addons.moments.plain(got), want, rtol=1e-5, atol=1e-5)


def test_frozen_and_tied_parameters_survive_conversion_and_export():
    """Frozen parameters stay frozen and tied weights stay one parameter, through to_sbnn
    (both BatchNorm modes) and to_spikingjelly."""
    net = _net()
    net[4].weight.requires_grad_(False)
    net[1].requires_grad_(False)
    tied = nn.Sequential(layer.Linear(5, 5, step_mode="m"), neuron.IFNode(step_mode="m"),
                         layer.Linear(5, 5, step_mode="m"), neuron.IFNode(step_mode="m"))
    tied[2].weight = tied[0].weight
    for batchnorm in ("keep", "affine"):
        model = sbnn_sj.to_sbnn(net, batchnorm=batchnorm)
        assert not model[4].weight.requires_grad and model[4].bias.requires_grad
        assert not any(p.requires_grad for p in model[1].parameters())
        back = sbnn_sj.to_spikingjelly(model)
        assert not back[4].weight.requires_grad and back[4].bias.requires_grad
        assert not any(p.requires_grad for p in back[1].parameters())
    model = sbnn_sj.to_sbnn(tied)
    assert model[2].weight is model[0].weight
    back = sbnn_sj.to_spikingjelly(model)
    assert back[2].weight is back[0].weight


def test_weight_layers_without_a_bayesian_version_are_named():
    """SpikingJelly's layer.Conv3d (no Bayesian version) stays deterministic with a
    warning naming it; excluded, silently."""
    import warnings

    net = nn.Sequential(layer.Conv3d(1, 2, 3, step_mode="m"), layer.Flatten(step_mode="m"),
                        layer.Linear(2, 3, step_mode="m"), neuron.LIFNode(step_mode="m"))
    with pytest.warns(UserWarning, match=r"'0' \(Conv3d\)"):
        sbnn_sj.to_sbnn(net)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sbnn_sj.to_sbnn(net, exclude="0")


def test_reset_parameters_of_a_converted_layer_sizes_the_std_from_the_new_weights():
    """A converted ``layer.Linear``'s std is 0.1 of its ported weights' RMS;
    ``reset_parameters()`` draws new weights and sizes the std from them (it kept the
    ported weights' std, 10x too large relative to the new ones here), and survives a
    copy of the model."""
    from spikingjelly.activation_based import layer, neuron

    from sbnn_addons.layers import CONVERTED_STD_FRACTION

    torch.manual_seed(0)
    host = nn.Sequential(layer.Linear(16, 8), neuron.LIFNode())
    with torch.no_grad():
        host[0].weight.mul_(10.0)
    model = copy.deepcopy(sbnn_sj.to_sbnn(host))
    model[0].reset_parameters()
    rms = float(model[0].weight.detach().pow(2).mean().sqrt())
    torch.testing.assert_close(float(model[0].std), CONVERTED_STD_FRACTION * rms)


@pytest.mark.parametrize("reparam", ["prune", "weight_norm"])
def test_export_after_a_step_of_a_layer_whose_weight_is_recomputed(reparam):
    """A layer whose ``.weight`` PyTorch recomputes in a forward pre-hook
    (``torch.nn.utils.prune``, the hook-based ``weight_norm``) exported after an optimiser
    step equals the ``mean`` mode: the export read the ``.weight`` of the last forward,
    from before the step."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = sbnn_sj.to_sbnn(_net("m"), spike_std=0.1)
    if reparam == "prune":
        prune.l1_unstructured(model[4], "weight", amount=0.5)
    else:
        torch.nn.utils.weight_norm(model[4])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    run_sequence(model, X, "m").sum().backward()
    opt.step()
    plain = sbnn_sj.to_spikingjelly(model, surrogate.ATan()).eval()
    model.eval()
    with sbnn_addons.mode(model, "mean"), torch.no_grad():
        ref = run_sequence(model, X, "m")
        out = run_sequence(plain, X, "m")
    assert torch.equal(plain[4].weight, model[4].weight)  # both recomputed by the run
    assert torch.equal(out, ref)


def test_the_other_hosts_models_name_the_snntorch_adapter():
    """An snnTorch model given to the SpikingJelly adapter converted its layers and left
    its neurons alone, without a word (the first step then raised about an unconverted
    neuron); an snnTorch-converted model given to ``to_spikingjelly`` raised "cannot
    export IWSTSpike". Both now name the adapter to use, before anything changes."""
    import snntorch as snn

    net = nn.Sequential(nn.Linear(8, 6), snn.Leaky(beta=0.9, init_hidden=True),
                        nn.Linear(6, 3), snn.Leaky(beta=0.9, init_hidden=True, output=True))
    with pytest.raises(TypeError, match=r"module '1' \(Leaky\) is an snnTorch neuron.*"
                                        r"sbnn_addons\.snntorch\.to_sbnn"):
        sbnn_sj.to_sbnn(net, inplace=True)
    assert type(net[0]) is nn.Linear  # left as it was
    from sbnn_addons.snntorch import to_sbnn as snn_to_sbnn

    with pytest.raises(TypeError, match=r"snnTorch.*sbnn_addons\.snntorch\.to_snntorch"):
        sbnn_sj.to_spikingjelly(snn_to_sbnn(net))


def test_affine_batchnorm_of_an_untrained_model_warns():
    """``batchnorm="affine"`` on a BatchNorm that never ran in training mode folds the
    initial statistics (mean 0, var 1): the converted network does not normalise. It
    warns, naming ``batchnorm='keep'``."""
    import warnings

    host = nn.Sequential(layer.Conv2d(2, 4, 3), layer.BatchNorm2d(4), neuron.LIFNode())
    with pytest.warns(UserWarning, match=r"BatchNorm '1'.*never.*batchnorm='keep'"):
        sbnn_sj.to_sbnn(host, batchnorm="affine")
    net = _net()
    with torch.no_grad():
        net[1].running_var.uniform_(0.5, 2.0)  # statistics (set by hand, or loaded)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sbnn_sj.to_sbnn(net, batchnorm="affine")


def test_export_then_convert_again_needs_the_state_dict_for_the_noise_scales(sbnn):
    """``to_sbnn(to_spikingjelly(model))`` has new noise scales, not the learned ones
    (the export holds the means only; documented); the SBNN's state dict restores them."""
    ref = _sample(sbnn)
    again = sbnn_sj.to_sbnn(sbnn_sj.to_spikingjelly(sbnn), spike_std=0.1).eval()
    assert not all(torch.equal(p, q) for (n, p), (_, q) in
                   zip(sbnn.named_parameters(), again.named_parameters()) if "std_rho" in n)
    again.load_state_dict(sbnn.state_dict())
    assert torch.equal(_sample(again), ref)


def test_converted_checkpoint_in_the_host_model(sbnn):
    """A converted model's state dict in the host model (Training page): strict raises on
    the noise scales; ``strict=False`` loads the means, and the host model (its BatchNorm
    kept) runs the mean mode exactly."""
    host = _net()
    with pytest.raises(RuntimeError, match="Unexpected key.*std_rho"):
        host.load_state_dict(sbnn.state_dict())
    result = host.load_state_dict(sbnn.state_dict(), strict=False)
    assert not result.missing_keys
    assert all(k.endswith("std_rho") for k in result.unexpected_keys)
    with sbnn_addons.mode(sbnn, "mean"), torch.no_grad():
        ref = run_sequence(sbnn, X, "m")
    with torch.no_grad():
        assert torch.equal(run_sequence(host.eval(), X, "m"), ref)
    assert ref.sum() > 0


def test_export_of_a_model_that_was_never_converted_is_named():
    """``to_spikingjelly(net)`` with the original host model instead of the converted one
    (``sbnn = to_sbnn(net)`` trained, ``net`` exported by mistake) returned a copy of the
    untrained original without a word. It raises now, naming the fix; the converted
    model exports as before."""
    net = nn.Sequential(layer.Linear(6, 5, step_mode="m"), neuron.LIFNode(step_mode="m"))
    with pytest.raises(ValueError, match=r"no Bayesian layer or SBNN spike function.*to_sbnn"):
        sbnn_sj.to_spikingjelly(net)
    with pytest.raises(ValueError, match="no Bayesian layer"):
        sbnn_sj.to_spikingjelly(net, surrogate.ATan())
    back = sbnn_sj.to_spikingjelly(sbnn_sj.to_sbnn(net))
    assert type(back[0]) is layer.Linear and type(back[1].surrogate_function) is surrogate.Sigmoid
