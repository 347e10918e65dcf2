"""Pure functions of the SBNN method (Method page, sections 1-6), no state, no host library.

Notation: ``u = mu - theta`` is the noise-free drive of a unit, ``sigma`` its noise std,
``z = u / sigma``, ``phi`` / ``Phi`` the standard normal pdf / cdf. Every function here
broadcasts over arbitrary leading shapes and is differentiable with autograd unless
stated otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels
from .base import raise_error
from .tensors import (
    apply_function,
    broadcasts_to,
    check_windows,
    is_binary,
    is_kept,
    jacobian_and_z,
    mark_binary,
    normal_cdf_ratio,
)

__all__ = [
    "SIGMA_MIN",
    "check_float",
    "spike_probability",
    "standard_normal_log_pdf",
    "normal_cdf_ratio",
    "estimator_jacobian",
    "exact_unit_gradient",
    "safe_sqrt",
    "apply_function",
    "broadcasts_to",
    "box_sum",
    "compact_broadcast",
    "gaussian_kl",
    "lif_step",
    "lif_fire",
    "LIF_RESETS",
    "mark_binary",
    "is_binary",
    "is_kept",
]

#: Lower clamp of ``sigma`` inside divisions (Method page, section 1).
SIGMA_MIN = 1e-6
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def check_float(name: str, tensor: Tensor) -> None:
    """Raise ``TypeError`` unless ``tensor`` is a floating-point tensor.

    Args:
        name: argument name used in the message.
        tensor: the value to check.
    """
    if not isinstance(tensor, Tensor):
        raise_error(f"{name} must be a torch.Tensor, got {type(tensor).__name__}", TypeError)
    if not tensor.is_floating_point():
        raise_error(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}; "
                    f"convert it with {name}.float()", TypeError)


def spike_probability(u: Tensor, sigma: Tensor) -> Tensor:
    """Firing probability of the noisy binary neuron (Method page, section 1).

    ``P(h = 1) = Phi(u / sigma)``; where ``sigma == 0`` it is ``1[u > 0]``.

    Args:
        u: drive ``mu - theta``, any shape.
        sigma: noise std, broadcastable to ``u``, non-negative.

    Returns:
        Tensor of probabilities, broadcast shape of ``u`` and ``sigma``.
    """
    z = u / sigma.clamp_min(SIGMA_MIN)
    return torch.where(sigma > 0, torch.special.ndtr(z), (u > 0).to(u.dtype))


def standard_normal_log_pdf(z: Tensor) -> Tensor:
    """``log phi(z) = -z^2 / 2 - log sqrt(2 pi)``."""
    return -0.5 * z * z - _LOG_SQRT_2PI


def estimator_jacobian(
    u: Tensor,
    sigma: Tensor,
    h: Tensor,
    kind: str,
    p: float = 1.0,
    tau: float = 0.0,
    max_weight: float = 1e4,
) -> Tensor:
    """Replacement Jacobian ``dh/du`` of the IW-ST family (Method page, section 4).

    Every member keeps the sampled forward ``h`` and uses

    .. code-block:: text

        dh/du     := J(h) = w(h) * phi(z) / sigma
        dh/dsigma := -z * J(h)

    with importance weights (``P(h) = Phi(s z)``, ``s = 2h - 1``)

    * ``st``:   ``w(h) = 1``
    * ``iwst``: ``w(h) = (1 - p) + p / (2 P(h))``
    * ``agr``:  ``J(h) = phi(z/r)/r * Phi(s z tau / r) / P(h) / sigma``,
      ``r = sqrt(1 + tau^2)`` (closed-form analytic Gumbel-Rao; ``tau -> 0`` equals
      ``iwst`` with ``p = 1``).

    The ratios ``Phi(.)/P(h)`` never form 0/0: where ``P(h)`` underflows they are
    computed in log space (:func:`normal_cdf_ratio`), and they are bounded by
    ``max_weight``. Where ``sigma == 0`` the unit is deterministic and the Jacobian is 0.
    Computed in float32 (float64 kept) and returned in that precision.

    Args:
        u: drive ``mu - theta``.
        sigma: noise std, same shape as ``u``.
        h: sampled spikes in {0, 1}, same shape as ``u``.
        kind: ``"st"``, ``"iwst"`` or ``"agr"``.
        p: mixing weight of ``iwst``, in [0, 1].
        tau: temperature of ``agr``, >= 0.
        max_weight: upper bound of the importance ratio.

    Returns:
        ``J(h)`` with the shape of ``u``.
    """
    return jacobian_and_z(u, sigma, h, kind, p, tau, max_weight)[0]


def exact_unit_gradient(u: Tensor, sigma: Tensor, f0: Tensor, f1: Tensor) -> tuple[Tensor, Tensor]:
    """Exact gradient of ``E[f(h)]`` for one noisy unit (Method page, section 1).

    .. code-block:: text

        dE[f]/du     =  phi(z) / sigma * (f(1) - f(0))
        dE[f]/dsigma = -z * dE[f]/du

    Args:
        u: drive, any shape.
        sigma: positive noise std, same shape.
        f0: loss value at ``h = 0``.
        f1: loss value at ``h = 1``.

    Returns:
        ``(dE/du, dE/dsigma)``.
    """
    z = u / sigma
    d_u = torch.exp(standard_normal_log_pdf(z)) / sigma * (f1 - f0)
    return d_u, -z * d_u


def box_sum(x: Tensor, kernel: Sequence[int], stride: Sequence[int],
            padding: Sequence[int], scale: float = 1.0) -> Tensor:
    """Sum of ``x`` over every zero-padded ``kernel`` window of the trailing dimensions.

    .. code-block:: text

        out[j] = scale * sum over i in window(j) of x_pad[i]   (one dimension per entry
                                                              of kernel)

    The same as a convolution with an all-ones kernel (or sum pooling). For float32 CPU
    tensors with one or two window dimensions it is one pass of the compiled kernel
    (:func:`sbnn_addons.kernels.window_sum`, and its transpose for the backward);
    otherwise it is computed separably as ``k - 1`` shifted adds per dimension, which on
    CPU is cheaper than sum pooling or a convolution of a single channel, with a backward
    that adds the gradient into one buffer per dimension.

    Args:
        x: ``[*, L_1, ..., L_n]``.
        kernel: window size per dimension (``n`` ints).
        stride: step per dimension (``n`` ints).
        padding: zeros added on both sides, per dimension (``n`` ints).
        scale: factor applied to every sum (and to the gradient).

    Returns:
        ``[*, (L_d + 2 p_d - k_d) // s_d + 1 ...]``.

    Raises:
        ValueError: the three sequences differ in length, ``x`` has fewer dimensions, or
            a kernel is longer than its padded dimension (or a size is out of range).
    """
    kernel, stride, padding = tuple(kernel), tuple(stride), tuple(padding)
    check_windows(x, kernel, stride, padding)
    if x.requires_grad and torch.is_grad_enabled():
        return apply_function(_BoxSum, x, kernel, stride, padding, float(scale))
    return _box_sum(x, kernel, stride, padding, float(scale))


def _box_sum(x: Tensor, kernel, stride, padding, scale: float) -> Tensor:
    if kernels.can_window_sum(x, len(kernel)):
        return kernels._window_sum(x, kernel, stride, padding, scale=scale)  # checked
    n = len(kernel)
    pads = [p for pad in reversed(padding) for p in (pad, pad)]
    x = F.pad(x, pads) if any(pads) else x
    for d in range(n):
        dim = x.dim() - n + d
        total = None
        for part in _window_slices(x, dim, kernel[d], stride[d], x.shape[dim]):
            total = part if total is None else total + part
        x = total
    return x * scale if scale != 1.0 else x


def _window_slices(x: Tensor, dim: int, k: int, s: int, length: int):
    """The ``k`` strided views ``x[..., j : j + span : s, ...]`` along ``dim``."""
    span = (length - k) // s * s + 1
    index = [slice(None)] * x.dim()
    for j in range(k):
        index[dim] = slice(j, j + span, s)
        yield x[tuple(index)]


class _BoxSum(torch.autograd.Function):
    """:func:`box_sum` with the transposed window sum as its backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, kernel, stride, padding, scale: float) -> Tensor:
        return _box_sum(x, kernel, stride, padding, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, kernel, stride, padding, scale = inputs
        ctx.input_shape, ctx.scale = x.shape, scale
        padded = list(x.shape)
        n = len(kernel)
        for d, p in enumerate(padding):
            padded[x.dim() - n + d] += 2 * p
        shapes = [torch.Size(padded)]
        for d in range(n - 1):  # the shape after reducing dimensions 0 .. d
            dim = x.dim() - n + d
            reduced = list(shapes[-1])
            reduced[dim] = (reduced[dim] - kernel[d]) // stride[d] + 1
            shapes.append(torch.Size(reduced))
        ctx.shapes, ctx.kernel, ctx.stride, ctx.padding = shapes, kernel, stride, padding

    @staticmethod
    def backward(ctx, grad: Tensor):
        n = len(ctx.kernel)
        if kernels.can_window_sum(grad, n):
            return kernels._window_sum_backward(grad, ctx.input_shape, ctx.kernel, ctx.stride,
                                               ctx.padding, ctx.scale), None, None, None, None
        if ctx.scale != 1.0:
            grad = grad * ctx.scale
        for d in reversed(range(n)):
            shape = ctx.shapes[d]
            dim = len(shape) - n + d
            spread = grad.new_zeros(shape)
            for part in _window_slices(spread, dim, ctx.kernel[d], ctx.stride[d], shape[dim]):
                part += grad
            grad = spread
        for d, p in enumerate(ctx.padding):
            if p:
                dim = grad.dim() - n + d
                grad = grad.narrow(dim, p, grad.shape[dim] - 2 * p)
        return grad, None, None, None, None


def compact_broadcast(t: Tensor) -> Tensor:
    """``t`` with every expanded dimension (stride 0, size > 1) narrowed to size 1.

    The values are the same and the result still broadcasts to ``t``'s shape; an
    expanded variance (e.g. ``[T, B, 1, H, W]`` viewed as ``[T, B, C, H, W]``) becomes C
    times smaller again for the operations that follow, and the spike kernel reads it in
    place.
    """
    for d, (size, stride) in enumerate(zip(t.shape, t.stride())):
        if stride == 0 and size > 1:
            t = t.narrow(d, 0, 1)
    return t


class _SafeSqrt(torch.autograd.Function):
    """``sqrt(max(v, 0))`` with gradient 0 where ``v <= 0`` (instead of ``inf`` at 0);
    only the result is saved for the backward."""

    @staticmethod
    def forward(v: Tensor) -> Tensor:
        return v.clamp_min(0).sqrt_()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (out,) = ctx.saved_tensors
        return torch.where(out > 0, grad / (2.0 * out.clamp_min(1e-30)), 0.0)

    generate_vmap_rule = True


def safe_sqrt(variance: Tensor) -> Tensor:
    """Standard deviation from a variance, ``sqrt(max(v, 0))``, with a finite gradient at 0.

    ``d sqrt(v) / dv = 1 / (2 sqrt(v))`` is infinite at ``v = 0``; a deterministic unit
    (``v = 0``) receives no gradient anyway (Method page, section 1), so the gradient is 0
    there (and where rounding made a variance slightly negative). One operation for the
    clamp and the root: only the std is kept for the backward (a separate ``clamp_min``
    would keep the variance too).
    """
    return apply_function(_SafeSqrt, variance)


def gaussian_kl(mean: Tensor, std: Tensor, prior_std: float | Tensor) -> Tensor:
    """Closed-form ``KL(N(m, s^2) || N(0, s0^2))``, **summed** over all elements.

    .. code-block:: text

        KL = sum_i [ log(s0 / s_i) + (s_i^2 + m_i^2) / (2 s0^2) - 1/2 ]

    With a per-layer scalar std and ``n`` weights this is
    ``n log(s0/s) + (n s^2 + ||m||^2) / (2 s0^2) - n/2`` (Method page, section 6).

    Args:
        mean: posterior means ``m``, any shape.
        std: posterior stds ``s`` (> 0), broadcastable to ``mean``.
        prior_std: prior std ``s0`` > 0.

    Returns:
        Scalar tensor.
    """
    std = std.expand_as(mean)
    prior_std = torch.as_tensor(prior_std, dtype=mean.dtype, device=mean.device)
    var_ratio = (std / prior_std) ** 2
    return 0.5 * (var_ratio + (mean / prior_std) ** 2 - 1.0 - torch.log(var_ratio)).sum()


def lif_step(
    current: Tensor,
    current_var: Tensor | None,
    membrane: Tensor,
    variance: Tensor,
    spike_fn,
    beta: float | Tensor,
    threshold: float = 1.0,
    reset: str = "subtract",
) -> tuple[Tensor, Tensor, Tensor]:
    """One step of the SBNN LIF neuron with moment-tracked noise (Method page, section 3).

    .. code-block:: text

        u_t = beta * u_{t-1} + I_t                (noise-free membrane)
        V_t = beta^2 * V_{t-1} + var(I_t)         (accumulated noise variance)
        h_t = spike_fn(u_t - theta, V_t)          (sampled spike)
        u_t = u_t - theta * h_t                   (soft reset by the emitted spike)

    ``reset="zero"`` uses ``u_t = (1 - h_t) u_t`` and ``reset="none"`` keeps ``u_t``.
    Binary networks are the special case ``T = 1, theta = 0``.

    Args:
        current: mean input current ``I_t``, shape ``[B, *]``.
        current_var: its variance (same or broadcastable shape) or ``None`` for 0.
        membrane: ``u_{t-1}``, broadcastable to ``current``.
        variance: ``V_{t-1}``, broadcastable to ``current``.
        spike_fn: callable ``(drive, variance) -> spikes``.
        beta: membrane decay in [0, 1].
        threshold: firing threshold ``theta``.
        reset: ``"subtract"``, ``"zero"`` or ``"none"``.

    Returns:
        ``(spikes, u_t, V_t)``, each of the shape of ``current``.
    """
    variance = _variance_update(variance, current_var, beta)
    spikes, membrane = lif_fire(current, membrane, variance, spike_fn, beta, threshold, reset)
    return spikes, membrane, variance


def _variance_update(variance: Tensor, current_var: Tensor | None,
                     beta: float | Tensor) -> Tensor:
    """``V_t = beta^2 V_{t-1} + var(I_t)`` (``current_var=None``: no input noise)."""
    variance = beta * beta * variance
    return variance if current_var is None else variance + current_var


#: The membrane resets of :func:`lif_step` and :func:`lif_fire`.
LIF_RESETS = ("subtract", "zero", "none")


def _is_one(value) -> bool:
    return isinstance(value, (int, float)) and value == 1


def lif_fire(
    current: Tensor,
    membrane: Tensor | None,
    variance: Tensor,
    spike_fn,
    beta: float | Tensor,
    threshold: float = 1.0,
    reset: str = "subtract",
) -> tuple[Tensor, Tensor]:
    """The membrane half of :func:`lif_step`, for a noise variance ``V_t`` already formed.

    .. code-block:: text

        u_t = beta * u_{t-1} + I_t;   h_t = spike_fn(u_t - theta, V_t);   reset u_t

    ``membrane=None`` is the zero initial state (``u_t = I_t``, one operation fewer).

    Returns:
        ``(spikes, u_t)``, each of the shape of ``current``.

    Raises:
        ValueError: ``reset`` is not ``"subtract"``, ``"zero"`` or ``"none"``.
    """
    if reset not in LIF_RESETS:
        raise ValueError(f"reset must be one of {LIF_RESETS}, got {reset!r}")
    membrane = current if membrane is None else beta * membrane + current
    spikes = spike_fn(membrane - threshold, variance)
    if reset == "subtract":
        membrane = membrane - (spikes if _is_one(threshold) else threshold * spikes)
    elif reset == "zero":
        membrane = membrane * (1.0 - spikes)
    return spikes, membrane
