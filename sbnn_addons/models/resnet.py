"""Normalisation-free spiking / binary ResNets of the reference experiments (Method page, sec. 8).

Layout (both :class:`DVSResNet` and :class:`BinaryResNet`):

.. code-block:: text

    stem:   conv3x3 -> affine -> [avgpool 2] -> LIF
    block:  h1 = LIF(affine(conv3x3(x, stride)))
            h2 = LIF(affine(conv3x3(h1)))
            out = h2 + shortcut(x)          shortcut = zero-pad-channels(AvgPool(stride)(x))
    head:   global average pool -> FC -> mean over time

Time is folded into the batch for the convolutions (``[T*B, C, H, W]``) and the LIF runs
over ``T``; the LRT variance of each Bayesian conv is carried across the fold.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import check_flag, mark_checked
from ..checkpoint import checkpoint
from ..functional import is_binary, is_kept, mark_binary
from ._common import (
    PAPER_BETA,
    LayerFactory,
    ReferenceNet,
    channel_pad,
    reshape_with_variance,
    softplus_value,
)

__all__ = ["SpikingResNet", "DVSResNet", "BinaryResNet", "Shortcut", "dvs_resnet19",
           "cifar_resnet25"]


class Shortcut(nn.Module):
    """Parameter-free shortcut: ``AvgPool(stride)`` then zero-pad the channels.

    .. code-block:: text

        y = pad_C( avgpool_s(x), C_out - C_in )

    Shapes:
        ``[N, C_in, H, W] -> [N, C_out, H / s, W / s]``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"the zero-pad shortcut cannot reduce channels ({in_channels} -> {out_channels})"
            )
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride)
        return channel_pad(x, self.out_channels)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class ConvLIF(nn.Module):
    """``LIF(norm(conv(x)))`` with time folded in the batch.

    Shapes:
        ``x [T*B, C_in, H, W]`` -> spikes ``[T*B, C_out, H', W']``.
    """

    def __init__(self, factory: LayerFactory, cin: int, cout: int, stride: int = 1,
                 pool: int = 1, first: bool = False) -> None:
        super().__init__()
        self.conv = factory.conv(cin, cout, stride, first=first)
        self.norm = factory.norm(cout)
        self.pool = pool
        self.lif = factory.lif()

    def current(self, x: Tensor) -> Tensor:
        """Input current of the LIF, ``[T*B, C, H', W']``, with its variance attached."""
        y = self.norm(self.conv(x))  # ChannelAffine keeps the variance (mean-only affine)
        if self.pool > 1:
            y = F.avg_pool2d(y, self.pool)  # the carrier's rule: var -> sum(var) / k^2
        return y

    def forward(self, x: Tensor, num_steps: int) -> Tensor:
        y = self.current(x)
        seq = reshape_with_variance(y, num_steps, -1, *y.shape[1:])
        mark_checked(seq)  # from the checked input: no finite check (a sync) per layer
        spikes = self.lif.run(seq)
        flat = spikes.flatten(0, 1)
        # x^2 = x downstream; a view of kept spikes is kept too (same storage)
        return mark_binary(flat, is_kept(spikes)) if is_binary(spikes) else flat


class BasicBlock(nn.Module):
    """Two ConvLIF layers and the spike-sum residual ``out = h2 + shortcut(x)``."""

    def __init__(self, factory: LayerFactory, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.layer1 = ConvLIF(factory, cin, cout, stride)
        self.layer2 = ConvLIF(factory, cout, cout)
        self.shortcut = Shortcut(cin, cout, stride)

    def forward(self, x: Tensor, num_steps: int) -> Tensor:
        h = self.layer2(self.layer1(x, num_steps), num_steps)
        return h + self.shortcut(x)


def _widths(widths: Sequence[int], width_mult: float) -> list[int]:
    given = widths
    widths = list(widths) if isinstance(widths, Sequence) and not isinstance(widths, str) else []
    if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1
                         for w in widths):
        raise ValueError(f"widths must be a non-empty sequence of channel counts >= 1 (one "
                         f"per stage, e.g. (32, 64, 128)), got {given!r}")
    if (isinstance(width_mult, bool) or not isinstance(width_mult, (int, float))
            or not 0 < width_mult < math.inf):  # NaN failed in round(), a string in a comparison
        raise ValueError(f"width_mult must be a finite number > 0, got {width_mult!r}")
    return [max(1, round(w * width_mult)) for w in widths]


def _blocks(blocks: int | Sequence[int], stages: int) -> list[int]:
    given = blocks
    blocks = [blocks] * stages if isinstance(blocks, int) else (
        list(blocks) if isinstance(blocks, Sequence) and not isinstance(blocks, str) else [])
    if len(blocks) != stages or any(isinstance(b, bool) or not isinstance(b, numbers.Integral)
                                    or b < 1 for b in blocks):
        raise ValueError(
            f"blocks must be a positive int or {stages} positive ints (one per stage), "
            f"got {given!r}"
        )
    return blocks


