"""Activation checkpointing for stochastic spiking regions.

``torch.utils.checkpoint`` trades compute for memory: a region keeps only its inputs for
the backward and runs its forward again when the backward needs the rest. With sampled
spikes that is only correct if the second forward draws **the same** spikes as the
first. :func:`checkpoint` makes it so:

* the global RNG is restored for the recomputation (``preserve_rng_state``), which
  covers spike functions on the global generator, both the fused kernel and the PyTorch
  path;
* the private generators of :class:`~sbnn_addons.IWSTSpike` modules seeded with
  :func:`~sbnn_addons.seed_spikes` are snapshotted when the region runs forward, used
  from the snapshot during the recomputation, and left untouched by it;
* the auxiliary ``z^2`` terms (Method page, section 5) are collected by the first forward only,
  not again by the recomputation;
* the state that modules keep between calls in a ``_memories`` dict (SpikingJelly's
  ``MemoryModule`` s: a neuron's membrane and noise variance, a ``layer.Dropout`` mask) is
  put back to what it was when the region ran forward for the recomputation, and back to
  what it is after it: the recomputation of a region holding a SpikingJelly neuron
  starts from the neuron's state at the region's entry, not from its state at the end of
  the sequence (silently wrong gradients), and leaves that state as it was. A converted
  SpikingJelly neuron that the region runs but ``modules=`` misses raises, naming it;
* a converted snnTorch neuron keeps no such state for the region: pass its membrane in
  and out (``spk, mem = lif(cur, mem)``). One that takes it from the module
  (``init_hidden=True``, or ``spk, mem = lif(cur)``) raises.

The gradients are then exactly those of the plain forward (tested), at the cost of one
more forward of the region.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from .spike import IWSTSpike, checkpointed_forward, recomputing_forward

__all__ = ["checkpoint"]


def _generator_snapshot(spikes: list[IWSTSpike]) -> list:
    """Per spike module: ``None`` (global RNG), ``"fresh"`` (seeded, no draw yet) or the
    state of its private generator."""
    snap = []
    for m in spikes:
        if m._seed is None:
            snap.append(None)
        elif m._generator is None:
            snap.append("fresh")
        else:
            snap.append(m._generator.get_state())
    return snap


def _memories_snapshot(stateful: list[nn.Module]) -> list[dict]:
    """Per module with a ``_memories`` dict (SpikingJelly's ``MemoryModule``): a shallow
    copy of it (the state tensors are replaced, not changed in place, by a call)."""
    return [dict(m._memories) for m in stateful]


def _set_memories(stateful: list[nn.Module], snapshot: list[dict]) -> None:
    for m, memories in zip(stateful, snapshot):
        m._memories.update(memories)


@contextlib.contextmanager
def _replay(spikes: list[IWSTSpike], snapshot: list, stateful: list[nn.Module],
            memories: list[dict]) -> Iterator[None]:
    current = [m._generator for m in spikes]
    after = _memories_snapshot(stateful)  # the state the forward left: restored at the end
    try:
        for m, state in zip(spikes, snapshot):
            if state == "fresh":
                m._generator = None  # re-created from the seed at the first draw
            elif state is not None:
                m._generator = torch.Generator(device=m._generator.device)
                m._generator.set_state(state)
        _set_memories(stateful, memories)  # the recomputation starts where the forward did
        with recomputing_forward():
            yield
    finally:
        for m, gen in zip(spikes, current):
            m._generator = gen
        _set_memories(stateful, after)


def checkpoint(fn: Callable[..., Tensor], *args, modules: nn.Module) -> Tensor:
    """``fn(*args)`` whose activations are recomputed in the backward, with the same spikes.

    Args:
        fn: the region, e.g. a residual block's forward.
        *args: its inputs (tensors are kept for the backward, nothing else of the region).
        modules: the module(s) ``fn`` runs, searched for :class:`~sbnn_addons.IWSTSpike`
            and for modules keeping state between calls (SpikingJelly's neurons); an
            ``nn.ModuleList`` for several.

    Returns:
        ``fn(*args)``. Inside a step that ``torch.compile`` traces, the region runs
        without ``torch.utils.checkpoint`` (whose ``context_fn`` Dynamo cannot trace):
        the compiled graph's partitioner decides what to recompute.

    Raises:
        TypeError: ``fn`` is not callable, or ``modules`` is not an ``nn.Module``.
        RuntimeError: a seeded spike function or a converted SpikingJelly neuron that is
            not in ``modules`` runs in the region (its spikes or its state could not be
            replayed: wrong gradients), or a converted snnTorch neuron takes its membrane
            from the module (``spk, mem = lif(cur)``, or ``init_hidden=True``).
        ValueError: ``modules`` holds an snnTorch neuron with ``init_hidden=True`` (its
            membrane is module state that the recomputation would start from the end of
            the sequence: wrong gradients); pass its membrane explicitly instead. Eager
            mode: inside a compiled step nothing is recomputed, and the region runs.
    """
    if not callable(fn):  # torch.utils.checkpoint failed in its backward-setup internals
        raise TypeError(f"fn must be the region to run (a callable such as block.forward), "
                        f"got {type(fn).__name__}; call checkpoint(fn, *args, modules=...)")
    if not isinstance(modules, nn.Module):
        raise TypeError(
            f"modules must be the nn.Module that fn runs (searched for spike functions), got "
            f"{type(modules).__name__}"
        )
    if torch.compiler.is_compiling():
        # Dynamo cannot trace checkpoint's context_fn (an internal error): inside a compiled
        # step the region runs as it is, and the compiler's partitioner chooses what the
        # backward recomputes (never a random draw, so never a different spike)
        # (before the search of modules= below, which Dynamo refuses on a neuron that an
        # earlier step changed, and which no recomputation needs here)
        return fn(*args)
    for name, m in modules.named_modules():
        if getattr(m, "init_hidden", False) is True and any(
                c.__module__.startswith("snntorch") for c in type(m).__mro__):
            raise ValueError(
                f"checkpoint cannot recompute the snnTorch neuron {name or '(modules)'!r} "
                f"({type(m).__name__}) with init_hidden=True: it keeps its membrane as "
                "module state, so the recomputation in the backward would start from the "
                "state at the end of the sequence (wrong gradients). Pass the membrane "
                "explicitly in the region (init_hidden=False: spk, mem = lif(cur, mem)), "
                "or leave the neuron outside the checkpointed region")
    spikes = [m for m in modules.modules() if isinstance(m, IWSTSpike)]
    stateful = [m for m in modules.modules() if isinstance(getattr(m, "_memories", None), dict)]

    def context_fn():  # called as the region starts its forward
        snapshot = _generator_snapshot(spikes)
        memories = _memories_snapshot(stateful)
        return checkpointed_forward(spikes, stateful), _replay(spikes, snapshot, stateful, memories)

    return _torch_checkpoint(fn, *args, use_reentrant=False, context_fn=context_fn,
                             preserve_rng_state=True)
