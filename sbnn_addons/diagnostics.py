"""Gradient diagnostics: exact bias and variance of spike-gradient estimators.

For a network small enough (at most about 20 stochastic units counted over time steps) the
expected loss is a finite sum over every spike configuration, so both the **exact
gradient** and the **exact expectation and covariance of every estimator** are computable
by enumeration, with no Monte Carlo error (Method page, sections 1 and 4).

Network (``neuron="binary"``: ``T = 1``, ``theta = 0``, no membrane; ``neuron="lif"``: the
LIF recurrence of the Method page, section 3, with soft reset), hidden layers ``l = 1..L``,
readout ``V``:

.. code-block:: text

    m_t^l = beta m_{t-1}^l + W_l h_t^{l-1} + b_l            (lif; binary: m = W h + b)
    u_t^l = m_t^l - theta,   h_t^l = 1[u_t^l + sigma eps > 0],  P(h = 1) = Phi(u / sigma)
    m_t^l <- m_t^l - theta h_t^l                            (soft reset, lif only)
    logits = 1/T sum_t (V h_t^L + c),   loss = CE(logits, y)  or  a . logits ("linear")

Enumerating the ``2^N`` configurations ``s`` of all hidden spikes (``N`` = units x steps),

.. code-block:: text

    E[L] = 1/B sum_b sum_s P_b(s) L_b(s),  P_b(s) = prod_{t,l,i} Phi(+-u / sigma)
    g    = d E[L] / d theta                            (autograd through P and L: exact)
    E[g_hat] = 1/B sum_b sum_s P_b(s) g_hat_b(s)       (g_hat: backward of config s)
    Cov      = 1/B^2 sum_b ( sum_s P_b(s) g_hat g_hat^T - E_b[g_hat] E_b[g_hat]^T )

``g_hat_b(s)`` is the backward pass of one sampled configuration with the estimator's
replacement Jacobian ``dh/du := J(u, h)`` (one noise draw per example, the batch-mean
gradient). Reported, per parameter group (``layer1``..``layerL``, ``readout``),
for all hidden layers together (``hidden``) and overall (``all``):

* ``bias = ||E[g_hat] - g||``, ``variance = trace(Cov)``,
* ``cosine = cos(E[g_hat], g)``, ``rel_bias = bias / ||g||``,
* ``rel_error = sqrt(bias^2 + variance) / ||g||`` (RMS error of one estimate).

Estimators compared: the IW-ST family of :mod:`sbnn_addons.estimators` (ST, IW-ST(p),
AGR(tau)) and three host-library surrogate gradients, re-implemented here from their
backward formulas so that no host library is imported. A surrogate replaces ``dh/du``
by a function of the noise-free drive ``u`` (what the spike function receives), on the
same noisy forward:

* snnTorch ``surrogate.atan(alpha=2)`` (the default ``spike_grad``;
  ``snntorch/surrogate.py``, ``ATan.backward``): ``alpha/2 / (1 + (pi/2 alpha u)^2)``,
* snnTorch ``surrogate.fast_sigmoid(slope=25)`` (``FastSigmoid.backward``):
  ``1 / (1 + slope |u|)^2``,
* SpikingJelly ``surrogate.Sigmoid(alpha=4)`` (the default ``surrogate_function``;
  ``spikingjelly/activation_based/surrogate.py``, ``sigmoid_backward``):
  ``alpha sigmoid(alpha u) (1 - sigmoid(alpha u))``.

The readout ``V, c`` sees the sampled spikes directly, so every estimator is exact there;
the differences are in the hidden layers.

Command line (figures and a CSV)::

    python -m sbnn_addons.diagnostics --out-dir runs/diagnostics

:func:`main` takes an ``argv`` list, so a benchmark CLI can expose it as a subcommand.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .base import as_int, positive_int
from .estimators import AGR, IWST, ST, BernoulliSpike, Estimator, get_estimator
from .functional import apply_function

__all__ = [
    "ToyNetwork",
    "make_network",
    "make_inputs",
    "SURROGATES",
    "default_rules",
    "expected_loss",
    "exact_gradient",
    "estimator_moments",
    "sample_gradients",
    "compare",
    "sweep_noise",
    "sweep_depth",
    "plot_sweep",
    "main",
]

#: Largest number of stochastic unit-steps that :func:`exact_gradient` enumerates.
MAX_UNITS = 22

Rule = Callable[[Tensor, Tensor, Tensor], Tensor]  # (u, sigma, h) -> dh/du


# --------------------------------------------------------------------------- surrogates
def atan_surrogate(alpha: float = 2.0) -> Rule:
    """snnTorch ``surrogate.atan``: ``dh/du = alpha/2 / (1 + (pi/2 alpha u)^2)``."""
    def rule(u, sigma, h):
        return (alpha / 2) / (1 + (math.pi / 2 * alpha * u) ** 2)
    return rule


def fast_sigmoid_surrogate(slope: float = 25.0) -> Rule:
    """snnTorch ``surrogate.fast_sigmoid``: ``dh/du = 1 / (1 + slope |u|)^2``."""
    def rule(u, sigma, h):
        return 1.0 / (1.0 + slope * u.abs()) ** 2
    return rule


def sj_sigmoid_surrogate(alpha: float = 4.0) -> Rule:
    """SpikingJelly ``surrogate.Sigmoid``: ``dh/du = alpha s(alpha u)(1 - s(alpha u))``."""
    def rule(u, sigma, h):
        s = torch.sigmoid(alpha * u)
        return alpha * s * (1 - s)
    return rule


#: Host-style surrogate rules (name -> rule), with the host libraries' default parameters.
SURROGATES: dict[str, Rule] = {
    "atan(2)": atan_surrogate(2.0),
    "fast_sigmoid(25)": fast_sigmoid_surrogate(25.0),
    "sj_sigmoid(4)": sj_sigmoid_surrogate(4.0),
}


def estimator_rule(estimator: str | Estimator) -> Rule:
    """The replacement Jacobian ``J(u, sigma, h)`` of an IW-ST family member."""
    est = get_estimator(estimator)
    return lambda u, sigma, h: est.jacobian(u, sigma, h)


def default_rules(surrogates: bool = True) -> dict[str, Rule]:
    """ST, IW-ST(0.25/0.5/0.75), AGR(0/0.5/1) and (optionally) the host surrogates."""
    ests = [ST(), IWST(0.25), IWST(0.5), IWST(0.75), AGR(0.0), AGR(0.5), AGR(1.0)]
    rules = {str(e): estimator_rule(e) for e in ests}
    if surrogates:
        rules.update(SURROGATES)
    return rules


# --------------------------------------------------------------------------- network
@dataclass
class ToyNetwork:
    """A small stochastic binary or LIF network (module docstring).

    Attributes:
        weights: ``[W_1, ..., W_L, V]``, ``W_l: [n_l, n_{l-1}]``, ``V: [C, n_L]``.
        biases: ``[b_1, ..., b_L, c]``.
        sigma: noise std of every unit (> 0).
        steps: time steps ``T`` (1 for binary).
        beta: membrane decay (lif).
        threshold: ``theta`` (0 for binary, 1 for lif).
        spiking: LIF dynamics with soft reset (``False``: binary, memoryless).
        loss: ``"ce"`` (cross-entropy) or ``"linear"`` (``a . logits``).
        loss_weights: ``a`` of the linear loss ``[C]``.
    """

    weights: list[Tensor]
    biases: list[Tensor]
    sigma: float = 1.0
    steps: int = 1
    beta: float = 0.9
    threshold: float = 0.0
    spiking: bool = False
    loss: str = "ce"
    loss_weights: Tensor | None = None
    hidden: list[int] = field(init=False)

    def __post_init__(self) -> None:
        if len(self.weights) != len(self.biases) or len(self.weights) < 2:
            raise ValueError("weights and biases need one entry per hidden layer + readout")
        if not 0 < self.sigma < math.inf:  # inf: every P = 1/2 and every gradient 0
            raise ValueError(f"sigma must be a finite number > 0, got {self.sigma}")
        tensors = [*self.weights, *self.biases]
        if self.loss_weights is not None:
            tensors.append(self.loss_weights)
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise TypeError(f"weights, biases and loss_weights must share one floating-point "
                            f"dtype, got {sorted(map(str, dtypes))}; convert them with "
                            f".to(torch.float64)")
        fan_in = self.weights[0].shape[-1] if self.weights[0].dim() == 2 else None
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if w.dim() != 2 or w.shape[1] != fan_in:
                rows = "C" if i == len(self.weights) - 1 else "n_out"
                raise ValueError(f"weights[{i}] must be [{rows}, {fan_in}] (its input is the "
                                 f"previous layer's {fan_in} units), got {tuple(w.shape)}")
            if tuple(b.shape) != (w.shape[0],):
                raise ValueError(f"biases[{i}] must be [{w.shape[0]}] (the rows of "
                                 f"weights[{i}]), got {tuple(b.shape)}")
            fan_in = w.shape[0]
        if self.loss not in ("ce", "linear"):
            raise ValueError(f"loss must be 'ce' or 'linear', got {self.loss!r}")
        self.hidden = [w.shape[0] for w in self.weights[:-1]]
        if self.loss == "linear" and self.loss_weights is None:
            self.loss_weights = torch.ones(self.weights[-1].shape[0], dtype=self.dtype)
        if self.loss == "linear" and tuple(self.loss_weights.shape) != (fan_in,):
            raise ValueError(f"loss_weights must be [{fan_in}] (one weight per class), got "
                             f"{tuple(self.loss_weights.shape)}")

    @property
    def dtype(self) -> torch.dtype:
        return self.weights[0].dtype

    @property
    def num_units(self) -> int:
        """Stochastic unit-steps ``N = T * sum_l n_l`` (``2^N`` configurations)."""
        return self.steps * sum(self.hidden)

    @property
    def depth(self) -> int:
        return len(self.hidden)

    def parameters(self) -> list[Tensor]:
        """``[W_1, b_1, ..., V, c]``."""
        return [t for wb in zip(self.weights, self.biases) for t in wb]

    def groups(self) -> dict[str, list[int]]:
        """Parameter indices (into :meth:`parameters`) of each layer."""
        names = [f"layer{i + 1}" for i in range(self.depth)] + ["readout"]
        return {n: [2 * i, 2 * i + 1] for i, n in enumerate(names)}


def make_network(
    sizes: Sequence[int] = (4, 3, 3, 2),
    *,
    neuron: str = "binary",
    steps: int | None = None,
    weight_scale: float = 1.0,
    sigma: float = 1.0,
    beta: float = 0.9,
    loss: str = "ce",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> ToyNetwork:
    """Random :class:`ToyNetwork` with layer sizes ``(n_in, n_1, ..., n_L, C)``.

    Hidden weights ``~ weight_scale * N(0, 1/fan_in)``, biases ``~ weight_scale *
    N(0, 0.1^2)`` (lif: plus ``(1 - beta) theta``, the bias that holds a silent membrane
    at threshold); readout ``~ N(0, 4/fan_in)``. With ``sigma`` fixed, ``weight_scale``
    sets the typical ``|z| = |u| / sigma``.

    Raises:
        ValueError: bad ``neuron``, fewer than one hidden layer, a size < 1, or more than
            :data:`MAX_UNITS` unit-steps.
    """
    if neuron not in ("binary", "lif"):
        raise ValueError(f"neuron must be 'binary' or 'lif', got {neuron!r}")
    if len(sizes) < 3:
        raise ValueError("sizes must be (n_in, n_1, ..., n_L, C) with at least one hidden layer")
    counts = [as_int(size) for size in sizes]
    if any(n is None or n < 1 for n in counts):
        raise ValueError(f"every size must be an integer >= 1, got {tuple(sizes)}")
    sizes = counts
    spiking = neuron == "lif"
    steps = (3 if spiking else 1) if steps is None else steps
    if ((count := as_int(steps)) is None or count < 1
            or (not spiking and count != 1)):  # 2.5 ran 2 steps, True 1
        raise ValueError(f"steps must be an integer >= 1 (and 1 for binary units), got "
                         f"{steps!r}")
    steps = count
    if not -math.inf < weight_scale < math.inf:
        raise ValueError(f"weight_scale must be a finite number, got {weight_scale}")
    units = steps * sum(sizes[1:-1])
    if units > MAX_UNITS:
        raise ValueError(f"{units} unit-steps give 2^{units} configurations; keep it <= "
                         f"{MAX_UNITS} (fewer/narrower layers or fewer steps)")
    threshold = 1.0 if spiking else 0.0
    g = torch.Generator().manual_seed(seed)
    ws, bs = [], []
    for i in range(len(sizes) - 1):
        fan_in, fan_out = sizes[i], sizes[i + 1]
        readout = i == len(sizes) - 2
        scale = 2.0 if readout else weight_scale
        ws.append(torch.randn(fan_out, fan_in, generator=g, dtype=dtype) * scale
                  / math.sqrt(fan_in))
        b = torch.randn(fan_out, generator=g, dtype=dtype) * 0.1 * scale
        if spiking and not readout:
            b = b + (1 - beta) * threshold
        bs.append(b)
    a = torch.randn(sizes[-1], generator=g, dtype=dtype) if loss == "linear" else None
    return ToyNetwork(ws, bs, sigma=sigma, steps=steps, beta=beta, threshold=threshold,
                      spiking=spiking, loss=loss, loss_weights=a)


def make_inputs(net: ToyNetwork, batch: int = 4, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Inputs ``x [B, T, n_in] ~ N(0, 1)`` (constant over time) and labels ``y [B]``."""
    if (count := as_int(batch)) is None or count < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    batch = count
    g = torch.Generator().manual_seed(seed + 10_000)
    n_in, classes = net.weights[0].shape[1], net.weights[-1].shape[0]
    x = torch.randn(batch, 1, n_in, generator=g, dtype=net.dtype).expand(-1, net.steps, -1)
    y = torch.randint(classes, (batch,), generator=g)
    return x.contiguous(), y


