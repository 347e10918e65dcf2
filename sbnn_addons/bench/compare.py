"""``compare``: train your snnTorch / SpikingJelly model and its SBNN conversions side by side.

.. code-block:: python

    from sbnn_addons.bench import compare

    res = compare(make_net, (x_train, y_train), (x_test, y_test), layout="TB",
                  methods=["original", "sbnn-st", "sbnn-agr"], epochs=5, seeds=[0, 1, 2])
    print(res.table())            # the columns of results.csv, mean +- std over seeds
    res.save("runs/mine")         # results.csv, results.json, PNG plots, report.md

What is the same for every method (the protocol the report states):

* the initial weights (a factory is called under ``torch.manual_seed(seed)``; a module
  instance is deep-copied), the SBNN methods converting that same network with
  :func:`sbnn_addons.snntorch.to_sbnn` or :func:`sbnn_addons.spikingjelly.to_sbnn`;
* the data: the batch order of every epoch and the encoding's random draws come from
  generators seeded by ``(seed, epoch)`` only; the test inputs from one fixed generator;
* the recipe: Adam over :func:`sbnn_addons.param_groups` (weights ``lr``, noise scales
  ``noise_lr``) and a cosine decay, or your ``recipe``;
* the evaluation: ``mean`` mode (deterministic network, posterior-mean weights) for every
  method; ``sample`` (one stochastic pass) and ``mc(K)`` additionally for SBNN methods.

Timing: each method runs two warm-up training steps (its state restored afterwards) before
anything is timed; then the methods are interleaved epoch by epoch, the first method
rotating, each with its own random-number stream. Training and evaluation are timed
separately, per epoch.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import check_finite, check_flag
from ..losses import _discard_aux, sbnn_objective
from ..metrics import classification_metrics
from ..modes import mc_predict, mode
from ..moments import check_variance_flow
from ..optim import param_groups
from ..spike import SEED_LIMIT, IWSTSpike, check_seed, seed_spikes
from .data import DataSpec, fingerprint, prepare

__all__ = ["Method", "GENERIC_METHODS", "DEFAULT_METHODS", "compare", "resolve_methods",
           "default_recipe", "detect_host", "dist_info", "init_distributed"]


# --------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """A training method: the model's own surrogate (baseline) or an SBNN estimator.

    ``framework`` and ``surrogate`` and ``bn`` are read by factories that accept a
    ``method`` argument (the built-in tasks build the network the method names); for your
    own model the host library is detected and ``"original"`` keeps your surrogate.
    ``kl_weight > 0`` adds the KL term of :func:`sbnn_addons.sbnn_objective` (``N`` =
    training-set size); ``aux_weight > 0`` the bias-minimising auxiliary loss.
    """

    name: str
    surrogate: str = "atan"
    estimator: str | None = None  # None: baseline
    aux_weight: float = 0.0
    learn_std: bool = True
    framework: str = "snntorch"
    bn: bool = False
    kl_weight: float = 0.0
    help: str = ""

    @property
    def is_sbnn(self) -> bool:
        return self.estimator is not None

    @property
    def kind(self) -> str:
        return "ep" if self.framework == "ep" else ("sbnn" if self.is_sbnn else "baseline")


#: methods that apply to any model: its own surrogate and the SBNN conversions
GENERIC_METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("original", surrogate="own", framework="any",
               help="your model as given, trained with its own surrogate gradient"),
        Method("sbnn-st", estimator="st", help="SBNN, straight-through (IW-ST p=0)"),
        Method("sbnn-iwst", estimator="iwst(0.5)", help="SBNN, IW-ST p=0.5"),
        Method("sbnn-agr", estimator="agr", help="SBNN, AGR estimator"),
        Method("sbnn-agr-aux", estimator="agr", aux_weight=1e-4,
               help="SBNN AGR + bias-minimising aux loss"),
        Method("sbnn-agr-kl", estimator="agr", kl_weight=1.0,
               help="SBNN AGR + KL (sbnn_objective, kl_weight=1, N = train size)"),
        Method("sbnn-st-fixed-std", estimator="st", learn_std=False,
               help="SBNN ST with fixed (not learned) weight std"),
    )
}
DEFAULT_METHODS = ("original", "sbnn-st", "sbnn-agr")


def resolve_methods(methods: Sequence[str | Method],
                    known: dict[str, Method] | None = None) -> list[Method]:
    """:class:`Method` objects for names (``GENERIC_METHODS`` and ``known``) or objects."""
    table = {**GENERIC_METHODS, **(known or {})}
    if isinstance(methods, (str, Method)):  # one method (a string is not a list of names)
        methods = [methods]
    out = []
    for m in methods:
        if isinstance(m, Method):
            out.append(m)
        elif m in table:
            out.append(table[m])
        else:
            raise ValueError(f"unknown method {m!r}; choose from {sorted(table)} or pass a "
                             "sbnn_addons.bench.Method")
    if not out:
        raise ValueError("methods is empty")
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise ValueError(f"methods repeat a name: {names}")
    return out


# --------------------------------------------------------------------------- hosts
def detect_host(model: nn.Module) -> str | None:
    """``"snntorch"``, ``"spikingjelly"`` or ``None`` from the classes in ``model``."""
    hosts = set()
    for m in model.modules():
        mod = type(m).__module__
        for cls in type(m).__mro__:
            mod = cls.__module__
            if mod.startswith("snntorch"):
                hosts.add("snntorch")
            elif mod.startswith("spikingjelly"):
                hosts.add("spikingjelly")
    if len(hosts) > 1:
        raise ValueError("the model mixes snnTorch and SpikingJelly modules; convert it by hand")
    return hosts.pop() if hosts else None


def _step_style(model: nn.Module, host: str | None, step: bool | None = None) -> bool:
    """Whether the model runs one time step per call (time loop outside the model).

    From the model where it tells: an ``nn.Sequential`` with snnTorch ``init_hidden=True``
    neurons or a single-step SpikingJelly model steps once per call, a multi-step
    SpikingJelly model takes the sequence. ``step`` decides for a model with a ``forward``
    of its own and ``init_hidden`` (snnTorch) or single-step (SpikingJelly) neurons, and
    must agree with the model elsewhere.

    Raises:
        ValueError: such a model without ``step``, or a ``step`` the model contradicts;
            an ``nn.Sequential`` with snnTorch neurons without ``init_hidden=True``.
    """
    detected: bool | None = False
    if host == "snntorch":
        stateless = [n for n, m in model.named_modules()
                     if type(m).__module__.startswith("snntorch")
                     and getattr(m, "init_hidden", None) is False]
        if stateless and isinstance(model, nn.Sequential):
            raise ValueError(
                f"the nn.Sequential holds snnTorch neurons without init_hidden=True "
                f"({stateless[:6]}): such a neuron keeps no state between calls and returns "
                "(spk, mem), so a Sequential cannot run it over time (it would take the "
                "whole sequence as one step). Build them with init_hidden=True (the "
                "harness then calls the model once per time step), or write a forward "
                "that loops over time")
        hidden = any(getattr(m, "init_hidden", False) for m in model.modules())
        detected = None if hidden and not isinstance(model, nn.Sequential) else hidden
    elif host == "spikingjelly":
        modes = _sj_step_modes(model)
        single = set(modes.values()) == {"s"}
        # a forward of its own may loop over time itself, with single-step neurons
        own = (not isinstance(model, nn.Sequential)
               and not type(model).__module__.startswith("spikingjelly"))
        detected = None if single and own else single
    if detected is None:
        if step is None:
            what = ("snnTorch init_hidden=True neurons" if host == "snntorch" else
                    "single-step SpikingJelly neurons")
            raise ValueError(
                f"{type(model).__name__} holds {what} and has a "
                "forward of its own: say whether it takes one time step per call (step=True, "
                "the harness loops over time) or the whole sequence [T, B, ...] (step=False; "
                "sbnn-bench: --step / --sequence)"
            )
        return bool(step)
    if step is not None and bool(step) != detected and host is not None:
        what = ("takes one time step per call (an nn.Sequential with init_hidden=True "
                "neurons, or SpikingJelly single-step)" if detected else
                "takes the whole sequence (SpikingJelly multi-step, or no per-step state)")
        raise ValueError(f"step={bool(step)} contradicts the model, which {what}; leave "
                         "step unset (its calls are detected) or change the model")
    return detected if step is None else bool(step)


def _sj_step_modes(model: nn.Module) -> dict[str, str]:
    """``{name: "s" | "m"}`` of a SpikingJelly model's step modules, as they are called.

    The modules inside a container that runs them over time (``SeqToANNContainer``,
    ``MultiStepContainer``, ...) count as the container, which is multi-step (and has no
    ``step_mode``); a ``StepModeContainer`` counts with its own mode.

    Raises:
        ValueError: a single-step neuron in a multi-step network (one left out of
            ``set_step_mode``): it would take the whole sequence as one step.
    """
    from spikingjelly.activation_based import base

    modes: dict[str, str] = {}
    inside: set[int] = set()
    for name, m in model.named_modules():
        if id(m) in inside or not isinstance(m, base.StepModule):
            continue
        mode_ = getattr(m, "step_mode", "m")  # the sequence containers: always multi-step
        modes[name] = mode_
        if type(m).__module__.startswith("spikingjelly") and "Container" in type(m).__name__:
            inside |= {id(sub) for sub in m.modules() if sub is not m}
    single = [n for n, m in model.named_modules()
              if n in modes and modes[n] == "s" and isinstance(m, base.MemoryModule)]
    if single and "m" in modes.values():
        raise ValueError(
            f"the SpikingJelly network is multi-step but its neurons {single[:6]} are "
            "single-step: they would take the whole [T, B, ...] sequence as one step. Call "
            "functional.set_step_mode(net, 'm') after the network is complete (or build "
            "every module with step_mode='m')")
    return modes


def _reset(model: nn.Module, host: str | None, converted: bool) -> None:
    """Reset the neuron states with the host's utilities (and the SBNN caches)."""
    if host == "snntorch":
        from snntorch import utils

        utils.reset(model)
        from ..snntorch import reset  # walks the tree: copies too, and the spike caches

        reset(model)
    elif host == "spikingjelly":
        from spikingjelly.activation_based import functional

        if converted:
            functional.invalidate_reset_cache(model)
        functional.reset_net(model)


