"""Shared base of every SBNN module: the evaluation mode and softplus parameters."""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import functools
import math
import numbers
import operator
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import NoReturn

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .tensors import is_binary

__all__ = [
    "SBNNModule", "MODES", "inverse_softplus", "check_std", "share_posterior", "check_finite",
    "check_input",
]

#: Evaluation modes of the Method page, section 7 (``mc`` draws like ``sample`` in each pass).
MODES = ("sample", "mean", "mc")


class SBNNModule:
    """Mixin for modules whose forward depends on the evaluation mode.

    Attributes:
        sbnn_mode: ``"sample"`` (stochastic pass), ``"mean"`` (deterministic
            ``1[mu > theta]`` with posterior-mean weights) or ``"mc"`` (stochastic, used by
            Monte Carlo averaging). Set it for a whole model with
            :func:`sbnn_addons.set_mode` or the :func:`sbnn_addons.mode` context manager.
    """

    sbnn_mode: str = "sample"

    @property
    def deterministic(self) -> bool:
        """``True`` in ``mean`` mode."""
        return self.sbnn_mode == "mean"


def set_state(obj: object, **values) -> None:
    """Write the plain attributes ``values`` (no parameters, buffers or modules) straight
    into ``obj.__dict__``, one item at a time.

    ``nn.Module.__setattr__`` costs microseconds per call on a per-step path; and Dynamo
    before PyTorch 2.13 traces the item assignment of a module's ``__dict__`` but not its
    ``update``, ``pop`` or ``setdefault`` (a graph break; seen on torch 2.11).
    """
    state = obj.__dict__
    for key, value in values.items():
        state[key] = value


