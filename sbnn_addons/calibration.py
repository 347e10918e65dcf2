"""Size the spike functions' own noise of a converted trained model to its data.

A converter gives each neuron a spike noise of its own (``spike_std``, 0.399 of the
threshold by default): the width at which the IW-ST gradient of a fresh network matches
the host surrogate's, so that silent neurons still pass a gradient. A trained network
whose membranes sit just below their thresholds fires much more with that noise in
``sample`` mode than in ``mean`` mode (the original network): the extra spikes of one
layer drive the next one further, and a sparse network can fall to chance.
:func:`calibrate_spike_std` shrinks the spike noise, all layers by one factor, until each
layer's ``sample``-mode firing rate on a batch of the user's data is close to its
``mean``-mode rate.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .base import as_float, check_module, compiled_wrapped, host_neurons, inverse_softplus
from .metrics import SpikeMonitor
from .spike import IWSTSpike, check_seed, seed_spikes
from .uncertainty import (
    _check_inputs,
    _mode,
    _refuse_training_batchnorm,
    _seeded_global_rng,
    default_reset,
    on_meta,
)

__all__ = ["SpikeStdCalibration", "calibrate_spike_std"]

#: The firing-rate increase a layer silent in ``mean`` mode may show in ``sample`` mode
#: (per unit and step), on top of the relative ``max_rate_increase``.
RATE_FLOOR = 1e-3


@dataclass
class SpikeStdCalibration:
    """What :func:`calibrate_spike_std` measured and chose.

    Attributes:
        factor: the factor applied to every spike function's own noise std (1: unchanged).
        mean_rates: per spike function (module name), the ``mean``-mode firing rate
            (spikes per unit and step) on the calibration batch.
        sample_rates: the ``sample``-mode rates with the calibrated stds.
        initial_rates: the ``sample``-mode rates with the stds as they were.
    """

    factor: float
    mean_rates: dict[str, float] = field(default_factory=dict)
    sample_rates: dict[str, float] = field(default_factory=dict)
    initial_rates: dict[str, float] = field(default_factory=dict)


def _step_neurons(model: nn.Module) -> list[nn.Module]:
    """The neurons of ``model`` that run one time step per call: snnTorch's, and
    SpikingJelly's in ``step_mode='s'``."""
    return ([m for _, m in host_neurons(model, "snntorch")]
            + [m for _, m in host_neurons(model, "spikingjelly")
               if getattr(m, "step_mode", None) == "s"])


def _own_noise(m: IWSTSpike) -> Tensor | None:
    """The parameter or buffer holding the spike function's own noise, if non-zero."""
    if m.learn_std:
        return m.std_rho
    return m.fixed_std if bool((m.fixed_std != 0).any()) else None


def _set_std(m: IWSTSpike, std: Tensor) -> None:
    with torch.no_grad():
        if m.learn_std:
            m.std_rho.copy_(inverse_softplus(std.clamp_min(1e-12)))
        else:
            m.fixed_std.copy_(std)


