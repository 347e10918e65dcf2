"""Mean-mode equivalence of converted SpikingJelly models with the originals (exact).

With ``std=0, learn_std=False`` and ``mean`` mode every converted model must emit exactly
the same spikes as the original SpikingJelly model over a whole sequence (torch.equal):
the spike function fires at ``u >= 0`` (``at_zero=True``), like SpikingJelly's Heaviside.
"""

from __future__ import annotations

import pytest
import torch
from _sj_helpers import import_zoo, record_spikes, run_sequence
from torch import nn

import sbnn_addons
from sbnn_addons import spikingjelly as sbnn_sj

pytest.importorskip("spikingjelly")
from spikingjelly.activation_based import functional, layer, neuron, surrogate  # noqa: E402

NEURONS = {
    "if": lambda sm: neuron.IFNode(step_mode=sm),
    "lif": lambda sm: neuron.LIFNode(tau=2.0, step_mode=sm),
    "lif_nodecay_soft": lambda sm: neuron.LIFNode(
        tau=3.0, decay_input=False, v_reset=None, step_mode=sm
    ),
    "plif": lambda sm: neuron.ParametricLIFNode(init_tau=2.5, step_mode=sm),
}


def _conv_net(node, sm):
    return nn.Sequential(
        layer.Conv2d(2, 6, 3, padding=1, step_mode=sm),
        layer.BatchNorm2d(6, step_mode=sm),
        node(sm),
        layer.MaxPool2d(2, 2, step_mode=sm),
        layer.Flatten(step_mode=sm),
        layer.Linear(6 * 4 * 4, 10, step_mode=sm),
        node(sm),
    )


def _seq_net(node, sm):
    # plain torch layers inside SeqToANNContainer (multi-step only)
    return nn.Sequential(
        layer.SeqToANNContainer(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6)),
        node("m"),
        layer.SeqToANNContainer(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(6 * 4 * 4, 10)),
        node("m"),
    )


def _randomise_bn(net: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 1.0)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)


def _boost(net: nn.Module, gain: float = 3.0) -> None:
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(gain)


def _assert_same_spikes(net, x, sm, batchnorm="affine"):
    net.eval()
    ref_store, hs = record_spikes(net)
    ref = run_sequence(net, x, sm)
    for h in hs:
        h.remove()
    sbnn = sbnn_sj.to_sbnn(net, std=0.0, learn_std=False, spike_std=None, batchnorm=batchnorm)
    sbnn.eval()
    store, hs = record_spikes(sbnn)
    with sbnn_addons.mode(sbnn, "mean"):
        out = run_sequence(sbnn, x, sm)
    assert torch.equal(ref, out)
    assert len(store) == len(ref_store) > 0
    for a, b in zip(ref_store, store):
        assert torch.equal(a, b)
    total = torch.stack([s.sum() for s in ref_store]).sum()
    assert total > 0, "no spikes at all: the comparison would be vacuous"
    return ref_store


@pytest.mark.parametrize("sm", ["s", "m"])
@pytest.mark.parametrize("kind", list(NEURONS))
def test_wrapper_layers_exact(kind, sm):
    torch.manual_seed(0)
    net = _conv_net(NEURONS[kind], sm)
    _randomise_bn(net)
    _boost(net)
    x = (torch.rand(6, 3, 2, 8, 8) < 0.4).float()
    spikes = _assert_same_spikes(net, x, sm)
    # the first layer's neurons are really active (non-trivial)
    rate = torch.stack([s.float().mean() for s in spikes if s.shape[-1] == 8]).mean()
    assert 0 < rate < 1


@pytest.mark.parametrize("kind", list(NEURONS))
def test_seq_to_ann_container_exact(kind):
    torch.manual_seed(1)
    net = _seq_net(NEURONS[kind], "m")
    _randomise_bn(net)
    _boost(net)
    x = (torch.rand(6, 3, 2, 8, 8) < 0.4).float()
    _assert_same_spikes(net, x, "m")


@pytest.mark.parametrize("batchnorm", ["keep", "affine"])
def test_batchnorm_modes_exact_in_eval(batchnorm):
    torch.manual_seed(2)
    net = _conv_net(NEURONS["lif"], "m")
    _randomise_bn(net)
    _boost(net)
    x = (torch.rand(5, 2, 2, 8, 8) < 0.4).float()
    _assert_same_spikes(net, x, "m", batchnorm=batchnorm)