@torch.compiler.assume_constant_result
def is_exporting() -> bool:
    """Whether ``torch.export`` traces now. The flag that export sets is read: Dynamo
    before PyTorch 2.13 folds ``torch.compiler.is_exporting()`` to ``True`` under every
    ``torch.compile``. A constant of a graph being traced (read once per call by Dynamo,
    not traced)."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


def read_state(obj: object, key: str, compiling: bool | None = None):
    """The plain attribute ``key`` of ``obj`` (``None`` where it has none), as
    ``obj.__dict__.get(key)``; while ``torch.compile`` traces, read as an attribute:
    Dynamo guards an attribute read, but not a read of an instance's ``__dict__``
    (PyTorch 2.13), so a graph traced with one state (a neuron at a sequence's first
    step) would be reused, silently, with another (the next step's). ``key`` is a
    library attribute, never a parameter, buffer or submodule name. ``compiling``:
    whether a graph is traced, where the caller knows it."""
    if torch.compiler.is_compiling() if compiling is None else compiling:
        return getattr(obj, key, None)
    return obj.__dict__.get(key)


def drop_state(obj: object, *keys: str) -> None:
    """Forget the plain attributes ``keys`` of ``obj`` (readers use :func:`read_state`).

    Eager: removed. Under ``torch.compile``: set to ``None`` (see :func:`set_state`).
    """
    state = obj.__dict__
    if torch.compiler.is_compiling():
        for key in keys:
            state[key] = None
    else:
        for key in keys:
            state.pop(key, None)


def cached_tensor_test(owner: object, name: str, tensor: Tensor,
                       test: Callable[[Tensor], bool], assume: bool = True,
                       compiling: bool | None = None) -> bool:
    """``test(tensor)`` of a small buffer (a std, a spike factor) at every step; on an
    accelerator cached in ``owner.__dict__[name]`` until the tensor's storage or version
    changes, so that a step does not wait for the device.

    On a CPU the test runs every time (microseconds; an edit through ``.data``, which
    bumps no version, is seen). On the ``meta`` device, under ``torch.compile`` and under
    ``torch.func`` transforms (no values, or no data-dependent branch) it returns
    ``assume``: the caller passes the answer that takes its general code path.
    ``compiling``: whether a graph is traced, where the caller knows it.
    """
    if (tensor.is_meta or (torch.compiler.is_compiling() if compiling is None else compiling)
            or torch._C._functorch.is_functorch_wrapped_tensor(tensor)):  # vmap: no values
        return assume
    if tensor.is_cpu or tensor.is_inference():  # inference tensors have no version
        return bool(test(tensor))
    key = (tensor.data_ptr(), tensor._version)
    cached = owner.__dict__.get(name)
    if cached is None or cached[0] != key:
        cached = owner.__dict__[name] = (key, bool(test(tensor)))
    return cached[1]


def as_int(value) -> int | None:
    """``value`` as a Python int where it is an integer: an ``int``, a NumPy integer or a
    0-d integer tensor (a count from ``np.arange`` or ``torch.randint``); ``None`` for
    anything else (a bool, whose ``True`` would count as 1, a float, a string, a tensor
    with a dimension), for the caller to name."""
    if isinstance(value, bool) or (isinstance(value, Tensor) and (
            value.dim() or value.dtype == torch.bool)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def as_float(value) -> float | None:
    """``value`` as a Python float where it is a real number: an ``int``, a ``float`` or a
    NumPy number (``np.float32`` from an array); ``None`` for anything else (a bool, a
    string, a tensor), for the caller to name."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def check_flag(name: str, value) -> bool:
    """``value`` as a bool: ``True`` / ``False`` (or a 0-d numpy / torch bool).

    Raises:
        TypeError: anything else: a string such as ``"no"`` or ``"False"`` (from a config
            file or the command line) is truthy and would turn the option on, silently.
    """
    if isinstance(value, bool):
        return value
    if getattr(value, "shape", None) == () and str(getattr(value, "dtype", "")) in (
            "bool", "torch.bool"):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def check_module(model, who: str) -> None:
    """Raise ``TypeError`` unless ``model`` is an ``nn.Module`` (a function, a state dict,
    an optimiser passed by mistake failed with an ``AttributeError``)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{who}: model must be an nn.Module, got {type(model).__name__} "
                        "(pass the model itself, not model.parameters() or a state dict)")


def compiled_wrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model that a compiled wrapper ``torch.compile(net)`` (an ``OptimizedModule``)
    wraps, its ``_orig_mod``; ``model`` itself otherwise. State that the library keeps for
    a model (the variance flow's hooks, SpikingJelly's table of reset networks) goes on
    that model: ``copy.deepcopy`` and pickling rebuild a wrapper from the model it wraps,
    without the wrapper's own hooks and attributes."""
    return getattr(model, "_orig_mod", model)


@contextlib.contextmanager
def eager_calls(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """For a check whose forward hooks must see the calls (they do nothing in a compiled
    graph): yields :func:`compiled_wrapped` ``(model)``, whose call runs eagerly, with the
    compiled call that ``Module.compile()`` set on any of its modules off until the block
    ends."""
    net = compiled_wrapped(model)
    compiled = [(m, m.__dict__["_compiled_call_impl"]) for m in net.modules()
                if m.__dict__.get("_compiled_call_impl") is not None]
    for m, _ in compiled:
        m._compiled_call_impl = None
    try:
        yield net
    finally:
        for m, call in compiled:
            m._compiled_call_impl = call


def inverse_softplus(value: float | Tensor) -> float | Tensor:
    """``rho`` such that ``softplus(rho) = value`` (``value > 0``; a float, or a tensor
    elementwise)."""
    if isinstance(value, Tensor):
        return value + torch.log(-torch.expm1(-value))
    return value + math.log(-math.expm1(-value))


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def raise_error(message: str, error: type[Exception] = RuntimeError) -> NoReturn:
    """Raise ``error(message)``, also from a step that ``torch.compile`` traces.

    Dynamo reports an exception raised in traced code as ``Unsupported: Observed
    exception`` (under ``fullgraph=True``), with the message in its debug context only.
    While compiling, the message is raised as a Dynamo ``UserError`` (a
    ``RuntimeError``), which reaches the caller with the message first. A message about a
    shape formats it with :func:`concrete_shape` (a symbolic size is no constant).

    Args:
        message: what went wrong and the fix.
        error: the exception class raised in eager mode.

    Raises:
        Exception: ``error(message)`` in eager mode, ``torch._dynamo.exc.UserError``
            while compiling.
    """
    if torch.compiler.is_compiling():
        _raise_user_error(message)
    raise error(message)


try:
    from torch._dynamo.comptime import comptime as _comptime
except ImportError:  # pragma: no cover - a PyTorch without Dynamo's comptime
    _comptime = None


def refuse_data_dependent_shape(x: Tensor, where: str) -> None:
    """In a graph being traced, raise where the sizes of ``x`` are data-dependent
    (unbacked: computed from a tensor's values, as ``snntorch.spikegen.rate`` computes its
    repeat sizes with ``Tensor.tolist()``): the library's checks compare sizes, which
    Dynamo cannot decide for such a size ("Could not guard on data-dependent
    expression"). Nothing in eager mode.

    Raises:
        torch._dynamo.exc.UserError: (a ``RuntimeError``) naming the cause and the fix.
    """
    if _comptime is not None and torch.compiler.is_compiling():
        _comptime(_refuse_unbacked_sizes)


def _refuse_unbacked_sizes(ctx) -> None:
    """A ``comptime`` callback of :func:`refuse_data_dependent_shape`."""
    from torch._dynamo.exc import UserError, UserErrorType

    try:
        from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

        shape = ctx.get_local("x").as_fake().shape
        where = ctx.get_local("where").as_python_constant()
        if not free_unbacked_symbols(shape):
            return
    except Exception:  # another PyTorch: no check
        return
    raise UserError(
        UserErrorType.INVALID_INPUT,
        f"the input of {where} has a data-dependent shape in this compiled step "
        f"({tuple(shape)}: sizes computed from a tensor's values, e.g. by "
        "snntorch.spikegen.rate, which builds its repeat sizes with Tensor.tolist()), "
        "which the checks of the converted model cannot compare: generate the input "
        "(the spike trains) outside the compiled step and pass it to the step")


def concrete_shape(t: Tensor) -> tuple[int, ...]:
    """``tuple(t.shape)`` as plain ints, for an error message, also while ``torch.compile``
    traces with a dynamic dimension (a second batch size makes it symbolic): a message
    holding a symbolic size is no constant, and :func:`raise_error` could not pass it on
    (Dynamo's "assume_constant_result argument conversion failed" instead of the
    message). ``operator.index`` specializes each symbolic size to its value in this
    call, on the error path only."""
    return tuple(operator.index(d) for d in t.shape)


@torch.compiler.assume_constant_result
def graph_breaks_allowed() -> bool:
    """Whether the ``torch.compile`` tracing now may break the graph (not under
    ``fullgraph=True``, ``torch.export`` or ``error_on_graph_break``): read in Python while
    tracing (a constant-result function); ``False`` where Dynamo does not say.

    Returns:
        ``True`` where a graph break runs the rest of the call eagerly.
    """
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator, _get_error_on_graph_break

        tx = InstructionTranslator.current_tx()
        return not (tx.one_graph or tx.export or _get_error_on_graph_break())
    except Exception:  # another PyTorch: the named error rather than a graph break
        return False


@torch.compiler.disable
def call_eagerly(fn, *args):
    """``fn(*args)`` outside the graph that ``torch.compile`` traces (a graph break)."""
    return fn(*args)


@torch.compiler.assume_constant_result
def _raise_user_error(message: str) -> None:
    """Raise ``message`` as a Dynamo ``UserError``: run in Python while tracing (a
    constant-result function), so Dynamo passes the error on as it is."""
    from torch._dynamo.exc import UserError, UserErrorType

    raise UserError(UserErrorType.INVALID_INPUT, message)


def check_std(name: str, value, *, allow_zero: bool) -> float:
    """Validate a standard deviation hyper-parameter and return it as a float.

    Raises:
        TypeError: not a real number: a tensor of several elements, or one that requires
            grad (an ``nn.Parameter``, which would be read once and never trained).
        ValueError: negative, non-finite, zero where ``allow_zero`` is false, or so large
            that its square (a variance) overflows float32.
    """
    if isinstance(value, Tensor):
        if value.requires_grad:
            raise TypeError(
                f"{name} is a number (an initial or fixed value), got a tensor that requires "
                "grad (an nn.Parameter): it would be read once as a float and never trained, "
                "silently; pass a float (learn_std=True learns a layer's or spike "
                "function's std, through its own std_rho parameter)")
        if value.numel() != 1:
            raise TypeError(
                f"{name} must be one number, got a tensor of shape {tuple(value.shape)}; "
                "std_mode='channel' / 'weight' start every std at the one value given")
        value = float(value)
    if (number := as_float(value)) is None:
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = number
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    if value * value > _FLOAT32_MAX:
        raise ValueError(
            f"{name}={value:g} is too large: its square, the noise variance, overflows "
            f"float32 (std <= {math.sqrt(_FLOAT32_MAX):.3g}), and the spikes would be coin "
            "flips with a zero gradient; use a std of the order of the weights"
        )
    if value == 0 and not allow_zero:
        raise ValueError(
            f"{name} must be > 0 when it is learned (softplus parameter); "
            "pass learn_std=False for a fixed zero std"
        )
    return value


def softplus(rho: Tensor) -> Tensor:
    """``log(1 + exp(rho))``."""
    return torch.nn.functional.softplus(rho)


def noise_scale(module: torch.nn.Module, name: str) -> Tensor:
    """``softplus(module.<name>)``, the std of a noise-scale parameter (``std_rho``,
    ``bias_std_rho``).

    Raises:
        ValueError: the parameter is pruned with ``torch.nn.utils.prune`` (a
            ``<name>_mask`` buffer, e.g. from a global pruning over every parameter): a
            pruned ``rho = 0`` is a std of ``softplus(0) = 0.69``, more noise, not less.
    """
    if name + "_mask" in module._buffers and name + "_orig" in module._parameters:
        raise_error(
            f"{type(module).__name__}.{name} is pruned (torch.nn.utils.prune), but it is a "
            f"noise scale rho with std = softplus(rho): a pruned rho = 0 is a std of 0.69, "
            f"more noise, not less. Remove it with prune.remove(module, {name!r}) and "
            "restore its values, and prune only the weights (a pruned weight of a Bayesian "
            "layer carries no noise); leave the noise scales out of a global pruning "
            "(sbnn_addons.optim.is_noise_parameter(name))", ValueError)
    return softplus(getattr(module, name))


_SHARED: list[dict | None] = [None]


#: In-place dunder methods of a tensor (``s *= 0.5``, ``s[...] = 0``).
_INPLACE_DUNDERS = frozenset(
    f"__i{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and",
                            "or", "xor", "lshift", "rshift", "matmul")) | {"__setitem__",
                                                                          "__set__"}


class ComputedStd(Tensor):
    """The std ``softplus(rho)`` that a learned noise scale's ``.std`` (``.bias_std``)
    returns: computed at every read, so an in-place edit of it (``nn.init.constant_(
    layer.std, 0.05)``, ``layer.std.mul_(0.5)``, ``layer.std.data.fill_(0)``) would change
    a temporary and not the layer, silently; it raises instead, naming the parameter to
    edit. Every other operation returns a plain tensor (the std reads, and
    differentiates to ``rho``, as before)."""

    _sbnn_owner = ""  # "BayesLinear.std_rho": the parameter it is computed from

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        # the tensor edited: the first argument (nn.init passes it by keyword, tensor=)
        target = args[0] if args else next(iter(kwargs.values()), None)
        edits = (isinstance(target, ComputedStd)
                 and ((name.endswith("_") and not name.endswith("__")
                       and name != "requires_grad_") or name in _INPLACE_DUNDERS))
        out = kwargs.get("out")
        if edits or isinstance(out, ComputedStd) or (
                isinstance(out, (tuple, list)) and any(isinstance(o, ComputedStd)
                                                        for o in out)):
            owner = next(a for a in (target, out, *(out if isinstance(out, (tuple, list))
                                                       else ())) if isinstance(a, ComputedStd))
            param = owner._sbnn_owner or "std_rho"
            raise RuntimeError(
                f"{name}: an in-place edit of a learned std, which is computed from "
                f"{param} (std = softplus(rho)) at every read: the edit would change a "
                "temporary copy and leave the module as it was. Edit the parameter "
                "instead, e.g. with torch.no_grad(): "
                f"module.{param.rpartition('.')[2]}.copy_(torch.log(torch.expm1("
                "torch.as_tensor(new_std))))")
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
            if not isinstance(target, ComputedStd):
                return result
            if name == "__get__" and getattr(func, "__self__", None) is Tensor.data:
                return _computed(result, target._sbnn_owner)  # .data aliases the temporary
            # a view of it (layer.std[0], .view(-1)) aliases the temporary too
            base = target._base if target._is_view() else target
            if isinstance(result, Tensor):
                return (_computed(result, target._sbnn_owner)
                        if result._is_view() and result._base is base else result)
            if isinstance(result, (tuple, list)):  # unbind, split
                return type(result)(
                    _computed(r, target._sbnn_owner) if isinstance(r, Tensor)
                    and r._is_view() and r._base is base else r for r in result)
        return result

    def __deepcopy__(self, memo):  # a copy is no module's std: a plain tensor
        with torch._C.DisableTorchFunctionSubclass():
            return copy.deepcopy(self.as_subclass(Tensor), memo)

    def __reduce_ex__(self, proto):  # saved as a plain tensor (torch.load's weights_only)
        with torch._C.DisableTorchFunctionSubclass():
            return Tensor.__reduce_ex__(self.as_subclass(Tensor), proto)

    def __repr__(self, **kwargs) -> str:  # printed as the std it is
        with torch._C.DisableTorchFunctionSubclass():
            return Tensor.__repr__(self.as_subclass(Tensor), **kwargs)


#: One subclass of :class:`ComputedStd` per owner (``"BayesLinear.std_rho"``), which it
#: names as a class attribute: nothing is kept in a tensor's ``__dict__``.
_COMPUTED_CLASSES: dict[str, type] = {}


def _computed(std: Tensor, owner: str) -> Tensor:
    cls = _COMPUTED_CLASSES.get(owner)
    if cls is None:
        cls = _COMPUTED_CLASSES[owner] = type("ComputedStd", (ComputedStd,),
                                              {"_sbnn_owner": owner, "__slots__": ()})
    with torch._C.DisableTorchFunctionSubclass():
        return std.as_subclass(cls)


def computed_std(module: torch.nn.Module, name: str) -> Tensor:
    """:func:`noise_scale` as a learned std's public ``.std`` returns it: a
    :class:`ComputedStd` in eager mode, whose in-place edits raise; a plain tensor where a
    graph is traced or under ``torch.func`` transforms."""
    std = noise_scale(module, name)
    if (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or type(std) is not Tensor):
        return std
    return _computed(std, f"{type(module).__name__}.{name}")


@contextlib.contextmanager
def share_posterior() -> Iterator[None]:
    """Inside the block, each Bayesian layer computes ``s^2`` once and reuses it.

    A time loop calls every layer ``T`` times per forward pass; with a per-weight std,
    ``softplus(rho)^2`` over the whole weight and its backward are then repeated ``T``
    times. Wrap **one** forward pass (the whole time loop) in this block to compute it
    once; autograd accumulates the gradient of every use into the one node, so the
    gradients are unchanged (tested). Do not keep a block open across backward passes or
    optimiser steps: the cache is dropped when the block ends (and a changed parameter
    is recomputed).

    Example::

        with sbnn_addons.share_posterior():
            for t in range(T):
                spikes, state = lif(fc(x[t]), state)
    """
    previous = _SHARED[0]
    _SHARED[0] = {} if previous is None else previous
    try:
        yield
    finally:
        _SHARED[0] = previous


def variance_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a variance of ``dtype`` values is formed in: float32 for float16, whose
    range a variance needs (the square of a std below 7.8e-3 is subnormal there, below
    2.4e-4 it is 0: the noise vanishes), ``dtype`` otherwise (bfloat16 has float32's
    range)."""
    return torch.float32 if dtype == torch.float16 else dtype


def square(std: Tensor) -> Tensor:
    """``std ** 2`` as a variance, in :func:`variance_dtype` (float32 for float16)."""
    std = std.to(variance_dtype(std.dtype))
    return std * std


def shared_square(owner: object, param: Tensor, std: Callable[[], Tensor],
                  compiling: bool | None = None) -> Tensor:
    """``std() ** 2`` (:func:`square`: float32 for a float16 std), computed once per
    :func:`share_posterior` block for ``owner``.

    Outside a block it is computed at every call. Inside, the value is kept under
    ``owner``'s identity, the grad mode and ``param``'s identity, dtype, device and version
    (the tensor ``std`` is computed from), so a changed, moved or swapped parameter is
    recomputed. ``compiling``: whether a graph is traced, where the caller knows it.
    """
    cache = _SHARED[0]
    if (cache is None
            # a graph computes it once anyway
            or (torch.compiler.is_compiling() if compiling is None else compiling)
            # inside activation checkpointing: the recomputation runs outside the block,
            # so the forward must record the same operations
            or checkpoint_hooks_active()):
        return square(std())
    key = (torch.is_grad_enabled(), param.dtype, param.device,
           None if param.is_inference() else param._version)
    entry = cache.get(id(owner))
    # the owner and the parameter themselves, not only their ids: a module whose id a new
    # one reuses, another tensor passed in for the parameter (torch.func.functional_call)
    if entry is not None and entry[0]() is owner and entry[1] == key and entry[3]() is param:
        return entry[2]
    squared = square(std())
    cache[id(owner)] = (weakref.ref(owner), key, squared, weakref.ref(param))
    if squared.requires_grad:
        # a backward through it frees its graph: later calls compute it again (a block
        # left open by a forward that raised would otherwise hand out a freed graph)
        squared.register_hook(functools.partial(_forget, cache, id(owner), id(squared)))
    return squared


@torch.compiler.assume_constant_result
def traced_in_torch_checkpoint() -> bool:
    """Whether Dynamo traces this call inside a ``torch.utils.checkpoint`` region (its
    higher-order op, which traces a region with side effects only with
    ``torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint``). Read in
    Python while the graph is traced (a constant of the graph); ``False`` outside
    Dynamo or where its tracer cannot be read (another PyTorch)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tracer = InstructionTranslator.current_tx().output.current_tracer
    except Exception:  # not tracing, or another layout of Dynamo's internals
        return False
    while tracer is not None:
        if str(getattr(tracer, "description", None) or "").startswith(
                "torch.utils.checkpoint"):
            return True
        tracer = getattr(tracer, "parent", None)
    return False


def checkpoint_hooks_active() -> bool:
    """Whether the innermost saved-tensor hooks are activation checkpointing's
    (``torch.utils.checkpoint``, which :mod:`sbnn_addons.checkpoint` uses): a region whose
    forward is recomputed in the backward and must then save the same tensors. Other
    saved-tensor hooks (``torch.autograd.graph.save_on_cpu``, a memory probe) are not."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is None:
        return False
    return "checkpoint" in (getattr(hooks[0], "__module__", None) or "")


def threshold_value(threshold) -> float:
    """A host neuron's threshold as one number: a float as it is, a tensor's mean (in
    double, without its graph: a per-neuron or learned one)."""
    if isinstance(threshold, Tensor):
        return float(threshold.detach().double().mean())
    return float(threshold)


def checkpoint_recomputing() -> bool:
    """Whether the innermost saved-tensor hooks are those of the recomputation of a
    non-reentrant ``torch.utils.checkpoint`` region in the backward (PyTorch's
    ``_recomputation_hook``), which runs the region's forward a second time. Eager
    mode only (``False`` while ``torch.compile`` traces, which cannot read the hooks)."""
    if torch.compiler.is_compiling():
        return False
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is None:
        return False
    return (getattr(hooks[0], "__qualname__", None) or "").startswith("_recomputation_hook")


def checkpoint_without_rng_replay() -> bool:
    """Whether the innermost saved-tensor hooks are those of the forward of a
    non-reentrant ``torch.utils.checkpoint`` region run with ``preserve_rng_state=False``:
    its recomputation in the backward does not restore the random generators, so a draw
    there gives other values than the forward's. Read from the region's recomputation
    closure (PyTorch's own flag); ``False`` where that cannot be read (another PyTorch
    layout, other hooks). Eager mode only (under ``torch.compile`` the flag has no
    effect: the generator state is always preserved)."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is None or "checkpoint" not in (getattr(hooks[0], "__module__", None) or ""):
        return False
    try:
        pack = hooks[0]
        frame = pack.__closure__[pack.__code__.co_freevars.index("frame")].cell_contents
        recompute = frame.recompute_fn
        names = recompute.__code__.co_freevars
        preserve = recompute.__closure__[names.index("preserve_rng_state")].cell_contents
    except (AttributeError, TypeError, ValueError, IndexError):  # another layout
        return False
    return preserve is False


def in_reentrant_recomputation(compiling: bool | None = None) -> bool:
    """Whether this call runs in the recomputation of a reentrant ``torch.utils.checkpoint``
    region (``use_reentrant=True``), which runs inside its backward node. Eager mode only.
    ``compiling``: whether a graph is traced, where the caller knows it."""
    if torch.compiler.is_compiling() if compiling is None else compiling:
        return False
    current = torch._C._current_autograd_node()
    return current is not None and current.name() == "CheckpointFunctionBackward"


def _forget(cache: dict, key: int, squared_id: int, grad: Tensor) -> None:
    """Gradient hook of a cached ``s^2``: drop its cache entry (if still that one)."""
    entry = cache.get(key)
    if entry is not None and id(entry[2]) == squared_id:
        del cache[key]


def positive_int(text: str) -> int:
    """An ``argparse`` type for the command lines' counts: an integer >= 1 (a count of 0
    would mean "the default", an empty run or a division by zero)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


class SettingSwitch:
    """A setting applied when the object is made, as ``torch.set_grad_enabled`` does: as a
    statement it stays; used as a context manager, the end of the block restores what was
    set before (also when the block raises), and entering the object again applies the
    setting again. A subclass defines :meth:`_apply`."""

    def __init__(self) -> None:
        self._restore: Callable[[], None] | None = self._apply()

    def _apply(self) -> Callable[[], None]:
        """Apply the setting; return the function that restores the one before."""
        raise NotImplementedError

    def __enter__(self) -> None:
        if self._restore is None:  # entered again after a block ended
            self._restore = self._apply()

    def __exit__(self, *exc) -> None:
        restore, self._restore = self._restore, None
        if restore is not None:
            restore()


_CHECK_FINITE = [True]
#: Tensors found finite, with their ``_version`` then (weak keys: an entry goes with its
#: tensor), so that a tensor fed to several layers is checked once.
_CHECKED: WeakIdKeyDictionary = WeakIdKeyDictionary()
#: The base last found finite (``(weakref to it, its _version)``): what ``_CHECKED`` holds
#: for it, read without a weak-dictionary lookup for each step ``x[t]`` of a sequence.
_LAST_BASE: list = [None]


class check_finite:  # noqa: N801 (used as a function and as a context manager)
    """Switch the check for NaN / inf inputs on or off (on by default).

    Converted models (:func:`sbnn_addons.snntorch.to_sbnn`,
    :func:`sbnn_addons.spikingjelly.to_sbnn`) and the Bayesian layers check their input:
    a NaN or inf would otherwise train silently into NaN gradients while the spikes stay
    finite; a converted model also checks its parameters and constant buffers (the
    Bayesian layers, spike functions and ``LIF`` outside one their own), again after each
    change of their version or storage (an optimiser step, ``load_state_dict``,
    ``param.data = tensor``); an in-place edit through ``.data`` (``p.data.fill_(v)``)
    changes neither and is not seen: edit under ``torch.no_grad()`` instead.
    :func:`~sbnn_addons.attach_variance` checks the variance it is given the
    same way (finite and >= 0), and a spike function outside a converted model (the
    drop-ins in a host model) checks its drive for NaN, and
    :func:`~sbnn_addons.sbnn_objective` names a NaN or inf term of the loss (one read of
    the loss per call). The check is one reduction over
    each non-spike input (spikes are skipped); on a GPU it also reads the result back, a
    device synchronisation per checked input. Turn it off for speed once the data
    pipeline is known to be clean.

    Use it as a function (global switch) or as a context manager (restored on exit)::

        sbnn_addons.check_finite(False)        # off from now on
        with sbnn_addons.check_finite(False):  # off inside the block only
            ...

    Args:
        enabled: ``True`` to check (the default), ``False`` to skip the check.
    """

    def __init__(self, enabled: bool = True) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be True or False, got {enabled!r}")
        self._previous = _CHECK_FINITE[0]
        _CHECK_FINITE[0] = enabled

    def __enter__(self) -> check_finite:
        return self

    def __exit__(self, *exc) -> None:
        _CHECK_FINITE[0] = self._previous

    @staticmethod
    def enabled() -> bool:
        """Whether inputs are checked now."""
        return _CHECK_FINITE[0]


def check_input(x: Tensor, where: str, *, nan_only: bool = False,
                affine: bool = False) -> None:
    """Raise ``ValueError`` if ``x`` holds a NaN or inf (unless :class:`check_finite` is off).

    0/1 spike tensors (marked by the spike functions) and tensors already checked at the
    same version are skipped; a view is skipped where its base was found finite at the
    same version (the base is tested once, not each step ``x[t]`` of a sequence: on a GPU
    each test waits for the device). The test is one sum (a NaN or inf makes it
    non-finite), then an exact count only when that sum is not finite.

    Args:
        x: the input tensor.
        where: who received it, for the message (e.g. ``"BayesLinear"``).
        nan_only: refuse NaN only (a spike function's drive, which is ``-inf`` in a
            readout that never fires, ``threshold=inf``): one sum, then ``isnan(x)`` only
            where that sum is NaN.
        affine: ``x`` is the input of an affine layer that tests its output with
            :func:`check_layer_output` while ``torch.compile`` traces: nothing is
            tested here then.
    """
    if not _CHECK_FINITE[0] or not isinstance(x, Tensor):
        return
    if affine and torch.compiler.is_compiling():
        return
    # the reads of a carrier's metadata (dtype, version, base) without its
    # __torch_function__: no variance flow in a check
    with torch._C.DisableTorchFunctionSubclass():
        _check_input(x, where, nan_only)


def functorch_values(t: Tensor) -> Tensor:
    """``t`` itself, or under ``torch.func`` (``vmap``, ``grad``) the tensor it wraps (a
    ``vmap``'s whole batch): the values a check can read."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open (``torch.func.jvp``, ``jacfwd``, a
    ``torch.autograd.forward_ad.dual_level``): the fused kernels leave such calls to the
    step-by-step path, whose spike function names forward AD
    (:meth:`~sbnn_addons.IWSTSpike.fire`)."""
    return torch.autograd.forward_ad._current_level >= 0


def tracks_grad(t: Tensor) -> bool:
    """``t.requires_grad``, also under ``torch.func``: inside ``grad(vmap(f))`` a mapped
    tensor reports ``False`` although the ``grad`` transform around the ``vmap`` tracks
    the tensor it wraps, so every level is asked."""
    if t.requires_grad or not torch._C._are_functorch_transforms_active():
        return t.requires_grad
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
        if t.requires_grad:
            return True
    return False


def _check_input(x: Tensor, where: str, nan_only: bool) -> None:
    """:func:`check_input` with the switch on and ``torch.Tensor``'s own methods."""
    if not x.is_floating_point() or x.is_meta:  # a meta tensor has no values to check
        return
    compiling = torch.compiler.is_compiling()
    if compiling:  # no data-dependent branch in a graph: a runtime assert
        if nan_only:
            torch._assert_async(~torch.isnan(x.detach()).any(), _nan_message(where))
        else:
            torch._assert_async(
                torch.isfinite(finite_test_sum(x.detach())),
                f"the input of {where} contains NaN or inf values; clean or normalise "
                "the data, or use sbnn_addons.check_finite(False)")
        return
    if is_binary(x, False):  # spikes: 0 and 1 only
        return
    x = functorch_values(x)
    if nan_only:  # (not recorded as checked: an inf passes)
        with torch._C.DisableTorchFunction():  # no variance flow: plain reductions
            # one sum first, NaN where x holds a NaN (or both infinities): a fraction of
            # isnan(x).any()'s time on the CPU (measured), then the exact count
            count = (int(torch.isnan(x.detach()).sum())
                     if math.isnan(float(x.detach().sum())) else 0)
            if count:
                raise ValueError(f"{_nan_message(where)} ({count} of them, shape "
                                 f"{tuple(x.shape)})")
        return
    version = None if x.is_inference() else x._version  # inference tensors have none
    base = x._base
    if version is not None and base is not None:
        last = _LAST_BASE[0]  # the base of the last view, found finite at this version
        if last is not None and last[0]() is base and last[1] == version:
            return
    if version is not None and _CHECKED.get(x) == version:
        return
    if version is not None and base is not None and base.is_floating_point():
        # a view (one step x[t] of a sequence, a batch of a dataset tensor): its base is
        # tested once per version (views share it), not each view, whose test is a
        # device sync each on a GPU; only a base that is not finite tests the view itself
        if _CHECKED.get(base) == version:
            _LAST_BASE[0] = (weakref.ref(base), version)
            return
        if _sum_is_finite(base):
            _CHECKED[base] = version
            _LAST_BASE[0] = (weakref.ref(base), version)
            return
    if not _sum_is_finite(x):
        with torch._C.DisableTorchFunction():  # no variance flow: plain reductions
            bad = x.detach()
            nan, inf = int(torch.isnan(bad).sum()), int(torch.isinf(bad).sum())
        if nan or inf:
            raise ValueError(
                f"the input of {where} contains {nan} NaN and {inf} inf values (shape "
                f"{tuple(x.shape)}); they would train into NaN gradients while the spikes "
                "stay finite. Clean or normalise the data; to skip this check for speed use "
                "sbnn_addons.check_finite(False)"
            )
    if version is not None:
        _CHECKED[x] = version


def check_layer_output(out: Tensor, where: str) -> None:
    """While ``torch.compile`` traces: the test of :func:`check_input` for the input of an
    affine layer (a matrix product or a convolution, plus a bias), made on the layer's
    output ``out`` as a runtime assert (nothing in eager mode, or with :class:`check_finite`
    off). The layer's input is not tested then (``check_input(..., affine=True)``).

    A NaN or inf input reaches every output that it enters (``inf * w`` is ``inf``, or
    ``NaN`` for ``w = 0``, and a sum with a NaN or inf term is not finite), so the output's
    sum is finite where the input is, unless the output overflows (named in the message
    too). An input that enters no output (a pixel that a strided convolution skips) changes
    neither the output nor a gradient. The output is a buffer of its own in the graph, so
    the assert compiles to one kernel that every time step shares; a test of each step's
    input ``x[t]``, a view of the sequence at a new offset, compiled to a kernel per step.

    Args:
        out: the layer's output (its mean) ``[*]``.
        where: the layer, for the message (e.g. ``"BayesLinear"``).
    """
    if not _CHECK_FINITE[0] or not torch.compiler.is_compiling() or out.is_meta:
        return
    with torch._C.DisableTorchFunction():  # no variance flow: a plain reduction
        torch._assert_async(
            torch.isfinite(finite_test_sum(out.detach())),
            f"the input of {where} contains NaN or inf values (or its weight or bias does, "
            "or values so large that its output overflows); clean or normalise the data "
            "(restore a non-finite weight from a checkpoint), or use "
            "sbnn_addons.check_finite(False)")


def assert_finite(t: Tensor, message: str, *, nan_only: bool = False) -> None:
    """While ``torch.compile`` traces: a runtime assert in the graph that ``t`` (a
    parameter or constant: a noise scale, a neuron's ``beta``) holds no NaN / inf (no NaN
    with ``nan_only``), raising a ``RuntimeError`` with ``message`` where it does. Eager
    mode's checks of such tensors are cached by version, which a graph cannot read: the
    graph tests them at each call (a reduction of the small tensor and an assert, at
    every call: a graph that calls a layer at each time step tests it at each step, as
    AOTAutograd does not merge asserts). Nothing in
    eager mode, with :class:`check_finite` off, or for a ``meta`` tensor."""
    if (not _CHECK_FINITE[0] or not torch.compiler.is_compiling() or t is None
            or t.is_meta or not t.is_floating_point()):
        return
    with torch._C.DisableTorchFunction():  # no variance flow: a plain reduction
        v = t.detach()
        torch._assert_async(~torch.isnan(v).any() if nan_only else torch.isfinite(v).all(),
                            message)


def check_variance(variance: Tensor, where: str) -> None:
    """Raise ``ValueError`` if ``variance`` holds a negative value, a NaN or an inf (unless
    :class:`check_finite` is off), as :func:`check_input` tests an input: one sum and one
    minimum (a runtime assert, no device sync, while ``torch.compile`` traces), then an
    exact count only when that test fails.

    Args:
        variance: the variance tensor.
        where: what it was given to, for the message (e.g. ``"attach_variance"``).
    """
    if (not _CHECK_FINITE[0] or not isinstance(variance, Tensor) or variance.is_meta
            or not variance.is_floating_point() or not variance.numel()):
        return
    message = (f"the variance given to {where} must be finite and >= 0 (a noise variance; "
               "a negative or NaN one would give a zero or NaN noise std, silently)")
    fix = ("compute it as a sum of squares or clamp it (v.clamp(min=0)), or skip this check "
           "for speed with sbnn_addons.check_finite(False)")
    with torch._C.DisableTorchFunction():  # no variance flow: plain reductions
        v = variance.detach()
        ok = torch.isfinite(finite_test_sum(v)) & (v.amin() >= 0)
        if torch.compiler.is_compiling():  # no data-dependent branch in a graph
            torch._assert_async(ok, f"{message}; {fix}")
            return
        if bool(ok):
            return
        nan, inf = int(torch.isnan(v).sum()), int(torch.isinf(v).sum())
        negative = int((v < 0).sum())
    if nan or inf or negative:
        raise ValueError(f"{message}: it has {negative} negative, {nan} NaN and {inf} inf "
                         f"values (shape {tuple(v.shape)}); {fix}")


def _nan_message(where: str) -> str:
    return (f"the input of {where} contains NaN values; a NaN fires no spike and trains "
            "into NaN gradients, silently. Clean or normalise the data, or use "
            "sbnn_addons.check_finite(False) to skip this check for speed")


def finite_test_sum(t: Tensor) -> Tensor:
    """The sum of ``t`` that the finite checks test: in float32 for a float16 or bfloat16
    ``t`` (a float16 sum of finite values overflows above 65504: a batch of 6000 x 12
    ones, a batch of images, would read as holding an inf), in ``t``'s dtype otherwise.
    A NaN or inf anywhere in ``t`` still makes it not finite."""
    return t.sum(dtype=torch.promote_types(t.dtype, torch.float32))


def _sum_is_finite(t: Tensor) -> bool:
    """Whether one sum of ``t`` (:func:`finite_test_sum`) is finite (a NaN or inf
    anywhere makes it not); an empty ``t`` is."""
    with torch._C.DisableTorchFunction():  # no variance flow: a plain reduction
        # the sum read as a number: torch.isfinite of it would be four more operators
        return not t.numel() or math.isfinite(float(finite_test_sum(t.detach())))


def mark_checked(x: Tensor) -> None:
    """Record ``x`` as checked by :func:`check_input` at its current version (a part of
    an input checked as a whole, e.g. one step of a checked sequence), so that the check
    of a callee skips it. A no-op while compiling, under ``torch.func`` and for inference
    tensors (no version)."""
    if (isinstance(x, Tensor) and not torch.compiler.is_compiling() and not x.is_inference()
            and not torch._C._functorch.is_functorch_wrapped_tensor(x)):
        _CHECKED[x] = x._version


def _factory_spec(fn) -> tuple | None:
    """``(module, factory, kwargs)`` when ``fn`` is a closure returned by a module-level
    factory whose free variables are the factory's arguments (e.g. snnTorch's
    ``surrogate.fast_sigmoid(slope=25)``), else ``None``.

    Checked by calling the factory with those values: the closure it returns must be
    ``fn``'s function holding the same values. A factory that changes an argument before
    the closure captures it (``alpha = 2 * alpha``) would otherwise be rebuilt with the
    changed value as its argument, a different surrogate, silently."""
    import importlib
    import inspect

    qualname = getattr(fn, "__qualname__", "")
    code = getattr(fn, "__code__", None)
    parts = qualname.split(".")
    if code is None or len(parts) != 3 or parts[1] != "<locals>":
        return None
    try:
        factory = getattr(importlib.import_module(fn.__module__), parts[0])
        params = inspect.signature(factory).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return None
    cells = fn.__closure__ or ()
    kwargs = {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells)}
    if not set(kwargs) <= set(params) or not all(
            isinstance(v, (bool, int, float, str, type(None))) for v in kwargs.values()):
        return None
    try:
        rebuilt = factory(**kwargs)
        same = getattr(rebuilt, "__code__", None) is code and all(
            type(cell.cell_contents) is type(kwargs[name])
            and cell.cell_contents == kwargs[name]
            for name, cell in zip(code.co_freevars, rebuilt.__closure__ or ()))
    except Exception:  # noqa: BLE001 - a factory that cannot be called so: no recipe
        return None
    return (fn.__module__, parts[0], kwargs) if same else None


