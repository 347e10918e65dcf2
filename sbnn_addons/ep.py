"""Expectation propagation for feed-forward binary networks (experimental, Method page, section 9).

A gradient-free trainer in the assumed-density (ADF / probabilistic-backpropagation) form
of expectation propagation, after "Training of Spiking Neural Networks with
Expectation-Propagation" (Yao, McLaughlin, Altmann; arXiv 2506.23757). The paper's exact
message schedule was not available; this module implements the ADF form of EP used by
expectation backpropagation and probabilistic backpropagation (PBP):

.. code-block:: text

    posterior      q(W) = prod_ij N(w_ij; m_ij, v_ij)            (factorised Gaussian), or
                   q(W) = prod_ij Bern(w_ij = +1; (1 + m_ij)/2)  (w in {-1, +1}, v = 1 - m^2)
    forward        E[u_j]   = sum_i m_ij E[v_i]  (+ bias mean)
                   Var[u_j] = sum_i v_ij E[v_i^2] + m_ij^2 (E[v_i^2] - E[v_i]^2)
                            (= sum_i E[w^2] E[v^2] - E[w]^2 E[v]^2)
    Heaviside unit P(v_j = 1) = Phi(E[u_j] / sqrt(Var[u_j] + s_n^2))
    sigmoid unit   P(v_j = 1) = E[sigmoid(u_j)] ~= Phi(E[u_j] / sqrt(Var[u_j] + 8/pi + s_n^2))
    output         log Z = sum_k log Phi(t_k E[u_k] / sqrt(Var[u_k] + s_0^2)),  t_k = +-1
    update         m <- m + d * v * dlogZ/dm                                (Gaussian)
                   v <- v - d * v^2 * ((dlogZ/dm)^2 - 2 dlogZ/dv),   v >= var_floor
                   theta = atanh(m) <- theta + d * (g + m (g^2 - 2 h)),        (binary)
                   m = tanh(theta), v = 1 - m^2 >= var_floor,   g = dlogZ/dm, h = dlogZ/dv

(the update lines are for one example; a mini-batch adds the per-example sites, see
:meth:`EPNetwork.update`). Binary (+-1) weights (``EPNetwork(..., weights="binary")``) get
the Bernoulli moment match of the second-order expansion of ``log Z`` in the weight, as in
expectation backpropagation (Soudry, Hubara, Meir 2014); biases stay Gaussian. Their
deterministic network uses ``sign(m)``, and they export as moment-matched Gaussians.

Hidden binary units are marginalised (their firing probabilities are propagated), never
sampled. ``d`` in (0, 1] is the damping. The derivatives of ``log Z`` come from autograd;
the learning rule is the moment-matching update, not gradient descent on a loss.

Trained networks export to :class:`~sbnn_addons.BayesLinear` layers (``std_mode="weight"``,
fixed std) with :class:`~sbnn_addons.IWSTSpike` units for ``sample`` / ``mean`` / ``mc(K)``
evaluation (:func:`EPNetwork.to_sbnn_layers`), and import from them
(:func:`from_sbnn_layers`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import as_float, as_int, check_flag
from .data.randman import TASK_DEFAULTS as RANDMAN_DEFAULTS
from .layers import BayesLinear
from .neurons import LIF
from .spike import IWSTSpike

__all__ = [
    "EPNetwork",
    "EPTrainer",
    "propagate_moments",
    "probit_log_evidence",
    "from_sbnn_layers",
    "train",
    "bench_digits",
    "bench_task",
    "fit_static",
    "first_spike_features",
    "BENCH_TASKS",
    "TASK_DEFAULTS",
    "SIGMOID_PROBIT_VARIANCE",
]

#: ``8 / pi``: ``sigmoid(a) ~= Phi(a * sqrt(pi / 8))``, so a Bernoulli-sigmoid unit acts as a
#: Heaviside unit with Gaussian noise of this variance (MacKay's probit approximation).
SIGMOID_PROBIT_VARIANCE = 8.0 / math.pi

ACTIVATIONS = ("heaviside", "sigmoid")
WEIGHTS = ("gaussian", "binary")
#: variance floor of the initial binary posteriors (``1 - m^2 >= floor``)
_BINARY_INIT_FLOOR = 1e-6
_TINY = 1e-12
_SQRT1_2 = math.sqrt(0.5)


# --------------------------------------------------------------------------- validation
def _check_data(name: str, x: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; convert it with {name}.float()")
    if not x.is_meta and not bool(torch.isfinite(x).all()):  # (meta: no values to check)
        raise ValueError(
            f"{name} contains NaN or infinite values; EP needs finite inputs "
            f"(clean or impute them, e.g. torch.nan_to_num({name}))"
        )
    return x


def _check_damping(damping) -> float:
    if (number := as_float(damping)) is None:
        raise TypeError(f"damping must be a real number in (0, 1], got {type(damping).__name__}")
    damping = number
    if not (0.0 < damping <= 1.0):
        raise ValueError(
            f"damping must be in (0, 1] (1 = undamped moment matching), got {damping}"
        )
    return damping


def _check_positive(name: str, value, *, allow_zero: bool = False) -> float:
    if (number := as_float(value)) is None:
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = number
    ok = value >= 0 if allow_zero else value > 0
    if not math.isfinite(value) or not ok:
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, "
                         f"got {value}")
    return value


_RECURRENT = (nn.RNNBase, nn.RNNCellBase)
_CONV = (nn.modules.conv._ConvNd,)
_PASS = (nn.Identity, nn.Flatten, nn.Dropout)


def _unsupported(module: nn.Module) -> TypeError:
    name = type(module).__name__
    if isinstance(module, _CONV):
        why = "convolutional layers are not supported; EP handles fully connected layers only"
    elif isinstance(module, _RECURRENT):
        why = "recurrent layers are not supported; EP handles feed-forward networks only"
    elif isinstance(module, LIF):
        why = (f"a LIF neuron with membrane state (beta={module.beta:g}) is not supported; "
               "EP handles memoryless binary units: use LIF(beta=0, threshold=0) or IWSTSpike")
    elif any(hasattr(module, a) for a in ("mem", "v", "init_hidden", "reset_mechanism")):
        why = ("neurons with state (membrane potential / time dynamics) are not supported; "
               "EP handles memoryless binary units: use IWSTSpike or LIF(beta=0, threshold=0)")
    else:
        why = ("EP supports nn.Linear / BayesLinear layers separated by binary units "
               "(IWSTSpike, LIF(beta=0)), nn.Identity, nn.Flatten")
    return TypeError(f"unsupported module {name} in the EP network: {why}")


def _binary_theta_limit(var_floor: float) -> float:
    """Largest ``|theta|`` of a binary weight whose variance ``1 - tanh(theta)^2 =
    1 / cosh(theta)^2`` stays ``>= var_floor``: ``acosh(1 / sqrt(var_floor))``."""
    return math.acosh(1.0 / math.sqrt(var_floor)) if var_floor < 1.0 else 0.0


def _tanh_moments(theta: Tensor) -> tuple[Tensor, Tensor]:
    """``(m, v) = (tanh(theta), 1 - tanh(theta)^2)`` of a +-1 weight with log-odds ``2 theta``.

    Written as ``m = s(2 theta) - s(-2 theta)``, ``v = 4 s(2 theta) s(-2 theta)`` with
    ``s = sigmoid``: ``v`` keeps its relative precision as ``|m| -> 1`` (``1 - m^2``
    would cancel), and ``sigmoid`` avoids the threaded ``tanh`` / ``exp`` kernels, which
    are orders of magnitude slower on small tensors on a loaded multi-core CPU.
    """
    p, q = torch.sigmoid(2.0 * theta), torch.sigmoid(-2.0 * theta)
    return p - q, 4.0 * p * q


# --------------------------------------------------------------------------- maths
def propagate_moments(
    means: Sequence[Tensor],
    variances: Sequence[Tensor],
    x: Tensor,
    *,
    bias: bool = True,
    unit_noise_var: float = 0.0,
    return_hidden: bool = False,
):
    """Forward messages: moments of every pre-activation, hidden units marginalised.

    .. code-block:: text

        E[u]   = E[v] @ m^T
        Var[u] = E[v^2] @ v^T + (E[v^2] - E[v]^2) @ (m^2)^T
        P(h = 1) = Phi(E[u] / sqrt(Var[u] + unit_noise_var)),  E[h] = E[h^2] = P(h = 1)

    The input is observed: ``E[v] = x``, ``E[v^2] = x^2``. With ``bias`` a constant input 1
    is appended (the last column of each ``m``, ``v`` is the bias).

    Args:
        means: per layer ``m`` of shape ``[out, in (+1)]`` (or ``[B, out, in (+1)]``, one
            copy per example).
        variances: per layer ``v`` of the same shapes (``> 0``).
        x: input ``[B, in]``.
        bias: layers carry a bias column.
        unit_noise_var: extra Gaussian noise variance of hidden units (``8/pi`` for sigmoid).
        return_hidden: also return the hidden firing probabilities.

    Returns:
        ``(mu, var)`` of the output pre-activations ``[B, out]``, and with
        ``return_hidden`` a list of hidden probabilities ``[B, hidden_l]``.
    """
    ev, ev2 = x, x * x
    hidden = []
    last = len(means) - 1
    for i, (m, v) in enumerate(zip(means, variances)):
        if bias:
            one = torch.ones_like(ev[..., :1])
            ev, ev2 = torch.cat([ev, one], -1), torch.cat([ev2, one], -1)
        mu = _affine(ev, m)
        var = _affine(ev2, v) + _affine((ev2 - ev * ev).clamp_min(0), m * m)
        if i == last:
            return (mu, var, hidden) if return_hidden else (mu, var)
        p = torch.special.ndtr(mu / torch.sqrt(var + unit_noise_var + _TINY))
        hidden.append(p)
        ev, ev2 = p, p
    raise ValueError("the network needs at least one layer")


def _affine(a: Tensor, w: Tensor) -> Tensor:
    """``a @ w^T`` for shared ``w [out, in]``, or per example for ``w [B, out, in]``."""
    if w.dim() == 2:
        return a @ w.T
    return torch.einsum("bi,boi->bo", a, w)


def probit_log_evidence(mu: Tensor, var: Tensor, targets: Tensor, noise_var: float = 0.0):
    """Per-example ``log Z = sum_k log Phi(t_k mu_k / sqrt(var_k + s_0^2))``.

    Args:
        mu: output pre-activation means ``[B, K]``.
        var: output pre-activation variances ``[B, K]``.
        targets: signs ``t`` in {-1, +1}, ``[B, K]``.
        noise_var: output noise variance ``s_0^2``.

    Returns:
        ``[B]``.
    """
    z = targets * mu / torch.sqrt(var + noise_var + _TINY)
    return log_ndtr(z).sum(-1)


def log_ndtr(z: Tensor) -> Tensor:
    """``log Phi(z)``, stable in both tails.

    ``log(erfcx(-z/sqrt 2) / 2) - z^2/2`` for ``z < 0``, ``log1p(-Phi(-z))`` otherwise
    (written out so that both branches have finite gradients under ``torch.where``).
    """
    neg = z < 0
    zero = torch.zeros_like(z)
    zn, zp = torch.where(neg, z, zero), torch.where(neg, zero, z)
    left = torch.log(torch.special.erfcx(-zn * _SQRT1_2) * 0.5) - 0.5 * zn * zn
    right = torch.log1p(-0.5 * torch.erfc(zp * _SQRT1_2))
    return torch.where(neg, left, right)


def _sign_targets(y: Tensor, num_classes: int, dtype) -> Tensor:
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if y.is_floating_point():
        _check_data("y", y)
        if y.dim() != 2 or y.shape[1] != num_classes or not (
                y.is_meta or bool((y.abs() == 1).all())):
            raise ValueError(
                f"floating y must be +-1 sign targets of shape [B, {num_classes}]; "
                "pass integer class labels otherwise"
            )
        return y.to(dtype)
    if y.dim() != 1:
        raise ValueError(f"integer y must be class labels of shape [B], got {tuple(y.shape)}")
    if y.numel() and not y.is_meta and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"class labels y must be in [0, {num_classes}), got range "
                         f"[{int(y.min())}, {int(y.max())}]")
    t = -torch.ones((y.shape[0], num_classes), dtype=dtype, device=y.device)
    t[torch.arange(y.shape[0], device=y.device), y] = 1.0
    return t


# --------------------------------------------------------------------------- network
class EPNetwork(nn.Module):
    """Feed-forward network of binary units with a factorised weight posterior.

    The posterior is Gaussian ``N(m, v)`` per weight (``weights="gaussian"``), or Bernoulli
    over ``w`` in {-1, +1} with ``P(w = +1) = (1 + m)/2``, i.e. mean ``m`` in (-1, 1) and
    variance ``v = 1 - m^2`` (``weights="binary"``; biases stay Gaussian). Both are stored
    as ``(mean, variance)`` buffers and propagated by the same moment formulas.

    Args:
        layers: layer sizes ``[in, hidden..., out]`` (e.g. ``[64, 100, 10]``), or an
            ``nn.Sequential`` / list of ``nn.Linear`` / :class:`~sbnn_addons.BayesLinear`
            layers separated by binary units (:class:`~sbnn_addons.IWSTSpike`,
            ``LIF(beta=0)``); their weights (and stds) initialise the posterior, see
            :func:`from_sbnn_layers`. Convolutions, recurrent layers and neurons with state
            raise ``TypeError``.
        activation: hidden units, ``"heaviside"`` (``1[u > 0]``) or ``"sigmoid"``
            (Bernoulli-sigmoid, probit approximation).
        prior_std: std of the zero-mean Gaussian prior on every weight and bias (binary
            weights: on the biases only).
        bias: give each unit a bias (a weight on a constant input 1).
        init_std: std of the random initial means (symmetry breaking); default
            ``prior_std``. The initial variances are ``prior_std^2``. Binary weights start
            at ``m = tanh(theta)``, ``theta ~ N(0, init_std^2)``, ``v = 1 - m^2``.
        unit_noise_std: Gaussian noise std ``s_n`` of hidden units (added to ``Var[u]``).
        output_noise_std: noise std ``s_0`` of the probit output likelihood.
        seed: seed of the initial means.
        dtype: floating dtype of the posterior.
        weights: ``"gaussian"`` (real weights) or ``"binary"`` (+-1 weights, Bernoulli
            posteriors, see :meth:`update`). Binary networks start from layer sizes;
            ``layers`` given as modules raise ``ValueError``.

    Attributes:
        means, variances: lists of ``[out, in (+1)]`` tensors (last column: bias). For
            binary weights ``variances = 1 - means^2`` on the weight columns.
    """

    def __init__(
        self,
        layers: Sequence[int] | nn.Module | Sequence[nn.Module],
        *,
        activation: str = "heaviside",
        prior_std: float = 1.0,
        bias: bool = True,
        init_std: float | None = None,
        unit_noise_std: float = 0.0,
        output_noise_std: float = 0.0,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        weights: str = "gaussian",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if not isinstance(weights, str) or weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS} (factorised Gaussian or +-1 "
                             f"weights with Bernoulli posteriors), got {weights!r}")
        self.activation = activation
        self.weights = weights
        self.prior_std = _check_positive("prior_std", prior_std)
        self.unit_noise_std = _check_positive("unit_noise_std", unit_noise_std, allow_zero=True)
        self.output_noise_std = _check_positive("output_noise_std", output_noise_std,
                                                allow_zero=True)
        init_std = self.prior_std if init_std is None else _check_positive("init_std", init_std,
                                                                          allow_zero=True)
        self.bias = check_flag("bias", bias)
        loaded = None
        if isinstance(layers, nn.Module) or (
            isinstance(layers, Sequence) and any(isinstance(m, nn.Module) for m in layers)
        ):
            if weights == "binary":
                raise ValueError(
                    "weights='binary' networks start from layer sizes [in, ..., out] (the "
                    "+-1 posteriors are initialised from the seed); building one from "
                    "modules is not supported, their real-valued weights are not +-1"
                )
            sizes, loaded = _parse_modules(layers, self.bias, dtype)
        else:
            sizes = [as_int(s) for s in layers]
            if len(sizes) < 2 or any(n is None or n < 1 for n in sizes):
                raise ValueError(f"layers must be >= 2 positive integer sizes [in, ..., out], "
                                 f"got {layers!r}")
        self.sizes = sizes
        gen = torch.Generator().manual_seed(seed)
        extra = 1 if self.bias else 0
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            if loaded is not None:
                m, v = _assemble(*loaded[i], self.prior_var, dtype)
            else:
                m = torch.randn(n_out, n_in + extra, generator=gen, dtype=torch.float64)
                m = m * init_std
                v = torch.full((n_out, n_in + extra), self.prior_std**2, dtype=torch.float64)
                if weights == "binary":  # m = tanh(theta), v = 1 - m^2 (bias stays Gaussian)
                    t_max = _binary_theta_limit(_BINARY_INIT_FLOOR)
                    m[:, :n_in], v[:, :n_in] = _tanh_moments(m[:, :n_in].clamp(-t_max, t_max))
            self.register_buffer(f"mean{i}", m.to(dtype).clone())
            self.register_buffer(f"var{i}", v.to(dtype).clone())

    # ------------------------------------------------------------------ state
    @property
    def num_layers(self) -> int:
        return len(self.sizes) - 1

    @property
    def means(self) -> list[Tensor]:
        return [getattr(self, f"mean{i}") for i in range(self.num_layers)]

    @property
    def variances(self) -> list[Tensor]:
        return [getattr(self, f"var{i}") for i in range(self.num_layers)]

    @property
    def prior_var(self) -> float:
        return self.prior_std**2

    @property
    def unit_noise_var(self) -> float:
        extra = SIGMOID_PROBIT_VARIANCE if self.activation == "sigmoid" else 0.0
        return self.unit_noise_std**2 + extra

    def _num_binary(self, layer: int) -> int:
        """Number of leading +-1 (Bernoulli) columns of layer ``layer`` (0: all Gaussian)."""
        return self.sizes[layer] if self.weights == "binary" else 0

    def mean_variance(self) -> float:
        """Average posterior variance over all weights and biases."""
        total = sum(float(v.sum()) for v in self.variances)
        return total / sum(v.numel() for v in self.variances)

    def _input(self, x: Tensor) -> Tensor:
        _check_data("x", x)
        if x.dim() == 3:  # rate-coded [T, B, F]: average over time
            x = x.mean(0)
        if x.dim() != 2 or x.shape[-1] != self.sizes[0]:
            raise ValueError(
                f"x must be [B, {self.sizes[0]}] (or rate-coded [T, B, {self.sizes[0]}]), "
                f"got shape {tuple(x.shape)}"
            )
        return x.to(self.mean0.dtype)

    # ------------------------------------------------------------------ inference
    def output_moments(self, x: Tensor, return_hidden: bool = False):
        """``(E[u], Var[u])`` of the output pre-activations ``[B, K]`` (hidden marginalised);
        with ``return_hidden`` also the hidden firing probabilities."""
        return propagate_moments(self.means, self.variances, self._input(x), bias=self.bias,
                                 unit_noise_var=self.unit_noise_var, return_hidden=return_hidden)

    def log_evidence(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-example ``log Z`` (predictive log-likelihood of the labels) ``[B]``."""
        mu, var = self.output_moments(x)
        t = _sign_targets(y, self.sizes[-1], mu.dtype)
        return probit_log_evidence(mu, var, t, self.output_noise_std**2)

    @torch.no_grad()
    def predict_proba(self, x: Tensor) -> Tensor:
        """Predictive class probabilities ``[B, K]``: the one-vs-rest probit probabilities
        ``Phi(E[u_k] / sqrt(Var[u_k] + s_0^2))`` normalised over ``k``."""
        mu, var = self.output_moments(x)
        p = torch.special.ndtr(mu / torch.sqrt(var + self.output_noise_std**2 + _TINY))
        p = p.clamp_min(1e-12)
        return p / p.sum(-1, keepdim=True)

    @torch.no_grad()
    def deterministic_logits(self, x: Tensor) -> Tensor:
        """Deterministic pass: posterior-mean weights, hidden units ``1[u > 0]``; returns the
        output pre-activations ``[B, K]`` (the ``mean`` mode of the exported network).

        With ``weights="binary"`` the weights are ``sign(m)`` in {-1, +1} (``m = 0`` gives
        +1; biases keep their means): the deployable +-1 network, i.e. each weight's most
        probable value. This differs from the ``mean`` mode of :meth:`to_sbnn_layers`,
        which uses the real-valued means ``m``.
        """
        h = self._input(x)
        for i, m in enumerate(self.means):
            w, b = (m[:, :-1], m[:, -1]) if self.bias else (m, None)
            if self._num_binary(i):
                w = torch.where(w >= 0, torch.ones_like(w), -torch.ones_like(w))
            u = h @ w.T + (b if b is not None else 0.0)
            if i == self.num_layers - 1:
                return u
            h = (u > 0).to(u.dtype)
        raise AssertionError  # pragma: no cover

    def predict(self, x: Tensor, deterministic: bool = False) -> Tensor:
        """Class predictions ``[B]`` from :meth:`predict_proba` or, with ``deterministic``,
        from :meth:`deterministic_logits`."""
        scores = self.deterministic_logits(x) if deterministic else self.predict_proba(x)
        return scores.argmax(-1)

    # ------------------------------------------------------------------ learning
    def update(self, x: Tensor, y: Tensor, *, damping: float = 1.0,
               var_floor: float = 1e-6) -> Tensor:
        """One ADF / EP moment-matching update on the mini-batch ``(x, y)``.

        Each example ``n`` gives the ADF (moment-matched) posterior of one exact ADF step
        from the current ``q``,

        .. code-block:: text

            g_n = dlogZ_n/dm,  h_n = dlogZ_n/dv
            m_n = m + v g_n
            v_n = max(v - v^2 (g_n^2 - 2 h_n), var_floor)

        i.e. a Gaussian site ``q_n / q`` with natural parameters ``(1/v_n - 1/v,
        m_n/v_n - m/v)``. The sites of the mini-batch are multiplied into ``q`` (parallel
        EP: their natural parameters are summed), damped by ``d``:

        .. code-block:: text

            1/v_new     = 1/v   + d sum_n (1/v_n - 1/v)
            m_new/v_new = m/v   + d sum_n (m_n/v_n - m/v)

        For a batch of one with ``d = 1`` this is exactly the ADF update
        ``m <- m + v g``, ``v <- v - v^2 (g^2 - 2h)``. Where the summed precision is not
        positive, the weight keeps its old moments; variances are floored at ``var_floor``.

        **Binary weights** (``weights="binary"``, every column but the bias): ``w`` in
        {-1, +1} with ``P(w = +1) = (1 + m)/2``, ``v = 1 - m^2``, natural parameter
        ``theta = atanh(m)`` (half the log-odds). This is the assumed-density update of
        expectation backpropagation (Soudry, Hubara, Meir 2014), carried to second order.
        ``Z_n(m, v)`` is the Gaussian smoothing of the evidence with the weight clamped,
        ``Z_n(w) = Z_n(m=w, v=0)``, so ``dZ/dv = (1/2) d^2Z/dm^2`` and
        ``d^2 log Z/dm^2 = 2h - g^2``; expanding ``log Z_n`` to second order in ``w - m``
        (first order in ``v``):

        .. code-block:: text

            log Z_n(w) ~= log Z_n + (w - m) g_n + ((w - m)^2 - v) h_n - (w - m)^2 g_n^2 / 2
            log Z_n(+1) - log Z_n(-1) ~= 2 g_n + 2 m (g_n^2 - 2 h_n)

        (``2 g_n - 4 m h_n`` alone linearises ``log(Z_n(w) / Z_n)`` instead and misses the
        ``g_n^2`` term, which is of the same order). The Bernoulli family is closed under
        tilting by any function of ``w`` in {-1, +1}, so the tilted distribution
        ``q(w) Z_n(w)`` of the expanded evidence is Bernoulli again, and matching its
        moments is exact: ``theta_n = theta + (log Z_n(+1) - log Z_n(-1)) / 2``. The
        mini-batch sites are summed in ``theta`` (parallel EP) and damped:

        .. code-block:: text

            theta_new = theta + d sum_n (g_n + m (g_n^2 - 2 h_n))
            m_new     = clip(tanh(theta_new), -(1 - eps), 1 - eps),  1 - eps = sqrt(1 - var_floor)
            v_new     = 1 - m_new^2  (>= var_floor)

        (computed as ``tanh`` of ``theta_new`` clipped to ``+-acosh(1 / sqrt(var_floor))``,
        the same thing, with ``v_new = 4 sigmoid(2 theta) sigmoid(-2 theta)``).

        The bias column keeps the Gaussian update above.

        Returns:
            The per-example ``log Z_n`` before the update, ``[B]``.
        """
        damping = _check_damping(damping)
        var_floor = _check_positive("var_floor", var_floor)
        x = self._input(x)
        t = _sign_targets(y, self.sizes[-1], x.dtype)
        if t.shape[0] != x.shape[0]:
            raise ValueError(f"x and y have different numbers of examples: {x.shape[0]} vs "
                             f"{t.shape[0]}")
        means = [p.detach() for p in self.means]
        variances = [p.detach() for p in self.variances]
        bias, unit_var, out_var = self.bias, self.unit_noise_var, self.output_noise_std**2

        # per-example derivatives: every example gets its own leaf copy of (m, v), so the
        # gradient of sum_n log Z_n w.r.t. copy n is dlogZ_n/d(m, v)
        n = x.shape[0]
        with torch.enable_grad():
            ms = [p.expand(n, *p.shape).clone().requires_grad_(True) for p in means]
            vs = [p.expand(n, *p.shape).clone().requires_grad_(True) for p in variances]
            mu, var = propagate_moments(ms, vs, x, bias=bias, unit_noise_var=unit_var)
            logz = probit_log_evidence(mu, var, t, out_var)
            grads = torch.autograd.grad(logz.sum(), ms + vs)
        gm, gv = grads[: len(ms)], grads[len(ms):]
        with torch.no_grad():
            for i in range(self.num_layers):
                m, v = means[i], variances[i]
                g, h = gm[i], gv[i]  # [B, out, in]
                m_n = m + v * g
                v_n = (v - v * v * (g * g - 2.0 * h)).clamp_min(var_floor)
                prec = 1.0 / v + damping * (1.0 / v_n - 1.0 / v).sum(0)
                eta = m / v + damping * (m_n / v_n - m / v).sum(0)
                ok = prec > 0
                safe = torch.where(ok, prec, torch.ones_like(prec))
                new_v = torch.where(ok, 1.0 / safe, v).clamp_min(var_floor)
                new_m = torch.where(ok, eta / safe, m)
                k = self._num_binary(i)
                if k:  # +-1 weights: Bernoulli site update of theta = atanh(m)
                    new_m[:, :k], new_v[:, :k] = _binary_update(
                        m[:, :k], g[..., :k], h[..., :k], damping, var_floor)
                getattr(self, f"mean{i}").copy_(new_m)
                getattr(self, f"var{i}").copy_(new_v)
        return logz.detach()

    # ------------------------------------------------------------------ export
    def to_sbnn_layers(self) -> nn.Sequential:
        """Export to ``BayesLinear -> IWSTSpike -> ... -> BayesLinear`` (logits out).

        Each ``BayesLinear`` has ``std_mode="weight"``, ``learn_std=False`` (the EP stds
        ``sqrt(v)`` as a fixed buffer) and, with a bias, a per-unit bias noise
        ``softplus(bias_std_rho) = sqrt(v_bias)``. Hidden units are ``IWSTSpike("st")`` with
        own noise ``sqrt(unit_noise_var)`` (``sqrt(8/pi)`` for sigmoid units), i.e.
        ``1[u > 0]`` in ``mean`` mode. Use :func:`sbnn_addons.set_mode` /
        :func:`sbnn_addons.mc_predict` for ``sample`` / ``mean`` / ``mc(K)`` evaluation.
        The layers are on the network's device (that of its posterior buffers).

        Binary (+-1) weights are exported as their moment-matched Gaussians ``N(m, 1 - m^2)``
        (same mean and variance). The local reparameterisation of ``BayesLinear`` only uses
        these two moments of each weight (pre-activation mean ``sum m x``, variance
        ``sum v x^2``), so ``sample`` / ``mc(K)`` pre-activations have the same moments as
        with sampled +-1 weights; ``mean`` mode uses ``m``, not the ``sign(m)`` of
        :meth:`deterministic_logits`.
        """
        modules: list[nn.Module] = []
        for i, (m, v) in enumerate(zip(self.means, self.variances)):
            n_out, n_in = self.sizes[i + 1], self.sizes[i]
            layer = BayesLinear(
                n_in, n_out, bias=self.bias, std=1.0, std_mode="weight", learn_std=False,
                bias_std=1.0 if self.bias else None, dtype=m.dtype, device=m.device,
            )
            with torch.no_grad():
                layer.weight.copy_(m[:, :n_in])
                layer.fixed_std.copy_(v[:, :n_in].sqrt())
                if self.bias:
                    layer.bias.copy_(m[:, -1])
                    s_b = v[:, -1].sqrt().clamp_min(1e-20)
                    layer.bias_std_rho = nn.Parameter(s_b + torch.log(-torch.expm1(-s_b)))
            modules.append(layer)
            if i < self.num_layers - 1:
                noise = math.sqrt(self.unit_noise_var)
                modules.append(IWSTSpike("st", std=noise if noise > 0 else None).to(m.device))
        return nn.Sequential(*modules)

    def extra_repr(self) -> str:
        return (f"sizes={self.sizes}, weights={self.weights}, activation={self.activation}, "
                f"prior_std={self.prior_std:g}, bias={self.bias}")