def test_keep_batchnorm_exact_in_train_mode():
    """With batchnorm='keep' the means are unchanged even with batch statistics."""
    torch.manual_seed(4)
    net = _conv_net(NEURONS["lif"], "m")
    _boost(net)
    x = (torch.rand(5, 4, 2, 8, 8) < 0.4).float()
    sbnn = sbnn_sj.to_sbnn(net, std=0.0, learn_std=False, spike_std=None, batchnorm="keep")
    net.train()
    sbnn.train()
    ref = run_sequence(net, x, "m")
    with sbnn_addons.mode(sbnn, "mean"):
        out = run_sequence(sbnn, x, "m")
    assert torch.equal(ref, out)


def test_dvs_gesture_net_exact():
    from spikingjelly.activation_based.model import parametric_lif_net

    torch.manual_seed(0)
    net = parametric_lif_net.DVSGestureNet(
        channels=4, spiking_neuron=neuron.ParametricLIFNode,
        surrogate_function=surrogate.ATan(), detach_reset=True,
    )
    functional.set_step_mode(net, "m")
    _randomise_bn(net)
    _boost(net, 4.0)
    x = (torch.rand(2, 1, 2, 128, 128) < 0.3).float()
    _assert_same_spikes(net, x, "m")


@pytest.mark.parametrize("arch", ["sew_resnet18", "spiking_resnet18"])
def test_resnet_zoo_exact(arch):
    sew_resnet, spiking_resnet = import_zoo("sew_resnet"), import_zoo("spiking_resnet")

    torch.manual_seed(0)
    kw = dict(spiking_neuron=neuron.IFNode, surrogate_function=surrogate.ATan(),
              detach_reset=True, num_classes=10)
    if arch == "sew_resnet18":
        net = sew_resnet.sew_resnet18(cnf="ADD", **kw)
    else:
        net = spiking_resnet.spiking_resnet18(**kw)
    functional.set_step_mode(net, "m")
    _randomise_bn(net)
    x = torch.rand(2, 1, 3, 16, 16) * 4
    for bn in ("keep", "affine"):
        _assert_same_spikes(net, x, "m", batchnorm=bn)


def _zoo(arch: str) -> nn.Module:
    """A SpingJelly model-zoo network at about the smallest size its constructor allows
    (T = 2, 16 x 16 images, 16 embedding dimensions, one block per stage)."""
    kw = dict(T=2, num_classes=5)
    if arch in ("ms_resnet", "max_resnet"):
        ms = import_zoo("ms_resnet")
        cls = ms.MSResNet if arch == "ms_resnet" else ms.MaxResNet
        return cls(layers=(1, 1, 1), base_channels=4, stem_kernel_size=3, stem_stride=1, **kw)
    if arch == "spikformer":
        return import_zoo("spikformer").Spikformer(
            img_size_h=16, img_size_w=16, patch_size=4, embed_dims=16, num_heads=2,
            mlp_ratio=1.0, depths=1, **kw)
    if arch.startswith("qkformer"):
        return import_zoo("qkformer").QKFormer(
            embed_dims=16, num_heads=(1, 2, 2), depths=(1, 1, 1), mlp_ratio=1.0,
            qka_type=arch.split("_")[1], **kw)
    if arch == "sdt":
        return import_zoo("spike_driven_transformer").SpikeDrivenTransformer(
            embed_dims=16, num_heads=2, depths=1, mlp_ratio=1.0, **kw)
    if arch.startswith("maxformer"):
        return import_zoo("maxformer").MaxFormer(
            embed_dims=16, depths=(1, 1, 1), mlp_ratio=1.0, cifar=arch.endswith("cifar"), **kw)
    if arch.startswith("vgg"):  # the zoo's features and forward; its 120M-weight
        # classifier (512*7*7 -> 4096 -> 4096) rebuilt with the same layers, narrower
        net = import_zoo("spiking_vgg").SpikingVGG(
            cfg=[4, "M", 8], batch_norm=arch == "vgg_bn", num_classes=5,
            spiking_neuron=neuron.LIFNode, surrogate_function=surrogate.ATan(),
            detach_reset=True)
        net.classifier = nn.Sequential(
            layer.Linear(8 * 7 * 7, 16), neuron.LIFNode(surrogate_function=surrogate.ATan()),
            layer.Dropout(), layer.Linear(16, 5))
        functional.set_step_mode(net, "m")
        return net
    raise ValueError(arch)


_ZOO = ["ms_resnet", "max_resnet", "spikformer", "qkformer_token", "qkformer_channel",
        "sdt", "maxformer", "maxformer_cifar", "vgg", "vgg_bn"]