class HostObject:
    """Holds an object of the host library (e.g. a model's original surrogate) across
    copies: ``deepcopy`` keeps it (a function stays the same function), and pickling
    keeps it where it pickles, else (a closure such as snnTorch's ``surrogate.atan()``)
    the recipe to rebuild it from its factory (:meth:`get` rebuilds it).

    An object that neither pickles nor has a recipe (a user's own closure) is dropped by
    pickling; ``lost`` then names it, so that whoever needs it can say so instead of
    silently using something else.

    Args:
        obj: the object.
        spec: the recipe ``(module, factory, kwargs)`` (found from ``obj`` if omitted).
        lost: the description of an object pickling dropped (set by unpickling).
    """

    def __init__(self, obj, spec: tuple | None = None, lost: str | None = None) -> None:
        self.obj = obj
        self.spec = spec if spec is not None or obj is None else _factory_spec(obj)
        self.lost = lost

    def get(self):
        """The object, or one rebuilt from its factory after unpickling (``None`` if
        neither is available)."""
        if self.obj is None and self.spec is not None:
            import importlib

            module, name, kwargs = self.spec
            self.obj = getattr(importlib.import_module(module), name)(**kwargs)
        return self.obj

    def __deepcopy__(self, memo):
        import copy

        return HostObject(copy.deepcopy(self.obj, memo), self.spec, self.lost)

    def __reduce__(self):
        import pickle

        try:
            pickle.dumps(self.obj)
        except Exception:  # e.g. a closure: keep the recipe only
            if self.spec is None:  # nothing to rebuild it from: remember what was lost
                name = getattr(self.obj, "__qualname__", None) or repr(self.obj)
                return HostObject, (None, None, self.lost or name)
            return HostObject, (None, self.spec, self.lost)
        return HostObject, (self.obj, self.spec, self.lost)

    def __repr__(self) -> str:
        return f"HostObject({self.obj!r})"