class SpikingResNet(ReferenceNet):
    """Normalisation-free ResNet of LIF (or binary) units with spike-sum residuals.

    Args:
        in_channels: input channels.
        num_classes: outputs of the FC layer.
        widths: channels per stage (the stem has ``widths[0]``); stages after the first
            halve the resolution.
        blocks: residual blocks per stage (int or one per stage); each block has 2 convs,
            so ``1 + 2 * sum(blocks)`` convs in all.
        width_mult: multiplier applied to ``widths``.
        bayes: Bayesian layers and :class:`~sbnn_addons.IWSTSpike` (``True``) or the
            deterministic twin with :class:`SurrogateSpike` (``False``).
        estimator: spike estimator of the Bayesian network (``"st"``, ``"iwst(0.5)"``, ...).
        std: initial per-layer posterior std (default ``0.5 / sqrt(fan_in)``).
        bias_std: initial std ``s_b`` of the bias noise, learned (``None``: none). It
            enters once, where each spike is drawn: ``sigma_t = sqrt(V_t + s_b^2)``; the
            membrane does not accumulate it (it is the spike function's own std).
        norm: ``"affine"`` (mean-only affine, no statistics), ``"none"``, or, for the
            twin only, ``"bn"`` (one BatchNorm per time step).
        num_steps: ``T``; the input must have exactly ``T`` steps with per-step affines
            or ``norm="bn"``.
        beta: LIF decay (0 for binary units; default ``exp(-1 / softplus(10))``).
        threshold: firing threshold ``theta``.
        stem_pool: average-pool (2x2) the stem current before its LIF.
        readout_noise: a Bayesian FC readout, sampled ``mean + sqrt(var) eps`` in sample
            mode (default ``False``: the released deterministic readout).
        affine_per_step: one affine scale and shift per channel and per time step (the
            released networks); ``False``: one per channel, shared by all steps.
        aux_center: centring of the auxiliary loss's ``z``: ``"zero"`` (the released
            ``z = membrane / sigma``) or ``"threshold"`` (``(membrane - theta) / sigma``).
        aux_std_grad: the auxiliary loss's gradient reaches ``sigma`` (``True``, the
            released form); ``False`` holds ``sigma`` constant in ``z``
            (:class:`~sbnn_addons.IWSTSpike`).
        surrogate: surrogate of the twin (``"gaussian"``, ``"atan"``, ``"sigmoid"``).
        surrogate_width: width of the Gaussian surrogate.
        checkpoint: recompute each residual block in the backward instead of keeping its
            activations (:func:`sbnn_addons.checkpoint.checkpoint`: same spikes, same
            gradients; one more forward of the blocks, much less memory).

    Shapes:
        ``forward(x [T, B, C_in, H, W]) -> logits [B, num_classes]``, the time average of
        the FC output ``[T, B, num_classes]``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: Sequence[int],
        blocks: int | Sequence[int] = 3,
        *,
        width_mult: float = 1.0,
        bayes: bool = True,
        estimator: str = "st",
        std: float | None = None,
        bias_std: float | None = None,
        norm: str = "affine",
        num_steps: int = 1,
        beta: float = PAPER_BETA,
        threshold: float = 1.0,
        stem_pool: bool = False,
        readout_noise: bool = False,
        surrogate: str = "gaussian",
        surrogate_width: float = 0.4,
        checkpoint: bool = False,
        affine_per_step: bool = True,
        aux_center: str = "zero",
        aux_std_grad: bool = True,
    ) -> None:
        super().__init__()
        config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        factory = self._setup(
            config, bayes=bayes, readout_noise=readout_noise, num_steps=num_steps, norm=norm,
            estimator=estimator, std=std, bias_std=bias_std, beta=beta, threshold=threshold,
            surrogate=surrogate, surrogate_width=surrogate_width,
            affine_per_step=affine_per_step, aux_center=aux_center, aux_std_grad=aux_std_grad,
        )
        self.in_channels = in_channels
        chans = _widths(widths, width_mult)
        self.widths = chans
        self.stem = ConvLIF(factory, in_channels, chans[0], pool=2 if stem_pool else 1,
                            first=True)
        layers = []
        cin = chans[0]
        halvings = 1 if stem_pool else 0
        for stage, (cout, n) in enumerate(zip(chans, _blocks(blocks, len(chans)))):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                halvings += stride == 2
                layers.append(BasicBlock(factory, cin, cout, stride))
                cin = cout
        self.blocks = nn.ModuleList(layers)
        self.fc = factory.linear(cin, num_classes, bayes=self.bayes and self.readout_noise)
        self.checkpoint = check_flag("checkpoint", checkpoint)
        # H and W must halve evenly at the stem's pool and at each strided block (the
        # shortcut's average pool and the strided convolution round differently)
        self.size_divisor = 2 ** halvings

    def _check_input(self, x: Tensor) -> None:
        self._check_dtype(x)
        if x.dim() != 5 or x.shape[2] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects input x of shape [T, B, {self.in_channels}, H, W]"
                f", got {tuple(x.shape)}"
            )
        self._check_steps(x)
        self._check_step_count(x, f"B, {self.in_channels}, H, W")
        d = self.size_divisor
        if x.shape[-2] % d or x.shape[-1] % d:
            raise ValueError(
                f"{type(self).__name__} halves H and W {d.bit_length() - 1} times: they must "
                f"be multiples of {d}, got {tuple(x.shape[-2:])} (crop or pad the frames)"
            )

    def forward_steps(self, x: Tensor) -> Tensor:
        """FC output per time step, ``[T, B, num_classes]`` (readout noise included)."""
        self._check_input(x)
        T = x.shape[0]
        h = self.stem(x.flatten(0, 1), T)
        for block in self.blocks:
            if self.checkpoint and torch.is_grad_enabled():
                h = checkpoint(block, h, T, modules=block)
            else:
                h = block(h, T)
        out = self.fc(h.mean(dim=(2, 3)))
        out = reshape_with_variance(out, T, -1, out.shape[-1])
        return self.sample_readout(out)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_steps(x).mean(0)

    def num_convs(self) -> int:
        """Number of convolution layers."""
        return sum(isinstance(m, nn.Conv2d) for m in self.modules())


class DVSResNet(SpikingResNet):
    """ResNet-19 of LIF neurons for DVS128 Gesture (Method page, section 8).

    Defaults (the released configuration): widths (32, 64, 128), 3 blocks per stage
    (``1 + 2 * 9 = 19`` convs), LIF ``beta = exp(-1 / softplus(10))``, ``theta = 1``, soft
    reset, bias noise ``softplus(-1)`` at the draw, per-step affines, a deterministic FC
    readout, 11 classes.

    Args:
        num_classes: 11 for DVS128 Gesture.
        widths: channels per stage.
        blocks: blocks per stage.
        num_steps: ``T`` (49 frames in the reference); the input must have exactly ``T``
            steps with the per-step affines (the default) or ``norm="bn"``.
        bias_std: bias-noise init (``softplus(-1)``).
        **kwargs: the other arguments of :class:`SpikingResNet`.

    Shapes:
        ``x [T, B, 2, H, W]`` (``[T, B, 2, 32, 32]`` for the reference data) ->
        logits ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int = 11, widths: Sequence[int] = (32, 64, 128),
                 blocks: int | Sequence[int] = 3, *, num_steps: int = 49,
                 bias_std: float | None = softplus_value(-1.0), **kwargs) -> None:
        kwargs.setdefault("in_channels", 2)
        super().__init__(num_classes=num_classes, widths=widths, blocks=blocks,
                         num_steps=num_steps, bias_std=bias_std, **kwargs)


