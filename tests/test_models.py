"""Reference networks (sbnn_addons.models): layout, variance flow, twins, training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sbnn_addons as sb
from sbnn_addons import get_variance, kernels
from sbnn_addons.models import (
    BinaryResNet,
    DVSResNet,
    SHDRecurrentNet,
    Shortcut,
    StepAffine,
    SurrogateSpike,
    ZeroDiagBayesLinear,
    ZeroDiagLinear,
    cifar_resnet25,
    dvs_resnet19,
    paper_recipe,
    shd_recurrent,
)

T, B = 3, 2
DVS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dvs_gesture_32"


@pytest.fixture
def dvs_data_dir() -> Path:
    """The real DVS128 Gesture frames of ``../shared`` (present in CI)."""
    if not (DVS_DIR / "train.npz").exists():
        pytest.skip(f"real DVS Gesture frames not found at {DVS_DIR}")
    return DVS_DIR


def tiny_dvs(**kw) -> DVSResNet:
    kw = {"width_mult": 0.125, "blocks": 1, "num_steps": T, **kw}
    return dvs_resnet19(**kw)


def tiny_shd(**kw) -> SHDRecurrentNet:
    return shd_recurrent(**{"in_features": 40, "hidden": (16, 12), "num_steps": T, **kw})


def tiny_cifar(**kw) -> BinaryResNet:
    return cifar_resnet25(**{"width_mult": 1 / 16, "blocks": 1, **kw})


def dvs_input(seed=0, t=T, hw=16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(t, B, 2, hw, hw, generator=g) < 0.3).float() * 2


def shd_input(seed=0, t=T) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(t, B, 40, generator=g) < 0.3).float() * 3


def cifar_input(seed=0) -> torch.Tensor:
    return torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------- SurrogateSpike
@pytest.mark.parametrize(
    "kind, grad",
    [
        ("gaussian", lambda u: torch.exp(-0.5 * (u / 0.4) ** 2) / (math.sqrt(2 * math.pi) * 0.4)),
        ("atan", lambda u: 1.0 / (1.0 + (math.pi * u) ** 2)),  # snnTorch atan, alpha = 2
        ("sigmoid", lambda u: 25 * torch.sigmoid(25 * u) * (1 - torch.sigmoid(25 * u))),
    ],
)
def test_surrogate_forward_heaviside_and_gradient(kind, grad):
    u = torch.linspace(-2, 2, 41, dtype=torch.float64, requires_grad=True)
    spike = SurrogateSpike(kind)
    h = spike(u)
    assert torch.equal(h, (u > 0).double())
    h.sum().backward()
    torch.testing.assert_close(u.grad, grad(u.detach()), rtol=1e-12, atol=1e-12)
    assert spike.noise_variance(u) is None
    assert torch.equal(spike.fire(u, torch.ones_like(u)), h)  # variance ignored


def test_surrogate_in_lif_matches_mean_mode_iwst():
    current = torch.rand(5, B, 7, generator=torch.Generator().manual_seed(1)) * 1.5
    twin = sb.LIF(spike_fn=SurrogateSpike()).run(current)
    bayes = sb.LIF(spike_fn=sb.IWSTSpike("st"))
    sb.set_mode(bayes, "mean")
    assert torch.equal(twin, bayes.run(current))
    assert twin.sum() > 0


def test_surrogate_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        SurrogateSpike("relu")
    with pytest.raises(ValueError, match="width"):
        SurrogateSpike(width=0)


# ----------------------------------------------------------------------- layout
def test_default_conv_counts_and_widths():
    dvs, cifar = dvs_resnet19(), cifar_resnet25()
    assert dvs.num_convs() == 19 and cifar.num_convs() == 25
    assert sum(isinstance(m, sb.BayesConv2d) for m in dvs.modules()) == 19
    assert dvs.widths == [32, 64, 128] and cifar.widths == [64, 128, 256, 512]
    assert dvs.fc.out_features == 11 and cifar.fc.out_features == 10
    twin = dvs_resnet19(bayes=False)
    assert twin.num_convs() == 19 and not any(sb.is_bayesian(m) for m in twin.modules())
    assert sum(isinstance(m, StepAffine) for m in dvs.modules()) == 19
    per_channel = dvs_resnet19(affine_per_step=False)
    assert sum(isinstance(m, sb.ChannelAffine) for m in per_channel.modules()) == 19
    assert dvs_resnet19(blocks=(1, 2, 1)).num_convs() == 1 + 2 * 4


def test_shd_layout():
    net = shd_recurrent()
    assert [m.out_features for m in net.ff] == [256, 256]
    assert net.ff[0].in_features == 700 and net.readout.out_features == 20
    assert all(isinstance(r, ZeroDiagBayesLinear) for r in net.rec)
    # bias noise is the spike function's own std, drawn once per spike (not accumulated)
    assert not net.ff[0].bias_noise and not dvs_resnet19().stem.conv.bias_noise
    s_b = net.lifs[0].spike_fn.std.detach()
    assert abs(s_b.item() - math.log1p(math.exp(-2))) < 1e-6
    s_b = dvs_resnet19().stem.lif.spike_fn.std.detach()
    assert abs(s_b.item() - math.log1p(math.exp(-1))) < 1e-6


@pytest.mark.parametrize("bayes", [True, False])
def test_output_shapes(bayes):
    norm = "affine" if bayes else "bn"
    assert tiny_dvs(bayes=bayes, norm=norm)(dvs_input()).shape == (B, 11)
    assert tiny_dvs(bayes=bayes).forward_steps(dvs_input()).shape == (T, B, 11)
    assert tiny_shd(bayes=bayes, norm=norm)(shd_input()).shape == (B, 20)
    assert tiny_cifar(bayes=bayes, norm=norm)(cifar_input()).shape == (B, 10)


def test_shortcut_avgpool_then_zero_pad():
    x = torch.randn(B, 4, 8, 8)
    y = Shortcut(4, 8, stride=2)(x)
    assert y.shape == (B, 8, 4, 4)
    torch.testing.assert_close(y[:, :4], F.avg_pool2d(x, 2))
    assert torch.all(y[:, 4:] == 0)
    assert torch.equal(Shortcut(4, 4)(x), x)
    net = tiny_dvs()
    shapes = {}
    for i, blk in enumerate(net.blocks):
        blk.register_forward_hook(lambda m, a, out, i=i: shapes.__setitem__(i, out.shape))
    net(dvs_input(hw=16))
    w = net.widths
    assert [shapes[i] for i in range(3)] == [
        (T * B, w[0], 16, 16), (T * B, w[1], 8, 8), (T * B, w[2], 4, 4)
    ]
    with pytest.raises(ValueError, match="reduce channels"):
        Shortcut(8, 4)


# ----------------------------------------------------------------------- variance flow
def _capture_lif_inputs(lif):
    """Record the input variance of each step a LIF runs. Its spike function's ``fire``
    is set on the instance (as SpikeMonitor does), so that ``LIF.run`` steps one by one
    instead of running the whole sequence in one fused call (tested against the step loop
    in test_core_neurons.py)."""
    lif.spike_fn.fire = lif.spike_fn.fire
    got = []

    def hook(module, args):
        var = get_variance(args[0])
        got.append(None if var is None else var.expand_as(args[0]).clone())

    return got, lif.register_forward_pre_hook(hook)


@pytest.mark.parametrize("stem_pool", [False, True])
def test_variance_reaching_stem_lif(stem_pool):
    """Input variance of each LIF step = LRT variance of the conv (affine-free), pooled."""
    net = tiny_dvs(stem_pool=stem_pool)
    with torch.no_grad():  # a non-trivial affine must not scale the variance
        net.stem.norm.weight.uniform_(0.5, 3.0)
    x = dvs_input()
    got, handle = _capture_lif_inputs(net.stem.lif)
    with kernels.use_kernels(False):
        net(x)
    handle.remove()
    assert len(got) == T
    for t in range(T):
        expected = net.stem.conv.output_variance(x[t])  # s^2 sum x^2 + s_b^2, [B, C, H, W]
        if stem_pool:  # mean of 4 independent terms: sum(var) / 4^2
            expected = F.avg_pool2d(expected, 2) / 4
        torch.testing.assert_close(got[t], expected, rtol=1e-6, atol=1e-7)
        assert got[t].shape == (B, net.widths[0], *((8, 8) if stem_pool else (16, 16)))


def test_variance_reaching_block_lif_uses_spike_input():
    net = tiny_dvs()
    x = dvs_input()
    stem_out = {}
    net.stem.register_forward_hook(lambda m, a, out: stem_out.update(h=out))
    blk = net.blocks[1]  # stride-2 block, input = spikes + identity of block 0
    block_in = {}
    blk.register_forward_hook(lambda m, a, out: block_in.update(x=a[0]))  # returns None
    got, _ = _capture_lif_inputs(blk.layer1.lif)
    with kernels.use_kernels(False):
        net(x)
    expected = blk.layer1.conv.output_variance(block_in["x"]).reshape(T, B, *got[0].shape[1:])
    for t in range(T):
        torch.testing.assert_close(got[t], expected[t], rtol=1e-6, atol=1e-7)
    assert stem_out["h"].shape[0] == T * B


def test_shd_variance_feedforward_plus_recurrent():
    net = tiny_shd()
    x = shd_input()
    got, _ = _capture_lif_inputs(net.lifs[0])
    spikes = []
    net.lifs[0].register_forward_hook(lambda m, a, out: spikes.append(out[0]))
    net(x)
    assert spikes[0].sum() > 0  # the recurrent term is exercised
    for t in range(T):
        expected = net.ff[0].output_variance(x[t])
        if t > 0:
            expected = expected + net.rec[0].output_variance(spikes[t - 1])
        torch.testing.assert_close(got[t], expected, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------- zero diagonal
@pytest.mark.parametrize("mask_variance", [False, True])
def test_zero_diagonal_recurrent_mean_and_variance(mask_variance):
    """The diagonal is masked in the mean; in the variance only with ``mask_variance``
    (the released network sums the variance over all units, its own spike included)."""
    n = 6
    rec = ZeroDiagBayesLinear(n, std=0.3, mask_variance=mask_variance)
    twin = ZeroDiagLinear(n)
    with torch.no_grad():  # even a non-zero stored diagonal has no effect
        rec.weight.copy_(torch.randn(n, n) + 5 * torch.eye(n))
        twin.weight.copy_(rec.weight)
    eye = torch.eye(n)
    mean = rec(eye)  # row i: input = unit i alone
    var = get_variance(mean).expand_as(mean)
    assert torch.all(mean.diagonal() == 0)
    assert torch.allclose(var.diagonal(), torch.tensor(0.0 if mask_variance else 0.09))
    off = ~torch.eye(n, dtype=torch.bool)
    assert torch.all(mean[off] != 0) and torch.allclose(var[off], torch.tensor(0.09))
    assert torch.all(twin(eye).diagonal() == 0)
    torch.testing.assert_close(rec.output_variance(eye), var)
    # the diagonal gets no gradient, so training keeps it at its initial zero
    fresh = ZeroDiagBayesLinear(n)
    (fresh(torch.rand(4, n)) ** 2).sum().backward()
    assert torch.all(fresh.weight.diagonal() == 0) and torch.all(fresh.weight.grad.diagonal() == 0)


def test_zero_diagonal_layer_exports_its_mask():
    """The KL to a scale-mixture prior (an MC estimate) moves the unused diagonal means of
    the released ``mask_variance=False`` layer off zero; ``to_module()`` exported them into
    a plain ``nn.Linear`` whose self-connections the model never had, silently. The
    exported layer masks the diagonal as the model's ``mean`` mode and the twin do."""
    torch.manual_seed(0)
    rec = ZeroDiagBayesLinear(6, bias=True)
    opt = torch.optim.Adam(rec.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        sb.kl_divergence(rec, sb.scale_mixture_prior()).backward()
        opt.step()
    assert torch.any(rec.weight.diagonal() != 0)  # the premise: the diagonal moved
    plain = rec.to_module()
    x = torch.rand(4, 6)
    with torch.no_grad(), sb.mode(rec, "mean"):
        torch.testing.assert_close(plain(x), rec(x))
    assert isinstance(plain, torch.nn.Linear) and not sb.is_bayesian(plain)
    back = ZeroDiagBayesLinear.from_module(plain, std=0.05)  # and back, the means kept
    assert type(back) is ZeroDiagBayesLinear and float(back.std.detach()) == pytest.approx(0.05)
    with torch.no_grad(), sb.mode(back, "mean"):
        torch.testing.assert_close(back(x), plain(x))


def test_zero_diagonal_layer_from_a_linear_names_what_it_needs():
    """``ZeroDiagBayesLinear.from_module`` (inherited from ``BayesLinear``) passed the
    linear layer's sizes positionally to a constructor that takes one: a ``TypeError``
    about positional arguments. A square ``nn.Linear`` converts, its means kept and its
    diagonal masked; a non-square one is named."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 5)
    rec = ZeroDiagBayesLinear.from_module(lin)
    x = torch.rand(3, 5)
    with torch.no_grad(), sb.mode(rec, "mean"):
        torch.testing.assert_close(
            rec(x), F.linear(x, lin.weight * (1 - torch.eye(5)), lin.bias))
    with pytest.raises(ValueError, match="n -> n.*5 inputs and 4 outputs.*BayesLinear"):
        ZeroDiagBayesLinear.from_module(torch.nn.Linear(5, 4))
    with pytest.raises(TypeError, match="expected an nn.Linear"):
        ZeroDiagBayesLinear.from_module(torch.nn.Conv1d(5, 5, 1))


@pytest.mark.parametrize("std_mode", ["layer", "channel", "weight"])
def test_pruned_zero_diagonal_keeps_its_masked_variance(std_mode):
    """``torch.nn.utils.prune`` on a ``ZeroDiagBayesLinear(mask_variance=True)``: the
    pruned layer's variance path left the diagonal out of the mask, so an all-ones prune
    mask (nothing removed) brought the self-connection noise back (+40 % variance)."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    n = 6
    rec = ZeroDiagBayesLinear(n, mask_variance=True, std_mode=std_mode)
    h = torch.rand(3, n)
    want = get_variance(rec(h)).expand(3, n)
    prune.custom_from_mask(rec, "weight", torch.ones(n, n))
    torch.testing.assert_close(get_variance(rec(h)), want)
    torch.testing.assert_close(rec.output_variance(h), want)
    # a pruned input column removes its noise on top of the diagonal: as if unit 0 were
    # silent in the unpruned layer
    mask = torch.ones(n, n)
    mask[:, 0] = 0
    prune.remove(rec, "weight")
    prune.custom_from_mask(rec, "weight", mask)
    pruned = get_variance(rec(h)).expand(3, n)
    prune.remove(rec, "weight")
    h[:, 0] = 0
    torch.testing.assert_close(pruned, get_variance(rec(h)).expand(3, n))


# ----------------------------------------------------------------------- mean mode / twin
def _perturb_affines(net, seed=0):
    """Random affines and 3x weights, so that every layer of the tiny nets spikes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.mul_(3.0)
        for m in net.modules():
            if isinstance(m, sb.ChannelAffine):
                m.weight.copy_(1.0 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))


@pytest.mark.parametrize(
    "build, data",
    [
        (lambda: tiny_dvs(), dvs_input),
        (lambda: tiny_shd(norm="affine"), shd_input),
        (lambda: tiny_shd(), shd_input),
        (lambda: tiny_shd(readout_noise=True), shd_input),  # its readout has a bias
        (lambda: tiny_cifar(), cifar_input),
    ],
)
def test_mean_mode_deterministic_and_equals_twin(build, data):
    torch.manual_seed(0)
    net = build()
    _perturb_affines(net)
    twin = net.deterministic_twin()
    rates = []
    for m in net.modules():
        if isinstance(m, sb.LIF):
            m.register_forward_hook(lambda mod, a, out: rates.append(out[0].mean().item()))
    assert isinstance(twin, type(net)) and not twin.bayes
    assert not any(sb.is_bayesian(m) for m in twin.modules())
    sb.set_mode(net, "mean")
    x = data()
    with torch.no_grad():
        a, b, c = net(x), net(x), twin(x)
        assert not torch.allclose(a, net(data(1)))  # the output depends on the input
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)
    n_lif = sum(isinstance(m, sb.LIF) for m in net.modules())
    steps = len(rates) // (3 * n_lif)  # three forwards above
    per_layer = torch.tensor(rates[: steps * n_lif]).view(n_lif, steps).mean(1)
    assert torch.all(per_layer > 0), per_layer  # every layer fires: the comparison is not vacuous
    sb.set_mode(net, "sample")
    with torch.no_grad():
        assert not torch.equal(net(x), net(x))  # sample mode is stochastic


@pytest.mark.parametrize("mask_variance", [False, True])
def test_zero_diagonal_kl_leaves_out_a_diagonal_without_noise(mask_variance):
    """The KL of a ``ZeroDiagBayesLinear``: with ``mask_variance`` the diagonal is in
    neither the mean nor the variance, no random variable, and is left out of the KL (it
    counted ``n`` terms ``N(0, s^2)``), as a pruned weight; without it, the diagonal
    carries noise and counts."""
    n = 5
    rec = ZeroDiagBayesLinear(n, std=0.3, mask_variance=mask_variance, dtype=torch.float64)
    q = torch.distributions.Normal(rec.weight.detach(), rec.std.detach().expand(n, n))
    terms = torch.distributions.kl_divergence(q, torch.distributions.Normal(
        torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)))
    keep = ~torch.eye(n, dtype=torch.bool) if mask_variance else torch.ones(n, n, dtype=torch.bool)
    torch.testing.assert_close(rec.kl_divergence(0.5), terms[keep].sum(), rtol=1e-12, atol=0)


def test_twin_of_a_pruned_network_is_pruned_alike():
    """``deterministic_twin()`` of a network pruned with ``torch.nn.utils.prune``: its
    pruned weights' state-dict keys (``weight_orig``, ``weight_mask``) matched nothing in
    the twin, which raised "another layout". The twin is pruned alike (the same
    ``weight_orig`` and masks) and equals the network's mean mode."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    net = tiny_shd()
    _perturb_affines(net)
    prune.l1_unstructured(net.ff[0], "weight", amount=0.5)
    prune.random_unstructured(net.rec[1], "weight", amount=0.3)
    twin = net.deterministic_twin()
    for name in ("ff.0", "rec.1"):
        mine, its = net.get_submodule(name), twin.get_submodule(name)
        assert torch.equal(its.weight_mask, mine.weight_mask)
        assert torch.equal(its.weight_orig, mine.weight_orig)
    x = shd_input()
    with torch.no_grad(), sb.mode(net, "mean"):
        torch.testing.assert_close(twin(x), net(x), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------- training
@pytest.mark.parametrize("bayes", [True, False])
@pytest.mark.parametrize(
    "build, data, task, classes",
    [
        (tiny_dvs, dvs_input, "dvs_gesture", 11),
        (tiny_shd, shd_input, "shd", 20),
        (tiny_cifar, cifar_input, "cifar10", 10),
    ],
)
def test_training_reduces_loss_with_finite_grads(bayes, build, data, task, classes):
    torch.manual_seed(0)
    net = build(bayes=bayes)
    x, y = data(), torch.tensor([1, 3])
    steps = 25
    opt, sched = paper_recipe(net, task, epochs=steps)

    def loss_fn():
        torch.manual_seed(123)
        if bayes:  # the same noise for the before / after comparison
            sb.seed_spikes(net, 7)
        return F.cross_entropy(net(x), y)

    with torch.no_grad():
        before = loss_fn().item()
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        for name, p in net.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), name
        opt.step()
        sched.step()
    if bayes:  # the variance path trains the per-layer noise scales
        rho = [p for n, p in net.named_parameters() if n.endswith("std_rho")]
        assert rho and any(p.grad is not None and p.grad.abs().sum() > 0 for p in rho)
    with torch.no_grad():
        after = loss_fn().item()
    assert math.isfinite(after) and after < before


# ----------------------------------------------------------------------- recipe / errors
def test_paper_recipe_rejects_bad_arguments():
    net = tiny_shd()
    with pytest.raises(ValueError, match="task"):
        paper_recipe(net, "mnist", 10)
    with pytest.raises(ValueError, match="epochs"):
        paper_recipe(net, "shd", 0)
    opt, _ = paper_recipe(net, "shd")
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {"weights": 5e-3, "noise": 5e-2}
    with pytest.raises(ValueError, match="pass task='shd'"):  # another task's groups
        paper_recipe(net, "dvs_gesture")
    with pytest.raises(ValueError, match="pass task='dvs_gesture'"):
        paper_recipe(tiny_dvs(), "shd")



def test_paper_recipe_of_a_frozen_model_raises():
    """A frozen model (requires_grad_(False), e.g. loaded for evaluation and not unfrozen
    before fine-tuning) got an optimiser holding nothing, and trained nothing silently;
    param_groups raises for the same model."""
    net = tiny_shd().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        paper_recipe(net, "shd")
    for p in sb.noise_parameters(net.requires_grad_(True)):
        p.requires_grad_(False)  # the weights alone: trained, as before
    opt, _ = paper_recipe(net, "shd")
    held = [p for g in opt.param_groups for p in g["params"]]
    assert len(held) == sum(p.requires_grad for p in net.parameters()) > 0

def test_input_dtype_other_than_the_parameters_is_named():
    """The preprocessed DVS frames are float16: a float32 network names the conversion
    (PyTorch's own error names neither); autocast passes the check."""
    with pytest.raises(ValueError, match=r"x.to\(torch.float32\)"):
        tiny_dvs()(dvs_input().half())
    with pytest.raises(ValueError, match=r"x.to\(torch.float32\)"):
        tiny_shd()(torch.rand(T, B, 40).double())
    with torch.autocast("cpu", dtype=torch.bfloat16), sb.mode(tiny_dvs(), "mean") as net:
        net(dvs_input().bfloat16())


def test_bad_inputs_raise_value_error_with_expected_shape():
    with pytest.raises(ValueError, match=r"\[T, B, 2, H, W\]"):
        tiny_dvs()(torch.rand(B, 2, 16, 16))
    with pytest.raises(ValueError, match=r"\[T, B, 2, H, W\]"):
        tiny_dvs()(torch.rand(T, B, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\[T=3, B, 2, H, W\]"):
        tiny_dvs(bayes=False, norm="bn")(dvs_input(t=4))
    with pytest.raises(ValueError, match=r"\[T, B, 40\]"):
        tiny_shd()(torch.rand(T, B, 700))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tiny_cifar()(torch.rand(1, B, 3, 16, 16))
    with pytest.raises(ValueError, match="norm='bn'"):
        tiny_dvs(norm="bn")
    with pytest.raises(ValueError, match="norm"):
        tiny_dvs(norm="layer")
    with pytest.raises(ValueError, match="blocks"):
        tiny_dvs(blocks=(1, 1))
    for make in (tiny_dvs, tiny_shd, tiny_cifar):
        for bayes in (True, False):  # the twin too: a bad flag is never ignored
            with pytest.raises(TypeError, match="aux_std_grad"):
                make(bayes=bayes, aux_std_grad=1)


def test_aux_loss_collected_per_lif_and_step():
    net = tiny_dvs()
    sb.enable_aux_loss(net)
    loss = net(dvs_input()).sum()
    aux = sb.aux_loss(net)
    assert aux.ndim == 0 and torch.isfinite(aux) and aux > 0
    (loss + 1e-6 * aux).backward()
    assert torch.isfinite(net.stem.conv.std_rho.grad)


@pytest.mark.parametrize("make", ["dvs", "shd"])
def test_aux_loss_not_collected_in_eval_mode(make):
    """A forward in ``eval()`` mode with gradients on (a validation pass) collects no
    auxiliary terms in either form (SHD's input form included): they would be added to
    the next training step's loss."""
    net, x = (tiny_dvs(), dvs_input()) if make == "dvs" else (tiny_shd(), shd_input())
    sb.enable_aux_loss(net)
    net.eval()
    net(x)
    assert float(sb.aux_loss(net, "sum")) == 0.0
    net.train()
    net(x)
    assert float(sb.aux_loss(net, "sum")) > 0


def test_deep_reference_network_learns_on_real_frames(dvs_data_dir):
    """A few steps of the full-depth ResNet-19 (19 convs, narrow) on real DVS frames lower
    the training loss clearly below ln(11) (the deep network trains without normalisation)."""
    import numpy as np

    torch.manual_seed(0)
    data = np.load(dvs_data_dir / "train.npz")
    labels = data["labels"]
    idx = np.concatenate([np.flatnonzero(labels == c)[:2] for c in range(11)])
    steps_t = 4
    x = torch.from_numpy(data["frames"][idx][:, :: 49 // steps_t][:, :steps_t].astype("float32"))
    x, y = x.transpose(0, 1), torch.from_numpy(labels[idx])
    net = dvs_resnet19(width_mult=0.125, num_steps=steps_t)
    assert net.num_convs() == 19
    opt, _ = paper_recipe(net, "dvs_gesture", epochs=10)

    def eval_loss():
        sb.seed_spikes(net, 7)
        with torch.no_grad():
            return F.cross_entropy(net(x), y).item()

    before = eval_loss()
    sb.seed_spikes(net, None)
    for _ in range(25):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < before - 0.1 and after < math.log(11) - 0.1, (before, after)


@pytest.mark.parametrize("make", ["dvs", "shd"])
def test_aux_std_grad_option_keeps_the_aux_loss_off_the_stds(make):
    """Paper mode (``aux_std_grad=True``): an aux-only loss reaches the noise stds; with
    ``aux_std_grad=False`` (the named option) the same loss value gives the stds no
    gradient and the weights the same gradient (the last layer's, one step: no later aux
    term depends on them). SHD's own input form of the aux loss follows the option too."""
    results = {}
    for std_grad in (True, False):
        torch.manual_seed(0)
        if make == "dvs":
            # centred at the threshold: z != 0 for the (silent) last layer too
            net = tiny_dvs(aux_std_grad=std_grad, num_steps=1, aux_center="threshold")
            x = dvs_input(t=1)
        else:
            # a drive that makes the first layer fire for any seed: the last layer's
            # z is then away from its zero centre
            net, x = tiny_shd(aux_std_grad=std_grad, num_steps=1), 4 * torch.rand(1, B, 40)
        assert all(m.aux_std_grad == std_grad for m in net.modules()
                   if isinstance(m, sb.IWSTSpike))
        sb.enable_aux_loss(net)
        sb.seed_spikes(net, 3)
        net(x)
        aux = sb.aux_loss(net, "sum")
        aux.backward()
        # the last spike function: its bias-noise std reaches no later aux term
        spike = [m for m in net.modules() if isinstance(m, sb.IWSTSpike)][-1]
        weights = [p.grad.clone() for n, p in net.named_parameters()
                   if n.endswith("weight") and p.grad is not None]
        results[std_grad] = (float(aux), weights, spike.std_rho.grad)
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-6)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-4, atol=1e-6)
    assert float(results[True][2].abs().sum()) > 0
    assert results[False][2] is None or float(results[False][2].abs().sum()) == 0.0


def test_spatial_sizes_that_do_not_halve_evenly_and_cifar_steps_are_named():
    """Odd sizes at a halving gave a raw shape error in a shortcut; BinaryResNet with
    num_steps != 1 built but could not be called."""
    net = tiny_dvs()
    d = net.size_divisor
    with pytest.raises(ValueError, match=f"multiples of {d}"):
        net(dvs_input(hw=16 + d // 2))
    with pytest.raises(ValueError, match="T = 1"):
        cifar_resnet25(num_steps=4)


@pytest.mark.parametrize("hidden", [8, (0, 8), ()])
def test_shd_hidden_sizes_are_checked(hidden):
    """hidden=8 gave "'int' object is not iterable", (0, 8) an IndexError."""
    with pytest.raises(ValueError, match="hidden"):
        shd_recurrent(hidden=hidden)


def test_readout_noise_replays_with_the_spike_seed():
    """readout_noise=True draws from the network's seeded stream: mc_predict(seed=)
    replays exactly, whatever the global generator did in between."""
    from sbnn_addons.models import dvs_resnet19

    torch.manual_seed(0)
    x = (torch.rand(3, 2, 2, 16, 16) < 0.3).float()
    m = dvs_resnet19(widths=(4, 8, 8), blocks=1, num_steps=3, readout_noise=True)
    p1 = sb.mc_predict(m, x, 3, seed=0).probs
    torch.rand(7)  # an unrelated use of the global generator
    p2 = sb.mc_predict(m, x, 3, seed=0).probs
    assert torch.equal(p1, p2)
    assert not torch.equal(p1, sb.mc_predict(m, x, 3, seed=1).probs)


@pytest.mark.parametrize("make, x", [
    (tiny_dvs, torch.rand(0, B, 2, 16, 16)),  # per-step norm: it named num_steps=0
    (lambda: tiny_dvs(norm="none"), torch.rand(0, B, 2, 16, 16)),  # a reshape error
    (tiny_shd, torch.rand(0, B, 40)),
    (lambda: tiny_shd(norm="none"), torch.rand(0, B, 40)),  # a torch.stack error
])
def test_an_empty_sequence_is_named(make, x):
    with pytest.raises(ValueError, match=r"T = 0 time steps.*skip empty sequences"):
        make()(x)


@pytest.mark.parametrize("make, x", [
    (tiny_dvs, torch.rand(B, T, 2, 16, 16)),
    (tiny_shd, torch.rand(B, T, 40)),
])
def test_a_batch_first_sequence_is_named(make, x):
    """A batch-first input [B, T, ...] of a network with one norm per step was answered
    with "build it with num_steps=B", a fix that gives a network of the wrong length."""
    with pytest.raises(ValueError, match=r"batch-first .*x\.transpose\(0, 1\)"):
        make()(x)
    with pytest.raises(ValueError, match=rf"build it with num_steps={T + 1}$"):
        make()(torch.rand(T + 1, *x.shape[2:]).unsqueeze(1).expand(-1, B, *x.shape[2:]))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("make, match", [
    (lambda: tiny_shd(num_classes=0), "num_classes must be an integer >= 1"),  # built
    (lambda: tiny_dvs(num_classes=0), "num_classes must be an integer >= 1"),
    (lambda: tiny_shd(in_features=0), "in_features must be an integer >= 1"),
    (lambda: tiny_dvs(widths=()), "widths must be a non-empty sequence"),  # an IndexError
    (lambda: tiny_cifar(widths=(64, 0, 256, 512)), "widths must be"),
])
def test_bad_sizes_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_twin_that_cannot_take_every_parameter_raises():
    """``deterministic_twin(norm="bn")`` of an affine network (its BatchNorms have no
    counterpart) loaded the rest and left the BatchNorms at their initial values,
    silently: not the twin of the docs; it now raises, naming the keys."""
    net = tiny_dvs()
    with pytest.raises(ValueError, match=r"norm='bn'.*stem\.norm\.norms\.0\.weight"):
        net.deterministic_twin(norm="bn")
    twin = net.deterministic_twin(surrogate="atan")  # the same layout: copied whole
    assert torch.equal(twin.fc.weight, net.fc.weight)


def test_paper_recipe_pickles_and_resumes():
    """``torch.save({"model": net, "optimizer": opt, "scheduler": sched})`` failed: the
    scheduler held a local lambda ("Can't pickle local object"). The loaded scheduler
    continues the cosine where it was."""
    import io

    net = tiny_shd()
    opt, sched = paper_recipe(net, "shd", epochs=6)
    for _ in range(2):
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save({"model": net, "optimizer": opt, "scheduler": sched}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    sched.step()
    ck["scheduler"].optimizer.step()
    ck["scheduler"].step()
    assert [g["lr"] for g in ck["optimizer"].param_groups] == [
        g["lr"] for g in opt.param_groups]
    assert ck["scheduler"].optimizer is ck["optimizer"]