def _binary_update(m: Tensor, g: Tensor, h: Tensor, damping: float,
                   var_floor: float) -> tuple[Tensor, Tensor]:
    """Damped parallel Bernoulli site update of +-1 weights (see :meth:`EPNetwork.update`).

    Args:
        m: current means ``[out, k]`` in (-1, 1).
        g: per-example ``dlogZ_n/dm`` ``[B, out, k]``.
        h: per-example ``dlogZ_n/dv`` ``[B, out, k]``.
        damping: ``d`` in (0, 1].
        var_floor: smallest allowed variance ``1 - m^2``.

    Returns:
        ``(m_new, v_new)`` with ``v_new = 1 - m_new^2 >= var_floor``: ``theta`` is clipped
        to ``|theta| <= acosh(1 / sqrt(var_floor))``, i.e. ``|m| <= sqrt(1 - var_floor)``.
    """
    t_max = _binary_theta_limit(var_floor)
    theta = torch.atanh(m.clamp(-1.0, 1.0)).clamp(-t_max, t_max)
    step = (g + m * (g * g - 2.0 * h)).sum(0)  # sum_n (log Z_n(+1) - log Z_n(-1)) / 2
    m_new, v_new = _tanh_moments((theta + damping * step).clamp(-t_max, t_max))
    return m_new, v_new.clamp_min(var_floor)


