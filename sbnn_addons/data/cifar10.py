"""CIFAR-10 from the standard python pickle batches (``cifar-10-python.tar.gz``, unpacked).

Reads, with :mod:`pickle` and NumPy only (no torchvision, never downloads)::

    <data_dir>/data_batch_1 ... data_batch_5, test_batch
    or <data_dir>/cifar-10-batches-py/data_batch_1 ... test_batch

Each batch is a pickled dict with ``b"data"`` (uint8 ``[n, 3072]``, channel-major
R, G, B planes of 32x32) and ``b"labels"`` (``n`` ints in ``[0, 10)``).
"""

from __future__ import annotations

import numbers
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..base import check_flag

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "LAYOUT", "find_cifar10", "load_cifar10"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
LAYOUT = (
    "expected the CIFAR-10 python batches (data_batch_1 ... data_batch_5 and test_batch, "
    "as unpacked from cifar-10-python.tar.gz) in the folder or in its "
    "cifar-10-batches-py/ subfolder; sbnn_addons never downloads"
)


def find_cifar10(data_dir: str | os.PathLike) -> Path:
    """The folder holding the batches: ``data_dir`` or ``data_dir/cifar-10-batches-py``.

    Raises:
        FileNotFoundError: neither holds ``test_batch`` (the message names the layout).
    """
    root = Path(data_dir)
    for cand in (root, root / "cifar-10-batches-py"):
        if (cand / "test_batch").is_file():
            return cand
    raise FileNotFoundError(f"CIFAR-10 batches not found under {root}: {LAYOUT}")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            d = pickle.load(fh, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise ValueError(f"{path} is not a CIFAR-10 pickle batch ({err}); {LAYOUT}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} holds a {type(d).__name__}, not a dict; {LAYOUT}")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path} has keys {sorted(map(str, d))}, no data/labels; {LAYOUT}")
    data, labels = np.asarray(data), np.asarray(labels)
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise ValueError(f"{path}: data of shape {data.shape} (want [n, 3072]); {LAYOUT}")
    if len(data) == 0:
        raise ValueError(f"{path} holds no images (data of shape {data.shape}); {LAYOUT}")
    # a float or out-of-range array was cast to uint8 silently (0.7 -> 0, 300 -> 44)
    if (not np.issubdtype(data.dtype, np.integer) or data.dtype == np.bool_
            or data.min() < 0 or data.max() > 255):
        raise ValueError(f"{path}: data must be uint8 pixels 0..255, got dtype {data.dtype} "
                         f"with values in [{data.min()}, {data.max()}]; {LAYOUT}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: labels must be integer class indices [n], got dtype "
                         f"{labels.dtype} and shape {labels.shape}; {LAYOUT}")
    if labels.min() < 0 or labels.max() >= 10:
        raise ValueError(f"{path}: labels must lie in 0..9 (the 10 CIFAR-10 classes), got "
                         f"values in [{labels.min()}, {labels.max()}]; {LAYOUT}")
    return data.astype(np.uint8, copy=False), labels.astype(np.int64)


def load_cifar10(
    data_dir: str | os.PathLike,
    split: str = "train",
    normalize: bool = True,
    max_samples: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Load one split as ``(images [N, 3, 32, 32] float32, labels [N] int64)``.

    Args:
        data_dir: folder with the batches (see the module docstring).
        split: ``"train"`` (the five data batches) or ``"test"``.
        normalize: ``(x / 255 - mean) / std`` per channel (:data:`CIFAR10_MEAN`,
            :data:`CIFAR10_STD`); otherwise ``x / 255`` in ``[0, 1]``.
        max_samples: keep only the first ``max_samples`` images (an integer >= 1).

    Raises:
        FileNotFoundError / ValueError: missing or malformed batches (the message names
            the expected layout: uint8 pixels, integer labels in ``0..9``), or
            ``max_samples`` not an integer >= 1.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    normalize = check_flag("normalize", normalize)  # normalize="no" normalised
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(
            max_samples, numbers.Integral) or max_samples < 1):
        raise ValueError(f"max_samples must be an integer >= 1 (or None for the whole "
                         f"split), got {max_samples!r}")
    folder = find_cifar10(data_dir)
    names = TRAIN_BATCHES if split == "train" else ("test_batch",)
    xs, ys = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {LAYOUT}")
        x, y = _read_batch(path)
        xs.append(x)
        ys.append(y)
        if max_samples is not None and sum(map(len, ys)) >= max_samples:
            break
    x, y = np.concatenate(xs), np.concatenate(ys)
    if max_samples is not None:
        x, y = x[:max_samples], y[:max_samples]
    images = torch.from_numpy(x.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    if normalize:
        mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
        images = (images - mean) / std
    return images, torch.from_numpy(y)
