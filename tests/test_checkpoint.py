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
    block = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="fn must be the region to run.*got Tensor"):
        checkpoint(block(torch.ones(2)), modules=block)  # the output in place of the block


def test_checkpoint_refuses_an_snntorch_neuron_with_hidden_state():
    """A converted snnTorch ``Sequential`` block with ``init_hidden=True``: the membrane is
    module state, which the recomputation would take at the end of the sequence (gradients
    up to 4.5x off, silently): named, with the explicit-membrane fix."""
    import snntorch as snn
    from torch import nn

    from sbnn_addons.checkpoint import checkpoint
    from sbnn_addons.snntorch import to_sbnn

    model = to_sbnn(nn.Sequential(nn.Linear(6, 8), snn.Leaky(beta=0.9, init_hidden=True)))
    with pytest.raises(ValueError, match=r"snnTorch neuron '1'.*init_hidden=False"):
        checkpoint(model, torch.rand(5, 6), modules=model)


def _snntorch_loop_grads(wrap, seed_private: bool = False):
    """snnTorch tutorial-5 loop, each first-layer step wrapped by ``wrap`` (activation
    checkpointing of one step: the membrane is its input); loss and gradients."""
    import snntorch as snn
    from torch import nn

    from sbnn_addons.snntorch import to_sbnn

    torch.manual_seed(0)
    fc1, lif1, fc2, lif2 = nn.Linear(16, 32), snn.Leaky(beta=0.9), nn.Linear(32, 4), \
        snn.Leaky(beta=0.9)
    model = to_sbnn(nn.ModuleList([fc1, lif1, fc2, lif2]))
    if seed_private:
        sb.seed_spikes(model, 3)
    x = torch.rand(6, 4, 16) * 2
    torch.manual_seed(1)
    mem1, mem2 = model[1].init_leaky(), model[3].init_leaky()
    out, mem1_rec = 0, []
    for t in range(len(x)):
        spk1, mem1 = wrap(lambda x_t, m: model[1](model[0](x_t), m), x[t], mem1, model)
        spk2, mem2 = model[3](model[2](spk1), mem2)
        out = out + mem2
        mem1_rec.append(mem1)  # snnTorch tutorials' records, combined after the loop
    out = out + torch.stack(mem1_rec).mean(0)[:, :4]
    loss = F.cross_entropy(out, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_checkpointing_a_step_of_a_converted_snntorch_loop_gives_identical_gradients():
    """``torch.utils.checkpoint`` (non-reentrant) around one step of a converted snnTorch
    loop: the recomputation sees the membrane's variance and emitted spike of the
    original step, and the posterior's s^2 is recorded alike, so the loss and every
    gradient equal the plain run's; so does ``sbnn_addons.checkpoint``."""
    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    from sbnn_addons.checkpoint import checkpoint

    plain = _snntorch_loop_grads(lambda fn, x, m, model: fn(x, m))
    for wrap in (lambda fn, x, m, model: torch_checkpoint(fn, x, m, use_reentrant=False),
                 lambda fn, x, m, model: checkpoint(fn, x, m, modules=model)):
        ckpt = _snntorch_loop_grads(wrap)
        assert torch.equal(plain[0], ckpt[0]) and len(plain[1]) == len(ckpt[1]) > 4
        for a, b in zip(plain[1], ckpt[1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_seeded_spikes_in_torch_checkpoint_raise_and_the_library_checkpoint_replays_them():
    """A seeded spike function (private generator) inside ``torch.utils.checkpoint`` would
    draw other spikes in the recomputation (silently wrong gradients): it raises and names
    ``sbnn_addons.checkpoint``, which gives the plain run's gradients."""
    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    from sbnn_addons.checkpoint import checkpoint

    with pytest.raises(RuntimeError, match="seeded.*sbnn_addons.checkpoint.checkpoint"):
        _snntorch_loop_grads(
            lambda fn, x, m, model: torch_checkpoint(fn, x, m, use_reentrant=False), True)
    plain = _snntorch_loop_grads(lambda fn, x, m, model: fn(x, m), True)
    ckpt = _snntorch_loop_grads(lambda fn, x, m, model: checkpoint(fn, x, m, modules=model),
                                True)
    assert torch.equal(plain[0], ckpt[0])
    for a, b in zip(plain[1], ckpt[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seeded", [False, True])
def test_reentrant_torch_checkpoint_raises_at_the_recomputation(seeded):
    """``torch.utils.checkpoint(use_reentrant=True)`` runs its region's forward without
    gradients: a converted snnTorch loop's membrane variance, carried by the neuron
    between steps, then got no gradient (``fc1.std_rho`` 7 % off), a seeded spike drew
    other spikes in the recomputation, and a core block's auxiliary terms missed the
    loss (50.7 became 9.4), all without an error. The recomputation raises, naming both
    fixes; the core model is refused likewise."""
    from torch import nn
    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    def reentrant(fn, x, m, model):
        return torch_checkpoint(fn, x.requires_grad_(), m, use_reentrant=True)

    with pytest.raises(RuntimeError, match="use_reentrant=True.*use_reentrant=False.*"
                                           "sbnn_addons.checkpoint.checkpoint"):
        _snntorch_loop_grads(reentrant, seeded)
    torch.manual_seed(0)
    fc, lif = sb.BayesLinear(8, 16), sb.LIF(spike_fn=sb.IWSTSpike("st"))
    block = nn.Sequential(fc)
    if seeded:
        sb.seed_spikes(lif, 0)
    sb.enable_aux_loss(lif)
    x = torch.rand(5, 3, 8, requires_grad=True) * 3
    out = torch_checkpoint(lambda v: lif.run(block(v)), x, use_reentrant=True)
    with pytest.raises(RuntimeError, match="use_reentrant=True"):
        out.sum().backward()


@pytest.mark.parametrize("first", [0, 1], ids=["from-reset", "state-a-tensor"])
@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_checkpointed_spikingjelly_block_recomputes_from_its_entry_state(step_mode, first):
    """A checkpointed block of a converted SpikingJelly model (its neuron keeps the membrane
    and noise variance as memories, its ``layer.Dropout`` the mask): the recomputation in
    the backward starts from the state the block had when it ran forward, not from the
    state at the end of the sequence (gradients 5-30 % off, no error, once the state is a
    tensor; a CheckpointError on the first call), and leaves the state as the forward
    left it. Loss, gradients and final state equal the plain run's. ``first``: the first
    checkpointed call (1: the state is already a tensor when checkpointing starts). Plain
    ``torch.utils.checkpoint`` around a converted neuron raises and names the helper
    (reentrant: at its recomputation in the backward)."""
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import functional, layer, neuron
    from torch import nn

    from sbnn_addons import spikingjelly as sbnn_sj
    from sbnn_addons.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(layer.Linear(6, 8), layer.Dropout(0.2),
                                       neuron.LIFNode())
            self.fc, self.sn = layer.Linear(8, 3), neuron.IFNode()
            self.ck, self.calls = False, 0

        def forward(self, x):
            self.calls += 1
            if self.ck and self.calls > first:
                h = checkpoint(self.block, x, modules=self.block)
            else:
                h = self.block(x)
            return self.sn(self.fc(h))

    torch.manual_seed(0)
    host = Net()
    with torch.no_grad():
        host.block[0].weight.mul_(3.0)
        host.fc.weight.mul_(3.0)
    functional.set_step_mode(host, step_mode)
    x = torch.rand(2, 4, 5, 6) * 2  # two sequences, the second continuing the state
    results = []
    for ck in (False, True):
        model = sbnn_sj.to_sbnn(host, std=0.3)
        model.ck = ck
        sb.seed_spikes(model, 0)
        torch.manual_seed(1)
        functional.reset_net(model)
        outs = [model(seq) if step_mode == "m" else torch.stack([model(xt) for xt in seq])
                for seq in x]
        out = torch.stack(outs)
        state = [t.detach().clone() for t in model.block[2]._memories.values()]
        out.sum().backward()
        after = list(model.block[2]._memories.values())
        assert all(torch.equal(a, b) for a, b in zip(state, after))  # untouched by backward
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()], state))
        if ck:  # plain torch.utils.checkpoint would recompute from the state at the end
            from torch.utils.checkpoint import checkpoint as torch_checkpoint

            with pytest.raises(RuntimeError, match="LIFNode runs inside torch.utils.check.*"
                                                   "sbnn_addons.checkpoint.checkpoint"):
                torch_checkpoint(model.block, x[0, 0], use_reentrant=False)
            # reentrant (torch's default): its forward runs without gradients; the
            # recomputation in its backward raises
            out = torch_checkpoint(model.block, x[0, 0].requires_grad_(), use_reentrant=True)
            with pytest.raises(RuntimeError, match="LIFNode runs inside torch.utils.check"):
                out.sum().backward()
    (out_p, grad_p, state_p), (out_c, grad_c, state_c) = results
    assert torch.equal(out_p, out_c) and 0.05 < float(out_p.mean()) < 0.95
    for a, b in zip(grad_p, grad_c):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(a, b) for a, b in zip(state_p, state_c))


def test_a_seeded_spike_function_outside_modules_is_named():
    """modules= that misses a seeded spike function the region runs: its generator was not
    replayed, the recomputation drew other spikes and the gradients were wrong, silently."""
    from torch import nn

    from sbnn_addons.checkpoint import checkpoint

    torch.manual_seed(0)
    fc, spk, out = sb.BayesLinear(6, 8, std=0.5), sb.IWSTSpike("st", std=0.5), nn.Linear(8, 2)
    x = torch.rand(4, 6)

    def region(x):
        return out(spk(fc(x)))

    sb.seed_spikes(spk, 3)
    region(x).sum().backward()
    ref = out.weight.grad.clone()
    out.zero_grad()
    sb.seed_spikes(spk, 3)
    with pytest.raises(RuntimeError, match="not part of its modules="):
        checkpoint(region, x, modules=out)
    sb.seed_spikes(spk, 3)
    checkpoint(region, x, modules=nn.ModuleList([fc, spk, out])).sum().backward()
    torch.testing.assert_close(out.weight.grad, ref, rtol=0, atol=0)
    sb.seed_spikes(spk, None)  # unseeded: the global generator is restored, any modules=
    checkpoint(region, x, modules=out).sum().backward()


@pytest.mark.parametrize("fused", [True, False], ids=["kernel", "pytorch"])
def test_torch_checkpoint_without_rng_state_is_refused_naming_the_flag(fused):
    """``torch.utils.checkpoint(..., preserve_rng_state=False)`` (a documented speed-up)
    around a Bayesian layer and a spike function: the recomputation in the backward drew
    other spikes from the global generator, so the gradients were those of other spikes
    (``std_rho``'s 1.86 became -0.95, no error). The forward raises, naming the flag;
    the default (``True``) gives the plain run's gradients, and a region without draws
    (``mean`` mode) runs with the flag off."""
    from torch import nn
    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    torch.manual_seed(0)
    fc, spk, head = sb.BayesLinear(8, 64, std=0.5), sb.IWSTSpike("agr"), nn.Linear(64, 3)
    x = torch.rand(50, 8)

    def region(v):
        return spk(fc(v))

    def grads(wrap):
        fc.zero_grad()
        torch.manual_seed(1)
        with kernels.use_kernels(fused):
            head(wrap(region, x)).pow(2).sum().backward()
        return fc.std_rho.grad.clone(), fc.weight.grad.clone()

    plain = grads(lambda f, v: f(v))
    ckpt = grads(lambda f, v: torch_checkpoint(f, v, use_reentrant=False))
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"preserve_rng_state=False.*other spikes.*"
                                           r"preserve_rng_state=True"):
        grads(lambda f, v: torch_checkpoint(f, v, use_reentrant=False,
                                            preserve_rng_state=False))
    with sb.mode(nn.ModuleList([fc, spk]), "mean"):  # no draw: nothing to replay
        torch_checkpoint(region, x, use_reentrant=False, preserve_rng_state=False)


