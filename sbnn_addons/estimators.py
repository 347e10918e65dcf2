"""IW-ST gradient estimators for stochastic binary / spiking units (Method page, section 4).

An estimator is a small frozen value (:class:`Estimator`) built with :func:`ST`,
:func:`IWST` or :func:`AGR`, or parsed from a string by :func:`get_estimator`:

>>> get_estimator("agr")            # AGR(tau=0)
>>> get_estimator("iwst(0.5)")      # IW-ST with p = 0.5
>>> get_estimator("agr(0.3)")       # AGR with tau = 0.3

The sampled spike and its replacement Jacobian are computed by
:class:`BernoulliSpike`, an ``autograd.Function`` with ``setup_context`` and a vmap rule,
so it composes with ``torch.func.grad`` and ``torch.func.vmap``.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .base import check_flag, check_input, concrete_shape, raise_error
from .functional import apply_function, check_float, estimator_jacobian, jacobian_and_z
from .tensors import broadcasts_to, estimator_spec, parse_estimator_spec, pull_term
from .tensors import standard_normal as _standard_normal

__all__ = ["Estimator", "ST", "IWST", "AGR", "get_estimator", "BernoulliSpike", "sample_spikes"]

_KINDS = ("st", "iwst", "agr")


@dataclass(frozen=True)
class Estimator:
    """A member of the IW-ST family.

    Attributes:
        kind: ``"st"``, ``"iwst"`` or ``"agr"``.
        p: IW-ST mixing weight in [0, 1] (``p = 0`` is ST, ``p = 1`` is AGR(0)).
        tau: AGR temperature, >= 0 (``tau = 0`` is the limit ``w(h) = 1 / (2 P(h))``).
        max_weight: bound of the importance ratio (Method page, section 4).
    """

    kind: str = "st"
    p: float = 0.0
    tau: float = 0.0
    max_weight: float = 1e4
    #: The four fields as one string, ``"kind p tau max_weight"`` (floats as
    #: ``float.hex``, exact; read back by :func:`~sbnn_addons.tensors.parse_estimator_spec`).
    #: A string is a constant to ``torch.compile``: a traced backward that reads the
    #: estimator from it stays valid under dynamic shapes, where floats read from an
    #: object become symbolic inputs.
    spec: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise_error(
                f"estimator kind must be one of {_KINDS}, got {self.kind!r}; "
                "use ST(), IWST(p) or AGR(tau)", ValueError)
        if not (_real(self.p) and 0.0 <= self.p <= 1.0):
            raise_error(f"p must be a number in [0, 1], got {self.p!r}", ValueError)
        if not (_real(self.tau) and math.isfinite(self.tau) and self.tau >= 0):
            raise_error(f"tau must be a finite number >= 0, got {self.tau!r}", ValueError)
        if not (_real(self.max_weight) and self.max_weight >= 1.0
                and math.isfinite(self.max_weight)):
            raise_error(f"max_weight must be a finite number >= 1, got {self.max_weight!r}",
                        ValueError)
        object.__setattr__(self, "spec",
                           estimator_spec(self.kind, self.p, self.tau, self.max_weight))

    def __setstate__(self, state: dict) -> None:
        # pickles of an Estimator without ``spec`` get it computed
        self.__dict__.update(state)
        if "spec" not in state:
            self.__post_init__()

    def __str__(self) -> str:
        if self.kind == "st":
            return "ST"
        if self.kind == "iwst":
            return f"IW-ST({self.p:g})"
        return f"AGR({self.tau:g})"

    def jacobian(self, u: Tensor, sigma: Tensor, h: Tensor) -> Tensor:
        """Replacement Jacobian ``dh/du``; see :func:`sbnn_addons.functional.estimator_jacobian`."""
        return estimator_jacobian(u, sigma, h, self.kind, self.p, self.tau, self.max_weight)


def _real(value) -> bool:
    """A real number that is not a bool (``p=True`` was taken as 1)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def ST() -> Estimator:
    """Straight-through: ``w(h) = 1``. Lowest variance, bias proportional to ``Phi(z) - 1/2``."""
    return Estimator("st")


