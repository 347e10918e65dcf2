"""Real snnTorch models (tutorial style) shared by the snnTorch adapter tests."""

from __future__ import annotations

import snntorch as snn
import torch
import torch.nn.functional as F
from torch import nn

from sbnn_addons.snntorch import reset

BETA = 0.9
T = 12


def boost(model: nn.Module, factor: float = 3.0) -> nn.Module:
    """Scale the initial weights so that every layer spikes on rate-coded input."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(factor)
    return model


def seq_leaky() -> nn.Module:
    return boost(nn.Sequential(
        nn.Linear(64, 32), snn.Leaky(beta=BETA, init_hidden=True),
        nn.Linear(32, 10), snn.Leaky(beta=BETA, init_hidden=True, output=True),
    ))


def seq_rleaky() -> nn.Module:
    return boost(nn.Sequential(
        nn.Linear(64, 32), snn.RLeaky(beta=BETA, linear_features=32, init_hidden=True),
        nn.Linear(32, 10),
        snn.RLeaky(beta=BETA, linear_features=10, init_hidden=True, output=True),
    ))


def seq_conv() -> nn.Module:
    return boost(nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.MaxPool2d(2), snn.Leaky(beta=BETA, init_hidden=True),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
        snn.Leaky(beta=BETA, init_hidden=True, output=True),
    ))


class LoopLeaky(nn.Module):
    """snnTorch tutorial 5 network: explicit time loop inside forward."""

    def __init__(self, num_inputs=64, num_hidden=32, num_outputs=10):
        super().__init__()
        self.fc1 = nn.Linear(num_inputs, num_hidden)
        self.lif1 = snn.Leaky(beta=BETA)
        self.fc2 = nn.Linear(num_hidden, num_outputs)
        self.lif2 = snn.Leaky(beta=BETA)

    def forward(self, x):
        mem1 = self.lif1.init_leaky()
        mem2 = self.lif2.init_leaky()
        spk2_rec, mem2_rec = [], []
        for step in range(x.shape[0]):
            cur1 = self.fc1(x[step])
            spk1, mem1 = self.lif1(cur1, mem1)
            cur2 = self.fc2(spk1)
            spk2, mem2 = self.lif2(cur2, mem2)
            spk2_rec.append(spk2)
            mem2_rec.append(mem2)
        return torch.stack(spk2_rec), torch.stack(mem2_rec)


class EditedLoop(nn.Module):
    """snnTorch tutorial 5's explicit loop that passes the first neuron back
    ``edit(mem1, t)``, a membrane computed from the one its step returned (a copy, a
    detach, or an edit of the values); returns the output spike counts."""

    def __init__(self, edit, num_inputs=12, num_hidden=16, num_outputs=5):
        super().__init__()
        self.fc1, self.lif1 = nn.Linear(num_inputs, num_hidden), snn.Leaky(beta=BETA)
        self.fc2, self.lif2 = nn.Linear(num_hidden, num_outputs), snn.Leaky(beta=BETA)
        self.edit = edit

    def forward(self, x):
        mem1, mem2 = self.lif1.init_leaky(), self.lif2.init_leaky()
        out = 0
        for t in range(x.shape[0]):
            spk1, mem1 = self.lif1(self.fc1(x[t]), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            mem1 = self.edit(mem1, t)
            out = out + spk2
        return out


class HandoffLoop(nn.Module):
    """An encoder-decoder explicit loop: the decoder neuron starts from
    ``edit(mem_enc, 0)``, computed from the encoder neuron's last membrane (a sequence to
    sequence model's hand-off); returns the decoder's spike counts."""

    def __init__(self, edit, num_inputs=12, num_hidden=16):
        super().__init__()
        self.fc1, self.encoder = nn.Linear(num_inputs, num_hidden), snn.Leaky(beta=BETA)
        self.fc2, self.decoder = nn.Linear(num_hidden, num_hidden), snn.Leaky(beta=BETA)
        self.edit = edit
        with torch.no_grad():
            self.fc2.weight.mul_(3)

    def forward(self, x):
        mem_enc = self.encoder.init_leaky()
        for t in range(x.shape[0]):
            spk, mem_enc = self.encoder(self.fc1(x[t]), mem_enc)
        mem_dec, out = self.edit(mem_enc, 0), 0
        for _ in range(x.shape[0]):
            spk_dec, mem_dec = self.decoder(self.fc2(spk), mem_dec)
            out = out + spk_dec
        return out


class MembraneFedLoop(EditedLoop):
    """``EditedLoop`` whose second neuron is driven by ``edit(self, spk1, mem1)``, its
    input current computed from the first neuron's step (``self.fc2(spk1)``, the
    tutorial's; ``self.fc2(mem1)``: a layer fed by a membrane); returns the output spike
    counts."""

    def forward(self, x):
        mem1, mem2 = self.lif1.init_leaky(), self.lif2.init_leaky()
        out = 0
        for t in range(x.shape[0]):
            spk1, mem1 = self.lif1(self.fc1(x[t]), mem1)
            spk2, mem2 = self.lif2(self.edit(self, spk1, mem1), mem2)
            out = out + spk2
        return out


class ShrinkingLoop(EditedLoop):
    """``EditedLoop`` whose batch shrinks after two steps (the first half of the examples
    goes on): both neurons go on from ``edit(mem, half)``, computed from the first half of
    their membranes (``mem[:half]``); returns the spike counts, zero for the examples that
    stopped."""

    def forward(self, x):
        mem1, mem2 = self.lif1.init_leaky(), self.lif2.init_leaky()
        out, half = 0, x.shape[1] // 2
        for t in range(x.shape[0]):
            if t == 2:
                mem1, mem2, out = self.edit(mem1, half), self.edit(mem2, half), out[:half]
            spk1, mem1 = self.lif1(self.fc1(x[t, :out.shape[0]] if t >= 2 else x[t]), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            out = out + spk2
        return torch.cat([out, out.new_zeros(x.shape[1] - half, out.shape[1])])


class LoopRLeaky(nn.Module):
    """RLeaky tutorial style: explicit spk / mem states."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.lif1 = snn.RLeaky(beta=BETA, linear_features=32)
        self.fc2 = nn.Linear(32, 10)
        self.lif2 = snn.RLeaky(beta=BETA, linear_features=10)

    def forward(self, x):
        spk1, mem1 = self.lif1.init_rleaky()
        spk2, mem2 = self.lif2.init_rleaky()
        spk_rec, mem_rec = [], []
        for step in range(x.shape[0]):
            spk1, mem1 = self.lif1(self.fc1(x[step]), spk1, mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), spk2, mem2)
            spk_rec.append(spk2)
            mem_rec.append(mem2)
        return torch.stack(spk_rec), torch.stack(mem_rec)