def test_torch_checkpoint_without_rng_state_in_a_converted_snntorch_loop_is_refused():
    """The same flag around one step of a converted snnTorch loop (the fused LIF step
    draws there)."""
    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    with pytest.raises(RuntimeError, match="preserve_rng_state=False"):
        _snntorch_loop_grads(lambda fn, x, m, model: torch_checkpoint(
            fn, x, m, use_reentrant=False, preserve_rng_state=False))


@pytest.mark.parametrize("std_mode", ["layer", "channel", "weight"])
@pytest.mark.parametrize("wrap", ["region", "sequential", "reentrant"])
def test_torch_checkpoint_around_an_snntorch_neuron_with_hidden_state_is_refused(wrap,
                                                                                 std_mode):
    """Plain ``torch.utils.checkpoint`` (or ``checkpoint_sequential``) around a step of a
    converted snnTorch ``Sequential`` with ``init_hidden=True`` (the quick start's model):
    the recomputation in the backward started from the membrane kept in the module at the
    end of the sequence, not from the step's own, so the gradients were 40-120 % off
    (``std_rho``'s too) without an error for ``std_mode="channel"`` / ``"weight"``, and
    an unnamed ``CheckpointError`` for ``"layer"``. It raises, naming the neuron and the
    explicit-membrane fix, as ``sbnn_addons.checkpoint.checkpoint`` does."""
    import snntorch as snn
    from torch import nn
    from torch.utils.checkpoint import checkpoint as torch_checkpoint
    from torch.utils.checkpoint import checkpoint_sequential

    from sbnn_addons.snntorch import reset, to_sbnn

    torch.manual_seed(0)
    model = to_sbnn(nn.Sequential(nn.Linear(16, 32), snn.Leaky(beta=0.9, init_hidden=True),
                                  nn.Linear(32, 4),
                                  snn.Leaky(beta=0.9, init_hidden=True, output=True)),
                    std_mode=std_mode)
    x = torch.rand(3, 5, 16) * 2
    step = {
        "region": lambda xt: torch_checkpoint(model, xt, use_reentrant=False),
        "sequential": lambda xt: checkpoint_sequential(model, 2, xt, use_reentrant=False),
        "reentrant": lambda xt: torch_checkpoint(model, xt.requires_grad_(),
                                                 use_reentrant=True),
    }[wrap]
    reset(model)
    model(x[0])  # the membrane is a tensor when the checkpointed steps start
    with pytest.raises(RuntimeError, match=r"snnTorch Leaky( '1')? has init_hidden=True.*"
                                           r"torch.utils.checkpoint.*end of the sequence"
                                           r".*init_hidden=False"):
        loss = sum(step(xt)[1].sum() for xt in x[1:])
        loss.backward()  # (reentrant: raised at the recomputation)