# --------------------------------------------------------------------------- forward
def _linear(w: Tensor, b: Tensor, h: Tensor) -> Tensor:
    if w.dim() == 3:  # per-item parameters
        return torch.einsum("iok,ik->io", w, h) + b
    return h @ w.T + b


def _run(net: ToyNetwork, params: list[Tensor], x: Tensor, y: Tensor, spike) -> Tensor:
    """Per-item loss ``[I]``; ``spike(u, layer, step) -> h`` draws / fixes the spikes."""
    num = x.shape[0]
    mems = [x.new_zeros(num, n) for n in net.hidden]
    logits = 0.0
    for t in range(net.steps):
        h = x[:, t]
        for layer in range(net.depth):
            cur = _linear(params[2 * layer], params[2 * layer + 1], h)
            if net.spiking:
                mems[layer] = net.beta * mems[layer] + cur
                u = mems[layer] - net.threshold
            else:
                u = cur - net.threshold
            h = spike(u, layer, t)
            if net.spiking:
                mems[layer] = mems[layer] - net.threshold * h
        logits = logits + _linear(params[-2], params[-1], h) / net.steps
    if net.loss == "ce":  # int32 / uint8 labels too (cross_entropy takes int64)
        return torch.nn.functional.cross_entropy(logits, y.long(), reduction="none")
    return logits @ net.loss_weights


