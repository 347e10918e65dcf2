"""Spiking Heidelberg Digits (SHD) through tonic, binned to spike counts (Method page, section 8).

Reads tonic's layout (never downloads)::

    <root>/SHD/shd_train.h5   shd_train.h5.zip   (the .zip may be an empty placeholder)
    <root>/SHD/shd_test.h5    shd_test.h5.zip

and bins each sample's events into ``num_bins`` bins of ``bin_ms`` milliseconds (reference:
100 bins of 14 ms) over the 700 input channels. ``tonic`` and ``h5py`` are imported lazily.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["SHD_CHANNELS", "SHD_CLASSES", "SHDBinned", "load_shd", "make_synthetic_shd",
           "collate_time_major"]

SHD_CHANNELS = 700
SHD_CLASSES = 20
_KEYS = ("spikes/times", "spikes/units", "labels", "extra/keys", "extra/speaker")  # tonic reads all


def _check_layout(root: str | os.PathLike, split: str) -> Path:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(root) / "SHD"
    h5 = folder / f"shd_{split}.h5"
    layout = (f"expected tonic's SHD layout: {folder}/shd_{split}.h5 and an (empty is fine) "
              f"{folder}/shd_{split}.h5.zip placeholder; sbnn_addons never downloads")
    if not h5.is_file():
        raise FileNotFoundError(f"SHD file not found: {h5}; {layout}")
    if not (folder / f"shd_{split}.h5.zip").exists():
        raise FileNotFoundError(
            f"{folder}/shd_{split}.h5.zip is missing, so tonic would try to download; {layout} "
            f"(create it with: touch {folder}/shd_{split}.h5.zip)"
        )
    import h5py

    try:
        with h5py.File(h5, "r") as f:
            missing = [k for k in _KEYS if k not in f]
            if missing:
                raise ValueError(f"{h5} is malformed: missing datasets {missing}; {layout}")
            lengths = {k: len(f[k]) for k in _KEYS[:3]}
            labels = np.asarray(f["labels"][()])
    except OSError as err:
        raise ValueError(f"{h5} is not a readable HDF5 file ({err}); {layout}") from None
    if len(set(lengths.values())) != 1:  # tonic indexes all three by sample
        raise ValueError(f"{h5} is malformed: the datasets hold different numbers of "
                         f"samples {lengths}; {layout}")
    if len(labels) == 0:
        raise ValueError(f"{h5} holds no samples; {layout}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{h5}: labels must be integer class indices [N], got dtype "
                         f"{labels.dtype} and shape {labels.shape}; {layout}")
    if labels.min() < 0 or labels.max() >= SHD_CLASSES:
        raise ValueError(f"{h5}: labels must lie in 0..{SHD_CLASSES - 1} (the SHD digits), "
                         f"got values in [{labels.min()}, {labels.max()}]; {layout}")
    return folder


def _bin_events(events: np.ndarray, num_bins: int, bin_us: float) -> Tensor:
    t = np.asarray(events["t"], dtype=np.float64)
    x = np.asarray(events["x"], dtype=np.int64)
    b = np.floor(t / bin_us).astype(np.int64)
    keep = (b >= 0) & (b < num_bins) & (x >= 0) & (x < SHD_CHANNELS)
    counts = np.zeros((num_bins, SHD_CHANNELS), dtype=np.float32)
    np.add.at(counts, (b[keep], x[keep]), 1.0)
    return torch.from_numpy(counts)


class SHDBinned(torch.utils.data.Dataset):
    """SHD samples as spike-count frames ``[num_bins, 700]`` (float32) and labels.

    Args:
        root: folder containing ``SHD/`` (tonic layout, see the module doc).
        split: ``"train"`` or ``"test"``.
        num_bins: number of time bins ``T`` (reference 100).
        bin_ms: bin width in milliseconds (reference 14); events after
            ``num_bins * bin_ms`` are dropped.

    Raises:
        FileNotFoundError / ValueError: missing or malformed files (the message names the
            expected layout; labels must be integers in ``0..19``, spike units in
            ``0..699``, times non-negative), ``num_bins`` not an integer >= 1, ``bin_ms``
            not a finite number > 0.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", num_bins: int = 100,
                 bin_ms: float = 14.0) -> None:
        _check_positive_int("num_bins", num_bins)
        if (isinstance(bin_ms, bool) or not isinstance(bin_ms, numbers.Real)
                or not 0 < bin_ms < math.inf):
            # NaN dropped every event (all-zero frames), inf put them all in bin 0
            raise ValueError(f"bin_ms must be a finite number > 0 (the bin width in "
                             f"milliseconds, reference 14), got {bin_ms!r}")
        self.path = _check_layout(root, split) / f"shd_{split}.h5"
        import tonic

        self.dataset = tonic.datasets.SHD(save_to=str(root), train=split == "train")
        self.num_bins = int(num_bins)
        self.bin_us = float(bin_ms) * 1000.0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        events, label = self.dataset[index]
        units, times = np.asarray(events["x"]), np.asarray(events["t"])
        if units.size and (units.min() < 0 or units.max() >= SHD_CHANNELS):  # were dropped
            raise ValueError(f"{self.path}, sample {index}: spike units must lie in "
                             f"0..{SHD_CHANNELS - 1}, got [{units.min()}, {units.max()}]")
        if times.size and times.min() < 0:
            raise ValueError(f"{self.path}, sample {index}: negative spike times "
                             f"({times.min() / 1e6} s); SHD times are seconds from the start")
        return _bin_events(events, self.num_bins, self.bin_us), int(label)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def collate_time_major(batch) -> tuple[Tensor, Tensor]:
    """DataLoader collate: ``[(frames [T, 700], label)] -> ([T, B, 700], labels [B])``.

    Raises:
        ValueError: an empty batch.
    """
    if len(batch) == 0:
        raise ValueError("collate_time_major: the batch is empty (no (frames, label) pairs)")
    frames = torch.stack([b[0] for b in batch], dim=1)
    return frames, torch.tensor([b[1] for b in batch], dtype=torch.int64)