def test_torch_checkpoint_recomputation_collects_no_auxiliary_terms():
    """The recomputation of a non-reentrant ``torch.utils.checkpoint`` region in the
    backward collects no auxiliary terms a second time: they would be left over after the
    step, and the next training step raised that its terms were never used."""
    import snntorch as snn
    from torch import nn
    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    from sbnn_addons.snntorch import to_sbnn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8), snn.Leaky(beta=0.9), nn.Linear(8, 4),
                        snn.Leaky(beta=0.9))
    with torch.no_grad():
        net[0].weight.mul_(3)
    model = to_sbnn(net, aux_loss=True)

    def step(x_t, mem1, mem2):  # the first neuron's spikes feed the second layer
        spk1, mem1 = model[1](model[0](x_t), mem1)
        spk2, mem2 = model[3](model[2](spk1), mem2)
        return spk2, mem1, mem2

    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = (torch.rand(3, 4, 16) < 0.4).float()
    for _ in range(2):  # the second step raised
        opt.zero_grad()
        mem1, mem2 = model[1].init_leaky(), model[3].init_leaky()
        loss = 0
        for t in range(len(x)):
            spk2, mem1, mem2 = torch_checkpoint(step, x[t], mem1, mem2, use_reentrant=False)
            loss = loss + mem2.sum() + spk2.sum()
        (loss + 1e-3 * sb.aux_loss(model)).backward()
        assert not model[1].spike_grad._aux_terms
        opt.step()