def describe_surrogate(model: nn.Module) -> str:
    """Short name of the spike function of the model's neurons (for the report)."""
    names = []
    for m in model.modules():
        if isinstance(m, IWSTSpike):
            names.append(f"IW-ST {m.estimator}" if hasattr(m, "estimator") else "IW-ST")
            continue
        sg = getattr(m, "spike_grad", None) or getattr(m, "surrogate_function", None)
        if sg is None:
            continue
        if isinstance(sg, IWSTSpike):
            names.append("IW-ST")
            continue
        qualname = getattr(sg, "__qualname__", None) or getattr(
            getattr(sg, "__func__", None), "__qualname__", None)
        if qualname and ".<locals>." in qualname:  # a factory's closure: atan().<inner>
            name = qualname.split(".<locals>.")[0]
        else:
            name = getattr(sg, "__name__", None) or type(sg).__name__
        if name == "function" or name.startswith("<"):
            name = "surrogate"
        names.append(name)
    uniq = sorted(set(names))
    return ", ".join(uniq) if uniq else "-"


class _Forward:
    """Model input ``[T, B, ...]`` -> logits ``[B, C]`` for any call style.

    Step models (snnTorch ``init_hidden=True``, SpikingJelly single-step) are called once
    per step; sequence models once. Tuple outputs ``(spk, mem)`` keep the first item; a
    ``[T, B, C]`` output is averaged over time (the default ``readout``).

    The model's input is time-major ``[T, B, ...]`` whatever the data layout (``"BT"``
    batches are transposed before the call), or ``[B, ...]`` without a time axis
    (``time_axis=False``: static data without an ``encode`` that adds one). A 3-d output
    is read the same way, time first: ``[T, B, C]``, checked against the batch size (see
    :func:`_to_logits`); ``last_shape`` keeps the shape of the last output before the
    reduction (``None`` with a ``readout``).
    """

    def __init__(self, model: nn.Module, host: str | None, converted: bool, step: bool,
                 readout: Callable | None, caller: nn.Module | None = None,
                 time_axis: bool = True) -> None:
        self.model, self.host, self.converted, self.step = model, host, converted, step
        self.readout = readout
        self.caller = caller if caller is not None else model
        self.time_axis = time_axis
        self.last_shape: tuple[int, ...] | None = None
        # the dtype of the model's floating-point parameters (None: none)
        self.dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()),
                          None)

    def __call__(self, x: Tensor) -> Tensor:
        _reset(self.model, self.host, self.converted)
        if self.dtype is not None and x.is_floating_point() and x.dtype != self.dtype:
            x = x.to(self.dtype)  # a float64 model gets float64 input
        batch = int(x.shape[1] if self.time_axis else x.shape[0])
        self.last_shape = None
        if self.step:
            out = [self.caller(x[t]) for t in range(x.shape[0])]
            if self.readout is not None:
                return _check_readout(self.readout(out), batch)
            out = torch.stack([_main_output(o) for o in out])
        else:
            out = self.caller(x)
            if self.readout is not None:
                return _check_readout(self.readout(out), batch)
            out = _main_output(out)
        self.last_shape = tuple(out.shape)
        if (not self.time_axis and out.dim() == 3 and x.dim() >= 3
                and tuple(out.shape[:2]) == tuple(x.shape[:2]) and out.shape[1] != batch):
            # [B, T, C] out of a stored [B, T, ...]: a time axis the layout did not declare
            raise ValueError(
                f"the model returned {list(out.shape)} for the input {list(x.shape)}, which "
                "it received as stored ([B, ...], layout='static' without an encode hook): "
                "a sequence output from data without a time axis. If the samples have a "
                "time axis, pass layout='BT' (batch-major [N, T, ...], e.g. a DataLoader's) "
                "or 'TB' (time-major [T, N, ...]); otherwise return logits [B, C] or pass "
                "readout=")
        return _to_logits(out, batch)


def _check_readout(logits, batch: int) -> Tensor:
    """The ``readout``'s result, checked to be logits ``[B, C]`` for ``batch`` samples."""
    if not isinstance(logits, Tensor) or logits.dim() != 2 or int(logits.shape[0]) != batch:
        got = (f"shape {list(logits.shape)}" if isinstance(logits, Tensor)
               else type(logits).__name__)
        raise ValueError(
            f"readout returned {got} for a batch of {batch} samples; it must return logits "
            f"[B, C] = [{batch}, C] (a step model's readout gets the list of its per-step "
            "outputs: e.g. readout=lambda outs: torch.stack(outs).mean(0))")
    return logits


def _describe(value) -> str:
    """``Tensor[2, 3]``, ``dict``, ...: a short description of an output item."""
    if isinstance(value, Tensor):
        return f"Tensor{list(value.shape)}"
    return type(value).__name__


def _main_output(out) -> Tensor:
    """The tensor of a model's return value that holds the logits (or spikes).

    A tensor as it is; a tuple / list of tensors read as snnTorch's ``(spk, mem)`` (or
    ``(spk, syn, mem)`` and the like: every item of the first one's shape) gives its first
    item.

    Raises:
        TypeError: a dict, or a tuple that is not of these forms (the harness cannot
            tell which item holds the logits); the message names ``readout=``.
    """
    if isinstance(out, Tensor):
        return out
    fix = ("return the logits as a tensor ([B, C] or time-major [T, B, C]), or pass "
           "compare(..., readout=fn) with fn(output) -> logits [B, C] (sbnn-bench: wrap "
           "the model so that it returns the logits)")
    if isinstance(out, dict):
        key = next(iter(out), "logits")
        raise TypeError(
            f"the model returned a dict (keys {list(out)[:6]}); the harness needs a tensor "
            f"of logits or snnTorch's (spk, mem) tuple: {fix}, e.g. readout=lambda out: "
            f"out[{key!r}] (add .mean(0) for [T, B, C])")
    if isinstance(out, (tuple, list)):
        tensors = len(out) >= 2 and all(isinstance(o, Tensor) for o in out)
        if tensors and (len(out) == 2 or all(o.shape == out[0].shape for o in out[1:])):
            return out[0]
        items = ", ".join(_describe(o) for o in out[:6])
        raise TypeError(
            f"the model returned a {type(out).__name__} of {len(out)} items ({items}); a "
            "tuple is read as snnTorch's (spk, mem) (two tensors, or more of one shape, "
            f"such as (spk, syn, mem)) and its first item used: {fix}")
    raise TypeError(f"the model returned {type(out).__name__}; {fix}")


