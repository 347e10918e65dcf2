"""Parity of the reference networks with the released recurrences (the Method page's
"released configuration", Method page, section 8), written out here as plain PyTorch loops.

The loops below share no code with the library: they read the library network's
parameter values, draw the same standard-normal noise (one private generator per spiking
layer, one draw of the layer's shape per time step, as the library's PyTorch path does
after :func:`sbnn_addons.seed_spikes`) and implement the ST estimator independently as
``h = hard + Phi(z) - Phi(z).detach()``, whose Jacobian is ``phi(z) / sigma`` in the mean and
``-z phi(z) / sigma`` in ``sigma``. Spikes must agree exactly; membranes, sigma, the
auxiliary loss and every gradient to float tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import sbnn_addons as sb
from sbnn_addons import kernels
from sbnn_addons.losses import aux_loss, enable_aux_loss
from sbnn_addons.models import dvs_resnet19, paper_recipe, shd_recurrent
from sbnn_addons.spike import spike_seed

F64 = torch.float64
BETA = math.exp(-1.0 / math.log1p(math.exp(10.0)))  # exp(-1 / softplus(10))
SEED = 1234


def softplus(x: torch.Tensor) -> torch.Tensor:
    return torch.log1p(torch.exp(x))


def st_spike(drive: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Released ST spike: forward 1[drive + sigma eps > 0], backward of Phi(drive / sigma)."""
    hard = (drive + sigma * eps > 0).to(drive.dtype)
    soft = torch.special.ndtr(drive / sigma)
    return hard + soft - soft.detach()


class Recorder:
    """Spikes, membranes (pre-reset) and sigmas of each layer and step of the loop."""

    def __init__(self) -> None:
        self.spikes: list[torch.Tensor] = []
        self.sigma: list[torch.Tensor] = []
        self.membrane: list[torch.Tensor] = []


# ---------------------------------------------------------------- DVS ResNet-19 loop
def lif_sequence(mean_seq, var_seq, sb2, gen, rec: Recorder, aux: list):
    """LIF over T steps: u, V, sigma = sqrt(V + s_b^2), soft reset, aux z = u/sigma."""
    u = torch.zeros_like(mean_seq[0])
    V = torch.zeros_like(var_seq[0])
    out = []
    for t in range(len(mean_seq)):
        u = BETA * u + mean_seq[t]
        V = BETA**2 * V + var_seq[t]
        sigma = torch.sqrt(V + sb2).expand_as(u)
        eps = torch.randn(u.shape, generator=gen, dtype=u.dtype)
        h = st_spike(u - 1.0, sigma, eps)
        aux.append(((u / sigma) ** 2).sum() / u.shape[0])
        rec.membrane.append(u.detach())
        rec.sigma.append(sigma.detach())
        rec.spikes.append((u - 1.0 + sigma * eps > 0).to(u.dtype))
        u = u - h
        out.append(h)
    return torch.stack(out)


def conv_lif(x_seq, p, name, gen, rec, aux, first, stride=1):
    """``LIF(affine_t(conv(x_t)))``; var_t = s^2 * window-sum of x_t^2 (x detached but first)."""
    w = p[f"{name}.conv.weight"]
    s2 = softplus(p[f"{name}.conv.std_rho"]) ** 2
    gamma, shift = p[f"{name}.norm.weight"], p[f"{name}.norm.bias"]
    sb2 = softplus(p[f"{name}.lif.spike_fn.std_rho"]) ** 2
    ones = torch.ones(1, w.shape[1], 3, 3, dtype=w.dtype)
    means, vars_ = [], []
    for t, x in enumerate(x_seq):
        xv = x if first else x.detach()
        m = F.conv2d(x, w, stride=stride, padding=1)
        means.append(m * gamma[t].view(1, -1, 1, 1) + shift[t].view(1, -1, 1, 1))
        vars_.append(s2 * F.conv2d(xv * xv, ones, stride=stride, padding=1))
    return lif_sequence(means, vars_, sb2, gen, rec, aux)


def shortcut(x_seq, cout, stride):
    x = x_seq.flatten(0, 1)
    if stride > 1:
        x = F.avg_pool2d(x, stride)
    x = F.pad(x, (0, 0, 0, 0, 0, cout - x.shape[1]))
    return x.reshape(x_seq.shape[0], x_seq.shape[1], *x.shape[1:])


def dvs_reference(x, p, widths, blocks, rec, aux):
    gens = iter([torch.Generator().manual_seed(spike_seed(SEED, i))
            for i in range(1 + 2 * 3 * blocks)])
    h = conv_lif(x, p, "stem", next(gens), rec, aux, first=True)
    i = 0
    for stage, cout in enumerate(widths):
        for j in range(blocks):
            stride = 2 if (stage > 0 and j == 0) else 1
            name = f"blocks.{i}"
            h1 = conv_lif(h, p, f"{name}.layer1", next(gens), rec, aux, False, stride)
            h2 = conv_lif(h1, p, f"{name}.layer2", next(gens), rec, aux, False)
            h = h2 + shortcut(h, cout, stride)
            i += 1
    feats = h.mean(dim=(3, 4))  # [T, B, C]
    return (feats @ p["fc.weight"].T + p["fc.bias"]).mean(0)