def _bits(num_units: int, start: int, stop: int, dtype) -> Tensor:
    """Configurations ``start..stop-1`` as bits ``[M, N]``."""
    idx = torch.arange(start, stop)
    shifts = torch.arange(num_units)
    return ((idx[:, None] >> shifts) & 1).to(dtype)


def _chunks(net: ToyNetwork, batch: int, max_items: int):
    total = 2 ** net.num_units
    step = max(1, max_items // max(batch, 1))
    for start in range(0, total, step):
        yield start, min(total, start + step)


def _offsets(net: ToyNetwork) -> list[list[int]]:
    """Bit offset of (step t, layer l)."""
    out, k = [], 0
    for _ in range(net.steps):
        row = []
        for n in net.hidden:
            row.append(k)
            k += n
        out.append(row)
    return out


def _config_run(net, params, x, y, bits, rule: Rule | None):
    """Loss ``[I]``, log-probability ``[I]``, sum of ``|z|`` ``[I]`` for fixed bits ``[I, N]``.

    ``rule=None``: spikes are constants (for the exact gradient through ``P``);
    otherwise ``h = bits`` with backward ``dh/du := rule(u, sigma, h)`` and a detached ``P``.
    """
    offs = _offsets(net)
    state = {"logp": x.new_zeros(x.shape[0]), "absz": x.new_zeros(x.shape[0])}
    sigma = net.sigma

    def spike(u, layer, t):
        k = offs[t][layer]
        h = bits[:, k:k + u.shape[1]]
        z = u / sigma
        lp = torch.special.log_ndtr(torch.where(h > 0, z, -z)).sum(1)
        if rule is None:
            state["logp"] = state["logp"] + lp
            state["absz"] = state["absz"] + z.detach().abs().sum(1)
            return h
        state["logp"] = state["logp"] + lp.detach()
        jac = rule(u.detach(), torch.full_like(u, sigma), h).to(u.dtype).detach()
        return h + jac * (u - u.detach())

    loss = _run(net, params, x, y, spike)
    return loss, state["logp"], state["absz"]


def _expand(x: Tensor, y: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """Items ordered (config, example): ``[M * B, ...]``."""
    return x.repeat(m, 1, 1), y.repeat(m)


def expected_loss(net: ToyNetwork, x: Tensor, y: Tensor, max_items: int = 1 << 16) -> Tensor:
    """``E[L] = 1/B sum_b sum_s P_b(s) L_b(s)`` by enumeration (differentiable)."""
    _check_xy(net, x, y)
    total = x.new_zeros(())
    params = net.parameters()
    for start, stop in _chunks(net, x.shape[0], max_items):
        bits = _bits(net.num_units, start, stop, x.dtype).repeat_interleave(x.shape[0], 0)
        xs, ys = _expand(x, y, stop - start)
        loss, logp, _ = _config_run(net, params, xs, ys, bits, None)
        total = total + (logp.exp() * loss).sum()
    return total / x.shape[0]


def exact_gradient(net: ToyNetwork, x: Tensor, y: Tensor,
                   max_items: int = 1 << 16) -> tuple[list[Tensor], float]:
    """Exact gradient of the expected loss by enumerating every spike configuration.

    Args:
        net: the network (``net.num_units <= MAX_UNITS``).
        x: inputs ``[B, T, n_in]``. y: labels ``[B]``.
        max_items: (configuration, example) pairs evaluated at once (memory bound).

    Returns:
        ``(grads, mean_abs_z)``: one gradient per :meth:`ToyNetwork.parameters` entry and
        the expected mean ``|z| = |u| / sigma`` over units, steps and examples.
    """
    _check_xy(net, x, y)
    params = [p.detach().clone().requires_grad_() for p in net.parameters()]
    grads = [torch.zeros_like(p) for p in params]
    absz = 0.0
    batch = x.shape[0]
    for start, stop in _chunks(net, batch, max_items):
        bits = _bits(net.num_units, start, stop, x.dtype).repeat_interleave(batch, 0)
        xs, ys = _expand(x, y, stop - start)
        loss, logp, sz = _config_run(net, params, xs, ys, bits, None)
        prob = logp.exp()
        part = torch.autograd.grad((prob * loss).sum() / batch, params)
        grads = [g + d for g, d in zip(grads, part)]
        absz += float((prob.detach() * sz).sum()) / (batch * net.num_units)
    return grads, absz


def estimator_moments(net: ToyNetwork, x: Tensor, y: Tensor, rule: Rule,
                      max_items: int = 1 << 15) -> tuple[Tensor, dict[str, float]]:
    """Exact mean and per-layer variance of a single-sample estimator, by enumeration.

    Returns:
        ``(mean [P], variance)``: the flattened ``E[g_hat]`` of the batch-mean gradient
        and ``trace(Cov)`` per layer (:meth:`ToyNetwork.groups`) and ``"all"``.
    """
    _check_xy(net, x, y)
    batch = x.shape[0]
    base = net.parameters()
    sizes = [p.numel() for p in base]
    slices = _group_slices(net, sizes)
    mean_b = x.new_zeros(batch, sum(sizes))   # E_b[g_hat]
    sq_b = {n: x.new_zeros(batch) for n in slices}  # E_b[||g_hat||^2] per layer
    for start, stop in _chunks(net, batch, max_items):
        m = stop - start
        items = m * batch
        params = [p.detach().unsqueeze(0).repeat(items, *([1] * p.dim())).requires_grad_()
                  for p in base]
        bits = _bits(net.num_units, start, stop, x.dtype).repeat_interleave(batch, 0)
        xs, ys = _expand(x, y, m)
        loss, logp, _ = _config_run(net, params, xs, ys, bits, rule)
        g = torch.autograd.grad(loss.sum(), params)
        flat = torch.cat([d.reshape(items, -1) for d in g], 1)  # [items, P]
        w = logp.exp()[:, None]
        mean_b += (w * flat).view(m, batch, -1).sum(0)
        for n, sl in slices.items():
            sq_b[n] += (w[:, 0] * flat[:, sl].pow(2).sum(1)).view(m, batch).sum(0)
    mean = mean_b.mean(0)
    # E_b||g||^2 - ||E_b g||^2 cancels to a rounding error (e.g. -5.6e-17) when an
    # estimator's gradient does not vary: clamp each example's variance at 0
    var = {n: float((sq_b[n] - mean_b[:, sl].pow(2).sum(1)).clamp_min(0).sum()) / batch ** 2
           for n, sl in slices.items()}
    return mean, var


def sample_gradients(net: ToyNetwork, x: Tensor, y: Tensor, estimator: str | Estimator,
                     num_samples: int, generator: torch.Generator | None = None) -> Tensor:
    """Monte Carlo single-sample estimates of the batch-mean gradient ``[S, P]``.

    Each sample draws fresh noise for every unit, step and example and back-propagates
    through :class:`~sbnn_addons.estimators.BernoulliSpike` (the library's autograd
    Function), so this checks the library's backward, not the enumeration formulas.
    """
    _check_xy(net, x, y)
    if (count := as_int(num_samples)) is None or count < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    num_samples = count
    est = get_estimator(estimator)
    batch = x.shape[0]
    items = num_samples * batch
    params = [p.detach().unsqueeze(0).repeat(items, *([1] * p.dim())).requires_grad_()
              for p in net.parameters()]
    xs, ys = _expand(x, y, num_samples)

    def spike(u, layer, t):
        eps = torch.randn(u.shape, generator=generator, dtype=u.dtype)
        sigma = torch.full_like(u, net.sigma)
        return apply_function(BernoulliSpike, u, sigma, eps, est, False)

    loss = _run(net, params, xs, ys, spike)
    g = torch.autograd.grad(loss.sum(), params)
    flat = torch.cat([d.reshape(items, -1) for d in g], 1)
    return flat.view(num_samples, batch, -1).mean(1)


def _check_xy(net: ToyNetwork, x: Tensor, y: Tensor) -> None:
    """``x [B, T, n_in]`` finite, of the network's dtype, ``B >= 1``; ``y [B]`` integer
    labels in ``[0, C)``."""
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"x and y must be torch.Tensors, got {type(x).__name__} and "
                        f"{type(y).__name__}")
    if x.dim() != 3 or x.shape[1] != net.steps or x.shape[2] != net.weights[0].shape[1]:
        raise ValueError(f"x must be [B, T={net.steps}, n_in={net.weights[0].shape[1]}], "
                         f"got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("x holds no examples (B = 0): there is no gradient to estimate")
    if x.dtype != net.dtype:
        raise TypeError(f"x must have the network's dtype {net.dtype}, got {x.dtype}; "
                        f"convert it with x.to({net.dtype})")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or inf values: every gradient would be NaN")
    if y.shape != x.shape[:1]:
        raise ValueError(f"y must be [B] = [{x.shape[0]}], got {tuple(y.shape)}")
    classes = net.weights[-1].shape[0]
    if y.is_floating_point() or y.dtype == torch.bool or (
            net.loss == "ce" and (int(y.min()) < 0 or int(y.max()) >= classes)):
        raise ValueError(f"y must be integer class labels in [0, {classes}), got "
                         f"{y.tolist() if y.numel() <= 8 else y.dtype}")
    if net.num_units > MAX_UNITS:
        raise ValueError(f"{net.num_units} unit-steps is too many to enumerate "
                         f"(max {MAX_UNITS})")


def _group_slices(net: ToyNetwork, sizes: list[int]) -> dict[str, slice]:
    starts = [0]
    for s in sizes:
        starts.append(starts[-1] + s)
    out = {n: slice(starts[idx[0]], starts[idx[-1] + 1]) for n, idx in net.groups().items()}
    out["hidden"] = slice(0, out["readout"].start)
    out["all"] = slice(0, starts[-1])
    return out


def flatten(grads: Sequence[Tensor]) -> Tensor:
    """Concatenate per-parameter gradients into one vector ``[P]``."""
    return torch.cat([g.reshape(-1) for g in grads])


# --------------------------------------------------------------------------- comparison
def compare(net: ToyNetwork, x: Tensor, y: Tensor,
            rules: dict[str, Rule] | None = None) -> list[dict]:
    """Bias, variance, cosine and relative errors of each rule against the exact gradient.

    Returns:
        One row per (estimator, layer) with keys ``estimator, layer, bias, variance,
        cosine, rel_bias, rel_error, grad_norm, mean_abs_z``; ``layer`` is ``layer1``..,
        ``readout`` or ``all``.
    """
    rules = default_rules() if rules is None else rules
    exact, absz = exact_gradient(net, x, y)
    g = flatten(exact)
    slices = _group_slices(net, [p.numel() for p in exact])
    rows = []
    for name, rule in rules.items():
        mean, var = estimator_moments(net, x, y, rule)
        for layer, sl in slices.items():
            d, gl, ml = mean[sl] - g[sl], g[sl], mean[sl]
            norm = float(gl.norm())
            bias = float(d.norm())
            denom = float(gl.norm() * ml.norm())
            rows.append({
                "estimator": name, "layer": layer, "bias": bias, "variance": var[layer],
                "cosine": float(gl @ ml) / denom if denom > 0 else float("nan"),
                "rel_bias": bias / norm if norm > 0 else float("nan"),
                "rel_error": math.sqrt(bias ** 2 + var[layer]) / norm if norm > 0
                else float("nan"),
                "grad_norm": norm, "mean_abs_z": absz,
            })
    return rows


_METRICS = ("bias", "variance", "cosine", "rel_bias", "rel_error", "grad_norm", "mean_abs_z")


def _check_networks(networks) -> int:
    if (count := as_int(networks)) is None or count < 1:
        raise ValueError(f"networks must be an integer >= 1 (random networks per point), "
                         f"got {networks!r}")
    return count


def _averaged(configs, rules, batch, seed) -> list[dict]:
    """Mean of :func:`compare` rows over several random networks."""
    acc: dict[tuple, dict] = {}
    for i, (net, meta) in enumerate(configs):
        x, y = make_inputs(net, batch, seed + i)
        for row in compare(net, x, y, rules):
            key = (*meta.items(), row["estimator"], row["layer"])
            slot = acc.setdefault(key, {**meta, "estimator": row["estimator"],
                                        "layer": row["layer"], "n": 0,
                                        **{m: 0.0 for m in _METRICS}})
            slot["n"] += 1
            for m in _METRICS:
                slot[m] += row[m]
    rows = []
    for slot in acc.values():
        n = slot.pop("n")
        rows.append({**slot, **{m: slot[m] / n for m in _METRICS}})
    return rows


def sweep_noise(scales: Sequence[float] = (0.25, 0.5, 1, 2, 4, 8), *, neuron: str = "binary",
                width: int = 3, depth: int = 2, steps: int | None = None, networks: int = 4,
                batch: int = 4, seed: int = 0, rules: dict[str, Rule] | None = None
                ) -> list[dict]:
    """Metrics against the noise level: the weight scale sets ``mean |z|`` (sigma = 1).

    Each row is averaged over ``networks`` random networks; ``mean_abs_z`` is exact.
    """
    networks = _check_networks(networks)
    configs = []
    for s in scales:
        for k in range(networks):
            net = make_network((4, *[width] * depth, 2), neuron=neuron, steps=steps,
                               weight_scale=s, seed=seed + k)
            configs.append((net, {"sweep": "noise", "neuron": neuron, "depth": depth,
                                  "width": width, "steps": net.steps, "weight_scale": s}))
    return _averaged(configs, rules, batch, seed)


def sweep_depth(depths: Sequence[int] = (1, 2, 3, 4), *, neuron: str = "binary",
                width: int = 3, weight_scale: float = 1.0, steps: int | None = None,
                networks: int = 4, batch: int = 4, seed: int = 0,
                rules: dict[str, Rule] | None = None) -> list[dict]:
    """Metrics against the number of hidden layers at a fixed weight scale."""
    networks = _check_networks(networks)
    configs = []
    for d in depths:
        for k in range(networks):
            net = make_network((4, *[width] * d, 2), neuron=neuron, steps=steps,
                               weight_scale=weight_scale, seed=seed + k)
            configs.append((net, {"sweep": "depth", "neuron": neuron, "depth": d,
                                  "width": width, "steps": net.steps,
                                  "weight_scale": weight_scale}))
    return _averaged(configs, rules, batch, seed)


# --------------------------------------------------------------------------- plots
def plot_sweep(rows: list[dict], x_key: str, path, *, layer: str = "all",
               title: str = "") -> Path:
    """Two panels, relative bias and variance (log scale) of each estimator against
    ``x_key`` (``"mean_abs_z"`` or ``"depth"``), for one ``layer``; PNG.

    Raises:
        ValueError: no row has that ``layer``, or ``x_key`` is not a column of the rows.
    """
    from .uncertainty import _pyplot, _save

    sel = [r for r in rows if r["layer"] == layer]
    if not sel:  # an empty figure, silently
        raise ValueError(f"no rows for layer {layer!r}; the rows have layers "
                         f"{sorted({r['layer'] for r in rows})}")
    if any(x_key not in r for r in sel):  # a KeyError
        raise ValueError(f"x_key {x_key!r} is not a column of the rows; use 'mean_abs_z', "
                         f"'depth' or another of {sorted(sel[0])}")
    plt = _pyplot()
    names = list(dict.fromkeys(r["estimator"] for r in sel))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in names:
        pts = sorted((r[x_key], r) for r in sel if r["estimator"] == name)
        xs = [p[0] for p in pts]
        style = "--" if name in SURROGATES else "-"
        axes[0].plot(xs, [p[1]["rel_bias"] for p in pts], style, marker="o", ms=3, label=name)
        rel_var = [p[1]["variance"] / max(p[1]["grad_norm"] ** 2, 1e-300) for p in pts]
        axes[1].plot(xs, rel_var, style, marker="o", ms=3, label=name)
    label = {"mean_abs_z": "mean |z|  (|u| / sigma)", "depth": "hidden layers"}.get(x_key, x_key)
    axes[0].set_ylabel("relative bias  ||E[g^] - g|| / ||g||")
    axes[1].set_ylabel("relative variance  tr Cov / ||g||^2")
    for ax in axes:
        ax.set_xlabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(title or f"gradient estimators, layer: {layer}", fontsize=10)
    return _save(fig, path)


# --------------------------------------------------------------------------- CLI

def build_parser(prog: str = "python -m sbnn_addons.diagnostics") -> argparse.ArgumentParser:
    """The argument parser of :func:`main`."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Exact bias/variance of spike-gradient estimators by enumeration.")
    p.add_argument("--out-dir", default="runs/diagnostics", help="CSV and PNG folder")
    p.add_argument("--neuron", nargs="+", default=["binary", "lif"], choices=["binary", "lif"])
    p.add_argument("--width", type=positive_int, default=3, help="units per hidden layer")
    p.add_argument("--depth", type=positive_int, default=2,
                   help="hidden layers in the noise sweep")
    p.add_argument("--depths", type=positive_int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--lif-width", type=positive_int, default=2, help="units per layer for lif")
    p.add_argument("--lif-depths", type=positive_int, nargs="+", default=[1, 2, 3])
    p.add_argument("--steps", type=positive_int, default=3, help="time steps for lif")
    p.add_argument("--scales", type=float, nargs="+", default=[0.25, 0.5, 1, 2, 4, 8],
                   help="weight scales of the noise sweep (sigma = 1)")
    p.add_argument("--depth-scale", type=float, default=1.0,
                   help="weight scale of the depth sweep")
    p.add_argument("--networks", type=positive_int, default=4, help="random networks per point")
    p.add_argument("--batch", type=positive_int, default=4, help="input examples per network")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-surrogates", action="store_true", help="IW-ST family only")
    p.add_argument("--no-plots", action="store_true")
    return p


COLUMNS = ["sweep", "neuron", "depth", "width", "steps", "weight_scale", "mean_abs_z",
           "estimator", "layer", "bias", "variance", "cosine", "rel_bias", "rel_error",
           "grad_norm"]


def main(argv: Sequence[str] | None = None, prog: str = "python -m sbnn_addons.diagnostics"
         ) -> int:
    """Run the noise and depth sweeps; write ``diagnostics.csv`` and PNG figures.

    Figures (per neuron kind): ``{neuron}_bias_variance_vs_z.png`` and
    ``{neuron}_bias_variance_vs_depth.png`` (all hidden-layer parameters, readout
    excluded: it is exact for every estimator). Prints a summary of the noise sweep.

    Args:
        argv: argument list (``None``: ``sys.argv[1:]``); see :func:`build_parser`.
        prog: program name shown in the help (``sbnn-bench diagnostics`` from the CLI).

    Returns:
        Exit status 0.
    """
    args = build_parser(prog).parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rules = default_rules(surrogates=not args.no_surrogates)
    rows: list[dict] = []
    for neuron in args.neuron:
        lif = neuron == "lif"
        width = args.lif_width if lif else args.width
        steps = args.steps if lif else None
        depth = min(args.depth, max(args.lif_depths)) if lif else args.depth
        noise = sweep_noise(args.scales, neuron=neuron, width=width, depth=depth, steps=steps,
                            networks=args.networks, batch=args.batch, seed=args.seed,
                            rules=rules)
        deep = sweep_depth(args.lif_depths if lif else args.depths, neuron=neuron, width=width,
                           weight_scale=args.depth_scale, steps=steps,
                           networks=args.networks, batch=args.batch, seed=args.seed,
                           rules=rules)
        hidden_noise = [r for r in noise if r["layer"] == "hidden"]
        hidden_deep = [r for r in deep if r["layer"] == "hidden"]
        rows += noise + deep
        if not args.no_plots:
            plot_sweep(hidden_noise, "mean_abs_z", out / f"{neuron}_bias_variance_vs_z.png",
                       layer="hidden", title=f"{neuron}: hidden layers, against mean |z|")
            plot_sweep(hidden_deep, "depth", out / f"{neuron}_bias_variance_vs_depth.png",
                       layer="hidden",
                       title=f"{neuron}: hidden layers, against depth "
                             f"(weight scale {args.depth_scale:g})")
        _summary(neuron, hidden_noise)
    with open(out / "diagnostics.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    print(f"wrote {out / 'diagnostics.csv'}" + ("" if args.no_plots else " and PNG figures"))
    return 0


def _summary(neuron: str, rows: list[dict]) -> None:
    scales = sorted({r["weight_scale"] for r in rows})
    names = list(dict.fromkeys(r["estimator"] for r in rows))
    print(f"\n[{neuron}] hidden layers: relative bias / relative variance per weight scale")
    head = "estimator".ljust(18) + "".join(
        f"s={s:g} |z|={_z(rows, s):.2f}".rjust(24) for s in scales)
    print(head)
    for n in names:
        cells = []
        for s in scales:
            r = next(r for r in rows if r["estimator"] == n and r["weight_scale"] == s)
            rv = r["variance"] / max(r["grad_norm"] ** 2, 1e-300)
            cells.append(f"{r['rel_bias']:.3g} / {rv:.3g}".rjust(24))
        print(n.ljust(18) + "".join(cells))


def _z(rows, s) -> float:
    return next(r["mean_abs_z"] for r in rows if r["weight_scale"] == s)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