def IWST(p: float) -> Estimator:
    """Importance-weighted ST: ``w(h) = (1 - p) + p / (2 P(h))``, ``p`` in [0, 1].

    Its second-order bias is ``(1 - p)`` times the ST bias.
    """
    return Estimator("iwst", p=float(p))


def AGR(tau: float = 0.0) -> Estimator:
    """Analytic Gumbel-Rao at temperature ``tau >= 0`` (closed form, Method page, section 4).

    ``tau = 0`` is unbiased to second order for a curved loss.
    """
    return Estimator("agr", tau=float(tau))


_PATTERN = re.compile(r"^\s*([a-z\-_]+)\s*(?:\(\s*([^)]*)\s*\))?\s*$")


def get_estimator(spec: str | Estimator) -> Estimator:
    """Build an :class:`Estimator` from a value or a string.

    Accepted strings (case-insensitive): ``"st"``, ``"iwst(p)"`` / ``"iw-st(p)"``,
    ``"agr"`` / ``"agr(tau)"``.

    Raises:
        ValueError: unknown name or malformed argument.
        TypeError: neither a string nor an :class:`Estimator`.
    """
    if isinstance(spec, Estimator):
        return spec
    if not isinstance(spec, str):
        raise_error(f"estimator must be a str or an Estimator, got {type(spec).__name__}",
                    TypeError)
    match = _PATTERN.match(spec.lower())
    name = match.group(1).replace("-", "").replace("_", "") if match else None
    arg = match.group(2) if match else None
    try:
        value = float(arg) if arg else None
    except ValueError:
        value, name = None, None
    if name == "st" and value is None:
        return ST()
    if name == "iwst" and value is not None:
        return IWST(value)
    if name == "agr":
        return AGR(value or 0.0)
    raise_error(
        f"unknown estimator {spec!r}; expected 'st', 'iwst(p)' with p in [0, 1], "
        "'agr' or 'agr(tau)' with tau >= 0", ValueError)


class BernoulliSpike(torch.autograd.Function):
    """Sampled spike with an IW-ST backward (Method page, sections 1 and 4).

    Forward: ``h = 1[u + sigma * eps > 0]`` (``>= 0`` when ``at_zero``), returned in the
    dtype of ``u``. Backward: ``dL/du = g J(h)``, ``dL/dsigma = -z g J(h)``; with
    ``pull = w > 0`` (the auxiliary pull of :class:`~sbnn_addons.IWSTSpike`) ``dL/du`` also
    gets ``2 w mean|g| clamp(z, -3, 3) / sigma`` (``sigma`` held constant).

    Inputs ``u``, ``sigma`` and ``eps`` have one shape; the noise ``eps`` is drawn outside
    (so that generators and vmap compose), ``eps = 0`` gives the deterministic mean mode.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(u: Tensor, sigma: Tensor, eps: Tensor, estimator: Estimator, at_zero: bool,
                pull: float = 0.0):
        if not isinstance(u, Tensor):
            # a graph that torch.compile traces without autograd (no input needs a
            # gradient) calls the forward with a ctx first where the call leaves the
            # optional pull out (Dynamo passes one unless the number of arguments is the
            # forward's): the arguments follow it
            return BernoulliSpike.forward(sigma, eps, estimator, at_zero, pull)
        out_dtype = u.dtype
        if u.dtype in (torch.float16, torch.bfloat16):
            u, sigma, eps = u.float(), sigma.float(), eps.float()
        drive = u + sigma * eps
        fired = drive >= 0 if at_zero else drive > 0
        return fired.to(out_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        u, sigma, _eps, estimator, _at_zero = inputs[:5]
        ctx.save_for_backward(u, sigma, output.bool())  # 1 byte per spike for backward
        ctx.estimator = estimator.spec  # constant under torch.compile (see Estimator.spec)
        ctx.pull = float(inputs[5]) if len(inputs) > 5 else 0.0

    @staticmethod
    def backward(ctx, grad: Tensor):
        u, sigma, h = ctx.saved_tensors
        jac, z = jacobian_and_z(u, sigma, h, *parse_estimator_spec(ctx.estimator))
        g = grad.to(jac.dtype)
        grad_u = g * jac
        # z is infinite for an infinite drive (SpikingJelly's v_threshold=inf readout),
        # where J = 0: -z * 0 would be NaN, the limit is 0 (a literal bound: see
        # jacobian_and_z on constants under torch.compile)
        grad_sigma = -z.clamp(-1e30, 1e30) * grad_u
        if ctx.pull and g.numel():
            # the auxiliary pull (IWSTSpike.aux_pull) in the same node, on u only (sigma
            # held constant)
            grad_u = grad_u + pull_term(g, z, sigma, ctx.pull)
        return (_finite(grad_u, u.dtype), _finite(grad_sigma, sigma.dtype), None, None, None,
                None)


def _finite(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast ``t`` to ``dtype`` clamped to its finite range (no inf in float16)."""
    if t.dtype == dtype:
        return t
    big = torch.finfo(dtype).max
    return t.clamp(-big, big).to(dtype)