def _leaf_copies(net):
    return {n: q.detach().clone().requires_grad_(True) for n, q in net.named_parameters()}


def _perturb(net, gen):
    """Move every parameter off its init, so that affines and noise scales matter."""
    with torch.no_grad():
        for name, q in net.named_parameters():
            if name.endswith("std_rho"):
                q.add_(0.3 * torch.randn(q.shape, generator=gen, dtype=q.dtype))
            elif q.dim() == 2 and "norm" in name:
                q.add_(0.2 * torch.randn(q.shape, generator=gen, dtype=q.dtype))
            else:
                q.mul_(1.5 + 0.2 * torch.randn(q.shape, generator=gen, dtype=q.dtype))


def _library_trace(net):
    """Record the library's spikes, pre-reset membranes and sigmas through the same loop."""
    rec = Recorder()
    originals = []
    for m in net.modules():
        if isinstance(m, sb.IWSTSpike):
            fire = m.fire

            def traced(u, variance, fire=fire):
                rec.membrane.append((u + 1.0).detach())
                rec.sigma.append(torch.sqrt(variance).expand_as(u).detach())
                h = fire(u, variance)
                rec.spikes.append(h.detach())
                return h

            m.fire = traced
            originals.append(m)
    return rec


def _assert_traces(lib: Recorder, ref: Recorder):
    assert len(lib.spikes) == len(ref.spikes) > 0
    for a, b in zip(lib.spikes, ref.spikes):
        assert torch.equal(a, b)
    for a, b in zip(lib.membrane, ref.membrane):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(lib.sigma, ref.sigma):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _check_parity(net, x, y, aux_weight, reference):
    """Run the library network (PyTorch path, seeded noise) and ``reference(x, params,
    recorder, aux_terms)`` on copies of its parameters; compare everything."""
    p = _leaf_copies(net)
    lib_rec = _library_trace(net)
    enable_aux_loss(net)
    sb.seed_spikes(net, SEED)
    with kernels.use_kernels(False):
        logits = net(x)
    lib_aux = aux_loss(net, "sum")
    (F.cross_entropy(logits, y) + aux_weight * lib_aux).backward()

    ref_rec, ref_aux = Recorder(), []
    x_ref = x.detach().clone().requires_grad_(True)
    ref_logits = reference(x_ref, p, ref_rec, ref_aux)
    ref_aux = torch.stack(ref_aux).sum()
    (F.cross_entropy(ref_logits, y) + aux_weight * ref_aux).backward()

    _assert_traces(lib_rec, ref_rec)
    assert 0 < sum(float(s.mean()) for s in ref_rec.spikes)  # the check is not vacuous
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lib_aux, ref_aux, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-8, atol=1e-12)
    for name, q in net.named_parameters():
        assert q.grad is not None, name
        torch.testing.assert_close(q.grad, p[name].grad, rtol=1e-8, atol=1e-12,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_dvs_resnet_matches_released_recurrences():
    T, B, widths, blocks = 4, 3, (4, 6, 8), 1
    net = dvs_resnet19(widths=widths, blocks=blocks, num_steps=T).to(F64)
    gen = torch.Generator().manual_seed(0)
    _perturb(net, gen)
    x = (torch.rand(T, B, 2, 12, 12, generator=gen, dtype=F64) * 3).requires_grad_(True)
    _check_parity(net, x, torch.tensor([0, 3, 7]), 1e-3,
                  lambda x, p, rec, aux: dvs_reference(x, p, widths, blocks, rec, aux))


# ---------------------------------------------------------------- SHD recurrent loop
def shd_reference(x, p, hidden, rec, aux):
    h_in = x
    for layer, n in enumerate(hidden):
        gen = torch.Generator().manual_seed(spike_seed(SEED, layer))
        W, R = p[f"ff.{layer}.weight"], p[f"rec.{layer}.weight"]
        M = 1.0 - torch.eye(n, dtype=W.dtype)
        s2 = softplus(p[f"ff.{layer}.std_rho"]) ** 2
        s2r = softplus(p[f"rec.{layer}.std_rho"]) ** 2
        gamma, shift = p[f"norms.{layer}.weight"], p[f"norms.{layer}.bias"]
        sb2 = softplus(p[f"lifs.{layer}.spike_fn.std_rho"]) ** 2
        T, B = h_in.shape[:2]
        h = torch.zeros(B, n, dtype=W.dtype)
        u = torch.zeros(B, n, dtype=W.dtype)
        V = torch.zeros(B, n, dtype=W.dtype)
        out = []
        for t in range(T):
            xt = h_in[t]
            xv = xt if layer == 0 else xt.detach()
            current = (xt @ W.T + h @ (R * M).T) * gamma[t] + shift[t]
            var = s2 * (xv * xv).sum(-1, keepdim=True) + s2r * (h.detach() ** 2).sum(
                -1, keepdim=True)
            z = current / torch.sqrt((var + 2 * sb2).clamp_min(1e-6))
            aux.append((z * z).sum() / B)
            u = BETA * u + current
            V = BETA**2 * V + var
            sigma = torch.sqrt(V + sb2).expand_as(u)
            eps = torch.randn(u.shape, generator=gen, dtype=u.dtype)
            h = st_spike(u - 1.0, sigma, eps)
            rec.membrane.append(u.detach())
            rec.sigma.append(sigma.detach())
            rec.spikes.append((u - 1.0 + sigma * eps > 0).to(u.dtype))
            u = u - h
            out.append(h)
        h_in = torch.stack(out)
    return (h_in @ p["readout.weight"].T).mean(0)


def test_shd_recurrent_matches_released_recurrences():
    T, B, hidden, fin = 6, 4, (7, 5), 9
    net = shd_recurrent(in_features=fin, hidden=hidden, num_classes=3, num_steps=T).to(F64)
    gen = torch.Generator().manual_seed(1)
    _perturb(net, gen)
    with torch.no_grad():  # a non-zero diagonal: masked in the mean only
        for r in net.rec:
            r.weight.add_(torch.eye(r.weight.shape[0], dtype=F64))
    x = (torch.rand(T, B, fin, generator=gen, dtype=F64) * 4).requires_grad_(True)
    _check_parity(net, x, torch.tensor([0, 1, 2, 1]), 1e-2,
                  lambda x, p, rec, aux: shd_reference(x, p, hidden, rec, aux))


@pytest.mark.parametrize("kernels_on", [True, False])
def test_dvs_kernel_path_matches_pytorch_path_in_law(kernels_on):
    """The fused kernel draws another stream; in mean mode both paths are identical."""
    net = dvs_resnet19(widths=(4, 6, 8), blocks=1, num_steps=3)
    x = torch.rand(3, 2, 2, 12, 12) * 3
    with kernels.use_kernels(kernels_on), sb.mode(net, "mean"):
        a = net(x)
    with kernels.use_kernels(False), sb.mode(net, "mean"):
        b = net(x)
    torch.testing.assert_close(a, b)


def test_paper_constants():
    net = dvs_resnet19(num_steps=2, widths=(4, 4, 4), blocks=1)
    assert net.stem.lif.beta == BETA and abs(BETA - 0.9048378) < 1e-7
    assert type(net.fc) is torch.nn.Linear  # deterministic readout
    sb_init = float(softplus(net.stem.lif.spike_fn.std_rho.detach()))
    assert abs(sb_init - math.log1p(math.exp(-1.0))) < 1e-6
    assert net.stem.norm.weight.shape == (2, 4)  # one affine per step and channel
    shd = shd_recurrent(in_features=5, hidden=(3,), num_classes=2, num_steps=2)
    assert shd.readout.bias is None and type(shd.readout) is torch.nn.Linear
    s_b = float(softplus(shd.lifs[0].spike_fn.std_rho.detach()))
    assert abs(s_b - math.log1p(math.exp(-2))) < 1e-6


@pytest.mark.parametrize("task,floor", [("dvs_gesture", 1 / 50), ("shd", 1 / 10)])
def test_paper_recipe_groups_and_epoch_cosine(task, floor):
    if task == "shd":
        net = shd_recurrent(in_features=5, hidden=(3,), num_classes=2, num_steps=2)
        fast = {"norms.0.weight", "norms.0.bias"}
    else:
        net = dvs_resnet19(num_steps=2, widths=(4, 4, 4), blocks=1)
        fast = set()
    opt, sched = paper_recipe(net, task, epochs=4)
    names = {id(q): n for n, q in net.named_parameters()}
    noise = {names[id(q)] for q in opt.param_groups[1]["params"]}
    assert noise == {n for n in names.values() if n.endswith("std_rho")} | fast
    lrs = []
    for _ in range(5):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for e, (lr_w, lr_n) in enumerate(lrs):
        factor = floor + (1 - floor) * (1 + math.cos(math.pi * e / 4)) / 2
        assert lr_w == pytest.approx(5e-3 * factor) and lr_n == pytest.approx(5e-2 * factor)
    assert lrs[-1][0] == pytest.approx(5e-3 * floor)


def test_step_affine_and_shd_options_name_bad_input():
    from sbnn_addons.models import StepAffine

    with pytest.raises(ValueError, match="num_steps"):
        StepAffine(4, 0)
    affine = StepAffine(4, 3)
    with pytest.raises(ValueError, match="4 channels"):
        affine(torch.rand(6, 5, 2, 2))
    with pytest.raises(ValueError, match="T=3"):
        affine(torch.rand(7, 4, 2, 2))
    with pytest.raises(ValueError, match="step 3"):
        affine.step(torch.rand(2, 4), 3)
    with pytest.raises(ValueError, match="aux_form"):
        shd_recurrent(in_features=5, hidden=(3,), num_classes=2, num_steps=2, aux_form="z")
    with pytest.raises(ValueError, match="num_steps=5"):
        dvs_resnet19(widths=(4, 4, 4), blocks=1, num_steps=2)(torch.rand(5, 1, 2, 8, 8))