def _parse_modules(layers, bias: bool, dtype) -> tuple[list[int], list[tuple[Tensor, Tensor]]]:
    mods = list(layers) if not isinstance(layers, nn.Sequential) else list(layers.children())
    if isinstance(layers, nn.Module) and not isinstance(layers, nn.Sequential):
        mods = [layers]
    linears: list[nn.Linear] = []
    expect_unit = False
    for mod in mods:
        if not isinstance(mod, nn.Module):
            raise TypeError(f"layers must be all integers or all modules, got {mod!r}")
        if isinstance(mod, nn.Linear):
            if expect_unit:
                raise ValueError("two linear layers in a row: put a binary unit (IWSTSpike "
                                 "or LIF(beta=0)) between them")
            linears.append(mod)
            expect_unit = True
        elif isinstance(mod, IWSTSpike) or (isinstance(mod, LIF) and mod.beta == 0):
            if isinstance(mod, LIF) and mod.threshold != 0:
                raise ValueError(f"LIF(beta=0) must have threshold=0 for EP (fold the threshold "
                                 f"into the bias), got threshold={mod.threshold:g}")
            if not expect_unit:
                raise ValueError("a binary unit must follow a linear layer")
            expect_unit = False
        elif isinstance(mod, _PASS):
            continue
        else:
            raise _unsupported(mod)
    if not linears:
        raise ValueError("the module list contains no nn.Linear / BayesLinear layer")
    if not expect_unit:
        raise ValueError("the network must end with a linear layer (the output logits)")
    sizes = [linears[0].in_features]
    params = []
    for lin in linears:
        if lin.in_features != sizes[-1]:
            raise ValueError(f"layer sizes do not chain: {sizes[-1]} -> {lin.in_features}")
        sizes.append(lin.out_features)
        w = lin.weight.detach().to(dtype)
        if isinstance(lin, BayesLinear):
            s = lin.std.detach().to(dtype)
            var_w = (s * s).view(-1, *([1] * (w.dim() - 1))) if s.dim() == 1 else s * s
            var_w = var_w.expand_as(w)
        else:
            var_w = None
        m_cols, v_cols = [w], [var_w]
        if bias:
            b = lin.bias.detach().to(dtype) if lin.bias is not None else w.new_zeros(w.shape[0])
            m_cols.append(b[:, None])
            if isinstance(lin, BayesLinear) and lin.bias_std is not None:
                sb = lin.bias_std.detach().to(dtype)
                v_cols.append((sb * sb).expand(w.shape[0])[:, None])
            else:
                v_cols.append(None)
        elif lin.bias is not None and bool((lin.bias != 0).any()):
            raise ValueError("bias=False but a linear layer has a non-zero bias")
        params.append((m_cols, v_cols))
    return sizes, params