@pytest.mark.parametrize("wrap", ["torch", "sbnn", "sbnn-outside-modules", "hidden-outside"])
def test_snntorch_neuron_taking_its_membrane_from_the_module_in_a_checkpoint_is_named(wrap):
    """A converted ``snn.Leaky`` called without its membrane (``spk, mem = lif(cur)``:
    snnTorch takes the one it keeps in the module) in a checkpointed region: the
    recomputation would start from the membrane at the end of the sequence (an unnamed
    ``CheckpointError``, or wrong gradients). So is one with ``init_hidden=True`` that
    ``sbnn_addons.checkpoint``'s ``modules=`` misses. Named, with the explicit fix."""
    import snntorch as snn
    from torch import nn
    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    from sbnn_addons.checkpoint import checkpoint
    from sbnn_addons.snntorch import to_sbnn

    torch.manual_seed(0)
    hidden = wrap == "hidden-outside"
    model = to_sbnn(nn.ModuleList([nn.Linear(6, 8), snn.Leaky(beta=0.9, init_hidden=hidden)]))
    x = torch.rand(3, 4, 6) * 3

    def step(x_t):
        out = model[1](model[0](x_t))
        return out if hidden else out[0]

    region = {"torch": lambda x_t: torch_checkpoint(step, x_t, use_reentrant=False),
              "sbnn": lambda x_t: checkpoint(step, x_t, modules=model)}.get(
        wrap, lambda x_t: checkpoint(step, x_t, modules=model[0]))
    model[1].reset_mem()
    fix = r"spk, mem = lif\(cur, mem\)"
    with pytest.raises(RuntimeError, match=(r"init_hidden=True.*" if hidden else
                                            r"called without its membrane.*") + fix):
        sum(region(x_t).sum() for x_t in x).backward()


