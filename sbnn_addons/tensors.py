"""Tensor marks and small helpers shared by the pure functions and the kernels.

The lowest layer of the framework-free core: it imports nothing from the package, so
:mod:`sbnn_addons.functional` and :mod:`sbnn_addons.kernels` both build on it without
importing each other in a cycle. :mod:`sbnn_addons.functional` re-exports the public
names (``mark_binary``, ``is_binary``, ``is_kept``, ``apply_function``,
``normal_cdf_ratio``).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = ["SpikeTensor", "mark_binary", "is_binary", "is_kept", "broadcasts_to",
           "apply_function", "check_windows", "estimator_spec", "parse_estimator_spec",
           "AUX_PULL_Z_MAX", "aux_pull_gradient", "pull_term", "normal_cdf_ratio",
           "jacobian_and_z", "scaled_jacobian",
           "standard_normal"]


class SpikeTensor(Tensor):
    """A tensor of spikes (0 and 1 only), as a spike function returns it in eager mode.

    A declared tensor subclass, so the mark is state PyTorch can see (it survives
    ``deepcopy``). Pickled (``torch.save``, ``pickle``) it is a plain tensor of the same
    values: saved spikes load with ``torch.load``'s default ``weights_only=True`` and
    without ``sbnn_addons``. Any operation on it returns a plain tensor, so the mark
    never spreads to values that may not be 0/1; an in-place operation on it, or on an
    alias sharing its version counter, voids it. An operation that also takes a tensor of
    another subclass (a :class:`~sbnn_addons.moments.VarianceTensor`) is left to that
    subclass, whichever operand comes first.

    Attributes:
        kept: the spike function saves this very tensor for its own backward (the kernel
            does), so a layer fed by it saves it too at no memory cost.
        marked_version: the tensor's ``_version`` when it was marked.
    """

    kept: bool
    marked_version: int

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        for t in types:  # a loop, not any(...): no generator per call
            if not issubclass(cls, t):
                # another subclass takes part (a VarianceTensor: spikes + a Bayesian
                # layer's output): it handles the call, else its state would be dropped
                # silently
                return NotImplemented
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    def __reduce_ex__(self, protocol):
        """Pickle the spikes as a plain tensor (an alias of the same storage, so that
        tensors sharing it stay shared in the file): the mark is a hint for the layers
        in memory, not data, and the class would make ``torch.load(weights_only=True)``
        refuse the file."""
        with torch._C.DisableTorchFunctionSubclass():
            values = self.as_subclass(Tensor)
        return values.__reduce_ex__(protocol)

    def __deepcopy__(self, memo):
        """A copy of the spikes, marked binary if they still are (not ``kept``: no spike
        function saves the copy); like a plain tensor, only a graph leaf copies."""
        if id(self) in memo:
            return memo[id(self)]
        new = leaf_values(self, "the spikes").requires_grad_(self.requires_grad)
        if is_binary(self):
            mark_binary(new)
        memo[id(self)] = new
        return new


def leaf_values(tensor: Tensor, what: str) -> Tensor:
    """A plain copy of the values of ``tensor`` (a tensor subclass), for its
    ``__deepcopy__``; like a plain tensor, only a graph leaf copies.

    Raises:
        RuntimeError: ``tensor`` is not a graph leaf (PyTorch's own message, naming
            ``what`` to detach).
    """
    if not tensor.is_leaf:
        raise RuntimeError(
            "Only Tensors created explicitly by the user (graph leaves) support the "
            f"deepcopy protocol at the moment; detach() {what} first")
    with torch._C.DisableTorchFunctionSubclass():
        return tensor.detach().clone()


def mark_binary(tensor: Tensor, kept: bool = False, compiling: bool | None = None) -> Tensor:
    """Record that ``tensor`` holds only 0 and 1 (spikes); returns ``tensor``.

    The tensor becomes a :class:`SpikeTensor` (a class change, in place: no copy, no
    autograd node); any in-place change voids the mark. Layers use it to skip ``x * x``
    (``x^2 = x`` for spikes) in the LRT variance, and keep a marked input for the backward
    as uint8 (a quarter of the memory) unless it is ``kept``: ``kept=True`` records that
    the producer saves this very tensor for its own backward (the spike kernel does), so a
    layer saves it too at no memory cost and without a conversion. Eager only: under
    ``torch.compile``, inference mode, or for a tensor of another subclass, the tensor is
    returned unmarked (always safe). ``compiling``: whether a graph is traced, where the
    caller knows it.
    """
    if ((torch.compiler.is_compiling() if compiling is None else compiling)
            or tensor.is_inference()
            or type(tensor) not in (Tensor, SpikeTensor)):
        return tensor
    tensor.__class__ = SpikeTensor
    tensor.kept = bool(kept)
    tensor.marked_version = tensor._version
    return tensor


def is_binary(tensor: Tensor, compiling: bool | None = None) -> bool:
    """Whether ``tensor`` was marked by :func:`mark_binary` and not changed in place since.
    ``compiling``: whether a graph is traced, where the caller knows it."""
    return (type(tensor) is SpikeTensor
            and not (torch.compiler.is_compiling() if compiling is None else compiling)
            and tensor.marked_version == tensor._version)


def is_kept(tensor: Tensor) -> bool:
    """Whether ``tensor`` was marked binary and ``kept`` by its producer (and not changed
    in place since)."""
    return is_binary(tensor) and tensor.kept


def check_windows(x: Tensor, kernel, stride, padding) -> None:
    n = len(kernel)
    if not n or len(stride) != n or len(padding) != n:
        raise ValueError(f"kernel, stride and padding must have one entry per window "
                         f"dimension, got {kernel}, {stride}, {padding}")
    if x.dim() < n:
        raise ValueError(f"x of shape {tuple(x.shape)} has fewer than the {n} dimensions of "
                         f"kernel {kernel}")
    for d in range(n):
        length = x.shape[x.dim() - n + d] + 2 * padding[d]
        if kernel[d] < 1 or stride[d] < 1 or padding[d] < 0 or kernel[d] > length:
            raise ValueError(
                f"window {d}: kernel {kernel[d]} must be in [1, {length}] (the padded "
                f"length), stride {stride[d]} >= 1 and padding {padding[d]} >= 0"
            )


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    if len(shape) > len(target):
        return False
    # slices, not reversed(): Dynamo traces reversed() as a user-defined iterator class,
    # a few hundred bytecode steps per call (once per spike and step in a compiled graph)
    return all(s == 1 or s == t for s, t in zip(shape[::-1], target[::-1]))


_broadcasts_cached = functools.lru_cache(maxsize=4096)(_broadcasts)


def broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...],
                  compiling: bool | None = None) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` without enlarging it.

    A cached pure-Python test, used per spike where ``torch.broadcast_shapes`` would
    dominate the call's fixed cost (traced uncached under ``torch.compile``).
    ``compiling``: whether a graph is traced, where the caller knows it.
    """
    if torch.compiler.is_compiling() if compiling is None else compiling:
        return _broadcasts(tuple(shape), tuple(target))
    return _broadcasts_cached(shape, target)