def name_patterns(name: str, value) -> tuple[str, ...] | None:
    """``include`` / ``exclude`` of a converter as a tuple of ``fnmatch`` patterns.

    A single string is one pattern (not its characters); ``None`` stays ``None``.

    Raises:
        TypeError: neither a string nor an iterable of strings.
        ValueError: an empty ``include`` (it would select no layer: the model would get
            no Bayesian layer, silently; ``None`` selects all).
    """
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable) and not isinstance(value, (bytes, Tensor)):
        value = tuple(value)
        if all(isinstance(p, str) for p in value):
            if name == "include" and not value:
                raise ValueError(
                    "include is empty: it selects no weight layer, so the converted model "
                    "would have no Bayesian layer; pass include=None to convert every "
                    "layer, or exclude= the layers to keep deterministic")
            return value
    raise TypeError(f"{name} must be a pattern string or a list of them, got {value!r}")


def check_device(x: Tensor, ref: Tensor | None, who: str, what: str = "its parameters") -> None:
    """Raise where the input ``x`` is on another device than ``ref`` (a module's parameter
    or state): torch's own error ("Tensor on device cpu is not on the expected device
    meta!") names neither the module nor the fix.

    Args:
        x: the input.
        ref: the tensor it must share a device with (``None``: nothing to check).
        who: the module, for the message.
        what: what ``ref`` is, for the message.

    A 0-d CPU ``ref`` (a one-element std) is allowed with an input on any real device, as
    torch allows it.

    Raises:
        ValueError: the two devices differ.
    """
    if ref is None or x.device == ref.device:
        return
    if not (ref.dim() == 0 and ref.device.type == "cpu" and x.device.type != "meta"):
        raise_error(
            f"{who} has {what} on {ref.device} but its input is on {x.device}: move the "
            f"input (x.to({str(ref.device)!r})) or the model (model.to(device))", ValueError)


