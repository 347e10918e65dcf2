"""Corrections to PyTorch's compiler that compiled SBNN training steps need.

Inductor's CPU backend fuses two pointwise kernels whose loop nests differ but have the
same number of iterations (a flat loop with one over a channels-last tensor) by
recomputing one of them (``SchedulerNode.recompute_size_and_body``). That recomputation
reads the kernel's dependencies afresh from its loop body, under the names of the
buffers before any in-place update, and restores the updates' names only where the
kernel also has a fake dependency (PyTorch 2.13). A kernel that reads the result of an
in-place update then no longer waits for it, and the scheduler can run it first: it reads
the buffer's previous contents, silently. The backward of ``max_pool2d`` is such an
update in PyTorch 2.13 (its decomposition is a ``scatter_add`` into zeros): uncorrected, a
compiled step of a convolutional spiking network with max pooling gets the loss and
spikes right but can lose a time step's gradient through the pooling (the layers before
it learn from part of the sequence).

:func:`install` wraps the method so that it re-applies the node's renames
(``mutation_renames``), as the method does where a fake dependency exists: PyTorch's own
fix (pytorch/pytorch#185873, for issue #185509), for the PyTorch releases without it.
Renaming is idempotent (the names it maps are the buffers before their updates), so the wrap is
harmless on a PyTorch whose method already does it. It is installed when inductor's
scheduler module is first imported (by inductor's first compilation: importing it
eagerly would cost 0.4 s at ``import sbnn_addons``), or at once where it is loaded.

AOTAutograd's first run of a compiled graph analyses its custom operators under a
dispatch mode that refuses tensor subclasses it does not know;
:func:`_patch_custom_op_analysis` lets it see the library's own (which carry their state
in Python only) as plain tensors, so that a graph that starts after a graph break and
takes a variance carrier or marked spikes as inputs runs (see the function).
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import sys

_TARGET = "torch._inductor.scheduler"


def _patch_scheduler(scheduler) -> None:
    node_type = getattr(scheduler, "SchedulerNode", None)
    original = getattr(node_type, "recompute_size_and_body", None)
    if original is None or getattr(original, "_sbnn_renames", False):
        return

    @functools.wraps(original)
    def recompute_size_and_body(self, *args, **kwargs):
        original(self, *args, **kwargs)
        renames = getattr(self, "mutation_renames", None)
        if renames:  # the reads of updated buffers: under the updates' names again
            self.set_read_writes(self.read_writes.rename(renames))

    recompute_size_and_body._sbnn_renames = True
    node_type.recompute_size_and_body = recompute_size_and_body


_RUNTIME_WRAPPERS = "torch._functorch._aot_autograd.runtime_wrappers"


def _library_subclasses() -> tuple[type, ...]:
    from .base import ComputedStd
    from .moments import VarianceTensor
    from .tensors import SpikeTensor
    return VarianceTensor, SpikeTensor, ComputedStd


def _patch_custom_op_analysis(runtime_wrappers) -> None:
    """AOTAutograd's first run of a compiled graph analyses its custom operators under a
    dispatch mode that refuses every tensor subclass it does not know. A graph that takes
    one of the library's tensors as an input (after a graph break: a carrier of a
    Bayesian layer's variance, marked spikes) runs its operators on them with
    ``__torch_function__`` off, so they reach that mode, and the first call failed
    ("Multiple dispatch failed for 'aten.add.Tensor'"). The library's subclasses carry
    their state in Python only (no ``__torch_dispatch__``): the mode sees plain aliases
    of them."""
    mode_type = getattr(runtime_wrappers, "_AnalyzeCustomOpInputOutputMode", None)
    original = getattr(mode_type, "__torch_dispatch__", None)
    if original is None or getattr(original, "_sbnn_plain", False):
        return
    import torch
    from torch.utils._pytree import tree_map

    @functools.wraps(original)
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ours = _library_subclasses()

        def plain(x):
            return x.as_subclass(torch.Tensor) if type(x) in ours else x

        with torch._C.DisableTorchFunctionSubclass():  # (the first run only: no cost after)
            args, kwargs = tree_map(plain, (args, kwargs or {}))
        return original(self, func, tuple(t for t in types if t not in ours), args, kwargs)

    __torch_dispatch__._sbnn_plain = True
    mode_type.__torch_dispatch__ = __torch_dispatch__


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches the scheduler module right after it is first imported (by inductor's
    first compilation). Where the module's spec cannot be wrapped, the import proceeds
    as usual (and is not corrected)."""

    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
            else:
                return None
        except Exception:  # noqa: BLE001 (never break the import)
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _PatchingLoader(spec.loader)
        return spec


class _PatchingLoader(importlib.abc.Loader):
    """The module's own loader, patching the module after executing it."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):  # get_source, get_filename, ...: the loader's own
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _patch_scheduler(module)


#: Added to ``torch.compiler.config.cache_key_tag``: inductor's on-disk caches key on
#: PyTorch's sources, not on this correction, and would return kernels compiled without
#: it (by a process that did not import sbnn_addons, or an earlier version).
CACHE_TAG = "sbnn_addons:inductor-mutation-renames"


def install() -> None:
    """Apply the correction: at once where inductor's scheduler is loaded, else when it
    is first imported; and tag the compile caches. Idempotent."""
    import torch.compiler.config as compiler_config

    tag = compiler_config.cache_key_tag
    if CACHE_TAG not in tag:
        compiler_config.cache_key_tag = f"{tag},{CACHE_TAG}" if tag else CACHE_TAG
    wrappers = sys.modules.get(_RUNTIME_WRAPPERS)
    if wrappers is None:
        try:
            wrappers = importlib.import_module(_RUNTIME_WRAPPERS)
        except Exception:  # noqa: BLE001 (a PyTorch without it: nothing to correct)
            wrappers = None
    if wrappers is not None:
        _patch_custom_op_analysis(wrappers)
    module = sys.modules.get(_TARGET)
    if module is not None:
        _patch_scheduler(module)
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