@pytest.mark.parametrize("arch", _ZOO)
def test_more_zoo_exact(arch):
    """MS-/Max-ResNet (membrane shortcut), the spiking transformers (products of spike
    tensors, BatchNorm1d in SeqToANNContainer, residual sums, reshapes) and the VGG, in
    both BatchNorm modes: the same spikes and output as the original, bitwise."""
    torch.manual_seed(0)
    net = _zoo(arch)
    _randomise_bn(net)
    _boost(net, 5.0)
    with torch.no_grad():
        for m in net.modules():
            if type(m) is nn.Conv1d:  # (not in _boost) the transformers' 1x1 projections
                m.weight.mul_(5.0)
    x = torch.rand(2, 2, 3, 16, 16) * 4
    for bn in ("keep", "affine"):
        _assert_same_spikes(net, x, "m", batchnorm=bn)


@pytest.mark.parametrize("arch", ["spikformer", "qkformer_token", "qkformer_channel"])
def test_zoo_spike_products_train_predict_export(arch):
    """Spikformer's and QKFormer's attention multiply spike tensors, which carry no
    variance: they convert with the defaults (the variance-flow check included), train
    in sample mode (every weight std but the readout's gets a gradient), predict with
    mc_predict, and export back to the original's structure and weights."""
    torch.manual_seed(0)
    net = _zoo(arch)
    _boost(net, 5.0)
    x = torch.rand(2, 2, 3, 16, 16) * 4
    sbnn = sbnn_sj.to_sbnn(net, exclude="head", example_input=x)
    opt = torch.optim.SGD(sbnn_addons.param_groups(sbnn, lr=1e-3))
    logits = (lambda m, x: m(x).mean(0)) if arch == "spikformer" else (lambda m, x: m(x))
    fed = {}  # Bayesian layer -> whether its input had a nonzero element (else no noise)
    for name, m in sbnn.named_modules():
        if sbnn_addons.layers.is_bayesian(m):
            m.register_forward_pre_hook(
                lambda m, args, name=name: fed.__setitem__(name, bool(args[0].any())))
    for _ in range(2):  # (Spikformer's head returns [T, N, C])
        functional.reset_net(sbnn)
        loss = nn.functional.cross_entropy(logits(sbnn, x), torch.tensor([0, 1]))
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(loss)
        stds = {n[: -len(".std_rho")]: p.grad for n, p in sbnn.named_parameters()
                if n.endswith("std_rho")}
        assert len(stds) > 10 and sum(fed.values()) >= 8
        # the weight stds of the layers fed a nonzero input (a spike function's std can get
        # no gradient where nothing downstream passes one back: in this tiny random
        # network that depends on the float sums, i.e. on the thread count)
        zero = [n for n, g in stds.items()
                if fed.get(n, False) and (g is None or not g.abs().sum() > 0)]
        assert not zero
        opt.step()
    sbnn.eval()
    pred = sbnn_addons.mc_predict(sbnn, x, num_samples=3, seed=0, forward=logits)
    assert pred.probs.shape == (2, 5) and torch.isfinite(pred.probs).all()
    plain = sbnn_sj.to_spikingjelly(sbnn)
    names = [(n, type(m)) for n, m in net.named_modules(remove_duplicate=False)]
    assert [(n, type(m)) for n, m in plain.named_modules(remove_duplicate=False)] == names
    means = {n: p for n, p in sbnn.state_dict().items() if n in net.state_dict()}
    assert plain.state_dict().keys() == net.state_dict().keys()
    assert all(torch.equal(plain.state_dict()[n], means[n]) for n in means)


@pytest.mark.parametrize("arch, exclude", [
    ("sdt", ["patch_embed.final_stage.0"]),
    ("maxformer", ["patch_embed3.conv2", "patch_embed3.shortcut.0"]),
    ("maxformer_cifar", ["patch_embed3.shortcut.0"]),
])
def test_zoo_documented_excludes(arch, exclude):
    """The zoo models that need part of the network deterministic (port tutorial, "What
    is not supported"): without it the conversion's check raises, naming a layer to
    exclude; with the tutorial's exclude= they run in sample mode."""
    torch.manual_seed(0)
    net = _zoo(arch)
    x = torch.rand(2, 2, 3, 16, 16) * 4
    with pytest.raises(sbnn_addons.moments.VarianceFlowError, match=repr(exclude[0])):
        sbnn_sj.to_sbnn(net, example_input=x)
    sbnn = sbnn_sj.to_sbnn(net, exclude=exclude + ["head"], example_input=x)
    functional.reset_net(sbnn)
    out = sbnn(x)
    out.sum().backward()
    assert out.shape == (2, 5) and torch.isfinite(out).all()
