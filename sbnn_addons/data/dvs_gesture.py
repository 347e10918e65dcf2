"""DVS128 Gesture frames preprocessed to 49 x 2 x 32 x 32 (``dvs_gesture_32`` layout).

The folder holds ``train.npz``, ``validation.npz`` and ``test.npz``, each with
``frames`` (float16, ``[N, 49, 2, 32, 32]``), ``labels`` (int64, ``[N]``) and
``sample_ids``. The path is always an argument; nothing is downloaded.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["DVSGestureFrames", "load_dvs_gesture_32", "LAYOUT"]

SPLITS = ("train", "validation", "test")
NUM_CLASSES = 11  #: DVS128 Gesture: labels 0..10
LAYOUT = (
    "expected a folder with train.npz, validation.npz and test.npz, each holding "
    "'frames' [N, 49, 2, 32, 32] and 'labels' [N] (the dvs_gesture_32 layout)"
)


def load_dvs_gesture_32(
    data_dir: str | Path,
    split: str = "train",
    frame_stride: int = 1,
    num_frames: int | None = None,
    classes: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split as tensors ``(frames [N, T, 2, 32, 32] float32, labels [N])``.

    Args:
        data_dir: folder in the ``dvs_gesture_32`` layout.
        split: ``"train"``, ``"validation"`` or ``"test"``.
        frame_stride: keep every ``frame_stride``-th frame (e.g. 3 gives 17 frames).
        num_frames: keep at most this many frames after striding.
        classes: keep only these labels (e.g. to hold classes out as OOD), any iterable
            of ints in ``0..10``, each present in the split; the labels keep their values
            (not renumbered).

    Raises:
        FileNotFoundError / ValueError: the folder does not have the layout above (an
            unreadable or empty file, labels that are not integers in ``0..10``, frames
            that are not non-negative finite counts included), an argument is out of
            range, or a requested class has no samples in the split.
        TypeError: ``classes`` is a single label instead of a collection.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    for name, value, allow_none in (("frame_stride", frame_stride, False),
                                    ("num_frames", num_frames, True)):
        if value is None and allow_none:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if classes is not None:
        if isinstance(classes, (int, np.integer, str)):
            raise TypeError(f"classes must be a collection of labels such as (0, 3), got "
                            f"{classes!r}; for one class pass ({classes!r},)")
        classes = list(classes)
        if not classes or any(isinstance(c, bool) or not isinstance(c, (int, np.integer))
                              or not 0 <= c < NUM_CLASSES for c in classes):
            raise ValueError(f"classes must be a non-empty collection of labels in "
                             f"0..{NUM_CLASSES - 1}, got {classes!r}")
    path = Path(data_dir) / f"{split}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {LAYOUT}")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a .npy under the .npz name
            raise ValueError(f"it holds one {type(data).__name__}, not named arrays")
        with data:
            if "frames" not in data or "labels" not in data:
                raise KeyError(sorted(data.keys()))
            frames, labels = data["frames"], data["labels"]
    except KeyError as err:
        raise ValueError(f"{path} has keys {err.args[0]}: {LAYOUT}") from None
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        # empty, truncated or not an .npz: EOFError / BadZipFile / TypeError before
        raise ValueError(f"{path} is not a readable .npz file ({err}): {LAYOUT}") from None
    if len(labels) == 0:
        raise ValueError(f"{path} holds no samples (labels of shape {labels.shape}): {LAYOUT}")
    if (frames.ndim != 5 or frames.shape[2:] != (2, 32, 32) or len(frames) != len(labels)
            or frames.shape[1] == 0):  # no time steps: [N, 0, ...] loaded silently
        raise ValueError(f"{path}: frames of shape {frames.shape}: {LAYOUT}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: labels must be integer class indices [N], got dtype "
                         f"{labels.dtype} and shape {labels.shape}: {LAYOUT}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"{path}: labels must lie in 0..{NUM_CLASSES - 1} (the "
                         f"{NUM_CLASSES} gestures), got values in [{labels.min()}, "
                         f"{labels.max()}]; is this a dvs_gesture_32 file?")
    frames = frames[:, ::frame_stride]
    if num_frames is not None:
        frames = frames[:, :num_frames]
    if classes is not None:
        missing = sorted(set(int(c) for c in classes) - set(labels.tolist()))
        if missing:  # an empty (or class-less) dataset, silently
            raise ValueError(f"classes {missing} have no samples in {path} (its labels: "
                             f"{sorted(set(labels.tolist()))})")
        keep = np.isin(labels, np.asarray(classes))
        frames, labels = frames[keep], labels[keep]
    out = frames.astype(np.float32)
    lo, hi = (out.min(), out.max()) if out.size else (0.0, 0.0)
    if not (lo >= 0 and np.isfinite(hi)):  # NaN fails too
        raise ValueError(f"{path}: frames must be non-negative finite event counts, got "
                         f"values in [{lo}, {hi}]: {LAYOUT}")
    return torch.from_numpy(out), torch.from_numpy(labels.astype(np.int64))


class DVSGestureFrames(Dataset):
    """``Dataset`` over :func:`load_dvs_gesture_32`.

    Items are ``(frames [T, 2, 32, 32], label)``.
    """

    def __init__(self, data_dir: str | Path, split: str = "train", **kwargs) -> None:
        self.frames, self.labels = load_dvs_gesture_32(data_dir, split, **kwargs)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.frames[index], self.labels[index]
