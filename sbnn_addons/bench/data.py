"""Data handling of the benchmark: layouts, seeded stratified subsets, identical batch order.

Layouts (``layout=`` of :func:`sbnn_addons.bench.compare`) say where the samples are in the
tensors you pass and what the model receives:

.. code-block:: text

    "TB"      time-major   x [T, N, ...]  batches x[:, idx] = [T, B, ...] go to the model as is
    "BT"      batch-major  x [N, T, ...]  batches [B, T, ...] are transposed to [T, B, ...]
    "static"  no time axis x [N, ...]     batches [B, ...] go as is (an ``encode`` hook can
                                          add the time axis, e.g. a rate code)

A ``DataLoader`` yields batches in the same layouts. ``encode(x, generator)`` (optional)
runs on every batch after the transposition; its ``generator`` is seeded identically for
every method, so all methods see the same encoded spikes.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LAYOUTS", "stratified_subset", "check_subset_classes", "DataSpec"]

LAYOUTS = ("TB", "BT", "static")
_ALIASES = {"time-major": "TB", "batch-major": "BT", "tb": "TB", "bt": "BT", "B": "static"}


def normalise_layout(layout: str) -> str:
    """``"TB"``, ``"BT"`` or ``"static"`` (accepts ``"time-major"`` / ``"batch-major"``)."""
    out = _ALIASES.get(layout, layout)
    if out not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS} (or 'time-major', 'batch-major'), "
                         f"got {layout!r}")
    return out


def stratified_subset(labels: Tensor, n: int, seed: int = 0) -> Tensor:
    """Indices of a seeded, class-stratified subset of ``n`` samples.

    Every class gets ``n * share`` samples (largest remainders round, at least one per class
    when ``n`` allows), drawn at random within the class with generator ``seed``; the indices
    come back in a seeded random order (never sorted by label).

    Args:
        labels: integer labels ``[N]``.
        n: subset size, ``1 <= n``; ``n >= N`` returns every index (shuffled).
        seed: seed of the draw.

    Returns:
        ``LongTensor`` of ``min(n, N)`` distinct indices.
    """
    labels = torch.as_tensor(labels).reshape(-1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    gen = torch.Generator().manual_seed(int(seed))
    total = labels.numel()
    if n >= total:
        return torch.randperm(total, generator=gen)
    classes, counts = torch.unique(labels, return_counts=True)
    quota = counts.double() * n / total
    take = quota.floor().long()
    if n >= len(classes):  # at least one sample of every class
        take = torch.maximum(take, torch.ones_like(take))
    # distribute what is left by largest remainder (ties: the rarer class first)
    while int(take.sum()) < n:
        room = take < counts
        rem = torch.where(room, quota - take.double(), torch.full_like(quota, -1e9))
        take[int(rem.argmax())] += 1
    while int(take.sum()) > n:  # the at-least-one rule overshot: trim the largest classes
        take[int(torch.where(take > 1, take, torch.zeros_like(take)).argmax())] -= 1
    picked = []
    for c, k in zip(classes.tolist(), take.tolist()):
        idx = (labels == c).nonzero().reshape(-1)
        picked.append(idx[torch.randperm(len(idx), generator=gen)[:k]])
    out = torch.cat(picked)
    return out[torch.randperm(len(out), generator=gen)]


def check_subset_classes(full: Tensor, subset: Tensor, where: str,
                         num_classes: int | None = None) -> None:
    """Raise when ``subset`` has fewer classes than ``full`` (or than ``num_classes``).

    Raises:
        ValueError: naming the missing classes and ``where`` the subset came from.
    """
    have = set(torch.as_tensor(subset).unique().tolist())
    want = set(torch.as_tensor(full).unique().tolist())
    if num_classes is not None:
        want |= set(range(num_classes))
    missing = sorted(want - have)
    if missing:
        raise ValueError(
            f"{where}: the subset has {len(have)} of {len(want)} classes (missing "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}); accuracy on it would "
            "measure the class shares, not the model. Use more samples (at least one per "
            "class) or a stratified subset (sbnn_addons.bench.stratified_subset)")


def fingerprint(labels: Tensor, inputs: Tensor | None = None) -> str:
    """Short hash of a label sequence and, if given, of per-batch input sums ``[n]`` (to
    prove that two methods saw the same samples in the same order: labels alone do not
    tell two samples of one class apart)."""
    h = hashlib.sha1(labels.detach().cpu().to(torch.int64).numpy().tobytes())
    if inputs is not None:
        h.update(inputs.detach().cpu().to(torch.float64).numpy().tobytes())
    return h.hexdigest()[:12]


def class_labels(y, name: str) -> Tensor:
    """Labels as class indices ``[N]`` (int64).

    Raises:
        ValueError: one-hot or otherwise multi-dimensional labels, negative labels, or
            float labels with a fractional part (they would be truncated).
    """
    y = torch.as_tensor(y)
    if y.dim() > 1 and not (y.dim() == 2 and y.shape[1] == 1):
        raise ValueError(f"{name}: labels must be class indices [N], got shape "
                         f"{tuple(y.shape)} (one-hot labels: y.argmax(-1))")
    y = y.reshape(-1)
    if y.is_floating_point() and not bool((y == y.round()).all()):
        raise ValueError(f"{name}: labels must be class indices; float labels with a "
                         "fractional part would be truncated")
    y = y.long()
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"{name}: labels must be class indices >= 0, got {int(y.min())}")
    return y


@dataclass
class DataSpec:
    """One split: tensors ``(x, y)`` or a re-iterable loader of ``(x, y)`` batches."""

    x: Tensor | None = None
    y: Tensor | None = None
    loader: object | None = None
    layout: str = "TB"

    @classmethod
    def from_any(cls, data, layout: str, name: str) -> DataSpec:
        """Wrap ``(x, y)`` tensors, a ``TensorDataset`` or a ``DataLoader``."""
        layout = normalise_layout(layout)
        if isinstance(data, torch.utils.data.TensorDataset):
            data = tuple(data.tensors)
        if isinstance(data, (tuple, list)) and len(data) == 2 and all(
                isinstance(t, Tensor) for t in data):
            x, y = data
            y = class_labels(y, name)
            if len(y) == 0:
                raise ValueError(f"{name} is empty (0 samples)")
            n = x.shape[1] if layout == "TB" else x.shape[0]
            if n != len(y):
                raise ValueError(
                    f"{name}: x has {n} samples on its {'second' if layout == 'TB' else 'first'}"
                    f" axis (layout {layout!r}, shape {tuple(x.shape)}) but y has {len(y)}; "
                    "time-major data is layout='TB' [T, N, ...], batch-major 'BT' [N, T, ...]")
            return cls(x=x, y=y, layout=layout)
        if isinstance(data, (tuple, list)):
            kinds = ", ".join(type(t).__name__ for t in data)
            raise TypeError(
                f"{name} must be (x, y): two tensors, got {len(data)} items ({kinds}); "
                "convert numpy arrays with torch.as_tensor, and pass extra per-sample data "
                "through a DataLoader")
        if isinstance(getattr(data, "dataset", None), torch.utils.data.IterableDataset):
            raise ValueError(
                f"{name}: a DataLoader over an IterableDataset has no length and no "
                "reproducible order, which the comparison needs (same samples, same order "
                "for every method); use a map-style Dataset (e.g. TensorDataset)")
        if hasattr(data, "__iter__") and not isinstance(data, (Tensor, dict, str)):
            collate = getattr(data, "collate_fn", None)
            if (layout == "TB" and getattr(data, "batch_size", None) is not None
                    and collate is torch.utils.data.default_collate):
                raise ValueError(
                    f"{name}: a DataLoader stacks its samples along the first axis, so its "
                    "batches are batch-major [B, T, ...]: pass layout='BT' (or 'static' for "
                    "samples without a time axis); layout='TB' is for time-major tensors")
            spec = cls(loader=data, layout=layout)
            if len(spec) == 0:
                raise ValueError(f"{name} is empty (its DataLoader draws 0 samples)")
            try:
                batches = len(data)
            except TypeError:
                batches = None
            if batches == 0:
                raise ValueError(
                    f"{name}: the DataLoader yields no batch: its {len(spec)} samples are "
                    f"fewer than batch_size={getattr(data, 'batch_size', None)} and "
                    "drop_last=True keeps only full batches; lower batch_size or pass "
                    "drop_last=False")
            return spec
        raise TypeError(f"{name} must be (x, y) tensors, a TensorDataset or a DataLoader, got "
                        f"{type(data).__name__}")

    @property
    def is_tensor(self) -> bool:
        return self.x is not None

    def __len__(self) -> int:
        if self.is_tensor:
            return len(self.y)
        # the samples it draws: a sampler over part of the dataset draws that part
        for source in (self._sampler, getattr(self.loader, "dataset", None)):
            try:
                return len(source)  # type: ignore[arg-type]
            except TypeError:
                continue
        return 0

    @property
    def _sampler(self):
        """The loader's sampler of samples (its batch sampler's, else its own), or None."""
        sampler = getattr(getattr(self.loader, "batch_sampler", None), "sampler", None)
        return sampler if sampler is not None else getattr(self.loader, "sampler", None)

    @property
    def shuffles(self) -> bool:
        """Whether a loader draws its samples in a random order."""
        sampler = self._sampler
        return isinstance(sampler, (torch.utils.data.RandomSampler,
                                    torch.utils.data.SubsetRandomSampler,
                                    torch.utils.data.WeightedRandomSampler))

    def take(self, idx: Tensor) -> DataSpec:
        """The samples ``idx`` (tensors only)."""
        x = self.x[:, idx] if self.layout == "TB" else self.x[idx]
        return DataSpec(x=x, y=self.y[idx], layout=self.layout)

    def subset(self, n: int | None, seed: int, where: str,
               num_classes: int | None = None) -> DataSpec:
        """A stratified seeded subset of ``n`` samples (raises when it drops a class)."""
        if n is None:
            return self
        if not self.is_tensor:
            raise ValueError(f"{where}: max-samples subsets need tensor data; subset your "
                             "dataset with torch.utils.data.Subset(ds, stratified_subset(labels,"
                             " n)) instead")
        out = self.take(stratified_subset(self.y, n, seed))
        check_subset_classes(self.y, out.y, where, num_classes)
        return out

    def batches(self, batch_size: int, perm_gen: torch.Generator | None, rank: int = 0,
                world: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
        """``(x, y)`` batches as stored; shuffled by ``perm_gen`` (tensors), or the loader's
        own order (its sampler reseeded from ``perm_gen`` so every method gets the same)."""
        if self.is_tensor:
            n = len(self.y)
            order = (torch.randperm(n, generator=perm_gen) if perm_gen is not None
                     else torch.arange(n))
            if world > 1:
                pad = (-n) % world
                order = torch.cat([order, order[:pad]])[rank::world]
            for i in range(0, len(order), batch_size):
                idx = order[i:i + batch_size]
                yield (self.x[:, idx] if self.layout == "TB" else self.x[idx]), self.y[idx]
            return
        seed = int(torch.randint(0, 2**62, (1,), generator=perm_gen)) if perm_gen else 0
        # the loader's generator, and a sampler's own (RandomSampler(ds, generator=g))
        for own in {id(g): g for g in (getattr(self.loader, "generator", None),
                                       getattr(self._sampler, "generator", None))
                    if isinstance(g, torch.Generator)}.values():
            own.manual_seed(seed)
        state = torch.get_rng_state()
        # a RandomSampler without generator draws its seed from the global RNG when the
        # first batch is fetched: seed it for that moment only
        torch.manual_seed(seed)
        try:
            it = iter(self.loader)
            first = next(it, None)
        finally:
            torch.set_rng_state(state)
        if first is None:
            return
        for batch in itertools.chain([first], it):
            if isinstance(batch, dict):
                raise TypeError(
                    f"a DataLoader must yield (x, y) batches, got a dict with keys "
                    f"{list(batch)[:6]}: give the DataLoader a collate_fn that returns "
                    "(x, y), e.g. collate_fn=lambda items: (torch.stack([d['x'] for d in "
                    "items]), torch.stack([d['y'] for d in items])) with your key names")
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise TypeError("a DataLoader must yield (x, y) batches (further items "
                                f"are ignored), got {type(batch).__name__}")
            x, y = batch[0], class_labels(batch[1], "a DataLoader batch")
            n = x.shape[1] if self.layout == "TB" else x.shape[0]
            if n != len(y):
                raise ValueError(
                    f"a DataLoader batch has x of shape {tuple(x.shape)} and {len(y)} labels: "
                    f"with layout {self.layout!r} the samples are on its "
                    f"{'second' if self.layout == 'TB' else 'first'} axis; time-major "
                    "batches are layout='TB' [T, B, ...], batch-major 'BT' [B, T, ...]")
            yield x, y


def prepare(x: Tensor, layout: str, encode: Callable | None, gen: torch.Generator,
            device: torch.device) -> Tensor:
    """A stored batch as the model's input: transposed (``"BT"``), encoded, float on device.

    Raises:
        ValueError: the batch holds NaN or inf (checked for every method alike, before the
            model: a host model would train on silently where a converted one raises).
    """
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError("a data batch holds NaN or inf values; clean the data (e.g. "
                         "torch.nan_to_num) or drop those samples")
    if layout == "BT":
        x = x.transpose(0, 1)
    if encode is not None:
        n = int(x.shape[0] if layout == "static" else x.shape[1])  # samples in the batch
        shape = list(x.shape)
        x = encode(x, gen)
        if not isinstance(x, Tensor) or x.dim() < 2 or int(x.shape[1]) != n:
            got = f"shape {list(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"encode returned {got} for a batch of {n} samples (its input {shape}): "
                f"it must return the model's time-major input [T, B, ...] = [T, {n}, ...]. "
                "A batch-first result [B, T, ...] would be read with the samples as time "
                "steps: return it with .transpose(0, 1)")
    return x.to(device, torch.float32)