def check_neuron_constants(name: str, neuron: torch.nn.Module, attrs: tuple[str, ...],
                           spike_scales: tuple[str, ...] = ()) -> None:
    """Refuse a host neuron with a NaN constant (decay, threshold, reset value): its
    membrane is NaN or it never fires, so the spikes are 0 and the gradients NaN, without
    an error, from an input the converted model's NaN check passes. A factor the spikes
    are scaled by (``spike_scales``: snnTorch's ``graded_spikes_factor``) must also be
    finite: an infinite one times the 0 of a neuron that did not fire is NaN, so the
    neuron emits NaN, silently where it is the model's output.

    Args:
        name: the neuron's qualified name (for the message).
        neuron: the host neuron.
        attrs: the attributes to read (floats or tensors; missing or ``None`` skipped).
        spike_scales: the attributes that scale the spikes (read the same way), refused
            when NaN or infinite.

    Raises:
        ValueError: naming the neuron and the constant.
    """
    for attr in (*attrs, *spike_scales):
        value = getattr(neuron, attr, None)
        if isinstance(value, Tensor):
            if value.device.type == "meta" or not value.is_floating_point():
                continue
            value = value.detach()
            bad = value[~torch.isfinite(value) if attr in spike_scales else value.isnan()]
            bad = float(bad.view(-1)[0]) if bad.numel() else None
        else:
            bad = float(value) if isinstance(value, float) and (
                math.isnan(value) or (attr in spike_scales and math.isinf(value))) else None
        if bad is None:
            continue
        if attr in spike_scales:
            raise ValueError(
                f"module '{name}' ({type(neuron).__name__}) has {attr} = {bad}: its "
                "spikes would be NaN"
                f"{'' if math.isnan(bad) else f' where it does not fire ({bad} * 0)'} "
                f"without an error; give {attr} a finite number before converting")
        raise ValueError(
            f"module '{name}' ({type(neuron).__name__}) has {attr} = NaN: its membrane "
            "would be NaN or it would never fire (spikes 0, gradients NaN) without an "
            f"error; give {attr} a number before converting")


