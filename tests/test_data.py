"""Data helpers name bad arguments instead of returning empty or truncated data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sbnn_addons.data import load_digits_split, load_dvs_gesture_32, rate_code

DVS = Path(__file__).resolve().parents[2] / "shared" / "data" / "dvs_gesture_32"


@pytest.mark.skipif(not (DVS / "validation.npz").is_file(), reason="no DVS frames here")
@pytest.mark.parametrize("kwargs, word", [
    (dict(num_frames=-1), "num_frames"), (dict(num_frames=0), "num_frames"),
    (dict(frame_stride=1.5), "frame_stride"), (dict(classes=()), "classes"),
    (dict(classes=(11,)), "classes"), (dict(classes=("3",)), "classes"),
])
def test_dvs_loader_names_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        load_dvs_gesture_32(DVS, "validation", **kwargs)


@pytest.mark.skipif(not (DVS / "validation.npz").is_file(), reason="no DVS frames here")
def test_dvs_loader_accepts_any_collection_of_classes():
    """A set works (np.asarray of a set matched nothing: an empty dataset)."""
    _, y = load_dvs_gesture_32(DVS, "validation", classes={1, 2})
    assert len(y) and set(y.tolist()) == {1, 2}


@pytest.mark.parametrize("labels, word", [
    ([0, 11, 3], r"labels must lie in 0\.\.10.*\[0, 11\]"),
    ([-1, 2, 3], r"labels must lie in 0\.\.10"),
    ([0.0, 2.5, 3.0], "labels must be integer class indices"),
])
def test_dvs_loader_refuses_labels_outside_the_gestures(tmp_path, labels, word):
    """Labels outside 0..10, or not integers (2.5 became 2), loaded silently."""
    import numpy as np

    frames = np.zeros((3, 2, 2, 32, 32), dtype=np.float16)
    np.savez(tmp_path / "test.npz", frames=frames, labels=np.asarray(labels))
    with pytest.raises(ValueError, match=word) as err:
        load_dvs_gesture_32(tmp_path, "test")
    assert "test.npz" in str(err.value)
    np.savez(tmp_path / "test.npz", frames=frames, labels=np.asarray([0, 10, 3]))
    assert load_dvs_gesture_32(tmp_path, "test")[1].tolist() == [0, 10, 3]


def test_digits_split_refuses_an_empty_split():
    with pytest.raises(ValueError, match="empty split"):
        load_digits_split(0.0001)


@pytest.mark.parametrize("x, steps, error", [
    (torch.tensor([[float("nan"), 0.5]]), 3, ValueError),
    (torch.tensor([[1.5, 0.5]]), 3, ValueError),
    (torch.tensor([[1, 0]]), 3, TypeError),
    (torch.rand(2, 3), 2.0, ValueError),
    (torch.rand(2, 3), 0, ValueError),
])
def test_rate_code_names_bad_input(x, steps, error):
    with pytest.raises(error):
        rate_code(x, steps)


def test_synthetic_shd_with_equal_event_counts():
    """Samples with equal event counts (np.array of them made a 2-D number array, and the
    writer failed or wrote a 2-D dataset) load as one sample each."""
    pytest.importorskip("h5py")
    pytest.importorskip("tonic")
    import tempfile

    from sbnn_addons.data.shd import load_shd, make_synthetic_shd

    with tempfile.TemporaryDirectory() as root:
        make_synthetic_shd(root, num_train=2, num_test=1, events_per_sample=1, seed=1)
        x, y = load_shd(root, "train", num_bins=5)
        assert x.shape == (5, 2, 700) and len(y) == 2
        with pytest.raises(ValueError, match="num_classes"):
            make_synthetic_shd(root, num_classes=0)


@pytest.mark.parametrize("kwargs, word", [
    (dict(bin_ms=float("nan")), "bin_ms"),  # every event dropped: all-zero frames
    (dict(bin_ms=float("inf")), "bin_ms"),  # every event in bin 0
    (dict(bin_ms=0), "bin_ms"), (dict(num_bins=2.5), "num_bins"),  # truncated to 2
    (dict(num_bins="10"), "num_bins"), (dict(max_samples=0), "max_samples"),
    (dict(max_samples=-1), "max_samples"), (dict(max_samples=2.7), "max_samples"),
])
def test_shd_loader_names_bad_arguments(tmp_path, kwargs, word):
    pytest.importorskip("h5py")
    pytest.importorskip("tonic")
    from sbnn_addons.data.shd import collate_time_major, load_shd, make_synthetic_shd

    make_synthetic_shd(tmp_path, num_train=2, num_test=2, events_per_sample=5)
    with pytest.raises(ValueError, match=f"{word} must be"):
        load_shd(tmp_path, "test", **kwargs)
    with pytest.raises(ValueError, match="batch is empty"):
        collate_time_major([])  # a torch.stack error


def _cifar_batches(root, data=None, labels=None, n=4):
    """CIFAR-10 python batches: dict of bytes keys, uint8 data [n, 3072], int labels."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        d = rng.integers(0, 256, (n, 3072), dtype=np.uint8) if data is None else data
        lab = [(j + i) % 10 for j in range(n)] if labels is None else labels
        with open(root / name, "wb") as fh:
            pickle.dump({b"data": d, b"labels": lab}, fh)