def sample_spikes(
    u: Tensor,
    sigma: Tensor,
    estimator: str | Estimator = "st",
    *,
    deterministic: bool = False,
    generator: torch.Generator | None = None,
    at_zero: bool = False,
) -> Tensor:
    """Draw spikes ``h = 1[u + sigma eps > 0]`` with an IW-ST backward.

    Args:
        u: drive ``mu - theta`` (floating point), any shape ``[*]``.
        sigma: noise std, broadcastable to ``u``, non-negative and finite.
        estimator: an :class:`Estimator` or its string name.
        deterministic: ``True`` gives the mean mode ``h = 1[u > 0]`` (``eps = 0``).
        generator: optional ``torch.Generator`` on ``u``'s device, for exact replay.
        at_zero: fire at ``u + sigma eps == 0`` too (SpikingJelly's ``>=`` convention).

    Returns:
        Spikes of the shape and dtype of ``u``.

    Raises:
        TypeError: integer inputs, a ``deterministic`` / ``at_zero`` that is not a bool (a
            string such as ``"no"`` turned it on), or a ``generator`` that is not a
            ``torch.Generator``.
        ValueError: negative or non-finite ``sigma``, a NaN in ``u`` (unless
            :class:`~sbnn_addons.check_finite` is off), or a shape that does not broadcast.
    """
    check_float("u", u)
    check_float("sigma", sigma)
    check_input(u, "sample_spikes (its drive u)", nan_only=True)  # -inf: never fires
    deterministic, at_zero = check_flag("deterministic", deterministic), check_flag(
        "at_zero", at_zero)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__} (for a seed: "
                        "torch.Generator().manual_seed(seed))")
    compiling = torch.compiler.is_compiling()
    if compiling and generator is not None and not deterministic:
        raise_error("sample_spikes(generator=...) cannot draw in a graph that torch.compile "
                    "traces (a graph cannot hold a torch.Generator): drop generator= and "
                    "seed the global generator (torch.manual_seed) before the compiled call, "
                    "or call sample_spikes outside the compiled step")
    if sigma.shape != u.shape:
        # decided from the sizes: a failed expand in a graph being traced is Dynamo's
        # error, not one the caller can read
        if not broadcasts_to(tuple(sigma.shape), tuple(u.shape), compiling):
            raise_error(
                f"sigma of shape {concrete_shape(sigma)} does not broadcast to the drive "
                f"u of shape {concrete_shape(u)}", ValueError)
        sigma = sigma.expand_as(u)
    message = "sigma (the noise std) must be finite and >= 0"
    if compiling:  # no data-dependent branch in a graph: a runtime assert
        if sigma.numel() and not sigma.is_meta:
            detached = sigma.detach()
            torch._assert_async(((detached >= 0) & (detached < math.inf)).all(),
                                f"{message} (a negative, infinite or NaN value)")
    elif sigma.numel() and not sigma.is_meta:
        low, high = torch.aminmax(sigma.detach())  # one pass; NaN propagates to both
        if not (bool(low >= 0) and bool(high < math.inf)):
            bad = ~torch.isfinite(sigma) | (sigma < 0)
            raise ValueError(f"{message}; got {sigma[bad].flatten()[:3].tolist()}")
    if deterministic:
        eps = torch.zeros_like(u)
    else:
        eps = _standard_normal(u, generator)
    return apply_function(BernoulliSpike, u, sigma, eps, get_estimator(estimator), at_zero)