def from_sbnn_layers(layers: nn.Module | Sequence[nn.Module], **kwargs) -> EPNetwork:
    """Build an :class:`EPNetwork` from SBNN (or plain) layers.

    Means come from ``.weight`` / ``.bias``; variances from ``BayesLinear.std ** 2``
    (expanded to one per weight) and ``bias_std ** 2``. Plain ``nn.Linear`` weights, and
    biases without noise, get the prior variance ``prior_std ** 2``.

    Args:
        layers: ``nn.Sequential`` or list of ``nn.Linear`` / ``BayesLinear`` separated by
            ``IWSTSpike`` or ``LIF(beta=0, threshold=0)`` units.
        **kwargs: the other :class:`EPNetwork` arguments.
    """
    return EPNetwork(layers, **kwargs)


def _assemble(cols_m, cols_v, prior_var: float, dtype):
    m = torch.cat(cols_m, -1)
    v = torch.cat([torch.full_like(c, prior_var) if cv is None else cv
                   for c, cv in zip(cols_m, cols_v)], -1)
    return m.to(dtype), v.to(dtype)


# --------------------------------------------------------------------------- trainer
class EPTrainer:
    """Mini-batch ADF / EP passes over a data set.

    Args:
        network: the :class:`EPNetwork` to train (updated in place).
        damping: ``d`` in (0, 1]; 1 = undamped moment matching.
        var_floor: smallest allowed posterior variance.
        batch_size: examples per update (1: one exact ADF update per example).
        seed: seed of the per-pass shuffling.
    """

    def __init__(self, network: EPNetwork, *, damping: float = 1.0, var_floor: float = 1e-6,
                 batch_size: int = 1, seed: int = 0) -> None:
        if not isinstance(network, EPNetwork):
            raise TypeError(f"network must be an EPNetwork, got {type(network).__name__}")
        self.network = network
        self.damping = _check_damping(damping)
        self.var_floor = _check_positive("var_floor", var_floor)
        if (size := as_int(batch_size)) is None or size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.batch_size = size
        self.generator = torch.Generator().manual_seed(seed)

    def epoch(self, x: Tensor, y: Tensor) -> float:
        """One pass over ``(x, y)`` in shuffled mini-batches; returns the mean ``-log Z``
        of the examples (each evaluated just before its update)."""
        x = self.network._input(x)
        _sign_targets(y, self.network.sizes[-1], x.dtype)  # validate once
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"x and y have different numbers of examples: {x.shape[0]} vs "
                             f"{y.shape[0]}")
        perm = torch.randperm(x.shape[0], generator=self.generator)
        total = 0.0
        for i in range(0, len(perm), self.batch_size):
            idx = perm[i:i + self.batch_size]
            logz = self.network.update(x[idx], y[idx], damping=self.damping,
                                       var_floor=self.var_floor)
            total -= float(logz.sum())
        return total / max(len(perm), 1)


