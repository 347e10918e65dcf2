"""The PyTorch training ecosystem around SBNN models: DistributedDataParallel (gloo, two
CPU processes) and AveragedModel on converted host models, with the host libraries' own
models."""

from __future__ import annotations

import contextlib
import os
import queue as queue_module
import socket
import time
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import sbnn_addons as sb


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _gloo_group(rank: int, port: int) -> Iterator[None]:
    """In a worker of :func:`_run_two_ranks`: this process as ``rank`` of a gloo group of
    2 on ``port`` (one intra-op thread), destroyed when the block ends."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _run_two_ranks(worker, timeout: float) -> list:
    """Run ``worker(rank, port, queue)`` in two spawned processes (a gloo group of 2) and
    return what each put on the queue, sorted (by rank first)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results: list = []
    deadline = time.monotonic() + timeout
    try:
        while len(results) < len(procs):
            try:
                results.append(queue.get(timeout=0.5))
            except queue_module.Empty:
                # a rank that raised ends without a result: fail now, not at the timeout
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    raise AssertionError(f"a rank failed (exit codes {failed}; its "
                                         "traceback is in the captured stderr)" if failed
                                         else f"no result within {timeout} s") from None
        return sorted(results)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def _snntorch_model() -> nn.Module:
    import snntorch as snn

    from sbnn_addons.snntorch import to_sbnn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), snn.Leaky(beta=0.9, init_hidden=True),
                        nn.Linear(16, 4), snn.Leaky(beta=0.9, init_hidden=True, output=True))
    with torch.no_grad():
        net[0].weight.mul_(3.0)
    return to_sbnn(net)


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from sbnn_addons.snntorch import reset

    reset(model)
    out = sum(sum(model(x[t])) for t in range(len(x)))
    return ((out - 1) ** 2).mean()


def _ddp_worker(rank: int, port: int, queue) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    with _gloo_group(rank, port):
        model = _snntorch_model()
        x = torch.rand(5, 4, 8, generator=torch.Generator().manual_seed(10 + rank))
        sb.seed_spikes(model, 100 + rank)  # each rank its own noise
        _loss(model, x).backward()
        local = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        ddp = DDP(model)  # buffer synchronisation on, DDP's default
        sb.seed_spikes(ddp, 100 + rank)
        _loss(ddp, x).backward()
        both = [None, None]
        dist.all_gather_object(both, local)
        err = max(float((p.grad - (both[0][n] + both[1][n]) / 2).abs().max())
                  for n, p in model.named_parameters())
        # the same model inside a wrapper: DDP would broadcast the membranes
        wrapped = DDP(nn.Sequential(_snntorch_model()))
        try:
            _loss(wrapped, x)
            refused = ""
        except RuntimeError as e:
            refused = str(e)
        queue.put((rank, err, refused))


def test_ddp_on_a_converted_snntorch_model_averages_each_ranks_gradients():
    """``DistributedDataParallel`` (gloo, 2 processes) around a converted snnTorch
    ``Sequential`` driven step by step: DDP synchronises every buffer from rank 0 at each
    forward call, so rank 1 continued rank 0's membrane (gradients off by 4.3, no error).
    The converted model names its neuron states to DDP as buffers to leave alone, so the
    gradients are exactly the ranks' own (seeded noise per rank) averaged; a wrapper that
    hides them raises and names ``broadcast_buffers=False``."""
    results = _run_two_ranks(_ddp_worker, timeout=60)
    for _rank, err, refused in results:
        assert err < 1e-6
        assert "DistributedDataParallel" in refused and "broadcast_buffers=False" in refused


def test_converted_model_names_its_neuron_states_for_ddp():
    """``to_sbnn`` lists the membranes in DDP's ignore list, keeping names already there,
    and under the names of ``torch.compile``'s wrapper too."""
    model = _snntorch_model()
    assert model._ddp_params_and_buffers_to_ignore == ["1.mem", "3.mem", "_orig_mod.1.mem",
                                                       "_orig_mod.3.mem"]


def test_a_compiled_converted_model_names_its_neuron_states_for_ddp():
    """``DistributedDataParallel(torch.compile(converted))`` reads the ignore list through
    the compiled wrapper, whose buffers are named ``_orig_mod.1.mem``: the list names them
    too (DDP broadcast the membranes silently), also for a compiled host converted."""
    import snntorch as snn

    from sbnn_addons.snntorch import to_sbnn

    for compiled in (torch.compile(_snntorch_model()),
                     to_sbnn(torch.compile(nn.Sequential(
                         nn.Linear(8, 4), snn.Leaky(beta=0.9, init_hidden=True))))):
        for wrapper in (compiled, compiled._orig_mod):
            mems = {n for n, _ in wrapper.named_buffers() if n.endswith("mem")}
            assert mems and mems <= set(wrapper._ddp_params_and_buffers_to_ignore)