def _to_logits(out: Tensor, batch: int) -> Tensor:
    """Logits ``[B, C]`` from a model output ``[B, C]`` or time-major ``[T, B, C]``.

    The time axis is the first, as in the model's input (the declared layout only says how
    the data is stored; the model always receives ``[T, B, ...]``); the batch axis is
    checked against ``batch``. With ``T == B`` the shape cannot tell, and the output is
    read time-major; :func:`_probe_output` checks that once per run on a batch whose size
    differs from ``T``.

    Raises:
        ValueError: a batch-first ``[B, T, C]`` output, or any other shape.
    """
    shape = tuple(out.shape)
    if out.dim() == 3 and shape[1] == batch:
        return out.mean(0)
    if out.dim() == 2 and shape[0] == batch:
        return out
    if out.dim() == 3 and shape[0] == batch:
        raise ValueError(
            f"the model returned an output of shape {list(shape)} for a batch of {batch} "
            f"samples: batch first [B, T, C]. The harness gives the model time-major input "
            "[T, B, ...] (layout 'TB' as stored, 'BT' transposed per batch) and averages a "
            "3-d output over its first axis, time; return time-major [T, B, C] (e.g. "
            "torch.stack(outputs, dim=0)), logits [B, C], or pass readout=lambda out: "
            "out.mean(1)")
    raise ValueError(
        f"the model returned an output of shape {list(shape)} for a batch of {batch} "
        f"samples; expected logits [B, C] = [{batch}, C] or time-major [T, B, C] = "
        f"[T, {batch}, C] (averaged over T). Return one of these, or pass readout= (a "
        "function of the model's output that returns [B, C])")


# --------------------------------------------------------------------------- recipe
Recipe = Callable[[nn.Module, int, int], tuple]


def default_recipe(lr: float = 5e-3, noise_lr: float | None = 5e-2) -> Recipe:
    """Adam over :func:`sbnn_addons.param_groups` and a cosine decay stepped per batch.

    Returns:
        ``recipe(model, epochs, steps_per_epoch) -> (optimizer, scheduler, "batch")``, the
        form :func:`compare` takes (the third item is ``"batch"`` or ``"epoch"``: when the
        scheduler steps).
    """

    def recipe(model: nn.Module, epochs: int, steps_per_epoch: int):
        opt = torch.optim.Adam(param_groups(model, lr=lr, noise_lr=noise_lr))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=max(epochs * steps_per_epoch, 1))
        return opt, sched, "batch"

    return recipe


def _check_recipe(out, run: _Run) -> tuple:
    """``(optimizer, scheduler, interval)`` from what a recipe returned, checked.

    Raises:
        TypeError: not a 3-tuple with an optimiser first.
        ValueError: an interval other than ``"batch"`` / ``"epoch"``, or an optimiser over
            parameters that are not the run's model's (one captured from outside the
            recipe: the run's model would not train, its flat loss and times reported).
    """
    form = "(optimizer, scheduler or None, 'batch' | 'epoch')"
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        got = (f"a {type(out).__name__} of {len(out)} items"
               if isinstance(out, (tuple, list)) else type(out).__name__)
        raise TypeError(f"recipe(model, epochs, steps_per_epoch) must return {form}, got "
                        f"{got}")
    opt, sched, interval = out
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"recipe must return {form}; its first item is "
                        f"{type(opt).__name__}, not a torch.optim.Optimizer")
    if interval not in ("batch", "epoch"):
        raise ValueError(f"recipe must return 'batch' or 'epoch' as third item, "
                         f"got {interval!r}")
    own = {id(p) for p in run.model.parameters()}
    params = [p for g in opt.param_groups for p in g["params"]]
    foreign = sum(id(p) not in own for p in params)
    if foreign or not params:
        raise ValueError(
            f"{run.method.name}: the recipe's optimiser holds {foreign} of {len(params)} "
            "parameters that are not the model's it was given (e.g. the parameters of a "
            "network captured outside the recipe), so this model would not train: build "
            "the optimiser from the recipe's model argument, e.g. "
            "torch.optim.Adam(model.parameters()); every method converts and trains a "
            "model of its own")
    return opt, sched, interval


