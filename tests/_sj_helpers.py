"""Shared helpers of the SpikingJelly adapter tests (no mocks: real SpikingJelly models)."""

from __future__ import annotations

import torch


def import_zoo(name: str):
    """A SpingJelly model-zoo module (``spikingjelly.activation_based.model.<name>``).
    The zoo imports torchvision at import time only for pretrained weights (host-libraries
    notes 2.6): the library's stub is enough without network."""
    import importlib

    from sbnn_addons.spikingjelly import stub_torchvision

    with stub_torchvision():
        return importlib.import_module(f"spikingjelly.activation_based.model.{name}")


def record_spikes(model: torch.nn.Module):
    """Forward hooks that record every spiking neuron's output; returns (store, handles)."""
    from spikingjelly.activation_based import base

    store: list[torch.Tensor] = []
    handles = []
    for m in model.modules():
        if isinstance(m, base.MemoryModule) and hasattr(m, "surrogate_function"):
            handles.append(m.register_forward_hook(lambda mod, a, out: store.append(out.detach())))
    return store, handles


def run_sequence(model: torch.nn.Module, x: torch.Tensor, step_mode: str) -> torch.Tensor:
    """Reset, then run ``x`` ``[T, N, ...]`` through ``model`` in its step mode."""
    from spikingjelly.activation_based import functional

    functional.reset_net(model)
    return run_steps(model, x, step_mode)


def run_steps(model: torch.nn.Module, x: torch.Tensor, step_mode: str) -> torch.Tensor:
    """Run ``x`` ``[T, N, ...]`` through ``model`` in its step mode, from its state now
    (a chunk of a sequence): one call in multi-step mode, a call per step otherwise."""
    if step_mode == "m":
        return model(x)
    return torch.stack([model(xt) for xt in x])


def initial_membrane_net(step_mode: str):
    """A converted Linear-LIF-Linear model whose only state is the neuron's (seeded, the
    first layer's weights x3 so that it spikes), and a layer that makes its learned
    initial membrane."""
    from spikingjelly.activation_based import functional, layer, neuron

    import sbnn_addons.spikingjelly as sbnn_sj

    torch.manual_seed(0)
    host = torch.nn.Sequential(layer.Linear(12, 16), neuron.LIFNode(tau=2.0),
                               layer.Linear(16, 5))
    with torch.no_grad():
        host[0].weight.mul_(3.0)
    functional.set_step_mode(host, step_mode)
    return sbnn_sj.to_sbnn(host, exclude=["2"]), torch.nn.Linear(12, 16)