class BinaryResNet(SpikingResNet):
    """ResNet-25 of binary units for CIFAR-10 (``T = 1``, ``theta = 0``, Method page, section 8).

    A binary unit is ``LIF(beta=0, threshold=0)`` run for one step:
    ``h = 1[a + sigma eps > 0]``. Defaults: widths (64, 128, 256, 512), 3 blocks per stage
    (``1 + 2 * 12 = 25`` convs), per-layer std, no bias noise, 10 classes.

    Args:
        num_classes: 10 for CIFAR-10.
        widths: channels per stage.
        blocks: blocks per stage.
        **kwargs: the other arguments of :class:`SpikingResNet` (``norm="bn"`` for the
            twin with BatchNorm).

    Shapes:
        ``x [B, 3, H, W]`` (normalised RGB) -> logits ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int = 10, widths: Sequence[int] = (64, 128, 256, 512),
                 blocks: int | Sequence[int] = 3, **kwargs) -> None:
        kwargs.setdefault("in_channels", 3)
        if kwargs.setdefault("num_steps", 1) != 1:
            raise ValueError(f"BinaryResNet has binary units run for one step (T = 1), got "
                             f"num_steps={kwargs['num_steps']!r}; leave num_steps out")
        kwargs.setdefault("beta", 0.0)
        kwargs.setdefault("threshold", 0.0)
        super().__init__(num_classes=num_classes, widths=widths, blocks=blocks, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"BinaryResNet expects input x of shape [B, {self.in_channels}, H, W], "
                f"got {tuple(x.shape)}"
            )
        return super().forward(x.unsqueeze(0))


def dvs_resnet19(**kwargs) -> DVSResNet:
    """The DVS128 Gesture reference network (:class:`DVSResNet` with its defaults)."""
    return DVSResNet(**kwargs)


def cifar_resnet25(**kwargs) -> BinaryResNet:
    """The CIFAR-10 reference network (:class:`BinaryResNet` with its defaults)."""
    return BinaryResNet(**kwargs)