# --------------------------------------------------------------------------- distributed
def dist_info() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment (``1`` process if unset)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def init_distributed(device: str = "auto") -> tuple[int, int, torch.device]:
    """Initialise the process group when launched by ``torchrun`` (``WORLD_SIZE > 1``).

    Backend ``nccl`` when the run uses CUDA, ``gloo`` otherwise. Returns ``(rank, world,
    device)``; a single process returns ``(0, 1, device)`` without a process group.
    """
    rank, world, local = dist_info()
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device(f"cuda:{local % max(torch.cuda.device_count(), 1)}" if use_cuda
                       else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, dev


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _forward_params(output: Tensor) -> set[int]:
    """``id`` of every leaf tensor that ``output``'s autograd graph accumulates into."""
    seen, found, stack = set(), set(), [output.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None:
            found.add(id(var))
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return found


def _wrap_ddp(model: nn.Module, forward: _Forward, device: torch.device, probe: Tensor,
              find_unused: bool):
    """Wrap ``model`` in ``DistributedDataParallel``; returns ``(ddp, ignored_params)``.

    Parameters outside the forward graph (e.g. the posterior std of a readout layer whose
    variance no neuron consumes) are found with one probe forward and left out of DDP;
    :func:`_sync_ignored` all-reduces their gradients. Buffers are not synchronised
    (neuron states change shape with the batch; BatchNorm statistics stay per process).
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    ignored: list[tuple[str, Tensor]] = []
    if not find_unused:
        with torch.enable_grad():
            used = _forward_params(forward(probe))
        _discard_aux(model)  # the aux terms the probe collected
        ignored = [(n, p) for n, p in model.named_parameters()
                   if p.requires_grad and id(p) not in used]
        DDP._set_params_and_buffers_to_ignore_for_model(model, [n for n, _ in ignored])
    kwargs = {"find_unused_parameters": find_unused}
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        kwargs["forward_sync_buffers"] = False
    else:  # pragma: no cover - older torch
        kwargs["broadcast_buffers"] = False
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **kwargs)
    return ddp, [p for _, p in ignored]


def _sync_ignored(params: list[Tensor]) -> None:
    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)


def _check_in_sync(model: nn.Module) -> None:
    with torch.no_grad():
        total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    hi, lo = total.clone().reshape(1), total.clone().reshape(1)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    if not torch.isclose(hi, lo, rtol=1e-9, atol=1e-9).all():
        raise RuntimeError(f"parameters differ across processes after training ({hi} vs {lo})")


# --------------------------------------------------------------------------- one run
@dataclass
class _Run:
    method: Method
    seed: int
    model: nn.Module
    forward: _Forward
    host: str | None
    surrogate: str
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object | None = None
    interval: str = "batch"
    ignored: list = field(default_factory=list)
    rng: Tensor | None = None
    cuda_rng: Tensor | None = None
    curve: list = field(default_factory=list)
    train_times: list = field(default_factory=list)
    eval_times: list = field(default_factory=list)
    orders: list = field(default_factory=list)
    init_sig: Tensor | None = None  # _param_signature before training


def _param_signature(model: nn.Module) -> Tensor:
    """Per-parameter sum and sum of squares (float64, CPU): whether training changed any."""
    with torch.no_grad():
        parts = [torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                 for p in model.parameters()]
    return torch.cat(parts).cpu() if parts else torch.zeros(0, dtype=torch.float64)


def _mix(*xs: int) -> int:
    """A seed from several integers (stable, in [0, 2**62))."""
    h = 1469598103934665603
    for x in xs:
        h = ((h ^ (int(x) & 0xFFFFFFFFFFFF)) * 1099511628211) % (2**62)
    return h


def _seed_spikes(model: nn.Module, seed: int) -> None:
    """:func:`~sbnn_addons.seed_spikes` where ``model`` has spike functions to seed (a
    baseline's surrogate spikes draw nothing), with the low 32 bits of ``seed`` (those
    it honours)."""
    if any(isinstance(m, IWSTSpike) for m in model.modules()):
        seed_spikes(model, seed & (SEED_LIMIT - 1))


def _make_model(model, method: Method, seed: int, reinit: bool,
                made: list | None = None) -> nn.Module:
    torch.manual_seed(seed)
    if isinstance(model, nn.Module):
        _refuse_prebuilt_sbnn(model)
        net = copy.deepcopy(model)
        if reinit:
            for m in net.modules():
                fn = getattr(m, "reset_parameters", None)
                if callable(fn) and m is not net:
                    fn()
        return net
    if not callable(model):
        raise TypeError(f"model must be an nn.Module or a factory, got {type(model).__name__}")
    try:
        accepts = "method" in inspect.signature(model).parameters
    except (TypeError, ValueError):
        accepts = False
    net = model(method=method) if accepts else model()
    if not isinstance(net, nn.Module):
        raise TypeError(f"the factory returned {type(net).__name__}, not an nn.Module")
    if made is not None:
        if any(net is other for other in made):
            raise ValueError(
                "the factory returned a model it returned before: every method and seed "
                "must train a model of its own (the methods would train, convert and score "
                "one shared model); build a new model in each call, e.g. "
                "lambda: copy.deepcopy(net), or pass the nn.Module itself as model=")
        made.append(net)
    if not accepts:
        _refuse_prebuilt_sbnn(net)
    return net


def _refuse_prebuilt_sbnn(net: nn.Module) -> None:
    """A model that is an SBNN already (IWSTSpike spike functions), from a factory that does
    not take ``method=``: every method would train and score that one model as it is (the
    estimators, auxiliary losses and the surrogate baseline all ignored)."""
    if any(isinstance(m, IWSTSpike) for m in net.modules()):
        raise ValueError(
            "the model already contains sbnn_addons spike functions (IWSTSpike), so the "
            "methods cannot change it: give a snnTorch / SpikingJelly model with its own "
            "surrogates (each SBNN method converts it), or a factory taking `method=` that "
            "builds the model for `method.estimator` (see sbnn_addons.bench.Method)")


def _convert(net: nn.Module, method: Method, host: str | None, sbnn_kwargs: dict,
             aux_all: bool = False):
    if any(isinstance(m, IWSTSpike) for m in net.modules()):
        return net  # the factory built the SBNN model itself (e.g. a reference network)
    kwargs = {"estimator": method.estimator, "learn_std": method.learn_std,
              "aux_loss": method.aux_weight > 0 or aux_all, "inplace": True, **sbnn_kwargs}
    if host == "snntorch":
        from ..snntorch import to_sbnn
    elif host == "spikingjelly":
        from ..spikingjelly import to_sbnn
    else:
        raise ValueError(f"method {method.name!r} converts snnTorch or SpikingJelly models; "
                         "this model has neither (no snnTorch / SpikingJelly neuron found)")
    return to_sbnn(net, **kwargs)


def _fork_rng(run: _Run, device: torch.device) -> None:
    torch.set_rng_state(run.rng)
    if device.type == "cuda" and run.cuda_rng is not None:
        torch.cuda.set_rng_state(run.cuda_rng, device)


def _save_rng(run: _Run, device: torch.device) -> None:
    run.rng = torch.get_rng_state()
    if device.type == "cuda":
        run.cuda_rng = torch.cuda.get_rng_state(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- compare
def compare(
    model: nn.Module | Callable[..., nn.Module],
    train_data,
    test_data,
    *,
    methods: Sequence[str | Method] = DEFAULT_METHODS,
    epochs: int = 5,
    seeds: Sequence[int] = (0,),
    batch_size: int = 64,
    lr: float = 5e-3,
    noise_lr: float | None = 5e-2,
    layout: str = "TB",
    step: bool | None = None,
    encode: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    readout: Callable | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    mc_samples: int = 10,
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
    subset_seed: int = 0,
    num_classes: int | None = None,
    recipe: Recipe | None = None,
    sbnn_kwargs: dict | None = None,
    aux_weight: float | None = None,
    aux_reduction: str = "mean",
    aux_all: bool = False,
    interleave: bool = True,
    warmup: bool = True,
    reinit: bool = False,
    device: str | torch.device = "cpu",
    task: str = "custom",
    eval_batch_size: int = 256,
    known_methods: dict[str, Method] | None = None,
    find_unused_parameters: bool = False,
    progress: Callable[[int], object] | None = None,
    command: str | None = None,
    keep_models: bool = False,
):
    """Train ``model`` with its own surrogate and as SBNN conversions, on identical terms.

    Args:
        model: an snnTorch or SpikingJelly ``nn.Module`` (deep-copied per run), or a factory
            ``() -> nn.Module`` called under ``torch.manual_seed(seed)`` (a factory with a
            ``method`` parameter gets the :class:`Method`, as the built-in tasks do).
        train_data: ``(x, y)`` tensors, a ``TensorDataset`` or a re-iterable ``DataLoader``
            of ``(x, y)`` batches.
        test_data: the same for evaluation (a loader must not shuffle).
        methods: names from :data:`GENERIC_METHODS` (``"original"``, ``"sbnn-st"``,
            ``"sbnn-agr"``, ...) or :class:`Method` objects.
        epochs: passes over the training data (``>= 1``).
        seeds: one run per method and seed; the table shows mean +- std over seeds.
        batch_size: training batch size for tensor data (loaders keep theirs).
        lr: learning rate of the weights (:func:`default_recipe`).
        noise_lr: learning rate of the SBNN noise scales (``None``: ``lr``, the
            :func:`~sbnn_addons.param_groups` default).
        layout: where the samples are: ``"TB"`` (time-major ``x [T, N, ...]``, batches go to
            the model as ``[T, B, ...]``), ``"BT"`` (batch-major ``[N, T, ...]``, transposed
            to ``[T, B, ...]`` per batch) or ``"static"`` (``[N, ...]``, no time axis;
            ``encode`` adds it).
        step: whether the model takes one time step per call (``True``: the harness
            loops over time and calls it with ``x[t]``) or the whole sequence (``False``).
            Default: an ``nn.Sequential`` with snnTorch ``init_hidden=True`` neurons or a
            single-step SpikingJelly model steps; a model with its own ``forward`` and
            ``init_hidden`` neurons must say.
        encode: ``encode(x, generator) -> model input`` per batch, after the transposition
            (e.g. a rate code), time-major ``[T, B, ...]``; ``generator`` is seeded
            identically for every method, and the hook must draw from it only (one that
            draws from the global RNG raises: the methods would see other inputs).
        readout: ``readout(output) -> logits [B, C]``; ``output`` is the model's return
            value (sequence models) or the list of per-step returns (step models). Default:
            first item of a tuple, mean over time of a ``[T, B, C]`` output (time first,
            as in the model's input, whatever ``layout``; a batch-first ``[B, T, C]``
            output raises before training, also when ``B == T``).
        loss_fn: ``loss_fn(logits, y)`` (default cross-entropy); SBNN methods add their
            objective's terms (:func:`sbnn_addons.sbnn_objective`).
        mc_samples: ``K`` of the ``mc(K)`` evaluation.
        max_train_samples: a stratified, seeded subset of the training tensors.
        max_test_samples: the same for the test tensors.
        subset_seed: seed of those subsets (the same for every method and seed).
        num_classes: classes of the task; a training set (or subset) with fewer raises,
            and so does a model with fewer outputs (checked, as are the labels, on one
            forward before training; a loader's labels per batch).
        recipe: ``recipe(model, epochs, steps_per_epoch) -> (optimizer, scheduler or None,
            "batch" | "epoch")``; default :func:`default_recipe` ``(lr, noise_lr)``.
        sbnn_kwargs: extra arguments of ``to_sbnn`` (``std``, ``std_mode``, ...); without
            ``include`` / ``exclude`` here, the readouts (layers whose noise reaches the
            output without a spiking neuron) are excluded, as in the released configuration.
        aux_weight: weight of the aux loss for methods that use it (default: the method's).
        aux_reduction: ``"mean"`` (scale-free, default) or ``"sum"`` (the paper's form,
            with its tiny weights), see :func:`sbnn_addons.aux_loss`.
        aux_all: every SBNN method uses the aux loss with ``aux_weight`` (the paper
            preset), not only the methods that name one.
        interleave: train the methods epoch by epoch in turn (``False``: one after the
            other, each after its own warm-up).
        warmup: two untimed training steps per method before timing (state restored).
        reinit: re-initialise a module instance per seed (``reset_parameters`` under
            ``torch.manual_seed(seed)``; parameters of modules without one keep their
            values). Default ``False``: every seed starts from the module's own weights
            (the seeds then vary the data order and the noise, not the initialisation;
            pass a factory to vary that too).
        device: ``"cpu"``, ``"cuda"``, ... .
        task: name of the task in the outputs.
        eval_batch_size: batch size of the evaluation passes (tensor data).
        known_methods: extra method names (the built-in tasks' baselines).
        find_unused_parameters: passed to ``DistributedDataParallel`` under ``torchrun``.
        progress: ``progress(total_epochs)`` returns a bar with ``update(n)`` / ``close()``.
        command: the command line to record in the report.
        keep_models: keep the trained models in the rows (``"_model"``).

    Returns:
        :class:`sbnn_addons.bench.BenchResults`: ``rows`` (one per method and seed, the
        CSV columns plus ``curve`` and per-sample ``_probs`` / ``_targets``), ``table()``,
        ``curves()``, ``predictions()``, ``save(out_dir)``.

    Raises:
        ValueError: unknown methods, bad layout, a subset or training set that lacks
            classes, a shuffling test loader, data order that differs between methods, a
            diverged run (a NaN / inf training loss or parameters, or NaN outputs in
            evaluation), named with its method and seed (and epoch).
    """
    from .results import BenchResults

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be an integer >= 1, got {mc_samples!r}")
    if isinstance(seeds, (int, str)) or not isinstance(seeds, Iterable):
        raise TypeError(f"seeds must be a sequence of integers (e.g. seeds=(0, 1, 2)), got "
                        f"{seeds!r}")
    seeds = [check_seed(s, "every seed") for s in seeds]  # 1.5 was truncated to 1
    if None in seeds:
        raise TypeError(f"every seed must be an integer, got {seeds!r}")
    if not seeds:
        raise ValueError("seeds is empty")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}: a repeated seed repeats the "
                         "same run and would understate the spread over seeds")
    if step is not None and not isinstance(step, bool):
        raise TypeError(f"step must be True, False or None (detected), got {step!r}")
    for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    for name, value in (("max_train_samples", max_train_samples),
                        ("max_test_samples", max_test_samples)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"{name} must be an integer >= 1 or None (all samples), got "
                             f"{value!r}")
    if recipe is None:  # the default recipe's learning rates (a recipe of yours sets its own)
        for name, value, what in (("lr", lr, "weights"), ("noise_lr", noise_lr,
                                                            "SBNN noise scales")):
            if name == "noise_lr" and value is None:
                continue  # noise_lr = lr
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    0 < value < math.inf):
                raise ValueError(
                    f"{name} must be a finite number > 0 (the Adam learning rate of the "
                    f"{what}), got {value!r}; the default is "
                    f"{5e-3 if name == 'lr' else 5e-2}. To keep parameters fixed, pass "
                    "recipe= with an optimiser of your own")
    if num_classes is not None and (isinstance(num_classes, bool)
                                    or not isinstance(num_classes, int) or num_classes < 2):
        raise ValueError(f"num_classes must be an integer >= 2 (the task's classes) or None "
                         f"(from the labels), got {num_classes!r}")
    if aux_all and aux_weight is None:
        raise ValueError("aux_all=True needs aux_weight= (the weight of the auxiliary loss "
                         "every SBNN method then adds, e.g. 1e-4); without it no method "
                         "would use the auxiliary loss")
    meths = resolve_methods(methods, known_methods)
    device = torch.device(device)
    rank, world = _world()
    train = DataSpec.from_any(train_data, layout, "train_data")
    test = DataSpec.from_any(test_data, layout, "test_data")
    if not test.is_tensor and test.shuffles:
        raise ValueError("test_data: the DataLoader shuffles (shuffle=True or a random "
                         "sampler); the evaluation needs a fixed order (the per-sample "
                         "predictions are matched across methods): use shuffle=False")
    if not test.is_tensor and getattr(test.loader, "drop_last", False):
        raise ValueError("test_data: the DataLoader has drop_last=True, which leaves the "
                         "last test samples out of every metric (and the reported test "
                         "size); use drop_last=False for evaluation")
    train = train.subset(max_train_samples, subset_seed, "train subset", num_classes)
    test = test.subset(max_test_samples, subset_seed + 1, "test subset", num_classes)
    data_warnings = []
    if train.is_tensor and test.is_tensor:
        data_warnings.append(_check_train_classes(train.y, test.y, num_classes))
    if world > 1 and not train.is_tensor:
        raise ValueError("under torchrun pass tensors (the harness shards them); a DataLoader "
                         "would be read in full by every process")
    loss_fn = loss_fn or F.cross_entropy
    recipe = recipe or default_recipe(lr, noise_lr)
    sbnn_kwargs = dict(sbnn_kwargs or {})
    # never from len(seeds): a seed's run must not depend on the others
    reinit = check_flag("reinit", reinit)
    n_train = len(train)
    steps_per_epoch = (math.ceil(math.ceil(n_train / world) / batch_size) if train.is_tensor
                       else max(len(train.loader), 1))
    reported_batch_size: int | None = batch_size
    if not train.is_tensor:  # what the model is trained on: the loader's (None: unknown)
        own = getattr(train.loader, "batch_size", None) or getattr(
            getattr(train.loader, "batch_sampler", None), "batch_size", None)
        reported_batch_size = int(own) if isinstance(own, int) and own > 0 else None
        batch_size = reported_batch_size or batch_size
    bar = progress(epochs * len(meths) * len(seeds)) if progress else None
    ctx = _Ctx(train, test, layout=train.layout, encode=encode, device=device,
               batch_size=batch_size, eval_batch_size=eval_batch_size, loss_fn=loss_fn,
               n_train=n_train, rank=rank, world=world, aux_weight=aux_weight,
               aux_reduction=aux_reduction, aux_all=aux_all and bool(aux_weight), step=step,
               time_axis=_input_has_time_axis(train, encode), num_classes=num_classes)
    _check_encode_replays(ctx)
    rows: list[dict] = []
    num_steps = None
    try:
        for seed in seeds:
            runs = []
            for m in meths:
                run = _build_run(model, m, seed, reinit, readout, sbnn_kwargs, ctx,
                                 find_unused_parameters)
                run.optimizer, run.scheduler, run.interval = _check_recipe(
                    recipe(run.model, epochs, steps_per_epoch), run)
                run.init_sig = _param_signature(run.model)
                # every run gets the same random-number stream of its own
                torch.manual_seed(_mix(seed, 99, rank))
                _save_rng(run, device)
                runs.append(run)
            schedule = _schedule(runs, epochs, interleave)
            for run, epoch in schedule:
                if epoch == 0:
                    if warmup:
                        _warmup(run, ctx)
                    _seed_spikes(run.model, _mix(seed, 7919, rank))
                _train_epoch(run, ctx, epoch)
                if bar is not None:
                    bar.update(1)
                # the same order as a method that trained this epoch already: stop at once
                ref = next((r for r in runs if r is not run and len(r.orders) > epoch), None)
                if ref is not None and ref.orders[epoch] != run.orders[epoch]:
                    _check_same_order([ref, run])
            for run in runs:
                if world > 1:
                    _check_in_sync(run.model)
                row, num_steps = _final_eval(run, ctx, mc_samples, task, epochs,
                                             reported_batch_size)
                if keep_models:
                    row["_model"] = run.model
                rows.append(row)
            _check_same_order(runs)
    finally:
        if bar is not None:
            bar.close()
    meta = {"task": task, "epochs": epochs, "seeds": seeds, "methods": [m.name for m in meths],
            "mc_samples": mc_samples, "batch_size": reported_batch_size, "layout": train.layout,
            "num_steps": num_steps, "train_samples": n_train, "test_samples": len(test),
            "max_train_samples": max_train_samples, "max_test_samples": max_test_samples,
            "subset_seed": subset_seed, "interleaved": interleave, "warmup": warmup,
            "device": str(device), "world_size": world, "command": command,
            "data_order": "identical for every method (checked)",
            "init": ("factory under torch.manual_seed(seed)" if not isinstance(model, nn.Module)
                     else "reset_parameters under torch.manual_seed(seed)" if reinit
                     else "the weights of the module passed, for every seed"),
            "data_warnings": [w for w in data_warnings if w]}
    return BenchResults(rows, meta)


@dataclass
class _Ctx:
    train: DataSpec
    test: DataSpec
    layout: str
    encode: Callable | None
    device: torch.device
    batch_size: int
    eval_batch_size: int
    loss_fn: Callable
    n_train: int
    rank: int
    world: int
    aux_weight: float | None
    aux_reduction: str = "mean"
    aux_all: bool = False
    step: bool | None = None
    made: list = field(default_factory=list)  # the models a factory returned (kept alive)
    time_axis: bool = True  # the model's input is [T, B, ...] (else [B, ...])
    num_classes: int | None = None
    #: results of the probes, per model structure (they cannot differ between seeds)
    probes: dict = field(default_factory=dict)


def _check_train_classes(ytr: Tensor, yte: Tensor, num_classes: int | None) -> str | None:
    """Raise for a single-class training set; a warning text when it lacks classes."""
    have, tested = set(ytr.unique().tolist()), set(yte.unique().tolist())
    if num_classes and max(have | tested) >= num_classes:
        raise ValueError(
            f"labels must be class indices in [0, {num_classes}) for num_classes="
            f"{num_classes}, got up to {max(have | tested)} (labels counted from 1? "
            "subtract 1)")
    want = tested | (set(range(num_classes)) if num_classes else set())
    if len(have) < 2:
        raise ValueError(
            f"the training data has {len(have)} class ({sorted(have)}): a model trained on it "
            "only learns the class shares. Use a stratified subset "
            "(sbnn_addons.bench.stratified_subset) or more data")
    missing = sorted(want - have)
    if not missing:
        return None
    msg = (f"the training data lacks {len(missing)} of the task's {len(want)} classes "
           f"({missing[:10]}{' ...' if len(missing) > 10 else ''}): test samples of those "
           "classes cannot be learned")
    warnings.warn(msg, stacklevel=3)
    return msg


def _build_run(model, method: Method, seed: int, reinit: bool, readout, sbnn_kwargs: dict,
               ctx: _Ctx, find_unused: bool) -> _Run:
    if method.kind == "ep":
        raise ValueError(f"method {method.name!r} runs through the built-in tasks only")
    net = _make_model(model, method, seed, reinit, ctx.made)
    host = detect_host(net)
    own = describe_surrogate(net)
    structure = _structure(net)
    if method.is_sbnn:
        sbnn_kwargs = _readouts_excluded(net, method, host, sbnn_kwargs, ctx, readout,
                                         structure)
        net = _convert(net, method, host, sbnn_kwargs, ctx.aux_all)
    net = net.to(ctx.device)
    step = _step_style(net, host, ctx.step)
    if step and not ctx.time_axis:
        raise ValueError("this model runs one time step per call (snnTorch init_hidden=True "
                         "or SpikingJelly single-step): it needs time-major input, so give "
                         "layout='TB' / 'BT' or an encode hook that adds the time axis")
    fwd = _Forward(net, host, method.is_sbnn, step, readout, time_axis=ctx.time_axis)
    key = ("output", structure, step)  # the output's shape: the same for every method
    if key not in ctx.probes:
        ctx.probes[key] = _probe_output(fwd, net, method.is_sbnn, ctx)
    _check_outputs(ctx.probes[key], ctx)
    run = _Run(method, seed, net, fwd, host,
               surrogate=(f"SBNN {method.estimator}" if method.is_sbnn else own))
    if ctx.world > 1:
        if step:
            raise ValueError("under torchrun the model must take the whole sequence (a step "
                             "model's time loop calls DDP once per step)")
        probe = _first_batch(ctx)
        ddp, run.ignored = _wrap_ddp(net, fwd, ctx.device, probe, find_unused)
        run.forward = _Forward(net, host, method.is_sbnn, step, readout, caller=ddp,
                               time_axis=ctx.time_axis)
    return run


def _structure(net: nn.Module) -> tuple:
    """What the probes' results depend on: the module tree (names and classes) and the
    names and shapes of the parameters and buffers; not the values, which differ between
    seeds."""
    return (tuple((n, type(m).__module__, type(m).__qualname__)
                  for n, m in net.named_modules()),
            tuple((n, tuple(p.shape), p.requires_grad) for n, p in net.named_parameters()),
            tuple((n, tuple(b.shape)) for n, b in net.named_buffers()))


def _readouts_excluded(net: nn.Module, method: Method, host: str | None, sbnn_kwargs: dict,
                       ctx: _Ctx, readout, structure: tuple | None = None) -> dict:
    """``sbnn_kwargs`` with ``exclude=`` the model's readouts: the layers whose noise
    reaches the output without a spiking neuron (found by one ``mean``-mode probe forward
    of a converted copy on the first batch, :func:`~sbnn_addons.check_variance_flow`), so
    that they stay deterministic as in the released configuration (their noise would not
    act). Unchanged when the caller passed ``include`` / ``exclude`` or built the SBNN
    model itself.

    The probe runs once per model ``structure`` (:func:`_structure`) and conversion
    (estimator, ``learn_std``, aux loss): the seeds of a method convert the same layers,
    so they reuse its result."""
    if ("include" in sbnn_kwargs or "exclude" in sbnn_kwargs
            or any(isinstance(m, IWSTSpike) for m in net.modules())):
        return sbnn_kwargs
    key = ("readouts", structure or _structure(net), method.estimator, method.learn_std,
           method.aux_weight > 0)
    if key not in ctx.probes:
        probe = _convert(copy.deepcopy(net), method, host, sbnn_kwargs).to(ctx.device)
        fwd = _Forward(probe, host, True, _step_style(probe, host, ctx.step), readout,
                       time_axis=ctx.time_axis)
        ctx.probes[key] = check_variance_flow(probe, _first_batch(ctx),
                                              forward=lambda m, x: fwd(x)).readouts
    found = ctx.probes[key]
    return {**sbnn_kwargs, "exclude": list(found)} if found else sbnn_kwargs


def _first_batch(ctx: _Ctx, n: int = 2) -> Tensor:
    """The first ``n`` training samples (at most a batch) as the model's input."""
    first = next(iter(ctx.train.batches(min(ctx.batch_size, n), None)), None)
    if first is None:  # a loader whose length promised batches
        raise ValueError("train_data yields no batch (a DataLoader with drop_last=True and "
                         "fewer samples than batch_size, or an exhausted iterator); pass "
                         "tensors or a re-iterable DataLoader that yields batches")
    xb, _ = first
    xb = xb[:, :n] if ctx.layout == "TB" else xb[:n]  # a loader's batch: its first n
    return prepare(xb, ctx.layout, ctx.encode, torch.Generator().manual_seed(0), ctx.device)


def _check_encode_replays(ctx: _Ctx) -> None:
    """Raise when ``encode`` draws from anything but its ``generator``: the first batch,
    encoded twice with identically seeded generators under two states of the global RNG,
    must come out the same.

    An encode that ignores its generator (``rate_code(x, T)``) draws from the global RNG,
    whose state at the final evaluation differs between the methods (each evaluates after
    the others' draws): every method would be scored on another random coding of the test
    set, silently (the fingerprint of the data order reads the stored batches).

    Raises:
        ValueError: naming the fix (draw from the generator the hook receives).
    """
    if ctx.encode is None:
        return
    state = torch.get_rng_state()
    outs = []
    try:
        for global_seed in (1, 2):
            torch.manual_seed(global_seed)
            outs.append(_first_batch(ctx))
    finally:
        torch.set_rng_state(state)
    if outs[0].shape != outs[1].shape or not torch.equal(outs[0], outs[1]):
        raise ValueError(
            "encode(x, generator) gave two different results for the same batch and "
            "identically seeded generators: it draws its randomness from elsewhere (the "
            "global RNG, numpy or Python's random), so the methods would be trained and "
            "scored on different random codings (the test inputs differ between methods). "
            "Draw from the generator it receives, e.g. encode=lambda x, gen: "
            "rate_code(x, T, gen) or torch.rand(..., generator=gen)")


def _check_outputs(logits: Tensor, ctx: _Ctx, labels: Tensor | None = None) -> None:
    """Raise when the model has fewer outputs than the data has classes.

    ``labels``: the labels of one batch (a loader's); default: every label of the tensor
    data. ``ctx.num_classes`` counts too.

    Raises:
        ValueError: naming the model's number of outputs and the classes of the data.
    """
    if not isinstance(logits, Tensor) or logits.dim() < 1:
        raise ValueError("the model's logits must be a tensor [B, C], got "
                         f"{type(logits).__name__}"
                         f"{list(logits.shape) if isinstance(logits, Tensor) else ''}")
    outputs = int(logits.shape[-1])
    if labels is not None:
        tops = [int(labels.max())] if labels.numel() else []
    else:
        tops = [int(d.y.max()) for d in (ctx.train, ctx.test) if d.is_tensor]
    top = max(tops, default=-1)
    need = max(ctx.num_classes or 0, top + 1)
    if outputs >= need:
        return
    why = []
    if top >= outputs:
        why.append(f"labels up to {top}")
    if ctx.num_classes and ctx.num_classes > outputs:
        why.append(f"num_classes={ctx.num_classes}")
    raise ValueError(
        f"the model has {outputs} outputs (logits [B, {outputs}]) but the data needs {need} "
        f"({', '.join(why)}): every class index must be < the number of outputs. "
        f"Give the model's last layer {need} outputs, or check the labels (class indices "
        "counted from 0) and num_classes")


def _input_has_time_axis(train: DataSpec, encode: Callable | None) -> bool:
    """Whether the model's input is time-major ``[T, B, ...]``: layouts ``"TB"`` /
    ``"BT"``, or ``"static"`` data with an ``encode`` (which returns ``[T, B, ...]``, e.g.
    a rate code, or a transposition of batch-major samples)."""
    return train.layout != "static" or encode is not None


def _probe_output(fwd: _Forward, net: nn.Module, is_sbnn: bool, ctx: _Ctx) -> Tensor:
    """One forward (no gradient, eval, ``mean`` mode) on the first training samples,
    before any training, so that an output the harness cannot read raises at once;
    returns the logits.

    A time-major ``[T, B, C]`` and a batch-first ``[B, T, C]`` output look the same when
    the batch size equals ``T``: a second batch size is tried then, so that a batch-first
    output raises even when the training batches happen to have ``B == T``.
    """
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), (mode(net, "mean") if is_sbnn else contextlib.nullcontext()):
            for n in (2, 3):
                logits = fwd(_first_batch(ctx, n))
                shape = fwd.last_shape
                if shape is None or len(shape) != 3 or shape[0] != shape[1]:
                    break
    finally:
        net.train(was_training)
        _discard_aux(net)  # the aux terms the probe collected
        _reset(net, fwd.host, fwd.converted)
    return logits


def _schedule(runs: list[_Run], epochs: int, interleave: bool) -> list[tuple[_Run, int]]:
    """(run, epoch) in execution order: interleaved with a rotating first method."""
    if not interleave:
        return [(r, e) for r in runs for e in range(epochs)]
    out = []
    for e in range(epochs):
        k = e % len(runs)
        out += [(r, e) for r in runs[k:] + runs[:k]]
    return out


def _loss(run: _Run, ctx: _Ctx, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(objective, task_loss)``: what is minimised, and ``loss_fn(out, y)`` alone.

    For baselines and SBNN methods without extra terms the two are the same tensor; the
    ``-kl`` / ``-aux`` methods (and ``aux_all``) add their KL / auxiliary terms to the
    objective only, so that the reported ``train_loss`` is comparable across methods.
    """
    task_loss = ctx.loss_fn(out, y)
    if not isinstance(task_loss, Tensor) or task_loss.numel() != 1:
        got = (f"a tensor of shape {list(task_loss.shape)}" if isinstance(task_loss, Tensor)
               else type(task_loss).__name__)
        raise ValueError(f"loss_fn returned {got}; it must return a scalar tensor (the "
                         "batch's mean loss): reduce it, e.g. reduction='mean' or .mean()")
    loss = task_loss = task_loss.reshape(())
    m = run.method
    if m.is_sbnn:
        uses_aux = m.aux_weight > 0 or ctx.aux_all
        aux_w = (ctx.aux_weight if ctx.aux_weight is not None else m.aux_weight) \
            if uses_aux else 0.0
        # a NaN / inf objective is the run's divergence: _train_epoch records its batch
        # and _check_diverged names the method, seed, epoch and batch (not the objective's
        # own error, which knows none of them)
        with check_finite(False):
            loss = sbnn_objective(task_loss, run.model, ctx.n_train, kl_weight=m.kl_weight,
                                  aux_weight=aux_w, aux_reduction=ctx.aux_reduction)
    return loss, task_loss


def _warmup(run: _Run, ctx: _Ctx, steps: int = 2) -> None:
    """Untimed training steps (forward, backward, optimiser step) on the first batches;
    the parameters, buffers and optimiser state are restored afterwards."""
    saved = copy.deepcopy(run.model.state_dict())
    saved_opt = copy.deepcopy(run.optimizer.state_dict())
    rng = torch.get_rng_state()
    run.model.train()
    gen = torch.Generator().manual_seed(0)
    for i, (xb, yb) in enumerate(ctx.train.batches(ctx.batch_size, None)):
        if i >= steps:
            break
        x = prepare(xb, ctx.layout, ctx.encode, gen, ctx.device)
        out = run.forward(x)
        _check_outputs(out, ctx, yb)
        loss, _ = _loss(run, ctx, out, yb.to(ctx.device))
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    _discard_aux(run.model)  # the collected aux terms
    run.model.load_state_dict(saved)
    run.optimizer.load_state_dict(saved_opt)
    run.optimizer.state.clear()
    _reset(run.model, run.host, run.method.is_sbnn)
    torch.set_rng_state(rng)
    _sync(ctx.device)


def _train_epoch(run: _Run, ctx: _Ctx, epoch: int) -> None:
    _fork_rng(run, ctx.device)
    run.model.train()
    perm_gen = torch.Generator().manual_seed(_mix(run.seed, epoch, 1))
    enc_gen = torch.Generator().manual_seed(_mix(run.seed, epoch, 2, ctx.rank))
    total = torch.zeros(3, dtype=torch.float64)  # task loss, objective, samples
    labels, sums = [], []
    first_bad: int | None = None  # the first batch whose objective was NaN or inf
    _sync(ctx.device)
    t0 = time.perf_counter()
    for i, (xb, yb) in enumerate(ctx.train.batches(ctx.batch_size, perm_gen, ctx.rank,
                                                   ctx.world)):
        x = prepare(xb, ctx.layout, ctx.encode, enc_gen, ctx.device)
        y = yb.to(ctx.device)
        try:
            out = run.forward(x)
        except ValueError:
            if first_bad is None:
                raise
            # a converted model refuses the NaN weights that the step after a NaN loss
            # wrote (on every process at once: the parameters are in sync);
            # _check_diverged names the run, the epoch and that batch
            break
        _check_outputs(out, ctx, yb)
        loss, task_loss = _loss(run, ctx, out, y)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if run.ignored:
            _sync_ignored(run.ignored)
        run.optimizer.step()
        if run.scheduler is not None and run.interval == "batch":
            run.scheduler.step()
        task_value, value = float(task_loss.detach()), float(loss.detach())
        if first_bad is None and not (math.isfinite(task_value) and math.isfinite(value)):
            first_bad = i + 1
        total[0] += task_value * len(y)
        total[1] += value * len(y)
        total[2] += len(y)
        labels.append(yb)
        sums.append(xb.detach().double().sum().reshape(1))
    _sync(ctx.device)
    elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    if run.scheduler is not None and run.interval == "epoch":
        run.scheduler.step()
    if ctx.world > 1:
        dist.all_reduce(total)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    _check_diverged(run, epoch, total, first_bad)
    ytr = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    run.orders.append(fingerprint(ytr, torch.cat(sums) if sums else None))
    if epoch == 0 and not ctx.train.is_tensor:
        _check_train_classes(ytr, ytr, None)  # a loader: at least two classes
    run.train_times.append(float(elapsed))
    probs, targets, secs = _predict(run, ctx, "mean", 1)
    run.eval_times.append(secs)
    n = max(float(total[2]), 1.0)
    run.curve.append({"epoch": epoch + 1, "train_loss": float(total[0]) / n,
                      "train_objective": float(total[1]) / n,
                      "test_accuracy": float((probs.argmax(-1) == targets).float().mean())})
    _save_rng(run, ctx.device)


def _check_diverged(run: _Run, epoch: int, total: Tensor, first_bad: int | None) -> None:
    """Raise when training diverged in ``epoch``: a NaN / inf loss (``total``: the summed
    task loss and objective, over every process), or NaN / inf trained parameters.

    Either must stop the run: Adam writes a NaN gradient into the weights, and a model
    whose output layer spikes then emits no spike (``NaN > threshold`` is false), so its
    evaluation is finite (uniform predictions, an accuracy of one class's share) and the
    run would be reported as trained. The same check on every process (the totals are
    all-reduced, the parameters kept in sync), so that all of them stop.

    Raises:
        ValueError: naming the method, the seed, the epoch (and the first such batch, or
            the first non-finite parameters) and the fix.
    """
    fix = ("lower the learning rate (lr=, noise_lr=), clip the gradients in a recipe, or "
           "check loss_fn and the data")
    where = f"{run.method.name} (seed {run.seed})"
    if not bool(torch.isfinite(total[:2]).all()):
        batch = f" (batch {first_bad} on this process)" if first_bad is not None else ""
        raise ValueError(
            f"{where}: the training loss became NaN or inf in epoch {epoch + 1}{batch}, so "
            f"the run diverged (the optimiser wrote NaN into the weights); {fix}")
    # the trained ones: a frozen parameter may hold an inf on purpose (a mask, a bound)
    params = [(n, p) for n, p in run.model.named_parameters()
              if p.requires_grad and p.is_floating_point()]
    if params and not bool(torch.stack([p.detach().isfinite().all() for _, p in params]).all()):
        bad = [n for n, p in params if not bool(p.detach().isfinite().all())]
        raise ValueError(
            f"{where}: after epoch {epoch + 1} the parameters {bad[:6]} hold NaN or inf "
            "values, so the run diverged (or started from such weights); a spiking output "
            "layer emits no spike then, and its finite loss and predictions would pass for "
            f"a trained model's; {fix}")


@torch.no_grad()
def _predict(run: _Run, ctx: _Ctx, eval_mode: str, k: int) -> tuple[Tensor, Tensor, float]:
    """``(probs [N, C], targets [N], seconds)`` on the test data in ``eval_mode``."""
    run.model.eval()
    gen = torch.Generator().manual_seed(12345)  # identical test inputs for every method
    probs, ys = [], []
    _sync(ctx.device)
    t0 = time.perf_counter()
    for xb, yb in ctx.test.batches(ctx.eval_batch_size, None, ctx.rank, ctx.world):
        x = prepare(xb, ctx.layout, ctx.encode, gen, ctx.device)
        if run.method.is_sbnn and eval_mode == "mc":
            # float64 as below: the NLL of a confident error stays finite
            p = mc_predict(run.model, x, k, forward=lambda m, xb: run.forward(xb).double(),
                           count_spikes=False).probs
        elif run.method.is_sbnn:  # float64: the NLL of a confident error stays finite
            with mode(run.model, eval_mode):
                p = torch.softmax(run.forward(x).double(), -1)
        else:
            p = torch.softmax(run.forward(x).double(), -1)
        _check_outputs(p, ctx, yb)
        if not bool(torch.isfinite(p).all()):
            raise ValueError(
                f"{run.method.name} (seed {run.seed}): the model's outputs are NaN or inf in "
                f"{eval_mode} evaluation, so the run diverged; lower the learning rate (lr=, "
                "noise_lr=) or clip the gradients in a recipe")
        probs.append(p.double().cpu())
        ys.append(yb)
    _sync(ctx.device)
    secs = time.perf_counter() - t0
    local, targets = torch.cat(probs), torch.cat(ys)
    if ctx.world > 1:  # strided shards of equal length: gather and interleave back
        buf = local.to(ctx.device)
        parts = [torch.empty_like(buf) for _ in range(ctx.world)]
        dist.all_gather(parts, buf)
        n = len(ctx.test)
        local = torch.stack([p.cpu() for p in parts], 1).reshape(-1, local.shape[-1])[:n]
        targets = ctx.test.y
        t = torch.tensor([secs], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        secs = float(t)
    return local, targets, secs


def _metrics(probs: Tensor, targets: Tensor, suffix: str) -> dict:
    m = classification_metrics(probs, targets)
    return {f"{k}_{suffix}": v for k, v in m.items()}


def _final_eval(run: _Run, ctx: _Ctx, k: int, task: str, epochs: int,
                batch_size: int | None):
    m = run.method
    probs, targets, eval_s = _predict(run, ctx, "mean", 1)
    out_probs = {"mean": probs}
    row = {"task": task, "method": m.name, "kind": m.kind, "host": run.host or "-",
           "spike_fn": run.surrogate, "seed": run.seed, "epochs": epochs}
    row.update(_metrics(probs, targets, "mean"))
    eval_mc_s = None
    if m.is_sbnn:
        torch.manual_seed(_mix(run.seed, 424242))
        _seed_spikes(run.model, _mix(run.seed, 31337))
        sp, _, _ = _predict(run, ctx, "sample", 1)
        out_probs["sample"] = sp
        row["accuracy_sample"] = float((sp.argmax(-1) == targets).float().mean())
        mp, _, eval_mc_s = _predict(run, ctx, "mc", k)
        out_probs["mc"] = mp
        row.update(_metrics(mp, targets, "mc"))
    else:
        for key in ("accuracy_sample", "accuracy_mc", "nll_mc", "ece_mc", "brier_mc"):
            row[key] = None
    x0, _ = next(iter(ctx.test.batches(1, None)))
    shape = prepare(x0, ctx.layout, ctx.encode, torch.Generator().manual_seed(0),
                    torch.device("cpu")).shape
    num_steps = int(shape[0]) if ctx.time_axis else None
    times = run.train_times
    row.update({
        "mc_samples": k if m.is_sbnn else None,
        "train_s_per_epoch": statistics.mean(times),
        "train_s_per_epoch_std": statistics.stdev(times) if len(times) > 1 else 0.0,
        "train_s": sum(times),
        "eval_s": eval_s,
        "eval_mc_s": eval_mc_s,
        "num_steps": num_steps,
        "batch_size": batch_size,
        "train_samples": ctx.n_train,
        "test_samples": len(targets),
        "world_size": ctx.world,
        "model": type(run.model).__name__,
        "curve": run.curve,
        "epoch_train_s": list(times),
        "epoch_eval_s": list(run.eval_times),
        "data_order": list(run.orders),
        "params_changed": (None if run.init_sig is None else
                           not torch.equal(_param_signature(run.model), run.init_sig)),
        "_probs": out_probs,
        "_targets": targets,
    })
    return row, num_steps


def _check_same_order(runs: list[_Run]) -> None:
    orders = {tuple(r.orders) for r in runs}
    if len(orders) > 1:
        names = ", ".join(r.method.name for r in runs)
        raise ValueError(f"the training data came in a different order for the methods "
                         f"({names}): a DataLoader whose sampler draws its order from "
                         "neither a torch.Generator (the loader's or its own) nor the "
                         "global seed (e.g. Python's random); pass tensors or a loader "
                         "with generator=torch.Generator()")