def _ddp_compiled_worker(rank: int, port: int, queue) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sbnn_addons.snntorch import reset

    with _gloo_group(rank, port):
        model = _snntorch_model()
        x = torch.rand(3, 4, 8, generator=torch.Generator().manual_seed(10 + rank))

        def run(m):
            reset(m)
            return torch.stack([m(xt)[1] for xt in x]).detach()

        with sb.mode(model, "mean"):
            local = run(model)
            got = run(DDP(torch.compile(model)))  # gradients on: DDP synchronises buffers
        queue.put((rank, float((got - local).abs().max())))


def test_ddp_around_a_compiled_converted_model_keeps_each_ranks_membranes():
    """``DistributedDataParallel(torch.compile(converted))`` (gloo, 2 processes, ``mean``
    mode): each rank continues its own membranes. DDP copied rank 0's membranes into rank
    1 at every step (rank 1's outputs off by 1.4), and the compiled step could not check
    it."""
    results = _run_two_ranks(_ddp_compiled_worker, timeout=240)
    assert [err for _rank, err in results] == [0.0, 0.0]


def test_averaged_model_of_a_converted_spikingjelly_model():
    """``torch.optim.swa_utils.AveragedModel`` (EMA) of a converted SpikingJelly model
    (both step modes, a kept BatchNorm): the averaged parameters, noise scales included,
    are the EMA of the trained ones, and the average runs as a fresh conversion loaded
    with its state dict, in mean mode and in seeded sample mode (Training page)."""
    import pytest

    pytest.importorskip("spikingjelly")
    import torch.nn.functional as F
    from spikingjelly.activation_based import layer, neuron
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from sbnn_addons import spikingjelly as sbnn_sj

    def host(sm):
        torch.manual_seed(0)
        net = nn.Sequential(layer.Linear(8, 16, step_mode=sm), layer.BatchNorm1d(16, step_mode=sm),
                            neuron.LIFNode(step_mode=sm), layer.Linear(16, 4, step_mode=sm),
                            neuron.ParametricLIFNode(step_mode=sm))
        with torch.no_grad():
            net[0].weight.mul_(3)
        return net

    def run(m, sm):
        sbnn_sj.reset(m)
        return m(x) if sm == "m" else torch.stack([m(xt) for xt in x])

    x = torch.rand(5, 6, 8, generator=torch.Generator().manual_seed(1))
    for sm in ("s", "m"):
        model = sbnn_sj.to_sbnn(host(sm))
        opt = torch.optim.Adam(sb.param_groups(model, lr=1e-2, noise_lr=5e-2))
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
        expected = None
        for step in range(3):
            sb.seed_spikes(model, step)
            loss = F.mse_loss(run(model, sm).mean(0), torch.full((6, 4), 0.5))
            opt.zero_grad()
            loss.backward()
            opt.step()
            ema.update_parameters(model)
            now = [p.detach().clone() for p in model.parameters()]
            expected = now if expected is None else [0.5 * e + 0.5 * p
                                                     for e, p in zip(expected, now)]
        names = [n for n, _ in model.named_parameters()]
        assert any(n.endswith("std_rho") for n in names)
        for e, p in zip(expected, ema.module.parameters()):
            torch.testing.assert_close(p, e, rtol=1e-6, atol=1e-7)
        fresh = sbnn_sj.to_sbnn(host(sm))
        fresh.load_state_dict(ema.module.state_dict())
        ema.eval()
        fresh.eval()
        with torch.no_grad(), sb.mode(ema, "mean"), sb.mode(fresh, "mean"):
            assert torch.equal(run(ema, sm), run(fresh, sm))
        sb.seed_spikes(ema, 7)
        sb.seed_spikes(fresh, 7)
        with torch.no_grad():
            out = run(ema, sm)
            assert torch.equal(out, run(fresh, sm)) and 0 < float(out.mean()) < 1


def _spikingjelly_model(step_mode: str) -> nn.Module:
    from spikingjelly.activation_based import layer, neuron

    from sbnn_addons import spikingjelly as sbnn_sj

    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(8, 16, step_mode=step_mode),
                        layer.BatchNorm1d(16, step_mode=step_mode),
                        neuron.LIFNode(step_mode=step_mode),
                        layer.Linear(16, 4, step_mode=step_mode),
                        neuron.ParametricLIFNode(step_mode=step_mode))
    with torch.no_grad():
        net[3].weight.mul_(4.0)
        net[3].bias.fill_(1.0)
    return sbnn_sj.to_sbnn(net)