def calibrate_spike_std(
    model: nn.Module,
    inputs,
    *,
    forward: Callable[[nn.Module, Tensor], object] | None = None,
    reset: Callable[[nn.Module], object] | None = None,
    max_rate_increase: float = 0.25,
    min_factor: float = 1 / 64,
    seed: int = 0,
) -> SpikeStdCalibration:
    """Shrink the own noise of every spike function of a converted trained model until its
    ``sample``-mode firing rates stay close to its ``mean``-mode ones.

    .. code-block:: text

        r_l^mean   = firing rate of spike layer l in mean mode (the original network)
        r_l(c)     = its rate in sample mode with every own std s_l scaled to c s_l
        c          = the largest of 1, 2^-1/2, 2^-1, ... (down to min_factor) with
                     r_l(c) <= (1 + max_rate_increase) r_l^mean + RATE_FLOOR  for every l

    Only the spike functions' own noise (the converters' ``spike_std``) changes; the
    Bayesian layers' weight noise is left as it is. Use it on a model converted from a
    trained one, before training or evaluating it in ``sample`` mode: a fresh model needs
    the full noise (its silent neurons recover through it), so do not calibrate one.

    Every pass runs under ``torch.no_grad()``, after ``reset(model)``, with the spike
    noise seeded with ``seed`` (the same draws at every factor; the spike functions'
    streams and PyTorch's global generators are restored afterwards); the model's
    SBNN mode is restored and its state reset at the end. As for
    :func:`~sbnn_addons.mc_predict`, call ``model.eval()`` first where it holds a
    BatchNorm (a pass in training mode would update its running statistics).

    Args:
        model: a converted model (snnTorch, SpikingJelly or core) whose spike functions
            have noise of their own.
        inputs: a batch of the data (time-major ``[T, B, ...]`` for ``model(inputs)``, or
            whatever ``forward`` takes).
        forward: ``(model, inputs) -> anything``: one pass over the sequence as the
            training loop runs it (default ``model(inputs)``; for an snnTorch
            ``nn.Sequential`` with ``init_hidden=True`` neurons:
            ``lambda m, x: [m(x_t) for x_t in x]``).
        reset: the state reset before each pass (default: the host's own, see
            :func:`~sbnn_addons.uncertainty.default_reset`).
        max_rate_increase: the relative increase of each layer's rate that ``sample`` mode
            may show over ``mean`` mode (0.25: 25 %).
        min_factor: the smallest factor tried, in ``(0, 1]``; if even it leaves a rate too
            high, it is kept and a warning names the layers.
        seed: the seed of the spike noise during the passes (an integer in
            ``[0, 2**32)``; ``None`` is refused: every factor must see the same draws).

    Returns:
        A :class:`SpikeStdCalibration` with the factor and the rates.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``forward`` / ``reset`` is not
            callable, ``inputs`` is not a tensor (tuples or lists of tensors with a
            custom ``forward``), or ``seed`` is not an integer.
        ValueError: no spike function with noise of its own (nothing to calibrate), a
            non-finite one, a model on the ``meta`` device, a BatchNorm in training mode,
            ``max_rate_increase < 0``, ``min_factor`` outside ``(0, 1]``, ``seed`` outside
            ``[0, 2**32)``, an empty or non-finite input, a ``forward`` that never
            reaches some spike function, two ``mean``-mode passes that fire
            differently (the state is not reset between passes: pass ``reset``), or no
            ``forward`` for a model that runs one time step per call (an
            ``nn.Sequential`` of snnTorch neurons with ``init_hidden=True``, a
            SpikingJelly model in ``step_mode='s'``), whose neurons ``model(inputs)``
            ran once: the sequence taken for one step of a larger batch.
    """
    check_module(model, "calibrate_spike_std")
    for name, fn in (("forward", forward), ("reset", reset)):
        if fn is not None and not callable(fn):
            raise TypeError(f"calibrate_spike_std: {name} must be a callable or None, got "
                            f"{type(fn).__name__}")
    if (increase := as_float(max_rate_increase)) is None or not (
            increase >= 0 and math.isfinite(increase)):
        raise ValueError(f"calibrate_spike_std: max_rate_increase must be a finite number "
                         f">= 0, got {max_rate_increase!r}")
    if (smallest := as_float(min_factor)) is None or not 0 < smallest <= 1:
        raise ValueError(f"calibrate_spike_std: min_factor must be in (0, 1], got "
                         f"{min_factor!r}")
    max_rate_increase, min_factor = increase, smallest
    seed = _check_calibration_seed(seed)
    if on_meta(model, inputs):
        raise ValueError(
            "calibrate_spike_std: the model is on the meta device, which holds no values, so "
            "it has no firing rates to measure: materialise it first "
            "(model.to_empty(device=...), then load_state_dict or reset_parameters)")
    _check_inputs(inputs, forward is not None)
    _refuse_training_batchnorm(model, "calibrate_spike_std")
    # (a compiled wrapper's under the names of the model it wraps, as SpikeMonitor's)
    spikes = [(n, m) for n, m in compiled_wrapped(model).named_modules()
              if isinstance(m, IWSTSpike) and _own_noise(m) is not None]
    if not spikes:
        raise ValueError(
            f"calibrate_spike_std: {type(model).__name__} has no spike function with noise "
            "of its own (a converter's spike_std=None or 0, IWSTSpike(std=None), or a "
            "model not converted): there is nothing to calibrate")
    step_neurons = _step_neurons(model) if forward is None else []
    forward = forward if forward is not None else (lambda m, x: m(x))
    reset = reset if reset is not None else default_reset(model)
    streams = [(m, m._seed, m._generator) for m in model.modules() if isinstance(m, IWSTSpike)]
    initial = {n: m.std.detach().clone() for n, m in spikes}
    for n, std in initial.items():
        if not bool(torch.isfinite(std).all()):
            raise ValueError(
                f"calibrate_spike_std: the spike function {n!r} has a non-finite noise std "
                f"({std.flatten()[:4].tolist()}): scaled by a factor it stays NaN / inf, and "
                "the spikes it draws are meaningless; load or set a finite std first (e.g. "
                "reconvert the trained model)")
    names = [n for n, _ in spikes]
    # the parameters (rho) or buffers as they were: put back exactly where the factor is 1
    saved = {n: _own_noise(m).detach().clone() for n, m in spikes}

    def set_factor(factor: float) -> None:
        for n, m in spikes:
            if factor == 1.0:
                with torch.no_grad():
                    _own_noise(m).copy_(saved[n])
            else:
                _set_std(m, initial[n] * factor)

    def rates(mode: str) -> dict[str, float]:
        reset(model)
        if mode == "sample":
            seed_spikes(model, seed)
        with (torch.no_grad(), _mode(model, mode), _seeded_global_rng(seed),
              SpikeMonitor(model, synops=False) as mon):
            forward(model, inputs)
        reset(model)
        unreached = [n for n in names if mon.units[n] == 0]
        if unreached:
            raise ValueError(
                f"calibrate_spike_std: the forward never reached the spike functions "
                f"{unreached[:6]} (of {len(names)}), so it measures no firing rate for them "
                "and would scale their noise blind: pass a forward that runs the whole model "
                "over the sequence (e.g. forward=lambda m, x: [m(x_t) for x_t in x] for an "
                "snnTorch nn.Sequential with init_hidden=True neurons)")
        found = mon.spike_rates()
        return {n: found[n] for n in names}

    try:
        calls: dict[int, int] = {}
        handles = [m.register_forward_pre_hook(
            lambda mod, args: calls.__setitem__(id(mod), calls.get(id(mod), 0) + 1))
            for m in step_neurons]
        try:
            mean_rates = rates("mean")
        finally:
            for handle in handles:
                handle.remove()
        if calls and min(calls.values()) == 1:
            raise ValueError(
                f"calibrate_spike_std: {type(model).__name__} runs one time step per call "
                "(an nn.Sequential of snnTorch neurons with init_hidden=True, or a "
                "SpikingJelly model in step_mode='s'), so model(inputs) ran the sequence "
                "as one step of a larger batch, and the noise would be sized to that step: "
                "pass forward=lambda m, x: [m(x_t) for x_t in x] for inputs [T, B, ...] "
                "(or, for SpikingJelly, functional.set_step_mode(model, 'm') first), or "
                "forward=lambda m, x: m(x) for inputs of one step")
        if rates("mean") != mean_rates:
            raise ValueError(
                "calibrate_spike_std: two mean-mode passes over the same inputs fired "
                "differently, so the model's state is not reset between passes: pass "
                "reset=... (e.g. snntorch.utils.reset or functional.reset_net) or a "
                "forward that resets the state first")
        factor, result, first = 1.0, None, None
        while True:
            set_factor(factor)
            result = rates("sample")
            first = first if first is not None else result
            too_high = [n for n in names
                        if result[n] > (1 + max_rate_increase) * mean_rates[n] + RATE_FLOOR]
            if not too_high:
                break
            if factor * 2 ** -0.5 < min_factor * (1 - 1e-9):
                warnings.warn(
                    f"calibrate_spike_std: at the smallest factor {factor:.3g}, the "
                    f"sample-mode firing rates of {too_high[:6]} are still more than "
                    f"{max_rate_increase:.0%} above their mean-mode rates (noise from the "
                    "Bayesian layers' weights, which this function leaves as it is): "
                    "lower min_factor, or convert with a smaller std=", stacklevel=2)
                break
            factor *= 2 ** -0.5
    except BaseException:
        set_factor(1.0)
        raise
    finally:
        for m, s, g in streams:
            m._seed, m._generator = s, g
    return SpikeStdCalibration(factor=factor, mean_rates=mean_rates, sample_rates=result,
                               initial_rates=first)


def _check_calibration_seed(seed) -> int:
    """``seed`` as an int in ``[0, 2**32)``; ``None`` is refused: the passes at every
    factor must draw the same noise, or the rates compared differ by the draws."""
    if seed is None:
        raise TypeError(
            "calibrate_spike_std: seed must be an integer in [0, 2**32), got None "
            "(NoneType): it seeds the spike noise, so that the passes see the same draws at "
            "every factor and the rates compared differ by the factor only; pass an int such "
            "as seed=0")
    return check_seed(seed, "calibrate_spike_std: seed", allow_none=False)