def apply_function(fn: type[torch.autograd.Function], *args, compiling: bool | None = None):
    """``fn.apply(*args)`` without the per-call ``inspect.signature`` binding.

    ``Function.apply`` binds default arguments with ``inspect.signature`` on every call
    (about 20 us); outside ``torch.func`` transforms the C entry point is called directly.
    Under ``vmap`` / ``grad`` the full ``apply`` (and the vmap rule) is used.
    ``compiling``: whether a graph is traced, where the caller knows it.
    """
    if torch._C._are_functorch_transforms_active() or (
            torch.compiler.is_compiling() if compiling is None else compiling):
        return fn.apply(*args)
    return super(torch.autograd.Function, fn).apply(*args)


def estimator_spec(kind: str, p: float, tau: float, max_weight: float) -> str:
    """An estimator's fields as one string, ``"kind p tau max_weight"`` (floats as
    ``float.hex``: exact). See :attr:`sbnn_addons.estimators.Estimator.spec`."""
    return " ".join([kind, *(float(v).hex() for v in (p, tau, max_weight))])


def parse_estimator_spec(spec: str) -> tuple[str, float, float, float]:
    """``(kind, p, tau, max_weight)`` of an :func:`estimator_spec` string. On a constant
    string ``torch.compile`` folds it to constants."""
    kind, p, tau, max_weight = spec.split()
    return kind, float.fromhex(p), float.fromhex(tau), float.fromhex(max_weight)


#: ``|z|`` beyond which the auxiliary pull stops growing (:attr:`sbnn_addons.IWSTSpike.aux_pull`).
AUX_PULL_Z_MAX = 3.0