def _ddp_steps_worker(rank: int, port: int, queue) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sbnn_addons import spikingjelly as sbnn_sj

    with _gloo_group(rank, port):
        x = torch.rand(5, 4, 8, generator=torch.Generator().manual_seed(10 + rank))
        results = {}
        for kind in ("snntorch", "s", "m"):
            model = _snntorch_model() if kind == "snntorch" else _spikingjelly_model(kind)
            ddp = DDP(model)
            sb.seed_spikes(ddp, 100 + rank)  # each rank its own noise
            opt = torch.optim.Adam(sb.param_groups(ddp, lr=1e-2, noise_lr=5e-2))
            noise_grads = []
            for _ in range(2):
                if kind == "snntorch":
                    loss = _loss(ddp, x)
                else:
                    sbnn_sj.reset(ddp)
                    out = ddp(x) if kind == "m" else torch.stack([ddp(xt) for xt in x])
                    loss = ((out.mean(0) - 0.5) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                noise_grads.append([p.grad.clone() for n, p in model.named_parameters()
                                    if n.endswith("std_rho")])
                opt.step()
            both = [None, None]
            dist.all_gather_object(both, ([p.detach() for p in model.parameters()],
                                          noise_grads, float(loss)))
            params = max(float((a - b).abs().max()) for a, b in zip(both[0][0], both[1][0]))
            grads = max(float((a - b).abs().max())
                        for s0, s1 in zip(both[0][1], both[1][1]) for a, b in zip(s0, s1))
            nonzero = all(float(g.abs().sum()) > 0 for g in noise_grads[0])
            results[kind] = (params, grads, nonzero, len(noise_grads[0]),
                             both[0][2] != both[1][2])
        queue.put((rank, results))


def test_ddp_training_steps_keep_the_ranks_identical():
    """Two optimiser steps under ``DistributedDataParallel`` (gloo, 2 processes, each rank
    its own data and spike noise) of a converted snnTorch model and of a converted
    SpikingJelly model in both step modes (with a BatchNorm): the noise scales' gradients
    (``std_rho`` of the layers and spike functions) are synchronised, and every
    parameter is identical on both ranks after the steps."""
    import pytest

    pytest.importorskip("spikingjelly")
    results = _run_two_ranks(_ddp_steps_worker, timeout=120)
    for _rank, per_kind in results:
        assert set(per_kind) == {"snntorch", "s", "m"}
        for params, grads, nonzero, count, losses_differ in per_kind.values():
            assert params == 0 and grads == 0 and nonzero and count == 4
            assert losses_differ  # the ranks ran their own data and noise


def _ensemble_member(host: str, seed: int) -> nn.Module:
    """A converted model (snnTorch ``Sequential`` with ``init_hidden=True``, or a
    multi-step SpikingJelly one) with its own weights, in ``mean`` mode."""
    import snntorch as snn
    from spikingjelly.activation_based import functional, layer, neuron

    from sbnn_addons import spikingjelly as sbnn_sj
    from sbnn_addons.snntorch import to_sbnn

    torch.manual_seed(seed)
    if host == "snntorch":
        net = to_sbnn(nn.Sequential(nn.Linear(8, 16), snn.Leaky(beta=0.9, init_hidden=True),
                                    nn.Linear(16, 4),
                                    snn.Leaky(beta=0.9, init_hidden=True, output=True)))
    else:
        plain = nn.Sequential(layer.Linear(8, 16), neuron.LIFNode(), layer.Linear(16, 4),
                              neuron.LIFNode())
        functional.set_step_mode(plain, "m")
        net = sbnn_sj.to_sbnn(plain)
    with torch.no_grad():
        net[0].weight.mul_(3.0)
        net[2].weight.mul_(3.0)
    return sb.set_mode(net, "mean")


def _ensemble_run(host: str, model: nn.Module, x: torch.Tensor, params=None) -> torch.Tensor:
    from torch.func import functional_call

    from sbnn_addons import snntorch as sbnn_snn
    from sbnn_addons import spikingjelly as sbnn_sj

    def call(inp):
        return model(inp) if params is None else functional_call(model, params, (inp,))

    if host == "snntorch":
        sbnn_snn.reset(model)
        return torch.stack([call(xt)[0] for xt in x])
    sbnn_sj.reset(model)
    return call(x)


@pytest.mark.parametrize("host", ["snntorch", "spikingjelly"])
def test_grad_of_a_vmap_ensemble_of_converted_models_is_each_members_gradient(host):
    """The PyTorch model-ensembling recipe (``stack_module_state``, ``functional_call``
    under ``vmap``) with ``torch.func.grad`` around it, on converted models in ``mean``
    mode: each member's gradient is the one eager mode gives it alone, the auxiliary pull
    (``aux_pull``, on by default in converted models) included. The pull was dropped
    inside ``vmap`` without an error (every weight gradient wrong)."""
    import copy

    from torch.func import grad, stack_module_state, vmap

    pytest.importorskip("spikingjelly")
    models = [_ensemble_member(host, seed) for seed in range(3)]
    base = copy.deepcopy(models[0])
    params, _ = stack_module_state(models)
    x = torch.rand(4, 5, 8, generator=torch.Generator().manual_seed(1))

    def member_loss(p):
        return ((_ensemble_run(host, base, x, p).mean(0) - 0.3) ** 2).mean()

    got = grad(lambda p: vmap(member_loss, randomness="different")(p).sum())(params)
    for i, m in enumerate(models):
        ((_ensemble_run(host, m, x).mean(0) - 0.3) ** 2).mean().backward()
        assert m[0].weight.grad.abs().sum() > 0
        for name, p in m.named_parameters():
            want = torch.zeros_like(p) if p.grad is None else p.grad
            torch.testing.assert_close(got[name][i], want, rtol=1e-5, atol=1e-7)


class _LoopNet(nn.Module):
    """snnTorch's explicit time loop (tutorial form): membranes passed step to step."""

    def __init__(self):
        import snntorch as snn

        super().__init__()
        self.fc1, self.lif1 = nn.Linear(8, 16), snn.Leaky(beta=0.9)
        self.fc2, self.lif2 = nn.Linear(16, 4), snn.Leaky(beta=0.9)

    def forward(self, x):
        mem1, mem2, out = self.lif1.init_leaky(), self.lif2.init_leaky(), []
        for xt in x:
            spk1, mem1 = self.lif1(self.fc1(xt), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            out.append(spk2)
        return torch.stack(out)


def _ddp_model(kind: str) -> nn.Module:
    from sbnn_addons.snntorch import to_sbnn

    if kind == "loop":
        torch.manual_seed(0)
        net = _LoopNet()
        with torch.no_grad():
            net.fc1.weight.mul_(3.0)
            net.fc2.weight.mul_(3.0)
        return to_sbnn(net)
    return _ensemble_member("spikingjelly", 0)


def _ddp_grads_worker(rank: int, port: int, queue) -> None:
    """Per model and training form: the largest difference between the gradients under
    DDP and the mean of the two ranks' gradients computed alone (same seeds)."""
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sbnn_addons import spikingjelly as sbnn_sj

    with _gloo_group(rank, port):
        x = torch.rand(4, 3, 8, generator=torch.Generator().manual_seed(10 + rank))
        y = torch.randint(0, 4, (3,), generator=torch.Generator().manual_seed(20 + rank))
        errors = {}
        for kind in ("loop", "sj"):
            for form in ("objective", "no_sync", "mean"):
                model = sb.set_mode(_ddp_model(kind), "mean" if form == "mean" else "sample")
                sb.enable_aux_loss(model, form == "objective")

                def step(m, scale, model=model, kind=kind, form=form):
                    if kind == "sj":
                        sbnn_sj.reset(m)
                    nll = F.cross_entropy(m(x * scale).mean(0) * 3, y)
                    return sb.sbnn_objective(nll, model, num_data=64, kl_weight=1.0,
                                             aux_weight=0.5) if form == "objective" else nll

                def run(m, model=model, form=form):
                    sb.seed_spikes(model, 100 + rank)  # each rank its own noise
                    torch.manual_seed(200 + rank)
                    if form == "no_sync":  # two micro-batches, one all-reduce
                        with m.no_sync() if m is not model else contextlib.nullcontext():
                            step(m, 1.0).backward()
                    step(m, 0.5).backward()

                run(model)
                local = {n: p.grad.clone() for n, p in model.named_parameters()
                         if p.grad is not None}
                model.zero_grad(set_to_none=True)
                # mean mode: the layers' noise scales take no part (DDP needs to know)
                run(DDP(model, find_unused_parameters=form == "mean"))
                both = [None, None]
                dist.all_gather_object(both, local)
                assert set(local) == {n for n, p in model.named_parameters()
                                      if p.grad is not None}
                errors[kind, form] = max(float((p.grad - (both[0][n] + both[1][n]) / 2)
                                               .abs().max()) for n, p in
                                         model.named_parameters() if n in local)
        queue.put((rank, errors))


def test_ddp_gradients_are_the_mean_of_each_ranks_own():
    """``DistributedDataParallel`` (gloo, 2 processes, each rank its own data and seeded
    noise) around a converted snnTorch explicit time loop and a converted multi-step
    SpikingJelly model: the gradients are exactly the mean of the ranks' own, with the
    SBNN objective's auxiliary and KL terms, with ``no_sync()`` gradient accumulation,
    and in ``mean`` mode with ``find_unused_parameters=True``."""
    pytest.importorskip("spikingjelly")
    for _rank, errors in _run_two_ranks(_ddp_grads_worker, timeout=120):
        assert len(errors) == 6
        assert max(errors.values()) < 1e-6, errors
