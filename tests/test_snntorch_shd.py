"""SHD loader (tonic format) on synthetic files written in tmp_path."""

from __future__ import annotations

import socket

import pytest
import torch

from sbnn_addons.data.shd import SHDBinned, load_shd, make_synthetic_shd


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def blocked(*args, **kwargs):
        raise RuntimeError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", blocked)


def test_synthetic_shd_loads_through_tonic(tmp_path):
    make_synthetic_shd(tmp_path, num_train=12, num_test=6, seed=0)
    x, y = load_shd(tmp_path, "train")
    assert x.shape == (100, 12, 700) and y.shape == (12,)
    assert x.dtype == torch.float32 and x.sum() > 0 and (x >= 0).all()
    assert y.dtype == torch.int64 and int(y.max()) < 20
    x2, _ = load_shd(tmp_path, "test", num_bins=20, bin_ms=50.0, max_samples=4)
    assert x2.shape == (20, 4, 700)
    # counts: every event of a sample inside the window lands in exactly one bin
    ds = SHDBinned(tmp_path, "test", num_bins=1100, bin_ms=1.0)
    events, _ = ds.dataset[0]
    assert float(ds[0][0].sum()) == len(events)


def test_missing_and_malformed_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="SHD/shd_train.h5"):
        load_shd(tmp_path)
    make_synthetic_shd(tmp_path, num_train=2, num_test=2)
    (tmp_path / "SHD" / "shd_train.h5.zip").unlink()
    with pytest.raises(FileNotFoundError, match="placeholder"):
        load_shd(tmp_path)
    (tmp_path / "SHD" / "shd_train.h5.zip").touch()
    (tmp_path / "SHD" / "shd_train.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="HDF5"):
        load_shd(tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_shd(tmp_path, "valid")