def pull_term(grad_h: Tensor, z: Tensor, sigma: Tensor, weight: float) -> Tensor:
    """The auxiliary pull's term of ``dL/du`` inside a spike's own backward, from the
    ``z = u / max(sigma, SIGMA_MIN)`` it computed (:func:`aux_pull_gradient`, which is the
    same term as a node of its own)::

        2 w mean|dL/dh| clamp(z, -Z, Z) / max(sigma, SIGMA_MIN),   0 where sigma = 0

    ``sigma`` broadcastable to ``z``; the result has their broadcast shape. Nothing is
    read back to the host.
    """
    # literal constants (SIGMA_MIN, AUX_PULL_Z_MAX): see jacobian_and_z on constants in a
    # traced backward
    scale = grad_h.abs().mean() * (2.0 * weight)
    pull = z.clamp(-3.0, 3.0).mul_(scale).div_(sigma.to(z.dtype).clamp_min(1e-6))
    return torch.where(sigma > 0, pull, 0.0)


def aux_pull_gradient(grad_h: Tensor, u: Tensor, sigma: Tensor, weight: float) -> Tensor:
    """The auxiliary pull's gradient for the drive ``u`` (:attr:`sbnn_addons.IWSTSpike.aux_pull`).

    .. code-block:: text

        dL/du += w * mean|dL/dh| * 2 clamp(z, -Z, Z) / sigma,   z = u / sigma,  Z = 3

    the gradient of ``w * mean|dL/dh| * sum huber(z)`` (``z^2`` within ``Z``, linear
    beyond) with the mean (over ``grad_h``, a constant) and ``sigma`` held constant; 0
    where ``sigma`` is 0.

    Args:
        grad_h: the gradient reaching the spikes, ``[*]``.
        u: the drive, ``[*]``.
        sigma: the noise std, broadcastable to ``u``.
        weight: ``w``.
    """
    if grad_h.numel() == 0:
        return torch.zeros_like(u)
    # half precision in float32: 1 / sigma overflows float16 below sigma = 1.5e-5
    dtype = torch.promote_types(u.dtype, torch.float32)
    size = grad_h.detach().abs().mean().to(dtype)
    s = sigma.detach().to(dtype)
    # 1 / sigma, 0 where sigma is 0 (no noise, no pull); 1e-6 is SIGMA_MIN as a literal (a
    # traced backward's constant); kept in sigma's (compact) shape
    inv = torch.where(s > 0, s.clamp_min(1e-6).reciprocal(), torch.zeros_like(s))
    z = u.detach().to(dtype) * inv
    if torch._C._are_functorch_transforms_active():
        # out of place: under vmap, grad_h may be mapped where u and sigma are not (a
        # mapped tensor cannot be written into one that is not)
        pull = z.clamp(-3.0, 3.0) * (inv * (2.0 * weight * size))
    else:
        pull = z.clamp_(-3.0, 3.0).mul_(inv * (2.0 * weight * size))  # AUX_PULL_Z_MAX
    if dtype != u.dtype:  # back to the drive's dtype, within its finite range
        big = torch.finfo(u.dtype).max
        pull = pull.clamp_(-big, big).to(u.dtype)
    return pull


def normal_cdf_ratio(x: Tensor, scale: float) -> Tensor:
    """``Phi(scale * x) / Phi(x)`` for ``0 <= scale <= 1``, without 0/0.

    Formed with ``ndtr`` where ``Phi(x)`` is representable and, for the elements where it
    underflows (``x`` below about -9 in float32), in log space with ``log_ndtr``. ``x``
    is clamped to ``[-1e15, 1e15]``, where the ratio has reached its limits (inf below,
    1 above, in float64 too): beyond about ``1e19``, ``x^2`` overflows in float32 and the
    log-space difference would be ``inf - inf = NaN`` (as at ``x = +-inf``).
    """
    x = x.clamp(-1e15, 1e15)
    # erfc form: torch's ndtr is 1 - ... in the lower tail (4 % off at x = -5 in float32)
    den = 0.5 * torch.special.erfc(x * -0.7071067811865476)  # 1/sqrt(2), see below
    num = 0.5 * torch.special.erfc(x * -scale * 0.7071067811865476) if scale != 0.0 else (
        torch.full_like(x, 0.5))
    ratio = num / den.clamp_min(torch.finfo(x.dtype).tiny)
    tiny = den < 1e-20
    if (not x.is_cpu or torch.compiler.is_compiling()
            or torch._C._functorch.is_functorch_wrapped_tensor(x)):
        # no data-dependent branch: in a graph, under torch.func, and on an accelerator,
        # where reading tiny.any() would wait for the device at every backward step
        log_ratio = torch.special.log_ndtr(x * scale) - torch.special.log_ndtr(x)
        return torch.where(tiny, torch.exp(log_ratio), ratio)
    if bool(tiny.any()):
        xt = x[tiny]
        log_num = torch.special.log_ndtr(xt * scale)
        ratio = ratio.masked_scatter(tiny, torch.exp(log_num - torch.special.log_ndtr(xt)))
    return ratio