def load_shd(root: str | os.PathLike, split: str = "train", num_bins: int = 100,
             bin_ms: float = 14.0, max_samples: int | None = None) -> tuple[Tensor, Tensor]:
    """Load (part of) an SHD split into memory as ``(x [T, N, 700], labels [N])``.

    The full training set is large (``8156 x 100 x 700`` floats); use ``max_samples``
    or :class:`SHDBinned` with a ``DataLoader`` (``collate_fn=collate_time_major``).

    Raises:
        FileNotFoundError / ValueError: see :class:`SHDBinned`; ``max_samples`` not an
            integer >= 1.
    """
    if max_samples is not None:
        _check_positive_int("max_samples", max_samples)
    ds = SHDBinned(root, split, num_bins, bin_ms)
    n = len(ds) if max_samples is None else min(int(max_samples), len(ds))
    return collate_time_major([ds[i] for i in range(n)])


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """A 1-D object array of ``arrays`` (``np.array(..., dtype=object)`` of arrays of equal
    length would build a 2-D array of numbers instead)."""
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def make_synthetic_shd(root: str | os.PathLike, num_train: int = 64, num_test: int = 32,
                       seed: int = 0, num_classes: int = SHD_CLASSES,
                       duration_s: float = 1.0, events_per_sample: int = 400) -> Path:
    """Write a small, learnable SHD-format dataset in tonic's layout (for tests/examples).

    Class ``c`` fires mostly on a band of channels centred at ``(c + 0.5) * 700 / C``,
    with times uniform in ``[0, duration_s)``. Writes ``<root>/SHD/shd_{train,test}.h5``
    and empty ``.h5.zip`` placeholders. Returns the ``SHD`` folder.
    """
    import h5py

    for name, value in (("num_train", num_train), ("num_test", num_test),
                        ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if (isinstance(duration_s, bool) or not isinstance(duration_s, numbers.Real)
            or not 0 < duration_s < math.inf):  # NaN failed inside numpy, 0 put every event at 0
        raise ValueError(f"duration_s must be a finite number > 0, got {duration_s!r}")
    if (isinstance(events_per_sample, bool) or not isinstance(events_per_sample, int)
            or events_per_sample < 1):
        raise ValueError(f"events_per_sample must be an integer >= 1, got {events_per_sample!r}")
    folder = Path(root) / "SHD"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width = SHD_CHANNELS / num_classes
    for split, n in (("train", num_train), ("test", num_test)):
        labels = np.arange(n) % num_classes
        rng.shuffle(labels)
        times, units = [], []
        for c in labels:
            k = int(rng.poisson(events_per_sample))
            band = rng.normal((c + 0.5) * width, width, size=k)
            noise = rng.uniform(0, SHD_CHANNELS, size=k)
            u = np.where(rng.random(k) < 0.8, band, noise)
            u = np.clip(np.round(u), 0, SHD_CHANNELS - 1).astype(np.uint16)
            t = np.sort(rng.uniform(0, duration_s, size=k)).astype(np.float16)
            times.append(t)
            units.append(u)
        path = folder / f"shd_{split}.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("spikes/times", data=_ragged(times),
                             dtype=h5py.vlen_dtype(np.float16))
            f.create_dataset("spikes/units", data=_ragged(units),
                             dtype=h5py.vlen_dtype(np.uint16))
            f.create_dataset("labels", data=labels.astype(np.uint16))
            f.create_dataset("extra/speaker", data=rng.integers(0, 10, n).astype(np.uint16))
            f.create_dataset("extra/keys",
                             data=np.array([f"class-{i}".encode() for i in range(num_classes)]))
        (folder / f"shd_{split}.h5.zip").touch()
    return folder
