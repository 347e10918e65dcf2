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
    for name in ("results.csv", "results.json", "predictions.csv", "curves.png",
                 "accuracy_ece.png", "reliability.png", "report.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    table = _read_csv(tmp_path / "results.csv")
    assert [r["method"] for r in table] == cli.DEFAULT_METHODS
    assert list(table[0]) == cli.COLUMNS
    # the printed table's headers are CSV column names
    header = [h.strip().removesuffix(" (%)") for h in out.splitlines()[0].strip("|").split("|")]
    assert set(header) - {"seeds"} <= set(cli.COLUMNS)
    # the same accuracy modes for every method: mean for all, sample / mc for SBNN only
    for r in table:
        assert r["accuracy_mean"] != ""
        assert (r["accuracy_mc"] != "") == r["method"].startswith("sbnn")
        assert (r["accuracy_sample"] != "") == r["method"].startswith("sbnn")
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["world_size"] == 1
    assert data["meta"]["command"].startswith("sbnn-bench --epochs 1")
    assert len(data["runs"]) == 3 and len(rows) == 3
    for run in data["runs"]:
        assert len(run["curve"]) == 1 and 0.0 <= run["accuracy_mean"] <= 1.0
        assert set(run["curve"][0]) == {"epoch", "train_loss", "train_objective",
                                        "test_accuracy"}
        assert len(run["epoch_train_s"]) == 1 and run["eval_s"] > 0
    assert len({tuple(r["data_order"]) for r in data["runs"]}) == 1  # same batches


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
        assert r["_probs"]["mean"].shape == (6, 3) and np.isfinite(r["nll_mean"])


def test_shd_task(tmp_path):
    make_synthetic_shd(tmp_path, num_train=16, num_test=8)
    rows = _grid("shd", ["snntorch-atan", "snntorch-atan-bn", "sbnn-agr"], tmp_path,
                 data_dir=str(tmp_path))
    assert all(r["_probs"]["mean"].shape == (8, 20) for r in rows)
    # pointing at the SHD/ folder itself works too; feed-forward variant
    rows = _grid("shd", ["sj-lif-atan"], tmp_path, data_dir=str(tmp_path / "SHD"),
                 recurrent=False)
    assert rows[0]["_probs"]["mean"].shape == (8, 20)


def test_cifar10_task(tmp_path):
    _fake_cifar(tmp_path)
    x, y = load_cifar10(tmp_path, "train")
    assert x.shape == (60, 3, 32, 32) and y.shape == (60,) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 1.0  # normalised
    x2, _ = load_cifar10(tmp_path / "cifar-10-batches-py", "test", normalize=False)
    assert x2.shape == (12, 3, 32, 32) and 0.0 <= float(x2.min()) <= float(x2.max()) <= 1.0
    rows = _grid("cifar10", ["snntorch-atan-bn", "sbnn-st"], tmp_path, data_dir=str(tmp_path),
                 num_steps=1)
    assert all(r["_probs"]["mean"].shape == (12, 10) and r["num_steps"] == 1 for r in rows)


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
    for task in ("digits", "randman"):  # no reference network, no released recipe
        with pytest.raises(ValueError, match="'paper' is not defined.*cifar10"):
            apply_preset(task, "paper", {})
    with pytest.raises(SystemExit, match="--preset paper is not defined for task 'digits'"):
        cli.run(["--preset", "paper", "--epochs", "1"])


def test_paper_preset_trains_the_released_surrogate_baseline_of_each_task(monkeypatch):
    """SPEC 8.1: the released surrogate baseline has per-step BatchNorm on CIFAR-10 and SHD,
    none on DVS Gesture; the paper preset's default methods follow it per task."""
    from sbnn_addons.bench import harness

    seen = {}
    monkeypatch.setattr(harness, "run_task",
                        lambda task, methods, *a, **k: seen.setdefault(task, methods))
    harness.run_tasks(["shd", "dvs-gesture", "cifar10"], None, [0], {}, preset="paper")
    assert seen == {"shd": ["snntorch-gaussian-bn", "sbnn-st", "sbnn-agr"],
                    "dvs-gesture": ["snntorch-gaussian", "sbnn-st", "sbnn-agr"],
                    "cifar10": ["snntorch-gaussian-bn", "sbnn-st", "sbnn-agr"]}
    seen.clear()  # explicit methods win, for every task
    harness.run_tasks(["shd", "dvs-gesture"], ["sbnn-st"], [0], {}, preset="paper")
    assert seen == {"shd": ["sbnn-st"], "dvs-gesture": ["sbnn-st"]}
    with pytest.raises(ValueError, match="give a preset or the methods"):
        harness.run_tasks(["shd"], None, [0], {})
    assert "snntorch-gaussian-bn on cifar10, shd" in cli.list_choices()
    with pytest.raises(ValueError, match="unknown preset 'papr'"):
        harness.preset_methods("shd", "papr")
    with pytest.raises(ValueError, match="unknown task 'sdh'"):
        harness.preset_methods("sdh", "paper")


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
        assert 0.0 <= run["accuracy_mean"] <= 1.0
    assert proc.stdout.count("| digits | sbnn-agr-kl |") == 1  # rank 0 prints only


def test_ep_method_in_bench(tmp_path, capsys):
    """The ``ep`` method runs through the harness (3 passes) next to a baseline, on the same
    rate code, and writes the same outputs; it refuses tasks other than digits / randman."""
    rows = cli.run(["--methods", "ep", "--epochs", "1", "--num-steps", "4", "--quiet",
                    "--no-plots", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| digits | ep | 1 | 3 |" in out
    (row,) = rows
    assert row["method"] == "ep" and row["epochs"] == 3 and row["accuracy_mean"] > 0.8
    assert row["accuracy_sample"] is not None and row["accuracy_mc"] > 0.8
    assert {r["method"] for r in _read_csv(tmp_path / "results.csv")} == {"ep"}
    with pytest.raises(ValueError, match=r"\['digits', 'randman'\] only"):
        cli.run(["--task", "shd", "--methods", "ep", "--quiet", "--no-plots",
                 "--out-dir", str(tmp_path / "x")])


def test_ep_binary_method_in_bench(tmp_path, capsys):
    """``ep-binary`` trains binary +-1 weights through the harness on digits."""
    (row,) = cli.run(["--methods", "ep-binary", "--epochs", "1", "--num-steps", "4",
                      "--quiet", "--no-plots", "--out-dir", str(tmp_path)])
    assert "| digits | ep-binary | 1 | 3 |" in capsys.readouterr().out
    assert row["method"] == "ep-binary" and row["accuracy_mean"] > 0.8


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


# --------------------------------------------------------------------------- compare()
def _spike_data(n: int, seed: int, steps: int = 6, classes: int = 3, per: int = 4):
    """Time-major spike trains ``[T, n, classes * per]``: class c fires its own channels."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    rate = torch.full((n, classes * per), 0.05)
    for c in range(classes):
        rate[y == c, c * per:(c + 1) * per] = 0.8
    x = (torch.rand(steps, n, classes * per, generator=gen) < rate).float()
    return x, y


def _snntorch_net():
    import snntorch as snn
    from torch import nn

    return nn.Sequential(nn.Linear(12, 16), snn.Leaky(beta=0.9, init_hidden=True),
                         nn.Linear(16, 3))


def _sj_net():
    from spikingjelly.activation_based import layer, neuron
    from torch import nn

    return nn.Sequential(layer.Linear(12, 16, step_mode="m"),
                         neuron.LIFNode(tau=2.0, step_mode="m"),
                         layer.Linear(16, 3, step_mode="m"))


def test_compare_refuses_a_model_that_is_an_sbnn_already():
    """A framework-free SBNN (IWSTSpike inside) from a factory without `method=`, or as an
    instance: the methods could not change it (every row would be the same model, the
    "original" row scored noisily): named error."""
    from torch import nn

    import sbnn_addons as sb
    from sbnn_addons.bench import compare

    class Core(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.lif = sb.BayesLinear(12, 16), sb.LIF()
            self.fc2 = nn.Linear(16, 3)

        def forward(self, x):
            return self.fc2(self.lif.run(self.fc1(x)))

    for model in (Core, Core()):
        with pytest.raises(ValueError, match="already contains sbnn_addons spike functions"):
            compare(model, _spike_data(12, 0), _spike_data(6, 1), layout="TB",
                    methods=["original", "sbnn-st"], epochs=1, batch_size=6)


def test_compare_snntorch_model(tmp_path):
    """A real snnTorch model (nn.Sequential, init_hidden) on time-major tensors."""
    from sbnn_addons.bench import COLUMNS, compare

    res = compare(_snntorch_net, _spike_data(48, 0), _spike_data(24, 1), layout="TB",
                  methods=["original", "sbnn-st"], epochs=2, batch_size=16, mc_samples=2,
                  lr=2e-2)
    assert [r["method"] for r in res.rows] == ["original", "sbnn-st"]
    orig, sbnn = res.rows
    assert orig["host"] == sbnn["host"] == "snntorch"
    assert orig["num_steps"] == 6 and orig["test_samples"] == 24
    assert orig["accuracy_mc"] is None and orig["accuracy_sample"] is None
    assert sbnn["accuracy_mc"] is not None and sbnn["accuracy_sample"] is not None
    assert orig["data_order"] == sbnn["data_order"]  # identical batches
    assert len(orig["epoch_train_s"]) == 2 and len(orig["curve"]) == 2
    assert orig["accuracy_mean"] > 0.6, orig["accuracy_mean"]  # separable: it learns
    pred = res.predictions("sbnn-st", mode="mc")
    assert pred["probs"].shape == (24, 3) and pred["pred"].shape == (24,)
    head = res.table().splitlines()[0]
    for col in ("accuracy_mean (%)", "accuracy_sample (%)", "accuracy_mc (%)",
                "train_s_per_epoch", "eval_s"):
        assert col in head
    assert all(c.removesuffix(" (%)") in COLUMNS + ["seeds"]
               for c in (h.strip() for h in head.strip("|").split("|")))


def test_compare_spikingjelly_model_loader():
    """A SpikingJelly multi-step model fed by a shuffling DataLoader of batch-major samples:
    every method sees the same batch order, two seeds give mean +- std."""
    from torch.utils.data import DataLoader, TensorDataset

    from sbnn_addons.bench import compare

    x, y = _spike_data(48, 0)
    xte, yte = _spike_data(24, 1)
    train = DataLoader(TensorDataset(x.transpose(0, 1), y), batch_size=16, shuffle=True)
    test = DataLoader(TensorDataset(xte.transpose(0, 1), yte), batch_size=24)
    res = compare(_sj_net, train, test, layout="BT", methods=["original", "sbnn-agr"],
                  epochs=1, seeds=[0, 1], mc_samples=2)
    assert {r["host"] for r in res.rows} == {"spikingjelly"}
    by_seed = {}
    for r in res.rows:
        by_seed.setdefault(r["seed"], set()).add(tuple(r["data_order"]))
    assert all(len(v) == 1 for v in by_seed.values())  # same order within a seed
    assert by_seed[0] != by_seed[1]  # seeds shuffle differently
    assert " ± " in res.table()
    assert any("seed" in n for n in res.notes()) or len(res.notes()) > 0


def test_stratified_subset():
    from sbnn_addons.bench import stratified_subset

    labels = torch.arange(11).repeat_interleave(torch.tensor([30] * 10 + [10]))  # sorted
    idx = stratified_subset(labels, 64, seed=0)
    assert len(idx) == 64 and len(set(idx.tolist())) == 64
    counts = torch.bincount(labels[idx], minlength=11)
    assert counts.min() >= 1 and counts[:10].min() >= 5  # every class, in proportion
    assert torch.equal(idx, stratified_subset(labels, 64, seed=0))  # seeded
    assert not torch.equal(idx, stratified_subset(labels, 64, seed=1))
    assert not torch.equal(labels[idx], labels[idx].sort().values)  # not label-sorted
    assert len(stratified_subset(labels, 1000)) == len(labels)


def test_subset_missing_classes_raises(tmp_path):
    """A subset (or training set) with fewer classes than the task stops the run."""
    from sbnn_addons.bench import check_subset_classes, compare

    labels = torch.tensor([0] * 40 + [1] * 40 + [2] * 40)
    with pytest.raises(ValueError, match="1 of 3 classes"):
        check_subset_classes(labels, labels[:40], "first 40")  # the old first-N cut
    x, y = _spike_data(48, 0)
    with pytest.raises(ValueError, match="classes"):
        compare(_snntorch_net, (x, y), (x, y), max_train_samples=2, epochs=1)
    one = (x[:, y == 0], y[y == 0])
    with pytest.raises(ValueError, match="class"):
        compare(_snntorch_net, one, (x, y), epochs=1)
    with pytest.raises(ValueError, match="classes"):
        cli.run([*TINY, "--no-plots", "--max-samples", "5", "--out-dir", str(tmp_path)])


@pytest.mark.parametrize("kwargs, word", [
    (dict(seeds=[0, 0]), "distinct"), (dict(batch_size=0), "batch_size"),
    (dict(eval_batch_size=0), "eval_batch_size"), (dict(batch_size=2.5), "batch_size"),
    (dict(lr=0.0), r"lr must be a finite number > 0 \(the Adam learning rate of the weights"),
    (dict(lr=-1e-3), r"lr must be a finite number > 0 .* default is 0.005"),
    (dict(noise_lr=0), r"noise_lr must be a finite number > 0 \(.*noise scales"),
    (dict(seeds=[0.5, 1.5]), "every seed must be an integer"),  # truncated to 0, 1
    (dict(seeds=["0"]), "every seed must be an integer"),
    (dict(seeds=[None]), "every seed must be an integer"),
    (dict(seeds=3), r"seeds must be a sequence of integers \(e.g. seeds=\(0, 1, 2\)\)"),
    (dict(max_train_samples=0), "max_train_samples must be an integer >= 1 or None"),
    (dict(max_test_samples=2.5), "max_test_samples must be an integer >= 1 or None"),
])
def test_compare_names_bad_seeds_and_batch_sizes(kwargs, word):
    """Repeated seeds would report a spread of zero; zero batch sizes crashed deep inside;
    a learning rate <= 0 is named with what is allowed, before any data or model work."""
    from sbnn_addons.bench import compare

    x, y = _spike_data(48, 0)
    with pytest.raises((ValueError, TypeError), match=word):
        compare(_snntorch_net, (x, y), (x, y), epochs=1, **kwargs)


def test_report_written(tmp_path):
    from sbnn_addons.bench import compare

    res = compare(_snntorch_net, _spike_data(30, 0), _spike_data(15, 1),
                  methods=["original", "sbnn-st"], epochs=2, mc_samples=2,
                  command="python my_script.py")
    paths = res.save(tmp_path)
    names = {p.name for p in paths}
    assert {"results.csv", "results.json", "predictions.csv", "curves.png",
            "accuracy_ece.png", "reliability.png", "report.md"} <= names
    report = (tmp_path / "report.md").read_text()
    assert "python my_script.py" in report and "accuracy_mean (%)" in report
    for fig in ("curves.png", "accuracy_ece.png", "reliability.png"):
        assert f"]({fig})" in report
        assert (tmp_path / fig).read_bytes()[:4] == b"\x89PNG"
    assert "warm-up" in report and "interleaved" in report
    preds = _read_csv(tmp_path / "predictions.csv")
    assert len(preds) == 2 * 15 and preds[0]["conf_mc"] == ""  # original: no mc


def test_interleaved_schedule_rotates():
    from sbnn_addons.bench.compare import _schedule

    order = [(r, e) for r, e in _schedule(["a", "b", "c"], 3, True)]
    assert [r for r, _ in order] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [e for _, e in order] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [r for r, _ in _schedule(["a", "b"], 2, False)] == ["a", "a", "b", "b"]


USER_MODULE = '''
import torch
import snntorch as snn
from torch import nn


def net():
    return nn.Sequential(nn.Linear(12, 16), snn.Leaky(beta=0.9, init_hidden=True),
                         nn.Linear(16, 3))


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    rate = torch.full((n, 12), 0.05)
    for c in range(3):
        rate[y == c, 4 * c:4 * c + 4] = 0.8
    return (torch.rand(n, 6, 12, generator=g) < rate[:, None]).float(), y


def loaders():
    return {"train": _data(36, 0), "test": _data(18, 1), "layout": "BT", "name": "toy"}
'''


def test_cli_user_model_and_data(tmp_path, monkeypatch, capsys):
    """--model / --data on a module written to tmp_path (module path and file path)."""
    (tmp_path / "toy_bench_mod.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    rows = cli.run(["--model", "toy_bench_mod:net", "--data", "toy_bench_mod:loaders",
                    "--epochs", "1", "--mc-samples", "2", "--quiet", "--no-plots",
                    "--out-dir", str(out)])
    assert [r["method"] for r in rows] == cli.DEFAULT_MODEL_METHODS
    assert {r["task"] for r in rows} == {"toy"} and rows[0]["num_steps"] == 6
    assert "| toy | original |" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "--model toy_bench_mod:net" in report
    rows = cli.run(["--model", f"{tmp_path / 'toy_bench_mod.py'}:net", "--data",
                    f"{tmp_path / 'toy_bench_mod.py'}:loaders", "--methods", "original",
                    "sbnn-agr", "--epochs", "1", "--max-samples", "12", "--mc-samples", "2",
                    "--quiet", "--no-plots", "--out-dir", str(out)])
    assert [r["train_samples"] for r in rows] == [12, 12]
    with pytest.raises(ValueError, match="unknown method"):
        cli.run(["--model", "toy_bench_mod:net", "--data", "toy_bench_mod:loaders",
                 "--methods", "snntorch-atan", "--quiet", "--out-dir", str(out)])



@pytest.mark.parametrize("flag", [["--num-steps", "3"], ["--width", "8"],
                                  ["--preset", "cpu"], ["--frame-stride", "2"],
                                  ["--feedforward"], ["--randman-classes", "4"]])
def test_cli_user_model_refuses_the_built_in_tasks_options(tmp_path, monkeypatch, flag):
    """--num-steps, --width, --preset ... shape the built-in tasks only: with --model they
    were ignored without a word (the report said nothing; T stayed the data's)."""
    (tmp_path / "toy_bench_opts.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit, match=f"{flag[0]}.*built-in tasks"):
        cli.run(["--model", "toy_bench_opts:net", "--data", "toy_bench_opts:loaders",
                 *flag, "--quiet", "--no-plots", "--out-dir", str(tmp_path / "out")])



def test_cli_batch_size_with_a_data_loader_is_refused(tmp_path, monkeypatch):
    """A DataLoader keeps its own batch size: --batch-size was ignored without a word."""
    (tmp_path / "toy_bench_loader.py").write_text(USER_MODULE + """

def dl():
    from torch.utils.data import DataLoader, TensorDataset
    return {"train": DataLoader(TensorDataset(*_data(36, 0)), batch_size=12),
            "test": _data(18, 1), "layout": "BT"}
""")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit, match="--batch-size.*DataLoader"):
        cli.run(["--model", "toy_bench_loader:net", "--data", "toy_bench_loader:dl",
                 "--batch-size", "4", "--quiet", "--no-plots", "--out-dir", str(tmp_path)])


# --------------------------------------------------------------------------- own-model edge cases
class _LoopHiddenNet(torch.nn.Module):
    """init_hidden neurons, but the forward loops over time itself (takes [T, B, F])."""

    def __init__(self):
        import snntorch as snn

        super().__init__()
        self.fc1, self.lif1 = torch.nn.Linear(12, 16), snn.Leaky(beta=0.9, init_hidden=True)
        self.fc2 = torch.nn.Linear(16, 3)

    def forward(self, x):
        assert x.dim() == 3, "the whole sequence"
        return torch.stack([self.fc2(self.lif1(self.fc1(x_t))) for x_t in x])


def test_compare_asks_how_a_custom_init_hidden_model_is_called():
    """A model of its own with init_hidden neurons may loop over time itself: compare asks
    (it called such a model one step at a time, its loop running over the batch)."""
    from sbnn_addons.bench import compare

    data, test = _spike_data(24, 0), _spike_data(12, 1)
    with pytest.raises(ValueError, match="step=True.*step=False"):
        compare(_LoopHiddenNet, data, test, methods=["original"], epochs=1)
    res = compare(_LoopHiddenNet, data, test, methods=["original"], epochs=1, step=False)
    assert res.rows[0]["test_samples"] == 12
    # where the model tells, a contradicting step= is named (it trained silently wrong)
    with pytest.raises(ValueError, match="step=True contradicts.*whole sequence"):
        compare(_sj_net, data, test, methods=["original"], epochs=1, step=True)
    with pytest.raises(ValueError, match="step=False contradicts.*one time step"):
        compare(_snntorch_net, data, test, methods=["original"], epochs=1, step=False)
    with pytest.raises(TypeError, match="step must be True, False or None"):
        compare(_snntorch_net, data, test, methods=["original"], epochs=1, step="yes")


def test_compare_names_data_mistakes():
    """Loader layouts, labels and shuffling test loaders are named, not trained on."""
    from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

    from sbnn_addons.bench import compare

    x, y = _spike_data(24, 0)
    xte, yte = _spike_data(12, 1)
    kw = dict(methods=["original"], epochs=1)
    batch_major = TensorDataset(x.transpose(0, 1), y)
    test = DataLoader(TensorDataset(xte.transpose(0, 1), yte), batch_size=12)
    with pytest.raises(ValueError, match="batch-major.*layout='BT'"):
        compare(_sj_net, DataLoader(batch_major, batch_size=6), test, **kw)
    with pytest.raises(ValueError, match="shuffles.*shuffle=False"):
        compare(_sj_net, DataLoader(batch_major, batch_size=6),
                DataLoader(TensorDataset(xte.transpose(0, 1), yte), shuffle=True), layout="BT",
                **kw)
    with pytest.raises(ValueError, match="fractional"):
        compare(_sj_net, (x, y.float() + 0.4), (xte, yte), **kw)
    with pytest.raises(ValueError, match="one-hot"):
        compare(_sj_net, (x, torch.nn.functional.one_hot(y)), (xte, yte), **kw)
    with pytest.raises(ValueError, match="counted from 1"):
        compare(_sj_net, (x, y + 1), (xte, yte + 1), num_classes=3, **kw)
    res = compare(_sj_net, (x, y.float()), (xte, yte), **kw)  # integral floats are labels
    assert res.rows[0]["train_samples"] == 24
    half = DataLoader(batch_major, batch_size=6, sampler=SubsetRandomSampler(range(12)))
    res = compare(_sj_net, half, test, layout="BT", **kw)
    assert res.rows[0]["train_samples"] == 12  # what the sampler draws (KL / N uses it)


@pytest.mark.parametrize("case, match", [
    ("labels", r"3 outputs \(logits \[B, 3\]\) but the data needs 5 \(labels up to 4\)"),
    ("num_classes", r"3 outputs .* needs 4 \(num_classes=4\)"),
    ("loader", r"3 outputs .* needs 5 \(labels up to 4\)"),
], ids=["labels", "num_classes", "loader"])
def test_compare_names_too_few_outputs_for_the_classes(case, match):
    """Labels >= the model's outputs (or num_classes above them) raise before training and
    name both numbers (it was a raw IndexError of cross_entropy, a device-side assert on
    CUDA; num_classes above the outputs trained on)."""
    from torch.utils.data import DataLoader, TensorDataset

    from sbnn_addons.bench import compare

    (x, y), (xte, yte) = _spike_data(24, 0), _spike_data(12, 1)
    kw = dict(methods=["original"], epochs=1, batch_size=12)
    if case == "num_classes":
        kw["num_classes"] = 4
        with pytest.warns(UserWarning, match="lacks"):
            with pytest.raises(ValueError, match=match):
                compare(_sj_net, (x, y), (xte, yte), **kw)
        return
    y, yte = torch.where(y == 2, 4, y), torch.where(yte == 2, 4, yte)
    train = (x, y) if case == "labels" else DataLoader(
        TensorDataset(x.transpose(0, 1), y), batch_size=12)
    with pytest.raises(ValueError, match=match):
        compare(_sj_net, train, (xte.transpose(0, 1), yte) if case == "loader" else
                (xte, yte), layout="BT" if case == "loader" else "TB", **kw)


def test_compare_names_a_diverged_run():
    from sbnn_addons.bench import compare

    def nan_net():
        net = _sj_net()
        with torch.no_grad():
            net[2].weight.fill_(float("nan"))
        return net

    with pytest.raises(ValueError, match=r"original \(seed 0\).*NaN.*diverged"):
        compare(nan_net, _spike_data(12, 0), _spike_data(6, 1), methods=["original"],
                epochs=1)


def test_surrogate_names_in_the_report():
    import snntorch as snn
    from snntorch import surrogate
    from torch import nn

    from sbnn_addons.bench.compare import describe_surrogate

    for name in ("atan", "fast_sigmoid", "sigmoid", "triangular"):
        net = nn.Sequential(nn.Linear(4, 4),
                            snn.Leaky(beta=0.9, spike_grad=getattr(surrogate, name)()))
        assert describe_surrogate(net) == name


def test_cli_lr_zero_is_a_value_and_a_file_imports_its_neighbours(tmp_path, monkeypatch,
                                                                  capsys):
    (tmp_path / "helpers.py").write_text(
        "import torch\nfrom torch import nn\nimport snntorch as snn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Linear(12, 16), snn.Leaky(beta=0.9, init_hidden=True),"
        " nn.Linear(16, 3))\n")
    (tmp_path / "mine.py").write_text(
        "import torch\nfrom helpers import make\n"
        "def net():\n    return make()\n"
        "def data():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x = (torch.rand(4, 24, 12, generator=g) < 0.3).float()\n"
        "    y = torch.arange(24) % 3\n"
        "    return (x, y), (x[:, :12], y[:12])\n")
    monkeypatch.chdir(tmp_path.parent)
    args = ["--model", f"{tmp_path.name}/mine.py:net", "--data", f"{tmp_path.name}/mine.py:data",
            "--methods", "original", "--epochs", "1", "--quiet", "--no-plots",
            "--out-dir", str(tmp_path / "out")]
    for bad in ("0", "-0.001"):  # refused by the parser, not replaced by the default
        with pytest.raises(SystemExit):
            cli.run(args + ["--lr", bad])
        assert f"argument --lr: must be a finite number > 0 (a learning rate, e.g. 5e-3), " \
            f"got {bad}" in capsys.readouterr().err
    assert len(cli.run(args)) == 1


class _StackNet(torch.nn.Module):
    """A sequence model (explicit time loop over [T, B, F]) that stacks its per-step logits
    on axis ``dim``: 0 gives time-major [T, B, C], 1 batch-first [B, T, C]."""

    def __init__(self, dim: int):
        import snntorch as snn

        super().__init__()
        self.dim = dim
        self.fc1, self.lif = torch.nn.Linear(12, 16), snn.Leaky(beta=0.9)
        self.fc2 = torch.nn.Linear(16, 3)

    def forward(self, x):
        mem, out = self.lif.init_leaky(), []
        for x_t in x:
            spk, mem = self.lif(self.fc1(x_t), mem)
            out.append(self.fc2(spk))
        return torch.stack(out, self.dim)


@pytest.mark.parametrize("layout", ["TB", "BT"])
def test_compare_reads_a_3d_output_time_first_and_names_batch_first(layout):
    """The model receives [T, B, ...] in every layout, and a 3-d output is [T, B, C]. A
    batch-first [B, T, C] output with batch size B == T (6 here) was averaged over the batch
    silently; it raises before training now, and time-major output still trains."""
    from sbnn_addons.bench import compare

    (x, y), test = _spike_data(24, 0), _spike_data(12, 1)
    if layout == "BT":
        x, test = x.transpose(0, 1), (test[0].transpose(0, 1), test[1])
    kw = dict(layout=layout, methods=["original"], epochs=1, batch_size=6, eval_batch_size=6)
    with pytest.raises(ValueError, match=r"batch first \[B, T, C\].*out\.mean\(1\)"):
        compare(lambda: _StackNet(1), (x, y), test, **kw)
    res = compare(lambda: _StackNet(0), (x, y), test, **kw)
    assert res.rows[0]["num_steps"] == 6 and res.rows[0]["test_samples"] == 12


class _OutputNet(torch.nn.Module):
    """Time-major logits wrapped in the return value ``kind``."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.net = kind, _StackNet(0)

    def forward(self, x):
        out = self.net(x)  # [T, B, 3]
        if self.kind == "dict":
            return {"logits": out}
        if self.kind == "triple":  # not snnTorch's (spk, mem): which item is the logits?
            return out.mean(0), out, x
        return out, out.clone()  # (spk, mem)-like pair: the first item is used


@pytest.mark.parametrize("kind, match", [
    ("dict", r"returned a dict \(keys \['logits'\]\).*readout=lambda out: out\['logits'\]"),
    ("triple", r"returned a tuple of 3 items \(Tensor\[2, 3\], Tensor\[6, 2, 3\], "
               r"Tensor\[6, 2, 12\]\).*\(spk, mem\).*readout="),
    ("pair", None),
])
def test_compare_names_outputs_it_cannot_read(kind, match):
    """A dict (it failed with AttributeError deep inside) or a tuple that is not snnTorch's
    (spk, mem) (its first item was used silently) raises before training and says what is
    read; a (spk, mem) pair still trains."""
    from sbnn_addons.bench import compare

    kw = dict(methods=["original"], epochs=1, batch_size=6)
    if match is None:
        assert compare(lambda: _OutputNet(kind), _spike_data(12, 0), _spike_data(6, 1),
                       **kw).rows[0]["test_samples"] == 6
        return
    with pytest.raises(TypeError, match=match):
        compare(lambda: _OutputNet(kind), _spike_data(12, 0), _spike_data(6, 1), **kw)


def test_probes_run_once_per_model_not_per_seed(monkeypatch):
    """The readout probe (which layers stay deterministic) ran for every (method, seed),
    though the seeds of a method convert the same layers: it runs once per method now,
    and every seed still excludes the readout."""
    import sbnn_addons as sb
    from sbnn_addons.bench import compare

    compare_mod = sys.modules["sbnn_addons.bench.compare"]  # the module, not the function
    calls = []
    real = compare_mod.check_variance_flow

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(compare_mod, "check_variance_flow", counted)
    res = compare(_snntorch_net, _spike_data(12, 0), _spike_data(6, 1), methods=["sbnn-st"],
                  seeds=[0, 1, 2], epochs=1, batch_size=6, mc_samples=1, keep_models=True)
    assert len(calls) == 1
    for row in res.rows:
        model = row["_model"]
        assert sb.layers.is_bayesian(model[0]) and not sb.layers.is_bayesian(model[2])


def test_reliability_curve_bins_as_the_ece_in_the_title():
    """The bench's reliability figure bins confidences as its ECE: 0.6 (float32
    0.59999996, the 10th bin's edge of 15) in bin 9, where ``floor(conf * 15)`` put it in
    bin 8; the bars then recompute the ECE exactly."""
    from sbnn_addons.bench.plots import reliability_curve
    from sbnn_addons.metrics import expected_calibration_error

    edge = float(torch.linspace(0, 1, 16)[9])  # 0.59999996: a confidence on the edge
    probs = torch.tensor([[edge, 1 - edge], [edge, 1 - edge], [0.9, 0.1], [0.2, 0.8]])
    targets = torch.tensor([0, 1, 0, 1])
    conf, acc, count = reliability_curve(probs, targets)
    assert count.tolist()[8:10] == [0.0, 2.0]
    ece = float((count / count.sum() * (acc - conf).abs()).sum())
    assert ece == pytest.approx(float(expected_calibration_error(probs, targets, 15)), abs=1e-6)


def test_paper_preset_converts_without_the_aux_pull(monkeypatch):
    """--preset paper trains the paper's objective: a model that compare converts (the
    small networks under --no-reference, SpikingJelly methods) gets aux_pull=0, not the
    converters' default; without a preset the converters' default stays."""
    from types import SimpleNamespace

    from sbnn_addons.bench import harness

    seen = {}

    def fake_setup(task, cfg):
        return {"cfg": {"mc_samples": 2, **cfg}, "recipe": None}

    def fake_compare(**kw):
        seen.update(kw)
        return SimpleNamespace(rows=[], meta={})

    monkeypatch.setattr(harness, "task_setup", fake_setup)
    monkeypatch.setattr(harness, "compare", fake_compare)
    cfg = apply_preset("shd", "paper", {"use_reference": False})
    harness.run_task("shd", ["sbnn-st"], [0], cfg)
    assert seen["sbnn_kwargs"] == {"aux_pull": 0.0}
    seen.clear()
    harness.run_task("shd", ["sbnn-st"], [0], {"epochs": 1, "batch_size": 2, "lr": 1e-3,
                                               "noise_lr": 1e-2})
    assert not seen.get("sbnn_kwargs")


@pytest.mark.parametrize("bad", ["-1", "nan", "inf", "x"])
def test_aux_weight_flag_is_checked_by_the_parser(bad, capsys):
    """--aux-weight -1 / nan was taken and refused only at the first training step, after
    the data had loaded (sbnn_objective); the parser names it."""
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--aux-weight", bad])
    assert "argument --aux-weight:" in capsys.readouterr().err
    assert cli.build_parser().parse_args(["--aux-weight", "0"]).aux_weight == 0.0


def test_compare_refuses_a_reinit_that_is_not_a_bool():
    """reinit="no" (a truthy string) re-initialised every seed's module."""
    from sbnn_addons.bench import compare

    with pytest.raises(TypeError, match="reinit must be True or False"):
        compare(_snntorch_net(), _spike_data(12, 0), _spike_data(6, 1), layout="TB",
                methods=["original"], epochs=1, batch_size=6, reinit="no")


def _spiking_output_net():
    """snnTorch tutorial style: the output layer is a spiking neuron, so NaN parameters
    give no spikes (NaN > threshold is False), i.e. zero logits and a finite loss, not NaN
    outputs."""
    import snntorch as snn
    from torch import nn

    return nn.Sequential(nn.Linear(12, 16), snn.Leaky(beta=0.9, init_hidden=True),
                         nn.Linear(16, 3), snn.Leaky(beta=0.9, init_hidden=True, output=True))


@pytest.mark.parametrize("method", ["original", "sbnn-st"])
def test_compare_names_a_nan_training_loss(method):
    """A loss that becomes NaN in training made the optimiser write NaN into the weights;
    a model whose output layer spikes then emits no spike (uniform predictions, a finite
    eval), and the run was reported as an accuracy of 1/C with a NaN train_loss in its
    curve: it must raise, naming the method, the seed and the epoch."""
    import torch.nn.functional as F

    from sbnn_addons.bench import compare

    calls = [0]

    def loss_fn(out, y):
        calls[0] += 1
        loss = F.cross_entropy(out, y)
        return loss * float("nan") if calls[0] == 2 else loss

    with pytest.raises(ValueError, match=rf"{method} \(seed 0\).*NaN.*epoch 1 \(batch 2.*diverged"):
        compare(_spiking_output_net, _spike_data(24, 0), _spike_data(6, 1),
                methods=[method], epochs=1, batch_size=6, loss_fn=loss_fn, warmup=False)


def test_compare_names_non_finite_parameters_with_a_finite_loss():
    """NaN weights in a model with a spiking output layer: the loss stays finite (no
    spikes: zero logits), the evaluation too; the run was reported as trained (1/C
    accuracy, "params_changed" True since NaN != NaN)."""
    from sbnn_addons.bench import compare

    def nan_net():
        net = _spiking_output_net()
        with torch.no_grad():
            net[0].weight.fill_(float("nan"))
        return net

    with pytest.raises(ValueError, match=r"original \(seed 0\).*parameters.*0\.weight.*NaN"):
        compare(nan_net, _spike_data(12, 0), _spike_data(6, 1), methods=["original"],
                epochs=1, batch_size=6)


def test_compare_names_an_encode_that_ignores_its_generator():
    """encode=lambda x, gen: rate_code(x, T) (the generator forgotten) drew from the
    global RNG, whose state at the final evaluation differs between the methods: each
    method was scored on another random coding of the test set, silently (the training
    inputs matched, and only the stored batches were checked). It raises before training;
    an encode that uses its generator runs."""
    from sbnn_addons.bench import compare
    from sbnn_addons.data import rate_code

    x, y = _spike_data(24, 0)
    xte, yte = _spike_data(12, 1)
    static = (x.mean(0), y), (xte.mean(0), yte)  # intensities [N, F] in [0, 1]
    kw = dict(layout="static", methods=["original", "sbnn-st"], epochs=1, batch_size=12,
              mc_samples=2, warmup=False)
    with pytest.raises(ValueError, match=r"encode.*generator.*rate_code\(x, T, gen\)"):
        compare(_snntorch_net, *static, encode=lambda xb, gen: rate_code(xb, 4), **kw)
    res = compare(_snntorch_net, *static, encode=lambda xb, gen: rate_code(xb, 4, gen), **kw)
    assert len(res.rows) == 2