def test_spikingjelly_neuron_outside_modules_of_the_checkpoint_is_named():
    """``sbnn_addons.checkpoint.checkpoint(fn, x, modules=...)`` whose ``modules=`` misses a
    converted SpikingJelly neuron that ``fn`` runs: its state was not put back for the
    recomputation, which started from the state at the end of the sequence (``mean``
    mode: gradients 150 % off, no error; ``sample`` mode: an unnamed CheckpointError).
    Named, with the fix."""
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import functional, layer, neuron
    from torch import nn

    from sbnn_addons import spikingjelly as sbnn_sj
    from sbnn_addons.checkpoint import checkpoint

    torch.manual_seed(0)
    model = sbnn_sj.to_sbnn(nn.Sequential(layer.Linear(6, 8), neuron.LIFNode()))
    x = torch.rand(3, 4, 6) * 3
    for mode in ("mean", "sample"):
        sb.set_mode(model, mode)
        functional.reset_net(model)
        with pytest.raises(RuntimeError, match=r"LIFNode '1'.*not part of its modules=.*"
                                               r"modules=model"):
            sum(checkpoint(model, x_t, modules=model[0]).sum() for x_t in x).backward()
    functional.reset_net(model)
    sum(checkpoint(model, x_t, modules=model).sum() for x_t in x).backward()
