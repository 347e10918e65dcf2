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
    if step_mode == "m":
        return model(x)
    return torch.stack([model(xt) for xt in x])