def train(
    network: EPNetwork | Sequence[int],
    x: Tensor,
    y: Tensor,
    *,
    epochs: int = 3,
    batch_size: int = 1,
    damping: float = 1.0,
    var_floor: float = 1e-6,
    seed: int = 0,
    x_test: Tensor | None = None,
    y_test: Tensor | None = None,
    **network_kwargs,
) -> tuple[EPNetwork, list[dict]]:
    """Train an EP network for ``epochs`` passes; everything is validated before training.

    Args:
        network: an :class:`EPNetwork`, or layer sizes / modules to build one with
            ``network_kwargs``.
        x: inputs ``[N, F]`` (or rate-coded ``[T, N, F]``, averaged over ``T``).
        y: class labels ``[N]`` (or +-1 sign targets ``[N, K]``).
        epochs: passes over the data.
        batch_size: examples per update, see :class:`EPTrainer`.
        damping: ``d`` in (0, 1], see :class:`EPTrainer`.
        var_floor: smallest allowed posterior variance.
        seed: seed of the per-pass shuffling.
        x_test: optional test inputs for the per-epoch curve (with ``y_test``).
        y_test: test class labels ``[N_test]`` (integers in ``[0, K)``).
        **network_kwargs: :class:`EPNetwork` arguments when ``network`` is not one.

    Returns:
        ``(network, curve)``; ``curve[e]`` has ``epoch``, ``train_loss`` (mean ``-log Z``),
        ``mean_variance``, ``time_s`` (seconds of the pass) and, with a test set,
        ``test_accuracy`` (deterministic mean-weight pass) and ``test_accuracy_ep``
        (moment-propagated predictive).
    """
    _check_data("x", x)
    if (x_test is None) != (y_test is None):  # one of them was dropped silently
        raise ValueError("pass both x_test and y_test (the per-epoch test curve needs both), "
                         "or neither")
    if x_test is not None:
        _check_data("x_test", x_test)
    if not isinstance(network, EPNetwork):
        network = EPNetwork(network, **network_kwargs)
    elif network_kwargs:
        raise TypeError(f"unexpected keyword arguments for an existing network: "
                        f"{sorted(network_kwargs)}")
    trainer = EPTrainer(network, damping=damping, var_floor=var_floor,
                        batch_size=batch_size, seed=seed)
    if (count := as_int(epochs)) is None or count < 0:
        raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
    epochs = count
    if y_test is not None:
        _check_test_labels(y_test, network._input(x_test).shape[0], network.sizes[-1])
    curve = []
    for e in range(epochs):
        t0 = time.perf_counter()
        loss = trainer.epoch(x, y)
        row = {"epoch": e + 1, "train_loss": loss, "mean_variance": network.mean_variance(),
               "time_s": time.perf_counter() - t0}
        if x_test is not None and y_test is not None:
            row["test_accuracy"] = float((network.predict(x_test, True) == y_test)
                                         .float().mean())
            row["test_accuracy_ep"] = float((network.predict(x_test) == y_test).float().mean())
        curve.append(row)
    return network, curve