@pytest.mark.parametrize("max_samples", [0, -1, 2.5, True, "3"])
def test_cifar10_names_a_bad_max_samples(tmp_path, max_samples):
    """-1 silently dropped the last image, 0 returned an empty set, 2.5 a slice error."""
    from sbnn_addons.data import load_cifar10

    _cifar_batches(tmp_path)
    with pytest.raises(ValueError, match="max_samples must be an integer >= 1"):
        load_cifar10(tmp_path, "train", max_samples=max_samples)
    assert len(load_cifar10(tmp_path, "train", max_samples=5)[1]) == 5


@pytest.mark.parametrize("data, labels, match", [
    ("float", None, "uint8"),  # pixels in [0, 1] cast to uint8: an all-black image
    ("300", None, "uint8"),  # 300 wrapped round to 44
    (None, [0, 10, 3, -1], r"labels must lie in 0\.\.9"),
    (None, [0.0, 2.5, 3.0, 1.0], "integer class indices"),  # 2.5 became 2
    (None, [[0], [1], [2], [3]], "integer class indices"),  # labels [N, 1]
    ("empty", [], "no images"),
])
def test_cifar10_refuses_malformed_batches(tmp_path, data, labels, match):
    import numpy as np

    from sbnn_addons.data import load_cifar10

    data = {None: None, "float": np.random.default_rng(0).random((4, 3072)),
            "300": np.full((4, 3072), 300),
            "empty": np.zeros((0, 3072), np.uint8)}[data]
    _cifar_batches(tmp_path, data, labels)
    with pytest.raises(ValueError, match=match) as err:
        load_cifar10(tmp_path, "test", normalize=False)
    assert "test_batch" in str(err.value)
    # integer pixels in 0..255 of another integer dtype load exactly
    _cifar_batches(tmp_path, np.full((4, 3072), 255, dtype=np.int64))
    assert float(load_cifar10(tmp_path, "test", normalize=False)[0].min()) == 1.0


@pytest.mark.parametrize("content, match", [
    (b"", "not a readable .npz"),  # EOFError: No data left in file
    (b"PK\x03\x04 truncated zip", "not a readable .npz"),  # BadZipFile
    ("npy", "not a readable .npz"),  # a .npy under the .npz name: a TypeError
])
def test_dvs_loader_names_unreadable_files(tmp_path, content, match):
    import numpy as np

    if content == "npy":
        with open(tmp_path / "test.npz", "wb") as fh:
            np.save(fh, np.zeros(3))
    else:
        (tmp_path / "test.npz").write_bytes(content)
    with pytest.raises(ValueError, match=match) as err:
        load_dvs_gesture_32(tmp_path, "test")
    assert "test.npz" in str(err.value) and "dvs_gesture_32 layout" in str(err.value)


@pytest.mark.parametrize("bad, match", [
    ("nan", "non-negative finite event counts"), ("inf", "non-negative finite event counts"),
    ("negative", "non-negative finite event counts"), ("empty", "holds no samples"),
    ("no_steps", r"frames of shape \(3, 0, 2, 32, 32\)"),
])
def test_dvs_loader_refuses_bad_frames_and_empty_splits(tmp_path, bad, match):
    """NaN, inf or negative frames and empty splits loaded silently."""
    import numpy as np

    frames = np.zeros((3, 4, 2, 32, 32), dtype=np.float16)
    labels = np.array([0, 1, 2])
    if bad == "empty":
        frames, labels = frames[:0], labels[:0]
    elif bad == "no_steps":
        frames = frames[:, :0]
    else:
        frames[1, 2, 0, 5, 5] = {"nan": np.nan, "inf": np.inf, "negative": -0.25}[bad]
    np.savez(tmp_path / "test.npz", frames=frames, labels=labels)
    with pytest.raises(ValueError, match=match):
        load_dvs_gesture_32(tmp_path, "test")