def scaled_jacobian(z: Tensor, h: Tensor, kind: str, p: float = 1.0, tau: float = 0.0,
                    max_weight: float = 1e4) -> Tensor:
    """``sigma J(h)``, the IW-ST Jacobian times the noise std, as a function of
    ``z = u / sigma`` alone (the estimators' formulas, [Estimators](estimators.md))::

        ST:       phi(z)
        IW-ST(p): min((1 - p) + p Phi(0) / Phi(s z), max_weight) phi(z)
        AGR(tau): min(Phi(c s z) / Phi(s z), max_weight) phi(z / r) / r

    (``s = 2h - 1``, ``r = sqrt(1 + tau^2)``, ``c = tau / r``). ``z`` and ``h`` (bool) of
    one shape ``[*]``; literal constants, see :func:`jacobian_and_z`.
    """
    if kind == "st":
        return torch.exp(-0.5 * z * z) * 0.3989422804014327
    if kind == "iwst":
        sz = torch.where(h, z, -z)
        ratio = normal_cdf_ratio(sz, 0.0) if p > 0 else torch.zeros_like(z)  # no 0 * inf
        weight = (1.0 - p) + p * ratio
        return weight.clamp_max(max_weight) * torch.exp(-0.5 * z * z) * 0.3989422804014327
    if kind == "agr":
        r = math.sqrt(1.0 + tau * tau)
        sz = torch.where(h, z, -z)
        ratio = normal_cdf_ratio(sz, tau / r).clamp_max(max_weight)
        return ratio * torch.exp(-0.5 * (z / r) ** 2) * (0.3989422804014327 / r)
    # validated upstream; kept for direct callers
    raise ValueError(f"kind must be 'st', 'iwst' or 'agr', got {kind!r}")


def jacobian_and_z(u: Tensor, sigma: Tensor, h: Tensor, kind: str, p: float = 1.0,
                   tau: float = 0.0, max_weight: float = 1e4) -> tuple[Tensor, Tensor]:
    """:func:`estimator_jacobian` and the ``z = u / sigma`` it computed (for the backward
    of :class:`~sbnn_addons.BernoulliSpike`, which needs both)."""
    work = torch.float64 if u.dtype == torch.float64 else torch.float32
    if u.dtype != work:
        u, sigma = u.to(work), sigma.to(work)
    h = h.bool() if h.dtype != torch.bool else h
    # Literal constants here and in normal_cdf_ratio (SIGMA_MIN, 1/sqrt(2 pi), 1/sqrt(2)),
    # not the module's names: this runs in BernoulliSpike's backward, and under
    # torch.compile(dynamic=True) a float read from a global there becomes a symbolic
    # input that Dynamo cannot lift into the backward graph (PyTorch 2.13).
    sig = sigma.clamp_min(1e-6)
    z = u / sig
    jac = scaled_jacobian(z, h, kind, p, tau, max_weight) / sig
    return torch.where(sigma > 0, jac, 0.0), z


def standard_normal(u: Tensor, generator: torch.Generator | None) -> Tensor:
    """``N(0, 1)`` noise shaped like ``u`` (without a ``generator`` argument when there is
    none: ``randn_like``, the same numbers, traces with symbolic shapes), in float32 for a
    half-precision ``u`` (:class:`~sbnn_addons.BernoulliSpike` compares in float32): drawn
    in bfloat16, ``eps`` is rounded to 8 bits and a whole bin at the threshold never fires
    (``Phi(-1)`` read 0.1577 for 0.1587)."""
    dtype = torch.promote_types(u.dtype, torch.float32)
    if generator is None:
        return torch.randn_like(u, dtype=dtype, memory_format=torch.contiguous_format)
    return torch.randn(u.shape, generator=generator, dtype=dtype, device=u.device)