def _check_test_labels(y: Tensor, n: int, num_classes: int) -> None:
    """``y_test`` as integer class labels ``[n]`` in ``[0, num_classes)``: the accuracy
    compares them with the predicted classes (sign targets ``[n, K]`` would broadcast
    into a meaningless number)."""
    if not isinstance(y, Tensor):
        raise TypeError(f"y_test must be a torch.Tensor, got {type(y).__name__}")
    if y.is_floating_point() or y.dtype == torch.bool or y.shape != (n,):
        raise ValueError(f"y_test must be integer class labels of shape [{n}] (one per "
                         f"x_test example), got {y.dtype} of shape {tuple(y.shape)}")
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"y_test labels must be in [0, {num_classes}), got range "
                         f"[{int(y.min())}, {int(y.max())}]")


#: tasks of :func:`bench_task` (and of the ``ep`` method of ``sbnn-bench``)
BENCH_TASKS = ("digits", "randman")

#: data defaults of :func:`bench_task` (those of the ``sbnn-bench`` tasks)
TASK_DEFAULTS = {
    "digits": {"num_steps": 16},
    "randman": dict(RANDMAN_DEFAULTS),
}


def first_spike_features(x: Tensor) -> Tensor:
    """Static latency code of spike trains: ``[T, B, F] -> [B, F]``.

    .. code-block:: text

        feature_j = (T - t_j) / T   (t_j: step of channel j's first spike; 0 if it is silent)

    Early spikes give values near 1, the last step ``1/T``. This keeps the timing that a
    time average throws away: in ``randman`` every channel spikes exactly once, so its
    rate ``mean_t s_t = 1/T`` is the same for every channel and example.
    """
    _check_data("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must be spike trains [T, B, F], got shape {tuple(x.shape)}")
    steps = x.shape[0]
    t = torch.arange(steps, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    first = torch.where(x > 0, t, torch.full_like(x, float(steps))).amin(0)
    return ((steps - first) / steps).to(x.dtype)


def fit_static(
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    *,
    num_classes: int | None = None,
    seed: int = 0,
    epochs: int = 3,
    hidden: Sequence[int] = (100,),
    batch_size: int = 1,
    damping: float = 1.0,
    mc_samples: int = 10,
    **network_kwargs,
) -> dict:
    """Train EP on static inputs and evaluate it in every mode; one benchmark-style row.

    Knows nothing about tasks: the caller (``sbnn-bench``, :func:`bench_task`) prepares the
    inputs ``[N, F]`` (or ``[T, N, F]``, averaged over time).

    Args:
        x_train: training inputs.
        y_train: training labels ``[N]``.
        x_test: test inputs.
        y_test: test labels.
        num_classes: output size (default ``max label + 1``).
        seed: seed of the initial means, the shuffling and the ``sample``/``mc`` passes.
        epochs: passes over the training set.
        hidden: hidden layer sizes (network ``[F, *hidden, K]``).
        batch_size: examples per update (1: sequential ADF).
        damping: ``d`` in (0, 1].
        mc_samples: ``K`` of the ``mc(K)`` evaluation of the exported network.
        **network_kwargs: further :class:`EPNetwork` arguments (``activation``,
            ``weights``, ...).

    Returns:
        dict with ``seed``, ``epochs``, ``train_samples``, ``test_samples``, the metrics of
        the deterministic mean-weight pass (``accuracy_mean``, ``nll_mean``, ``ece_mean``,
        ``brier_mean``), of the exported SBNN network (``accuracy_sample``, and
        ``accuracy_mc``, ``nll_mc``, ``ece_mc``, ``brier_mc`` for ``mc(K)``), of the EP
        moment-propagated predictive (``accuracy_ep``, ``nll_ep``, ``ece_ep``, ``brier_ep``),
        ``mc_samples``, ``train_s_per_epoch`` (+ ``_std``), ``train_s``, ``eval_s``,
        ``eval_mc_s``, ``epoch_train_s``, ``curve``, ``_probs`` (``mean``, ``sample``,
        ``mc``, ``ep``) and ``_targets``.
    """
    import statistics

    from .metrics import classification_metrics
    from .modes import mode
    from .uncertainty import mc_predict

    k = int(num_classes) if num_classes is not None else int(y_train.max()) + 1
    net = EPNetwork([x_train.shape[-1], *hidden, k], seed=seed, **network_kwargs)
    net, curve = train(net, x_train, y_train, epochs=epochs, batch_size=batch_size,
                       damping=damping, seed=seed, x_test=x_test, y_test=y_test)
    times = [c["time_s"] for c in curve]
    t0 = time.perf_counter()
    probs_mean = torch.softmax(net.deterministic_logits(x_test).float(), -1)
    eval_s = time.perf_counter() - t0
    probs_ep = net.predict_proba(x_test).float()
    seq = net.to_sbnn_layers()
    x_in = net._input(x_test)
    torch.manual_seed(seed)
    with torch.no_grad():
        with mode(seq, "sample"):
            probs_sample = torch.softmax(seq(x_in).float(), -1)
        t0 = time.perf_counter()
        probs_mc = mc_predict(seq, x_in, mc_samples, count_spikes=False).probs.float()
        eval_mc_s = time.perf_counter() - t0
    row = {"seed": seed, "epochs": epochs, "train_samples": len(y_train),
           "test_samples": len(y_test), "mc_samples": mc_samples}
    for suffix, p in (("mean", probs_mean), ("mc", probs_mc), ("ep", probs_ep)):
        row.update({f"{m}_{suffix}": v for m, v in classification_metrics(p, y_test).items()})
    row["accuracy_sample"] = float((probs_sample.argmax(-1) == y_test).float().mean())
    row.update({
        "train_s_per_epoch": statistics.mean(times) if times else 0.0,
        "train_s_per_epoch_std": statistics.stdev(times) if len(times) > 1 else 0.0,
        "train_s": sum(times), "eval_s": eval_s, "eval_mc_s": eval_mc_s,
        "epoch_train_s": times,
        "curve": [{"epoch": c["epoch"], "train_loss": c["train_loss"],
                   "test_accuracy": c["test_accuracy"]} for c in curve],
        "_probs": {"mean": probs_mean, "sample": probs_sample, "mc": probs_mc, "ep": probs_ep},
        "_targets": y_test,
    })
    return row


def bench_task(
    task: str = "digits",
    seed: int = 0,
    *,
    epochs: int = 3,
    hidden: Sequence[int] = (100,),
    batch_size: int = 1,
    damping: float = 1.0,
    num_steps: int | None = None,
    mc_samples: int = 10,
    split_seed: int = 0,
    cfg: dict | None = None,
    **network_kwargs,
) -> dict:
    """Train EP on the data of a ``sbnn-bench`` task; the row of :func:`fit_static`.

    The data come from :mod:`sbnn_addons.data` with the bench's codes (this module does not
    import the bench): the training set is encoded once with generator ``seed``, the test
    set with generator seed 12345. EP sees static inputs ``[B, F]``:

    - ``digits``: pixel intensities in [0, 1] directly (``num_steps=None``, T = 1), or
      the Bernoulli rate code with ``num_steps`` steps averaged over time;
    - ``randman``: the spike trains ``[T, B, F]`` (``num_steps=None``: the task default,
      50) reduced by :func:`first_spike_features` (each channel's first-spike latency).
      The time average would be ``1/T`` for every channel (one spike per channel).

    Args:
        task: one of :data:`BENCH_TASKS` (``"digits"``, ``"randman"``).
        seed: seed of the initial means, the shuffling and the training-set code.
        epochs: passes over the training set.
        hidden: hidden layer sizes (network ``[F, *hidden, K]``).
        batch_size: examples per update (1: sequential ADF).
        damping: ``d`` in (0, 1].
        num_steps: time steps ``T`` of the encoding; ``None``: see above.
        mc_samples: ``K`` of the ``mc(K)`` evaluation of the exported network.
        split_seed: seed of the task's data split / generator.
        cfg: randman settings (``randman_classes``, ``randman_units``, ``randman_samples``,
            ``randman_dim``, ``randman_alpha``); :data:`TASK_DEFAULTS` fill in the rest.
        **network_kwargs: further :class:`EPNetwork` arguments (``activation``,
            ``weights``, ...).

    Returns:
        The row of :func:`fit_static` plus ``task``, ``method`` (``"ep"``) and
        ``num_steps``.

    Raises:
        ValueError: a task outside :data:`BENCH_TASKS`.
    """
    if task not in BENCH_TASKS:
        raise ValueError(f"EP supports the tasks {list(BENCH_TASKS)}, got {task!r} (its "
                         "networks are feed-forward and memoryless: no convolutions, no "
                         "recurrence)")
    cfg = {**TASK_DEFAULTS[task], **{k: v for k, v in (cfg or {}).items() if v is not None}}
    if num_steps is not None:
        cfg["num_steps"] = num_steps
    elif task == "digits":
        cfg["num_steps"] = None
    if task == "digits":
        from .data.digits import load_digits_split, rate_code

        xtr, ytr, xte, yte = load_digits_split(seed=split_seed)
        if cfg["num_steps"] is not None:
            xtr = rate_code(xtr, cfg["num_steps"], torch.Generator().manual_seed(seed))
            xte = rate_code(xte, cfg["num_steps"], torch.Generator().manual_seed(12345))
        num_classes = 10
    else:
        from .data.randman import randman_split

        xtr, ytr, xte, yte = randman_split(
            num_classes=cfg["randman_classes"], num_units=cfg["randman_units"],
            num_steps=cfg["num_steps"], samples_per_class=cfg["randman_samples"],
            manifold_dim=cfg["randman_dim"], alpha=cfg["randman_alpha"], seed=split_seed)
        xtr = first_spike_features(xtr.transpose(0, 1).float())
        xte = first_spike_features(xte.transpose(0, 1).float())
        num_classes = int(cfg["randman_classes"])
    row = fit_static(xtr, ytr, xte, yte, num_classes=num_classes, seed=seed, epochs=epochs,
                     hidden=hidden, batch_size=batch_size, damping=damping,
                     mc_samples=mc_samples, **network_kwargs)
    row.update({"task": task, "method": "ep",
                "num_steps": 1 if cfg["num_steps"] is None else cfg["num_steps"]})
    return row


def bench_digits(
    seed: int = 0,
    *,
    epochs: int = 3,
    hidden: Sequence[int] = (100,),
    batch_size: int = 1,
    damping: float = 1.0,
    num_steps: int | None = None,
    mc_samples: int = 10,
    split_seed: int = 0,
    **network_kwargs,
) -> dict:
    """Train EP on the digits task: ``bench_task("digits", ...)`` (kept for compatibility).

    Input: pixel intensities in [0, 1] directly (``num_steps=None``, T = 1), or rate-coded
    with ``num_steps`` steps and averaged over time (test set coded with generator seed
    12345 as in the bench; the training set is coded once with generator ``seed``).

    Args:
        seed: seed of the initial means, the shuffling and the training-set code.
        epochs: passes over the training set.
        hidden: hidden layer sizes (network ``[64, *hidden, 10]``).
        batch_size: examples per update (1: sequential ADF).
        damping: ``d`` in (0, 1].
        num_steps: ``None`` for direct intensities, else the rate-code length ``T``.
        mc_samples: ``K`` of the ``mc(K)`` evaluation of the exported network.
        split_seed: seed of :func:`sbnn_addons.data.load_digits_split`.
        **network_kwargs: further :class:`EPNetwork` arguments (``activation``,
            ``weights``, ...).

    Returns:
        The row of :func:`bench_task`.
    """
    return bench_task("digits", seed, epochs=epochs, hidden=hidden, batch_size=batch_size,
                      damping=damping, num_steps=num_steps, mc_samples=mc_samples,
                      split_seed=split_seed, **network_kwargs)