def test_dvs_loader_names_requested_classes_without_samples(tmp_path):
    """classes=(5,) on a split without class 5 returned an empty dataset."""
    import numpy as np

    np.savez(tmp_path / "test.npz", frames=np.ones((3, 4, 2, 32, 32), np.float16),
             labels=np.array([0, 1, 1]))
    with pytest.raises(ValueError, match=r"classes \[5\] have no samples.*\[0, 1\]"):
        load_dvs_gesture_32(tmp_path, "test", classes=(1, 5))
    x, y = load_dvs_gesture_32(tmp_path, "test", classes=(1,))
    assert y.tolist() == [1, 1] and x.shape == (2, 4, 2, 32, 32)


def _write_shd(root, times, units, labels, extra=True):
    """One tonic-layout SHD test split with the given events and labels."""
    import h5py
    import numpy as np

    from sbnn_addons.data.shd import _ragged

    folder = root / "SHD"
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / "shd_test.h5", "w") as f:
        f.create_dataset("spikes/times", dtype=h5py.vlen_dtype(np.float32),
                         data=_ragged([np.asarray(t, np.float32) for t in times]))
        f.create_dataset("spikes/units", dtype=h5py.vlen_dtype(np.int32),
                         data=_ragged([np.asarray(u, np.int32) for u in units]))
        f.create_dataset("labels", data=np.asarray(labels))
        if extra:
            f.create_dataset("extra/speaker", data=np.zeros(len(labels), np.uint16))
            f.create_dataset("extra/keys", data=np.array([b"zero"]))
    (folder / "shd_test.h5.zip").touch()


@pytest.mark.parametrize("times, units, labels, extra, match", [
    ([[0.0, 0.01]], [[1, 5]], [25], True, r"labels must lie in 0\.\.19"),
    ([[0.0, 0.01]], [[1, 5]], [-1], True, r"labels must lie in 0\.\.19"),
    ([[0.0, 0.01]], [[1, 5]], [2.7], True, "integer class indices"),  # became 2
    ([[0.0], [0.1]], [[1], [2]], [1], True, "samples"),  # 2 event lists, 1 label
    ([], [], [], True, "no samples"),  # "the batch is empty" of collate_time_major
    ([[0.0, 0.01]], [[1, 5]], [1], False, "extra/keys"),  # a KeyError inside tonic
    ([[0.0, 0.01]], [[700, 5]], [1], True, r"units .* 0\.\.699"),  # event dropped
    ([[-0.01, 0.01]], [[1, 5]], [1], True, "negative"),  # event dropped
])
def test_shd_loader_refuses_malformed_files(tmp_path, times, units, labels, extra, match):
    pytest.importorskip("h5py")
    pytest.importorskip("tonic")
    from sbnn_addons.data.shd import load_shd

    _write_shd(tmp_path, times, units, labels, extra)
    with pytest.raises(ValueError, match=match) as err:
        load_shd(tmp_path, "test", num_bins=10)
    assert "shd_test.h5" in str(err.value)
    _write_shd(tmp_path, [[0.0, 0.013, 0.014]], [[0, 699, 3]], [19])
    x, y = load_shd(tmp_path, "test", num_bins=10)
    assert y.tolist() == [19] and float(x.sum()) == 3 and float(x[1, 0, 3]) == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=float("inf")), "alpha must be a finite number > 0"),  # all spikes at t = 0
    (dict(alpha="2"), "alpha must be a finite number > 0"),  # a TypeError of '>'
    (dict(seed=1.2), "seed must be an integer"),  # the dataset of seed 1, silently
    (dict(seed=None), "seed must be an integer"),
])
def test_randman_names_bad_alpha_and_seed(kwargs, match):
    from sbnn_addons.data import make_randman

    with pytest.raises(ValueError, match=match):
        make_randman(2, 3, 5, 4, **kwargs)


@pytest.mark.parametrize("seed", [1.5, None, "0"])
def test_digits_split_names_a_bad_seed(seed):
    """A RuntimeError of manual_seed before."""
    with pytest.raises(ValueError, match="seed must be an integer"):
        load_digits_split(0.25, seed=seed)