#: The drives at which :func:`check_heaviside_forward` probes a host spike function.
_HEAVISIDE_PROBE = (-2.0, -0.5, -1e-3, 0.0, 1e-3, 0.5, 2.0)


def check_heaviside_forward(name: str, neuron: torch.nn.Module, fn, *, at_zero: bool,
                            host: str, attr: str, example: str) -> None:
    """Refuse a host neuron whose spike function's forward is not the host's Heaviside
    (``1[u >= 0]`` with ``at_zero``, SpikingJelly's; else ``1[u > 0]``, snnTorch's): a
    user's graded or shifted spike. The converter replaces it with binary stochastic
    spikes, whose ``mean`` mode is that Heaviside, so the converted model would emit
    something else than the host model, without an error.

    The function is called once, without gradients, on a few drives around 0 in the
    neuron's float dtype and device (a module's ``forward`` on a copy of it: no hook
    records the call, and a stateful surrogate is left as it was); a function that cannot
    be called on them (one that takes a drive of a particular shape) is not judged.

    Args:
        name: the neuron's qualified name (for the message).
        neuron: the host neuron (its threshold gives the probe's dtype and device).
        fn: its spike function.
        at_zero: whether the host fires at ``u = 0``.
        host: the host library's name, for the message.
        attr: the neuron's attribute that holds the spike function.
        example: a host surrogate with a Heaviside forward, for the message.

    Raises:
        ValueError: naming the neuron, what its function returned and the ways out.
    """
    ref = next((t for t in (*neuron.parameters(), *neuron.buffers())
                if t.is_floating_point()), None)
    probe = torch.tensor(_HEAVISIDE_PROBE, dtype=None if ref is None else ref.dtype,
                         device=None if ref is None else ref.device)
    if probe.is_meta:  # a neuron on the meta device (or built under it): no values
        return
    try:
        call = copy.deepcopy(fn).forward if isinstance(fn, torch.nn.Module) else fn
        with torch.no_grad():
            out = call(probe.clone())
    except Exception:  # noqa: BLE001 - cannot be probed this way: not judged
        return
    if not isinstance(out, Tensor) or out.shape != probe.shape or out.is_meta:
        return
    expected = (probe >= 0) if at_zero else (probe > 0)
    if torch.equal(out.detach().to(probe.dtype), expected.to(probe.dtype)):
        return
    step = "1[u >= 0]" if at_zero else "1[u > 0]"
    got = [round(float(v), 4) for v in out.detach().flatten().cpu()]
    raise ValueError(
        f"module '{name}' ({type(neuron).__name__}) has a {attr} whose forward is not "
        f"{host}'s Heaviside {step} (for u = {list(_HEAVISIDE_PROBE)} it returned {got}): "
        f"the conversion would replace it with binary stochastic spikes (mean mode {step}), "
        "silently changing what the neuron emits. Give the neuron a surrogate with a "
        f"Heaviside forward before converting ({attr}={example}), or keep it as it is "
        f"with exclude=['{name}', <the layers feeding it>]")