class TutorialConv(nn.Module):
    """snnTorch tutorial 7 CNN (``F.max_pool2d(self.conv1(x), 2)``), for 1x8x8 input."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.lif1 = snn.Leaky(beta=BETA)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.lif2 = snn.Leaky(beta=BETA)
        self.fc1 = nn.Linear(16 * 2 * 2, 10)
        self.lif3 = snn.Leaky(beta=BETA)

    def forward(self, x):
        mem1 = self.lif1.reset_mem()
        mem2 = self.lif2.reset_mem()
        mem3 = self.lif3.reset_mem()
        spk_rec, mem_rec = [], []
        for step in range(x.shape[0]):
            cur1 = F.max_pool2d(self.conv1(x[step]), 2)
            spk1, mem1 = self.lif1(cur1, mem1)
            cur2 = F.max_pool2d(self.conv2(spk1), 2)
            spk2, mem2 = self.lif2(cur2, mem2)
            cur3 = self.fc1(spk2.view(spk2.shape[0], -1))
            spk3, mem3 = self.lif3(cur3, mem3)
            spk_rec.append(spk3)
            mem_rec.append(mem3)
        return torch.stack(spk_rec), torch.stack(mem_rec)


def run(model: nn.Module, x: torch.Tensor):
    """Run a model over ``x [T, B, ...]``: Sequential models step by step outside."""
    if isinstance(model, nn.Sequential):
        reset(model)
        spk, mem = [], []
        for t in range(x.shape[0]):
            s, m = model(x[t])
            spk.append(s)
            mem.append(m)
        return torch.stack(spk), torch.stack(mem)
    return model(x)


def inputs(kind: str, batch: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (T, batch, 1, 8, 8) if kind == "conv" else (T, batch, 64)
    return (torch.rand(shape, generator=g) < 0.4).float()


MODELS = {
    "seq_leaky": (seq_leaky, "fc"),
    "seq_rleaky": (seq_rleaky, "fc"),
    "seq_conv": (seq_conv, "conv"),
    "loop_leaky": (LoopLeaky, "fc"),
    "loop_rleaky": (LoopRLeaky, "fc"),
    "tutorial_conv": (TutorialConv, "conv"),
}


def make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    factory, kind = MODELS[name]
    return factory(), inputs(kind)
