"""sbnn-bench harness: CLI outputs, every task on tiny offline fixtures, errors, DDP."""

from __future__ import annotations

import csv
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sbnn_addons.bench import cli
from sbnn_addons.bench.harness import METHODS, TASKS, apply_preset, run_grid
from sbnn_addons.bench.nets import GaussianSurrogate
from sbnn_addons.data import load_cifar10, make_randman, make_synthetic_shd

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--num-steps", "4", "--width", "16", "--mc-samples", "2",
        "--quiet", "--threads", "1"]


def _read_csv(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _fake_cifar(root: Path, n: int = 12, seed: int = 0) -> Path:
    """CIFAR-10 python batches in the real format (dict of bytes keys, uint8 [n, 3072])."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n).tolist(),
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"filenames": [f"img{i}.png".encode() for i in range(n)]}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)
    return folder


def test_default_cli_tiny(tmp_path, capsys):
    rows = cli.run([*TINY, "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| task | method |" in out and "| digits | sbnn-agr |" in out
    for name in ("results.csv", "results.json", "curves.png", "accuracy_ece.png",
                 "reliability.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    table = _read_csv(tmp_path / "results.csv")
    assert [r["method"] for r in table] == cli.DEFAULT_METHODS
    assert list(table[0]) == cli.COLUMNS
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["world_size"] == 1
    assert len(data["runs"]) == 3 and len(rows) == 3
    for run in data["runs"]:
        assert len(run["curve"]) == 1 and 0.0 <= run["accuracy"] <= 1.0
        assert set(run["curve"][0]) == {"epoch", "train_loss", "test_accuracy"}


def test_list(capsys):
    assert cli.run(["--list"]) == []
    out = capsys.readouterr().out
    for name in [*TASKS, *METHODS]:
        assert name in out


def test_randman_deterministic_shapes():
    kw = dict(num_classes=3, num_units=7, num_steps=11, samples_per_class=5, manifold_dim=2,
              alpha=2.0)
    x1, y1 = make_randman(**kw, seed=3)
    x2, y2 = make_randman(**kw, seed=3)
    x3, _ = make_randman(**kw, seed=4)
    assert x1.shape == (15, 11, 7) and y1.shape == (15,)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert sorted(y1.tolist()) == [0] * 5 + [1] * 5 + [2] * 5
    assert torch.all(x1.sum(1) == 1)  # one spike per channel and sample
    with pytest.raises(ValueError, match="num_units"):
        make_randman(num_units=0)


def _grid(task, methods, tmp_path, **cfg):
    base = {"epochs": 1, "num_steps": 4, "width": 8, "mc_samples": 2, "batch_size": 16}
    return run_grid([task], methods, [0], {**base, **cfg})


def test_randman_task(tmp_path):
    rows = _grid("randman", ["snntorch-gaussian", "sbnn-agr-kl", "sj-lif-sigmoid",
                             "sbnn-sj-st"], tmp_path,
                 randman_classes=3, randman_units=10, randman_samples=10)
    assert [r["method"] for r in rows] == ["snntorch-gaussian", "sbnn-agr-kl",
                                           "sj-lif-sigmoid", "sbnn-sj-st"]
    for r in rows:
        assert r["_probs"].shape == (6, 3) and np.isfinite(r["nll"])


def test_shd_task(tmp_path):
    make_synthetic_shd(tmp_path, num_train=16, num_test=8)
    rows = _grid("shd", ["snntorch-atan", "snntorch-atan-bn", "sbnn-agr"], tmp_path,
                 data_dir=str(tmp_path))
    assert all(r["_probs"].shape == (8, 20) for r in rows)
    # pointing at the SHD/ folder itself works too; feed-forward variant
    rows = _grid("shd", ["sj-lif-atan"], tmp_path, data_dir=str(tmp_path / "SHD"),
                 recurrent=False)
    assert rows[0]["_probs"].shape == (8, 20)


def test_cifar10_task(tmp_path):
    _fake_cifar(tmp_path)
    x, y = load_cifar10(tmp_path, "train")
    assert x.shape == (60, 3, 32, 32) and y.shape == (60,) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 1.0  # normalised
    x2, _ = load_cifar10(tmp_path / "cifar-10-batches-py", "test", normalize=False)
    assert x2.shape == (12, 3, 32, 32) and 0.0 <= float(x2.min()) <= float(x2.max()) <= 1.0
    rows = _grid("cifar10", ["snntorch-atan-bn", "sbnn-st"], tmp_path, data_dir=str(tmp_path),
                 num_steps=1)
    assert all(r["_probs"].shape == (12, 10) and r["num_steps"] == 1 for r in rows)


def test_missing_and_malformed_data_dir(tmp_path):
    for task, words in (("shd", "shd_train.h5"), ("cifar10", "data_batch_1"),
                        ("dvs-gesture", "train.npz")):
        with pytest.raises(ValueError, match="--data-dir") as info:
            _grid(task, ["snntorch-atan"], tmp_path)
        assert words in str(info.value)
        with pytest.raises((FileNotFoundError, ValueError)) as info:
            _grid(task, ["snntorch-atan"], tmp_path, data_dir=str(tmp_path))
        assert words in str(info.value)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_1"):
        load_cifar10(bad, "test")


def test_unknown_task_or_method(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        run_grid(["mnist"], ["sbnn-st"], [0], {})
    with pytest.raises(ValueError, match="unknown method"):
        run_grid(["digits"], ["sbnn-magic"], [0], {})
    with pytest.raises(SystemExit):
        cli.run(["--task", "mnist", "--out-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="BatchNorm"):
        _grid("digits", ["snntorch-atan-bn"], tmp_path)


def test_presets_only_set_defaults():
    cfg = apply_preset("dvs-gesture", "cpu", {"epochs": 2, "width": None})
    assert cfg["epochs"] == 2 and cfg["width"] == 16 and cfg["num_steps"] == 16
    cfg = apply_preset("dvs-gesture", "paper", {"num_steps": None})
    assert cfg["num_steps"] == 49 and cfg["frame_stride"] == 1 and cfg["lr"] == 5e-3
    assert apply_preset("shd", "paper", {})["epochs"] == 30
    with pytest.raises(ValueError, match="dvs-gesture"):
        apply_preset("digits", "cpu", {})


def test_gaussian_surrogate_picklable():
    sg = GaussianSurrogate(0.4)
    u = torch.tensor([-0.4, 0.0, 0.4], requires_grad=True)
    sg(u).sum().backward()
    expected = torch.exp(-0.5 * (u.detach() / 0.4) ** 2) / (0.4 * (2 * torch.pi) ** 0.5)
    torch.testing.assert_close(u.grad, expected)
    assert pickle.loads(pickle.dumps(sg)).width == 0.4


def test_torchrun_two_processes(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--standalone", "-m", "sbnn_addons.bench", *TINY, "--no-plots",
           "--methods", "snntorch-atan", "sbnn-agr-kl", "--out-dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = _read_csv(tmp_path / "results.csv")
    assert [r["method"] for r in table] == ["snntorch-atan", "sbnn-agr-kl"]
    assert list(table[0]) == cli.COLUMNS
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["world_size"] == 2
    for run in data["runs"]:
        assert run["world_size"] == 2 and len(run["curve"]) == 1
        assert 0.0 <= run["accuracy"] <= 1.0
    assert proc.stdout.count("| digits | sbnn-agr-kl |") == 1  # rank 0 prints only


def test_ep_method_in_bench(tmp_path, capsys):
    """The ``ep`` method runs through the harness (3 passes) next to a baseline, on the same
    rate code, and writes the same outputs; it refuses tasks other than digits / randman."""
    rows = cli.run(["--methods", "ep", "--epochs", "1", "--num-steps", "4", "--quiet",
                    "--no-plots", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| digits | ep | 1 | 3 |" in out
    (row,) = rows
    assert row["method"] == "ep" and row["epochs"] == 3 and row["accuracy"] > 0.8
    assert {r["method"] for r in _read_csv(tmp_path / "results.csv")} == {"ep"}
    with pytest.raises(ValueError, match=r"\['digits', 'randman'\] only"):
        cli.run(["--task", "shd", "--methods", "ep", "--quiet", "--no-plots",
                 "--out-dir", str(tmp_path / "x")])


def test_ep_binary_method_in_bench(tmp_path, capsys):
    """``ep-binary`` trains binary +-1 weights through the harness on digits."""
    (row,) = cli.run(["--methods", "ep-binary", "--epochs", "1", "--num-steps", "4",
                      "--quiet", "--no-plots", "--out-dir", str(tmp_path)])
    assert "| digits | ep-binary | 1 | 3 |" in capsys.readouterr().out
    assert row["method"] == "ep-binary" and row["accuracy"] > 0.8


def test_cli_diagnostics_subcommand(tmp_path, capsys):
    from sbnn_addons.bench.cli import main

    with pytest.raises(SystemExit) as done:
        main(["diagnostics", "--out-dir", str(tmp_path), "--neuron", "binary", "--scales",
              "1", "4", "--depths", "1", "2", "--networks", "1", "--batch", "2",
              "--no-surrogates"])
    assert done.value.code == 0
    with open(tmp_path / "diagnostics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["sweep"] for r in rows} == {"noise", "depth"}
    assert {r["estimator"] for r in rows} >= {"ST", "AGR(0)"}
    assert (tmp_path / "binary_bias_variance_vs_z.png").read_bytes()[:4] == b"\x89PNG"
    assert "AGR(0)" in capsys.readouterr().out


def test_cli_diagnostics_help_names_subcommand(capsys):
    from sbnn_addons.bench.cli import main

    with pytest.raises(SystemExit):
        main(["diagnostics", "--help"])
    assert "sbnn-bench diagnostics" in capsys.readouterr().out