#: The attribute that holds a host neuron's spike function.
_HOST_SPIKE_ATTR = {"snntorch": "spike_grad", "spikingjelly": "surrogate_function"}


def host_neurons(model: torch.nn.Module, host: str) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of the spiking neurons of host library ``host`` (``"snntorch"``
    or ``"spikingjelly"``) in ``model``, recognised by the modules their classes come
    from, without importing the library: an snnTorch ``SpikingNeuron`` (a class with a
    ``spike_grad``), a SpikingJelly neuron (a class with a ``surrogate_function``);
    converted neurons included. Used to name the adapter to use for a model of the other
    host."""
    attr = _HOST_SPIKE_ATTR[host]
    return [(name, m) for name, m in model.named_modules()
            if hasattr(m, attr)
            and any(c.__module__.split(".")[0] == host for c in type(m).__mro__)]


def refuse_other_host_reset(model: torch.nn.Module, host: str, other: str) -> None:
    """Raise where ``model`` holds neurons of host library ``other`` and none of ``host``:
    ``host``'s reset would leave their states as they are, and the next sequence would
    start from them, silently. Used by both adapters' ``reset``.

    Raises:
        TypeError: naming the first such neuron and the reset to use instead.
    """
    if host_neurons(model, host):
        return
    found = host_neurons(model, other)
    if found:
        name, m = found[0]
        names = {"snntorch": "snnTorch", "spikingjelly": "SpikingJelly"}
        raise TypeError(
            f"{host}.reset: module {name!r} ({type(m).__name__}) is a {names[other]} "
            f"neuron, which this reset leaves as it is (its state would carry over to the "
            f"next sequence, silently): reset the model with sbnn_addons.{other}.reset")


def refuse_other_host_export(model: torch.nn.Module, host: str, spike_type: type) -> None:
    """Raise where ``model`` holds a neuron of host library ``host`` converted by that
    host's adapter (its ``spike_grad`` / ``surrogate_function`` is a ``spike_type``,
    :class:`~sbnn_addons.IWSTSpike`): the other adapter's exporter would leave it
    converted. Used by both exporters.

    Raises:
        TypeError: such a neuron, named, with the exporter to use instead.
    """
    attr = _HOST_SPIKE_ATTR[host]
    names = [n for n, m in host_neurons(model, host)
             if isinstance(getattr(m, attr, None), spike_type)]
    if names:
        label, exporter = {"snntorch": ("an snnTorch", "to_snntorch"),
                           "spikingjelly": ("a SpikingJelly", "to_spikingjelly")}[host]
        raise TypeError(
            f"module '{names[0]}' is {label} neuron converted by "
            f"sbnn_addons.{host}.to_sbnn: export the model with "
            f"sbnn_addons.{host}.{exporter}")

def refuse_unconverted_export(model: torch.nn.Module, exporter: str, converted: bool) -> None:
    """Raise where an exporter is given a model with no converted part (``converted``
    false, as the host adapter detects it): the original given to ``to_sbnn``, which
    converts a copy, would come back as a copy of itself, silently. Used by both
    exporters.

    Raises:
        ValueError: naming the model and the model to pass instead.
    """
    if not converted:
        raise ValueError(
            f"nothing to export: {type(model).__name__} has no Bayesian layer or SBNN spike "
            "function (nor a ChannelAffine), so it is not a model that to_sbnn returned (the "
            "export would be a copy of it, silently): to_sbnn converts a copy and leaves the "
            "model it is given as it was, so export the converted one, model = "
            f"to_sbnn(net); ...; plain = {exporter}(model)")


def check_include_overlap(inc, exc, layers: list[str]) -> None:
    """Raise where an ``include`` pattern selects only layers that ``exclude`` also names:
    those layers stay deterministic, the opposite of what ``include`` asks (with a single
    include pattern the model got no Bayesian layer, silently).

    Args:
        inc: the ``include`` patterns (or ``None``).
        exc: the ``exclude`` patterns (or ``None``).
        layers: qualified names of the model's convertible weight layers.

    Raises:
        ValueError: such an ``include`` pattern, with the layers it selects.
    """
    for p in inc or ():
        chosen = [n for n in layers if match_name(n, (p,))]
        if chosen and all(match_name(n, exc) for n in chosen):
            raise ValueError(
                f"include pattern {p!r} selects only layers that exclude also names "
                f"({chosen}), so none of them would become Bayesian: name each layer in "
                "one of include / exclude")


def match_name(name: str, patterns) -> bool:
    """Whether the qualified module ``name`` or a module containing it matches one of
    ``patterns`` (so ``exclude="encoder"`` covers ``encoder.0``)."""
    if not patterns:
        return False
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)] if name else [""]
    return any(fnmatch.fnmatchcase(q, p) for q in prefixes for p in patterns)


def aliases(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` view the same memory the same way (``b.detach()``); never
    for a tensor without storage (``torch.export`` traces with fake tensors)."""
    if not (a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
            and a.device == b.device and a.storage_offset() == b.storage_offset()):
        return False
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except RuntimeError:  # "Cannot access data pointer of Tensor (e.g. FakeTensor, ...)"
        return False


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors have the same shape, dtype and device (static in a graph)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


