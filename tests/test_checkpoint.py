"""Activation checkpointing of stochastic regions (sbnn_addons.checkpoint)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sbnn_addons as sb
from sbnn_addons import kernels
from sbnn_addons.models import dvs_resnet19


def _grads(checkpoint: bool, private_seed: bool, fused: bool):
    torch.manual_seed(0)
    model = dvs_resnet19(widths=(4, 8), blocks=1, num_steps=3, estimator="agr",
                         checkpoint=checkpoint)
    sb.enable_aux_loss(model)
    if private_seed:
        sb.seed_spikes(model, 11)
    x = torch.bernoulli(torch.full((3, 2, 2, 8, 8), 0.3))
    y = torch.tensor([1, 4])
    torch.manual_seed(5)
    with kernels.use_kernels(fused):
        nll = F.cross_entropy(model(x), y)
        aux = sb.aux_loss(model)
        (nll + 1e-3 * aux).backward()
    return nll.detach(), aux.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("private_seed", [False, True], ids=["global-rng", "seed_spikes"])
@pytest.mark.parametrize("fused", [True, False], ids=["kernel", "pytorch"])
def test_checkpointed_blocks_give_identical_gradients(private_seed, fused):
    """Recomputing the residual blocks in the backward draws the same spikes (global RNG or
    private generators), collects the aux terms once, and gives the same loss, aux loss
    and parameter gradients as the plain forward (exactly)."""
    plain = _grads(False, private_seed, fused)
    ckpt = _grads(True, private_seed, fused)
    assert torch.equal(plain[0], ckpt[0]) and torch.equal(plain[1], ckpt[1])
    assert len(plain[2]) == len(ckpt[2])
    for a, b in zip(plain[2], ckpt[2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(g.abs().sum() > 0 for g in ckpt[2])


def test_checkpoint_leaves_private_generators_where_the_forward_left_them():
    """After a checkpointed step, the next step draws what it would without checkpointing."""
    outs = []
    for ck in (False, True):
        torch.manual_seed(0)
        model = dvs_resnet19(widths=(4,), blocks=1, num_steps=2, checkpoint=ck)
        sb.seed_spikes(model, 3)
        x = torch.bernoulli(torch.full((2, 1, 2, 8, 8), 0.3))
        model(x).sum().backward()
        with torch.no_grad():
            outs.append(model(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_checkpoint_needs_the_module():
    from sbnn_addons.checkpoint import checkpoint

    with pytest.raises(TypeError, match="modules must be the nn.Module"):
        checkpoint(torch.sin, torch.ones(2), modules=None)
