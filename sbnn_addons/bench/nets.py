"""Networks and surrogates of the benchmark (snnTorch and SpikingJelly, imported lazily).

All networks take time-major input ``[T, B, ...]`` and return logits ``[B, C]`` = the
time average of the readout layer applied to the last spiking layer's spikes. The
snnTorch and SpikingJelly versions of a task have the same layout (layers, widths,
``beta = 1 - 1/tau = 0.9``, threshold 1, subtractive reset, no input scaling).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GaussianSurrogate", "MLPNet", "ConvNet", "DigitsNet", "DVSNet", "SJMLPNet",
           "SJConvNet", "sj_surrogate", "snntorch_surrogate"]

BETA = 0.9


class _GaussianSpikeFn(torch.autograd.Function):
    """Heaviside forward ``1[u > 0]``; backward ``phi(u / w) / w`` (Gaussian pdf, std w)."""

    @staticmethod
    def forward(u: Tensor, width: float) -> Tensor:
        return (u > 0).to(u.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.width = float(inputs[1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        (u,) = ctx.saved_tensors
        w = ctx.width
        return grad * torch.exp(-0.5 * (u / w) ** 2) / (w * math.sqrt(2 * math.pi)), None


class GaussianSurrogate:
    """The reference scripts' surrogate: forward ``1[u > 0]``, backward ``phi(u/w)/w``.

    ``phi`` is the standard normal density and ``w = 0.4`` in the reference. A module-level
    class (not a closure), so models using it pickle with ``torch.save(model)``. Use it as
    snnTorch's ``spike_grad`` (``u = mem - threshold``).
    """

    def __init__(self, width: float = 0.4) -> None:
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        self.width = float(width)

    def __call__(self, u: Tensor) -> Tensor:
        return _GaussianSpikeFn.apply(u, self.width)

    def __repr__(self) -> str:
        return f"GaussianSurrogate(width={self.width})"


def snntorch_surrogate(name: str):
    """snnTorch ``spike_grad`` by name: ``"atan"``, ``"fast_sigmoid"`` or ``"gaussian"``."""
    if name == "gaussian":
        return GaussianSurrogate(0.4)
    from snntorch import surrogate

    if name == "atan":
        return surrogate.atan()
    if name == "fast_sigmoid":
        return surrogate.fast_sigmoid()
    raise ValueError(f"unknown surrogate {name!r}; expected 'atan', 'fast_sigmoid', 'gaussian'")


def sj_surrogate(name: str) -> nn.Module:
    """SpikingJelly ``surrogate_function`` by name: ``"sigmoid"`` or ``"atan"``."""
    from spikingjelly.activation_based import surrogate

    if name == "sigmoid":
        return surrogate.Sigmoid()
    if name == "atan":
        return surrogate.ATan()
    raise ValueError(f"unknown SpikingJelly surrogate {name!r}; expected 'sigmoid' or 'atan'")


# --------------------------------------------------------------------------- snnTorch
class MLPNet(nn.Module):
    """``in -> hidden (Leaky or RLeaky) -> classes``; logits = time average of the readout.

    Args:
        in_features, hidden, num_classes: layer sizes.
        spike_grad: snnTorch ``spike_grad`` of the hidden neurons.
        recurrent: ``snn.RLeaky`` with all-to-all recurrent weights instead of ``snn.Leaky``.
        bn: a per-step shared ``BatchNorm1d`` between ``fc1`` and the neuron.
    """

    def __init__(self, in_features: int, hidden: int, num_classes: int, spike_grad=None,
                 recurrent: bool = False, bn: bool = False, beta: float = BETA) -> None:
        super().__init__()
        import snntorch as snn

        self.recurrent = recurrent
        self.fc1 = nn.Linear(in_features, hidden)
        self.bn1 = nn.BatchNorm1d(hidden) if bn else None
        if recurrent:
            self.lif1 = snn.RLeaky(beta=beta, linear_features=hidden, spike_grad=spike_grad)
        else:
            self.lif1 = snn.Leaky(beta=beta, spike_grad=spike_grad)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # [T, B, F] -> [B, C]
        if self.recurrent:
            spk, mem = self.lif1.init_rleaky()
        else:
            mem = self.lif1.init_leaky()
        logits = 0.0
        for t in range(x.shape[0]):
            cur = self.fc1(x[t])
            if self.bn1 is not None:
                cur = self.bn1(cur)
            if self.recurrent:
                spk, mem = self.lif1(cur, spk, mem)
            else:
                spk, mem = self.lif1(cur, mem)
            logits = logits + self.fc2(spk)
        return logits / x.shape[0]


class DigitsNet(MLPNet):
    """snnTorch tutorial-style FC network, ``64 -> hidden -> 10``."""

    def __init__(self, hidden: int = 128, beta: float = BETA, spike_grad=None,
                 bn: bool = False) -> None:
        super().__init__(64, hidden, 10, spike_grad, bn=bn, beta=beta)


class ConvNet(nn.Module):
    """Two conv-LIF-maxpool stages (``width``, ``2 width`` channels) and a linear readout.

    ``in_channels x 32 x 32`` input; optional per-step shared ``BatchNorm2d`` after each
    convolution (``bn=True``, the "with BatchNorm" baseline).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16, spike_grad=None,
                 bn: bool = False, beta: float = BETA, size: int = 32) -> None:
        super().__init__()
        import snntorch as snn

        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width) if bn else None
        self.lif1 = snn.Leaky(beta=beta, spike_grad=spike_grad)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width) if bn else None
        self.lif2 = snn.Leaky(beta=beta, spike_grad=spike_grad)
        self.fc = nn.Linear(2 * width * (size // 4) ** 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # [T, B, C, H, W] -> [B, classes]
        mem1, mem2 = self.lif1.init_leaky(), self.lif2.init_leaky()
        logits = 0.0
        for t in range(x.shape[0]):
            c1 = self.conv1(x[t])
            if self.bn1 is not None:
                c1 = self.bn1(c1)
            spk1, mem1 = self.lif1(F.max_pool2d(c1, 2), mem1)
            c2 = self.conv2(spk1)
            if self.bn2 is not None:
                c2 = self.bn2(c2)
            spk2, mem2 = self.lif2(F.max_pool2d(c2, 2), mem2)
            logits = logits + self.fc(spk2.flatten(1))
        return logits / x.shape[0]


class DVSNet(ConvNet):
    """snnTorch tutorial-style conv network for 2x32x32 DVS frames, 11 classes."""

    def __init__(self, width: int = 16, beta: float = BETA, spike_grad=None,
                 bn: bool = False) -> None:
        super().__init__(2, 11, width, spike_grad, bn=bn, beta=beta)


# --------------------------------------------------------------------------- SpikingJelly
def _lif(surrogate_function: nn.Module) -> nn.Module:
    from spikingjelly.activation_based import neuron

    # beta = 1 - 1/tau = 0.9, input not scaled, soft (subtractive) reset: as snn.Leaky
    return neuron.LIFNode(tau=1.0 / (1.0 - BETA), decay_input=False, v_threshold=1.0,
                          v_reset=None, surrogate_function=surrogate_function,
                          step_mode="m")


class _SJNet(nn.Module):
    """Multi-step SpikingJelly body ``[T, B, ...] -> [T, B, C]``; logits = mean over T.

    The neurons are reset at the start of every call (one call = one sequence).
    """

    def forward(self, x: Tensor) -> Tensor:
        from spikingjelly.activation_based import functional

        functional.reset_net(self.body)
        return self.body(x).mean(0)


class SJMLPNet(_SJNet):
    """SpikingJelly twin of :class:`MLPNet` (feed-forward): ``layer.Linear`` + ``LIFNode``."""

    def __init__(self, in_features: int, hidden: int, num_classes: int,
                 surrogate_function: nn.Module, bn: bool = False) -> None:
        super().__init__()
        from spikingjelly.activation_based import layer

        mods = [layer.Linear(in_features, hidden, step_mode="m")]
        if bn:
            mods.append(layer.BatchNorm1d(hidden, step_mode="m"))
        mods += [_lif(surrogate_function), layer.Linear(hidden, num_classes, step_mode="m")]
        self.body = nn.Sequential(*mods)


class SJConvNet(_SJNet):
    """SpikingJelly twin of :class:`ConvNet`: ``layer.Conv2d`` + ``LIFNode`` + max-pool."""

    def __init__(self, in_channels: int, num_classes: int, width: int,
                 surrogate_function: nn.Module, bn: bool = False, size: int = 32) -> None:
        super().__init__()
        from spikingjelly.activation_based import layer

        mods: list[nn.Module] = []
        for cin, cout in ((in_channels, width), (width, 2 * width)):
            mods.append(layer.Conv2d(cin, cout, 3, padding=1, step_mode="m"))
            if bn:
                mods.append(layer.BatchNorm2d(cout, step_mode="m"))
            mods += [layer.MaxPool2d(2, step_mode="m"), _lif(surrogate_function)]
        mods += [layer.Flatten(step_mode="m"),
                 layer.Linear(2 * width * (size // 4) ** 2, num_classes, step_mode="m")]
        self.body = nn.Sequential(*mods)