def equal(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors have the same shape, dtype, device and values (never for
    tensors on the ``meta`` device, which have none)."""
    return same_layout(a, b) and not a.is_meta and bool(torch.equal(a, b))


def copy_of(mem: Tensor, stored: Tensor) -> bool:
    """Whether ``mem`` is a value copy of the stored, non-zero membrane (another tensor with
    the same values: ``mem.clone()``, the membrane of a copied model). A zero membrane is
    a new sequence's initial state, never taken for a copy. Eager mode; in a graph,
    :func:`holds_copy`."""
    if aliases(mem, stored):
        return False
    try:
        return equal(mem, stored) and bool(mem.any())
    except RuntimeError:  # fake tensors (torch.export)
        return False


def holds_copy(mem: Tensor, stored: Tensor) -> Tensor:
    """Whether ``mem`` holds the values of the stored, non-zero membrane (a zero membrane
    is a new sequence's initial state), as a 0-dim tensor: :func:`copy_of`'s test in a
    compiled graph, for a choice without a data-dependent branch (``torch.where``), where
    storages cannot be compared (an alias counts too). ``mem`` and ``stored`` have one
    layout."""
    values = mem.detach()
    return (values == stored.detach()).all() & (values != 0).any()


def computed_from(mem: Tensor, stored: Tensor, depth: int = 4) -> bool:
    """Whether ``mem`` was computed from ``stored`` by a few out-of-place operations
    (``0.5 * mem``, ``mem.clamp(...)``): ``stored``'s autograd node is among the first
    ``depth`` levels of ``mem``'s graph. Eager, with a graph only (else ``False``)."""
    if torch.compiler.is_compiling():  # (Dynamo cannot read grad_fn)
        return False
    target = stored.grad_fn
    if target is None or mem.grad_fn is None:
        return False
    frontier = [mem.grad_fn]
    for _ in range(depth):
        nxt = []
        for fn in frontier:
            if fn is target:
                return True
            nxt.extend(f for f, _ in fn.next_functions if f is not None)
        frontier = nxt
    return any(fn is target for fn in frontier)


def version_of(t: Tensor, compiling: bool | None = None) -> int | None:
    """``t._version``; ``None`` in a compiled graph and for an inference tensor (created
    under ``torch.inference_mode()``), which has no version counter. ``compiling``:
    whether a graph is traced, where the caller knows it."""
    if (torch.compiler.is_compiling() if compiling is None else compiling) or t.is_inference():
        return None
    return t._version


#: Membranes that neurons returned with a noise variance in eager mode, by the id of
#: their storage: ``{id: (weakref to the storage, {view: weakref to the neuron})}``
#: (:func:`note_noisy_membrane`; an entry goes when its storage does).
_NOISY_MEMBRANES: dict = {}

#: Keys of the ``metadata`` of autograd nodes: which outputs of the node are such a
#: membrane (``{output_nr: weakref to the neuron}``), and that the node emits spikes.
_MEMBRANE_NODE = "sbnn_addons.noisy_membrane"
_SPIKE_NODE = "sbnn_addons.spikes"


def storage_view(t: Tensor) -> tuple | None:
    """``t``'s storage and its view of it; ``None`` for a tensor without a storage of its
    own (a ``torch.func`` transform's)."""
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return storage, (t.shape, t.stride(), t.storage_offset(), t.dtype)


def note_noisy_membrane(mem: Tensor, neuron) -> None:
    """Record that ``neuron``'s step returned the plain membrane ``mem`` whose noise
    variance the neuron keeps (eager mode), for :func:`noisy_membrane_behind`: by its
    storage (``mem``, an alias of it, with or without a graph) and on its autograd node
    (a tensor computed from it: ``0.5 * mem``). Both go with ``mem``: no entry outlives
    the membrane, its aliases or its graph."""
    ref = weakref.ref(neuron)
    key = storage_view(mem)
    if key is not None:
        storage, view = key
        entry = _NOISY_MEMBRANES.get(id(storage))
        if entry is None or entry[0]() is not storage:
            ident = id(storage)
            entry = _NOISY_MEMBRANES[ident] = (
                weakref.ref(storage, lambda _, i=ident: _forget_storage(i)), {})
        entry[1][view] = ref
    fn = mem.grad_fn
    if fn is not None:
        fn.metadata.setdefault(_MEMBRANE_NODE, {})[mem.output_nr] = ref


def _forget_storage(ident: int) -> None:
    entry = _NOISY_MEMBRANES.get(ident)
    if entry is not None and entry[0]() is None:  # (not a new storage with the same id)
        del _NOISY_MEMBRANES[ident]


def note_spikes(spikes: Tensor) -> None:
    """Record that ``spikes``' autograd node emits a neuron's spikes (eager mode): the
    search of :func:`noisy_membrane_behind` stops there, since spikes are what a layer
    or a neuron may take from a neuron, though computed from its membrane."""
    fn = spikes.grad_fn
    if fn is not None:
        fn.metadata[_SPIKE_NODE] = True


def noisy_membrane_behind(x: Tensor, depth: int = 3):
    """The neuron whose noisy membrane (:func:`note_noisy_membrane`) ``x`` is (or a plain
    alias of it), or was computed from by at most ``depth`` operations (with a graph)
    other than the neuron's spike function; else ``None``. Eager mode: a compiled step's
    membrane carries its variance itself."""
    if torch.compiler.is_compiling() or not _NOISY_MEMBRANES:
        return None
    if type(x) is Tensor:  # (a carrier is a new tensor, no membrane's alias)
        key = storage_view(x)
        entry = None if key is None else _NOISY_MEMBRANES.get(id(key[0]))
        if entry is not None and entry[0]() is key[0]:
            ref = entry[1].get(key[1])
            if ref is not None:
                return ref()
        fn, nr = x.grad_fn, x.output_nr
    else:
        with torch._C.DisableTorchFunctionSubclass():  # attribute reads of a carrier
            fn, nr = x.grad_fn, x.output_nr
    if fn is None:
        return None
    frontier = [(fn, nr)]
    for _ in range(depth + 1):
        nxt = []
        for fn, nr in frontier:
            meta = fn.metadata
            if meta:
                membranes = meta.get(_MEMBRANE_NODE)
                if membranes is not None and nr in membranes:
                    neuron = membranes[nr]()
                    if neuron is not None:
                        return neuron
                if membranes is not None or _SPIKE_NODE in meta:
                    continue  # a neuron's step: its spikes, not its membrane
            nxt.extend(f for f in fn.next_functions if f[0] is not None)
        frontier = nxt
    return None
