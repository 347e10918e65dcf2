"""The PyTorch training ecosystem around SBNN models: DistributedDataParallel (gloo, two
CPU processes) on converted host models, with the host libraries' own models."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import sbnn_addons as sb


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
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
    finally:
        dist.destroy_process_group()


def test_ddp_on_a_converted_snntorch_model_averages_each_ranks_gradients():
    """``DistributedDataParallel`` (gloo, 2 processes) around a converted snnTorch
    ``Sequential`` driven step by step: DDP synchronises every buffer from rank 0 at each
    forward call, so rank 1 continued rank 0's membrane (gradients off by 4.3, no error).
    The converted model names its neuron states to DDP as buffers to leave alone, so the
    gradients are exactly the ranks' own (seeded noise per rank) averaged; a wrapper that
    hides them raises and names ``broadcast_buffers=False``."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = sorted(queue.get(timeout=60) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for _rank, err, refused in results:
        assert err < 1e-6
        assert "DistributedDataParallel" in refused and "broadcast_buffers=False" in refused


def test_converted_model_names_its_neuron_states_for_ddp():
    """``to_sbnn`` lists the membranes in DDP's ignore list, keeping names already there."""
    model = _snntorch_model()
    assert model._ddp_params_and_buffers_to_ignore == ["1.mem", "3.mem"]
